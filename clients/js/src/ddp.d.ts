// Type declarations for ddp.js (Device Data Proxy client). Keep in step with ddp.js.

/** Any JSON value except null (the server never stores null). */
export type JsonValue = string | number | boolean | RawJson | JsonValue[] | { [key: string]: JsonValue | null };

/**
 * JSON text sent exactly as written (`new RawJson('1.10')` keeps a number's text, which a
 * JavaScript number would not). Compared and shown as its parsed value.
 */
export class RawJson {
  /** Throws DdpError INVALID_JSON if `text` is not JSON. */
  constructor(text: string);
  readonly text: string;
  toJSON(): any;
}

/** JSON text of `value`, every RawJson in it written as its own text. */
export function toJsonText(value: any): string;

/** A store: a device's or a home's. */
export type Scope = { device: number | string } | { home: number | string };

/** `wait` option of writes to device stores (§10); `true` means 'applied'. */
export type Wait = boolean | 'applied' | 'delivered';

export interface DdpErrorInfo {
  status?: number;
  reason?: string;
  data?: any;
  retryAfter?: number;
  cause?: any;
}

/**
 * Every failure of this client: an HTTP status >= 400, a WebSocket `error` frame, a network
 * failure (`reason` "NETWORK_ERROR"), a write lost with its connection ("CONNECTION_LOST") or a
 * mirror closed under a pending call ("CLOSED").
 */
export class DdpError extends Error {
  constructor(message: string, info?: DdpErrorInfo);
  /** HTTP status; undefined for socket and network errors. */
  status: number | undefined;
  /** The server's reason, e.g. "REVISION_MISMATCH", or "NETWORK_ERROR". */
  reason: string;
  /** The server's `data` (e.g. `{rev}` on a 412, `{index, key}` on a socket error frame). */
  data: any;
  /** Seconds from a Retry-After header. */
  retryAfter: number | undefined;
}

export interface Response<T = any> {
  status: number;
  headers: Headers;
  /** Parsed JSON, or null when the body is empty. */
  body: T;
}

export interface RequestOptions {
  /** Query parameters; arrays repeat the parameter, undefined/null are left out. */
  query?: Record<string, string | number | boolean | Array<string | number> | null | undefined>;
  /** Sent as JSON (a string is sent as is). */
  body?: any;
  headers?: Record<string, string>;
}

export interface Item {
  key: string;
  value: JsonValue;
  modificationTime: string;
}

export interface KeyAnswer extends Item {
  /** The item's rev (from the ETag). */
  rev: number;
  [field: string]: any;
}

export interface WriteAnswer {
  /** The store's rev after the write (from the ETag). */
  rev: number;
  applied?: boolean;
  appliedRev?: number;
  delivered?: boolean;
  deliveredRev?: number;
  [field: string]: any;
}

export type BatchOp =
  | { op: 'set'; key: string; value: JsonValue; ifRev?: number }
  | { op: 'delete'; key: string; ifRev?: number }
  | { op: 'merge'; key: string; value: { [key: string]: JsonValue | null }; ifRev?: number };

export interface BatchAnswer extends WriteAnswer {
  results: Array<{ key: string; rev: number }>;
}

export interface Home {
  id: number;
  name: string;
  creationTime: string;
  [field: string]: any;
}

export interface SyncState {
  rev: number;
  deliveredRev: number;
  appliedRev: number;
  appliedTime: string | null;
  isConnected: boolean;
}

export interface Device {
  id: number;
  name: string;
  homeId: number | null;
  deviceClass: string;
  tag: string;
  creationTime: string;
  isConnected: boolean;
  lastConnectTime: string | null;
  lastDisconnectTime: string | null;
  sync: SyncState;
  [field: string]: any;
}

export interface DeviceFilters {
  home?: number | string;
  /** `key<op><JSON literal>` conditions (`fw>=2`, `mode="eco"`, `serial`, `!serial`), ANDed. */
  where?: string | string[];
  class?: string;
  tag?: string;
  connected?: boolean;
  behind?: boolean;
  limit?: number;
  after?: number | string;
}

export interface ApiKey {
  id: number;
  name: string;
  homes: number[] | null;
  permission: 'read' | 'readWrite';
  /** Only in the answer of createApiKey. */
  key?: string;
  [field: string]: any;
}

export interface Job {
  id: number;
  state: 'running' | 'done' | 'cancelled';
  select: Record<string, any>;
  ops: BatchOp[];
  rate?: number;
  selected: number;
  written: number;
  failed: number;
  delivered: number;
  applied: number;
  errors: Array<{ deviceId: number; reason: string }>;
  creationTime: string;
  endTime: string | null;
  [field: string]: any;
}

/** An event of §6. */
export interface DdpEvent {
  homeId: number;
  timestamp: string;
  eventType: string;
  eventData: any;
  originDeviceId?: number;
  originProjectKeyId?: number;
}

export interface EventsOptions {
  /** Only these homes (default: every home the key sees). */
  home?: number | string | Array<number | string>;
  onEvent?: (event: DdpEvent) => void;
  onOpen?: () => void;
  onClose?: (info: { code: number; reason: string }) => void;
  onError?: (error: DdpError) => void;
}

export interface ClientOptions {
  /** The server's base URL, e.g. 'http://127.0.0.1:8080'; '' = same origin. */
  url?: string;
  /** Admin key, project key or device key. */
  token?: string;
  fetch?: typeof fetch;
  /** A WebSocket class (default: the global one, needed only when a socket is opened). */
  WebSocket?: any;
}

/** A REST client of the server, plus factories for its WebSockets. */
export class Client {
  constructor(options?: ClientOptions);
  readonly url: string;
  readonly token: string | undefined;

  request<T = any>(method: string, path: string, options?: RequestOptions): Promise<Response<T>>;

  listKeys(scope: Scope, options?: { keyPrefix?: string }): Promise<{ rev: number; items: Item[] }>;
  getKey(scope: Scope, key: string): Promise<KeyAnswer>;
  setKey(
    scope: Scope,
    key: string,
    value: JsonValue,
    options?: { ifMatch?: number | '*'; ifNoneMatch?: boolean; wait?: Wait; waitTimeout?: number },
  ): Promise<WriteAnswer>;
  deleteKey(scope: Scope, key: string, options?: { ifMatch?: number | '*'; wait?: Wait; waitTimeout?: number }): Promise<WriteAnswer>;
  mergeKey(
    scope: Scope,
    key: string,
    patch: { [key: string]: JsonValue | null },
    options?: { ifMatch?: number | '*'; ifNoneMatch?: boolean; wait?: Wait; waitTimeout?: number },
  ): Promise<WriteAnswer>;
  batch(scope: Scope, ops: BatchOp[], options?: { ifRev?: number; wait?: Wait; waitTimeout?: number }): Promise<BatchAnswer>;

  listHomes(): Promise<Home[]>;
  getHome(id: number | string): Promise<Home>;
  createHome(body: { name: string }): Promise<Home>;
  deleteHome(id: number | string): Promise<void>;

  listDevices(filters?: DeviceFilters): Promise<{ devices: Device[]; next: string | null }>;
  getDevice(id: number | string): Promise<Device>;
  createDevice(body: { name: string; homeId?: number; deviceClass?: string; tag?: string }): Promise<Device & { apiKey: string }>;
  updateDevice(id: number | string, patch: { name?: string; homeId?: number | null }): Promise<Device>;
  deleteDevice(id: number | string): Promise<void>;
  rotateDeviceKey(id: number | string): Promise<{ apiKey: string }>;
  deviceSync(id: number | string): Promise<SyncState>;

  sendCommand(deviceId: number | string, action: string, parameters?: Record<string, any>): Promise<void>;
  raiseEvent(deviceId: number | string, eventType: string, eventData?: any): Promise<void>;

  listApiKeys(): Promise<ApiKey[]>;
  createApiKey(body: { name: string; homes?: number[]; permission: 'read' | 'readWrite' }): Promise<ApiKey & { key: string }>;
  deleteApiKey(id: number | string): Promise<void>;

  createJob(body: { select: Record<string, any>; ops: BatchOp[]; rate?: number }): Promise<Job>;
  listJobs(query?: Record<string, any>): Promise<Job[]>;
  getJob(id: number | string): Promise<Job>;
  cancelJob(id: number | string): Promise<Job>;

  events(options?: EventsOptions): EventStream;
  mirror(deviceId: number | string, opts?: Omit<DeviceMirrorOptions, 'url' | 'deviceId' | 'token'> & { token?: string }): DeviceMirror;
}

/**
 * The app event stream over `GET /events/websocket`. Also an EventTarget: 'event' (detail: the
 * event), 'open', 'close' (detail: {code, reason}), 'error' (detail: {error}).
 */
export class EventStream extends EventTarget {
  constructor(options: EventsOptions & { url?: string; token?: string; WebSocket?: any });
  /** Resolves when the stream is open; rejects if it closes (or fails) first. */
  readonly ready: Promise<void>;
  readonly closed: boolean;
  close(): void;
}

export interface MirrorChange {
  key: string;
  /** undefined on delete. */
  value: JsonValue | undefined;
  rev: number;
  deleted: boolean;
}

export interface MirrorSnapshot {
  rev: number;
  ahead: number[];
  /** value null = tombstone. */
  entries: Record<string, { value: JsonValue | null; rev: number }>;
}

/** The mirror's state machine without IO (the Rust SDK's rules). */
export class Mirror {
  constructor();
  /** Every change up to this rev has been seen. */
  rev: number;
  ahead: Set<number>;
  readonly size: number;
  get(key: string): JsonValue | undefined;
  entry(key: string): { value: JsonValue | undefined; rev: number } | undefined;
  entries(): Array<[string, JsonValue]>;
  apply(message: any): Array<MirrorChange & { source: 'reload' | 'live' }>;
  toJSON(): MirrorSnapshot;
  static fromJSON(snapshot: MirrorSnapshot | string | null | undefined): Mirror;
}

/** Applies one server message to a Mirror; returns the changes made. */
export function applyMessage(mirror: Mirror, message: any): Array<MirrorChange & { source: 'reload' | 'live' }>;

export type MirrorStatus = 'connecting' | 'live' | 'offline' | 'closed';

export interface DeviceMirrorOptions {
  /** The server's HTTP base URL ('' = same origin). */
  url?: string;
  deviceId: number | string;
  token?: string;
  WebSocket?: any;
  /** Send `{"action":"ack","rev"}` after applying (device's own key only). Default false. */
  acknowledge?: boolean;
  /** Ask for batch messages (`?batches=1`). Default true. */
  batches?: boolean;
  /** Ask for commands on the session (`?commands=1`, device's own key only). Default false. */
  commands?: boolean;
  /** Reconnect backoff (default 500 ms doubling to 30 s, with jitter). */
  reconnect?: { minMs?: number; maxMs?: number };
  /** Keeps the mirror across restarts; acks then cover only what was saved. */
  storage?: {
    load(): MirrorSnapshot | null | undefined | Promise<MirrorSnapshot | null | undefined>;
    save(snapshot: MirrorSnapshot): void | Promise<void>;
  };
  /** Least time between two acks. Default 250. */
  ackIntervalMs?: number;
}

export interface DeviceMirrorEventMap {
  reload: CustomEvent<{ rev: number; items: Item[]; changes: MirrorChange[] }>;
  change: CustomEvent<MirrorChange>;
  batch: CustomEvent<{ rev: number; changes: MirrorChange[] }>;
  status: CustomEvent<{ status: MirrorStatus }>;
  error: CustomEvent<{ error: DdpError }>;
  command: CustomEvent<{ action: string; parameters: Record<string, any> }>;
  ack: CustomEvent<{ rev: number }>;
}

/** The live mirror of a device's store over the sync WebSocket `GET /devices/{id}/kv`. */
export class DeviceMirror extends EventTarget {
  constructor(options: DeviceMirrorOptions);
  readonly url: string;
  readonly deviceId: number | string;
  /** The state machine (read it with get/entries). */
  readonly mirror: Mirror;
  readonly rev: number;
  readonly status: MirrorStatus;
  readonly size: number;
  /** The last error seen. */
  readonly lastError: DdpError | undefined;
  /** Sessions opened so far. */
  readonly sessions: number;
  /** How the current (or last) session started. */
  readonly lastStart: 'reload' | 'resume' | undefined;

  /** Resolves when the first reload or resume has been applied; rejects if closed first. */
  connect(): Promise<void>;
  /** Drops the current socket and reconnects at once (resuming). */
  reconnect(): void;
  /** Closes for good; pending writes and connect() reject with reason "CLOSED". */
  close(): void;
  get(key: string): JsonValue | undefined;
  entries(): Array<[string, JsonValue]>;
  /** Resolves with the authoritative rev once the server confirms the write. */
  set(key: string, value: JsonValue): Promise<number>;
  delete(key: string): Promise<number>;
  batch(ops: BatchOp[]): Promise<number>;
  toJSON(): MirrorSnapshot;

  addEventListener<K extends keyof DeviceMirrorEventMap>(
    type: K,
    listener: (event: DeviceMirrorEventMap[K]) => void,
    options?: boolean | AddEventListenerOptions,
  ): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | AddEventListenerOptions): void;
  removeEventListener<K extends keyof DeviceMirrorEventMap>(
    type: K,
    listener: (event: DeviceMirrorEventMap[K]) => void,
    options?: boolean | EventListenerOptions,
  ): void;
  removeEventListener(type: string, listener: EventListenerOrEventListenerObject | null, options?: boolean | EventListenerOptions): void;
}

/** Parses an ETag (`"12"`, `W/"12"`) into a rev. */
export function parseEtag(etag: string | null | undefined): number | undefined;
/** Whether `key` follows the key rule (PROTOCOL.md §3): 1–255 of `A-Z a-z 0-9 _ - : .`. */
export function isValidKey(key: any): boolean;
/** The `after` cursor of a `Link: <…>; rel="next"` header, or null. */
export function parseNextLink(link: string | null | undefined): string | null;
/** `http(s)://…` → `ws(s)://…` ('' = this page's origin). */
export function toWebSocketUrl(url: string): string;
/** `{device: id}` → `/devices/{id}`, `{home: id}` → `/homes/{id}`. */
export function scopePath(scope: Scope): string;

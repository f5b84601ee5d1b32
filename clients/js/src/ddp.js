// Device Data Proxy — JavaScript client (browsers and Node 20+), no dependencies.
//
// One self-contained ES module: the web console is served this exact file and imports it as
// `./ddp.js`. It needs `fetch` for REST and a `WebSocket` class only when a socket is opened
// (Node 20: run with `--experimental-websocket`, or pass `WebSocket` in the options).
//
// The wire contract is docs/PROTOCOL.md; the mirror rules follow the Rust device SDK
// (crates/ddp-device/src/mirror.rs).

/**
 * Every failure of this client: an HTTP status >= 400, a WebSocket `error` frame, a network
 * failure (`reason` "NETWORK_ERROR"), a write lost with its connection ("CONNECTION_LOST") or a
 * mirror closed under a pending call ("CLOSED").
 */
export class DdpError extends Error {
  /**
   * @param {string} message the server's message (or a description)
   * @param {{status?: number, reason?: string, data?: any, retryAfter?: number, cause?: any}} [info]
   */
  constructor(message, { status, reason = 'UNKNOWN', data, retryAfter, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'DdpError';
    /** @type {number|undefined} HTTP status; undefined for socket and network errors */
    this.status = status;
    /** @type {string} the server's reason, e.g. "REVISION_MISMATCH" */
    this.reason = reason;
    /** @type {any} the server's `data`, if any */
    this.data = data;
    /** @type {number|undefined} seconds from a Retry-After header */
    this.retryAfter = retryAfter;
  }
}

/**
 * JSON text sent exactly as written. JavaScript numbers are doubles, so `1.10` would go out as
 * `1.1` and `12345678901234567890` rounded; the server keeps a value's text exactly, and
 * `new RawJson('1.10')` (anywhere in a value, patch, op, command or job) sends it as given.
 * Compared and shown as its parsed value.
 */
export class RawJson {
  /** @param {string} text JSON text; throws DdpError INVALID_JSON if it is not JSON */
  constructor(text) {
    try {
      JSON.parse(text);
    } catch (e) {
      throw new DdpError(`not JSON: ${e.message}`, { reason: 'INVALID_JSON' });
    }
    /** @type {string} */
    this.text = String(text).trim();
  }

  /** The parsed value (what JSON.stringify sees). */
  toJSON() {
    return JSON.parse(this.text);
  }
}

/**
 * JSON text of `value` with every RawJson in it written as its own text (otherwise as
 * JSON.stringify writes it).
 * @param {any} value
 * @returns {string}
 */
export function toJsonText(value) {
  if (value instanceof RawJson) return value.text;
  if (value !== null && typeof value === 'object') {
    if (typeof value.toJSON === 'function') return toJsonText(value.toJSON());
    if (Array.isArray(value)) {
      return `[${value.map((v) => (v === undefined || typeof v === 'function' ? 'null' : toJsonText(v))).join(',')}]`;
    }
    const members = [];
    for (const [k, v] of Object.entries(value)) {
      if (v === undefined || typeof v === 'function' || typeof v === 'symbol') continue;
      members.push(`${JSON.stringify(k)}:${toJsonText(v)}`);
    }
    return `{${members.join(',')}}`;
  }
  return JSON.stringify(value);
}

/**
 * Parses an ETag header (`"12"` or `W/"12"`) into a rev.
 * @param {string|null|undefined} etag
 * @returns {number|undefined}
 */
export function parseEtag(etag) {
  if (!etag) return undefined;
  const m = /^\s*(?:W\/)?"?(\d+)"?\s*$/.exec(etag);
  return m ? Number(m[1]) : undefined;
}

/**
 * The `after` cursor of a `Link: <…>; rel="next"` header, or null.
 * @param {string|null|undefined} link
 * @returns {string|null}
 */
export function parseNextLink(link) {
  if (!link) return null;
  for (const part of link.split(',')) {
    const m = /<([^>]*)>\s*;\s*rel="?next"?/.exec(part);
    if (!m) continue;
    const q = m[1].indexOf('?');
    if (q < 0) return null;
    const after = new URLSearchParams(m[1].slice(q + 1)).get('after');
    return after === null ? null : after;
  }
  return null;
}

/**
 * The WebSocket base URL (`ws://…` / `wss://…`) for an HTTP base URL ('' = this page's origin).
 * @param {string} url
 * @returns {string}
 */
export function toWebSocketUrl(url) {
  let base = (url || '').replace(/\/+$/, '');
  if (!/^[a-z][a-z0-9+.-]*:/i.test(base)) {
    const loc = globalThis.location;
    if (!loc || !loc.host) throw new DdpError('no url given and no page origin to default to', { reason: 'INVALID_ARGUMENT' });
    base = `${loc.protocol}//${loc.host}${base}`;
  }
  return base.replace(/^http(s?):/i, 'ws$1:');
}

function etagOf(rev) {
  if (rev === '*') return '*';
  return `"${rev}"`;
}

function seg(x) {
  return encodeURIComponent(String(x));
}

/**
 * The path of a store: `{device: id}` → `/devices/{id}`, `{home: id}` → `/homes/{id}`.
 * @param {{device?: number|string, home?: number|string}} scope
 * @returns {string}
 */
export function scopePath(scope) {
  if (scope && scope.device !== undefined && scope.device !== null) return `/devices/${seg(scope.device)}`;
  if (scope && scope.home !== undefined && scope.home !== null) return `/homes/${seg(scope.home)}`;
  throw new DdpError('a scope is {device: id} or {home: id}', { reason: 'INVALID_ARGUMENT' });
}

function waitQuery(wait, waitTimeout) {
  const q = {};
  if (wait) q.wait = wait === true ? 'applied' : wait;
  if (waitTimeout !== undefined) q.waitTimeout = waitTimeout;
  return q;
}

function buildQuery(query) {
  const p = new URLSearchParams();
  if (query) {
    for (const [k, v] of Object.entries(query)) {
      if (v === undefined || v === null) continue;
      if (Array.isArray(v)) for (const x of v) p.append(k, String(x));
      else p.append(k, String(v));
    }
  }
  const s = p.toString();
  return s ? `?${s}` : '';
}

async function errorFromResponse(res, text) {
  let body;
  try {
    body = text ? JSON.parse(text) : undefined;
  } catch {
    body = undefined;
  }
  const ra = res.headers.get('retry-after');
  const retryAfter = ra !== null && ra !== '' && !Number.isNaN(Number(ra)) ? Number(ra) : undefined;
  if (body && typeof body === 'object' && typeof body.reason === 'string') {
    return new DdpError(body.message || body.reason, {
      status: res.status,
      reason: body.reason,
      data: body.data === null ? undefined : body.data,
      retryAfter,
    });
  }
  return new DdpError(text || `HTTP ${res.status}`, { status: res.status, reason: `HTTP_${res.status}`, retryAfter });
}

/**
 * A REST client of the server, plus factories for its WebSockets (events, device mirrors).
 */
export class Client {
  /**
   * @param {{url?: string, token?: string, fetch?: typeof fetch, WebSocket?: any}} [options]
   *   `url`: the server's base URL ('' = same origin); `token`: admin, project or device key.
   */
  constructor({ url = '', token, fetch: fetchImpl, WebSocket: ws } = {}) {
    /** @type {string} */
    this.url = (url || '').replace(/\/+$/, '');
    /** @type {string|undefined} */
    this.token = token;
    this._fetch = fetchImpl;
    this._WebSocket = ws;
  }

  /**
   * One HTTP request. JSON bodies are sent as JSON (a string body is sent as is); the answer's
   * body is parsed JSON, or null when empty. Throws DdpError for a status >= 400 or a network
   * failure.
   * @param {string} method
   * @param {string} path starting with '/'
   * @param {{query?: Record<string, any>, body?: any, headers?: Record<string, string>}} [options]
   * @returns {Promise<{status: number, headers: Headers, body: any}>}
   */
  async request(method, path, { query, body, headers } = {}) {
    const f = this._fetch || globalThis.fetch;
    if (typeof f !== 'function') throw new DdpError('no fetch available: pass {fetch}', { reason: 'NETWORK_ERROR' });
    const h = { Accept: 'application/json' };
    if (this.token) h.Authorization = `ModeCloud ${this.token}`;
    let payload;
    if (body !== undefined) {
      payload = typeof body === 'string' ? body : toJsonText(body);
      h['Content-Type'] = 'application/json';
    }
    Object.assign(h, headers || {});
    let res;
    try {
      res = await f.call(globalThis, this.url + path + buildQuery(query), { method, headers: h, body: payload });
    } catch (e) {
      throw new DdpError(`${method} ${path}: ${e && e.message ? e.message : e}`, { reason: 'NETWORK_ERROR', cause: e });
    }
    let text;
    try {
      text = await res.text();
    } catch (e) {
      throw new DdpError(`${method} ${path}: ${e && e.message ? e.message : e}`, { reason: 'NETWORK_ERROR', cause: e });
    }
    if (res.status >= 400) throw await errorFromResponse(res, text);
    let parsed = null;
    if (text) {
      try {
        parsed = JSON.parse(text);
      } catch {
        parsed = text;
      }
    }
    return { status: res.status, headers: res.headers, body: parsed };
  }

  // ---- key-value stores (§3, §10, §11) ----

  /**
   * Lists a store: `{rev, items}` (items sorted by key).
   * @param {{device?: number|string, home?: number|string}} scope
   * @param {{keyPrefix?: string}} [options]
   */
  async listKeys(scope, { keyPrefix } = {}) {
    const r = await this.request('GET', `${scopePath(scope)}/kv`, { query: { keyPrefix } });
    return { rev: parseEtag(r.headers.get('etag')), items: r.body || [] };
  }

  /**
   * Reads one key: the server's `{key, value, modificationTime}` plus the item's `rev`.
   * @param {{device?: number|string, home?: number|string}} scope
   * @param {string} key
   */
  async getKey(scope, key) {
    const r = await this.request('GET', `${scopePath(scope)}/kv/${seg(key)}`);
    return { ...r.body, rev: parseEtag(r.headers.get('etag')) };
  }

  /**
   * Sets one key. `ifMatch`: the item's rev (or '*'); `ifNoneMatch: true`: create only;
   * `wait: 'applied'|'delivered'` (device stores; `true` = 'applied') with `waitTimeout` seconds.
   * Answers `{rev}` (plus the server's wait fields).
   * @param {{device?: number|string, home?: number|string}} scope
   * @param {string} key
   * @param {any} value
   * @param {{ifMatch?: number|string, ifNoneMatch?: boolean, wait?: boolean|'applied'|'delivered', waitTimeout?: number}} [options]
   */
  async setKey(scope, key, value, { ifMatch, ifNoneMatch, wait, waitTimeout } = {}) {
    const headers = {};
    if (ifMatch !== undefined && ifMatch !== null) headers['If-Match'] = etagOf(ifMatch);
    if (ifNoneMatch) headers['If-None-Match'] = '*';
    const r = await this.request('PUT', `${scopePath(scope)}/kv/${seg(key)}`, {
      query: waitQuery(wait, waitTimeout),
      body: { value },
      headers,
    });
    return { ...(r.body && typeof r.body === 'object' ? r.body : {}), rev: parseEtag(r.headers.get('etag')) };
  }

  /**
   * Deletes one key (404 KEY_NOT_FOUND when absent). Options as for setKey.
   * @param {{device?: number|string, home?: number|string}} scope
   * @param {string} key
   * @param {{ifMatch?: number|string, wait?: boolean|'applied'|'delivered', waitTimeout?: number}} [options]
   */
  async deleteKey(scope, key, { ifMatch, wait, waitTimeout } = {}) {
    const headers = {};
    if (ifMatch !== undefined && ifMatch !== null) headers['If-Match'] = etagOf(ifMatch);
    const r = await this.request('DELETE', `${scopePath(scope)}/kv/${seg(key)}`, {
      query: waitQuery(wait, waitTimeout),
      headers,
    });
    return { ...(r.body && typeof r.body === 'object' ? r.body : {}), rev: parseEtag(r.headers.get('etag')) };
  }

  /**
   * Applies a JSON merge patch (RFC 7396) to one key. Answers `{rev}`.
   * @param {{device?: number|string, home?: number|string}} scope
   * @param {string} key
   * @param {object} patch
   * @param {{ifMatch?: number|string, ifNoneMatch?: boolean, wait?: boolean|'applied'|'delivered', waitTimeout?: number}} [options]
   */
  async mergeKey(scope, key, patch, { ifMatch, ifNoneMatch, wait, waitTimeout } = {}) {
    const headers = { 'Content-Type': 'application/merge-patch+json' };
    if (ifMatch !== undefined && ifMatch !== null) headers['If-Match'] = etagOf(ifMatch);
    if (ifNoneMatch) headers['If-None-Match'] = '*';
    const r = await this.request('PATCH', `${scopePath(scope)}/kv/${seg(key)}`, {
      query: waitQuery(wait, waitTimeout),
      body: toJsonText(patch),
      headers,
    });
    return { ...(r.body && typeof r.body === 'object' ? r.body : {}), rev: parseEtag(r.headers.get('etag')) };
  }

  /**
   * An atomic batch (§11): ops `{op:'set',key,value}`, `{op:'delete',key}`, `{op:'merge',key,value}`,
   * each with an optional `ifRev`. `ifRev`: the store's rev the batch requires. Answers
   * `{rev, results: [{key, rev}]}` (plus wait fields).
   * @param {{device?: number|string, home?: number|string}} scope
   * @param {Array<object>} ops
   * @param {{ifRev?: number, wait?: boolean|'applied'|'delivered', waitTimeout?: number}} [options]
   */
  async batch(scope, ops, { ifRev, wait, waitTimeout } = {}) {
    const headers = {};
    if (ifRev !== undefined && ifRev !== null) headers['If-Match'] = etagOf(ifRev);
    const r = await this.request('PATCH', `${scopePath(scope)}/kv`, {
      query: waitQuery(wait, waitTimeout),
      body: { ops },
      headers,
    });
    return r.body;
  }

  // ---- homes (§5) ----

  /** Lists the homes the key sees. @returns {Promise<Array<object>>} */
  async listHomes() {
    return (await this.request('GET', '/homes')).body;
  }

  /** One home. @param {number|string} id */
  async getHome(id) {
    return (await this.request('GET', `/homes/${seg(id)}`)).body;
  }

  /** Creates a home (admin). @param {{name: string}} body */
  async createHome(body) {
    return (await this.request('POST', '/homes', { body })).body;
  }

  /** Deletes a home (admin). @param {number|string} id */
  async deleteHome(id) {
    await this.request('DELETE', `/homes/${seg(id)}`);
  }

  // ---- devices (§5, §10, §12) ----

  /**
   * Lists devices (§12): `{devices, next}`, `next` the `after` cursor of the next page or null.
   * `where`: a string or an array of `key<op><JSON literal>` conditions.
   * @param {{home?: number|string, where?: string|string[], class?: string, tag?: string, connected?: boolean, behind?: boolean, limit?: number, after?: number|string}} [filters]
   */
  async listDevices({ home, where, class: cls, tag, connected, behind, limit, after } = {}) {
    const r = await this.request('GET', '/devices', {
      query: {
        homeId: home,
        deviceClass: cls,
        tag,
        isConnected: connected,
        behind,
        where: where === undefined ? undefined : [].concat(where),
        limit,
        after,
      },
    });
    return { devices: r.body || [], next: parseNextLink(r.headers.get('link')) };
  }

  /** One device. @param {number|string} id */
  async getDevice(id) {
    return (await this.request('GET', `/devices/${seg(id)}`)).body;
  }

  /**
   * Creates a device (admin); the answer holds its `apiKey`, shown only here.
   * @param {{name: string, homeId?: number, deviceClass?: string, tag?: string}} body
   */
  async createDevice(body) {
    return (await this.request('POST', '/devices', { body })).body;
  }

  /** Updates a device (`{name?, homeId?}`; `homeId: null` leaves its home). @param {number|string} id @param {object} patch */
  async updateDevice(id, patch) {
    return (await this.request('PATCH', `/devices/${seg(id)}`, { body: patch })).body;
  }

  /** Deletes a device. @param {number|string} id */
  async deleteDevice(id) {
    await this.request('DELETE', `/devices/${seg(id)}`);
  }

  /** Issues a new device key (`{apiKey}`); the old one stops at once. @param {number|string} id */
  async rotateDeviceKey(id) {
    return (await this.request('POST', `/devices/${seg(id)}/apiKey`)).body;
  }

  /** `{rev, deliveredRev, appliedRev, appliedTime, isConnected}` (§10). @param {number|string} id */
  async deviceSync(id) {
    return (await this.request('GET', `/devices/${seg(id)}/sync`)).body;
  }

  /**
   * Sends a command to a device's live sessions (§8); 409 DEVICE_OFFLINE when it has none.
   * @param {number|string} deviceId
   * @param {string} action
   * @param {object} [parameters]
   */
  async sendCommand(deviceId, action, parameters) {
    const body = parameters === undefined ? { action } : { action, parameters };
    await this.request('PUT', `/devices/${seg(deviceId)}/command`, { body });
  }

  /**
   * Raises an event for a device (§6).
   * @param {number|string} deviceId
   * @param {string} eventType
   * @param {any} [eventData]
   */
  async raiseEvent(deviceId, eventType, eventData) {
    const body = eventData === undefined ? { eventType } : { eventType, eventData };
    await this.request('PUT', `/devices/${seg(deviceId)}/event`, { body });
  }

  // ---- project API keys (§5) ----

  /** Lists project keys (no secrets). */
  async listApiKeys() {
    return (await this.request('GET', '/apiKeys')).body;
  }

  /** Creates a project key; the answer's `key` is shown only here. @param {{name: string, homes?: number[], permission: 'read'|'readWrite'}} body */
  async createApiKey(body) {
    return (await this.request('POST', '/apiKeys', { body })).body;
  }

  /** Revokes a project key. @param {number|string} id */
  async deleteApiKey(id) {
    await this.request('DELETE', `/apiKeys/${seg(id)}`);
  }

  // ---- jobs (§12) ----

  /** Creates a job `{select, ops, rate?}`. @param {object} body */
  async createJob(body) {
    return (await this.request('POST', '/jobs', { body })).body;
  }

  /** Lists jobs. @param {Record<string, any>} [query] */
  async listJobs(query = {}) {
    return (await this.request('GET', '/jobs', { query })).body;
  }

  /** One job. @param {number|string} id */
  async getJob(id) {
    return (await this.request('GET', `/jobs/${seg(id)}`)).body;
  }

  /** Cancels a job; answers the job. @param {number|string} id */
  async cancelJob(id) {
    return (await this.request('DELETE', `/jobs/${seg(id)}`)).body;
  }

  // ---- WebSockets ----

  /**
   * Opens the event stream (§6) of the key's homes, or of `home` (an id or an array of ids).
   * @param {{home?: number|string|Array<number|string>, onEvent?: (event: any) => void, onOpen?: () => void, onClose?: (info: {code: number, reason: string}) => void, onError?: (error: DdpError) => void}} [options]
   * @returns {EventStream}
   */
  events({ home, onEvent, onOpen, onClose, onError } = {}) {
    return new EventStream({ url: this.url, token: this.token, WebSocket: this._WebSocket, home, onEvent, onOpen, onClose, onError });
  }

  /**
   * A live mirror of a device's store with this client's url, token and WebSocket.
   * @param {number|string} deviceId
   * @param {object} [opts] DeviceMirror options (without url, deviceId, token)
   * @returns {DeviceMirror}
   */
  mirror(deviceId, opts = {}) {
    return new DeviceMirror({ url: this.url, token: this.token, WebSocket: this._WebSocket, ...opts, deviceId });
  }
}

function resolveWebSocket(ws) {
  const W = ws || globalThis.WebSocket;
  if (typeof W !== 'function') {
    throw new DdpError('no WebSocket available: pass {WebSocket} (Node 20: run with --experimental-websocket)', {
      reason: 'NETWORK_ERROR',
    });
  }
  return W;
}

function emit(target, type, detail) {
  target.dispatchEvent(new CustomEvent(type, { detail }));
}

// CustomEvent is global in browsers and Node >= 19; a minimal stand-in otherwise.
const CustomEvent =
  globalThis.CustomEvent ||
  class CustomEvent extends Event {
    constructor(type, init = {}) {
      super(type, init);
      this.detail = init.detail;
    }
  };

/**
 * An app's event stream over `GET /events/websocket` (token as `?authToken=`). Also an
 * EventTarget: 'event' {detail: event}, 'open', 'close' {detail: {code, reason}}, 'error' {detail: {error}}.
 */
export class EventStream extends EventTarget {
  /**
   * @param {{url?: string, token?: string, WebSocket?: any, home?: number|string|Array<number|string>, onEvent?: Function, onOpen?: Function, onClose?: Function, onError?: Function}} options
   */
  constructor({ url = '', token, WebSocket: ws, home, onEvent, onOpen, onClose, onError } = {}) {
    super();
    const W = resolveWebSocket(ws);
    const q = {};
    if (token) q.authToken = token;
    if (home !== undefined && home !== null) q.homeId = [].concat(home).join(',');
    /** @type {boolean} */
    this.closed = false;
    let opened;
    let failed;
    /** @type {Promise<void>} resolves when the stream is open; rejects if it closes first */
    this.ready = new Promise((res, rej) => {
      opened = res;
      failed = rej;
    });
    this.ready.catch(() => {});
    const socket = new W(`${toWebSocketUrl(url)}/events/websocket${buildQuery(q)}`);
    this._socket = socket;
    let isOpen = false;
    let ended = false;
    const end = (info) => {
      if (ended) return;
      ended = true;
      this.closed = true;
      failed(new DdpError(`the event stream closed (${info.code})${info.reason ? `: ${info.reason}` : ''}`, { reason: 'NETWORK_ERROR' }));
      if (onClose) onClose(info);
      emit(this, 'close', info);
    };
    socket.onopen = () => {
      if (this.closed) return;
      isOpen = true;
      opened();
      if (onOpen) onOpen();
      emit(this, 'open', {});
    };
    socket.onmessage = (m) => {
      if (this.closed) return;
      let event;
      try {
        event = JSON.parse(typeof m.data === 'string' ? m.data : String(m.data));
      } catch (e) {
        const error = new DdpError(`unreadable event: ${e.message}`, { reason: 'INVALID_JSON' });
        if (onError) onError(error);
        emit(this, 'error', { error });
        return;
      }
      if (onEvent) onEvent(event);
      emit(this, 'event', event);
    };
    socket.onerror = () => {
      if (ended) return;
      const error = new DdpError(
        isOpen ? 'the event stream failed' : 'cannot open the event stream (refused or unreachable)',
        { reason: 'NETWORK_ERROR' },
      );
      if (onError) onError(error);
      emit(this, 'error', { error });
      // Some WebSocket implementations (Node 20's) fire no 'close' after a refused handshake.
      if (!isOpen) end({ code: 1006, reason: 'the connection could not be opened' });
    };
    socket.onclose = (c) => end({ code: c.code, reason: c.reason });
  }

  /** Closes the stream (one still connecting is closed as soon as it opens). */
  close() {
    this.closed = true;
    closeSocket(this._socket);
  }
}

/**
 * Closes a WebSocket politely: one still connecting is closed once it opens, because closing
 * it earlier makes browsers log an error in the page's console; one that fails to open ends by
 * itself.
 * @param {WebSocket|null|undefined} socket
 */
function closeSocket(socket) {
  if (!socket) return;
  const close = () => {
    try {
      socket.close(1000);
    } catch {
      // already closing
    }
  };
  if (socket.readyState === 0) socket.addEventListener('open', close, { once: true });
  else close();
}

// ---- the mirror: a state machine without IO ----

function same(a, b) {
  if (a === b) return true;
  if (a === undefined || b === undefined) return false;
  return JSON.stringify(a) === JSON.stringify(b);
}

const KEY_RULE = /^[A-Za-z0-9_\-:.]{1,255}$/;
const isRev = (r) => Number.isSafeInteger(r) && r >= 0;

/**
 * Whether `key` follows the key rule (PROTOCOL.md §3): 1–255 of `A-Z a-z 0-9 _ - : .`.
 * @param {any} key
 * @returns {boolean}
 */
export function isValidKey(key) {
  return typeof key === 'string' && KEY_RULE.test(key);
}
const isObject = (o) => o !== null && typeof o === 'object' && !Array.isArray(o);

/**
 * Whether a parsed server message may be applied (conformance/README.md): a JSON object; a
 * `set`/`delete` with an integer `rev`, a key of the key rule and (set) a non-null value; a
 * `reload` with a `rev` and `items` an array (or null: empty) of such items; a `batch` with a
 * `rev` and `changes` an array of such sets/deletes (refused whole otherwise); a `resume` with
 * a `rev`. Other actions are ignored by the mirror anyway.
 * @param {any} m
 */
function usableMessage(m) {
  if (!isObject(m)) return false;
  const change = (c) =>
    isObject(c) &&
    isRev(c.rev) &&
    isValidKey(c.key) &&
    (c.action === 'delete' || (c.action === 'set' && c.value !== undefined && c.value !== null));
  switch (m.action) {
    case 'set':
    case 'delete':
      return change(m);
    case 'reload':
      return (
        isRev(m.rev) &&
        (m.items === undefined ||
          m.items === null ||
          (Array.isArray(m.items) &&
            m.items.every((i) => isObject(i) && isValidKey(i.key) && i.value !== undefined && i.value !== null)))
      );
    case 'batch':
      return isRev(m.rev) && Array.isArray(m.changes) && m.changes.every(change);
    case 'resume':
      return isRev(m.rev);
    default:
      return typeof m.action === 'string';
  }
}

/**
 * The local mirror of a store, without IO (the rules of the Rust SDK's `Mirror`):
 * set/delete apply only if their rev is greater than the key's; a delete leaves a tombstone;
 * a reload at rev R replaces everything except keys known at a rev above R; `rev` is the rev
 * up to which every change was seen; a batch applies its changes at once, in order.
 * Its JSON form `{rev, ahead, entries: {key: {value|null, rev}}}` is the Rust SDK's mirror file.
 */
export class Mirror {
  constructor() {
    /** @type {number} every change up to this rev has been seen */
    this.rev = 0;
    /** @type {Set<number>} revs above `rev` seen out of order */
    this.ahead = new Set();
    /** @type {Map<string, {value: any, rev: number}>} value undefined = tombstone */
    this.map = new Map();
  }

  /** The value of `key`, or undefined. @param {string} key */
  get(key) {
    const e = this.map.get(key);
    return e ? e.value : undefined;
  }

  /** What the mirror knows of `key`, tombstones included. @param {string} key @returns {{value: any, rev: number}|undefined} */
  entry(key) {
    const e = this.map.get(key);
    return e ? { value: e.value, rev: e.rev } : undefined;
  }

  /** Every `[key, value]` holding a value, sorted by key. @returns {Array<[string, any]>} */
  entries() {
    return [...this.map.entries()]
      .filter(([, e]) => e.value !== undefined)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
      .map(([k, e]) => [k, e.value]);
  }

  /** How many keys hold a value. */
  get size() {
    let n = 0;
    for (const e of this.map.values()) if (e.value !== undefined) n++;
    return n;
  }

  /**
   * Applies a server message; returns the changes it made
   * (`[{key, value, rev, deleted, source: 'reload'|'live'}]`), none for duplicates, stale
   * messages, `resume`, `error` and `command`.
   * @param {any} message
   * @returns {Array<{key: string, value: any, rev: number, deleted: boolean, source: 'reload'|'live'}>}
   */
  apply(message) {
    if (!usableMessage(message)) return []; // a message of the wrong shape changes nothing
    switch (message.action) {
      case 'reload':
        return this._reload(Number(message.rev), message.items || []);
      case 'set':
        return this._change(Number(message.rev), message.key, message.value);
      case 'delete':
        return this._change(Number(message.rev), message.key, undefined);
      case 'batch':
        return (message.changes || []).flatMap((c) => this.apply(c));
      default:
        return [];
    }
  }

  _change(rev, key, value) {
    // Every change up to the mirror's rev is reflected already (seen, or inside a reload): one
    // at or below it is a duplicate or older, even for a key the mirror does not hold.
    if (rev <= this.rev) return [];
    this._advance(rev);
    const old = this.map.get(key);
    if (old && old.rev >= rev) return [];
    this.map.set(key, { value, rev });
    if (same(old ? old.value : undefined, value)) return [];
    return [{ key, value, rev, deleted: value === undefined, source: 'live' }];
  }

  _advance(rev) {
    if (rev === this.rev + 1) {
      this.rev = rev;
      while (this.ahead.delete(this.rev + 1)) this.rev += 1;
    } else if (rev > this.rev) {
      this.ahead.add(rev);
    }
  }

  _reload(rev, items) {
    // The mirror reflects every change up to its rev already: a snapshot at or below it tells
    // nothing new (and must not bring back keys deleted since).
    if (rev <= this.rev) return [];
    const incoming = new Map();
    for (const i of items) incoming.set(i.key, i.value);
    const changes = [];
    for (const [key, value] of incoming) {
      const old = this.map.get(key);
      if (old && old.rev > rev) continue;
      this.map.set(key, { value, rev });
      if (!same(old ? old.value : undefined, value)) changes.push({ key, value, rev, deleted: false, source: 'reload' });
    }
    for (const [key, e] of this.map) {
      if (incoming.has(key) || e.rev > rev) continue;
      const had = e.value !== undefined;
      this.map.set(key, { value: undefined, rev });
      if (had) changes.push({ key, value: undefined, rev, deleted: true, source: 'reload' });
    }
    if (rev > this.rev) {
      this.rev = rev;
      for (const r of [...this.ahead]) if (r <= rev) this.ahead.delete(r);
      while (this.ahead.delete(this.rev + 1)) this.rev += 1;
    }
    changes.sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
    return changes;
  }

  /** A JSON-able snapshot (the Rust SDK's mirror file format). @returns {{rev: number, ahead: number[], entries: Record<string, {value: any, rev: number}>}} */
  toJSON() {
    const entries = {};
    for (const [k, e] of [...this.map.entries()].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
      entries[k] = { value: e.value === undefined ? null : e.value, rev: e.rev };
    }
    return { rev: this.rev, ahead: [...this.ahead].sort((a, b) => a - b), entries };
  }

  /** A mirror from a snapshot of `toJSON()` (or null/undefined: an empty one). @param {any} snapshot @returns {Mirror} */
  static fromJSON(snapshot) {
    const m = new Mirror();
    if (!snapshot) return m;
    const s = typeof snapshot === 'string' ? JSON.parse(snapshot) : snapshot;
    m.rev = Number(s.rev) || 0;
    for (const r of s.ahead || []) m.ahead.add(Number(r));
    for (const [k, e] of Object.entries(s.entries || {})) {
      m.map.set(k, { value: e.value === null ? undefined : e.value, rev: Number(e.rev) });
    }
    return m;
  }
}

/**
 * Applies one server message to a Mirror (see `Mirror.apply`).
 * @param {Mirror} mirror
 * @param {any} message
 */
export function applyMessage(mirror, message) {
  return mirror.apply(message);
}

// ---- the live mirror ----

function isValue(v) {
  if (v instanceof RawJson) return v.text !== 'null';
  return v !== undefined && v !== null && typeof v !== 'function' && typeof v !== 'symbol';
}

/**
 * The live mirror of a device's store over the sync WebSocket `GET /devices/{id}/kv`
 * (PROTOCOL.md §4.1), for the device itself or a watcher (admin or project key).
 *
 * Events (CustomEvent, `detail` as given): 'reload' {rev, items, changes}, 'change'
 * {key, value, rev, deleted} for every live change applied, 'batch' {rev, changes} after the
 * changes of one atomic batch, 'status' {status}, 'error' {error}, 'command' {action, parameters}
 * (with `commands: true`, device key only), 'ack' {rev} when an acknowledgement is sent.
 */
export class DeviceMirror extends EventTarget {
  /**
   * `storage.load()` may return the snapshot or a promise of it; `storage.save()` may return a
   * promise (acks wait for it).
   * @param {{url?: string, deviceId: number|string, token?: string, WebSocket?: any, acknowledge?: boolean, batches?: boolean, commands?: boolean, reconnect?: {minMs?: number, maxMs?: number}, storage?: {load(): any, save(snapshot: any): any}, ackIntervalMs?: number}} options
   */
  constructor({
    url = '',
    deviceId,
    token,
    WebSocket: ws,
    acknowledge = false,
    batches = true,
    commands = false,
    reconnect = {},
    storage,
    ackIntervalMs = 250,
  } = {}) {
    super();
    if (deviceId === undefined || deviceId === null) throw new DdpError('deviceId is required', { reason: 'INVALID_ARGUMENT' });
    this.url = url;
    this.deviceId = deviceId;
    this.token = token;
    this._WebSocket = ws;
    this.acknowledge = acknowledge;
    this.batches = batches;
    this.commands = commands;
    this.minMs = reconnect.minMs ?? 500;
    this.maxMs = reconnect.maxMs ?? 30000;
    this._nextDelay = this.minMs;
    this.storage = storage;
    this.ackIntervalMs = ackIntervalMs;
    /** @type {Mirror} the state (read it with get/entries) */
    this.mirror = new Mirror();
    this._loading = null;
    const loaded = storage ? storage.load() : null;
    if (loaded && typeof loaded.then === 'function') {
      // An asynchronous storage (IndexedDB…): connect() waits for it.
      this._loading = Promise.resolve(loaded).then(
        (snapshot) => {
          if (this.mirror.rev === 0 && this.mirror.map.size === 0) this.mirror = Mirror.fromJSON(snapshot);
          this._savedRev = this.mirror.rev;
        },
        (e) => this._error(new DdpError(`cannot load the mirror: ${e && e.message}`, { reason: 'STORAGE_ERROR', cause: e })),
      );
    } else {
      this.mirror = Mirror.fromJSON(loaded);
    }
    /** @type {'connecting'|'live'|'offline'|'closed'} */
    this.status = 'offline';
    /** @type {DdpError|undefined} the last error seen */
    this.lastError = undefined;
    /** @type {number} sessions opened so far */
    this.sessions = 0;
    /** @type {'reload'|'resume'|undefined} how the current (or last) session started */
    this.lastStart = undefined;
    this._socket = null;
    this._synced = false;
    this._started = false;
    this._queued = []; // writes not sent yet
    this._inFlight = []; // writes sent, waiting for their confirmation
    this._acked = 0;
    this._lastAck = 0;
    this._ackTimer = null;
    this._retryTimer = null;
    this._saveChain = Promise.resolve();
    this._savedRev = this.mirror.rev;
    this._waiters = [];
  }

  /** The rev up to which every change has been seen. @returns {number} */
  get rev() {
    return this.mirror.rev;
  }

  /** How many keys hold a value. */
  get size() {
    return this.mirror.size;
  }

  /** The value of `key`, or undefined. @param {string} key */
  get(key) {
    return this.mirror.get(key);
  }

  /** Every `[key, value]`, sorted by key. @returns {Array<[string, any]>} */
  entries() {
    return this.mirror.entries();
  }

  /**
   * Starts the session (and reconnects after drops, with backoff). Resolves when the first
   * reload or resume has been applied; rejects if the mirror is closed first.
   * @returns {Promise<void>}
   */
  connect() {
    if (this.status === 'closed') return Promise.reject(new DdpError('the mirror is closed', { reason: 'CLOSED' }));
    const p = this._synced ? Promise.resolve() : new Promise((res, rej) => this._waiters.push({ res, rej }));
    if (!this._started) {
      this._started = true;
      if (this._loading) this._loading.then(() => this._open());
      else this._open();
    }
    return p;
  }

  /** Drops the current socket and reconnects at once (resuming from `rev`). */
  reconnect() {
    if (this.status === 'closed' || !this._started) return;
    if (this._retryTimer) {
      clearTimeout(this._retryTimer);
      this._retryTimer = null;
      this._open();
      return;
    }
    const s = this._socket;
    if (s) {
      this._dropped(s, 'reconnect requested', true);
      try {
        s.close(1000);
      } catch {
        // already closing
      }
    }
  }

  /** Closes the mirror for good; pending writes and connect() reject with reason "CLOSED". */
  close() {
    if (this.status === 'closed') return;
    const s = this._socket;
    this._socket = null;
    if (this._retryTimer) clearTimeout(this._retryTimer);
    if (this._ackTimer) clearTimeout(this._ackTimer);
    this._retryTimer = null;
    this._ackTimer = null;
    closeSocket(s);
    const err = new DdpError('the mirror is closed', { reason: 'CLOSED' });
    for (const w of [...this._queued, ...this._inFlight]) w.reject(err);
    this._queued = [];
    this._inFlight = [];
    for (const w of this._waiters.splice(0)) w.rej(err);
    this._setStatus('closed');
  }

  /**
   * Sets a key over the socket; resolves with the authoritative rev once the server's change
   * message for it arrives; rejects with DdpError on an error frame or a lost connection.
   * @param {string} key
   * @param {any} value
   * @returns {Promise<number>}
   */
  set(key, value) {
    if (!isValue(value)) return Promise.reject(new DdpError('a value is any JSON value but null', { reason: 'INVALID_VALUE' }));
    return this._write({ kind: 'set', key, value, frame: toJsonText({ action: 'set', key, value }) });
  }

  /**
   * Deletes a key over the socket; resolves with the authoritative rev.
   * @param {string} key
   * @returns {Promise<number>}
   */
  delete(key) {
    return this._write({ kind: 'delete', key, frame: JSON.stringify({ action: 'delete', key }) });
  }

  /**
   * An atomic batch over the socket (ops as for Client.batch); resolves with the rev of its
   * last change.
   * @param {Array<object>} ops
   * @returns {Promise<number>}
   */
  batch(ops) {
    if (!Array.isArray(ops) || ops.length === 0) {
      return Promise.reject(new DdpError('a batch needs at least one op', { reason: 'INVALID_PARAMETER' }));
    }
    return this._write({ kind: 'batch', ops, frame: toJsonText({ action: 'batch', ops }) });
  }

  /** The mirror's snapshot (see Mirror.toJSON). */
  toJSON() {
    return this.mirror.toJSON();
  }

  // ---- internals ----

  _write(w) {
    if (this.status === 'closed') return Promise.reject(new DdpError('the mirror is closed', { reason: 'CLOSED' }));
    return new Promise((resolve, reject) => {
      w.resolve = resolve;
      w.reject = reject;
      const s = this._socket;
      if (s && s.readyState === 1) this._send(w);
      else this._queued.push(w);
    });
  }

  _send(w) {
    try {
      this._socket.send(w.frame);
      this._inFlight.push(w);
    } catch (e) {
      w.reject(new DdpError(`cannot send: ${e && e.message}`, { reason: 'CONNECTION_LOST', cause: e }));
    }
  }

  _setStatus(status) {
    if (this.status === status) return;
    this.status = status;
    emit(this, 'status', { status });
  }

  _error(error) {
    this.lastError = error;
    emit(this, 'error', { error });
  }

  _open() {
    if (this.status === 'closed') return;
    let W;
    try {
      W = resolveWebSocket(this._WebSocket);
    } catch (e) {
      this._error(e);
      this.close();
      return;
    }
    const q = {};
    if (this.token) q.authToken = this.token;
    if (this.commands) q.commands = 1;
    if (this.batches) q.batches = 1;
    if (this.mirror.rev > 0) q.sinceRev = this.mirror.rev;
    this._setStatus('connecting');
    this._synced = false;
    let socket;
    try {
      socket = new W(`${toWebSocketUrl(this.url)}/devices/${seg(this.deviceId)}/kv${buildQuery(q)}`);
    } catch (e) {
      this._error(new DdpError(`cannot open the sync WebSocket: ${e && e.message}`, { reason: 'NETWORK_ERROR', cause: e }));
      this._retry();
      return;
    }
    this._socket = socket;
    this._acked = 0;
    let opened = false;
    socket.onopen = () => {
      if (this._socket !== socket) return;
      opened = true;
      this.sessions += 1;
      const queued = this._queued.splice(0);
      for (const w of queued) this._send(w);
    };
    socket.onmessage = (m) => {
      if (this._socket !== socket) return;
      let message;
      try {
        message = JSON.parse(typeof m.data === 'string' ? m.data : String(m.data));
      } catch (e) {
        this._error(new DdpError(`unreadable message from the server: ${e.message}`, { reason: 'INVALID_JSON' }));
        return;
      }
      if (!usableMessage(message)) {
        this._error(new DdpError('unusable message from the server (wrong shape)', { reason: 'INVALID_JSON' }));
        return;
      }
      this._onMessage(message);
    };
    socket.onerror = () => {
      if (this._socket !== socket) return;
      if (opened) return; // 'close' follows
      this._error(new DdpError('cannot open the sync WebSocket (refused or unreachable)', { reason: 'NETWORK_ERROR' }));
      // Some WebSocket implementations (Node 20's) fire no 'close' after a refused handshake.
      this._dropped(socket, 'the connection could not be opened', false);
      try {
        socket.close();
      } catch {
        // not open
      }
    };
    socket.onclose = (c) => {
      if (this._socket !== socket) return;
      this._dropped(socket, `the session closed (${c.code})${c.reason ? `: ${c.reason}` : ''}`, false, c.code);
    };
  }

  _dropped(socket, why, immediate, code) {
    if (this._socket !== socket) return;
    this._socket = null;
    this._synced = false;
    if (this._ackTimer) {
      clearTimeout(this._ackTimer);
      this._ackTimer = null;
    }
    const lost = new DdpError(
      'the connection dropped before the server confirmed the write; it may or may not be applied',
      { reason: 'CONNECTION_LOST' },
    );
    for (const w of this._inFlight.splice(0)) w.reject(lost);
    if (this.status === 'closed') return;
    if (code !== undefined && code !== 1000 && code !== 1001 && code !== 1005 && code !== 1006) {
      this._error(new DdpError(why, { reason: 'CONNECTION_LOST', data: { code } }));
    }
    this._setStatus('offline');
    if (immediate) this._open();
    else this._retry();
  }

  _retry() {
    if (this.status === 'closed') return;
    this._setStatus('offline');
    const step = this._nextDelay;
    this._nextDelay = Math.min(step * 2, this.maxMs);
    const delay = step * (0.5 + Math.random() * 0.5);
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      this._open();
    }, delay);
  }

  _onSynced() {
    this._synced = true;
    this._nextDelay = this.minMs;
    this._setStatus('live');
    for (const w of this._waiters.splice(0)) w.res();
  }

  _onMessage(message) {
    const changes = this.mirror.apply(message);
    const revMoved = this.mirror.rev !== this._savedRev;
    switch (message.action) {
      case 'reload':
        this.lastStart = 'reload';
        this._settleSatisfied(Number(message.rev));
        this._persist(changes.length > 0 || revMoved);
        emit(this, 'reload', { rev: this.mirror.rev, items: message.items || [], changes });
        this._onSynced();
        break;
      case 'resume':
        this.lastStart = 'resume';
        this._onSynced();
        break;
      case 'set':
      case 'delete':
        this._persist(changes.length > 0 || revMoved);
        for (const c of changes) emit(this, 'change', publicChange(c));
        this._settleChange(message);
        break;
      case 'batch':
        this._persist(changes.length > 0 || revMoved);
        for (const c of changes) emit(this, 'change', publicChange(c));
        emit(this, 'batch', { rev: Number(message.rev), changes: changes.map(publicChange) });
        this._settleBatch(message);
        break;
      case 'command': {
        const c = message.command || {};
        emit(this, 'command', { action: c.action, parameters: c.parameters === undefined ? {} : c.parameters });
        break;
      }
      case 'error':
        this._onErrorFrame(message);
        break;
      default:
        break;
    }
    this._scheduleAck();
  }

  _settle(index, rev) {
    const [w] = this._inFlight.splice(index, 1);
    w.resolve(rev);
  }

  _settleChange(message) {
    const rev = Number(message.rev);
    const i = this._inFlight.findIndex((w) => matchesChange(w, message));
    if (i >= 0) this._settle(i, rev);
  }

  _settleBatch(message) {
    const changes = message.changes || [];
    const i = this._inFlight.findIndex(
      (w) =>
        w.kind === 'batch' &&
        w.ops.length === changes.length &&
        w.ops.every((op, j) => opMatches(op, changes[j])),
    );
    if (i >= 0) this._settle(i, Number(message.rev));
  }

  _settleSatisfied(rev) {
    // A reload (after falling behind) may stand in for confirmations.
    for (let i = this._inFlight.length - 1; i >= 0; i--) {
      const w = this._inFlight[i];
      const ok =
        (w.kind === 'set' && same(this.mirror.get(w.key), w.value)) ||
        (w.kind === 'delete' && this.mirror.get(w.key) === undefined);
      if (ok) this._settle(i, rev);
    }
  }

  _onErrorFrame(message) {
    const error = new DdpError(message.message || message.reason, {
      reason: message.reason,
      data: { key: message.key, index: message.index },
    });
    let i = -1;
    if (message.index !== undefined && message.index !== null) {
      i = this._inFlight.findIndex(
        (w) => w.kind === 'batch' && (message.key === undefined || (w.ops[message.index] || {}).key === message.key),
      );
    } else if (message.key !== undefined && message.key !== null) {
      i = this._inFlight.findIndex((w) => w.kind !== 'batch' && w.key === message.key);
      if (i < 0) i = this._inFlight.findIndex((w) => w.kind === 'batch' && w.ops.some((op) => op.key === message.key));
    }
    if (i >= 0) {
      const [w] = this._inFlight.splice(i, 1);
      w.reject(error);
    } else {
      this._error(error);
    }
  }

  _persist(dirty) {
    if (!this.storage || !dirty) return;
    const snapshot = this.mirror.toJSON();
    this._saveChain = this._saveChain
      .then(() => this.storage.save(snapshot))
      .then(
        () => {
          this._savedRev = Math.max(this._savedRev, snapshot.rev);
          this._scheduleAck();
        },
        (e) => this._error(new DdpError(`cannot persist the mirror: ${e && e.message}`, { reason: 'STORAGE_ERROR', cause: e })),
      );
  }

  _ackable() {
    return this.storage ? Math.min(this._savedRev, this.mirror.rev) : this.mirror.rev;
  }

  _scheduleAck() {
    if (!this.acknowledge || !this._synced || this._ackTimer) return;
    if (this._ackable() <= this._acked) return;
    const wait = Math.max(0, this._lastAck + this.ackIntervalMs - Date.now());
    this._ackTimer = setTimeout(() => {
      this._ackTimer = null;
      this._sendAck();
    }, wait);
  }

  _sendAck() {
    const s = this._socket;
    if (!s || s.readyState !== 1 || !this._synced) return;
    const rev = this._ackable();
    if (rev <= this._acked) return;
    try {
      s.send(JSON.stringify({ action: 'ack', rev }));
    } catch {
      return; // the session is going; the next one acks
    }
    this._acked = rev;
    this._lastAck = Date.now();
    emit(this, 'ack', { rev });
    this._scheduleAck();
  }
}

function publicChange(c) {
  return { key: c.key, value: c.value, rev: c.rev, deleted: c.deleted };
}

function matchesChange(w, message) {
  if (w.kind === 'set') return message.action === 'set' && message.key === w.key && same(message.value, w.value);
  if (w.kind === 'delete') return message.action === 'delete' && message.key === w.key;
  if (w.kind === 'batch' && w.ops.length === 1) return opMatches(w.ops[0], message);
  return false;
}

function opMatches(op, change) {
  if (!change || change.key !== op.key) return false;
  if (op.op === 'delete') return change.action === 'delete';
  if (op.op === 'set') return change.action === 'set' && same(change.value, op.value);
  return change.action === 'set'; // merge: the result is the server's
}

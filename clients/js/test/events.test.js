// The app event stream (§6) against the real server.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Client, EventStream } from '../src/ddp.js';
import { startServer, waitFor } from './server.js';

let server;
let admin;
const streams = [];

before(async () => {
  server = await startServer();
  admin = new Client({ url: server.url, token: server.adminKey });
});

after(async () => {
  for (const s of streams) s.close();
  await server?.stop();
});

test('the event stream receives _deviceKVSaved_ / _deviceKVDeleted_ / _keyValueSaved_ and device events', async () => {
  const home = await admin.createHome({ name: 'events' });
  const other = await admin.createHome({ name: 'elsewhere' });
  const device = await admin.createDevice({ name: 'ev', homeId: home.id });
  const stranger = await admin.createDevice({ name: 'ev2', homeId: other.id });
  const events = [];
  let opened = 0;
  const stream = admin.events({ home: home.id, onEvent: (e) => events.push(e), onOpen: () => opened++ });
  streams.push(stream);
  assert.ok(stream instanceof EventStream);
  await stream.ready;
  assert.equal(opened, 1);
  await admin.setKey({ device: stranger.id }, 'ignored', 1); // another home: not on this stream
  const w = await admin.setKey({ device: device.id }, 'temp', { c: 21.5 });
  await admin.deleteKey({ device: device.id }, 'temp');
  await admin.setKey({ home: home.id }, 'hk', 'v');
  const own = new Client({ url: server.url, token: device.apiKey });
  await own.raiseEvent(device.id, 'doorOpened', { door: 'front' });
  await waitFor(() => events.length >= 4, { what: 'four events' });
  const [saved, deleted, homeSaved, raised] = events;
  assert.equal(saved.eventType, '_deviceKVSaved_');
  assert.equal(saved.homeId, home.id);
  assert.equal(saved.originDeviceId, undefined, 'the admin caused it, not the device');
  assert.deepEqual(saved.eventData, { deviceId: device.id, key: 'temp', value: { c: 21.5 }, rev: w.rev });
  assert.match(saved.timestamp, /^\d{4}-/);
  assert.equal(deleted.eventType, '_deviceKVDeleted_');
  assert.deepEqual(deleted.eventData, { deviceId: device.id, key: 'temp', rev: w.rev + 1 });
  assert.equal(homeSaved.eventType, '_keyValueSaved_');
  assert.deepEqual(homeSaved.eventData, { key: 'hk', value: 'v', rev: 1 });
  assert.equal(raised.eventType, 'doorOpened');
  assert.deepEqual(raised.eventData, { door: 'front' });
  assert.equal(raised.originDeviceId, device.id);
  await assert.rejects(own.raiseEvent(device.id, '_reserved_', {}), (e) => e.status === 400 && e.reason === 'INVALID_PARAMETER');
  assert.equal(events.length, 4);
});

test('EventStream is an EventTarget too; close() ends it; a bad token never opens', async () => {
  const home = await admin.createHome({ name: 'et' });
  const device = await admin.createDevice({ name: 'et', homeId: home.id });
  const key = await admin.createApiKey({ name: 'app', permission: 'read', homes: [home.id] });
  const app = new Client({ url: server.url, token: key.key });
  const stream = app.events();
  streams.push(stream);
  const seen = [];
  stream.addEventListener('event', (e) => seen.push(e.detail));
  await stream.ready;
  await admin.setKey({ device: device.id }, 'k', 1);
  await waitFor(() => seen.length === 1, { what: 'one event' });
  assert.equal(seen[0].eventType, '_deviceKVSaved_');
  const closed = new Promise((r) => stream.addEventListener('close', (e) => r(e.detail)));
  stream.close();
  const info = await closed;
  assert.equal(typeof info.code, 'number');
  assert.equal(stream.closed, true);

  const errors = [];
  const bad = new Client({ url: server.url, token: 'ddpp_not-a-key' }).events({ onError: (e) => errors.push(e) });
  streams.push(bad);
  await assert.rejects(bad.ready, (e) => e.reason === 'NETWORK_ERROR');
  assert.equal(errors.length, 1);
  assert.equal(errors[0].reason, 'NETWORK_ERROR');
});

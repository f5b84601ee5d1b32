// DeviceMirror against the real server: reload, live changes, batches, writes over the socket,
// error frames, acks, resume after reconnect and after a server restart, commands.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { Client, DeviceMirror, DdpError } from '../src/ddp.js';
import { startServer, waitFor, nextEvent } from './server.js';

let server;
let admin;
const mirrors = [];

before(async () => {
  server = await startServer();
  admin = new Client({ url: server.url, token: server.adminKey });
});

after(async () => {
  for (const m of mirrors) m.close();
  await server?.stop();
});

function track(m) {
  mirrors.push(m);
  return m;
}

async function newDevice(name, extra = {}) {
  const d = await admin.createDevice({ name, ...extra });
  return { ...d, scope: { device: d.id }, client: new Client({ url: server.url, token: d.apiKey }) };
}

/** The mirror's content equals the store's, as REST lists it. */
async function assertEqualsRest(mirror, scope) {
  const list = await admin.listKeys(scope);
  await waitFor(() => mirror.rev >= list.rev, { what: `the mirror to reach rev ${list.rev} (at ${mirror.rev})` });
  assert.deepEqual(mirror.entries(), list.items.map((i) => [i.key, i.value]));
  assert.equal(mirror.rev, list.rev);
}

test('connect: a reload holding the store; status goes live', async () => {
  const d = await newDevice('reload');
  await admin.setKey(d.scope, 'a', 1);
  await admin.setKey(d.scope, 'b', { nested: [1, 2, { x: 'y' }] });
  const m = track(d.client.mirror(d.id));
  const statuses = [];
  m.addEventListener('status', (e) => statuses.push(e.detail.status));
  const reloaded = nextEvent(m, 'reload');
  await m.connect();
  const r = await reloaded;
  assert.equal(r.rev, 2);
  assert.deepEqual(r.items.map((i) => i.key), ['a', 'b']);
  assert.equal(m.status, 'live');
  assert.deepEqual(statuses, ['connecting', 'live']);
  assert.equal(m.lastStart, 'reload');
  assert.equal(m.size, 2);
  assert.deepEqual(m.get('b'), { nested: [1, 2, { x: 'y' }] });
  await assertEqualsRest(m, d.scope);
  m.close();
  assert.equal(m.status, 'closed');
});

test('live set/delete from REST arrive in rev order; a REST batch arrives as one batch', async () => {
  const d = await newDevice('live');
  const m = track(new DeviceMirror({ url: server.url, deviceId: d.id, token: server.adminKey }));
  await m.connect();
  const changes = [];
  const batches = [];
  m.addEventListener('change', (e) => changes.push(e.detail));
  m.addEventListener('batch', (e) => batches.push(e.detail));
  await admin.setKey(d.scope, 'a', 1);
  await admin.setKey(d.scope, 'b', 2);
  await admin.deleteKey(d.scope, 'a');
  await admin.batch(d.scope, [{ op: 'set', key: 'c', value: 3 }, { op: 'delete', key: 'b' }, { op: 'merge', key: 'c2', value: { m: 1 } }]);
  await waitFor(() => m.rev === 6, { what: 'rev 6' });
  assert.deepEqual(changes, [
    { key: 'a', value: 1, rev: 1, deleted: false },
    { key: 'b', value: 2, rev: 2, deleted: false },
    { key: 'a', value: undefined, rev: 3, deleted: true },
    { key: 'c', value: 3, rev: 4, deleted: false },
    { key: 'b', value: undefined, rev: 5, deleted: true },
    { key: 'c2', value: { m: 1 }, rev: 6, deleted: false },
  ]);
  assert.equal(batches.length, 1);
  assert.equal(batches[0].rev, 6);
  assert.equal(batches[0].changes.length, 3);
  assert.deepEqual(m.mirror.entry('a'), { value: undefined, rev: 3 }, 'a delete leaves a tombstone');
  await assertEqualsRest(m, d.scope);

  // Without batches, one message per change.
  const single = track(new DeviceMirror({ url: server.url, deviceId: d.id, token: server.adminKey, batches: false }));
  await single.connect();
  const singles = [];
  single.addEventListener('batch', () => assert.fail('no batch messages without batches'));
  single.addEventListener('change', (e) => singles.push(e.detail.rev));
  await admin.batch(d.scope, [{ op: 'set', key: 'x', value: 1 }, { op: 'set', key: 'y', value: 2 }]);
  await waitFor(() => single.rev === 8, { what: 'rev 8' });
  assert.deepEqual(singles, [7, 8]);
  await assertEqualsRest(single, d.scope);
});

test('writes from the mirror resolve with the authoritative rev and show over REST', async () => {
  const d = await newDevice('writes');
  const m = track(d.client.mirror(d.id));
  await m.connect();
  const r1 = await m.set('k', { v: 1 });
  assert.equal(r1, 1);
  assert.deepEqual(m.get('k'), { v: 1 });
  assert.deepEqual((await admin.getKey(d.scope, 'k')).value, { v: 1 });
  const [r2, r3] = await Promise.all([m.set('a', 'x'), m.set('b', true)]);
  assert.deepEqual([r2, r3].sort(), [2, 3]);
  const r4 = await m.delete('a');
  assert.equal(r4, 4);
  await assert.rejects(admin.getKey(d.scope, 'a'), (e) => e.reason === 'KEY_NOT_FOUND');
  const r5 = await m.batch([{ op: 'set', key: 'p', value: 1 }, { op: 'merge', key: 'k', value: { w: 2 } }, { op: 'delete', key: 'b' }]);
  assert.equal(r5, 7);
  assert.deepEqual(m.get('k'), { v: 1, w: 2 });
  const one = await m.batch([{ op: 'set', key: 'q', value: 5 }]);
  assert.equal(one, 8, 'a batch of one op is confirmed by an ordinary message');
  await assertEqualsRest(m, d.scope);
});

test('error frames reject the write with a DdpError; the session stays open', async () => {
  const d = await newDevice('errors');
  const m = track(d.client.mirror(d.id));
  await m.connect();
  await assert.rejects(m.set('bad key', 1), (e) => e instanceof DdpError && e.reason === 'INVALID_KEY' && e.status === undefined);
  await assert.rejects(m.delete('missing'), (e) => e instanceof DdpError && e.reason === 'KEY_NOT_FOUND');
  await m.set('a', 1);
  const e = await m.batch([{ op: 'set', key: 'b', value: 1 }, { op: 'delete', key: 'nope' }]).catch((x) => x);
  assert.ok(e instanceof DdpError);
  assert.equal(e.reason, 'KEY_NOT_FOUND');
  assert.equal(e.data.index, 1);
  await assert.rejects(m.set('k', null), (x) => x.reason === 'INVALID_VALUE');
  assert.equal(await m.set('c', 2), 2, 'still live after the errors');
  assert.equal(m.status, 'live');
  await assertEqualsRest(m, d.scope);

  // A read-only watcher's write is refused.
  const key = await admin.createApiKey({ name: 'ro', permission: 'read' });
  const watcher = track(new Client({ url: server.url, token: key.key }).mirror(d.id));
  await watcher.connect();
  await assert.rejects(watcher.set('x', 1), (x) => x.reason === 'PERMISSION_DENIED');
  assert.deepEqual(watcher.entries(), m.entries());
});

test('acks: the applied rev shows in GET /devices/{id}/sync and wait=applied answers applied:true', async () => {
  const d = await newDevice('acks');
  await admin.setKey(d.scope, 'a', 1);
  const m = track(d.client.mirror(d.id, { acknowledge: true }));
  const acks = [];
  m.addEventListener('ack', (e) => acks.push(e.detail.rev));
  await m.connect();
  await waitFor(async () => (await admin.deviceSync(d.id)).appliedRev === 1, { what: 'appliedRev 1' });
  const w = await admin.setKey(d.scope, 'b', 2, { wait: 'applied', waitTimeout: 10 });
  assert.deepEqual(w, { rev: 2, applied: true, appliedRev: 2 });
  const sync = await admin.deviceSync(d.id);
  assert.equal(sync.appliedRev, 2);
  assert.equal(sync.deliveredRev, 2);
  assert.equal(sync.isConnected, true);
  assert.ok(sync.appliedTime);
  assert.deepEqual(acks, [1, 2]);
  // Writes made by the mirror itself are acknowledged too.
  await m.set('c', 3);
  await waitFor(async () => (await admin.deviceSync(d.id)).appliedRev === 3, { what: 'appliedRev 3' });

  // Without acknowledge: delivered, not applied.
  const quiet = await newDevice('no-acks');
  const q = track(quiet.client.mirror(quiet.id));
  await q.connect();
  const w2 = await admin.setKey(quiet.scope, 'k', 1, { wait: 'delivered', waitTimeout: 10 });
  assert.equal(w2.delivered, true);
  assert.equal((await admin.deviceSync(quiet.id)).appliedRev, 0);
});

test('a job\'s progress counts the device\'s acks, then ends done', async () => {
  const home = await admin.createHome({ name: 'rollout' });
  const d = await newDevice('rollout', { homeId: home.id });
  const m = track(d.client.mirror(d.id, { acknowledge: true }));
  await m.connect();
  const job = await admin.createJob({ select: { homeId: home.id }, ops: [{ op: 'set', key: 'fw', value: '2.1' }] });
  await waitFor(() => m.get('fw') === '2.1', { what: 'the job write to reach the mirror' });
  const done = await waitFor(async () => {
    const j = await admin.getJob(job.id);
    return j.state === 'done' && j.applied === 1 && j;
  }, { what: 'the job to be done and applied' });
  assert.equal(done.written, 1);
  assert.equal(done.delivered, 1);
});

test('resume after the socket drops: changes made meanwhile arrive, content equals REST', async () => {
  const d = await newDevice('resume');
  await admin.setKey(d.scope, 'a', 1);
  const m = track(d.client.mirror(d.id, { reconnect: { minMs: 20, maxMs: 200 } }));
  await m.connect();
  assert.equal(m.lastStart, 'reload');
  const changes = [];
  m.addEventListener('change', (e) => changes.push(e.detail.rev));
  // Drop the socket and reconnect at once; write while the new session opens.
  m.reconnect();
  await admin.setKey(d.scope, 'b', 2);
  await admin.deleteKey(d.scope, 'a');
  await waitFor(() => m.status === 'live' && m.rev === 3, { what: 'live at rev 3' });
  assert.equal(m.sessions, 2);
  assert.equal(m.lastStart, 'resume', 'the server still holds the history after rev 1');
  assert.deepEqual(changes, [2, 3]);
  assert.deepEqual(m.mirror.entry('a'), { value: undefined, rev: 3 });
  await assertEqualsRest(m, d.scope);
});

test('storage: a new mirror resumes from the saved snapshot (?sinceRev) and acks only what was saved', async () => {
  const d = await newDevice('storage');
  let saved = null;
  let saves = 0;
  const storage = { load: () => saved, save: (s) => { saved = JSON.parse(JSON.stringify(s)); saves++; } };
  const first = track(d.client.mirror(d.id, { storage, acknowledge: true }));
  await first.connect();
  await first.set('a', 1);
  await first.set('b', 2);
  await waitFor(() => saved && saved.rev === 2, { what: 'the snapshot at rev 2' });
  first.close();
  await admin.setKey(d.scope, 'c', 3);
  await admin.deleteKey(d.scope, 'a');
  const second = track(d.client.mirror(d.id, { storage, acknowledge: true }));
  assert.equal(second.rev, 2, 'loaded from storage');
  assert.deepEqual(second.entries(), [['a', 1], ['b', 2]]);
  await second.connect();
  assert.equal(second.lastStart, 'resume');
  await assertEqualsRest(second, d.scope);
  await waitFor(() => saved.rev === 4, { what: 'the snapshot at rev 4' });
  assert.deepEqual(saved.entries.a, { value: null, rev: 4 });
  await waitFor(async () => (await admin.deviceSync(d.id)).appliedRev === 4, { what: 'appliedRev 4' });
  assert.ok(saves >= 3);
});

test('a server restart: the mirror reconnects (resume or reload) and ends equal to REST', async () => {
  const d = await newDevice('restart');
  await admin.setKey(d.scope, 'a', 1);
  const m = track(d.client.mirror(d.id, { reconnect: { minMs: 50, maxMs: 500 } }));
  await m.connect();
  const offline = nextEvent(m, 'status', (s) => s.status === 'offline', 20000);
  await server.restart();
  await offline;
  // Written after the restart, whether or not the mirror is back yet.
  await admin.setKey(d.scope, 'b', 2);
  await admin.batch(d.scope, [{ op: 'delete', key: 'a' }, { op: 'set', key: 'c', value: 3 }]);
  await waitFor(() => m.status === 'live' && m.rev === 4, { timeoutMs: 20000, what: 'live at rev 4 after the restart' });
  assert.ok(m.sessions >= 2);
  assert.ok(['resume', 'reload'].includes(m.lastStart));
  await assertEqualsRest(m, d.scope);
  // Writes still work on the new session.
  assert.equal(await m.set('d', 4), 5);
  await assertEqualsRest(m, d.scope);
});

test('writes made while offline wait for the next session; close() rejects pending ones', async () => {
  const d = await newDevice('offline-writes');
  const m = track(d.client.mirror(d.id));
  const early = m.set('early', 1); // before connect: queued
  await m.connect();
  assert.equal(await early, 1);
  const m2 = track(d.client.mirror(d.id));
  const pending = m2.set('never', 1);
  m2.close();
  await assert.rejects(pending, (e) => e.reason === 'CLOSED');
  await assert.rejects(m2.connect(), (e) => e.reason === 'CLOSED');
  await assert.rejects(admin.getKey(d.scope, 'never'), (e) => e.reason === 'KEY_NOT_FOUND');
});

test('commands: a mirror with commands:true receives sendCommand; none online is 409', async () => {
  const d = await newDevice('commands');
  await assert.rejects(admin.sendCommand(d.id, 'reboot'), (e) => e.status === 409 && e.reason === 'DEVICE_OFFLINE');
  const m = track(d.client.mirror(d.id, { commands: true }));
  await m.connect();
  const got = [];
  m.addEventListener('command', (e) => got.push(e.detail));
  await admin.sendCommand(d.id, 'reboot', { delay: 5, why: 'update' });
  await admin.sendCommand(d.id, 'blink');
  await waitFor(() => got.length === 2, { what: 'two commands' });
  assert.deepEqual(got, [
    { action: 'reboot', parameters: { delay: 5, why: 'update' } },
    { action: 'blink', parameters: {} },
  ]);
  await assert.rejects(admin.sendCommand(d.id, ''), (e) => e.status === 400 && e.reason === 'INVALID_PARAMETER');
});

test('a refused session (bad token) is reported and retried with backoff, until close()', async () => {
  const d = await newDevice('refused');
  const m = track(new DeviceMirror({ url: server.url, deviceId: d.id, token: 'ddpd_wrong', reconnect: { minMs: 20, maxMs: 40 } }));
  const errors = [];
  let attempts = 0;
  m.addEventListener('error', (e) => errors.push(e.detail.error));
  m.addEventListener('status', (e) => { if (e.detail.status === 'connecting') attempts++; });
  const connecting = m.connect();
  await waitFor(() => attempts >= 3 && errors.length >= 2, { what: 'three attempts' });
  assert.ok(errors.every((e) => e instanceof DdpError && e.reason === 'NETWORK_ERROR'));
  assert.notEqual(m.status, 'live');
  m.close();
  await assert.rejects(connecting, (e) => e.reason === 'CLOSED');
});

test('asynchronous storage: load and save may return promises; acks wait for the save', async () => {
  const d = await newDevice('async-storage');
  await admin.setKey(d.scope, 'a', 1);
  let saved = null;
  const storage = {
    load: async () => saved,
    save: (snapshot) => new Promise((r) => setImmediate(() => { saved = JSON.parse(JSON.stringify(snapshot)); r(); })),
  };
  const first = track(d.client.mirror(d.id, { storage, acknowledge: true }));
  await first.connect();
  await waitFor(async () => (await admin.deviceSync(d.id)).appliedRev === 1, { what: 'appliedRev 1' });
  assert.equal(saved.rev, 1, 'acked only once saved');
  first.close();
  await admin.setKey(d.scope, 'b', 2);
  const second = track(d.client.mirror(d.id, { storage }));
  await second.connect();
  assert.equal(second.lastStart, 'resume');
  await assertEqualsRest(second, d.scope);
});

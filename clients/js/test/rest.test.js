// REST against the real server: stores, conditional writes, batches, merge, wait, admin API,
// fleet queries and jobs.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { Client, DdpError, RawJson } from '../src/ddp.js';
import { startServer, waitFor } from './server.js';

let server;
let admin;

before(async () => {
  server = await startServer();
  admin = new Client({ url: server.url, token: server.adminKey });
});

after(async () => {
  await server?.stop();
});

async function rejects(promise, check) {
  try {
    await promise;
  } catch (e) {
    assert.ok(e instanceof DdpError, `a DdpError, got ${e}`);
    for (const [k, v] of Object.entries(check)) assert.deepEqual(e[k], v, `${k}: ${e.message}`);
    return e;
  }
  assert.fail('expected a DdpError');
}

test('key round trip in a device store and a home store', async () => {
  const home = await admin.createHome({ name: 'round trip' });
  const device = await admin.createDevice({ name: 'rt', homeId: home.id });
  assert.equal(typeof device.apiKey, 'string');
  for (const scope of [{ device: device.id }, { home: home.id }]) {
    const empty = await admin.listKeys(scope);
    assert.deepEqual(empty, { rev: 0, items: [] });
    const w1 = await admin.setKey(scope, 'cfg:mode.v-1_x', { mode: 'eco', level: 3, list: [1, 'two', true] });
    assert.equal(w1.rev, 1);
    const w2 = await admin.setKey(scope, 'b', 'hello');
    assert.equal(w2.rev, 2);
    const got = await admin.getKey(scope, 'cfg:mode.v-1_x');
    assert.deepEqual(got.value, { mode: 'eco', level: 3, list: [1, 'two', true] });
    assert.equal(got.key, 'cfg:mode.v-1_x');
    assert.equal(got.rev, 1);
    assert.match(got.modificationTime, /^\d{4}-\d\d-\d\dT/);
    const list = await admin.listKeys(scope);
    assert.equal(list.rev, 2);
    assert.deepEqual(list.items.map((i) => [i.key, i.value]), [['b', 'hello'], ['cfg:mode.v-1_x', { mode: 'eco', level: 3, list: [1, 'two', true] }]]);
    const prefixed = await admin.listKeys(scope, { keyPrefix: 'cfg' });
    assert.deepEqual(prefixed.items.map((i) => i.key), ['cfg:mode.v-1_x']);
    const merged = await admin.mergeKey(scope, 'cfg:mode.v-1_x', { mode: null, extra: { a: 1 } });
    assert.equal(merged.rev, 3);
    assert.deepEqual((await admin.getKey(scope, 'cfg:mode.v-1_x')).value, { level: 3, list: [1, 'two', true], extra: { a: 1 } });
    const del = await admin.deleteKey(scope, 'b');
    assert.equal(del.rev, 4);
    await rejects(admin.getKey(scope, 'b'), { status: 404, reason: 'KEY_NOT_FOUND' });
    await rejects(admin.deleteKey(scope, 'b'), { status: 404, reason: 'KEY_NOT_FOUND' });
    assert.equal((await admin.listKeys(scope)).rev, 4, 'a failed delete uses no rev');
  }
});

test('bad keys and values are the server\'s 400s; an odd key is encoded, not split', async () => {
  const device = await admin.createDevice({ name: 'bad' });
  const scope = { device: device.id };
  await rejects(admin.setKey(scope, 'a/b', 1), { status: 400, reason: 'INVALID_KEY' });
  await rejects(admin.setKey(scope, 'sp ace', 1), { status: 400, reason: 'INVALID_KEY' });
  await rejects(admin.setKey(scope, 'k', null), { status: 400, reason: 'INVALID_VALUE' });
  assert.equal((await admin.listKeys(scope)).rev, 0);
});

test('conditional writes: If-Match conflict is a 412 with the current rev; ifNoneMatch creates only', async () => {
  const device = await admin.createDevice({ name: 'cond' });
  const scope = { device: device.id };
  const created = await admin.setKey(scope, 'k', 1, { ifNoneMatch: true });
  assert.equal(created.rev, 1);
  const e = await rejects(admin.setKey(scope, 'k', 2, { ifNoneMatch: true }), { status: 412, reason: 'REVISION_MISMATCH' });
  assert.equal(e.data.rev, 1);
  const updated = await admin.setKey(scope, 'k', 2, { ifMatch: 1 });
  assert.equal(updated.rev, 2);
  const stale = await rejects(admin.setKey(scope, 'k', 3, { ifMatch: 1 }), { status: 412, reason: 'REVISION_MISMATCH' });
  assert.equal(stale.data.rev, 2);
  assert.ok(stale.message.length > 0);
  await rejects(admin.deleteKey(scope, 'k', { ifMatch: 1 }), { status: 412, reason: 'REVISION_MISMATCH' });
  assert.equal((await admin.getKey(scope, 'k')).value, 2, 'nothing changed');
  await rejects(admin.mergeKey(scope, 'k', { a: 1 }, { ifMatch: 1 }), { status: 412, reason: 'REVISION_MISMATCH' });
  const deleted = await admin.deleteKey(scope, 'k', { ifMatch: 2 });
  assert.equal(deleted.rev, 3);
  const absent = await rejects(admin.setKey(scope, 'k', 9, { ifMatch: '*' }), { status: 412, reason: 'REVISION_MISMATCH' });
  assert.equal(absent.data.rev, null);
});

test('batch: all ops or none', async () => {
  const device = await admin.createDevice({ name: 'batch' });
  const scope = { device: device.id };
  const ok = await admin.batch(scope, [
    { op: 'set', key: 'a', value: 1 },
    { op: 'set', key: 'b', value: { x: 1 } },
    { op: 'merge', key: 'b', value: { y: 2 } },
  ]);
  assert.equal(ok.rev, 3);
  assert.deepEqual(ok.results, [{ key: 'a', rev: 1 }, { key: 'b', rev: 2 }, { key: 'b', rev: 3 }]);
  const e = await rejects(
    admin.batch(scope, [
      { op: 'set', key: 'c', value: 1 },
      { op: 'delete', key: 'missing' },
    ]),
    { status: 404, reason: 'KEY_NOT_FOUND' },
  );
  assert.equal(e.data.index, 1);
  assert.match(e.message, /^op 1:/);
  const e2 = await rejects(admin.batch(scope, [{ op: 'set', key: 'c', value: 1 }, { op: 'set', key: 'a', value: 2, ifRev: 7 }]), {
    status: 412,
    reason: 'REVISION_MISMATCH',
  });
  assert.equal(e2.data.index, 1);
  const list = await admin.listKeys(scope);
  assert.equal(list.rev, 3, 'no rev used by failed batches');
  assert.deepEqual(list.items.map((i) => [i.key, i.value]), [['a', 1], ['b', { x: 1, y: 2 }]]);
  // ifRev: the store's rev.
  await rejects(admin.batch(scope, [{ op: 'delete', key: 'a' }], { ifRev: 2 }), { status: 412, reason: 'REVISION_MISMATCH' });
  const done = await admin.batch(scope, [{ op: 'delete', key: 'a' }], { ifRev: 3 });
  assert.equal(done.rev, 4);
});

test('wait=applied answers applied:false after the timeout when no device acks; bad wait is a 400', async () => {
  const home = await admin.createHome({ name: 'wait' });
  const device = await admin.createDevice({ name: 'wait' });
  const scope = { device: device.id };
  const w = await admin.setKey(scope, 'k', 1, { wait: 'applied', waitTimeout: 0.2 });
  assert.deepEqual(w, { rev: 1, applied: false, appliedRev: 0 });
  const d = await admin.deleteKey(scope, 'k', { wait: 'delivered', waitTimeout: 0 });
  assert.equal(d.rev, 2);
  assert.equal(d.delivered, false);
  const b = await admin.batch(scope, [{ op: 'set', key: 'k', value: 2 }], { wait: 'applied', waitTimeout: 0 });
  assert.equal(b.rev, 3);
  assert.equal(b.applied, false);
  await rejects(admin.setKey({ home: home.id }, 'k', 1, { wait: 'applied' }), { status: 400, reason: 'INVALID_PARAMETER' });
  await rejects(admin.setKey(scope, 'k', 1, { wait: 'sometime' }), { status: 400, reason: 'INVALID_PARAMETER' });
  assert.equal((await admin.listKeys(scope)).rev, 3, 'refused waits write nothing');
});

test('homes, devices, api keys: the admin API', async () => {
  const home = await admin.createHome({ name: 'admin api' });
  assert.deepEqual(await admin.getHome(home.id), home);
  assert.ok((await admin.listHomes()).some((h) => h.id === home.id));
  const device = await admin.createDevice({ name: 'dev', homeId: home.id, deviceClass: 'lamp', tag: 't1' });
  const got = await admin.getDevice(device.id);
  assert.equal(got.apiKey, undefined, 'the key is shown once');
  assert.equal(got.homeId, home.id);
  const renamed = await admin.updateDevice(device.id, { name: 'dev2', homeId: null });
  assert.equal(renamed.name, 'dev2');
  assert.equal(renamed.homeId, null);
  await rejects(admin.createDevice({ name: 'x', homeID: 1 }), { status: 400, reason: 'INVALID_PARAMETER' });

  // The device's own key: its store only.
  const own = new Client({ url: server.url, token: device.apiKey });
  await own.setKey({ device: device.id }, 'mine', 1);
  await rejects(own.listHomes(), { status: 403, reason: 'PERMISSION_DENIED' });
  const { apiKey } = await admin.rotateDeviceKey(device.id);
  await rejects(own.getKey({ device: device.id }, 'mine'), { status: 401, reason: 'UNAUTHENTICATED_CLIENT' });
  const rotated = new Client({ url: server.url, token: apiKey });
  assert.equal((await rotated.getKey({ device: device.id }, 'mine')).value, 1);
  assert.deepEqual(Object.keys(await rotated.deviceSync(device.id)).sort(), ['appliedRev', 'appliedTime', 'deliveredRev', 'isConnected', 'rev']);

  // Project keys.
  const key = await admin.createApiKey({ name: 'reader', permission: 'read' });
  const reader = new Client({ url: server.url, token: key.key });
  assert.equal((await reader.getKey({ device: device.id }, 'mine')).value, 1);
  await rejects(reader.setKey({ device: device.id }, 'mine', 2), { status: 403, reason: 'PERMISSION_DENIED' });
  assert.ok((await admin.listApiKeys()).some((k) => k.id === key.id && k.key === undefined));
  await admin.deleteApiKey(key.id);
  await rejects(reader.getKey({ device: device.id }, 'mine'), { status: 401, reason: 'UNAUTHENTICATED_CLIENT' });

  await admin.deleteDevice(device.id);
  await rejects(admin.getDevice(device.id), { status: 404, reason: 'DEVICE_NOT_FOUND' });
  await admin.deleteHome(home.id);
  await rejects(admin.getHome(home.id), { status: 404, reason: 'HOME_NOT_FOUND' });
});

test('listDevices: where filters, limit and after pagination via the Link header', async () => {
  const home = await admin.createHome({ name: 'fleet' });
  const ids = [];
  for (let i = 0; i < 5; i++) {
    const d = await admin.createDevice({ name: `f${i}`, homeId: home.id, deviceClass: i % 2 ? 'odd' : 'even' });
    ids.push(d.id);
    await admin.setKey({ device: d.id }, 'fw', i);
    if (i >= 3) await admin.setKey({ device: d.id }, 'serial', `s${i}`);
  }
  // Pages of 2 over the home: 2 + 2 + 1.
  const seen = [];
  let after;
  let pages = 0;
  do {
    const page = await admin.listDevices({ home: home.id, limit: 2, after });
    seen.push(...page.devices.map((d) => d.id));
    after = page.next;
    pages++;
    if (after !== null) assert.equal(String(page.devices.at(-1).id), after);
  } while (after !== null && pages < 10);
  assert.equal(pages, 3);
  assert.deepEqual(seen, ids);
  const ge2 = await admin.listDevices({ home: home.id, where: 'fw>=2' });
  assert.deepEqual(ge2.devices.map((d) => d.id), ids.slice(2));
  assert.equal(ge2.next, null);
  const both = await admin.listDevices({ home: home.id, where: ['fw>=2', 'serial'] });
  assert.deepEqual(both.devices.map((d) => d.id), ids.slice(3));
  const str = await admin.listDevices({ home: home.id, where: 'serial="s4"', class: 'even' });
  assert.deepEqual(str.devices.map((d) => d.id), [ids[4]]);
  const none = await admin.listDevices({ home: home.id, where: '!serial', connected: false, behind: true });
  assert.deepEqual(none.devices.map((d) => d.id), ids.slice(0, 3));
  const e = await rejects(admin.listDevices({ where: 'fw=eco' }), { status: 400, reason: 'INVALID_PARAMETER' });
  assert.match(e.message, /fw=eco/);
  await rejects(admin.listDevices({ limit: 0 }), { status: 400, reason: 'INVALID_PARAMETER' });
});

test('jobs: create, progress to done, list, cancel', async () => {
  const home = await admin.createHome({ name: 'jobs' });
  const ids = [];
  for (let i = 0; i < 3; i++) {
    const d = await admin.createDevice({ name: `j${i}`, homeId: home.id });
    ids.push(d.id);
    await admin.setKey({ device: d.id }, 'fw', i === 2 ? 9 : 1);
  }
  const job = await admin.createJob({
    select: { homeId: home.id, where: ['fw<2'] },
    ops: [{ op: 'set', key: 'fw', value: 2 }],
  });
  assert.equal(job.selected, 2);
  assert.ok(['running', 'done'].includes(job.state));
  const done = await waitFor(async () => {
    const j = await admin.getJob(job.id);
    return j.state === 'done' && j;
  }, { what: 'the job to finish' });
  assert.equal(done.written, 2);
  assert.equal(done.failed, 0);
  assert.ok(done.endTime);
  for (const id of ids) assert.equal((await admin.getKey({ device: id }, 'fw')).value, id === ids[2] ? 9 : 2);
  assert.ok((await admin.listJobs()).some((j) => j.id === job.id));

  // A failing op on some devices: the job still ends done, counting them.
  const failing = await admin.createJob({ select: { ids }, ops: [{ op: 'set', key: 'fw', value: 3, ifRev: 0 }] });
  const ended = await waitFor(async () => {
    const j = await admin.getJob(failing.id);
    return j.state === 'done' && j;
  }, { what: 'the failing job to finish' });
  assert.equal(ended.failed, 3);
  assert.equal(ended.errors.length, 3);
  assert.match(ended.errors[0].reason, /^REVISION_MISMATCH/);

  // A slow job can be cancelled.
  const slow = await admin.createJob({ select: { ids }, ops: [{ op: 'set', key: 'slow', value: 1 }], rate: 0.001 });
  const cancelled = await admin.cancelJob(slow.id);
  assert.ok(['cancelled', 'done'].includes(cancelled.state));
  await rejects(admin.createJob({ select: {}, ops: [{ op: 'set', key: 'x', value: 1 }] }), { status: 400 });
});

test('errors: a network failure is NETWORK_ERROR; a non-JSON error body keeps its text', async () => {
  // A port nothing listens on.
  const probe = createServer();
  await new Promise((r) => probe.listen(0, '127.0.0.1', r));
  const { port } = probe.address();
  await new Promise((r) => probe.close(r));
  const dead = new Client({ url: `http://127.0.0.1:${port}`, token: 'x' });
  const e = await rejects(dead.listHomes(), { reason: 'NETWORK_ERROR', status: undefined });
  assert.ok(e.message.includes('GET /homes'));

  // A proxy in front of the server that fails with plain text (the server itself always answers JSON).
  const proxy = createServer((req, res) => {
    res.writeHead(502, { 'Content-Type': 'text/plain', 'Retry-After': '3' });
    res.end('Bad Gateway from the proxy');
  });
  await new Promise((r) => proxy.listen(0, '127.0.0.1', r));
  try {
    const c = new Client({ url: `http://127.0.0.1:${proxy.address().port}`, token: 'x' });
    await rejects(c.getDevice(1), { status: 502, message: 'Bad Gateway from the proxy', retryAfter: 3, data: undefined });
  } finally {
    await new Promise((r) => proxy.close(r));
  }

  // The server's own JSON errors.
  const anon = new Client({ url: server.url });
  await rejects(anon.listHomes(), { status: 401, reason: 'UNAUTHENTICATED_CLIENT' });
  const raw = await rejects(admin.request('PUT', '/devices/1/kv/k', { body: 'not json' }), { status: 400, reason: 'INVALID_JSON' });
  assert.ok(raw.message.length > 0);
  const ok = await admin.request('GET', '/healthz');
  assert.equal(ok.status, 200);
});

test('RawJson keeps a number\'s exact text through REST writes, merges, batches and the mirror', async () => {
  const dev = await admin.createDevice({ name: 'exact' });
  const scope = { device: dev.id };
  const raw = async (key) => {
    const res = await fetch(`${server.url}/devices/${dev.id}/kv/${key}`, { headers: { Authorization: `ModeCloud ${server.adminKey}` } });
    return res.text();
  };
  await admin.setKey(scope, 'price', new RawJson('1.10'));
  assert.match(await raw('price'), /"value":1\.10[,}]/);
  await admin.setKey(scope, 'big', { n: new RawJson('12345678901234567890') });
  assert.match(await raw('big'), /"value":\{"n":12345678901234567890\}/);
  await admin.mergeKey(scope, 'big', { m: new RawJson('2.50') });
  assert.match(await raw('big'), /"m":2\.50/);
  await admin.batch(scope, [{ op: 'set', key: 'a', value: new RawJson('3.000') }]);
  assert.match(await raw('a'), /"value":3\.000[,}]/);
  const mirror = admin.mirror(dev.id);
  try {
    await mirror.connect();
    const rev = await mirror.set('viaSocket', new RawJson('4.20'));
    assert.ok(rev > 0);
    assert.match(await raw('viaSocket'), /"value":4\.20[,}]/);
  } finally {
    mirror.close();
  }
  assert.throws(() => new RawJson('{nope'), (e) => e instanceof DdpError && e.reason === 'INVALID_JSON');
});

// The mirror's apply logic as a pure state machine (no server, no socket), and importing the
// module where no WebSocket exists.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { Mirror, applyMessage, parseEtag, parseNextLink, toWebSocketUrl, scopePath, DdpError } from '../src/ddp.js';

const set = (rev, key, value) => ({ action: 'set', rev, key, value });
const del = (rev, key) => ({ action: 'delete', rev, key });
const reload = (rev, items) => ({
  action: 'reload',
  rev,
  numItems: items.length,
  items: items.map(([key, value]) => ({ key, value, modificationTime: '2026-01-01T00:00:00.000Z' })),
});

test('reload then live changes', () => {
  const m = new Mirror();
  const changes = applyMessage(m, reload(3, [['a', 1], ['b', 2]]));
  assert.equal(changes.length, 2);
  assert.ok(changes.every((c) => c.source === 'reload'));
  assert.equal(m.rev, 3);
  assert.deepEqual(m.apply(set(4, 'a', 5)), [{ key: 'a', value: 5, rev: 4, deleted: false, source: 'live' }]);
  assert.deepEqual(m.apply(del(5, 'b')), [{ key: 'b', value: undefined, rev: 5, deleted: true, source: 'live' }]);
  assert.deepEqual(m.entries(), [['a', 5]]);
  assert.equal(m.size, 1);
  assert.equal(m.rev, 5);
});

test('a late set after a delete is ignored (tombstone)', () => {
  const m = new Mirror();
  m.apply(set(1, 'k', 1));
  m.apply(del(3, 'k'));
  assert.deepEqual(m.apply(set(2, 'k', 2)), [], 'the tombstone at rev 3 wins over a set at rev 2');
  assert.equal(m.get('k'), undefined);
  assert.deepEqual(m.entry('k'), { value: undefined, rev: 3 });
  assert.equal(m.rev, 3, 'rev 2 filled the gap');
});

test('duplicates and older sets change nothing; an unchanged value reports no change', () => {
  const m = new Mirror();
  m.apply(set(1, 'k', { a: 1 }));
  assert.deepEqual(m.apply(set(1, 'k', { a: 1 })), []);
  assert.deepEqual(m.apply(set(2, 'k', { a: 1 })), [], 'same value: no change event');
  assert.equal(m.entry('k').rev, 2);
  assert.deepEqual(m.apply(set(3, 'k', { a: 2 })).length, 1);
});

test('an older reload does not undo newer knowledge', () => {
  const m = new Mirror();
  m.apply(reload(5, [['a', 1], ['b', 1]]));
  m.apply(set(6, 'a', 2));
  m.apply(del(7, 'b'));
  assert.deepEqual(m.apply(reload(5, [['a', 1], ['b', 1]])), []);
  assert.deepEqual(m.entries(), [['a', 2]]);
  assert.equal(m.rev, 7);
});

test('a newer reload replaces everything and reports deletions', () => {
  const m = new Mirror();
  m.apply(reload(2, [['a', 1], ['b', 1]]));
  const changes = m.apply(reload(9, [['b', 1], ['c', 3]]));
  assert.deepEqual(changes.map((c) => [c.key, c.value, c.deleted]), [['a', undefined, true], ['c', 3, false]]);
  assert.equal(m.rev, 9);
  assert.deepEqual(m.entries(), [['b', 1], ['c', 3]]);
});

test('rev only advances over a complete sequence', () => {
  const m = new Mirror();
  m.apply(set(1, 'a', 1));
  m.apply(set(3, 'a', 3));
  assert.equal(m.rev, 1, 'rev 2 is missing');
  m.apply(set(2, 'b', 2));
  assert.equal(m.rev, 3);
  assert.equal(m.get('a'), 3);
});

test('a batch applies its changes in order, at once', () => {
  const m = new Mirror();
  m.apply(reload(1, [['x', 0]]));
  const changes = m.apply({ action: 'batch', rev: 4, changes: [set(2, 'a', 1), del(3, 'x'), set(4, 'a', 2)] });
  assert.deepEqual(changes.map((c) => [c.key, c.value, c.rev]), [['a', 1, 2], ['x', undefined, 3], ['a', 2, 4]]);
  assert.equal(m.rev, 4);
  assert.deepEqual(m.entries(), [['a', 2]]);
  assert.deepEqual(m.apply({ action: 'resume', rev: 4 }), []);
  assert.deepEqual(m.apply({ action: 'error', reason: 'INVALID_KEY', message: 'x' }), []);
  assert.deepEqual(m.apply({ action: 'command', command: { action: 'x', parameters: {} } }), []);
});

test('shuffled, duplicated delivery of one history converges to the in-order state', () => {
  // A deterministic pseudo-random generator, so the test is reproducible.
  let seed = 12345;
  const rnd = (n) => {
    seed = (seed * 1103515245 + 12345) % 2147483648;
    return seed % n;
  };
  for (let round = 0; round < 200; round++) {
    const state = new Map();
    const messages = [];
    const reloads = [];
    const n = 1 + rnd(30);
    for (let rev = 1; rev <= n; rev++) {
      const key = `k${rnd(4)}`;
      const v = rnd(100);
      if (rnd(3) === 0) {
        state.delete(key);
        messages.push(del(rev, key));
      } else {
        state.set(key, v);
        messages.push(set(rev, key, v));
      }
      if (v % 5 === 0) reloads.push(reload(rev, [...state.entries()].sort()));
    }
    const expected = new Mirror();
    for (const m of messages) expected.apply(m);
    const all = [...messages, ...reloads];
    for (let i = 0; i < rnd(10); i++) all.push(all[rnd(all.length)]);
    for (let i = all.length - 1; i > 0; i--) {
      const j = rnd(i + 1);
      [all[i], all[j]] = [all[j], all[i]];
    }
    const got = new Mirror();
    for (const m of all) got.apply(m);
    assert.deepEqual(got.entries(), expected.entries(), `round ${round}`);
    assert.equal(got.rev, expected.rev, `round ${round}`);
  }
});

test('snapshots round-trip (the Rust SDK mirror file format)', () => {
  const m = new Mirror();
  m.apply(reload(4, [['a', 1]]));
  m.apply(del(5, 'a'));
  m.apply(set(7, 'b', { deep: [1, 2] }));
  const json = JSON.parse(JSON.stringify(m));
  assert.deepEqual(json, { rev: 5, ahead: [7], entries: { a: { value: null, rev: 5 }, b: { value: { deep: [1, 2] }, rev: 7 } } });
  const back = Mirror.fromJSON(json);
  assert.deepEqual(back.toJSON(), m.toJSON());
  assert.deepEqual(back.apply(set(6, 'a', 1)), [{ key: 'a', value: 1, rev: 6, deleted: false, source: 'live' }]);
  assert.equal(back.rev, 7);
  assert.equal(Mirror.fromJSON(null).rev, 0);
});

test('helpers: ETag, Link, WebSocket URL, scope paths', () => {
  assert.equal(parseEtag('"12"'), 12);
  assert.equal(parseEtag('W/"7"'), 7);
  assert.equal(parseEtag(null), undefined);
  assert.equal(parseNextLink('</devices?homeId=1&limit=2&after=5>; rel="next"'), '5');
  assert.equal(parseNextLink(null), null);
  assert.equal(toWebSocketUrl('http://h:1/'), 'ws://h:1');
  assert.equal(toWebSocketUrl('https://h/ddp'), 'wss://h/ddp');
  assert.equal(scopePath({ device: 3 }), '/devices/3');
  assert.equal(scopePath({ home: 4 }), '/homes/4');
  assert.throws(() => scopePath({}), DdpError);
});

test('importing ddp.js needs no WebSocket global; opening a socket without one fails clearly', () => {
  const url = new URL('../src/ddp.js', import.meta.url).href;
  const script = `
    if (typeof globalThis.WebSocket !== 'undefined') { console.log('has-websocket'); process.exit(3); }
    const m = await import(${JSON.stringify(url)});
    const c = new m.Client({ url: 'http://127.0.0.1:9', token: 't' });
    const mirror = c.mirror(1);
    let error;
    mirror.addEventListener('error', (e) => { error = e.detail.error; });
    await mirror.connect().catch(() => {});
    try { c.events({}); } catch (e) { error = error || e; }
    console.log(JSON.stringify({ exports: Object.keys(m).sort(), reason: error && error.reason, status: mirror.status }));
  `;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8', timeout: 20000 });
  assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`);
  const out = JSON.parse(r.stdout.trim());
  for (const name of ['Client', 'DdpError', 'DeviceMirror', 'EventStream', 'Mirror', 'applyMessage']) assert.ok(out.exports.includes(name), name);
  assert.equal(out.reason, 'NETWORK_ERROR');
  assert.equal(out.status, 'closed');
});

test('ddp.d.ts declares exactly the runtime exports of ddp.js', async () => {
  const { readFileSync } = await import('node:fs');
  const dts = readFileSync(fileURLToPath(new URL('../src/ddp.d.ts', import.meta.url)), 'utf8');
  const declared = [...dts.matchAll(/^export (?:declare )?(?:class|function|const) (\w+)/gm)].map((m) => m[1]).sort();
  const runtime = Object.keys(await import('../src/ddp.js')).sort();
  assert.deepEqual(declared, runtime);
  // Every method of the contract is declared.
  for (const name of Object.getOwnPropertyNames((await import('../src/ddp.js')).Client.prototype)) {
    if (name !== 'constructor') assert.match(dts, new RegExp(`\\n  ${name}[<(]`), `Client.${name} declared`);
  }
});

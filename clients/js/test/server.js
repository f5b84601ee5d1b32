// Test helper: spawns the real `ddp serve` on a fresh data directory and a free port.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname, resolve } from 'node:path';
import { randomBytes } from 'node:crypto';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { existsSync } from 'node:fs';
import { createInterface } from 'node:readline';

const here = dirname(fileURLToPath(import.meta.url));
export const repoRoot = resolve(here, '..', '..', '..');
export const ddpBin = process.env.DDP_BIN || join(repoRoot, 'target', 'debug', 'ddp');

/**
 * Starts a server. Returns {url, adminKey, dataDir, stop(), restart()}.
 * `restart()` stops it and starts it again on the same data dir and address.
 */
export async function startServer({ extraArgs = [] } = {}) {
  const dataDir = mkdtempSync(join(tmpdir(), 'ddp-js-test-'));
  // hex: a base64url key may start with '-', which the command line would take for a flag
  const adminKey = randomBytes(16).toString('hex');
  const server = { dataDir, adminKey, url: '', addr: '', proc: null, logs: [] };

  async function launch(listen) {
    const args = ['serve', '--data-dir', dataDir, '--http-listen', listen, '--mqtt-listen', 'off',
      '--admin-key', adminKey, '--log-format', 'json', ...extraArgs];
    const proc = spawn(ddpBin, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    server.proc = proc;
    const exited = new Promise((res) => proc.once('exit', (code, signal) => res({ code, signal })));
    server.exited = exited;
    const addr = await new Promise((res, rej) => {
      const timer = setTimeout(() => rej(new Error(`ddp serve did not log "listening" in 20 s:\n${server.logs.slice(-20).join('\n')}`)), 20000);
      const onLine = (line) => {
        server.logs.push(line);
        if (server.logs.length > 500) server.logs.shift();
        let j;
        try { j = JSON.parse(line); } catch { return; }
        if (j.message === 'listening' && j.transport === 'http' && j.addr) {
          clearTimeout(timer);
          res(j.addr);
        }
      };
      createInterface({ input: proc.stdout }).on('line', onLine);
      createInterface({ input: proc.stderr }).on('line', onLine);
      proc.once('error', (e) => { clearTimeout(timer); rej(e); });
      exited.then(({ code, signal }) => { clearTimeout(timer); rej(new Error(`ddp serve exited (${code ?? signal}):\n${server.logs.slice(-20).join('\n')}`)); });
    });
    server.addr = addr;
    server.url = `http://${addr}`;
  }

  async function halt() {
    const proc = server.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    proc.kill('SIGTERM');
    const t = setTimeout(() => proc.kill('SIGKILL'), 10000);
    await server.exited;
    clearTimeout(t);
  }

  server.stop = async () => {
    await halt();
    rmSync(dataDir, { recursive: true, force: true });
  };
  server.restart = async () => {
    await halt();
    // The same address, so clients reconnect to it; retry while the port is still held.
    const deadline = Date.now() + 15000;
    for (;;) {
      try {
        await launch(server.addr);
        return;
      } catch (e) {
        if (Date.now() > deadline) throw e;
        await new Promise((r) => setTimeout(r, 200));
      }
    }
  };
  // If the test process ends without after() (a crash, process.exit), take the server along.
  process.once('exit', () => {
    try { server.proc?.kill('SIGKILL'); } catch { /* gone */ }
    try { rmSync(dataDir, { recursive: true, force: true }); } catch { /* best effort */ }
  });
  await launch('127.0.0.1:0');
  return server;
}

/** Waits until `cond()` (sync or async) is truthy; returns its value. Throws after `timeoutMs`. */
export async function waitFor(cond, { timeoutMs = 10000, intervalMs = 20, what = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const v = await cond();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${last.message}` : ''}`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

/** Resolves with the detail of the next `type` event on `target` satisfying `pred`. */
export function nextEvent(target, type, pred = () => true, timeoutMs = 10000) {
  return new Promise((res, rej) => {
    const t = setTimeout(() => { target.removeEventListener(type, on); rej(new Error(`timed out waiting for a '${type}' event`)); }, timeoutMs);
    function on(e) {
      if (!pred(e.detail)) return;
      clearTimeout(t);
      target.removeEventListener(type, on);
      res(e.detail);
    }
    target.addEventListener(type, on);
  });
}

// `node --test test/` runs every file in test/, this helper too: then it checks itself.
if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const { test } = await import('node:test');
  const assert = (await import('node:assert/strict')).default;
  test('the helper starts a real server on a free port and removes its data dir on stop', async () => {
    const s = await startServer();
    try {
      assert.match(s.url, /^http:\/\/127\.0\.0\.1:\d+$/);
      assert.equal(s.adminKey.length, 32);
      const r = await fetch(`${s.url}/readyz`);
      assert.equal(r.status, 200);
      const homes = await fetch(`${s.url}/homes`, { headers: { Authorization: `ModeCloud ${s.adminKey}` } });
      assert.equal(homes.status, 200);
    } finally {
      await s.stop();
    }
    assert.equal(existsSync(s.dataDir), false);
    assert.notEqual(s.proc.exitCode ?? s.proc.signalCode, null, 'the server process ended');
  });
}

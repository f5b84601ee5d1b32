// The mirror conformance suite (conformance/README.md), shared by every SDK: each file in
// conformance/mirror/ is a sequence of raw server messages with the mirror expected after each.
// Each message is parsed as DeviceMirror parses a frame (JSON.parse; text that does not parse
// changes nothing) and applied to a Mirror that starts empty. One subtest per file.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Mirror, applyMessage } from '../src/ddp.js';

const dir = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'conformance', 'mirror');
const files = readdirSync(dir)
  .filter((f) => f.endsWith('.json'))
  .sort();

/** The mirror as an expect block: {rev, items: {key: value}} (live keys only). */
function state(mirror) {
  return { rev: mirror.rev, items: Object.fromEntries(mirror.entries()) };
}

test('the suite holds at least 40 cases', () => {
  assert.ok(files.length >= 40, `${dir} holds ${files.length} case files; the suite has at least 40`);
});

for (const file of files) {
  test(file, () => {
    assert.match(file, /^\d{3}-[a-z0-9-]+\.json$/, 'case files are named NNN-short-name.json');
    const c = JSON.parse(readFileSync(join(dir, file), 'utf8'));
    assert.equal(typeof c.name, 'string');
    assert.equal(typeof c.description, 'string');
    assert.ok(Array.isArray(c.steps) && c.steps.length > 0, 'a case has steps');
    const mirror = new Mirror();
    const failures = [];
    c.steps.forEach((step, i) => {
      let message;
      let parsed = true;
      try {
        message = JSON.parse(step.message);
      } catch {
        parsed = false; // unparseable: the mirror stays as it is
      }
      if (parsed) {
        try {
          applyMessage(mirror, message);
        } catch {
          // reporting an error is the SDK's business; the state is checked below
        }
      }
      try {
        assert.deepStrictEqual(state(mirror), step.expect);
      } catch (e) {
        failures.push(`step ${i + 1} of ${c.steps.length}: ${step.message}\n${e.message}`);
      }
    });
    assert.ok(failures.length === 0, `${c.name}\n\n${failures.join('\n\n')}`);
  });
}

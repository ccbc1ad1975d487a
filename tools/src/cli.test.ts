/** The pasture CLI end to end: exit codes, --json output, clear errors. */
import test from 'ava';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { mkdtemp, rm, open } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const cli = fileURLToPath(new URL('./pasture.ts', import.meta.url));

async function pasture(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, ['--import', 'tsx', cli, ...args]);
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

test('init, stats --json, fsck clean, fsck after corruption', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'pasture-cli-'));
  try {
    const store = join(dir, 'pool');
    const init = await pasture('init', '--store', `file:${store}`, '--segment-bytes', '1M', '--segments', '32', '--json');
    t.is(init.code, 0, init.stderr);
    t.is(JSON.parse(init.stdout).segmentCount, 32);
    const stats = await pasture('stats', '--store', `file:${store}`, '--json');
    t.is(stats.code, 0, stats.stderr);
    const s = JSON.parse(stats.stdout);
    t.is(s.grass.segmentBytes, 1 << 20);
    t.true(s.grass.liveRecords >= 3, 'Cow superblock, catalog and the nodes above it');
    t.is(s.cow.mappedBlocks, 1, 'the empty catalog');
    t.true(s.cow.metaRecords >= 2);
    const ok = await pasture('fsck', '--store', `file:${store}`, '--json');
    t.is(ok.code, 0, ok.stdout + ok.stderr);
    t.true(JSON.parse(ok.stdout).ok);
    // Scribble over both superblocks: fsck must say so and fail.
    const h = await open(join(store, 'superblock'), 'r+');
    await h.write(Buffer.alloc(1024, 0x55), 0, 1024, 0);
    await h.close();
    const bad = await pasture('fsck', '--store', `file:${store}`);
    t.is(bad.code, 1);
    t.regex(bad.stdout, /problem: cannot open: .*no valid Grass superblock/);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('usage errors are one clear line and exit 2; --list-policies lists the policies', async (t) => {
  const r = await pasture('bench', 'grass', '--list-policies');
  t.is(r.code, 0);
  t.deepEqual(r.stdout.trim().split('\n'), ['greedy', 'cost-benefit', 'sepbit']);
  const bad = await pasture('bench', 'grass', '--policy', 'nope');
  t.is(bad.code, 2);
  t.regex(bad.stderr, /unknown policy 'nope'/);
  const missing = await pasture('fsck');
  t.is(missing.code, 2);
  t.regex(missing.stderr, /--store is required/);
  const unknown = await pasture('frobnicate');
  t.is(unknown.code, 2);
  t.regex(unknown.stderr, /unknown command 'frobnicate'/);
  const unknownJson = await pasture('frobnicate', '--json');
  t.is(unknownJson.code, 2);
  t.deepEqual(JSON.parse(unknownJson.stdout), { error: "unknown command 'frobnicate'. Run 'pnpm pasture --help' for the list.", code: 'EUSAGE' });
  const fraction = await pasture('init', '--store', 'file:/nonexistent/pasture', '--segments', '40.5');
  t.is(fraction.code, 2);
  t.regex(fraction.stderr, /--segments must be .*a whole number/);
  const noSnap = await pasture('diff', 'vm', '--store', 'file:/nonexistent/pasture');
  t.is(noSnap.code, 2);
  t.regex(noSnap.stderr, /diff starts from a snapshot/);
  const nostore = await pasture('stats', '--store', 'file:/nonexistent/pasture');
  t.is(nostore.code, 1);
  t.regex(nostore.stderr, /holds no Pasture store/);
  // A flag the command would ignore is refused, not ignored.
  const ignored = await pasture('sim', 'cow', '--seed', '3', '--crashes', '1', '--policy', 'greedy');
  t.is(ignored.code, 2);
  t.regex(ignored.stderr, /--policy is for sim grass/);
  const badCount = await pasture('serve', '--store', 'file:/nonexistent/pasture', '--max-connections', '0');
  t.is(badCount.code, 2);
  t.regex(badCount.stderr, /--max-connections takes a whole number of at least 1/);
});

test('bad arguments are refused before anything is done; --json failures print one JSON object', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'pasture-cli-'));
  try {
    const store = join(dir, 'pool');
    // A geometry Grass cannot run in is refused before a store is made (init could not be run again).
    const few = await pasture('init', '--store', `file:${store}`, '--segments', '4');
    t.is(few.code, 2);
    t.regex(few.stderr, /--segments must be in \[32, /);
    t.is((await pasture('init', '--store', `file:${store}`, '--segment-bytes', '1M', '--segments', '32')).code, 0, 'the same directory takes a good init');
    const odd = await pasture('volume', 'create', 'a', '--size', '4096.5', '--store', store);
    t.is(odd.code, 2);
    t.regex(odd.stderr, /whole number of bytes/);
    t.is((await pasture('volume', 'create', 'a', '--size', '1M', '--store', store)).code, 0);
    t.is((await pasture('volume', 'create', 'b', '--size', '1M', '--store', store)).code, 0);
    const extra = await pasture('volume', 'remove', 'a', 'b', '--store', store);
    t.is(extra.code, 2);
    t.regex(extra.stderr, /unexpected argument: 'b'/);
    const list = JSON.parse((await pasture('volume', 'list', '--store', store, '--json')).stdout) as { volumes: { name: string }[] };
    t.deepEqual(list.volumes.map((v) => v.name), ['a', 'b'], 'nothing was removed');
    // --json: a failure is one JSON object on stdout too.
    for (const args of [['volume', 'list', '--store', join(dir, 'none')], ['snap', 'list', 'nosuch', '--store', store], ['volume', 'frob', '--store', store]]) {
      const r = await pasture(...args, '--json');
      t.not(r.code, 0);
      const j = JSON.parse(r.stdout) as { error: string; code: string };
      t.true(typeof j.error === 'string' && j.error.length > 0 && typeof j.code === 'string', r.stdout);
      t.is(r.stdout.trim().split('\n').length, 1);
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('sim replays a seed and reports ok in JSON', async (t) => {
  const r = await pasture('sim', 'grass', '--seed', '42', '--crashes', '5', '--json');
  t.is(r.code, 0, r.stderr);
  const j = JSON.parse(r.stdout);
  t.true(j.ok);
  t.is(j.crashes, 5);
  const again = JSON.parse((await pasture('sim', 'grass', '--seed', '42', '--crashes', '5', '--json')).stdout);
  t.is(again.batches, j.batches, 'the same seed gives the same run');
  t.is(again.steps, j.steps);
});

test('pool management end to end: volumes, snapshots, clones, import/export, diff, clear errors', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'pasture-cli-'));
  try {
    const store = `file:${join(dir, 'pool')}`;
    t.is((await pasture('init', '--store', store, '--segment-bytes', '1M', '--segments', '64')).code, 0);
    // A sparse raw image: 1 MiB of data, 1 MiB hole, 1 KiB tail.
    const raw = join(dir, 'in.raw');
    const { randomBytes } = await import('node:crypto');
    const data = randomBytes(1 << 20);
    const h = await open(raw, 'w');
    await h.write(data, 0, data.length, 0);
    await h.write(data.subarray(0, 1024), 0, 1024, 2 << 20);
    await h.close();
    const imp = await pasture('import', raw, 'disk', '--store', store, '--json');
    t.is(imp.code, 0, imp.stderr);
    t.is(JSON.parse(imp.stdout).dataBytes, (1 << 20) + 1024);
    t.is((await pasture('snap', 'create', 'disk@s1', '--store', store)).code, 0);
    t.is((await pasture('clone', 'disk@s1', 'child', '--store', store)).code, 0);
    const list = JSON.parse((await pasture('volume', 'list', '--store', store, '--json')).stdout);
    t.deepEqual(list.volumes.map((v: { name: string; parent: string | null }) => [v.name, v.parent]), [['disk', null], ['child', 'disk@s1']]);
    const exp = await pasture('export', 'child', join(dir, 'out.raw'), '--store', store, '--json');
    t.is(exp.code, 0, exp.stderr);
    const { readFile } = await import('node:fs/promises');
    const a = await readFile(raw);
    const b = await readFile(join(dir, 'out.raw'));
    t.is(b.length, Math.ceil(a.length / 4096) * 4096);
    t.is(Buffer.compare(a, b.subarray(0, a.length)), 0);
    const diff = JSON.parse((await pasture('diff', 'disk@s1', 'child', '--store', store, '--json')).stdout);
    t.deepEqual(diff.extents, []);
    // Errors: one line, exit 1, nothing changed.
    const gone = await pasture('snap', 'remove', 'disk@s1', '--store', store);
    t.is(gone.code, 1);
    t.regex(gone.stderr, /^pasture: snapshot 'disk@s1' is protected; unprotect it first\n$/);
    const missing = await pasture('volume', 'info', 'nope', '--store', store);
    t.is(missing.code, 1);
    t.is(missing.stderr, "pasture: no volume named 'nope'\n");
    const usage = await pasture('volume', 'frobnicate', '--store', store);
    t.is(usage.code, 2);
    const fsck = await pasture('fsck', '--store', store, '--json');
    t.is(fsck.code, 0, fsck.stdout);
    t.deepEqual(JSON.parse(fsck.stdout).human, { volumes: 2, snapshots: 1, scratch: 0 });
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

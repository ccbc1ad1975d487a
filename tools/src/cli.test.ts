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
    t.is(s.grass.liveRecords, 1, 'the Cow superblock');
    t.is(s.cow.mappedBlocks, 0);
    t.is(s.cow.metaRecords, 1);
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
  const nostore = await pasture('stats', '--store', 'file:/nonexistent/pasture');
  t.is(nostore.code, 1);
  t.regex(nostore.stderr, /holds no Pasture store/);
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

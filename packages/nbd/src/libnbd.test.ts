/**
 * libnbd's tools (nbdinfo, nbdcopy) and fio's nbd engine (libnbd underneath) against
 * MemoryDevice exports. nbdsh is not installed here, so there is no scripted libnbd test.
 */
import test from 'ava';
import { createHash } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { MemoryDevice } from './memory-device.ts';
import { Rng, run, serve, withTempDir } from './testing.ts';

const MiB = 1024 * 1024;
const sha256 = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

test('nbdinfo --list: every export with its name, description, size and flags', async (t) => {
  const s = await serve({
    'vol-a': { device: new MemoryDevice({ size: 8 * MiB }), description: 'volume A' },
    'vol-b@snap1': { device: new MemoryDevice({ size: 2 * MiB, readOnly: true }), description: 'snapshot snap1 of vol-b' },
  });
  const r = await run('nbdinfo', ['--list', '--json', s.uri], 20_000);
  t.is(r.code, 0, r.stderr);
  const info = JSON.parse(r.stdout) as { protocol: string; exports: { 'export-name': string; description: string; 'export-size': number; is_read_only: boolean; can_multi_conn: boolean; contexts: string[] }[] };
  t.is(info.protocol, 'newstyle-fixed');
  t.deepEqual(
    info.exports.map((e) => [e['export-name'], e.description, e['export-size'], e.is_read_only]),
    [
      ['vol-a', 'volume A', 8 * MiB, false],
      ['vol-b@snap1', 'snapshot snap1 of vol-b', 2 * MiB, true],
    ],
  );
  t.true(info.exports.every((e) => e.can_multi_conn && e.contexts.includes('base:allocation')));
  const text = await run('nbdinfo', ['--list', s.uri], 20_000);
  t.regex(text.stdout, /export="vol-b@snap1":\n\s+description: snapshot snap1 of vol-b/);
  await s.close();
});

test('nbdinfo --map shows holes and data through block status', async (t) => {
  const dev = new MemoryDevice({ size: 8 * MiB });
  await dev.write(MiB, Buffer.alloc(MiB, 1), false);
  await dev.write(6 * MiB, Buffer.alloc(64 * 1024, 2), false);
  const s = await serve({ disk: dev });
  const r = await run('nbdinfo', ['--map', '--json', `${s.uri}/disk`], 20_000);
  t.is(r.code, 0, r.stderr);
  const map = (JSON.parse(r.stdout) as { offset: number; length: number; type: number }[]).map((e) => [e.offset, e.length, e.type]);
  t.deepEqual(map, [
    [0, MiB, 3],
    [MiB, MiB, 0],
    [2 * MiB, 4 * MiB, 3],
    [6 * MiB, 64 * 1024, 0],
    [6 * MiB + 64 * 1024, 2 * MiB - 64 * 1024, 3],
  ]);
  const text = await run('nbdinfo', ['--map', `${s.uri}/disk`], 20_000);
  t.regex(text.stdout, /1048576\s+1048576\s+0\s+data/);
  t.regex(text.stdout, /2097152\s+4194304\s+3\s+hole,zero/);
  await s.close();
});

test('nbdcopy a random file in and out (multi-conn), sha256 equal; zeros become holes', async (t) => {
  await withTempDir(async (dir) => {
    const rng = new Rng(4242);
    const size = 40 * MiB;
    const image = Buffer.concat([rng.bytes(16 * MiB), Buffer.alloc(8 * MiB), rng.bytes(16 * MiB)]);
    const src = join(dir, 'in.bin');
    const out = join(dir, 'out.bin');
    await writeFile(src, image);
    const dev = new MemoryDevice({ size });
    const s = await serve({ disk: dev });
    const into = await run('nbdcopy', ['--flush', src, `${s.uri}/disk`], 60_000);
    t.is(into.code, 0, into.stderr);
    const back = await run('nbdcopy', [`${s.uri}/disk`, out], 60_000);
    t.is(back.code, 0, back.stderr);
    t.is(sha256(await readFile(out)), sha256(image));
    t.is(sha256(Buffer.from(await dev.read(0, size))), sha256(image));
    const holes = (await dev.blockStatus(16 * MiB, 8 * MiB)).filter((e) => e.hole);
    t.is(holes.reduce((n, e) => n + e.length, 0), 8 * MiB, 'nbdcopy skipped or zeroed the zero region: no chunks allocated');
    t.true(s.server.stats().connectionsAccepted >= 4, 'nbdcopy used several connections (CAN_MULTI_CONN)');
    t.is(s.server.stats().errors, 0);
    await s.close();
  });
});

test('fio nbd engine: four connections of random 4k writes, verified with crc32c', async (t) => {
  const jobs = 4;
  const perJob = 8 * MiB;
  const s = await serve({ disk: new MemoryDevice({ size: jobs * perJob }) });
  const r = await run('fio', [
    '--name=nbd-verify',
    '--ioengine=nbd',
    `--uri=${s.uri}/disk`,
    '--rw=randwrite',
    '--bs=4k',
    '--iodepth=16',
    '--verify=crc32c',
    '--verify_fatal=1',
    `--size=${perJob}`,
    `--numjobs=${jobs}`,
    `--offset_increment=${perJob}`,
    '--group_reporting',
    '--output-format=json',
  ], 120_000);
  t.is(r.code, 0, r.stderr + r.stdout.slice(-2000));
  const report = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: { error: number; write: { io_bytes: number }; read: { io_bytes: number } }[] };
  const job = report.jobs[0]!;
  t.is(job.error, 0);
  t.is(job.write.io_bytes, jobs * perJob);
  t.is(job.read.io_bytes, jobs * perJob, 'every block written was read back and verified');
  const st = s.server.stats();
  t.true(st.connectionsAccepted >= jobs);
  t.is(st.errors, 0);
  await s.close();
});

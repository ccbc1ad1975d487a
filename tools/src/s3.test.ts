/**
 * A pool in S3 through the CLI and NBD, against a real S3 server (radosgw) started here:
 * init with --store s3://, the management commands unchanged, serve with a real NBD client,
 * live commands through the control socket, a second writer refused by name, and recovery
 * of the pool from the bucket alone after its cache directory is lost.
 */
import test from 'ava';
import { execFile, type ChildProcess } from 'node:child_process';
import { startServe } from './serve-process.ts';
import { promisify } from 'node:util';
import { mkdtemp, rm, readFile, writeFile } from 'node:fs/promises';
import { connect, createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { randomBytes } from 'node:crypto';
import { Bucket } from '@pasture/grass-s3';
import { startS3Server, s3Available, type S3Server } from '@pasture/grass-s3/testing';

const cli = fileURLToPath(new URL('./pasture.ts', import.meta.url));
const run = promisify(execFile);
let server: S3Server | undefined;
let env: NodeJS.ProcessEnv = process.env;

test.before(async () => {
  if (!s3Available()) throw new Error('this test needs radosgw: apt-get install --no-install-recommends ceph-mon ceph-osd radosgw ceph-common');
  server = await startS3Server();
  env = {
    ...process.env, AWS_ENDPOINT_URL: server.endpoint, AWS_REGION: server.region,
    AWS_ACCESS_KEY_ID: server.accessKeyId, AWS_SECRET_ACCESS_KEY: server.secretAccessKey,
  };
});

test.after.always(async () => {
  await server?.stop();
});

async function pasture(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, ['--import', 'tsx', cli, ...args], { timeout: 120_000, env });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

/** A client for `bucket` on the test's server, closed after `fn`. */
async function withBucket<T>(bucket: string, fn: (b: Bucket) => Promise<T>): Promise<T> {
  const b = new Bucket({ bucket, prefix: '', endpoint: server!.endpoint, region: server!.region, accessKeyId: server!.accessKeyId, secretAccessKey: server!.secretAccessKey });
  try {
    return await fn(b);
  } finally {
    b.destroy();
  }
}

function startServer(args: string[], port: number): Promise<{ child: ChildProcess; uri: string }> {
  return startServe([...args, '--listen', `127.0.0.1:${port}`], { env });
}

test('a pool in S3: init, volumes, import and export, serve to qemu-io, live snapshot, a second writer refused, recovery from the bucket alone', async (t) => {
  const base = await mkdtemp(join(tmpdir(), 'pasture-s3cli-'));
  try {
    const bucket = `cli-${randomBytes(4).toString('hex')}`;
    const url = `s3://${bucket}/pools/one`;
    const cache = join(base, 'cache');
    const init = await pasture('init', '--store', url, '--cache-dir', cache, '--segment-bytes', '1M', '--segments', '256', '--json');
    t.is(init.code, 0, init.stderr);
    t.is(JSON.parse(init.stdout).segmentCount, 256);
    const again = await pasture('init', '--store', url, '--cache-dir', join(base, 'other'));
    t.is(again.code, 1);
    t.regex(again.stderr, /already holds a Pasture store/);

    const data = randomBytes(3 << 20);
    const img = join(base, 'in.img');
    await writeFile(img, data);
    const imp = await pasture('import', img, 'v', '--store', url, '--cache-dir', cache);
    t.is(imp.code, 0, imp.stderr);
    // The cache directory alone names the store from now on.
    const grow = await pasture('volume', 'resize', 'v', '--size', '64M', '--store', cache);
    t.is(grow.code, 0, grow.stderr);
    t.is((await pasture('snap', 'create', 'v@s1', '--store', cache)).code, 0);

    const { child, uri } = await startServer(['--store', cache, '--cache-bytes', '48M', '--journal-bytes', '96M'], 10890);
    try {
      const vol = uri.endsWith('/') ? `${uri}v` : `${uri}/v`;
      const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 8M 1M', '-c', 'flush', '-c', 'read -P 0x5a 8M 1M', vol], { timeout: 60_000 });
      t.notRegex(w.stdout, /fail|error/i);
      // Live commands go through the control socket of the server that holds the store.
      const snap = await pasture('snap', 'create', 'v@s2', '--store', cache);
      t.is(snap.code, 0, snap.stderr);
      const stats = await pasture('stats', '--store', cache, '--json');
      t.is(stats.code, 0, stats.stderr);
      const s3 = JSON.parse(stats.stdout).s3 as { puts: number; uploadBacklogBytes: number; epoch: number; cacheLimitBytes: number; uploadBacklogLimitBytes: number };
      t.true(s3.puts > 0, 'the live stats show S3 traffic');
      t.is(s3.cacheLimitBytes, 48 << 20, 'serve --cache-bytes reached the store');
      t.is(s3.uploadBacklogLimitBytes, 96 << 20, 'serve --journal-bytes reached the store');
      // A second writer elsewhere (another cache directory) is refused by name.
      const second = await pasture('volume', 'list', '--store', url, '--cache-dir', join(base, 'elsewhere'));
      t.is(second.code, 1);
      t.regex(second.stderr, new RegExp(`in use by process ${child.pid} on `));
    } finally {
      child.kill('SIGTERM');
      const code = await new Promise<number | null>((r) => (child.exitCode !== null ? r(child.exitCode) : child.once('exit', r)));
      t.is(code, 0);
    }

    // Lose the cache directory: the pool opens from the bucket alone, as of the clean stop.
    await rm(cache, { recursive: true, force: true });
    const cache2 = join(base, 'cache2');
    const out1 = join(base, 's1.img');
    t.is((await pasture('export', 'v@s1', out1, '--store', url, '--cache-dir', cache2)).code, 0);
    t.true(Buffer.compare((await readFile(out1)).subarray(0, data.length), data) === 0, 'the snapshot reads back from the bucket');
    const out2 = join(base, 's2.img');
    t.is((await pasture('export', 'v@s2', out2, '--store', cache2)).code, 0);
    const s2 = await readFile(out2);
    t.true(s2.subarray(8 << 20, 9 << 20).every((b) => b === 0x5a), 'the NBD write before the live snapshot is in it');
    t.true(Buffer.compare(s2.subarray(0, data.length), data) === 0);
    const fsck = await pasture('fsck', '--store', cache2, '--json');
    t.is(fsck.code, 0, fsck.stdout + fsck.stderr);
    const report = JSON.parse(fsck.stdout) as { ok: boolean; s3: { listed: number; problems: string[]; manifestSeq: number } };
    t.true(report.ok);
    t.true(report.s3.listed > 0);
    t.deepEqual(report.s3.problems, []);

    // An object the manifest lists goes missing from the bucket: fsck says which, and fails.
    const raw = await withBucket(bucket, (b) => b.get(`pools/one/manifest/${String(report.s3.manifestSeq + 1).padStart(12, '0')}`));
    const manifest = JSON.parse(Buffer.from(raw!).toString()) as { entries: { key: string; sealed: boolean }[] };
    const victim = manifest.entries.find((e) => e.sealed)!.key;
    await withBucket(bucket, (b) => b.delete([`pools/one/${victim}`]));
    await rm(cache2, { recursive: true, force: true });
    const bad = await pasture('fsck', '--store', url, '--cache-dir', cache2, '--json');
    t.is(bad.code, 1);
    t.regex(bad.stdout, new RegExp(`${victim}.*not in the bucket`), bad.stderr);
  } finally {
    await rm(base, { recursive: true, force: true });
  }
});

/** A TCP relay to the S3 server that the test can cut, as an outage would. */
async function relay(target: string): Promise<{ endpoint: string; cut: () => Promise<void> }> {
  const { hostname, port } = new URL(target);
  const sockets = new Set<Socket>();
  const srv = createServer((c) => {
    const up = connect(Number(port), hostname);
    for (const s of [c, up]) {
      sockets.add(s);
      s.on('error', () => s.destroy());
      s.on('close', () => sockets.delete(s));
    }
    c.pipe(up).pipe(c);
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', () => r()));
  const p = (srv.address() as { port: number }).port;
  return {
    endpoint: `http://127.0.0.1:${p}`,
    cut: async () => {
      await new Promise<void>((r) => {
        srv.close(() => r());
        for (const s of sockets) s.destroy();
      });
    },
  };
}

test('serve stopped during an S3 outage says the bucket lacks the final state, exits 1, and the journal keeps it', async (t) => {
  const base = await mkdtemp(join(tmpdir(), 'pasture-s3out-'));
  const link = await relay(server!.endpoint);
  try {
    const url = `s3://cli-${randomBytes(4).toString('hex')}/pools/out`;
    const cache = join(base, 'cache');
    const viaLink = { ...env, AWS_ENDPOINT_URL: link.endpoint };
    const init = await pasture('init', '--store', url, '--cache-dir', cache, '--segment-bytes', '1M', '--segments', '64');
    t.is(init.code, 0, init.stderr);
    t.is((await pasture('volume', 'create', 'v', '--size', '16M', '--store', cache)).code, 0);
    // The cache directory remembers the endpoint init used: serve is given the relay's.
    const { child, uri } = await startServe(['--store', cache, '--s3-endpoint', link.endpoint, '--close-timeout', '3', '--listen', '127.0.0.1:10891'], { env: viaLink });
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const vol = uri.endsWith('/') ? `${uri}v` : `${uri}/v`;
    await link.cut(); // S3 goes away; flushes go on into the journal
    const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x6b 2M 1M', '-c', 'flush', vol], { timeout: 60_000 });
    t.notRegex(w.stdout, /fail|error/i);
    child.kill('SIGTERM');
    const code = await new Promise<number | null>((r) => (child.exitCode !== null ? r(child.exitCode) : child.once('exit', r)));
    t.is(code, 1, 'a stop that could not publish fails');
    t.regex(stderr, /the bucket does not have the final state .* keep that directory/);
    // S3 is back (the server's own endpoint): the journal uploads what the bucket lacked.
    const out = join(base, 'v.img');
    const exp = await pasture('export', 'v', out, '--store', cache, '--s3-endpoint', server!.endpoint);
    t.is(exp.code, 0, exp.stderr);
    t.true((await readFile(out)).subarray(2 << 20, 3 << 20).every((b) => b === 0x6b), 'the write flushed during the outage is there');
  } finally {
    await link.cut().catch(() => undefined);
    await rm(base, { recursive: true, force: true });
  }
});

test('serve taken over by another writer says so at once, not only in its clients\' errors', async (t) => {
  const base = await mkdtemp(join(tmpdir(), 'pasture-s3fence-'));
  try {
    const url = `s3://cli-${randomBytes(4).toString('hex')}/pools/fence`;
    const cache = join(base, 'cache');
    t.is((await pasture('init', '--store', url, '--cache-dir', cache, '--segment-bytes', '1M', '--segments', '64')).code, 0);
    t.is((await pasture('volume', 'create', 'v', '--size', '16M', '--store', cache)).code, 0);
    const { child, uri } = await startServer(['--store', cache], 10892);
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    try {
      const vol = uri.endsWith('/') ? `${uri}v` : `${uri}/v`;
      // Another machine takes the store over; the server finds out at its next publication.
      const other = await pasture('volume', 'list', '--store', url, '--cache-dir', join(base, 'other'), '--takeover');
      t.is(other.code, 0, other.stderr);
      await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 64k', '-c', 'flush', vol], { timeout: 60_000 }).catch(() => undefined);
      for (let i = 0; i < 60 && !/taken over/.test(stderr); i++) await new Promise((r) => setTimeout(r, 500));
      t.regex(stderr, /pasture: .*taken over by .*its clients' writes now fail: stop this server/);
    } finally {
      child.kill('SIGTERM');
      await new Promise<void>((r) => (child.exitCode !== null ? r() : child.once('exit', () => r())));
    }
  } finally {
    await rm(base, { recursive: true, force: true });
  }
});

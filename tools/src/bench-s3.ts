/**
 * `pasture bench s3`: the S3 segment store's figures against its targets (issue 6).
 *
 * - PUTs per GiB: a volume written sequentially with incompressible data through the whole
 *   stack (Human, Cow, Grass), flushed and published; PUT requests counted by the store's S3
 *   client, against 1.1 x (bytes / segment size) plus one publication per checkpoint.
 * - Warm reads: the same volume read back while every segment is in the local cache; the GETs
 *   it costs (target: none).
 * - Cold sequential read: the pool opened from the bucket alone with an empty cache, the volume
 *   read front to back, then again warm on the same instance; --cold-rounds such rounds
 *   (default 3), each with an empty cache, and the medians (target: cold at least 0.3x warm).
 * - NBD 4 KiB random write QD32 (fio's nbd engine, with its final flush, like
 *   ../shared/peers/bench.sh): `pasture serve` on an S3-backed pool against one on a file
 *   store, alternating rounds, medians (target: at least 0.8x). As in bench.sh, each volume
 *   is first filled by 1 MiB sequential writes, so the rounds measure overwrites. Before each
 *   round the S3-backed server's upload backlog is drained, so that neither server's round
 *   pays for uploads of the other's: each S3 round is a burst into an empty journal, with the
 *   uploads it causes running beside it (the backlog left at its end is reported).
 *
 * The S3 server: the one in AWS_ENDPOINT_URL (or S3_ENDPOINT), else a throwaway radosgw on
 * 127.0.0.1 started for the run.
 */
import { execFile, type ChildProcess } from 'node:child_process';
import { startServe, stopProcess } from './serve-process.ts';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { randomFillSync, randomBytes } from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { GrassLog } from '@pasture/grass';
import { S3SegmentStore, type BucketOptions } from '@pasture/grass-s3';
import { startS3Server, s3Available, type S3Server } from '@pasture/grass-s3/testing';
import { Pool } from '@pasture/human';

const run = promisify(execFile);
const cli = fileURLToPath(new URL('./pasture.ts', import.meta.url));
const MIB = 1 << 20;

export interface BenchS3Options {
  gib: number;
  segmentBytes: number;
  seconds: number;
  rounds: number;
  /** Cold-then-warm read rounds, each from an empty cache (default 3). */
  coldRounds: number;
  /** Skip the NBD comparison (the in-process figures only). */
  skipNbd?: boolean;
  dir?: string;
  log: (line: string) => void;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? NaN : s[Math.floor(s.length / 2)]!;
}

async function seqRead(pool: Pool, bytes: number): Promise<number> {
  const img = await pool.openImage('v');
  const t0 = performance.now();
  for (let off = 0; off < bytes; off += MIB) await img.read(off, MIB);
  const secs = (performance.now() - t0) / 1000;
  await img.close();
  return bytes / MIB / secs;
}

/** fio's 1 MiB sequential prefill of the whole volume, as ../shared/peers/bench.sh does. */
async function fioPrefill(port: number, size: string): Promise<void> {
  await run('fio', [
    '--name=prefill', '--ioengine=nbd', `--uri=nbd://127.0.0.1:${port}/v`, '--rw=write', '--bs=1m', '--iodepth=8',
    '--end_fsync=1', `--size=${size}`, '--output-format=json',
  ], { maxBuffer: 1 << 24, timeout: 600_000 });
}

async function fioRandwrite(port: number, seconds: number, size: string): Promise<number> {
  const { stdout } = await run('fio', [
    '--name=randwrite_4k_qd32', '--ioengine=nbd', `--uri=nbd://127.0.0.1:${port}/v`, '--rw=randwrite', '--bs=4k', '--iodepth=32',
    '--end_fsync=1', '--time_based', `--runtime=${seconds}`, `--size=${size}`, '--randrepeat=0', '--output-format=json',
  ], { maxBuffer: 1 << 24, timeout: (seconds + 120) * 1000 });
  const j = JSON.parse(stdout.slice(stdout.indexOf('{'))) as { jobs: { write: { iops: number } }[] };
  return j.jobs[0]!.write.iops;
}

export async function benchS3(o: BenchS3Options): Promise<Record<string, unknown>> {
  const base = await mkdtemp(join(o.dir ?? tmpdir(), 'pasture-bench-s3-'));
  let server: S3Server | undefined;
  const children: ChildProcess[] = [];
  try {
    let endpoint = process.env['AWS_ENDPOINT_URL'] ?? process.env['S3_ENDPOINT'];
    let creds = { accessKeyId: process.env['AWS_ACCESS_KEY_ID'] ?? process.env['S3_ACCESS_KEY_ID'], secretAccessKey: process.env['AWS_SECRET_ACCESS_KEY'] ?? process.env['S3_SECRET_ACCESS_KEY'] };
    let region = process.env['AWS_REGION'] ?? process.env['S3_REGION'] ?? 'us-east-1';
    if (endpoint === undefined) {
      if (!s3Available()) throw new Error('no S3 server: set AWS_ENDPOINT_URL, or install radosgw (apt-get install --no-install-recommends ceph-mon ceph-osd radosgw ceph-common)');
      // Objects live in the OSD's memory (only what is stored takes RAM). Room for everything
      // the run uploads before the cleaner's deletes pass their grace period: the volume
      // written, prefilled and overwritten round after round. A full OSD makes radosgw hang.
      process.env['S3_SERVER_OSD_BYTES'] ??= String(Math.max(8, 10 * o.gib) * 2 ** 30);
      o.log('starting a radosgw on 127.0.0.1');
      server = await startS3Server();
      endpoint = server.endpoint;
      creds = { accessKeyId: server.accessKeyId, secretAccessKey: server.secretAccessKey };
      region = server.region;
    }
    const bucketName = `bench-${randomBytes(4).toString('hex')}`;
    const bucket = (prefix: string): BucketOptions => ({
      bucket: bucketName, prefix, endpoint: endpoint!, region, forcePathStyle: true,
      ...(creds.accessKeyId !== undefined && creds.secretAccessKey !== undefined ? { accessKeyId: creds.accessKeyId, secretAccessKey: creds.secretAccessKey } : {}),
    });
    const bytes = Math.round(o.gib * 2 ** 30);
    const segmentCount = Math.ceil((bytes * 3) / o.segmentBytes) + 64;

    // --- PUTs per GiB, warm reads ---
    o.log(`writing ${o.gib} GiB of incompressible data through the stack to S3`);
    const cache1 = join(base, 'cache1');
    const store = await S3SegmentStore.create({ bucket: bucket('seq'), cacheDir: cache1, segmentBytes: o.segmentBytes, segmentCount, createBucket: true, cacheBytes: 2 * bytes + (256 << 20) });
    const g = await GrassLog.create(store);
    const pool = await Pool.create(g);
    await pool.createVolume('v', bytes);
    const img = await pool.openImage('v');
    await img.flush();
    await store.drain();
    const before = { ...store.stats(), checkpoints: g.stats().checkpoints };
    const buf = new Uint8Array(MIB);
    const tw = performance.now();
    for (let off = 0; off < bytes; off += MIB) {
      randomFillSync(buf);
      await img.write(off, buf);
    }
    await img.flush();
    const writeSecs = (performance.now() - tw) / 1000;
    await store.drain();
    const after = { ...store.stats(), checkpoints: g.stats().checkpoints };
    await img.close();
    const puts = after.puts - before.puts;
    const checkpoints = after.checkpoints - before.checkpoints;
    const segmentsWorth = bytes / o.segmentBytes;
    const putLimit = 1.1 * segmentsWorth + checkpoints;
    const putsPerGiB = puts / o.gib;
    o.log(`PUTs ${puts} (segments ${after.segmentUploads - before.segmentUploads}, partials ${after.partialUploads - before.partialUploads}, manifests ${after.publications - before.publications}); limit ${putLimit.toFixed(1)}`);

    const getsBeforeWarm = store.stats().gets;
    const warmSameInstance = await seqRead(pool, bytes);
    const warmGets = store.stats().gets - getsBeforeWarm;
    o.log(`warm read after writing: ${warmSameInstance.toFixed(0)} MiB/s, ${warmGets} GETs`);
    await pool.close();

    // --- Cold sequential read from the bucket alone ---
    // Each round opens the pool from the bucket with an empty cache and reads the volume front
    // to back (cold), then again on the same instance (warm); medians of the rounds, since a
    // single read of either kind varies by up to 2x from run to run on a shared machine.
    const colds: number[] = [];
    const warms: number[] = [];
    const shares: number[] = [];
    let coldGets = 0;
    let warmGetsAfterCold = 0;
    for (let round = 0; round < o.coldRounds; round++) {
      const s2 = await S3SegmentStore.open({ bucket: bucket('seq'), cacheDir: join(base, `cache-cold-${round}`), cacheBytes: 2 * bytes + (256 << 20) });
      const pool2 = await Pool.open(await GrassLog.open(s2));
      const g0 = s2.stats();
      const cpu0 = process.cpuUsage();
      const w0 = performance.now();
      const cold = await seqRead(pool2, bytes);
      const cpu = process.cpuUsage(cpu0);
      const coldCpuShare = (cpu.user + cpu.system) / 1000 / (performance.now() - w0);
      const g1 = s2.stats();
      const warm = await seqRead(pool2, bytes);
      const g2 = s2.stats();
      await pool2.close();
      await rm(join(base, `cache-cold-${round}`), { recursive: true, force: true });
      colds.push(cold);
      warms.push(warm);
      shares.push(coldCpuShare);
      coldGets += g1.gets - g0.gets;
      warmGetsAfterCold += g2.gets - g1.gets;
      o.log(`cold read ${round + 1}/${o.coldRounds}: ${cold.toFixed(0)} MiB/s (${g1.gets - g0.gets} GETs, ${g1.prefetches - g0.prefetches} read-ahead requests, ${((g1.bytesDown - g0.bytesDown) / MIB).toFixed(0)} MiB down), warm ${warm.toFixed(0)} MiB/s (${g2.gets - g1.gets} GETs); this process used ${(coldCpuShare * 100).toFixed(0)}% of a core during the cold read`);
    }
    const cold = median(colds);
    const warm = median(warms);

    const result: Record<string, unknown> = {
      gib: o.gib, segmentBytes: o.segmentBytes,
      puts: { total: puts, perGiB: putsPerGiB, segments: after.segmentUploads - before.segmentUploads, partials: after.partialUploads - before.partialUploads, manifests: after.publications - before.publications, checkpoints, limit: putLimit, met: puts <= putLimit },
      write: { mibps: bytes / MIB / writeSecs },
      warmReadGets: { gets: warmGets, mibps: warmSameInstance, met: warmGets === 0 },
      coldRead: { coldMiBps: cold, warmMiBps: warm, ratio: cold / warm, rounds: o.coldRounds, all: { cold: colds, warm: warms }, gets: coldGets / o.coldRounds, cpuShare: median(shares), warmGets: warmGetsAfterCold, target: 0.3, met: cold / warm >= 0.3 },
    };
    if (o.skipNbd === true) return result;

    // --- NBD random writes: S3-backed against file-backed ---
    const env = { ...process.env, AWS_ENDPOINT_URL: endpoint, AWS_REGION: region, AWS_ACCESS_KEY_ID: creds.accessKeyId ?? '', AWS_SECRET_ACCESS_KEY: creds.secretAccessKey ?? '' };
    const pasture = (...args: string[]): Promise<unknown> => run(process.execPath, ['--import', 'tsx', cli, ...args], { env, maxBuffer: 1 << 24 });
    const filePool = join(base, 'file-pool');
    const s3Cache = join(base, 's3-cache');
    const geometry = ['--segment-bytes', String(o.segmentBytes), '--segments', String(segmentCount)];
    await pasture('init', '--store', `file:${filePool}`, ...geometry);
    await pasture('volume', 'create', 'v', '--size', String(bytes), '--store', filePool);
    await pasture('init', '--store', `s3://${bucketName}/nbd`, '--cache-dir', s3Cache, ...geometry);
    await pasture('volume', 'create', 'v', '--size', String(bytes), '--store', s3Cache);
    const servers = [
      { name: 'file', port: 10861, args: ['--store', filePool] },
      { name: 's3', port: 10862, args: ['--store', s3Cache] },
    ];
    for (const s of servers) children.push((await startServe([...s.args, '--listen', `127.0.0.1:${s.port}`, '--export', 'v'], { env })).child);
    /** The S3-backed server's upload backlog in bytes, through its control socket. */
    const backlog = async (): Promise<number> => {
      const { stdout } = await run(process.execPath, ['--import', 'tsx', cli, 'stats', '--store', s3Cache, '--json'], { env, maxBuffer: 1 << 24 });
      return (JSON.parse(stdout) as { s3: { uploadBacklogBytes: number } }).s3.uploadBacklogBytes;
    };
    const drain = async (): Promise<void> => {
      const deadline = Date.now() + 300_000;
      while ((await backlog()) > 0) {
        if (Date.now() > deadline) throw new Error('the S3-backed server did not drain its upload backlog in 300 s');
        await new Promise((r) => setTimeout(r, 250));
      }
    };
    for (const s of servers) {
      o.log(`prefilling ${s.name} with 1 MiB sequential writes`);
      await fioPrefill(s.port, `${o.gib}g`);
    }
    const iops: Record<string, number[]> = { file: [], s3: [] };
    const leftMiB: number[] = [];
    for (let r = 0; r < o.rounds; r++) {
      const order = r % 2 === 0 ? servers : [...servers].reverse();
      for (const s of order) {
        await drain();
        const v = await fioRandwrite(s.port, o.seconds, `${o.gib}g`);
        iops[s.name]!.push(v);
        const left = s.name === 's3' ? (await backlog()) / MIB : 0;
        if (s.name === 's3') leftMiB.push(left);
        o.log(`round ${r + 1}/${o.rounds} ${s.name}: ${v.toFixed(0)} IOPS${s.name === 's3' ? `, upload backlog at its end ${left.toFixed(0)} MiB` : ''}`);
      }
    }
    const fileIops = median(iops.file!);
    const s3Iops = median(iops.s3!);

    return {
      ...result,
      // Both the median and the last round must reach the target: the last round has the most
      // history behind it (the cleaner at work on both servers).
      nbdRandwrite: {
        seconds: o.seconds, rounds: o.rounds, fileIops, s3Iops, ratio: s3Iops / fileIops, all: iops, s3BacklogAtRoundEndMiB: leftMiB,
        lastRoundRatio: iops.s3!.at(-1)! / iops.file!.at(-1)!, target: 0.8,
        met: s3Iops / fileIops >= 0.8 && iops.s3!.at(-1)! / iops.file!.at(-1)! >= 0.8,
      },
    };
  } finally {
    for (const c of children) await stopProcess(c, 60_000);
    await server?.stop();
    await rm(base, { recursive: true, force: true });
  }
}

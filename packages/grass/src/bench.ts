/**
 * Grass benchmarks: programs that print figures, not timed tests.
 *
 * - cleaning: write amplification of a workload at a live utilization, per policy.
 * - throughput: 4 KiB puts with a flush every 256 records on the file store, against fio's
 *   sequential write bandwidth on the same disk in the same run.
 * - recovery: reopen time after an unclean stop with a given amount of log past the checkpoint.
 * - map-memory: process memory per live record with millions of records.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { GrassLog } from './grass.ts';
import { AddressMap } from './address-map.ts';
import { MemorySegmentStore } from './stores/memory.ts';
import { FileSegmentStore } from './stores/file.ts';
import { policyByName } from './policies.ts';
import { Rng } from './rng.ts';
import { MAX_USER_RECORD_BYTES, RECORD_HEADER_BYTES, SUMMARY_ENTRY_BYTES } from './format.ts';

const RECORD = MAX_USER_RECORD_BYTES;
const RECORD_OVERHEAD = RECORD_HEADER_BYTES + SUMMARY_ENTRY_BYTES;

export interface CleaningBenchOptions {
  workload: 'uniform' | 'hotcold';
  utilization: number;
  policy: string;
  segmentBytes: number;
  segmentCount: number;
  /** Overwrites after the fill, in multiples of the store's capacity. */
  capacityMultiple: number;
  seed: number;
}

export interface CleaningBenchResult {
  workload: string;
  policy: string;
  utilization: number;
  /** Live payload bytes over capacity (utilization counts record headers and summaries too). */
  payloadUtilization: number;
  segmentBytes: number;
  segmentCount: number;
  liveRecords: number;
  /** Measured over the second half of the overwrite phase (steady state). */
  writeAmplification: number;
  /** Over the whole overwrite phase, for comparison. */
  writeAmplificationAll: number;
  checkpointBytesPerUserByte: number;
  userMBps: number;
  segmentsCleaned: number;
  seconds: number;
  seed: number;
}

/** Write amplification = (user bytes + cleaner bytes) / user bytes, checkpoints beside it. */
export async function benchCleaning(o: CleaningBenchOptions, progress?: (line: string) => void): Promise<CleaningBenchResult> {
  const policy = policyByName(o.policy);
  if (policy === undefined) throw new Error(`unknown policy '${o.policy}'`);
  const store = new MemorySegmentStore(o.segmentBytes, o.segmentCount);
  const capacity = o.segmentBytes * o.segmentCount;
  // Utilization is what the cleaner sees: bytes live records occupy in segments (header,
  // payload and summary entry) over raw capacity. payloadUtilization reports the stricter view.
  const n = Math.floor((o.utilization * capacity) / (RECORD + RECORD_OVERHEAD));
  // Clean just in time: free segments held back raise the effective utilization. The study
  // sets the utilization itself, past the share live records may take by default (0.9 of the
  // room outside the reserve); a memory store never reopens after a crash.
  const log = await GrassLog.create(store, { policy, cleanStartSlackSegments: 2, cleanBatchFreeSegments: 2, cleanerBatchSegments: 4, maxLiveShare: 1 });
  const rng = new Rng(o.seed);
  const data = rng.bytes(RECORD);
  const started = Date.now();
  for (let a = 1; a <= n; a++) {
    data[0] = a & 255;
    await log.put(a, data);
  }
  const hot = Math.max(1, Math.floor(n / 10));
  const pick = (): number => {
    if (o.workload === 'uniform') return 1 + rng.int(n);
    return rng.chance(0.9) ? 1 + rng.int(hot) : 1 + hot + rng.int(n - hot);
  };
  const total = Math.floor((o.capacityMultiple * capacity) / RECORD);
  const s0 = log.stats();
  let mid = s0;
  const t0 = Date.now();
  for (let k = 0; k < total; k++) {
    await log.put(pick(), data);
    if (k === Math.floor(total / 2)) mid = log.stats();
    if (progress && k % 200000 === 0 && k > 0) {
      const s = log.stats();
      progress(`${((k / total) * 100).toFixed(0)}%: WA so far ${((s.userBytes - s0.userBytes + s.cleanerBytes - s0.cleanerBytes) / (s.userBytes - s0.userBytes)).toFixed(3)}`);
    }
  }
  const end = log.stats();
  const seconds = (Date.now() - t0) / 1000;
  const wa = (a: typeof s0, b: typeof s0): number => (b.userBytes - a.userBytes + b.cleanerBytes - a.cleanerBytes) / (b.userBytes - a.userBytes);
  await log.close();
  return {
    workload: o.workload,
    policy: o.policy,
    utilization: o.utilization,
    payloadUtilization: (n * RECORD) / capacity,
    segmentBytes: o.segmentBytes,
    segmentCount: o.segmentCount,
    liveRecords: n,
    writeAmplification: wa(mid, end),
    writeAmplificationAll: wa(s0, end),
    checkpointBytesPerUserByte: (end.checkpointBytes - mid.checkpointBytes) / (end.userBytes - mid.userBytes),
    userMBps: (end.userBytes - s0.userBytes) / 1e6 / seconds,
    segmentsCleaned: end.segmentsCleaned - s0.segmentsCleaned,
    seconds: (Date.now() - started) / 1000,
    seed: o.seed,
  };
}

export interface ThroughputBenchResult {
  dir: string;
  bytes: number;
  recordsPerFlush: number;
  grassMBps: number;
  fioMBps: number | undefined;
  ratio: number | undefined;
  fioCommand: string | undefined;
}

/** 4 KiB puts, a flush every `perFlush`, on the file store; fio's sequential write beside it. */
export async function benchThroughput(o: { dir?: string; bytes: number; perFlush: number; segmentBytes: number }): Promise<ThroughputBenchResult> {
  const dir = await mkdtemp(join(o.dir ?? tmpdir(), 'pasture-bench-'));
  try {
    const segmentCount = Math.ceil((o.bytes * 1.5) / o.segmentBytes) + 32;
    const store = await FileSegmentStore.create(join(dir, 'store'), { segmentBytes: o.segmentBytes, segmentCount });
    const g = await GrassLog.create(store, { checkpointIntervalBytes: 2 * o.bytes });
    const data = new Rng(1).bytes(RECORD);
    const n = Math.floor(o.bytes / RECORD);
    const t0 = process.hrtime.bigint();
    for (let i = 1; i <= n; i++) {
      await g.put(i, data);
      if (i % o.perFlush === 0) await g.flush();
    }
    await g.flush();
    const grassSeconds = Number(process.hrtime.bigint() - t0) / 1e9;
    await g.close();
    const fio = await fioSeqWrite(dir, o.bytes);
    const grassMBps = (n * RECORD) / 1e6 / grassSeconds;
    return {
      dir: o.dir ?? tmpdir(), bytes: n * RECORD, recordsPerFlush: o.perFlush, grassMBps,
      fioMBps: fio?.mbps, ratio: fio === undefined ? undefined : grassMBps / fio.mbps, fioCommand: fio?.command,
    };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

async function fioSeqWrite(dir: string, bytes: number): Promise<{ mbps: number; command: string } | undefined> {
  const args = ['--name=seqwrite', `--filename=${join(dir, 'fio.dat')}`, '--rw=write', '--bs=1M', `--size=${Math.ceil(bytes / (1 << 20))}M`, '--ioengine=psync', '--end_fsync=1', '--output-format=json'];
  try {
    const { stdout } = await promisify(execFile)('fio', args, { maxBuffer: 16 << 20 });
    const j = JSON.parse(stdout) as { jobs: { write: { bw_bytes: number } }[] };
    return { mbps: j.jobs[0]!.write.bw_bytes / 1e6, command: `fio ${args.join(' ')}` };
  } catch {
    return undefined;
  }
}

export interface RecoveryBenchResult {
  logBytesSinceCheckpoint: number;
  reopenMillis: number;
  replayedRecords: number;
  segmentsReplayed: number;
}

/** Write `bytes` of log past the last checkpoint, stop without closing, time the reopen. */
export async function benchRecovery(o: { dir?: string; bytes: number; segmentBytes: number }): Promise<RecoveryBenchResult> {
  const dir = await mkdtemp(join(o.dir ?? tmpdir(), 'pasture-bench-'));
  try {
    const segmentCount = Math.ceil((o.bytes * 1.3) / o.segmentBytes) + 32;
    const path = join(dir, 'store');
    const store = await FileSegmentStore.create(path, { segmentBytes: o.segmentBytes, segmentCount });
    const g = await GrassLog.create(store, { checkpointIntervalBytes: 4 * o.bytes, backgroundCleaner: false });
    const data = new Rng(2).bytes(RECORD);
    const n = Math.floor(o.bytes / (RECORD + 36));
    for (let i = 1; i <= n; i++) {
      await g.put(i, data);
      if (i % 256 === 0) await g.flush();
    }
    await g.flush();
    const logBytes = g.stats().userBytes;
    // Unclean stop: the store is released without the closing checkpoint.
    await store.close();
    const t0 = process.hrtime.bigint();
    const g2 = await GrassLog.open(await FileSegmentStore.open(path), { backgroundCleaner: false });
    const reopenMillis = Number(process.hrtime.bigint() - t0) / 1e6;
    const rec = g2.recovery!;
    await g2.close();
    return { logBytesSinceCheckpoint: logBytes, reopenMillis, replayedRecords: rec.replayedRecords, segmentsReplayed: rec.streams.reduce((a, s) => a + s.segments, 0) };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

export interface MapMemoryResult {
  records: number;
  /** Growth of V8 heap + ArrayBuffers while the records were written, per record. */
  bytesPerRecord: number;
  /** Growth between half and all of the records, per record: excludes fixed costs (segment buffers). */
  marginalBytesPerRecord: number;
  /** The address map alone, filled with the same records, measured as heap + ArrayBuffers growth. */
  mapBytesPerRecord: number;
  /** The map's own typed arrays, per record. */
  mapArrayBytesPerRecord: number;
}

/**
 * Heap + ArrayBuffer bytes after a full GC. V8 releases ArrayBuffer backing stores after the
 * collection, so measure twice with a pause between: a single synchronous gc() counts buffers
 * that are already garbage (that read 26 B/record here where the truth was 16).
 */
async function measureMemory(): Promise<number> {
  const gc = (globalThis as { gc?: () => void }).gc;
  gc?.();
  await new Promise((r) => setTimeout(r, 200));
  gc?.();
  const m = process.memoryUsage();
  return m.heapUsed + m.arrayBuffers;
}

/** The address map alone with `records` dense addresses. */
async function mapOnly(records: number): Promise<number> {
  const before = await measureMemory();
  const m = new AddressMap();
  for (let i = 1; i <= records; i++) {
    m.set(i, 5, (i * 44) % 8000000, 8);
    m.noteUserWrite(i, i * 44);
  }
  const bytes = (await measureMemory()) - before;
  if (m.size !== records) throw new Error('map lost records');
  return bytes / records;
}

/** Put `records` small records on a file store and measure the memory that grew with them. */
export async function benchMapMemory(o: { dir?: string; records: number }): Promise<MapMemoryResult> {
  const dir = await mkdtemp(join(o.dir ?? tmpdir(), 'pasture-bench-'));
  try {
    const recordBytes = 8;
    const segmentBytes = 8 << 20;
    const segmentCount = Math.ceil((o.records * (recordBytes + 36) * 1.3) / segmentBytes) + 32;
    const store = await FileSegmentStore.create(join(dir, 'store'), { segmentBytes, segmentCount });
    const g = await GrassLog.create(store, { checkpointIntervalBytes: 1 << 40, backgroundCleaner: false });
    const mapBytesPerRecord = await mapOnly(o.records);
    const before = await measureMemory();
    const data = new Uint8Array(recordBytes);
    const half = Math.floor(o.records / 2);
    let atHalf = 0;
    for (let i = 1; i <= o.records; i++) {
      data[0] = i & 255;
      await g.put(i, data);
      if (i % 4096 === 0) await g.flush();
      if (i === half) {
        await g.flush();
        atHalf = await measureMemory();
      }
    }
    await g.flush();
    const after = await measureMemory();
    const st = g.stats();
    await g.close();
    return { records: o.records, bytesPerRecord: (after - before) / o.records, marginalBytesPerRecord: (after - atHalf) / (o.records - half), mapBytesPerRecord, mapArrayBytesPerRecord: st.mapMemoryBytes / st.liveRecords };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

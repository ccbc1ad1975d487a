/**
 * Cow benchmarks: programs that print figures (`pnpm pasture bench cow`), never timed tests.
 * - copy: BLOCK-COPY of fully mapped ranges of 2^16, 2^20 and 2^24 blocks; time and Grass
 *   records written should stay flat as the range grows.
 * - overwrite: 4 KiB random overwrites of incompressible data through Cow, against Grass alone
 *   on the same kind of store in the same run.
 * - image: an ext4 image of a real directory tree (mke2fs -d) written through Cow; physical
 *   bytes against logical, and the image read back and compared.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtemp, open, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { FileSegmentStore, GrassLog, MemorySegmentStore, Rng, type SegmentStore } from '@pasture/grass';
import { BLOCK_BYTES } from './codec.ts';
import { CowStore } from './cow.ts';

const run = promisify(execFile);

function seconds(t0: bigint): number {
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

// ---------------------------------------------------------------------------------------------
// BLOCK-COPY
// ---------------------------------------------------------------------------------------------

export interface CopyBenchResult {
  rows: { blocks: number; millis: number; grassRecords: number; grassBytes: number }[];
  /** Largest over smallest median time, and the same for records written. */
  timeRatio: number;
  recordRatio: number;
  repeats: number;
}

/**
 * Map 2^16 blocks for real (a distinct compressible block each), double that by copies up to
 * 2^24 (so every range is fully mapped), then time copies of each range size to fresh places.
 */
export async function benchCopy(o: { repeats: number }, progress: (l: string) => void = () => undefined): Promise<CopyBenchResult> {
  const store = new MemorySegmentStore(1 << 20, 1024);
  const cow = await CowStore.create(await GrassLog.create(store, {}), { backgroundReaper: false });
  try {
    const base = 1n << 40n;
    const block = new Uint8Array(BLOCK_BYTES);
    const view = new DataView(block.buffer);
    for (let i = 0; i < 1 << 16; i += 256) {
      await cow.transaction(async (tx) => {
        for (let j = i; j < i + 256; j++) {
          view.setUint32(0, j + 1, true);
          await tx.write(base + BigInt(j), block);
        }
      });
    }
    for (let size = 1n << 16n; size < 1n << 24n; size *= 2n) await cow.copy(base, base + size, size);
    const s = await cow.scan();
    if (s.mappedBlocks !== 1 << 24) throw new Error(`expected 2^24 mapped blocks, found ${s.mappedBlocks}`);
    progress(`source: ${s.mappedBlocks} blocks mapped, ${s.nodes} distinct nodes`);
    const rows: CopyBenchResult['rows'] = [];
    let dst = 1n << 100n;
    for (const bits of [16, 20, 24]) {
      const n = 1n << BigInt(bits);
      const times: number[] = [];
      const records: number[] = [];
      const bytes: number[] = [];
      for (let r = 0; r < o.repeats; r++) {
        const before = cow.grass.stats();
        const t0 = process.hrtime.bigint();
        await cow.copy(base, dst, n);
        await cow.flush();
        times.push(seconds(t0) * 1000);
        const after = cow.grass.stats();
        records.push(after.userRecords - before.userRecords);
        bytes.push(after.userBytes - before.userBytes);
        dst += 1n << 32n;
      }
      rows.push({ blocks: Number(n), millis: median(times), grassRecords: median(records), grassBytes: median(bytes) });
      progress(`copy 2^${bits} blocks: ${median(times).toFixed(2)} ms, ${median(records)} Grass records`);
    }
    const first = rows[0]!;
    const last = rows[rows.length - 1]!;
    return { rows, timeRatio: last.millis / first.millis, recordRatio: last.grassRecords / first.grassRecords, repeats: o.repeats };
  } finally {
    await cow.close();
  }
}

// ---------------------------------------------------------------------------------------------
// Random overwrite
// ---------------------------------------------------------------------------------------------

export interface OverwriteBenchResult {
  blocks: number;
  writes: number;
  perFlush: number;
  rounds: number;
  /** Medians over the rounds (Grass and Cow alternate, each on a fresh store). */
  grassMBps: number;
  cowMBps: number;
  ratio: number;
  grassRuns: number[];
  cowRuns: number[];
  cowCompressionRatio: number;
}

async function fileStore(dir: string, name: string, bytes: number): Promise<SegmentStore> {
  const segmentBytes = 8 << 20;
  return FileSegmentStore.create(join(dir, name), { segmentBytes, segmentCount: Math.ceil((bytes * 2.5) / segmentBytes) + 16 });
}

/**
 * Prefill `blocks` incompressible blocks, then overwrite random ones, flushing every
 * `perFlush`: once through Grass alone (records at gaddrs 1..blocks) and once through Cow
 * (blocks 0..blocks-1 of its space), the same sequence, alternating over `rounds`.
 */
export async function benchOverwrite(o: { dir?: string; blocks: number; writes: number; perFlush: number; rounds: number }): Promise<OverwriteBenchResult> {
  const pool = Array.from({ length: 256 }, (_, i) => new Rng(1000 + i).bytes(BLOCK_BYTES));
  const mb = (o.writes * BLOCK_BYTES) / 1e6;
  let compression = 0;
  const grassRound = async (dir: string): Promise<number> => {
    const g = await GrassLog.create(await fileStore(dir, 'grass', o.blocks * BLOCK_BYTES), {});
    for (let i = 0; i < o.blocks; i += 256) await g.batch(Array.from({ length: Math.min(256, o.blocks - i) }, (_, j) => ({ op: 'put' as const, gaddr: 1 + i + j, data: pool[j]! })));
    await g.flush();
    const rng = new Rng(7);
    const t0 = process.hrtime.bigint();
    for (let i = 1; i <= o.writes; i++) {
      await g.put(1 + rng.int(o.blocks), pool[i & 255]!);
      if (i % o.perFlush === 0) await g.flush();
    }
    await g.flush();
    const s = seconds(t0);
    await g.close();
    return mb / s;
  };
  const cowRound = async (dir: string): Promise<number> => {
    const cow = await CowStore.create(await GrassLog.create(await fileStore(dir, 'cow', o.blocks * BLOCK_BYTES), {}), {});
    for (let i = 0; i < o.blocks; i += 256) {
      await cow.transaction(async (tx) => {
        for (let j = i; j < Math.min(o.blocks, i + 256); j++) await tx.write(BigInt(j), pool[j & 255]!);
      });
    }
    await cow.flush();
    const rng = new Rng(7);
    const t0 = process.hrtime.bigint();
    for (let i = 1; i <= o.writes; i++) {
      await cow.write(BigInt(rng.int(o.blocks)), pool[i & 255]!);
      if (i % o.perFlush === 0) await cow.flush();
    }
    await cow.flush();
    const s = seconds(t0);
    compression = cow.stats().compressionRatio;
    await cow.close();
    return mb / s;
  };
  const grassRuns: number[] = [];
  const cowRuns: number[] = [];
  for (let r = 0; r < o.rounds; r++) {
    for (const which of r % 2 === 0 ? ['grass', 'cow'] : ['cow', 'grass']) {
      const dir = await mkdtemp(join(o.dir ?? tmpdir(), 'pasture-bench-'));
      try {
        if (which === 'grass') grassRuns.push(await grassRound(dir));
        else cowRuns.push(await cowRound(dir));
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    }
  }
  const grassMBps = median(grassRuns);
  const cowMBps = median(cowRuns);
  return { blocks: o.blocks, writes: o.writes, perFlush: o.perFlush, rounds: o.rounds, grassMBps, cowMBps, ratio: cowMBps / grassMBps, grassRuns, cowRuns, cowCompressionRatio: compression };
}

// ---------------------------------------------------------------------------------------------
// ext4 image
// ---------------------------------------------------------------------------------------------

export interface ImageBenchResult {
  tree: string;
  imageBytes: number;
  nonZeroBlocks: number;
  physicalBytes: number;
  dataBytes: number;
  metaBytes: number;
  /** Physical over the image's size (what the device holds), and over its non-zero blocks. */
  physicalOverLogical: number;
  physicalOverNonZero: number;
  compressionRatio: number;
  writeMBps: number;
  readBackIdentical: boolean;
}

/** Make an ext4 image of `tree` with mke2fs -d, sized to the tree's disk usage plus 25% and 32 MiB, and write it through Cow. */
export async function benchImage(o: { tree: string; dir?: string }): Promise<ImageBenchResult> {
  const dir = await mkdtemp(join(o.dir ?? tmpdir(), 'pasture-bench-'));
  try {
    // Disk usage (whole blocks per file), plus room for inodes and the journal.
    const { stdout } = await run('du', ['-sk', o.tree]);
    const treeKiB = Number(stdout.split(/\s/)[0]);
    const image = join(dir, 'tree.ext4');
    const sizeMiB = Math.ceil((treeKiB * 1.25) / 1024) + 32;
    await run('mke2fs', ['-q', '-F', '-t', 'ext4', '-b', '4096', '-d', o.tree, image, `${sizeMiB}M`], { env: { ...process.env, E2FSPROGS_FAKE_TIME: '1' } });
    const imageBytes = (await stat(image)).size;
    const cow = await CowStore.create(await GrassLog.create(await fileStore(dir, 'cow', imageBytes), {}), {});
    const fh = await open(image, 'r');
    const blocks = imageBytes / BLOCK_BYTES;
    const want = createHash('sha256');
    const chunk = Buffer.alloc(256 * BLOCK_BYTES);
    const t0 = process.hrtime.bigint();
    for (let b = 0; b < blocks; b += 256) {
      const n = Math.min(256, blocks - b);
      await fh.read(chunk, 0, n * BLOCK_BYTES, b * BLOCK_BYTES);
      want.update(chunk.subarray(0, n * BLOCK_BYTES));
      await cow.transaction(async (tx) => {
        for (let i = 0; i < n; i++) await tx.write(BigInt(b + i), chunk.subarray(i * BLOCK_BYTES, (i + 1) * BLOCK_BYTES));
      });
    }
    await cow.flush();
    const writeSeconds = seconds(t0);
    await fh.close();
    const got = createHash('sha256');
    const zero = new Uint8Array(BLOCK_BYTES);
    let nonZero = 0;
    for (let b = 0; b < blocks; b++) {
      const blk = await cow.read(BigInt(b));
      if (blk !== undefined) nonZero++;
      got.update(blk ?? zero);
    }
    const s = cow.stats();
    await cow.close();
    return {
      tree: o.tree, imageBytes, nonZeroBlocks: nonZero, physicalBytes: s.physicalBytes, dataBytes: s.dataBytes, metaBytes: s.metaBytes,
      physicalOverLogical: s.physicalBytes / imageBytes, physicalOverNonZero: s.physicalBytes / (nonZero * BLOCK_BYTES),
      compressionRatio: s.compressionRatio, writeMBps: imageBytes / 1e6 / writeSeconds, readBackIdentical: got.digest('hex') === want.digest('hex'),
    };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

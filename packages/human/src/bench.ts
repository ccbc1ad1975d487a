/**
 * Human benchmarks: programs that print figures (`pnpm pasture bench human`).
 * - snapshot: creation time of a snapshot of a volume with 1 GiB and with 16 GiB written.
 * - clone-reads: 4 KiB random reads on a clone 32 levels deep against the original volume.
 * - import: a 1 GiB raw image imported (and flushed) against `cp` of it (and `sync` of the copy).
 */
import { execFile } from 'node:child_process';
import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { FileSegmentStore, GrassLog, Rng } from '@pasture/grass';
import { BLOCK_BYTES } from './layout.ts';
import { Pool } from './pool.ts';
import { importImage } from './transfer.ts';

const run = promisify(execFile);

function ms(t0: bigint): number {
  return Number(process.hrtime.bigint() - t0) / 1e6;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

async function filePool(dir: string, bytes: number): Promise<Pool> {
  const segmentBytes = 8 << 20;
  const store = await FileSegmentStore.create(join(dir, 'pool'), { segmentBytes, segmentCount: Math.ceil((bytes * 2) / segmentBytes) + 64 });
  return Pool.create(await GrassLog.create(store, {}));
}

/** Compressible 1 MiB chunks, distinct per offset (so no two blocks are equal). */
function chunk(i: number): Uint8Array {
  const b = new Uint8Array(1 << 20);
  const v = new DataView(b.buffer);
  for (let o = 0; o < b.length; o += BLOCK_BYTES) {
    v.setFloat64(o, i * 256 + o / BLOCK_BYTES, true);
    b.fill((i + o) & 255, o + 8, o + 64);
  }
  return b;
}

export interface SnapshotBenchResult {
  rows: { writtenGiB: number; writeSeconds: number; snapshotMillis: number; repeats: number }[];
}

export async function benchSnapshot(o: { dir?: string; sizesGiB: number[]; repeats: number }, progress: (l: string) => void = () => undefined): Promise<SnapshotBenchResult> {
  const rows: SnapshotBenchResult['rows'] = [];
  for (const gib of o.sizesGiB) {
    const dir = await mkdtemp(join(o.dir ?? tmpdir(), 'pasture-bench-'));
    try {
      const pool = await filePool(dir, gib * 2 ** 30 / 8); // compressible data: ~1/8 physical at most
      await pool.createVolume('vol', gib * 2 ** 30);
      const img = await pool.openImage('vol');
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < gib * 1024; i++) await img.write(i * (1 << 20), chunk(i));
      await img.flush();
      const writeSeconds = ms(t0) / 1000;
      progress(`wrote ${gib} GiB in ${writeSeconds.toFixed(1)} s`);
      // A snapshot is durable when createSnapshot returns (it flushes), so the time includes
      // that flush, and the flush of the write made just before it.
      const times: number[] = [];
      for (let r = 0; r < o.repeats; r++) {
        await img.write(r * 4096, chunk(999999 + r).subarray(0, 4096)); // a write between snapshots
        const t = process.hrtime.bigint();
        await pool.createSnapshot('vol', `s${r}`);
        times.push(ms(t));
      }
      await img.close();
      await pool.close();
      rows.push({ writtenGiB: gib, writeSeconds, snapshotMillis: median(times), repeats: o.repeats });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }
  return { rows };
}

export interface CloneReadBenchResult {
  volumeBytes: number;
  depth: number;
  reads: number;
  rounds: number;
  originalReadsPerSecond: number;
  cloneReadsPerSecond: number;
  ratio: number;
}

export async function benchCloneReads(o: { dir?: string; volumeMiB: number; depth: number; reads: number; rounds: number }): Promise<CloneReadBenchResult> {
  const dir = await mkdtemp(join(o.dir ?? tmpdir(), 'pasture-bench-'));
  try {
    const bytes = o.volumeMiB << 20;
    const pool = await filePool(dir, bytes * 2);
    await pool.createVolume('v0', bytes);
    const base = await pool.openImage('v0');
    const rnd = new Rng(5);
    for (let i = 0; i < o.volumeMiB; i++) await base.write(i << 20, rnd.bytes(1 << 20));
    await base.flush();
    // A chain: each level snapshots the one before, clones it and writes a little.
    let top = 'v0';
    for (let d = 1; d <= o.depth; d++) {
      await pool.createSnapshot(top, 's');
      await pool.clone(`${top}@s`, `v${d}`);
      const img = await pool.openImage(`v${d}`);
      for (let k = 0; k < 16; k++) await img.write(rnd.int(bytes / 4096) * 4096, rnd.bytes(4096));
      await img.close();
      top = `v${d}`;
    }
    await pool.flush();
    const deep = await pool.openImage(top);
    const timeReads = async (img: typeof base): Promise<number> => {
      const r = new Rng(11);
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < o.reads; i++) await img.read(r.int(bytes / 4096) * 4096, 4096);
      return o.reads / (ms(t0) / 1000);
    };
    const orig: number[] = [];
    const clone: number[] = [];
    for (let r = 0; r < o.rounds; r++) {
      if (r % 2 === 0) {
        orig.push(await timeReads(base));
        clone.push(await timeReads(deep));
      } else {
        clone.push(await timeReads(deep));
        orig.push(await timeReads(base));
      }
    }
    await base.close();
    await deep.close();
    await pool.close();
    return { volumeBytes: bytes, depth: o.depth, reads: o.reads, rounds: o.rounds, originalReadsPerSecond: median(orig), cloneReadsPerSecond: median(clone), ratio: median(clone) / median(orig) };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

export interface ImportBenchResult {
  bytes: number;
  rounds: number;
  importMBps: number;
  cpMBps: number;
  ratio: number;
  content: string;
}

/**
 * A raw image of `gib` GiB (a quarter each: random, text-like, a repeating pattern, zeros),
 * imported into a fresh pool and flushed, against `cp` of the file followed by `sync` of the
 * copy, alternating over `rounds`.
 */
export async function benchImport(o: { dir?: string; gib: number; rounds: number }): Promise<ImportBenchResult> {
  const dir = await mkdtemp(join(o.dir ?? tmpdir(), 'pasture-bench-'));
  try {
    const bytes = o.gib * 2 ** 30;
    const src = join(dir, 'image.raw');
    const fh = await open(src, 'w');
    const rnd = new Rng(3);
    const words = new TextEncoder().encode('the quick brown fox jumps over the lazy dog; storage engineers measure write amplification. ');
    for (let off = 0, i = 0; off < bytes; off += 1 << 20, i++) {
      let b: Uint8Array;
      switch (i % 4) {
        case 0:
          b = rnd.bytes(1 << 20);
          break;
        case 1:
          b = new Uint8Array(1 << 20);
          for (let k = 0; k < b.length; k++) b[k] = words[(k * 7 + (k >> 9)) % words.length]!;
          break;
        case 2:
          b = chunk(i);
          break;
        default:
          b = new Uint8Array(1 << 20);
      }
      await fh.write(b, 0, b.length, off);
    }
    await fh.sync();
    await fh.close();
    const imp: number[] = [];
    const cp: number[] = [];
    for (let r = 0; r < o.rounds; r++) {
      const order = r % 2 === 0 ? ['import', 'cp'] : ['cp', 'import'];
      for (const which of order) {
        const work = await mkdtemp(join(dir, 'round-'));
        try {
          if (which === 'cp') {
            const t0 = process.hrtime.bigint();
            await run('cp', [src, join(work, 'copy.raw')]);
            await run('sync', [join(work, 'copy.raw')]);
            cp.push(bytes / 1e6 / (ms(t0) / 1000));
          } else {
            const pool = await filePool(work, bytes);
            const t0 = process.hrtime.bigint();
            await importImage(pool, src, 'disk');
            imp.push(bytes / 1e6 / (ms(t0) / 1000));
            await pool.close();
          }
        } finally {
          await rm(work, { recursive: true, force: true });
        }
      }
    }
    return { bytes, rounds: o.rounds, importMBps: median(imp), cpMBps: median(cp), ratio: median(imp) / median(cp), content: 'quarters: random, text, patterned, zeros (1 MiB stripes)' };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

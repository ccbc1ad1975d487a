/**
 * Import and export between a raw image file and a volume, sparse-aware on both sides:
 * import skips all-zero blocks (they are holes in Cow anyway), export writes only the
 * allocated extents into a file truncated to the volume's size, so holes stay holes.
 */
import { open, stat } from 'node:fs/promises';
import { isZeroBlock } from '@pasture/cow';
import type { Image } from './image.ts';
import { BLOCK_BYTES } from './layout.ts';
import type { Pool } from './pool.ts';

const CHUNK_BYTES = 1 << 20;

export interface TransferResult {
  bytes: number;
  /** Bytes that held data (the rest were holes or zeros). */
  dataBytes: number;
  seconds: number;
}

/** Create volume `name` sized to the file (rounded up to 4 KiB) and copy the file into it. */
export async function importImage(pool: Pool, file: string, name: string, progress?: (done: number, total: number) => void): Promise<TransferResult> {
  const size = (await stat(file)).size;
  const t0 = process.hrtime.bigint();
  await pool.createVolume(name, Math.ceil(size / BLOCK_BYTES) * BLOCK_BYTES);
  let dataBytes = 0;
  try {
    dataBytes = await copyInto(pool, name, file, size, progress);
  } catch (e) {
    // Half an image must not pass for a whole one: the new volume goes (if the pool still can).
    await pool.removeVolume(name).catch(() => undefined);
    throw e;
  }
  return { bytes: size, dataBytes, seconds: Number(process.hrtime.bigint() - t0) / 1e9 };
}

/** importImage's copy of `file` into the new volume `name`; returns the bytes of data written. */
async function copyInto(pool: Pool, name: string, file: string, size: number, progress?: (done: number, total: number) => void): Promise<number> {
  const img = await pool.openImage(name);
  let dataBytes = 0;
  let fh;
  try {
    fh = await open(file, 'r');
    const buf = Buffer.alloc(CHUNK_BYTES);
    for (let off = 0; off < size; off += CHUNK_BYTES) {
      const n = Math.min(CHUNK_BYTES, size - off);
      const { bytesRead } = await fh.read(buf, 0, n, off);
      if (bytesRead !== n) throw new Error(`short read of ${file} at ${off}`);
      // Write runs of non-zero blocks; a partial last block is padded with zeros.
      let runStart = -1;
      const blocks = Math.ceil(n / BLOCK_BYTES);
      for (let k = 0; k <= blocks; k++) {
        const b = k * BLOCK_BYTES;
        const end = Math.min(b + BLOCK_BYTES, n);
        let zero = k === blocks; // a sentinel that ends the last run
        if (!zero) {
          const blk = end - b === BLOCK_BYTES ? buf.subarray(b, end) : Buffer.concat([buf.subarray(b, end), Buffer.alloc(BLOCK_BYTES - (end - b))]);
          zero = isZeroBlock(blk);
        }
        if (!zero && runStart < 0) runStart = b;
        if (zero && runStart >= 0) {
          const stop = Math.min(b, n);
          await img.write(off + runStart, buf.subarray(runStart, stop));
          dataBytes += stop - runStart;
          runStart = -1;
        }
      }
      progress?.(off + n, size);
    }
    await img.flush();
  } finally {
    await fh?.close();
    await img.close();
  }
  return dataBytes;
}

/** Write `spec` (a volume or snapshot) to `file`: data extents only, holes left as holes. */
export async function exportImage(pool: Pool, spec: string, file: string, progress?: (done: number, total: number) => void): Promise<TransferResult> {
  const t0 = process.hrtime.bigint();
  const img: Image = await pool.openImage(spec);
  const size = img.size;
  const fh = await open(file, 'w');
  let dataBytes = 0;
  try {
    await fh.truncate(size);
    let pos = 0;
    while (pos < size) {
      const window = Math.min(size - pos, 64 * CHUNK_BYTES);
      const status = await img.blockStatus(pos, window);
      let reached = pos;
      for (const s of status) {
        if (s.allocated) {
          for (let o = s.offset; o < s.offset + s.length; o += CHUNK_BYTES) {
            const n = Math.min(CHUNK_BYTES, s.offset + s.length - o);
            const data = await img.read(o, n);
            await fh.write(data, 0, n, o);
            dataBytes += n;
          }
        }
        reached = s.offset + s.length;
      }
      pos = Math.max(reached, pos + 1);
      progress?.(pos, size);
    }
    await fh.sync();
  } finally {
    await fh.close();
    await img.close();
  }
  return { bytes: size, dataBytes, seconds: Number(process.hrtime.bigint() - t0) / 1e9 };
}

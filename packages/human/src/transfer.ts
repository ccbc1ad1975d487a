/**
 * Import and export between a raw image file and a volume, sparse-aware on both sides:
 * import skips all-zero blocks (they are holes in Cow anyway), export writes only the
 * allocated extents into a file truncated to the volume's size, so holes stay holes.
 */
import type { Stats } from 'node:fs';
import { open, stat, type FileHandle } from 'node:fs/promises';
import { isZeroBlock } from '@pasture/cow';
import type { Image } from './image.ts';
import { InvalidArgumentError } from './errors.ts';
import { BLOCK_BYTES } from './layout.ts';
import type { Pool } from './pool.ts';

const CHUNK_BYTES = 1 << 20;

export interface TransferResult {
  bytes: number;
  /** Bytes that held data (the rest were holes or zeros). */
  dataBytes: number;
  seconds: number;
}

/**
 * Only regular files: a pipe, socket or device has no size to make the volume with (stat says
 * 0), and a device would keep its old bytes where the volume has holes. nbdcopy or qemu-img
 * convert to or from the NBD export does those.
 */
function checkRegular(st: Stats, file: string): void {
  if (st.isFile()) return;
  const what = st.isBlockDevice() ? 'a block device' : st.isCharacterDevice() ? 'a character device' : st.isFIFO() ? 'a pipe' : st.isDirectory() ? 'a directory' : 'not a regular file';
  throw new InvalidArgumentError(`${file} is ${what}: import and export take regular files (for devices and pipes, serve the pool and use nbdcopy or qemu-img convert with the NBD export)`);
}

/**
 * Create volume `name` sized to the file (rounded up to 4 KiB) and copy the file into it. The
 * volume is marked incomplete until the copy is flushed: a crash before then leaves nothing
 * that passes for the whole image (the pool removes it when it opens).
 */
export async function importImage(pool: Pool, file: string, name: string, progress?: (done: number, total: number) => void): Promise<TransferResult> {
  const st = await stat(file);
  checkRegular(st, file);
  const size = st.size;
  const t0 = process.hrtime.bigint();
  const vol = await pool.createVolume(name, Math.ceil(size / BLOCK_BYTES) * BLOCK_BYTES, { incomplete: true });
  let dataBytes = 0;
  try {
    dataBytes = await copyInto(pool, name, file, size, progress);
    await pool.markComplete(vol.id);
  } catch (e) {
    // Half an image must not pass for a whole one: the new volume goes (if the pool still can;
    // else the next open removes it, as it is still marked incomplete).
    await pool.removeIncomplete(vol.id).catch(() => undefined);
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
  const existing = await stat(file).catch(() => undefined);
  if (existing !== undefined) checkRegular(existing, file);
  const img: Image = await pool.openImage(spec);
  const size = img.size;
  let fh: FileHandle | undefined;
  let dataBytes = 0;
  try {
    fh = await open(file, 'w');
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
    await fh?.close();
    await img.close();
  }
  return { bytes: size, dataBytes, seconds: Number(process.hrtime.bigint() - t0) / 1e9 };
}

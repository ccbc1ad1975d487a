/**
 * LocalReads: positioned reads of a local file, as the segment stores that keep segments in
 * local files make them (the file store; the S3 store's journal and cache).
 *
 * Small reads (a record) are positioned reads on the event loop's thread, as LevelDB's Env
 * does them: from the page cache that takes ~2 us, against ~20-50 us for a trip through
 * libuv's thread pool, and it was most of the cost of reading a block. But a read that misses
 * the cache blocks the event loop for a device read, one at a time whatever the queue depth
 * (and the VM this was measured on drops page cache even with memory free). So a synchronous
 * read that was slow sends the next ASYNC_READS_AFTER_SLOW small reads through the thread
 * pool, where misses overlap, before a synchronous read is tried again: misses come in runs (a
 * cold volume, a scan), and a run of hits pays the pool's cost for at most that many reads.
 * Large reads (the cleaner, recovery, uploads) always go through the pool.
 */
import { readSync } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';

/** Reads up to this size may be synchronous. */
export const SYNC_READ_BYTES_MAX = 64 * 1024;
/** PASTURE_SYNC_READS=0 sends every read through libuv's thread pool (for comparisons). */
const SYNC_READS = process.env.PASTURE_SYNC_READS !== '0';
/**
 * A synchronous read slower than this went to the device, not the page cache (a hit of up to
 * 64 KiB takes 2-10 us; a device read here took 165 us).
 */
const SLOW_SYNC_READ_US = 60;
/** After a slow synchronous read, this many small reads go through the thread pool. */
const ASYNC_READS_AFTER_SLOW = 256;

export class LocalReads {
  /** Small reads still to send through the thread pool after a slow synchronous one. */
  private asyncReadsLeft = 0;
  /** Small reads made each way, and the synchronous ones that were slow (misses). */
  readonly counters = { sync: 0, slowSync: 0, async: 0 };
  /** See SLOW_SYNC_READ_US; a test sets 0 to make every synchronous read count as slow. */
  slowSyncReadMicros = SLOW_SYNC_READ_US;

  /** Fill `buf` from `fh` at `position`; bytes past the end of the file read as zeros. */
  async read(fh: FileHandle, buf: Buffer, position: number): Promise<Buffer> {
    const length = buf.length;
    let done = 0;
    const small = length <= SYNC_READ_BYTES_MAX;
    if (small && SYNC_READS && this.asyncReadsLeft === 0) {
      this.counters.sync++;
      const t0 = performance.now();
      while (done < length) {
        const n = readSync(fh.fd, buf, done, length - done, position + done);
        if (n === 0) break;
        done += n;
      }
      if ((performance.now() - t0) * 1000 >= this.slowSyncReadMicros) {
        this.counters.slowSync++;
        this.asyncReadsLeft = ASYNC_READS_AFTER_SLOW;
      }
      return buf.fill(0, done);
    }
    if (small) {
      this.counters.async++;
      if (this.asyncReadsLeft > 0) this.asyncReadsLeft--;
    }
    while (done < length) {
      const { bytesRead } = await fh.read(buf, done, length - done, position + done);
      if (bytesRead === 0) break;
      done += bytesRead;
    }
    return buf.fill(0, done);
  }
}

/**
 * A sparse BlockDevice in memory, in 64 KiB chunks: a chunk exists only once something other
 * than a trim or a hole-punching zero touched it, so block status reports real holes. For
 * tests and research; flush is a no-op (memory is as durable as it gets here). Safe to share
 * between connections (it has no cache, so multiConn is honest).
 */
import type { BlockDevice } from './device.ts';

export const MEMORY_CHUNK_BYTES = 64 * 1024;

export interface MemoryDeviceOptions {
  size: number;
  readOnly?: boolean;
  multiConn?: boolean;
  blockSize?: { minimum: number; preferred: number; maximum: number };
}

export class MemoryDevice implements BlockDevice {
  readonly size: number;
  readonly readOnly: boolean;
  readonly multiConn: boolean;
  /** Zeroing drops chunks: cheaper than writing. */
  readonly fastZero = true;
  readonly blockSize?: { minimum: number; preferred: number; maximum: number };
  private readonly chunks = new Map<number, Uint8Array>();
  /** Calls by kind, for tests. */
  readonly calls = { read: 0, write: 0, flush: 0, trim: 0, zero: 0, blockStatus: 0, cache: 0 };

  constructor(o: MemoryDeviceOptions) {
    if (!Number.isSafeInteger(o.size) || o.size < 0) throw new RangeError(`MemoryDevice size must be a safe non-negative integer, got ${o.size}`);
    this.size = o.size;
    this.readOnly = o.readOnly ?? false;
    this.multiConn = o.multiConn ?? true;
    if (o.blockSize !== undefined) this.blockSize = o.blockSize;
  }

  /** Chunks allocated (64 KiB each). */
  get allocatedChunks(): number {
    return this.chunks.size;
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    this.calls.read++;
    this.check(offset, length);
    const out = new Uint8Array(length);
    this.each(offset, length, (index, within, at, n) => {
      const c = this.chunks.get(index);
      if (c !== undefined) out.set(c.subarray(within, within + n), at);
    });
    return out;
  }

  async write(offset: number, data: Uint8Array, _fua: boolean): Promise<void> {
    this.calls.write++;
    this.checkWritable(offset, data.length);
    this.each(offset, data.length, (index, within, at, n) => {
      this.chunk(index).set(data.subarray(at, at + n), within);
    });
  }

  async flush(): Promise<void> {
    this.calls.flush++;
  }

  async trim(offset: number, length: number, _fua: boolean): Promise<void> {
    this.calls.trim++;
    this.checkWritable(offset, length);
    this.clear(offset, length, false);
  }

  async zero(offset: number, length: number, flags: { fua: boolean; noHole: boolean }): Promise<void> {
    this.calls.zero++;
    this.checkWritable(offset, length);
    this.clear(offset, length, flags.noHole);
  }

  async blockStatus(offset: number, length: number): Promise<{ length: number; hole: boolean; zero: boolean }[]> {
    this.calls.blockStatus++;
    this.check(offset, length);
    const out: { length: number; hole: boolean; zero: boolean }[] = [];
    this.each(offset, length, (index, _within, _at, n) => {
      const hole = !this.chunks.has(index);
      const last = out[out.length - 1];
      if (last !== undefined && last.hole === hole) last.length += n;
      else out.push({ length: n, hole, zero: hole });
    });
    return out;
  }

  async cache(offset: number, length: number): Promise<void> {
    this.calls.cache++;
    this.check(offset, length);
  }

  /** Drop fully covered chunks (or, with `allocate`, replace them by zeroed ones); zero the partial ends. */
  private clear(offset: number, length: number, allocate: boolean): void {
    this.each(offset, length, (index, within, _at, n) => {
      if (n === MEMORY_CHUNK_BYTES) {
        if (allocate) this.chunks.set(index, new Uint8Array(MEMORY_CHUNK_BYTES));
        else this.chunks.delete(index);
        return;
      }
      const c = allocate ? this.chunk(index) : this.chunks.get(index);
      c?.fill(0, within, within + n);
    });
  }

  private chunk(index: number): Uint8Array {
    let c = this.chunks.get(index);
    if (c === undefined) {
      c = new Uint8Array(MEMORY_CHUNK_BYTES);
      this.chunks.set(index, c);
    }
    return c;
  }

  /** Call `f(chunk index, offset within chunk, offset within the range, bytes)` per chunk of the range. */
  private each(offset: number, length: number, f: (index: number, within: number, at: number, n: number) => void): void {
    let at = 0;
    while (at < length) {
      const pos = offset + at;
      const index = Math.floor(pos / MEMORY_CHUNK_BYTES);
      const within = pos - index * MEMORY_CHUNK_BYTES;
      const n = Math.min(MEMORY_CHUNK_BYTES - within, length - at);
      f(index, within, at, n);
      at += n;
    }
  }

  private check(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw Object.assign(new RangeError(`range ${offset}+${length} is outside the device (size ${this.size})`), { code: 'EINVAL' });
    }
  }

  private checkWritable(offset: number, length: number): void {
    if (this.readOnly) throw Object.assign(new Error('read-only device'), { code: 'EROFS' });
    this.check(offset, length);
  }
}

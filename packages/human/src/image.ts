/**
 * Image: an open volume (read-write) or snapshot (read-only), with byte-granular I/O on top
 * of Cow's 4 KiB blocks. Partial-block writes are read-modify-write inside one Cow
 * transaction, so every write lands whole or not at all; an all-zero block is a hole.
 *
 * Thread-safety: any number of calls may be in flight; Cow serializes what must be.
 */
import { MAX_WRITE_BLOCKS, type CowTransaction, type Extent } from '@pasture/cow';
import { ClosedError, InvalidArgumentError, ReadOnlyError } from './errors.ts';
import { BLOCK_BYTES, MAX_IO_BYTES, slotBase } from './layout.ts';
import type { Pool } from './pool.ts';

const B = BigInt(BLOCK_BYTES);

export interface ImageStat {
  name: string;
  /** `VOLUME` or `VOLUME@SNAPSHOT`. */
  spec: string;
  kind: 'volume' | 'snapshot';
  size: number;
  readOnly: boolean;
}

/** A run of bytes and whether it holds data (false: a hole, reads as zeros). */
export interface BlockStatus {
  offset: number;
  length: number;
  allocated: boolean;
}

/** One piece of an atomic multi-range write. */
export interface WriteRange {
  offset: number;
  data: Uint8Array;
}

export class Image {
  private closed = false;

  constructor(
    private readonly pool: Pool,
    readonly id: number,
    readonly spec: string,
    readonly readOnly: boolean,
  ) {
    this.base = slotBase(id);
  }

  private readonly base: bigint;

  /** Current size in bytes (a resize by someone else shows here at once). */
  get size(): number {
    return this.pool.imageSize(this.id);
  }

  stat(): ImageStat {
    this.checkOpen();
    const { kind, spec } = this.pool.imageNames(this.id);
    return { name: spec.split('@')[0]!, spec, kind, size: this.size, readOnly: this.readOnly };
  }


  private check(offset: number, length: number, write: boolean, limited = true): void {
    this.checkOpen();
    if (write && this.readOnly) throw new ReadOnlyError(`${this.spec} is a snapshot: read-only`);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) throw new InvalidArgumentError(`bad range: offset ${offset}, length ${length}`);
    if (limited && length > MAX_IO_BYTES) throw new InvalidArgumentError(`request of ${length} bytes exceeds the limit of ${MAX_IO_BYTES}`);
    const size = this.size;
    if (offset + length > size) throw new InvalidArgumentError(`range [${offset}, ${offset + length}) is past the end of ${this.spec} (${size} bytes)`);
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    this.check(offset, length, false);
    const cow = this.pool.cow;
    if (length === BLOCK_BYTES && offset % BLOCK_BYTES === 0) {
      return (await cow.read(this.base + BigInt(offset / BLOCK_BYTES))) ?? new Uint8Array(BLOCK_BYTES);
    }
    // The covering blocks in one walk of Cow's tree, then the bytes asked for.
    const first = Math.floor(offset / BLOCK_BYTES);
    const last = Math.ceil((offset + length) / BLOCK_BYTES);
    const blocks = new Uint8Array((last - first) * BLOCK_BYTES);
    await cow.readBlocks(this.base + BigInt(first), last - first, blocks);
    const out = offset === first * BLOCK_BYTES && length === blocks.length ? blocks : blocks.subarray(offset - first * BLOCK_BYTES, offset - first * BLOCK_BYTES + length);
    return out;
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    if (!(data instanceof Uint8Array)) throw new InvalidArgumentError('write data must be a Uint8Array');
    this.check(offset, data.length, true);
    if (data.length === 0) return;
    // Whole aligned blocks: Cow's writeBlocks has a fast path for unshared overwrites (one
    // Grass batch, no transaction), and is atomic after a crash either way.
    if (offset % BLOCK_BYTES === 0 && data.length % BLOCK_BYTES === 0) return this.pool.cow.writeBlocks(this.base + BigInt(offset / BLOCK_BYTES), data);
    await this.pool.cow.transaction((tx) => this.writeIn(tx, this.base, offset, data));
  }

  /** Write `data` at byte `offset` of the slot at `base`, read-modify-writing partial blocks. */
  private async writeIn(tx: CowTransaction, base: bigint, offset: number, data: Uint8Array): Promise<void> {
    let pos = offset;
    const end = offset + data.length;
    while (pos < end) {
      const blk = Math.floor(pos / BLOCK_BYTES);
      const within = pos - blk * BLOCK_BYTES;
      const n = Math.min(BLOCK_BYTES - within, end - pos);
      const addr = base + BigInt(blk);
      if (n === BLOCK_BYTES) {
        await tx.write(addr, data.subarray(pos - offset, pos - offset + n));
      } else {
        const block = (await tx.read(addr)) ?? new Uint8Array(BLOCK_BYTES);
        block.set(data.subarray(pos - offset, pos - offset + n), within);
        await tx.write(addr, block);
      }
      pos += n;
    }
  }

  /** Unmap whole blocks in the range and zero the partial ones at its edges. */
  async discard(offset: number, length: number): Promise<void> {
    this.check(offset, length, true, false); // any length: whole blocks are one trim
    if (length === 0) return;
    await this.pool.cow.transaction(async (tx) => {
      const end = offset + length;
      const first = Math.ceil(offset / BLOCK_BYTES);
      const last = Math.floor(end / BLOCK_BYTES);
      if (first < last) await tx.trim(this.base + BigInt(first), BigInt(last - first));
      const zeros = (from: number, to: number): Promise<void> => this.writeIn(tx, this.base, from, new Uint8Array(to - from));
      if (first > last) {
        await zeros(offset, end); // inside one block
      } else {
        if (offset < first * BLOCK_BYTES) await zeros(offset, first * BLOCK_BYTES);
        if (last * BLOCK_BYTES < end) await zeros(last * BLOCK_BYTES, end);
      }
    });
  }

  /**
   * Make the range read as zeros. Cow stores zero blocks as holes, so by default this is
   * discard. With `allocate` (NBD's NO_HOLE) the blocks stay mapped instead, each to a stored
   * zero block of a few bytes, so that block status reports them as data.
   */
  async writeZeroes(offset: number, length: number, options: { allocate?: boolean } = {}): Promise<void> {
    if (options.allocate !== true) return this.discard(offset, length);
    this.check(offset, length, true, false);
    if (length === 0) return;
    const end = offset + length;
    const first = Math.ceil(offset / BLOCK_BYTES);
    const last = Math.floor(end / BLOCK_BYTES);
    for (let b = first; b < last; b += MAX_WRITE_BLOCKS) {
      await this.pool.cow.allocateZeroes(this.base + BigInt(b), BigInt(Math.min(MAX_WRITE_BLOCKS, last - b)));
    }
    // A partial block at an edge: zero its part; one that is then all zeros stays mapped too.
    const edge = (from: number, to: number): Promise<void> => this.pool.cow.transaction(async (tx) => {
      const blk = Math.floor(from / BLOCK_BYTES);
      const addr = this.base + BigInt(blk);
      const block = (await tx.read(addr)) ?? new Uint8Array(BLOCK_BYTES);
      block.fill(0, from - blk * BLOCK_BYTES, to - blk * BLOCK_BYTES);
      if (block.every((x) => x === 0)) await tx.allocateZeroes(addr, 1n);
      else await tx.write(addr, block);
    });
    if (first > last) {
      await edge(offset, end); // inside one block
    } else {
      if (offset < first * BLOCK_BYTES) await edge(offset, first * BLOCK_BYTES);
      if (last * BLOCK_BYTES < end) await edge(last * BLOCK_BYTES, end);
    }
  }

  /**
   * Write several ranges so that after a crash either all of them or none are there, however
   * large: the data goes to a scratch slot at the same offsets first (many transactions),
   * then one transaction BLOCK-EXCHANGEs each block range into the volume. Small writes (up to
   * MAX_IO_BYTES in all) skip the scratch slot: one transaction is already atomic.
   */
  async writeAtomic(ranges: readonly WriteRange[]): Promise<void> {
    this.checkOpen();
    if (this.readOnly) throw new ReadOnlyError(`${this.spec} is a snapshot: read-only`);
    let total = 0;
    const size = this.size;
    for (const r of ranges) {
      if (!(r.data instanceof Uint8Array) || !Number.isSafeInteger(r.offset) || r.offset < 0 || r.offset + r.data.length > size) {
        throw new InvalidArgumentError(`atomic write range at ${r.offset} (${r.data?.length} bytes) is past the end of ${this.spec} (${size} bytes)`);
      }
      total += r.data.length;
    }
    if (total <= MAX_IO_BYTES) {
      await this.pool.cow.transaction(async (tx) => {
        for (const r of ranges) await this.writeIn(tx, this.base, r.offset, r.data);
      });
      return;
    }
    const scratch = await this.pool.allocateScratch(this.id);
    const sbase = slotBase(scratch);
    try {
      // Block ranges touched, merged; each block first gets the volume's current contents.
      const spans = mergeSpans(ranges.map((r) => [Math.floor(r.offset / BLOCK_BYTES), Math.ceil((r.offset + r.data.length) / BLOCK_BYTES)] as [number, number]));
      for (const [a, b] of spans) {
        for (let blk = a; blk < b; blk += 2048) {
          const n = Math.min(2048, b - blk);
          await this.pool.cow.copy(this.base + BigInt(blk), sbase + BigInt(blk), BigInt(n));
        }
      }
      for (const r of ranges) {
        for (let o = 0; o < r.data.length; o += MAX_IO_BYTES) {
          const piece = r.data.subarray(o, Math.min(r.data.length, o + MAX_IO_BYTES));
          await this.pool.cow.transaction((tx) => this.writeIn(tx, sbase, r.offset + o, piece));
        }
      }
      // The blocks the ranges cover only in part were staged with the volume's bytes as they
      // were before staging; writes to them since would be undone. So the commit redoes them
      // from the volume as it is now: after the exchange, that is what the scratch slot holds.
      const partial = partialBlocks(ranges);
      const needed = Math.max(...ranges.map((r) => r.offset + r.data.length));
      await this.pool.commitScratch(scratch, needed, async (tx) => {
        for (const [a, b] of spans) await tx.exchange(this.base + BigInt(a), sbase + BigInt(a), BigInt(b - a));
        for (const [blk, which] of partial) {
          const block = (await tx.read(sbase + BigInt(blk))) ?? new Uint8Array(BLOCK_BYTES);
          for (const i of which) {
            const r = ranges[i]!;
            const from = Math.max(r.offset, blk * BLOCK_BYTES);
            const to = Math.min(r.offset + r.data.length, (blk + 1) * BLOCK_BYTES);
            block.set(r.data.subarray(from - r.offset, to - r.offset), from - blk * BLOCK_BYTES);
          }
          await tx.write(this.base + BigInt(blk), block);
        }
      });
    } catch (e) {
      await this.pool.dropScratch(scratch).catch(() => undefined);
      throw e;
    }
  }

  async flush(): Promise<void> {
    this.checkOpen();
    await this.pool.cow.flush();
  }

  /** Which parts of [offset, offset + length) hold data; holes read as zeros. */
  async blockStatus(offset: number, length: number): Promise<BlockStatus[]> {
    this.checkOpen();
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new InvalidArgumentError(`range [${offset}, ${offset + length}) is past the end of ${this.spec}`);
    }
    const first = Math.floor(offset / BLOCK_BYTES);
    const last = Math.ceil((offset + length) / BLOCK_BYTES);
    const extents: Extent[] = await this.pool.cow.extents(this.base + BigInt(first), BigInt(last - first), 4096);
    const out: BlockStatus[] = [];
    let pos = offset;
    const end = offset + length;
    for (const e of extents) {
      const s = Math.max(offset, Number((e.start - this.base) * B));
      const t = Math.min(end, Number((e.start + e.count - this.base) * B));
      if (s > pos) out.push({ offset: pos, length: s - pos, allocated: false });
      if (t > s) out.push({ offset: s, length: t - s, allocated: true });
      pos = Math.max(pos, t);
    }
    if (extents.length === 4096) return out; // more follow; the caller asks again from the end
    if (pos < end) out.push({ offset: pos, length: end - pos, allocated: false });
    return out;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.pool.imageClosed(this.id);
  }

  private checkOpen(): void {
    if (this.closed) throw new ClosedError(`${this.spec} is closed`);
    this.pool.checkImage(this.id, this.spec);
  }
}

/** Sort and merge overlapping or touching [a, b) spans. */
/**
 * The blocks that `ranges` cover only in part (their union leaves some of the block's bytes
 * alone), each with the indexes of the ranges that touch it, in order. Such a block is the
 * first or last block of each range that touches it: a range covering it whole would cover
 * it whole.
 */
export function partialBlocks(ranges: readonly WriteRange[]): Map<number, number[]> {
  const union = mergeSpans(ranges.map((r) => [r.offset, r.offset + r.data.length] as [number, number]));
  const covered = (blk: number): boolean => {
    const a = blk * BLOCK_BYTES;
    // The union's spans are sorted and disjoint: find the last one starting at or before a.
    let lo = 0;
    let hi = union.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (union[mid]![0] <= a) lo = mid;
      else hi = mid - 1;
    }
    const s = union[lo];
    return s !== undefined && s[0] <= a && s[1] >= a + BLOCK_BYTES;
  };
  const out = new Map<number, number[]>();
  ranges.forEach((r, i) => {
    if (r.data.length === 0) return;
    const first = Math.floor(r.offset / BLOCK_BYTES);
    const last = Math.floor((r.offset + r.data.length - 1) / BLOCK_BYTES);
    for (const blk of first === last ? [first] : [first, last]) {
      if (covered(blk)) continue;
      const list = out.get(blk) ?? [];
      if (list[list.length - 1] !== i) list.push(i);
      out.set(blk, list);
    }
  });
  return out;
}

export function mergeSpans(spans: [number, number][]): [number, number][] {
  const s = spans.filter(([a, b]) => b > a).sort((x, y) => x[0] - y[0]);
  const out: [number, number][] = [];
  for (const [a, b] of s) {
    const last = out[out.length - 1];
    if (last !== undefined && a <= last[1]) last[1] = Math.max(last[1], b);
    else out.push([a, b]);
  }
  return out;
}

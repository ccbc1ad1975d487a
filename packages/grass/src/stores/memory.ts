/**
 * MemorySegmentStore: segments in memory. Everything is "durable" at once; crashes are the
 * business of FaultySegmentStore, which wraps this (or any) store.
 */
import { checkRange, type SegmentStore } from '../segment-store.ts';
import { SUPERBLOCK_BYTES } from '../format.ts';

export class MemorySegmentStore implements SegmentStore {
  private readonly segments: (Uint8Array | undefined)[];
  private readonly superblocks: (Uint8Array | undefined)[] = [undefined, undefined];
  private closed = false;

  constructor(
    readonly segmentBytes: number,
    readonly segmentCount: number,
  ) {
    this.segments = new Array<Uint8Array | undefined>(segmentCount).fill(undefined);
  }

  describe(): string {
    return `memory (${this.segmentCount} x ${this.segmentBytes} B)`;
  }

  private segment(s: number): Uint8Array {
    let seg = this.segments[s];
    if (seg === undefined) {
      seg = new Uint8Array(this.segmentBytes);
      this.segments[s] = seg;
    }
    return seg;
  }

  private live(): void {
    if (this.closed) throw new Error('memory segment store is closed');
  }

  async write(segment: number, offset: number, data: Uint8Array): Promise<void> {
    this.live();
    checkRange(this, segment, offset, data.length);
    this.segment(segment).set(data, offset);
  }

  async sync(): Promise<void> {
    this.live();
  }

  async seal(segment: number): Promise<void> {
    this.live();
    checkRange(this, segment, 0, 0);
  }

  async read(segment: number, offset: number, length: number): Promise<Uint8Array> {
    this.live();
    checkRange(this, segment, offset, length);
    const seg = this.segments[segment];
    if (seg === undefined) return new Uint8Array(length);
    return seg.slice(offset, offset + length);
  }

  async release(segment: number): Promise<void> {
    this.live();
    checkRange(this, segment, 0, 0);
    // Keep the bytes: a real disk does not zero freed space either, and tests rely on stale
    // data being present so that Grass must tell it apart by checksum and sequence number.
  }

  async readSuperblock(slot: 0 | 1): Promise<Uint8Array | undefined> {
    this.live();
    return this.superblocks[slot]?.slice();
  }

  async writeSuperblock(slot: 0 | 1, data: Uint8Array): Promise<void> {
    this.live();
    if (data.length !== SUPERBLOCK_BYTES) throw new RangeError('superblock must be SUPERBLOCK_BYTES long');
    this.superblocks[slot] = data.slice();
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  /** Test hook: the raw bytes of a segment (not a copy). */
  rawSegment(segment: number): Uint8Array {
    return this.segment(segment);
  }

  /** Test hook: the raw bytes of a superblock slot. */
  rawSuperblock(slot: 0 | 1): Uint8Array | undefined {
    return this.superblocks[slot];
  }

  /** Reopen after close (the bytes stay), as a process restart would. */
  reopen(): this {
    this.closed = false;
    return this;
  }
}

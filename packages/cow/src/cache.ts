/**
 * NodeCache: a bounded LRU of decoded metadata (tree nodes and refcount pages) keyed by Grass
 * address. Entries are immutable committed versions; transactions clone before changing one.
 * Memory is bounded by `capacityBytes` (an estimate per entry), never by the size of the
 * address space. Not thread-safe; used from Cow's single JavaScript thread.
 */
import { assert } from './assert.ts';

/** Rough bytes a cached entry costs: its typed array plus object overheads. */
export const NODE_ENTRY_BYTES = 256 * 8 + 160;
export const REFCOUNT_ENTRY_BYTES = 512 * 4 + 160;

export class NodeCache<T> {
  private readonly entries = new Map<number, { value: T; bytes: number; stamp: number }>();
  private bytes = 0;
  /** Accesses so far; an entry is moved to the recent end only if it has not been lately. */
  private clock = 0;
  hits = 0;
  misses = 0;

  constructor(readonly capacityBytes: number) {
    assert(Number.isSafeInteger(capacityBytes) && capacityBytes >= 64 * 1024, `cache capacity ${capacityBytes} (at least 64 KiB)`);
  }

  get(key: number): T | undefined {
    const e = this.entries.get(key);
    if (e === undefined) {
      this.misses++;
      return undefined;
    }
    this.hits++;
    // Move to the most recently used end, unless it moved there recently: hot entries (the top
    // of the tree) are read on every lookup and reordering a Map costs a delete and an insert.
    const now = ++this.clock;
    if (now - e.stamp > this.entries.size / 4) {
      e.stamp = now;
      this.entries.delete(key);
      this.entries.set(key, e);
    }
    return e.value;
  }

  set(key: number, value: T, bytes: number): void {
    const old = this.entries.get(key);
    if (old !== undefined) {
      this.bytes -= old.bytes;
      this.entries.delete(key);
    }
    this.entries.set(key, { value, bytes, stamp: ++this.clock });
    this.bytes += bytes;
    if (this.bytes > this.capacityBytes) {
      for (const [k, e] of this.entries) {
        if (this.bytes <= this.capacityBytes) break;
        this.entries.delete(k);
        this.bytes -= e.bytes;
      }
    }
  }

  delete(key: number): void {
    const old = this.entries.get(key);
    if (old === undefined) return;
    this.bytes -= old.bytes;
    this.entries.delete(key);
  }

  get size(): number {
    return this.entries.size;
  }

  get usedBytes(): number {
    return this.bytes;
  }
}

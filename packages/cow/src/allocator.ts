/**
 * Allocator: hands out Grass addresses for data blocks and tree nodes, reusing those whose
 * refcount has dropped to zero (the refcount pages are the free map, as in dm's space maps).
 *
 * In memory it keeps only a free-entry count per refcount page (2 bytes per 512 addresses),
 * learnt lazily after open: a page whose count is unknown is read when the allocator reaches
 * it, at most LOADS_PER_ALLOC pages per allocation, and if that finds nothing the high water
 * mark moves up instead. So opening a large store costs nothing, and freed addresses are
 * found again as the cursor sweeps round. The counts are kept in chunks made when one of
 * their pages becomes known, so memory follows the pages learnt, not the high water the
 * superblock claims (which may be far above the last page in use, see highWaterLimit).
 *
 * The high water never passes `limit` (highWaterLimit: more addresses than the Grass store
 * could hold records for): there the allocator reads every unknown page for a free address.
 *
 * An address freed by a transaction is reused only after that transaction has committed.
 * Not thread-safe; Cow calls it from inside a transaction, under its write lock.
 */
import { assert } from './assert.ts';
import { CowTooLargeError } from './errors.ts';
import { ALLOC_LIMIT_GADDR, FIRST_ALLOC_GADDR, RC_PAGE_ENTRIES } from './format.ts';

const UNKNOWN = 0xffff;
/** Unknown refcount pages read per allocation before giving up and raising the high water. */
const LOADS_PER_ALLOC = 4;
/** Pages per chunk of free counts: 8 KiB of counts for 2 Mi addresses. */
const HINT_CHUNK_PAGES = 4096;

/** What the allocator needs from a transaction. */
export interface AllocView {
  /** The transaction's view of refcount page p. */
  page(p: number): Promise<Uint32Array>;
  /** Addresses freed by this transaction: not reusable until it commits. */
  isFreedHere(g: number): boolean;
  /** The transaction's high water mark, raised by allocating past it. */
  nextGaddr: number;
  /** Allocations this transaction took from known-free entries. */
  takenFromKnown: number;
  /** Pages this transaction found full. */
  exhausted: Set<number>;
}

export class Allocator {
  /** Free entries of each known page, by chunk of HINT_CHUNK_PAGES; absent: UNKNOWN. */
  private readonly hints = new Map<number, Uint16Array>();
  private pages: number;
  private knownFree = 0;
  private unknownPages: number;
  private cursor = 0;

  constructor(
    /** Committed high water. */
    private committedNext: number,
    /** The high water never passes this (highWaterLimit). */
    private readonly limit: number,
    private readonly loadCommittedPage: (p: number) => Promise<Uint32Array>,
  ) {
    assert(limit >= FIRST_ALLOC_GADDR && limit <= ALLOC_LIMIT_GADDR, `allocator limit ${limit}`);
    assert(committedNext >= FIRST_ALLOC_GADDR && committedNext <= limit, `high water ${committedNext} above the limit ${limit}`);
    this.pages = pageCountFor(committedNext);
    this.unknownPages = this.pages;
  }

  get freeKnown(): number {
    return this.knownFree;
  }

  get pagesUnknown(): number {
    return this.unknownPages;
  }

  get highWater(): number {
    return this.committedNext;
  }

  async alloc(tx: AllocView): Promise<number> {
    const reused = await this.reuse(tx, LOADS_PER_ALLOC);
    if (reused !== undefined) return reused;
    const g = tx.nextGaddr;
    if (g < this.limit) {
      tx.nextGaddr = g + 1;
      return g;
    }
    // At the limit: a free address is somewhere below it unless this transaction holds them all.
    const found = await this.reuse(tx, Infinity);
    if (found !== undefined) return found;
    throw new CowTooLargeError(`Cow has used all ${this.limit} addresses its Grass store can hold records for`);
  }

  /** A free committed address below the high water, reading at most `maxLoads` unknown pages; undefined if none found. */
  private async reuse(tx: AllocView, maxLoads: number): Promise<number | undefined> {
    let loads = 0;
    for (let scanned = 0; scanned < this.pages; scanned++) {
      if (this.knownFree - tx.takenFromKnown <= 0 && (this.unknownPages === 0 || loads >= maxLoads)) break;
      const p = this.cursor;
      if (this.hintOf(p) === UNKNOWN) {
        if (loads >= maxLoads) {
          this.cursor = (p + 1) % this.pages;
          continue;
        }
        loads++;
        this.setHint(p, countFree(await this.loadCommittedPage(p), p, this.committedNext));
      }
      if (this.hintOf(p) > 0 && !tx.exhausted.has(p)) {
        const page = await tx.page(p);
        const base = p * RC_PAGE_ENTRIES;
        for (let i = 0; i < RC_PAGE_ENTRIES; i++) {
          const g = base + i;
          if (g < FIRST_ALLOC_GADDR || g >= this.committedNext) continue;
          if (page[i] === 0 && !tx.isFreedHere(g)) {
            tx.takenFromKnown++;
            return g;
          }
        }
        tx.exhausted.add(p);
      }
      this.cursor = (p + 1) % this.pages;
    }
    return undefined;
  }

  /** After a commit: learn the new contents of the refcount pages it wrote. */
  committed(nextGaddr: number, pages: ReadonlyMap<number, Uint32Array>): void {
    assert(nextGaddr >= this.committedNext && nextGaddr <= this.limit);
    this.committedNext = nextGaddr;
    const n = pageCountFor(nextGaddr);
    // Pages that came into range are known: every address in them was allocated by this
    // commit, so each one is among `pages`.
    for (let p = this.pages; p < n; p++) {
      this.chunkOf(p)[p % HINT_CHUNK_PAGES] = 0;
    }
    this.pages = n;
    for (const [p, page] of pages) {
      if (p >= n) continue;
      this.setHint(p, countFree(page, p, nextGaddr));
    }
  }

  private hintOf(p: number): number {
    const chunk = this.hints.get(Math.floor(p / HINT_CHUNK_PAGES));
    return chunk === undefined ? UNKNOWN : chunk[p % HINT_CHUNK_PAGES]!;
  }

  /** The chunk holding page p's count, made (all unknown) if it has none. */
  private chunkOf(p: number): Uint16Array {
    const c = Math.floor(p / HINT_CHUNK_PAGES);
    let chunk = this.hints.get(c);
    if (chunk === undefined) {
      chunk = new Uint16Array(HINT_CHUNK_PAGES).fill(UNKNOWN);
      this.hints.set(c, chunk);
    }
    return chunk;
  }

  private setHint(p: number, free: number): void {
    const chunk = this.chunkOf(p);
    const i = p % HINT_CHUNK_PAGES;
    const old = chunk[i]!;
    if (old === UNKNOWN) this.unknownPages--;
    else this.knownFree -= old;
    chunk[i] = free;
    this.knownFree += free;
  }
}

function pageCountFor(nextGaddr: number): number {
  return Math.ceil(nextGaddr / RC_PAGE_ENTRIES);
}

function countFree(page: Uint32Array, p: number, nextGaddr: number): number {
  let n = 0;
  const base = p * RC_PAGE_ENTRIES;
  for (let i = 0; i < RC_PAGE_ENTRIES; i++) {
    const g = base + i;
    if (g >= FIRST_ALLOC_GADDR && g < nextGaddr && page[i] === 0) n++;
  }
  return n;
}

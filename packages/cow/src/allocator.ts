/**
 * Allocator: hands out Grass addresses for data blocks and tree nodes, reusing those whose
 * refcount has dropped to zero (the refcount pages are the free map, as in dm's space maps).
 *
 * In memory it keeps only a free-entry count per refcount page (2 bytes per 512 addresses),
 * learnt lazily after open: a page whose count is unknown is read when the allocator reaches
 * it, at most LOADS_PER_ALLOC pages per allocation, and if that finds nothing the high water
 * mark moves up instead. So opening a large store costs nothing, and freed addresses are
 * found again as the cursor sweeps round.
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
  private hint: Uint16Array;
  private pages: number;
  private knownFree = 0;
  private unknownPages: number;
  private cursor = 0;

  constructor(
    /** Committed high water. */
    private committedNext: number,
    private readonly loadCommittedPage: (p: number) => Promise<Uint32Array>,
  ) {
    this.pages = pageCountFor(committedNext);
    this.hint = new Uint16Array(Math.max(16, this.pages)).fill(UNKNOWN);
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
    let loads = 0;
    for (let scanned = 0; scanned < this.pages; scanned++) {
      if (this.knownFree - tx.takenFromKnown <= 0 && (this.unknownPages === 0 || loads >= LOADS_PER_ALLOC)) break;
      const p = this.cursor;
      if (this.hint[p] === UNKNOWN) {
        if (loads >= LOADS_PER_ALLOC) {
          this.cursor = (p + 1) % this.pages;
          continue;
        }
        loads++;
        this.setHint(p, countFree(await this.loadCommittedPage(p), p, this.committedNext));
      }
      if (this.hint[p]! > 0 && !tx.exhausted.has(p)) {
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
    const g = tx.nextGaddr;
    if (g >= ALLOC_LIMIT_GADDR) throw new CowTooLargeError(`Cow has used all ${ALLOC_LIMIT_GADDR} Grass addresses`);
    tx.nextGaddr = g + 1;
    return g;
  }

  /** After a commit: learn the new contents of the refcount pages it wrote. */
  committed(nextGaddr: number, pages: ReadonlyMap<number, Uint32Array>): void {
    assert(nextGaddr >= this.committedNext);
    this.committedNext = nextGaddr;
    const n = pageCountFor(nextGaddr);
    if (n > this.hint.length) {
      const grown = new Uint16Array(Math.max(n, this.hint.length * 2)).fill(UNKNOWN);
      grown.set(this.hint.subarray(0, this.pages));
      this.hint = grown;
    }
    // Pages that came into range are known: every address in them was allocated by this
    // commit, so each one is among `pages`.
    for (let p = this.pages; p < n; p++) {
      this.hint[p] = 0;
    }
    this.pages = n;
    for (const [p, page] of pages) {
      if (p >= n) continue;
      this.setHint(p, countFree(page, p, nextGaddr));
    }
  }

  private setHint(p: number, free: number): void {
    const old = this.hint[p]!;
    if (old === UNKNOWN) this.unknownPages--;
    else this.knownFree -= old;
    this.hint[p] = free;
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

/** The allocator's limit: it reuses a free address rather than raise the high water past what the store can hold. */
import test from 'ava';
import { GrassLog, MIN_SEGMENT_BYTES, MemorySegmentStore, NoSpaceError, type BatchOp } from '@pasture/grass';
import { Allocator, type AllocView } from './allocator.ts';
import { CowTooLargeError } from './errors.ts';
import { FIRST_ALLOC_GADDR, RC_PAGE_ENTRIES, highWaterLimit } from './format.ts';

/** Refcount pages 0..n-1, every address in use but `free` ones; and a transaction's view of them. */
function setup(n: number, free: number[], nextGaddr: number): { pages: Uint32Array[]; tx: AllocView } {
  const pages = Array.from({ length: n }, () => new Uint32Array(RC_PAGE_ENTRIES).fill(1));
  for (const g of free) pages[Math.floor(g / RC_PAGE_ENTRIES)]![g % RC_PAGE_ENTRIES] = 0;
  const tx: AllocView = {
    page: async (p) => pages[p] ?? new Uint32Array(RC_PAGE_ENTRIES),
    isFreedHere: () => false,
    nextGaddr,
    takenFromKnown: 0,
    exhausted: new Set(),
  };
  return { pages, tx };
}

test('below its limit the high water rises after a few page reads; at the limit every page is read for a free address', async (t) => {
  const limit = 10 * RC_PAGE_ENTRIES;
  const lone = 7 * RC_PAGE_ENTRIES + 100;
  // Below the limit: the free address on page 7 is past the pages one allocation reads.
  const below = setup(10, [lone], limit - 1);
  const a = new Allocator(limit - 1, limit, async (p) => below.pages[p]!);
  t.is(await a.alloc(below.tx), limit - 1);
  // At the limit: the same free address is found rather than the limit passed, then nothing is left.
  const at = setup(10, [lone], limit);
  const b = new Allocator(limit, limit, async (p) => at.pages[p]!);
  t.is(await b.alloc(at.tx), lone);
  at.pages[7]![100] = 1;
  at.tx.exhausted.add(7);
  await t.throwsAsync(b.alloc(at.tx), { instanceOf: CowTooLargeError, message: /all 5120 addresses/ });
  t.is(at.tx.nextGaddr, limit);
});

test('the limit is above the most records a Grass store holds, so a store never needs a high water past it', async (t) => {
  // A small store, filled with the smallest records until Grass refuses more (every segment
  // outside its reserve and working room, for as many records as it can take).
  const segments = 32;
  const grass = await GrassLog.create(new MemorySegmentStore(MIN_SEGMENT_BYTES, segments), { maxLiveShare: 1 });
  let records = 0;
  for (;;) {
    const ops: BatchOp[] = Array.from({ length: 256 }, (_, i) => ({ op: 'put', gaddr: FIRST_ALLOC_GADDR + records + i, data: new Uint8Array(1) }));
    try {
      await grass.batch(ops);
    } catch (e) {
      t.true(e instanceof NoSpaceError, String(e));
      break;
    }
    records += ops.length;
  }
  const limit = highWaterLimit(MIN_SEGMENT_BYTES, segments);
  t.log(`${records} one-byte records fit; the limit allows ${limit - FIRST_ALLOC_GADDR} addresses`);
  t.true(records > 0 && FIRST_ALLOC_GADDR + records <= limit);
  await grass.close();
});

/**
 * Cow's behaviour, one property per test: sharing isolation, O(log n) BLOCK-COPY, atomic
 * transactions, address reuse, a bounded cache, persistence, and clear errors for bad input.
 */
import test from 'ava';
import { GrassLog, MemorySegmentStore } from '@pasture/grass';
import { BLOCK_BYTES } from './codec.ts';
import { CowStore } from './cow.ts';
import { fsckCow } from './fsck.ts';
import { blockFor } from './simulator.ts';

async function fresh(options: { cacheBytes?: number; segments?: number } = {}): Promise<{ cow: CowStore; store: MemorySegmentStore }> {
  const store = new MemorySegmentStore(256 * 1024, options.segments ?? 512);
  const cow = await CowStore.create(await GrassLog.create(store, {}), { backgroundReaper: false, ...(options.cacheBytes ? { cacheBytes: options.cacheBytes } : {}) });
  return { cow, store };
}

function tagAt(b: Uint8Array | undefined): number | undefined {
  return b === undefined ? undefined : new DataView(b.buffer, b.byteOffset, 8).getFloat64(0, true);
}

/** Fill [start, start + n) with tag = base + offset, 256 blocks per transaction. */
async function fill(cow: CowStore, start: bigint, n: number, base: number): Promise<void> {
  for (let i = 0; i < n; i += 256) {
    await cow.transaction(async (tx) => {
      for (let j = i; j < Math.min(n, i + 256); j++) await tx.write(start + BigInt(j), blockFor(base + j));
    });
  }
}

async function healthy(t: { true: (v: boolean, m?: string) => void }, cow: CowStore): Promise<void> {
  const f = await fsckCow(cow);
  t.true(f.ok, f.problems.join('; '));
}

test('a transaction\'s operations run one at a time: one beside another, one left running, or one after the body fails, and nothing is committed', async (t) => {
  const { cow } = await fresh();
  await fill(cow, 0n, 4, 1);
  // Left running when the body returns (a forgotten await): it finishes, then the transaction
  // fails whole. Before, it went on past the commit and corrupted the committed tree.
  let stray: Promise<void> | undefined;
  await t.throwsAsync(cow.transaction(async (tx) => {
    await tx.write(10n, blockFor(100));
    stray = tx.write(11n, blockFor(101));
  }), { code: 'EINVAL', message: /still running/ } as never);
  await t.notThrowsAsync(stray!);
  t.is(await cow.read(10n), undefined, 'nothing of it committed');
  t.is(await cow.read(11n), undefined);
  // Calls beside one another.
  await t.throwsAsync(cow.transaction(async (tx) => {
    await Promise.all([0, 1, 2, 3].map((i) => tx.write(BigInt(20 + i), blockFor(200 + i))));
  }), { code: 'EINVAL', message: /one at a time/ } as never);
  for (let i = 0; i < 4; i++) t.is(await cow.read(BigInt(20 + i)), undefined);
  // After the body returned.
  let kept: { write: (a: bigint, b: Uint8Array) => Promise<void> } | undefined;
  await cow.transaction(async (tx) => {
    kept = tx;
    await tx.write(30n, blockFor(300));
  });
  await t.throwsAsync(kept!.write(31n, blockFor(301)), { code: 'EINVAL', message: /body has returned/ } as never);
  t.is(tagAt(await cow.read(30n)), 300);
  t.is(await cow.read(31n), undefined);
  // The store is whole, and goes on working.
  await cow.write(12n, blockFor(4));
  for (let i = 0; i < 4; i++) t.is(tagAt(await cow.read(BigInt(i))), 1 + i);
  await healthy(t, cow);
});

test('a transaction over the batch limit in Grass\'s own count is CowTooLargeError, with nothing applied', async (t) => {
  const store = new MemorySegmentStore(4 << 20, 64);
  const cow = await CowStore.create(await GrassLog.create(store, {}), { backgroundReaper: false });
  // 16300 incompressible blocks: 66.8 MB of payload, under 64 MiB; with Grass's 36 bytes of
  // header and summary per record, over it.
  await t.throwsAsync(cow.transaction(async (tx) => {
    for (let i = 0; i < 16300; i++) await tx.write(BigInt(i), blockFor(3 * (i + 1)));
  }), { code: 'EFBIG' } as never);
  t.is(await cow.read(0n), undefined);
  await healthy(t, cow);
  await cow.close();
});

test('after BLOCK-COPY, writing either side never changes the other', async (t) => {
  const { cow } = await fresh();
  await fill(cow, 1000n, 3000, 1);
  const dst = (1n << 64n) + 1000n; // same alignment: subtrees are shared
  const odd = (1n << 90n) + 77n; // different alignment: blocks are shared one by one
  await cow.copy(1000n, dst, 3000n);
  await cow.copy(1000n, odd, 3000n);
  const scan = await cow.scan();
  t.is(scan.mappedBlocks, 9000);
  t.is(scan.sharedBlocks, 9000);
  // Write the source at some places, each copy at others.
  for (let i = 0; i < 3000; i += 7) await cow.write(1000n + BigInt(i), blockFor(100000 + i));
  for (let i = 3; i < 3000; i += 11) await cow.write(dst + BigInt(i), blockFor(200000 + i));
  for (let i = 5; i < 3000; i += 13) await cow.write(odd + BigInt(i), blockFor(300000 + i));
  for (let i = 0; i < 3000; i++) {
    const want = (w: number, tag: number, step: number, from: number): number => ((i - from) % step === 0 && i >= from ? w + i : tag);
    t.is(tagAt(await cow.read(1000n + BigInt(i))), want(100000, 1 + i, 7, 0), `source ${i}`);
    t.is(tagAt(await cow.read(dst + BigInt(i))), want(200000, 1 + i, 11, 3), `aligned copy ${i}`);
    t.is(tagAt(await cow.read(odd + BigInt(i))), want(300000, 1 + i, 13, 5), `misaligned copy ${i}`);
  }
  // Trimming the source leaves both copies whole.
  await cow.trim(0n, 1n << 63n);
  await cow.reap();
  t.is(await cow.read(1500n), undefined);
  t.is(tagAt(await cow.read(dst + 1n)), 2);
  t.is(tagAt(await cow.read(odd + 1n)), 2);
  await healthy(t, cow);
});

test('BLOCK-COPY of an aligned range writes O(log n) records, not one per block', async (t) => {
  const { cow } = await fresh({ segments: 1024 });
  const n = 1 << 16;
  await fill(cow, 0n, n, 1);
  const before = cow.grass.stats().userRecords;
  await cow.copy(0n, 1n << 80n, BigInt(n));
  const written = cow.grass.stats().userRecords - before;
  t.log(`copy of ${n} blocks wrote ${written} Grass records`);
  t.true(written <= 2 * 16 + 4, `${written} records`);
  t.is(tagAt(await cow.read((1n << 80n) + 12345n)), 12346);
  // Overwriting the destination later frees the old destination subtree through the reaper.
  await cow.copy(1000n, 1n << 80n, BigInt(n));
  await cow.reap();
  t.is(tagAt(await cow.read((1n << 80n) + 5n)), 1006);
  await healthy(t, cow);
});

test('a transaction commits all of its operations or, if it throws, none', async (t) => {
  const { cow } = await fresh();
  await fill(cow, 0n, 10, 1);
  const batchesBefore = cow.grass.stats().batches;
  await cow.transaction(async (tx) => {
    await tx.write(100n, blockFor(500));
    await tx.copy(0n, 200n, 10n);
    await tx.exchange(0n, 300n, 5n);
    await tx.trim(9n, 1n);
  });
  t.is(cow.grass.stats().batches - batchesBefore, 1, 'one transaction is one Grass batch');
  t.is(tagAt(await cow.read(300n)), 1);
  t.is(await cow.read(0n), undefined);
  t.is(tagAt(await cow.read(205n)), 6);
  const snapshot = async (): Promise<(number | undefined)[]> => Promise.all([0n, 5n, 9n, 100n, 200n, 300n, 400n].map(async (a) => tagAt(await cow.read(a))));
  const before = await snapshot();
  const statsBefore = cow.stats();
  await t.throwsAsync(
    cow.transaction(async (tx) => {
      await tx.write(400n, blockFor(9));
      await tx.trim(0n, 1000n);
      t.is(await tx.read(300n), undefined, 'reads inside see the transaction');
      throw new Error('changed my mind');
    }),
    { message: 'changed my mind' },
  );
  t.deepEqual(await snapshot(), before);
  t.is(cow.stats().physicalBytes, statsBefore.physicalBytes);
  await healthy(t, cow);
});

test('freed Grass addresses are reused: write/trim cycles do not raise the high water', async (t) => {
  const { cow } = await fresh();
  await fill(cow, 0n, 600, 1);
  await cow.trim(0n, 600n);
  await cow.reap();
  const high = cow.stats().allocator.highWater;
  for (let round = 0; round < 5; round++) {
    await fill(cow, 0n, 600, 1000 * round);
    await cow.trim(0n, 1n << 40n);
    await cow.reap();
  }
  t.is(cow.stats().allocator.highWater, high);
  t.is(cow.stats().dataRecords, 0);
  await healthy(t, cow);
});

test('all-zero blocks take no space, and compressible blocks take less', async (t) => {
  const { cow } = await fresh();
  await cow.write(1n, new Uint8Array(BLOCK_BYTES));
  t.is(await cow.read(1n), undefined);
  t.is(cow.stats().dataRecords, 0);
  await cow.write(2n, blockFor(1)); // compressible
  await cow.write(3n, blockFor(3)); // random
  const s = cow.stats();
  t.is(s.dataRecords, 2);
  t.true(s.dataBytes < BLOCK_BYTES + BLOCK_BYTES / 8, `${s.dataBytes} bytes`);
  // Zeroing a mapped block unmaps it and frees its record.
  await cow.write(2n, new Uint8Array(BLOCK_BYTES));
  t.is(await cow.read(2n), undefined);
  t.is(cow.stats().dataRecords, 1);
  await healthy(t, cow);
});

test('the node cache stays within its bound however much is mapped', async (t) => {
  const { cow } = await fresh({ cacheBytes: 64 * 1024, segments: 1024 });
  // 40 leaves' worth spread over the space, far more metadata than 64 KiB of cache.
  for (let k = 0; k < 40; k++) await fill(cow, BigInt(k) << BigInt(3 * k), 40, k * 1000);
  t.true(cow.cache.usedBytes <= 64 * 1024, `${cow.cache.usedBytes} bytes cached`);
  for (let k = 0; k < 40; k++) t.is(tagAt(await cow.read((BigInt(k) << BigInt(3 * k)) + 7n)), k * 1000 + 7);
  t.true(cow.stats().cache.misses > 0);
  await healthy(t, cow);
});

test('the space survives close and reopen, at the far ends of the address space', async (t) => {
  const { cow, store } = await fresh();
  const top = (1n << 128n) - 1n;
  await cow.write(top, blockFor(42));
  await cow.write(0n, blockFor(43));
  await cow.copy(top, 1n << 127n, 1n);
  await cow.flush();
  const stats = cow.stats();
  await cow.close();
  const again = await CowStore.open(await GrassLog.open(store.reopen(), {}), {});
  t.is(tagAt(await again.read(top)), 42);
  t.is(tagAt(await again.read(0n)), 43);
  t.is(tagAt(await again.read(1n << 127n)), 42);
  t.is(again.stats().treeDepth, 16);
  t.is(again.stats().dataBytes, stats.dataBytes);
  t.deepEqual(await again.extents(0n, 1n << 128n), [
    { start: 0n, count: 1n },
    { start: 1n << 127n, count: 1n },
    { start: top, count: 1n },
  ]);
  await healthy(t, again);
  await again.close();
});

test('bad input gets a clear error and changes nothing', async (t) => {
  const { cow } = await fresh();
  await cow.write(5n, blockFor(1));
  await t.throwsAsync(cow.write(6n, new Uint8Array(100)), { code: 'EINVAL' } as never);
  await t.throwsAsync(cow.write(1n << 128n, blockFor(2)), { code: 'EINVAL', message: /outside the 128-bit block space/ } as never);
  await t.throwsAsync(cow.read(-1n), { code: 'EINVAL' } as never);
  await t.throwsAsync(cow.trim((1n << 128n) - 1n, 2n), { code: 'EINVAL' } as never);
  await t.throwsAsync(cow.exchange(0n, 10n, 20n), { code: 'EINVAL', message: /overlap/ } as never);
  await t.throwsAsync(cow.copy(0n, 1n, -1n), { code: 'EINVAL' } as never);
  for (const n of [NaN, 0, -1, 1.5]) {
    await t.throwsAsync(cow.extents(0n, 10n, n), { code: 'EINVAL', message: /maxExtents/ } as never);
    await t.throwsAsync(cow.diff(0n, 100n, 10n, n), { code: 'EINVAL', message: /maxExtents/ } as never);
  }
  t.is(tagAt(await cow.read(5n)), 1);
  await healthy(t, cow);
  await cow.close();
  await t.throwsAsync(cow.read(5n), { code: 'ESHUTDOWN' } as never);
});

test('fsck reports a refcount that disagrees with the tree', async (t) => {
  const { cow } = await fresh();
  await fill(cow, 0n, 20, 1);
  await cow.copy(0n, 1000n, 20n);
  await healthy(t, cow);
  // Damage a refcount page behind Cow's back: raise the count of the first data record.
  const page = (await cow.loadRefcounts(0)).slice();
  const target = page.findIndex((c, i) => i >= 2 && c === 1);
  page[target] = 3;
  const { encodeRefcounts, RC_BASE_GADDR } = await import('./format.ts');
  await cow.grass.put(RC_BASE_GADDR, encodeRefcounts(page));
  cow.cache.delete(RC_BASE_GADDR);
  const f = await fsckCow(cow);
  t.false(f.ok);
  t.is(f.counts.refcountMismatches, 1, f.problems.join('; '));
  page[target] = 0;
  await cow.grass.put(RC_BASE_GADDR, encodeRefcounts(page));
  cow.cache.delete(RC_BASE_GADDR);
  const f2 = await fsckCow(cow);
  t.is(f2.counts.doubleReferences, 1, f2.problems.join('; '));
});

test('diff finds exactly the blocks that differ, and usage counts what a trim would free', async (t) => {
  const { cow } = await fresh();
  const A = 1n << 40n;
  const B = 2n << 40n;
  await fill(cow, A + 100n, 1000, 1);
  await cow.copy(A, B, 1n << 40n); // a snapshot of the whole window
  t.deepEqual(await cow.diff(A, B, 1n << 40n), []);
  t.deepEqual(await cow.usage(A, 1n << 40n), { mapped: 1000n, exclusive: 0n });
  await cow.write(A + 150n, blockFor(9999));
  await cow.write(A + 151n, blockFor(9998));
  await cow.trim(A + 600n, 10n);
  await cow.write(A + 5000n, blockFor(7));
  t.deepEqual(await cow.diff(A, B, 1n << 40n), [
    { start: 150n, count: 2n },
    { start: 600n, count: 10n },
    { start: 5000n, count: 1n },
  ]);
  t.deepEqual(await cow.diff(A + 100n, B + 100n, 100n), [{ start: 50n, count: 2n }]);
  // Blocks only A maps after the writes: the two rewritten ones and the new one.
  t.deepEqual(await cow.usage(A, 1n << 40n), { mapped: 991n, exclusive: 3n });
  t.deepEqual(await cow.usage(B, 1n << 40n), { mapped: 1000n, exclusive: 12n });
  await t.throwsAsync(cow.diff(A, B + 1n, 10n), { code: 'EINVAL' } as never);
  await healthy(t, cow);
});

test('a fast write across leaves changes exactly its blocks, near 0 and far past 2^53', async (t) => {
  const { cow } = await fresh();
  for (const [k, base] of [[0, 200n], [1, (1n << 100n) + 200n]] as const) {
    await fill(cow, base, 600, 10_000 * (k + 1));
    const before = cow.stats().fastWrites;
    // 400 blocks from base + 50: three leaves (256-aligned), both boundaries inside the run.
    const run = new Uint8Array(400 * BLOCK_BYTES);
    for (let i = 0; i < 400; i++) run.set(blockFor(50_000 * (k + 1) + i), i * BLOCK_BYTES);
    await cow.writeBlocks(base + 50n, run);
    t.is(cow.stats().fastWrites - before, 1, 'one fast write');
    for (let i = 0; i < 600; i++) {
      const want = i >= 50 && i < 450 ? 50_000 * (k + 1) + i - 50 : 10_000 * (k + 1) + i;
      const got = tagAt(await cow.read(base + BigInt(i)));
      if (got !== want) {
        t.fail(`block ${i} of range ${k}: tag ${got}, expected ${want}`);
        break;
      }
    }
  }
  await healthy(t, cow);
  await cow.close();
});

test('writes of unshared blocks take the fast path, waiting out a transaction under way rather than becoming one, and never touch a shared block', async (t) => {
  const { cow } = await fresh();
  await fill(cow, 0n, 512, 1);
  const before = cow.stats();
  // One block and a run, over unshared blocks: fast, one Grass batch each.
  await cow.write(3n, blockFor(9001));
  const run = new Uint8Array(4 * BLOCK_BYTES);
  for (let i = 0; i < 4; i++) run.set(blockFor(9100 + i), i * BLOCK_BYTES);
  await cow.writeBlocks(10n, run);
  t.is(cow.stats().fastWrites - before.fastWrites, 2);
  // A write that arrives while a transaction holds the lock waits for it, then goes fast.
  let release!: () => void;
  const held = new Promise<void>((r) => (release = r));
  const tx = cow.transaction(async (x) => {
    await x.write(500n, blockFor(9200));
    await held;
  });
  await new Promise((r) => setImmediate(r));
  const w = cow.write(20n, blockFor(9300));
  await new Promise((r) => setImmediate(r));
  const mid = cow.stats();
  t.is(mid.fastWrites - before.fastWrites, 2, 'the write waited while the transaction ran');
  release();
  await Promise.all([tx, w]);
  const after = cow.stats();
  t.is(after.fastWrites - before.fastWrites, 3, 'then took the fast path');
  t.is(after.transactions - mid.transactions, 2, 'the held transaction and the fast write; no transaction for the write');
  // A shared block is never overwritten in place: after a copy, writing one side leaves the other.
  await cow.copy(0n, 1000n, 4n);
  await cow.writeBlocks(0n, run);
  t.is(cow.stats().fastWrites, after.fastWrites, 'shared blocks go through a transaction');
  for (let i = 0; i < 4; i++) {
    t.is(tagAt(await cow.read(BigInt(i))), 9100 + i);
    t.is(tagAt(await cow.read(1000n + BigInt(i))), i === 3 ? 9001 : 1 + i);
  }
  t.is(tagAt(await cow.read(20n)), 9300);
  t.is(tagAt(await cow.read(500n)), 9200);
  for (let i = 0; i < 4; i++) t.is(tagAt(await cow.read(10n + BigInt(i))), 9100 + i);
  await healthy(t, cow);
  await cow.close();
});

test('a fast write behind a stream of transactions waits a bounded number of them, then becomes one', async (t) => {
  const { cow } = await fresh();
  await fill(cow, 0n, 512, 1);
  // Three clients keep a transaction queued at all times until the write is done; the write
  // is issued once 20 have committed.
  let written = false;
  let committed = 0;
  let committedAtWrite = -1;
  let w: Promise<void> | undefined;
  const client = async (k: number): Promise<void> => {
    for (let i = 0; !written && i < 2000; i++) {
      await cow.transaction(async (tx) => tx.write(BigInt(100 + k), blockFor(10_000 + i)));
      if (++committed === 20) {
        w = cow.write(7n, blockFor(777)).then(() => {
          written = true;
          committedAtWrite = committed;
        });
      }
    }
  };
  await Promise.all([client(0), client(1), client(2)]);
  await w;
  t.true(committedAtWrite >= 0 && committedAtWrite < 20 + 3 * 16, `the write finished after ${committedAtWrite - 20} more transactions`);
  t.is(tagAt(await cow.read(7n)), 777);
  await healthy(t, cow);
  await cow.close();
});

test('allocateZeroes maps blocks to stored zeros: they read as zeros, count as mapped, and a shared block is not touched', async (t) => {
  const { cow } = await fresh();
  await fill(cow, 0n, 64, 1);
  await cow.copy(0n, 1000n, 8n); // blocks 0..7 shared
  await cow.allocateZeroes(4n, 8n); // 4..7 shared, 8..11 not
  await cow.allocateZeroes(5000n, 3n); // unmapped before
  await cow.transaction((tx) => tx.allocateZeroes(6000n, 2n));
  for (const a of [4n, 7n, 8n, 11n, 5000n, 5002n, 6001n]) {
    const b = await cow.read(a);
    t.true(b !== undefined && b.every((x) => x === 0), `block ${a} reads as zeros, mapped`);
  }
  t.deepEqual(await cow.extents(5000n, 10n), [{ start: 5000n, count: 3n }]);
  for (let i = 0; i < 8; i++) t.is(tagAt(await cow.read(1000n + BigInt(i))), 1 + i, 'the copy keeps its blocks');
  t.is(tagAt(await cow.read(3n)), 4);
  t.is(tagAt(await cow.read(12n)), 13);
  await t.throwsAsync(cow.allocateZeroes(0n, 8193n), { message: /0 to 8192 blocks/ });
  await t.throwsAsync(cow.allocateZeroes(0n, -1n), { message: /0 to 8192 blocks/ });
  await healthy(t, cow);
  await cow.close();
});

/**
 * Crafted metadata: records whose Grass checksums are valid (written through the Grass API),
 * so only Cow's own checks stand between them and a crash, a huge allocation or minutes of
 * work. Each must come out as a CowCorruptionError naming what is wrong and where, with
 * nothing applied and the store still readable where that is possible.
 */
import test, { type ExecutionContext } from 'ava';
import { GrassLog, MemorySegmentStore } from '@pasture/grass';
import { CowStore } from './cow.ts';
import { CowCorruptionError } from './errors.ts';
import { fsckCow } from './fsck.ts';
import { CowNode, RC_BASE_GADDR, SUPERBLOCK_GADDR, decodeRefcounts, decodeSuperblock, encodeRefcounts, highWaterLimit } from './format.ts';
import { blockFor } from './simulator.ts';

/** Byte offsets of superblock fields in its record (4-byte metadata header, then the body; FORMAT.md). */
const SB_NEXT_GADDR = 4 + 16;
const SB_DATA_RECORDS = 4 + 32;
const SB_DATA_BYTES = 4 + 40;

/** A Cow store with block tag i+1 at each of `addrs`, closed. */
async function stored(addrs: bigint[], store = new MemorySegmentStore(256 * 1024, 512)): Promise<MemorySegmentStore> {
  const cow = await CowStore.create(await GrassLog.create(store, {}), { backgroundReaper: false });
  for (const [i, a] of addrs.entries()) await cow.write(a, blockFor(i + 1));
  await cow.close();
  return store;
}

/** Replace the record at `gaddr` with what `edit` makes of it, through Grass: its checksum is valid. */
async function craft(store: MemorySegmentStore, gaddr: number, edit: (rec: Uint8Array, grass: GrassLog) => Promise<Uint8Array | void> | Uint8Array | void): Promise<void> {
  const grass = await GrassLog.open(store.reopen(), {});
  const rec = await grass.read(gaddr);
  if (rec === undefined) throw new Error(`no record at ${gaddr}`);
  await grass.put(gaddr, (await edit(rec, grass)) ?? rec);
  await grass.flush();
  await grass.close();
}

function view(rec: Uint8Array): DataView {
  return new DataView(rec.buffer, rec.byteOffset, rec.byteLength);
}

function putU48(rec: Uint8Array, o: number, x: number): void {
  view(rec).setUint32(o, x % 2 ** 32, true);
  view(rec).setUint16(o + 4, Math.floor(x / 2 ** 32), true);
}

function putU64(rec: Uint8Array, o: number, x: number): void {
  view(rec).setUint32(o, x % 2 ** 32, true);
  view(rec).setUint32(o + 4, Math.floor(x / 2 ** 32), true);
}

async function open(store: MemorySegmentStore): Promise<CowStore> {
  return await CowStore.open(await GrassLog.open(store.reopen(), {}), { backgroundReaper: false });
}

function tagOf(b: Uint8Array | undefined): number | undefined {
  return b === undefined ? undefined : new DataView(b.buffer, b.byteOffset, 8).getFloat64(0, true);
}

/**
 * Time and ArrayBuffer memory that `fn` took (after a GC, if node exposes one). Tests that
 * measure are serial: AVA runs them before the others, so nothing else allocates meanwhile.
 */
async function measured<T>(fn: () => Promise<T>): Promise<{ result: T | unknown; ms: number; bytes: number }> {
  (globalThis as { gc?: () => void }).gc?.();
  const before = process.memoryUsage().arrayBuffers;
  const t0 = performance.now();
  let result: T | unknown;
  try {
    result = await fn();
  } catch (e) {
    result = e;
  }
  return { result, ms: performance.now() - t0, bytes: process.memoryUsage().arrayBuffers - before };
}

test.serial('an allocator high water beyond what the Grass store can hold fails the open, at once', async (t) => {
  const store = await stored([0n, 1n, 1000n]);
  // 2^46 is the top of the allocatable range (the decoder accepts it); 2^38 made open allocate 1 GiB.
  for (const claimed of [2 ** 46, 2 ** 38, highWaterLimit(256 * 1024, 512) + 1]) {
    await craft(store, SUPERBLOCK_GADDR, (rec) => putU48(rec, SB_NEXT_GADDR, claimed));
    const grass = await GrassLog.open(store.reopen(), {});
    const m = await measured(() => CowStore.open(grass, { backgroundReaper: false }));
    await grass.close();
    t.log(`high water ${claimed}: ${(m.result as Error).name}: ${(m.result as Error).message} (${m.ms.toFixed(0)} ms, ${(m.bytes / 2 ** 20).toFixed(1)} MiB)`);
    t.true(m.result instanceof CowCorruptionError, `high water ${claimed}: ${String(m.result)}`);
    t.regex((m.result as Error).message, new RegExp(`high water ${claimed}`));
    t.true(m.ms < 2000, `${m.ms} ms`);
    t.true(m.bytes < 16 * 2 ** 20, `${m.bytes} bytes`);
  }
  // The largest high water the store can hold opens, works, and fsck-free reads are right.
  await craft(store, SUPERBLOCK_GADDR, (rec) => putU48(rec, SB_NEXT_GADDR, highWaterLimit(256 * 1024, 512)));
  const cow = await open(store);
  t.is(tagOf(await cow.read(1000n)), 3);
  await cow.write(5n, blockFor(9));
  t.is(tagOf(await cow.read(5n)), 9);
  await cow.close();
});

test.serial('a large high water the store could hold costs memory for what exists, not for the claim', async (t) => {
  // 64 Ki segments of 16 MiB (1 TiB, materialized only where written): a high water of 2^34
  // is within what it could hold. Hints for every page it implies would take 64 MiB; the
  // allowance is for what Grass and the codec allocate along the way.
  const store = await stored([0n, 70000n], new MemorySegmentStore(16 * 1024 * 1024, 65536));
  await craft(store, SUPERBLOCK_GADDR, (rec) => putU48(rec, SB_NEXT_GADDR, 2 ** 34));
  const grass = await GrassLog.open(store.reopen(), {});
  const m = await measured(async () => {
    const cow = await CowStore.open(grass, { backgroundReaper: false });
    await cow.write(1n, blockFor(7));
    await cow.write(2n ** 100n, blockFor(8));
    return cow;
  });
  t.log(`open and two writes: ${m.ms.toFixed(0)} ms, ${(m.bytes / 2 ** 20).toFixed(1)} MiB`);
  t.true(m.result instanceof CowStore, String(m.result));
  const cow = m.result as CowStore;
  t.true(m.bytes < 8 * 2 ** 20, `${m.bytes} bytes`);
  t.is(tagOf(await cow.read(1n)), 7);
  t.is(tagOf(await cow.read(2n ** 100n)), 8);
  t.is(tagOf(await cow.read(70000n)), 2);
  // The freed low addresses were reused rather than the high water raised.
  t.true(cow.stats().allocator.highWater === 2 ** 34);
  await cow.close();
});

test.serial('fsck of a large high water the store could hold walks the refcount pages that exist, not every address', async (t) => {
  const store = await stored([0n, 70000n], new MemorySegmentStore(16 * 1024 * 1024, 65536));
  await craft(store, SUPERBLOCK_GADDR, (rec) => putU48(rec, SB_NEXT_GADDR, 2 ** 30));
  const cow = await open(store);
  const t0 = performance.now();
  const f = await fsckCow(cow);
  const ms = performance.now() - t0;
  t.log(`fsck with high water 2^30: ${ms.toFixed(0)} ms`);
  t.true(f.ok, f.problems.join('; '));
  t.true(ms < 5000, `${ms} ms`);
  // A record where no refcount page is, that nothing references: found by Grass's count.
  await cow.grass.put(5_000_000, new Uint8Array(16));
  const f2 = await fsckCow(cow);
  t.is(f2.counts.leaks, 1, f2.problems.join('; '));
  t.regex(f2.problems.join('; '), /Grass holds 1 records that fsck did not find/);
  await cow.close();
});

test('a refcount page that counts the address at the high water fails the write, not an assertion', async (t) => {
  const store = await stored([0n, 1n, 1000n]);
  let next = 0;
  await craft(store, SUPERBLOCK_GADDR, (rec) => {
    next = decodeSuperblock(rec).nextGaddr;
  });
  await craft(store, RC_BASE_GADDR, (rec) => {
    const page = decodeRefcounts(rec, RC_BASE_GADDR);
    page[next] = 1;
    return encodeRefcounts(page);
  });
  const cow = await open(store);
  const e = await t.throwsAsync(cow.write(5000n, blockFor(4)));
  t.true(e instanceof CowCorruptionError, String(e));
  t.regex(e!.message, new RegExp(`address ${next}\\b.*high water`));
  // Nothing was applied; what is stored still reads.
  t.is(await cow.read(5000n), undefined);
  t.is(tagOf(await cow.read(1000n)), 3);
  await cow.close();
});

test('superblock counters that a commit would take out of range fail it as corruption', async (t) => {
  const cases: { what: string; field: number; value: number; change: (cow: CowStore) => Promise<void>; re: RegExp }[] = [
    { what: 'a data record count too low for a trim', field: SB_DATA_RECORDS, value: 0, change: (cow) => cow.trim(0n, 1n), re: /data record count .*-1/ },
    { what: 'a data byte count near 2^53 for a new block', field: SB_DATA_BYTES, value: 2 ** 53 - 1, change: (cow) => cow.write(7777n, blockFor(5)), re: /data byte count .*out of range/ },
    { what: 'a data byte count too low for a smaller overwrite', field: SB_DATA_BYTES, value: 10, change: (cow) => cow.write(1000n, blockFor(1)), re: /data byte count .*-\d+/ },
  ];
  for (const c of cases) {
    // Block 1000n holds tag 3: random bytes, stored raw (4096 bytes); tag 1 compresses.
    const store = await stored([0n, 1n, 1000n]);
    await craft(store, SUPERBLOCK_GADDR, (rec) => putU64(rec, c.field, c.value));
    const cow = await open(store);
    // The second try finds the path cached (by the reads and usage below), so an overwrite
    // takes the fast path, which writes the superblock without a transaction.
    for (const path of ['cold cache', 'warm cache']) {
      const e = await t.throwsAsync(c.change(cow), undefined, `${c.what} (${path})`);
      t.true(e instanceof CowCorruptionError, `${c.what} (${path}): ${String(e)}`);
      t.regex(e!.message, c.re, `${c.what} (${path})`);
      t.regex(e!.message, /superblock/);
      t.is(tagOf(await cow.read(1000n)), 3);
      t.is(tagOf(await cow.read(0n)), 1);
      await cow.usage(0n, 2000n);
    }
    await cow.close();
  }
});

/** Root (height 2) -> A (height 1) -> L0 (height 0) for block 0; root -> B -> L1 for block 65536. */
async function twoLeaves(): Promise<{ store: MemorySegmentStore; root: number; a: number; b: number; l0: number; l1: number }> {
  const store = await stored([0n, 65536n]);
  const grass = await GrassLog.open(store.reopen(), {});
  const node = async (g: number): Promise<CowNode> => CowNode.decode((await grass.read(g))!, g);
  const sb = decodeSuperblock((await grass.read(SUPERBLOCK_GADDR))!);
  const rootNode = await node(sb.root);
  const a = rootNode.get(0);
  const b = rootNode.get(1);
  const l0 = (await node(a)).get(0);
  const l1 = (await node(b)).get(0);
  await grass.close();
  return { store, root: sb.root, a, b, l0, l1 };
}

/**
 * Point entry 0 of node `at` at `child` (whose refcount stays 1), then run a transaction that
 * writes block 1 and trims block 65536: it must fail as corruption matching `message`, and
 * leave what was stored readable and unchanged.
 */
async function repointedFailsTransaction(t: ExecutionContext, s: Awaited<ReturnType<typeof twoLeaves>>, at: number, child: number, message: RegExp): Promise<void> {
  await craft(s.store, at, (rec) => {
    const n = CowNode.decode(rec, at);
    n.set(0, child);
    return n.encode();
  });
  const cow = await open(s.store);
  const e = await t.throwsAsync(cow.transaction(async (tx) => {
    await tx.write(1n, blockFor(9));
    await tx.trim(65536n, 1n);
  }));
  t.true(e instanceof CowCorruptionError, String(e));
  t.regex(e!.message, message);
  t.is(tagOf(await cow.read(0n)), 1);
  t.is(await cow.read(1n), undefined);
  await cow.close();
}

test('a node referenced at two heights with refcount 1 fails the transaction as corruption', async (t) => {
  const s = await twoLeaves();
  // B's child (height 0 expected) is A, a node of height 1.
  await repointedFailsTransaction(t, s, s.b, s.a, new RegExp(`${s.a}\\b.*height`));
});

test('an address used as a node and as data, counted once, fails the commit as corruption', async (t) => {
  const s = await twoLeaves();
  // L1's block 65536 points at leaf L0's address.
  await repointedFailsTransaction(t, s, s.l1, s.l0, new RegExp(`address ${s.l0}\\b.*refcount`));
});

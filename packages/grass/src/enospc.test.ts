/** A full store says ENOSPC cleanly, keeps its data, and works again once space is freed. */
import test from 'ava';
import { GrassLog } from './grass.ts';
import { MemorySegmentStore } from './stores/memory.ts';
import { NoSpaceError } from './errors.ts';
import { fsck } from './fsck.ts';
import { MIN_SEGMENT_COUNT } from './format.ts';
import { greedy } from './policies.ts';

function block(tag: number): Uint8Array {
  return new Uint8Array(4096).map((_, i) => (tag * 7 + i) & 255);
}

test('fill to ENOSPC, keep every acknowledged record, free space, write again', async (t) => {
  const store = new MemorySegmentStore(128 * 1024, 40);
  const g = await GrassLog.create(store, { policy: greedy });
  let written = 0;
  let error: unknown;
  for (let i = 1; i <= 2000; i++) {
    try {
      await g.put(i, block(i));
      written = i;
    } catch (e) {
      error = e;
      break;
    }
  }
  t.true(error instanceof NoSpaceError, String(error));
  t.regex((error as Error).message, /store is full/);
  t.true(written > 400, `wrote ${written} records before ENOSPC`);
  // Still usable: reads of everything acknowledged, overwrites fail cleanly too.
  for (const i of [1, Math.floor(written / 2), written]) t.deepEqual(await g.read(i), block(i));
  await t.throwsAsync(g.put(written + 1, block(0)), { instanceOf: NoSpaceError });
  await g.flush();
  // Free half the records: the cleaner reclaims space and writes succeed again.
  for (let i = 1; i <= written; i += 2) await g.trim(i);
  // Three rounds of rewrites: more than the free segments hold, so the cleaner must run.
  for (let round = 0; round < 3; round++) for (let i = 1; i <= written; i += 4) await g.put(i, block(i + 1));
  await g.flush();
  const expect = (i: number): Uint8Array | undefined => (i % 4 === 1 ? block(i + 1) : i % 2 === 1 ? undefined : block(i));
  for (let i = 1; i <= written; i++) t.deepEqual(await g.read(i), expect(i), `record ${i}`);
  const st = g.stats();
  t.true(st.cleanerRecords > 0 || st.segmentsCleaned > 0);
  t.true(st.noSpaceErrors >= 2);
  await g.close();
  store.reopen();
  const report = await fsck(store);
  t.true(report.ok, report.problems.join('\n'));
  t.is(report.mappedAddresses, Math.ceil(written / 4) + Math.floor(written / 2));
});

test('the cleaner keeps up on a nearly full store (overwrite loop at 70% of raw capacity)', async (t) => {
  // 96 segments: in fewer, the reserve and the working room leave less than 70% for data.
  const store = new MemorySegmentStore(128 * 1024, 96);
  const g = await GrassLog.create(store, { policy: greedy });
  const usable = 96 * 128 * 1024;
  const n = Math.floor((usable * 0.7) / (4096 + 36));
  for (let i = 1; i <= n; i++) await g.put(i, block(i));
  let x = 12345;
  for (let k = 0; k < n * 6; k++) {
    x = (x * 1103515245 + 12345) >>> 0;
    const i = 1 + (x % n);
    await g.put(i, block(i + k));
    if (k % 997 === 0) await g.flush();
  }
  const st = g.stats();
  t.true(st.segmentsCleaned > 50, `cleaned ${st.segmentsCleaned}`);
  t.is(st.noSpaceErrors, 0);
  t.is(st.liveRecords, n);
  await g.close();
  store.reopen();
  t.true((await fsck(store)).ok);
});

test('bad arguments are rejected with clear errors and change nothing', async (t) => {
  const store = new MemorySegmentStore(128 * 1024, 16);
  const g = await GrassLog.create(store);
  await t.throwsAsync(g.put(0, block(1)), { code: 'EINVAL', message: /Grass address/ });
  await t.throwsAsync(g.put(-1, block(1)), { code: 'EINVAL' });
  await t.throwsAsync(g.put(1.5, block(1)), { code: 'EINVAL' });
  await t.throwsAsync(g.put(2 ** 53, block(1)), { code: 'EINVAL' });
  await t.throwsAsync(g.put(1, new Uint8Array(4097)), { code: 'EINVAL', message: /exceeds the limit of 4096/ });
  await t.throwsAsync(g.batch([{ op: 'put', gaddr: 1, data: block(1) }, { op: 'put', gaddr: 0, data: block(1) }]), { code: 'EINVAL' });
  t.is(await g.read(1), undefined, 'the valid half of a rejected batch was not applied');
  t.is(g.stats().userRecords, 0);
  await g.close();
  await t.throwsAsync(g.read(1), { code: 'ESHUTDOWN' });
});

test('tryBatch is a batch done at once while there is room, and refused with nothing done when batch would wait for the cleaner', async (t) => {
  const store = new MemorySegmentStore(128 * 1024, 32);
  const g = await GrassLog.create(store, { policy: greedy });
  const n = 200;
  for (let i = 1; i <= n; i++) await g.put(i, block(i));
  // Overwrites without ever yielding: the background cleaner cannot run, so garbage piles up
  // until tryBatch must refuse.
  const latest = new Map<number, number>();
  let done = 0;
  let refusedAt: number | undefined;
  for (let k = 0; k < 100_000; k++) {
    const i = 1 + (k % n);
    if (!g.tryBatch([{ op: 'put', gaddr: i, data: block(n + k) }])) {
      refusedAt = i;
      break;
    }
    t.is(g.size(i), 4096);
    latest.set(i, n + k);
    done++;
  }
  t.not(refusedAt, undefined, 'tryBatch never refused');
  t.true(done > 100, `${done} tryBatch calls before the first refusal`);
  // The refused put changed nothing; a put of the same record waits for the cleaner and lands.
  t.deepEqual(await g.read(refusedAt!), block(latest.get(refusedAt!) ?? refusedAt!));
  await g.put(refusedAt!, block(1_000_000));
  latest.set(refusedAt!, 1_000_000);
  t.true(g.tryBatch([{ op: 'put', gaddr: refusedAt!, data: block(1_000_001) }]), 'room again after the cleaner ran');
  latest.set(refusedAt!, 1_000_001);
  t.throws(() => g.tryBatch([{ op: 'put', gaddr: 0, data: block(1) }]), { code: 'EINVAL' });
  await g.flush();
  for (let i = 1; i <= n; i++) t.deepEqual(await g.read(i), block(latest.get(i) ?? i), `record ${i}`);
  await g.close();
  store.reopen();
  const reopened = await GrassLog.open(store);
  for (let i = 1; i <= n; i++) t.deepEqual(await reopened.read(i), block(latest.get(i) ?? i), `record ${i} after reopen`);
  await reopened.close();
});

/** Every address in `want` reads back as its value after a close and a reopen. */
async function survivesReopen(t: { is: (a: unknown, b: unknown, m?: string) => void }, store: MemorySegmentStore, g: GrassLog, want: Map<number, Uint8Array>): Promise<void> {
  await g.close();
  const again = await GrassLog.open(store.reopen());
  let lost = 0;
  for (const [a, v] of want) {
    const got = await again.read(a);
    if (got === undefined || Buffer.compare(got, v) !== 0) lost++;
  }
  t.is(lost, 0, `${lost} of ${want.size} acknowledged records lost after reopen`);
  await again.close();
}

test('a batch that creates many map pages leaves room for the checkpoint and the reopen that follow', async (t) => {
  // One-byte puts 1024 addresses apart: each creates a map page, which every checkpoint
  // writes. The reserve for checkpoints must grow with the batch, or it admits one that
  // leaves no room to checkpoint, and the store cannot even be reopened.
  const store = new MemorySegmentStore(128 * 1024, 200);
  const g = await GrassLog.create(store);
  const want = new Map<number, Uint8Array>();
  const ops = Array.from({ length: 3000 }, (_, i) => ({ op: 'put' as const, gaddr: i * 1024 + 1, data: new Uint8Array([i & 255]) }));
  try {
    await g.batch(ops);
    for (const op of ops) want.set(op.gaddr, op.data);
  } catch (e) {
    t.true(e instanceof NoSpaceError, String(e));
  }
  await g.flush();
  await g.checkpoint();
  await survivesReopen(t, store, g, want);
});

test('a batch packed into segments as badly as its records allow still fits what admission promised', async (t) => {
  // Records of 4057 bytes leave almost a whole record unused at the end of each 128 KiB
  // segment; admission must count that, or the batch runs out mid-way (the store fails) or
  // leaves no room to reopen.
  for (const segments of [530, 532]) {
    const store = new MemorySegmentStore(128 * 1024, segments);
    const g = await GrassLog.create(store, { policy: greedy });
    const ops = Array.from({ length: 16396 }, (_, i) => ({ op: 'put' as const, gaddr: i + 1, data: block(i).subarray(0, 4057) }));
    const want = new Map<number, Uint8Array>();
    try {
      await g.batch(ops);
      for (const op of ops) want.set(op.gaddr, op.data);
    } catch (e) {
      t.true(e instanceof NoSpaceError, `${segments} segments: ${String(e)}`);
    }
    t.is(g.failure, undefined, `${segments} segments: the store did not fail`);
    await g.flush();
    await survivesReopen(t, store, g, want);
  }
});

test('a full store still takes trims, which free space', async (t) => {
  const store = new MemorySegmentStore(128 * 1024, 40);
  const g = await GrassLog.create(store, { policy: greedy });
  let n = 0;
  const fill = async (data: (i: number) => Uint8Array): Promise<void> => {
    for (;;) {
      try {
        await g.put(n + 1, data(n + 1));
        n++;
      } catch (e) {
        t.true(e instanceof NoSpaceError);
        return;
      }
    }
  };
  await fill(block);
  await fill(() => new Uint8Array(0)); // the last scraps of room
  await g.flush();
  await g.trim(1);
  await g.batch(Array.from({ length: 50 }, (_, i) => ({ op: 'trim' as const, gaddr: 2 + i })));
  for (let i = 52; i <= n; i += 2) await g.trim(i);
  await g.flush();
  t.is(await g.read(1), undefined);
  // The trims freed space: writes go in again.
  await g.put(1, block(1));
  t.deepEqual(await g.read(1), block(1));
  await g.close();
});

test('a checkpoint refused for lack of room changes nothing: what was flushed survives the checkpoints and reopen after', async (t) => {
  const store = new MemorySegmentStore(128 * 1024, 64);
  const g = await GrassLog.create(store);
  const want = new Map<number, Uint8Array>();
  for (let i = 1; i <= 1300; i++) {
    await g.put(i, block(i));
    want.set(i, block(i));
  }
  await g.checkpoint();
  // In one tick: trims (whose segments are freed only after a flush), then puts that each make
  // a map page, then a checkpoint, which may find too little room.
  const trims = Array.from({ length: 620 }, (_, i) => ({ op: 'trim' as const, gaddr: i + 1 }));
  if (g.tryBatch(trims)) for (const op of trims) want.delete(op.gaddr);
  const puts = Array.from({ length: 300 }, (_, i) => ({ op: 'put' as const, gaddr: 250_000 + i * 1024 + 1, data: new Uint8Array([i & 255, 1]) }));
  if (g.tryBatch(puts)) for (const op of puts) want.set(op.gaddr, op.data);
  await g.checkpoint().catch((e: unknown) => t.true(e instanceof NoSpaceError, String(e)));
  t.is(g.failure, undefined);
  await g.flush();
  await g.checkpoint();
  await g.checkpoint();
  await survivesReopen(t, store, g, want);
});

test('the smallest store Grass opens holds no data and says so; a store with room for data takes it', async (t) => {
  for (const segmentBytes of [128 * 1024, 1 << 20]) {
    // MIN_SEGMENT_COUNT segments are all reserve and working room.
    const tiny = new MemorySegmentStore(segmentBytes, MIN_SEGMENT_COUNT);
    const g0 = await GrassLog.create(tiny);
    t.is(g0.stats().liveLimitBytes, 0);
    await t.throwsAsync(g0.put(1, block(0)), { instanceOf: NoSpaceError, message: /live records take/ });
    await g0.close();
    const again0 = await GrassLog.open(tiny.reopen());
    t.is(await again0.read(1), undefined);
    await again0.close();
    // 32 segments, as `pasture init` asks at least.
    const store = new MemorySegmentStore(segmentBytes, 32);
    const g = await GrassLog.create(store);
    let n = 0;
    try {
      for (; n < 10_000; n++) await g.put(n + 1, block(n)); // the first creates the map's first page
    } catch (e) {
      t.true(e instanceof NoSpaceError, String(e));
    }
    t.true(n >= (8 * segmentBytes) / 4096, `${segmentBytes}-byte segments: ${n} puts before ENOSPC`);
    await g.flush();
    await g.checkpoint();
    await g.close();
    const again = await GrassLog.open(store.reopen());
    t.deepEqual(await again.read(1), block(0));
    t.deepEqual(await again.read(n), block(n - 1));
    await again.close();
  }
});

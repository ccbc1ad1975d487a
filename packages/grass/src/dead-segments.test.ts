/**
 * Dead segments (nothing live left in them) are freed without the cleaner, and only once a
 * flush has made durable the records that superseded theirs.
 */
import test from 'ava';
import { GrassLog } from './grass.ts';
import { MemorySegmentStore } from './stores/memory.ts';
import { FaultySegmentStore } from './stores/faulty.ts';

const SEGMENT_BYTES = 128 * 1024;

function record(tag: number, bytes = 4096): Uint8Array {
  return new Uint8Array(bytes).map((_, i) => (tag * 31 + i) & 255);
}

/** A memory store that remembers which slots were ever written, and can hold syncs back. */
class WatchedStore extends MemorySegmentStore {
  readonly written = new Set<number>();
  hold = false;
  private held: (() => void)[] = [];

  override async write(segment: number, offset: number, data: Uint8Array): Promise<void> {
    this.written.add(segment);
    await super.write(segment, offset, data);
  }

  override async sync(): Promise<void> {
    if (this.hold) await new Promise<void>((resolve) => this.held.push(resolve));
    await super.sync();
  }

  get heldSyncs(): number {
    return this.held.length;
  }

  releaseSyncs(): void {
    this.hold = false;
    for (const r of this.held.splice(0)) r();
  }
}

const turns = async (n: number): Promise<void> => {
  for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
};

test('a region rewritten again and again reuses the slots it empties, without cleaning', async (t) => {
  const store = new WatchedStore(SEGMENT_BYTES, 256);
  // Checkpoints every 1 MiB: a dead segment is freed only once a checkpoint covers it.
  const faulty = new FaultySegmentStore(store, { seed: 10 });
  const g = await GrassLog.create(faulty, { backgroundCleaner: true, checkpointIntervalBytes: 1 << 20 });
  const REGION = 200; // about 7 segments of 4 KiB records
  const PASSES = 30;
  for (let pass = 0; pass < PASSES; pass++) {
    for (let a = 1; a <= REGION; a++) await g.put(a, record(pass * REGION + a));
    await g.flush();
  }
  const st = g.stats();
  t.log(`${store.written.size} slots written for ${PASSES} passes of ${REGION} records; ${st.deadSegmentsFreed} dead segments freed, ${st.segmentsCleaned} cleaned, ${st.cleanerRecords} records copied`);
  // 30 passes fill about 210 segments. Without reclaiming dead ones they would all be new
  // slots until the cleaner starts near the end of the store's 256.
  t.true(st.deadSegmentsFreed >= 150, `dead segments freed: ${st.deadSegmentsFreed}`);
  t.true(store.written.size <= 48, `${store.written.size} distinct slots written`);
  t.is(st.cleanerRecords, 0, 'nothing was copied: the dead segments held nothing live');
  for (let a = 1; a <= REGION; a++) t.deepEqual(await g.read(a), record((PASSES - 1) * REGION + a));
  // Every pass ended with a flush: a crash keeps the last one whole.
  await faulty.crash();
  const g2 = await GrassLog.open(new FaultySegmentStore(store, { seed: 13 }), {});
  for (let a = 1; a <= REGION; a++) t.deepEqual(await g2.read(a), record((PASSES - 1) * REGION + a), `address ${a} after a crash`);
  await g2.close();
});

test('a dead segment is freed only after a flush makes what superseded it durable', async (t) => {
  const store = new WatchedStore(SEGMENT_BYTES, 64);
  const faulty = new FaultySegmentStore(store, { seed: 11 });
  const g = await GrassLog.create(faulty, { backgroundCleaner: false, checkpointIntervalBytes: 1 << 30 });
  // Five segments' worth of 4 KiB records, then a checkpoint that covers them.
  const N = 160;
  for (let a = 1; a <= N; a++) await g.put(a, record(a));
  await g.flush();
  await g.checkpoint();
  const free0 = g.stats().freeSegments;
  // Supersede every one of them with a small record: these all fit in the open segment, so
  // nothing rolls over and no seal syncs; only the reclaim's own flush would.
  store.hold = true;
  for (let a = 1; a <= N; a++) await g.put(a, record(1000 + a, 16));
  await turns(20);
  const during = g.stats();
  t.true(store.heldSyncs > 0, 'the reclaim asked for a flush');
  t.true(during.pendingFreeSegments >= 4, `${during.pendingFreeSegments} segments picked`);
  t.is(during.deadSegmentsFreed, 0, 'no slot is free before the flush');
  t.is(during.freeSegments, free0);
  store.releaseSyncs();
  await g.flush();
  const after = g.stats();
  t.true(after.deadSegmentsFreed >= 4, `${after.deadSegmentsFreed} freed after the flush`);
  t.is(after.freeSegments, free0 + after.deadSegmentsFreed);
  await faulty.crash();
  const g2 = await GrassLog.open(new FaultySegmentStore(store, { seed: 12 }), { backgroundCleaner: false });
  for (let a = 1; a <= N; a++) t.deepEqual(await g2.read(a), record(1000 + a, 16), `address ${a} after the crash`);
  await g2.close();
});

test('dead segments waiting for a checkpoint bring one forward, however long the interval', async (t) => {
  const store = new WatchedStore(1 << 20, 400);
  // An interval longer than the whole run: only the early checkpoints can cover dead segments.
  const g = await GrassLog.create(store, { backgroundCleaner: true, checkpointIntervalBytes: 1 << 30 });
  const REGION = 6144; // 24 MiB of 4 KiB records
  const PASSES = 12;
  const rec = record(1);
  for (let pass = 0; pass < PASSES; pass++) {
    for (let a = 1; a <= REGION; a++) {
      rec[0] = pass;
      rec[1] = a & 255;
      await g.put(a, rec);
    }
    await g.flush();
  }
  const st = g.stats();
  t.log(`${store.written.size} slots written for ${PASSES} passes of 24 MiB; ${st.checkpoints} checkpoints, ${st.deadSegmentsFreed} dead segments freed`);
  // 288 MiB were written. Without early checkpoints nothing would be covered, so every pass
  // would take new slots (about 290 of them).
  t.true(st.checkpoints >= 3, `${st.checkpoints} checkpoints`);
  t.true(store.written.size <= 150, `${store.written.size} distinct slots written`);
  const got = await g.read(REGION);
  t.is(got?.[0], PASSES - 1);
  await g.close();
});

test('an address overwritten in place again and again: each segment it fills is freed once it rolls over', async (t) => {
  const store = new WatchedStore(SEGMENT_BYTES, 64);
  const g = await GrassLog.create(store, { backgroundCleaner: true, checkpointIntervalBytes: 1 << 20 });
  // About 1800 records of 16 bytes fill a segment: 40 000 fill about 22, every record but the
  // newest dead. The old record dies before the new one counts, so the open segment's live
  // bytes touch 0 on every write; only rolled-over segments may be noted, or the list grows
  // by one entry per write (an assertion bounds it by the slot count).
  const WRITES = 40_000;
  for (let i = 1; i <= WRITES; i++) await g.put(7, record(i, 16));
  await g.flush();
  const st = g.stats();
  t.log(`${st.deadSegmentsFreed} dead segments freed, ${st.segmentsCleaned} cleaned, ${store.written.size} slots written`);
  t.true(st.deadSegmentsFreed + st.segmentsCleaned >= 10, `segments freed: ${st.deadSegmentsFreed} dead, ${st.segmentsCleaned} cleaned`);
  t.deepEqual(await g.read(7), record(WRITES, 16));
  await g.close();
});

test('a segment already dead when it rolls over is freed too (written and trimmed inside it)', async (t) => {
  const store = new WatchedStore(SEGMENT_BYTES, 64);
  const g = await GrassLog.create(store, { backgroundCleaner: false, checkpointIntervalBytes: 1 << 20 });
  // Each round writes a record and trims it. A segment's last live record mostly dies inside
  // that segment, and the next death is in the next segment: nothing after the rollover
  // would notice that the segment is dead.
  const ROUNDS = 12_000; // about 28 segments
  for (let round = 0; round < ROUNDS; round++) {
    await g.put(1, record(round, 256));
    await g.batch([{ op: 'trim', gaddr: 1 }]);
  }
  await g.flush();
  const st = g.stats();
  t.log(`${st.deadSegmentsFreed} dead segments freed, ${store.written.size} slots written`);
  t.true(st.deadSegmentsFreed >= 20, `${st.deadSegmentsFreed} dead segments freed`);
  t.true(store.written.size <= 16, `${store.written.size} distinct slots written`);
  t.is(await g.read(1), undefined);
  await g.close();
});

/**
 * Grass under concurrent callers: batches admitted together, overwrites racing on a full
 * store, and cleaning rounds started beside one another. Each case is a finding of a review
 * (check-then-act across an await) and fails on the code before its fix.
 */
import test from 'ava';
import { NoSpaceError } from './errors.ts';
import { GrassLog } from './grass.ts';
import { FaultySegmentStore } from './stores/faulty.ts';
import { MemorySegmentStore } from './stores/memory.ts';

const block = (tag: number): Uint8Array => new Uint8Array(4096).map((_, i) => (tag * 7 + i) & 255);

test('batches waiting for room together keep the limits: the store reopens after a crash', async (t) => {
  const inner = new MemorySegmentStore(128 * 1024, 48);
  const faulty = new FaultySegmentStore(inner, { seed: 3 });
  const g = await GrassLog.create(faulty, { backgroundCleaner: false });
  // 42 batches of 30 records at once, 64 addresses apart (many map pages). A seal wakes every
  // waiting batch; each saw room in admission, and all of them went in.
  const settled = await Promise.allSettled(Array.from({ length: 42 }, (_, b) =>
    g.batch(Array.from({ length: 30 }, (_, i) => ({ op: 'put' as const, gaddr: 1 + (b * 30 + i) * 64, data: block(b * 30 + i) })))));
  const admitted = settled.filter((s) => s.status === 'fulfilled').length;
  for (const s of settled) if (s.status === 'rejected') t.true(s.reason instanceof NoSpaceError, String(s.reason));
  await g.flush();
  const st = g.stats();
  t.log(`${admitted} of 42 admitted; free ${st.freeSegments}, reserve ${st.reserveSegments}`);
  t.true(st.freeSegments >= st.reserveSegments, 'the reserve is kept');
  t.true(admitted < 42, 'the rest get NoSpaceError');
  await faulty.crash();
  const again = await GrassLog.open(new FaultySegmentStore(inner, { seed: 4 }), { backgroundCleaner: false });
  for (const [b, s] of settled.entries()) {
    if (s.status !== 'fulfilled') continue;
    t.deepEqual(await again.read(1 + b * 30 * 64), block(b * 30), `batch ${b} reads back`);
  }
  await again.close();
});

test('same-size overwrites on a full store go in when many batches race for room', async (t) => {
  for (const concurrent of [6, 12]) {
    const g = await GrassLog.create(new MemorySegmentStore(128 * 1024, 64), { backgroundCleaner: false });
    let n = 0;
    for (;; n++) {
      try {
        await g.put(n + 1, block(n));
      } catch (e) {
        if (!(e instanceof NoSpaceError)) throw e;
        break;
      }
    }
    await g.flush();
    await g.checkpoint();
    const tags = new Map<number, number>();
    for (let a = 1; a <= n; a++) tags.set(a, a - 1);
    let x = 1;
    let failed = 0;
    for (let round = 0; round < 10; round++) {
      const batches = Array.from({ length: concurrent }, () => {
        const set = new Set<number>();
        while (set.size < 30) {
          x = (x * 1103515245 + 12345) >>> 0;
          set.add(1 + (x % n));
        }
        return [...set];
      });
      const results = await Promise.allSettled(batches.map((addrs) => g.batch(addrs.map((a) => ({ op: 'put' as const, gaddr: a, data: block(a + 7 + round) })))));
      for (const [i, r] of results.entries()) {
        if (r.status === 'rejected') failed++;
        else for (const a of batches[i]!) tags.set(a, a + 7 + round);
      }
    }
    t.is(failed, 0, `${concurrent} at once: every overwrite batch went in (the store was full with ${n} records)`);
    t.is(g.failure, undefined);
    for (const [a, tag] of tags) if (Buffer.compare((await g.read(a))!, block(tag)) !== 0) t.fail(`address ${a}`);
    await g.close();
  }
});

/** A store whose first whole-segment read (a cleaner's read of its first victim) waits for a gate. */
class GateStore extends MemorySegmentStore {
  gate: Promise<void> | undefined;
  override async read(segment: number, offset: number, length: number): Promise<Uint8Array> {
    const bytes = await super.read(segment, offset, length);
    if (this.gate !== undefined && length === this.segmentBytes) {
      const g = this.gate;
      this.gate = undefined;
      await g;
    }
    return bytes;
  }
}

test('two cleaning rounds started together do not free a segment that new data reused', async (t) => {
  const inner = new GateStore(128 * 1024, 48);
  const g = await GrassLog.create(inner, { backgroundCleaner: false, cleanerBatchSegments: 2 });
  const tags = new Map<number, number>();
  const put = async (a: number, tag: number): Promise<void> => {
    await g.put(a, block(tag));
    tags.set(a, tag);
  };
  for (let i = 1; i <= 180; i++) await put(i, i);
  for (let i = 1; i <= 180; i += 2) await put(i, 1000 + i);
  await g.flush();
  await g.checkpoint();
  await g.checkpoint();
  let release!: () => void;
  inner.gate = new Promise<void>((r) => (release = r));
  const first = g.cleanRound(); // waits in the read of its first victim
  await new Promise((r) => setTimeout(r, 10));
  const second = g.cleanRound(); // used to take the same victims, clean, free and hand them out
  for (let i = 181; i <= 300; i++) await put(i, i);
  release();
  await first;
  await second;
  for (let i = 301; i <= 420; i++) await put(i, i);
  await g.flush();
  let bad = 0;
  for (const [a, tag] of tags) {
    const got = await g.read(a).catch(() => undefined);
    if (got === undefined || Buffer.compare(got, block(tag)) !== 0) bad++;
  }
  t.is(bad, 0, `${bad} of ${tags.size} addresses read wrong`);
  t.is(g.failure, undefined);
  await g.close();
  const again = await GrassLog.open(inner.reopen(), { backgroundCleaner: false });
  for (const [a, tag] of tags) t.deepEqual(await again.read(a), block(tag));
  await again.close();
});

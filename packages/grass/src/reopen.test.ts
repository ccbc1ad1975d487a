/**
 * A store opens again after any crash: the reopen's checkpoint always finds room. Three things
 * keep it so, each tested here: the reserve comes back before an open hands the store out, live
 * records never fill the room outside the reserve (garbage stays for the cleaner to win it back
 * from), and a checkpoint a crash cut short gives its segments back at once.
 */
import test from 'ava';
import { GrassLog } from './grass.ts';
import { MemorySegmentStore } from './stores/memory.ts';
import { FaultySegmentStore } from './stores/faulty.ts';
import { InvalidArgumentError, NoSpaceError } from './errors.ts';
import { FOOTER_BYTES, MAP_PAGE_ENTRIES, SEGMENT_HEADER_BYTES } from './format.ts';
import { costBenefit, greedy, sepbit } from './policies.ts';

function block(tag: number): Uint8Array {
  return new Uint8Array(4096).map((_, i) => (tag * 7 + i) & 255);
}

async function fill(g: GrassLog, address: (i: number) => number = (i) => i + 1): Promise<{ n: number; error: unknown }> {
  for (let n = 0; ; n++) {
    try {
      await g.put(address(n), block(n));
    } catch (error) {
      return { n, error };
    }
  }
}

test('crashes in a row, each before the cleaner ran, leave a store that opens with its reserve back', async (t) => {
  const inner = new MemorySegmentStore(128 * 1024, 40);
  // No background cleaner: the crashes come faster than it would run.
  const options = { backgroundCleaner: false };
  let faulty = new FaultySegmentStore(inner, { seed: 1 });
  let g = await GrassLog.create(faulty, options);
  const { n, error } = await fill(g);
  t.true(error instanceof NoSpaceError, String(error));
  await g.flush();
  const tags = Array.from({ length: n }, (_, i) => i);
  let freedAtOpen = 0;
  for (let cycle = 0; cycle < 30; cycle++) {
    // A small overwrite, flushed. It fits the open segment, so nothing asks the cleaner for
    // room; the crash then leaves every stream's tail half full, and the reopen opens new ones.
    const i = (cycle * 37) % n;
    await g.put(i + 1, block(1000 + cycle));
    tags[i] = 1000 + cycle;
    await g.flush();
    await faulty.crash();
    faulty = new FaultySegmentStore(inner, { seed: cycle + 2 });
    g = await GrassLog.open(faulty, options);
    freedAtOpen += g.recovery!.freedAtOpen;
    const st = g.stats();
    t.true(st.freeSegments >= st.reserveSegments, `cycle ${cycle}: ${st.freeSegments} free segments, ${st.reserveSegments} reserved`);
  }
  t.true(freedAtOpen > 0, 'the opens had to clean');
  for (let i = 0; i < n; i++) t.deepEqual(await g.read(i + 1), block(tags[i]!), `address ${i + 1}`);
  await g.close();
});

test('live records fill at most maxLiveShare of the room outside the reserve; overwrites and trims still go in', async (t) => {
  const segments = 64;
  const usable = 128 * 1024 - SEGMENT_HEADER_BYTES - FOOTER_BYTES;
  const g = await GrassLog.create(new MemorySegmentStore(128 * 1024, segments), { policy: greedy });
  const full = await fill(g);
  t.true(full.error instanceof NoSpaceError, String(full.error));
  t.regex((full.error as Error).message, /live records take \d+ bytes/);
  const st = g.stats();
  const room = (segments - st.reserveSegments) * usable;
  t.true(st.liveLimitBytes < 0.9 * room, `limit ${st.liveLimitBytes} of ${room} bytes outside the reserve`);
  t.true(st.liveBytes <= st.liveLimitBytes && st.liveBytes > 0.9 * st.liveLimitBytes, `${st.liveBytes} live bytes, limit ${st.liveLimitBytes}`);
  // The admission's own measure: at the limit, within one more record of it.
  t.true(st.liveLogBytes <= st.liveLimitBytes && st.liveLogBytes > st.liveLimitBytes - 2 * block(0).length, `${st.liveLogBytes} log bytes live, limit ${st.liveLimitBytes}`);
  // At the limit: an overwrite of the same size goes in, a new address does not, until a trim
  // makes room for it.
  await g.put(1, block(99));
  t.deepEqual(await g.read(1), block(99));
  await t.throwsAsync(g.put(full.n + 1, block(1)), { instanceOf: NoSpaceError });
  await g.trim(2);
  await g.put(full.n + 1, block(1));
  t.deepEqual(await g.read(full.n + 1), block(1));
  await g.close();

  // The share is an option: half as much goes into a store that keeps half free.
  const half = await GrassLog.create(new MemorySegmentStore(128 * 1024, segments), { policy: greedy, maxLiveShare: 0.5 });
  const some = await fill(half);
  t.true(some.error instanceof NoSpaceError, String(some.error));
  const ratio = some.n / full.n;
  t.true(ratio > 0.5 && ratio < 0.6, `0.5 took ${some.n} records, 0.9 took ${full.n}`);
  await half.close();
  for (const maxLiveShare of [0, 1.5, Number.NaN]) {
    await t.throwsAsync(GrassLog.create(new MemorySegmentStore(128 * 1024, segments), { maxLiveShare }), { instanceOf: InvalidArgumentError });
  }
});

test('a full store takes overwrites of what it holds, also when small or with a large map', async (t) => {
  for (const policy of [greedy, costBenefit, sepbit]) {
    for (const { segments, stride } of [{ segments: 24, stride: 1 }, { segments: 40, stride: 1 }, { segments: 64, stride: 97 }]) {
      const what = `${policy.name}, ${segments} segments, stride ${stride}`;
      const g = await GrassLog.create(new MemorySegmentStore(128 * 1024, segments), { policy });
      const address = (i: number): number => 1 + i * stride;
      const { n, error } = await fill(g, address);
      t.true(error instanceof NoSpaceError && n > 0, `${what}: ${n} records, then ${String(error)}`);
      const tags = Array.from({ length: n }, (_, i) => i);
      let x = 7;
      for (let k = 0; k < 300; k++) {
        x = (x * 1103515245 + 12345) >>> 0;
        const i = x % n;
        tags[i] = 10_000 + k;
        await g.put(address(i), block(tags[i]!));
      }
      // The same address twice in a batch counts once; trims with an overwrite go in together.
      const i0 = 0;
      await g.batch([{ op: 'put', gaddr: address(i0), data: block(1) }, { op: 'put', gaddr: address(i0), data: block(2) }]);
      tags[i0] = 2;
      const trimmed = [1, 2, 3, 4, 5, 6, 7, 8].filter((i) => i < n);
      await g.batch([...trimmed.map((i) => ({ op: 'trim' as const, gaddr: address(i) })), { op: 'put', gaddr: address(n - 1), data: block(3) }]);
      tags[n - 1] = 3;
      for (let i = 0; i < n; i++) {
        const want = trimmed.includes(i) ? undefined : block(tags[i]!);
        if (!sameBytes(await g.read(address(i)), want)) t.fail(`${what}: address ${address(i)}`);
      }
      await g.close();
    }
  }
  t.pass();
});

function sameBytes(a: Uint8Array | undefined, b: Uint8Array | undefined): boolean {
  return a === undefined || b === undefined ? a === b : Buffer.compare(a, b) === 0;
}

test('a checkpoint a crash cut short gives its segments back at the reopen', async (t) => {
  const inner = new MemorySegmentStore(128 * 1024, 128);
  const options = { backgroundCleaner: false };
  let faulty = new FaultySegmentStore(inner, { seed: 7 });
  let g = await GrassLog.create(faulty, options);
  // One address per map page: 200 pages, each 10 KiB in every checkpoint that writes it.
  const pages = 200;
  const address = (i: number): number => 1 + i * MAP_PAGE_ENTRIES;
  for (let i = 0; i < pages; i++) await g.put(address(i), block(i));
  await g.checkpoint();
  for (let i = 0; i < pages; i++) await g.put(address(i), block(500 + i));
  await g.flush();
  // Crash part way through the checkpoint that writes all 200 pages again (16 segments).
  faulty.options.crashAtOp = faulty.mutatingOpCount + 25;
  await t.throwsAsync(g.checkpoint());
  t.true(faulty.isCrashed);
  faulty = new FaultySegmentStore(inner, { seed: 8 });
  g = await GrassLog.open(faulty, options);
  t.true(g.recovery!.abandonedCheckpointSegments >= 2, `${g.recovery!.abandonedCheckpointSegments} segments of the cut checkpoint freed`);
  for (let i = 0; i < pages; i++) t.deepEqual(await g.read(address(i)), block(500 + i), `address ${address(i)}`);
  await g.close();
});

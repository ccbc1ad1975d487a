/** A flush covers what came before it, and does not wait for writes that come after it. */
import test from 'ava';
import { GrassLog } from './grass.ts';
import { MemorySegmentStore } from './stores/memory.ts';
import { FaultySegmentStore } from './stores/faulty.ts';
import { FileSegmentStore } from './stores/file.ts';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

function block(tag: number): Uint8Array {
  return new Uint8Array(4096).map((_, i) => (tag * 13 + i) & 255);
}

test('a flush during a stream of writes returns while the stream goes on, and every write before it survives a crash', async (t) => {
  const inner = new MemorySegmentStore(128 * 1024, 512);
  const faulty = new FaultySegmentStore(inner, { seed: 7 });
  const g = await GrassLog.create(faulty, { backgroundCleaner: false });
  const LIMIT = 20_000;
  let written = 0;
  let stop = false;
  // A writer that keeps rolling segments over (128 KiB segments: one every 31 records).
  const writer = (async () => {
    while (!stop && written < LIMIT) {
      written++;
      await g.put(1 + (written % 4000), block(written));
      // Let timers and I/O in now and then, as a real client's requests would.
      if (written % 8 === 0) await new Promise((r) => setImmediate(r));
    }
  })();
  while (written < 300) await new Promise((r) => setImmediate(r));
  const before = written;
  await g.flush();
  const atFlush = written;
  stop = true;
  await writer;
  t.true(atFlush < LIMIT, `the flush waited for the writer to stop (${atFlush} writes)`);
  t.log(`flush issued after ${before} writes returned after ${atFlush}`);
  // Crash: everything written before the flush was issued is there, whatever else is lost.
  await faulty.crash();
  const g2 = await GrassLog.open(new FaultySegmentStore(inner, { seed: 8 }), { backgroundCleaner: false });
  for (let k = Math.max(1, before - 3999); k <= before; k++) {
    const got = await g2.read(1 + (k % 4000));
    // A later write of the same address may have survived too.
    const ok = got !== undefined && [...Array(written - k + 1).keys()].some((d) => (d === 0 || (k + d) % 4000 === k % 4000) && Buffer.compare(Buffer.from(got), Buffer.from(block(k + d))) === 0);
    if (!ok) {
      t.fail(`write ${k} (address ${1 + (k % 4000)}) was lost although a flush after it returned`);
      break;
    }
  }
  await g2.close();
  t.pass();
});

test('on a file store, a flush during a stream of writes returns before the stream ends', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'pasture-flush-'));
  try {
    const store = await FileSegmentStore.create(dir, { segmentBytes: 128 * 1024, segmentCount: 2048 });
    const g = await GrassLog.create(store, { backgroundCleaner: false });
    const LIMIT = 30_000;
    let written = 0;
    let stop = false;
    const writer = (async () => {
      while (!stop && written < LIMIT) {
        written++;
        await g.put(1 + (written % 4000), block(written));
        if (written % 8 === 0) await new Promise((r) => setImmediate(r));
      }
    })();
    while (written < 2000) await new Promise((r) => setImmediate(r));
    const before = written;
    await g.flush();
    const atFlush = written;
    stop = true;
    await writer;
    t.log(`flush issued after ${before} writes returned after ${atFlush}`);
    t.true(atFlush < LIMIT, `the flush waited for the writer to stop (${atFlush} writes)`);
    await g.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

/** A flush covers what came before it, and does not wait for writes that come after it. */
import test from 'ava';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { GrassLog } from './grass.ts';
import { MemorySegmentStore } from './stores/memory.ts';
import { FaultySegmentStore } from './stores/faulty.ts';
import { FileSegmentStore } from './stores/file.ts';

const ADDRESSES = 4000;

function block(tag: number): Uint8Array {
  return new Uint8Array(4096).map((_, i) => (tag * 13 + i) & 255);
}

/**
 * Write k = 1, 2, ... (block(k) at address 1 + k % ADDRESSES) until `limit` writes, yielding to
 * timers and I/O every 8 as a real client's requests would; after `flushAfter` writes, flush
 * once. Returns the write counts when the flush was issued, when it returned, and at the end.
 */
async function flushDuringWrites(g: GrassLog, flushAfter: number, limit: number): Promise<{ before: number; atFlush: number; written: number }> {
  let written = 0;
  let stop = false;
  const writer = (async () => {
    while (!stop && written < limit) {
      written++;
      await g.put(1 + (written % ADDRESSES), block(written));
      if (written % 8 === 0) await new Promise((r) => setImmediate(r));
    }
  })();
  while (written < flushAfter) await new Promise((r) => setImmediate(r));
  const before = written;
  await g.flush();
  const atFlush = written;
  stop = true;
  await writer;
  return { before, atFlush, written };
}

test('every write issued before a flush survives a crash, while writes go on', async (t) => {
  const inner = new MemorySegmentStore(128 * 1024, 512);
  const faulty = new FaultySegmentStore(inner, { seed: 7 });
  const g = await GrassLog.create(faulty, { backgroundCleaner: false });
  const LIMIT = 20_000;
  const { before, atFlush, written } = await flushDuringWrites(g, 300, LIMIT);
  t.true(atFlush < LIMIT, `the flush waited for the writer to stop (${atFlush} writes)`);
  // Crash: everything written before the flush was issued is there, whatever else is lost.
  await faulty.crash();
  const g2 = await GrassLog.open(new FaultySegmentStore(inner, { seed: 8 }), { backgroundCleaner: false });
  for (let k = Math.max(1, before - ADDRESSES + 1); k <= before; k++) {
    const got = await g2.read(1 + (k % ADDRESSES));
    // Write k, or a later write of the same address (k + ADDRESSES, ...) that survived too.
    let ok = false;
    for (let later = k; later <= written && !ok; later += ADDRESSES) ok = got !== undefined && Buffer.compare(Buffer.from(got), Buffer.from(block(later))) === 0;
    if (!ok) {
      t.fail(`write ${k} (address ${1 + (k % ADDRESSES)}) was lost although a flush after it returned`);
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
    const { before, atFlush } = await flushDuringWrites(g, 2000, LIMIT);
    t.log(`flush issued after ${before} writes returned after ${atFlush}`);
    t.true(atFlush < LIMIT, `the flush waited for the writer to stop (${atFlush} writes)`);
    await g.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

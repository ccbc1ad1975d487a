/**
 * Corruption is detected, reported with its segment and offset, and never returned as data:
 * bit flips in records, summaries and superblocks, torn writes and misdirected reads.
 */
import test from 'ava';
import { GrassLog } from './grass.ts';
import { MemorySegmentStore } from './stores/memory.ts';
import { FaultySegmentStore } from './stores/faulty.ts';
import { CorruptionError } from './errors.ts';
import { fsck } from './fsck.ts';
import { FOOTER_BYTES, MAP_ENTRY_BYTES, RECORD_HEADER_BYTES, SUMMARY_ENTRY_BYTES, SUPERBLOCK_BYTES } from './format.ts';
import { decodeFooter, decodeSummaryEntry, encodeFooter, encodeRecord, encodeSummaryEntry, peekRecordHeader, segmentSeed, summaryOffset, type SegmentFooter } from './records.ts';
import { crc32c } from './crc32c.ts';

/** Rewrite the checksum of the record at `offset` of `seg` after its payload was changed. */
function resealRecord(seg: Uint8Array, offset: number, seed: number): void {
  const view = new DataView(seg.buffer, seg.byteOffset, seg.byteLength);
  const h = peekRecordHeader(view, offset, seg.length)!;
  const payload = seg.slice(offset + RECORD_HEADER_BYTES, offset + RECORD_HEADER_BYTES + h.length);
  encodeRecord(seg, view, offset, seed, h, payload);
}

const SEG = 128 * 1024;

function block(tag: number, n = 4096): Uint8Array {
  return new Uint8Array(n).map((_, i) => (tag * 31 + i) & 255);
}

async function filled(count = 100): Promise<{ store: MemorySegmentStore; g: GrassLog }> {
  const store = new MemorySegmentStore(SEG, 32);
  const g = await GrassLog.create(store, { backgroundCleaner: false });
  for (let i = 1; i <= count; i++) await g.put(i, block(i));
  await g.flush();
  return { store, g };
}

test('a flipped payload bit is a CorruptionError naming segment and offset, and fsck finds it', async (t) => {
  const { store, g } = await filled();
  const loc = g.inspect().map.get(10)!;
  await g.close();
  store.reopen();
  store.rawSegment(loc.slot)[loc.offset + RECORD_HEADER_BYTES + 100]! ^= 0x10;
  const g2 = await GrassLog.open(store, { backgroundCleaner: false });
  const err = await t.throwsAsync(g2.read(10), { instanceOf: CorruptionError });
  t.is(err!.where.segment, loc.slot);
  t.is(err!.where.offset, loc.offset);
  t.regex(err!.message, /checksum/);
  t.deepEqual(await g2.read(11), block(11), 'other records still read');
  t.is(g2.stats().corruptReads, 1);
  await g2.close();
  store.reopen();
  const report = await fsck(store);
  t.false(report.ok);
  t.true(report.problems.some((p) => p.includes(`segment ${loc.slot}`) && p.includes('checksum')), report.problems.join('\n'));
});

test('a misdirected read (record of another address) is detected', async (t) => {
  const { store, g } = await filled();
  const a = g.inspect().map.get(20)!;
  const b = g.inspect().map.get(21)!;
  await g.close();
  store.reopen();
  // Copy record 21 over record 20: a valid record, but for the wrong address.
  const seg = store.rawSegment(a.slot);
  const src = store.rawSegment(b.slot).slice(b.offset, b.offset + RECORD_HEADER_BYTES + b.length);
  seg.set(src, a.offset);
  const g2 = await GrassLog.open(store, { backgroundCleaner: false });
  await t.throwsAsync(g2.read(20), { instanceOf: CorruptionError, message: /address 21|misdirected|checksum/ });
  await g2.close();
});

test('the cleaner refuses to launder a corrupt record into a fresh checksum', async (t) => {
  const store = new MemorySegmentStore(SEG, 32);
  const g = await GrassLog.create(store, { backgroundCleaner: false });
  for (let i = 1; i <= 60; i++) await g.put(i, block(i));
  for (let i = 2; i <= 60; i++) await g.trim(i); // segment now mostly dead: a good victim
  await g.checkpoint();
  const loc = g.inspect().map.get(1)!;
  store.rawSegment(loc.slot)[loc.offset + RECORD_HEADER_BYTES + 5]! ^= 1;
  for (let i = 0; i < 4; i++) await g.cleanRound().catch(() => undefined);
  await t.throwsAsync(g.read(1), { instanceOf: CorruptionError });
  t.true(g.stats().damagedSegments >= 1);
  await g.close();
});

test('a corrupt newest superblock falls back to the older one, and says so', async (t) => {
  const { store, g } = await filled(30);
  await g.checkpoint();
  const gen = g.stats().generation;
  await g.close(); // writes one more checkpoint
  store.reopen();
  const newest = ((gen + 1) % 2) as 0 | 1;
  store.rawSuperblock(newest)![40]! ^= 0xff;
  const problems: string[] = [];
  const g2 = await GrassLog.open(store, { onRecoveryProblem: (m) => problems.push(m), backgroundCleaner: false });
  t.true(problems.some((p) => p.includes(`superblock ${newest}`) && p.includes('checksum')), problems.join('\n'));
  for (let i = 1; i <= 30; i++) t.deepEqual(await g2.read(i), block(i));
  await g2.close();
});

test('both superblocks corrupt: open fails with a clear error, never guesses', async (t) => {
  const { store, g } = await filled(5);
  await g.close();
  store.reopen();
  for (const s of [0, 1] as const) store.rawSuperblock(s)!.fill(0xaa, 0, SUPERBLOCK_BYTES);
  await t.throwsAsync(GrassLog.open(store), { message: /no valid Grass superblock.*superblock 0: bad magic.*superblock 1: bad magic/ });
});

test('a torn write in the unsealed tail ends the log there, and recovery reports it', async (t) => {
  const inner = new MemorySegmentStore(SEG, 32);
  const faulty = new FaultySegmentStore(inner, { seed: 3 });
  const g = await GrassLog.create(faulty, { backgroundCleaner: false });
  for (let i = 1; i <= 10; i++) await g.put(i, block(i));
  await g.flush();
  for (let i = 11; i <= 20; i++) await g.put(i, block(i));
  // Write the unflushed records but crash before the sync: some sectors land, some do not.
  faulty.options.crashAtOp = faulty.mutatingOpCount + 2;
  await t.throwsAsync(g.flush());
  t.true(faulty.isCrashed);
  const problems: string[] = [];
  const g2 = await GrassLog.open(new FaultySegmentStore(inner, { seed: 4 }), { onRecoveryProblem: (m) => problems.push(m), backgroundCleaner: false });
  for (let i = 1; i <= 10; i++) t.deepEqual(await g2.read(i), block(i), `flushed record ${i} survives`);
  // Unflushed records are all-or-nothing each, and form a prefix.
  let seenMissing = false;
  for (let i = 11; i <= 20; i++) {
    const got = await g2.read(i);
    if (got === undefined) seenMissing = true;
    else {
      t.false(seenMissing, `record ${i} survived after an earlier one was lost`);
      t.deepEqual(got, block(i));
    }
  }
  t.regex(g2.recovery!.streams[0]!.end, /log ends at offset \d+/);
  await g2.close();
});

test('a batch a crash cut short is dropped whole at recovery, and fsck does not take that for damage', async (t) => {
  // Crashes inside the flush of a 20-record batch: where some of it reached the disk,
  // recovery drops the part (reported in its stream's figures), and fsck passes.
  let torn = 0;
  for (let seed = 1; seed <= 24; seed++) {
    const inner = new MemorySegmentStore(SEG, 32);
    const faulty = new FaultySegmentStore(inner, { seed });
    const g = await GrassLog.create(faulty, { backgroundCleaner: false });
    for (let i = 1; i <= 10; i++) await g.put(i, block(i));
    await g.flush();
    // Small records, several to a 512-byte sector: a torn write often keeps a prefix of them.
    await g.batch(Array.from({ length: 20 }, (_, i) => ({ op: 'put' as const, gaddr: 100 + i, data: block(100 + i, 100) })));
    faulty.options.crashAtOp = faulty.mutatingOpCount + 2; // in the sync after the write: the crash decides what of it landed
    await g.flush().catch(() => undefined);
    if (!faulty.isCrashed) await faulty.crash();
    const report = await fsck(new FaultySegmentStore(inner, { seed: 99 }));
    t.true(report.ok, `seed ${seed}: ${report.problems.join('; ')}`);
    const dropped = report.recovery!.streams.reduce((a, r) => a + r.droppedRecords, 0);
    if (dropped > 0) torn++;
    const g2 = await GrassLog.open(new FaultySegmentStore(inner, { seed: 98 }), { backgroundCleaner: false });
    const kept = (await Promise.all(Array.from({ length: 20 }, (_, i) => g2.read(100 + i)))).filter((x) => x !== undefined).length;
    t.true(kept === 0 || kept === 20, `seed ${seed}: the batch is all or nothing (${kept} of 20)`);
    for (let i = 1; i <= 10; i++) t.deepEqual(await g2.read(i), block(i));
    await g2.close();
  }
  t.log(`${torn} of 24 crashes left part of the batch to drop`);
  t.true(torn > 0, 'some crashes tore the batch');
});

/** A memory store that counts its reads. */
class CountingStore extends MemorySegmentStore {
  reads = 0;
  override async read(segment: number, offset: number, length: number): Promise<Uint8Array> {
    this.reads++;
    return super.read(segment, offset, length);
  }
}

test('readMany reads a run of adjacent records in one store read, and still finds a corrupt one among them', async (t) => {
  const store = new CountingStore(SEG, 32);
  const g = await GrassLog.create(store, { backgroundCleaner: false });
  for (let i = 1; i <= 100; i++) await g.put(i, block(i));
  await g.close();
  store.reopen();
  const g2 = await GrassLog.open(store, { backgroundCleaner: false });
  const segments = new Set([...Array(100).keys()].map((i) => g2.inspect().map.get(i + 1)!.slot));
  store.reads = 0;
  const wanted = [...Array(100).keys()].map((i) => 100 - i).concat([5000]);
  const got = await g2.readMany(wanted);
  for (let k = 0; k < 100; k++) t.deepEqual(got[k], block(wanted[k]!), `record ${wanted[k]}`);
  t.is(got[100], undefined, 'an unmapped address reads as undefined');
  t.true(store.reads <= segments.size, `${store.reads} store reads for 100 records in ${segments.size} segments`);
  t.is(g2.stats().reads, 100);
  const loc = g2.inspect().map.get(10)!;
  await g2.close();
  store.reopen();
  store.rawSegment(loc.slot)[loc.offset + RECORD_HEADER_BYTES + 7]! ^= 0x01;
  const g3 = await GrassLog.open(store, { backgroundCleaner: false });
  const err = await t.throwsAsync(g3.readMany([8, 9, 10, 11, 12]), { instanceOf: CorruptionError });
  t.is(err!.where.segment, loc.slot);
  t.is(err!.where.offset, loc.offset);
  t.deepEqual(await g3.readMany([8, 9, 11, 12]), [block(8), block(9), block(11), block(12)]);
  await t.throwsAsync(g3.readMany([0]), { code: 'EINVAL' });
  await g3.close();
});

/**
 * A store with records in sealed segments that only replay can find (a crash before any
 * checkpoint covered them), and the raw segment holding record 1, with its footer decoded.
 */
async function sealedUncheckpointed(): Promise<{ store: MemorySegmentStore; slot: number; seg: Uint8Array; footer: SegmentFooter }> {
  const store = new MemorySegmentStore(SEG, 32);
  const faulty = new FaultySegmentStore(store, { seed: 1, crashAtOp: 0 });
  const g = await GrassLog.create(faulty, { backgroundCleaner: false });
  for (let i = 1; i <= 100; i++) await g.put(i, block(i));
  await g.flush();
  const slot = g.inspect().map.get(1)!.slot;
  await faulty.crash();
  store.reopen();
  const seg = store.rawSegment(slot);
  const footer = decodeFooter(seg, SEG)!;
  return { store, slot, seg, footer };
}

test('a sealed segment whose footer names an impossible successor, or whose summary overruns its data, fails the open; it is never replayed as far as it goes', async (t) => {
  // The footer names its own segment as the next (a loop): before, replay went round it
  // segmentCount times and stopped quietly, and the records after it were lost.
  const loop = await sealedUncheckpointed();
  encodeFooter(loop.seg, { ...loop.footer, nextSlot: loop.slot, nextSeq: loop.footer.seq });
  await t.throwsAsync(GrassLog.open(loop.store), { instanceOf: CorruptionError, message: /names slot \d+ seq \d+ as the next, which cannot follow it/ });
  // A summary entry that claims more than a record can hold, its checksums made good.
  const over = await sealedUncheckpointed();
  const view = new DataView(over.seg.buffer, over.seg.byteOffset, over.seg.byteLength);
  const sumAt = summaryOffset(SEG, over.footer.entries);
  const last = decodeSummaryEntry(view, sumAt + (over.footer.entries - 1) * SUMMARY_ENTRY_BYTES);
  encodeSummaryEntry(view, sumAt + (over.footer.entries - 1) * SUMMARY_ENTRY_BYTES, { ...last, length: 65535 });
  encodeFooter(over.seg, { ...over.footer, summaryCrc: crc32c(over.seg.subarray(sumAt, SEG - FOOTER_BYTES), segmentSeed(over.footer.seq, over.slot)) });
  await t.throwsAsync(GrassLog.open(over.store), { instanceOf: CorruptionError, message: /summary entry \d+ is a record of kind 1 and 65535 bytes/ });
});

test('a checkpoint whose map names places outside the store fails the open with a CorruptionError', async (t) => {
  const { store, g } = await filled();
  await g.checkpoint();
  await g.close();
  store.reopen();
  // Point address 5 past the last segment, in the map page the checkpoint wrote, checksum made good.
  const probe = await GrassLog.open(store, { readOnly: true, backgroundCleaner: false });
  const dir = probe.inspect().directory.get(0)!;
  await probe.close();
  store.reopen();
  const seg = store.rawSegment(dir.slot);
  const view = new DataView(seg.buffer, seg.byteOffset, seg.byteLength);
  view.setUint32(dir.offset + RECORD_HEADER_BYTES + 5 * MAP_ENTRY_BYTES, 5000, true);
  resealRecord(seg, dir.offset, segmentSeed(dir.seq, dir.slot));
  await t.throwsAsync(GrassLog.open(store, { backgroundCleaner: false }), { instanceOf: CorruptionError, message: /address 5 is mapped to .* slot 5000/ });
});

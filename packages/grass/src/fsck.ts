/**
 * fsck for a Grass store: opens it read-only (recovery without writing), then checks every
 * segment and the map against each other. Problems are listed in words; `ok` is false if
 * there are any.
 *
 * Checks:
 * - every sealed segment: header, footer and summary checksums; every record's header matches
 *   its summary entry and its checksum is good;
 * - every mapped address points at a record of a data kind with that address, the right length
 *   and a good checksum, in a segment that is not free;
 * - live-byte counts recomputed from the map match the segment table;
 * - every map page and checkpoint chunk the checkpoint names is readable (recovery did that).
 */
import { GrassLog, SLOT_FREE, SLOT_SEALED } from './grass.ts';
import type { SegmentStore } from './segment-store.ts';
import { crc32c } from './crc32c.ts';
import { FOOTER_BYTES, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES, SUMMARY_ENTRY_BYTES, viewOf } from './format.ts';
import { decodeFooter, decodeSegmentHeader, decodeSummaryEntry, peekRecordHeader, recordChecksumOk, segmentSeed, summaryOffset } from './records.ts';
import type { RecoveryReport } from './stats.ts';

export interface FsckReport {
  ok: boolean;
  problems: string[];
  segmentsChecked: number;
  recordsChecked: number;
  mappedAddresses: number;
  recovery: RecoveryReport | undefined;
}

/** Check `store`; it is closed afterwards (fsck owns it for the duration). */
export async function fsck(store: SegmentStore, options: { maxProblems?: number } = {}): Promise<FsckReport> {
  const maxProblems = options.maxProblems ?? 1000;
  const problems: string[] = [];
  const problem = (m: string): void => {
    if (problems.length < maxProblems) problems.push(m);
  };
  let g: GrassLog;
  try {
    g = await GrassLog.open(store, { readOnly: true, backgroundCleaner: false });
  } catch (e) {
    return { ok: false, problems: [`cannot open: ${(e as Error).message}`], segmentsChecked: 0, recordsChecked: 0, mappedAddresses: 0, recovery: undefined };
  }
  const rec = g.recovery;
  for (const p of rec?.problems ?? []) problem(`recovery: ${p}`);
  const ins = g.inspect();
  const segBytes = store.segmentBytes;
  let segmentsChecked = 0;
  let recordsChecked = 0;
  // 1. Sealed segments, whole.
  const recordAt = new Map<number, Set<number>>();
  for (let s = 0; s < store.segmentCount; s++) {
    if (ins.slotState[s] !== SLOT_SEALED) continue;
    segmentsChecked++;
    const seq = ins.slotSeq[s]!;
    let bytes: Uint8Array;
    try {
      bytes = await store.read(s, 0, segBytes);
    } catch (e) {
      problem(`segment ${s}: cannot be read: ${(e as Error).message}`);
      continue;
    }
    const view = viewOf(bytes);
    const h = decodeSegmentHeader(bytes);
    if (h === undefined || h.seq !== seq || h.slot !== s) {
      problem(`segment ${s}: bad or stale header (expected seq ${seq})`);
      continue;
    }
    const f = decodeFooter(bytes, segBytes);
    if (f === undefined || f.seq !== seq || f.slot !== s) {
      problem(`segment ${s}: sealed but its footer is missing or corrupt`);
      continue;
    }
    const seed = segmentSeed(seq, s);
    const sumStart = summaryOffset(segBytes, f.entries);
    if (crc32c(bytes.subarray(sumStart, segBytes - FOOTER_BYTES), seed) !== f.summaryCrc) {
      problem(`segment ${s}: summary checksum mismatch`);
      continue;
    }
    const offsets = new Set<number>();
    let off = SEGMENT_HEADER_BYTES;
    for (let i = 0; i < f.entries; i++) {
      const e = decodeSummaryEntry(view, sumStart + i * SUMMARY_ENTRY_BYTES);
      const rh = peekRecordHeader(view, off, sumStart);
      recordsChecked++;
      if (rh === undefined || rh.key !== e.key || rh.length !== e.length || rh.kind !== e.kind) {
        problem(`segment ${s} offset ${off}: record header does not match its summary entry`);
      } else if (!recordChecksumOk(bytes, view, off, e.length, seed)) {
        problem(`segment ${s} offset ${off}: record checksum mismatch (address ${e.key})`);
      }
      offsets.add(off);
      off += RECORD_HEADER_BYTES + e.length;
    }
    if (off !== f.dataEnd) problem(`segment ${s}: summary ends at ${off}, footer says ${f.dataEnd}`);
    recordAt.set(s, offsets);
  }
  // 2. Every mapping (addresses collected first: reads are awaited, a bounded number at a time).
  const live = new Float64Array(store.segmentCount);
  const addresses: number[] = [];
  ins.map.forEach((gaddr, slot, offset, length) => {
    live[slot]! += RECORD_HEADER_BYTES + length;
    if (ins.slotState[slot] === SLOT_FREE) problem(`address ${gaddr}: maps into free segment ${slot}`);
    const offsets = recordAt.get(slot);
    if (offsets !== undefined && !offsets.has(offset)) problem(`address ${gaddr}: maps to segment ${slot} offset ${offset}, where no record starts`);
    addresses.push(gaddr);
  });
  const READS_IN_FLIGHT = 64;
  for (let i = 0; i < addresses.length; i += READS_IN_FLIGHT) {
    await Promise.all(
      addresses.slice(i, i + READS_IN_FLIGHT).map((gaddr) =>
        g.read(gaddr).then(
          () => undefined,
          (e: Error) => problem(`address ${gaddr}: ${e.message}`),
        ),
      ),
    );
  }
  for (let s = 0; s < store.segmentCount; s++) {
    if (Math.abs(live[s]! - ins.dataLive[s]!) > 0.5) problem(`segment ${s}: live bytes ${ins.dataLive[s]} in the table, ${live[s]} by the map`);
  }
  const mappedAddresses = ins.map.size;
  await g.close();
  return { ok: problems.length === 0, problems, segmentsChecked, recordsChecked, mappedAddresses, recovery: rec };
}

/**
 * Encoding and checking of the pieces of a segment: header, records, summary and footer.
 * Pure functions over byte arrays; see format.ts for the layout.
 */
import { assert } from './assert.ts';
import { crc32c } from './crc32c.ts';
import {
  FLAG_BATCH_END, FOOTER_BYTES, FOOTER_MAGIC, FORMAT_VERSION, MAX_META_RECORD_BYTES, RECORD_HEADER_BYTES,
  RH_AUX, RH_CRC, RH_FLAGS, RH_KEY, RH_KIND, RH_LENGTH, RecordKind, SE_AUX, SE_FLAGS, SE_KEY, SE_KIND, SE_LENGTH,
  SEGMENT_HEADER_BYTES, SEGMENT_MAGIC, SF_CLOCK, SF_CRC, SF_DATA_END, SF_ENTRIES, SF_MAGIC, SF_NEXT_SLOT, SF_SEQ,
  SF_SLOT, SF_NEXT_SEQ, SF_SUMMARY_CRC, SF_VERSION, SH_CLOCK, SH_CRC, SH_MAGIC, SH_SEQ, SH_SLOT, SH_STREAM, SH_VERSION,
  SUMMARY_ENTRY_BYTES, getU64, putU64, viewOf,
} from './format.ts';

/** The CRC seed of a segment's records: binds every record to one (seq, slot) incarnation. */
export function segmentSeed(seq: number, slot: number): number {
  const b = new Uint8Array(12);
  const v = viewOf(b);
  putU64(v, 0, seq);
  v.setUint32(8, slot, true);
  return crc32c(b, 0x5a5a5a5a);
}

export interface SegmentHeader {
  stream: number;
  seq: number;
  slot: number;
  openClock: number;
}

export function encodeSegmentHeader(out: Uint8Array, h: SegmentHeader): void {
  const v = viewOf(out);
  out.fill(0, 0, SEGMENT_HEADER_BYTES);
  v.setUint32(SH_MAGIC, SEGMENT_MAGIC, true);
  v.setUint16(SH_VERSION, FORMAT_VERSION, true);
  v.setUint8(SH_STREAM, h.stream);
  putU64(v, SH_SEQ, h.seq);
  v.setUint32(SH_SLOT, h.slot, true);
  putU64(v, SH_CLOCK, h.openClock);
  v.setUint32(SH_CRC, crc32c(out.subarray(0, SH_CRC)), true);
}

/** Parse a segment header; undefined if it is not a valid one. */
export function decodeSegmentHeader(bytes: Uint8Array): SegmentHeader | undefined {
  if (bytes.length < SEGMENT_HEADER_BYTES) return undefined;
  const v = viewOf(bytes);
  if (v.getUint32(SH_MAGIC, true) !== SEGMENT_MAGIC) return undefined;
  if (v.getUint32(SH_CRC, true) !== crc32c(bytes.subarray(0, SH_CRC))) return undefined;
  if (v.getUint16(SH_VERSION, true) !== FORMAT_VERSION) return undefined;
  return { stream: v.getUint8(SH_STREAM), seq: getU64(v, SH_SEQ), slot: v.getUint32(SH_SLOT, true), openClock: getU64(v, SH_CLOCK) };
}

export interface RecordHeader {
  length: number;
  kind: RecordKind;
  flags: number;
  key: number;
  aux: number;
}

/**
 * Write a record (header + payload) at `offset` of `buf`; returns the bytes written.
 * The checksum covers header bytes [4, 20) and the payload, seeded with the segment seed.
 */
export function encodeRecord(buf: Uint8Array, view: DataView, offset: number, seed: number, h: RecordHeader, payload: Uint8Array): number {
  assert(payload.length === h.length, 'record length does not match payload');
  assert(h.length <= MAX_META_RECORD_BYTES, 'record too long');
  view.setUint16(offset + RH_LENGTH, h.length, true);
  view.setUint8(offset + RH_KIND, h.kind);
  view.setUint8(offset + RH_FLAGS, h.flags);
  putU64(view, offset + RH_KEY, h.key);
  view.setUint32(offset + RH_AUX, h.aux >>> 0, true);
  buf.set(payload, offset + RECORD_HEADER_BYTES);
  let crc = crc32c(buf.subarray(offset + RH_LENGTH, offset + RECORD_HEADER_BYTES), seed);
  crc = crc32c(payload, crc);
  view.setUint32(offset + RH_CRC, crc, true);
  return RECORD_HEADER_BYTES + h.length;
}

/** Parse the header at `offset`, checking only bounds and kind. */
export function peekRecordHeader(view: DataView, offset: number, limit: number): RecordHeader | undefined {
  if (offset + RECORD_HEADER_BYTES > limit) return undefined;
  const length = view.getUint16(offset + RH_LENGTH, true);
  const kind = view.getUint8(offset + RH_KIND);
  if (kind < RecordKind.Put || kind > RecordKind.CheckpointRoot) return undefined;
  if (offset + RECORD_HEADER_BYTES + length > limit) return undefined;
  const flags = view.getUint8(offset + RH_FLAGS);
  if ((flags & ~FLAG_BATCH_END) !== 0) return undefined;
  return { length, kind: kind as RecordKind, flags, key: getU64(view, offset + RH_KEY), aux: view.getUint32(offset + RH_AUX, true) };
}

/** True if the record at `offset` (header + `length` payload bytes) has a good checksum. */
export function recordChecksumOk(bytes: Uint8Array, view: DataView, offset: number, length: number, seed: number): boolean {
  let crc = crc32c(bytes.subarray(offset + RH_LENGTH, offset + RECORD_HEADER_BYTES), seed);
  crc = crc32c(bytes.subarray(offset + RECORD_HEADER_BYTES, offset + RECORD_HEADER_BYTES + length), crc);
  return view.getUint32(offset + RH_CRC, true) === crc;
}

/** A summary entry: the record's header fields, written into the segment at seal. */
export function encodeSummaryEntry(view: DataView, offset: number, h: RecordHeader): void {
  putU64(view, offset + SE_KEY, h.key);
  view.setUint16(offset + SE_LENGTH, h.length, true);
  view.setUint8(offset + SE_KIND, h.kind);
  view.setUint8(offset + SE_FLAGS, h.flags);
  view.setUint32(offset + SE_AUX, h.aux >>> 0, true);
}

export function decodeSummaryEntry(view: DataView, offset: number): RecordHeader {
  return {
    key: getU64(view, offset + SE_KEY),
    length: view.getUint16(offset + SE_LENGTH, true),
    kind: view.getUint8(offset + SE_KIND) as RecordKind,
    flags: view.getUint8(offset + SE_FLAGS),
    aux: view.getUint32(offset + SE_AUX, true),
  };
}

export interface SegmentFooter {
  seq: number;
  slot: number;
  entries: number;
  dataEnd: number;
  nextSlot: number;
  nextSeq: number;
  sealClock: number;
  summaryCrc: number;
}

/** Write the footer into the last FOOTER_BYTES of `seg` (a whole segment buffer). */
export function encodeFooter(seg: Uint8Array, f: SegmentFooter): void {
  const at = seg.length - FOOTER_BYTES;
  const v = viewOf(seg);
  seg.fill(0, at);
  v.setUint32(at + SF_MAGIC, FOOTER_MAGIC, true);
  v.setUint16(at + SF_VERSION, FORMAT_VERSION, true);
  putU64(v, at + SF_SEQ, f.seq);
  v.setUint32(at + SF_SLOT, f.slot, true);
  v.setUint32(at + SF_ENTRIES, f.entries, true);
  v.setUint32(at + SF_DATA_END, f.dataEnd, true);
  v.setUint32(at + SF_NEXT_SLOT, f.nextSlot, true);
  putU64(v, at + SF_CLOCK, f.sealClock);
  putU64(v, at + SF_NEXT_SEQ, f.nextSeq);
  v.setUint32(at + SF_SUMMARY_CRC, f.summaryCrc, true);
  v.setUint32(at + SF_CRC, crc32c(seg.subarray(at, at + SF_CRC)), true);
}

/** Parse the footer from the last FOOTER_BYTES of `tail`; undefined if invalid. */
export function decodeFooter(tail: Uint8Array, segmentBytes: number): SegmentFooter | undefined {
  if (tail.length < FOOTER_BYTES) return undefined;
  const at = tail.length - FOOTER_BYTES;
  const v = viewOf(tail);
  if (v.getUint32(at + SF_MAGIC, true) !== FOOTER_MAGIC) return undefined;
  if (v.getUint32(at + SF_CRC, true) !== crc32c(tail.subarray(at, at + SF_CRC))) return undefined;
  if (v.getUint16(at + SF_VERSION, true) !== FORMAT_VERSION) return undefined;
  const f: SegmentFooter = {
    seq: getU64(v, at + SF_SEQ),
    slot: v.getUint32(at + SF_SLOT, true),
    entries: v.getUint32(at + SF_ENTRIES, true),
    dataEnd: v.getUint32(at + SF_DATA_END, true),
    nextSlot: v.getUint32(at + SF_NEXT_SLOT, true),
    sealClock: getU64(v, at + SF_CLOCK),
    nextSeq: getU64(v, at + SF_NEXT_SEQ),
    summaryCrc: v.getUint32(at + SF_SUMMARY_CRC, true),
  };
  const summaryStart = segmentBytes - FOOTER_BYTES - f.entries * SUMMARY_ENTRY_BYTES;
  if (f.dataEnd < SEGMENT_HEADER_BYTES || f.dataEnd > summaryStart) return undefined;
  return f;
}

/** Offset of the summary of a sealed segment with `entries` records. */
export function summaryOffset(segmentBytes: number, entries: number): number {
  return segmentBytes - FOOTER_BYTES - entries * SUMMARY_ENTRY_BYTES;
}

/**
 * Grass on-storage format, version 1. Every field is little-endian. FORMAT.md beside this
 * file is the one-page grammar; this module is the single source of the numbers.
 *
 * A segment store holds `segmentCount` segments of `segmentBytes` each, plus two superblock
 * slots. A segment is:
 *
 *   [segment header: 64 B][record]...[free space][summary: 16 B x entries][footer: 64 B]
 *
 * Records are appended front to back; the summary and footer are written once, when the
 * segment is sealed, and end exactly at `segmentBytes`.
 */
import { assert } from './assert.ts';

export const FORMAT_VERSION = 1;

// --- Segment header, at offset 0 of every segment. ---------------------------------------
export const SEGMENT_MAGIC = 0x47535247; // "GRSG"
export const SEGMENT_HEADER_BYTES = 64;
export const SH_MAGIC = 0; //   u32
export const SH_VERSION = 4; // u16
export const SH_STREAM = 6; //  u8  which log stream wrote it (see STREAM_*)
export const SH_SEQ = 8; //     u64 segment sequence number, unique over the store's life
export const SH_SLOT = 16; //   u32 the slot it was written to (catches misdirected reads)
export const SH_CLOCK = 24; //  u64 user clock (user bytes written) when it was opened
export const SH_CRC = 60; //    u32 CRC-32C of bytes [0, 60)

// --- Record header, before every record's payload. ---------------------------------------
export const RECORD_HEADER_BYTES = 20;
export const RH_CRC = 0; //   u32 CRC-32C of (segment seed, bytes [4, 20), payload)
export const RH_LENGTH = 4; // u16 payload bytes
export const RH_KIND = 6; //  u8  RecordKind
export const RH_FLAGS = 7; // u8  RecordFlag bits
export const RH_KEY = 8; //   u64 Grass address (or page / chunk number for metadata kinds)
export const RH_AUX = 16; //  u32 RELOCATE: low 32 bits of the source segment's seq

export const RecordKind = {
  /** A user record: the latest version of `key`'s value. */
  Put: 1,
  /** `key` was trimmed: replay removes its mapping. */
  Trim: 2,
  /** The cleaner moved `key`'s value out of a segment whose seq's low bits are `aux`. */
  Relocate: 3,
  /** A page of the address map, written by a checkpoint. `key` = page number. */
  MapPage: 4,
  /** A piece of a checkpoint's body. `key` = chunk index. */
  CheckpointChunk: 5,
  /** The root of a checkpoint: lists its chunks. The superblock points here. */
  CheckpointRoot: 6,
} as const;
export type RecordKind = (typeof RecordKind)[keyof typeof RecordKind];

/** Last record of an atomic batch: replay applies a batch only when it sees this flag. */
export const FLAG_BATCH_END = 1;

/** Largest user record payload. */
export const MAX_USER_RECORD_BYTES = 4096;
/** Largest metadata record payload (u16 length field). */
export const MAX_META_RECORD_BYTES = 65535;
/** Grass addresses are in [1, MAX_GADDR]: 48 bits, far beyond any store, and safe in a double. */
export const MAX_GADDR = 2 ** 48 - 1;

// --- Summary entry, one per record, written when the segment is sealed. -------------------
export const SUMMARY_ENTRY_BYTES = 16;
/** Fewest log bytes one record takes, whatever its payload: its header and summary entry. */
export const MIN_RECORD_LOG_BYTES = RECORD_HEADER_BYTES + SUMMARY_ENTRY_BYTES;
export const SE_KEY = 0; //    u64
export const SE_LENGTH = 8; // u16 payload bytes
export const SE_KIND = 10; //  u8
export const SE_FLAGS = 11; // u8
export const SE_AUX = 12; //   u32
// Record offsets are not stored: record i starts where record i-1 ended, from SEGMENT_HEADER_BYTES.

// --- Segment footer, the last bytes of a sealed segment. ---------------------------------
export const FOOTER_MAGIC = 0x46535247; // "GRSF"
export const FOOTER_BYTES = 64;
export const SF_MAGIC = 0; //       u32
export const SF_VERSION = 4; //     u16
export const SF_SEQ = 8; //         u64 must equal the header's seq
export const SF_SLOT = 16; //       u32
export const SF_ENTRIES = 20; //    u32 number of summary entries (= records)
export const SF_DATA_END = 24; //   u32 end offset of the last record
export const SF_NEXT_SLOT = 28; //  u32 slot of the stream's next segment (NO_SLOT if none)
export const SF_CLOCK = 32; //      u64 user clock when sealed
export const SF_NEXT_SEQ = 40; //   u64 seq of the stream's next segment (seqs are global, not per stream)
export const SF_SUMMARY_CRC = 48; // u32 CRC-32C of the summary bytes, seeded with the segment seed
export const SF_CRC = 60; //        u32 CRC-32C of footer bytes [0, 60)

export const NO_SLOT = 0xffffffff;

// --- Superblock: two slots, written alternately; the valid one with the higher generation wins.
export const SUPERBLOCK_MAGIC = 0x42535247; // "GRSB"
export const SUPERBLOCK_BYTES = 512;
export const SB_MAGIC = 0; //          u32
export const SB_VERSION = 4; //        u16
export const SB_GENERATION = 8; //     u64 checkpoint generation; higher is newer
export const SB_SEGMENT_BYTES = 16; // u32 geometry, checked against the store on open
export const SB_SEGMENT_COUNT = 20; // u32
export const SB_ROOT_SLOT = 24; //     u32 where the checkpoint root record is
export const SB_ROOT_OFFSET = 28; //   u32
export const SB_ROOT_LENGTH = 32; //   u32 payload bytes of the root record
export const SB_ROOT_SEQ = 40; //      u64 seq of the segment holding the root
export const SB_CRC = 508; //          u32 CRC-32C of bytes [0, 508)

// --- Log streams: each has its own open segment. -----------------------------------------
/** User batches: one ordered stream, so a crash leaves a prefix of batches. */
export const STREAM_USER = 0;
/** Checkpoint records. */
export const STREAM_META = 1;
/** Cleaner output streams STREAM_GC_FIRST .. MAX_STREAMS-1, chosen by the cleaner policy. */
export const STREAM_GC_FIRST = 2;
export const MAX_STREAMS = 8;
export const MAX_GC_STREAMS = MAX_STREAMS - STREAM_GC_FIRST;

// --- Address map pages, as written by checkpoints. ----------------------------------------
/** Entries per map page: 1024 x 10 B = 10 KiB records. */
export const MAP_PAGE_SHIFT = 10;
export const MAP_PAGE_ENTRIES = 1 << MAP_PAGE_SHIFT;
export const MAP_ENTRY_BYTES = 10; // slot u32 (NO_SLOT = unmapped), offset u32, length u16
/** Checkpoint body chunk size: fits the u16 record length with room to spare. */
export const CHECKPOINT_CHUNK_BYTES = 60 * 1024;

// --- Geometry limits. ---------------------------------------------------------------------
/** Smallest segment: must hold a header, one largest metadata record, its summary entry and the footer. */
export const MIN_SEGMENT_BYTES = 128 * 1024;
/** Largest segment: record offsets are u32, and one segment is buffered in memory per stream. */
export const MAX_SEGMENT_BYTES = 256 * 1024 * 1024;
/** Slots are u32 with NO_SLOT reserved; a million segments keeps the checkpoint slot table under 32 MiB. */
export const MAX_SEGMENT_COUNT = 1 << 20;
/**
 * Fewest segments Grass opens: its open streams, the cleaner's spill and a checkpoint's. Data
 * needs more: the reserve (two checkpoints, see GrassLog.reserveSegments) and the working room
 * outside it (about 16 segments with a small map) hold none; `pasture init` asks for 32.
 */
export const MIN_SEGMENT_COUNT = 8;

assert(SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES + MAX_META_RECORD_BYTES + SUMMARY_ENTRY_BYTES + FOOTER_BYTES <= MIN_SEGMENT_BYTES);
assert(MAP_PAGE_ENTRIES * MAP_ENTRY_BYTES <= MAX_META_RECORD_BYTES);
assert(CHECKPOINT_CHUNK_BYTES <= MAX_META_RECORD_BYTES);
assert(MAX_USER_RECORD_BYTES <= MAX_META_RECORD_BYTES);
assert(SB_CRC + 4 === SUPERBLOCK_BYTES);

// --- Little helpers for u64 fields holding safe integers. ---------------------------------
export function putU64(view: DataView, offset: number, value: number): void {
  assert(Number.isSafeInteger(value) && value >= 0, `u64 field must be a safe non-negative integer: ${value}`);
  view.setUint32(offset, value % 0x100000000, true);
  view.setUint32(offset + 4, Math.floor(value / 0x100000000), true);
}

export function getU64(view: DataView, offset: number): number {
  return view.getUint32(offset, true) + view.getUint32(offset + 4, true) * 0x100000000;
}

export function viewOf(bytes: Uint8Array): DataView {
  return new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}

/** Bytes a record occupies in a segment, plus its summary entry. */
export function recordFootprint(payloadBytes: number): number {
  return RECORD_HEADER_BYTES + payloadBytes + SUMMARY_ENTRY_BYTES;
}

// --- Checkpoint body: assembled from CheckpointChunk records, listed by the root. ---------
export const CHECKPOINT_MAGIC = 0x4b435247; // "GRCK"
export const CK_HEADER_BYTES = 64;
export const CK_MAGIC = 0; //          u32
export const CK_VERSION = 4; //        u16
export const CK_GENERATION = 8; //     u64
export const CK_USER_CLOCK = 16; //    u64 user bytes written, for cleaner ages
export const CK_NEXT_SEQ = 24; //      u64 next segment seq when the snapshot was taken
export const CK_SEGMENT_COUNT = 32; // u32
export const CK_STREAMS = 36; //       u32 = MAX_STREAMS
export const CK_DIRECTORY = 40; //     u32 number of directory entries
// then MAX_STREAMS stream heads:
export const HEAD_BYTES = 24; //  slot u32 @0 (NO_SLOT = none), offset u32 @4, seq u64 @8, reserved
// then segmentCount slot entries:
export const SLOT_ENTRY_BYTES = 28; // state u8 @0, stream u8 @1, flags u16 @2, seq u64 @4, openClock u64 @12, sealClock u64 @20
// then directory entries, ascending page number:
export const DIR_ENTRY_BYTES = 28; // pageNo u64 @0, slot u32 @8, offset u32 @12, length u32 @16, seq u64 @20

// --- Checkpoint root record payload. ------------------------------------------------------
export const ROOT_MAGIC = 0x52435247; // "GRCR"
export const CR_HEADER_BYTES = 32; // magic u32 @0, version u16 @4, generation u64 @8, bodyBytes u32 @16, bodyCrc u32 @20, chunks u32 @24
export const CR_CHUNK_BYTES = 20; // slot u32 @0, offset u32 @4, length u32 @8, seq u64 @12
export const MAX_CHECKPOINT_CHUNKS = Math.floor((MAX_META_RECORD_BYTES - CR_HEADER_BYTES) / CR_CHUNK_BYTES);

assert(CK_HEADER_BYTES + MAX_STREAMS * HEAD_BYTES + MAX_SEGMENT_COUNT * SLOT_ENTRY_BYTES < MAX_CHECKPOINT_CHUNKS * CHECKPOINT_CHUNK_BYTES);

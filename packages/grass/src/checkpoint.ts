/**
 * Checkpoints and superblocks.
 *
 * A checkpoint is the state of Grass at one instant T (its snapshot): the address map (as map
 * pages, of which only those dirtied since the last checkpoint are rewritten), the segment
 * table, the user clock, the next segment seq, and for each log stream the position reached
 * at T. It is written into the meta stream as MapPage records, then CheckpointChunk records
 * holding the body, then one CheckpointRoot record; once all of that is synced, a superblock
 * pointing at the root is written to the slot `generation % 2`. Recovery loads the newest
 * valid superblock's checkpoint and rolls each stream forward from its position.
 */
import { assert } from './assert.ts';
import { crc32c } from './crc32c.ts';
import {
  CHECKPOINT_MAGIC, CK_DIRECTORY, CK_GENERATION, CK_HEADER_BYTES, CK_MAGIC, CK_NEXT_SEQ, CK_SEGMENT_COUNT, CK_STREAMS,
  CK_USER_CLOCK, CK_VERSION, CR_CHUNK_BYTES, CR_HEADER_BYTES, DIR_ENTRY_BYTES, FORMAT_VERSION, HEAD_BYTES,
  MAX_CHECKPOINT_CHUNKS, MAX_STREAMS, NO_SLOT, ROOT_MAGIC, SB_CRC, SB_GENERATION, SB_MAGIC, SB_ROOT_LENGTH,
  SB_ROOT_OFFSET, SB_ROOT_SEQ, SB_ROOT_SLOT, SB_SEGMENT_BYTES, SB_SEGMENT_COUNT, SB_VERSION, SLOT_ENTRY_BYTES,
  SUPERBLOCK_BYTES, SUPERBLOCK_MAGIC, getU64, putU64, viewOf,
} from './format.ts';

export interface RecordRef {
  slot: number;
  offset: number;
  /** Payload bytes. */
  length: number;
  /** Seq of the segment incarnation holding it (its checksum seed depends on it). */
  seq: number;
}

export interface Superblock {
  generation: number;
  segmentBytes: number;
  segmentCount: number;
  root: RecordRef;
}

export function encodeSuperblock(sb: Superblock): Uint8Array {
  const out = new Uint8Array(SUPERBLOCK_BYTES);
  const v = viewOf(out);
  v.setUint32(SB_MAGIC, SUPERBLOCK_MAGIC, true);
  v.setUint16(SB_VERSION, FORMAT_VERSION, true);
  putU64(v, SB_GENERATION, sb.generation);
  v.setUint32(SB_SEGMENT_BYTES, sb.segmentBytes, true);
  v.setUint32(SB_SEGMENT_COUNT, sb.segmentCount, true);
  v.setUint32(SB_ROOT_SLOT, sb.root.slot, true);
  v.setUint32(SB_ROOT_OFFSET, sb.root.offset, true);
  v.setUint32(SB_ROOT_LENGTH, sb.root.length, true);
  putU64(v, SB_ROOT_SEQ, sb.root.seq);
  v.setUint32(SB_CRC, crc32c(out.subarray(0, SB_CRC)), true);
  return out;
}

/** Parse a superblock; a string says why it is not valid. */
export function decodeSuperblock(bytes: Uint8Array | undefined): Superblock | string {
  if (bytes === undefined) return 'never written';
  if (bytes.length !== SUPERBLOCK_BYTES) return `wrong length ${bytes.length}`;
  const v = viewOf(bytes);
  if (v.getUint32(SB_MAGIC, true) !== SUPERBLOCK_MAGIC) return 'bad magic';
  if (v.getUint32(SB_CRC, true) !== crc32c(bytes.subarray(0, SB_CRC))) return 'bad checksum';
  const version = v.getUint16(SB_VERSION, true);
  if (version !== FORMAT_VERSION) return `format version ${version}, this code reads ${FORMAT_VERSION}`;
  return {
    generation: getU64(v, SB_GENERATION),
    segmentBytes: v.getUint32(SB_SEGMENT_BYTES, true),
    segmentCount: v.getUint32(SB_SEGMENT_COUNT, true),
    root: {
      slot: v.getUint32(SB_ROOT_SLOT, true),
      offset: v.getUint32(SB_ROOT_OFFSET, true),
      length: v.getUint32(SB_ROOT_LENGTH, true),
      seq: getU64(v, SB_ROOT_SEQ),
    },
  };
}

export interface StreamHead {
  /** NO_SLOT if the stream has no segment. */
  slot: number;
  seq: number;
  /** Offset in the segment reached at the snapshot: replay starts here. */
  offset: number;
}

export interface SlotEntry {
  state: number;
  stream: number;
  flags: number;
  seq: number;
  openClock: number;
  sealClock: number;
}

export interface DirectoryEntry extends RecordRef {
  pageNo: number;
}

export interface CheckpointBody {
  generation: number;
  userClock: number;
  nextSeq: number;
  heads: StreamHead[];
  slots: SlotEntry[];
  directory: DirectoryEntry[];
}

export function encodeCheckpointBody(b: CheckpointBody): Uint8Array {
  assert(b.heads.length === MAX_STREAMS, 'checkpoint needs one head per stream');
  const size = CK_HEADER_BYTES + MAX_STREAMS * HEAD_BYTES + b.slots.length * SLOT_ENTRY_BYTES + b.directory.length * DIR_ENTRY_BYTES;
  const out = new Uint8Array(size);
  const v = viewOf(out);
  v.setUint32(CK_MAGIC, CHECKPOINT_MAGIC, true);
  v.setUint16(CK_VERSION, FORMAT_VERSION, true);
  putU64(v, CK_GENERATION, b.generation);
  putU64(v, CK_USER_CLOCK, b.userClock);
  putU64(v, CK_NEXT_SEQ, b.nextSeq);
  v.setUint32(CK_SEGMENT_COUNT, b.slots.length, true);
  v.setUint32(CK_STREAMS, MAX_STREAMS, true);
  v.setUint32(CK_DIRECTORY, b.directory.length, true);
  let o = CK_HEADER_BYTES;
  for (const h of b.heads) {
    v.setUint32(o, h.slot, true);
    v.setUint32(o + 4, h.offset, true);
    putU64(v, o + 8, h.seq);
    o += HEAD_BYTES;
  }
  for (const s of b.slots) {
    v.setUint8(o, s.state);
    v.setUint8(o + 1, s.stream);
    v.setUint16(o + 2, s.flags, true);
    putU64(v, o + 4, s.seq);
    putU64(v, o + 12, s.openClock);
    putU64(v, o + 20, s.sealClock);
    o += SLOT_ENTRY_BYTES;
  }
  for (const d of b.directory) {
    putU64(v, o, d.pageNo);
    v.setUint32(o + 8, d.slot, true);
    v.setUint32(o + 12, d.offset, true);
    v.setUint32(o + 16, d.length, true);
    putU64(v, o + 20, d.seq);
    o += DIR_ENTRY_BYTES;
  }
  assert(o === size);
  return out;
}

export function decodeCheckpointBody(bytes: Uint8Array): CheckpointBody | string {
  if (bytes.length < CK_HEADER_BYTES) return 'checkpoint body too short';
  const v = viewOf(bytes);
  if (v.getUint32(CK_MAGIC, true) !== CHECKPOINT_MAGIC) return 'checkpoint body has a bad magic';
  if (v.getUint16(CK_VERSION, true) !== FORMAT_VERSION) return 'checkpoint body has an unknown version';
  const segmentCount = v.getUint32(CK_SEGMENT_COUNT, true);
  const streams = v.getUint32(CK_STREAMS, true);
  const dirCount = v.getUint32(CK_DIRECTORY, true);
  if (streams !== MAX_STREAMS) return `checkpoint has ${streams} streams, expected ${MAX_STREAMS}`;
  const size = CK_HEADER_BYTES + streams * HEAD_BYTES + segmentCount * SLOT_ENTRY_BYTES + dirCount * DIR_ENTRY_BYTES;
  if (size !== bytes.length) return `checkpoint body is ${bytes.length} bytes, its header says ${size}`;
  const heads: StreamHead[] = [];
  let o = CK_HEADER_BYTES;
  for (let i = 0; i < streams; i++) {
    heads.push({ slot: v.getUint32(o, true), offset: v.getUint32(o + 4, true), seq: getU64(v, o + 8) });
    o += HEAD_BYTES;
  }
  const slots: SlotEntry[] = new Array(segmentCount);
  for (let i = 0; i < segmentCount; i++) {
    slots[i] = { state: v.getUint8(o), stream: v.getUint8(o + 1), flags: v.getUint16(o + 2, true), seq: getU64(v, o + 4), openClock: getU64(v, o + 12), sealClock: getU64(v, o + 20) };
    o += SLOT_ENTRY_BYTES;
  }
  const directory: DirectoryEntry[] = new Array(dirCount);
  for (let i = 0; i < dirCount; i++) {
    directory[i] = { pageNo: getU64(v, o), slot: v.getUint32(o + 8, true), offset: v.getUint32(o + 12, true), length: v.getUint32(o + 16, true), seq: getU64(v, o + 20) };
    o += DIR_ENTRY_BYTES;
  }
  return { generation: getU64(v, CK_GENERATION), userClock: getU64(v, CK_USER_CLOCK), nextSeq: getU64(v, CK_NEXT_SEQ), heads, slots, directory };
}

export interface CheckpointRoot {
  generation: number;
  bodyBytes: number;
  bodyCrc: number;
  chunks: RecordRef[];
}

export function encodeRoot(r: CheckpointRoot): Uint8Array {
  assert(r.chunks.length <= MAX_CHECKPOINT_CHUNKS, 'checkpoint too large');
  const out = new Uint8Array(CR_HEADER_BYTES + r.chunks.length * CR_CHUNK_BYTES);
  const v = viewOf(out);
  v.setUint32(0, ROOT_MAGIC, true);
  v.setUint16(4, FORMAT_VERSION, true);
  putU64(v, 8, r.generation);
  v.setUint32(16, r.bodyBytes, true);
  v.setUint32(20, r.bodyCrc, true);
  v.setUint32(24, r.chunks.length, true);
  let o = CR_HEADER_BYTES;
  for (const c of r.chunks) {
    v.setUint32(o, c.slot, true);
    v.setUint32(o + 4, c.offset, true);
    v.setUint32(o + 8, c.length, true);
    putU64(v, o + 12, c.seq);
    o += CR_CHUNK_BYTES;
  }
  return out;
}

export function decodeRoot(bytes: Uint8Array): CheckpointRoot | string {
  if (bytes.length < CR_HEADER_BYTES) return 'checkpoint root too short';
  const v = viewOf(bytes);
  if (v.getUint32(0, true) !== ROOT_MAGIC) return 'checkpoint root has a bad magic';
  if (v.getUint16(4, true) !== FORMAT_VERSION) return 'checkpoint root has an unknown version';
  const n = v.getUint32(24, true);
  if (bytes.length !== CR_HEADER_BYTES + n * CR_CHUNK_BYTES) return 'checkpoint root length does not match its chunk count';
  const chunks: RecordRef[] = [];
  for (let i = 0, o = CR_HEADER_BYTES; i < n; i++, o += CR_CHUNK_BYTES) {
    chunks.push({ slot: v.getUint32(o, true), offset: v.getUint32(o + 4, true), length: v.getUint32(o + 8, true), seq: getU64(v, o + 12) });
  }
  return { generation: getU64(v, 8), bodyBytes: v.getUint32(16, true), bodyCrc: v.getUint32(20, true), chunks };
}

export const NO_HEAD: StreamHead = { slot: NO_SLOT, seq: 0, offset: 0 };

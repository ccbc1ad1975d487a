/**
 * Cow's persistent format: which Grass addresses hold what, and how each metadata record is
 * laid out (see FORMAT.md beside this file). Every record is a Grass record, so Grass has
 * already checked its CRC-32C and that it belongs to this address; the decoders here check
 * structure and bounds and throw CowCorruptionError rather than return a wrong tree.
 */
import { MIN_RECORD_LOG_BYTES } from '@pasture/grass';
import { assert } from './assert.ts';
import { compressMeta, decompressMeta } from './codec.ts';
import { CowCorruptionError } from './errors.ts';

// ---------------------------------------------------------------------------------------------
// Address layout (Grass addresses are integers in [1, 2^48 - 1]).
// ---------------------------------------------------------------------------------------------

/** The Cow superblock: root pointer, allocator high water, graveyard length, counters. */
export const SUPERBLOCK_GADDR = 1;
/** Data blocks and tree nodes get addresses in [FIRST_ALLOC_GADDR, ALLOC_LIMIT_GADDR). */
export const FIRST_ALLOC_GADDR = 2;
export const ALLOC_LIMIT_GADDR = 2 ** 46;
/** Refcount page i (counts for addresses [i*RC_PAGE_ENTRIES, (i+1)*RC_PAGE_ENTRIES)) lives at RC_BASE_GADDR + i. */
export const RC_BASE_GADDR = 2 ** 46;
export const RC_PAGE_ENTRIES = 512;
/** Graveyard page i lives at GRAVE_BASE_GADDR + i. */
export const GRAVE_BASE_GADDR = 2 ** 47;
export const GRAVE_PAGE_ENTRIES = 512;
/** Graveyard capacity in pages: bounds the dead subtrees waiting to be reaped (128 Ki entries). */
export const GRAVE_PAGES_MAX = 256;
export const GRAVE_ENTRIES_MAX = GRAVE_PAGES_MAX * GRAVE_PAGE_ENTRIES;

// ---------------------------------------------------------------------------------------------
// The tree: a copy-on-write radix B+tree. A node of height h covers an aligned run of
// FANOUT^(h+1) blocks; leaves (h = 0) point at data records, inner nodes at nodes of height h-1.
// ---------------------------------------------------------------------------------------------

export const FANOUT_BITS = 8;
export const FANOUT = 1 << FANOUT_BITS;
/** 128-bit addresses: heights 0..15 (16 digits of 8 bits). */
export const ADDRESS_BITS = 128;
export const MAX_HEIGHT = ADDRESS_BITS / FANOUT_BITS - 1;
export const ADDRESS_LIMIT = 1n << BigInt(ADDRESS_BITS);
/** Largest refcount: a u32 in a refcount page. */
export const REFCOUNT_MAX = 0xffff_ffff;

// ---------------------------------------------------------------------------------------------
// Metadata records: [kind u8][version u8][codec u8][reserved u8] then the body, raw or LZ4.
// ---------------------------------------------------------------------------------------------

export const META_HEADER_BYTES = 4;
export const META_VERSION = 1;
export const META_CODEC_RAW = 0;
export const META_CODEC_LZ4 = 1;

export const enum MetaKind {
  Superblock = 0x53, // 'S'
  Node = 0x4e, // 'N'
  Refcounts = 0x52, // 'R'
  Grave = 0x47, // 'G'
}

const GADDR_BYTES = 6;
/** Node body: height u8, layout u8, count u16, then entries. */
const NODE_BODY_HEADER_BYTES = 4;
const LAYOUT_SPARSE = 0;
const LAYOUT_DENSE = 1;
/** Sparse entry: index u8 + gaddr u48. */
const SPARSE_ENTRY_BYTES = 1 + GADDR_BYTES;
const DENSE_BODY_BYTES = NODE_BODY_HEADER_BYTES + FANOUT * GADDR_BYTES;
export const NODE_BYTES_MAX = META_HEADER_BYTES + DENSE_BODY_BYTES;
const RC_BODY_BYTES = RC_PAGE_ENTRIES * 4;
const GRAVE_BODY_BYTES_MAX = 4 + GRAVE_PAGE_ENTRIES * GADDR_BYTES;

export const SUPERBLOCK_MAGIC = 0x574f4350; // "PCOW" little-endian
export const SUPERBLOCK_BODY_BYTES = 96;

// Relationships the layout relies on, checked when the module loads.
assert(NODE_BYTES_MAX <= 4096 && META_HEADER_BYTES + RC_BODY_BYTES <= 4096 && META_HEADER_BYTES + GRAVE_BODY_BYTES_MAX <= 4096);
assert(ALLOC_LIMIT_GADDR <= RC_BASE_GADDR);
assert(RC_BASE_GADDR + ALLOC_LIMIT_GADDR / RC_PAGE_ENTRIES <= GRAVE_BASE_GADDR);
assert(GRAVE_BASE_GADDR + GRAVE_PAGES_MAX < 2 ** 48);


/**
 * The highest allocator high water a Cow space on a Grass store of `segmentCount` segments of
 * `segmentBytes` can have. Every address in use holds a Grass record, so at most
 * capacity / MIN_RECORD_LOG_BYTES of them are in use at once, and the allocator never raises
 * the high water past this bound: there it looks through every refcount page for a free
 * address instead (allocator.ts). A superblock that claims more is corrupt. This is what
 * keeps a claimed high water from costing more than the store could hold (the allocator's
 * hints, fsck's walk of the refcount pages). The refcount pages cannot bound it: freeing the
 * top addresses drops their pages and leaves the high water where it was, so a store may
 * rightly claim a high water far above its last refcount page.
 */
export function highWaterLimit(segmentBytes: number, segmentCount: number): number {
  assert(Number.isSafeInteger(segmentBytes * segmentCount) && segmentBytes > 0 && segmentCount > 0, `store geometry ${segmentCount} x ${segmentBytes} bytes`);
  return Math.min(ALLOC_LIMIT_GADDR, FIRST_ALLOC_GADDR + Math.floor((segmentBytes * segmentCount) / MIN_RECORD_LOG_BYTES));
}

export function isAllocGaddr(g: number): boolean {
  return Number.isSafeInteger(g) && g >= FIRST_ALLOC_GADDR && g < ALLOC_LIMIT_GADDR;
}

/**
 * The children of `node` (height h, first block `base`) whose block ranges overlap [s, e), in
 * order: slot index, address, and the child's range [cb, ce). Read lazily, so a caller may
 * clear the slot it was just given.
 */
export function* childrenIn(node: CowNode, h: number, base: bigint, s: bigint, e: bigint): Generator<{ i: number; c: number; cb: bigint; ce: bigint }> {
  const span = 1n << BigInt(FANOUT_BITS * h);
  if (e <= base || s >= base + span * BigInt(FANOUT)) return;
  const i0 = s <= base ? 0 : Number((s - base) / span);
  const i1 = e >= base + span * BigInt(FANOUT) ? FANOUT - 1 : Number((e - 1n - base) / span);
  for (let i = i0; i <= i1; i++) {
    const c = node.get(i);
    if (c === 0) continue;
    const cb = base + BigInt(i) * span;
    yield { i, c, cb, ce: cb + span };
  }
}

/** Blocks covered by a node of height h. */
export function spanOf(height: number): bigint {
  return 1n << BigInt(FANOUT_BITS * (height + 1));
}

// ---------------------------------------------------------------------------------------------
// Little helpers for 48-bit and safe 53-bit integers.
// ---------------------------------------------------------------------------------------------

function putU48(v: DataView, o: number, x: number): void {
  v.setUint32(o, x % 2 ** 32, true);
  v.setUint16(o + 4, Math.floor(x / 2 ** 32), true);
}

function getU48(v: DataView, o: number): number {
  return v.getUint32(o, true) + v.getUint16(o + 4, true) * 2 ** 32;
}

function putU64(v: DataView, o: number, x: number): void {
  assert(Number.isSafeInteger(x) && x >= 0, `counter ${x} is not a safe non-negative integer`);
  v.setUint32(o, x % 2 ** 32, true);
  v.setUint32(o + 4, Math.floor(x / 2 ** 32), true);
}

function getU64(v: DataView, o: number, what: string): number {
  const x = v.getUint32(o, true) + v.getUint32(o + 4, true) * 2 ** 32;
  if (!Number.isSafeInteger(x)) throw new CowCorruptionError(`${what} ${x} is out of range`);
  return x;
}

function viewOf(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

function wrapMeta(kind: MetaKind, body: Uint8Array): Uint8Array {
  const packed = compressMeta(body);
  const out = new Uint8Array(META_HEADER_BYTES + (packed ?? body).length);
  out[0] = kind;
  out[1] = META_VERSION;
  out[2] = packed === undefined ? META_CODEC_RAW : META_CODEC_LZ4;
  out.set(packed ?? body, META_HEADER_BYTES);
  return out;
}

function unwrapMeta(record: Uint8Array, kind: MetaKind, gaddr: number, maxBody: number): Uint8Array {
  const what = `metadata record at address ${gaddr}`;
  if (record.length < META_HEADER_BYTES) throw new CowCorruptionError(`${what} is ${record.length} bytes, too short`);
  if (record[0] !== kind) throw new CowCorruptionError(`${what} has kind 0x${record[0]!.toString(16)}, expected 0x${kind.toString(16)}`);
  if (record[1] !== META_VERSION) throw new CowCorruptionError(`${what} has format version ${record[1]}, this build reads ${META_VERSION}`);
  const body = record.subarray(META_HEADER_BYTES);
  if (record[2] === META_CODEC_RAW) return body;
  if (record[2] === META_CODEC_LZ4) return decompressMeta(body, maxBody, what);
  throw new CowCorruptionError(`${what} has unknown codec ${record[2]}`);
}

// ---------------------------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------------------------

/**
 * A tree node in memory. Committed nodes (in the cache) are never modified; a transaction
 * clones a node before changing it. `children[i]` is a Grass address or 0 for none.
 */
export class CowNode {
  readonly children: Float64Array;
  count: number;
  /** Set when a transaction changed this (cloned) node and must write it. */
  dirty = false;

  constructor(
    readonly height: number,
    children?: Float64Array,
    count?: number,
  ) {
    assert(Number.isInteger(height) && height >= 0 && height <= MAX_HEIGHT, `node height ${height}`);
    this.children = children ?? new Float64Array(FANOUT);
    this.count = count ?? 0;
  }

  clone(): CowNode {
    return new CowNode(this.height, this.children.slice(), this.count);
  }

  get(i: number): number {
    return this.children[i]!;
  }

  set(i: number, g: number): void {
    const old = this.children[i]!;
    if (old === g) return;
    if (old === 0) this.count++;
    if (g === 0) this.count--;
    this.children[i] = g;
    this.dirty = true;
  }

  encode(): Uint8Array {
    let n = 0;
    for (let i = 0; i < FANOUT; i++) if (this.children[i] !== 0) n++;
    assert(n === this.count, `node count ${this.count} but ${n} children`);
    const sparse = NODE_BODY_HEADER_BYTES + n * SPARSE_ENTRY_BYTES < DENSE_BODY_BYTES;
    const body = new Uint8Array(sparse ? NODE_BODY_HEADER_BYTES + n * SPARSE_ENTRY_BYTES : DENSE_BODY_BYTES);
    const v = viewOf(body);
    body[0] = this.height;
    body[1] = sparse ? LAYOUT_SPARSE : LAYOUT_DENSE;
    v.setUint16(2, n, true);
    let o = NODE_BODY_HEADER_BYTES;
    for (let i = 0; i < FANOUT; i++) {
      const g = this.children[i]!;
      if (sparse) {
        if (g === 0) continue;
        assert(isAllocGaddr(g), `child address ${g}`);
        body[o] = i;
        putU48(v, o + 1, g);
        o += SPARSE_ENTRY_BYTES;
      } else {
        assert(g === 0 || isAllocGaddr(g), `child address ${g}`);
        putU48(v, o, g);
        o += GADDR_BYTES;
      }
    }
    return wrapMeta(MetaKind.Node, body);
  }

  static decode(record: Uint8Array, gaddr: number): CowNode {
    const body = unwrapMeta(record, MetaKind.Node, gaddr, DENSE_BODY_BYTES);
    const what = `node at address ${gaddr}`;
    if (body.length < NODE_BODY_HEADER_BYTES) throw new CowCorruptionError(`${what} is truncated`);
    const v = viewOf(body);
    const height = body[0]!;
    const layout = body[1]!;
    const n = v.getUint16(2, true);
    if (height > MAX_HEIGHT) throw new CowCorruptionError(`${what} has height ${height}`);
    if (n > FANOUT) throw new CowCorruptionError(`${what} claims ${n} children`);
    const node = new CowNode(height);
    if (layout === LAYOUT_SPARSE) {
      if (body.length !== NODE_BODY_HEADER_BYTES + n * SPARSE_ENTRY_BYTES) throw new CowCorruptionError(`${what} has ${body.length} bytes for ${n} sparse entries`);
      let prev = -1;
      for (let k = 0, o = NODE_BODY_HEADER_BYTES; k < n; k++, o += SPARSE_ENTRY_BYTES) {
        const i = body[o]!;
        const g = getU48(v, o + 1);
        if (i <= prev) throw new CowCorruptionError(`${what} has entries out of order`);
        if (!isAllocGaddr(g)) throw new CowCorruptionError(`${what} points at invalid address ${g}`);
        node.children[i] = g;
        prev = i;
      }
      node.count = n;
    } else if (layout === LAYOUT_DENSE) {
      if (body.length !== DENSE_BODY_BYTES) throw new CowCorruptionError(`${what} has ${body.length} bytes, dense layout needs ${DENSE_BODY_BYTES}`);
      let seen = 0;
      for (let i = 0, o = NODE_BODY_HEADER_BYTES; i < FANOUT; i++, o += GADDR_BYTES) {
        const g = getU48(v, o);
        if (g === 0) continue;
        if (!isAllocGaddr(g)) throw new CowCorruptionError(`${what} points at invalid address ${g}`);
        node.children[i] = g;
        seen++;
      }
      if (seen !== n) throw new CowCorruptionError(`${what} claims ${n} children, holds ${seen}`);
      node.count = n;
    } else {
      throw new CowCorruptionError(`${what} has unknown layout ${layout}`);
    }
    return node;
  }
}

// ---------------------------------------------------------------------------------------------
// Refcount pages: RC_PAGE_ENTRIES u32 little-endian counts.
// ---------------------------------------------------------------------------------------------

export function encodeRefcounts(counts: Uint32Array): Uint8Array {
  assert(counts.length === RC_PAGE_ENTRIES);
  const body = new Uint8Array(RC_BODY_BYTES);
  const v = viewOf(body);
  for (let i = 0; i < RC_PAGE_ENTRIES; i++) v.setUint32(i * 4, counts[i]!, true);
  return wrapMeta(MetaKind.Refcounts, body);
}

export function decodeRefcounts(record: Uint8Array, gaddr: number): Uint32Array {
  const body = unwrapMeta(record, MetaKind.Refcounts, gaddr, RC_BODY_BYTES);
  if (body.length !== RC_BODY_BYTES) throw new CowCorruptionError(`refcount page at address ${gaddr} is ${body.length} bytes, expected ${RC_BODY_BYTES}`);
  const v = viewOf(body);
  const out = new Uint32Array(RC_PAGE_ENTRIES);
  for (let i = 0; i < RC_PAGE_ENTRIES; i++) out[i] = v.getUint32(i * 4, true);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Graveyard pages: count u32, then count u48 addresses of dead nodes.
// ---------------------------------------------------------------------------------------------

export function encodeGrave(entries: ArrayLike<number>): Uint8Array {
  assert(entries.length <= GRAVE_PAGE_ENTRIES);
  const body = new Uint8Array(4 + entries.length * GADDR_BYTES);
  const v = viewOf(body);
  v.setUint32(0, entries.length, true);
  for (let i = 0; i < entries.length; i++) {
    assert(isAllocGaddr(entries[i]!));
    putU48(v, 4 + i * GADDR_BYTES, entries[i]!);
  }
  return wrapMeta(MetaKind.Grave, body);
}

export function decodeGrave(record: Uint8Array, gaddr: number): number[] {
  const body = unwrapMeta(record, MetaKind.Grave, gaddr, GRAVE_BODY_BYTES_MAX);
  const what = `graveyard page at address ${gaddr}`;
  if (body.length < 4) throw new CowCorruptionError(`${what} is truncated`);
  const v = viewOf(body);
  const n = v.getUint32(0, true);
  if (n > GRAVE_PAGE_ENTRIES || body.length !== 4 + n * GADDR_BYTES) throw new CowCorruptionError(`${what} claims ${n} entries in ${body.length} bytes`);
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const g = getU48(v, 4 + i * GADDR_BYTES);
    if (!isAllocGaddr(g)) throw new CowCorruptionError(`${what} holds invalid address ${g}`);
    out.push(g);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Superblock
// ---------------------------------------------------------------------------------------------

export interface Superblock {
  /** Root node address, 0 for an empty tree. */
  root: number;
  /** Height of the root node (0 when empty). */
  rootHeight: number;
  /** Allocator high water: every allocated address is below it. */
  nextGaddr: number;
  /** Dead subtrees waiting to be reaped. */
  graveCount: number;
  /** Data records and their stored bytes. */
  dataRecords: number;
  dataBytes: number;
  /** Metadata records (nodes, refcount and graveyard pages, this superblock) and bytes. */
  metaRecords: number;
  metaBytes: number;
  /** Superblock generation: +1 on each rewrite. */
  generation: number;
}

export function emptySuperblock(): Superblock {
  return { root: 0, rootHeight: 0, nextGaddr: FIRST_ALLOC_GADDR, graveCount: 0, dataRecords: 0, dataBytes: 0, metaRecords: 0, metaBytes: 0, generation: 0 };
}

export function encodeSuperblock(sb: Superblock): Uint8Array {
  assert(sb.root === 0 || isAllocGaddr(sb.root));
  assert(sb.rootHeight >= 0 && sb.rootHeight <= MAX_HEIGHT && (sb.root !== 0 || sb.rootHeight === 0));
  assert(sb.nextGaddr >= FIRST_ALLOC_GADDR && sb.nextGaddr <= ALLOC_LIMIT_GADDR);
  assert(sb.graveCount >= 0 && sb.graveCount <= GRAVE_ENTRIES_MAX);
  const body = new Uint8Array(SUPERBLOCK_BODY_BYTES);
  const v = viewOf(body);
  v.setUint32(0, SUPERBLOCK_MAGIC, true);
  putU48(v, 8, sb.root);
  body[14] = sb.rootHeight;
  putU48(v, 16, sb.nextGaddr);
  v.setUint32(24, sb.graveCount, true);
  putU64(v, 32, sb.dataRecords);
  putU64(v, 40, sb.dataBytes);
  putU64(v, 48, sb.metaRecords);
  putU64(v, 56, sb.metaBytes);
  putU64(v, 64, sb.generation);
  // Superblocks are never compressed, so their size is fixed.
  const out = new Uint8Array(META_HEADER_BYTES + SUPERBLOCK_BODY_BYTES);
  out[0] = MetaKind.Superblock;
  out[1] = META_VERSION;
  out[2] = META_CODEC_RAW;
  out.set(body, META_HEADER_BYTES);
  return out;
}

export const SUPERBLOCK_RECORD_BYTES = META_HEADER_BYTES + SUPERBLOCK_BODY_BYTES;

/**
 * Check the counters of a superblock about to be written: a commit adds and subtracts record
 * sizes to the counters it read from storage, so counters that were wrong when read can leave
 * the range a u64 field holds (a count below zero, a byte count past 2^53). That is
 * corruption of the stored superblock, not a bug here, so it is CowCorruptionError (nothing
 * written) rather than the assertion in encodeSuperblock.
 */
export function checkSuperblockCounters(sb: Superblock): void {
  const counters: [string, number][] = [
    ['data record count', sb.dataRecords],
    ['data byte count', sb.dataBytes],
    ['metadata record count', sb.metaRecords],
    ['metadata byte count', sb.metaBytes],
    ['generation', sb.generation],
  ];
  for (const [what, x] of counters) {
    if (!Number.isSafeInteger(x) || x < 0) {
      throw new CowCorruptionError(`the Cow superblock's ${what} (address ${SUPERBLOCK_GADDR}) would become ${x}, out of range: the counters stored there disagree with the records`);
    }
  }
}

export function decodeSuperblock(record: Uint8Array): Superblock {
  const body = unwrapMeta(record, MetaKind.Superblock, SUPERBLOCK_GADDR, SUPERBLOCK_BODY_BYTES);
  if (body.length !== SUPERBLOCK_BODY_BYTES) throw new CowCorruptionError(`Cow superblock is ${body.length} bytes, expected ${SUPERBLOCK_BODY_BYTES}`);
  const v = viewOf(body);
  if (v.getUint32(0, true) !== SUPERBLOCK_MAGIC) throw new CowCorruptionError('Cow superblock has the wrong magic');
  const sb: Superblock = {
    root: getU48(v, 8),
    rootHeight: body[14]!,
    nextGaddr: getU48(v, 16),
    graveCount: v.getUint32(24, true),
    dataRecords: getU64(v, 32, 'data record count'),
    dataBytes: getU64(v, 40, 'data byte count'),
    metaRecords: getU64(v, 48, 'metadata record count'),
    metaBytes: getU64(v, 56, 'metadata byte count'),
    generation: getU64(v, 64, 'superblock generation'),
  };
  if (sb.root !== 0 && !isAllocGaddr(sb.root)) throw new CowCorruptionError(`Cow superblock has invalid root ${sb.root}`);
  if (sb.rootHeight > MAX_HEIGHT || (sb.root === 0 && sb.rootHeight !== 0)) throw new CowCorruptionError(`Cow superblock has root height ${sb.rootHeight}`);
  if (sb.nextGaddr < FIRST_ALLOC_GADDR || sb.nextGaddr > ALLOC_LIMIT_GADDR) throw new CowCorruptionError(`Cow superblock has allocator high water ${sb.nextGaddr}`);
  if (sb.graveCount > GRAVE_ENTRIES_MAX) throw new CowCorruptionError(`Cow superblock has ${sb.graveCount} graveyard entries`);
  return sb;
}

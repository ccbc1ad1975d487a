/**
 * Txn: one Cow transaction. It reads the committed tree through the store's cache and keeps
 * every change to one side (cloned nodes, refcount pages, data records, freed addresses, the
 * superblock and graveyard), then commits them as one Grass batch. If the transaction throws
 * or the batch fails, nothing it did is visible.
 *
 * The tree (a copy-on-write radix B+tree):
 * - A node of height h covers an aligned run of 256^(h+1) blocks; child i of a node at base b
 *   covers [b + i*256^h, b + (i+1)*256^h). Leaves (h = 0) point at data records.
 * - Keys are implicit in the position, so a subtree means the same thing wherever it hangs:
 *   BLOCK-COPY between ranges with equal alignment shares whole subtrees, one refcount
 *   increment each, and costs O(log n) node writes.
 * - A node or data record's refcount is the number of references to it from nodes (plus one
 *   for the root, from the superblock). Changing something reached through a shared node first
 *   "owns" the path: a node with refcount 1 is changed in place (same Grass address, Grass
 *   relocates it); a shared one is copied to a new address, its children each gain a
 *   reference, and it loses one (dm-btree's shadowing).
 * - A node whose refcount drops to zero still holds references to its children. Small ones are
 *   released at once (INLINE_DECREMENTS per transaction); larger ones go to the graveyard, a
 *   persistent stack that the reaper drains in bounded transactions of its own, so trimming or
 *   overwriting a huge range is one small transaction. The graveyard holds one reference to
 *   each node on it, so the allocator cannot hand its address out before it is reaped.
 */
import { assert } from './assert.ts';
import type { AllocView } from './allocator.ts';
import { BLOCK_BYTES, ZERO_BLOCK_RECORD, decodeBlock, encodeBlock } from './codec.ts';
import type { CowStore, CowTransaction } from './cow.ts';

import { CowCorruptionError, CowInvalidArgumentError, CowTooLargeError } from './errors.ts';
import {
  ADDRESS_LIMIT,
  CowNode,
  GRAVE_BASE_GADDR,
  GRAVE_ENTRIES_MAX,
  GRAVE_PAGE_ENTRIES,
  MAX_HEIGHT,
  RC_BASE_GADDR,
  RC_PAGE_ENTRIES,
  REFCOUNT_MAX,
  checkSuperblockCounters,
  childrenIn,
  SUPERBLOCK_GADDR,
  type Superblock,
  encodeGrave,
  encodeRefcounts,
  encodeSuperblock,
  spanOf,
} from './format.ts';
import { MAX_BATCH_BYTES, MAX_BATCH_OPS, MIN_RECORD_LOG_BYTES, type BatchOp } from '@pasture/grass';

/** Most blocks one writeBlocks call takes (32 MiB): one Grass batch must hold them. */
export const MAX_WRITE_BLOCKS = 8192;

export function checkZeroCount(count: bigint): void {
  if (typeof count !== 'bigint' || count < 0n || count > BigInt(MAX_WRITE_BLOCKS)) throw new CowInvalidArgumentError(`allocateZeroes takes 0 to ${MAX_WRITE_BLOCKS} blocks, got ${count}`);
}

/** Refcount decrements a transaction may do inline when nodes die; the rest is reaped later. */
const INLINE_DECREMENTS = 1024;
/** Pieces one copy or exchange may gather (a misaligned copy needs one per mapped block). */
export const MAX_PIECES = 1 << 18;

const SHIFTS: bigint[] = Array.from({ length: MAX_HEIGHT + 1 }, (_, h) => BigInt(8 * h));

/** The 8-bit digit of `addr` that selects the child in a node of height h. */
export function digit(addr: bigint, h: number): number {
  // Most addresses fit in a double: plain arithmetic avoids allocating bigints.
  if (addr < 0x20000000000000n) return Math.floor(Number(addr) / DIGIT_DIVISORS[h]!) % 256;
  return Number((addr >> SHIFTS[h]!) & 0xffn);
}

/** 256^h for each height, so that digit() needs no Math.pow. */
const DIGIT_DIVISORS: number[] = Array.from({ length: MAX_HEIGHT + 1 }, (_, h) => 2 ** (8 * h));

/** Blocks covered by one child of a node of height h. */
function childSpanOf(h: number): bigint {
  return 1n << SHIFTS[h]!;
}

/** Smallest root height whose span includes `addr`. */
function heightFor(addr: bigint): number {
  let h = 0;
  while (addr >= spanOf(h)) h++;
  return h;
}

export function checkRange(start: bigint, count: bigint): void {
  if (typeof start !== 'bigint' || typeof count !== 'bigint') throw new CowInvalidArgumentError('Cow addresses and counts are bigints');
  if (start < 0n || count < 0n || start + count > ADDRESS_LIMIT || (count === 0n && start >= ADDRESS_LIMIT)) {
    throw new CowInvalidArgumentError(`range [${start}, +${count}) is outside the 128-bit block space`);
  }
}

/** A reference gathered by copy/exchange: a data record (height -1) or a subtree, at an offset. */
interface Piece {
  rel: bigint;
  height: number;
  g: number;
}

type Kind = 'data' | 'meta';

export class Txn implements CowTransaction, AllocView {
  private readonly nodes = new Map<number, CowNode>();
  private readonly rcPages = new Map<number, Uint32Array>();
  private readonly dataPuts = new Map<number, Uint8Array>();
  private readonly freed = new Map<number, Kind>();
  private readonly sb: Superblock;
  private grave: number[] | undefined;
  private graveDirtyFrom = Infinity;
  private inlineBudget = INLINE_DECREMENTS;
  nextGaddr: number;
  takenFromKnown = 0;
  /** The leaf the last write went to, owned by this transaction (see writeRecord). */
  private lastLeaf: { key: bigint; node: CowNode; root: number } | undefined;
  readonly exhausted = new Set<number>();
  done = false;

  constructor(private readonly store: CowStore) {
    this.sb = { ...store.sb };
    this.nextGaddr = this.sb.nextGaddr;
  }

  // ===========================================================================================
  // The transaction's view of nodes and refcounts
  // ===========================================================================================

  private node(g: number, h: number): CowNode | Promise<CowNode> {
    const mine = this.nodes.get(g);
    if (mine !== undefined) {
      if (mine.height !== h) throw new CowCorruptionError(`address ${g} is not a node of height ${h}`);
      return mine;
    }
    return this.store.loadNode(g, h);
  }

  async page(p: number): Promise<Uint32Array> {
    return this.rcPages.get(p) ?? (await this.store.loadRefcounts(p));
  }

  private async writablePage(p: number): Promise<Uint32Array> {
    let page = this.rcPages.get(p);
    if (page === undefined) {
      page = (await this.store.loadRefcounts(p)).slice();
      this.rcPages.set(p, page);
    }
    return page;
  }

  isFreedHere(g: number): boolean {
    return this.freed.has(g);
  }

  private async rc(g: number): Promise<number> {
    return (await this.page(Math.floor(g / RC_PAGE_ENTRIES)))[g % RC_PAGE_ENTRIES]!;
  }

  private async incRc(g: number): Promise<void> {
    const page = await this.writablePage(Math.floor(g / RC_PAGE_ENTRIES));
    const i = g % RC_PAGE_ENTRIES;
    if (page[i] === 0) throw new CowCorruptionError(`reference to address ${g}, whose refcount is zero`);
    if (page[i] === REFCOUNT_MAX) throw new CowTooLargeError(`address ${g} already has the maximum of ${REFCOUNT_MAX} references`);
    page[i]!++;
  }

  private async decRc(g: number, kind: Kind, height: number): Promise<void> {
    const page = await this.writablePage(Math.floor(g / RC_PAGE_ENTRIES));
    const i = g % RC_PAGE_ENTRIES;
    if (page[i] === 0) throw new CowCorruptionError(`refcount of address ${g} would go below zero`);
    if (--page[i]! === 0) await this.die(g, kind, height);
  }

  /** `g` lost its last reference. */
  private async die(g: number, kind: Kind, height: number): Promise<void> {
    if (kind === 'data') {
      this.dataPuts.delete(g);
      this.freed.set(g, 'data');
      return;
    }
    const node = await this.node(g, height);
    if (node.count <= this.inlineBudget) {
      this.inlineBudget -= node.count;
      await this.releaseChildren(node);
      this.nodes.delete(g);
      this.freed.set(g, 'meta');
      return;
    }
    // The graveyard holds the one reference now: the address stays allocated until reaped.
    const page = await this.writablePage(Math.floor(g / RC_PAGE_ENTRIES));
    page[g % RC_PAGE_ENTRIES] = 1;
    this.pushGrave(g);
  }

  private async releaseChildren(node: CowNode): Promise<void> {
    const kind: Kind = node.height === 0 ? 'data' : 'meta';
    for (let i = 0; i < 256; i++) {
      const c = node.get(i);
      if (c !== 0) await this.decRc(c, kind, node.height - 1);
    }
  }

  private pushGrave(g: number): void {
    this.grave ??= this.store.grave.slice();
    if (this.grave.length >= GRAVE_ENTRIES_MAX) throw new CowTooLargeError('transaction frees too many subtrees at once; split it');
    this.graveDirtyFrom = Math.min(this.graveDirtyFrom, this.grave.length);
    this.grave.push(g);
  }

  private async alloc(): Promise<number> {
    const g = await this.store.allocator.alloc(this);
    const p = Math.floor(g / RC_PAGE_ENTRIES);
    const page = await this.writablePage(p);
    const count = page[g % RC_PAGE_ENTRIES]!;
    if (count !== 0) {
      // The allocator reuses only addresses it found free, so a count here is on an address
      // at or above the committed high water, where nothing was ever allocated: the stored
      // refcount page (or the high water) is wrong.
      assert(g >= this.store.allocator.highWater, `allocated address ${g} is in use`);
      throw new CowCorruptionError(`refcount page ${p} (address ${RC_BASE_GADDR + p}) counts ${count} references to address ${g}, at or above the allocator high water ${this.store.allocator.highWater}`);
    }
    page[g % RC_PAGE_ENTRIES] = 1;
    return g;
  }

  private async newNode(height: number): Promise<{ g: number; node: CowNode }> {
    const g = await this.alloc();
    const node = new CowNode(height);
    node.dirty = true;
    this.nodes.set(g, node);
    return { g, node };
  }

  /** Make node `g` (height h, referenced from an owned parent) safe to change. */
  private async own(g: number, h: number): Promise<{ g: number; node: CowNode }> {
    const count = await this.rc(g);
    if (count === 0) throw new CowCorruptionError(`node ${g} is referenced but has refcount zero`);
    if (count === 1) {
      let mine = this.nodes.get(g);
      if (mine === undefined) {
        mine = (await this.store.loadNode(g, h)).clone();
        this.nodes.set(g, mine);
      }
      // Another parent reached it at another height (and counted once): stored nodes are wrong.
      if (mine.height !== h) throw new CowCorruptionError(`node ${g} is referenced as a node of height ${h}, and elsewhere as one of height ${mine.height}, with refcount 1`);
      return { g, node: mine };
    }
    // Shared: copy it; the copy references every child too, and the original loses our reference.
    const copy = (await this.node(g, h)).clone();
    copy.dirty = true;
    const ng = await this.alloc();
    this.nodes.set(ng, copy);
    for (let i = 0; i < 256; i++) {
      const c = copy.get(i);
      if (c !== 0) await this.incRc(c);
    }
    await this.decRc(g, 'meta', h);
    return { g: ng, node: copy };
  }

  /** Grow the root until it covers `addr` at height >= minHeight. */
  private async cover(addr: bigint, minHeight: number): Promise<void> {
    if (this.sb.root === 0) {
      const { g } = await this.newNode(Math.max(minHeight, heightFor(addr)));
      this.sb.root = g;
      this.sb.rootHeight = Math.max(minHeight, heightFor(addr));
      return;
    }
    while (addr >= spanOf(this.sb.rootHeight) || this.sb.rootHeight < minHeight) {
      assert(this.sb.rootHeight < MAX_HEIGHT);
      const { g, node } = await this.newNode(this.sb.rootHeight + 1);
      node.set(0, this.sb.root); // the old root's reference moves from the superblock to here
      this.sb.root = g;
      this.sb.rootHeight++;
    }
  }

  private async ownRoot(): Promise<CowNode> {
    const r = await this.own(this.sb.root, this.sb.rootHeight);
    this.sb.root = r.g;
    return r.node;
  }

  /** The owned node of height `target` on the path to `addr`, creating nodes as needed. */
  private async pathTo(addr: bigint, target: number): Promise<CowNode> {
    await this.cover(addr, target);
    let node = await this.ownRoot();
    for (let h = this.sb.rootHeight; h > target; h--) {
      const i = digit(addr, h);
      const c = node.get(i);
      if (c === 0) {
        const n = await this.newNode(h - 1);
        node.set(i, n.g);
        node = n.node;
      } else {
        const r = await this.own(c, h - 1);
        if (r.g !== c) node.set(i, r.g);
        node = r.node;
      }
    }
    return node;
  }

  // ===========================================================================================
  // Operations
  // ===========================================================================================

  async read(addr: bigint): Promise<Uint8Array | undefined> {
    this.checkLive();
    checkRange(addr, 1n);
    if (this.sb.root === 0 || addr >= spanOf(this.sb.rootHeight)) return undefined;
    let g = this.sb.root;
    for (let h = this.sb.rootHeight; ; h--) {
      g = (await this.node(g, h)).get(digit(addr, h));
      if (g === 0) return undefined;
      if (h === 0) break;
    }
    const rec = this.dataPuts.get(g) ?? (await this.store.grass.read(g));
    if (rec === undefined) throw new CowCorruptionError(`data record ${g} for block ${addr} is missing`);
    return decodeBlock(rec);
  }

  async write(addr: bigint, block: Uint8Array): Promise<void> {
    this.checkLive();
    checkRange(addr, 1n);
    if (!(block instanceof Uint8Array) || block.length !== BLOCK_BYTES) throw new CowInvalidArgumentError(`a block is a Uint8Array of ${BLOCK_BYTES} bytes`);
    await this.writeRecord(addr, encodeBlock(block));
  }

  /** Map `addr` to an encoded record (undefined: an all-zero block, so unmap it). */
  async allocateZeroes(start: bigint, count: bigint): Promise<void> {
    this.checkLive();
    checkZeroCount(count);
    checkRange(start, count);
    for (let i = 0n; i < count; i++) await this.writeRecord(start + i, ZERO_BLOCK_RECORD);
  }

  async writeRecord(addr: bigint, rec: Uint8Array | undefined): Promise<void> {
    this.checkLive();
    if (rec === undefined) return this.trim(addr, 1n);
    // Consecutive writes into one leaf (imports, large writes) skip the walk from the root:
    // the leaf stays owned by this transaction until something else (trim, copy, exchange,
    // a change of root) could change that, which clears lastLeaf.
    const leafKey = addr >> 8n;
    let leaf: CowNode;
    if (this.lastLeaf !== undefined && this.lastLeaf.key === leafKey && this.lastLeaf.root === this.sb.root) {
      leaf = this.lastLeaf.node;
    } else {
      // Fast path: the block is mapped and nothing on its path is shared, so it is rewritten
      // in place and no node changes at all.
      const d0 = await this.exclusiveData(addr);
      if (d0 !== 0) {
        this.dataPuts.set(d0, rec);
        return;
      }
      leaf = await this.pathTo(addr, 0);
      this.lastLeaf = { key: leafKey, node: leaf, root: this.sb.root };
    }
    const i = digit(addr, 0);
    const d = leaf.get(i);
    if (d !== 0 && (await this.rc(d)) === 1) {
      this.dataPuts.set(d, rec); // unshared: rewrite in place, Grass relocates it
      return;
    }
    const nd = await this.alloc();
    this.dataPuts.set(nd, rec);
    leaf.set(i, nd);
    if (d !== 0) await this.decRc(d, 'data', -1);
  }

  /** The data record mapped at `addr` if it and every node above it has refcount 1, else 0. */
  private async exclusiveData(addr: bigint): Promise<number> {
    if (this.sb.root === 0 || addr >= spanOf(this.sb.rootHeight)) return 0;
    let g = this.sb.root;
    for (let h = this.sb.rootHeight; ; h--) {
      if ((await this.rc(g)) !== 1) return 0;
      if (h < 0) return g;
      g = (await this.node(g, h)).get(digit(addr, h));
      if (g === 0) return 0;
    }
  }

  async trim(start: bigint, count: bigint): Promise<void> {
    this.checkLive();
    this.lastLeaf = undefined;
    checkRange(start, count);
    if (count === 0n || this.sb.root === 0) return;
    const span = spanOf(this.sb.rootHeight);
    if (start >= span) return;
    const end = start + count < span ? start + count : span;
    const root = await this.ownRoot();
    await this.trimIn(root, this.sb.rootHeight, 0n, start, end);
    await this.normalizeRoot();
  }

  private async trimIn(node: CowNode, h: number, base: bigint, s: bigint, e: bigint): Promise<void> {
    for (const { i, c, cb, ce } of childrenIn(node, h, base, s, e)) {
      if (s <= cb && ce <= e) {
        node.set(i, 0);
        await this.decRc(c, h === 0 ? 'data' : 'meta', h - 1);
        continue;
      }
      assert(h > 0);
      const r = await this.own(c, h - 1);
      if (r.g !== c) node.set(i, r.g);
      await this.trimIn(r.node, h - 1, cb, s > cb ? s : cb, e < ce ? e : ce);
      if (r.node.count === 0) {
        node.set(i, 0);
        await this.decRc(r.g, 'meta', h - 1);
      }
    }
  }

  /** Drop an empty root, and hand the superblock's reference down while the root has only child 0. */
  private async normalizeRoot(): Promise<void> {
    while (this.sb.root !== 0) {
      const node = await this.node(this.sb.root, this.sb.rootHeight);
      if (node.count === 0) {
        await this.decRc(this.sb.root, 'meta', this.sb.rootHeight);
        this.sb.root = 0;
        this.sb.rootHeight = 0;
        return;
      }
      if (this.sb.rootHeight === 0 || node.count !== 1 || node.get(0) === 0) return;
      const root = await this.ownRoot();
      const child = root.get(0);
      root.set(0, 0); // the child's reference moves to the superblock
      const old = this.sb.root;
      this.sb.root = child;
      this.sb.rootHeight--;
      await this.decRc(old, 'meta', this.sb.rootHeight + 1);
    }
  }

  async copy(src: bigint, dst: bigint, count: bigint): Promise<void> {
    this.checkLive();
    this.lastLeaf = undefined;
    checkRange(src, count);
    checkRange(dst, count);
    if (count === 0n || src === dst) return;
    const pieces = await this.collect(src, count, dst);
    await this.trim(dst, count);
    await this.install(dst, pieces);
  }

  async exchange(a: bigint, b: bigint, count: bigint): Promise<void> {
    this.checkLive();
    this.lastLeaf = undefined;
    checkRange(a, count);
    checkRange(b, count);
    if (count === 0n || a === b) return;
    if (a < b + count && b < a + count) throw new CowInvalidArgumentError(`exchange ranges [${a}, +${count}) and [${b}, +${count}) overlap`);
    const pa = await this.collect(a, count, b);
    const pb = await this.collect(b, count, a);
    await this.trim(a, count);
    await this.trim(b, count);
    await this.install(a, pb);
    await this.install(b, pa);
  }

  /**
   * References to everything mapped in [start, start + count), as whole subtrees where the
   * destination `dst` has the same alignment, each with its refcount already raised (so the
   * pieces survive whatever the transaction does to the source next).
   */
  private async collect(start: bigint, count: bigint, dst: bigint): Promise<Piece[]> {
    const pieces: Piece[] = [];
    if (this.sb.root === 0) return pieces;
    const span = spanOf(this.sb.rootHeight);
    if (start >= span) return pieces;
    const end = start + count < span ? start + count : span;
    const walk = async (g: number, h: number, base: bigint, s: bigint, e: bigint): Promise<void> => {
      const node = await this.node(g, h);
      const childSpan = childSpanOf(h);
      const aligned = start % childSpan === dst % childSpan;
      for (const { c, cb, ce } of childrenIn(node, h, base, s, e)) {
        if (h === 0 || (aligned && s <= cb && ce <= e)) {
          if (pieces.length >= MAX_PIECES) throw new CowTooLargeError(`copy needs more than ${MAX_PIECES} separate references; align source and destination, or split it`);
          pieces.push({ rel: cb - start, height: h - 1, g: c });
        } else {
          await walk(c, h - 1, cb, s > cb ? s : cb, e < ce ? e : ce);
        }
      }
    };
    const rootSpan = spanOf(this.sb.rootHeight);
    if (start === 0n && end === rootSpan && dst % rootSpan === 0n) pieces.push({ rel: 0n, height: this.sb.rootHeight, g: this.sb.root });
    else await walk(this.sb.root, this.sb.rootHeight, 0n, start, end);
    for (const p of pieces) await this.incRc(p.g);
    return pieces;
  }

  /** Hang each piece at dst + rel; the slots are empty (the range was trimmed). Their references are already counted. */
  private async install(dst: bigint, pieces: Piece[]): Promise<void> {
    for (const p of pieces) {
      const at = dst + p.rel;
      const parentHeight = p.height + 1;
      const parent = await this.pathTo(at, parentHeight);
      const i = digit(at, parentHeight);
      assert(parent.get(i) === 0, 'install into an occupied slot');
      parent.set(i, p.g);
    }
  }

  /** Reap dead subtrees from the graveyard, about `budget` decrements' worth. Returns nodes freed. */
  async reap(budget: number): Promise<number> {
    this.lastLeaf = undefined;
    this.grave ??= this.store.grave.slice();
    let freed = 0;
    this.inlineBudget = 0; // children that die go back on the stack
    while (this.grave.length > 0 && budget > 0) {
      const g = this.grave.pop()!;
      this.graveDirtyFrom = Math.min(this.graveDirtyFrom, this.grave.length);
      // A dead node's height is in the node itself.
      const node = this.nodes.get(g) ?? (await this.loadAnyNode(g));
      budget -= node.count + 1;
      await this.releaseChildren(node);
      const page = await this.writablePage(Math.floor(g / RC_PAGE_ENTRIES));
      if (page[g % RC_PAGE_ENTRIES] !== 1) throw new CowCorruptionError(`graveyard node ${g} has refcount ${page[g % RC_PAGE_ENTRIES]}, expected 1`);
      page[g % RC_PAGE_ENTRIES] = 0;
      this.nodes.delete(g);
      this.freed.set(g, 'meta');
      freed++;
    }
    return freed;
  }

  private async loadAnyNode(g: number): Promise<CowNode> {
    const rec = await this.store.grass.read(g);
    if (rec === undefined) throw new CowCorruptionError(`graveyard node ${g} is missing`);
    return CowNode.decode(rec, g);
  }

  private checkLive(): void {
    assert(!this.done, 'transaction used after it ended');
  }

  // ===========================================================================================
  // Commit
  // ===========================================================================================

  async commit(): Promise<void> {
    const grass = this.store.grass;
    const sb = this.sb;
    const ops: BatchOp[] = [];
    let bytes = 0;
    const put = (g: number, data: Uint8Array, kind: Kind): void => {
      const old = grass.size(g);
      if (kind === 'data') {
        sb.dataBytes += data.length - (old ?? 0);
        if (old === undefined) sb.dataRecords++;
      } else {
        sb.metaBytes += data.length - (old ?? 0);
        if (old === undefined) sb.metaRecords++;
      }
      bytes += MIN_RECORD_LOG_BYTES + data.length; // what Grass counts against MAX_BATCH_BYTES
      ops.push({ op: 'put', gaddr: g, data });
    };
    const drop = (g: number, kind: Kind): void => {
      const old = grass.size(g);
      if (old === undefined) return;
      if (kind === 'data') {
        sb.dataBytes -= old;
        sb.dataRecords--;
      } else {
        sb.metaBytes -= old;
        sb.metaRecords--;
      }
      bytes += MIN_RECORD_LOG_BYTES;
      ops.push({ op: 'trim', gaddr: g });
    };

    // A record this transaction still uses whose refcount fell to zero (die() forgets the
    // ones it knows of) had more references than its stored count said, such as an address
    // in use both as a node and as data.
    const freedInUse = (g: number, as: string): CowCorruptionError =>
      new CowCorruptionError(`address ${g} is still in use as ${as} but its refcount fell to zero in this transaction: its stored refcount is lower than its references`);
    const written = new Map<number, CowNode>();
    for (const [g, node] of this.nodes) {
      if (this.freed.has(g)) throw freedInUse(g, 'a node');
      if (!node.dirty) continue;
      put(g, node.encode(), 'meta');
      written.set(g, node);
    }
    for (const [g, rec] of this.dataPuts) {
      if (this.freed.has(g)) throw freedInUse(g, 'data');
      put(g, rec, 'data');
    }
    for (const [g, kind] of this.freed) drop(g, kind);
    for (const [p, page] of this.rcPages) {
      const g = RC_BASE_GADDR + p;
      if (page.every((c) => c === 0)) drop(g, 'meta');
      else put(g, encodeRefcounts(page), 'meta');
    }
    let grave = this.store.grave;
    if (this.grave !== undefined) {
      grave = this.grave;
      const oldPages = Math.ceil(this.store.grave.length / GRAVE_PAGE_ENTRIES);
      const newPages = Math.ceil(grave.length / GRAVE_PAGE_ENTRIES);
      for (let i = Math.floor(this.graveDirtyFrom / GRAVE_PAGE_ENTRIES); i < newPages; i++) {
        put(GRAVE_BASE_GADDR + i, encodeGrave(grave.slice(i * GRAVE_PAGE_ENTRIES, (i + 1) * GRAVE_PAGE_ENTRIES)), 'meta');
      }
      for (let i = newPages; i < oldPages; i++) drop(GRAVE_BASE_GADDR + i, 'meta');
      sb.graveCount = grave.length;
    }
    sb.nextGaddr = this.nextGaddr;
    if (ops.length === 0) return;
    // The superblock is rewritten only when something in it changed: an in-place overwrite of
    // an unshared block that compresses to the same size is one Grass put and nothing else.
    if (!sameSuperblock(sb, this.store.sb)) {
      sb.generation++;
      checkSuperblockCounters(sb);
      put(SUPERBLOCK_GADDR, encodeSuperblock(sb), 'meta'); // fixed size: no change to the counters
    }
    if (ops.length > MAX_BATCH_OPS || bytes > MAX_BATCH_BYTES) {
      throw new CowTooLargeError(`transaction needs ${ops.length} records (${bytes} bytes of log); the limit is ${MAX_BATCH_OPS} records and ${MAX_BATCH_BYTES} bytes`);
    }
    await grass.batch(ops);
    this.store.installCommit(sb, grave, written, this.rcPages, this.freed.keys());
  }
}

/**
 * What a transaction's body is given: the transaction's operations, one at a time, and none
 * after the body has returned. An operation not awaited would otherwise run beside the next
 * one, or past the commit, on the transaction's private nodes: a write that went on after the
 * commit changed a node the commit had just made the store's own, and the tree then pointed at
 * a record never stored (a helper's review found it). Calls break the rule with
 * CowInvalidArgumentError, and a body that returns with one still running commits nothing.
 */
export class TxnHandle implements CowTransaction {
  private running: Promise<unknown> | undefined;
  private ended = false;

  constructor(private readonly tx: Txn) {}

  private one<T>(what: string, op: () => Promise<T>): Promise<T> {
    if (this.ended) return Promise.reject(new CowInvalidArgumentError(`${what} on a transaction whose body has returned`));
    if (this.running !== undefined) {
      return Promise.reject(new CowInvalidArgumentError(`${what} while another operation of the same transaction is running: its operations run one at a time (await each)`));
    }
    const p = op();
    this.running = p;
    const settled = (): void => {
      if (this.running === p) this.running = undefined;
    };
    p.then(settled, settled);
    return p;
  }

  /** Take no more calls; once the one running (if any) has settled, resolve with whether there was one. */
  async end(): Promise<boolean> {
    this.ended = true;
    const r = this.running;
    if (r === undefined) return false;
    await r.catch(() => undefined);
    return true;
  }

  read(addr: bigint): Promise<Uint8Array | undefined> {
    return this.one('read', () => this.tx.read(addr));
  }

  write(addr: bigint, block: Uint8Array): Promise<void> {
    return this.one('write', () => this.tx.write(addr, block));
  }

  writeRecord(addr: bigint, rec: Uint8Array | undefined): Promise<void> {
    return this.one('write', () => this.tx.writeRecord(addr, rec));
  }

  trim(addr: bigint, count: bigint): Promise<void> {
    return this.one('trim', () => this.tx.trim(addr, count));
  }

  allocateZeroes(addr: bigint, count: bigint): Promise<void> {
    return this.one('allocateZeroes', () => this.tx.allocateZeroes(addr, count));
  }

  copy(src: bigint, dst: bigint, count: bigint): Promise<void> {
    return this.one('copy', () => this.tx.copy(src, dst, count));
  }

  exchange(a: bigint, b: bigint, count: bigint): Promise<void> {
    return this.one('exchange', () => this.tx.exchange(a, b, count));
  }
}

function sameSuperblock(a: Superblock, b: Superblock): boolean {
  return (
    a.root === b.root && a.rootHeight === b.rootHeight && a.nextGaddr === b.nextGaddr && a.graveCount === b.graveCount &&
    a.dataRecords === b.dataRecords && a.dataBytes === b.dataBytes && a.metaRecords === b.metaRecords && a.metaBytes === b.metaBytes
  );
}

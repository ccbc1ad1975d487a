/**
 * CowStore: a sparse 128-bit space of 4096-byte blocks on Grass, with refcounted sharing
 * (BLOCK-COPY, BLOCK-EXCHANGE), TRIM, always-on compression and atomic transactions.
 *
 * The map is a copy-on-write radix B+tree (tree.ts explains the shape): every node of height h
 * covers an aligned run of 256^(h+1) blocks, so a subtree can be shared into any position with
 * the same alignment by one refcount increment. Nodes and data blocks carry reference counts in
 * refcount pages (Grass records updated in place). A transaction collects its changes and
 * commits them as one Grass batch, so after a crash Cow holds a prefix of its transactions.
 *
 * Ownership: CowStore owns the Grass it is given and closes it. Thread-safety: all calls may
 * be made concurrently; reads share a lock, transactions take it exclusively.
 */
import { MAX_READ_MANY, type BatchOp, type Grass } from '@pasture/grass';
import { assert } from './assert.ts';
import { Allocator } from './allocator.ts';
import { NODE_ENTRY_BYTES, NodeCache, REFCOUNT_ENTRY_BYTES } from './cache.ts';
import { BLOCK_BYTES, ZERO_BLOCK_RECORD, decodeOwnedBlock, encodeBlock } from './codec.ts';
import { CowClosedError, CowCorruptionError, CowInvalidArgumentError, NotACowStoreError } from './errors.ts';
import {
  CowNode,
  FANOUT,
  GRAVE_BASE_GADDR,
  GRAVE_ENTRIES_MAX,
  GRAVE_PAGE_ENTRIES,
  RC_BASE_GADDR,
  RC_PAGE_ENTRIES,
  SUPERBLOCK_GADDR,
  SUPERBLOCK_RECORD_BYTES,
  type Superblock,
  decodeGrave,
  decodeRefcounts,
  checkSuperblockCounters,
  decodeSuperblock,
  emptySuperblock,
  encodeSuperblock,
  childrenIn,
  highWaterLimit,
  spanOf,
} from './format.ts';
import { RwLock } from './rwlock.ts';
import { MAX_WRITE_BLOCKS, Txn, TxnHandle, checkRange, checkZeroCount, digit } from './txn.ts';

export interface Extent {
  start: bigint;
  count: bigint;
}

/** What a transaction can do; reads inside it see its own changes. */
export interface CowTransaction {
  /** The block at `addr`, or undefined if unmapped (the layer above reads zeros). */
  read(addr: bigint): Promise<Uint8Array | undefined>;
  /** Map `addr` to a copy of `block` (4096 bytes). An all-zero block unmaps it. */
  write(addr: bigint, block: Uint8Array): Promise<void>;
  /** Unmap [addr, addr + count). */
  trim(addr: bigint, count: bigint): Promise<void>;
  /**
   * Map each block of [addr, addr + count) (at most MAX_WRITE_BLOCKS) to a stored all-zero
   * block, a few bytes each: it reads as zeros but counts as mapped, where writing zeros
   * would unmap it (NBD's WRITE_ZEROES with NO_HOLE).
   */
  allocateZeroes(addr: bigint, count: bigint): Promise<void>;
  /** BLOCK-COPY: make [dst, dst + count) map what [src, src + count) maps (memmove semantics). */
  copy(src: bigint, dst: bigint, count: bigint): Promise<void>;
  /** BLOCK-EXCHANGE: swap the mappings of two disjoint ranges. */
  exchange(a: bigint, b: bigint, count: bigint): Promise<void>;
}

/** The interface Cow offers the layer above (Human) and research users. */
export interface Cow extends CowTransaction {
  /**
   * Run `fn` as one transaction: all of its changes commit atomically, or none if it throws.
   * Inside, use `tx`'s operations, one at a time (await each: overlapping calls, and a body that
   * returns with one still running, are CowInvalidArgumentError), and not the store's own:
   * those wait for the transaction to end, which waits for them.
   */
  transaction<T>(fn: (tx: CowTransaction) => Promise<T>): Promise<T>;
  /** Mapped runs within [start, start + count), in order, at most `maxExtents` of them. */
  extents(start: bigint, count: bigint, maxExtents?: number): Promise<Extent[]>;
  /** Read `count` consecutive blocks into `out` (zero-filled by the caller; holes stay zero). */
  readBlocks(start: bigint, count: number, out: Uint8Array): Promise<void>;
  /**
   * Write consecutive blocks from `data` (a whole number of blocks, at most
   * MAX_WRITE_BLOCKS), as write() does each, atomically after a crash (all or none). A read
   * that overlaps the write while it is in flight may see some of its blocks and not others,
   * as on any block device.
   */
  writeBlocks(start: bigint, data: Uint8Array): Promise<void>;
  /** Mapped blocks in a range, and how many of them trimming the range would free. */
  usage(start: bigint, count: bigint): Promise<{ mapped: bigint; exclusive: bigint }>;
  /** Block runs (offsets from a and b) where two equally aligned ranges map different records. */
  diff(a: bigint, b: bigint, count: bigint, maxExtents?: number): Promise<Extent[]>;
  /** Durability barrier: every transaction committed before it survives a crash. */
  flush(): Promise<void>;
  stats(): CowStats;
  close(): Promise<void>;
}

export interface CowOptions {
  /** Bytes of decoded nodes and refcount pages to cache (default 64 MiB). */
  cacheBytes?: number;
  /** Reap dead subtrees in the background (default true); otherwise call reap(). */
  backgroundReaper?: boolean;
  /** Open without writing (fsck, inspection). */
  readOnly?: boolean;
  /** Called when the background reaper fails (the next transaction will usually fail too). */
  onBackgroundError?: (e: unknown) => void;
}

export interface CowStats {
  /** Distinct data records and the bytes they occupy in Grass (after compression). */
  dataRecords: number;
  dataBytes: number;
  /** Metadata records (tree nodes, refcount and graveyard pages, superblock) and bytes. */
  metaRecords: number;
  metaBytes: number;
  physicalBytes: number;
  /** Uncompressed over compressed size of the stored data records. */
  compressionRatio: number;
  /** Levels in the tree (0 when empty). */
  treeDepth: number;
  /** Dead subtrees waiting for the reaper. */
  pendingReap: number;
  transactions: number;
  /** Of those, writes done as one Grass batch without the transaction machinery (unshared overwrites). */
  fastWrites: number;
  reapedNodes: number;
  cache: { entries: number; bytes: number; capacityBytes: number; hits: number; misses: number; hitRate: number };
  allocator: { highWater: number; freeKnown: number; pagesUnknown: number };
}

/** Figures that need a walk of the tree (CowStore.scan). */
export interface CowScan {
  /** Logical blocks mapped. */
  mappedBlocks: number;
  /** Logical blocks whose data is also mapped at another address. */
  sharedBlocks: number;
  nodes: number;
  treeDepth: number;
}

/** diff() compares aligned windows of this many blocks (2^40: a node of height 4). */
export const DIFF_WINDOW_HEIGHT = 4;
/** Times a write waits for the fast path (see writeRecords) before it becomes a transaction. */
const FAST_WRITE_ATTEMPTS = 8;
export { MAX_WRITE_BLOCKS };

function checkMaxExtents(n: number): void {
  if (!Number.isSafeInteger(n) || n < 1) throw new CowInvalidArgumentError(`maxExtents must be a positive integer, got ${n}`);
}
export const DIFF_WINDOW_BLOCKS = spanOf(DIFF_WINDOW_HEIGHT);

/** Decrements reaped per background step: bounds one reaper transaction. */
const REAP_STEP_DECREMENTS = 4096;

export class CowStore implements Cow {
  readonly grass: Grass;
  sb: Superblock;
  /** Committed graveyard (dead nodes whose children still need a decrement). */
  grave: number[];
  readonly cache: NodeCache<CowNode | Uint32Array>;
  readonly allocator: Allocator;
  readonly options: CowOptions;
  private readonly lock = new RwLock();
  private closed = false;
  private reapScheduled = false;
  private reapRunning: Promise<void> | undefined;
  private counters = { transactions: 0, fastWrites: 0, reapedNodes: 0 };

  private constructor(grass: Grass, sb: Superblock, grave: number[], options: CowOptions) {
    this.grass = grass;
    this.sb = sb;
    this.grave = grave;
    this.options = options;
    this.cache = new NodeCache(options.cacheBytes ?? 64 * 1024 * 1024);
    this.allocator = new Allocator(sb.nextGaddr, highWaterLimitOf(grass), (p) => this.loadRefcounts(p));
  }

  /** Format an empty Cow space on a Grass store that has none, durably. */
  static async create(grass: Grass, options: CowOptions = {}): Promise<CowStore> {
    if (grass.size(SUPERBLOCK_GADDR) !== undefined) throw new CowInvalidArgumentError('this Grass store already holds a Cow space');
    const sb = emptySuperblock();
    sb.metaRecords = 1;
    sb.metaBytes = SUPERBLOCK_RECORD_BYTES;
    await grass.batch([{ op: 'put', gaddr: SUPERBLOCK_GADDR, data: encodeSuperblock(sb) }]);
    await grass.flush(); // a created space exists durably, even if empty
    const cow = new CowStore(grass, sb, [], options);
    return cow;
  }

  /** Open the Cow space on `grass`. */
  static async open(grass: Grass, options: CowOptions = {}): Promise<CowStore> {
    const rec = await grass.read(SUPERBLOCK_GADDR);
    if (rec === undefined) throw new NotACowStoreError('this Grass store holds no Cow space (create one first)');
    const sb = decodeSuperblock(rec);
    // Before anything sized by it: a high water past what the store could ever hold is not
    // one the allocator wrote (it stops at this limit), and taken as it is would make the
    // allocator's and fsck's work follow the claim rather than the store.
    const limit = highWaterLimitOf(grass);
    if (sb.nextGaddr > limit) {
      const { segmentBytes, segmentCount } = grass.stats();
      throw new CowCorruptionError(`Cow superblock has allocator high water ${sb.nextGaddr}, past ${limit}: its Grass store (${segmentCount} segments of ${segmentBytes} bytes) cannot hold records for more addresses`);
    }
    const grave: number[] = [];
    for (let i = 0; i * GRAVE_PAGE_ENTRIES < sb.graveCount; i++) {
      const g = GRAVE_BASE_GADDR + i;
      const page = await grass.read(g);
      if (page === undefined) throw new CowCorruptionError(`graveyard page ${i} is missing`);
      const entries = decodeGrave(page, g);
      const want = Math.min(GRAVE_PAGE_ENTRIES, sb.graveCount - i * GRAVE_PAGE_ENTRIES);
      if (entries.length !== want) throw new CowCorruptionError(`graveyard page ${i} holds ${entries.length} entries, expected ${want}`);
      grave.push(...entries);
    }
    const cow = new CowStore(grass, sb, grave, options);
    cow.scheduleReap();
    return cow;
  }

  // ===========================================================================================
  // Committed state, read through the cache
  // ===========================================================================================

  async loadNode(g: number, height: number): Promise<CowNode> {
    return this.cachedNode(g, height) ?? (await this.fetchNode(g, height));
  }

  /** The node at `g` if it is cached (and of height `height`, else CowCorruptionError). */
  private cachedNode(g: number, height: number): CowNode | undefined {
    const c = this.cache.get(g);
    if (c === undefined) return undefined;
    if (!(c instanceof CowNode) || c.height !== height) throw new CowCorruptionError(`address ${g} is not a node of height ${height}`);
    return c;
  }

  /** Read, check and cache the node at `g`, which is not cached. */
  private async fetchNode(g: number, height: number): Promise<CowNode> {
    const rec = await this.grass.read(g);
    if (rec === undefined) throw new CowCorruptionError(`node at address ${g} (height ${height}) is missing`);
    const node = CowNode.decode(rec, g);
    if (node.height !== height) throw new CowCorruptionError(`node at address ${g} has height ${node.height}, its parent expects ${height}`);
    this.cache.set(g, node, NODE_ENTRY_BYTES);
    return node;
  }

  async loadRefcounts(p: number): Promise<Uint32Array> {
    const g = RC_BASE_GADDR + p;
    const c = this.cache.get(g);
    if (c !== undefined) {
      assert(c instanceof Uint32Array);
      return c;
    }
    const rec = await this.grass.read(g);
    const page = rec === undefined ? new Uint32Array(RC_PAGE_ENTRIES) : decodeRefcounts(rec, g);
    this.cache.set(g, page, REFCOUNT_ENTRY_BYTES);
    return page;
  }

  async refcount(g: number): Promise<number> {
    return (await this.loadRefcounts(Math.floor(g / RC_PAGE_ENTRIES)))[g % RC_PAGE_ENTRIES]!;
  }

  // ===========================================================================================
  // The Cow interface
  // ===========================================================================================

  async read(addr: bigint): Promise<Uint8Array | undefined> {
    checkRange(addr, 1n);
    this.checkOpen();
    // The read share is taken without a wait or a closure when the lock is free (the common
    // case: this is the per-block path of every 4 KiB read).
    if (!this.lock.tryRead()) return await this.lock.read(() => this.readShared(addr));
    try {
      return await this.readShared(addr);
    } finally {
      this.lock.releaseRead();
    }
  }

  /** read(), with the lock held shared. */
  private async readShared(addr: bigint): Promise<Uint8Array | undefined> {
    const found = this.lookup(addr);
    const d = typeof found === 'number' ? found : await found;
    if (d === 0) return undefined;
    const rec = await this.grass.read(d);
    if (rec === undefined) throw new CowCorruptionError(`data record ${d} for block ${addr} is missing`);
    return decodeOwnedBlock(rec);
  }

  /**
   * Read `count` consecutive blocks from `start` into `out` (count * 4096 bytes, zero-filled by
   * the caller): unmapped blocks are left as they are. One walk of the tree for the whole run,
   * under one read lock, instead of a lookup from the root per block.
   */
  async readBlocks(start: bigint, count: number, out: Uint8Array): Promise<void> {
    if (!Number.isSafeInteger(count) || count < 0 || out.length < count * BLOCK_BYTES) throw new CowInvalidArgumentError(`readBlocks: ${count} blocks need ${count * BLOCK_BYTES} bytes of buffer`);
    checkRange(start, BigInt(count));
    this.checkOpen();
    if (count === 0) return;
    await this.lock.read(async () => {
      const sb = this.sb;
      if (sb.root === 0) return;
      const end = start + BigInt(count);
      // The data records of the run first, then all of them in one Grass readMany, which reads
      // records lying next to each other (a sequential write leaves them so) in one go.
      const data: number[] = [];
      const at: bigint[] = [];
      const walk = async (g: number, h: number, base: bigint): Promise<void> => {
        const node = await this.loadNode(g, h);
        for (const { c, cb } of childrenIn(node, h, base, start, end)) {
          if (h > 0) {
            await walk(c, h - 1, cb);
            continue;
          }
          data.push(c);
          at.push(cb);
        }
      };
      await walk(sb.root, sb.rootHeight, 0n);
      for (let from = 0; from < data.length; from += MAX_READ_MANY) {
        const recs = await this.grass.readMany(data.slice(from, from + MAX_READ_MANY));
        for (let k = 0; k < recs.length; k++) {
          const rec = recs[k];
          const i = from + k;
          if (rec === undefined) throw new CowCorruptionError(`data record ${data[i]} for block ${at[i]} is missing`);
          out.set(decodeOwnedBlock(rec), Number(at[i]! - start) * BLOCK_BYTES);
        }
      }
    });
  }

  /**
   * The data record address mapped at `addr` in the committed tree, or 0. Synchronous while
   * the path is cached (the common case); from the first node that is not, a promise.
   */
  private lookup(addr: bigint): number | Promise<number> {
    const sb = this.sb;
    if (sb.root === 0 || addr >= spanOf(sb.rootHeight)) return 0;
    let g = sb.root;
    for (let h = sb.rootHeight; ; h--) {
      const node = this.cachedNode(g, h);
      if (node === undefined) return this.lookupFrom(addr, g, h);
      g = node.get(digit(addr, h));
      if (g === 0 || h === 0) return g;
    }
  }

  /** lookup() from node `g` of height `h` down, which is not cached. */
  private async lookupFrom(addr: bigint, g: number, h: number): Promise<number> {
    for (; ; h--) {
      const node = this.cachedNode(g, h) ?? (await this.fetchNode(g, h));
      g = node.get(digit(addr, h));
      if (g === 0 || h === 0) return g;
    }
  }

  async write(addr: bigint, block: Uint8Array): Promise<void> {
    if (!(block instanceof Uint8Array) || block.length !== BLOCK_BYTES) throw new CowInvalidArgumentError(`a block is a Uint8Array of ${BLOCK_BYTES} bytes`);
    checkRange(addr, 1n);
    this.checkOpen();
    // The raw record may be `block` itself: Grass copies it before tryBatch returns, and a
    // transaction before this call resolves.
    const rec = encodeBlock(block, undefined, true);
    await this.writeRecords(addr, [rec]);
  }

  async allocateZeroes(start: bigint, count: bigint): Promise<void> {
    checkZeroCount(count);
    checkRange(start, count);
    this.checkOpen();
    if (count === 0n) return;
    await this.writeRecords(start, new Array<Uint8Array>(Number(count)).fill(ZERO_BLOCK_RECORD));
  }

  async writeBlocks(start: bigint, data: Uint8Array): Promise<void> {
    if (!(data instanceof Uint8Array) || data.length % BLOCK_BYTES !== 0) throw new CowInvalidArgumentError(`writeBlocks takes a Uint8Array of whole ${BLOCK_BYTES}-byte blocks`);
    const count = data.length / BLOCK_BYTES;
    if (count > MAX_WRITE_BLOCKS) throw new CowInvalidArgumentError(`writeBlocks of ${count} blocks exceeds the limit of ${MAX_WRITE_BLOCKS}`);
    checkRange(start, BigInt(count));
    this.checkOpen();
    if (count === 0) return;
    const recs: (Uint8Array | undefined)[] = [];
    for (let i = 0; i < count; i++) recs.push(encodeBlock(data.subarray(i * BLOCK_BYTES, (i + 1) * BLOCK_BYTES), undefined, true));
    await this.writeRecords(start, recs);
  }

  /**
   * Map the blocks from `start` to `recs` (undefined: unmap): by the fast path if it applies,
   * after waiting out a transaction under way or a store short of room (a few times at most),
   * else in a transaction. Waiting rather than queueing a transaction at once matters: while
   * one transaction waits (for room, say), every write would otherwise become one too.
   */
  private async writeRecords(start: bigint, recs: readonly (Uint8Array | undefined)[]): Promise<void> {
    for (let attempt = 0; attempt < FAST_WRITE_ATTEMPTS; attempt++) {
      this.checkOpen();
      const r = this.overwriteNow(start, recs);
      if (r === true) return;
      if (r === false) break;
      await r;
    }
    await this.transaction(async (tx) => {
      for (let i = 0; i < recs.length; i++) await (tx as TxnHandle).writeRecord(start + BigInt(i), recs[i]);
    });
  }

  /**
   * The fast path of a write of blocks from `start` (records `recs`), outside the transaction
   * machinery: if every block overwrites one that nothing shares, the write is one Grass batch
   * (atomic after a crash, as a transaction) and changes no metadata but the superblock's byte
   * count; exactly what a transaction would commit, minus its bookkeeping. True if done;
   * false if it does not apply; a promise to wait for before trying again if a transaction is
   * under way or the store must make room first (nothing done either way). It runs
   * synchronously from the checks to the batch, so it needs no lock, only that no transaction
   * is under way (one may have changed the paths it checks). Readers need no exclusion: no
   * record's address is freed or reused, so a reader of one of these blocks sees its old
   * record or its new one, and no other block refers to them.
   */
  private overwriteNow(start: bigint, recs: readonly (Uint8Array | undefined)[]): boolean | Promise<void> {
    if (this.options.readOnly) return false;
    if (this.lock.writing) return this.lock.noWriter();
    const ops: BatchOp[] = [];
    let grown = 0;
    // The run walks from the root once per leaf it touches, not once per block (a 1 MiB
    // write: 256 blocks, one or two leaves); `entry` is block i's index in its leaf.
    let leaf: CowNode | 0 | undefined;
    let entry = 0;
    for (let i = 0; i < recs.length; i++, entry++) {
      const rec = recs[i];
      if (rec === undefined) return false;
      if (i === 0 || entry === FANOUT) {
        const addr = start + BigInt(i);
        leaf = this.exclusiveLeafCached(addr);
        entry = digit(addr, 0);
      }
      const d = leaf instanceof CowNode ? this.exclusiveEntryCached(leaf, entry) : leaf;
      const old = d === undefined || d === 0 ? undefined : this.grass.size(d);
      if (old === undefined) return false;
      grown += rec.length - old;
      ops.push({ op: 'put', gaddr: d!, data: rec });
    }
    // A record of another length (it compresses differently now) changes the superblock's
    // byte count, so the new superblock goes in the same batch, as a transaction commits it.
    let sb: Superblock | undefined;
    if (grown !== 0) {
      sb = { ...this.sb, dataBytes: this.sb.dataBytes + grown, generation: this.sb.generation + 1 };
      checkSuperblockCounters(sb);
      ops.push({ op: 'put', gaddr: SUPERBLOCK_GADDR, data: encodeSuperblock(sb) });
    }
    if (!this.grass.tryBatch(ops)) return this.grass.roomFor(ops);
    if (sb !== undefined) this.sb = sb;
    this.counters.transactions++;
    this.counters.fastWrites++;
    return true;
  }

  /**
   * The leaf (height 0) over `addr` if it and every node above it has refcount 1 (a write may
   * change it in place), else 0; from the cache alone, without awaiting; undefined if
   * something on the path is not cached.
   */
  private exclusiveLeafCached(addr: bigint): CowNode | 0 | undefined {
    const sb = this.sb;
    if (sb.root === 0 || addr >= spanOf(sb.rootHeight)) return 0;
    let g = sb.root;
    for (let h = sb.rootHeight; ; h--) {
      const page = this.cache.get(RC_BASE_GADDR + Math.floor(g / RC_PAGE_ENTRIES));
      if (!(page instanceof Uint32Array)) return undefined;
      if (page[g % RC_PAGE_ENTRIES] !== 1) return 0;
      const node = this.cache.get(g);
      if (!(node instanceof CowNode) || node.height !== h) return undefined;
      if (h === 0) return node;
      g = node.get(digit(addr, h));
      if (g === 0) return 0;
    }
  }

  /** The data record in entry `i` of an exclusive leaf if its refcount is 1, else 0; undefined if not cached. */
  private exclusiveEntryCached(leaf: CowNode, i: number): number | undefined {
    const g = leaf.get(i);
    if (g === 0) return 0;
    const page = this.cache.get(RC_BASE_GADDR + Math.floor(g / RC_PAGE_ENTRIES));
    if (!(page instanceof Uint32Array)) return undefined;
    return page[g % RC_PAGE_ENTRIES] === 1 ? g : 0;
  }

  async trim(addr: bigint, count: bigint): Promise<void> {
    return await this.transaction((tx) => tx.trim(addr, count));
  }

  async copy(src: bigint, dst: bigint, count: bigint): Promise<void> {
    return await this.transaction((tx) => tx.copy(src, dst, count));
  }

  async exchange(a: bigint, b: bigint, count: bigint): Promise<void> {
    return await this.transaction((tx) => tx.exchange(a, b, count));
  }

  async transaction<T>(fn: (tx: CowTransaction) => Promise<T>): Promise<T> {
    this.checkOpen();
    if (this.options.readOnly) throw new CowInvalidArgumentError('this Cow store is open read-only');
    // Foreground reaping: keep the graveyard well below its limit so any transaction fits.
    while (this.grave.length > GRAVE_ENTRIES_MAX / 2) await this.reapOnce();
    const result = await this.lock.write(async () => {
      this.checkOpen();
      const tx = new Txn(this);
      const handle = new TxnHandle(tx);
      let value: T;
      try {
        value = await fn(handle);
      } catch (e) {
        await handle.end(); // an operation the body left running finishes before the lock goes
        throw e;
      }
      if (await handle.end()) {
        throw new CowInvalidArgumentError('a transaction\'s body returned while one of its operations was still running (not awaited): nothing of the transaction is committed');
      }
      tx.done = true;
      await tx.commit();
      this.counters.transactions++;
      return value;
    });
    this.scheduleReap();
    return result;
  }

  async extents(start: bigint, count: bigint, maxExtents = 1024): Promise<Extent[]> {
    checkRange(start, count);
    checkMaxExtents(maxExtents);
    this.checkOpen();
    return await this.lock.read(async () => {
      const out: Extent[] = [];
      const end = start + count;
      const sb = this.sb;
      if (sb.root === 0 || count === 0n) return out;
      const walk = async (g: number, h: number, base: bigint): Promise<boolean> => {
        const node = await this.loadNode(g, h);
        for (const { c, cb } of childrenIn(node, h, base, start, end)) {
          if (h > 0) {
            if (!(await walk(c, h - 1, cb))) return false;
            continue;
          }
          const last = out[out.length - 1];
          if (last !== undefined && last.start + last.count === cb) last.count++;
          else {
            if (out.length >= maxExtents) return false;
            out.push({ start: cb, count: 1n });
          }
        }
        return true;
      };
      await walk(sb.root, sb.rootHeight, 0n);
      return out;
    });
  }

  /**
   * Mapped blocks in [start, start + count), and how many of them are exclusive: reached
   * only through nodes with refcount 1 and with a data refcount of 1, i.e. the blocks that
   * trimming the range would free.
   */
  async usage(start: bigint, count: bigint): Promise<{ mapped: bigint; exclusive: bigint }> {
    checkRange(start, count);
    this.checkOpen();
    return await this.lock.read(async () => {
      let mapped = 0n;
      let exclusive = 0n;
      const end = start + count;
      const sb = this.sb;
      if (sb.root === 0 || count === 0n) return { mapped, exclusive };
      const walk = async (g: number, h: number, base: bigint, excl: boolean): Promise<void> => {
        const node = await this.loadNode(g, h);
        for (const { c, cb } of childrenIn(node, h, base, start, end)) {
          const ce = excl && (await this.refcount(c)) === 1;
          if (h > 0) await walk(c, h - 1, cb, ce);
          else {
            mapped++;
            if (ce) exclusive++;
          }
        }
      };
      await walk(sb.root, sb.rootHeight, 0n, (await this.refcount(sb.root)) === 1);
      return { mapped, exclusive };
    });
  }

  /**
   * The runs of block offsets in [0, count) where [a, a + count) and [b, b + count) map
   * different records (an unmapped block differs from a mapped one), at most `maxExtents`.
   * Shared subtrees are skipped whole, so this costs O(changes x depth). The ranges must lie
   * in aligned windows of DIFF_WINDOW_BLOCKS at the same offset (as Human's volumes do).
   */
  async diff(a: bigint, b: bigint, count: bigint, maxExtents = 1024): Promise<Extent[]> {
    checkMaxExtents(maxExtents);
    checkRange(a, count);
    checkRange(b, count);
    this.checkOpen();
    const w = DIFF_WINDOW_BLOCKS;
    if (a % w !== b % w || (a % w) + count > w) throw new CowInvalidArgumentError(`diff needs two ranges at the same offset within aligned windows of ${w} blocks`);
    return await this.lock.read(async () => {
      const out: Extent[] = [];
      const emit = (rel: bigint, n: bigint): boolean => {
        const last = out[out.length - 1];
        if (last !== undefined && last.start + last.count === rel) {
          last.count += n;
          return true;
        }
        if (out.length >= maxExtents) return false;
        out.push({ start: rel, count: n });
        return true;
      };
      const sb = this.sb;
      const windowHeight = DIFF_WINDOW_HEIGHT;
      // The node covering each window (a node of height windowHeight), or 0.
      const windowNode = async (addr: bigint): Promise<{ g: number; h: number }> => {
        if (sb.root === 0) return { g: 0, h: 0 };
        if (sb.rootHeight <= windowHeight) return addr < spanOf(sb.rootHeight) ? { g: sb.root, h: sb.rootHeight } : { g: 0, h: 0 };
        if (addr >= spanOf(sb.rootHeight)) return { g: 0, h: windowHeight };
        let g = sb.root;
        for (let h = sb.rootHeight; h > windowHeight; h--) {
          g = (await this.loadNode(g, h)).get(digit(addr, h));
          if (g === 0) return { g: 0, h: windowHeight };
        }
        return { g, h: windowHeight };
      };
      const wa = await windowNode(a);
      const wb = await windowNode(b);
      const lo = a % w;
      const hi = lo + count;
      // Offsets below are relative to the window; `base` is a node's first block.
      const mappedRuns = async (g: number, h: number, base: bigint): Promise<boolean> => {
        const node = await this.loadNode(g, h);
        const cs = 1n << BigInt(8 * h);
        for (let i = 0; i < 256; i++) {
          const c = node.get(i);
          const cb = base + BigInt(i) * cs;
          if (c === 0 || cb + cs <= lo || cb >= hi) continue;
          if (h > 0) {
            if (!(await mappedRuns(c, h - 1, cb))) return false;
          } else if (!emit(cb - lo, 1n)) return false;
        }
        return true;
      };
      const compare = async (ga: number, gb: number, h: number, base: bigint): Promise<boolean> => {
        if (ga === gb) return true;
        if (ga === 0) return mappedRuns(gb, h, base);
        if (gb === 0) return mappedRuns(ga, h, base);
        const na = await this.loadNode(ga, h);
        const nb = await this.loadNode(gb, h);
        const cs = 1n << BigInt(8 * h);
        for (let i = 0; i < 256; i++) {
          const ca = na.get(i);
          const cbn = nb.get(i);
          const cb = base + BigInt(i) * cs;
          if (ca === cbn || cb + cs <= lo || cb >= hi) continue;
          if (h > 0) {
            if (!(await compare(ca, cbn, h - 1, cb))) return false;
          } else if (!emit(cb - lo, 1n)) return false;
        }
        return true;
      };
      if (wa.g !== 0 && wb.g !== 0 && wa.h !== wb.h) throw new CowCorruptionError('diff windows at different heights');
      await compare(wa.g, wb.g, wa.g !== 0 ? wa.h : wb.h, 0n);
      return out;
    });
  }

  async flush(): Promise<void> {
    this.checkOpen();
    await this.grass.flush();
  }

  stats(): CowStats {
    const sb = this.sb;
    const c = this.cache;
    const lookups = c.hits + c.misses;
    return {
      dataRecords: sb.dataRecords,
      dataBytes: sb.dataBytes,
      metaRecords: sb.metaRecords,
      metaBytes: sb.metaBytes,
      physicalBytes: sb.dataBytes + sb.metaBytes,
      compressionRatio: sb.dataBytes === 0 ? 1 : (sb.dataRecords * BLOCK_BYTES) / sb.dataBytes,
      treeDepth: sb.root === 0 ? 0 : sb.rootHeight + 1,
      pendingReap: this.grave.length,
      transactions: this.counters.transactions,
      fastWrites: this.counters.fastWrites,
      reapedNodes: this.counters.reapedNodes,
      cache: { entries: c.size, bytes: c.usedBytes, capacityBytes: c.capacityBytes, hits: c.hits, misses: c.misses, hitRate: lookups === 0 ? 0 : c.hits / lookups },
      allocator: { highWater: this.allocator.highWater, freeKnown: this.allocator.freeKnown, pagesUnknown: this.allocator.pagesUnknown },
    };
  }

  /**
   * Walk the tree once (each shared node once) for the figures stats() cannot keep cheaply:
   * logical blocks mapped and how many of them share their data with another address.
   */
  async scan(): Promise<CowScan> {
    this.checkOpen();
    return await this.lock.read(async () => {
      const sb = this.sb;
      const out: CowScan = { mappedBlocks: 0, sharedBlocks: 0, nodes: 0, treeDepth: sb.root === 0 ? 0 : sb.rootHeight + 1 };
      if (sb.root === 0) return out;
      // Multiplicity of a node = number of paths from the root to it; processed level by level.
      let level = new Map<number, number>([[sb.root, 1]]);
      for (let h = sb.rootHeight; h >= 0; h--) {
        const next = new Map<number, number>();
        for (const [g, mult] of level) {
          out.nodes++;
          const node = await this.loadNode(g, h);
          for (let i = 0; i < 256; i++) {
            const c = node.get(i);
            if (c === 0) continue;
            if (h > 0) {
              next.set(c, (next.get(c) ?? 0) + mult);
            } else {
              out.mappedBlocks += mult;
              if (mult > 1 || (await this.refcount(c)) > 1) out.sharedBlocks += mult;
            }
          }
        }
        level = next;
      }
      return out;
    });
  }

  /** Reap until the graveyard is empty (tests, benchmarks; the background reaper does this anyway). */
  async reap(): Promise<void> {
    while (this.grave.length > 0) await this.reapOnce();
  }

  private async reapOnce(): Promise<void> {
    await this.lock.write(async () => {
      this.checkOpen();
      if (this.grave.length === 0) return;
      const tx = new Txn(this);
      this.counters.reapedNodes += await tx.reap(REAP_STEP_DECREMENTS);
      tx.done = true;
      await tx.commit();
    });
  }

  private scheduleReap(): void {
    if (this.reapScheduled || this.closed || this.options.readOnly || this.options.backgroundReaper === false || this.grave.length === 0) return;
    this.reapScheduled = true;
    setImmediate(() => {
      this.reapScheduled = false;
      if (this.closed || this.grave.length === 0) return;
      let failed = false;
      this.reapRunning = this.reapOnce()
        .catch((e: unknown) => {
          // Stop here; the next transaction that commits starts the reaper again.
          failed = true;
          this.options.onBackgroundError?.(e);
        })
        .finally(() => {
          this.reapRunning = undefined;
          if (!failed) this.scheduleReap();
        });
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.reapRunning;
    await this.lock.write(async () => undefined);
    await this.grass.close();
  }

  /** Called by Txn after its Grass batch succeeded. */
  installCommit(sb: Superblock, grave: number[], nodes: Map<number, CowNode>, rcPages: Map<number, Uint32Array>, freed: Iterable<number>): void {
    for (const g of freed) this.cache.delete(g);
    for (const [g, node] of nodes) {
      node.dirty = false;
      this.cache.set(g, node, NODE_ENTRY_BYTES);
    }
    for (const [p, page] of rcPages) this.cache.set(RC_BASE_GADDR + p, page, REFCOUNT_ENTRY_BYTES);
    this.allocator.committed(sb.nextGaddr, rcPages);
    this.sb = sb;
    this.grave = grave;
  }

  private checkOpen(): void {
    if (this.closed) throw new CowClosedError('the Cow store is closed');
  }
}

function highWaterLimitOf(grass: Grass): number {
  const { segmentBytes, segmentCount } = grass.stats();
  return highWaterLimit(segmentBytes, segmentCount);
}

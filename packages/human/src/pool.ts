/**
 * Pool: one stack (Grass + Cow) on one segment store, holding volumes, snapshots and clones.
 *
 * - Each image owns an aligned slot of Cow space (layout.ts). A snapshot, a rollback and a
 *   clone are each one BLOCK-COPY of a whole slot plus a catalog update, in one Cow
 *   transaction: instant whatever the size, and atomic.
 * - Clones share blocks with their snapshot through Cow's refcounts, not by reading through
 *   a parent, so reads on a clone 32 levels deep cost what reads on the original cost, and
 *   flatten only drops the catalog link.
 * - Removing an image trims its slot; Cow's reaper and Grass's cleaner return the space in
 *   the background.
 * - The catalog lives in slot 0 and is validated with zod whenever it is read. Catalog
 *   changes are serialized by a mutex and committed in the same transaction as the data
 *   change they describe.
 *
 * Ownership: a Pool owns its CowStore (and so its Grass) and closes it.
 */
import { CowStore, type CowTransaction } from '@pasture/cow';
import type { Grass } from '@pasture/grass';
import { type Catalog, type Entry, NAME_RE, type SnapshotEntry, type VolumeEntry, checkCatalog, decodeCatalog, emptyCatalog, encodeCatalog } from './catalog.ts';
import { BusyError, ClosedError, ExistsError, InvalidArgumentError, NotFoundError, ReadOnlyError } from './errors.ts';
import { Image } from './image.ts';
import { BLOCK_BYTES, MAX_IMAGE_ID, MAX_VOLUME_BYTES, SLOT_BLOCKS, slotBase } from './layout.ts';

export interface VolumeInfo {
  name: string;
  id: number;
  size: number;
  created: string;
  /** `VOLUME@SNAPSHOT` this was cloned from, until flattened. */
  parent: string | null;
  snapshots: number;
  /** Being imported: not yet a whole image (see createVolume). */
  incomplete: boolean;
}

export interface SnapshotInfo {
  name: string;
  spec: string;
  id: number;
  size: number;
  created: string;
  protected: boolean;
  children: string[];
}

export interface ImageUsage {
  spec: string;
  size: number;
  /** Bytes of mapped blocks. */
  allocatedBytes: number;
  /** Bytes only this image references: what removing it would free. */
  uniqueBytes: number;
}

export interface DiffExtent {
  offset: number;
  length: number;
}

export interface PoolOptions {
  readOnly?: boolean;
  /** Cow node cache bytes. */
  cacheBytes?: number;
}

/** `VOLUME` or `VOLUME@SNAPSHOT`. */
export function parseSpec(spec: string): { volume: string; snapshot?: string } {
  const parts = spec.split('@');
  if (parts.length > 2 || !NAME_RE.test(parts[0]!) || (parts.length === 2 && !NAME_RE.test(parts[1]!))) {
    throw new InvalidArgumentError(`'${spec}' is not a valid VOLUME or VOLUME@SNAPSHOT (names: letters, digits, '.', '_', '-'; up to 128)`);
  }
  return parts.length === 2 ? { volume: parts[0]!, snapshot: parts[1]! } : { volume: parts[0]! };
}

function checkName(name: string, what: string): void {
  if (typeof name !== 'string' || !NAME_RE.test(name)) throw new InvalidArgumentError(`${what} name '${name}' is not valid: letters, digits, '.', '_', '-', up to 128, not starting with a punctuation mark`);
}

function checkSize(size: number): void {
  if (!Number.isSafeInteger(size) || size < 0 || size > MAX_VOLUME_BYTES || size % BLOCK_BYTES !== 0) {
    throw new InvalidArgumentError(`size ${size} must be a multiple of ${BLOCK_BYTES} bytes between 0 and ${MAX_VOLUME_BYTES}`);
  }
}

export class Pool {
  readonly cow: CowStore;
  private catalog!: Catalog;
  /** The catalog's entries by id, rebuilt with it: every I/O checks its image here. */
  private byId = new Map<number, Entry>();
  private catalogBlocks: Uint8Array[];
  private readonly readOnly: boolean;
  private mutex: Promise<unknown> = Promise.resolve();
  private readonly openCount = new Map<number, number>();
  /** Images opened so far (resizeVolume's check that none was opened meanwhile). */
  private imageOpens = 0;
  private closed = false;

  private constructor(cow: CowStore, catalog: Catalog, readOnly: boolean) {
    this.cow = cow;
    this.setCatalog(catalog);
    this.catalogBlocks = encodeCatalog(catalog);
    this.readOnly = readOnly;
  }

  /** Make a new pool: a Cow space with an empty catalog, durably. */
  static async create(grass: Grass, options: PoolOptions = {}): Promise<Pool> {
    const cow = await CowStore.create(grass, options.cacheBytes ? { cacheBytes: options.cacheBytes } : {});
    const catalog = emptyCatalog();
    await cow.transaction(async (tx) => {
      for (const [i, b] of encodeCatalog(catalog).entries()) await tx.write(BigInt(i), b);
    });
    await cow.flush();
    return new Pool(cow, catalog, false);
  }

  /** Open a pool; reclaims the scratch space of atomic writes and the volumes of imports a crash interrupted. */
  static async open(grass: Grass, options: PoolOptions = {}): Promise<Pool> {
    const cow = await CowStore.open(grass, { readOnly: options.readOnly === true, ...(options.cacheBytes ? { cacheBytes: options.cacheBytes } : {}) });
    try {
      const catalog = await decodeCatalog((i) => cow.read(BigInt(i)));
      const pool = new Pool(cow, catalog, options.readOnly === true);
      for (const e of catalog.entries) if (e.kind === 'scratch' && !pool.readOnly) await pool.dropScratch(e.id);
      for (const e of catalog.entries) if (e.kind === 'volume' && e.incomplete === true && !pool.readOnly) await pool.removeIncomplete(e.id);
      // (An incomplete volume has no snapshots: createSnapshot refuses them.)
      return pool;
    } catch (e) {
      await cow.close();
      throw e;
    }
  }

  // ===========================================================================================
  // Catalog
  // ===========================================================================================

  /**
   * Change the catalog and the space together: `fn` edits a draft of the catalog and does its
   * data operations in the same Cow transaction. Serialized with every other catalog change.
   * Durable when it returns (a flush), as a user of a storage system expects of "snapshot
   * created": before, a change stayed in memory until some later flush or close, and a crash
   * meanwhile undid it (a snapshot, a rollback; a finished import's volume was then removed
   * as incomplete).
   */
  private mutate<T>(fn: (draft: Catalog, tx: CowTransaction) => Promise<T>): Promise<T> {
    this.checkOpen();
    if (this.readOnly) throw new ReadOnlyError('the pool is open read-only');
    const run = async (): Promise<T> => {
      this.checkOpen();
      const draft = structuredClone(this.catalog);
      let blocks: Uint8Array[] = [];
      const value = await this.cow.transaction(async (tx) => {
        const v = await fn(draft, tx);
        checkCatalog(draft);
        blocks = encodeCatalog(draft);
        for (const [i, b] of blocks.entries()) {
          const old = this.catalogBlocks[i];
          if (old === undefined || Buffer.compare(old, b) !== 0) await tx.write(BigInt(i), b);
        }
        if (this.catalogBlocks.length > blocks.length) await tx.trim(BigInt(blocks.length), BigInt(this.catalogBlocks.length - blocks.length));
        return v;
      });
      this.setCatalog(draft);
      this.catalogBlocks = blocks;
      await this.cow.flush();
      return value;
    };
    const p = this.mutex.then(run, run);
    this.mutex = p.catch(() => undefined);
    return p;
  }

  private volumeByName(c: Catalog, name: string): VolumeEntry {
    const v = c.entries.find((e): e is VolumeEntry => e.kind === 'volume' && e.name === name);
    if (v === undefined) throw new NotFoundError(`no volume named '${name}'`);
    return v;
  }

  private snapshotByName(c: Catalog, volume: VolumeEntry, name: string): SnapshotEntry {
    const s = c.entries.find((e): e is SnapshotEntry => e.kind === 'snapshot' && e.volume === volume.id && e.name === name);
    if (s === undefined) throw new NotFoundError(`no snapshot named '${volume.name}@${name}'`);
    return s;
  }

  private resolve(c: Catalog, spec: string): VolumeEntry | SnapshotEntry {
    const { volume, snapshot } = parseSpec(spec);
    const v = this.volumeByName(c, volume);
    return snapshot === undefined ? v : this.snapshotByName(c, v, snapshot);
  }

  private specOf(c: Catalog, e: Entry): string {
    if (e.kind === 'volume') return e.name;
    const v = c.entries.find((x) => x.kind === 'volume' && x.id === e.volume) as VolumeEntry | undefined;
    return e.kind === 'snapshot' ? `${v?.name ?? '?'}@${e.name}` : `${v?.name ?? '?'}#scratch${e.id}`;
  }

  private newId(c: Catalog): number {
    if (c.nextId > MAX_IMAGE_ID) throw new InvalidArgumentError('the pool has used all image ids');
    return c.nextId++;
  }

  private childrenOf(c: Catalog, snapId: number): VolumeEntry[] {
    return c.entries.filter((e): e is VolumeEntry => e.kind === 'volume' && e.parent === snapId);
  }

  // ===========================================================================================
  // Volumes
  // ===========================================================================================

  /**
   * A new, empty volume. `incomplete`: one being filled (an import) that is not yet a whole
   * image: the pool removes it when it opens, unless markComplete came first.
   */
  async createVolume(name: string, size: number, options: { incomplete?: boolean } = {}): Promise<VolumeInfo> {
    checkName(name, 'volume');
    checkSize(size);
    return this.mutate(async (c) => {
      if (c.entries.some((e) => e.kind === 'volume' && e.name === name)) throw new ExistsError(`a volume named '${name}' exists`);
      const v: VolumeEntry = { kind: 'volume', id: this.newId(c), name, size, created: new Date().toISOString(), parent: null };
      if (options.incomplete === true) v.incomplete = true;
      c.entries.push(v);
      return this.volumeInfo(c, v);
    });
  }

  /**
   * Remove volume `id` if it is still incomplete (an import that failed, or that a crash cut
   * short); by id, so that a volume renamed meanwhile and another now under its old name are
   * told apart. False if there is no such incomplete volume.
   */
  async removeIncomplete(id: number): Promise<boolean> {
    return this.mutate(async (c, tx) => {
      const v = c.entries.find((e): e is VolumeEntry => e.kind === 'volume' && e.id === id);
      if (v === undefined || v.incomplete !== true) return false;
      if ((this.openCount.get(v.id) ?? 0) > 0) throw new BusyError(`volume '${v.name}' is open`);
      this.checkNoAtomicWrite(c, v);
      c.entries = c.entries.filter((e) => e.id !== v.id);
      await tx.trim(slotBase(v.id), SLOT_BLOCKS);
      return true;
    });
  }

  /** Clear the incomplete mark of volume `id` (createVolume): it is whole now. */
  async markComplete(id: number): Promise<void> {
    await this.mutate(async (c) => {
      const v = c.entries.find((e): e is VolumeEntry => e.kind === 'volume' && e.id === id);
      if (v === undefined) throw new NotFoundError(`volume ${id} was removed before it was complete`);
      delete v.incomplete;
    });
  }

  listVolumes(): VolumeInfo[] {
    this.checkOpen();
    const c = this.catalog;
    return c.entries.filter((e): e is VolumeEntry => e.kind === 'volume').map((v) => this.volumeInfo(c, v));
  }

  private volumeInfo(c: Catalog, v: VolumeEntry): VolumeInfo {
    const parent = v.parent === null ? null : this.specOf(c, c.entries.find((e) => e.id === v.parent)!);
    return { name: v.name, id: v.id, size: v.size, created: v.created, parent, snapshots: c.entries.filter((e) => e.kind === 'snapshot' && e.volume === v.id).length, incomplete: v.incomplete === true };
  }

  /** Open `VOLUME` (read-write) or `VOLUME@SNAPSHOT` (read-only). Many may be open at once. */
  async openImage(spec: string): Promise<Image> {
    this.checkOpen();
    const e = this.resolve(this.catalog, spec);
    this.imageOpens++;
    this.openCount.set(e.id, (this.openCount.get(e.id) ?? 0) + 1);
    return new Image(this, e.id, spec, e.kind === 'snapshot' || this.readOnly);
  }

  async removeVolume(name: string): Promise<void> {
    await this.mutate(async (c, tx) => {
      const v = this.volumeByName(c, name);
      const snaps = c.entries.filter((e) => e.kind === 'snapshot' && e.volume === v.id);
      if (snaps.length > 0) throw new BusyError(`volume '${name}' has ${snaps.length} snapshot(s); remove them first`);
      if ((this.openCount.get(v.id) ?? 0) > 0) throw new BusyError(`volume '${name}' is open`);
      this.checkNoAtomicWrite(c, v);
      c.entries = c.entries.filter((e) => e.id !== v.id);
      await tx.trim(slotBase(v.id), SLOT_BLOCKS);
    });
  }

  async renameVolume(name: string, to: string): Promise<void> {
    checkName(to, 'volume');
    await this.mutate(async (c) => {
      const v = this.volumeByName(c, name);
      if (name === to) return; // already so named
      if (v.incomplete === true) throw new BusyError(`volume '${name}' is still being imported`);
      if (c.entries.some((e) => e.kind === 'volume' && e.name === to)) throw new ExistsError(`a volume named '${to}' exists`);
      v.name = to;
    });
  }

  /**
   * Grow, or shrink. Shrinking past mapped data needs allowShrink (the data past the end is
   * discarded). An open volume can grow but not shrink: its users' writes past the new end
   * would be lost, or land past it.
   */
  async resizeVolume(name: string, size: number, options: { allowShrink?: boolean } = {}): Promise<void> {
    checkSize(size);
    this.checkOpen();
    // Look for data past the new end before the transaction (Cow's usage() takes a read lock,
    // which a transaction holds exclusively). Nothing can write there in between: the volume
    // is not open (checked again inside, with the count of opens since, which catches an
    // image opened, written and closed meanwhile).
    const seen = this.volumeByName(this.catalog, name);
    const seenSize = seen.size;
    const opensBefore = this.imageOpens;
    if (size < seenSize) {
      this.checkShrinkable(this.catalog, seen);
      if (!options.allowShrink) {
        const past = await this.cow.usage(slotBase(seen.id) + BigInt(size / BLOCK_BYTES), BigInt((seenSize - size) / BLOCK_BYTES));
        if (past.mapped > 0n) throw new BusyError(`shrinking '${name}' to ${size} bytes would discard ${past.mapped} blocks of data; pass allowShrink (--allow-shrink) to do it anyway`);
      }
    }
    await this.mutate(async (c, tx) => {
      const v = this.volumeByName(c, name);
      if (size < v.size) {
        if (v.id !== seen.id || v.size !== seenSize || this.imageOpens !== opensBefore) throw new BusyError(`'${name}' was resized, replaced or opened meanwhile; try again`);
        this.checkShrinkable(c, v);
        await tx.trim(slotBase(v.id) + BigInt(size / BLOCK_BYTES), SLOT_BLOCKS - BigInt(size / BLOCK_BYTES));
      }
      v.size = size;
    });
  }

  private checkShrinkable(c: Catalog, v: VolumeEntry): void {
    if ((this.openCount.get(v.id) ?? 0) > 0) throw new BusyError(`volume '${v.name}' is open: it can grow, but shrinking it would pull data from under its users`);
    this.checkNoAtomicWrite(c, v);
  }

  /** An atomic write under way holds a scratch slot for the volume: it may not be removed or shrunk under it. */
  private checkNoAtomicWrite(c: Catalog, v: VolumeEntry): void {
    if (c.entries.some((e) => e.kind === 'scratch' && e.volume === v.id)) throw new BusyError(`volume '${v.name}' has an atomic write under way`);
  }

  /** A new volume with the contents of `from` (a volume or snapshot): O(log n), blocks shared until written. */
  async copyVolume(from: string, to: string): Promise<VolumeInfo> {
    checkName(to, 'volume');
    return this.mutate(async (c, tx) => {
      const src = this.resolve(c, from);
      if (src.kind === 'volume' && src.incomplete === true) throw new BusyError(`volume '${src.name}' is still being imported`);
      if (c.entries.some((e) => e.kind === 'volume' && e.name === to)) throw new ExistsError(`a volume named '${to}' exists`);
      const v: VolumeEntry = { kind: 'volume', id: this.newId(c), name: to, size: src.size, created: new Date().toISOString(), parent: null };
      c.entries.push(v);
      await tx.copy(slotBase(src.id), slotBase(v.id), SLOT_BLOCKS);
      return this.volumeInfo(c, v);
    });
  }

  /** Size, and bytes allocated and unique to the image (what removing it would free). */
  async usage(spec: string): Promise<ImageUsage> {
    this.checkOpen();
    const e = this.resolve(this.catalog, spec);
    const u = await this.cow.usage(slotBase(e.id), SLOT_BLOCKS);
    return { spec, size: e.size, allocatedBytes: Number(u.mapped) * BLOCK_BYTES, uniqueBytes: Number(u.exclusive) * BLOCK_BYTES };
  }

  // ===========================================================================================
  // Snapshots and clones
  // ===========================================================================================

  /** A read-only, point-in-time copy of the volume: every write acknowledged before this call is in it. */
  async createSnapshot(volume: string, name: string): Promise<SnapshotInfo> {
    checkName(name, 'snapshot');
    return this.mutate(async (c, tx) => {
      const v = this.volumeByName(c, volume);
      if (v.incomplete === true) throw new BusyError(`volume '${volume}' is still being imported`);
      if (c.entries.some((e) => e.kind === 'snapshot' && e.volume === v.id && e.name === name)) throw new ExistsError(`snapshot '${volume}@${name}' exists`);
      const s: SnapshotEntry = { kind: 'snapshot', id: this.newId(c), name, volume: v.id, size: v.size, created: new Date().toISOString(), protected: false };
      c.entries.push(s);
      await tx.copy(slotBase(v.id), slotBase(s.id), SLOT_BLOCKS);
      return this.snapshotInfo(c, s);
    });
  }

  listSnapshots(volume: string): SnapshotInfo[] {
    this.checkOpen();
    const c = this.catalog;
    const v = this.volumeByName(c, volume);
    return c.entries.filter((e): e is SnapshotEntry => e.kind === 'snapshot' && e.volume === v.id).map((s) => this.snapshotInfo(c, s));
  }

  private snapshotInfo(c: Catalog, s: SnapshotEntry): SnapshotInfo {
    return { name: s.name, spec: this.specOf(c, s), id: s.id, size: s.size, created: s.created, protected: s.protected, children: this.childrenOf(c, s.id).map((v) => v.name) };
  }

  async removeSnapshot(spec: string): Promise<void> {
    await this.mutate(async (c, tx) => {
      const s = this.snapshotOf(c, spec);
      if (s.protected) throw new BusyError(`snapshot '${spec}' is protected; unprotect it first`);
      const kids = this.childrenOf(c, s.id);
      if (kids.length > 0) throw new BusyError(`snapshot '${spec}' has clones (${kids.map((k) => k.name).join(', ')}); remove or flatten them first`);
      if ((this.openCount.get(s.id) ?? 0) > 0) throw new BusyError(`snapshot '${spec}' is open`);
      c.entries = c.entries.filter((e) => e.id !== s.id);
      await tx.trim(slotBase(s.id), SLOT_BLOCKS);
    });
  }

  /** Make the volume exactly what the snapshot holds (size included). */
  async rollback(spec: string): Promise<void> {
    await this.mutate(async (c, tx) => {
      const s = this.snapshotOf(c, spec);
      const v = c.entries.find((e): e is VolumeEntry => e.kind === 'volume' && e.id === s.volume)!;
      if ((this.openCount.get(v.id) ?? 0) > 0) throw new BusyError(`volume '${v.name}' is open (by a client?); roll back an idle volume`);
      await tx.copy(slotBase(s.id), slotBase(v.id), SLOT_BLOCKS);
      v.size = s.size;
    });
  }

  async protectSnapshot(spec: string, on: boolean): Promise<void> {
    await this.mutate(async (c) => {
      const s = this.snapshotOf(c, spec);
      if (!on && this.childrenOf(c, s.id).length > 0) throw new BusyError(`snapshot '${spec}' has clones; it stays protected until they are removed or flattened`);
      s.protected = on;
    });
  }

  private snapshotOf(c: Catalog, spec: string): SnapshotEntry {
    const e = this.resolve(c, spec);
    if (e.kind !== 'snapshot') throw new InvalidArgumentError(`'${spec}' is a volume, not VOLUME@SNAPSHOT`);
    return e;
  }

  /** A writable volume whose contents start as the snapshot's. The snapshot is protected while it has clones. */
  async clone(snapshotSpec: string, name: string): Promise<VolumeInfo> {
    checkName(name, 'volume');
    return this.mutate(async (c, tx) => {
      const s = this.snapshotOf(c, snapshotSpec);
      if (c.entries.some((e) => e.kind === 'volume' && e.name === name)) throw new ExistsError(`a volume named '${name}' exists`);
      const v: VolumeEntry = { kind: 'volume', id: this.newId(c), name, size: s.size, created: new Date().toISOString(), parent: s.id };
      c.entries.push(v);
      s.protected = true;
      await tx.copy(slotBase(s.id), slotBase(v.id), SLOT_BLOCKS);
      return this.volumeInfo(c, v);
    });
  }

  listChildren(snapshotSpec: string): string[] {
    this.checkOpen();
    return this.childrenOf(this.catalog, this.snapshotOf(this.catalog, snapshotSpec).id).map((v) => v.name);
  }

  /**
   * Detach a clone from its parent snapshot. Its blocks are already its own through Cow's
   * refcounts, so this changes only the catalog: O(1), and no data is copied.
   */
  async flatten(name: string): Promise<void> {
    await this.mutate(async (c) => {
      const v = this.volumeByName(c, name);
      if (v.parent === null) throw new InvalidArgumentError(`volume '${name}' is not a clone`);
      v.parent = null;
    });
  }

  /**
   * The byte extents that differ between `from` (a snapshot) and `to` (a later snapshot of the
   * same volume, or the volume itself), in order; for incremental backup.
   */
  async *diff(from: string, to: string): AsyncGenerator<DiffExtent> {
    this.checkOpen();
    const a = this.resolve(this.catalog, from);
    const b = this.resolve(this.catalog, to);
    const size = Math.max(a.size, b.size);
    const blocks = BigInt(Math.ceil(size / BLOCK_BYTES));
    let start = 0n;
    while (start < blocks) {
      const ex = await this.cow.diff(slotBase(a.id) + start, slotBase(b.id) + start, blocks - start, 1024);
      for (const e of ex) yield { offset: Number((start + e.start) * BigInt(BLOCK_BYTES)), length: Number(e.count * BigInt(BLOCK_BYTES)) };
      if (ex.length < 1024) return;
      const last = ex[ex.length - 1]!;
      start += last.start + last.count;
    }
  }

  // ===========================================================================================
  // Atomic writes' scratch space (used by Image.writeAtomic)
  // ===========================================================================================

  async allocateScratch(volumeId: number): Promise<number> {
    return this.mutate(async (c) => {
      const id = this.newId(c);
      c.entries.push({ kind: 'scratch', id, volume: volumeId, created: new Date().toISOString() });
      return id;
    });
  }

  /**
   * Run `fn` (the exchanges) and drop the scratch slot, in one transaction, if the volume still
   * holds `bytes` (else nothing is changed and the caller drops the slot).
   */
  async commitScratch(id: number, bytes: number, fn: (tx: CowTransaction) => Promise<void>): Promise<void> {
    await this.mutate(async (c, tx) => {
      const s = c.entries.find((e) => e.kind === 'scratch' && e.id === id);
      const v = s?.kind === 'scratch' ? c.entries.find((e): e is VolumeEntry => e.kind === 'volume' && e.id === s.volume) : undefined;
      if (v === undefined || v.size < bytes) throw new BusyError(`the volume was removed or shrunk during the atomic write; nothing was written`);
      await fn(tx);
      await tx.trim(slotBase(id), SLOT_BLOCKS);
      c.entries = c.entries.filter((e) => e.id !== id);
    });
  }

  async dropScratch(id: number): Promise<void> {
    await this.mutate(async (c, tx) => {
      await tx.trim(slotBase(id), SLOT_BLOCKS);
      c.entries = c.entries.filter((e) => e.id !== id);
    });
  }

  // ===========================================================================================
  // For Image
  // ===========================================================================================

  private setCatalog(c: Catalog): void {
    this.catalog = c;
    this.byId = new Map(c.entries.map((e) => [e.id, e]));
  }

  /** An open image's kind and its spec now (a rename shows here at once). */
  imageNames(id: number): { kind: 'volume' | 'snapshot'; spec: string } {
    const e = this.byId.get(id);
    if (e === undefined || e.kind === 'scratch') throw new NotFoundError(`image ${id} no longer exists`);
    return { kind: e.kind, spec: this.specOf(this.catalog, e) };
  }

  imageSize(id: number): number {
    const e = this.byId.get(id);
    if (e === undefined || e.kind === 'scratch') throw new NotFoundError(`image ${id} no longer exists`);
    return e.size;
  }

  checkImage(id: number, spec: string): void {
    this.checkOpen();
    if (!this.byId.has(id)) throw new NotFoundError(`'${spec}' no longer exists`);
  }

  imageClosed(id: number): void {
    const n = (this.openCount.get(id) ?? 1) - 1;
    if (n <= 0) this.openCount.delete(id);
    else this.openCount.set(id, n);
  }

  async flush(): Promise<void> {
    this.checkOpen();
    await this.cow.flush();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await this.mutex;
    this.closed = true;
    if (!this.readOnly) await this.cow.flush().catch(() => undefined);
    await this.cow.close();
  }

  private checkOpen(): void {
    if (this.closed) throw new ClosedError('the pool is closed');
  }
}

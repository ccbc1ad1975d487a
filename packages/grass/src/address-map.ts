/**
 * AddressMap: Grass address -> where the latest version of its record lives
 * (segment slot, byte offset, payload length).
 *
 * Memory: 10 bytes per address (plus 4 of write temperature) in pages of MAP_PAGE_ENTRIES, allocated only where addresses
 * are used, so a dense address range costs ~15 B per live record (limit: 16 B, measured by
 * `pasture bench grass --mode map-memory`). A page is also the unit a checkpoint writes, so each
 * page carries a dirty bit.
 *
 * Not thread-safe; Grass calls it from its single JavaScript thread only.
 */
import { assert } from './assert.ts';
import { MAP_ENTRY_BYTES, MAP_PAGE_ENTRIES, NO_SLOT } from './format.ts';

const PAGE_MASK = MAP_PAGE_ENTRIES - 1;

/** Temperature units: the user clock in 64 KiB steps, modulo 2^24 (ages wrap after 1 TiB written). */
export const CLOCK_UNIT_BYTES = 65536;
const CLOCK_MOD = 2 ** 24;
/** prevLife: not written since this process opened the store (lastWrite meaningless). */
export const LIFE_UNSEEN = 255;
/** prevLife: written once since open; the life of the version before is unknown. */
export const LIFE_UNKNOWN = 254;

export class MapPage {
  readonly slot = new Uint32Array(MAP_PAGE_ENTRIES).fill(NO_SLOT);
  readonly offset = new Uint32Array(MAP_PAGE_ENTRIES);
  readonly length = new Uint16Array(MAP_PAGE_ENTRIES);
  /**
   * Write temperature, kept in memory only (a heuristic for the cleaner, rebuilt as data is
   * rewritten): when the address was last written by a user (24 bits) and log2 of how long
   * the version that write replaced had lived (8 bits), packed in 4 bytes per address.
   */
  readonly temp = new Uint32Array(MAP_PAGE_ENTRIES).fill(LIFE_UNSEEN);
  mapped = 0;
  dirty = true;

  /** Serialize as a checkpoint map page: MAP_ENTRY_BYTES per entry. */
  encode(): Uint8Array {
    const out = new Uint8Array(MAP_PAGE_ENTRIES * MAP_ENTRY_BYTES);
    const v = new DataView(out.buffer);
    for (let i = 0; i < MAP_PAGE_ENTRIES; i++) {
      const o = i * MAP_ENTRY_BYTES;
      v.setUint32(o, this.slot[i]!, true);
      v.setUint32(o + 4, this.offset[i]!, true);
      v.setUint16(o + 8, this.length[i]!, true);
    }
    return out;
  }

  static decode(bytes: Uint8Array): MapPage {
    assert(bytes.length === MAP_PAGE_ENTRIES * MAP_ENTRY_BYTES, 'map page has the wrong length');
    const p = new MapPage();
    const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    for (let i = 0; i < MAP_PAGE_ENTRIES; i++) {
      const o = i * MAP_ENTRY_BYTES;
      const s = v.getUint32(o, true);
      p.slot[i] = s;
      p.offset[i] = v.getUint32(o + 4, true);
      p.length[i] = v.getUint16(o + 8, true);
      if (s !== NO_SLOT) p.mapped++;
    }
    p.dirty = false;
    return p;
  }
}

export interface Location {
  slot: number;
  offset: number;
  length: number;
}

export class AddressMap {
  private readonly pages = new Map<number, MapPage>();
  private count = 0;
  private lengths = 0;

  /** Number of mapped addresses. */
  get size(): number {
    return this.count;
  }

  /** Payload bytes of the records mapped (their headers not included). */
  get payloadBytes(): number {
    return this.lengths;
  }

  get pageCount(): number {
    return this.pages.size;
  }

  /** Bytes of typed arrays held (the map's memory, without the JS object overheads). */
  get memoryBytes(): number {
    return this.pages.size * MAP_PAGE_ENTRIES * 14;
  }

  /** Slot of `gaddr`'s record, or NO_SLOT. */
  slotOf(gaddr: number): number {
    const p = this.pages.get(Math.floor(gaddr / MAP_PAGE_ENTRIES));
    return p === undefined ? NO_SLOT : p.slot[gaddr & PAGE_MASK]!;
  }

  get(gaddr: number): Location | undefined {
    const p = this.pages.get(Math.floor(gaddr / MAP_PAGE_ENTRIES));
    if (p === undefined) return undefined;
    const i = gaddr & PAGE_MASK;
    const slot = p.slot[i]!;
    if (slot === NO_SLOT) return undefined;
    return { slot, offset: p.offset[i]!, length: p.length[i]! };
  }

  /** True if `gaddr` maps to exactly (slot, offset). */
  isAt(gaddr: number, slot: number, offset: number): boolean {
    const p = this.pages.get(Math.floor(gaddr / MAP_PAGE_ENTRIES));
    if (p === undefined) return false;
    const i = gaddr & PAGE_MASK;
    return p.slot[i] === slot && p.offset[i] === offset;
  }

  /** Map `gaddr`; returns the previous location's (slot, length) packed as slot or NO_SLOT via `prev`. */
  set(gaddr: number, slot: number, offset: number, length: number, prev?: Location): boolean {
    assert(slot !== NO_SLOT, 'cannot map to NO_SLOT');
    const pn = Math.floor(gaddr / MAP_PAGE_ENTRIES);
    let p = this.pages.get(pn);
    if (p === undefined) {
      p = new MapPage();
      this.pages.set(pn, p);
    }
    const i = gaddr & PAGE_MASK;
    const old = p.slot[i]!;
    let had = false;
    if (old !== NO_SLOT) {
      had = true;
      this.lengths -= p.length[i]!;
      if (prev !== undefined) {
        prev.slot = old;
        prev.offset = p.offset[i]!;
        prev.length = p.length[i]!;
      }
    } else {
      p.mapped++;
      this.count++;
    }
    p.slot[i] = slot;
    p.offset[i] = offset;
    p.length[i] = length;
    this.lengths += length;
    p.dirty = true;
    return had;
  }

  /** Unmap `gaddr`; returns true (and fills `prev`) if it was mapped. */
  delete(gaddr: number, prev?: Location): boolean {
    const pn = Math.floor(gaddr / MAP_PAGE_ENTRIES);
    const p = this.pages.get(pn);
    if (p === undefined) return false;
    const i = gaddr & PAGE_MASK;
    const old = p.slot[i]!;
    if (old === NO_SLOT) return false;
    if (prev !== undefined) {
      prev.slot = old;
      prev.offset = p.offset[i]!;
      prev.length = p.length[i]!;
    }
    this.lengths -= p.length[i]!;
    p.slot[i] = NO_SLOT;
    p.offset[i] = 0;
    p.length[i] = 0;
    p.mapped--;
    this.count--;
    p.dirty = true;
    // Empty pages stay (dirty) so that the next checkpoint records the emptiness; the
    // checkpoint drops them afterwards via dropEmptyPages().
    return true;
  }

  /**
   * Note a user write of `gaddr` (already mapped by set()) at user clock `now` (bytes):
   * remember when, and how long the version it replaced had lived.
   */
  noteUserWrite(gaddr: number, now: number): void {
    const p = this.pages.get(Math.floor(gaddr / MAP_PAGE_ENTRIES));
    if (p === undefined) return;
    const i = gaddr & PAGE_MASK;
    const units = Math.floor(now / CLOCK_UNIT_BYTES) % CLOCK_MOD;
    const t = p.temp[i]!;
    let life: number;
    if ((t & 255) === LIFE_UNSEEN) {
      life = LIFE_UNKNOWN;
    } else {
      const lived = (units - (t >>> 8) + CLOCK_MOD) % CLOCK_MOD;
      life = Math.min(64, Math.ceil(Math.log2(lived + 1)));
    }
    p.temp[i] = ((units << 8) | life) >>> 0;
  }

  /** Bytes of user clock since `gaddr` was last written (Infinity if never seen), and the lifespan of the version before it (upper bound). */
  temperature(gaddr: number, now: number): { sinceWrite: number; prevLifespan: number } {
    const p = this.pages.get(Math.floor(gaddr / MAP_PAGE_ENTRIES));
    if (p === undefined) return { sinceWrite: Infinity, prevLifespan: Infinity };
    const t = p.temp[gaddr & PAGE_MASK]!;
    const life = t & 255;
    if (life === LIFE_UNSEEN) return { sinceWrite: Infinity, prevLifespan: Infinity };
    const units = Math.floor(now / CLOCK_UNIT_BYTES) % CLOCK_MOD;
    const since = ((units - (t >>> 8) + CLOCK_MOD) % CLOCK_MOD) * CLOCK_UNIT_BYTES;
    return { sinceWrite: since, prevLifespan: life === LIFE_UNKNOWN ? Infinity : 2 ** life * CLOCK_UNIT_BYTES };
  }

  /** Page numbers, ascending. */
  pageNumbers(): number[] {
    return [...this.pages.keys()].sort((a, b) => a - b);
  }

  page(pageNo: number): MapPage | undefined {
    return this.pages.get(pageNo);
  }

  /** Install a page read from a checkpoint. */
  installPage(pageNo: number, page: MapPage): void {
    assert(!this.pages.has(pageNo), `map page ${pageNo} installed twice`);
    this.pages.set(pageNo, page);
    this.count += page.mapped;
    for (let i = 0; i < MAP_PAGE_ENTRIES; i++) if (page.slot[i] !== NO_SLOT) this.lengths += page.length[i]!;
  }

  markDirty(pageNo: number): void {
    const p = this.pages.get(pageNo);
    if (p !== undefined) p.dirty = true;
  }

  /** Remove pages that hold no mapping and are not dirty. */
  dropEmptyPages(): number[] {
    const dropped: number[] = [];
    for (const [pn, p] of this.pages) {
      if (p.mapped === 0 && !p.dirty) {
        this.pages.delete(pn);
        dropped.push(pn);
      }
    }
    return dropped;
  }

  /** Visit every mapping. */
  forEach(fn: (gaddr: number, slot: number, offset: number, length: number) => void): void {
    for (const [pn, p] of this.pages) {
      if (p.mapped === 0) continue;
      const base = pn * MAP_PAGE_ENTRIES;
      for (let i = 0; i < MAP_PAGE_ENTRIES; i++) {
        const s = p.slot[i]!;
        if (s !== NO_SLOT) fn(base + i, s, p.offset[i]!, p.length[i]!);
      }
    }
  }
}


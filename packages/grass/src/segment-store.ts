/**
 * SegmentStore: the only code in Pasture that touches storage (LevelDB's Env, nbdkit's
 * next_ops). Grass drives it; memory, file, fault-injecting and (later) S3 stores implement it,
 * and wrappers stack like nbdkit filters.
 *
 * The contract, shaped so that an object store fits:
 * - A segment is written front to back between its first `write` and `seal`: writes never
 *   overlap earlier writes of the same segment's life, except that a segment is reused only
 *   after `release`.
 * - `sync()` makes every completed `write` durable. `seal(s)` makes segment s durable and
 *   immutable (an object store uploads it as one object). A write that was not synced or
 *   sealed may be lost, kept, or torn at 512-byte boundaries by a crash.
 * - `read` may be issued for any range of a segment that was written; it may return any bytes
 *   for a range never written (Grass detects that with checksums).
 * - `writeSuperblock` is durable when it resolves; a crash during it may tear it.
 * - Any method may reject; Grass treats a rejected write or sync as fatal to the instance.
 *
 * Thread-safety: one Grass instance owns a store at a time; file and S3 stores enforce it with
 * a lock that names the holder.
 */
export interface SegmentStore {
  /** Bytes per segment. */
  readonly segmentBytes: number;
  /** Number of segment slots, numbered 0 .. segmentCount-1. */
  readonly segmentCount: number;
  /** A one-line description, e.g. "file:/var/lib/pasture (4096 x 8 MiB)". */
  describe(): string;
  write(segment: number, offset: number, data: Uint8Array): Promise<void>;
  sync(): Promise<void>;
  seal(segment: number): Promise<void>;
  /** A fresh array the caller owns: Grass hands parts of it up without copying. */
  read(segment: number, offset: number, length: number): Promise<Uint8Array>;
  /** The segment's contents will not be read again before it is rewritten. */
  release(segment: number): Promise<void>;
  /** Slot 0 or 1; undefined if never written. */
  readSuperblock(slot: 0 | 1): Promise<Uint8Array | undefined>;
  writeSuperblock(slot: 0 | 1, data: Uint8Array): Promise<void>;
  close(): Promise<void>;
}

export interface StoreGeometry {
  segmentBytes: number;
  segmentCount: number;
}

export function checkRange(store: StoreGeometry, segment: number, offset: number, length: number): void {
  if (
    !Number.isInteger(segment) || segment < 0 || segment >= store.segmentCount ||
    !Number.isInteger(offset) || offset < 0 || !Number.isInteger(length) || length < 0 ||
    offset + length > store.segmentBytes
  ) {
    throw new RangeError(`segment I/O out of range: segment ${segment} offset ${offset} length ${length}`);
  }
}

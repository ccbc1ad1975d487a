/**
 * What the NBD server serves. nbd imports no other Pasture layer: anything with this shape
 * can be exported (a Human volume or snapshot, a Cow region, a plain file, memory). The
 * server checks every request against `size` and the limits before calling in, so a device
 * sees only in-range, well-formed calls (nbdkit's plugin contract).
 */
export interface BlockDevice {
  /** Size in bytes. */
  readonly size: number;
  /** Refuse writes, trims and zeroes (NBD_FLAG_READ_ONLY). */
  readonly readOnly: boolean;
  /**
   * A flush on any connection to this device covers writes acknowledged on every other
   * connection to it (NBD_FLAG_CAN_MULTI_CONN).
   */
  readonly multiConn: boolean;
  /**
   * `zero` costs less than writing the zeros (a hole punched, a shared zero record), so the
   * server offers NBD_FLAG_SEND_FAST_ZERO. Absent or false: a WRITE_ZEROES with FAST_ZERO gets
   * NBD_ENOTSUP at once, as the spec requires, and the client writes the zeros itself (or
   * skips them, if it knows the target is zero already).
   */
  readonly fastZero?: boolean;
  /** Block size constraints advertised with NBD_INFO_BLOCK_SIZE (powers of two). */
  readonly blockSize?: { minimum: number; preferred: number; maximum: number };
  read(offset: number, length: number): Promise<Uint8Array>;
  /** `fua`: durable before the promise resolves. */
  write(offset: number, data: Uint8Array, fua: boolean): Promise<void>;
  /** Durability barrier for every write acknowledged before it. */
  flush(): Promise<void>;
  /** Discard (may unmap); reads afterwards return zeros or the old data, never anything else. */
  trim(offset: number, length: number, fua: boolean): Promise<void>;
  /** Make the range read as zeros. `noHole`: allocate rather than punch a hole, if the device can tell. */
  zero(offset: number, length: number, flags: { fua: boolean; noHole: boolean }): Promise<void>;
  /**
   * Allocation of [offset, offset + length): extents in order, starting at `offset`, covering
   * at least one byte and at most `length` bytes. `hole`: not allocated; `zero`: reads as zeros.
   */
  blockStatus(offset: number, length: number): Promise<{ length: number; hole: boolean; zero: boolean }[]>;
  /** Optional read-ahead hint (NBD_CMD_CACHE). */
  cache?(offset: number, length: number): Promise<void>;
}

/** An export the server can open by name, once per connection. */
export interface ExportInfo {
  name: string;
  description: string;
}

/** Where exports come from: a pool's volumes and snapshots, or a fixed map in tests. */
export interface ExportProvider {
  list(): ExportInfo[];
  /** Open an export for one connection; undefined if there is no such export. */
  open(name: string): Promise<OpenExport | undefined>;
  /** The export served to clients that ask for the empty name, if any. */
  readonly defaultExport?: string;
}

export interface OpenExport {
  device: BlockDevice;
  /** Called when the connection ends. */
  close(): Promise<void>;
}

/**
 * A plain file as a BlockDevice, through one fs.promises FileHandle (positional reads and
 * writes, so concurrent requests need no lock). For comparisons with the Pasture layers, not
 * for production: Node has no fallocate or SEEK_HOLE, so trim does nothing (allowed: a trim
 * is a hint), zero writes zeros, and block status reports everything as data (status 0 is
 * always safe). flush and FUA use fdatasync, which covers the file for every descriptor on
 * Linux, so multiConn is honest. The caller owns the device and closes it.
 */
import { constants } from 'node:fs';
import { type FileHandle, open } from 'node:fs/promises';
import type { BlockDevice } from './device.ts';

/** Writes of zeros go out in pieces of this size, so a huge NBD_CMD_WRITE_ZEROES needs little memory. */
const ZERO_PIECE_BYTES = 1024 * 1024;

export class FileDevice implements BlockDevice {
  readonly multiConn = true;
  /** zero() writes zeros (Node has no fallocate), so NBD_CMD_FLAG_FAST_ZERO is refused. */
  readonly fastZero = false;

  private constructor(private readonly fh: FileHandle, readonly size: number, readonly readOnly: boolean) {}

  /**
   * Open `path`. With `size`, the file is created if missing and truncated or extended to it;
   * without, it must exist and its current size is the device size.
   */
  static async open(path: string, o: { readOnly?: boolean; size?: number } = {}): Promise<FileDevice> {
    const readOnly = o.readOnly ?? false;
    const flags = readOnly ? constants.O_RDONLY : constants.O_RDWR | (o.size !== undefined ? constants.O_CREAT : 0);
    const fh = await open(path, flags, 0o644);
    try {
      if (o.size !== undefined && !readOnly) await fh.truncate(o.size);
      const { size } = await fh.stat();
      if (!Number.isSafeInteger(size)) throw new RangeError(`file size ${size} is not a safe integer`);
      return new FileDevice(fh, size, readOnly);
    } catch (e) {
      await fh.close();
      throw e;
    }
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    const out = Buffer.alloc(length);
    let at = 0;
    while (at < length) {
      const { bytesRead } = await this.fh.read(out, at, length - at, offset + at);
      if (bytesRead === 0) break; // past the end of a file that shrank under us: zeros
      at += bytesRead;
    }
    return out;
  }

  async write(offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    let at = 0;
    while (at < data.length) {
      const { bytesWritten } = await this.fh.write(data, at, data.length - at, offset + at);
      at += bytesWritten;
    }
    if (fua) await this.fh.datasync();
  }

  async flush(): Promise<void> {
    await this.fh.datasync();
  }

  async trim(_offset: number, _length: number, fua: boolean): Promise<void> {
    if (fua) await this.fh.datasync();
  }

  async zero(offset: number, length: number, flags: { fua: boolean; noHole: boolean }): Promise<void> {
    const zeros = Buffer.alloc(Math.min(length, ZERO_PIECE_BYTES));
    for (let at = 0; at < length; at += zeros.length) {
      await this.write(offset + at, zeros.subarray(0, Math.min(zeros.length, length - at)), false);
    }
    if (flags.fua) await this.fh.datasync();
  }

  async blockStatus(_offset: number, length: number): Promise<{ length: number; hole: boolean; zero: boolean }[]> {
    return [{ length, hole: false, zero: false }];
  }

  async close(): Promise<void> {
    await this.fh.close();
  }
}

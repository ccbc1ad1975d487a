/**
 * A fault-injecting layer over any BlockDevice (nbdkit's `error` filter): calls of chosen kinds
 * fail with a chosen errno `code`, once or every time, or hang until released. Everything else
 * is forwarded. For tests of how the server maps and survives device failures.
 */
import type { BlockDevice } from './device.ts';

export type DeviceCall = 'read' | 'write' | 'flush' | 'trim' | 'zero' | 'blockStatus' | 'cache';

export class FaultyDevice implements BlockDevice {
  private readonly faults = new Map<DeviceCall, { code: string | undefined; times: number }>();
  private gate: Promise<void> | undefined;
  private openGate: (() => void) | undefined;

  constructor(private readonly next: BlockDevice) {}

  get size(): number {
    return this.next.size;
  }
  get readOnly(): boolean {
    return this.next.readOnly;
  }
  get multiConn(): boolean {
    return this.next.multiConn;
  }
  get fastZero(): boolean {
    return this.next.fastZero === true;
  }
  get blockSize(): BlockDevice['blockSize'] {
    return this.next.blockSize;
  }

  /** The next `times` calls of `kind` throw an Error with `code` (no code: a plain Error). */
  fail(kind: DeviceCall, code: string | undefined, times = 1): void {
    this.faults.set(kind, { code, times });
  }

  /** Calls wait (before reaching the device) until `release()`. */
  hold(): void {
    this.gate ??= new Promise((resolve) => (this.openGate = resolve));
  }

  release(): void {
    this.openGate?.();
    this.gate = undefined;
    this.openGate = undefined;
  }

  /** Calls waiting at the gate now. */
  held = 0;

  private async enter(kind: DeviceCall): Promise<void> {
    if (this.gate !== undefined) {
      this.held++;
      await this.gate;
      this.held--;
    }
    const f = this.faults.get(kind);
    if (f === undefined || f.times <= 0) return;
    f.times--;
    const e = new Error(`injected ${kind} failure${f.code ? ` (${f.code})` : ''}`);
    throw f.code === undefined ? e : Object.assign(e, { code: f.code });
  }

  async read(offset: number, length: number): Promise<Uint8Array> {
    await this.enter('read');
    return this.next.read(offset, length);
  }
  async write(offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    await this.enter('write');
    return this.next.write(offset, data, fua);
  }
  async flush(): Promise<void> {
    await this.enter('flush');
    return this.next.flush();
  }
  async trim(offset: number, length: number, fua: boolean): Promise<void> {
    await this.enter('trim');
    return this.next.trim(offset, length, fua);
  }
  async zero(offset: number, length: number, flags: { fua: boolean; noHole: boolean }): Promise<void> {
    await this.enter('zero');
    return this.next.zero(offset, length, flags);
  }
  async blockStatus(offset: number, length: number): Promise<{ length: number; hole: boolean; zero: boolean }[]> {
    await this.enter('blockStatus');
    return this.next.blockStatus(offset, length);
  }
  async cache(offset: number, length: number): Promise<void> {
    await this.enter('cache');
    await this.next.cache?.(offset, length);
  }
}

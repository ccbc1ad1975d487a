/**
 * FaultySegmentStore: a fault-injecting wrapper (nbdkit's error filter, LevelDB's fault
 * injection Env). It forwards to a real store and remembers every write that is not yet
 * durable, so that `crash()` can decide, per write, whether it reached the platter: kept,
 * dropped, or torn at 512-byte sector granularity. After a crash every call fails until the
 * wrapped store is reopened by a new Grass instance, which then sees the crash image.
 *
 * Faults it injects, each at a seeded rate or on demand:
 * - crash at the N-th mutating call (write, sync, seal, writeSuperblock), mid-call;
 * - EIO or ENOSPC from writes, syncs and reads;
 * - "failed after applying": the write took effect but the call reports an error;
 * - bit flips in durable data.
 */
import type { SegmentStore } from '../segment-store.ts';
import { Rng } from '../rng.ts';
import { SUPERBLOCK_BYTES } from '../format.ts';

export const SECTOR_BYTES = 512;

export class CrashedError extends Error {
  override name = 'CrashedError';
  readonly code = 'ECRASHED';
}

export class InjectedError extends Error {
  override name = 'InjectedError';
  constructor(
    readonly code: 'EIO' | 'ENOSPC',
    what: string,
  ) {
    super(`${code}: injected fault on ${what}`);
  }
}

export interface FaultOptions {
  seed: number;
  /** Crash during the N-th mutating call (1-based); 0 = never. */
  crashAtOp?: number;
  /** Per-call probability of EIO on write / sync / seal. */
  writeErrorRate?: number;
  /** Per-call probability of EIO on read. */
  readErrorRate?: number;
  /** Per-call probability that a write or seal returns ENOSPC instead of writing. */
  noSpaceRate?: number;
  /** Per-call probability that a write takes effect but reports EIO. */
  failAfterApplyRate?: number;
}

interface PendingWrite {
  segment: number;
  offset: number;
  /** Contents before the write, to undo it. */
  before: Uint8Array;
  after: Uint8Array;
}

export interface CrashReport {
  pendingWrites: number;
  kept: number;
  dropped: number;
  torn: number;
}

export class FaultySegmentStore implements SegmentStore {
  readonly segmentBytes: number;
  readonly segmentCount: number;
  private readonly rng: Rng;
  private pending: PendingWrite[] = [];
  private mutatingOps = 0;
  private crashed = false;
  lastCrash: CrashReport | undefined;
  /** Counts of injected faults, for tests to assert on. */
  readonly injected = { eio: 0, enospc: 0, failAfterApply: 0, crashes: 0 };

  constructor(
    readonly inner: SegmentStore,
    public options: FaultOptions,
  ) {
    this.segmentBytes = inner.segmentBytes;
    this.segmentCount = inner.segmentCount;
    this.rng = new Rng(options.seed);
  }

  describe(): string {
    return `faulty(${this.inner.describe()})`;
  }

  get isCrashed(): boolean {
    return this.crashed;
  }

  get mutatingOpCount(): number {
    return this.mutatingOps;
  }

  private check(): void {
    if (this.crashed) throw new CrashedError('the store crashed');
  }

  /** Count a mutating call; true if the crash is scheduled for this one. */
  private tick(): boolean {
    this.check();
    this.mutatingOps++;
    const at = this.options.crashAtOp ?? 0;
    return at > 0 && this.mutatingOps >= at;
  }

  private maybeFail(rate: number | undefined, what: string): void {
    if (rate !== undefined && rate > 0 && this.rng.chance(rate)) {
      this.injected.eio++;
      throw new InjectedError('EIO', what);
    }
  }

  async write(segment: number, offset: number, data: Uint8Array): Promise<void> {
    const crashNow = this.tick();
    if (!crashNow) {
      this.maybeFail(this.options.writeErrorRate, `write segment ${segment}`);
      if (this.options.noSpaceRate && this.rng.chance(this.options.noSpaceRate)) {
        this.injected.enospc++;
        throw new InjectedError('ENOSPC', `write segment ${segment}`);
      }
    }
    const before = await this.inner.read(segment, offset, data.length);
    this.check();
    const after = data.slice();
    await this.inner.write(segment, offset, after);
    this.pending.push({ segment, offset, before, after });
    if (crashNow) {
      await this.crash();
      throw new CrashedError('crashed during write');
    }
    if (this.options.failAfterApplyRate && this.rng.chance(this.options.failAfterApplyRate)) {
      this.injected.failAfterApply++;
      throw new InjectedError('EIO', `write segment ${segment} (applied)`);
    }
  }

  async sync(): Promise<void> {
    const crashNow = this.tick();
    if (crashNow) {
      await this.crash();
      throw new CrashedError('crashed during sync');
    }
    this.maybeFail(this.options.writeErrorRate, 'sync');
    await this.inner.sync();
    this.check();
    this.pending = [];
  }

  async seal(segment: number): Promise<void> {
    const crashNow = this.tick();
    if (crashNow) {
      await this.crash();
      throw new CrashedError('crashed during seal');
    }
    this.maybeFail(this.options.writeErrorRate, `seal segment ${segment}`);
    await this.inner.seal(segment);
    this.check();
    // Only this segment is now durable (an object store uploads just this one).
    this.pending = this.pending.filter((w) => w.segment !== segment);
  }

  async read(segment: number, offset: number, length: number): Promise<Uint8Array> {
    this.check();
    this.maybeFail(this.options.readErrorRate, `read segment ${segment}`);
    return this.inner.read(segment, offset, length);
  }

  async release(segment: number): Promise<void> {
    this.check();
    await this.inner.release(segment);
  }

  async readSuperblock(slot: 0 | 1): Promise<Uint8Array | undefined> {
    this.check();
    return this.inner.readSuperblock(slot);
  }

  async writeSuperblock(slot: 0 | 1, data: Uint8Array): Promise<void> {
    const crashNow = this.tick();
    if (crashNow) {
      // Unsynced segment writes meet their fate first, then the superblock write itself
      // lands whole, not at all, or as a torn mixture of old and new bytes.
      await this.crash();
      const fate = this.rng.int(3);
      if (fate > 0) {
        const old = (await this.inner.readSuperblock(slot)) ?? new Uint8Array(SUPERBLOCK_BYTES);
        const mixed = data.slice();
        if (fate === 2) {
          const cut = this.rng.range(1, SUPERBLOCK_BYTES - 1);
          mixed.set(old.subarray(cut), cut);
        }
        await this.inner.writeSuperblock(slot, mixed);
      }
      throw new CrashedError('crashed during superblock write');
    }
    this.maybeFail(this.options.writeErrorRate, 'superblock write');
    await this.inner.writeSuperblock(slot, data);
  }

  async close(): Promise<void> {
    // Closing the wrapper does not close the wrapped store: a test reopens it after a crash.
    this.crashed = true;
  }

  /**
   * Crash now: each write not yet durable is kept, dropped or torn, chosen by the seeded RNG,
   * and every later call fails. Returns what happened.
   */
  async crash(): Promise<CrashReport> {
    if (this.crashed) return this.lastCrash ?? { pendingWrites: 0, kept: 0, dropped: 0, torn: 0 };
    this.crashed = true;
    this.injected.crashes++;
    const report: CrashReport = { pendingWrites: this.pending.length, kept: 0, dropped: 0, torn: 0 };
    // Undo in reverse order so that overlapping writes restore the right bytes.
    for (let i = this.pending.length - 1; i >= 0; i--) {
      const w = this.pending[i]!;
      const fate = this.rng.int(3);
      if (fate === 0) {
        report.kept++;
        continue;
      }
      if (fate === 1) {
        report.dropped++;
        await this.inner.write(w.segment, w.offset, w.before);
        continue;
      }
      report.torn++;
      const image = w.after.slice();
      // Sector boundaries are absolute in the segment, as on a disk.
      let pos = 0;
      while (pos < image.length) {
        const abs = w.offset + pos;
        const end = Math.min(image.length, pos + (SECTOR_BYTES - (abs % SECTOR_BYTES)));
        if (this.rng.chance(0.5)) image.set(w.before.subarray(pos, end), pos);
        pos = end;
      }
      await this.inner.write(w.segment, w.offset, image);
    }
    this.pending = [];
    await this.inner.sync();
    this.lastCrash = report;
    return report;
  }

  /** Flip one bit of durable data in a segment (bit-rot on the medium). */
  async flipBit(segment: number, offset: number, bit = 0): Promise<void> {
    const b = await this.inner.read(segment, offset, 1);
    b[0] = b[0]! ^ (1 << (bit & 7));
    await this.inner.write(segment, offset, b);
  }
}

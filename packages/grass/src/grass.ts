/**
 * GrassLog: the log-structured record store. Records of up to 4096 bytes keyed by Grass
 * address are appended to segments of a SegmentStore; an in-memory AddressMap says where the
 * latest version of each lives; checkpoints and roll-forward make the map durable; a segment
 * cleaner reclaims the space of dead records.
 *
 * Durability contract (tested by grass.model.test.ts):
 * - A batch (or a single put/trim) is visible to reads once its promise resolves.
 * - After `flush()` resolves, every batch whose promise resolved before flush() was called
 *   survives any crash.
 * - After a crash, the store holds a prefix of the batches in the order their promises
 *   resolved: never part of a batch, never a batch without every earlier one.
 *
 * Concurrency: one JavaScript thread. Appends and map updates are synchronous, so a batch is
 * atomic in memory; all storage I/O runs through one serialized queue (`enqueue`), so seals,
 * flushes and superblock writes reach the store in the order the format requires.
 */
import { assert, assertSafeInt } from './assert.ts';
import { AddressMap, MapPage } from './address-map.ts';
import {
  decodeCheckpointBody, decodeRoot, decodeSuperblock, encodeCheckpointBody, encodeRoot, encodeSuperblock,
  type CheckpointBody, type DirectoryEntry, type RecordRef, type SlotEntry, type StreamHead, type Superblock,
} from './checkpoint.ts';
import { crc32c } from './crc32c.ts';
import {
  ClosedError, CorruptionError, FormatError, InvalidArgumentError, NoSpaceError, StoreFailedError,
} from './errors.ts';
import {
  CHECKPOINT_CHUNK_BYTES, FLAG_BATCH_END, FOOTER_BYTES, MAP_ENTRY_BYTES, MAP_PAGE_ENTRIES, MAX_GADDR, MAX_GC_STREAMS,
  MAX_SEGMENT_BYTES, MAX_SEGMENT_COUNT, MAX_STREAMS, MAX_USER_RECORD_BYTES, MIN_SEGMENT_BYTES, MIN_SEGMENT_COUNT, NO_SLOT,
  RECORD_HEADER_BYTES, RecordKind, SEGMENT_HEADER_BYTES, STREAM_GC_FIRST, STREAM_META, STREAM_USER,
  SUMMARY_ENTRY_BYTES, viewOf,
} from './format.ts';
import { costBenefit, type CleanerContext, type CleanerPolicy, type SegmentInfo } from './policies.ts';
import {
  decodeFooter, decodeSegmentHeader, decodeSummaryEntry, encodeFooter, encodeRecord, encodeSegmentHeader,
  encodeSummaryEntry, peekRecordHeader, recordChecksumOk, segmentSeed, summaryOffset, type RecordHeader,
} from './records.ts';
import type { SegmentStore } from './segment-store.ts';
import { type GrassStats, type RecoveryReport, type StreamRecovery, utilizationHistogram } from './stats.ts';

/** Slot states as persisted in checkpoints. */
export const SLOT_FREE = 0;
export const SLOT_OPEN = 1;
export const SLOT_SEALED = 2;
/** Slot flag: the cleaner found a corrupt live record here; never clean it automatically. */
export const SLOT_FLAG_DAMAGED = 1;

export type BatchOp = { op: 'put'; gaddr: number; data: Uint8Array } | { op: 'trim'; gaddr: number };

/** The interface Grass offers the layer above (Cow) and research users. */
export interface Grass {
  /** Largest record payload. */
  readonly maxRecordBytes: number;
  /** The record at `gaddr` in an array the caller owns (perhaps a view with a byteOffset), or undefined if none. Throws CorruptionError rather than return wrong bytes. */
  read(gaddr: number): Promise<Uint8Array | undefined>;
  /**
   * read() of each address in `gaddrs` (at most MAX_READ_MANY), with records that lie next to
   * each other in a segment fetched in one store read (a run written together, as a
   * sequential write leaves them). The same checks as read().
   */
  readMany(gaddrs: readonly number[]): Promise<(Uint8Array | undefined)[]>;
  /** Payload length of the record at `gaddr`, or undefined if none; from memory, no I/O. */
  size(gaddr: number): number | undefined;
  put(gaddr: number, data: Uint8Array): Promise<void>;
  /**
   * batch(), done now if it needs no waiting for room: then its records are in place when this
   * returns true (read() sees them, the next flush makes them durable, all or none after a
   * crash). False, with nothing done, if batch() would have to wait (the cleaner must make room
   * first, or seals are backlogged).
   */
  tryBatch(ops: readonly BatchOp[]): boolean;
  /**
   * Resolves once tryBatch(ops) would find room (the cleaner made it, or seals drained), or
   * rejects as batch(ops) would (NoSpaceError); for callers that then try again.
   */
  roomFor(ops: readonly BatchOp[]): Promise<void>;
  trim(gaddr: number): Promise<void>;
  /** Apply all ops atomically: after a crash, all or none of them. */
  batch(ops: readonly BatchOp[]): Promise<void>;
  /** Durability barrier; concurrent callers share one sync. */
  flush(): Promise<void>;
  stats(): GrassStats;
  close(): Promise<void>;
}

export interface GrassOptions {
  /** Victim selection and output placement. Default: cost-benefit. */
  policy?: CleanerPolicy;
  /** Background cleaning starts when free segments fall to the reserve plus this many (default max(4, 1%)). */
  cleanStartSlackSegments?: number;
  /** ...and stops when they reach the start level plus this many (default max(4, 1%)). */
  cleanBatchFreeSegments?: number;
  /** Victims per cleaning round; one sync (and, for metadata, one checkpoint) per round. Default 8. */
  cleanerBatchSegments?: number;
  /** Write a checkpoint after this many log bytes (default: clamp(capacity/8, 64 MiB, 1 GiB)). */
  checkpointIntervalBytes?: number;
  /** Run the cleaner in the background (default true). Tests may drive it by hand. */
  backgroundCleaner?: boolean;
  /**
   * Share of the room outside the reserve that live records may fill (default 0.9); past it,
   * batches that add bytes fail with NoSpaceError. The rest stays garbage the cleaner can
   * always find, so cleaning a nearly full store stays cheap, and the half-full segments that
   * each reopen after a crash leaves behind are won back.
   */
  maxLiveShare?: number;
  /** Open without writing anything: for fsck and inspection. */
  readOnly?: boolean;
  /** Called for each problem recovery finds (LevelDB's corruption reporter). */
  onRecoveryProblem?: (message: string) => void;
  /** Debug trace of internal events (allocation, seals, cleaning, checkpoints). */
  trace?: (event: string) => void;
}

/** Most addresses one readMany call takes. */
export const MAX_READ_MANY = 65536;
/** Largest store read readMany makes for a run of adjacent records. */
const COALESCED_READ_BYTES_MAX = 1024 * 1024;

/** Largest batch: bounds memory and keeps one batch far smaller than the free-space reserve. */
export const MAX_BATCH_OPS = 65536;
export const MAX_BATCH_BYTES = 64 * 1024 * 1024;
/** A batch waits for room (seals, cleanings) at most this many times before NoSpaceError. */
const MAX_ADMISSION_WAITS = 256;
/** Default GrassOptions.maxLiveShare. */
export const DEFAULT_MAX_LIVE_SHARE = 0.9;
/** Background cleaning leaves segments fuller than this alone (foreground cleaning does not). */
const BACKGROUND_MAX_UTILIZATION = 0.95;
/** Segments kept per stream beyond the open one while seals are in flight. */
const MAX_SEALING_PER_STREAM = 4;
/** Dead segments (nothing live) gathered before one flush frees them without the cleaner. */
const DEAD_RECLAIM_BATCH = 4;
/**
 * Dead segments waiting for a checkpoint to cover them that make one come early, once at least
 * EARLY_CHECKPOINT_MIN_BYTES were logged since the last: a sequential rewrite then reuses the
 * slots it empties within a few hundred MiB instead of within the checkpoint interval.
 */
const DEAD_CHECKPOINT_SEGMENTS = 16;
const EARLY_CHECKPOINT_MIN_BYTES = 64 * 1024 * 1024;

class OpenSegment {
  buf: Uint8Array | undefined;
  view: DataView | undefined;
  /** Next append offset. */
  writeOff = SEGMENT_HEADER_BYTES;
  /** Bytes [0, flushedOff) have been written to the store. */
  flushedOff = 0;
  entries = new Uint8Array(64 * SUMMARY_ENTRY_BYTES);
  entriesView = viewOf(this.entries);
  entryCount = 0;
  nextSlot = NO_SLOT;
  nextSeq = 0;
  sealClock = 0;
  readonly seed: number;

  constructor(
    readonly stream: number,
    readonly slot: number,
    readonly seq: number,
    readonly openClock: number,
  ) {
    this.seed = segmentSeed(seq, slot);
  }

  addEntry(h: RecordHeader): void {
    const need = (this.entryCount + 1) * SUMMARY_ENTRY_BYTES;
    if (need > this.entries.length) {
      const grown = new Uint8Array(Math.max(need, this.entries.length * 2));
      grown.set(this.entries);
      this.entries = grown;
      this.entriesView = viewOf(grown);
    }
    encodeSummaryEntry(this.entriesView, this.entryCount * SUMMARY_ENTRY_BYTES, h);
    this.entryCount++;
  }
}

/** What a batch needs of the log (checkBatch). */
interface BatchNeed {
  ops: readonly BatchOp[];
  bytes: number;
  newPages: number;
  trimOnly: boolean;
}

interface Deferred {
  promise: Promise<void>;
  resolve: () => void;
  reject: (e: unknown) => void;
}

function deferred(): Deferred {
  let resolve!: () => void;
  let reject!: (e: unknown) => void;
  const promise = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  // Nobody may be waiting: do not let an unobserved rejection kill the process.
  promise.catch(() => undefined);
  return { promise, resolve, reject };
}

const NO_LOC = (): { slot: number; offset: number; length: number } => ({ slot: NO_SLOT, offset: 0, length: 0 });

/** Log bytes of a metadata record of `payload` bytes, with its summary entry. */
function checkpointRecordBytes(payload: number): number {
  return RECORD_HEADER_BYTES + payload + SUMMARY_ENTRY_BYTES;
}

export class GrassLog implements Grass {
  readonly maxRecordBytes = MAX_USER_RECORD_BYTES;
  readonly policy: CleanerPolicy;
  readonly segmentBytes: number;
  readonly segmentCount: number;
  /** Bytes of a segment available to records (and their summary entries). */
  readonly usableBytes: number;

  // --- In-memory state. ---------------------------------------------------------------
  private readonly map = new AddressMap();
  private readonly slotState: Uint8Array;
  private readonly slotStream: Uint8Array;
  private readonly slotFlags: Uint16Array;
  private readonly slotSeq: Float64Array;
  private readonly slotOpenClock: Float64Array;
  private readonly slotSealClock: Float64Array;
  private readonly dataLive: Float64Array;
  private readonly metaLive: Float64Array;
  /** snapshotGen when the segment stopped taking appends (victims must predate the durable checkpoint). */
  private readonly appendsEndedGen: Float64Array;
  /** Cleaned slots waiting to become free: 1 = after the next sync, 2 = after the next checkpoint. */
  private readonly pendingFree: Uint8Array;
  /** 1 while the slot is a victim of a cleaning round under way (reclaimDead leaves it alone). */
  private readonly victimNow: Uint8Array;
  /** Slots whose last live record died, with their seq then: candidates for reclaimDead. */
  private deadNoted: { slot: number; seq: number }[] = [];
  private reclaimRunning: Promise<void> | undefined;
  private freeSlots: number[] = [];
  private readonly streams: (OpenSegment | undefined)[] = new Array(MAX_STREAMS).fill(undefined);
  /** Segments whose buffer is still in memory (open, or sealing). */
  private readonly buffered = new Map<number, OpenSegment>();
  private readonly sealingPerStream = new Uint16Array(MAX_STREAMS);
  private bufferPool: Uint8Array[] = [];
  private directory = new Map<number, DirectoryEntry>();
  private currentCheckpointRefs: RecordRef[] = [];

  private generation = 0;
  private nextSeq = 1;
  private userClock = 0;
  private snapshotGen = 0;
  private durableSnapshotGen = 0;
  private logBytesSinceCheckpoint = 0;

  // --- I/O sequencing. ----------------------------------------------------------------
  private ioTail: Promise<void> = Promise.resolve();
  private failed: StoreFailedError | undefined;
  private closed = false;
  private pendingFlush: Deferred | undefined;
  private checkpointRunning: Promise<void> | undefined;
  private checkpointQueued: Promise<void> | undefined;
  private cleanerRunning: Promise<void> | undefined;
  private sealWaiters: (() => void)[] = [];
  /** Segments closed for appends whose seal has not completed, oldest first. */
  private readonly sealQueue: OpenSegment[] = [];

  // --- Tunables (derived in the constructor). ------------------------------------------
  private readonly cleanStartSlack: number;
  private readonly cleanTargetSlack: number;
  private readonly cleanerBatch: number;
  private readonly checkpointInterval: number;
  private readonly background: boolean;
  readonly readOnly: boolean;

  private readonly counters = {
    userRecords: 0, userBytes: 0, userPayloadBytes: 0, trims: 0, batches: 0,
    cleanerRecords: 0, cleanerBytes: 0, checkpointBytes: 0, checkpoints: 0,
    cleanerRounds: 0, segmentsCleaned: 0, deadSegmentsFreed: 0, cleanerReadBytes: 0, foregroundCleans: 0,
    flushes: 0, syncs: 0, reads: 0, readBytes: 0, corruptReads: 0, noSpaceErrors: 0, damagedSegments: 0,
  };
  recovery: RecoveryReport | undefined;

  private constructor(
    readonly store: SegmentStore,
    options: GrassOptions,
  ) {
    // A store's geometry is the user's choice: a clear error, not an assertion.
    if (!Number.isSafeInteger(store.segmentBytes) || store.segmentBytes < MIN_SEGMENT_BYTES || store.segmentBytes > MAX_SEGMENT_BYTES) {
      throw new InvalidArgumentError(`Grass needs segments of ${MIN_SEGMENT_BYTES} to ${MAX_SEGMENT_BYTES} bytes; ${store.describe()} has ${store.segmentBytes}`);
    }
    if (!Number.isSafeInteger(store.segmentCount) || store.segmentCount < MIN_SEGMENT_COUNT || store.segmentCount > MAX_SEGMENT_COUNT) {
      throw new InvalidArgumentError(`Grass needs ${MIN_SEGMENT_COUNT} to ${MAX_SEGMENT_COUNT} segments; ${store.describe()} has ${store.segmentCount}`);
    }
    this.policy = options.policy ?? costBenefit;
    assertSafeInt(this.policy.gcStreams, 1, MAX_GC_STREAMS, 'policy.gcStreams');
    this.segmentBytes = store.segmentBytes;
    this.segmentCount = store.segmentCount;
    this.usableBytes = this.segmentBytes - SEGMENT_HEADER_BYTES - FOOTER_BYTES;
    const n = this.segmentCount;
    this.slotState = new Uint8Array(n);
    this.slotStream = new Uint8Array(n);
    this.slotFlags = new Uint16Array(n);
    this.slotSeq = new Float64Array(n);
    this.slotOpenClock = new Float64Array(n);
    this.slotSealClock = new Float64Array(n);
    this.dataLive = new Float64Array(n);
    this.metaLive = new Float64Array(n);
    this.appendsEndedGen = new Float64Array(n);
    this.pendingFree = new Uint8Array(n);
    this.victimNow = new Uint8Array(n);
    const onePercent = Math.ceil(n / 100);
    this.cleanStartSlack = options.cleanStartSlackSegments ?? Math.max(4, onePercent);
    this.cleanTargetSlack = Math.max(1, options.cleanBatchFreeSegments ?? Math.max(4, onePercent));
    this.cleanerBatch = options.cleanerBatchSegments ?? 8;
    this.maxLiveShare = options.maxLiveShare ?? DEFAULT_MAX_LIVE_SHARE;
    if (!(this.maxLiveShare > 0 && this.maxLiveShare <= 1)) throw new InvalidArgumentError(`maxLiveShare must be in (0, 1], not ${options.maxLiveShare}`);
    const capacity = this.segmentBytes * n;
    this.checkpointInterval = options.checkpointIntervalBytes ?? Math.min(1 << 30, Math.max(64 << 20, Math.floor(capacity / 8)));
    this.background = options.backgroundCleaner ?? true;
    this.readOnly = options.readOnly ?? false;
    this.trace = options.trace;
  }

  private readonly trace: ((event: string) => void) | undefined;
  private readonly maxLiveShare: number;

  // =====================================================================================
  // Opening and creating
  // =====================================================================================

  /** Format an empty store and open it. */
  static async create(store: SegmentStore, options: GrassOptions = {}): Promise<GrassLog> {
    const [a, b] = [await store.readSuperblock(0), await store.readSuperblock(1)];
    if (typeof decodeSuperblock(a) !== 'string' || typeof decodeSuperblock(b) !== 'string') {
      throw new InvalidArgumentError(`${store.describe()} already holds a Grass store`);
    }
    const g = new GrassLog(store, { ...options, readOnly: false });
    for (let s = g.segmentCount - 1; s >= 0; s--) g.freeSlots.push(s);
    g.ensureStreams();
    await g.checkpoint();
    g.recovery = { checkpointGeneration: g.generation, streams: [], problems: [], replayedRecords: 0, droppedRecords: 0, droppedBytes: 0, abandonedCheckpointSegments: 0, freedAtOpen: 0, millis: 0 };
    return g;
  }

  /** Open a formatted store: load the newest checkpoint, roll forward, and (unless readOnly) checkpoint. */
  static async open(store: SegmentStore, options: GrassOptions = {}): Promise<GrassLog> {
    const g = new GrassLog(store, options);
    await g.recover(options.onRecoveryProblem);
    return g;
  }

  /**
   * Free segments user writes may not take. They guarantee that the cleaner can always run
   * (one spill segment per cleaner stream), that a checkpoint always fits (every map page, the
   * slot table and the directory), and that a reopen after a crash can start a fresh segment
   * for every stream while the old tails stay sealed in place.
   */
  private reserveSegments(newPages = 0): number {
    return this.spaceFor(Math.max(1, (this.map?.pageCount ?? 1) + newPages)).reserve;
  }

  /**
   * The reserve and the data segments (see liveLimit) for a map of `pages` pages: they depend
   * on nothing else that changes, and admission asks for them on every batch, so the last
   * answer is kept.
   */
  private spaceFor(pages: number): { pages: number; reserve: number; data: number } {
    const last = this.spaceCache;
    if (last !== undefined && last.pages === pages) return last;
    const checkpoint = this.checkpointSegments(pages, pages);
    const gcStreams = this.policy?.gcStreams ?? 1;
    const streams = STREAM_GC_FIRST + gcStreams;
    const reserve = streams + gcStreams + 2 * (checkpoint + 1) + 1;
    const working = streams + 4 + checkpoint;
    const room = { pages, reserve, data: Math.max(0, this.segmentCount - reserve - working) };
    if (this.policy !== undefined) this.spaceCache = room; // (not while the constructor runs)
    return room;
  }

  private spaceCache: { pages: number; reserve: number; data: number } | undefined;

  /**
   * A checkpoint's bytes in the log at most, with `dirtyPages` map pages to write and a
   * directory of `directoryPages` entries: the pages, the body (slot table and directory) in
   * chunks, and the root.
   */
  private checkpointSegments(dirtyPages: number, directoryPages: number): number {
    const record = checkpointRecordBytes;
    const pageBytes = MAP_PAGE_ENTRIES * MAP_ENTRY_BYTES;
    const body = 4096 + this.segmentCount * 28 + directoryPages * 28;
    const chunks = Math.ceil(body / CHECKPOINT_CHUNK_BYTES);
    const root = 4096 + chunks * 24;
    const bytes = dirtyPages * record(pageBytes) + body + chunks * record(0) + record(root);
    // A segment may end with up to one record's worth of room unused, where the next did not fit.
    const largest = record(Math.max(dirtyPages > 0 ? pageBytes : 0, Math.min(body, CHECKPOINT_CHUNK_BYTES), root));
    return Math.ceil(bytes / (this.usableBytes - largest));
  }

  /** Background cleaning starts at this many free segments (the reserve grows with the map). */
  private get cleanStart(): number {
    return this.reserveSegments() + this.cleanStartSlack;
  }

  private get cleanTarget(): number {
    return this.cleanStart + this.cleanTargetSlack;
  }

  private allocSlot(): number {
    const s = this.freeSlots.pop();
    if (s === undefined) throw new NoSpaceError(`no free segment in ${this.store.describe()}`);
    assert(this.slotState[s] === SLOT_FREE && this.pendingFree[s] === 0, `slot ${s} allocated while not free`);
    return s;
  }

  private openSegment(stream: number): OpenSegment {
    const slot = this.allocSlot();
    const seg = new OpenSegment(stream, slot, this.nextSeq++, this.userClock);
    this.slotState[slot] = SLOT_OPEN;
    this.slotStream[slot] = stream;
    this.slotFlags[slot] = 0;
    this.slotSeq[slot] = seg.seq;
    this.slotOpenClock[slot] = this.userClock;
    this.slotSealClock[slot] = 0;
    this.dataLive[slot] = 0;
    this.metaLive[slot] = 0;
    this.appendsEndedGen[slot] = Infinity;
    this.streams[stream] = seg;
    this.trace?.(`open stream ${stream} slot ${slot} seq ${seg.seq}`);
    return seg;
  }

  /** Every stream in use has an open segment, so that recovery can find what it writes. */
  private ensureStreams(): void {
    const last = STREAM_GC_FIRST + this.policy.gcStreams;
    for (let s = 0; s < last; s++) if (this.streams[s] === undefined) this.openSegment(s);
  }

  // =====================================================================================
  // The Grass interface
  // =====================================================================================

  async read(gaddr: number): Promise<Uint8Array | undefined> {
    this.checkOpen();
    checkAddress(gaddr);
    for (let attempt = 0; ; attempt++) {
      const loc = this.map.get(gaddr);
      if (loc === undefined) return undefined;
      this.counters.reads++;
      this.counters.readBytes += loc.length;
      const seq = this.slotSeq[loc.slot]!;
      const buffered = this.buffered.get(loc.slot);
      let bytes: Uint8Array;
      let at: number;
      if (buffered !== undefined && buffered.buf !== undefined) {
        bytes = buffered.buf;
        at = loc.offset;
      } else {
        bytes = await this.store.read(loc.slot, loc.offset, RECORD_HEADER_BYTES + loc.length);
        at = 0;
      }
      const seed = buffered !== undefined && buffered.seq === seq ? buffered.seed : segmentSeed(seq, loc.slot);
      const problem = this.checkRecord(bytes, at, gaddr, loc.length, seed);
      if (problem === undefined) {
        // A store's read is a fresh array (SegmentStore.read): its payload is returned as it
        // is. The write buffer is not, so that is copied out.
        if (at === 0) return new Uint8Array(bytes.buffer, bytes.byteOffset + RECORD_HEADER_BYTES, loc.length);
        const out = new Uint8Array(loc.length);
        out.set(bytes.subarray(at + RECORD_HEADER_BYTES, at + RECORD_HEADER_BYTES + loc.length));
        return out;
      }
      // The segment may have been cleaned and reused while we read: look again.
      const now = this.map.get(gaddr);
      const moved = now === undefined || now.slot !== loc.slot || now.offset !== loc.offset || this.slotSeq[loc.slot] !== seq;
      if (moved && attempt < 8) continue;
      this.counters.corruptReads++;
      throw new CorruptionError({ segment: loc.slot, offset: loc.offset }, `record for address ${gaddr}: ${problem}`);
    }
  }

  async readMany(gaddrs: readonly number[]): Promise<(Uint8Array | undefined)[]> {
    this.checkOpen();
    if (gaddrs.length > MAX_READ_MANY) throw new InvalidArgumentError(`readMany of ${gaddrs.length} addresses exceeds the limit of ${MAX_READ_MANY}`);
    for (const g of gaddrs) checkAddress(g);
    const out = new Array<Uint8Array | undefined>(gaddrs.length);
    // Records in sealed or flushed segments, by position; the rest go through read().
    const placed: { i: number; slot: number; offset: number; length: number }[] = [];
    const single: Promise<void>[] = [];
    for (let i = 0; i < gaddrs.length; i++) {
      const loc = this.map.get(gaddrs[i]!);
      if (loc === undefined) continue;
      if (this.buffered.get(loc.slot)?.buf !== undefined) single.push(this.read(gaddrs[i]!).then((r) => void (out[i] = r)));
      else placed.push({ i, slot: loc.slot, offset: loc.offset, length: loc.length });
    }
    placed.sort((a, b) => a.slot - b.slot || a.offset - b.offset);
    const runs: Promise<void>[] = [];
    for (let k = 0; k < placed.length; ) {
      let end = k + 1;
      let reach = placed[k]!.offset + RECORD_HEADER_BYTES + placed[k]!.length;
      while (end < placed.length) {
        const next = placed[end]!;
        if (next.slot !== placed[k]!.slot || next.offset !== reach || reach + RECORD_HEADER_BYTES + next.length - placed[k]!.offset > COALESCED_READ_BYTES_MAX) break;
        reach += RECORD_HEADER_BYTES + next.length;
        end++;
      }
      runs.push(this.readRun(gaddrs, placed.slice(k, end), reach, out));
      k = end;
    }
    await Promise.all([...single, ...runs]);
    return out;
  }

  /** One store read for records adjacent in a segment (readMany); a record that fails its checks is read again alone. */
  private async readRun(gaddrs: readonly number[], run: readonly { i: number; slot: number; offset: number; length: number }[], reach: number, out: (Uint8Array | undefined)[]): Promise<void> {
    const first = run[0]!;
    if (run.length === 1) {
      out[first.i] = await this.read(gaddrs[first.i]!);
      return;
    }
    const seq = this.slotSeq[first.slot]!;
    const bytes = await this.store.read(first.slot, first.offset, reach - first.offset);
    const seed = segmentSeed(seq, first.slot);
    const again: Promise<void>[] = [];
    for (const r of run) {
      const gaddr = gaddrs[r.i]!;
      const at = r.offset - first.offset;
      // A failed check may be a record that moved while we read (cleaned, slot reused): read()
      // looks again, and reports corruption if it is that.
      if (this.slotSeq[first.slot] !== seq || this.checkRecord(bytes, at, gaddr, r.length, seed) !== undefined) {
        again.push(this.read(gaddr).then((rec) => void (out[r.i] = rec)));
        continue;
      }
      this.counters.reads++;
      this.counters.readBytes += r.length;
      out[r.i] = new Uint8Array(bytes.buffer, bytes.byteOffset + at + RECORD_HEADER_BYTES, r.length);
    }
    await Promise.all(again);
  }

  private checkRecord(bytes: Uint8Array, at: number, gaddr: number, length: number, seed: number): string | undefined {
    const view = viewOf(bytes);
    const h = peekRecordHeader(view, at, bytes.length);
    if (h === undefined) return 'malformed record header';
    if (h.key !== gaddr) return `record belongs to address ${h.key} (misdirected)`;
    if (h.kind !== RecordKind.Put && h.kind !== RecordKind.Relocate) return `record kind ${h.kind} is not data`;
    if (h.length !== length) return `record length ${h.length}, map says ${length}`;
    if (!recordChecksumOk(bytes, view, at, length, seed)) return 'checksum mismatch';
    return undefined;
  }

  size(gaddr: number): number | undefined {
    this.checkOpen();
    checkAddress(gaddr);
    return this.map.get(gaddr)?.length;
  }

  put(gaddr: number, data: Uint8Array): Promise<void> {
    return this.batch([{ op: 'put', gaddr, data }]);
  }

  trim(gaddr: number): Promise<void> {
    return this.batch([{ op: 'trim', gaddr }]);
  }

  tryBatch(ops: readonly BatchOp[]): boolean {
    const bytes = this.checkBatch(ops);
    if (ops.length === 0) return true;
    if (!this.roomNow(bytes)) return false;
    this.applyChecked(ops);
    return true;
  }

  async roomFor(ops: readonly BatchOp[]): Promise<void> {
    await this.admit(this.checkBatch(ops));
  }

  async batch(ops: readonly BatchOp[]): Promise<void> {
    const need = this.checkBatch(ops);
    if (ops.length === 0) return;
    if (this.roomNow(need)) {
      this.applyChecked(ops); // admit() would not wait
      return;
    }
    // The ops are checked now and applied after the wait: a caller that changed them
    // meanwhile would bypass the checks, so the wait is on a copy.
    const frozen = ops.map((op) => (op.op === 'put' ? { op: 'put' as const, gaddr: op.gaddr, data: op.data.slice() } : { ...op }));
    let n: BatchNeed = { ...need, ops: frozen };
    for (;;) {
      await this.admit(n);
      // admit() saw room, but every batch woken with this one (a seal wakes them all) saw
      // the same room: the check that counts is the one in the same synchronous step as the
      // apply. Its needs are recounted too: the map pages it creates may have changed.
      n = { ...this.checkBatch(frozen), ops: frozen };
      if (this.roomNow(n)) break;
    }
    this.applyChecked(frozen);
  }

  /**
   * Check a batch's arguments and limits (InvalidArgumentError). Its needs: its bytes in the
   * log, the map pages it creates (each makes every checkpoint larger, so the reserve grows),
   * and whether it only trims.
   */
  private checkBatch(ops: readonly BatchOp[]): BatchNeed {
    this.checkWritable();
    if (ops.length > MAX_BATCH_OPS) throw new InvalidArgumentError(`batch of ${ops.length} ops exceeds the limit of ${MAX_BATCH_OPS}`);
    let bytes = 0;
    let trimOnly = true;
    let newPages: Set<number> | undefined;
    let lastPage = -1; // runs of adjacent addresses share a page: one lookup per run
    for (const op of ops) {
      checkAddress(op.gaddr);
      if (op.op === 'put') {
        if (!(op.data instanceof Uint8Array)) throw new InvalidArgumentError('put data must be a Uint8Array');
        if (op.data.length > MAX_USER_RECORD_BYTES) throw new InvalidArgumentError(`record of ${op.data.length} bytes exceeds the limit of ${MAX_USER_RECORD_BYTES}`);
        bytes += RECORD_HEADER_BYTES + op.data.length + SUMMARY_ENTRY_BYTES;
        trimOnly = false;
        const pn = Math.floor(op.gaddr / MAP_PAGE_ENTRIES);
        if (pn !== lastPage && this.map.page(pn) === undefined) (newPages ??= new Set()).add(pn);
        lastPage = pn;
      } else if (op.op === 'trim') {
        bytes += RECORD_HEADER_BYTES + SUMMARY_ENTRY_BYTES;
      } else {
        throw new InvalidArgumentError(`unknown batch op ${(op as { op: unknown }).op}`);
      }
    }
    if (bytes > MAX_BATCH_BYTES) throw new InvalidArgumentError(`batch of ${bytes} bytes exceeds the limit of ${MAX_BATCH_BYTES}`);
    return { ops, bytes, newPages: newPages?.size ?? 0, trimOnly };
  }

  /** Apply a checked batch for which there is room. */
  private applyChecked(ops: readonly BatchOp[]): void {
    try {
      this.applyBatch(ops);
    } catch (e) {
      // admit() guaranteed the room, so this is a bug; the half-applied batch has no
      // batch-end record, so a reopen recovers the state before it.
      this.fail(e);
      throw this.failed;
    }
  }

  /** Wait until a batch can be appended to the user stream without eating the reserve. */
  private async admit(need: BatchNeed): Promise<void> {
    const { bytes } = need;
    // Cleanings in a row that freed nothing: the third ends the wait. Waits for seals do not
    // count, nor cleanings whose segments batches woken beside this one took (under
    // contention they take each other's room, and each cleaning still made progress).
    let fruitless = 0;
    for (let waits = 0; ; waits++) {
      this.checkWritable();
      if (this.roomNow(need)) return;
      if (!this.liveRoomFor(need)) {
        // Cleaning cannot help: the records are live.
        this.counters.noSpaceErrors++;
        throw new NoSpaceError(
          `store is full: live records take ${this.liveBytes()} bytes, and a batch may not take them past ${Math.floor(this.liveLimit(need.newPages))} ` +
            `(${this.maxLiveShare} of the ${this.dataSegments(need.newPages)} of ${this.segmentCount} segments outside the reserve and the cleaner's working room). Trim data to free space.`,
        );
      }
      const newSegments = this.newSegmentsFor(bytes);
      const sealBacklog = this.sealingPerStream[STREAM_USER]! >= MAX_SEALING_PER_STREAM;
      if (sealBacklog) {
        await new Promise<void>((resolve) => this.sealWaiters.push(resolve));
        continue;
      }
      if (fruitless >= 3 || waits >= MAX_ADMISSION_WAITS) {
        this.counters.noSpaceErrors++;
        throw new NoSpaceError(
          `store is full: ${this.freeSlots.length} free segments, ${this.reserveSegments()} reserved for the cleaner and checkpoints; ` +
            `${this.liveDataBytes()} of ${this.segmentBytes * this.segmentCount} bytes hold live records. Trim data to free space.`,
        );
      }
      this.counters.foregroundCleans++;
      const cleanedBefore = this.counters.segmentsCleaned;
      await this.cleanUntil(this.reserveSegments(need.newPages) + newSegments + 1, true);
      fruitless = this.counters.segmentsCleaned > cleanedBefore ? 0 : fruitless + 1;
    }
  }

  /**
   * Whether a batch fits in the user stream now without eating the reserve, counting the
   * reserve's growth for the map pages it creates. A batch that only trims may use the
   * reserve's last segment: it frees space, and a full store must still take it.
   */
  private roomNow(need: BatchNeed): boolean {
    if (!this.liveRoomFor(need)) return false;
    const newSegments = this.newSegmentsFor(need.bytes);
    const base = this.reserveSegments();
    const grown = need.newPages === 0 ? base : this.reserveSegments(need.newPages);
    // A batch that fits in the open segment and leaves the reserve as it was takes nothing from it.
    if (newSegments === 0 && grown === base) return true;
    const reserve = grown - (need.trimOnly ? 1 : 0);
    return this.freeSlots.length - newSegments >= reserve && this.sealingPerStream[STREAM_USER]! < MAX_SEALING_PER_STREAM;
  }

  /**
   * Bytes the live records take in the log: user records with their summary entries, and the
   * current checkpoint's map pages.
   */
  private liveBytes(): number {
    const pageRecord = RECORD_HEADER_BYTES + MAP_PAGE_ENTRIES * MAP_ENTRY_BYTES + SUMMARY_ENTRY_BYTES;
    return this.map.size * (RECORD_HEADER_BYTES + SUMMARY_ENTRY_BYTES) + this.map.payloadBytes + this.directory.size * pageRecord;
  }

  /**
   * The most log bytes live records may take: maxLiveShare of the segments outside the
   * reserve and the working room. The working room is what a full store needs besides its
   * garbage to go on taking overwrites: every stream's open segment, and the segments a
   * batch's admission asks the cleaner to free beyond the reserve. Without it, a share of a
   * small store's few segments left too little for the cleaner to reach that target.
   */
  private liveLimit(newPages: number): number {
    return this.dataSegments(newPages) * this.usableBytes * this.maxLiveShare;
  }

  /** Segments outside the reserve and the working room (see liveLimit). */
  private dataSegments(newPages: number): number {
    return this.spaceFor(Math.max(1, this.map.pageCount + newPages)).data;
  }

  /**
   * Whether a batch keeps the live records within GrassOptions.maxLiveShare. A batch that
   * adds no bytes (it overwrites with records no larger, or trims) always may: a full store
   * must still take the writes that free its space.
   */
  private liveRoomFor(need: BatchNeed): boolean {
    const live = this.liveBytes();
    const limit = this.liveLimit(need.newPages);
    if (need.trimOnly || live + need.bytes <= limit) return true;
    // Near the limit: what the batch leaves live against what it replaces, per address (the
    // last op on an address decides what it holds after the batch).
    const after = new Map<number, number>();
    for (const op of need.ops) after.set(op.gaddr, op.op === 'put' ? RECORD_HEADER_BYTES + op.data.length + SUMMARY_ENTRY_BYTES : 0);
    let growth = 0;
    for (const [gaddr, bytes] of after) {
      const old = this.map.get(gaddr);
      growth += bytes - (old === undefined ? 0 : RECORD_HEADER_BYTES + old.length + SUMMARY_ENTRY_BYTES);
    }
    return growth <= 0 || live + growth <= limit;
  }

  /**
   * Segments the user stream must open to take a batch of `bytes`: a segment may end with up
   * to one record's worth of room unused, where the next record did not fit.
   */
  private newSegmentsFor(bytes: number): number {
    const user = this.streams[STREAM_USER]!;
    const room = this.segmentBytes - FOOTER_BYTES - user.writeOff - user.entryCount * SUMMARY_ENTRY_BYTES;
    if (room >= bytes) return 0;
    const perSegment = this.usableBytes - (RECORD_HEADER_BYTES + MAX_USER_RECORD_BYTES + SUMMARY_ENTRY_BYTES);
    return Math.ceil((bytes - Math.max(0, room - (RECORD_HEADER_BYTES + MAX_USER_RECORD_BYTES + SUMMARY_ENTRY_BYTES))) / perSegment) + 1;
  }

  private applyBatch(ops: readonly BatchOp[]): void {
    // A trim of an address that is unmapped at that point of the batch changes nothing and is
    // not written. The batch-end flag goes on the last record actually written.
    const write = new Array<boolean>(ops.length);
    // gaddr -> mapped after the ops so far; a one-op batch (the common case) needs none.
    const touched = ops.length > 1 ? new Map<number, boolean>() : undefined;
    let last = -1;
    for (let i = 0; i < ops.length; i++) {
      const op = ops[i]!;
      if (op.op === 'put') {
        write[i] = true;
        touched?.set(op.gaddr, true);
      } else {
        write[i] = touched?.get(op.gaddr) ?? this.map.slotOf(op.gaddr) !== NO_SLOT;
        touched?.set(op.gaddr, false);
      }
      if (write[i]) last = i;
    }
    const prev = NO_LOC();
    const empty = new Uint8Array(0);
    for (let i = 0; i <= last; i++) {
      if (!write[i]) continue;
      const op = ops[i]!;
      const flags = i === last ? FLAG_BATCH_END : 0;
      if (op.op === 'put') {
        const loc = this.append(STREAM_USER, RecordKind.Put, flags, op.gaddr, 0, op.data);
        const recordBytes = RECORD_HEADER_BYTES + op.data.length;
        if (this.map.set(op.gaddr, loc.slot, loc.offset, op.data.length, prev)) this.killRecord(prev.slot, RECORD_HEADER_BYTES + prev.length);
        this.map.noteUserWrite(op.gaddr, this.userClock);
        this.dataLive[loc.slot]! += recordBytes;
        this.counters.userRecords++;
        this.counters.userBytes += recordBytes;
        this.counters.userPayloadBytes += op.data.length;
        this.userClock += recordBytes;
      } else {
        this.append(STREAM_USER, RecordKind.Trim, flags, op.gaddr, 0, empty);
        if (this.map.delete(op.gaddr, prev)) this.killRecord(prev.slot, RECORD_HEADER_BYTES + prev.length);
        this.counters.trims++;
        this.counters.userBytes += RECORD_HEADER_BYTES;
        this.userClock += RECORD_HEADER_BYTES;
      }
    }
    if (last >= 0) this.counters.batches++;
    this.afterAppend();
  }

  /**
   * A user record of `bytes` in `slot` was superseded; note the slot if nothing in it is live
   * now and it takes no more appends. A segment still open is noted when it rolls over, if it
   * is dead then: its live bytes may touch 0 and rise again many times before that (an
   * address overwritten in place, whose old record dies before the new one counts).
   */
  private killRecord(slot: number, bytes: number): void {
    const left = (this.dataLive[slot]! -= bytes);
    if (left === 0 && this.metaLive[slot] === 0 && this.appendsEndedGen[slot] !== Infinity) this.noteDead(slot);
  }

  private noteDead(slot: number): void {
    if (this.readOnly) return;
    // One entry per life of a slot at most, and each scan drops the stale ones.
    assert(this.deadNoted.length <= this.segmentCount, `dead-segment list holds ${this.deadNoted.length} entries for ${this.segmentCount} slots`);
    this.deadNoted.push({ slot, seq: this.slotSeq[slot]! });
    if (this.deadNoted.length >= DEAD_RECLAIM_BATCH) this.maybeReclaimDead();
  }

  /**
   * Free dead segments (nothing live in them) without the cleaner, so that a workload that
   * overwrites whole regions, a sequential rewrite say, reuses the slots it empties instead of
   * taking new ones. A slot just emptied is far cheaper to write again than a hole in the
   * segment file, whose pages are new to the page cache (dd on this project's VM: 7.4 GB/s
   * against 0.44 GB/s), and the store's footprint stays as large as the data needs. The rules
   * are the cleaner's for a victim with nothing live: the segment is sealed and covered by the
   * durable checkpoint (recovery never replays it), and it is freed only after a flush made
   * durable every record appended before it was picked, the records that superseded its own
   * among them. Single-flight; it runs once DEAD_RECLAIM_BATCH slots are ready, so each flush
   * frees several.
   */
  private maybeReclaimDead(): void {
    if (this.reclaimRunning !== undefined || this.failed !== undefined || this.closed) return;
    const ready: { slot: number; seq: number }[] = [];
    const later: { slot: number; seq: number }[] = [];
    let uncovered = 0;
    for (const d of this.deadNoted) {
      const s = d.slot;
      // Gone: reused, freed or picked by the cleaner (a noted slot takes no more appends).
      if (this.slotSeq[s] !== d.seq || this.pendingFree[s] !== 0 || this.dataLive[s] !== 0 || this.metaLive[s] !== 0) continue;
      if (this.slotState[s] === SLOT_FREE) continue;
      if (this.slotState[s] === SLOT_SEALED && this.appendsEndedGen[s]! < this.durableSnapshotGen && this.victimNow[s] === 0 && (this.slotFlags[s]! & SLOT_FLAG_DAMAGED) === 0) ready.push(d);
      else {
        later.push(d);
        if (this.slotState[s] === SLOT_SEALED && this.appendsEndedGen[s]! >= this.durableSnapshotGen) uncovered++;
      }
    }
    if (uncovered >= DEAD_CHECKPOINT_SEGMENTS && this.logBytesSinceCheckpoint >= Math.min(EARLY_CHECKPOINT_MIN_BYTES, this.checkpointInterval) && this.checkpointQueued === undefined && this.checkpointRunning === undefined) {
      this.checkpoint().catch(() => undefined);
    }
    // Bounded: a slot is noted once per death, and the list keeps only live candidates.
    this.deadNoted = later;
    if (ready.length < DEAD_RECLAIM_BATCH) {
      this.deadNoted.push(...ready);
      return;
    }
    for (const d of ready) this.pendingFree[d.slot] = 1;
    const run = this.flush().then(
      () => {
        let freed = 0;
        for (const d of ready) {
          if (this.pendingFree[d.slot] !== 1 || this.slotSeq[d.slot] !== d.seq) continue; // a checkpoint freed it first
          this.releaseSlot(d.slot);
          freed++;
        }
        this.counters.deadSegmentsFreed += freed;
        this.trace?.(`freed ${freed} dead slots without cleaning`);
      },
      () => undefined, // the store failed; the next open recovers, and frees them then
    );
    this.reclaimRunning = run.finally(() => {
      this.reclaimRunning = undefined;
      if (this.deadNoted.length >= DEAD_RECLAIM_BATCH) this.maybeReclaimDead();
    });
  }

  private afterAppend(): void {
    if (this.logBytesSinceCheckpoint >= this.checkpointInterval && this.checkpointQueued === undefined && this.checkpointRunning === undefined) {
      this.checkpoint().catch(() => undefined);
    }
    if (this.background && this.freeSlots.length <= this.cleanStart && this.cleanerRunning === undefined) {
      this.cleanUntil(this.cleanTarget, false).catch(() => undefined);
    }
  }

  flush(): Promise<void> {
    try {
      this.checkWritable();
    } catch (e) {
      return Promise.reject(e);
    }
    if (this.pendingFlush !== undefined) return this.pendingFlush.promise;
    const d = deferred();
    this.pendingFlush = d;
    this.enqueue(async () => {
      if (this.pendingFlush === d) this.pendingFlush = undefined;
      await this.syncAll();
    }).then(d.resolve, d.reject);
    this.counters.flushes++;
    return d.promise;
  }

  /**
   * Make every record appended so far durable. Runs inside the I/O queue: first the seals of
   * segments already rolled over (in order: a stream's next segment is reachable only through
   * its predecessor's footer), then, captured in the same synchronous step as the check that
   * none of those is left, the unwritten tails of the open segments, then one sync. Segments
   * rolled over meanwhile may stay queued: they hold only records appended later.
   */
  private async syncAll(): Promise<void> {
    // Only the segments rolled over or open now hold records appended before this sync was
    // asked for; sealing on while writers roll over new ones would keep a flush waiting for as
    // long as the writes go on. The queue is sealed in order (each segment is reachable only
    // through its predecessor's footer) until none of those is left in it.
    const due = new Set<OpenSegment>(this.sealQueue);
    for (const seg of this.streams) if (seg !== undefined) due.add(seg);
    // The loop is inline, not a call to drainSealsThrough(): an `await` of even an empty async
    // call yields, and a rollover in that gap would escape both the seals and the capture below.
    while (this.sealQueue.length > 0 && this.sealQueue.some((seg) => due.has(seg))) {
      await this.sealSegment(this.sealQueue[0]!);
      this.sealQueue.shift();
    }
    const work: { seg: OpenSegment; from: number; to: number }[] = [];
    for (const seg of this.streams) {
      if (seg === undefined || seg.buf === undefined || seg.flushedOff >= seg.writeOff) continue;
      work.push({ seg, from: seg.flushedOff, to: seg.writeOff });
    }
    for (const w of work) {
      this.trace?.(`write slot ${w.seg.slot} [${w.from}, ${w.to})`);
      await this.store.write(w.seg.slot, w.from, w.seg.buf!.subarray(w.from, w.to));
      w.seg.flushedOff = Math.max(w.seg.flushedOff, w.to);
    }
    await this.store.sync();
    this.counters.syncs++;
  }

  /**
   * Seal the queue, oldest first, up to and including `seg`; nothing if it is sealed already.
   * Runs inside the I/O queue only. Each rollover queues one of these for its own segment: a
   * drain that sealed whatever it found kept finding more while writers rolled over, and held
   * up every job queued behind it, flushes included (a flush waited 7.4 s, as long as a
   * 1 MiB sequential write stream went on).
   */
  private async drainSealsThrough(seg: OpenSegment): Promise<void> {
    while (this.sealQueue.includes(seg)) {
      await this.sealSegment(this.sealQueue[0]!);
      this.sealQueue.shift();
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    if (!this.readOnly && this.failed === undefined) {
      try {
        await this.cleanerRunning;
        await this.reclaimRunning;
        await this.checkpoint();
      } catch {
        // The store failed while closing: nothing more to make durable.
      }
    }
    this.closed = true;
    await this.ioTail;
    await this.store.close();
  }

  // =====================================================================================
  // Appending to streams
  // =====================================================================================

  private append(stream: number, kind: RecordKind, flags: number, key: number, aux: number, payload: Uint8Array): { slot: number; offset: number } {
    let seg = this.streams[stream];
    assert(seg !== undefined, `stream ${stream} has no open segment`);
    const recordBytes = RECORD_HEADER_BYTES + payload.length;
    if (seg.writeOff + recordBytes + (seg.entryCount + 1) * SUMMARY_ENTRY_BYTES + FOOTER_BYTES > this.segmentBytes) {
      seg = this.rollover(seg);
    }
    if (seg.buf === undefined) this.materialize(seg);
    const offset = seg.writeOff;
    const h: RecordHeader = { length: payload.length, kind, flags, key, aux };
    encodeRecord(seg.buf!, seg.view!, offset, seg.seed, h, payload);
    seg.addEntry(h);
    seg.writeOff += recordBytes;
    this.logBytesSinceCheckpoint += recordBytes;
    return { slot: seg.slot, offset };
  }

  private materialize(seg: OpenSegment): void {
    const buf = this.bufferPool.pop() ?? new Uint8Array(this.segmentBytes);
    seg.buf = buf;
    seg.view = viewOf(buf);
    encodeSegmentHeader(buf, { stream: seg.stream, seq: seg.seq, slot: seg.slot, openClock: seg.openClock });
    this.buffered.set(seg.slot, seg);
  }

  /** Close `old` for appends, open the stream's next segment, and queue the seal of `old`. */
  private rollover(old: OpenSegment): OpenSegment {
    assert(old.entryCount > 0, 'rollover of an empty segment');
    const next = this.openSegment(old.stream);
    old.nextSlot = next.slot;
    old.nextSeq = next.seq;
    old.sealClock = this.userClock;
    this.appendsEndedGen[old.slot] = this.snapshotGen;
    this.sealingPerStream[old.stream]!++;
    this.sealQueue.push(old);
    this.enqueue(() => this.drainSealsThrough(old)).catch(() => undefined);
    if (old.stream === STREAM_USER && this.dataLive[old.slot] === 0 && this.metaLive[old.slot] === 0) this.noteDead(old.slot);
    return next;
  }

  /** Runs inside the I/O queue: write the rest of the data, sync, then summary and footer, then seal. */
  private async sealSegment(seg: OpenSegment): Promise<void> {
    const buf = seg.buf!;
    if (seg.flushedOff < seg.writeOff) {
      this.trace?.(`seal-write slot ${seg.slot} [${seg.flushedOff}, ${seg.writeOff})`);
      await this.store.write(seg.slot, seg.flushedOff, buf.subarray(seg.flushedOff, seg.writeOff));
      seg.flushedOff = seg.writeOff;
    }
    // The data must be durable before a footer claims it (recovery trusts sealed summaries).
    await this.store.sync();
    this.counters.syncs++;
    const start = summaryOffset(this.segmentBytes, seg.entryCount);
    assert(start >= seg.writeOff, 'summary overlaps records');
    buf.set(seg.entries.subarray(0, seg.entryCount * SUMMARY_ENTRY_BYTES), start);
    encodeFooter(buf, {
      seq: seg.seq, slot: seg.slot, entries: seg.entryCount, dataEnd: seg.writeOff, nextSlot: seg.nextSlot, nextSeq: seg.nextSeq,
      sealClock: seg.sealClock, summaryCrc: crc32c(buf.subarray(start, this.segmentBytes - FOOTER_BYTES), seg.seed),
    });
    await this.store.write(seg.slot, start, buf.subarray(start));
    await this.store.seal(seg.slot);
    this.slotState[seg.slot] = SLOT_SEALED;
    this.slotSealClock[seg.slot] = seg.sealClock;
    this.trace?.(`sealed slot ${seg.slot} seq ${seg.seq} entries ${seg.entryCount} next ${seg.nextSlot}/${seg.nextSeq}`);
    this.buffered.delete(seg.slot);
    // Keep a couple of buffers for reuse; more would only hold memory after a burst of seals.
    if (this.bufferPool.length < 2 && buf.length === this.segmentBytes) this.bufferPool.push(buf);
    seg.buf = undefined;
    seg.view = undefined;
    this.sealingPerStream[seg.stream]!--;
    const waiters = this.sealWaiters;
    this.sealWaiters = [];
    for (const w of waiters) w();
  }

  // =====================================================================================
  // I/O queue and failure
  // =====================================================================================

  private enqueue<T>(task: () => Promise<T>): Promise<T> {
    const run = this.ioTail.then(() => {
      if (this.failed !== undefined) throw this.failed;
      return task();
    });
    this.ioTail = run.then(
      () => undefined,
      (e: unknown) => this.fail(e),
    );
    return run;
  }

  private fail(e: unknown): void {
    if (this.failed === undefined) this.failed = e instanceof StoreFailedError ? e : new StoreFailedError(e);
    const waiters = this.sealWaiters;
    this.sealWaiters = [];
    for (const w of waiters) w();
  }

  private checkOpen(): void {
    if (this.closed) throw new ClosedError('Grass store is closed');
  }

  private checkWritable(): void {
    this.checkOpen();
    if (this.readOnly) throw new InvalidArgumentError('Grass store is open read-only');
    if (this.failed !== undefined) throw this.failed;
  }

  /** The error that stopped this instance, if any. */
  get failure(): StoreFailedError | undefined {
    return this.failed;
  }

  // =====================================================================================
  // Checkpoints
  // =====================================================================================

  /** Write a checkpoint and make it the current one. Concurrent callers share one. */
  checkpoint(): Promise<void> {
    try {
      this.checkWritable();
    } catch (e) {
      return Promise.reject(e);
    }
    if (this.checkpointQueued !== undefined) return this.checkpointQueued;
    const after = this.checkpointRunning ?? Promise.resolve();
    const p = after.catch(() => undefined).then(async () => {
      this.checkpointQueued = undefined;
      const run = this.writeCheckpoint();
      this.checkpointRunning = run;
      try {
        await run;
      } finally {
        if (this.checkpointRunning === run) this.checkpointRunning = undefined;
      }
    });
    p.catch(() => undefined);
    this.checkpointQueued = p;
    return p;
  }

  private async writeCheckpoint(): Promise<void> {
    this.checkWritable();
    // Room first, before anything changes: a checkpoint that stopped half way through its
    // snapshot would leave map pages marked clean that it never wrote.
    const needed = this.checkpointNeed();
    if (this.freeSlots.length < needed) {
      this.counters.noSpaceErrors++;
      throw new NoSpaceError(`a checkpoint needs up to ${needed} free segments and ${this.freeSlots.length} are free in ${this.store.describe()}`);
    }
    try {
      return await this.writeCheckpointNow();
    } catch (e) {
      // Past the check, a failure in the synchronous snapshot leaves state half changed: this
      // instance stops, and a reopen recovers from the last durable checkpoint and the log.
      if (!(e instanceof StoreFailedError) && this.failed === undefined && !this.checkpointWritten) this.fail(e);
      throw e;
    }
  }

  /** Free segments the next checkpoint needs at most (the meta stream's open segment counts as one). */
  private checkpointNeed(): number {
    let dirtyPages = 0;
    for (const pn of this.map.pageNumbers()) if (this.map.page(pn)!.dirty) dirtyPages++;
    return this.checkpointSegments(dirtyPages, Math.max(this.directory.size, this.map.pageCount));
  }

  /** Set once writeCheckpointNow's snapshot is complete (its records appended). */
  private checkpointWritten = false;

  private async writeCheckpointNow(): Promise<void> {
    this.checkpointWritten = false;
    // --- The snapshot, taken synchronously: this is instant T. ---
    this.trace?.(`checkpoint snapshot`);
    this.snapshotGen++;
    const snapshotGen = this.snapshotGen;
    const generation = this.generation + 1;
    this.ensureStreams();
    const heads: StreamHead[] = this.streams.map((s) => (s === undefined ? { slot: NO_SLOT, seq: 0, offset: 0 } : { slot: s.slot, seq: s.seq, offset: s.writeOff }));
    const slots: SlotEntry[] = new Array(this.segmentCount);
    const freedBySnapshot: { slot: number; seq: number }[] = [];
    for (let s = 0; s < this.segmentCount; s++) {
      const pending = this.pendingFree[s] !== 0;
      if (pending) freedBySnapshot.push({ slot: s, seq: this.slotSeq[s]! });
      // A segment open but no longer a stream's head is being sealed; its seal is queued ahead
      // of this checkpoint's superblock, so the checkpoint may call it sealed.
      const sealing = this.slotState[s] === SLOT_OPEN && this.streams[this.slotStream[s]!]?.slot !== s;
      slots[s] = {
        state: pending ? SLOT_FREE : sealing ? SLOT_SEALED : this.slotState[s]!,
        stream: this.slotStream[s]!,
        flags: this.slotFlags[s]!,
        seq: this.slotSeq[s]!,
        openClock: this.slotOpenClock[s]!,
        sealClock: this.slotSealClock[s]!,
      };
    }
    const userClock = this.userClock;
    const nextSeqAtSnapshot = this.nextSeq;
    const released: RecordRef[] = [];
    // Map pages dirtied since the last checkpoint, as they are at T.
    for (const pn of this.map.pageNumbers()) {
      const page = this.map.page(pn)!;
      if (!page.dirty) continue;
      page.dirty = false;
      const old = this.directory.get(pn);
      if (old !== undefined) released.push(old);
      if (page.mapped === 0) {
        this.directory.delete(pn);
        continue;
      }
      const payload = page.encode();
      const loc = this.appendMeta(RecordKind.MapPage, pn, payload);
      this.directory.set(pn, { pageNo: pn, slot: loc.slot, offset: loc.offset, length: payload.length, seq: this.slotSeq[loc.slot]! });
    }
    this.map.dropEmptyPages();
    const directory = [...this.directory.values()].sort((a, b) => a.pageNo - b.pageNo);
    const body = encodeCheckpointBody({ generation, userClock, nextSeq: nextSeqAtSnapshot, heads, slots, directory });
    const chunks: RecordRef[] = [];
    for (let o = 0, i = 0; o < body.length; o += CHECKPOINT_CHUNK_BYTES, i++) {
      const piece = body.subarray(o, Math.min(body.length, o + CHECKPOINT_CHUNK_BYTES));
      const loc = this.appendMeta(RecordKind.CheckpointChunk, i, piece);
      chunks.push({ slot: loc.slot, offset: loc.offset, length: piece.length, seq: this.slotSeq[loc.slot]! });
    }
    const rootPayload = encodeRoot({ generation, bodyBytes: body.length, bodyCrc: crc32c(body), chunks });
    const rootLoc = this.appendMeta(RecordKind.CheckpointRoot, generation, rootPayload);
    const root: RecordRef = { slot: rootLoc.slot, offset: rootLoc.offset, length: rootPayload.length, seq: this.slotSeq[rootLoc.slot]! };
    released.push(...this.currentCheckpointRefs);
    const refs = [...chunks, root];
    this.logBytesSinceCheckpoint = 0;
    this.checkpointWritten = true;

    // --- Make it durable, then point a superblock at it. ---
    const sb: Superblock = { generation, segmentBytes: this.segmentBytes, segmentCount: this.segmentCount, root };
    await this.enqueue(async () => {
      await this.syncAll();
      await this.store.writeSuperblock((generation % 2) as 0 | 1, encodeSuperblock(sb));
    });
    // --- Durable: the previous checkpoint's records are dead; cleaned slots are free. ---
    this.generation = generation;
    this.durableSnapshotGen = snapshotGen;
    this.currentCheckpointRefs = refs;
    for (const r of released) this.metaLive[r.slot]! -= RECORD_HEADER_BYTES + r.length;
    for (const f of freedBySnapshot) if (this.slotSeq[f.slot] === f.seq) this.releaseSlot(f.slot);
    this.counters.checkpoints++;
    // Dead segments sealed since the last checkpoint may be reclaimed now that this one covers them.
    if (this.deadNoted.length >= DEAD_RECLAIM_BATCH) this.maybeReclaimDead();
    this.trace?.(`checkpoint ${generation} durable (snapshot ${snapshotGen}, heads ${JSON.stringify(heads.filter((h) => h.slot !== NO_SLOT))}, freed ${freedBySnapshot.map((f) => f.slot).join(',')})`);
  }

  private appendMeta(kind: RecordKind, key: number, payload: Uint8Array): { slot: number; offset: number } {
    const loc = this.append(STREAM_META, kind, FLAG_BATCH_END, key, 0, payload);
    const bytes = RECORD_HEADER_BYTES + payload.length;
    this.metaLive[loc.slot]! += bytes;
    this.counters.checkpointBytes += bytes;
    return loc;
  }

  private releaseSlot(s: number): void {
    if (this.pendingFree[s] === 0) return;
    assert(this.slotState[s] === SLOT_SEALED, `releasing slot ${s} in state ${this.slotState[s]}`);
    this.pendingFree[s] = 0;
    this.slotState[s] = SLOT_FREE;
    this.dataLive[s] = 0;
    this.metaLive[s] = 0;
    this.freeSlots.push(s);
    this.trace?.(`free slot ${s} seq ${this.slotSeq[s]}`);
    this.store.release(s).catch(() => undefined);
  }

  // =====================================================================================
  // The cleaner
  // =====================================================================================

  private segmentInfo(s: number): SegmentInfo {
    return {
      slot: s, stream: this.slotStream[s]!, liveBytes: this.dataLive[s]! + this.metaLive[s]!, usableBytes: this.usableBytes,
      openClock: this.slotOpenClock[s]!, sealClock: this.slotSealClock[s]!,
    };
  }

  /**
   * Clean until `target` segments are free, or no progress is possible. Single-flight.
   * `emptiestFirst` takes victims by utilization alone (as F2FS's foreground cleaning does):
   * for when room is needed now, not at the best long-run cost.
   */
  cleanUntil(target: number, foreground: boolean, emptiestFirst = false): Promise<void> {
    if (this.cleanerRunning !== undefined) {
      return this.cleanerRunning.then(() => (this.freeSlots.length < target && foreground ? this.cleanUntil(target, true, emptiestFirst) : undefined));
    }
    const run = (async () => {
      let idle = 0;
      let rounds = 0;
      const freeAtStart = this.freeSlots.length;
      // Each useful round gains at least a segment: more rounds than that would mean cycling.
      const maxRounds = 4 * Math.max(1, target - freeAtStart) + 8;
      while (this.freeSlots.length < target && this.failed === undefined && !this.closed && rounds < maxRounds) {
        const { freed, candidates } = await this.cleanRound(foreground, emptiestFirst);
        rounds++;
        if (candidates === 0) {
          // Segments sealed since the last checkpoint cannot be cleaned yet: a checkpoint makes them eligible.
          if (++idle > 2) break;
          await this.checkpoint();
        } else if (freed === 0) {
          if (++idle > 2) break;
        } else {
          idle = 0;
        }
        // Progress is net: rounds that free segments while filling as many gain nothing.
        if (rounds >= 8 && this.freeSlots.length <= freeAtStart) break;
        if (!foreground) await new Promise((r) => setImmediate(r));
      }
    })();
    const tracked = run.finally(() => {
      if (this.cleanerRunning === tracked) this.cleanerRunning = undefined;
    });
    this.cleanerRunning = tracked;
    return tracked;
  }

  /**
   * One cleaning round: up to cleanerBatch victims, then one sync (and a checkpoint if
   * needed); returns the segments freed. In the background only segments at most
   * BACKGROUND_MAX_UTILIZATION full are taken: emptying a nearly full segment costs a
   * segment's copy to gain a sliver. Victims by the policy's score, or (`emptiestFirst`) by
   * utilization alone.
   */
  cleanRound(foreground = true, emptiestFirst = false): Promise<{ freed: number; candidates: number }> {
    // One round at a time: two at once could pick the same victim, and the second, working
    // from its stale copy after the first freed it and user data reused the slot, freed the
    // new, live segment (a review's finding; cleanRound is public, beside the background
    // cleaner's rounds).
    const run = this.roundTail.then(() => this.cleanRoundNow(foreground, emptiestFirst));
    this.roundTail = run.then(() => undefined, () => undefined);
    return run;
  }

  private roundTail: Promise<void> = Promise.resolve();

  private async cleanRoundNow(foreground: boolean, emptiestFirst: boolean): Promise<{ freed: number; candidates: number }> {
    this.checkWritable();
    const now = this.userClock;
    const candidates: { slot: number; score: number }[] = [];
    for (let s = 0; s < this.segmentCount; s++) {
      if (this.slotState[s] !== SLOT_SEALED || this.pendingFree[s] !== 0 || this.victimNow[s] !== 0) continue;
      if (this.appendsEndedGen[s]! >= this.durableSnapshotGen) continue;
      if ((this.slotFlags[s]! & SLOT_FLAG_DAMAGED) !== 0) continue;
      const info = this.segmentInfo(s);
      if (info.liveBytes >= this.usableBytes * (foreground ? 1 : BACKGROUND_MAX_UTILIZATION) - RECORD_HEADER_BYTES) continue; // little or nothing to gain
      candidates.push({ slot: s, score: info.liveBytes === 0 ? Infinity : emptiestFirst ? -info.liveBytes : this.policy.score(info, now) });
    }
    if (candidates.length === 0) return { freed: 0, candidates: 0 };
    candidates.sort((a, b) => b.score - a.score);
    // Bound the bytes copied per round so that the cleaner's output always fits in the free
    // segments it may use: victims are freed only at the end of the round.
    const spareSegments = Math.max(1, this.freeSlots.length - (this.reserveSegments() - this.policy.gcStreams));
    const copyBudget = Math.min(spareSegments, Math.ceil(this.cleanerBatch / 2)) * (this.usableBytes - 1024);
    const victims: number[] = [];
    let copyBytes = 0;
    for (const c of candidates) {
      if (victims.length >= this.cleanerBatch) break;
      const live = this.dataLive[c.slot]!;
      if (victims.length > 0 && copyBytes + live > copyBudget) break;
      victims.push(c.slot);
      copyBytes += live;
    }
    this.counters.cleanerRounds++;
    let needCheckpoint = false;
    let freed = 0;
    for (const v of victims) this.victimNow[v] = 1;
    const seqs = victims.map((v) => this.slotSeq[v]!);
    try {
      for (const v of victims) {
        const outcome = await this.cleanSegment(v);
        if (outcome === 'checkpoint') needCheckpoint = true;
      }
      // Relocations must be durable before a victim's slot is reused.
      await this.flush();
      for (const [i, v] of victims.entries()) {
        // A victim marked for a checkpoint (pendingFree 2) may have been freed, and reused, by
        // one that ran meanwhile: that one covered it. Only the incarnation cleaned here is freed.
        if (this.slotSeq[v] !== seqs[i]) continue;
        if (this.pendingFree[v] === 1) {
          this.releaseSlot(v);
          freed++;
        }
      }
    } finally {
      for (const v of victims) this.victimNow[v] = 0;
    }
    if (needCheckpoint) {
      const before = this.freeSlots.length;
      await this.checkpoint();
      freed += Math.max(0, this.freeSlots.length - before);
    }
    this.counters.segmentsCleaned += freed;
    return { freed, candidates: candidates.length };
  }

  /** Move the live records out of `slot`. Returns what it takes to free it. */
  private async cleanSegment(slot: number): Promise<'sync' | 'checkpoint' | 'damaged'> {
    const info = this.segmentInfo(slot);
    const seq = this.slotSeq[slot]!;
    if (info.liveBytes === 0) {
      this.pendingFree[slot] = 1;
      return 'sync';
    }
    const bytes = await this.store.read(slot, 0, this.segmentBytes);
    this.checkWritable();
    assert(this.slotSeq[slot] === seq && this.slotState[slot] === SLOT_SEALED && this.pendingFree[slot] === 0, `cleaner: segment ${slot} changed while its copy was read`);
    this.counters.cleanerReadBytes += bytes.length;
    const view = viewOf(bytes);
    const seed = segmentSeed(seq, slot);
    const footer = decodeFooter(bytes, this.segmentBytes);
    const damaged = (why: string): 'damaged' => {
      this.slotFlags[slot]! |= SLOT_FLAG_DAMAGED;
      this.counters.damagedSegments++;
      this.onProblem?.(`cleaner: segment ${slot} is damaged: ${why}`);
      return 'damaged';
    };
    if (footer === undefined || footer.seq !== seq || footer.slot !== slot) return damaged('bad footer');
    const sumStart = summaryOffset(this.segmentBytes, footer.entries);
    if (crc32c(bytes.subarray(sumStart, this.segmentBytes - FOOTER_BYTES), seed) !== footer.summaryCrc) return damaged('bad summary checksum');
    if (info.stream === STREAM_USER) {
      // Sample how long user segments live, for policies that separate by lifespan.
      this.lifespanSamples.push(this.userClock - info.openClock);
      if (this.lifespanSamples.length > 16) this.lifespanSamples.shift();
    }
    const ctx: CleanerContext = {
      now: this.userClock,
      userSegmentLifespan: this.lifespanSamples.length === 0 ? this.segmentBytes * this.segmentCount : this.lifespanSamples.reduce((a, b) => a + b, 0) / this.lifespanSamples.length,
    };
    const lastGc = this.policy.gcStreams - 1;
    let needCheckpoint = false;
    let bad = false;
    const prev = NO_LOC();
    let offset = SEGMENT_HEADER_BYTES;
    for (let i = 0; i < footer.entries; i++) {
      const e = decodeSummaryEntry(view, sumStart + i * SUMMARY_ENTRY_BYTES);
      const at = offset;
      offset += RECORD_HEADER_BYTES + e.length;
      if (e.kind === RecordKind.Put || e.kind === RecordKind.Relocate) {
        if (!this.map.isAt(e.key, slot, at)) continue;
        if (this.checkRecord(bytes, at, e.key, e.length, seed) !== undefined) {
          bad = true; // never launder a corrupt record into a fresh checksum
          continue;
        }
        const payload = bytes.subarray(at + RECORD_HEADER_BYTES, at + RECORD_HEADER_BYTES + e.length);
        const gcStream = STREAM_GC_FIRST + Math.min(lastGc, Math.max(0, this.policy.outputStream(info, this.map.temperature(e.key, this.userClock), ctx)));
        const loc = this.append(gcStream, RecordKind.Relocate, FLAG_BATCH_END, e.key, seq % 0x100000000, payload);
        this.map.set(e.key, loc.slot, loc.offset, e.length, prev);
        const recordBytes = RECORD_HEADER_BYTES + e.length;
        this.dataLive[slot]! -= recordBytes;
        this.dataLive[loc.slot]! += recordBytes;
        this.counters.cleanerRecords++;
        this.counters.cleanerBytes += recordBytes;
      } else if (e.kind === RecordKind.MapPage) {
        const d = this.directory.get(e.key);
        if (d !== undefined && d.slot === slot && d.offset === at) {
          this.map.markDirty(e.key);
          needCheckpoint = true;
        }
      }
      // Checkpoint chunks and roots need no copy: the next checkpoint supersedes them (below).
    }
    if (bad) return damaged('a live record failed its checksum');
    if (this.metaLive[slot]! > 0) needCheckpoint = true;
    this.pendingFree[slot] = needCheckpoint ? 2 : 1;
    this.trace?.(`cleaned slot ${slot} seq ${seq}, pending ${this.pendingFree[slot]}`);
    return needCheckpoint ? 'checkpoint' : 'sync';
  }

  private onProblem: ((m: string) => void) | undefined;
  private readonly lifespanSamples: number[] = [];

  // =====================================================================================
  // Recovery
  // =====================================================================================

  private async recover(onProblem?: (m: string) => void): Promise<void> {
    const started = Date.now();
    const problems: string[] = [];
    const report = (m: string): void => {
      problems.push(m);
      onProblem?.(m);
    };
    this.onProblem = onProblem;
    const candidates: Superblock[] = [];
    for (const slot of [0, 1] as const) {
      const sb = decodeSuperblock(await this.store.readSuperblock(slot));
      if (typeof sb === 'string') {
        if (sb !== 'never written') report(`superblock ${slot}: ${sb}`);
      } else if (sb.segmentBytes !== this.segmentBytes || sb.segmentCount !== this.segmentCount) {
        report(`superblock ${slot}: geometry ${sb.segmentCount} x ${sb.segmentBytes} does not match the store's ${this.segmentCount} x ${this.segmentBytes}`);
      } else {
        candidates.push(sb);
      }
    }
    if (candidates.length === 0) throw new FormatError(`${this.store.describe()} holds no valid Grass superblock (${problems.join('; ') || 'never formatted'})`);
    candidates.sort((a, b) => b.generation - a.generation);
    const sb = candidates[0]!;
    const body = await this.loadCheckpoint(sb);
    this.generation = body.generation;
    this.userClock = body.userClock;
    for (let s = 0; s < this.segmentCount; s++) {
      const e = body.slots[s]!;
      this.slotState[s] = e.state;
      this.slotStream[s] = e.stream;
      this.slotFlags[s] = e.flags;
      this.slotSeq[s] = e.seq;
      this.slotOpenClock[s] = e.openClock;
      this.slotSealClock[s] = e.sealClock;
      this.appendsEndedGen[s] = 0;
    }
    // Roll each stream forward from its head.
    const modified = new Set<number>();
    // Relocations refer to segment incarnations as the checkpoint knew them; replay may visit a
    // reused slot (and so change slotSeq) before it replays the relocation out of the old one.
    const checkpointSeq = Float64Array.from(body.slots, (e) => e.seq);
    const visited = new Set<number>();
    const streamReports: StreamRecovery[] = [];
    const tails: (OpenSegment | undefined)[] = new Array(MAX_STREAMS).fill(undefined);
    let maxSeq = 0;
    for (let stream = 0; stream < MAX_STREAMS; stream++) {
      const head = body.heads[stream]!;
      if (head.slot === NO_SLOT) continue;
      const r = await this.replayStream(stream, head, modified, checkpointSeq, visited);
      streamReports.push(r.report);
      tails[stream] = r.tail;
      maxSeq = Math.max(maxSeq, r.maxSeq);
    }
    // Slots marked open in the checkpoint that replay did not reach were never written.
    for (let s = 0; s < this.segmentCount; s++) {
      if (this.slotState[s] === SLOT_OPEN && !tails.some((t) => t?.slot === s)) this.slotState[s] = SLOT_FREE;
    }
    // Sequence numbers: anything opened after the snapshot used seqs below nextSeq + segmentCount.
    this.nextSeq = Math.max(body.nextSeq + this.segmentCount, maxSeq + 1);
    // Live bytes, recomputed from the map and the checkpoint's own records.
    this.dataLive.fill(0);
    this.metaLive.fill(0);
    this.map.forEach((_g, slot, _o, length) => {
      this.dataLive[slot]! += RECORD_HEADER_BYTES + length;
    });
    for (const d of this.directory.values()) this.metaLive[d.slot]! += RECORD_HEADER_BYTES + d.length;
    for (const r of this.currentCheckpointRefs) this.metaLive[r.slot]! += RECORD_HEADER_BYTES + r.length;
    for (let s = 0; s < this.segmentCount; s++) {
      if (this.slotState[s] === SLOT_FREE && (this.dataLive[s]! > 0 || this.metaLive[s]! > 0)) {
        report(`segment ${s} is marked free but holds live records; keeping it`);
        this.slotState[s] = SLOT_SEALED;
      }
    }
    // Sealed segments with nothing live are free: at once if the checkpoint already covered
    // them; after the post-recovery checkpoint if replay read them (their trims still count).
    // The metadata stream holds nothing replay applies, only checkpoints: its segments after
    // the one holding the durable checkpoint's root hold a checkpoint the crash cut short, and
    // are free at once. A reopen needs their room: its own checkpoint may write every map
    // page, and the reserve that covered the interrupted checkpoint does not cover two. (The
    // stream's earlier segments stay until the reopen's checkpoint: a second crash before it
    // replays from the same head.)
    let abandoned = 0;
    if (!this.readOnly) {
      for (let s = 0; s < this.segmentCount; s++) {
        if (this.slotState[s] !== SLOT_SEALED || this.dataLive[s]! > 0 || this.metaLive[s]! > 0) continue;
        if (tails.some((t) => t?.slot === s)) continue;
        if (!visited.has(s)) {
          this.slotState[s] = SLOT_FREE;
        } else if (this.slotStream[s] === STREAM_META && this.slotSeq[s]! > sb.root.seq) {
          this.slotState[s] = SLOT_FREE;
          abandoned++;
        } else {
          this.pendingFree[s] = 2;
        }
      }
    }
    for (let s = this.segmentCount - 1; s >= 0; s--) if (this.slotState[s] === SLOT_FREE) this.freeSlots.push(s);
    const replayed = streamReports.reduce((a, r) => a + r.records, 0);
    this.recovery = {
      checkpointGeneration: body.generation, streams: streamReports, problems,
      replayedRecords: replayed,
      droppedRecords: streamReports.reduce((a, r) => a + r.droppedRecords, 0),
      droppedBytes: streamReports.reduce((a, r) => a + r.droppedBytes, 0),
      abandonedCheckpointSegments: abandoned,
      freedAtOpen: 0,
      millis: 0,
    };
    if (this.readOnly) {
      // Keep the tails visible to reads without writing anything.
      for (const t of tails) if (t !== undefined) this.buffered.delete(t.slot);
      this.recovery.millis = Date.now() - started;
      return;
    }
    // Seal each stream's tail where its valid records end: appending after a torn write
    // could make stale records after it look valid again.
    for (const t of tails) {
      if (t === undefined) continue;
      this.slotState[t.slot] = SLOT_OPEN;
      this.sealingPerStream[t.stream]!++;
      t.sealClock = this.userClock;
      this.appendsEndedGen[t.slot] = this.snapshotGen;
      this.sealQueue.push(t);
      this.enqueue(() => this.drainSealsThrough(t)).catch(() => undefined);
    }
    this.ensureStreams();
    await this.checkpoint();
    // Each crash leaves the tails sealed where they ended, half full, and the open segments
    // above took fresh ones: crashes in a row, each before the cleaner caught up, would eat the
    // reserve until a reopen found no room for its checkpoint. So the reserve comes back
    // before the store is handed out (maxLiveShare keeps garbage there to win it from).
    if (this.freeSlots.length < this.reserveSegments()) {
      const before = this.freeSlots.length;
      await this.cleanUntil(this.reserveSegments(), true, true);
      this.recovery.freedAtOpen = this.freeSlots.length - before;
    }
    this.recovery.millis = Date.now() - started;
    // Let the cleaner go on to its usual level before users need the space.
    if (this.background && this.freeSlots.length <= this.cleanStart) this.cleanUntil(this.cleanTarget, false).catch(() => undefined);
  }

  private async readMetaRecord(ref: RecordRef, kind: RecordKind, key: number | undefined, what: string): Promise<Uint8Array> {
    this.checkRef(ref, what);
    const bytes = await this.store.read(ref.slot, ref.offset, RECORD_HEADER_BYTES + ref.length);
    const view = viewOf(bytes);
    const h = peekRecordHeader(view, 0, bytes.length);
    const where = { segment: ref.slot, offset: ref.offset };
    if (h === undefined || h.kind !== kind || h.length !== ref.length || (key !== undefined && h.key !== key)) {
      throw new CorruptionError(where, `${what}: malformed record`);
    }
    if (!recordChecksumOk(bytes, view, 0, ref.length, segmentSeed(ref.seq, ref.slot))) throw new CorruptionError(where, `${what}: checksum mismatch`);
    return bytes.subarray(RECORD_HEADER_BYTES);
  }

  /** A reference read from storage names a record inside some segment (else CorruptionError). */
  private checkRef(ref: { slot: number; offset: number; length: number }, what: string): void {
    if (!(ref.slot < this.segmentCount) || ref.offset < SEGMENT_HEADER_BYTES || ref.offset + RECORD_HEADER_BYTES + ref.length > this.segmentBytes - FOOTER_BYTES) {
      throw new CorruptionError({ segment: ref.slot, offset: ref.offset }, `${what}: names ${ref.length} bytes at slot ${ref.slot} offset ${ref.offset}, outside the store's ${this.segmentCount} segments of ${this.segmentBytes} bytes`);
    }
  }

  private async loadCheckpoint(sb: Superblock): Promise<CheckpointBody> {
    const rootBytes = await this.readMetaRecord(sb.root, RecordKind.CheckpointRoot, sb.generation, `checkpoint ${sb.generation} root`);
    const root = decodeRoot(rootBytes);
    if (typeof root === 'string') throw new CorruptionError({ segment: sb.root.slot, offset: sb.root.offset }, root);
    const body = new Uint8Array(root.bodyBytes);
    let o = 0;
    for (let i = 0; i < root.chunks.length; i++) {
      const c = root.chunks[i]!;
      const piece = await this.readMetaRecord(c, RecordKind.CheckpointChunk, i, `checkpoint ${sb.generation} chunk ${i}`);
      if (o + piece.length > body.length) throw new CorruptionError({ segment: c.slot, offset: c.offset }, 'checkpoint chunks overrun the body');
      body.set(piece, o);
      o += piece.length;
    }
    if (o !== body.length || crc32c(body) !== root.bodyCrc) throw new CorruptionError({ segment: sb.root.slot, offset: sb.root.offset }, 'checkpoint body checksum mismatch');
    const decoded = decodeCheckpointBody(body);
    if (typeof decoded === 'string') throw new CorruptionError({ segment: sb.root.slot, offset: sb.root.offset }, decoded);
    const at = { segment: sb.root.slot, offset: sb.root.offset };
    if (decoded.slots.length !== this.segmentCount) throw new CorruptionError(at, 'checkpoint slot table does not match the store');
    for (const h of decoded.heads) {
      if (h.slot !== NO_SLOT && (!(h.slot < this.segmentCount) || h.offset > this.segmentBytes)) throw new CorruptionError(at, `checkpoint names a stream head at slot ${h.slot} offset ${h.offset}, outside the store`);
    }
    const pageBytes = MAP_PAGE_ENTRIES * MAP_ENTRY_BYTES;
    for (const d of decoded.directory) {
      if (d.length !== pageBytes || this.directory.has(d.pageNo)) throw new CorruptionError(at, `checkpoint directory: map page ${d.pageNo} is ${d.length} bytes${this.directory.has(d.pageNo) ? ', and listed twice' : ''}`);
      const bytes = await this.readMetaRecord(d, RecordKind.MapPage, d.pageNo, `map page ${d.pageNo}`);
      const page = MapPage.decode(bytes);
      for (let i = 0; i < MAP_PAGE_ENTRIES; i++) {
        const slot = page.slot[i]!;
        if (slot === NO_SLOT) continue;
        if (!(slot < this.segmentCount) || page.length[i]! > MAX_USER_RECORD_BYTES || page.offset[i]! + RECORD_HEADER_BYTES + page.length[i]! > this.segmentBytes - FOOTER_BYTES) {
          throw new CorruptionError({ segment: d.slot, offset: d.offset }, `map page ${d.pageNo}: address ${d.pageNo * MAP_PAGE_ENTRIES + i} is mapped to ${page.length[i]} bytes at slot ${slot} offset ${page.offset[i]}, outside the store`);
        }
      }
      this.map.installPage(d.pageNo, page);
      this.directory.set(d.pageNo, d);
    }
    this.currentCheckpointRefs = [...root.chunks, sb.root];
    return decoded;
  }

  /** Replay one stream from `head`. Returns its tail (the last segment reached, if valid). */
  private async replayStream(
    stream: number, head: StreamHead, modified: Set<number>, checkpointSeq: Float64Array, visited: Set<number>,
  ): Promise<{ report: StreamRecovery; tail: OpenSegment | undefined; maxSeq: number }> {
    const r: StreamRecovery = { stream, segments: 0, records: 0, droppedRecords: 0, droppedBytes: 0, end: '' };
    let slot = head.slot;
    let seq = head.seq;
    let from = head.offset;
    let pending: { h: RecordHeader; slot: number; offset: number }[] = [];
    let pendingBytes = 0;
    let tail: OpenSegment | undefined;
    let maxSeq = 0;
    const prev = NO_LOC();
    const apply = (h: RecordHeader, s: number, off: number): void => {
      r.records++;
      if (h.kind === RecordKind.Put) {
        this.map.set(h.key, s, off, h.length, prev);
        modified.add(h.key);
        this.userClock += RECORD_HEADER_BYTES + h.length;
      } else if (h.kind === RecordKind.Trim) {
        this.map.delete(h.key, prev);
        modified.add(h.key);
        this.userClock += RECORD_HEADER_BYTES;
      } else if (h.kind === RecordKind.Relocate) {
        // Applies only if the address still holds the checkpoint's mapping into the source
        // segment incarnation: a later user write or trim (in any stream order) wins.
        if (modified.has(h.key)) return;
        const cur = this.map.slotOf(h.key);
        if (cur === NO_SLOT || checkpointSeq[cur]! % 0x100000000 !== h.aux) return;
        this.map.set(h.key, s, off, h.length, prev);
        modified.add(h.key);
      }
      // Metadata records are the checkpoint's own business: nothing to replay.
    };
    const take = (h: RecordHeader, s: number, off: number): void => {
      pending.push({ h, slot: s, offset: off });
      pendingBytes += RECORD_HEADER_BYTES + h.length;
      if (h.flags & FLAG_BATCH_END) {
        for (const p of pending) apply(p.h, p.slot, p.offset);
        pending = [];
        pendingBytes = 0;
      }
    };
    for (let hops = 0; hops <= this.segmentCount; hops++) {
      const bytes = await this.store.read(slot, 0, this.segmentBytes);
      const header = decodeSegmentHeader(bytes);
      if (header === undefined || header.seq !== seq || header.slot !== slot || header.stream !== stream) {
        r.end = `segment ${slot}: no segment with seq ${seq} (never written, or its header was torn)`;
        break;
      }
      r.segments++;
      visited.add(slot);
      maxSeq = Math.max(maxSeq, seq);
      this.slotState[slot] = SLOT_OPEN;
      this.slotStream[slot] = stream;
      this.slotSeq[slot] = seq;
      this.slotOpenClock[slot] = header.openClock;
      this.slotFlags[slot] = 0;
      const seed = segmentSeed(seq, slot);
      const view = viewOf(bytes);
      const footer = decodeFooter(bytes, this.segmentBytes);
      const sumStart = footer === undefined ? 0 : summaryOffset(this.segmentBytes, footer.entries);
      if (footer !== undefined && footer.seq === seq && footer.slot === slot &&
          crc32c(bytes.subarray(sumStart, this.segmentBytes - FOOTER_BYTES), seed) === footer.summaryCrc) {
        // Sealed: its summary is authoritative (the seal protocol synced the data first). Its
        // checksum holds, so what it says must also be possible, or this is corruption that
        // the checksum cannot see (a footer written by something else): refuse, never guess.
        let off = SEGMENT_HEADER_BYTES;
        const entries: RecordHeader[] = [];
        for (let i = 0; i < footer.entries; i++) {
          const e = decodeSummaryEntry(view, sumStart + i * SUMMARY_ENTRY_BYTES);
          const userKind = e.kind === RecordKind.Put || e.kind === RecordKind.Trim || e.kind === RecordKind.Relocate;
          if (!(userKind || (e.kind >= RecordKind.MapPage && e.kind <= RecordKind.CheckpointRoot)) || (userKind && e.length > MAX_USER_RECORD_BYTES)) {
            throw new CorruptionError({ segment: slot, offset: sumStart + i * SUMMARY_ENTRY_BYTES }, `segment ${slot}: summary entry ${i} is a record of kind ${e.kind} and ${e.length} bytes`);
          }
          entries.push(e);
          off += RECORD_HEADER_BYTES + e.length;
        }
        if (off !== footer.dataEnd || off > sumStart) {
          throw new CorruptionError({ segment: slot, offset: this.segmentBytes - FOOTER_BYTES }, `segment ${slot}: its summary's records end at ${off}, its footer says ${footer.dataEnd} (summary at ${sumStart})`);
        }
        off = SEGMENT_HEADER_BYTES;
        for (const e of entries) {
          if (off >= from) take(e, slot, off);
          off += RECORD_HEADER_BYTES + e.length;
        }
        this.slotState[slot] = SLOT_SEALED;
        this.slotSealClock[slot] = footer.sealClock;
        if (footer.nextSlot === NO_SLOT) {
          r.end = `segment ${slot}: sealed with no successor`;
          break;
        }
        if (!(footer.nextSlot < this.segmentCount) || !(footer.nextSeq > seq)) {
          throw new CorruptionError({ segment: slot, offset: this.segmentBytes - FOOTER_BYTES }, `segment ${slot} (seq ${seq}): its footer names slot ${footer.nextSlot} seq ${footer.nextSeq} as the next, which cannot follow it`);
        }
        slot = footer.nextSlot;
        seq = footer.nextSeq;
        from = 0;
        continue;
      }
      // Not sealed: scan records until the first that does not check out.
      const seg = new OpenSegment(stream, slot, seq, header.openClock);
      let off = SEGMENT_HEADER_BYTES;
      const limit = this.segmentBytes - FOOTER_BYTES;
      let why = 'end of segment';
      while (true) {
        const h = peekRecordHeader(view, off, limit);
        if (h === undefined) {
          why = `no valid record header at offset ${off}`;
          break;
        }
        if (off + RECORD_HEADER_BYTES + h.length + (seg.entryCount + 1) * SUMMARY_ENTRY_BYTES > limit) {
          why = `record at offset ${off} would overlap the summary`;
          break;
        }
        if (!recordChecksumOk(bytes, view, off, h.length, seed)) {
          why = `checksum mismatch at offset ${off}`;
          break;
        }
        if (off >= from) take(h, slot, off);
        seg.addEntry(h);
        off += RECORD_HEADER_BYTES + h.length;
      }
      seg.writeOff = off;
      seg.flushedOff = off;
      seg.buf = bytes;
      seg.view = view;
      this.buffered.set(slot, seg);
      tail = seg;
      r.end = `segment ${slot}: log ends at offset ${off} (${why})`;
      break;
    }
    if (pending.length > 0) {
      // A batch whose end never reached the disk was never acknowledged by a flush: the crash
      // came while it was being written. Expected after any crash, so in the stream's figures
      // (and its end), not among the problems, which fsck counts as damage.
      r.droppedRecords = pending.length;
      r.droppedBytes = pendingBytes;
      r.end += `; dropped ${pending.length} records (${pendingBytes} bytes) of a batch the crash cut short`;
    }
    if (tail !== undefined && tail.entryCount === 0) {
      // Nothing valid in it at all: it is simply free again.
      this.buffered.delete(tail.slot);
      this.slotState[tail.slot] = SLOT_FREE;
      tail = undefined;
    }
    return { report: r, tail, maxSeq };
  }

  // =====================================================================================
  // Stats and inspection
  // =====================================================================================

  private liveDataBytes(): number {
    let sum = 0;
    for (let s = 0; s < this.segmentCount; s++) sum += this.dataLive[s]!;
    return sum;
  }

  stats(): GrassStats {
    const c = this.counters;
    const sealedUtil: number[] = [];
    let sealed = 0;
    let open = 0;
    let pending = 0;
    for (let s = 0; s < this.segmentCount; s++) {
      if (this.pendingFree[s] !== 0) pending++;
      else if (this.slotState[s] === SLOT_SEALED) {
        sealed++;
        sealedUtil.push((this.dataLive[s]! + this.metaLive[s]!) / this.usableBytes);
      } else if (this.slotState[s] === SLOT_OPEN) open++;
    }
    return {
      segmentBytes: this.segmentBytes,
      segmentCount: this.segmentCount,
      freeSegments: this.freeSlots.length,
      openSegments: open,
      sealedSegments: sealed,
      pendingFreeSegments: pending,
      reserveSegments: this.reserveSegments(),
      liveRecords: this.map.size,
      liveBytes: this.liveDataBytes(),
      liveLimitBytes: Math.max(0, Math.floor(this.liveLimit(0))),
      liveLogBytes: this.liveBytes(),
      userRecords: c.userRecords,
      userBytes: c.userBytes,
      userPayloadBytes: c.userPayloadBytes,
      trims: c.trims,
      batches: c.batches,
      cleanerRecords: c.cleanerRecords,
      cleanerBytes: c.cleanerBytes,
      cleanerReadBytes: c.cleanerReadBytes,
      checkpointBytes: c.checkpointBytes,
      checkpoints: c.checkpoints,
      writeAmplification: c.userBytes === 0 ? 1 : (c.userBytes + c.cleanerBytes) / c.userBytes,
      cleanerRounds: c.cleanerRounds,
      segmentsCleaned: c.segmentsCleaned,
      deadSegmentsFreed: c.deadSegmentsFreed,
      foregroundCleans: c.foregroundCleans,
      damagedSegments: c.damagedSegments,
      flushes: c.flushes,
      syncs: c.syncs,
      reads: c.reads,
      readBytes: c.readBytes,
      corruptReads: c.corruptReads,
      noSpaceErrors: c.noSpaceErrors,
      mapMemoryBytes: this.map.memoryBytes,
      utilizationHistogram: utilizationHistogram(sealedUtil),
      policy: this.policy.name,
      generation: this.generation,
    };
  }

  /** Read-only views for fsck and tests. Not part of the Grass interface. */
  inspect(): GrassInspection {
    return {
      map: this.map,
      directory: this.directory,
      checkpointRefs: this.currentCheckpointRefs,
      slotState: this.slotState,
      slotSeq: this.slotSeq,
      slotFlags: this.slotFlags,
      dataLive: this.dataLive,
      metaLive: this.metaLive,
      pendingFree: this.pendingFree,
      buffered: new Set(this.buffered.keys()),
      freeSlots: this.freeSlots.length,
    };
  }
}

export interface GrassInspection {
  map: AddressMap;
  directory: ReadonlyMap<number, DirectoryEntry>;
  checkpointRefs: readonly RecordRef[];
  slotState: Uint8Array;
  slotSeq: Float64Array;
  slotFlags: Uint16Array;
  dataLive: Float64Array;
  metaLive: Float64Array;
  pendingFree: Uint8Array;
  buffered: ReadonlySet<number>;
  freeSlots: number;
}

function checkAddress(gaddr: number): void {
  if (!Number.isSafeInteger(gaddr) || gaddr < 1 || gaddr > MAX_GADDR) {
    throw new InvalidArgumentError(`Grass address must be an integer in [1, ${MAX_GADDR}], got ${gaddr}`);
  }
}

/**
 * S3SegmentStore: Grass segments in an S3 bucket, with a local journal and read cache (the
 * LSVD shape of seed 001). FORMAT.md beside this file gives the keys and files.
 *
 * The local cache directory is the journal:
 *   DIR/store.json     which bucket and prefix, the store id, geometry, the last epoch used
 *   DIR/superblock     the two Grass superblock slots (as in the file store)
 *   DIR/seg/SLOT.KEY.open     a segment being written: `sync` is its fdatasync
 *   DIR/seg/SLOT.KEY.sealed   sealed, durable here, not yet uploaded
 *   DIR/seg/SLOT.KEY.cached   uploaded; kept as a read cache, evicted least recently used
 *   DIR/seg/SLOT.KEY.chunks   being fetched range by range, or fetched whole but not yet
 *                             flushed (see scheduleNaming); deleted at open
 *   DIR/lock           the local process holding DIR
 *
 * So a flush is durable once it is in the journal and never waits for S3. Sealed segments are
 * uploaded in the background, each as one object written once, after a burst of writes rather
 * than during it (S3StoreOptions.uploadIdleMs). The bucket's state is advanced by
 * publishing a manifest (at each Grass checkpoint, every `publishIntervalMs`, and at close):
 * it waits for the uploads it needs, uploads the open segments' written prefixes as partial
 * objects, and creates the next manifest in the chain with If-None-Match. Recovery from the
 * bucket alone opens at the last published manifest: a prefix of what was written.
 *
 * Deletes follow publication: an object that a released segment or a superseded partial leaves
 * behind is deleted only after a manifest that no longer lists it is durable, plus a grace
 * period for readers of older manifests. `sweep()` deletes orphans that a crash left.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { setMaxListeners } from 'node:events';
import { open, mkdir, readFile, writeFile, rename, readdir, unlink, rm, rmdir, stat } from 'node:fs/promises';
import type { FileHandle } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join, resolve } from 'node:path';
import { randomBytes } from 'node:crypto';
import { z } from 'zod';
import {
  checkRange, takeLock, syncDir, pidAlive, LocalReads, type SegmentStore, InvalidArgumentError, FormatError, StoreLockedError, ClosedError,
  SUPERBLOCK_BYTES, MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES, MAX_SEGMENT_COUNT,
} from '@pasture/grass';
import { Bucket, type BucketCounters, type BucketOptions } from './bucket.ts';
import {
  LOCK_KEY, LockRecord, MANIFEST_DIR, MANIFEST_FORMAT_VERSION, SEGMENT_DIR, decodeManifest, encodeManifest, epochOfKey, incarnationOfKey,
  manifestKey, manifestSeqOf, partialKey, segmentKey, segmentKeyOf, type Manifest, type ManifestEntry, type Writer,
} from './manifest.ts';

export interface S3StoreOptions {
  /** The bucket, or how to reach it. */
  bucket: Bucket | BucketOptions;
  /** Local journal and cache directory. */
  cacheDir: string;
  /** Bytes of uploaded segments kept locally for reads (default 1 GiB). */
  cacheBytes?: number;
  /** `seal` waits while sealed segments not yet uploaded exceed this (default 4 GiB of local disk). */
  maxUploadBacklogBytes?: number;
  /**
   * Uploads wait while writes keep coming (one in the last `uploadIdleMs`; default 1000, 0
   * uploads at once), so that the journal takes a burst and S3 gets it after: until the backlog
   * reaches `uploadHoldBytes` (default 3/4 of maxUploadBacklogBytes) or the oldest segment
   * waiting is `maxUploadDelayMs` old (default 30 000). Publications (but for the first with a
   * superblock, and drain's and close's) wait until writes pause or that delay is up.
   */
  uploadIdleMs?: number;
  /**
   * A segment fetched whole from S3 is flushed and named `.cached` (kept by the next open)
   * once fetches pause this long (default 1000), or 30 s after its fetch, or at close; until
   * then a crash costs that copy, which is fetched again.
   */
  cacheSyncIdleMs?: number;
  uploadHoldBytes?: number;
  maxUploadDelayMs?: number;
  /** Segment uploads in flight (default 4). */
  uploadConcurrency?: number;
  /** Publish a manifest this often when something changed; 0 = only at checkpoints and close (default 10 000). */
  publishIntervalMs?: number;
  /** Delay between a manifest that no longer lists an object and the object's delete (default 60 000). */
  deleteGraceMs?: number;
  /** Sweep for orphans this often, the first time a minute (or the grace period) after open; 0 = never (default 3 600 000). */
  sweepIntervalMs?: number;
  /** Manifests kept besides the newest (default 3). */
  keepManifests?: number;
  /**
   * Reads of segments that are only in S3 fetch aligned ranges of this size with ranged GETs
   * into the cache (default 1 MiB; a divisor of the segment size, else the whole segment).
   */
  fetchBytes?: number;
  /**
   * Bytes fetched ahead when reads move from one fetch range to the next (default 64 MiB, at
   * most half of cacheBytes, so that what is fetched ahead does not push out what comes next;
   * none if that is less than one fetch range): a volume written in order lies in consecutive
   * slots, so a sequential read becomes parallel GETs. 0 turns it off.
   */
  readaheadBytes?: number;
  /** How long `close` waits for uploads and the last publication (default 60 000). */
  closeTimeoutMs?: number;
  /** Take the store over from a holder that looks alive (its lock is overridden; it gets fenced). */
  takeover?: boolean;
}

export interface S3CreateOptions extends S3StoreOptions {
  segmentBytes: number;
  segmentCount: number;
  /** Create the bucket if it does not exist. */
  createBucket?: boolean;
}

/** The S3 client's counters (`failures`: calls that failed after retries), and the store's. */
export interface S3StoreStats extends BucketCounters {
  cacheHits: number;
  cacheMisses: number;
  /** cacheHits / (cacheHits + cacheMisses), for reads of uploaded segments. */
  cacheHitRate: number;
  /** Read-ahead requests made for sequential reads (each for what of one segment in the window is still missing, in zero or more GETs). */
  prefetches: number;
  cachedBytes: number;
  /** The read cache's bound (S3StoreOptions.cacheBytes). */
  cacheLimitBytes: number;
  uploadBacklogSegments: number;
  uploadBacklogBytes: number;
  /** The journal's bound on segments waiting for upload (maxUploadBacklogBytes). */
  uploadBacklogLimitBytes: number;
  uploadRetries: number;
  /** Sealed segments uploaded (one object each). */
  segmentUploads: number;
  /** Open segments' prefixes uploaded by publications. */
  partialUploads: number;
  /** Manifests published (one conditional PUT each). */
  publications: number;
  /** Times this writer found its bucket lock gone after a publication, and put it back. */
  lockRestores: number;
  /** Incomplete multipart uploads of earlier writers that sweep() aborted. */
  uploadsAborted: number;
  lastPublishedSeq: number;
  pendingDeletes: number;
  epoch: number;
  lastError: string | undefined;
  /** After close(): whether the bucket got the final state (else the journal keeps it). */
  closePublished: boolean | undefined;
  /** Set once another writer has taken the store over: why this one stopped (its writes fail). */
  fenced: string | undefined;
}

const CacheManifest = z.object({
  kind: z.literal('pasture-grass-s3-cache'),
  formatVersion: z.literal(MANIFEST_FORMAT_VERSION),
  storeId: z.string(),
  bucket: z.string(),
  prefix: z.string(),
  endpoint: z.string().optional(),
  region: z.string().optional(),
  segmentBytes: z.number().int().min(MIN_SEGMENT_BYTES).max(MAX_SEGMENT_BYTES),
  segmentCount: z.number().int().min(4).max(MAX_SEGMENT_COUNT),
  /** The epoch of the last writer that used this directory. */
  epoch: z.number().int().min(0),
  /** Written before an open claims the next epoch: if that open dies after its claim, the journal is still this store's current one. */
  claimingEpoch: z.number().int().min(0).optional(),
  /**
   * The writer ids of every open that tried to claim an epoch from this directory since the
   * last one that completed, newest last (at most MAX_CLAIMS): the journal is current if the
   * newest manifest is one of theirs, however many opens died after their claims.
   */
  claims: z.array(z.string()).optional(),
  /**
   * Rewritten after each publication, with publishedPartial: a segment of this directory's
   * epoch with a lower incarnation was created before that publication (it lists it, or it was
   * released before), and unless in publishedPartial (listed only as the prefix written so far,
   * being open) was published whole. One with this incarnation or higher was never published.
   */
  publishedIncarnation: z.number().int().min(0).optional(),
  publishedPartial: z.array(z.number().int().min(0)).optional(),
});
export type CacheManifest = z.infer<typeof CacheManifest>;

/** Opens that died after their claims that a journal stays current through (CacheManifest.claims). */
const MAX_CLAIMS = 64;
const MAX_UPLOAD_BACKOFF_MS = 30_000;
/** A sealed journal file has this many bytes past the segment: they mark it sealed. */
const SEALED_MARK_BYTES = 1;
/** How often held-back uploads look again whether they may start. */
const HOLD_RECHECK_MS = 100;
/**
 * Read-ahead requests in flight at once, and the bytes they may ask for together (the first is
 * let through whatever its size). Four 8 MiB ranged GETs at a time took radosgw's data fastest
 * here (742 MiB/s, against 416 with one and 586-670 with 8-16), and more in parallel only made
 * each one arrive later.
 */
const MAX_PREFETCHES_IN_FLIGHT = 16;
/** See sweep: how much earlier than this writer's start an upload must be to be surely not its own. */
const UPLOAD_TIME_SLACK_MS = 2000;
const MAX_PREFETCH_BYTES_IN_FLIGHT = 32 * 1024 * 1024;
/** Fetched copies are made durable at most this long after their fetch (see scheduleNaming). */
const FETCH_SYNC_MAX_DELAY_MS = 30_000;

type SegState = 'open' | 'sealed' | 'cached';

/** One life of one slot: the data Grass wrote there between a write at offset 0 and its release. */
class Seg {
  fh: FileHandle | undefined;
  /** Highest byte written (open) or segmentBytes (sealed). */
  length = 0;
  /** The full object exists in S3. */
  remote = false;
  /** A durable manifest lists the full object. */
  published = false;
  /** The last partial object uploaded for it while open. */
  partial: { key: string; length: number } | undefined;
  released = false;
  dirty = false;
  uploading: Promise<void> | undefined;
  /** When its upload was queued (performance.now()). */
  queuedAt = 0;
  uploadDone: (() => void) | undefined;
  /** While the local file holds only some fetch ranges: which (1 = present). */
  chunks: Uint8Array | undefined;
  presentChunks = 0;
  /** Ranged GETs in flight, by range index. */
  readonly chunkFetches = new Map<number, Promise<void>>();
  /** Creating the local file for fetched ranges. */
  opening: Promise<void> | undefined;
  /** Bytes of the local file counted in the cache's size. */
  cachedBytes = 0;
  /** Reads in flight on fh: close waits for them. */
  readers = 0;
  /** Publications that listed it and have not finished: its local file stays until they do. */
  pins = 0;
  /** A rename of its local file is under way (dropLocal waits). */
  renaming = false;
  /**
   * Fetched whole but not yet made durable: the file keeps its `.chunks` name (so an open after
   * a crash deletes it) until the store is idle, or closes, and it is fsynced and renamed.
   */
  unsynced = false;
  fetchedAt = 0;
  /** Its local file is being closed and unlinked (a new fetch waits). */
  dropping: Promise<void> | undefined;
  lastUse = 0;

  constructor(
    readonly slot: number,
    readonly key: string,
    public state: SegState,
  ) {}

  get local(): boolean {
    return this.fh !== undefined;
  }
}

interface Retired {
  key: string;
  /** The publication count when it was retired: a later publication no longer lists it. */
  snap: number;
  /** Delete at or after this time (set once such a publication is durable). */
  dueAt: number | undefined;
}

type FileState = SegState | 'chunks' | 'tmp';

function fileName(slot: number, key: string, state: FileState): string {
  return `${slot}.${key.slice(SEGMENT_DIR.length)}.${state}`;
}

function parseFileName(name: string): { slot: number; key: string; state: FileState } | undefined {
  const m = /^([0-9]+)\.([0-9a-f]{8}-[0-9a-f]{8})\.(open|sealed|cached|chunks|tmp)$/.exec(name);
  if (m === null) return undefined;
  return { slot: Number(m[1]), key: `${SEGMENT_DIR}${m[2]}`, state: m[3] as FileState };
}

/** The local file's name: a partly fetched (or not yet durable) copy's file says so. */
function localName(seg: Seg): string {
  return fileName(seg.slot, seg.key, seg.chunks !== undefined || seg.unsynced ? 'chunks' : seg.state);
}

/**
 * Run `fn`, keeping the process alive meanwhile. A caller waiting on uploads (drain, a seal
 * held by the journal's bound, the first superblock's publication) may have nothing else
 * that does while S3 is down: the uploads' back-off timers are unref'd, so that an abandoned
 * store does not hold its process. Without this, a process waiting in drain() exited mid-wait.
 */
async function keepingAlive<T>(fn: () => Promise<T>): Promise<T> {
  const timer = setInterval(() => undefined, 1 << 30);
  try {
    return await fn();
  } finally {
    clearInterval(timer);
  }
}

/** Write `bufs` one after another at `position`, all of them (writev may write part). */
async function writevAll(fh: FileHandle, bufs: Uint8Array[], position: number): Promise<void> {
  const total = bufs.reduce((n, b) => n + b.length, 0);
  const { bytesWritten } = await fh.writev(bufs, position);
  if (bytesWritten === total) return;
  const rest = Buffer.concat(bufs).subarray(bytesWritten);
  let done = 0;
  while (done < rest.length) {
    const r = await fh.write(rest, done, rest.length - done, position + bytesWritten + done);
    done += r.bytesWritten;
  }
}

async function writeFileDurably(path: string, data: string | Uint8Array): Promise<void> {
  await writeFile(`${path}.tmp`, data);
  const h = await open(`${path}.tmp`, 'r');
  await h.sync();
  await h.close();
  await rename(`${path}.tmp`, path);
}


export class S3SegmentStore implements SegmentStore {
  private readonly slots: (Seg | undefined)[];
  private readonly superblocks: [Uint8Array | undefined, Uint8Array | undefined] = [undefined, undefined];
  private superblockFile!: FileHandle;
  private readonly dirty = new Set<Seg>();
  /** Reads of the journal and cache files, as the file store makes them. */
  private readonly localReads = new LocalReads();
  /** Every segment holding an open local file (closed by abandon, released or not). */
  private readonly withFiles = new Set<Seg>();
  /** Local steps after uploads (renames, drops) under way: a stop waits for them. */
  private readonly localSteps = new Set<Promise<void>>();
  /** Segments pinned by the publication under way (kept by sweep). */
  private readonly pinned = new Set<Seg>();
  private ownsBucket = false;
  private dirDirty = false;
  private nextIncarnation = 0;
  /** This directory's store.json as last written (set once open has written it). */
  private cacheManifest: CacheManifest | undefined;
  private closed = false;
  private fenced: StoreLockedError | undefined;
  /** Stops the background loops (set by close, after the final publication). */
  private stopping = false;

  // Upload queue.
  private readonly uploadQueue: Seg[] = [];
  private uploadsRunning = 0;
  private backlogBytes = 0;
  private backlogWaiters: (() => void)[] = [];

  // Publication.
  private publishRunning: Promise<void> | undefined;
  private publishQueued: Promise<void> | undefined;
  private snapshots = 0;
  private changedSincePublish = false;
  private lastManifest: Manifest;
  private publishTimer: NodeJS.Timeout | undefined;

  // Deletes.
  private readonly retired: Retired[] = [];
  private deleteTimer: NodeJS.Timeout | undefined;
  private deleting = false;
  private sweepTimer: NodeJS.Timeout | undefined;

  private cachedBytes = 0;
  private useClock = 0;
  private readonly counters = { cacheHits: 0, cacheMisses: 0, uploadRetries: 0, publications: 0, segmentUploads: 0, partialUploads: 0, prefetches: 0, lockRestores: 0, uploadsAborted: 0 };
  private lastError: string | undefined;

  private readonly cacheBytes: number;
  private readonly maxBacklog: number;
  private readonly uploadConcurrency: number;
  private readonly uploadIdleMs: number;
  private readonly cacheSyncIdleMs: number;
  private readonly uploadHoldBytes: number;
  private readonly maxUploadDelayMs: number;
  /** The newest append (performance.now()), for holding uploads back while writes keep coming. */
  private lastAppendAt = -Infinity;
  /** Publications under way: they need their uploads, so nothing is held back meanwhile. */
  private uploadsForced = 0;
  /** When the newest publication started (performance.now()). */
  private lastPublishAt = performance.now();
  /** A publication was put off while uploads were held back. */
  private publishDeferred = false;
  private holdTimer: NodeJS.Timeout | undefined;
  /** Fetched copies not yet durable (Seg.unsynced), and when the last fetch finished. */
  private readonly unsyncedCopies = new Set<Seg>();
  private lastFetchAt = 0;
  private namingTimer: NodeJS.Timeout | undefined;
  /** Aborted when the store stops: ends the uploads' back-off waits (one listener each). */
  private readonly stopped = (() => {
    const c = new AbortController();
    setMaxListeners(0, c.signal);
    return c;
  })();
  private naming: Promise<void> | undefined;
  /** Whether close() published the final state (undefined until a close has run). */
  private closePublished: boolean | undefined;
  /** close() has begun (or the store stopped): no more background naming runs. */
  private closing = false;
  private readonly publishIntervalMs: number;
  private readonly deleteGraceMs: number;
  private readonly keepManifests: number;
  private readonly closeTimeoutMs: number;
  private readonly chunkBytes: number;
  private readonly chunksPerSegment: number;
  private readonly readaheadChunks: number;
  private prefetchesInFlight = 0;
  private prefetchBytesInFlight = 0;
  /** The newest sequential read's range (slot x ranges + range), which read-ahead runs after; -1 before one. */
  private streamPos = -1;
  private readonly sweepIntervalMs: number;
  /** The last few distinct fetch ranges read (as slot x ranges + range), newest last. */
  private readonly recentRanges: number[] = [];
  /** Incarnations whose segment write() is creating (see publishOnce's snapshot). */
  private readonly creating = new Set<number>();
  /**
   * The server's time when this writer was constructed (before it could start an upload), as
   * far as the replies so far tell (see sweep).
   */
  private readonly openedAtServer: number;

  private constructor(
    readonly bucket: Bucket,
    readonly dir: string,
    readonly segmentBytes: number,
    readonly segmentCount: number,
    readonly epoch: number,
    readonly writer: Writer,
    private readonly storeId: string,
    manifest: Manifest,
    options: S3StoreOptions,
  ) {
    this.slots = new Array<Seg | undefined>(segmentCount).fill(undefined);
    this.lastManifest = manifest;
    this.cacheBytes = options.cacheBytes ?? 1 << 30;
    this.maxBacklog = Math.max(options.maxUploadBacklogBytes ?? 4 * 2 ** 30, 2 * segmentBytes);
    this.uploadIdleMs = options.uploadIdleMs ?? 1000;
    this.cacheSyncIdleMs = options.cacheSyncIdleMs ?? 1000;
    this.uploadHoldBytes = Math.min(options.uploadHoldBytes ?? (this.maxBacklog / 4) * 3, this.maxBacklog);
    this.maxUploadDelayMs = options.maxUploadDelayMs ?? 30_000;
    this.uploadConcurrency = options.uploadConcurrency ?? 4;
    this.publishIntervalMs = options.publishIntervalMs ?? 10_000;
    this.deleteGraceMs = options.deleteGraceMs ?? 60_000;
    this.keepManifests = options.keepManifests ?? 3;
    this.closeTimeoutMs = options.closeTimeoutMs ?? 60_000;
    const fetchBytes = options.fetchBytes ?? 1 << 20;
    this.chunkBytes = fetchBytes > 0 && segmentBytes % fetchBytes === 0 ? fetchBytes : segmentBytes;
    this.chunksPerSegment = segmentBytes / this.chunkBytes;
    // At most half the cache: what is fetched ahead must not push out what is fetched next.
    this.readaheadChunks = Math.min(Math.ceil((options.readaheadBytes ?? 64 << 20) / this.chunkBytes), Math.floor(this.cacheBytes / 2 / this.chunkBytes));
    this.sweepIntervalMs = options.sweepIntervalMs ?? 3_600_000;
    this.openedAtServer = bucket.serverNow();
  }

  // =====================================================================================
  // Create and open
  // =====================================================================================

  /** Make a new store under the bucket's prefix (which must hold none) and open it. */
  static async create(options: S3CreateOptions): Promise<S3SegmentStore> {
    checkOptions(options);
    const bucket = options.bucket instanceof Bucket ? options.bucket : new Bucket(options.bucket);
    const { segmentBytes, segmentCount } = options;
    if (!Number.isInteger(segmentBytes) || segmentBytes < MIN_SEGMENT_BYTES || segmentBytes > MAX_SEGMENT_BYTES || segmentBytes % 4096 !== 0) {
      throw new InvalidArgumentError(`segment size must be a multiple of 4096 in [${MIN_SEGMENT_BYTES}, ${MAX_SEGMENT_BYTES}], not ${segmentBytes}`);
    }
    if (!Number.isInteger(segmentCount) || segmentCount < 4 || segmentCount > MAX_SEGMENT_COUNT) {
      throw new InvalidArgumentError(`segment count must be in [4, ${MAX_SEGMENT_COUNT}], not ${segmentCount}`);
    }
    if (options.createBucket === true) await bucket.ensureBucket();
    const existing = await bucket.list(MANIFEST_DIR);
    if (existing.length > 0) throw new InvalidArgumentError(`${bucket.describe()} already holds a Pasture store`);
    try {
      if ((await readdir(options.cacheDir)).length > 0) throw new InvalidArgumentError(`cache directory ${options.cacheDir} is not empty`);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
    const m: Manifest = {
      kind: 'pasture-grass-s3-manifest', formatVersion: MANIFEST_FORMAT_VERSION, storeId: randomBytes(8).toString('hex'),
      seq: 0, epoch: 0, writer: newWriter(), segmentBytes, segmentCount, superblocks: [null, null], entries: [], publishedAt: new Date().toISOString(),
    };
    const r = await createManifest(bucket, m);
    if (r !== 'created' && r.writer.id !== m.writer.id) {
      throw new StoreLockedError(`${bucket.describe()}: another process created a store there at the same time`);
    }
    if (!(options.bucket instanceof Bucket)) bucket.destroy(); // open makes its own client
    return S3SegmentStore.open(options);
  }

  /** The cache directory's record of its bucket, if DIR is an S3 store's cache. */
  static async readCacheManifest(dir: string): Promise<CacheManifest | undefined> {
    let raw: string;
    try {
      raw = await readFile(join(dir, 'store.json'), 'utf8');
    } catch {
      return undefined;
    }
    let json: unknown;
    try {
      json = JSON.parse(raw);
    } catch (e) {
      throw new FormatError(`${join(dir, 'store.json')} is not valid JSON: ${(e as Error).message}`);
    }
    const r = CacheManifest.safeParse(json);
    return r.success ? r.data : undefined;
  }

  /**
   * Open the store: take the local and the bucket's lock, claim the next epoch in the manifest
   * chain, and reconcile the local journal with the bucket (replaying or re-uploading what the
   * journal holds, or starting from the bucket alone when the journal is empty or missing).
   */
  static async open(options: S3StoreOptions): Promise<S3SegmentStore> {
    checkOptions(options);
    const dir = options.cacheDir;
    // What this open creates, an open that fails removes (while still empty): a refused open
    // leaves no half-made cache directory behind.
    const segDir = resolve(dir, 'seg');
    const first = await mkdir(segDir, { recursive: true }); // the first directory it made, if any
    try {
      return await S3SegmentStore.openIn(options, dir);
    } catch (e) {
      if (first !== undefined) {
        await rmdir(segDir).catch(() => undefined);
        if (resolve(first) !== segDir) await rmdir(resolve(dir)).catch(() => undefined); // this open made it too
      }
      throw e;
    }
  }

  private static async openIn(options: S3StoreOptions, dir: string): Promise<S3SegmentStore> {
    const bucket = options.bucket instanceof Bucket ? options.bucket : new Bucket(options.bucket);
    const localLock = join(dir, 'lock');
    await takeLock(localLock);
    const writer = newWriter();
    let lockTaken = false;
    try {
      // --- The bucket's lock: tells a second writer who holds the store. ---
      await takeBucketLock(bucket, writer, options.takeover === true);
      lockTaken = true;

      // --- The newest manifest, then claim the next number with a new epoch. ---
      // A takeover may race the old writer's last publication: read again and claim again.
      let latest: Manifest;
      let claim: Manifest;
      const local = await S3SegmentStore.readCacheManifest(dir);
      for (let attempt = 0; ; attempt++) {
        latest = await readLatestManifest(bucket);
        // Checked before claiming: a wrong --cache-dir must not move the store's epoch.
        if (local !== undefined && (local.storeId !== latest.storeId || local.bucket !== bucket.name || local.prefix !== bucket.prefix)) {
          throw new InvalidArgumentError(`cache directory ${dir} belongs to store ${local.storeId} at s3://${local.bucket}/${local.prefix}, not to ${bucket.describe()} (store ${latest.storeId})`);
        }
        claim = { ...latest, seq: latest.seq + 1, epoch: latest.epoch + 1, writer, publishedAt: new Date().toISOString() };
        if (local !== undefined && journalIsCurrent(local, latest)) {
          const claims = [...(local.claims ?? []).filter((id) => id !== writer.id), writer.id].slice(-MAX_CLAIMS);
          await writeFileDurably(join(dir, 'store.json'), JSON.stringify({ ...local, claimingEpoch: claim.epoch, claims }, null, 2) + '\n');
        }
        const r = await createManifest(bucket, claim);
        if (r === 'created' || r.writer.id === writer.id) break;
        if (options.takeover !== true || attempt >= 4) {
          throw new StoreLockedError(`${bucket.describe()}: another writer (${r.writer.host}, pid ${r.writer.pid}) published while this one was opening`);
        }
      }
      const store = new S3SegmentStore(bucket, dir, latest.segmentBytes, latest.segmentCount, claim.epoch, writer, latest.storeId, claim, options);
      store.ownsBucket = !(options.bucket instanceof Bucket);
      try {
        await store.reconcile(latest, local);
      } catch (e) {
        await store.abandon();
        throw e;
      }
      const cm: CacheManifest = {
        kind: 'pasture-grass-s3-cache', formatVersion: MANIFEST_FORMAT_VERSION, storeId: latest.storeId, bucket: bucket.name, prefix: bucket.prefix,
        segmentBytes: store.segmentBytes, segmentCount: store.segmentCount, epoch: claim.epoch,
        publishedIncarnation: 0, // none of this epoch's segments is published yet
      };
      const opts = options.bucket instanceof Bucket ? undefined : options.bucket;
      if (opts?.endpoint !== undefined) cm.endpoint = opts.endpoint;
      if (opts?.region !== undefined) cm.region = opts.region;
      await writeFileDurably(join(dir, 'store.json'), JSON.stringify(cm, null, 2) + '\n');
      await syncDir(dir);
      store.cacheManifest = cm;
      store.startBackground();
      return store;
    } catch (e) {
      if (lockTaken) await releaseBucketLock(bucket, writer).catch(() => undefined);
      await unlink(localLock).catch(() => undefined);
      if (!(options.bucket instanceof Bucket)) bucket.destroy();
      throw e;
    }
  }

  /** Whether the first `length` bytes of local file `path` are those of object `key`. */
  private async sameAsObject(path: string, key: string, length: number): Promise<boolean> {
    if (!Number.isFinite(length) || length <= 0) return false;
    const local = Buffer.alloc(length);
    const fh = await open(path, 'r');
    try {
      const { bytesRead } = await fh.read(local, 0, length, 0);
      if (bytesRead !== length) return false;
    } finally {
      await fh.close();
    }
    const remote = await this.bucket.get(key, { offset: 0, length });
    return remote !== undefined && remote.length === length && Buffer.compare(local, Buffer.from(remote.buffer, remote.byteOffset, remote.byteLength)) === 0;
  }

  /** Build the slot table from the journal and the newest manifest. */
  private async reconcile(latest: Manifest, local: CacheManifest | undefined): Promise<void> {
    const segDir = join(this.dir, 'seg');
    let useJournal = local !== undefined;
    const files = (await readdir(segDir)).map((n) => ({ name: n, parsed: parseFileName(n) }));
    if (local !== undefined && !journalIsCurrent(local, latest)) {
      // Someone else has opened the store since this directory's writer. The journal can only
      // be dropped if the bucket already has everything in it.
      const listedKeys = new Map(latest.entries.map((e) => [segmentKeyOf(e.key), e]));
      const unsent: string[] = [];
      for (const f of files) {
        const p = f.parsed;
        if (p === undefined) continue;
        // A `.cached` file is unsent if its writer created it after its last publication (see
        // publishedIncarnation) and the manifest does not list it. Others may be copies of
        // segments that were published and then released by the writer that took over.
        // (Directories from before publishedIncarnation: `.cached` files are not counted, as before.)
        const inc = incarnationOfKey(p.key)!;
        const ownUpload = p.state === 'cached' && local.publishedIncarnation !== undefined && epochOfKey(p.key) === local.epoch &&
          (inc >= local.publishedIncarnation || (local.publishedPartial ?? []).includes(inc));
        if (p.state !== 'open' && p.state !== 'sealed' && !ownUpload) continue;
        const e = listedKeys.get(p.key);
        const size = (await stat(join(segDir, f.name)).catch(() => ({ size: Infinity }))).size;
        let sent = e !== undefined && (e.sealed || (p.state === 'open' && e.length >= Math.min(size, this.segmentBytes)));
        // Listed sealed under this key need not mean these bytes: a writer that opened from
        // the bucket alone inherits an open segment at its published prefix and seals it under
        // the same key. What this file holds past that prefix reached no object, so compare.
        if (sent && e!.sealed && e!.key === p.key) sent = await this.sameAsObject(join(segDir, f.name), p.key, Math.min(size, this.segmentBytes));
        if (!sent) unsent.push(f.name);
      }
      if (unsent.length > 0) {
        throw new StoreLockedError(
          `cache directory ${this.dir} holds ${unsent.length} segments that never reached ${this.bucket.describe()}, and ${latest.writer.host} ` +
          `(pid ${latest.writer.pid}) has written the store since; move the directory away to open the store as the bucket has it`,
        );
      }
      useJournal = false;
    }
    if (!useJournal) {
      for (const f of files) await unlink(join(segDir, f.name));
      await rm(join(this.dir, 'superblock'), { force: true });
      files.length = 0;
    }

    // Superblocks: the journal's if it has them, else the manifest's.
    this.superblockFile = await open(join(this.dir, 'superblock'), 'a+').then(async (h) => {
      await h.close();
      return open(join(this.dir, 'superblock'), 'r+');
    });
    const sbBuf = Buffer.alloc(2 * SUPERBLOCK_BYTES);
    const { bytesRead } = await this.superblockFile.read(sbBuf, 0, sbBuf.length, 0);
    if (bytesRead === sbBuf.length && !sbBuf.every((b) => b === 0)) {
      for (const i of [0, 1] as const) {
        const s = sbBuf.subarray(i * SUPERBLOCK_BYTES, (i + 1) * SUPERBLOCK_BYTES);
        this.superblocks[i] = s.every((b) => b === 0) ? undefined : new Uint8Array(s);
      }
    } else {
      for (const i of [0, 1] as const) {
        const b64 = latest.superblocks[i];
        this.superblocks[i] = b64 === null ? undefined : new Uint8Array(Buffer.from(b64, 'base64'));
      }
      const out = Buffer.alloc(2 * SUPERBLOCK_BYTES);
      for (const i of [0, 1] as const) if (this.superblocks[i] !== undefined) out.set(this.superblocks[i]!, i * SUPERBLOCK_BYTES);
      await this.superblockFile.write(out, 0, out.length, 0);
      await this.superblockFile.datasync();
    }

    // Journal files: the newest life of each slot wins; older ones are leftovers of releases.
    const newest = new Map<number, { name: string; key: string; state: SegState }>();
    for (const f of files) {
      const p = f.parsed;
      // Partly fetched files are dropped: which ranges they hold was kept in memory only.
      if (p === undefined || p.state === 'tmp' || p.state === 'chunks' || p.slot >= this.segmentCount) {
        await unlink(join(segDir, f.name));
        continue;
      }
      const cur = newest.get(p.slot);
      if (cur === undefined || cur.key < p.key) {
        if (cur !== undefined) await unlink(join(segDir, cur.name));
        newest.set(p.slot, { name: f.name, key: p.key, state: p.state as SegState });
      } else {
        await unlink(join(segDir, f.name));
      }
    }
    const listed = new Map(latest.entries.map((e) => [e.slot, e]));
    for (const [slot, f] of newest) {
      const e = listed.get(slot);
      const path = join(segDir, f.name);
      // The manifest holds a newer life of this slot: the journal's file is a leftover of a
      // release (an upload that was skipped, or an unlink lost in a crash).
      if (e !== undefined && segmentKeyOf(e.key) > f.key) {
        await unlink(path);
        continue;
      }
      const fh = await open(path, 'r+');
      const size = (await fh.stat()).size;
      const listedWhole = e !== undefined && e.key === f.key && e.sealed;
      if (f.state === 'cached' && size < this.segmentBytes && listedWhole) {
        await fh.close(); // a cached copy cut short (a crash): S3 has the whole object
        await unlink(path);
        continue;
      }
      if (f.state === 'open' && size > this.segmentBytes) {
        // Only a seal makes a journal file longer than a segment (SEALED_MARK_BYTES): a crash
        // lost its rename, whose directory sync seal leaves to the next sync(). A file just
        // segmentBytes long is not sealed: Grass's footer write ends there, before its seal.
        await rename(path, join(segDir, fileName(slot, f.key, 'sealed')));
        f.state = 'sealed';
        this.dirDirty = true;
      }
      const seg = new Seg(slot, f.key, f.state);
      this.setFile(seg, fh);
      if (listedWhole) {
        seg.remote = true;
        seg.published = true;
      }
      if (f.state === 'open') {
        seg.length = Math.min(size, this.segmentBytes);
        if (e !== undefined && !e.sealed && segmentKeyOf(e.key) === f.key) seg.partial = { key: e.key, length: e.length };
      } else {
        seg.length = this.segmentBytes;
        if (size < this.segmentBytes) await fh.truncate(this.segmentBytes);
      }
      // Uploaded but never published: the object may be gone (a sweep), so upload it again.
      if (seg.state === 'cached' && !seg.remote) await this.renameLocal(seg, 'sealed');
      if (seg.state === 'sealed' && seg.remote) await this.renameLocal(seg, 'cached');
      if (seg.state === 'cached') {
        seg.cachedBytes = this.segmentBytes;
        this.cachedBytes += this.segmentBytes;
      }
      this.slots[slot] = seg;
    }
    // The manifest's segments that the journal does not hold.
    for (const e of latest.entries) {
      const have = this.slots[e.slot];
      if (have !== undefined) {
        if (e.key !== have.key && e.key !== have.partial?.key) this.retire({ key: e.key });
        continue;
      }
      if (useJournal && !e.sealed) {
        // The journal dropped this open segment (released, or never synced): not needed.
        this.retire({ key: e.key });
        continue;
      }
      const base = segmentKeyOf(e.key);
      const seg = new Seg(e.slot, base, e.sealed ? 'cached' : 'open');
      if (e.sealed) {
        seg.remote = true;
        seg.published = true;
        seg.length = this.segmentBytes;
      } else {
        // An open segment from the bucket alone: its prefix becomes the journal's open file.
        const bytes = await this.bucket.get(e.key);
        if (bytes === undefined || bytes.length !== e.length) throw new FormatError(`${this.bucket.describe()}: manifest ${latest.seq} lists ${e.key} (${e.length} B) but S3 has ${bytes === undefined ? 'no such object' : `${bytes.length} B`}`);
        const path = join(segDir, fileName(e.slot, base, 'open'));
        await writeFile(path, bytes);
        const fh = await open(path, 'r+');
        this.setFile(seg, fh);
        await fh.datasync();
        seg.length = e.length;
        seg.partial = { key: e.key, length: e.length };
        this.dirDirty = true;
      }
      this.slots[e.slot] = seg;
    }
    if (this.dirDirty) {
      await syncDir(segDir);
      this.dirDirty = false;
    }
    for (const seg of this.slots) {
      if (seg !== undefined && seg.state === 'sealed') this.queueUpload(seg);
    }
    this.changedSincePublish = true;
  }

  private startBackground(): void {
    if (this.publishIntervalMs > 0) {
      this.publishTimer = setInterval(() => {
        if (this.changedSincePublish && this.publishQueued === undefined) this.publishUnlessHeld();
      }, this.publishIntervalMs);
      this.publishTimer.unref();
    }
    this.deleteTimer = setInterval(() => void this.runDeletes(), Math.max(200, Math.min(5000, this.deleteGraceMs / 4)));
    this.deleteTimer.unref();
    if (this.sweepIntervalMs > 0) {
      const sweep = (): void => {
        this.sweep().catch((e: unknown) => (this.lastError = `sweep: ${(e as Error).message}`));
      };
      this.sweepTimer = setTimeout(() => {
        sweep();
        this.sweepTimer = setInterval(sweep, this.sweepIntervalMs);
        this.sweepTimer.unref();
      }, Math.max(60_000, this.deleteGraceMs));
      this.sweepTimer.unref();
    }
  }

  // =====================================================================================
  // SegmentStore
  // =====================================================================================

  describe(): string {
    return `${this.bucket.describe()} (cache ${this.dir}; ${this.segmentCount} x ${this.segmentBytes} B)`;
  }

  private live(): void {
    if (this.closed) throw new ClosedError(`S3 segment store ${this.bucket.describe()} is closed`);
    if (this.fenced !== undefined) throw this.fenced;
  }

  private segDir(): string {
    return join(this.dir, 'seg');
  }

  async write(segment: number, offset: number, data: Uint8Array): Promise<void> {
    this.live();
    checkRange(this, segment, offset, data.length);
    let seg = this.slots[segment];
    if (offset === 0) {
      // A write at offset 0 starts a new life of the slot (the contract: a reused slot was released).
      if (seg !== undefined) this.retireSeg(seg);
      const incarnation = this.nextIncarnation++;
      seg = new Seg(segment, segmentKey(this.epoch, incarnation), 'open');
      // Until it is in its slot, a publication's snapshot must not count it as published.
      this.creating.add(incarnation);
      try {
        this.setFile(seg, await open(join(this.segDir(), fileName(segment, seg.key, 'open')), 'w+'));
        this.slots[segment] = seg;
      } finally {
        this.creating.delete(incarnation);
      }
      this.dirDirty = true;
    } else if (seg === undefined || seg.state !== 'open' || seg.fh === undefined) {
      throw new InvalidArgumentError(`write to segment ${segment} at ${offset}: the segment is not open (${seg?.state ?? 'empty'})`);
    }
    let done = 0;
    while (done < data.length) {
      const { bytesWritten } = await seg.fh!.write(data, done, data.length - done, offset + done);
      if (bytesWritten <= 0) throw new Error(`short write to the journal of segment ${segment}`);
      done += bytesWritten;
    }
    seg.length = Math.max(seg.length, offset + data.length);
    this.lastAppendAt = performance.now();
    seg.dirty = true;
    this.dirty.add(seg);
    this.changedSincePublish = true;
  }

  async sync(): Promise<void> {
    this.live();
    const segs = [...this.dirty];
    this.dirty.clear();
    await Promise.all(segs.map(async (s) => {
      if (s.fh !== undefined) await s.fh.datasync();
      s.dirty = false;
    }));
    if (this.dirDirty) {
      this.dirDirty = false;
      await syncDir(this.segDir());
    }
  }

  async seal(segment: number): Promise<void> {
    this.live();
    checkRange(this, segment, 0, 0);
    const seg = this.slots[segment];
    if (seg === undefined || seg.state !== 'open' || seg.fh === undefined) throw new InvalidArgumentError(`seal of segment ${segment}, which is not open`);
    // A full-length file, so that reads and the upload see the unwritten middle as zeros, and
    // one byte more, durable with the datasync, which marks it sealed (see open()).
    await seg.fh.truncate(this.segmentBytes + SEALED_MARK_BYTES);
    await seg.fh.datasync();
    this.dirty.delete(seg);
    seg.dirty = false;
    seg.length = this.segmentBytes;
    // The new name is made durable by the next sync(): a crash that loses it leaves an open
    // file longer than a segment, which open() takes as sealed (only a seal makes one).
    await this.renameLocal(seg, 'sealed');
    this.dirDirty = true;
    this.changedSincePublish = true;
    this.queueUpload(seg);
    // Backpressure: the journal absorbs bursts, but an S3 that cannot keep up (or is down)
    // must slow writers down rather than fill the local disk.
    if (this.backlogBytes > this.maxBacklog) {
      await keepingAlive(async () => {
        while (this.backlogBytes > this.maxBacklog && !this.closed && this.fenced === undefined) {
          await new Promise<void>((r) => this.backlogWaiters.push(r));
        }
      });
    }
    this.live();
  }

  async read(segment: number, offset: number, length: number): Promise<Uint8Array> {
    this.live();
    checkRange(this, segment, offset, length);
    const seg = this.slots[segment];
    if (seg === undefined || length === 0) return Buffer.alloc(length);
    this.noteRead(segment * this.chunksPerSegment + Math.floor(offset / this.chunkBytes));
    seg.readers++; // keeps the local file from eviction until this read is done
    try {
      if (seg.fh === undefined || seg.chunks !== undefined) {
        let fetched: boolean;
        try {
          fetched = await this.ensureRange(seg, offset, length);
        } catch (e) {
          // Released while its fetch was being set up (a read racing a release): its object
          // stays until the next publication and the grace period, so read the range from it.
          if (!seg.released) throw e;
          this.counters.cacheMisses++;
          const bytes = await this.bucket.get(seg.key, { offset, length });
          if (bytes === undefined || bytes.length !== length) throw e;
          return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
        }
        if (fetched) this.counters.cacheMisses++;
        else this.counters.cacheHits++;
      } else if (seg.state === 'cached') {
        this.counters.cacheHits++;
      }
      const fh = seg.fh;
      if (fh === undefined) throw new Error(`segment ${segment} has no local copy after its fetch`);
      seg.lastUse = ++this.useClock;
      // Allocated only now, not before a fetch: an array that waits out a GET outlives young
      // collections, and then only a full one frees it. Not zeroed: every byte is read, or
      // zero-filled past the end of a short file.
      return await this.localReads.read(fh, Buffer.allocUnsafe(length), offset);
    } finally {
      seg.readers--;
      if (seg.readers === 0 && seg.released) await this.dropLocal(seg);
    }
  }

  async release(segment: number): Promise<void> {
    this.live();
    checkRange(this, segment, 0, 0);
    const seg = this.slots[segment];
    if (seg !== undefined) this.retireSeg(seg);
  }

  async readSuperblock(slot: 0 | 1): Promise<Uint8Array | undefined> {
    this.live();
    const s = this.superblocks[slot];
    return s === undefined ? undefined : new Uint8Array(s);
  }

  async writeSuperblock(slot: 0 | 1, data: Uint8Array): Promise<void> {
    this.live();
    if (data.length !== SUPERBLOCK_BYTES) throw new RangeError('superblock must be SUPERBLOCK_BYTES long');
    await this.superblockFile.write(data, 0, SUPERBLOCK_BYTES, slot * SUPERBLOCK_BYTES);
    await this.superblockFile.datasync();
    this.superblocks[slot] = new Uint8Array(data);
    this.changedSincePublish = true;
    if (this.lastManifest.superblocks.every((b) => b === null)) {
      // The first format: until a manifest holds a superblock, the bucket alone opens no store
      // at all ("never formatted"), so Grass's create returns only once one does. (Published
      // in the background, a machine lost 16 ms after create left such a bucket: the crash
      // simulator, seed 10668.)
      try {
        await keepingAlive(() => this.publish());
      } catch (e) {
        // Not in the bucket, so not formatted: undone here too, so that create can be tried
        // again (else it would find this superblock and refuse: "already holds a Grass store").
        this.superblocks[slot] = undefined;
        await this.superblockFile.write(Buffer.alloc(SUPERBLOCK_BYTES), 0, SUPERBLOCK_BYTES, slot * SUPERBLOCK_BYTES).catch(() => undefined);
        await this.superblockFile.datasync().catch(() => undefined);
        throw e;
      }
      return;
    }
    // A checkpoint is a good moment for the bucket to catch up; it happens in the background.
    this.publishUnlessHeld();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    // Let the uploads finish and publish the final state, within a bound: with S3 down, the
    // journal keeps everything and the next open uploads it.
    if (this.fenced === undefined) {
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<'timeout'>((r) => (timer = setTimeout(() => r('timeout'), this.closeTimeoutMs)));
      const drained = (async (): Promise<void> => {
        this.changedSincePublish = true;
        await this.publish();
      })();
      const r = await Promise.race([drained.then(() => 'ok' as const, (e: unknown) => e), timeout]);
      clearTimeout(timer);
      this.closePublished = r === 'ok';
      if (r !== 'ok') this.lastError = r === 'timeout' ? `close: S3 did not take the final state within ${this.closeTimeoutMs} ms; the journal keeps it` : String((r as Error).message ?? r);
      if (r === 'ok') await this.runDeletes();
    }
    // Fetched copies stay in the cache for the next open once they are durable.
    this.closing = true;
    clearTimeout(this.namingTimer);
    await this.naming;
    await this.nameFetchedCopies([...this.unsyncedCopies]);
    await this.abandon();
  }

  /**
   * For tests: stop as a killed process would, without publishing or uploading, and leave the
   * locks as the dead process's (removed, as the stale-lock check would find them).
   */
  async simulateCrash(): Promise<void> {
    this.stopping = true;
    this.closed = true;
    this.closing = true;
    this.stopUploads(); // uploads waiting to retry: a dead process retries nothing
    // A dead process sends nothing more: let requests already sent land (or fail) first.
    await this.publishRunning?.catch(() => undefined);
    await releaseBucketLock(this.bucket, this.writer).catch(() => undefined);
    this.fenced ??= new StoreLockedError('crashed');
    await this.abandon();
  }

  /** Stop everything and let go of local and bucket locks, without publishing. */
  private async abandon(): Promise<void> {
    this.closed = true;
    this.closing = true;
    this.stopping = true;
    clearInterval(this.publishTimer);
    clearTimeout(this.holdTimer);
    clearTimeout(this.namingTimer);
    clearInterval(this.deleteTimer);
    clearInterval(this.sweepTimer);
    this.stopUploads();
    await Promise.allSettled([...this.localSteps]);
    for (const seg of [...this.withFiles]) {
      const fh = seg.fh;
      seg.fh = undefined;
      this.withFiles.delete(seg);
      await fh?.close().catch(() => undefined);
    }
    await this.superblockFile?.close().catch(() => undefined);
    if (this.fenced === undefined) await releaseBucketLock(this.bucket, this.writer).catch(() => undefined);
    await unlink(join(this.dir, 'lock')).catch(() => undefined);
    if (this.ownsBucket) this.bucket.destroy();
  }

  /** No more uploads (stopped or fenced): end their back-offs, let their waiters go. */
  private stopUploads(): void {
    this.stopped.abort();
    for (const w of this.backlogWaiters.splice(0)) w();
    for (const seg of this.uploadQueue) seg.uploadDone?.(); // never started: never will
  }

  private setFile(seg: Seg, fh: FileHandle): void {
    seg.fh = fh;
    this.withFiles.add(seg);
  }

  // =====================================================================================
  // Uploads
  // =====================================================================================

  private queueUpload(seg: Seg): void {
    this.backlogBytes += this.segmentBytes;
    seg.queuedAt = performance.now();
    seg.uploading = new Promise<void>((r) => (seg.uploadDone = r));
    this.uploadQueue.push(seg);
    this.pumpUploads();
  }

  /**
   * Uploads are held back (see S3StoreOptions.uploadIdleMs): writes came within the idle time,
   * the backlog is under its hold bound, nothing has waited too long, and no publication,
   * drain or close needs them.
   */
  private uploadsHeld(): boolean {
    return this.writesBusy() && this.uploadsForced === 0 && this.backlogBytes < this.uploadHoldBytes;
  }

  /**
   * Writes keep coming and nothing has waited too long: periodic and checkpoint publications
   * wait, even once the backlog is past the hold bound. Then uploads run only as fast as the
   * backlog grows; a publication would upload all of it at once, in the middle of the burst.
   */
  private writesBusy(): boolean {
    if (this.uploadIdleMs <= 0 || this.stopping || this.fenced !== undefined) return false;
    const now = performance.now();
    if (now - this.lastAppendAt >= this.uploadIdleMs) return false;
    const oldest = this.uploadQueue[0];
    return oldest === undefined || now - oldest.queuedAt < this.maxUploadDelayMs;
  }

  /** A publication now, or once uploads are no longer held back (it would wait for them). */
  private publishUnlessHeld(): void {
    // Not the first one with a superblock: until it lands, the bucket alone opens no store.
    // Nor one more than maxUploadDelayMs after the last: the bucket's lag stays bounded even
    // when uploads keep pace with the writes (then nothing waits long, and writes never pause).
    const due = performance.now() - this.lastPublishAt >= this.maxUploadDelayMs;
    if (this.writesBusy() && !due && this.lastManifest.superblocks.some((b) => b !== null)) {
      this.publishDeferred = true;
      this.recheckHold();
      return;
    }
    this.publishDeferred = false;
    this.publish().catch(() => undefined);
  }

  private recheckHold(): void {
    if (this.holdTimer !== undefined || this.closed) return;
    this.holdTimer = setTimeout(() => {
      this.holdTimer = undefined;
      this.pumpUploads();
    }, HOLD_RECHECK_MS);
    this.holdTimer.unref();
  }

  private pumpUploads(): void {
    if (this.publishDeferred && !this.closed) this.publishUnlessHeld();
    if (this.uploadsHeld()) {
      if (this.uploadQueue.length > 0) this.recheckHold();
      return;
    }
    while (this.uploadsRunning < this.uploadConcurrency && this.uploadQueue.length > 0) {
      const seg = this.uploadQueue.shift()!;
      this.uploadsRunning++;
      void this.uploadOne(seg).finally(() => {
        this.uploadsRunning--;
        this.pumpUploads();
      });
    }
  }

  /**
   * Upload one sealed segment, retrying with backoff until it succeeds or the store stops (or
   * is fenced). Either way, whoever waits on `seg.uploading` is let go: a publication then
   * sees that the segment is not in S3 and fails. (Left waiting, a drain() during an outage
   * never returned once close() had given up, and kept its process alive for ever.)
   */
  private async uploadOne(seg: Seg): Promise<void> {
    try {
      await this.uploadUntilDone(seg);
    } finally {
      if (!seg.remote) seg.uploadDone?.();
    }
  }

  private async uploadUntilDone(seg: Seg): Promise<void> {
    let attempt = 0;
    const finish = (): void => {
      this.backlogBytes -= this.segmentBytes;
      for (const w of this.backlogWaiters.splice(0)) w();
      seg.uploadDone?.();
    };
    while (!this.stopping && this.fenced === undefined) {
      // Released, and no publication under way lists it: nothing needs it; skip the upload.
      if (seg.released && seg.pins === 0) {
        finish();
        await this.dropLocal(seg);
        return;
      }
      try {
        const fh = seg.fh;
        if (fh === undefined) throw new Error(`the journal file of segment ${seg.key} is gone`);
        // Not zeroed: the read below must fill it all, or the upload is refused.
        const body = Buffer.allocUnsafe(this.segmentBytes);
        seg.readers++;
        try {
          const { bytesRead } = await fh.read(body, 0, this.segmentBytes, 0);
          if (bytesRead !== this.segmentBytes) throw new Error(`journal file of segment ${seg.slot} has ${bytesRead} of ${this.segmentBytes} bytes`);
        } finally {
          seg.readers--;
        }
        if (this.fenced !== undefined) return;
        if (seg.released && seg.pins === 0) continue;
        await this.bucket.put(seg.key, body);
        this.counters.segmentUploads++;
        seg.remote = true;
        finish();
        // A store that stopped while the PUT was under way (a crash, or a close that gave up
        // waiting) leaves its journal alone: another instance may have opened it since.
        if (this.stopping) return;
        const local = this.afterUpload(seg);
        this.localSteps.add(local);
        await local.finally(() => this.localSteps.delete(local));
        return;
      } catch (e) {
        if (this.stopping) return;
        this.lastError = `upload of ${seg.key}: ${(e as Error).message}`;
        this.counters.uploadRetries++;
        attempt++;
        // Unref'd (an abandoned store does not keep its process alive; drain() does, while it
        // waits), and cut short when the store stops or is fenced.
        await sleep(Math.random() * Math.min(MAX_UPLOAD_BACKOFF_MS, 250 * 2 ** Math.min(attempt, 10)), undefined, { signal: this.stopped.signal, ref: false }).catch(() => undefined);
      }
    }
  }

  /**
   * The local steps after a segment's object landed. Not retried with the PUT: a rename that
   * fails leaves a `.sealed` file whose object is listed, which the next open takes as cached.
   */
  private async afterUpload(seg: Seg): Promise<void> {
    try {
      if (seg.partial !== undefined) {
        this.retire({ key: seg.partial.key });
        seg.partial = undefined;
      }
      if (seg.released) {
        this.retire({ key: seg.key });
        await this.dropLocal(seg);
        return;
      }
      await this.renameLocal(seg, 'cached');
      if (!seg.released && seg.fh !== undefined) {
        seg.cachedBytes = this.segmentBytes;
        this.cachedBytes += this.segmentBytes;
        this.evict();
      }
    } catch (e) {
      this.lastError = `segment ${seg.key} is in S3, but its journal file could not be renamed: ${(e as Error).message}`;
    }
  }

  private async renameLocal(seg: Seg, state: SegState): Promise<void> {
    seg.renaming = true;
    try {
      await rename(join(this.segDir(), fileName(seg.slot, seg.key, seg.state)), join(this.segDir(), fileName(seg.slot, seg.key, state)));
      seg.state = state;
    } finally {
      seg.renaming = false;
    }
    if (seg.released && seg.pins === 0 && seg.readers === 0) await this.dropLocal(seg);
  }

  // =====================================================================================
  // Reads from S3 and the cache
  // =====================================================================================

  /** A read of range `pos` (slot x ranges + range): after a read of pos-1, fetch ahead. */
  private noteRead(pos: number): void {
    const recent = this.recentRanges;
    if (recent[recent.length - 1] === pos) return;
    // Cow's node reads interleave with data reads, so look a few ranges back, not one.
    if (this.readaheadChunks > 0 && recent.includes(pos - 1)) {
      this.streamPos = pos;
      this.readAhead();
    }
    const i = recent.indexOf(pos);
    if (i >= 0) recent.splice(i, 1);
    recent.push(pos);
    if (recent.length > 8) recent.shift();
  }

  /**
   * Keep the window after the newest sequential read fetched: one request per segment, nearest
   * first, a bounded number at once, the next one started as each finishes. A steady stream in
   * order, so that the range the reader needs next arrives first. (Fetching half the window at
   * once, as parallel GETs, made them all arrive late, and the reader waited at every step.)
   */
  private readAhead(): void {
    const pos = this.streamPos;
    if (pos < 0 || this.closed) return;
    const end = Math.min(pos + this.readaheadChunks, this.segmentCount * this.chunksPerSegment - 1);
    // As the window slides one range per read, its far end would become one small GET per
    // step: a run is fetched once it reaches its segment's end or is half the window long.
    const minRun = Math.min(this.chunksPerSegment, Math.ceil(this.readaheadChunks / 2));
    let p = pos + 1;
    while (p <= end && this.prefetchesInFlight < MAX_PREFETCHES_IN_FLIGHT) {
      if (!this.rangeMissing(p)) {
        p++;
        continue;
      }
      const slot = Math.floor(p / this.chunksPerSegment);
      const first = p % this.chunksPerSegment;
      const last = Math.min(this.chunksPerSegment - 1, first + (end - p));
      if (last < this.chunksPerSegment - 1 && last - first + 1 < minRun && this.prefetchesInFlight > 0) return;
      p += last - first + 1;
      const seg = this.slots[slot];
      if (seg === undefined || (seg.fh !== undefined && seg.chunks === undefined) || seg.released) continue;
      const bytes = (last - first + 1) * this.chunkBytes;
      if (this.prefetchesInFlight > 0 && this.prefetchBytesInFlight + bytes > MAX_PREFETCH_BYTES_IN_FLIGHT) return;
      this.counters.prefetches++;
      this.prefetchesInFlight++;
      this.prefetchBytesInFlight += bytes;
      // The next request when this one is in; after a failure, only at the next read.
      const done = (ok: boolean): void => {
        this.prefetchesInFlight--;
        this.prefetchBytesInFlight -= bytes;
        // Not over the cache's bound: what it fetched would push out what it fetched before,
        // and the stream would fetch that again, for ever, without a read.
        if (ok && this.cachedBytes <= this.cacheBytes) this.readAhead();
      };
      this.ensureRange(seg, first * this.chunkBytes, bytes).then(() => done(true), () => done(false));
    }
  }

  /** True if range `pos` (slot x ranges + range) is in S3 only, and no fetch of it is under way. */
  private rangeMissing(pos: number): boolean {
    const seg = this.slots[Math.floor(pos / this.chunksPerSegment)];
    if (seg === undefined || seg.released) return false;
    if (seg.fh !== undefined && seg.chunks === undefined) return false;
    const c = pos % this.chunksPerSegment;
    if (seg.chunkFetches.has(c)) return false;
    return seg.chunks === undefined || seg.chunks[c] === 0;
  }

  /**
   * Make [offset, offset + length) of a segment that is only (or partly) local: fetch its
   * missing ranges with ranged GETs, sharing fetches already in flight. True if any was missing.
   */
  private async ensureRange(seg: Seg, offset: number, length: number): Promise<boolean> {
    if (seg.fh !== undefined && seg.chunks === undefined) return false;
    if (seg.fh === undefined) await this.openChunkFile(seg);
    const first = Math.floor(offset / this.chunkBytes);
    const last = Math.floor((offset + length - 1) / this.chunkBytes);
    const waits: Promise<void>[] = [];
    for (let c = first; c <= last && seg.chunks !== undefined; c++) {
      if (seg.chunks[c] === 1) continue;
      if (!seg.chunkFetches.has(c)) {
        let end = c;
        while (end < last && seg.chunks[end + 1] === 0 && !seg.chunkFetches.has(end + 1)) end++;
        // Its failures reach the waiters through each range's promise.
        this.fetchChunks(seg, c, end).catch(() => undefined);
      }
      waits.push(seg.chunkFetches.get(c)!);
    }
    if (waits.length === 0) return false;
    await Promise.all(waits);
    return true;
  }

  private openChunkFile(seg: Seg): Promise<void> {
    seg.opening ??= (async () => {
      if (seg.dropping !== undefined) await seg.dropping;
      const path = join(this.segDir(), fileName(seg.slot, seg.key, 'chunks'));
      const fh = await open(path, 'w+');
      await fh.truncate(this.segmentBytes);
      if (seg.released || this.closed) {
        await fh.close();
        await unlink(path).catch(() => undefined);
        throw new ClosedError(`segment ${seg.key} was released while being fetched`);
      }
      seg.chunks = new Uint8Array(this.chunksPerSegment);
      seg.presentChunks = 0;
      seg.state = 'cached';
      this.setFile(seg, fh);
    })().finally(() => {
      seg.opening = undefined;
    });
    return seg.opening;
  }

  /**
   * One ranged GET for ranges [a, b] of `seg`, written into its local file as it arrives.
   * Each range's promise in `seg.chunkFetches` settles as soon as that range is in the file,
   * so a reader waits for its own range, not for the rest of a large read-ahead GET.
   */
  private fetchChunks(seg: Seg, a: number, b: number): Promise<void> {
    const offset = a * this.chunkBytes;
    const length = (b - a + 1) * this.chunkBytes;
    const arrivals: { resolve: () => void; reject: (e: unknown) => void }[] = [];
    for (let c = a; c <= b; c++) {
      const arrived = new Promise<void>((resolve, reject) => arrivals.push({ resolve, reject }));
      seg.chunkFetches.set(c, arrived);
      const done = (): void => {
        if (seg.chunkFetches.get(c) === arrived) seg.chunkFetches.delete(c);
      };
      arrived.then(done, done);
    }
    const fh = seg.fh;
    let next = a; // the first range whose promise has not settled
    /** Ranges up to `c` are in the file: count them cached and let their readers go. */
    const arrivedThrough = (c: number): void => {
      this.lastFetchAt = performance.now();
      for (; next <= c; next++) {
        if (seg.fh === fh && seg.chunks !== undefined && seg.chunks[next] === 0) {
          seg.chunks[next] = 1;
          seg.presentChunks++;
          seg.cachedBytes += this.chunkBytes;
          this.cachedBytes += this.chunkBytes;
        }
        arrivals[next - a]!.resolve();
      }
    };
    const p = (async () => {
      if (fh === undefined) return arrivedThrough(b); // dropped meanwhile: the readers find out
      // The body's chunks (64 KiB) are held until they complete a range, then written in one
      // call: a write per chunk cost more main-thread time than the rest of the fetch.
      let held: Uint8Array[] = [];
      let heldFrom = 0;
      const got = await this.bucket.getInto(seg.key, { offset, length }, async (chunk, at) => {
        if (seg.fh !== fh) return;
        held.push(chunk);
        const end = at + chunk.length;
        if (Math.floor(end / this.chunkBytes) === Math.floor(heldFrom / this.chunkBytes)) return;
        await writevAll(fh, held, offset + heldFrom);
        held = [];
        heldFrom = end;
        arrivedThrough(a + Math.floor(end / this.chunkBytes) - 1);
      });
      if (got === undefined) throw new FormatError(`${this.bucket.describe()}: segment object ${seg.key} (slot ${seg.slot}) is missing`);
      if (got !== length) throw new FormatError(`${this.bucket.describe()}: segment object ${seg.key} gave ${got} bytes at ${offset}, expected ${length}`);
      arrivedThrough(b);
      if (seg.fh !== fh || seg.chunks === undefined) return; // dropped meanwhile
      seg.lastUse = ++this.useClock;
      if (seg.presentChunks === this.chunksPerSegment) {
        // Whole: readable as a cached segment at once; made durable and renamed so once
        // fetches pause (see nameFetchedCopies).
        seg.chunks = undefined;
        seg.unsynced = true;
        seg.fetchedAt = performance.now();
        this.unsyncedCopies.add(seg);
        this.scheduleNaming();
      }
      this.evict(seg);
    })();
    p.catch((e: unknown) => {
      for (; next <= b; next++) arrivals[next - a]!.reject(e);
    });
    return p;
  }

  /**
   * Fetched copies become `.cached` (which open trusts) only once they are durable, and their
   * fdatasyncs wait until fetches pause for cacheSyncIdleMs, or a copy has waited
   * FETCH_SYNC_MAX_DELAY_MS, or the store closes: a cold sequential read then does not pay
   * for a flush of each segment it fetches (about 10% of its speed, paired runs of a
   * throwaway script: the flushes' writeback competes with the fetches for the CPU). A crash
   * before then costs only the copies, which the next open deletes as partly fetched files.
   */
  private scheduleNaming(): void {
    // One run at a time: the run's end schedules the next.
    if (this.namingTimer !== undefined || this.naming !== undefined || this.closing || this.unsyncedCopies.size === 0) return;
    const oldest = this.unsyncedCopies.values().next().value!.fetchedAt; // (added in fetch order)
    const now = performance.now();
    const wait = Math.max(0, Math.min(this.lastFetchAt + this.cacheSyncIdleMs - now, oldest + FETCH_SYNC_MAX_DELAY_MS - now));
    this.namingTimer = setTimeout(() => {
      this.namingTimer = undefined;
      if (this.closing) return;
      const t = performance.now();
      const due = [...this.unsyncedCopies].filter((s) => t - this.lastFetchAt >= this.cacheSyncIdleMs || t - s.fetchedAt >= FETCH_SYNC_MAX_DELAY_MS);
      if (due.length === 0) return this.scheduleNaming();
      this.naming = this.nameFetchedCopies(due).finally(() => {
        this.naming = undefined;
        this.scheduleNaming();
      });
    }, wait);
    this.namingTimer.unref();
  }

  /** Make fetched copies durable and give them their `.cached` names, one at a time. */
  private async nameFetchedCopies(segs: Seg[]): Promise<void> {
    for (const seg of segs) {
      if (this.closed) return; // (a crash, simulated: nothing more reaches the disk)
      if (!this.unsyncedCopies.delete(seg)) continue;
      const fh = seg.fh;
      if (fh === undefined || !seg.unsynced) continue;
      const from = join(this.segDir(), localName(seg));
      seg.renaming = true;
      try {
        await fh.datasync();
        if (seg.fh === fh) {
          await rename(from, join(this.segDir(), fileName(seg.slot, seg.key, seg.state)));
          seg.unsynced = false;
        }
      } catch (e) {
        // It keeps its .chunks name: the next open deletes it, and a read fetches it again.
        if (!this.closed) this.lastError = `naming the fetched copy of ${seg.key} cached: ${(e as Error).message}`;
      } finally {
        seg.renaming = false;
      }
      if (seg.released && seg.readers === 0) await this.dropLocal(seg);
    }
    this.evict();
  }

  /** Drop least recently used cached copies over the bound (only published ones: the journal must not forget a segment the bucket's manifest lacks). */
  private evict(keep?: Seg): void {
    if (this.cachedBytes <= this.cacheBytes) return;
    const candidates = this.slots.filter((s): s is Seg => s !== undefined && s !== keep && s.state === 'cached' && s.fh !== undefined && s.published && s.readers === 0 && s.chunkFetches.size === 0);
    candidates.sort((a, b) => a.lastUse - b.lastUse);
    for (const s of candidates) {
      if (this.cachedBytes <= this.cacheBytes) break;
      void this.dropLocal(s);
    }
  }

  private async dropLocal(seg: Seg): Promise<void> {
    // Not while a read, a publication or a rename uses the file, nor before the upload of a
    // sealed segment that is still live (a released one is not needed any more).
    if (seg.fh === undefined || seg.readers > 0 || seg.pins > 0 || seg.renaming || (seg.state === 'sealed' && !seg.remote && !seg.released)) return;
    const fh = seg.fh;
    const name = localName(seg);
    seg.fh = undefined;
    this.withFiles.delete(seg);
    seg.chunks = undefined;
    seg.unsynced = false;
    this.unsyncedCopies.delete(seg);
    this.cachedBytes -= seg.cachedBytes;
    seg.cachedBytes = 0;
    const done = (async () => {
      await unlink(join(this.segDir(), name)).catch(() => undefined);
      await fh.close().catch(() => undefined);
    })();
    seg.dropping = done;
    await done;
    if (seg.dropping === done) seg.dropping = undefined;
  }

  // =====================================================================================
  // Release, publication, deletes
  // =====================================================================================

  /** A life of a slot is over: its local copy goes now, its objects after the next publication. */
  private retireSeg(seg: Seg): void {
    seg.released = true;
    if (this.slots[seg.slot] === seg) this.slots[seg.slot] = undefined;
    this.dirty.delete(seg);
    this.changedSincePublish = true;
    if (seg.partial !== undefined) this.retire({ key: seg.partial.key });
    if (seg.state === 'sealed' && !seg.remote) {
      // Not uploaded yet: nothing will need it, unless a publication under way lists it (then
      // its upload finishes and retires it). Otherwise the upload is skipped.
      if (seg.pins === 0) void this.dropLocal(seg);
      return;
    }
    if (seg.remote) this.retire({ key: seg.key });
    void this.dropLocal(seg);
  }

  private retire(r: { key: string }): void {
    this.retired.push({ key: r.key, snap: this.snapshots, dueAt: undefined });
  }

  /**
   * Make the bucket hold the current state: wait for the uploads it needs, upload the open
   * segments' written prefixes, then create the next manifest. Concurrent callers share one.
   */
  publish(): Promise<void> {
    if (this.publishQueued !== undefined) return this.publishQueued;
    const after = this.publishRunning ?? Promise.resolve();
    const p = after.catch(() => undefined).then(() => {
      this.publishQueued = undefined;
      // A publication waits for the uploads it lists: none is held back meanwhile.
      this.publishDeferred = false;
      this.lastPublishAt = performance.now();
      this.uploadsForced++;
      this.pumpUploads();
      const run = this.publishOnce().finally(() => this.uploadsForced--);
      this.publishRunning = run;
      return run.finally(() => {
        if (this.publishRunning === run) this.publishRunning = undefined;
      });
    });
    this.publishQueued = p;
    return p;
  }

  private async publishOnce(): Promise<void> {
    if (this.fenced !== undefined) throw this.fenced;
    const snap = ++this.snapshots;
    // Incarnations below this one are in the snapshot or gone; one whose segment write() is
    // still creating is not in a slot yet, so the bound stops before it.
    const incarnationAtSnap = this.creating.size === 0 ? this.nextIncarnation : Math.min(...this.creating);
    this.changedSincePublish = false;
    const superblocks: [string | null, string | null] = [
      this.superblocks[0] === undefined ? null : Buffer.from(this.superblocks[0]).toString('base64'),
      this.superblocks[1] === undefined ? null : Buffer.from(this.superblocks[1]).toString('base64'),
    ];
    const segs = this.slots.filter((s): s is Seg => s !== undefined);
    // The snapshot: these segments as they are now. Pinned, so that a segment released or
    // rewritten meanwhile keeps its local file until this publication has what it needs.
    for (const seg of segs) {
      seg.pins++;
      this.pinned.add(seg);
    }
    const entries: ManifestEntry[] = [];
    try {
      for (const seg of segs) {
        if (seg.state === 'open') {
          if (seg.fh === undefined) throw new Error(`open segment ${seg.key} has no journal file`);
          if (seg.partial === undefined || seg.partial.length !== seg.length) {
            const length = seg.length;
            const body = Buffer.alloc(length);
            await seg.fh.read(body, 0, length, 0);
            const key = partialKey(seg.key, length);
            if (this.stopping) throw new ClosedError(`S3 segment store ${this.bucket.describe()} stopped before publishing`);
            await this.bucket.put(key, body);
            this.counters.partialUploads++;
            if (seg.partial !== undefined) this.retire({ key: seg.partial.key });
            if (seg.state === 'open' && !seg.released) {
              seg.partial = { key, length };
            } else {
              this.retire({ key }); // sealed or released meanwhile: listed here, then superseded
            }
            if (seg.state === 'open' || seg.released) {
              entries.push({ slot: seg.slot, key, length, sealed: false });
              continue;
            }
          } else if (seg.state === 'open') {
            entries.push({ slot: seg.slot, key: seg.partial.key, length: seg.partial.length, sealed: false });
            continue;
          }
        }
        if (!seg.remote) await seg.uploading;
        if (!seg.remote) throw this.fenced ?? new ClosedError(`store closed before segment ${seg.key} reached S3`);
        entries.push({ slot: seg.slot, key: seg.key, length: this.segmentBytes, sealed: true });
      }
    } finally {
      for (const seg of segs) {
        seg.pins--;
        if (seg.pins === 0) this.pinned.delete(seg);
      }
      for (const seg of segs) if (seg.pins === 0 && seg.released && seg.readers === 0) await this.dropLocal(seg);
    }
    entries.sort((a, b) => a.slot - b.slot);
    if (this.stopping) throw new ClosedError(`S3 segment store ${this.bucket.describe()} stopped before publishing`);
    const m: Manifest = {
      ...this.lastManifest, seq: this.lastManifest.seq + 1, epoch: this.epoch, writer: this.writer, superblocks, entries, publishedAt: new Date().toISOString(),
    };
    for (;;) {
      const r = await createManifest(this.bucket, m);
      if (r === 'created') break;
      if (r.writer.id === this.writer.id) {
        // An earlier publication of ours landed although it reported failure: it is durable,
        // so it is the chain's head; publish after it.
        this.lastManifest = r;
        m.seq = r.seq + 1;
        continue;
      }
      this.fence(r);
    }
    // A writer that was paused past a takeover may find its number free again (old manifests
    // are deleted): any manifest after ours means someone else owns the store.
    await this.checkHead(m.seq);
    // Not once the store is stopping: close may have given up on this publication and let the
    // lock go, and a lock put back now would outlive the store. A restore that raced the stop
    // is undone.
    if (!this.stopping && (await restoreBucketLock(this.bucket, this.writer).catch(() => false))) {
      this.counters.lockRestores++;
      if (this.stopping) await releaseBucketLock(this.bucket, this.writer).catch(() => undefined);
    }
    this.lastManifest = m;
    this.counters.publications++;
    // A segment of this epoch that was open is listed only as its prefix so far: its later
    // bytes may reach S3 with its upload, and no publication after.
    const partial = entries.filter((e) => !e.sealed && epochOfKey(e.key) === this.epoch).map((e) => incarnationOfKey(e.key)!).sort((a, b) => a - b);
    await this.notePublished(incarnationAtSnap, partial);
    const listed = new Set(entries.filter((e) => e.sealed).map((e) => e.key));
    for (const seg of segs) if (listed.has(seg.key)) seg.published = true;
    const now = Date.now();
    for (const r of this.retired) if (r.dueAt === undefined && r.snap < snap) r.dueAt = now + this.deleteGraceMs;
    const old = m.seq - this.keepManifests - 1;
    if (old >= 0) this.retired.push({ key: manifestKey(old), snap: 0, dueAt: now + this.deleteGraceMs });
    this.evict();
  }

  /**
   * Record in store.json how far this writer's segments are published (publishedIncarnation),
   * for an open of this directory after another writer has used the store. Best effort: without
   * it, that open counts more of this directory's copies as never published, and refuses.
   */
  private async notePublished(incarnation: number, partial: number[]): Promise<void> {
    const cm = this.cacheManifest;
    // A store that stopped meanwhile (a close that gave up) leaves the directory alone.
    if (cm === undefined || this.stopping) return;
    if (cm.publishedIncarnation === incarnation && JSON.stringify(cm.publishedPartial ?? []) === JSON.stringify(partial)) return;
    const next = { ...cm, publishedIncarnation: incarnation, publishedPartial: partial };
    try {
      await writeFileDurably(join(this.dir, 'store.json'), JSON.stringify(next, null, 2) + '\n');
      this.cacheManifest = next;
    } catch (e) {
      this.lastError = `store.json: ${(e as Error).message}`;
    }
  }

  /** Stop as a writer that was taken over: no more publications, deletes or writes. */
  private fence(winner: Manifest | undefined): never {
    const who = winner !== undefined ? `${winner.writer.host} (pid ${winner.writer.pid}, epoch ${winner.epoch})` : 'another writer';
    this.fenced = new StoreLockedError(`${this.bucket.describe()} was taken over by ${who}; this writer stopped, and its unpublished writes stay in ${this.dir}`);
    this.stopUploads();
    throw this.fenced;
  }

  /**
   * Fence this writer if a manifest after `seq` exists that another writer published. The
   * newest one may be this writer's own: a sweep's check races a publication that has put its
   * manifest and not yet made it lastManifest.
   */
  private async checkHead(seq: number): Promise<void> {
    const newer = (await this.bucket.list(MANIFEST_DIR)).map((o) => manifestSeqOf(o.key)).filter((n): n is number => n !== undefined && n > seq);
    if (newer.length === 0) return;
    // A failed GET is not a takeover: it fails this check (the sweep or publication is tried
    // again later). Nor is a manifest gone between the listing and the GET.
    const newest = Math.max(...newer);
    const raw = await this.bucket.get(manifestKey(newest));
    if (raw === undefined) throw new Error(`${this.bucket.describe()}: manifest ${newest} was listed but is gone; checking again later`);
    const decoded = decodeManifest(raw);
    const winner = typeof decoded === 'string' ? undefined : decoded;
    if (winner?.writer.id === this.writer.id) return;
    this.fence(winner);
  }

  private async runDeletes(): Promise<void> {
    if (this.deleting || this.fenced !== undefined) return;
    this.deleting = true;
    try {
      const now = Date.now();
      // A safety net: never delete what the newest durable manifest lists.
      const listed = new Set(this.lastManifest.entries.map((e) => e.key));
      for (const r of this.retired) {
        if (r.dueAt !== undefined && listed.has(r.key)) {
          r.dueAt = undefined;
          r.snap = this.snapshots;
        }
      }
      const due = this.retired.filter((r) => r.dueAt !== undefined && r.dueAt <= now);
      if (due.length === 0) return;
      await this.bucket.delete(due.map((r) => r.key));
      const done = new Set(due);
      for (let i = this.retired.length - 1; i >= 0; i--) if (done.has(this.retired[i]!)) this.retired.splice(i, 1);
    } catch (e) {
      this.lastError = `delete: ${(e as Error).message}`;
    } finally {
      this.deleting = false;
    }
  }

  /**
   * Delete objects no manifest or live writer needs: segment objects of earlier epochs that the
   * newest manifest does not list and this writer does not hold, older than the grace period.
   * Abort the multipart uploads of earlier epochs that a crash left incomplete, started before
   * the grace period (an earlier epoch's writer is fenced: its uploads can never complete into
   * anything a manifest lists, and their parts stay stored until aborted). Returns the keys
   * deleted, then `KEY (upload ID)` for each upload aborted.
   */
  async sweep(): Promise<string[]> {
    this.live();
    const objects = await this.bucket.list(SEGMENT_DIR);
    // In the server's clock, which set LastModified: a skewed local clock must not shorten the grace.
    const cutoff = this.bucket.serverNow() - this.deleteGraceMs;
    const candidates: string[] = [];
    for (const o of objects) {
      const epoch = epochOfKey(o.key);
      if (epoch === undefined || epoch >= this.epoch) continue;
      if (o.modified !== undefined && o.modified.getTime() > cutoff) continue;
      candidates.push(o.key);
    }
    // Check the chain once more: a writer that was taken over must not sweep.
    await this.checkHead(this.lastManifest.seq);
    // What is needed now, after the listing (uploads, publications and releases went on).
    const keep = new Set<string>(this.lastManifest.entries.map((e) => e.key));
    for (const seg of [...this.slots, ...this.pinned, ...this.uploadQueue]) {
      if (seg === undefined) continue;
      keep.add(seg.key);
      if (seg.partial !== undefined) keep.add(seg.partial.key);
    }
    for (const r of this.retired) keep.add(r.key);
    // A partial of a held segment is kept too, whatever its length: a publication running now
    // may upload it again under the same key and list it before its key reaches seg.partial.
    const heldSegments = new Set<string>();
    for (const seg of [...this.slots, ...this.pinned, ...this.uploadQueue]) if (seg !== undefined) heldSegments.add(seg.key);
    const doomed = candidates.filter((k) => !keep.has(k) && !heldSegments.has(segmentKeyOf(k)));
    // Manifests older than the ones kept.
    for (const o of await this.bucket.list(MANIFEST_DIR)) {
      const seq = manifestSeqOf(o.key);
      if (seq !== undefined && seq < this.lastManifest.seq - this.keepManifests && !this.retired.some((r) => r.key === o.key)) doomed.push(o.key);
    }
    if (doomed.length > 0) await this.bucket.delete(doomed);
    // Incomplete multipart uploads. This writer uploads keys of earlier epochs too (the sealed
    // segments its journal kept from before a restart), so its own uploads in flight are left
    // alone. So are uploads of keys it holds that may be its own: one it started after the
    // listing was asked for is not yet in uploadsInFlight when the listing's reply comes. An
    // upload of such a key that began before this writer existed is a dead writer's (a crash
    // in the middle of uploading the segment this writer then uploaded again): kept for ever
    // otherwise, as the key stays listed, it is aborted. The slack covers the 1 s resolution
    // of both the server's Date header and the upload's time.
    const aborted: string[] = [];
    let failure: unknown;
    const startedBeforeThisWriter = this.openedAtServer - UPLOAD_TIME_SLACK_MS;
    for (const u of await this.bucket.listUploads(SEGMENT_DIR)) {
      const epoch = epochOfKey(u.key);
      if (epoch === undefined || epoch >= this.epoch || this.bucket.uploadsInFlight.has(u.uploadId)) continue;
      if (u.initiated === undefined || u.initiated.getTime() > cutoff) continue;
      if (keep.has(u.key) && u.initiated.getTime() >= startedBeforeThisWriter) continue;
      try {
        await this.bucket.abortUpload(u.key, u.uploadId);
        aborted.push(`${u.key} (upload ${u.uploadId})`);
      } catch (e) {
        failure ??= e;
      }
    }
    this.counters.uploadsAborted += aborted.length;
    if (failure !== undefined) throw failure;
    return [...doomed, ...aborted];
  }

  /**
   * Check the bucket against the newest manifest: every object it lists must exist with the
   * listed length. Objects it does not list are counted (waiting for deletion, or orphans).
   */
  async checkBucket(): Promise<{ manifestSeq: number; listed: number; problems: string[]; unlisted: number }> {
    const m = this.lastManifest;
    const objects = new Map((await this.bucket.list(SEGMENT_DIR)).map((o) => [o.key, o.size]));
    const problems: string[] = [];
    for (const e of m.entries) {
      const size = objects.get(e.key);
      if (size === undefined) problems.push(`manifest ${m.seq} lists ${e.key} for slot ${e.slot}, which is not in the bucket`);
      else if (size !== e.length) problems.push(`manifest ${m.seq} lists ${e.key} with ${e.length} bytes; the bucket has ${size}`);
    }
    const listed = new Set(m.entries.map((e) => e.key));
    let unlisted = 0;
    for (const k of objects.keys()) if (!listed.has(k)) unlisted++;
    return { manifestSeq: m.seq, listed: m.entries.length, problems, unlisted };
  }

  /** Wait until every sealed segment has reached S3 and the current state is published. */
  async drain(): Promise<void> {
    this.changedSincePublish = true;
    await keepingAlive(() => this.publish());
  }

  stats(): S3StoreStats {
    return {
      ...this.bucket.counters,
      cacheHits: this.counters.cacheHits, cacheMisses: this.counters.cacheMisses,
      cacheHitRate: this.counters.cacheHits + this.counters.cacheMisses === 0 ? 1 : this.counters.cacheHits / (this.counters.cacheHits + this.counters.cacheMisses),
      prefetches: this.counters.prefetches, cachedBytes: this.cachedBytes, cacheLimitBytes: this.cacheBytes,
      uploadBacklogSegments: Math.round(this.backlogBytes / this.segmentBytes), uploadBacklogBytes: this.backlogBytes,
      uploadBacklogLimitBytes: this.maxBacklog,
      uploadRetries: this.counters.uploadRetries, segmentUploads: this.counters.segmentUploads, partialUploads: this.counters.partialUploads,
      publications: this.counters.publications, lockRestores: this.counters.lockRestores, uploadsAborted: this.counters.uploadsAborted, lastPublishedSeq: this.lastManifest.seq,
      pendingDeletes: this.retired.length, epoch: this.epoch, lastError: this.lastError, closePublished: this.closePublished,
      fenced: this.closed && this.fenced?.message === 'crashed' ? undefined : this.fenced?.message,
    };
  }

  /** The manifest last made durable. */
  get manifest(): Manifest {
    return this.lastManifest;
  }

  /** Local files (for tests). */
  async journalFiles(): Promise<string[]> {
    return (await readdir(this.segDir())).sort();
  }
}

/** Sizes and times are whole and not negative: a size that overflowed (1 << 31 is negative in JavaScript) must not empty the cache. */
function checkOptions(options: S3StoreOptions): void {
  for (const k of ['cacheBytes', 'maxUploadBacklogBytes', 'uploadHoldBytes', 'uploadIdleMs', 'cacheSyncIdleMs', 'maxUploadDelayMs', 'fetchBytes', 'readaheadBytes', 'publishIntervalMs', 'deleteGraceMs'] as const) {
    const v = options[k];
    if (v !== undefined && !(Number.isSafeInteger(v) && v >= 0)) throw new InvalidArgumentError(`S3 store option ${k} must be a whole number >= 0, got ${v}`);
  }
}

/**
 * Whether a cache directory's journal is the store's current state: its last writer is the
 * newest manifest's, or the newest manifest is the claim of an open from this directory that
 * died before it completed. (Directories written before `claims` existed record only the
 * last such open's epoch.)
 */
function journalIsCurrent(local: CacheManifest, latest: Manifest): boolean {
  if (latest.epoch === local.epoch) return true;
  if (local.claims !== undefined) return local.claims.includes(latest.writer.id);
  return latest.epoch === local.claimingEpoch;
}

function newWriter(): Writer {
  return { host: hostname(), pid: process.pid, id: randomBytes(8).toString('hex'), since: new Date().toISOString() };
}

/**
 * Create manifest `m` if its number is free. 'created', or the manifest that holds the number
 * (which may be this writer's own, from an attempt that landed although it reported failure).
 */
async function createManifest(bucket: Bucket, m: Manifest): Promise<Manifest | 'created'> {
  if (await bucket.putIfAbsent(manifestKey(m.seq), encodeManifest(m))) return 'created';
  const raw = await bucket.get(manifestKey(m.seq));
  const other = raw === undefined ? 'vanished' : decodeManifest(raw);
  if (typeof other === 'string') throw new FormatError(`${bucket.describe()}: manifest ${m.seq} exists but cannot be read: ${other}`);
  return other;
}

async function readLatestManifest(bucket: Bucket): Promise<Manifest> {
  const keys = (await bucket.list(MANIFEST_DIR)).map((o) => manifestSeqOf(o.key)).filter((s): s is number => s !== undefined).sort((a, b) => b - a);
  if (keys.length === 0) throw new InvalidArgumentError(`${bucket.describe()} holds no Pasture store; create one with 'pasture init --store ${bucket.describe()} --cache-dir DIR'`);
  // The newest readable one; a list can race a creation, so read until a key is missing.
  let seq = keys[0]!;
  for (;;) {
    const next = await bucket.get(manifestKey(seq + 1));
    if (next === undefined) break;
    seq++;
  }
  const bytes = await bucket.get(manifestKey(seq));
  if (bytes === undefined) throw new FormatError(`${bucket.describe()}: manifest ${seq} vanished while being read`);
  const m = decodeManifest(bytes);
  if (typeof m === 'string') throw new FormatError(`${bucket.describe()}: manifest ${seq} is not valid: ${m}`);
  return m;
}

async function takeBucketLock(bucket: Bucket, writer: Writer, takeover: boolean): Promise<void> {
  const me: LockRecord = { host: writer.host, pid: writer.pid, since: writer.since, writer: writer.id };
  const body = new TextEncoder().encode(JSON.stringify(me) + '\n');
  for (let attempt = 0; attempt < 3; attempt++) {
    if (await bucket.putIfAbsent(LOCK_KEY, body)) return;
    const raw = await bucket.get(LOCK_KEY);
    if (raw === undefined) continue;
    let holder: LockRecord | undefined;
    try {
      const r = LockRecord.safeParse(JSON.parse(new TextDecoder().decode(raw)));
      holder = r.success ? r.data : undefined;
    } catch {
      holder = undefined;
    }
    const stale = holder !== undefined && holder.host === writer.host && holder.pid !== process.pid && !pidAlive(holder.pid);
    if (stale || takeover) {
      await bucket.delete([LOCK_KEY]);
      continue;
    }
    const who = holder === undefined ? 'a writer whose lock is unreadable' : `process ${holder.pid} on ${holder.host} since ${holder.since}`;
    throw new StoreLockedError(`${bucket.describe()} is in use by ${who}; if that writer is gone for good, open with takeover (pasture: --takeover)`);
  }
  throw new StoreLockedError(`${bucket.describe()}: could not take the store's lock`);
}

/**
 * Put this writer's lock back if it is gone. Taking and releasing the lock read it, then
 * delete it without a condition (S3 servers differ on conditional deletes), so a delete
 * that was slow, or that a paused process sent late, can remove the next writer's lock;
 * without this, a plain open (no takeover) would then be let in, and fence the live
 * writer. Checked after each publication: the lock is missing for at most that long.
 */
async function restoreBucketLock(bucket: Bucket, writer: Writer): Promise<boolean> {
  if ((await bucket.get(LOCK_KEY)) !== undefined) return false;
  const me: LockRecord = { host: writer.host, pid: writer.pid, since: writer.since, writer: writer.id };
  return bucket.putIfAbsent(LOCK_KEY, new TextEncoder().encode(JSON.stringify(me) + '\n'));
}

async function releaseBucketLock(bucket: Bucket, writer: Writer): Promise<void> {
  const raw = await bucket.get(LOCK_KEY);
  if (raw === undefined) return;
  try {
    const r = LockRecord.safeParse(JSON.parse(new TextDecoder().decode(raw)));
    if (r.success && r.data.writer !== writer.id) return; // someone else's now
  } catch {
    return;
  }
  await bucket.delete([LOCK_KEY]);
}

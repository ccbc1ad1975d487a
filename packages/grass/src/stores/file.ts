/**
 * FileSegmentStore: the embedded default. A directory holding
 *
 *   store.json   geometry and format version (validated with zod when read)
 *   segments     one sparse file of segmentCount x segmentBytes; segment s at s*segmentBytes
 *   superblock   two SUPERBLOCK_BYTES slots
 *   lock         {pid, host, since} of the process that holds the store
 *
 * Durability: `sync` and `seal` are fdatasync(2) of `segments`; `writeSuperblock` is a
 * positioned write plus fdatasync of `superblock`. Files are created once, at `create`, and
 * the directory is fsynced then, so later syncs need no directory sync.
 */
import { open, mkdir, readFile, writeFile, unlink, rename, readdir, link } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { setTimeout as sleep } from 'node:timers/promises';
import type { FileHandle } from 'node:fs/promises';
import { hostname } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { z } from 'zod';
import { checkRange, type SegmentStore } from '../segment-store.ts';
import { LocalReads } from './local-reads.ts';
import { FORMAT_VERSION, MAX_SEGMENT_BYTES, MAX_SEGMENT_COUNT, MIN_SEGMENT_BYTES, SUPERBLOCK_BYTES } from '../format.ts';
import { FormatError, InvalidArgumentError, StoreLockedError } from '../errors.ts';

const StoreManifest = z.object({
  kind: z.literal('pasture-grass-file-store'),
  formatVersion: z.literal(FORMAT_VERSION),
  segmentBytes: z.number().int().min(MIN_SEGMENT_BYTES).max(MAX_SEGMENT_BYTES),
  segmentCount: z.number().int().min(4).max(MAX_SEGMENT_COUNT),
  createdAt: z.string(),
});
type StoreManifest = z.infer<typeof StoreManifest>;

/** `token`: unique to one takeLock call, so that it knows its own lock from another of this process's. */
const LockFile = z.object({ pid: z.number().int(), host: z.string(), since: z.string(), token: z.string().optional() });

export interface FileStoreOptions {
  segmentBytes: number;
  segmentCount: number;
}

export class FileSegmentStore implements SegmentStore {
  private closed = false;
  /** How records are read (synchronously while the page cache hits; see LocalReads). */
  readonly reads = new LocalReads();

  private constructor(
    readonly dir: string,
    readonly segmentBytes: number,
    readonly segmentCount: number,
    private readonly segments: FileHandle,
    private readonly superblock: FileHandle,
    private readonly lockPath: string,
  ) {}

  /** True if `dir` holds a file store. */
  static async exists(dir: string): Promise<boolean> {
    try {
      await readFile(join(dir, 'store.json'));
      return true;
    } catch {
      return false;
    }
  }

  /** Make a new, empty store in `dir` (created if missing; must not already hold a store). */
  static async create(dir: string, options: FileStoreOptions): Promise<FileSegmentStore> {
    const manifest: StoreManifest = {
      kind: 'pasture-grass-file-store',
      formatVersion: FORMAT_VERSION,
      segmentBytes: options.segmentBytes,
      segmentCount: options.segmentCount,
      createdAt: new Date().toISOString(),
    };
    const parsed = StoreManifest.safeParse(manifest);
    if (!parsed.success) throw new InvalidArgumentError(`bad store geometry: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
    await mkdir(dir, { recursive: true });
    if (await FileSegmentStore.exists(dir)) throw new InvalidArgumentError(`${dir} already holds a Pasture store`);
    const seg = await open(join(dir, 'segments'), 'w');
    await seg.truncate(options.segmentBytes * options.segmentCount);
    await seg.sync();
    await seg.close();
    const sb = await open(join(dir, 'superblock'), 'w');
    await sb.truncate(2 * SUPERBLOCK_BYTES);
    await sb.sync();
    await sb.close();
    // store.json last, via rename: its presence means the store is complete.
    await writeFile(join(dir, 'store.json.tmp'), JSON.stringify(manifest, null, 2) + '\n');
    const tmp = await open(join(dir, 'store.json.tmp'), 'r');
    await tmp.sync();
    await tmp.close();
    await rename(join(dir, 'store.json.tmp'), join(dir, 'store.json'));
    await syncDir(dir);
    return FileSegmentStore.open(dir);
  }

  /** Open an existing store and take its lock. */
  static async open(dir: string): Promise<FileSegmentStore> {
    let raw: string;
    try {
      raw = await readFile(join(dir, 'store.json'), 'utf8');
    } catch {
      throw new InvalidArgumentError(`${dir} holds no Pasture store (no store.json); create one with 'pasture init'`);
    }
    let json: unknown;
    try {
      json = JSON.parse(raw);
    } catch (e) {
      throw new FormatError(`${join(dir, 'store.json')} is not valid JSON: ${(e as Error).message}`);
    }
    const parsed = StoreManifest.safeParse(json);
    if (!parsed.success) throw new FormatError(`${join(dir, 'store.json')} is not a store manifest this version understands: ${parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}`);
    const m = parsed.data;
    const lockPath = join(dir, 'lock');
    await takeLock(lockPath);
    try {
      const segments = await open(join(dir, 'segments'), 'r+');
      const superblock = await open(join(dir, 'superblock'), 'r+');
      const st = await segments.stat();
      if (st.size < m.segmentBytes * m.segmentCount) {
        await segments.close();
        await superblock.close();
        throw new FormatError(`${join(dir, 'segments')} is ${st.size} bytes, expected ${m.segmentBytes * m.segmentCount}`);
      }
      return new FileSegmentStore(dir, m.segmentBytes, m.segmentCount, segments, superblock, lockPath);
    } catch (e) {
      await unlink(lockPath).catch(() => undefined);
      throw e;
    }
  }

  describe(): string {
    return `file:${this.dir} (${this.segmentCount} x ${this.segmentBytes} B)`;
  }

  private live(): void {
    if (this.closed) throw new Error(`file segment store ${this.dir} is closed`);
  }

  async write(segment: number, offset: number, data: Uint8Array): Promise<void> {
    this.live();
    checkRange(this, segment, offset, data.length);
    let done = 0;
    const base = segment * this.segmentBytes + offset;
    while (done < data.length) {
      const { bytesWritten } = await this.segments.write(data, done, data.length - done, base + done);
      if (bytesWritten <= 0) throw new Error(`short write to ${this.dir}/segments at ${base + done}`);
      done += bytesWritten;
    }
  }

  async sync(): Promise<void> {
    this.live();
    await this.segments.datasync();
  }

  async seal(segment: number): Promise<void> {
    this.live();
    checkRange(this, segment, 0, 0);
    await this.segments.datasync();
  }

  async read(segment: number, offset: number, length: number): Promise<Uint8Array> {
    this.live();
    checkRange(this, segment, offset, length);
    return this.reads.read(this.segments, Buffer.allocUnsafe(length), segment * this.segmentBytes + offset);
  }

  async release(segment: number): Promise<void> {
    this.live();
    checkRange(this, segment, 0, 0);
    // Node has no fallocate(PUNCH_HOLE); the space is simply rewritten when the slot is reused.
  }

  async readSuperblock(slot: 0 | 1): Promise<Uint8Array | undefined> {
    this.live();
    const buf = Buffer.alloc(SUPERBLOCK_BYTES);
    const { bytesRead } = await this.superblock.read(buf, 0, SUPERBLOCK_BYTES, slot * SUPERBLOCK_BYTES);
    if (bytesRead < SUPERBLOCK_BYTES || buf.every((b) => b === 0)) return undefined;
    return buf;
  }

  async writeSuperblock(slot: 0 | 1, data: Uint8Array): Promise<void> {
    this.live();
    if (data.length !== SUPERBLOCK_BYTES) throw new RangeError('superblock must be SUPERBLOCK_BYTES long');
    // Whole or an error: a short write taken for done would leave recovery on the older
    // superblock while the caller frees what only the newer one still needed.
    let done = 0;
    while (done < SUPERBLOCK_BYTES) {
      const { bytesWritten } = await this.superblock.write(data, done, SUPERBLOCK_BYTES - done, slot * SUPERBLOCK_BYTES + done);
      if (bytesWritten <= 0) throw new Error(`short write to ${this.dir}/superblock at ${slot * SUPERBLOCK_BYTES + done}`);
      done += bytesWritten;
    }
    await this.superblock.datasync();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.segments.close();
    await this.superblock.close();
    await unlink(this.lockPath).catch(() => undefined);
  }
}

/** fsync a directory, so that entries created or renamed in it are durable. */
export async function syncDir(dir: string): Promise<void> {
  const h = await open(dir, 'r');
  try {
    await h.sync();
  } finally {
    await h.close();
  }
}

/** True if a process with this pid exists on this host. */
export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Take the store's lock file, or explain who holds it. A lock left by a dead process on this
 * host is stale and is taken over; a lock from another host is never broken automatically.
 *
 * The lock appears whole or not at all: its contents go to a temporary file that is then
 * hard-linked into place (link fails if the name exists), so no one reads a half-written
 * lock. Taking over a stale lock is check-then-replace, so the processes that found the same
 * stale holder are serialized by a guard named after it (see replaceStale).
 */
export async function takeLock(lockPath: string): Promise<void> {
  const me = { pid: process.pid, host: hostname(), since: new Date().toISOString(), token: randomBytes(8).toString('hex') };
  const text = JSON.stringify(me) + '\n';
  for (let attempt = 0; attempt < 50; attempt++) {
    if (await createWhole(lockPath, text)) return await removeTakeoverGuards(lockPath);
    const holder = await readLock(lockPath);
    if (holder === 'gone') continue;
    if (holder !== undefined && isStale(holder)) {
      await replaceStale(lockPath, holder, text, 0);
      continue; // taken (the next createWhole fails, and readLock names this process), or lost to another
    }
    if (holder === undefined) {
      throw new StoreLockedError(`store is locked by ${lockPath}, whose contents are unreadable; remove it if no process uses the store`);
    }
    if (holder.token === me.token) return await removeTakeoverGuards(lockPath); // its own, from replaceStale
    const who = holder.pid === process.pid && holder.host === me.host ? 'this process' : `process ${holder.pid} on ${holder.host}`;
    throw new StoreLockedError(`store is in use by ${who} since ${holder.since} (lock file ${lockPath})`);
  }
  throw new StoreLockedError(`could not take the lock ${lockPath}`);
}

/** Held by a process of this host that is gone (never this process: its own locks are live). */
function isStale(h: LockHolder): boolean {
  return h.host === hostname() && h.pid !== process.pid && !pidAlive(h.pid);
}

/** Takeovers that died in a row, each holding the guard of the one before, before giving up. */
const MAX_TAKEOVER_DEPTH = 4;

/**
 * Replace `path`, which names the dead holder `stale`, with `text`, if it still names it.
 *
 * The processes that found this same stale holder are serialized by a guard file named after
 * it (`<path>.takeover-<its token>`): with the guard held, `path` is read again and replaced
 * only if unchanged. Whoever replaces it changes it, so a second holder of the guard (after
 * the first released it) finds it changed and leaves it alone. A guard left by a process that
 * died holding it is itself a stale lock, replaced the same way one level down: its breakers
 * are serialized by its own guard, so no one removes a guard another just took (which a plain
 * read-then-unlink of the guard did, letting two processes take the store).
 */
async function replaceStale(path: string, stale: LockHolder, text: string, depth: number): Promise<void> {
  if (depth > MAX_TAKEOVER_DEPTH) throw new StoreLockedError(`could not take over ${path}: ${depth} takeovers of it died in a row`);
  const guard = `${path}.takeover-${holderId(stale)}`;
  if (!(await createWhole(guard, text))) {
    const g = await readLock(guard);
    if (g === 'gone' || g === undefined || !isStale(g)) {
      // Another takeover is under way (or just ended): let it finish.
      await sleep(10 + Math.random() * 40);
      return;
    }
    await replaceStale(guard, g, text, depth + 1);
    if ((await readFile(guard, 'utf8').catch(() => '')) !== text) {
      await sleep(10 + Math.random() * 40); // another breaker got the guard
      return;
    }
  }
  try {
    const now = await readLock(path);
    if (now !== 'gone' && JSON.stringify(now) !== JSON.stringify(stale)) return;
    if (now !== 'gone') await unlink(path);
    await createWhole(path, text); // false: someone took it in between, fairly
  } finally {
    await unlink(guard).catch(() => undefined);
  }
}

/** A name for one lock holder: its token, or (a lock written before tokens) pid and time. */
function holderId(h: LockHolder): string {
  return h.token ?? `${h.pid}-${h.since.replace(/[^0-9A-Za-z]/g, '')}`;
}

/**
 * Remove the takeover guards that crashed takeovers left behind (and the single
 * `<lock>.takeover` of earlier versions). With the lock held they are all obsolete: a process
 * still holding one finds the lock changed and leaves it alone.
 */
async function removeTakeoverGuards(lockPath: string): Promise<void> {
  const dir = dirname(lockPath);
  const base = basename(lockPath);
  // Guards only: the temporary files createWhole links into place (`<guard>.<pid>.<random>.tmp`)
  // belong to calls in progress.
  const guard = new RegExp(`^${base.replace(/[^0-9A-Za-z]/g, '\\$&')}(\\.takeover|(\\.takeover-[0-9A-Za-z-]+)+)$`);
  const names = await readdir(dir).catch(() => [] as string[]);
  for (const n of names) if (guard.test(n)) await unlink(join(dir, n)).catch(() => undefined);
}

type LockHolder = z.infer<typeof LockFile>;

/** The lock's holder; undefined if unreadable; 'gone' if there is no lock file. */
async function readLock(lockPath: string): Promise<LockHolder | undefined | 'gone'> {
  let raw: string;
  try {
    raw = await readFile(lockPath, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return 'gone';
    return undefined;
  }
  try {
    const parsed = LockFile.safeParse(JSON.parse(raw));
    return parsed.success ? parsed.data : undefined;
  } catch {
    return undefined;
  }
}

/** Create `path` holding `text`, durably, if it does not exist: true if this call created it. */
async function createWhole(path: string, text: string): Promise<boolean> {
  const tmp = `${path}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`;
  const h = await open(tmp, 'wx');
  try {
    await h.writeFile(text);
    await h.sync();
  } finally {
    await h.close();
  }
  try {
    await link(tmp, path);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') return false;
    throw e;
  } finally {
    await unlink(tmp).catch(() => undefined);
  }
}

/** List the entries of a store directory (for fsck and tests). */
export async function listStoreFiles(dir: string): Promise<string[]> {
  return (await readdir(dir)).sort();
}

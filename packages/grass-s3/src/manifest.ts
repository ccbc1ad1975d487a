/**
 * The S3 store's manifest and key layout (FORMAT.md beside this file is the prose version).
 *
 *   PREFIX/lock                      who holds the store now ({host, pid, since, writer})
 *   PREFIX/manifest/SSSSSSSSSSSS     manifest number S, created with If-None-Match: *
 *   PREFIX/seg/EEEEEEEE-IIIIIIII     a sealed segment: full segmentBytes, written once
 *   PREFIX/seg/EEEEEEEE-IIIIIIII.pN  the first N bytes of a segment that was still open
 *
 * Manifests form one chain: whoever creates number S+1 owns the store from then on. A writer
 * claims the store by creating the next manifest with a new epoch, and every later publication
 * creates the next number again, so a writer that was taken over finds its number taken and
 * stops (fencing). Segment keys carry the epoch of the writer that created them, so two
 * writers never write the same key, and the orphan sweep can tell old leftovers from objects
 * a live writer has not yet published.
 */
import { z } from 'zod';

export const MANIFEST_FORMAT_VERSION = 1;
export const MANIFEST_DIR = 'manifest/';
export const SEGMENT_DIR = 'seg/';
export const LOCK_KEY = 'lock';

export const Writer = z.object({
  host: z.string(),
  pid: z.number().int(),
  /** Random per open: tells this writer's objects from another's with the same host and pid. */
  id: z.string(),
  since: z.string(),
});
export type Writer = z.infer<typeof Writer>;

export const ManifestEntry = z.object({
  slot: z.number().int().min(0),
  /** Object key relative to the prefix. */
  key: z.string().regex(/^seg\/[0-9a-f]{8}-[0-9a-f]{8}(\.p[0-9]+)?$/),
  /** Bytes in the object: segmentBytes for a sealed segment, fewer for a partial one. */
  length: z.number().int().min(0),
  sealed: z.boolean(),
});
export type ManifestEntry = z.infer<typeof ManifestEntry>;

export const Manifest = z.object({
  kind: z.literal('pasture-grass-s3-manifest'),
  formatVersion: z.literal(MANIFEST_FORMAT_VERSION),
  storeId: z.string().min(8),
  seq: z.number().int().min(0),
  /** Incremented by every open: the writer's generation. */
  epoch: z.number().int().min(0),
  writer: Writer,
  segmentBytes: z.number().int().positive(),
  segmentCount: z.number().int().positive(),
  /** The two Grass superblock slots, base64, as the writer had them when it published. */
  superblocks: z.tuple([z.string().nullable(), z.string().nullable()]),
  /** Every slot holding data, with the object that holds it. */
  entries: z.array(ManifestEntry),
  publishedAt: z.string(),
}).superRefine((m, ctx) => {
  const seen = new Set<number>();
  for (const e of m.entries) {
    if (e.slot >= m.segmentCount) ctx.addIssue({ code: 'custom', message: `entry for slot ${e.slot} past segmentCount ${m.segmentCount}` });
    if (seen.has(e.slot)) ctx.addIssue({ code: 'custom', message: `two entries for slot ${e.slot}` });
    seen.add(e.slot);
    if (e.sealed ? e.length !== m.segmentBytes : e.length > m.segmentBytes) ctx.addIssue({ code: 'custom', message: `entry for slot ${e.slot} has length ${e.length}` });
  }
});
export type Manifest = z.infer<typeof Manifest>;

export const LockRecord = z.object({ host: z.string(), pid: z.number().int(), since: z.string(), writer: z.string() });
export type LockRecord = z.infer<typeof LockRecord>;

export function manifestKey(seq: number): string {
  return `${MANIFEST_DIR}${String(seq).padStart(12, '0')}`;
}

export function manifestSeqOf(key: string): number | undefined {
  const m = /^manifest\/([0-9]{12})$/.exec(key);
  return m === null ? undefined : Number(m[1]);
}

export function segmentKey(epoch: number, incarnation: number): string {
  return `${SEGMENT_DIR}${epoch.toString(16).padStart(8, '0')}-${incarnation.toString(16).padStart(8, '0')}`;
}

export function partialKey(base: string, length: number): string {
  return `${base}.p${length}`;
}

/** The segment a key belongs to: a partial object's key without its `.pN`. */
export function segmentKeyOf(key: string): string {
  return key.replace(/\.p[0-9]+$/, '');
}

/** The epoch a segment key was written in, or undefined for a key that is not a segment's. */
export function epochOfKey(key: string): number | undefined {
  const m = /^seg\/([0-9a-f]{8})-[0-9a-f]{8}(\.p[0-9]+)?$/.exec(key);
  return m === null ? undefined : parseInt(m[1]!, 16);
}

/** The incarnation in a segment key (its life's number within its epoch), or undefined. */
export function incarnationOfKey(key: string): number | undefined {
  const m = /^seg\/[0-9a-f]{8}-([0-9a-f]{8})(\.p[0-9]+)?$/.exec(key);
  return m === null ? undefined : parseInt(m[1]!, 16);
}

export function encodeManifest(m: Manifest): Uint8Array {
  return new TextEncoder().encode(JSON.stringify(m) + '\n');
}

/** Parse and validate; a string describes what is wrong. */
export function decodeManifest(bytes: Uint8Array): Manifest | string {
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder().decode(bytes));
  } catch (e) {
    return `not JSON: ${(e as Error).message}`;
  }
  const r = Manifest.safeParse(json);
  return r.success ? r.data : r.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ');
}

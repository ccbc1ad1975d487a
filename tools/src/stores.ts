/**
 * Which segment store a `--store` names, and opening or creating it:
 *
 *   --store file:DIR | DIR                       a file store in DIR
 *   --store s3://BUCKET/PREFIX --cache-dir DIR   an S3 store, with its journal and cache in DIR
 *   --store DIR                                  also an S3 store, once DIR is one's cache
 *                                                (DIR/store.json names the bucket)
 *
 * S3 settings come from flags or the usual environment: AWS_ENDPOINT_URL_S3 or
 * AWS_ENDPOINT_URL (or S3_ENDPOINT), AWS_REGION (or S3_REGION), AWS_ACCESS_KEY_ID and
 * AWS_SECRET_ACCESS_KEY (or S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY), else the SDK's
 * default credential chain. A custom endpoint uses path-style addressing.
 */
import { FileSegmentStore, type SegmentStore } from '@pasture/grass';
import { S3SegmentStore, type BucketOptions, type CacheManifest, type S3StoreOptions } from '@pasture/grass-s3';

export interface StoreSpec {
  kind: 'file' | 's3';
  /** The file store's directory, or the S3 store's cache directory. */
  dir: string;
  bucket?: string;
  prefix?: string;
}

export interface S3Flags {
  endpoint?: string;
  region?: string;
  takeover?: boolean;
  cacheBytes?: number;
  /** maxUploadBacklogBytes: local disk for segments waiting for their upload. */
  journalBytes?: number;
  /** closeTimeoutMs: how long a close waits for S3 to take the final state. */
  closeTimeoutMs?: number;
}

const env = (...names: string[]): string | undefined => {
  for (const n of names) {
    const v = process.env[n];
    if (v !== undefined && v !== '') return v;
  }
  return undefined;
};

export class StoreSpecError extends Error {}

/** Parse `--store` (and `--cache-dir`); `resolve` makes user paths absolute. */
export function parseStoreSpec(store: unknown, cacheDir: unknown, resolve: (p: string) => string): StoreSpec {
  if (typeof store !== 'string' || store === '') throw new StoreSpecError('--store is required, e.g. --store file:./mypool or --store s3://bucket/pool --cache-dir ./pool-cache');
  const s3 = /^s3:\/\/([^/]+)\/?(.*)$/.exec(store);
  if (s3 !== null) {
    if (typeof cacheDir !== 'string' || cacheDir === '') throw new StoreSpecError(`an S3 store needs --cache-dir DIR for its local journal and cache (--store ${store})`);
    return { kind: 's3', dir: resolve(cacheDir), bucket: s3[1]!, prefix: s3[2]!.replace(/\/+$/, '') };
  }
  if (/^[a-z0-9]+:\/\//i.test(store)) throw new StoreSpecError(`store '${store}': use file:DIR or s3://BUCKET/PREFIX`);
  const path = store.startsWith('file:') ? store.slice(5) : store;
  if (path === '') throw new StoreSpecError(`--store ${store} names no directory: give file:DIR (file:. for this one)`);
  return { kind: 'file', dir: resolve(path) };
}

function bucketOptions(bucket: string, prefix: string, flags: S3Flags, cm?: CacheManifest): BucketOptions {
  const o: BucketOptions = { bucket, prefix };
  const endpoint = flags.endpoint ?? env('AWS_ENDPOINT_URL_S3', 'AWS_ENDPOINT_URL', 'S3_ENDPOINT') ?? cm?.endpoint;
  const region = flags.region ?? env('AWS_REGION', 'AWS_DEFAULT_REGION', 'S3_REGION') ?? cm?.region;
  if (endpoint !== undefined) {
    o.endpoint = endpoint;
    o.forcePathStyle = true;
  }
  if (region !== undefined) o.region = region;
  const id = env('AWS_ACCESS_KEY_ID', 'S3_ACCESS_KEY_ID');
  const secret = env('AWS_SECRET_ACCESS_KEY', 'S3_SECRET_ACCESS_KEY');
  if (id !== undefined && secret !== undefined) {
    o.accessKeyId = id;
    o.secretAccessKey = secret;
  }
  return o;
}

/** An S3 spec for `spec`, reading DIR/store.json when the spec is a plain directory. */
async function asS3(spec: StoreSpec): Promise<{ bucket: string; prefix: string; cm?: CacheManifest } | undefined> {
  if (spec.kind === 's3') {
    const cm = await S3SegmentStore.readCacheManifest(spec.dir);
    return { bucket: spec.bucket!, prefix: spec.prefix!, ...(cm ? { cm } : {}) };
  }
  const cm = await S3SegmentStore.readCacheManifest(spec.dir);
  return cm === undefined ? undefined : { bucket: cm.bucket, prefix: cm.prefix, cm };
}

function s3Options(flags: S3Flags): Partial<S3StoreOptions> {
  return {
    ...(flags.takeover ? { takeover: true } : {}), ...(flags.cacheBytes !== undefined ? { cacheBytes: flags.cacheBytes } : {}),
    ...(flags.journalBytes !== undefined ? { maxUploadBacklogBytes: flags.journalBytes } : {}),
    ...(flags.closeTimeoutMs !== undefined ? { closeTimeoutMs: flags.closeTimeoutMs } : {}),
  };
}

export async function openStore(spec: StoreSpec, flags: S3Flags = {}): Promise<SegmentStore> {
  const s3 = await asS3(spec);
  if (s3 === undefined) return FileSegmentStore.open(spec.dir);
  return S3SegmentStore.open({ bucket: bucketOptions(s3.bucket, s3.prefix, flags, s3.cm), cacheDir: spec.dir, ...s3Options(flags) });
}

export async function createStore(spec: StoreSpec, geometry: { segmentBytes: number; segmentCount: number }, flags: S3Flags = {}): Promise<SegmentStore> {
  if (spec.kind === 'file') return FileSegmentStore.create(spec.dir, geometry);
  return S3SegmentStore.create({ bucket: bucketOptions(spec.bucket!, spec.prefix!, flags), cacheDir: spec.dir, ...geometry, createBucket: true, ...s3Options(flags) });
}

/** True if DIR holds a store: both kinds keep their store.json there (an S3 store's names its bucket). */
export function storeExists(spec: StoreSpec): Promise<boolean> {
  return FileSegmentStore.exists(spec.dir);
}

/** The S3 store's counters, if `store` is one. */
export function s3Stats(store: SegmentStore): ReturnType<S3SegmentStore['stats']> | undefined {
  return store instanceof S3SegmentStore ? store.stats() : undefined;
}

/** For an S3 store, check the bucket against its newest manifest; undefined for other stores. */
export async function checkBucket(store: SegmentStore): Promise<Awaited<ReturnType<S3SegmentStore['checkBucket']>> | undefined> {
  return store instanceof S3SegmentStore ? store.checkBucket() : undefined;
}

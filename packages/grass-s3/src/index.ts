export { S3SegmentStore, type S3StoreOptions, type S3CreateOptions, type S3StoreStats, type CacheManifest } from './s3-store.ts';
export { Bucket, type BucketOptions, type BucketCounters, type HttpHandler } from './bucket.ts';
export { S3Faults, type S3Fault, type S3FaultRates, type S3FaultCounters } from './faulty-s3.ts';
export { decodeManifest, type Manifest, type ManifestEntry } from './manifest.ts';

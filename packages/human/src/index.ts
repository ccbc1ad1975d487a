export { Pool, parseSpec, type VolumeInfo, type SnapshotInfo, type ImageUsage, type DiffExtent, type PoolOptions } from './pool.ts';
export { Image, type ImageStat, type BlockStatus, type WriteRange } from './image.ts';
export { BLOCK_BYTES, MAX_VOLUME_BYTES, MAX_IO_BYTES, SLOT_BLOCKS } from './layout.ts';
export { NAME_RE, CATALOG_BYTES_MAX, decodeCatalog, type Catalog } from './catalog.ts';
export * from './errors.ts';

export { CowStore, DIFF_WINDOW_BLOCKS, MAX_WRITE_BLOCKS, type Cow, type CowTransaction, type CowOptions, type CowStats, type CowScan, type Extent } from './cow.ts';
export { BLOCK_BYTES, CODEC_LZ4, CodecError, decodeBlock, encodeBlock, isZeroBlock, lz4Implementation } from './codec.ts';
export { ADDRESS_LIMIT, FANOUT, MAX_HEIGHT } from './format.ts';
export * from './errors.ts';

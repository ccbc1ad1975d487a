export { BLOCK_BYTES, CODEC_LZ4, CodecError, decodeBlock, encodeBlock, isZeroBlock, lz4Implementation } from './codec.ts';

/**
 * Block codec: how Cow stores one 4096-byte block in a Grass record (see FORMAT.md).
 *
 * - An all-zero block is stored as nothing at all: the caller unmaps it.
 * - A record of exactly BLOCK_BYTES is the raw block (its length is its codec tag; a tag
 *   byte would not fit in Grass's 4096-byte record limit).
 * - A shorter record starts with a codec tag byte: CODEC_LZ4 is followed by a u32
 *   little-endian original size (always BLOCK_BYTES) and a raw LZ4 block.
 * - A block is stored compressed only if that saves at least 1/8 (MIN_SAVING_BYTES).
 *
 * LZ4 comes from lz4-wasm-nodejs (compression) and lz4-napi (decompression; docs/rfcs/0002);
 * both write the same bytes' format. Neither checks its input, so decode() checks the size
 * prefix before decompressing and the length after. Grass has already verified the record's
 * CRC-32C, so corrupt compressed bytes never reach here unnoticed.
 */
import { createRequire } from 'node:module';
import { CowCorruptionError } from './errors.ts';

export const BLOCK_BYTES = 4096;
export const CODEC_LZ4 = 1;
/** Compression must save at least this much to be used. */
export const MIN_SAVING_BYTES = BLOCK_BYTES / 8;

export class CodecError extends Error {
  override name = 'CodecError';
  readonly code = 'EIO';
}

interface Lz4 {
  name: string;
  compress(data: Uint8Array): Uint8Array;
  decompress(data: Uint8Array): Uint8Array;
}

const require = createRequire(import.meta.url);

function asBuffer(u: Uint8Array): Buffer {
  return Buffer.isBuffer(u) ? u : Buffer.from(u.buffer, u.byteOffset, u.byteLength);
}

function loadNapi(): Lz4 | undefined {
  try {
    const m = require('lz4-napi') as { compressSync(b: Buffer): Buffer; uncompressSync(b: Buffer): Buffer };
    return {
      name: 'lz4-napi',
      compress: (d) => m.compressSync(asBuffer(d)),
      decompress: (d) => {
        try {
          return m.uncompressSync(asBuffer(d));
        } catch (e) {
          throw new CodecError(`lz4 decompression failed: ${(e as Error).message}`);
        }
      },
    };
  } catch {
    return undefined;
  }
}

/** The portable implementation (WebAssembly). */
export function loadWasm(): Lz4 {
  const m = require('lz4-wasm-nodejs') as { compress(b: Uint8Array): Uint8Array; decompress(b: Uint8Array): Uint8Array };
  return {
    name: 'lz4-wasm-nodejs',
    compress: (d) => m.compress(d),
    decompress: (d) => {
      try {
        return m.decompress(d);
      } catch (e) {
        // It throws strings, not Errors.
        throw new CodecError(`lz4 decompression failed: ${String(e)}`);
      }
    },
  };
}

/**
 * The default: compress with the WebAssembly build, decompress with lz4-napi where it loads.
 * In steady state lz4-napi's compression is GC-bound (it returns external buffers: 15-17 us per
 * 4 KiB block against 5-6 us for wasm), while its decompression is the faster one (RFC 0002).
 * PASTURE_LZ4=wasm uses the portable build for both.
 */
const wasmLz4 = loadWasm();
const napiLz4 = process.env.PASTURE_LZ4 === 'wasm' ? undefined : loadNapi();
const lz4: Lz4 = {
  name: napiLz4 === undefined ? wasmLz4.name : `${wasmLz4.name} (compress) + ${napiLz4.name} (decompress)`,
  compress: wasmLz4.compress,
  decompress: (napiLz4 ?? wasmLz4).decompress,
};
/** Which LZ4 implementation is in use. */
export const lz4Implementation = lz4.name;

const ZERO_BLOCK = Buffer.alloc(BLOCK_BYTES);

export function isZeroBlock(block: Uint8Array): boolean {
  return Buffer.compare(asBuffer(block), ZERO_BLOCK) === 0;
}

/**
 * Incompressibility heuristic (in the spirit of btrfs's compression heuristics): count the
 * distinct byte values among SAMPLE_BYTES bytes taken at a stride across the block. Uniformly
 * random bytes show about 162 distinct values in 256 samples (standard deviation about 4); a
 * block that LZ4 could shrink by 1/8 needs long repeats or a skewed alphabet, and shows
 * fewer: one that is 85% random and 15% a single value (saving about 15%) shows about 148.
 * Text shows 30-60, executables and file system metadata 40-110.
 *
 * - At INCOMPRESSIBLE_DISTINCT_BYTES (150) or more the block is stored raw without trying
 *   LZ4, which costs 5-8 us per block against well under 1 us for this count.
 * - Below GREY_DISTINCT_BYTES (120) LZ4 is always tried.
 * - In between lies a grey zone, where random data from a skewed generator sits (fio's
 *   buffers show 125-165, centred near 143) beside rare compressible blocks. There LZ4's
 *   recent outcomes decide, like btrfs giving up on a file whose writes do not compress: after
 *   k grey blocks in a row failed to compress, the next min(2^k, GREY_MAX_SKIP) - 1 grey
 *   blocks are stored raw without trying; any grey block that compresses ends the streak. So
 *   a stream of incompressible grey blocks costs one LZ4 try in GREY_MAX_SKIP, and a
 *   compressible block in a grey stream is stored raw at worst GREY_MAX_SKIP - 1 times in a
 *   row before the next try finds it out.
 *
 * Blocks made of a repeated random sequence longer than ~3 KiB are misjudged; they could save
 * at most a few percent anyway.
 */
const SAMPLE_BYTES = 256;
const SAMPLE_STRIDE = BLOCK_BYTES / SAMPLE_BYTES;
export const INCOMPRESSIBLE_DISTINCT_BYTES = 150;
export const GREY_DISTINCT_BYTES = 120;
export const GREY_MAX_SKIP = 32;
/** seen[b] === stamp when byte value b was seen in the current call (no clearing between calls). */
const seen = new Uint32Array(256);
let stamp = 0;

/** Distinct byte values among SAMPLE_BYTES bytes sampled across the block. */
export function sampledDistinctBytes(block: Uint8Array): number {
  stamp = (stamp + 1) >>> 0 || 1;
  if (stamp === 1) seen.fill(0);
  let distinct = 0;
  // The sample walks every byte lane: a stride that is a multiple of 8 would see only one
  // byte of each 64-bit word, and fio's generator (among others) is far from uniform there.
  for (let k = 0; k < SAMPLE_BYTES; k++) {
    const b = block[k * SAMPLE_STRIDE + (k % SAMPLE_STRIDE)]!;
    if (seen[b] !== stamp) {
      seen[b] = stamp;
      distinct++;
    }
  }
  return distinct;
}

/** The grey zone's memory of LZ4's recent outcomes (see above). One per process is enough. */
export class GreyZone {
  /** Grey blocks in a row that LZ4 was tried on and did not shrink enough. */
  private failures = 0;
  /** Grey blocks still to store raw without trying. */
  private skip = 0;
  tries = 0;
  skipped = 0;

  /** Whether to try LZ4 on the next grey block. */
  shouldTry(): boolean {
    if (this.skip > 0) {
      this.skip--;
      this.skipped++;
      return false;
    }
    this.tries++;
    return true;
  }

  /** The outcome of a try. */
  record(compressed: boolean): void {
    if (compressed) {
      this.failures = 0;
      return;
    }
    this.failures = Math.min(this.failures + 1, 30);
    this.skip = Math.min(2 ** this.failures, GREY_MAX_SKIP) - 1;
  }
}

export const greyZone = new GreyZone();

/**
 * The record to store for `block`, or undefined for an all-zero block (store nothing). A raw
 * record is a copy unless `shareRaw`, when it is `block` itself: only for a caller that hands
 * it to Grass and awaits that before anyone may change `block`.
 */
export function encodeBlock(block: Uint8Array, impl: Lz4 = lz4, shareRaw = false, grey: GreyZone = greyZone): Uint8Array | undefined {
  if (block.length !== BLOCK_BYTES) throw new RangeError(`a block is ${BLOCK_BYTES} bytes, got ${block.length}`);
  if (isZeroBlock(block)) return undefined;
  const distinct = sampledDistinctBytes(block);
  const isGrey = distinct >= GREY_DISTINCT_BYTES;
  if (distinct >= INCOMPRESSIBLE_DISTINCT_BYTES || (isGrey && !grey.shouldTry())) return shareRaw ? block : block.slice();
  const c = impl.compress(block);
  const worth = 1 + c.length <= BLOCK_BYTES - MIN_SAVING_BYTES;
  if (isGrey) grey.record(worth);
  if (worth) {
    const out = new Uint8Array(1 + c.length);
    out[0] = CODEC_LZ4;
    out.set(c, 1);
    return out;
  }
  return shareRaw ? block : block.slice();
}

/**
 * The record of an all-zero block that is to stay mapped (allocated), where encodeBlock would
 * store nothing: LZ4 of 4096 zeros, a few bytes. Shared; Grass copies records it is given.
 */
export const ZERO_BLOCK_RECORD: Uint8Array = (() => {
  const c = lz4.compress(new Uint8Array(BLOCK_BYTES));
  const out = new Uint8Array(1 + c.length);
  out[0] = CODEC_LZ4;
  out.set(c, 1);
  return out;
})();

/** The block a stored record holds. Throws CodecError for anything it cannot vouch for. */
export function decodeBlock(record: Uint8Array, impl: Lz4 = lz4): Uint8Array {
  if (record.length === BLOCK_BYTES) return record.slice();
  if (record.length < 1 + 4) throw new CodecError(`stored block of ${record.length} bytes is too short`);
  const tag = record[0]!;
  if (tag !== CODEC_LZ4) throw new CodecError(`unknown block codec ${tag}`);
  const body = record.subarray(1);
  const size = body[0]! | (body[1]! << 8) | (body[2]! << 16) | (body[3]! << 24);
  if (size !== BLOCK_BYTES) throw new CodecError(`compressed block claims ${size >>> 0} bytes, expected ${BLOCK_BYTES}`);
  const out = impl.decompress(body);
  if (out.length !== BLOCK_BYTES) throw new CodecError(`compressed block decoded to ${out.length} bytes, expected ${BLOCK_BYTES}`);
  return out instanceof Buffer ? new Uint8Array(out.buffer, out.byteOffset, out.length).slice() : out;
}

/** decodeBlock for a record the caller owns (Grass.read returns a fresh array): a raw one is returned as it is, not copied. */
export function decodeOwnedBlock(record: Uint8Array): Uint8Array {
  return record.length === BLOCK_BYTES ? record : decodeBlock(record);
}

export { lz4 as defaultLz4, loadNapi, type Lz4 };

// ---------------------------------------------------------------------------------------------
// Metadata compression (format.ts): refcount pages are mostly runs of equal counts and
// compress a lot; nodes less. A body is stored compressed when that saves at least 1/8.
// ---------------------------------------------------------------------------------------------

/** LZ4 of `body` with a u32 size prefix, or undefined if that does not save at least 1/8. */
export function compressMeta(body: Uint8Array): Uint8Array | undefined {
  if (body.length < 64) return undefined;
  const c = lz4.compress(body);
  return c.length <= body.length - body.length / 8 ? c : undefined;
}

/** Inverse of compressMeta; checks the size prefix against `maxBytes` before decompressing. */
export function decompressMeta(packed: Uint8Array, maxBytes: number, what: string): Uint8Array {
  if (packed.length < 4) throw new CowCorruptionError(`${what}: compressed body is truncated`);
  const size = (packed[0]! | (packed[1]! << 8) | (packed[2]! << 16) | (packed[3]! << 24)) >>> 0;
  if (size > maxBytes) throw new CowCorruptionError(`${what}: compressed body claims ${size} bytes, at most ${maxBytes} allowed`);
  let out: Uint8Array;
  try {
    out = lz4.decompress(packed);
  } catch (e) {
    throw new CowCorruptionError(`${what}: ${(e as Error).message}`);
  }
  if (out.length !== size) throw new CowCorruptionError(`${what}: decompressed to ${out.length} bytes, expected ${size}`);
  return out;
}

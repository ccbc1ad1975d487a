import test from 'ava';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import {
  BLOCK_BYTES, CODEC_LZ4, CodecError, GREY_DISTINCT_BYTES, GREY_MAX_SKIP, GreyZone, INCOMPRESSIBLE_DISTINCT_BYTES, MIN_SAVING_BYTES,
  decodeBlock, encodeBlock, loadNapi, loadWasm, sampledDistinctBytes,
} from './codec.ts';

const napi = loadNapi();
const wasm = loadWasm();
const impls = [wasm, ...(napi ? [napi] : [])];

function text(): Uint8Array {
  const words = 'the quick brown fox jumps over a lazy dog while storage engineers measure write amplification '.split(' ');
  let s = '';
  for (let i = 0; s.length < BLOCK_BYTES; i++) s += words[(i * 7 + (i >> 3)) % words.length] + (i % 11 === 0 ? '.\n' : ' ');
  return new TextEncoder().encode(s).subarray(0, BLOCK_BYTES);
}

function random(seed: number): Uint8Array {
  const b = new Uint8Array(BLOCK_BYTES);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < b.length; i++) {
    x ^= x << 13; x ^= x >>> 17; x ^= x << 5;
    b[i] = x & 255;
  }
  return b;
}

test('the portable and native implementations both load and interoperate', (t) => {
  t.truthy(napi, 'lz4-napi loads on this machine');
  for (const a of impls) for (const b of impls) {
    const rec = encodeBlock(text(), a)!;
    t.is(rec[0], CODEC_LZ4);
    t.deepEqual(decodeBlock(rec, b), text(), `${a.name} -> ${b.name}`);
  }
});

test('zeros store nothing; random bytes store raw; text compresses by more than 1/8', (t) => {
  for (const impl of impls) {
    t.is(encodeBlock(new Uint8Array(BLOCK_BYTES), impl), undefined);
    const r = random(7);
    const raw = encodeBlock(r, impl)!;
    t.is(raw.length, BLOCK_BYTES);
    t.deepEqual(decodeBlock(raw, impl), r);
    const c = encodeBlock(text(), impl)!;
    t.true(c.length <= BLOCK_BYTES - MIN_SAVING_BYTES, `${c.length} bytes`);
    t.deepEqual(decodeBlock(c, impl), text());
    // Half zeros, half random: compresses to about half.
    const half = new Uint8Array(BLOCK_BYTES);
    half.set(random(9).subarray(0, BLOCK_BYTES / 2));
    const h = encodeBlock(half, impl)!;
    t.true(h.length < BLOCK_BYTES * 0.6);
    t.deepEqual(decodeBlock(h, impl), half);
  }
});

test('an ext4 image round-trips block by block and compresses', (t) => {
  // A real file system image of the packages/ tree (sources, docs, node_modules symlinks), made with mke2fs -d.
  const img = `/tmp/pasture-codec-${process.pid}.img`;
  try {
    execFileSync('mke2fs', ['-q', '-F', '-t', 'ext4', '-d', new URL('../..', import.meta.url).pathname, img, '8M'], { stdio: 'ignore' });
  } catch {
    t.fail('mke2fs (e2fsprogs) is needed for this test; .ci/run installs it');
    return;
  }
  const bytes = readFileSync(img);
  let stored = 0;
  let nonZeroBlocks = 0;
  for (let o = 0; o < bytes.length; o += BLOCK_BYTES) {
    const block = new Uint8Array(bytes.subarray(o, o + BLOCK_BYTES));
    const rec = encodeBlock(block);
    if (rec !== undefined) nonZeroBlocks++;
    stored += rec?.length ?? 0;
    t.deepEqual(rec === undefined ? new Uint8Array(BLOCK_BYTES) : decodeBlock(rec), block);
  }
  const ratio = stored / (nonZeroBlocks * BLOCK_BYTES);
  t.log(`ext4 image: ${bytes.length} logical bytes, ${nonZeroBlocks} non-zero blocks stored as ${stored} bytes (${ratio.toFixed(3)} of their size)`);
  // Zero blocks cost nothing, and the non-zero ones (TypeScript sources, ext4 metadata) compress.
  t.true(nonZeroBlocks > 20, 'the image holds real data');
  t.true(ratio < 0.7, `non-zero blocks stored at ${ratio.toFixed(3)} of their size`);
  execFileSync('rm', ['-f', img]);
});

test('hostile records are CodecErrors, never wrong data or giant allocations', (t) => {
  for (const impl of impls) {
    const good = encodeBlock(text(), impl)!;
    const hugePrefix = good.slice();
    hugePrefix.set([0xff, 0xff, 0xff, 0xff], 1);
    t.throws(() => decodeBlock(hugePrefix, impl), { instanceOf: CodecError, message: /claims/ });
    t.throws(() => decodeBlock(Uint8Array.of(9, 0, 16, 0, 0, 1, 2), impl), { instanceOf: CodecError, message: /unknown block codec 9/ });
    t.throws(() => decodeBlock(Uint8Array.of(CODEC_LZ4, 0), impl), { instanceOf: CodecError, message: /too short/ });
    const truncated = good.subarray(0, Math.floor(good.length / 2));
    t.throws(() => decodeBlock(truncated, impl), { instanceOf: CodecError }, `${impl.name} truncated`);
  }
  t.throws(() => encodeBlock(new Uint8Array(100)), { instanceOf: RangeError });
});

/** Random bytes from an alphabet of `alphabet` values (skewed like fio's generator), the last `zeros` bytes zero. */
function skewed(seed: number, alphabet: number, zeros = 0): Uint8Array {
  const b = random(seed);
  for (let i = 0; i < b.length; i++) b[i] = i >= b.length - zeros ? 0 : b[i]! % alphabet;
  return b;
}

test('grey zone: a stream of incompressible blocks with a skewed alphabet costs one LZ4 try in GREY_MAX_SKIP, and compressible blocks are found again', (t) => {
  let tried = 0;
  const counting = { ...wasm, compress: (d: Uint8Array) => (tried++, wasm.compress(d)) };
  const grey = new GreyZone();
  const incompressible = (i: number): Uint8Array => skewed(1000 + i, 180);
  const compressible = (i: number): Uint8Array => skewed(5000 + i, 200, 800);
  // The test data lies where it should.
  for (const b of [incompressible(0), compressible(0)]) {
    const d = sampledDistinctBytes(b);
    t.true(d >= GREY_DISTINCT_BYTES && d < INCOMPRESSIBLE_DISTINCT_BYTES, `${d} distinct bytes sampled`);
  }
  t.true(sampledDistinctBytes(text()) < GREY_DISTINCT_BYTES);

  const N = 2000;
  for (let i = 0; i < N; i++) {
    const b = incompressible(i);
    const rec = encodeBlock(b, counting, false, grey)!;
    t.is(rec.length, BLOCK_BYTES);
    if (i % 97 === 0) t.deepEqual(decodeBlock(rec), b);
  }
  // Among the grey blocks: tries after 1, 2, 4, ... up to 32 blocks, then one in 32.
  const greyBlocks = grey.tries + grey.skipped;
  t.true(greyBlocks > N * 0.9, `${greyBlocks} of ${N} blocks in the grey zone`);
  t.true(grey.tries <= greyBlocks / GREY_MAX_SKIP + 6, `${grey.tries} tries for ${greyBlocks} grey blocks`);
  t.true(grey.tries >= greyBlocks / GREY_MAX_SKIP, `${grey.tries} tries for ${greyBlocks} grey blocks`);
  t.true(tried < N / 10, `${tried} LZ4 calls in all for ${N} blocks`);

  // Text is always tried, whatever the grey zone's streak.
  tried = 0;
  const c = encodeBlock(text(), counting, false, grey)!;
  t.is(tried, 1);
  t.is(c[0], CODEC_LZ4);

  // Compressible grey blocks after the streak: stored raw at most GREY_MAX_SKIP - 1 times, then
  // compressed, every one after that too.
  const stored = Array.from({ length: 200 }, (_, i) => encodeBlock(compressible(i), counting, false, grey)!.length);
  const firstCompressed = stored.findIndex((n) => n < BLOCK_BYTES);
  t.true(firstCompressed >= 0 && firstCompressed < GREY_MAX_SKIP, `first compressed at ${firstCompressed}`);
  t.true(stored.slice(firstCompressed).every((n) => n <= BLOCK_BYTES - MIN_SAVING_BYTES), 'all compressed after the first');
  t.deepEqual(decodeBlock(encodeBlock(compressible(7), counting, false, grey)!), compressible(7));
});

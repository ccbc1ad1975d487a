import test from 'ava';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { NbdClient } from './client.ts';
import * as P from './protocol.ts';
import { FileDevice } from './file-device.ts';
import { MEMORY_CHUNK_BYTES, MemoryDevice } from './memory-device.ts';
import { Rng, serve, withTempDir } from './testing.ts';

const KiB = 1024;
const MiB = 1024 * KiB;

test('MemoryDevice matches a flat model under random writes, trims and zeroes; holes are real', async (t) => {
  const seed = 20251123;
  const rng = new Rng(seed);
  const size = 3 * MiB + 5000; // not a multiple of the chunk size
  const dev = new MemoryDevice({ size });
  const model = Buffer.alloc(size);
  for (let step = 0; step < 400; step++) {
    const offset = rng.below(size);
    const length = Math.min(size - offset, 1 + rng.below(300 * KiB));
    switch (rng.below(4)) {
      case 0:
      case 1: {
        const data = rng.bytes(length);
        await dev.write(offset, data, false);
        data.copy(model, offset);
        break;
      }
      case 2:
        await dev.trim(offset, length, false);
        model.fill(0, offset, offset + length);
        break;
      case 3:
        await dev.zero(offset, length, { fua: false, noHole: rng.below(2) === 0 });
        model.fill(0, offset, offset + length);
        break;
    }
    if (step % 50 === 49) t.true(Buffer.from(await dev.read(0, size)).equals(model), `seed ${seed} step ${step}`);
  }
  // Extents cover the range exactly, and every hole reads as zeros.
  const extents = await dev.blockStatus(0, size);
  t.is(extents.reduce((n, e) => n + e.length, 0), size);
  let at = 0;
  for (const e of extents) {
    if (e.hole) t.true(model.subarray(at, at + e.length).every((b) => b === 0));
    at += e.length;
  }
  await dev.trim(0, size, false);
  t.is(dev.allocatedChunks, 1, 'a trim of everything leaves only the partial last chunk');
  t.deepEqual(await dev.blockStatus(0, MEMORY_CHUNK_BYTES * 2), [{ length: MEMORY_CHUNK_BYTES * 2, hole: true, zero: true }]);
});

test('MemoryDevice refuses out-of-range calls and writes when read-only', async (t) => {
  const dev = new MemoryDevice({ size: MiB, readOnly: true });
  await t.throwsAsync(dev.read(MiB - 1, 2), { message: /outside the device/ });
  await t.throwsAsync(dev.write(0, new Uint8Array(1), false), { message: /read-only/ });
});

test('FileDevice: creates, reads back, zeroes, flushes; short files read as zeros past the end', async (t) => {
  await withTempDir(async (dir) => {
    const path = join(dir, 'disk.img');
    const dev = await FileDevice.open(path, { size: 2 * MiB });
    t.is(dev.size, 2 * MiB);
    await dev.write(MiB - 3, Buffer.from('across a boundary'), true);
    await dev.zero(MiB, 4, { fua: false, noHole: false });
    await dev.flush();
    t.is(Buffer.from(await dev.read(MiB - 3, 17)).toString('latin1'), 'acr\0\0\0\0a boundary');
    t.deepEqual(await dev.blockStatus(0, 2 * MiB), [{ length: 2 * MiB, hole: false, zero: false }]);
    await dev.close();
    const back = await readFile(path);
    t.is(back.length, 2 * MiB);
    t.is(back.subarray(MiB - 3, MiB + 14).toString('latin1'), 'acr\0\0\0\0a boundary');

    await writeFile(join(dir, 'small'), 'abc');
    const ro = await FileDevice.open(join(dir, 'small'), { readOnly: true });
    t.true(ro.readOnly);
    t.is(ro.size, 3);
    t.is(Buffer.from(await ro.read(0, 3)).toString(), 'abc');
    await ro.close();
  });
});

test('FileDevice served over NBD gives the same bytes as MemoryDevice for the same writes', async (t) => {
  await withTempDir(async (dir) => {
    const file = await FileDevice.open(join(dir, 'f.img'), { size: 4 * MiB });
    const s = await serve({ file, mem: new MemoryDevice({ size: 4 * MiB }) });
    const rng = new Rng(7);
    const clients = await Promise.all(['file', 'mem'].map((exportName) => NbdClient.connect({ port: s.port }, { exportName })));
    for (let i = 0; i < 40; i++) {
      const offset = rng.below(4 * MiB - 64 * KiB);
      const data = rng.bytes(1 + rng.below(64 * KiB));
      const zero = rng.below(5) === 0;
      for (const c of clients) {
        if (zero) await c.zero(offset, data.length);
        else await c.write(offset, data);
      }
    }
    for (const c of clients) await c.flush();
    const [a, b] = await Promise.all(clients.map((c) => c.read(0, 4 * MiB)));
    t.true(a!.equals(b!));
    // FAST_ZERO: the memory device zeroes by dropping chunks and offers it; the file device
    // writes zeros, so it neither offers it nor takes it (NBD_ENOTSUP at once, nothing written).
    const [fc, mc] = clients as [NbdClient, NbdClient];
    t.is(fc.transmissionFlags & P.NBD_FLAG_SEND_FAST_ZERO, 0);
    t.not(mc.transmissionFlags & P.NBD_FLAG_SEND_FAST_ZERO, 0);
    await mc.zero(0, 64 * KiB, P.NBD_CMD_FLAG_FAST_ZERO);
    const before = await fc.read(0, 64 * KiB);
    const e = await t.throwsAsync(fc.zero(0, 64 * KiB, P.NBD_CMD_FLAG_FAST_ZERO));
    t.is((e as { errno?: number }).errno, P.NBD_ENOTSUP);
    t.true((await fc.read(0, 64 * KiB))!.equals(before!), 'a refused fast zero writes nothing');
    for (const c of clients) await c.disconnect();
    await s.close();
    await file.close();
  });
});

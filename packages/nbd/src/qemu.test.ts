/**
 * Real QEMU clients (qemu-io, qemu-img) against MemoryDevice exports on a loopback port or a
 * Unix socket. Every run is bounded by execFile's timeout.
 */
import test from 'ava';
import { createHash } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { MemoryDevice } from './memory-device.ts';
import { NbdServer } from './server.ts';
import { StaticExportProvider } from './static-provider.ts';
import { Rng, run, serve, withTempDir } from './testing.ts';

const MiB = 1024 * 1024;

test('qemu-io: pattern writes, FUA, zeroes and discards read back, and land in the device', async (t) => {
  const dev = new MemoryDevice({ size: 16 * MiB });
  const s = await serve({ disk: dev });
  const r = await run('qemu-io', [
    '-f', 'raw',
    '-c', 'write -P 0xab 0 4M',
    '-c', 'write -f -P 0xcd 4M 1M',
    '-c', 'read -P 0xab 0 4M',
    '-c', 'read -P 0xcd 4M 1M',
    '-c', 'write -z 1M 64k',
    '-c', 'read -P 0 1M 64k',
    '-c', 'discard 8M 2M',
    '-c', 'read -P 0 8M 2M',
    '-c', 'aio_write -P 0x11 10M 512k',
    '-c', 'aio_write -P 0x22 11M 512k',
    '-c', 'aio_flush',
    '-c', 'read -P 0x22 11M 512k',
    '-c', 'flush',
    `${s.uri}/disk`,
  ], 30_000);
  t.is(r.code, 0, r.stderr + r.stdout);
  t.notRegex(r.stdout + r.stderr, /Pattern verification failed|error/i);
  t.true(Buffer.from(await dev.read(0, MiB)).every((b) => b === 0xab));
  t.true(Buffer.from(await dev.read(MiB, 64 * 1024)).every((b) => b === 0));
  t.true(Buffer.from(await dev.read(4 * MiB, MiB)).every((b) => b === 0xcd));
  t.true(Buffer.from(await dev.read(10 * MiB, 512 * 1024)).every((b) => b === 0x11));
  const st = s.server.stats();
  t.true((st.requests['flush'] ?? 0) >= 1);
  t.true((st.requests['write_zeroes'] ?? 0) >= 1, JSON.stringify(st.requests));
  t.true((st.requests['trim'] ?? 0) >= 1, JSON.stringify(st.requests));
  t.is(st.errors, 0);
  await s.close();
});

test('qemu-io: a read-only export cannot be opened for writing; reads work', async (t) => {
  const s = await serve({ ro: new MemoryDevice({ size: 4 * MiB, readOnly: true }) });
  // qemu sees NBD_FLAG_READ_ONLY and refuses a read-write open itself, so no write reaches the
  // server; the server's EPERM for writes that do arrive is tested with the TS client.
  const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4k', `${s.uri}/ro`], 20_000);
  t.not(w.code, 0);
  t.regex(w.stderr, /Permission denied|read-only/i);
  const rd = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0 0 4M', `${s.uri}/ro`], 20_000);
  t.is(rd.code, 0, rd.stderr);
  t.notRegex(rd.stdout, /verification failed/);
  await s.close();
});

test('qemu-img convert a file into the export, then compare, map and convert back', async (t) => {
  await withTempDir(async (dir) => {
    const size = 24 * MiB;
    const rng = new Rng(99);
    // Data, a 8 MiB zero region, data: the zero region must end up a hole.
    const image = Buffer.concat([rng.bytes(8 * MiB), Buffer.alloc(8 * MiB), rng.bytes(8 * MiB)]);
    const src = join(dir, 'src.raw');
    await writeFile(src, image);
    const dev = new MemoryDevice({ size });
    const s = await serve({ disk: { device: dev, description: 'convert target' } });
    const target = `${s.uri}/disk`;
    const conv = await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, target], 60_000);
    t.is(conv.code, 0, conv.stderr);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, target], 60_000);
    t.is(cmp.code, 0, cmp.stdout + cmp.stderr);
    t.regex(cmp.stdout, /Images are identical/);

    const map = await run('qemu-img', ['map', '--output=json', '-f', 'raw', target], 30_000);
    t.is(map.code, 0, map.stderr);
    const extents = JSON.parse(map.stdout) as { start: number; length: number; data: boolean; zero: boolean }[];
    const at = (offset: number) => extents.find((e) => e.start <= offset && offset < e.start + e.length)!;
    t.true(at(0).data);
    t.like(at(12 * MiB), { data: false, zero: true });
    t.true(at(20 * MiB).data);
    t.is(extents.reduce((n, e) => n + e.length, 0), size);

    const back = join(dir, 'back.raw');
    const out = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', target, back], 60_000);
    t.is(out.code, 0, out.stderr);
    const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
    t.is(sha(await readFile(back)), sha(image));
    await s.close();
  });
});

test('qemu-io over a Unix socket, with the default export', async (t) => {
  await withTempDir(async (dir) => {
    const path = join(dir, 'nbd.sock');
    const server = new NbdServer(new StaticExportProvider({ only: { device: new MemoryDevice({ size: 4 * MiB }) } }, 'only'));
    const { uri } = await server.listen({ path });
    const r = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 0 1M', '-c', 'read -P 0x77 0 1M', uri], 20_000);
    t.is(r.code, 0, r.stderr);
    t.notRegex(r.stdout, /verification failed/);
    await server.close({ graceful: true });
  });
});

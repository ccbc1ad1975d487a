/** Human's behaviour: byte I/O, snapshots, clones, rollback, diff, atomic writes, and bad input. */
import test from 'ava';
import { FaultySegmentStore, GrassLog, MemorySegmentStore, Rng } from '@pasture/grass';
import { decodeCatalog } from './catalog.ts';
import { Pool } from './pool.ts';

/** Byte arrays equal (ava's deepEqual is far too slow for megabytes). */
function same(t: { true: (v: boolean, m?: string) => void }, a: Uint8Array, b: Uint8Array, what = 'bytes'): void {
  t.true(a.length === b.length && Buffer.compare(a, b) === 0, `${what} differ`);
}

const MiB = 1 << 20;

async function fresh(segments = 256): Promise<{ pool: Pool; store: MemorySegmentStore }> {
  const store = new MemorySegmentStore(1 << 20, segments);
  const pool = await Pool.create(await GrassLog.create(store, {}));
  return { pool, store };
}

function pattern(seed: number, n: number): Uint8Array {
  const b = new Rng(seed).bytes(n);
  // Half of each 4 KiB compressible, so compression is exercised too.
  for (let i = 0; i < n; i++) if (i % 4096 < 2048) b[i] = (seed + (i >> 7)) & 255;
  return b;
}

test('byte-granular reads and writes: partial blocks are read-modify-write, holes read as zeros', async (t) => {
  const { pool } = await fresh();
  await pool.createVolume('vm', 4 * MiB);
  const img = await pool.openImage('vm');
  const model = new Uint8Array(4 * MiB);
  const rng = new Rng(3);
  for (let i = 0; i < 60; i++) {
    const off = rng.int(4 * MiB - 1);
    const len = 1 + rng.int(Math.min(70000, 4 * MiB - off));
    const data = pattern(i, len);
    await img.write(off, data);
    model.set(data, off);
  }
  same(t, await img.read(0, 4 * MiB), model);
  await img.discard(5000, 20000); // partial at both ends
  model.fill(0, 5000, 25000);
  await img.writeZeroes(100, 3);
  model.fill(0, 100, 103);
  same(t, await img.read(0, 4 * MiB), model);
  const st = await img.blockStatus(0, 4 * MiB);
  t.is(st.reduce((a, s) => a + s.length, 0), 4 * MiB);
  t.true(st.some((s) => !s.allocated) && st.some((s) => s.allocated));
  await img.close();
  await pool.close();
});

test('snapshots never change; clones are isolated; rollback restores exactly; diff lists the changes', async (t) => {
  const { pool } = await fresh();
  await pool.createVolume('base', 2 * MiB);
  const v = await pool.openImage('base');
  const a = pattern(1, 2 * MiB);
  await v.write(0, a);
  await pool.createSnapshot('base', 's1');
  await v.write(4096 * 10, pattern(2, 8192));
  await v.write(4096 * 300 + 17, pattern(3, 100));
  const b = await v.read(0, 2 * MiB);
  await pool.createSnapshot('base', 's2');
  const c1 = await (await pool.clone('base@s1', 'c1'));
  t.is(c1.parent, 'base@s1');
  const c1i = await pool.openImage('c1');
  await c1i.write(0, pattern(4, 4096));
  await v.write(MiB, pattern(5, 4096));
  // s1 is still the original, s2 the state at its time, the clone its own.
  same(t, await (await pool.openImage('base@s1')).read(0, 2 * MiB), a);
  same(t, await (await pool.openImage('base@s2')).read(0, 2 * MiB), b);
  const c1data = a.slice();
  c1data.set(pattern(4, 4096), 0);
  same(t, await c1i.read(0, 2 * MiB), c1data);
  // diff s1 -> s2 is exactly the two writes' blocks.
  const d: { offset: number; length: number }[] = [];
  for await (const e of pool.diff('base@s1', 'base@s2')) d.push(e);
  t.deepEqual(d, [{ offset: 40960, length: 8192 }, { offset: 300 * 4096, length: 4096 }]);
  // rollback to s1.
  await v.close();
  await pool.rollback('base@s1');
  same(t, await (await pool.openImage('base')).read(0, 2 * MiB), a);
  await t.throwsAsync(pool.removeSnapshot('base@s1'), { code: 'EBUSY', message: /protected|clones/ } as never);
  await pool.flatten('c1');
  await pool.protectSnapshot('base@s1', false);
  t.deepEqual(pool.listChildren('base@s1'), []);
  await pool.close();
});

test('clones 32 deep read the right data; removing a snapshot frees exactly its unique blocks', async (t) => {
  const { pool } = await fresh();
  await pool.createVolume('v0', MiB);
  let img = await pool.openImage('v0');
  const model = pattern(9, MiB);
  await img.write(0, model);
  for (let d = 1; d <= 32; d++) {
    await pool.createSnapshot(`v${d - 1}`, 's');
    await pool.clone(`v${d - 1}@s`, `v${d}`);
    img = await pool.openImage(`v${d}`);
    const w = pattern(100 + d, 4096);
    await img.write(d * 4096, w);
    model.set(w, d * 4096);
  }
  same(t, await img.read(0, MiB), model);
  // A snapshot whose blocks were rewritten after it was taken owns those blocks alone.
  await pool.createVolume('solo', MiB);
  const solo = await pool.openImage('solo');
  await solo.write(0, pattern(7, MiB));
  await pool.createSnapshot('solo', 'old');
  await solo.write(0, pattern(8, 64 * 4096));
  const u = await pool.usage('solo@old');
  t.is(u.uniqueBytes, 64 * 4096);
  await pool.cow.reap();
  const before = pool.cow.stats().dataRecords;
  await pool.removeSnapshot('solo@old');
  await pool.cow.reap();
  t.is(before - pool.cow.stats().dataRecords, u.uniqueBytes / 4096);
  await pool.close();
});

test('an atomic multi-range write larger than one transaction lands whole, or after a crash not at all', async (t) => {
  const inner = new MemorySegmentStore(1 << 20, 512);
  const pool = await Pool.create(await GrassLog.create(inner, {}));
  await pool.createVolume('db', 64 * MiB);
  const img = await pool.openImage('db');
  const ranges = [
    { offset: 100, data: pattern(1, 20 * MiB) },
    { offset: 40 * MiB + 5, data: pattern(2, 20 * MiB) },
  ];
  await img.writeAtomic(ranges);
  same(t, await img.read(100, 20 * MiB), ranges[0]!.data);
  same(t, await img.read(40 * MiB + 5, 20 * MiB), ranges[1]!.data);
  t.deepEqual((await decodeCatalog((i) => pool.cow.read(BigInt(i)))).entries.map((e) => e.kind), ['volume'], 'the scratch slot is gone');
  t.is((await pool.cow.usage(2n << 40n, 1n << 64n)).mapped, 0n);
  const second = [{ offset: 0, data: pattern(3, 24 * MiB) }, { offset: 50 * MiB, data: pattern(4, 10 * MiB) }];
  const preHead = await img.read(0, 24 * MiB);
  const preTail = await img.read(50 * MiB, 10 * MiB);
  await pool.close();

  // Crash at several points during a second atomic write: after reopen it is all or nothing.
  const outcomes: string[] = [];
  for (const crashAt of [3, 40, 120, 400, 100000]) {
    const faulty = new FaultySegmentStore(inner.reopen(), { seed: crashAt, crashAtOp: 0 });
    const p = await Pool.open(await GrassLog.open(faulty, {}));
    const i2 = await p.openImage('db');
    faulty.options.crashAtOp = faulty.mutatingOpCount + crashAt;
    let finished = false;
    try {
      await i2.writeAtomic(second);
      await i2.flush();
      finished = true;
    } catch {
      // the crash
    }
    if (!faulty.isCrashed) await faulty.crash();
    const p2 = await Pool.open(await GrassLog.open(new FaultySegmentStore(inner.reopen(), { seed: 1, crashAtOp: 0 }), {}));
    const i3 = await p2.openImage('db');
    const head = await i3.read(0, 24 * MiB);
    const tail = await i3.read(50 * MiB, 10 * MiB);
    const all = Buffer.compare(head, second[0]!.data) === 0 && Buffer.compare(tail, second[1]!.data) === 0;
    const none = Buffer.compare(head, preHead) === 0 && Buffer.compare(tail, preTail) === 0;
    t.true(all || none, `crash ${crashAt} ops in: neither all nor none of the write survived`);
    if (finished) t.true(all, 'a flushed atomic write survives');
    outcomes.push(all ? 'all' : 'none');
    // Reopen reclaimed the scratch slot an interrupted write left in the catalog.
    const cat = await decodeCatalog((i) => p2.cow.read(BigInt(i)));
    t.deepEqual(cat.entries.filter((e) => e.kind === 'scratch'), []);
    // Nothing is mapped outside the catalog (slot 0) and the volume (slot 1).
    t.is((await p2.cow.usage(2n << 40n, 1n << 64n)).mapped, 0n);
    await p2.close();
    if (all) break;
  }
  t.log(`outcomes by crash point: ${outcomes.join(' ')}`);
  t.true(outcomes.includes('none'), 'some crash points lose the write');
  t.is(outcomes[outcomes.length - 1], 'all', 'the last (no crash) keeps it');
});

test('bad input: each a clear error, nothing changed', async (t) => {
  const { pool, store } = await fresh();
  await pool.createVolume('a', MiB);
  await pool.createSnapshot('a', 's');
  const img = await pool.openImage('a');
  await img.write(0, pattern(1, 8192));
  const before = JSON.stringify(pool.listVolumes());
  await t.throwsAsync(pool.openImage('nope'), { code: 'ENOENT', message: "no volume named 'nope'" } as never);
  await t.throwsAsync(pool.openImage('a@nope'), { code: 'ENOENT' } as never);
  await t.throwsAsync(pool.createVolume('a', MiB), { code: 'EEXIST' } as never);
  await t.throwsAsync(pool.createVolume('bad name!', MiB), { code: 'EINVAL' } as never);
  await t.throwsAsync(pool.createVolume('odd', 1000), { code: 'EINVAL', message: /multiple of 4096/ } as never);
  await t.throwsAsync(pool.createSnapshot('a', 's'), { code: 'EEXIST' } as never);
  await t.throwsAsync(img.write(MiB - 10, new Uint8Array(11)), { code: 'EINVAL', message: /past the end/ } as never);
  await t.throwsAsync(img.read(-1, 10), { code: 'EINVAL' } as never);
  await t.throwsAsync(pool.resizeVolume('a', 4096), { code: 'EBUSY', message: /is open/ } as never);
  await t.throwsAsync(pool.removeVolume('a'), { code: 'EBUSY', message: /snapshot/ } as never);
  await pool.clone('a@s', 'child');
  await t.throwsAsync(pool.removeSnapshot('a@s'), { code: 'EBUSY' } as never);
  const snap = await pool.openImage('a@s');
  await t.throwsAsync(snap.write(0, new Uint8Array(10)), { code: 'EROFS' } as never);
  t.is(JSON.stringify(pool.listVolumes().filter((v) => v.name !== 'child')), before);
  t.deepEqual(await img.read(0, 8192), pattern(1, 8192));
  // An open volume grows, but does not shrink, even with allowShrink.
  await t.throwsAsync(pool.resizeVolume('a', 4096, { allowShrink: true }), { code: 'EBUSY', message: /is open/ } as never);
  await pool.resizeVolume('a', 2 * MiB);
  t.is(img.size, 2 * MiB);
  await img.close();
  await t.throwsAsync(pool.resizeVolume('a', 4096), { code: 'EBUSY', message: /would discard 1 blocks/ } as never);
  await pool.resizeVolume('a', 4096, { allowShrink: true });
  t.is(pool.listVolumes().find((v) => v.name === 'a')!.size, 4096);
  await snap.close();
  await pool.close();
  // Invalid catalog bytes: a clear error on open, never a half-open pool.
  const { CowStore } = await import('@pasture/cow');
  const cow = await CowStore.open(await GrassLog.open(store.reopen(), {}), {});
  const blk = (await cow.read(0n))!;
  const text = new TextDecoder().decode(blk);
  const broken = new TextEncoder().encode(text.replace('"kind":"volume"', '"kind":"VOLUME"'));
  await cow.write(0n, broken);
  await cow.close();
  await t.throwsAsync(Pool.open(await GrassLog.open(store.reopen(), {})), { code: 'EIO', message: /catalog is invalid/ } as never);
});

test('an import that fails part way leaves no volume behind; one into a name taken leaves that volume alone', async (t) => {
  const { importImage } = await import('./transfer.ts');
  const { mkdtemp, rm, writeFile } = await import('node:fs/promises');
  const { tmpdir } = await import('node:os');
  const { join } = await import('node:path');
  const dir = await mkdtemp(join(tmpdir(), 'pasture-import-'));
  try {
    const file = join(dir, 'img.raw');
    await writeFile(file, pattern(5, 3 * MiB));
    const { pool } = await fresh();
    // The copy fails after its first MiB (here the progress callback throws; a pool closed
    // under it, a full store or an I/O error end it the same way).
    await t.throwsAsync(importImage(pool, file, 'half', (done) => {
      if (done > MiB) throw new Error('stopped half way');
    }), { message: 'stopped half way' });
    t.deepEqual(pool.listVolumes().map((v) => v.name), [], 'the partly imported volume was removed');
    await pool.createVolume('taken', MiB);
    const img = await pool.openImage('taken');
    await img.write(0, pattern(6, 8192));
    await img.close();
    await t.throwsAsync(importImage(pool, file, 'taken'), { code: 'EEXIST' } as never);
    const again = await pool.openImage('taken');
    same(t, await again.read(0, 8192), pattern(6, 8192), 'the volume that had the name');
    await again.close();
    const r = await importImage(pool, file, 'whole');
    t.is(r.bytes, 3 * MiB);
    const whole = await pool.openImage('whole');
    same(t, await whole.read(0, 3 * MiB), pattern(5, 3 * MiB), 'imported image');
    await whole.close();
    await pool.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('a large atomic write keeps writes that land while it is staged, outside its ranges', async (t) => {
  const { pool } = await fresh(512);
  await pool.createVolume('db', 64 * MiB);
  const img = await pool.openImage('db');
  const other = await pool.openImage('db');
  // Ranges of more than MAX_IO_BYTES (staged in a scratch slot), with unaligned ends, and two
  // that share a block between them.
  const ranges = [
    { offset: 100, data: pattern(11, 20 * MiB) },
    { offset: 30 * MiB + 10, data: pattern(12, 8000) },
    { offset: 30 * MiB + 8010, data: pattern(13, 16 * MiB) },
  ];
  // Another client's writes, acknowledged after staging and before the commit: the bytes
  // before the first range, in the block it starts in; bytes inside a range (the atomic
  // write, committed later, wins there); and a block of the shared span's end.
  const endOfLast = 30 * MiB + 8010 + 16 * MiB;
  const commit = pool.commitScratch.bind(pool);
  let raced = 0;
  pool.commitScratch = async (id, bytes, fn) => {
    raced++;
    await other.write(0, new Uint8Array(100).fill(0xab));
    await other.write(200, new Uint8Array(50).fill(0xcd));
    await other.write(endOfLast, new Uint8Array(30).fill(0xef));
    return commit(id, bytes, fn);
  };
  await img.writeAtomic(ranges);
  t.is(raced, 1, 'the write went through the scratch slot');
  same(t, await img.read(0, 100), new Uint8Array(100).fill(0xab), 'bytes before the first range');
  same(t, await img.read(100, 20 * MiB), ranges[0]!.data, 'first range');
  same(t, await img.read(30 * MiB + 10, 8000), ranges[1]!.data, 'second range');
  same(t, await img.read(30 * MiB + 8010, 16 * MiB), ranges[2]!.data, 'third range');
  same(t, await img.read(endOfLast, 30), new Uint8Array(30).fill(0xef), 'bytes after the last range');
  same(t, await img.read(30 * MiB, 10), new Uint8Array(10), 'bytes before the second range');
  await img.close();
  await other.close();
  await pool.close();
});

test('writeZeroes with allocate (NBD NO_HOLE) reads as zeros and stays allocated; without it, holes', async (t) => {
  const { pool } = await fresh();
  await pool.createVolume('v', 4 * MiB);
  const img = await pool.openImage('v');
  await img.write(0, pattern(21, 2 * MiB));
  await pool.createSnapshot('v', 'before');
  // Over data shared with the snapshot, with unaligned ends; and over a hole, past the data.
  await img.writeZeroes(4096 + 100, 64 * 1024, { allocate: true });
  await img.writeZeroes(3 * MiB + 10, 3 * 4096, { allocate: true });
  // Without allocate: a hole.
  await img.writeZeroes(MiB, 64 * 1024);
  const want = new Uint8Array(4 * MiB);
  want.set(pattern(21, 2 * MiB));
  want.fill(0, 4096 + 100, 4096 + 100 + 64 * 1024);
  want.fill(0, MiB, MiB + 64 * 1024);
  same(t, await img.read(0, 4 * MiB), want, 'volume');
  const allocated = (off: number, len: number): Promise<boolean> =>
    img.blockStatus(off, len).then((st) => st.every((s) => s.allocated));
  t.true(await allocated(4096, 64 * 1024 + 4096), 'zeroed over data: allocated, edges included');
  t.true(await allocated(3 * MiB, 4 * 4096), 'zeroed over a hole: allocated, edges included');
  t.false(await allocated(3 * MiB + 4 * 4096, 4096), 'past it: still a hole');
  t.deepEqual((await img.blockStatus(MiB, 64 * 1024)).map((s) => s.allocated), [false], 'zeroed without allocate: a hole');
  const snap = await pool.openImage('v@before');
  same(t, await snap.read(0, 2 * MiB), pattern(21, 2 * MiB), 'the snapshot');
  await snap.close();
  await img.close();
  await pool.close();
});

test('a volume with an atomic write under way is not removed or shrunk under it; a shrink refuses writes that slip in', async (t) => {
  const { pool } = await fresh(512);
  await pool.createVolume('v', 64 * MiB);
  const img = await pool.openImage('v');
  // While the write is staged in its scratch slot, its image closed early: removal and shrink
  // are refused (they would orphan the slot, or drop data the commit then writes past the end).
  const allocate = pool.allocateScratch.bind(pool);
  const refusals: string[] = [];
  pool.allocateScratch = async (id) => {
    const slot = await allocate(id);
    await img.close();
    for (const op of [() => pool.removeVolume('v'), () => pool.resizeVolume('v', 4 * MiB, { allowShrink: true })]) {
      await op().then(() => refusals.push('done'), (e: Error & { code?: string }) => refusals.push(`${e.code}: ${e.message}`));
    }
    return slot;
  };
  const data = pattern(31, 40 * MiB);
  await img.writeAtomic([{ offset: 0, data }]);
  t.is(refusals.length, 2);
  for (const r of refusals) t.regex(r, /^EBUSY: .*atomic write under way/);
  const check = await pool.openImage('v');
  same(t, await check.read(0, 20 * MiB), data.subarray(0, 20 * MiB), 'the atomic write');
  same(t, await check.read(20 * MiB, 20 * MiB), data.subarray(20 * MiB), 'the atomic write');
  await check.close();

  // A shrink whose check for data past the new end is overtaken by an image opened, written
  // past the end and closed: refused, and the write stays.
  const usage = pool.cow.usage.bind(pool.cow);
  let slipped = false;
  pool.cow.usage = async (start, count) => {
    const u = await usage(start, count);
    if (!slipped) {
      slipped = true;
      const w = await pool.openImage('v');
      await w.write(50 * MiB, new Uint8Array(4096).fill(7));
      await w.close();
    }
    return u;
  };
  await t.throwsAsync(pool.resizeVolume('v', 48 * MiB), { code: 'EBUSY', message: /meanwhile/ } as never);
  const after = await pool.openImage('v');
  same(t, await after.read(50 * MiB, 4096), new Uint8Array(4096).fill(7), 'the write that slipped in');
  await after.close();
  await pool.close();
});

test('catalog changes are durable when they return: a crash right after each keeps it', async (t) => {
  const { importImage } = await import('./transfer.ts');
  const { mkdtemp, rm, writeFile } = await import('node:fs/promises');
  const { tmpdir } = await import('node:os');
  const { join } = await import('node:path');
  const dir = await mkdtemp(join(tmpdir(), 'pasture-durable-'));
  const inner = new MemorySegmentStore(1 << 20, 256);
  const setup = await Pool.create(await GrassLog.create(inner, {}));
  await setup.createVolume('v', 4 * MiB);
  const img = await setup.openImage('v');
  await img.write(0, pattern(51, MiB));
  await img.close();
  await setup.close();
  const file = join(dir, 'image.raw');
  await writeFile(file, pattern(52, 3 * MiB));
  type Step = [string, (p: Pool) => Promise<unknown>, (p: Pool) => Promise<boolean>];
  const steps: Step[] = [
    ['snapshot', (p) => p.createSnapshot('v', 's1'), async (p) => p.listSnapshots('v').some((s) => s.name === 's1')],
    ['protect and clone', async (p) => {
      await p.protectSnapshot('v@s1', true);
      await p.clone('v@s1', 'c');
    }, async (p) => p.listVolumes().some((v) => v.name === 'c')],
    ['volume create', (p) => p.createVolume('n', MiB), async (p) => p.listVolumes().some((v) => v.name === 'n')],
    ['rename', (p) => p.renameVolume('n', 'm'), async (p) => p.listVolumes().some((v) => v.name === 'm')],
    ['import', (p) => importImage(p, file, 'imp'), async (p) => {
      const v = p.listVolumes().find((x) => x.name === 'imp');
      if (v === undefined || v.incomplete) return false;
      const i = await p.openImage('imp');
      const same = Buffer.compare(await i.read(0, 3 * MiB), pattern(52, 3 * MiB)) === 0;
      await i.close();
      return same;
    }],
    ['rollback', async (p) => {
      const i = await p.openImage('v');
      await i.write(0, pattern(53, MiB));
      await i.close();
      await p.rollback('v@s1');
    }, async (p) => {
      const i = await p.openImage('v');
      const back = Buffer.compare(await i.read(0, MiB), pattern(51, MiB)) === 0;
      await i.close();
      return back;
    }],
    ['volume remove', (p) => p.removeVolume('m'), async (p) => !p.listVolumes().some((v) => v.name === 'm')],
  ];
  try {
    for (const [what, step, check] of steps) {
      // Every write since the last sync is lost, kept or torn, as the crash decides.
      const faulty = new FaultySegmentStore(inner.reopen(), { seed: what.length, crashAtOp: 0 });
      const p = await Pool.open(await GrassLog.open(faulty, {}));
      await step(p);
      await faulty.crash();
      const after = await Pool.open(await GrassLog.open(inner.reopen(), {}));
      t.true(await check(after), `${what} survives a crash right after it returned`);
      await after.close();
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('a volume left incomplete (an import a crash cut short) is removed when the pool opens', async (t) => {
  const { pool, store } = await fresh();
  const vol = await pool.createVolume('half', 4 * MiB, { incomplete: true });
  t.true(pool.listVolumes()[0]!.incomplete);
  await t.throwsAsync(pool.createSnapshot('half', 's'), { code: 'EBUSY', message: /being imported/ } as never);
  await t.throwsAsync(pool.renameVolume('half', 'other'), { code: 'EBUSY', message: /being imported/ } as never);
  await t.throwsAsync(pool.copyVolume('half', 'copy'), { code: 'EBUSY', message: /being imported/ } as never);
  const img = await pool.openImage('half');
  await img.write(0, pattern(41, MiB));
  await img.flush();
  await img.close();
  await pool.createVolume('whole', MiB, { incomplete: true });
  const w = await pool.openImage('whole');
  await w.write(0, pattern(42, MiB));
  await w.close();
  await pool.markComplete(pool.listVolumes().find((v) => v.name === 'whole')!.id);
  await pool.flush();
  // The process dies here: reopen from what the store holds.
  const again = await Pool.open(await GrassLog.open(store.reopen(), {}));
  t.deepEqual(again.listVolumes().map((v) => [v.name, v.incomplete]), [['whole', false]]);
  t.is((await again.cow.usage(BigInt(vol.id) << 40n, 1n << 40n)).mapped, 0n, 'its blocks were freed');
  await again.close();
});

test('import and export take regular files, with a clear error for anything else; a failed export leaves the volume closed', async (t) => {
  const { importImage, exportImage } = await import('./transfer.ts');
  const { mkdtemp, rm } = await import('node:fs/promises');
  const { execFileSync } = await import('node:child_process');
  const { tmpdir } = await import('node:os');
  const { join } = await import('node:path');
  const dir = await mkdtemp(join(tmpdir(), 'pasture-transfer-'));
  try {
    const { pool } = await fresh();
    const fifo = join(dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    await t.throwsAsync(importImage(pool, fifo, 'p'), { code: 'EINVAL', message: /is a pipe: import and export take regular files/ } as never);
    await t.throwsAsync(importImage(pool, '/dev/null', 'n'), { code: 'EINVAL', message: /is a character device/ } as never);
    await t.throwsAsync(importImage(pool, dir, 'd'), { code: 'EINVAL', message: /is a directory/ } as never);
    t.deepEqual(pool.listVolumes(), [], 'no volume was made');
    await pool.createVolume('v', MiB);
    await t.throwsAsync(exportImage(pool, 'v', '/dev/null'), { code: 'EINVAL', message: /is a character device/ } as never);
    await t.throwsAsync(exportImage(pool, 'v', join(dir, 'no-such-dir', 'x.raw')), { code: 'ENOENT' } as never);
    await pool.removeVolume('v'); // refused if a failed export had left it open
    t.deepEqual(pool.listVolumes(), []);
    await pool.close();
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('an open image\'s stat follows a rename, and says volume in a read-only pool', async (t) => {
  const { pool, store } = await fresh();
  await pool.createVolume('old', MiB);
  await pool.createSnapshot('old', 's');
  const img = await pool.openImage('old');
  const snap = await pool.openImage('old@s');
  await pool.renameVolume('old', 'new');
  await pool.renameVolume('new', 'new'); // already so named: nothing to do
  t.like(img.stat(), { name: 'new', spec: 'new', kind: 'volume' });
  t.like(snap.stat(), { name: 'new', spec: 'new@s', kind: 'snapshot', readOnly: true });
  await img.close();
  await snap.close();
  await pool.flush();
  const ro = await Pool.open(await GrassLog.open(store.reopen(), { readOnly: true }), { readOnly: true });
  const r = await ro.openImage('new');
  t.like(r.stat(), { kind: 'volume', readOnly: true });
  await r.close();
  await ro.close();
});

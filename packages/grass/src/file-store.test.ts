/** The file segment store: persistence across processes' worth of reopen, and the lock. */
import test from 'ava';
import { mkdtemp, rm, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FileSegmentStore } from './stores/file.ts';
import { GrassLog } from './grass.ts';
import { StoreLockedError } from './errors.ts';

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'pasture-file-'));
  try {
    await fn(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

test('create, write, close, reopen from disk', async (t) => {
  await withTempDir(async (dir) => {
    const store = await FileSegmentStore.create(dir, { segmentBytes: 1 << 20, segmentCount: 32 });
    const g = await GrassLog.create(store);
    for (let i = 1; i <= 500; i++) await g.put(i, new Uint8Array(3000).fill(i & 255));
    await g.flush();
    await g.close();
    const g2 = await GrassLog.open(await FileSegmentStore.open(dir));
    for (const i of [1, 250, 500]) t.deepEqual(await g2.read(i), new Uint8Array(3000).fill(i & 255));
    await g2.close();
  });
});

test('a second writer is refused with a message naming the holder', async (t) => {
  await withTempDir(async (dir) => {
    const store = await FileSegmentStore.create(dir, { segmentBytes: 1 << 20, segmentCount: 8 });
    const err = await t.throwsAsync(FileSegmentStore.open(dir), { instanceOf: StoreLockedError });
    t.regex(err!.message, new RegExp(`in use by this process`));
    const lock = JSON.parse(await readFile(join(dir, 'lock'), 'utf8')) as { pid: number };
    t.is(lock.pid, process.pid);
    await store.close();
    const again = await FileSegmentStore.open(dir);
    await again.close();
  });
});

test('a lock left by a dead process is taken over; a bad manifest is a clear error', async (t) => {
  await withTempDir(async (dir) => {
    const store = await FileSegmentStore.create(dir, { segmentBytes: 1 << 20, segmentCount: 8 });
    await store.close();
    const { writeFile } = await import('node:fs/promises');
    const { hostname } = await import('node:os');
    await writeFile(join(dir, 'lock'), JSON.stringify({ pid: 2 ** 22 + 12345, host: hostname(), since: 'then' }));
    const s2 = await FileSegmentStore.open(dir);
    await s2.close();
    await writeFile(join(dir, 'store.json'), '{"kind":"something else"}');
    await t.throwsAsync(FileSegmentStore.open(dir), { message: /not a store manifest/ });
    await t.throwsAsync(FileSegmentStore.open(join(dir, 'nope')), { message: /holds no Pasture store/ });
  });
});

test('processes racing to take over a stale lock: one at a time holds it', async (t) => {
  const { execFile } = await import('node:child_process');
  const { readdir, writeFile } = await import('node:fs/promises');
  const { hostname } = await import('node:os');
  const { fileURLToPath } = await import('node:url');
  const fixture = fileURLToPath(new URL('./fixtures/take-lock.ts', import.meta.url));
  await withTempDir(async (dir) => {
    const lock = join(dir, 'lock');
    const dead = (pid: number, token: string): string => JSON.stringify({ pid, host: hostname(), since: 'long ago', token });
    for (let trial = 0; trial < 6; trial++) {
      await writeFile(lock, dead(2 ** 22 + 4321, 'stale'));
      // Later trials: a takeover died holding its guard, and then one that broke that guard died too.
      if (trial >= 2) await writeFile(`${lock}.takeover-stale`, dead(2 ** 22 + 4322, 'died-taking-over'));
      if (trial >= 4) await writeFile(`${lock}.takeover-stale.takeover-died-taking-over`, dead(2 ** 22 + 4323, 'died-too'));
      const startAt = Date.now() + 3000; // all four try at once, once started
      const runs = await Promise.all(Array.from({ length: 4 }, () => new Promise<{ taken: boolean; from?: number; to?: number; error?: string }>((resolve, reject) => {
        execFile(process.execPath, ['--import', 'tsx', fixture, lock, '400', String(startAt)], { timeout: 60_000 }, (err, stdout) => (err ? reject(err) : resolve(JSON.parse(stdout))));
      })));
      const held = runs.filter((r) => r.taken).sort((a, b) => a.from! - b.from!);
      t.true(held.length >= 1, `trial ${trial}: someone took it`);
      for (let i = 1; i < held.length; i++) t.true(held[i]!.from! >= held[i - 1]!.to!, `trial ${trial}: two processes held the lock at once`);
      for (const r of runs.filter((x) => !x.taken)) t.regex(r.error!, /in use by process \d+/);
      t.deepEqual((await readdir(dir)).filter((n) => n.includes('takeover')), [], `trial ${trial}: the guards are cleaned up`);
    }
  });
});

test('small reads are synchronous until one is slow (a page-cache miss), then go through the thread pool for a while', async (t) => {
  await withTempDir(async (dir) => {
    const store = await FileSegmentStore.create(dir, { segmentBytes: 1 << 20, segmentCount: 8 });
    try {
      const data = new Uint8Array(1 << 20);
      for (let i = 0; i < data.length; i++) data[i] = (i * 7 + (i >> 12)) & 255;
      await store.write(1, 0, data);
      const check = async (n: number): Promise<void> => {
        for (let k = 0; k < n; k++) {
          const off = ((k * 4099) % 255) * 4096;
          const got = await store.read(1, off, 4096);
          if (Buffer.compare(Buffer.from(got), Buffer.from(data.subarray(off, off + 4096))) !== 0) t.fail(`read ${k} at ${off} differs`);
        }
      };
      // Fast enough: every small read stays on this thread.
      store.reads.slowSyncReadMicros = Infinity;
      await check(300);
      t.deepEqual(store.reads.counters, { sync: 300, slowSync: 0, async: 0 });
      // Every synchronous read counts as slow: one synchronous read, then 256 through the pool,
      // then a synchronous one again.
      store.reads.slowSyncReadMicros = 0;
      await check(1 + 256 + 1);
      t.deepEqual(store.reads.counters, { sync: 302, slowSync: 2, async: 256 });
      // Large reads (the cleaner's) never count, and are always asynchronous.
      store.reads.slowSyncReadMicros = Infinity;
      await check(255);
      const whole = await store.read(1, 0, 1 << 20);
      t.deepEqual(whole, Buffer.from(data));
      t.deepEqual(store.reads.counters, { sync: 302, slowSync: 2, async: 256 + 255 });
    } finally {
      await store.close();
    }
  });
});

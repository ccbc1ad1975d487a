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
    const store = await FileSegmentStore.create(dir, { segmentBytes: 1 << 20, segmentCount: 16 });
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

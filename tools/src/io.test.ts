/**
 * io: commands run for control-socket clients have their output captured, apart from each
 * other, and once none is running the capture is switched off (its promise hook would
 * otherwise tax every promise of the server for good).
 */
import test from 'ava';
import { type Capture, io } from './io.ts';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const cap = (): Capture => ({ stdout: [], stderr: [], cwd: '/' });

test('captured commands keep their output apart; after the last one ends, nothing is captured any more', async (t) => {
  const written: string[] = [];
  const realWrite = process.stdout.write;
  process.stdout.write = ((s: string) => {
    written.push(String(s));
    return true;
  }) as typeof process.stdout.write;
  try {
    const a = cap();
    const b = cap();
    const long = io.captured(a, async () => {
      io.out('a1');
      await sleep(100);
      io.out('a2'); // b has ended meanwhile: still captured, a is running
      setTimeout(() => io.out('late'), 50); // runs after a has ended
    });
    await io.captured(b, async () => {
      await sleep(10);
      io.out('b1');
      io.err('b-err');
    });
    await long;
    await sleep(120);
    t.deepEqual(a.stdout, ['a1', 'a2']);
    t.deepEqual(b.stdout, ['b1']);
    t.deepEqual(b.stderr, ['b-err']);
    t.deepEqual(written, ['late'], 'output after every command ended goes to the process, not to a finished capture');
    io.out('plain');
    t.deepEqual(written, ['late', 'plain']);
  } finally {
    process.stdout.write = realWrite;
  }
});

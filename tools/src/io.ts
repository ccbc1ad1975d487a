/**
 * Where a command's output goes. Normally stdout and stderr; when `pasture serve` runs a
 * management command for a client on its control socket, the output is captured and sent
 * back instead (AsyncLocalStorage keeps concurrent commands apart).
 *
 * In Node 20 an AsyncLocalStorage, once run, installs a promise hook that every promise of
 * the process pays for, for good: after one `pasture stats` against a server, its NBD
 * requests ran the hook on every promise (promiseInitHook and its callees were about 3% of
 * the server's main thread in random writes, in a V8 profile). So the storage is disabled again whenever no
 * captured command is running, which removes the hook.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import { resolve } from 'node:path';

export interface Capture {
  stdout: string[];
  stderr: string[];
  /** The working directory of the client whose command this is. */
  cwd: string;
}

const capture = new AsyncLocalStorage<Capture>();
/** Captured commands running now; the storage is disabled when this returns to 0. */
let capturing = 0;

export const io = {
  out(s: string): void {
    const c = capture.getStore();
    if (c !== undefined) c.stdout.push(s);
    else process.stdout.write(s);
  },
  err(s: string): void {
    const c = capture.getStore();
    if (c !== undefined) c.stderr.push(s);
    else process.stderr.write(s);
  },
  /** True when output goes to a terminal (progress bars). */
  get tty(): boolean {
    return capture.getStore() === undefined && process.stderr.isTTY === true;
  },
  /** A path the user gave, resolved against their working directory. */
  resolve(...paths: string[]): string {
    return resolve(capture.getStore()?.cwd ?? process.cwd(), ...paths);
  },
  async captured<T>(c: Capture, fn: () => Promise<T>): Promise<T> {
    capturing++;
    try {
      return await capture.run(c, fn);
    } finally {
      // Work a command left running after it returned writes to the server's own output.
      if (--capturing === 0) capture.disable();
    }
  },
};

/** Bytes in binary units: 4096 -> "4.0 KiB". */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let u = 0;
  let v = bytes;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${u === 0 ? v : v.toFixed(1)} ${units[u]}`;
}

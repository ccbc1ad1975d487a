/**
 * Where a command's output goes. Normally stdout and stderr; when `pasture serve` runs a
 * management command for a client on its control socket, the output is captured and sent
 * back instead (AsyncLocalStorage keeps concurrent commands apart).
 */
import { AsyncLocalStorage } from 'node:async_hooks';

export interface Capture {
  stdout: string[];
  stderr: string[];
}

const capture = new AsyncLocalStorage<Capture>();

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
  captured<T>(c: Capture, fn: () => Promise<T>): Promise<T> {
    return capture.run(c, fn);
  },
};

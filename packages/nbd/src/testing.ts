/**
 * Shared by this package's tests: a server on a loopback port over memory devices, a bounded
 * execFile for real clients, temp dirs, seeded random bytes. Not exported from index.ts.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BlockDevice } from './device.ts';
import { NbdServer, type NbdServerOptions } from './server.ts';
import { type StaticExport, StaticExportProvider } from './static-provider.ts';

export interface Served {
  server: NbdServer;
  provider: StaticExportProvider;
  port: number;
  uri: string;
  /** Server log lines so far. */
  logs: string[];
  close(): Promise<void>;
}

/** Serve `exports` on 127.0.0.1, a free port. */
export async function serve(exports: Record<string, StaticExport | BlockDevice>, options: NbdServerOptions & { defaultExport?: string } = {}): Promise<Served> {
  const entries: Record<string, StaticExport> = {};
  for (const [name, e] of Object.entries(exports)) entries[name] = 'device' in e ? e : { device: e };
  const provider = new StaticExportProvider(entries, options.defaultExport);
  const logs: string[] = [];
  const server = new NbdServer(provider, { log: (l) => logs.push(l), ...options });
  const { uri } = await server.listen({ host: '127.0.0.1', port: 0 });
  const port = Number(new URL(uri).port);
  return { server, provider, port, uri, logs, close: () => server.close({ graceful: true }) };
}

export interface Ran {
  code: number;
  stdout: string;
  stderr: string;
}

/** Run a program with a time limit; never rejects (a timeout or failure shows in `code`). */
export function run(file: string, args: string[], timeoutMs = 60_000, env?: NodeJS.ProcessEnv): Promise<Ran> {
  return new Promise((resolve) => {
    execFile(file, args, { timeout: timeoutMs, maxBuffer: 64 * 1024 * 1024, killSignal: 'SIGKILL', ...(env ? { env } : {}) }, (err, stdout, stderr) => {
      const code = err === null ? 0 : typeof err.code === 'number' ? err.code : err.killed ? -9 : -1;
      resolve({ code, stdout: String(stdout), stderr: String(stderr) });
    });
  });
}

export async function withTempDir<T>(f: (dir: string) => Promise<T>): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'pasture-nbd-'));
  try {
    return await f(dir);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** xorshift32: the same seed gives the same stream. */
export class Rng {
  private x: number;
  constructor(readonly seed: number) {
    this.x = seed >>> 0 || 1;
  }
  next(): number {
    let x = this.x;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.x = x >>> 0;
    return this.x;
  }
  /** An integer in [0, n). */
  below(n: number): number {
    return Math.floor((this.next() / 0x100000000) * n);
  }
  bytes(n: number): Buffer {
    const b = Buffer.alloc(n + 3);
    for (let i = 0; i < n; i += 4) b.writeUInt32LE(this.next(), i);
    return b.subarray(0, n);
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.below(xs.length)]!;
  }
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

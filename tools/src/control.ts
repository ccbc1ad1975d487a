/**
 * The control socket: while `pasture serve` holds a store, management commands run by other
 * `pasture` processes are forwarded to it over a unix socket in the store directory
 * (DIR/control.sock) and run there against the open pool; their output and exit code come
 * back. Protocol: one JSON line each way, {argv, cwd} then {stdout, stderr, code}; paths in
 * argv are resolved against the client's cwd (io.resolve).
 */
import { createConnection, createServer, type Socket } from 'node:net';
import { existsSync } from 'node:fs';
import { unlink } from 'node:fs/promises';
import { isAbsolute, join, resolve } from 'node:path';
import { io, type Capture } from './io.ts';

export const CONTROL_SOCKET = 'control.sock';
/** Commands that may run against a live store. */
export const LIVE_COMMANDS = new Set(['volume', 'snap', 'clone', 'flatten', 'diff', 'import', 'export', 'stats']);
/** sun_path is 108 bytes on Linux, with its terminating NUL. */
const MAX_SOCKET_PATH_BYTES = 107;
/** A forwarded command's request line is at most this long. */
const MAX_REQUEST_BYTES = 64 * 1024;

export function controlPath(storeDir: string): string {
  return join(storeDir, CONTROL_SOCKET);
}

/** The control socket's server: `close` stops it, letting commands under way finish. */
export interface ControlServer {
  /**
   * Take no more commands (a request that arrives now is refused), hang up on idle clients,
   * wait for the commands under way to finish and answer, then hang up on the rest. The pool
   * must stay open until this resolves: a command cut off half way would leave its work half
   * done (an import, say).
   */
  close(): Promise<void>;
}

/** Serve commands on DIR/control.sock with `run(argv)`. */
export async function startControl(storeDir: string, run: (argv: string[]) => Promise<number>): Promise<ControlServer> {
  const path = controlPath(storeDir);
  // Longer, and Linux binds a truncated name elsewhere: commands would not find the server.
  if (Buffer.byteLength(path) > MAX_SOCKET_PATH_BYTES) {
    throw new Error(`the control socket ${path} would be ${Buffer.byteLength(path)} bytes long, over the ${MAX_SOCKET_PATH_BYTES} a unix socket's path may have: serve the store by a shorter path (a symlink to its directory will do)`);
  }
  await unlink(path).catch(() => undefined); // a stale socket from a killed server (we hold the store lock)
  let closing = false;
  /** Connections, and the command each one runs (if any). */
  const clients = new Map<Socket, Promise<void> | undefined>();
  const server = createServer((sock) => {
    if (closing) {
      sock.destroy();
      return;
    }
    clients.set(sock, undefined);
    sock.on('close', () => clients.delete(sock));
    let buf = '';
    sock.setEncoding('utf8');
    sock.on('error', () => undefined);
    sock.on('data', (chunk: string) => {
      buf += chunk;
      if (buf.length > MAX_REQUEST_BYTES) {
        sock.destroy();
        return;
      }
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      sock.pause();
      const job = (async () => {
        let code = 1;
        const cap: Capture = { stdout: [], stderr: [], cwd: '/' };
        try {
          const req = JSON.parse(buf.slice(0, nl)) as { argv?: unknown; cwd?: unknown };
          if (closing) {
            cap.stderr.push('pasture: the server is stopping; run the command again once it has stopped\n');
          } else if (typeof req.cwd !== 'string' || !isAbsolute(req.cwd)) {
            cap.stderr.push('pasture: a control request needs the absolute working directory of its client\n');
          } else if (!Array.isArray(req.argv) || !req.argv.every((a) => typeof a === 'string') || !LIVE_COMMANDS.has(req.argv[0] as string)) {
            cap.stderr.push('pasture: the control socket runs only management commands\n');
          } else {
            cap.cwd = req.cwd;
            code = await io.captured(cap, () => run(req.argv as string[]));
          }
        } catch (e) {
          cap.stderr.push(`pasture: ${(e as Error).message}\n`);
        }
        await new Promise<void>((done) => sock.end(JSON.stringify({ stdout: cap.stdout.join(''), stderr: cap.stderr.join(''), code }) + '\n', done));
      })();
      clients.set(sock, job);
    });
  });
  await new Promise<void>((res, rej) => {
    server.once('error', rej);
    server.listen(path, () => res());
  });
  return {
    async close() {
      closing = true;
      const stopped = new Promise<void>((r) => server.close(() => r()));
      for (const [sock, job] of clients) if (job === undefined) sock.destroy();
      await Promise.allSettled([...clients.values()]);
      for (const sock of clients.keys()) sock.destroy();
      await stopped;
    },
  };
}

/**
 * If `argv` is a management command on a store that a live server holds, run it there and
 * return its exit code; undefined if there is no live server (run it here).
 */
export async function forwardIfLive(argv: string[]): Promise<number | undefined> {
  if (!LIVE_COMMANDS.has(argv[0] ?? '')) return undefined;
  const flag = (name: string): string | undefined => {
    const i = argv.findIndex((a) => a === `--${name}` || a.startsWith(`--${name}=`));
    return i < 0 ? undefined : argv[i]!.startsWith(`--${name}=`) ? argv[i]!.slice(name.length + 3) : argv[i + 1];
  };
  const store = flag('store');
  if (store === undefined) return undefined;
  // An S3 store's local directory is its cache directory.
  const local = store.startsWith('s3://') ? flag('cache-dir') : store.startsWith('file:') ? store.slice(5) : store;
  if (local === undefined) return undefined;
  const dir = resolve(local);
  const path = controlPath(dir);
  if (!existsSync(path)) return undefined;
  const reply = await new Promise<string | undefined>((res) => {
    const sock = createConnection(path);
    let data = '';
    sock.setEncoding('utf8');
    sock.on('connect', () => sock.write(JSON.stringify({ argv, cwd: process.cwd() }) + '\n'));
    sock.on('data', (d: string) => (data += d));
    sock.on('end', () => res(data));
    sock.on('error', () => res(undefined)); // nobody listening: a stale socket
  });
  if (reply === undefined) return undefined;
  const r = JSON.parse(reply) as { stdout: string; stderr: string; code: number };
  process.stdout.write(r.stdout);
  process.stderr.write(r.stderr);
  return r.code;
}

/**
 * A real S3 server on 127.0.0.1 for tests: radosgw on a throwaway single-node Ceph, started by
 * ../scripts/s3-server.sh (which documents the recipe). Start-up takes about 2 s and 150 MB of
 * memory; objects live in RAM. Not exported from index.ts.
 *
 * Every started server is stopped when the process exits, even if stop() was never called;
 * if the process dies by SIGKILL instead, the script's watchdog stops it within a second.
 */
import { execFile, spawnSync } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { delimiter, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export interface S3Server {
  /** `http://127.0.0.1:PORT`; use path-style addressing (`forcePathStyle: true`). */
  endpoint: string;
  region: string;
  accessKeyId: string;
  secretAccessKey: string;
  /** Stops the daemons and removes their directory. Idempotent. */
  stop(): Promise<void>;
}

const SCRIPT = fileURLToPath(new URL('../scripts/s3-server.sh', import.meta.url));
const BINARIES = ['radosgw', 'ceph-mon', 'ceph-osd', 'monmaptool', 'ceph-authtool', 'radosgw-admin', 'ceph'] as const;
const INSTALL_HINT = 'apt-get install --no-install-recommends ceph-mon ceph-osd radosgw ceph-common';
/** Generous: start-up takes about 2 s, and the script gives up on any one step after 60 s. */
const START_TIMEOUT_MS = 180_000;
/** The script sends SIGKILL to a daemon 3 s after SIGTERM, so stopping is bounded by ~10 s. */
const STOP_TIMEOUT_MS = 30_000;

function missingBinaries(): string[] {
  const dirs = (process.env['PATH'] ?? '').split(delimiter).filter((d) => d !== '');
  return BINARIES.filter((b) =>
    !dirs.some((d) => {
      try {
        accessSync(join(d, b), constants.X_OK);
        return true;
      } catch {
        return false;
      }
    }),
  );
}

/** True if every program the server needs is on PATH. */
export function s3Available(): boolean {
  return missingBinaries().length === 0;
}

/** Directories of servers started and not yet stopped, for the exit handler. */
const running = new Set<string>();
let exitHandlerInstalled = false;

function stopAllSync(): void {
  for (const dir of running) spawnSync('bash', [SCRIPT, 'stop', dir], { stdio: 'ignore', timeout: STOP_TIMEOUT_MS });
  running.clear();
}

function runScript(args: string[], timeoutMs: number, env: NodeJS.ProcessEnv = process.env): Promise<{ stdout: string; stderr: string; error: Error | null }> {
  return new Promise((resolve) => {
    // SIGTERM on a time-out, so that the script can stop the daemons it has started.
    execFile('bash', [SCRIPT, ...args], { env, timeout: timeoutMs, killSignal: 'SIGTERM', maxBuffer: 16 << 20 }, (error, stdout, stderr) =>
      resolve({ stdout: String(stdout), stderr: String(stderr), error }),
    );
  });
}

function parseEnv(stdout: string): Map<string, string> {
  const vars = new Map<string, string>();
  for (const line of stdout.split('\n')) {
    const m = /^(S3_[A-Z_]+)=(.*)$/.exec(line);
    if (m) vars.set(m[1]!, m[2]!);
  }
  return vars;
}

/**
 * Start a server. Rejects with the script's log (which includes the daemons' last log lines)
 * if any program is missing, a daemon dies, or a step times out; nothing is left running then.
 */
export async function startS3Server(): Promise<S3Server> {
  const missing = missingBinaries();
  if (missing.length > 0) throw new Error(`S3 test server: ${missing.join(', ')} not on PATH (${INSTALL_HINT})`);
  const dir = await mkdtemp(join(tmpdir(), 'pasture-s3-'));
  if (!exitHandlerInstalled) {
    process.on('exit', stopAllSync);
    exitHandlerInstalled = true;
  }
  running.add(dir);
  const { stdout, stderr, error } = await runScript(['start', dir], START_TIMEOUT_MS, { ...process.env, S3_SERVER_OWNER_PID: String(process.pid) });
  const vars = parseEnv(stdout);
  const names = ['S3_ENDPOINT', 'S3_REGION', 'S3_ACCESS_KEY_ID', 'S3_SECRET_ACCESS_KEY'] as const;
  if (error !== null || names.some((n) => !vars.has(n))) {
    running.delete(dir);
    await runScript(['stop', dir], STOP_TIMEOUT_MS); // in case the script itself was killed
    await rm(dir, { recursive: true, force: true });
    const why = /ERROR: (.*)/.exec(stderr)?.[1] ?? error?.message.split('\n')[0] ?? 'no S3_* lines on stdout';
    throw new Error(`S3 test server did not start: ${why}\n${stderr}`);
  }
  let stopped: Promise<void> | undefined;
  return {
    endpoint: vars.get('S3_ENDPOINT')!,
    region: vars.get('S3_REGION')!,
    accessKeyId: vars.get('S3_ACCESS_KEY_ID')!,
    secretAccessKey: vars.get('S3_SECRET_ACCESS_KEY')!,
    stop() {
      stopped ??= (async () => {
        running.delete(dir);
        const r = await runScript(['stop', dir], STOP_TIMEOUT_MS);
        if (r.error !== null) throw new Error(`S3 test server did not stop cleanly: ${r.error.message}\n${r.stderr}`);
      })();
      return stopped;
    },
  };
}

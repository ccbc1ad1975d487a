/**
 * `pnpm bench:nbd [--seconds N] [--rounds N] [--size 1g] [--json]`: Pasture's NBD server (the
 * whole stack, compression on, a file-backed pool) against nbdkit's file plugin and qemu-nbd
 * (--cache=none --aio=native), with ../shared/peers/bench.sh (fio's nbd engine), alternating
 * the servers over several rounds; prints medians and Pasture's ratio to the better peer on
 * each line. Then ../shared/peers/integrity.sh against Pasture.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { stopProcess } from './serve-process.ts';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs, promisify } from 'node:util';

const run = promisify(execFile);
const here = import.meta.dirname;
const repo = resolve(here, '..', '..');
const peers = resolve(repo, '..', 'shared', 'peers');

interface Result {
  test: string;
  iops: number;
  mibps: number;
  p99_us: number;
}

const TARGETS: Record<string, { metric: 'iops' | 'mibps'; target: number; label: string }> = {
  randwrite_4k_qd32: { metric: 'iops', target: 1.5, label: '4 KiB random write QD32 (with its flush)' },
  randrw70_4k_qd16: { metric: 'iops', target: 1.0, label: '70/30 4 KiB mix QD16' },
  randread_4k_qd32: { metric: 'iops', target: 0.8, label: '4 KiB random read QD32' },
  seqwrite_1m_qd8: { metric: 'mibps', target: 0.5, label: '1 MiB sequential write' },
  seqread_1m_qd8: { metric: 'mibps', target: 0.5, label: '1 MiB sequential read' },
  randwrite_4k_qd1: { metric: 'iops', target: 0, label: '4 KiB random write QD1 (no target)' },
};

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0 ? NaN : s[Math.floor(s.length / 2)]!;
}

async function waitForPort(port: number, child: ChildProcess, what: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    if (child.exitCode !== null) throw new Error(`${what} exited with ${child.exitCode}`);
    try {
      await run('nbdinfo', ['--size', `nbd://127.0.0.1:${port}`], { timeout: 5000 });
      return;
    } catch {
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  throw new Error(`${what} did not start on port ${port}`);
}

async function main(): Promise<void> {
  const { values } = parseArgs({ options: { seconds: { type: 'string' }, rounds: { type: 'string' }, size: { type: 'string' }, json: { type: 'boolean' }, dir: { type: 'string' } } });
  const seconds = Number(values.seconds ?? 5);
  const rounds = Number(values.rounds ?? 3);
  const size = values.size ?? '1g';
  const json = !!values.json;
  const say = (s: string): void => {
    if (!json) process.stderr.write(s + '\n');
  };
  const dir = await mkdtemp(join(values.dir ?? tmpdir(), 'pasture-bench-nbd-'));
  const children: ChildProcess[] = [];
  try {
    const bytes = Number(/^(\d+)g$/i.exec(size)?.[1] ?? 1) * 2 ** 30;
    await run('truncate', ['-s', String(bytes), join(dir, 'nbdkit.img')]);
    await run('truncate', ['-s', String(bytes), join(dir, 'qemu.img')]);
    const pasture = (...args: string[]): Promise<{ stdout: string }> => run(process.execPath, ['--import', 'tsx', join(repo, 'tools/src/pasture.ts'), ...args], { maxBuffer: 1 << 24 });
    const store = `file:${join(dir, 'pool')}`;
    await pasture('init', '--store', store, '--segment-bytes', '8M', '--segments', String(Math.ceil((bytes * 3) / (8 << 20)) + 64));
    await pasture('volume', 'create', 'bench', '--size', String(bytes), '--store', store);
    const servers: { name: string; port: number; start: () => ChildProcess }[] = [
      { name: 'nbdkit-file', port: 10852, start: () => spawn('nbdkit', ['-f', '-i', '127.0.0.1', '-p', '10852', 'file', `file=${join(dir, 'nbdkit.img')}`], { stdio: 'ignore' }) },
      { name: 'qemu-nbd-none', port: 10853, start: () => spawn('qemu-nbd', ['-f', 'raw', '-t', '-e', '8', '--cache=none', '--aio=native', '-b', '127.0.0.1', '-p', '10853', join(dir, 'qemu.img')], { stdio: 'ignore' }) },
      { name: 'pasture', port: 10854, start: () => spawn(process.execPath, ['--import', 'tsx', join(repo, 'tools/src/pasture.ts'), 'serve', '--store', store, '--listen', '127.0.0.1:10854', '--export', 'bench'], { stdio: ['ignore', 'ignore', 'inherit'] }) },
    ];
    const procs = new Map<string, ChildProcess>();
    for (const s of servers) {
      const c = s.start();
      children.push(c);
      procs.set(s.name, c);
      await waitForPort(s.port, c, s.name);
    }
    const results = new Map<string, Map<string, Result[]>>();
    for (let r = 0; r < rounds; r++) {
      const order = [...servers.slice(r % servers.length), ...servers.slice(0, r % servers.length)];
      for (const s of order) {
        say(`round ${r + 1}/${rounds}: ${s.name}`);
        const uri = `nbd://127.0.0.1:${s.port}${s.name === 'pasture' ? '/bench' : ''}`;
        const { stdout } = await run('bash', [join(peers, 'bench.sh'), uri, String(seconds), `${s.name}-r${r}`], {
          env: { ...process.env, SIZE: size, OUTDIR: join(dir, 'results'), SERVER_PID: String(procs.get(s.name)!.pid), QUIET_MAX: '20' },
          maxBuffer: 1 << 24,
          timeout: 30 * 60 * 1000,
        });
        for (const line of stdout.split('\n')) {
          if (!line.startsWith('RESULT ')) continue;
          const kv = Object.fromEntries(line.slice(7).split(' ').map((p) => p.split('=') as [string, string]));
          const row: Result = { test: kv.test!, iops: Number(kv.iops), mibps: Number(kv.mibps), p99_us: Number(kv.p99_us) };
          let byTest = results.get(s.name);
          if (byTest === undefined) results.set(s.name, (byTest = new Map()));
          const list = byTest.get(row.test) ?? [];
          list.push(row);
          byTest.set(row.test, list);
        }
      }
    }
    const table: Record<string, unknown>[] = [];
    for (const [test, t] of Object.entries(TARGETS)) {
      const med = (name: string): number => median((results.get(name)?.get(test) ?? []).map((x) => x[t.metric]));
      const ours = med('pasture');
      const nbdkit = med('nbdkit-file');
      const qemu = med('qemu-nbd-none');
      const best = Math.max(nbdkit, qemu);
      const ratio = ours / best;
      table.push({ test, label: t.label, metric: t.metric, pasture: ours, nbdkitFile: nbdkit, qemuNbd: qemu, ratioToBetterPeer: ratio, target: t.target, met: t.target === 0 ? null : ratio >= t.target });
    }
    say('running integrity.sh against Pasture');
    let integrity = { passed: 0, failed: 0, lines: [] as string[] };
    try {
      const r = await run('bash', [join(peers, 'integrity.sh'), 'nbd://127.0.0.1:10854/bench'], { env: { ...process.env, COPY_MB: '128', WORK: join(dir, 'integrity') }, maxBuffer: 1 << 24, timeout: 20 * 60 * 1000 });
      integrity.lines = r.stdout.split('\n').filter((l) => l.startsWith('CHECK'));
    } catch (e) {
      integrity.lines = String((e as { stdout?: string }).stdout ?? '').split('\n').filter((l) => l.startsWith('CHECK'));
    }
    integrity = { ...integrity, passed: integrity.lines.filter((l) => / PASS/.test(l)).length, failed: integrity.lines.filter((l) => / FAIL/.test(l)).length };
    const out = { seconds, rounds, size, table, integrity };
    if (json) process.stdout.write(JSON.stringify(out) + '\n');
    else {
      process.stdout.write(`| workload | Pasture | nbdkit file | qemu-nbd none/native | ratio to better | target |\n|---|---|---|---|---|---|\n`);
      for (const row of table) {
        const f = (v: unknown): string => (Number.isFinite(v as number) ? (v as number).toFixed(0) : 'n/a');
        process.stdout.write(`| ${String(row.label)} (${String(row.metric)}) | ${f(row.pasture)} | ${f(row.nbdkitFile)} | ${f(row.qemuNbd)} | ${(row.ratioToBetterPeer as number).toFixed(2)}x | ${row.target ? `${String(row.target)}x ${row.met ? 'met' : 'NOT met'}` : '-'} |\n`);
      }
      process.stdout.write(`integrity.sh against Pasture: ${integrity.passed} passed, ${integrity.failed} failed\n${integrity.lines.join('\n')}\n`);
    }
  } finally {
    for (const c of children) await stopProcess(c, 20_000);
    await rm(dir, { recursive: true, force: true });
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`bench:nbd: ${(e as Error).stack ?? String(e)}\n`);
  process.exitCode = 1;
});

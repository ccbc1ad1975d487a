/**
 * `pasture serve` end to end with real clients from Debian (qemu-io, nbdinfo): exports,
 * live management through the control socket, a second opener refused, Prometheus metrics,
 * a clean SIGTERM, and a SIGKILL in the middle of a write workload followed by a restart.
 * Loopback only; every process started here is ended here, by PID.
 */
import test from 'ava';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { startServe } from './serve-process.ts';
import { mkdtemp, open, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { createConnection, createServer } from 'node:net';
import { randomFillSync } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const cli = fileURLToPath(new URL('./pasture.ts', import.meta.url));
const run = promisify(execFile);

async function pasture(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await run(process.execPath, ['--import', 'tsx', cli, ...args], { timeout: 60_000 });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

async function qemuIo(uri: string, ...cmds: string[]): Promise<string> {
  const args = ['-f', 'raw', ...(uri.includes('@') ? ['-r'] : [])]; // snapshots are read-only exports
  for (const c of cmds) args.push('-c', c);
  const { stdout } = await run('qemu-io', [...args, uri], { timeout: 60_000 });
  if (/verification failed|error/i.test(stdout)) throw new Error(`qemu-io ${cmds.join('; ')}: ${stdout}`);
  return stdout;
}

function startServer(store: string, port: number, extra: string[] = []): Promise<{ child: ChildProcess; uri: string }> {
  return startServe(['--store', store, '--listen', `127.0.0.1:${port}`, ...extra], { timeoutMs: 30_000 });
}

function exited(child: ChildProcess): Promise<number | null> {
  return child.exitCode !== null ? Promise.resolve(child.exitCode) : new Promise((r) => child.once('exit', (code) => r(code)));
}

test('serve: real clients, live snapshot through the control socket, a second opener refused, metrics, clean SIGTERM', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'pasture-serve-'));
  let child: ChildProcess | undefined;
  try {
    const store = `file:${join(dir, 'pool')}`;
    t.is((await pasture('init', '--store', store, '--segment-bytes', '1M', '--segments', '256')).code, 0);
    t.is((await pasture('volume', 'create', 'vm', '--size', '64M', '--store', store)).code, 0);
    const s = await startServer(store, 10931, ['--metrics', '127.0.0.1:10932']);
    child = s.child;
    const vm = `${s.uri}/vm`;
    await qemuIo(vm, 'write -P 0xab 0 4M', 'flush');
    await qemuIo(vm, 'read -P 0xab 0 4M');
    // WRITE_ZEROES: qemu sends NO_HOLE unless told it may unmap (-u). With it the range stays
    // allocated; without, it becomes a hole. Both read as zeros.
    await qemuIo(vm, 'write -P 0x5e 8M 2M', 'write -z 8M 1M', 'write -z -u 9M 1M', 'read -P 0 8M 2M');
    const { stdout: mapOut } = await run('qemu-img', ['map', '--output=json', '-f', 'raw', vm], { timeout: 30_000 });
    const extents = JSON.parse(mapOut) as { start: number; length: number; data: boolean }[];
    const dataAt = (off: number): boolean | undefined => extents.find((e) => e.start <= off && off < e.start + e.length)?.data;
    t.deepEqual([dataAt(8 << 20), dataAt((9 << 20) - 4096), dataAt(9 << 20), dataAt((10 << 20) - 4096)], [true, true, false, false], mapOut);
    // Live management: the CLI finds the control socket by itself.
    const snap = await pasture('snap', 'create', 'vm@before', '--store', store, '--json');
    t.is(snap.code, 0, snap.stderr);
    await qemuIo(vm, 'write -P 0xcd 0 1M');
    // The snapshot is exported read-only and holds exactly what was written before it.
    await qemuIo(`${s.uri}/vm@before`, 'read -P 0xab 0 4M');
    const { stdout: list } = await run('nbdinfo', ['--list', '--json', s.uri], { timeout: 30_000 });
    const exps = (JSON.parse(list) as { exports: { 'export-name': string; is_read_only: boolean }[] }).exports;
    t.deepEqual(exps.map((e) => [e['export-name'], e.is_read_only]).sort(), [['vm', false], ['vm@before', true]]);
    const live = await pasture('volume', 'list', '--store', store, '--json');
    t.is(live.code, 0);
    t.is(JSON.parse(live.stdout).volumes[0].snapshots, 1);
    // A second process that opens the store directly is refused, naming the holder.
    const fsck = await pasture('fsck', '--store', store);
    t.is(fsck.code, 1);
    t.regex(fsck.stderr + fsck.stdout, /store is in use by process \d+ on /);
    // Metrics.
    const metrics = await (await fetch('http://127.0.0.1:10932/metrics')).text();
    t.regex(metrics, /pasture_nbd_requests_total\{command="write"\} [1-9]/);
    t.regex(metrics, /pasture_nbd_request_duration_seconds_bucket\{command="read",le="\+Inf"\} [1-9]/);
    t.regex(metrics, /pasture_cow_compression_ratio /);
    // SIGTERM: finish, flush, close, exit 0; the data is there after a restart.
    child.kill('SIGTERM');
    t.is(await exited(child), 0);
    child = undefined;
    const again = await startServer(store, 10933);
    child = again.child;
    await qemuIo(`${again.uri}/vm`, 'read -P 0xcd 0 1M', 'read -P 0xab 1M 3M');
    child.kill('SIGTERM');
    t.is(await exited(child), 0);
    child = undefined;
  } finally {
    if (child !== undefined && child.exitCode === null) child.kill('SIGKILL');
    await rm(dir, { recursive: true, force: true });
  }
});

test('serve: SIGKILL in the middle of writes; after a restart everything flushed before reads back intact', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'pasture-kill-'));
  let child: ChildProcess | undefined;
  try {
    const store = `file:${join(dir, 'pool')}`;
    t.is((await pasture('init', '--store', store, '--segment-bytes', '1M', '--segments', '512')).code, 0);
    t.is((await pasture('volume', 'create', 'vm', '--size', '256M', '--store', store)).code, 0);
    const s = await startServer(store, 10934);
    child = s.child;
    const vm = `${s.uri}/vm`;
    // Acknowledged and flushed: 8 patterned MiB.
    const patterns = [0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88];
    await qemuIo(vm, ...patterns.map((p, i) => `write -P ${p} ${i}M 1M`), 'flush');
    // Then a random write workload elsewhere, killed mid-way.
    const fio = spawn('fio', ['--name=w', '--ioengine=nbd', `--uri=${vm}`, '--rw=randwrite', '--bs=4k', '--iodepth=16', '--offset=64M', '--size=128M', '--time_based', '--runtime=30'], { stdio: 'ignore' });
    await new Promise((r) => setTimeout(r, 2500));
    child.kill('SIGKILL');
    await exited(child);
    child = undefined;
    fio.kill('SIGKILL');
    await exited(fio);
    const again = await startServer(store, 10935);
    child = again.child;
    await qemuIo(`${again.uri}/vm`, ...patterns.map((p, i) => `read -P ${p} ${i}M 1M`));
    t.pass();
    child.kill('SIGTERM');
    t.is(await exited(child), 0);
    child = undefined;
    const fsck = await pasture('fsck', '--store', store, '--json');
    t.is(fsck.code, 0, fsck.stdout);
  } finally {
    if (child !== undefined && child.exitCode === null) child.kill('SIGKILL');
    await rm(dir, { recursive: true, force: true });
  }
});

test('serve: live management is durable when it answers, also by a symlinked path; a start that fails exits and frees the store', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'pasture-live-'));
  let child: ChildProcess | undefined;
  const busy = createServer();
  try {
    const path = join(dir, 'pool');
    const store = `file:${path}`;
    t.is((await pasture('init', '--store', store, '--segment-bytes', '1M', '--segments', '128')).code, 0);
    t.is((await pasture('volume', 'create', 'vm', '--size', '16M', '--store', store)).code, 0);
    const image = join(dir, 'image.raw');
    const bytes = randomFillSync(Buffer.alloc(3 << 20));
    await writeFile(image, bytes);
    await symlink(path, join(dir, 'link'));
    const s = await startServer(store, 10936);
    child = s.child;
    const imp = await pasture('import', image, 'imp', '--store', store);
    t.is(imp.code, 0, imp.stderr);
    // Through a symlink to the store's directory: the server takes it for its own store.
    const snap = await pasture('snap', 'create', 'vm@s1', '--store', `file:${join(dir, 'link')}`);
    t.is(snap.code, 0, snap.stderr);
    const stats = JSON.parse((await pasture('stats', '--store', store, '--json')).stdout) as { live: boolean; grass: { recovery?: { millis: number } } };
    t.true(stats.live);
    t.is(typeof stats.grass.recovery?.millis, 'number', 'live stats give the recovery report as offline stats do');
    // The server dies at once: what the commands said they did is there.
    child.kill('SIGKILL');
    await exited(child);
    child = undefined;
    const snaps = JSON.parse((await pasture('snap', 'list', 'vm', '--store', store, '--json')).stdout) as { snapshots: { name: string }[] };
    t.deepEqual(snaps.snapshots.map((x) => x.name), ['s1'], 'the snapshot survived');
    const vols = JSON.parse((await pasture('volume', 'list', '--store', store, '--json')).stdout) as { volumes: { name: string; incomplete?: boolean }[] };
    t.deepEqual(vols.volumes.map((v) => [v.name, v.incomplete === true]), [['vm', false], ['imp', false]], 'the import is marked complete');
    const out = join(dir, 'out.raw');
    const exp = await pasture('export', 'imp', out, '--store', store);
    t.is(exp.code, 0, exp.stderr);
    t.true(Buffer.compare(await readFile(out), bytes) === 0, 'the imported volume survived whole');

    // A start that fails after the pool is open (the metrics port is taken) exits, and leaves
    // the store free for the next opener.
    await new Promise<void>((r) => busy.listen(10937, '127.0.0.1', () => r()));
    const failed = await pasture('serve', '--store', store, '--listen', '127.0.0.1:10938', '--metrics', '127.0.0.1:10937');
    t.not(failed.code, 0);
    t.regex(failed.stderr, /EADDRINUSE/);
    t.is((await pasture('volume', 'list', '--store', store)).code, 0, 'the store is free');

    // A store whose control socket path would be too long for a unix socket is refused clearly.
    const long = join(dir, 'd'.repeat(60), 'e'.repeat(40));
    t.is((await pasture('init', '--store', `file:${long}`, '--segment-bytes', '1M', '--segments', '32')).code, 0);
    const tooLong = await pasture('serve', '--store', `file:${long}`, '--listen', '127.0.0.1:10939');
    t.not(tooLong.code, 0);
    t.regex(tooLong.stderr, /control socket .* over the 107/);
    const empty = await pasture('volume', 'list', '--store', 'file:');
    t.not(empty.code, 0);
    t.regex(empty.stderr, /names no directory/);
  } finally {
    busy.close();
    if (child !== undefined && child.exitCode === null) child.kill('SIGKILL');
    await rm(dir, { recursive: true, force: true });
  }
});

/** Send one request line on the control socket `sock`; the reply, or undefined if it hung up without one. */
function controlRequest(sockPath: string, argv: string[], delayMs = 0): Promise<{ code: number; stdout: string; stderr: string } | undefined> {
  return new Promise((resolve) => {
    const c = createConnection(sockPath);
    let buf = '';
    c.setEncoding('utf8');
    c.on('data', (d: string) => (buf += d));
    c.on('error', () => undefined);
    c.on('close', () => resolve(buf.includes('\n') ? JSON.parse(buf.slice(0, buf.indexOf('\n'))) : undefined));
    c.on('connect', () => setTimeout(() => c.write(JSON.stringify({ argv, cwd: '/' }) + '\n'), delayMs));
  });
}

test('serve: SIGTERM lets a command under way on the control socket finish, takes no new ones, and does not wait for idle clients', async (t) => {
  const dir = await mkdtemp(join(tmpdir(), 'pasture-ctl-'));
  let child: ChildProcess | undefined;
  try {
    const storeDir = join(dir, 'pool');
    const store = `file:${storeDir}`;
    t.is((await pasture('init', '--store', store, '--segment-bytes', '4M', '--segments', '512')).code, 0);
    // An image large enough that its import is still under way when SIGTERM comes.
    const image = join(dir, 'image.raw');
    const fh = await open(image, 'w');
    const chunk = Buffer.alloc(1 << 20);
    for (let i = 0; i < 384; i++) await fh.write(randomFillSync(chunk), 0, chunk.length, i << 20);
    await fh.close();
    const s = await startServer(store, 10937);
    child = s.child;
    const sockPath = join(storeDir, 'control.sock');
    const idle = createConnection(sockPath); // connected, never sends anything
    idle.on('error', () => undefined);
    await new Promise((r) => idle.once('connect', r));
    let importDone = false;
    const importing = controlRequest(sockPath, ['import', image, 'imp', '--store', store]).then((r) => {
      importDone = true;
      return r;
    });
    // One that asks only after SIGTERM.
    const late = controlRequest(sockPath, ['volume', 'create', 'late', '--size', '1M', '--store', store], 400);
    await new Promise((r) => setTimeout(r, 150));
    t.false(importDone, 'the import is under way at SIGTERM');
    child.kill('SIGTERM');
    const code = await Promise.race([exited(child), new Promise((r) => setTimeout(() => r('still running after 60 s'), 60_000))]);
    t.is(code, 0, 'the server stopped, although a client was still connected');
    child = undefined;
    const imported = await importing;
    t.is(imported?.code, 0, `the import finished: ${imported?.stderr}`);
    const lateReply = await late;
    t.true(lateReply === undefined || (lateReply.code !== 0 && /stopping/.test(lateReply.stderr)), `a command after SIGTERM is refused: ${JSON.stringify(lateReply)}`);
    idle.destroy();
    // The store holds the whole image, and no volume the late command would have made.
    const list = await pasture('volume', 'list', '--store', store, '--json');
    t.deepEqual((JSON.parse(list.stdout) as { volumes: { name: string }[] }).volumes.map((v) => v.name), ['imp']);
    t.is((await pasture('export', 'imp', join(dir, 'out.raw'), '--store', store)).code, 0);
    await run('cmp', [image, join(dir, 'out.raw')]);
  } finally {
    if (child !== undefined && child.exitCode === null) child.kill('SIGKILL');
    await rm(dir, { recursive: true, force: true });
  }
});

/**
 * A live server, two well-behaved clients writing and verifying against a model, and several
 * raw sockets throwing random, mutated, pipelined and truncated handshake and request traffic
 * at it, for NBD_FUZZ_MS (default 15 s). Seeded: NBD_FUZZ_SEED reproduces a run's traffic
 * (socket timing still varies). Asserts the good clients' data stays right, the server still
 * serves afterwards, every fuzz connection is closed, and nothing was left unhandled.
 */
import test from 'ava';
import { type Socket, connect } from 'node:net';
import { join } from 'node:path';
import { NbdClient, infoRequest, metaContextRequest, optionRequest } from './client.ts';
import { MemoryDevice } from './memory-device.ts';
import * as P from './protocol.ts';
import { Rng, run, serve, sleep, withTempDir } from './testing.ts';
import { readFile } from 'node:fs/promises';

const KiB = 1024;
const MiB = 1024 * KiB;
const SEED = Number(process.env['NBD_FUZZ_SEED'] ?? 1_234_567);
const DURATION_MS = Number(process.env['NBD_FUZZ_MS'] ?? 15_000);
const FUZZERS = 6;
const PRECIOUS = ['precious-export-of-good-client-number-1', 'precious-export-of-good-client-number-2'];
const FUZZ_EXPORTS = ['x', '', 'ro', 'aligned', 'nope'];

const unhandled: unknown[] = [];
process.on('unhandledRejection', (e) => unhandled.push(e));
process.on('uncaughtException', (e) => unhandled.push(e));

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}

/** Flip bits, overwrite, cut or extend a message, sometimes. */
function mutate(rng: Rng, b: Buffer): Buffer {
  switch (rng.below(8)) {
    case 0: {
      const c = Buffer.from(b);
      for (let i = 0, n = 1 + rng.below(4); i < n && c.length > 0; i++) c[rng.below(c.length)]! ^= 1 << rng.below(8);
      return c;
    }
    case 1:
      return b.subarray(0, rng.below(b.length + 1));
    case 2: {
      const c = Buffer.from(b);
      if (c.length >= 4) c.writeUInt32BE(rng.next(), rng.below(c.length - 3));
      return c;
    }
    case 3:
      return Buffer.concat([b, rng.bytes(rng.below(64))]);
    default:
      return b;
  }
}

function randomOption(rng: Rng): Buffer {
  const name = rng.below(6) === 0 ? rng.bytes(rng.below(40)).toString('latin1') : rng.pick(FUZZ_EXPORTS);
  switch (rng.below(11)) {
    case 0:
      return optionRequest(P.NBD_OPT_LIST);
    case 1:
      return optionRequest(P.NBD_OPT_INFO, infoRequest(name, [0, 1, 2, 3, rng.below(65536)].slice(0, rng.below(6))));
    case 2:
      return optionRequest(P.NBD_OPT_STRUCTURED_REPLY);
    case 3:
      return optionRequest(P.NBD_OPT_LIST_META_CONTEXT, metaContextRequest(name, ['base:', 'base:allocation', 'qemu:x', 'nocolon', ''].slice(0, rng.below(6))));
    case 4:
      return optionRequest(P.NBD_OPT_SET_META_CONTEXT, metaContextRequest(name, [P.BASE_ALLOCATION, 'base:', 'x-y:z'].slice(0, rng.below(4))));
    case 5:
      return optionRequest(P.NBD_OPT_STARTTLS);
    case 6:
      return optionRequest(rng.next(), rng.bytes(rng.below(100)));
    case 7: {
      // An option header claiming a huge length, with little behind it.
      const h = optionRequest(rng.pick([P.NBD_OPT_INFO, P.NBD_OPT_LIST, 77]));
      h.writeUInt32BE(rng.pick([P.MAX_OPTION_DATA_BYTES + 1, 0xffffffff, 1 << 20]), 12);
      return h;
    }
    case 8:
      return optionRequest(P.NBD_OPT_ABORT);
    case 9:
      return optionRequest(P.NBD_OPT_EXPORT_NAME, Buffer.from(name, 'latin1'));
    default:
      return optionRequest(P.NBD_OPT_GO, infoRequest(name, [3]));
  }
}

function randomRequest(rng: Rng): Buffer {
  const type = rng.below(10) === 0 ? rng.below(65536) : rng.below(8);
  const flags = rng.below(3) === 0 ? rng.below(65536) : rng.pick([0, 0, P.NBD_CMD_FLAG_FUA, P.NBD_CMD_FLAG_REQ_ONE, P.NBD_CMD_FLAG_NO_HOLE | P.NBD_CMD_FLAG_FAST_ZERO, P.NBD_CMD_FLAG_DF]);
  const offset = rng.pick([0n, BigInt(rng.below(8 * MiB)), BigInt(8 * MiB - 512), 0xffffffffffffff00n, BigInt(rng.next()) << 20n]);
  const length = rng.pick([0, 512, rng.below(64 * KiB), rng.below(2 * MiB), 0xffffffff, 4096]);
  const h = Buffer.alloc(28);
  h.writeUInt32BE(rng.below(30) === 0 ? rng.next() : P.NBD_REQUEST_MAGIC, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  h.writeUInt32BE(rng.next(), 8);
  h.writeBigUInt64BE(offset & 0xffffffffffffffffn, 16);
  h.writeUInt32BE(length, 24);
  if (type !== P.NBD_CMD_WRITE) return h;
  // Payload: usually what the header promised (if small), sometimes short.
  const payload = rng.bytes(Math.min(length, rng.below(4) === 0 ? rng.below(4096) : 64 * KiB));
  return Buffer.concat([h, payload]);
}

/** One fuzz connection's bytes. */
function traffic(rng: Rng): Buffer {
  const parts: Buffer[] = [];
  const kind = rng.below(10);
  if (kind === 0) return rng.bytes(rng.below(2000));
  // Client flags: usually the right ones.
  parts.push(rng.below(8) === 0 ? rng.bytes(4) : u32(P.NBD_FLAG_C_FIXED_NEWSTYLE | (rng.below(2) ? P.NBD_FLAG_C_NO_ZEROES : 0)));
  if (kind <= 3) {
    for (let i = 0, n = 1 + rng.below(12); i < n; i++) parts.push(mutate(rng, randomOption(rng)));
    return Buffer.concat(parts);
  }
  // A handshake that probably reaches transmission, then requests.
  const name = rng.pick(['x', 'x', '', 'ro', 'aligned']);
  if (rng.below(3) !== 0) parts.push(optionRequest(P.NBD_OPT_STRUCTURED_REPLY), optionRequest(P.NBD_OPT_SET_META_CONTEXT, metaContextRequest(name, [P.BASE_ALLOCATION])));
  parts.push(rng.below(4) === 0 ? optionRequest(P.NBD_OPT_EXPORT_NAME, Buffer.from(name)) : optionRequest(P.NBD_OPT_GO, infoRequest(name, [])));
  for (let i = 0, n = 1 + rng.below(40); i < n; i++) parts.push(rng.below(6) === 0 ? mutate(rng, randomRequest(rng)) : randomRequest(rng));
  if (rng.below(4) === 0) parts.push(rng.bytes(rng.below(300)));
  return Buffer.concat(parts);
}

/** Send `bytes` in random pieces, read and drop replies, then leave in one of several rude ways. */
async function fuzzOnce(port: number, rng: Rng): Promise<void> {
  const bytes = traffic(rng);
  const socket: Socket = connect(port, '127.0.0.1');
  socket.on('error', () => {});
  socket.on('data', () => {});
  await new Promise<void>((resolve) => {
    socket.once('connect', resolve);
    socket.once('close', resolve);
  });
  let at = 0;
  while (at < bytes.length && !socket.destroyed) {
    const n = 1 + rng.below(rng.below(4) === 0 ? 16 : 8192);
    socket.write(bytes.subarray(at, at + n));
    at += n;
    if (rng.below(8) === 0) await sleep(rng.below(5));
  }
  const linger = rng.below(150);
  switch (rng.below(3)) {
    case 0:
      socket.destroy();
      break;
    case 1:
      socket.end();
      await sleep(linger);
      socket.destroy();
      break;
    default:
      await sleep(linger);
      socket.destroy();
  }
}

/** Read a whole export in 1 MiB requests (the fuzz server's request limit). */
async function readAll(c: NbdClient, size: number): Promise<Buffer> {
  const parts: Buffer[] = [];
  for (let at = 0; at < size; at += MiB) parts.push(await c.read(at, Math.min(MiB, size - at)));
  return Buffer.concat(parts);
}

/** A client that writes, reads back and checks against a model until the deadline. */
async function goodClient(port: number, exportName: string, structuredReplies: boolean, rng: Rng, deadline: number): Promise<{ ops: number; model: Buffer }> {
  const size = 16 * MiB;
  const model = Buffer.alloc(size);
  const c = await NbdClient.connect({ port }, { exportName, structuredReplies, baseAllocation: structuredReplies });
  let ops = 0;
  while (Date.now() < deadline) {
    const offset = rng.below(size - 256 * KiB);
    const length = 1 + rng.below(256 * KiB);
    switch (rng.below(7)) {
      case 0:
      case 1:
      case 2: {
        const data = rng.bytes(length);
        await c.write(offset, data, rng.below(4) === 0);
        data.copy(model, offset);
        break;
      }
      case 3: {
        const got = await c.read(offset, length);
        if (!got.equals(model.subarray(offset, offset + length))) throw new Error(`${exportName}: read ${offset}+${length} differs from the model (seed ${SEED})`);
        break;
      }
      case 4:
        await c.zero(offset, length);
        model.fill(0, offset, offset + length);
        break;
      case 5:
        // MemoryDevice reads trimmed bytes as zeros (the spec allows either zeros or old data).
        await c.trim(offset, length);
        model.fill(0, offset, offset + length);
        break;
      default:
        await c.flush();
        if (structuredReplies) {
          let at = offset;
          for (const e of await c.blockStatus(offset, length)) {
            if ((e.flags & P.NBD_STATE_ZERO) !== 0 && !model.subarray(at, at + e.length).every((b) => b === 0)) throw new Error(`${exportName}: block status says zero at ${at}+${e.length}, the model does not`);
            at += e.length;
          }
        }
    }
    ops++;
  }
  const all = await readAll(c, size);
  if (!all.equals(model)) throw new Error(`${exportName}: final read differs from the model (seed ${SEED})`);
  await c.disconnect();
  return { ops, model };
}

test('fuzzed handshakes and requests never disturb a well-behaved client or the server', async (t) => {
  t.timeout(DURATION_MS + 60_000);
  t.log(`seed ${SEED}, ${DURATION_MS} ms, ${FUZZERS} fuzzers (NBD_FUZZ_SEED / NBD_FUZZ_MS to change)`);
  await withTempDir(async (dir) => {
    // TLS is offered (not required) so fuzzed STARTTLS leads into TLS handshakes with garbage.
    const ok = await run('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'), '-days', '1', '-subj', '/CN=localhost'], 30_000);
    t.is(ok.code, 0, ok.stderr);
    const devices = PRECIOUS.map(() => new MemoryDevice({ size: 16 * MiB }));
    const s = await serve(
      {
        [PRECIOUS[0]!]: devices[0]!,
        [PRECIOUS[1]!]: devices[1]!,
        x: new MemoryDevice({ size: 8 * MiB }),
        ro: new MemoryDevice({ size: MiB, readOnly: true }),
        aligned: new MemoryDevice({ size: MiB, blockSize: { minimum: 512, preferred: 4096, maximum: 256 * KiB } }),
      },
      { defaultExport: 'x', maxRequestBytes: MiB, maxInflightBytesPerConnection: 4 * MiB, tls: { cert: await readFile(join(dir, 'cert.pem')), key: await readFile(join(dir, 'key.pem')), require: false } },
    );
    try {
    const deadline = Date.now() + DURATION_MS;
    let fuzzConnections = 0;
    const fuzzers = Array.from({ length: FUZZERS }, async (_, i) => {
      const rng = new Rng(SEED + 1000 * (i + 1));
      while (Date.now() < deadline) {
        await fuzzOnce(s.port, rng);
        fuzzConnections++;
      }
    });
    const good = await Promise.all([goodClient(s.port, PRECIOUS[0]!, true, new Rng(SEED), deadline), goodClient(s.port, PRECIOUS[1]!, false, new Rng(SEED + 1), deadline)]);
    await Promise.all(fuzzers);
    t.log(`${fuzzConnections} fuzz connections; good clients did ${good.map((g) => g.ops).join(' and ')} operations`);
    t.true(fuzzConnections > 200, 'the fuzzers got going');
    t.true(good.every((g) => g.ops > 50), 'the good clients got going');

    // Still serving: a fresh client reads what the good clients left.
    const check = await NbdClient.connect({ port: s.port }, { exportName: PRECIOUS[0]! });
    t.true((await readAll(check, 16 * MiB)).equals(good[0]!.model));
    await check.disconnect();
    for (const [i, d] of devices.entries()) t.true(Buffer.from(await d.read(0, 16 * MiB)).equals(good[i]!.model), `device ${i}`);

    // Every fuzz connection ends: none is left holding resources.
    for (let i = 0; i < 100 && s.server.stats().connections > 0; i++) await sleep(50);
    const st = s.server.stats();
    t.is(st.connections, 0, 'no connection left open');
    t.log(`protocol errors ${st.protocolErrors}, transmissions ${st.transmissions}, requests ${JSON.stringify(st.requests)}, errors ${JSON.stringify(st.errorsByErrno)}`);
    const reasons = new Map<string, number>();
    for (const l of s.logs) {
      const why = l.replace(/^nbd [^:]*:\d+: /, '').replace(/[0-9a-fx]{3,}|"(?:[^"\\]|\\.)*"/g, '#').slice(0, 60);
      reasons.set(why, (reasons.get(why) ?? 0) + 1);
    }
    t.log([...reasons].sort((a, b) => b[1] - a[1]).map(([why, n]) => `${n} ${why}`).join('\n'));
    t.true(st.protocolErrors > 0 && st.transmissions > 0 && st.errors > 0, 'the fuzz reached every phase');
    const closed = await Promise.race([s.close().then(() => true), sleep(10_000).then(() => false)]);
    t.true(closed, 'graceful close finishes');
    t.true(s.logs.every((l) => !l.includes('internal error')), s.logs.filter((l) => l.includes('internal error')).slice(0, 5).join('\n'));
    } finally {
      await s.server.close({ graceful: false });
    }
  });
  t.deepEqual(unhandled, [], 'no unhandled rejection or exception');
});

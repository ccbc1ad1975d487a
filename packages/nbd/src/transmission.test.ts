import test from 'ava';
import { NbdClient, NbdReplyError, connectSocket, infoRequest, optionRequest } from './client.ts';
import type { BlockDevice } from './device.ts';
import { FaultyDevice } from './faulty-device.ts';
import { MemoryDevice } from './memory-device.ts';
import * as P from './protocol.ts';
import { Rng, serve, sleep } from './testing.ts';
import { MAX_INFLIGHT_REQUESTS } from './transmission.ts';

const KiB = 1024;
const MiB = 1024 * KiB;

/** Wait until `cond()` holds, up to `ms` (a loaded machine delays loopback traffic; fixed sleeps flake). */
async function until(cond: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond() && Date.now() < end) await sleep(5);
}

async function rejectsWith(t: { is: (a: unknown, b: unknown, m?: string) => void; fail: (m: string) => void }, p: Promise<unknown>, errno: number, what: string): Promise<void> {
  try {
    await p;
    t.fail(`${what}: expected error ${errno}`);
  } catch (e) {
    t.is(e instanceof NbdReplyError ? e.errno : e, errno, what);
  }
}

test('reads and writes round-trip, with structured and with simple replies', async (t) => {
  const s = await serve({ disk: new MemoryDevice({ size: 8 * MiB }) });
  const rng = new Rng(1);
  for (const structuredReplies of [true, false]) {
    const c = await NbdClient.connect({ port: s.port }, { exportName: 'disk', structuredReplies });
    t.is(c.size, 8 * MiB);
    const data = rng.bytes(300 * KiB);
    await c.write(12345, data);
    t.true((await c.read(12345, data.length)).equals(data));
    const r = await c.request(P.NBD_CMD_READ, { offset: 0, length: 4096 });
    t.deepEqual(r.chunks, structuredReplies ? ['offset_data'] : ['simple']);
    await c.write(8 * MiB - 1, Buffer.from([9]), true);
    t.deepEqual(await c.read(8 * MiB - 1, 1), Buffer.from([9]));
    await c.disconnect();
  }
  const st = s.server.stats();
  t.true(st.requests['read']! >= 4 && st.requests['write']! >= 4);
  t.is(st.errors, 0);
  t.true(st.bytesWritten >= 600 * KiB);
  t.is(st.latency['read']!['+Inf'], st.requests['read']);
  await s.close();
});

test('out of range: EINVAL for reads, trims, cache and block status; ENOSPC for writes and zeroes', async (t) => {
  const s = await serve({ disk: new MemoryDevice({ size: MiB }) });
  const c = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
  await rejectsWith(t, c.read(MiB - 10, 11), P.NBD_EINVAL, 'read past the end');
  await rejectsWith(t, c.write(MiB, Buffer.alloc(1)), P.NBD_ENOSPC, 'write past the end');
  await rejectsWith(t, c.zero(MiB - 4096, 8192), P.NBD_ENOSPC, 'zero past the end');
  await rejectsWith(t, c.trim(MiB - 4096, 8192), P.NBD_EINVAL, 'trim past the end');
  await rejectsWith(t, c.cache(2 * MiB, 1), P.NBD_EINVAL, 'cache past the end');
  await rejectsWith(t, c.blockStatus(MiB, 1), P.NBD_EINVAL, 'block status past the end');
  const huge = await c.request(P.NBD_CMD_READ, { offset: 0xffffffffffffff00n, length: 512 });
  t.is(huge.error, P.NBD_EINVAL, 'a 64-bit offset');
  t.deepEqual(huge.chunks, ['error']);
  t.regex(huge.message, /past the export size/);
  t.deepEqual(await c.read(0, 16), Buffer.alloc(16), 'the connection carries on');
  await c.disconnect();
  await s.close();
});

test('zero-length requests succeed without touching the device; zero-length block status is EINVAL', async (t) => {
  const dev = new MemoryDevice({ size: MiB });
  const s = await serve({ disk: dev });
  for (const structuredReplies of [true, false]) {
    const c = await NbdClient.connect({ port: s.port }, { exportName: 'disk', structuredReplies });
    const r = await c.request(P.NBD_CMD_READ, { offset: MiB, length: 0 });
    t.is(r.error, 0);
    t.deepEqual(r.chunks, structuredReplies ? ['none'] : ['simple']);
    t.is((await c.request(P.NBD_CMD_WRITE, { offset: 5, payload: Buffer.alloc(0) })).error, 0);
    t.is((await c.request(P.NBD_CMD_TRIM, { offset: 0, length: 0 })).error, 0);
    t.is((await c.request(P.NBD_CMD_WRITE_ZEROES, { offset: 0, length: 0 })).error, 0);
    t.is((await c.request(P.NBD_CMD_CACHE, { offset: 0, length: 0 })).error, 0);
    t.is((await c.request(P.NBD_CMD_READ, { offset: MiB + 1, length: 0 })).error, P.NBD_EINVAL, 'offset past the end, even for zero bytes');
    if (structuredReplies) t.is((await c.request(P.NBD_CMD_BLOCK_STATUS, { offset: 0, length: 0 })).error, P.NBD_EINVAL);
    await c.disconnect();
  }
  t.deepEqual([dev.calls.read, dev.calls.write, dev.calls.trim, dev.calls.zero, dev.calls.cache], [0, 0, 0, 0, 0]);
  await s.close();
});

test('unknown commands and flags are EINVAL and the connection carries on', async (t) => {
  const s = await serve({ disk: new MemoryDevice({ size: MiB }) });
  const c = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
  t.is((await c.request(8 /* RESIZE */, { length: 0 })).error, P.NBD_EINVAL);
  t.is((await c.request(0xffff)).error, P.NBD_EINVAL);
  t.is((await c.request(P.NBD_CMD_WRITE, { offset: 0, payload: Buffer.alloc(512, 1), flags: P.NBD_CMD_FLAG_NO_HOLE })).error, P.NBD_EINVAL);
  t.is((await c.request(P.NBD_CMD_READ, { offset: 0, length: 512, flags: P.NBD_CMD_FLAG_REQ_ONE })).error, P.NBD_EINVAL);
  t.is((await c.request(P.NBD_CMD_FLUSH, { flags: 1 << 9 })).error, P.NBD_EINVAL);
  t.deepEqual(await c.read(0, 512), Buffer.alloc(512), 'the bad write wrote nothing; its payload was consumed');
  // FUA on a read, and DF on a read with structured replies, are fine.
  t.is((await c.request(P.NBD_CMD_READ, { offset: 0, length: 512, flags: P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_DF })).error, 0);
  await c.disconnect();
  const simple = await NbdClient.connect({ port: s.port }, { exportName: 'disk', structuredReplies: false });
  t.is((await simple.request(P.NBD_CMD_READ, { offset: 0, length: 512, flags: P.NBD_CMD_FLAG_DF })).error, P.NBD_EINVAL, 'DF needs structured replies');
  await simple.disconnect();
  await s.close();
});

test('a read-only export refuses writes, trims and zeroes with EPERM', async (t) => {
  const dev = new MemoryDevice({ size: MiB, readOnly: true });
  const s = await serve({ ro: dev });
  const c = await NbdClient.connect({ port: s.port }, { exportName: 'ro' });
  t.true((c.transmissionFlags & P.NBD_FLAG_READ_ONLY) !== 0);
  await rejectsWith(t, c.write(0, Buffer.alloc(4096, 1)), P.NBD_EPERM, 'write');
  await rejectsWith(t, c.trim(0, 4096), P.NBD_EPERM, 'trim');
  await rejectsWith(t, c.zero(0, 4096), P.NBD_EPERM, 'zero');
  await c.flush();
  t.deepEqual(await c.read(0, 4096), Buffer.alloc(4096));
  t.is(dev.calls.write, 0);
  await c.disconnect();
  await s.close();
});

test('trim, write zeroes (NO_HOLE, FAST_ZERO) and block status with REQ_ONE', async (t) => {
  const dev = new MemoryDevice({ size: 4 * MiB });
  const s = await serve({ disk: dev });
  const c = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
  const HZ = P.NBD_STATE_HOLE | P.NBD_STATE_ZERO;
  await c.write(0, Buffer.alloc(MiB, 0xaa));
  t.deepEqual(await c.blockStatus(0, 4 * MiB), [
    { length: MiB, flags: 0 },
    { length: 3 * MiB, flags: HZ },
  ]);
  t.deepEqual(await c.blockStatus(0, 4 * MiB, P.NBD_CMD_FLAG_REQ_ONE), [{ length: MiB, flags: 0 }]);
  t.deepEqual(await c.blockStatus(MiB - 4096, 4096, P.NBD_CMD_FLAG_REQ_ONE), [{ length: 4096, flags: 0 }], 'REQ_ONE never exceeds the request');
  t.deepEqual(await c.blockStatus(2 * MiB + 7, 100), [{ length: 100, flags: HZ }]);

  await c.trim(256 * KiB, 256 * KiB);
  t.true((await c.read(256 * KiB, 256 * KiB)).equals(Buffer.alloc(256 * KiB)));
  t.deepEqual((await c.blockStatus(0, MiB)).map((e) => e.flags), [0, HZ, 0]);

  await c.zero(0, 128 * KiB, P.NBD_CMD_FLAG_NO_HOLE | P.NBD_CMD_FLAG_FAST_ZERO);
  t.true((await c.read(0, 128 * KiB)).equals(Buffer.alloc(128 * KiB)));
  t.is((await c.blockStatus(0, 128 * KiB))[0]!.flags, 0, 'NO_HOLE keeps it allocated');
  await c.zero(512 * KiB, 512 * KiB);
  t.deepEqual(await c.blockStatus(512 * KiB, 512 * KiB), [{ length: 512 * KiB, flags: HZ }], 'zero without NO_HOLE punches');
  t.true((await c.read(512 * KiB, 512 * KiB)).equals(Buffer.alloc(512 * KiB)));
  t.true((await c.read(128 * KiB, 128 * KiB)).every((b) => b === 0xaa), 'untouched data stays');
  await c.cache(0, MiB);
  t.is(dev.calls.cache, 1);
  await c.disconnect();

  const noContext = await NbdClient.connect({ port: s.port }, { exportName: 'disk', baseAllocation: false });
  t.is((await noContext.request(P.NBD_CMD_BLOCK_STATUS, { offset: 0, length: 4096 })).error, P.NBD_EINVAL);
  await noContext.disconnect();
  await s.close();
});

test('device errors become the mapped NBD error for that request only', async (t) => {
  const dev = new FaultyDevice(new MemoryDevice({ size: MiB }));
  const s = await serve({ disk: dev });
  for (const structuredReplies of [true, false]) {
    const c = await NbdClient.connect({ port: s.port }, { exportName: 'disk', structuredReplies });
    const cases: [Parameters<FaultyDevice['fail']>[0], string | undefined, () => Promise<unknown>, number][] = [
      ['read', 'EIO', () => c.read(0, 4096), P.NBD_EIO],
      ['read', undefined, () => c.read(0, 4096), P.NBD_EIO],
      ['read', 'EWHATEVER', () => c.read(0, 4096), P.NBD_EIO],
      ['write', 'ENOSPC', () => c.write(0, Buffer.alloc(10)), P.NBD_ENOSPC],
      ['write', 'EFBIG', () => c.write(0, Buffer.alloc(10)), P.NBD_ENOSPC],
      ['write', 'EROFS', () => c.write(0, Buffer.alloc(10)), P.NBD_EPERM],
      ['write', 'EPERM', () => c.write(0, Buffer.alloc(10)), P.NBD_EPERM],
      ['trim', 'EINVAL', () => c.trim(0, 10), P.NBD_EINVAL],
      ['zero', 'ENOMEM', () => c.zero(0, 10), P.NBD_ENOMEM],
      ['flush', 'EOVERFLOW', () => c.flush(), P.NBD_EOVERFLOW],
      ['cache', 'ESHUTDOWN', () => c.cache(0, 10), P.NBD_ESHUTDOWN],
    ];
    if (structuredReplies) cases.push(['blockStatus', 'EIO', () => c.blockStatus(0, 10), P.NBD_EIO]);
    for (const [kind, code, call, errno] of cases) {
      dev.fail(kind, code);
      await rejectsWith(t, call(), errno, `${kind} ${code}`);
    }
    if (structuredReplies) {
      dev.fail('read', 'EIO');
      const r = await c.request(P.NBD_CMD_READ, { offset: 0, length: 4096 });
      t.regex(r.message, /injected read failure/, 'structured errors carry a message');
    }
    await c.write(0, Buffer.from('still fine'));
    t.is((await c.read(0, 10)).toString(), 'still fine');
    await c.disconnect();
  }
  t.true(s.server.stats().errorsByErrno['EIO']! >= 4);
  await s.close();
});

test('a device that breaks its contract gets EIO, not a crash', async (t) => {
  const inner = new MemoryDevice({ size: MiB });
  const liar: BlockDevice = Object.assign(Object.create(inner) as MemoryDevice, {
    read: async () => new Uint8Array(3),
    blockStatus: async () => [{ length: 0, hole: true, zero: true }],
    flush: () => {
      throw new Error('synchronous throw');
    },
  });
  const s = await serve({ liar });
  const c = await NbdClient.connect({ port: s.port }, { exportName: 'liar' });
  await rejectsWith(t, c.read(0, 4096), P.NBD_EIO, 'short read');
  await rejectsWith(t, c.blockStatus(0, 4096), P.NBD_EIO, 'empty extent');
  await rejectsWith(t, c.flush(), P.NBD_EIO, 'synchronous throw');
  await c.disconnect();
  await s.close();
});

/** Reads at offset 0 wait until released; everything else is immediate. */
class SlowFirstBlock extends MemoryDevice {
  release: () => void = () => {};
  private readonly gate = new Promise<void>((r) => (this.release = r));
  override async read(offset: number, length: number): Promise<Uint8Array> {
    if (offset === 0) await this.gate;
    return super.read(offset, length);
  }
}

test('replies go out as requests complete, out of order, never interleaved', async (t) => {
  const dev = new SlowFirstBlock({ size: 4 * MiB });
  const s = await serve({ disk: dev });
  const c = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
  await c.write(MiB, Buffer.alloc(MiB, 0x11));
  const order: string[] = [];
  const slow = c.read(0, MiB).then(() => order.push('slow'));
  const fast = Promise.all(Array.from({ length: 8 }, (_, i) => c.read(MiB + i * 64 * KiB, 64 * KiB).then((b) => {
    t.true(b.every((x) => x === 0x11));
    order.push(`fast${i}`);
  })));
  await fast;
  t.false(order.includes('slow'), 'the slow read has not been answered');
  dev.release();
  await slow;
  t.is(order[order.length - 1], 'slow');
  await c.disconnect();
  await s.close();
});

/** Writes take 100 ms; records when each write and flush started and finished. */
class SlowWrites extends MemoryDevice {
  events: string[] = [];
  override async write(offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    this.events.push(`write ${offset} start`);
    await sleep(100);
    await super.write(offset, data, fua);
    this.events.push(`write ${offset} done`);
  }
  override async flush(): Promise<void> {
    this.events.push('flush');
    await super.flush();
  }
}

test('a flush waits for the writes already in flight on its connection', async (t) => {
  const dev = new SlowWrites({ size: MiB });
  const s = await serve({ disk: dev });
  const c = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
  const w1 = c.write(0, Buffer.alloc(4096, 1));
  const w2 = c.write(4096, Buffer.alloc(4096, 2));
  await sleep(20);
  await c.flush();
  t.deepEqual(dev.events.slice(-1), ['flush']);
  t.true(dev.events.indexOf('flush') > dev.events.indexOf('write 0 done'));
  t.true(dev.events.indexOf('flush') > dev.events.indexOf('write 4096 done'));
  await Promise.all([w1, w2]);
  await c.disconnect();
  await s.close();
});

test('request size limits: an oversize read is EINVAL; an oversize write is discarded, or ends the connection past 32 MiB', async (t) => {
  const s = await serve({ disk: new MemoryDevice({ size: 64 * MiB }) }, { maxRequestBytes: MiB, maxInflightBytesPerConnection: 2 * MiB });
  const c = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
  t.is(c.blockSize?.maximum, MiB);
  await rejectsWith(t, c.read(0, MiB + 1), P.NBD_EINVAL, 'read');
  await rejectsWith(t, c.write(0, Buffer.alloc(2 * MiB, 1)), P.NBD_EINVAL, 'write');
  t.deepEqual(await c.read(0, 4096), Buffer.alloc(4096), 'the payload was discarded, not written; the stream is in step');
  // Trims and zeroes have no payload and may be larger than the limit.
  await c.zero(0, 16 * MiB);
  await c.trim(0, 16 * MiB);
  // A write header claiming 40 MiB: EINVAL, then the server hangs up rather than read it.
  const r = await c.request(P.NBD_CMD_WRITE, { offset: 0, length: 40 * MiB });
  t.is(r.error, P.NBD_EINVAL);
  await t.throwsAsync(c.read(0, 1));
  t.is(s.server.stats().protocolErrors, 1);
  await s.close();
});

/** Counts concurrent write calls and holds each until released. */
class HeldWrites extends MemoryDevice {
  concurrent = 0;
  maxConcurrent = 0;
  private waiting: (() => void)[] = [];
  override async write(offset: number, data: Uint8Array, fua: boolean): Promise<void> {
    this.concurrent++;
    this.maxConcurrent = Math.max(this.maxConcurrent, this.concurrent);
    await new Promise<void>((r) => this.waiting.push(r));
    await super.write(offset, data, fua);
    this.concurrent--;
  }
  releaseAll(): void {
    const w = this.waiting;
    this.waiting = [];
    for (const f of w) f();
  }
}

test('backpressure: a connection never holds more than its in-flight byte limit', async (t) => {
  const dev = new HeldWrites({ size: 64 * MiB });
  const s = await serve({ disk: dev }, { maxRequestBytes: 256 * KiB, maxInflightBytesPerConnection: MiB });
  const c = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
  const writes = Array.from({ length: 64 }, (_, i) => c.write(i * 128 * KiB, Buffer.alloc(128 * KiB, i)));
  await sleep(300);
  t.is(dev.concurrent, 8, 'eight 128 KiB writes fill the 1 MiB budget; the rest wait in the socket');
  let done = false;
  const all = Promise.all(writes).then(() => (done = true));
  while (!done) {
    dev.releaseAll();
    await sleep(5);
  }
  await all;
  t.is(dev.maxConcurrent, 8);
  for (let i = 0; i < 64; i += 9) t.true((await c.read(i * 128 * KiB, 128 * KiB)).every((b) => b === i));
  await c.disconnect();
  await s.close();
});

test('many zero-cost requests in flight are bounded too', async (t) => {
  const dev = new FaultyDevice(new MemoryDevice({ size: MiB }));
  const s = await serve({ disk: dev });
  const c = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
  dev.hold();
  const n = MAX_INFLIGHT_REQUESTS + 200;
  const flushes = Array.from({ length: n }, () => c.flush());
  await until(() => dev.held >= MAX_INFLIGHT_REQUESTS);
  await sleep(200);
  t.is(dev.held, MAX_INFLIGHT_REQUESTS, 'the rest wait unread');
  dev.release();
  await Promise.all(flushes);
  t.is(s.server.stats().requests['flush'], n);
  await c.disconnect();
  await s.close();
});

test('a wrong request magic or garbage after the handshake closes that connection only', async (t) => {
  const s = await serve({ disk: new MemoryDevice({ size: MiB }) });
  const good = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
  const bad = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
  (bad as unknown as { stream: { write(b: Buffer): void } }).stream.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
  await t.throwsAsync(bad.read(0, 1));
  await good.write(0, Buffer.from('ok'));
  t.is((await good.read(0, 2)).toString(), 'ok');
  await good.disconnect();
  await s.close();
  t.true(s.logs.some((l) => l.includes('bad request magic')));
});

test('a client vanishing mid-request does not disturb the others', async (t) => {
  const s = await serve({ disk: new MemoryDevice({ size: MiB }) });
  const good = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
  for (const cut of [5, 28, 28 + 100]) {
    const c = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
    const h = Buffer.alloc(28 + 100);
    h.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
    h.writeUInt16BE(P.NBD_CMD_WRITE, 6);
    h.writeUInt32BE(4096, 24);
    const stream = (c as unknown as { stream: { write(b: Buffer): void; destroy(): void } }).stream;
    stream.write(h.subarray(0, cut));
    await sleep(20);
    stream.destroy();
  }
  await sleep(50);
  t.deepEqual(await good.read(0, 4096), Buffer.alloc(4096), 'the cut-off write was never applied');
  await good.disconnect();
  await s.close();
  t.is(s.server.stats().connections, 0);
});

test('graceful close: requests in flight finish and are answered, then connections close', async (t) => {
  const dev = new FaultyDevice(new MemoryDevice({ size: MiB }));
  const s = await serve({ disk: dev });
  const c = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
  dev.hold();
  const w = c.write(0, Buffer.from('in flight at close'));
  await until(() => dev.held === 1); // the write is in flight at the server
  let closed = false;
  const closing = s.server.close({ graceful: true }).then(() => (closed = true));
  await sleep(50);
  t.false(closed, 'close waits for the held write');
  await t.throwsAsync(connectSocket({ port: s.port }), undefined, 'no longer accepting');
  dev.release();
  await w;
  await closing;
  t.true(closed);
  t.is(s.provider.openCount.get('disk'), 0, 'the export was closed');
  await t.throwsAsync(c.read(0, 1));
});

test('NBD_CMD_DISC: requests before it are still answered, then the server closes', async (t) => {
  const dev = new FaultyDevice(new MemoryDevice({ size: MiB }));
  const s = await serve({ disk: dev });
  const c = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
  dev.hold();
  const w = c.write(0, Buffer.from('before DISC'));
  const r = c.read(0, 11);
  await sleep(30);
  const gone = c.disconnect();
  await sleep(30);
  dev.release();
  await w;
  t.is((await r).toString(), 'before DISC');
  await gone;
  await sleep(20);
  t.is(s.server.stats().connections, 0);
  await s.close();
});

test('graceful close: a write whose header has arrived has the rest of its payload read, and is answered', async (t) => {
  const dev = new MemoryDevice({ size: MiB });
  const s = await serve({ disk: dev });
  const socket = await connectSocket({ port: s.port });
  socket.on('error', () => {});
  let got = Buffer.alloc(0);
  socket.on('data', (d: Buffer) => (got = Buffer.concat([got, d])));
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES);
  socket.write(Buffer.concat([flags, optionRequest(P.NBD_OPT_GO, infoRequest('disk', []))]));
  await sleep(200);
  const payload = Buffer.alloc(256 * KiB, 0x77);
  const header = Buffer.alloc(28);
  header.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
  header.writeUInt16BE(P.NBD_CMD_WRITE, 6);
  header.writeBigUInt64BE(42n, 8);
  header.writeBigUInt64BE(4096n, 16);
  header.writeUInt32BE(payload.length, 24);
  socket.write(Buffer.concat([header, payload.subarray(0, 100 * KiB)]));
  await sleep(100);
  const before = got.length;
  const closing = s.server.close({ graceful: true });
  await sleep(100);
  socket.write(payload.subarray(100 * KiB));
  await closing;
  const reply = got.subarray(before);
  t.is(reply.length, 16, 'one simple reply');
  t.is(reply.readUInt32BE(0), P.NBD_SIMPLE_REPLY_MAGIC);
  t.is(reply.readUInt32BE(4), 0, 'no error');
  t.is(reply.readBigUInt64BE(8), 42n, 'for the write');
  t.true(Buffer.from(await dev.read(4096, payload.length)).equals(payload), 'the write landed');
  socket.destroy();
});

test('graceful close does not wait forever for a client that stopped reading its replies', async (t) => {
  const s = await serve({ disk: new MemoryDevice({ size: 64 * MiB }) }, { maxInflightBytesPerConnection: 32 * MiB });
  const socket = await connectSocket({ port: s.port });
  socket.on('error', () => {});
  socket.pause(); // never read
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES);
  socket.write(Buffer.concat([flags, optionRequest(P.NBD_OPT_GO, infoRequest('disk', []))]));
  for (let i = 0; i < 64; i++) {
    const r = Buffer.alloc(28);
    r.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
    r.writeBigUInt64BE(BigInt(i), 8);
    r.writeBigUInt64BE(BigInt(i % 64) * BigInt(MiB), 16);
    r.writeUInt32BE(MiB, 24);
    socket.write(r);
  }
  await sleep(500);
  const started = Date.now();
  await s.server.close({ graceful: true, timeoutMs: 300 });
  t.true(Date.now() - started < 3000, `closed in ${Date.now() - started} ms`);
  t.is(s.server.stats().connections, 0);
  socket.destroy();
});

test('close without grace drops connections at once', async (t) => {
  const dev = new FaultyDevice(new MemoryDevice({ size: MiB }));
  const s = await serve({ disk: dev });
  const c = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
  dev.hold();
  const w = c.write(0, Buffer.from('dropped'));
  await until(() => dev.held === 1);
  const closing = s.server.close({ graceful: false });
  await t.throwsAsync(w);
  dev.release();
  await closing;
  t.is(s.server.stats().connections, 0);
});

test('maxConnections: extra connections are closed on accept', async (t) => {
  const s = await serve({ disk: new MemoryDevice({ size: MiB }) }, { maxConnections: 2 });
  const a = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
  const b = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
  await t.throwsAsync(NbdClient.connect({ port: s.port }, { exportName: 'disk' }));
  t.is(s.server.stats().connectionsRefused, 1);
  await a.disconnect();
  await sleep(50);
  const c = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
  await Promise.all([b.disconnect(), c.disconnect()]);
  await s.close();
});

test('by default at most 32 connections are open at once', async (t) => {
  const s = await serve({ disk: new MemoryDevice({ size: MiB }) });
  const clients = [];
  for (let i = 0; i < 32; i++) clients.push(await NbdClient.connect({ port: s.port }, { exportName: 'disk' }));
  await t.throwsAsync(NbdClient.connect({ port: s.port }, { exportName: 'disk' }));
  t.is(s.server.stats().connectionsRefused, 1);
  await Promise.all(clients.map((c) => c.disconnect()));
  await s.close();
});

test('the maximum payload advertised is the one enforced: a device\'s own maximum below the server\'s', async (t) => {
  const device = new MemoryDevice({ size: 4 * MiB, blockSize: { minimum: 512, preferred: 4096, maximum: 65536 } });
  const s = await serve({ disk: device });
  const c = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
  t.is(c.blockSize?.maximum, 65536);
  await rejectsWith(t, c.write(0, Buffer.alloc(131072, 1)), P.NBD_EINVAL, 'a write over the maximum');
  await rejectsWith(t, c.read(0, 131072), P.NBD_EINVAL, 'a read over the maximum');
  await c.write(0, Buffer.alloc(65536, 2));
  t.deepEqual(await c.read(0, 65536), Buffer.alloc(65536, 2), 'the connection goes on; nothing of the refused write landed');
  t.deepEqual(Buffer.from(await device.read(65536, 65536)), Buffer.alloc(65536));
  await c.disconnect();
  await s.close();
});

test('minimum block size is enforced: unaligned requests are EINVAL', async (t) => {
  const s = await serve({ disk: new MemoryDevice({ size: MiB, blockSize: { minimum: 4096, preferred: 4096, maximum: MiB } }) });
  const c = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
  t.deepEqual(c.blockSize, { minimum: 4096, preferred: 4096, maximum: MiB });
  await rejectsWith(t, c.read(512, 4096), P.NBD_EINVAL, 'unaligned offset');
  await rejectsWith(t, c.write(0, Buffer.alloc(1000)), P.NBD_EINVAL, 'unaligned length');
  await c.write(4096, Buffer.alloc(8192, 3));
  await c.disconnect();
  await s.close();
});

test('a misconfigured device is refused at GO, not served', async (t) => {
  const s = await serve({ odd: new MemoryDevice({ size: MiB, blockSize: { minimum: 3, preferred: 4096, maximum: MiB } }) });
  const e = await t.throwsAsync(NbdClient.connect({ port: s.port }, { exportName: 'odd' }));
  t.regex(e.message, /misconfigured/);
  await s.close();
});

test('listens on a Unix socket, and reports nbd+unix URIs', async (t) => {
  const { NbdServer } = await import('./server.ts');
  const { StaticExportProvider } = await import('./static-provider.ts');
  const { withTempDir } = await import('./testing.ts');
  await withTempDir(async (dir) => {
    const server = new NbdServer(new StaticExportProvider({ disk: { device: new MemoryDevice({ size: MiB }) } }));
    const path = `${dir}/nbd.sock`;
    const { uri } = await server.listen({ path });
    t.is(uri, `nbd+unix:///?socket=${encodeURIComponent(path)}`);
    const c = await NbdClient.connect({ path }, { exportName: 'disk' });
    await c.write(0, Buffer.from('unix'));
    t.is((await c.read(0, 4)).toString(), 'unix');
    await c.disconnect();
    await server.close({ graceful: true });
  });
});

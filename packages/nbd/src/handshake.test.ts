import test from 'ava';
import type { Socket } from 'node:net';
import { connectSocket, infoRequest, lengthPrefixed, metaContextRequest, optionRequest, readGreeting, readOptionReplies, readOptionReply } from './client.ts';
import { ConnectionClosedError } from './errors.ts';
import { MemoryDevice } from './memory-device.ts';
import * as P from './protocol.ts';
import { SocketReader } from './reader.ts';
import { type Served, serve } from './testing.ts';

interface Raw {
  socket: Socket;
  reader: SocketReader;
  send(b: Buffer): void;
  /** Send an option and read every reply to it. */
  option(option: number, data?: Buffer): Promise<{ type: number; data: Buffer }[]>;
  /** Resolves true if the server closes the connection within `ms`. */
  closed(ms?: number): Promise<boolean>;
}

async function raw(s: Served, clientFlags: number | undefined = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES): Promise<Raw & { handshakeFlags: number }> {
  const socket = await connectSocket({ port: s.port });
  socket.on('error', () => {});
  const reader = new SocketReader(socket);
  const handshakeFlags = await readGreeting(reader);
  const send = (b: Buffer): void => void socket.write(b);
  if (clientFlags !== undefined) {
    const f = Buffer.alloc(4);
    f.writeUInt32BE(clientFlags);
    send(f);
  }
  return {
    socket,
    reader,
    handshakeFlags,
    send,
    async option(option, data) {
      send(optionRequest(option, data));
      return readOptionReplies(reader);
    },
    async closed(ms = 3000) {
      const timer = new Promise<boolean>((r) => setTimeout(() => r(false), ms));
      const eof = (async () => {
        try {
          for (;;) await reader.read(1);
        } catch (e) {
          return e instanceof ConnectionClosedError;
        }
      })();
      return Promise.race([eof, timer]);
    },
  };
}

const MiB = 1024 * 1024;

/** In transmission: BLOCK_STATUS of the first 4 KiB; the reply chunk's type, and an error chunk's errno. */
async function blockStatusOfFirstBlock(c: Raw): Promise<{ type: number; errno: number | undefined }> {
  const req = Buffer.alloc(28);
  req.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
  req.writeUInt16BE(P.NBD_CMD_BLOCK_STATUS, 6);
  req.writeUInt32BE(4096, 24);
  c.send(req);
  const h = await c.reader.read(20);
  const type = h.readUInt16BE(6);
  const body = await c.reader.read(h.readUInt32BE(16));
  return { type, errno: type === P.NBD_REPLY_TYPE_ERROR ? body.readUInt32BE(0) : undefined };
}

async function fixture(): Promise<Served> {
  return serve(
    {
      disk: { device: new MemoryDevice({ size: 4 * MiB }), description: 'the main disk' },
      'ünïcode name': { device: new MemoryDevice({ size: 1 * MiB, readOnly: true }), description: 'read-only, with a UTF-8 name' },
      aligned: { device: new MemoryDevice({ size: 1 * MiB, blockSize: { minimum: 512, preferred: 4096, maximum: 65536 } }) },
    },
    { defaultExport: 'disk' },
  );
}

test('the greeting offers fixed newstyle and no-zeroes', async (t) => {
  const s = await fixture();
  const c = await raw(s);
  t.is(c.handshakeFlags, P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
  const r = await c.option(P.NBD_OPT_ABORT);
  t.deepEqual(r.map((x) => x.type), [P.NBD_REP_ACK]);
  t.true(await c.closed(), 'the server closes after NBD_OPT_ABORT');
  await s.close();
});

test('unknown client flags and non-fixed newstyle clients are cut off', async (t) => {
  const s = await fixture();
  const bad = await raw(s, 0x4 | P.NBD_FLAG_C_FIXED_NEWSTYLE);
  t.true(await bad.closed());
  const plain = await raw(s, 0);
  t.true(await plain.closed());
  t.is(s.server.stats().protocolErrors, 2);
  await s.close();
});

test('NBD_OPT_LIST: every export with its description, then ACK; data is refused', async (t) => {
  const s = await fixture();
  const c = await raw(s);
  const r = await c.option(P.NBD_OPT_LIST);
  t.is(r.length, 4);
  const servers = r.slice(0, 3).map((x) => {
    t.is(x.type, P.NBD_REP_SERVER);
    const n = x.data.readUInt32BE(0);
    return [x.data.subarray(4, 4 + n).toString('utf8'), x.data.subarray(4 + n).toString('utf8')];
  });
  t.deepEqual(servers, [
    ['disk', 'the main disk'],
    ['ünïcode name', 'read-only, with a UTF-8 name'],
    ['aligned', ''],
  ]);
  t.is(r[3]!.type, P.NBD_REP_ACK);
  const bad = await c.option(P.NBD_OPT_LIST, Buffer.from('x'));
  t.is(bad[0]!.type, P.NBD_REP_ERR_INVALID);
  await s.close();
});

function infos(replies: { type: number; data: Buffer }[]): Map<number, Buffer> {
  const m = new Map<number, Buffer>();
  for (const r of replies) if (r.type === P.NBD_REP_INFO) m.set(r.data.readUInt16BE(0), r.data.subarray(2));
  return m;
}

test('NBD_OPT_INFO: size, flags, name, description, block size; the default export for an empty name', async (t) => {
  const s = await fixture();
  const c = await raw(s);
  const r = await c.option(P.NBD_OPT_INFO, infoRequest('', [P.NBD_INFO_NAME, P.NBD_INFO_DESCRIPTION, P.NBD_INFO_BLOCK_SIZE]));
  t.is(r[r.length - 1]!.type, P.NBD_REP_ACK);
  const i = infos(r);
  const exp = i.get(P.NBD_INFO_EXPORT)!;
  t.is(Number(exp.readBigUInt64BE(0)), 4 * MiB);
  const flags = exp.readUInt16BE(8);
  for (const f of [P.NBD_FLAG_HAS_FLAGS, P.NBD_FLAG_SEND_FLUSH, P.NBD_FLAG_SEND_FUA, P.NBD_FLAG_SEND_TRIM, P.NBD_FLAG_SEND_WRITE_ZEROES, P.NBD_FLAG_SEND_FAST_ZERO, P.NBD_FLAG_SEND_CACHE, P.NBD_FLAG_CAN_MULTI_CONN]) {
    t.true((flags & f) !== 0, `flag ${f}`);
  }
  t.is(flags & P.NBD_FLAG_READ_ONLY, 0);
  t.is(flags & P.NBD_FLAG_SEND_DF, 0, 'DF only with structured replies');
  t.is(i.get(P.NBD_INFO_NAME)!.toString(), 'disk');
  t.is(i.get(P.NBD_INFO_DESCRIPTION)!.toString(), 'the main disk');
  const bs = i.get(P.NBD_INFO_BLOCK_SIZE)!;
  t.deepEqual([bs.readUInt32BE(0), bs.readUInt32BE(4), bs.readUInt32BE(8)], [1, 4096, 32 * MiB]);

  const ro = infos(await c.option(P.NBD_OPT_INFO, infoRequest('ünïcode name', [])));
  const roFlags = ro.get(P.NBD_INFO_EXPORT)!.readUInt16BE(8);
  t.true((roFlags & P.NBD_FLAG_READ_ONLY) !== 0);
  t.is(roFlags & (P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_SEND_FUA), 0);

  const al = infos(await c.option(P.NBD_OPT_INFO, infoRequest('aligned', [P.NBD_INFO_BLOCK_SIZE]))).get(P.NBD_INFO_BLOCK_SIZE)!;
  t.deepEqual([al.readUInt32BE(0), al.readUInt32BE(4), al.readUInt32BE(8)], [512, 4096, 65536]);
  t.is(s.provider.openCount.get('disk'), 0, 'INFO closes what it opened');
  await s.close();
});

test('NBD_OPT_INFO and NBD_OPT_GO with an unknown name: NBD_REP_ERR_UNKNOWN, and haggling goes on', async (t) => {
  const s = await fixture();
  const c = await raw(s);
  const info = await c.option(P.NBD_OPT_INFO, infoRequest('nope', []));
  t.deepEqual(info.map((x) => x.type), [P.NBD_REP_ERR_UNKNOWN]);
  t.regex(info[0]!.data.toString(), /no export named "nope"/);
  const go = await c.option(P.NBD_OPT_GO, infoRequest('nope', [P.NBD_INFO_BLOCK_SIZE]));
  t.deepEqual(go.map((x) => x.type), [P.NBD_REP_ERR_UNKNOWN]);
  const ok = await c.option(P.NBD_OPT_GO, infoRequest('disk', []));
  t.is(ok[ok.length - 1]!.type, P.NBD_REP_ACK);
  t.is(s.provider.openCount.get('disk'), 1, 'GO keeps the export open for transmission');
  await s.close();
  t.is(s.provider.openCount.get('disk'), 0);
});

test('an empty name with no default export is NBD_REP_ERR_UNKNOWN', async (t) => {
  const s = await serve({ disk: new MemoryDevice({ size: MiB }) });
  const c = await raw(s);
  const r = await c.option(P.NBD_OPT_GO, infoRequest('', []));
  t.is(r[0]!.type, P.NBD_REP_ERR_UNKNOWN);
  t.regex(r[0]!.data.toString(), /no default export/);
  await s.close();
});

test('malformed INFO/GO data is NBD_REP_ERR_INVALID', async (t) => {
  const s = await fixture();
  const c = await raw(s);
  const tooLong = Buffer.alloc(8);
  tooLong.writeUInt32BE(100, 0); // name length past the data
  t.is((await c.option(P.NBD_OPT_INFO, tooLong))[0]!.type, P.NBD_REP_ERR_INVALID);
  const trailing = Buffer.concat([infoRequest('disk', [P.NBD_INFO_NAME]), Buffer.from([0])]);
  t.is((await c.option(P.NBD_OPT_GO, trailing))[0]!.type, P.NBD_REP_ERR_INVALID);
  t.is((await c.option(P.NBD_OPT_GO, Buffer.alloc(3)))[0]!.type, P.NBD_REP_ERR_INVALID);
  const nul = infoRequest('di\0sk', []);
  t.is((await c.option(P.NBD_OPT_GO, nul))[0]!.type, P.NBD_REP_ERR_INVALID);
  await s.close();
});

test('unknown options are NBD_REP_ERR_UNSUP, their data skipped however large', async (t) => {
  const s = await fixture();
  const c = await raw(s);
  t.is((await c.option(4242, Buffer.alloc(10, 1)))[0]!.type, P.NBD_REP_ERR_UNSUP);
  t.is((await c.option(P.NBD_OPT_INFO - 2 /* PEEK_EXPORT, withdrawn */))[0]!.type, P.NBD_REP_ERR_UNSUP);
  t.is((await c.option(11 /* EXTENDED_HEADERS */))[0]!.type, P.NBD_REP_ERR_UNSUP);
  t.is((await c.option(99, Buffer.alloc(3 * MiB, 7)))[0]!.type, P.NBD_REP_ERR_UNSUP);
  t.is((await c.option(P.NBD_OPT_INFO, Buffer.alloc(P.MAX_OPTION_DATA_BYTES + 1)))[0]!.type, P.NBD_REP_ERR_TOO_BIG);
  const ok = await c.option(P.NBD_OPT_LIST);
  t.is(ok[ok.length - 1]!.type, P.NBD_REP_ACK, 'the stream is still in step');
  await s.close();
});

test('structured replies and base:allocation: list, set, and what GO then advertises', async (t) => {
  const s = await fixture();
  const c = await raw(s);
  const early = await c.option(P.NBD_OPT_SET_META_CONTEXT, metaContextRequest('disk', [P.BASE_ALLOCATION]));
  t.is(early[0]!.type, P.NBD_REP_ERR_INVALID, 'SET before STRUCTURED_REPLY');
  t.is((await c.option(P.NBD_OPT_STRUCTURED_REPLY, Buffer.from('x')))[0]!.type, P.NBD_REP_ERR_INVALID);
  t.deepEqual((await c.option(P.NBD_OPT_STRUCTURED_REPLY)).map((x) => x.type), [P.NBD_REP_ACK]);

  const context = (r: { type: number; data: Buffer }) => [r.type, r.data.readUInt32BE(0), r.data.subarray(4).toString()];
  const all = await c.option(P.NBD_OPT_LIST_META_CONTEXT, metaContextRequest('disk', []));
  t.deepEqual(all.map((r) => r.type), [P.NBD_REP_META_CONTEXT, P.NBD_REP_ACK]);
  t.deepEqual(context(all[0]!), [P.NBD_REP_META_CONTEXT, 0, 'base:allocation']);
  const wildcard = await c.option(P.NBD_OPT_LIST_META_CONTEXT, metaContextRequest('disk', ['base:']));
  t.deepEqual(context(wildcard[0]!), [P.NBD_REP_META_CONTEXT, 0, 'base:allocation']);
  const none = await c.option(P.NBD_OPT_LIST_META_CONTEXT, metaContextRequest('disk', ['qemu:dirty-bitmap:x', 'base:nothing']));
  t.deepEqual(none.map((r) => r.type), [P.NBD_REP_ACK]);
  const noColon = await c.option(P.NBD_OPT_LIST_META_CONTEXT, metaContextRequest('disk', ['base']));
  t.is(noColon[0]!.type, P.NBD_REP_ERR_INVALID);
  const truncated = metaContextRequest('disk', ['base:allocation']).subarray(0, 20);
  t.is((await c.option(P.NBD_OPT_SET_META_CONTEXT, truncated))[0]!.type, P.NBD_REP_ERR_INVALID);

  const set = await c.option(P.NBD_OPT_SET_META_CONTEXT, metaContextRequest('disk', ['base:', 'x-other:thing', P.BASE_ALLOCATION]));
  t.deepEqual(set.map((r) => r.type), [P.NBD_REP_META_CONTEXT, P.NBD_REP_ACK]);
  t.deepEqual(context(set[0]!), [P.NBD_REP_META_CONTEXT, P.BASE_ALLOCATION_ID, 'base:allocation']);

  const go = await c.option(P.NBD_OPT_GO, infoRequest('disk', [P.NBD_INFO_BLOCK_SIZE]));
  t.is(go[go.length - 1]!.type, P.NBD_REP_ACK);
  const flags = infos(go).get(P.NBD_INFO_EXPORT)!.readUInt16BE(8);
  t.true((flags & P.NBD_FLAG_SEND_DF) !== 0, 'DF with structured replies');

  // Transmission: block status gives one base:allocation chunk for a fresh (all-hole) disk.
  const req = Buffer.alloc(28);
  req.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
  req.writeUInt16BE(P.NBD_CMD_BLOCK_STATUS, 6);
  req.writeBigUInt64BE(77n, 8);
  req.writeUInt32BE(MiB, 24);
  c.send(req);
  const h = await c.reader.read(20);
  t.is(h.readUInt32BE(0), P.NBD_STRUCTURED_REPLY_MAGIC);
  t.is(h.readUInt16BE(4), P.NBD_REPLY_FLAG_DONE);
  t.is(h.readUInt16BE(6), P.NBD_REPLY_TYPE_BLOCK_STATUS);
  t.is(h.readBigUInt64BE(8), 77n);
  const body = await c.reader.read(h.readUInt32BE(16));
  t.deepEqual([body.readUInt32BE(0), body.readUInt32BE(4), body.readUInt32BE(8)], [P.BASE_ALLOCATION_ID, MiB, P.NBD_STATE_HOLE | P.NBD_STATE_ZERO]);
  await s.close();
});

test('a context set for another export does not carry over to GO', async (t) => {
  const s = await fixture();
  const c = await raw(s);
  await c.option(P.NBD_OPT_STRUCTURED_REPLY);
  await c.option(P.NBD_OPT_SET_META_CONTEXT, metaContextRequest('aligned', [P.BASE_ALLOCATION]));
  await c.option(P.NBD_OPT_GO, infoRequest('disk', []));
  t.deepEqual(await blockStatusOfFirstBlock(c), { type: P.NBD_REPLY_TYPE_ERROR, errno: P.NBD_EINVAL });
  await s.close();
});

test('an export opened for INFO or GO is closed again when answering fails; haggling goes on', async (t) => {
  const s = await fixture();
  const c = await raw(s);
  const list = s.provider.list.bind(s.provider);
  s.provider.list = () => {
    throw new Error('catalog unavailable');
  };
  for (const option of [P.NBD_OPT_INFO, P.NBD_OPT_GO]) {
    const r = await c.option(option, infoRequest('disk', [P.NBD_INFO_DESCRIPTION]));
    t.deepEqual(r.map((x) => x.type), [P.NBD_REP_ERR_UNKNOWN]);
    t.regex(r[0]!.data.toString(), /catalog unavailable/);
  }
  t.is(s.provider.openCount.get('disk'), 0, 'every export opened was closed');
  s.provider.list = list;
  const go = await c.option(P.NBD_OPT_GO, infoRequest('disk', [P.NBD_INFO_DESCRIPTION]));
  t.is(go[go.length - 1]!.type, P.NBD_REP_ACK);
  t.is(s.provider.openCount.get('disk'), 1, 'the one in transmission stays open');
  c.socket.destroy();
  await s.close();
  t.is(s.provider.openCount.get('disk'), 0);

  // A device whose block size cannot even be read is refused at GO, and closed.
  const broken = new MemoryDevice({ size: MiB });
  Object.defineProperty(broken, 'blockSize', {
    get() {
      throw new Error('no geometry');
    },
  });
  const s2 = await serve({ broken });
  const c2 = await raw(s2);
  const r = await c2.option(P.NBD_OPT_GO, infoRequest('broken', []));
  t.deepEqual(r.map((x) => x.type), [P.NBD_REP_ERR_UNKNOWN]);
  t.regex(r[0]!.data.toString(), /misconfigured: no geometry/);
  t.is(s2.provider.openCount.get('broken'), 0);
  c2.socket.destroy();
  await s2.close();
});

test('a SET_META_CONTEXT too large to read still clears the selection, as the spec asks of a failed SET', async (t) => {
  const s = await fixture();
  const c = await raw(s);
  await c.option(P.NBD_OPT_STRUCTURED_REPLY);
  const set = await c.option(P.NBD_OPT_SET_META_CONTEXT, metaContextRequest('disk', [P.BASE_ALLOCATION]));
  t.deepEqual(set.map((r) => r.type), [P.NBD_REP_META_CONTEXT, P.NBD_REP_ACK]);
  const huge = await c.option(P.NBD_OPT_SET_META_CONTEXT, metaContextRequest('disk', Array.from({ length: 20 }, () => `x-foo:${'a'.repeat(4000)}`)));
  t.deepEqual(huge.map((r) => r.type), [P.NBD_REP_ERR_TOO_BIG]);
  const go = await c.option(P.NBD_OPT_GO, infoRequest('disk', []));
  t.is(go[go.length - 1]!.type, P.NBD_REP_ACK);
  t.deepEqual(await blockStatusOfFirstBlock(c), { type: P.NBD_REPLY_TYPE_ERROR, errno: P.NBD_EINVAL }, 'no context is selected: block status is refused');
  await s.close();
});

test('NBD_OPT_EXPORT_NAME: size and flags, with or without the 124 zero bytes', async (t) => {
  const s = await fixture();
  const nz = await raw(s);
  nz.send(optionRequest(P.NBD_OPT_EXPORT_NAME, Buffer.from('disk')));
  const a = await nz.reader.read(10);
  t.is(Number(a.readBigUInt64BE(0)), 4 * MiB);
  t.true((a.readUInt16BE(8) & P.NBD_FLAG_HAS_FLAGS) !== 0);
  // Transmission starts right after: a simple read reply with the data.
  const req = Buffer.alloc(28);
  req.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
  req.writeBigUInt64BE(5n, 8);
  req.writeUInt32BE(16, 24);
  nz.send(req);
  const reply = await nz.reader.read(16 + 16);
  t.is(reply.readUInt32BE(0), P.NBD_SIMPLE_REPLY_MAGIC);
  t.is(reply.readUInt32BE(4), 0);
  t.deepEqual(reply.subarray(16), Buffer.alloc(16));

  const zeros = await raw(s, P.NBD_FLAG_C_FIXED_NEWSTYLE);
  zeros.send(optionRequest(P.NBD_OPT_EXPORT_NAME, Buffer.alloc(0))); // the default export
  const b = await zeros.reader.read(10 + 124);
  t.is(Number(b.readBigUInt64BE(0)), 4 * MiB);
  t.deepEqual(b.subarray(10), Buffer.alloc(124));
  await s.close();
});

test('NBD_OPT_EXPORT_NAME for an unknown export ends the session', async (t) => {
  const s = await fixture();
  const c = await raw(s);
  c.send(optionRequest(P.NBD_OPT_EXPORT_NAME, Buffer.from('nope')));
  t.true(await c.closed());
  await s.close();
});

test('a bad option magic, a truncated option, and STARTTLS without TLS configured', async (t) => {
  const s = await fixture();
  const bad = await raw(s);
  const opt = optionRequest(P.NBD_OPT_LIST);
  opt.writeUInt32BE(0xdeadbeef, 0);
  bad.send(opt);
  t.true(await bad.closed());

  const cut = await raw(s);
  cut.send(optionRequest(P.NBD_OPT_GO, infoRequest('disk', [])).subarray(0, 21));
  cut.socket.end();
  t.true(await cut.closed());

  const plain = await raw(s);
  const r = await plain.option(P.NBD_OPT_STARTTLS);
  t.is(r[0]!.type, P.NBD_REP_ERR_POLICY);
  t.is((await plain.option(P.NBD_OPT_LIST)).pop()!.type, P.NBD_REP_ACK);
  await s.close();
  t.true(s.logs.some((l) => l.includes('bad option magic')));
});

test('a closing server answers options NBD_REP_ERR_SHUTDOWN; a client that aborts is let go, an idle one hung up on', async (t) => {
  const s = await fixture();
  const polite = await raw(s);
  const idle = await raw(s);
  await polite.option(P.NBD_OPT_LIST);
  const closing = s.server.close({ graceful: true });
  t.deepEqual((await polite.option(P.NBD_OPT_LIST)).map((x) => x.type), [P.NBD_REP_ERR_SHUTDOWN]);
  t.deepEqual((await polite.option(P.NBD_OPT_GO, infoRequest('disk', []))).map((x) => x.type), [P.NBD_REP_ERR_SHUTDOWN], 'no new transmission starts');
  t.deepEqual((await polite.option(P.NBD_OPT_ABORT)).map((x) => x.type), [P.NBD_REP_ACK]);
  t.true(await polite.closed());
  t.true(await idle.closed(3000), 'a client that sends nothing is hung up on');
  await closing;
  t.is(s.server.stats().connections, 0);
});

test('option replies are in order and one at a time; an option reply after ACK is never sent', async (t) => {
  const s = await fixture();
  const c = await raw(s);
  // Pipeline several options at once (clients must not, but the server stays in step anyway).
  c.send(Buffer.concat([optionRequest(P.NBD_OPT_STRUCTURED_REPLY), optionRequest(P.NBD_OPT_INFO, infoRequest('disk', [])), optionRequest(P.NBD_OPT_ABORT)]));
  const first = await readOptionReply(c.reader);
  t.is(first.option, P.NBD_OPT_STRUCTURED_REPLY);
  const info = await readOptionReplies(c.reader);
  t.true(info.every((r) => r.option === P.NBD_OPT_INFO));
  const abort = await readOptionReply(c.reader);
  t.deepEqual([abort.option, abort.type], [P.NBD_OPT_ABORT, P.NBD_REP_ACK]);
  t.true(await c.closed());
  await s.close();
});

test('a name longer than the 4096-byte string limit is refused', async (t) => {
  const s = await fixture();
  const c = await raw(s);
  const r = await c.option(P.NBD_OPT_INFO, Buffer.concat([lengthPrefixed('x'.repeat(5000)), Buffer.alloc(2)]));
  t.is(r[0]!.type, P.NBD_REP_ERR_INVALID);
  await s.close();
});

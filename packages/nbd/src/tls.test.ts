/**
 * TLS: a CA and a server certificate made with openssl in a temp dir, then qemu-io (gnutls),
 * nbdinfo (libnbd, gnutls) and the TS client (node:tls) against a server that requires TLS,
 * and raw sockets for the FORCEDTLS rules.
 */
import test from 'ava';
import { readFile, writeFile } from 'node:fs/promises';
import type { Socket } from 'node:net';
import { join } from 'node:path';
import { connect as tlsConnect } from 'node:tls';
import { NbdClient, connectSocket, infoRequest, metaContextRequest, optionRequest, readGreeting, readOptionReplies } from './client.ts';
import { HANDSHAKE_TIMEOUT_MS } from './connection.ts';
import { ConnectionClosedError } from './errors.ts';
import { MemoryDevice } from './memory-device.ts';
import * as P from './protocol.ts';
import { SocketReader } from './reader.ts';
import { type Served, run, serve, withTempDir } from './testing.ts';

const MiB = 1024 * 1024;

interface Pki {
  dir: string;
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
}

/** A CA (ca-cert.pem, as qemu and libnbd expect in their credentials dir) and a server certificate for localhost / 127.0.0.1. */
async function makePki(dir: string): Promise<Pki> {
  const openssl = async (args: string[]): Promise<void> => {
    const r = await run('openssl', args, 30_000);
    if (r.code !== 0) throw new Error(`openssl ${args[0]}: ${r.stderr}`);
  };
  const p = (f: string) => join(dir, f);
  await openssl(['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', p('ca-key.pem'), '-out', p('ca-cert.pem'), '-days', '2', '-subj', '/CN=pasture nbd test CA', '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
  await openssl(['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', p('server-key.pem'), '-out', p('server.csr'), '-subj', '/CN=localhost']);
  await writeFile(p('ext.cnf'), 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n');
  await openssl(['x509', '-req', '-in', p('server.csr'), '-CA', p('ca-cert.pem'), '-CAkey', p('ca-key.pem'), '-CAcreateserial', '-out', p('server-cert.pem'), '-days', '2', '-extfile', p('ext.cnf')]);
  return { dir, ca: await readFile(p('ca-cert.pem')), cert: await readFile(p('server-cert.pem')), key: await readFile(p('server-key.pem')) };
}

async function withTls(require: boolean, f: (s: Served, pki: Pki, dev: MemoryDevice) => Promise<void>): Promise<void> {
  await withTempDir(async (dir) => {
    const pki = await makePki(dir);
    const dev = new MemoryDevice({ size: 8 * MiB });
    const s = await serve({ disk: { device: dev, description: 'over TLS' } }, { tls: { cert: pki.cert, key: pki.key, require } });
    try {
      await f(s, pki, dev);
    } finally {
      await s.close();
    }
  });
}

test('required TLS: qemu-io without TLS is refused, with TLS it reads and writes', async (t) => {
  await withTls(true, async (s, pki, dev) => {
    t.true(s.uri.startsWith('nbds://'));
    const plain = await run('qemu-io', ['-f', 'raw', '-c', 'read 0 4k', `nbd://127.0.0.1:${s.port}/disk`], 20_000);
    t.not(plain.code, 0);
    t.regex(plain.stderr, /TLS/);
    const secure = await run('qemu-io', [
      '--object', `tls-creds-x509,id=tls0,endpoint=client,dir=${pki.dir}`,
      '--image-opts',
      '-c', 'write -P 0x5a 0 1M',
      '-c', 'read -P 0x5a 0 1M',
      `driver=nbd,host=127.0.0.1,port=${s.port},export=disk,tls-creds=tls0`,
    ], 30_000);
    t.is(secure.code, 0, secure.stderr);
    t.notRegex(secure.stdout, /verification failed/);
    t.true(Buffer.from(await dev.read(0, MiB)).every((b) => b === 0x5a));
    t.true(s.logs.some((l) => l.includes('TLS started')));
  });
});

test('required TLS: nbdinfo with nbds:// and the CA works; plain nbd:// is refused', async (t) => {
  await withTls(true, async (s, pki) => {
    const ok = await run('nbdinfo', ['--json', `nbds://127.0.0.1:${s.port}/disk?tls-certificates=${pki.dir}`], 20_000);
    t.is(ok.code, 0, ok.stderr);
    const info = JSON.parse(ok.stdout) as { protocol: string; TLS: boolean; exports: { description: string }[] };
    t.is(info.TLS, true);
    t.is(info.exports[0]!.description, 'over TLS');
    const plain = await run('nbdinfo', [`nbd://127.0.0.1:${s.port}/disk`], 20_000);
    t.not(plain.code, 0);
  });
});

test('required TLS: the TS client over node:tls; a wrong CA fails the handshake', async (t) => {
  await withTls(true, async (s, pki) => {
    const c = await NbdClient.connect({ port: s.port }, { exportName: 'disk', tls: { ca: pki.ca } });
    await c.write(4096, Buffer.from('encrypted'));
    t.is((await c.read(4096, 9)).toString(), 'encrypted');
    t.deepEqual(await c.blockStatus(0, 8192), [{ length: 8192, flags: 0 }]);
    await c.disconnect();
    await t.throwsAsync(NbdClient.connect({ port: s.port }, { exportName: 'disk', tls: { ca: pki.cert } }));
    await t.throwsAsync(NbdClient.connect({ port: s.port }, { exportName: 'disk' }), { message: /0x80000005/ });
  });
});

async function rawGreeted(port: number): Promise<{ reader: SocketReader; send: (b: Buffer) => void; socket: Socket }> {
  const socket = await connectSocket({ port });
  socket.on('error', () => {});
  const reader = new SocketReader(socket);
  await readGreeting(reader);
  const f = Buffer.alloc(4);
  f.writeUInt32BE(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES);
  socket.write(f);
  return { reader, socket, send: (b) => void socket.write(b) };
}

async function closedSoon(reader: SocketReader): Promise<boolean> {
  try {
    for (;;) await Promise.race([reader.read(1), new Promise((_, rej) => setTimeout(() => rej(new Error('timeout')), 3000))]);
  } catch (e) {
    return e instanceof ConnectionClosedError;
  }
}

test('required TLS: every option but STARTTLS and ABORT is NBD_REP_ERR_TLS_REQD; EXPORT_NAME hangs up', async (t) => {
  await withTls(true, async (s, pki) => {
    const c = await rawGreeted(s.port);
    const ask = async (option: number, data?: Buffer) => {
      c.send(optionRequest(option, data));
      return (await readOptionReplies(c.reader)).map((r) => r.type);
    };
    t.deepEqual(await ask(P.NBD_OPT_LIST), [P.NBD_REP_ERR_TLS_REQD]);
    t.deepEqual(await ask(P.NBD_OPT_INFO, infoRequest('disk', [])), [P.NBD_REP_ERR_TLS_REQD]);
    t.deepEqual(await ask(P.NBD_OPT_GO, infoRequest('disk', [])), [P.NBD_REP_ERR_TLS_REQD]);
    t.deepEqual(await ask(P.NBD_OPT_STRUCTURED_REPLY), [P.NBD_REP_ERR_TLS_REQD]);
    t.deepEqual(await ask(4242, Buffer.alloc(100)), [P.NBD_REP_ERR_TLS_REQD], 'unsupported options too');
    t.deepEqual(await ask(P.NBD_OPT_STARTTLS, Buffer.from('x')), [P.NBD_REP_ERR_INVALID], 'STARTTLS takes no data');

    // Upgrade in place; a second STARTTLS is invalid; then haggling continues encrypted.
    t.deepEqual(await ask(P.NBD_OPT_STARTTLS), [P.NBD_REP_ACK]);
    c.reader.detach();
    const secure = tlsConnect({ socket: c.socket, ca: pki.ca, servername: 'localhost' });
    await new Promise<void>((resolve, reject) => secure.once('secureConnect', resolve).once('error', reject));
    const reader = new SocketReader(secure);
    const askSecure = async (option: number, data?: Buffer) => {
      secure.write(optionRequest(option, data));
      return (await readOptionReplies(reader)).map((r) => r.type);
    };
    t.deepEqual(await askSecure(P.NBD_OPT_STARTTLS), [P.NBD_REP_ERR_INVALID]);
    t.deepEqual(await askSecure(P.NBD_OPT_LIST), [P.NBD_REP_SERVER, P.NBD_REP_ACK]);
    t.deepEqual(await askSecure(P.NBD_OPT_ABORT), [P.NBD_REP_ACK]);
    secure.destroy();

    const e = await rawGreeted(s.port);
    e.send(optionRequest(P.NBD_OPT_EXPORT_NAME, Buffer.from('disk')));
    t.true(await closedSoon(e.reader), 'EXPORT_NAME before TLS cannot be refused politely');
  });
});

test('optional TLS: plain clients are served; STARTTLS forgets structured replies negotiated in the clear', async (t) => {
  await withTls(false, async (s, pki) => {
    t.true(s.uri.startsWith('nbd://'));
    const plain = await NbdClient.connect({ port: s.port }, { exportName: 'disk' });
    await plain.write(0, Buffer.from('clear'));
    await plain.disconnect();

    const c = await rawGreeted(s.port);
    c.send(optionRequest(P.NBD_OPT_STRUCTURED_REPLY));
    t.deepEqual((await readOptionReplies(c.reader)).map((r) => r.type), [P.NBD_REP_ACK]);
    c.send(optionRequest(P.NBD_OPT_STARTTLS));
    t.deepEqual((await readOptionReplies(c.reader)).map((r) => r.type), [P.NBD_REP_ACK]);
    c.reader.detach();
    const secure = tlsConnect({ socket: c.socket, ca: pki.ca, servername: 'localhost' });
    await new Promise<void>((resolve, reject) => secure.once('secureConnect', resolve).once('error', reject));
    const reader = new SocketReader(secure);
    secure.write(optionRequest(P.NBD_OPT_SET_META_CONTEXT, metaContextRequest('disk', [P.BASE_ALLOCATION])));
    t.deepEqual((await readOptionReplies(reader)).map((r) => r.type), [P.NBD_REP_ERR_INVALID], 'structured replies must be negotiated again');
    secure.destroy();
  });
});

test('TLS misbehaviour: data pipelined after STARTTLS, or a garbage handshake, closes that connection only', async (t) => {
  await withTls(true, async (s, pki) => {
    const good = await NbdClient.connect({ port: s.port }, { exportName: 'disk', tls: { ca: pki.ca } });

    const eager = await rawGreeted(s.port);
    eager.send(Buffer.concat([optionRequest(P.NBD_OPT_STARTTLS), Buffer.from([0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])]));
    t.true(await closedSoon(eager.reader));

    const garbage = await rawGreeted(s.port);
    garbage.send(optionRequest(P.NBD_OPT_STARTTLS));
    await readOptionReplies(garbage.reader);
    garbage.send(Buffer.from('this is not a TLS ClientHello\r\n'.repeat(10)));
    t.true(await closedSoon(garbage.reader));

    await good.write(0, Buffer.from('still here'));
    t.is((await good.read(0, 10)).toString(), 'still here');
    await good.disconnect();
    t.true(s.server.stats().protocolErrors >= 2);
  });
});

test('a client that sends STARTTLS and hangs up is closed at once, not at the handshake time-out', async (t) => {
  // The end of stream arrives while the server answers an earlier option, before STARTTLS is
  // read: the server must not start TLS on a socket that has already ended (TLS would never see
  // the end, and the connection would sit until HANDSHAKE_TIMEOUT_MS).
  await withTls(false, async (s) => {
    const rounds = 10;
    for (let i = 0; i < rounds; i++) {
      const c = await rawGreeted(s.port);
      const before = i % 2 === 0 ? [optionRequest(P.NBD_OPT_LIST)] : [];
      c.socket.end(Buffer.concat([...before, optionRequest(P.NBD_OPT_STARTTLS)]));
      t.true(await closedSoon(c.reader), `round ${i}: the server closed its side`);
      c.socket.destroy();
    }
    for (let i = 0; i < 40 && s.server.stats().connections > 0; i++) await new Promise((r) => setTimeout(r, 50));
    t.is(s.server.stats().connections, 0, `all ${rounds} connections are gone within 2 s (the handshake time-out is ${HANDSHAKE_TIMEOUT_MS} ms)`);
  });
});

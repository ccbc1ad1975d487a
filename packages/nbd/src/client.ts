/**
 * A small NBD client, for this package's tests and for tools that want to talk to the server
 * without libnbd: fixed newstyle with NBD_OPT_GO, optional STARTTLS, structured replies and
 * base:allocation, many requests in flight. It trusts the server it talks to far more than the
 * server trusts clients; do not point it at servers you do not control.
 *
 * The option-level helpers (`readGreeting`, `optionRequest`, `readOptionReply`) are exported
 * for tests that speak the handshake byte by byte.
 */
import { type Socket, connect as netConnect } from 'node:net';
import { connect as tlsConnect } from 'node:tls';
import { NbdError } from './errors.ts';
import {
  BASE_ALLOCATION,
  IHAVEOPT,
  NBDMAGIC,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_EXPORT,
  NBD_OPT_GO,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_REP_ACK,
  NBD_REP_FLAG_ERROR,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REQUEST_MAGIC,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  OPTION_REPLY_MAGIC,
} from './protocol.ts';
import { SocketReader } from './reader.ts';

export type Target = { host?: string; port: number } | { path: string };

/** An error reply from the server: `errno` is the NBD error value. */
export class NbdReplyError extends NbdError {
  override name = 'NbdReplyError';
  constructor(readonly errno: number, message: string) {
    super(message);
  }
}

export function connectSocket(target: Target): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const s = 'path' in target ? netConnect(target.path) : netConnect(target.port, target.host ?? '127.0.0.1');
    s.once('error', reject);
    s.once('connect', () => {
      s.off('error', reject);
      s.setNoDelay(true);
      resolve(s);
    });
  });
}

/** Read the server's greeting; returns its handshake flags. */
export async function readGreeting(reader: SocketReader): Promise<number> {
  const g = await reader.read(18);
  if (g.readBigUInt64BE(0) !== NBDMAGIC || g.readBigUInt64BE(8) !== IHAVEOPT) throw new NbdError('not a newstyle NBD server');
  return g.readUInt16BE(16);
}

export function optionRequest(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(16 + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, 16);
  return b;
}

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export async function readOptionReply(reader: SocketReader): Promise<OptionReply> {
  const h = await reader.read(20);
  if (h.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw new NbdError('bad option reply magic');
  const length = h.readUInt32BE(16);
  if (length > 1 << 20) throw new NbdError(`option reply of ${length} bytes`);
  return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await reader.read(length) };
}

/** Read option replies up to and including the final one (an ACK or an error). */
export async function readOptionReplies(reader: SocketReader): Promise<OptionReply[]> {
  const out: OptionReply[] = [];
  for (;;) {
    const r = await readOptionReply(reader);
    out.push(r);
    if (r.type === NBD_REP_ACK || (r.type & NBD_REP_FLAG_ERROR) !== 0) return out;
  }
}

/** `u32 length, string` as the meta context and info options encode names. */
export function lengthPrefixed(s: string): Buffer {
  const b = Buffer.from(s, 'utf8');
  const l = Buffer.alloc(4);
  l.writeUInt32BE(b.length);
  return Buffer.concat([l, b]);
}

/** NBD_OPT_INFO / NBD_OPT_GO data. */
export function infoRequest(name: string, infos: number[]): Buffer {
  const tail = Buffer.alloc(2 + 2 * infos.length);
  tail.writeUInt16BE(infos.length, 0);
  infos.forEach((t, i) => tail.writeUInt16BE(t, 2 + 2 * i));
  return Buffer.concat([lengthPrefixed(name), tail]);
}

/** NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data. */
export function metaContextRequest(name: string, queries: string[]): Buffer {
  const n = Buffer.alloc(4);
  n.writeUInt32BE(queries.length);
  return Buffer.concat([lengthPrefixed(name), n, ...queries.map(lengthPrefixed)]);
}

export interface Reply {
  /** 0 on success. */
  error: number;
  message: string;
  /** For reads: the data, reassembled. */
  data?: Buffer;
  /** For block status: the descriptors of the one context. */
  extents?: { length: number; flags: number }[];
  /** Kinds of chunks received, in order ('simple' for a simple reply). */
  chunks: string[];
}

interface Pending {
  type: number;
  offset: number;
  length: number;
  reply: Reply;
  resolve: (r: Reply) => void;
  reject: (e: Error) => void;
}

export interface ClientOptions {
  exportName?: string;
  /** Negotiate structured replies (default true). */
  structuredReplies?: boolean;
  /** Select base:allocation (default true; needs structured replies). */
  baseAllocation?: boolean;
  /** Start TLS first, trusting `ca`. */
  tls?: { ca: string | Buffer; servername?: string };
}

export class NbdClient {
  size = 0;
  transmissionFlags = 0;
  blockSize: { minimum: number; preferred: number; maximum: number } | undefined;
  structuredReplies = false;
  baseAllocationId: number | undefined;
  private reader: SocketReader;
  private stream: Socket;
  private nextCookie = 1n;
  private readonly pending = new Map<bigint, Pending>();
  private failure: Error | undefined;

  private constructor(socket: Socket) {
    this.stream = socket;
    this.reader = new SocketReader(socket);
    socket.on('error', () => {});
  }

  static async connect(target: Target, o: ClientOptions = {}): Promise<NbdClient> {
    const c = new NbdClient(await connectSocket(target));
    try {
      await c.handshake(o);
    } catch (e) {
      c.stream.destroy();
      throw e;
    }
    void c.replyLoop();
    return c;
  }

  private send(b: Buffer): void {
    this.stream.write(b);
  }

  private async handshake(o: ClientOptions): Promise<void> {
    await readGreeting(this.reader);
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);
    this.send(flags);
    const expectAck = async (what: string): Promise<OptionReply[]> => {
      const replies = await readOptionReplies(this.reader);
      const last = replies[replies.length - 1]!;
      if (last.type !== NBD_REP_ACK) throw new NbdReplyError(last.type, `${what}: 0x${last.type.toString(16)} ${last.data.toString('utf8')}`);
      return replies;
    };
    if (o.tls !== undefined) {
      this.send(optionRequest(NBD_OPT_STARTTLS));
      await expectAck('STARTTLS');
      this.reader.detach();
      const secure = tlsConnect({ socket: this.stream, ca: o.tls.ca, servername: o.tls.servername ?? 'localhost' });
      await new Promise<void>((resolve, reject) => {
        secure.once('secureConnect', resolve);
        secure.once('error', reject);
      });
      secure.on('error', () => {});
      this.stream = secure;
      this.reader = new SocketReader(secure);
    }
    const name = o.exportName ?? '';
    if (o.structuredReplies ?? true) {
      this.send(optionRequest(NBD_OPT_STRUCTURED_REPLY));
      await expectAck('STRUCTURED_REPLY');
      this.structuredReplies = true;
      if (o.baseAllocation ?? true) {
        this.send(optionRequest(NBD_OPT_SET_META_CONTEXT, metaContextRequest(name, [BASE_ALLOCATION])));
        for (const r of await expectAck('SET_META_CONTEXT')) {
          if (r.type === NBD_REP_META_CONTEXT && r.data.subarray(4).toString('utf8') === BASE_ALLOCATION) this.baseAllocationId = r.data.readUInt32BE(0);
        }
      }
    }
    this.send(optionRequest(NBD_OPT_GO, infoRequest(name, [NBD_INFO_BLOCK_SIZE])));
    for (const r of await expectAck(`GO '${name}'`)) {
      if (r.type !== NBD_REP_INFO) continue;
      const info = r.data.readUInt16BE(0);
      if (info === NBD_INFO_EXPORT) {
        this.size = Number(r.data.readBigUInt64BE(2));
        this.transmissionFlags = r.data.readUInt16BE(10);
      } else if (info === NBD_INFO_BLOCK_SIZE) {
        this.blockSize = { minimum: r.data.readUInt32BE(2), preferred: r.data.readUInt32BE(6), maximum: r.data.readUInt32BE(10) };
      }
    }
  }

  /** Send any request; resolves with the reply whatever its error value. */
  request(type: number, o: { flags?: number; offset?: number | bigint; length?: number; payload?: Uint8Array } = {}): Promise<Reply> {
    if (this.failure !== undefined) return Promise.reject(this.failure);
    const cookie = this.nextCookie++;
    const length = o.length ?? o.payload?.length ?? 0;
    const h = Buffer.alloc(28);
    h.writeUInt32BE(NBD_REQUEST_MAGIC, 0);
    h.writeUInt16BE(o.flags ?? 0, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(cookie, 8);
    h.writeBigUInt64BE(BigInt(o.offset ?? 0), 16);
    h.writeUInt32BE(length, 24);
    return new Promise<Reply>((resolve, reject) => {
      if (type !== NBD_CMD_DISC) this.pending.set(cookie, { type, offset: Number(o.offset ?? 0), length, reply: { error: 0, message: '', chunks: [] }, resolve, reject });
      this.stream.cork();
      this.stream.write(h);
      if (o.payload !== undefined) this.stream.write(o.payload);
      this.stream.uncork();
      if (type === NBD_CMD_DISC) resolve({ error: 0, message: '', chunks: [] });
    });
  }

  private async ok(type: number, o: Parameters<NbdClient['request']>[1]): Promise<Reply> {
    const r = await this.request(type, o);
    if (r.error !== 0) throw new NbdReplyError(r.error, r.message || `error ${r.error}`);
    return r;
  }

  async read(offset: number, length: number, flags = 0): Promise<Buffer> {
    return (await this.ok(NBD_CMD_READ, { offset, length, flags })).data ?? Buffer.alloc(0);
  }
  async write(offset: number, data: Uint8Array, fua = false): Promise<void> {
    await this.ok(NBD_CMD_WRITE, { offset, payload: data, flags: fua ? NBD_CMD_FLAG_FUA : 0 });
  }
  async flush(): Promise<void> {
    await this.ok(NBD_CMD_FLUSH, {});
  }
  async trim(offset: number, length: number): Promise<void> {
    await this.ok(NBD_CMD_TRIM, { offset, length });
  }
  async zero(offset: number, length: number, flags = 0): Promise<void> {
    await this.ok(NBD_CMD_WRITE_ZEROES, { offset, length, flags });
  }
  async cache(offset: number, length: number): Promise<void> {
    await this.ok(NBD_CMD_CACHE, { offset, length });
  }
  async blockStatus(offset: number, length: number, flags = 0): Promise<{ length: number; flags: number }[]> {
    return (await this.ok(NBD_CMD_BLOCK_STATUS, { offset, length, flags })).extents ?? [];
  }

  /** Soft disconnect: NBD_CMD_DISC, then wait for the server to close. */
  async disconnect(): Promise<void> {
    if (this.failure === undefined) await this.request(NBD_CMD_DISC);
    await new Promise<void>((resolve) => {
      if (this.stream.destroyed) return resolve();
      this.stream.once('close', () => resolve());
      this.stream.end();
    });
  }

  destroy(): void {
    this.stream.destroy();
  }

  private fail(e: Error): void {
    this.failure ??= e;
    for (const p of this.pending.values()) p.reject(this.failure);
    this.pending.clear();
  }

  private async replyLoop(): Promise<void> {
    try {
      for (;;) {
        const magic = (await this.reader.read(4)).readUInt32BE(0);
        if (magic === NBD_SIMPLE_REPLY_MAGIC) {
          const h = await this.reader.read(12);
          const cookie = h.readBigUInt64BE(4);
          const p = this.take(cookie);
          p.reply.error = h.readUInt32BE(0);
          p.reply.chunks.push('simple');
          if (p.type === NBD_CMD_READ && p.reply.error === 0) p.reply.data = await this.reader.read(p.length);
          this.pending.delete(cookie);
          p.resolve(p.reply);
        } else if (magic === NBD_STRUCTURED_REPLY_MAGIC) {
          const h = await this.reader.read(16);
          const flags = h.readUInt16BE(0);
          const type = h.readUInt16BE(2);
          const cookie = h.readBigUInt64BE(4);
          const length = h.readUInt32BE(12);
          const payload = await this.reader.read(length);
          const p = this.take(cookie);
          this.chunk(p, type, payload);
          if ((flags & NBD_REPLY_FLAG_DONE) !== 0) {
            this.pending.delete(cookie);
            p.resolve(p.reply);
          }
        } else {
          throw new NbdError(`bad reply magic 0x${magic.toString(16)}`);
        }
      }
    } catch (e) {
      this.fail(e instanceof Error ? e : new Error(String(e)));
    }
  }

  private take(cookie: bigint): Pending {
    const p = this.pending.get(cookie);
    if (p === undefined) throw new NbdError(`reply for unknown cookie ${cookie}`);
    return p;
  }

  private chunk(p: Pending, type: number, payload: Buffer): void {
    const r = p.reply;
    switch (type) {
      case NBD_REPLY_TYPE_NONE:
        r.chunks.push('none');
        if (p.type === NBD_CMD_READ) r.data ??= Buffer.alloc(p.length);
        return;
      case NBD_REPLY_TYPE_OFFSET_DATA: {
        r.chunks.push('offset_data');
        r.data ??= Buffer.alloc(p.length);
        const at = Number(payload.readBigUInt64BE(0)) - p.offset;
        payload.copy(r.data, at, 8);
        return;
      }
      case NBD_REPLY_TYPE_OFFSET_HOLE:
        r.chunks.push('offset_hole');
        r.data ??= Buffer.alloc(p.length);
        return;
      case NBD_REPLY_TYPE_BLOCK_STATUS: {
        r.chunks.push('block_status');
        const extents: { length: number; flags: number }[] = [];
        for (let i = 4; i + 8 <= payload.length; i += 8) extents.push({ length: payload.readUInt32BE(i), flags: payload.readUInt32BE(i + 4) });
        r.extents = extents;
        return;
      }
      default:
        if ((type & 0x8000) !== 0) {
          r.chunks.push('error');
          r.error = payload.readUInt32BE(0);
          r.message = payload.subarray(6, 6 + payload.readUInt16BE(4)).toString('utf8');
          return;
        }
        throw new NbdError(`unknown structured reply type ${type}`);
    }
  }
}

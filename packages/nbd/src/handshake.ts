/**
 * The fixed newstyle handshake and option haggling, for one connection. Ends in one of three
 * ways: an export opened for transmission (NBD_OPT_GO or NBD_OPT_EXPORT_NAME), a session the
 * client ended (NBD_OPT_ABORT, or an EXPORT_NAME the server cannot satisfy), or a thrown
 * NbdProtocolError / ConnectionClosedError, after which the caller hard-disconnects.
 *
 * Every option is answered by the rules of nbd-proto.md; see README.md for the table.
 */
import type { BlockDevice, ExportProvider, OpenExport } from './device.ts';
import { NbdError, NbdProtocolError, messageOf } from './errors.ts';
import {
  BASE_ALLOCATION,
  BASE_ALLOCATION_ID,
  EXPORT_NAME_PADDING_BYTES,
  IHAVEOPT,
  KNOWN_CLIENT_FLAGS,
  MAX_OPTION_DATA_BYTES,
  MAX_STRING_BYTES,
  NBDMAGIC,
  NBD_FLAG_CAN_MULTI_CONN,
  NBD_FLAG_C_FIXED_NEWSTYLE,
  NBD_FLAG_C_NO_ZEROES,
  NBD_FLAG_FIXED_NEWSTYLE,
  NBD_FLAG_HAS_FLAGS,
  NBD_FLAG_NO_ZEROES,
  NBD_FLAG_READ_ONLY,
  NBD_FLAG_SEND_CACHE,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FLUSH,
  NBD_FLAG_SEND_FUA,
  NBD_FLAG_SEND_TRIM,
  NBD_FLAG_SEND_WRITE_ZEROES,
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_GO,
  NBD_OPT_INFO,
  NBD_OPT_LIST,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
  NBD_OPT_STARTTLS,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_REP_ACK,
  NBD_REP_ERR_INVALID,
  NBD_REP_ERR_POLICY,
  NBD_REP_ERR_SHUTDOWN,
  NBD_REP_ERR_TLS_REQD,
  NBD_REP_ERR_TOO_BIG,
  NBD_REP_ERR_UNKNOWN,
  NBD_REP_ERR_UNSUP,
  NBD_REP_INFO,
  NBD_REP_META_CONTEXT,
  NBD_REP_SERVER,
} from './protocol.ts';
import type { SocketReader } from './reader.ts';
import { type ReplyWriter, optionReply, utf8 } from './replies.ts';

/** Options a client may send in one handshake; a client still haggling after this many is cut off. */
export const MAX_OPTIONS_PER_HANDSHAKE = 1024;

const KNOWN_OPTIONS = new Set([
  NBD_OPT_EXPORT_NAME,
  NBD_OPT_ABORT,
  NBD_OPT_LIST,
  NBD_OPT_STARTTLS,
  NBD_OPT_INFO,
  NBD_OPT_GO,
  NBD_OPT_STRUCTURED_REPLY,
  NBD_OPT_LIST_META_CONTEXT,
  NBD_OPT_SET_META_CONTEXT,
]);

/** Size constraints advertised with NBD_INFO_BLOCK_SIZE and enforced in transmission. */
export interface BlockSize {
  minimum: number;
  preferred: number;
  maximum: number;
}

/** What the handshake agreed, handed to transmission. */
export interface Negotiated {
  /** The export's canonical name (the default export's name if the client asked for ''). */
  exportName: string;
  open: OpenExport;
  transmissionFlags: number;
  structuredReplies: boolean;
  /** base:allocation was selected for this export with NBD_OPT_SET_META_CONTEXT. */
  baseAllocation: boolean;
  blockSize: BlockSize;
}

/** The reader and writer of the connection; STARTTLS replaces both. */
export interface Link {
  reader: SocketReader;
  writer: ReplyWriter;
}

export interface HandshakeContext {
  link: Link;
  provider: ExportProvider;
  /** undefined: no TLS configured (NOTLS mode). */
  tls: { require: boolean } | undefined;
  /**
   * Detach from the plain socket, send `ack` on it, and continue over TLS (replacing
   * `link.reader` and `link.writer`). Throws NbdProtocolError if the client sent bytes after
   * NBD_OPT_STARTTLS without waiting for the reply, or if the TLS handshake fails.
   */
  startTls(ack: Buffer): Promise<void>;
  maxRequestBytes: number;
  log(line: string): void;
  /** True once the server is closing: options other than NBD_OPT_ABORT are then refused with NBD_REP_ERR_SHUTDOWN. */
  shuttingDown?: () => boolean;
}

export type HandshakeResult = { kind: 'transmission'; negotiated: Negotiated } | { kind: 'ended'; reason: string };

/** Transmission flags for `device`, given what was negotiated. */
export function transmissionFlagsFor(device: BlockDevice, structuredReplies: boolean): number {
  let flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_CACHE;
  if (device.readOnly) flags |= NBD_FLAG_READ_ONLY;
  else flags |= NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | (device.fastZero === true ? NBD_FLAG_SEND_FAST_ZERO : 0);
  if (device.multiConn) flags |= NBD_FLAG_CAN_MULTI_CONN;
  // Reads always go out as one content chunk, so NBD_CMD_FLAG_DF costs nothing to honour.
  if (structuredReplies) flags |= NBD_FLAG_SEND_DF;
  return flags;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/**
 * The size constraints to advertise for `device`, or a reason it cannot be served. Defaults per
 * the spec (1, 4096, maxRequestBytes); a device's maximum is capped at maxRequestBytes.
 */
export function blockSizeFor(device: BlockDevice, maxRequestBytes: number): BlockSize | string {
  if (!Number.isSafeInteger(device.size) || device.size < 0) return `export size ${device.size} is not a safe non-negative integer`;
  const b = device.blockSize ?? { minimum: 1, preferred: 4096, maximum: maxRequestBytes };
  const maximum = Math.min(b.maximum, maxRequestBytes);
  if (!isPowerOfTwo(b.minimum) || b.minimum > 65536) return `minimum block size ${b.minimum} is not a power of two up to 65536`;
  if (!isPowerOfTwo(b.preferred) || b.preferred < Math.max(b.minimum, 512)) return `preferred block size ${b.preferred} is not a power of two >= max(minimum, 512)`;
  if (!Number.isSafeInteger(maximum) || maximum < b.preferred || maximum % b.minimum !== 0) return `maximum payload ${maximum} is below the preferred block size or not a multiple of the minimum`;
  return { minimum: b.minimum, preferred: b.preferred, maximum };
}

class OptionReplies {
  constructor(private readonly link: Link, private readonly option: number) {}
  send(type: number, data?: Buffer): Promise<void> {
    return this.link.writer.send([optionReply(this.option, type, data)]);
  }
  error(type: number, message: string): Promise<void> {
    return this.send(type, utf8(message, MAX_STRING_BYTES));
  }
}

/** A cursor over option data; every read past the end throws, which becomes NBD_REP_ERR_INVALID. */
class OptionData {
  private at = 0;
  constructor(private readonly data: Buffer) {}
  get remaining(): number {
    return this.data.length - this.at;
  }
  u16(): number {
    this.need(2);
    const v = this.data.readUInt16BE(this.at);
    this.at += 2;
    return v;
  }
  u32(): number {
    this.need(4);
    const v = this.data.readUInt32BE(this.at);
    this.at += 4;
    return v;
  }
  string(bytes: number): string {
    this.need(bytes);
    if (bytes > MAX_STRING_BYTES) throw new InvalidOption(`a string of ${bytes} bytes is longer than ${MAX_STRING_BYTES}`);
    const raw = this.data.subarray(this.at, this.at + bytes);
    this.at += bytes;
    if (raw.includes(0)) throw new InvalidOption('strings must not contain NUL');
    return raw.toString('utf8');
  }
  private need(bytes: number): void {
    if (bytes > this.remaining) throw new InvalidOption(`option data too short: ${bytes} more bytes wanted, ${this.remaining} left`);
  }
}

class InvalidOption extends Error {}

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}

/** Parse `u32 name length, name, u32 count, count x (u32 length, query)` (the meta context options). */
function parseMetaContextRequest(data: Buffer): { name: string; queries: string[] } {
  const d = new OptionData(data);
  const name = d.string(d.u32());
  const count = d.u32();
  const queries: string[] = [];
  for (let i = 0; i < count; i++) queries.push(d.string(d.u32()));
  if (d.remaining !== 0) throw new InvalidOption(`${d.remaining} bytes after the last query`);
  return { name, queries };
}

/** Parse NBD_OPT_INFO / NBD_OPT_GO: `u32 name length, name, u16 count, count x u16 info type`. */
function parseInfoRequest(data: Buffer): { name: string; infos: Set<number> } {
  const d = new OptionData(data);
  const name = d.string(d.u32());
  const count = d.u16();
  const infos = new Set<number>();
  for (let i = 0; i < count; i++) infos.add(d.u16());
  if (d.remaining !== 0) throw new InvalidOption(`${d.remaining} bytes after the information requests`);
  return { name, infos };
}

/** Run the handshake on a fresh connection. */
export async function negotiate(ctx: HandshakeContext): Promise<HandshakeResult> {
  const { link, provider } = ctx;
  const greeting = Buffer.alloc(18);
  greeting.writeBigUInt64BE(NBDMAGIC, 0);
  greeting.writeBigUInt64BE(IHAVEOPT, 8);
  greeting.writeUInt16BE(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES, 16);
  await link.writer.send([greeting]);

  const clientFlags = (await link.reader.read(4)).readUInt32BE(0);
  if ((clientFlags & ~KNOWN_CLIENT_FLAGS) !== 0) throw new NbdProtocolError(`unknown client flags 0x${clientFlags.toString(16)}`);
  // Plain (non-fixed) newstyle and oldstyle clients are not served: see README.md.
  if ((clientFlags & NBD_FLAG_C_FIXED_NEWSTYLE) === 0) throw new NbdProtocolError('client does not speak fixed newstyle');
  const noZeroes = (clientFlags & NBD_FLAG_C_NO_ZEROES) !== 0;

  let tlsActive = false;
  let structuredReplies = false;
  /** The raw export name of the last successful NBD_OPT_SET_META_CONTEXT that selected base:allocation. */
  let metaContextExport: string | undefined;

  for (let n = 0; ; n++) {
    if (n >= MAX_OPTIONS_PER_HANDSHAKE) throw new NbdProtocolError(`more than ${MAX_OPTIONS_PER_HANDSHAKE} options`);
    const header = await link.reader.read(16);
    if (header.readBigUInt64BE(0) !== IHAVEOPT) throw new NbdProtocolError(`bad option magic 0x${header.readBigUInt64BE(0).toString(16)}`);
    const option = header.readUInt32BE(8);
    const length = header.readUInt32BE(12);
    const reply = new OptionReplies(link, option);

    const forced = ctx.tls?.require === true && !tlsActive;
    if (option === NBD_OPT_ABORT) {
      // The spec asks servers to ignore any data sent with NBD_OPT_ABORT.
      await link.reader.skip(length);
      await reply.send(NBD_REP_ACK);
      return { kind: 'ended', reason: 'client sent NBD_OPT_ABORT' };
    }
    // A SET replaces the selection even when it fails, here too.
    if (option === NBD_OPT_SET_META_CONTEXT) metaContextExport = undefined;
    if (ctx.shuttingDown?.() === true) {
      // The spec: a server shutting down SHOULD error further options with ERR_SHUTDOWN, and
      // the client MUST then disconnect softly (NBD_OPT_ABORT, answered above).
      if (option === NBD_OPT_EXPORT_NAME) return { kind: 'ended', reason: 'NBD_OPT_EXPORT_NAME while the server is closing' };
      await link.reader.skip(length);
      await reply.error(NBD_REP_ERR_SHUTDOWN, 'the server is shutting down');
      continue;
    }
    if (!KNOWN_OPTIONS.has(option) || length > MAX_OPTION_DATA_BYTES) {
      if (option === NBD_OPT_EXPORT_NAME) throw new NbdProtocolError(`NBD_OPT_EXPORT_NAME with ${length} bytes of data`);
      await link.reader.skip(length);
      // FORCEDTLS answers unsupported options with TLS_REQD too.
      if (forced) await reply.error(NBD_REP_ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first');
      else if (!KNOWN_OPTIONS.has(option)) await reply.error(NBD_REP_ERR_UNSUP, `option ${option} is not supported`);
      else await reply.error(NBD_REP_ERR_TOO_BIG, `option data of ${length} bytes is over the limit of ${MAX_OPTION_DATA_BYTES}`);
      continue;
    }
    const data = await link.reader.read(length);


    if (forced && option !== NBD_OPT_STARTTLS) {
      // FORCEDTLS: EXPORT_NAME cannot be refused politely, so the session ends.
      if (option === NBD_OPT_EXPORT_NAME) throw new NbdProtocolError('NBD_OPT_EXPORT_NAME before TLS, and TLS is required');
      await reply.error(NBD_REP_ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first');
      continue;
    }

    try {
      switch (option) {
        case NBD_OPT_EXPORT_NAME: {
          const name = data.toString('utf8');
          const found = await openExport(ctx, name, structuredReplies);
          if (typeof found === 'string') return { kind: 'ended', reason: `NBD_OPT_EXPORT_NAME: ${found}` };
          const out = Buffer.alloc(10 + (noZeroes ? 0 : EXPORT_NAME_PADDING_BYTES));
          out.writeBigUInt64BE(BigInt(found.open.device.size), 0);
          out.writeUInt16BE(found.transmissionFlags, 8);
          try {
            await link.writer.send([out]);
          } catch (e) {
            await closeQuietly(ctx, found.open, found.exportName);
            throw e;
          }
          return { kind: 'transmission', negotiated: { ...found, baseAllocation: false } };
        }
        case NBD_OPT_LIST: {
          if (length !== 0) throw new InvalidOption('NBD_OPT_LIST takes no data');
          for (const e of provider.list()) {
            const name = utf8(e.name);
            await reply.send(NBD_REP_SERVER, Buffer.concat([u32(name.length), name, utf8(e.description, MAX_STRING_BYTES)]));
          }
          await reply.send(NBD_REP_ACK);
          break;
        }
        case NBD_OPT_STARTTLS: {
          if (ctx.tls === undefined) {
            await reply.error(NBD_REP_ERR_POLICY, 'TLS is not configured on this server');
            break;
          }
          if (length !== 0) throw new InvalidOption('NBD_OPT_STARTTLS takes no data');
          if (tlsActive) throw new InvalidOption('TLS is already active');
          await ctx.startTls(optionReply(option, NBD_REP_ACK));
          tlsActive = true;
          // Nothing negotiated in the clear survives the upgrade.
          structuredReplies = false;
          metaContextExport = undefined;
          break;
        }
        case NBD_OPT_INFO:
        case NBD_OPT_GO: {
          const { name, infos } = parseInfoRequest(data);
          const found = await openExport(ctx, name, structuredReplies);
          if (typeof found === 'string') {
            await reply.error(NBD_REP_ERR_UNKNOWN, found);
            break;
          }
          // Opened: closed again on every way out but the move into transmission.
          let handedOver = false;
          try {
            const { device } = found.open;
            const exportInfo = Buffer.alloc(12);
            exportInfo.writeUInt16BE(NBD_INFO_EXPORT, 0);
            exportInfo.writeBigUInt64BE(BigInt(device.size), 2);
            exportInfo.writeUInt16BE(found.transmissionFlags, 10);
            const parts = [exportInfo];
            if (infos.has(NBD_INFO_NAME)) parts.push(Buffer.concat([u16(NBD_INFO_NAME), utf8(found.exportName)]));
            if (infos.has(NBD_INFO_DESCRIPTION)) {
              const description = provider.list().find((e) => e.name === found.exportName)?.description ?? '';
              parts.push(Buffer.concat([u16(NBD_INFO_DESCRIPTION), utf8(description, MAX_STRING_BYTES)]));
            }
            // Sent whether asked for or not (allowed): clients that did not ask may ignore it.
            const bs = Buffer.alloc(14);
            bs.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
            bs.writeUInt32BE(found.blockSize.minimum, 2);
            bs.writeUInt32BE(found.blockSize.preferred, 6);
            bs.writeUInt32BE(found.blockSize.maximum, 10);
            parts.push(bs);
            for (const p of parts) await reply.send(NBD_REP_INFO, p);
            await reply.send(NBD_REP_ACK);
            if (option === NBD_OPT_INFO) break;
            handedOver = true;
            return {
              kind: 'transmission',
              negotiated: { ...found, baseAllocation: structuredReplies && metaContextExport !== undefined && metaContextExport === name },
            };
          } finally {
            if (!handedOver) await closeQuietly(ctx, found.open, found.exportName);
          }
        }
        case NBD_OPT_STRUCTURED_REPLY: {
          if (length !== 0) throw new InvalidOption('NBD_OPT_STRUCTURED_REPLY takes no data');
          structuredReplies = true;
          await reply.send(NBD_REP_ACK);
          break;
        }
        case NBD_OPT_LIST_META_CONTEXT:
        case NBD_OPT_SET_META_CONTEXT: {
          const set = option === NBD_OPT_SET_META_CONTEXT;
          // A SET replaces the selection even when it fails.
          if (set) metaContextExport = undefined;
          if (set && !structuredReplies) throw new InvalidOption('NBD_OPT_SET_META_CONTEXT needs NBD_OPT_STRUCTURED_REPLY first');
          const { name, queries } = parseMetaContextRequest(data);
          for (const q of queries) if (!q.includes(':')) throw new InvalidOption(`query ${quoted(q)} has no namespace`);
          const match = set
            ? queries.includes(BASE_ALLOCATION)
            : queries.length === 0 || queries.some((q) => q === 'base:' || q === BASE_ALLOCATION);
          if (match) {
            await reply.send(NBD_REP_META_CONTEXT, Buffer.concat([u32(set ? BASE_ALLOCATION_ID : 0), utf8(BASE_ALLOCATION)]));
            if (set) metaContextExport = name;
          }
          await reply.send(NBD_REP_ACK);
          break;
        }
      }
    } catch (e) {
      if (e instanceof InvalidOption) await reply.error(NBD_REP_ERR_INVALID, e.message);
      else if (e instanceof NbdError) throw e;
      else {
        // The provider failed (list() threw, say). The spec has no generic server error for
        // options; NBD_REP_ERR_UNKNOWN ("not available") is the closest, with the reason.
        ctx.log(`option ${option} failed: ${messageOf(e)}`);
        await reply.error(NBD_REP_ERR_UNKNOWN, `server error: ${messageOf(e)}`);
      }
    }
  }
}

/** A client-supplied string for a message or log line: quoted, escaped, cut to 100 characters. */
export function quoted(s: string): string {
  return JSON.stringify(s.length > 100 ? `${s.slice(0, 100)}...` : s);
}

function u16(n: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
}

/** Resolve the default export, open it and check the device; a string says why not. */
async function openExport(ctx: HandshakeContext, requested: string, structuredReplies: boolean): Promise<Omit<Negotiated, 'baseAllocation'> | string> {
  const name = requested === '' ? ctx.provider.defaultExport : requested;
  if (name === undefined) return 'there is no default export: ask for one by name';
  let open: OpenExport | undefined;
  try {
    open = await ctx.provider.open(name);
  } catch (e) {
    ctx.log(`export ${quoted(name)} failed to open: ${messageOf(e)}`);
    return `export ${quoted(name)} could not be opened: ${messageOf(e)}`;
  }
  if (open === undefined) return `no export named ${quoted(name)}`;
  let blockSize: BlockSize | string;
  try {
    blockSize = blockSizeFor(open.device, ctx.maxRequestBytes);
  } catch (e) {
    blockSize = messageOf(e);
  }
  if (typeof blockSize === 'string') {
    ctx.log(`export ${quoted(name)} cannot be served: ${blockSize}`);
    await closeQuietly(ctx, open, name);
    return `export ${quoted(name)} is misconfigured: ${blockSize}`;
  }
  return { exportName: name, open, transmissionFlags: transmissionFlagsFor(open.device, structuredReplies), structuredReplies, blockSize };
}

async function closeQuietly(ctx: HandshakeContext, open: OpenExport, name: string): Promise<void> {
  try {
    await open.close();
  } catch (e) {
    ctx.log(`export ${quoted(name)} failed to close: ${messageOf(e)}`);
  }
}

/**
 * The transmission phase of one connection: read requests, check each against the export and
 * the limits, run it on the device without waiting for earlier ones, and send each reply whole
 * as it completes (out of order). Every bounds and sanity check happens here, once, so a device
 * only ever sees in-range, well-formed calls.
 *
 * Memory per connection is bounded: requests stop being read (and TCP pushes back on the
 * client) while `maxInflightBytes` of payloads and replies are held, or MAX_INFLIGHT_REQUESTS
 * requests are unanswered. A request's bytes are released when its reply has been handed to
 * the socket.
 */
import type { BlockDevice } from './device.ts';
import { ConnectionClosedError, ERRNO_NAMES, NbdProtocolError, RequestError, messageOf, nbdErrnoOf } from './errors.ts';
import type { Link, Negotiated } from './handshake.ts';
import {
  BASE_ALLOCATION_ID,
  COMMAND_NAMES,
  DOS_PAYLOAD_BYTES,
  MAX_BLOCK_STATUS_EXTENTS,
  MAX_BLOCK_STATUS_REPLY_BYTES,
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_DISC,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EPERM,
  NBD_REQUEST_MAGIC,
  NBD_STATE_HOLE,
  NBD_STATE_ZERO,
  REQUEST_HEADER_BYTES,
} from './protocol.ts';
import { blockStatusChunk, errorChunk, noneChunk, offsetDataChunk, simpleReply } from './replies.ts';
import type { StatsRecorder } from './stats.ts';

/**
 * Unanswered requests per connection. Real clients keep 16 (qemu) to 64 (nbdcopy) in flight;
 * 1024 leaves room while bounding the bookkeeping a flood of zero-length requests can cause.
 */
export const MAX_INFLIGHT_REQUESTS = 1024;

/** Command flags each command accepts. FUA is accepted everywhere: clients are known to set it on reads. */
function allowedFlags(type: number, structuredReplies: boolean): number {
  switch (type) {
    case NBD_CMD_READ:
      return NBD_CMD_FLAG_FUA | (structuredReplies ? NBD_CMD_FLAG_DF : 0);
    case NBD_CMD_WRITE_ZEROES:
      return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO;
    case NBD_CMD_BLOCK_STATUS:
      return NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE;
    default:
      return NBD_CMD_FLAG_FUA;
  }
}

export interface Request {
  flags: number;
  type: number;
  cookie: Buffer;
  offset: bigint;
  length: number;
}

export function parseRequest(header: Buffer): Request {
  const magic = header.readUInt32BE(0);
  if (magic !== NBD_REQUEST_MAGIC) throw new NbdProtocolError(`bad request magic 0x${magic.toString(16)}`);
  return {
    flags: header.readUInt16BE(4),
    type: header.readUInt16BE(6),
    cookie: Buffer.from(header.subarray(8, 16)),
    offset: header.readBigUInt64BE(16),
    length: header.readUInt32BE(24),
  };
}

/** Bytes and requests held by one connection; `reserve` waits for room. */
class InflightBudget {
  bytes = 0;
  count = 0;
  private waiters: (() => void)[] = [];

  constructor(private readonly maxBytes: number) {}

  /** Whether another request header may be read now (see roomForHeader). */
  hasRoomForHeader(): boolean {
    return this.bytes < this.maxBytes && this.count < MAX_INFLIGHT_REQUESTS;
  }

  /** Take `bytes` if that needs no waiting (see reserve). */
  tryReserve(bytes: number): boolean {
    if ((this.bytes > 0 && this.bytes + bytes > this.maxBytes) || this.count >= MAX_INFLIGHT_REQUESTS) return false;
    this.bytes += bytes;
    this.count++;
    return true;
  }

  /** Wait until there is room to read another request header. */
  async roomForHeader(): Promise<void> {
    while (this.bytes >= this.maxBytes || this.count >= MAX_INFLIGHT_REQUESTS) await this.changed();
  }

  /** Wait until `bytes` more fit (a lone request always fits), then take them. */
  async reserve(bytes: number): Promise<void> {
    while ((this.bytes > 0 && this.bytes + bytes > this.maxBytes) || this.count >= MAX_INFLIGHT_REQUESTS) await this.changed();
    this.bytes += bytes;
    this.count++;
  }

  release(bytes: number): void {
    this.bytes -= bytes;
    this.count--;
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  async idle(): Promise<void> {
    while (this.count > 0) await this.changed();
  }

  private changed(): Promise<void> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }
}

export interface TransmissionOptions {
  link: Link;
  negotiated: Negotiated;
  maxRequestBytes: number;
  maxInflightBytes: number;
  stats: StatsRecorder;
  log(line: string): void;
}

export class Transmission {
  private readonly budget: InflightBudget;
  /** Set by stop(): the loop ends before the next request. */
  private stopping: Error | undefined;
  /** A write's payload is being read: stop() lets it finish. */
  private readingPayload = false;
  /** Device calls of writes, trims and zeroes not yet finished; a flush waits for these. */
  private readonly writesInFlight = new Set<Promise<unknown>>();
  private readonly device: BlockDevice;

  constructor(private readonly o: TransmissionOptions) {
    this.budget = new InflightBudget(o.maxInflightBytes);
    this.device = o.negotiated.open.device;
  }

  /**
   * Serve requests until the client disconnects (NBD_CMD_DISC: resolves with the reason) or
   * breaks the protocol (throws NbdProtocolError) or the connection closes or is aborted
   * (throws ConnectionClosedError / ConnectionAbortedError). Requests already read keep
   * running; `drain()` waits for them.
   */
  async run(): Promise<string> {
    const { link, maxRequestBytes } = this.o;
    for (;;) {
      if (this.stopping !== undefined) throw this.stopping;
      // The common case waits for nothing, and costs no promise: room in the budget, and the
      // next request already buffered (clients pipeline).
      if (!this.budget.hasRoomForHeader()) await this.budget.roomForHeader();
      const req = parseRequest(link.reader.readNow(REQUEST_HEADER_BYTES) ?? (await link.reader.read(REQUEST_HEADER_BYTES)));
      if (req.type === NBD_CMD_DISC) return 'client sent NBD_CMD_DISC';
      // From its header on, a write is in flight: a graceful stop waits for its payload.
      if (req.type === NBD_CMD_WRITE) this.readingPayload = true;

      let cost = 0;
      if (req.type === NBD_CMD_WRITE) {
        if (req.length > maxRequestBytes) {
          // Oversize writes: discard the payload and carry on if it is within the spec's
          // denial-of-service bound, else reply and hang up rather than read it.
          const reason = `write of ${req.length} bytes is over the ${maxRequestBytes}-byte request limit`;
          if (req.length <= DOS_PAYLOAD_BYTES) {
            await link.reader.skip(req.length);
            this.readingPayload = false;
            await this.budget.reserve(0);
            this.reply(req, process.hrtime.bigint(), 0, { errno: NBD_EINVAL, message: reason });
            continue;
          }
          await this.budget.reserve(0);
          await new Promise<void>((sent) => this.reply(req, process.hrtime.bigint(), 0, { errno: NBD_EINVAL, message: reason }, sent));
          throw new NbdProtocolError(`${reason}: not reading it`);
        }
        cost = req.length;
      } else if (req.type === NBD_CMD_READ) {
        cost = Math.min(req.length, maxRequestBytes);
      } else if (req.type === NBD_CMD_BLOCK_STATUS) {
        cost = MAX_BLOCK_STATUS_REPLY_BYTES;
      }
      if (!this.budget.tryReserve(cost)) await this.budget.reserve(cost);
      let payload: Buffer | undefined;
      if (req.type === NBD_CMD_WRITE) {
        try {
          payload = link.reader.readNow(req.length) ?? (await link.reader.read(req.length));
        } catch (e) {
          this.budget.release(cost);
          if (e instanceof ConnectionClosedError) throw new ConnectionClosedError(1, `connection closed in the middle of a ${req.length}-byte write payload`);
          throw e;
        } finally {
          this.readingPayload = false;
        }
      }
      void this.answer(req, cost, process.hrtime.bigint(), payload);
    }
  }

  /**
   * Graceful stop: read no further request. A write whose header has arrived still has its
   * payload read and is answered, as the protocol asks of a server that shuts down (the
   * server's close time-out bounds the wait for a client that never sends the rest).
   */
  stop(reason: Error): void {
    this.stopping ??= reason;
    if (!this.readingPayload) this.o.link.reader.abort(reason);
  }

  /** Wait until every request read so far has been answered (or found its connection gone). */
  drain(): Promise<void> {
    return this.budget.idle();
  }

  /** Run `req` (its budget already reserved), reply once it settles, then release the budget; never rejects. */
  private async answer(req: Request, cost: number, started: bigint, payload: Buffer | undefined): Promise<void> {
    let outcome: { parts: Buffer[] } | { errno: number; message: string };
    try {
      outcome = { parts: (await this.execute(req, payload)) ?? [] };
    } catch (e) {
      outcome = { errno: nbdErrnoOf(e), message: messageOf(e) };
      if (!(e instanceof RequestError)) this.o.log(`${COMMAND_NAMES[req.type] ?? 'unknown'} at ${req.offset}+${req.length}: device error: ${messageOf(e)}`);
    }
    try {
      this.reply(req, started, cost, outcome);
    } catch (e) {
      this.o.log(`internal error answering a request: ${messageOf(e)}`);
    }
  }

  /** Send one reply and count it; its budget is released (and `sent` runs) once the socket has taken it. */
  private reply(req: Request, started: bigint, cost: number, outcome: { parts: Buffer[] } | { errno: number; message: string }, sent?: () => void): void {
    const { negotiated, link, stats } = this.o;
    const name = COMMAND_NAMES[req.type] ?? 'unknown';
    let parts: Buffer[];
    let errno = 0;
    if ('parts' in outcome) {
      parts = outcome.parts.length > 0 ? outcome.parts : [simpleReply(req.cookie, 0)];
    } else {
      errno = outcome.errno;
      const message = `${name} ${req.offset}+${req.length}: ${outcome.message}`;
      parts = negotiated.structuredReplies ? [errorChunk(req.cookie, errno, message)] : [simpleReply(req.cookie, errno)];
    }
    stats.request(name, Number(process.hrtime.bigint() - started) / 1e9, errno, ERRNO_NAMES[errno] ?? String(errno));
    link.writer.write(parts, () => {
      this.budget.release(cost);
      sent?.();
    });
  }

  /** Check `req` and run it; resolves with the reply to send (undefined parts: a plain success). */
  private async execute(req: Request, payload: Buffer | undefined): Promise<Buffer[] | undefined> {
    const { negotiated, maxRequestBytes, stats } = this.o;
    const device = this.device;
    const name = COMMAND_NAMES[req.type];
    if (name === undefined) throw new RequestError(NBD_EINVAL, `unknown command ${req.type}`);
    const bad = req.flags & ~allowedFlags(req.type, negotiated.structuredReplies);
    if (bad !== 0) throw new RequestError(NBD_EINVAL, `command flags 0x${bad.toString(16)} are not valid for ${name}`);
    const fua = (req.flags & NBD_CMD_FLAG_FUA) !== 0;

    if (req.type === NBD_CMD_FLUSH) {
      // Cover every write that finished before this flush arrived, and those still running.
      await Promise.allSettled([...this.writesInFlight]);
      await device.flush();
      return undefined;
    }

    const writes = req.type === NBD_CMD_WRITE || req.type === NBD_CMD_TRIM || req.type === NBD_CMD_WRITE_ZEROES;
    if (writes && device.readOnly) throw new RequestError(NBD_EPERM, 'the export is read-only');
    // In doubles: an offset of 2^53 or more rounds to at least 2^53, past any export size.
    const offset = Number(req.offset);
    const { length } = req;
    if (offset + length > device.size) {
      const errno = req.type === NBD_CMD_WRITE || req.type === NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL;
      throw new RequestError(errno, `range ends at ${req.offset + BigInt(length)}, past the export size ${device.size}`);
    }
    if ((req.type === NBD_CMD_READ || req.type === NBD_CMD_WRITE) && length > maxRequestBytes) {
      throw new RequestError(NBD_EINVAL, `${length} bytes is over the ${maxRequestBytes}-byte request limit`);
    }
    const { minimum } = negotiated.blockSize;
    if (offset % minimum !== 0 || length % minimum !== 0) {
      throw new RequestError(NBD_EINVAL, `offset and length must be multiples of the ${minimum}-byte minimum block size`);
    }

    switch (req.type) {
      case NBD_CMD_READ: {
        // Zero-length reads succeed with no data (the spec leaves them unspecified).
        const data = length === 0 ? new Uint8Array(0) : await device.read(offset, length);
        if (data.length !== length) throw new Error(`device returned ${data.length} bytes for a ${length}-byte read`);
        stats.bytesRead += length;
        if (!negotiated.structuredReplies) return [simpleReply(req.cookie, 0), Buffer.from(data.buffer, data.byteOffset, data.byteLength)];
        return length === 0 ? [noneChunk(req.cookie)] : offsetDataChunk(req.cookie, offset, data);
      }
      case NBD_CMD_WRITE: {
        if (length > 0) await this.trackWrite(device.write(offset, payload!, fua));
        stats.bytesWritten += length;
        return undefined;
      }
      case NBD_CMD_TRIM:
        if (length > 0) await this.trackWrite(device.trim(offset, length, fua));
        return undefined;
      case NBD_CMD_WRITE_ZEROES:
        // NBD_CMD_FLAG_FAST_ZERO: done if the device zeroes faster than it writes, else refused
        // at once (the spec: fail quickly with NBD_ENOTSUP unless faster than a WRITE).
        if ((req.flags & NBD_CMD_FLAG_FAST_ZERO) !== 0 && device.fastZero !== true) throw new RequestError(NBD_ENOTSUP, 'zeroing is no faster than writing zeros on this export');
        if (length > 0) await this.trackWrite(device.zero(offset, length, { fua, noHole: (req.flags & NBD_CMD_FLAG_NO_HOLE) !== 0 }));
        return undefined;
      case NBD_CMD_CACHE:
        if (length > 0 && device.cache !== undefined) await device.cache(offset, length);
        return undefined;
      case NBD_CMD_BLOCK_STATUS: {
        if (!negotiated.baseAllocation) throw new RequestError(NBD_EINVAL, 'no metadata context was selected (NBD_OPT_SET_META_CONTEXT base:allocation)');
        if (length === 0) throw new RequestError(NBD_EINVAL, 'block status of zero bytes');
        const extents = blockStatusExtents(await device.blockStatus(offset, length), length, (req.flags & NBD_CMD_FLAG_REQ_ONE) !== 0);
        return [blockStatusChunk(req.cookie, BASE_ALLOCATION_ID, extents)];
      }
    }
    throw new RequestError(NBD_EINVAL, `unknown command ${req.type}`);
  }

  private trackWrite(p: Promise<void>): Promise<void> {
    this.writesInFlight.add(p);
    // Two inline arrows rather than one named one: see ReplyWriter.pending on keepNames.
    p.then(
      () => this.writesInFlight.delete(p),
      () => this.writesInFlight.delete(p),
    );
    return p;
  }
}

/**
 * The device's extents as base:allocation descriptors: checked (positive lengths, at least
 * one), cut to `length`, adjacent equal states merged, at most MAX_BLOCK_STATUS_EXTENTS, and
 * just the first for NBD_CMD_FLAG_REQ_ONE.
 */
export function blockStatusExtents(from: readonly { length: number; hole: boolean; zero: boolean }[], length: number, reqOne: boolean): { length: number; flags: number }[] {
  const out: { length: number; flags: number }[] = [];
  let covered = 0;
  for (const e of from) {
    if (!Number.isSafeInteger(e.length) || e.length <= 0) throw new Error(`device returned an extent of length ${e.length}`);
    const n = Math.min(e.length, length - covered);
    if (n <= 0) break;
    const flags = (e.hole ? NBD_STATE_HOLE : 0) | (e.zero ? NBD_STATE_ZERO : 0);
    const last = out[out.length - 1];
    if (last !== undefined && last.flags === flags) last.length += n;
    else {
      if (out.length === MAX_BLOCK_STATUS_EXTENTS) break;
      out.push({ length: n, flags });
    }
    covered += n;
  }
  if (out.length === 0) throw new Error('device returned no extents');
  return reqOne ? out.slice(0, 1) : out;
}

/**
 * S3Faults: fault injection between the store and a real S3 server (nbdkit's error filter,
 * one level down). It wraps the SDK's real HTTP handler, so every request that is let through
 * is served by the real server; the faults are what a network and a busy S3 do:
 *
 * - `reset`: the connection drops before the request is sent (nothing applied);
 * - `lostReply`: the request is applied by the server, then the reply is lost (the ambiguous
 *   "failed after applying" case: a retried conditional PUT then meets its own object);
 * - `slowDown`: an HTTP 503 SlowDown reply, as S3 throttles;
 * - `timeout`: no reply for `timeoutMs`, then a time-out;
 * - `down`: every request is refused, as in an outage, until cleared.
 *
 * Faults are picked by a seeded generator at per-request rates, or queued for the next
 * matching requests. `hold` stops the next matching request before it is sent until the test
 * lets it go, to put a chosen step of the store between two others.
 */
import { Readable } from 'node:stream';
import type { HttpHandler, HttpRequest, HttpResult } from './bucket.ts';

export type S3Fault = 'reset' | 'lostReply' | 'slowDown' | 'timeout';

export interface S3FaultRates {
  reset?: number;
  lostReply?: number;
  slowDown?: number;
  timeout?: number;
}

export interface S3FaultCounters {
  requests: number;
  reset: number;
  lostReply: number;
  slowDown: number;
  timeout: number;
  refused: number;
}

interface Queued {
  fault: S3Fault;
  match: (method: string, path: string) => boolean;
}

function networkError(code: string, message: string): Error {
  return Object.assign(new Error(`${message} (injected)`), { code });
}

export class S3Faults {
  down = false;
  rates: S3FaultRates = {};
  timeoutMs = 200;
  readonly counters: S3FaultCounters = { requests: 0, reset: 0, lostReply: 0, slowDown: 0, timeout: 0, refused: 0 };
  private readonly queue: Queued[] = [];
  private readonly holds: { match: (method: string, path: string) => boolean; arrived: () => void; released: Promise<void> }[] = [];
  private state: number;

  constructor(seed = 1) {
    this.state = seed >>> 0 || 1;
  }

  /** xorshift32: deterministic per seed. */
  private random(): number {
    let x = this.state;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.state = x >>> 0;
    return this.state / 0x100000000;
  }

  /** Inject `fault` into the next request whose method and path match. */
  next(fault: S3Fault, match: (method: string, path: string) => boolean = () => true): void {
    this.queue.push({ fault, match });
  }

  /**
   * Hold the next request whose method and path match, before it is sent, until `release()`;
   * `reached` settles when it arrives. The request then goes on to the server unchanged.
   */
  hold(match: (method: string, path: string) => boolean): { reached: Promise<void>; release: () => void } {
    let arrived!: () => void;
    let release!: () => void;
    const reached = new Promise<void>((r) => (arrived = r));
    const released = new Promise<void>((r) => (release = r));
    this.holds.push({ match, arrived, released });
    return { reached, release };
  }

  private pick(req: HttpRequest): S3Fault | undefined {
    const i = this.queue.findIndex((q) => q.match(req.method, req.path));
    if (i >= 0) return this.queue.splice(i, 1)[0]!.fault;
    for (const f of ['reset', 'lostReply', 'slowDown', 'timeout'] as const) {
      const rate = this.rates[f] ?? 0;
      if (rate > 0 && this.random() < rate) return f;
    }
    return undefined;
  }

  wrap(inner: HttpHandler): HttpHandler {
    const handle = async (req: HttpRequest, options?: Parameters<HttpHandler['handle']>[1]): Promise<HttpResult> => {
      this.counters.requests++;
      const h = this.holds.findIndex((x) => x.match(req.method, req.path));
      if (h >= 0) {
        const held = this.holds.splice(h, 1)[0]!;
        held.arrived();
        await held.released;
      }
      if (this.down) {
        this.counters.refused++;
        throw networkError('ECONNREFUSED', `connect ECONNREFUSED ${req.hostname}:${req.port ?? ''}`);
      }
      const fault = this.pick(req);
      if (fault !== undefined) this.counters[fault]++;
      switch (fault) {
        case 'reset':
          throw networkError('ECONNRESET', 'socket hang up');
        case 'timeout':
          await new Promise((r) => setTimeout(r, this.timeoutMs));
          throw Object.assign(networkError('ETIMEDOUT', `request timed out after ${this.timeoutMs} ms`), { name: 'TimeoutError' });
        case 'slowDown': {
          const body = '<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>';
          return {
            response: {
              statusCode: 503, reason: 'Slow Down', headers: { 'content-type': 'application/xml', 'content-length': String(body.length) },
              body: Readable.from([Buffer.from(body)]),
            },
          } as unknown as HttpResult;
        }
        case 'lostReply': {
          const r = await inner.handle(req, options);
          // Drain the real reply so the connection is reusable, then lose it.
          const b = (r.response as { body?: Readable }).body;
          if (b !== undefined && typeof b.resume === 'function') b.resume();
          throw networkError('ECONNRESET', 'socket hang up after the request was applied');
        }
        default:
          return inner.handle(req, options);
      }
    };
    return { handle, destroy: () => inner.destroy?.() };
  }
}

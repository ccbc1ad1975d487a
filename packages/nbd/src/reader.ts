/**
 * Reads exact byte counts from a stream (a socket, or the TLS socket on top of it), with
 * backpressure: the stream is paused while more than `highWaterBytes` (or the size of the read
 * being waited for, if larger) is buffered, so a client that sends faster than the server
 * consumes is stopped by TCP flow control instead of growing memory.
 *
 * One read at a time (asserted). Not safe to share between two consumers. After `detach()` the
 * reader no longer listens to the stream, so another reader (or TLS) can take it over.
 */
import type { Duplex } from 'node:stream';
import { ConnectionAbortedError, ConnectionClosedError } from './errors.ts';

/** Buffered bytes beyond which the stream is paused when no larger read is waiting. */
export const READER_HIGH_WATER_BYTES = 256 * 1024;

interface Want {
  bytes: number;
  discard: boolean;
  resolve: (b: Buffer) => void;
  reject: (e: Error) => void;
}

export class SocketReader {
  private chunks: Buffer[] = [];
  private bufferedBytes = 0;
  private want: Want | undefined;
  private failure: Error | undefined;
  private attached = true;
  /** Bytes received from the stream since the reader was created. */
  receivedBytes = 0;

  constructor(private readonly stream: Duplex, private readonly highWaterBytes = READER_HIGH_WATER_BYTES) {
    stream.on('data', this.onData);
    stream.on('end', this.onEnd);
    stream.on('close', this.onEnd);
    stream.on('error', this.onError);
  }

  get buffered(): number {
    return this.bufferedBytes;
  }

  /** Exactly `bytes` bytes; rejects with ConnectionClosedError if the stream ends first. */
  read(bytes: number): Promise<Buffer> {
    return this.start(bytes, false);
  }

  /**
   * `read` without a promise when the bytes are already buffered (the per-request path);
   * undefined when they are not, or a read is pending, or the reader has failed: then `read`.
   */
  readNow(bytes: number): Buffer | undefined {
    if (this.want !== undefined || this.failure !== undefined || this.bufferedBytes < bytes || !Number.isSafeInteger(bytes) || bytes < 0) return undefined;
    const out = this.take(bytes);
    this.flow();
    return out;
  }

  /** Consume and drop `bytes` bytes without holding more than one chunk of them. */
  async skip(bytes: number): Promise<void> {
    await this.start(bytes, true);
  }

  /** Fail the pending read (and every later one) with `err`; the stream is left alone. */
  abort(err: Error = new ConnectionAbortedError('reading stopped')): void {
    if (this.failure === undefined) this.failure = err;
    this.settle();
  }

  /** Stop listening to the stream and pause it; returns whatever was buffered and unread. */
  detach(): Buffer {
    this.attached = false;
    this.stream.off('data', this.onData);
    this.stream.off('end', this.onEnd);
    this.stream.off('close', this.onEnd);
    this.stream.off('error', this.onError);
    this.stream.pause();
    const rest = Buffer.concat(this.chunks);
    this.chunks = [];
    this.bufferedBytes = 0;
    this.abort(new ConnectionAbortedError('reader detached'));
    return rest;
  }

  private start(bytes: number, discard: boolean): Promise<Buffer> {
    if (this.want !== undefined) throw new Error('SocketReader: one read at a time');
    if (!Number.isSafeInteger(bytes) || bytes < 0) throw new Error(`SocketReader: bad length ${bytes}`);
    return new Promise<Buffer>((resolve, reject) => {
      this.want = { bytes, discard, resolve, reject };
      this.settle();
    });
  }

  private readonly onData = (chunk: Buffer): void => {
    this.receivedBytes += chunk.length;
    this.chunks.push(chunk);
    this.bufferedBytes += chunk.length;
    this.settle();
  };

  private readonly onEnd = (): void => {
    if (this.failure === undefined) this.failure = new ConnectionClosedError(0, 'client closed the connection');
    this.settle();
  };

  private readonly onError = (err: Error): void => {
    if (this.failure === undefined) this.failure = new ConnectionClosedError(0, `connection error: ${err.message}`);
    this.settle();
  };

  /** Satisfy the pending read if possible, then pause or resume the stream. */
  private settle(): void {
    const want = this.want;
    if (want !== undefined && this.failure instanceof ConnectionAbortedError) {
      this.want = undefined;
      want.reject(this.failure);
    } else if (want !== undefined) {
      if (want.discard) {
        while (want.bytes > 0 && this.chunks.length > 0) {
          const head = this.chunks[0]!;
          const n = Math.min(head.length, want.bytes);
          if (n === head.length) this.chunks.shift();
          else this.chunks[0] = head.subarray(n);
          this.bufferedBytes -= n;
          want.bytes -= n;
        }
        if (want.bytes === 0) {
          this.want = undefined;
          want.resolve(Buffer.alloc(0));
        }
      } else if (this.bufferedBytes >= want.bytes) {
        this.want = undefined;
        want.resolve(this.take(want.bytes));
      }
      if (this.want !== undefined && this.failure !== undefined) {
        this.want = undefined;
        const err = this.failure instanceof ConnectionClosedError ? new ConnectionClosedError(want.discard ? 0 : this.bufferedBytes, this.failure.message) : this.failure;
        want.reject(err);
      }
    }
    this.flow();
  }

  /** Pause the stream while enough is buffered, else resume it. */
  private flow(): void {
    if (!this.attached) return;
    const limit = Math.max(this.highWaterBytes, this.want !== undefined && !this.want.discard ? this.want.bytes : 0);
    if (this.bufferedBytes >= limit) this.stream.pause();
    else if (this.stream.isPaused()) this.stream.resume();
  }

  private take(bytes: number): Buffer {
    const head = this.chunks[0];
    if (bytes === 0) return Buffer.alloc(0);
    if (head !== undefined && head.length >= bytes) {
      if (head.length === bytes) this.chunks.shift();
      else this.chunks[0] = head.subarray(bytes);
      this.bufferedBytes -= bytes;
      return head.subarray(0, bytes);
    }
    const out = Buffer.allocUnsafe(bytes);
    let at = 0;
    while (at < bytes) {
      const c = this.chunks[0]!;
      const n = Math.min(c.length, bytes - at);
      c.copy(out, at, 0, n);
      at += n;
      if (n === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(n);
    }
    this.bufferedBytes -= bytes;
    return out;
  }
}

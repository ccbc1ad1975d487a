/**
 * One client connection, from accept to close: the handshake (with the STARTTLS upgrade of the
 * socket in place), then transmission, then an orderly close. Whatever the client does, this
 * ends in the connection closing and `done` resolving; nothing it throws escapes.
 */
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { type SecureContext, TLSSocket } from 'node:tls';
import type { ExportProvider, OpenExport } from './device.ts';
import { ConnectionAbortedError, ConnectionClosedError, NbdProtocolError, messageOf } from './errors.ts';
import { type Link, negotiate } from './handshake.ts';
import { SocketReader } from './reader.ts';
import { ReplyWriter } from './replies.ts';
import type { StatsRecorder } from './stats.ts';
import { Transmission } from './transmission.ts';

/** A client still haggling when the server closes gets this long to take its NBD_REP_ERR_SHUTDOWN and abort. */
const SHUTDOWN_HANDSHAKE_GRACE_MS = 1000;
/** A client must finish the handshake (TLS included) within this long; then it is cut off. */
export const HANDSHAKE_TIMEOUT_MS = 30_000;
/** After the server ends a connection, the client has this long to close its side before the socket is destroyed. */
export const CLOSE_TIMEOUT_MS = 2_000;

export interface ConnectionOptions {
  provider: ExportProvider;
  tls: { context: SecureContext; require: boolean } | undefined;
  maxRequestBytes: number;
  maxInflightBytes: number;
  stats: StatsRecorder;
  log(line: string): void;
}

export class Connection {
  /** Resolves when the socket is closed and the export (if any) is closed. Never rejects. */
  readonly done: Promise<void>;
  private readonly link: Link;
  private stream: Duplex;
  private phase: 'handshake' | 'transmission' = 'handshake';
  private transmission: Transmission | undefined;
  private timedOut = false;
  private stopping = false;
  private readonly name: string;

  constructor(private readonly socket: Socket, private readonly o: ConnectionOptions) {
    this.name = socket.remoteAddress !== undefined ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
    socket.on('error', (e) => this.log(`socket error: ${e.message}`));
    socket.setNoDelay(true);
    this.stream = socket;
    this.link = { reader: new SocketReader(socket), writer: new ReplyWriter(socket) };
    this.done = this.run().catch((e: unknown) => this.log(`internal error: ${messageOf(e)}`));
  }

  /**
   * Graceful: stop reading; requests already read finish and are answered; then close. A
   * connection still in its handshake answers its next options NBD_REP_ERR_SHUTDOWN (the
   * client then aborts) and is closed after SHUTDOWN_HANDSHAKE_GRACE_MS in any case.
   */
  stop(): void {
    this.stopping = true;
    if (this.phase === 'handshake') {
      setTimeout(() => {
        if (this.phase === 'handshake') this.destroy();
      }, SHUTDOWN_HANDSHAKE_GRACE_MS).unref();
    } else if (this.transmission !== undefined) this.transmission.stop(new ConnectionAbortedError('the server is closing'));
    else this.link.reader.abort(new ConnectionAbortedError('the server is closing'));
  }

  /** Close at once; requests in flight are answered into a closed socket (that is, not at all). */
  destroy(): void {
    this.stream.destroy();
    this.socket.destroy();
  }

  private log(line: string): void {
    this.o.log(`nbd ${this.name}: ${line}`);
  }

  private async run(): Promise<void> {
    const { o } = this;
    let open: OpenExport | undefined;
    const timer = setTimeout(() => {
      this.timedOut = true;
      this.destroy();
    }, HANDSHAKE_TIMEOUT_MS);
    timer.unref();
    try {
      const result = await negotiate({
        link: this.link,
        provider: o.provider,
        tls: o.tls,
        startTls: (ack) => this.startTls(ack),
        maxRequestBytes: o.maxRequestBytes,
        log: (line) => this.log(line),
        shuttingDown: () => this.stopping,
      });
      clearTimeout(timer);
      if (result.kind === 'ended') {
        this.log(result.reason);
      } else {
        open = result.negotiated.open;
        this.phase = 'transmission';
        o.stats.transmissions++;
        // The limit is what NBD_INFO_BLOCK_SIZE advertised: a device's own maximum may be lower.
        const t = new Transmission({ link: this.link, negotiated: result.negotiated, maxRequestBytes: result.negotiated.blockSize.maximum, maxInflightBytes: o.maxInflightBytes, stats: o.stats, log: (l) => this.log(l) });
        this.transmission = t;
        // The server began closing while the option that started transmission was answered.
        if (this.stopping) t.stop(new ConnectionAbortedError('the server is closing'));
        try {
          this.log(await t.run());
        } catch (e) {
          this.ended(e);
        }
        await t.drain();
      }
    } catch (e) {
      clearTimeout(timer);
      this.ended(e);
    }
    const closed = this.closeStream();
    if (open !== undefined) {
      try {
        await open.close();
      } catch (e) {
        this.log(`export failed to close: ${messageOf(e)}`);
      }
    }
    await closed;
  }

  /** Log why the connection ended; count protocol violations. */
  private ended(e: unknown): void {
    if (this.timedOut) {
      this.o.stats.protocolErrors++;
      this.log(`handshake not finished within ${HANDSHAKE_TIMEOUT_MS} ms: closed`);
    } else if (e instanceof NbdProtocolError) {
      this.o.stats.protocolErrors++;
      this.log(`protocol error: ${e.message}: closing`);
    } else if (e instanceof ConnectionClosedError) {
      this.log(e.partialBytes > 0 ? `client went away mid-message (${e.message})` : e.message);
    } else if (e instanceof ConnectionAbortedError) {
      this.log(e.message);
    } else {
      this.log(`internal error: ${messageOf(e)}`);
    }
  }

  /** End the stream (a TLS close_notify first, if TLS is up), destroying it if the peer lingers. */
  private closeStream(): Promise<void> {
    const stream = this.stream;
    return new Promise<void>((resolve) => {
      const finish = (): void => {
        clearTimeout(timer);
        this.socket.destroy();
        resolve();
      };
      const timer = setTimeout(() => stream.destroy(), CLOSE_TIMEOUT_MS);
      timer.unref();
      if (stream.destroyed && this.socket.destroyed) return finish();
      stream.once('close', finish);
      stream.end();
    });
  }

  /** NBD_OPT_STARTTLS was accepted: send the ACK in the clear, then speak TLS on the same socket. */
  private async startTls(ack: Buffer): Promise<void> {
    const tls = this.o.tls;
    if (tls === undefined) throw new Error('startTls without a TLS configuration');
    const socket = this.socket;
    const early = this.link.reader.detach();
    if (early.length > 0) throw new NbdProtocolError(`client sent ${early.length} bytes after NBD_OPT_STARTTLS without waiting for the reply`);
    // The client must now wait for the reply, so until TLS takes the socket over, watch it:
    // bytes are a protocol error, and its end must be seen here. TLS wraps the socket's handle,
    // and an end of stream the socket has already read (it reads on while paused) would reach
    // neither TLS nor us: the connection would hang until the handshake time-out.
    let earlyBytes = 0;
    const onData = (b: Buffer): void => {
      earlyBytes += b.length;
    };
    socket.on('data', onData);
    try {
      await this.link.writer.send([ack]);
    } finally {
      socket.off('data', onData);
      socket.pause();
    }
    if (earlyBytes > 0) throw new NbdProtocolError(`client sent ${earlyBytes} bytes after NBD_OPT_STARTTLS without waiting for the reply`);
    if (socket.destroyed || socket.readableEnded) throw new ConnectionClosedError(0, 'client closed the connection during STARTTLS');
    const secure = new TLSSocket(socket, { isServer: true, secureContext: tls.context, requestCert: false });
    secure.on('error', (e) => this.log(`TLS error: ${e.message}`));
    this.stream = secure;
    await new Promise<void>((resolve, reject) => {
      const fail = (e?: Error): void => reject(new NbdProtocolError(`TLS handshake failed${e ? `: ${e.message}` : ''}`));
      secure.once('secure', resolve);
      secure.once('error', fail);
      // The socket is half-open capable, so a client giving up mid-handshake shows as 'end'.
      secure.once('end', () => fail());
      secure.once('close', () => fail());
    });
    this.link.reader = new SocketReader(secure);
    this.link.writer = new ReplyWriter(secure);
    this.log('TLS started');
  }
}

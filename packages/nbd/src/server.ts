/**
 * NbdServer: listens on TCP or a Unix socket and serves an ExportProvider to every client that
 * completes the fixed newstyle handshake. Owns its listeners and connections; `close()` stops
 * them. One server per provider; not reusable after close.
 */
import { type Server, type Socket, createServer } from 'node:net';
import { type SecureContext, createSecureContext } from 'node:tls';
import { Connection } from './connection.ts';
import type { ExportProvider } from './device.ts';
import { type NbdStats, StatsRecorder } from './stats.ts';

/** Default request payload limit: the spec's interoperable 32 MiB. */
export const DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024;
/**
 * Default bytes held per connection: two maximal requests, and four times what the busiest
 * client here keeps in flight (nbdcopy: 64 requests of 256 KiB).
 */
export const DEFAULT_MAX_INFLIGHT_BYTES_PER_CONNECTION = 64 * 1024 * 1024;
/**
 * Default connections open at once. With the in-flight bound, this bounds what clients can
 * make the server hold: 32 x 64 MiB = 2 GiB at most, however they behave.
 */
export const DEFAULT_MAX_CONNECTIONS = 32;
/** How long a graceful close waits for connections to finish before destroying them. */
export const DEFAULT_CLOSE_TIMEOUT_MS = 30_000;
/** Requests above 1 GiB would need buffers near Node's limits; nothing needs them. */
export const MAX_REQUEST_BYTES_LIMIT = 1024 * 1024 * 1024;

export interface NbdServerOptions {
  /** PEM certificate chain and key (the contents, not file names). `require`: refuse everything but STARTTLS before TLS. */
  tls?: { cert: string | Buffer; key: string | Buffer; require: boolean };
  /** Largest READ or WRITE payload accepted and advertised (NBD_INFO_BLOCK_SIZE maximum). */
  maxRequestBytes?: number;
  /** Payload and reply bytes one connection may hold before the server stops reading from it. */
  maxInflightBytesPerConnection?: number;
  /** Connections open at once (default DEFAULT_MAX_CONNECTIONS); more are closed on accept. */
  maxConnections?: number;
  log?: (line: string) => void;
}

export type ListenTarget = { host?: string; port: number } | { path: string };

export class NbdServer {
  private readonly listeners: Server[] = [];
  private readonly connections = new Set<Connection>();
  private readonly stats_ = new StatsRecorder();
  private readonly tls: { context: SecureContext; require: boolean } | undefined;
  private readonly maxRequestBytes: number;
  private readonly maxInflightBytes: number;
  private readonly maxConnections: number;
  private readonly log: (line: string) => void;
  private closing: Promise<void> | undefined;

  constructor(private readonly provider: ExportProvider, private readonly options: NbdServerOptions = {}) {
    this.maxRequestBytes = options.maxRequestBytes ?? DEFAULT_MAX_REQUEST_BYTES;
    this.maxInflightBytes = options.maxInflightBytesPerConnection ?? DEFAULT_MAX_INFLIGHT_BYTES_PER_CONNECTION;
    if (!Number.isSafeInteger(this.maxRequestBytes) || this.maxRequestBytes < 4096 || this.maxRequestBytes > MAX_REQUEST_BYTES_LIMIT) {
      throw new RangeError(`maxRequestBytes must be an integer in [4096, ${MAX_REQUEST_BYTES_LIMIT}], got ${this.maxRequestBytes}`);
    }
    if (!Number.isSafeInteger(this.maxInflightBytes) || this.maxInflightBytes < this.maxRequestBytes) {
      throw new RangeError(`maxInflightBytesPerConnection (${this.maxInflightBytes}) must be at least maxRequestBytes (${this.maxRequestBytes})`);
    }
    this.maxConnections = options.maxConnections ?? DEFAULT_MAX_CONNECTIONS;
    if (!Number.isSafeInteger(this.maxConnections) || this.maxConnections < 1) {
      throw new RangeError(`maxConnections must be a positive integer, got ${this.maxConnections}`);
    }
    this.log = options.log ?? (() => {});
    // TLS 1.2 at least, as the spec requires; a bad certificate or key fails here, not per client.
    this.tls = options.tls === undefined ? undefined : { context: createSecureContext({ cert: options.tls.cert, key: options.tls.key, minVersion: 'TLSv1.2' }), require: options.tls.require };
  }

  /** Start listening; resolves with an NBD URI for the listener (the real port if `port` was 0). */
  listen(target: ListenTarget): Promise<{ uri: string }> {
    if (this.closing !== undefined) return Promise.reject(new Error('NbdServer is closed'));
    // allowHalfOpen: a client may shut down its side right after NBD_CMD_DISC; the replies to
    // what it sent before must still go out, so the server decides when to end its side.
    const server = createServer({ allowHalfOpen: true }, (socket) => this.accept(socket));
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      const ready = (): void => {
        server.off('error', reject);
        server.on('error', (e) => this.log(`nbd: listener error: ${e.message}`));
        this.listeners.push(server);
        const scheme = this.tls?.require === true ? 'nbds' : 'nbd';
        if ('path' in target) {
          resolve({ uri: `${scheme}+unix:///?socket=${encodeURIComponent(target.path)}` });
        } else {
          const address = server.address();
          const port = typeof address === 'object' && address !== null ? address.port : target.port;
          const host = target.host ?? '127.0.0.1';
          resolve({ uri: `${scheme}://${host.includes(':') ? `[${host}]` : host}:${port}` });
        }
      };
      if ('path' in target) server.listen(target.path, ready);
      else server.listen(target.port, target.host ?? '127.0.0.1', ready);
    });
  }

  /**
   * Stop accepting. Graceful: every connection stops reading, answers what it already read,
   * then closes (handshakes in progress are cut off); connections still open after
   * `timeoutMs` (default 30 s: a client that stopped reading its replies would otherwise hold
   * the server forever) are destroyed. Not graceful: connections are destroyed at once.
   * Resolves when every connection and listener is closed and every export closed (which
   * waits for device calls already started); later calls return the same promise.
   */
  close(options: { graceful: boolean; timeoutMs?: number } = { graceful: true }): Promise<void> {
    this.closing ??= (async () => {
      const stopped = this.listeners.map((s) => new Promise<void>((resolve) => s.close(() => resolve())));
      for (const c of this.connections) {
        if (options.graceful) c.stop();
        else c.destroy();
      }
      const timer = setTimeout(() => {
        for (const c of this.connections) {
          this.log('nbd: a connection did not finish in time at close: destroying it');
          c.destroy();
        }
      }, options.timeoutMs ?? DEFAULT_CLOSE_TIMEOUT_MS);
      await Promise.all([...this.connections].map((c) => c.done));
      clearTimeout(timer);
      await Promise.all(stopped);
    })();
    return this.closing;
  }

  stats(): NbdStats {
    return this.stats_.snapshot();
  }

  private accept(socket: Socket): void {
    const stats = this.stats_;
    socket.on('error', () => {});
    const max = this.maxConnections;
    if (this.closing !== undefined || this.connections.size >= max) {
      stats.connectionsRefused++;
      this.log(`nbd: refused a connection (${this.closing !== undefined ? 'closing' : `${max} connections open`})`);
      socket.destroy();
      return;
    }
    stats.connectionsAccepted++;
    stats.connections++;
    const c = new Connection(socket, {
      provider: this.provider,
      tls: this.tls,
      maxRequestBytes: this.maxRequestBytes,
      maxInflightBytes: this.maxInflightBytes,
      stats,
      log: this.log,
    });
    this.connections.add(c);
    void c.done.then(() => {
      this.connections.delete(c);
      stats.connections--;
    });
  }
}

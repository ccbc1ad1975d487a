/**
 * `pasture serve`: serve a pool's volumes and snapshots over NBD, with a control socket for
 * live management and optional Prometheus metrics. SIGTERM and SIGINT stop it cleanly: stop
 * accepting, finish requests in flight, flush, close the pool, exit 0.
 */
import { readFile } from 'node:fs/promises';
import { createServer as createHttpServer, type Server as HttpServer } from 'node:http';
import { GrassLog, type SegmentStore } from '@pasture/grass';
import { Pool } from '@pasture/human';
import { NbdServer } from '@pasture/nbd';
import { Registry, Gauge, collectDefaultMetrics } from 'prom-client';
import { startControl, type ControlServer } from './control.ts';
import { PoolExports } from './exports.ts';
import { io } from './io.ts';
import { s3Stats } from './stores.ts';

export interface ServeOptions {
  /** The store's local directory (file store, or S3 cache): the control socket lives there. */
  dir: string;
  openStore: () => Promise<SegmentStore>;
  listen?: { host: string; port: number };
  socket?: string;
  only?: string;
  tls?: { certFile: string; keyFile: string; require: boolean };
  metrics?: { host: string; port: number };
  /** Connections open at once (the server's default if absent). */
  maxConnections?: number;
  json: boolean;
  /** Run a management command against the live pool (the CLI's own commands). */
  runCommand: (argv: string[]) => Promise<number>;
  setLive: (l: { dir: string; pool: Pool; store?: SegmentStore } | undefined) => void;
}

export function parseHostPort(v: string, what: string): { host: string; port: number } {
  const m = /^(?:\[?([^\]]*)\]?:)?(\d+)$/.exec(v);
  if (m === null || Number(m[2]) > 65535) throw new Error(`${what} takes HOST:PORT or PORT, got '${v}'`);
  return { host: m[1] || '127.0.0.1', port: Number(m[2]) };
}

/** Serve until SIGTERM/SIGINT; resolves with the exit code. */
export async function serve(o: ServeOptions): Promise<number> {
  const store = await o.openStore();
  const g = await GrassLog.open(store);
  const pool = await Pool.open(g);
  const provider = new PoolExports(pool, o.only);
  // What has started so far; a failure before serving stops it all and closes the pool, so
  // the process exits (a failed start that kept serving held the store with no SIGTERM handler).
  let server: NbdServer | undefined;
  let control: ControlServer | undefined;
  let metrics: HttpServer | undefined;
  let uri: string;
  try {
    if (o.only !== undefined && provider.list().length === 0) throw new Error(`no volume or snapshot named '${o.only}' to export`);
    const tls = o.tls === undefined ? undefined : { cert: await readFile(o.tls.certFile), key: await readFile(o.tls.keyFile), require: o.tls.require };
    server = new NbdServer(provider, { ...(tls ? { tls } : {}), ...(o.maxConnections !== undefined ? { maxConnections: o.maxConnections } : {}) });
    const target = o.socket !== undefined ? { path: o.socket } : (o.listen ?? { host: '127.0.0.1', port: 10809 });
    uri = (await server.listen(target)).uri;
    o.setLive({ dir: o.dir, pool, store });
    control = await startControl(o.dir, o.runCommand);
    if (o.metrics !== undefined) metrics = await startMetrics(o.metrics, server, pool, store);
  } catch (e) {
    metrics?.close();
    await control?.close().catch(() => undefined);
    await server?.close({ graceful: false }).catch(() => undefined);
    o.setLive(undefined);
    await pool.close().catch(() => undefined);
    throw e;
  }
  const nbd = server;
  const controlServer = control;
  // An S3 store taken over by another writer stops taking writes: say so once, here, rather
  // than only in each client's EIO.
  const fenceWatch = s3Stats(store) === undefined ? undefined : setInterval(() => {
    const fenced = s3Stats(store)?.fenced;
    if (fenced === undefined) return;
    clearInterval(fenceWatch);
    io.err(`pasture: ${fenced}; its clients' writes now fail: stop this server\n`);
  }, 500);
  fenceWatch?.unref();

  const exportsNow = provider.list();
  if (o.json) io.out(JSON.stringify({ uri, exports: exportsNow, control: `${o.dir}/control.sock`, metrics: o.metrics ? `http://${o.metrics.host}:${o.metrics.port}/metrics` : null }) + '\n');
  else {
    io.out(`serving ${o.dir} on ${uri}\n`);
    for (const e of exportsNow) io.out(`  ${exportUri(uri, e.name)}    ${e.description}\n`);
    io.out(`try: nbdinfo --list ${uri}; stop with Ctrl-C (SIGINT) or SIGTERM\n`);
  }
  return new Promise<number>((resolveExit) => {
    let stopping = false;
    const stop = (sig: string): void => {
      if (stopping) {
        // A second signal: stop at once, as a crash would (everything flushed is safe).
        io.err(`${sig}: stopping at once\n`);
        process.exit(1);
      }
      stopping = true;
      if (!o.json) io.err(`${sig}: stopping: finishing requests in flight and commands under way, flushing, closing the pool (${sig} again to stop at once)\n`);
      void (async () => {
        let code = 0;
        clearInterval(fenceWatch);
        try {
          metrics?.close();
          await Promise.all([controlServer.close(), nbd.close({ graceful: true })]);
          await pool.flush();
          o.setLive(undefined);
          if (s3Stats(store) !== undefined && !o.json) io.err('waiting for S3 to take the final state (see --close-timeout)\n');
          await pool.close();
          // An S3 store that could not publish its final state (an outage) keeps it in the
          // journal: say so, and fail, so that nobody takes the exit for "all in the bucket".
          const s3 = s3Stats(store);
          if (s3 !== undefined && s3.closePublished === false) {
            io.err(`pasture: the bucket does not have the final state (${s3.lastError ?? 'S3 did not take it'}); it is safe in ${o.dir}, and the next open there uploads it: keep that directory\n`);
            code = 1;
          }
        } catch (e) {
          io.err(`pasture: while stopping: ${(e as Error).message}\n`);
          code = 1;
        }
        resolveExit(code);
      })();
    };
    process.on('SIGTERM', () => stop('SIGTERM'));
    process.on('SIGINT', () => stop('SIGINT'));
  });
}

async function startMetrics(at: { host: string; port: number }, server: NbdServer, pool: Pool, store: SegmentStore): Promise<HttpServer> {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  const gauge = (name: string, help: string, labelNames: string[], collect: (g: Gauge) => void): void => {
    new Gauge({ name, help, labelNames, registers: [registry], collect() { collect(this); } });
  };
  gauge('pasture_nbd_connections', 'Open NBD connections', [], (g) => g.set(server.stats().connections));
  gauge('pasture_grass_write_amplification', 'Grass write amplification (all bytes written / user bytes)', [], (g) => g.set(pool.cow.grass.stats().writeAmplification));
  gauge('pasture_grass_free_segments', 'Grass free segments', [], (g) => g.set(pool.cow.grass.stats().freeSegments));
  gauge('pasture_grass_free_bytes', 'Grass free space in bytes (free segments)', [], (g) => {
    const s = pool.cow.grass.stats();
    g.set(s.freeSegments * s.segmentBytes);
  });
  gauge('pasture_cow_compression_ratio', 'Cow compression ratio of stored data blocks', [], (g) => g.set(pool.cow.stats().compressionRatio));
  gauge('pasture_cow_physical_bytes', 'Cow physical bytes (data and metadata records)', [], (g) => g.set(pool.cow.stats().physicalBytes));
  gauge('pasture_cow_cache_hit_ratio', 'Cow node cache hit rate', [], (g) => g.set(pool.cow.stats().cache.hitRate));
  const s3 = s3Stats(store);
  if (s3 !== undefined) {
    // Counters read at scrape time; exposed as gauges because prom-client counters cannot be set.
    const fields: [keyof typeof s3, string][] = [
      ['puts', 'S3 PUT requests (including multipart parts)'], ['gets', 'S3 GET requests'], ['bytesUp', 'Bytes uploaded to S3'],
      ['bytesDown', 'Bytes downloaded from S3'], ['cacheHits', 'Segment reads served by the local cache'], ['cacheMisses', 'Segment reads that fetched from S3'],
      ['uploadBacklogBytes', 'Sealed segment bytes waiting for upload'], ['failures', 'S3 calls that failed after retries'], ['publications', 'Manifests published'],
    ];
    for (const [f, help] of fields) {
      const name = `pasture_s3_${f.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`)}`;
      gauge(name, help, [], (g) => g.set(Number(s3Stats(store)![f] ?? 0)));
    }
  }
  const http = createHttpServer((req, res) => {
    if (req.url !== '/metrics') {
      res.writeHead(404).end('try /metrics\n');
      return;
    }
    registry.metrics().then(
      (text) => res.writeHead(200, { 'content-type': registry.contentType }).end(text + nbdMetricsText(server)),
      (e: unknown) => res.writeHead(500).end(String(e)),
    );
  });
  await new Promise<void>((res, rej) => {
    http.once('error', rej);
    http.listen(at.port, at.host, () => res());
  });
  return http;
}

/**
 * The NBD server's counters and latency histograms in Prometheus text format. They are
 * written out here rather than through prom-client objects because the server already keeps
 * cumulative buckets (nbd imports no metrics library).
 */
function nbdMetricsText(server: NbdServer): string {
  const st = server.stats();
  const lines: string[] = [];
  const counter = (name: string, help: string, samples: [Record<string, string>, number][]): void => {
    lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} counter`);
    for (const [labels, v] of samples) lines.push(`${name}${fmt(labels)} ${v}`);
  };
  const fmt = (labels: Record<string, string>): string => {
    const e = Object.entries(labels);
    return e.length === 0 ? '' : `{${e.map(([k, v]) => `${k}="${v}"`).join(',')}}`;
  };
  counter('pasture_nbd_requests_total', 'NBD requests answered, by command', Object.entries(st.requests).map(([c, n]) => [{ command: c }, n]));
  counter('pasture_nbd_request_errors_total', 'NBD requests answered with an error, by command', Object.entries(st.requestErrors).map(([c, n]) => [{ command: c }, n]));
  counter('pasture_nbd_read_bytes_total', 'Payload bytes returned by successful NBD reads', [[{}, st.bytesRead]]);
  counter('pasture_nbd_written_bytes_total', 'Payload bytes accepted by successful NBD writes', [[{}, st.bytesWritten]]);
  counter('pasture_nbd_connections_accepted_total', 'NBD connections accepted', [[{}, st.connectionsAccepted]]);
  counter('pasture_nbd_protocol_errors_total', 'NBD connections ended for breaking the protocol', [[{}, st.protocolErrors]]);
  const h = 'pasture_nbd_request_duration_seconds';
  lines.push(`# HELP ${h} NBD request latency, by command`, `# TYPE ${h} histogram`);
  for (const [cmd, buckets] of Object.entries(st.latency)) {
    for (const [le, n] of Object.entries(buckets)) lines.push(`${h}_bucket{command="${cmd}",le="${le}"} ${n}`);
    lines.push(`${h}_sum{command="${cmd}"} ${st.latencySumSeconds[cmd] ?? 0}`, `${h}_count{command="${cmd}"} ${buckets['+Inf'] ?? 0}`);
  }
  return lines.join('\n') + '\n';
}

/** The URI of export `name` on the server at `uri` (nbd://HOST:PORT or nbd+unix:///?socket=P). */
export function exportUri(uri: string, name: string): string {
  const n = encodeURIComponent(name).replace(/%40/g, '@');
  return uri.startsWith('nbd+unix://') ? uri.replace(/^nbd\+unix:\/\/\/?/, `nbd+unix:///${n}`) : `${uri.replace(/\/$/, '')}/${n}`;
}

/**
 * Server counters, shaped for a Prometheus exporter: monotonic totals, a gauge of open
 * connections, and per-command latency histograms with cumulative `le` buckets in seconds.
 * Cheap to update (a few additions per request); `snapshot()` copies.
 */

/** Upper bounds of the latency buckets, in seconds (100 µs to 10 s, then +Inf). */
export const LATENCY_BUCKETS_SECONDS: readonly number[] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

export interface NbdStats {
  /** Connections open now (handshake or transmission). */
  connections: number;
  connectionsAccepted: number;
  /** Connections closed at once because `maxConnections` were open. */
  connectionsRefused: number;
  /** Connections that reached transmission (NBD_OPT_GO or NBD_OPT_EXPORT_NAME). */
  transmissions: number;
  /** Connections ended because the peer broke the protocol (bad magic, flags, lengths, timeout). */
  protocolErrors: number;
  /** Requests answered, by command name (`read`, `write`, ..., or `unknown`). */
  requests: Record<string, number>;
  /** Requests answered with an error, by command name. */
  requestErrors: Record<string, number>;
  /** Requests answered with an error, all commands. */
  errors: number;
  /** Error replies by NBD error name (`EINVAL`, `EIO`, ...). */
  errorsByErrno: Record<string, number>;
  /** Payload bytes returned by successful reads / accepted by successful writes. */
  bytesRead: number;
  bytesWritten: number;
  /** Per command: cumulative counts by bucket upper bound in seconds ('0.0001', ..., '+Inf'). */
  latency: Record<string, Record<string, number>>;
  /** Per command: the sum of latencies in seconds (the histogram's `_sum`). */
  latencySumSeconds: Record<string, number>;
}

interface Histogram {
  counts: number[];
  sumSeconds: number;
}

export class StatsRecorder {
  connections = 0;
  connectionsAccepted = 0;
  connectionsRefused = 0;
  transmissions = 0;
  protocolErrors = 0;
  bytesRead = 0;
  bytesWritten = 0;
  private readonly requests = new Map<string, number>();
  private readonly requestErrors = new Map<string, number>();
  private readonly errorsByErrno = new Map<string, number>();
  private readonly histograms = new Map<string, Histogram>();

  /** One answered request. `errno` 0 is success. */
  request(command: string, seconds: number, errno: number, errnoName: string): void {
    this.requests.set(command, (this.requests.get(command) ?? 0) + 1);
    if (errno !== 0) {
      this.requestErrors.set(command, (this.requestErrors.get(command) ?? 0) + 1);
      this.errorsByErrno.set(errnoName, (this.errorsByErrno.get(errnoName) ?? 0) + 1);
    }
    let h = this.histograms.get(command);
    if (h === undefined) {
      h = { counts: new Array<number>(LATENCY_BUCKETS_SECONDS.length + 1).fill(0), sumSeconds: 0 };
      this.histograms.set(command, h);
    }
    let i = LATENCY_BUCKETS_SECONDS.findIndex((le) => seconds <= le);
    if (i < 0) i = LATENCY_BUCKETS_SECONDS.length;
    h.counts[i] = (h.counts[i] ?? 0) + 1;
    h.sumSeconds += seconds;
  }

  snapshot(): NbdStats {
    const latency: Record<string, Record<string, number>> = {};
    const latencySumSeconds: Record<string, number> = {};
    for (const [command, h] of this.histograms) {
      const buckets: Record<string, number> = {};
      let running = 0;
      LATENCY_BUCKETS_SECONDS.forEach((le, i) => {
        running += h.counts[i] ?? 0;
        buckets[String(le)] = running;
      });
      running += h.counts[LATENCY_BUCKETS_SECONDS.length] ?? 0;
      buckets['+Inf'] = running;
      latency[command] = buckets;
      latencySumSeconds[command] = h.sumSeconds;
    }
    let errors = 0;
    for (const n of this.requestErrors.values()) errors += n;
    return {
      connections: this.connections,
      connectionsAccepted: this.connectionsAccepted,
      connectionsRefused: this.connectionsRefused,
      transmissions: this.transmissions,
      protocolErrors: this.protocolErrors,
      requests: Object.fromEntries(this.requests),
      requestErrors: Object.fromEntries(this.requestErrors),
      errors,
      errorsByErrno: Object.fromEntries(this.errorsByErrno),
      bytesRead: this.bytesRead,
      bytesWritten: this.bytesWritten,
      latency,
      latencySumSeconds,
    };
  }
}

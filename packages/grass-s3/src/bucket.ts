/**
 * Bucket: the few S3 calls a segment store makes, over @aws-sdk/client-s3, with the retry
 * policy and counters in one place. Nothing else in Pasture talks to S3.
 *
 * Retries: the SDK's standard strategy (exponential backoff with full jitter, on 5xx,
 * throttling, resets and time-outs) inside each call, with `maxAttempts` per call. Callers
 * that must not give up (background uploads) loop on top with their own backoff.
 *
 * Every call here is idempotent except a conditional PUT, whose retry after an ambiguous
 * failure ("applied, but the reply was lost") comes back 412; `putIfAbsent` then reads the
 * object back and decides by content whether the winner was this writer.
 */
import {
  S3Client, PutObjectCommand, GetObjectCommand, DeleteObjectsCommand, ListObjectsV2Command,
  CreateMultipartUploadCommand, UploadPartCommand, CompleteMultipartUploadCommand, AbortMultipartUploadCommand,
  DeleteObjectCommand, HeadBucketCommand, CreateBucketCommand, ListMultipartUploadsCommand,
} from '@aws-sdk/client-s3';
import type { S3ClientConfig } from '@aws-sdk/client-s3';
import { NodeHttpHandler } from '@smithy/node-http-handler';

/** The SDK's HTTP handler shape, which fault injection wraps. */
export interface HttpHandler {
  handle: NodeHttpHandler['handle'];
  destroy?(): void;
}
export type HttpRequest = Parameters<NodeHttpHandler['handle']>[0];
export type HttpResult = Awaited<ReturnType<NodeHttpHandler['handle']>>;
import { Agent } from 'node:http';
import { Agent as HttpsAgent } from 'node:https';

export interface BucketOptions {
  bucket: string;
  /** Key prefix without a trailing slash ('' for the bucket's root). */
  prefix: string;
  endpoint?: string;
  region?: string;
  accessKeyId?: string;
  secretAccessKey?: string;
  forcePathStyle?: boolean;
  /**
   * Sign the SHA-256 of each uploaded body (SigV4 signed payload), so that the server rejects
   * a body changed on the way. Default: over plain HTTP to a host other than loopback, and
   * when no endpoint is given.
   * Over HTTPS, TLS already protects the body, and on loopback there is no wire; there,
   * uploads are sent as UNSIGNED-PAYLOAD, which saves hashing every byte on both sides.
   */
  signPayload?: boolean;
  /** Attempts per call, with the SDK's jittered exponential backoff between them (default 5). */
  maxAttempts?: number;
  /**
   * Milliseconds a request's socket may stay silent, in both directions, before the request is
   * abandoned and retried (default 30 000): a hung S3 server (radosgw with a full OSD, say)
   * must not hang the store's uploads forever. There is no cap on a request's total time, so
   * a 16 MiB upload over a slow link that keeps moving is never cut off and re-sent.
   */
  requestTimeoutMs?: number;
  /** Parallel connections (default 16). */
  maxSockets?: number;
  /** Wraps the HTTP handler: fault injection in tests. */
  wrapHandler?: (inner: HttpHandler) => HttpHandler;
  /** This machine's clock in ms since the epoch (default Date.now; tests skew it). */
  now?: () => number;
}

export interface BucketCounters {
  puts: number;
  gets: number;
  lists: number;
  deletes: number;
  bytesUp: number;
  bytesDown: number;
  /** Calls that failed after the SDK's own retries. */
  failures: number;
}

/** An S3 error's HTTP status, if it has one. */
export function httpStatus(e: unknown): number | undefined {
  return (e as { $metadata?: { httpStatusCode?: number } })?.$metadata?.httpStatusCode;
}

function isNotFound(e: unknown): boolean {
  const name = (e as Error)?.name;
  return name === 'NoSuchKey' || name === 'NotFound' || httpStatus(e) === 404;
}

function isPreconditionFailed(e: unknown): boolean {
  return httpStatus(e) === 412 || (e as Error)?.name === 'PreconditionFailed';
}

/** Sign upload bodies only over plain HTTP to another machine (see BucketOptions.signPayload). */
export function defaultSignPayload(endpoint: string | undefined): boolean {
  // Unknown here: the SDK may still take a plain-HTTP endpoint from AWS_ENDPOINT_URL or ~/.aws/config.
  if (endpoint === undefined) return true;
  let url: URL;
  try {
    url = new URL(endpoint);
  } catch {
    return true;
  }
  if (url.protocol === 'https:') return false;
  const host = url.hostname.replace(/^\[|\]$/g, '');
  return !(host === 'localhost' || host === '::1' || /^127\./.test(host));
}

/** Parts of a multipart upload; S3's minimum part is 5 MiB. */
const PART_BYTES = 8 * 1024 * 1024;
/** DeleteObjects takes at most 1000 keys. */
const DELETE_BATCH = 1000;

export class Bucket {
  readonly client: S3Client;
  readonly name: string;
  readonly prefix: string;
  readonly endpoint: string | undefined;
  readonly counters: BucketCounters = { puts: 0, gets: 0, lists: 0, deletes: 0, bytesUp: 0, bytesDown: 0, failures: 0 };
  private readonly now: () => number;
  /**
   * The server's clock minus ours, from the Date header of its latest reply (0 before one).
   * The header is whole seconds, so this runs up to 1 s behind: a grace period measured with
   * it is up to 1 s longer, never shorter.
   */
  private serverClockOffsetMs = 0;

  constructor(options: BucketOptions) {
    this.name = options.bucket;
    this.prefix = options.prefix.replace(/\/+$/, '');
    this.endpoint = options.endpoint;
    const maxSockets = options.maxSockets ?? 16;
    const silenceMs = options.requestTimeoutMs ?? 30_000;
    let handler: HttpHandler = new NodeHttpHandler({
      socketTimeout: silenceMs,
      // The SDK's requestTimeout would cap the whole request (and only warns unless
      // throwOnRequestTimeout): left off, see requestTimeoutMs above.
      connectionTimeout: Math.min(silenceMs, 10_000),
      httpAgent: new Agent({ keepAlive: true, maxSockets }),
      httpsAgent: new HttpsAgent({ keepAlive: true, maxSockets }),
    });
    if (options.wrapHandler !== undefined) handler = options.wrapHandler(handler);
    const config: S3ClientConfig = {
      region: options.region ?? 'us-east-1',
      forcePathStyle: options.forcePathStyle ?? true,
      maxAttempts: options.maxAttempts ?? 5,
      requestHandler: handler as NodeHttpHandler,
      // Checksums only where S3 requires them: radosgw and MinIO differ on the newer defaults.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
    };
    if (options.endpoint !== undefined) config.endpoint = options.endpoint;
    if (options.accessKeyId !== undefined && options.secretAccessKey !== undefined) {
      config.credentials = { accessKeyId: options.accessKeyId, secretAccessKey: options.secretAccessKey };
    }
    this.client = new S3Client(config);
    this.now = options.now ?? Date.now;
    // Every reply carries the server's time (HTTP Date, 1 s resolution): object times
    // (LastModified) are compared with serverNow(), never with this machine's clock.
    this.client.middlewareStack.add(
      (next) => async (args) => {
        const out = await next(args);
        const date = (out.response as { headers?: Record<string, string | undefined> }).headers?.['date'];
        const t = date === undefined ? NaN : Date.parse(date);
        if (!Number.isNaN(t)) this.serverClockOffsetMs = t - this.now();
        return out;
      },
      { step: 'deserialize', name: 'pastureServerClock' },
    );
    if (!(options.signPayload ?? defaultSignPayload(options.endpoint))) {
      // The signer hashes the body unless this header is already set (SigV4's
      // x-amz-content-sha256); only uploads carry bodies worth the saving.
      this.client.middlewareStack.add(
        (next, context) => async (args) => {
          const request = args.request as { headers?: Record<string, string> };
          if ((context.commandName === 'PutObjectCommand' || context.commandName === 'UploadPartCommand') && request.headers !== undefined) {
            request.headers['x-amz-content-sha256'] = 'UNSIGNED-PAYLOAD';
          }
          return next(args);
        },
        { step: 'build', name: 'pastureUnsignedPayload' },
      );
    }
  }

  /** The server's time now, in ms since the epoch, as far as its last reply tells. */
  serverNow(): number {
    return this.now() + this.serverClockOffsetMs;
  }

  /** `s3://bucket/prefix`. */
  describe(): string {
    return `s3://${this.name}/${this.prefix}`;
  }

  key(rel: string): string {
    return this.prefix === '' ? rel : `${this.prefix}/${rel}`;
  }

  /** Await an S3 call; a failure's message names the call, the object and the endpoint. */
  private async call<T>(what: string, p: Promise<T>): Promise<T> {
    try {
      return await p;
    } catch (e) {
      this.counters.failures++;
      if (e instanceof Error && !e.message.startsWith('S3 ')) {
        const status = httpStatus(e);
        e.message = `S3 ${what} at ${this.endpoint ?? 'the default AWS endpoint'}${status !== undefined ? ` (HTTP ${status})` : ''}: ${e.message || e.name}${this.hint(status, e, what)}`;
      }
      throw e;
    }
  }

  /**
   * What a bare status means to the user. Replies to HEAD have no body, so the SDK can only
   * say 'UnknownError'; a 403 is nearly always the credentials, and a 404 to anything but a
   * GET or HEAD of an object is a missing bucket.
   */
  private hint(status: number | undefined, e: Error, what: string): string {
    if (status === 403 || e.name === 'AccessDenied' || e.name === 'InvalidAccessKeyId' || e.name === 'SignatureDoesNotMatch') {
      return ' (access denied: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, and what the key may do in this bucket)';
    }
    if (e.name === 'NoSuchBucket' || (status === 404 && !/^(GET|HEAD) /.test(what)) || (status === 404 && what.startsWith('HEAD bucket'))) {
      return ` (bucket '${this.name}' does not exist${what.startsWith('HEAD bucket') ? '' : ': pasture init creates it'})`;
    }
    return '';
  }

  /** Create the bucket if it does not exist (tests and `pasture init`). */
  async ensureBucket(): Promise<void> {
    try {
      await this.call(`HEAD bucket ${this.name}`, this.client.send(new HeadBucketCommand({ Bucket: this.name })));
    } catch (e) {
      if (!isNotFound(e)) throw e;
      await this.call(`CreateBucket ${this.name}`, this.client.send(new CreateBucketCommand({ Bucket: this.name })));
    }
  }

  async put(rel: string, body: Uint8Array): Promise<void> {
    if (body.length > 2 * PART_BYTES) return this.putMultipart(rel, body);
    this.counters.puts++;
    await this.call(`PUT ${this.key(rel)}`, this.client.send(new PutObjectCommand({ Bucket: this.name, Key: this.key(rel), Body: body, ContentLength: body.length })));
    this.counters.bytesUp += body.length;
  }

  /** Multipart uploads this client has started and not yet completed or aborted. */
  readonly uploadsInFlight = new Set<string>();

  /** A large object in PART_BYTES parts, uploaded two at a time. */
  private async putMultipart(rel: string, body: Uint8Array): Promise<void> {
    const Key = this.key(rel);
    this.counters.puts++;
    const { UploadId } = await this.call(`CreateMultipartUpload ${Key}`, this.client.send(new CreateMultipartUploadCommand({ Bucket: this.name, Key })));
    if (UploadId === undefined) throw new Error(`S3 returned no UploadId for ${Key}`);
    this.uploadsInFlight.add(UploadId);
    try {
      const parts: { PartNumber: number; ETag: string }[] = [];
      const count = Math.ceil(body.length / PART_BYTES);
      let next = 0;
      let failed = false;
      const worker = async (): Promise<void> => {
        while (next < count && !failed) {
          const i = next++;
          const chunk = body.subarray(i * PART_BYTES, Math.min(body.length, (i + 1) * PART_BYTES));
          this.counters.puts++;
          const r = await this.call(`UploadPart ${i + 1} of ${Key}`, this.client.send(new UploadPartCommand({ Bucket: this.name, Key, UploadId, PartNumber: i + 1, Body: chunk, ContentLength: chunk.length })));
          if (r.ETag === undefined) throw new Error(`S3 returned no ETag for part ${i + 1} of ${Key}`);
          parts[i] = { PartNumber: i + 1, ETag: r.ETag };
          this.counters.bytesUp += chunk.length;
        }
      };
      // Both workers settle before any abort: a part still in flight when the upload is
      // aborted may land after it, and keep its bytes stored (AWS documents this).
      const settled = await Promise.allSettled([worker().catch((e: unknown) => ((failed = true), Promise.reject(e))), worker().catch((e: unknown) => ((failed = true), Promise.reject(e)))]);
      const failure = settled.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (failure !== undefined) throw failure.reason;
      this.counters.puts++;
      // radosgw answers with an empty ETag here; nothing below relies on it.
      await this.call(`CompleteMultipartUpload ${Key}`, this.client.send(new CompleteMultipartUploadCommand({ Bucket: this.name, Key, UploadId, MultipartUpload: { Parts: parts } })));
    } catch (e) {
      // An upload left incomplete keeps its parts stored (and billed) until aborted: an abort
      // that fails (after the client's retries) is reported with the upload id.
      const aborted = await this.client.send(new AbortMultipartUploadCommand({ Bucket: this.name, Key, UploadId })).then(() => true, () => false);
      if (!aborted && e instanceof Error) e.message += ` (and its multipart upload ${UploadId} could not be aborted: its parts stay stored until it is; the next writer's sweep, or an AbortIncompleteMultipartUpload lifecycle rule on the bucket, ends such uploads)`;
      throw e;
    } finally {
      this.uploadsInFlight.delete(UploadId);
    }
  }

  /**
   * Create `rel` only if it does not exist (`If-None-Match: *`). Returns true if this call
   * created it. If S3 says it exists, reads it back: identical bytes mean an earlier attempt of
   * this same call took effect (the reply was lost), which counts as created.
   */
  async putIfAbsent(rel: string, body: Uint8Array): Promise<boolean> {
    this.counters.puts++;
    try {
      await this.call(`PUT (If-None-Match) ${this.key(rel)}`, this.client.send(new PutObjectCommand({ Bucket: this.name, Key: this.key(rel), Body: body, ContentLength: body.length, IfNoneMatch: '*' })));
      this.counters.bytesUp += body.length;
      return true;
    } catch (e) {
      if (!isPreconditionFailed(e) && (e as Error)?.name !== 'ConditionalRequestConflict' && httpStatus(e) !== 409) throw e;
      const existing = await this.get(rel);
      // A conflict with a write still in flight (409) and no object yet: undecided, so an error.
      if (existing === undefined) throw new Error(`S3 PUT (If-None-Match) ${this.key(rel)}: conflict with a concurrent write; try again`);
      return Buffer.compare(Buffer.from(existing), Buffer.from(body)) === 0;
    }
  }

  /** The whole object, or a byte range of it; undefined if it does not exist. */
  async get(rel: string, range?: { offset: number; length: number }): Promise<Uint8Array | undefined> {
    // With the length known, chunks are copied into one array as they arrive, so they die
    // young (the SDK's transformToByteArray holds them all, then concatenates).
    let out: Buffer | undefined;
    const chunks: Uint8Array[] = [];
    const n = await this.getInto(rel, range, (chunk, at) => {
      if (range === undefined) return void chunks.push(chunk);
      out ??= Buffer.allocUnsafe(range.length);
      out.set(chunk, at);
    });
    if (n === undefined) return undefined;
    if (range === undefined) return Buffer.concat(chunks);
    return (out ?? Buffer.alloc(0)).subarray(0, n);
  }

  /**
   * The object, or a byte range of it, handed to `sink` chunk by chunk as it arrives, with
   * each chunk's offset from the start of what was asked for; the next chunk waits for the
   * promise `sink` returns, if any. Returns the bytes handed over (fewer than a range's length
   * if the body ended early: the caller checks), or undefined if the object does not exist.
   * More bytes than a range asked for is an error.
   */
  async getInto(rel: string, range: { offset: number; length: number } | undefined, sink: (chunk: Uint8Array, at: number) => Promise<void> | void): Promise<number | undefined> {
    this.counters.gets++;
    let at = 0;
    try {
      const r = await this.call(`GET ${this.key(rel)}`, this.client.send(new GetObjectCommand({
        Bucket: this.name, Key: this.key(rel),
        ...(range !== undefined ? { Range: `bytes=${range.offset}-${range.offset + range.length - 1}` } : {}),
      })));
      if (r.Body === undefined) throw new Error(`S3 returned no body for ${this.key(rel)}`);
      // A server that ignored the Range header would send the object from its start: refused
      // before any byte reaches the sink, which would take them for the range's.
      if (range !== undefined) {
        const want = `bytes ${range.offset}-${range.offset + range.length - 1}/`;
        if (r.ContentRange === undefined || !r.ContentRange.startsWith(want)) {
          (r.Body as { destroy?: () => void }).destroy?.();
          throw new Error(`S3 answered a ranged GET of ${this.key(rel)} with ${r.ContentRange === undefined ? 'no Content-Range' : `Content-Range '${r.ContentRange}'`}, not '${want}…'`);
        }
      }
      const body = (r.Body as AsyncIterable<Uint8Array>)[Symbol.asyncIterator]();
      for (;;) {
        let next: IteratorResult<Uint8Array>;
        try {
          next = await body.next();
        } catch (e) {
          // The body's own failures (a dropped connection, a silent socket) say which GET
          // they end; the sink's are its own.
          this.counters.failures++;
          if (e instanceof Error && !e.message.startsWith('S3 ')) {
            e.message = `S3 GET ${this.key(rel)} at ${this.endpoint ?? 'the default AWS endpoint'}: the reply's body failed after ${at} bytes: ${e.message || e.name}`;
          }
          throw e;
        }
        if (next.done === true) break;
        const chunk = next.value;
        if (range !== undefined && chunk.length > range.length - at) throw new Error(`S3 sent more than the ${range.length} bytes asked for of ${this.key(rel)}`);
        this.counters.bytesDown += chunk.length;
        const p = sink(chunk, at);
        at += chunk.length;
        if (p !== undefined) await p;
      }
      return at;
    } catch (e) {
      if (isNotFound(e)) return undefined;
      throw e;
    }
  }

  /** Keys (relative to the prefix) under `relPrefix`, with sizes and times, in key order. */
  async list(relPrefix: string): Promise<{ key: string; size: number; modified: Date | undefined }[]> {
    const out: { key: string; size: number; modified: Date | undefined }[] = [];
    const full = this.key(relPrefix);
    const strip = this.prefix === '' ? 0 : this.prefix.length + 1;
    let token: string | undefined;
    do {
      this.counters.lists++;
      const r = await this.call(`LIST ${full}`, this.client.send(new ListObjectsV2Command({ Bucket: this.name, Prefix: full, ContinuationToken: token })));
      for (const o of r.Contents ?? []) {
        if (o.Key !== undefined) out.push({ key: o.Key.slice(strip), size: o.Size ?? 0, modified: o.LastModified });
      }
      token = r.IsTruncated === true ? r.NextContinuationToken : undefined;
    } while (token !== undefined);
    return out;
  }

  /** Multipart uploads under `relPrefix` not yet completed or aborted (a crash leaves them). */
  async listUploads(relPrefix: string): Promise<{ key: string; uploadId: string; initiated: Date | undefined }[]> {
    const out: { key: string; uploadId: string; initiated: Date | undefined }[] = [];
    const full = this.key(relPrefix);
    const strip = this.prefix === '' ? 0 : this.prefix.length + 1;
    let keyMarker: string | undefined;
    let uploadIdMarker: string | undefined;
    do {
      this.counters.lists++;
      const r = await this.call(`ListMultipartUploads ${full}`, this.client.send(new ListMultipartUploadsCommand({ Bucket: this.name, Prefix: full, KeyMarker: keyMarker, UploadIdMarker: uploadIdMarker })));
      for (const u of r.Uploads ?? []) {
        if (u.Key !== undefined && u.UploadId !== undefined) out.push({ key: u.Key.slice(strip), uploadId: u.UploadId, initiated: u.Initiated });
      }
      const more = r.IsTruncated === true && (r.NextKeyMarker !== undefined || r.NextUploadIdMarker !== undefined);
      keyMarker = more ? r.NextKeyMarker : undefined;
      uploadIdMarker = more ? r.NextUploadIdMarker : undefined;
      if (more && keyMarker === undefined && uploadIdMarker === undefined) break;
    } while (keyMarker !== undefined || uploadIdMarker !== undefined);
    return out;
  }

  /** End a multipart upload: its parts are deleted. One already ended (NoSuchUpload) is not an error. */
  async abortUpload(rel: string, uploadId: string): Promise<void> {
    const Key = this.key(rel);
    this.counters.deletes++;
    try {
      await this.call(`AbortMultipartUpload ${Key} (upload ${uploadId})`, this.client.send(new AbortMultipartUploadCommand({ Bucket: this.name, Key, UploadId: uploadId })));
    } catch (e) {
      if ((e as { name?: string }).name !== 'NoSuchUpload' && !/NoSuchUpload/.test(String((e as Error).message))) throw e;
    }
  }

  async delete(rels: string[]): Promise<void> {
    for (let i = 0; i < rels.length; i += DELETE_BATCH) {
      const batch = rels.slice(i, i + DELETE_BATCH);
      this.counters.deletes += batch.length;
      if (batch.length === 1) {
        await this.call(`DELETE ${this.key(batch[0]!)}`, this.client.send(new DeleteObjectCommand({ Bucket: this.name, Key: this.key(batch[0]!) })));
        continue;
      }
      const r = await this.call(`DeleteObjects (${batch.length} keys)`, this.client.send(new DeleteObjectsCommand({
        Bucket: this.name, Delete: { Objects: batch.map((k) => ({ Key: this.key(k) })), Quiet: true },
      })));
      const errors = (r.Errors ?? []).filter((e) => e.Code !== 'NoSuchKey');
      if (errors.length > 0) throw new Error(`S3 could not delete ${errors.length} objects, first ${errors[0]!.Key}: ${errors[0]!.Code} ${errors[0]!.Message ?? ''}`);
    }
  }

  destroy(): void {
    this.client.destroy();
  }
}


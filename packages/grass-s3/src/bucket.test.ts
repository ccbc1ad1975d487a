/**
 * Bucket against servers that misbehave at the socket level, which the fault-injecting
 * handler (faulty-s3.ts) cannot show because it sits above the SDK's HTTP handler: here the
 * real NodeHttpHandler talks to real sockets on 127.0.0.1.
 */
import test from 'ava';
import { createServer, type Server, type Socket } from 'node:net';
import { createHash } from 'node:crypto';
import { Bucket, defaultSignPayload } from './bucket.ts';

/** A TCP server that accepts connections and reads requests but never answers. */
async function blackHole(): Promise<{ endpoint: string; requests: () => number; heads: string[]; close: () => Promise<void> }> {
  const sockets = new Set<Socket>();
  const heads: string[] = [];
  let requests = 0;
  const server: Server = createServer((s) => {
    sockets.add(s);
    s.on('data', (d) => {
      if (d.includes('HTTP/1.1')) {
        requests++;
        heads.push(d.toString('latin1').split('\r\n\r\n')[0]!);
      }
    });
    s.on('error', () => undefined);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  return {
    endpoint: `http://127.0.0.1:${port}`,
    requests: () => requests,
    heads,
    close: async () => {
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}

test('a server that never answers: each attempt is abandoned after the time-out and the call fails naming the call and endpoint', async (t) => {
  const hole = await blackHole();
  const bucket = new Bucket({
    bucket: 'hung', prefix: 'p', endpoint: hole.endpoint, region: 'us-east-1',
    accessKeyId: 'a', secretAccessKey: 'b', requestTimeoutMs: 300, maxAttempts: 2,
  });
  try {
    const t0 = performance.now();
    const err = await t.throwsAsync(bucket.put('seg/1', new Uint8Array(64 << 10)));
    const ms = performance.now() - t0;
    t.regex(err!.message, /^S3 PUT p\/seg\/1 at http:\/\/127\.0\.0\.1:\d+: .*timed out/);
    t.is(hole.requests(), 2, 'the SDK retried once, then gave up');
    // Two attempts of 300 ms each plus the SDK's backoff between them (at most a few seconds).
    t.true(ms >= 550 && ms < 10_000, `failed after ${ms.toFixed(0)} ms`);
    t.is(bucket.counters.failures, 1);
    await t.throwsAsync(bucket.get('seg/1'), { message: /^S3 GET p\/seg\/1 at .*timed out/ });
  } finally {
    bucket.client.destroy();
    await hole.close();
  }
});

test('upload bodies are hashed into the signature only over plain HTTP to another host', async (t) => {
  t.true(defaultSignPayload(undefined), 'an endpoint the SDK resolves by itself may be plain HTTP');
  t.false(defaultSignPayload('https://s3.example.com'));
  t.false(defaultSignPayload('http://127.0.0.1:7480'));
  t.false(defaultSignPayload('http://localhost:7480'));
  t.false(defaultSignPayload('http://[::1]:7480'));
  t.true(defaultSignPayload('http://10.0.0.5:7480'));
  t.true(defaultSignPayload('http://minio.internal'));

  // What goes on the wire: the x-amz-content-sha256 header of a PUT.
  const body = new Uint8Array(1000).fill(7);
  const sha = createHash('sha256').update(body).digest('hex');
  for (const [signPayload, want] of [[undefined, 'UNSIGNED-PAYLOAD'], [true, sha]] as const) {
    const hole = await blackHole();
    const bucket = new Bucket({
      bucket: 'b', prefix: '', endpoint: hole.endpoint, accessKeyId: 'a', secretAccessKey: 'b',
      requestTimeoutMs: 200, maxAttempts: 1, ...(signPayload === undefined ? {} : { signPayload }),
    });
    try {
      await t.throwsAsync(bucket.put('k', body));
      t.regex(hole.heads[0] ?? '', /^PUT \/b\/k/);
      t.regex(hole.heads[0] ?? '', new RegExp(`\r\nx-amz-content-sha256: ${want}\r\n`, 'i'));
    } finally {
      bucket.client.destroy();
      await hole.close();
    }
  }
});

test('a reply whose body breaks off, and a bucket that cannot be made: errors name the call, the key and the endpoint', async (t) => {
  // A server that answers every GET with 200 and 1000 bytes promised, sends 100, then hangs
  // up; and answers HEAD (of the bucket) with a 500.
  const sockets = new Set<Socket>();
  const server: Server = createServer((s) => {
    sockets.add(s);
    s.on('error', () => undefined);
    s.on('close', () => sockets.delete(s));
    s.once('data', (d) => {
      if (d.toString('latin1').startsWith('HEAD')) {
        s.end('HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n');
        return;
      }
      s.write('HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: 1000\r\n\r\n');
      s.write(Buffer.alloc(100, 7));
      setTimeout(() => s.destroy(), 50);
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const endpoint = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
  const bucket = new Bucket({ bucket: 'broken', prefix: 'p', endpoint, region: 'us-east-1', accessKeyId: 'a', secretAccessKey: 'b', requestTimeoutMs: 2000, maxAttempts: 1 });
  try {
    const got = await t.throwsAsync(bucket.get('seg/2'));
    t.regex(got!.message, /^S3 GET p\/seg\/2 at http:\/\/127\.0\.0\.1:\d+: the reply's body failed after 100 bytes: /);
    const made = await t.throwsAsync(bucket.ensureBucket());
    t.regex(made!.message, /^S3 HEAD bucket broken at http:\/\/127\.0\.0\.1:\d+ \(HTTP 500\)/);
  } finally {
    bucket.client.destroy();
    for (const s of sockets) s.destroy();
    await new Promise<void>((r) => server.close(() => r()));
  }
});

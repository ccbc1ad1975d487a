/**
 * The test S3 server (radosgw, see testing.ts) answers the calls a segment store makes, the
 * way S3 does: round trips, ranged reads, prefix listing with pagination, batch deletes, and
 * create-if-absent PUTs that fail with 412 when the key exists.
 */
import test from 'ava';
import {
  CreateBucketCommand,
  DeleteObjectsCommand,
  GetObjectCommand,
  HeadBucketCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  S3ServiceException,
} from '@aws-sdk/client-s3';
import { s3Available, startS3Server, type S3Server } from './testing.ts';

let server: S3Server | undefined;
let client: S3Client | undefined;
let buckets = 0;

test.before(async () => {
  if (!s3Available()) throw new Error('radosgw and Ceph are not installed: apt-get install --no-install-recommends ceph-mon ceph-osd radosgw ceph-common');
  server = await startS3Server();
  client = new S3Client({
    endpoint: server.endpoint,
    region: server.region,
    credentials: { accessKeyId: server.accessKeyId, secretAccessKey: server.secretAccessKey },
    forcePathStyle: true,
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
  });
});

test.after.always(async () => {
  client?.destroy();
  await server?.stop();
});

function s3(): S3Client {
  if (client === undefined) throw new Error('no S3 client: test.before failed');
  return client;
}

/** A new bucket per test, so that the tests can run concurrently. */
async function newBucket(t: { is(a: unknown, b: unknown): void }): Promise<string> {
  const bucket = `pasture-test-${++buckets}`;
  const created = await s3().send(new CreateBucketCommand({ Bucket: bucket }));
  t.is(created.$metadata.httpStatusCode, 200);
  const head = await s3().send(new HeadBucketCommand({ Bucket: bucket }));
  t.is(head.$metadata.httpStatusCode, 200);
  return bucket;
}

function pattern(bytes: number, seed: number): Uint8Array {
  const b = new Uint8Array(bytes);
  for (let i = 0; i < bytes; i++) b[i] = (i * 31 + seed) & 255;
  return b;
}

async function get(bucket: string, key: string, range?: string) {
  const res = await s3().send(new GetObjectCommand({ Bucket: bucket, Key: key, ...(range === undefined ? {} : { Range: range }) }));
  return { res, body: await res.Body!.transformToByteArray() };
}

test('PutObject then GetObject returns the same bytes; a ranged GET returns just the range', async (t) => {
  const bucket = await newBucket(t);
  const data = pattern(100_000, 7);
  const put = await s3().send(new PutObjectCommand({ Bucket: bucket, Key: 'seg/000001', Body: data }));
  t.regex(put.ETag ?? '', /^"[0-9a-f]{32}"$/);

  const whole = await get(bucket, 'seg/000001');
  t.is(whole.res.ContentLength, data.length);
  t.is(whole.res.ETag, put.ETag);
  t.deepEqual(whole.body, data);

  const part = await get(bucket, 'seg/000001', 'bytes=10-19');
  t.is(part.res.$metadata.httpStatusCode, 206);
  t.is(part.res.ContentRange, `bytes 10-19/${data.length}`);
  t.is(part.res.ContentLength, 10);
  t.deepEqual(part.body, data.subarray(10, 20));
});

test('ListObjectsV2 with a prefix pages through the keys in order, MaxKeys at a time', async (t) => {
  const bucket = await newBucket(t);
  const keys = [4, 1, 5, 3, 2].map((i) => `seg/${String(i).padStart(6, '0')}`);
  for (const key of [...keys, 'manifest/000001', 'segx']) {
    await s3().send(new PutObjectCommand({ Bucket: bucket, Key: key, Body: new TextEncoder().encode(key) }));
  }
  const seen: string[] = [];
  const pageSizes: number[] = [];
  let token: string | undefined;
  do {
    const page = await s3().send(new ListObjectsV2Command({ Bucket: bucket, Prefix: 'seg/', MaxKeys: 2, ...(token === undefined ? {} : { ContinuationToken: token }) }));
    const contents = page.Contents ?? [];
    t.is(page.KeyCount, contents.length);
    pageSizes.push(contents.length);
    for (const c of contents) {
      seen.push(c.Key!);
      t.is(c.Size, c.Key!.length);
    }
    t.is(page.IsTruncated, seen.length < keys.length);
    token = page.IsTruncated === true ? page.NextContinuationToken : undefined;
    t.true(pageSizes.length <= keys.length, 'pagination does not end');
  } while (token !== undefined);
  t.deepEqual(pageSizes, [2, 2, 1]);
  t.deepEqual(seen, [...keys].sort());
});

test('DeleteObjects deletes a batch of keys and leaves the others', async (t) => {
  const bucket = await newBucket(t);
  for (const key of ['seg/a', 'seg/b', 'seg/c', 'seg/d']) await s3().send(new PutObjectCommand({ Bucket: bucket, Key: key, Body: pattern(1000, 1) }));
  const del = await s3().send(
    new DeleteObjectsCommand({ Bucket: bucket, Delete: { Objects: [{ Key: 'seg/a' }, { Key: 'seg/c' }, { Key: 'seg/never-written' }] } }),
  );
  t.deepEqual((del.Errors ?? []).map((e) => `${e.Key}: ${e.Code}`), []);
  t.deepEqual((del.Deleted ?? []).map((d) => d.Key).sort(), ['seg/a', 'seg/c', 'seg/never-written']);
  const list = await s3().send(new ListObjectsV2Command({ Bucket: bucket, Prefix: 'seg/' }));
  t.deepEqual((list.Contents ?? []).map((c) => c.Key), ['seg/b', 'seg/d']);
  const err = await t.throwsAsync(get(bucket, 'seg/a'), { instanceOf: S3ServiceException });
  t.is(err?.$metadata.httpStatusCode, 404);
});

test('PutObject with IfNoneMatch: * creates a key once, then fails with 412 and keeps the first body', async (t) => {
  const bucket = await newBucket(t);
  const first = new TextEncoder().encode('epoch 1');
  const put = await s3().send(new PutObjectCommand({ Bucket: bucket, Key: 'manifest', Body: first, IfNoneMatch: '*' }));
  t.is(put.$metadata.httpStatusCode, 200);
  const err = await t.throwsAsync(
    s3().send(new PutObjectCommand({ Bucket: bucket, Key: 'manifest', Body: new TextEncoder().encode('epoch 2'), IfNoneMatch: '*' })),
    { instanceOf: S3ServiceException },
  );
  t.is(err?.$metadata.httpStatusCode, 412);
  t.deepEqual((await get(bucket, 'manifest')).body, first);
});

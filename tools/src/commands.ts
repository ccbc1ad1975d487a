/** The pasture commands. Each parses its own options with node:util's parseArgs. */
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { formatBytes as human, io } from './io.ts';
import { serve, parseHostPort, type ServeOptions } from './serve.ts';
import { realpathSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import {
  GrassLog, MAX_SEGMENT_BYTES, MAX_SEGMENT_COUNT, MIN_SEGMENT_BYTES, MIN_SEGMENT_COUNT, POLICIES, Rng, fsck, policyByName,
} from '@pasture/grass';
import type { SegmentStore } from '@pasture/grass';
import { benchS3 } from './bench-s3.ts';
import { checkBucket, createStore, openStore, parseStoreSpec, s3Stats, storeExists, StoreSpecError, type S3Flags, type StoreSpec } from './stores.ts';
import { benchCleaning, benchMapMemory, benchRecovery, benchThroughput } from '@pasture/grass/bench';
import { defaultSimParams, runSimulation } from '@pasture/grass/simulator';
import { CowStore } from '@pasture/cow';
import { benchCopy, benchImage, benchOverwrite } from '@pasture/cow/bench';
import { fsckCow, type CowFsckReport } from '@pasture/cow/fsck';
import { defaultCowSimParams, runCowSimulation } from '@pasture/cow/simulator';
import { Pool, decodeCatalog } from '@pasture/human';
import { exportImage, importImage } from '@pasture/human/transfer';
import { benchCloneReads, benchImport, benchSnapshot } from '@pasture/human/bench';

export interface Command {
  name: string;
  summary: string;
  run(argv: string[]): Promise<number>;
}

export class UsageError extends Error {}
/** --help was printed: the command is done, successfully. */
class HelpShown extends Error {}

type Options = NonNullable<ParseArgsConfig['options']>;

type Parsed = { [k: string]: string | boolean | string[] | undefined; _: string[] };

function parse(argv: string[], options: Options, help: string): Parsed {
  let parsed;
  try {
    parsed = parseArgs({ args: argv, options: { ...options, help: { type: 'boolean', short: 'h' } }, allowPositionals: true, strict: true });
  } catch (e) {
    throw new UsageError(`${(e as Error).message}\n\n${help}`);
  }
  if (parsed.values.help) {
    io.out(help);
    throw new HelpShown();
  }
  return { ...(parsed.values as Record<string, string | boolean | undefined>), _: parsed.positionals } as Parsed;
}

function num(v: Parsed[string], what: string, dflt: number): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (typeof v !== 'string' || !Number.isFinite(n)) throw new UsageError(`--${what} takes a number, got '${String(v)}'`);
  return n;
}

function positiveInt(v: Parsed[string], what: string): number {
  const n = num(v, what, NaN);
  if (!Number.isSafeInteger(n) || n < 1) throw new UsageError(`--${what} takes a whole number of at least 1, got '${String(v)}'`);
  return n;
}

/** Parse a size like 4096, 64K, 8M, 1G. */
function size(v: Parsed[string], what: string, dflt: number): number {
  if (v === undefined) return dflt;
  const m = typeof v === 'string' ? /^(\d+(?:\.\d+)?)([KMGT]i?B?)?$/i.exec(v) : null;
  if (m === null) throw new UsageError(`--${what} takes a size such as 4096, 64K, 8M or 1G, got '${String(v)}'`);
  const mult = { K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[(m[2] ?? '').charAt(0).toUpperCase() as 'K'] ?? 1;
  const n = Number(m[1]) * mult;
  if (!Number.isSafeInteger(n)) throw new UsageError(`--${what} must come to a whole number of bytes, got '${String(v)}' (${n})`);
  return n;
}

/** The store `--store` (and `--cache-dir`) name. */
export function storeSpec(o: Parsed): StoreSpec {
  try {
    return parseStoreSpec(o.store, o['cache-dir'], io.resolve);
  } catch (e) {
    if (e instanceof StoreSpecError) throw new UsageError(e.message);
    throw e;
  }
}

/** The store's local directory: the file store's, or the S3 store's cache. */
export function storeDir(o: Parsed): string {
  return storeSpec(o).dir;
}

function s3Flags(o: Parsed): S3Flags {
  const f: S3Flags = {};
  if (typeof o['s3-endpoint'] === 'string') f.endpoint = o['s3-endpoint'];
  if (typeof o['s3-region'] === 'string') f.region = o['s3-region'];
  if (o.takeover === true) f.takeover = true;
  if (o['cache-bytes'] !== undefined) f.cacheBytes = size(o['cache-bytes'], 'cache-bytes', 1 << 30);
  if (o['journal-bytes'] !== undefined) f.journalBytes = size(o['journal-bytes'], 'journal-bytes', 4 * 2 ** 30);
  if (o['close-timeout'] !== undefined) {
    const secs = num(o['close-timeout'], 'close-timeout', 60);
    if (!(secs >= 0 && secs <= 86_400)) throw new UsageError(`--close-timeout takes seconds in [0, 86400], got '${String(o['close-timeout'])}'`);
    f.closeTimeoutMs = secs * 1000;
  }
  return f;
}

/** Options every command that opens a store takes. */
const STORE_FLAGS = {
  store: { type: 'string' as const }, 'cache-dir': { type: 'string' as const }, 's3-endpoint': { type: 'string' as const },
  's3-region': { type: 'string' as const }, takeover: { type: 'boolean' as const }, 'cache-bytes': { type: 'string' as const },
  'journal-bytes': { type: 'string' as const }, 'close-timeout': { type: 'string' as const },
};

const STORE_HELP = `Stores: --store file:DIR (or DIR), or --store s3://BUCKET/PREFIX --cache-dir DIR for a pool in
S3 with its journal and read cache in DIR (then --store DIR alone also finds it). S3 settings:
--s3-endpoint URL or AWS_ENDPOINT_URL, --s3-region or AWS_REGION, AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY; --cache-bytes SIZE bounds the read cache (default 1G);
--journal-bytes SIZE bounds the segments waiting in DIR for their upload (default 4G: writes
wait beyond it; uploads wait out a burst of writes up to 3/4 of it); --close-timeout SECONDS
is how long closing waits for S3 to take the final state (default 60; what it does not take
stays in DIR, and the next open uploads it); --takeover takes the store from a writer that
looks alive (it is fenced off).`;

async function openSpec(o: Parsed): Promise<SegmentStore> {
  return openStore(storeSpec(o), s3Flags(o));
}

function out(json: boolean, obj: unknown, text: () => string): void {
  io.out(json ? JSON.stringify(obj) + '\n' : text());
}

/**
 * Run a command: its exit code, or for an error, a message on stderr and 2 (usage) or 1. With
 * --json the error is also the one JSON object on stdout: {"error", "code"}.
 */
async function wrap(argv: string[], fn: () => Promise<number>): Promise<number> {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof HelpShown) return 0;
    const usage = e instanceof UsageError;
    const message = e instanceof Error ? e.message : String(e);
    io.err(`pasture: ${message}\n`);
    if (argv.includes('--json')) {
      const code = usage ? 'EUSAGE' : typeof (e as { code?: unknown }).code === 'string' ? (e as { code: string }).code : 'ERROR';
      io.out(JSON.stringify({ error: usage ? message.split('\n\n')[0] : message, code }) + '\n');
    }
    return usage ? 2 : 1;
  }
}

const initHelp = `Usage: pnpm pasture init --store file:DIR | s3://BUCKET/PREFIX --cache-dir DIR [--segment-bytes 8M] [--segments 1024]

Create a new, empty pool: a Grass log holding a Cow space with an empty catalog.
- file:DIR: a directory with a sparse segment file of segments x segment-bytes, two
  superblocks and a lock file.
- s3://BUCKET/PREFIX --cache-dir DIR: each sealed segment is one object under PREFIX/seg/,
  the state is published as PREFIX/manifest/N objects; DIR holds the local journal (a flush
  is durable there) and the read cache. The bucket is created if missing.
Then: pnpm pasture volume create NAME --size 10G --store DIR

${STORE_HELP}
`;

const init: Command = {
  name: 'init',
  summary: 'create a new pool (file:DIR, or s3://BUCKET/PREFIX with a local cache)',
  run: (argv) => wrap(argv, async () => {
    const o = parse(argv, { ...STORE_FLAGS, 'segment-bytes': { type: 'string' }, segments: { type: 'string' }, json: { type: 'boolean' } }, initHelp);
    const spec = storeSpec(o);
    const dir = spec.kind === 's3' ? String(o.store) : spec.dir;
    maxArgs(o, 0);
    const segmentBytes = size(o['segment-bytes'], 'segment-bytes', 8 << 20);
    const segmentCount = num(o.segments, 'segments', 1024);
    // Grass's limits, checked before anything is created: a store it cannot run in would be
    // left behind, refused by every command (init too: the directory holds a store).
    // Grass opens MIN_SEGMENT_COUNT segments, but holds data only outside its reserve and
    // working room (about 16 segments with a small map): a pool needs twice that.
    const minSegments = 4 * MIN_SEGMENT_COUNT;
    if (!Number.isInteger(segmentCount) || segmentCount < minSegments || segmentCount > MAX_SEGMENT_COUNT) throw new UsageError(`--segments must be in [${minSegments}, ${MAX_SEGMENT_COUNT}] (a whole number: Grass keeps about 16 for its reserve and working room), got ${segmentCount}`);
    if (segmentBytes < MIN_SEGMENT_BYTES || segmentBytes > MAX_SEGMENT_BYTES || segmentBytes % 4096 !== 0) throw new UsageError(`--segment-bytes must be a multiple of 4096 in [128K, 256M], got ${segmentBytes}`);
    const store = await createStore(spec, { segmentBytes, segmentCount }, s3Flags(o));
    const g = await GrassLog.create(store);
    const st = g.stats();
    const pool = await Pool.create(g);
    await pool.close();
    out(!!o.json, { store: dir, segmentBytes: st.segmentBytes, segmentCount: st.segmentCount }, () => `created ${dir}: ${st.segmentCount} segments of ${st.segmentBytes} bytes\n`);
    return 0;
  }),
};

const fsckHelp = `Usage: pnpm pasture fsck --store file:DIR [--json]

Check a store without changing it. Grass: every sealed segment's header, summary and
records, every mapping, and the live-byte counts. Cow (if the store holds a Cow space): walk
the tree, recount every reference, and report leaks, double references, refcount mismatches,
missing records and wrong counters (--data also decodes every data block). Human (if it is
a pool): the catalog decodes and passes its schema. Prints each problem; exits 1 if there
are any.

${STORE_HELP}
`;

const fsckCmd: Command = {
  name: 'fsck',
  summary: 'check a store; non-zero exit if anything is wrong',
  run: (argv) => wrap(argv, async () => {
    const o = parse(argv, { ...STORE_FLAGS, json: { type: 'boolean' }, data: { type: 'boolean' } }, fsckHelp);
    maxArgs(o, 0);
    const dir = typeof o.store === 'string' && o.store.startsWith('s3://') ? o.store : storeDir(o);
    const opened = await openSpec(o);
    const bucket = await checkBucket(opened);
    const report = await fsck(opened);
    let cow: CowFsckReport | undefined;
    let cowError: string | undefined;
    let human: { volumes: number; snapshots: number; scratch: number } | undefined;
    let humanError: string | undefined;
    if (report.ok) {
      const g = await GrassLog.open(await openSpec(o), { readOnly: true });
      try {
        if (g.size(1) !== undefined) {
          const c = await CowStore.open(g, { readOnly: true });
          cow = await fsckCow(c, { data: !!o.data });
          // Human: the catalog must decode and pass its schema; note unfinished atomic writes.
          if (c.stats().treeDepth > 0 && (await c.read(0n)) !== undefined) {
            try {
              const cat = await decodeCatalog((i) => c.read(BigInt(i)));
              const scratch = cat.entries.filter((e) => e.kind === 'scratch').length;
              human = { volumes: cat.entries.filter((e) => e.kind === 'volume').length, snapshots: cat.entries.filter((e) => e.kind === 'snapshot').length, scratch };
            } catch (e) {
              humanError = (e as Error).message;
            }
          }
        }
      } catch (e) {
        cowError = (e as Error).message;
      } finally {
        await g.close();
      }
    }
    const ok = report.ok && cowError === undefined && humanError === undefined && (cow?.ok ?? true) && (bucket?.problems.length ?? 0) === 0;
    out(!!o.json, { ok, grass: report, cow: cow ?? null, cowError: cowError ?? null, human: human ?? null, humanError: humanError ?? null, s3: bucket ?? null }, () =>
      [
        ...(bucket === undefined ? [] : [`S3: manifest ${bucket.manifestSeq} lists ${bucket.listed} segment objects${bucket.problems.length === 0 ? ', all present' : ''}; ${bucket.unlisted} other segment objects (waiting for deletion, or orphans for the sweep)`]),
        ...(bucket?.problems ?? []).map((p) => `problem: S3: ${p}`),
        `${dir}: Grass: ${report.segmentsChecked} sealed segments, ${report.recordsChecked} records, ${report.mappedAddresses} mapped addresses checked`,
        ...report.problems.map((p) => `problem: ${p}`),
        ...(cow === undefined ? [] : [`Cow: ${cow.nodes} nodes, ${cow.dataRecords} data records, ${cow.graveyard} dead subtrees waiting, every reference recounted${cow.checkedData ? ', every block decoded' : ''}`]),
        ...(cow?.problems ?? []).map((p) => `problem: ${p}`),
        ...(cowError === undefined ? [] : [`problem: Cow: ${cowError}`]),
        ...(human === undefined ? [] : [`Human: catalog valid: ${human.volumes} volumes, ${human.snapshots} snapshots${human.scratch ? `, ${human.scratch} unfinished atomic write(s) (reclaimed when the pool next opens)` : ''}`]),
        ...(humanError === undefined ? [] : [`problem: Human: ${humanError}`]),
        ok ? 'no problems found' : `${report.problems.length + (cow?.problemCount ?? 0) + (cowError ? 1 : 0) + (humanError ? 1 : 0) + (bucket?.problems.length ?? 0)} problem(s) found`,
        '',
      ].join('\n'),
    );
    return ok ? 0 : 1;
  }),
};

const statsHelp = `Usage: pnpm pasture stats --store file:DIR [--json]

Open a store read-only and print its counters. Grass: segments free and used, live
records, utilization histogram, recovery report. Cow: logical blocks mapped, shared
blocks, physical bytes, compression ratio, tree depth, cache hit rate.

${STORE_HELP}
`;

const stats: Command = {
  name: 'stats',
  summary: 'print a store\'s statistics',
  run: (argv) => wrap(argv, async () => {
    const o = parse(argv, { ...STORE_FLAGS, json: { type: 'boolean' } }, statsHelp);
    maxArgs(o, 0);
    const lines = (o2: object): string => Object.entries(o2).map(([k, v]) => `${k}: ${Array.isArray(v) ? v.join(' ') : typeof v === 'object' && v !== null ? JSON.stringify(v) : v}`).join('\n') + '\n';
    if (live !== undefined && isLive(o)) {
      const c = live.pool.cow;
      const cow = { ...c.stats(), ...(await c.scan()) };
      const s3 = live.store === undefined ? undefined : s3Stats(live.store);
      // The recovery report of the serving process's open, as offline stats gives that of its own.
      const recovery = c.grass instanceof GrassLog ? c.grass.recovery : undefined;
      out(!!o.json, { grass: { ...c.grass.stats(), recovery }, cow, s3: s3 ?? null, live: true }, () => `live store (served by this process)\nGrass\n${lines(c.grass.stats())}\nCow\n${lines(cow)}${s3 === undefined ? '' : `\nS3\n${lines(s3)}`}`);
      return 0;
    }
    const store = await openSpec(o);
    const g = await GrassLog.open(store, { readOnly: true });
    const st = g.stats();
    const rec = g.recovery;
    let cow: Record<string, unknown> | undefined;
    if (g.size(1) !== undefined) {
      const c = await CowStore.open(g, { readOnly: true });
      cow = { ...c.stats(), ...(await c.scan()) };
    }
    const s3 = s3Stats(store);
    await g.close();
    out(!!o.json, { grass: { ...st, recovery: rec }, cow: cow ?? null, s3: s3 ?? null }, () => `Grass\n${lines(st)}${cow === undefined ? '' : `\nCow\n${lines(cow)}`}${s3 === undefined ? '' : `\nS3\n${lines(s3)}`}`);
    return 0;
  }),
};

const benchHelp = `Usage: pnpm pasture bench grass|cow|human|s3 [options]

bench s3: the S3 segment store (a radosgw on 127.0.0.1 is started unless AWS_ENDPOINT_URL
is set): PUTs per GiB written, GETs of warm reads, a cold sequential read from the bucket
against a warm one, and fio 4 KiB random writes QD32 over NBD on an S3-backed pool against a
file-backed one. --gib (default 1), --segment-bytes (default 8M), --seconds per fio run
(default 10), --rounds of the NBD comparison (default 3), --cold-rounds of cold-then-warm
reads, each from an empty cache (default 3), --no-nbd to skip the NBD comparison, --dir for
temporary files.

bench human modes (--mode, default all), on file stores in --dir:
  snapshot     snapshot creation time for volumes with --sizes GiB written (default 1,16),
               median of --repeats (default 5)
  clone-reads  4 KiB random reads on a clone --depth (default 32) levels deep against the
               original, a --volume-mib (default 256) volume, --reads (default 20000) per
               round, alternating --rounds (default 3)
  import       import of a --gib (default 1) raw image against cp + sync of it
  all          all three

bench cow modes (--mode, default all):
  copy         BLOCK-COPY of fully mapped ranges of 2^16, 2^20 and 2^24 blocks (built by
               writing 2^16 distinct blocks and doubling by copies), --repeats (default 5);
               median time and Grass records written per size, largest over smallest
  overwrite    4 KiB random overwrites of incompressible data through Cow against Grass
               alone, same sequence, on file stores in --dir, alternating --rounds (default
               3); --blocks (default 65536), --writes (default 65536), --per-flush 256
  image        an ext4 image of --tree (default: this repository's node_modules/.pnpm)
               made with mke2fs -d, written through Cow; physical bytes over logical
  all          all three

bench grass modes:

  cleaning     write amplification of a workload at a live utilization, on a memory store
               --workload uniform|hotcold   (hotcold: 90% of writes to 10% of addresses)
               --utilization U              live bytes / capacity (default 0.8)
               --policy NAME                (see --list-policies; default greedy)
               --segment-bytes 256K --segments 4096 --multiple N (overwrites, x capacity;
               default 20 for uniform, 30 for hotcold) --seed N
               Utilization counts the bytes live records occupy (header, payload,
               summary entry); the JSON also gives payloadUtilization.
  throughput   4 KiB puts, a flush every 256 records, on the file store in --dir, against
               fio's sequential write bandwidth there (--bytes 1G, --per-flush 256)
  recovery     reopen time after an unclean stop with --bytes (default 1G) of log since the
               last checkpoint
  map-memory   memory per live record with --records (default 10000000) records
               (run under node --expose-gc for a precise figure)

  --json            print one JSON object
  --list-policies   print the cleaner policy names, one a line
`;

const bench: Command = {
  name: 'bench',
  summary: 'benchmarks: bench grass|cow|human|s3 --help',
  run: (argv) => wrap(argv, async () => {
    const o = parse(argv, {
      mode: { type: 'string' }, workload: { type: 'string' }, utilization: { type: 'string' }, policy: { type: 'string' },
      'segment-bytes': { type: 'string' }, segments: { type: 'string' }, multiple: { type: 'string' }, seed: { type: 'string' },
      bytes: { type: 'string' }, 'per-flush': { type: 'string' }, dir: { type: 'string' }, records: { type: 'string' },
      json: { type: 'boolean' }, 'list-policies': { type: 'boolean' },
      repeats: { type: 'string' }, rounds: { type: 'string' }, blocks: { type: 'string' }, writes: { type: 'string' }, tree: { type: 'string' },
      sizes: { type: 'string' }, depth: { type: 'string' }, 'volume-mib': { type: 'string' }, reads: { type: 'string' }, gib: { type: 'string' },
      seconds: { type: 'string' }, 'no-nbd': { type: 'boolean' }, 'cold-rounds': { type: 'string' },
    }, benchHelp);
    if (o['list-policies']) {
      io.out(POLICIES.map((p) => p.name).join('\n') + '\n');
      return 0;
    }
    const layer = o._[0] ?? 'grass';
    if (layer === 'cow') return benchCow(o);
    if (layer === 'human') return benchHuman(o);
    if (layer === 's3') return benchS3Command(o);
    if (layer !== 'grass') throw new UsageError(`no benchmark for '${layer}'; try bench grass, cow, human or s3`);
    const json = !!o.json;
    const mode = (o.mode as string | undefined) ?? 'cleaning';
    const dir = typeof o.dir === 'string' ? o.dir : undefined;
    if (mode === 'cleaning') {
      const workload = (o.workload as string | undefined) ?? 'uniform';
      if (workload !== 'uniform' && workload !== 'hotcold') throw new UsageError(`--workload is uniform or hotcold, got '${workload}'`);
      const policy = (o.policy as string | undefined) ?? 'greedy';
      if (policyByName(policy) === undefined) throw new UsageError(`unknown policy '${policy}'; --list-policies shows them`);
      const utilization = num(o.utilization, 'utilization', 0.8);
      if (!(utilization > 0 && utilization < 0.95)) throw new UsageError('--utilization must be in (0, 0.95)');
      const r = await benchCleaning({
        workload, utilization, policy,
        segmentBytes: size(o['segment-bytes'], 'segment-bytes', 256 << 10),
        segmentCount: num(o.segments, 'segments', 4096),
        capacityMultiple: num(o.multiple, 'multiple', workload === 'uniform' ? 20 : 30),
        seed: num(o.seed, 'seed', 1),
      }, json ? undefined : (l) => io.err(l + '\n'));
      out(json, r, () => `${r.workload} U=${r.utilization} policy=${r.policy}: write amplification ${r.writeAmplification.toFixed(3)} (steady state; ${r.writeAmplificationAll.toFixed(3)} over the whole run), checkpoint bytes ${(r.checkpointBytesPerUserByte * 100).toFixed(2)}% of user bytes, ${r.userMBps.toFixed(0)} MB/s user writes, ${r.segmentsCleaned} segments cleaned, ${r.seconds.toFixed(1)} s\n`);
      return 0;
    }
    if (mode === 'throughput') {
      const r = await benchThroughput({ dir, bytes: size(o.bytes, 'bytes', 1 << 30), perFlush: num(o['per-flush'], 'per-flush', 256), segmentBytes: size(o['segment-bytes'], 'segment-bytes', 8 << 20) });
      out(json, r, () => `4 KiB puts, flush every ${r.recordsPerFlush}: ${r.grassMBps.toFixed(0)} MB/s; fio sequential write: ${r.fioMBps?.toFixed(0) ?? 'n/a (fio not installed)'} MB/s; ratio ${r.ratio?.toFixed(2) ?? 'n/a'}\n`);
      return 0;
    }
    if (mode === 'recovery') {
      const r = await benchRecovery({ dir, bytes: size(o.bytes, 'bytes', 1 << 30), segmentBytes: size(o['segment-bytes'], 'segment-bytes', 8 << 20) });
      out(json, r, () => `reopen after an unclean stop with ${(r.logBytesSinceCheckpoint / 2 ** 20).toFixed(0)} MiB of log since the checkpoint: ${r.reopenMillis.toFixed(0)} ms (${r.segmentsReplayed} segments, ${r.replayedRecords} records replayed)\n`);
      return 0;
    }
    if (mode === 'map-memory') {
      const r = await benchMapMemory({ dir, records: num(o.records, 'records', 10_000_000) });
      out(json, r, () => `${r.records} records: ${r.bytesPerRecord.toFixed(2)} bytes of memory per record, ${r.marginalBytesPerRecord.toFixed(2)} per record added past the half ; the address map alone ${r.mapBytesPerRecord.toFixed(2)} bytes per record (its arrays ${r.mapArrayBytesPerRecord.toFixed(2)})\n`);
      return 0;
    }
    throw new UsageError(`unknown --mode '${mode}'`);
  }),
};

async function benchCow(o: Parsed): Promise<number> {
  const json = !!o.json;
  const mode = (o.mode as string | undefined) ?? 'all';
  if (!['copy', 'overwrite', 'image', 'all'].includes(mode)) throw new UsageError(`bench cow --mode is copy, overwrite, image or all; got '${mode}'`);
  const dir = typeof o.dir === 'string' ? o.dir : undefined;
  const say = (l: string): void => {
    if (!json) io.out(l + '\n');
  };
  const result: Record<string, unknown> = {};
  if (mode === 'copy' || mode === 'all') {
    const r = await benchCopy({ repeats: num(o.repeats, 'repeats', 5) }, json ? undefined : (l) => io.err(l + '\n'));
    result.copy = r;
    for (const row of r.rows) say(`BLOCK-COPY of ${row.blocks} blocks: ${row.millis.toFixed(3)} ms, ${row.grassRecords} Grass records (${row.grassBytes} bytes)`);
    say(`  largest over smallest: time ${r.timeRatio.toFixed(2)}x, records ${r.recordRatio.toFixed(2)}x (target: within 3x)`);
  }
  if (mode === 'overwrite' || mode === 'all') {
    const r = await benchOverwrite({ dir, blocks: num(o.blocks, 'blocks', 65536), writes: num(o.writes, 'writes', 65536), perFlush: num(o['per-flush'], 'per-flush', 256), rounds: num(o.rounds, 'rounds', 3) });
    result.overwrite = r;
    say(`4 KiB random overwrites, incompressible, flush every ${r.perFlush}: Cow ${r.cowMBps.toFixed(0)} MB/s, Grass alone ${r.grassMBps.toFixed(0)} MB/s; ratio ${r.ratio.toFixed(2)} (target: at least 0.5; medians of ${r.rounds} rounds)`);
  }
  if (mode === 'image' || mode === 'all') {
    const tree = typeof o.tree === 'string' ? io.resolve(o.tree) : resolve(import.meta.dirname, '..', '..', 'node_modules', '.pnpm');
    const r = await benchImage({ tree, dir });
    result.image = r;
    say(`ext4 image of ${r.tree}: ${(r.imageBytes / 2 ** 20).toFixed(0)} MiB logical, ${(r.physicalBytes / 2 ** 20).toFixed(1)} MiB physical = ${r.physicalOverLogical.toFixed(3)} of logical (target: at most 0.45), ${r.physicalOverNonZero.toFixed(3)} of its non-zero blocks; compression ratio ${r.compressionRatio.toFixed(2)}; read back ${r.readBackIdentical ? 'identical' : 'DIFFERENT'}`);
    if (!r.readBackIdentical) process.exitCode = 1;
  }
  if (json) io.out(JSON.stringify(result) + '\n');
  return process.exitCode === 1 ? 1 : 0;
}

async function benchS3Command(o: Parsed): Promise<number> {
  const json = !!o.json;
  const r = await benchS3({
    gib: num(o.gib, 'gib', 1), segmentBytes: size(o['segment-bytes'], 'segment-bytes', 8 << 20), seconds: num(o.seconds, 'seconds', 10),
    rounds: num(o.rounds, 'rounds', 3), coldRounds: num(o['cold-rounds'], 'cold-rounds', 3), ...(typeof o.dir === 'string' ? { dir: o.dir } : {}), skipNbd: o['no-nbd'] === true,
    log: (l) => {
      if (!json) io.err(l + '\n');
    },
  });
  const p = r.puts as { total: number; perGiB: number; segments: number; partials: number; manifests: number; checkpoints: number; limit: number; met: boolean };
  const w = r.warmReadGets as { gets: number; met: boolean };
  const c = r.coldRead as { coldMiBps: number; warmMiBps: number; ratio: number; met: boolean };
  const n = r.nbdRandwrite as { fileIops: number; s3Iops: number; ratio: number; lastRoundRatio: number; met: boolean } | undefined;
  const ok = (m: boolean): string => (m ? 'met' : 'NOT met');
  out(json, r, () => [
    `PUT requests: ${p.total} for ${String(r.gib)} GiB written, ${p.perGiB.toFixed(1)} per GiB (${p.segments} segments, ${p.partials} partial objects, ${p.manifests} manifests; ${p.checkpoints} checkpoints); limit 1.1 x segments' worth + checkpoints = ${p.limit.toFixed(1)}: ${ok(p.met)}`,
    `GETs for warm reads of the whole volume: ${w.gets}: ${ok(w.met)}`,
    `cold sequential read ${c.coldMiBps.toFixed(0)} MiB/s, warm ${c.warmMiBps.toFixed(0)} MiB/s: ${c.ratio.toFixed(2)}x (target 0.3x): ${ok(c.met)}`,
    ...(n === undefined ? [] : [`NBD 4 KiB random write QD32: S3-backed ${n.s3Iops.toFixed(0)} IOPS, file-backed ${n.fileIops.toFixed(0)} IOPS: ${n.ratio.toFixed(2)}x, ${n.lastRoundRatio.toFixed(2)}x in the last round (target 0.8x for both): ${ok(n.met)}`]),
  ].join('\n') + '\n');
  return 0;
}

async function benchHuman(o: Parsed): Promise<number> {
  const json = !!o.json;
  const mode = (o.mode as string | undefined) ?? 'all';
  if (!['snapshot', 'clone-reads', 'import', 'all'].includes(mode)) throw new UsageError(`bench human --mode is snapshot, clone-reads, import or all; got '${mode}'`);
  const dir = typeof o.dir === 'string' ? o.dir : undefined;
  const say = (l: string): void => {
    if (!json) io.out(l + '\n');
  };
  const result: Record<string, unknown> = {};
  if (mode === 'snapshot' || mode === 'all') {
    const sizes = typeof o.sizes === 'string' ? o.sizes.split(',').map((x) => num(x, 'sizes', 1)) : [1, 16];
    const r = await benchSnapshot({ dir, sizesGiB: sizes, repeats: num(o.repeats, 'repeats', 5) }, json ? undefined : (l) => io.err(l + '\n'));
    result.snapshot = r;
    for (const row of r.rows) say(`snapshot of a volume with ${row.writtenGiB} GiB written: ${row.snapshotMillis.toFixed(2)} ms, durable when it returns (it flushes); target under 20 ms`);
  }
  if (mode === 'clone-reads' || mode === 'all') {
    const r = await benchCloneReads({ dir, volumeMiB: num(o['volume-mib'], 'volume-mib', 256), depth: num(o.depth, 'depth', 32), reads: num(o.reads, 'reads', 20000), rounds: num(o.rounds, 'rounds', 3) });
    result.cloneReads = r;
    say(`4 KiB random reads: clone ${r.depth} deep ${r.cloneReadsPerSecond.toFixed(0)}/s, original ${r.originalReadsPerSecond.toFixed(0)}/s; ratio ${r.ratio.toFixed(2)} (target at least 0.9)`);
  }
  if (mode === 'import' || mode === 'all') {
    const r = await benchImport({ dir, gib: num(o.gib, 'gib', 1), rounds: num(o.rounds, 'rounds', 3) });
    result.import = r;
    say(`import of a ${human(r.bytes)} raw image (${r.content}): ${r.importMBps.toFixed(0)} MB/s; cp + sync ${r.cpMBps.toFixed(0)} MB/s; ratio ${r.ratio.toFixed(2)} (target at least 0.5)`);
  }
  if (json) io.out(JSON.stringify(result) + '\n');
  return 0;
}

const simHelp = `Usage: pnpm pasture sim grass|cow [--seed N] [--crashes M] [--policy NAME] [--io-error-rate P]
                            [--background-reaper] [--json] [--verbose]

Run a seeded crash simulator (the ones the tests run) on a fault-injecting store, with
crashes at random points, reopen and a check against a model. The same seed replays a run
exactly.
  grass   random batches, flushes, checkpoints and cleaning
  cow     random writes, trims, BLOCK-COPYs and BLOCK-EXCHANGEs over huge sparse ranges in
          transactions; fsck after every step (--background-reaper to reap concurrently)
--crashes (default 50 for grass, 20 for cow); --io-error-rate P: for grass, the chance that
each store write fails with EIO; for cow, that each store read does (P/4 for writes), each
failed operation then checked to have changed nothing (default 0); --policy (grass only: the
cleaner policy, default cost-benefit).
`;

const sim: Command = {
  name: 'sim',
  summary: 'seeded crash simulators: sim grass|cow --seed N',
  run: (argv) => wrap(argv, async () => {
    const o = parse(argv, { seed: { type: 'string' }, crashes: { type: 'string' }, policy: { type: 'string' }, json: { type: 'boolean' }, verbose: { type: 'boolean' }, 'io-error-rate': { type: 'string' }, 'background-reaper': { type: 'boolean' } }, simHelp);
    maxArgs(o, 1);
    const seed = num(o.seed, 'seed', Rng.seedFromEnv());
    const layer = o._[0] ?? 'grass';
    if (layer === 'cow') {
      if (o.policy !== undefined) throw new UsageError('--policy is for sim grass; sim cow does not take it');
      const params = { ...defaultCowSimParams(seed), crashes: num(o.crashes, 'crashes', 20), backgroundReaper: !!o['background-reaper'], ioErrorRate: num(o['io-error-rate'], 'io-error-rate', 0) };
      if (!o.json) io.err(`seed ${seed}: ${JSON.stringify(params)}\n`);
      const r = await runCowSimulation(params, o.verbose ? (l) => io.err(l + '\n') : undefined);
      out(!!o.json, r, () => (r.ok ? `ok: ${r.crashes} crashes, ${r.transactions} transactions, ${r.copies} copies, ${r.exchanges} exchanges, ${r.fscks} fscks${r.failedOps + r.storeFailures > 0 ? `, ${r.failedOps} operations failed by I/O errors, ${r.storeFailures} store failures` : ''}\n` : `FAILED: ${r.failure}\n`));
      return r.ok ? 0 : 1;
    }
    if (layer !== 'grass') throw new UsageError(`sim grass or sim cow; got '${layer}'`);
    const params = { ...defaultSimParams(seed), crashes: num(o.crashes, 'crashes', 50), policy: (o.policy as string | undefined) ?? 'cost-benefit', ioErrorRate: num(o['io-error-rate'], 'io-error-rate', 0) };
    if (!o.json) io.err(`seed ${seed}: ${JSON.stringify(params)}\n`);
    const r = await runSimulation(params, o.verbose ? (l) => io.err(l + '\n') : undefined);
    out(!!o.json, r, () => (r.ok ? `ok: ${r.crashes} crashes, ${r.batches} batches, ${r.readsChecked} reads checked\n` : `FAILED: ${r.failure}\n`));
    return r.ok ? 0 : 1;
  }),
};

const serveHelp = `Usage: pnpm pasture serve --store file:DIR [options]

Serve the pool's volumes (read-write, under their names) and snapshots (read-only, as
VOLUME@SNAPSHOT) over NBD. Prints the URI to connect to. While it runs, the management
commands (volume, snap, clone, flatten, diff, import, export, stats) given the same --store
run inside it, through DIR/control.sock. SIGTERM or SIGINT: finish requests in flight,
flush, close the pool, exit 0.

  --listen HOST:PORT     TCP address (default 127.0.0.1:10809; PORT 0 picks one)
  --socket PATH          a unix socket instead of TCP
  --export NAME          serve only this volume or VOLUME@SNAPSHOT
  --tls-cert FILE --tls-key FILE
                         offer TLS (STARTTLS); --tls require refuses plain clients
  --tls on|require       default on when a certificate is given
  --metrics HOST:PORT    Prometheus metrics at http://HOST:PORT/metrics
  --max-connections N    NBD connections open at once (default 32); more are closed when
                         accepted. Each may hold up to 64 MiB of requests and replies
  --json                 print one JSON object (uri, exports) when ready

${STORE_HELP}
`;

function serveOptions(o: Parsed, dir: string, open: () => Promise<SegmentStore>): ServeOptions {
  if (o.listen !== undefined && o.socket !== undefined) throw new UsageError('give --listen or --socket, not both');
  const tlsMode = (o.tls as string | undefined) ?? (o['tls-cert'] ? 'on' : undefined);
  if (tlsMode !== undefined && !['on', 'require'].includes(tlsMode)) throw new UsageError(`--tls is on or require, got '${tlsMode}'`);
  if (tlsMode !== undefined && (typeof o['tls-cert'] !== 'string' || typeof o['tls-key'] !== 'string')) throw new UsageError('TLS needs --tls-cert FILE and --tls-key FILE');
  const hp = (v: Parsed[string], what: string): { host: string; port: number } => {
    try {
      return parseHostPort(String(v), what);
    } catch (e) {
      throw new UsageError((e as Error).message);
    }
  };
  return {
    dir,
    openStore: open,
    ...(o.listen !== undefined ? { listen: hp(o.listen, '--listen') } : {}),
    ...(typeof o.socket === 'string' ? { socket: io.resolve(o.socket) } : {}),
    ...(typeof o.export === 'string' ? { only: o.export } : {}),
    ...(tlsMode !== undefined ? { tls: { certFile: String(o['tls-cert']), keyFile: String(o['tls-key']), require: tlsMode === 'require' } } : {}),
    ...(o.metrics !== undefined ? { metrics: hp(o.metrics, '--metrics') } : {}),
    ...(o['max-connections'] !== undefined ? { maxConnections: positiveInt(o['max-connections'], 'max-connections') } : {}),
    json: !!o.json,
    runCommand: (argv) => {
      const cmd = commands.find((c) => c.name === argv[0]);
      return cmd === undefined ? Promise.resolve(2) : cmd.run(argv.slice(1));
    },
    setLive: setLivePool,
  };
}

const serveFlags = {
  ...STORE_FLAGS, listen: { type: 'string' as const }, socket: { type: 'string' as const }, export: { type: 'string' as const },
  'tls-cert': { type: 'string' as const }, 'tls-key': { type: 'string' as const }, tls: { type: 'string' as const }, metrics: { type: 'string' as const }, json: { type: 'boolean' as const },
  'max-connections': { type: 'string' as const },
};

const serveCmd: Command = {
  name: 'serve',
  summary: 'serve a pool\'s volumes and snapshots over NBD',
  run: (argv) => wrap(argv, async () => {
    const o = parse(argv, serveFlags, serveHelp);
    maxArgs(o, 0);
    return serve(serveOptions(o, storeDir(o), () => openSpec(o)));
  }),
};

const demoHelp = `Usage: pnpm pasture demo [--dir .pasture/demo] [serve options]

The main job: make a demo pool in DIR with a 1 GiB volume named 'demo' (if there is none
yet) and serve it over NBD on 127.0.0.1:10809 until Ctrl-C. Takes serve's options
(--listen, --socket, --metrics, ...). Try, in another terminal:
  nbdinfo nbd://127.0.0.1:10809/demo
  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' nbd://127.0.0.1:10809/demo
`;

const demo: Command = {
  name: 'demo',
  summary: 'create a demo pool with a volume (if none) and serve it over NBD',
  run: (argv) => wrap(argv, async () => {
    const o = parse(argv, { ...serveFlags, dir: { type: 'string' } }, demoHelp);
    maxArgs(o, 0);
    const dir = resolve(typeof o.dir === 'string' ? o.dir : join('.pasture', 'demo'));
    const spec: StoreSpec = { kind: 'file', dir };
    if (!(await storeExists(spec))) {
      await mkdir(dir, { recursive: true });
      const pool = await Pool.create(await GrassLog.create(await createStore(spec, { segmentBytes: 8 << 20, segmentCount: 512 })));
      await pool.createVolume('demo', 1 << 30);
      await pool.close();
      if (!o.json) io.out(`created a pool in ${dir} (4 GiB of segments, sparse) with volume 'demo' (1 GiB)\n`);
    }
    return serve(serveOptions(o, dir, () => openStore(spec)));
  }),
};

// =============================================================================================
// Pool management: volume, snap, clone, flatten, diff, import, export
// =============================================================================================

const storeOption = { ...STORE_FLAGS, json: { type: 'boolean' as const } };

/** The pool `pasture serve` holds open, used by commands it runs for control-socket clients. */
let live: LivePool | undefined;

export interface LivePool {
  dir: string;
  pool: Pool;
  store?: SegmentStore;
}

export function setLivePool(l: LivePool | undefined): void {
  live = l;
}

/** Whether --store names the store this process serves (by any path: a symlink, say). */
function isLive(o: Parsed): boolean {
  if (live === undefined) return false;
  const dir = storeDir(o);
  if (dir === live.dir) return true;
  try {
    return realpathSync(dir) === realpathSync(live.dir);
  } catch {
    return false;
  }
}

/** Open the pool at --store, run fn, close it (even on error). */
async function withPool<T>(o: Parsed, readOnly: boolean, fn: (pool: Pool) => Promise<T>): Promise<T> {
  if (live !== undefined && isLive(o)) return fn(live.pool);
  const g = await GrassLog.open(await openSpec(o), readOnly ? { readOnly: true } : {});
  let pool: Pool;
  try {
    pool = await Pool.open(g, { readOnly });
  } catch (e) {
    await g.close().catch(() => undefined);
    throw e;
  }
  try {
    return await fn(pool);
  } finally {
    await pool.close();
  }
}

function need(o: Parsed, i: number, what: string, help: string): string {
  const v = o._[i];
  if (v === undefined) throw new UsageError(`missing ${what}\n\n${help}`);
  return v;
}

/** Refuse more than `n` positional arguments, before the command does anything. */
function maxArgs(o: Parsed, n: number): void {
  const extra = o._.slice(n);
  if (extra.length > 0) throw new UsageError(`unexpected argument${extra.length > 1 ? 's' : ''}: ${extra.map((a) => `'${a}'`).join(' ')}`);
}

function table(rows: string[][]): string {
  if (rows.length === 0) return '';
  const w = rows[0]!.map((_, i) => Math.max(...rows.map((r) => r[i]!.length)));
  return rows.map((r) => r.map((c, i) => c.padEnd(w[i]!)).join('  ').trimEnd()).join('\n') + '\n';
}

const volumeHelp = `Usage: pnpm pasture volume <subcommand> --store file:DIR [--json]

  create NAME --size SIZE       a new, empty (thin) volume; SIZE like 10G, a multiple of 4 KiB
  list                          every volume: size, parent, snapshots
  info NAME[@SNAP]              size, allocated bytes, bytes unique to it
  resize NAME --size SIZE [--allow-shrink]
                                grow, or shrink (refused while a client has it open, and
                                if data lies past the new end unless --allow-shrink)
  rename NAME NEWNAME
  copy FROM NEWNAME             a new volume with FROM's contents (FROM: VOLUME or
                                VOLUME@SNAPSHOT); instant, blocks shared until written
  remove NAME                   refused while it has snapshots; space returns in the background

${STORE_HELP}
`;

const volume: Command = {
  name: 'volume',
  summary: 'volumes: create, list, info, resize, rename, copy, remove',
  run: (argv) => wrap(argv, async () => {
    const o = parse(argv, { ...storeOption, size: { type: 'string' }, 'allow-shrink': { type: 'boolean' } }, volumeHelp);
    const sub = need(o, 0, 'subcommand', volumeHelp);
    maxArgs(o, ({ list: 1, rename: 3, copy: 3 } as Record<string, number>)[sub] ?? 2);
    const json = !!o.json;
    const readOnly = sub === 'list' || sub === 'info';
    return withPool(o, readOnly, async (pool) => {
      switch (sub) {
        case 'create': {
          if (o.size === undefined) throw new UsageError(`volume create needs --size\n\n${volumeHelp}`);
          const v = await pool.createVolume(need(o, 1, 'NAME', volumeHelp), size(o.size, 'size', 0));
          out(json, v, () => `created volume ${v.name}: ${human(v.size)}\n`);
          return 0;
        }
        case 'list': {
          const vs = pool.listVolumes();
          out(json, { volumes: vs }, () => table([['NAME', 'SIZE', 'PARENT', 'SNAPSHOTS', 'CREATED'], ...vs.map((v) => [v.incomplete ? `${v.name} (incomplete import)` : v.name, human(v.size), v.parent ?? '-', String(v.snapshots), v.created])]));
          return 0;
        }
        case 'info': {
          const u = await pool.usage(need(o, 1, 'NAME', volumeHelp));
          out(json, u, () => `${u.spec}: size ${human(u.size)}, allocated ${human(u.allocatedBytes)}, unique ${human(u.uniqueBytes)}\n`);
          return 0;
        }
        case 'resize': {
          const name = need(o, 1, 'NAME', volumeHelp);
          if (o.size === undefined) throw new UsageError(`volume resize needs --size\n\n${volumeHelp}`);
          const n = size(o.size, 'size', 0);
          await pool.resizeVolume(name, n, { allowShrink: !!o['allow-shrink'] });
          out(json, { name, size: n }, () => `resized ${name} to ${human(n)}\n`);
          return 0;
        }
        case 'rename': {
          const [from, to] = [need(o, 1, 'NAME', volumeHelp), need(o, 2, 'NEWNAME', volumeHelp)];
          await pool.renameVolume(from, to);
          out(json, { from, to }, () => `renamed ${from} to ${to}\n`);
          return 0;
        }
        case 'copy': {
          const v = await pool.copyVolume(need(o, 1, 'FROM', volumeHelp), need(o, 2, 'NEWNAME', volumeHelp));
          out(json, v, () => `created volume ${v.name}: ${human(v.size)}\n`);
          return 0;
        }
        case 'remove': {
          const name = need(o, 1, 'NAME', volumeHelp);
          await pool.removeVolume(name);
          out(json, { removed: name }, () => `removed ${name}\n`);
          return 0;
        }
        default:
          throw new UsageError(`unknown volume subcommand '${sub}'\n\n${volumeHelp}`);
      }
    });
  }),
};

const snapHelp = `Usage: pnpm pasture snap <subcommand> --store file:DIR [--json]

  create VOLUME@SNAP            instant, whatever the volume's size
  list VOLUME                   its snapshots: size, protection, clones
  remove VOLUME@SNAP            refused while protected or while it has clones
  rollback VOLUME@SNAP          make the volume exactly the snapshot (size included)
  protect VOLUME@SNAP           refuse removal
  unprotect VOLUME@SNAP

${STORE_HELP}
`;

const snap: Command = {
  name: 'snap',
  summary: 'snapshots: create, list, remove, rollback, protect, unprotect',
  run: (argv) => wrap(argv, async () => {
    const o = parse(argv, storeOption, snapHelp);
    const sub = need(o, 0, 'subcommand', snapHelp);
    maxArgs(o, 2);
    const json = !!o.json;
    const arg = need(o, 1, sub === 'list' ? 'VOLUME' : 'VOLUME@SNAP', snapHelp);
    const at = (): [string, string] => {
      const i = arg.indexOf('@');
      if (i < 0) throw new UsageError(`'${arg}' is not VOLUME@SNAP`);
      return [arg.slice(0, i), arg.slice(i + 1)];
    };
    return withPool(o, sub === 'list', async (pool) => {
      switch (sub) {
        case 'create': {
          const [v, s] = at();
          const info = await pool.createSnapshot(v, s);
          out(json, info, () => `created snapshot ${info.spec}\n`);
          return 0;
        }
        case 'list': {
          const ss = pool.listSnapshots(arg);
          out(json, { snapshots: ss }, () => table([['NAME', 'SIZE', 'PROTECTED', 'CLONES', 'CREATED'], ...ss.map((x) => [x.spec, human(x.size), x.protected ? 'yes' : 'no', x.children.join(',') || '-', x.created])]));
          return 0;
        }
        case 'remove':
          at();
          await pool.removeSnapshot(arg);
          out(json, { removed: arg }, () => `removed ${arg}\n`);
          return 0;
        case 'rollback':
          at();
          await pool.rollback(arg);
          out(json, { rolledBack: arg }, () => `rolled back to ${arg}\n`);
          return 0;
        case 'protect':
        case 'unprotect':
          at();
          await pool.protectSnapshot(arg, sub === 'protect');
          out(json, { snapshot: arg, protected: sub === 'protect' }, () => `${sub}ed ${arg}\n`);
          return 0;
        default:
          throw new UsageError(`unknown snap subcommand '${sub}'\n\n${snapHelp}`);
      }
    });
  }),
};

const cloneHelp = `Usage: pnpm pasture clone VOLUME@SNAP NEWVOLUME --store file:DIR [--json]

A writable volume that starts as the snapshot (instant; the snapshot becomes protected).

${STORE_HELP}
`;

const clone: Command = {
  name: 'clone',
  summary: 'clone a snapshot into a new writable volume',
  run: (argv) => wrap(argv, async () => {
    const o = parse(argv, storeOption, cloneHelp);
    maxArgs(o, 2);
    const [from, to] = [need(o, 0, 'VOLUME@SNAP', cloneHelp), need(o, 1, 'NEWVOLUME', cloneHelp)];
    return withPool(o, false, async (pool) => {
      const v = await pool.clone(from, to);
      out(!!o.json, v, () => `cloned ${from} to ${v.name}\n`);
      return 0;
    });
  }),
};

const flattenHelp = `Usage: pnpm pasture flatten VOLUME --store file:DIR [--json]

Detach a clone from its parent snapshot. Its blocks are already its own (shared through
reference counts), so this is instant and copies nothing.

${STORE_HELP}
`;

const flatten: Command = {
  name: 'flatten',
  summary: 'detach a clone from its parent snapshot',
  run: (argv) => wrap(argv, async () => {
    const o = parse(argv, storeOption, flattenHelp);
    maxArgs(o, 1);
    const name = need(o, 0, 'VOLUME', flattenHelp);
    return withPool(o, false, async (pool) => {
      await pool.flatten(name);
      out(!!o.json, { flattened: name }, () => `flattened ${name}\n`);
      return 0;
    });
  }),
};

const diffHelp = `Usage: pnpm pasture diff VOLUME@FROM [VOLUME@TO | VOLUME] --store file:DIR [--json]

The byte extents that changed between two snapshots, or between a snapshot and the volume
(the default), for incremental backup. Any two images of the pool may be compared (a clone
and its parent snapshot, say); blocks they share are skipped without being read.

${STORE_HELP}
`;

const diff: Command = {
  name: 'diff',
  summary: 'extents changed between two snapshots, or a snapshot and its volume',
  run: (argv) => wrap(argv, async () => {
    const o = parse(argv, storeOption, diffHelp);
    maxArgs(o, 2);
    const from = need(o, 0, 'VOLUME@FROM', diffHelp);
    if (!from.includes('@')) throw new UsageError(`diff starts from a snapshot (VOLUME@SNAPSHOT), got '${from}'`);
    const to = o._[1] ?? from.split('@')[0]!;
    return withPool(o, true, async (pool) => {
      const extents: { offset: number; length: number }[] = [];
      for await (const e of pool.diff(from, to)) extents.push(e);
      const bytes = extents.reduce((a, e) => a + e.length, 0);
      out(!!o.json, { from, to, extents, bytes }, () => extents.map((e) => `${e.offset} ${e.length}`).join('\n') + (extents.length ? '\n' : '') + `# ${extents.length} extents, ${human(bytes)} changed from ${from} to ${to}\n`);
      return 0;
    });
  }),
};

function progressBar(json: boolean, what: string): ((done: number, total: number) => void) | undefined {
  if (json || !io.tty) return undefined;
  const t0 = Date.now();
  let last = 0;
  return (done, total) => {
    const now = Date.now();
    if (now - last < 100 && done < total) return;
    last = now;
    const frac = total === 0 ? 1 : done / total;
    const width = 30;
    const bar = '#'.repeat(Math.round(frac * width)).padEnd(width, '.');
    const mbps = done / 1e6 / Math.max(0.001, (now - t0) / 1000);
    io.err(`\r${what} [${bar}] ${(frac * 100).toFixed(0).padStart(3)}% ${human(done)} ${mbps.toFixed(0)} MB/s${done >= total ? '\n' : ''}`);
  };
}

const importHelp = `Usage: pnpm pasture import FILE VOLUME --store file:DIR [--json]

Create VOLUME, sized to FILE (rounded up to 4 KiB), and copy the raw image into it. Zero
blocks are skipped (they are holes). Shows a progress bar on a terminal.

${STORE_HELP}
`;

const importCmd: Command = {
  name: 'import',
  summary: 'copy a raw image file into a new volume (sparse-aware)',
  run: (argv) => wrap(argv, async () => {
    const o = parse(argv, storeOption, importHelp);
    maxArgs(o, 2);
    const [file, name] = [need(o, 0, 'FILE', importHelp), need(o, 1, 'VOLUME', importHelp)];
    return withPool(o, false, async (pool) => {
      const r = await importImage(pool, io.resolve(file), name, progressBar(!!o.json, 'import'));
      out(!!o.json, { volume: name, ...r, mbps: r.bytes / 1e6 / r.seconds }, () => `imported ${file} into ${name}: ${human(r.bytes)} (${human(r.dataBytes)} of data) in ${r.seconds.toFixed(1)} s\n`);
      return 0;
    });
  }),
};

const exportHelp = `Usage: pnpm pasture export VOLUME[@SNAP] FILE --store file:DIR [--json]

Write a volume or snapshot to a raw image file. Only allocated extents are written; holes
stay holes in FILE. Shows a progress bar on a terminal.

${STORE_HELP}
`;

const exportCmd: Command = {
  name: 'export',
  summary: 'copy a volume or snapshot to a raw image file (sparse-aware)',
  run: (argv) => wrap(argv, async () => {
    const o = parse(argv, storeOption, exportHelp);
    maxArgs(o, 2);
    const [spec, file] = [need(o, 0, 'VOLUME[@SNAP]', exportHelp), need(o, 1, 'FILE', exportHelp)];
    return withPool(o, true, async (pool) => {
      const r = await exportImage(pool, spec, io.resolve(file), progressBar(!!o.json, 'export'));
      out(!!o.json, { spec, file: io.resolve(file), ...r }, () => `exported ${spec} to ${file}: ${human(r.bytes)} (${human(r.dataBytes)} of data) in ${r.seconds.toFixed(1)} s\n`);
      return 0;
    });
  }),
};

export const commands: Command[] = [demo, serveCmd, init, volume, snap, clone, flatten, diff, importCmd, exportCmd, stats, fsckCmd, bench, sim];

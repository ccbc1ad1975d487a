/**
 * The Grass simulator: a seeded random workload of batches, flushes, checkpoints, cleaning and
 * reads against a fault-injecting memory store, with crashes at random points (mid-write,
 * mid-sync, mid-seal, mid-superblock), then reopen and a check against a model:
 *
 * - every read before a crash returns exactly the model's value (latest resolved batch);
 * - after a crash the store equals the model after some prefix of the batches, at least as
 *   long as the last completed flush covered (the durability contract in grass.ts).
 *
 * Same seed, same run: it prints the seed and every parameter, and `pasture sim grass --seed N`
 * replays a failure exactly.
 */
import { GrassLog, type BatchOp } from './grass.ts';
import { MemorySegmentStore } from './stores/memory.ts';
import { FaultySegmentStore } from './stores/faulty.ts';
import { Rng } from './rng.ts';
import { POLICIES } from './policies.ts';
import { MAP_PAGE_ENTRIES, MAX_USER_RECORD_BYTES } from './format.ts';

export interface SimParams {
  seed: number;
  /** Crash/reopen cycles to run. */
  crashes: number;
  /** Mean operations between crashes. */
  stepsPerCrash: number;
  segmentBytes: number;
  segmentCount: number;
  /** Distinct addresses used. */
  addresses: number;
  /**
   * Address i (1-based) is 1 + (i - 1) x addressStride: a stride spreads the addresses over
   * many map pages (1024 addresses each), so checkpoints write many pages and batches create
   * them, which admission must count.
   */
  addressStride: number;
  policy: string;
  /** Probability per mutating store call of an injected EIO (the instance then fails, like a crash). */
  ioErrorRate: number;
}

export interface SimResult {
  params: SimParams;
  ok: boolean;
  failure?: string;
  crashes: number;
  steps: number;
  batches: number;
  reopenChecks: number;
  readsChecked: number;
  /** How many batches past the last flush survived crashes, summed (shows the prefix is not trivial). */
  unflushedSurvived: number;
  unflushedLost: number;
  cleanerRecords: number;
  /** Segments freed with nothing live in them, without the cleaner (Grass.maybeReclaimDead). */
  deadSegmentsFreed: number;
  checkpoints: number;
  /** Batches refused with ENOSPC (the store was full; nothing applied). */
  noSpace: number;
}

const payloadCache = new Map<number, Uint8Array>();

/** Deterministic payload for (tag): its length and bytes are a function of the tag. Cached. */
function payloadFor(tag: number): Uint8Array {
  let p = payloadCache.get(tag);
  if (p === undefined) {
    if (payloadCache.size > 50000) payloadCache.clear();
    p = makePayload(tag);
    payloadCache.set(tag, p);
  }
  return p;
}

function makePayload(tag: number): Uint8Array {
  const rng = new Rng(tag);
  const pick = rng.int(10);
  const len = pick < 5 ? MAX_USER_RECORD_BYTES : pick < 8 ? rng.range(1, 600) : rng.range(0, MAX_USER_RECORD_BYTES);
  const out = new Uint8Array(len);
  let x = tag >>> 0;
  for (let i = 0; i < len; i++) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    out[i] = x >>> 24;
  }
  return out;
}

function sameBytes(a: Uint8Array | undefined, b: Uint8Array | undefined): boolean {
  if (a === undefined || b === undefined) return a === b;
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

interface ModelBatch {
  ops: { gaddr: number; tag: number | undefined }[];
}

/**
 * The parameters for a seed: the geometry and the address layout vary with it (dense, or
 * spread over up to 25 map pages; 40 to 96 segments), so a soak over seeds covers them.
 */
export function defaultSimParams(seed: number): SimParams {
  const pick = new Rng(seed ^ 0x5eed);
  const addressStride = [1, 1, 7, 64][pick.int(4)]!;
  const segmentCount = [48, 48, 64, 96][pick.int(4)]!;
  return { seed, crashes: 50, stepsPerCrash: 60, segmentBytes: 128 * 1024, segmentCount, addresses: 400, addressStride, policy: 'cost-benefit', ioErrorRate: 0 };
}

export async function runSimulation(params: SimParams, log: (line: string) => void = () => undefined): Promise<SimResult> {
  const rng = new Rng(params.seed);
  const policy = POLICIES.find((p) => p.name === params.policy);
  if (policy === undefined) throw new Error(`unknown policy ${params.policy}`);
  const inner = new MemorySegmentStore(params.segmentBytes, params.segmentCount);
  const result: SimResult = {
    params, ok: true, crashes: 0, steps: 0, batches: 0, reopenChecks: 0, readsChecked: 0,
    unflushedSurvived: 0, unflushedLost: 0, cleanerRecords: 0, deadSegmentsFreed: 0, checkpoints: 0, noSpace: 0,
  };
  // The model: committed batches in order, and the state they produce.
  let history: ModelBatch[] = [];
  let state = new Map<number, number>(); // gaddr -> tag
  let durable = 0; // batches covered by the last completed flush
  let nextTag = 1;
  const options = { policy, backgroundCleaner: true, cleanerBatchSegments: 1 + rng.int(4), ...(process.env.PASTURE_TRACE ? { trace: (e: string) => log(`  trace: ${e}`) } : {}) };
  let faulty = new FaultySegmentStore(inner, { seed: rng.u32(), crashAtOp: 0 });
  let g = await GrassLog.create(faulty, options);
  // At most 64 map pages (640 KiB in a full checkpoint): more only slow the run down, as most
  // of a small store then goes to checkpoints and their reserve. Stores whose map outgrows
  // them still reopen after any crash (soaked without the cap; see reopen.test.ts).
  const maxPages = 64;
  const stride = Math.max(1, Math.min(params.addressStride ?? 1, Math.floor((maxPages * MAP_PAGE_ENTRIES) / params.addresses)));
  const addressOf = (i: number): number => 1 + (i - 1) * stride;
  const anyAddress = (): number => addressOf(1 + rng.int(params.addresses));
  const fail = (why: string): SimResult => {
    result.ok = false;
    result.failure = `seed ${params.seed}: ${why}`;
    return result;
  };

  for (let cycle = 0; cycle < params.crashes; cycle++) {
    const steps = 1 + rng.int(params.stepsPerCrash * 2);
    // Crash either at a scheduled store call (inside a seal, flush or checkpoint) or between steps.
    faulty.options.crashAtOp = rng.chance(0.7) ? faulty.mutatingOpCount + 1 + rng.int(steps) : 0;
    faulty.options.writeErrorRate = params.ioErrorRate;
    const background: Promise<unknown>[] = [];
    let dead = false;
    for (let step = 0; step < steps && !dead; step++) {
      result.steps++;
      const r = rng.float();
      try {
        if (r < 0.55) {
          const n = 1 + rng.int(rng.chance(0.03) ? 300 : rng.chance(0.2) ? 40 : 6);
          const ops: BatchOp[] = [];
          const mb: ModelBatch = { ops: [] };
          for (let i = 0; i < n; i++) {
            const gaddr = anyAddress();
            if (rng.chance(0.15)) {
              ops.push({ op: 'trim', gaddr });
              mb.ops.push({ gaddr, tag: undefined });
            } else {
              const tag = nextTag++;
              ops.push({ op: 'put', gaddr, data: payloadFor(tag) });
              mb.ops.push({ gaddr, tag });
            }
          }
          // tryBatch: done at once, or refused with nothing done.
          if (rng.chance(0.2)) {
            let done: boolean;
            try {
              done = g.tryBatch(ops);
            } catch (e) {
              if (!isFault(e) && !faulty.isCrashed && g.failure === undefined) throw e;
              dead = true;
              break;
            }
            if (!done) {
              result.noSpace++;
              continue;
            }
            history.push(mb);
            for (const op of mb.ops) {
              if (op.tag === undefined) state.delete(op.gaddr);
              else state.set(op.gaddr, op.tag);
            }
            result.batches++;
            continue;
          }
          // The batch is appended synchronously when admitted; count it as issued now, and
          // committed once it resolves.
          const p = g.batch(ops);
          history.push(mb);
          try {
            await p;
          } catch (e) {
            // A batch that failed was not appended unless the instance failed mid-way; the
            // reopen check allows either outcome for the last batch.
            if ((e as { code?: string }).code === 'ENOSPC' && g.failure === undefined && !faulty.isCrashed) {
              // A full store refuses the whole batch and stays usable.
              history.pop();
              result.noSpace++;
              continue;
            }
            if (!isFault(e) && !faulty.isCrashed) throw e;
            if (g.failure === undefined && !faulty.isCrashed) history.pop();
            dead = true;
            break;
          }
          for (const op of mb.ops) {
            if (op.tag === undefined) state.delete(op.gaddr);
            else state.set(op.gaddr, op.tag);
          }
          result.batches++;
        } else if (r < 0.65) {
          const covered = history.length;
          const p = g.flush().then(() => {
            durable = Math.max(durable, covered);
          });
          if (rng.chance(0.5)) await p;
          else background.push(p.catch(() => undefined));
        } else if (r < 0.69) {
          background.push(g.checkpoint().catch(() => undefined));
        } else if (r < 0.72) {
          background.push(g.cleanRound().catch(() => undefined));
        } else if (r < 0.8) {
          // A run of consecutive addresses in one readMany (adjacent records become one store read).
          const first = 1 + rng.int(params.addresses);
          const run = Array.from({ length: Math.min(1 + rng.int(64), params.addresses - first + 1) }, (_, i) => addressOf(first + i));
          const got = await g.readMany(run);
          for (const [i, gaddr] of run.entries()) {
            const tag = state.get(gaddr);
            const want = tag === undefined ? undefined : payloadFor(tag);
            if (!sameBytes(got[i], want)) return fail(`cycle ${cycle} step ${step}: readMany of ${gaddr} returned ${got[i]?.length ?? 'nothing'} bytes, model has tag ${tag}`);
            result.readsChecked++;
          }
        } else {
          const gaddr = anyAddress();
          const got = await g.read(gaddr);
          const tag = state.get(gaddr);
          const want = tag === undefined ? undefined : payloadFor(tag);
          if (!sameBytes(got, want)) return fail(`cycle ${cycle} step ${step}: read of ${gaddr} returned ${got?.length ?? 'nothing'} bytes, model has tag ${tag}`);
          result.readsChecked++;
        }
      } catch (e) {
        if (isFault(e) || faulty.isCrashed || g.failure !== undefined) {
          dead = true;
          break;
        }
        return fail(`cycle ${cycle} step ${step}: unexpected error ${(e as Error).stack}`);
      }
      if (faulty.isCrashed || g.failure !== undefined) dead = true;
    }
    // Crash now (if the scheduled point was not reached) and let everything in flight settle.
    if (!faulty.isCrashed) await faulty.crash();
    log(`crash after op ${faulty.mutatingOpCount}: ${JSON.stringify(faulty.lastCrash)}`);
    await Promise.all(background);
    const st = g.stats();
    result.cleanerRecords += st.cleanerRecords;
    result.deadSegmentsFreed += st.deadSegmentsFreed;
    result.checkpoints += st.checkpoints;
    result.crashes++;

    // Reopen on the crash image and find which prefix of the history survived.
    faulty = new FaultySegmentStore(inner, { seed: rng.u32(), crashAtOp: 0 });
    try {
      g = await GrassLog.open(faulty, options);
    } catch (e) {
      return fail(`cycle ${cycle}: reopen failed: ${(e as Error).stack}`);
    }
    const observed = new Map<number, Uint8Array | undefined>();
    for (let i = 1; i <= params.addresses; i++) {
      const a = addressOf(i);
      try {
        observed.set(a, await g.read(a));
      } catch (e) {
        return fail(`cycle ${cycle}: read of ${a} after reopen failed: ${(e as Error).message}`);
      }
    }
    const k = findPrefix(history, observed, durable);
    if (k === undefined) {
      return fail(`cycle ${cycle}: recovered state is not a prefix of the ${history.length} batches at or after the last flush (${durable}); recovery said ${JSON.stringify(g.recovery)}`);
    }
    result.reopenChecks++;
    result.unflushedSurvived += k - durable;
    result.unflushedLost += history.length - k;
    history = history.slice(0, k);
    state = stateAt(history, k);
    durable = k;
    log(`cycle ${cycle}: ${steps} steps, recovered ${k} batches (${k - durable} past the last flush), recovery ${g.recovery?.millis} ms`);
  }
  const st = g.stats();
  result.cleanerRecords += st.cleanerRecords;
  result.deadSegmentsFreed += st.deadSegmentsFreed;
  await g.close();
  return result;
}

function isFault(e: unknown): boolean {
  const code = (e as { code?: string } | undefined)?.code;
  const name = (e as { name?: string } | undefined)?.name;
  // A store failure counts only if a fault caused it: one from a bug (an assertion, say) is a finding.
  if (name === 'StoreFailedError') return isFault((e as { cause?: unknown }).cause);
  return code === 'ECRASHED' || name === 'CrashedError' || name === 'InjectedError';
}

function stateAt(history: readonly ModelBatch[], k: number): Map<number, number> {
  const s = new Map<number, number>();
  for (let i = 0; i < k; i++) {
    for (const op of history[i]!.ops) {
      if (op.tag === undefined) s.delete(op.gaddr);
      else s.set(op.gaddr, op.tag);
    }
  }
  return s;
}

/** The largest k in [durable, history.length] whose state equals `observed`, if any. */
function findPrefix(history: readonly ModelBatch[], observed: Map<number, Uint8Array | undefined>, durable: number): number | undefined {
  // Name each observed value by the tag that produced it (-1: no batch ever wrote these bytes).
  const tagsOf = new Map<number, Set<number>>();
  for (const b of history) for (const op of b.ops) if (op.tag !== undefined) {
    let set = tagsOf.get(op.gaddr);
    if (set === undefined) tagsOf.set(op.gaddr, (set = new Set()));
    set.add(op.tag);
  }
  const observedTag = new Map<number, number | undefined>();
  for (const [a, got] of observed) {
    if (got === undefined) {
      observedTag.set(a, undefined);
      continue;
    }
    let found = -1;
    for (const t of tagsOf.get(a) ?? []) if (sameBytes(got, payloadFor(t))) found = t;
    if (found === -1) return undefined;
    observedTag.set(a, found);
  }
  const s = stateAt(history, durable);
  const matches = (): boolean => {
    for (const [a, t] of observedTag) if (s.get(a) !== t) return false;
    return true;
  };
  let result: number | undefined;
  for (let k = durable; k <= history.length; k++) {
    if (k > durable) {
      for (const op of history[k - 1]!.ops) {
        if (op.tag === undefined) s.delete(op.gaddr);
        else s.set(op.gaddr, op.tag);
      }
    }
    if (matches()) result = k;
  }
  return result;
}

/**
 * Cow's seeded crash simulator: random writes, trims, BLOCK-COPYs and BLOCK-EXCHANGEs over
 * overlapping and huge sparse ranges of the 128-bit space, grouped into transactions (some of
 * which abort), on a fault-injecting memory store that crashes at random points. It runs Cow
 * beside a model (a Map from address to the tag of the block written there) and checks:
 * - every read before a crash returns exactly the model's block;
 * - after every step, fsck finds every refcount equal to its references, no leaks, no
 *   missing records and the superblock's counters right;
 * - after a crash and reopen, the space equals the model after some prefix of the committed
 *   transactions, at least as long as the last completed flush.
 * The same seed gives the same run (`pasture sim cow --seed N`).
 */
import { FaultySegmentStore, GrassLog, MemorySegmentStore, Rng } from '@pasture/grass';
import { BLOCK_BYTES } from './codec.ts';
import { CowStore, type CowTransaction } from './cow.ts';
import { fsckCow } from './fsck.ts';

export interface CowSimParams {
  seed: number;
  crashes: number;
  /** Mean steps between crashes. */
  stepsPerCrash: number;
  segmentBytes: number;
  segmentCount: number;
  /** Run fsck after every step (otherwise after every transaction that changed refcounts, at reopen and at the end). */
  fsckEveryStep: boolean;
  backgroundReaper: boolean;
  /**
   * Chance that each store read fails with EIO (a quarter of it for writes, syncs and seals),
   * during the steps; checks and reopens run without. A failed read fails only its operation,
   * which must then have changed nothing; a failed write stops the store, as a crash does.
   */
  ioErrorRate: number;
}

export interface CowSimResult {
  params: CowSimParams;
  ok: boolean;
  failure?: string;
  crashes: number;
  steps: number;
  transactions: number;
  aborted: number;
  /** Writes outside a transaction (Cow.write, Cow.writeBlocks), and how many took the fast path. */
  directWrites: number;
  fastWrites: number;
  copies: number;
  exchanges: number;
  readsChecked: number;
  fscks: number;
  unflushedSurvived: number;
  unflushedLost: number;
  maxMapped: number;
  maxNodes: number;
  /** Operations failed by an injected error that left the store running (then checked to have changed nothing). */
  failedOps: number;
  /** Cycles ended by an injected error that stopped the store (then reopened, as after a crash). */
  storeFailures: number;
}

export function defaultCowSimParams(seed: number): CowSimParams {
  return { seed, crashes: 20, stepsPerCrash: 30, segmentBytes: 256 * 1024, segmentCount: 96, fsckEveryStep: true, backgroundReaper: false, ioErrorRate: 0 };
}

/** A block whose first 8 bytes name its tag; compressible or not depending on the tag. */
export function blockFor(tag: number): Uint8Array {
  const b = new Uint8Array(BLOCK_BYTES);
  const v = new DataView(b.buffer);
  v.setFloat64(0, tag, true);
  if (tag % 3 === 0) {
    let x = (tag * 2654435761) >>> 0 || 1;
    for (let i = 8; i < BLOCK_BYTES; i++) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      b[i] = x & 255;
    }
  } else {
    for (let i = 8; i < BLOCK_BYTES; i++) b[i] = (tag + (i >> 6)) & 255;
  }
  return b;
}

function tagOf(block: Uint8Array): number {
  return new DataView(block.buffer, block.byteOffset, 8).getFloat64(0, true);
}

type Model = Map<bigint, number>;

/** Where the simulator points: dense clusters spread over the 128-bit space, edges included. */
const REGIONS: bigint[] = [0n, 1n << 16n, 1n << 40n, (1n << 64n) + 4096n, 1n << 100n, (1n << 127n) - 512n, (1n << 128n) - 8192n];

function modelCopy(m: Model, src: bigint, dst: bigint, count: bigint): void {
  const moved: [bigint, number][] = [];
  for (const [a, t] of m) if (a >= src && a < src + count) moved.push([a - src, t]);
  modelTrim(m, dst, count);
  for (const [rel, t] of moved) m.set(dst + rel, t);
}

function modelTrim(m: Model, start: bigint, count: bigint): void {
  for (const a of [...m.keys()]) if (a >= start && a < start + count) m.delete(a);
}

function modelExchange(m: Model, a: bigint, b: bigint, count: bigint): void {
  const inA: [bigint, number][] = [];
  const inB: [bigint, number][] = [];
  for (const [x, t] of m) {
    if (x >= a && x < a + count) inA.push([x - a, t]);
    else if (x >= b && x < b + count) inB.push([x - b, t]);
  }
  modelTrim(m, a, count);
  modelTrim(m, b, count);
  for (const [rel, t] of inA) m.set(b + rel, t);
  for (const [rel, t] of inB) m.set(a + rel, t);
}

export async function runCowSimulation(params: CowSimParams, log: (line: string) => void = () => undefined): Promise<CowSimResult> {
  const rng = new Rng(params.seed);
  const result: CowSimResult = {
    params, ok: true, crashes: 0, steps: 0, transactions: 0, aborted: 0, directWrites: 0, fastWrites: 0, copies: 0, exchanges: 0,
    readsChecked: 0, fscks: 0, unflushedSurvived: 0, unflushedLost: 0, maxMapped: 0, maxNodes: 0, failedOps: 0, storeFailures: 0,
  };
  const fail = (why: string): CowSimResult => {
    result.ok = false;
    result.failure = `seed ${params.seed}: ${why}`;
    return result;
  };
  const inner = new MemorySegmentStore(params.segmentBytes, params.segmentCount);
  let faulty = new FaultySegmentStore(inner, { seed: rng.u32(), crashAtOp: 0 });
  const cowOptions = { backgroundReaper: params.backgroundReaper, cacheBytes: 256 * 1024 };
  let cow = await CowStore.create(await GrassLog.create(faulty, { backgroundCleaner: true }), cowOptions);
  let model: Model = new Map();
  /** Model after each committed transaction since the last completed flush; [0] is the durable state. */
  let history: Model[] = [new Map()];
  let nextTag = 1;

  const addr = (): bigint => {
    const a = REGIONS[rng.int(REGIONS.length)]! + BigInt(rng.int(rng.chance(0.5) ? 600 : 70000));
    return a < 1n << 128n ? a : (1n << 128n) - 1n - (a % 4096n);
  };
  const count = (): bigint => {
    const r = rng.float();
    if (r < 0.4) return BigInt(1 + rng.int(8));
    if (r < 0.7) return BigInt(1 + rng.int(700));
    if (r < 0.9) return 256n ** BigInt(1 + rng.int(2)) * BigInt(1 + rng.int(3));
    return 1n << BigInt(20 + rng.int(80)); // huge and sparse
  };
  const clamp = (a: bigint, n: bigint): bigint => (a + n > 1n << 128n ? (1n << 128n) - a : n);

  /** One random operation applied to both the transaction and the model. */
  const randomOp = async (tx: CowTransaction, m: Model): Promise<void> => {
    const r = rng.float();
    if (r < 0.5) {
      const a = addr();
      const n = Math.min(Number(clamp(a, BigInt(1 + rng.int(12)))), 12);
      for (let i = 0; i < n; i++) {
        if (rng.chance(0.05)) {
          await tx.write(a + BigInt(i), new Uint8Array(BLOCK_BYTES));
          m.delete(a + BigInt(i));
        } else {
          const tag = nextTag++;
          await tx.write(a + BigInt(i), blockFor(tag));
          m.set(a + BigInt(i), tag);
        }
      }
    } else if (r < 0.62) {
      const a = addr();
      const n = clamp(a, count());
      await tx.trim(a, n);
      modelTrim(m, a, n);
    } else if (r < 0.85) {
      let src = addr();
      let dst = addr();
      if (rng.chance(0.5)) {
        // Same alignment, so whole subtrees are shared.
        const align = 256n ** BigInt(1 + rng.int(2));
        src -= src % align;
        dst = dst - (dst % align) + (src % align);
      }
      let n = clamp(src, clamp(dst, count()));
      if (n > 1n << 24n && rng.chance(0.5)) n = 1n << 24n;
      await tx.copy(src, dst, n);
      modelCopy(m, src, dst, n);
      result.copies++;
    } else {
      const a = addr();
      const b = addr();
      let n = clamp(a, clamp(b, count()));
      const lo = a < b ? a : b;
      const hi = a < b ? b : a;
      if (lo + n > hi) n = hi - lo;
      if (n === 0n) return;
      await tx.exchange(a, b, n);
      modelExchange(m, a, b, n);
      result.exchanges++;
    }
  };

  /** Injected errors on (during steps) or off (checks, reopens). */
  let faultsOn = false;
  const faults = (on: boolean): void => {
    faultsOn = on;
    faulty.options.readErrorRate = on ? params.ioErrorRate : 0;
    faulty.options.writeErrorRate = on ? params.ioErrorRate / 4 : 0;
  };
  const storeFailed = (): boolean => faulty.isCrashed || (cow.grass instanceof GrassLog && cow.grass.failure !== undefined);

  const check = async (where: string): Promise<string | undefined> => {
    result.fscks++;
    const was = faultsOn;
    faults(false);
    const f = await fsckCow(cow).finally(() => faults(was));
    if (!f.ok) return `${where}: fsck found ${f.problemCount} problems: ${f.problems.slice(0, 5).join('; ')}`;
    result.maxNodes = Math.max(result.maxNodes, f.nodes);
    return undefined;
  };

  /** Everything the space maps, by tag. */
  const observe = async (): Promise<Model> => {
    const was = faultsOn;
    faults(false);
    try {
      return await observeNow();
    } finally {
      faults(was);
    }
  };
  const observeNow = async (): Promise<Model> => {
    const seen: Model = new Map();
    let from = 0n;
    for (;;) {
      const ex = await cow.extents(from, (1n << 128n) - from, 256);
      for (const e of ex) {
        for (let a = e.start; a < e.start + e.count; a++) {
          const b = await cow.read(a);
          if (b === undefined) throw new Error(`extent block ${a} reads as unmapped`);
          seen.set(a, tagOf(b));
        }
      }
      if (ex.length < 256) return seen;
      const last = ex[ex.length - 1]!;
      from = last.start + last.count;
    }
  };

  const equal = (a: Model, b: Model): boolean => a.size === b.size && [...a].every(([k, v]) => b.get(k) === v);

  for (let cycle = 0; cycle < params.crashes; cycle++) {
    const steps = 1 + rng.int(params.stepsPerCrash * 2);
    faulty.options.crashAtOp = rng.chance(0.6) ? faulty.mutatingOpCount + 1 + rng.int(steps * 3) : 0;
    faults(true);
    let dead = false;
    for (let step = 0; step < steps && !dead; step++) {
      result.steps++;
      const r = rng.float();
      /** Set when a failed operation's own state was added to history as a possible outcome. */
      let maybe = false;
      try {
        if (r < 0.1) {
          // A write outside a transaction, of one block or a run: mostly overwrites of mapped
          // blocks (Cow's fast path when nothing shares them), atomic either way.
          const keys = [...model.keys()];
          const a = keys.length > 0 && rng.chance(0.8) ? keys[rng.int(keys.length)]! : addr();
          const n = rng.chance(0.5) ? 1 : Math.min(Number(clamp(a, BigInt(1 + rng.int(12)))), 12);
          const data = new Uint8Array(n * BLOCK_BYTES);
          const m = new Map(model);
          for (let i = 0; i < n; i++) {
            if (rng.chance(0.03)) {
              m.delete(a + BigInt(i));
            } else {
              const tag = nextTag++;
              data.set(blockFor(tag), i * BLOCK_BYTES);
              m.set(a + BigInt(i), tag);
            }
          }
          const fastBefore = cow.stats().fastWrites;
          try {
            if (n === 1) await cow.write(a, data);
            else await cow.writeBlocks(a, data);
          } catch (e) {
            if (isFault(e) || faulty.isCrashed) {
              history.push(m);
              maybe = true;
            }
            throw e;
          }
          model = m;
          history.push(new Map(model));
          result.directWrites++;
          result.fastWrites += cow.stats().fastWrites - fastBefore;
          result.maxMapped = Math.max(result.maxMapped, model.size);
        } else if (r < 0.7) {
          // A transaction of one or several operations; some abort.
          const ops = rng.chance(0.6) ? 1 : 2 + rng.int(4);
          const abort = rng.chance(0.08);
          const m = new Map(model);
          try {
            await cow.transaction(async (tx) => {
              for (let i = 0; i < ops; i++) await randomOp(tx, m);
              // Reads inside the transaction see its own writes.
              for (const [a, t] of [...m].slice(-3)) {
                const b = await tx.read(a);
                if (b === undefined || tagOf(b) !== t) throw new Error(`read of ${a} inside a transaction returned ${b === undefined ? 'nothing' : tagOf(b)}, expected ${t}`);
              }
              if (abort) throw new AbortSim();
            });
            model = m;
            history.push(new Map(model));
            result.transactions++;
            result.maxMapped = Math.max(result.maxMapped, model.size);
          } catch (e) {
            if (!(e instanceof AbortSim)) {
              // A transaction cut short by the crash may still have reached the store whole
              // (its batch was appended before the failure): the last state may be either.
              if (isFault(e) || faulty.isCrashed) {
                history.push(m);
                maybe = true;
              }
              throw e;
            }
            result.aborted++;
          }
        } else if (r < 0.8) {
          const covered = history.length - 1;
          await cow.flush();
          history = history.slice(covered);
        } else if (r < 0.83) {
          await cow.reap();
        } else {
          // Reads: a few mapped and a few random addresses.
          const keys = [...model.keys()];
          for (let i = 0; i < 4; i++) {
            const a = i < 2 && keys.length > 0 ? keys[rng.int(keys.length)]! : addr();
            const b = await cow.read(a);
            const want = model.get(a);
            if ((b === undefined ? undefined : tagOf(b)) !== want) return fail(`cycle ${cycle} step ${step}: read of ${a} gave ${b === undefined ? 'nothing' : tagOf(b)}, model has ${want}`);
            result.readsChecked++;
          }
        }
        if (params.fsckEveryStep) {
          const bad = await check(`cycle ${cycle} step ${step}`);
          // A crash, or a store an injected write error stopped (the cleaner runs in the
          // background), makes fsck's reads fail: not a finding.
          if (bad !== undefined && !storeFailed()) return fail(bad);
        }
      } catch (e) {
        if (isFault(e) && !storeFailed()) {
          // An injected read error failed this operation and left the store running: the
          // operation must have changed nothing, and the store must be whole.
          if (maybe) history.pop();
          result.failedOps++;
          const bad = await check(`cycle ${cycle} step ${step} after a failed operation (${(e as Error).message})`);
          if (bad !== undefined && !storeFailed()) return fail(bad);
          if (storeFailed()) {
            dead = true;
            break;
          }
          if (!equal(await observe(), model)) return fail(`cycle ${cycle} step ${step}: an operation that failed (${(e as Error).message}) changed the space`);
          continue;
        }
        if (isFault(e) || storeFailed()) {
          if (!faulty.isCrashed) result.storeFailures++;
          dead = true;
          break;
        }
        return fail(`cycle ${cycle} step ${step}: unexpected error ${(e as Error).stack}`);
      }
      if (faulty.isCrashed) dead = true;
    }
    faults(false);
    if (!faulty.isCrashed) await faulty.crash();
    result.crashes++;
    // Reopen on the crash image.
    faulty = new FaultySegmentStore(inner, { seed: rng.u32(), crashAtOp: 0 });
    try {
      cow = await CowStore.open(await GrassLog.open(faulty, { backgroundCleaner: true }), cowOptions);
    } catch (e) {
      return fail(`cycle ${cycle}: reopen failed: ${(e as Error).stack}`);
    }
    const bad = await check(`cycle ${cycle} after reopen`);
    if (bad !== undefined) return fail(bad);
    const seen = await observe();
    let k = -1;
    for (let i = history.length - 1; i >= 0; i--) {
      if (equal(seen, history[i]!)) {
        k = i;
        break;
      }
    }
    if (k < 0) return fail(`cycle ${cycle}: after reopen the space (${seen.size} blocks) is not the state after any of the ${history.length - 1} transactions since the last flush`);
    result.unflushedSurvived += k;
    result.unflushedLost += history.length - 1 - k;
    log(`cycle ${cycle}: ${steps} steps; recovered ${k} of ${history.length - 1} unflushed transactions; ${history[k]!.size} blocks mapped`);
    model = history[k]!;
    history = [new Map(model)];
  }
  const bad = await check('end');
  if (bad !== undefined) return fail(bad);
  await cow.close();
  return result;
}

class AbortSim extends Error {}

function isFault(e: unknown): boolean {
  const code = (e as { code?: string } | undefined)?.code;
  const name = (e as { name?: string } | undefined)?.name;
  // A store failure counts only if a fault caused it: one from a bug (an assertion, say) is a finding.
  if (name === 'StoreFailedError') return isFault((e as { cause?: unknown }).cause);
  return code === 'ECRASHED' || name === 'CrashedError' || name === 'InjectedError';
}

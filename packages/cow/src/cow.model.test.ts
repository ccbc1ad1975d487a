/**
 * The model-based crash test for Cow (see simulator.ts): random writes, trims, copies and
 * exchanges over overlapping and huge sparse ranges, in transactions, with crashes on the
 * fault-injecting store and reopen; fsck after every step. Each run prints its seed; replay one
 * with `pnpm pasture sim cow --seed N` (add --io-error-rate 0.02 for the variant with I/O errors). PASTURE_SEED fixes the first seed; PASTURE_SIM_CRASHES
 * scales the run.
 */
import test from 'ava';
import { Rng } from '@pasture/grass';
import { defaultCowSimParams, runCowSimulation } from './simulator.ts';

const base = Rng.seedFromEnv();
const crashes = Number(process.env.PASTURE_SIM_CRASHES ?? 60);

const variants = [
  { name: 'reaping by hand', backgroundReaper: false },
  { name: 'background reaper', backgroundReaper: true },
  { name: 'small segments, busy cleaner', backgroundReaper: true, segmentBytes: 128 * 1024, segmentCount: 160 },
  { name: 'injected I/O errors', backgroundReaper: true, ioErrorRate: 0.02, crashes: Math.max(1, Math.round(crashes / 2)) },
];

for (const [i, v] of variants.entries()) {
  test(`crash simulator: ${v.name}`, async (t) => {
    const seed = (base + i * 7919) >>> 0;
    const params = { ...defaultCowSimParams(seed), crashes, ...v };
    t.log(`seed ${seed}: ${JSON.stringify(params)}`);
    const r = await runCowSimulation(params);
    t.log(`${r.crashes} crashes, ${r.steps} steps, ${r.transactions} transactions (${r.aborted} aborted), ${r.directWrites} direct writes (${r.fastWrites} on the fast path), ${r.copies} copies, ${r.exchanges} exchanges, ${r.readsChecked} reads checked, ${r.fscks} fscks; unflushed transactions kept ${r.unflushedSurvived}, lost ${r.unflushedLost}; up to ${r.maxMapped} blocks and ${r.maxNodes} nodes; ${r.failedOps} operations failed by I/O errors, ${r.storeFailures} store failures`);
    t.true(r.ok, r.failure);
    t.is(r.crashes, params.crashes);
    // The run exercised what it claims: sharing ops, aborts, and crashes that both lose and keep unflushed work.
    t.true(r.copies > 0 && r.exchanges > 0 && r.aborted > 0);
    t.true(r.fastWrites > 0 && r.fastWrites < r.directWrites, `${r.fastWrites} of ${r.directWrites} direct writes on the fast path`);
    t.true(r.unflushedLost > 0 && r.unflushedSurvived > 0);
    // Operations failed by a read error, each then checked to have changed nothing.
    if (params.ioErrorRate > 0) t.true(r.failedOps > 0, `${r.failedOps} operations failed, ${r.storeFailures} store failures`);
  });
}

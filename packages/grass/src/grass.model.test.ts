/**
 * The model-based crash test: seeded random workloads with crashes at random points and
 * reopen, checked against the durability contract (see simulator.ts). Each run prints its
 * seed; replay one with `pnpm pasture sim grass --seed N --crashes M`.
 * PASTURE_SEED fixes the first seed; PASTURE_SIM_CRASHES scales the run.
 */
import test from 'ava';
import { defaultSimParams, runSimulation } from './simulator.ts';
import { Rng } from './rng.ts';

const base = Rng.seedFromEnv();
const crashesPerRun = Number(process.env.PASTURE_SIM_CRASHES ?? 400);

const variants = [
  { name: 'sepbit, two cleaner streams', policy: 'sepbit', segmentCount: 48, addresses: 400, ioErrorRate: 0 },
  { name: 'cost-benefit, small segments', policy: 'cost-benefit', segmentCount: 48, addresses: 400, ioErrorRate: 0 },
  { name: 'greedy, tight store', policy: 'greedy', segmentCount: 40, addresses: 500, ioErrorRate: 0 },
  { name: 'cost-benefit, sparse addresses', policy: 'cost-benefit', segmentCount: 64, addresses: 2500, ioErrorRate: 0 },
  { name: 'greedy, with injected EIO', policy: 'greedy', segmentCount: 48, addresses: 400, ioErrorRate: 0.01 },
];

for (const [i, v] of variants.entries()) {
  test(`crash simulator: ${v.name}`, async (t) => {
    const seed = (base + i * 7919) >>> 0;
    const params = { ...defaultSimParams(seed), crashes: crashesPerRun, policy: v.policy, segmentCount: v.segmentCount, addresses: v.addresses, ioErrorRate: v.ioErrorRate };
    t.log(`seed ${seed}: ${JSON.stringify(params)}`);
    const r = await runSimulation(params);
    t.log(`${r.crashes} crashes, ${r.steps} steps, ${r.batches} batches, ${r.readsChecked} reads checked, ${r.cleanerRecords} records cleaned, ${r.deadSegmentsFreed} dead segments freed without cleaning, ${r.checkpoints} checkpoints, ${r.noSpace} batches refused for ENOSPC; unflushed batches kept ${r.unflushedSurvived}, lost ${r.unflushedLost}`);
    t.true(r.ok, r.failure);
    t.is(r.reopenChecks, params.crashes);
    // The run must have exercised what it claims to: crashes that lose unflushed work and keep
    // some, and a cleaner that moved records.
    t.true(r.unflushedLost > 0 && r.unflushedSurvived > 0);
    t.true(r.cleanerRecords > 0);
  });
}

/**
 * Cleaner policies: which sealed segments the cleaner empties first, and into which output
 * stream it writes their live records. A policy is pure: it sees a SegmentInfo and the user
 * clock (user bytes written so far), never the store.
 */
export interface SegmentInfo {
  slot: number;
  /** Log stream that wrote the segment (STREAM_USER, STREAM_META or a GC stream). */
  stream: number;
  /** Bytes of records still live in it (data and metadata). */
  liveBytes: number;
  /** Bytes a segment can hold for records. */
  usableBytes: number;
  /** User clock when the segment was opened and sealed. */
  openClock: number;
  sealClock: number;
}

/** What the cleaner knows of one live record it is about to move. */
export interface RecordInfo {
  /** User-clock bytes since a user last wrote this address (Infinity if not since open). */
  sinceWrite: number;
  /** How long the version before the current one lived, in user-clock bytes (Infinity if unknown). */
  prevLifespan: number;
}

export interface CleanerContext {
  /** User clock now (user bytes written). */
  now: number;
  /** Mean lifespan (reclaim time minus open time) of recently cleaned user-stream segments. */
  userSegmentLifespan: number;
}

/** Stream numbers a policy sees in SegmentInfo.stream. */
export const USER_STREAM = 0;
export const FIRST_GC_STREAM = 2;

export interface CleanerPolicy {
  readonly name: string;
  readonly description: string;
  /** How many cleaner output streams it uses (1 .. MAX_GC_STREAMS). */
  readonly gcStreams: number;
  /** Victim score: higher is cleaned first. */
  score(seg: SegmentInfo, now: number): number;
  /** Output stream, 0 .. gcStreams-1, for one live record of `victim`. */
  outputStream(victim: SegmentInfo, record: RecordInfo, ctx: CleanerContext): number;
}

const utilization = (s: SegmentInfo): number => Math.min(1, s.liveBytes / s.usableBytes);

/** Greedy: the emptiest segment first. Optimal for uniform random writes. */
export const greedy: CleanerPolicy = {
  name: 'greedy',
  description: 'emptiest segment first; one output stream',
  gcStreams: 1,
  score: (s) => 1 - utilization(s),
  outputStream: () => 0,
};

/**
 * Cost-benefit (Sprite LFS): benefit/cost = (1-u) * age / (1+u), with age the user clock
 * since the segment was sealed. Cleaner output kept apart from user writes.
 */
export const costBenefit: CleanerPolicy = {
  name: 'cost-benefit',
  description: 'Sprite LFS (1-u)*age/(1+u); cleaner output separate from user writes',
  gcStreams: 1,
  score: (s, now) => {
    const u = utilization(s);
    return ((1 - u) * Math.max(1, now - s.sealClock)) / (1 + u);
  },
  outputStream: () => 0,
};

/**
 * Lifespan-separated cost-benefit ("deferred SepBIT"), the policy for skewed workloads.
 * User writes stay in one ordered log; the separation happens at their first cleaning:
 * - a record from a user segment goes to the hot cleaner stream if the version it replaced
 *   lived less than 3x the recent user-segment lifespan (it is being rewritten often), else
 *   to the cold stream; a record in the hot stream that has not been rewritten for 4x that
 *   lifespan moves to the cold stream;
 * - victims by (1-u)/u x age, which favours emptier segments more than LFS's (1-u)/(1+u).
 * Simulated on 90/10 hot/cold at 80% utilization: WA 1.60 against 1.94 for LFS cost-benefit
 * with separate cleaner output and 3.2 for greedy (the study is summarized in the README).
 */
export const sepbit: CleanerPolicy = {
  name: 'sepbit',
  description: 'cost-benefit (1-u)/u*age with hot/cold cleaner streams split by record lifespan (deferred SepBIT)',
  gcStreams: 2,
  score: (s, now) => {
    const u = utilization(s);
    return ((1 - u) / Math.max(u, 1e-9)) * Math.max(1, now - s.sealClock);
  },
  outputStream: (victim, record, ctx) => {
    const HOT = 0;
    const COLD = 1;
    const l = ctx.userSegmentLifespan;
    if (victim.stream === USER_STREAM) return record.prevLifespan < 3 * l ? HOT : COLD;
    if (victim.stream === FIRST_GC_STREAM + HOT) return record.sinceWrite < 4 * l ? HOT : COLD;
    return COLD;
  },
};

export const POLICIES: readonly CleanerPolicy[] = [greedy, costBenefit, sepbit];

export function policyByName(name: string): CleanerPolicy | undefined {
  return POLICIES.find((p) => p.name === name);
}

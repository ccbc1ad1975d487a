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

export interface CleanerPolicy {
  readonly name: string;
  readonly description: string;
  /** How many cleaner output streams it uses (1 .. MAX_GC_STREAMS). */
  readonly gcStreams: number;
  /** Victim score: higher is cleaned first. */
  score(seg: SegmentInfo, now: number): number;
  /** Output stream, 0 .. gcStreams-1, for the live records of `victim`. */
  outputStream(victim: SegmentInfo, now: number): number;
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

export const POLICIES: readonly CleanerPolicy[] = [greedy, costBenefit];

export function policyByName(name: string): CleanerPolicy | undefined {
  return POLICIES.find((p) => p.name === name);
}

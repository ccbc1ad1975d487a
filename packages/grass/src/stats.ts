/** Counters and reports of a Grass instance (seed 003: statistics from day one). */

export interface GrassStats {
  segmentBytes: number;
  segmentCount: number;
  freeSegments: number;
  openSegments: number;
  sealedSegments: number;
  /** Cleaned, waiting for a sync or checkpoint before reuse. */
  pendingFreeSegments: number;
  /** Free segments held back for the cleaner and checkpoints. */
  reserveSegments: number;
  liveRecords: number;
  /** Bytes of live data records, headers included. */
  liveBytes: number;
  /**
   * Log bytes live records (with their summary entries, and the checkpoint's map pages) may
   * take before batches that add bytes get NoSpaceError: maxLiveShare of the segments outside
   * the reserve.
   */
  liveLimitBytes: number;
  /** What admission measures against liveLimitBytes, in the same units (liveBytes does not count summary entries or map pages). */
  liveLogBytes: number;
  userRecords: number;
  /** Bytes users appended: record headers and payloads, trims included. */
  userBytes: number;
  userPayloadBytes: number;
  trims: number;
  batches: number;
  cleanerRecords: number;
  /** Bytes the cleaner copied (headers and payloads). */
  cleanerBytes: number;
  cleanerReadBytes: number;
  /** Bytes of checkpoint records (map pages, body chunks, roots). */
  checkpointBytes: number;
  checkpoints: number;
  /** (userBytes + cleanerBytes) / userBytes; checkpoint bytes are reported apart. */
  writeAmplification: number;
  cleanerRounds: number;
  segmentsCleaned: number;
  /** Segments freed with nothing live in them, without a cleaning round (a whole region was rewritten or trimmed). */
  deadSegmentsFreed: number;
  foregroundCleans: number;
  damagedSegments: number;
  flushes: number;
  syncs: number;
  reads: number;
  readBytes: number;
  corruptReads: number;
  noSpaceErrors: number;
  mapMemoryBytes: number;
  /** Sealed segments by utilization: bucket i counts u in [i/10, (i+1)/10), the last includes 1. */
  utilizationHistogram: number[];
  policy: string;
  generation: number;
}

export interface StreamRecovery {
  stream: number;
  segments: number;
  records: number;
  droppedRecords: number;
  droppedBytes: number;
  /** Where and why the stream's log ended. */
  end: string;
}

export interface RecoveryReport {
  checkpointGeneration: number;
  streams: StreamRecovery[];
  /** Everything recovery found wrong, in words. */
  problems: string[];
  replayedRecords: number;
  droppedRecords: number;
  droppedBytes: number;
  /** Sealed segments of a checkpoint the crash cut short, free at once. */
  abandonedCheckpointSegments: number;
  /** Segments the open cleaned free to bring the reserve back (crashes had eaten into it). */
  freedAtOpen: number;
  millis: number;
}

export function utilizationHistogram(utils: readonly number[]): number[] {
  const h = new Array<number>(10).fill(0);
  for (const u of utils) h[Math.min(9, Math.max(0, Math.floor(u * 10)))]!++;
  return h;
}

/**
 * Typed errors of the Grass layer. Each carries a stable `code` so that layers above
 * (and the NBD server) can map it to a protocol error without string matching.
 */
export class GrassError extends Error {
  override name = 'GrassError';
  readonly code: string = 'EGRASS';
}

/** A checksum, magic or bound check failed: the bytes on storage are not what was written. */
export class CorruptionError extends GrassError {
  override name = 'CorruptionError';
  override readonly code = 'EIO';
  constructor(
    readonly where: { segment: number; offset: number },
    readonly reason: string,
  ) {
    super(`corrupt data in segment ${where.segment} at offset ${where.offset}: ${reason}`);
  }
}

/** The store has no room for the write, even after cleaning. Freeing space makes it usable again. */
export class NoSpaceError extends GrassError {
  override name = 'NoSpaceError';
  override readonly code = 'ENOSPC';
}

/** Bad arguments from the caller: out-of-range address, oversized record, bad option. */
export class InvalidArgumentError extends GrassError {
  override name = 'InvalidArgumentError';
  override readonly code = 'EINVAL';
}

/** The store is held by another writer (second process, or a second open in this one). */
export class StoreLockedError extends GrassError {
  override name = 'StoreLockedError';
  override readonly code = 'EBUSY';
}

/** The instance was closed, or failed and must be reopened. */
export class ClosedError extends GrassError {
  override name = 'ClosedError';
  override readonly code = 'ESHUTDOWN';
}

/**
 * A write or sync to storage failed. Dirty data may have been lost by the storage below
 * (as after a failed fsync), so the instance refuses further writes and flushes until it is
 * reopened and recovered; reads keep working.
 */
export class StoreFailedError extends GrassError {
  override name = 'StoreFailedError';
  override readonly code = 'EIO';
  constructor(override readonly cause: unknown) {
    super(`the segment store failed; reopen to recover: ${cause instanceof Error ? cause.message : String(cause)}`);
  }
}

/** Opening a store whose format this code does not understand. */
export class FormatError extends GrassError {
  override name = 'FormatError';
  override readonly code = 'EINVAL';
}

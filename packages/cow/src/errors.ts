/**
 * Typed errors of the Cow layer, each with a stable `code` that the layers above (and the NBD
 * server) map to their own errors. Grass's errors (EIO, ENOSPC, ...) pass through unchanged.
 */
export class CowError extends Error {
  override name = 'CowError';
  readonly code: string = 'ECOW';
}

/** A metadata record is not what Cow wrote: wrong kind, version, layout or bounds. Never wrong data. */
export class CowCorruptionError extends CowError {
  override name = 'CowCorruptionError';
  override readonly code = 'EIO';
}

/** Bad arguments: an address outside the 128-bit space, a block that is not 4096 bytes, overlapping exchange ranges. */
export class CowInvalidArgumentError extends CowError {
  override name = 'CowInvalidArgumentError';
  override readonly code = 'EINVAL';
}

/** A transaction would exceed a limit (Grass's batch size, the graveyard, a refcount). Nothing was applied. */
export class CowTooLargeError extends CowError {
  override name = 'CowTooLargeError';
  override readonly code = 'EFBIG';
}

/** The Cow store was closed, or failed and must be reopened. */
export class CowClosedError extends CowError {
  override name = 'CowClosedError';
  override readonly code = 'ESHUTDOWN';
}

/** The Grass store holds no Cow superblock (not created with Cow.create). */
export class NotACowStoreError extends CowError {
  override name = 'NotACowStoreError';
  override readonly code = 'EINVAL';
}

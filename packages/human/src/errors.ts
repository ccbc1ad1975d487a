/**
 * Typed errors of the Human layer, each with a stable `code` (errno names) that the CLI and
 * the NBD server map to their own errors. Cow's and Grass's errors pass through unchanged.
 */
export class HumanError extends Error {
  override name = 'HumanError';
  readonly code: string = 'EHUMAN';
}

/** No volume or snapshot by that name. */
export class NotFoundError extends HumanError {
  override name = 'NotFoundError';
  override readonly code = 'ENOENT';
}

/** The name is taken. */
export class ExistsError extends HumanError {
  override name = 'ExistsError';
  override readonly code = 'EEXIST';
}

/** Bad arguments: a malformed name, an I/O range past the end, a size out of range. */
export class InvalidArgumentError extends HumanError {
  override name = 'InvalidArgumentError';
  override readonly code = 'EINVAL';
}

/** The operation would break something that depends on the target: clones, protection, open handles, data past a shrink. */
export class BusyError extends HumanError {
  override name = 'BusyError';
  override readonly code = 'EBUSY';
}

/** Writing to a snapshot, or to a pool opened read-only. */
export class ReadOnlyError extends HumanError {
  override name = 'ReadOnlyError';
  override readonly code = 'EROFS';
}

/** The catalog read back from the store is not valid (zod said why). */
export class CatalogError extends HumanError {
  override name = 'CatalogError';
  override readonly code = 'EIO';
}

/** The pool or image was closed. */
export class ClosedError extends HumanError {
  override name = 'ClosedError';
  override readonly code = 'ESHUTDOWN';
}

/**
 * Assertions stay on in production (TigerBeetle style): a failed assertion is a bug in
 * Pasture, never bad input. Bad input gets a typed error from errors.ts instead.
 */
export class AssertionError extends Error {
  override name = 'AssertionError';
}

export function assert(condition: unknown, message = 'assertion failed'): asserts condition {
  if (!condition) throw new AssertionError(message);
}

/** A safe integer in [min, max]: Grass addresses, offsets and lengths are all of this kind. */
export function assertSafeInt(value: number, min: number, max: number, what: string): void {
  if (!Number.isSafeInteger(value) || value < min || value > max) {
    throw new AssertionError(`${what} must be an integer in [${min}, ${max}], got ${value}`);
  }
}

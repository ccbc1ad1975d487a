/**
 * Assertions stay on in production: a failed assertion is a bug in Cow, never bad input.
 * Bad input gets a typed error from errors.ts instead.
 */
export class AssertionError extends Error {
  override name = 'AssertionError';
}

export function assert(condition: unknown, message = 'assertion failed'): asserts condition {
  if (!condition) throw new AssertionError(message);
}

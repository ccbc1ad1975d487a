/**
 * Typed errors of the NBD server, and the one place device errors become NBD error values.
 * None of these ever escapes the server: a protocol error ends one connection, a device error
 * becomes an error reply to one request.
 */
import { NBD_EINVAL, NBD_EIO, NBD_ENOMEM, NBD_ENOSPC, NBD_ENOTSUP, NBD_EOVERFLOW, NBD_EPERM, NBD_ESHUTDOWN } from './protocol.ts';

export class NbdError extends Error {
  override name = 'NbdError';
}

/** The peer broke the protocol (bad magic, bad flags, impossible lengths): hard disconnect. */
export class NbdProtocolError extends NbdError {
  override name = 'NbdProtocolError';
}

/** The peer closed the connection (or it was reset) before a read was satisfied. */
export class ConnectionClosedError extends NbdError {
  override name = 'ConnectionClosedError';
  /** `partialBytes`: bytes of the awaited read that did arrive (0: the peer stopped between reads). */
  constructor(readonly partialBytes: number, message = 'connection closed') {
    super(message);
  }
}

/** The server stopped reading this connection (close(), or a handshake timeout). */
export class ConnectionAbortedError extends NbdError {
  override name = 'ConnectionAbortedError';
}

/**
 * An error a request handler raises on purpose, with the NBD error value to reply with
 * (EINVAL for a bad range, EPERM for a write to a read-only export, ...).
 */
export class RequestError extends NbdError {
  override name = 'RequestError';
  constructor(readonly errno: number, message: string) {
    super(message);
  }
}

/**
 * The errno `code`s a device may throw (Node's `err.code`, or the Pasture layers' typed errors)
 * and the NBD error value each becomes. EDQUOT and EFBIG become ENOSPC as the spec asks;
 * EROFS and EACCES become EPERM. Anything else, or no code at all, is EIO.
 */
const ERRNO_BY_CODE: Readonly<Record<string, number>> = {
  EIO: NBD_EIO,
  ENOSPC: NBD_ENOSPC,
  EDQUOT: NBD_ENOSPC,
  EFBIG: NBD_ENOSPC,
  EINVAL: NBD_EINVAL,
  EPERM: NBD_EPERM,
  EROFS: NBD_EPERM,
  EACCES: NBD_EPERM,
  ENOMEM: NBD_ENOMEM,
  EOVERFLOW: NBD_EOVERFLOW,
  ESHUTDOWN: NBD_ESHUTDOWN,
};

/** The NBD error value to reply with for anything a handler or device threw. */
export function nbdErrnoOf(err: unknown): number {
  if (err instanceof RequestError) return err.errno;
  const code = typeof err === 'object' && err !== null && 'code' in err ? (err as { code: unknown }).code : undefined;
  if (typeof code === 'string') return ERRNO_BY_CODE[code] ?? NBD_EIO;
  return NBD_EIO;
}

/** Names of the NBD error values, for logs and messages. */
export const ERRNO_NAMES: Readonly<Record<number, string>> = {
  [NBD_EPERM]: 'EPERM',
  [NBD_EIO]: 'EIO',
  [NBD_ENOMEM]: 'ENOMEM',
  [NBD_EINVAL]: 'EINVAL',
  [NBD_ENOSPC]: 'ENOSPC',
  [NBD_EOVERFLOW]: 'EOVERFLOW',
  [NBD_ENOTSUP]: 'ENOTSUP',
  [NBD_ESHUTDOWN]: 'ESHUTDOWN',
};

export function messageOf(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

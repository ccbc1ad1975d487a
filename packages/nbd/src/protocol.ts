/**
 * The NBD wire format: every magic number, flag, option, reply and command this server
 * speaks, each with a one-line meaning. All integers on the wire are big-endian. Names follow
 * /work/shared/reference/nbd-proto.md (and the Linux `nbd.h`) so they can be grepped for.
 * Nothing here does I/O.
 */

// ---- Handshake (fixed newstyle) ----

/** 'NBDMAGIC': first 8 bytes the server sends, in every handshake style. */
export const NBDMAGIC = 0x4e42444d41474943n;
/** 'IHAVEOPT': the server's second magic (newstyle), and the prefix of every client option. */
export const IHAVEOPT = 0x49484156454f5054n;
/** Prefix of every option reply the server sends during option haggling. */
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;

/** Handshake flags (16 bits, server to client). */
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0; // the server speaks fixed newstyle
export const NBD_FLAG_NO_ZEROES = 1 << 1; // the server can omit the 124 zero bytes after EXPORT_NAME

/** Client flags (32 bits, client to server). Any other bit set: the server drops the connection. */
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;
export const KNOWN_CLIENT_FLAGS = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;

/** Options (32 bits) a client sends during option haggling. */
export const NBD_OPT_EXPORT_NAME = 1; // pick an export and enter transmission; cannot fail politely
export const NBD_OPT_ABORT = 2; // soft disconnect during haggling
export const NBD_OPT_LIST = 3; // one NBD_REP_SERVER per export, then ACK
export const NBD_OPT_STARTTLS = 5; // upgrade this connection to TLS in place
export const NBD_OPT_INFO = 6; // describe an export without entering transmission
export const NBD_OPT_GO = 7; // describe an export and enter transmission
export const NBD_OPT_STRUCTURED_REPLY = 8; // use structured replies in transmission
export const NBD_OPT_LIST_META_CONTEXT = 9; // which metadata contexts a query matches
export const NBD_OPT_SET_META_CONTEXT = 10; // select metadata contexts for BLOCK_STATUS

/** Option reply types (32 bits). Errors have bit 31 set and may carry a message. */
export const NBD_REP_ACK = 1; // done, no data
export const NBD_REP_SERVER = 2; // one export: u32 name length, name, description
export const NBD_REP_INFO = 3; // u16 info type, then its payload
export const NBD_REP_META_CONTEXT = 4; // u32 context id, context name
export const NBD_REP_FLAG_ERROR = 0x80000000;
export const NBD_REP_ERR_UNSUP = NBD_REP_FLAG_ERROR + 1; // unknown option
export const NBD_REP_ERR_POLICY = NBD_REP_FLAG_ERROR + 2; // known, valid, but not allowed here
export const NBD_REP_ERR_INVALID = NBD_REP_FLAG_ERROR + 3; // malformed or out of sequence
export const NBD_REP_ERR_PLATFORM = NBD_REP_FLAG_ERROR + 4; // not supported on this build
export const NBD_REP_ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5; // start TLS first
export const NBD_REP_ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6; // no such export
export const NBD_REP_ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7; // the server is stopping
export const NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR + 8; // ask for NBD_INFO_BLOCK_SIZE first
export const NBD_REP_ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9; // request or reply too large

/** Information types in NBD_OPT_INFO / NBD_OPT_GO requests and NBD_REP_INFO replies (16 bits). */
export const NBD_INFO_EXPORT = 0; // u64 size, u16 transmission flags (mandatory)
export const NBD_INFO_NAME = 1; // canonical export name
export const NBD_INFO_DESCRIPTION = 2; // human-readable description
export const NBD_INFO_BLOCK_SIZE = 3; // u32 minimum, u32 preferred, u32 maximum payload

/** Transmission flags (16 bits), sent with the export's size when entering transmission. */
export const NBD_FLAG_HAS_FLAGS = 1 << 0; // always set
export const NBD_FLAG_READ_ONLY = 1 << 1; // writes, trims and zeroes fail with EPERM
export const NBD_FLAG_SEND_FLUSH = 1 << 2; // NBD_CMD_FLUSH understood
export const NBD_FLAG_SEND_FUA = 1 << 3; // NBD_CMD_FLAG_FUA understood
export const NBD_FLAG_ROTATIONAL = 1 << 4; // never set by this server
export const NBD_FLAG_SEND_TRIM = 1 << 5; // NBD_CMD_TRIM understood
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6; // NBD_CMD_WRITE_ZEROES and NBD_CMD_FLAG_NO_HOLE understood
export const NBD_FLAG_SEND_DF = 1 << 7; // NBD_CMD_FLAG_DF understood (structured replies only)
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8; // flush and FUA cover every connection to the export
export const NBD_FLAG_SEND_CACHE = 1 << 10; // NBD_CMD_CACHE understood
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11; // NBD_CMD_FLAG_FAST_ZERO understood

/** Size of the zero padding after an NBD_OPT_EXPORT_NAME reply, unless NO_ZEROES was agreed. */
export const EXPORT_NAME_PADDING_BYTES = 124;

// ---- Transmission ----

/** Request: u32 magic, u16 command flags, u16 type, u64 cookie, u64 offset, u32 length. */
export const NBD_REQUEST_MAGIC = 0x25609513;
export const REQUEST_HEADER_BYTES = 28;
/** Simple reply: u32 magic, u32 error, u64 cookie (then the data of a successful simple read). */
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const SIMPLE_REPLY_HEADER_BYTES = 16;
/** Structured reply chunk: u32 magic, u16 flags, u16 type, u64 cookie, u32 payload length. */
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;
export const STRUCTURED_REPLY_HEADER_BYTES = 20;

/** Commands (16 bits). */
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1; // followed by `length` bytes of payload
export const NBD_CMD_DISC = 2; // soft disconnect: finish what is in flight, then close; no reply
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

/** Lower-case command names, used in stats and logs. */
export const COMMAND_NAMES: Readonly<Record<number, string>> = {
  [NBD_CMD_READ]: 'read',
  [NBD_CMD_WRITE]: 'write',
  [NBD_CMD_DISC]: 'disc',
  [NBD_CMD_FLUSH]: 'flush',
  [NBD_CMD_TRIM]: 'trim',
  [NBD_CMD_CACHE]: 'cache',
  [NBD_CMD_WRITE_ZEROES]: 'write_zeroes',
  [NBD_CMD_BLOCK_STATUS]: 'block_status',
};

/** Command flags (16 bits). */
export const NBD_CMD_FLAG_FUA = 1 << 0; // durable before the reply; accepted on every command
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1; // WRITE_ZEROES: allocate, do not punch a hole
export const NBD_CMD_FLAG_DF = 1 << 2; // READ: at most one content chunk
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3; // BLOCK_STATUS: exactly one extent per context
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4; // WRITE_ZEROES: fail with ENOTSUP unless fast

/** Structured reply flags and chunk types. */
export const NBD_REPLY_FLAG_DONE = 1 << 0; // the last chunk of this reply
export const NBD_REPLY_TYPE_NONE = 0; // empty final chunk
export const NBD_REPLY_TYPE_OFFSET_DATA = 1; // u64 offset, data
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2; // u64 offset, u32 hole size (not sent by this server)
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5; // u32 context id, then (u32 length, u32 flags) extents
export const NBD_REPLY_TYPE_ERROR = (1 << 15) + 1; // u32 error, u16 message length, message
export const NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2; // as ERROR, then u64 offset

/** base:allocation extent flags. */
export const NBD_STATE_HOLE = 1 << 0; // not allocated
export const NBD_STATE_ZERO = 1 << 1; // reads as zeros

/** The one metadata context this server offers, and the id it is given (any nonzero id works). */
export const BASE_ALLOCATION = 'base:allocation';
export const BASE_ALLOCATION_ID = 1;

/** Error values (32 bits) in replies. Only these are allowed on the wire. */
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_ENOMEM = 12;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

// ---- Limits ----

/** Strings (export names, descriptions, messages, context names) MUST be no longer than this. */
export const MAX_STRING_BYTES = 4096;
/**
 * Option data larger than this is refused (NBD_REP_ERR_TOO_BIG, the data discarded unread):
 * the largest legal option is a few 4096-byte strings, so 64 KiB leaves room for many
 * meta-context queries without letting a client make the server buffer megabytes.
 */
export const MAX_OPTION_DATA_BYTES = 64 * 1024;
/**
 * The spec's bound below which a payload "SHOULD NOT be considered a denial of service". An
 * oversize write up to this length is read and discarded; a longer one ends the connection.
 */
export const DOS_PAYLOAD_BYTES = 1 << 25;
/** Block status descriptors per reply chunk; the spec says SHOULD NOT exceed 2^20, we stop at 2^16 (512 KiB). */
export const MAX_BLOCK_STATUS_EXTENTS = 1 << 16;
/** Largest block status chunk payload: u32 context id plus the descriptors. */
export const MAX_BLOCK_STATUS_REPLY_BYTES = 4 + 8 * MAX_BLOCK_STATUS_EXTENTS;
/** Error messages sent in NBD_REPLY_TYPE_ERROR are cut to this many bytes. */
export const MAX_ERROR_MESSAGE_BYTES = 256;

function check(condition: boolean, what: string): void {
  if (!condition) throw new Error(`nbd protocol constants: ${what}`);
}
check(KNOWN_CLIENT_FLAGS === 3, 'client flags are bits 0 and 1');
check(REQUEST_HEADER_BYTES === 4 + 2 + 2 + 8 + 8 + 4, 'request header layout');
check(SIMPLE_REPLY_HEADER_BYTES === 4 + 4 + 8, 'simple reply header layout');
check(STRUCTURED_REPLY_HEADER_BYTES === 4 + 2 + 2 + 8 + 4, 'structured reply header layout');
check(MAX_OPTION_DATA_BYTES > 3 * MAX_STRING_BYTES, 'an option can carry a name and two queries');
check(MAX_ERROR_MESSAGE_BYTES <= MAX_STRING_BYTES, 'error messages are strings');
check(MAX_BLOCK_STATUS_EXTENTS <= 1 << 20, 'the spec bounds block status chunks at 2^20 extents');

//! Size limits shared by the codec, the router and the storage layout.
//!
//! Every limit that protects a process from a hostile or broken peer lives
//! here, with the compile-time checks that tie them together.

/// LMDB's maximum key size (the default build of liblmdb).
pub const LMDB_MAX_KEY_BYTES: usize = 511;

/// Bytes that the storage layout puts before the user's key in a collection
/// (the partition, u16 big-endian).
pub(crate) const STORED_KEY_PREFIX_BYTES: usize = 2;

/// Bytes before the user's key in the expiry index (expires_at_ms u64, collection
/// u16, partition u16): the longest prefix of any LMDB key the layout makes.
pub(crate) const EXPIRY_KEY_PREFIX_BYTES: usize = 12;

/// Longest user key that Shoal accepts: every LMDB key made of it must fit, the
/// expiry index's included.
pub const MAX_KEY_BYTES: usize = LMDB_MAX_KEY_BYTES - EXPIRY_KEY_PREFIX_BYTES;

/// Longest user key a collection can hold; stored data may have keys up to this long
/// (older versions accepted them), so decoders of stored data allow it.
pub const MAX_STORED_KEY_BYTES: usize = LMDB_MAX_KEY_BYTES - STORED_KEY_PREFIX_BYTES;

/// Most arguments a single client request may carry.
pub const MAX_REQUEST_ARGS: usize = 1024 * 1024;

/// Longest inline (telnet-style) request line.
pub const MAX_INLINE_BYTES: usize = 64 * 1024;

/// Slack above `max_value_bytes` that the RESP parser still reads, so that a
/// value a little too large gets a command error instead of a closed connection.
pub(crate) const BULK_SLACK_BYTES: usize = 64 * 1024;

/// A request may always hold this many bytes of bulk strings (several values of an MSET);
/// the limit is twice the largest bulk string if that is more.
pub(crate) const MIN_REQUEST_BYTES: usize = 256 * 1024 * 1024;

/// Largest reply a worker builds for one request (MGET, log reads); beyond it the
/// request fails with a clear error instead of exhausting memory.
pub const MAX_REPLY_BYTES: usize = 256 * 1024 * 1024;

/// Largest frame on the net-daemon ↔ shard-worker link.
pub const MAX_FRAME_BYTES: usize = 1 << 30;

/// Most bytes of stored keys and values that one `ExportPartition` reply collects before
/// it stops (it may then hold one record more). Each record counts at least 11 bytes (a
/// collection key of 2 with a value header of 9) and costs at most 14 more in the frame
/// (table tag and two lengths), so the reply is under three times this, plus its last record.
pub const MAX_EXPORT_CHUNK_BYTES: usize = 64 * 1024 * 1024;

/// Largest value the config may allow: it must fit in a frame with its key.
pub const MAX_VALUE_BYTES_LIMIT: usize = 512 * 1024 * 1024;

/// Most commands of one pipeline the net-daemon has in flight per connection.
pub const MAX_PIPELINE_IN_FLIGHT: usize = 1024;

const _: () = assert!(
    MAX_STORED_KEY_BYTES < u16::MAX as usize,
    "log entries store the key length as u16"
);
const _: () = assert!(STORED_KEY_PREFIX_BYTES <= EXPIRY_KEY_PREFIX_BYTES);
const _: () = assert!(MAX_KEY_BYTES <= MAX_STORED_KEY_BYTES);
const _: () = assert!(MAX_VALUE_BYTES_LIMIT + BULK_SLACK_BYTES + 64 * 1024 < MAX_FRAME_BYTES);
const _: () = assert!(MAX_REPLY_BYTES + MAX_VALUE_BYTES_LIMIT < MAX_FRAME_BYTES);
const _: () = assert!(
    3 * MAX_EXPORT_CHUNK_BYTES + MAX_VALUE_BYTES_LIMIT + BULK_SLACK_BYTES + 64 * 1024
        < MAX_FRAME_BYTES,
    "an export chunk and its last record fit a frame"
);
const _: () = assert!(MAX_EXPORT_CHUNK_BYTES <= u32::MAX as usize);

/// Most collections (numbered databases) a host may have.
pub const MAX_COLLECTIONS: u16 = 1024;

//! The byte layout of a shard's LMDB environment. Every stored byte is
//! encoded and decoded here and nowhere else; decoding never panics.
//!
//! All integers are big-endian, so LMDB's byte order is numeric order.
//!
//! Named database `c<N>`, one per collection N:
//! ```text
//! key   = partition u16 ++ user key (≤ MAX_KEY_BYTES)
//! value = commit_id u64 ++ flags u8 ++ [expires_at_ms u64, if flags & FLAG_EXPIRES] ++ value bytes
//! ```
//! `commit_id` is the commit that last wrote the key. `FLAG_TYPED` marks a typed key's
//! metadata record (hash, set, sorted set, list; see [`typed`]) in place of a string.
//! Other flag bits are reserved; readers reject them.
//!
//! Named database `expiry`, the index of keys with a time to live:
//! ```text
//! key   = expires_at_ms u64 ++ collection u16 ++ partition u16 ++ user key
//! value = empty
//! ```
//!
//! Named database `log`, the commit log:
//! ```text
//! key   = partition u16 ++ commit_id u64
//! value = timestamp_ms u64 ++ change_type u8 ++ collection u16 ++ expires_at_ms u64 (0: none)
//!         ++ key_len u16 ++ key ++ data
//! ```
//! `change_type` is 0b00 create, 0b01 delete, 0b10 update, 0b11 marker, 0b100 txn.
//! `data` is the new value (empty for a delete). A marker opens a primary's term and
//! changes no key: its collection is 0 and its key and data are empty. `key_len` is at
//! most `MAX_STORED_KEY_BYTES`.
//!
//! A txn entry records that the partition's part of a two-phase commit record in `txns`
//! changed, in the same transaction as the change: its key is the transaction id (u64,
//! 8 bytes), its collection and expiry are 0, and its data is the part as it is now
//! (`Intent::part`, bincode like a `txns` value) or empty when the partition's part is
//! gone (applied, aborted, forgotten). Only records whose decider is named by partition
//! (in a cluster) are logged, so that a partition's copies hold the prepared intents
//! touching it and the decisions it took; they change no key.
//!
//! Named database `txns`, multi-worker transactions this shard takes part in:
//! ```text
//! key   = txid u64
//! value = bincode 2 (serde) of `Intent`
//! ```
//! A record is the union of its parts, one per partition (`Intent::part`): on a follower
//! it is built from the txn entries of each partition's log (`replace_part`).
//!
//! Named database `meta`:
//! ```text
//! "format_version"        → u32 (FORMAT_VERSION)
//! "shard_id"              → u32
//! "layout"                → partitions u16 ++ workers u16 (as created)
//! "ids_high_water"        → u64: every id this shard's blocks cover is below it
//! "p" ++ partition u16    → last_commit_id u64 ++ mtime_ms u64 ++ trimmed_through u64
//! "fence" ++ partition u16 → empty: the partition is fenced (moving to or from another host)
//! "r" ++ partition u16    → fenced_term u64 ++ log_hold_from u64 ++ (term u64 ++ first_commit_id u64)*
//! "copy" ++ partition u16 → empty: a full copy of the partition from its primary is under way
//! ```
//! `trimmed_through` is the highest commit id that log retention has removed
//! (0 if none): the log of the partition holds every entry above it.
//!
//! The `"r"` entry is the partition's replication state (absent: term 0, no
//! hold, no history): the highest primary term this copy promised to follow; the
//! lowest commit id its log must keep for its followers (0: none; log retention
//! trims only below it); then the history of its log, `(term, first commit id
//! written in that term)` pairs with both fields strictly increasing. It is this host's promise, not part of the
//! partition's data: it is neither exported nor cleared with the partition.
//!
//! A fence entry is `66 65 6e 63 65` ("fence") then the partition, big-endian: 7
//! bytes. It exists only while the partition is fenced; no other `meta` key starts
//! with "fence", and fence entries are never part of a partition's exported records.

pub mod typed;

use crate::frame::{ChangeType, Collection, LogEntry, Partition, DECIDER_PARTITION};
use crate::limits::{
    EXPIRY_KEY_PREFIX_BYTES, LMDB_MAX_KEY_BYTES, MAX_KEY_BYTES, MAX_STORED_KEY_BYTES,
};

/// Version of this layout, stored in `meta`. Version 3 added `recent`
/// ([`recent_key`]); a build before it would not read the log entries there.
/// Version 4 added the shard's journal (`journal/` beside the environment, and
/// [`META_JOURNAL_SEQ`]); a build before it would open a shard without replaying its
/// journal, or torn by a power failure without rewinding it.
pub const FORMAT_VERSION: u32 = 4;
/// The oldest version this build opens: a shard of version 2 has no `recent` yet, and
/// is marked version 3 when it is opened.
pub const OLDEST_FORMAT_VERSION: u32 = 2;

/// `meta` key of the layout version (u32, [`FORMAT_VERSION`] when written).
pub const META_FORMAT_VERSION: &[u8] = b"format_version";
/// `meta` key of the shard's worker index (u32).
pub const META_SHARD_ID: &[u8] = b"shard_id";
/// `meta` key of the data dir's layout when the shard was created (see [`encode_layout`]).
pub const META_LAYOUT: &[u8] = b"layout";
/// `meta` key of the id high-water mark (u64): every id of this shard's blocks is below it.
pub const META_IDS_HIGH_WATER: &[u8] = b"ids_high_water";
/// `meta` key of the sequence number of the last journal record in the environment
/// (u64 big-endian): a shard's journal is replayed after it.
pub const META_JOURNAL_SEQ: &[u8] = b"journal_seq";

/// Value flag: an expiry time follows the flags byte.
pub(crate) const FLAG_EXPIRES: u8 = 0b0000_0001;
/// Value flag: the bytes are a typed key's metadata ([`typed::TypeMeta`]), not a string.
pub(crate) const FLAG_TYPED: u8 = 0b0000_0010;
const VALUE_HEADER_BYTES: usize = 9;
const LOG_HEADER_BYTES: usize = 8 + 1 + 2 + 8 + 2;

const _: () = assert!(
    EXPIRY_KEY_PREFIX_BYTES == 8 + 2 + 2,
    "the expiry index key is expires_at_ms ++ collection ++ partition ++ user key"
);
const _: () = assert!(
    EXPIRY_KEY_PREFIX_BYTES + MAX_KEY_BYTES <= LMDB_MAX_KEY_BYTES,
    "the expiry index key of the longest key fits an LMDB key"
);

/// Stored data that does not match this layout.
#[derive(Debug, thiserror::Error)]
#[error("corrupt {what}: {why}")]
pub struct CorruptError {
    pub(crate) what: &'static str,
    pub(crate) why: String,
}

fn corrupt(what: &'static str, why: impl Into<String>) -> CorruptError {
    CorruptError {
        what,
        why: why.into(),
    }
}

/// `partition ++ user key`.
pub fn data_key(partition: Partition, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + key.len());
    out.extend_from_slice(&partition.to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// `commit_id ++ flags ++ [expires_at_ms] ++ bytes`, for a string value.
pub fn encode_value(commit_id: u64, expires_at_ms: Option<u64>, value: &[u8]) -> Vec<u8> {
    encode_record(commit_id, expires_at_ms, false, value)
}

/// `commit_id ++ flags ++ [expires_at_ms] ++ bytes`; `typed`: the bytes are a typed key's
/// metadata.
pub fn encode_record(
    commit_id: u64,
    expires_at_ms: Option<u64>,
    typed: bool,
    value: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(VALUE_HEADER_BYTES + 8 + value.len());
    out.extend_from_slice(&commit_id.to_be_bytes());
    let typed_flag = if typed { FLAG_TYPED } else { 0 };
    match expires_at_ms {
        Some(at) => {
            out.push(FLAG_EXPIRES | typed_flag);
            out.extend_from_slice(&at.to_be_bytes());
        }
        None => out.push(typed_flag),
    }
    out.extend_from_slice(value);
    out
}

/// A stored value: the commit that wrote it, its expiry, and the user's bytes.
pub struct StoredValue<'a> {
    /// The commit that last wrote the key.
    pub commit_id: u64,
    /// The expiry in Unix ms, if the key has one.
    pub expires_at_ms: Option<u64>,
    /// The user's value, or a typed key's metadata.
    pub bytes: &'a [u8],
    /// The bytes are a typed key's metadata ([`typed::decode_type_meta`]).
    pub typed: bool,
}

/// Decodes a value of a `c<N>` database; rejects a short header or unknown flag bits.
pub fn decode_value(raw: &[u8]) -> Result<StoredValue<'_>, CorruptError> {
    if raw.len() < VALUE_HEADER_BYTES {
        return Err(corrupt(
            "value",
            format!("{} bytes is shorter than its header", raw.len()),
        ));
    }
    let flags = raw[8];
    if flags & !(FLAG_EXPIRES | FLAG_TYPED) != 0 {
        return Err(corrupt("value", format!("unknown flags {flags:#04x}")));
    }
    let commit_id = read_u64(&raw[..8]);
    let typed = flags & FLAG_TYPED != 0;
    if flags & FLAG_EXPIRES == 0 {
        return Ok(StoredValue {
            commit_id,
            expires_at_ms: None,
            bytes: &raw[VALUE_HEADER_BYTES..],
            typed,
        });
    }
    if raw.len() < VALUE_HEADER_BYTES + 8 {
        return Err(corrupt("value", "expiry flag set but no expiry time"));
    }
    let expires_at_ms = read_u64(&raw[VALUE_HEADER_BYTES..VALUE_HEADER_BYTES + 8]);
    Ok(StoredValue {
        commit_id,
        expires_at_ms: Some(expires_at_ms),
        bytes: &raw[VALUE_HEADER_BYTES + 8..],
        typed,
    })
}

/// `expires_at_ms ++ collection ++ partition ++ user key`.
pub fn expiry_key(
    expires_at_ms: u64,
    collection: Collection,
    partition: Partition,
    key: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + key.len());
    out.extend_from_slice(&expires_at_ms.to_be_bytes());
    out.extend_from_slice(&collection.to_be_bytes());
    out.extend_from_slice(&partition.to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// An entry of the expiry index.
pub struct ExpiryEntry<'a> {
    /// When the key expires, in Unix ms.
    pub expires_at_ms: u64,
    /// The collection the key is in.
    pub collection: Collection,
    /// The partition the key hashes to.
    pub partition: Partition,
    /// The user key.
    pub key: &'a [u8],
}

/// Decodes a key of the `expiry` database (at least its 12-byte prefix).
pub fn decode_expiry_key(raw: &[u8]) -> Result<ExpiryEntry<'_>, CorruptError> {
    if raw.len() < 12 {
        return Err(corrupt(
            "expiry index key",
            format!("{} bytes is shorter than 12", raw.len()),
        ));
    }
    Ok(ExpiryEntry {
        expires_at_ms: read_u64(&raw[..8]),
        collection: u16::from_be_bytes([raw[8], raw[9]]),
        partition: u16::from_be_bytes([raw[10], raw[11]]),
        key: &raw[12..],
    })
}

/// `partition ++ commit_id`.
pub fn log_key(partition: Partition, commit_id: u64) -> [u8; 10] {
    let mut out = [0; 10];
    out[..2].copy_from_slice(&partition.to_be_bytes());
    out[2..].copy_from_slice(&commit_id.to_be_bytes());
    out
}

/// The key of an entry of `recent`, the log's newest entries in the order they were
/// written: the shard's sequence number of the entry. Each entry is in `recent` or in
/// `log`, never both: the worker moves `recent` into `log` every housekeeping tick, so
/// that a commit writes its entries at one place instead of at each partition's log tail.
pub fn recent_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

/// The sequence number of a [`recent_key`].
pub fn decode_recent_key(raw: &[u8]) -> Result<u64, CorruptError> {
    let bytes: [u8; 8] = raw
        .try_into()
        .map_err(|_| corrupt("recent log key", format!("{} bytes, expected 8", raw.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

/// The value of an entry of `recent`: its [`log_key`], then its `log` value.
pub fn encode_recent_value(log_key: &[u8; 10], log_value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(log_key.len() + log_value.len());
    out.extend_from_slice(log_key);
    out.extend_from_slice(log_value);
    out
}

/// The `log` key and value of an entry of `recent`.
pub fn split_recent_value(raw: &[u8]) -> Result<(&[u8], &[u8]), CorruptError> {
    if raw.len() < 10 {
        return Err(corrupt("recent log entry", "shorter than its log key"));
    }
    Ok(raw.split_at(10))
}

/// The partition and commit id of a [`log_key`].
pub fn decode_log_key(raw: &[u8]) -> Result<(Partition, u64), CorruptError> {
    if raw.len() != 10 {
        return Err(corrupt(
            "log key",
            format!("{} bytes, expected 10", raw.len()),
        ));
    }
    Ok((u16::from_be_bytes([raw[0], raw[1]]), read_u64(&raw[2..])))
}

/// The fields of a log entry's value.
pub struct LogRecord<'a> {
    /// When the change was committed, in Unix ms.
    pub timestamp_ms: u64,
    /// What the change did to the key.
    pub change: ChangeType,
    /// The collection the key is in.
    pub collection: Collection,
    /// The key's expiry in Unix ms after the change (stored as 0 when `None`).
    pub expires_at_ms: Option<u64>,
    /// The user key (at most `MAX_STORED_KEY_BYTES`).
    pub key: &'a [u8],
    /// The new value (empty for a delete).
    pub data: &'a [u8],
}

impl<'a> From<&'a LogEntry> for LogRecord<'a> {
    /// The value fields of an entry read from a log (its partition and commit id are the key).
    fn from(entry: &'a LogEntry) -> LogRecord<'a> {
        LogRecord {
            timestamp_ms: entry.timestamp_ms,
            change: entry.change,
            collection: entry.collection,
            expires_at_ms: entry.expires_at_ms,
            key: &entry.key,
            data: &entry.data,
        }
    }
}

/// Encodes the value of a `log` entry (its key is [`log_key`]).
pub fn encode_log_value(record: &LogRecord<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(LOG_HEADER_BYTES + record.key.len() + record.data.len());
    out.extend_from_slice(&record.timestamp_ms.to_be_bytes());
    out.push(record.change as u8);
    out.extend_from_slice(&record.collection.to_be_bytes());
    out.extend_from_slice(&record.expires_at_ms.unwrap_or(0).to_be_bytes());
    // Stored keys are at most MAX_STORED_KEY_BYTES, which fits u16 (checked in
    // shoal_shared::limits).
    debug_assert!(record.key.len() <= MAX_STORED_KEY_BYTES);
    out.extend_from_slice(&(record.key.len() as u16).to_be_bytes());
    out.extend_from_slice(record.key);
    out.extend_from_slice(record.data);
    out
}

/// Decodes a `log` entry from its key and its value.
pub fn decode_log_entry(raw_key: &[u8], raw_value: &[u8]) -> Result<LogEntry, CorruptError> {
    let (partition, commit_id) = decode_log_key(raw_key)?;
    if raw_value.len() < LOG_HEADER_BYTES {
        return Err(corrupt("log entry", "shorter than its header"));
    }
    let change = ChangeType::from_byte(raw_value[8]).ok_or_else(|| {
        corrupt(
            "log entry",
            format!("unknown change type {:#04x}", raw_value[8]),
        )
    })?;
    let expires_at_ms = read_u64(&raw_value[11..19]);
    let key_len = usize::from(u16::from_be_bytes([raw_value[19], raw_value[20]]));
    if key_len > MAX_STORED_KEY_BYTES {
        return Err(corrupt(
            "log entry",
            format!("key of {key_len} bytes is longer than any stored key"),
        ));
    }
    let rest = &raw_value[LOG_HEADER_BYTES..];
    if rest.len() < key_len {
        return Err(corrupt("log entry", "key runs past the end"));
    }
    Ok(LogEntry {
        partition,
        commit_id,
        timestamp_ms: read_u64(&raw_value[..8]),
        change,
        collection: u16::from_be_bytes([raw_value[9], raw_value[10]]),
        expires_at_ms: (expires_at_ms != 0).then_some(expires_at_ms),
        key: rest[..key_len].to_vec(),
        data: rest[key_len..].to_vec(),
    })
}

/// `"p" ++ partition`.
pub fn partition_meta_key(partition: Partition) -> [u8; 3] {
    let [high, low] = partition.to_be_bytes();
    [b'p', high, low]
}

/// `"copy" ++ partition`: present while a full copy of the partition is under way, from
/// before its old records are cleared until its log has caught up with the copy. A copy
/// that finds it at start cannot trust its records: they are cleared and copied again.
pub fn copy_key(partition: Partition) -> [u8; 6] {
    let mut out = [0; 6];
    out[..4].copy_from_slice(b"copy");
    out[4..].copy_from_slice(&partition.to_be_bytes());
    out
}

/// `"r" ++ partition`: the partition's replication state.
pub fn replica_state_key(partition: Partition) -> [u8; 3] {
    let [high, low] = partition.to_be_bytes();
    [b'r', high, low]
}

/// A partition's replication state in `meta` (see the module header).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplicaState {
    /// The highest primary term this copy promised to follow (0: none).
    pub fenced_term: u64,
    /// The log keeps every entry from this commit id on, for the followers (0: none).
    pub log_hold_from: u64,
    /// `(term, first commit id written in that term)`, both strictly increasing.
    pub history: Vec<(u64, u64)>,
}

/// Longest history stored: one pair per failover of the partition.
pub const MAX_HISTORY_PAIRS: usize = 4096;

/// Encodes a partition's replication state: fenced term, log hold, then the history pairs.
pub fn encode_replica_state(state: &ReplicaState) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 16 * state.history.len());
    out.extend_from_slice(&state.fenced_term.to_be_bytes());
    out.extend_from_slice(&state.log_hold_from.to_be_bytes());
    for (term, first) in &state.history {
        out.extend_from_slice(&term.to_be_bytes());
        out.extend_from_slice(&first.to_be_bytes());
    }
    out
}

/// Decodes a partition's replication state; the pairs must increase strictly.
pub fn decode_replica_state(raw: &[u8]) -> Result<ReplicaState, CorruptError> {
    if raw.len() < 16 || !(raw.len() - 16).is_multiple_of(16) {
        return Err(corrupt(
            "replication state",
            format!("{} bytes, expected 16 + 16 per history pair", raw.len()),
        ));
    }
    let pairs = (raw.len() - 16) / 16;
    if pairs > MAX_HISTORY_PAIRS {
        return Err(corrupt(
            "replication state",
            format!("{pairs} history pairs, at most {MAX_HISTORY_PAIRS}"),
        ));
    }
    let history: Vec<(u64, u64)> = raw[16..]
        .chunks_exact(16)
        .map(|pair| (read_u64(&pair[..8]), read_u64(&pair[8..])))
        .collect();
    if !history
        .windows(2)
        .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1)
    {
        return Err(corrupt(
            "replication state",
            "history pairs do not increase strictly",
        ));
    }
    Ok(ReplicaState {
        fenced_term: read_u64(&raw[..8]),
        log_hold_from: read_u64(&raw[8..16]),
        history,
    })
}

/// Prefix of a fence entry in `meta`.
pub const META_FENCE_PREFIX: &[u8] = b"fence";

/// `"fence" ++ partition`.
pub fn fence_key(partition: Partition) -> [u8; 7] {
    let mut out = [0; 7];
    out[..5].copy_from_slice(META_FENCE_PREFIX);
    out[5..].copy_from_slice(&partition.to_be_bytes());
    out
}

/// The partition of a fence entry's key.
pub fn decode_fence_key(raw: &[u8]) -> Result<Partition, CorruptError> {
    match raw.strip_prefix(META_FENCE_PREFIX) {
        Some([high, low]) => Ok(u16::from_be_bytes([*high, *low])),
        _ => Err(corrupt(
            "fence entry",
            format!("key of {} bytes, expected 7", raw.len()),
        )),
    }
}

/// A partition's entry in `meta`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PartitionMeta {
    /// The partition's latest commit id (0: never written).
    pub last_commit_id: u64,
    /// When the partition last changed, in Unix ms.
    pub mtime_ms: u64,
    /// The highest commit id that log retention removed (0 if none).
    pub trimmed_through: u64,
}

/// Encodes a partition's `meta` entry: three big-endian u64s, 24 bytes.
pub fn encode_partition_meta(meta: PartitionMeta) -> [u8; 24] {
    let mut out = [0; 24];
    out[..8].copy_from_slice(&meta.last_commit_id.to_be_bytes());
    out[8..16].copy_from_slice(&meta.mtime_ms.to_be_bytes());
    out[16..].copy_from_slice(&meta.trimmed_through.to_be_bytes());
    out
}

/// Decodes a partition's `meta` entry; it must be exactly 24 bytes.
pub fn decode_partition_meta(raw: &[u8]) -> Result<PartitionMeta, CorruptError> {
    if raw.len() != 24 {
        return Err(corrupt(
            "partition meta",
            format!("{} bytes, expected 24", raw.len()),
        ));
    }
    Ok(PartitionMeta {
        last_commit_id: read_u64(&raw[..8]),
        mtime_ms: read_u64(&raw[8..16]),
        trimmed_through: read_u64(&raw[16..]),
    })
}

/// Encodes the `layout` entry: partitions u16 ++ workers u16, big-endian.
pub fn encode_layout(partitions: u16, workers: u16) -> [u8; 4] {
    let [p0, p1] = partitions.to_be_bytes();
    let [w0, w1] = workers.to_be_bytes();
    [p0, p1, w0, w1]
}

/// Decodes the `layout` entry into (partitions, workers).
pub fn decode_layout(raw: &[u8]) -> Result<(u16, u16), CorruptError> {
    match raw {
        [p0, p1, w0, w1] => Ok((
            u16::from_be_bytes([*p0, *p1]),
            u16::from_be_bytes([*w0, *w1]),
        )),
        _ => Err(corrupt(
            "layout",
            format!("{} bytes, expected 4", raw.len()),
        )),
    }
}

/// Decodes a big-endian u32 `meta` value; `what` names it in the error.
pub fn decode_u32(raw: &[u8], what: &'static str) -> Result<u32, CorruptError> {
    let bytes: [u8; 4] = raw
        .try_into()
        .map_err(|_| corrupt(what, format!("{} bytes, expected 4", raw.len())))?;
    Ok(u32::from_be_bytes(bytes))
}

/// Decodes a big-endian u64 `meta` value; `what` names it in the error.
pub fn decode_u64(raw: &[u8], what: &'static str) -> Result<u64, CorruptError> {
    let bytes: [u8; 8] = raw
        .try_into()
        .map_err(|_| corrupt(what, format!("{} bytes, expected 8", raw.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Reads 8 bytes; callers have checked the length.
fn read_u64(raw: &[u8]) -> u64 {
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&raw[..8]);
    u64::from_be_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let raw = encode_value(42, None, b"hello");
        assert_eq!(&raw[..9], &[0, 0, 0, 0, 0, 0, 0, 42, 0]);
        let value = decode_value(&raw).unwrap();
        assert_eq!(
            (value.commit_id, value.expires_at_ms, value.bytes),
            (42, None, &b"hello"[..])
        );
        assert!(decode_value(&raw[..5]).is_err());
        let mut flagged = raw.clone();
        flagged[8] = 0x80;
        assert!(decode_value(&flagged).is_err());
        let expiring = encode_value(7, Some(1234), b"v");
        assert_eq!(expiring[8], FLAG_EXPIRES);
        let value = decode_value(&expiring).unwrap();
        assert_eq!(
            (value.commit_id, value.expires_at_ms, value.bytes),
            (7, Some(1234), &b"v"[..])
        );
        assert!(decode_value(&expiring[..12]).is_err());
    }

    #[test]
    fn log_entries_round_trip_and_sort_by_commit_id() {
        let key = log_key(3, 7);
        let value = encode_log_value(&LogRecord {
            timestamp_ms: 1000,
            change: ChangeType::Update,
            collection: 2,
            expires_at_ms: Some(5000),
            key: b"k",
            data: b"data",
        });
        assert_eq!(value[8], 0b10);
        let entry = decode_log_entry(&key, &value).unwrap();
        assert_eq!(entry.partition, 3);
        assert_eq!(entry.commit_id, 7);
        assert_eq!(entry.timestamp_ms, 1000);
        assert_eq!(entry.change, ChangeType::Update);
        assert_eq!(entry.collection, 2);
        assert_eq!(entry.expires_at_ms, Some(5000));
        assert_eq!(entry.key, b"k");
        assert_eq!(entry.data, b"data");
        assert!(log_key(3, 255) < log_key(3, 256));
        assert!(log_key(3, u64::MAX) < log_key(4, 0));
        assert!(decode_log_entry(&key, &value[..12]).is_err());
        let mut bad = value.clone();
        bad[8] = 5;
        assert!(decode_log_entry(&key, &bad).is_err());
        // A key length beyond any stored key is corruption, even if the bytes are there
        // (found by fuzzing: the entry would not re-encode).
        let mut long = value[..LOG_HEADER_BYTES].to_vec();
        long[19..21].copy_from_slice(&((MAX_STORED_KEY_BYTES + 1) as u16).to_be_bytes());
        long.extend(std::iter::repeat_n(b'k', MAX_STORED_KEY_BYTES + 1));
        assert!(decode_log_entry(&key, &long).is_err());
        long[19..21].copy_from_slice(&(MAX_STORED_KEY_BYTES as u16).to_be_bytes());
        assert_eq!(decode_log_entry(&key, &long).unwrap().data, b"k");
    }

    #[test]
    fn meta_round_trips() {
        let meta = PartitionMeta {
            last_commit_id: 9,
            mtime_ms: 77,
            trimmed_through: 3,
        };
        assert_eq!(
            decode_partition_meta(&encode_partition_meta(meta)).unwrap(),
            meta
        );
        assert_eq!(decode_layout(&encode_layout(256, 3)).unwrap(), (256, 3));
        assert!(decode_layout(b"abc").is_err());
        assert!(decode_u32(b"ab", "x").is_err());
        assert_eq!(decode_u64(&9u64.to_be_bytes(), "x").unwrap(), 9);
        let index = expiry_key(99, 1, 2, b"key");
        let entry = decode_expiry_key(&index).unwrap();
        assert_eq!(
            (
                entry.expires_at_ms,
                entry.collection,
                entry.partition,
                entry.key
            ),
            (99, 1, 2, &b"key"[..])
        );
        assert!(expiry_key(99, 1, 2, b"z") < expiry_key(100, 0, 0, b"a"));
        assert!(decode_expiry_key(b"short").is_err());
    }

    #[test]
    fn fence_keys_round_trip_and_stay_apart_from_partition_entries() {
        let key = fence_key(0x0102);
        assert_eq!(key, [b'f', b'e', b'n', b'c', b'e', 1, 2]);
        assert_eq!(decode_fence_key(&key).unwrap(), 0x0102);
        assert!(decode_fence_key(b"fence\x01").is_err());
        assert!(decode_fence_key(b"fence\x01\x02\x03").is_err());
        assert!(!key.starts_with(b"p"));
        for other in [
            META_FORMAT_VERSION,
            META_SHARD_ID,
            META_LAYOUT,
            META_IDS_HIGH_WATER,
        ] {
            assert!(!other.starts_with(META_FENCE_PREFIX));
        }
    }

    fn op(partition: Partition, key: &[u8]) -> crate::frame::TxOp {
        crate::frame::TxOp {
            collection: 0,
            key: crate::frame::Key {
                partition,
                bytes: key.to_vec(),
            },
            action: crate::frame::TxAction::Delete,
        }
    }

    #[test]
    fn a_record_splits_into_parts_and_is_rebuilt_from_them_in_any_order() {
        let prepared = Intent {
            decider: DECIDER_PARTITION | 3,
            created_ms: 10,
            state: IntentState::Prepared,
            ops: vec![op(3, b"a"), op(5, b"b"), op(3, b"c")],
        };
        assert_eq!(prepared.partitions(), vec![3, 5]);
        let part3 = prepared.part(3).unwrap();
        assert_eq!(part3.ops, vec![op(3, b"a"), op(3, b"c")]);
        assert!(part3.is_part_of(3) && !part3.is_part_of(5));
        assert_eq!(prepared.part(4), None);
        let part5 = prepared.part(5).unwrap();
        // Rebuilt from its parts, whichever comes first.
        let ab = replace_part(
            replace_part(None, 3, Some(part3.clone())),
            5,
            Some(part5.clone()),
        );
        let ba = replace_part(
            replace_part(None, 5, Some(part5.clone())),
            3,
            Some(part3.clone()),
        );
        assert_eq!(ab.as_ref().map(Intent::partitions), Some(vec![3, 5]));
        assert_eq!(ab.as_ref().map(|r| r.ops.len()), Some(3));
        assert_eq!(ba.as_ref().map(|r| r.ops.len()), Some(3));
        // The decider commits: partition 3's part is the decision, 5's is gone.
        let decided = Intent {
            state: IntentState::Committed,
            ops: Vec::new(),
            ..prepared.clone()
        };
        let decision = decided.part(3).unwrap();
        assert_eq!(decision.state, IntentState::Committed);
        assert!(decision.is_part_of(3) && !decision.is_part_of(5));
        assert_eq!(decided.part(5), None);
        assert_eq!(decided.partitions(), vec![3]);
        // A follower that hears of the decision before partition 5's commit keeps both.
        let both = replace_part(ab, 3, Some(decision.clone())).unwrap();
        assert_eq!(both.state, IntentState::Committed);
        assert_eq!(both.ops, vec![op(5, b"b")]);
        assert_eq!(both.part(3), Some(decision));
        assert_eq!(both.part(5), Some(part5));
        let settled = replace_part(Some(both), 5, None).unwrap();
        assert_eq!(settled.ops, Vec::new());
        // Forgetting the decision leaves nothing.
        assert_eq!(replace_part(Some(settled), 3, None), None);
        // A part may not claim another partition's decision, nor be empty and prepared.
        let empty = Intent {
            ops: Vec::new(),
            ..prepared.clone()
        };
        assert!(!empty.is_part_of(3));
    }
}

/// A transaction as recorded in `txns`: the union of its *parts*, one per partition it
/// concerns (see [`Intent::part`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Intent {
    /// The worker that holds the decision, or the partition whose participant holds it
    /// (with [`crate::frame::DECIDER_PARTITION`]).
    pub decider: u16,
    /// When the intent was prepared, in milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Prepared, or the decider's commit record.
    pub state: IntentState,
    /// The transaction's ops on this shard that are prepared and not applied yet: all of
    /// them while `Prepared`; none on a decider's commit record, unless some partitions'
    /// ops are left to their own copies (a record whose partitions have different
    /// primaries, or a follower that has the decision before another partition's commit).
    pub ops: Vec<crate::frame::TxOp>,
}

/// What a `txns` record says about its transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum IntentState {
    /// Checked and locked; waiting for commit or abort.
    Prepared,
    /// The decider's record that the transaction committed (its ops are applied).
    Committed,
}

impl Intent {
    /// The partition whose log holds the decision, when the decider is named by partition.
    pub fn decider_partition(&self) -> Option<Partition> {
        (self.decider & DECIDER_PARTITION != 0).then_some(self.decider & !DECIDER_PARTITION)
    }

    /// Whether this record holds the decision of `partition` (a commit record decided by it).
    fn decides_in(&self, partition: Partition) -> bool {
        self.state == IntentState::Committed && self.decider_partition() == Some(partition)
    }

    /// The partitions this record concerns: those of its ops, and the decider's partition
    /// when this is its commit record. Ascending, without repeats.
    pub fn partitions(&self) -> Vec<Partition> {
        let mut partitions: Vec<Partition> = self.ops.iter().map(|op| op.key.partition).collect();
        if self.state == IntentState::Committed {
            partitions.extend(self.decider_partition());
        }
        partitions.sort_unstable();
        partitions.dedup();
        partitions
    }

    /// `partition`'s part of this record, what that partition's log and copies carry: its
    /// ops, and the decision if the partition decides (a `Committed` part). `None` when
    /// the record holds neither.
    pub fn part(&self, partition: Partition) -> Option<Intent> {
        let ops: Vec<crate::frame::TxOp> = self
            .ops
            .iter()
            .filter(|op| op.key.partition == partition)
            .cloned()
            .collect();
        let decides = self.decides_in(partition);
        (decides || !ops.is_empty()).then_some(Intent {
            decider: self.decider,
            created_ms: self.created_ms,
            state: match decides {
                true => IntentState::Committed,
                false => IntentState::Prepared,
            },
            ops,
        })
    }

    /// Whether `part` can be `partition`'s part of a record: its ops are all in the
    /// partition, and a `Committed` part is decided by it.
    pub fn is_part_of(&self, partition: Partition) -> bool {
        self.ops.iter().all(|op| op.key.partition == partition)
            && (self.state == IntentState::Prepared || self.decides_in(partition))
            && (self.state == IntentState::Committed || !self.ops.is_empty())
    }
}

/// `record` with `partition`'s part replaced by `part` (`None`: removed). `None` when
/// nothing is left of the record.
pub fn replace_part(
    record: Option<Intent>,
    partition: Partition,
    part: Option<Intent>,
) -> Option<Intent> {
    let rest = record.map(|mut record| {
        record.ops.retain(|op| op.key.partition != partition);
        if record.decides_in(partition) {
            record.state = IntentState::Prepared;
        }
        record
    });
    let merged = match (rest, part) {
        (rest, None) => rest,
        (None, Some(part)) => Some(part),
        (Some(mut rest), Some(part)) => {
            rest.ops.extend(part.ops);
            if part.state == IntentState::Committed {
                rest.state = IntentState::Committed;
            }
            Some(rest)
        }
    };
    merged.filter(|record| record.state == IntentState::Committed || !record.ops.is_empty())
}

fn intent_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ crate::limits::MAX_FRAME_BYTES }>()
}

/// Encodes a `txns` record.
pub fn encode_intent(intent: &Intent) -> Result<Vec<u8>, bincode::error::EncodeError> {
    bincode::serde::encode_to_vec(intent, intent_config())
}

/// Decodes a `txns` record.
pub fn decode_intent(raw: &[u8]) -> Result<Intent, CorruptError> {
    bincode::serde::decode_from_slice(raw, intent_config())
        .map(|(intent, _)| intent)
        .map_err(|e| CorruptError {
            what: "transaction record",
            why: e.to_string(),
        })
}

/// Whether a `txns` record is a decider's commit record (not a prepared intent).
pub fn is_decision_record(raw: &[u8]) -> Result<bool, CorruptError> {
    Ok(decode_intent(raw)?.state == IntentState::Committed)
}

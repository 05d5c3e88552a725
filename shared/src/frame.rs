//! The net-daemon ↔ shard-worker link: its messages and their framing.
//!
//! One request enum ([`WorkerRequest`]) and one response enum
//! ([`WorkerResponse`]) make the whole contract between the two processes;
//! neither crate depends on the other. Every message travels in an envelope
//! that carries a request id, so many requests are in flight on one socket and
//! responses may come back in any order.
//!
//! A frame is `length u32 big-endian ++ bincode 2 (serde) payload`. Decoding
//! never panics, never accepts a frame over [`MAX_FRAME_BYTES`], and never
//! allocates from a length the frame declares: byte strings and sequences are
//! sized by the bytes actually present (see `frugal`).

mod frugal;
mod typed;

pub use typed::{
    Answer, ElementTable, Kind, LexBound, RangeBy, ScoreBound, TypedOp, ZAddFlags, ZRange,
};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crate::limits::MAX_FRAME_BYTES;

/// A collection (Redis numbered database) index.
pub type Collection = u16;
pub use crate::partition::Partition;

/// What [`WorkerRequest::Versions`] answers for each key, and how a read that spans
/// workers uses it to see one moment of the data.
///
/// A key's version is the commit id that last wrote it (commit ids only grow within a
/// partition); a missing key's is [`versions::MISSING`] with its partition's last commit
/// id, so that a key created and deleted again in between is noticed (any write to the
/// partition counts, which only costs a retry); a key past its expiry is missing.
/// [`versions::LOCKED`] means a prepared transaction locks the key.
pub mod versions {
    /// Marks the version of a missing key.
    pub const MISSING: u64 = 1 << 63;
    /// A prepared transaction locks the key.
    pub const LOCKED: u64 = u64::MAX;

    /// Whether the reads made between two `Versions` answers saw one moment: every key
    /// kept its version from before the reads to after them, and none is locked after.
    ///
    /// Each key then held what was read from before the first read to after the last
    /// one, so all of it was the data at one instant. No multi-key write was half
    /// visible then: all its keys are locked from their prepares (which come before any
    /// part commits) until each part commits, and a key locked then, unchanged and free
    /// after, was released by an abort or left as it was.
    pub fn settled(before: &[u64], after: &[u64]) -> bool {
        before == after && !after.contains(&LOCKED)
    }

    /// The commit id a write that depends on what was read at `version` expects of the
    /// key (`TxAction::Expect`): 0 for a missing key.
    pub fn expected_commit_id(version: u64) -> u64 {
        match version & MISSING {
            0 => version,
            _ => 0,
        }
    }
}

/// A user key together with the partition it hashes to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Key {
    /// The partition the key hashes to; the net-daemon routes by it.
    pub partition: Partition,
    /// The key as the client sent it.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// When SET writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetCondition {
    /// Write whether or not the key exists (no NX or XX).
    Always,
    /// NX: only if the key does not exist.
    IfAbsent,
    /// XX: only if the key exists.
    IfPresent,
}

/// What SET answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SetReply {
    /// `OK` if written, nil if the condition failed (SET).
    Status,
    /// The old value or nil (SET ... GET, GETSET).
    OldValue,
    /// 1 if written, 0 if not (SETNX).
    WrittenFlag,
}

/// What a write does to the key's time to live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expiry {
    /// Keep the current expiry (SET ... KEEPTTL, GETEX without options).
    Keep,
    /// Remove any expiry (a plain SET, GETEX PERSIST).
    Clear,
    /// Expire at this Unix time in milliseconds.
    At(u64),
}

/// When EXPIRE applies (its NX, XX, GT and LT options).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExpireCondition {
    /// Set the expiry whatever the current one (no option).
    Always,
    /// NX: only if the key has no expiry.
    IfNone,
    /// XX: only if the key has an expiry.
    IfSome,
    /// GT: only if the new expiry is later (no expiry counts as infinite).
    IfGreater,
    /// LT: only if the new expiry is earlier (no expiry counts as infinite).
    IfLess,
}

/// What BITFIELD does on a field that a SET or INCRBY pushes past its width (its
/// OVERFLOW option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BitFieldOverflow {
    /// Keep the low bits (two's complement for a signed field): the default.
    Wrap,
    /// Stop at the field's lowest or highest value.
    Sat,
    /// Change nothing and answer nil for this operation.
    Fail,
}

/// A field of a string value that BITFIELD reads or writes: `bits` bits from bit
/// `offset` (the most significant bit of a byte first), read as a signed (`i<bits>`) or
/// unsigned (`u<bits>`) integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitFieldType {
    /// `i` (two's complement) rather than `u`.
    pub signed: bool,
    /// The width: 1 to 64 for a signed field, 1 to 63 for an unsigned one.
    pub bits: u8,
    /// The first bit's index from the value's start.
    pub offset: u64,
}

/// One operation of a [`WorkerRequest::BitField`], answered by an integer (or nil).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BitFieldOp {
    /// GET: the field's value (0 past the value's end).
    Get {
        /// The field.
        field: BitFieldType,
    },
    /// SET: stores `value` in the field and answers the old value (nil when the overflow
    /// mode is FAIL and `value` does not fit).
    Set {
        /// The field.
        field: BitFieldType,
        /// The new value.
        value: i64,
        /// What to do when it does not fit.
        overflow: BitFieldOverflow,
    },
    /// INCRBY: adds `increment` to the field and answers the new value (nil when the
    /// overflow mode is FAIL and the sum does not fit).
    IncrBy {
        /// The field.
        field: BitFieldType,
        /// What to add (negative to subtract).
        increment: i64,
        /// What to do when the sum does not fit.
        overflow: BitFieldOverflow,
    },
}

impl BitFieldOp {
    /// The field the operation works on.
    pub fn field(&self) -> BitFieldType {
        match *self {
            BitFieldOp::Get { field }
            | BitFieldOp::Set { field, .. }
            | BitFieldOp::IncrBy { field, .. } => field,
        }
    }

    /// Whether the operation writes (SET, INCRBY).
    pub fn is_write(&self) -> bool {
        !matches!(self, BitFieldOp::Get { .. })
    }
}

/// One step of a multi-key write, applied atomically with the others of its transaction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxOp {
    /// The collection the key is in.
    pub collection: Collection,
    /// The key the step writes or reads.
    pub key: Key,
    /// What the step does to the key.
    pub action: TxAction,
}

/// What one [`TxOp`] does to its key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TxAction {
    /// Store a value; with `if_absent`, the transaction is refused if the key exists.
    Put {
        /// The value to store.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// The new expiry in Unix ms, or `None` for no expiry.
        expires_at_ms: Option<u64>,
        /// Refuse the whole transaction (`TxKeyExists`) if the key exists.
        if_absent: bool,
    },
    /// Store the value (and expiry) that the nearest earlier `Take` or `Read` of the same
    /// request found. Only in [`WorkerRequest::Atomic`].
    PutTaken {
        /// Refuse the whole transaction (`TxKeyExists`) if the key exists.
        if_absent: bool,
    },
    /// Store a typed key from a snapshot (`layout::typed::encode_snapshot`) that a `Take`
    /// or `Read` of another worker found; with `if_absent`, refused if the key exists.
    PutCollection {
        /// The key's type and elements.
        #[serde(with = "serde_bytes")]
        snapshot: Vec<u8>,
        /// The new expiry in Unix ms, or `None` for no expiry.
        expires_at_ms: Option<u64>,
        /// Refuse the whole transaction (`TxKeyExists`) if the key exists.
        if_absent: bool,
    },
    /// Refuse the whole transaction (`TxStale`) unless the key's record was last written
    /// by this commit (0: the key is missing); changes nothing. A transaction planned on
    /// what it read (EXEC across workers) holds it so.
    Expect {
        /// The commit id the key must still have.
        commit_id: u64,
    },
    /// Delete the key if it exists (→ [`TxOutcome::Existed`]).
    Delete,
    /// Delete the key and return its value; refused if the key does not exist (RENAME's source).
    Take,
    /// Return the key's value without changing it; refused if missing (COPY's source).
    Read,
}

/// A key a dry run touched: the commit id it had, and the write that gives it the state
/// the run left (`None`: unchanged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TxEffect {
    /// The collection the key is in.
    pub collection: Collection,
    /// The key.
    pub key: Key,
    /// The commit id that last wrote it (0: missing).
    pub commit_id: u64,
    /// `Put`, `PutCollection` or `Delete`; `None` when the run left it as it was.
    pub write: Option<TxAction>,
}

/// What one [`TxOp`] found when it was checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TxOutcome {
    /// A `Put` or `PutTaken` that will write.
    Done,
    /// A `Delete`: whether the key existed.
    Existed(bool),
    /// A `Take` or `Read` of a typed key: its snapshot (`layout::typed::encode_snapshot`).
    Collection {
        /// The key's type and elements.
        #[serde(with = "serde_bytes")]
        snapshot: Vec<u8>,
        /// Its expiry in Unix ms, if any.
        expires_at_ms: Option<u64>,
    },
    /// A `Take` or `Read`: what the key held.
    Value {
        /// The stored value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// The key's expiry in Unix ms, if it has one.
        expires_at_ms: Option<u64>,
    },
}

impl TxOutcome {
    /// The write that stores what a `Take` or `Read` found (`None` for other outcomes).
    pub fn put(&self, if_absent: bool) -> Option<TxAction> {
        match self {
            TxOutcome::Value {
                value,
                expires_at_ms,
            } => Some(TxAction::Put {
                value: value.clone(),
                expires_at_ms: *expires_at_ms,
                if_absent,
            }),
            TxOutcome::Collection {
                snapshot,
                expires_at_ms,
            } => Some(TxAction::PutCollection {
                snapshot: snapshot.clone(),
                expires_at_ms: *expires_at_ms,
                if_absent,
            }),
            _ => None,
        }
    }
}

/// The database of a shard environment that a raw [`Record`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordTable {
    /// `c<N>`: the keys and values of collection N.
    Collection(u16),
    /// `log`: the commit log.
    Log,
    /// `meta`: the partition's entry (last commit id, mtime, trimmed log).
    Meta,
    /// `expiry`: the index of keys with a time to live.
    Expiry,
    /// `txns`: the partition's part of a two-phase commit record (a prepared intent or a
    /// decision), keyed by transaction id; its value is the part (see
    /// `shoal_shared::layout::Intent::part`).
    Txns,
    /// An element table of typed keys (see `shoal_shared::layout::typed`).
    Elements(ElementTable),
    /// `reclaim`: elements of old versions of typed keys, to remove in the background.
    Reclaim,
}

/// One raw record of a partition: its table, its stored key and its stored value, byte for byte.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The database the record is in.
    pub table: RecordTable,
    /// The stored key, in the layout of [`crate::layout`] (prefix included).
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The stored value, header included.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// Set in a `Prepare`'s `decider` when it names a partition rather than a worker: in a
/// cluster, the decider is the participant whose ops hold that partition's keys, on
/// whichever host owns it.
pub const DECIDER_PARTITION: u16 = 0x8000;
const _: () = assert!(crate::partition::SLOTS <= DECIDER_PARTITION);

/// A request from the net-daemon to a shard-worker. All keys of one request
/// belong to partitions of that worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerRequest {
    /// → `Value`.
    Get {
        /// The collection the key is in.
        collection: Collection,
        /// The key, with its partition.
        key: Key,
    },
    /// → `Values`, in the order of `keys`.
    MGet {
        /// The collection the key is in.
        collection: Collection,
        /// The keys, each with its partition.
        keys: Vec<Key>,
    },
    /// → `Ok`, `Nil`, `Value` or `Integer`, depending on `reply`.
    Set {
        /// The collection the key is in.
        collection: Collection,
        /// The key, with its partition.
        key: Key,
        /// The value to store.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        /// When to write (NX, XX).
        condition: SetCondition,
        /// What to answer.
        reply: SetReply,
        /// What the write does to the key's expiry.
        expiry: Expiry,
    },
    /// → `Value` (the deleted value).
    GetDel {
        /// The collection the key is in.
        collection: Collection,
        /// The key, with its partition.
        key: Key,
    },
    /// → `Value`; changes the expiry as asked.
    GetEx {
        /// The collection the key is in.
        collection: Collection,
        /// The key, with its partition.
        key: Key,
        /// What to do to the key's expiry.
        expiry: Expiry,
    },
    /// → `Integer`: how many of the keys existed and were deleted.
    Delete {
        /// The collection the key is in.
        collection: Collection,
        /// The keys, each with its partition.
        keys: Vec<Key>,
    },
    /// → `Integer`: how many of the keys exist (a key named twice counts twice).
    Exists {
        /// The collection the key is in.
        collection: Collection,
        /// The keys, each with its partition.
        keys: Vec<Key>,
    },
    /// → `Integer` (the new value) or an error.
    IncrBy {
        /// The collection the key is in.
        collection: Collection,
        /// The key, with its partition.
        key: Key,
        /// What to add (negative for DECRBY).
        delta: i64,
    },
    /// → `Value` (the new value, formatted) or an error. The increment is the client's
    /// text: the worker parses it in long double, as Redis does.
    IncrByFloat {
        /// The collection the key is in.
        collection: Collection,
        /// The key, with its partition.
        key: Key,
        /// The increment as the client wrote it (decimal text).
        #[serde(with = "serde_bytes")]
        increment: Vec<u8>,
    },
    /// → `Integer` (the new length) or an error.
    Append {
        /// The collection the key is in.
        collection: Collection,
        /// The key, with its partition.
        key: Key,
        /// The bytes to append.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// → `Integer`: the value's length in bytes (0 if the key does not exist).
    StrLen {
        /// The collection the key is in.
        collection: Collection,
        /// The key, with its partition.
        key: Key,
    },
    /// → `Value`: the bytes between `start` and `end` (inclusive; negative counts from the end).
    GetRange {
        /// The collection the key is in.
        collection: Collection,
        /// The key, with its partition.
        key: Key,
        /// The first byte's index.
        start: i64,
        /// The last byte's index.
        end: i64,
    },
    /// → `Integer` (the new length); pads with zero bytes.
    SetRange {
        /// The collection the key is in.
        collection: Collection,
        /// The key, with its partition.
        key: Key,
        /// Where to write, in bytes from the value's start.
        offset: u64,
        /// The bytes to write there.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// → `Integer`: the bit's old value (0 or 1). Sets the bit at `offset` (the most
    /// significant bit of a byte first), padding the value with zero bytes; keeps the
    /// key's expiry.
    SetBit {
        /// The collection the key is in.
        collection: Collection,
        /// The key, with its partition.
        key: Key,
        /// The bit's index from the value's start.
        offset: u64,
        /// Its new value.
        bit: bool,
    },
    /// → `Answer(Array)`: one `Integer` (or `Nil`, for a SET or INCRBY refused by
    /// overflow FAIL) per op, applied in order as one atomic change (BITFIELD,
    /// BITFIELD_RO). When an op writes, a missing key is created and the value first
    /// grows (with zero bytes) to hold the highest field written, even if every write
    /// then fails, as in Redis; the key keeps its expiry. Only GETs: a read.
    BitField {
        /// The collection the key is in.
        collection: Collection,
        /// The key, with its partition.
        key: Key,
        /// The operations, in order.
        ops: Vec<BitFieldOp>,
    },
    /// → `Integer`: 1 if the expiry was set (or the key deleted, for a time in the past), else 0.
    Expire {
        /// The collection the key is in.
        collection: Collection,
        /// The key, with its partition.
        key: Key,
        /// The new expiry in Unix ms.
        at_ms: u64,
        /// When to apply it (NX, XX, GT, LT).
        condition: ExpireCondition,
    },
    /// → `Integer`: 1 if an expiry was removed.
    Persist {
        /// The collection the key is in.
        collection: Collection,
        /// The key, with its partition.
        key: Key,
    },
    /// → `Integer`: the expiry in Unix ms, -1 without expiry, -2 if the key does not exist.
    ExpireTime {
        /// The collection the key is in.
        collection: Collection,
        /// The key, with its partition.
        key: Key,
    },
    /// → `Integer`: keys of the collection on this worker.
    DbSize {
        /// The collection to count.
        collection: Collection,
    },
    /// → `Scanned`: up to `count` keys examined after the stored key `after`.
    Scan {
        /// The collection to walk.
        collection: Collection,
        /// The stored key to continue after (`None`: from the start).
        #[serde(with = "serde_bytes")]
        after: Option<Vec<u8>>,
        /// How many keys to examine at most (SCAN's COUNT).
        count: u32,
        /// The glob the keys must match (SCAN's MATCH), if any.
        #[serde(with = "serde_bytes")]
        pattern: Option<Vec<u8>>,
        /// Walk this partition only (a cluster's SCAN goes partition by partition); a fenced
        /// one is refused with `PartitionMoved`.
        partition: Option<Partition>,
        /// Only keys of this type (SCAN's TYPE, lower case: `string`, `hash`, ...).
        of_type: Option<String>,
    },
    /// → `Scanned` with every matching key and no `next`.
    Keys {
        /// The collection to walk.
        collection: Collection,
        /// The glob the keys must match (`None`: every key).
        #[serde(with = "serde_bytes")]
        pattern: Option<Vec<u8>>,
    },
    /// → `Integer`: keys deleted (each logged as a delete). `None` clears every collection.
    /// With `partition`, only that partition's keys (a cluster flushes partition by
    /// partition); a fenced one is refused with `PartitionMoved`.
    Flush {
        /// The collection to clear (FLUSHDB), or `None` for all of them (FLUSHALL).
        collection: Option<Collection>,
        /// The only partition to clear, if any.
        partition: Option<Partition>,
    },
    /// → `TxOutcomes`: a multi-key write whose keys are all on this worker, in one transaction.
    Atomic {
        /// The steps, applied in order.
        ops: Vec<TxOp>,
    },
    /// Phase one of a multi-worker write: check the ops, lock their keys and record the
    /// intent durably. → `TxOutcomes`, or `TxRefused`/`TxConflict`. The `decider` worker
    /// (or, with [`DECIDER_PARTITION`], the participant holding that partition) records the
    /// commit decision in its commit.
    Prepare {
        /// The transaction's id, unique in the cluster.
        txid: u64,
        /// The worker index that decides, or [`DECIDER_PARTITION`] | a partition.
        decider: u16,
        /// This worker's steps of the transaction.
        ops: Vec<TxOp>,
    },
    /// Phase two: apply a prepared transaction. → `Ok`, or `TxAborted` if it was aborted.
    Commit {
        /// The prepared transaction.
        txid: u64,
    },
    /// Releases a prepared transaction. → `Ok`, or `TxCommitted` if the decider committed it.
    Abort {
        /// The prepared transaction.
        txid: u64,
    },
    /// Asks the decider whether `txid` committed. A transaction still undecided and older than
    /// `older_than_ms` is aborted durably first (presumed abort). → `Integer` 1 (committed) or
    /// 0 (aborted or unknown), or `TxInProgress`.
    Decide {
        /// The transaction asked about.
        txid: u64,
        /// The age in ms past which an undecided transaction is aborted.
        older_than_ms: u64,
    },
    /// → `InDoubt`: prepared transactions older than `older_than_ms`, with their deciders.
    InDoubt {
        /// The minimum age in ms of the transactions listed.
        older_than_ms: u64,
    },
    /// → `InDoubt`: the decision records (transactions this worker decided to commit) older
    /// than `older_than_ms`, with their deciders.
    Decided {
        /// The minimum age in ms of the records listed.
        older_than_ms: u64,
    },
    /// Drops the decider's commit record once every participant has committed. → `Ok`.
    Forget {
        /// The committed transaction.
        txid: u64,
    },
    /// → `Integer`: transactions prepared on this worker and not yet committed or aborted.
    Transactions,
    /// → `Log`: entries of `partition` with commit id ≥ `from_commit_id`, at most `count`.
    ReadLog {
        /// The partition whose log to read.
        partition: Partition,
        /// The first commit id to return.
        from_commit_id: u64,
        /// How many entries at most.
        count: u32,
    },
    /// → `Log`: entries after each partition's position (commit id already seen), at most
    /// `count` in all, or `LogTrimmed` if a position is below the retained log.
    ReadFeed {
        /// (partition, last commit id seen) for each partition followed.
        positions: Vec<(Partition, u64)>,
        /// How many entries at most, over all partitions.
        count: u32,
    },
    /// → `Positions`: the last commit id of each partition of this worker.
    LastCommitIds,
    /// Records that ids below `high_water` may have been issued. → `Ok`.
    ReserveIds {
        /// The id bound to record (exclusive).
        high_water: u64,
    },
    /// → `Integer`: the recorded id high-water mark (0 if none).
    IdHighWater,
    /// Copies the worker's environment into `dir` (an absolute path that must not exist yet)
    /// from one read snapshot, without pausing the group commit. → `Backup`, sent when the
    /// copy is on disk; it can take far longer than other requests.
    Backup {
        /// The absolute path of the copy.
        dir: String,
    },
    /// Reads the raw records of `partition` from the stored key `from` (inclusive) of its
    /// table on, about `max_bytes` of them (the worker lowers it to
    /// [`crate::limits::MAX_EXPORT_CHUNK_BYTES`], and always returns at least one record if
    /// any is left). → `Records`, whose `next` is where the following chunk starts (`None`:
    /// the partition is complete). Ignores the fence: it serves a handoff.
    ExportPartition {
        /// The partition to read.
        partition: Partition,
        /// Where to start (`None`: at the beginning).
        #[serde(with = "record_cursor")]
        from: Option<(RecordTable, Vec<u8>)>,
        /// About how many bytes of records to return.
        max_bytes: u32,
    },
    /// Writes raw records as they are (a chunk that `ExportPartition` read on another
    /// host). → `Ok`. Ignores the fence.
    ImportRecords {
        /// The records to write.
        records: Vec<Record>,
    },
    /// Replays, in order, commit-log entries that another host wrote, keeping their commit
    /// ids; an entry already applied changes nothing, so a replay may overlap a copy.
    /// → `Ok`. Ignores the fence.
    ApplyLog {
        /// The entries, in commit order.
        entries: Vec<LogEntry>,
    },
    /// Deletes every record of `partition` (data, log, meta entry, expiry index). → `Ok`,
    /// or `Error(Locked)` while a prepared transaction locks keys of it. Ignores the fence
    /// (and keeps it).
    ClearPartition {
        /// The partition to delete.
        partition: Partition,
    },
    /// Fences `partition` (client writes to it are refused with `PartitionMoved`; FLUSH,
    /// DBSIZE, SCAN, KEYS and expiry skip it) or lifts the fence. Durable. → `Ok`, or
    /// `Error(Locked)` when fencing a partition in which a prepared transaction still locks
    /// keys (the caller retries later).
    SetFence {
        /// The partition to fence or unfence.
        partition: Partition,
        /// `true` to fence, `false` to lift the fence.
        fenced: bool,
    },
    /// → `Partitions`: the fenced partitions, ascending.
    Fences,
    /// Replication: promises to follow no primary of a term below `term` for
    /// `partition` (durable; the stored term never goes down). A term above the one the
    /// log is open in also fences the partition for clients, in the same transaction.
    /// → `Ok`.
    PromiseTerm {
        /// The partition.
        partition: Partition,
        /// The term promised.
        term: u64,
    },
    /// Replication: opens `term` as this copy's primary term. Writes a marker entry at
    /// the partition's next commit id and records that `term` writes from it on, in one
    /// transaction. → `Integer` (the marker's commit id), or `Error(TermFenced)` when a
    /// higher term was promised. Lifts the partition's fence in the same transaction: the
    /// copy serves its clients from the marker on.
    OpenTerm {
        /// The partition.
        partition: Partition,
        /// The new primary term.
        term: u64,
    },
    /// Replication: the primary's followers need its log from commit id `from` on (0:
    /// none do); log retention keeps it. Durable. → `Ok`.
    HoldLog {
        /// The partition.
        partition: Partition,
        /// The lowest commit id to keep.
        from: u64,
    },
    /// Replication: marks a full copy of `partition` as under way (`true`, before its
    /// records are cleared) or done (`false`, once its log caught up). Durable. → `Ok`.
    SetCopying {
        /// The partition.
        partition: Partition,
        /// Whether a copy is under way.
        copying: bool,
    },
    /// The commit id that last wrote each key (0: missing), for WATCH. → `Positions`,
    /// `(partition, commit id)` per key in order.
    CommitIds {
        /// The collection the keys are in.
        collection: Collection,
        /// The keys.
        keys: Vec<Key>,
    },
    /// Each key's version, for reads that span workers to check that they saw one moment
    /// ([`versions`]). → `Positions`, `(partition, version)` per key in order.
    Versions {
        /// The collection the keys are in.
        collection: Collection,
        /// The keys.
        keys: Vec<Key>,
        /// Answer once no prepared transaction locks the keys, as other requests on them
        /// do; otherwise answer at once, with `LOCKED` for a locked key.
        wait: bool,
    },
    /// EXEC across workers, first step: applies the requests (of this worker's keys) in
    /// order and answers what they answer and what they would change, then undoes them
    /// all. → `DryRun`. Changes nothing.
    ExecDryRun {
        /// The transaction's requests for this worker.
        requests: Vec<WorkerRequest>,
    },
    /// EXEC: the requests of a MULTI transaction, applied in order in one write
    /// transaction, unless a watched key's commit id changed. → `Exec`.
    Exec {
        /// `(collection, key, commit id when watched)`; any change refuses the transaction.
        watched: Vec<(Collection, Key, u64)>,
        /// The transaction's requests, each answered as on its own.
        requests: Vec<WorkerRequest>,
    },
    /// A command on a typed key (hash, set, sorted set, list), or one that asks its
    /// type. → `Answer`, or `Error(WrongType)` when the key holds another type.
    Typed {
        /// The collection the key is in.
        collection: Collection,
        /// The key.
        key: Key,
        /// What to do.
        op: TypedOp,
    },
    /// Replication: replays the primary's log entries (as `ApplyLog` does) and stores
    /// the log's term history, in one transaction. The entries must belong to
    /// `partition` and follow one another, the first no later than the partition's last
    /// commit id + 1. → `Integer` (the partition's last commit id after them). Ignores
    /// the fence.
    Replicate {
        /// The partition.
        partition: Partition,
        /// The entries, in commit order (may be empty, to store the history alone).
        entries: Vec<LogEntry>,
        /// The log's `(term, first commit id)` pairs once they are applied.
        history: Vec<(u64, u64)>,
    },
    /// → `Ok` once LMDB has committed every batch acknowledged before it (write-back:
    /// after it, the shard's environment shows them to direct readers).
    Settle,
}

impl WorkerRequest {
    /// Whether the request may change data (and so needs the group commit's fsync).
    pub fn is_write(&self) -> bool {
        !matches!(
            self,
            WorkerRequest::Get { .. }
                | WorkerRequest::MGet { .. }
                | WorkerRequest::Exists { .. }
                | WorkerRequest::StrLen { .. }
                | WorkerRequest::GetRange { .. }
                | WorkerRequest::ExpireTime { .. }
                | WorkerRequest::DbSize { .. }
                | WorkerRequest::Scan { .. }
                | WorkerRequest::Keys { .. }
                | WorkerRequest::InDoubt { .. }
                | WorkerRequest::Decided { .. }
                | WorkerRequest::Transactions
                | WorkerRequest::ReadLog { .. }
                | WorkerRequest::ReadFeed { .. }
                | WorkerRequest::LastCommitIds
                | WorkerRequest::Settle
                | WorkerRequest::IdHighWater
                | WorkerRequest::Backup { .. }
                | WorkerRequest::ExportPartition { .. }
                | WorkerRequest::Fences
                | WorkerRequest::CommitIds { .. }
                | WorkerRequest::Versions { .. }
                | WorkerRequest::ExecDryRun { .. }
        ) && !matches!(self, WorkerRequest::Typed { op, .. } if !op.is_write())
            && !matches!(self, WorkerRequest::BitField { ops, .. }
                if ops.iter().all(|op| !op.is_write()))
            && !matches!(self, WorkerRequest::Exec { requests, .. }
                if requests.iter().all(|request| !request.is_write()))
    }

    /// Bytes of keys and values this request carries (what a write may need on disk).
    pub fn payload_bytes(&self) -> usize {
        use WorkerRequest::*;
        let keys: usize = self.keys().iter().map(|(_, key)| key.bytes.len()).sum();
        keys + match self {
            Set { value, .. } | Append { value, .. } => value.len(),
            // What the value may grow to.
            SetRange { offset, value, .. } => (*offset as usize).saturating_add(value.len()),
            SetBit { offset, .. } => (*offset / 8 + 1) as usize,
            BitField { ops, .. } => ops
                .iter()
                .filter(|op| op.is_write())
                .map(|op| {
                    let field = op.field();
                    let last_bit = field
                        .offset
                        .saturating_add(u64::from(field.bits).max(1) - 1);
                    (last_bit / 8 + 1) as usize
                })
                .max()
                .unwrap_or(0),
            Typed { op, .. } => op.payload_bytes(),
            Exec { requests, .. } => requests.iter().map(WorkerRequest::payload_bytes).sum(),
            Atomic { ops } | Prepare { ops, .. } => ops
                .iter()
                .map(|op| match &op.action {
                    TxAction::Put { value, .. } => value.len() + op.key.bytes.len(),
                    TxAction::PutCollection { snapshot, .. } => {
                        2 * snapshot.len() + op.key.bytes.len()
                    }
                    _ => op.key.bytes.len(),
                })
                .sum(),
            ImportRecords { records } => records
                .iter()
                .map(|record| record.key.len() + record.value.len())
                .sum(),
            ApplyLog { entries } => entries
                .iter()
                .map(|entry| 2 * entry.key.len() + 2 * entry.data.len())
                .sum(),
            _ => 0,
        }
    }

    /// The partitions whose data a client request reads or changes: the partitions a fence
    /// closes this request to. Empty for the phase two of a prepared transaction (`Commit`,
    /// `Abort`), for whole-collection requests (which skip fenced partitions instead) and
    /// for the requests of a handoff.
    pub fn client_partitions(&self) -> Vec<Partition> {
        match self {
            WorkerRequest::Prepare { ops, .. } => ops.iter().map(|op| op.key.partition).collect(),
            // Not in `keys` when it does not wait for locks.
            WorkerRequest::Versions { keys, .. } => keys.iter().map(|key| key.partition).collect(),
            other => other
                .keys()
                .into_iter()
                .map(|(_, key)| key.partition)
                .collect(),
        }
    }

    /// The collection and keys this request reads or writes (for key locks).
    pub fn keys(&self) -> Vec<(Collection, &Key)> {
        use WorkerRequest::*;
        match self {
            Get { collection, key }
            | Set {
                collection, key, ..
            }
            | GetDel { collection, key }
            | GetEx {
                collection, key, ..
            }
            | IncrBy {
                collection, key, ..
            }
            | IncrByFloat {
                collection, key, ..
            }
            | Append {
                collection, key, ..
            }
            | StrLen { collection, key }
            | GetRange {
                collection, key, ..
            }
            | SetRange {
                collection, key, ..
            }
            | SetBit {
                collection, key, ..
            }
            | BitField {
                collection, key, ..
            }
            | Expire {
                collection, key, ..
            }
            | Persist { collection, key }
            | ExpireTime { collection, key } => vec![(*collection, key)],
            Typed {
                collection,
                key,
                op,
            } => std::iter::once(key)
                .chain(op.other_key())
                .map(|key| (*collection, key))
                .collect(),
            MGet { collection, keys }
            | Delete { collection, keys }
            | CommitIds { collection, keys }
            | Exists { collection, keys }
            | Versions {
                collection,
                keys,
                wait: true,
            } => keys.iter().map(|key| (*collection, key)).collect(),
            ExecDryRun { requests } => requests.iter().flat_map(WorkerRequest::keys).collect(),
            Exec { watched, requests } => watched
                .iter()
                .map(|(collection, key, _)| (*collection, key))
                .chain(requests.iter().flat_map(WorkerRequest::keys))
                .collect(),
            Atomic { ops } => ops.iter().map(|op| (op.collection, &op.key)).collect(),
            _ => Vec::new(),
        }
    }
}

/// A response from a shard-worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerResponse {
    /// The request succeeded and returns nothing.
    Ok,
    /// A number (a count, a length, a flag, a new value).
    Integer(i64),
    /// A value, or nil (`None`) if the key does not exist.
    Value(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    /// One value or nil per key, in the order of the request's keys.
    Values(Vec<Option<serde_bytes::ByteBuf>>),
    /// Keys found by a scan, and the stored key to continue after (`None`: the end).
    Scanned {
        /// The user keys found (without their stored prefix).
        keys: Vec<serde_bytes::ByteBuf>,
        /// The stored key to continue after, or `None` at the end.
        #[serde(with = "serde_bytes")]
        next: Option<Vec<u8>>,
    },
    /// What each op of an `Atomic` or `Prepare` found, in the order of the ops.
    TxOutcomes(Vec<TxOutcome>),
    /// (txid, decider worker) of transactions in doubt.
    InDoubt(Vec<(u64, u16)>),
    /// (partition, last commit id).
    Positions(Vec<(Partition, u64)>),
    /// Commit-log entries, in commit order within each partition.
    Log(Vec<LogEntry>),
    /// The copy a `Backup` request made.
    Backup(crate::backup::ShardBackup),
    /// A chunk of a partition's raw records (`ExportPartition`), and where the next chunk
    /// starts (`None`: the partition is complete).
    Records {
        /// The records of the chunk.
        records: Vec<Record>,
        /// Where the next chunk starts, or `None` if the partition is complete.
        #[serde(with = "record_cursor")]
        next: Option<(RecordTable, Vec<u8>)>,
    },
    /// Partitions, ascending (`Fences`).
    Partitions(Vec<Partition>),
    /// The reply of a `Typed` request.
    Answer(Answer),
    /// The responses of an `Exec`'s requests, or `None` when a watched key changed.
    Exec(Option<Vec<WorkerResponse>>),
    /// An `ExecDryRun`'s answers, and what each key it touched was and would become.
    DryRun {
        /// The responses of the requests, in order.
        responses: Vec<WorkerResponse>,
        /// Each key the requests read or wrote, once.
        effects: Vec<TxEffect>,
    },
    /// The request failed; see [`WorkerError`].
    Error(WorkerError),
}

/// A failure the worker reports for one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WorkerError {
    /// The stored value is not an integer, or the result overflows.
    NotInteger,
    /// INCRBY would overflow i64.
    Overflow,
    /// The key holds a value of another type than the request works on.
    WrongType,
    /// The request is refused with this error text, which starts with its code (`ERR ...`).
    Command(String),
    /// The stored value is not a float.
    NotFloat,
    /// INCRBYFLOAT would produce NaN or infinity.
    NanOrInfinity,
    /// The resulting value would exceed `max_value_bytes`.
    ValueTooLarge {
        /// The configured limit (`storage.max_value_bytes`).
        max_value_bytes: usize,
    },
    /// A key of the request stayed locked by a multi-key transaction for too long.
    Locked,
    /// A transaction's condition failed: a key that must be absent exists.
    TxKeyExists,
    /// A transaction's condition failed: a key that must exist does not.
    TxNoSuchKey,
    /// A key of the transaction is locked by another transaction.
    TxConflict,
    /// A key changed since the transaction read it (an `Expect` failed).
    TxStale,
    /// The transaction was aborted.
    TxAborted,
    /// The transaction was committed.
    TxCommitted,
    /// The transaction is not decided yet.
    TxInProgress,
    /// The shard's map reached `storage.max_map_size_bytes`; writes are refused, reads go on.
    MapFull {
        /// The configured limit (`storage.max_map_size_bytes`).
        max_map_size_bytes: usize,
    },
    /// The disk is full; writes are refused until space is freed, reads go on.
    DiskFull,
    /// The reply would be larger than [`crate::limits::MAX_REPLY_BYTES`].
    ReplyTooLarge,
    /// A feed position is below the retained log of its partition.
    LogTrimmed {
        /// The partition whose log is trimmed.
        partition: Partition,
        /// The last commit id no longer in its log.
        trimmed_through: u64,
    },
    /// The storage engine failed; nothing of this request was applied.
    Storage(String),
    /// The partition is fenced on this worker: it is moving to another host, or this host
    /// no longer owns it. Nothing of the request was applied.
    PartitionMoved {
        /// The fenced partition.
        partition: Partition,
    },
    /// This copy promised to follow a higher primary term than the one asked for.
    TermFenced {
        /// The term it promised.
        fenced: u64,
    },
}

/// What a commit-log entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u8)]
pub enum ChangeType {
    /// `00`: the key did not exist before.
    Create = 0b00,
    /// `01`: the key was removed.
    Delete = 0b01,
    /// `10`: the key existed and got a new value.
    Update = 0b10,
    /// `11`: a new primary's first entry; it changes no key.
    Marker = 0b11,
    /// `100`: a two-phase commit record of the partition changed: a prepared intent, the
    /// decider's decision, or their removal. It changes no key; the entry's key is the
    /// transaction id and its data the partition's part of the record (empty: none left).
    Txn = 0b100,
}

impl ChangeType {
    /// Decodes the on-disk byte.
    pub(crate) fn from_byte(byte: u8) -> Option<ChangeType> {
        match byte {
            0b00 => Some(ChangeType::Create),
            0b01 => Some(ChangeType::Delete),
            0b10 => Some(ChangeType::Update),
            0b11 => Some(ChangeType::Marker),
            0b100 => Some(ChangeType::Txn),
            _ => None,
        }
    }

    /// The name shown to users.
    pub fn name(self) -> &'static str {
        match self {
            ChangeType::Create => "create",
            ChangeType::Delete => "delete",
            ChangeType::Update => "update",
            ChangeType::Marker => "marker",
            ChangeType::Txn => "txn",
        }
    }
}

/// One entry of a partition's commit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// The partition whose log holds the entry.
    pub partition: Partition,
    /// The entry's commit id: one more than the partition's previous commit.
    pub commit_id: u64,
    /// When the change was committed, in Unix ms.
    pub timestamp_ms: u64,
    /// What the change did to the key.
    pub change: ChangeType,
    /// The collection the key is in.
    pub collection: Collection,
    /// The key's expiry after this change, if it has one.
    pub expires_at_ms: Option<u64>,
    /// The user key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The new value (empty for a delete).
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// A position in a partition's export, `(table, stored key)`, with the key encoded as
/// bytes (as `serde_bytes` does for a plain `Vec<u8>` field).
mod record_cursor {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::RecordTable;

    pub(crate) fn serialize<S: Serializer>(
        cursor: &Option<(RecordTable, Vec<u8>)>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        cursor
            .as_ref()
            .map(|(table, key)| (*table, serde_bytes::Bytes::new(key)))
            .serialize(serializer)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<(RecordTable, Vec<u8>)>, D::Error> {
        let cursor = Option::<(RecordTable, serde_bytes::ByteBuf)>::deserialize(deserializer)?;
        Ok(cursor.map(|(table, key)| (table, key.into_vec())))
    }
}

/// A request with its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestEnvelope {
    /// Chosen by the net-daemon, unique among its requests in flight on the link.
    pub id: u64,
    /// The request.
    pub request: WorkerRequest,
}

/// A response with the id of its request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    /// The id of the request answered.
    pub id: u64,
    /// The response.
    pub response: WorkerResponse,
}

/// A frame that cannot be decoded; the link must be closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The frame's length (in bytes) is over [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes is over the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    /// The payload is not a valid message; the decoder's reason.
    #[error("undecodable frame: {0}")]
    Decode(String),
    /// The message ended this many bytes before the frame did.
    #[error("frame has {0} trailing bytes")]
    Trailing(usize),
    /// The encoder refused the message; its reason.
    #[error("cannot encode frame: {0}")]
    Encode(String),
}

const LENGTH_BYTES: usize = 4;

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_BYTES>()
}

/// Appends one frame holding `message` to `out`.
pub fn encode_frame<T: Serialize>(message: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; LENGTH_BYTES]);
    if let Err(error) = bincode::serde::encode_into_std_write(message, out, bincode_config()) {
        out.truncate(start);
        return Err(FrameError::Encode(error.to_string()));
    }
    let len = out.len() - start - LENGTH_BYTES;
    if len > MAX_FRAME_BYTES {
        out.truncate(start);
        return Err(FrameError::TooLarge(len));
    }
    out[start..start + LENGTH_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Decodes the frame at the front of `buf`. Returns the message and the bytes it
/// used, or `Ok(None)` if the frame is not complete yet.
pub fn decode_frame<T: DeserializeOwned>(buf: &[u8]) -> Result<Option<(T, usize)>, FrameError> {
    let Some(header) = buf.get(..LENGTH_BYTES) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    let Some(payload) = buf.get(LENGTH_BYTES..LENGTH_BYTES + len) else {
        return Ok(None);
    };
    let seed = frugal::FrugalDecode {
        input_bytes: len,
        message: std::marker::PhantomData::<T>,
    };
    let (message, used) = bincode::serde::seed_decode_from_slice(seed, payload, bincode_config())
        .map_err(|e| FrameError::Decode(e.to_string()))?;
    if used != len {
        return Err(FrameError::Trailing(len - used));
    }
    Ok(Some((message, LENGTH_BYTES + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_settles_only_on_equal_unlocked_versions() {
        use versions::{expected_commit_id, settled, LOCKED, MISSING};
        let missing = MISSING | 41;
        assert!(settled(&[5, missing], &[5, missing]));
        assert!(
            !settled(&[5, missing], &[6, missing]),
            "a key was rewritten"
        );
        assert!(
            !settled(&[5, missing], &[5, MISSING | 42]),
            "a missing key's partition moved on (it may have come and gone)"
        );
        assert!(
            !settled(&[5, LOCKED], &[5, LOCKED]),
            "a key is still locked"
        );
        assert!(!settled(&[5, LOCKED], &[5, missing]));
        assert_eq!(expected_commit_id(5), 5);
        assert_eq!(
            expected_commit_id(missing),
            0,
            "a missing key is expected missing"
        );
    }

    fn key(bytes: &[u8]) -> Key {
        Key {
            partition: 7,
            bytes: bytes.to_vec(),
        }
    }

    #[test]
    fn frames_round_trip() {
        let messages = vec![
            RequestEnvelope {
                id: 1,
                request: WorkerRequest::Get {
                    collection: 0,
                    key: key(b"a"),
                },
            },
            RequestEnvelope {
                id: u64::MAX,
                request: WorkerRequest::Set {
                    collection: 3,
                    key: key(b"k"),
                    value: vec![0, 255, 13, 10],
                    condition: SetCondition::IfAbsent,
                    reply: SetReply::OldValue,
                    expiry: Expiry::At(12345),
                },
            },
            RequestEnvelope {
                id: 2,
                request: WorkerRequest::IncrByFloat {
                    collection: 1,
                    key: key(b""),
                    increment: b"-0.5".to_vec(),
                },
            },
        ];
        let mut out = Vec::new();
        for message in &messages {
            encode_frame(message, &mut out).unwrap();
        }
        let mut pos = 0;
        for message in &messages {
            let (decoded, used): (RequestEnvelope, usize) =
                decode_frame(&out[pos..]).unwrap().unwrap();
            assert_eq!(&decoded, message);
            pos += used;
        }
        assert_eq!(pos, out.len());
    }

    #[test]
    fn handoff_frames_round_trip_and_carry_keys_as_bytes() {
        let cursor = Some((RecordTable::Collection(3), vec![0, 7, b'k']));
        let messages = vec![
            WorkerRequest::ExportPartition {
                partition: 7,
                from: cursor.clone(),
                max_bytes: 1 << 20,
            },
            WorkerRequest::ImportRecords {
                records: vec![Record {
                    table: RecordTable::Expiry,
                    key: vec![1; 13],
                    value: Vec::new(),
                }],
            },
            WorkerRequest::SetFence {
                partition: 7,
                fenced: true,
            },
            WorkerRequest::Fences,
        ];
        let mut out = Vec::new();
        for request in &messages {
            out.clear();
            encode_frame(request, &mut out).unwrap();
            let (decoded, _): (WorkerRequest, usize) = decode_frame(&out).unwrap().unwrap();
            assert_eq!(&decoded, request);
        }
        let response = WorkerResponse::Records {
            records: Vec::new(),
            next: cursor,
        };
        out.clear();
        encode_frame(&response, &mut out).unwrap();
        let (decoded, _): (WorkerResponse, usize) = decode_frame(&out).unwrap().unwrap();
        assert_eq!(decoded, response);
        // A cursor key claiming more bytes than the frame holds is an error, not an allocation.
        let mut lying = out.clone();
        let last = lying.len() - 4;
        lying[last] = 0xfb;
        assert!(decode_frame::<WorkerResponse>(&lying).is_err());

        assert!(!WorkerRequest::Fences.is_write());
        assert!(!messages[0].is_write());
        assert!(messages[1].is_write() && messages[2].is_write());
    }

    #[test]
    fn client_requests_name_their_partitions_and_handoff_requests_none() {
        let write = WorkerRequest::Delete {
            collection: 0,
            keys: vec![
                key(b"a"),
                Key {
                    partition: 9,
                    bytes: b"b".to_vec(),
                },
            ],
        };
        assert_eq!(write.client_partitions(), vec![7, 9]);
        let read = WorkerRequest::Get {
            collection: 0,
            key: key(b"a"),
        };
        assert_eq!(read.client_partitions(), vec![7]);
        let prepare = WorkerRequest::Prepare {
            txid: 1,
            decider: 0,
            ops: vec![TxOp {
                collection: 0,
                key: Key {
                    partition: 4,
                    bytes: Vec::new(),
                },
                action: TxAction::Delete,
            }],
        };
        assert_eq!(prepare.client_partitions(), vec![4]);
        for other in [
            WorkerRequest::Commit { txid: 1 },
            WorkerRequest::Flush {
                collection: None,
                partition: None,
            },
            WorkerRequest::ClearPartition { partition: 7 },
            WorkerRequest::ApplyLog {
                entries: Vec::new(),
            },
        ] {
            assert!(other.client_partitions().is_empty(), "{other:?}");
        }
    }

    #[test]
    fn bitfield_is_a_read_with_only_gets_and_names_its_key() {
        let field = |offset| BitFieldType {
            signed: false,
            bits: 8,
            offset,
        };
        let read = WorkerRequest::BitField {
            collection: 0,
            key: key(b"bits"),
            ops: vec![BitFieldOp::Get { field: field(0) }],
        };
        assert!(!read.is_write());
        assert_eq!(read.client_partitions(), vec![7]);
        let write = WorkerRequest::BitField {
            collection: 0,
            key: key(b"bits"),
            ops: vec![
                BitFieldOp::Get { field: field(800) },
                BitFieldOp::IncrBy {
                    field: field(80),
                    increment: -1,
                    overflow: BitFieldOverflow::Fail,
                },
            ],
        };
        assert!(write.is_write());
        // The key, and the 11 bytes the value may grow to for the write at bit 80.
        assert_eq!(write.payload_bytes(), 4 + 11);
        let mut out = Vec::new();
        encode_frame(&write, &mut out).unwrap();
        let (decoded, _): (WorkerRequest, usize) = decode_frame(&out).unwrap().unwrap();
        assert_eq!(decoded, write);
    }

    #[test]
    fn partial_frames_need_more_bytes() {
        let mut out = Vec::new();
        let response = ResponseEnvelope {
            id: 9,
            response: WorkerResponse::Value(Some(b"hello".to_vec())),
        };
        encode_frame(&response, &mut out).unwrap();
        for cut in 0..out.len() {
            assert!(decode_frame::<ResponseEnvelope>(&out[..cut])
                .unwrap()
                .is_none());
        }
    }

    #[test]
    fn hostile_frames_are_errors() {
        let huge = ((MAX_FRAME_BYTES + 1) as u32).to_be_bytes();
        assert!(matches!(
            decode_frame::<ResponseEnvelope>(&huge),
            Err(FrameError::TooLarge(_))
        ));
        let garbage = [0, 0, 0, 3, 0xff, 0xff, 0xff];
        assert!(decode_frame::<ResponseEnvelope>(&garbage).is_err());
        // A vector that claims a length far beyond the frame must not allocate it.
        let mut lying = vec![0, 0, 0, 0];
        lying.extend_from_slice(&[1, 4, 0xfc, 0xff, 0xff, 0xff, 0x7f]);
        let len = (lying.len() - 4) as u32;
        lying[..4].copy_from_slice(&len.to_be_bytes());
        assert!(decode_frame::<ResponseEnvelope>(&lying).is_err());
    }

    #[test]
    fn change_types_have_their_documented_codes() {
        assert_eq!(ChangeType::Create as u8, 0b00);
        assert_eq!(ChangeType::Delete as u8, 0b01);
        assert_eq!(ChangeType::Update as u8, 0b10);
        assert_eq!(ChangeType::Marker as u8, 0b11);
        assert_eq!(ChangeType::Txn as u8, 0b100);
        let all = [
            ChangeType::Create,
            ChangeType::Delete,
            ChangeType::Update,
            ChangeType::Marker,
            ChangeType::Txn,
        ];
        for change in all {
            assert_eq!(ChangeType::from_byte(change as u8), Some(change));
        }
        assert_eq!(ChangeType::from_byte(5), None);
    }
}

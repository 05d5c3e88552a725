//! Durable storage of the metadata Raft group: its log, vote, state machine and snapshot.
//!
//! It owns one small LMDB environment of the net-daemon (`<data_dir>/meta-raft/`) and
//! implements openraft 0.9's storage API (v2): `MetaLogStore` is the
//! `RaftLogStorage` + `RaftLogReader`, `MetaStateMachine` the `RaftStateMachine`, and
//! `MetaSnapshotBuilder` the `RaftSnapshotBuilder`. The replicated state is generic:
//! any [`MetadataState`] (the network information, NI) with its command type.
//! Openraft's core is its only caller; the cluster layer opens the store with
//! `open_meta_store` and hands both halves to `Raft::new` (see `MetaRaft`).
//! [`memory`] is the same storage in memory, for the simulation; both pass openraft's
//! storage suite and this module's own tests.
//!
//! Every write (log append, truncate, purge, vote, committed id, applied entries, snapshot)
//! is one LMDB write transaction that commits with a sync before the call returns or
//! reports completion, and it runs on a blocking thread so that no fsync stalls the
//! runtime. In-memory state changes only after its commit. When the map is full the
//! transaction is aborted, the map doubles (up to `max_map_size_bytes`) and it is run
//! again. Decoding stored bytes never panics: it fails with a `StorageError`, which stops
//! the Raft node (fail-stop). It never opens a shard's environment.
//!
//! # On-disk layout
//!
//! Integers are big-endian, so LMDB's byte order is numeric order. "bincode" is bincode 2
//! with serde, the standard configuration, and a limit of `MAX_VALUE_BYTES`.
//!
//! Named database `log`, the Raft log:
//! ```text
//! key   = log index u64
//! value = bincode of openraft `Entry<MetaTypes<S>>`: log id (term, node id, index) ++
//!         payload (blank | S::Command | membership)
//! ```
//! The index inside the value equals the key. Entries are consecutive: there is no hole
//! between the first and the last.
//!
//! Named database `raft`, the log store's records:
//! ```text
//! "format_version" → u32 (FORMAT_VERSION)
//! "vote"           → bincode of `Vote<u64>`              (absent: never voted)
//! "committed"      → bincode of `LogId<u64>`             (absent: none known committed)
//! "last_purged"    → bincode of `LogId<u64>`             (absent: nothing purged)
//! ```
//! Every entry at or below `last_purged` has been removed from `log`.
//!
//! Named database `machine`, the state machine and the last snapshot:
//! ```text
//! "applied"        → bincode of `LogId<u64>`, the last applied entry (absent: none)
//! "membership"     → bincode of `StoredMembership<u64, BasicNode>` (absent: default)
//! "state"          → bincode of `S`                      (absent: `S::default()`)
//! "snapshot_meta"  → bincode of `SnapshotMeta<u64, BasicNode>` (absent: no snapshot)
//! "snapshot_data"  → SNAPSHOT_FORMAT u8 ++ bincode of `S`
//! ```
//! `applied`, `membership` and `state` are written in one transaction, and so are
//! `snapshot_meta` and `snapshot_data`. The snapshot bytes are also what a leader sends
//! to a follower that is too far behind.

use std::fmt;
use std::io::Cursor;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, RwLock};

use heed::byteorder::BigEndian;
use heed::types::{Bytes, U64};
use heed::{CommitOrAbort, Database, Env, EnvOpenOptions, RoTxn, RwTxn, WithoutTls};
use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, LogState,
    OptionalSend, RaftLogReader, RaftSnapshotBuilder, RaftTypeConfig, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;

/// Version of this layout, stored under `raft/"format_version"`.
pub(crate) const FORMAT_VERSION: u32 = 1;
/// First byte of the snapshot bytes: how the rest is encoded.
pub(crate) const SNAPSHOT_FORMAT: u8 = 1;
/// Largest value bincode decodes (or encodes): a bound on what a corrupt length can allocate.
pub(crate) const MAX_VALUE_BYTES: usize = 64 << 20;

/// Node ids of the metadata group are host ids.
pub(crate) type NodeId = u64;
/// A log id of the metadata group.
pub(crate) type MetaLogId = LogId<NodeId>;
/// The membership as the state machine stores it.
pub(crate) type MetaMembership = StoredMembership<NodeId, BasicNode>;
/// A Raft node of the metadata group whose storage is this module's.
pub(crate) type MetaRaft<S> = openraft::Raft<MetaTypes<S>>;
type MetaStorageError = StorageError<NodeId>;

const FORMAT_VERSION_KEY: &[u8] = b"format_version";
const VOTE_KEY: &[u8] = b"vote";
const COMMITTED_KEY: &[u8] = b"committed";
const LAST_PURGED_KEY: &[u8] = b"last_purged";
const APPLIED_KEY: &[u8] = b"applied";
const MEMBERSHIP_KEY: &[u8] = b"membership";
const STATE_KEY: &[u8] = b"state";
const SNAPSHOT_META_KEY: &[u8] = b"snapshot_meta";
const SNAPSHOT_DATA_KEY: &[u8] = b"snapshot_data";
/// `log`, `raft` and `machine`.
const DATABASES: u32 = 3;
const PAGE_BYTES: usize = 4096;

const _: () = assert!(
    MAX_VALUE_BYTES <= u32::MAX as usize,
    "a stored value fits LMDB's value size"
);

/// The replicated state of the metadata group (the network information) and how a
/// committed command changes it. `apply` must be deterministic: every replica applies the
/// same commands in the same order and must reach the same state.
pub trait MetadataState:
    Default + Clone + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// A change proposed through `Raft::client_write`.
    type Command: Serialize + DeserializeOwned + Clone + fmt::Debug + Send + Sync + 'static;
    /// What applying a command returns to its proposer. Entries without a command (blank
    /// and membership entries) answer `Outcome::default()`.
    type Outcome: Serialize
        + DeserializeOwned
        + Clone
        + fmt::Debug
        + Default
        + Send
        + Sync
        + 'static;

    /// Applies a committed command, the entry at `log_index`.
    fn apply(&mut self, command: &Self::Command, log_index: u64) -> Self::Outcome;
}

/// openraft's type configuration of the metadata group over the state `S`: commands are
/// `S::Command`, node ids are host ids (`u64`), a node is its address ([`BasicNode`]),
/// snapshots are byte buffers, and the runtime is tokio.
pub struct MetaTypes<S>(PhantomData<fn() -> S>);

impl<S> Clone for MetaTypes<S> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<S> Copy for MetaTypes<S> {}
impl<S> Default for MetaTypes<S> {
    fn default() -> Self {
        MetaTypes(PhantomData)
    }
}
impl<S> PartialEq for MetaTypes<S> {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}
impl<S> Eq for MetaTypes<S> {}
impl<S> PartialOrd for MetaTypes<S> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<S> Ord for MetaTypes<S> {
    fn cmp(&self, _other: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}
impl<S> fmt::Debug for MetaTypes<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MetaTypes")
    }
}

impl<S: MetadataState> RaftTypeConfig for MetaTypes<S> {
    type D = S::Command;
    type R = S::Outcome;
    type NodeId = NodeId;
    type Node = BasicNode;
    type Entry = Entry<Self>;
    type SnapshotData = Cursor<Vec<u8>>;
    type AsyncRuntime = openraft::TokioRuntime;
    type Responder = openraft::impls::OneshotResponder<Self>;
}

/// How the environment is opened.
#[derive(Debug, Clone)]
pub(crate) struct MetaStoreOptions {
    /// Size of the memory map when opened; it doubles when full.
    pub(crate) map_size_bytes: usize,
    /// The map never grows past this; a write that needs more fails with
    /// [`MetaStoreError::MapFull`].
    pub(crate) max_map_size_bytes: usize,
}

impl Default for MetaStoreOptions {
    fn default() -> Self {
        MetaStoreOptions {
            map_size_bytes: 32 << 20,
            max_map_size_bytes: 1 << 30,
        }
    }
}

/// Why the store could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MetaStoreError {
    #[error("lmdb: {0}")]
    Lmdb(#[from] heed::Error),
    #[error("corrupt {what}: {why}")]
    Corrupt { what: &'static str, why: String },
    #[error("cannot encode {what}: {why}")]
    Encode { what: &'static str, why: String },
    #[error("{0}")]
    Mismatch(String),
    #[error("cannot create {path}: {source}")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("the metadata store's map is full at its maximum of {max_map_size_bytes} bytes")]
    MapFull { max_map_size_bytes: usize },
    #[error("storage task failed: {0}")]
    Task(String),
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_VALUE_BYTES>()
}

fn encode<T: Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>, MetaStoreError> {
    bincode::serde::encode_to_vec(value, bincode_config()).map_err(|error| MetaStoreError::Encode {
        what,
        why: error.to_string(),
    })
}

/// Decodes the whole of `raw`; trailing bytes are corruption too.
fn decode<T: DeserializeOwned>(raw: &[u8], what: &'static str) -> Result<T, MetaStoreError> {
    let corrupt = |why: String| MetaStoreError::Corrupt { what, why };
    let (value, used) = bincode::serde::decode_from_slice(raw, bincode_config())
        .map_err(|error| corrupt(error.to_string()))?;
    if used != raw.len() {
        return Err(corrupt(format!(
            "{} trailing bytes after the value",
            raw.len() - used
        )));
    }
    Ok(value)
}

/// `SNAPSHOT_FORMAT ++ bincode(state)`.
fn encode_snapshot<S: MetadataState>(state: &S) -> Result<Vec<u8>, MetaStoreError> {
    let mut out = vec![SNAPSHOT_FORMAT];
    out.extend_from_slice(&encode(state, "snapshot state")?);
    Ok(out)
}

fn decode_snapshot<S: MetadataState>(raw: &[u8]) -> Result<S, MetaStoreError> {
    match raw.split_first() {
        Some((&SNAPSHOT_FORMAT, rest)) => decode(rest, "snapshot state"),
        Some((format, _)) => Err(MetaStoreError::Corrupt {
            what: "snapshot",
            why: format!("unknown snapshot format {format}"),
        }),
        None => Err(MetaStoreError::Corrupt {
            what: "snapshot",
            why: "empty snapshot".to_string(),
        }),
    }
}

fn page_aligned(bytes: usize) -> usize {
    bytes.div_ceil(PAGE_BYTES) * PAGE_BYTES
}

/// The open environment, shared by the log store, its readers, the state machine and
/// snapshot builders.
struct Db {
    env: Env<WithoutTls>,
    log: Database<'static, U64<BigEndian>, Bytes>,
    raft: Database<'static, Bytes, Bytes>,
    machine: Database<'static, Bytes, Bytes>,
    /// Held shared by every transaction and exclusively by a map resize: LMDB must not
    /// resize the map while a transaction of this process is open.
    resize_gate: RwLock<()>,
    max_map_size_bytes: usize,
}

impl Db {
    fn open(dir: &Path, options: &MetaStoreOptions) -> Result<Db, MetaStoreError> {
        std::fs::create_dir_all(dir).map_err(|source| MetaStoreError::CreateDir {
            path: dir.display().to_string(),
            source,
        })?;
        let mut env_options = EnvOpenOptions::new().read_txn_without_tls();
        env_options
            .map_size(page_aligned(options.map_size_bytes))
            .max_dbs(DATABASES);
        // SAFETY: only this process opens this environment (heed refuses a second open of
        // the same path in one process), and it is never used across fork().
        let env = unsafe { env_options.open(dir)? };
        let cleared = env.clear_stale_readers()?;
        if cleared > 0 {
            tracing::info!(cleared, "cleared stale LMDB readers of the metadata store");
        }
        let txn = env.write_txn()?;
        let (log, raft, machine) = env
            .create_databases_and_commit(txn, |opener, txn| {
                let log = opener.create_database::<U64<BigEndian>, Bytes>(txn, Some("log"))?;
                let raft = opener.create_database::<Bytes, Bytes>(txn, Some("raft"))?;
                let machine = opener.create_database::<Bytes, Bytes>(txn, Some("machine"))?;
                Ok::<_, heed::Error>(CommitOrAbort::<_, ()>::Commit((log, raft, machine)))
            })?
            .unwrap_commit();
        let db = Db {
            env,
            log,
            raft,
            machine,
            resize_gate: RwLock::new(()),
            max_map_size_bytes: page_aligned(options.max_map_size_bytes),
        };
        db.check_format()?;
        Ok(db)
    }

    /// Writes the format version on first open; on later opens checks it.
    fn check_format(&self) -> Result<(), MetaStoreError> {
        let stored =
            self.read(|db, txn| Ok(db.raft.get(txn, FORMAT_VERSION_KEY)?.map(<[u8]>::to_vec)))?;
        match stored {
            None => self.write(|db, txn| {
                db.raft
                    .put(txn, FORMAT_VERSION_KEY, &FORMAT_VERSION.to_be_bytes())?;
                Ok(())
            }),
            Some(raw) => {
                let version = <[u8; 4]>::try_from(raw.as_slice())
                    .map(u32::from_be_bytes)
                    .map_err(|_| MetaStoreError::Corrupt {
                        what: "format version",
                        why: format!("{} bytes, not 4", raw.len()),
                    })?;
                if version != FORMAT_VERSION {
                    return Err(MetaStoreError::Mismatch(format!(
                        "metadata store format version {version} is not {FORMAT_VERSION} (this build's)"
                    )));
                }
                Ok(())
            }
        }
    }

    fn gate(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.resize_gate
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `work` in a read transaction.
    fn read<T>(
        &self,
        work: impl FnOnce(&Db, &RoTxn) -> Result<T, MetaStoreError>,
    ) -> Result<T, MetaStoreError> {
        let _gate = self.gate();
        let txn = self.env.read_txn()?;
        work(self, &txn)
    }

    /// Runs `work` in a write transaction and commits it (with a sync) if `work` succeeds.
    /// A full map aborts the transaction, grows the map and runs `work` again.
    fn write<T>(
        &self,
        work: impl Fn(&Db, &mut RwTxn) -> Result<T, MetaStoreError>,
    ) -> Result<T, MetaStoreError> {
        loop {
            let map_size = self.env.info().map_size;
            let result = {
                let _gate = self.gate();
                let mut txn = self.env.write_txn()?;
                match work(self, &mut txn) {
                    Ok(output) => txn.commit().map(|()| output).map_err(MetaStoreError::from),
                    // Dropping the transaction aborts it.
                    Err(error) => Err(error),
                }
            };
            match result {
                Err(MetaStoreError::Lmdb(heed::Error::Mdb(heed::MdbError::MapFull))) => {
                    self.grow_map(map_size)?;
                }
                other => return other,
            }
        }
    }

    /// Doubles the map, up to `max_map_size_bytes`, unless another writer already grew it
    /// past `full_size` (the size at which the caller's transaction did not fit).
    fn grow_map(&self, full_size: usize) -> Result<(), MetaStoreError> {
        let _gate = self
            .resize_gate
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let current = self.env.info().map_size;
        if current > full_size {
            return Ok(());
        }
        if current >= self.max_map_size_bytes {
            return Err(MetaStoreError::MapFull {
                max_map_size_bytes: self.max_map_size_bytes,
            });
        }
        let new_size = page_aligned(current.saturating_mul(2)).min(self.max_map_size_bytes);
        tracing::info!(
            new_size,
            "the metadata store's LMDB map is full; growing it"
        );
        // SAFETY: the gate is held exclusively, so no transaction of this process is open.
        unsafe { self.env.resize(new_size)? };
        Ok(())
    }

    fn get_log_id(
        &self,
        database: Database<'static, Bytes, Bytes>,
        txn: &RoTxn,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<MetaLogId>, MetaStoreError> {
        database
            .get(txn, key)?
            .map(|raw| decode(raw, what))
            .transpose()
    }
}

/// Runs a write on a blocking thread: the commit's fsync must not stall the runtime.
async fn write_blocking<T: Send + 'static>(
    db: &Arc<Db>,
    work: impl Fn(&Db, &mut RwTxn) -> Result<T, MetaStoreError> + Send + 'static,
) -> Result<T, MetaStoreError> {
    let db = Arc::clone(db);
    tokio::task::spawn_blocking(move || db.write(work))
        .await
        .map_err(|error| MetaStoreError::Task(error.to_string()))?
}

fn storage_error(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    error: MetaStoreError,
) -> MetaStorageError {
    StorageIOError::new(subject, verb, AnyError::new(&error)).into()
}

/// Opens (creating if needed) the metadata store in `dir` and returns its two halves for
/// `Raft::new`. Opening the same directory twice in one process fails.
///
/// ```text
/// let (log_store, state_machine) = open_meta_store::<NetworkInfo>(&dir, &MetaStoreOptions::default())?;
/// let applied = state_machine.subscribe(); // the NI as it is applied
/// let raft = MetaRaft::new(host_id, Arc::new(config.validate()?), network, log_store, state_machine).await?;
/// ```
pub(crate) fn open_meta_store<S: MetadataState>(
    dir: &Path,
    options: &MetaStoreOptions,
) -> Result<(MetaLogStore<S>, MetaStateMachine<S>), MetaStoreError> {
    let db = Arc::new(Db::open(dir, options)?);
    let applied = db.read(|db, txn| {
        let last_applied = db.get_log_id(db.machine, txn, APPLIED_KEY, "last applied log id")?;
        let membership = match db.machine.get(txn, MEMBERSHIP_KEY)? {
            Some(raw) => decode(raw, "applied membership")?,
            None => MetaMembership::default(),
        };
        let state = match db.machine.get(txn, STATE_KEY)? {
            Some(raw) => decode(raw, "state machine")?,
            None => S::default(),
        };
        Ok(AppliedState {
            last_applied,
            membership,
            state: Arc::new(state),
        })
    })?;
    let (published, _) = watch::channel(applied.clone());
    let log_store = MetaLogStore {
        db: Arc::clone(&db),
        _state: PhantomData,
    };
    let state_machine = MetaStateMachine {
        db,
        applied,
        published,
    };
    Ok((log_store, state_machine))
}

// ---------------------------------------------------------------------------------------
// The log store.

/// The Raft log and vote of the metadata group. Cloning it gives a log reader that shares
/// the environment.
pub(crate) struct MetaLogStore<S> {
    db: Arc<Db>,
    _state: PhantomData<fn() -> S>,
}

impl<S> Clone for MetaLogStore<S> {
    fn clone(&self) -> Self {
        MetaLogStore {
            db: Arc::clone(&self.db),
            _state: PhantomData,
        }
    }
}

impl<S: MetadataState> RaftLogReader<MetaTypes<S>> for MetaLogStore<S> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<MetaTypes<S>>>, MetaStorageError> {
        let bounds: (Bound<u64>, Bound<u64>) =
            (range.start_bound().cloned(), range.end_bound().cloned());
        self.db
            .read(|db, txn| {
                let mut entries = Vec::new();
                for item in db.log.range(txn, &bounds)? {
                    let (index, raw) = item?;
                    let entry: Entry<MetaTypes<S>> = decode(raw, "log entry")?;
                    if entry.log_id.index != index {
                        return Err(MetaStoreError::Corrupt {
                            what: "log entry",
                            why: format!("entry {} stored at index {index}", entry.log_id.index),
                        });
                    }
                    entries.push(entry);
                }
                Ok(entries)
            })
            .map_err(|error| storage_error(ErrorSubject::Logs, ErrorVerb::Read, error))
    }
}

impl<S: MetadataState> RaftLogStorage<MetaTypes<S>> for MetaLogStore<S> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<MetaTypes<S>>, MetaStorageError> {
        self.db
            .read(|db, txn| {
                let last_purged_log_id =
                    db.get_log_id(db.raft, txn, LAST_PURGED_KEY, "last purged log id")?;
                let last_entry = match db.log.last(txn)? {
                    Some((_, raw)) => Some(decode::<Entry<MetaTypes<S>>>(raw, "log entry")?.log_id),
                    None => None,
                };
                Ok(LogState {
                    last_purged_log_id,
                    last_log_id: last_entry.or(last_purged_log_id),
                })
            })
            .map_err(|error| storage_error(ErrorSubject::Logs, ErrorVerb::Read, error))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), MetaStorageError> {
        let write = |error| storage_error(ErrorSubject::Vote, ErrorVerb::Write, error);
        let raw = encode(vote, "vote").map_err(write)?;
        write_blocking(&self.db, move |db, txn| {
            Ok(db.raft.put(txn, VOTE_KEY, &raw)?)
        })
        .await
        .map_err(write)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, MetaStorageError> {
        self.db
            .read(|db, txn| {
                db.raft
                    .get(txn, VOTE_KEY)?
                    .map(|raw| decode(raw, "vote"))
                    .transpose()
            })
            .map_err(|error| storage_error(ErrorSubject::Vote, ErrorVerb::Read, error))
    }

    async fn save_committed(
        &mut self,
        committed: Option<MetaLogId>,
    ) -> Result<(), MetaStorageError> {
        let write = |error| storage_error(ErrorSubject::Store, ErrorVerb::Write, error);
        let raw = committed
            .map(|log_id| encode(&log_id, "committed log id"))
            .transpose()
            .map_err(write)?;
        write_blocking(&self.db, move |db, txn| {
            match &raw {
                Some(raw) => db.raft.put(txn, COMMITTED_KEY, raw)?,
                None => {
                    db.raft.delete(txn, COMMITTED_KEY)?;
                }
            }
            Ok(())
        })
        .await
        .map_err(write)
    }

    async fn read_committed(&mut self) -> Result<Option<MetaLogId>, MetaStorageError> {
        self.db
            .read(|db, txn| db.get_log_id(db.raft, txn, COMMITTED_KEY, "committed log id"))
            .map_err(|error| storage_error(ErrorSubject::Store, ErrorVerb::Read, error))
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<MetaTypes<S>>,
    ) -> Result<(), MetaStorageError>
    where
        I: IntoIterator<Item = Entry<MetaTypes<S>>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let write = |error| storage_error(ErrorSubject::Logs, ErrorVerb::Write, error);
        let encoded = entries
            .into_iter()
            .map(|entry| Ok((entry.log_id.index, encode(&entry, "log entry")?)))
            .collect::<Result<Vec<(u64, Vec<u8>)>, MetaStoreError>>()
            .map_err(write)?;
        if !encoded.is_empty() {
            write_blocking(&self.db, move |db, txn| {
                for (index, raw) in &encoded {
                    db.log.put(txn, index, raw)?;
                }
                Ok(())
            })
            .await
            .map_err(write)?;
        }
        // The entries are committed and synced: they are readable and durable.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: MetaLogId) -> Result<(), MetaStorageError> {
        let since = log_id.index;
        write_blocking(&self.db, move |db, txn| {
            db.log.delete_range(txn, &(since..))?;
            Ok(())
        })
        .await
        .map_err(|error| storage_error(ErrorSubject::Log(log_id), ErrorVerb::Delete, error))
    }

    async fn purge(&mut self, log_id: MetaLogId) -> Result<(), MetaStorageError> {
        let delete = |error| storage_error(ErrorSubject::Log(log_id), ErrorVerb::Delete, error);
        let raw = encode(&log_id, "last purged log id").map_err(delete)?;
        write_blocking(&self.db, move |db, txn| {
            let previous = db.get_log_id(db.raft, txn, LAST_PURGED_KEY, "last purged log id")?;
            if previous.is_some_and(|previous| previous >= log_id) {
                return Ok(());
            }
            db.raft.put(txn, LAST_PURGED_KEY, &raw)?;
            db.log.delete_range(txn, &(..=log_id.index))?;
            Ok(())
        })
        .await
        .map_err(delete)
    }
}

// ---------------------------------------------------------------------------------------
// The state machine.

/// The state machine's applied position and contents, as published to the cluster layer.
#[derive(Debug, Clone)]
pub struct AppliedState<S> {
    /// The last entry applied; `None` before the first.
    pub(crate) last_applied: Option<MetaLogId>,
    /// The last membership applied.
    pub(crate) membership: MetaMembership,
    /// The state after the last applied entry.
    pub state: Arc<S>,
}

/// A batch of committed entries applied in memory, before it is stored.
struct AppliedBatch<S: MetadataState> {
    /// The batch's last entry.
    last_applied: MetaLogId,
    /// The batch's last membership, if it has one.
    membership: Option<MetaMembership>,
    /// The state after the batch, if the batch has a command.
    state: Option<S>,
    /// What each entry answers, in order.
    outcomes: Vec<S::Outcome>,
}

impl<S: MetadataState> AppliedBatch<S> {
    /// Applies `entries` after `applied`; `None` when there are none. Blank and
    /// membership entries answer `Outcome::default()` and leave the state alone.
    fn apply(
        applied: &AppliedState<S>,
        entries: impl IntoIterator<Item = Entry<MetaTypes<S>>>,
    ) -> Option<AppliedBatch<S>> {
        let mut last_applied = None;
        let mut membership: Option<MetaMembership> = None;
        // Cloned on the first command only.
        let mut state: Option<S> = None;
        let mut outcomes = Vec::new();
        for entry in entries {
            last_applied = Some(entry.log_id);
            let outcome = match entry.payload {
                EntryPayload::Blank => S::Outcome::default(),
                EntryPayload::Normal(command) => state
                    .get_or_insert_with(|| (*applied.state).clone())
                    .apply(&command, entry.log_id.index),
                EntryPayload::Membership(config) => {
                    membership = Some(StoredMembership::new(Some(entry.log_id), config));
                    S::Outcome::default()
                }
            };
            outcomes.push(outcome);
        }
        Some(AppliedBatch {
            last_applied: last_applied?,
            membership,
            state,
            outcomes,
        })
    }

    /// The applied state after the batch, which followed `previous`, and the outcomes.
    fn into_applied(self, previous: &AppliedState<S>) -> (AppliedState<S>, Vec<S::Outcome>) {
        let applied = AppliedState {
            last_applied: Some(self.last_applied),
            membership: self
                .membership
                .unwrap_or_else(|| previous.membership.clone()),
            state: self
                .state
                .map_or_else(|| Arc::clone(&previous.state), Arc::new),
        };
        (applied, self.outcomes)
    }
}

/// The applied metadata state (the NI) and the last snapshot of it.
pub(crate) struct MetaStateMachine<S: MetadataState> {
    db: Arc<Db>,
    applied: AppliedState<S>,
    published: watch::Sender<AppliedState<S>>,
}

impl<S: MetadataState> MetaStateMachine<S> {
    /// Follows the applied state: the receiver sees every change after it is durable.
    /// Take it before the state machine moves into `Raft::new`.
    pub(crate) fn subscribe(&self) -> watch::Receiver<AppliedState<S>> {
        self.published.subscribe()
    }

    /// The applied state now.
    #[cfg(test)]
    pub(crate) fn applied(&self) -> &AppliedState<S> {
        &self.applied
    }

    /// Makes `applied` current, in memory, once it is durable.
    fn set_applied(&mut self, applied: AppliedState<S>) {
        self.applied = applied;
        self.published.send_replace(self.applied.clone());
    }
}

/// Builds a snapshot of the state machine as it was when the builder was taken.
pub(crate) struct MetaSnapshotBuilder<S> {
    db: Arc<Db>,
    applied: AppliedState<S>,
}

impl<S: MetadataState> RaftSnapshotBuilder<MetaTypes<S>> for MetaSnapshotBuilder<S> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<MetaTypes<S>>, MetaStorageError> {
        let applied = &self.applied;
        let snapshot_id = match applied.last_applied {
            Some(log_id) => format!(
                "{}-{}-{}-{}",
                log_id.leader_id.term,
                log_id.leader_id.node_id,
                log_id.index,
                shoal_shared::now_ms()
            ),
            None => format!("none-{}", shoal_shared::now_ms()),
        };
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership.clone(),
            snapshot_id,
        };
        let write = |error| {
            storage_error(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                error,
            )
        };
        let data = encode_snapshot(&*applied.state).map_err(write)?;
        let raw_meta = encode(&meta, "snapshot meta").map_err(write)?;
        let last_log_id = meta.last_log_id;
        let stored = data.clone();
        write_blocking(&self.db, move |db, txn| {
            // A snapshot installed meanwhile may be newer: keep it.
            let current: Option<SnapshotMeta<NodeId, BasicNode>> = db
                .machine
                .get(txn, SNAPSHOT_META_KEY)?
                .map(|raw| decode(raw, "snapshot meta"))
                .transpose()?;
            if current.is_some_and(|current| current.last_log_id > last_log_id) {
                return Ok(());
            }
            db.machine.put(txn, SNAPSHOT_META_KEY, &raw_meta)?;
            db.machine.put(txn, SNAPSHOT_DATA_KEY, &stored)?;
            Ok(())
        })
        .await
        .map_err(write)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl<S: MetadataState> RaftStateMachine<MetaTypes<S>> for MetaStateMachine<S> {
    type SnapshotBuilder = MetaSnapshotBuilder<S>;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<MetaLogId>, MetaMembership), MetaStorageError> {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<S::Outcome>, MetaStorageError>
    where
        I: IntoIterator<Item = Entry<MetaTypes<S>>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let Some(batch) = AppliedBatch::apply(&self.applied, entries) else {
            return Ok(Vec::new());
        };
        let applied_log_id = batch.last_applied;
        let write =
            |error| storage_error(ErrorSubject::Apply(applied_log_id), ErrorVerb::Write, error);
        let raw_applied = encode(&applied_log_id, "last applied log id").map_err(write)?;
        let raw_membership = batch
            .membership
            .as_ref()
            .map(|membership| encode(membership, "applied membership"))
            .transpose()
            .map_err(write)?;
        let raw_state = batch
            .state
            .as_ref()
            .map(|state| encode(state, "state machine"))
            .transpose()
            .map_err(write)?;
        write_blocking(&self.db, move |db, txn| {
            db.machine.put(txn, APPLIED_KEY, &raw_applied)?;
            if let Some(raw) = &raw_membership {
                db.machine.put(txn, MEMBERSHIP_KEY, raw)?;
            }
            if let Some(raw) = &raw_state {
                db.machine.put(txn, STATE_KEY, raw)?;
            }
            Ok(())
        })
        .await
        .map_err(write)?;
        let (applied, outcomes) = batch.into_applied(&self.applied);
        self.set_applied(applied);
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        MetaSnapshotBuilder {
            db: Arc::clone(&self.db),
            applied: self.applied.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, MetaStorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), MetaStorageError> {
        let signature = meta.signature();
        let fail = |verb, error| {
            storage_error(ErrorSubject::Snapshot(Some(signature.clone())), verb, error)
        };
        let data = snapshot.into_inner();
        let state: S = decode_snapshot(&data).map_err(|error| fail(ErrorVerb::Read, error))?;
        let encode_all = || -> Result<_, MetaStoreError> {
            Ok((
                meta.last_log_id
                    .map(|log_id| encode(&log_id, "last applied log id"))
                    .transpose()?,
                encode(&meta.last_membership, "applied membership")?,
                encode(&state, "state machine")?,
                encode(meta, "snapshot meta")?,
            ))
        };
        let (raw_applied, raw_membership, raw_state, raw_meta) =
            encode_all().map_err(|error| fail(ErrorVerb::Write, error))?;
        write_blocking(&self.db, move |db, txn| {
            match &raw_applied {
                Some(raw) => db.machine.put(txn, APPLIED_KEY, raw)?,
                None => {
                    db.machine.delete(txn, APPLIED_KEY)?;
                }
            }
            db.machine.put(txn, MEMBERSHIP_KEY, &raw_membership)?;
            db.machine.put(txn, STATE_KEY, &raw_state)?;
            db.machine.put(txn, SNAPSHOT_META_KEY, &raw_meta)?;
            db.machine.put(txn, SNAPSHOT_DATA_KEY, &data)?;
            Ok(())
        })
        .await
        .map_err(|error| fail(ErrorVerb::Write, error))?;
        self.set_applied(AppliedState {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            state: Arc::new(state),
        });
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<MetaTypes<S>>>, MetaStorageError> {
        self.db
            .read(|db, txn| {
                let Some(raw_meta) = db.machine.get(txn, SNAPSHOT_META_KEY)? else {
                    return Ok(None);
                };
                let meta: SnapshotMeta<NodeId, BasicNode> = decode(raw_meta, "snapshot meta")?;
                let data = db.machine.get(txn, SNAPSHOT_DATA_KEY)?.ok_or_else(|| {
                    MetaStoreError::Corrupt {
                        what: "snapshot",
                        why: "snapshot meta without its data".to_string(),
                    }
                })?;
                Ok(Some(Snapshot {
                    meta,
                    snapshot: Box::new(Cursor::new(data.to_vec())),
                }))
            })
            .map_err(|error| storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Read, error))
    }
}

pub mod memory;
#[cfg(test)]
mod tests;

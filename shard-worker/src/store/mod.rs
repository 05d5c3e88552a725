//! The shard's storage: one LMDB environment, applied in group commits.
//!
//! [`Store::apply_batch`] runs a whole batch of requests in one write
//! transaction. Each write and its commit-log entry go into that same
//! transaction, and the partition's `last_commit_id`/`mtime` in `meta` are
//! updated with them; the transaction's changes go into the journal (flushed
//! with `fsync` durability), then it commits once, without a sync of LMDB's own.
//! Only the caller sends replies, after this returns. When the
//! map is full the transaction is aborted, the map grows, and the batch is
//! replayed from the start. In-memory state (key locks, fences, the highest
//! commit id) changes only after a commit succeeds.
//!
//! A *fenced* partition is on its way to or from another host (see
//! `partitions`). `Store::apply_one` is the one place that refuses client
//! writes to it (`PartitionMoved`); reads are served; FLUSH, DBSIZE, SCAN,
//! KEYS, active expiry and log retention skip it. The set of fenced
//! partitions is kept in `meta` and loaded at open.
//!
//! The store reads the time only from the `Clock` it is opened with, once per write
//! transaction (see `clock`).
//!
//! Submodules:
//! - `clock`: where the time comes from (the system clock, or a manual one in tests),
//!   and which boot of the machine this is.
//! - `journal`: the record of every write transaction's changes, flushed before it
//!   commits, and the wrappers (`WriteTxn`, `Table`) through which the store writes.
//! - `checkpoint`: the snapshot whose pages are known to be on disk, pinned until
//!   the next; a power failure rewinds to it and replays the journal.
//! - `writeback`: batches acknowledged from the journal and kept in one LMDB
//!   transaction until the worker settles it ([`Store::settle`]).
//!
//! Submodules adding request handlers to [`Store`]:
//! - `keyspace`: a key's current state, writes with expiry index and log entry.
//! - `strings`: string, expiry and read commands.
//! - `types`: hashes, sets, sorted sets and lists (typed keys and their elements).
//! - `txns`: multi-key transactions (one-worker atomic writes, two-phase commit) and key locks.
//! - `scan`: SCAN, KEYS, DBSIZE, FLUSH.
//! - `log`: the commit log: reads, the change feed, retention.
//! - `partitions`: whole partitions exported, imported, replayed from another host's log,
//!   fenced and cleared (worker count changes, live handoff to another host).
//! - `replica`: a partition's replication state (promised term, log term history), the
//!   marker entry that opens a primary's term, and replicated entries with their history.
//! - `backup`: copies of the environment taken from a read snapshot, off the apply thread.
//!
//! This module never talks to sockets, and it never opens the environment of
//! another shard.

mod backup;
mod checkpoint;
mod clock;
mod journal;
mod keyspace;
mod log;
mod partitions;
mod replica;
mod scan;
mod strings;
mod txns;
mod types;
mod writeback;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};

use heed::{Env, EnvFlags, WithoutTls};
use shoal_shared::config::Durability;
use shoal_shared::frame::{
    versions, Collection, Key, Partition, WorkerError, WorkerRequest, WorkerResponse,
};

pub(crate) use clock::{Clock, SystemClock};
pub(crate) use journal::{Table, WriteTxn};
use shoal_shared::layout::typed::ElementTable;
use shoal_shared::layout::{self, PartitionMeta};
pub(crate) use shoal_shared::lmdb::StoreError;
use shoal_shared::lmdb::{create_database, free_bytes};
pub(crate) use txns::Locks;

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The shard the environment belongs to (its worker index). Recorded in `meta` when
    /// the environment is created; a later open with another id fails.
    pub shard_id: u32,
    /// Number of collections, one database (`c<N>`) each.
    pub collections: u16,
    /// Number of partitions the keys hash into. Recorded in `meta` when the environment
    /// is created; a later open with another count fails.
    pub partitions: u16,
    /// The worker count the environment belongs to; `None` while partitions are being
    /// moved between environments (the count is then being changed).
    pub workers: Option<u16>,
    /// `fsync`: each commit is synced. `async`: commits are not synced, and the owner
    /// flushes with [`Store::sync`].
    pub durability: Durability,
    /// Initial size of the memory map, in bytes (rounded up to whole pages). A full map
    /// is doubled, up to `max_map_size_bytes`.
    pub map_size_bytes: usize,
    /// Largest size the map may grow to, in bytes. At this limit the writes of a batch
    /// are refused with [`WorkerError::MapFull`]; reads go on.
    pub max_map_size_bytes: usize,
    /// Largest string value a write may store, in bytes; a larger one is refused with
    /// [`WorkerError::ValueTooLarge`].
    pub max_value_bytes: usize,
}

/// An open shard environment.
pub struct Store {
    env: Env<WithoutTls>,
    collections: Vec<Table>,
    expiry: Table,
    /// The element tables of typed keys, in [`ElementTable::ALL`] order.
    elements: Vec<Table>,
    /// Elements of old versions of typed keys, to remove in the background.
    reclaim: Table,
    log: Table,
    /// The log's newest entries, in the order they were written
    /// ([`layout::recent_key`]); moved into `log` every housekeeping tick.
    recent: Table,
    /// The sequence number of the next entry of `recent`.
    next_seq: u64,
    txns: Table,
    meta: Table,
    max_value_bytes: usize,
    max_map_size_bytes: usize,
    shard_id: u32,
    /// Highest commit id written by this store, over all its partitions.
    highest_commit_id: u64,
    /// Keys locked by prepared transactions.
    locks: Locks,
    /// Fenced partitions, as committed (the `fence` entries of `meta`).
    fences: BTreeSet<Partition>,
    /// How long the last commit (with its fsync) took, if the last transaction committed.
    last_commit: Option<std::time::Duration>,
    /// Held shared by every backup copy in progress and exclusively by a map resize:
    /// LMDB must not resize the map while a transaction of this process is open.
    resize_gate: Arc<RwLock<()>>,
    max_dbs: u32,
    /// The journal is flushed before each commit (`fsync` durability); with `async`,
    /// only by [`Store::sync`] and by commits that ask for it.
    sync_each_commit: bool,
    /// Where each write transaction reads the time.
    clock: Box<dyn Clock>,
    /// Every write transaction's changes, flushed before LMDB commits it (which it
    /// does without a sync).
    journal: journal::Journal,
    /// The last checkpoint and the one being taken.
    checkpoints: checkpoint::Checkpoints,
    /// Batches are acknowledged from the journal and LMDB commits them at
    /// [`Store::settle`] (`writeback`).
    write_back: bool,
    /// The write transaction write-back keeps open across batches.
    unsettled: Option<writeback::Unsettled>,
    /// The keys write-back's batches changed, until the worker takes them.
    touched: writeback::Touched,
    /// Write-back's batches found no room to commit: writes are refused until they do.
    stalled: Option<writeback::Stall>,
    /// Why the store refuses to go on: acknowledged batches are only in the journal.
    failed: Option<String>,
    /// The next commit of write-back's batches fails (tests of that failure).
    #[cfg(test)]
    fail_next_settle: bool,
}

/// State of one write transaction: partition counters advanced in it, and the
/// in-memory changes to make once it commits.
#[derive(Clone)]
pub(crate) struct Batch {
    partitions: HashMap<Partition, PartitionMeta>,
    now_ms: u64,
    lock_changes: Vec<txns::LockChange>,
    /// Fences set (`true`) or lifted in this transaction, in order.
    fence_changes: Vec<(Partition, bool)>,
    /// Something other than partition data changed (transaction records, the id mark).
    dirty: bool,
    /// The commit must reach the disk even with `async` durability (a replication promise).
    sync: bool,
    /// The sequence number of the next entry of `recent`.
    next_seq: u64,
    /// Write-back: `recent` has been emptied in this transaction, so that this batch's
    /// log entries go straight to `log` ([`Store::put_log_entry`]).
    recent_moved: bool,
}

impl Batch {
    fn new(now_ms: u64, next_seq: u64) -> Batch {
        Batch {
            partitions: HashMap::new(),
            now_ms,
            lock_changes: Vec::new(),
            fence_changes: Vec::new(),
            dirty: false,
            sync: false,
            next_seq,
            recent_moved: false,
        }
    }
}

/// Why one request failed: LMDB errors abort the batch; corrupt data fails only this request.
pub(crate) enum OpError {
    Lmdb(heed::Error),
    Corrupt(layout::CorruptError),
    /// The request is refused with this error; the batch goes on.
    Refused(WorkerError),
}

impl From<heed::Error> for OpError {
    fn from(error: heed::Error) -> Self {
        OpError::Lmdb(error)
    }
}

impl From<layout::CorruptError> for OpError {
    fn from(error: layout::CorruptError) -> Self {
        OpError::Corrupt(error)
    }
}

pub(crate) type OpResult = Result<WorkerResponse, OpError>;

/// The journal's and checkpoints' I/O errors are reported as LMDB's are, so that a
/// full disk is told apart the same way.
fn io_error(error: std::io::Error) -> StoreError {
    StoreError::Lmdb(heed::Error::Io(error))
}

fn page_aligned(bytes: usize) -> usize {
    const PAGE: usize = 4096;
    bytes.div_ceil(PAGE) * PAGE
}

impl Store {
    /// Opens (creating if needed) the environment at `dir`, checks its `meta`
    /// against `options`, clears readers left by crashed processes, and
    /// restores the key locks of prepared transactions. The store reads the time
    /// from the system clock.
    pub fn open(dir: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
        Store::open_with_clock(dir, options, SystemClock)
    }

    /// Opens the environment at `dir` as [`Store::open`] does; the store reads the time
    /// from `clock`.
    pub(crate) fn open_with_clock(
        dir: &Path,
        options: &StoreOptions,
        clock: impl Clock + 'static,
    ) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.display().to_string(),
            source,
        })?;
        let journal_dir = journal::dir(dir);
        journal::create_dir(&journal_dir).map_err(io_error)?;
        let boot_id = clock.boot_id().map_err(io_error)?;
        let checkpoint = checkpoint::Checkpoint::read(&journal_dir).map_err(io_error)?;
        let rewound = checkpoint
            .as_ref()
            .is_some_and(|checkpoint| checkpoint.boot_id != boot_id);
        if let Some(checkpoint) = &checkpoint {
            if rewound {
                // The machine restarted since the checkpoint: what LMDB wrote after it
                // may be on disk in part. Back to the checkpoint, then the journal.
                tracing::info!(
                    txnid = checkpoint.txnid,
                    "the machine restarted: rewinding the shard to its last checkpoint"
                );
                checkpoint::rewind(&dir.join("data.mdb"), checkpoint).map_err(io_error)?;
            }
        }
        let mut env_options = shoal_shared::lmdb::env_options(options.collections);
        env_options.map_size(page_aligned(options.map_size_bytes));
        // SAFETY: commits are made durable by the journal, and LMDB's pages by
        // checkpoints, which keep the last durable snapshot's pages from being reused.
        unsafe { env_options.flags(EnvFlags::NO_SYNC) };
        // SAFETY: only this process writes this environment, and it is never used across fork().
        let env = unsafe { env_options.open(dir)? };
        let cleared = env.clear_stale_readers()?;
        if cleared > 0 {
            tracing::info!(cleared, "cleared stale LMDB readers");
        }

        // The journal's records that the environment does not have.
        let position = journal::position(&env)?;
        let found = journal::read(
            &journal_dir,
            checkpoint
                .as_ref()
                .map_or(0, |checkpoint| checkpoint.segment),
        )
        .map_err(io_error)?;
        let mut missing: Vec<journal::Recorded> = found
            .records
            .into_iter()
            .filter(|r| r.seq > position)
            .collect();
        // Records acknowledged before LMDB committed them (write-back) are always
        // replayed. Without a restart of the machine the page cache kept every commit
        // LMDB made, so the other records missing are of commits LMDB never made (the
        // process stopped between the journal's append and LMDB's commit), none of
        // them acknowledged. They are cut off, not replayed: a read while the worker
        // was down saw the shard without them, and must not see them appear later.
        let acknowledged = missing.iter().take_while(|r| r.acknowledged).count();
        if !rewound && missing[acknowledged..].iter().any(|r| r.acknowledged) {
            // In one boot, a record of the other kind is missing only if its process
            // died before LMDB committed it, so it is the last: a mix is a journal this
            // code did not write, and cutting it off could drop acknowledged writes.
            // After a power failure every record since the checkpoint is replayed,
            // whatever its kind (write-back pauses and resumes with free space).
            return Err(StoreError::InDoubt(format!(
                "the journal in {} holds acknowledged records after a record of a commit \
                 never made; refusing to open the shard",
                journal_dir.display()
            )));
        }
        if let (false, Some(first)) = (rewound, missing.get(acknowledged)) {
            tracing::info!(
                transactions = missing.len() - acknowledged,
                after = position,
                "cutting off the journal's records of commits never made"
            );
            journal::cut_off(&journal_dir, first.segment, first.offset).map_err(io_error)?;
            missing.truncate(acknowledged);
        }
        // Before anything is written, the environment as it is becomes the checkpoint
        // to recover from: the pages of the last durable snapshot must not be reused
        // until a newer one is. The records still to replay stay in their segments
        // until they are journaled again.
        let mut checkpoints = checkpoint::Checkpoints::new(
            &journal_dir,
            checkpoint.as_ref().map(|checkpoint| checkpoint.txnid),
            missing.first().map(|r| r.segment),
        );
        match checkpoints.pin_current(&env, &boot_id) {
            Err(error) if error.is_out_of_room() && missing.is_empty() => {
                tracing::warn!(%error, "no room for a checkpoint: writes are refused until there is");
            }
            other => other?,
        }

        let mut tables = journal::Tables::default();
        let mut table = |name: &str| -> Result<Table, StoreError> {
            let db = match checkpoints.pin {
                Some(_) => create_database(&env, name)?,
                // Creating a database writes, and nothing may be written before a
                // checkpoint.
                None => shoal_shared::lmdb::open_database_if_present(&env, name)?
                    .ok_or_else(|| io_error(std::io::Error::from_raw_os_error(libc::ENOSPC)))?,
            };
            Ok(tables.add(name, db))
        };
        let mut collections = Vec::with_capacity(usize::from(options.collections));
        for collection in 0..options.collections {
            collections.push(table(&format!("c{collection}"))?);
        }
        let mut elements = Vec::with_capacity(ElementTable::ALL.len());
        for element_table in ElementTable::ALL {
            elements.push(table(element_table.name())?);
        }
        let (reclaim, expiry, log, recent, txns, meta) = (
            table("reclaim")?,
            table("expiry")?,
            table("log")?,
            table("recent")?,
            table("txns")?,
            table("meta")?,
        );
        let journal =
            journal::Journal::new(&journal_dir, &tables, meta, found.last_seq.max(position))
                .map_err(io_error)?;
        let mut store = Store {
            collections,
            elements,
            reclaim,
            expiry,
            log,
            recent,
            next_seq: 0,
            txns,
            meta,
            env,
            max_value_bytes: options.max_value_bytes,
            max_map_size_bytes: page_aligned(options.max_map_size_bytes),
            shard_id: options.shard_id,
            highest_commit_id: 0,
            locks: Locks::default(),
            fences: BTreeSet::new(),
            last_commit: None,
            resize_gate: Arc::default(),
            max_dbs: shoal_shared::lmdb::max_dbs(options.collections),
            sync_each_commit: options.durability == Durability::Fsync,
            clock: Box::new(clock),
            journal,
            checkpoints,
            write_back: false,
            unsettled: None,
            touched: writeback::Touched::default(),
            stalled: None,
            failed: None,
            #[cfg(test)]
            fail_next_settle: false,
        };
        store.replay_journal(missing, &tables, position)?;
        store.checkpoints.keep_from = None;
        store.check_meta(options)?;
        store.move_recent_at_open()?;
        store.locks = store.load_locks()?;
        store.fences = store.load_fences()?;
        match store.checkpoint() {
            Err(error) if error.is_out_of_room() => {
                tracing::warn!(%error, "no room for a checkpoint at start");
            }
            other => other?,
        }
        Ok(store)
    }

    /// Makes the journal's records that the environment lacks (those after `position`)
    /// again, in one transaction, which is journaled in turn.
    fn replay_journal(
        &mut self,
        missing: Vec<journal::Recorded>,
        tables: &journal::Tables,
        position: u64,
    ) -> Result<(), StoreError> {
        if missing.is_empty() {
            return Ok(());
        }
        tracing::info!(
            transactions = missing.len(),
            after = position,
            "replaying the journal"
        );
        self.in_write_txn(|_, txn, batch| {
            for record in &missing {
                record.replay(txn, tables).map_err(|error| match error {
                    journal::ReplayError::Lmdb(error) => error,
                    journal::ReplayError::Io(error) => heed::Error::Io(error),
                })?;
            }
            batch.dirty = true;
            Ok(())
        })
    }

    /// Moves `recent` into `log`, so that its sequence numbers start anew. A full map or
    /// disk leaves it where it is (the worker still opens, and serves reads): the
    /// numbers then go on after its last entry.
    fn move_recent_at_open(&mut self) -> Result<(), StoreError> {
        match self.move_recent() {
            Ok(_) => {}
            Err(error) if error.is_out_of_room() => {
                tracing::warn!(%error, "no room to move the log's newest entries: they stay in recent");
            }
            Err(error) => return Err(error),
        }
        let txn = self.env.read_txn()?;
        self.next_seq = match self.recent.last(&txn)? {
            Some((key, _)) => layout::decode_recent_key(key)? + 1,
            None => 0,
        };
        Ok(())
    }

    /// The database of an element table.
    pub(crate) fn element_db(&self, table: ElementTable) -> Table {
        self.elements[ElementTable::ALL
            .iter()
            .position(|t| *t == table)
            .unwrap_or_default()]
    }

    /// The fenced partitions recorded in `meta`.
    fn load_fences(&self) -> Result<BTreeSet<Partition>, StoreError> {
        let txn = self.env.read_txn()?;
        let mut fences = BTreeSet::new();
        for item in self.meta.prefix_iter(&txn, layout::META_FENCE_PREFIX)? {
            let (key, _) = item?;
            fences.insert(layout::decode_fence_key(key)?);
        }
        if !fences.is_empty() {
            tracing::info!(?fences, "fenced partitions");
        }
        Ok(fences)
    }

    /// Whether `partition` is fenced, as the transaction of `batch` sees it.
    pub(crate) fn is_fenced(&self, batch: &Batch, partition: Partition) -> bool {
        match batch
            .fence_changes
            .iter()
            .rev()
            .find(|(p, _)| *p == partition)
        {
            Some(&(_, fenced)) => fenced,
            None => self.fences.contains(&partition),
        }
    }

    /// The fenced partitions, as the transaction of `batch` sees them.
    pub(crate) fn fenced_partitions(&self, batch: &Batch) -> BTreeSet<Partition> {
        let mut fences = self.fences.clone();
        for &(partition, fenced) in &batch.fence_changes {
            if fenced {
                fences.insert(partition);
            } else {
                fences.remove(&partition);
            }
        }
        fences
    }

    /// The fenced partitions (as committed).
    #[cfg(test)]
    pub(crate) fn fences(&self) -> &BTreeSet<Partition> {
        &self.fences
    }

    /// Writes `meta`'s identity on first open; on later opens checks that it matches.
    fn check_meta(&mut self, options: &StoreOptions) -> Result<(), StoreError> {
        let env = self.env.clone();
        let mut txn = WriteTxn::new(env.write_txn()?);
        let mut upgrade = false;
        match self.meta.get(&txn, layout::META_FORMAT_VERSION)? {
            None => {
                self.meta.put(
                    &mut txn,
                    layout::META_FORMAT_VERSION,
                    &layout::FORMAT_VERSION.to_be_bytes(),
                )?;
                self.meta.put(
                    &mut txn,
                    layout::META_SHARD_ID,
                    &options.shard_id.to_be_bytes(),
                )?;
                let workers = options.workers.unwrap_or_default();
                self.meta.put(
                    &mut txn,
                    layout::META_LAYOUT,
                    &layout::encode_layout(options.partitions, workers),
                )?;
                self.ensure_checkpoint()?;
                self.journal.commit(txn, true)?;
                return Ok(());
            }
            Some(raw) => {
                let version = layout::decode_u32(raw, "format version")?;
                if !(layout::OLDEST_FORMAT_VERSION..=layout::FORMAT_VERSION).contains(&version) {
                    return Err(StoreError::Mismatch(format!(
                        "format version {version} is not one this build reads ({} to {})",
                        layout::OLDEST_FORMAT_VERSION,
                        layout::FORMAT_VERSION
                    )));
                }
                if version != layout::FORMAT_VERSION {
                    // Nothing to convert: the new database starts empty.
                    tracing::info!(
                        from = version,
                        to = layout::FORMAT_VERSION,
                        "upgrading the shard's format"
                    );
                    upgrade = true;
                }
            }
        }
        let shard_id = layout::decode_u32(
            self.meta
                .get(&txn, layout::META_SHARD_ID)?
                .unwrap_or_default(),
            "shard id",
        )?;
        if shard_id != options.shard_id {
            return Err(StoreError::Mismatch(format!(
                "environment belongs to shard {shard_id}, not {}",
                options.shard_id
            )));
        }
        let (partitions, workers) = layout::decode_layout(
            self.meta
                .get(&txn, layout::META_LAYOUT)?
                .unwrap_or_default(),
        )?;
        if partitions != options.partitions
            || options.workers.is_some_and(|expected| expected != workers)
        {
            return Err(StoreError::Mismatch(format!(
                "environment was created for {partitions} partitions on {workers} workers, not {} on {}",
                options.partitions,
                options.workers.map_or("any".to_string(), |w| w.to_string())
            )));
        }
        for (_, meta) in self.partition_metas(&txn)? {
            self.highest_commit_id = self.highest_commit_id.max(meta.last_commit_id);
        }
        if upgrade {
            self.meta.put(
                &mut txn,
                layout::META_FORMAT_VERSION,
                &layout::FORMAT_VERSION.to_be_bytes(),
            )?;
            self.ensure_checkpoint()?;
            self.journal.commit(txn, true)?;
        } else {
            txn.abort();
        }
        Ok(())
    }

    /// Every partition's `meta` entry.
    fn partition_metas(
        &self,
        txn: &heed::RoTxn,
    ) -> Result<Vec<(Partition, PartitionMeta)>, StoreError> {
        let mut metas = Vec::new();
        for item in self.meta.prefix_iter(txn, b"p")? {
            let (key, value) = item?;
            if let [b'p', high, low] = *key {
                metas.push((
                    u16::from_be_bytes([high, low]),
                    layout::decode_partition_meta(value)?,
                ));
            }
        }
        Ok(metas)
    }

    /// Highest commit id this shard has committed (over all its partitions).
    pub(crate) fn highest_commit_id(&self) -> u64 {
        self.highest_commit_id
    }

    /// Current size of the memory map.
    pub(crate) fn map_size(&self) -> usize {
        self.env.info().map_size
    }

    /// Bytes of the map in use.
    pub(crate) fn used_bytes(&self) -> usize {
        let page_size = self.env.unnamed_database_stat().page_size as usize;
        (self.env.info().last_page_number + 1) * page_size
    }

    /// Frees the reader-table slots of processes that died inside a read transaction
    /// (another process reading this environment, killed -9). Such a slot pins the
    /// snapshot it read, so until it is freed no page freed since can be reused and the
    /// data file keeps growing. Returns how many slots were freed.
    pub(crate) fn clear_stale_readers(&self) -> Result<usize, StoreError> {
        Ok(self.env.clear_stale_readers()?)
    }

    /// How long the last group commit took to commit and sync, if it wrote anything.
    pub(crate) fn last_commit(&self) -> Option<std::time::Duration> {
        self.last_commit
    }

    /// Flushes the journal (used with `async` durability).
    pub fn sync(&mut self) -> Result<(), StoreError> {
        self.journal.sync().map_err(io_error)
    }

    /// The key locks held by prepared transactions.
    pub(crate) fn locks(&self) -> &Locks {
        &self.locks
    }

    /// Applies `requests` in one write transaction and returns one response per request.
    /// On `Err`, nothing of the batch was committed. When the map cannot grow any more or
    /// the disk is full, the writes of the batch get [`WorkerError::MapFull`] or
    /// [`WorkerError::DiskFull`] and the reads are answered.
    pub fn apply_batch(
        &mut self,
        requests: &[&WorkerRequest],
    ) -> Result<Vec<WorkerResponse>, StoreError> {
        let refusal = match self.in_write_txn(|store, txn, batch| {
            requests
                .iter()
                .map(|request| store.apply_one(txn, batch, request))
                .collect()
        }) {
            Err(StoreError::Lmdb(heed::Error::Mdb(heed::MdbError::MapFull))) => {
                WorkerError::MapFull {
                    max_map_size_bytes: self.max_map_size_bytes,
                }
            }
            Err(StoreError::Lmdb(heed::Error::Io(error)))
                if self.out_of_space(&error, requests) =>
            {
                WorkerError::DiskFull
            }
            other => return other,
        };
        tracing::warn!(error = ?refusal, "refusing the writes of a batch");
        let reads: Vec<&WorkerRequest> =
            requests.iter().copied().filter(|r| !r.is_write()).collect();
        let read_responses: Vec<WorkerResponse> = self.in_write_txn(|store, txn, batch| {
            reads
                .iter()
                .map(|request| store.apply_one(txn, batch, request))
                .collect()
        })?;
        let mut read_responses = read_responses.into_iter();
        Ok(requests
            .iter()
            .map(|request| match request.is_write() {
                true => WorkerResponse::Error(refusal.clone()),
                false => read_responses
                    .next()
                    .unwrap_or(WorkerResponse::Error(refusal.clone())),
            })
            .collect())
    }

    /// Runs `work` in a write transaction and commits it if it wrote anything. A full map
    /// aborts the transaction, grows the map and runs `work` again. In-memory changes
    /// recorded in the batch are made after the commit.
    fn in_write_txn<T>(
        &mut self,
        work: impl Fn(&Store, &mut WriteTxn, &mut Batch) -> heed::Result<T>,
    ) -> Result<T, StoreError> {
        self.check_failed()?;
        loop {
            let mut open = match self.unsettled.take() {
                Some(open) => open,
                None => writeback::Unsettled::begin(
                    &self.env,
                    writeback::Held::new(self.journal.segment()),
                )?,
            };
            let mut batch = Batch::new(self.clock.now_ms(), self.next_seq);
            let result = work(self, open.txn(), &mut batch).and_then(|output| {
                let mut highest = self.highest_commit_id;
                for (&partition, &meta) in &batch.partitions {
                    self.meta.put(
                        open.txn(),
                        &layout::partition_meta_key(partition),
                        &layout::encode_partition_meta(meta),
                    )?;
                    highest = highest.max(meta.last_commit_id);
                }
                Ok((output, highest))
            });
            match result {
                Ok((output, highest)) => {
                    // A transaction that changed nothing is aborted, which costs no fsync.
                    // The id high-water mark and transaction records count as changes.
                    self.last_commit = None;
                    let changed = !batch.partitions.is_empty()
                        || batch.dirty
                        || (self.write_back && open.txn().has_changes());
                    if !changed {
                        if open.is_empty() {
                            drop(open.into_held());
                        } else {
                            self.unsettled = Some(open);
                        }
                    } else {
                        let started = std::time::Instant::now();
                        let sync = self.sync_each_commit || batch.sync;
                        if self.write_back {
                            if !self.append_acknowledged(open, sync)? {
                                continue;
                            }
                        } else {
                            self.ensure_checkpoint()?;
                            match open.finish(|txn| self.journal.commit(txn, sync)) {
                                // The commit itself may need pages (for the free list).
                                Err(heed::Error::Mdb(heed::MdbError::MapFull)) => {
                                    self.grow_map()?;
                                    continue;
                                }
                                result => result?,
                            }
                        }
                        self.last_commit = Some(started.elapsed());
                    }
                    self.highest_commit_id = highest;
                    self.next_seq = batch.next_seq;
                    self.locks.apply(batch.lock_changes);
                    for (partition, fenced) in batch.fence_changes {
                        if fenced {
                            self.fences.insert(partition);
                        } else {
                            self.fences.remove(&partition);
                        }
                    }
                    return Ok(output);
                }
                Err(heed::Error::Mdb(heed::MdbError::MapFull)) => {
                    self.regrow(open.into_held())?;
                }
                Err(error) => {
                    // The acknowledged batches before this one are made again.
                    self.restore(open.into_held())?;
                    return Err(error.into());
                }
            }
        }
    }

    /// Write-back: journals the batch just applied in `open` as acknowledged, and keeps
    /// the transaction open. Returns false when the map had to grow: the batch is to be
    /// applied again. On an error, and while the batches before cannot be committed
    /// for want of room ([`Store::settle`]), the batch is undone (the transaction is
    /// aborted and the batches before are made again) and refused.
    fn append_acknowledged(
        &mut self,
        mut open: writeback::Unsettled,
        sync: bool,
    ) -> Result<bool, StoreError> {
        if let Some(error) = self.stall_error() {
            self.restore(open.into_held())?;
            return Err(error);
        }
        if open.is_empty() {
            // The first batch of a window: the journal is where the checkpoint expects.
            if let Err(error) = self.ensure_checkpoint() {
                drop(open.into_held());
                return Err(error);
            }
            open = writeback::Unsettled::rebase(open, self.journal.segment());
        }
        match self.journal.append_acknowledged(open.txn(), sync) {
            Ok(changes) => {
                self.note_touched(&changes);
                open.push(changes);
                self.unsettled = Some(open);
                Ok(true)
            }
            Err(heed::Error::Mdb(heed::MdbError::MapFull)) => {
                // The record's position needed a page.
                self.regrow(open.into_held())?;
                Ok(false)
            }
            Err(error) => {
                self.restore(open.into_held())?;
                Err(error.into())
            }
        }
    }

    /// Whether a failed write was the disk filling up: ENOSPC, or the EIO that LMDB reports
    /// for a short write, when the filesystem has less room than the batch needs.
    fn out_of_space(&self, error: &std::io::Error, requests: &[&WorkerRequest]) -> bool {
        match error.raw_os_error() {
            Some(libc::ENOSPC) => true,
            Some(libc::EIO) => {
                let needed: usize = requests
                    .iter()
                    .map(|request| request.payload_bytes())
                    .sum::<usize>()
                    + (1 << 20);
                free_bytes(self.env.path()).is_some_and(|free| free < needed as u64)
            }
            _ => false,
        }
    }

    /// Doubles the map, up to `max_map_size_bytes`. Fails with MapFull at the limit.
    fn grow_map(&mut self) -> Result<(), StoreError> {
        debug_assert!(
            self.unsettled.is_none(),
            "the map is resized with no write transaction open"
        );
        let current = self.map_size();
        if current >= self.max_map_size_bytes {
            return Err(StoreError::Lmdb(heed::Error::Mdb(heed::MdbError::MapFull)));
        }
        let new_size = page_aligned(current.saturating_mul(2)).min(self.max_map_size_bytes);
        tracing::info!(
            new_size,
            "LMDB map is full; growing it and replaying the batch"
        );
        // The map may not be resized while a transaction is open, the checkpoint's pin
        // included: the environment as it is becomes the checkpoint, and its pin is
        // taken again after the resize (nothing is written in between).
        self.checkpoint()?;
        self.checkpoints.pin = None;
        // A backup copy holds a read transaction: wait until it is done.
        let _gate = self
            .resize_gate
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // SAFETY: no transaction of this environment is open: the caller dropped (aborted)
        // its transaction before growing, the worker holds no other transaction, and the
        // gate keeps backup copies (the only other users of the environment) out.
        unsafe { self.env.resize(new_size)? };
        self.checkpoints.pin = Some(self.env.clone().static_read_txn()?);
        Ok(())
    }

    fn collection(&self, collection: Collection) -> Option<Table> {
        self.collections.get(usize::from(collection)).copied()
    }

    /// Applies one request of a batch. This is where a client write to a fenced partition
    /// is refused, before it reads or writes anything.
    fn apply_one(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        request: &WorkerRequest,
    ) -> heed::Result<WorkerResponse> {
        if !self.fences.is_empty() || !batch.fence_changes.is_empty() {
            let fenced = request
                .client_partitions()
                .into_iter()
                .find(|&partition| self.is_fenced(batch, partition));
            if let Some(partition) = fenced {
                return Ok(WorkerResponse::Error(WorkerError::PartitionMoved {
                    partition,
                }));
            }
        }
        let result = match request {
            WorkerRequest::Atomic { ops } => self.atomic(txn, batch, ops),
            WorkerRequest::Prepare { txid, decider, ops } => {
                self.prepare(txn, batch, *txid, *decider, ops)
            }
            WorkerRequest::Commit { txid } => self.commit(txn, batch, *txid),
            WorkerRequest::Abort { txid } => self.abort(txn, batch, *txid),
            WorkerRequest::Decide {
                txid,
                older_than_ms,
            } => self.decide(txn, batch, *txid, *older_than_ms),
            WorkerRequest::Decided { older_than_ms } => self.decided(txn, batch, *older_than_ms),
            WorkerRequest::InDoubt { older_than_ms } => self.in_doubt(txn, batch, *older_than_ms),
            WorkerRequest::Forget { txid } => self.forget(txn, batch, *txid),
            WorkerRequest::Transactions => self.transactions(txn, batch),
            WorkerRequest::ReadLog {
                partition,
                from_commit_id,
                count,
            } => self.read_log(txn, *partition, *from_commit_id, *count),
            WorkerRequest::ReadFeed { positions, count } => self.read_feed(txn, positions, *count),
            WorkerRequest::LastCommitIds => self.last_commit_ids(txn),
            // The worker settles after the batch.
            WorkerRequest::Settle => Ok(WorkerResponse::Ok),
            WorkerRequest::ReserveIds { high_water } => self.reserve_ids(txn, batch, *high_water),
            WorkerRequest::IdHighWater => self.id_high_water(txn),
            WorkerRequest::Flush {
                collection,
                partition,
            } => self.flush(txn, batch, *collection, *partition),
            WorkerRequest::ExportPartition {
                partition,
                from,
                max_bytes,
            } => self.export_request(txn, batch, *partition, from, *max_bytes),
            WorkerRequest::ImportRecords { records } => self.import_in(txn, batch, records),
            WorkerRequest::ApplyLog { entries } => self.apply_log_in(txn, batch, entries),
            WorkerRequest::ClearPartition { partition } => {
                self.clear_request(txn, batch, *partition)
            }
            WorkerRequest::SetFence { partition, fenced } => {
                self.set_fence(txn, batch, *partition, *fenced)
            }
            WorkerRequest::Fences => self.fences_reply(batch),
            WorkerRequest::PromiseTerm { partition, term } => {
                self.promise_term(txn, batch, *partition, *term)
            }
            WorkerRequest::SetCopying { partition, copying } => {
                self.set_copying(txn, batch, *partition, *copying)
            }
            WorkerRequest::HoldLog { partition, from } => {
                self.hold_log(txn, batch, *partition, *from)
            }
            WorkerRequest::OpenTerm { partition, term } => {
                self.open_term(txn, batch, *partition, *term)
            }
            WorkerRequest::Replicate {
                partition,
                entries,
                history,
            } => self.replicate(txn, batch, *partition, entries, history),
            WorkerRequest::Typed {
                collection,
                key,
                op,
            } => self.typed(txn, batch, *collection, key, op),
            WorkerRequest::CommitIds { collection, keys } => {
                self.commit_ids(txn, *collection, keys)
            }
            WorkerRequest::Versions {
                collection, keys, ..
            } => self.versions(txn, batch, *collection, keys),
            WorkerRequest::Exec { watched, requests } => {
                return self.exec(txn, batch, watched, requests);
            }
            WorkerRequest::ExecDryRun { requests } => {
                return self.exec_dry_run(txn, batch, requests);
            }
            _ => self.keyed(txn, batch, request),
        };
        match result {
            Ok(response) => Ok(response),
            Err(OpError::Lmdb(error)) => Err(error),
            Err(OpError::Corrupt(error)) => Ok(WorkerResponse::Error(WorkerError::Storage(
                error.to_string(),
            ))),
            Err(OpError::Refused(error)) => Ok(WorkerResponse::Error(error)),
        }
    }

    /// The commit id that last wrote each key (0: missing or expired), for WATCH.
    fn commit_ids(&self, txn: &WriteTxn, collection: Collection, keys: &[Key]) -> OpResult {
        let now_ms = self.clock.now_ms();
        let mut ids = Vec::with_capacity(keys.len());
        for key in keys {
            ids.push((
                key.partition,
                self.commit_id_of(txn, collection, key, now_ms)?,
            ));
        }
        Ok(WorkerResponse::Positions(ids))
    }

    /// Each key's version, or `LOCKED` ([`shoal_shared::frame::versions`]).
    fn versions(
        &self,
        txn: &WriteTxn,
        batch: &Batch,
        collection: Collection,
        keys: &[Key],
    ) -> OpResult {
        let db = self.db(collection)?;
        let mut answer = Vec::with_capacity(keys.len());
        for key in keys {
            let version = if self.locks.holder(collection, key).is_some() {
                versions::LOCKED
            } else {
                let stored = db.get(txn, &layout::data_key(key.partition, &key.bytes))?;
                match stored.map(layout::decode_value).transpose()? {
                    Some(live) if live.expires_at_ms.is_none_or(|at| at > batch.now_ms) => {
                        live.commit_id
                    }
                    _ => {
                        let meta = self.partition_meta(txn, batch, key.partition)?;
                        versions::MISSING | meta.last_commit_id
                    }
                }
            };
            answer.push((key.partition, version));
        }
        Ok(WorkerResponse::Positions(answer))
    }

    /// The commit id that last wrote `key` (0: missing or expired at `now_ms`).
    pub(crate) fn commit_id_of(
        &self,
        txn: &WriteTxn,
        collection: Collection,
        key: &Key,
        now_ms: u64,
    ) -> Result<u64, OpError> {
        let db = self.db(collection)?;
        Ok(
            match db.get(txn, &layout::data_key(key.partition, &key.bytes))? {
                Some(raw) => {
                    let stored = layout::decode_value(raw)?;
                    match stored.expires_at_ms {
                        Some(at) if at <= now_ms => 0,
                        _ => stored.commit_id,
                    }
                }
                None => 0,
            },
        )
    }

    /// EXEC across workers, first step: runs `requests` in a nested transaction, notes
    /// what each key they touch was and became, and aborts it (the batch's state too):
    /// nothing changes. The coordinator then commits the effects through two-phase
    /// commit, each expecting its key unchanged since.
    fn exec_dry_run(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        requests: &[WorkerRequest],
    ) -> heed::Result<WorkerResponse> {
        let mut keys: Vec<(Collection, Key)> = Vec::new();
        for (collection, key) in requests.iter().flat_map(WorkerRequest::keys) {
            if !keys.iter().any(|(c, k)| *c == collection && k == key) {
                keys.push((collection, key.clone()));
            }
        }
        let refused = |error: OpError| match error {
            OpError::Lmdb(error) => Err(error),
            OpError::Corrupt(error) => Ok(WorkerError::Storage(error.to_string())),
            OpError::Refused(error) => Ok(error),
        };
        let mut before = Vec::with_capacity(keys.len());
        for (collection, key) in &keys {
            match self.commit_id_of(txn, *collection, key, batch.now_ms) {
                Ok(id) => before.push(id),
                Err(error) => return refused(error).map(WorkerResponse::Error),
            }
        }
        let saved = batch.clone();
        let mut child = WriteTxn::new(self.env.nested_write_txn(txn.inner())?);
        let mut responses = Vec::with_capacity(requests.len());
        for request in requests {
            responses.push(match request {
                WorkerRequest::Exec { .. } | WorkerRequest::ExecDryRun { .. } => {
                    WorkerResponse::Error(WorkerError::Storage("EXEC inside EXEC".into()))
                }
                request => self.apply_one(&mut child, batch, request)?,
            });
        }
        let mut effects = Vec::with_capacity(keys.len());
        for ((collection, key), commit_id) in keys.into_iter().zip(before) {
            let effect = self
                .commit_id_of(&child, collection, &key, batch.now_ms)
                .and_then(|after| match after == commit_id {
                    true => Ok(None),
                    false => self
                        .final_write(&child, collection, &key, batch.now_ms)
                        .map(Some),
                });
            match effect {
                Ok(write) => effects.push(shoal_shared::frame::TxEffect {
                    collection,
                    key,
                    commit_id,
                    write,
                }),
                Err(error) => {
                    child.abort();
                    *batch = saved;
                    return refused(error).map(WorkerResponse::Error);
                }
            }
        }
        child.abort();
        *batch = saved;
        Ok(WorkerResponse::DryRun { responses, effects })
    }

    /// The write that gives `key` the state it has in `txn`.
    fn final_write(
        &self,
        txn: &WriteTxn,
        collection: Collection,
        key: &Key,
        now_ms: u64,
    ) -> Result<shoal_shared::frame::TxAction, OpError> {
        use shoal_shared::frame::TxAction;
        let current = self.current(txn, self.db(collection)?, key, now_ms)?;
        Ok(match current.live {
            None => TxAction::Delete,
            Some(live) => match &live.typed {
                Some(meta) => TxAction::PutCollection {
                    snapshot: self.snapshot(txn, key, meta)?,
                    expires_at_ms: live.expires_at_ms,
                    if_absent: false,
                },
                None => TxAction::Put {
                    value: live.value,
                    expires_at_ms: live.expires_at_ms,
                    if_absent: false,
                },
            },
        })
    }

    /// EXEC: refused as a whole (`Exec(None)`) when a watched key's commit id changed;
    /// otherwise each request is applied in order in this transaction, each answered
    /// as on its own (an error in one leaves the others applied, as in Redis).
    fn exec(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        watched: &[(Collection, Key, u64)],
        requests: &[WorkerRequest],
    ) -> heed::Result<WorkerResponse> {
        for (collection, key, seen) in watched {
            let now = match self.commit_ids(txn, *collection, std::slice::from_ref(key)) {
                Ok(WorkerResponse::Positions(ids)) => ids.first().map_or(0, |(_, id)| *id),
                Ok(_) => 0,
                Err(OpError::Lmdb(error)) => return Err(error),
                Err(_) => u64::MAX,
            };
            if now != *seen {
                return Ok(WorkerResponse::Exec(None));
            }
        }
        let mut responses = Vec::with_capacity(requests.len());
        for request in requests {
            let response = match request {
                WorkerRequest::Exec { .. } => {
                    WorkerResponse::Error(WorkerError::Storage("EXEC inside EXEC".into()))
                }
                request => self.apply_one(txn, batch, request)?,
            };
            responses.push(response);
        }
        Ok(WorkerResponse::Exec(Some(responses)))
    }

    fn reserve_ids(&self, txn: &mut WriteTxn, batch: &mut Batch, high_water: u64) -> OpResult {
        let current = match self.meta.get(txn, layout::META_IDS_HIGH_WATER)? {
            Some(raw) => layout::decode_u64(raw, "id high-water mark")?,
            None => 0,
        };
        if high_water > current {
            self.meta
                .put(txn, layout::META_IDS_HIGH_WATER, &high_water.to_be_bytes())?;
            batch.dirty = true;
        }
        Ok(WorkerResponse::Ok)
    }

    fn id_high_water(&self, txn: &WriteTxn) -> OpResult {
        let high_water = match self.meta.get(txn, layout::META_IDS_HIGH_WATER)? {
            Some(raw) => layout::decode_u64(raw, "id high-water mark")?,
            None => 0,
        };
        Ok(WorkerResponse::Integer(high_water as i64))
    }

    /// Deletes keys whose time to live has passed, at most `limit` of them, skipping keys
    /// locked by a transaction and keys of fenced partitions. Each deletion is logged.
    /// Returns how many were deleted.
    pub(crate) fn expire_due(&mut self, limit: usize) -> Result<usize, StoreError> {
        self.in_write_txn(|store, txn, batch| store.expire_due_in(txn, batch, limit))
    }

    /// Removes up to `limit` elements of deleted typed keys (see `keyspace`); returns how
    /// many were removed.
    pub(crate) fn reclaim_due(&mut self, limit: usize) -> Result<usize, StoreError> {
        self.in_write_txn(|store, txn, batch| store.reclaim_due_in(txn, batch, limit))
    }

    /// Trims each partition's log to the retention limits, at most `limit` entries per call.
    pub(crate) fn trim_log(
        &mut self,
        keep_entries: u64,
        keep_ms: Option<u64>,
        limit: usize,
    ) -> Result<usize, StoreError> {
        self.in_write_txn(|store, txn, batch| {
            store.trim_log_in(txn, batch, keep_entries, keep_ms, limit)
        })
    }
}

#[cfg(test)]
mod tests;

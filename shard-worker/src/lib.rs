//! The shard-worker process: it owns one LMDB environment and is its only writer.
//!
//! It accepts the net-daemon on a Unix socket (`<data_dir>/run/shard-<i>.sock`),
//! reads request frames, and applies them in group commits: everything that has
//! arrived on its connections goes into one write transaction, committed and synced
//! once, and only then are the replies sent. Requests on keys locked by a prepared
//! transaction wait (in order) until it resolves. A partition being handed
//! over to or from another host can be fenced: the store then refuses client
//! writes to it while the net-daemon copies it and replays its log. A backup
//! request is handed to a thread of its own, which copies the environment from
//! a read snapshot while the group commits go on. Between batches it expires
//! keys through the expiry index and trims the commit log. It reports its
//! state and counters in its slot of the status table.
//!
//! It never talks to clients or to other hosts, and never touches another
//! shard's environment.
//!
//! Modules:
//! - `float`: INCRBYFLOAT arithmetic in long double, as Redis does it.
//! - [`store`]: the environment and the group-commit apply.
//! - `link`: the socket threads that read requests and write responses.
//! - [`rebalance`]: moving partitions between shards when the worker count changes.
//! - `fuzzing` (hidden): the layout decoders' properties, for fuzz targets and tests.

mod float;
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod link;
pub mod rebalance;
pub mod store;

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use shoal_shared::config::{Config, Durability};
use shoal_shared::frame::{
    Collection, Key, Partition, ResponseEnvelope, WorkerError, WorkerRequest, WorkerResponse,
};
use shoal_shared::pending::{self, PendingKeys};
use shoal_shared::status::{
    Field, ProcessState, Slot, StatusTable, BATCH_SIZE_BOUNDS, COMMIT_MICROS_BOUNDS,
    PREPARED_UNKNOWN,
};

use crate::link::{Link, Queued};
use crate::store::{Store, StoreError, StoreOptions, SystemClock};

/// Most requests applied in one group commit.
const MAX_BATCH: usize = 4096;
/// How often the worker does its housekeeping (heartbeat, expiry, log retention, flush).
const TICK: Duration = Duration::from_millis(100);
/// How often housekeeping frees reader slots left by dead processes (one scan of the
/// lock file's reader table; `Store::open` does it once at start as well).
const READER_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Most keys expired per tick, so that expiry never stalls the group commit for long.
const EXPIRE_PER_TICK: usize = 2000;
/// Most elements of deleted typed keys removed per tick.
const RECLAIM_PER_TICK: usize = 20_000;
/// Most log entries trimmed per tick.
const TRIM_PER_TICK: usize = 5000;
/// Longest a request waits for a key locked by a transaction before it fails.
const DEFER_TIMEOUT: Duration = Duration::from_secs(4);
/// Write-back: the bytes of acknowledged batches past which LMDB commits them before
/// their window is over.
const MAX_UNSETTLED_BYTES: usize = 64 << 20;
/// Write-back: how long batches wait for LMDB's commit once GET or MGET reads come to
/// the worker, which the net-daemon sends there for keys with unsettled writes: the
/// sooner LMDB holds them, the sooner the net-daemon reads those keys itself again.
const READ_WINDOW: Duration = Duration::from_millis(5);
/// Write-back: how long after a commit that found no room the next try comes.
const STALL_RETRY: Duration = Duration::from_secs(1);

/// Runs shard-worker `index` until SIGTERM; returns after a clean drain.
pub fn run(config: &Config, index: usize) -> anyhow::Result<()> {
    let status = StatusTable::open(&config.status_path()).context("opening the status table")?;
    let slot = status.slot(index);
    slot.claim();
    slot.set(Field::Prepared, PREPARED_UNKNOWN);

    let shutdown = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&shutdown))
        .context("installing the SIGTERM handler")?;

    let options = StoreOptions {
        shard_id: index as u32,
        collections: config.storage.collections,
        partitions: config.storage.partitions,
        workers: Some(config.workers as u16),
        durability: config.storage.durability,
        map_size_bytes: config.storage.map_size_bytes,
        max_map_size_bytes: config.storage.max_map_size_bytes,
        max_value_bytes: config.client.max_value_bytes,
    };
    let shard_dir = config.shard_dir(index);
    let mut store = Store::open_with_clock(&shard_dir, &options, SystemClock)
        .with_context(|| format!("opening {}", shard_dir.display()))?;
    slot.set(Field::LastCommitId, store.highest_commit_id());
    // Replication, handoff and the cluster's reads read LMDB's log and counters
    // directly: in a cluster every group commit is committed.
    let writeback =
        (config.storage.writeback_ms > 0 && config.cluster.secret.is_none()).then(|| WriteBack {
            window: Duration::from_millis(config.storage.writeback_ms),
            idle: (config.storage.writeback_idle_ms > 0)
                .then(|| Duration::from_millis(config.storage.writeback_idle_ms)),
            min_free_bytes: config.storage.writeback_min_free_bytes,
            max_changes: config.storage.writeback_max_changes,
        });
    store.set_write_back(writeback.is_some())?;
    // Kept from a predecessor that died with unsettled batches: its marks stay until
    // here.
    let pending = writeback
        .map(|_| PendingKeys::open_or_create(&config.pending_path(index)))
        .transpose()
        .context("opening the pending-key index")?;
    // The journal is replayed: LMDB holds every acknowledged write, and the net-daemon
    // may read the shard directly again.
    if let Some(pending) = &pending {
        pending.clear();
    }
    slot.set(Field::Unsettled, pending::SETTLED);

    let mut link = link::Link::listen(&config.worker_socket(index))?;
    slot.set_state(ProcessState::Ready);
    tracing::info!(shard = index, dir = %shard_dir.display(), "shard worker ready");

    let mut worker = Worker {
        index,
        backup_running: Arc::new(AtomicBool::new(false)),
        store: &mut store,
        slot,
        flush_every: (config.storage.durability == Durability::Async)
            .then(|| Duration::from_millis(config.storage.flush_interval_ms)),
        last_flush: Instant::now(),
        dirty: false,
        deferred: VecDeque::new(),
        retention: Retention {
            keep_entries: config.storage.log_retention_entries,
            keep_ms: (config.storage.log_retention_secs > 0)
                .then(|| config.storage.log_retention_secs * 1000),
        },
        last_housekeeping: Instant::now(),
        last_reader_check: Instant::now(),
        writeback,
        pending,
        unsettled: pending::SETTLED,
        settle_retry_at: None,
        last_write: Instant::now(),
        reads_waiting: false,
        prepared_word: PREPARED_UNKNOWN,
        prepared_committed: 0,
    };
    worker.publish_prepared();
    // On a disk with little room, write-back is paused from the first write on.
    worker.watch_free_space()?;
    // A failed commit leaves the environment in doubt: nothing more is written, and the
    // next start recovers from the journal.
    worker.serve(&mut link, &shutdown)?;
    slot.set_state(ProcessState::Draining);
    // What the net-daemon sent and the link holds, read or not yet: apply it before leaving.
    let drained = worker.drain(&mut link)?;
    // What is in the journal reaches the disk, and then LMDB's own pages: the next
    // start replays nothing.
    worker
        .store
        .sync()
        .context("flushing the journal on shutdown")?;
    worker
        .store
        .checkpoint()
        .context("checkpoint on shutdown")?;
    slot.set(Field::Unsettled, pending::SETTLED);
    slot.set_state(ProcessState::Stopped);
    tracing::info!(shard = index, drained, "shard worker stopped");
    Ok(())
}

/// Write-back's settings (`storage.writeback_ms`, `storage.writeback_idle_ms`).
#[derive(Clone, Copy)]
struct WriteBack {
    /// How long acknowledged batches may wait for LMDB's commit.
    window: Duration,
    /// A pause in client writes this long commits them before the window is over, so
    /// that the net-daemon reads the shard directly again soon after a burst.
    idle: Option<Duration>,
    /// Below this much free space write-back pauses.
    min_free_bytes: u64,
    /// The changes past which the batches are committed before the window is over.
    max_changes: usize,
}

/// How much commit log each partition keeps.
struct Retention {
    keep_entries: u64,
    keep_ms: Option<u64>,
}

struct Worker<'a> {
    index: usize,
    /// Set while a backup copy of this shard runs (one at a time).
    backup_running: Arc<AtomicBool>,
    store: &'a mut Store,
    slot: Slot<'a>,
    /// With `async` durability, how often to flush.
    flush_every: Option<Duration>,
    last_flush: Instant,
    dirty: bool,
    /// Requests waiting for a key that a prepared transaction holds, in arrival order.
    deferred: VecDeque<(Instant, Queued)>,
    retention: Retention,
    last_housekeeping: Instant,
    /// When the reader table was last checked for slots of dead processes.
    last_reader_check: Instant,
    /// Write-back's settings (`None`: every group commit is committed).
    writeback: Option<WriteBack>,
    /// Write-back: the keys of acknowledged writes that LMDB has not committed.
    pending: Option<PendingKeys>,
    /// What the slot's `Unsettled` word says (`shoal_shared::pending`).
    unsettled: u64,
    /// When to try again to commit write-back's batches, after a try found no room.
    settle_retry_at: Option<Instant>,
    /// When the last batch with client writes was applied.
    last_write: Instant,
    /// Write-back: GET or MGET reads came to the worker while it held unsettled batches.
    reads_waiting: bool,
    /// What the slot's `Prepared` word says.
    prepared_word: u64,
    /// How many transactions held locks at LMDB's last commit.
    prepared_committed: u64,
}

/// Treats "no space" (a map at its limit, a full disk) as "nothing done": housekeeping
/// retries on the next tick, and the worker stays up for reads.
fn tolerate_full(result: Result<usize, StoreError>) -> Result<usize, StoreError> {
    match result {
        Err(error) if error.is_out_of_room() => {
            // A full map is reported by the writes it refuses; a full disk is said here.
            if matches!(error, StoreError::Lmdb(heed::Error::Io(_))) {
                tracing::warn!(%error, "housekeeping could not write; retrying on the next tick");
            }
            Ok(0)
        }
        other => other,
    }
}

/// Whether a request changes key locks; deferred requests are retried after a batch that
/// holds one.
fn changes_locks(request: &WorkerRequest) -> bool {
    matches!(
        request,
        WorkerRequest::Prepare { .. }
            | WorkerRequest::Commit { .. }
            | WorkerRequest::Abort { .. }
            | WorkerRequest::Decide { .. }
    )
}

/// A key that a `Prepare` of the current batch locks.
type PreparedKey = (Collection, Partition, Vec<u8>);

fn prepared_key(collection: Collection, key: &Key) -> PreparedKey {
    (collection, key.partition, key.bytes.clone())
}

/// Whether `request` touches a key that a `Prepare` earlier in the batch locks.
fn touches(request: &WorkerRequest, prepared_keys: &HashSet<PreparedKey>) -> bool {
    if prepared_keys.is_empty() {
        return false;
    }
    match request {
        WorkerRequest::Flush { .. } => true,
        WorkerRequest::Prepare { ops, .. } => ops
            .iter()
            .any(|op| prepared_keys.contains(&prepared_key(op.collection, &op.key))),
        other => other
            .keys()
            .into_iter()
            .any(|(collection, key)| prepared_keys.contains(&prepared_key(collection, key))),
    }
}

impl Worker<'_> {
    /// The group-commit loop: wait for one request, take everything else that has arrived,
    /// apply, reply.
    ///
    /// Requests are checked against the locks as they stand before the batch. Keys that a
    /// `Prepare` of the batch locks are not in them yet, so a request touching one of those
    /// keys (or a FLUSH after such a `Prepare`) ends the batch and opens the next one. A
    /// `Backup` also ends the batch: its copy starts once what came before it is applied.
    fn serve(&mut self, link: &mut Link, shutdown: &AtomicBool) -> anyhow::Result<()> {
        loop {
            self.slot.beat();
            self.settle(false)?;
            self.housekeeping()?;
            if shutdown.load(Ordering::Acquire) {
                return Ok(());
            }
            let Some(first) = link.recv_timeout(self.wait_time()) else {
                continue;
            };
            let mut batch = Vec::new();
            let mut prepared_keys: HashSet<PreparedKey> = HashSet::new();
            let mut next = Some(first);
            while let Some(queued) = next.take() {
                if let WorkerRequest::Backup { dir } = &queued.request {
                    // What came before the backup is applied first, so that its copy
                    // holds it: a multi-key write's commit queued before a backup that
                    // was asked for after the write's reply is in the copy.
                    if !batch.is_empty() {
                        link.put_back(queued);
                        break;
                    }
                    let dir = dir.clone();
                    self.settle(true)?;
                    self.start_backup(queued, dir);
                    next = link.try_recv();
                    continue;
                }
                if !batch.is_empty() && touches(&queued.request, &prepared_keys) {
                    link.put_back(queued);
                    break;
                }
                if let WorkerRequest::Prepare { ops, .. } = &queued.request {
                    prepared_keys.extend(ops.iter().map(|op| prepared_key(op.collection, &op.key)));
                }
                if self.blocked(&queued.request) {
                    self.deferred.push_back((Instant::now(), queued));
                } else {
                    batch.push(queued);
                }
                if batch.len() >= MAX_BATCH {
                    break;
                }
                next = link.try_recv();
            }
            let released = batch.iter().any(|queued| changes_locks(&queued.request));
            self.apply(batch)?;
            if released {
                self.retry_deferred()?;
            }
        }
    }

    /// Copies the environment to `dir` on a thread of its own, which answers `queued` when
    /// the copy is on disk. The group commit goes on meanwhile.
    fn start_backup(&self, queued: Queued, dir: String) {
        let Queued { id, reply, .. } = queued;
        let refuse = |message: String| {
            let response = WorkerResponse::Error(WorkerError::Storage(message));
            reply.send([ResponseEnvelope { id, response }]);
        };
        if !Path::new(&dir).is_absolute() {
            return refuse(format!("backup directory {dir:?} is not an absolute path"));
        }
        if self.store.is_stalled() {
            return refuse(format!(
                "shard {} cannot commit its last writes for want of room; try again once there is",
                self.index
            ));
        }
        if self.backup_running.swap(true, Ordering::AcqRel) {
            return refuse(format!(
                "a backup of shard {} is already running",
                self.index
            ));
        }
        let source = self.store.backup_source();
        let running = Arc::clone(&self.backup_running);
        let shard = self.index;
        let reply_from_thread = reply.clone();
        let spawned = std::thread::Builder::new()
            .name("backup".into())
            .spawn(move || {
                let started = Instant::now();
                tracing::info!(shard, dir = %dir, "backup copy started");
                let response = match source.copy_to(Path::new(&dir)) {
                    Ok(report) => {
                        tracing::info!(
                            shard,
                            dir = %dir,
                            bytes = report.bytes,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "backup copy done"
                        );
                        WorkerResponse::Backup(report)
                    }
                    Err(error) => {
                        tracing::warn!(shard, dir = %dir, %error, "backup copy failed");
                        WorkerResponse::Error(WorkerError::Storage(format!(
                            "backup of shard {shard} to {dir} failed: {error}"
                        )))
                    }
                };
                running.store(false, Ordering::Release);
                reply_from_thread.send([ResponseEnvelope { id, response }]);
            });
        if let Err(error) = spawned {
            self.backup_running.store(false, Ordering::Release);
            refuse(format!("cannot start the backup thread: {error}"));
        }
    }

    /// Whether `request` must wait: it touches a locked key, or a key that an earlier
    /// deferred request touches (requests on one key keep their order).
    fn blocked(&self, request: &WorkerRequest) -> bool {
        let locks = self.store.locks();
        if let WorkerRequest::Flush { collection, .. } = request {
            return locks.any_in(*collection) || !self.deferred.is_empty();
        }
        if locks.is_empty() && self.deferred.is_empty() {
            return false;
        }
        request.keys().into_iter().any(|(collection, key)| {
            locks.holder(collection, key).is_some()
                || self.deferred.iter().any(|(_, waiting)| {
                    waiting
                        .request
                        .keys()
                        .into_iter()
                        .any(|(c, k)| c == collection && k == key)
                })
        })
    }

    /// Runs the deferred requests whose keys are free now; fails those that waited too long.
    fn retry_deferred(&mut self) -> anyhow::Result<()> {
        if self.deferred.is_empty() {
            return Ok(());
        }
        let waiting = std::mem::take(&mut self.deferred);
        let mut runnable = Vec::new();
        for (since, queued) in waiting {
            if self.blocked(&queued.request) {
                if since.elapsed() >= DEFER_TIMEOUT {
                    let response = WorkerResponse::Error(WorkerError::Locked);
                    queued.reply.send([ResponseEnvelope {
                        id: queued.id,
                        response,
                    }]);
                } else {
                    self.deferred.push_back((since, queued));
                }
            } else {
                runnable.push(queued);
            }
        }
        if runnable.is_empty() {
            return Ok(());
        }
        self.apply(runnable)
    }

    /// Write-back: publishes what the batches just applied changed ahead of LMDB's
    /// commit, before they are acknowledged: the slot's `Unsettled` word first, then
    /// the keys' marks in the pending-key index.
    fn mark_pending(&mut self) {
        let Some(pending) = &self.pending else {
            return;
        };
        let touched = self.store.take_touched();
        let word = if touched.shard {
            pending::SHARD
        } else if !touched.keys.is_empty() {
            pending::KEYS
        } else {
            pending::SETTLED
        };
        // SHARD covers KEYS, which covers SETTLED.
        if word > pending::SETTLED && (self.unsettled == pending::SETTLED || word == pending::SHARD)
        {
            self.slot.set(Field::Unsettled, word);
            self.unsettled = word;
        }
        for hash in touched.keys {
            pending.mark(hash);
        }
    }

    /// Publishes how many prepared transactions lock keys (the slot's `Prepared` word):
    /// the most that LMDB's last commit or the batches applied since hold. Called after
    /// every batch, before its replies, and after write-back's commits, so that the word
    /// is raised before a `Prepare` is answered and lowered only once LMDB holds the
    /// transaction's end.
    fn publish_prepared(&mut self) {
        let now = self.store.locks().transactions() as u64;
        if !self.store.is_unsettled() {
            self.prepared_committed = now;
        }
        let word = now.max(self.prepared_committed);
        if word != self.prepared_word {
            self.slot.set(Field::Prepared, word);
            self.prepared_word = word;
        }
    }

    /// Write-back: commits the acknowledged batches in LMDB if `force`, if the oldest
    /// has waited its window, if client writes paused long enough, if they add up to
    /// too much, or while a backup runs;
    /// clears the slot's `Unsettled` word once none is left. A commit that finds no
    /// room keeps them (the store refuses writes meanwhile) and is tried again after
    /// [`STALL_RETRY`]; any other error is fatal.
    ///
    /// A backup's copy holds every write acknowledged before it was asked for: the
    /// worker settles before it starts the copy, and LMDB's copy takes the
    /// environment's write lock to read the meta pages, so it waits for a
    /// transaction open then, which commits at once while the backup runs.
    fn settle(&mut self, force: bool) -> anyhow::Result<()> {
        let Some(writeback) = self.writeback else {
            return Ok(());
        };
        if let Some(load) = self.store.unsettled_load() {
            let due = load.age >= writeback.window
                || writeback
                    .idle
                    .is_some_and(|idle| self.last_write.elapsed() >= idle)
                || (self.reads_waiting && load.age >= READ_WINDOW)
                || load.bytes >= MAX_UNSETTLED_BYTES
                || load.changes >= writeback.max_changes
                || self.backup_running.load(Ordering::Acquire);
            let waiting = self.settle_retry_at.is_some_and(|at| Instant::now() < at);
            if force || (due && !waiting) {
                match self.store.settle() {
                    Ok(()) => self.settle_retry_at = None,
                    Err(error) if error.is_out_of_room() => {
                        self.settle_retry_at = Some(Instant::now() + STALL_RETRY);
                    }
                    Err(error) => {
                        return Err(anyhow::Error::new(error)
                            .context("committing write-back's batches; stopping the shard"))
                    }
                }
            }
        }
        self.publish_prepared();
        if !self.store.is_unsettled() {
            self.reads_waiting = false;
            if self.unsettled != pending::SETTLED {
                if let Some(pending) = &self.pending {
                    pending.clear();
                }
                self.slot.set(Field::Unsettled, pending::SETTLED);
                self.unsettled = pending::SETTLED;
            }
        }
        Ok(())
    }

    /// Pauses write-back while the filesystem has less than `min_free_bytes` free, and
    /// resumes it once it has a quarter more: with little room, acknowledged writes
    /// that LMDB has not committed may find no room to be committed, and a worker that
    /// restarts must commit them before it serves. A pause whose commit finds no room
    /// is tried again at the next tick (the batches stay, and writes are refused).
    fn watch_free_space(&mut self) -> anyhow::Result<()> {
        let (Some(writeback), Some(free)) = (self.writeback, self.store.free_bytes()) else {
            return Ok(());
        };
        let min = writeback.min_free_bytes;
        let paused = !self.store.writes_back();
        if !paused && free < min {
            match self.store.set_write_back(false) {
                Err(error) if error.is_out_of_room() => return Ok(()),
                other => other.context("committing write-back's batches to pause it")?,
            }
            self.settle(false)?;
            tracing::warn!(
                free,
                min,
                "little free disk space: write-back paused, every group commit is committed"
            );
        } else if paused && free >= min.saturating_add(min / 4) {
            self.store.set_write_back(true)?;
            tracing::info!(free, "free disk space is back: write-back resumed");
        }
        Ok(())
    }

    /// How long to wait for a request: until the next tick, or until write-back's
    /// batches are due.
    fn wait_time(&self) -> Duration {
        let (Some(writeback), Some(load)) = (self.writeback, self.store.unsettled_load()) else {
            return TICK;
        };
        let mut due = writeback.window.saturating_sub(load.age);
        if let Some(idle) = writeback.idle {
            due = due.min(idle.saturating_sub(self.last_write.elapsed()));
        }
        if self.reads_waiting {
            due = due.min(READ_WINDOW.saturating_sub(load.age));
        }
        let retry = self.settle_retry_at.map_or(Duration::ZERO, |at| {
            at.saturating_duration_since(Instant::now())
        });
        due.max(retry).min(TICK)
    }

    /// Work done between batches: flushes (async durability), active expiry, log
    /// retention, and timing out deferred requests.
    fn housekeeping(&mut self) -> anyhow::Result<()> {
        if let Some(interval) = self.flush_every {
            if self.dirty && self.last_flush.elapsed() >= interval {
                self.store.sync().context("periodic flush")?;
                self.dirty = false;
                self.last_flush = Instant::now();
            }
        }
        if self.last_housekeeping.elapsed() < TICK {
            return Ok(());
        }
        self.last_housekeeping = Instant::now();
        if self.last_reader_check.elapsed() >= READER_CHECK_INTERVAL {
            self.last_reader_check = Instant::now();
            let cleared = self
                .store
                .clear_stale_readers()
                .context("clearing stale LMDB readers")?;
            if cleared > 0 {
                tracing::info!(cleared, "cleared LMDB readers left by dead processes");
            }
        }
        self.slot
            .set(Field::MapSizeBytes, self.store.map_size() as u64);
        self.slot
            .set(Field::MapUsedBytes, self.store.used_bytes() as u64);
        let (checkpoint_secs, journal_bytes) = self.store.checkpoint_state();
        self.slot.set(Field::CheckpointSecs, checkpoint_secs);
        self.slot.set(Field::JournalBytes, journal_bytes);
        // Expiry and trimming write too: with a full map or disk they wait for space.
        // Their writes are never acknowledged, and a direct read of an expired key finds
        // it expired anyway: they do not set the `Unsettled` word.
        let expired =
            tolerate_full(self.store.expire_due(EXPIRE_PER_TICK)).context("expiring keys")?;
        tolerate_full(self.store.reclaim_due(RECLAIM_PER_TICK))
            .context("reclaiming the elements of deleted keys")?;
        // A checkpoint that fails to be recorded is tried again; one whose flush of the
        // data file failed stops the worker (what reached the disk is in doubt).
        self.store.checkpoint_tick().context("checkpoint")?;
        let trimmed = tolerate_full(self.store.trim_log(
            self.retention.keep_entries,
            self.retention.keep_ms,
            TRIM_PER_TICK,
        ))
        .context("trimming the commit log")?;
        if expired + trimmed > 0 {
            self.dirty = true;
            self.slot
                .set(Field::LastCommitId, self.store.highest_commit_id());
        }
        self.watch_free_space()?;
        self.settle(false)?;
        self.retry_deferred()
    }

    /// Applies what is left on the link at shutdown. An error is fatal: nothing more is
    /// written.
    fn drain(&mut self, link: &mut Link) -> anyhow::Result<usize> {
        let mut drained = 0;
        loop {
            let batch: Vec<Queued> = std::iter::from_fn(|| link.try_recv())
                .take(MAX_BATCH)
                .collect();
            if batch.is_empty() {
                return Ok(drained);
            }
            drained += batch.len();
            self.apply(batch)
                .context("failed to apply requests while draining")?;
        }
    }

    /// Applies one batch in one transaction, then replies to every request in it.
    fn apply(&mut self, batch: Vec<Queued>) -> anyhow::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.slot.set(Field::QueueDepth, batch.len() as u64);
        let requests: Vec<_> = batch.iter().map(|queued| &queued.request).collect();
        let writes = requests.iter().any(|request| request.is_write());
        if writes {
            self.last_write = Instant::now();
        }
        self.reads_waiting |= self.store.is_unsettled()
            && requests.iter().any(|request| {
                matches!(
                    request,
                    WorkerRequest::Get { .. } | WorkerRequest::MGet { .. }
                )
            });
        let settle = requests
            .iter()
            .any(|request| matches!(request, WorkerRequest::Settle));
        let mut outcome = self.store.apply_batch(&requests);
        if let (true, Ok(responses)) = (settle, &mut outcome) {
            // Answered once LMDB holds what came before.
            match self.store.settle() {
                Ok(()) => {}
                Err(error) if error.is_out_of_room() => {
                    let refusal = WorkerResponse::Error(WorkerError::Storage(format!(
                        "the shard cannot commit its writes: {error}"
                    )));
                    for (request, response) in requests.iter().zip(responses.iter_mut()) {
                        if matches!(request, WorkerRequest::Settle) {
                            *response = refusal.clone();
                        }
                    }
                }
                Err(error) => outcome = Err(error),
            }
        }
        let count = requests.len() as u64;
        drop(requests);
        let (responses, fatal) = match outcome {
            Ok(responses) => {
                self.mark_pending();
                self.publish_prepared();
                (responses, None)
            }
            Err(error) => {
                let response = WorkerResponse::Error(WorkerError::Storage(error.to_string()));
                (vec![response; batch.len()], Some(error))
            }
        };
        // The status table shows a commit before any of its writes is acknowledged.
        self.slot.add(Field::Ops, count);
        self.slot.set(Field::QueueDepth, 0);
        // A batch whose writes changed nothing is not committed, and counts as no commit
        // (blocked pops look again when a worker's commit count moves).
        if writes && fatal.is_none() && self.store.last_commit().is_some() {
            self.dirty = true;
            self.slot.add(Field::Commits, 1);
            self.slot
                .set(Field::LastCommitId, self.store.highest_commit_id());
        }
        // One write per connection for the batch, in the order of its requests.
        let mut answers = batch.into_iter().zip(responses).peekable();
        while let Some((first, response)) = answers.next() {
            let mut envelopes = vec![ResponseEnvelope {
                id: first.id,
                response,
            }];
            while let Some((queued, response)) =
                answers.next_if(|(next, _)| next.reply.same(&first.reply))
            {
                envelopes.push(ResponseEnvelope {
                    id: queued.id,
                    response,
                });
            }
            first.reply.send(envelopes);
        }
        if let Some(error) = fatal {
            // After a failed commit (an fsync error above all) the environment's state is
            // not to be trusted: stop, and let the supervisor start a clean process.
            return Err(
                anyhow::Error::new(error).context("group commit failed; stopping the shard")
            );
        }
        self.slot
            .observe(Field::BatchSizeBuckets, &BATCH_SIZE_BOUNDS, count);
        if let Some(took) = self.store.last_commit() {
            let micros = took.as_micros() as u64;
            self.slot
                .observe(Field::CommitMicrosBuckets, &COMMIT_MICROS_BOUNDS, micros);
            self.slot.add(Field::CommitMicrosSum, micros);
        }
        self.settle(false)
    }
}

//! The shard-worker process: it owns one LMDB environment and is its only writer.
//!
//! It accepts the net-daemon on a Unix socket (`<data_dir>/run/shard-<i>.sock`),
//! reads request frames, and applies them in group commits: everything waiting
//! on the queue goes into one write transaction, committed and synced once,
//! and only then are the replies sent. It reports its state and counters in its
//! slot of the status table.
//!
//! It never talks to clients or to other hosts, and never touches another
//! shard's environment.
//!
//! Modules:
//! - [`layout`]: the byte layout of the environment.
//! - [`store`]: the environment and the group-commit apply.
//! - [`link`]: the socket threads that read requests and write responses.

pub mod layout;
pub mod link;
pub mod store;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use shoal_shared::config::{Config, Durability};
use shoal_shared::frame::{ResponseEnvelope, WorkerError, WorkerResponse};
use shoal_shared::status::{Field, ProcessState, Slot, StatusTable};

use crate::link::Queued;
use crate::store::{Store, StoreOptions};

/// Most requests applied in one group commit.
const MAX_BATCH: usize = 4096;
/// How often the worker wakes up when idle (heartbeat, shutdown check, async flush).
const TICK: Duration = Duration::from_millis(100);

/// Runs shard-worker `index` until SIGTERM; returns after a clean drain.
pub fn run(config: &Config, index: usize) -> anyhow::Result<()> {
    let status = StatusTable::open(&config.status_path()).context("opening the status table")?;
    let slot = status.slot(index);
    slot.claim();

    let shutdown = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&shutdown))
        .context("installing the SIGTERM handler")?;

    let options = StoreOptions {
        shard_id: index as u32,
        collections: config.storage.collections,
        partitions: config.storage.partitions,
        workers: config.workers as u16,
        durability: config.storage.durability,
        map_size_bytes: config.storage.map_size_bytes,
        max_value_bytes: config.client.max_value_bytes,
    };
    let shard_dir = config.shard_dir(index);
    let mut store = Store::open(&shard_dir, &options).with_context(|| format!("opening {}", shard_dir.display()))?;
    slot.set(Field::LastCommitId, store.highest_commit_id());

    let queue = link::listen(&config.worker_socket(index), Arc::clone(&shutdown))?;
    slot.set_state(ProcessState::Ready);
    tracing::info!(shard = index, dir = %shard_dir.display(), "shard worker ready");

    let flush_interval = Duration::from_millis(config.storage.flush_interval_ms);
    let needs_flush = config.storage.durability == Durability::Async;
    let mut worker = Worker { store: &mut store, slot, last_flush: Instant::now(), dirty: false };
    let result = worker.serve(&queue, &shutdown, needs_flush.then_some(flush_interval));
    slot.set_state(ProcessState::Draining);
    // Whatever is still queued was accepted from the net-daemon: apply it before leaving.
    let drained = worker.drain(&queue);
    if needs_flush {
        store.sync().context("flushing on shutdown")?;
    }
    slot.set_state(ProcessState::Stopped);
    tracing::info!(shard = index, drained, "shard worker stopped");
    result
}

struct Worker<'a> {
    store: &'a mut Store,
    slot: Slot<'a>,
    last_flush: Instant,
    dirty: bool,
}

impl Worker<'_> {
    /// The group-commit loop: wait for one request, take everything else queued, apply, reply.
    fn serve(&mut self, queue: &Receiver<Queued>, shutdown: &AtomicBool, flush_every: Option<Duration>) -> anyhow::Result<()> {
        loop {
            self.slot.beat();
            if let Some(interval) = flush_every {
                if self.dirty && self.last_flush.elapsed() >= interval {
                    self.store.sync().context("periodic flush")?;
                    self.dirty = false;
                    self.last_flush = Instant::now();
                }
            }
            if shutdown.load(Ordering::Acquire) {
                return Ok(());
            }
            let first = match queue.recv_timeout(TICK) {
                Ok(first) => first,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            self.apply(batch)?;
        }
    }

    /// Applies what is left on the queue at shutdown.
    fn drain(&mut self, queue: &Receiver<Queued>) -> usize {
        let mut drained = 0;
        loop {
            let batch: Vec<Queued> = queue.try_iter().take(MAX_BATCH).collect();
            if batch.is_empty() {
                return drained;
            }
            drained += batch.len();
            if let Err(error) = self.apply(batch) {
                tracing::error!(%error, "failed to apply requests while draining");
                return drained;
            }
        }
    }

    /// Applies one batch in one transaction, then replies to every request in it.
    fn apply(&mut self, batch: Vec<Queued>) -> anyhow::Result<()> {
        self.slot.set(Field::QueueDepth, batch.len() as u64);
        let requests: Vec<_> = batch.iter().map(|queued| &queued.request).collect();
        let writes = requests.iter().any(|request| request.is_write());
        let outcome = self.store.apply_batch(&requests);
        let count = requests.len() as u64;
        drop(requests);
        let (responses, fatal) = match outcome {
            Ok(responses) => (responses, None),
            Err(error) => {
                let response = WorkerResponse::Error(WorkerError::Storage(error.to_string()));
                (vec![response; batch.len()], Some(error))
            }
        };
        for (queued, response) in batch.into_iter().zip(responses) {
            // A closed connection only means the net-daemon went away; the write is committed.
            let _ = queued.reply.send(ResponseEnvelope { id: queued.id, response });
        }
        self.slot.add(Field::Ops, count);
        self.slot.set(Field::QueueDepth, 0);
        if let Some(error) = fatal {
            // After a failed commit (an fsync error above all) the environment's state is
            // not to be trusted: stop, and let the supervisor start a clean process.
            return Err(anyhow::Error::new(error).context("group commit failed; stopping the shard"));
        }
        if writes {
            self.dirty = true;
            self.slot.add(Field::Commits, 1);
            self.slot.set(Field::LastCommitId, self.store.highest_commit_id());
        }
        Ok(())
    }
}

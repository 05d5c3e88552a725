//! The metadata group's storage in memory: the same log, vote, state machine and
//! snapshot as the LMDB store of [`super`], for the seeded simulation.
//!
//! A [`MemoryMetaStore`] plays the disk: it outlives the node that uses it, so a node
//! restarted on the same store finds its log, vote, committed id, applied state and
//! snapshot as the LMDB store would after a crash. `MemoryMetaStore::open` hands out
//! the two halves for `Raft::new`, like `super::open_meta_store`. Every write is
//! complete when its call returns (there is no cache to lose), so a write that
//! returned counts as synced. Snapshots are the same bytes as the LMDB store's
//! (`SNAPSHOT_FORMAT ++ bincode(state)`), so the two can send each other snapshots.
//! It never blocks on I/O and spawns nothing, which keeps a simulation deterministic.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    BasicNode, Entry, ErrorSubject, ErrorVerb, LogState, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, Snapshot, SnapshotMeta, Vote,
};
use tokio::sync::watch;

use super::{
    decode_snapshot, encode_snapshot, storage_error, AppliedBatch, AppliedState, MetaLogId,
    MetaMembership, MetaStorageError, MetaTypes, MetadataState, NodeId,
};
use shoal_shared::lock;

/// What the store holds, as a disk would.
struct Disk<S: MetadataState> {
    /// The log from the first entry not purged to the last.
    log: BTreeMap<u64, Entry<MetaTypes<S>>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<MetaLogId>,
    last_purged: Option<MetaLogId>,
    applied: AppliedState<S>,
    snapshot: Option<(SnapshotMeta<NodeId, BasicNode>, Vec<u8>)>,
    /// Snapshots built so far, to name each one differently.
    snapshots_built: u64,
}

/// The metadata group's storage in memory. Clones share it.
pub struct MemoryMetaStore<S: MetadataState> {
    disk: Arc<Mutex<Disk<S>>>,
}

impl<S: MetadataState> Clone for MemoryMetaStore<S> {
    fn clone(&self) -> Self {
        MemoryMetaStore {
            disk: Arc::clone(&self.disk),
        }
    }
}

impl<S: MetadataState> Default for MemoryMetaStore<S> {
    fn default() -> Self {
        MemoryMetaStore::new()
    }
}

impl<S: MetadataState> fmt::Debug for MemoryMetaStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let disk = lock(&self.disk);
        f.debug_struct("MemoryMetaStore")
            .field("entries", &disk.log.len())
            .field("last_applied", &disk.applied.last_applied)
            .finish()
    }
}

impl<S: MetadataState> MemoryMetaStore<S> {
    /// An empty store: no log, no vote, the default state.
    pub fn new() -> MemoryMetaStore<S> {
        MemoryMetaStore {
            disk: Arc::new(Mutex::new(Disk {
                log: BTreeMap::new(),
                vote: None,
                committed: None,
                last_purged: None,
                applied: AppliedState {
                    last_applied: None,
                    membership: MetaMembership::default(),
                    state: Arc::new(S::default()),
                },
                snapshot: None,
                snapshots_built: 0,
            })),
        }
    }

    /// The two halves for `Raft::new`, over what the store holds now. A node restarted
    /// on the same store opens it again.
    pub(crate) fn open(&self) -> (MemoryLogStore<S>, MemoryStateMachine<S>) {
        let applied = lock(&self.disk).applied.clone();
        let (published, _) = watch::channel(applied.clone());
        let log_store = MemoryLogStore {
            disk: Arc::clone(&self.disk),
        };
        let state_machine = MemoryStateMachine {
            disk: Arc::clone(&self.disk),
            applied,
            published,
        };
        (log_store, state_machine)
    }
}

// ---------------------------------------------------------------------------------------
// The log store.

/// The Raft log and vote in memory. Cloning it gives a log reader of the same log.
pub(crate) struct MemoryLogStore<S: MetadataState> {
    disk: Arc<Mutex<Disk<S>>>,
}

impl<S: MetadataState> Clone for MemoryLogStore<S> {
    fn clone(&self) -> Self {
        MemoryLogStore {
            disk: Arc::clone(&self.disk),
        }
    }
}

impl<S: MetadataState> RaftLogReader<MetaTypes<S>> for MemoryLogStore<S> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<MetaTypes<S>>>, MetaStorageError> {
        let bounds: (Bound<u64>, Bound<u64>) =
            (range.start_bound().cloned(), range.end_bound().cloned());
        let disk = lock(&self.disk);
        Ok(disk
            .log
            .range(bounds)
            .map(|(_, entry)| entry.clone())
            .collect())
    }
}

impl<S: MetadataState> RaftLogStorage<MetaTypes<S>> for MemoryLogStore<S> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<MetaTypes<S>>, MetaStorageError> {
        let disk = lock(&self.disk);
        let last_entry = disk.log.values().next_back().map(|entry| entry.log_id);
        Ok(LogState {
            last_purged_log_id: disk.last_purged,
            last_log_id: last_entry.or(disk.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), MetaStorageError> {
        lock(&self.disk).vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, MetaStorageError> {
        Ok(lock(&self.disk).vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<MetaLogId>,
    ) -> Result<(), MetaStorageError> {
        lock(&self.disk).committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<MetaLogId>, MetaStorageError> {
        Ok(lock(&self.disk).committed)
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
        {
            let mut disk = lock(&self.disk);
            for entry in entries {
                disk.log.insert(entry.log_id.index, entry);
            }
        }
        // The entries are stored: readable and, for this store, durable.
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: MetaLogId) -> Result<(), MetaStorageError> {
        let mut disk = lock(&self.disk);
        let _removed = disk.log.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: MetaLogId) -> Result<(), MetaStorageError> {
        let mut disk = lock(&self.disk);
        if disk.last_purged.is_some_and(|previous| previous >= log_id) {
            return Ok(());
        }
        disk.last_purged = Some(log_id);
        let kept = disk.log.split_off(&(log_id.index + 1));
        disk.log = kept;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// The state machine.

/// The applied metadata state (the NI) and the last snapshot of it, in memory.
pub(crate) struct MemoryStateMachine<S: MetadataState> {
    disk: Arc<Mutex<Disk<S>>>,
    applied: AppliedState<S>,
    published: watch::Sender<AppliedState<S>>,
}

impl<S: MetadataState> MemoryStateMachine<S> {
    /// Follows the applied state: the receiver sees every change once it is stored.
    /// Take it before the state machine moves into `Raft::new`.
    pub(crate) fn subscribe(&self) -> watch::Receiver<AppliedState<S>> {
        self.published.subscribe()
    }

    /// The applied state now.
    #[cfg(test)]
    pub(crate) fn applied(&self) -> &AppliedState<S> {
        &self.applied
    }

    /// Stores `applied` and makes it current.
    fn set_applied(&mut self, applied: AppliedState<S>) {
        lock(&self.disk).applied = applied.clone();
        self.applied = applied;
        self.published.send_replace(self.applied.clone());
    }
}

/// Builds a snapshot of the state machine as it was when the builder was taken.
pub(crate) struct MemorySnapshotBuilder<S: MetadataState> {
    disk: Arc<Mutex<Disk<S>>>,
    applied: AppliedState<S>,
}

impl<S: MetadataState> RaftSnapshotBuilder<MetaTypes<S>> for MemorySnapshotBuilder<S> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<MetaTypes<S>>, MetaStorageError> {
        let applied = &self.applied;
        let mut disk = lock(&self.disk);
        disk.snapshots_built += 1;
        let snapshot_id = match applied.last_applied {
            Some(log_id) => format!(
                "{}-{}-{}-{}",
                log_id.leader_id.term, log_id.leader_id.node_id, log_id.index, disk.snapshots_built
            ),
            None => format!("none-{}", disk.snapshots_built),
        };
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership.clone(),
            snapshot_id,
        };
        let data = encode_snapshot(&*applied.state).map_err(|error| {
            storage_error(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                error,
            )
        })?;
        // A snapshot installed meanwhile may be newer: keep it.
        let newer_kept = disk
            .snapshot
            .as_ref()
            .is_some_and(|(current, _)| current.last_log_id > meta.last_log_id);
        if !newer_kept {
            disk.snapshot = Some((meta.clone(), data.clone()));
        }
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl<S: MetadataState> RaftStateMachine<MetaTypes<S>> for MemoryStateMachine<S> {
    type SnapshotBuilder = MemorySnapshotBuilder<S>;

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
        let (applied, outcomes) = batch.into_applied(&self.applied);
        self.set_applied(applied);
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        MemorySnapshotBuilder {
            disk: Arc::clone(&self.disk),
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
        let data = snapshot.into_inner();
        let state: S = decode_snapshot(&data).map_err(|error| {
            storage_error(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                error,
            )
        })?;
        lock(&self.disk).snapshot = Some((meta.clone(), data));
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
        Ok(lock(&self.disk)
            .snapshot
            .as_ref()
            .map(|(meta, data)| Snapshot {
                meta: meta.clone(),
                snapshot: Box::new(Cursor::new(data.clone())),
            }))
    }
}

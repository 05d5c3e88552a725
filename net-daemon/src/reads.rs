//! GET and MGET straight from the shards' LMDB maps, without a round trip to the worker.
//!
//! The net-daemon opens each shard's environment read-only the first time it reads it
//! (its worker has created it by then). A read goes to the worker instead when:
//! - the worker's link is down (the worker is restarting; the reply says so);
//! - the worker holds acknowledged writes to one of the keys that LMDB has not
//!   committed yet (write-back: its status slot's `Unsettled` word and its pending-key
//!   index, [`shoal_shared::pending`]), or died holding some;
//! - a multi-key write is prepared on the shard (its keys are locked, and only the
//!   worker waits for locks): the status slot's `Prepared` word, which the worker
//!   raises before it answers a `Prepare` and lowers once LMDB holds the end;
//! - the connection has sent an earlier request of the same pipeline other than GET
//!   and MGET to a worker, so that a pipeline's read never overtakes its own writes
//!   ([`Session::direct_reads`]); behind a GET or MGET sent to a worker, a GET waits
//!   for its answer and then reads the map;
//! - the environment cannot be opened or read (the worker then gives the error).
//!
//! [`Session::direct_reads`]: crate::commands::Session::direct_reads

use std::path::PathBuf;
use std::sync::OnceLock;

use shoal_shared::config::Config;
use shoal_shared::frame::{Collection, Key, LogEntry, Partition};
use shoal_shared::layout::{PartitionMeta, ReplicaState};
use shoal_shared::lmdb::StoreError;
use shoal_shared::pending::{self, PendingKeys};
use shoal_shared::reader::{PartitionDigest, ReadOutcome, ShardReader};
use shoal_shared::status::{Field, StatusTable};

/// Values read from a map (`None`: missing or expired), with their versions
/// ([`shoal_shared::frame::versions`]).
pub type Versioned = (Vec<Option<Vec<u8>>>, Vec<u64>);

/// The read-only views of every shard, opened on first use.
pub struct Readers {
    dirs: Vec<PathBuf>,
    collections: u16,
    clustered: bool,
    /// `None` once opening failed: that shard is then always read through its worker.
    opened: Vec<OnceLock<Option<ShardReader>>>,
    /// The workers' status slots, which say when a shard's environment lacks
    /// acknowledged writes. Without it every read goes to the workers.
    status: Option<StatusTable>,
    /// The workers' pending-key indexes, opened when first needed.
    pending: Vec<OnceLock<PendingKeys>>,
    pending_paths: Vec<PathBuf>,
}

impl Readers {
    pub fn new(config: &Config) -> Readers {
        Readers {
            dirs: (0..config.workers).map(|i| config.shard_dir(i)).collect(),
            collections: config.storage.collections,
            clustered: config.cluster.secret.is_some(),
            opened: (0..config.workers).map(|_| OnceLock::new()).collect(),
            pending: (0..config.workers).map(|_| OnceLock::new()).collect(),
            pending_paths: (0..config.workers)
                .map(|i| config.pending_path(i))
                .collect(),
            status: match StatusTable::open_read_only(&config.status_path()) {
                Ok(status) => Some(status),
                Err(error) => {
                    tracing::warn!(%error, "cannot open the status table; reading every shard through its worker");
                    None
                }
            },
        }
    }

    /// Whether `worker`'s environment holds every write it acknowledged.
    pub fn settled(&self, worker: usize) -> bool {
        self.unsettled(worker) == Some(pending::SETTLED)
    }

    /// `worker`'s `Unsettled` word, if the status table could be opened.
    fn unsettled(&self, worker: usize) -> Option<u64> {
        Some(self.status.as_ref()?.slot(worker).get(Field::Unsettled))
    }

    /// Whether `worker`'s environment holds every write it acknowledged to `keys` of
    /// `collection`, and no prepared transaction locks keys of it. Checked before the
    /// read transaction begins ([`shoal_shared::pending`], [`Field::Prepared`]): a
    /// transaction prepared after the check was not yet answered, so a read that
    /// returns the state before it is in order.
    fn settled_for(&self, worker: usize, collection: Collection, keys: &[&Key]) -> bool {
        let Some(status) = &self.status else {
            return false;
        };
        if status.slot(worker).get(Field::Prepared) != 0 {
            return false;
        }
        match self.unsettled(worker) {
            Some(pending::SETTLED) => true,
            Some(pending::KEYS) => self.pending_keys(worker).is_some_and(|index| {
                keys.iter().all(|key| {
                    !index.contains(pending::data_key_hash(
                        collection,
                        key.partition,
                        &key.bytes,
                    ))
                })
            }),
            _ => false,
        }
    }

    /// `worker`'s pending-key index; `None` while it cannot be opened (tried again on
    /// the next call).
    fn pending_keys(&self, worker: usize) -> Option<&PendingKeys> {
        let slot = self.pending.get(worker)?;
        if let Some(index) = slot.get() {
            return Some(index);
        }
        match PendingKeys::open_read_only(&self.pending_paths[worker]) {
            Ok(index) => Some(slot.get_or_init(|| index)),
            Err(error) => {
                tracing::debug!(worker, %error, "cannot open the pending-key index; asking the worker");
                None
            }
        }
    }

    /// The view of `worker`'s shard for a direct read of values of `keys`: none while
    /// its environment lacks acknowledged writes to them, or while its link is down.
    fn value_reader(
        &self,
        worker: usize,
        connected: bool,
        collection: Collection,
        keys: &[&Key],
    ) -> Option<&ShardReader> {
        if !connected || !self.settled_for(worker, collection, keys) {
            return None;
        }
        self.reader(worker)
    }

    fn reader(&self, worker: usize) -> Option<&ShardReader> {
        self.opened
            .get(worker)?
            .get_or_init(|| match ShardReader::open(&self.dirs[worker], self.collections, self.clustered) {
                Ok(reader) => Some(reader),
                Err(error) => {
                    tracing::warn!(worker, %error, "cannot open the shard for direct reads; reading through its worker");
                    None
                }
            })
            .as_ref()
    }
}

impl Readers {
    /// The live values of `keys`, all owned by `worker` (whose link is `connected` or
    /// not), read from its environment; `None` when the worker must answer.
    pub fn read(
        &self,
        worker: usize,
        connected: bool,
        collection: Collection,
        keys: &[&Key],
    ) -> Option<Vec<Option<Vec<u8>>>> {
        let outcome = self.value_reader(worker, connected, collection, keys)?.get(
            collection,
            keys,
            shoal_shared::now_ms(),
        );
        Some(values_of(worker, outcome)?.0)
    }
}

impl Readers {
    /// [`Readers::read`], with the keys' versions read in the same transaction
    /// ([`shoal_shared::frame::versions`]).
    pub fn read_versioned(
        &self,
        worker: usize,
        connected: bool,
        collection: Collection,
        keys: &[&Key],
    ) -> Option<Versioned> {
        let outcome = self
            .value_reader(worker, connected, collection, keys)?
            .get_versioned(collection, keys, shoal_shared::now_ms());
        values_of(worker, outcome)
    }

    /// The versions of `keys` ([`shoal_shared::frame::versions`]), all owned by `worker`,
    /// read from its environment; `None` when the worker must answer.
    pub fn versions(
        &self,
        worker: usize,
        connected: bool,
        collection: Collection,
        keys: &[&Key],
    ) -> Option<Vec<u64>> {
        match self
            .value_reader(worker, connected, collection, keys)?
            .versions(collection, keys, shoal_shared::now_ms())
        {
            Ok(versions) => versions,
            Err(error) => {
                tracing::debug!(worker, %error, "reading versions failed; asking the worker");
                None
            }
        }
    }

    /// The live values of `keys`, all in a partition that `worker`'s copy follows, read
    /// from its environment as the copy holds them (see [`ShardReader::get_from_copy`]).
    pub fn read_copy(
        &self,
        worker: usize,
        collection: Collection,
        keys: &[&Key],
    ) -> Option<Vec<Option<Vec<u8>>>> {
        let outcome = self
            .reader(worker)?
            .get_from_copy(collection, keys, shoal_shared::now_ms());
        Some(values_of(worker, outcome)?.0)
    }

    fn opened(&self, worker: usize) -> Result<&ShardReader, StoreError> {
        self.reader(worker).ok_or_else(|| {
            StoreError::Mismatch(format!("shard-{worker} cannot be opened for reading"))
        })
    }

    /// `partition`'s last commit id, read from `worker`'s map.
    pub fn last_commit_id(&self, worker: usize, partition: Partition) -> Result<u64, StoreError> {
        self.opened(worker)?.last_commit_id(partition)
    }

    /// `partition`'s `meta` entry, replication state and whether a full copy of it is
    /// under way, read from `worker`'s map.
    pub fn partition_state(
        &self,
        worker: usize,
        partition: Partition,
    ) -> Result<(PartitionMeta, ReplicaState, bool), StoreError> {
        self.opened(worker)?.partition_state(partition)
    }

    /// The partitions `worker`'s record of transaction `txid` concerns, read from its map.
    pub fn transaction_partitions(
        &self,
        worker: usize,
        txid: u64,
    ) -> Result<Vec<Partition>, StoreError> {
        self.opened(worker)?.transaction_partitions(txid)
    }

    /// The digest of `worker`'s copy of `partition` (see [`ShardReader::digest`]).
    pub fn digest(
        &self,
        worker: usize,
        partition: Partition,
    ) -> Result<PartitionDigest, StoreError> {
        self.opened(worker)?.digest(partition)
    }

    /// `partition`'s log entries `first..=last` (fewer if the log lacks some), read from
    /// `worker`'s map.
    pub fn read_log(
        &self,
        worker: usize,
        partition: Partition,
        first: u64,
        last: u64,
    ) -> Result<Vec<LogEntry>, StoreError> {
        self.opened(worker)?.read_log(partition, first, last)
    }
}

/// The values (and versions, if asked) a read of `worker`'s map found; `None` when the
/// worker must answer.
fn values_of(worker: usize, outcome: Result<ReadOutcome, StoreError>) -> Option<Versioned> {
    match outcome {
        Ok(ReadOutcome::Values(values, versions)) => Some((values, versions)),
        Ok(ReadOutcome::AskWorker) => None,
        Err(error) => {
            tracing::debug!(worker, %error, "direct read failed; asking the worker");
            None
        }
    }
}

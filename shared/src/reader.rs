//! Read-only access to a shard's environment from another process: the net-daemon
//! answers GET and MGET from the shard's LMDB map, without a round trip to the worker.
//!
//! A reader never writes. It reads the last committed state, which a worker
//! acknowledges only after the commit, so a read that starts after an acknowledged
//! write sees it. While a key's partition is fenced, the reader answers
//! [`ReadOutcome::AskWorker`] (the worker refuses the read). What it cannot see is the
//! worker's memory: its caller asks the worker's status slot first whether the worker
//! holds acknowledged writes that LMDB lacks, or prepared multi-key writes whose locks
//! only the worker waits for (`crate::status::Field::Unsettled`, `Prepared`). When the
//! worker has grown the map, the reader adopts the new size before reading; readers
//! left by a crashed process are cleared by the worker.

use std::path::Path;
use std::sync::{Mutex, RwLock};

use heed::{Env, EnvFlags, MdbError, RoTxn, WithoutTls};

use crate::frame::{Collection, Key, LogEntry, Partition};
use crate::layout;
use crate::lmdb::{env_options, open_database, RawDatabase, StoreError};

/// What a read found.
pub enum ReadOutcome {
    /// The live values of the keys, in order (`None`: missing or expired), and their
    /// versions when asked ([`crate::frame::versions`]; empty otherwise).
    Values(Vec<Option<Vec<u8>>>, Vec<u64>),
    /// The worker must answer: a key's partition is fenced (the worker then refuses
    /// the read), or a key is typed.
    AskWorker,
}

/// What [`ShardReader::digest`] finds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionDigest {
    /// The copy's last commit id.
    pub last_commit_id: u64,
    /// Its keys, over every collection.
    pub keys: u64,
    /// The wrapping sum of a 64-bit FNV-1a hash of each (collection, key, stored value).
    pub checksum: u64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a over `bytes`, continuing from `hash`.
fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// A shard environment opened read-only.
pub struct ShardReader {
    env: Env<WithoutTls>,
    collections: Vec<RawDatabase>,
    /// The element tables of typed keys, in `ElementTable::ALL` order.
    elements: Vec<RawDatabase>,
    txns: RawDatabase,
    meta: RawDatabase,
    log: RawDatabase,
    /// The log's newest entries ([`layout::recent_key`]).
    recent: RawDatabase,
    /// Where this process has seen the entries of `recent`.
    recent_index: Mutex<crate::lmdb::RecentIndex>,
    /// Whether a partition of this shard may be fenced: in a cluster, or when a fence was
    /// there at open. Only a cluster's handoffs and copies set fences, so a host on its own
    /// with none at open never has one, and its reads skip the lookup.
    fences_possible: bool,
    /// Held shared by every read and exclusively while adopting a grown map: LMDB must
    /// not change the mapping while a transaction of this process is open.
    gate: RwLock<()>,
}

impl ShardReader {
    /// Opens the environment at `dir`, which its worker has created, for a host in a
    /// cluster (`clustered`) or on its own.
    pub fn open(dir: &Path, collections: u16, clustered: bool) -> Result<ShardReader, StoreError> {
        let mut options = env_options(collections);
        // SAFETY: READ_ONLY makes this process a reader only; the environment is never
        // used across fork().
        unsafe { options.flags(EnvFlags::READ_ONLY) };
        // SAFETY: as above.
        let env = unsafe { options.open(dir)? };
        // SAFETY: no transaction of this process is open on the new environment. A size of 0
        // adopts the map size the worker last set.
        unsafe { env.resize(0)? };
        let mut reader = ShardReader {
            collections: Vec::with_capacity(usize::from(collections)),
            elements: Vec::with_capacity(layout::typed::ElementTable::ALL.len()),
            txns: open_database(&env, "txns")?,
            meta: open_database(&env, "meta")?,
            log: open_database(&env, "log")?,
            recent: open_database(&env, "recent")?,
            fences_possible: true,
            env,
            gate: RwLock::new(()),
            recent_index: Mutex::default(),
        };
        reader.fences_possible = clustered || reader.any_fence()?;
        for table in layout::typed::ElementTable::ALL {
            let database = open_database(&reader.env, table.name())?;
            reader.elements.push(database);
        }
        for collection in 0..collections {
            let database = open_database(&reader.env, &format!("c{collection}"))?;
            reader.collections.push(database);
        }
        Ok(reader)
    }

    /// The live values of `keys` in `collection` at `now_ms`, or [`ReadOutcome::AskWorker`]
    /// (a partition of the keys is fenced, or a key is typed).
    pub fn get(
        &self,
        collection: Collection,
        keys: &[&Key],
        now_ms: u64,
    ) -> Result<ReadOutcome, StoreError> {
        self.values(collection, keys, now_ms, true, false)
    }

    /// [`ShardReader::get`], with each key's version read in the same transaction.
    pub fn get_versioned(
        &self,
        collection: Collection,
        keys: &[&Key],
        now_ms: u64,
    ) -> Result<ReadOutcome, StoreError> {
        self.values(collection, keys, now_ms, true, true)
    }

    /// The live values of `keys` in `collection` at `now_ms` as a follower's copy holds
    /// them: neither its fence (the worker leaves the copy to replication) nor a prepared
    /// transaction (whose writes are not applied yet) stops the read. For reads that may
    /// be stale.
    pub fn get_from_copy(
        &self,
        collection: Collection,
        keys: &[&Key],
        now_ms: u64,
    ) -> Result<ReadOutcome, StoreError> {
        self.values(collection, keys, now_ms, false, false)
    }

    fn values(
        &self,
        collection: Collection,
        keys: &[&Key],
        now_ms: u64,
        served_only: bool,
        versioned: bool,
    ) -> Result<ReadOutcome, StoreError> {
        let Some(database) = self.collections.get(usize::from(collection)) else {
            return Ok(ReadOutcome::AskWorker);
        };
        self.with_txn(|txn| {
            if served_only && self.worker_must_answer(txn, keys)? {
                return Ok(ReadOutcome::AskWorker);
            }
            let mut values = Vec::with_capacity(keys.len());
            let mut versions = Vec::with_capacity(if versioned { keys.len() } else { 0 });
            for key in keys {
                let raw = database.get(txn, &layout::data_key(key.partition, &key.bytes))?;
                let value = match raw.map(layout::decode_value).transpose()? {
                    // A typed key: its worker answers (WRONGTYPE for GET, nil for MGET).
                    Some(stored) if stored.typed => return Ok(ReadOutcome::AskWorker),
                    Some(stored) if stored.expires_at_ms.is_none_or(|at| at > now_ms) => {
                        if versioned {
                            versions.push(stored.commit_id);
                        }
                        Some(stored.bytes.to_vec())
                    }
                    _ => {
                        if versioned {
                            versions.push(self.missing_version(txn, key.partition)?);
                        }
                        None
                    }
                };
                values.push(value);
            }
            Ok(ReadOutcome::Values(values, versions))
        })
    }

    /// Whether only the worker may answer for `keys` now: a key's partition is fenced.
    fn worker_must_answer(
        &self,
        txn: &RoTxn<WithoutTls>,
        keys: &[&Key],
    ) -> Result<bool, StoreError> {
        if self.fences_possible {
            for key in keys {
                if self
                    .meta
                    .get(txn, &layout::fence_key(key.partition))?
                    .is_some()
                {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// The version of a missing key of `partition` ([`crate::frame::versions`]).
    fn missing_version(
        &self,
        txn: &RoTxn<WithoutTls>,
        partition: Partition,
    ) -> Result<u64, StoreError> {
        let last = match self.meta.get(txn, &layout::partition_meta_key(partition))? {
            Some(raw) => layout::decode_partition_meta(raw)?.last_commit_id,
            None => 0,
        };
        Ok(crate::frame::versions::MISSING | last)
    }

    /// Each key's version at `now_ms` ([`crate::frame::versions`]), or `None` when the
    /// worker must answer: a key's partition is fenced.
    pub fn versions(
        &self,
        collection: Collection,
        keys: &[&Key],
        now_ms: u64,
    ) -> Result<Option<Vec<u64>>, StoreError> {
        let Some(database) = self.collections.get(usize::from(collection)) else {
            return Ok(None);
        };
        self.with_txn(|txn| {
            if self.worker_must_answer(txn, keys)? {
                return Ok(None);
            }
            let mut versions = Vec::with_capacity(keys.len());
            for key in keys {
                let stored = database.get(txn, &layout::data_key(key.partition, &key.bytes))?;
                let version = match stored.map(layout::decode_value).transpose()? {
                    Some(live) if live.expires_at_ms.is_none_or(|at| at > now_ms) => live.commit_id,
                    _ => self.missing_version(txn, key.partition)?,
                };
                versions.push(version);
            }
            Ok(Some(versions))
        })
    }

    /// Runs `read` in a read transaction, adopting a grown map first when needed.
    fn with_txn<T>(
        &self,
        read: impl Fn(&RoTxn<WithoutTls>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let shared = self.gate.read().unwrap_or_else(|p| p.into_inner());
        let txn = match self.env.read_txn() {
            Err(heed::Error::Mdb(MdbError::MapResized)) => {
                drop(shared);
                self.adopt_grown_map()?;
                return self.with_txn(read);
            }
            other => other?,
        };
        read(&txn)
    }

    /// `partition`'s entry in `meta` (all zero when it never had a write), its
    /// replication state (term 0 and no history when it has none), and whether a full
    /// copy of it is under way, from one snapshot.
    pub fn partition_state(
        &self,
        partition: Partition,
    ) -> Result<(layout::PartitionMeta, layout::ReplicaState, bool), StoreError> {
        self.with_txn(|txn| {
            let meta = match self.meta.get(txn, &layout::partition_meta_key(partition))? {
                Some(raw) => layout::decode_partition_meta(raw)?,
                None => layout::PartitionMeta::default(),
            };
            let replica = match self.meta.get(txn, &layout::replica_state_key(partition))? {
                Some(raw) => layout::decode_replica_state(raw)?,
                None => layout::ReplicaState::default(),
            };
            let copying = self.meta.get(txn, &layout::copy_key(partition))?.is_some();
            Ok((meta, replica, copying))
        })
    }

    /// A digest of this copy of `partition`: its last commit id, its number of keys in
    /// every collection, and an order-independent checksum of those keys with their
    /// stored values (commit id, expiry and bytes) and of typed keys' live elements, so
    /// that two copies that hold the same data give the same digest.
    pub fn digest(&self, partition: Partition) -> Result<PartitionDigest, StoreError> {
        self.with_txn(|txn| {
            let last_commit_id = match self.meta.get(txn, &layout::partition_meta_key(partition))? {
                Some(raw) => layout::decode_partition_meta(raw)?.last_commit_id,
                None => 0,
            };
            let mut digest = PartitionDigest {
                last_commit_id,
                ..PartitionDigest::default()
            };
            let prefix = partition.to_be_bytes();
            for (collection, database) in self.collections.iter().enumerate() {
                for item in database.prefix_iter(txn, &prefix)? {
                    let (key, value) = item?;
                    digest.keys += 1;
                    let mut hash = fnv1a(FNV_OFFSET, &(collection as u16).to_be_bytes());
                    hash = fnv1a(hash, &(key.len() as u32).to_be_bytes());
                    hash = fnv1a(hash, key);
                    hash = fnv1a(hash, value);
                    digest.checksum = digest.checksum.wrapping_add(hash);
                    // A typed key's live elements count too (not those waiting for reclaim,
                    // which each copy removes at its own pace).
                    let stored = layout::decode_value(value)?;
                    if stored.typed {
                        let meta = layout::typed::decode_type_meta(stored.bytes)?;
                        let element_prefix =
                            layout::typed::element_prefix(partition, &key[2..], meta.version);
                        for &table in layout::typed::tables(meta.kind) {
                            let position = layout::typed::ElementTable::ALL
                                .iter()
                                .position(|t| *t == table)
                                .unwrap_or_default();
                            for item in self.elements[position].prefix_iter(txn, &element_prefix)? {
                                let (element, value) = item?;
                                let mut hash = fnv1a(FNV_OFFSET, &[table as u8]);
                                hash = fnv1a(hash, &(element.len() as u32).to_be_bytes());
                                hash = fnv1a(hash, element);
                                hash = fnv1a(hash, value);
                                digest.checksum = digest.checksum.wrapping_add(hash);
                            }
                        }
                    }
                }
            }
            Ok(digest)
        })
    }

    /// `partition`'s last commit id (0 when it never had a write).
    pub fn last_commit_id(&self, partition: Partition) -> Result<u64, StoreError> {
        self.with_txn(
            |txn| match self.meta.get(txn, &layout::partition_meta_key(partition))? {
                Some(raw) => Ok(layout::decode_partition_meta(raw)?.last_commit_id),
                None => Ok(0),
            },
        )
    }

    /// The log entries of `partition` with commit ids `first..=last`, in order; fewer when
    /// the log does not hold them all (it was trimmed, or does not reach `last` yet).
    pub fn read_log(
        &self,
        partition: Partition,
        first: u64,
        last: u64,
    ) -> Result<Vec<LogEntry>, StoreError> {
        if first > last {
            return Ok(Vec::new());
        }
        self.with_txn(|txn| {
            let mut index = self.recent_index.lock().unwrap_or_else(|p| p.into_inner());
            crate::lmdb::read_partition_log_indexed(
                txn,
                self.log,
                self.recent,
                &mut index,
                partition,
                first,
                last,
            )
        })
    }

    /// The partitions the `txns` record of `txid` concerns (`Intent::partitions`); none
    /// when this shard holds no record of it.
    pub fn transaction_partitions(&self, txid: u64) -> Result<Vec<Partition>, StoreError> {
        self.with_txn(|txn| match self.txns.get(txn, &txid.to_be_bytes())? {
            Some(raw) => Ok(layout::decode_intent(raw)?.partitions()),
            None => Ok(Vec::new()),
        })
    }

    /// Whether any partition of this shard is fenced now.
    fn any_fence(&self) -> Result<bool, StoreError> {
        self.with_txn(|txn| {
            let mut fences = self.meta.prefix_iter(txn, layout::META_FENCE_PREFIX)?;
            Ok(fences.next().transpose()?.is_some())
        })
    }

    fn adopt_grown_map(&self) -> Result<(), StoreError> {
        let _exclusive = self.gate.write().unwrap_or_else(|p| p.into_inner());
        // SAFETY: the exclusive gate guarantees that no read transaction of this process
        // is open. A size of 0 adopts the size the worker set.
        unsafe { self.env.resize(0)? };
        Ok(())
    }
}

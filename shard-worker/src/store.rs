//! The shard's storage: one LMDB environment, applied in group commits.
//!
//! [`Store::apply_batch`] runs a whole batch of requests in one write
//! transaction. Each write and its commit-log entry go into that same
//! transaction, and the partition's `last_commit_id`/`mtime` in `meta` are
//! updated with them; the transaction commits (and, with `fsync` durability,
//! syncs) once. Only the caller sends replies, after this returns. When the
//! map is full the transaction is aborted, the map grows, and the batch is
//! replayed from the start.
//!
//! This module never talks to sockets, and it never opens the environment of
//! another shard.

use std::collections::HashMap;
use std::path::Path;

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, Env, EnvFlags, EnvOpenOptions, RwTxn, WithoutTls};
use shoal_shared::config::Durability;
use shoal_shared::frame::{
    ChangeType, Collection, Key, LogEntry, Partition, SetCondition, SetReply, WorkerError, WorkerRequest,
    WorkerResponse,
};
use shoal_shared::resp::{format_double, parse_f64, parse_i64};

use crate::layout::{self, PartitionMeta};

type RawDatabase = Database<'static, Bytes, Bytes>;

/// How a store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub shard_id: u32,
    pub collections: u16,
    pub partitions: u16,
    pub workers: u16,
    pub durability: Durability,
    pub map_size_bytes: usize,
    pub max_value_bytes: usize,
}

/// Why a store could not be opened or a batch could not be committed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("lmdb: {0}")]
    Lmdb(#[from] heed::Error),
    #[error(transparent)]
    Corrupt(#[from] layout::CorruptError),
    #[error("{0}")]
    Mismatch(String),
    #[error("cannot create {path}: {source}")]
    CreateDir { path: String, source: std::io::Error },
}

/// An open shard environment.
pub struct Store {
    env: Env<WithoutTls>,
    collections: Vec<RawDatabase>,
    log: RawDatabase,
    meta: RawDatabase,
    max_value_bytes: usize,
    /// Highest commit id written by this store, over all its partitions.
    highest_commit_id: u64,
}

/// The per-batch state: partition counters advanced inside the open transaction.
struct Batch {
    partitions: HashMap<Partition, PartitionMeta>,
    now_ms: u64,
}

fn page_aligned(bytes: usize) -> usize {
    const PAGE: usize = 4096;
    bytes.div_ceil(PAGE) * PAGE
}

impl Store {
    /// Opens (creating if needed) the environment at `dir`, checks its `meta`
    /// against `options`, and clears readers left by crashed processes.
    pub fn open(dir: &Path, options: &StoreOptions) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|source| StoreError::CreateDir { path: dir.display().to_string(), source })?;
        let mut env_options = EnvOpenOptions::new().read_txn_without_tls();
        env_options.map_size(page_aligned(options.map_size_bytes)).max_dbs(u32::from(options.collections) + 2);
        if options.durability == Durability::Async {
            // SAFETY: NO_SYNC only delays fsync; the worker flushes periodically and the
            // config documents that a power failure may lose the last interval.
            unsafe { env_options.flags(EnvFlags::NO_SYNC) };
        }
        // SAFETY: only this process writes this environment, and it is never used across fork().
        let env = unsafe { env_options.open(dir)? };
        let cleared = env.clear_stale_readers()?;
        if cleared > 0 {
            tracing::info!(cleared, "cleared stale LMDB readers");
        }

        let mut collections = Vec::with_capacity(usize::from(options.collections));
        for collection in 0..options.collections {
            collections.push(create_database(&env, &format!("c{collection}"))?);
        }
        let log = create_database(&env, "log")?;
        let meta = create_database(&env, "meta")?;
        let mut store =
            Store { env, collections, log, meta, max_value_bytes: options.max_value_bytes, highest_commit_id: 0 };
        store.check_meta(options)?;
        Ok(store)
    }

    /// Writes `meta`'s identity on first open; on later opens checks that it matches.
    fn check_meta(&mut self, options: &StoreOptions) -> Result<(), StoreError> {
        let mut txn = self.env.write_txn()?;
        match self.meta.get(&txn, layout::META_FORMAT_VERSION)? {
            None => {
                self.meta.put(&mut txn, layout::META_FORMAT_VERSION, &layout::FORMAT_VERSION.to_be_bytes())?;
                self.meta.put(&mut txn, layout::META_SHARD_ID, &options.shard_id.to_be_bytes())?;
                self.meta.put(&mut txn, layout::META_LAYOUT, &layout::encode_layout(options.partitions, options.workers))?;
                txn.commit()?;
                return Ok(());
            }
            Some(raw) => {
                let version = layout::decode_u32(raw, "format version")?;
                if version != layout::FORMAT_VERSION {
                    return Err(StoreError::Mismatch(format!(
                        "format version {version} is not {} (this build's)",
                        layout::FORMAT_VERSION
                    )));
                }
            }
        }
        let shard_id = layout::decode_u32(self.meta.get(&txn, layout::META_SHARD_ID)?.unwrap_or_default(), "shard id")?;
        if shard_id != options.shard_id {
            return Err(StoreError::Mismatch(format!("environment belongs to shard {shard_id}, not {}", options.shard_id)));
        }
        let (partitions, workers) = layout::decode_layout(self.meta.get(&txn, layout::META_LAYOUT)?.unwrap_or_default())?;
        if (partitions, workers) != (options.partitions, options.workers) {
            return Err(StoreError::Mismatch(format!(
                "environment was created for {partitions} partitions on {workers} workers, not {} on {}",
                options.partitions, options.workers
            )));
        }
        for item in self.meta.prefix_iter(&txn, b"p")? {
            let (key, value) = item?;
            if key.len() == 3 {
                let meta = layout::decode_partition_meta(value)?;
                self.highest_commit_id = self.highest_commit_id.max(meta.last_commit_id);
            }
        }
        txn.abort();
        Ok(())
    }

    /// Highest commit id this shard has committed (over all its partitions).
    pub fn highest_commit_id(&self) -> u64 {
        self.highest_commit_id
    }

    /// Current size of the memory map.
    pub fn map_size(&self) -> usize {
        self.env.info().map_size
    }

    /// Flushes dirty pages to disk (used with `async` durability).
    pub fn sync(&self) -> Result<(), StoreError> {
        Ok(self.env.force_sync()?)
    }

    /// Applies `requests` in one write transaction and returns one response per request.
    /// On `Err`, nothing of the batch was committed.
    pub fn apply_batch(&mut self, requests: &[&WorkerRequest]) -> Result<Vec<WorkerResponse>, StoreError> {
        loop {
            match self.try_apply(requests) {
                Err(heed::Error::Mdb(heed::MdbError::MapFull)) => self.grow_map()?,
                Err(error) => return Err(error.into()),
                Ok(responses) => return Ok(responses),
            }
        }
    }

    fn grow_map(&mut self) -> Result<(), StoreError> {
        let new_size = page_aligned(self.map_size().saturating_mul(2));
        tracing::info!(new_size, "LMDB map is full; growing it and replaying the batch");
        // SAFETY: no transaction of this environment is open: `try_apply` aborted its
        // transaction before returning MapFull, and the worker holds no other transaction.
        unsafe { self.env.resize(new_size)? };
        Ok(())
    }

    fn try_apply(&mut self, requests: &[&WorkerRequest]) -> heed::Result<Vec<WorkerResponse>> {
        let mut txn = self.env.write_txn()?;
        let mut batch = Batch { partitions: HashMap::new(), now_ms: shoal_shared::now_ms() };
        let mut responses = Vec::with_capacity(requests.len());
        for request in requests {
            responses.push(self.apply_one(&mut txn, &mut batch, request)?);
        }
        if batch.partitions.is_empty() {
            txn.abort();
            return Ok(responses);
        }
        let mut highest = self.highest_commit_id;
        for (&partition, &meta) in &batch.partitions {
            self.meta.put(&mut txn, &layout::partition_meta_key(partition), &layout::encode_partition_meta(meta))?;
            highest = highest.max(meta.last_commit_id);
        }
        txn.commit()?;
        self.highest_commit_id = highest;
        Ok(responses)
    }

    fn collection(&self, collection: Collection) -> Option<&RawDatabase> {
        self.collections.get(usize::from(collection))
    }

    fn apply_one(&self, txn: &mut RwTxn, batch: &mut Batch, request: &WorkerRequest) -> heed::Result<WorkerResponse> {
        let collection = match request {
            WorkerRequest::ReadLog { partition, from_commit_id, count } => {
                return self.read_log(txn, *partition, *from_commit_id, *count)
            }
            WorkerRequest::Get { collection, .. }
            | WorkerRequest::MGet { collection, .. }
            | WorkerRequest::Set { collection, .. }
            | WorkerRequest::GetDel { collection, .. }
            | WorkerRequest::Delete { collection, .. }
            | WorkerRequest::Exists { collection, .. }
            | WorkerRequest::IncrBy { collection, .. }
            | WorkerRequest::IncrByFloat { collection, .. }
            | WorkerRequest::Append { collection, .. }
            | WorkerRequest::StrLen { collection, .. }
            | WorkerRequest::DbSize { collection } => *collection,
        };
        let Some(&db) = self.collection(collection) else {
            return Ok(storage_error(format!("collection {collection} does not exist")));
        };
        let op = Op { store: self, db, collection };
        match op.apply(txn, batch, request) {
            Ok(response) => Ok(response),
            Err(OpError::Lmdb(error)) => Err(error),
            Err(OpError::Corrupt(error)) => Ok(storage_error(error.to_string())),
        }
    }

    fn read_log(&self, txn: &RwTxn, partition: Partition, from: u64, count: u32) -> heed::Result<WorkerResponse> {
        let start = layout::log_key(partition, from);
        let end = layout::log_key(partition, u64::MAX);
        let range = (std::ops::Bound::Included(&start[..]), std::ops::Bound::Included(&end[..]));
        let mut entries: Vec<LogEntry> = Vec::new();
        for item in self.log.range(txn, &range)?.take(count as usize) {
            let (key, value) = item?;
            match layout::decode_log_entry(key, value) {
                Ok(entry) => entries.push(entry),
                Err(error) => return Ok(storage_error(error.to_string())),
            }
        }
        Ok(WorkerResponse::Log(entries))
    }
}

fn create_database(env: &Env<WithoutTls>, name: &str) -> Result<RawDatabase, StoreError> {
    let txn = env.write_txn()?;
    let database = env
        .create_databases_and_commit(txn, |opener, txn| {
            opener.create_database::<Bytes, Bytes>(txn, Some(name)).map(CommitOrAbort::<_, ()>::Commit)
        })?
        .unwrap_commit();
    Ok(database)
}

fn storage_error(message: String) -> WorkerResponse {
    WorkerResponse::Error(WorkerError::Storage(message))
}

/// Why one operation failed: LMDB errors abort the batch; corrupt data fails only this request.
enum OpError {
    Lmdb(heed::Error),
    Corrupt(layout::CorruptError),
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

type OpResult = Result<WorkerResponse, OpError>;

/// One request's view of the store: the collection it works on.
struct Op<'s> {
    store: &'s Store,
    db: RawDatabase,
    collection: Collection,
}

impl Op<'_> {
    fn apply(&self, txn: &mut RwTxn, batch: &mut Batch, request: &WorkerRequest) -> OpResult {
        match request {
            WorkerRequest::Get { key, .. } => self.read(txn, key).map(WorkerResponse::Value),
            WorkerRequest::MGet { keys, .. } => keys
                .iter()
                .map(|key| self.read(txn, key).map(|value| value.map(serde_bytes::ByteBuf::from)))
                .collect::<Result<Vec<_>, _>>()
                .map(WorkerResponse::Values),
            WorkerRequest::Set { key, value, condition, reply, .. } => {
                self.set(txn, batch, key, value, *condition, *reply)
            }
            WorkerRequest::GetDel { key, .. } => {
                let old = self.read(txn, key)?;
                if old.is_some() {
                    self.write(txn, batch, key, None, true)?;
                }
                Ok(WorkerResponse::Value(old))
            }
            WorkerRequest::Delete { keys, .. } => {
                let mut deleted = 0;
                for key in keys {
                    if self.exists(txn, key)? {
                        self.write(txn, batch, key, None, true)?;
                        deleted += 1;
                    }
                }
                Ok(WorkerResponse::Integer(deleted))
            }
            WorkerRequest::Exists { keys, .. } => {
                let mut found = 0;
                for key in keys {
                    found += i64::from(self.exists(txn, key)?);
                }
                Ok(WorkerResponse::Integer(found))
            }
            WorkerRequest::IncrBy { key, delta, .. } => self.incr_by(txn, batch, key, *delta),
            WorkerRequest::IncrByFloat { key, delta, .. } => self.incr_by_float(txn, batch, key, *delta),
            WorkerRequest::Append { key, value, .. } => self.append(txn, batch, key, value),
            WorkerRequest::StrLen { key, .. } => {
                self.read(txn, key).map(|v| WorkerResponse::Integer(v.map_or(0, |v| v.len() as i64)))
            }
            WorkerRequest::DbSize { .. } => Ok(WorkerResponse::Integer(self.db.len(txn)? as i64)),
            WorkerRequest::ReadLog { .. } => unreachable!("handled by Store::apply_one"),
        }
    }

    fn read(&self, txn: &RwTxn, key: &Key) -> Result<Option<Vec<u8>>, OpError> {
        match self.db.get(txn, &layout::data_key(key.partition, &key.bytes))? {
            None => Ok(None),
            Some(raw) => Ok(Some(layout::decode_value(raw)?.bytes.to_vec())),
        }
    }

    fn exists(&self, txn: &RwTxn, key: &Key) -> Result<bool, OpError> {
        Ok(self.db.get(txn, &layout::data_key(key.partition, &key.bytes))?.is_some())
    }

    /// Writes (or, with `None`, deletes) a key and logs the change, under the partition's next commit id.
    fn write(&self, txn: &mut RwTxn, batch: &mut Batch, key: &Key, value: Option<&[u8]>, existed: bool) -> heed::Result<()> {
        let meta = match batch.partitions.get(&key.partition) {
            Some(meta) => *meta,
            None => match self.store.meta.get(txn, &layout::partition_meta_key(key.partition))? {
                Some(raw) => layout::decode_partition_meta(raw).map_err(|e| heed::Error::Decoding(Box::new(e)))?,
                None => PartitionMeta::default(),
            },
        };
        let commit_id = meta.last_commit_id + 1;
        batch.partitions.insert(key.partition, PartitionMeta { last_commit_id: commit_id, mtime_ms: batch.now_ms });
        let data_key = layout::data_key(key.partition, &key.bytes);
        let change = match value {
            Some(bytes) => {
                self.db.put(txn, &data_key, &layout::encode_value(commit_id, bytes))?;
                if existed { ChangeType::Update } else { ChangeType::Create }
            }
            None => {
                self.db.delete(txn, &data_key)?;
                ChangeType::Delete
            }
        };
        let entry = layout::encode_log_value(batch.now_ms, change, self.collection, &key.bytes, value.unwrap_or_default());
        self.store.log.put(txn, &layout::log_key(key.partition, commit_id), &entry)
    }

    fn set(&self, txn: &mut RwTxn, batch: &mut Batch, key: &Key, value: &[u8], condition: SetCondition, reply: SetReply) -> OpResult {
        if value.len() > self.store.max_value_bytes {
            return Ok(self.too_large());
        }
        let old = self.read(txn, key)?;
        let allowed = match condition {
            SetCondition::Always => true,
            SetCondition::IfAbsent => old.is_none(),
            SetCondition::IfPresent => old.is_some(),
        };
        if allowed {
            self.write(txn, batch, key, Some(value), old.is_some())?;
        }
        Ok(match reply {
            SetReply::Status if allowed => WorkerResponse::Ok,
            SetReply::Status => WorkerResponse::Value(None),
            SetReply::OldValue => WorkerResponse::Value(old),
            SetReply::WrittenFlag => WorkerResponse::Integer(i64::from(allowed)),
        })
    }

    fn incr_by(&self, txn: &mut RwTxn, batch: &mut Batch, key: &Key, delta: i64) -> OpResult {
        let old = self.read(txn, key)?;
        let current = match &old {
            None => 0,
            Some(bytes) => match parse_i64(bytes) {
                Some(n) => n,
                None => return Ok(WorkerResponse::Error(WorkerError::NotInteger)),
            },
        };
        let Some(new) = current.checked_add(delta) else {
            return Ok(WorkerResponse::Error(WorkerError::Overflow));
        };
        self.write(txn, batch, key, Some(new.to_string().as_bytes()), old.is_some())?;
        Ok(WorkerResponse::Integer(new))
    }

    fn incr_by_float(&self, txn: &mut RwTxn, batch: &mut Batch, key: &Key, delta: f64) -> OpResult {
        let old = self.read(txn, key)?;
        let current = match &old {
            None => 0.0,
            Some(bytes) => match parse_f64(bytes) {
                Some(n) => n,
                None => return Ok(WorkerResponse::Error(WorkerError::NotFloat)),
            },
        };
        let new = current + delta;
        if !new.is_finite() {
            return Ok(WorkerResponse::Error(WorkerError::NanOrInfinity));
        }
        let text = format_double(new).into_bytes();
        self.write(txn, batch, key, Some(&text), old.is_some())?;
        Ok(WorkerResponse::Value(Some(text)))
    }

    fn append(&self, txn: &mut RwTxn, batch: &mut Batch, key: &Key, value: &[u8]) -> OpResult {
        let old = self.read(txn, key)?;
        let existed = old.is_some();
        let mut new = old.unwrap_or_default();
        if new.len() + value.len() > self.store.max_value_bytes {
            return Ok(self.too_large());
        }
        new.extend_from_slice(value);
        self.write(txn, batch, key, Some(&new), existed)?;
        Ok(WorkerResponse::Integer(new.len() as i64))
    }

    fn too_large(&self) -> WorkerResponse {
        WorkerResponse::Error(WorkerError::ValueTooLarge { max_value_bytes: self.store.max_value_bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> StoreOptions {
        StoreOptions {
            shard_id: 0,
            collections: 2,
            partitions: 4,
            workers: 1,
            durability: Durability::Fsync,
            map_size_bytes: 1 << 20,
            max_value_bytes: 1 << 20,
        }
    }

    fn key(partition: Partition, bytes: &[u8]) -> Key {
        Key { partition, bytes: bytes.to_vec() }
    }

    fn set(collection: Collection, key: Key, value: &[u8]) -> WorkerRequest {
        WorkerRequest::Set {
            collection,
            key,
            value: value.to_vec(),
            condition: SetCondition::Always,
            reply: SetReply::Status,
        }
    }

    fn apply(store: &mut Store, requests: &[WorkerRequest]) -> Vec<WorkerResponse> {
        store.apply_batch(&requests.iter().collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn writes_are_logged_with_change_types_and_increasing_ids() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), &options()).unwrap();
        apply(&mut store, &[set(0, key(1, b"k"), b"a")]);
        apply(&mut store, &[set(0, key(1, b"k"), b"b"), WorkerRequest::Delete { collection: 0, keys: vec![key(1, b"k")] }]);
        let log = apply(&mut store, &[WorkerRequest::ReadLog { partition: 1, from_commit_id: 0, count: 10 }]);
        let WorkerResponse::Log(entries) = &log[0] else { panic!("{log:?}") };
        let changes: Vec<_> = entries.iter().map(|e| (e.commit_id, e.change as u8, e.data.clone())).collect();
        assert_eq!(changes, vec![(1, 0b00, b"a".to_vec()), (2, 0b10, b"b".to_vec()), (3, 0b01, vec![])]);
        // Raw bytes on disk carry the same codes.
        let txn = store.env.read_txn().unwrap();
        let raw = store.log.get(&txn, &layout::log_key(1, 2)).unwrap().unwrap();
        assert_eq!(raw[8], 0b10);
        let meta = store.meta.get(&txn, &layout::partition_meta_key(1)).unwrap().unwrap();
        assert_eq!(layout::decode_partition_meta(meta).unwrap().last_commit_id, 3);
    }

    #[test]
    fn commit_ids_are_per_partition_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = Store::open(dir.path(), &options()).unwrap();
            apply(&mut store, &[set(0, key(0, b"x"), b"1"), set(1, key(2, b"y"), b"1"), set(0, key(0, b"z"), b"1")]);
            assert_eq!(store.highest_commit_id(), 2);
        }
        let mut store = Store::open(dir.path(), &options()).unwrap();
        assert_eq!(store.highest_commit_id(), 2);
        apply(&mut store, &[set(0, key(2, b"w"), b"1")]);
        let log = apply(&mut store, &[WorkerRequest::ReadLog { partition: 2, from_commit_id: 2, count: 10 }]);
        let WorkerResponse::Log(entries) = &log[0] else { panic!() };
        assert_eq!(entries.iter().map(|e| e.commit_id).collect::<Vec<_>>(), vec![2]);
        assert_eq!(entries[0].key, b"w");
    }

    #[test]
    fn reopening_with_another_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path(), &options()).unwrap());
        let other = StoreOptions { partitions: 8, ..options() };
        assert!(matches!(Store::open(dir.path(), &other), Err(StoreError::Mismatch(_))));
    }

    #[test]
    fn a_full_map_grows_and_the_batch_is_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), &options()).unwrap();
        let before = store.map_size();
        let value = vec![7u8; 64 * 1024];
        let requests: Vec<_> = (0..64u32).map(|i| set(0, key(0, &i.to_be_bytes()), &value)).collect();
        let responses = apply(&mut store, &requests);
        assert!(responses.iter().all(|r| *r == WorkerResponse::Ok));
        assert!(store.map_size() > before);
        let sizes = apply(&mut store, &[WorkerRequest::DbSize { collection: 0 }]);
        assert_eq!(sizes, vec![WorkerResponse::Integer(64)]);
        let log = apply(&mut store, &[WorkerRequest::ReadLog { partition: 0, from_commit_id: 0, count: 1000 }]);
        let WorkerResponse::Log(entries) = &log[0] else { panic!() };
        assert_eq!(entries.len(), 64, "a replayed batch logs each write once");
    }

    #[test]
    fn string_commands() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), &options()).unwrap();
        let k = || key(3, b"n");
        let responses = apply(
            &mut store,
            &[
                WorkerRequest::IncrBy { collection: 0, key: k(), delta: 5 },
                WorkerRequest::IncrBy { collection: 0, key: k(), delta: i64::MAX },
                WorkerRequest::IncrByFloat { collection: 0, key: k(), delta: 0.5 },
                WorkerRequest::Append { collection: 0, key: k(), value: b"x".to_vec() },
                WorkerRequest::IncrBy { collection: 0, key: k(), delta: 1 },
                WorkerRequest::StrLen { collection: 0, key: k() },
                WorkerRequest::Set {
                    collection: 0,
                    key: k(),
                    value: b"v".to_vec(),
                    condition: SetCondition::IfAbsent,
                    reply: SetReply::WrittenFlag,
                },
                WorkerRequest::GetDel { collection: 0, key: k() },
                WorkerRequest::Exists { collection: 0, keys: vec![k(), k()] },
            ],
        );
        assert_eq!(
            responses,
            vec![
                WorkerResponse::Integer(5),
                WorkerResponse::Error(WorkerError::Overflow),
                WorkerResponse::Value(Some(b"5.5".to_vec())),
                WorkerResponse::Integer(4),
                WorkerResponse::Error(WorkerError::NotInteger),
                WorkerResponse::Integer(4),
                WorkerResponse::Integer(0),
                WorkerResponse::Value(Some(b"5.5x".to_vec())),
                WorkerResponse::Integer(0),
            ]
        );
    }

    #[test]
    fn reads_alone_commit_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), &options()).unwrap();
        let before = store.env.info().last_txn_id;
        apply(&mut store, &[WorkerRequest::Get { collection: 0, key: key(0, b"a") }]);
        apply(&mut store, &[WorkerRequest::Delete { collection: 0, keys: vec![key(0, b"a")] }]);
        assert_eq!(store.env.info().last_txn_id, before);
    }
}

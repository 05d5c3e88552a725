//! A key's state and the one way to change it.
//!
//! [`Store::current`] reads a key as a write sees it: live, missing, or
//! expired but not yet purged. [`Store::put`] and [`Store::remove`] change it
//! and keep everything that depends on it in the same transaction: the expiry
//! index, the partition's next commit id, and the commit-log entry. A key
//! found expired is first purged and logged as a delete, so that replaying the
//! log gives exactly the stored state.
//!
//! A typed key's metadata record is written and removed the same way. When a typed
//! key goes (deleted, expired, overwritten by another value), its elements are
//! reclaimed: at once when few, in the background otherwise ([`Store::reclaim_due_in`]).
//!
//! Active expiry ([`Store::expire_due_in`]) leaves fenced partitions alone.

use crate::store::WriteTxn;
use shoal_shared::frame::{ChangeType, Collection, Key, Partition};

use super::{Batch, OpError, Store, Table};
use shoal_shared::layout::typed::{self, LogTable, TypeMeta};
use shoal_shared::layout::{self, LogRecord, PartitionMeta};

/// Typed keys with at most this many elements have them removed in the same
/// transaction as the key; larger ones are reclaimed in the background.
const RECLAIM_AT_ONCE_ELEMENTS: u64 = 64;

/// A live value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Live {
    /// A string, or a typed key's metadata bytes.
    pub(crate) value: Vec<u8>,
    pub(crate) expires_at_ms: Option<u64>,
    /// The metadata of a typed key.
    pub(crate) typed: Option<TypeMeta>,
}

/// A key as a write sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Current {
    pub(crate) live: Option<Live>,
    /// The key is stored but expired at this time; it has not been purged yet.
    pub(crate) expired_at_ms: Option<u64>,
    /// The metadata of the stored record when it is a typed key, live or expired.
    pub(crate) stored_typed: Option<TypeMeta>,
}

/// What a key's record holds.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RecordValue<'a> {
    String(&'a [u8]),
    Typed(&'a TypeMeta),
}

impl Store {
    /// Reads `key` in `collection` as of `now_ms`.
    pub(crate) fn current(
        &self,
        txn: &WriteTxn,
        db: Table,
        key: &Key,
        now_ms: u64,
    ) -> Result<Current, OpError> {
        let Some(raw) = db.get(txn, &layout::data_key(key.partition, &key.bytes))? else {
            return Ok(Current::default());
        };
        let stored = layout::decode_value(raw)?;
        let stored_typed = match stored.typed {
            true => Some(typed::decode_type_meta(stored.bytes)?),
            false => None,
        };
        match stored.expires_at_ms {
            Some(at) if at <= now_ms => Ok(Current {
                live: None,
                expired_at_ms: Some(at),
                stored_typed,
            }),
            expires_at_ms => Ok(Current {
                live: Some(Live {
                    value: stored.bytes.to_vec(),
                    expires_at_ms,
                    typed: stored_typed,
                }),
                expired_at_ms: None,
                stored_typed,
            }),
        }
    }

    /// Stores the string `value` with `expires_at_ms`, logging a create or an update.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn put(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        db: Table,
        collection: Collection,
        key: &Key,
        current: &Current,
        value: &[u8],
        expires_at_ms: Option<u64>,
    ) -> heed::Result<()> {
        self.put_record(
            txn,
            batch,
            db,
            collection,
            key,
            current,
            RecordValue::String(value),
            expires_at_ms,
        )
    }

    /// Stores `record` with `expires_at_ms`, logging a create or an update. The elements
    /// of a typed key it replaces (of another version) are reclaimed.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn put_record(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        db: Table,
        collection: Collection,
        key: &Key,
        current: &Current,
        record: RecordValue<'_>,
        expires_at_ms: Option<u64>,
    ) -> heed::Result<()> {
        self.purge_expired(txn, batch, db, collection, key, current, false)?;
        let (value, table) = match record {
            RecordValue::String(value) => (std::borrow::Cow::Borrowed(value), LogTable::Plain),
            RecordValue::Typed(meta) => (
                std::borrow::Cow::Owned(typed::encode_type_meta(meta)),
                LogTable::Typed,
            ),
        };
        let new_version = match record {
            RecordValue::Typed(meta) => Some(meta.version),
            RecordValue::String(_) => None,
        };
        if let Some(old) = current
            .stored_typed
            .filter(|old| Some(old.version) != new_version)
        {
            self.reclaim(txn, key, &old)?;
        }
        let old_expiry = current.live.as_ref().and_then(|live| live.expires_at_ms);
        if old_expiry != expires_at_ms {
            if let Some(old) = old_expiry {
                self.expiry.delete(
                    txn,
                    &layout::expiry_key(old, collection, key.partition, &key.bytes),
                )?;
            }
            if let Some(new) = expires_at_ms {
                self.expiry.put(
                    txn,
                    &layout::expiry_key(new, collection, key.partition, &key.bytes),
                    &[],
                )?;
            }
        }
        let commit_id = self.next_commit_id(txn, batch, key.partition)?;
        db.put(
            txn,
            &layout::data_key(key.partition, &key.bytes),
            &layout::encode_record(commit_id, expires_at_ms, new_version.is_some(), &value),
        )?;
        let change = if current.live.is_some() {
            ChangeType::Update
        } else {
            ChangeType::Create
        };
        self.append_log(
            txn,
            batch,
            commit_id,
            change,
            table.field(collection),
            &key.bytes,
            key.partition,
            expires_at_ms,
            &value,
        )
    }

    /// Removes the elements of `meta`'s version of `key`: at once when they are few,
    /// otherwise through a `reclaim` entry that [`Store::reclaim_due_in`] works off.
    pub(crate) fn reclaim(
        &self,
        txn: &mut WriteTxn,
        key: &Key,
        meta: &TypeMeta,
    ) -> heed::Result<()> {
        if meta.count <= RECLAIM_AT_ONCE_ELEMENTS {
            let prefix = typed::element_prefix(key.partition, &key.bytes, meta.version);
            for &table in typed::tables(meta.kind) {
                let db = self.element_db(table);
                let mut doomed = Vec::new();
                for item in db.prefix_iter(txn, &prefix)? {
                    doomed.push(item?.0.to_vec());
                }
                for element in &doomed {
                    db.delete(txn, element)?;
                }
            }
            return Ok(());
        }
        self.reclaim.put(
            txn,
            &typed::reclaim_key(key.partition, meta.kind, &key.bytes, meta.version),
            &[],
        )
    }

    /// Removes up to `limit` elements of old versions of typed keys (see
    /// [`Store::reclaim`]). Not logged: every copy reclaims on its own, and the elements
    /// are invisible already. Returns how many were removed.
    pub(crate) fn reclaim_due_in(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        limit: usize,
    ) -> heed::Result<usize> {
        let mut entries = Vec::new();
        for item in self.reclaim.iter(txn)? {
            entries.push(item?.0.to_vec());
            if entries.len() >= 16 {
                break;
            }
        }
        let mut removed = 0;
        for raw in entries {
            let Ok((kind, prefix)) = typed::decode_reclaim_key(&raw) else {
                tracing::error!("corrupt reclaim entry; dropping it");
                self.reclaim.delete(txn, &raw)?;
                continue;
            };
            let mut left = false;
            for &table in typed::tables(kind) {
                let db = self.element_db(table);
                let mut doomed = Vec::new();
                for item in db.prefix_iter(txn, &prefix)? {
                    if removed + doomed.len() >= limit {
                        left = true;
                        break;
                    }
                    doomed.push(item?.0.to_vec());
                }
                for element in &doomed {
                    db.delete(txn, element)?;
                }
                removed += doomed.len();
            }
            if !left {
                self.reclaim.delete(txn, &raw)?;
            }
            batch.dirty = true;
            if removed >= limit {
                break;
            }
        }
        Ok(removed)
    }

    /// Deletes the key if it is stored (live or expired), logging a delete. Returns whether it was live.
    pub(crate) fn remove(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        db: Table,
        collection: Collection,
        key: &Key,
        current: &Current,
    ) -> heed::Result<bool> {
        match &current.live {
            Some(live) => {
                if let Some(at) = live.expires_at_ms {
                    self.expiry.delete(
                        txn,
                        &layout::expiry_key(at, collection, key.partition, &key.bytes),
                    )?;
                }
                db.delete(txn, &layout::data_key(key.partition, &key.bytes))?;
                if let Some(meta) = &live.typed {
                    self.reclaim(txn, key, meta)?;
                }
                let commit_id = self.next_commit_id(txn, batch, key.partition)?;
                let table = match live.typed {
                    Some(_) => LogTable::Typed,
                    None => LogTable::Plain,
                };
                self.append_log(
                    txn,
                    batch,
                    commit_id,
                    ChangeType::Delete,
                    table.field(collection),
                    &key.bytes,
                    key.partition,
                    None,
                    &[],
                )?;
                Ok(true)
            }
            None => {
                self.purge_expired(txn, batch, db, collection, key, current, true)?;
                Ok(false)
            }
        }
    }

    /// If the key is stored but expired, removes its index entry and logs its deletion;
    /// with `delete_data`, removes the stored value too (a put overwrites it instead).
    #[allow(clippy::too_many_arguments)]
    fn purge_expired(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        db: Table,
        collection: Collection,
        key: &Key,
        current: &Current,
        delete_data: bool,
    ) -> heed::Result<()> {
        let Some(at) = current.expired_at_ms else {
            return Ok(());
        };
        self.expiry.delete(
            txn,
            &layout::expiry_key(at, collection, key.partition, &key.bytes),
        )?;
        if delete_data {
            db.delete(txn, &layout::data_key(key.partition, &key.bytes))?;
            if let Some(meta) = &current.stored_typed {
                self.reclaim(txn, key, meta)?;
            }
        }
        let commit_id = self.next_commit_id(txn, batch, key.partition)?;
        let table = match current.stored_typed {
            Some(_) => LogTable::Typed,
            None => LogTable::Plain,
        };
        self.append_log(
            txn,
            batch,
            commit_id,
            ChangeType::Delete,
            table.field(collection),
            &key.bytes,
            key.partition,
            None,
            &[],
        )
    }

    /// Advances the partition's commit id inside this transaction.
    pub(super) fn next_commit_id(
        &self,
        txn: &WriteTxn,
        batch: &mut Batch,
        partition: Partition,
    ) -> heed::Result<u64> {
        let meta = self.partition_meta(txn, batch, partition)?;
        let next = PartitionMeta {
            last_commit_id: meta.last_commit_id + 1,
            mtime_ms: batch.now_ms,
            ..meta
        };
        batch.partitions.insert(partition, next);
        Ok(next.last_commit_id)
    }

    /// The partition's `meta` entry as this transaction sees it.
    pub(crate) fn partition_meta(
        &self,
        txn: &WriteTxn,
        batch: &Batch,
        partition: Partition,
    ) -> heed::Result<PartitionMeta> {
        match batch.partitions.get(&partition) {
            Some(meta) => Ok(*meta),
            None => self.stored_partition_meta(txn, partition),
        }
    }

    /// The partition's `meta` entry as stored in the transaction, without the changes a
    /// batch holds back until its end.
    pub(crate) fn stored_partition_meta(
        &self,
        txn: &WriteTxn,
        partition: Partition,
    ) -> heed::Result<PartitionMeta> {
        match self.meta.get(txn, &layout::partition_meta_key(partition))? {
            Some(raw) => {
                layout::decode_partition_meta(raw).map_err(|e| heed::Error::Decoding(Box::new(e)))
            }
            None => Ok(PartitionMeta::default()),
        }
    }

    /// Appends a log entry; `collection` is the entry's collection field, with its table
    /// ([`LogTable::field`]), and `key` the stored key without its partition.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn append_log(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        commit_id: u64,
        change: ChangeType,
        collection: u16,
        key: &[u8],
        partition: Partition,
        expires_at_ms: Option<u64>,
        data: &[u8],
    ) -> heed::Result<()> {
        let record = LogRecord {
            timestamp_ms: batch.now_ms,
            change,
            collection,
            expires_at_ms,
            key,
            data,
        };
        let value = layout::encode_log_value(&record);
        self.put_log_entry(txn, batch, partition, commit_id, &value)
    }

    /// Deletes due keys through the expiry index (see [`Store::expire_due`]).
    pub(crate) fn expire_due_in(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        limit: usize,
    ) -> heed::Result<usize> {
        let end = layout::expiry_key(batch.now_ms, Collection::MAX, Partition::MAX, &[0xff; 16]);
        let mut due = Vec::new();
        let range = (
            std::ops::Bound::Unbounded,
            std::ops::Bound::Included(&end[..]),
        );
        let fenced = self.fenced_partitions(batch);
        for item in self.expiry.range(txn, &range)? {
            let (raw, _) = item?;
            // A fenced partition's keys are not this worker's to expire: a delete logged
            // here would take a commit id that the partition's owner gives to another entry.
            let partition = layout::decode_expiry_key(raw).map(|entry| entry.partition);
            if partition.is_ok_and(|partition| fenced.contains(&partition)) {
                continue;
            }
            due.push(raw.to_vec());
            if due.len() >= limit {
                break;
            }
        }
        let mut expired = 0;
        for raw in due {
            let Ok(entry) = layout::decode_expiry_key(&raw) else {
                tracing::error!("corrupt expiry index entry; removing it");
                self.expiry.delete(txn, &raw)?;
                continue;
            };
            let key = Key {
                partition: entry.partition,
                bytes: entry.key.to_vec(),
            };
            if self.locks.holder(entry.collection, &key).is_some() {
                continue;
            }
            let Some(db) = self.collection(entry.collection) else {
                self.expiry.delete(txn, &raw)?;
                continue;
            };
            let current = match self.current(txn, db, &key, batch.now_ms) {
                Ok(current) => current,
                Err(OpError::Lmdb(error)) => return Err(error),
                Err(_) => {
                    tracing::error!(
                        partition = key.partition,
                        "corrupt value under an expiring key; leaving it"
                    );
                    self.expiry.delete(txn, &raw)?;
                    continue;
                }
            };
            if current.expired_at_ms == Some(entry.expires_at_ms) {
                self.remove(txn, batch, db, entry.collection, &key, &current)?;
                expired += 1;
            } else {
                // The key was rewritten with another expiry; this entry is stale.
                self.expiry.delete(txn, &raw)?;
            }
        }
        Ok(expired)
    }
}

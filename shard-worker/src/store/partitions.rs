//! Whole partitions as raw records: exported, imported and cleared, both when
//! the worker count changes ([`crate::rebalance`]) and when another host takes
//! a partition over live (the handoff the net-daemon drives).
//!
//! A partition's records are: its keys in every `c<N>`, the elements of its typed keys
//! and its `reclaim` entries, its `log` entries, its `meta` entry, and its `expiry`
//! index entries. They are copied byte for byte,
//! so commit ids, expiries and the log carry over unchanged.
//!
//! A handoff: the target's net-daemon fences the partition on the target,
//! copies it ([`Store::export_partition`] on the source, `import` here), then
//! replays the source's log from where the copy started ([`Store::apply_log_in`],
//! which keeps commit ids and may overlap the copy); the source then fences
//! the partition (client writes get `PartitionMoved`), the last entries are
//! replayed, the owner switches, the target lifts its fence and the source
//! clears its copy. The fence itself is this worker's state, not a record of
//! the partition: it is neither exported nor cleared. A partition in which a
//! prepared transaction locks keys can be neither fenced nor cleared.
//!
//! Requests here never check the fence and never talk to another host.

use std::ops::Bound;

use crate::store::WriteTxn;
use shoal_shared::frame::{
    ChangeType, LogEntry, Partition, Record, RecordTable, WorkerError, WorkerResponse,
};
use shoal_shared::limits::{
    LMDB_MAX_KEY_BYTES, MAX_EXPORT_CHUNK_BYTES, MAX_KEY_BYTES, MAX_STORED_KEY_BYTES,
};

use super::{Batch, OpError, OpResult, Store, StoreError, Table};
use shoal_shared::layout::typed::{self, ElementTable, LogTable};
use shoal_shared::layout::{self, LogRecord, PartitionMeta};

/// Raw records of one partition, and where to continue.
pub(crate) struct Chunk {
    pub(crate) records: Vec<Record>,
    pub(crate) bytes: usize,
    /// Where the next chunk starts; `None` when the partition is complete.
    pub(crate) next: Option<(RecordTable, Vec<u8>)>,
}

impl Store {
    fn table(&self, table: RecordTable) -> Option<Table> {
        match table {
            RecordTable::Collection(c) => self.collection(c),
            RecordTable::Log => Some(self.log),
            RecordTable::Meta => Some(self.meta),
            RecordTable::Expiry => Some(self.expiry),
            RecordTable::Txns => Some(self.txns),
            RecordTable::Elements(table) => Some(self.element_db(table)),
            RecordTable::Reclaim => Some(self.reclaim),
        }
    }

    /// The tables in export order.
    fn tables(&self) -> Vec<RecordTable> {
        let mut tables: Vec<RecordTable> = (0..self.collections.len() as u16)
            .map(RecordTable::Collection)
            .collect();
        tables.extend(ElementTable::ALL.map(RecordTable::Elements));
        tables.extend([
            RecordTable::Reclaim,
            RecordTable::Log,
            RecordTable::Meta,
            RecordTable::Expiry,
            RecordTable::Txns,
        ]);
        tables
    }

    /// Whether a raw key of `table` belongs to `partition`. A `txns` record may concern
    /// several partitions: its part is picked by [`Store::exported_value`].
    fn belongs(table: RecordTable, key: &[u8], partition: Partition) -> bool {
        let prefix = partition.to_be_bytes();
        match table {
            RecordTable::Collection(_)
            | RecordTable::Log
            | RecordTable::Elements(_)
            | RecordTable::Reclaim => key.starts_with(&prefix),
            RecordTable::Meta => key == layout::partition_meta_key(partition),
            RecordTable::Expiry => {
                layout::decode_expiry_key(key).is_ok_and(|entry| entry.partition == partition)
            }
            RecordTable::Txns => true,
        }
    }

    /// The exported value of a record of `partition`: the stored bytes, or, for a `txns`
    /// record, the partition's part of it (`None` when it has none).
    fn exported_value(
        table: RecordTable,
        value: &[u8],
        partition: Partition,
    ) -> heed::Result<Option<Vec<u8>>> {
        if table != RecordTable::Txns {
            return Ok(Some(value.to_vec()));
        }
        let record =
            layout::decode_intent(value).map_err(|e| heed::Error::Decoding(Box::new(e)))?;
        record
            .part(partition)
            .map(|part| layout::encode_intent(&part))
            .transpose()
            .map_err(|e| heed::Error::Encoding(Box::new(e)))
    }

    /// Reads up to about `max_bytes` of `partition`'s records, from `from` (inclusive).
    pub(crate) fn export_partition(
        &self,
        partition: Partition,
        from: Option<(RecordTable, Vec<u8>)>,
        max_bytes: usize,
    ) -> Result<Chunk, StoreError> {
        let txn = self.env.read_txn()?;
        Ok(self.export_in(&txn, partition, from, max_bytes)?)
    }

    /// [`Store::export_partition`] in the transaction `txn`. Always returns at least one
    /// record if any is left, so that each chunk makes progress.
    fn export_in(
        &self,
        txn: &heed::RoTxn,
        partition: Partition,
        from: Option<(RecordTable, Vec<u8>)>,
        max_bytes: usize,
    ) -> heed::Result<Chunk> {
        let mut records = Vec::new();
        let mut bytes = 0;
        let tables = self.tables();
        let (start_table, start_key) = match from {
            Some((table, key)) => (table, Some(key)),
            None => (tables[0], None),
        };
        let first = tables.iter().position(|t| *t == start_table).unwrap_or(0);
        for (i, &table) in tables.iter().enumerate().skip(first) {
            let Some(db) = self.table(table) else {
                continue;
            };
            let prefix = partition.to_be_bytes();
            let lower = match (&start_key, i == first) {
                (Some(key), true) => key.clone(),
                _ => match table {
                    RecordTable::Expiry | RecordTable::Txns => Vec::new(),
                    RecordTable::Meta => layout::partition_meta_key(partition).to_vec(),
                    _ => prefix.to_vec(),
                },
            };
            // LMDB refuses an empty key, even as a range bound.
            let start = if lower.is_empty() {
                Bound::Unbounded
            } else {
                Bound::Included(lower.as_slice())
            };
            let range = (start, Bound::<&[u8]>::Unbounded);
            for item in db.range(txn, &range)? {
                let (key, value) = item?;
                if !matches!(
                    table,
                    RecordTable::Expiry | RecordTable::Meta | RecordTable::Txns
                ) && !key.starts_with(&prefix)
                {
                    break;
                }
                if !Self::belongs(table, key, partition) {
                    continue;
                }
                let Some(value) = Self::exported_value(table, value, partition)? else {
                    continue;
                };
                if bytes >= max_bytes && !records.is_empty() {
                    return Ok(Chunk {
                        records,
                        bytes,
                        next: Some((table, key.to_vec())),
                    });
                }
                bytes += key.len() + value.len();
                records.push(Record {
                    table,
                    key: key.to_vec(),
                    value,
                });
            }
        }
        Ok(Chunk {
            records,
            bytes,
            next: None,
        })
    }

    /// `ExportPartition`: a chunk of the partition's records, at most
    /// [`MAX_EXPORT_CHUNK_BYTES`] (and one record) so that the reply fits a frame.
    pub(crate) fn export_request(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        partition: Partition,
        from: &Option<(RecordTable, Vec<u8>)>,
        max_bytes: u32,
    ) -> OpResult {
        if let Some((table, _)) = from {
            if self.table(*table).is_none() {
                return Err(refused(format!(
                    "cannot export from {table:?}: no such table"
                )));
            }
        }
        let max_bytes = (max_bytes as usize).min(MAX_EXPORT_CHUNK_BYTES);
        // The export reads the log from `log` alone.
        self.move_recent_in(txn, batch)?;
        let chunk = self.export_in(txn, partition, from.clone(), max_bytes)?;
        Ok(WorkerResponse::Records {
            records: chunk.records,
            next: chunk.next,
        })
    }

    /// Writes raw records in one transaction (growing the map if needed).
    pub(crate) fn import_records(&mut self, records: &[Record]) -> Result<(), StoreError> {
        let metas = self.check_records(records).map_err(StoreError::Mismatch)?;
        self.in_write_txn(|store, txn, batch| store.write_records(txn, batch, records, &metas))
    }

    /// `ImportRecords`: checks every record, then writes them all.
    pub(crate) fn import_in(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        records: &[Record],
    ) -> OpResult {
        let metas = self.check_records(records).map_err(refused)?;
        self.write_records(txn, batch, records, &metas)?;
        Ok(WorkerResponse::Ok)
    }

    /// Checks that each record fits its table: a collection that exists, keys LMDB takes,
    /// and only partitions' entries in `meta` (never the shard's identity). Returns the
    /// decoded partition entries of `meta`, in record order.
    fn check_records(&self, records: &[Record]) -> Result<Vec<(Partition, PartitionMeta)>, String> {
        let mut metas = Vec::new();
        for record in records {
            let Record { table, key, value } = record;
            if self.table(*table).is_none() {
                return Err(format!("record for {table:?}: no such table"));
            }
            if key.is_empty() || key.len() > LMDB_MAX_KEY_BYTES {
                return Err(format!(
                    "record for {table:?} with a key of {} bytes",
                    key.len()
                ));
            }
            match table {
                RecordTable::Collection(_) | RecordTable::Elements(_) | RecordTable::Reclaim
                    if key.len() < 2 =>
                {
                    return Err(format!("{table:?} record without a partition"));
                }
                RecordTable::Log if key.len() != 10 => {
                    return Err(format!("log record with a key of {} bytes", key.len()));
                }
                RecordTable::Expiry => {
                    layout::decode_expiry_key(key).map_err(|e| e.to_string())?;
                }
                RecordTable::Meta => {
                    let [b'p', high, low] = key[..] else {
                        return Err(format!("meta record {key:?} is no partition entry"));
                    };
                    let meta = layout::decode_partition_meta(value).map_err(|e| e.to_string())?;
                    metas.push((u16::from_be_bytes([high, low]), meta));
                }
                RecordTable::Txns => {
                    txn_part(key, value)?;
                }
                _ => {}
            }
        }
        Ok(metas)
    }

    /// Writes checked records. A partition's `meta` entry goes through the batch, like
    /// every change of it, so that the shard's highest commit id follows it.
    fn write_records(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        records: &[Record],
        metas: &[(Partition, PartitionMeta)],
    ) -> heed::Result<()> {
        // A partition's entries in `recent` must stay newer than those in `log`.
        if records
            .iter()
            .any(|record| record.table == RecordTable::Log)
        {
            self.move_recent_in(txn, batch)?;
        }
        for record in records {
            match record.table {
                RecordTable::Meta => continue,
                // A part of a record: merged into this shard's record of the transaction.
                RecordTable::Txns => {
                    let (txid, partition, part) = txn_part(&record.key, &record.value)
                        .map_err(|why| heed::Error::Decoding(why.into()))?;
                    self.set_part(txn, batch, txid, partition, Some(part))
                        .map_err(op_to_heed)?;
                }
                table => {
                    if let Some(db) = self.table(table) {
                        db.put(txn, &record.key, &record.value)?;
                    }
                }
            }
        }
        for &(partition, meta) in metas {
            batch.partitions.insert(partition, meta);
        }
        batch.dirty = true;
        Ok(())
    }

    /// `ApplyLog`: replays another host's log entries in order, keeping their commit ids.
    ///
    /// An entry sets its key to the state right after its commit, unless the stored value
    /// is from that commit or a later one: so an entry already applied (by the copy or an
    /// earlier replay) changes nothing. The entry is logged at its commit id with the bytes
    /// the source logged, and the partition's last commit id (and mtime) follow it. Every
    /// entry is checked before any is applied.
    pub(crate) fn apply_log_in(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        entries: &[LogEntry],
    ) -> OpResult {
        for entry in entries {
            let (table, collection) = LogTable::split(entry.collection)?;
            self.db(collection)?;
            let longest = match (table, entry.expires_at_ms) {
                (LogTable::Element(_), _) => LMDB_MAX_KEY_BYTES - 2,
                (_, Some(_)) => MAX_KEY_BYTES,
                (_, None) => MAX_STORED_KEY_BYTES,
            };
            if matches!(table, LogTable::Element(_))
                && typed::element_user_key(&[&[0, 0], &entry.key[..]].concat()).is_none()
            {
                return Err(refused(format!(
                    "log entry {} of partition {} has a malformed element key",
                    entry.commit_id, entry.partition
                )));
            }
            if entry.key.len() > longest {
                return Err(refused(format!(
                    "log entry {} of partition {} has a key of {} bytes",
                    entry.commit_id,
                    entry.partition,
                    entry.key.len()
                )));
            }
            if entry.commit_id == 0 {
                return Err(refused(format!(
                    "log entry of partition {} has commit id 0",
                    entry.partition
                )));
            }
            if entry.change == ChangeType::Txn {
                Self::check_txn_entry(entry)?;
            }
        }
        for entry in entries {
            self.replay(txn, batch, entry)?;
        }
        batch.dirty |= !entries.is_empty();
        Ok(WorkerResponse::Ok)
    }

    fn replay(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        entry: &LogEntry,
    ) -> Result<(), OpError> {
        match entry.change {
            ChangeType::Marker => {}
            ChangeType::Txn => self.apply_txn_entry(txn, batch, entry)?,
            ChangeType::Create | ChangeType::Update | ChangeType::Delete => {
                match LogTable::split(entry.collection)? {
                    (LogTable::Element(table), _) => self.replay_element(txn, entry, table)?,
                    (table, collection) => {
                        self.replay_key(txn, entry, collection, table == LogTable::Typed)?
                    }
                }
            }
        }
        self.log_replayed(txn, batch, entry)
    }

    /// Writes the element change of a replayed entry, unless the stored element is as new.
    fn replay_element(
        &self,
        txn: &mut WriteTxn,
        entry: &LogEntry,
        table: ElementTable,
    ) -> Result<(), OpError> {
        let db = self.element_db(table);
        let stored_key = layout::data_key(entry.partition, &entry.key);
        let stored = db
            .get(txn, &stored_key)?
            .map(|raw| layout::decode_value(raw).map_or(0, |value| value.commit_id));
        if stored.is_some_and(|commit_id| commit_id >= entry.commit_id) {
            return Ok(());
        }
        // An element of a version its key has since left (the key was replaced by a later
        // commit) is not brought back by a replay that overlaps a copy: nothing would
        // ever reclaim it.
        if let Some((user_key, version)) = typed::element_owner(&stored_key) {
            let (_, collection) = LogTable::split(entry.collection)?;
            let record = self
                .db(collection)?
                .get(txn, &layout::data_key(entry.partition, user_key))?
                .map(layout::decode_value)
                .transpose()?;
            if let Some(record) = record {
                let same_version = record.typed
                    && typed::decode_type_meta(record.bytes)
                        .is_ok_and(|meta| meta.version == version);
                if record.commit_id > entry.commit_id && !same_version {
                    return Ok(());
                }
            }
        }
        match entry.change {
            ChangeType::Create | ChangeType::Update => db.put(
                txn,
                &stored_key,
                &layout::encode_value(entry.commit_id, None, &entry.data),
            )?,
            _ => {
                db.delete(txn, &stored_key)?;
            }
        }
        Ok(())
    }

    /// Writes the key change of a replayed entry, unless the stored value is as new. A
    /// typed key it replaces (by another version, or by a delete) has its elements
    /// reclaimed.
    fn replay_key(
        &self,
        txn: &mut WriteTxn,
        entry: &LogEntry,
        collection: u16,
        typed_record: bool,
    ) -> Result<(), OpError> {
        let db = self.db(collection)?;
        let stored_key = layout::data_key(entry.partition, &entry.key);
        // (commit id, expiry, typed metadata) of the stored value. A value that does not
        // decode is replaced; its expiry index entry, if any, is dropped later as stale.
        let stored = db.get(txn, &stored_key)?.map(|raw| {
            match layout::decode_value(raw).and_then(|value| {
                let meta = match value.typed {
                    true => Some(typed::decode_type_meta(value.bytes)?),
                    false => None,
                };
                Ok((value.commit_id, value.expires_at_ms, meta))
            }) {
                Ok(stored) => stored,
                Err(error) => {
                    tracing::warn!(partition = entry.partition, %error, "replacing a corrupt value");
                    (0, None, None)
                }
            }
        });
        let applied = stored.is_some_and(|(commit_id, _, _)| commit_id >= entry.commit_id);
        if !applied {
            let new_version = match (typed_record, entry.change) {
                (true, ChangeType::Create | ChangeType::Update) => {
                    Some(typed::decode_type_meta(&entry.data)?.version)
                }
                _ => None,
            };
            if let Some(old) = stored
                .and_then(|(_, _, meta)| meta)
                .filter(|old| Some(old.version) != new_version)
            {
                let key = shoal_shared::frame::Key {
                    partition: entry.partition,
                    bytes: entry.key.clone(),
                };
                self.reclaim(txn, &key, &old)?;
            }
            let old_expiry = stored.and_then(|(_, expires_at_ms, _)| expires_at_ms);
            let new_expiry = match entry.change {
                ChangeType::Delete | ChangeType::Marker | ChangeType::Txn => None,
                ChangeType::Create | ChangeType::Update => entry.expires_at_ms,
            };
            if old_expiry != new_expiry {
                if let Some(old) = old_expiry {
                    let index_key =
                        layout::expiry_key(old, collection, entry.partition, &entry.key);
                    self.expiry.delete(txn, &index_key)?;
                }
                if let Some(new) = new_expiry {
                    let index_key =
                        layout::expiry_key(new, collection, entry.partition, &entry.key);
                    self.expiry.put(txn, &index_key, &[])?;
                }
            }
            match entry.change {
                ChangeType::Delete | ChangeType::Marker | ChangeType::Txn => {
                    if stored.is_some() {
                        db.delete(txn, &stored_key)?;
                    }
                }
                ChangeType::Create | ChangeType::Update => db.put(
                    txn,
                    &stored_key,
                    &layout::encode_record(
                        entry.commit_id,
                        entry.expires_at_ms,
                        typed_record,
                        &entry.data,
                    ),
                )?,
            }
        }
        Ok(())
    }

    /// Writes a replayed entry to the log and moves the partition's last commit id.
    fn log_replayed(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        entry: &LogEntry,
    ) -> Result<(), OpError> {
        let meta = self.partition_meta(txn, batch, entry.partition)?;
        // The log keeps every entry above `trimmed_through`; one below it would never be trimmed.
        if entry.commit_id > meta.trimmed_through {
            let value = layout::encode_log_value(&LogRecord::from(entry));
            if entry.commit_id > meta.last_commit_id {
                self.put_log_entry(txn, batch, entry.partition, entry.commit_id, &value)?;
            } else {
                // An entry this copy has already: written over where it is, in `log` once
                // `recent` is moved there (an entry is never in both).
                self.move_recent_in(txn, batch)?;
                let key = layout::log_key(entry.partition, entry.commit_id);
                self.log.put(txn, &key, &value)?;
            }
        }
        if entry.commit_id > meta.last_commit_id {
            batch.partitions.insert(
                entry.partition,
                PartitionMeta {
                    last_commit_id: entry.commit_id,
                    mtime_ms: entry.timestamp_ms,
                    ..meta
                },
            );
        }
        Ok(())
    }

    /// Deletes every record of `partition` (a no-op for a partition this shard does not hold).
    pub(crate) fn clear_partition(&mut self, partition: Partition) -> Result<(), StoreError> {
        self.in_write_txn(|store, txn, batch| store.clear_partition_in(txn, batch, partition))
    }

    /// `ClearPartition`: refused while a prepared transaction locks keys of the partition.
    pub(crate) fn clear_request(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        partition: Partition,
    ) -> OpResult {
        if self.partition_locked(batch, partition) && !self.is_replicated(txn, partition)? {
            return Err(OpError::Refused(WorkerError::Locked));
        }
        self.clear_partition_in(txn, batch, partition)?;
        Ok(WorkerResponse::Ok)
    }

    /// Whether `partition` is replicated here (it has a replication state): its
    /// transaction records travel in its log and its copies, so they never hold back a
    /// fence or a clear of this copy.
    fn is_replicated(&self, txn: &WriteTxn, partition: Partition) -> Result<bool, OpError> {
        Ok(self
            .meta
            .get(txn, &layout::replica_state_key(partition))?
            .is_some())
    }

    /// Deletes `partition`'s keys and log by their prefix, its `meta` entry, its
    /// entries of the expiry index (which is ordered by time, so it is read whole), and its
    /// parts of transaction records (with their locks).
    fn clear_partition_in(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        partition: Partition,
    ) -> heed::Result<()> {
        self.move_recent_in(txn, batch)?;
        let start = partition.to_be_bytes();
        let end = partition.checked_add(1).map(u16::to_be_bytes);
        let range = (
            Bound::Included(&start[..]),
            end.as_ref()
                .map_or(Bound::Unbounded, |end| Bound::Excluded(&end[..])),
        );
        let mut deleted = 0;
        for db in self
            .collections
            .iter()
            .chain(&self.elements)
            .chain([&self.log, &self.reclaim])
        {
            deleted += db.delete_range(txn, &range)?;
        }
        deleted += usize::from(
            self.meta
                .delete(txn, &layout::partition_meta_key(partition))?,
        );
        // An entry of the batch would be written back at commit.
        batch.partitions.remove(&partition);
        let keys = doomed_keys(self.expiry, txn, RecordTable::Expiry, &|p| p == partition)?;
        for key in &keys {
            self.expiry.delete(txn, key)?;
        }
        deleted += self
            .clear_parts(txn, batch, &|p| p == partition)
            .map_err(op_to_heed)?;
        // Clearing an empty partition commits nothing (and costs no fsync).
        batch.dirty |= deleted + keys.len() > 0;
        Ok(())
    }

    /// Deletes every record of the partitions `doomed` says yes to.
    pub(crate) fn clear_partitions(
        &mut self,
        doomed: &dyn Fn(Partition) -> bool,
    ) -> Result<(), StoreError> {
        self.in_write_txn(|store, txn, batch| {
            let changed = store.clear_parts(txn, batch, doomed).map_err(op_to_heed)?;
            batch.dirty |= changed > 0;
            for table in store.tables() {
                if table == RecordTable::Txns {
                    continue;
                }
                let Some(db) = store.table(table) else {
                    continue;
                };
                let keys = doomed_keys(db, txn, table, doomed)?;
                for key in &keys {
                    db.delete(txn, key)?;
                }
                batch.dirty |= !keys.is_empty();
            }
            Ok(())
        })
    }

    /// `SetFence`: fencing is refused while a transaction record holds ops in the
    /// partition (a prepared intent, or a decider's record not forgotten yet). The fence is a `meta` entry, written in this transaction; the in-memory
    /// set follows once it commits.
    pub(crate) fn set_fence(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        partition: Partition,
        fenced: bool,
    ) -> OpResult {
        if fenced
            && (self.partition_locked(batch, partition)
                || self.partition_in_transactions(txn, partition)?)
            && !self.is_replicated(txn, partition)?
        {
            return Err(OpError::Refused(WorkerError::Locked));
        }
        if self.is_fenced(batch, partition) != fenced {
            let key = layout::fence_key(partition);
            if fenced {
                self.meta.put(txn, &key, &[])?;
            } else {
                self.meta.delete(txn, &key)?;
            }
            batch.fence_changes.push((partition, fenced));
            batch.dirty = true;
        }
        Ok(WorkerResponse::Ok)
    }

    /// `Fences`: the fenced partitions as this transaction sees them, ascending.
    pub(crate) fn fences_reply(&self, batch: &Batch) -> OpResult {
        Ok(WorkerResponse::Partitions(
            self.fenced_partitions(batch).into_iter().collect(),
        ))
    }

    /// Multi-worker transactions still prepared here.
    pub(crate) fn prepared_transactions(&self) -> Result<usize, StoreError> {
        let txn = self.env.read_txn()?;
        let mut prepared = 0;
        for item in self.txns.iter(&txn)? {
            let (_, raw) = item?;
            if !layout::is_decision_record(raw)? {
                prepared += 1;
            }
        }
        Ok(prepared)
    }

    /// The id high-water mark recorded here (0 if none).
    pub(crate) fn ids_high_water(&self) -> Result<u64, StoreError> {
        let txn = self.env.read_txn()?;
        match self.meta.get(&txn, layout::META_IDS_HIGH_WATER)? {
            Some(raw) => Ok(layout::decode_u64(raw, "id high-water mark")?),
            None => Ok(0),
        }
    }

    /// Records the id high-water mark (never lowers it) and the worker count the
    /// environment now belongs to.
    pub(crate) fn finish_rebalance(
        &mut self,
        ids_high_water: u64,
        partitions: u16,
        workers: u16,
    ) -> Result<(), StoreError> {
        let current = self.ids_high_water()?;
        self.in_write_txn(|store, txn, batch| {
            store.meta.put(
                txn,
                layout::META_IDS_HIGH_WATER,
                &ids_high_water.max(current).to_be_bytes(),
            )?;
            store.meta.put(
                txn,
                layout::META_LAYOUT,
                &layout::encode_layout(partitions, workers),
            )?;
            batch.dirty = true;
            Ok(())
        })
    }
}

/// Raw keys of `table` whose partition `doomed` says yes to.
/// A request refused as invalid, before anything of it was written.
/// A request refused with a storage error that names why.
pub(super) fn refused(why: String) -> OpError {
    OpError::Refused(WorkerError::Storage(why))
}

/// An error of a request as an LMDB error, for code that runs inside a whole-shard change
/// (a clear or an import) rather than as one request.
fn op_to_heed(error: OpError) -> heed::Error {
    match error {
        OpError::Lmdb(error) => error,
        OpError::Corrupt(error) => heed::Error::Decoding(Box::new(error)),
        OpError::Refused(error) => heed::Error::Decoding(format!("{error:?}").into()),
    }
}

/// A `txns` record of an export: (transaction id, its partition, the partition's part).
fn txn_part(key: &[u8], value: &[u8]) -> Result<(u64, Partition, layout::Intent), String> {
    let txid = layout::decode_u64(key, "transaction id").map_err(|e| e.to_string())?;
    let part = layout::decode_intent(value).map_err(|e| e.to_string())?;
    match part.partitions()[..] {
        [partition] if part.is_part_of(partition) => Ok((txid, partition, part)),
        _ => Err(format!(
            "transaction record {txid} is not the part of one partition"
        )),
    }
}

fn doomed_keys(
    db: Table,
    txn: &WriteTxn,
    table: RecordTable,
    doomed: &dyn Fn(Partition) -> bool,
) -> heed::Result<Vec<Vec<u8>>> {
    let mut keys = Vec::new();
    for item in db.iter(txn)? {
        let (key, _) = item?;
        let partition = match table {
            RecordTable::Collection(_)
            | RecordTable::Log
            | RecordTable::Elements(_)
            | RecordTable::Reclaim => key.get(..2).map(|p| u16::from_be_bytes([p[0], p[1]])),
            RecordTable::Meta => match key {
                [b'p', high, low] => Some(u16::from_be_bytes([*high, *low])),
                _ => None,
            },
            RecordTable::Expiry => layout::decode_expiry_key(key)
                .ok()
                .map(|entry| entry.partition),
            RecordTable::Txns => None,
        };
        if partition.is_some_and(doomed) {
            keys.push(key.to_vec());
        }
    }
    Ok(keys)
}

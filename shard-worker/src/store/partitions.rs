//! Whole partitions as raw records, for moving them between environments when
//! the worker count changes ([`crate::rebalance`]).
//!
//! A partition's records are: its keys in every `c<N>`, its `log` entries, its
//! `meta` entry, and its `expiry` index entries. They are copied byte for byte,
//! so commit ids, expiries and the log carry over unchanged.

use std::ops::Bound;

use heed::RwTxn;
use serde::{Deserialize, Serialize};
use shoal_shared::frame::Partition;

use super::{RawDatabase, Store, StoreError};
use crate::layout;

/// The database a raw record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Table {
    Collection(u16),
    Log,
    Meta,
    Expiry,
}

/// Raw records of one partition, and where to continue.
pub struct Chunk {
    pub records: Vec<(Table, Vec<u8>, Vec<u8>)>,
    pub bytes: usize,
    /// Where the next chunk starts; `None` when the partition is complete.
    pub next: Option<(Table, Vec<u8>)>,
}

impl Store {
    fn table(&self, table: Table) -> Option<RawDatabase> {
        match table {
            Table::Collection(c) => self.collection(c),
            Table::Log => Some(self.log),
            Table::Meta => Some(self.meta),
            Table::Expiry => Some(self.expiry),
        }
    }

    /// The tables in export order.
    fn tables(&self) -> Vec<Table> {
        let mut tables: Vec<Table> = (0..self.collections.len() as u16)
            .map(Table::Collection)
            .collect();
        tables.extend([Table::Log, Table::Meta, Table::Expiry]);
        tables
    }

    /// Whether a raw key of `table` belongs to `partition`.
    fn belongs(table: Table, key: &[u8], partition: Partition) -> bool {
        let prefix = partition.to_be_bytes();
        match table {
            Table::Collection(_) | Table::Log => key.starts_with(&prefix),
            Table::Meta => key == layout::partition_meta_key(partition),
            Table::Expiry => {
                layout::decode_expiry_key(key).is_ok_and(|entry| entry.partition == partition)
            }
        }
    }

    /// Reads up to about `max_bytes` of `partition`'s records, from `from` (inclusive).
    pub fn export_partition(
        &self,
        partition: Partition,
        from: Option<(Table, Vec<u8>)>,
        max_bytes: usize,
    ) -> Result<Chunk, StoreError> {
        let txn = self.env.read_txn()?;
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
                    Table::Expiry => Vec::new(),
                    Table::Meta => layout::partition_meta_key(partition).to_vec(),
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
            for item in db.range(&txn, &range)? {
                let (key, value) = item?;
                if !matches!(table, Table::Expiry | Table::Meta) && !key.starts_with(&prefix) {
                    break;
                }
                if !Self::belongs(table, key, partition) {
                    continue;
                }
                if bytes >= max_bytes {
                    return Ok(Chunk {
                        records,
                        bytes,
                        next: Some((table, key.to_vec())),
                    });
                }
                bytes += key.len() + value.len();
                records.push((table, key.to_vec(), value.to_vec()));
            }
        }
        Ok(Chunk {
            records,
            bytes,
            next: None,
        })
    }

    /// Writes raw records in one transaction (growing the map if needed).
    pub fn import_records(
        &mut self,
        records: &[(Table, Vec<u8>, Vec<u8>)],
    ) -> Result<(), StoreError> {
        self.in_write_txn(|store, txn, batch| {
            for (table, key, value) in records {
                if let Some(db) = store.table(*table) {
                    db.put(txn, key, value)?;
                }
            }
            batch.dirty = true;
            Ok(())
        })
    }

    /// Deletes every record of `partition` (a no-op for a partition this shard does not hold).
    pub fn clear_partition(&mut self, partition: Partition) -> Result<(), StoreError> {
        self.clear_partitions(&|p| p == partition)
    }

    /// Deletes every record of the partitions `doomed` says yes to.
    pub fn clear_partitions(
        &mut self,
        doomed: &dyn Fn(Partition) -> bool,
    ) -> Result<(), StoreError> {
        self.in_write_txn(|store, txn, batch| {
            for table in store.tables() {
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

    /// Multi-worker transactions still prepared here.
    pub fn prepared_transactions(&self) -> Result<usize, StoreError> {
        let txn = self.env.read_txn()?;
        let mut prepared = 0;
        for item in self.txns.iter(&txn)? {
            let (_, raw) = item?;
            if !super::txns::is_decision_record(raw)? {
                prepared += 1;
            }
        }
        Ok(prepared)
    }

    /// The id high-water mark recorded here (0 if none).
    pub fn ids_high_water(&self) -> Result<u64, StoreError> {
        let txn = self.env.read_txn()?;
        match self.meta.get(&txn, layout::META_IDS_HIGH_WATER)? {
            Some(raw) => Ok(layout::decode_u64(raw, "id high-water mark")?),
            None => Ok(0),
        }
    }

    /// Records the id high-water mark (never lowers it) and the worker count the
    /// environment now belongs to.
    pub fn finish_rebalance(
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
fn doomed_keys(
    db: RawDatabase,
    txn: &RwTxn,
    table: Table,
    doomed: &dyn Fn(Partition) -> bool,
) -> heed::Result<Vec<Vec<u8>>> {
    let mut keys = Vec::new();
    for item in db.iter(txn)? {
        let (key, _) = item?;
        let partition = match table {
            Table::Collection(_) | Table::Log => {
                key.get(..2).map(|p| u16::from_be_bytes([p[0], p[1]]))
            }
            Table::Meta => match key {
                [b'p', high, low] => Some(u16::from_be_bytes([*high, *low])),
                _ => None,
            },
            Table::Expiry => layout::decode_expiry_key(key)
                .ok()
                .map(|entry| entry.partition),
        };
        if partition.is_some_and(doomed) {
            keys.push(key.to_vec());
        }
    }
    Ok(keys)
}

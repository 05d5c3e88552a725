//! The commit log as readers see it: one partition from a commit id
//! (`SHOAL.LOG`), the change feed over many partitions, and retention.
//!
//! Commit ids are dense within a partition (each id is one entry), so a
//! partition's log holds `last_commit_id - trimmed_through` entries. Retention
//! skips fenced partitions (their log is being copied in or handed over).
//!
//! A new entry goes to `recent`, in the order of writing, and every housekeeping
//! tick moves `recent` into `log`, where each partition's entries are in order
//! ([`layout::recent_key`]): a commit's entries then dirty a page or two at the
//! end of `recent` instead of one page at each partition's log tail. With
//! write-back, entries go straight to `log` (see [`Store::put_log_entry`]). Whatever
//! reads, trims, exports or clears a partition's log in `log` moves `recent`
//! first, or reads both ([`shoal_shared::lmdb::read_partition_log`]).

use crate::store::WriteTxn;
use shoal_shared::frame::{LogEntry, Partition, WorkerError, WorkerResponse};
use shoal_shared::limits::MAX_REPLY_BYTES;

use super::{Batch, OpError, OpResult, Store, StoreError};
use shoal_shared::layout::{self, PartitionMeta};

impl Store {
    /// Entries of `partition` with commit id ≥ `from`, at most `count`.
    pub(crate) fn read_log(
        &self,
        txn: &WriteTxn,
        partition: Partition,
        from: u64,
        count: u32,
    ) -> OpResult {
        let mut entries = Vec::new();
        // To the end: this batch's own entries are in no partition counter yet.
        self.read_partition(txn, partition, from, u64::MAX, count as usize, &mut entries)?;
        Ok(WorkerResponse::Log(entries))
    }

    /// Appends the entries of `partition` with commit ids `from..=last`, at most `limit`,
    /// stopping early rather than build a reply past [`MAX_REPLY_BYTES`] (the reader asks
    /// again).
    fn read_partition(
        &self,
        txn: &WriteTxn,
        partition: Partition,
        from: u64,
        last: u64,
        limit: usize,
        entries: &mut Vec<LogEntry>,
    ) -> Result<(), OpError> {
        let bytes: usize = entries.iter().map(|e| e.key.len() + e.data.len()).sum();
        let room = match MAX_REPLY_BYTES.checked_sub(bytes) {
            Some(room) if !entries.is_empty() => room,
            Some(_) => MAX_REPLY_BYTES,
            None => return Ok(()),
        };
        let read = shoal_shared::lmdb::read_partition_log(
            txn,
            *self.log,
            Some(*self.recent),
            partition,
            from,
            last,
            limit,
            room,
        )
        .map_err(|error| match error {
            StoreError::Lmdb(error) => OpError::Lmdb(error),
            StoreError::Corrupt(error) => OpError::Corrupt(error),
            error => OpError::Refused(WorkerError::Storage(error.to_string())),
        })?;
        entries.extend(read);
        Ok(())
    }

    /// Writes a log entry of `partition` to `recent`, or with write-back straight to
    /// `log`: LMDB commits a write-back transaction once per window, so each partition's
    /// log tail is copied once per window however many commits it takes, and the move
    /// would write every entry twice. `recent` is emptied into `log` first, so that a
    /// partition's entries in `recent` stay newer than those in `log`.
    pub(super) fn put_log_entry(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        partition: Partition,
        commit_id: u64,
        value: &[u8],
    ) -> heed::Result<()> {
        let key = layout::log_key(partition, commit_id);
        if self.write_back {
            if !batch.recent_moved {
                self.move_recent_in(txn, batch)?;
                batch.recent_moved = true;
            }
            return self.log.put(txn, &key, value);
        }
        self.recent.put(
            txn,
            &layout::recent_key(batch.next_seq),
            &layout::encode_recent_value(&key, value),
        )?;
        batch.next_seq += 1;
        Ok(())
    }

    /// Moves every entry of `recent` into `log` in a transaction of its own; returns how
    /// many.
    pub(crate) fn move_recent(&mut self) -> Result<usize, StoreError> {
        self.in_write_txn(|store, txn, batch| store.move_recent_in(txn, batch))
    }

    /// Moves every entry of `recent` into `log`; returns how many.
    pub(crate) fn move_recent_in(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
    ) -> heed::Result<usize> {
        let mut moved = Vec::new();
        for item in self.recent.iter(txn)? {
            let (_, raw) = item?;
            let (key, value) = layout::split_recent_value(raw)
                .map_err(|error| heed::Error::Decoding(Box::new(error)))?;
            moved.push((key.to_vec(), value.to_vec()));
        }
        if moved.is_empty() {
            return Ok(0);
        }
        // In key order.
        moved.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (key, value) in &moved {
            self.log.put(txn, key, value)?;
        }
        self.recent.clear(txn)?;
        batch.dirty = true;
        Ok(moved.len())
    }

    /// The change feed: entries after each position, in partition order, at most `count`.
    pub(crate) fn read_feed(
        &self,
        txn: &WriteTxn,
        positions: &[(Partition, u64)],
        count: u32,
    ) -> OpResult {
        let mut entries = Vec::new();
        for &(partition, seen) in positions {
            let meta = self.stored_partition_meta(txn, partition)?;
            if seen < meta.trimmed_through {
                return Err(OpError::Refused(WorkerError::LogTrimmed {
                    partition,
                    trimmed_through: meta.trimmed_through,
                }));
            }
            let left = (count as usize).saturating_sub(entries.len());
            if left == 0 {
                break;
            }
            if meta.last_commit_id > seen {
                let last = meta.last_commit_id;
                self.read_partition(txn, partition, seen + 1, last, left, &mut entries)?;
            }
        }
        Ok(WorkerResponse::Log(entries))
    }

    /// The last commit id of every partition that has one.
    pub(crate) fn last_commit_ids(&self, txn: &WriteTxn) -> OpResult {
        let positions = self
            .partition_metas(txn)
            .map_err(|e| OpError::Refused(WorkerError::Storage(e.to_string())))?
            .into_iter()
            .map(|(partition, meta)| (partition, meta.last_commit_id))
            .collect();
        Ok(WorkerResponse::Positions(positions))
    }

    /// Deletes the oldest entries of each partition beyond `keep_entries`, or older than
    /// `keep_ms`, at most `limit` in all. Advances `trimmed_through` in `meta`. Fenced
    /// partitions are left as they are.
    pub(crate) fn trim_log_in(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        keep_entries: u64,
        keep_ms: Option<u64>,
        limit: usize,
    ) -> heed::Result<usize> {
        self.move_recent_in(txn, batch)?;
        let metas = self
            .partition_metas(txn)
            .map_err(|e| heed::Error::Decoding(Box::new(e)))?;
        let oldest_kept_ms = keep_ms.map(|keep| batch.now_ms.saturating_sub(keep));
        let fenced = self.fenced_partitions(batch);
        let mut trimmed = 0;
        for (partition, meta) in metas {
            // A fenced partition's log is being copied in or is about to be cleared.
            if fenced.contains(&partition) {
                continue;
            }
            // Followers of this primary still need the log from `log_hold_from` on.
            let hold_from = match self.meta.get(txn, &layout::replica_state_key(partition))? {
                Some(raw) => {
                    layout::decode_replica_state(raw)
                        .map_err(|e| heed::Error::Decoding(Box::new(e)))?
                        .log_hold_from
                }
                None => 0,
            };
            let keep_from = if hold_from == 0 { u64::MAX } else { hold_from };
            let mut through = meta.trimmed_through;
            while trimmed < limit && through < meta.last_commit_id && through + 1 < keep_from {
                let next = through + 1;
                let over_count = meta.last_commit_id - through > keep_entries;
                let too_old = match (
                    oldest_kept_ms,
                    self.log.get(txn, &layout::log_key(partition, next))?,
                ) {
                    (Some(oldest), Some(raw)) => {
                        raw.len() >= 8
                            && u64::from_be_bytes(raw[..8].try_into().unwrap_or_default()) < oldest
                    }
                    _ => false,
                };
                if !over_count && !too_old {
                    break;
                }
                self.log.delete(txn, &layout::log_key(partition, next))?;
                through = next;
                trimmed += 1;
            }
            if through != meta.trimmed_through {
                let current = self.partition_meta(txn, batch, partition)?;
                batch.partitions.insert(
                    partition,
                    PartitionMeta {
                        trimmed_through: through,
                        ..current
                    },
                );
            }
        }
        Ok(trimmed)
    }
}

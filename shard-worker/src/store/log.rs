//! The commit log as readers see it: one partition from a commit id
//! (`SHOAL.LOG`), the change feed over many partitions, and retention.
//!
//! Commit ids are dense within a partition (each id is one entry), so a
//! partition's log holds `last_commit_id - trimmed_through` entries. Retention
//! skips fenced partitions (their log is being copied in or handed over).

use std::ops::Bound;

use heed::RwTxn;
use shoal_shared::frame::{LogEntry, Partition, WorkerError, WorkerResponse};
use shoal_shared::limits::MAX_REPLY_BYTES;

use super::{Batch, OpError, OpResult, Store};
use shoal_shared::layout::{self, PartitionMeta};

impl Store {
    /// Entries of `partition` with commit id ≥ `from`, at most `count`.
    pub(crate) fn read_log(
        &self,
        txn: &RwTxn,
        partition: Partition,
        from: u64,
        count: u32,
    ) -> OpResult {
        let mut entries = Vec::new();
        self.read_partition(txn, partition, from, count as usize, &mut entries)?;
        Ok(WorkerResponse::Log(entries))
    }

    fn read_partition(
        &self,
        txn: &RwTxn,
        partition: Partition,
        from: u64,
        limit: usize,
        entries: &mut Vec<LogEntry>,
    ) -> Result<(), OpError> {
        let start = layout::log_key(partition, from);
        let end = layout::log_key(partition, u64::MAX);
        let range = (Bound::Included(&start[..]), Bound::Included(&end[..]));
        let mut bytes: usize = entries.iter().map(|e| e.key.len() + e.data.len()).sum();
        for item in self.log.range(txn, &range)?.take(limit) {
            let (key, value) = item?;
            // Stop early rather than build a reply past the limit; the reader asks again.
            bytes += value.len();
            if bytes > MAX_REPLY_BYTES && !entries.is_empty() {
                break;
            }
            entries.push(layout::decode_log_entry(key, value)?);
        }
        Ok(())
    }

    /// The change feed: entries after each position, in partition order, at most `count`.
    pub(crate) fn read_feed(
        &self,
        txn: &RwTxn,
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
                self.read_partition(txn, partition, seen + 1, left, &mut entries)?;
            }
        }
        Ok(WorkerResponse::Log(entries))
    }

    /// The last commit id of every partition that has one.
    pub(crate) fn last_commit_ids(&self, txn: &RwTxn) -> OpResult {
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
        txn: &mut RwTxn,
        batch: &mut Batch,
        keep_entries: u64,
        keep_ms: Option<u64>,
        limit: usize,
    ) -> heed::Result<usize> {
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

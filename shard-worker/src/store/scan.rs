//! Whole-collection requests: SCAN and KEYS (one worker's part of them) and FLUSH.
//!
//! A scan walks the collection's B-tree in stored-key order (partition, then
//! user key) from just after the stored key the caller passes back, so a key
//! present for the whole scan is always met once the walk passes it.
//!
//! Keys of fenced partitions are not this worker's (a copy on its way in or
//! out): every request here skips them, jumping over the partition's range.

use std::collections::BTreeSet;
use std::ops::Bound;

use crate::store::WriteTxn;
use shoal_shared::frame::{Collection, Key, Partition, WorkerError, WorkerResponse};
use shoal_shared::glob::glob_match;
use shoal_shared::limits::MAX_REPLY_BYTES;

/// Most stored keys a flush holds in memory at once.
const FLUSH_CHUNK_KEYS: usize = 10_000;

use super::{Batch, OpError, OpResult, Store, Table};
use shoal_shared::layout;

/// The partition a stored key of a collection belongs to.
fn partition_of(stored_key: &[u8]) -> Option<Partition> {
    match stored_key {
        [high, low, ..] => Some(u16::from_be_bytes([*high, *low])),
        _ => None,
    }
}

/// The first stored key of the partition after `partition` (`None` after the last one).
fn next_partition_start(partition: Partition) -> Option<Vec<u8>> {
    partition
        .checked_add(1)
        .map(|next| next.to_be_bytes().to_vec())
}

/// Where a scan walks: after a stored key, within one partition or across all; and
/// which keys it keeps: of one type only (`string`, `hash`, ...), or of any.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ScanRange<'a> {
    pub(crate) after: Option<&'a [u8]>,
    pub(crate) only: Option<Partition>,
    pub(crate) of_type: Option<&'a str>,
}

/// Where a walk over a collection goes on.
enum Resume {
    /// The walk reached the end of the collection.
    Done,
    /// At this stored key (inclusive).
    At(Vec<u8>),
}

impl Store {
    /// Examines up to `count` stored keys of `range`, returning the live ones that
    /// match. Keys of `fenced` partitions are skipped and not counted as examined; a scan
    /// of one fenced partition is refused.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn scan(
        &self,
        txn: &WriteTxn,
        db: Table,
        scope: ScanRange<'_>,
        count: u32,
        pattern: Option<&[u8]>,
        now_ms: u64,
        fenced: &BTreeSet<Partition>,
    ) -> OpResult {
        if let Some(partition) = scope.only.filter(|p| fenced.contains(p)) {
            return Err(OpError::Refused(WorkerError::PartitionMoved { partition }));
        }
        let mut lower: Bound<Vec<u8>> = match (scope.after, scope.only) {
            (Some(after), Some(only)) if partition_of(after) != Some(only) => {
                Bound::Included(only.to_be_bytes().to_vec())
            }
            (Some(after), _) => Bound::Excluded(after.to_vec()),
            (None, Some(only)) => Bound::Included(only.to_be_bytes().to_vec()),
            (None, None) => Bound::Unbounded,
        };
        let mut keys = Vec::new();
        let mut examined = 0u32;
        let mut bytes = 0;
        'walk: loop {
            let range = (lower.as_ref().map(Vec::as_slice), Bound::<&[u8]>::Unbounded);
            for item in db.range(txn, &range)? {
                let (stored_key, raw) = item?;
                if scope.only.is_some() && partition_of(stored_key) != scope.only {
                    break 'walk;
                }
                if let Some(partition) = partition_of(stored_key).filter(|p| fenced.contains(p)) {
                    match next_partition_start(partition) {
                        Some(start) => {
                            lower = Bound::Included(start);
                            continue 'walk;
                        }
                        None => break 'walk,
                    }
                }
                examined += 1;
                let Some(user_key) = stored_key.get(2..) else {
                    continue;
                };
                let stored = layout::decode_value(raw)?;
                let live = match stored.expires_at_ms {
                    Some(at) => at > now_ms,
                    None => true,
                };
                let type_name = match stored.typed {
                    true => layout::typed::decode_type_meta(stored.bytes)?.kind.name(),
                    false => "string",
                };
                let live = live && scope.of_type.is_none_or(|wanted| wanted == type_name);
                if live && pattern.is_none_or(|pattern| glob_match(pattern, user_key, false)) {
                    bytes += user_key.len() + 16;
                    if bytes > MAX_REPLY_BYTES {
                        return Err(OpError::Refused(WorkerError::ReplyTooLarge));
                    }
                    keys.push(serde_bytes::ByteBuf::from(user_key.to_vec()));
                }
                if examined >= count {
                    return Ok(WorkerResponse::Scanned {
                        keys,
                        next: Some(stored_key.to_vec()),
                    });
                }
            }
            break;
        }
        Ok(WorkerResponse::Scanned { keys, next: None })
    }

    /// Keys stored in the collection, those of `fenced` partitions left out.
    pub(crate) fn db_size(
        &self,
        txn: &WriteTxn,
        db: Table,
        fenced: &BTreeSet<Partition>,
    ) -> OpResult {
        let mut size = db.len(txn)?;
        for &partition in fenced {
            let start = partition.to_be_bytes();
            let end = next_partition_start(partition);
            let range = (
                Bound::Included(&start[..]),
                end.as_deref().map_or(Bound::Unbounded, Bound::Excluded),
            );
            let mut in_partition = 0;
            for item in db.range(txn, &range)? {
                item?;
                in_partition += 1;
            }
            size = size.saturating_sub(in_partition);
        }
        Ok(WorkerResponse::Integer(size as i64))
    }

    /// Deletes every key of `collection` (or of all collections), logging each deletion.
    /// Keys of fenced partitions stay.
    pub(crate) fn flush(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        collection: Option<Collection>,
        only: Option<Partition>,
    ) -> OpResult {
        let collections: Vec<Collection> = match collection {
            Some(collection) => vec![collection],
            None => (0..self.collections.len() as Collection).collect(),
        };
        let fenced = self.fenced_partitions(batch);
        if let Some(partition) = only.filter(|p| fenced.contains(p)) {
            return Err(OpError::Refused(WorkerError::PartitionMoved { partition }));
        }
        let mut deleted = 0;
        for collection in collections {
            let db = self.db(collection)?;
            // The keys are taken a bounded chunk at a time, each chunk from where the last
            // one ended (every key taken is removed) or past a fenced partition.
            let mut lower: Option<Vec<u8>> = only.map(|p| p.to_be_bytes().to_vec());
            loop {
                let mut stored_keys = Vec::with_capacity(FLUSH_CHUNK_KEYS);
                let mut resume = Resume::Done;
                let range = (
                    lower.as_deref().map_or(Bound::Unbounded, Bound::Included),
                    Bound::<&[u8]>::Unbounded,
                );
                for item in db.range(txn, &range)? {
                    let (stored_key, _) = item?;
                    if only.is_some() && partition_of(stored_key) != only {
                        break;
                    }
                    if let Some(partition) = partition_of(stored_key).filter(|p| fenced.contains(p))
                    {
                        resume = match next_partition_start(partition) {
                            Some(start) => Resume::At(start),
                            None => Resume::Done,
                        };
                        break;
                    }
                    if stored_keys.len() >= FLUSH_CHUNK_KEYS {
                        resume = Resume::At(stored_key.to_vec());
                        break;
                    }
                    stored_keys.push(stored_key.to_vec());
                }
                for stored_key in stored_keys {
                    let [high, low, ref user_key @ ..] = stored_key[..] else {
                        // Too short to hold a partition: no key of any client; just drop it.
                        db.delete(txn, &stored_key)?;
                        continue;
                    };
                    let key = Key {
                        partition: u16::from_be_bytes([high, low]),
                        bytes: user_key.to_vec(),
                    };
                    let current = self.current(txn, db, &key, batch.now_ms)?;
                    deleted += i64::from(self.remove(txn, batch, db, collection, &key, &current)?);
                }
                match resume {
                    Resume::Done => break,
                    Resume::At(start) => lower = Some(start),
                }
            }
        }
        Ok(WorkerResponse::Integer(deleted))
    }
}

//! Whole-collection requests: SCAN and KEYS (one worker's part of them) and FLUSH.
//!
//! A scan walks the collection's B-tree in stored-key order (partition, then
//! user key) from just after the stored key the caller passes back, so a key
//! present for the whole scan is always met once the walk passes it.

use std::ops::Bound;

use heed::RwTxn;
use shoal_shared::frame::{Collection, Key, WorkerError, WorkerResponse};
use shoal_shared::glob::glob_match;
use shoal_shared::limits::MAX_REPLY_BYTES;

/// Most stored keys a flush holds in memory at once.
const FLUSH_CHUNK_KEYS: usize = 10_000;

use super::{Batch, OpError, OpResult, RawDatabase, Store};
use crate::layout;

impl Store {
    /// Examines up to `count` stored keys after `after`, returning the live ones that match.
    pub(crate) fn scan(
        &self,
        txn: &RwTxn,
        db: RawDatabase,
        after: Option<&[u8]>,
        count: u32,
        pattern: Option<&[u8]>,
        now_ms: u64,
    ) -> OpResult {
        let range = (
            after.map_or(Bound::Unbounded, Bound::Excluded),
            Bound::<&[u8]>::Unbounded,
        );
        let mut keys = Vec::new();
        let mut examined = 0u32;
        let mut last = None;
        let mut bytes = 0;
        for item in db.range(txn, &range)? {
            let (stored_key, raw) = item?;
            examined += 1;
            let Some(user_key) = stored_key.get(2..) else {
                continue;
            };
            let live = match layout::decode_value(raw)?.expires_at_ms {
                Some(at) => at > now_ms,
                None => true,
            };
            if live && pattern.is_none_or(|pattern| glob_match(pattern, user_key, false)) {
                bytes += user_key.len() + 16;
                if bytes > MAX_REPLY_BYTES {
                    return Err(OpError::Refused(WorkerError::ReplyTooLarge));
                }
                keys.push(serde_bytes::ByteBuf::from(user_key.to_vec()));
            }
            if examined >= count {
                last = Some(stored_key.to_vec());
                break;
            }
        }
        Ok(WorkerResponse::Scanned { keys, next: last })
    }

    /// Deletes every key of `collection` (or of all collections), logging each deletion.
    pub(crate) fn flush(
        &self,
        txn: &mut RwTxn,
        batch: &mut Batch,
        collection: Option<Collection>,
    ) -> OpResult {
        let collections: Vec<Collection> = match collection {
            Some(collection) => vec![collection],
            None => (0..self.collections.len() as Collection).collect(),
        };
        let mut deleted = 0;
        for collection in collections {
            let db = self.db(collection)?;
            // The keys are taken a bounded chunk at a time, always from the start of the
            // collection: every key taken is removed, so each chunk finds new ones.
            loop {
                let mut stored_keys = Vec::with_capacity(FLUSH_CHUNK_KEYS);
                for item in db.iter(txn)?.take(FLUSH_CHUNK_KEYS) {
                    let (stored_key, _) = item?;
                    stored_keys.push(stored_key.to_vec());
                }
                if stored_keys.is_empty() {
                    break;
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
            }
        }
        Ok(WorkerResponse::Integer(deleted))
    }
}

//! Requests on single keys (and MGET/DEL/EXISTS lists): strings, counters,
//! ranges and expiry. Each reads the key's [`Current`] state and writes
//! through [`Store::put`]/[`Store::remove`].

use heed::RwTxn;
use shoal_shared::frame::{
    Collection, ExpireCondition, Expiry, Key, SetCondition, SetReply, WorkerError, WorkerRequest,
    WorkerResponse,
};
use shoal_shared::limits::MAX_REPLY_BYTES;
use shoal_shared::resp::parse_i64;

use super::keyspace::{Current, RecordValue};
use super::scan::ScanRange;
use super::{Batch, OpError, OpResult, RawDatabase, Store};

/// One request's view: the store, its transaction, and the collection it works on.
struct Op<'s> {
    store: &'s Store,
    db: RawDatabase,
    collection: Collection,
    now_ms: u64,
}

impl Store {
    /// Handles every request that works on keys of one collection; refuses any other.
    /// Each request names its collection, which must exist.
    pub(crate) fn keyed(
        &self,
        txn: &mut RwTxn,
        batch: &mut Batch,
        request: &WorkerRequest,
    ) -> OpResult {
        use WorkerRequest::*;
        let now_ms = batch.now_ms;
        match request {
            Get { collection, key } => self
                .op(*collection, now_ms)?
                .live_value(txn, key)
                .map(WorkerResponse::Value),
            MGet { collection, keys } => self.op(*collection, now_ms)?.mget(txn, keys),
            Set {
                collection,
                key,
                value,
                condition,
                reply,
                expiry,
            } => self
                .op(*collection, now_ms)?
                .set(txn, batch, key, value, *condition, *reply, *expiry),
            GetDel { collection, key } => self.op(*collection, now_ms)?.get_del(txn, batch, key),
            GetEx {
                collection,
                key,
                expiry,
            } => self
                .op(*collection, now_ms)?
                .get_ex(txn, batch, key, *expiry),
            Delete { collection, keys } => self.op(*collection, now_ms)?.delete(txn, batch, keys),
            Exists { collection, keys } => self.op(*collection, now_ms)?.exists(txn, keys),
            IncrBy {
                collection,
                key,
                delta,
            } => self
                .op(*collection, now_ms)?
                .incr_by(txn, batch, key, *delta),
            IncrByFloat {
                collection,
                key,
                increment,
            } => self
                .op(*collection, now_ms)?
                .incr_by_float(txn, batch, key, increment),
            Append {
                collection,
                key,
                value,
            } => self.op(*collection, now_ms)?.append(txn, batch, key, value),
            StrLen { collection, key } => self.op(*collection, now_ms)?.str_len(txn, key),
            GetRange {
                collection,
                key,
                start,
                end,
            } => self
                .op(*collection, now_ms)?
                .get_range(txn, key, *start, *end),
            SetRange {
                collection,
                key,
                offset,
                value,
            } => self
                .op(*collection, now_ms)?
                .set_range(txn, batch, key, *offset, value),
            SetBit {
                collection,
                key,
                offset,
                bit,
            } => self
                .op(*collection, now_ms)?
                .set_bit(txn, batch, key, *offset, *bit),
            Expire {
                collection,
                key,
                at_ms,
                condition,
            } => self
                .op(*collection, now_ms)?
                .expire(txn, batch, key, *at_ms, *condition),
            Persist { collection, key } => self.op(*collection, now_ms)?.persist(txn, batch, key),
            ExpireTime { collection, key } => self.op(*collection, now_ms)?.expire_time(txn, key),
            DbSize { collection } => {
                self.db_size(txn, self.db(*collection)?, &self.fenced_partitions(batch))
            }
            Scan {
                collection,
                after,
                count,
                pattern,
                partition,
                of_type,
            } => self.scan(
                txn,
                self.db(*collection)?,
                ScanRange {
                    after: after.as_deref(),
                    only: *partition,
                    of_type: of_type.as_deref(),
                },
                *count,
                pattern.as_deref(),
                now_ms,
                &self.fenced_partitions(batch),
            ),
            Keys {
                collection,
                pattern,
            } => self.scan(
                txn,
                self.db(*collection)?,
                ScanRange::default(),
                u32::MAX,
                pattern.as_deref(),
                now_ms,
                &self.fenced_partitions(batch),
            ),
            other => Err(OpError::Refused(WorkerError::Storage(format!(
                "request {other:?} is not keyed"
            )))),
        }
    }

    /// A request's view of `collection` at `now_ms`; refused if the collection does not
    /// exist.
    fn op(&self, collection: Collection, now_ms: u64) -> Result<Op<'_>, OpError> {
        Ok(Op {
            store: self,
            db: self.db(collection)?,
            collection,
            now_ms,
        })
    }

    pub(crate) fn db(&self, collection: Collection) -> Result<RawDatabase, OpError> {
        self.collection(collection).ok_or_else(|| {
            OpError::Refused(WorkerError::Storage(format!(
                "collection {collection} does not exist"
            )))
        })
    }
}

/// Redis's GETRANGE arithmetic: inclusive; negative indexes count from the end and are
/// then clamped to the string.
fn byte_range(value: &[u8], start: i64, end: i64) -> &[u8] {
    if start < 0 && end < 0 && start > end {
        return &[];
    }
    let len = value.len() as i64;
    let start = if start < 0 {
        (len + start).max(0)
    } else {
        start
    };
    let end = if end < 0 { (len + end).max(0) } else { end }.min(len - 1);
    if len == 0 || start > end {
        return &[];
    }
    &value[start as usize..=end as usize]
}

impl Op<'_> {
    /// The key as a write sees it, of any type.
    fn current(&self, txn: &RwTxn, key: &Key) -> Result<Current, OpError> {
        self.store.current(txn, self.db, key, self.now_ms)
    }

    /// The key as a write sees it; refused with `WrongType` when it holds a typed key.
    fn string_current(&self, txn: &RwTxn, key: &Key) -> Result<Current, OpError> {
        let current = self.current(txn, key)?;
        if current
            .live
            .as_ref()
            .is_some_and(|live| live.typed.is_some())
        {
            return Err(OpError::Refused(WorkerError::WrongType));
        }
        Ok(current)
    }

    fn live_value(&self, txn: &RwTxn, key: &Key) -> Result<Option<Vec<u8>>, OpError> {
        Ok(self.string_current(txn, key)?.live.map(|live| live.value))
    }

    /// Rewrites the key's record, of any type, with a new expiry.
    fn put_expiry(
        &self,
        txn: &mut RwTxn,
        batch: &mut Batch,
        key: &Key,
        current: &Current,
        live: &super::keyspace::Live,
        expires: Option<u64>,
    ) -> Result<(), OpError> {
        let record = match &live.typed {
            Some(meta) => RecordValue::Typed(meta),
            None => RecordValue::String(&live.value),
        };
        Ok(self.store.put_record(
            txn,
            batch,
            self.db,
            self.collection,
            key,
            current,
            record,
            expires,
        )?)
    }

    fn mget(&self, txn: &RwTxn, keys: &[Key]) -> OpResult {
        let mut values = Vec::with_capacity(keys.len());
        let mut bytes = 0;
        for key in keys {
            // A key of another type reads as missing, as in Redis.
            let value = self
                .current(txn, key)?
                .live
                .filter(|live| live.typed.is_none())
                .map(|live| live.value);
            bytes += value.as_ref().map_or(0, Vec::len);
            if bytes > MAX_REPLY_BYTES {
                return Err(OpError::Refused(WorkerError::ReplyTooLarge));
            }
            values.push(value.map(serde_bytes::ByteBuf::from));
        }
        Ok(WorkerResponse::Values(values))
    }

    fn get_del(&self, txn: &mut RwTxn, batch: &mut Batch, key: &Key) -> OpResult {
        let current = self.string_current(txn, key)?;
        self.store
            .remove(txn, batch, self.db, self.collection, key, &current)?;
        Ok(WorkerResponse::Value(current.live.map(|live| live.value)))
    }

    fn delete(&self, txn: &mut RwTxn, batch: &mut Batch, keys: &[Key]) -> OpResult {
        let mut deleted = 0;
        for key in keys {
            let current = self.current(txn, key)?;
            deleted += i64::from(self.store.remove(
                txn,
                batch,
                self.db,
                self.collection,
                key,
                &current,
            )?);
        }
        Ok(WorkerResponse::Integer(deleted))
    }

    fn exists(&self, txn: &RwTxn, keys: &[Key]) -> OpResult {
        let mut found = 0;
        for key in keys {
            found += i64::from(self.current(txn, key)?.live.is_some());
        }
        Ok(WorkerResponse::Integer(found))
    }

    fn str_len(&self, txn: &RwTxn, key: &Key) -> OpResult {
        self.live_value(txn, key)
            .map(|v| WorkerResponse::Integer(v.map_or(0, |v| v.len() as i64)))
    }

    fn get_range(&self, txn: &RwTxn, key: &Key, start: i64, end: i64) -> OpResult {
        let value = self.live_value(txn, key)?.unwrap_or_default();
        Ok(WorkerResponse::Value(Some(
            byte_range(&value, start, end).to_vec(),
        )))
    }

    fn persist(&self, txn: &mut RwTxn, batch: &mut Batch, key: &Key) -> OpResult {
        let current = self.current(txn, key)?;
        match &current.live {
            Some(live) if live.expires_at_ms.is_some() => {
                self.put_expiry(txn, batch, key, &current, live, None)?;
                Ok(WorkerResponse::Integer(1))
            }
            _ => Ok(WorkerResponse::Integer(0)),
        }
    }

    /// EXPIRETIME: -2 for a missing key, -1 for a key without an expiry.
    fn expire_time(&self, txn: &RwTxn, key: &Key) -> OpResult {
        Ok(WorkerResponse::Integer(
            match self.current(txn, key)?.live {
                None => -2,
                Some(live) => live.expires_at_ms.map_or(-1, |at| at as i64),
            },
        ))
    }

    fn put(
        &self,
        txn: &mut RwTxn,
        batch: &mut Batch,
        key: &Key,
        current: &Current,
        value: &[u8],
        expires: Option<u64>,
    ) -> Result<(), OpError> {
        if value.len() > self.store.max_value_bytes {
            return Err(OpError::Refused(WorkerError::ValueTooLarge {
                max_value_bytes: self.store.max_value_bytes,
            }));
        }
        Ok(self.store.put(
            txn,
            batch,
            self.db,
            self.collection,
            key,
            current,
            value,
            expires,
        )?)
    }

    /// Keeps the key's expiry when the value changes (INCR, APPEND, SETRANGE).
    fn put_keeping_ttl(
        &self,
        txn: &mut RwTxn,
        batch: &mut Batch,
        key: &Key,
        current: &Current,
        value: &[u8],
    ) -> Result<(), OpError> {
        let expires = current.live.as_ref().and_then(|live| live.expires_at_ms);
        self.put(txn, batch, key, current, value, expires)
    }

    #[allow(clippy::too_many_arguments)]
    fn set(
        &self,
        txn: &mut RwTxn,
        batch: &mut Batch,
        key: &Key,
        value: &[u8],
        condition: SetCondition,
        reply: SetReply,
        expiry: Expiry,
    ) -> OpResult {
        let current = match reply {
            // SET ... GET reads the old value, which must be a string.
            SetReply::OldValue => self.string_current(txn, key)?,
            _ => self.current(txn, key)?,
        };
        let exists = current.live.is_some();
        let allowed = match condition {
            SetCondition::Always => true,
            SetCondition::IfAbsent => !exists,
            SetCondition::IfPresent => exists,
        };
        if allowed {
            let expires = match expiry {
                Expiry::Keep => current.live.as_ref().and_then(|live| live.expires_at_ms),
                Expiry::Clear => None,
                Expiry::At(at) => Some(at),
            };
            match expires {
                // A time already past: the write happens and the key is gone at once.
                Some(at) if at <= self.now_ms => {
                    self.store
                        .remove(txn, batch, self.db, self.collection, key, &current)?;
                }
                _ => self.put(txn, batch, key, &current, value, expires)?,
            }
        }
        Ok(match reply {
            SetReply::Status if allowed => WorkerResponse::Ok,
            SetReply::Status => WorkerResponse::Value(None),
            SetReply::OldValue => WorkerResponse::Value(current.live.map(|live| live.value)),
            SetReply::WrittenFlag => WorkerResponse::Integer(i64::from(allowed)),
        })
    }

    fn get_ex(&self, txn: &mut RwTxn, batch: &mut Batch, key: &Key, expiry: Expiry) -> OpResult {
        let current = self.string_current(txn, key)?;
        let Some(live) = &current.live else {
            return Ok(WorkerResponse::Value(None));
        };
        match expiry {
            Expiry::Keep => {}
            Expiry::Clear if live.expires_at_ms.is_none() => {}
            Expiry::Clear => self.put(txn, batch, key, &current, &live.value, None)?,
            Expiry::At(at) if at <= self.now_ms => {
                self.store
                    .remove(txn, batch, self.db, self.collection, key, &current)?;
            }
            Expiry::At(at) => self.put(txn, batch, key, &current, &live.value, Some(at))?,
        }
        Ok(WorkerResponse::Value(Some(live.value.clone())))
    }

    fn incr_by(&self, txn: &mut RwTxn, batch: &mut Batch, key: &Key, delta: i64) -> OpResult {
        let current = self.string_current(txn, key)?;
        let value = match &current.live {
            None => 0,
            Some(live) => {
                parse_i64(&live.value).ok_or(OpError::Refused(WorkerError::NotInteger))?
            }
        };
        let new = value
            .checked_add(delta)
            .ok_or(OpError::Refused(WorkerError::Overflow))?;
        self.put_keeping_ttl(txn, batch, key, &current, new.to_string().as_bytes())?;
        Ok(WorkerResponse::Integer(new))
    }

    fn incr_by_float(
        &self,
        txn: &mut RwTxn,
        batch: &mut Batch,
        key: &Key,
        increment: &[u8],
    ) -> OpResult {
        let current = self.string_current(txn, key)?;
        let value = current.live.as_ref().map(|live| live.value.as_slice());
        let text = crate::float::incr_by_float(value, increment).map_err(OpError::Refused)?;
        self.put_keeping_ttl(txn, batch, key, &current, &text)?;
        Ok(WorkerResponse::Value(Some(text)))
    }

    fn append(&self, txn: &mut RwTxn, batch: &mut Batch, key: &Key, suffix: &[u8]) -> OpResult {
        let current = self.string_current(txn, key)?;
        let mut value = current
            .live
            .as_ref()
            .map(|live| live.value.clone())
            .unwrap_or_default();
        value.extend_from_slice(suffix);
        self.put_keeping_ttl(txn, batch, key, &current, &value)?;
        Ok(WorkerResponse::Integer(value.len() as i64))
    }

    /// The key's current state and a copy of its value (empty when missing), for a
    /// request that changes the value in place.
    fn value_to_patch(&self, txn: &RwTxn, key: &Key) -> Result<(Current, Vec<u8>), OpError> {
        let current = self.string_current(txn, key)?;
        let value = current
            .live
            .as_ref()
            .map(|live| live.value.clone())
            .unwrap_or_default();
        Ok((current, value))
    }

    /// Refuses a value that would be `len` bytes long when that is past `max_value_bytes`.
    fn fits(&self, len: u64) -> Result<(), OpError> {
        if len > self.store.max_value_bytes as u64 {
            return Err(OpError::Refused(WorkerError::ValueTooLarge {
                max_value_bytes: self.store.max_value_bytes,
            }));
        }
        Ok(())
    }

    fn set_range(
        &self,
        txn: &mut RwTxn,
        batch: &mut Batch,
        key: &Key,
        offset: u64,
        patch: &[u8],
    ) -> OpResult {
        let (current, mut value) = self.value_to_patch(txn, key)?;
        if patch.is_empty() {
            return Ok(WorkerResponse::Integer(value.len() as i64));
        }
        let end = offset.saturating_add(patch.len() as u64);
        self.fits(end)?;
        let (offset, end) = (offset as usize, end as usize);
        if value.len() < end {
            value.resize(end, 0);
        }
        value[offset..end].copy_from_slice(patch);
        self.put_keeping_ttl(txn, batch, key, &current, &value)?;
        Ok(WorkerResponse::Integer(value.len() as i64))
    }

    fn set_bit(
        &self,
        txn: &mut RwTxn,
        batch: &mut Batch,
        key: &Key,
        offset: u64,
        bit: bool,
    ) -> OpResult {
        let (current, mut value) = self.value_to_patch(txn, key)?;
        let byte = offset / 8;
        self.fits(byte + 1)?;
        let (byte, mask) = (byte as usize, 0x80u8 >> (offset % 8));
        let grows = value.len() <= byte;
        if grows {
            value.resize(byte + 1, 0);
        }
        let old = value[byte] & mask != 0;
        if bit {
            value[byte] |= mask;
        } else {
            value[byte] &= !mask;
        }
        // A missing key is created, and a value grows, even for a 0 bit; an unchanged
        // value writes nothing.
        if current.live.is_none() || grows || old != bit {
            self.put_keeping_ttl(txn, batch, key, &current, &value)?;
        }
        Ok(WorkerResponse::Integer(i64::from(old)))
    }

    fn expire(
        &self,
        txn: &mut RwTxn,
        batch: &mut Batch,
        key: &Key,
        at_ms: u64,
        condition: ExpireCondition,
    ) -> OpResult {
        let current = self.current(txn, key)?;
        let Some(live) = &current.live else {
            return Ok(WorkerResponse::Integer(0));
        };
        let allowed = match (condition, live.expires_at_ms) {
            (ExpireCondition::Always, _) => true,
            (ExpireCondition::IfNone, existing) => existing.is_none(),
            (ExpireCondition::IfSome, existing) => existing.is_some(),
            (ExpireCondition::IfGreater, existing) => existing.is_some_and(|old| at_ms > old),
            (ExpireCondition::IfLess, existing) => existing.is_none_or(|old| at_ms < old),
        };
        if !allowed {
            return Ok(WorkerResponse::Integer(0));
        }
        if at_ms <= self.now_ms {
            self.store
                .remove(txn, batch, self.db, self.collection, key, &current)?;
        } else {
            self.put_expiry(txn, batch, key, &current, live, Some(at_ms))?;
        }
        Ok(WorkerResponse::Integer(1))
    }
}

#[cfg(test)]
mod tests {
    use super::byte_range;

    #[test]
    fn getrange_follows_redis() {
        let v = b"This is a string";
        assert_eq!(byte_range(v, 0, 3), b"This");
        assert_eq!(byte_range(v, -3, -1), b"ing");
        assert_eq!(byte_range(v, 0, -1), v);
        assert_eq!(byte_range(v, 10, 100), b"string");
        assert_eq!(byte_range(v, 5, 3), b"");
        assert_eq!(byte_range(v, -100, 1), b"Th");
        assert_eq!(byte_range(v, 100, 200), b"");
        assert_eq!(byte_range(b"", 0, -1), b"");
        assert_eq!(
            byte_range(v, 0, -100),
            b"T",
            "a negative end clamps to the first byte"
        );
        assert_eq!(byte_range(v, -13, -20), b"");
        assert_eq!(byte_range(b"hello", -100, -100), b"h");
    }
}

//! Requests on single keys (and MGET/DEL/EXISTS lists): strings, counters,
//! ranges, bits and expiry. Each reads the key's [`Current`] state and writes
//! through [`Store::put`]/[`Store::remove`]. BITFIELD's integer arithmetic on a
//! value's bits is the pure [`bitfield`] module at the end, so that a BITFIELD is one
//! read-modify-write in this worker's transaction (atomic, like SETBIT).

use crate::store::WriteTxn;
use shoal_shared::frame::{
    Answer, BitFieldOp, Collection, ExpireCondition, Expiry, Key, SetCondition, SetReply,
    WorkerError, WorkerRequest, WorkerResponse,
};
use shoal_shared::limits::MAX_REPLY_BYTES;
use shoal_shared::resp::parse_i64;

use super::keyspace::{Current, RecordValue};
use super::scan::ScanRange;
use super::{Batch, OpError, OpResult, Store, Table};

/// One request's view: the store, its transaction, and the collection it works on.
struct Op<'s> {
    store: &'s Store,
    db: Table,
    collection: Collection,
    now_ms: u64,
}

impl Store {
    /// Handles every request that works on keys of one collection; refuses any other.
    /// Each request names its collection, which must exist.
    pub(crate) fn keyed(
        &self,
        txn: &mut WriteTxn,
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
            BitField {
                collection,
                key,
                ops,
            } => self
                .op(*collection, now_ms)?
                .bit_field(txn, batch, key, ops),
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

    pub(crate) fn db(&self, collection: Collection) -> Result<Table, OpError> {
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
    fn current(&self, txn: &WriteTxn, key: &Key) -> Result<Current, OpError> {
        self.store.current(txn, self.db, key, self.now_ms)
    }

    /// The key as a write sees it; refused with `WrongType` when it holds a typed key.
    fn string_current(&self, txn: &WriteTxn, key: &Key) -> Result<Current, OpError> {
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

    fn live_value(&self, txn: &WriteTxn, key: &Key) -> Result<Option<Vec<u8>>, OpError> {
        Ok(self.string_current(txn, key)?.live.map(|live| live.value))
    }

    /// Rewrites the key's record, of any type, with a new expiry.
    fn put_expiry(
        &self,
        txn: &mut WriteTxn,
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

    fn mget(&self, txn: &WriteTxn, keys: &[Key]) -> OpResult {
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

    fn get_del(&self, txn: &mut WriteTxn, batch: &mut Batch, key: &Key) -> OpResult {
        let current = self.string_current(txn, key)?;
        self.store
            .remove(txn, batch, self.db, self.collection, key, &current)?;
        Ok(WorkerResponse::Value(current.live.map(|live| live.value)))
    }

    fn delete(&self, txn: &mut WriteTxn, batch: &mut Batch, keys: &[Key]) -> OpResult {
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

    fn exists(&self, txn: &WriteTxn, keys: &[Key]) -> OpResult {
        let mut found = 0;
        for key in keys {
            found += i64::from(self.current(txn, key)?.live.is_some());
        }
        Ok(WorkerResponse::Integer(found))
    }

    fn str_len(&self, txn: &WriteTxn, key: &Key) -> OpResult {
        self.live_value(txn, key)
            .map(|v| WorkerResponse::Integer(v.map_or(0, |v| v.len() as i64)))
    }

    fn get_range(&self, txn: &WriteTxn, key: &Key, start: i64, end: i64) -> OpResult {
        let value = self.live_value(txn, key)?.unwrap_or_default();
        Ok(WorkerResponse::Value(Some(
            byte_range(&value, start, end).to_vec(),
        )))
    }

    fn persist(&self, txn: &mut WriteTxn, batch: &mut Batch, key: &Key) -> OpResult {
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
    fn expire_time(&self, txn: &WriteTxn, key: &Key) -> OpResult {
        Ok(WorkerResponse::Integer(
            match self.current(txn, key)?.live {
                None => -2,
                Some(live) => live.expires_at_ms.map_or(-1, |at| at as i64),
            },
        ))
    }

    fn put(
        &self,
        txn: &mut WriteTxn,
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
        txn: &mut WriteTxn,
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
        txn: &mut WriteTxn,
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

    fn get_ex(&self, txn: &mut WriteTxn, batch: &mut Batch, key: &Key, expiry: Expiry) -> OpResult {
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

    fn incr_by(&self, txn: &mut WriteTxn, batch: &mut Batch, key: &Key, delta: i64) -> OpResult {
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
        txn: &mut WriteTxn,
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

    fn append(&self, txn: &mut WriteTxn, batch: &mut Batch, key: &Key, suffix: &[u8]) -> OpResult {
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
    fn value_to_patch(&self, txn: &WriteTxn, key: &Key) -> Result<(Current, Vec<u8>), OpError> {
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
        txn: &mut WriteTxn,
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
        txn: &mut WriteTxn,
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

    /// BITFIELD: the ops in order, on the value as it is when the request runs. With a
    /// SET or INCRBY, the value first grows to hold every field written (a missing key is
    /// created, even when every write then fails), and is written back, keeping its
    /// expiry, when it was created or changed. With GETs only, nothing is written.
    fn bit_field(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        key: &Key,
        ops: &[BitFieldOp],
    ) -> OpResult {
        if !ops.iter().all(|op| bitfield::is_valid(op.field())) {
            return Err(OpError::Refused(WorkerError::Command(
                bitfield::INVALID_TYPE.to_string(),
            )));
        }
        let answers = match bitfield::write_len(ops) {
            None => {
                let mut value = self.live_value(txn, key)?.unwrap_or_default();
                bitfield::apply(&mut value, ops).0
            }
            Some(len) => {
                let (current, mut value) = self.value_to_patch(txn, key)?;
                self.fits(len)?;
                let (answers, changed) = bitfield::apply(&mut value, ops);
                if current.live.is_none() || changed {
                    self.put_keeping_ttl(txn, batch, key, &current, &value)?;
                }
                answers
            }
        };
        Ok(WorkerResponse::Answer(Answer::Array(
            answers
                .into_iter()
                .map(|answer| answer.map_or(Answer::Nil, Answer::Integer))
                .collect(),
        )))
    }

    fn expire(
        &self,
        txn: &mut WriteTxn,
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

/// BITFIELD's arithmetic, as Redis 7.0 does it (`bitops.c`): fields of 1 to 64 bits
/// (signed) or 1 to 63 bits (unsigned) at any bit offset, the most significant bit of a
/// byte first, read as zero past the value's end; SET and INCRBY with the WRAP, SAT and
/// FAIL overflow modes. The overflow checks follow Redis's expressions step by step,
/// with its 64-bit wrapping, so that even their corner cases answer as Redis does (a SET
/// of -2^63 into an `i8` saturates to 127, say).
pub(crate) mod bitfield {
    use shoal_shared::frame::{BitFieldOp, BitFieldOverflow, BitFieldType};

    /// The error Redis answers for a type outside `i1..i64`, `u1..u63`.
    pub(crate) const INVALID_TYPE: &str =
        "ERR Invalid bitfield type. Use something like i16 u8. Note that u64 is not supported but i64 is.";

    /// Whether `field` has a width Redis accepts and ends within `u64` bits.
    pub(crate) fn is_valid(field: BitFieldType) -> bool {
        let widest = if field.signed { 64 } else { 63 };
        (1..=widest).contains(&field.bits)
            && field.offset.checked_add(u64::from(field.bits)).is_some()
    }

    /// The length in bytes a value must have for the fields `ops` write: up to the byte of
    /// the highest bit written. `None` when no op writes.
    pub(crate) fn write_len(ops: &[BitFieldOp]) -> Option<u64> {
        ops.iter()
            .filter(|op| op.is_write())
            .map(|op| {
                let field = op.field();
                (field.offset + u64::from(field.bits) - 1) / 8 + 1
            })
            .max()
    }

    /// Runs `ops` in order on `value` (every field valid: [`is_valid`]) and answers each
    /// op's integer, `None` for a write refused by FAIL, and whether `value` changed. A
    /// write first grows `value` to [`write_len`] with zero bytes (a change).
    pub(crate) fn apply(value: &mut Vec<u8>, ops: &[BitFieldOp]) -> (Vec<Option<i64>>, bool) {
        let mut changed = false;
        if let Some(len) = write_len(ops) {
            if (value.len() as u64) < len {
                value.resize(len as usize, 0);
                changed = true;
            }
        }
        let mut answers = Vec::with_capacity(ops.len());
        for op in ops {
            let answer = match *op {
                BitFieldOp::Get { field } => Some(match field.signed {
                    true => get_signed(value, field),
                    false => get_unsigned(value, field) as i64,
                }),
                BitFieldOp::Set {
                    field,
                    value: new,
                    overflow,
                } => {
                    let (answer, written) = write(value, field, overflow, Some(new), 0);
                    changed |= written;
                    answer
                }
                BitFieldOp::IncrBy {
                    field,
                    increment,
                    overflow,
                } => {
                    let (answer, written) = write(value, field, overflow, None, increment);
                    changed |= written;
                    answer
                }
            };
            answers.push(answer);
        }
        (answers, changed)
    }

    /// SET (`set` is the new value; answers the old one) or INCRBY (adds `increment`;
    /// answers the new value) on one field. Answers the reply (`None` when FAIL refuses
    /// the write) and whether a bit changed.
    fn write(
        value: &mut [u8],
        field: BitFieldType,
        overflow: BitFieldOverflow,
        set: Option<i64>,
        increment: i64,
    ) -> (Option<i64>, bool) {
        let (overflowed, new, old) = if field.signed {
            let old = get_signed(value, field);
            let checked = set.unwrap_or(old);
            let (overflowed, limit) = signed_overflow(checked, increment, field.bits, overflow);
            let new = match overflowed {
                true => limit,
                false => checked.wrapping_add(increment),
            };
            (overflowed, new as u64, old)
        } else {
            let old = get_unsigned(value, field);
            let checked = set.map_or(old, |set| set as u64);
            let (overflowed, limit) = unsigned_overflow(checked, increment, field.bits, overflow);
            let new = match overflowed {
                true => limit,
                false => checked.wrapping_add(increment as u64),
            };
            (overflowed, new, old as i64)
        };
        if overflowed && overflow == BitFieldOverflow::Fail {
            return (None, false);
        }
        // `new` holds a signed field's value as its two's complement, and an unsigned
        // field (at most 63 bits wide) as it is: either reads back as the i64 answered.
        let answer = if set.is_some() { old } else { new as i64 };
        (Some(answer), set_bits(value, field, new))
    }

    /// The field's bits as an unsigned integer; bits past the value's end are 0.
    pub(crate) fn get_unsigned(value: &[u8], field: BitFieldType) -> u64 {
        let mut out = 0u64;
        for at in field.offset..field.offset + u64::from(field.bits) {
            let byte = usize::try_from(at / 8)
                .ok()
                .and_then(|i| value.get(i))
                .copied()
                .unwrap_or(0);
            out = (out << 1) | u64::from((byte >> (7 - at % 8)) & 1);
        }
        out
    }

    /// The field's bits as a two's complement integer of `bits` bits.
    pub(crate) fn get_signed(value: &[u8], field: BitFieldType) -> i64 {
        let raw = get_unsigned(value, field);
        let bits = u32::from(field.bits);
        if bits < 64 && raw & (1 << (bits - 1)) != 0 {
            (raw | (u64::MAX << bits)) as i64
        } else {
            raw as i64
        }
    }

    /// Stores the low `bits` bits of `new` in the field (within `value`, already grown);
    /// answers whether a bit changed.
    fn set_bits(value: &mut [u8], field: BitFieldType, new: u64) -> bool {
        let mut changed = false;
        let bits = u64::from(field.bits);
        for i in 0..bits {
            let at = field.offset + i;
            let bit = (new >> (bits - 1 - i)) & 1 == 1;
            let (byte, mask) = ((at / 8) as usize, 0x80u8 >> (at % 8));
            let old = value[byte] & mask != 0;
            if old != bit {
                value[byte] ^= mask;
                changed = true;
            }
        }
        changed
    }

    /// Redis's `checkUnsignedBitfieldOverflow`: whether `value + increment` leaves the
    /// range of `bits` bits, and the value to store then (WRAP: the low bits; SAT: the
    /// nearest end; FAIL: unused).
    pub(crate) fn unsigned_overflow(
        value: u64,
        increment: i64,
        bits: u8,
        mode: BitFieldOverflow,
    ) -> (bool, u64) {
        let bits = u32::from(bits);
        let max = u64::MAX.checked_shr(64 - bits).unwrap_or(0);
        let max_increment = max.wrapping_sub(value) as i64;
        let min_increment = (value as i64).wrapping_neg();
        let wrapped = || value.wrapping_add(increment as u64) & max;
        if value > max || (increment > 0 && increment > max_increment) {
            return match mode {
                BitFieldOverflow::Wrap => (true, wrapped()),
                BitFieldOverflow::Sat => (true, max),
                BitFieldOverflow::Fail => (true, 0),
            };
        }
        if increment < 0 && increment < min_increment {
            return match mode {
                BitFieldOverflow::Wrap => (true, wrapped()),
                BitFieldOverflow::Sat | BitFieldOverflow::Fail => (true, 0),
            };
        }
        (false, 0)
    }

    /// Redis's `checkSignedBitfieldOverflow`, as [`unsigned_overflow`] for a two's
    /// complement field.
    pub(crate) fn signed_overflow(
        value: i64,
        increment: i64,
        bits: u8,
        mode: BitFieldOverflow,
    ) -> (bool, i64) {
        let bits = u32::from(bits);
        let max = if bits == 64 {
            i64::MAX
        } else {
            (1i64 << (bits - 1)) - 1
        };
        let min = -max - 1;
        let max_increment = (max as u64).wrapping_sub(value as u64) as i64;
        let min_increment = min.wrapping_sub(value);
        let wrapped = || {
            let mut sum = (value as u64).wrapping_add(increment as u64);
            if bits < 64 {
                let high = u64::MAX << bits;
                if sum & (1 << (bits - 1)) != 0 {
                    sum |= high;
                } else {
                    sum &= !high;
                }
            }
            sum as i64
        };
        let narrow = bits != 64;
        if value > max
            || (narrow && increment > max_increment)
            || (value >= 0 && increment > 0 && increment > max_increment)
        {
            return match mode {
                BitFieldOverflow::Wrap => (true, wrapped()),
                BitFieldOverflow::Sat => (true, max),
                BitFieldOverflow::Fail => (true, 0),
            };
        }
        if value < min
            || (narrow && increment < min_increment)
            || (value < 0 && increment < 0 && increment < min_increment)
        {
            return match mode {
                BitFieldOverflow::Wrap => (true, wrapped()),
                BitFieldOverflow::Sat => (true, min),
                BitFieldOverflow::Fail => (true, 0),
            };
        }
        (false, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::bitfield::{apply, is_valid, signed_overflow, unsigned_overflow, write_len};
    use super::byte_range;
    use shoal_shared::frame::{BitFieldOp, BitFieldOverflow, BitFieldType};
    use BitFieldOverflow::{Fail, Sat, Wrap};

    /// A field from Redis's notation: `i8`, `u63`.
    fn field(kind: &str, offset: u64) -> BitFieldType {
        BitFieldType {
            signed: kind.starts_with('i'),
            bits: kind[1..].parse().unwrap(),
            offset,
        }
    }

    fn get(kind: &str, offset: u64) -> BitFieldOp {
        BitFieldOp::Get {
            field: field(kind, offset),
        }
    }

    fn set(kind: &str, offset: u64, value: i64, overflow: BitFieldOverflow) -> BitFieldOp {
        BitFieldOp::Set {
            field: field(kind, offset),
            value,
            overflow,
        }
    }

    fn incr(kind: &str, offset: u64, increment: i64, overflow: BitFieldOverflow) -> BitFieldOp {
        BitFieldOp::IncrBy {
            field: field(kind, offset),
            increment,
            overflow,
        }
    }

    #[test]
    fn bitfield_reads_fields_most_significant_bit_first() {
        let mut value = vec![0b0000_0001, 0b1000_0000];
        let (answers, changed) = apply(
            &mut value,
            &[
                get("i2", 7),
                get("u2", 7),
                get("u8", 4),
                get("u16", 0),
                get("i16", 0),
                get("u8", 12),
                get("i64", 1000),
            ],
        );
        assert_eq!(
            answers,
            [
                Some(-1),
                Some(3),
                Some(0b0001_1000),
                Some(384),
                Some(384),
                Some(0),
                Some(0)
            ]
        );
        assert!(!changed, "GETs change nothing");
        assert_eq!(value, [1, 128], "GETs never grow the value");
        let mut ones = vec![0xff; 8];
        assert_eq!(apply(&mut ones, &[get("i64", 0)]).0, [Some(-1)]);
        assert_eq!(apply(&mut ones, &[get("u63", 1)]).0, [Some(i64::MAX)]);
    }

    #[test]
    fn bitfield_follows_the_redis_documentation() {
        // BITFIELD mykey INCRBY i5 100 1 GET u4 0
        let mut value = Vec::new();
        let (answers, changed) = apply(&mut value, &[incr("i5", 100, 1, Wrap), get("u4", 0)]);
        assert_eq!(answers, [Some(1), Some(0)]);
        assert!(changed);
        assert_eq!(value.len(), 14, "grown to hold bit 104, in byte 13");
        // BITFIELD mykey incrby u2 100 1 OVERFLOW SAT incrby u2 102 1, four times.
        let mut value = Vec::new();
        let expected = [(1, 1), (2, 2), (3, 3), (0, 3)];
        for (wrapped, saturated) in expected {
            let ops = [incr("u2", 100, 1, Wrap), incr("u2", 102, 1, Sat)];
            assert_eq!(apply(&mut value, &ops).0, [Some(wrapped), Some(saturated)]);
        }
        // OVERFLOW FAIL: nil, and nothing written.
        let ops = [incr("u2", 102, 1, Fail)];
        assert_eq!(apply(&mut value, &ops), (vec![None], false));
    }

    #[test]
    fn bitfield_overflow_matches_redis_replies() {
        // Replies taken from redis-server 7.0.15.
        let mut value = Vec::new();
        let ops = [
            incr("u8", 0, 300, Fail),
            get("u8", 0),
            incr("i64", 0, i64::MAX, Wrap),
            incr("i64", 0, i64::MAX, Wrap),
            incr("i64", 0, i64::MAX, Sat),
            incr("i64", 0, i64::MIN, Sat),
            incr("i64", 0, i64::MIN, Sat),
        ];
        let (answers, changed) = apply(&mut value, &ops);
        assert_eq!(
            answers,
            [
                None,
                Some(0),
                Some(i64::MAX),
                Some(-2),
                Some(i64::MAX - 2),
                Some(-3),
                Some(i64::MIN)
            ]
        );
        assert!(changed);
        let mut value = Vec::new();
        let ops = [
            set("u63", 0, -1, Wrap),
            get("u63", 0),
            set("u63", 0, -1, Sat),
            set("u1", 0, 5, Wrap),
            get("u63", 0),
        ];
        assert_eq!(
            apply(&mut value, &ops).0,
            [
                Some(0),
                Some(i64::MAX),
                Some(i64::MAX),
                Some(1),
                Some(i64::MAX)
            ]
        );
        // Redis's checks wrap in 64 bits: -2^63 into an i8 counts as too large, so SAT
        // stores 127 (and WRAP stores its low bits, 0).
        let mut value = Vec::new();
        let ops = [
            set("i8", 0, i64::MIN, Wrap),
            set("i8", 8, i64::MIN, Sat),
            get("i8", 0),
            get("i8", 8),
        ];
        assert_eq!(
            apply(&mut value, &ops).0,
            [Some(0), Some(0), Some(0), Some(127)]
        );
        // SET answers the old value; a FAIL refusal leaves the field.
        let mut value = vec![0x7f];
        let ops = [
            set("i8", 0, 200, Fail),
            set("i8", 0, -128, Fail),
            get("i8", 0),
        ];
        assert_eq!(apply(&mut value, &ops).0, [None, Some(127), Some(-128)]);
    }

    #[test]
    fn bitfield_overflow_checks() {
        assert_eq!(unsigned_overflow(250, 10, 8, Wrap), (true, 4));
        assert_eq!(unsigned_overflow(250, 10, 8, Sat), (true, 255));
        assert_eq!(unsigned_overflow(5, -10, 8, Sat), (true, 0));
        assert_eq!(unsigned_overflow(5, -10, 8, Wrap), (true, 251));
        assert!(!unsigned_overflow(5, -5, 8, Fail).0);
        assert!(!unsigned_overflow(0, i64::MAX, 63, Fail).0);
        assert_eq!(signed_overflow(100, 100, 8, Wrap), (true, -56));
        assert_eq!(signed_overflow(100, 100, 8, Sat), (true, 127));
        assert_eq!(signed_overflow(-100, -100, 8, Sat), (true, -128));
        assert_eq!(signed_overflow(-100, -100, 8, Wrap), (true, 56));
        assert!(!signed_overflow(-100, 227, 8, Fail).0);
        assert_eq!(signed_overflow(1, i64::MAX, 64, Sat), (true, i64::MAX));
        assert_eq!(signed_overflow(-1, i64::MIN, 64, Wrap), (true, i64::MAX));
        assert!(!signed_overflow(-1, i64::MAX, 64, Fail).0);
    }

    #[test]
    fn bitfield_types_and_write_length() {
        assert!(is_valid(field("i64", 0)) && is_valid(field("u63", 7)));
        assert!(!is_valid(field("u64", 0)) && !is_valid(field("i65", 0)));
        assert!(!is_valid(field("u0", 0)));
        assert!(!is_valid(field("u8", u64::MAX - 3)), "past the end of u64");
        assert_eq!(write_len(&[get("u8", 800)]), None);
        let ops = [
            get("u8", 800),
            set("u8", 8, 1, Wrap),
            incr("i4", 20, 1, Fail),
        ];
        assert_eq!(write_len(&ops), Some(3), "bits 20..23 are in byte 2");
    }

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

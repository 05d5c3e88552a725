//! Typed keys: hashes, sets, sorted sets and lists (see `shoal_shared::layout::typed`
//! for their bytes).
//!
//! [`Store::typed`] runs one [`TypedOp`] on one key. A [`Target`] is the request's view
//! of that key: it checks the key's type, and reads and writes its elements, each
//! write with its own log entry in the same transaction; [`Target::save`] then writes
//! the key's metadata record (or removes the key when it has no element left, as Redis
//! does).
//!
//! Submodules, one per type: `hash`, `set`, `zset`, `list`.

mod hash;
mod list;
mod set;
mod zset;

use crate::store::WriteTxn;
use shoal_shared::frame::{
    Answer, ChangeType, Collection, Key, TypedOp, WorkerError, WorkerResponse,
};
use shoal_shared::layout::typed::{
    self, ElementTable, Elements, Kind, LogTable, TypeMeta, MAX_KEY_AND_ELEMENT_BYTES,
};
use shoal_shared::layout::{self};

use super::keyspace::{Current, RecordValue};
use super::{Batch, OpError, OpResult, Store, Table};

/// Called for each element walked (without its prefix) and its value; `false` stops.
type Visit<'a> = &'a mut dyn FnMut(&[u8], &[u8]) -> Result<bool, OpError>;

/// The request's view of one typed key.
pub(crate) struct Target<'s> {
    store: &'s Store,
    db: Table,
    collection: Collection,
    key: &'s Key,
    now_ms: u64,
}

/// A typed key as a request finds it: its state, its metadata when it is live, and the
/// partition's last commit id then (so that [`Target::save`] sees elements written).
pub(crate) struct Found {
    current: Current,
    meta: Option<TypeMeta>,
    commit_id: u64,
}

fn refused(text: impl Into<String>) -> OpError {
    OpError::Refused(WorkerError::Command(text.into()))
}

impl Store {
    /// Runs `op` on `key`.
    pub(crate) fn typed(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        collection: Collection,
        key: &Key,
        op: &TypedOp,
    ) -> OpResult {
        let target = Target {
            store: self,
            db: self.db(collection)?,
            collection,
            key,
            now_ms: batch.now_ms,
        };
        // Every element is checked before any is written: a refusal writes nothing.
        self.check_sizes(key, op)?;
        let answer = match op {
            TypedOp::Type => target.type_name(txn)?,
            TypedOp::Encoding => target.encoding(txn)?,
            TypedOp::Len(kind) => {
                let found = target.load(txn, batch, *kind)?;
                Answer::Integer(found.meta.map_or(0, |m| m.count as i64))
            }
            TypedOp::Scan {
                kind,
                after,
                count,
                pattern,
                no_values,
            } => target.scan(
                txn,
                batch,
                *kind,
                after.as_ref().map(|a| a.as_slice()),
                *count,
                pattern.as_ref().map(|p| p.as_slice()),
                *no_values,
            )?,
            TypedOp::Members(kind) => target.members(txn, batch, *kind)?,
            op @ (TypedOp::HSet { .. }
            | TypedOp::HGet { .. }
            | TypedOp::HDel { .. }
            | TypedOp::HExists { .. }
            | TypedOp::HStrLen { .. }
            | TypedOp::HGetAll { .. }
            | TypedOp::HIncrBy { .. }
            | TypedOp::HIncrByFloat { .. }
            | TypedOp::HRandField { .. }) => target.hash(txn, batch, op)?,
            TypedOp::SMove { to, member } => target.smove(txn, batch, to, member)?,
            TypedOp::LMove {
                to,
                from_left,
                to_left,
            } => target.lmove(txn, batch, to, *from_left, *to_left)?,
            op @ (TypedOp::SAdd { .. }
            | TypedOp::SRem { .. }
            | TypedOp::SIsMember { .. }
            | TypedOp::SRandMember { .. }
            | TypedOp::SPop { .. }) => target.set(txn, batch, op)?,
            op @ (TypedOp::ZAdd { .. }
            | TypedOp::ZRem { .. }
            | TypedOp::ZScore { .. }
            | TypedOp::ZRank { .. }
            | TypedOp::ZCount { .. }
            | TypedOp::ZRange { .. }
            | TypedOp::ZRemRange { .. }
            | TypedOp::ZPop { .. }
            | TypedOp::ZRandMember { .. }) => target.zset(txn, batch, op)?,
            op @ (TypedOp::Push { .. }
            | TypedOp::Pop { .. }
            | TypedOp::LIndex { .. }
            | TypedOp::LSet { .. }
            | TypedOp::LRange { .. }
            | TypedOp::LTrim { .. }
            | TypedOp::LRem { .. }
            | TypedOp::LInsert { .. }
            | TypedOp::LPos { .. }) => target.list(txn, batch, op)?,
        };
        Ok(WorkerResponse::Answer(answer))
    }
}

impl Store {
    /// Refuses `op` when one of the elements it may write does not fit an LMDB key with
    /// the user key (a sorted-set member also sits after its 8-byte score), or one of its
    /// values is over `max_value_bytes`.
    fn check_sizes(&self, key: &Key, op: &TypedOp) -> Result<(), OpError> {
        let (elements, values): (Vec<usize>, Vec<usize>) = match op {
            TypedOp::HSet { pairs, .. } => pairs.iter().map(|(f, v)| (f.len(), v.len())).unzip(),
            TypedOp::HIncrBy { field, .. } | TypedOp::HIncrByFloat { field, .. } => {
                (vec![field.len()], Vec::new())
            }
            TypedOp::SAdd { members } => (members.iter().map(|m| m.len()).collect(), Vec::new()),
            TypedOp::SMove { member, .. } => (vec![member.len()], Vec::new()),
            TypedOp::ZAdd { pairs, .. } => {
                (pairs.iter().map(|(_, m)| m.len() + 8).collect(), Vec::new())
            }
            // A list element's key is its 8-byte position.
            TypedOp::Push { values, .. } => (vec![8], values.iter().map(|v| v.len()).collect()),
            TypedOp::LSet { value, .. } | TypedOp::LInsert { value, .. } => {
                (vec![8], vec![value.len()])
            }
            _ => (Vec::new(), Vec::new()),
        };
        for element in elements {
            self.check_element(key, element, 0)?;
        }
        for value in values {
            self.check_element(key, 0, value)?;
        }
        Ok(())
    }

    /// Refuses a snapshot that `key` cannot hold: an element too long for it (a
    /// sorted-set member also sits after its 8-byte score), or a value too large.
    pub(crate) fn check_snapshot(&self, key: &Key, snapshot: &[u8]) -> Result<(), OpError> {
        let (kind, elements) = typed::decode_snapshot(snapshot)?;
        // A score, or a list position, is 8 more bytes of the element key.
        let extra = match kind {
            Kind::SortedSet | Kind::List => 8,
            Kind::Hash | Kind::Set => 0,
        };
        for (element, value) in &elements {
            self.check_element(key, element.len() + extra, value.len())?;
        }
        Ok(())
    }

    /// Refuses an element of `element_bytes` (what follows the key in its element key)
    /// that does not fit an LMDB key with `key`, or a value over `max_value_bytes`.
    fn check_element(
        &self,
        key: &Key,
        element_bytes: usize,
        value_bytes: usize,
    ) -> Result<(), OpError> {
        if key.bytes.len() + element_bytes > MAX_KEY_AND_ELEMENT_BYTES {
            return Err(refused(format!(
                "ERR key and element together are longer than {MAX_KEY_AND_ELEMENT_BYTES} bytes"
            )));
        }
        if value_bytes > self.max_value_bytes {
            return Err(OpError::Refused(WorkerError::ValueTooLarge {
                max_value_bytes: self.max_value_bytes,
            }));
        }
        Ok(())
    }
}

impl<'s> Target<'s> {
    /// The same view of another key of this worker (the second key of SMOVE, LMOVE).
    fn other(&self, key: &'s Key) -> Target<'s> {
        Target {
            store: self.store,
            db: self.db,
            collection: self.collection,
            key,
            now_ms: self.now_ms,
        }
    }

    /// The key's state; refused with `WrongType` when it is live and not of `kind`.
    fn load(&self, txn: &WriteTxn, batch: &Batch, kind: Kind) -> Result<Found, OpError> {
        let current = self.store.current(txn, self.db, self.key, self.now_ms)?;
        let commit_id = self
            .store
            .partition_meta(txn, batch, self.key.partition)?
            .last_commit_id;
        let meta = match &current.live {
            None => None,
            Some(live) => match live.typed {
                Some(meta) if meta.kind == kind => Some(meta),
                _ => return Err(OpError::Refused(WorkerError::WrongType)),
            },
        };
        Ok(Found {
            current,
            meta,
            commit_id,
        })
    }

    /// The live metadata, or a new empty key of `kind` whose version is the first commit
    /// id this request takes in the partition (no other incarnation can have it).
    fn meta_or_new(
        &self,
        txn: &WriteTxn,
        batch: &Batch,
        found: &Found,
        kind: Kind,
    ) -> Result<TypeMeta, OpError> {
        match found.meta {
            Some(meta) => Ok(meta),
            None => {
                let partition = self.store.partition_meta(txn, batch, self.key.partition)?;
                Ok(TypeMeta::new(kind, partition.last_commit_id + 1))
            }
        }
    }

    fn type_name(&self, txn: &WriteTxn) -> Result<Answer, OpError> {
        let current = self.store.current(txn, self.db, self.key, self.now_ms)?;
        Ok(Answer::Status(
            match current.live {
                None => "none",
                Some(live) => live.typed.map_or("string", |meta| meta.kind.name()),
            }
            .into(),
        ))
    }

    fn encoding(&self, txn: &WriteTxn) -> Result<Answer, OpError> {
        let current = self.store.current(txn, self.db, self.key, self.now_ms)?;
        Ok(match current.live {
            None => Answer::Nil,
            Some(live) => match live.typed {
                Some(meta) => Answer::bulk(meta.kind.encoding()),
                None if live.value.len() <= 20
                    && shoal_shared::resp::parse_i64(&live.value).is_some() =>
                {
                    Answer::bulk("int")
                }
                None if live.value.len() <= 44 => Answer::bulk("embstr"),
                None => Answer::bulk("raw"),
            },
        })
    }

    fn stored_key(&self, meta: &TypeMeta, element: &[u8]) -> Vec<u8> {
        typed::element_key(self.key.partition, &self.key.bytes, meta.version, element)
    }

    /// An element's value (without its header).
    fn get(
        &self,
        txn: &WriteTxn,
        table: ElementTable,
        meta: &TypeMeta,
        element: &[u8],
    ) -> Result<Option<Vec<u8>>, OpError> {
        match self
            .store
            .element_db(table)
            .get(txn, &self.stored_key(meta, element))?
        {
            Some(raw) => Ok(Some(layout::decode_value(raw)?.bytes.to_vec())),
            None => Ok(None),
        }
    }

    /// Writes an element, logging a create (`existed`: an update).
    #[allow(clippy::too_many_arguments)]
    fn put(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        table: ElementTable,
        meta: &TypeMeta,
        element: &[u8],
        value: &[u8],
        existed: bool,
    ) -> Result<(), OpError> {
        // Callers check every element first (`Store::check_sizes`); this is the last guard.
        self.store
            .check_element(self.key, element.len(), value.len())?;
        let stored_key = self.stored_key(meta, element);
        let commit_id = self.store.next_commit_id(txn, batch, self.key.partition)?;
        self.store.element_db(table).put(
            txn,
            &stored_key,
            &layout::encode_value(commit_id, None, value),
        )?;
        let change = if existed {
            ChangeType::Update
        } else {
            ChangeType::Create
        };
        self.store.append_log(
            txn,
            batch,
            commit_id,
            change,
            LogTable::Element(table).field(self.collection),
            &stored_key[2..],
            self.key.partition,
            None,
            value,
        )?;
        Ok(())
    }

    /// Deletes an element if it is stored, logging the delete; whether it was.
    fn delete(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        table: ElementTable,
        meta: &TypeMeta,
        element: &[u8],
    ) -> Result<bool, OpError> {
        let stored_key = self.stored_key(meta, element);
        if !self.store.element_db(table).delete(txn, &stored_key)? {
            return Ok(false);
        }
        let commit_id = self.store.next_commit_id(txn, batch, self.key.partition)?;
        self.store.append_log(
            txn,
            batch,
            commit_id,
            ChangeType::Delete,
            LogTable::Element(table).field(self.collection),
            &stored_key[2..],
            self.key.partition,
            None,
            &[],
        )?;
        Ok(true)
    }

    /// Deletes each of `elements` that is stored, counting them off `meta`; how many.
    fn delete_each(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        table: ElementTable,
        meta: &mut TypeMeta,
        elements: &[serde_bytes::ByteBuf],
    ) -> Result<i64, OpError> {
        let mut deleted = 0;
        for element in elements {
            if self.delete(txn, batch, table, meta, element)? {
                meta.count -= 1;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// The elements of `table`, in stored order, from the first after `after` (or from the
    /// last backwards with `reverse`), while `take` says to go on. `take` gets the element
    /// (without the prefix) and its value.
    fn walk(
        &self,
        txn: &WriteTxn,
        table: ElementTable,
        meta: &TypeMeta,
        reverse: bool,
        take: Visit<'_>,
    ) -> Result<(), OpError> {
        let prefix = typed::element_prefix(self.key.partition, &self.key.bytes, meta.version);
        let db = self.store.element_db(table);
        if reverse {
            for item in db.rev_prefix_iter(txn, &prefix)? {
                let (key, value) = item?;
                if !take(&key[prefix.len()..], layout::decode_value(value)?.bytes)? {
                    break;
                }
            }
        } else {
            for item in db.prefix_iter(txn, &prefix)? {
                let (key, value) = item?;
                if !take(&key[prefix.len()..], layout::decode_value(value)?.bytes)? {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Elements of `table` from the first strictly after `after`, while `take` goes on.
    fn walk_after(
        &self,
        txn: &WriteTxn,
        table: ElementTable,
        meta: &TypeMeta,
        after: &[u8],
        take: Visit<'_>,
    ) -> Result<(), OpError> {
        let prefix = typed::element_prefix(self.key.partition, &self.key.bytes, meta.version);
        let start = [&prefix[..], after].concat();
        let range = (
            std::ops::Bound::Excluded(&start[..]),
            std::ops::Bound::Unbounded,
        );
        for item in self.store.element_db(table).range(txn, &range)? {
            let (key, value) = item?;
            if !key.starts_with(&prefix) {
                break;
            }
            if !take(&key[prefix.len()..], layout::decode_value(value)?.bytes)? {
                break;
            }
        }
        Ok(())
    }

    /// Every element of `table` with its value.
    fn all(
        &self,
        txn: &WriteTxn,
        table: ElementTable,
        meta: &TypeMeta,
    ) -> Result<Elements, OpError> {
        let mut out = Vec::with_capacity(meta.count.min(1 << 20) as usize);
        self.walk(txn, table, meta, false, &mut |element, value| {
            out.push((element.to_vec(), value.to_vec()));
            Ok(true)
        })?;
        Ok(out)
    }

    /// Writes the key's metadata after a change: the record with `meta` (keeping the
    /// expiry), or, when no element is left, the key's removal. The record is rewritten
    /// whenever an element changed, so that its commit id is the key's last change (WATCH).
    fn save(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        found: &Found,
        meta: &TypeMeta,
    ) -> Result<(), OpError> {
        let elements_changed = self
            .store
            .partition_meta(txn, batch, self.key.partition)?
            .last_commit_id
            != found.commit_id;
        if found.meta.as_ref() == Some(meta) && !elements_changed {
            return Ok(());
        }
        if meta.count == 0 {
            if found.current.live.is_some() {
                self.store.remove(
                    txn,
                    batch,
                    self.db,
                    self.collection,
                    self.key,
                    &found.current,
                )?;
            }
            return Ok(());
        }
        let expires = found
            .current
            .live
            .as_ref()
            .and_then(|live| live.expires_at_ms);
        self.store.put_record(
            txn,
            batch,
            self.db,
            self.collection,
            self.key,
            &found.current,
            RecordValue::Typed(meta),
            expires,
        )?;
        Ok(())
    }

    /// HSCAN, SSCAN, ZSCAN: a page of elements after `after`.
    #[allow(clippy::too_many_arguments)]
    fn scan(
        &self,
        txn: &WriteTxn,
        batch: &Batch,
        kind: Kind,
        after: Option<&[u8]>,
        count: u32,
        pattern: Option<&[u8]>,
        no_values: bool,
    ) -> Result<Answer, OpError> {
        let found = self.load(txn, batch, kind)?;
        let Some(meta) = found.meta else {
            return Ok(Answer::Array(vec![Answer::Nil, Answer::Array(Vec::new())]));
        };
        let table = match kind {
            Kind::SortedSet => ElementTable::Zset,
            other => typed::tables(other)[0],
        };
        let mut items = Vec::new();
        let mut seen = 0u32;
        let mut last: Option<Vec<u8>> = None;
        let mut more = false;
        let mut take = |element: &[u8], value: &[u8]| -> Result<bool, OpError> {
            if seen >= count.max(1) {
                more = true;
                return Ok(false);
            }
            seen += 1;
            last = Some(element.to_vec());
            if pattern.is_some_and(|p| !shoal_shared::glob::glob_match(p, element, false)) {
                return Ok(true);
            }
            items.push(Answer::bulk(element));
            match kind {
                Kind::Hash if !no_values => items.push(Answer::bulk(value)),
                Kind::SortedSet => items.push(Answer::Double(typed::score_from_bytes(value)?)),
                _ => {}
            }
            Ok(true)
        };
        match after {
            Some(after) => self.walk_after(txn, table, &meta, after, &mut take)?,
            None => self.walk(txn, table, &meta, false, &mut take)?,
        }
        let next = match (more, last) {
            (true, Some(last)) => Answer::bulk(last),
            _ => Answer::Nil,
        };
        Ok(Answer::Array(vec![next, Answer::Array(items)]))
    }

    /// Every member of a set, or every member and score of a sorted set (none when the
    /// key is missing).
    fn members(&self, txn: &WriteTxn, batch: &Batch, kind: Kind) -> Result<Answer, OpError> {
        // The sorted-set algebra takes sets too (their members score 1).
        if kind == Kind::SortedSet {
            if let Ok(found) = self.load(txn, batch, Kind::Set) {
                if found.meta.is_some() {
                    return self.members(txn, batch, Kind::Set);
                }
            }
        }
        let found = self.load(txn, batch, kind)?;
        let Some(meta) = found.meta else {
            return Ok(match kind {
                Kind::SortedSet => Answer::Pairs {
                    pairs: Vec::new(),
                    map: false,
                },
                _ => Answer::Array(Vec::new()),
            });
        };
        match kind {
            Kind::SortedSet => {
                let mut pairs = Vec::new();
                self.walk(
                    txn,
                    ElementTable::Zset,
                    &meta,
                    false,
                    &mut |member, score| {
                        pairs.push((
                            Answer::bulk(member),
                            Answer::Double(typed::score_from_bytes(score)?),
                        ));
                        Ok(true)
                    },
                )?;
                Ok(Answer::Pairs { pairs, map: false })
            }
            _ => Ok(Answer::Array(
                self.all(txn, typed::tables(kind)[0], &meta)?
                    .into_iter()
                    .map(|(member, _)| Answer::bulk(member))
                    .collect(),
            )),
        }
    }
}

/// HRANDFIELD, SRANDMEMBER, ZRANDMEMBER: without a count, one random element (nil when
/// there is none); with one, [`random_indexes`] picks, as an array of elements or, `with`
/// their values, as pairs.
fn random_picks(all: &[(Vec<u8>, Answer)], count: Option<i64>, with: bool) -> Answer {
    let Some(count) = count else {
        return random_indexes(all.len(), 1)
            .first()
            .map_or(Answer::Nil, |&i| Answer::bulk(all[i].0.clone()));
    };
    let picked = random_indexes(all.len(), count).into_iter();
    match with {
        true => Answer::Pairs {
            pairs: picked
                .map(|i| (Answer::bulk(all[i].0.clone()), all[i].1.clone()))
                .collect(),
            map: false,
        },
        false => Answer::Array(picked.map(|i| Answer::bulk(all[i].0.clone())).collect()),
    }
}

/// `count` distinct indexes below `len` (all of them when `count >= len`), or `count`
/// indexes that may repeat; in random order.
fn random_indexes(len: usize, count: i64) -> Vec<usize> {
    if len == 0 {
        return Vec::new();
    }
    let random = |below: usize| (shoal_shared::random_u64() % below as u64) as usize;
    if count < 0 {
        return (0..count.unsigned_abs()).map(|_| random(len)).collect();
    }
    let mut indexes: Vec<usize> = (0..len).collect();
    let take = (count as usize).min(len);
    for i in 0..take {
        let j = i + random(len - i);
        indexes.swap(i, j);
    }
    indexes.truncate(take);
    indexes
}

impl Store {
    /// A typed key's whole content (`layout::typed::encode_snapshot`), for RENAME, COPY
    /// and MOVE.
    pub(crate) fn snapshot(
        &self,
        txn: &WriteTxn,
        key: &Key,
        meta: &TypeMeta,
    ) -> Result<Vec<u8>, OpError> {
        let table = typed::tables(meta.kind)[0];
        let prefix = typed::element_prefix(key.partition, &key.bytes, meta.version);
        let mut elements = Vec::with_capacity(meta.count.min(1 << 20) as usize);
        for item in self.element_db(table).prefix_iter(txn, &prefix)? {
            let (stored, value) = item?;
            let element = match meta.kind {
                Kind::List => Vec::new(),
                _ => stored[prefix.len()..].to_vec(),
            };
            elements.push((element, layout::decode_value(value)?.bytes.to_vec()));
        }
        Ok(typed::encode_snapshot(meta.kind, &elements))
    }

    /// Stores `snapshot` under `key` as a new typed key (replacing what `current` holds),
    /// each element logged.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn write_snapshot(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        db: Table,
        collection: Collection,
        key: &Key,
        current: &Current,
        snapshot: &[u8],
        expires_at_ms: Option<u64>,
    ) -> Result<(), OpError> {
        self.check_snapshot(key, snapshot)?;
        let (kind, elements) = typed::decode_snapshot(snapshot)?;
        let target = Target {
            store: self,
            db,
            collection,
            key,
            now_ms: batch.now_ms,
        };
        let partition = self.partition_meta(txn, batch, key.partition)?;
        let mut meta = TypeMeta::new(kind, partition.last_commit_id + 1);
        for (element, value) in &elements {
            match kind {
                Kind::List => {
                    target.put(
                        txn,
                        batch,
                        ElementTable::List,
                        &meta,
                        &meta.tail.to_be_bytes(),
                        value,
                        false,
                    )?;
                    meta.tail += 1;
                }
                Kind::SortedSet => {
                    target.put(txn, batch, ElementTable::Zset, &meta, element, value, false)?;
                    let ordered = [&value[..], &element[..]].concat();
                    target.put(
                        txn,
                        batch,
                        ElementTable::Zscore,
                        &meta,
                        &ordered,
                        &[],
                        false,
                    )?;
                }
                _ => target.put(
                    txn,
                    batch,
                    typed::tables(kind)[0],
                    &meta,
                    element,
                    value,
                    false,
                )?,
            }
            meta.count += 1;
        }
        if meta.count == 0 {
            self.remove(txn, batch, db, collection, key, current)?;
            return Ok(());
        }
        self.put_record(
            txn,
            batch,
            db,
            collection,
            key,
            current,
            RecordValue::Typed(&meta),
            expires_at_ms,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;

//! Lists: elements in the `list` element table at positions `head..tail` (u64,
//! big-endian), so that pushes and pops at either end and LINDEX touch one element.
//! LINSERT, LREM and LTRIM's middle rewrite the positions after the change.

use crate::store::WriteTxn;
use shoal_shared::frame::{Answer, TypedOp};
use shoal_shared::layout::typed::{ElementTable, Kind, TypeMeta};

use super::{refused, Target};
use crate::store::{Batch, OpError};

const TABLE: ElementTable = ElementTable::List;

fn position(meta: &TypeMeta, index: u64) -> [u8; 8] {
    (meta.head + index).to_be_bytes()
}

/// A Redis index (negative from the end) as an offset from the head, if in the list.
fn offset(meta: &TypeMeta, index: i64) -> Option<u64> {
    let len = meta.count as i64;
    let index = if index < 0 { len + index } else { index };
    (0..len).contains(&index).then_some(index as u64)
}

/// Redis's LRANGE/LTRIM clamping: the offsets `start..=stop`, if any.
fn span(meta: &TypeMeta, start: i64, stop: i64) -> Option<(u64, u64)> {
    let len = meta.count as i64;
    let start = if start < 0 {
        (len + start).max(0)
    } else {
        start
    };
    let stop = if stop < 0 {
        len + stop
    } else {
        stop.min(len - 1)
    };
    (start <= stop && start < len).then_some((start as u64, stop as u64))
}

impl Target<'_> {
    /// LMOVE: the destination's type is checked once the source is found, as Redis does.
    pub(super) fn lmove(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        to: &shoal_shared::frame::Key,
        from_left: bool,
        to_left: bool,
    ) -> Result<Answer, OpError> {
        let destination = self.other(to);
        if self.load(txn, batch, Kind::List)?.meta.is_none() {
            return Ok(Answer::Nil);
        }
        destination.load(txn, batch, Kind::List)?;
        let popped = self.list(
            txn,
            batch,
            &TypedOp::Pop {
                left: from_left,
                count: None,
            },
        )?;
        let Answer::Bulk(value) = &popped else {
            return Ok(Answer::Nil);
        };
        destination.list(
            txn,
            batch,
            &TypedOp::Push {
                left: to_left,
                values: vec![value.clone()],
                if_exists: false,
            },
        )?;
        Ok(popped)
    }

    pub(super) fn list(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        op: &TypedOp,
    ) -> Result<Answer, OpError> {
        let found = self.load(txn, batch, Kind::List)?;
        let mut meta = self.meta_or_new(txn, batch, &found, Kind::List)?;
        let exists = found.meta.is_some();
        let answer = match op {
            TypedOp::Push {
                left,
                values,
                if_exists,
            } => {
                if *if_exists && !exists {
                    return Ok(Answer::Integer(0));
                }
                for value in values {
                    if *left {
                        meta.head -= 1;
                        self.put(
                            txn,
                            batch,
                            TABLE,
                            &meta,
                            &meta.head.to_be_bytes(),
                            value,
                            false,
                        )?;
                    } else {
                        self.put(
                            txn,
                            batch,
                            TABLE,
                            &meta,
                            &meta.tail.to_be_bytes(),
                            value,
                            false,
                        )?;
                        meta.tail += 1;
                    }
                    meta.count += 1;
                }
                Answer::Integer(meta.count as i64)
            }
            TypedOp::Pop { left, count } => {
                if !exists {
                    return Ok(match count {
                        None => Answer::Nil,
                        Some(_) => Answer::NilArray,
                    });
                }
                let n = count.unwrap_or(1).min(meta.count);
                let mut popped = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let at = if *left { meta.head } else { meta.tail - 1 };
                    let element = at.to_be_bytes();
                    let value = self.get(txn, TABLE, &meta, &element)?.unwrap_or_default();
                    self.delete(txn, batch, TABLE, &meta, &element)?;
                    if *left {
                        meta.head += 1;
                    } else {
                        meta.tail -= 1;
                    }
                    meta.count -= 1;
                    popped.push(Answer::bulk(value));
                }
                match count {
                    None => popped.pop().unwrap_or(Answer::Nil),
                    Some(_) => Answer::Array(popped),
                }
            }
            TypedOp::LIndex { index } => match offset(&meta, *index).filter(|_| exists) {
                None => Answer::Nil,
                Some(at) => self
                    .get(txn, TABLE, &meta, &position(&meta, at))?
                    .map_or(Answer::Nil, Answer::bulk),
            },
            TypedOp::LSet { index, value } => {
                if !exists {
                    return Err(refused("ERR no such key"));
                }
                let at = offset(&meta, *index).ok_or_else(|| refused("ERR index out of range"))?;
                self.put(txn, batch, TABLE, &meta, &position(&meta, at), value, true)?;
                Answer::Ok
            }
            TypedOp::LRange { start, stop } => {
                match span(&meta, *start, *stop).filter(|_| exists) {
                    None => Answer::Array(Vec::new()),
                    Some((first, last)) => {
                        let mut out = Vec::with_capacity((last - first + 1).min(1 << 20) as usize);
                        let start = position(&meta, first);
                        let end = meta.head + last;
                        let mut take = |element: &[u8], value: &[u8]| -> Result<bool, OpError> {
                            let at = u64::from_be_bytes(element.try_into().unwrap_or_default());
                            if at > end {
                                return Ok(false);
                            }
                            out.push(Answer::bulk(value));
                            Ok(at < end)
                        };
                        match first {
                            0 => self.walk(txn, TABLE, &meta, false, &mut take)?,
                            _ => self.walk_after(
                                txn,
                                TABLE,
                                &meta,
                                &(u64::from_be_bytes(start) - 1).to_be_bytes(),
                                &mut take,
                            )?,
                        }
                        Answer::Array(out)
                    }
                }
            }
            TypedOp::LTrim { start, stop } => {
                if exists {
                    let (keep_from, keep_to) =
                        span(&meta, *start, *stop).unwrap_or((meta.count, meta.count));
                    for at in
                        (0..keep_from).chain(keep_to.saturating_add(1).min(meta.count)..meta.count)
                    {
                        self.delete(txn, batch, TABLE, &meta, &position(&meta, at))?;
                    }
                    let kept = if keep_from >= meta.count {
                        0
                    } else {
                        keep_to - keep_from + 1
                    };
                    let head = meta.head + keep_from;
                    meta.head = head;
                    meta.tail = head + kept;
                    meta.count = kept;
                }
                Answer::Ok
            }
            TypedOp::LRem { count, value } => {
                if !exists {
                    return Ok(Answer::Integer(0));
                }
                let old = self.elements(txn, &meta)?;
                let mut remove = vec![false; old.len()];
                let mut removed = 0u64;
                let limit = if *count == 0 {
                    u64::MAX
                } else {
                    count.unsigned_abs()
                };
                let order: Box<dyn Iterator<Item = usize>> = match *count < 0 {
                    true => Box::new((0..old.len()).rev()),
                    false => Box::new(0..old.len()),
                };
                for i in order {
                    if removed >= limit {
                        break;
                    }
                    if old[i] == value.as_slice() {
                        remove[i] = true;
                        removed += 1;
                    }
                }
                let new: Vec<Vec<u8>> = old
                    .iter()
                    .zip(&remove)
                    .filter(|(_, gone)| !**gone)
                    .map(|(v, _)| v.clone())
                    .collect();
                self.rewrite(txn, batch, &mut meta, &old, &new)?;
                Answer::Integer(removed as i64)
            }
            TypedOp::LInsert {
                before,
                pivot,
                value,
            } => {
                if !exists {
                    return Ok(Answer::Integer(0));
                }
                let old = self.elements(txn, &meta)?;
                let Some(at) = old.iter().position(|v| v == pivot.as_slice()) else {
                    return Ok(Answer::Integer(-1));
                };
                let mut new = old.clone();
                new.insert(if *before { at } else { at + 1 }, value.to_vec());
                self.rewrite(txn, batch, &mut meta, &old, &new)?;
                Answer::Integer(meta.count as i64)
            }
            TypedOp::LPos {
                value,
                rank,
                count,
                max_len,
            } => {
                let mut matches = Vec::new();
                if exists {
                    let wanted = count.map_or(1, |c| if c == 0 { u64::MAX } else { c });
                    let mut skip = rank.unsigned_abs() - 1;
                    let mut compared = 0u64;
                    let reverse = *rank < 0;
                    let mut index = 0u64;
                    self.walk(txn, TABLE, &meta, reverse, &mut |_, element| {
                        if *max_len > 0 && compared >= *max_len {
                            return Ok(false);
                        }
                        compared += 1;
                        let at = if reverse {
                            meta.count - 1 - index
                        } else {
                            index
                        };
                        index += 1;
                        if element == value.as_slice() {
                            if skip > 0 {
                                skip -= 1;
                            } else {
                                matches.push(Answer::Integer(at as i64));
                            }
                        }
                        Ok((matches.len() as u64) < wanted)
                    })?;
                }
                match count {
                    None => matches.pop().unwrap_or(Answer::Nil),
                    Some(_) => Answer::Array(matches),
                }
            }
            _ => return Err(refused("ERR internal error: not a list command")),
        };
        self.save(txn, batch, &found, &meta)?;
        Ok(answer)
    }

    /// Every element, head first.
    fn elements(&self, txn: &WriteTxn, meta: &TypeMeta) -> Result<Vec<Vec<u8>>, OpError> {
        Ok(self
            .all(txn, TABLE, meta)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// Makes the list `new` where it was `old`: positions from the head keep their
    /// place, and only those whose element changed are written.
    fn rewrite(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        meta: &mut TypeMeta,
        old: &[Vec<u8>],
        new: &[Vec<u8>],
    ) -> Result<(), OpError> {
        for (i, value) in new.iter().enumerate() {
            if old.get(i) != Some(value) {
                self.put(
                    txn,
                    batch,
                    TABLE,
                    meta,
                    &position(meta, i as u64),
                    value,
                    i < old.len(),
                )?;
            }
        }
        for i in new.len()..old.len() {
            self.delete(txn, batch, TABLE, meta, &position(meta, i as u64))?;
        }
        meta.count = new.len() as u64;
        meta.tail = meta.head + meta.count;
        Ok(())
    }
}

//! Sorted sets: each member's score in the `zset` element table, and the members in
//! score order in `zscore` (`score ++ member`), so that ranges are one cursor walk.

use crate::store::WriteTxn;
use shoal_shared::frame::{Answer, LexBound, RangeBy, ScoreBound, TypedOp, ZRange};
use shoal_shared::layout::typed::{score_bytes, score_from_bytes, ElementTable, Kind, TypeMeta};

use super::{random_picks, refused, Target};
use crate::store::{Batch, OpError};

impl Target<'_> {
    pub(super) fn zset(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        op: &TypedOp,
    ) -> Result<Answer, OpError> {
        let found = self.load(txn, batch, Kind::SortedSet)?;
        let mut meta = self.meta_or_new(txn, batch, &found, Kind::SortedSet)?;
        let exists = found.meta.is_some();
        let answer = match op {
            TypedOp::ZAdd { flags, pairs } => {
                let (mut added, mut changed) = (0, 0);
                let mut last_score = None;
                for (score, member) in pairs {
                    let old = self.score_of(txn, &meta, member)?;
                    if (flags.nx && old.is_some()) || (flags.xx && old.is_none()) {
                        last_score = None;
                        continue;
                    }
                    let new = match (flags.incr, old) {
                        (true, Some(old)) => old + score,
                        _ => *score,
                    };
                    if new.is_nan() {
                        return Err(refused("ERR resulting score is not a number (NaN)"));
                    }
                    match old {
                        Some(old) => {
                            if (flags.gt && new <= old) || (flags.lt && new >= old) {
                                last_score = None;
                                continue;
                            }
                            if new != old {
                                self.move_member(txn, batch, &meta, member, Some(old), new)?;
                                changed += 1;
                            }
                        }
                        None => {
                            self.move_member(txn, batch, &meta, member, None, new)?;
                            meta.count += 1;
                            added += 1;
                        }
                    }
                    last_score = Some(new);
                }
                match flags.incr {
                    true => last_score.map_or(Answer::Nil, Answer::Double),
                    false if flags.ch => Answer::Integer(added + changed),
                    false => Answer::Integer(added),
                }
            }
            TypedOp::ZRem { members } => {
                let mut removed = 0;
                for member in members.iter().filter(|_| exists) {
                    if let Some(score) = self.score_of(txn, &meta, member)? {
                        self.remove_member(txn, batch, &meta, member, score)?;
                        meta.count -= 1;
                        removed += 1;
                    }
                }
                Answer::Integer(removed)
            }
            TypedOp::ZScore { members } => {
                let mut scores = Vec::with_capacity(members.len());
                for member in members {
                    scores.push(match exists {
                        true => self
                            .score_of(txn, &meta, member)?
                            .map_or(Answer::Nil, Answer::Double),
                        false => Answer::Nil,
                    });
                }
                Answer::Array(scores)
            }
            TypedOp::ZRank { member, reverse } => match exists {
                false => Answer::Nil,
                true => match self.score_of(txn, &meta, member)? {
                    None => Answer::Nil,
                    Some(_) => {
                        let mut rank = 0;
                        self.walk(
                            txn,
                            ElementTable::Zscore,
                            &meta,
                            *reverse,
                            &mut |entry, _| {
                                if &entry[8..] == member.as_slice() {
                                    return Ok(false);
                                }
                                rank += 1;
                                Ok(true)
                            },
                        )?;
                        Answer::Integer(rank)
                    }
                },
            },
            TypedOp::ZCount { range } => {
                let range = ZRange {
                    by: range.clone(),
                    reverse: false,
                    limit: None,
                };
                Answer::Integer(self.select(txn, &meta, exists, &range)?.len() as i64)
            }
            TypedOp::ZRange { range, with_scores } => {
                let selected = self.select(txn, &meta, exists, range)?;
                match with_scores {
                    true => Answer::Pairs {
                        pairs: selected
                            .into_iter()
                            .map(|(member, score)| (Answer::bulk(member), Answer::Double(score)))
                            .collect(),
                        map: false,
                    },
                    false => {
                        Answer::Array(selected.into_iter().map(|(m, _)| Answer::bulk(m)).collect())
                    }
                }
            }
            TypedOp::ZRemRange { range } => {
                let range = ZRange {
                    by: range.clone(),
                    reverse: false,
                    limit: None,
                };
                let selected = self.select(txn, &meta, exists, &range)?;
                for (member, score) in &selected {
                    self.remove_member(txn, batch, &meta, member, *score)?;
                    meta.count -= 1;
                }
                Answer::Integer(selected.len() as i64)
            }
            TypedOp::ZPop { max, count } => {
                let range = ZRange {
                    by: RangeBy::Rank(0, (*count).min(i64::MAX as u64) as i64 - 1),
                    reverse: *max,
                    limit: None,
                };
                let selected = match count {
                    0 => Vec::new(),
                    _ => self.select(txn, &meta, exists, &range)?,
                };
                for (member, score) in &selected {
                    self.remove_member(txn, batch, &meta, member, *score)?;
                    meta.count -= 1;
                }
                Answer::Pairs {
                    pairs: selected
                        .into_iter()
                        .map(|(member, score)| (Answer::bulk(member), Answer::Double(score)))
                        .collect(),
                    map: false,
                }
            }
            TypedOp::ZRandMember { count, with_scores } => {
                let mut all = Vec::new();
                if exists {
                    self.walk(
                        txn,
                        ElementTable::Zset,
                        &meta,
                        false,
                        &mut |member, score| {
                            all.push((member.to_vec(), score_from_bytes(score)?));
                            Ok(true)
                        },
                    )?;
                }
                let all: Vec<(Vec<u8>, Answer)> = all
                    .into_iter()
                    .map(|(member, score)| (member, Answer::Double(score)))
                    .collect();
                random_picks(&all, *count, *with_scores)
            }
            _ => return Err(refused("ERR internal error: not a sorted set command")),
        };
        self.save(txn, batch, &found, &meta)?;
        Ok(answer)
    }

    fn score_of(
        &self,
        txn: &WriteTxn,
        meta: &TypeMeta,
        member: &[u8],
    ) -> Result<Option<f64>, OpError> {
        match self.get(txn, ElementTable::Zset, meta, member)? {
            Some(raw) => Ok(Some(score_from_bytes(&raw)?)),
            None => Ok(None),
        }
    }

    /// Gives `member` the score `new` (it had `old`), in both tables.
    fn move_member(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        meta: &TypeMeta,
        member: &[u8],
        old: Option<f64>,
        new: f64,
    ) -> Result<(), OpError> {
        if let Some(old) = old {
            self.delete(
                txn,
                batch,
                ElementTable::Zscore,
                meta,
                &ordered(old, member),
            )?;
        }
        self.put(
            txn,
            batch,
            ElementTable::Zset,
            meta,
            member,
            &score_bytes(new),
            old.is_some(),
        )?;
        self.put(
            txn,
            batch,
            ElementTable::Zscore,
            meta,
            &ordered(new, member),
            &[],
            false,
        )
    }

    fn remove_member(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        meta: &TypeMeta,
        member: &[u8],
        score: f64,
    ) -> Result<(), OpError> {
        self.delete(txn, batch, ElementTable::Zset, meta, member)?;
        self.delete(
            txn,
            batch,
            ElementTable::Zscore,
            meta,
            &ordered(score, member),
        )?;
        Ok(())
    }

    /// The members (with scores) a range takes, in its order.
    fn select(
        &self,
        txn: &WriteTxn,
        meta: &TypeMeta,
        exists: bool,
        range: &ZRange,
    ) -> Result<Vec<(Vec<u8>, f64)>, OpError> {
        let mut out = Vec::new();
        if !exists {
            return Ok(out);
        }
        let len = meta.count as i64;
        let (mut skip, mut take) = match range.limit {
            Some((offset, _)) if offset < 0 => return Ok(out),
            Some((offset, count)) => (
                offset as u64,
                if count < 0 { u64::MAX } else { count as u64 },
            ),
            None => (0, u64::MAX),
        };
        if let RangeBy::Rank(start, stop) = range.by {
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
            if start > stop || start >= len {
                return Ok(out);
            }
            skip = start as u64;
            take = (stop - start + 1) as u64;
        }
        if take == 0 {
            return Ok(out);
        }
        // As Redis: a lex range is empty unless the last member (by score) reaches its
        // low end and the first one its high end (for members of one score this changes
        // nothing; with several scores a lex range is Redis's unspecified case).
        if let RangeBy::Lex(min, max) = &range.by {
            let end = |reverse: bool| -> Result<Vec<u8>, OpError> {
                let mut member = Vec::new();
                self.walk(txn, ElementTable::Zscore, meta, reverse, &mut |entry, _| {
                    member = entry[8..].to_vec();
                    Ok(false)
                })?;
                Ok(member)
            };
            if lex_below(&end(true)?, min) || lex_above(&end(false)?, max) {
                return Ok(out);
            }
        }
        self.walk(
            txn,
            ElementTable::Zscore,
            meta,
            range.reverse,
            &mut |entry, _| {
                let score = score_from_bytes(entry)?;
                let member = &entry[8..];
                let (before, after) = match &range.by {
                    RangeBy::Rank(..) => (false, false),
                    RangeBy::Score(min, max) => (below(score, min), above(score, max)),
                    RangeBy::Lex(min, max) => (lex_below(member, min), lex_above(member, max)),
                };
                // Walking up, a member above the range ends it; walking down, one below.
                let (skip_it, stop) = match range.reverse {
                    false => (before, after),
                    true => (after, before),
                };
                if stop {
                    return Ok(false);
                }
                if skip_it {
                    return Ok(true);
                }
                if skip > 0 {
                    skip -= 1;
                    return Ok(true);
                }
                out.push((member.to_vec(), score));
                take -= 1;
                Ok(take > 0)
            },
        )?;
        Ok(out)
    }
}

/// `score ++ member`, a `zscore` element.
fn ordered(score: f64, member: &[u8]) -> Vec<u8> {
    [&score_bytes(score)[..], member].concat()
}

fn below(score: f64, min: &ScoreBound) -> bool {
    score < min.value || (min.exclusive && score == min.value)
}

fn above(score: f64, max: &ScoreBound) -> bool {
    score > max.value || (max.exclusive && score == max.value)
}

fn lex_below(member: &[u8], min: &LexBound) -> bool {
    match min {
        LexBound::Min => false,
        LexBound::Max => true,
        LexBound::Inclusive(m) => member < m.as_slice(),
        LexBound::Exclusive(m) => member <= m.as_slice(),
    }
}

fn lex_above(member: &[u8], max: &LexBound) -> bool {
    match max {
        LexBound::Min => true,
        LexBound::Max => false,
        LexBound::Inclusive(m) => member > m.as_slice(),
        LexBound::Exclusive(m) => member >= m.as_slice(),
    }
}

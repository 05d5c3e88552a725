//! Sets: members in the `set` element table, with empty values.

use crate::store::WriteTxn;
use shoal_shared::frame::{Answer, TypedOp};
use shoal_shared::layout::typed::{ElementTable, Kind};

use super::{random_indexes, random_picks, refused, Target};
use crate::store::{Batch, OpError};

const TABLE: ElementTable = ElementTable::Set;

impl Target<'_> {
    /// SMOVE: both keys' types are checked first, as Redis does.
    pub(super) fn smove(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        to: &shoal_shared::frame::Key,
        member: &[u8],
    ) -> Result<Answer, OpError> {
        let destination = self.other(to);
        // A missing source answers 0 before any type is checked, as in Redis.
        let current = self.store.current(txn, self.db, self.key, self.now_ms)?;
        if current.live.is_none() {
            return Ok(Answer::Integer(0));
        }
        let source = self.load(txn, batch, Kind::Set)?;
        destination.load(txn, batch, Kind::Set)?;
        let Some(meta) = source.meta else {
            return Ok(Answer::Integer(0));
        };
        if self.get(txn, TABLE, &meta, member)?.is_none() {
            return Ok(Answer::Integer(0));
        }
        if self.key == to {
            return Ok(Answer::Integer(1));
        }
        let member = serde_bytes::ByteBuf::from(member.to_vec());
        let members = vec![member];
        self.set(
            txn,
            batch,
            &TypedOp::SRem {
                members: members.clone(),
            },
        )?;
        destination.set(txn, batch, &TypedOp::SAdd { members })?;
        Ok(Answer::Integer(1))
    }

    pub(super) fn set(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        op: &TypedOp,
    ) -> Result<Answer, OpError> {
        let found = self.load(txn, batch, Kind::Set)?;
        let mut meta = self.meta_or_new(txn, batch, &found, Kind::Set)?;
        let exists = found.meta.is_some();
        let answer = match op {
            TypedOp::SAdd { members } => {
                let mut added = 0;
                for member in members {
                    if self.get(txn, TABLE, &meta, member)?.is_none() {
                        self.put(txn, batch, TABLE, &meta, member, &[], false)?;
                        meta.count += 1;
                        added += 1;
                    }
                }
                Answer::Integer(added)
            }
            TypedOp::SRem { members } => match exists {
                true => Answer::Integer(self.delete_each(txn, batch, TABLE, &mut meta, members)?),
                false => Answer::Integer(0),
            },
            TypedOp::SIsMember { members } => {
                let mut flags = Vec::with_capacity(members.len());
                for member in members {
                    let is = exists && self.get(txn, TABLE, &meta, member)?.is_some();
                    flags.push(Answer::Integer(i64::from(is)));
                }
                Answer::Array(flags)
            }
            TypedOp::SRandMember { count } => {
                let all: Vec<(Vec<u8>, Answer)> = match exists {
                    true => self.all(txn, TABLE, &meta)?,
                    false => Vec::new(),
                }
                .into_iter()
                .map(|(member, _)| (member, Answer::Nil))
                .collect();
                random_picks(&all, *count, false)
            }
            TypedOp::SPop { count } => {
                let all = match exists {
                    true => self.all(txn, TABLE, &meta)?,
                    false => Vec::new(),
                };
                let picked =
                    random_indexes(all.len(), count.unwrap_or(1).min(i64::MAX as u64) as i64);
                let mut popped = Vec::with_capacity(picked.len());
                for i in picked {
                    self.delete(txn, batch, TABLE, &meta, &all[i].0)?;
                    meta.count -= 1;
                    popped.push(Answer::bulk(all[i].0.clone()));
                }
                match count {
                    None => popped.pop().unwrap_or(Answer::Nil),
                    Some(_) => Answer::Array(popped),
                }
            }
            _ => return Err(refused("ERR internal error: not a set command")),
        };
        self.save(txn, batch, &found, &meta)?;
        Ok(answer)
    }
}

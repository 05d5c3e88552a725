//! Hashes: fields and their values in the `hash` element table.

use crate::store::WriteTxn;
use shoal_shared::frame::{Answer, TypedOp, WorkerError};
use shoal_shared::layout::typed::{ElementTable, Kind};
use shoal_shared::resp::parse_i64;

use super::{random_picks, refused, Target};
use crate::store::{Batch, OpError};

const TABLE: ElementTable = ElementTable::Hash;

impl Target<'_> {
    pub(super) fn hash(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        op: &TypedOp,
    ) -> Result<Answer, OpError> {
        // The increment is checked before the key, as Redis does.
        if let TypedOp::HIncrByFloat { increment, .. } = op {
            crate::float::incr_by_float(None, increment).map_err(|e| match e {
                WorkerError::NanOrInfinity => refused("ERR value is NaN or Infinity"),
                other => OpError::Refused(other),
            })?;
        }
        let found = self.load(txn, batch, Kind::Hash)?;
        let mut meta = self.meta_or_new(txn, batch, &found, Kind::Hash)?;
        let exists = found.meta.is_some();
        let answer = match op {
            TypedOp::HSet { pairs, if_absent } => {
                let mut added = 0;
                for (field, value) in pairs {
                    let existed = exists_in(self, txn, &meta, field)?;
                    if existed && *if_absent {
                        continue;
                    }
                    self.put(txn, batch, TABLE, &meta, field, value, existed)?;
                    if !existed {
                        meta.count += 1;
                        added += 1;
                    }
                }
                Answer::Integer(added)
            }
            TypedOp::HGet { fields } => {
                let mut values = Vec::with_capacity(fields.len());
                for field in fields {
                    values.push(match exists.then_some(()) {
                        Some(()) => self
                            .get(txn, TABLE, &meta, field)?
                            .map_or(Answer::Nil, Answer::bulk),
                        None => Answer::Nil,
                    });
                }
                Answer::Array(values)
            }
            TypedOp::HDel { fields } => match exists {
                true => Answer::Integer(self.delete_each(txn, batch, TABLE, &mut meta, fields)?),
                false => Answer::Integer(0),
            },
            TypedOp::HExists { field } => {
                Answer::Integer(i64::from(exists && exists_in(self, txn, &meta, field)?))
            }
            TypedOp::HStrLen { field } => Answer::Integer(match exists {
                true => self
                    .get(txn, TABLE, &meta, field)?
                    .map_or(0, |v| v.len() as i64),
                false => 0,
            }),
            TypedOp::HGetAll { fields, values } => {
                let all = match exists {
                    true => self.all(txn, TABLE, &meta)?,
                    false => Vec::new(),
                };
                match (fields, values) {
                    (true, true) => Answer::Pairs {
                        pairs: all
                            .into_iter()
                            .map(|(f, v)| (Answer::bulk(f), Answer::bulk(v)))
                            .collect(),
                        map: true,
                    },
                    (true, false) => {
                        Answer::Array(all.into_iter().map(|(f, _)| Answer::bulk(f)).collect())
                    }
                    _ => Answer::Array(all.into_iter().map(|(_, v)| Answer::bulk(v)).collect()),
                }
            }
            TypedOp::HIncrBy { field, delta } => {
                let old = match exists {
                    true => self.get(txn, TABLE, &meta, field)?,
                    false => None,
                };
                let value = match &old {
                    None => 0,
                    Some(text) => parse_i64(text)
                        .ok_or_else(|| refused("ERR hash value is not an integer"))?,
                };
                let new = value
                    .checked_add(*delta)
                    .ok_or_else(|| refused("ERR increment or decrement would overflow"))?;
                self.put(
                    txn,
                    batch,
                    TABLE,
                    &meta,
                    field,
                    new.to_string().as_bytes(),
                    old.is_some(),
                )?;
                meta.count += u64::from(old.is_none());
                Answer::Integer(new)
            }
            TypedOp::HIncrByFloat { field, increment } => {
                let old = match exists {
                    true => self.get(txn, TABLE, &meta, field)?,
                    false => None,
                };
                let text =
                    crate::float::incr_by_float(old.as_deref(), increment).map_err(
                        |e| match e {
                            WorkerError::NotFloat => refused("ERR hash value is not a float"),
                            other => OpError::Refused(other),
                        },
                    )?;
                self.put(txn, batch, TABLE, &meta, field, &text, old.is_some())?;
                meta.count += u64::from(old.is_none());
                Answer::bulk(text)
            }
            TypedOp::HRandField { count, with_values } => {
                let all: Vec<(Vec<u8>, Answer)> = match exists {
                    true => self.all(txn, TABLE, &meta)?,
                    false => Vec::new(),
                }
                .into_iter()
                .map(|(field, value)| (field, Answer::bulk(value)))
                .collect();
                random_picks(&all, *count, *with_values)
            }
            _ => return Err(refused("ERR internal error: not a hash command")),
        };
        self.save(txn, batch, &found, &meta)?;
        Ok(answer)
    }
}

fn exists_in(
    target: &Target<'_>,
    txn: &WriteTxn,
    meta: &shoal_shared::layout::typed::TypeMeta,
    field: &[u8],
) -> Result<bool, OpError> {
    Ok(target.get(txn, TABLE, meta, field)?.is_some())
}

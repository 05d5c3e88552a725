//! Write-back: one LMDB write transaction kept open across group commits.
//!
//! Every LMDB commit copies the pages it changes, and while a checkpoint's pin holds
//! the last durable snapshot none of the pages freed since can be reused: each commit
//! writes its leaves, branches and counters to fresh pages, all of which reach the
//! disk at the next checkpoint (docs/performance.md, *What limits each figure*). With
//! write-back, a group commit is acknowledged once its record is in the journal (and
//! flushed, with `fsync` durability), as without it, but LMDB does not commit it: the
//! next group commit goes on in the same transaction, and the worker commits that
//! transaction only every `storage.writeback_ms` ([`Store::settle`]). A page changed
//! by many batches is then copied once.
//!
//! What stays true:
//! - The journal holds every acknowledged batch, in order, as a record of its own
//!   kind (`journal`, kind 3). An open that finds such records after the
//!   environment's journal position replays them, in the same boot as after a power
//!   failure.
//! - Until LMDB commits, only the worker sees the batches: the net-daemon reads a
//!   shard through its worker while the worker says it holds unsettled batches (the
//!   `unsettled` word of its status slot, set before the first batch of a window is
//!   acknowledged and cleared after LMDB commits). The word stays set if the worker
//!   dies, until its successor has replayed the journal.
//! - A batch that fails (its journal append, a full map, any LMDB error) aborts the
//!   whole transaction; the batches before it are made again in a new one from their
//!   records, kept in memory ([`Unsettled::records`]), and their segments are kept
//!   by every checkpoint until LMDB commits them.
//! - Checkpoints are taken only on what LMDB committed: a checkpoint settles first.
//!
//! Write-back is for a host that is not in a cluster: replication, handoff and the
//! cluster's read paths read LMDB's log and counters directly.

use std::time::Instant;

use heed::{Env, WithoutTls};

use super::journal::{ReplayError, WriteTxn};
use super::{Store, StoreError};

/// The write transaction kept open by write-back, with what it holds.
pub(crate) struct Unsettled {
    /// The transaction. Declared before `_env`, which it borrows: fields drop in order.
    pub(super) txn: WriteTxn<'static>,
    /// A handle on the environment that lives as long as the transaction (boxed, so
    /// that it does not move when this struct does).
    _env: Box<Env<WithoutTls>>,
    /// The changes of each acknowledged batch in the transaction, as journaled.
    pub(super) records: Vec<Vec<u8>>,
    /// Their bytes.
    pub(super) bytes: usize,
    /// When the first of them was acknowledged.
    pub(super) since: Option<Instant>,
    /// The journal segment the first of them went to.
    pub(super) segment: u64,
}

impl Unsettled {
    /// Begins a write transaction on `env`; `segment` is the journal's current one.
    pub(super) fn begin(env: &Env<WithoutTls>, segment: u64) -> heed::Result<Unsettled> {
        let env = Box::new(env.clone());
        // SAFETY: the transaction borrows the boxed environment, which does not move
        // when the box does, and is dropped after the transaction: the field order
        // drops `txn` first, and `into_records` and `commit` consume it before `_env`.
        let env_ref: &'static Env<WithoutTls> = unsafe { &*(env.as_ref() as *const _) };
        Ok(Unsettled {
            txn: WriteTxn::new(env_ref.write_txn()?),
            _env: env,
            records: Vec::new(),
            bytes: 0,
            since: None,
            segment,
        })
    }

    /// Aborts the transaction; returns the records of the acknowledged batches in it.
    pub(super) fn into_records(self) -> (Vec<Vec<u8>>, u64) {
        let Unsettled {
            txn,
            _env,
            records,
            segment,
            ..
        } = self;
        txn.abort();
        drop(_env);
        (records, segment)
    }

    /// Commits the transaction in LMDB. On an error it is aborted; its records are
    /// handed back.
    fn commit(self) -> Result<(), (heed::Error, Vec<Vec<u8>>, u64)> {
        let Unsettled {
            txn,
            _env,
            records,
            segment,
            ..
        } = self;
        let committed = txn.commit_journaled();
        drop(_env);
        committed.map_err(|error| (error, records, segment))
    }
}

/// What the batches write-back holds add up to.
pub struct Load {
    /// How long the oldest has waited.
    pub age: std::time::Duration,
    /// The bytes of their records.
    pub bytes: usize,
    /// Their changes: each puts or deletes a record, and dirties a page or two that
    /// LMDB keeps in memory until it commits.
    pub changes: usize,
}

impl Store {
    /// Keeps batches in one LMDB transaction until [`Store::settle`] (see
    /// `writeback`). Off by default, and while a store opens.
    pub fn set_write_back(&mut self, on: bool) -> Result<(), StoreError> {
        if !on {
            self.settle()?;
        }
        self.write_back = on;
        Ok(())
    }

    /// Whether acknowledged batches wait for LMDB's commit.
    pub fn is_unsettled(&self) -> bool {
        self.unsettled
            .as_ref()
            .is_some_and(|open| !open.records.is_empty())
    }

    /// How much write-back holds: how long the oldest unsettled batch has waited, and
    /// what they all add up to.
    pub fn unsettled_load(&self) -> Option<Load> {
        let open = self.unsettled.as_ref()?;
        Some(Load {
            age: open.since?.elapsed(),
            bytes: open.bytes,
            changes: open.txn.count(),
        })
    }

    /// Commits the transaction write-back keeps open, if any: LMDB then holds every
    /// acknowledged batch. A full map grows and the batches are made again. Any other
    /// error is fatal: the worker must stop, and the next open replays the journal.
    pub fn settle(&mut self) -> Result<(), StoreError> {
        while let Some(open) = self.unsettled.take() {
            if open.records.is_empty() {
                drop(open.into_records());
                return Ok(());
            }
            match open.commit() {
                Ok(()) => {
                    // The segments the batches were journaled in may go now.
                    self.checkpoints.keep_from = None;
                    return Ok(());
                }
                Err((heed::Error::Mdb(heed::MdbError::MapFull), records, segment)) => {
                    self.regrow(records, segment)?;
                }
                Err((error, _, _)) => return Err(error.into()),
            }
        }
        Ok(())
    }

    /// After the transaction holding `records` (journaled from `segment` on) was
    /// aborted for a full map: grows the map, keeping those segments, and makes the
    /// records again, even when the map is at its limit (the error is then returned
    /// after they are).
    pub(super) fn regrow(&mut self, records: Vec<Vec<u8>>, segment: u64) -> Result<(), StoreError> {
        if !records.is_empty() {
            self.checkpoints.keep_from = Some(segment);
        }
        let grown = self.grow_map();
        self.restore(records, segment)?;
        grown
    }

    /// Makes the acknowledged batches `records` again in a new transaction, which
    /// becomes the unsettled one (nothing to do without records). A full map grows.
    /// Failing, it returns [`StoreError::InDoubt`]: acknowledged batches are then only
    /// in the journal, and the worker must stop (the next open replays them).
    pub(super) fn restore(
        &mut self,
        records: Vec<Vec<u8>>,
        segment: u64,
    ) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let in_doubt = |error: &dyn std::fmt::Display| {
            StoreError::InDoubt(format!(
                "acknowledged batches could not be made again: {error}"
            ))
        };
        loop {
            let mut open = Unsettled::begin(&self.env, segment).map_err(|e| in_doubt(&e))?;
            let replayed = records
                .iter()
                .try_for_each(|changes| self.journal.replay_changes(changes, &mut open.txn));
            match replayed {
                Ok(()) => {
                    open.bytes = records.iter().map(Vec::len).sum();
                    open.records = records;
                    open.since = Some(Instant::now());
                    self.unsettled = Some(open);
                    return Ok(());
                }
                Err(ReplayError::Lmdb(heed::Error::Mdb(heed::MdbError::MapFull))) => {
                    drop(open.into_records());
                    self.checkpoints.keep_from = Some(segment);
                    self.grow_map().map_err(|e| in_doubt(&e))?;
                }
                Err(error) => return Err(in_doubt(&error)),
            }
        }
    }
}

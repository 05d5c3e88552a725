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
//! - Until LMDB commits, only the worker sees the batches: the net-daemon reads the
//!   keys they changed through the worker, which marks them in its pending-key index
//!   (`shoal_shared::pending`, from [`Store::take_touched`]) before it acknowledges a
//!   batch and clears them after LMDB commits. The marks stay set if the worker dies,
//!   until its successor has replayed the journal.
//! - A batch that fails (its journal append, a full map, any LMDB error) aborts the
//!   whole transaction; the batches before it are made again in a new one from their
//!   records, kept in memory ([`Held`]), and their segments are kept by every
//!   checkpoint until LMDB commits them.
//! - A commit that finds no room (the map at its limit, a full disk) makes the
//!   batches again and keeps them; writes are refused as full until a later try
//!   commits them, and reads go on through the worker.
//! - Any other failure to commit them, or to make them again, leaves them only in the
//!   journal: the store then refuses every write, settle and checkpoint
//!   ([`StoreError::InDoubt`]), the worker stops, and the next open replays them.
//! - Checkpoints are of what LMDB committed, and keep the segments of the batches
//!   it has not.
//!
//! Write-back is for a host that is not in a cluster: replication, handoff and the
//! cluster's read paths read LMDB's log and counters directly.

use std::sync::Arc;
use std::time::Instant;

use heed::{Env, WithoutTls};

use shoal_shared::frame::Collection;
use shoal_shared::{layout, pending};

use super::journal::{for_each_change, Change, ReplayError, WriteTxn};
use super::{Store, StoreError};

/// Acknowledged batches that LMDB has not committed: what makes them again.
#[derive(Default)]
pub(crate) struct Held {
    /// The changes of each batch, as journaled.
    records: Vec<Vec<u8>>,
    /// Their bytes.
    bytes: usize,
    /// When the first of them was acknowledged.
    since: Option<Instant>,
    /// The journal segment the first of them went to.
    pub(super) segment: u64,
}

impl Held {
    /// No batch yet; the first will go to journal segment `segment`.
    pub(super) fn new(segment: u64) -> Held {
        Held {
            segment,
            ..Held::default()
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// A write transaction that write-back keeps open, and the batches in it.
pub(crate) struct Unsettled {
    /// The transaction. Declared before `env`, which it borrows: fields drop in order,
    /// and the methods that consume the transaction do so before `env` goes.
    txn: WriteTxn<'static>,
    /// A handle on the environment that lives as long as the transaction. Behind an
    /// `Arc`, the environment does not move when this struct does.
    env: Arc<Env<WithoutTls>>,
    held: Held,
}

impl Unsettled {
    /// Begins a write transaction on `env` that will hold the batches `held` (none yet:
    /// the caller makes them again).
    pub(super) fn begin(env: &Env<WithoutTls>, held: Held) -> heed::Result<Unsettled> {
        let env = Arc::new(env.clone());
        // SAFETY: the transaction borrows the environment inside the `Arc`, which stays
        // where it is until the `Arc` is dropped, and that is only after the
        // transaction: `txn` drops first, and every method that takes it out of this
        // struct consumes it before dropping `env`.
        let env_ref: &'static Env<WithoutTls> = unsafe { &*Arc::as_ptr(&env) };
        Ok(Unsettled {
            txn: WriteTxn::new(env_ref.write_txn()?),
            env,
            held,
        })
    }

    /// The transaction, for the batch being applied.
    pub(super) fn txn(&mut self) -> &mut WriteTxn<'static> {
        &mut self.txn
    }

    /// `open`, holding no batch yet, with its first batch to go to `segment`.
    pub(super) fn rebase(mut open: Unsettled, segment: u64) -> Unsettled {
        open.held.segment = segment;
        open
    }

    /// Whether it holds acknowledged batches.
    pub(super) fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The journal segment of its first batch, if it holds any.
    pub(super) fn first_segment(&self) -> Option<u64> {
        (!self.is_empty()).then_some(self.held.segment)
    }

    /// Adds the batch just journaled (its `changes`).
    pub(super) fn push(&mut self, changes: Vec<u8>) {
        self.held.bytes += changes.len();
        self.held.records.push(changes);
        self.held.since.get_or_insert_with(Instant::now);
    }

    /// Aborts the transaction; returns the batches it held.
    pub(super) fn into_held(self) -> Held {
        let Unsettled { txn, env, held } = self;
        txn.abort();
        drop(env);
        held
    }

    /// Hands the transaction to `consume` (which commits or aborts it).
    pub(super) fn finish<R>(self, consume: impl FnOnce(WriteTxn<'static>) -> R) -> R {
        let Unsettled { txn, env, .. } = self;
        let result = consume(txn);
        drop(env);
        result
    }

    /// Commits the transaction in LMDB. On an error it is aborted, and the batches it
    /// held are handed back.
    fn commit(self) -> Result<(), (heed::Error, Held)> {
        let Unsettled { txn, env, held } = self;
        let committed = txn.commit_journaled();
        drop(env);
        committed.map_err(|error| (error, held))
    }
}

/// What the batches acknowledged since the worker last asked changed, for its
/// pending-key index (`shoal_shared::pending`; [`Store::take_touched`]).
#[derive(Debug, Default, PartialEq)]
pub struct Touched {
    /// The hashes ([`pending::key_hash`]) of the keys whose stored entry changed.
    pub keys: Vec<u64>,
    /// A change that reads of values depend on but that no key names: a transaction's
    /// record (its locks), a fence, a collection cleared.
    pub shard: bool,
}

/// Past this many keys the whole shard is marked instead.
const MAX_TOUCHED_KEYS: usize = 1 << 16;

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

    /// Whether write-back is on ([`Store::set_write_back`]).
    pub fn writes_back(&self) -> bool {
        self.write_back
    }

    /// Bytes free on the environment's filesystem, if they can be read.
    pub fn free_bytes(&self) -> Option<u64> {
        shoal_shared::lmdb::free_bytes(self.env.path())
    }

    /// Whether acknowledged batches wait for LMDB's commit.
    pub fn is_unsettled(&self) -> bool {
        self.unsettled.as_ref().is_some_and(|open| !open.is_empty())
    }

    /// Whether the last try to commit them found no room (writes are refused until a
    /// try succeeds).
    pub fn is_stalled(&self) -> bool {
        self.stalled.is_some()
    }

    /// The keys changed by the batches acknowledged since the last call (or since
    /// LMDB last committed them all).
    pub fn take_touched(&mut self) -> Touched {
        std::mem::take(&mut self.touched)
    }

    /// Adds the keys that the batch journaled as `changes` changed to
    /// [`Store::take_touched`]'s.
    pub(super) fn note_touched(&mut self, changes: &[u8]) {
        let touched = &mut self.touched;
        let collection_of = |table: u16| {
            self.collections
                .iter()
                .position(|collection| collection.id() == table)
        };
        let (txns, meta) = (self.txns.id(), self.meta.id());
        let parsed = for_each_change(changes, |change| -> std::io::Result<()> {
            match change {
                Change::Put { table, key, .. } | Change::Delete { table, key } => {
                    if let Some(collection) = collection_of(table) {
                        touched
                            .keys
                            .push(pending::key_hash(collection as Collection, &[key]));
                    } else if table == txns
                        || (table == meta && key.starts_with(layout::META_FENCE_PREFIX))
                    {
                        touched.shard = true;
                    }
                }
                Change::Range { table, .. } | Change::Clear { table } => {
                    if table == txns || table == meta || collection_of(table).is_some() {
                        touched.shard = true;
                    }
                }
            }
            Ok(())
        });
        if parsed.is_err() || touched.keys.len() > MAX_TOUCHED_KEYS {
            touched.shard = true;
            touched.keys = Vec::new();
        }
    }

    /// How much write-back holds.
    pub fn unsettled_load(&self) -> Option<Load> {
        let open = self.unsettled.as_ref()?;
        Some(Load {
            age: open.held.since?.elapsed(),
            bytes: open.held.bytes,
            changes: open.txn.count(),
        })
    }

    /// Commits the transaction write-back keeps open, if any: LMDB then holds every
    /// acknowledged batch. A full map grows and the batches are made again. When there
    /// is no room (the map at its limit, a full disk) the batches are kept, writes are
    /// refused, and the error is returned; the store stays usable. Any other error
    /// leaves the store failed (see `writeback`).
    pub fn settle(&mut self) -> Result<(), StoreError> {
        self.check_failed()?;
        while let Some(open) = self.unsettled.take() {
            if open.is_empty() {
                drop(open.into_held());
                break;
            }
            #[cfg(test)]
            let open = match std::mem::take(&mut self.fail_next_settle) {
                true => {
                    let held = open.into_held();
                    return Err(self.fail(held, &"an injected commit failure"));
                }
                false => open,
            };
            let error = match open.commit() {
                Ok(()) => {
                    // The segments the batches were journaled in may go now, and LMDB
                    // holds what they changed.
                    self.checkpoints.keep_from = None;
                    self.touched = Touched::default();
                    self.stalled = None;
                    return Ok(());
                }
                Err((heed::Error::Mdb(heed::MdbError::MapFull), held)) => match self.regrow(held) {
                    Ok(()) => continue,
                    Err(error) => error,
                },
                Err((error, held)) => {
                    let error = StoreError::from(error);
                    if error.is_out_of_room() {
                        self.restore(held)?;
                    } else {
                        return Err(self.fail(held, &error));
                    }
                    error
                }
            };
            if error.is_out_of_room() {
                tracing::warn!(%error, "no room to commit acknowledged writes; writes are refused until there is");
                self.stalled = Some(match error {
                    StoreError::Lmdb(heed::Error::Mdb(heed::MdbError::MapFull)) => Stall::FullMap,
                    _ => Stall::FullDisk,
                });
            }
            return Err(error);
        }
        Ok(())
    }

    /// After the transaction holding `held` was aborted for a full map: grows the map,
    /// keeping the batches' segments, and makes them again, even when the map is at its
    /// limit (the error is then returned after they are).
    pub(super) fn regrow(&mut self, held: Held) -> Result<(), StoreError> {
        if !held.is_empty() {
            self.checkpoints.keep_from = Some(held.segment);
        }
        let grown = self.grow_map();
        self.restore(held)?;
        grown
    }

    /// Makes the acknowledged batches `held` again in a new transaction, which becomes
    /// the unsettled one (nothing to do without batches). A full map grows. Failing,
    /// it leaves the store failed and returns [`StoreError::InDoubt`].
    pub(super) fn restore(&mut self, held: Held) -> Result<(), StoreError> {
        if held.is_empty() {
            return Ok(());
        }
        loop {
            let mut open = match Unsettled::begin(&self.env, Held::default()) {
                Ok(open) => open,
                Err(error) => return Err(self.fail(held, &error)),
            };
            let replayed = held
                .records
                .iter()
                .try_for_each(|changes| self.journal.replay_changes(changes, open.txn()));
            match replayed {
                Ok(()) => {
                    open.held = held;
                    self.unsettled = Some(open);
                    return Ok(());
                }
                Err(ReplayError::Lmdb(heed::Error::Mdb(heed::MdbError::MapFull))) => {
                    drop(open.into_held());
                    self.checkpoints.keep_from = Some(held.segment);
                    if let Err(error) = self.grow_map() {
                        return Err(self.fail(held, &error));
                    }
                }
                Err(error) => return Err(self.fail(held, &error)),
            }
        }
    }

    /// Acknowledged batches are lost from memory (only the journal has them): from now
    /// on the store refuses every write, settle and checkpoint, so that nothing goes
    /// past them, and keeps their segments.
    fn fail(&mut self, held: Held, cause: &dyn std::fmt::Display) -> StoreError {
        self.checkpoints.keep_from = Some(held.segment);
        let reason = format!(
            "acknowledged writes could not be committed ({cause}); they are in the journal, \
             and the shard's next start replays them"
        );
        tracing::error!("{reason}");
        self.failed = Some(reason.clone());
        StoreError::InDoubt(reason)
    }

    /// Refuses to go on after [`Store::fail`].
    pub(super) fn check_failed(&self) -> Result<(), StoreError> {
        match &self.failed {
            Some(reason) => Err(StoreError::InDoubt(reason.clone())),
            None => Ok(()),
        }
    }

    /// The error writes are refused with while the batches cannot be committed.
    pub(super) fn stall_error(&self) -> Option<StoreError> {
        Some(StoreError::Lmdb(match self.stalled? {
            Stall::FullMap => heed::Error::Mdb(heed::MdbError::MapFull),
            Stall::FullDisk => heed::Error::Io(std::io::Error::from_raw_os_error(libc::ENOSPC)),
        }))
    }
}

/// Why acknowledged batches could not be committed, and writes are refused.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Stall {
    FullMap,
    FullDisk,
}

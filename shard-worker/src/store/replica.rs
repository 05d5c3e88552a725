//! A partition's replication state in this shard: the primary term it promised to
//! follow, the log it must keep for its followers, the term history of its log, and
//! the requests that change them with the log (`PromiseTerm`, `HoldLog`, `OpenTerm`,
//! `Replicate`).
//!
//! The net-daemon's replication core decides; this module only stores, each change in
//! the same write transaction as the log entries it describes, so that after a crash
//! the history always matches the log. The state is the `"r"` entry of `meta`
//! (see `shoal_shared::layout`). It is read back by the net-daemon straight from the
//! map, and it is neither exported nor cleared with the partition's records: it is
//! this copy's promise, not its data.
//!
//! It never talks to another host and never checks the fence: replication writes go to
//! copies whose client access is fenced.

use crate::store::WriteTxn;
use shoal_shared::frame::{ChangeType, LogEntry, Partition, WorkerError, WorkerResponse};
use shoal_shared::layout::{self, ReplicaState, MAX_HISTORY_PAIRS};

use super::partitions::refused;
use super::{Batch, OpError, OpResult, Store};

impl Store {
    /// The partition's stored replication state (term 0 and no history when absent).
    pub(crate) fn replica_state(
        &self,
        txn: &WriteTxn,
        partition: Partition,
    ) -> Result<ReplicaState, OpError> {
        match self.meta.get(txn, &layout::replica_state_key(partition))? {
            Some(raw) => Ok(layout::decode_replica_state(raw)?),
            None => Ok(ReplicaState::default()),
        }
    }

    fn put_replica_state(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        partition: Partition,
        state: &ReplicaState,
    ) -> Result<(), OpError> {
        self.meta.put(
            txn,
            &layout::replica_state_key(partition),
            &layout::encode_replica_state(state),
        )?;
        batch.dirty = true;
        Ok(())
    }

    /// Applies `change` to the partition's replication state and stores it if `change`
    /// says it changed anything. → `Ok`.
    fn change_replica_state(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        partition: Partition,
        change: impl FnOnce(&mut ReplicaState) -> bool,
    ) -> OpResult {
        let mut state = self.replica_state(txn, partition)?;
        if change(&mut state) {
            self.put_replica_state(txn, batch, partition, &state)?;
        }
        Ok(WorkerResponse::Ok)
    }

    /// `PromiseTerm`: raises the promised term; a lower one changes nothing.
    pub(crate) fn promise_term(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        partition: Partition,
        term: u64,
    ) -> OpResult {
        // Other hosts rely on a new promise at once: it reaches the disk even with
        // `async` durability.
        let state = self.replica_state(txn, partition)?;
        batch.sync |= term > state.fenced_term;
        self.change_replica_state(txn, batch, partition, |state| {
            let raise = term > state.fenced_term;
            state.fenced_term = state.fenced_term.max(term);
            raise
        })?;
        // A term above the one this copy's log is open in ends that term here: client
        // requests are refused from this commit on (as moved: nothing is applied), until
        // a term opens again (`OpenTerm` lifts the fence).
        if state.history.last().is_none_or(|&(open, _)| term > open) {
            self.set_fence(txn, batch, partition, true)?;
        }
        Ok(WorkerResponse::Ok)
    }

    /// `HoldLog`: log retention keeps the partition's log from `from` on (0: no hold).
    pub(crate) fn hold_log(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        partition: Partition,
        from: u64,
    ) -> OpResult {
        self.change_replica_state(txn, batch, partition, |state| {
            let moved = state.log_hold_from != from;
            state.log_hold_from = from;
            moved
        })
    }

    /// `SetCopying`: the `"copy"` entry of the partition, present while a copy runs.
    pub(crate) fn set_copying(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        partition: Partition,
        copying: bool,
    ) -> OpResult {
        let key = layout::copy_key(partition);
        let changed = match copying {
            true => {
                let absent = self.meta.get(txn, &key)?.is_none();
                if absent {
                    self.meta.put(txn, &key, &[])?;
                }
                absent
            }
            false => self.meta.delete(txn, &key)?,
        };
        batch.dirty |= changed;
        Ok(WorkerResponse::Ok)
    }

    /// `OpenTerm`: the marker entry at the next commit id, `term` in the history from it
    /// on, and the partition's fence lifted.
    pub(crate) fn open_term(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        partition: Partition,
        term: u64,
    ) -> OpResult {
        let mut state = self.replica_state(txn, partition)?;
        if term < state.fenced_term {
            return Err(OpError::Refused(WorkerError::TermFenced {
                fenced: state.fenced_term,
            }));
        }
        if let Some(&(last_term, _)) = state.history.last() {
            if term < last_term {
                return Err(refused(format!(
                    "partition {partition}: term {term} is older than its log's term {last_term}"
                )));
            }
        }
        if state.history.len() >= MAX_HISTORY_PAIRS {
            return Err(refused(format!(
                "partition {partition}: its log already has {MAX_HISTORY_PAIRS} terms"
            )));
        }
        let commit_id = self.next_commit_id(txn, batch, partition)?;
        self.append_log(
            txn,
            batch,
            commit_id,
            ChangeType::Marker,
            0,
            &[],
            partition,
            None,
            &[],
        )?;
        // The new term, like a promise, reaches the disk even with `async` durability.
        batch.sync = true;
        state.fenced_term = term;
        if state
            .history
            .last()
            .is_none_or(|&(last_term, _)| last_term != term)
        {
            state.history.push((term, commit_id));
        }
        self.put_replica_state(txn, batch, partition, &state)?;
        // The primary of an open term serves its clients from the same commit on: a
        // request that the routing admits in the term never finds the copy still fenced
        // as a follower (a `Commit` would otherwise leave its ops for the copy's log).
        self.set_fence(txn, batch, partition, false)?;
        Ok(WorkerResponse::Integer(commit_id as i64))
    }

    /// `Replicate`: the primary's entries, then its history, in this transaction.
    pub(crate) fn replicate(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        partition: Partition,
        entries: &[LogEntry],
        history: &[(u64, u64)],
    ) -> OpResult {
        if entries.iter().any(|entry| entry.partition != partition) {
            return Err(refused(format!(
                "replicated entries for partition {partition} include another partition's"
            )));
        }
        let follow_on = entries
            .windows(2)
            .all(|pair| pair[1].commit_id == pair[0].commit_id + 1);
        let last = self.partition_meta(txn, batch, partition)?.last_commit_id;
        if !follow_on
            || entries
                .first()
                .is_some_and(|first| first.commit_id > last + 1)
        {
            return Err(refused(format!(
                "replicated entries for partition {partition} leave a gap after commit {last}"
            )));
        }
        // The history rarely changes (a new term): it is rewritten only when it did, and
        // its encoding is checked before anything is written.
        let mut state = self.replica_state(txn, partition)?;
        let new_history = state.history != history;
        if new_history {
            state.history = history.to_vec();
            layout::decode_replica_state(&layout::encode_replica_state(&state))?;
        }
        self.apply_log_in(txn, batch, entries)?;
        if new_history {
            self.put_replica_state(txn, batch, partition, &state)?;
        }
        let last = self.partition_meta(txn, batch, partition)?.last_commit_id;
        Ok(WorkerResponse::Integer(last as i64))
    }
}

//! Multi-key writes: one-worker atomic writes, and this worker's side of the
//! two-phase commit that the net-daemon coordinates across workers.
//!
//! - `Prepare` checks the ops against the current data, locks their keys and
//!   records the intent in `txns`, durably, in the group commit.
//! - `Commit` applies the ops and drops the intent. On the transaction's
//!   *decider* (one participant chosen by the coordinator), the commit also
//!   leaves a commit record in `txns`: that record is the durable decision. In a
//!   cluster the decider's first `Commit` records only the decision, and a second
//!   one applies its ops (see [`Store::commit`]).
//! - `Abort` drops a prepared intent.
//! - `Decide` answers, on the decider, whether a transaction committed. An
//!   undecided transaction older than the caller's limit is aborted first:
//!   presumed abort. No record means aborted.
//!
//! A record is the union of one *part* per partition it concerns (`Intent::part`).
//! When the decider is named by partition (in a cluster), every change of a part is
//! also a txn entry of that partition's log, in the same transaction
//! ([`Store::store_record`]), so that the partition's followers hold its prepared
//! intents and decisions ([`Store::apply_txn_entry`]) and a promoted follower carries
//! on. Requests change only the parts of partitions this worker serves: a fenced
//! partition's part belongs to its copy elsewhere and changes only through its log.
//! `InDoubt`, `Decided` and `Transactions` see only the parts of served partitions.
//!
//! Locks live in memory ([`Locks`]) and are rebuilt from `txns` at start: every op of
//! a record, on any copy, locks its key. They change only after the transaction that
//! records them commits.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::store::WriteTxn;
use shoal_shared::frame::{
    ChangeType, Collection, Key, LogEntry, Partition, TxAction, TxOp, TxOutcome, WorkerError,
    WorkerResponse, DECIDER_PARTITION,
};

use shoal_shared::layout::{self, decode_intent, replace_part, Intent, IntentState};

use super::keyspace::Current;
use super::{Batch, OpError, OpResult, Store, StoreError};

type LockKey = (Collection, Partition, Vec<u8>);

/// Keys locked by prepared transactions.
#[derive(Debug, Default)]
pub(crate) struct Locks {
    by_key: HashMap<LockKey, u64>,
    by_txid: HashMap<u64, Vec<LockKey>>,
}

/// A change to the locks, made once the transaction that records it commits: `txid`
/// locks exactly `keys` from then on (none: it holds no lock).
#[derive(Clone)]
pub(crate) struct LockChange {
    txid: u64,
    keys: Vec<LockKey>,
}

impl Locks {
    /// The transaction holding `key`, if any.
    pub(crate) fn holder(&self, collection: Collection, key: &Key) -> Option<u64> {
        if self.by_key.is_empty() {
            return None;
        }
        self.by_key
            .get(&(collection, key.partition, key.bytes.clone()))
            .copied()
    }

    /// Whether any key of `collection` (or of any collection, for `None`) is locked.
    pub(crate) fn any_in(&self, collection: Option<Collection>) -> bool {
        match collection {
            None => !self.by_key.is_empty(),
            Some(c) => self.by_key.keys().any(|(locked, _, _)| *locked == c),
        }
    }

    /// Whether a key of `partition` is locked, once `latest` (each transaction's keys as
    /// changed in the current write transaction) is applied.
    fn locks_in(&self, partition: Partition, latest: &HashMap<u64, &[LockKey]>) -> bool {
        self.by_key
            .iter()
            .any(|((_, p, _), txid)| *p == partition && !latest.contains_key(txid))
            || latest
                .values()
                .any(|keys| keys.iter().any(|(_, p, _)| *p == partition))
    }

    /// How many transactions hold locks.
    pub(crate) fn transactions(&self) -> usize {
        self.by_txid.len()
    }

    /// Whether no key is locked.
    pub(crate) fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub(crate) fn apply(&mut self, changes: Vec<LockChange>) {
        for LockChange { txid, keys } in changes {
            for key in self.by_txid.remove(&txid).unwrap_or_default() {
                if self.by_key.get(&key) == Some(&txid) {
                    self.by_key.remove(&key);
                }
            }
            if !keys.is_empty() {
                for key in &keys {
                    self.by_key.insert(key.clone(), txid);
                }
                self.by_txid.insert(txid, keys);
            }
        }
    }
}

fn lock_keys(ops: &[TxOp]) -> Vec<LockKey> {
    ops.iter()
        .map(|op| (op.collection, op.key.partition, op.key.bytes.clone()))
        .collect()
}

impl Store {
    /// Rebuilds the locks of every prepared transaction.
    pub(crate) fn load_locks(&self) -> Result<Locks, StoreError> {
        let txn = self.env.read_txn()?;
        let mut locks = Locks::default();
        let mut changes = Vec::new();
        for item in self.txns.iter(&txn)? {
            let (raw_id, raw) = item?;
            let txid = shoal_shared::layout::decode_u64(raw_id, "transaction id")?;
            let intent = decode_intent(raw).map_err(StoreError::Corrupt)?;
            if !intent.ops.is_empty() {
                changes.push(LockChange {
                    txid,
                    keys: lock_keys(&intent.ops),
                });
            }
        }
        if !changes.is_empty() {
            tracing::info!(
                transactions = changes.len(),
                "restored locks of prepared transactions"
            );
        }
        locks.apply(changes);
        Ok(locks)
    }

    fn intent(&self, txn: &WriteTxn, txid: u64) -> Result<Option<Intent>, OpError> {
        match self.txns.get(txn, &txid.to_be_bytes())? {
            Some(raw) => Ok(Some(decode_intent(raw)?)),
            None => Ok(None),
        }
    }

    /// Replaces `txid`'s record, `old` as this transaction read it, with `new` (`None`:
    /// removed), and locks exactly the keys of its ops. With `log`, and a decider named by
    /// partition, each partition's part that changed is logged as a txn entry of that
    /// partition. Replicated entries are stored without `log`: they are the log already.
    fn store_record(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        txid: u64,
        old: Option<&Intent>,
        new: Option<&Intent>,
        log: bool,
    ) -> Result<(), OpError> {
        match new {
            Some(record) => {
                self.txns.put(txn, &txid.to_be_bytes(), &encode(record)?)?;
            }
            None => {
                self.txns.delete(txn, &txid.to_be_bytes())?;
            }
        }
        batch.dirty = true;
        batch.lock_changes.push(LockChange {
            txid,
            keys: new.map(|record| lock_keys(&record.ops)).unwrap_or_default(),
        });
        let by_partition = old
            .or(new)
            .is_some_and(|record| record.decider_partition().is_some());
        if !log || !by_partition {
            return Ok(());
        }
        let mut partitions: Vec<Partition> = old.map(Intent::partitions).unwrap_or_default();
        partitions.extend(new.map(Intent::partitions).unwrap_or_default());
        partitions.sort_unstable();
        partitions.dedup();
        for partition in partitions {
            let part = new.and_then(|record| record.part(partition));
            if old.and_then(|record| record.part(partition)) == part {
                continue;
            }
            let data = match &part {
                Some(part) => encode(part)?,
                None => Vec::new(),
            };
            let commit_id = self.next_commit_id(txn, batch, partition)?;
            let key = txid.to_be_bytes();
            self.append_log(
                txn,
                batch,
                commit_id,
                ChangeType::Txn,
                0,
                &key,
                partition,
                None,
                &data,
            )?;
        }
        Ok(())
    }

    /// Checks a txn entry of a replicated or replayed log: its key is a transaction id and
    /// its data, if any, a part of its partition. Returns the id and the part.
    pub(crate) fn check_txn_entry(entry: &LogEntry) -> Result<(u64, Option<Intent>), OpError> {
        let txid = layout::decode_u64(&entry.key, "transaction id of a txn entry")?;
        if entry.data.is_empty() {
            return Ok((txid, None));
        }
        let part = decode_intent(&entry.data)?;
        if !part.is_part_of(entry.partition) {
            return Err(super::partitions::refused(format!(
                "txn entry {} of partition {} holds no part of that partition",
                entry.commit_id, entry.partition
            )));
        }
        Ok((txid, Some(part)))
    }

    /// Applies a txn entry of another copy's log: the partition's part of the record
    /// becomes the entry's, and the locks follow. The entry itself is logged by the caller.
    pub(crate) fn apply_txn_entry(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        entry: &LogEntry,
    ) -> Result<(), OpError> {
        let (txid, part) = Self::check_txn_entry(entry)?;
        self.set_part(txn, batch, txid, entry.partition, part)
    }

    /// Replaces `partition`'s part of `txid`'s record with `part`, without logging it.
    pub(crate) fn set_part(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        txid: u64,
        partition: Partition,
        part: Option<Intent>,
    ) -> Result<(), OpError> {
        let old = self.intent(txn, txid)?;
        let new = replace_part(old.clone(), partition, part);
        if old != new {
            self.store_record(txn, batch, txid, old.as_ref(), new.as_ref(), false)?;
        }
        Ok(())
    }

    /// Removes from every record the parts of the partitions `doomed` says yes to, without
    /// logging it (the partitions' copies are being cleared). Returns how many records changed.
    pub(crate) fn clear_parts(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        doomed: &dyn Fn(Partition) -> bool,
    ) -> Result<usize, OpError> {
        let mut changed = Vec::new();
        for item in self.txns.iter(txn)? {
            let (raw_id, raw) = item?;
            let txid = layout::decode_u64(raw_id, "transaction id")?;
            let record = decode_intent(raw)?;
            let partitions: Vec<Partition> = record
                .partitions()
                .into_iter()
                .filter(|&p| doomed(p))
                .collect();
            if !partitions.is_empty() {
                changed.push((txid, partitions));
            }
        }
        for (txid, partitions) in &changed {
            for &partition in partitions {
                self.set_part(txn, batch, *txid, partition, None)?;
            }
        }
        Ok(changed.len())
    }

    /// `ops` split into those of partitions this worker serves and those of fenced ones.
    fn split_served(&self, batch: &Batch, ops: &[TxOp]) -> (Vec<TxOp>, Vec<TxOp>) {
        ops.iter()
            .cloned()
            .partition(|op| !self.is_fenced(batch, op.key.partition))
    }

    /// Checks `ops` against the data as it is before any of them runs.
    fn check_ops(
        &self,
        txn: &WriteTxn,
        ops: &[TxOp],
        now_ms: u64,
    ) -> Result<Vec<TxOutcome>, OpError> {
        let mut outcomes = Vec::with_capacity(ops.len());
        let mut taken: Option<TxOutcome> = None;
        for op in ops {
            // What the key holds now, read only when the action depends on it: an
            // unconditional put (MSET's) writes whatever is there.
            let reads_current = !matches!(
                op.action,
                TxAction::Put {
                    if_absent: false,
                    ..
                } | TxAction::PutCollection {
                    if_absent: false,
                    ..
                } | TxAction::PutTaken { if_absent: false }
                    | TxAction::Expect { .. }
            );
            let db = self.db(op.collection)?;
            let current = match reads_current {
                true => self.current(txn, db, &op.key, now_ms)?,
                false => Current::default(),
            };
            // A typed key stored under another key must fit it: refused now, before
            // anything is written (a refusal while applying would come too late).
            let snapshot = match (&op.action, &taken) {
                (TxAction::PutCollection { snapshot, .. }, _)
                | (TxAction::PutTaken { .. }, Some(TxOutcome::Collection { snapshot, .. })) => {
                    Some(snapshot)
                }
                _ => None,
            };
            if let Some(snapshot) = snapshot {
                self.check_snapshot(&op.key, snapshot)?;
            }
            let outcome = match &op.action {
                TxAction::Put {
                    if_absent: true, ..
                }
                | TxAction::PutCollection {
                    if_absent: true, ..
                }
                | TxAction::PutTaken { if_absent: true }
                    if current.live.is_some() =>
                {
                    return Err(OpError::Refused(WorkerError::TxKeyExists));
                }
                TxAction::PutTaken { .. } if taken.is_none() => {
                    return Err(OpError::Refused(WorkerError::TxNoSuchKey))
                }
                TxAction::Put { .. }
                | TxAction::PutTaken { .. }
                | TxAction::PutCollection { .. } => TxOutcome::Done,
                TxAction::Delete => TxOutcome::Existed(current.live.is_some()),
                TxAction::Expect { commit_id } => {
                    if self.commit_id_of(txn, op.collection, &op.key, now_ms)? != *commit_id {
                        return Err(OpError::Refused(WorkerError::TxStale));
                    }
                    TxOutcome::Done
                }
                TxAction::Take | TxAction::Read => match current.live {
                    Some(live) => {
                        let outcome = self.taken_outcome(txn, &op.key, live)?;
                        taken = Some(outcome.clone());
                        outcome
                    }
                    None => return Err(OpError::Refused(WorkerError::TxNoSuchKey)),
                },
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// Applies checked `ops` in order; returns what each did.
    fn apply_ops(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        ops: &[TxOp],
    ) -> Result<Vec<TxOutcome>, OpError> {
        let mut outcomes = Vec::with_capacity(ops.len());
        let mut taken: Option<TxOutcome> = None;
        for op in ops {
            let db = self.db(op.collection)?;
            let current: Current = self.current(txn, db, &op.key, batch.now_ms)?;
            // The op's own action, not a copy of its value; a `PutTaken` becomes the put
            // of what the transaction took.
            let action = match (&op.action, &taken) {
                (TxAction::PutTaken { if_absent }, Some(outcome)) => outcome
                    .put(*if_absent)
                    .map_or(Cow::Borrowed(&op.action), Cow::Owned),
                (action, _) => Cow::Borrowed(action),
            };
            let outcome = match action.as_ref() {
                TxAction::PutTaken { .. } | TxAction::Expect { .. } => TxOutcome::Done,
                TxAction::Put {
                    value,
                    expires_at_ms,
                    ..
                } => {
                    self.put(
                        txn,
                        batch,
                        db,
                        op.collection,
                        &op.key,
                        &current,
                        value,
                        *expires_at_ms,
                    )?;
                    TxOutcome::Done
                }
                TxAction::PutCollection {
                    snapshot,
                    expires_at_ms,
                    ..
                } => {
                    self.write_snapshot(
                        txn,
                        batch,
                        db,
                        op.collection,
                        &op.key,
                        &current,
                        snapshot,
                        *expires_at_ms,
                    )?;
                    TxOutcome::Done
                }
                TxAction::Delete => TxOutcome::Existed(self.remove(
                    txn,
                    batch,
                    db,
                    op.collection,
                    &op.key,
                    &current,
                )?),
                TxAction::Take | TxAction::Read => {
                    let outcome = match current.live.clone() {
                        Some(live) => self.taken_outcome(txn, &op.key, live)?,
                        None => TxOutcome::Existed(false),
                    };
                    if matches!(op.action, TxAction::Take) {
                        self.remove(txn, batch, db, op.collection, &op.key, &current)?;
                    }
                    if !matches!(outcome, TxOutcome::Existed(_)) {
                        taken = Some(outcome.clone());
                    }
                    outcome
                }
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// What a `Take` or `Read` of a live key returns: its value, or a typed key's snapshot.
    fn taken_outcome(
        &self,
        txn: &WriteTxn,
        key: &shoal_shared::frame::Key,
        live: super::keyspace::Live,
    ) -> Result<TxOutcome, OpError> {
        Ok(match &live.typed {
            Some(meta) => TxOutcome::Collection {
                snapshot: self.snapshot(txn, key, meta)?,
                expires_at_ms: live.expires_at_ms,
            },
            None => TxOutcome::Value {
                value: live.value,
                expires_at_ms: live.expires_at_ms,
            },
        })
    }

    /// A multi-key write whose keys are all on this worker: check, then apply, in one transaction.
    pub(crate) fn atomic(&self, txn: &mut WriteTxn, batch: &mut Batch, ops: &[TxOp]) -> OpResult {
        self.check_ops(txn, ops, batch.now_ms)?;
        Ok(WorkerResponse::TxOutcomes(self.apply_ops(txn, batch, ops)?))
    }

    pub(crate) fn prepare(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        txid: u64,
        decider: u16,
        ops: &[TxOp],
    ) -> OpResult {
        // This worker may already hold parts of the transaction for partitions it follows
        // (replicated from their primaries): its own parts join them, in other partitions.
        let existing = self.intent(txn, txid)?;
        if let Some(existing) = &existing {
            let held = existing.partitions();
            if existing.decider != decider || ops.iter().any(|op| held.contains(&op.key.partition))
            {
                return Err(OpError::Refused(WorkerError::Storage(format!(
                    "transaction {txid} is already known"
                ))));
            }
        }
        if ops.iter().any(|op| {
            self.locks
                .holder(op.collection, &op.key)
                .is_some_and(|holder| holder != txid)
        }) {
            return Err(OpError::Refused(WorkerError::TxConflict));
        }
        let outcomes = self.check_ops(txn, ops, batch.now_ms)?;
        let intent = Intent {
            decider,
            created_ms: batch.now_ms,
            state: IntentState::Prepared,
            ops: ops.to_vec(),
        };
        let record = match &existing {
            None => intent,
            Some(existing) => intent
                .partitions()
                .into_iter()
                .try_fold(existing.clone(), |record, partition| {
                    replace_part(Some(record), partition, intent.part(partition))
                })
                .expect("a record with parts"),
        };
        self.store_record(txn, batch, txid, existing.as_ref(), Some(&record), true)?;
        Ok(WorkerResponse::TxOutcomes(outcomes))
    }

    /// `Commit`: applies the ops of the served partitions and drops their parts. Parts of
    /// fenced partitions stay for their copies.
    ///
    /// On the decider (its partition served here), the first commit of a prepared record
    /// records the decision. With a decider named by partition (in a cluster), that is all
    /// it does: the decision is one txn entry of the decider's partition, and no data of any
    /// partition may change before it is replicated, or a failover could keep the data and
    /// lose the decision. The next `Commit` applies the ops. A decider named by worker (one
    /// host) records the decision and applies its ops in one transaction.
    pub(crate) fn commit(&self, txn: &mut WriteTxn, batch: &mut Batch, txid: u64) -> OpResult {
        let Some(record) = self.intent(txn, txid)? else {
            return Err(OpError::Refused(WorkerError::TxAborted));
        };
        let decides_here = record.state == IntentState::Prepared
            && self.is_decider(&record)
            && record
                .decider_partition()
                .is_none_or(|decider| !self.is_fenced(batch, decider));
        if decides_here && record.decider_partition().is_some() {
            let decided = Intent {
                state: IntentState::Committed,
                ..record.clone()
            };
            self.store_record(txn, batch, txid, Some(&record), Some(&decided), true)?;
            return Ok(WorkerResponse::Ok);
        }
        let (served, kept) = self.split_served(batch, &record.ops);
        if served.is_empty() {
            return match record.state {
                IntentState::Committed => Ok(WorkerResponse::Ok),
                IntentState::Prepared => Err(moved(&kept)),
            };
        }
        self.apply_ops(txn, batch, &served)?;
        let committed = record.state == IntentState::Committed || decides_here;
        let new = Intent {
            state: match committed {
                true => IntentState::Committed,
                false => IntentState::Prepared,
            },
            ops: kept,
            ..record.clone()
        };
        let new = (committed || !new.ops.is_empty()).then_some(new);
        // After the data: a log cut short in between still holds the ops, which recovery
        // applies again.
        self.store_record(txn, batch, txid, Some(&record), new.as_ref(), true)?;
        Ok(WorkerResponse::Ok)
    }

    /// Drops the parts of the served partitions of a prepared record.
    fn drop_served(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        txid: u64,
        record: &Intent,
    ) -> Result<(), OpError> {
        let (served, kept) = self.split_served(batch, &record.ops);
        if served.is_empty() {
            return Err(moved(&kept));
        }
        let new = Intent {
            ops: kept,
            ..record.clone()
        };
        let new = (!new.ops.is_empty()).then_some(new);
        self.store_record(txn, batch, txid, Some(record), new.as_ref(), true)
    }

    pub(crate) fn abort(&self, txn: &mut WriteTxn, batch: &mut Batch, txid: u64) -> OpResult {
        match self.intent(txn, txid)? {
            None => Ok(WorkerResponse::Ok),
            Some(intent) if intent.state == IntentState::Committed => {
                Err(OpError::Refused(WorkerError::TxCommitted))
            }
            Some(intent) => {
                self.drop_served(txn, batch, txid, &intent)?;
                Ok(WorkerResponse::Ok)
            }
        }
    }

    pub(crate) fn decide(
        &self,
        txn: &mut WriteTxn,
        batch: &mut Batch,
        txid: u64,
        older_than_ms: u64,
    ) -> OpResult {
        match self.intent(txn, txid)? {
            None => Ok(WorkerResponse::Integer(0)),
            Some(intent) if intent.state == IntentState::Committed => {
                Ok(WorkerResponse::Integer(1))
            }
            Some(intent) if batch.now_ms.saturating_sub(intent.created_ms) < older_than_ms => {
                Err(OpError::Refused(WorkerError::TxInProgress))
            }
            Some(intent) => {
                // Only the decider's copy decides.
                if let Some(decider) = intent.decider_partition() {
                    if self.is_fenced(batch, decider) {
                        return Err(OpError::Refused(WorkerError::PartitionMoved {
                            partition: decider,
                        }));
                    }
                }
                tracing::warn!(
                    txid,
                    "transaction left undecided; aborting it (presumed abort)"
                );
                if intent
                    .ops
                    .iter()
                    .any(|op| !self.is_fenced(batch, op.key.partition))
                {
                    self.drop_served(txn, batch, txid, &intent)?;
                }
                Ok(WorkerResponse::Integer(0))
            }
        }
    }

    /// `InDoubt`: records with prepared ops in served partitions, older than `older_than_ms`.
    pub(crate) fn in_doubt(&self, txn: &WriteTxn, batch: &Batch, older_than_ms: u64) -> OpResult {
        self.records_where(txn, batch.now_ms, older_than_ms, |intent| {
            intent
                .ops
                .iter()
                .any(|op| !self.is_fenced(batch, op.key.partition))
        })
    }

    /// `Decided`: this worker's decision records older than `older_than_ms`, of deciders it
    /// serves.
    pub(crate) fn decided(&self, txn: &WriteTxn, batch: &Batch, older_than_ms: u64) -> OpResult {
        self.records_where(txn, batch.now_ms, older_than_ms, |intent| {
            intent.state == IntentState::Committed
                && intent
                    .decider_partition()
                    .is_none_or(|decider| !self.is_fenced(batch, decider))
        })
    }

    /// The transactions whose record `wanted` says yes to, older than `older_than_ms`, with
    /// their deciders.
    fn records_where(
        &self,
        txn: &WriteTxn,
        now_ms: u64,
        older_than_ms: u64,
        wanted: impl Fn(&Intent) -> bool,
    ) -> OpResult {
        let mut found = Vec::new();
        for item in self.txns.iter(txn)? {
            let (raw_id, raw) = item?;
            let txid = shoal_shared::layout::decode_u64(raw_id, "transaction id")?;
            let intent = decode_intent(raw)?;
            if wanted(&intent) && now_ms.saturating_sub(intent.created_ms) >= older_than_ms {
                found.push((txid, intent.decider));
            }
        }
        Ok(WorkerResponse::InDoubt(found))
    }

    /// `Forget`: drops the decision of a commit record; ops left to other copies stay.
    pub(crate) fn forget(&self, txn: &mut WriteTxn, batch: &mut Batch, txid: u64) -> OpResult {
        if let Some(intent) = self.intent(txn, txid)? {
            if intent.state == IntentState::Committed {
                if let Some(decider) = intent.decider_partition() {
                    if self.is_fenced(batch, decider) {
                        return Err(OpError::Refused(WorkerError::PartitionMoved {
                            partition: decider,
                        }));
                    }
                }
                let new = Intent {
                    state: IntentState::Prepared,
                    ..intent.clone()
                };
                let new = (!new.ops.is_empty()).then_some(new);
                self.store_record(txn, batch, txid, Some(&intent), new.as_ref(), true)?;
            }
        }
        Ok(WorkerResponse::Ok)
    }

    /// Whether a transaction record (a prepared intent, or a decider's commit record not yet
    /// forgotten) has ops in `partition`. A partition must not move while one does: the
    /// record would stay behind, and recovery would ask the new owner about it.
    pub(crate) fn partition_in_transactions(
        &self,
        txn: &WriteTxn,
        partition: Partition,
    ) -> Result<bool, OpError> {
        for item in self.txns.iter(txn)? {
            let (_, raw) = item?;
            let intent = decode_intent(raw)?;
            // A commit record keeps no ops; in a cluster it names its partition.
            let decided_here = intent.decider == DECIDER_PARTITION | partition;
            if decided_here || intent.ops.iter().any(|op| op.key.partition == partition) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Transactions still prepared here, in served partitions (decision records of
    /// committed ones are not counted).
    pub(crate) fn transactions(&self, txn: &WriteTxn, batch: &Batch) -> OpResult {
        let mut prepared = 0;
        for item in self.txns.iter(txn)? {
            let (_, raw) = item?;
            let intent = decode_intent(raw)?;
            let served = intent
                .ops
                .iter()
                .any(|op| !self.is_fenced(batch, op.key.partition));
            prepared += i64::from(served);
        }
        Ok(WorkerResponse::Integer(prepared))
    }

    /// Whether a prepared transaction locks keys of `partition`, counting the locks taken
    /// and released earlier in this transaction.
    pub(crate) fn partition_locked(&self, batch: &Batch, partition: Partition) -> bool {
        let latest: HashMap<u64, &[LockKey]> = batch
            .lock_changes
            .iter()
            .map(|change| (change.txid, change.keys.as_slice()))
            .collect();
        self.locks.locks_in(partition, &latest)
    }

    fn is_decider(&self, intent: &Intent) -> bool {
        if intent.decider & DECIDER_PARTITION != 0 {
            let partition = intent.decider & !DECIDER_PARTITION;
            intent.ops.iter().any(|op| op.key.partition == partition)
        } else {
            u32::from(intent.decider) == self.shard_id
        }
    }
}

/// A `txns` record's bytes.
fn encode(record: &Intent) -> Result<Vec<u8>, OpError> {
    layout::encode_intent(record)
        .map_err(|e| OpError::Refused(WorkerError::Storage(format!("cannot encode intent: {e}"))))
}

/// The refusal of a request whose parts are all of fenced partitions (`kept`): nothing
/// was applied, and the owner of the partition is to be asked.
fn moved(kept: &[TxOp]) -> OpError {
    match kept.first() {
        Some(op) => OpError::Refused(WorkerError::PartitionMoved {
            partition: op.key.partition,
        }),
        None => OpError::Refused(WorkerError::TxAborted),
    }
}

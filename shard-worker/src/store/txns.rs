//! Multi-key writes: one-worker atomic writes, and this worker's side of the
//! two-phase commit that the net-daemon coordinates across workers.
//!
//! - `Prepare` checks the ops against the current data, locks their keys and
//!   records the intent in `txns`, durably, in the group commit.
//! - `Commit` applies the ops and drops the intent. On the transaction's
//!   *decider* (one participant chosen by the coordinator), the commit also
//!   leaves a commit record in `txns`: that record is the durable decision.
//! - `Abort` drops a prepared intent.
//! - `Decide` answers, on the decider, whether a transaction committed. An
//!   undecided transaction older than the caller's limit is aborted first:
//!   presumed abort. No record means aborted.
//!
//! Locks live in memory ([`Locks`]) and are rebuilt from `txns` at start.
//! They change only after the transaction that records them commits.

use std::collections::HashMap;

use heed::RwTxn;
use shoal_shared::frame::{
    Collection, Key, Partition, TxAction, TxOp, TxOutcome, WorkerError, WorkerResponse,
    DECIDER_PARTITION,
};

use shoal_shared::layout::{self, decode_intent, Intent, IntentState};

use super::keyspace::Current;
use super::{Batch, OpError, OpResult, Store, StoreError};

type LockKey = (Collection, Partition, Vec<u8>);

/// Keys locked by prepared transactions.
#[derive(Debug, Default)]
pub(crate) struct Locks {
    by_key: HashMap<LockKey, u64>,
    by_txid: HashMap<u64, Vec<LockKey>>,
}

/// A change to the locks, made once the transaction that records it commits.
pub(crate) enum LockChange {
    Acquire { txid: u64, keys: Vec<LockKey> },
    Release { txid: u64 },
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

    /// Whether a key of `partition` is locked by a transaction not in `released`.
    fn locks_in(&self, partition: Partition, released: &[u64]) -> bool {
        self.by_key
            .iter()
            .any(|((_, p, _), txid)| *p == partition && !released.contains(txid))
    }

    /// Whether no key is locked.
    pub(crate) fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    pub(crate) fn apply(&mut self, changes: Vec<LockChange>) {
        for change in changes {
            match change {
                LockChange::Acquire { txid, keys } => {
                    for key in &keys {
                        self.by_key.insert(key.clone(), txid);
                    }
                    self.by_txid.entry(txid).or_default().extend(keys);
                }
                LockChange::Release { txid } => {
                    for key in self.by_txid.remove(&txid).unwrap_or_default() {
                        if self.by_key.get(&key) == Some(&txid) {
                            self.by_key.remove(&key);
                        }
                    }
                }
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
            if intent.state == IntentState::Prepared {
                changes.push(LockChange::Acquire {
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

    fn intent(&self, txn: &RwTxn, txid: u64) -> Result<Option<Intent>, OpError> {
        match self.txns.get(txn, &txid.to_be_bytes())? {
            Some(raw) => Ok(Some(decode_intent(raw)?)),
            None => Ok(None),
        }
    }

    fn put_intent(
        &self,
        txn: &mut RwTxn,
        batch: &mut Batch,
        txid: u64,
        intent: &Intent,
    ) -> Result<(), OpError> {
        let raw = layout::encode_intent(intent).map_err(|e| {
            OpError::Refused(WorkerError::Storage(format!("cannot encode intent: {e}")))
        })?;
        self.txns.put(txn, &txid.to_be_bytes(), &raw)?;
        batch.dirty = true;
        Ok(())
    }

    fn delete_intent(&self, txn: &mut RwTxn, batch: &mut Batch, txid: u64) -> Result<(), OpError> {
        self.txns.delete(txn, &txid.to_be_bytes())?;
        batch.dirty = true;
        Ok(())
    }

    /// Checks `ops` against the data as it is before any of them runs.
    fn check_ops(&self, txn: &RwTxn, ops: &[TxOp], now_ms: u64) -> Result<Vec<TxOutcome>, OpError> {
        let mut outcomes = Vec::with_capacity(ops.len());
        let mut taken = false;
        for op in ops {
            let current = self.current(txn, self.db(op.collection)?, &op.key, now_ms)?;
            let outcome = match &op.action {
                TxAction::Put {
                    if_absent: true, ..
                }
                | TxAction::PutTaken { if_absent: true }
                    if current.live.is_some() =>
                {
                    return Err(OpError::Refused(WorkerError::TxKeyExists));
                }
                TxAction::PutTaken { .. } if !taken => {
                    return Err(OpError::Refused(WorkerError::TxNoSuchKey))
                }
                TxAction::Put { .. } | TxAction::PutTaken { .. } => TxOutcome::Done,
                TxAction::Delete => TxOutcome::Existed(current.live.is_some()),
                TxAction::Take | TxAction::Read => match current.live {
                    Some(live) => {
                        taken = true;
                        TxOutcome::Value {
                            value: live.value,
                            expires_at_ms: live.expires_at_ms,
                        }
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
        txn: &mut RwTxn,
        batch: &mut Batch,
        ops: &[TxOp],
    ) -> Result<Vec<TxOutcome>, OpError> {
        let mut outcomes = Vec::with_capacity(ops.len());
        let mut taken: Option<(Vec<u8>, Option<u64>)> = None;
        for op in ops {
            let db = self.db(op.collection)?;
            let current: Current = self.current(txn, db, &op.key, batch.now_ms)?;
            let outcome = match &op.action {
                TxAction::Put { .. } | TxAction::PutTaken { .. } => {
                    let stored = match &op.action {
                        TxAction::Put {
                            value,
                            expires_at_ms,
                            ..
                        } => Some((value, *expires_at_ms)),
                        _ => taken
                            .as_ref()
                            .map(|(value, expires_at_ms)| (value, *expires_at_ms)),
                    };
                    if let Some((value, expires_at_ms)) = stored {
                        self.put(
                            txn,
                            batch,
                            db,
                            op.collection,
                            &op.key,
                            &current,
                            value,
                            expires_at_ms,
                        )?;
                    }
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
                    let live = current.live.clone();
                    if matches!(op.action, TxAction::Take) {
                        self.remove(txn, batch, db, op.collection, &op.key, &current)?;
                    }
                    match live {
                        Some(live) => {
                            taken = Some((live.value.clone(), live.expires_at_ms));
                            TxOutcome::Value {
                                value: live.value,
                                expires_at_ms: live.expires_at_ms,
                            }
                        }
                        None => TxOutcome::Existed(false),
                    }
                }
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// A multi-key write whose keys are all on this worker: check, then apply, in one transaction.
    pub(crate) fn atomic(&self, txn: &mut RwTxn, batch: &mut Batch, ops: &[TxOp]) -> OpResult {
        self.check_ops(txn, ops, batch.now_ms)?;
        Ok(WorkerResponse::TxOutcomes(self.apply_ops(txn, batch, ops)?))
    }

    pub(crate) fn prepare(
        &self,
        txn: &mut RwTxn,
        batch: &mut Batch,
        txid: u64,
        decider: u16,
        ops: &[TxOp],
    ) -> OpResult {
        if self.intent(txn, txid)?.is_some() {
            return Err(OpError::Refused(WorkerError::Storage(format!(
                "transaction {txid} is already known"
            ))));
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
        self.put_intent(txn, batch, txid, &intent)?;
        batch.lock_changes.push(LockChange::Acquire {
            txid,
            keys: lock_keys(ops),
        });
        Ok(WorkerResponse::TxOutcomes(outcomes))
    }

    pub(crate) fn commit(&self, txn: &mut RwTxn, batch: &mut Batch, txid: u64) -> OpResult {
        let Some(intent) = self.intent(txn, txid)? else {
            return Err(OpError::Refused(WorkerError::TxAborted));
        };
        if intent.state == IntentState::Committed {
            return Ok(WorkerResponse::Ok);
        }
        self.apply_ops(txn, batch, &intent.ops)?;
        if self.is_decider(&intent) {
            let record = Intent {
                state: IntentState::Committed,
                ops: Vec::new(),
                ..intent
            };
            self.put_intent(txn, batch, txid, &record)?;
        } else {
            self.delete_intent(txn, batch, txid)?;
        }
        batch.lock_changes.push(LockChange::Release { txid });
        Ok(WorkerResponse::Ok)
    }

    pub(crate) fn abort(&self, txn: &mut RwTxn, batch: &mut Batch, txid: u64) -> OpResult {
        match self.intent(txn, txid)? {
            None => Ok(WorkerResponse::Ok),
            Some(intent) if intent.state == IntentState::Committed => {
                Err(OpError::Refused(WorkerError::TxCommitted))
            }
            Some(_) => {
                self.delete_intent(txn, batch, txid)?;
                batch.lock_changes.push(LockChange::Release { txid });
                Ok(WorkerResponse::Ok)
            }
        }
    }

    pub(crate) fn decide(
        &self,
        txn: &mut RwTxn,
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
            Some(_) => {
                tracing::warn!(
                    txid,
                    "transaction left undecided; aborting it (presumed abort)"
                );
                self.delete_intent(txn, batch, txid)?;
                batch.lock_changes.push(LockChange::Release { txid });
                Ok(WorkerResponse::Integer(0))
            }
        }
    }

    pub(crate) fn in_doubt(&self, txn: &RwTxn, now_ms: u64, older_than_ms: u64) -> OpResult {
        self.records_in(txn, IntentState::Prepared, now_ms, older_than_ms)
    }

    /// `Decided`: this worker's decision records older than `older_than_ms`.
    pub(crate) fn decided(&self, txn: &RwTxn, now_ms: u64, older_than_ms: u64) -> OpResult {
        self.records_in(txn, IntentState::Committed, now_ms, older_than_ms)
    }

    /// The transactions recorded in `state`, older than `older_than_ms`, with their deciders.
    fn records_in(
        &self,
        txn: &RwTxn,
        state: IntentState,
        now_ms: u64,
        older_than_ms: u64,
    ) -> OpResult {
        let mut found = Vec::new();
        for item in self.txns.iter(txn)? {
            let (raw_id, raw) = item?;
            let txid = shoal_shared::layout::decode_u64(raw_id, "transaction id")?;
            let intent = decode_intent(raw)?;
            if intent.state == state && now_ms.saturating_sub(intent.created_ms) >= older_than_ms {
                found.push((txid, intent.decider));
            }
        }
        Ok(WorkerResponse::InDoubt(found))
    }

    pub(crate) fn forget(&self, txn: &mut RwTxn, batch: &mut Batch, txid: u64) -> OpResult {
        if let Some(intent) = self.intent(txn, txid)? {
            if intent.state == IntentState::Committed {
                self.delete_intent(txn, batch, txid)?;
            }
        }
        Ok(WorkerResponse::Ok)
    }

    /// Whether a transaction record (a prepared intent, or a decider's commit record not yet
    /// forgotten) has ops in `partition`. A partition must not move while one does: the
    /// record would stay behind, and recovery would ask the new owner about it.
    pub(crate) fn partition_in_transactions(
        &self,
        txn: &RwTxn,
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

    /// Transactions still prepared here (decision records of committed ones are not counted).
    pub(crate) fn transactions(&self, txn: &RwTxn) -> OpResult {
        let mut prepared = 0;
        for item in self.txns.iter(txn)? {
            let (_, raw) = item?;
            prepared += i64::from(decode_intent(raw)?.state == IntentState::Prepared);
        }
        Ok(WorkerResponse::Integer(prepared))
    }

    /// Whether a prepared transaction locks keys of `partition`, counting the locks taken
    /// and released earlier in this transaction.
    pub(crate) fn partition_locked(&self, batch: &Batch, partition: Partition) -> bool {
        let released: Vec<u64> = batch
            .lock_changes
            .iter()
            .filter_map(|change| match change {
                LockChange::Release { txid } => Some(*txid),
                LockChange::Acquire { .. } => None,
            })
            .collect();
        self.locks.locks_in(partition, &released)
            || batch.lock_changes.iter().any(|change| match change {
                LockChange::Acquire { txid, keys } => {
                    !released.contains(txid) && keys.iter().any(|(_, p, _)| *p == partition)
                }
                LockChange::Release { .. } => false,
            })
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

//! Atomic multi-key writes: the coordinator of the two-phase commit, and the
//! recovery of transactions left in doubt.
//!
//! Keys on one worker take the fast path: one `Atomic` request, one LMDB
//! transaction. Keys on several workers go through two-phase commit:
//! 1. `Prepare` on each participant (each checks its ops, locks the keys and
//!    records the intent durably). A participant that finds a key locked by
//!    another transaction answers `TxConflict`: everything is aborted and
//!    retried after a random backoff, so transactions never wait for each
//!    other and cannot deadlock.
//! 2. `Commit` on the *decider* (the first participant). Its commit applies its
//!    ops and durably records the decision: from then on the transaction is
//!    committed. Then `Commit` on the others, and `Forget` on the decider.
//!
//! If the coordinator dies, or a participant is unreachable, prepared intents
//! stay behind. [`recover`] runs in the background: it commits intents whose
//! decider recorded the commit, settles intents older than [`IN_DOUBT_AFTER`]
//! either way (`Decide`: presumed abort for an undecided transaction), and
//! forgets the decider's record once no participant holds the transaction.
//! Every phase has a timeout (the link's request timeout).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shoal_shared::frame::{
    TxAction, TxOp, TxOutcome, WorkerError, WorkerRequest, WorkerResponse, DECIDER_PARTITION,
};
use shoal_shared::resp::Reply;

use crate::commands::{ask, ask_dest, send, Dest};
use crate::errors;
use crate::Shared;

/// How long a transaction retries after lock conflicts before giving up.
const CONFLICT_DEADLINE: Duration = Duration::from_secs(3);
/// A prepared intent older than this is committed by recovery if its decider recorded the
/// commit (the coordinator is then presumed gone).
const DECIDED_AFTER: Duration = Duration::from_secs(1);
/// A prepared intent older than this is resolved by recovery either way.
pub const IN_DOUBT_AFTER: Duration = Duration::from_secs(5);
/// A decision record older than this, of a transaction no worker holds, is forgotten.
const ORPHANED_AFTER: Duration = Duration::from_secs(30);
/// How often recovery looks for transactions in doubt.
const RECOVERY_INTERVAL: Duration = Duration::from_secs(1);

/// The ops of one participant.
pub struct Participant {
    pub dest: Dest,
    pub ops: Vec<TxOp>,
}

/// The `decider` value of the participant at `dest`.
fn decider_of(dest: Dest) -> u16 {
    match dest {
        Dest::Worker(worker) => worker as u16,
        Dest::Partition { partition, .. } => DECIDER_PARTITION | partition,
    }
}

/// Where a recorded `decider` value is asked.
fn decider_dest(shared: &Shared, decider: u16) -> Dest {
    if decider & DECIDER_PARTITION != 0 {
        Dest::of_partition(shared, decider & !DECIDER_PARTITION)
    } else {
        Dest::Worker(usize::from(decider))
    }
}

/// Why a transaction did not commit.
pub enum TxFailure {
    /// A condition failed (a key exists, a key is missing); nothing was written.
    Refused(WorkerError),
    /// It could not run, or its outcome is unknown: the reply to give.
    Failed(Reply),
}

/// Runs `participants` atomically. Returns each participant's outcomes, in order.
pub async fn run(
    shared: &Shared,
    participants: Vec<Participant>,
) -> Result<Vec<Vec<TxOutcome>>, TxFailure> {
    if let [only] = participants.as_slice() {
        let request = WorkerRequest::Atomic {
            ops: only.ops.clone(),
        };
        return match send(shared, only.dest, request).await.wait().await {
            Ok(WorkerResponse::TxOutcomes(outcomes)) => Ok(vec![outcomes]),
            Ok(WorkerResponse::Error(
                error @ (WorkerError::TxKeyExists | WorkerError::TxNoSuchKey),
            )) => Err(TxFailure::Refused(error)),
            Ok(WorkerResponse::Error(error)) => {
                Err(TxFailure::Failed(errors::worker_error(&error)))
            }
            Ok(_) => Err(TxFailure::Failed(Reply::error(
                "ERR internal error: unexpected transaction response",
            ))),
            Err(error) => Err(TxFailure::Failed(errors::link_error(&error))),
        };
    }
    let mut tx = Transaction::new(shared);
    loop {
        for participant in &participants {
            let ops = fill_taken(&participant.ops, &tx.prepared);
            match tx.prepare(participant.dest, ops).await {
                Ok(()) => {}
                Err(PrepareError::Conflict) => break,
                Err(PrepareError::Failure(failure)) => {
                    tx.abort().await;
                    return Err(failure);
                }
            }
        }
        if tx.prepared.len() == participants.len() {
            return tx.commit().await;
        }
        tx.abort().await;
        tx = tx.retry().await?;
    }
}

/// Replaces `PutTaken` ops with a `Put` of the value that an earlier participant's `Take` or
/// `Read` found (RENAME and COPY across workers).
fn fill_taken(ops: &[TxOp], prepared: &[(Dest, Vec<TxOutcome>)]) -> Vec<TxOp> {
    let taken = prepared
        .iter()
        .flat_map(|(_, outcomes)| outcomes)
        .rev()
        .find_map(|outcome| match outcome {
            TxOutcome::Value {
                value,
                expires_at_ms,
            } => Some((value, *expires_at_ms)),
            _ => None,
        });
    ops.iter()
        .map(|op| match (&op.action, taken) {
            (TxAction::PutTaken { if_absent }, Some((value, expires_at_ms))) => TxOp {
                action: TxAction::Put {
                    value: value.clone(),
                    expires_at_ms,
                    if_absent: *if_absent,
                },
                ..op.clone()
            },
            _ => op.clone(),
        })
        .collect()
}

enum PrepareError {
    Conflict,
    Failure(TxFailure),
}

/// One attempt of a multi-worker transaction.
struct Transaction<'a> {
    shared: &'a Shared,
    txid: u64,
    decider: Option<u16>,
    /// Participants prepared so far, with their outcomes, in order.
    prepared: Vec<(Dest, Vec<TxOutcome>)>,
    started: Instant,
    attempt: u32,
}

impl<'a> Transaction<'a> {
    fn new(shared: &'a Shared) -> Transaction<'a> {
        Transaction {
            shared,
            txid: shared.next_txid(),
            decider: None,
            prepared: Vec::new(),
            started: Instant::now(),
            attempt: 0,
        }
    }

    /// Prepares `ops` at `dest`; the first participant prepared is the decider.
    async fn prepare(&mut self, dest: Dest, ops: Vec<TxOp>) -> Result<(), PrepareError> {
        let decider = *self.decider.get_or_insert(decider_of(dest));
        let request = WorkerRequest::Prepare {
            txid: self.txid,
            decider,
            ops,
        };
        match send(self.shared, dest, request).await.wait().await {
            Ok(WorkerResponse::TxOutcomes(outcomes)) => {
                self.prepared.push((dest, outcomes));
                Ok(())
            }
            Ok(WorkerResponse::Error(WorkerError::TxConflict)) => Err(PrepareError::Conflict),
            Ok(WorkerResponse::Error(
                error @ (WorkerError::TxKeyExists | WorkerError::TxNoSuchKey),
            )) => Err(PrepareError::Failure(TxFailure::Refused(error))),
            Ok(WorkerResponse::Error(error)) => Err(PrepareError::Failure(TxFailure::Failed(
                errors::worker_error(&error),
            ))),
            Ok(_) => Err(PrepareError::Failure(TxFailure::Failed(Reply::error(
                "ERR internal error: unexpected prepare response",
            )))),
            Err(error) => {
                // The prepare may have happened: abort it there too (recovery does it otherwise).
                self.prepared.push((dest, Vec::new()));
                Err(PrepareError::Failure(TxFailure::Failed(
                    errors::link_error(&error),
                )))
            }
        }
    }

    /// Releases every prepared participant (best effort; recovery aborts the rest).
    async fn abort(&mut self) {
        for (dest, _) in self.prepared.drain(..) {
            let _ = ask_dest(self.shared, dest, WorkerRequest::Abort { txid: self.txid }).await;
        }
    }

    /// A fresh attempt after a conflict, after a random backoff; fails past the deadline.
    async fn retry(self) -> Result<Transaction<'a>, TxFailure> {
        if self.started.elapsed() > CONFLICT_DEADLINE {
            return Err(TxFailure::Failed(Reply::error(
                "TRYAGAIN the keys stayed locked by other multi-key writes; nothing was written",
            )));
        }
        let attempt = self.attempt + 1;
        let ceiling_us = 200u64 << attempt.min(6);
        let jitter = self.shared.next_txid() % ceiling_us;
        tokio::time::sleep(Duration::from_micros(100 + jitter)).await;
        Ok(Transaction {
            shared: self.shared,
            txid: self.shared.next_txid(),
            decider: None,
            prepared: Vec::new(),
            started: self.started,
            attempt,
        })
    }

    /// Commits on the decider (the decision), then on the others, then forgets.
    async fn commit(mut self) -> Result<Vec<Vec<TxOutcome>>, TxFailure> {
        let decider = self.prepared[0].0;
        match ask_dest(
            self.shared,
            decider,
            WorkerRequest::Commit { txid: self.txid },
        )
        .await
        {
            Ok(_) => {}
            Err(reply) if reply == errors::worker_error(&WorkerError::TxAborted) => {
                self.prepared.remove(0);
                self.abort().await;
                return Err(TxFailure::Failed(Reply::error(
                    "TRYAGAIN the multi-key write took too long and was aborted; nothing was written",
                )));
            }
            Err(_) => {
                return Err(TxFailure::Failed(Reply::error(
                    "TRYAGAIN a worker failed while committing a multi-key write; it may or may not have been \
                     applied, and it will be applied everywhere or nowhere",
                )));
            }
        }
        let mut all_committed = true;
        for (dest, _) in &self.prepared[1..] {
            let answer = ask_dest(
                self.shared,
                *dest,
                WorkerRequest::Commit { txid: self.txid },
            )
            .await;
            // Once the decider has committed, nothing aborts a participant: "aborted" here
            // means recovery committed it first and dropped the intent.
            all_committed &= match answer {
                Ok(_) => true,
                Err(reply) => reply == errors::worker_error(&WorkerError::TxAborted),
            };
        }
        if all_committed {
            let _ = ask_dest(
                self.shared,
                decider,
                WorkerRequest::Forget { txid: self.txid },
            )
            .await;
        }
        Ok(self
            .prepared
            .into_iter()
            .map(|(_, outcomes)| outcomes)
            .collect())
    }
}

/// Resolves transactions left in doubt, forever (a background task of the net-daemon).
///
/// Each pass asks every worker for its prepared intents:
/// - an intent older than [`DECIDED_AFTER`] whose decider has recorded the commit is
///   committed at once, so a write acknowledged just before a crash is visible everywhere
///   soon after the restart;
/// - an intent older than [`IN_DOUBT_AFTER`] is settled either way (presumed abort when
///   its decider has no commit record).
///
/// The decider's commit record of a transaction that recovery committed is forgotten once
/// a later pass finds no worker still holding that transaction. Intents only disappear after
/// the decision, so a transaction no worker holds will never be asked about again.
pub async fn recover(shared: std::sync::Arc<Shared>) {
    let mut interval = tokio::time::interval(RECOVERY_INTERVAL);
    // Transactions recovery committed, with their decider: records to forget.
    let mut committed: HashMap<u64, u16> = HashMap::new();
    loop {
        interval.tick().await;
        if shared.shutting_down.load(Ordering::Acquire) {
            return;
        }
        let mut held = HashSet::new();
        let mut every_worker_answered = true;
        for worker in 0..shared.links.len() {
            let Some(prepared) = prepared_on(&shared, worker).await else {
                every_worker_answered = false;
                continue;
            };
            held.extend(prepared.all);
            for (txid, decider, old) in prepared.stale {
                if resolve(&shared, worker, txid, decider, old).await == Some(true) {
                    committed.insert(txid, decider);
                }
            }
        }
        // A decider's record may be forgotten only once no participant anywhere holds the
        // transaction: in a cluster, the other hosts' workers are asked too.
        if let Some(router) = &shared.router {
            let request = || WorkerRequest::InDoubt { older_than_ms: 0 };
            for call in router.send_to_other_hosts(request) {
                match call.wait().await {
                    Ok(WorkerResponse::InDoubt(found)) => {
                        held.extend(found.into_iter().map(|(txid, _)| txid))
                    }
                    _ => every_worker_answered = false,
                }
            }
        }
        if every_worker_answered {
            forget_settled(&shared, &mut committed, &held).await;
            forget_orphans(&shared, &held).await;
        }
    }
}

/// What one worker holds prepared.
struct Prepared {
    /// Every prepared transaction, of any age.
    all: Vec<u64>,
    /// Those older than [`DECIDED_AFTER`]: (txid, decider, older than [`IN_DOUBT_AFTER`]).
    stale: Vec<(u64, u16, bool)>,
}

/// The transactions prepared on `worker`; `None` if it did not answer.
async fn prepared_on(shared: &Shared, worker: usize) -> Option<Prepared> {
    if !shared.links[worker].is_connected() {
        return None;
    }
    let in_doubt = |older_than: Duration| async move {
        let request = WorkerRequest::InDoubt {
            older_than_ms: older_than.as_millis() as u64,
        };
        match ask(shared, worker, request).await {
            Ok(WorkerResponse::InDoubt(found)) => Some(found),
            _ => None,
        }
    };
    let all = in_doubt(Duration::ZERO).await?;
    let old: HashSet<u64> = in_doubt(IN_DOUBT_AFTER)
        .await?
        .into_iter()
        .map(|(txid, _)| txid)
        .collect();
    let stale = in_doubt(DECIDED_AFTER)
        .await?
        .into_iter()
        .map(|(txid, decider)| (txid, decider, old.contains(&txid)))
        .collect();
    Some(Prepared {
        all: all.into_iter().map(|(txid, _)| txid).collect(),
        stale,
    })
}

/// Settles one intent on `worker` to match its decider. Returns `Some(true)` if it was
/// committed, `Some(false)` if aborted, `None` if it was left alone.
async fn resolve(
    shared: &Shared,
    worker: usize,
    txid: u64,
    decider: u16,
    old: bool,
) -> Option<bool> {
    let decision = ask_dest(
        shared,
        decider_dest(shared, decider),
        WorkerRequest::Decide {
            txid,
            older_than_ms: IN_DOUBT_AFTER.as_millis() as u64,
        },
    )
    .await;
    let commit = match decision {
        Ok(WorkerResponse::Integer(1)) => true,
        // "Not committed" settles only an old intent: a recent one may belong to a
        // transaction whose coordinator is still preparing it.
        Ok(WorkerResponse::Integer(_)) if old => false,
        _ => return None,
    };
    tracing::info!(
        txid,
        worker,
        committed = commit,
        "resolving a transaction left in doubt"
    );
    let request = if commit {
        WorkerRequest::Commit { txid }
    } else {
        WorkerRequest::Abort { txid }
    };
    ask(shared, worker, request).await.ok().map(|_| commit)
}

/// Forgets this host's old decision records that no worker holds a transaction of: those
/// whose coordinator's `Forget` was lost. In a cluster such a record would keep its
/// partition from moving.
async fn forget_orphans(shared: &Shared, held: &HashSet<u64>) {
    for worker in 0..shared.links.len() {
        let request = WorkerRequest::Decided {
            older_than_ms: ORPHANED_AFTER.as_millis() as u64,
        };
        let Ok(WorkerResponse::InDoubt(decided)) = ask(shared, worker, request).await else {
            continue;
        };
        for (txid, _) in decided.into_iter().filter(|(txid, _)| !held.contains(txid)) {
            tracing::info!(txid, worker, "forgetting a settled decision record");
            let _ = ask(shared, worker, WorkerRequest::Forget { txid }).await;
        }
    }
}

/// Forgets the decider records of committed transactions that no worker holds any more.
async fn forget_settled(shared: &Shared, committed: &mut HashMap<u64, u16>, held: &HashSet<u64>) {
    let settled: Vec<(u64, u16)> = committed
        .iter()
        .filter(|(txid, _)| !held.contains(txid))
        .map(|(&txid, &decider)| (txid, decider))
        .collect();
    for (txid, decider) in settled {
        if ask_dest(
            shared,
            decider_dest(shared, decider),
            WorkerRequest::Forget { txid },
        )
        .await
        .is_ok()
        {
            committed.remove(&txid);
        }
    }
}

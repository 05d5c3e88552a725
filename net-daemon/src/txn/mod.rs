//! Atomic multi-key writes: the coordinator of the two-phase commit, and the
//! recovery of transactions left in doubt.
//!
//! Keys on one worker take the fast path: one `Atomic` request, one LMDB
//! transaction. Keys on several workers go through two-phase commit:
//! 1. `Prepare` on each participant (each checks its ops, locks the keys and
//!    records the intent durably): all at once on a first attempt whose
//!    participants are independent, else one after the other. A participant that finds a key locked by
//!    another transaction answers `TxConflict`: everything is aborted and
//!    retried after a random backoff, so transactions never wait for each
//!    other and cannot deadlock.
//! 2. `Commit` on the *decider* (the first participant). Its commit applies its
//!    ops and durably records the decision: from then on the transaction is
//!    committed. Then `Commit` on the others; once they have answered, the
//!    client is answered, while `Forget` tidies the decider's record away. On a
//!    host on its own, the others' commits are queued on their workers' links
//!    and the client is answered at once: anything sent after the reply queues
//!    behind them. `Forget` follows once they have answered.
//!
//! If the coordinator dies, or a participant is unreachable, prepared intents
//! stay behind. [`recover`] runs in the background: it commits intents whose
//! decider recorded the commit, settles intents older than `IN_DOUBT_AFTER`
//! either way (`Decide`: presumed abort for an undecided transaction), and
//! forgets the decider's record once no participant holds the transaction.
//! Every phase has a timeout (the link's request timeout).
//!
//! The protocol lives in two cores without I/O, each stepped through
//! `handle(event, now)`, `poll_action()` and `next_deadline()`:
//! - `coordinator`: one transaction, from its first request to its outcome;
//! - `recovery`: the passes of recovery, and what they remember.
//!
//! This module is their thin shell: it sends the cores' requests to the workers
//! (or, in a cluster, to the partitions' owners), feeds the answers back, sleeps
//! until their deadlines, and turns a failed transaction into the client's reply.
//! It decides nothing about the protocol itself.

mod coordinator;
mod recovery;

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use shoal_shared::frame::{Partition, TxOp, TxOutcome, WorkerError, DECIDER_PARTITION};
use shoal_shared::resp::Reply;

use crate::dispatch::{Dest, Dispatch};
use crate::errors;
use crate::workers::LinkError;

use coordinator::{Address, Coordinator, Failure};
use recovery::{Recovery, Target};

/// The ops of one participant.
pub struct Participant {
    /// Where its requests go.
    pub dest: Dest,
    /// Its ops, in the order they apply.
    pub ops: Vec<TxOp>,
}

/// A participant's `decider` value: its worker, or, in a cluster, its partition.
impl Address for Dest {
    fn decider(self) -> u16 {
        match self {
            Dest::Worker(worker) => worker as u16,
            Dest::Partition { partition, .. } => DECIDER_PARTITION | partition,
        }
    }

    /// A local worker's link is one queue; a partition's owner may be reached by several
    /// paths (another host, a replication pipeline), so its order is not promised.
    fn ordered(self) -> bool {
        matches!(self, Dest::Worker(_))
    }
}

/// Where a recorded `decider` value is asked.
fn decider_dest(dispatch: &Dispatch, decider: u16) -> Dest {
    if decider & DECIDER_PARTITION != 0 {
        dispatch.of_partition(decider & !DECIDER_PARTITION)
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

impl From<Failure<LinkError>> for TxFailure {
    fn from(failure: Failure<LinkError>) -> TxFailure {
        let reply = match failure {
            Failure::Refused(error) => return TxFailure::Refused(error),
            Failure::Worker(error) => errors::worker_error(&error),
            Failure::Link(error) => errors::link_error(&error),
            Failure::UnexpectedAtomicResponse => {
                Reply::error("ERR internal error: unexpected transaction response")
            }
            Failure::UnexpectedPrepareResponse => {
                Reply::error("ERR internal error: unexpected prepare response")
            }
            Failure::KeptConflicting => Reply::error(
                "TRYAGAIN the keys stayed locked by other multi-key writes; nothing was written",
            ),
            Failure::AbortedByDecider => Reply::error(
                "TRYAGAIN the multi-key write took too long and was aborted; nothing was written",
            ),
            Failure::OutcomeUnknown => Reply::error(
                "TRYAGAIN a worker failed while committing a multi-key write; it may or may not have been \
                 applied, and it will be applied everywhere or nowhere",
            ),
        };
        TxFailure::Failed(reply)
    }
}

/// Transaction ids, unique across restarts of the daemon: the start time in the high
/// bits, a counter below.
pub struct TxIds(AtomicU64);

impl TxIds {
    /// The ids of a daemon that starts now.
    pub fn new() -> TxIds {
        TxIds(AtomicU64::new(shoal_shared::now_ms() << 20))
    }

    /// A fresh transaction id.
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

impl Default for TxIds {
    fn default() -> TxIds {
        TxIds::new()
    }
}

/// Feeds the answers of the commits that went out with an early outcome to `coordinator`,
/// then sends what it asks for (the decider's `Forget`).
async fn tidy_after_outcome(
    dispatch: Arc<Dispatch>,
    mut coordinator: Coordinator<Dest, LinkError>,
    calls: Vec<(Dest, crate::workers::Call)>,
) {
    for (to, call) in calls {
        let answer = call.wait().await;
        let answered = coordinator::Event::Answer { from: to, answer };
        coordinator.handle(answered, Instant::now());
    }
    while let Some(action) = coordinator.poll_action() {
        match action {
            coordinator::Action::Tidy { to, request } => drop(dispatch.send(to, request).await),
            other => tracing::error!(?other, "a transaction asked for more after its outcome"),
        }
    }
}

/// Splits a participant whose ops touch several partitions with followers into one
/// participant per partition (at `dest_of` it), keeping the order of the ops and of the
/// participants. One `Atomic` over several replicated partitions would log each
/// partition's entries on their own, and a failover could keep some of them only; as
/// separate participants, each partition's log carries its prepared part, and the
/// decider's the decision, before any data changes.
fn per_replicated_partition(
    participants: Vec<Participant>,
    is_replicated: impl Fn(Partition) -> bool,
    dest_of: impl Fn(Partition) -> Dest,
) -> Vec<Participant> {
    let mut split = Vec::with_capacity(participants.len());
    for participant in participants {
        let mut partitions: Vec<Partition> =
            participant.ops.iter().map(|op| op.key.partition).collect();
        partitions.sort_unstable();
        partitions.dedup();
        if partitions.len() < 2 || !partitions.iter().any(|&p| is_replicated(p)) {
            split.push(participant);
            continue;
        }
        let mut parts: Vec<Participant> = Vec::new();
        for op in participant.ops {
            let partition = op.key.partition;
            match parts
                .iter_mut()
                .find(|part| part.ops[0].key.partition == partition)
            {
                Some(part) => part.ops.push(op),
                None => parts.push(Participant {
                    dest: dest_of(partition),
                    ops: vec![op],
                }),
            }
        }
        split.extend(parts);
    }
    split
}

/// Runs `participants` atomically, with ids from `txids`. Returns the outcomes of each
/// participant run, in order: in a cluster, a participant over several replicated
/// partitions runs as one per partition ([`per_replicated_partition`]).
pub async fn run(
    dispatch: &Arc<Dispatch>,
    txids: &TxIds,
    participants: Vec<Participant>,
) -> Result<Vec<Vec<TxOutcome>>, TxFailure> {
    let participants = match &dispatch.router {
        Some(router) => per_replicated_partition(
            participants,
            |p| router.is_replicated(p),
            |p| dispatch.of_partition(p),
        ),
        None => participants,
    };
    let participants = participants
        .into_iter()
        .map(|participant| (participant.dest, participant.ops))
        .collect();
    let txid = txids.next();
    // The backoffs' jitter: random per process, distinct per transaction.
    let seed = RandomState::new().hash_one(txid);
    let mut coordinator = Coordinator::new(participants, txid, seed, Instant::now());
    loop {
        // Everything the core asks for goes out before any answer is awaited: the
        // prepares of a first attempt are in flight together.
        let mut calls = Vec::new();
        while let Some(action) = coordinator.poll_action() {
            match action {
                coordinator::Action::Send { to, request } => {
                    calls.push((to, dispatch.send(to, request).await));
                }
                coordinator::Action::Tidy { to, request } => {
                    // Queued on the link; the answer is not awaited.
                    drop(dispatch.send(to, request).await);
                }
                coordinator::Action::Finished(result) => {
                    if !calls.is_empty() {
                        // An early outcome: the commits queued with it are answered later.
                        tokio::spawn(tidy_after_outcome(Arc::clone(dispatch), coordinator, calls));
                    }
                    return result.map_err(TxFailure::from);
                }
            }
        }
        if !calls.is_empty() {
            for (to, call) in calls {
                let answer = call.wait().await;
                let answered = coordinator::Event::Answer { from: to, answer };
                coordinator.handle(answered, Instant::now());
            }
            continue;
        }
        let Some(deadline) = coordinator.next_deadline() else {
            return Err(TxFailure::Failed(Reply::error(
                "ERR internal error: the multi-key write stalled",
            )));
        };
        tokio::time::sleep_until(deadline.into()).await;
        let fresh_txid = txids.next();
        coordinator.handle(coordinator::Event::Timeout { fresh_txid }, Instant::now());
    }
}

/// Resolves transactions left in doubt, forever (a background task of the net-daemon).
///
/// Each pass asks every worker for its prepared intents:
/// - an intent older than `DECIDED_AFTER` whose decider has recorded the commit is
///   committed at once, so a write acknowledged just before a crash is visible everywhere
///   soon after the restart;
/// - an intent older than `IN_DOUBT_AFTER` is settled either way (presumed abort when
///   its decider has no commit record).
///
/// The decider's commit record of a transaction that recovery committed is forgotten once
/// a later pass finds no worker still holding that transaction (in a cluster, the workers
/// of the other hosts that lead partitions are asked too: a follower's intents are its
/// primary's, replicated, so a host that died and whose partitions failed over holds
/// nothing to wait for), and so are records older than `ORPHANED_AFTER` that no worker
/// holds.
/// It stops once `shutting_down` is set.
pub async fn recover(dispatch: Arc<Dispatch>, shutting_down: Arc<AtomicBool>) {
    let cluster = dispatch.router.is_some();
    let mut recovery = Recovery::new(dispatch.links.len(), cluster, Instant::now());
    loop {
        if let Some(deadline) = recovery.next_deadline() {
            tokio::time::sleep_until(deadline.into()).await;
        }
        if shutting_down.load(Ordering::Acquire) {
            return;
        }
        recovery.handle(recovery::Event::Timeout, Instant::now());
        while let Some(action) = recovery.poll_action() {
            let event = match action {
                recovery::Action::Send { to, request } => {
                    let call = match (to, &dispatch.router) {
                        // In a cluster, what recovery changes on a local worker is
                        // answered once replicated.
                        (Target::Worker(worker), Some(router)) => router.local(worker, request),
                        (Target::Worker(worker), None) => {
                            dispatch.send(Dest::Worker(worker), request).await
                        }
                        (Target::Decider(decider), _) => {
                            dispatch
                                .send(decider_dest(&dispatch, decider), request)
                                .await
                        }
                    };
                    let answer = call.wait().await.ok();
                    recovery::Event::Answer { from: to, answer }
                }
                recovery::Action::SendToOtherHosts { request } => {
                    let calls = match &dispatch.router {
                        Some(router) => router.send_to_other_owners(|| request.clone()),
                        None => Vec::new(),
                    };
                    let mut answers = Vec::with_capacity(calls.len());
                    for call in calls {
                        answers.push(call.wait().await.ok());
                    }
                    recovery::Event::OtherHostsAnswered(answers)
                }
            };
            recovery.handle(event, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use shoal_shared::frame::{Key, TxAction};

    use super::*;

    fn op(partition: Partition, key: &str) -> TxOp {
        TxOp {
            collection: 0,
            key: Key {
                partition,
                bytes: key.as_bytes().to_vec(),
            },
            action: TxAction::Delete,
        }
    }

    fn dest(partition: Partition) -> Dest {
        Dest::Partition {
            partition,
            group: (1, 0),
        }
    }

    /// Each participant's partition (by its dest) and the keys of its ops.
    fn shape(participants: &[Participant]) -> Vec<(Partition, Vec<String>)> {
        participants
            .iter()
            .map(|p| {
                let Dest::Partition { partition, .. } = p.dest else {
                    panic!("a worker dest")
                };
                let keys = p
                    .ops
                    .iter()
                    .map(|op| String::from_utf8_lossy(&op.key.bytes).into_owned())
                    .collect();
                (partition, keys)
            })
            .collect()
    }

    #[test]
    fn a_participant_over_several_replicated_partitions_runs_as_one_per_partition() {
        let participants = vec![
            Participant {
                dest: dest(1),
                ops: vec![op(1, "a"), op(2, "b"), op(1, "c"), op(2, "b")],
            },
            Participant {
                dest: dest(3),
                ops: vec![op(3, "d")],
            },
        ];
        let split = per_replicated_partition(participants, |_| true, dest);
        assert_eq!(
            shape(&split),
            vec![
                (1, vec!["a".into(), "c".into()]),
                (2, vec!["b".into(), "b".into()]),
                (3, vec!["d".into()]),
            ]
        );
        // Without followers, one worker's ops stay one participant (one `Atomic`).
        let participants = vec![Participant {
            dest: dest(1),
            ops: vec![op(1, "a"), op(2, "b")],
        }];
        let kept = per_replicated_partition(participants, |_| false, dest);
        assert_eq!(shape(&kept), vec![(1, vec!["a".into(), "b".into()])]);
    }
}

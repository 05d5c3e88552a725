//! The coordinator of one atomic multi-key write, as a state machine without I/O.
//!
//! It owns the order of the requests of one transaction: the fast path (one participant,
//! one `Atomic`), or two-phase commit (`Prepare` on every participant at once on the
//! first attempt when no participant's ops take a value from another's, else on each
//! participant in order, and in order on every retry after a conflict; `Commit` on
//! the decider, `Commit` on the others, then the outcome, with the decider's `Forget` sent
//! beside it and not waited for), the aborts and the
//! retries after lock conflicts, and the outcome. When every other participant is behind an
//! ordered queue (a local worker's link), the outcome goes out once the decider has
//! committed, right after the others' commits are queued: whatever the client sends next is
//! queued behind them, and the `Forget` follows once they have answered. A decider named by partition (in a
//! cluster) gets a second `Commit` right after the first: the first only records the
//! decision, which must be replicated before any data changes, and the second applies
//! the decider's ops.
//!
//! It talks to nobody. [`Coordinator::poll_action`] yields the requests to send and, last,
//! the outcome (or, after an early outcome, the `Forget`); [`Coordinator::handle`] takes each answer, and the end of the backoff
//! before a retry; [`Coordinator::next_deadline`] says when that backoff ends. At most one
//! request is in flight, except the prepares of a first attempt, which go out together and
//! whose answers are all taken before anything else is sent, and the commits that go out
//! with an early outcome. Time comes in as `now`,
//! fresh transaction ids with [`Event::Timeout`], and the jitter from a seed.
//!
//! It must never read a clock, sleep, spawn, or know how an address is reached: the shell
//! ([`super::run`]) does that.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::time::{Duration, Instant};

use shoal_shared::frame::{
    TxAction, TxOp, TxOutcome, WorkerError, WorkerRequest, WorkerResponse, DECIDER_PARTITION,
};

/// How long a transaction retries after lock conflicts before giving up.
pub(crate) const CONFLICT_DEADLINE: Duration = Duration::from_secs(3);
/// The shortest backoff before a retry; a random jitter is added to it.
const BACKOFF_MIN: Duration = Duration::from_micros(100);
/// The jitter of the first retry is below this many µs; it doubles with each retry.
const JITTER_CEILING_FIRST_US: u64 = 200;
/// The jitter ceiling stops doubling after this many retries.
const JITTER_DOUBLINGS_MAX: u32 = 6;

/// The address of a participant, as the coordinator sees it: the shell maps it to where
/// requests go.
pub(crate) trait Address: Copy + Eq + Debug {
    /// The `decider` value of a `Prepare` whose decider is this participant.
    fn decider(self) -> u16;
    /// Whether every request that anyone on this host sends to this participant later is
    /// applied after one sent now (a local worker's link is one queue, applied in order).
    fn ordered(self) -> bool;
}

/// What happened, for [`Coordinator::handle`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event<D, E> {
    /// The answer to the last [`Action::Send`], sent to `from`: the worker's response, or
    /// `Err` if the link failed (the request may or may not have been applied).
    Answer {
        from: D,
        answer: Result<WorkerResponse, E>,
    },
    /// The [`Coordinator::next_deadline`] has passed. `fresh_txid` is an unused
    /// transaction id, for the retry that follows the backoff.
    Timeout { fresh_txid: u64 },
}

/// What to do next, from [`Coordinator::poll_action`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action<D, E> {
    /// Send `request` (`Atomic`, `Prepare`, `Commit` or `Abort`) to `to`, then report its
    /// answer with [`Event::Answer`].
    Send { to: D, request: WorkerRequest },
    /// Send `request` (the decider's `Forget`) to `to`, and go on without its answer: it
    /// only tidies up, and recovery does it if it is lost. The outcome follows at once.
    Tidy { to: D, request: WorkerRequest },
    /// The transaction's outcome: each participant's outcomes in order, or why it did not
    /// commit. Nothing follows, except after an outcome given early (the other participants'
    /// commits are in flight): then a `Tidy` may follow once their answers are handled.
    Finished(Result<Vec<Vec<TxOutcome>>, Failure<E>>),
}

/// Why a transaction did not commit.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Failure<E> {
    /// A condition failed (`TxKeyExists`, `TxNoSuchKey`); nothing was written.
    Refused(WorkerError),
    /// A participant failed the `Atomic` or `Prepare` with this error; nothing was written.
    Worker(WorkerError),
    /// The link to a participant failed during the `Atomic` or a `Prepare`.
    Link(E),
    /// The `Atomic` got an answer of the wrong kind.
    UnexpectedAtomicResponse,
    /// A `Prepare` got an answer of the wrong kind; nothing was written.
    UnexpectedPrepareResponse,
    /// The keys stayed locked by other transactions until [`CONFLICT_DEADLINE`]; nothing was
    /// written.
    KeptConflicting,
    /// The decider had aborted the transaction (recovery's presumed abort); nothing was
    /// written.
    AbortedByDecider,
    /// The decider's commit failed: the transaction may or may not have committed, and
    /// recovery applies it everywhere or nowhere.
    OutcomeUnknown,
}

/// What happens once the prepared participants are aborted.
#[derive(Debug)]
enum AfterAbort<E> {
    /// A retry with a fresh transaction id, after a backoff.
    Retry,
    /// The end, with this failure.
    Fail(Failure<E>),
}

/// Where the coordinator stands: `Backoff` and `Finished` wait for no answer,
/// `PreparingAll` and `CommittingOthers` for several, every other state for one.
#[derive(Debug)]
enum State<D, E> {
    /// The `Atomic` of the only participant.
    Atomic,
    /// The `Prepare` of `participants[index]`.
    Preparing { index: usize },
    /// The `Prepare`s of every participant at once: the answers so far, by participant.
    PreparingAll {
        answers: Vec<Option<Result<WorkerResponse, E>>>,
    },
    /// The `Abort` of one participant; `remaining` are aborted after it.
    Aborting {
        remaining: VecDeque<D>,
        then: AfterAbort<E>,
    },
    /// No request in flight until `until`, then a retry.
    Backoff { until: Instant },
    /// The decider's `Commit`: the decision.
    CommittingDecider,
    /// The decider's second `Commit`, when it is named by partition: its first recorded
    /// only the decision, this one applies its ops.
    ApplyingDecider,
    /// The `Commit` of `prepared[index]` (not the decider).
    CommittingOther { index: usize, all_committed: bool },
    /// The `Commit`s of every participant but the decider at once, after the outcome was
    /// given: `pending` answers to come.
    CommittingOthers { pending: usize, all_committed: bool },
    /// The outcome has been given.
    Finished,
}

/// The coordinator of one transaction.
#[derive(Debug)]
pub(crate) struct Coordinator<D, E> {
    /// Each participant's address and ops, in the order they are prepared.
    participants: Vec<(D, Vec<TxOp>)>,
    /// The transaction id of the current attempt.
    txid: u64,
    /// Participants prepared in this attempt, with their outcomes, in order. A participant
    /// whose link failed during its prepare is here with no outcomes (it is aborted too).
    prepared: Vec<(D, Vec<TxOutcome>)>,
    /// When the first attempt started.
    started: Instant,
    /// Retries so far.
    attempt: u32,
    /// The state of the jitter's random sequence.
    random: u64,
    state: State<D, E>,
    /// The addresses whose answers are awaited.
    awaiting: Vec<D>,
    /// Whether independent prepares of a first attempt go out at once.
    at_once: bool,
    actions: VecDeque<Action<D, E>>,
}

impl<D: Address, E: Debug> Coordinator<D, E> {
    /// A coordinator that runs `participants` (address and ops, in order) as one
    /// transaction. `txid` is the first attempt's transaction id (unused on the fast path);
    /// `seed` seeds the jitter of the backoffs.
    pub(crate) fn new(
        participants: Vec<(D, Vec<TxOp>)>,
        txid: u64,
        seed: u64,
        now: Instant,
    ) -> Coordinator<D, E> {
        Coordinator::starting(participants, txid, seed, now, true)
    }

    /// [`Coordinator::new`], with the prepares of the first attempt in order too.
    #[cfg(test)]
    fn in_order(
        participants: Vec<(D, Vec<TxOp>)>,
        txid: u64,
        seed: u64,
        now: Instant,
    ) -> Coordinator<D, E> {
        Coordinator::starting(participants, txid, seed, now, false)
    }

    fn starting(
        participants: Vec<(D, Vec<TxOp>)>,
        txid: u64,
        seed: u64,
        now: Instant,
        at_once: bool,
    ) -> Coordinator<D, E> {
        let mut coordinator = Coordinator {
            at_once,
            participants,
            txid,
            prepared: Vec::new(),
            started: now,
            attempt: 0,
            random: seed,
            state: State::Finished,
            awaiting: Vec::new(),
            actions: VecDeque::new(),
        };
        match coordinator.participants.as_slice() {
            [] => coordinator.finish(Ok(Vec::new())),
            [(only, ops)] => {
                let (only, request) = (*only, WorkerRequest::Atomic { ops: ops.clone() });
                coordinator.send(only, request, State::Atomic);
            }
            _ => coordinator.start_prepares(),
        }
        coordinator
    }

    /// Whether the prepares may all go out at once: no participant's ops take a value
    /// from an earlier participant's (RENAME and COPY across workers), and no two
    /// participants share an address (their answers could not be told apart).
    fn independent(&self) -> bool {
        let takes = |ops: &[TxOp]| {
            ops.iter()
                .any(|op| matches!(op.action, TxAction::PutTaken { .. }))
        };
        !self.participants.iter().any(|(_, ops)| takes(ops)) && distinct(&self.participants)
    }

    /// Starts an attempt: every prepare at once on the first attempt when the participants
    /// are independent; in order otherwise, and on every retry, so that transactions that
    /// conflicted take the keys in one order.
    fn start_prepares(&mut self) {
        if !self.at_once || self.attempt > 0 || !self.independent() {
            return self.prepare(0);
        }
        let decider = self.participants[0].0.decider();
        let requests: Vec<(D, WorkerRequest)> = self
            .participants
            .iter()
            .map(|(to, ops)| {
                let request = WorkerRequest::Prepare {
                    txid: self.txid,
                    decider,
                    ops: ops.clone(),
                };
                (*to, request)
            })
            .collect();
        self.state = State::PreparingAll {
            answers: requests.iter().map(|_| None).collect(),
        };
        for (to, request) in requests {
            self.awaiting.push(to);
            self.actions.push_back(Action::Send { to, request });
        }
    }

    /// The next thing to do, if any. After a [`Action::Send`], nothing more comes until its
    /// answer is handled, except the other sends of the same step and an early outcome.
    pub(crate) fn poll_action(&mut self) -> Option<Action<D, E>> {
        self.actions.pop_front()
    }

    /// When to report [`Event::Timeout`]: the end of the backoff before a retry. `None` while
    /// an answer is awaited, and once finished.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Backoff { until } => Some(until),
            _ => None,
        }
    }

    /// Takes an answer or a timeout. An answer from another address than the one awaited,
    /// and a timeout before the deadline, are ignored.
    pub(crate) fn handle(&mut self, event: Event<D, E>, now: Instant) {
        match event {
            Event::Answer { from, answer } => {
                let Some(position) = self.awaiting.iter().position(|&a| a == from) else {
                    return;
                };
                self.awaiting.remove(position);
                self.answered(from, answer, now);
            }
            Event::Timeout { fresh_txid } => {
                if let State::Backoff { until } = self.state {
                    if now >= until {
                        self.txid = fresh_txid;
                        self.start_prepares();
                    }
                }
            }
        }
    }

    fn answered(&mut self, from: D, answer: Result<WorkerResponse, E>, now: Instant) {
        match std::mem::replace(&mut self.state, State::Finished) {
            State::Atomic => {
                let result = match answer {
                    Ok(WorkerResponse::TxOutcomes(outcomes)) => Ok(vec![outcomes]),
                    Ok(WorkerResponse::Error(
                        error @ (WorkerError::TxKeyExists
                        | WorkerError::TxNoSuchKey
                        | WorkerError::TxStale),
                    )) => Err(Failure::Refused(error)),
                    Ok(WorkerResponse::Error(error)) => Err(Failure::Worker(error)),
                    Ok(_) => Err(Failure::UnexpectedAtomicResponse),
                    Err(error) => Err(Failure::Link(error)),
                };
                self.finish(result);
            }
            State::Preparing { index } => match answer {
                Ok(WorkerResponse::TxOutcomes(outcomes)) => {
                    self.prepared.push((from, outcomes));
                    if index + 1 < self.participants.len() {
                        self.prepare(index + 1);
                    } else {
                        self.send(
                            self.prepared[0].0,
                            WorkerRequest::Commit { txid: self.txid },
                            State::CommittingDecider,
                        );
                    }
                }
                Ok(WorkerResponse::Error(WorkerError::TxConflict)) => {
                    self.abort_prepared(AfterAbort::Retry, now)
                }
                Ok(WorkerResponse::Error(
                    error @ (WorkerError::TxKeyExists
                    | WorkerError::TxNoSuchKey
                    | WorkerError::TxStale),
                )) => self.abort_prepared(AfterAbort::Fail(Failure::Refused(error)), now),
                Ok(WorkerResponse::Error(error)) => {
                    self.abort_prepared(AfterAbort::Fail(Failure::Worker(error)), now)
                }
                Ok(_) => {
                    self.abort_prepared(AfterAbort::Fail(Failure::UnexpectedPrepareResponse), now)
                }
                Err(error) => {
                    // The prepare may have happened: abort it there too (recovery does it
                    // otherwise).
                    self.prepared.push((from, Vec::new()));
                    self.abort_prepared(AfterAbort::Fail(Failure::Link(error)), now);
                }
            },
            State::PreparingAll { mut answers } => {
                if let Some(index) = self.participants.iter().position(|(to, _)| *to == from) {
                    answers[index] = Some(answer);
                }
                if answers.iter().any(Option::is_none) {
                    self.state = State::PreparingAll { answers };
                } else {
                    self.all_prepared(answers, now);
                }
            }
            State::Aborting { remaining, then } => self.abort_next(remaining, then, now),
            State::CommittingDecider => match answer {
                Ok(WorkerResponse::Error(WorkerError::TxAborted)) => {
                    self.prepared.remove(0);
                    self.abort_prepared(AfterAbort::Fail(Failure::AbortedByDecider), now);
                }
                Ok(WorkerResponse::Error(_)) | Err(_) => self.finish(Err(Failure::OutcomeUnknown)),
                Ok(_) => {
                    let decider = self.prepared[0].0;
                    if decider.decider() & DECIDER_PARTITION != 0 {
                        let request = WorkerRequest::Commit { txid: self.txid };
                        self.send(decider, request, State::ApplyingDecider);
                    } else if self.others_ordered() {
                        self.commit_others_then_answer();
                    } else {
                        self.commit_other(1, true);
                    }
                }
            },
            // Committed either way; recovery applies what a failed apply left.
            State::ApplyingDecider => {
                let applied = matches!(answer, Ok(WorkerResponse::Ok));
                self.commit_other(1, applied);
            }
            State::CommittingOther {
                index,
                all_committed,
            } => {
                let committed = committed_after_decision(&answer);
                self.commit_other(index + 1, all_committed && committed);
            }
            State::CommittingOthers {
                pending,
                all_committed,
            } => {
                let all_committed = all_committed && committed_after_decision(&answer);
                if pending > 1 {
                    self.state = State::CommittingOthers {
                        pending: pending - 1,
                        all_committed,
                    };
                } else if all_committed {
                    let to = self.prepared[0].0;
                    let request = WorkerRequest::Forget { txid: self.txid };
                    self.actions.push_back(Action::Tidy { to, request });
                }
            }
            state @ (State::Backoff { .. } | State::Finished) => self.state = state,
        }
    }

    /// Takes the answers of prepares sent at once, as if they had come in order: all
    /// prepared commits; otherwise the first participant's failure, in order, decides, and
    /// every participant that prepared or whose link failed is aborted.
    fn all_prepared(&mut self, answers: Vec<Option<Result<WorkerResponse, E>>>, now: Instant) {
        let mut failure: Option<AfterAbort<E>> = None;
        for (index, answer) in answers.into_iter().enumerate() {
            let to = self.participants[index].0;
            let failed = match answer {
                Some(Ok(WorkerResponse::TxOutcomes(outcomes))) => {
                    self.prepared.push((to, outcomes));
                    continue;
                }
                Some(Ok(WorkerResponse::Error(WorkerError::TxConflict))) => AfterAbort::Retry,
                Some(Ok(WorkerResponse::Error(
                    error @ (WorkerError::TxKeyExists
                    | WorkerError::TxNoSuchKey
                    | WorkerError::TxStale),
                ))) => AfterAbort::Fail(Failure::Refused(error)),
                Some(Ok(WorkerResponse::Error(error))) => AfterAbort::Fail(Failure::Worker(error)),
                Some(Ok(_)) | None => AfterAbort::Fail(Failure::UnexpectedPrepareResponse),
                Some(Err(error)) => {
                    // The prepare may have happened: abort it there too.
                    self.prepared.push((to, Vec::new()));
                    AfterAbort::Fail(Failure::Link(error))
                }
            };
            failure.get_or_insert(failed);
        }
        match failure {
            None => self.send(
                self.prepared[0].0,
                WorkerRequest::Commit { txid: self.txid },
                State::CommittingDecider,
            ),
            Some(then) => self.abort_prepared(then, now),
        }
    }

    /// Sends the `Prepare` of `participants[index]`; the first participant is the decider.
    fn prepare(&mut self, index: usize) {
        let (to, ops) = &self.participants[index];
        let request = WorkerRequest::Prepare {
            txid: self.txid,
            decider: self.participants[0].0.decider(),
            ops: fill_taken(ops, &self.prepared),
        };
        self.send(*to, request, State::Preparing { index });
    }

    /// Aborts every prepared participant in order (best effort: recovery aborts the rest),
    /// then goes on with `then`.
    fn abort_prepared(&mut self, then: AfterAbort<E>, now: Instant) {
        let remaining = self.prepared.drain(..).map(|(to, _)| to).collect();
        self.abort_next(remaining, then, now);
    }

    fn abort_next(&mut self, mut remaining: VecDeque<D>, then: AfterAbort<E>, now: Instant) {
        match (remaining.pop_front(), then) {
            (Some(to), then) => self.send(
                to,
                WorkerRequest::Abort { txid: self.txid },
                State::Aborting { remaining, then },
            ),
            (None, AfterAbort::Retry) => self.back_off(now),
            (None, AfterAbort::Fail(failure)) => self.finish(Err(failure)),
        }
    }

    /// Waits a random backoff before a fresh attempt; fails past the conflict deadline.
    fn back_off(&mut self, now: Instant) {
        if now.saturating_duration_since(self.started) > CONFLICT_DEADLINE {
            self.finish(Err(Failure::KeptConflicting));
            return;
        }
        self.attempt += 1;
        let ceiling_us = JITTER_CEILING_FIRST_US << self.attempt.min(JITTER_DOUBLINGS_MAX);
        let jitter = Duration::from_micros(self.next_random() % ceiling_us);
        self.state = State::Backoff {
            until: now + BACKOFF_MIN + jitter,
        };
    }

    /// Commits `prepared[index]`, or, past the last, gives the outcome, forgetting the
    /// decision if every other participant committed (a participant whose commit failed
    /// leaves the record to recovery).
    fn commit_other(&mut self, index: usize, all_committed: bool) {
        if let Some(&(to, _)) = self.prepared.get(index) {
            let state = State::CommittingOther {
                index,
                all_committed,
            };
            self.send(to, WorkerRequest::Commit { txid: self.txid }, state);
        } else {
            if all_committed {
                let to = self.prepared[0].0;
                let request = WorkerRequest::Forget { txid: self.txid };
                self.actions.push_back(Action::Tidy { to, request });
            }
            self.finish_committed();
        }
    }

    /// Whether the participants after the decider can all be committed at once with the
    /// outcome given at once: each is behind an ordered queue, at its own address.
    fn others_ordered(&self) -> bool {
        let others = &self.prepared[1..];
        !others.is_empty() && others.iter().all(|(to, _)| to.ordered()) && distinct(others)
    }

    /// Queues the commit of every participant after the decider, then gives the outcome:
    /// the decision is durable, and whatever the client sends next queues behind the
    /// commits. The decider's `Forget` waits for their answers.
    fn commit_others_then_answer(&mut self) {
        let others: Vec<D> = self.prepared[1..].iter().map(|(to, _)| *to).collect();
        for &to in &others {
            self.awaiting.push(to);
            let request = WorkerRequest::Commit { txid: self.txid };
            self.actions.push_back(Action::Send { to, request });
        }
        let outcomes = self.prepared.iter().map(|(_, outcomes)| outcomes.clone());
        self.actions
            .push_back(Action::Finished(Ok(outcomes.collect())));
        self.state = State::CommittingOthers {
            pending: others.len(),
            all_committed: true,
        };
    }

    fn finish_committed(&mut self) {
        let outcomes = self.prepared.drain(..).map(|(_, outcomes)| outcomes);
        let outcomes = outcomes.collect();
        self.finish(Ok(outcomes));
    }

    fn send(&mut self, to: D, request: WorkerRequest, state: State<D, E>) {
        self.state = state;
        self.awaiting.push(to);
        self.actions.push_back(Action::Send { to, request });
    }

    fn finish(&mut self, result: Result<Vec<Vec<TxOutcome>>, Failure<E>>) {
        self.state = State::Finished;
        self.actions.push_back(Action::Finished(result));
    }

    /// The next number of the seeded sequence (SplitMix64).
    fn next_random(&mut self) -> u64 {
        self.random = self.random.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.random;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Whether no two of `participants` share an address (their answers could not be told
/// apart).
fn distinct<D: Eq, T>(participants: &[(D, T)]) -> bool {
    participants
        .iter()
        .enumerate()
        .all(|(i, (a, _))| participants[..i].iter().all(|(b, _)| a != b))
}

/// Whether a participant's `Commit` answer after the decision means it committed. Once the
/// decider has committed, nothing aborts a participant: "aborted" means that recovery
/// committed it first and dropped the intent.
fn committed_after_decision<E>(answer: &Result<WorkerResponse, E>) -> bool {
    match answer {
        Ok(WorkerResponse::Error(WorkerError::TxAborted)) => true,
        Ok(WorkerResponse::Error(_)) | Err(_) => false,
        Ok(_) => true,
    }
}

/// Replaces `PutTaken` ops with a `Put` of the value that an earlier participant's `Take` or
/// `Read` found (RENAME and COPY across workers).
fn fill_taken<D>(ops: &[TxOp], prepared: &[(D, Vec<TxOutcome>)]) -> Vec<TxOp> {
    let taken = prepared
        .iter()
        .flat_map(|(_, outcomes)| outcomes)
        .rev()
        .find(|outcome| outcome.put(false).is_some());
    ops.iter()
        .map(|op| match (&op.action, taken) {
            (TxAction::PutTaken { if_absent }, Some(outcome)) => TxOp {
                action: outcome.put(*if_absent).unwrap_or_else(|| op.action.clone()),
                ..op.clone()
            },
            _ => op.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use shoal_shared::frame::Key;

    use super::*;

    /// A participant: a worker, its own decider value; behind an ordered queue when it
    /// has the [`ORDERED`] bit.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct W(u16);

    const ORDERED: u16 = 0x4000;

    impl Address for W {
        fn decider(self) -> u16 {
            self.0
        }

        fn ordered(self) -> bool {
            self.0 & ORDERED != 0
        }
    }

    /// A failed link.
    #[derive(Debug, Clone, PartialEq)]
    struct Lost;

    type Core = Coordinator<W, Lost>;

    const SEED: u64 = 42;

    fn put(key: &str) -> TxOp {
        TxOp {
            collection: 0,
            key: Key {
                partition: 0,
                bytes: key.as_bytes().to_vec(),
            },
            action: TxAction::Put {
                value: b"v".to_vec(),
                expires_at_ms: None,
                if_absent: false,
            },
        }
    }

    fn op(key: &str, action: TxAction) -> TxOp {
        TxOp { action, ..put(key) }
    }

    /// Three participants, one key each.
    fn three() -> Vec<(W, Vec<TxOp>)> {
        vec![
            (W(0), vec![put("a")]),
            (W(1), vec![put("b")]),
            (W(2), vec![put("c")]),
        ]
    }

    fn prepare(to: u16, txid: u64, ops: Vec<TxOp>) -> Action<W, Lost> {
        let request = WorkerRequest::Prepare {
            txid,
            decider: 0,
            ops,
        };
        Action::Send { to: W(to), request }
    }

    fn commit(to: u16, txid: u64) -> Action<W, Lost> {
        let request = WorkerRequest::Commit { txid };
        Action::Send { to: W(to), request }
    }

    fn abort(to: u16, txid: u64) -> Action<W, Lost> {
        let request = WorkerRequest::Abort { txid };
        Action::Send { to: W(to), request }
    }

    fn forget(to: u16, txid: u64) -> Action<W, Lost> {
        let request = WorkerRequest::Forget { txid };
        Action::Tidy { to: W(to), request }
    }

    fn outcomes(outcomes: Vec<TxOutcome>) -> Result<WorkerResponse, Lost> {
        Ok(WorkerResponse::TxOutcomes(outcomes))
    }

    fn done() -> Result<WorkerResponse, Lost> {
        outcomes(vec![TxOutcome::Done])
    }

    fn error(error: WorkerError) -> Result<WorkerResponse, Lost> {
        Ok(WorkerResponse::Error(error))
    }

    /// Asserts that the core emits exactly `expected`, then nothing.
    fn expect(core: &mut Core, expected: Action<W, Lost>) {
        assert_eq!(core.poll_action(), Some(expected));
        assert_eq!(core.poll_action(), None);
    }

    fn answer(core: &mut Core, from: u16, answer: Result<WorkerResponse, Lost>, now: Instant) {
        core.handle(
            Event::Answer {
                from: W(from),
                answer,
            },
            now,
        );
    }

    /// Prepares the three participants of [`three`] with `txid`, each answering `Done`.
    fn prepare_three(core: &mut Core, txid: u64, now: Instant) {
        for to in 0..3 {
            let ops = three()[usize::from(to)].1.clone();
            expect(core, prepare(to, txid, ops));
            answer(core, to, done(), now);
        }
    }

    /// After the prepares of [`three`] with `txid`: the decider commits first, then the
    /// others in order, and the outcome goes with the Forget, which is not waited for.
    fn commit_three(core: &mut Core, txid: u64, now: Instant) {
        for to in 0..3 {
            expect(core, commit(to, txid));
            answer(core, to, Ok(WorkerResponse::Ok), now);
        }
        assert_eq!(core.poll_action(), Some(forget(0, txid)));
        let all_done = vec![vec![TxOutcome::Done]; 3];
        expect(core, Action::Finished(Ok(all_done)));
    }

    #[test]
    fn one_participant_takes_the_fast_path() {
        let now = Instant::now();
        let mut core = Core::new(vec![(W(3), vec![put("a")])], 7, SEED, now);
        let request = WorkerRequest::Atomic {
            ops: vec![put("a")],
        };
        expect(&mut core, Action::Send { to: W(3), request });
        answer(&mut core, 3, done(), now);
        expect(&mut core, Action::Finished(Ok(vec![vec![TxOutcome::Done]])));
        assert_eq!(core.next_deadline(), None);
    }

    #[test]
    fn the_fast_path_maps_refusals_and_failures() {
        let now = Instant::now();
        let cases = [
            (
                error(WorkerError::TxKeyExists),
                Failure::Refused(WorkerError::TxKeyExists),
            ),
            (
                error(WorkerError::DiskFull),
                Failure::Worker(WorkerError::DiskFull),
            ),
            (Ok(WorkerResponse::Ok), Failure::UnexpectedAtomicResponse),
            (Err(Lost), Failure::Link(Lost)),
        ];
        for (response, failure) in cases {
            let mut core = Core::new(vec![(W(0), vec![put("a")])], 7, SEED, now);
            core.poll_action();
            answer(&mut core, 0, response, now);
            expect(&mut core, Action::Finished(Err(failure)));
        }
    }

    #[test]
    fn prepares_in_order_then_commits_the_decider_first_then_the_others_then_forgets() {
        let now = Instant::now();
        let mut core = Core::in_order(three(), 7, SEED, now);
        prepare_three(&mut core, 7, now);
        commit_three(&mut core, 7, now);
    }

    #[test]
    fn a_decider_named_by_partition_decides_then_applies_in_a_second_commit() {
        let now = Instant::now();
        let decider = DECIDER_PARTITION | 5;
        let two = vec![(W(decider), vec![put("a")]), (W(1), vec![put("b")])];
        let mut core = Core::in_order(two, 7, SEED, now);
        for (to, key) in [(decider, "a"), (1, "b")] {
            let request = WorkerRequest::Prepare {
                txid: 7,
                decider,
                ops: vec![put(key)],
            };
            expect(&mut core, Action::Send { to: W(to), request });
            answer(&mut core, to, done(), now);
        }
        // The decision; then, once it is answered (replicated), the decider's ops.
        expect(&mut core, commit(decider, 7));
        answer(&mut core, decider, Ok(WorkerResponse::Ok), now);
        expect(&mut core, commit(decider, 7));
        answer(&mut core, decider, Ok(WorkerResponse::Ok), now);
        expect(&mut core, commit(1, 7));
        answer(&mut core, 1, Ok(WorkerResponse::Ok), now);
        assert_eq!(core.poll_action(), Some(forget(decider, 7)));
        let all_done = vec![vec![TxOutcome::Done]; 2];
        expect(&mut core, Action::Finished(Ok(all_done.clone())));

        // A failed apply leaves the rest to recovery: committed, and nothing forgotten.
        let two = vec![(W(decider), vec![put("a")]), (W(1), vec![put("b")])];
        let mut core = Core::in_order(two, 8, SEED, now);
        for to in [decider, 1] {
            core.poll_action();
            answer(&mut core, to, done(), now);
        }
        expect(&mut core, commit(decider, 8));
        answer(&mut core, decider, Ok(WorkerResponse::Ok), now);
        expect(&mut core, commit(decider, 8));
        answer(&mut core, decider, Err(Lost), now);
        expect(&mut core, commit(1, 8));
        answer(&mut core, 1, Ok(WorkerResponse::Ok), now);
        expect(&mut core, Action::Finished(Ok(all_done)));
    }

    /// The two-phase commit of `participants` (prepared at once, each answering `Done`) up
    /// to the decider's commit, answered `Ok`; returns what the core asks for then.
    fn decided(participants: &[u16], txid: u64, now: Instant) -> (Core, Vec<Action<W, Lost>>) {
        let with_ops = participants
            .iter()
            .map(|&w| (W(w), vec![put("k")]))
            .collect();
        let mut core = Core::new(with_ops, txid, SEED, now);
        assert_eq!(drain(&mut core).len(), participants.len());
        for &w in participants {
            answer(&mut core, w, done(), now);
        }
        expect(&mut core, commit(participants[0], txid));
        answer(&mut core, participants[0], Ok(WorkerResponse::Ok), now);
        let actions = drain(&mut core);
        (core, actions)
    }

    #[test]
    fn ordered_others_are_committed_at_once_and_the_outcome_goes_out_with_their_commits() {
        let now = Instant::now();
        let (a, b, c) = (ORDERED, ORDERED | 1, ORDERED | 2);
        let all_done = vec![vec![TxOutcome::Done]; 3];
        let (mut core, actions) = decided(&[a, b, c], 7, now);
        assert_eq!(
            actions,
            vec![
                commit(b, 7),
                commit(c, 7),
                Action::Finished(Ok(all_done.clone()))
            ]
        );
        // The decider's record is forgotten only once both have committed.
        answer(&mut core, c, Ok(WorkerResponse::Ok), now);
        assert_eq!(core.poll_action(), None);
        // Recovery committed this one first: committed all the same.
        answer(&mut core, b, error(WorkerError::TxAborted), now);
        expect(&mut core, forget(a, 7));

        // A commit that fails leaves the record to recovery.
        let (mut core, _) = decided(&[a, b, c], 8, now);
        answer(&mut core, b, Ok(WorkerResponse::Ok), now);
        answer(&mut core, c, Err(Lost), now);
        assert_eq!(core.poll_action(), None);

        // Before the decision nothing is answered early: a failed decider commit is in
        // doubt.
        let with_ops = [a, b].iter().map(|&w| (W(w), vec![put("k")])).collect();
        let mut core = Core::new(with_ops, 9, SEED, now);
        drain(&mut core);
        answer(&mut core, a, done(), now);
        answer(&mut core, b, done(), now);
        expect(&mut core, commit(a, 9));
        answer(&mut core, a, Err(Lost), now);
        expect(&mut core, Action::Finished(Err(Failure::OutcomeUnknown)));
    }

    #[test]
    fn one_unordered_participant_keeps_the_commits_in_turn_before_the_outcome() {
        let now = Instant::now();
        let (mut core, actions) = decided(&[ORDERED, 1, ORDERED | 2], 7, now);
        assert_eq!(actions, vec![commit(1, 7)]);
        answer(&mut core, 1, Ok(WorkerResponse::Ok), now);
        expect(&mut core, commit(ORDERED | 2, 7));
        answer(&mut core, ORDERED | 2, Ok(WorkerResponse::Ok), now);
        assert_eq!(core.poll_action(), Some(forget(ORDERED, 7)));
        let all_done = vec![vec![TxOutcome::Done]; 3];
        expect(&mut core, Action::Finished(Ok(all_done)));
    }

    #[test]
    fn an_answer_from_elsewhere_is_ignored() {
        let now = Instant::now();
        let mut core = Core::in_order(three(), 7, SEED, now);
        expect(&mut core, prepare(0, 7, vec![put("a")]));
        answer(&mut core, 1, done(), now);
        assert_eq!(core.poll_action(), None);
        answer(&mut core, 0, done(), now);
        expect(&mut core, prepare(1, 7, vec![put("b")]));
    }

    /// Takes every action the core has now.
    fn drain(core: &mut Core) -> Vec<Action<W, Lost>> {
        std::iter::from_fn(|| core.poll_action()).collect()
    }

    /// The prepares of [`three`] with `txid`, as sent at once.
    fn three_prepares(txid: u64) -> Vec<Action<W, Lost>> {
        (0..3)
            .map(|to| prepare(to, txid, three()[usize::from(to)].1.clone()))
            .collect()
    }

    #[test]
    fn independent_participants_are_prepared_at_once_and_commit_as_before() {
        let now = Instant::now();
        let mut core = Core::new(three(), 7, SEED, now);
        assert_eq!(drain(&mut core), three_prepares(7));
        // Answers in any order; nothing goes out until the last one.
        answer(&mut core, 2, done(), now);
        answer(&mut core, 0, done(), now);
        assert_eq!(core.poll_action(), None);
        // An answer from one already answered is ignored.
        answer(&mut core, 0, done(), now);
        assert_eq!(core.poll_action(), None);
        answer(&mut core, 1, done(), now);
        commit_three(&mut core, 7, now);
    }

    #[test]
    fn a_conflict_among_prepares_sent_at_once_aborts_the_prepared_and_retries_in_order() {
        let start = Instant::now();
        let mut core = Core::new(three(), 7, SEED, start);
        assert_eq!(drain(&mut core), three_prepares(7));
        answer(&mut core, 1, error(WorkerError::TxConflict), start);
        answer(&mut core, 2, done(), start);
        answer(&mut core, 0, done(), start);
        // The prepared ones are released, in order; the one that conflicted holds nothing.
        expect(&mut core, abort(0, 7));
        answer(&mut core, 0, Ok(WorkerResponse::Ok), start);
        expect(&mut core, abort(2, 7));
        answer(&mut core, 2, Ok(WorkerResponse::Ok), start);
        let deadline = core.next_deadline().expect("a backoff");
        core.handle(Event::Timeout { fresh_txid: 9 }, deadline);
        // The retry takes the keys in order, one participant after the other.
        prepare_three(&mut core, 9, deadline);
        expect(&mut core, commit(0, 9));
    }

    #[test]
    fn among_prepares_sent_at_once_the_first_failure_in_order_decides() {
        let now = Instant::now();
        let mut core = Core::new(three(), 7, SEED, now);
        drain(&mut core);
        // Participant 2 conflicts, participant 1's link fails, participant 0 prepares:
        // in order, the link failure comes first, so the write fails and is not retried.
        answer(&mut core, 2, error(WorkerError::TxConflict), now);
        answer(&mut core, 1, Err(Lost), now);
        answer(&mut core, 0, done(), now);
        expect(&mut core, abort(0, 7));
        answer(&mut core, 0, Ok(WorkerResponse::Ok), now);
        // The participant whose link failed may have prepared: it is aborted too.
        expect(&mut core, abort(1, 7));
        answer(&mut core, 1, Ok(WorkerResponse::Ok), now);
        expect(&mut core, Action::Finished(Err(Failure::Link(Lost))));

        // A refusal before a conflict fails the write without a retry.
        let mut core = Core::new(three(), 8, SEED, now);
        drain(&mut core);
        answer(&mut core, 0, error(WorkerError::TxKeyExists), now);
        answer(&mut core, 1, error(WorkerError::TxConflict), now);
        answer(&mut core, 2, done(), now);
        expect(&mut core, abort(2, 8));
        answer(&mut core, 2, Ok(WorkerResponse::Ok), now);
        let refused = Failure::Refused(WorkerError::TxKeyExists);
        expect(&mut core, Action::Finished(Err(refused)));
    }

    #[test]
    fn participants_that_take_a_value_from_another_are_prepared_in_order() {
        let now = Instant::now();
        let taking = vec![
            (W(0), vec![op("from", TxAction::Take)]),
            (
                W(1),
                vec![op("to", TxAction::PutTaken { if_absent: false })],
            ),
        ];
        let mut core = Core::new(taking, 7, SEED, now);
        assert_eq!(drain(&mut core).len(), 1, "one prepare at a time");
        // Two participants at one address cannot be told apart: in order too.
        let shared = vec![(W(0), vec![put("a")]), (W(0), vec![put("b")])];
        let mut core = Core::new(shared, 7, SEED, now);
        assert_eq!(drain(&mut core).len(), 1, "one prepare at a time");
    }

    #[test]
    fn a_conflict_after_others_prepared_aborts_them_and_retries_with_a_fresh_txid() {
        let start = Instant::now();
        let mut core = Core::in_order(three(), 7, SEED, start);
        expect(&mut core, prepare(0, 7, vec![put("a")]));
        answer(&mut core, 0, done(), start);
        expect(&mut core, prepare(1, 7, vec![put("b")]));
        answer(&mut core, 1, done(), start);
        expect(&mut core, prepare(2, 7, vec![put("c")]));
        answer(&mut core, 2, error(WorkerError::TxConflict), start);
        // The two prepared ones are released, in order; the one that conflicted holds nothing.
        expect(&mut core, abort(0, 7));
        answer(&mut core, 0, Ok(WorkerResponse::Ok), start);
        expect(&mut core, abort(1, 7));
        assert_eq!(core.next_deadline(), None);
        answer(&mut core, 1, Err(Lost), start);
        assert_eq!(core.poll_action(), None);
        // The first retry waits 100 µs plus a jitter below 400 µs.
        let deadline = core.next_deadline().expect("a backoff");
        let backoff = deadline - start;
        assert!(backoff >= BACKOFF_MIN, "{backoff:?}");
        assert!(
            backoff < BACKOFF_MIN + Duration::from_micros(400),
            "{backoff:?}"
        );
        // Too early: nothing happens.
        core.handle(Event::Timeout { fresh_txid: 8 }, start);
        assert_eq!(core.poll_action(), None);
        core.handle(Event::Timeout { fresh_txid: 9 }, deadline);
        prepare_three(&mut core, 9, deadline);
        expect(&mut core, commit(0, 9));
    }

    #[test]
    fn the_jitter_comes_from_the_seed() {
        let backoff = |seed: u64| {
            let start = Instant::now();
            let mut core = Core::in_order(three(), 7, seed, start);
            core.poll_action();
            answer(&mut core, 0, error(WorkerError::TxConflict), start);
            core.next_deadline().expect("a backoff") - start
        };
        assert_eq!(backoff(1), backoff(1));
        let distinct: HashSet<Duration> = (0..20).map(backoff).collect();
        assert!(distinct.len() > 10, "{distinct:?}");
    }

    #[test]
    fn a_link_failure_during_prepare_aborts_that_participant_too() {
        let now = Instant::now();
        let mut core = Core::in_order(three(), 7, SEED, now);
        expect(&mut core, prepare(0, 7, vec![put("a")]));
        answer(&mut core, 0, done(), now);
        expect(&mut core, prepare(1, 7, vec![put("b")]));
        answer(&mut core, 1, Err(Lost), now);
        expect(&mut core, abort(0, 7));
        answer(&mut core, 0, Ok(WorkerResponse::Ok), now);
        expect(&mut core, abort(1, 7));
        answer(&mut core, 1, Err(Lost), now);
        expect(&mut core, Action::Finished(Err(Failure::Link(Lost))));
    }

    #[test]
    fn a_refused_prepare_aborts_the_prepared_and_is_not_retried() {
        let now = Instant::now();
        let mut core = Core::in_order(three(), 7, SEED, now);
        expect(&mut core, prepare(0, 7, vec![put("a")]));
        answer(&mut core, 0, done(), now);
        expect(&mut core, prepare(1, 7, vec![put("b")]));
        answer(&mut core, 1, error(WorkerError::TxNoSuchKey), now);
        expect(&mut core, abort(0, 7));
        answer(&mut core, 0, Ok(WorkerResponse::Ok), now);
        let refused = Failure::Refused(WorkerError::TxNoSuchKey);
        expect(&mut core, Action::Finished(Err(refused)));
        assert_eq!(core.next_deadline(), None);
    }

    #[test]
    fn the_decider_answering_aborted_aborts_the_others() {
        let now = Instant::now();
        let mut core = Core::in_order(three(), 7, SEED, now);
        prepare_three(&mut core, 7, now);
        expect(&mut core, commit(0, 7));
        answer(&mut core, 0, error(WorkerError::TxAborted), now);
        // The decider already dropped it: only the others are aborted.
        expect(&mut core, abort(1, 7));
        answer(&mut core, 1, Ok(WorkerResponse::Ok), now);
        expect(&mut core, abort(2, 7));
        answer(&mut core, 2, Ok(WorkerResponse::Ok), now);
        expect(&mut core, Action::Finished(Err(Failure::AbortedByDecider)));
    }

    #[test]
    fn a_failed_decider_leaves_the_outcome_unknown_and_commits_nothing_else() {
        let now = Instant::now();
        for failure in [Err(Lost), error(WorkerError::DiskFull)] {
            let mut core = Core::in_order(three(), 7, SEED, now);
            prepare_three(&mut core, 7, now);
            expect(&mut core, commit(0, 7));
            answer(&mut core, 0, failure, now);
            expect(&mut core, Action::Finished(Err(Failure::OutcomeUnknown)));
            assert_eq!(core.next_deadline(), None);
        }
    }

    #[test]
    fn a_participant_that_recovery_committed_first_counts_as_committed() {
        let now = Instant::now();
        let mut core = Core::in_order(three(), 7, SEED, now);
        prepare_three(&mut core, 7, now);
        expect(&mut core, commit(0, 7));
        answer(&mut core, 0, Ok(WorkerResponse::Ok), now);
        expect(&mut core, commit(1, 7));
        answer(&mut core, 1, error(WorkerError::TxAborted), now);
        expect(&mut core, commit(2, 7));
        answer(&mut core, 2, Ok(WorkerResponse::Ok), now);
        assert_eq!(core.poll_action(), Some(forget(0, 7)));
        let all_done = vec![vec![TxOutcome::Done]; 3];
        expect(&mut core, Action::Finished(Ok(all_done)));
    }

    #[test]
    fn a_participant_that_fails_its_commit_keeps_the_decision_record() {
        let now = Instant::now();
        let mut core = Core::in_order(three(), 7, SEED, now);
        prepare_three(&mut core, 7, now);
        expect(&mut core, commit(0, 7));
        answer(&mut core, 0, Ok(WorkerResponse::Ok), now);
        expect(&mut core, commit(1, 7));
        answer(&mut core, 1, Err(Lost), now);
        // The others are still committed, but recovery needs the record: no Forget.
        expect(&mut core, commit(2, 7));
        answer(&mut core, 2, Ok(WorkerResponse::Ok), now);
        let all_done = vec![vec![TxOutcome::Done]; 3];
        expect(&mut core, Action::Finished(Ok(all_done)));
    }

    #[test]
    fn rename_across_participants_puts_the_value_taken() {
        let now = Instant::now();
        let participants = vec![
            (W(1), vec![op("from", TxAction::Take)]),
            (W(0), vec![op("to", TxAction::PutTaken { if_absent: true })]),
        ];
        let mut core = Core::new(participants, 7, SEED, now);
        let request = WorkerRequest::Prepare {
            txid: 7,
            decider: 1,
            ops: vec![op("from", TxAction::Take)],
        };
        expect(&mut core, Action::Send { to: W(1), request });
        let taken = TxOutcome::Value {
            value: b"moved".to_vec(),
            expires_at_ms: Some(1234),
        };
        answer(&mut core, 1, outcomes(vec![taken.clone()]), now);
        let put_taken = op(
            "to",
            TxAction::Put {
                value: b"moved".to_vec(),
                expires_at_ms: Some(1234),
                if_absent: true,
            },
        );
        let request = WorkerRequest::Prepare {
            txid: 7,
            decider: 1,
            ops: vec![put_taken],
        };
        expect(&mut core, Action::Send { to: W(0), request });
        answer(&mut core, 0, done(), now);
        // The decider is the first participant prepared, not the lowest address.
        expect(&mut core, commit(1, 7));
        answer(&mut core, 1, Ok(WorkerResponse::Ok), now);
        expect(&mut core, commit(0, 7));
        answer(&mut core, 0, Ok(WorkerResponse::Ok), now);
        assert_eq!(core.poll_action(), Some(forget(1, 7)));
        let result = Ok(vec![vec![taken], vec![TxOutcome::Done]]);
        expect(&mut core, Action::Finished(result));
    }

    #[test]
    fn put_taken_without_a_value_taken_is_left_as_it_is() {
        let ops = vec![op("to", TxAction::PutTaken { if_absent: false })];
        let prepared: Vec<(W, Vec<TxOutcome>)> = vec![(W(0), vec![TxOutcome::Existed(true)])];
        assert_eq!(fill_taken(&ops, &prepared), ops);
    }

    #[test]
    fn conflicts_past_the_deadline_give_up() {
        let start = Instant::now();
        let mut core = Core::in_order(three(), 1, SEED, start);
        let mut now = start;
        let mut txid = 1;
        let mut backoffs = Vec::new();
        loop {
            expect(&mut core, prepare(0, txid, vec![put("a")]));
            answer(&mut core, 0, done(), now);
            expect(&mut core, prepare(1, txid, vec![put("b")]));
            answer(&mut core, 1, error(WorkerError::TxConflict), now);
            expect(&mut core, abort(0, txid));
            // Each attempt takes 400 ms, the abort included.
            now += Duration::from_millis(400);
            answer(&mut core, 0, Ok(WorkerResponse::Ok), now);
            let Some(deadline) = core.next_deadline() else {
                break;
            };
            backoffs.push(deadline - now);
            now = deadline;
            txid += 1;
            core.handle(Event::Timeout { fresh_txid: txid }, now);
        }
        // Retried while no more than 3 s had passed at the end of an attempt, then given up.
        expect(&mut core, Action::Finished(Err(Failure::KeptConflicting)));
        assert_eq!(backoffs.len(), 7, "{backoffs:?}");
        assert!(now - start > CONFLICT_DEADLINE);
        // The jitter ceiling doubles from 400 µs, up to 12.8 ms.
        for (retry, backoff) in backoffs.iter().enumerate() {
            let ceiling = JITTER_CEILING_FIRST_US << (retry as u32 + 1).min(6);
            assert!(*backoff < BACKOFF_MIN + Duration::from_micros(ceiling));
        }
    }

    #[test]
    fn no_participants_commit_nothing() {
        let mut core = Core::new(Vec::new(), 7, SEED, Instant::now());
        expect(&mut core, Action::Finished(Ok(Vec::new())));
    }
}

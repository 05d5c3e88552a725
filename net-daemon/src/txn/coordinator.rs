//! The coordinator of one atomic multi-key write, as a state machine without I/O.
//!
//! It owns the order of the requests of one transaction: the fast path (one participant,
//! one `Atomic`), or two-phase commit (`Prepare` on each participant in order, `Commit` on
//! the decider, `Commit` on the others, `Forget` on the decider), the aborts and the
//! retries after lock conflicts, and the outcome.
//!
//! It talks to nobody. [`Coordinator::poll_action`] yields the requests to send and, last,
//! the outcome; [`Coordinator::handle`] takes each answer, and the end of the backoff
//! before a retry; [`Coordinator::next_deadline`] says when that backoff ends. At most one
//! request is in flight: the order of the requests is the protocol. Time comes in as `now`,
//! fresh transaction ids with [`Event::Timeout`], and the jitter from a seed.
//!
//! It must never read a clock, sleep, spawn, or know how an address is reached: the shell
//! ([`super::run`]) does that.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::time::{Duration, Instant};

use shoal_shared::frame::{TxAction, TxOp, TxOutcome, WorkerError, WorkerRequest, WorkerResponse};

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
    /// Send `request` (`Atomic`, `Prepare`, `Commit`, `Abort` or `Forget`) to `to`, then
    /// report its answer with [`Event::Answer`].
    Send { to: D, request: WorkerRequest },
    /// The transaction is over: each participant's outcomes in order, or why it did not
    /// commit. Nothing follows.
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

/// Where the coordinator stands; each state but the last two waits for one answer.
#[derive(Debug)]
enum State<D, E> {
    /// The `Atomic` of the only participant.
    Atomic,
    /// The `Prepare` of `participants[index]`.
    Preparing { index: usize },
    /// The `Abort` of one participant; `remaining` are aborted after it.
    Aborting {
        remaining: VecDeque<D>,
        then: AfterAbort<E>,
    },
    /// No request in flight until `until`, then a retry.
    Backoff { until: Instant },
    /// The decider's `Commit`: the decision.
    CommittingDecider,
    /// The `Commit` of `prepared[index]` (not the decider).
    CommittingOther { index: usize, all_committed: bool },
    /// The decider's `Forget`.
    Forgetting,
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
    /// The address whose answer is awaited.
    awaiting: Option<D>,
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
        let mut coordinator = Coordinator {
            participants,
            txid,
            prepared: Vec::new(),
            started: now,
            attempt: 0,
            random: seed,
            state: State::Finished,
            awaiting: None,
            actions: VecDeque::new(),
        };
        match coordinator.participants.as_slice() {
            [] => coordinator.finish(Ok(Vec::new())),
            [(only, ops)] => {
                let (only, request) = (*only, WorkerRequest::Atomic { ops: ops.clone() });
                coordinator.send(only, request, State::Atomic);
            }
            _ => coordinator.prepare(0),
        }
        coordinator
    }

    /// The next thing to do, if any. After a [`Action::Send`], nothing more comes until its
    /// answer is handled.
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
                if self.awaiting != Some(from) {
                    return;
                }
                self.awaiting = None;
                self.answered(from, answer, now);
            }
            Event::Timeout { fresh_txid } => {
                if let State::Backoff { until } = self.state {
                    if now >= until {
                        self.txid = fresh_txid;
                        self.prepare(0);
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
                        error @ (WorkerError::TxKeyExists | WorkerError::TxNoSuchKey),
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
                    error @ (WorkerError::TxKeyExists | WorkerError::TxNoSuchKey),
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
            State::Aborting { remaining, then } => self.abort_next(remaining, then, now),
            State::CommittingDecider => match answer {
                Ok(WorkerResponse::Error(WorkerError::TxAborted)) => {
                    self.prepared.remove(0);
                    self.abort_prepared(AfterAbort::Fail(Failure::AbortedByDecider), now);
                }
                Ok(WorkerResponse::Error(_)) | Err(_) => self.finish(Err(Failure::OutcomeUnknown)),
                Ok(_) => self.commit_other(1, true),
            },
            State::CommittingOther {
                index,
                all_committed,
            } => {
                // Once the decider has committed, nothing aborts a participant: "aborted"
                // here means recovery committed it first and dropped the intent.
                let committed = match answer {
                    Ok(WorkerResponse::Error(WorkerError::TxAborted)) => true,
                    Ok(WorkerResponse::Error(_)) | Err(_) => false,
                    Ok(_) => true,
                };
                self.commit_other(index + 1, all_committed && committed);
            }
            State::Forgetting => self.finish_committed(),
            state @ (State::Backoff { .. } | State::Finished) => self.state = state,
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

    /// Commits `prepared[index]`, or, past the last, forgets the decision if every other
    /// participant committed.
    fn commit_other(&mut self, index: usize, all_committed: bool) {
        if let Some(&(to, _)) = self.prepared.get(index) {
            let state = State::CommittingOther {
                index,
                all_committed,
            };
            self.send(to, WorkerRequest::Commit { txid: self.txid }, state);
        } else if all_committed {
            let decider = self.prepared[0].0;
            let request = WorkerRequest::Forget { txid: self.txid };
            self.send(decider, request, State::Forgetting);
        } else {
            self.finish_committed();
        }
    }

    fn finish_committed(&mut self) {
        let outcomes = self.prepared.drain(..).map(|(_, outcomes)| outcomes);
        let outcomes = outcomes.collect();
        self.finish(Ok(outcomes));
    }

    fn send(&mut self, to: D, request: WorkerRequest, state: State<D, E>) {
        self.state = state;
        self.awaiting = Some(to);
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

/// Replaces `PutTaken` ops with a `Put` of the value that an earlier participant's `Take` or
/// `Read` found (RENAME and COPY across workers).
fn fill_taken<D>(ops: &[TxOp], prepared: &[(D, Vec<TxOutcome>)]) -> Vec<TxOp> {
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

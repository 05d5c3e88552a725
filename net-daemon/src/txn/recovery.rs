//! The recovery of transactions left in doubt, as a state machine without I/O.
//!
//! It owns the decisions of recovery: which prepared intents to commit or abort, which
//! decision records to forget, and the transactions it committed whose records are still to
//! forget (remembered from one pass to the next). It talks to nobody: it emits the requests
//! of each pass through [`Recovery::poll_action`], one at a time, and takes their answers
//! through [`Recovery::handle`]; [`Recovery::next_deadline`] says when the next pass is due.
//!
//! One pass, every [`RECOVERY_INTERVAL`]:
//! 1. Each local worker in turn is asked for its prepared intents (all of them, those older
//!    than [`IN_DOUBT_AFTER`], those older than [`DECIDED_AFTER`]; the worker measures the
//!    ages). Each intent older than [`DECIDED_AFTER`] is settled as its decider says
//!    (`Decide`): committed if the decider recorded the commit; aborted if not and the
//!    intent is older than [`IN_DOUBT_AFTER`] (the decider then aborts it too: presumed
//!    abort); left alone otherwise.
//! 2. In a cluster, the other hosts that lead partitions are asked which transactions
//!    their workers hold.
//! 3. If everyone answered: the decision records of transactions recovery committed are
//!    forgotten once no worker holds them, and each worker's decision records older than
//!    [`ORPHANED_AFTER`] that no worker holds (their coordinator's `Forget` was lost) are
//!    forgotten. Intents only disappear after the decision, so a transaction no worker
//!    holds will never be asked about again.
//!
//! It must never read a clock, sleep, or know how a worker or a decider is reached: the
//! shell ([`super::recover`]) does that.

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::time::{Duration, Instant};

use shoal_shared::frame::{WorkerRequest, WorkerResponse};

/// A prepared intent older than this is committed by recovery if its decider recorded the
/// commit (the coordinator is then presumed gone).
pub(crate) const DECIDED_AFTER: Duration = Duration::from_secs(1);
/// A prepared intent older than this is resolved by recovery either way.
pub(crate) const IN_DOUBT_AFTER: Duration = Duration::from_secs(5);
/// A decision record older than this, of a transaction no worker holds, is forgotten.
pub(crate) const ORPHANED_AFTER: Duration = Duration::from_secs(30);
/// How often recovery looks for transactions in doubt.
pub(crate) const RECOVERY_INTERVAL: Duration = Duration::from_secs(1);

// An intent is committed before it is settled either way, and a record is an orphan only
// well after its intents would have been settled.
const _: () = assert!(DECIDED_AFTER.as_millis() < IN_DOUBT_AFTER.as_millis());
const _: () = assert!(IN_DOUBT_AFTER.as_millis() < ORPHANED_AFTER.as_millis());

/// Where a request of recovery goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// A local worker, by index.
    Worker(usize),
    /// The decider of a transaction, by the `decider` value its intents recorded.
    Decider(u16),
}

/// What happened, for [`Recovery::handle`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    /// The answer to the last [`Action::Send`], sent to `from`; `None` if the link failed.
    Answer {
        from: Target,
        answer: Option<WorkerResponse>,
    },
    /// The answers to the last [`Action::SendToOtherHosts`], one per other host; `None` for
    /// a host that did not answer.
    OtherHostsAnswered(Vec<Option<WorkerResponse>>),
    /// The [`Recovery::next_deadline`] has passed.
    Timeout,
}

/// What to do next, from [`Recovery::poll_action`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Send `request` (`InDoubt`, `Decide`, `Commit`, `Abort`, `Decided` or `Forget`) to
    /// `to`, then report its answer with [`Event::Answer`].
    Send { to: Target, request: WorkerRequest },
    /// Send `request` (`InDoubt`) to every other host of the cluster, then report their
    /// answers with [`Event::OtherHostsAnswered`].
    SendToOtherHosts { request: WorkerRequest },
}

/// A prepared intent older than [`DECIDED_AFTER`], on the worker being settled.
#[derive(Debug, Clone, Copy)]
struct Stale {
    txid: u64,
    decider: u16,
    /// Older than [`IN_DOUBT_AFTER`].
    old: bool,
}

/// The step of a pass; each waits for one answer.
#[derive(Debug)]
enum Step {
    /// `InDoubt` of every age on `worker`.
    ListAll { worker: usize },
    /// `InDoubt` older than [`IN_DOUBT_AFTER`] on `worker`.
    ListOld { worker: usize, all: Vec<u64> },
    /// `InDoubt` older than [`DECIDED_AFTER`] on `worker`.
    ListStale {
        worker: usize,
        all: Vec<u64>,
        old: HashSet<u64>,
    },
    /// `Decide` of `intent` at its decider; `rest` of `worker`'s intents come after it.
    Decide {
        worker: usize,
        intent: Stale,
        rest: VecDeque<Stale>,
    },
    /// `Commit` (or `Abort`) of `intent` on `worker`.
    Settle {
        worker: usize,
        intent: Stale,
        commit: bool,
        rest: VecDeque<Stale>,
    },
    /// `InDoubt` of every age on the other hosts.
    OtherHosts,
    /// `Forget` of `txid`, which recovery committed, at its decider.
    ForgetSettled {
        txid: u64,
        rest: VecDeque<(u64, u16)>,
    },
    /// `Decided` older than [`ORPHANED_AFTER`] on `worker`.
    ListDecided { worker: usize },
    /// `Forget` of an orphaned record on `worker`; `rest` come after it.
    ForgetOrphan { worker: usize, rest: VecDeque<u64> },
}

/// One pass over the workers.
#[derive(Debug)]
struct Pass {
    /// Transactions some worker holds prepared, of any age.
    held: BTreeSet<u64>,
    /// Whether every worker (and every other host) has told what it holds.
    every_worker_answered: bool,
    step: Step,
}

/// The recovery of transactions in doubt, for the whole life of the daemon.
#[derive(Debug)]
pub(crate) struct Recovery {
    /// Local workers, indexed from 0.
    workers: usize,
    /// Whether there are other hosts to ask (a cluster).
    cluster: bool,
    /// Transactions recovery committed, with their decider: records to forget.
    committed: BTreeMap<u64, u16>,
    /// When the next pass is due. Passes keep to a fixed grid: a late pass is followed at
    /// once by the ones it delayed.
    next_pass_at: Instant,
    pass: Option<Pass>,
    awaiting: Option<Target>,
    actions: VecDeque<Action>,
}

impl Recovery {
    /// Recovery over `workers` local workers (and the other hosts, with `cluster`); the first
    /// pass is due at `now`.
    pub(crate) fn new(workers: usize, cluster: bool, now: Instant) -> Recovery {
        Recovery {
            workers,
            cluster,
            committed: BTreeMap::new(),
            next_pass_at: now,
            pass: None,
            awaiting: None,
            actions: VecDeque::new(),
        }
    }

    /// The next request to send, if any; nothing more comes until its answer is handled.
    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When to report [`Event::Timeout`]: the next pass, once the current one is over.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        match self.pass {
            None => Some(self.next_pass_at),
            Some(_) => None,
        }
    }

    /// Takes an answer or a timeout. A timeout during a pass or before the deadline, and an
    /// answer that is not awaited, are ignored.
    pub(crate) fn handle(&mut self, event: Event, now: Instant) {
        match event {
            Event::Timeout => {
                if self.pass.is_none() && now >= self.next_pass_at {
                    self.next_pass_at += RECOVERY_INTERVAL;
                    self.start_pass();
                }
            }
            Event::Answer { from, answer } => {
                if self.awaiting == Some(from) {
                    self.awaiting = None;
                    self.answered(answer);
                }
            }
            Event::OtherHostsAnswered(answers) => {
                if let Some(Pass {
                    step: Step::OtherHosts,
                    ..
                }) = self.pass
                {
                    self.other_hosts_answered(answers);
                }
            }
        }
    }

    /// The transactions recovery committed whose decision records are still to forget.
    #[cfg(test)]
    fn to_forget(&self) -> Vec<u64> {
        self.committed.keys().copied().collect()
    }

    fn start_pass(&mut self) {
        self.pass = Some(Pass {
            held: BTreeSet::new(),
            every_worker_answered: true,
            step: Step::OtherHosts,
        });
        self.list_worker(0);
    }

    fn answered(&mut self, answer: Option<WorkerResponse>) {
        let Some(pass) = self.pass.as_mut() else {
            return;
        };
        let step = std::mem::replace(&mut pass.step, Step::OtherHosts);
        match step {
            Step::ListAll { worker } => match answer {
                Some(WorkerResponse::InDoubt(found)) => {
                    let all = found.into_iter().map(|(txid, _)| txid).collect();
                    let request = in_doubt(IN_DOUBT_AFTER);
                    self.send(
                        Target::Worker(worker),
                        request,
                        Step::ListOld { worker, all },
                    );
                }
                _ => self.worker_silent(worker),
            },
            Step::ListOld { worker, all } => match answer {
                Some(WorkerResponse::InDoubt(found)) => {
                    let old = found.into_iter().map(|(txid, _)| txid).collect();
                    let step = Step::ListStale { worker, all, old };
                    self.send(Target::Worker(worker), in_doubt(DECIDED_AFTER), step);
                }
                _ => self.worker_silent(worker),
            },
            Step::ListStale { worker, all, old } => match answer {
                Some(WorkerResponse::InDoubt(found)) => {
                    pass.held.extend(all);
                    let stale = found
                        .into_iter()
                        .map(|(txid, decider)| Stale {
                            txid,
                            decider,
                            old: old.contains(&txid),
                        })
                        .collect();
                    self.decide_next(worker, stale);
                }
                _ => self.worker_silent(worker),
            },
            Step::Decide {
                worker,
                intent,
                rest,
            } => {
                let commit = match answer {
                    Some(WorkerResponse::Integer(1)) => true,
                    // "Not committed" settles only an old intent: a recent one may belong to
                    // a transaction whose coordinator is still preparing it.
                    Some(WorkerResponse::Integer(_)) if intent.old => false,
                    _ => return self.decide_next(worker, rest),
                };
                tracing::info!(
                    txid = intent.txid,
                    worker,
                    committed = commit,
                    "resolving a transaction left in doubt"
                );
                let txid = intent.txid;
                let request = if commit {
                    WorkerRequest::Commit { txid }
                } else {
                    WorkerRequest::Abort { txid }
                };
                let step = Step::Settle {
                    worker,
                    intent,
                    commit,
                    rest,
                };
                self.send(Target::Worker(worker), request, step);
            }
            Step::Settle {
                worker,
                intent,
                commit,
                rest,
            } => {
                if commit && succeeded(&answer) {
                    self.committed.insert(intent.txid, intent.decider);
                }
                self.decide_next(worker, rest);
            }
            Step::OtherHosts => {}
            Step::ForgetSettled { txid, rest } => {
                if succeeded(&answer) {
                    self.committed.remove(&txid);
                }
                self.forget_settled_next(rest);
            }
            Step::ListDecided { worker } => match answer {
                Some(WorkerResponse::InDoubt(decided)) => {
                    let orphans = decided
                        .into_iter()
                        .map(|(txid, _)| txid)
                        .filter(|txid| !pass.held.contains(txid))
                        .collect();
                    self.forget_orphan_next(worker, orphans);
                }
                _ => self.list_decided(worker + 1),
            },
            Step::ForgetOrphan { worker, rest } => self.forget_orphan_next(worker, rest),
        }
    }

    /// Asks `worker` for its prepared intents; past the last worker, the other hosts.
    fn list_worker(&mut self, worker: usize) {
        if worker < self.workers {
            let step = Step::ListAll { worker };
            self.send(Target::Worker(worker), in_doubt(Duration::ZERO), step);
        } else if self.cluster {
            self.set_step(Step::OtherHosts);
            self.actions.push_back(Action::SendToOtherHosts {
                request: in_doubt(Duration::ZERO),
            });
        } else {
            self.listed();
        }
    }

    /// `worker` did not tell what it holds: nothing is forgotten in this pass.
    fn worker_silent(&mut self, worker: usize) {
        if let Some(pass) = self.pass.as_mut() {
            pass.every_worker_answered = false;
        }
        self.list_worker(worker + 1);
    }

    /// Asks the decider of the next of `worker`'s stale intents; then the next worker.
    fn decide_next(&mut self, worker: usize, mut rest: VecDeque<Stale>) {
        let Some(intent) = rest.pop_front() else {
            return self.list_worker(worker + 1);
        };
        let request = WorkerRequest::Decide {
            txid: intent.txid,
            older_than_ms: IN_DOUBT_AFTER.as_millis() as u64,
        };
        let step = Step::Decide {
            worker,
            intent,
            rest,
        };
        self.send(Target::Decider(intent.decider), request, step);
    }

    fn other_hosts_answered(&mut self, answers: Vec<Option<WorkerResponse>>) {
        if let Some(pass) = self.pass.as_mut() {
            for answer in answers {
                match answer {
                    Some(WorkerResponse::InDoubt(found)) => {
                        pass.held.extend(found.into_iter().map(|(txid, _)| txid))
                    }
                    _ => pass.every_worker_answered = false,
                }
            }
        }
        self.listed();
    }

    /// Everyone was asked what they hold: forgets what may be forgotten, if everyone answered.
    fn listed(&mut self) {
        let Some(pass) = self.pass.as_ref() else {
            return;
        };
        if !pass.every_worker_answered {
            self.pass = None;
            return;
        }
        let settled = self
            .committed
            .iter()
            .filter(|(txid, _)| !pass.held.contains(txid))
            .map(|(&txid, &decider)| (txid, decider))
            .collect();
        self.forget_settled_next(settled);
    }

    /// Forgets the decider's record of the next transaction recovery committed that no
    /// worker holds any more; then lists the orphaned records.
    fn forget_settled_next(&mut self, mut rest: VecDeque<(u64, u16)>) {
        let Some((txid, decider)) = rest.pop_front() else {
            return self.list_decided(0);
        };
        let step = Step::ForgetSettled { txid, rest };
        self.send(
            Target::Decider(decider),
            WorkerRequest::Forget { txid },
            step,
        );
    }

    /// Asks `worker` for its old decision records; past the last worker, the pass is over.
    fn list_decided(&mut self, worker: usize) {
        if worker < self.workers {
            let request = WorkerRequest::Decided {
                older_than_ms: ORPHANED_AFTER.as_millis() as u64,
            };
            self.send(
                Target::Worker(worker),
                request,
                Step::ListDecided { worker },
            );
        } else {
            self.pass = None;
        }
    }

    /// Forgets the next orphaned decision record on `worker`; then the next worker's.
    fn forget_orphan_next(&mut self, worker: usize, mut rest: VecDeque<u64>) {
        let Some(txid) = rest.pop_front() else {
            return self.list_decided(worker + 1);
        };
        tracing::info!(txid, worker, "forgetting a settled decision record");
        let step = Step::ForgetOrphan { worker, rest };
        self.send(Target::Worker(worker), WorkerRequest::Forget { txid }, step);
    }

    fn send(&mut self, to: Target, request: WorkerRequest, step: Step) {
        self.set_step(step);
        self.awaiting = Some(to);
        self.actions.push_back(Action::Send { to, request });
    }

    fn set_step(&mut self, step: Step) {
        if let Some(pass) = self.pass.as_mut() {
            pass.step = step;
        }
    }
}

/// An `InDoubt` request for intents older than `older_than`.
fn in_doubt(older_than: Duration) -> WorkerRequest {
    WorkerRequest::InDoubt {
        older_than_ms: older_than.as_millis() as u64,
    }
}

/// Whether a request was carried out: an answer that is not an error.
fn succeeded(answer: &Option<WorkerResponse>) -> bool {
    matches!(answer, Some(response) if !matches!(response, WorkerResponse::Error(_)))
}

#[cfg(test)]
mod tests {
    use shoal_shared::frame::WorkerError;

    use super::*;

    fn send(to: Target, request: WorkerRequest) -> Action {
        Action::Send { to, request }
    }

    fn found(transactions: &[(u64, u16)]) -> Option<WorkerResponse> {
        Some(WorkerResponse::InDoubt(transactions.to_vec()))
    }

    /// Asserts that `recovery` sends exactly `request` to `to`, then answers it.
    fn step(
        recovery: &mut Recovery,
        to: Target,
        request: WorkerRequest,
        answer: Option<WorkerResponse>,
    ) {
        assert_eq!(recovery.poll_action(), Some(send(to, request)));
        assert_eq!(recovery.poll_action(), None);
        assert_eq!(recovery.next_deadline(), None);
        recovery.handle(Event::Answer { from: to, answer }, Instant::now());
    }

    /// The three listings of `worker`: every intent, those older than [`IN_DOUBT_AFTER`], those
    /// older than [`DECIDED_AFTER`].
    fn list(
        recovery: &mut Recovery,
        worker: usize,
        all: &[(u64, u16)],
        old: &[(u64, u16)],
        stale: &[(u64, u16)],
    ) {
        let to = Target::Worker(worker);
        step(recovery, to, in_doubt(Duration::ZERO), found(all));
        step(recovery, to, in_doubt(IN_DOUBT_AFTER), found(old));
        step(recovery, to, in_doubt(DECIDED_AFTER), found(stale));
    }

    /// `worker`'s decision records older than [`ORPHANED_AFTER`] (the worker measures the age).
    fn decided(recovery: &mut Recovery, worker: usize, records: &[(u64, u16)]) {
        let request = WorkerRequest::Decided {
            older_than_ms: 30_000,
        };
        step(recovery, Target::Worker(worker), request, found(records));
    }

    fn decide(recovery: &mut Recovery, txid: u64, decider: u16, answer: Option<WorkerResponse>) {
        let request = WorkerRequest::Decide {
            txid,
            older_than_ms: 5_000,
        };
        step(recovery, Target::Decider(decider), request, answer);
    }

    /// Starts the next pass, at its deadline.
    fn start_pass(recovery: &mut Recovery) {
        let due = recovery.next_deadline().expect("no pass running");
        recovery.handle(Event::Timeout, due);
    }

    /// Asserts that the pass is over.
    fn pass_over(recovery: &mut Recovery) {
        assert_eq!(recovery.poll_action(), None);
        assert!(recovery.next_deadline().is_some());
    }

    #[test]
    fn a_quiet_pass_lists_each_worker_then_the_old_decision_records() {
        let start = Instant::now();
        let mut recovery = Recovery::new(2, false, start);
        assert_eq!(recovery.next_deadline(), Some(start));
        assert_eq!(recovery.poll_action(), None);
        recovery.handle(Event::Timeout, start);
        list(&mut recovery, 0, &[], &[], &[]);
        list(&mut recovery, 1, &[], &[], &[]);
        decided(&mut recovery, 0, &[]);
        decided(&mut recovery, 1, &[]);
        pass_over(&mut recovery);
        assert_eq!(recovery.next_deadline(), Some(start + RECOVERY_INTERVAL));
        // Too early: nothing.
        recovery.handle(Event::Timeout, start + RECOVERY_INTERVAL / 2);
        assert_eq!(recovery.poll_action(), None);
    }

    #[test]
    fn passes_keep_to_their_grid() {
        let start = Instant::now();
        let mut recovery = Recovery::new(0, false, start);
        // A pass that starts late is followed at once by the one it delayed.
        let late = start + RECOVERY_INTERVAL * 2 + RECOVERY_INTERVAL / 2;
        recovery.handle(Event::Timeout, late);
        assert_eq!(recovery.next_deadline(), Some(start + RECOVERY_INTERVAL));
        recovery.handle(Event::Timeout, late);
        assert_eq!(
            recovery.next_deadline(),
            Some(start + RECOVERY_INTERVAL * 2)
        );
        recovery.handle(Event::Timeout, late);
        assert_eq!(
            recovery.next_deadline(),
            Some(start + RECOVERY_INTERVAL * 3)
        );
        recovery.handle(Event::Timeout, late);
        assert_eq!(
            recovery.next_deadline(),
            Some(start + RECOVERY_INTERVAL * 3)
        );
    }

    #[test]
    fn a_timeout_during_a_pass_does_not_start_another() {
        let start = Instant::now();
        let mut recovery = Recovery::new(1, false, start);
        recovery.handle(Event::Timeout, start);
        recovery.handle(Event::Timeout, start + RECOVERY_INTERVAL * 5);
        list(&mut recovery, 0, &[], &[], &[]);
        decided(&mut recovery, 0, &[]);
        pass_over(&mut recovery);
    }

    #[test]
    fn a_decider_that_died_between_commit_and_forget() {
        // Worker 0 decided tx 7 and recorded the commit; worker 1 still holds its intent.
        let mut recovery = Recovery::new(2, false, Instant::now());
        start_pass(&mut recovery);
        list(&mut recovery, 0, &[], &[], &[]);
        list(&mut recovery, 1, &[(7, 0)], &[], &[(7, 0)]);
        decide(&mut recovery, 7, 0, Some(WorkerResponse::Integer(1)));
        let commit = WorkerRequest::Commit { txid: 7 };
        step(
            &mut recovery,
            Target::Worker(1),
            commit,
            Some(WorkerResponse::Ok),
        );
        // Worker 1 held it when this pass listed it: the record stays.
        decided(&mut recovery, 0, &[]);
        decided(&mut recovery, 1, &[]);
        pass_over(&mut recovery);
        assert_eq!(recovery.to_forget(), vec![7]);

        // Worker 1 does not answer: nobody can tell whether it still holds tx 7.
        start_pass(&mut recovery);
        list(&mut recovery, 0, &[], &[], &[]);
        step(
            &mut recovery,
            Target::Worker(1),
            in_doubt(Duration::ZERO),
            None,
        );
        pass_over(&mut recovery);
        assert_eq!(recovery.to_forget(), vec![7]);

        // Its listing fails half-way: the same.
        start_pass(&mut recovery);
        list(&mut recovery, 0, &[], &[], &[]);
        let to = Target::Worker(1);
        step(&mut recovery, to, in_doubt(Duration::ZERO), found(&[]));
        let failed = Some(WorkerResponse::Error(WorkerError::DiskFull));
        step(&mut recovery, to, in_doubt(IN_DOUBT_AFTER), failed);
        pass_over(&mut recovery);

        // No worker holds it any more: the decider forgets the record.
        start_pass(&mut recovery);
        list(&mut recovery, 0, &[], &[], &[]);
        list(&mut recovery, 1, &[], &[], &[]);
        let forget = WorkerRequest::Forget { txid: 7 };
        step(
            &mut recovery,
            Target::Decider(0),
            forget,
            Some(WorkerResponse::Ok),
        );
        decided(&mut recovery, 0, &[]);
        decided(&mut recovery, 1, &[]);
        pass_over(&mut recovery);
        assert_eq!(recovery.to_forget(), Vec::<u64>::new());

        // Once forgotten, never again.
        start_pass(&mut recovery);
        list(&mut recovery, 0, &[], &[], &[]);
        list(&mut recovery, 1, &[], &[], &[]);
        decided(&mut recovery, 0, &[]);
        decided(&mut recovery, 1, &[]);
        pass_over(&mut recovery);
    }

    #[test]
    fn a_forget_that_fails_is_tried_again() {
        let mut recovery = Recovery::new(1, false, Instant::now());
        start_pass(&mut recovery);
        list(&mut recovery, 0, &[(7, 3)], &[(7, 3)], &[(7, 3)]);
        decide(&mut recovery, 7, 3, Some(WorkerResponse::Integer(1)));
        let commit = WorkerRequest::Commit { txid: 7 };
        step(
            &mut recovery,
            Target::Worker(0),
            commit,
            Some(WorkerResponse::Ok),
        );
        decided(&mut recovery, 0, &[]);
        pass_over(&mut recovery);
        for answer in [None, Some(WorkerResponse::Ok)] {
            start_pass(&mut recovery);
            list(&mut recovery, 0, &[], &[], &[]);
            let forget = WorkerRequest::Forget { txid: 7 };
            step(&mut recovery, Target::Decider(3), forget, answer);
            decided(&mut recovery, 0, &[]);
            pass_over(&mut recovery);
        }
        assert_eq!(recovery.to_forget(), Vec::<u64>::new());
    }

    #[test]
    fn a_commit_that_fails_leaves_no_record_to_forget() {
        let mut recovery = Recovery::new(1, false, Instant::now());
        start_pass(&mut recovery);
        list(&mut recovery, 0, &[(7, 3)], &[], &[(7, 3)]);
        decide(&mut recovery, 7, 3, Some(WorkerResponse::Integer(1)));
        let commit = WorkerRequest::Commit { txid: 7 };
        let failed = Some(WorkerResponse::Error(WorkerError::DiskFull));
        step(&mut recovery, Target::Worker(0), commit, failed);
        decided(&mut recovery, 0, &[]);
        pass_over(&mut recovery);
        assert_eq!(recovery.to_forget(), Vec::<u64>::new());
    }

    #[test]
    fn an_orphaned_decision_record_is_forgotten_once_old_and_held_by_no_worker() {
        let mut recovery = Recovery::new(2, false, Instant::now());
        // Record 9's coordinator lost its Forget. While it is younger than ORPHANED_AFTER the
        // worker does not list it (the request names the age), and nothing is forgotten.
        start_pass(&mut recovery);
        list(&mut recovery, 0, &[], &[], &[]);
        list(&mut recovery, 1, &[(10, 0)], &[], &[]);
        decided(&mut recovery, 0, &[]);
        decided(&mut recovery, 1, &[]);
        pass_over(&mut recovery);

        // Once old, it is forgotten; record 10, whose transaction worker 1 still holds, is not.
        start_pass(&mut recovery);
        list(&mut recovery, 0, &[], &[], &[]);
        list(&mut recovery, 1, &[(10, 0)], &[], &[]);
        decided(&mut recovery, 0, &[(9, 0), (10, 0)]);
        let forget = WorkerRequest::Forget { txid: 9 };
        step(&mut recovery, Target::Worker(0), forget, None);
        decided(&mut recovery, 1, &[]);
        pass_over(&mut recovery);
        // Forgetting an orphan is not remembered: the next pass lists it again if it stayed.
        assert_eq!(recovery.to_forget(), Vec::<u64>::new());
    }

    #[test]
    fn orphans_are_not_forgotten_when_a_worker_did_not_answer() {
        let mut recovery = Recovery::new(2, false, Instant::now());
        start_pass(&mut recovery);
        step(
            &mut recovery,
            Target::Worker(0),
            in_doubt(Duration::ZERO),
            None,
        );
        list(&mut recovery, 1, &[], &[], &[]);
        pass_over(&mut recovery);
    }

    #[test]
    fn an_undecided_in_doubt_intent_is_presumed_aborted() {
        let mut recovery = Recovery::new(1, false, Instant::now());
        start_pass(&mut recovery);
        list(&mut recovery, 0, &[(5, 1)], &[(5, 1)], &[(5, 1)]);
        // The decider answers 0: it has no commit record (and has aborted its own intent).
        decide(&mut recovery, 5, 1, Some(WorkerResponse::Integer(0)));
        let abort = WorkerRequest::Abort { txid: 5 };
        step(
            &mut recovery,
            Target::Worker(0),
            abort,
            Some(WorkerResponse::Ok),
        );
        decided(&mut recovery, 0, &[]);
        pass_over(&mut recovery);
        assert_eq!(recovery.to_forget(), Vec::<u64>::new());
    }

    #[test]
    fn a_recent_undecided_intent_is_left_alone() {
        let mut recovery = Recovery::new(1, false, Instant::now());
        start_pass(&mut recovery);
        // Three intents past DECIDED_AFTER but not IN_DOUBT_AFTER: their coordinators may
        // still be preparing them.
        let stale = [(4, 1), (5, 1), (6, 2)];
        list(&mut recovery, 0, &stale, &[], &stale);
        decide(&mut recovery, 4, 1, Some(WorkerResponse::Integer(0)));
        let in_progress = Some(WorkerResponse::Error(WorkerError::TxInProgress));
        decide(&mut recovery, 5, 1, in_progress);
        decide(&mut recovery, 6, 2, None);
        decided(&mut recovery, 0, &[]);
        pass_over(&mut recovery);
    }

    #[test]
    fn in_a_cluster_the_other_hosts_are_asked_what_they_hold() {
        let mut recovery = Recovery::new(1, true, Instant::now());
        start_pass(&mut recovery);
        list(&mut recovery, 0, &[(7, 0)], &[], &[(7, 0)]);
        decide(&mut recovery, 7, 0, Some(WorkerResponse::Integer(1)));
        let commit = WorkerRequest::Commit { txid: 7 };
        step(
            &mut recovery,
            Target::Worker(0),
            commit,
            Some(WorkerResponse::Ok),
        );
        let ask_others = Action::SendToOtherHosts {
            request: in_doubt(Duration::ZERO),
        };
        assert_eq!(recovery.poll_action(), Some(ask_others.clone()));
        recovery.handle(
            Event::OtherHostsAnswered(vec![found(&[]), found(&[])]),
            Instant::now(),
        );
        decided(&mut recovery, 0, &[]);
        pass_over(&mut recovery);

        // Another host still holds tx 7: its record stays.
        start_pass(&mut recovery);
        list(&mut recovery, 0, &[], &[], &[]);
        assert_eq!(recovery.poll_action(), Some(ask_others.clone()));
        let answers = vec![found(&[]), found(&[(7, 0)])];
        recovery.handle(Event::OtherHostsAnswered(answers), Instant::now());
        decided(&mut recovery, 0, &[]);
        pass_over(&mut recovery);

        // A host does not answer: nothing is forgotten.
        start_pass(&mut recovery);
        list(&mut recovery, 0, &[], &[], &[]);
        assert_eq!(recovery.poll_action(), Some(ask_others.clone()));
        let answers = vec![found(&[]), None];
        recovery.handle(Event::OtherHostsAnswered(answers), Instant::now());
        pass_over(&mut recovery);

        start_pass(&mut recovery);
        list(&mut recovery, 0, &[], &[], &[]);
        assert_eq!(recovery.poll_action(), Some(ask_others));
        recovery.handle(Event::OtherHostsAnswered(vec![found(&[])]), Instant::now());
        let forget = WorkerRequest::Forget { txid: 7 };
        step(
            &mut recovery,
            Target::Decider(0),
            forget,
            Some(WorkerResponse::Ok),
        );
        decided(&mut recovery, 0, &[]);
        pass_over(&mut recovery);
    }

    #[test]
    fn an_answer_that_is_not_awaited_is_ignored() {
        let mut recovery = Recovery::new(2, false, Instant::now());
        start_pass(&mut recovery);
        let to = Target::Worker(0);
        assert_eq!(
            recovery.poll_action(),
            Some(send(to, in_doubt(Duration::ZERO)))
        );
        let stray = Event::Answer {
            from: Target::Worker(1),
            answer: found(&[]),
        };
        recovery.handle(stray, Instant::now());
        recovery.handle(Event::OtherHostsAnswered(vec![]), Instant::now());
        assert_eq!(recovery.poll_action(), None);
        recovery.handle(
            Event::Answer {
                from: to,
                answer: found(&[]),
            },
            Instant::now(),
        );
        step(&mut recovery, to, in_doubt(IN_DOUBT_AFTER), found(&[]));
    }
}

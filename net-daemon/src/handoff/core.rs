//! One move, seen from its target: the five phases of a handoff as a state machine.
//!
//! [`Handoff`] owns the decisions of a move that this host drives: which request comes
//! next, when an attempt has failed, whether a failure restarts the move or gives it up,
//! and what the move measured. It talks to no one itself: the shell (`super::drive`)
//! performs its [`Action`]s (requests to the local worker of the partition, to the
//! source host over the peer link, proposals to the metadata group) and feeds the
//! answers back as [`Event`]s. It has three doors:
//! - [`Handoff::handle`] takes an answer, a failure, the partition's entry in the NI, or
//!   a wake-up, with the time it happened;
//! - [`Handoff::poll_actions`] hands out what to do next;
//! - [`Handoff::next_deadline`] says when to wake it when it waits on no answer.
//!
//! It must never open a socket, spawn a task, sleep or read a clock: time is an
//! argument, so a test replays any order of answers and failures without I/O.
//!
//! The rule about the source's fence lives here: a failure before the source may have
//! fenced the partition restarts the move from step 1 after [`RETRY_AFTER`], if the
//! NI then still names this host as the target at the move's epoch; a failure once
//! the fence was asked for (even a fence request that got no answer) gives the move up
//! with `AbortMove`, so that the source lifts its fence and nothing is copied again
//! behind it.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use shoal_shared::frame::{
    LogEntry, Partition, RecordTable, WorkerError, WorkerRequest, WorkerResponse,
};

use shoal_cluster::ni::{Command, Outcome};
use shoal_cluster::HostId;

/// Bytes of records per chunk of a copy.
pub(crate) const CHUNK_BYTES: u32 = 1 << 20;
/// Log entries per catch-up read.
pub(crate) const CATCH_UP_ENTRIES: u32 = 2000;
/// A catch-up read with fewer entries than this ends the copy phase.
pub(crate) const FENCE_WHEN_BEHIND_BY: usize = 64;
/// Catch-up reads before the fence, however far behind the copy still is.
pub(crate) const CATCH_UP_ROUNDS: usize = 50;
/// Longest the source may refuse the fence (prepared multi-key writes hold its keys).
pub(crate) const FENCE_DEADLINE: Duration = Duration::from_secs(5);
/// Pause before asking the source for the fence again after it refused (`Locked`).
pub(crate) const FENCE_RETRY_AFTER: Duration = Duration::from_millis(10);
/// Pause before a failed move starts again from step 1.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(1);

// A read of fewer than FENCE_WHEN_BEHIND_BY entries must be possible, and the copy
// phase reads the log at least once.
const _: () = assert!(FENCE_WHEN_BEHIND_BY <= CATCH_UP_ENTRIES as usize);
const _: () = assert!(CATCH_UP_ROUNDS >= 1);
const _: () = assert!(FENCE_RETRY_AFTER.as_nanos() < FENCE_DEADLINE.as_nanos());

/// Where a copy goes on: the table and stored key of the next chunk's first record.
type Cursor = Option<(RecordTable, Vec<u8>)>;

/// Something that happened to a move, fed to [`Handoff::handle`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    /// The local worker's answer to [`Action::Worker`]; `Err` when the link failed, timed
    /// out, or the worker answered with an error.
    Worker(Result<WorkerResponse, String>),
    /// The source's answer to [`Action::Source`] or [`Action::FenceSource`]: its worker's
    /// response (which may be an error response), or `Err` when the peer link failed,
    /// timed out, or the source refused the request.
    Source(Result<WorkerResponse, String>),
    /// The metadata group's answer to [`Action::Propose`].
    Proposed(Result<Outcome, String>),
    /// The partition's entry in the NI (`target: None` when it names no move, or when the
    /// partition is missing). A move given up, a move to another host and a new epoch all
    /// show here. Consulted when a paused move would restart.
    Table { epoch: u64, target: Option<HostId> },
    /// The time in [`Handoff::next_deadline`] has come (an early wake-up is ignored).
    Wake,
}

/// What the move needs done, from [`Handoff::poll_actions`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Send this to the local worker of the partition; answer with [`Event::Worker`].
    Worker(WorkerRequest),
    /// Send this to the source's worker of the partition over the peer link (a
    /// `PeerRequest::Partition`); answer with [`Event::Source`].
    Source(WorkerRequest),
    /// Ask the source to fence the partition at the move's epoch (a `PeerRequest::Fence`);
    /// answer with [`Event::Source`].
    FenceSource { epoch: u64 },
    /// Propose this to the metadata group (`CompleteMove`, or `AbortMove` to give the move
    /// up); answer with [`Event::Proposed`].
    Propose(Command),
    /// The attempt failed before the source's fence: at `at`, report the partition's
    /// entry in the NI ([`Event::Table`]) and [`Event::Wake`]; the move then starts again
    /// from step 1 if the NI still names this host as its target at its epoch.
    Retry { at: Instant },
    /// The move is over; nothing more will come.
    Done(End),
}

/// How a move ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum End {
    /// The switch is committed and this host serves the partition.
    Completed(Completed),
    /// A failure after the source's fence gave the move up (`AbortMove` was answered).
    GivenUp,
    /// After a failure, the NI no longer names this host as the target at the move's
    /// epoch: the move was given up or replanned, and is not this task's any more.
    NotWanted,
}

/// What a completed move measured; the shell adds it to `Stats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Completed {
    /// Records copied in the chunks of the successful attempt.
    pub records: u64,
    /// Bytes of keys and values in those records.
    pub bytes: u64,
    /// Log entries replayed, before and after the fence.
    pub entries_replayed: u64,
    /// The write pause: from asking the source for the fence until this host lifted its own.
    pub pause: Duration,
    /// From the start of the successful attempt until the end.
    pub took: Duration,
}

/// Why an attempt failed, and whether the source may have fenced the partition by then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    /// What went wrong, as logged.
    pub reason: String,
    /// The fence had been asked for: the move is given up rather than restarted.
    pub source_fenced: bool,
}

/// The request a move waits on, or the time it waits for.
#[derive(Debug)]
enum Step {
    /// 1. The local worker fences the partition.
    FenceOwn,
    /// 1. The local worker clears its copy.
    ClearOwn,
    /// 2. The source's last commit id of the partition.
    NoteStart,
    /// 2. The source's next chunk of records.
    Export,
    /// 2. The local worker writes a chunk; `next` is where the following one starts.
    Import { next: Cursor },
    /// 3. The source's log after `applied`, in catch-up read number `round` (from 0).
    CatchUp { round: usize },
    /// 3. The local worker replays the `count` entries of read `round`, up to `last`.
    ApplyCatchUp {
        round: usize,
        count: usize,
        last: u64,
    },
    /// 4. The source's answer to the fence request.
    FenceSource,
    /// 4. The source refused the fence (`Locked`): ask again at `at`.
    FenceAgain { at: Instant },
    /// 5. The source's last entries, after its fence.
    Drain,
    /// 5. The local worker replays `count` last entries, up to `last`.
    ApplyDrain { count: usize, last: u64 },
    /// 5. The metadata group's answer to `CompleteMove`.
    Complete,
    /// 5. The local worker lifts its fence.
    UnfenceOwn,
    /// The metadata group's answer to `AbortMove`.
    GiveUp,
    /// A failed attempt waits until `until`, then restarts if the NI still asks for it.
    Paused { until: Instant },
    /// Nothing more to do.
    Over,
}

/// What one attempt measured so far; a new attempt starts from zero.
#[derive(Debug)]
struct Attempt {
    started: Instant,
    /// The source's position at step 2, where the replay starts.
    from_commit_id: u64,
    /// The last commit id replayed into the local copy.
    applied: u64,
    records: u64,
    bytes: u64,
    entries_replayed: u64,
    /// When the fence was first asked for: the start of the write pause.
    fence_asked: Option<Instant>,
}

impl Attempt {
    fn new(started: Instant) -> Attempt {
        Attempt {
            started,
            from_commit_id: 0,
            applied: 0,
            records: 0,
            bytes: 0,
            entries_replayed: 0,
            fence_asked: None,
        }
    }
}

/// The target's side of the move of one partition from `source` to this host (`me`),
/// planned in the NI at `epoch`. See the module header.
#[derive(Debug)]
pub(crate) struct Handoff {
    partition: Partition,
    source: HostId,
    me: HostId,
    epoch: u64,
    /// The partition's entry in the NI, as last reported: (epoch, target).
    table: (u64, Option<HostId>),
    step: Step,
    attempt: Attempt,
    actions: VecDeque<Action>,
    last_failure: Option<Failure>,
}

impl Handoff {
    /// Starts the move of `partition` from `source` to `me` that the NI planned at
    /// `epoch`: its first action fences the local copy.
    pub(crate) fn new(
        partition: Partition,
        source: HostId,
        me: HostId,
        epoch: u64,
        now: Instant,
    ) -> Handoff {
        let mut handoff = Handoff {
            partition,
            source,
            me,
            epoch,
            table: (epoch, Some(me)),
            step: Step::Over,
            attempt: Attempt::new(now),
            actions: VecDeque::new(),
            last_failure: None,
        };
        handoff.start(now);
        handoff
    }

    /// Everything there is to do now, in order. When there is nothing, the move waits on
    /// an answer, or on [`Handoff::next_deadline`], or is over.
    pub(crate) fn poll_actions(&mut self) -> Vec<Action> {
        self.actions.drain(..).collect()
    }

    /// When to feed [`Event::Wake`]: the end of a retry pause, or the next fence request
    /// while the source refuses it. `None` while the move waits on an answer, or is over.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        match self.step {
            Step::FenceAgain { at } => Some(at),
            Step::Paused { until } => Some(until),
            _ => None,
        }
    }

    /// The failure of the last failed attempt, if one failed.
    #[cfg(test)]
    pub(crate) fn last_failure(&self) -> Option<&Failure> {
        self.last_failure.as_ref()
    }

    /// Takes in what happened at `now`. An answer the move does not wait on is ignored.
    pub(crate) fn handle(&mut self, event: Event, now: Instant) {
        let step = std::mem::replace(&mut self.step, Step::Over);
        self.step = match (step, event) {
            (step, Event::Table { epoch, target }) => {
                // Only a restart consults the table: an attempt under way runs to its
                // end, and the NI's own rules refuse a switch at a stale epoch.
                self.table = (epoch, target);
                step
            }
            (Step::FenceAgain { at }, Event::Wake) if now >= at => {
                self.send(Action::FenceSource { epoch: self.epoch });
                Step::FenceSource
            }
            (Step::Paused { until }, Event::Wake) if now >= until => {
                if self.table == (self.epoch, Some(self.me)) {
                    self.start(now);
                    return;
                }
                self.send(Action::Done(End::NotWanted));
                Step::Over
            }
            (Step::FenceOwn, Event::Worker(answer)) => match answer {
                Ok(_) => {
                    let partition = self.partition;
                    self.send(Action::Worker(WorkerRequest::ClearPartition { partition }));
                    Step::ClearOwn
                }
                Err(reason) => return self.fail(reason, false, now),
            },
            (Step::ClearOwn, Event::Worker(answer)) => match answer {
                Ok(_) => {
                    self.send(Action::Source(WorkerRequest::LastCommitIds));
                    Step::NoteStart
                }
                Err(reason) => return self.fail(reason, false, now),
            },
            (Step::NoteStart, Event::Source(answer)) => match answer {
                Ok(WorkerResponse::Positions(positions)) => {
                    let start = positions
                        .into_iter()
                        .find(|(p, _)| *p == self.partition)
                        .map_or(0, |(_, id)| id);
                    tracing::info!(
                        partition = self.partition,
                        source = self.source,
                        from_commit_id = start,
                        "copying a partition"
                    );
                    self.attempt.from_commit_id = start;
                    self.attempt.applied = start;
                    self.export(None)
                }
                Ok(other) => {
                    let reason = format!("unexpected answer to LastCommitIds: {other:?}");
                    return self.fail(reason, false, now);
                }
                Err(reason) => return self.fail(reason, false, now),
            },
            (Step::Export, Event::Source(answer)) => match answer {
                Ok(WorkerResponse::Records { records, next }) => {
                    self.attempt.records += records.len() as u64;
                    self.attempt.bytes += records
                        .iter()
                        .map(|record| (record.key.len() + record.value.len()) as u64)
                        .sum::<u64>();
                    self.send(Action::Worker(WorkerRequest::ImportRecords { records }));
                    Step::Import { next }
                }
                Ok(other) => {
                    let reason = format!("unexpected answer to ExportPartition: {other:?}");
                    return self.fail(reason, false, now);
                }
                Err(reason) => return self.fail(reason, false, now),
            },
            (Step::Import { next }, Event::Worker(answer)) => match answer {
                Ok(_) => match next {
                    Some(next) => self.export(Some(next)),
                    None => self.read_log(Step::CatchUp { round: 0 }),
                },
                Err(reason) => return self.fail(reason, false, now),
            },
            (Step::CatchUp { round }, Event::Source(answer)) => match log_entries(answer) {
                Ok(entries) => match entries.last().map(|entry| entry.commit_id) {
                    Some(last) => {
                        let count = entries.len();
                        self.send(Action::Worker(WorkerRequest::ApplyLog { entries }));
                        Step::ApplyCatchUp { round, count, last }
                    }
                    None => self.caught_up(round, 0, now),
                },
                Err(reason) => return self.fail(reason, false, now),
            },
            (Step::ApplyCatchUp { round, count, last }, Event::Worker(answer)) => match answer {
                Ok(_) => {
                    self.attempt.applied = last;
                    self.attempt.entries_replayed += count as u64;
                    self.caught_up(round, count, now)
                }
                Err(reason) => return self.fail(reason, false, now),
            },
            // From here on, a failure may leave the source fenced: it gives the move up.
            // A fence request without an answer may have fenced the source all the same.
            (Step::FenceSource, Event::Source(answer)) => match answer {
                Ok(WorkerResponse::Ok) => self.read_log(Step::Drain),
                Ok(WorkerResponse::Error(WorkerError::Locked))
                    if now.saturating_duration_since(self.fence_asked(now)) < FENCE_DEADLINE =>
                {
                    Step::FenceAgain {
                        at: now + FENCE_RETRY_AFTER,
                    }
                }
                // The source answered and did not fence: the move restarts.
                Ok(other) => {
                    let reason = format!("the source did not fence the partition: {other:?}");
                    return self.fail(reason, false, now);
                }
                Err(reason) => return self.fail(reason, true, now),
            },
            (Step::Drain, Event::Source(answer)) => match log_entries(answer) {
                Ok(entries) => match entries.last().map(|entry| entry.commit_id) {
                    Some(last) => {
                        let count = entries.len();
                        self.send(Action::Worker(WorkerRequest::ApplyLog { entries }));
                        Step::ApplyDrain { count, last }
                    }
                    None => {
                        self.send(Action::Propose(Command::CompleteMove {
                            partition: self.partition,
                            to: self.me,
                            epoch: self.epoch,
                        }));
                        Step::Complete
                    }
                },
                Err(reason) => return self.fail(reason, true, now),
            },
            (Step::ApplyDrain { count, last }, Event::Worker(answer)) => match answer {
                Ok(_) => {
                    self.attempt.applied = last;
                    self.attempt.entries_replayed += count as u64;
                    self.read_log(Step::Drain)
                }
                Err(reason) => return self.fail(reason, true, now),
            },
            (Step::Complete, Event::Proposed(answer)) => match answer {
                Ok(Outcome::Done) => {
                    self.send(Action::Worker(set_fence(self.partition, false)));
                    Step::UnfenceOwn
                }
                Ok(other) => {
                    let reason = format!("the switch was not committed: {other:?}");
                    return self.fail(reason, true, now);
                }
                Err(reason) => return self.fail(reason, true, now),
            },
            (Step::UnfenceOwn, Event::Worker(answer)) => match answer {
                Ok(_) => {
                    let completed = self.completed(now);
                    self.send(Action::Done(End::Completed(completed)));
                    Step::Over
                }
                // The switch is committed: reconcile lifts the fence, and the restart
                // that follows finds the NI no longer asking for the move.
                Err(reason) => return self.fail(reason, false, now),
            },
            (Step::GiveUp, Event::Proposed(answer)) => match answer {
                Ok(_) => {
                    self.send(Action::Done(End::GivenUp));
                    Step::Over
                }
                // Kept from before the core: the move is retried, from step 1, when the
                // NI still asks for it after the pause.
                Err(error) => {
                    tracing::warn!(
                        partition = self.partition,
                        %error,
                        "cannot give up the failed move; retrying it"
                    );
                    self.pause(now)
                }
            },
            // An answer the move does not wait on, or an early wake-up.
            (step, _) => step,
        };
    }

    /// Queues an action.
    fn send(&mut self, action: Action) {
        self.actions.push_back(action);
    }

    /// Step 1 of a new attempt.
    fn start(&mut self, now: Instant) {
        self.attempt = Attempt::new(now);
        self.send(Action::Worker(set_fence(self.partition, true)));
        self.step = Step::FenceOwn;
    }

    /// Asks the source for the chunk of records from `from` on.
    fn export(&mut self, from: Cursor) -> Step {
        self.send(Action::Source(WorkerRequest::ExportPartition {
            partition: self.partition,
            from,
            max_bytes: CHUNK_BYTES,
        }));
        Step::Export
    }

    /// Asks the source for its log after what was applied, for `step`.
    fn read_log(&mut self, step: Step) -> Step {
        self.send(Action::Source(WorkerRequest::ReadFeed {
            positions: vec![(self.partition, self.attempt.applied)],
            count: CATCH_UP_ENTRIES,
        }));
        step
    }

    /// Catch-up read `round` replayed `count` entries: read again, or fence the source
    /// once close behind or after the last allowed read.
    fn caught_up(&mut self, round: usize, count: usize, now: Instant) -> Step {
        if count >= FENCE_WHEN_BEHIND_BY && round + 1 < CATCH_UP_ROUNDS {
            return self.read_log(Step::CatchUp { round: round + 1 });
        }
        // The pause starts: from the source's fence until this host serves the partition.
        self.attempt.fence_asked = Some(now);
        self.send(Action::FenceSource { epoch: self.epoch });
        Step::FenceSource
    }

    /// When the fence was first asked for in this attempt.
    fn fence_asked(&self, now: Instant) -> Instant {
        self.attempt.fence_asked.unwrap_or(now)
    }

    /// What the attempt that just ended at `now` measured.
    fn completed(&self, now: Instant) -> Completed {
        let attempt = &self.attempt;
        let pause = now.saturating_duration_since(self.fence_asked(now));
        let took = now.saturating_duration_since(attempt.started);
        tracing::info!(
            partition = self.partition,
            source = self.source,
            records = attempt.records,
            bytes = attempt.bytes,
            replayed = attempt.entries_replayed,
            pause_ms = format!("{:.1}", pause.as_micros() as f64 / 1000.0),
            secs = format!("{:.2}", took.as_secs_f64()),
            "took a partition over"
        );
        Completed {
            records: attempt.records,
            bytes: attempt.bytes,
            entries_replayed: attempt.entries_replayed,
            pause,
            took,
        }
    }

    /// The attempt failed: give the move up if the source may be fenced, otherwise pause
    /// before a restart.
    fn fail(&mut self, reason: String, source_fenced: bool, now: Instant) {
        tracing::warn!(
            partition = self.partition,
            source = self.source,
            %reason,
            source_fenced,
            "partition handoff failed"
        );
        self.last_failure = Some(Failure {
            reason,
            source_fenced,
        });
        self.step = match source_fenced {
            true => {
                self.send(Action::Propose(Command::AbortMove {
                    partition: self.partition,
                    epoch: self.epoch,
                }));
                Step::GiveUp
            }
            false => self.pause(now),
        };
    }

    /// Waits [`RETRY_AFTER`] before the move may restart.
    fn pause(&mut self, now: Instant) -> Step {
        let until = now + RETRY_AFTER;
        self.send(Action::Retry { at: until });
        Step::Paused { until }
    }
}

/// The entries of the source's answer to a `ReadFeed`, or why there are none.
fn log_entries(answer: Result<WorkerResponse, String>) -> Result<Vec<LogEntry>, String> {
    match answer? {
        WorkerResponse::Log(entries) => Ok(entries),
        // The source trimmed its log past the position read from: replaying can no longer
        // make the copy exact. A failure like any other: before the fence the move
        // restarts from step 1 (a new copy and a new position), after it the move is
        // given up.
        WorkerResponse::Error(error @ WorkerError::LogTrimmed { .. }) => {
            Err(format!("reading the source's log: {error:?}"))
        }
        WorkerResponse::Error(error) => Err(format!("reading the source's log: {error:?}")),
        other => Err(format!("unexpected answer to ReadFeed: {other:?}")),
    }
}

/// The request that sets or lifts a worker's fence of `partition`.
pub(crate) fn set_fence(partition: Partition, fenced: bool) -> WorkerRequest {
    WorkerRequest::SetFence { partition, fenced }
}

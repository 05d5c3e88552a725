//! The handoff's decisions, driven without sockets or sleeps: the orders of answers,
//! failures and table changes that production has met.

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use shoal_shared::frame::{
    ChangeType, LogEntry, Partition, Record, RecordTable, WorkerError, WorkerRequest,
    WorkerResponse,
};

use super::core::{
    Action, Completed, End, Event, Handoff, CATCH_UP_ENTRIES, CATCH_UP_ROUNDS, CHUNK_BYTES,
    FENCE_DEADLINE, FENCE_RETRY_AFTER, FENCE_WHEN_BEHIND_BY, RETRY_AFTER,
};
use super::fences::{plan, FenceStep};
use shoal_cluster::ni::{Command, Outcome, PartitionEntry};
use shoal_cluster::HostId;

const PARTITION: Partition = 7;
const SOURCE: HostId = 1;
const ME: HostId = 2;
const OTHER: HostId = 3;
const EPOCH: u64 = 5;
/// The source's last commit id of the partition when the copy starts.
const START: u64 = 100;

fn record(key: &str, value: &str) -> Record {
    Record {
        table: RecordTable::Collection(0),
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    }
}

/// `count` log entries of the partition, with commit ids from `first` on.
fn log(first: u64, count: usize) -> Vec<LogEntry> {
    (first..first + count as u64)
        .map(|commit_id| LogEntry {
            partition: PARTITION,
            commit_id,
            timestamp_ms: 0,
            change: ChangeType::Update,
            collection: 0,
            expires_at_ms: None,
            key: b"k".to_vec(),
            data: commit_id.to_be_bytes().to_vec(),
        })
        .collect()
}

fn fence_own() -> Action {
    Action::Worker(WorkerRequest::SetFence {
        partition: PARTITION,
        fenced: true,
    })
}

fn unfence_own() -> Action {
    Action::Worker(WorkerRequest::SetFence {
        partition: PARTITION,
        fenced: false,
    })
}

fn clear_own() -> Action {
    Action::Worker(WorkerRequest::ClearPartition {
        partition: PARTITION,
    })
}

fn export(from: Option<(RecordTable, Vec<u8>)>) -> Action {
    Action::Source(WorkerRequest::ExportPartition {
        partition: PARTITION,
        from,
        max_bytes: CHUNK_BYTES,
    })
}

fn import(records: Vec<Record>) -> Action {
    Action::Worker(WorkerRequest::ImportRecords { records })
}

fn read_log(after: u64) -> Action {
    Action::Source(WorkerRequest::ReadFeed {
        positions: vec![(PARTITION, after)],
        count: CATCH_UP_ENTRIES,
    })
}

fn apply(entries: Vec<LogEntry>) -> Action {
    Action::Worker(WorkerRequest::ApplyLog { entries })
}

fn fence_source() -> Action {
    Action::FenceSource { epoch: EPOCH }
}

fn complete() -> Action {
    Action::Propose(Command::CompleteMove {
        partition: PARTITION,
        to: ME,
        epoch: EPOCH,
    })
}

fn abort() -> Action {
    Action::Propose(Command::AbortMove {
        partition: PARTITION,
        epoch: EPOCH,
    })
}

fn ok() -> Result<WorkerResponse, String> {
    Ok(WorkerResponse::Ok)
}

fn entries(entries: Vec<LogEntry>) -> Result<WorkerResponse, String> {
    Ok(WorkerResponse::Log(entries))
}

/// A move of `PARTITION` from `SOURCE` to `ME` at `EPOCH`, and a clock the test moves.
struct Move {
    handoff: Handoff,
    began: Instant,
    now: Instant,
}

impl Move {
    /// Starts the move; its first action is already taken out and checked.
    fn start() -> Move {
        let began = Instant::now();
        let mut handoff = Handoff::new(PARTITION, SOURCE, ME, EPOCH, began);
        assert_eq!(handoff.poll_actions(), vec![fence_own()]);
        Move {
            handoff,
            began,
            now: began,
        }
    }

    fn at(&self, since_start: Duration) -> Instant {
        self.began + since_start
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    fn handle(&mut self, event: Event) -> Vec<Action> {
        self.handoff.handle(event, self.now);
        self.handoff.poll_actions()
    }

    fn worker(&mut self, answer: Result<WorkerResponse, String>) -> Vec<Action> {
        self.handle(Event::Worker(answer))
    }

    fn source(&mut self, answer: Result<WorkerResponse, String>) -> Vec<Action> {
        self.handle(Event::Source(answer))
    }

    fn proposed(&mut self, answer: Result<Outcome, String>) -> Vec<Action> {
        self.handle(Event::Proposed(answer))
    }

    fn wake(&mut self) -> Vec<Action> {
        self.handle(Event::Wake)
    }

    fn table(&mut self, epoch: u64, target: Option<HostId>) -> Vec<Action> {
        self.handle(Event::Table { epoch, target })
    }

    /// Steps 1–2 with one chunk of two records; the next action reads the log after START.
    fn copy(&mut self) {
        assert_eq!(self.worker(ok()), vec![clear_own()]);
        assert_eq!(
            self.worker(ok()),
            vec![Action::Source(WorkerRequest::LastCommitIds)]
        );
        let positions = WorkerResponse::Positions(vec![(PARTITION, START)]);
        assert_eq!(self.source(Ok(positions)), vec![export(None)]);
        let records = vec![record("a", "1"), record("b", "2")];
        let chunk = WorkerResponse::Records {
            records: records.clone(),
            next: None,
        };
        assert_eq!(self.source(Ok(chunk)), vec![import(records)]);
        assert_eq!(self.worker(ok()), vec![read_log(START)]);
    }

    /// Steps 1–3, the catch-up ending on a short read; the next action fences the source.
    fn up_to_fence(&mut self) {
        self.copy();
        assert_eq!(
            self.source(entries(log(START + 1, 3))),
            vec![apply(log(START + 1, 3))]
        );
        assert_eq!(self.worker(ok()), vec![fence_source()]);
    }

    /// Checks the attempt paused after a failure before the fence: a retry at
    /// `RETRY_AFTER` from now, and nothing else.
    fn assert_paused(&self, actions: Vec<Action>) {
        let at = self.now + RETRY_AFTER;
        assert_eq!(actions, vec![Action::Retry { at }]);
        assert_eq!(self.handoff.next_deadline(), Some(at));
        let failure = self.handoff.last_failure().expect("a failure");
        assert!(!failure.source_fenced, "{failure:?}");
    }

    /// Checks the move is being given up after a failure once the fence was asked for.
    fn assert_giving_up(&mut self, actions: Vec<Action>) {
        assert_eq!(actions, vec![abort()]);
        assert_eq!(self.handoff.next_deadline(), None);
        let failure = self.handoff.last_failure().expect("a failure");
        assert!(failure.source_fenced, "{failure:?}");
        assert_eq!(
            self.proposed(Ok(Outcome::Done)),
            vec![Action::Done(End::GivenUp)]
        );
        self.assert_over();
    }

    /// Ends the pause: the NI as `epoch`/`target` when the time comes.
    fn end_pause(&mut self, epoch: u64, target: Option<HostId>) -> Vec<Action> {
        let at = self.handoff.next_deadline().expect("a pause");
        self.now = at;
        assert_eq!(self.table(epoch, target), vec![]);
        self.wake()
    }

    fn assert_over(&mut self) {
        assert_eq!(self.handoff.poll_actions(), vec![]);
        assert_eq!(self.handoff.next_deadline(), None);
        assert_eq!(self.wake(), vec![]);
        assert_eq!(self.worker(ok()), vec![]);
        assert_eq!(self.source(ok()), vec![]);
    }
}

#[test]
fn a_move_runs_the_five_phases_in_order() {
    let mut handoff = Move::start();
    // 1. fence and clear the local copy.
    assert_eq!(handoff.worker(ok()), vec![clear_own()]);
    assert_eq!(
        handoff.worker(ok()),
        vec![Action::Source(WorkerRequest::LastCommitIds)]
    );
    // 2. note the source's position (other partitions of its worker ignored), then copy.
    let positions = WorkerResponse::Positions(vec![(3, 999), (PARTITION, START)]);
    assert_eq!(handoff.source(Ok(positions)), vec![export(None)]);
    let cursor = Some((RecordTable::Collection(0), b"c".to_vec()));
    let first = vec![record("a", "1"), record("b", "22")];
    let chunk = WorkerResponse::Records {
        records: first.clone(),
        next: cursor.clone(),
    };
    assert_eq!(handoff.source(Ok(chunk)), vec![import(first)]);
    assert_eq!(handoff.worker(ok()), vec![export(cursor)]);
    let last = vec![record("c", "333")];
    let chunk = WorkerResponse::Records {
        records: last.clone(),
        next: None,
    };
    assert_eq!(handoff.source(Ok(chunk)), vec![import(last)]);
    // 3. replay from the noted position; a full read asks again, a short one ends it.
    assert_eq!(handoff.worker(ok()), vec![read_log(START)]);
    let behind = FENCE_WHEN_BEHIND_BY;
    let far = log(START + 1, behind);
    assert_eq!(handoff.source(entries(far.clone())), vec![apply(far)]);
    let applied = START + behind as u64;
    assert_eq!(handoff.worker(ok()), vec![read_log(applied)]);
    let close = log(applied + 1, behind - 1);
    assert_eq!(handoff.source(entries(close.clone())), vec![apply(close)]);
    let applied = applied + behind as u64 - 1;
    // 4. fence the source: the pause starts.
    assert_eq!(handoff.worker(ok()), vec![fence_source()]);
    assert_eq!(handoff.handoff.next_deadline(), None);
    let fence_asked = handoff.now;
    handoff.advance(Duration::from_millis(3));
    // 5. the last entries, until a read finds none; then the switch and the own fence.
    assert_eq!(handoff.source(ok()), vec![read_log(applied)]);
    let tail = log(applied + 1, 2);
    assert_eq!(handoff.source(entries(tail.clone())), vec![apply(tail)]);
    assert_eq!(handoff.worker(ok()), vec![read_log(applied + 2)]);
    assert_eq!(handoff.source(entries(vec![])), vec![complete()]);
    assert_eq!(handoff.proposed(Ok(Outcome::Done)), vec![unfence_own()]);
    handoff.advance(Duration::from_millis(2));
    let done = Completed {
        records: 3,
        bytes: 2 + 3 + 4,
        entries_replayed: (behind + behind - 1 + 2) as u64,
        pause: handoff.now - fence_asked,
        took: handoff.now - handoff.began,
    };
    assert_eq!(done.pause, Duration::from_millis(5));
    assert_eq!(
        handoff.worker(ok()),
        vec![Action::Done(End::Completed(done))]
    );
    assert_eq!(handoff.handoff.last_failure(), None);
    handoff.assert_over();
}

#[test]
fn an_empty_partition_with_no_writes_moves_in_one_read_each_side_of_the_fence() {
    let mut handoff = Move::start();
    assert_eq!(handoff.worker(ok()), vec![clear_own()]);
    assert_eq!(
        handoff.worker(ok()),
        vec![Action::Source(WorkerRequest::LastCommitIds)]
    );
    // A partition the source never wrote has no position: the replay starts at 0.
    let positions = WorkerResponse::Positions(vec![(3, 999)]);
    assert_eq!(handoff.source(Ok(positions)), vec![export(None)]);
    let chunk = WorkerResponse::Records {
        records: vec![],
        next: None,
    };
    assert_eq!(handoff.source(Ok(chunk)), vec![import(vec![])]);
    assert_eq!(handoff.worker(ok()), vec![read_log(0)]);
    assert_eq!(handoff.source(entries(vec![])), vec![fence_source()]);
    assert_eq!(handoff.source(ok()), vec![read_log(0)]);
    assert_eq!(handoff.source(entries(vec![])), vec![complete()]);
    assert_eq!(handoff.proposed(Ok(Outcome::Done)), vec![unfence_own()]);
    let actions = handoff.worker(ok());
    let [Action::Done(End::Completed(done))] = &actions[..] else {
        panic!("not completed: {actions:?}");
    };
    assert_eq!((done.records, done.entries_replayed), (0, 0));
}

#[test]
fn a_fence_request_without_an_answer_gives_the_move_up() {
    let mut handoff = Move::start();
    handoff.up_to_fence();
    let actions = handoff.source(Err("host 1: timed out".to_string()));
    handoff.assert_giving_up(actions);
}

#[test]
fn a_failure_after_the_fence_gives_the_move_up() {
    type Fail = fn(&mut Move) -> Vec<Action>;
    let failures: [(&str, Fail); 6] = [
        ("reading the last entries", |m| {
            m.source(Err("peer link closed".into()))
        }),
        ("the source's log trimmed", |m| {
            m.source(Ok(WorkerResponse::Error(WorkerError::LogTrimmed {
                partition: PARTITION,
                trimmed_through: START + 10,
            })))
        }),
        ("replaying the last entries", |m| {
            assert_eq!(
                m.source(entries(log(START + 4, 1))),
                vec![apply(log(START + 4, 1))]
            );
            m.worker(Err("shard-1: Storage(\"disk\")".into()))
        }),
        ("proposing the switch", |m| {
            assert_eq!(m.source(entries(vec![])), vec![complete()]);
            m.proposed(Err("no leader".into()))
        }),
        ("the switch refused", |m| {
            assert_eq!(m.source(entries(vec![])), vec![complete()]);
            m.proposed(Ok(Outcome::Refused("stale epoch".into())))
        }),
        ("the switch answered otherwise", |m| {
            assert_eq!(m.source(entries(vec![])), vec![complete()]);
            m.proposed(Ok(Outcome::Reclaimed(0)))
        }),
    ];
    for (what, fail) in failures {
        let mut handoff = Move::start();
        handoff.up_to_fence();
        assert_eq!(handoff.source(ok()), vec![read_log(START + 3)], "{what}");
        let actions = fail(&mut handoff);
        handoff.assert_giving_up(actions);
    }
}

#[test]
fn a_failure_before_the_fence_restarts_from_step_1_after_the_pause() {
    type Fail = fn(&mut Move) -> Vec<Action>;
    let failures: [(&str, Fail); 8] = [
        ("fencing the own copy", |m| {
            m.worker(Err("shard-1: link closed".into()))
        }),
        ("clearing the own copy", |m| {
            assert_eq!(m.worker(ok()), vec![clear_own()]);
            m.worker(Err("shard-1: Storage(\"disk\")".into()))
        }),
        ("the source's position", |m| {
            assert_eq!(m.worker(ok()), vec![clear_own()]);
            let _ = m.worker(ok());
            m.source(Ok(WorkerResponse::Integer(1)))
        }),
        ("a chunk", |m| {
            assert_eq!(m.worker(ok()), vec![clear_own()]);
            let _ = m.worker(ok());
            let positions = WorkerResponse::Positions(vec![(PARTITION, START)]);
            assert_eq!(m.source(Ok(positions)), vec![export(None)]);
            m.source(Err("host 1: timed out".into()))
        }),
        ("importing a chunk", |m| {
            assert_eq!(m.worker(ok()), vec![clear_own()]);
            let _ = m.worker(ok());
            let positions = WorkerResponse::Positions(vec![(PARTITION, START)]);
            let _ = m.source(Ok(positions));
            let chunk = WorkerResponse::Records {
                records: vec![record("a", "1")],
                next: None,
            };
            let _ = m.source(Ok(chunk));
            m.worker(Err("shard-1: MapFull".into()))
        }),
        ("a catch-up read", |m| {
            m.copy();
            m.source(Ok(WorkerResponse::Error(WorkerError::Storage("io".into()))))
        }),
        ("a catch-up replay", |m| {
            m.copy();
            let _ = m.source(entries(log(START + 1, 1)));
            m.worker(Err("shard-1: Storage(\"io\")".into()))
        }),
        ("the source refused the request", |m| {
            m.copy();
            m.source(Err("host 1: not a member".into()))
        }),
    ];
    for (what, fail) in failures {
        let mut handoff = Move::start();
        handoff.advance(Duration::from_millis(40));
        let actions = fail(&mut handoff);
        handoff.assert_paused(actions);
        // Early wake-ups change nothing.
        handoff.advance(RETRY_AFTER / 2);
        assert_eq!(handoff.wake(), vec![], "{what}");
        // The NI still asks for the move: it starts again, from step 1.
        assert_eq!(
            handoff.end_pause(EPOCH, Some(ME)),
            vec![fence_own()],
            "{what}"
        );
        assert_eq!(handoff.handoff.next_deadline(), None, "{what}");
    }
}

#[test]
fn a_restarted_move_measures_only_its_last_attempt() {
    let mut handoff = Move::start();
    handoff.copy();
    let actions = handoff.source(Err("host 1: timed out".into()));
    handoff.assert_paused(actions);
    assert_eq!(handoff.end_pause(EPOCH, Some(ME)), vec![fence_own()]);
    let restarted = handoff.now;
    handoff.up_to_fence();
    assert_eq!(handoff.source(ok()), vec![read_log(START + 3)]);
    assert_eq!(handoff.source(entries(vec![])), vec![complete()]);
    assert_eq!(handoff.proposed(Ok(Outcome::Done)), vec![unfence_own()]);
    let actions = handoff.worker(ok());
    let [Action::Done(End::Completed(done))] = &actions[..] else {
        panic!("not completed: {actions:?}");
    };
    assert_eq!((done.records, done.entries_replayed), (2, 3));
    assert_eq!(done.took, handoff.now - restarted);
}

#[test]
fn the_source_may_refuse_the_fence_until_the_deadline() {
    let locked = || Ok(WorkerResponse::Error(WorkerError::Locked));
    let mut handoff = Move::start();
    handoff.up_to_fence();
    let fence_asked = handoff.now;
    // Refused: ask again a little later, until FENCE_DEADLINE after the first request.
    loop {
        handoff.advance(Duration::from_millis(1));
        assert_eq!(handoff.source(locked()), vec![]);
        let again = handoff.now + FENCE_RETRY_AFTER;
        assert_eq!(handoff.handoff.next_deadline(), Some(again));
        handoff.now = again;
        assert_eq!(handoff.wake(), vec![fence_source()]);
        if handoff.now + Duration::from_millis(1) >= fence_asked + FENCE_DEADLINE {
            break;
        }
    }
    // Refused at the deadline: the source did not fence, so the move restarts.
    handoff.now = fence_asked + FENCE_DEADLINE;
    let actions = handoff.source(locked());
    handoff.assert_paused(actions);
    let failure = handoff.handoff.last_failure().expect("a failure");
    assert!(failure.reason.contains("Locked"), "{failure:?}");
    assert_eq!(handoff.end_pause(EPOCH, Some(ME)), vec![fence_own()]);
}

#[test]
fn a_fence_granted_after_refusals_counts_the_pause_from_the_first_request() {
    let locked = || Ok(WorkerResponse::Error(WorkerError::Locked));
    let mut handoff = Move::start();
    handoff.up_to_fence();
    let fence_asked = handoff.now;
    for _ in 0..3 {
        assert_eq!(handoff.source(locked()), vec![]);
        handoff.advance(FENCE_RETRY_AFTER / 2);
        assert_eq!(handoff.wake(), vec![], "woken early");
        handoff.advance(FENCE_RETRY_AFTER / 2);
        assert_eq!(handoff.wake(), vec![fence_source()]);
    }
    assert_eq!(handoff.source(ok()), vec![read_log(START + 3)]);
    assert_eq!(handoff.source(entries(vec![])), vec![complete()]);
    assert_eq!(handoff.proposed(Ok(Outcome::Done)), vec![unfence_own()]);
    let actions = handoff.worker(ok());
    let [Action::Done(End::Completed(done))] = &actions[..] else {
        panic!("not completed: {actions:?}");
    };
    assert_eq!(done.pause, handoff.now - fence_asked);
    assert_eq!(done.pause, FENCE_RETRY_AFTER * 3);
}

#[test]
fn a_fence_refused_otherwise_restarts_the_move() {
    let mut handoff = Move::start();
    handoff.up_to_fence();
    let refused = WorkerError::PartitionMoved {
        partition: PARTITION,
    };
    let actions = handoff.source(Ok(WorkerResponse::Error(refused)));
    handoff.assert_paused(actions);
}

#[test]
fn the_catch_up_is_bounded_by_catch_up_rounds() {
    let mut handoff = Move::start();
    handoff.copy();
    let mut applied = START;
    for round in 0..CATCH_UP_ROUNDS {
        // Every read is full: the partition is written faster than it is followed.
        let read = log(applied + 1, FENCE_WHEN_BEHIND_BY);
        assert_eq!(handoff.source(entries(read.clone())), vec![apply(read)]);
        applied += FENCE_WHEN_BEHIND_BY as u64;
        let expected = match round + 1 < CATCH_UP_ROUNDS {
            true => read_log(applied),
            false => fence_source(),
        };
        assert_eq!(handoff.worker(ok()), vec![expected], "round {round}");
    }
    // After the fence, the replay goes on until a read finds nothing, however long.
    assert_eq!(handoff.source(ok()), vec![read_log(applied)]);
    for _ in 0..CATCH_UP_ROUNDS + 5 {
        let read = log(applied + 1, CATCH_UP_ENTRIES as usize);
        assert_eq!(handoff.source(entries(read.clone())), vec![apply(read)]);
        applied += u64::from(CATCH_UP_ENTRIES);
        assert_eq!(handoff.worker(ok()), vec![read_log(applied)]);
    }
    assert_eq!(handoff.source(entries(vec![])), vec![complete()]);
}

#[test]
fn a_log_trimmed_past_the_noted_position_restarts_the_copy() {
    let mut handoff = Move::start();
    handoff.copy();
    // The source trimmed its log past START while the records were copied: the replay
    // cannot make the copy exact, so the move starts over with a new copy.
    let trimmed = WorkerError::LogTrimmed {
        partition: PARTITION,
        trimmed_through: START + 50,
    };
    let actions = handoff.source(Ok(WorkerResponse::Error(trimmed)));
    handoff.assert_paused(actions);
    let failure = handoff.handoff.last_failure().expect("a failure");
    assert!(failure.reason.contains("LogTrimmed"), "{failure:?}");
    assert_eq!(handoff.end_pause(EPOCH, Some(ME)), vec![fence_own()]);
    // The new attempt notes the source's new position and replays from there.
    assert_eq!(handoff.worker(ok()), vec![clear_own()]);
    let _ = handoff.worker(ok());
    let positions = WorkerResponse::Positions(vec![(PARTITION, START + 80)]);
    assert_eq!(handoff.source(Ok(positions)), vec![export(None)]);
    let chunk = WorkerResponse::Records {
        records: vec![],
        next: None,
    };
    let _ = handoff.source(Ok(chunk));
    assert_eq!(handoff.worker(ok()), vec![read_log(START + 80)]);
}

#[test]
fn a_move_the_ni_no_longer_asks_for_is_not_restarted() {
    // The NI changes mid-copy: the move given up, moved to another host, a new epoch.
    let changes = [
        (EPOCH + 1, None),
        (EPOCH, Some(OTHER)),
        (EPOCH + 1, Some(ME)),
    ];
    for (epoch, target) in changes {
        let mut handoff = Move::start();
        assert_eq!(handoff.worker(ok()), vec![clear_own()]);
        // The attempt under way runs on: only a restart consults the table.
        assert_eq!(handoff.table(epoch, target), vec![]);
        assert_eq!(
            handoff.worker(ok()),
            vec![Action::Source(WorkerRequest::LastCommitIds)]
        );
        let actions = handoff.source(Err("host 1: not a member".into()));
        handoff.assert_paused(actions);
        assert_eq!(
            handoff.end_pause(epoch, target),
            vec![Action::Done(End::NotWanted)]
        );
        handoff.assert_over();
    }
}

#[test]
fn a_move_replanned_mid_move_and_refused_at_the_switch_is_given_up() {
    let mut handoff = Move::start();
    handoff.up_to_fence();
    assert_eq!(handoff.table(EPOCH + 1, None), vec![]);
    assert_eq!(handoff.source(ok()), vec![read_log(START + 3)]);
    assert_eq!(handoff.source(entries(vec![])), vec![complete()]);
    let actions = handoff.proposed(Ok(Outcome::Refused("stale epoch".into())));
    handoff.assert_giving_up(actions);
}

#[test]
fn a_move_that_cannot_be_given_up_is_retried_while_the_ni_asks_for_it() {
    // Kept from before the core: when `AbortMove` gets no answer, the move pauses and
    // starts again from step 1 if the NI still names this host (the source stays fenced
    // meanwhile, and the new attempt copies behind its fence).
    let mut handoff = Move::start();
    handoff.up_to_fence();
    assert_eq!(handoff.source(Err("timed out".into())), vec![abort()]);
    let actions = handoff.proposed(Err("no leader".into()));
    assert_eq!(
        actions,
        vec![Action::Retry {
            at: handoff.now + RETRY_AFTER
        }]
    );
    assert_eq!(handoff.end_pause(EPOCH, Some(ME)), vec![fence_own()]);

    // Once the NI shows the move given up, it ends there.
    let mut handoff = Move::start();
    handoff.up_to_fence();
    assert_eq!(handoff.source(Err("timed out".into())), vec![abort()]);
    let _ = handoff.proposed(Err("no leader".into()));
    assert_eq!(
        handoff.end_pause(EPOCH + 1, None),
        vec![Action::Done(End::NotWanted)]
    );
}

#[test]
fn a_failed_unfence_after_the_switch_ends_without_a_restart() {
    let mut handoff = Move::start();
    handoff.up_to_fence();
    assert_eq!(handoff.source(ok()), vec![read_log(START + 3)]);
    assert_eq!(handoff.source(entries(vec![])), vec![complete()]);
    assert_eq!(handoff.proposed(Ok(Outcome::Done)), vec![unfence_own()]);
    // The switch is committed: no `AbortMove`; reconcile lifts the fence later, and the
    // NI (a new epoch, no target) no longer asks for the move.
    let actions = handoff.worker(Err("shard-1: link closed".into()));
    handoff.assert_paused(actions);
    assert_eq!(
        handoff.end_pause(EPOCH + 1, None),
        vec![Action::Done(End::NotWanted)]
    );
}

#[test]
fn a_pause_ends_at_its_deadline_not_before() {
    let mut handoff = Move::start();
    let actions = handoff.worker(Err("shard-1: link closed".into()));
    handoff.assert_paused(actions);
    let at = handoff.at(RETRY_AFTER);
    handoff.now = at - Duration::from_nanos(1);
    assert_eq!(handoff.wake(), vec![]);
    assert_eq!(handoff.handoff.next_deadline(), Some(at));
    handoff.now = at;
    assert_eq!(handoff.wake(), vec![fence_own()]);
}

fn entry(owner: HostId, target: Option<HostId>) -> PartitionEntry {
    PartitionEntry {
        target,
        ..PartitionEntry::single(owner, EPOCH)
    }
}

#[test]
fn reconcile_unfences_what_this_host_owns_unless_it_moves_away() {
    let table = [entry(ME, None), entry(ME, None), entry(ME, Some(OTHER))];
    let fenced = BTreeSet::from([0, 2]);
    let mut cleared = HashSet::from([0, 1, 9]);
    let steps = plan(&table, ME, &fenced, &HashSet::new(), &mut cleared);
    // Partition 1 is not fenced; partition 2's fence is the source's, for its move.
    assert_eq!(steps, vec![FenceStep::Unfence(0)]);
    // Owned partitions are forgotten as cleared: losing one later clears it again.
    assert_eq!(cleared, HashSet::from([9]));
    // With followers, the primary's fence is replication's (promises set it, opening a
    // term lifts it): reconcile leaves it.
    let mut replicated = entry(ME, None);
    replicated.replicas = vec![OTHER];
    let steps = plan(
        &[replicated],
        ME,
        &BTreeSet::from([0]),
        &HashSet::new(),
        &mut cleared,
    );
    assert_eq!(steps, vec![]);
}

#[test]
fn reconcile_fences_and_clears_what_this_host_neither_owns_nor_receives_once() {
    let table = [
        entry(OTHER, None),
        entry(OTHER, None),
        entry(OTHER, Some(SOURCE)),
        entry(OTHER, Some(ME)),
    ];
    let fenced = BTreeSet::from([1]);
    let mut cleared = HashSet::new();
    let steps = plan(&table, ME, &fenced, &HashSet::new(), &mut cleared);
    assert_eq!(
        steps,
        vec![
            FenceStep::FenceAndClear {
                partition: 0,
                owner: OTHER,
                already_fenced: false
            },
            FenceStep::FenceAndClear {
                partition: 1,
                owner: OTHER,
                already_fenced: true
            },
            FenceStep::FenceAndClear {
                partition: 2,
                owner: OTHER,
                already_fenced: false
            },
        ]
    );
    // The shell counts the clears that succeeded (0 and 2): only 1 is tried again.
    cleared.extend([0, 2]);
    let fenced = BTreeSet::from([0, 1, 2]);
    let steps = plan(&table, ME, &fenced, &HashSet::new(), &mut cleared);
    assert_eq!(
        steps,
        vec![FenceStep::FenceAndClear {
            partition: 1,
            owner: OTHER,
            already_fenced: true
        }]
    );
}

#[test]
fn reconcile_leaves_driven_partitions_to_their_move() {
    // Partition 0 moves here and its task runs; partition 1 moves here and its task has
    // not started yet: neither is fenced, unfenced or cleared by reconcile.
    let table = [
        entry(OTHER, Some(ME)),
        entry(OTHER, Some(ME)),
        entry(ME, None),
    ];
    let fenced = BTreeSet::from([0, 1, 2]);
    let driving = HashSet::from([0, 2]);
    let mut cleared = HashSet::from([2]);
    let steps = plan(&table, ME, &fenced, &driving, &mut cleared);
    assert_eq!(steps, vec![]);
    // A driven partition is not even forgotten as cleared.
    assert_eq!(cleared, HashSet::from([2]));
}

#[test]
fn reconcile_clears_again_a_partition_owned_then_lost() {
    let mut cleared = HashSet::new();
    let none = HashSet::new();
    let lost = [entry(OTHER, None)];
    let owned = [entry(ME, None)];
    let fence_and_clear = FenceStep::FenceAndClear {
        partition: 0,
        owner: OTHER,
        already_fenced: false,
    };
    assert_eq!(
        plan(&lost, ME, &BTreeSet::new(), &none, &mut cleared),
        vec![fence_and_clear.clone()]
    );
    cleared.insert(0);
    assert_eq!(
        plan(&lost, ME, &BTreeSet::from([0]), &none, &mut cleared),
        vec![]
    );
    assert_eq!(
        plan(&owned, ME, &BTreeSet::from([0]), &none, &mut cleared),
        vec![FenceStep::Unfence(0)]
    );
    assert_eq!(
        plan(&lost, ME, &BTreeSet::new(), &none, &mut cleared),
        vec![fence_and_clear]
    );
}

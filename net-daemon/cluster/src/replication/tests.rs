//! Step-by-step tests of the replication cores: each drives one bad order by hand.

use std::time::{Duration, Instant};

use super::failover::{self, Failover};
use super::replica::{Action, Durable, Event, Replica, View, REPORT_AGAIN};
use super::*;
use crate::HostId;

fn settings() -> Settings {
    Settings::default()
}

fn history(starts: &[(Term, CommitId)]) -> History {
    History::from_starts(starts.to_vec()).unwrap()
}

fn replica(me: HostId, fenced: Term, history: History, last: CommitId, now: Instant) -> Replica {
    let durable = Durable {
        fenced,
        history,
        log_start: 1,
        last,
    };
    Replica::new(me, settings(), durable, 7, now)
}

fn view(term: Term, primary: HostId) -> Event {
    Event::View(View {
        term,
        primary,
        members: vec![1, 2, 3],
        out_of_sync: Vec::new(),
        dropping: None,
    })
}

fn received(from: HostId, message: Message) -> Event {
    Event::Received { from, message }
}

/// The messages among `actions`, with their receivers.
fn sent(actions: &[Action]) -> Vec<(HostId, Message)> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::Send { to, message } => Some((*to, message.clone())),
            _ => None,
        })
        .collect()
}

/// The one append sent to `to` among `actions` (the last one when there are several).
fn append_to(actions: &[Action], to: HostId) -> Append {
    sent(actions)
        .into_iter()
        .filter_map(|(host, message)| match message {
            Message::Append(append) if host == to => Some(append),
            _ => None,
        })
        .next_back()
        .unwrap_or_else(|| panic!("no append to {to} in {actions:?}"))
}

/// Every append sent to `to` among `actions`, in order.
fn appends_to(actions: &[Action], to: HostId) -> Vec<Append> {
    sent(actions)
        .into_iter()
        .filter_map(|(host, message)| match message {
            Message::Append(append) if host == to => Some(append),
            _ => None,
        })
        .collect()
}

fn acks(actions: &[Action]) -> Vec<AckResult> {
    sent(actions)
        .into_iter()
        .filter_map(|(_, message)| match message {
            Message::Ack(ack) => Some(ack.result),
            _ => None,
        })
        .collect()
}

fn committed(actions: &[Action]) -> Option<CommitId> {
    actions.iter().find_map(|action| match action {
        Action::Committed { up_to } => Some(*up_to),
        _ => None,
    })
}

/// A primary of `term` on host 1, over a log of `last` entries of term 1, with its marker
/// written: asked for once follower 2 answered in the term (claiming nothing).
fn open_primary(term: Term, last: CommitId, now: Instant) -> (Replica, Vec<Action>) {
    let mut primary = replica(1, term - 1, history(&[(1, 1)]), last, now);
    primary.handle(view(term, 1), now);
    let opened = primary.poll_actions();
    assert!(opened.contains(&Action::PersistTerm { term }));
    assert!(!opened.contains(&Action::WriteMarker { term }));
    primary.handle(received(2, answered_in(term)), now);
    assert!(primary
        .poll_actions()
        .contains(&Action::WriteMarker { term }));
    primary.handle(Event::MarkerWritten { at: last + 1 }, now);
    let actions = primary.poll_actions();
    (primary, actions)
}

/// A follower's answer in `term` that claims no entry and promises nothing.
fn answered_in(term: Term) -> Message {
    Message::Ack(Ack {
        term,
        result: AckResult::Holds { last: 0 },
        stamp: None,
    })
}

/// A follower's answer to `append`, once what it applies is durable.
fn follower_answer(follower: &mut Replica, append: Append, now: Instant) -> Ack {
    follower.handle(received(1, Message::Append(append)), now);
    let mut actions = follower.poll_actions();
    if let Some(Action::Apply { last, .. }) =
        actions.iter().find(|a| matches!(a, Action::Apply { .. }))
    {
        follower.handle(Event::Applied { last: *last }, now);
        actions = follower.poll_actions();
    }
    sent(&actions)
        .into_iter()
        .find_map(|(_, message)| match message {
            Message::Ack(ack) => Some(ack),
            _ => None,
        })
        .expect("the follower answers")
}

#[test]
fn a_write_commits_only_once_enough_copies_hold_it() {
    let now = Instant::now();
    let (mut primary, marker_sent) = open_primary(2, 0, now);
    let mut follower = replica(2, 1, History::default(), 0, now);
    // The client write (id 2, after the marker) is durable on the primary alone.
    primary.handle(Event::Written { last: 2 }, now);
    let actions = primary.poll_actions();
    assert_eq!(committed(&actions), None, "one copy of two is not enough");
    assert_eq!(primary.readable(now), None);
    let marker = append_to(&marker_sent, 2);
    let write = append_to(&actions, 2);
    assert_eq!(
        (marker.first, marker.last, write.first, write.last),
        (1, 1, 2, 2)
    );
    let ack = follower_answer(&mut follower, marker, now);
    assert_eq!(ack.result, AckResult::Holds { last: 1 });
    primary.handle(received(2, Message::Ack(ack)), now);
    assert_eq!(
        committed(&primary.poll_actions()),
        Some(1),
        "the marker alone"
    );
    assert_eq!(primary.readable(now), Some(1));
    let ack = follower_answer(&mut follower, write, now);
    primary.handle(received(2, Message::Ack(ack)), now);
    assert_eq!(committed(&primary.poll_actions()), Some(2));
    assert_eq!(primary.readable(now), Some(2));
}

#[test]
fn an_older_terms_entries_on_enough_copies_commit_only_with_the_new_terms_marker() {
    // Raft's figure 8: entries 1..=5 of term 1 reach a majority under the primary of
    // term 3 before its marker does; they must not count as committed on their own.
    let now = Instant::now();
    let mut primary = replica(1, 2, history(&[(1, 1)]), 5, now);
    primary.handle(view(3, 1), now);
    let actions = primary.poll_actions();
    let mut follower = replica(2, 2, history(&[(1, 1)]), 3, now);
    // The first heartbeat finds the follower three entries short.
    let ack = follower_answer(&mut follower, append_to(&actions, 2), now);
    assert_eq!(ack.result, AckResult::Gap { last: 3 });
    primary.handle(received(2, Message::Ack(ack)), now);
    let ack = follower_answer(&mut follower, append_to(&primary.poll_actions(), 2), now);
    assert_eq!(ack.result, AckResult::Holds { last: 5 });
    primary.handle(received(2, Message::Ack(ack)), now);
    assert_eq!(
        committed(&primary.poll_actions()),
        None,
        "term 1's entries alone"
    );
    assert_eq!(primary.readable(now), None);
    // The marker (id 6) is durable and reaches the follower: everything commits.
    primary.handle(Event::MarkerWritten { at: 6 }, now);
    let actions = primary.poll_actions();
    let ack = follower_answer(&mut follower, append_to(&actions, 2), now);
    assert_eq!(follower.history(), &history(&[(1, 1), (3, 6)]));
    primary.handle(received(2, Message::Ack(ack)), now);
    assert_eq!(committed(&primary.poll_actions()), Some(6));
}

#[test]
fn a_follower_refuses_an_older_term_and_the_old_primary_steps_down() {
    let now = Instant::now();
    let (mut old, actions) = open_primary(2, 0, now);
    let mut follower = replica(2, 3, History::default(), 0, now);
    follower.handle(received(1, Message::Append(append_to(&actions, 2))), now);
    let answer = follower.poll_actions();
    assert!(!answer.iter().any(|a| matches!(a, Action::Apply { .. })));
    let ack = match &sent(&answer)[..] {
        [(1, Message::Ack(ack))] => ack.clone(),
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(ack.result, AckResult::Refused { fenced: 3 });
    old.handle(received(2, Message::Ack(ack)), now);
    let actions = old.poll_actions();
    assert!(actions.contains(&Action::SteppedDown { term: 3 }));
    assert_eq!(old.primary_term(), None);
    assert!(!old.writable(now));
    assert_eq!(old.fenced(), 3);
}

#[test]
fn a_follower_holding_an_old_primarys_tail_takes_a_full_copy() {
    let now = Instant::now();
    // The primary of term 3 took over at id 6; the follower holds ids 6..=8 of term 2,
    // which the primary never had.
    let mut append = Append {
        term: 3,
        history: history(&[(1, 1), (3, 6)]),
        log_start: 1,
        log_end: 10,
        first: 9,
        last: 10,
        commit: 10,
        stamp: Stamp { run: 1, at_us: 0 },
    };
    let mut follower = replica(2, 2, history(&[(1, 1), (2, 6)]), 8, now);
    follower.handle(received(1, Message::Append(append.clone())), now);
    let actions = follower.poll_actions();
    assert!(actions.contains(&Action::StartCopy { from: 1, term: 3 }));
    assert_eq!(acks(&actions), vec![AckResult::Copying]);
    // A tail of the same term as the primary's log but past its end is foreign too.
    let mut follower = replica(2, 2, history(&[(1, 1)]), 8, now);
    append.history = history(&[(1, 1), (3, 7)]);
    append.log_end = 6;
    append.first = 7;
    append.last = 6;
    follower.handle(received(1, Message::Append(append.clone())), now);
    assert!(follower
        .poll_actions()
        .contains(&Action::StartCopy { from: 1, term: 3 }));
    // A follower whose log is a prefix of the primary's just applies the rest.
    let mut follower = replica(2, 2, history(&[(1, 1)]), 5, now);
    append.history = history(&[(1, 1), (3, 6)]);
    append.log_end = 10;
    append.first = 6;
    append.last = 10;
    follower.handle(received(1, Message::Append(append)), now);
    let actions = follower.poll_actions();
    assert!(actions.contains(&Action::Apply {
        first: 6,
        last: 10,
        history: history(&[(1, 1), (3, 6)]),
    }));
}

#[test]
fn a_follower_behind_the_trimmed_log_takes_a_full_copy() {
    let now = Instant::now();
    let mut follower = replica(2, 1, history(&[(1, 1)]), 3, now);
    let append = Append {
        term: 1,
        history: history(&[(1, 1)]),
        log_start: 10,
        log_end: 20,
        first: 10,
        last: 20,
        commit: 20,
        stamp: Stamp { run: 1, at_us: 0 },
    };
    follower.handle(received(1, Message::Append(append)), now);
    assert!(follower
        .poll_actions()
        .contains(&Action::StartCopy { from: 1, term: 1 }));
}

#[test]
fn a_lost_append_is_sent_again_after_the_next_heartbeat_finds_the_gap() {
    let now = Instant::now();
    let (mut primary, marker_sent) = open_primary(2, 0, now);
    let mut follower = replica(2, 1, History::default(), 0, now);
    primary.handle(Event::Written { last: 3 }, now);
    // Both appends (the marker, then ids 2..=3) are lost.
    let lost = [marker_sent, primary.poll_actions()].concat();
    assert_eq!(appends_to(&lost, 2).len(), 2);
    // The heartbeat after them starts past what the follower holds.
    let later = now + settings().heartbeat;
    primary.handle(Event::Tick, later);
    let heartbeat = append_to(&primary.poll_actions(), 2);
    assert_eq!((heartbeat.first, heartbeat.last), (4, 3));
    let ack = follower_answer(&mut follower, heartbeat, later);
    assert_eq!(ack.result, AckResult::Gap { last: 0 });
    primary.handle(received(2, Message::Ack(ack)), later);
    let again = append_to(&primary.poll_actions(), 2);
    assert_eq!((again.first, again.last), (1, 3));
    let ack = follower_answer(&mut follower, again, later);
    primary.handle(received(2, Message::Ack(ack)), later);
    assert_eq!(committed(&primary.poll_actions()), Some(3));
}

#[test]
fn a_failover_query_is_answered_after_the_promise_and_the_pending_apply_and_fences_the_old_primary()
{
    let now = Instant::now();
    let (_, actions) = open_primary(2, 0, now);
    let mut follower = replica(2, 1, History::default(), 0, now);
    follower.handle(received(1, Message::Append(append_to(&actions, 2))), now);
    let applying = follower.poll_actions();
    assert!(applying
        .iter()
        .any(|a| matches!(a, Action::Apply { last: 1, .. })));
    let asked = now + Duration::from_millis(10);
    follower.handle(
        received(
            9,
            Message::Fence {
                term: 3,
                released: None,
            },
        ),
        asked,
    );
    let actions = follower.poll_actions();
    assert_eq!(
        actions,
        vec![Action::PersistTerm { term: 3 }],
        "promise first, answer later"
    );
    // The apply finishes: no ack goes to the fenced-off primary, and no answer yet.
    follower.handle(Event::Applied { last: 1 }, asked);
    assert!(sent(&follower.poll_actions()).is_empty());
    let promise_end = now + settings().lease;
    follower.handle(Event::Tick, promise_end - Duration::from_millis(1));
    assert!(sent(&follower.poll_actions()).is_empty());
    follower.handle(Event::Tick, promise_end);
    let answer = FenceAnswer {
        term: 3,
        position: Position { term: 2, last: 1 },
        copying: false,
        acknowledged: None,
    };
    assert_eq!(
        sent(&follower.poll_actions()),
        vec![(9, Message::FenceAnswer(answer))]
    );
}

#[test]
fn a_promise_to_a_primary_released_by_a_planned_handover_no_longer_holds_the_answer_back() {
    let start = Instant::now();
    let (_, actions) = open_primary(2, 0, start);
    let marker = append_to(&actions, 2);
    // Past the promise every copy makes when it starts.
    let now = start + settings().lease;
    let asked = now + Duration::from_millis(10);
    let answered = |follower: &mut Replica| {
        sent(&follower.poll_actions())
            .into_iter()
            .any(|(to, message)| to == 9 && matches!(message, Message::FenceAnswer(_)))
    };
    // Released from another term's primary: the promise to term 2's still holds.
    let mut follower = replica(2, 1, History::default(), 0, start);
    follower_answer(&mut follower, marker.clone(), now);
    let elsewhere = Message::Fence {
        term: 3,
        released: Some(1),
    };
    follower.handle(received(9, elsewhere), asked);
    assert!(!answered(&mut follower));
    // Released from term 2's: it answers at once.
    let released = Message::Fence {
        term: 3,
        released: Some(2),
    };
    follower.handle(received(9, released.clone()), asked);
    assert!(answered(&mut follower));
    // A promise made before a restart is no one's to release: it is waited out.
    let mut restarted = replica(2, 2, history(&[(2, 1)]), 1, now);
    restarted.handle(received(9, released), asked);
    assert!(!answered(&mut restarted));
    restarted.handle(Event::Tick, now + settings().lease);
    assert!(answered(&mut restarted));
}

#[test]
fn a_planned_handover_releases_the_others_once_the_old_primary_stepped_down() {
    let now = Instant::now();
    let mut round =
        Failover::new(5, vec![1, 2, 3], vec![1, 2, 3], vec![1, 2, 3], 2, now).preferring(3);
    round.poll_actions();
    let fences = |round: &mut Failover| -> Vec<(HostId, Option<Term>)> {
        round
            .poll_actions()
            .into_iter()
            .filter_map(|action| match action {
                failover::Action::Send {
                    to,
                    message: Message::Fence { released, .. },
                } => Some((to, released)),
                _ => None,
            })
            .collect()
    };
    // An answer that vouches for nothing releases no one.
    let tell = |round: &mut Failover, from, answer| {
        round.handle(failover::Event::Answer { from, answer }, now);
    };
    tell(&mut round, 2, handover_answer((4, 12), None));
    assert_eq!(fences(&mut round), vec![]);
    // The old primary stepped down in term 4: the copy still to answer is asked again.
    tell(&mut round, 1, handover_answer((4, 12), Some((4, 12))));
    assert_eq!(fences(&mut round), vec![(3, Some(4))]);
    // A failover round (no preferred copy) never releases.
    let mut failover = Failover::new(5, vec![1, 2, 3], vec![1, 2, 3], vec![1, 2, 3], 2, now);
    failover.poll_actions();
    tell(&mut failover, 1, handover_answer((4, 12), Some((4, 12))));
    assert_eq!(fences(&mut failover), vec![]);
}

#[test]
fn the_lease_lasts_from_the_acknowledged_send_and_not_from_a_previous_run() {
    let now = Instant::now();
    let (mut primary, actions) = open_primary(2, 0, now);
    let mut follower = replica(2, 1, History::default(), 0, now);
    let sent_at = now + Duration::from_millis(5);
    primary.handle(Event::Tick, sent_at);
    let ack = follower_answer(&mut follower, append_to(&actions, 2), now);
    primary.handle(received(2, Message::Ack(ack.clone())), sent_at);
    let lease = settings().lease - settings().lease_margin;
    // The ack echoes the stamp of time `now`.
    assert_eq!(
        primary.readable(now + lease - Duration::from_millis(1)),
        Some(1)
    );
    assert_eq!(primary.readable(now + lease), None, "the lease ran out");
    // After a restart, the same (old) stamp gives no lease.
    let durable = Durable {
        fenced: 2,
        history: history(&[(2, 1)]),
        log_start: 1,
        last: 1,
    };
    let mut restarted = Replica::new(1, settings(), durable, 8, now);
    restarted.handle(view(2, 1), now);
    restarted.handle(Event::MarkerWritten { at: 2 }, now);
    restarted.poll_actions();
    let mut old = ack;
    old.result = AckResult::Holds { last: 2 };
    restarted.handle(received(2, Message::Ack(old)), now);
    assert_eq!(committed(&restarted.poll_actions()), Some(2));
    assert_eq!(
        restarted.readable(now),
        None,
        "a stamp of another run is no promise"
    );
}

#[test]
fn writes_are_admitted_only_while_enough_followers_answer() {
    let now = Instant::now();
    let (mut primary, actions) = open_primary(2, 0, now);
    let later = now + settings().good_replica_within + Duration::from_millis(1);
    assert!(!primary.writable(later), "no follower heard from lately");
    let mut follower = replica(2, 1, History::default(), 0, now);
    let ack = follower_answer(&mut follower, append_to(&actions, 2), later);
    primary.handle(received(2, Message::Ack(ack)), later);
    assert!(primary.writable(later));
    let silent = later + settings().good_replica_within + Duration::from_millis(1);
    assert!(!primary.writable(silent));
}

#[test]
fn a_primary_restarted_with_a_stale_view_writes_no_marker_once_refused() {
    // Host 1 led term 6 and restarts before it hears that a failover opened term 7:
    // its followers promised 7 and refuse it. It steps down with its log as it was,
    // which the new primary's log still extends, so it catches up from the log.
    let now = Instant::now();
    let mut restarted = replica(1, 6, history(&[(1, 1), (6, 2)]), 12, now);
    restarted.handle(view(6, 1), now);
    let opened = restarted.poll_actions();
    assert!(!opened.contains(&Action::WriteMarker { term: 6 }));
    assert_eq!(append_to(&opened, 2).term, 6, "it asks its followers first");
    let refused = Message::Ack(Ack {
        term: 6,
        result: AckResult::Refused { fenced: 7 },
        stamp: None,
    });
    restarted.handle(received(2, refused), now);
    let actions = restarted.poll_actions();
    assert!(actions.contains(&Action::SteppedDown { term: 7 }));
    assert!(!actions.contains(&Action::WriteMarker { term: 6 }));
    assert_eq!(restarted.position(), Position { term: 6, last: 12 });
    assert_eq!(restarted.primary_term(), None);
}

#[test]
fn a_silent_primary_is_reported_once_per_silence() {
    let now = Instant::now();
    let mut follower = replica(2, 1, History::default(), 0, now);
    follower.handle(view(1, 1), now);
    follower.poll_actions();
    let silence = settings().primary_silence;
    assert_eq!(follower.next_deadline(), Some(now + silence));
    follower.handle(Event::Tick, now + silence);
    let lost = Action::PrimaryLost {
        primary: 1,
        term: 1,
    };
    assert_eq!(follower.poll_actions(), vec![lost.clone()]);
    follower.handle(Event::Tick, now + silence + Duration::from_millis(10));
    assert!(follower.poll_actions().is_empty());
    follower.handle(Event::Tick, now + silence * 2);
    assert_eq!(follower.poll_actions(), vec![lost]);
}

#[test]
fn a_copy_counts_only_once_its_log_reaches_the_end_of_the_copy() {
    let now = Instant::now();
    let mut follower = replica(2, 1, history(&[(1, 1)]), 3, now);
    let mut append = Append {
        term: 2,
        history: history(&[(1, 1)]),
        log_start: 8,
        log_end: 15,
        first: 8,
        last: 15,
        commit: 15,
        stamp: Stamp { run: 1, at_us: 0 },
    };
    follower.handle(received(1, Message::Append(append.clone())), now);
    assert!(follower
        .poll_actions()
        .contains(&Action::StartCopy { from: 1, term: 2 }));
    follower.handle(
        Event::Copied {
            term: 2,
            from: 10,
            through: 15,
            history: history(&[(1, 1)]),
        },
        now,
    );
    assert_eq!(
        acks(&follower.poll_actions()),
        vec![AckResult::Gap { last: 10 }]
    );
    append.first = 11;
    append.last = 12;
    // The worker's log reaches 14 after the copy's records: the copy claims only 12.
    follower.handle(received(1, Message::Append(append.clone())), now);
    let applying = follower.poll_actions();
    assert!(applying
        .iter()
        .any(|a| matches!(a, Action::Apply { last: 12, .. })));
    follower.handle(Event::Applied { last: 14 }, now);
    assert_eq!(follower.position().last, 12);
    // 12 is short of the copy's end: the primary sends more but counts it for nothing.
    let settling = AckResult::Settling { last: 12 };
    assert_eq!(acks(&follower.poll_actions()), vec![settling]);
    let ack = follower_answer(&mut follower, append.clone(), now);
    assert_eq!(ack.result, settling);
    append.first = 13;
    append.last = 15;
    let ack = follower_answer(&mut follower, append, now);
    assert_eq!(ack.result, AckResult::Holds { last: 15 });
}

#[test]
fn promoted_while_still_applying_the_marker_comes_after_the_old_entries() {
    let now = Instant::now();
    let mut follower = replica(2, 1, history(&[(1, 1)]), 2, now);
    let append = Append {
        term: 1,
        history: history(&[(1, 1)]),
        log_start: 1,
        log_end: 4,
        first: 3,
        last: 4,
        commit: 2,
        stamp: Stamp { run: 1, at_us: 0 },
    };
    follower.handle(received(1, Message::Append(append)), now);
    follower.poll_actions();
    follower.handle(view(2, 2), now);
    assert!(!follower
        .poll_actions()
        .contains(&Action::WriteMarker { term: 2 }));
    follower.handle(received(3, answered_in(2)), now);
    assert!(follower
        .poll_actions()
        .contains(&Action::WriteMarker { term: 2 }));
    follower.handle(Event::Applied { last: 4 }, now);
    follower.handle(Event::MarkerWritten { at: 5 }, now);
    assert_eq!(follower.history(), &history(&[(1, 1), (2, 5)]));
    assert_eq!(follower.position(), Position { term: 2, last: 5 });
}

fn answer(term: Term, position: (Term, CommitId), copying: bool) -> FenceAnswer {
    FenceAnswer {
        term,
        position: Position {
            term: position.0,
            last: position.1,
        },
        copying,
        acknowledged: None,
    }
}

fn promoted(round: &mut Failover) -> Option<HostId> {
    round
        .poll_actions()
        .into_iter()
        .find_map(|action| match action {
            failover::Action::Promote { primary, .. } => Some(primary),
            _ => None,
        })
}

#[test]
fn failover_waits_for_enough_answers_then_picks_the_highest_position() {
    let now = Instant::now();
    // Three copies, two needed per write: two answers are needed.
    let mut round = Failover::new(5, vec![1, 2, 3], vec![1, 2, 3], vec![2, 3], 2, now);
    let queries = round.poll_actions();
    assert_eq!(queries.len(), 3);
    let from_2 = failover::Event::Answer {
        from: 2,
        answer: answer(5, (4, 10), false),
    };
    round.handle(from_2, now);
    assert_eq!(promoted(&mut round), None, "one answer is not enough");
    let from_3 = failover::Event::Answer {
        from: 3,
        answer: answer(5, (4, 12), false),
    };
    round.handle(from_3, now);
    assert_eq!(promoted(&mut round), Some(3));
    assert!(round.is_over());
    // The term orders positions before the commit id does.
    let mut round = Failover::new(5, vec![1, 2, 3], vec![1, 2, 3], vec![2, 3], 2, now);
    round.poll_actions();
    round.handle(
        failover::Event::Answer {
            from: 2,
            answer: answer(5, (4, 10), false),
        },
        now,
    );
    round.handle(
        failover::Event::Answer {
            from: 3,
            answer: answer(5, (3, 20), false),
        },
        now,
    );
    assert_eq!(promoted(&mut round), Some(2));
}

#[test]
fn failover_never_names_a_copying_replica_nor_passes_over_a_longer_log() {
    let now = Instant::now();
    let mut round = Failover::new(5, vec![1, 2, 3], vec![1, 2, 3], vec![2, 3], 2, now);
    round.poll_actions();
    round.handle(
        failover::Event::Answer {
            from: 2,
            answer: answer(5, (4, 10), false),
        },
        now,
    );
    round.handle(
        failover::Event::Answer {
            from: 3,
            answer: answer(5, (4, 30), true),
        },
        now,
    );
    assert_eq!(
        promoted(&mut round),
        None,
        "a copy in progress holds no usable log, and does not count"
    );
    round.handle(
        failover::Event::Answer {
            from: 1,
            answer: answer(5, (4, 8), false),
        },
        now,
    );
    assert_eq!(promoted(&mut round), Some(2));
    // Host 1 may not lead (inactive) but holds the most: wait for all, then give up.
    let mut round = Failover::new(5, vec![1, 2, 3], vec![1, 2, 3], vec![2, 3], 2, now);
    round.poll_actions();
    round.handle(
        failover::Event::Answer {
            from: 1,
            answer: answer(5, (4, 12), false),
        },
        now,
    );
    round.handle(
        failover::Event::Answer {
            from: 2,
            answer: answer(5, (4, 10), false),
        },
        now,
    );
    assert_eq!(promoted(&mut round), None);
    round.handle(
        failover::Event::Answer {
            from: 3,
            answer: answer(5, (4, 9), false),
        },
        now,
    );
    let actions = round.poll_actions();
    assert!(
        matches!(actions[..], [failover::Action::GiveUp { .. }]),
        "{actions:?}"
    );
}

#[test]
fn failover_gives_up_on_a_higher_term_and_asks_again_the_silent() {
    let now = Instant::now();
    let mut round = Failover::new(5, vec![1, 2, 3], vec![1, 2, 3], vec![1, 2, 3], 2, now);
    round.poll_actions();
    round.handle(
        failover::Event::Answer {
            from: 2,
            answer: answer(5, (4, 10), false),
        },
        now,
    );
    let again = now + failover::ASK_AGAIN_AFTER;
    assert_eq!(round.next_deadline(), Some(again));
    round.handle(failover::Event::Tick, again);
    let asked: Vec<HostId> = round
        .poll_actions()
        .into_iter()
        .filter_map(|action| match action {
            failover::Action::Send { to, .. } => Some(to),
            _ => None,
        })
        .collect();
    assert_eq!(asked, vec![1, 3]);
    round.handle(
        failover::Event::Answer {
            from: 3,
            answer: answer(6, (4, 10), false),
        },
        again,
    );
    assert!(matches!(
        round.poll_actions()[..],
        [failover::Action::GiveUp { .. }]
    ));
    assert!(round.is_over());
}

#[test]
fn a_follower_being_dropped_counts_for_nothing_and_its_drop_is_proposed_once_safe() {
    let now = Instant::now();
    let mut primary = replica(1, 1, History::default(), 0, now);
    primary.handle(
        Event::View(View {
            term: 2,
            primary: 1,
            members: vec![1, 2, 3],
            out_of_sync: Vec::new(),
            dropping: Some(3),
        }),
        now,
    );
    primary.handle(Event::MarkerWritten { at: 1 }, now);
    let actions = primary.poll_actions();
    let mut dropped = replica(3, 1, History::default(), 0, now);
    let ack = follower_answer(&mut dropped, append_to(&actions, 3), now);
    primary.handle(received(3, Message::Ack(ack)), now);
    let after_dropped = primary.poll_actions();
    assert_eq!(
        committed(&after_dropped),
        None,
        "the dropped follower's ack counts for nothing"
    );
    assert!(!after_dropped
        .iter()
        .any(|a| matches!(a, Action::CompleteDrop { .. })));
    assert!(!primary.writable(now) && primary.readable(now).is_none());
    let mut kept = replica(2, 1, History::default(), 0, now);
    let ack = follower_answer(&mut kept, append_to(&actions, 2), now);
    primary.handle(received(2, Message::Ack(ack.clone())), now);
    let actions = primary.poll_actions();
    assert_eq!(committed(&actions), Some(1));
    assert!(actions.contains(&Action::CompleteDrop { host: 3 }));
    primary.handle(received(2, Message::Ack(ack)), now);
    assert!(
        !primary
            .poll_actions()
            .iter()
            .any(|a| matches!(a, Action::CompleteDrop { .. })),
        "once"
    );
}

#[test]
fn a_settling_follower_gets_entries_but_no_count_until_it_holds_the_end_of_the_copy() {
    let now = Instant::now();
    let (mut primary, _) = open_primary(2, 0, now);
    primary.handle(Event::Written { last: 5 }, now);
    primary.poll_actions();
    let ack = |result| {
        received(
            2,
            Message::Ack(Ack {
                term: 2,
                result,
                stamp: None,
            }),
        )
    };
    // The copy is in place through 3 and asks for the rest.
    primary.handle(ack(AckResult::Gap { last: 3 }), now);
    let append = append_to(&primary.poll_actions(), 2);
    assert_eq!((append.first, append.last), (4, 5));
    primary.handle(ack(AckResult::Settling { last: 5 }), now);
    assert_eq!(
        committed(&primary.poll_actions()),
        None,
        "a settling copy counts for nothing"
    );
    primary.handle(ack(AckResult::Holds { last: 5 }), now);
    assert_eq!(committed(&primary.poll_actions()), Some(5));
}

#[test]
fn failover_counts_only_copies_in_sync() {
    let now = Instant::now();
    // Host 3 was just added and catches up: host 2 alone must answer, and host 3 may
    // not lead even with the longer log.
    let mut round = Failover::new(5, vec![1, 2, 3], vec![1, 2], vec![2, 3], 2, now);
    round.poll_actions();
    round.handle(
        failover::Event::Answer {
            from: 3,
            answer: answer(5, (4, 30), false),
        },
        now,
    );
    assert_eq!(
        promoted(&mut round),
        None,
        "an answer out of sync counts for nothing"
    );
    round.handle(
        failover::Event::Answer {
            from: 2,
            answer: answer(5, (4, 10), false),
        },
        now,
    );
    assert_eq!(promoted(&mut round), Some(2));
}

#[test]
fn an_idle_member_fenced_above_the_view_keeps_asking_for_a_failover() {
    let now = Instant::now();
    let mut follower = replica(2, 6, History::default(), 0, now);
    follower.handle(view(5, 1), now);
    let silence = settings().primary_silence;
    follower.handle(Event::Tick, now);
    let lost = Action::PrimaryLost {
        primary: 1,
        term: 6,
    };
    assert_eq!(follower.poll_actions(), vec![lost.clone()]);
    assert_eq!(
        follower.next_deadline().map(|d| d >= now + silence),
        Some(true)
    );
    follower.handle(Event::Tick, now + silence);
    assert_eq!(follower.poll_actions(), vec![lost]);
}

#[test]
fn a_copy_reports_it_is_done_once_its_log_reaches_the_end_of_the_copy() {
    let now = Instant::now();
    let mut follower = replica(2, 1, history(&[(1, 1)]), 3, now);
    let append = Append {
        term: 2,
        history: history(&[(1, 1)]),
        log_start: 8,
        log_end: 9,
        first: 8,
        last: 9,
        commit: 9,
        stamp: Stamp { run: 1, at_us: 0 },
    };
    follower.handle(received(1, Message::Append(append)), now);
    assert!(follower
        .poll_actions()
        .contains(&Action::StartCopy { from: 1, term: 2 }));
    // A copy taken while nothing was written is whole at once.
    let copied = Event::Copied {
        term: 2,
        from: 9,
        through: 9,
        history: history(&[(1, 1)]),
    };
    follower.handle(copied, now);
    assert!(follower.poll_actions().contains(&Action::CopyDone));
}

#[test]
fn a_copy_still_settling_when_the_primary_changes_is_taken_again_from_the_new_one() {
    let now = Instant::now();
    let mut follower = replica(2, 1, history(&[(1, 1)]), 3, now);
    let mut append = Append {
        term: 2,
        history: history(&[(1, 1)]),
        log_start: 8,
        log_end: 15,
        first: 8,
        last: 15,
        commit: 15,
        stamp: Stamp { run: 1, at_us: 0 },
    };
    follower.handle(received(1, Message::Append(append.clone())), now);
    follower.poll_actions();
    let copied = Event::Copied {
        term: 2,
        from: 10,
        through: 15,
        history: history(&[(1, 1)]),
    };
    follower.handle(copied, now);
    follower.poll_actions();
    // Host 3 becomes primary of term 3 before the copy caught up.
    append.term = 3;
    append.history = history(&[(1, 1), (3, 16)]);
    append.log_start = 1;
    append.log_end = 16;
    append.first = 11;
    append.last = 16;
    follower.handle(received(3, Message::Append(append)), now);
    let actions = follower.poll_actions();
    assert_eq!(acks(&actions), vec![AckResult::Copying], "{actions:?}");
    assert!(
        actions.contains(&Action::StartCopy { from: 3, term: 3 }),
        "{actions:?}"
    );
}

#[test]
fn a_primary_fenced_off_answers_with_the_last_entry_it_may_have_acknowledged() {
    let now = Instant::now();
    let (mut primary, marker_sent) = open_primary(2, 0, now);
    let mut follower = replica(2, 1, History::default(), 0, now);
    let ack = follower_answer(&mut follower, append_to(&marker_sent, 2), now);
    primary.handle(received(2, Message::Ack(ack)), now);
    assert_eq!(committed(&primary.poll_actions()), Some(1));
    // A write the follower never gets: durable on the primary, never acknowledged.
    primary.handle(Event::Written { last: 2 }, now);
    primary.poll_actions();
    primary.handle(
        received(
            9,
            Message::Fence {
                term: 3,
                released: None,
            },
        ),
        now,
    );
    // It answers once a restart's promise is out, as any copy does.
    primary.handle(Event::Tick, now + settings().lease);
    let answers: Vec<FenceAnswer> = sent(&primary.poll_actions())
        .into_iter()
        .filter_map(|(to, message)| match message {
            Message::FenceAnswer(answer) if to == 9 => Some(answer),
            _ => None,
        })
        .collect();
    assert_eq!(
        answers,
        vec![FenceAnswer {
            term: 3,
            position: Position { term: 2, last: 2 },
            copying: false,
            acknowledged: Some(Position { term: 2, last: 1 }),
        }]
    );
    assert_eq!(primary.primary_term(), None, "it stepped down");
    // A follower says nothing of the kind: it acknowledged no client.
    follower.handle(
        received(
            9,
            Message::Fence {
                term: 3,
                released: None,
            },
        ),
        now,
    );
    follower.handle(Event::Tick, now + settings().lease);
    let answer = sent(&follower.poll_actions())
        .into_iter()
        .find_map(|(_, message)| match message {
            Message::FenceAnswer(answer) => Some(answer),
            _ => None,
        })
        .expect("the follower answers once its promise ran out");
    assert_eq!(answer.acknowledged, None);
}

#[test]
fn a_primary_that_steps_down_on_a_refused_append_still_vouches_for_its_commit_point() {
    let now = Instant::now();
    let (mut primary, marker_sent) = open_primary(2, 0, now);
    let mut follower = replica(2, 1, History::default(), 0, now);
    let ack = follower_answer(&mut follower, append_to(&marker_sent, 2), now);
    primary.handle(received(2, Message::Ack(ack)), now);
    assert_eq!(committed(&primary.poll_actions()), Some(1));
    // The follower promised term 3 to another copy before the primary heard of it.
    let refused = Ack {
        term: 2,
        result: AckResult::Refused { fenced: 3 },
        stamp: None,
    };
    primary.handle(received(2, Message::Ack(refused)), now);
    assert!(primary
        .poll_actions()
        .contains(&Action::SteppedDown { term: 3 }));
    assert_eq!(primary.primary_term(), None);
    // The round of term 3 then asks it: it answers what it acknowledged in term 2.
    primary.handle(
        received(
            9,
            Message::Fence {
                term: 3,
                released: None,
            },
        ),
        now,
    );
    primary.handle(Event::Tick, now + settings().lease);
    let answer = sent(&primary.poll_actions())
        .into_iter()
        .find_map(|(_, message)| match message {
            Message::FenceAnswer(answer) => Some(answer),
            _ => None,
        })
        .expect("it answers");
    assert_eq!(answer.acknowledged, Some(Position { term: 2, last: 1 }));
}

fn handover_answer(
    position: (Term, CommitId),
    acknowledged: Option<(Term, CommitId)>,
) -> FenceAnswer {
    FenceAnswer {
        acknowledged: acknowledged.map(|(term, last)| Position { term, last }),
        ..answer(5, position, false)
    }
}

#[test]
fn a_planned_handover_names_the_chosen_copy_once_it_holds_every_acknowledged_write() {
    let now = Instant::now();
    let new_round = || {
        let mut round =
            Failover::new(5, vec![1, 2, 3], vec![1, 2, 3], vec![1, 2, 3], 2, now).preferring(3);
        round.poll_actions();
        round
    };
    let tell = |round: &mut Failover, from, answer| {
        round.handle(failover::Event::Answer { from, answer }, now);
    };
    // The old primary holds two entries more than host 3, but acknowledged neither.
    let mut round = new_round();
    tell(&mut round, 2, handover_answer((4, 12), None));
    assert_eq!(
        promoted(&mut round),
        None,
        "waits for the old primary and host 3"
    );
    tell(&mut round, 1, handover_answer((4, 14), Some((4, 12))));
    assert_eq!(promoted(&mut round), None, "waits for host 3");
    tell(&mut round, 3, handover_answer((4, 12), None));
    assert_eq!(promoted(&mut round), Some(3));
    // Host 3 lacks an acknowledged entry: the round chooses as a failover does.
    let mut round = new_round();
    tell(&mut round, 1, handover_answer((4, 14), Some((4, 13))));
    tell(&mut round, 3, handover_answer((4, 12), None));
    assert_eq!(promoted(&mut round), Some(1), "the highest position");
    // The old primary had restarted and acknowledged nothing in this run: no shortcut.
    let mut round = new_round();
    tell(&mut round, 1, handover_answer((4, 14), None));
    tell(&mut round, 3, handover_answer((4, 14), None));
    assert_eq!(
        promoted(&mut round),
        Some(1),
        "equal positions: the first member"
    );
}

#[test]
fn a_planned_handover_without_the_chosen_copys_answer_falls_back_to_a_failover() {
    let now = Instant::now();
    let mut round =
        Failover::new(5, vec![1, 2, 3], vec![1, 2, 3], vec![1, 2, 3], 2, now).preferring(3);
    round.poll_actions();
    for from in [1, 2] {
        let answer = handover_answer((4, 12), (from == 1).then_some((4, 12)));
        round.handle(failover::Event::Answer { from, answer }, now);
    }
    let mut at = now;
    for _ in 0..2 {
        at += failover::ASK_AGAIN_AFTER;
        round.handle(failover::Event::Tick, at);
        assert_eq!(promoted(&mut round), None, "host 3 is asked again");
    }
    at += failover::ASK_AGAIN_AFTER;
    round.handle(failover::Event::Tick, at);
    assert_eq!(promoted(&mut round), Some(1));
}

#[test]
fn a_copy_taking_a_full_copy_does_not_vouch_for_the_writes_it_held() {
    // Write 33 was acknowledged on hosts 1 and 2. Host 2 has since begun a full copy
    // (its records are gone), host 1 is down, and host 3 stopped at 32: naming host 3
    // would lose write 33, so the round waits, and gives up once all have answered.
    let now = Instant::now();
    let mut round = Failover::new(5, vec![1, 2, 3], vec![1, 2, 3], vec![2, 3], 2, now);
    round.poll_actions();
    let tell = |round: &mut Failover, from, answer| {
        round.handle(failover::Event::Answer { from, answer }, now);
    };
    tell(&mut round, 2, answer(5, (2, 63), true));
    tell(&mut round, 3, answer(5, (1, 32), false));
    assert_eq!(promoted(&mut round), None);
    assert!(!round.is_over(), "host 1 may still answer");
    tell(&mut round, 1, answer(5, (3, 63), false));
    let actions = round.poll_actions();
    assert!(
        matches!(actions[..], [failover::Action::GiveUp { .. }]),
        "host 1 holds the most and may not lead: {actions:?}"
    );
}

#[test]
fn a_primary_whose_marker_is_not_committed_vouches_for_nothing() {
    // A primary that restarted re-opens its term with its commit point at 0, below what
    // its earlier run acknowledged: until this run's marker commits it says nothing.
    let now = Instant::now();
    let (mut primary, _) = open_primary(2, 4, now);
    primary.handle(
        received(
            9,
            Message::Fence {
                term: 3,
                released: None,
            },
        ),
        now,
    );
    primary.handle(Event::Tick, now + settings().lease);
    let answer = sent(&primary.poll_actions())
        .into_iter()
        .find_map(|(_, message)| match message {
            Message::FenceAnswer(answer) => Some(answer),
            _ => None,
        })
        .expect("it answers");
    assert_eq!(answer.acknowledged, None);
    assert_eq!(primary.primary_term(), None);
}

#[test]
fn a_follower_serves_stale_reads_only_while_it_follows_closely_and_holds_the_commit_point() {
    let now = Instant::now();
    let (mut primary, marker_sent) = open_primary(2, 0, now);
    let mut follower = replica(2, 1, History::default(), 0, now);
    assert_eq!(primary.followers(), vec![(2, 0), (3, 0)]);
    assert_eq!(
        primary.stale_readable_until(),
        None,
        "the primary reads by its lease"
    );
    let ack = follower_answer(&mut follower, append_to(&marker_sent, 2), now);
    let staleness = settings().max_read_staleness;
    assert_eq!(follower.stale_readable_until(), Some(now + staleness));
    primary.handle(received(2, Message::Ack(ack)), now);
    assert_eq!(
        primary.followers(),
        vec![(2, 1), (3, 0)],
        "2 holds the marker"
    );
    // An append whose entries are not applied yet: the copy lacks what it knows to be
    // committed once the commit point passes its log.
    let later = now + Duration::from_millis(300);
    primary.handle(Event::Written { last: 2 }, later);
    primary.handle(Event::Tick, later);
    let append = append_to(&primary.poll_actions(), 2);
    follower.handle(received(1, Message::Append(append.clone())), later);
    follower.poll_actions();
    let lagging = Append {
        commit: 2,
        first: 3,
        last: 2,
        ..append
    };
    follower.handle(received(1, Message::Append(lagging)), later);
    follower.poll_actions();
    assert_eq!(follower.commit(), 2);
    assert_eq!(follower.stale_readable_until(), None);
    follower.handle(Event::Applied { last: 2 }, later);
    assert_eq!(follower.stale_readable_until(), Some(later + staleness));
}

/// The sync reports among `actions`.
fn sync_reports(actions: &[Action]) -> Vec<(HostId, bool)> {
    actions
        .iter()
        .filter_map(|action| match action {
            Action::ReportSync { host, in_sync } => Some((*host, *in_sync)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_silent_follower_is_reported_out_of_sync_only_once_the_others_hold_every_commit() {
    let now = Instant::now();
    let (mut primary, marker_sent) = open_primary(2, 0, now);
    let after = settings().out_of_sync_after;
    // Nobody answered: the marker is not committed, and taking a copy out is not safe.
    primary.handle(Event::Tick, now + after * 2);
    assert_eq!(sync_reports(&primary.poll_actions()), vec![]);
    // Host 2 holds the marker; host 3 stays silent.
    let mut two = replica(2, 1, History::default(), 0, now);
    let t1 = now + after * 2;
    let ack = follower_answer(&mut two, append_to(&marker_sent, 2), t1);
    primary.handle(received(2, Message::Ack(ack)), t1);
    // Host 3 has not reached the commit point of `out_of_sync_after` ago: now that host 2
    // holds every commit, host 3 is reported, once.
    let actions = primary.poll_actions();
    assert_eq!(committed(&actions), Some(1));
    assert_eq!(
        sync_reports(&actions),
        vec![(3, false)],
        "host 2 kept up and stays in"
    );
    primary.handle(Event::Tick, t1 + Duration::from_millis(500));
    assert_eq!(sync_reports(&primary.poll_actions()), vec![]);
    // A report the NI never took is made again while the view still differs.
    primary.handle(Event::Tick, t1 + REPORT_AGAIN);
    assert_eq!(sync_reports(&primary.poll_actions()), vec![(3, false)]);
    // From the report on, host 3 counts for nothing, even while the NI lists it in sync.
    primary.handle(Event::Written { last: 2 }, t1 + after);
    let t2 = t1 + after + Duration::from_millis(10);
    let three_ack = Ack {
        term: 2,
        result: AckResult::Holds { last: 2 },
        stamp: None,
    };
    primary.handle(received(3, Message::Ack(three_ack.clone())), t2);
    assert_eq!(
        committed(&primary.poll_actions()),
        None,
        "host 3's ack does not count"
    );
    // The NI shows it out. It answered at `t2` and holds the commit point: it is
    // reported in sync again.
    primary.handle(
        Event::View(View {
            term: 2,
            primary: 1,
            members: vec![1, 2, 3],
            out_of_sync: vec![3],
            dropping: None,
        }),
        t2,
    );
    assert_eq!(sync_reports(&primary.poll_actions()), vec![(3, true)]);
    // Until the NI shows it in, it does not count either.
    primary.handle(received(3, Message::Ack(three_ack)), t2);
    assert_eq!(committed(&primary.poll_actions()), None);
    let two_ack = Ack {
        term: 2,
        result: AckResult::Holds { last: 2 },
        stamp: None,
    };
    primary.handle(received(2, Message::Ack(two_ack)), t2);
    assert_eq!(committed(&primary.poll_actions()), Some(2));
}

#[test]
fn a_silent_follower_that_held_every_commit_is_not_reported_in_sync() {
    let now = Instant::now();
    let (mut primary, marker_sent) = open_primary(2, 0, now);
    for host in [2, 3] {
        let mut follower = replica(host, 1, History::default(), 0, now);
        let ack = follower_answer(&mut follower, append_to(&marker_sent, host), now);
        primary.handle(received(host, Message::Ack(ack)), now);
    }
    assert_eq!(primary.followers(), vec![(2, 1), (3, 1)]);
    primary.poll_actions();
    // Host 3 goes quiet and the NI lists it out of sync; nothing is written since, so
    // it still holds the commit point, but it answers nothing.
    let later = now + settings().good_replica_within * 2;
    primary.handle(
        Event::View(View {
            term: 2,
            primary: 1,
            members: vec![1, 2, 3],
            out_of_sync: vec![3],
            dropping: None,
        }),
        later,
    );
    assert_eq!(sync_reports(&primary.poll_actions()), vec![]);
    // Once it answers, it is in sync again.
    let heard = Ack {
        term: 2,
        result: AckResult::Holds { last: 1 },
        stamp: None,
    };
    primary.handle(received(3, Message::Ack(heard)), later);
    assert_eq!(sync_reports(&primary.poll_actions()), vec![(3, true)]);
}

//! One host's copy of one partition: the replication state machine, as primary or as
//! follower.
//!
//! [`Replica`] owns the decisions of one copy: which entries to ship to whom, when the
//! commit point moves, whether the lease holds, whether an append from a primary fits
//! the local log or calls for a full copy, and when a failover query may be answered.
//! It talks to no one itself: the shell sends its [`Message`]s, writes through the
//! local worker, and feeds what happened back. It has three doors:
//! - [`Replica::handle`] takes a message, the NI's view of the partition, a worker's
//!   answer, or a wake-up, with the time it happened;
//! - [`Replica::poll_actions`] hands out what to do next, in order;
//! - [`Replica::next_deadline`] says when to wake it.
//!
//! It must never open a socket, spawn a task, sleep or read a clock.
//!
//! **The shell's duties.** Actions are carried out in the order given. A message that
//! follows a [`Action::PersistTerm`] is sent only once that term is durable: the
//! promise it carries rests on it. The durable state (the promised term, the log's
//! history and last commit id) lives with the partition in the worker's environment
//! and is handed back to [`Replica::new`] after a restart.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use crate::HostId;

use super::{
    Ack, AckResult, Append, CommitId, FenceAnswer, History, Message, Position, Settings, Stamp,
    Term,
};

/// Pause before a failed full copy is tried again.
pub const COPY_RETRY_AFTER: Duration = Duration::from_secs(1);
/// A primary reports a follower's sync state again after this, while the view still
/// shows the other state.
pub const REPORT_AGAIN: Duration = Duration::from_secs(2);

/// What a copy holds on disk, as the shell reads it back at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Durable {
    /// The highest term this copy promised (it refuses anything from below).
    pub fenced: Term,
    /// The terms of its log.
    pub history: History,
    /// The first commit id its log still holds (1 when nothing was trimmed).
    pub log_start: CommitId,
    /// Its last commit id (0 when the partition never had a write).
    pub last: CommitId,
}

/// The partition's entry in the NI, as this host last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    /// The primary's term.
    pub term: Term,
    /// The primary.
    pub primary: HostId,
    /// Every host holding a copy, the primary first.
    pub members: Vec<HostId>,
    /// The followers the NI shows out of sync.
    pub out_of_sync: Vec<HostId>,
    /// The follower being dropped: not counted for commits, leases or admissions.
    pub dropping: Option<HostId>,
}

/// Something that happened to the copy, fed to [`Replica::handle`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The NI's view of the partition changed (or is reported again).
    View(View),
    /// A message from another host.
    Received {
        /// The sender.
        from: HostId,
        /// The message.
        message: Message,
    },
    /// Primary: the local worker has durably written the log up to `last` (client
    /// writes, or the term's marker).
    Written {
        /// The log's last commit id now.
        last: CommitId,
    },
    /// Follower: an [`Action::Apply`] is durable.
    Applied {
        /// The log's last commit id now.
        last: CommitId,
    },
    /// Follower: an [`Action::Apply`] failed; nothing after the last durable entry is
    /// held.
    ApplyFailed,
    /// Follower: the full copy asked for by [`Action::StartCopy`] in `term` is in place.
    /// The copy holds every entry up to `from` and some newer values; the log is
    /// replayed from `from + 1`, and the copy counts only once it reached `through`,
    /// the source's last commit id when the copy ended.
    Copied {
        /// The term of the primary copied from.
        term: Term,
        /// The source's last commit id when the copy started.
        from: CommitId,
        /// The source's last commit id when the copy ended.
        through: CommitId,
        /// The source's history up to `from`.
        history: History,
    },
    /// Follower: the full copy of `term` failed.
    CopyFailed {
        /// The term of the primary copied from.
        term: Term,
    },
    /// Primary: the marker asked for by [`Action::WriteMarker`] is durable at commit id
    /// `at` (the worker's next id, which may lie past what this copy knew of its log).
    MarkerWritten {
        /// The marker's commit id.
        at: CommitId,
    },
    /// Any role: the local worker's log ends at `last` (read from the map). Writes that
    /// landed without this copy hearing of them (an old primary's last writes, expiry)
    /// count in the position it answers a failover with.
    LocalLog {
        /// The log's last commit id.
        last: CommitId,
    },
    /// Primary: log retention removed the entries up to `through`; followers that need
    /// them take a full copy.
    Trimmed {
        /// The last commit id removed.
        through: CommitId,
    },
    /// The time in [`Replica::next_deadline`] has come (or any other wake-up).
    Tick,
}

/// What the copy needs done, from [`Replica::poll_actions`].
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Store `term` as the promised term before sending anything that follows.
    PersistTerm {
        /// The promised term.
        term: Term,
    },
    /// Send a message. An [`Message::Append`] carries the entries `first..=last` of the
    /// local log beside it.
    Send {
        /// The receiver.
        to: HostId,
        /// The message.
        message: Message,
    },
    /// Primary: write the empty entry that opens `term` as the next commit id, with
    /// `term` recorded in the log's history from that id; answer with [`Event::Written`].
    WriteMarker {
        /// The new term.
        term: Term,
    },
    /// Follower: write the entries `first..=last` of the append just handled, and
    /// store `history` as the log's; answer with [`Event::Applied`] or
    /// [`Event::ApplyFailed`].
    Apply {
        /// The first entry to write.
        first: CommitId,
        /// The last entry to write.
        last: CommitId,
        /// The log's history once they are written.
        history: History,
    },
    /// Follower: the local log cannot follow the primary's; replace the copy with a
    /// full copy of `from`'s, then answer with [`Event::Copied`] or [`Event::CopyFailed`].
    StartCopy {
        /// The primary to copy from.
        from: HostId,
        /// Its term.
        term: Term,
    },
    /// Primary: every write up to `up_to` is acknowledged by enough copies.
    Committed {
        /// The new commit point.
        up_to: CommitId,
    },
    /// Follower: the primary has been silent for `primary_silence`; tell the metadata
    /// leader.
    PrimaryLost {
        /// The silent primary.
        primary: HostId,
        /// Its term.
        term: Term,
    },
    /// Follower: the full copy has caught up with the primary's log as it was when the
    /// copy ended: the local copy can be trusted again after a restart.
    CopyDone,
    /// Primary: a replica promised a higher term, so this copy stepped down; the
    /// metadata leader should finish the failover that term belongs to.
    SteppedDown {
        /// The higher term seen.
        term: Term,
    },
    /// Primary: enough copies other than the follower being dropped hold every
    /// committed entry: propose that `host` is dropped (`CompleteDrop`).
    CompleteDrop {
        /// The follower being dropped.
        host: HostId,
    },
    /// Primary: a follower's sync state differs from what the NI shows: it holds the
    /// commit point (`in_sync`), or it is taking a full copy. Propose the change.
    ReportSync {
        /// The follower.
        host: HostId,
        /// Whether it is in sync now.
        in_sync: bool,
    },
}

/// A follower, seen from the primary.
#[derive(Debug, Clone)]
struct Progress {
    /// Its last durable entry, known to match the primary's log.
    acked: CommitId,
    /// The last entry it reported holding, counted or not (flow control, log trimming).
    received: CommitId,
    /// The next entry to send it.
    next: CommitId,
    /// It is taking a full copy (or settling after one): its acks do not count.
    copying: bool,
    /// When something was last sent to it.
    sent_at: Option<Instant>,
    /// When it last answered.
    heard_at: Option<Instant>,
    /// The latest send time of this run that it acknowledged: its promise started then.
    promised_from: Option<Instant>,
    /// A commit point it must reach, and since when: it lags once it has not reached it,
    /// and answered since, within `out_of_sync_after`. Set at the first check.
    mark: Option<(CommitId, Instant)>,
    /// Reported out of sync while the view still lists it in sync: from the report on,
    /// it no longer counts, so that the smaller in-sync set holds every commit.
    excluded: bool,
}

impl Progress {
    fn new(next: CommitId) -> Progress {
        Progress {
            acked: 0,
            received: 0,
            next,
            copying: false,
            sent_at: None,
            heard_at: None,
            promised_from: None,
            mark: None,
            excluded: false,
        }
    }
}

/// Where a follower's full copy stands.
#[derive(Debug, Clone, PartialEq)]
enum Copy {
    /// The local log follows the primary's.
    None,
    /// A copy runs.
    Running,
    /// A failed copy starts again at `at`.
    Retry { at: Instant },
    /// The copy is in place; it counts once the log reached `through`.
    Settling { through: CommitId },
}

#[derive(Debug)]
enum Role {
    /// Neither primary nor following a primary of a term not below the promised one.
    Idle,
    Primary {
        term: Term,
        /// The commit id of the term's marker.
        marker: CommitId,
        /// The marker is durable.
        marker_written: bool,
        /// The marker was asked for: enough followers answered in this term (see
        /// [`Replica::ask_marker`]).
        marker_asked: bool,
        followers: BTreeMap<HostId, Progress>,
        /// Sync states reported since the view last changed, and when: each is reported
        /// once, and again after [`REPORT_AGAIN`] if the view still differs (a proposal
        /// may be lost).
        reported: BTreeMap<HostId, (bool, Instant)>,
        /// The drop completion proposed since the view last changed.
        drop_proposed: bool,
    },
    Follower {
        term: Term,
        primary: HostId,
        heard_at: Instant,
        lost_reported_at: Option<Instant>,
        copy: Copy,
        /// Acks to send once the log is durable up to their commit id.
        acks: VecDeque<(CommitId, Stamp)>,
    },
}

/// One host's copy of one partition. See the module header.
#[derive(Debug)]
pub struct Replica {
    me: HostId,
    settings: Settings,
    /// This run of the core, stamped on what it sends as primary.
    run: u64,
    started: Instant,
    fenced: Term,
    /// The history of the durable log.
    history: History,
    /// The history the log will have once the pending applies are durable.
    pending_history: History,
    log_start: CommitId,
    /// The last durable commit id.
    last: CommitId,
    /// The last commit id once the pending applies are durable.
    pending_last: CommitId,
    /// The highest commit point known.
    commit: CommitId,
    view: Option<View>,
    role: Role,
    /// The promise to the primary of the latest term this copy accepted entries from:
    /// no failover query is answered before it ends, unless that primary is released.
    promise: Option<(Term, Instant)>,
    /// Promises that no release lifts: to primaries of older terms, and the one made
    /// before a restart.
    older_promise: Option<Instant>,
    /// Failover queries waiting for the promise to run out: (asker, term).
    fence_queries: Vec<(HostId, Term)>,
    /// When this idle copy last reported that the view's term is fenced off.
    idle_reported_at: Option<Instant>,
    /// The fence that made this copy step down as primary, and the last entry it may
    /// have acknowledged then: (fence term, position).
    stepped_down: Option<(Term, Position)>,
    actions: VecDeque<Action>,
}

impl Replica {
    /// A copy that restarts from what is on disk. `run` must differ between runs of the
    /// same host (a random number or a start time will do).
    pub fn new(
        me: HostId,
        settings: Settings,
        durable: Durable,
        run: u64,
        now: Instant,
    ) -> Replica {
        let lease = settings.lease;
        Replica {
            me,
            settings,
            run,
            started: now,
            fenced: durable.fenced,
            pending_history: durable.history.clone(),
            history: durable.history,
            log_start: durable.log_start.max(1),
            last: durable.last,
            pending_last: durable.last,
            commit: 0,
            view: None,
            role: Role::Idle,
            promise: None,
            // A promise made before a restart still binds: wait it out.
            older_promise: Some(now + lease),
            fence_queries: Vec::new(),
            idle_reported_at: None,
            stepped_down: None,
            actions: VecDeque::new(),
        }
    }

    /// Everything there is to do now, in order.
    pub fn poll_actions(&mut self) -> Vec<Action> {
        self.actions.drain(..).collect()
    }

    /// The durable log's position.
    pub fn position(&self) -> Position {
        self.history.position(self.last)
    }

    /// The highest term promised.
    pub fn fenced(&self) -> Term {
        self.fenced
    }

    /// The commit point this copy knows of.
    pub fn commit(&self) -> CommitId {
        self.commit
    }

    /// This copy is the primary of `term`.
    pub fn primary_term(&self) -> Option<Term> {
        match self.role {
            Role::Primary { term, .. } => Some(term),
            _ => None,
        }
    }

    /// The durable log's history.
    pub fn history(&self) -> &History {
        &self.history
    }

    /// The commit point up to which an ordinary read may be served here, or `None` when
    /// it may not be served here at all. Only a primary whose term is committed, and
    /// that holds its lease at `now`, serves reads; it shows nothing above the commit
    /// point (a read that finds a newer entry waits for [`Action::Committed`]).
    pub fn readable(&self, now: Instant) -> Option<CommitId> {
        self.readable_until()
            .is_some_and(|until| now < until)
            .then_some(self.commit)
    }

    /// When the lease ends, if this copy is a primary whose term is committed (see
    /// [`Replica::readable`]); it may lie in the past.
    pub fn readable_until(&self) -> Option<Instant> {
        match &self.role {
            Role::Primary {
                marker,
                marker_written: true,
                followers,
                ..
            } if self.commit >= *marker => self.lease_end(followers),
            _ => None,
        }
    }

    /// A write may be started here at `now`: this copy is the primary, its term is open,
    /// and enough followers answered lately to acknowledge it. Otherwise the client gets
    /// `-NOREPLICAS` (or, when this copy is no primary, is sent elsewhere).
    pub fn writable(&self, now: Instant) -> bool {
        self.writable_until().is_some_and(|until| now < until)
    }

    /// Until when a write may be started (see [`Replica::writable`]), if this copy is a
    /// primary with its term open; it may lie in the past.
    pub fn writable_until(&self) -> Option<Instant> {
        let Role::Primary {
            marker_written: true,
            followers,
            ..
        } = &self.role
        else {
            return None;
        };
        let within = self.settings.good_replica_within;
        // Heard exactly `within` ago still counts: the end is just past it.
        self.latest_of_enough(followers, |p| (!p.copying).then_some(p.heard_at).flatten())
            .map(|at| at + within + Duration::from_nanos(1))
    }

    /// The time of the `needed − 1`-th latest `instant` among the counted followers: the
    /// moment from which enough followers have one. Far away when a write needs no
    /// follower's copy; `None` when too few followers have one.
    fn latest_of_enough(
        &self,
        followers: &BTreeMap<HostId, Progress>,
        instant: impl Fn(&Progress) -> Option<Instant>,
    ) -> Option<Instant> {
        let wanted = self.needed() - 1;
        if wanted == 0 {
            return Some(self.started + Duration::from_secs(1 << 40));
        }
        let mut instants: Vec<Instant> = followers
            .iter()
            .filter(|(host, p)| self.counted(**host, p))
            .filter_map(|(_, p)| instant(p))
            .collect();
        instants.sort_unstable_by(|a, b| b.cmp(a));
        instants.get(wanted - 1).copied()
    }

    /// The lowest commit id some follower (other than one being dropped) may still need
    /// from this primary's log: the trim point for consensus deletion, so that a delete
    /// is forgotten only once every follower has it. `None` when this copy is no primary.
    pub fn trim_floor(&self) -> Option<CommitId> {
        let dropping = self.dropping();
        match &self.role {
            Role::Primary { followers, .. } => Some(
                followers
                    .iter()
                    .filter(|(host, _)| Some(**host) != dropping)
                    .map(|(_, p)| p.acked.max(p.received) + 1)
                    .min()
                    .unwrap_or(self.last + 1),
            ),
            _ => None,
        }
    }

    /// The follower the view is dropping, whose answers count for nothing.
    fn dropping(&self) -> Option<HostId> {
        self.view.as_ref().and_then(|view| view.dropping)
    }

    /// Whether `host`'s acknowledgements count toward commits, leases and admissions:
    /// it is in sync in the view and not being dropped. A failover only asks such copies
    /// (see [`super::failover`]), so only they may hold the commit point.
    fn counts(&self, host: HostId) -> bool {
        self.view
            .as_ref()
            .is_some_and(|view| view.dropping != Some(host) && !view.out_of_sync.contains(&host))
    }

    /// Whether a follower's answers count: the view lists it in sync, not dropping, and
    /// this primary has not reported it out of sync.
    fn counted(&self, host: HostId, progress: &Progress) -> bool {
        self.counts(host) && !progress.excluded
    }

    /// Copies a write needs: the setting, but never more than the list holds.
    fn needed(&self) -> usize {
        let members = self.view.as_ref().map_or(1, |view| view.members.len());
        self.settings.min_replicas_to_write.clamp(1, members.max(1))
    }

    /// When the lease from the followers' promises ends (far away when a write needs no
    /// follower's copy), or `None` without enough promises.
    fn lease_end(&self, followers: &BTreeMap<HostId, Progress>) -> Option<Instant> {
        let lease = self
            .settings
            .lease
            .saturating_sub(self.settings.lease_margin);
        self.latest_of_enough(followers, |p| p.promised_from)
            .map(|from| from + lease)
    }

    /// For an idle member whose promised term is above the view's: the view's primary
    /// and the promised term.
    fn stranded(&self) -> Option<(HostId, Term)> {
        let view = self.view.as_ref()?;
        (view.members.contains(&self.me) && self.fenced > view.term)
            .then_some((view.primary, self.fenced))
    }

    /// Whether this copy promised a term above the view's: a failover or handover round
    /// is under way (or was abandoned), and the partition waits for its new primary.
    pub fn in_round(&self) -> bool {
        self.stranded().is_some()
    }

    /// The term of the primary whose full copy this copy is taking, if one runs.
    pub fn copying(&self) -> Option<Term> {
        match &self.role {
            Role::Follower {
                term,
                copy: Copy::Running,
                ..
            } => Some(*term),
            _ => None,
        }
    }

    /// A primary's followers, each with the last entry it holds of this primary's log as
    /// far as the primary knows (0 while it takes a full copy: it holds no log that
    /// counts). Empty on a copy that is not the primary.
    pub fn followers(&self) -> Vec<(HostId, CommitId)> {
        match &self.role {
            Role::Primary { followers, .. } => followers
                .iter()
                .map(|(&host, progress)| (host, if progress.copying { 0 } else { progress.acked }))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Until when this follower may serve a `READONLY` read, if it may at all: its log
    /// follows the primary's (no full copy under way) and holds everything it knows to be
    /// committed, so it shows every write acknowledged before the primary's last message;
    /// it may do so for [`Settings::max_read_staleness`] after that message. It may also
    /// show entries not committed yet. It may lie in the past.
    pub fn stale_readable_until(&self) -> Option<Instant> {
        match &self.role {
            Role::Follower {
                heard_at,
                copy: Copy::None,
                ..
            } if self.last >= self.commit => Some(*heard_at + self.settings.max_read_staleness),
            _ => None,
        }
    }

    /// When to feed [`Event::Tick`].
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut deadlines: Vec<Instant> = Vec::new();
        if !self.fence_queries.is_empty() {
            if let Some(until) = self.promise_until() {
                deadlines.push(until);
            }
        }
        match &self.role {
            Role::Idle => {
                if self.stranded().is_some() {
                    let silence = self.settings.primary_silence;
                    deadlines.push(
                        self.idle_reported_at
                            .map_or(self.started, |at| at + silence),
                    );
                }
            }
            Role::Primary { followers, .. } => {
                for progress in followers.values() {
                    match progress.sent_at {
                        Some(sent) => deadlines.push(sent + self.settings.heartbeat),
                        None => deadlines.push(self.started),
                    }
                }
            }
            Role::Follower {
                heard_at,
                lost_reported_at,
                copy,
                ..
            } => {
                let silence = self.settings.primary_silence;
                deadlines
                    .push(lost_reported_at.map_or(*heard_at, |at| at.max(*heard_at)) + silence);
                if let Copy::Retry { at } = copy {
                    deadlines.push(*at);
                }
            }
        }
        deadlines.into_iter().min()
    }

    /// Takes in what happened at `now`.
    pub fn handle(&mut self, event: Event, now: Instant) {
        match event {
            Event::View(view) => self.on_view(view, now),
            Event::Received { from, message } => match message {
                Message::Append(append) => self.on_append(from, append, now),
                Message::Ack(ack) => self.on_ack(from, ack, now),
                Message::Fence { term, released } => self.on_fence(from, term, released),
                Message::FenceAnswer(_) => {}
            },
            Event::Written { last } => self.on_written(last, now),
            Event::Applied { last } => self.on_applied(last),
            Event::ApplyFailed => {
                self.pending_last = self.last;
                self.pending_history = self.history.clone();
                if let Role::Follower { acks, .. } = &mut self.role {
                    acks.clear();
                }
            }
            Event::Copied {
                term,
                from,
                through,
                history,
            } => self.on_copied(term, from, through, history),
            Event::CopyFailed { term } => {
                if let Role::Follower {
                    term: following,
                    copy,
                    ..
                } = &mut self.role
                {
                    if *following == term && *copy == Copy::Running {
                        *copy = Copy::Retry {
                            at: now + COPY_RETRY_AFTER,
                        };
                    }
                }
            }
            Event::Trimmed { through } => self.log_start = self.log_start.max(through + 1),
            Event::MarkerWritten { at } => self.on_marker(at, now),
            Event::LocalLog { last } => {
                // Only a log at rest (pending applies report their own end), and never
                // during a full copy, whose records run ahead of what it may claim.
                let copying =
                    matches!(&self.role, Role::Follower { copy, .. } if *copy != Copy::None);
                if last > self.last && self.pending_last == self.last && !copying {
                    self.last = last;
                    self.pending_last = last;
                    self.pending_history = self.history.clone();
                }
            }
            Event::Tick => {}
        }
        self.on_time(now);
    }

    // -----------------------------------------------------------------------------
    // Roles

    fn on_view(&mut self, view: View, now: Instant) {
        let member = view.members.contains(&self.me);
        self.view = Some(view.clone());
        if view.primary == self.me {
            match &mut self.role {
                Role::Primary {
                    term,
                    reported,
                    drop_proposed,
                    ..
                } if *term == view.term => {
                    reported.clear();
                    *drop_proposed = false;
                    self.sync_followers();
                    self.ask_marker();
                }
                _ if view.term >= self.fenced => self.become_primary(view.term),
                _ => {
                    // A failover to a higher term is under way; it will name a primary.
                    self.role = Role::Idle;
                }
            }
            return;
        }
        match &self.role {
            Role::Primary { .. } => self.role = Role::Idle,
            Role::Follower { term, .. } if *term >= view.term => return,
            _ => {}
        }
        if member && view.term >= self.fenced {
            self.follow(view.primary, view.term, now);
        } else if !member {
            self.role = Role::Idle;
        }
    }

    fn become_primary(&mut self, term: Term) {
        self.promise(term);
        // Entries still being applied from the old primary come before the marker.
        let marker = self.pending_last + 1;
        // What it learned as a follower may run ahead of its own log.
        self.commit = self.commit.min(self.last);
        self.role = Role::Primary {
            term,
            marker,
            marker_written: false,
            marker_asked: false,
            followers: BTreeMap::new(),
            reported: BTreeMap::new(),
            drop_proposed: false,
        };
        self.sync_followers();
        self.ask_marker();
    }

    /// Asks for the term's marker once as many followers answered in this term as a
    /// commit needs, in sync or not (one catching up needs the marker to get in sync). A
    /// primary whose view is stale (one restarted before it heard of a failover) is
    /// refused by them first and steps down, rather than write a marker that the new
    /// primary's log never has, which would cost it a full copy. Safety does not rest on
    /// this wait: only the marker's commit opens the term.
    fn ask_marker(&mut self) {
        let needed = self.needed();
        let Role::Primary {
            term,
            marker_asked,
            followers,
            ..
        } = &self.role
        else {
            return;
        };
        if *marker_asked {
            return;
        }
        let answered = followers
            .values()
            .filter(|progress| progress.heard_at.is_some())
            .count();
        if answered + 1 >= needed {
            let term = *term;
            if let Role::Primary { marker_asked, .. } = &mut self.role {
                *marker_asked = true;
            }
            self.actions.push_back(Action::WriteMarker { term });
        }
    }

    /// Brings the primary's followers in line with the view's members.
    fn sync_followers(&mut self) {
        let next = self.last + 1;
        let Some(view) = &self.view else { return };
        let Role::Primary { followers, .. } = &mut self.role else {
            return;
        };
        followers.retain(|host, _| view.members.contains(host));
        for &host in &view.members {
            if host != self.me {
                followers.entry(host).or_insert_with(|| Progress::new(next));
            }
        }
    }

    fn follow(&mut self, primary: HostId, term: Term, now: Instant) {
        // A full copy that has not caught up holds records of the old primary's that the
        // log cannot correct (a replayed entry never overwrites a value as new): it is
        // taken again from the new primary.
        let copy = match &self.role {
            Role::Follower { copy, .. } if *copy != Copy::None => Copy::Retry { at: now },
            _ => Copy::None,
        };
        self.role = Role::Follower {
            term,
            primary,
            heard_at: now,
            lost_reported_at: None,
            copy,
            acks: VecDeque::new(),
        };
    }

    /// Raises the promised term to `term` (durably, before anything that follows).
    fn promise(&mut self, term: Term) {
        if term > self.fenced {
            self.fenced = term;
            self.actions.push_back(Action::PersistTerm { term });
        }
    }

    fn send(&mut self, to: HostId, message: Message) {
        self.actions.push_back(Action::Send { to, message });
    }

    // -----------------------------------------------------------------------------
    // Primary

    fn on_written(&mut self, last: CommitId, now: Instant) {
        if !matches!(self.role, Role::Primary { .. }) || last <= self.last {
            return;
        }
        self.last = last;
        self.pending_last = self.pending_last.max(last);
        self.pending_history = self.history.clone();
        self.advance_commit();
        self.pump(now);
    }

    /// The term's marker is durable at `at`: the term is open from there.
    fn on_marker(&mut self, at: CommitId, now: Instant) {
        let Role::Primary {
            term,
            marker,
            marker_written,
            ..
        } = &mut self.role
        else {
            return;
        };
        if *marker_written {
            return;
        }
        *marker = at;
        *marker_written = true;
        let term = *term;
        self.history.begin(term, at);
        self.last = self.last.max(at);
        self.pending_last = self.pending_last.max(self.last);
        self.pending_history = self.history.clone();
        self.advance_commit();
        self.pump(now);
    }

    fn on_ack(&mut self, from: HostId, ack: Ack, now: Instant) {
        let started = self.started;
        let run = self.run;
        let Role::Primary {
            term, followers, ..
        } = &mut self.role
        else {
            return;
        };
        if let AckResult::Refused { fenced } = ack.result {
            if fenced > *term {
                self.promise(fenced);
                self.step_down(fenced);
                self.actions.push_back(Action::SteppedDown { term: fenced });
            }
            return;
        }
        if ack.term != *term {
            return;
        }
        let Some(progress) = followers.get_mut(&from) else {
            return;
        };
        progress.heard_at = Some(now);
        if let Some(stamp) = ack.stamp.filter(|stamp| stamp.run == run) {
            let sent = started + Duration::from_micros(stamp.at_us);
            progress.promised_from = Some(progress.promised_from.map_or(sent, |p| p.max(sent)));
        }
        match ack.result {
            AckResult::Holds { last } => {
                progress.copying = false;
                progress.acked = progress.acked.max(last);
                progress.received = progress.received.max(last);
                progress.next = progress.next.max(last + 1);
            }
            AckResult::Settling { last } => {
                progress.copying = true;
                progress.received = progress.received.max(last);
                progress.next = progress.next.max(last + 1);
            }
            AckResult::Gap { last } => progress.next = last + 1,
            AckResult::Copying => progress.copying = true,
            AckResult::Refused { .. } => unreachable!("handled above"),
        }
        self.ask_marker();
        self.advance_commit();
        self.check_sync(now);
        self.pump(now);
    }

    /// Reports the followers whose sync state should change in the NI, each once per
    /// view:
    /// - One listed out of sync is in sync again once it follows this term's log (it
    ///   holds the marker) up to the commit point, and answered within
    ///   `good_replica_within`. Adding a copy to the set that commits
    ///   and answers failovers is always safe: every entry committed before was already
    ///   on enough copies of the smaller set.
    /// - One listed in sync that lags (it takes a full copy, or has not reached, and
    ///   answered since, a commit point of `out_of_sync_after` ago) is reported out of
    ///   sync with the care of a drop: only once the term's marker is committed and
    ///   enough copies without it hold the commit point, and it stops counting at once,
    ///   so that the smaller set keeps holding every commit whatever the NI shows.
    fn check_sync(&mut self, now: Instant) {
        let Some(view) = self.view.clone() else {
            return;
        };
        let (commit, after) = (self.commit, self.settings.out_of_sync_after);
        let Role::Primary {
            marker, followers, ..
        } = &mut self.role
        else {
            return;
        };
        let marker = *marker;
        let mut lagging = Vec::new();
        for (&host, progress) in followers.iter_mut() {
            let mark = progress.mark.get_or_insert((commit, now));
            let answered_since = progress.heard_at.is_some_and(|heard| heard >= mark.1);
            if !progress.copying && progress.acked >= mark.0 && answered_since {
                *mark = (commit, now);
            }
            if view.out_of_sync.contains(&host) {
                progress.excluded = false;
            } else if view.dropping != Some(host) && (progress.copying || now >= mark.1 + after) {
                lagging.push(host);
            }
        }
        let mut changes: Vec<(HostId, bool)> = Vec::new();
        let heard_within = self.settings.good_replica_within;
        if let Role::Primary { followers, .. } = &self.role {
            for (&host, progress) in followers {
                let listed_out = view.out_of_sync.contains(&host);
                // A silent copy that held everything before it went quiet is no copy
                // in sync: it must answer too.
                let answering = progress
                    .heard_at
                    .is_some_and(|heard| now < heard + heard_within);
                let caught_up =
                    answering && !progress.copying && progress.acked >= marker.max(commit);
                if listed_out && caught_up {
                    changes.push((host, true));
                } else if !listed_out && (progress.excluded || lagging.contains(&host)) {
                    changes.push((host, false));
                }
            }
        }
        for (host, in_sync) in changes {
            if !in_sync && !self.may_exclude(host) {
                continue;
            }
            let Role::Primary {
                followers,
                reported,
                ..
            } = &mut self.role
            else {
                return;
            };
            if let Some(progress) = followers.get_mut(&host) {
                progress.excluded |= !in_sync;
            }
            let due = reported
                .get(&host)
                .is_none_or(|&(sent, at)| sent != in_sync || now >= at + REPORT_AGAIN);
            if due {
                reported.insert(host, (in_sync, now));
                self.actions.push_back(Action::ReportSync { host, in_sync });
            }
        }
    }

    /// Whether `host` may stop counting: the term's marker is committed and enough
    /// counted copies other than `host` hold the commit point (as for a drop). Always
    /// true once it no longer counts.
    fn may_exclude(&self, host: HostId) -> bool {
        let Role::Primary {
            marker, followers, ..
        } = &self.role
        else {
            return false;
        };
        if followers.get(&host).is_none_or(|p| !self.counted(host, p)) {
            return true;
        }
        let mut others = followers.clone();
        others.remove(&host);
        self.commit >= *marker
            && self
                .held_by_counted(&others)
                .get(self.needed() - 1)
                .is_some_and(|&held| held >= self.commit)
    }

    /// Moves the commit point to the highest entry of this term that enough copies hold.
    fn advance_commit(&mut self) {
        let needed = self.needed();
        let Role::Primary {
            term, followers, ..
        } = &self.role
        else {
            return;
        };
        let held = self.held_by_counted(followers);
        let Some(&candidate) = held.get(needed - 1) else {
            return;
        };
        if candidate > self.commit && self.history.term_of(candidate) == Some(*term) {
            self.commit = candidate;
            self.actions
                .push_back(Action::Committed { up_to: candidate });
        }
        self.propose_drop();
    }

    /// What the primary and the counted followers hold, highest first.
    fn held_by_counted(&self, followers: &BTreeMap<HostId, Progress>) -> Vec<CommitId> {
        let mut held: Vec<CommitId> = followers
            .iter()
            .filter(|(host, p)| self.counted(**host, p) && !p.copying)
            .map(|(_, p)| p.acked.min(self.last))
            .collect();
        held.push(self.last);
        held.sort_unstable_by(|a, b| b.cmp(a));
        held
    }

    /// Proposes dropping the view's dropping follower once the commit point (of an open
    /// term) is held by enough copies without it; at most once per view.
    fn propose_drop(&mut self) {
        let Some(host) = self.dropping() else { return };
        let needed = self.needed();
        let Role::Primary {
            marker,
            followers,
            drop_proposed: false,
            ..
        } = &self.role
        else {
            return;
        };
        let safe = self.commit >= *marker
            && self
                .held_by_counted(followers)
                .get(needed - 1)
                .is_some_and(|&held| held >= self.commit);
        if safe {
            if let Role::Primary { drop_proposed, .. } = &mut self.role {
                *drop_proposed = true;
            }
            self.actions.push_back(Action::CompleteDrop { host });
        }
    }

    /// Sends each follower what it lacks, within the window, and heartbeats the idle ones.
    fn pump(&mut self, now: Instant) {
        let Role::Primary {
            term, followers, ..
        } = &mut self.role
        else {
            return;
        };
        let stamp = Stamp {
            run: self.run,
            at_us: now.saturating_duration_since(self.started).as_micros() as u64,
        };
        let mut sends = Vec::new();
        for (&host, progress) in followers.iter_mut() {
            let due = progress
                .sent_at
                .is_none_or(|sent| now >= sent + self.settings.heartbeat);
            let mut sent_any = false;
            while progress.next <= self.last {
                let seen = progress.acked.max(progress.received);
                let in_flight = (progress.next - 1).saturating_sub(seen);
                if in_flight >= self.settings.max_entries_in_flight {
                    break;
                }
                let first = progress.next.max(self.log_start);
                let room = self.settings.max_entries_in_flight - in_flight;
                let count = self.settings.max_entries_per_append.min(room).max(1);
                let last = (first + count - 1).min(self.last);
                sends.push((host, first, last));
                progress.next = last + 1;
                sent_any = true;
            }
            if !sent_any && due {
                // A heartbeat: no entries, but the position, the commit point and a
                // new stamp for the lease.
                sends.push((host, progress.next, progress.next - 1));
                sent_any = true;
            }
            if sent_any {
                progress.sent_at = Some(now);
            }
        }
        let term = *term;
        for (host, first, last) in sends {
            let append = Append {
                term,
                history: self.history.clone(),
                log_start: self.log_start,
                log_end: self.last,
                first,
                last,
                commit: self.commit,
                stamp,
            };
            self.send(host, Message::Append(append));
        }
    }

    // -----------------------------------------------------------------------------
    // Follower

    fn on_append(&mut self, from: HostId, append: Append, now: Instant) {
        if append.term < self.fenced {
            let refused = Ack {
                term: append.term,
                result: AckResult::Refused {
                    fenced: self.fenced,
                },
                stamp: None,
            };
            return self.send(from, Message::Ack(refused));
        }
        self.promise(append.term);
        let follows = matches!(self.role, Role::Follower { term, primary, .. } if term == append.term && primary == from);
        if !follows {
            self.follow(from, append.term, now);
        }
        let until = now + self.settings.lease;
        match self.promise {
            Some((term, ref mut end)) if term == append.term => *end = (*end).max(until),
            previous => {
                // A promise to an older term's primary stays until it ends.
                if let Some((_, end)) = previous {
                    self.older_promise = Some(self.older_promise.map_or(end, |p| p.max(end)));
                }
                self.promise = Some((append.term, until));
            }
        }
        let Role::Follower {
            heard_at,
            lost_reported_at,
            copy,
            ..
        } = &mut self.role
        else {
            unreachable!("following just above")
        };
        *heard_at = now;
        *lost_reported_at = None;
        let copy = copy.clone();
        let ack = |result| {
            Message::Ack(Ack {
                term: append.term,
                result,
                stamp: Some(append.stamp),
            })
        };
        match copy {
            Copy::Running | Copy::Retry { .. } => return self.send(from, ack(AckResult::Copying)),
            Copy::Settling { .. } | Copy::None => {}
        }
        let held = self.pending_last;
        let fits = self.pending_history.term_of(held) == Some(append.term)
            || (held <= append.log_end && self.pending_history.agrees_up_to(&append.history, held));
        if !fits || held + 1 < append.log_start {
            return self.start_copy(from, append.term, append.stamp);
        }
        self.commit = self.commit.max(append.commit.min(append.last.max(held)));
        if append.first > held + 1 {
            return self.send(from, ack(AckResult::Gap { last: held }));
        }
        if append.last > held {
            let history = append.history.up_to(append.last);
            self.pending_last = append.last;
            self.pending_history = history.clone();
            self.actions.push_back(Action::Apply {
                first: held + 1,
                last: append.last,
                history,
            });
            if let Role::Follower { acks, .. } = &mut self.role {
                acks.push_back((append.last, append.stamp));
            }
            return;
        }
        let result = self.holds_or_copying();
        self.send(from, ack(result));
    }

    /// What this follower may claim: the durable log, or nothing while a copy settles.
    fn holds_or_copying(&self) -> AckResult {
        match &self.role {
            Role::Follower {
                copy: Copy::Settling { through },
                ..
            } if self.last < *through => AckResult::Settling { last: self.last },
            _ => AckResult::Holds { last: self.last },
        }
    }

    fn start_copy(&mut self, from: HostId, term: Term, stamp: Stamp) {
        if let Role::Follower { copy, acks, .. } = &mut self.role {
            *copy = Copy::Running;
            acks.clear();
        }
        self.actions.push_back(Action::StartCopy { from, term });
        let copying = Ack {
            term,
            result: AckResult::Copying,
            stamp: Some(stamp),
        };
        self.send(from, Message::Ack(copying));
    }

    fn on_applied(&mut self, last: CommitId) {
        // After a full copy the worker's log may reach past what this copy has claimed
        // (the copy took newer records): claim no more than was asked for.
        let last = last.min(self.pending_last);
        if last <= self.last {
            return;
        }
        self.last = last;
        self.history = self.pending_history.up_to(last);
        let fenced = self.fenced;
        if let Role::Primary { .. } = self.role {
            // Promoted while entries of the old primary were still being written.
            return self.advance_commit();
        }
        let Role::Follower {
            term,
            primary,
            copy,
            acks,
            ..
        } = &mut self.role
        else {
            return;
        };
        if let Copy::Settling { through } = copy {
            if last >= *through {
                *copy = Copy::None;
                self.actions.push_back(Action::CopyDone);
            }
        }
        let (term, primary) = (*term, *primary);
        let mut ready = Vec::new();
        while acks.front().is_some_and(|&(upto, _)| upto <= last) {
            ready.push(acks.pop_front().expect("front checked").1);
        }
        if term < fenced {
            // Promised a higher term since: the old primary may count nothing more.
            return;
        }
        let result = self.holds_or_copying();
        for stamp in ready {
            let ack = Ack {
                term,
                result,
                stamp: Some(stamp),
            };
            self.send(primary, Message::Ack(ack));
        }
    }

    fn on_copied(&mut self, term: Term, from: CommitId, through: CommitId, history: History) {
        let Role::Follower {
            term: following,
            primary,
            copy,
            acks,
            ..
        } = &mut self.role
        else {
            return;
        };
        if *following != term || *copy != Copy::Running {
            return;
        }
        *copy = if through > from {
            Copy::Settling { through }
        } else {
            self.actions.push_back(Action::CopyDone);
            Copy::None
        };
        acks.clear();
        let primary = *primary;
        self.last = from;
        self.pending_last = from;
        self.history = history.clone();
        self.pending_history = history;
        self.log_start = from + 1;
        // Ask for the log from `from + 1`.
        let gap = Ack {
            term,
            result: AckResult::Gap { last: from },
            stamp: None,
        };
        self.send(primary, Message::Ack(gap));
    }

    // -----------------------------------------------------------------------------
    // Failover queries and time

    fn on_fence(&mut self, from: HostId, term: Term, released: Option<Term>) {
        if term > self.fenced {
            self.promise(term);
            if self.primary_term().is_some_and(|mine| mine < term) {
                self.step_down(term);
            }
        }
        // The primary this copy promised to stepped down for this round: its promise no
        // longer protects anything.
        if released.is_some()
            && term >= self.fenced
            && self.promise.is_some_and(|(t, _)| Some(t) == released)
        {
            self.promise = None;
        }
        if !self.fence_queries.contains(&(from, term)) {
            self.fence_queries.push((from, term));
        }
    }

    /// When the promises that hold back failover answers end.
    fn promise_until(&self) -> Option<Instant> {
        let latest = self.promise.map(|(_, end)| end);
        latest.max(self.older_promise)
    }

    /// A primary leaves its term for `higher`, noting for the round of `higher` what its
    /// commit point vouches for. Only once this run's marker is committed does the commit
    /// point cover every write acknowledged in the term: a primary that restarted starts
    /// again from 0, below what its earlier run acknowledged.
    fn step_down(&mut self, higher: Term) {
        if let Role::Primary {
            term,
            marker,
            marker_written,
            ..
        } = self.role
        {
            let position = Position {
                term,
                last: self.commit,
            };
            self.stepped_down =
                (marker_written && self.commit >= marker).then_some((higher, position));
            self.role = Role::Idle;
        }
    }

    fn on_time(&mut self, now: Instant) {
        self.answer_fence_queries(now);
        match &mut self.role {
            Role::Idle => {
                // A member that promised a term above the view's waits for a failover that
                // may never have finished: it keeps asking for one.
                if let Some((primary, term)) = self.stranded() {
                    let silence = self.settings.primary_silence;
                    if self.idle_reported_at.is_none_or(|at| now >= at + silence) {
                        self.idle_reported_at = Some(now);
                        self.actions
                            .push_back(Action::PrimaryLost { primary, term });
                    }
                }
            }
            Role::Primary { .. } => {
                self.check_sync(now);
                self.pump(now);
            }
            Role::Follower {
                term,
                primary,
                heard_at,
                lost_reported_at,
                copy,
                ..
            } => {
                let silence = self.settings.primary_silence;
                let since = lost_reported_at.map_or(*heard_at, |at| at.max(*heard_at));
                if now >= since + silence {
                    *lost_reported_at = Some(now);
                    let lost = Action::PrimaryLost {
                        primary: *primary,
                        term: *term,
                    };
                    self.actions.push_back(lost);
                }
                if let Copy::Retry { at } = *copy {
                    if now >= at {
                        *copy = Copy::Running;
                        let again = Action::StartCopy {
                            from: *primary,
                            term: *term,
                        };
                        self.actions.push_back(again);
                    }
                }
            }
        }
    }

    /// Answers the failover queries once the promise ran out and no apply is pending,
    /// so the position answered is the one the log keeps.
    fn answer_fence_queries(&mut self, now: Instant) {
        if self.fence_queries.is_empty() {
            return;
        }
        if self.promise_until().is_some_and(|until| now < until) || self.pending_last != self.last {
            return;
        }
        let copying = matches!(
            &self.role,
            Role::Follower { copy, .. } if *copy != Copy::None
        );
        let acknowledged = self
            .stepped_down
            .filter(|(fence, _)| *fence == self.fenced)
            .map(|(_, position)| position);
        let answer = FenceAnswer {
            term: self.fenced,
            position: self.position(),
            copying,
            acknowledged,
        };
        for (asker, _) in std::mem::take(&mut self.fence_queries) {
            self.send(asker, Message::FenceAnswer(answer));
        }
    }
}

//! Seeded simulation of one partition's replication: the real [`Replica`] and
//! [`Failover`] cores, with everything around them simulated.
//!
//! - **Hosts** hold a disk (the promised term, the log, its history) that survives a
//!   crash, and a core that does not. Disk writes complete after a random delay and
//!   are lost when the host crashes first.
//! - **The network** delays, reorders and drops messages, and a partition cuts a
//!   minority of hosts off the rest and off the metadata leader.
//! - **The metadata leader** is always up (the metadata Raft is simulated elsewhere).
//!   It holds the partition's view, sends it to every host, and runs a failover round
//!   when a follower reports its primary lost or a primary steps down; now and then it
//!   starts a planned handover to a random other copy, whatever state it is in.
//! - **Clients** write unique values to a few keys at whichever host is a writable
//!   primary, and read at whichever host is readable.
//!
//! Checked: no two primaries of one term; every acknowledged write is in the final log
//! at its commit id; every read saw at least the last write acknowledged before it
//! started, and only an entry that the final log holds (nothing visible was lost);
//! once the faults end, every copy converges on the primary's log.
//!
//! `SHOAL_TEST_SEED=<seed>` repeats one schedule; `SHOAL_LONG_TESTS=1` runs more seeds.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use super::failover::{self, Failover};
use super::replica::{Action, Durable, Event, Replica, View};
use super::{CommitId, History, Message, Settings, Term};
use crate::{HostId, TestRng};

/// The metadata leader's id in the simulated network.
const LEADER: HostId = 0;
const KEYS: u64 = 5;

#[derive(Debug, Clone, PartialEq)]
struct Entry {
    key: u64,
    /// 0 for a term's marker.
    value: u64,
}

#[derive(Debug, Clone, Default)]
struct Disk {
    fenced: Term,
    history: History,
    /// Entry `i` has commit id `i + 1`.
    log: Vec<Entry>,
}

#[derive(Debug)]
enum DiskOp {
    Persist(Term),
    Marker(Term),
    Write(Entry),
    Apply {
        first: CommitId,
        entries: Vec<Entry>,
        history: History,
    },
}

struct Host {
    disk: Disk,
    core: Option<Replica>,
    /// Disk operations not yet durable, in order; the time the head completes.
    queue: Vec<DiskOp>,
    busy_until: Option<Instant>,
    /// Client writes waiting for their commit: commit id → (value, start, the term of the
    /// primary that admitted it).
    waiting: BTreeMap<CommitId, (u64, Instant, Term)>,
    /// Client writes not yet written (their id is not known yet): value, start, term.
    unwritten: Vec<(u64, Instant, Term)>,
}

enum Scheduled {
    Deliver {
        from: HostId,
        to: HostId,
        message: Message,
        entries: Vec<Entry>,
    },
    View {
        to: HostId,
        view: View,
    },
    CopyDone {
        to: HostId,
        from: HostId,
        term: Term,
    },
    /// A primary's report of a follower's sync state reaches the leader.
    Sync {
        term: Term,
        host: HostId,
        in_sync: bool,
    },
}

struct Sim {
    rng: TestRng,
    settings: Settings,
    start: Instant,
    now: Instant,
    hosts: BTreeMap<HostId, Host>,
    view: View,
    failover: Option<Failover>,
    /// Hosts cut off from the others and from the leader.
    cut: Vec<HostId>,
    events: BinaryHeap<Reverse<(Instant, u64)>>,
    scheduled: HashMap<u64, Scheduled>,
    next_event: u64,
    next_value: u64,
    /// Acknowledged writes: (commit id, key, value, acknowledged at).
    acked: Vec<(CommitId, u64, u64, Instant)>,
    /// Reads: (key, commit id seen, value seen, started at).
    reads: Vec<(u64, CommitId, u64, Instant)>,
    /// Term → the host that acted as its primary.
    primaries: HashMap<Term, HostId>,
    drop_rate: f64,
    failovers: u64,
    handovers: u64,
    /// Sync state changes the NI took.
    syncs: u64,
    /// Handovers that named the copy they preferred.
    handed_over: u64,
    /// The copy the running round prefers, if it is a handover.
    handover_to: Option<HostId>,
}

impl Sim {
    fn new(seed: u64, hosts: u64) -> Sim {
        let settings = Settings {
            min_replicas_to_write: (hosts as usize) / 2 + 1,
            max_entries_per_append: 8,
            max_entries_in_flight: 32,
            ..Settings::default()
        };
        let start = Instant::now();
        let members: Vec<HostId> = (1..=hosts).collect();
        let mut sim = Sim {
            rng: TestRng::new(seed),
            settings,
            start,
            now: start,
            hosts: BTreeMap::new(),
            view: View {
                term: 1,
                primary: 1,
                members: members.clone(),
                out_of_sync: Vec::new(),
                dropping: None,
            },
            failover: None,
            cut: Vec::new(),
            events: BinaryHeap::new(),
            scheduled: HashMap::new(),
            next_event: 0,
            next_value: 1,
            acked: Vec::new(),
            reads: Vec::new(),
            primaries: HashMap::new(),
            drop_rate: 0.05,
            failovers: 0,
            handovers: 0,
            syncs: 0,
            handed_over: 0,
            handover_to: None,
        };
        for id in members {
            let host = Host {
                disk: Disk::default(),
                core: None,
                queue: Vec::new(),
                busy_until: None,
                waiting: BTreeMap::new(),
                unwritten: Vec::new(),
            };
            sim.hosts.insert(id, host);
            sim.restart(id);
        }
        sim
    }

    fn at(&mut self, after: Duration, what: Scheduled) {
        let id = self.next_event;
        self.next_event += 1;
        self.scheduled.insert(id, what);
        self.events.push(Reverse((self.now + after, id)));
    }

    fn reachable(&self, a: HostId, b: HostId) -> bool {
        self.cut.contains(&a) == self.cut.contains(&b)
    }

    fn up(&self, id: HostId) -> bool {
        self.hosts.get(&id).is_some_and(|h| h.core.is_some())
    }

    fn restart(&mut self, id: HostId) {
        let now = self.now;
        let run = self.rng.next_u64() | 1;
        let settings = self.settings.clone();
        let host = self.hosts.get_mut(&id).unwrap();
        let durable = Durable {
            fenced: host.disk.fenced,
            history: host.disk.history.clone(),
            log_start: 1,
            last: host.disk.log.len() as u64,
        };
        host.core = Some(Replica::new(id, settings, durable, run, now));
        let view = self.view.clone();
        self.feed(id, Event::View(view), &[]);
    }

    fn crash(&mut self, id: HostId) {
        let host = self.hosts.get_mut(&id).unwrap();
        host.core = None;
        host.queue.clear();
        host.busy_until = None;
        host.waiting.clear();
        host.unwritten.clear();
    }

    /// Hands an event to a host's core and carries out what it asks.
    fn feed(&mut self, id: HostId, event: Event, entries: &[Entry]) {
        let now = self.now;
        let Some(core) = self.hosts.get_mut(&id).and_then(|h| h.core.as_mut()) else {
            return;
        };
        core.handle(event, now);
        let actions = core.poll_actions();
        if let Some(term) = core.primary_term() {
            let first = *self.primaries.entry(term).or_insert(id);
            assert_eq!(first, id, "two primaries of term {term}");
        }
        for action in actions {
            self.carry_out(id, action, entries);
        }
    }

    fn carry_out(&mut self, id: HostId, action: Action, entries: &[Entry]) {
        match action {
            Action::PersistTerm { term } => self.disk_op(id, DiskOp::Persist(term)),
            Action::Send { to, message } => self.send(id, to, message),
            Action::WriteMarker { term } => self.disk_op(id, DiskOp::Marker(term)),
            Action::Apply {
                first,
                last,
                history,
            } => {
                let carried: Vec<Entry> = entries
                    .iter()
                    .skip(entries.len() - (last + 1 - first) as usize)
                    .cloned()
                    .collect();
                self.disk_op(
                    id,
                    DiskOp::Apply {
                        first,
                        entries: carried,
                        history,
                    },
                );
            }
            Action::StartCopy { from, term } => {
                let delay = Duration::from_millis(20 + self.rng.below(200));
                self.at(delay, Scheduled::CopyDone { to: id, from, term });
            }
            Action::Committed { up_to } => {
                let now = self.now;
                let host = self.hosts.get_mut(&id).unwrap();
                let done: Vec<CommitId> = host.waiting.range(..=up_to).map(|(&c, _)| c).collect();
                // As the routing does: a write is answered only by the commit point of the
                // term that admitted it (a copy that stepped down follows another's).
                let term_now = host.core.as_ref().and_then(Replica::primary_term);
                for commit_id in done {
                    let (value, _, term) = host.waiting.remove(&commit_id).unwrap();
                    if term_now != Some(term) {
                        continue;
                    }
                    let entry = &host.disk.log[commit_id as usize - 1];
                    assert_eq!(entry.value, value, "the log changed under a waiting write");
                    self.acked.push((commit_id, entry.key, value, now));
                }
            }
            Action::ReportSync { host, in_sync } => {
                // Proposed at the primary's term; the NI takes it only at that term.
                let term = self.hosts[&id]
                    .core
                    .as_ref()
                    .and_then(Replica::primary_term);
                if let Some(term) = term {
                    if self.reachable(id, LEADER) && self.rng.unit() >= self.drop_rate {
                        let delay = Duration::from_millis(1 + self.rng.below(50));
                        self.at(
                            delay,
                            Scheduled::Sync {
                                term,
                                host,
                                in_sync,
                            },
                        );
                    }
                }
            }
            Action::CompleteDrop { .. } | Action::CopyDone => {}
            Action::PrimaryLost { term, .. } | Action::SteppedDown { term } => {
                if term >= self.view.term && self.failover.is_none() && self.reachable(id, LEADER) {
                    self.start_failover(None);
                }
            }
        }
    }

    /// Starts a failover round, or a planned handover to `preferred`.
    fn start_failover(&mut self, preferred: Option<HostId>) {
        match preferred {
            None => self.failovers += 1,
            Some(_) => self.handovers += 1,
        }
        // The old primary first, as the NI lists the members.
        let mut members = vec![self.view.primary];
        members.extend(
            self.view
                .members
                .iter()
                .filter(|&&m| m != self.view.primary),
        );
        let in_sync: Vec<HostId> = members
            .iter()
            .copied()
            .filter(|host| !self.view.out_of_sync.contains(host))
            .collect();
        let mut round = Failover::new(
            self.view.term + 1,
            members.clone(),
            in_sync,
            members,
            self.settings.min_replicas_to_write,
            self.now,
        );
        if let Some(host) = preferred {
            round = round.preferring(host);
        }
        self.handover_to = preferred;
        self.failover = Some(round);
        self.drive_failover(failover::Event::Tick);
    }

    fn drive_failover(&mut self, event: failover::Event) {
        let Some(round) = self.failover.as_mut() else {
            return;
        };
        round.handle(event, self.now);
        for action in round.poll_actions() {
            match action {
                failover::Action::Send { to, message } => self.send(LEADER, to, message),
                failover::Action::Promote { primary, term } => {
                    // The NI change applies only at the epoch the round started from.
                    if term == self.view.term + 1 {
                        if self.handover_to == Some(primary) {
                            self.handed_over += 1;
                        }
                        // As the NI's promotion: the old primary keeps its sync state.
                        self.view.out_of_sync.retain(|&h| h != primary);
                        self.view.term = term;
                        self.view.primary = primary;
                        self.broadcast_view();
                    }
                }
                failover::Action::GiveUp { .. } => {}
            }
        }
        if self.failover.as_ref().is_some_and(|r| r.is_over()) {
            self.failover = None;
        }
    }

    fn broadcast_view(&mut self) {
        for id in self.view.members.clone() {
            if self.reachable(LEADER, id) {
                let delay = Duration::from_millis(1 + self.rng.below(30));
                let view = self.view.clone();
                self.at(delay, Scheduled::View { to: id, view });
            }
        }
    }

    fn send(&mut self, from: HostId, to: HostId, message: Message) {
        if self.rng.unit() < self.drop_rate {
            return;
        }
        let entries = match (&message, self.hosts.get(&from)) {
            (Message::Append(append), Some(host)) => {
                host.disk.log[(append.first - 1) as usize..append.last as usize].to_vec()
            }
            _ => Vec::new(),
        };
        let delay = Duration::from_micros(200 + self.rng.below(20_000));
        self.at(
            delay,
            Scheduled::Deliver {
                from,
                to,
                message,
                entries,
            },
        );
    }

    fn disk_op(&mut self, id: HostId, op: DiskOp) {
        let delay = Duration::from_micros(100 + self.rng.below(3000));
        let now = self.now;
        let host = self.hosts.get_mut(&id).unwrap();
        host.queue.push(op);
        if host.busy_until.is_none() {
            host.busy_until = Some(now + delay);
        }
    }

    /// Completes the head of a host's disk queue.
    fn disk_done(&mut self, id: HostId) {
        let host = self.hosts.get_mut(&id).unwrap();
        let op = host.queue.remove(0);
        host.busy_until = None;
        let event = match op {
            DiskOp::Persist(term) => {
                host.disk.fenced = host.disk.fenced.max(term);
                None
            }
            DiskOp::Marker(term) => {
                let id_of_marker = host.disk.log.len() as u64 + 1;
                host.disk.history.begin(term, id_of_marker);
                host.disk.log.push(Entry { key: 0, value: 0 });
                Some(Event::MarkerWritten { at: id_of_marker })
            }
            DiskOp::Write(entry) => {
                let commit_id = host.disk.log.len() as u64 + 1;
                let (value, started, term) = host.unwritten.remove(0);
                assert_eq!(value, entry.value);
                host.waiting.insert(commit_id, (value, started, term));
                host.disk.log.push(entry);
                Some(Event::Written { last: commit_id })
            }
            DiskOp::Apply {
                first,
                entries,
                history,
            } => {
                let held = host.disk.log.len() as u64;
                assert!(
                    first <= held + 1,
                    "apply leaves a gap: {first} after {held}"
                );
                host.disk.log.truncate(first as usize - 1);
                host.disk.log.extend(entries);
                host.disk.history = history;
                Some(Event::Applied {
                    last: host.disk.log.len() as u64,
                })
            }
        };
        if !host.queue.is_empty() {
            let delay = Duration::from_micros(100 + self.rng.below(3000));
            host.busy_until = Some(self.now + delay);
        }
        if let Some(event) = event {
            self.feed(id, event, &[]);
        }
    }

    fn client_step(&mut self) {
        let id = 1 + self.rng.below(self.hosts.len() as u64);
        let now = self.now;
        let key = 1 + self.rng.below(KEYS);
        let writes = self.rng.unit() < 0.5;
        let host = self.hosts.get_mut(&id).unwrap();
        let Some(core) = host.core.as_ref() else {
            return;
        };
        if writes {
            if let (true, Some(term)) = (core.writable(now), core.primary_term()) {
                if host.unwritten.len() >= 16 {
                    return;
                }
                let value = self.next_value;
                self.next_value += 1;
                host.unwritten.push((value, now, term));
                self.disk_op(id, DiskOp::Write(Entry { key, value }));
            }
        } else if let Some(commit) = core.readable(now) {
            let seen = host.disk.log[..commit as usize]
                .iter()
                .enumerate()
                .rev()
                .find(|(_, e)| e.key == key)
                .map(|(i, e)| (i as u64 + 1, e.value))
                .unwrap_or((0, 0));
            self.reads.push((key, seen.0, seen.1, now));
        }
    }

    fn tick_cores(&mut self) {
        let now = self.now;
        let due: Vec<HostId> = self
            .hosts
            .iter()
            .filter(|(_, h)| {
                h.core
                    .as_ref()
                    .and_then(|c| c.next_deadline())
                    .is_some_and(|d| d <= now)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            self.feed(id, Event::Tick, &[]);
        }
        if self
            .failover
            .as_ref()
            .and_then(|r| r.next_deadline())
            .is_some_and(|d| d <= now)
        {
            self.drive_failover(failover::Event::Tick);
        }
        // Client writes time out.
        for host in self.hosts.values_mut() {
            host.waiting
                .retain(|_, (_, started, _)| now < *started + Duration::from_secs(3));
        }
    }

    fn run_until(&mut self, end: Instant, faults: bool, clients: bool) {
        let step = Duration::from_millis(1);
        let mut next_view = self.now;
        while self.now < end {
            self.now += step;
            while let Some(Reverse((at, id))) = self.events.peek().copied() {
                if at > self.now {
                    break;
                }
                self.events.pop();
                let what = self.scheduled.remove(&id).unwrap();
                self.happen(what);
            }
            let busy: Vec<HostId> = self
                .hosts
                .iter()
                .filter(|(_, h)| h.busy_until.is_some_and(|t| t <= self.now))
                .map(|(&id, _)| id)
                .collect();
            for id in busy {
                self.disk_done(id);
            }
            self.tick_cores();
            if self.now >= next_view {
                self.broadcast_view();
                next_view = self.now + Duration::from_millis(500);
            }
            if clients && self.rng.unit() < 0.3 {
                self.client_step();
            }
            if faults {
                self.fault_step();
            }
        }
    }

    fn happen(&mut self, what: Scheduled) {
        match what {
            Scheduled::Deliver {
                from,
                to,
                message,
                entries,
            } => {
                if !self.reachable(from, to) {
                    return;
                }
                if to == LEADER {
                    if let Message::FenceAnswer(answer) = message {
                        self.drive_failover(failover::Event::Answer { from, answer });
                    }
                    return;
                }
                self.feed(to, Event::Received { from, message }, &entries);
            }
            Scheduled::View { to, view } => {
                if self.reachable(LEADER, to) {
                    self.feed(to, Event::View(view), &[]);
                }
            }
            Scheduled::Sync {
                term,
                host,
                in_sync,
            } => {
                let listed_out = self.view.out_of_sync.contains(&host);
                if term == self.view.term && host != self.view.primary && listed_out == in_sync {
                    match in_sync {
                        true => self.view.out_of_sync.retain(|&h| h != host),
                        false => self.view.out_of_sync.push(host),
                    }
                    self.syncs += 1;
                    self.broadcast_view();
                }
            }
            Scheduled::CopyDone { to, from, term } => {
                let wanted = self.hosts[&to]
                    .core
                    .as_ref()
                    .is_some_and(|core| core.copying() == Some(term));
                if !wanted {
                    // No longer wanted (a newer term, a restart): the copy stops before it
                    // touches the disk.
                    return;
                }
                let source_ok = self.up(from) && self.reachable(from, to);
                if !source_ok {
                    return self.feed(to, Event::CopyFailed { term }, &[]);
                }
                let source = self.hosts[&from].disk.clone();
                let through = source.log.len() as u64;
                let host = self.hosts.get_mut(&to).unwrap();
                host.queue.clear();
                host.busy_until = None;
                host.disk.log = source.log;
                host.disk.history = source.history.clone();
                let copied = Event::Copied {
                    term,
                    from: through,
                    through,
                    history: source.history,
                };
                self.feed(to, copied, &[]);
            }
        }
    }

    fn fault_step(&mut self) {
        let roll = self.rng.unit();
        let hosts = self.hosts.len() as u64;
        if roll < 0.0008 {
            let id = 1 + self.rng.below(hosts);
            let down = self.hosts.values().filter(|h| h.core.is_none()).count() as u64;
            if self.up(id) && down < (hosts - 1) / 2 {
                self.crash(id);
            }
        } else if roll < 0.0020 {
            let down: Vec<HostId> = self
                .hosts
                .iter()
                .filter(|(_, h)| h.core.is_none())
                .map(|(&id, _)| id)
                .collect();
            if let Some(&id) = down.first() {
                self.restart(id);
            }
        } else if roll < 0.0026 {
            if self.cut.is_empty() {
                let minority = (hosts - 1) / 2;
                while (self.cut.len() as u64) < minority {
                    let id = 1 + self.rng.below(hosts);
                    if !self.cut.contains(&id) {
                        self.cut.push(id);
                    }
                }
            } else {
                self.cut.clear();
            }
        } else if roll < 0.0032 && self.failover.is_none() {
            // A planned handover to another copy, whatever state the copies are in.
            let to = 1 + self.rng.below(hosts);
            if to != self.view.primary {
                self.start_failover(Some(to));
            }
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
        self.drop_rate = 0.0;
        let down: Vec<HostId> = self
            .hosts
            .iter()
            .filter(|(_, h)| h.core.is_none())
            .map(|(&id, _)| id)
            .collect();
        for id in down {
            self.restart(id);
        }
    }

    fn check(&self, seed: u64) {
        let primary = self.view.primary;
        let final_log = &self.hosts[&primary].disk.log;
        for &(commit_id, key, value, _) in &self.acked {
            let entry = final_log.get(commit_id as usize - 1);
            assert_eq!(
                entry,
                Some(&Entry { key, value }),
                "seed {seed}: acknowledged write {commit_id} (key {key} = {value}) lost"
            );
        }
        for &(key, seen_id, seen_value, started) in &self.reads {
            if seen_id > 0 {
                assert_eq!(
                    final_log.get(seen_id as usize - 1),
                    Some(&Entry {
                        key,
                        value: seen_value
                    }),
                    "seed {seed}: a read saw entry {seen_id} of key {key}, which was lost"
                );
            }
            let newest_acked = self
                .acked
                .iter()
                .filter(|&&(_, k, _, at)| k == key && at < started)
                .map(|&(commit_id, ..)| commit_id)
                .max()
                .unwrap_or(0);
            assert!(
                seen_id >= newest_acked,
                "seed {seed}: stale read of key {key}: saw entry {seen_id}, \
                 but {newest_acked} was acknowledged before the read began"
            );
        }
        assert!(
            self.view.out_of_sync.is_empty(),
            "seed {seed}: copies {:?} still out of sync once settled",
            self.view.out_of_sync
        );
        let commit = self.hosts[&primary].core.as_ref().unwrap().commit();
        for (&id, host) in &self.hosts {
            assert!(
                host.disk.log.len() as u64 >= commit,
                "seed {seed}: host {id} holds {} entries, the commit point is {commit}",
                host.disk.log.len()
            );
            assert_eq!(
                &host.disk.log[..commit as usize],
                &final_log[..commit as usize],
                "seed {seed}: host {id} diverges from the primary below the commit point"
            );
        }
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("SHOAL_TEST_SEED") {
        return vec![seed.parse().expect("SHOAL_TEST_SEED is a number")];
    }
    let count = if std::env::var("SHOAL_LONG_TESTS").is_ok() {
        400
    } else {
        40
    };
    (1..=count).collect()
}

fn run(seed: u64, hosts: u64) -> Sim {
    let mut sim = Sim::new(seed, hosts);
    let faults_end = sim.start + Duration::from_secs(30);
    sim.run_until(faults_end, true, true);
    sim.heal();
    let quiet_end = sim.now + Duration::from_secs(12);
    sim.run_until(quiet_end, false, true);
    // Clients stop, so the copies can settle.
    let settled = sim.now + Duration::from_secs(3);
    sim.run_until(settled, false, false);
    sim.check(seed);
    sim
}

#[test]
fn no_acknowledged_write_is_lost_and_copies_converge() {
    let mut acked = 0;
    let mut reads = 0;
    let (mut failovers, mut handovers, mut handed_over, mut syncs) = (0, 0, 0, 0);
    for seed in seeds() {
        for hosts in [3, 5] {
            let sim = std::panic::catch_unwind(|| run(seed, hosts)).unwrap_or_else(|panic| {
                eprintln!("replication simulation failed: SHOAL_TEST_SEED={seed}, {hosts} hosts");
                std::panic::resume_unwind(panic)
            });
            acked += sim.acked.len();
            reads += sim.reads.len();
            failovers += sim.failovers;
            handovers += sim.handovers;
            handed_over += sim.handed_over;
            syncs += sim.syncs;
        }
    }
    println!(
        "replication simulation: {acked} acknowledged writes, {reads} reads, {failovers} \
         failover rounds, {handovers} handovers ({handed_over} to the copy preferred), \
         {syncs} sync state changes in the NI"
    );
    assert!(
        acked > 0 && reads > 0 && failovers > 0 && handed_over > 0 && syncs > 0,
        "the simulation exercised nothing"
    );
}

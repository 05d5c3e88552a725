//! This host's copies of replicated partitions: the I/O shell around
//! [`shoal_cluster::replication::replica::Replica`].
//!
//! For every partition with more than one copy that this host holds (as primary or
//! follower), one task owns the partition's core. It feeds the core the NI's view of
//! the partition, the replication messages of other hosts, the writes of this host's
//! clients, and the time; it carries out what the core asks, in order:
//! - worker requests on the partition's local worker (`PromiseTerm`, `OpenTerm`,
//!   `Replicate`), whose answers go back to the core;
//! - messages to other hosts through [`ClusterNode::send_replica`], an append carrying
//!   the log entries it names, read from the shard's map;
//! - a full copy of the primary's partition when the local log cannot follow it;
//! - reports of a lost primary to the metadata leader.
//!
//! The routing asks it, per partition, whether a write may start ([`Status`]), tells it
//! what a write committed locally ([`Replication::written`]), and waits until the commit
//! point covers what a request saw before answering ([`Replication::wait_commit`]), so
//! that nothing unreplicated is acknowledged or shown.
//!
//! It never decides anything itself: every rule is the core's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_cluster::ni::{Command, Outcome};
use shoal_cluster::node::ClusterNode;
use shoal_cluster::replication::replica::{Action, Durable, Event, Replica, View};
use shoal_cluster::replication::{History, Message, Settings};
use shoal_cluster::HostId;
use shoal_shared::config::ClusterConfig;
use shoal_shared::frame::{LogEntry, Partition, RecordTable, WorkerRequest, WorkerResponse};
use shoal_shared::partition::partition_worker;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::reads::Readers;
use crate::workers::WorkerLink;
use shoal_shared::lock;

/// Bytes of records per chunk of a full copy.
const COPY_CHUNK_BYTES: u32 = 1 << 20;
/// Longest one step of a full copy waits for the primary.
const COPY_STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before a partition's task starts again after its worker failed it.
const RESTART_AFTER: Duration = Duration::from_millis(500);
/// How often a primary updates the log its worker keeps for the followers.
const HOLD_EVERY: Duration = Duration::from_secs(1);

/// What the routing may do with a partition's copy here, as its core last said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    /// The commit point: every entry up to it is held by enough copies.
    pub commit: u64,
    /// This copy's term while it is the primary and its term is open.
    pub primary_term: Option<u64>,
    /// Writes may start until then (enough followers answered lately).
    pub writable_until: Option<Instant>,
    /// Reads may be served until then (the lease).
    pub readable_until: Option<Instant>,
    /// A failover or handover round is under way: a new primary is being named.
    pub in_round: bool,
    /// This copy's last durable log entry (its replication offset).
    pub last: u64,
    /// On the primary: each follower and the last entry it holds as far as the primary
    /// knows (0 while it takes a full copy).
    pub followers: Vec<(HostId, u64)>,
    /// On a follower: `READONLY` reads may be served from this copy until then.
    pub stale_readable_until: Option<Instant>,
}

impl Status {
    /// Whether the entries up to `last`, written while this copy was the primary of
    /// `term`, are committed (`Some(true)`), can no longer be known to be (`Some(false)`:
    /// the copy left `term`), or are still to come (`None`).
    fn settles(&self, term: u64, last: u64) -> Option<bool> {
        match self.primary_term {
            Some(now) if now == term => (self.commit >= last).then_some(true),
            _ => Some(false),
        }
    }
}

/// How far behind one follower host is on the partitions led here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FollowerLag {
    pub host: HostId,
    /// Partitions led here that it follows.
    pub partitions: usize,
    /// Of those, the ones whose log it does not hold to the end.
    pub behind: usize,
    /// The most entries it lacks of one partition.
    pub entries: u64,
    /// The age, in ms, of the oldest entry it lacks.
    pub ms: u64,
}

/// Something for a partition's task.
enum Input {
    Message {
        from: HostId,
        message: Message,
        entries: Vec<LogEntry>,
    },
    Written {
        last: u64,
    },
}

struct Copy {
    inbox: mpsc::UnboundedSender<Input>,
    status: watch::Receiver<Status>,
}

/// This host's replicated copies. See the module header.
pub struct Replication {
    node: Arc<ClusterNode>,
    links: Vec<WorkerLink>,
    readers: Arc<Readers>,
    settings: Settings,
    /// Most log entries a primary keeps for a lagging follower beyond what log retention
    /// keeps; one further behind takes a full copy instead of filling the disk.
    hold_limit_entries: u64,
    copies: Mutex<HashMap<Partition, Copy>>,
    /// Full copies this host's followers took from their primaries.
    full_copies: AtomicU64,
    /// Followers that primaries here brought into sync in the NI.
    resyncs: Arc<AtomicU64>,
    /// New primaries (failovers and handovers) of partitions this host holds, as the NI
    /// showed them while this host followed it.
    new_primaries: AtomicU64,
}

/// How much log the primaries here keep for lagging followers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogHold {
    /// The most entries one partition keeps for its slowest follower.
    pub most_entries: u64,
    /// Partitions with a follower further behind than the log kept for it (at most
    /// `hold_limit_entries`): it takes a full copy rather than fill the disk.
    pub past_limit: usize,
}

impl Replication {
    /// The copies of this host, started as the NI gives it partitions.
    pub fn start(
        node: Arc<ClusterNode>,
        links: Vec<WorkerLink>,
        readers: Arc<Readers>,
        config: &ClusterConfig,
        hold_limit_entries: u64,
    ) -> Arc<Replication> {
        let settings = Settings {
            min_replicas_to_write: config.min_replicas_to_write,
            max_read_staleness: Duration::from_millis(config.max_read_staleness_ms),
            out_of_sync_after: Duration::from_millis(config.out_of_sync_after_ms),
            ..Settings::default()
        };
        let replication = Arc::new(Replication {
            node,
            links,
            readers,
            settings,
            hold_limit_entries,
            copies: Mutex::default(),
            full_copies: AtomicU64::new(0),
            resyncs: Arc::default(),
            new_primaries: AtomicU64::new(0),
        });
        tokio::spawn(Arc::clone(&replication).follow_table());
        replication
    }

    /// Starts a task for every replicated partition this host holds, whenever the NI
    /// changes; a task ends by itself when the host no longer holds its partition.
    async fn follow_table(self: Arc<Self>) {
        let mut changes = loop {
            match self.node.ni_changes() {
                Some(changes) => break changes,
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        loop {
            let ni = Arc::clone(&changes.borrow_and_update().state);
            if let Some(me) = self.node.host_id() {
                for partition in ni.held_by(me) {
                    let entry = &ni.partitions[usize::from(partition)];
                    if !entry.replicas.is_empty() {
                        self.ensure(partition);
                    }
                }
            }
            // Tasks that ended (partition given away, worker failure) leave; a table
            // change starts them again if still needed.
            lock(&self.copies).retain(|_, copy| !copy.inbox.is_closed());
            let wake = tokio::time::sleep(RESTART_AFTER);
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { return },
                _ = wake => {}
            }
        }
    }

    fn ensure(self: &Arc<Self>, partition: Partition) {
        let mut copies = lock(&self.copies);
        if copies
            .get(&partition)
            .is_some_and(|copy| !copy.inbox.is_closed())
        {
            return;
        }
        let (inbox, input) = mpsc::unbounded_channel();
        let (publish, status) = watch::channel(Status::default());
        copies.insert(partition, Copy { inbox, status });
        let replication = Arc::clone(self);
        tokio::spawn(async move {
            if let Err(error) = replication.run(partition, input, publish).await {
                tracing::warn!(partition, %error, "replicated copy stopped; starting again");
            }
        });
    }

    /// Hands another host's message about `partition` to its task (dropped if this host
    /// runs none: the sender sends again what matters).
    pub fn deliver(
        &self,
        from: HostId,
        partition: Partition,
        message: Message,
        entries: Vec<LogEntry>,
    ) {
        if let Some(copy) = lock(&self.copies).get(&partition) {
            let _ = copy.inbox.send(Input::Message {
                from,
                message,
                entries,
            });
        }
    }

    /// The partition's status here, waiting up to `deadline` for `ready` to hold.
    pub async fn wait_status(
        &self,
        partition: Partition,
        deadline: Instant,
        ready: impl Fn(&Status, Instant) -> bool,
    ) -> Option<Status> {
        let mut status = lock(&self.copies).get(&partition)?.status.clone();
        loop {
            let now = Instant::now();
            let current = status.borrow_and_update().clone();
            if ready(&current, now) {
                return Some(current);
            }
            // The status changes on events; leases and answers also lapse with time.
            let recheck = (now + Duration::from_millis(20)).min(deadline);
            if now >= deadline {
                return None;
            }
            if let Ok(Err(_)) = tokio::time::timeout_at(recheck, status.changed()).await {
                // The partition's task ended: nothing will change any more.
                return None;
            }
        }
    }

    /// The status of this host's copy of `partition`, as its core last published it.
    pub fn status(&self, partition: Partition) -> Option<Status> {
        lock(&self.copies)
            .get(&partition)
            .map(|copy| copy.status.borrow().clone())
    }

    /// Whether a failover or handover round of `partition` is under way, as this host's
    /// copy knows.
    pub fn in_round(&self, partition: Partition) -> bool {
        lock(&self.copies)
            .get(&partition)
            .is_some_and(|copy| copy.status.borrow().in_round)
    }

    /// How many followers of `partition` hold this primary's log up to where it is now,
    /// waiting until `wanted` do, until `deadline`, or until this copy leaves its term. 0
    /// when this copy is not the partition's primary.
    pub async fn acknowledged(
        &self,
        partition: Partition,
        wanted: usize,
        deadline: Instant,
    ) -> usize {
        let Some(Status {
            primary_term: Some(term),
            last,
            ..
        }) = self.status(partition)
        else {
            return 0;
        };
        let holding = |status: &Status| match status.primary_term == Some(term) {
            true => status
                .followers
                .iter()
                .filter(|(_, held)| *held >= last)
                .count(),
            false => 0,
        };
        self.wait_status(partition, deadline, |status, _| {
            status.primary_term != Some(term) || holding(status) >= wanted
        })
        .await;
        self.status(partition).map_or(0, |status| holding(&status))
    }

    /// Full copies this host's followers took from their primaries (a log too short to
    /// catch up from).
    pub fn full_copies(&self) -> u64 {
        self.full_copies.load(Ordering::Relaxed)
    }

    /// Followers that primaries here brought into sync in the NI: new ones, and returning
    /// ones from the log or after a full copy.
    pub fn resyncs(&self) -> u64 {
        self.resyncs.load(Ordering::Relaxed)
    }

    /// New primaries (failovers and handovers) this host saw for the partitions it holds.
    pub fn new_primaries_seen(&self) -> u64 {
        self.new_primaries.load(Ordering::Relaxed)
    }

    /// How much log the partitions led here keep for their slowest followers.
    pub fn log_hold(&self) -> LogHold {
        let mut hold = LogHold::default();
        for copy in lock(&self.copies).values() {
            let status = copy.status.borrow();
            if status.primary_term.is_none() {
                continue;
            }
            let slowest = status.followers.iter().map(|&(_, held)| held).min();
            let Some(behind) = slowest.map(|held| status.last.saturating_sub(held)) else {
                continue;
            };
            hold.most_entries = hold.most_entries.max(behind.min(self.hold_limit_entries));
            hold.past_limit += usize::from(behind > self.hold_limit_entries);
        }
        hold
    }

    /// How far behind each follower of the partitions led here is, one summary per
    /// follower host, in host order.
    pub fn followers_lag(&self) -> Vec<FollowerLag> {
        let led: Vec<(Partition, Status)> = lock(&self.copies)
            .iter()
            .map(|(&p, copy)| (p, copy.status.borrow().clone()))
            .filter(|(_, status)| status.primary_term.is_some())
            .collect();
        let now_ms = shoal_shared::now_ms();
        let mut lags: std::collections::BTreeMap<HostId, FollowerLag> = Default::default();
        for (partition, status) in led {
            for &(host, held) in &status.followers {
                let lag = lags.entry(host).or_insert(FollowerLag {
                    host,
                    ..FollowerLag::default()
                });
                lag.partitions += 1;
                if held >= status.last {
                    continue;
                }
                lag.behind += 1;
                lag.entries = lag.entries.max(status.last - held);
                // The age of the oldest entry it lacks.
                let worker = partition_worker(partition, self.links.len());
                if let Ok(entries) = self.readers.read_log(worker, partition, held + 1, held + 1) {
                    if let Some(entry) = entries.first() {
                        lag.ms = lag.ms.max(now_ms.saturating_sub(entry.timestamp_ms));
                    }
                }
            }
        }
        lags.into_values().collect()
    }

    /// Tells the core that the local worker committed `partition`'s log up to `last`.
    pub fn written(&self, partition: Partition, last: u64) {
        if let Some(copy) = lock(&self.copies).get(&partition) {
            let _ = copy.inbox.send(Input::Written { last });
        }
    }

    /// Waits until the commit point of `partition` reaches `last` while this copy is
    /// still the primary of `term` (true), or until it is not (false), or `deadline`
    /// (false).
    ///
    /// The term matters: a copy that stepped down follows a newer primary's commit point,
    /// whose entries are not the ones this host's worker wrote in `term`.
    pub async fn wait_commit(
        &self,
        partition: Partition,
        term: u64,
        last: u64,
        deadline: Instant,
    ) -> bool {
        let settled = self
            .wait_status(partition, deadline, |status, _| {
                status.settles(term, last).is_some()
            })
            .await;
        settled.and_then(|status| status.settles(term, last)) == Some(true)
    }

    fn worker(&self, partition: Partition) -> usize {
        partition_worker(partition, self.links.len())
    }

    async fn ask(
        &self,
        partition: Partition,
        request: WorkerRequest,
    ) -> Result<WorkerResponse, String> {
        let worker = self.worker(partition);
        match self.links[worker].send(request).await.wait().await {
            Ok(WorkerResponse::Error(error)) => Err(format!("{error:?}")),
            Ok(response) => Ok(response),
            Err(error) => Err(error.to_string()),
        }
    }

    /// The partition's task: the core and its I/O, until the host no longer holds the
    /// partition (Ok) or a worker request fails (Err; started again later).
    async fn run(
        self: Arc<Self>,
        partition: Partition,
        mut input: mpsc::UnboundedReceiver<Input>,
        publish: watch::Sender<Status>,
    ) -> Result<(), String> {
        let me = self.node.host_id().ok_or("not a member")?;
        let worker = self.worker(partition);
        let (mut meta, mut state, copying) = self
            .readers
            .partition_state(worker, partition)
            .map_err(|error| error.to_string())?;
        if copying {
            // A full copy was cut short: its records cannot be trusted. Start from an
            // empty copy, which claims nothing, and catch up or copy again.
            tracing::warn!(partition, "a full copy was interrupted; clearing the copy");
            self.ask(partition, WorkerRequest::ClearPartition { partition })
                .await?;
            let reset = WorkerRequest::Replicate {
                partition,
                entries: Vec::new(),
                history: Vec::new(),
            };
            self.ask(partition, reset).await?;
            self.ask(
                partition,
                WorkerRequest::SetCopying {
                    partition,
                    copying: false,
                },
            )
            .await?;
            (meta, state, _) = self
                .readers
                .partition_state(worker, partition)
                .map_err(|error| error.to_string())?;
        }
        let history = History::from_starts(state.history).ok_or("stored history is broken")?;
        let durable = Durable {
            fenced: state.fenced_term,
            history,
            log_start: meta.trimmed_through + 1,
            last: meta.last_commit_id,
        };
        // Differs between runs of a partition's task.
        let run = shoal_shared::random_u64() | 1;
        let mut core = Replica::new(
            me,
            self.settings.clone(),
            durable,
            run,
            Instant::now().into_std(),
        );
        let mut changes = self.node.ni_changes().ok_or("not a member")?;
        let mut entries: Vec<LogEntry> = Vec::new();
        // The latest history a primary sent: what a full copy takes over.
        let mut primary_history = History::default();
        let mut event = Some(self.view(partition, me));
        let mut held: Option<(u64, Instant, bool)> = None;
        let mut seen_term: Option<u64> = None;
        loop {
            // The worker's log as it is: writes the core did not hear of count too.
            if let Ok(last) = self.readers.last_commit_id(worker, partition) {
                core.handle(Event::LocalLog { last }, Instant::now().into_std());
            }
            match event.take() {
                Some(Some(view)) => {
                    if seen_term.is_some_and(|term| view.term > term) {
                        self.new_primaries.fetch_add(1, Ordering::Relaxed);
                    }
                    seen_term = Some(view.term);
                    core.handle(Event::View(view), Instant::now().into_std())
                }
                Some(None) => return Ok(()),
                None => {}
            }
            self.carry_out(partition, &mut core, &entries, &primary_history, &publish)
                .await?;
            publish.send_replace(status_of(&core));
            self.hold_log(partition, &core, &mut held).await?;
            let wake = core
                .next_deadline()
                .map_or(Instant::now() + Duration::from_secs(1), Instant::from_std);
            tokio::select! {
                received = input.recv() => match received {
                    None => return Ok(()),
                    Some(Input::Message { from, message, entries: carried }) => {
                        if let Message::Append(append) = &message {
                            if append.term >= core.fenced() {
                                primary_history = append.history.clone();
                            }
                        }
                        entries = carried;
                        core.handle(Event::Received { from, message }, Instant::now().into_std());
                    }
                    Some(Input::Written { last }) => core.handle(Event::Written { last }, Instant::now().into_std()),
                },
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    event = Some(self.view(partition, me));
                }
                _ = tokio::time::sleep_until(wake) => core.handle(Event::Tick, Instant::now().into_std()),
            }
        }
    }

    /// On a primary, at most every [`HOLD_EVERY`]: tells the worker to keep the log the
    /// followers still need ([`Replica::trim_floor`]), within `hold_limit_entries` of its
    /// end. `held` is what was last sent, when, and whether a follower needed more; the
    /// first time one does, it is logged.
    async fn hold_log(
        &self,
        partition: Partition,
        core: &Replica,
        held: &mut Option<(u64, Instant, bool)>,
    ) -> Result<(), String> {
        let Some(floor) = core.trim_floor() else {
            return Ok(());
        };
        let last = core.position().last;
        let from = floor
            .max(last.saturating_sub(self.hold_limit_entries))
            .max(1);
        if held.is_some_and(|(sent, at, _)| sent == from || at.elapsed() < HOLD_EVERY) {
            return Ok(());
        }
        let past = floor < from;
        if past && !held.is_some_and(|(_, _, was)| was) {
            tracing::warn!(
                partition,
                needed_from = floor,
                kept_from = from,
                "a follower is further behind than the log kept for it \
                 (storage.log_retention_entries × 10); it will take a full copy"
            );
        }
        self.ask(partition, WorkerRequest::HoldLog { partition, from })
            .await?;
        *held = Some((from, Instant::now(), past));
        Ok(())
    }

    /// The NI's view of `partition`; `None` when `me` holds no copy of it any more.
    fn view(&self, partition: Partition, me: HostId) -> Option<View> {
        let ni = self.node.ni();
        let entry = ni.partitions.get(usize::from(partition))?;
        if !entry.is_member(me) || entry.replicas.is_empty() {
            return None;
        }
        Some(View {
            term: entry.term,
            primary: entry.owner,
            members: entry.members(),
            out_of_sync: entry.out_of_sync.clone(),
            dropping: entry.dropping,
        })
    }

    /// Carries out the core's actions in order, feeding the answers back, until it asks
    /// for nothing more. The status is published before each round of actions, so that
    /// the routing never acts on a role the core has already left (a primary that stepped
    /// down answers a fence only after the routing knows).
    async fn carry_out(
        &self,
        partition: Partition,
        core: &mut Replica,
        entries: &[LogEntry],
        primary_history: &History,
        publish: &watch::Sender<Status>,
    ) -> Result<(), String> {
        loop {
            publish.send_replace(status_of(core));
            let actions = core.poll_actions();
            if actions.is_empty() {
                return Ok(());
            }
            for action in actions {
                let now = || Instant::now().into_std();
                match action {
                    Action::PersistTerm { term } => {
                        self.ask(partition, WorkerRequest::PromiseTerm { partition, term })
                            .await?;
                    }
                    Action::Send { to, message } => {
                        let mut carried = Vec::new();
                        if let Message::Append(append) = &message {
                            let worker = self.worker(partition);
                            carried = self
                                .readers
                                .read_log(worker, partition, append.first, append.last)
                                .map_err(|error| error.to_string())?;
                            let wanted = (append.last + 1).saturating_sub(append.first);
                            if carried.len() as u64 != wanted {
                                // Log retention removed some: the follower copies instead.
                                let (meta, _, _) = self
                                    .readers
                                    .partition_state(worker, partition)
                                    .map_err(|error| error.to_string())?;
                                let through = meta.trimmed_through;
                                core.handle(Event::Trimmed { through }, now());
                                continue;
                            }
                        }
                        self.node.send_replica(to, partition, message, carried);
                    }
                    Action::WriteMarker { term } => {
                        match self
                            .ask(partition, WorkerRequest::OpenTerm { partition, term })
                            .await
                        {
                            Ok(WorkerResponse::Integer(at)) => {
                                core.handle(Event::MarkerWritten { at: at as u64 }, now());
                            }
                            // The task starts again and opens the term anew.
                            other => return Err(format!("cannot open term {term}: {other:?}")),
                        }
                    }
                    Action::Apply {
                        first,
                        last,
                        history,
                    } => {
                        let chosen: Vec<LogEntry> = entries
                            .iter()
                            .filter(|entry| (first..=last).contains(&entry.commit_id))
                            .cloned()
                            .collect();
                        let request = WorkerRequest::Replicate {
                            partition,
                            entries: chosen,
                            history: history.starts().to_vec(),
                        };
                        match self.ask(partition, request).await {
                            Ok(WorkerResponse::Integer(held)) => {
                                core.handle(Event::Applied { last: held as u64 }, now());
                            }
                            other => {
                                tracing::warn!(partition, ?other, "replicated entries not applied");
                                core.handle(Event::ApplyFailed, now());
                            }
                        }
                    }
                    Action::StartCopy { from, term } => {
                        tracing::info!(
                            partition,
                            primary = from,
                            term,
                            position = ?core.position(),
                            primary_history = ?primary_history,
                            "this copy cannot follow the primary's log: taking a full copy"
                        );
                        let event = match self.copy_from(partition, from).await {
                            Ok((first, through)) => {
                                self.full_copies.fetch_add(1, Ordering::Relaxed);
                                Event::Copied {
                                    term,
                                    from: first,
                                    through,
                                    history: primary_history.up_to(first),
                                }
                            }
                            Err(error) => {
                                tracing::warn!(partition, from, %error, "full copy failed");
                                Event::CopyFailed { term }
                            }
                        };
                        core.handle(event, now());
                    }
                    Action::Committed { .. } => {}
                    Action::CopyDone => {
                        let done = WorkerRequest::SetCopying {
                            partition,
                            copying: false,
                        };
                        self.ask(partition, done).await?;
                    }
                    Action::ReportSync { host, in_sync } => {
                        let make = |epoch| Command::SetSync {
                            partition,
                            host,
                            in_sync,
                            epoch,
                        };
                        self.propose(partition, make, in_sync.then(|| Arc::clone(&self.resyncs)));
                    }
                    Action::CompleteDrop { host } => {
                        let make = |epoch| Command::CompleteDrop {
                            partition,
                            host,
                            epoch,
                        };
                        self.propose(partition, make, None);
                    }
                    Action::PrimaryLost { term, .. } | Action::SteppedDown { term } => {
                        self.node.report_primary_lost(partition, term);
                    }
                }
            }
        }
    }

    /// Proposes, in the background, the NI change `make` builds at the partition's
    /// current epoch (a stale one is refused, and the core asks again after the next
    /// change of the view); `done` counts it once made.
    fn propose(
        &self,
        partition: Partition,
        make: impl FnOnce(u64) -> Command,
        done: Option<Arc<AtomicU64>>,
    ) {
        let Some(epoch) = self
            .node
            .ni()
            .partitions
            .get(usize::from(partition))
            .map(|entry| entry.epoch)
        else {
            return;
        };
        let command = make(epoch);
        let node = Arc::clone(&self.node);
        tokio::spawn(async move {
            match node.propose(command.clone()).await {
                Ok(Outcome::Done) => {
                    if let Some(done) = done {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::info!(partition, ?command, "replication changed the NI")
                }
                other => tracing::debug!(
                    partition,
                    ?command,
                    ?other,
                    "replication's NI change not made"
                ),
            }
        });
    }

    /// Replaces the local copy of `partition` with the primary's: clears it, notes the
    /// primary's last commit id, copies its records chunk by chunk, and notes its last
    /// commit id again. Answers (the first, the second): the log is replayed from the
    /// first on, and the copy is whole once it reached the second.
    async fn copy_from(&self, partition: Partition, primary: HostId) -> Result<(u64, u64), String> {
        // Recorded first: a copy cut short by a crash is cleared and made again.
        let copying = WorkerRequest::SetCopying {
            partition,
            copying: true,
        };
        self.ask(partition, copying).await?;
        self.ask(partition, WorkerRequest::ClearPartition { partition })
            .await?;
        let first = self.primary_last(partition, primary).await?;
        let mut from: Option<(RecordTable, Vec<u8>)> = None;
        loop {
            let request = WorkerRequest::ExportPartition {
                partition,
                from: from.clone(),
                max_bytes: COPY_CHUNK_BYTES,
            };
            let (records, next) = match self.on_primary(partition, primary, request).await? {
                WorkerResponse::Records { records, next, .. } => (records, next),
                other => return Err(format!("unexpected export answer {other:?}")),
            };
            if !records.is_empty() {
                self.ask(partition, WorkerRequest::ImportRecords { records })
                    .await?;
            }
            match next {
                Some(next) => from = Some(next),
                None => break,
            }
        }
        let through = self.primary_last(partition, primary).await?;
        Ok((first, through.max(first)))
    }

    async fn primary_last(&self, partition: Partition, primary: HostId) -> Result<u64, String> {
        match self
            .on_primary(partition, primary, WorkerRequest::LastCommitIds)
            .await?
        {
            WorkerResponse::Positions(positions) => Ok(positions
                .into_iter()
                .find(|&(p, _)| p == partition)
                .map_or(0, |(_, last)| last)),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    async fn on_primary(
        &self,
        partition: Partition,
        primary: HostId,
        request: WorkerRequest,
    ) -> Result<WorkerResponse, String> {
        use shoal_cluster::messages::{DataRequest, PeerRequest, PeerResponse};
        let request = PeerRequest::Data(DataRequest::Partition { partition, request });
        match self
            .node
            .call_host(primary, request, COPY_STEP_TIMEOUT)
            .await
        {
            Ok(PeerResponse::Worker(WorkerResponse::Error(error))) => Err(format!("{error:?}")),
            Ok(PeerResponse::Worker(response)) => Ok(response),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(error) => Err(error.to_string()),
        }
    }
}

/// What the routing needs of the core, at this moment.
fn status_of(core: &Replica) -> Status {
    Status {
        commit: core.commit(),
        primary_term: core.primary_term(),
        writable_until: core.writable_until().map(Instant::from_std),
        readable_until: core.readable_until().map(Instant::from_std),
        in_round: core.in_round(),
        last: core.position().last,
        followers: core.followers(),
        stale_readable_until: core.stale_readable_until().map(Instant::from_std),
    }
}

#[cfg(test)]
mod tests {
    use super::Status;

    #[test]
    fn a_write_settles_only_on_the_commit_point_of_its_own_term() {
        let primary = |term, commit| Status {
            commit,
            primary_term: Some(term),
            ..Status::default()
        };
        assert_eq!(primary(4, 9).settles(4, 10), None, "still to come");
        assert_eq!(primary(4, 10).settles(4, 10), Some(true));
        // Stepped down: the commit point it follows now is a newer primary's.
        let follower = Status {
            commit: 50,
            ..Status::default()
        };
        assert_eq!(follower.settles(4, 10), Some(false));
        // Primary again, of a later term: what it wrote in term 4 may be gone.
        assert_eq!(primary(6, 50).settles(4, 10), Some(false));
    }
}

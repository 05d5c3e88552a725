//! Seeded simulation of the cluster's membership logic (turmoil).
//!
//! Every simulated host runs the real [`ClusterNode`]: joining through seeds, the
//! metadata Raft group, heartbeats, suspicion reports and the leader's duties. Only
//! the world around it is simulated: its [`PeerCaller`] sends each request and
//! response as a datagram over turmoil's network (see [`Mailroom`]), its [`Clock`]
//! reads simulated time, and its metadata store is a [`MemoryMetaStore`] that
//! outlives a crash of its host, as a disk would. Time is tokio's paused clock,
//! which turmoil advances tick by tick.
//!
//! Host 1 founds the cluster; the others join through random earlier hosts, with
//! staggered starts, the last tenth of them while the faults go on. A seeded
//! schedule crashes and restarts hosts and cuts a minority of hosts off the rest
//! (sometimes the metadata leader with a majority of the voters), then heals
//! everything. Checked throughout:
//! - the id ranges in every NI a host holds tile the id space without overlap, and
//!   the ids the hosts reserve (`ReserveIds` through the node) never overlap;
//! - two hosts at one NI version hold the same NI (same checksum);
//! - a host is marked `inactive` only if it was crashed or cut off from the
//!   majority shortly before (within [`INACTIVE_GRACE_MS`]); a host on the
//!   majority side never is.
//!
//! Once the last fault has ended, every host must hold the same NI (version and
//! checksum), with every host writable in it, within [`CONVERGENCE_BOUND`]; the
//! convergence time is printed.
//!
//! `SHOAL_TEST_SEED=<seed>` repeats a schedule (the faults, the starts, turmoil's
//! latencies). Openraft draws its election timeouts from the thread's own random
//! generator, so two runs of one seed can still differ in detail.
//! `SHOAL_SIM_HOSTS=<n>` changes the number of hosts, and `SHOAL_LONG_TESTS=1`
//! runs a longer schedule of faults.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use shoal_cluster::messages::{PeerRequest, PeerResponse};
use shoal_cluster::ni::{Command, HostState, NetworkInfo, Outcome};
use shoal_cluster::node::{ClusterNode, MetaStore, NodeSettings};
use shoal_cluster::peer::{HostAddr, PeerError};
use shoal_cluster::raft_store::memory::MemoryMetaStore;
use shoal_cluster::ranges::IdRange;
use shoal_cluster::transport::{CallFuture, Clock, PeerCaller};
use shoal_cluster::HostId;
use shoal_shared::frame::{decode_frame, encode_frame};
use tokio::sync::oneshot;
use turmoil::net::UdpSocket;

/// The port every simulated host receives peer datagrams on.
const PEER_PORT: u16 = 7380;
/// Simulated time of each turmoil step.
const TICK: Duration = Duration::from_millis(10);
/// How often the checks look at the hosts.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// The heartbeat interval and suspect threshold of production's defaults.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
const SUSPECT_THRESHOLD: f64 = 8.0;
/// Short enough that hosts crashed for long lose their unused ids during the run.
const OFFLINE_THRESHOLD_MS: u64 = 15_000;
/// A host crashed or cut off until this long before it was marked `inactive` may be
/// marked: the observers' scores need about 7 answered heartbeats (3.5 s) to fall below
/// the suspect level again, the leader keeps a report for 3 s, and the leader's duty
/// loop and the commit take a little more.
const INACTIVE_GRACE_MS: u64 = 12_000;
/// No fault starts in the last this long of the faults' phase.
const QUIET_BEFORE_HEAL_MS: u64 = 12_000;
/// Once the last fault has ended, every host holds the same NI within this.
const CONVERGENCE_BOUND: Duration = Duration::from_secs(60);
/// The simulated clock's epoch: 2023-11-14.
const EPOCH_SECS: u64 = 1_700_000_000;

// ---------------------------------------------------------------------------------------
// The world a simulated node sees: its clock and its network.

/// Simulated time since the epoch.
struct SimClock;

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        turmoil::since_epoch()
            .expect("the clock is read inside the simulation")
            .as_millis() as u64
    }
}

/// A request with the caller's id, or the response to it.
#[derive(Debug, Serialize, Deserialize)]
enum Packet {
    Call { id: u64, request: PeerRequest },
    Reply { id: u64, response: PeerResponse },
}

impl Packet {
    fn is_heartbeat(&self) -> bool {
        matches!(
            self,
            Packet::Call {
                request: PeerRequest::Heartbeat { .. },
                ..
            } | Packet::Reply {
                response: PeerResponse::Heartbeat { .. },
                ..
            }
        )
    }
}

/// A packet waiting for its datagram to arrive.
enum Parcel {
    /// The bytes of one peer-link frame (`shoal_shared::frame`).
    Frame(Vec<u8>),
    /// A heartbeat, handed over as it is: encoding the rumors of every host twice per
    /// heartbeat would take most of the run, and the frames of the other messages
    /// already cover their encoding.
    Heartbeat(Box<Packet>),
}

/// Where packets wait between their sender and their receiver. Turmoil carries only
/// a key per packet, as a datagram, so the network decides what arrives, when, and
/// what is lost; the receiver collects the packet with the key.
#[derive(Default)]
struct Mailroom {
    next_key: AtomicU64,
    /// Each parcel with when it was posted (simulated ms), to sweep the lost ones.
    parcels: Mutex<HashMap<u64, (Parcel, u64)>>,
}

impl Mailroom {
    /// Posts `packet`; the key is the datagram to send.
    fn post(&self, packet: Packet) -> Result<[u8; 8], String> {
        let parcel = if packet.is_heartbeat() {
            Parcel::Heartbeat(Box::new(packet))
        } else {
            let mut frame = Vec::new();
            encode_frame(&packet, &mut frame).map_err(|error| error.to_string())?;
            Parcel::Frame(frame)
        };
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        lock(&self.parcels).insert(key, (parcel, SimClock.now_ms()));
        Ok(key.to_be_bytes())
    }

    /// The packet a datagram announces; `None` if the datagram is not a key of a parcel.
    fn collect(&self, datagram: &[u8]) -> Option<Result<Packet, String>> {
        let key = u64::from_be_bytes(datagram.try_into().ok()?);
        let (parcel, _) = lock(&self.parcels).remove(&key)?;
        Some(match parcel {
            Parcel::Heartbeat(packet) => Ok(*packet),
            Parcel::Frame(frame) => match decode_frame::<Packet>(&frame) {
                Ok(Some((packet, used))) if used == frame.len() => Ok(packet),
                Ok(_) => Err("an incomplete frame".to_string()),
                Err(error) => Err(error.to_string()),
            },
        })
    }

    /// Forgets the parcels whose datagram was lost long ago.
    fn sweep(&self, now_ms: u64) {
        lock(&self.parcels).retain(|_, (_, posted_ms)| *posted_ms + 60_000 > now_ms);
    }
}

/// A host's peer calls as datagrams over turmoil's network. A request or response that
/// is lost (crash, partition) leaves its caller waiting until its timeout.
struct DatagramCaller {
    socket: Arc<UdpSocket>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    waiting: Mutex<HashMap<u64, oneshot::Sender<PeerResponse>>>,
}

impl DatagramCaller {
    fn take_waiter(&self, id: u64) -> Option<oneshot::Sender<PeerResponse>> {
        lock(&self.waiting).remove(&id)
    }
}

impl PeerCaller for DatagramCaller {
    fn call<'a>(
        &'a self,
        peer: &'a HostAddr,
        request: PeerRequest,
        timeout: Duration,
    ) -> CallFuture<'a> {
        Box::pin(async move {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let datagram = self
                .shared
                .mailroom
                .post(Packet::Call { id, request })
                .map_err(|reason| PeerError::Protocol {
                    peer: peer.clone(),
                    reason,
                })?;
            let (waiter, response) = oneshot::channel();
            lock(&self.waiting).insert(id, waiter);
            if let Err(error) = self.socket.send_to(&datagram, peer.as_str()).await {
                self.take_waiter(id);
                return Err(PeerError::Unreachable {
                    peer: peer.clone(),
                    reason: error.to_string(),
                });
            }
            match tokio::time::timeout(timeout, response).await {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(_)) => Err(PeerError::ConnectionLost { peer: peer.clone() }),
                Err(_) => {
                    self.take_waiter(id);
                    Err(PeerError::Timeout {
                        peer: peer.clone(),
                        timeout_ms: timeout.as_millis() as u64,
                    })
                }
            }
        })
    }
}

/// Receives the host's datagrams: requests go to the node (each in a task of its
/// own, as the peer listener runs them), responses to their waiting callers.
async fn serve(
    socket: Arc<UdpSocket>,
    caller: Arc<DatagramCaller>,
    node: Arc<ClusterNode>,
    shared: Arc<Shared>,
) -> turmoil::Result {
    let mut buffer = [0u8; 8];
    loop {
        let (length, origin) = socket.recv_from(&mut buffer).await?;
        let packet = match shared.mailroom.collect(&buffer[..length]) {
            Some(Ok(packet)) => packet,
            Some(Err(error)) => {
                shared.fail(format!(
                    "{} got an undecodable frame: {error}",
                    node_name(&node)
                ));
                continue;
            }
            None => {
                shared.fail(format!("{} got a stray datagram", node_name(&node)));
                continue;
            }
        };
        match packet {
            Packet::Call { id, request } => {
                let node = Arc::clone(&node);
                let socket = Arc::clone(&socket);
                let shared = Arc::clone(&shared);
                tokio::spawn(async move {
                    let response = node.handle(HostAddr::from(origin), request).await;
                    match shared.mailroom.post(Packet::Reply { id, response }) {
                        Ok(datagram) => {
                            // A reply to a host that is gone is lost, as on a real network.
                            let _ = socket.send_to(&datagram, origin).await;
                        }
                        Err(error) => shared.fail(format!("cannot encode a response: {error}")),
                    }
                });
            }
            Packet::Reply { id, response } => {
                if let Some(waiter) = caller.take_waiter(id) {
                    let _ = waiter.send(response);
                }
            }
        }
    }
}

fn node_name(node: &ClusterNode) -> String {
    match node.host_id() {
        Some(host) => format!("host id {host}"),
        None => "a joining host".to_string(),
    }
}

// ---------------------------------------------------------------------------------------
// What the hosts share with the test: the nodes, their stores, what they reserved.

/// One simulated machine: its name, its seeds, and what survives its crashes.
struct Machine {
    index: usize,
    seeds: Vec<String>,
    data_dir: PathBuf,
    store: MemoryMetaStore<NetworkInfo>,
    /// The node running now (none while crashed).
    node: Mutex<Weak<ClusterNode>>,
    boots: AtomicU64,
}

/// Ids a host reserved through its node.
#[derive(Debug, Clone, Copy)]
struct Reservation {
    machine: usize,
    host: HostId,
    range: IdRange,
}

#[derive(Default)]
struct Shared {
    mailroom: Mailroom,
    reservations: Mutex<Vec<Reservation>>,
    failures: Mutex<Vec<String>>,
}

impl Shared {
    fn fail(&self, failure: String) {
        lock(&self.failures).push(failure);
    }
}

fn name(index: usize) -> String {
    format!("h{index}")
}

fn peer_addr(index: usize) -> String {
    format!("{}:{PEER_PORT}", name(index))
}

fn machine_of(peer_addr: &str) -> Option<usize> {
    peer_addr
        .strip_prefix('h')?
        .strip_suffix(&format!(":{PEER_PORT}"))?
        .parse()
        .ok()
}

/// The software of one simulated host: a node, its datagram server and a small
/// workload that reserves ids. Started again from the same machine after a crash.
async fn run_host(machine: Arc<Machine>, shared: Arc<Shared>, seed: u64) -> turmoil::Result {
    let boot = machine.boots.fetch_add(1, Ordering::Relaxed);
    let socket = Arc::new(UdpSocket::bind((Ipv4Addr::UNSPECIFIED, PEER_PORT)).await?);
    let caller = Arc::new(DatagramCaller {
        socket: Arc::clone(&socket),
        shared: Arc::clone(&shared),
        next_id: AtomicU64::new(1),
        waiting: Mutex::default(),
    });
    let settings = NodeSettings {
        data_dir: machine.data_dir.clone(),
        phase_path: machine.data_dir.join("cluster-phase"),
        seeds: machine.seeds.clone(),
        peer_addr: peer_addr(machine.index),
        client_addr: String::new(),
        heartbeat_interval: HEARTBEAT_INTERVAL,
        suspect_threshold: SUSPECT_THRESHOLD,
        offline_threshold_ms: OFFLINE_THRESHOLD_MS,
        partitions: 16,
        capacity_bytes: 1 << 30,
        max_fill_ratio: 0.9,
        workers: 1,
        replicas: 1,
        min_replicas_to_write: 1,
    };
    let node = ClusterNode::start_with(
        settings,
        Arc::clone(&caller) as Arc<dyn PeerCaller>,
        Arc::new(SimClock),
        MetaStore::Memory(machine.store.clone()),
    );
    *lock(&machine.node) = Arc::downgrade(&node);
    let rng = Rng::new(seed ^ (machine.index as u64) << 32 ^ boot);
    tokio::spawn(reserve_ids(
        Arc::clone(&node),
        machine.index,
        Arc::clone(&shared),
        rng,
    ));
    serve(socket, caller, node, shared).await
}

/// Reserves a few blocks of ids at random times, as ID.NEW does, and records those
/// the cluster granted.
async fn reserve_ids(node: Arc<ClusterNode>, machine: usize, shared: Arc<Shared>, mut rng: Rng) {
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(2_000 + rng.below(20_000))).await;
        let Some(host) = node.host_id() else {
            continue;
        };
        let count = 1 + rng.below(1 << 20);
        if let Ok(Outcome::Reserved(range)) =
            node.propose(Command::ReserveIds { host, count }).await
        {
            if range.len() != count {
                shared.fail(format!(
                    "host {host} asked for {count} ids and got {range:?}"
                ));
            }
            lock(&shared.reservations).push(Reservation {
                machine,
                host,
                range,
            });
        }
    }
}

// ---------------------------------------------------------------------------------------
// The test.

#[test]
fn membership_survives_crashes_and_partitions() {
    let seed = test_seed();
    let hosts = env_count("SHOAL_SIM_HOSTS", 50).max(3) as usize;
    let long = long_tests();
    let started = Instant::now();
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
    let outcome = std::panic::catch_unwind(|| simulate(seed, hosts, long));
    match outcome {
        Ok(report) => {
            eprintln!(
                "simulation of {hosts} hosts, seed {seed}: {report}; {:.1} s of wall time",
                started.elapsed().as_secs_f64()
            );
        }
        Err(panic) => {
            eprintln!(
                "simulation of {hosts} hosts FAILED with seed {seed} \
                 (set SHOAL_TEST_SEED={seed} to repeat it)"
            );
            std::panic::resume_unwind(panic);
        }
    }
}

/// The faults the schedule has put in place, and when each host was faulty.
#[derive(Default)]
struct Faults {
    /// Crashed machines and when each restarts (ms since the epoch).
    crashed: BTreeMap<usize, u64>,
    /// The machines cut off from the others, and when the cut heals.
    partition: Option<(BTreeSet<usize>, u64)>,
    /// Per machine, the spans (ms since the epoch) it was crashed or cut off; an open
    /// span ends at `u64::MAX`.
    history: BTreeMap<usize, Vec<(u64, u64)>>,
    crashes: usize,
    partitions: usize,
    /// Partitions whose cut side held the metadata leader and a majority of the voters.
    leader_partitions: usize,
}

impl Faults {
    fn begin(&mut self, machine: usize, now_ms: u64) {
        self.history
            .entry(machine)
            .or_default()
            .push((now_ms, u64::MAX));
    }

    fn end(&mut self, machine: usize, now_ms: u64) {
        let still_faulty = self.crashed.contains_key(&machine)
            || self
                .partition
                .as_ref()
                .is_some_and(|(cut, _)| cut.contains(&machine));
        if still_faulty {
            return;
        }
        if let Some(span) = self
            .history
            .get_mut(&machine)
            .and_then(|spans| spans.last_mut())
            .filter(|span| span.1 == u64::MAX)
        {
            span.1 = now_ms;
        }
    }

    fn is_faulty(&self, machine: usize) -> bool {
        self.history
            .get(&machine)
            .and_then(|spans| spans.last())
            .is_some_and(|span| span.1 == u64::MAX)
    }

    /// Whether `machine` was crashed or cut off at some time in `[from_ms, to_ms]`.
    fn faulty_during(&self, machine: usize, from_ms: u64, to_ms: u64) -> bool {
        self.history.get(&machine).is_some_and(|spans| {
            spans
                .iter()
                .any(|&(start, end)| start <= to_ms && end >= from_ms)
        })
    }

    fn faulty_count(&self) -> usize {
        self.history
            .keys()
            .filter(|&&machine| self.is_faulty(machine))
            .count()
    }
}

/// What the checks have seen so far.
#[derive(Default)]
struct Observations {
    /// Per machine, the NI version last inspected.
    inspected: HashMap<usize, u64>,
    /// The checksum of each NI version seen.
    checksums: HashMap<u64, u64>,
    /// `inactive` marks already judged: (host id, since).
    judged: HashSet<(HostId, u64)>,
    inactive_marks: usize,
    /// Host ids in the NI that no machine runs (a join committed twice).
    orphans: BTreeSet<HostId>,
    reservations_checked: usize,
}

fn simulate(seed: u64, hosts: usize, long: bool) -> String {
    let wall = Instant::now();
    let mut rng = Rng::new(seed);
    let scratch = tempfile::tempdir().expect("a temp dir");
    let shared = Arc::new(Shared::default());
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(3600))
        .tick_duration(TICK)
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(10))
        .udp_capacity(1 << 16)
        .epoch(UNIX_EPOCH + Duration::from_secs(EPOCH_SECS))
        .rng_seed(seed)
        .build();

    // Host 1 at once; most others over the next seconds, each through 1 to 3 earlier
    // hosts; the last tenth join while the faults go on.
    let late_joiners = hosts / 10;
    let early = hosts - late_joiners;
    let mut starts: Vec<(u64, usize)> = vec![(0, 1)];
    for index in 2..=early {
        starts.push((1_000 + 100 * (index as u64 - 2) + rng.below(100), index));
    }
    let machines: Vec<Arc<Machine>> = (1..=hosts)
        .map(|index| {
            let seeds = if index == 1 {
                Vec::new()
            } else {
                let wanted = 1 + rng.below(3) as usize;
                let mut seeds = BTreeSet::new();
                while seeds.len() < wanted.min(index - 1) {
                    seeds.insert(1 + rng.below(index as u64 - 1) as usize);
                }
                seeds.into_iter().map(peer_addr).collect()
            };
            let data_dir = scratch.path().join(name(index));
            std::fs::create_dir_all(&data_dir).expect("a data dir");
            Arc::new(Machine {
                index,
                seeds,
                data_dir,
                store: MemoryMetaStore::new(),
                node: Mutex::new(Weak::new()),
                boots: AtomicU64::new(0),
            })
        })
        .collect();

    let epoch_ms = EPOCH_SECS * 1000;
    let now_ms = |sim: &turmoil::Sim| epoch_ms + sim.elapsed().as_millis() as u64;
    let steps_per_sample = (SAMPLE_EVERY.as_millis() / TICK.as_millis()).max(1) as u64;
    let mut faults = Faults::default();
    let mut seen = Observations::default();
    let mut running: BTreeSet<usize> = BTreeSet::new();
    let mut all_joined_at: Option<u64> = None;
    let mut fault_phase: Option<(u64, u64)> = None;
    let mut next_fault_ms = 0;
    let mut healed_at: Option<u64> = None;
    let fault_phase_ms = if long { 300_000 } else { 40_000 };
    let mut step: u64 = 0;

    loop {
        let now = now_ms(&sim);
        // Starts.
        while starts.first().is_some_and(|&(at, _)| at + epoch_ms <= now) {
            let (_, index) = starts.remove(0);
            let machine = Arc::clone(&machines[index - 1]);
            let shared = Arc::clone(&shared);
            sim.host(name(index), move || {
                run_host(Arc::clone(&machine), Arc::clone(&shared), seed)
            });
            // A host that starts during a partition is on the majority side.
            if let Some((cut, _)) = &faults.partition {
                for &inside in cut {
                    sim.partition(name(inside), name(index));
                }
                trace(now, format!("start h{index}, cut off from {cut:?}"));
            } else if index > early {
                trace(now, format!("start h{index}"));
            }
            running.insert(index);
        }

        if step.is_multiple_of(steps_per_sample) {
            check(&machines, &faults, &shared, &mut seen, now);
            shared.mailroom.sweep(now);
            if (now - epoch_ms).is_multiple_of(10_000) {
                trace(
                    now,
                    format!("{:.1} s of wall time", wall.elapsed().as_secs_f64()),
                );
            }
            if all_joined_at.is_none()
                && running.len() == early
                && all_members(&machines[..early], early)
            {
                all_joined_at = Some(now);
                let begin = now + 5_000;
                let end = begin + fault_phase_ms;
                fault_phase = Some((begin, end));
                next_fault_ms = begin;
                let window = end - QUIET_BEFORE_HEAL_MS - begin;
                for index in early + 1..=hosts {
                    starts.push((begin - epoch_ms + rng.below(window), index));
                }
                starts.sort_unstable();
                eprintln!(
                    "{early} hosts joined after {:.1} s; {late_joiners} more join during the faults",
                    secs(now)
                );
            }
            if all_joined_at.is_none() && secs(now) > 120.0 {
                assert_no_failures(&shared, &seen);
                panic!(
                    "not every host joined within 120 s: {}",
                    describe(&machines)
                );
            }
        }

        // Faults, then the heal.
        if let Some((begin, end)) = fault_phase {
            if now >= begin && now < end {
                apply_due_faults(&mut sim, &mut faults, now, &running);
                // The last faults have time to run their course before the heal.
                let quiet = now + QUIET_BEFORE_HEAL_MS >= end;
                if now >= next_fault_ms && !quiet {
                    start_fault(&mut sim, &mut faults, &machines, &mut rng, now, &running);
                    next_fault_ms = now + 2_000 + rng.below(4_000);
                }
                if quiet && healed_at.is_none() && faults.faulty_count() == 0 {
                    healed_at = Some(now);
                    eprintln!(
                        "the last fault ended at {:.1} s ({} crashes, {} partitions, {} of them with the metadata leader and most voters on the cut side)",
                        secs(now),
                        faults.crashes,
                        faults.partitions,
                        faults.leader_partitions
                    );
                }
            } else if now >= end && healed_at.is_none() {
                heal(&mut sim, &mut faults, now, &running);
                healed_at = Some(now);
                eprintln!(
                    "healed every fault at {:.1} s ({} crashes, {} partitions, {} of them with the metadata leader and most voters on the cut side)",
                    (now - epoch_ms) as f64 / 1000.0,
                    faults.crashes,
                    faults.partitions,
                    faults.leader_partitions
                );
            }
        }

        if let Some(healed) = healed_at {
            if step.is_multiple_of(steps_per_sample) {
                if let Some(ni) = converged(&machines) {
                    let took = Duration::from_millis(now - healed);
                    check_reservations_recorded(&ni, &shared);
                    assert_no_failures(&shared, &seen);
                    return format!(
                        "converged {:.1} s (simulated) after the last fault ended, at NI version {} \
                         with {} hosts; {} crashes, {} partitions ({} with the metadata leader on the cut side); \
                         {} inactive marks checked; {} id reservations, none overlapping; \
                         {} orphan host ids",
                        took.as_secs_f64(),
                        ni.version,
                        ni.hosts.len(),
                        faults.crashes,
                        faults.partitions,
                        faults.leader_partitions,
                        seen.inactive_marks,
                        seen.reservations_checked,
                        seen.orphans.len(),
                    );
                }
                if now - healed > CONVERGENCE_BOUND.as_millis() as u64 {
                    assert_no_failures(&shared, &seen);
                    panic!(
                        "the hosts did not converge on one NI within {CONVERGENCE_BOUND:?} \
                         of the end of the last fault: {}",
                        describe(&machines)
                    );
                }
            }
        }

        sim.step().expect("a simulation step");
        step += 1;
    }
}

/// Crashes a few hosts or cuts a minority off, never so many that the rest lose
/// their majority.
fn start_fault(
    sim: &mut turmoil::Sim,
    faults: &mut Faults,
    machines: &[Arc<Machine>],
    rng: &mut Rng,
    now: u64,
    running: &BTreeSet<usize>,
) {
    // The faulty hosts stay well below half.
    let hosts = running.len();
    let budget = (hosts - 1) / 3;
    let room = budget.saturating_sub(faults.faulty_count());
    if room == 0 {
        return;
    }
    let healthy: Vec<usize> = running
        .iter()
        .copied()
        .filter(|&m| !faults.is_faulty(m))
        .collect();
    if faults.partition.is_none() && rng.below(5) < 3 {
        let mut cut = BTreeSet::new();
        let view = raft_view(machines);
        if rng.below(2) == 0 {
            // The metadata leader and a majority of the voters, cut off from most hosts.
            if let Some((leader, voters)) = &view {
                let (leader, voters) = (*leader, voters);
                let leader_machine = machine_of_host(machines, leader);
                if let Some(leader_machine) = leader_machine.filter(|m| healthy.contains(m)) {
                    cut.insert(leader_machine);
                    let mut others: Vec<usize> = voters
                        .iter()
                        .filter_map(|&voter| machine_of_host(machines, voter))
                        .filter(|m| *m != leader_machine && healthy.contains(m))
                        .collect();
                    rng.shuffle(&mut others);
                    let majority = voters.len() / 2 + 1;
                    cut.extend(others.into_iter().take(majority.saturating_sub(1)));
                }
            }
        }
        let size = 1 + rng.below(room.min(hosts / 5).max(1) as u64) as usize;
        while cut.len() < size.min(room) {
            cut.insert(healthy[rng.below(healthy.len() as u64) as usize]);
        }
        if cut.len() > room || cut.is_empty() {
            return;
        }
        let others: Vec<usize> = running.difference(&cut).copied().collect();
        for &inside in &cut {
            for &outside in &others {
                sim.partition(name(inside), name(outside));
            }
        }
        let heal_at = now + 8_000 + rng.below(12_000);
        trace(
            now,
            format!(
                "cut off {cut:?} until {:.1} s (metadata leader and voters: {view:?})",
                secs(heal_at)
            ),
        );
        faults.partition = Some((cut.clone(), heal_at));
        for &machine in &cut {
            faults.begin(machine, now);
        }
        faults.partitions += 1;
        let holds_the_group = view.is_some_and(|(leader, voters)| {
            let on_cut_side = |host: HostId| {
                machine_of_host(machines, host).is_some_and(|machine| cut.contains(&machine))
            };
            let cut_voters = voters.iter().filter(|&&voter| on_cut_side(voter)).count();
            on_cut_side(leader) && cut_voters > voters.len() / 2
        });
        if holds_the_group {
            faults.leader_partitions += 1;
        }
    } else {
        let count = (1 + rng.below(2) as usize).min(room);
        for _ in 0..count {
            let machine = healthy[rng.below(healthy.len() as u64) as usize];
            if faults.crashed.contains_key(&machine) {
                continue;
            }
            sim.crash(name(machine));
            let restart_at = now + 3_000 + rng.below(17_000);
            trace(
                now,
                format!("crash h{machine} until {:.1} s", secs(restart_at)),
            );
            faults.crashed.insert(machine, restart_at);
            faults.begin(machine, now);
            faults.crashes += 1;
        }
    }
}

/// Restarts the crashed hosts and heals the cut whose time has come.
fn apply_due_faults(
    sim: &mut turmoil::Sim,
    faults: &mut Faults,
    now: u64,
    running: &BTreeSet<usize>,
) {
    let due: Vec<usize> = faults
        .crashed
        .iter()
        .filter(|(_, &at)| at <= now)
        .map(|(&machine, _)| machine)
        .collect();
    for machine in due {
        faults.crashed.remove(&machine);
        trace(now, format!("restart h{machine}"));
        sim.bounce(name(machine));
        faults.end(machine, now);
    }
    if faults.partition.as_ref().is_some_and(|(_, at)| *at <= now) {
        repair(sim, faults, now, running);
    }
}

fn repair(sim: &mut turmoil::Sim, faults: &mut Faults, now: u64, running: &BTreeSet<usize>) {
    let Some((cut, _)) = faults.partition.take() else {
        return;
    };
    trace(now, format!("heal the cut of {cut:?}"));
    for &inside in &cut {
        for outside in running.difference(&cut) {
            sim.repair(name(inside), name(*outside));
        }
    }
    for machine in cut {
        faults.end(machine, now);
    }
}

fn heal(sim: &mut turmoil::Sim, faults: &mut Faults, now: u64, running: &BTreeSet<usize>) {
    repair(sim, faults, now, running);
    let crashed: Vec<usize> = faults.crashed.keys().copied().collect();
    for machine in crashed {
        faults.crashed.remove(&machine);
        sim.bounce(name(machine));
        faults.end(machine, now);
    }
}

/// The node a machine runs now.
fn node(machine: &Machine) -> Option<Arc<ClusterNode>> {
    lock(&machine.node).upgrade()
}

fn all_members(machines: &[Arc<Machine>], hosts: usize) -> bool {
    machines.iter().all(|machine| {
        node(machine).is_some_and(|node| node.host_id().is_some() && node.ni().hosts.len() >= hosts)
    })
}

/// The metadata leader and voters, as the first member that knows a leader sees them.
fn raft_view(machines: &[Arc<Machine>]) -> Option<(HostId, BTreeSet<HostId>)> {
    machines.iter().find_map(|machine| {
        let (leader, voters) = node(machine)?.raft_view()?;
        Some((leader?, voters))
    })
}

/// The machine that runs host id `host` now.
fn machine_of_host(machines: &[Arc<Machine>], host: HostId) -> Option<usize> {
    machines
        .iter()
        .find(|machine| node(machine).and_then(|node| node.host_id()) == Some(host))
        .map(|machine| machine.index)
}

/// Looks at every running host's NI: equal versions hold equal NIs, the id ranges tile
/// the id space, `inactive` marks only hosts that were faulty, reservations never overlap.
fn check(
    machines: &[Arc<Machine>],
    faults: &Faults,
    shared: &Shared,
    seen: &mut Observations,
    now: u64,
) {
    let identities: BTreeMap<HostId, usize> = machines
        .iter()
        .filter_map(|machine| Some((node(machine)?.host_id()?, machine.index)))
        .collect();
    for machine in machines {
        let Some(node) = node(machine) else { continue };
        let ni = node.ni();
        if ni.cluster_id == 0 || seen.inspected.get(&machine.index) == Some(&ni.version) {
            continue;
        }
        seen.inspected.insert(machine.index, ni.version);
        let checksum = ni.checksum();
        match seen.checksums.get(&ni.version) {
            Some(&known) if known != checksum => shared.fail(format!(
                "two NIs at version {}: {} holds checksum {checksum:016x}, another {known:016x}",
                ni.version,
                name(machine.index)
            )),
            Some(_) => continue,
            None => {
                seen.checksums.insert(ni.version, checksum);
            }
        }
        if let Err(error) = ni.ids.as_ref().map_or(Ok(()), |ids| ids.check_disjoint()) {
            shared.fail(format!(
                "the id ranges of NI version {} overlap: {error:?}",
                ni.version
            ));
        }
        for info in ni.hosts.values() {
            if info.state != HostState::Inactive || !seen.judged.insert((info.id, info.since_ms)) {
                continue;
            }
            seen.inactive_marks += 1;
            let Some(owner) = machine_of(&info.peer_addr) else {
                shared.fail(format!(
                    "host {} has a foreign address {}",
                    info.id, info.peer_addr
                ));
                continue;
            };
            if identities.get(&info.id) != Some(&owner) && identities.values().any(|&m| m == owner)
            {
                // An id that no machine runs (its join was committed twice).
                seen.orphans.insert(info.id);
                continue;
            }
            // The leader decided at `since_ms`; the mark is committed by `now` at the latest.
            // The host must have been faulty shortly before both.
            let decided = info.since_ms;
            if !faults.faulty_during(owner, decided.saturating_sub(INACTIVE_GRACE_MS), decided)
                || !faults.faulty_during(owner, now.saturating_sub(INACTIVE_GRACE_MS), now)
            {
                shared.fail(format!(
                    "host {} ({}) was marked inactive at {:.1} s, committed by {:.1} s (NI \
                     version {}), but it was neither crashed nor cut off in the {} s before; \
                     its faults: {:?}",
                    info.id,
                    name(owner),
                    secs(decided),
                    secs(now),
                    ni.version,
                    INACTIVE_GRACE_MS / 1000,
                    faults.history.get(&owner)
                ));
            }
        }
    }
    let reservations = lock(&shared.reservations).clone();
    for (index, new) in reservations
        .iter()
        .enumerate()
        .skip(seen.reservations_checked)
    {
        for old in &reservations[..index] {
            if new.range.start < old.range.end && old.range.start < new.range.end {
                shared.fail(format!("ids reserved twice: {new:?} overlaps {old:?}"));
            }
        }
    }
    seen.reservations_checked = reservations.len();
}

/// Every id a host reserved is still recorded as issued under that host in `ni`: no
/// split, reclaim or grant gave it to anyone else.
fn check_reservations_recorded(ni: &NetworkInfo, shared: &Shared) {
    for reservation in lock(&shared.reservations).iter() {
        let covered: u64 = ni
            .ranges_of(reservation.host)
            .iter()
            .map(|owned| {
                let start = owned.range.start.max(reservation.range.start);
                let end = owned.high_water.min(reservation.range.end);
                end.saturating_sub(start)
            })
            .sum();
        if covered != reservation.range.len() {
            shared.fail(format!(
                "{} reserved {:?} as host {}, but the final NI records only {covered} of \
                 those ids as issued by it: {:?}",
                name(reservation.machine),
                reservation.range,
                reservation.host,
                ni.ranges_of(reservation.host)
            ));
        }
    }
}

/// The NI every host holds, once all hold the same one and every host is writable in it.
fn converged(machines: &[Arc<Machine>]) -> Option<Arc<NetworkInfo>> {
    let mut common: Option<Arc<NetworkInfo>> = None;
    let mut ids = Vec::new();
    for machine in machines {
        let node = node(machine)?;
        ids.push(node.host_id()?);
        let ni = node.ni();
        match &common {
            None => common = Some(ni),
            Some(first) if first.version != ni.version => return None,
            Some(_) => {}
        }
    }
    let ni = common?;
    let checksum = ni.checksum();
    for machine in machines {
        if node(machine)?.ni().checksum() != checksum {
            return None;
        }
    }
    ids.iter()
        .all(|id| {
            ni.hosts
                .get(id)
                .is_some_and(|info| info.state == HostState::Write)
        })
        .then_some(ni)
}

fn assert_no_failures(shared: &Shared, seen: &Observations) {
    let failures = lock(&shared.failures).clone();
    assert!(
        failures.is_empty(),
        "{} failures ({} inactive marks checked):\n{}",
        failures.len(),
        seen.inactive_marks,
        failures.join("\n")
    );
}

/// Each machine's view, for a failure message.
fn describe(machines: &[Arc<Machine>]) -> String {
    let mut lines = Vec::new();
    for machine in machines {
        let line = match node(machine) {
            None => format!("{}: down", name(machine.index)),
            Some(node) => {
                let ni = node.ni();
                let inactive: Vec<HostId> = ni
                    .hosts
                    .values()
                    .filter(|info| info.state == HostState::Inactive)
                    .map(|info| info.id)
                    .collect();
                format!(
                    "{}: {} host {:?}, NI v{} ({} hosts, inactive {inactive:?}), raft {:?}",
                    name(machine.index),
                    node.phase(),
                    node.host_id(),
                    ni.version,
                    ni.hosts.len(),
                    node.raft_view()
                )
            }
        };
        lines.push(line);
    }
    format!("\n{}", lines.join("\n"))
}

// ---------------------------------------------------------------------------------------
// Helpers.

/// Seconds of simulated time at `ms` since the epoch.
fn secs(ms: u64) -> f64 {
    ms.saturating_sub(EPOCH_SECS * 1000) as f64 / 1000.0
}

/// Prints a fault event when `SHOAL_SIM_TRACE` is set.
fn trace(now: u64, event: String) {
    if std::env::var_os("SHOAL_SIM_TRACE").is_some() {
        eprintln!("[{:8.3} s] {event}", secs(now));
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A small seeded generator (splitmix64) for the schedule.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)`; 0 when `n` is 0.
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// The seed of this run: `SHOAL_TEST_SEED`, or one from the clock. Printed either way.
fn test_seed() -> u64 {
    let seed = std::env::var("SHOAL_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("simulation seed: {seed} (set SHOAL_TEST_SEED={seed} to repeat it)");
    seed
}

fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn long_tests() -> bool {
    std::env::var("SHOAL_LONG_TESTS").is_ok_and(|v| !v.is_empty() && v != "0")
}

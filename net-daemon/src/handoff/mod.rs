//! Partitions changing hosts: this host's side of every handoff.
//!
//! The metadata leader plans a move by setting a partition's `target` in the
//! NI. The target host drives the move, pulling from the owner (the source)
//! over the peer link:
//! 1. fence and clear its own copy of the partition (leftovers of an earlier try);
//! 2. note the source's last commit id of the partition, then copy its records
//!    in chunks (each chunk is a consistent read, the copy as a whole is not);
//! 3. replay the source's log from the noted commit id, which makes the copy
//!    exact: log entries carry whole values, so replaying over newer data is
//!    harmless. Writes go on at the source all along;
//! 4. fence the partition at the source: its worker refuses client writes
//!    (callers retry, see [`crate::routing`]), durably, so a restart keeps it;
//! 5. replay the last entries, commit `CompleteMove` in the NI (the table
//!    switches), and lift its own fence. Steps 4–5 are the only write pause.
//!
//! A failure before the source's fence restarts the move from step 1 after a
//! pause, as long as the NI still names this host as the target; a crash of
//! either side does the same after the restart. A failure after it (a fence
//! request without an answer included) gives the move up (`AbortMove`), so that
//! writes never wait on a move that cannot finish. A move whose target becomes
//! inactive is given up by the leader. Either way the source's fence is then
//! lifted.
//!
//! [`reconcile`] keeps every local worker's fences in line with the NI each
//! [`RECONCILE_INTERVAL`]: a partition this host owns (and is not handing off)
//! is unfenced; a partition it neither owns nor receives is fenced and its
//! copy deleted (after a handoff, or a stale copy from before joining).
//!
//! The decisions are pure and live in submodules; this module is the I/O shell
//! that performs them (the local workers, the peer links, the metadata group,
//! the clock) and must decide nothing itself:
//! - [`core`]: one move as a state machine ([`core::Handoff`]): the five phases,
//!   and whether a failure restarts the move or gives it up;
//! - [`fences`]: which fences to set or lift, and which copies to clear.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_shared::frame::{Partition, WorkerRequest, WorkerResponse};
use shoal_shared::partition::partition_worker;

use shoal_cluster::messages::{DataRequest, PeerRequest, PeerResponse};
use shoal_cluster::HostId;

use crate::dispatch::Dispatch;
use crate::routing::Router;

pub(crate) mod core;
pub(crate) mod fences;
#[cfg(test)]
mod tests;

use self::core::{set_fence, Action, End, Event, Handoff};
use self::fences::FenceStep;

const RECONCILE_INTERVAL: Duration = Duration::from_millis(200);
/// Longest wait for a peer's answer during a handoff.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the handoffs this host drove measured, for `CLUSTER INFO`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Moves this host completed as their target.
    pub completed: AtomicU64,
    /// The write pause of the last handoff, in microseconds.
    pub last_pause_us: AtomicU64,
    /// The longest write pause of a handoff, in microseconds.
    pub max_pause_us: AtomicU64,
    /// Records copied by the completed handoffs.
    pub records_copied: AtomicU64,
    /// Log entries replayed by the completed handoffs.
    pub entries_replayed: AtomicU64,
}

/// What the handoff tasks use of the daemon: the workers and the router, the counters
/// they add to, and the flag that stops them.
struct Shell {
    dispatch: Arc<Dispatch>,
    stats: Arc<Stats>,
    shutting_down: Arc<AtomicBool>,
}

/// Keeps fences in line with the NI and drives the moves that target this host, until
/// `shutting_down` is set; completed moves are counted in `stats`. Does nothing on a host
/// on its own.
pub(crate) async fn run(
    dispatch: Arc<Dispatch>,
    stats: Arc<Stats>,
    shutting_down: Arc<AtomicBool>,
) {
    let Some(router) = dispatch.router.clone() else {
        return;
    };
    let shell = Arc::new(Shell {
        dispatch,
        stats,
        shutting_down,
    });
    let mut driving: HashMap<Partition, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut cleared: HashSet<Partition> = HashSet::new();
    loop {
        tokio::time::sleep(RECONCILE_INTERVAL).await;
        if shell.shutting_down.load(Ordering::Acquire) {
            return;
        }
        driving.retain(|_, task| !task.is_finished());
        let node = router.node();
        let (Some(me), ni) = (node.host_id(), node.ni()) else {
            continue;
        };
        for (partition, entry) in ni.partitions.iter().enumerate() {
            let partition = partition as Partition;
            if entry.target == Some(me) && !driving.contains_key(&partition) {
                let task = tokio::spawn(drive(
                    Arc::clone(&shell),
                    Arc::clone(&router),
                    partition,
                    entry.owner,
                    me,
                    entry.epoch,
                ));
                driving.insert(partition, task);
            }
        }
        let driven = driving.keys().copied().collect();
        if let Err(error) = reconcile(&shell, me, &driven, &mut cleared).await {
            tracing::debug!(%error, "cannot bring the fences in line with the partition table yet");
        }
    }
}

/// Fences and clears what this host does not own; unfences what it owns, as
/// [`fences::plan`] decides. Partitions with a handoff running here are left to it. Goes
/// on past a failure; returns the first.
async fn reconcile(
    shell: &Shell,
    me: HostId,
    driving: &HashSet<Partition>,
    cleared: &mut HashSet<Partition>,
) -> Result<(), String> {
    let Some(router) = &shell.dispatch.router else {
        return Ok(());
    };
    // The fences first, then the table: a fence set in between (the source's, for a
    // move) is then judged against a table that already shows the move.
    let mut fenced = BTreeSet::new();
    for worker in 0..shell.dispatch.links.len() {
        match local(shell, worker, WorkerRequest::Fences).await? {
            WorkerResponse::Partitions(partitions) => fenced.extend(partitions),
            other => return Err(format!("unexpected answer to Fences: {other:?}")),
        }
    }
    let ni = router.node().ni();
    let mut first_error = Ok(());
    for step in fences::plan(&ni.partitions, me, &fenced, driving, cleared) {
        let (partition, result) = match step {
            FenceStep::Unfence(partition) => {
                tracing::info!(partition, "serving the partition: lifting its fence");
                let worker = partition_worker(partition, shell.dispatch.links.len());
                (
                    partition,
                    local(shell, worker, set_fence(partition, false)).await,
                )
            }
            FenceStep::Fence(partition) => {
                tracing::info!(partition, "following the partition: fencing it for clients");
                let worker = partition_worker(partition, shell.dispatch.links.len());
                (
                    partition,
                    local(shell, worker, set_fence(partition, true)).await,
                )
            }
            FenceStep::FenceAndClear {
                partition,
                owner,
                already_fenced,
            } => {
                // The plan is as old as the table it was made from: a partition given to
                // this host since (a new follower may already have applied entries) is
                // not cleared.
                let now_held = router
                    .node()
                    .ni()
                    .partitions
                    .get(usize::from(partition))
                    .is_some_and(|entry| entry.is_member(me) || entry.target == Some(me));
                if now_held {
                    continue;
                }
                let worker = partition_worker(partition, shell.dispatch.links.len());
                let mut result = Ok(WorkerResponse::Ok);
                if !already_fenced {
                    tracing::info!(
                        partition,
                        owner,
                        "the partition is another host's: fencing it"
                    );
                    result = local(shell, worker, set_fence(partition, true)).await;
                }
                if result.is_ok() {
                    result =
                        local(shell, worker, WorkerRequest::ClearPartition { partition }).await;
                    if result.is_ok() {
                        cleared.insert(partition);
                    }
                }
                (partition, result)
            }
        };
        if let Err(error) = result {
            if first_error.is_ok() {
                first_error = Err(format!("partition {partition}: {error}"));
            }
        }
    }
    first_error
}

/// Takes `partition` over from `source`, planned at `epoch`: performs what the move's
/// [`Handoff`] asks and feeds it the answers, until the move is over or the daemon stops.
async fn drive(
    shell: Arc<Shell>,
    router: Arc<Router>,
    partition: Partition,
    source: HostId,
    me: HostId,
    epoch: u64,
) {
    let worker = partition_worker(partition, shell.dispatch.links.len());
    let mut handoff = Handoff::new(partition, source, me, epoch, Instant::now());
    loop {
        let actions = handoff.poll_actions();
        if actions.is_empty() {
            // Nothing to send: the move waits for a time (the source refused the fence),
            // or is over.
            let Some(at) = handoff.next_deadline() else {
                return;
            };
            tokio::time::sleep_until(at.into()).await;
            handoff.handle(Event::Wake, Instant::now());
            continue;
        }
        for action in actions {
            let event = match action {
                Action::Worker(request) => Event::Worker(local(&shell, worker, request).await),
                Action::Source(request) => {
                    let request = PeerRequest::Data(DataRequest::Partition { partition, request });
                    Event::Source(ask_peer(&router, source, request).await)
                }
                Action::FenceSource { epoch } => {
                    let request = PeerRequest::Data(DataRequest::Fence { partition, epoch });
                    Event::Source(ask_peer(&router, source, request).await)
                }
                Action::Propose(command) => Event::Proposed(router.node().propose(command).await),
                Action::Retry { at } => {
                    tokio::time::sleep_until(at.into()).await;
                    if shell.shutting_down.load(Ordering::Acquire) {
                        return;
                    }
                    let entry = router
                        .node()
                        .ni()
                        .partitions
                        .get(usize::from(partition))
                        .cloned();
                    let (epoch, target) =
                        entry.map_or((0, None), |entry| (entry.epoch, entry.target));
                    handoff.handle(Event::Table { epoch, target }, Instant::now());
                    Event::Wake
                }
                Action::Done(End::Completed(completed)) => {
                    let pause_us = completed.pause.as_micros() as u64;
                    let stats = &shell.stats;
                    stats.completed.fetch_add(1, Ordering::Relaxed);
                    stats.last_pause_us.store(pause_us, Ordering::Relaxed);
                    stats.max_pause_us.fetch_max(pause_us, Ordering::Relaxed);
                    stats
                        .records_copied
                        .fetch_add(completed.records, Ordering::Relaxed);
                    stats
                        .entries_replayed
                        .fetch_add(completed.entries_replayed, Ordering::Relaxed);
                    return;
                }
                Action::Done(End::GivenUp | End::NotWanted) => return,
            };
            handoff.handle(event, Instant::now());
        }
    }
}

/// Asks a local worker; an error response is a failure.
async fn local(
    shell: &Shell,
    worker: usize,
    request: WorkerRequest,
) -> Result<WorkerResponse, String> {
    match shell.dispatch.links[worker]
        .send(request)
        .await
        .wait()
        .await
    {
        Ok(WorkerResponse::Error(error)) => Err(format!("shard-{worker}: {error:?}")),
        Ok(response) => Ok(response),
        Err(error) => Err(error.to_string()),
    }
}

/// Sends `request` to `host`; its answer is one worker's response.
async fn ask_peer(
    router: &Router,
    host: HostId,
    request: PeerRequest,
) -> Result<WorkerResponse, String> {
    match router.node().call_host(host, request, PEER_TIMEOUT).await {
        Ok(PeerResponse::Worker(response)) => Ok(response),
        Ok(PeerResponse::Refused(reason)) => Err(format!("host {host}: {reason}")),
        Ok(other) => Err(format!("host {host} answered {other:?}")),
        Err(error) => Err(error.to_string()),
    }
}

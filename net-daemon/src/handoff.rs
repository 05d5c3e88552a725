//! Partitions changing hosts: this host's side of every handoff.
//!
//! The metadata leader plans a move by setting a partition's `target` in the
//! NI. The target host drives the move ([`take_over`]), pulling from the
//! owner (the source) over the peer link:
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
//! Any failure restarts the move from step 1 after a pause, as long as the NI
//! still names this host as the target; a crash of either side does the same
//! after the restart. A move whose target becomes inactive is given up by the
//! leader, and the source's fence is then lifted.
//!
//! [`reconcile`] keeps every local worker's fences in line with the NI each
//! [`RECONCILE_INTERVAL`]: a partition this host owns (and is not handing off)
//! is unfenced; a partition it neither owns nor receives is fenced and its
//! copy deleted (after a handoff, or a stale copy from before joining).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_shared::frame::{Partition, WorkerError, WorkerRequest, WorkerResponse};
use shoal_shared::partition::partition_worker;

use crate::routing::Router;
use crate::state::Shared;
use shoal_cluster::messages::{DataRequest, PeerRequest, PeerResponse};
use shoal_cluster::ni::{Command, Outcome};
use shoal_cluster::HostId;

const RECONCILE_INTERVAL: Duration = Duration::from_millis(200);
/// Bytes of records per chunk of a copy.
const CHUNK_BYTES: u32 = 1 << 20;
/// Log entries per catch-up read.
const CATCH_UP_ENTRIES: u32 = 2000;
/// A catch-up read with fewer entries than this ends the copy phase.
const FENCE_WHEN_BEHIND_BY: usize = 64;
/// Catch-up reads before the fence, however far behind the copy still is.
const CATCH_UP_ROUNDS: usize = 50;
/// Longest wait for a peer's answer during a handoff.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the source may refuse the fence (prepared multi-key writes hold its keys).
const FENCE_DEADLINE: Duration = Duration::from_secs(5);
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What the handoffs this host drove measured, for `CLUSTER INFO`.
#[derive(Debug, Default)]
pub struct Stats {
    pub completed: AtomicU64,
    /// The write pause of the last and of the longest handoff, in microseconds.
    pub last_pause_us: AtomicU64,
    pub max_pause_us: AtomicU64,
    pub records_copied: AtomicU64,
    pub entries_replayed: AtomicU64,
}

/// Keeps fences in line with the NI and drives the moves that target this host, until
/// the daemon stops. Does nothing on a host on its own.
pub async fn run(shared: Arc<Shared>) {
    let Some(router) = shared.dispatch.router.clone() else {
        return;
    };
    let mut driving: HashMap<Partition, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut cleared: HashSet<Partition> = HashSet::new();
    loop {
        tokio::time::sleep(RECONCILE_INTERVAL).await;
        if shared.shutting_down.load(Ordering::Acquire) {
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
                    Arc::clone(&shared),
                    Arc::clone(&router),
                    partition,
                    entry.owner,
                    entry.epoch,
                ));
                driving.insert(partition, task);
            }
        }
        if let Err(error) = reconcile(&shared, me, &driving, &mut cleared).await {
            tracing::debug!(%error, "cannot bring the fences in line with the partition table yet");
        }
    }
}

/// Fences and clears what this host does not own; unfences what it owns. Partitions with
/// a handoff running here are left to it. Goes on past a failure; returns the first.
async fn reconcile(
    shared: &Shared,
    me: HostId,
    driving: &HashMap<Partition, tokio::task::JoinHandle<()>>,
    cleared: &mut HashSet<Partition>,
) -> Result<(), String> {
    let Some(router) = &shared.dispatch.router else {
        return Ok(());
    };
    // The fences first, then the table: a fence set in between (the source's, for a
    // move) is then judged against a table that already shows the move.
    let mut fenced = BTreeSet::new();
    for worker in 0..shared.dispatch.links.len() {
        match local(shared, worker, WorkerRequest::Fences).await? {
            WorkerResponse::Partitions(partitions) => fenced.extend(partitions),
            other => return Err(format!("unexpected answer to Fences: {other:?}")),
        }
    }
    let ni = router.node().ni();
    let mut first_error = Ok(());
    for (partition, entry) in ni.partitions.iter().enumerate() {
        let partition = partition as Partition;
        if driving.contains_key(&partition) {
            continue;
        }
        let worker = partition_worker(partition, shared.dispatch.links.len());
        let is_fenced = fenced.contains(&partition);
        let result = if entry.owner == me {
            cleared.remove(&partition);
            match entry.target.is_none() && is_fenced {
                true => {
                    tracing::info!(partition, "serving the partition: lifting its fence");
                    local(shared, worker, set_fence(partition, false)).await
                }
                false => Ok(WorkerResponse::Ok),
            }
        } else if entry.target != Some(me) && !cleared.contains(&partition) {
            let mut result = Ok(WorkerResponse::Ok);
            if !is_fenced {
                tracing::info!(
                    partition,
                    owner = entry.owner,
                    "the partition is another host's: fencing it"
                );
                result = local(shared, worker, set_fence(partition, true)).await;
            }
            if result.is_ok() {
                result = local(shared, worker, WorkerRequest::ClearPartition { partition }).await;
                if result.is_ok() {
                    cleared.insert(partition);
                }
            }
            result
        } else {
            Ok(WorkerResponse::Ok)
        };
        if let Err(error) = result {
            if first_error.is_ok() {
                first_error = Err(format!("partition {partition}: {error}"));
            }
        }
    }
    first_error
}

fn set_fence(partition: Partition, fenced: bool) -> WorkerRequest {
    WorkerRequest::SetFence { partition, fenced }
}

/// Takes `partition` over from `source`, retrying while the NI still asks for it. A
/// failure after the source fenced the partition gives the move up (the source then
/// lifts its fence), so that writes never wait on a move that cannot finish.
async fn drive(
    shared: Arc<Shared>,
    router: Arc<Router>,
    partition: Partition,
    source: HostId,
    epoch: u64,
) {
    loop {
        match take_over(&shared, &router, partition, source, epoch).await {
            Ok(()) => return,
            Err(Failure {
                reason,
                source_fenced,
            }) => {
                tracing::warn!(partition, source, %reason, source_fenced, "partition handoff failed");
                if source_fenced {
                    let abort = Command::AbortMove { partition, epoch };
                    if let Err(error) = router.node().propose(abort).await {
                        tracing::warn!(partition, %error, "cannot give up the failed move; retrying it");
                    } else {
                        return;
                    }
                }
            }
        }
        tokio::time::sleep(RETRY_AFTER).await;
        let ni = router.node().ni();
        let still_wanted = ni
            .partitions
            .get(usize::from(partition))
            .is_some_and(|entry| entry.epoch == epoch && entry.target == router.node().host_id());
        if !still_wanted || shared.shutting_down.load(Ordering::Acquire) {
            return;
        }
    }
}

/// Why a handoff attempt failed, and whether the source had fenced the partition by then.
struct Failure {
    reason: String,
    source_fenced: bool,
}

impl From<String> for Failure {
    fn from(reason: String) -> Failure {
        Failure {
            reason,
            source_fenced: false,
        }
    }
}

async fn take_over(
    shared: &Shared,
    router: &Router,
    partition: Partition,
    source: HostId,
    epoch: u64,
) -> Result<(), Failure> {
    let started = Instant::now();
    let node = router.node();
    let me = node.host_id().ok_or("not a member".to_string())?;
    let worker = partition_worker(partition, shared.dispatch.links.len());
    local(shared, worker, set_fence(partition, true)).await?;
    local(shared, worker, WorkerRequest::ClearPartition { partition }).await?;

    let start = match remote(router, source, partition, WorkerRequest::LastCommitIds).await? {
        WorkerResponse::Positions(positions) => positions
            .into_iter()
            .find(|(p, _)| *p == partition)
            .map_or(0, |(_, id)| id),
        other => return Err(format!("unexpected answer to LastCommitIds: {other:?}").into()),
    };
    tracing::info!(
        partition,
        source,
        from_commit_id = start,
        "copying a partition"
    );
    let mut from = None;
    let mut records = 0u64;
    let mut bytes = 0u64;
    loop {
        let request = WorkerRequest::ExportPartition {
            partition,
            from,
            max_bytes: CHUNK_BYTES,
        };
        let (chunk, next) = match remote(router, source, partition, request).await? {
            WorkerResponse::Records { records, next } => (records, next),
            other => return Err(format!("unexpected answer to ExportPartition: {other:?}").into()),
        };
        records += chunk.len() as u64;
        bytes += chunk
            .iter()
            .map(|record| (record.key.len() + record.value.len()) as u64)
            .sum::<u64>();
        local(
            shared,
            worker,
            WorkerRequest::ImportRecords { records: chunk },
        )
        .await?;
        match next {
            Some(next) => from = Some(next),
            None => break,
        }
    }
    let mut applied = start;
    let mut replayed = 0u64;
    // Fence once close behind, or after a bounded catch-up of a partition written faster
    // than it can be followed.
    for _ in 0..CATCH_UP_ROUNDS {
        let count = catch_up(shared, router, source, partition, worker, &mut applied).await?;
        replayed += count as u64;
        if count < FENCE_WHEN_BEHIND_BY {
            break;
        }
    }

    // The pause: from the source's fence until this host serves the partition. A fence
    // request without an answer may have fenced the source all the same.
    let fenced = |reason: String| Failure {
        reason,
        source_fenced: true,
    };
    let fenced_at = Instant::now();
    loop {
        let fence = PeerRequest::Data(DataRequest::Fence { partition, epoch });
        match ask_peer(router, source, fence).await.map_err(fenced)? {
            WorkerResponse::Ok => break,
            WorkerResponse::Error(WorkerError::Locked) if fenced_at.elapsed() < FENCE_DEADLINE => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => {
                return Err(format!("the source did not fence the partition: {other:?}").into())
            }
        }
    }
    loop {
        let count = catch_up(shared, router, source, partition, worker, &mut applied)
            .await
            .map_err(fenced)?;
        replayed += count as u64;
        if count == 0 {
            break;
        }
    }
    let command = Command::CompleteMove {
        partition,
        to: me,
        epoch,
    };
    match node.propose(command).await.map_err(fenced)? {
        Outcome::Done => {}
        other => return Err(fenced(format!("the switch was not committed: {other:?}"))),
    }
    // The switch is committed: from here on, reconcile lifts the fence if this fails.
    local(shared, worker, set_fence(partition, false)).await?;
    let pause_us = fenced_at.elapsed().as_micros() as u64;

    let stats = &shared.handoffs;
    stats.completed.fetch_add(1, Ordering::Relaxed);
    stats.last_pause_us.store(pause_us, Ordering::Relaxed);
    stats.max_pause_us.fetch_max(pause_us, Ordering::Relaxed);
    stats.records_copied.fetch_add(records, Ordering::Relaxed);
    stats
        .entries_replayed
        .fetch_add(replayed, Ordering::Relaxed);
    tracing::info!(
        partition,
        source,
        records,
        bytes,
        replayed,
        pause_ms = format!("{:.1}", pause_us as f64 / 1000.0),
        secs = format!("{:.2}", started.elapsed().as_secs_f64()),
        "took a partition over"
    );
    Ok(())
}

/// Replays the source's log entries after `applied` into the local copy; returns how many.
async fn catch_up(
    shared: &Shared,
    router: &Router,
    source: HostId,
    partition: Partition,
    worker: usize,
    applied: &mut u64,
) -> Result<usize, String> {
    let request = WorkerRequest::ReadFeed {
        positions: vec![(partition, *applied)],
        count: CATCH_UP_ENTRIES,
    };
    let entries = match remote(router, source, partition, request).await? {
        WorkerResponse::Log(entries) => entries,
        WorkerResponse::Error(error) => return Err(format!("reading the source's log: {error:?}")),
        other => return Err(format!("unexpected answer to ReadFeed: {other:?}")),
    };
    let Some(last) = entries.last().map(|entry| entry.commit_id) else {
        return Ok(0);
    };
    let count = entries.len();
    local(shared, worker, WorkerRequest::ApplyLog { entries }).await?;
    *applied = last;
    Ok(count)
}

/// Asks a local worker; an error response is a failure.
async fn local(
    shared: &Shared,
    worker: usize,
    request: WorkerRequest,
) -> Result<WorkerResponse, String> {
    match shared.dispatch.links[worker]
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

/// Asks the worker of `partition` on `host`.
async fn remote(
    router: &Router,
    host: HostId,
    partition: Partition,
    request: WorkerRequest,
) -> Result<WorkerResponse, String> {
    ask_peer(
        router,
        host,
        PeerRequest::Data(DataRequest::Partition { partition, request }),
    )
    .await
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

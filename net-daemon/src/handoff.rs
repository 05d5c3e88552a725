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

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shoal_shared::frame::{Partition, WorkerError, WorkerRequest, WorkerResponse};
use shoal_shared::partition::partition_worker;

use crate::cluster::messages::{PeerRequest, PeerResponse};
use crate::cluster::ni::{Command, Outcome};
use crate::cluster::HostId;
use crate::routing::Router;
use crate::Shared;

const RECONCILE_INTERVAL: Duration = Duration::from_millis(200);
/// Bytes of records per chunk of a copy.
const CHUNK_BYTES: u32 = 1 << 20;
/// Log entries per catch-up read.
const CATCH_UP_ENTRIES: u32 = 2000;
/// A catch-up read with fewer entries than this ends the copy phase.
const FENCE_WHEN_BEHIND_BY: usize = 64;
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
    let Some(router) = shared.router.clone() else {
        return;
    };
    let mut driving: HashMap<Partition, tokio::task::JoinHandle<()>> = HashMap::new();
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
        if let Err(error) = reconcile(&shared, me).await {
            tracing::debug!(%error, "cannot bring the fences in line with the partition table yet");
        }
    }
}

/// Fences and clears what this host does not own; unfences what it owns.
async fn reconcile(shared: &Shared, me: HostId) -> Result<(), String> {
    let Some(router) = &shared.router else {
        return Ok(());
    };
    let ni = router.node().ni();
    if ni.partitions.is_empty() {
        return Ok(());
    }
    let mut fenced = BTreeSet::new();
    for worker in 0..shared.links.len() {
        match local(shared, worker, WorkerRequest::Fences).await? {
            WorkerResponse::Partitions(partitions) => fenced.extend(partitions),
            other => return Err(format!("unexpected answer to Fences: {other:?}")),
        }
    }
    for (partition, entry) in ni.partitions.iter().enumerate() {
        let partition = partition as Partition;
        let worker = partition_worker(partition, shared.links.len());
        let is_fenced = fenced.contains(&partition);
        if entry.owner == me {
            if entry.target.is_none() && is_fenced {
                tracing::info!(partition, "serving the partition: lifting its fence");
                local(shared, worker, set_fence(partition, false)).await?;
            }
        } else if entry.target != Some(me) && !is_fenced {
            tracing::info!(
                partition,
                owner = entry.owner,
                "the partition is another host's: fencing and deleting this host's copy"
            );
            local(shared, worker, set_fence(partition, true)).await?;
            local(shared, worker, WorkerRequest::ClearPartition { partition }).await?;
        }
    }
    Ok(())
}

fn set_fence(partition: Partition, fenced: bool) -> WorkerRequest {
    WorkerRequest::SetFence { partition, fenced }
}

/// Takes `partition` over from `source`, retrying while the NI still asks for it.
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
            Err(error) => {
                tracing::warn!(partition, source, %error, "partition handoff failed; restarting it");
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

async fn take_over(
    shared: &Shared,
    router: &Router,
    partition: Partition,
    source: HostId,
    epoch: u64,
) -> Result<(), String> {
    let started = Instant::now();
    let node = router.node();
    let me = node.host_id().ok_or("not a member")?;
    let worker = partition_worker(partition, shared.links.len());
    local(shared, worker, set_fence(partition, true)).await?;
    local(shared, worker, WorkerRequest::ClearPartition { partition }).await?;

    let start = match remote(router, source, partition, WorkerRequest::LastCommitIds).await? {
        WorkerResponse::Positions(positions) => positions
            .into_iter()
            .find(|(p, _)| *p == partition)
            .map_or(0, |(_, id)| id),
        other => return Err(format!("unexpected answer to LastCommitIds: {other:?}")),
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
            other => return Err(format!("unexpected answer to ExportPartition: {other:?}")),
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
    loop {
        let count = catch_up(shared, router, source, partition, worker, &mut applied).await?;
        replayed += count as u64;
        if count < FENCE_WHEN_BEHIND_BY {
            break;
        }
    }

    // The pause: from the source's fence until this host serves the partition.
    let fenced_at = Instant::now();
    loop {
        match remote(router, source, partition, set_fence(partition, true)).await? {
            WorkerResponse::Ok => break,
            WorkerResponse::Error(WorkerError::Locked) if fenced_at.elapsed() < FENCE_DEADLINE => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => return Err(format!("the source did not fence the partition: {other:?}")),
        }
    }
    loop {
        let count = catch_up(shared, router, source, partition, worker, &mut applied).await?;
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
    match node.propose(command).await? {
        Outcome::Done => {}
        other => return Err(format!("the switch was not committed: {other:?}")),
    }
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
    match shared.links[worker].send(request).await.wait().await {
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
    let request = PeerRequest::Partition { partition, request };
    match router.node().call_host(host, request, PEER_TIMEOUT).await {
        Ok(PeerResponse::Worker(response)) => Ok(response),
        Ok(PeerResponse::Refused(reason)) => Err(format!("host {host}: {reason}")),
        Ok(other) => Err(format!("host {host} answered {other:?}")),
        Err(error) => Err(error.to_string()),
    }
}

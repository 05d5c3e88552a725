//! The host's id allocator, behind `ID.NEW`.
//!
//! The host owns the id space `[1, 2^63)` (ids are positive RESP integers).
//! It hands each worker its own blocks of [`BLOCK`] ids, in increasing order;
//! a worker's blocks make up its range, and ids increase within it. Before a
//! block is used, its end is recorded durably in that worker's `meta`
//! (`ReserveIds`), so after any crash every id issued is below some recorded
//! high-water mark. At start the allocator continues above the highest mark
//! of all workers, so ids are never issued twice and new ids are above all
//! old ones.
//!
//! In a cluster the host issues only ids of its own ranges: it reserves
//! [`BLOCK`] ids at a time in the network information (through the metadata
//! consensus) before it issues any of them, so a restart or a reclaim never
//! hands an id out twice. docs/ids.md describes the scheme.

use shoal_shared::frame::{WorkerRequest, WorkerResponse};
use shoal_shared::ids::{BLOCK, END_ID, FIRST_ID};
use shoal_shared::resp::Reply;
use tokio::sync::Mutex;

use crate::dispatch::Dispatch;
use shoal_cluster::ni::{Command, Outcome};
use shoal_cluster::node::ClusterNode;

/// Most ids one ID.NEW returns.
pub const MAX_COUNT: u64 = 1_000_000;

const _: () = assert!(MAX_COUNT <= BLOCK);

#[derive(Default)]
pub struct IdAllocator {
    state: Mutex<Option<State>>,
    /// In a cluster: the next id and the end of the block reserved in the NI.
    cluster_block: Mutex<Option<(u64, u64)>>,
}

struct State {
    /// Start of the next unassigned block.
    next_block: u64,
    /// Per worker: the next id and the end of its current block.
    workers: Vec<(u64, u64)>,
    /// The worker the next request goes to.
    turn: usize,
}

impl IdAllocator {
    /// `count` new ids, consecutive within one worker's block.
    pub async fn allocate(
        &self,
        dispatch: &Dispatch,
        cluster: Option<&ClusterNode>,
        count: u64,
    ) -> Result<std::ops::Range<u64>, Reply> {
        if let Some(cluster) = cluster {
            return self.allocate_in_cluster(dispatch, cluster, count).await;
        }
        let mut guard = self.state.lock().await;
        if guard.is_none() {
            *guard = Some(Self::load(dispatch).await?);
        }
        let Some(state) = guard.as_mut() else {
            return Err(Reply::error("ERR id allocator unavailable"));
        };
        let workers = state.workers.len();
        let worker = (0..workers)
            .map(|step| (state.turn + step) % workers)
            .find(|&w| dispatch.links[w].is_connected())
            .ok_or_else(|| Reply::error("TRYAGAIN no shard worker is up to record id blocks"))?;
        state.turn = (worker + 1) % workers;
        let (next, end) = state.workers[worker];
        if end - next < count {
            let start = state.next_block;
            let block_end = start
                .checked_add(BLOCK)
                .filter(|&e| e <= END_ID)
                .ok_or_else(|| Reply::error("ERR the host's id range is used up"))?;
            dispatch
                .ask(
                    worker,
                    WorkerRequest::ReserveIds {
                        high_water: block_end,
                    },
                )
                .await?;
            state.next_block = block_end;
            state.workers[worker] = (start, block_end);
        }
        let (next, end) = state.workers[worker];
        state.workers[worker] = (next + count, end);
        Ok(next..next + count)
    }

    /// `count` new ids from a block this host reserved in the cluster's NI.
    async fn allocate_in_cluster(
        &self,
        dispatch: &Dispatch,
        cluster: &ClusterNode,
        count: u64,
    ) -> Result<std::ops::Range<u64>, Reply> {
        let host = cluster.host_id().ok_or_else(|| {
            Reply::error(format!(
                "TRYAGAIN this host is not a cluster member yet ({})",
                cluster.phase()
            ))
        })?;
        let mut guard = self.cluster_block.lock().await;
        let (next, end) = match *guard {
            Some(block) => block,
            None => {
                Self::cover_local_history(dispatch, cluster, host).await?;
                (0, 0)
            }
        };
        let (next, end) = if end - next >= count {
            (next, end)
        } else {
            let reserved = cluster
                .propose(Command::ReserveIds { host, count: BLOCK })
                .await
                .map_err(|error| Reply::error(format!("TRYAGAIN cannot reserve ids: {error}")))?;
            match reserved {
                Outcome::Reserved(range) => (range.start, range.end),
                Outcome::Refused(reason) => {
                    return Err(Reply::error(format!("ERR cannot reserve ids: {reason}")))
                }
                other => {
                    return Err(Reply::error(format!(
                        "ERR internal error: unexpected reservation {other:?}"
                    )))
                }
            }
        };
        *guard = Some((next + count, end));
        Ok(next..next + count)
    }

    /// Before its first cluster reservation, a host that issued ids on its own (before
    /// it founded the cluster) reserves past them in the NI, so none is issued again.
    async fn cover_local_history(
        dispatch: &Dispatch,
        cluster: &ClusterNode,
        host: u64,
    ) -> Result<(), Reply> {
        let local = Self::load(dispatch).await?.next_block;
        let ni = cluster.ni();
        let Some(first) = ni.ranges_of(host).first() else {
            return Ok(());
        };
        if first.range.start <= FIRST_ID && first.high_water < local && local <= first.range.end {
            let count = local - first.high_water;
            cluster
                .propose(Command::ReserveIds { host, count })
                .await
                .map_err(|error| Reply::error(format!("TRYAGAIN cannot reserve ids: {error}")))?;
        } else if local > FIRST_ID && first.range.start > FIRST_ID {
            tracing::warn!(
                high_water = local,
                "this host issued ids before it joined the cluster; they may equal ids of other hosts"
            );
        }
        Ok(())
    }

    /// Reads every worker's high-water mark; blocks start above the highest.
    async fn load(dispatch: &Dispatch) -> Result<State, Reply> {
        let mut highest = FIRST_ID;
        for worker in 0..dispatch.links.len() {
            match dispatch.ask(worker, WorkerRequest::IdHighWater).await? {
                WorkerResponse::Integer(mark) => highest = highest.max(mark as u64),
                _ => return Err(Reply::error("ERR internal error: unexpected id response")),
            }
        }
        Ok(State {
            next_block: highest,
            workers: vec![(0, 0); dispatch.links.len()],
            turn: 0,
        })
    }
}

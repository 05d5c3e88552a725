//! The host's id allocator, behind `ID.NEW`.
//!
//! The host owns the id space `[1, 2^63)` (ids are positive RESP integers).
//! It hands each worker its own blocks of [`BLOCK`] ids, in increasing order;
//! a worker's blocks make up its range, and ids increase within it. Before a
//! block is used, its end is recorded durably in that worker's `meta`
//! (`ReserveIds`), so after any crash every id issued is below some recorded
//! high-water mark. At start the allocator continues above the highest mark
//! of all workers, so ids are never issued twice and new ids are above all
//! old ones. docs/ids.md describes the scheme.

use shoal_shared::frame::{WorkerRequest, WorkerResponse};
use shoal_shared::resp::Reply;
use tokio::sync::Mutex;

use crate::commands::ask;
use crate::Shared;

/// Ids per block.
pub const BLOCK: u64 = 1 << 20;
/// The first id of the space.
pub const FIRST_ID: u64 = 1;
/// One past the last id (ids fit a positive i64).
pub const END_ID: u64 = 1 << 63;
/// Most ids one ID.NEW returns.
pub const MAX_COUNT: u64 = 1_000_000;

const _: () = assert!(MAX_COUNT <= BLOCK);

#[derive(Default)]
pub struct IdAllocator {
    state: Mutex<Option<State>>,
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
        shared: &Shared,
        count: u64,
    ) -> Result<std::ops::Range<u64>, Reply> {
        let mut guard = self.state.lock().await;
        if guard.is_none() {
            *guard = Some(Self::load(shared).await?);
        }
        let Some(state) = guard.as_mut() else {
            return Err(Reply::error("ERR id allocator unavailable"));
        };
        let workers = state.workers.len();
        let worker = (0..workers)
            .map(|step| (state.turn + step) % workers)
            .find(|&w| shared.links[w].is_connected())
            .ok_or_else(|| Reply::error("TRYAGAIN no shard worker is up to record id blocks"))?;
        state.turn = (worker + 1) % workers;
        let (next, end) = state.workers[worker];
        if end - next < count {
            let start = state.next_block;
            let block_end = start
                .checked_add(BLOCK)
                .filter(|&e| e <= END_ID)
                .ok_or_else(|| Reply::error("ERR the host's id range is used up"))?;
            ask(
                shared,
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

    /// Reads every worker's high-water mark; blocks start above the highest.
    async fn load(shared: &Shared) -> Result<State, Reply> {
        let mut highest = FIRST_ID;
        for worker in 0..shared.links.len() {
            match ask(shared, worker, WorkerRequest::IdHighWater).await? {
                WorkerResponse::Integer(mark) => highest = highest.max(mark as u64),
                _ => return Err(Reply::error("ERR internal error: unexpected id response")),
            }
        }
        Ok(State {
            next_block: highest,
            workers: vec![(0, 0); shared.links.len()],
            turn: 0,
        })
    }
}

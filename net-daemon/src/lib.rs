//! The net-daemon process: client listeners, routing to the shard-workers, replies.
//!
//! It accepts RESP2/RESP3 and inline requests on TCP and on a Unix socket,
//! routes each key to its partition's worker over the worker links, and merges
//! answers from several workers. It holds no data itself and never opens an
//! LMDB environment for writing.
//!
//! Modules:
//! - [`server`]: listeners, the connection limit, graceful shutdown.
//! - [`connection`]: one client connection (parse, dispatch, reply in order).
//! - [`commands`]: every client command.
//! - [`workers`]: the links to the shard-workers.
//! - [`errors`]: internal failures → client error replies.

pub mod commands;
pub mod connection;
pub mod errors;
pub mod server;
pub mod workers;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use shoal_shared::config::Config;
use shoal_shared::status::StatusTable;

use crate::workers::WorkerLink;

/// State shared by every connection of the daemon.
pub struct Shared {
    pub config: Config,
    /// One link per shard-worker, indexed by worker.
    pub links: Vec<WorkerLink>,
    pub status: StatusTable,
    /// Client connections open now.
    pub connections: AtomicUsize,
    next_client_id: AtomicU64,
    pub started: Instant,
}

impl Shared {
    /// A new client id, unique for the life of this process.
    pub fn next_client_id(&self) -> u64 {
        self.next_client_id.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Runs the net-daemon until SIGTERM, then drains and returns.
pub fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("net").build()?;
    runtime.block_on(server::serve(config))
}

//! The net-daemon process: client listeners, routing to the shard-workers, replies.
//!
//! It accepts RESP2/RESP3 and inline requests on TCP and on a Unix socket,
//! routes each key to its partition's worker over the worker links, and merges
//! answers from several workers. It holds no user data itself and never opens
//! a shard's LMDB environment for writing; GET and MGET read the shards'
//! environments directly ([`reads`]). Its only writable environment is the
//! metadata Raft group's own (`shoal_cluster::raft_store`).
//!
//! Modules:
//! - [`server`]: listeners, the connection limit, graceful shutdown.
//! - [`connection`]: one client connection (parse, dispatch, reply in order).
//! - [`commands`]: every client command.
//! - [`txn`]: the two-phase commit coordinator and the recovery of transactions in doubt.
//! - [`ids`]: the host's id allocator (ID.NEW).
//! - [`metrics`]: command statistics and the Prometheus endpoint.
//! - [`workers`]: the links to the shard-workers.
//! - [`reads`]: GET and MGET straight from the shards' LMDB maps.
//! - [`routing`]: requests for a partition sent to its owner, this host or another.
//! - [`handoff`]: taking partitions over from other hosts, and dropping those given away.
//! - [`errors`]: internal failures → client error replies.

pub mod commands;
pub mod connection;
pub mod errors;
pub mod handoff;
pub mod ids;
pub mod metrics;
pub mod reads;
pub mod routing;
pub mod server;
pub mod txn;
pub mod workers;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    next_txid: AtomicU64,
    pub started: Instant,
    /// Set when the daemon starts draining; background tasks stop.
    pub shutting_down: AtomicBool,
    pub ids: ids::IdAllocator,
    pub scan_cursors: commands::keyspace::ScanCursors,
    pub command_stats: metrics::CommandStats,
    /// Read-only views of the shards' environments, one per worker.
    pub readers: std::sync::Arc<reads::Readers>,
    /// This host's membership in a cluster; `None` for a host on its own.
    pub cluster: Option<std::sync::Arc<shoal_cluster::node::ClusterNode>>,
    /// In a cluster: delivers requests to the owners of partitions.
    pub router: Option<std::sync::Arc<routing::Router>>,
    /// What this host's partition handoffs measured.
    pub handoffs: handoff::Stats,
}

impl Shared {
    /// A new client id, unique for the life of this process.
    pub fn next_client_id(&self) -> u64 {
        self.next_client_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A transaction id, unique across restarts of the daemon: the start time in the
    /// high bits, a counter below.
    pub fn next_txid(&self) -> u64 {
        self.next_txid.fetch_add(1, Ordering::Relaxed)
    }

    /// Builds the shared state of a daemon that starts now.
    pub fn new(
        config: Config,
        links: Vec<WorkerLink>,
        status: StatusTable,
        cluster: Option<std::sync::Arc<shoal_cluster::node::ClusterNode>>,
    ) -> Shared {
        let readers = std::sync::Arc::new(reads::Readers::new(&config));
        let router = cluster.as_ref().map(|node| {
            let router = std::sync::Arc::new(routing::Router::new(
                std::sync::Arc::clone(node),
                links.clone(),
                std::sync::Arc::clone(&readers),
            ));
            node.set_data_path(router.clone());
            router
        });
        Shared {
            router,
            handoffs: handoff::Stats::default(),
            links,
            status,
            connections: AtomicUsize::new(0),
            next_client_id: AtomicU64::new(0),
            next_txid: AtomicU64::new(shoal_shared::now_ms() << 20),
            started: Instant::now(),
            shutting_down: AtomicBool::new(false),
            ids: ids::IdAllocator::default(),
            scan_cursors: commands::keyspace::ScanCursors::default(),
            command_stats: metrics::CommandStats::default(),
            readers,
            cluster,
            config,
        }
    }
}

/// Runs the net-daemon until SIGTERM, then drains and returns.
pub fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("net")
        .build()?;
    runtime.block_on(server::serve(config))
}

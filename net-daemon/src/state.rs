//! The state that every connection of the daemon shares: the config, the ways
//! to the workers ([`Dispatch`]), the cluster node, the id allocator, the SCAN
//! cursors, the counters, and the shutdown flag.
//!
//! It is built once by [`crate::server`] and handed to the commands, the
//! connections and the background tasks above it. The modules below it
//! ([`crate::dispatch`], [`crate::txn`], [`crate::ids`], [`crate::routing`], ...)
//! take the narrow handles they need rather than this whole hub.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use shoal_cluster::node::ClusterNode;
use shoal_shared::config::Config;
use shoal_shared::databases::DatabaseMap;
use shoal_shared::status::StatusTable;

use crate::blocked::Blocked;
use crate::clients::Clients;
use crate::cursors::ScanCursors;
use crate::databases::Databases;
use crate::dispatch::Dispatch;
use crate::handoff;
use crate::holds::Holds;
use crate::ids::IdAllocator;
use crate::pubsub::Broker;
use crate::reads::Readers;
use crate::routing::Router;
use crate::table::CommandStats;
use crate::txn::TxIds;
use crate::workers::WorkerLink;

/// State shared by every connection of the daemon.
pub struct Shared {
    pub config: Config,
    /// The links to the workers, the router and the readers.
    pub dispatch: Arc<Dispatch>,
    pub status: StatusTable,
    /// Client connections open now.
    pub connections: AtomicUsize,
    next_client_id: AtomicU64,
    /// The ids of multi-worker transactions.
    pub txids: TxIds,
    pub started: Instant,
    /// When the daemon started, in Unix ms (LASTSAVE).
    pub started_unix_ms: u64,
    /// Set when the daemon starts draining; background tasks stop.
    pub shutting_down: Arc<AtomicBool>,
    pub ids: IdAllocator,
    pub scan_cursors: ScanCursors,
    pub command_stats: CommandStats,
    /// This host's pub/sub subscriptions.
    pub pubsub: Arc<Broker>,
    /// The client connections open now.
    pub clients: Clients,
    /// This host's membership in a cluster; `None` for a host on its own.
    pub cluster: Option<Arc<ClusterNode>>,
    /// What this host's partition handoffs measured.
    pub handoffs: Arc<handoff::Stats>,
    /// The clients blocked in a pop, in line per key.
    pub blocked: Arc<Blocked>,
    /// Keys held for the next plan of multi-key commands across workers.
    pub holds: Holds,
    /// The collection of each database number (SWAPDB changes it).
    pub databases: Databases,
    /// `client.requirepass` as it is now (CONFIG SET changes it).
    requirepass: std::sync::Mutex<Option<String>>,
}

impl Shared {
    /// A new client id, unique for the life of this process.
    pub fn next_client_id(&self) -> u64 {
        self.next_client_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Builds the shared state of a daemon that starts now.
    pub fn new(
        config: Config,
        links: Vec<WorkerLink>,
        status: StatusTable,
        cluster: Option<Arc<ClusterNode>>,
        databases: DatabaseMap,
    ) -> Shared {
        let readers = Arc::new(Readers::new(&config));
        let pubsub = Arc::new(Broker::new(config.client.max_output_buffer_bytes));
        let router = cluster.as_ref().map(|node| {
            // A lagging follower may hold back up to ten times the retained log.
            let hold_limit_entries = config.storage.log_retention_entries.saturating_mul(10);
            let router = Arc::new(Router::new(
                Arc::clone(node),
                links.clone(),
                Arc::clone(&readers),
                &config.cluster,
                hold_limit_entries,
                Arc::clone(&pubsub),
            ));
            node.set_data_path(router.clone());
            router
        });
        Shared {
            dispatch: Arc::new(Dispatch::new(
                links,
                router,
                readers,
                config.storage.partitions,
            )),
            handoffs: Arc::default(),
            status,
            connections: AtomicUsize::new(0),
            next_client_id: AtomicU64::new(0),
            txids: TxIds::new(),
            started: Instant::now(),
            started_unix_ms: shoal_shared::now_ms(),
            shutting_down: Arc::new(AtomicBool::new(false)),
            ids: IdAllocator::default(),
            scan_cursors: ScanCursors::default(),
            command_stats: CommandStats::default(),
            pubsub,
            clients: Clients::default(),
            cluster,
            requirepass: std::sync::Mutex::new(config.client.requirepass.clone()),
            databases: Databases::new(databases, config.data_dir.clone()),
            blocked: Arc::new(Blocked::new()),
            holds: Holds::default(),
            config,
        }
    }

    /// The password clients must give now, if any.
    pub fn requirepass(&self) -> Option<String> {
        shoal_shared::lock(&self.requirepass).clone()
    }

    /// Sets the password clients must give from now on (`None`: none). Connections
    /// already authenticated stay so, as in Redis.
    pub fn set_requirepass(&self, password: Option<String>) {
        *shoal_shared::lock(&self.requirepass) = password;
    }
}

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
pub mod cursors;
pub mod dispatch;
pub mod errors;
pub mod handoff;
pub mod ids;
pub mod metrics;
pub mod reads;
pub mod routing;
pub mod server;
pub mod state;
pub mod table;
pub mod txn;
pub mod workers;

use shoal_shared::config::Config;

/// Runs the net-daemon until SIGTERM, then drains and returns.
pub fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("net")
        .build()?;
    runtime.block_on(server::serve(config))
}

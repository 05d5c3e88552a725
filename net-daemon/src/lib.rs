//! The net-daemon process: client listeners, routing to the shard-workers, replies.
//!
//! It accepts RESP2/RESP3 and inline requests on TCP and on a Unix socket,
//! routes each key to its partition's worker over the worker links, and merges
//! answers from several workers. It holds no user data itself and never opens
//! a shard's LMDB environment for writing; GET and MGET read the shards'
//! environments directly (`reads`). Its only writable environment is the
//! metadata Raft group's own (`shoal_cluster::raft_store`).
//!
//! Its one public item is [`run`], which the `shoal` binary calls for the
//! net-daemon role; every module is private to the crate.
//!
//! Modules, bottom layer first (docs/architecture.md, "Crates and layers"):
//! - `workers`: the links to the shard-workers.
//! - `reads`: GET and MGET straight from the shards' LMDB maps.
//! - `pubsub`: the channels, shard channels and patterns this host's connections
//!   subscribe to, and message delivery to them.
//! - `cursors`: the cursors of SCANs in progress.
//! - `blocked`: the clients blocked in a pop, in line per key, and when they look again.
//! - `clients`: the client connections open on this host (CLIENT LIST, CLIENT KILL).
//! - `table`: the command table (arity, key positions, COMMAND DOCS) and per-command
//!   counters.
//! - `errors`: internal failures → client error replies.
//! - `databases`: the database numbers clients see, their collections, and SWAPDB.
//! - `replication`: this host's copies of replicated partitions (the shell around the
//!   replication core).
//! - `routing`: requests for a partition sent to its owner, this host or another.
//! - `dispatch`: where a request for the workers goes (a local worker or the partition's
//!   owner), and how.
//! - `whole_reads`: reads of keys on several workers or hosts, checked to show one
//!   instant (never part of a multi-key write).
//! - `txn`: the two-phase commit coordinator and the recovery of transactions in doubt.
//! - `ids`: the host's id allocator (ID.NEW).
//! - `handoff`: taking partitions over from other hosts, and dropping those given away.
//! - `digests`: the metadata leader's background comparison of each partition's copies.
//! - `state`: what every connection shares (config, dispatch, cluster node, counters,
//!   shutdown flag).
//! - `commands`: every client command.
//! - `connection`: one client connection (parse, dispatch, reply in order).
//! - `metrics`: command statistics and the Prometheus endpoint.
//! - `server`: listeners, the connection limit, graceful shutdown.

mod blocked;
mod clients;
mod commands;
mod connection;
mod cursors;
mod databases;
mod digests;
mod dispatch;
mod errors;
mod handoff;
mod holds;
mod ids;
mod metrics;
mod pubsub;
mod reads;
mod replication;
mod routing;
mod server;
mod state;
mod table;
mod txn;
mod whole_reads;
mod workers;

use shoal_shared::config::Config;

/// Runs the net-daemon until SIGTERM, then drains and returns.
pub fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("net")
        .build()?;
    runtime.block_on(server::serve(config))
}

//! Cluster membership and metadata: how this host takes part in the cluster.
//!
//! The metadata Raft group (openraft 0.9) holds the network information (NI): the
//! hosts, the partition table and the cluster settings. This module owns the group's
//! durable storage; it never touches a shard's data.
//!
//! Modules:
//! - [`raft_store`]: the metadata group's log, vote, state machine and snapshot, in the
//!   net-daemon's own LMDB environment (`<data_dir>/meta-raft/`).

pub mod raft_store;

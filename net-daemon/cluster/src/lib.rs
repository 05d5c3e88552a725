//! The cluster layer of the net-daemon: membership and the metadata kept in the
//! network information (NI), which a metadata Raft group (openraft 0.9)
//! replicates, and the authenticated peer links between hosts.
//!
//! It depends on `shoal-shared` only, never on the net-daemon or the
//! shard-worker. Requests of other hosts that are not its own (a client request
//! for a partition, a handoff step, a request for every worker) it hands to the
//! [`node::DataPath`] that the net-daemon installs.
//!
//! This module owns the decisions of cluster membership: which ids each host
//! may issue, when a peer counts as failed, and where each host sits in
//! latency space. The decision modules are pure: functions from state, events
//! and `now_ms` arguments to new state and decisions. They never open a socket,
//! spawn a task or read a clock, so the peer links, the metadata consensus and
//! a seeded simulation can all drive them the same way. Their types are serde
//! types because the NI stores them. It never touches a shard's data.
//!
//! Modules:
//! - [`ni`]: the network information and the commands that change it.
//! - `leader`: the metadata leader's decisions each round (membership, judgements,
//!   placement moves), from the NI, the suspect reports and the time to commands.
//! - `placement`: which host should own each partition, weighted by capacity.
//! - [`replication`]: the sans-IO cores of replication: one copy of a partition as
//!   primary or follower, and the leader's failover round.
//! - [`ranges`]: the id ranges of the hosts (sponsor splits, reservations, reclaims).
//! - `liveness`: unreliability scores per peer and the agreement rule for `inactive`.
//! - `coords`: Vivaldi network coordinates (latency estimates between hosts).
//! - `gossip`: host metrics spread by the heartbeats, with a decay counter.
//! - [`raft_store`]: the metadata group's log, vote, state machine and snapshot, in the
//!   net-daemon's own LMDB environment (`<data_dir>/meta-raft/`), or in memory
//!   ([`raft_store::memory`]) for the simulation.
//! - [`messages`]: the host↔host message enums.
//! - [`network`]: the metadata group's Raft RPCs over the peer links.
//! - [`transport`]: the seams to the world: how a host calls its peers ([`transport::PeerCaller`])
//!   and reads the time ([`transport::Clock`]).
//! - `outbox`: replication messages queued per destination host, sent in order and in
//!   batches.
//! - [`node`]: this host's membership: joining, heartbeats, carrying out the leader's
//!   duties (I/O).
//! - [`peer`]: the authenticated TCP links to the other hosts (handshake, pool, listener).

pub(crate) mod coords;
pub(crate) mod gossip;
pub(crate) mod leader;
pub(crate) mod liveness;
pub mod messages;
pub mod network;
pub mod ni;
pub mod node;
pub(crate) mod outbox;
pub mod peer;
pub(crate) mod placement;
pub mod raft_store;
pub mod ranges;
pub mod replication;
pub mod transport;

/// A host's id in the cluster.
pub type HostId = u64;

/// A small seeded xorshift generator for the tests (no I/O, reproducible).
#[cfg(test)]
pub(crate) struct TestRng(u64);

#[cfg(test)]
impl TestRng {
    pub(crate) fn new(seed: u64) -> TestRng {
        TestRng(seed | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[0, n)`.
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Encodes and decodes `value` with bincode, as the NI stores it.
#[cfg(test)]
pub(crate) fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T) -> T {
    let config = bincode::config::standard();
    let bytes = bincode::serde::encode_to_vec(value, config).unwrap();
    bincode::serde::decode_from_slice(&bytes, config).unwrap().0
}

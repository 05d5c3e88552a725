//! The host↔host message enums: every request one net-daemon sends another over
//! the peer link ([`crate::peer`]), and every response.
//!
//! Each request names the response it gets in its doc comment; a host that gets
//! another variant back treats it as a protocol error. [`PeerResponse::Refused`]
//! may answer any request. The cluster layer's own requests are variants of
//! [`PeerRequest`]; the data path's are [`DataRequest`]s inside [`PeerRequest::Data`].

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use shoal_shared::frame::{LogEntry, WorkerRequest, WorkerResponse};

use crate::coords::Coordinate;
use crate::gossip::Rumor;
use crate::ni::{Command, NetworkInfo, Outcome};
use crate::raft_store::{MetaTypes, NodeId};
use crate::replication;
use crate::HostId;

/// The metadata group's type configuration.
pub(crate) type Meta = MetaTypes<NetworkInfo>;

/// What a peer link carries from the dialer: a request, and the cluster its sender
/// belongs to (0 while it has joined none). A host refuses a request from another
/// cluster: a host whose data was wiped, and that then founded a cluster of its own at
/// the same address, must not be taken for the host it replaced.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// The sender's cluster id, 0 before it is a member.
    pub cluster_id: u64,
    /// The request.
    pub request: PeerRequest,
}

impl Envelope {
    /// Whether the request comes from another cluster than `mine` (this host's id, once
    /// it is a member) and must be refused. A sender or receiver that has joined no
    /// cluster yet (a host joining through this one) is let through.
    pub fn from_another_cluster(&self, mine: Option<u64>) -> bool {
        mine.is_some_and(|mine| self.cluster_id != 0 && self.cluster_id != mine)
    }
}

/// A request from one host to another.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Raft replication. Answered by [`PeerResponse::AppendEntries`].
    AppendEntries(AppendEntriesRequest<Meta>),
    /// Raft election. Answered by [`PeerResponse::Vote`].
    Vote(VoteRequest<NodeId>),
    /// Raft snapshot transfer. Answered by [`PeerResponse::InstallSnapshot`].
    InstallSnapshot(InstallSnapshotRequest<Meta>),
    /// A new host asks to be accepted; the receiver sponsors it. Answered by
    /// [`PeerResponse::Joined`].
    Join {
        /// Where the other hosts reach the joiner ("host:port").
        peer_addr: String,
        /// Where clients reach the joiner ("" without a TCP listener).
        client_addr: String,
        /// The joiner's `storage.partitions`; must equal the cluster's.
        partitions: u16,
    },
    /// A command for the metadata leader to commit. Answered by
    /// [`PeerResponse::Proposed`], or [`PeerResponse::NotLeader`].
    Propose(Command),
    /// Liveness probe, with the sender's view and its live rumors. Answered by
    /// [`PeerResponse::Heartbeat`].
    Heartbeat {
        /// The sender's id.
        from: HostId,
        /// The version of the NI the sender has applied.
        ni_version: u64,
        /// The sender's network coordinate.
        coordinate: Coordinate,
        /// The sender's live rumors (host metrics), to spread further.
        rumors: Vec<Rumor>,
    },
    /// The peers the sender suspects and the peers it could probe, for the metadata
    /// leader. Answered by [`PeerResponse::Noted`].
    Suspects {
        /// The reporting host.
        from: HostId,
        /// The peers the sender has suspected long enough to propose them as inactive.
        suspects: Vec<HostId>,
        /// The peers the sender probed, suspected or not.
        observed: Vec<HostId>,
    },
    /// A request for this host's data: handed to the net-daemon's [`crate::node::DataPath`].
    Data(DataRequest),
    /// Replication messages, in the order the sender queued them (one way; see
    /// `crate::outbox`). The metadata leader's node takes the answers to its failover
    /// queries; the net-daemon's replication takes the rest. Answered by
    /// [`PeerResponse::Noted`] once handed on.
    Replicas {
        /// The sender.
        from: HostId,
        /// The messages.
        messages: Vec<ReplicaMessage>,
    },
    /// A follower's report that its primary has been silent, or a primary's report that
    /// it stepped down for a higher term: the metadata leader runs a failover round.
    /// Answered by [`PeerResponse::Noted`].
    PrimaryLost {
        /// The reporting host.
        from: HostId,
        /// The partition.
        partition: u16,
        /// The term the reporter followed or led.
        term: u64,
    },
}

/// One replication message about one partition, as [`PeerRequest::Replicas`] carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaMessage {
    /// The partition.
    pub partition: u16,
    /// The message.
    pub message: replication::Message,
    /// The log entries an append carries (`first..=last`), empty otherwise.
    pub entries: Vec<LogEntry>,
}

/// A request of another host for this host's data, which the cluster layer does not
/// serve itself: the net-daemon's routing answers it (see [`crate::node::DataPath`]).
#[derive(Debug, Serialize, Deserialize)]
pub enum DataRequest {
    /// A client request for `partition`, which the sender believes the receiver owns at
    /// `epoch`. Answered by [`PeerResponse::Worker`] from the partition's worker, or by
    /// [`PeerResponse::Moved`] (nothing applied) when the receiver does not own it.
    Worker {
        /// The partition all keys of `request` are in.
        partition: u16,
        /// The partition's epoch in the sender's NI.
        epoch: u64,
        /// The request for the partition's worker.
        request: WorkerRequest,
    },
    /// A handoff request for the worker of `partition` (export, log, fence), whoever owns
    /// it. Answered by [`PeerResponse::Worker`].
    Partition {
        /// The partition whose worker serves `request`.
        partition: u16,
        /// The request for that worker.
        request: WorkerRequest,
    },
    /// The target of the move of `partition` at `epoch` asks the owner to fence the
    /// partition for the final step. The owner fences it only once its own table shows
    /// that move, so its fences never run ahead of its table. Answered by
    /// [`PeerResponse::Worker`].
    Fence {
        /// The partition to fence.
        partition: u16,
        /// The epoch of the move in the target's NI.
        epoch: u64,
    },
    /// Reads (`GET` or `MGET`) of partitions that the sender believes the receiver owns,
    /// each with its partition and that partition's epoch in the sender's NI: the reads
    /// that the sender's clients asked of the receiver at about the same time, in one
    /// frame. Answered by [`PeerResponse::Reads`].
    Reads(Vec<(u16, u64, WorkerRequest)>),
    /// A request for every worker of the receiver (DBSIZE, KEYS, FLUSH, ...). Answered by
    /// [`PeerResponse::Workers`], one response per worker.
    AllWorkers(WorkerRequest),
    /// `WAIT`: how many followers hold the log of each of `partitions` (led by the
    /// receiver) up to where it is when the request arrives, waiting at most `timeout_ms`
    /// for `wanted` of them. Answered by [`PeerResponse::Worker`] with an `Integer`: the
    /// fewest over the partitions (0 for one the receiver does not lead).
    Acknowledged {
        /// The partitions written.
        partitions: Vec<u16>,
        /// How many followers are asked for.
        wanted: u32,
        /// The longest wait.
        timeout_ms: u64,
    },
    /// A read (`GET` or `MGET`) of `partition` for a `READONLY` connection, served by the
    /// receiver's copy if it follows the primary closely enough (see the routing). Answered
    /// by [`PeerResponse::Worker`], or [`PeerResponse::Moved`] when the copy may not serve it.
    ReadCopy {
        /// The partition read.
        partition: u16,
        /// The read.
        request: WorkerRequest,
    },
    /// A pub/sub message published on the sender (PUBLISH, or SPUBLISH for `shard`), for
    /// the receiver's subscribers. Answered by [`PeerResponse::Worker`] with an `Integer`:
    /// how many received it.
    Publish {
        /// The channel.
        #[serde(with = "serde_bytes")]
        channel: Vec<u8>,
        /// The message.
        #[serde(with = "serde_bytes")]
        message: Vec<u8>,
        /// A shard channel (SSUBSCRIBE) rather than a channel.
        shard: bool,
    },
    /// The digest of the receiver's copy of `partition` (`SHOAL.DIGEST`), for the metadata
    /// leader's comparison of the copies. Answered by [`PeerResponse::Digest`], or
    /// [`PeerResponse::Refused`] when the receiver holds no copy.
    Digest {
        /// The partition.
        partition: u16,
    },
}

/// A response to a [`PeerRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    /// The receiver's Raft answer to [`PeerRequest::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// The receiver's Raft answer to [`PeerRequest::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// The receiver's Raft answer to [`PeerRequest::InstallSnapshot`].
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// The joiner's host id and cluster, and the NI version that accepted it.
    Joined {
        /// The cluster's id.
        cluster_id: u64,
        /// The id the cluster gave the joiner.
        host: HostId,
        /// The NI version whose `Join` command accepted it.
        ni_version: u64,
    },
    /// The committed command's outcome, from the metadata leader.
    Proposed(Outcome),
    /// The receiver is not the metadata leader; `leader` is its peer address if known.
    NotLeader {
        /// The leader's peer address ("host:port"), if the receiver knows it.
        leader: Option<String>,
    },
    /// The receiver's side of a heartbeat: its view and its live rumors.
    Heartbeat {
        /// The sender's id.
        from: HostId,
        /// The version of the NI the sender has applied.
        ni_version: u64,
        /// The sender's network coordinate.
        coordinate: Coordinate,
        /// The sender's live rumors (host metrics), to spread further.
        rumors: Vec<Rumor>,
    },
    /// The suspects report was recorded.
    Noted,
    /// The answer of the worker that served a [`DataRequest`].
    Worker(WorkerResponse),
    /// The digest of a copy ([`DataRequest::Digest`]).
    Digest {
        /// The copy's last commit id.
        last_commit_id: u64,
        /// Its keys.
        keys: u64,
        /// Its order-independent checksum.
        checksum: u64,
    },
    /// One answer per read of [`DataRequest::Reads`], in its order: `None` for one that
    /// the receiver could not answer at once from its maps (it does not own the partition
    /// at that epoch, a transaction holds the key, the copy has no lease, ...), which the
    /// sender then forwards on its own.
    Reads(Vec<Option<WorkerResponse>>),
    /// One answer per worker of the receiver, in worker order ([`DataRequest::AllWorkers`]).
    Workers(Vec<WorkerResponse>),
    /// The receiver does not own the partition now; nothing was applied.
    Moved,
    /// The receiver cannot serve the request (it is not a member yet, or the request
    /// failed); the text says why.
    Refused(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_from_another_cluster_is_refused_and_a_joiners_is_not() {
        let from = |cluster_id| Envelope {
            cluster_id,
            request: PeerRequest::Suspects {
                from: 2,
                suspects: Vec::new(),
                observed: Vec::new(),
            },
        };
        // A founder whose data was wiped founded cluster 9 at its old address.
        assert!(from(9).from_another_cluster(Some(7)));
        assert!(!from(7).from_another_cluster(Some(7)));
        // A host joining (no cluster yet), or a receiver not a member yet.
        assert!(!from(0).from_another_cluster(Some(7)));
        assert!(!from(9).from_another_cluster(None));
    }
}

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
use shoal_shared::frame::{WorkerRequest, WorkerResponse};

use crate::coords::Coordinate;
use crate::gossip::Rumor;
use crate::ni::{Command, NetworkInfo, Outcome};
use crate::raft_store::{MetaTypes, NodeId};
use crate::HostId;

/// The metadata group's type configuration.
pub(crate) type Meta = MetaTypes<NetworkInfo>;

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
        peer_addr: String,
        client_addr: String,
        partitions: u16,
    },
    /// A command for the metadata leader to commit. Answered by
    /// [`PeerResponse::Proposed`], or [`PeerResponse::NotLeader`].
    Propose(Command),
    /// Liveness probe, with the sender's view and its live rumors. Answered by
    /// [`PeerResponse::Heartbeat`].
    Heartbeat {
        from: HostId,
        ni_version: u64,
        coordinate: Coordinate,
        rumors: Vec<Rumor>,
    },
    /// The peers the sender suspects and the peers it could probe, for the metadata
    /// leader. Answered by [`PeerResponse::Noted`].
    Suspects {
        from: HostId,
        suspects: Vec<HostId>,
        observed: Vec<HostId>,
    },
    /// A request for this host's data: handed to the net-daemon's [`crate::node::DataPath`].
    Data(DataRequest),
}

/// A request of another host for this host's data, which the cluster layer does not
/// serve itself: the net-daemon's routing answers it (see [`crate::node::DataPath`]).
#[derive(Debug, Serialize, Deserialize)]
pub enum DataRequest {
    /// A client request for `partition`, which the sender believes the receiver owns at
    /// `epoch`. Answered by [`PeerResponse::Worker`] from the partition's worker, or by
    /// [`PeerResponse::Moved`] (nothing applied) when the receiver does not own it.
    Worker {
        partition: u16,
        epoch: u64,
        request: WorkerRequest,
    },
    /// A handoff request for the worker of `partition` (export, log, fence), whoever owns
    /// it. Answered by [`PeerResponse::Worker`].
    Partition {
        partition: u16,
        request: WorkerRequest,
    },
    /// The target of the move of `partition` at `epoch` asks the owner to fence the
    /// partition for the final step. The owner fences it only once its own table shows
    /// that move, so its fences never run ahead of its table. Answered by
    /// [`PeerResponse::Worker`].
    Fence { partition: u16, epoch: u64 },
    /// A request for every worker of the receiver (DBSIZE, KEYS, FLUSH, ...). Answered by
    /// [`PeerResponse::Workers`], one response per worker.
    AllWorkers(WorkerRequest),
}

/// A response to a [`PeerRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// The joiner's host id and cluster, and the NI version that accepted it.
    Joined {
        cluster_id: u64,
        host: HostId,
        ni_version: u64,
    },
    Proposed(Outcome),
    /// The receiver is not the metadata leader; `leader` is its peer address if known.
    NotLeader {
        leader: Option<String>,
    },
    Heartbeat {
        from: HostId,
        ni_version: u64,
        coordinate: Coordinate,
        rumors: Vec<Rumor>,
    },
    Noted,
    Worker(WorkerResponse),
    Workers(Vec<WorkerResponse>),
    /// The receiver does not own the partition now; nothing was applied.
    Moved,
    /// The receiver cannot serve the request (it is not a member yet, or the request
    /// failed); the text says why.
    Refused(String),
}

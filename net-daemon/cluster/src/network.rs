//! The metadata group's Raft RPCs over the peer links: openraft's network
//! traits, implemented with [`PeerCaller::call`] (the peer pool in production,
//! a simulated network in the simulation). Every RPC has the timeout openraft
//! gives it.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;

use crate::messages::{Meta, PeerRequest, PeerResponse};
use crate::peer::{HostAddr, PeerError};
use crate::raft_store::NodeId;
use crate::transport::PeerCaller;

/// Opens Raft links to peers through the host's caller.
#[derive(Clone)]
pub(crate) struct RaftPeers {
    pub(crate) caller: Arc<dyn PeerCaller>,
}

/// The link to one member of the group.
pub(crate) struct RaftLink {
    caller: Arc<dyn PeerCaller>,
    target: NodeId,
    addr: Result<HostAddr, String>,
}

impl RaftNetworkFactory<Meta> for RaftPeers {
    type Network = RaftLink;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> RaftLink {
        RaftLink {
            caller: Arc::clone(&self.caller),
            target,
            addr: HostAddr::new(&node.addr).map_err(|error| error.to_string()),
        }
    }
}

type RpcError<E> = RPCError<NodeId, BasicNode, E>;

impl RaftLink {
    async fn call<E: Error>(
        &self,
        request: PeerRequest,
        option: &RPCOption,
    ) -> Result<PeerResponse, RpcError<E>> {
        let addr = self.addr.as_ref().map_err(|reason| {
            RPCError::Unreachable(Unreachable::new(&std::io::Error::other(reason.clone())))
        })?;
        let timeout = option.hard_ttl().max(Duration::from_millis(1));
        match self.caller.call(addr, request, timeout).await {
            Ok(PeerResponse::Refused(reason)) => Err(RPCError::Unreachable(Unreachable::new(
                &std::io::Error::other(reason),
            ))),
            Ok(response) => Ok(response),
            Err(error @ (PeerError::Unreachable { .. } | PeerError::Refused { .. })) => {
                Err(RPCError::Unreachable(Unreachable::new(&error)))
            }
            Err(error) => Err(RPCError::Network(NetworkError::new(&error))),
        }
    }

    fn unexpected<E: Error>(&self, response: PeerResponse) -> RpcError<E> {
        RPCError::Network(NetworkError::new(&std::io::Error::other(format!(
            "host {} answered a Raft RPC with {response:?}",
            self.target
        ))))
    }

    fn remote<E: Error>(&self, error: E) -> RpcError<E> {
        RPCError::RemoteError(RemoteError::new(self.target, error))
    }
}

/// First wait before openraft retries a member that was unreachable; it doubles up to
/// [`UNREACHABLE_BACKOFF_MAX`], so a host that is down costs a retry (and a log line)
/// every few seconds, not twice a second.
const UNREACHABLE_BACKOFF_MIN: Duration = Duration::from_millis(500);
const UNREACHABLE_BACKOFF_MAX: Duration = Duration::from_secs(4);

impl RaftNetwork<Meta> for RaftLink {
    fn backoff(&self) -> Backoff {
        let mut wait = UNREACHABLE_BACKOFF_MIN;
        Backoff::new(std::iter::from_fn(move || {
            let this = wait;
            wait = (wait * 2).min(UNREACHABLE_BACKOFF_MAX);
            Some(this)
        }))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<Meta>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcError<RaftError<NodeId>>> {
        match self.call(PeerRequest::AppendEntries(rpc), &option).await? {
            PeerResponse::AppendEntries(result) => result.map_err(|e| self.remote(e)),
            other => Err(self.unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<Meta>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcError<RaftError<NodeId, InstallSnapshotError>>>
    {
        match self
            .call(PeerRequest::InstallSnapshot(rpc), &option)
            .await?
        {
            PeerResponse::InstallSnapshot(result) => result.map_err(|e| self.remote(e)),
            other => Err(self.unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcError<RaftError<NodeId>>> {
        match self.call(PeerRequest::Vote(rpc), &option).await? {
            PeerResponse::Vote(result) => result.map_err(|e| self.remote(e)),
            other => Err(self.unexpected(other)),
        }
    }
}

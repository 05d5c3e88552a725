//! How the cluster layer reaches its peers and reads the time: the two seams
//! between its I/O ([`crate::node`], [`crate::network`]) and the world.
//!
//! [`PeerCaller`] sends one [`PeerRequest`] to a peer and waits for its
//! [`PeerResponse`]; production implements it with the authenticated TCP
//! transport (`PeerPool`), and a simulation with its own network. [`Clock`]
//! gives the milliseconds since the epoch that go into the NI's commands;
//! production reads the wall clock, a simulation its simulated time. Neither
//! holds any cluster state or decides anything.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::messages::{Envelope, PeerRequest, PeerResponse};
use crate::peer::{HostAddr, PeerError, PeerPool};

/// The future of one [`PeerCaller::call`].
pub type CallFuture<'a> =
    Pin<Box<dyn Future<Output = Result<PeerResponse, PeerError>> + Send + 'a>>;

/// Sends requests to peers: the only way the cluster layer talks to another host.
pub trait PeerCaller: Send + Sync + 'static {
    /// Sends `request` to the host at `peer` and waits for its response, at most
    /// `timeout` in all.
    fn call<'a>(
        &'a self,
        peer: &'a HostAddr,
        request: PeerRequest,
        timeout: Duration,
    ) -> CallFuture<'a>;
}

/// The production [`PeerCaller`]: the peer pool, each request in an [`Envelope`] with
/// this host's cluster id (set once it is a member).
pub(crate) struct PeerLinks {
    pub(crate) pool: PeerPool<Envelope, PeerResponse>,
    pub(crate) cluster_id: Arc<OnceLock<u64>>,
}

impl PeerCaller for PeerLinks {
    fn call<'a>(
        &'a self,
        peer: &'a HostAddr,
        request: PeerRequest,
        timeout: Duration,
    ) -> CallFuture<'a> {
        let envelope = Envelope {
            cluster_id: self.cluster_id.get().copied().unwrap_or(0),
            request,
        };
        Box::pin(self.pool.call(peer, envelope, timeout))
    }
}

/// The time that goes into the NI: milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    /// Now, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct WallClock;

impl Clock for WallClock {
    fn now_ms(&self) -> u64 {
        shoal_shared::now_ms()
    }
}

//! The host ↔ host transport: persistent, authenticated TCP connections between net-daemons.
//!
//! It owns the peer sockets, the handshake, the framing and the request/response
//! multiplexing; it knows no message type. The cluster layer defines the one
//! host ↔ host message enum and uses `PeerPool::call` to send a request to a peer and
//! `PeerListener::bind` with a `PeerHandler` to answer requests from peers. It never
//! sends the cluster secret, never hands a request from an unauthenticated connection to
//! the handler, never panics on bytes from a socket, and never waits without a bound.
//!
//! - `PeerPool` (the dialing side) keeps one connection per peer, made on first use by
//!   a background task that reconnects with capped backoff (`RECONNECT_MIN` doubling
//!   to `RECONNECT_MAX`). Many requests are in flight on one connection at once, each
//!   with its own id and its own timeout.
//! - `PeerListener` (the accepting side) authenticates each connection, then runs the
//!   handler for each request in a task of its own and writes the responses back in
//!   the order they complete.
//!
//! # Secret
//!
//! A `ClusterSecret` has at least `MIN_SECRET_BYTES` bytes: an empty or short secret
//! is refused when it is built, so the cluster layer cannot start without one. The
//! secret is only ever used as an HMAC-SHA256 key.
//!
//! # Handshake (protocol version 1)
//!
//! Both sides first send a hello, at once and without waiting for the other's:
//!
//! | offset | bytes | field                                                        |
//! |--------|-------|--------------------------------------------------------------|
//! | 0      | 4     | magic `SHLP` (`53 48 4C 50`)                                 |
//! | 4      | 2     | protocol version, u16 big-endian (`PROTOCOL_VERSION`)      |
//! | 6      | 1     | role of the sender: `01` dialer, `02` acceptor               |
//! | 7      | 32    | nonce: fresh random bytes from the OS (`getrandom`)          |
//! | 39     | 1     | identity length `n`, 1 to 255                                |
//! | 40     | n     | identity: the sender's host address, printable ASCII         |
//!
//! A side reads the first 6 bytes of the other's hello before the rest: wrong magic
//! ends the handshake ("not a Shoal peer"), and a different version is refused
//! ("protocol version mismatch") before anything else is read, so that every future
//! version can refuse this one cleanly.
//!
//! Then, in this order:
//!
//! 1. dialer → acceptor: `01` followed by the dialer's 32-byte proof;
//! 2. the acceptor checks it, then answers `01` followed by its own 32-byte proof, or
//!    refuses;
//! 3. the dialer checks the acceptor's proof and closes the connection if it is wrong.
//!
//! A refusal is the two bytes `02 reason` and may replace any message after the hello;
//! the refusing side then closes the connection. Reason codes ([`RefusalReason`]):
//! `01` wrong cluster secret, `02` protocol version mismatch, `03` handshake timeout,
//! `04` malformed handshake, `05` too many peer connections, `06` not a Shoal peer.
//!
//! A proof is `HMAC-SHA256(key = cluster secret, message)` where `message` is
//!
//! | bytes | field                                                         |
//! |-------|---------------------------------------------------------------|
//! | 16    | ASCII `shoal-peer-proof`                                      |
//! | 2     | protocol version, u16 big-endian                              |
//! | 1     | role of the prover: `01` dialer, `02` acceptor                |
//! | 32    | the dialer's nonce                                            |
//! | 32    | the acceptor's nonce                                          |
//! | 1     | length of the prover's identity                               |
//! | n     | the prover's identity, as sent in its hello                   |
//!
//! Both nonces make a proof good for one connection only; the role keeps a proof from
//! being reflected back to its sender. Proofs are checked in constant time. The
//! acceptor proves itself only to a dialer that has proved itself first, so a dialer
//! without the secret never gets a proof to study. The whole handshake is bounded by
//! `PeerConfig::handshake_timeout` on each side. Every refusal is logged at WARN with
//! the remote address and the reason.
//!
//! The handshake authenticates the peer when the connection opens. It neither encrypts
//! nor signs the frames that follow: peers must talk over a network that no one else
//! can write to (or through a tunnel that protects it).
//!
//! # Frames
//!
//! After the handshake each direction carries frames of `length u32 big-endian ++
//! bincode 2 (serde) payload`, encoded and decoded by [`shoal_shared::frame`] (which
//! never allocates from a declared length); a frame over `MAX_PEER_FRAME_BYTES` or a
//! payload that does not decode closes the connection. The dialer sends
//! `RequestFrame`s (`Call { id, request }` or `Ping`), the acceptor `ResponseFrame`s
//! (`Reply { id, response }`, `Failed { id, reason }` when a response cannot be encoded,
//! or `Pong`); ids are chosen by the dialer, and responses come back in the order they
//! complete. The dialer pings every quarter of `PeerConfig::liveness_timeout`, and
//! each side closes a connection on which nothing has arrived for that long, so a
//! vanished host is noticed even when no request is waiting on it.

mod handshake;
mod listener;
mod pool;
#[cfg(test)]
mod tests;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

pub(crate) use listener::PeerListener;
pub(crate) use pool::PeerPool;

/// The version this build speaks in the handshake; peers of another version are refused.
pub(crate) const PROTOCOL_VERSION: u16 = 5;

/// Largest frame on a peer connection. A request that the cluster layer proxies to a
/// partition's primary carries a client's value, which may be as large as
/// [`MAX_VALUE_BYTES_LIMIT`](shoal_shared::limits::MAX_VALUE_BYTES_LIMIT); so the limit is
/// the same as on the worker links. Only authenticated peers can send a frame at all:
/// the handshake reads a fixed layout of at most 328 bytes.
pub(crate) const MAX_PEER_FRAME_BYTES: usize = shoal_shared::limits::MAX_FRAME_BYTES;

/// Timeout for a request whose caller has no better bound.
#[cfg(test)]
pub(crate) const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for [`PeerConfig::handshake_timeout`].
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for [`PeerConfig::connect_timeout`].
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default for [`PeerConfig::liveness_timeout`].
pub(crate) const LIVENESS_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`PeerConfig::max_in_flight`].
pub(crate) const MAX_IN_FLIGHT: usize = 1024;
/// Default for [`PeerConfig::max_inbound_connections`].
pub(crate) const MAX_INBOUND_CONNECTIONS: usize = 1024;
/// Default for [`PeerConfig::max_peers`].
pub(crate) const MAX_PEERS: usize = 1024;
/// First wait before reconnecting to a peer; it doubles after each failure.
pub(crate) const RECONNECT_MIN: Duration = Duration::from_millis(50);
/// Longest wait between two connection attempts to a peer.
pub(crate) const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// A connection that stayed up this long resets the backoff to [`RECONNECT_MIN`].
pub(crate) const STABLE_CONNECTION: Duration = Duration::from_secs(10);
/// Shortest cluster secret accepted.
pub(crate) const MIN_SECRET_BYTES: usize = 16;
/// Longest host address (its length travels in one byte).
pub(crate) const MAX_HOST_ADDR_BYTES: usize = 255;

const _: () = assert!(MAX_HOST_ADDR_BYTES <= u8::MAX as usize);
const _: () = assert!(RECONNECT_MIN.as_millis() < RECONNECT_MAX.as_millis());
const _: () = assert!(RECONNECT_MAX.as_millis() < STABLE_CONNECTION.as_millis());
const _: () = assert!(
    shoal_shared::limits::MAX_VALUE_BYTES_LIMIT + shoal_shared::limits::MAX_KEY_BYTES + 64 * 1024
        < MAX_PEER_FRAME_BYTES,
    "a request carrying the largest value must fit in one peer frame"
);

/// A message type that can travel on a peer connection.
pub(crate) trait PeerMessage: Serialize + DeserializeOwned + Send + 'static {}

impl<T: Serialize + DeserializeOwned + Send + 'static> PeerMessage for T {}

/// Answers the requests that peers send to a [`PeerListener`].
///
/// Each request runs in a task of its own, so a slow request does not hold up the
/// others. A request whose connection closes still runs to its end, and its response is
/// dropped: a handler must bound its own waits.
///
/// `from` is the identity the peer sent in its handshake. The peer proved that it holds
/// the cluster secret, not that it owns that address: every holder of the secret is
/// trusted alike.
pub(crate) trait PeerHandler<Req, Resp>: Send + Sync + 'static {
    /// The response to `request`, sent by the peer that authenticated as `from`.
    fn handle(&self, from: HostAddr, request: Req) -> impl Future<Output = Resp> + Send;
}

impl<F, Fut, Req, Resp> PeerHandler<Req, Resp> for F
where
    F: Fn(HostAddr, Req) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Resp> + Send,
{
    fn handle(&self, from: HostAddr, request: Req) -> impl Future<Output = Resp> + Send {
        self(from, request)
    }
}

/// A host's address as it advertises it to its peers (`host:port`), which is also its
/// identity in the handshake: 1 to `MAX_HOST_ADDR_BYTES` bytes of printable ASCII.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostAddr(Arc<str>);

/// A host address that is empty, too long, or not printable ASCII.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid host address: must be 1 to {MAX_HOST_ADDR_BYTES} bytes of printable ASCII")]
pub struct InvalidHostAddr;

impl HostAddr {
    pub(crate) fn new(address: &str) -> Result<HostAddr, InvalidHostAddr> {
        HostAddr::from_bytes(address.as_bytes())
    }

    /// Parses an address from the wire.
    fn from_bytes(bytes: &[u8]) -> Result<HostAddr, InvalidHostAddr> {
        let printable = bytes.iter().all(|byte| byte.is_ascii_graphic());
        if bytes.is_empty() || bytes.len() > MAX_HOST_ADDR_BYTES || !printable {
            return Err(InvalidHostAddr);
        }
        // Printable ASCII is UTF-8.
        let text = std::str::from_utf8(bytes).map_err(|_| InvalidHostAddr)?;
        Ok(HostAddr(Arc::from(text)))
    }

    /// The address as text ("host:port").
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for HostAddr {
    type Err = InvalidHostAddr;

    fn from_str(address: &str) -> Result<HostAddr, InvalidHostAddr> {
        HostAddr::new(address)
    }
}

impl From<std::net::SocketAddr> for HostAddr {
    fn from(address: std::net::SocketAddr) -> HostAddr {
        // A socket address prints as printable ASCII well under the limit.
        HostAddr(Arc::from(address.to_string()))
    }
}

impl fmt::Display for HostAddr {
    fn fmt(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl fmt::Debug for HostAddr {
    fn fmt(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, formatter)
    }
}

/// The secret every host of a cluster shares. It is kept only as a keyed HMAC state and
/// is never printed.
#[derive(Clone)]
pub(crate) struct ClusterSecret {
    key: Hmac<Sha256>,
}

/// A cluster secret shorter than [`MIN_SECRET_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the cluster secret has {length} bytes; it needs at least {MIN_SECRET_BYTES}")]
pub(crate) struct SecretTooShort {
    pub(crate) length: usize,
}

impl ClusterSecret {
    /// A secret from its bytes. An empty or short secret is refused: the cluster layer
    /// does not run without a real one.
    pub(crate) fn new(secret: &[u8]) -> Result<ClusterSecret, SecretTooShort> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(SecretTooShort {
                length: secret.len(),
            });
        }
        let key = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| SecretTooShort {
            length: secret.len(),
        })?;
        Ok(ClusterSecret { key })
    }

    /// A fresh HMAC state keyed with the secret.
    fn mac(&self) -> Hmac<Sha256> {
        self.key.clone()
    }
}

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("ClusterSecret(..)")
    }
}

/// Settings of a pool or a listener. [`PeerConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub(crate) struct PeerConfig {
    /// This host's address as its peers know it; sent in the handshake.
    pub(crate) identity: HostAddr,
    pub(crate) secret: ClusterSecret,
    /// Longest a handshake may take, on either side.
    pub(crate) handshake_timeout: Duration,
    /// Longest a TCP connect (with its name lookup) may take.
    pub(crate) connect_timeout: Duration,
    /// A connection on which nothing has arrived for this long is closed; the dialer
    /// pings every quarter of it. An acceptor whose every in-flight slot stays taken
    /// this long reads no pings, so the dialer closes that connection too.
    pub(crate) liveness_timeout: Duration,
    /// Requests in flight on one connection (at least 1). Past it, callers wait (within
    /// their timeout) and the acceptor stops reading.
    pub(crate) max_in_flight: usize,
    /// Connections a listener holds, those still in their handshake included; more are
    /// refused.
    pub(crate) max_inbound_connections: usize,
    /// Peers a pool keeps connections to; a call to one more fails as unreachable.
    pub(crate) max_peers: usize,
    /// The local address a pool dials from; `None` lets the system choose. A host set
    /// to its peer address is seen by its peers (and by firewall rules) as that address.
    pub(crate) source_ip: Option<std::net::IpAddr>,
}

impl PeerConfig {
    pub(crate) fn new(identity: HostAddr, secret: ClusterSecret) -> PeerConfig {
        PeerConfig {
            identity,
            secret,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            connect_timeout: CONNECT_TIMEOUT,
            liveness_timeout: LIVENESS_TIMEOUT,
            max_in_flight: MAX_IN_FLIGHT,
            max_inbound_connections: MAX_INBOUND_CONNECTIONS,
            max_peers: MAX_PEERS,
            source_ip: None,
        }
    }

    fn ping_interval(&self) -> Duration {
        (self.liveness_timeout / 4).clamp(Duration::from_millis(1), Duration::from_secs(3600))
    }

    fn in_flight_limit(&self) -> usize {
        self.max_in_flight.max(1)
    }
}

/// Why a handshake was refused, by either side. The code is what travels in a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// Code 1: the other side does not prove the cluster secret.
    WrongSecret,
    /// Code 2: the other side speaks another protocol version.
    VersionMismatch,
    /// Code 3: the handshake did not finish in time.
    HandshakeTimeout,
    /// Code 4: a handshake message could not be decoded.
    Malformed,
    /// Code 5: the listener has its maximum of inbound connections.
    TooManyConnections,
    /// Code 6: the other side did not start with Shoal's handshake.
    NotAPeer,
    /// A code this version does not know.
    Unknown(u8),
}

impl RefusalReason {
    pub(crate) fn code(self) -> u8 {
        match self {
            RefusalReason::WrongSecret => 1,
            RefusalReason::VersionMismatch => 2,
            RefusalReason::HandshakeTimeout => 3,
            RefusalReason::Malformed => 4,
            RefusalReason::TooManyConnections => 5,
            RefusalReason::NotAPeer => 6,
            RefusalReason::Unknown(code) => code,
        }
    }

    pub(crate) fn from_code(code: u8) -> RefusalReason {
        match code {
            1 => RefusalReason::WrongSecret,
            2 => RefusalReason::VersionMismatch,
            3 => RefusalReason::HandshakeTimeout,
            4 => RefusalReason::Malformed,
            5 => RefusalReason::TooManyConnections,
            6 => RefusalReason::NotAPeer,
            other => RefusalReason::Unknown(other),
        }
    }
}

impl fmt::Display for RefusalReason {
    fn fmt(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        match self {
            RefusalReason::WrongSecret => formatter.write_str("wrong cluster secret"),
            RefusalReason::VersionMismatch => formatter.write_str("protocol version mismatch"),
            RefusalReason::HandshakeTimeout => formatter.write_str("handshake timeout"),
            RefusalReason::Malformed => formatter.write_str("malformed handshake"),
            RefusalReason::TooManyConnections => formatter.write_str("too many peer connections"),
            RefusalReason::NotAPeer => formatter.write_str("not a Shoal peer"),
            RefusalReason::Unknown(code) => write!(formatter, "unknown refusal code {code}"),
        }
    }
}

/// Why a call got no response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// No connection to the peer could be made (or the pool is full); the request was not
    /// sent.
    #[error("peer {peer} is unreachable: {reason}")]
    Unreachable {
        /// The peer called.
        peer: HostAddr,
        /// Why no connection could be made.
        reason: String,
    },
    /// No response within the call's timeout; the request may or may not have been
    /// handled.
    #[error("peer {peer} did not answer within {timeout_ms} ms")]
    Timeout {
        /// The peer called.
        peer: HostAddr,
        /// The call's timeout, in ms.
        timeout_ms: u64,
    },
    /// The handshake failed: the peer refused this host, or this host refused the peer.
    /// The request was not sent.
    #[error("connection to peer {peer} refused: {reason}")]
    Refused {
        /// The peer called.
        peer: HostAddr,
        /// Why the handshake failed.
        reason: RefusalReason,
    },
    /// The connection closed while the request was in flight; it may or may not have
    /// been handled.
    #[error("lost the connection to peer {peer}")]
    ConnectionLost {
        /// The peer called.
        peer: HostAddr,
    },
    /// A message could not be encoded, or the peer sent one that cannot be decoded (and
    /// the connection was closed).
    #[error("protocol error with peer {peer}: {reason}")]
    Protocol {
        /// The peer called.
        peer: HostAddr,
        /// The encoder's or decoder's reason.
        reason: String,
    },
}

/// What the dialer sends after the handshake.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum RequestFrame<Req> {
    Call {
        id: u64,
        request: Req,
    },
    /// Asks for a [`ResponseFrame::Pong`]; keeps an idle connection known to be alive.
    Ping,
}

/// What the acceptor sends after the handshake.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ResponseFrame<Resp> {
    Reply {
        id: u64,
        response: Resp,
    },
    /// The handler answered, but its response cannot be sent (too large to encode).
    Failed {
        id: u64,
        reason: String,
    },
    Pong,
}

/// The wait before the attempt that follows one that waited `backoff`.
fn next_backoff(backoff: Duration) -> Duration {
    (backoff * 2).min(RECONNECT_MAX)
}

/// Initial size of a connection's read buffer and write batch.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// A write batch stops taking more messages past this size.
const MAX_WRITE_BATCH_BYTES: usize = 1024 * 1024;

/// Gives back the memory of a read buffer that a large frame grew, once it is empty.
fn shrink_read_buffer(buffer: &mut Vec<u8>) {
    if buffer.is_empty() && buffer.capacity() > 2 * MAX_WRITE_BATCH_BYTES {
        *buffer = Vec::with_capacity(READ_BUFFER_BYTES);
    }
}

/// Writes all of `bytes`, failing if the peer takes none of them for `stall_timeout`
/// (a large write may take longer, as long as it progresses).
async fn write_all_unless_stalled<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &[u8],
    stall_timeout: Duration,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut written = 0;
    while written < bytes.len() {
        match tokio::time::timeout(stall_timeout, writer.write(&bytes[written..])).await {
            Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(count)) => written += count,
            Ok(Err(error)) => return Err(error),
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the peer took no bytes for {} ms",
                        stall_timeout.as_millis()
                    ),
                ))
            }
        }
    }
    Ok(())
}

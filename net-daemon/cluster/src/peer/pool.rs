//! The dialing side: one persistent connection per peer, each kept by a task of its own.
//!
//! A peer's task connects on the first call to it, authenticates, then writes request
//! frames, reads response frames and completes each call by its id. Whatever is queued
//! goes out in one write, once the tasks that are ready to run have queued their calls
//! too: a pipeline that many tasks forward leaves as one write rather than one per
//! request. When the connection fails, every call in flight fails at once, and the task
//! reconnects after a backoff that doubles from [`RECONNECT_MIN`] to [`RECONNECT_MAX`].
//! While it waits to retry, calls fail at once with the reason of the last failure;
//! while it connects, they wait for it (within their own timeout).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_shared::frame::{decode_frame, encode_frame};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::handshake::{self, HandshakeError};
use super::{
    next_backoff, shrink_read_buffer, write_all_unless_stalled, HostAddr, PeerConfig, PeerError,
    PeerMessage, RefusalReason, RequestFrame, ResponseFrame, MAX_WRITE_BATCH_BYTES,
    READ_BUFFER_BYTES, RECONNECT_MIN, STABLE_CONNECTION,
};
use shoal_shared::lock;

type Responder<Resp> = oneshot::Sender<Result<Resp, PeerError>>;

struct Outgoing<Req, Resp> {
    request: Req,
    responder: Responder<Resp>,
}

#[derive(Debug, Clone)]
enum LinkState {
    /// An attempt is under way; calls queue for it.
    Connecting,
    Connected,
    /// Waiting to retry after this failure; calls fail with it at once.
    Backoff(PeerError),
}

/// The connection to one peer and its task.
struct Link<Req, Resp> {
    outbox: mpsc::Sender<Outgoing<Req, Resp>>,
    state: Arc<Mutex<LinkState>>,
    /// One permit per call in flight on the connection.
    slots: Semaphore,
    task: AbortHandle,
}

impl<Req, Resp> Link<Req, Resp> {
    fn state(&self) -> LinkState {
        lock(&self.state).clone()
    }
}

impl<Req, Resp> Drop for Link<Req, Resp> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connections to peers, made on first use and kept.
pub(crate) struct PeerPool<Req, Resp> {
    inner: Arc<PoolInner<Req, Resp>>,
}

struct PoolInner<Req, Resp> {
    config: PeerConfig,
    links: Mutex<HashMap<HostAddr, Arc<Link<Req, Resp>>>>,
}

impl<Req, Resp> Clone for PeerPool<Req, Resp> {
    fn clone(&self) -> Self {
        PeerPool {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<Req: PeerMessage, Resp: PeerMessage> PeerPool<Req, Resp> {
    /// A pool that dials as `config.identity`. Its connections end when the last clone
    /// of the pool is dropped.
    pub(crate) fn new(config: PeerConfig) -> PeerPool<Req, Resp> {
        PeerPool {
            inner: Arc::new(PoolInner {
                config,
                links: Mutex::default(),
            }),
        }
    }

    /// This host's identity, as the pool presents it to peers.
    #[expect(dead_code, reason = "no caller in the workspace")]
    pub(crate) fn identity(&self) -> &HostAddr {
        &self.inner.config.identity
    }

    /// Sends `request` to `peer` (connecting first if needed) and waits for its response,
    /// at most `timeout` in all: waiting for a connection, for a free slot and for the
    /// answer all count.
    pub(crate) async fn call(
        &self,
        peer: &HostAddr,
        request: Req,
        timeout: Duration,
    ) -> Result<Resp, PeerError> {
        let now = Instant::now();
        // A timeout too long to add up (Duration::MAX) waits a year.
        let deadline = now
            .checked_add(timeout)
            .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
        let timed_out = || PeerError::Timeout {
            peer: peer.clone(),
            timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        let link = self.link(peer)?;
        if let LinkState::Backoff(error) = link.state() {
            return Err(error);
        }
        let _slot = tokio::time::timeout_at(deadline, link.slots.acquire())
            .await
            .map_err(|_| timed_out())?
            .map_err(|_| unreachable(peer, "the pool is closed"))?;
        let (responder, response) = oneshot::channel();
        match tokio::time::timeout_at(deadline, link.outbox.send(Outgoing { request, responder }))
            .await
        {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(unreachable(peer, "the connection task stopped")),
            Err(_) => return Err(timed_out()),
        }
        match tokio::time::timeout_at(deadline, response).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(PeerError::ConnectionLost { peer: peer.clone() }),
            Err(_) => Err(timed_out()),
        }
    }

    /// Whether the pool has an authenticated connection to `peer` now.
    #[cfg(test)]
    pub(crate) fn is_connected(&self, peer: &HostAddr) -> bool {
        let links = lock(&self.inner.links);
        links
            .get(peer)
            .is_some_and(|link| matches!(link.state(), LinkState::Connected))
    }

    /// Closes the connection to `peer` (once the calls in flight on it end) and stops
    /// reconnecting to it.
    #[expect(dead_code, reason = "no caller in the workspace")]
    pub(crate) fn forget(&self, peer: &HostAddr) {
        lock(&self.inner.links).remove(peer);
    }

    /// The link to `peer`, started if it is new.
    fn link(&self, peer: &HostAddr) -> Result<Arc<Link<Req, Resp>>, PeerError> {
        let mut links = lock(&self.inner.links);
        if let Some(link) = links.get(peer) {
            return Ok(Arc::clone(link));
        }
        let config = &self.inner.config;
        if links.len() >= config.max_peers {
            return Err(unreachable(
                peer,
                &format!("the pool already holds its {} peers", config.max_peers),
            ));
        }
        let (outbox, inbox) = mpsc::channel(config.in_flight_limit());
        let state = Arc::new(Mutex::new(LinkState::Connecting));
        let task = tokio::spawn(run_link(
            peer.clone(),
            config.clone(),
            inbox,
            Arc::clone(&state),
        ));
        let link = Arc::new(Link {
            outbox,
            state,
            slots: Semaphore::new(config.in_flight_limit()),
            task: task.abort_handle(),
        });
        links.insert(peer.clone(), Arc::clone(&link));
        Ok(link)
    }
}

fn unreachable(peer: &HostAddr, reason: &str) -> PeerError {
    PeerError::Unreachable {
        peer: peer.clone(),
        reason: reason.to_string(),
    }
}

/// Keeps the connection to `peer` up for as long as its link exists.
async fn run_link<Req: PeerMessage, Resp: PeerMessage>(
    peer: HostAddr,
    config: PeerConfig,
    mut inbox: mpsc::Receiver<Outgoing<Req, Resp>>,
    state: Arc<Mutex<LinkState>>,
) {
    let mut backoff = RECONNECT_MIN;
    // The last failure logged, so that a peer that stays down is logged once.
    let mut logged: Option<String> = None;
    loop {
        *lock(&state) = LinkState::Connecting;
        let failure = match connect(&peer, &config).await {
            Ok((stream, proved)) => {
                tracing::info!(peer = %peer, identity = %proved, "connected to peer");
                logged = None;
                *lock(&state) = LinkState::Connected;
                let since = Instant::now();
                let (_, why) = serve(&peer, stream, &config, &mut inbox).await;
                tracing::warn!(peer = %peer, reason = %why, "lost the connection to peer; reconnecting");
                if since.elapsed() >= STABLE_CONNECTION {
                    backoff = RECONNECT_MIN;
                }
                unreachable(&peer, &format!("connection lost ({why}); reconnecting"))
            }
            Err(error) => {
                let text = error.to_string();
                if logged.as_deref() != Some(text.as_str()) {
                    tracing::warn!(peer = %peer, %error, "cannot connect to peer; retrying");
                    logged = Some(text);
                }
                error
            }
        };
        *lock(&state) = LinkState::Backoff(failure.clone());
        // Calls queued for the attempt fail with its reason.
        while let Ok(outgoing) = inbox.try_recv() {
            let _ = outgoing.responder.send(Err(failure.clone()));
        }
        tokio::time::sleep(backoff).await;
        backoff = next_backoff(backoff);
    }
}

/// A TCP connection to `peer`, from `source_ip` when it is set.
async fn open(peer: &HostAddr, source_ip: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
    let Some(ip) = source_ip else {
        return TcpStream::connect(peer.as_str()).await;
    };
    let mut last_error = std::io::Error::other("the name has no address of the source's family");
    for address in tokio::net::lookup_host(peer.as_str()).await? {
        if address.is_ipv4() != ip.is_ipv4() {
            continue;
        }
        let socket = match ip {
            std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.bind(std::net::SocketAddr::new(ip, 0))?;
        match socket.connect(address).await {
            Ok(stream) => return Ok(stream),
            Err(error) => last_error = error,
        }
    }
    Err(last_error)
}

/// Connects to `peer` and runs the handshake; returns the stream and the identity the
/// peer proved.
async fn connect(peer: &HostAddr, config: &PeerConfig) -> Result<(TcpStream, HostAddr), PeerError> {
    let mut stream =
        match tokio::time::timeout(config.connect_timeout, open(peer, config.source_ip)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(unreachable(peer, &error.to_string())),
            Err(_) => {
                return Err(unreachable(
                    peer,
                    &format!(
                        "no connection within {} ms",
                        config.connect_timeout.as_millis()
                    ),
                ))
            }
        };
    // Requests are small and latency matters more than packet count.
    let _ = stream.set_nodelay(true);
    let refused = |reason| PeerError::Refused {
        peer: peer.clone(),
        reason,
    };
    match tokio::time::timeout(
        config.handshake_timeout,
        handshake::dial(&mut stream, config),
    )
    .await
    {
        Ok(Ok(proved)) => Ok((stream, proved)),
        Ok(Err(HandshakeError::WeRefused(reason))) => {
            handshake::refuse(&mut stream, reason).await;
            Err(refused(reason))
        }
        Ok(Err(HandshakeError::TheyRefused(reason))) => Err(refused(reason)),
        Ok(Err(HandshakeError::Io(error))) => {
            Err(unreachable(peer, &format!("handshake failed: {error}")))
        }
        Err(_) => {
            handshake::refuse(&mut stream, RefusalReason::HandshakeTimeout).await;
            Err(refused(RefusalReason::HandshakeTimeout))
        }
    }
}

type Pending<Resp> = Arc<Mutex<HashMap<u64, Responder<Resp>>>>;

/// Runs one authenticated connection until it fails. Returns the error that the calls
/// in flight got, and why the connection ended.
async fn serve<Req: PeerMessage, Resp: PeerMessage>(
    peer: &HostAddr,
    stream: TcpStream,
    config: &PeerConfig,
    inbox: &mut mpsc::Receiver<Outgoing<Req, Resp>>,
) -> (PeerError, String) {
    let (reader, mut writer) = stream.into_split();
    let pending: Pending<Resp> = Arc::default();
    let mut read_task = tokio::spawn(read_responses(
        peer.clone(),
        reader,
        Arc::clone(&pending),
        config.liveness_timeout,
    ));
    let lost = || PeerError::ConnectionLost { peer: peer.clone() };
    let ping_interval = config.ping_interval();
    let mut ping = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_id: u64 = 0;
    let mut out = Vec::with_capacity(READ_BUFFER_BYTES);
    let ended = loop {
        out.clear();
        tokio::select! {
            outgoing = inbox.recv() => {
                let Some(first) = outgoing else {
                    break (lost(), "the pool was dropped".to_string());
                };
                encode_requests(peer, config, &pending, &mut next_id, Some(first), inbox, &mut out);
                // Calls made by tasks that are ready to run now go out in the same write:
                // the other tasks run once before the frames are written.
                tokio::task::yield_now().await;
                encode_requests(peer, config, &pending, &mut next_id, None, inbox, &mut out);
            }
            _ = ping.tick() => {
                if let Err(error) = encode_frame(&RequestFrame::<()>::Ping, &mut out) {
                    break (lost(), format!("cannot encode a ping: {error}"));
                }
            }
            ended = &mut read_task => {
                break ended.unwrap_or_else(|error| (lost(), format!("reader failed: {error}")));
            }
        }
        if out.is_empty() {
            continue;
        }
        tokio::select! {
            written = write_all_unless_stalled(&mut writer, &out, config.liveness_timeout) => {
                if let Err(error) = written {
                    break (lost(), format!("write failed: {error}"));
                }
            }
            ended = &mut read_task => {
                break ended.unwrap_or_else(|error| (lost(), format!("reader failed: {error}")));
            }
        }
        if out.capacity() > MAX_WRITE_BATCH_BYTES * 2 {
            out = Vec::with_capacity(READ_BUFFER_BYTES);
        }
    };
    read_task.abort();
    let (error, _) = &ended;
    for (_, responder) in lock(&pending).drain() {
        let _ = responder.send(Err(error.clone()));
    }
    ended
}

/// Encodes `first` and then every call already queued, while the batch is under
/// [`MAX_WRITE_BATCH_BYTES`], into `out`, and records their responders under fresh ids.
fn encode_requests<Req: PeerMessage, Resp: PeerMessage>(
    peer: &HostAddr,
    config: &PeerConfig,
    pending: &Pending<Resp>,
    next_id: &mut u64,
    first: Option<Outgoing<Req, Resp>>,
    inbox: &mut mpsc::Receiver<Outgoing<Req, Resp>>,
    out: &mut Vec<u8>,
) {
    let mut pending = lock(pending);
    if pending.len() > 2 * config.in_flight_limit() {
        // Calls that timed out no longer need their answers.
        pending.retain(|_, responder| !responder.is_closed());
    }
    let room = out.len() < MAX_WRITE_BATCH_BYTES;
    let mut next = first.or_else(|| if room { inbox.try_recv().ok() } else { None });
    while let Some(Outgoing { request, responder }) = next {
        if !responder.is_closed() {
            *next_id += 1;
            let frame = RequestFrame::Call {
                id: *next_id,
                request: &request,
            };
            match encode_frame(&frame, out) {
                Ok(()) => {
                    pending.insert(*next_id, responder);
                }
                Err(error) => {
                    let _ = responder.send(Err(PeerError::Protocol {
                        peer: peer.clone(),
                        reason: format!("cannot send the request: {error}"),
                    }));
                }
            }
        }
        next = if out.len() < MAX_WRITE_BATCH_BYTES {
            inbox.try_recv().ok()
        } else {
            None
        };
    }
}

/// Reads response frames and completes their calls, until the connection fails.
async fn read_responses<Resp: PeerMessage>(
    peer: HostAddr,
    mut reader: OwnedReadHalf,
    pending: Pending<Resp>,
    liveness_timeout: Duration,
) -> (PeerError, String) {
    let lost = || PeerError::ConnectionLost { peer: peer.clone() };
    let complete = |id, result| {
        if let Some(responder) = lock(&pending).remove(&id) {
            let _ = responder.send(result);
        }
    };
    let mut buffer = Vec::with_capacity(READ_BUFFER_BYTES);
    loop {
        match tokio::time::timeout(liveness_timeout, reader.read_buf(&mut buffer)).await {
            Ok(Ok(0)) => return (lost(), "closed by the peer".to_string()),
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return (lost(), format!("read failed: {error}")),
            Err(_) => {
                return (
                    lost(),
                    format!("nothing received for {} ms", liveness_timeout.as_millis()),
                )
            }
        }
        let mut consumed = 0;
        loop {
            match decode_frame::<ResponseFrame<Resp>>(&buffer[consumed..]) {
                Ok(Some((frame, used))) => {
                    consumed += used;
                    match frame {
                        ResponseFrame::Reply { id, response } => complete(id, Ok(response)),
                        ResponseFrame::Failed { id, reason } => complete(
                            id,
                            Err(PeerError::Protocol {
                                peer: peer.clone(),
                                reason: format!("the peer cannot send its response: {reason}"),
                            }),
                        ),
                        ResponseFrame::Pong => {}
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    let reason = format!("malformed frame: {error}");
                    let error = PeerError::Protocol {
                        peer: peer.clone(),
                        reason: reason.clone(),
                    };
                    return (error, reason);
                }
            }
        }
        buffer.drain(..consumed);
        shrink_read_buffer(&mut buffer);
    }
}

//! The accepting side: authenticates each inbound connection and answers its requests.
//!
//! Each connection has a task that runs the handshake, then reads request frames and
//! runs the handler for each in a task of its own, holding one of the connection's
//! [`PeerConfig::max_in_flight`] slots; with every slot taken it stops reading, which
//! pushes back on the dialer. Responses are written in the order they complete, those
//! ready together in one write (as the dialer writes its requests). A
//! malformed frame closes that connection only.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use shoal_shared::frame::{decode_frame, encode_frame};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tracing::Instrument;

use super::handshake::{self, HandshakeError, Hello, Role, TAG_REFUSAL};
use super::{
    shrink_read_buffer, write_all_unless_stalled, HostAddr, PeerConfig, PeerHandler, PeerMessage,
    RefusalReason, RequestFrame, ResponseFrame, MAX_WRITE_BATCH_BYTES, READ_BUFFER_BYTES,
};

/// Room in a connection's reply queue beyond one reply per slot, for pongs.
const PONG_SLACK: usize = 64;

/// A bound peer listener. Dropping it stops accepting and closes its connections;
/// handlers already running finish on their own.
pub(crate) struct PeerListener {
    #[cfg_attr(not(test), expect(dead_code, reason = "read by the unit tests only"))]
    local_addr: SocketAddr,
    #[cfg_attr(not(test), expect(dead_code, reason = "read by the unit tests only"))]
    open_connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl PeerListener {
    /// Binds `address` and serves peers that prove `config.secret`, answering their
    /// requests with `handler`.
    pub(crate) async fn bind<Req, Resp, H>(
        address: SocketAddr,
        config: PeerConfig,
        handler: H,
    ) -> io::Result<PeerListener>
    where
        Req: PeerMessage,
        Resp: PeerMessage,
        H: PeerHandler<Req, Resp>,
    {
        let listener = TcpListener::bind(address).await?;
        let local_addr = listener.local_addr()?;
        let open_connections = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(accept_loop(
            listener,
            Arc::new(config),
            Arc::new(handler),
            Arc::clone(&open_connections),
        ));
        tracing::info!(address = %local_addr, "peer listener bound");
        Ok(PeerListener {
            local_addr,
            open_connections,
            task,
        })
    }

    #[cfg(test)]
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Inbound connections open now, those still in their handshake included.
    #[cfg(test)]
    pub(crate) fn open_connections(&self) -> usize {
        self.open_connections.load(Ordering::Acquire)
    }
}

impl Drop for PeerListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Counts a connection as open for as long as it lives.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(counter: &Arc<AtomicUsize>) -> OpenConnection {
        counter.fetch_add(1, Ordering::AcqRel);
        OpenConnection(Arc::clone(counter))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn accept_loop<Req, Resp, H>(
    listener: TcpListener,
    config: Arc<PeerConfig>,
    handler: Arc<H>,
    open_connections: Arc<AtomicUsize>,
) where
    Req: PeerMessage,
    Resp: PeerMessage,
    H: PeerHandler<Req, Resp>,
{
    // Dropping the set (when the listener is dropped) aborts every connection task.
    let mut connections = JoinSet::new();
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "peer accept failed");
                // Out of file descriptors, most likely: back off instead of spinning.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        if connections.len() >= config.max_inbound_connections {
            let reason = RefusalReason::TooManyConnections;
            tracing::warn!(remote = %remote, reason = %reason, "refused a peer connection");
            refuse_at_once(&stream, &config, reason);
            continue;
        }
        let open = OpenConnection::new(&open_connections);
        connections.spawn(serve_connection(
            stream,
            remote,
            Arc::clone(&config),
            Arc::clone(&handler),
            open,
        ));
    }
}

/// Tells a connection it is refused, without waiting for it: a hello and the refusal,
/// if the socket takes them now.
fn refuse_at_once(stream: &TcpStream, config: &PeerConfig, reason: RefusalReason) {
    if let Ok(hello) = Hello::new(Role::Acceptor, config.identity.clone()) {
        let mut bytes = hello.encode();
        bytes.extend_from_slice(&[TAG_REFUSAL, reason.code()]);
        let _ = stream.try_write(&bytes);
    }
}

async fn serve_connection<Req, Resp, H>(
    mut stream: TcpStream,
    remote: SocketAddr,
    config: Arc<PeerConfig>,
    handler: Arc<H>,
    _open: OpenConnection,
) where
    Req: PeerMessage,
    Resp: PeerMessage,
    H: PeerHandler<Req, Resp>,
{
    let _ = stream.set_nodelay(true);
    let handshake = tokio::time::timeout(
        config.handshake_timeout,
        handshake::accept(&mut stream, &config),
    )
    .await;
    let peer = match handshake {
        Ok(Ok(peer)) => peer,
        Ok(Err(HandshakeError::WeRefused(reason))) => {
            tracing::warn!(remote = %remote, reason = %reason, "refused a peer connection");
            handshake::refuse(&mut stream, reason).await;
            return;
        }
        Ok(Err(HandshakeError::TheyRefused(reason))) => {
            tracing::warn!(remote = %remote, reason = %reason, "a peer refused this host");
            return;
        }
        Ok(Err(HandshakeError::Io(error))) => {
            tracing::info!(remote = %remote, %error, "peer handshake failed");
            return;
        }
        Err(_) => {
            let reason = RefusalReason::HandshakeTimeout;
            tracing::warn!(remote = %remote, reason = %reason, "refused a peer connection");
            handshake::refuse(&mut stream, reason).await;
            return;
        }
    };
    tracing::info!(remote = %remote, peer = %peer, "peer connected");
    let (reader, writer) = stream.into_split();
    let (replies, outbox) = mpsc::channel(config.in_flight_limit() + PONG_SLACK);
    let ended = tokio::select! {
        ended = read_requests(reader, &peer, &config, handler, replies) => ended,
        ended = write_responses(writer, outbox, &config) => ended,
    };
    match ended {
        Ended::Normally(why) => {
            tracing::info!(remote = %remote, peer = %peer, reason = %why, "peer connection closed")
        }
        Ended::Fault(why) => {
            tracing::warn!(remote = %remote, peer = %peer, reason = %why, "closed a peer connection")
        }
    }
}

/// Why a connection ended.
enum Ended {
    /// The peer closed it, or the socket failed.
    Normally(String),
    /// The peer broke the protocol or stopped answering.
    Fault(String),
}

async fn read_requests<Req, Resp, H>(
    mut reader: OwnedReadHalf,
    peer: &HostAddr,
    config: &PeerConfig,
    handler: Arc<H>,
    replies: mpsc::Sender<ResponseFrame<Resp>>,
) -> Ended
where
    Req: PeerMessage,
    Resp: PeerMessage,
    H: PeerHandler<Req, Resp>,
{
    let slots = Arc::new(Semaphore::new(config.in_flight_limit()));
    let mut buffer = Vec::with_capacity(READ_BUFFER_BYTES);
    loop {
        match tokio::time::timeout(config.liveness_timeout, reader.read_buf(&mut buffer)).await {
            Ok(Ok(0)) => return Ended::Normally("closed by the peer".to_string()),
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Ended::Normally(format!("read failed: {error}")),
            Err(_) => {
                return Ended::Fault(format!(
                    "nothing received for {} ms",
                    config.liveness_timeout.as_millis()
                ))
            }
        }
        let mut consumed = 0;
        loop {
            let frame = match decode_frame::<RequestFrame<Req>>(&buffer[consumed..]) {
                Ok(Some((frame, used))) => {
                    consumed += used;
                    frame
                }
                Ok(None) => break,
                Err(error) => return Ended::Fault(format!("malformed frame: {error}")),
            };
            match frame {
                RequestFrame::Call { id, request } => {
                    let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                        return Ended::Normally("the slots were closed".to_string());
                    };
                    let handler = Arc::clone(&handler);
                    let replies = replies.clone();
                    let from = peer.clone();
                    let span = tracing::debug_span!("peer_request", peer = %from, id);
                    let run = async move {
                        let response = handler.handle(from, request).await;
                        let _ = replies.send(ResponseFrame::Reply { id, response }).await;
                        drop(slot);
                    };
                    tokio::spawn(run.instrument(span));
                }
                RequestFrame::Ping => {
                    if replies.send(ResponseFrame::Pong).await.is_err() {
                        return Ended::Normally("the writer stopped".to_string());
                    }
                }
            }
        }
        buffer.drain(..consumed);
        shrink_read_buffer(&mut buffer);
    }
}

async fn write_responses<Resp: PeerMessage>(
    mut writer: OwnedWriteHalf,
    mut outbox: mpsc::Receiver<ResponseFrame<Resp>>,
    config: &PeerConfig,
) -> Ended {
    let mut out = Vec::with_capacity(READ_BUFFER_BYTES);
    while let Some(first) = outbox.recv().await {
        out.clear();
        encode_responses(Some(first), &mut outbox, &mut out);
        // Replies of handlers that are ready to run now go out in the same write: the
        // other tasks run once before the frames are written.
        tokio::task::yield_now().await;
        encode_responses(None, &mut outbox, &mut out);
        if let Err(error) =
            write_all_unless_stalled(&mut writer, &out, config.liveness_timeout).await
        {
            return Ended::Normally(format!("write failed: {error}"));
        }
        if out.capacity() > MAX_WRITE_BATCH_BYTES * 2 {
            out = Vec::with_capacity(READ_BUFFER_BYTES);
        }
    }
    Ended::Normally("no more responses".to_string())
}

/// Encodes `first` and then every reply already queued, while the batch is under
/// [`MAX_WRITE_BATCH_BYTES`].
fn encode_responses<Resp: PeerMessage>(
    first: Option<ResponseFrame<Resp>>,
    outbox: &mut mpsc::Receiver<ResponseFrame<Resp>>,
    out: &mut Vec<u8>,
) {
    let room = out.len() < MAX_WRITE_BATCH_BYTES;
    let mut next = first.or_else(|| if room { outbox.try_recv().ok() } else { None });
    while let Some(frame) = next {
        encode_response(frame, out);
        next = if out.len() < MAX_WRITE_BATCH_BYTES {
            outbox.try_recv().ok()
        } else {
            None
        };
    }
}

/// Appends `frame`; a reply that cannot be encoded (too large) becomes a `Failed`.
fn encode_response<Resp: PeerMessage>(frame: ResponseFrame<Resp>, out: &mut Vec<u8>) {
    let Err(error) = encode_frame(&frame, out) else {
        return;
    };
    tracing::error!(%error, "cannot encode a response to a peer");
    if let ResponseFrame::Reply { id, .. } = frame {
        let failed = ResponseFrame::<()>::Failed {
            id,
            reason: error.to_string(),
        };
        if let Err(error) = encode_frame(&failed, out) {
            tracing::error!(%error, "cannot encode a failure to a peer");
        }
    }
}

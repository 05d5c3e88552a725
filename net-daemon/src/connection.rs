//! One client connection: read bytes, parse requests, dispatch, write replies.
//!
//! Every complete request in the read buffer (up to
//! [`MAX_PIPELINE_IN_FLIGHT`]) is dispatched before any reply is awaited, so a
//! pipeline reaches the workers at once; replies are then written in request
//! order in one write. A [`Pending::Barrier`] command (a multi-worker write)
//! runs only after every earlier reply is resolved, and nothing after it is
//! dispatched until it has finished. A protocol error is answered and closes this
//! connection only. On shutdown the connection finishes the requests it has
//! read, replies, and closes.
//!
//! Memory per connection is bounded. A connection does not read further requests
//! while it is writing replies, so a client that stops reading is back-pressured.
//! While replies are being encoded, the unsent bytes of the earlier ones are held to
//! `max_output_buffer_bytes`: once they pass it, whatever the socket accepts at
//! that instant is pushed out without waiting, and if they are still over the limit
//! the connection is closed. A single reply is never cut, so the output of one
//! connection stays below the limit plus one reply; besides it, a connection holds
//! the worker answers of the requests it has dispatched and not yet encoded (at most
//! [`MAX_PIPELINE_IN_FLIGHT`]). Buffers start empty (an idle connection waits for
//! readability without one), grow with the traffic, and are released once a large
//! request or reply has gone through.

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BytesMut};
use shoal_shared::limits::MAX_PIPELINE_IN_FLIGHT;
use shoal_shared::resp::{parse_request, Protocol, Reply, RequestLimits};
use shoal_shared::status::Field;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::clients::Client;
use crate::commands::{dispatch, After, Pending, Session};
use crate::databases::Ticket;
use crate::pubsub::message_size;
use crate::state::Shared;
use crate::table::{index_of_request, COMMANDS};
use std::sync::Arc;
use std::time::Instant;

const READ_BUFFER_BYTES: usize = 16 * 1024;
/// Input read ahead while a reply is waiting (a blocked client that keeps sending).
const WAITING_INPUT_BYTES: usize = 1024 * 1024;

/// A buffer that has grown past this is released once it is empty again, so that one
/// large request or reply does not pin memory for the rest of the connection.
const KEEP_BUFFER_BYTES: usize = 256 * 1024;

/// A client's socket: TCP or Unix. Readiness can be awaited without a buffer, so an
/// idle connection holds none.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + Sync {
    /// Ready when a read would not block (data, end of stream, or an error).
    fn poll_read_ready(&self, context: &mut Context<'_>) -> Poll<std::io::Result<()>>;

    /// The client's address and this end's, as CLIENT LIST shows them.
    fn addresses(&self) -> (String, String);
}

impl ClientStream for tokio::net::TcpStream {
    fn poll_read_ready(&self, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        tokio::net::TcpStream::poll_read_ready(self, context)
    }

    fn addresses(&self) -> (String, String) {
        let show = |addr: std::io::Result<std::net::SocketAddr>| {
            addr.map(|addr| addr.to_string()).unwrap_or_default()
        };
        (show(self.peer_addr()), show(self.local_addr()))
    }
}

impl ClientStream for tokio::net::UnixStream {
    fn poll_read_ready(&self, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        tokio::net::UnixStream::poll_read_ready(self, context)
    }

    fn addresses(&self) -> (String, String) {
        let path = self
            .local_addr()
            .ok()
            .and_then(|addr| addr.as_pathname().map(|p| p.display().to_string()))
            .unwrap_or_default();
        (format!("{path}:0"), format!("{path}:0"))
    }
}

/// Keeps a connection in the registry of open clients while it lives.
struct Registered<'a> {
    shared: &'a Shared,
    client: Arc<Client>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.shared.clients.close(self.client.id);
    }
}

/// A reply in flight, with its protocol and, for a known command, the command's index and
/// when it was dispatched (for the command statistics).
/// The reply holds a share of the batch's database ticket until it is made
/// ([`crate::databases`]).
type InFlight = (Pending, Protocol, Option<(usize, Instant)>, Option<Ticket>);

/// Serves one client until it closes, errs, sends QUIT, or the daemon shuts down.
pub async fn serve<S>(shared: &Arc<Shared>, mut stream: S, mut shutdown: watch::Receiver<bool>)
where
    S: ClientStream,
{
    let mut session = Session::new(shared.next_client_id(), shared.requirepass().is_none());
    let (addr, laddr) = stream.addresses();
    let registered = Registered {
        shared,
        client: shared.clients.open(session.id, addr, laddr),
    };
    let client = Arc::clone(&registered.client);
    let authenticated_limits = shared.config.request_limits();
    let max_output_bytes = shared.config.client.max_output_buffer_bytes;
    // Empty until used: an idle connection holds no buffers.
    let mut input = BytesMut::new();
    let mut output = BytesMut::new();
    let mut pending: Vec<InFlight> = Vec::new();
    loop {
        let mut after = After::Continue;
        // When the batch's first request was taken (its commands' latency counts from
        // there), and the batch's last command (what CLIENT LIST shows).
        let mut batch_started = None;
        let mut last_command = None;
        while pending.len() < MAX_PIPELINE_IN_FLIGHT {
            let limits = if session.authenticated {
                &authenticated_limits
            } else {
                &RequestLimits::UNAUTHENTICATED
            };
            match parse_request(&mut input, limits) {
                Ok(Some(args)) if args.is_empty() => continue,
                Ok(Some(args)) => {
                    let index = index_of_request(&args[0]);
                    let started = *batch_started.get_or_insert_with(Instant::now);
                    let timing = index.map(|index| (index, started));
                    let command = index.map_or("NULL", |index| COMMANDS[index].name);
                    if command == "client" {
                        // CLIENT LIST and CLIENT INFO show this command as running, as Redis does.
                        client.ran(session.client_state(command));
                    }
                    if session.ticket.is_none() {
                        session.enter(shared.databases.ticket().await);
                    }
                    let (reply, next) = dispatch(shared, &mut session, index, args).await;
                    last_command = Some(command);
                    if next == After::CloseWithoutReply {
                        after = After::Close;
                        break;
                    }
                    let barrier = matches!(reply, Pending::Barrier(_) | Pending::Blocking(_));
                    if !matches!(reply, Pending::Ready(_)) {
                        match command {
                            "get" | "mget" => session.behind_reads = true,
                            _ => session.direct_reads = false,
                        }
                    }
                    let ticket = match reply {
                        Pending::Blocking(_) => None,
                        _ => session.ticket.clone(),
                    };
                    pending.push((reply, session.protocol, timing, ticket));
                    if next == After::Close {
                        after = After::Close;
                        break;
                    }
                    if barrier {
                        // Nothing after a barrier is dispatched until it has run.
                        break;
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::debug!(client = session.id, error = %error.0, "protocol error; closing the connection");
                    pending.push((Pending::Ready(error.reply()), session.protocol, None, None));
                    after = After::Close;
                    break;
                }
            }
        }
        if let Some(command) = last_command {
            client.ran(session.client_state(command));
        }
        // The replies in flight keep the ticket until they are made.
        session.ticket = None;

        if pending.is_empty() {
            if *shutdown.borrow() || after == After::Close {
                return;
            }
            if input.is_empty() {
                if input.capacity() > KEEP_BUFFER_BYTES {
                    input = BytesMut::new();
                }
                // Between requests, wait without a buffer: idle connections cost no memory
                // beyond their task and socket.
                tokio::select! {
                    ready = std::future::poll_fn(|context| stream.poll_read_ready(context)) => {
                        if ready.is_err() {
                            return;
                        }
                    }
                    push = next_push(&mut session) => {
                        if !send_pushes(&mut stream, &mut session, &client, push, &mut output).await {
                            return;
                        }
                        continue;
                    }
                    _ = client.killed() => return,
                    _ = shutdown.changed() => return,
                }
            }
            if input.capacity() - input.len() < READ_BUFFER_BYTES / 4 {
                input.reserve(READ_BUFFER_BYTES);
            }
            tokio::select! {
                read = stream.read_buf(&mut input) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                },
                push = next_push(&mut session) => {
                    if !send_pushes(&mut stream, &mut session, &client, push, &mut output).await {
                        return;
                    }
                    continue;
                }
                _ = client.killed() => return,
                _ = shutdown.changed() => return,
            }
        }

        shared
            .status
            .net_daemon_slot()
            .add(Field::Ops, pending.len() as u64);
        session.direct_reads = true;
        session.behind_reads = false;
        // The latency of the replies that were ready at dispatch: one clock read for all.
        let mut ready_after = None;
        for (reply, protocol, timing, _ticket) in pending.drain(..) {
            if output.len() > max_output_bytes {
                match push_without_waiting(&mut stream, &output) {
                    Ok(sent) => output.advance(sent),
                    Err(_) => return,
                }
                if output.len() > max_output_bytes {
                    tracing::info!(
                        client = session.id,
                        unsent_bytes = output.len(),
                        max_output_buffer_bytes = max_output_bytes,
                        "client does not read its replies; closing the connection"
                    );
                    return;
                }
            }
            let was_ready = matches!(reply, Pending::Ready(_));
            let reply = match reply {
                Pending::Ready(reply) => reply,
                // A reply may wait long (a blocking pop): meanwhile a client that hangs up
                // or is killed ends the connection, and what it sends is read for later.
                reply => {
                    let mut resolving = std::pin::pin!(reply.resolve());
                    loop {
                        tokio::select! {
                            reply = &mut resolving => break reply,
                            read = stream.read_buf(&mut input), if input.len() < WAITING_INPUT_BYTES => {
                                match read {
                                    Ok(0) | Err(_) => return,
                                    Ok(_) => continue,
                                }
                            }
                            _ = client.killed() => return,
                        }
                    }
                }
            };
            // Messages queued before this reply was made go out ahead of it: a client that
            // unsubscribes gets the messages of its channels before the confirmation.
            if !queue_pushes(&mut session, None, &mut output) {
                return;
            }
            if let Some((index, started)) = timing {
                let took = match was_ready {
                    true => *ready_after.get_or_insert_with(|| started.elapsed()),
                    false => started.elapsed(),
                };
                shared.command_stats.record(index, took, reply.is_error());
            }
            reply.encode(protocol, &mut output);
        }
        // Messages that came in meanwhile go out with the replies.
        if !queue_pushes(&mut session, None, &mut output) {
            return;
        }
        // A client that stopped reading blocks this write; CLIENT KILL still closes it.
        let written = tokio::select! {
            written = stream.write_all(&output) => written.is_ok(),
            _ = client.killed() => false,
        };
        if !written {
            return;
        }
        output.clear();
        if output.capacity() > KEEP_BUFFER_BYTES {
            output = BytesMut::new();
        }
        if after == After::Close || client.is_killed() {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// The next pub/sub message for this connection; never, for one that has not subscribed.
async fn next_push(session: &mut Session) -> Option<Reply> {
    match session.subscriber.as_mut() {
        Some(subscriber) => subscriber.next().await,
        None => std::future::pending().await,
    }
}

/// Encodes `first` and every other message already waiting into `output`; false when
/// the subscriber was cut off for falling behind (the connection then closes).
fn queue_pushes(session: &mut Session, first: Option<Reply>, output: &mut BytesMut) -> bool {
    let protocol = session.protocol;
    let Some(subscriber) = session.subscriber.as_mut() else {
        return true;
    };
    let mut next = first;
    loop {
        if let Some(push) = next.take() {
            push.encode(protocol, output);
            subscriber.written(message_size(&push));
        }
        match subscriber.try_next() {
            Some(push) => next = Some(push),
            None => break,
        }
    }
    if subscriber.cut_off() {
        log_cut_off(session.id);
        return false;
    }
    true
}

fn log_cut_off(client: u64) {
    tracing::info!(
        client,
        "subscriber does not read its messages fast enough; closing the connection"
    );
}

/// Writes out `push` and the messages waiting behind it; false when the connection must
/// close (cut off, or the socket failed).
async fn send_pushes<S: ClientStream>(
    stream: &mut S,
    session: &mut Session,
    client: &Client,
    push: Option<Reply>,
    output: &mut BytesMut,
) -> bool {
    if !queue_pushes(session, push, output) {
        return false;
    }
    let Some(queue) = session.subscriber.as_ref().map(|s| s.queue()) else {
        return true;
    };
    // A client that does not read blocks this write; once its queue overflows it is
    // cut off, and the connection closes instead of waiting on (as it does when killed).
    let written = tokio::select! {
        written = stream.write_all(output) => written.is_ok(),
        _ = queue.cut_off() => {
            log_cut_off(session.id);
            false
        }
        _ = client.killed() => false,
    };
    output.clear();
    if output.capacity() > KEEP_BUFFER_BYTES {
        *output = BytesMut::new();
    }
    written
}

/// Writes as much of `bytes` as the socket accepts right now, without waiting for it to
/// become writable; returns how many bytes were written.
fn push_without_waiting<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
) -> std::io::Result<usize> {
    let mut context = Context::from_waker(Waker::noop());
    let mut sent = 0;
    while sent < bytes.len() {
        match Pin::new(&mut *stream).poll_write(&mut context, &bytes[sent..]) {
            Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(written)) => sent += written,
            Poll::Ready(Err(error)) => return Err(error),
            Poll::Pending => break,
        }
    }
    Ok(sent)
}

/// Refuses a connection over `max_connections` with Redis's error, then closes it.
pub async fn refuse<S: AsyncWrite + Unpin>(mut stream: S) {
    let mut output = BytesMut::new();
    crate::errors::max_clients().encode(Protocol::Resp2, &mut output);
    let _ = stream.write_all(&output).await;
    let _ = stream.shutdown().await;
}

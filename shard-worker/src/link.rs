//! The worker's end of the net-daemon link: a Unix socket listener and its connections,
//! read by the apply loop itself, and a [`Replier`] per connection.
//!
//! The apply loop asks the [`Link`] for requests: it waits in `poll(2)` on the listener
//! and every connection, reads what arrived, and decodes it into the requests of the
//! next batch. No thread stands between the socket and the apply loop, so a request
//! costs no hand-off on the way in, and a worker busy with a batch reads nothing: the
//! net-daemon's writes wait in the socket's buffer (back-pressure). The apply loop also
//! writes the responses of a batch itself, in one write per connection, through the
//! connection's `Replier`: no hand-off on the way back either. (The net-daemon reads its
//! end of the link in a task of its own, so the write never waits on the net-daemon's
//! own writes.) A malformed frame closes that connection only.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, MsgFlags};
use shoal_shared::frame::{
    decode_frame, encode_frame, RequestEnvelope, ResponseEnvelope, WorkerError, WorkerRequest,
    WorkerResponse,
};

/// The most bytes read from one connection at a time.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// A request waiting to be applied, with the way back to its connection.
pub(crate) struct Queued {
    pub(crate) id: u64,
    pub(crate) request: WorkerRequest,
    pub(crate) reply: Arc<Replier>,
}

/// The way back to one net-daemon connection: responses are written to its socket by
/// whoever has them (the apply loop, a backup thread).
pub(crate) struct Replier {
    stream: Mutex<UnixStream>,
}

impl Replier {
    /// Writes `envelopes` in one write. A failed write only means that the net-daemon went
    /// away (the link then drops the connection); what was applied stays applied.
    pub(crate) fn send(&self, envelopes: impl IntoIterator<Item = ResponseEnvelope>) {
        let mut out = Vec::new();
        for envelope in envelopes {
            if let Err(error) = encode_frame(&envelope, &mut out) {
                // Answer anyway, so that the request fails at once instead of timing out.
                tracing::error!(%error, id = envelope.id, "cannot encode a response");
                let failure = ResponseEnvelope {
                    id: envelope.id,
                    response: WorkerResponse::Error(WorkerError::Storage(format!(
                        "cannot send the reply: {error}"
                    ))),
                };
                let _ = encode_frame(&failure, &mut out);
            }
        }
        let mut stream = shoal_shared::lock(&self.stream);
        if let Err(error) = stream.write_all(&out) {
            tracing::warn!(%error, "net-daemon link write failed");
        }
    }

    /// Whether `self` and `other` are the same connection.
    pub(crate) fn same(self: &Arc<Self>, other: &Arc<Replier>) -> bool {
        Arc::ptr_eq(self, other)
    }
}

/// One net-daemon connection: its socket (blocking, read with `MSG_DONTWAIT` once
/// `poll` says it is readable), the bytes of a frame not whole yet, and its replier.
struct Connection {
    stream: UnixStream,
    buffer: Vec<u8>,
    reply: Arc<Replier>,
}

/// The listener, its connections, and the requests read but not taken yet.
pub(crate) struct Link {
    listener: UnixListener,
    connections: Vec<Connection>,
    ready: VecDeque<Queued>,
    chunk: Vec<u8>,
}

impl Link {
    /// Binds the worker's socket.
    pub(crate) fn listen(path: &Path) -> anyhow::Result<Link> {
        // A socket file left by a previous run of this worker is stale: the supervisor's
        // PID file guarantees no other live process serves this data dir.
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(error)
                    .with_context(|| format!("removing stale socket {}", path.display()))
            }
        }
        let listener =
            UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
        listener
            .set_nonblocking(true)
            .context("making the worker's listener non-blocking")?;
        Ok(Link {
            listener,
            connections: Vec::new(),
            ready: VecDeque::new(),
            chunk: vec![0u8; READ_CHUNK_BYTES],
        })
    }

    /// The next request, waiting up to `timeout` for one to arrive.
    pub(crate) fn recv_timeout(&mut self, timeout: Duration) -> Option<Queued> {
        if self.ready.is_empty() {
            self.read(timeout);
        }
        self.ready.pop_front()
    }

    /// The next request that has arrived, without waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Queued> {
        self.recv_timeout(Duration::ZERO)
    }

    /// Waits up to `timeout` until a connection or the listener is readable, then accepts
    /// what connects and reads one chunk from each readable connection.
    fn read(&mut self, timeout: Duration) {
        let readable = {
            let mut fds = vec![PollFd::new(self.listener.as_fd(), PollFlags::POLLIN)];
            fds.extend(
                self.connections
                    .iter()
                    .map(|connection| PollFd::new(connection.stream.as_fd(), PollFlags::POLLIN)),
            );
            // Round up, so that a wait shorter than a millisecond does not spin.
            let millis = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            match poll(
                &mut fds,
                PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(0) => return,
                Ok(_) => {}
                Err(Errno::EINTR) => return,
                Err(error) => {
                    tracing::warn!(%error, "polling the net-daemon links failed");
                    return;
                }
            }
            fds.iter()
                .map(|fd| fd.revents().is_some_and(|events| !events.is_empty()))
                .collect::<Vec<bool>>()
        };
        if readable[0] {
            self.accept();
        }
        let mut closed = Vec::new();
        for (position, ready) in readable[1..].iter().enumerate() {
            if *ready && !self.read_connection(position) {
                closed.push(position);
            }
        }
        for position in closed.into_iter().rev() {
            self.connections.swap_remove(position);
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                // An accepted socket is blocking whatever the listener is: replies are
                // written with plain blocking writes.
                Ok((stream, _)) => match stream.try_clone() {
                    Ok(writer) => self.connections.push(Connection {
                        stream,
                        buffer: Vec::new(),
                        reply: Arc::new(Replier {
                            stream: Mutex::new(writer),
                        }),
                    }),
                    Err(error) => tracing::warn!(%error, "cannot serve a net-daemon connection"),
                },
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    return;
                }
            }
        }
    }

    /// Reads one chunk from connection `position` and queues the requests it completes.
    /// False once the connection is over: closed by the net-daemon, failed, or sent a
    /// malformed frame.
    fn read_connection(&mut self, position: usize) -> bool {
        let connection = &mut self.connections[position];
        let read = match recv(
            connection.stream.as_raw_fd(),
            &mut self.chunk,
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => return false,
            Ok(read) => read,
            Err(Errno::EAGAIN | Errno::EINTR) => return true,
            Err(error) => {
                tracing::warn!(%error, "net-daemon link read failed");
                return false;
            }
        };
        connection.buffer.extend_from_slice(&self.chunk[..read]);
        let mut consumed = 0;
        loop {
            match decode_frame::<RequestEnvelope>(&connection.buffer[consumed..]) {
                Ok(Some((envelope, used))) => {
                    consumed += used;
                    self.ready.push_back(Queued {
                        id: envelope.id,
                        request: envelope.request,
                        reply: Arc::clone(&connection.reply),
                    });
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::error!(%error, "malformed frame from the net-daemon; closing the link");
                    let _ = connection.stream.shutdown(std::net::Shutdown::Both);
                    return false;
                }
            }
        }
        connection.buffer.drain(..consumed);
        true
    }
}

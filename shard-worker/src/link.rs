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
use std::time::{Duration, Instant};

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
/// How long the apply loop waits after `poll` failed, and how long the listener is left
/// out of the poll after `accept` failed, before trying again.
const FAILED_RETRY: Duration = Duration::from_millis(100);

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
    /// After a failed `accept`, when to poll the listener again.
    accept_paused_until: Option<Instant>,
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
            accept_paused_until: None,
        })
    }

    /// The next request, waiting up to `timeout` for one to arrive. A frame larger than
    /// one read is read to its end if the rest of it is there already.
    pub(crate) fn recv_timeout(&mut self, timeout: Duration) -> Option<Queued> {
        if self.ready.is_empty() && self.read(timeout) {
            while self.ready.is_empty() && self.read(Duration::ZERO) {}
        }
        self.ready.pop_front()
    }

    /// Gives back a request taken but not applied (it ends a batch and opens the next):
    /// it is the next one taken, also by the drain at shutdown.
    pub(crate) fn put_back(&mut self, queued: Queued) {
        self.ready.push_front(queued);
    }

    /// The next request that has arrived, without waiting.
    pub(crate) fn try_recv(&mut self) -> Option<Queued> {
        self.recv_timeout(Duration::ZERO)
    }

    /// Waits up to `timeout` until a connection or the listener is readable, then accepts
    /// what connects and reads one chunk from each readable connection. Whether anything
    /// was read.
    fn read(&mut self, timeout: Duration) -> bool {
        let listening = self
            .accept_paused_until
            .is_none_or(|until| Instant::now() >= until);
        let readable = {
            let mut fds: Vec<PollFd> = self
                .connections
                .iter()
                .map(|connection| PollFd::new(connection.stream.as_fd(), PollFlags::POLLIN))
                .collect();
            if listening {
                fds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
            }
            // Round up, so that a wait shorter than a millisecond does not spin.
            let millis = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32;
            match poll(
                &mut fds,
                PollTimeout::try_from(millis).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(0) => return false,
                Ok(_) => {}
                Err(Errno::EINTR) => return false,
                Err(error) => {
                    tracing::warn!(%error, "polling the net-daemon links failed");
                    std::thread::sleep(FAILED_RETRY);
                    return false;
                }
            }
            fds.iter()
                .map(|fd| fd.revents().is_some_and(|events| !events.is_empty()))
                .collect::<Vec<bool>>()
        };
        let mut read = false;
        let mut closed = Vec::new();
        for (position, ready) in readable[..self.connections.len()].iter().enumerate() {
            if *ready {
                match self.read_connection(position) {
                    Some(bytes) => read |= bytes > 0,
                    None => closed.push(position),
                }
            }
        }
        for position in closed.into_iter().rev() {
            self.connections.swap_remove(position);
        }
        if listening && readable[readable.len() - 1] {
            self.accept();
        }
        read
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                // Replies are written with plain blocking writes.
                Ok((stream, _)) => match stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.try_clone())
                {
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
                    // Out of descriptors, say: the listener stays readable, so it is left
                    // out of the poll for a while rather than woken on at once.
                    tracing::warn!(%error, "accept failed");
                    self.accept_paused_until = Some(Instant::now() + FAILED_RETRY);
                    return;
                }
            }
        }
    }

    /// Reads one chunk from connection `position` and queues the requests it completes;
    /// returns the bytes read. `None` once the connection is over: closed by the
    /// net-daemon, failed, or sent a malformed frame.
    fn read_connection(&mut self, position: usize) -> Option<usize> {
        let connection = &mut self.connections[position];
        let read = match recv(
            connection.stream.as_raw_fd(),
            &mut self.chunk,
            MsgFlags::MSG_DONTWAIT,
        ) {
            Ok(0) => return None,
            Ok(read) => read,
            Err(Errno::EAGAIN | Errno::EINTR) => return Some(0),
            Err(error) => {
                tracing::warn!(%error, "net-daemon link read failed");
                return None;
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
                    return None;
                }
            }
        }
        connection.buffer.drain(..consumed);
        Some(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_shared::frame::Key;
    use std::io::Read;

    fn get(id: u64, key: Vec<u8>) -> Vec<u8> {
        let envelope = RequestEnvelope {
            id,
            request: WorkerRequest::Get {
                collection: 0,
                key: Key {
                    partition: 1,
                    bytes: key,
                },
            },
        };
        let mut out = Vec::new();
        encode_frame(&envelope, &mut out).unwrap();
        out
    }

    fn key_of(queued: &Queued) -> &[u8] {
        match &queued.request {
            WorkerRequest::Get { key, .. } => &key.bytes,
            other => panic!("not a GET: {other:?}"),
        }
    }

    /// A link with `clients` connections, accepted (at a first read that finds nothing
    /// else), and its directory.
    fn connected(clients: usize) -> (tempfile::TempDir, Link, Vec<UnixStream>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.sock");
        let mut link = Link::listen(&path).unwrap();
        let streams = (0..clients)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        assert!(link.recv_timeout(Duration::from_millis(50)).is_none());
        assert_eq!(link.connections.len(), clients);
        (dir, link, streams)
    }

    #[test]
    fn frames_larger_than_a_read_come_whole_and_in_order_without_waiting() {
        let (_dir, mut link, mut clients) = connected(1);
        let client = &mut clients[0];
        let big = vec![7u8; READ_CHUNK_BYTES + READ_CHUNK_BYTES / 2];
        // The first read ends in the middle of the first frame.
        let mut bytes = get(1, big.clone());
        bytes.extend(get(2, b"a".to_vec()));
        bytes.extend(get(3, b"b".to_vec()));
        client.write_all(&bytes).unwrap();
        // All of it is in the socket: what a worker's drain at shutdown takes, with no wait.
        let taken: Vec<Queued> = std::iter::from_fn(|| link.try_recv()).collect();
        let ids: Vec<u64> = taken.iter().map(|queued| queued.id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        assert_eq!(key_of(&taken[0]), &big[..]);
    }

    #[test]
    fn a_malformed_frame_closes_its_connection_only() {
        let (_dir, mut link, clients) = connected(2);
        let [mut good, mut bad]: [UnixStream; 2] = clients.try_into().unwrap();
        // A frame whose payload decodes to no request.
        bad.write_all(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff])
            .unwrap();
        good.write_all(&get(9, b"k".to_vec())).unwrap();
        let mut ids = Vec::new();
        for _ in 0..20 {
            if let Some(queued) = link.recv_timeout(Duration::from_millis(50)) {
                ids.push(queued.id);
            }
            if !ids.is_empty() && link.connections.len() == 1 {
                break;
            }
        }
        assert_eq!(ids, vec![9]);
        assert_eq!(link.connections.len(), 1, "the bad connection is dropped");
        let mut rest = Vec::new();
        assert_eq!(bad.read_to_end(&mut rest).unwrap(), 0, "and closed");
        // The good one still answers.
        let reply = Arc::clone(&link.connections[0].reply);
        reply.send([ResponseEnvelope {
            id: 9,
            response: WorkerResponse::Ok,
        }]);
        let mut header = [0u8; 4];
        good.read_exact(&mut header).unwrap();
    }
}

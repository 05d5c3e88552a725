//! The worker's end of the net-daemon link: a Unix socket listener and, per
//! connection, a reader thread and a [`Replier`].
//!
//! The reader decodes request frames and puts them on the worker's bounded
//! queue (a full queue blocks the reader, which pushes back on the socket). The
//! apply loop writes the responses of a batch itself, in one write per
//! connection, through the connection's `Replier`: no thread hand-off on the way
//! back. (The net-daemon reads its end of the link in a task of its own, so the
//! write never waits on the net-daemon's own writes.) A malformed frame closes
//! that connection only.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;

use anyhow::Context;
use shoal_shared::frame::{
    decode_frame, encode_frame, RequestEnvelope, ResponseEnvelope, WorkerError, WorkerRequest,
    WorkerResponse,
};

/// Requests waiting for the apply loop, over all connections.
const QUEUE_CAPACITY: usize = 16 * 1024;
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
    /// away (its reader then ends the connection); what was applied stays applied.
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

/// Binds the worker's socket and starts accepting connections in the background.
/// Returns the queue the apply loop reads.
pub(crate) fn listen(path: &Path, shutdown: Arc<AtomicBool>) -> anyhow::Result<Receiver<Queued>> {
    // A socket file left by a previous run of this worker is stale: the supervisor's
    // PID file guarantees no other live process serves this data dir.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error).with_context(|| format!("removing stale socket {}", path.display()))
        }
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    let (queue_tx, queue_rx) = mpsc::sync_channel(QUEUE_CAPACITY);
    thread::Builder::new()
        .name("accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                if shutdown.load(Ordering::Acquire) {
                    break;
                }
                match stream {
                    Ok(stream) => {
                        if let Err(error) = spawn_connection(stream, queue_tx.clone()) {
                            tracing::warn!(%error, "cannot serve a net-daemon connection");
                        }
                    }
                    Err(error) => tracing::warn!(%error, "accept failed"),
                }
            }
        })
        .context("spawning the accept thread")?;
    Ok(queue_rx)
}

fn spawn_connection(stream: UnixStream, queue: SyncSender<Queued>) -> std::io::Result<()> {
    let reply = Arc::new(Replier {
        stream: Mutex::new(stream.try_clone()?),
    });
    thread::Builder::new()
        .name("link-read".into())
        .spawn(move || read_requests(stream, queue, reply))?;
    Ok(())
}

fn read_requests(mut stream: UnixStream, queue: SyncSender<Queued>, reply: Arc<Replier>) {
    let mut buffer = Vec::with_capacity(READ_CHUNK_BYTES);
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        let read = match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => {
                tracing::warn!(%error, "net-daemon link read failed");
                return;
            }
        };
        buffer.extend_from_slice(&chunk[..read]);
        let mut consumed = 0;
        loop {
            match decode_frame::<RequestEnvelope>(&buffer[consumed..]) {
                Ok(Some((envelope, used))) => {
                    consumed += used;
                    let queued = Queued {
                        id: envelope.id,
                        request: envelope.request,
                        reply: reply.clone(),
                    };
                    if queue.send(queued).is_err() {
                        return; // the apply loop has stopped
                    }
                }
                Ok(None) => break,
                Err(error) => {
                    tracing::error!(%error, "malformed frame from the net-daemon; closing the link");
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
        buffer.drain(..consumed);
    }
}

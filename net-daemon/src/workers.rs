//! Links from the net-daemon to the local shard-workers.
//!
//! Each worker has one [`WorkerLink`]: a background task that connects to the
//! worker's Unix socket, writes request frames (coalescing whatever is queued
//! into one write, once the connections ready to run have queued theirs), reads
//! response frames, and completes each request by its
//! id. When the worker goes away, every request in flight fails at once with
//! [`LinkError::Lost`], new requests fail at once with [`LinkError::Down`],
//! and the task reconnects with capped backoff. No request ever waits longer
//! than [`REQUEST_TIMEOUT`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use shoal_shared::frame::{
    decode_frame, encode_frame, RequestEnvelope, ResponseEnvelope, WorkerRequest, WorkerResponse,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

/// Longest a request waits for its worker.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests queued for one link before senders wait.
const OUTBOX_CAPACITY: usize = 4096;
const RECONNECT_MIN: Duration = Duration::from_millis(20);
const RECONNECT_MAX: Duration = Duration::from_millis(250);

/// Why a request got no answer from its worker (or, in a cluster, from its partition's owner).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The worker is not connected; the request was not sent.
    #[error("shard-{worker} is down")]
    Down { worker: usize },
    /// The worker went away after the request was sent; a write may or may not have happened.
    #[error("shard-{worker} went down during the request")]
    Lost { worker: usize },
    /// The worker did not answer in time; a write may or may not have happened.
    #[error("shard-{worker} did not answer in time")]
    Timeout { worker: usize },
    /// This host is not a member of its cluster yet, so it knows no partition's owner.
    #[error("this host has not joined its cluster yet")]
    NotJoined,
    /// The host asked does not own the partition; nothing was applied (retried internally).
    #[error("the host asked does not own the partition")]
    Moved,
    /// The partition kept moving, or stayed fenced for a handoff, until the deadline.
    #[error("partition {partition} is moving between hosts")]
    Moving { partition: u16 },
    /// The owning host could not be reached or failed; a write may or may not have happened
    /// if the request had been sent.
    #[error("host {host}: {reason}")]
    Host { host: u64, reason: String },
    /// Too few copies of the partition answered: the write was not started, or was not
    /// acknowledged by enough copies in time (it may or may not be kept).
    #[error("not enough good replicas to write")]
    NoReplicas { started: bool },
    /// This host's copy of the partition cannot serve it now (no lease, or its term is
    /// not open yet); nothing was applied.
    #[error("partition {partition}'s primary is not ready")]
    NotReady { partition: u16 },
}

impl From<shoal_cluster::node::HostUnreachable> for LinkError {
    fn from(error: shoal_cluster::node::HostUnreachable) -> LinkError {
        LinkError::Host {
            host: error.host,
            reason: error.reason,
        }
    }
}

type Responder = oneshot::Sender<Result<WorkerResponse, LinkError>>;

struct Outgoing {
    request: WorkerRequest,
    responder: Responder,
}

/// The link to one worker.
#[derive(Clone)]
pub struct WorkerLink {
    index: usize,
    connected: Arc<AtomicBool>,
    outbox: mpsc::Sender<Outgoing>,
}

/// A request that has been handed to a link; await it with [`Call::wait`].
pub struct Call {
    worker: usize,
    receiver: Result<oneshot::Receiver<Result<WorkerResponse, LinkError>>, LinkError>,
    /// When the request was sent plus [`REQUEST_TIMEOUT`].
    deadline: Instant,
}

impl Call {
    /// A call that failed before it was sent.
    pub fn failed(error: LinkError) -> Call {
        let worker = match error {
            LinkError::Down { worker }
            | LinkError::Lost { worker }
            | LinkError::Timeout { worker } => worker,
            _ => 0,
        };
        Call {
            worker,
            receiver: Err(error),
            deadline: Instant::now(),
        }
    }

    /// A call answered through `receiver` (by a task that follows a partition to its owner).
    pub fn pending(
        receiver: oneshot::Receiver<Result<WorkerResponse, LinkError>>,
        deadline: Instant,
    ) -> Call {
        Call {
            worker: 0,
            receiver: Ok(receiver),
            deadline,
        }
    }

    /// Waits for the response, until [`REQUEST_TIMEOUT`] after the request was sent.
    pub async fn wait(self) -> Result<WorkerResponse, LinkError> {
        let receiver = self.receiver?;
        match tokio::time::timeout_at(self.deadline, receiver).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(LinkError::Lost {
                worker: self.worker,
            }),
            Err(_) => Err(LinkError::Timeout {
                worker: self.worker,
            }),
        }
    }
}

impl WorkerLink {
    /// Starts the link task for worker `index`, whose socket is `path`.
    pub fn start(index: usize, path: PathBuf) -> WorkerLink {
        let (outbox, inbox) = mpsc::channel(OUTBOX_CAPACITY);
        let connected = Arc::new(AtomicBool::new(false));
        tokio::spawn(run_link(index, path, inbox, Arc::clone(&connected)));
        WorkerLink {
            index,
            connected,
            outbox,
        }
    }

    /// Whether the worker is connected now.
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Sends a request; the returned call yields its response. Waiting for room in a
    /// full outbox counts against the request's timeout.
    pub async fn send(&self, request: WorkerRequest) -> Call {
        self.send_with_timeout(request, REQUEST_TIMEOUT).await
    }

    /// [`WorkerLink::send`] with a longer (or shorter) bound than [`REQUEST_TIMEOUT`], for the
    /// few requests that are known to take long (a backup copy).
    pub async fn send_with_timeout(&self, request: WorkerRequest, timeout: Duration) -> Call {
        let deadline = Instant::now() + timeout;
        if !self.is_connected() {
            return Call::failed(LinkError::Down { worker: self.index });
        }
        let (responder, receiver) = oneshot::channel();
        match tokio::time::timeout_at(deadline, self.outbox.send(Outgoing { request, responder }))
            .await
        {
            Ok(Ok(())) => Call {
                worker: self.index,
                receiver: Ok(receiver),
                deadline,
            },
            Ok(Err(_)) => Call::failed(LinkError::Down { worker: self.index }),
            Err(_) => Call::failed(LinkError::Timeout { worker: self.index }),
        }
    }
}

async fn run_link(
    index: usize,
    path: PathBuf,
    mut inbox: mpsc::Receiver<Outgoing>,
    connected: Arc<AtomicBool>,
) {
    let mut backoff = RECONNECT_MIN;
    let mut logged_down = false;
    loop {
        let stream = match UnixStream::connect(&path).await {
            Ok(stream) => stream,
            Err(error) => {
                if !logged_down {
                    tracing::warn!(worker = index, %error, "shard worker unreachable; retrying");
                    logged_down = true;
                }
                fail_queued(&mut inbox);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RECONNECT_MAX);
                continue;
            }
        };
        tracing::info!(worker = index, "connected to shard worker");
        backoff = RECONNECT_MIN;
        logged_down = false;
        connected.store(true, Ordering::Release);
        serve_connection(index, stream, &mut inbox).await;
        connected.store(false, Ordering::Release);
        tracing::warn!(
            worker = index,
            "lost the shard worker; requests for its partitions fail until it is back"
        );
        fail_queued(&mut inbox);
    }
}

/// Answers requests queued while disconnected: dropping their responders fails them as `Lost`.
fn fail_queued(inbox: &mut mpsc::Receiver<Outgoing>) {
    while inbox.try_recv().is_ok() {}
}

/// Moves what is queued into `batch`, up to [`OUTBOX_CAPACITY`] requests in all.
fn take_queued(inbox: &mut mpsc::Receiver<Outgoing>, batch: &mut Vec<Outgoing>) {
    while batch.len() < OUTBOX_CAPACITY {
        match inbox.try_recv() {
            Ok(next) => batch.push(next),
            Err(_) => break,
        }
    }
}

async fn serve_connection(index: usize, stream: UnixStream, inbox: &mut mpsc::Receiver<Outgoing>) {
    let (mut reader, mut writer) = stream.into_split();
    let pending: Arc<Mutex<HashMap<u64, Responder>>> = Arc::default();
    let reader_pending = Arc::clone(&pending);
    let mut read_task = tokio::spawn(async move {
        let mut buffer = Vec::with_capacity(64 * 1024);
        loop {
            match reader.read_buf(&mut buffer).await {
                Ok(0) => return,
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(worker = index, %error, "worker link read failed");
                    return;
                }
            }
            let mut consumed = 0;
            loop {
                match decode_frame::<ResponseEnvelope>(&buffer[consumed..]) {
                    Ok(Some((envelope, used))) => {
                        consumed += used;
                        let responder = reader_pending
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&envelope.id);
                        if let Some(responder) = responder {
                            let _ = responder.send(Ok(envelope.response));
                        }
                    }
                    Ok(None) => break,
                    Err(error) => {
                        tracing::error!(worker = index, %error, "malformed frame from worker; dropping the link");
                        return;
                    }
                }
            }
            buffer.drain(..consumed);
        }
    });

    let mut next_id: u64 = 0;
    let mut out = Vec::with_capacity(64 * 1024);
    loop {
        let first = tokio::select! {
            outgoing = inbox.recv() => match outgoing {
                Some(outgoing) => outgoing,
                None => break,
            },
            _ = &mut read_task => break,
        };
        out.clear();
        let mut batch = vec![first];
        take_queued(inbox, &mut batch);
        // Requests of connections that are ready to run now go out in the same write: the
        // other tasks run once before the frame is written.
        tokio::task::yield_now().await;
        take_queued(inbox, &mut batch);
        {
            let mut pending = pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.len() > OUTBOX_CAPACITY * 4 {
                // Requests whose callers gave up (timed out) no longer need an answer.
                pending.retain(|_, responder| !responder.is_closed());
            }
            for Outgoing { request, responder } in batch {
                next_id += 1;
                let envelope = RequestEnvelope {
                    id: next_id,
                    request,
                };
                match encode_frame(&envelope, &mut out) {
                    Ok(()) => {
                        pending.insert(next_id, responder);
                    }
                    // Dropping the responder fails the request; the frame was not written.
                    Err(error) => {
                        tracing::error!(worker = index, %error, "cannot encode a request")
                    }
                }
            }
        }
        if let Err(error) = writer.write_all(&out).await {
            tracing::warn!(worker = index, %error, "worker link write failed");
            break;
        }
    }
    read_task.abort();
    // Dropping the responders fails every request in flight as `Lost`.
    pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

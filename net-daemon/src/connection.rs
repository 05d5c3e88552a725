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

use bytes::BytesMut;
use shoal_shared::limits::MAX_PIPELINE_IN_FLIGHT;
use shoal_shared::resp::{parse_request, Protocol, RequestLimits};
use shoal_shared::status::Field;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::commands::table::index_of_request;
use crate::commands::{dispatch, After, Pending, Session};
use crate::Shared;
use std::sync::Arc;
use std::time::Instant;

const READ_BUFFER_BYTES: usize = 16 * 1024;

/// A reply in flight, with its protocol and, for a known command, the command's index and
/// when it was dispatched (for the command statistics).
type InFlight = (Pending, Protocol, Option<(usize, Instant)>);

/// Serves one client until it closes, errs, sends QUIT, or the daemon shuts down.
pub async fn serve<S>(shared: &Arc<Shared>, mut stream: S, mut shutdown: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut session = Session {
        id: shared.next_client_id(),
        name: None,
        protocol: Protocol::Resp2,
        collection: 0,
        authenticated: shared.config.client.requirepass.is_none(),
    };
    let authenticated_limits = shared.config.request_limits();
    let mut input = BytesMut::with_capacity(READ_BUFFER_BYTES);
    let mut output = BytesMut::with_capacity(READ_BUFFER_BYTES);
    let mut pending: Vec<InFlight> = Vec::new();
    loop {
        let mut after = After::Continue;
        while pending.len() < MAX_PIPELINE_IN_FLIGHT {
            let limits = if session.authenticated {
                &authenticated_limits
            } else {
                &RequestLimits::UNAUTHENTICATED
            };
            match parse_request(&mut input, limits) {
                Ok(Some(args)) if args.is_empty() => continue,
                Ok(Some(args)) => {
                    let timing = index_of_request(&args[0]).map(|index| (index, Instant::now()));
                    let (reply, next) = dispatch(shared, &mut session, args).await;
                    let barrier = matches!(reply, Pending::Barrier(_));
                    pending.push((reply, session.protocol, timing));
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
                    pending.push((Pending::Ready(error.reply()), session.protocol, None));
                    after = After::Close;
                    break;
                }
            }
        }

        if pending.is_empty() {
            if *shutdown.borrow() {
                return;
            }
            tokio::select! {
                read = stream.read_buf(&mut input) => match read {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                },
                _ = shutdown.changed() => return,
            }
        }

        shared
            .status
            .net_daemon_slot()
            .add(Field::Ops, pending.len() as u64);
        for (reply, protocol, timing) in pending.drain(..) {
            let reply = reply.resolve().await;
            if let Some((index, started)) = timing {
                shared
                    .command_stats
                    .record(index, started.elapsed(), reply.is_error());
            }
            reply.encode(protocol, &mut output);
        }
        if stream.write_all(&output).await.is_err() {
            return;
        }
        output.clear();
        if after == After::Close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// Refuses a connection over `max_connections` with Redis's error, then closes it.
pub async fn refuse<S: AsyncWrite + Unpin>(mut stream: S) {
    let mut output = BytesMut::new();
    crate::errors::max_clients().encode(Protocol::Resp2, &mut output);
    let _ = stream.write_all(&output).await;
    let _ = stream.shutdown().await;
}

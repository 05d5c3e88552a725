//! Listeners and lifecycle of the net-daemon.
//!
//! Binds the TCP and Unix listeners, holds the connection limit (a semaphore
//! of `max_connections` permits), reports readiness and heartbeats in the
//! status table, and on SIGTERM stops accepting, lets every connection
//! finish what it has read, and returns within `drain_timeout_ms`. At start it
//! raises its own open-file limit so that `max_connections` clients fit.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use shoal_shared::config::Config;
use shoal_shared::databases::DatabaseMap;
use shoal_shared::status::{Field, ProcessState, StatusTable};
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{watch, Semaphore};

use crate::connection;
use crate::state::Shared;
use crate::workers::WorkerLink;

/// How long startup waits for every worker link before serving anyway.
const LINK_WAIT: Duration = Duration::from_secs(5);
const HEARTBEAT: Duration = Duration::from_millis(500);
/// File descriptors the daemon needs besides client connections: listeners, worker
/// links, the status table, logs, and the short-lived files of admin commands.
const RESERVED_FDS: u64 = 64;

/// Length of the TCP accept queue (the kernel caps it at `net.core.somaxconn`). A burst of
/// new connections waits here instead of having its SYNs dropped and retried a second later.
const LISTEN_BACKLOG: u32 = 1024;

/// Binds the client TCP listener with [`LISTEN_BACKLOG`].
fn bind_tcp(address: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Raises the soft RLIMIT_NOFILE toward the hard limit when `max_connections` needs
/// more descriptors than the soft limit allows (as Redis does for `maxclients`). If the
/// hard limit is too low, logs a warning with the number of clients that fit: past it,
/// accept fails (EMFILE) and new connections wait in the accept queue unserved.
fn raise_open_file_limit(max_connections: usize, workers: usize) {
    let needed = max_connections as u64 + workers as u64 + RESERVED_FDS;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and has no other effect.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the open-file limit");
        return;
    }
    let Some(wanted) = raised_soft_limit(limit.rlim_cur, limit.rlim_max, needed) else {
        return;
    };
    let raised = libc::rlimit {
        rlim_cur: wanted,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit only reads the struct we pass; raising the soft limit up to the
    // hard limit needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            soft = limit.rlim_cur,
            needed,
            "cannot raise the open-file limit"
        );
        return;
    }
    if wanted < needed {
        tracing::warn!(
            soft = wanted,
            hard = limit.rlim_max,
            needed,
            max_connections,
            clients_that_fit = wanted.saturating_sub(needed - max_connections as u64),
            "the hard open-file limit is below what client.max_connections needs; raise it \
             (LimitNOFILE= in the systemd unit, or ulimit -Hn)"
        );
    } else {
        tracing::info!(
            from = limit.rlim_cur,
            to = wanted,
            "raised the open-file limit"
        );
    }
}

/// The soft open-file limit to set so that `needed` descriptors fit, within the hard
/// limit; `None` when the current soft limit is already enough.
fn raised_soft_limit(soft: u64, hard: u64, needed: u64) -> Option<u64> {
    (soft < needed).then(|| needed.min(hard).max(soft))
}

pub async fn serve(config: Config) -> anyhow::Result<()> {
    raise_open_file_limit(config.client.max_connections, config.workers);
    let status = StatusTable::open(&config.status_path()).context("opening the status table")?;
    status.net_daemon_slot().claim();
    let links: Vec<WorkerLink> = (0..config.workers)
        .map(|i| WorkerLink::start(i, config.worker_socket(i)))
        .collect();
    let deadline = Instant::now() + LINK_WAIT;
    while !links.iter().all(WorkerLink::is_connected) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let tcp = match config.client.listen {
        Some(address) => {
            Some(bind_tcp(address).with_context(|| format!("listening on {address}"))?)
        }
        None => None,
    };
    let unix = match &config.client.unix_socket {
        Some(path) => {
            // The supervisor's PID file guarantees that no live Shoal owns this data dir's
            // socket; a stale one is removed, but never a file that is not a socket.
            use std::os::unix::fs::FileTypeExt;
            match std::fs::symlink_metadata(path) {
                Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
                    .with_context(|| format!("removing the stale socket {}", path.display()))?,
                Ok(_) => anyhow::bail!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                ),
                Err(_) => {}
            }
            Some(
                UnixListener::bind(path)
                    .with_context(|| format!("listening on {}", path.display()))?,
            )
        }
        None => None,
    };

    let max_connections = config.client.max_connections;
    let metrics = match config.metrics_listen {
        Some(address) => Some(
            TcpListener::bind(address)
                .await
                .with_context(|| format!("listening for metrics on {address}"))?,
        ),
        None => None,
    };
    let cluster = shoal_cluster::node::ClusterNode::start(&config)
        .await
        .context("starting the cluster layer")?;
    let databases = DatabaseMap::load_for(&config).map_err(|error| anyhow::anyhow!(error))?;
    let shared = Arc::new(Shared::new(config, links, status, cluster, databases));
    tokio::spawn(crate::txn::recover(
        Arc::clone(&shared.dispatch),
        Arc::clone(&shared.shutting_down),
    ));
    tokio::spawn(crate::handoff::run(
        Arc::clone(&shared.dispatch),
        Arc::clone(&shared.handoffs),
        Arc::clone(&shared.shutting_down),
    ));
    tokio::spawn({
        let shared = Arc::clone(&shared);
        async move {
            let workers = shared.dispatch.links.len();
            let read = || {
                (0..workers)
                    .map(|worker| shared.status.slot(worker).get(Field::Commits))
                    .collect()
            };
            let stop = || shared.shutting_down.load(Ordering::Relaxed);
            shared.blocked.watch_commits(read, stop).await
        }
    });
    let digest_pass = Duration::from_secs(shared.config.cluster.digest_check_secs);
    if let Some(router) = shared
        .dispatch
        .router
        .clone()
        .filter(|_| !digest_pass.is_zero())
    {
        tokio::spawn(crate::digests::run(
            router,
            digest_pass,
            Arc::clone(&shared.shutting_down),
        ));
    }
    if let Some(listener) = metrics {
        tokio::spawn(crate::metrics::serve(Arc::clone(&shared), listener));
    }
    let permits = Arc::new(Semaphore::new(max_connections));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    // Both listeners run the same accept loop; only how a stream is accepted differs.
    if let Some(listener) = tcp.map(Arc::new) {
        tokio::spawn(accept_loop(
            Arc::clone(&shared),
            Arc::clone(&permits),
            shutdown_rx.clone(),
            move || {
                let listener = Arc::clone(&listener);
                async move {
                    let (stream, _) = listener.accept().await?;
                    stream.set_nodelay(true)?;
                    Ok(stream)
                }
            },
        ));
    }
    if let Some(listener) = unix.map(Arc::new) {
        tokio::spawn(accept_loop(
            Arc::clone(&shared),
            Arc::clone(&permits),
            shutdown_rx.clone(),
            move || {
                let listener = Arc::clone(&listener);
                async move { Ok(listener.accept().await?.0) }
            },
        ));
    }

    let slot = shared.status.net_daemon_slot();
    slot.set_state(ProcessState::Ready);
    tracing::info!(
        listen = ?shared.config.client.listen,
        unix_socket = ?shared.config.client.unix_socket,
        "net-daemon ready"
    );

    let mut terminate = signal(SignalKind::terminate())?;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = heartbeat.tick() => {
                slot.beat();
                slot.set(Field::Connections, shared.connections.load(Ordering::Relaxed) as u64);
            }
        }
    }

    tracing::info!("net-daemon draining");
    slot.set_state(ProcessState::Draining);
    shared.shutting_down.store(true, Ordering::Release);
    let _ = shutdown_tx.send(true);
    let drain = Duration::from_millis(shared.config.supervisor.drain_timeout_ms);
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            open = shared.connections.load(Ordering::Relaxed),
            "drain timed out; closing the remaining connections"
        );
    }
    if let Some(path) = &shared.config.client.unix_socket {
        let _ = std::fs::remove_file(path);
    }
    slot.set_state(ProcessState::Stopped);
    Ok(())
}

/// Accepts client streams with `accept` until shutdown, and serves each on a task of its
/// own; past the connection limit a stream gets the max-clients error and is closed.
async fn accept_loop<S, F, Fut>(
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
    accept: F,
) where
    S: connection::ClientStream + Send + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<S>>,
{
    loop {
        let stream = tokio::select! {
            accepted = accept() => match accepted {
                Ok(stream) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    // Out of file descriptors, most likely: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tokio::spawn(connection::refuse(stream));
            continue;
        };
        let (shared, shutdown) = (Arc::clone(&shared), shutdown.clone());
        tokio::spawn(async move {
            shared.connections.fetch_add(1, Ordering::Relaxed);
            crate::routing::in_order(connection::serve(&shared, stream, shutdown)).await;
            shared.connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::raised_soft_limit;

    #[test]
    fn the_soft_open_file_limit_is_raised_only_as_far_as_needed_and_allowed() {
        assert_eq!(raised_soft_limit(1024, 524_288, 10_066), Some(10_066));
        assert_eq!(raised_soft_limit(20_000, 20_000, 10_066), None);
        assert_eq!(raised_soft_limit(10_066, 20_000, 10_066), None);
        // The hard limit caps it: as high as allowed, and the caller warns.
        assert_eq!(raised_soft_limit(1024, 4096, 10_066), Some(4096));
        // Never lowered.
        assert_eq!(raised_soft_limit(1024, 1024, 10_066), Some(1024));
    }
}

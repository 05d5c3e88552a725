//! Metrics: per-command counters and latency histograms kept by the
//! net-daemon, the figures every process keeps in the status table, and the
//! Prometheus text endpoint that serves them all at `/metrics`.
//!
//! Names follow `shoal_<thing>_<unit>`. INFO's `commandstats` and `shards`
//! sections show the same figures in Redis style.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use shoal_shared::frame::{WorkerRequest, WorkerResponse};
use shoal_shared::status::{Field, Role, BATCH_SIZE_BOUNDS, COMMIT_MICROS_BOUNDS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::dispatch::wait_all;
use crate::replication::FollowerLag;

/// A gauge per follower host: its name, its help, and its value.
type Series = (&'static str, &'static str, fn(&FollowerLag) -> u64);
use crate::state::Shared;
use crate::table::COMMANDS;
use crate::table::LATENCY_MICROS_BOUNDS;

/// Longest HTTP request head the endpoint reads.
const MAX_REQUEST_HEAD_BYTES: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `/metrics` on `listener` until the daemon shuts down.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if shared.shutting_down.load(Ordering::Acquire) {
            return;
        }
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let mut head = Vec::with_capacity(1024);
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST_HEAD_BYTES {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(read) => head.extend_from_slice(&buf[..read]),
                    }
                }
                let response = if head.starts_with(b"GET /metrics ") || head.starts_with(b"GET /metrics?") {
                    let body = render(&shared).await;
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 24\r\nConnection: close\r\n\r\nmetrics are at /metrics\n".to_string()
                };
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            })
            .await;
        });
    }
}

/// Writes a Prometheus histogram from per-bucket (non-cumulative) counts.
fn histogram(
    out: &mut String,
    name: &str,
    labels: &str,
    bounds: &[u64],
    scale: f64,
    counts: &[u64],
    sum: f64,
) {
    let mut cumulative = 0;
    let separator = if labels.is_empty() { "" } else { "," };
    for (i, count) in counts.iter().enumerate() {
        cumulative += count;
        let le = bounds.get(i).map_or("+Inf".to_string(), |bound| {
            format!("{}", *bound as f64 * scale)
        });
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{separator}le=\"{le}\"}} {cumulative}"
        );
    }
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {sum}");
    let _ = writeln!(out, "{name}_count{braces} {cumulative}");
}

/// The whole metrics page.
pub async fn render(shared: &Shared) -> String {
    let mut out = String::with_capacity(16 * 1024);
    out.push_str("# HELP shoal_commands_total Commands run, by command.\n# TYPE shoal_commands_total counter\n");
    for (spec, counters) in COMMANDS.iter().zip(&shared.command_stats.commands) {
        let _ = writeln!(
            out,
            "shoal_commands_total{{command=\"{}\"}} {}",
            spec.name,
            counters.calls.load(Ordering::Relaxed)
        );
    }
    out.push_str("# HELP shoal_command_errors_total Commands answered with an error.\n# TYPE shoal_command_errors_total counter\n");
    for (spec, counters) in COMMANDS.iter().zip(&shared.command_stats.commands) {
        let _ = writeln!(
            out,
            "shoal_command_errors_total{{command=\"{}\"}} {}",
            spec.name,
            counters.errors.load(Ordering::Relaxed)
        );
    }
    out.push_str("# HELP shoal_command_duration_seconds Time from dispatch to reply.\n# TYPE shoal_command_duration_seconds histogram\n");
    for (spec, counters) in COMMANDS.iter().zip(&shared.command_stats.commands) {
        if counters.calls.load(Ordering::Relaxed) == 0 {
            continue;
        }
        let counts: Vec<u64> = counters
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let sum = counters.micros_sum.load(Ordering::Relaxed) as f64 / 1e6;
        let labels = format!("command=\"{}\"", spec.name);
        histogram(
            &mut out,
            "shoal_command_duration_seconds",
            &labels,
            &LATENCY_MICROS_BOUNDS,
            1e-6,
            &counts,
            sum,
        );
    }
    let _ = writeln!(
        out,
        "# HELP shoal_client_connections Client connections open.\n# TYPE shoal_client_connections gauge\nshoal_client_connections {}",
        shared.connections.load(Ordering::Relaxed)
    );

    let status = &shared.status;
    out.push_str("# HELP shoal_process_restarts_total Restarts of each child process.\n# TYPE shoal_process_restarts_total counter\n");
    for index in 0..status.slot_count() {
        let slot = status.slot(index);
        let process = match slot.role() {
            Role::ShardWorker => format!("shard-{index}"),
            Role::NetDaemon => "net-daemon".into(),
        };
        let _ = writeln!(
            out,
            "shoal_process_restarts_total{{process=\"{process}\"}} {}",
            slot.get(Field::Restarts)
        );
    }
    let gauges: [(&str, &str, Field); 8] = [
        (
            "shoal_worker_queue_depth_requests",
            "Requests in the worker's current group commit.",
            Field::QueueDepth,
        ),
        (
            "shoal_worker_requests_total",
            "Requests a worker has applied.",
            Field::Ops,
        ),
        (
            "shoal_worker_commits_total",
            "Group commits that wrote data.",
            Field::Commits,
        ),
        (
            "shoal_lmdb_map_size_bytes",
            "Size of the worker's LMDB map.",
            Field::MapSizeBytes,
        ),
        (
            "shoal_lmdb_used_bytes",
            "Bytes of the worker's LMDB map in use.",
            Field::MapUsedBytes,
        ),
        (
            "shoal_worker_unsettled",
            "1 while the worker holds acknowledged writes LMDB has not committed (write-back): reads of its shard go through it.",
            Field::Unsettled,
        ),
        (
            "shoal_journal_bytes",
            "Bytes of the worker's journal segments, which a restart after a power failure reads.",
            Field::JournalBytes,
        ),
        (
            "shoal_last_checkpoint_timestamp_seconds",
            "When the worker's last checkpoint was recorded, in Unix seconds.",
            Field::CheckpointSecs,
        ),
    ];
    for (name, help, field) in gauges {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for worker in 0..shared.dispatch.links.len() {
            let _ = writeln!(
                out,
                "{name}{{worker=\"{worker}\"}} {}",
                status.slot(worker).get(field)
            );
        }
    }
    out.push_str("# HELP shoal_group_commit_requests Requests per group commit.\n# TYPE shoal_group_commit_requests histogram\n");
    for worker in 0..shared.dispatch.links.len() {
        let slot = status.slot(worker);
        let counts = slot.histogram(Field::BatchSizeBuckets);
        let labels = format!("worker=\"{worker}\"");
        let sum = slot.get(Field::Ops) as f64;
        histogram(
            &mut out,
            "shoal_group_commit_requests",
            &labels,
            &BATCH_SIZE_BOUNDS,
            1.0,
            &counts,
            sum,
        );
    }
    out.push_str(
        "# HELP shoal_commit_duration_seconds Time to commit and fsync a group commit.\n\
         # TYPE shoal_commit_duration_seconds histogram\n",
    );
    for worker in 0..shared.dispatch.links.len() {
        let slot = status.slot(worker);
        let counts = slot.histogram(Field::CommitMicrosBuckets);
        let labels = format!("worker=\"{worker}\"");
        let sum = slot.get(Field::CommitMicrosSum) as f64 / 1e6;
        histogram(
            &mut out,
            "shoal_commit_duration_seconds",
            &labels,
            &COMMIT_MICROS_BOUNDS,
            1e-6,
            &counts,
            sum,
        );
    }

    if let (Some(node), Some(router)) = (&shared.cluster, &shared.dispatch.router) {
        let hold = router.log_hold();
        let counters = [
            (
                "shoal_partitions_under_replicated",
                "Partitions with fewer in-sync copies than cluster.replicas (leader's view).",
                "gauge",
                node.under_replicated() as u64,
            ),
            (
                "shoal_failovers_led_total",
                "Failovers this host committed as metadata leader.",
                "counter",
                node.failovers_led(),
            ),
            (
                "shoal_handovers_led_total",
                "Planned handovers of primaries this host committed as metadata leader.",
                "counter",
                node.handovers_led(),
            ),
            (
                "shoal_new_primaries_seen_total",
                "New primaries (failovers and handovers) of partitions held here, as this host saw them.",
                "counter",
                router.new_primaries_seen(),
            ),
            (
                "shoal_full_copies_total",
                "Full copies this host's followers took from their primaries.",
                "counter",
                router.full_copies(),
            ),
            (
                "shoal_resyncs_total",
                "Followers that primaries here brought into sync: new ones, and returning ones from the log or after a full copy.",
                "counter",
                router.resyncs(),
            ),
            (
                "shoal_log_hold_entries",
                "The most log entries one partition led here keeps for its slowest follower.",
                "gauge",
                hold.most_entries,
            ),
            (
                "shoal_digest_checks_total",
                "Comparisons of a partition's copies this host made as metadata leader.",
                "counter",
                router.digest_checks().0,
            ),
            (
                "shoal_digest_divergences_total",
                "Comparisons that found copies with equal logs and different data.",
                "counter",
                router.digest_checks().1,
            ),
            (
                "shoal_partitions_past_log_hold",
                "Partitions led here with a follower further behind than the log kept for it.",
                "gauge",
                hold.past_limit as u64,
            ),
        ];
        for (name, help, kind, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
        let lags = router.followers_lag();
        let series: [Series; 3] = [
            (
                "shoal_follower_partitions_behind",
                "Partitions led here whose log the follower host does not hold to the end.",
                |lag| lag.behind as u64,
            ),
            (
                "shoal_follower_lag_entries",
                "The most log entries the follower host lacks of one partition led here.",
                |lag| lag.entries,
            ),
            (
                "shoal_follower_lag_ms",
                "The age of the oldest log entry the follower host lacks, in ms.",
                |lag| lag.ms,
            ),
        ];
        for (name, help, value) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for lag in &lags {
                let _ = writeln!(out, "{name}{{follower=\"{}\"}} {}", lag.host, value(lag));
            }
        }
    }

    out.push_str(
        "# HELP shoal_partition_last_commit_id Last commit id of each partition.\n\
         # TYPE shoal_partition_last_commit_id gauge\n",
    );
    if let Ok(responses) = wait_all(
        shared
            .dispatch
            .send_all(|| WorkerRequest::LastCommitIds)
            .await,
    )
    .await
    {
        let mut positions: Vec<(u16, u64)> = responses
            .into_iter()
            .flat_map(|response| match response {
                WorkerResponse::Positions(positions) => positions,
                _ => Vec::new(),
            })
            .collect();
        positions.sort_unstable();
        for (partition, last) in positions {
            let _ = writeln!(
                out,
                "shoal_partition_last_commit_id{{partition=\"{partition}\"}} {last}"
            );
        }
    }
    out
}

//! `shoal status`: what each process of a running Shoal is doing, read from
//! the shared-memory status table (and the PID file, to tell if it runs).

use std::fmt::Write as _;
use std::fs::OpenOptions;

use anyhow::Context;
use serde_json::json;
use shoal_shared::config::Config;
use shoal_shared::partition::worker_partitions;
use shoal_shared::status::{Field, Role, StatusTable};

/// Prints the status table as a table or as JSON.
pub fn print(config: &Config, as_json: bool) -> anyhow::Result<()> {
    let data_dir = config
        .data_dir
        .canonicalize()
        .unwrap_or_else(|_| config.data_dir.clone());
    let mut config = config.clone();
    config.data_dir = data_dir;
    let running = is_running(&config);
    let table = StatusTable::open_read_only(&config.status_path()).with_context(|| {
        format!(
            "no status table in {} (has shoal serve run on this data dir?)",
            config.data_dir.display()
        )
    })?;
    let workers = table.workers();
    let partitions = table.partitions();
    let processes: Vec<serde_json::Value> = (0..table.slot_count())
        .map(|index| {
            let slot = table.slot(index);
            let role = slot.role();
            let owned = match role {
                Role::ShardWorker => worker_partitions(index, workers, partitions),
                Role::NetDaemon => Vec::new(),
            };
            json!({
                "role": role.name(),
                "index": slot.get(Field::Index),
                "pid": slot.get(Field::Pid),
                "state": if running { slot.state().name() } else { "stopped" },
                "restarts": slot.get(Field::Restarts),
                "partitions": owned,
                "last_commit_id": slot.get(Field::LastCommitId),
                "ops": slot.get(Field::Ops),
                "commits": slot.get(Field::Commits),
                "unsettled": slot.get(Field::Unsettled) != 0,
                "connections": slot.get(Field::Connections),
                "heartbeat_ms": slot.get(Field::HeartbeatMs),
            })
        })
        .collect();
    // The net-daemon writes it only when the host has a cluster secret.
    let cluster = std::fs::read_to_string(config.cluster_phase_path())
        .ok()
        .map(|phase| phase.trim().to_string());
    if as_json {
        let document = json!({
            "running": running,
            "cluster": cluster,
            "supervisor_pid": table.supervisor_pid(),
            "data_dir": config.data_dir.display().to_string(),
            "workers": workers,
            "partitions": partitions,
            "rebalance": {
                "partitions_total": table.rebalance().total,
                "partitions_moved": table.rebalance().done,
                "bytes_moved": table.rebalance().bytes,
                "started_ms": table.rebalance().started_ms,
            },
            "processes": processes,
        });
        emit(&format!("{}\n", serde_json::to_string_pretty(&document)?));
        return Ok(());
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "shoal on {}: {} (supervisor pid {}), {workers} workers, {partitions} partitions",
        config.data_dir.display(),
        if running { "running" } else { "not running" },
        table.supervisor_pid()
    );
    if let Some(phase) = &cluster {
        let _ = writeln!(out, "cluster: {phase}");
    }
    let rebalance = table.rebalance();
    if rebalance.total > 0 {
        let _ = writeln!(
            out,
            "worker count change: {}/{} partitions moved, {} bytes{}",
            rebalance.done,
            rebalance.total,
            rebalance.bytes,
            if rebalance.done == rebalance.total {
                " (done)"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(
        out,
        "{:<14} {:>8} {:<9} {:>8} {:>10} {:>14} {:>10}",
        "PROCESS", "PID", "STATE", "RESTARTS", "PARTITIONS", "LAST_COMMIT", "OPS"
    );
    for process in &processes {
        let name = match process["role"].as_str() {
            Some("shard-worker") => format!("shard-{}", process["index"]),
            _ => "net-daemon".to_string(),
        };
        let owned = process["partitions"].as_array().map_or(0, Vec::len);
        let _ = writeln!(
            out,
            "{:<14} {:>8} {:<9} {:>8} {:>10} {:>14} {:>10}",
            name,
            process["pid"].to_string(),
            process["state"].as_str().unwrap_or("?"),
            process["restarts"].to_string(),
            if name == "net-daemon" {
                "-".to_string()
            } else {
                owned.to_string()
            },
            process["last_commit_id"].to_string(),
            process["ops"].to_string(),
        );
    }
    emit(&out);
    Ok(())
}

/// Writes to stdout; a closed pipe (`shoal status | head`) is not an error.
fn emit(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().write_all(text.as_bytes());
}

/// Whether a supervisor holds the data dir's PID file lock.
pub(crate) fn is_running(config: &Config) -> bool {
    let Ok(file) = OpenOptions::new().read(true).open(config.pid_path()) else {
        return false;
    };
    match file.try_lock_shared() {
        Ok(()) => false,
        Err(std::fs::TryLockError::WouldBlock) => true,
        Err(std::fs::TryLockError::Error(_)) => false,
    }
}

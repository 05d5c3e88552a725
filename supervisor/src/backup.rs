//! `shoal backup DIR`: asks a running Shoal for a copy of every shard.
//!
//! It connects to the server like any client (the Unix socket if the config
//! has one, else TCP), authenticates if the config sets a password, and sends
//! `SHOAL.BACKUP <absolute DIR>`. The server does the copying (see the
//! net-daemon's `commands::backup`); meanwhile this command shows progress on
//! stderr by watching the shard files grow in DIR. When the server answers
//! with the manifest, it prints a summary.
//!
//! It never opens LMDB and never touches the data dir.

use std::io;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use shoal_shared::backup::{Manifest, MANIFEST_FILE, SHARD_FILE};
use shoal_shared::config::Config;

use crate::admin::{absolute, Connection, Value};

/// How often progress is shown while the server copies.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Runs `shoal backup DIR`.
pub fn run(config: &Config, dir: &Path) -> anyhow::Result<()> {
    let dir = absolute(dir)?;
    check_target(&dir)?;
    let Some(dir_text) = dir.to_str() else {
        bail!("backup directory {} is not a UTF-8 path", dir.display())
    };
    let mut connection = Connection::open(config)?;
    let started = Instant::now();
    eprintln!("backup: copying every shard into {}", dir.display());
    let (sender, receiver) = mpsc::channel();
    let request = [b"SHOAL.BACKUP".to_vec(), dir_text.as_bytes().to_vec()];
    std::thread::Builder::new()
        .name("backup-request".into())
        .spawn(move || {
            let args: Vec<&[u8]> = request.iter().map(Vec::as_slice).collect();
            let _ = sender.send(connection.command(&args));
        })
        .context("starting the request thread")?;
    let mut last_shown = Vec::new();
    let reply = loop {
        match receiver.recv_timeout(PROGRESS_EVERY) {
            Ok(reply) => break reply.context("reading the server's answer")?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let sizes = shard_sizes(&dir);
                if !sizes.is_empty() && sizes != last_shown {
                    eprintln!(
                        "backup: copied {} ({:.1} s)",
                        describe_sizes(&sizes),
                        started.elapsed().as_secs_f64()
                    );
                    last_shown = sizes;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("the request thread stopped without an answer")
            }
        }
    };
    let text = match reply {
        Value::Bulk(Some(text)) => text,
        Value::Error(error) => bail!("the server refused the backup: {error}"),
        other => bail!("unexpected answer from the server: {}", other.describe()),
    };
    let manifest: Manifest =
        serde_json::from_slice(&text).context("decoding the manifest the server sent")?;
    for shard in &manifest.shards {
        eprintln!(
            "backup: shard-{}: {} copied, sha256 {}, done",
            shard.shard,
            human_bytes(shard.bytes),
            &shard.sha256[..16.min(shard.sha256.len())]
        );
    }
    let highest = manifest
        .commit_ids
        .iter()
        .map(|commit| commit.last_commit_id)
        .max()
        .unwrap_or(0);
    println!(
        "backup of {} shards ({} partitions, {}, highest commit id {highest}) written to {} in {:.1} s; \
         commit ids per partition are in {MANIFEST_FILE}",
        manifest.workers,
        manifest.partitions,
        human_bytes(manifest.total_bytes()),
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Refuses a target that exists and is not an empty directory (the server checks again).
fn check_target(dir: &Path) -> anyhow::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "backup directory {} exists and is not empty; choose a new one",
                    dir.display()
                );
            }
            Ok(())
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => {
            Err(error).with_context(|| format!("cannot use backup directory {}", dir.display()))
        }
    }
}

/// Sizes of the shard files written so far, by shard index.
fn shard_sizes(dir: &Path) -> Vec<(usize, u64)> {
    let mut sizes: Vec<(usize, u64)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name();
            let index = name.to_str()?.strip_prefix("shard-")?.parse().ok()?;
            let bytes = std::fs::metadata(entry.path().join(SHARD_FILE)).ok()?.len();
            Some((index, bytes))
        })
        .collect();
    sizes.sort_unstable();
    sizes
}

fn describe_sizes(sizes: &[(usize, u64)]) -> String {
    let total: u64 = sizes.iter().map(|(_, bytes)| bytes).sum();
    let each: Vec<String> = sizes
        .iter()
        .map(|(index, bytes)| format!("shard-{index} {}", human_bytes(*bytes)))
        .collect();
    format!("{} ({} in all)", each.join(", "), human_bytes(total))
}

/// `12.3 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_do() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn relative_targets_become_absolute() {
        let path = absolute(Path::new("./backups/../b1")).unwrap();
        assert!(path.is_absolute());
        assert!(path.ends_with("b1"));
    }
}

//! `SHOAL.BACKUP dir`: a copy of every shard, taken while the server serves.
//!
//! The directory is on the server's host and must be an absolute path that
//! does not exist or is empty. The daemon creates it, asks every worker for a
//! copy of its environment into `dir/shard-<i>/` (each worker copies from one
//! read snapshot on a thread of its own, so writes go on), and once every copy
//! is on disk writes `dir/manifest.json` (see `shoal_shared::backup`). The
//! reply is the manifest's JSON text. A directory without a manifest is an
//! incomplete backup.
//!
//! Each shard's copy is consistent in itself and the manifest holds the commit
//! id each partition's data stops at. The shards are not copied at one common
//! instant: a multi-worker write may be in one shard's copy and not yet in
//! another's, and is then completed or aborted by the usual recovery of
//! transactions in doubt once the backup is restored. A write answered before
//! the backup was asked for is whole in the copies: each worker applies what
//! its link queued before the backup request (a multi-key write's commits
//! included) before its copy starts.
//!
//! One backup runs at a time, in a task of its own, so it completes (manifest
//! included) even if the client that asked for it goes away. It never touches
//! the data dir.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shoal_shared::backup::{Manifest, ShardBackup, MANIFEST_FILE};
use shoal_shared::config::write_durably;
use shoal_shared::frame::{WorkerRequest, WorkerResponse};
use shoal_shared::resp::Reply;

use super::{wait_all, Pending};
use crate::state::Shared;

/// Longest a worker may take to copy its environment.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// Set while a backup runs.
static RUNNING: AtomicBool = AtomicBool::new(false);

/// Clears [`RUNNING`] when the backup ends, however it ends.
struct RunningGuard;

impl Drop for RunningGuard {
    fn drop(&mut self) {
        RUNNING.store(false, Ordering::Release);
    }
}

/// `SHOAL.BACKUP dir` (arity is already checked).
pub fn dispatch(shared: &Arc<Shared>, args: &[Bytes]) -> Pending {
    let shared = Arc::clone(shared);
    let dir = args[1].clone();
    // A task of its own: a client that goes away does not cut the backup short.
    let task = tokio::spawn(async move { backup(&shared, &dir).await });
    Pending::barrier(async move {
        task.await
            .unwrap_or_else(|error| Reply::error(format!("ERR the backup task failed: {error}")))
    })
}

async fn backup(shared: &Shared, dir: &[u8]) -> Reply {
    let Ok(dir) = std::str::from_utf8(dir) else {
        return Reply::error("ERR the backup directory must be a UTF-8 path");
    };
    let dir = PathBuf::from(dir);
    if !dir.is_absolute() {
        return Reply::error(format!(
            "ERR the backup directory {} is not an absolute path",
            dir.display()
        ));
    }
    if RUNNING.swap(true, Ordering::AcqRel) {
        return Reply::error("ERR a backup is already running; wait for it to finish");
    }
    let _running = RunningGuard;
    if let Err(message) = prepare_dir(&dir) {
        return Reply::error(format!("ERR {message}"));
    }
    tracing::info!(dir = %dir.display(), workers = shared.dispatch.links.len(), "backup started");

    let mut calls = Vec::with_capacity(shared.dispatch.links.len());
    for (index, link) in shared.dispatch.links.iter().enumerate() {
        let shard_dir = dir
            .join(format!("shard-{index}"))
            .to_string_lossy()
            .into_owned();
        calls.push(
            link.send_with_timeout(WorkerRequest::Backup { dir: shard_dir }, BACKUP_TIMEOUT)
                .await,
        );
    }
    let incomplete = |why: String| {
        tracing::warn!(dir = %dir.display(), %why, "backup failed");
        Reply::error(format!(
            "ERR backup failed: {why}; {} is incomplete (it has no {MANIFEST_FILE}): delete it",
            dir.display()
        ))
    };
    let responses = match wait_all(calls).await {
        Ok(responses) => responses,
        Err(reply) => {
            let why = match &reply {
                Reply::Error(text) => text.trim_start_matches("ERR ").to_string(),
                _ => "a worker failed".to_string(),
            };
            return incomplete(why);
        }
    };
    let mut reports: Vec<ShardBackup> = Vec::with_capacity(responses.len());
    for response in responses {
        match response {
            WorkerResponse::Backup(report) => reports.push(report),
            other => return incomplete(format!("unexpected worker response {other:?}")),
        }
    }
    let storage = &shared.config.storage;
    let mut manifest = match Manifest::from_reports(
        &reports,
        storage.partitions,
        storage.collections,
        shoal_shared::now_ms(),
    ) {
        Ok(manifest) => manifest,
        Err(why) => return incomplete(why),
    };
    // SWAPDB moves no key, so the map as it is now goes with the copies whenever it changed.
    manifest.databases = shared.databases.now().await.changed();
    let text = match serde_json::to_string_pretty(&manifest) {
        Ok(text) => text,
        Err(error) => return incomplete(format!("cannot encode the manifest: {error}")),
    };
    if let Err(error) = write_durably(&dir.join(MANIFEST_FILE), text.as_bytes()) {
        return incomplete(format!("cannot write {MANIFEST_FILE}: {error}"));
    }
    tracing::info!(dir = %dir.display(), bytes = manifest.total_bytes(), "backup done");
    Reply::Bulk(text.into())
}

/// Creates `dir`, or accepts it if it exists and is empty.
fn prepare_dir(dir: &Path) -> Result<(), String> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(format!(
                "backup directory {} exists and is not empty",
                dir.display()
            )),
        },
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(dir)
            .map_err(|error| format!("cannot create backup directory {}: {error}", dir.display())),
        Err(error) => Err(format!(
            "cannot use backup directory {}: {error}",
            dir.display()
        )),
    }
}

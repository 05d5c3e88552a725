//! Backups of the shard's environment, made on a thread of their own.
//!
//! [`Store::backup_source`] hands out a [`BackupSource`]: a second handle on
//! the environment. [`BackupSource::copy_to`] runs LMDB's copy, which reads
//! the whole environment from one read transaction (a snapshot) while the
//! apply loop goes on committing. It then opens the copy read-only and reads
//! every partition's `last_commit_id` from it, so that the commit ids reported
//! are exactly those of the copied data, and hashes the file.
//!
//! While a copy runs, the map must not be resized (LMDB forbids it with a
//! transaction open in the process): the copy holds the store's resize gate
//! shared, and a map growth waits for it.
//!
//! This module never writes the live environment.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, RwLock};

use heed::types::Bytes;
use heed::{CommitOrAbort, CompactionOption, EnvFlags, EnvOpenOptions, WithoutTls};
use sha2::{Digest, Sha256};
use shoal_shared::backup::{to_hex, ShardBackup, SHARD_FILE};
use shoal_shared::frame::Partition;
use shoal_shared::partition::worker_partitions;

use super::{Store, StoreError};
use shoal_shared::layout;

const HASH_CHUNK_BYTES: usize = 1 << 20;

/// What a backup thread needs of the store.
pub(crate) struct BackupSource {
    env: heed::Env<WithoutTls>,
    resize_gate: Arc<RwLock<()>>,
    max_dbs: u32,
}

impl Store {
    /// A handle for copying this environment from another thread.
    pub(crate) fn backup_source(&self) -> BackupSource {
        BackupSource {
            env: self.env.clone(),
            resize_gate: Arc::clone(&self.resize_gate),
            max_dbs: self.max_dbs,
        }
    }
}

fn io_error(path: &Path, what: &str, error: std::io::Error) -> StoreError {
    StoreError::Mismatch(format!("{what} {}: {error}", path.display()))
}

impl BackupSource {
    /// Copies the environment to `dir/data.mdb` (`dir` must not exist; its parent must),
    /// syncs it, and reports what the copy holds.
    pub(crate) fn copy_to(&self, dir: &Path) -> Result<ShardBackup, StoreError> {
        std::fs::create_dir(dir).map_err(|error| io_error(dir, "cannot create", error))?;
        let path = dir.join(SHARD_FILE);
        let mut file = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .open(&path)
            .map_err(|error| io_error(&path, "cannot create", error))?;
        {
            let _gate = self
                .resize_gate
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            self.env
                .copy_to_file(&mut file, CompactionOption::Disabled)?;
        }
        file.sync_all()
            .map_err(|error| io_error(&path, "cannot sync", error))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|error| io_error(dir, "cannot sync", error))?;
        drop(file);

        let mut report = read_copy(&path, self.max_dbs)?;
        let (bytes, sha256) =
            hash_file(&path).map_err(|error| io_error(&path, "cannot read", error))?;
        report.bytes = bytes;
        report.sha256 = sha256;
        Ok(report)
    }
}

/// Opens the copied environment read-only (without a lock file: nothing else uses it) and
/// reads its identity and the last commit id of every partition its shard owns.
fn read_copy(path: &Path, max_dbs: u32) -> Result<ShardBackup, StoreError> {
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.max_dbs(max_dbs);
    // SAFETY: the copy was just written by this thread and nothing else opens it;
    // NO_LOCK is safe without concurrent users, and the file is opened read-only.
    unsafe { options.flags(EnvFlags::READ_ONLY | EnvFlags::NO_LOCK | EnvFlags::NO_SUB_DIR) };
    // SAFETY: as above; the environment is never used across fork().
    let env = unsafe { options.open(path)? };
    let meta = env
        .open_databases_and_commit(env.read_txn()?, |opener, txn| {
            opener
                .open_database::<Bytes, Bytes>(txn, Some("meta"))
                .map(CommitOrAbort::<_, ()>::Commit)
        })?
        .unwrap_commit()
        .ok_or_else(|| {
            StoreError::Mismatch(format!(
                "the copy at {} has no meta database",
                path.display()
            ))
        })?;
    let txn = env.read_txn()?;
    let format_version = layout::decode_u32(
        meta.get(&txn, layout::META_FORMAT_VERSION)?
            .unwrap_or_default(),
        "format version",
    )?;
    let shard = layout::decode_u32(
        meta.get(&txn, layout::META_SHARD_ID)?.unwrap_or_default(),
        "shard id",
    )?;
    let (partitions, workers) =
        layout::decode_layout(meta.get(&txn, layout::META_LAYOUT)?.unwrap_or_default())?;
    let mut positions: Vec<(Partition, u64)> = Vec::new();
    for partition in worker_partitions(shard as usize, usize::from(workers), partitions) {
        let last_commit_id = match meta.get(&txn, &layout::partition_meta_key(partition))? {
            Some(raw) => layout::decode_partition_meta(raw)?.last_commit_id,
            None => 0,
        };
        positions.push((partition, last_commit_id));
    }
    drop(txn);
    env.prepare_for_closing().wait();
    Ok(ShardBackup {
        shard,
        format_version,
        partitions,
        workers,
        bytes: 0,
        sha256: String::new(),
        positions,
    })
}

/// Size and SHA-256 (hex) of a file.
fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; HASH_CHUNK_BYTES];
    let mut total = 0u64;
    loop {
        let read = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        hasher.update(&buffer[..read]);
        total += read as u64;
    }
    Ok((total, to_hex(&hasher.finalize())))
}

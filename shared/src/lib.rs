//! Shared pieces of Shoal, used by every process.
//!
//! This crate owns the contracts between processes and the pure logic that
//! more than one process needs: the frames, the on-disk layout of a shard and
//! the read-only reader of a shard's environment. It never does network I/O and
//! never writes a shard's environment (its only writes map the status table),
//! and it depends on no other Shoal crate.
//!
//! Modules:
//! - [`config`]: the TOML config file, its defaults and its validation.
//! - [`resp`]: the Redis protocol codec (request parsing, reply encoding).
//! - [`databases`]: the storage collection of each database number (SWAPDB).
//! - [`frame`]: the net-daemon ↔ shard-worker message enums and their framing.
//! - [`glob`]: Redis-style glob patterns.
//! - [`partition`]: key → slot → partition → worker routing.
//! - [`status`]: the shared-memory status table every process writes into.
//! - [`limits`]: size limits and the invariants between them.
//! - [`backup`]: the backup manifest and the shard-worker's report of its copy.
//! - [`ids`]: the id space that `ID.NEW` issues from, and its blocks.
//! - [`layout`]: the byte layout of a shard's LMDB environment.
//! - [`lmdb`]: opening a shard's environment and its databases; free disk space.
//! - [`reader`]: a shard's environment opened read-only (the net-daemon's direct reads).
//! - `fuzzing` (hidden): the decoder properties that fuzz targets and corpus tests check.

pub mod backup;
pub mod config;
pub mod databases;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod glob;
pub mod ids;
pub mod layout;
pub mod limits;
pub mod lmdb;
pub mod partition;
pub mod pending;
pub mod reader;
pub mod resp;
pub mod status;

/// Milliseconds since the Unix epoch, as used in logs, metadata and the status table.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A number that differs from call to call (and from process to process): not for
/// cryptography, for run stamps and random starting points.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(now_ms());
    hasher.finish()
}

/// Locks `mutex`, taking the data over if a thread panicked while holding it: every
/// mutex of Shoal guards state that stays consistent between its writes, and a panic
/// aborts the process anyway.
pub fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

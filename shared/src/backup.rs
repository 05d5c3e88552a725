//! The backup format: the manifest that `shoal backup` writes beside the shard
//! copies, and the report a shard-worker sends for the copy it made.
//!
//! A backup directory holds:
//!
//! ```text
//! <dir>/manifest.json        the Manifest below, written last (its presence marks a complete backup)
//! <dir>/shard-<i>/data.mdb   worker i's LMDB environment, copied from one read snapshot
//! ```
//!
//! The manifest records the layout the copies were made with (partitions,
//! workers, collections), the size and SHA-256 of every shard file, and the
//! last commit id of every partition *as read from the copy itself*, so the
//! commit ids and the data always agree.
//!
//! This module is pure data and checks: the net-daemon writes the manifest,
//! the workers fill in [`ShardBackup`], and `shoal restore` validates the
//! manifest with [`Manifest::check`] before it reads any shard file. It does no
//! I/O.

use serde::{Deserialize, Serialize};

use crate::partition::{partition_worker, Partition};

/// File name of the manifest inside a backup directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The `format` field of every manifest.
pub(crate) const MANIFEST_FORMAT: &str = "shoal-backup";
/// Version of the manifest and directory layout described here.
pub(crate) const MANIFEST_VERSION: u32 = 1;
/// File name of a shard's copied environment inside `shard-<i>/`.
pub const SHARD_FILE: &str = "data.mdb";
/// Length of a SHA-256 digest in hex.
const SHA256_HEX_LEN: usize = 64;

/// Path of shard `index`'s copy, relative to the backup directory.
pub(crate) fn shard_file_path(index: usize) -> String {
    format!("shard-{index}/{SHARD_FILE}")
}

/// What a shard-worker reports about the copy of its environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardBackup {
    /// The shard id recorded in the copy's `meta`.
    pub shard: u32,
    /// The storage layout version recorded in the copy's `meta`.
    pub format_version: u32,
    /// The number of partitions in the layout recorded in the copy's `meta`.
    pub partitions: u16,
    /// The number of workers in that layout.
    pub workers: u16,
    /// Size of the copied `data.mdb`.
    pub bytes: u64,
    /// SHA-256 of the copied `data.mdb`, lower-case hex.
    pub sha256: String,
    /// Last commit id of each partition this shard owns, read from the copy (0: never written).
    pub positions: Vec<(Partition, u64)>,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub(crate) format: String,
    /// [`MANIFEST_VERSION`] when written.
    pub(crate) version: u32,
    /// When the backup finished, Unix milliseconds.
    pub(crate) created_ms: u64,
    /// The storage layout version of the shard files (shard-worker's `FORMAT_VERSION`).
    pub storage_format_version: u32,
    /// The data dir's partition count when the backup was taken.
    pub partitions: u16,
    /// The data dir's worker count (one shard file each).
    pub workers: usize,
    /// `storage.collections` when the backup was taken.
    pub collections: u16,
    /// The `[database, collection]` pairs that SWAPDB had moved (see
    /// [`crate::databases`]); empty when every database was in its own collection.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub databases: Vec<[u16; 2]>,
    /// One entry per worker, in worker order.
    pub shards: Vec<ShardFile>,
    /// One entry per partition, in partition order.
    pub commit_ids: Vec<PartitionCommit>,
}

/// One shard's file in the backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardFile {
    /// The worker index the file belongs to.
    pub shard: usize,
    /// Relative to the backup directory: `shard-<i>/data.mdb`.
    pub path: String,
    /// The file's size in bytes.
    pub bytes: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// The commit a partition's data in the backup stops at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionCommit {
    pub(crate) partition: Partition,
    pub(crate) shard: usize,
    /// Every commit of the partition up to and including this one is in the backup; none after.
    pub last_commit_id: u64,
}

impl Manifest {
    /// Builds the manifest from the reports of every worker, in worker order. Fails if the
    /// reports do not describe `partitions` partitions on `reports.len()` workers.
    pub fn from_reports(
        reports: &[ShardBackup],
        partitions: u16,
        collections: u16,
        created_ms: u64,
    ) -> Result<Manifest, String> {
        let workers = reports.len();
        let storage_format_version = reports.first().map_or(0, |report| report.format_version);
        let mut shards = Vec::with_capacity(workers);
        let mut commit_ids: Vec<PartitionCommit> = Vec::with_capacity(usize::from(partitions));
        for (index, report) in reports.iter().enumerate() {
            if report.shard as usize != index {
                return Err(format!(
                    "worker {index} copied an environment of shard {}",
                    report.shard
                ));
            }
            if (report.partitions, usize::from(report.workers)) != (partitions, workers) {
                return Err(format!(
                    "shard {index} was created for {} partitions on {} workers, not {partitions} on {workers}",
                    report.partitions, report.workers
                ));
            }
            if report.format_version != storage_format_version {
                return Err(format!(
                    "shard {index} has storage format {}, shard 0 has {storage_format_version}",
                    report.format_version
                ));
            }
            shards.push(ShardFile {
                shard: index,
                path: shard_file_path(index),
                bytes: report.bytes,
                sha256: report.sha256.clone(),
            });
            for &(partition, last_commit_id) in &report.positions {
                commit_ids.push(PartitionCommit {
                    partition,
                    shard: index,
                    last_commit_id,
                });
            }
        }
        commit_ids.sort_by_key(|commit| commit.partition);
        let manifest = Manifest {
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            created_ms,
            storage_format_version,
            partitions,
            workers,
            collections,
            databases: Vec::new(),
            shards,
            commit_ids,
        };
        manifest.check()?;
        Ok(manifest)
    }

    /// Checks that the manifest is one this version reads and that it is whole: every
    /// worker has exactly one shard file, and every partition exactly one commit id, on
    /// the worker that owns it.
    pub fn check(&self) -> Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!(
                "format is {:?}, not {MANIFEST_FORMAT:?}",
                self.format
            ));
        }
        if self.version != MANIFEST_VERSION {
            return Err(format!(
                "manifest version {} is not {MANIFEST_VERSION} (the one this build reads)",
                self.version
            ));
        }
        if self.workers == 0 || self.partitions == 0 || usize::from(self.partitions) < self.workers
        {
            return Err(format!(
                "{} partitions on {} workers is not a valid layout",
                self.partitions, self.workers
            ));
        }
        if self.collections == 0 {
            return Err("collections is 0".into());
        }
        crate::databases::DatabaseMap::from_changed(self.collections, &self.databases)
            .map_err(|error| format!("databases: {error}"))?;
        if self.shards.len() != self.workers {
            return Err(format!(
                "{} shard files for {} workers",
                self.shards.len(),
                self.workers
            ));
        }
        for (index, shard) in self.shards.iter().enumerate() {
            if shard.shard != index || shard.path != shard_file_path(index) {
                return Err(format!(
                    "shard entry {index} names shard {} at {:?}, expected {:?}",
                    shard.shard,
                    shard.path,
                    shard_file_path(index)
                ));
            }
            if shard.sha256.len() != SHA256_HEX_LEN
                || !shard
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return Err(format!(
                    "shard {index} has a malformed sha256 {:?}",
                    shard.sha256
                ));
            }
        }
        if self.commit_ids.len() != usize::from(self.partitions) {
            return Err(format!(
                "{} commit ids for {} partitions",
                self.commit_ids.len(),
                self.partitions
            ));
        }
        for (index, commit) in self.commit_ids.iter().enumerate() {
            if usize::from(commit.partition) != index {
                return Err(format!(
                    "commit id entry {index} is for partition {}",
                    commit.partition
                ));
            }
            let owner = partition_worker(commit.partition, self.workers);
            if commit.shard != owner {
                return Err(format!(
                    "partition {} is listed on shard {}, but belongs to shard {owner}",
                    commit.partition, commit.shard
                ));
            }
        }
        Ok(())
    }

    /// Total bytes of the shard files.
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|shard| shard.bytes).sum()
    }
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(shard: u32, workers: u16, partitions: u16) -> ShardBackup {
        let positions =
            crate::partition::worker_partitions(shard as usize, usize::from(workers), partitions)
                .into_iter()
                .map(|p| (p, u64::from(p) * 10))
                .collect();
        ShardBackup {
            shard,
            format_version: 2,
            partitions,
            workers,
            bytes: 4096,
            sha256: "ab".repeat(32),
            positions,
        }
    }

    #[test]
    fn manifest_from_reports_is_whole_and_round_trips() {
        let reports = vec![report(0, 3, 8), report(1, 3, 8), report(2, 3, 8)];
        let manifest = Manifest::from_reports(&reports, 8, 16, 1234).unwrap();
        assert_eq!(manifest.workers, 3);
        assert_eq!(manifest.commit_ids.len(), 8);
        assert!(manifest
            .commit_ids
            .iter()
            .enumerate()
            .all(|(i, c)| usize::from(c.partition) == i));
        assert_eq!(
            manifest.commit_ids[5],
            PartitionCommit {
                partition: 5,
                shard: 2,
                last_commit_id: 50
            }
        );
        assert_eq!(manifest.shards[1].path, "shard-1/data.mdb");
        assert_eq!(manifest.total_bytes(), 3 * 4096);
        let text = serde_json::to_string_pretty(&manifest).unwrap();
        let back: Manifest = serde_json::from_str(&text).unwrap();
        assert_eq!(back, manifest);
        back.check().unwrap();
    }

    #[test]
    fn reports_that_disagree_are_refused() {
        let mut wrong_layout = vec![report(0, 2, 8), report(1, 3, 8)];
        assert!(Manifest::from_reports(&wrong_layout, 8, 16, 0)
            .unwrap_err()
            .contains("workers"));
        wrong_layout[0] = report(1, 2, 8);
        assert!(Manifest::from_reports(&wrong_layout, 8, 16, 0)
            .unwrap_err()
            .contains("shard 1"));
        let missing = vec![ShardBackup {
            positions: Vec::new(),
            ..report(0, 1, 4)
        }];
        assert!(Manifest::from_reports(&missing, 4, 16, 0)
            .unwrap_err()
            .contains("commit ids"));
    }

    #[test]
    fn damaged_manifests_fail_their_check() {
        let good = Manifest::from_reports(&[report(0, 2, 4), report(1, 2, 4)], 4, 16, 0).unwrap();
        let mut bad = good.clone();
        bad.version = 99;
        assert!(bad.check().is_err());
        let mut bad = good.clone();
        bad.shards.pop();
        assert!(bad.check().is_err());
        let mut bad = good.clone();
        bad.shards[0].sha256 = "xyz".into();
        assert!(bad.check().is_err());
        let mut bad = good.clone();
        bad.commit_ids[1].shard = 0;
        assert!(bad.check().unwrap_err().contains("belongs to shard 1"));
        let mut bad = good.clone();
        bad.shards[1].path = "../etc/passwd".into();
        assert!(bad.check().is_err());
        let mut bad = good;
        bad.format = "other".into();
        assert!(bad.check().is_err());
    }

    #[test]
    fn hex_is_lower_case() {
        assert_eq!(to_hex(&[0x00, 0x0f, 0xab, 0xff]), "000fabff");
    }
}

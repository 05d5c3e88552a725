//! `shoal restore DIR`: turns a backup into the data dir of a stopped Shoal.
//!
//! The order matters, so that a bad backup never damages anything:
//! 1. read `DIR/manifest.json` and check it is whole and fits the config
//!    (partitions and storage format equal, enough collections). The data
//!    dir takes the backup's worker count; if the config names another one,
//!    the first `shoal serve` moves partitions as for any change of `workers`;
//! 2. check the size and SHA-256 of every shard file in DIR;
//! 3. only then create the data dir, take its PID file lock (so no server
//!    starts meanwhile, and none is running) and check it holds no data
//!    (checked once before step 2 as well, without changing anything, so a
//!    wrong target fails fast);
//! 4. copy every shard into a staging dir inside the data dir, hashing again
//!    as it copies, sync, then rename the shards into place and write
//!    `layout.json` last.
//!
//! Progress goes to stderr. It never opens LMDB: the files are copied as they are.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sha2::{Digest, Sha256};
use shoal_shared::backup::{to_hex, Manifest, ShardFile, MANIFEST_FILE, SHARD_FILE};
use shoal_shared::config::{Config, DataDirLayout};
use shoal_shared::databases::DatabaseMap;

use crate::backup::human_bytes;
use crate::status::is_running;
use crate::supervisor::lock_pid_file;

const CHUNK_BYTES: usize = 1 << 20;
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Staging dir inside the data dir while shards are copied in.
const STAGING_DIR: &str = "restore.partial";
/// What a stopped Shoal leaves in its data dir that holds no data.
const LEFTOVERS: [&str; 3] = ["shoal.pid", "run", "shoal.sock"];

/// Runs `shoal restore DIR`.
pub fn run(mut config: Config, dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = std::fs::read(&manifest_path).with_context(|| {
        format!(
            "cannot read {}: is {} a complete backup?",
            manifest_path.display(),
            dir.display()
        )
    })?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a valid manifest", manifest_path.display()))?;
    manifest.check().map_err(|why| {
        anyhow::anyhow!("{} is not a valid manifest: {why}", manifest_path.display())
    })?;
    fit_config(&mut config, &manifest)?;
    // A quick look first (it changes nothing), so that a wrong target fails before a long
    // verification; it is checked again under the PID file lock below.
    if config.data_dir.exists() {
        if is_running(&config) {
            bail!(
                "shoal is running on data dir {}; stop it before restoring into it",
                config.data_dir.display()
            );
        }
        check_empty(&config.data_dir)?;
    }

    eprintln!(
        "restore: verifying {} shard files ({}) in {}",
        manifest.workers,
        human_bytes(manifest.total_bytes()),
        dir.display()
    );
    for shard in &manifest.shards {
        verify_shard(dir, shard)?;
    }

    config
        .make_paths_absolute()
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let _pid_lock = lock_pid_file(&config)?;
    check_empty(&config.data_dir)?;

    let staging = config.data_dir.join(STAGING_DIR);
    std::fs::create_dir(&staging)
        .with_context(|| format!("cannot create {}", staging.display()))?;
    for shard in &manifest.shards {
        copy_shard(dir, &staging, shard)?;
    }
    for shard in &manifest.shards {
        let from = staging.join(format!("shard-{}", shard.shard));
        let to = config.shard_dir(shard.shard);
        std::fs::rename(&from, &to)
            .with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
    }
    std::fs::remove_dir(&staging).with_context(|| format!("removing {}", staging.display()))?;
    // The data dir takes the backup's layout; a config with another worker count makes
    // the first `shoal serve` move partitions, as for any change of `workers`.
    let layout_path = config.layout_path();
    DataDirLayout {
        partitions: manifest.partitions,
        workers: manifest.workers,
    }
    .store(&layout_path)
    .with_context(|| format!("writing {}", layout_path.display()))?;
    DatabaseMap::from_changed(config.storage.collections, &manifest.databases)
        .map_err(anyhow::Error::msg)?
        .store(&config.data_dir)
        .context("writing the database map")?;
    sync_dir(&config.data_dir)?;
    println!(
        "restored {} shards ({} partitions, {}) from {} into {} in {:.1} s; start it with `shoal serve`",
        manifest.workers,
        manifest.partitions,
        human_bytes(manifest.total_bytes()),
        dir.display(),
        config.data_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Checks that the backup can serve under this config, and takes the backup's worker count
/// for the data dir.
fn fit_config(config: &mut Config, manifest: &Manifest) -> anyhow::Result<()> {
    if config.storage.partitions != manifest.partitions {
        bail!(
            "the backup has {} partitions but the config says storage.partitions = {}; they must be equal",
            manifest.partitions,
            config.storage.partitions
        );
    }
    if config.storage.collections < manifest.collections {
        bail!(
            "the backup has {} collections but the config says storage.collections = {}; raise it to at least {}",
            manifest.collections,
            config.storage.collections,
            manifest.collections
        );
    }
    let (oldest, format) = (
        shoal_shared::layout::OLDEST_FORMAT_VERSION,
        shoal_shared::layout::FORMAT_VERSION,
    );
    if !(oldest..=format).contains(&manifest.storage_format_version) {
        bail!(
            "the backup's storage format is {}, this build reads {oldest} to {format}",
            manifest.storage_format_version
        );
    }
    if config.workers != manifest.workers {
        if config.workers_from_cores {
            eprintln!(
                "restore: the backup has {} workers; the config leaves `workers` to the core count, so the \
                 data dir keeps {}",
                manifest.workers, manifest.workers
            );
        } else {
            eprintln!(
                "restore: the backup has {} workers and the config says workers = {}; the first `shoal serve` \
                 will move partitions to {} workers",
                manifest.workers, config.workers, config.workers
            );
        }
    }
    config.workers = manifest.workers;
    Ok(())
}

/// Refuses a data dir that holds anything but what a stopped server leaves behind.
fn check_empty(data_dir: &Path) -> anyhow::Result<()> {
    let mut found = Vec::new();
    for entry in
        std::fs::read_dir(data_dir).with_context(|| format!("reading {}", data_dir.display()))?
    {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if !LEFTOVERS.contains(&name.as_str()) {
            found.push(name);
        }
    }
    if !found.is_empty() {
        found.sort();
        found.truncate(5);
        bail!(
            "data dir {} is not empty (it has {}); restore only into a new or empty data dir",
            data_dir.display(),
            found.join(", ")
        );
    }
    Ok(())
}

/// Checks a shard file's size and SHA-256 against the manifest.
fn verify_shard(dir: &Path, shard: &ShardFile) -> anyhow::Result<()> {
    let path = dir.join(&shard.path);
    let mut file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let bytes = file.metadata()?.len();
    if bytes != shard.bytes {
        bail!(
            "{} is {bytes} bytes but the manifest says {}: the backup is damaged",
            path.display(),
            shard.bytes
        );
    }
    let mut progress = Progress::new(format!("verify shard-{}", shard.shard), shard.bytes);
    let digest = stream(&mut file, None, &mut progress)
        .with_context(|| format!("reading {}", path.display()))?;
    if digest != shard.sha256 {
        bail!(
            "{} does not match its checksum in the manifest: the backup is damaged",
            path.display()
        );
    }
    eprintln!(
        "restore: shard-{}: {} checksum ok",
        shard.shard,
        human_bytes(bytes)
    );
    Ok(())
}

/// Copies a shard file into `staging/shard-<i>/`, checking its hash again, and syncs it.
fn copy_shard(dir: &Path, staging: &Path, shard: &ShardFile) -> anyhow::Result<()> {
    let from = dir.join(&shard.path);
    let target_dir = staging.join(format!("shard-{}", shard.shard));
    std::fs::create_dir(&target_dir)
        .with_context(|| format!("cannot create {}", target_dir.display()))?;
    let to: PathBuf = target_dir.join(SHARD_FILE);
    let mut source =
        File::open(&from).with_context(|| format!("cannot open {}", from.display()))?;
    let mut target = File::options()
        .write(true)
        .create_new(true)
        .open(&to)
        .with_context(|| format!("cannot create {}", to.display()))?;
    let mut progress = Progress::new(format!("copy shard-{}", shard.shard), shard.bytes);
    let digest = stream(&mut source, Some(&mut target), &mut progress)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    if digest != shard.sha256 {
        bail!(
            "{} changed while it was copied (checksum mismatch); nothing was restored",
            from.display()
        );
    }
    target
        .sync_all()
        .with_context(|| format!("syncing {}", to.display()))?;
    sync_dir(&target_dir)?;
    eprintln!(
        "restore: shard-{}: {} copied, done",
        shard.shard,
        human_bytes(shard.bytes)
    );
    Ok(())
}

/// Reads `source` to the end, writing it to `target` if given; returns the SHA-256 in hex.
fn stream(
    source: &mut File,
    mut target: Option<&mut File>,
    progress: &mut Progress,
) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; CHUNK_BYTES];
    loop {
        let read = match source.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        hasher.update(&buffer[..read]);
        if let Some(target) = target.as_deref_mut() {
            target.write_all(&buffer[..read])?;
        }
        progress.advance(read as u64);
    }
    Ok(to_hex(&hasher.finalize()))
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

/// Prints how far a long read has come, at most once per [`PROGRESS_EVERY`].
struct Progress {
    what: String,
    total: u64,
    done: u64,
    last_shown: Instant,
}

impl Progress {
    fn new(what: String, total: u64) -> Progress {
        Progress {
            what,
            total,
            done: 0,
            last_shown: Instant::now(),
        }
    }

    fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        if self.last_shown.elapsed() >= PROGRESS_EVERY {
            self.last_shown = Instant::now();
            let percent = (self.done * 100).checked_div(self.total).unwrap_or(100);
            eprintln!(
                "restore: {}: {percent}% ({} of {})",
                self.what,
                human_bytes(self.done),
                human_bytes(self.total)
            );
        }
    }
}

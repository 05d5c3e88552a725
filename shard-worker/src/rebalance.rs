//! Changing the worker count: moving whole partitions between shard
//! environments before serving (`shoal rebalance`, run by the supervisor).
//!
//! Partition `p` belongs to shard `p mod workers`. When `workers` changes, each
//! partition whose shard changes is moved, one at a time:
//! 1. clear `p` in the target (leftovers of an interrupted copy), copy every
//!    record of `p` there, in chunks, each one committed and synced;
//! 2. flip `p`'s owner in `<data_dir>/partition_map.json`, written durably (this
//!    is the moment the partition moves);
//! 3. clear `p` in the source.
//!
//! A crash anywhere leaves each partition owned by exactly one shard in the
//! map. Running again resumes: partitions already flipped are skipped, and a
//! final pass clears, in every shard, the partitions it does not own (a copy
//! cut short, a source not yet cleared). Only then are the shards stamped with
//! the new count, shards beyond it removed, and `layout.json` updated, so every
//! key is present exactly once. Progress goes to the log and the status table.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use shoal_shared::config::{write_durably, Config, DataDirLayout};
use shoal_shared::status::{Rebalance, StatusTable};

use crate::store::{Store, StoreOptions};

/// Bytes copied per transaction.
const CHUNK_BYTES: usize = 8 << 20;

/// Which shard holds each partition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct PartitionMap {
    partitions: u16,
    owner: Vec<u16>,
}

impl PartitionMap {
    fn load_or_init(
        path: &Path,
        partitions: u16,
        from_workers: usize,
    ) -> anyhow::Result<PartitionMap> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let map: PartitionMap = serde_json::from_str(&text)
                    .with_context(|| format!("reading {}", path.display()))?;
                if map.partitions != partitions || map.owner.len() != usize::from(partitions) {
                    bail!(
                        "{} does not match storage.partitions = {partitions}",
                        path.display()
                    );
                }
                Ok(map)
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(PartitionMap {
                partitions,
                owner: (0..partitions)
                    .map(|p| (usize::from(p) % from_workers) as u16)
                    .collect(),
            }),
            Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn store(&self, path: &Path) -> anyhow::Result<()> {
        write_durably(path, serde_json::to_string(self)?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// Moves partitions from the layout of `from_workers` shards to `config.workers`.
pub fn run(config: &Config, from_workers: usize) -> anyhow::Result<()> {
    let to_workers = config.workers;
    let partitions = config.storage.partitions;
    let status = StatusTable::open(&config.status_path()).ok();
    let shard_count = from_workers.max(to_workers);
    let mut shards = Vec::with_capacity(shard_count);
    for index in 0..shard_count {
        let options = StoreOptions {
            shard_id: index as u32,
            collections: config.storage.collections,
            partitions,
            workers: None,
            durability: shoal_shared::config::Durability::Fsync,
            map_size_bytes: config.storage.map_size_bytes,
            max_map_size_bytes: config.storage.max_map_size_bytes,
            max_value_bytes: config.client.max_value_bytes,
        };
        let dir = config.shard_dir(index);
        shards.push(
            Store::open(&dir, &options).with_context(|| format!("opening {}", dir.display()))?,
        );
    }
    // Partitions move with their log as `log` holds it: nothing may wait in `recent`.
    for (index, shard) in shards.iter_mut().enumerate() {
        shard.move_recent().with_context(|| {
            format!("moving the newest log entries of shard-{index} before the partitions")
        })?;
    }
    for (index, shard) in shards.iter().enumerate() {
        let prepared = shard.prepared_transactions()?;
        if prepared > 0 {
            bail!(
                "shard-{index} holds {prepared} multi-key transactions in doubt; start once with workers = \
                 {from_workers} so that they are resolved, then change the worker count"
            );
        }
    }

    let map_path = config.partition_map_path();
    let mut map = PartitionMap::load_or_init(&map_path, partitions, from_workers)?;
    let target = |p: u16| (usize::from(p) % to_workers) as u16;
    let moves: Vec<u16> = (0..partitions)
        .filter(|&p| map.owner[usize::from(p)] != target(p))
        .collect();
    let started = Instant::now();
    let mut progress = Rebalance {
        total: moves.len() as u64,
        done: 0,
        bytes: 0,
        started_ms: shoal_shared::now_ms(),
    };
    tracing::info!(
        from_workers,
        to_workers,
        partitions_to_move = moves.len(),
        "changing the worker count"
    );
    if let Some(status) = &status {
        status.set_rebalance(progress);
    }

    for partition in moves {
        let from = usize::from(map.owner[usize::from(partition)]);
        let to = usize::from(target(partition));
        shards[to].clear_partition(partition)?;
        let mut cursor = None;
        loop {
            let chunk = shards[from].export_partition(partition, cursor, CHUNK_BYTES)?;
            shards[to].import_records(&chunk.records)?;
            progress.bytes += chunk.bytes as u64;
            match chunk.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
        }
        map.owner[usize::from(partition)] = to as u16;
        map.store(&map_path)?;
        shards[from].clear_partition(partition)?;
        // LMDB's pages reach the disk, and the journals are trimmed, as a worker does.
        shards[to].checkpoint_tick()?;
        shards[from].checkpoint_tick()?;
        progress.done += 1;
        if let Some(status) = &status {
            status.set_rebalance(progress);
        }
        let elapsed = started.elapsed().as_secs_f64();
        let eta_secs = elapsed / progress.done as f64 * (progress.total - progress.done) as f64;
        tracing::info!(
            partition,
            from,
            to,
            moved = format!("{}/{}", progress.done, progress.total),
            bytes = progress.bytes,
            eta_secs = format!("{eta_secs:.1}"),
            "moved a partition"
        );
    }

    // Whatever a shard holds of partitions it does not own is a leftover of an
    // interrupted move: the owner has the whole partition.
    for (index, shard) in shards.iter_mut().enumerate() {
        let owner = map.owner.clone();
        shard.clear_partitions(&|p| usize::from(owner[usize::from(p)]) != index)?;
    }
    let ids_high_water = shards
        .iter()
        .map(Store::ids_high_water)
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .max();
    for shard in shards.iter_mut().take(to_workers) {
        shard.finish_rebalance(ids_high_water.unwrap_or(0), partitions, to_workers as u16)?;
    }
    drop(shards);
    for index in to_workers..shard_count {
        let dir = config.shard_dir(index);
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("removing the emptied {}", dir.display()))?;
    }
    DataDirLayout {
        partitions,
        workers: to_workers,
    }
    .store(&config.layout_path())
    .context("recording the new worker count")?;
    tracing::info!(
        to_workers,
        moved = progress.done,
        bytes = progress.bytes,
        secs = format!("{:.1}", started.elapsed().as_secs_f64()),
        "worker count changed"
    );
    Ok(())
}

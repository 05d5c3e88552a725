//! Shoal's own commands: `ID.NEW`, `SHOAL.PARTITION`, `SHOAL.LOG`,
//! `SHOAL.FEED` (the change feed over every partition), `SHOAL.TXNS` and
//! `SHOAL.DIGEST` (this host's copy of a partition, to compare replicas).
//!
//! A feed cursor is text: `0` (from the start of the log), `$` (from now), or
//! `partition:commit_id` pairs joined by commas, naming the last commit seen in
//! each partition (partitions not named are at 0). Each reply carries the
//! cursor to pass next, so a client resumes exactly where it stopped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use shoal_shared::frame::{LogEntry, WorkerError, WorkerRequest, WorkerResponse};
use shoal_shared::partition::{key_partition, partition_worker};
use shoal_shared::resp::{parse_i64, Reply};

use super::{call_all_sum, call_one, log_entry_reply, Pending, Session};
use crate::dispatch::{wait_all, Dest};
use crate::errors;
use crate::ids::MAX_COUNT;
use crate::state::Shared;

/// Default and largest COUNT of SHOAL.LOG and SHOAL.FEED.
const LOG_DEFAULT_COUNT: u32 = 100;
const LOG_MAX_COUNT: u32 = 10_000;
/// Longest BLOCK of SHOAL.FEED, and how often a blocked feed looks for new entries.
const FEED_MAX_BLOCK: Duration = Duration::from_secs(60);
const FEED_POLL: Duration = Duration::from_millis(10);

/// Runs `name` if it is one of Shoal's commands; `None` otherwise. Arity is already checked.
pub async fn dispatch(
    shared: &Arc<Shared>,
    _session: &Session,
    name: &str,
    args: &[Bytes],
) -> Option<Pending> {
    let pending = match name {
        "id.new" => {
            let count = match args.get(1).map(|c| parse_i64(c)) {
                None => None,
                Some(Some(n)) if (1..=MAX_COUNT as i64).contains(&n) => Some(n as u64),
                Some(_) => {
                    return Some(Pending::Ready(Reply::error(format!(
                        "ERR count must be between 1 and {MAX_COUNT}"
                    ))))
                }
            };
            let shared = Arc::clone(shared);
            Pending::barrier(async move {
                match shared
                    .ids
                    .allocate(
                        &shared.dispatch,
                        shared.cluster.as_deref(),
                        count.unwrap_or(1),
                    )
                    .await
                {
                    Ok(ids) if count.is_none() => Reply::Integer(ids.start as i64),
                    Ok(ids) => Reply::Array(ids.map(|id| Reply::Integer(id as i64)).collect()),
                    Err(reply) => reply,
                }
            })
        }
        "shoal.partition" => Pending::Ready(Reply::Integer(i64::from(key_partition(
            &args[1],
            shared.config.storage.partitions,
        )))),
        "shoal.log" => read_log(shared, args).await,
        "shoal.feed" => {
            let shared = Arc::clone(shared);
            let args = args.to_vec();
            Pending::barrier(async move { feed(&shared, &args).await })
        }
        "shoal.txns" => call_all_sum(shared, || WorkerRequest::Transactions).await,
        "shoal.digest" => Pending::Ready(digest(shared, &args[1]).await),
        _ => return None,
    };
    Some(pending)
}

fn parse_count(option: &Bytes, value: &Bytes) -> Result<u32, Reply> {
    if !option.eq_ignore_ascii_case(b"COUNT") {
        return Err(errors::syntax());
    }
    parse_i64(value)
        .filter(|n| (1..=i64::from(LOG_MAX_COUNT)).contains(n))
        .map(|n| n as u32)
        .ok_or_else(|| Reply::error(format!("ERR COUNT must be between 1 and {LOG_MAX_COUNT}")))
}

/// `SHOAL.LOG partition from_commit_id [COUNT n]`.
async fn read_log(shared: &Shared, args: &[Bytes]) -> Pending {
    let partitions = shared.config.storage.partitions;
    let Some(partition) = parse_i64(&args[1]).filter(|p| (0..i64::from(partitions)).contains(p))
    else {
        return Pending::Ready(Reply::error(format!(
            "ERR partition must be between 0 and {}",
            partitions - 1
        )));
    };
    let Some(from_commit_id) = parse_i64(&args[2]).filter(|id| *id >= 0) else {
        return Pending::Ready(errors::not_integer());
    };
    let count = match &args[3..] {
        [] => LOG_DEFAULT_COUNT,
        [option, value] => match parse_count(option, value) {
            Ok(count) => count,
            Err(reply) => return Pending::Ready(reply),
        },
        _ => return Pending::Ready(errors::syntax()),
    };
    let partition = partition as u16;
    call_one(
        shared,
        shared.dispatch.of_partition(partition),
        WorkerRequest::ReadLog {
            partition,
            from_commit_id: from_commit_id as u64,
            count,
        },
    )
    .await
}

/// `SHOAL.DIGEST partition` → `[last_commit_id, keys, checksum]` of this host's copy
/// (the checksum as 16 hex digits), or an error when this host holds no copy.
async fn digest(shared: &Shared, partition: &Bytes) -> Reply {
    let partitions = shared.config.storage.partitions;
    let Some(partition) = parse_i64(partition).filter(|p| (0..i64::from(partitions)).contains(p))
    else {
        return Reply::error(format!(
            "ERR partition must be between 0 and {}",
            partitions - 1
        ));
    };
    let partition = partition as u16;
    if shared
        .cluster
        .as_ref()
        .is_some_and(|node| !node.holds_copy(partition))
    {
        return Reply::error(format!(
            "ERR this host holds no copy of partition {partition}"
        ));
    }
    let worker = partition_worker(partition, shared.dispatch.links.len());
    if !shared.dispatch.readers.settled(worker) {
        // Write-back: LMDB commits what the worker acknowledged before it is read.
        if let Err(reply) = shared
            .dispatch
            .ask_dest(Dest::Worker(worker), WorkerRequest::Settle)
            .await
        {
            return reply;
        }
    }
    match shared.dispatch.readers.digest(worker, partition) {
        Ok(digest) => Reply::Array(vec![
            Reply::Integer(digest.last_commit_id as i64),
            Reply::Integer(digest.keys as i64),
            Reply::Bulk(format!("{:016x}", digest.checksum).into_bytes().into()),
        ]),
        Err(error) => Reply::error(format!("ERR cannot read partition {partition}: {error}")),
    }
}

/// Parses a feed cursor into the last commit id seen per partition.
fn parse_cursor(text: &[u8], partitions: u16) -> Option<Vec<u64>> {
    let mut seen = vec![0; usize::from(partitions)];
    if text == b"0" {
        return Some(seen);
    }
    for pair in std::str::from_utf8(text).ok()?.split(',') {
        let (partition, commit_id) = pair.split_once(':')?;
        let partition: usize = partition.parse().ok()?;
        *seen.get_mut(partition)? = commit_id.parse().ok()?;
    }
    Some(seen)
}

fn format_cursor(seen: &[u64]) -> String {
    let pairs: Vec<String> = seen
        .iter()
        .enumerate()
        .filter(|(_, id)| **id > 0)
        .map(|(p, id)| format!("{p}:{id}"))
        .collect();
    if pairs.is_empty() {
        "0".into()
    } else {
        pairs.join(",")
    }
}

/// `SHOAL.FEED cursor [COUNT n] [BLOCK ms]` → `[next_cursor, [[partition, commit_id, ...], ...]]`.
async fn feed(shared: &Shared, args: &[Bytes]) -> Reply {
    let partitions = shared.config.storage.partitions;
    let mut count = LOG_DEFAULT_COUNT;
    let mut block = None;
    let mut options = args[2..].iter();
    while let Some(option) = options.next() {
        let Some(value) = options.next() else {
            return errors::syntax();
        };
        if option.eq_ignore_ascii_case(b"BLOCK") {
            match parse_i64(value) {
                Some(ms) if ms >= 0 => {
                    block = Some(Duration::from_millis(ms as u64).min(FEED_MAX_BLOCK))
                }
                _ => return Reply::error("ERR timeout is not an integer or out of range"),
            }
        } else {
            match parse_count(option, value) {
                Ok(n) => count = n,
                Err(reply) => return reply,
            }
        }
    }
    let mut seen = if args[1].as_ref() == b"$" {
        let mut seen = vec![0; usize::from(partitions)];
        match wait_all(
            shared
                .dispatch
                .send_everywhere(|| WorkerRequest::LastCommitIds)
                .await,
        )
        .await
        {
            Ok(responses) => {
                for response in responses {
                    if let WorkerResponse::Positions(positions) = response {
                        for (partition, last) in positions {
                            if let Some(slot) = seen.get_mut(usize::from(partition)) {
                                *slot = (*slot).max(last);
                            }
                        }
                    }
                }
            }
            Err(reply) => return reply,
        }
        seen
    } else {
        match parse_cursor(&args[1], partitions) {
            Some(seen) => seen,
            None => return Reply::error(
                "ERR invalid feed cursor: use 0, $, or the cursor a previous SHOAL.FEED returned",
            ),
        }
    };
    let deadline = Instant::now() + block.unwrap_or_default();
    loop {
        let entries = match read_feed(shared, &seen, count).await {
            Ok(entries) => entries,
            Err(reply) => return reply,
        };
        if !entries.is_empty()
            || block.is_none()
            || Instant::now() >= deadline
            || shared
                .shutting_down
                .load(std::sync::atomic::Ordering::Acquire)
        {
            for entry in &entries {
                let slot = &mut seen[usize::from(entry.partition)];
                *slot = (*slot).max(entry.commit_id);
            }
            let entries = entries
                .into_iter()
                .map(|entry| log_entry_reply(entry, true))
                .collect();
            return Reply::Array(vec![
                Reply::bulk(format_cursor(&seen)),
                Reply::Array(entries),
            ]);
        }
        tokio::time::sleep(FEED_POLL).await;
    }
}

/// Reads up to `count` entries after `seen` from every worker (in a cluster, each
/// partition from its owner), in partition order.
async fn read_feed(shared: &Shared, seen: &[u64], count: u32) -> Result<Vec<LogEntry>, Reply> {
    let workers = shared.dispatch.links.len();
    let mut calls = Vec::new();
    match &shared.dispatch.router {
        // Each host reads the partitions it owns, on all its workers.
        Some(router) => {
            let owners = router.owners();
            let mut hosts: Vec<u64> = owners.clone();
            hosts.sort_unstable();
            hosts.dedup();
            for host in hosts {
                let positions = seen
                    .iter()
                    .enumerate()
                    .filter(|(partition, _)| owners.get(*partition) == Some(&host))
                    .map(|(partition, id)| (partition as u16, *id))
                    .collect();
                calls.push(router.send_to_host(host, WorkerRequest::ReadFeed { positions, count }));
            }
        }
        None => {
            for worker in 0..workers {
                let positions = seen
                    .iter()
                    .enumerate()
                    .filter(|(partition, _)| partition_worker(*partition as u16, workers) == worker)
                    .map(|(partition, id)| (partition as u16, *id))
                    .collect();
                calls.push(
                    shared.dispatch.links[worker]
                        .send(WorkerRequest::ReadFeed { positions, count })
                        .await,
                );
            }
        }
    }
    let mut entries = Vec::new();
    for call in calls {
        match call.wait().await {
            Ok(WorkerResponse::Log(found)) => entries.extend(found),
            Ok(WorkerResponse::Error(WorkerError::LogTrimmed {
                partition,
                trimmed_through,
            })) => {
                return Err(Reply::error(format!(
                    "ERR the feed cursor is behind the retained log: partition {partition} was trimmed through \
                     commit {trimmed_through} (storage.log_retention_*); restart from '$' after copying the data"
                )));
            }
            Ok(WorkerResponse::Error(error)) => return Err(errors::worker_error(&error)),
            Ok(_) => return Err(Reply::error("ERR internal error: unexpected feed response")),
            Err(error) => return Err(errors::link_error(&error)),
        }
    }
    entries.sort_by_key(|entry| (entry.partition, entry.commit_id));
    entries.truncate(count as usize);
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        assert_eq!(parse_cursor(b"0", 4), Some(vec![0, 0, 0, 0]));
        let seen = vec![0, 7, 0, 12];
        assert_eq!(format_cursor(&seen), "1:7,3:12");
        assert_eq!(parse_cursor(b"1:7,3:12", 4), Some(seen));
        assert_eq!(parse_cursor(b"9:1", 4), None);
        assert_eq!(parse_cursor(b"x", 4), None);
        assert_eq!(format_cursor(&[0, 0]), "0");
    }
}

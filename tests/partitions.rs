//! Data across hosts: real `shoal serve` hosts on 127.0.T.x (see `common::cluster`)
//! place partitions by capacity, move them when hosts join and leave, and answer any
//! key through any host. Each test writes keys through some hosts and reads them
//! back through others; each prints what it measured.
//!
//! `SHOAL_PARTITION_KEYS` sets how many keys the reading test writes (default 20,000;
//! the figure is 1,000,000).

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{env_count, wait_until};

const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Partitions owned by each live host, once no partition is moving and every live host
/// has the same NI version.
fn try_settled(cluster: &Cluster) -> Result<BTreeMap<usize, usize>, String> {
    let mut owned = BTreeMap::new();
    let mut versions = HashSet::new();
    for i in cluster.live() {
        let info = cluster.try_info(i)?;
        let field = |name: &str| -> Result<usize, String> {
            info.get(name)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("host {i}: no {name} in {info:?}"))
        };
        if field("shoal_partitions_moving")? != 0 || field("shoal_partitions_misplaced")? != 0 {
            return Err(format!("host {i}: partitions still moving"));
        }
        versions.insert(field("shoal_ni_version")?);
        owned.insert(i, field("shoal_partitions_owned")?);
    }
    if versions.len() != 1 {
        return Err(format!("hosts disagree on the NI: versions {versions:?}"));
    }
    Ok(owned)
}

/// Waits until the table settles with every partition on a live host and `check` holds.
fn wait_settled(
    cluster: &Cluster,
    what: &str,
    check: impl Fn(&BTreeMap<usize, usize>) -> Result<(), String>,
) -> BTreeMap<usize, usize> {
    cluster
        .wait_for(what, SETTLE_TIMEOUT, |c| {
            let owned = try_settled(c)?;
            if owned.values().sum::<usize>() != 256 {
                return Err(format!("live hosts own {owned:?}, not all 256 partitions"));
            }
            check(&owned)?;
            Ok(owned)
        })
        .0
}

/// Every live host owns its share of the partitions, within `tolerance` of `weights`.
fn proportional(
    weights: &[(usize, f64)],
    tolerance: f64,
) -> impl Fn(&BTreeMap<usize, usize>) -> Result<(), String> + '_ {
    move |owned| {
        let total: f64 = weights.iter().map(|(_, w)| w).sum();
        for (host, weight) in weights {
            let expected = 256.0 * weight / total;
            let got = *owned.get(host).unwrap_or(&0) as f64;
            if (got - expected).abs() > expected * tolerance {
                return Err(format!(
                    "host {host} owns {got} partitions, expected {expected:.1} (±{:.0}%): {owned:?}",
                    tolerance * 100.0
                ));
            }
        }
        Ok(())
    }
}

fn key(prefix: &str, i: usize) -> String {
    format!("{prefix}:{i}")
}

fn value(i: usize) -> String {
    format!("value-{i}")
}

/// Whether an error reply is one a client may retry (the command was not applied, or
/// its outcome is unknown and retrying a SET is harmless).
fn retriable(error: &redis::RedisError) -> bool {
    error.code() == Some("TRYAGAIN") || error.is_io_error() || error.is_timeout()
}

/// Writes keys `range` of `prefix` through the hosts in turn, 500 per pipeline; a batch
/// that fails with a retriable error is sent again.
fn write_keys(cluster: &Cluster, prefix: &str, range: std::ops::Range<usize>) {
    let hosts = cluster.live();
    let mut conns: Vec<redis::Connection> = hosts
        .iter()
        .map(|&i| cluster.host(i).server.conn())
        .collect();
    let started = Instant::now();
    let total = range.len();
    let mut batch_start = range.start;
    let mut turn = 0;
    while batch_start < range.end {
        let batch_end = (batch_start + 500).min(range.end);
        let mut pipe = redis::pipe();
        for i in batch_start..batch_end {
            pipe.cmd("SET").arg(key(prefix, i)).arg(value(i)).ignore();
        }
        let con = &mut conns[turn % hosts.len()];
        turn += 1;
        match pipe.query::<()>(con) {
            Ok(()) => batch_start = batch_end,
            Err(error) if retriable(&error) => {
                // A backoff before the batch is sent again, not a wait for a condition.
                std::thread::sleep(Duration::from_millis(50));
                if error.is_io_error() {
                    let i = hosts[(turn - 1) % hosts.len()];
                    *con = cluster.host(i).server.conn();
                }
            }
            Err(error) => panic!("SET batch at {batch_start}: {error}"),
        }
    }
    eprintln!(
        "wrote {total} keys through {} hosts in {:.1} s",
        hosts.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Reads keys `range` of `prefix` through host `i` with MGET and checks every value.
fn check_keys(cluster: &Cluster, i: usize, prefix: &str, range: std::ops::Range<usize>) {
    let mut con = cluster.host(i).server.conn();
    let started = Instant::now();
    for batch_start in range.clone().step_by(1000) {
        let batch_end = (batch_start + 1000).min(range.end);
        let keys: Vec<String> = (batch_start..batch_end).map(|i| key(prefix, i)).collect();
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query(&mut con)
            .unwrap_or_else(|e| panic!("MGET through host {i}: {e}"));
        for (offset, found) in values.into_iter().enumerate() {
            let n = batch_start + offset;
            assert_eq!(
                found.as_deref(),
                Some(value(n).as_str()),
                "{} read through host {i}",
                key(prefix, n)
            );
        }
    }
    eprintln!(
        "host {i}: {} keys read back in {:.1} s",
        range.len(),
        started.elapsed().as_secs_f64()
    );
}

/// Writers that SET their own keys (`load:<writer>:<n>`, value n) in order, each through
/// one host, until stopped; each records the highest n acknowledged. Retriable errors are
/// retried; any other error is kept and fails [`Load::stop`].
struct Load {
    stop: Arc<AtomicBool>,
    retried: Arc<AtomicU64>,
    fatal: Arc<Mutex<Vec<String>>>,
    acked: Vec<Arc<AtomicU64>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(cluster: &Cluster, through: &[usize]) -> Load {
        let mut load = Load {
            stop: Arc::default(),
            retried: Arc::default(),
            fatal: Arc::default(),
            acked: Vec::new(),
            threads: Vec::new(),
        };
        for (w, &host) in through.iter().cycle().take(4).enumerate() {
            let client = cluster.host(host).server.client();
            let acked = Arc::new(AtomicU64::new(0));
            load.acked.push(Arc::clone(&acked));
            let (stop, retried, fatal) = (
                Arc::clone(&load.stop),
                Arc::clone(&load.retried),
                Arc::clone(&load.fatal),
            );
            load.threads.push(std::thread::spawn(move || {
                let mut con = common::connect(&client);
                let mut next = 1u64;
                let deadline = Instant::now() + Duration::from_secs(300);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let result: redis::RedisResult<()> = redis::cmd("SET")
                        .arg(format!("load:{w}:{next}"))
                        .arg(next)
                        .query(&mut con);
                    match result {
                        Ok(()) => {
                            acked.store(next, Ordering::Relaxed);
                            next += 1;
                        }
                        Err(error) if retriable(&error) => {
                            retried.fetch_add(1, Ordering::Relaxed);
                            if error.is_io_error() {
                                con = common::connect(&client);
                            }
                        }
                        Err(error) => {
                            fatal.lock().unwrap().push(error.to_string());
                            return;
                        }
                    }
                }
            }));
        }
        load
    }

    /// Stops the writers; returns the writes acknowledged. Fails on a non-retriable error.
    fn stop(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            thread.join().expect("writer thread");
        }
        let fatal = self.fatal.lock().unwrap().clone();
        assert!(
            fatal.is_empty(),
            "clients saw non-retriable errors: {fatal:?}"
        );
        self.keys() as u64
    }

    fn retried(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    /// Waits (bounded) until every writer has had `more` writes acknowledged from now on;
    /// fails on a writer's non-retriable error.
    fn wait_for_writes(&self, more: u64, what: &str) {
        let from: Vec<u64> = self
            .acked
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect();
        wait_until(
            &format!("every writer to have {more} more writes acknowledged ({what})"),
            Duration::from_secs(60),
            || {
                let fatal = self.fatal.lock().unwrap().clone();
                assert!(
                    fatal.is_empty(),
                    "clients saw non-retriable errors: {fatal:?}"
                );
                let now: Vec<u64> = self
                    .acked
                    .iter()
                    .map(|a| a.load(Ordering::Relaxed))
                    .collect();
                if now.iter().zip(&from).all(|(now, from)| now - from >= more) {
                    Ok(())
                } else {
                    Err(format!("acknowledged {now:?}, from {from:?}"))
                }
            },
        );
    }

    /// Keys written (each writer's keys are 1..=acked).
    fn keys(&self) -> usize {
        self.acked
            .iter()
            .map(|a| a.load(Ordering::Relaxed) as usize)
            .sum()
    }

    /// Every acknowledged write reads back through host `i` (a sample of each writer's
    /// keys, and its last one).
    fn check(&self, cluster: &Cluster, i: usize) {
        let mut con = cluster.host(i).server.conn();
        for (w, acked) in self.acked.iter().enumerate() {
            let last = acked.load(Ordering::Relaxed);
            let step = (last as usize / 500).max(1);
            for n in (1..=last).step_by(step).chain([last]).filter(|&n| n > 0) {
                let found: Option<u64> = redis::cmd("GET")
                    .arg(format!("load:{w}:{n}"))
                    .query(&mut con)
                    .expect("GET");
                assert_eq!(found, Some(n), "load:{w}:{n} through host {i}");
            }
        }
    }
}

fn dbsize(cluster: &Cluster, i: usize) -> usize {
    let mut con = cluster.host(i).server.conn();
    redis::cmd("DBSIZE").query(&mut con).expect("DBSIZE")
}

fn info_u64(cluster: &Cluster, i: usize, name: &str) -> u64 {
    cluster
        .info(i)
        .get(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("host {i}: no {name}"))
}

#[test]
fn keys_written_through_any_host_read_back_through_every_host() {
    let cluster = Cluster::start(3, "");
    let owned = wait_settled(
        &cluster,
        "three equal shares",
        proportional(&[(1, 1.0), (2, 1.0), (3, 1.0)], 0.1),
    );
    eprintln!("partitions per host: {owned:?}");
    let n = env_count("SHOAL_PARTITION_KEYS", 20_000) as usize;
    write_keys(&cluster, "k", 0..n);
    for i in 1..=3 {
        check_keys(&cluster, i, "k", 0..n);
        assert_eq!(dbsize(&cluster, i), n, "DBSIZE through host {i}");
    }
    // CLUSTER SLOTS names an owner for every slot, and the owners are the three hosts.
    let slots = cluster_slots(&cluster, 1);
    let owners: HashSet<&String> = slots.iter().map(|(_, _, owner)| owner).collect();
    assert_eq!(owners.len(), 3, "CLUSTER SLOTS: {slots:?}");
    let covered: usize = slots
        .iter()
        .map(|(first, last, _)| usize::from(last - first) + 1)
        .sum();
    assert_eq!(covered, 16384);
    // A pipeline of GETs through one host: the keys of the other hosts go to them in
    // batches of reads, and every value comes back in its place.
    for i in 1..=3 {
        let before = (
            info_u64(&cluster, i, "shoal_read_batches"),
            info_u64(&cluster, i, "shoal_reads_batched"),
        );
        let mut con = cluster.host(i).server.conn();
        let mut pipe = redis::pipe();
        let count = n.min(3000);
        for k in 0..count {
            pipe.cmd("GET").arg(key("k", k));
        }
        let values: Vec<Option<String>> = pipe.query(&mut con).expect("GET pipeline");
        for (k, found) in values.iter().enumerate() {
            assert_eq!(
                found.as_deref(),
                Some(value(k).as_str()),
                "GET {} through host {i}",
                key("k", k)
            );
        }
        let batches = info_u64(&cluster, i, "shoal_read_batches") - before.0;
        let batched = info_u64(&cluster, i, "shoal_reads_batched") - before.1;
        eprintln!("host {i}: {count} GETs, {batched} of them answered in {batches} batches");
        // About two thirds of the keys are on the other two hosts.
        assert!(
            batched >= count as u64 / 5,
            "host {i}: only {batched} of {count} GETs were answered in batches"
        );
        assert!(
            batches * 8 <= batched,
            "host {i}: {batched} reads took {batches} batches (fewer than 8 reads a batch)"
        );
    }
    // A pipeline through one host keeps its order for each key, wherever the key lives.
    for i in 1..=3 {
        let mut con = cluster.host(i).server.conn();
        let mut pipe = redis::pipe();
        for round in 0..200 {
            let key = format!("order:{}", round % 7);
            pipe.cmd("SET").arg(&key).arg(round).cmd("GET").arg(&key);
        }
        let replies: Vec<redis::Value> = pipe.query(&mut con).expect("pipeline");
        for (round, pair) in replies.chunks(2).enumerate() {
            assert_eq!(
                redis::from_redis_value::<u64>(pair[1].clone()).expect("GET"),
                round as u64,
                "GET after SET in one pipeline through host {i}"
            );
        }
    }
    // Large values: the answers of one batch carry at most 16 MiB of them, and the reads
    // past that are forwarded one by one; each value still comes back in its place.
    let big = |k: usize| vec![b'a' + (k % 26) as u8; 1 << 20];
    let mut con = cluster.host(1).server.conn();
    for k in 0..48 {
        let () = redis::cmd("SET")
            .arg(key("big", k))
            .arg(big(k))
            .query(&mut con)
            .expect("SET of 1 MiB");
    }
    let mut pipe = redis::pipe();
    for k in 0..48 {
        pipe.cmd("GET").arg(key("big", k));
    }
    let values: Vec<Vec<u8>> = pipe.query(&mut con).expect("GET pipeline of 1 MiB values");
    for (k, found) in values.iter().enumerate() {
        assert!(*found == big(k), "GET {} through host 1", key("big", k));
    }
}

#[test]
fn a_host_joining_under_load_takes_its_share_and_no_write_is_lost() {
    let mut cluster = Cluster::start(3, "");
    wait_settled(
        &cluster,
        "three equal shares",
        proportional(&[(1, 1.0), (2, 1.0), (3, 1.0)], 0.1),
    );
    write_keys(&cluster, "base", 0..5_000);

    let mut load = Load::start(&cluster, &[1, 2, 3]);
    load.wait_for_writes(500, "before the join");
    let joined_at = Instant::now();
    let fourth = cluster.add_host(1, "");
    let owned = wait_settled(
        &cluster,
        "the fourth host to take its share",
        proportional(&[(1, 1.0), (2, 1.0), (3, 1.0), (fourth, 1.0)], 0.1),
    );
    let settled_secs = joined_at.elapsed().as_secs_f64();
    load.wait_for_writes(200, "after the fourth host took its share");
    let writes = load.stop();
    eprintln!(
        "host {fourth} joined under load: partitions {owned:?} settled after {settled_secs:.1} s; \
         {writes} writes acknowledged, {} retried",
        load.retried()
    );
    for i in cluster.live() {
        load.check(&cluster, i);
        check_keys(&cluster, i, "base", 0..5_000);
    }
    let mut pauses = Vec::new();
    for i in cluster.live() {
        let done = info_u64(&cluster, i, "shoal_handoffs_completed");
        if done > 0 {
            pauses.push((i, done, info_u64(&cluster, i, "shoal_handoff_pause_us_max")));
        }
    }
    eprintln!("handoffs (host, completed, longest write pause µs): {pauses:?}");
    assert!(
        pauses
            .iter()
            .any(|(host, done, _)| *host == fourth && *done > 0),
        "host {fourth} drove no handoff"
    );
}

#[test]
fn partitions_follow_capacities_one_two_four() {
    let gib = 1u64 << 30;
    let mut cluster = Cluster::launch(1, &format!("[storage]\ncapacity_bytes = {gib}\n"));
    let seed = cluster.host(1).peer_addr();
    for capacity in [2 * gib, 4 * gib] {
        let host = cluster.configure_host(
            &[seed],
            &format!("[storage]\ncapacity_bytes = {capacity}\n"),
        );
        cluster.spawn_host(host);
    }
    let owned = wait_settled(
        &cluster,
        "shares of 1:2:4",
        proportional(&[(1, 1.0), (2, 2.0), (3, 4.0)], 0.1),
    );
    let n = 14_000;
    write_keys(&cluster, "cap", 0..n);
    // Keys per host, from the slots each owns.
    let slots = cluster_slots(&cluster, 1);
    let mut keys_per_host: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..n {
        let owner = owner_of(&slots, slot_of(&key("cap", i)));
        *keys_per_host.entry(owner).or_default() += 1;
    }
    eprintln!("capacities 1:2:4 → partitions {owned:?}, keys per host {keys_per_host:?}");
    let mut counts: Vec<usize> = keys_per_host.values().copied().collect();
    counts.sort_unstable();
    assert_eq!(counts.len(), 3);
    for (count, share) in counts.iter().zip([1.0, 2.0, 4.0]) {
        let expected = n as f64 * share / 7.0;
        assert!(
            (*count as f64 - expected).abs() <= expected * 0.1,
            "keys per host {keys_per_host:?}: {count} is not within 10% of {expected:.0}"
        );
    }
    check_keys(&cluster, 3, "cap", 0..n);
}

/// `(first slot, last slot, "ip:port")` of `CLUSTER SLOTS` on host `i`.
fn cluster_slots(cluster: &Cluster, i: usize) -> Vec<(u16, u16, String)> {
    let mut con = cluster.host(i).server.conn();
    let value: redis::Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query(&mut con)
        .expect("CLUSTER SLOTS");
    let redis::Value::Array(ranges) = value else {
        panic!("CLUSTER SLOTS answered {value:?}")
    };
    ranges
        .into_iter()
        .map(|range| {
            let redis::Value::Array(fields) = range else {
                panic!("bad range")
            };
            let int = |v: &redis::Value| match v {
                redis::Value::Int(n) => *n as u16,
                other => panic!("not an integer: {other:?}"),
            };
            let redis::Value::Array(node) = &fields[2] else {
                panic!("bad node")
            };
            let ip = match &node[0] {
                redis::Value::BulkString(bytes) => String::from_utf8_lossy(bytes).to_string(),
                other => panic!("bad ip {other:?}"),
            };
            (
                int(&fields[0]),
                int(&fields[1]),
                format!("{ip}:{}", int(&node[1])),
            )
        })
        .collect()
}

fn slot_of(key: &str) -> u16 {
    shoal_shared::partition::key_slot(key.as_bytes())
}

fn owner_of(slots: &[(u16, u16, String)], slot: u16) -> String {
    slots
        .iter()
        .find(|(first, last, _)| (*first..=*last).contains(&slot))
        .map(|(_, _, owner)| owner.clone())
        .unwrap_or_else(|| panic!("no owner for slot {slot}"))
}

#[test]
fn shoal_leave_on_a_loaded_host_hands_everything_off_and_loses_nothing() {
    let cluster = Cluster::start(3, "");
    wait_settled(
        &cluster,
        "three equal shares",
        proportional(&[(1, 1.0), (2, 1.0), (3, 1.0)], 0.1),
    );
    let n = 10_000;
    write_keys(&cluster, "leave", 0..n);
    let leaving_id = cluster.host_id(3);
    let mut load = Load::start(&cluster, &[3, 1]);
    let server = &cluster.host(3).server;
    let mut command = server.command();
    command
        .arg("leave")
        .arg("--config")
        .arg(&server.config_path);
    let started = Instant::now();
    let output = common::run_with_timeout(command, SETTLE_TIMEOUT).expect("shoal leave finishes");
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!(
        "shoal leave printed:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "shoal leave failed");
    assert!(stdout.contains("left the cluster"), "{stdout}");
    let writes = load.stop();
    for i in [1, 2] {
        let entries = cluster.try_hosts(i).expect("SHOAL.HOSTS");
        assert!(
            entries.iter().all(|entry| entry.id != leaving_id),
            "host {i} still lists host 3"
        );
    }
    eprintln!(
        "host 3 handed off and left under load in {:.1} s; {writes} writes acknowledged meanwhile",
        started.elapsed().as_secs_f64()
    );
    for i in [1, 2] {
        check_keys(&cluster, i, "leave", 0..n);
        load.check(&cluster, i);
        assert_eq!(
            dbsize(&cluster, i),
            n + load.keys(),
            "DBSIZE through host {i}"
        );
    }
}

#[test]
fn killing_source_and_target_mid_handoff_keeps_every_key_once() {
    let mut cluster = Cluster::start(2, "");
    wait_settled(
        &cluster,
        "two equal shares",
        proportional(&[(1, 1.0), (2, 1.0)], 0.1),
    );
    let n = 20_000;
    write_keys(&cluster, "crash", 0..n);
    let third = cluster.add_host(1, "");
    // Kill the target and a source while partitions are moving.
    cluster.wait_for("a handoff to start", Duration::from_secs(60), |c| {
        let moving = c
            .try_info(1)?
            .get("shoal_partitions_moving")
            .cloned()
            .unwrap_or_default();
        if moving != "0" && !moving.is_empty() {
            Ok(())
        } else {
            Err(format!("moving = {moving:?}"))
        }
    });
    cluster.wait_for(
        "the new host to complete a handoff while others are still moving",
        Duration::from_secs(60),
        |c| {
            let completed = c
                .try_info(third)?
                .get("shoal_handoffs_completed")
                .cloned()
                .unwrap_or_default();
            let moving = c
                .try_info(1)?
                .get("shoal_partitions_moving")
                .cloned()
                .unwrap_or_default();
            match (completed.parse::<u64>(), moving.parse::<u64>()) {
                (Ok(1..), Ok(1..)) => Ok(()),
                (_, Ok(0)) => {
                    eprintln!(
                        "every move finished before the kill (host {third} completed \
                         {completed}); write more keys to kill mid-handoff"
                    );
                    Ok(())
                }
                _ => Err(format!("completed = {completed:?}, moving = {moving:?}")),
            }
        },
    );
    cluster.kill(third);
    cluster.kill(2);
    // Part of the fault, not a wait for a condition: both hosts stay down a moment.
    std::thread::sleep(Duration::from_secs(1));
    cluster.host_mut(2).server.restart();
    cluster.host_mut(third).server.restart();
    let owned = wait_settled(
        &cluster,
        "the moves to finish after the restarts",
        proportional(&[(1, 1.0), (2, 1.0), (third, 1.0)], 0.1),
    );
    eprintln!("after kill -9 of source and target mid-handoff: {owned:?}");
    for i in 1..=3 {
        check_keys(&cluster, i, "crash", 0..n);
        assert_eq!(
            dbsize(&cluster, i),
            n,
            "every key once, DBSIZE through host {i}"
        );
    }
}

#[test]
fn a_full_scan_through_one_host_returns_every_key_of_four_hosts_and_flushall_empties_them() {
    let cluster = Cluster::start(4, "");
    wait_settled(
        &cluster,
        "four equal shares",
        proportional(&[(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0)], 0.1),
    );
    let n = 8_000;
    write_keys(&cluster, "scan", 0..n);
    let mut con = cluster.host(2).server.conn();
    let mut cursor = "0".to_string();
    let mut seen = HashSet::new();
    let mut calls = 0;
    loop {
        let (next, keys): (String, Vec<String>) = redis::cmd("SCAN")
            .arg(&cursor)
            .arg("COUNT")
            .arg(500)
            .query(&mut con)
            .expect("SCAN");
        calls += 1;
        seen.extend(keys);
        if next == "0" {
            break;
        }
        cursor = next;
        assert!(calls < 10_000, "SCAN does not end");
    }
    let expected: HashSet<String> = (0..n).map(|i| key("scan", i)).collect();
    assert_eq!(seen, expected, "SCAN through host 2 returns every key once");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("scan:*")
        .query(&mut con)
        .expect("KEYS");
    assert_eq!(keys.len(), n, "KEYS through host 2");
    eprintln!("SCAN through host 2: {n} keys of 4 hosts in {calls} calls");
    // FLUSHALL through one host empties every host.
    let mut con = cluster.host(3).server.conn();
    let () = redis::cmd("FLUSHALL").query(&mut con).expect("FLUSHALL");
    for i in 1..=4 {
        assert_eq!(
            dbsize(&cluster, i),
            0,
            "DBSIZE through host {i} after FLUSHALL"
        );
    }
}

#[test]
fn mset_across_hosts_stays_atomic_when_a_participant_is_killed() {
    let mut cluster = Cluster::start(3, "");
    wait_settled(
        &cluster,
        "three equal shares",
        proportional(&[(1, 1.0), (2, 1.0), (3, 1.0)], 0.1),
    );
    // Keys whose slots are spread over the hosts.
    let keys: Vec<String> = (0..12).map(|i| format!("atomic:{i}")).collect();
    let slots = cluster_slots(&cluster, 1);
    let owners: HashSet<String> = keys.iter().map(|k| owner_of(&slots, slot_of(k))).collect();
    assert!(owners.len() >= 2, "the keys span hosts: {owners:?}");
    // The host killed holds some of the keys; MSETs go through another one.
    let victim = (2..=3)
        .find(|&i| owners.contains(&cluster.host(i).server.addr().to_string()))
        .expect("host 2 or 3 holds some of the keys");
    let client = cluster.host(1).server.client();
    let stop = Arc::new(AtomicBool::new(false));
    // MSETs acknowledged, and MSETs that failed with a retriable error, so far.
    let acknowledged = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, keys) = (Arc::clone(&stop), keys.clone());
        let (acknowledged, failed) = (Arc::clone(&acknowledged), Arc::clone(&failed));
        std::thread::spawn(move || {
            let mut con = common::connect(&client);
            let mut round = 0u64;
            let mut ok = 0u64;
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                round += 1;
                let mut cmd = redis::cmd("MSET");
                for key in &keys {
                    cmd.arg(key).arg(round);
                }
                match cmd.query::<()>(&mut con) {
                    Ok(()) => {
                        ok += 1;
                        acknowledged.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) if retriable(&error) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        if error.is_io_error() {
                            con = common::connect(&client);
                        }
                    }
                    Err(error) => panic!("MSET: {error}"),
                }
            }
            ok
        })
    };
    let writer_done = || {
        writer
            .is_finished()
            .then(|| "the writer stopped".to_string())
    };
    let mset_count = |counter: &AtomicU64, at_least: u64, what: &str| {
        wait_until(what, Duration::from_secs(60), || {
            let count = counter.load(Ordering::Relaxed);
            match writer_done() {
                Some(why) => panic!("{why} while waiting for {what}"),
                None if count >= at_least => Ok(()),
                None => Err(format!("{count} of {at_least}")),
            }
        })
    };
    mset_count(&acknowledged, 50, "50 MSETs acknowledged before the kill");
    cluster.kill(victim);
    let failed_at_kill = failed.load(Ordering::Relaxed);
    mset_count(
        &failed,
        failed_at_kill + 1,
        "an MSET to fail while a host holding its keys is down",
    );
    cluster.host_mut(victim).server.restart();
    let acknowledged_at_restart = acknowledged.load(Ordering::Relaxed);
    mset_count(
        &acknowledged,
        acknowledged_at_restart + 50,
        "50 more MSETs acknowledged after the restart",
    );
    stop.store(true, Ordering::Relaxed);
    let committed = writer.join().expect("writer");
    // Transactions in doubt settle within seconds; then every key holds the same round.
    let (values, _) = cluster.wait_for("the keys to agree", Duration::from_secs(60), |c| {
        let mut con = c.host(1).server.conn();
        let values: Vec<Option<u64>> = redis::cmd("MGET")
            .arg(&keys)
            .query(&mut con)
            .map_err(|e| e.to_string())?;
        let distinct: HashSet<&Option<u64>> = values.iter().collect();
        if distinct.len() == 1 {
            Ok(values)
        } else {
            Err(format!("keys differ: {values:?}"))
        }
    });
    eprintln!(
        "{committed} MSETs of {} keys on {} hosts acknowledged around a kill -9; all keys hold round {:?}",
        keys.len(),
        owners.len(),
        values[0]
    );
    assert!(committed > 0);
}

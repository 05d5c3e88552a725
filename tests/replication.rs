//! Replication across real hosts: `shoal serve` hosts on 127.0.T.x (see
//! `common::cluster`) with `cluster.replicas = 3`. Clients write through some hosts,
//! a host is killed with SIGKILL or cut off with iptables, and every acknowledged
//! write is read back through the survivors; a follower that was away catches up
//! from the log or with a full copy; and single-key histories recorded on both sides
//! of a cut stay linearizable (checked by `common::linearizability`). Each test prints
//! what it measured.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::linearizability::{check, Op, Operation, Outcome, Output, Verdict};
use common::{connect_until, key_slot, test_seed, Answer, Resp, Rng};
use redis::{ConnectionLike, Value};

/// Three copies of 16 partitions, their digests compared every 4 s. Ends in `[storage]`,
/// so a test may add storage keys.
const REPLICATED: &str =
    "[cluster]\nreplicas = 3\ndigest_check_secs = 4\n[storage]\npartitions = 16\n";
/// How long the replicas may take to be placed and caught up at the start.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a failover may take before the reads and writes through survivors resume:
/// the bound is 5 s on default settings; the extra covers the inactive judgement
/// and the metadata leader's election when the primary's host was also the leader.
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);

fn set(cluster: &Cluster, host: usize, key: &str, value: &str) -> Result<(), String> {
    match cluster.query(host, &["SET", key, value])? {
        Resp::Simple(ok) if ok == "OK" => Ok(()),
        other => Err(format!("SET {key} through host {host}: {other:?}")),
    }
}

fn get(cluster: &Cluster, host: usize, key: &str) -> Result<Option<String>, String> {
    match cluster.query(host, &["GET", key])? {
        Resp::Bulk(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Resp::NilBulk | Resp::Null => Ok(None),
        other => Err(format!("GET {key} through host {host}: {other:?}")),
    }
}

/// `get` through `host`, asked again while it fails (a partition handed back to a host
/// that returned answers TRYAGAIN for a moment on a loaded machine).
fn get_served(cluster: &Cluster, host: usize, key: &str) -> Option<String> {
    let what = format!("GET {key} served through host {host}");
    cluster
        .wait_for(&what, RESUME_TIMEOUT, |c| get(c, host, key))
        .0
}

/// Every string in a reply, depth first.
fn strings_of(reply: &Resp) -> Vec<String> {
    match reply {
        Resp::Bulk(bytes) => vec![String::from_utf8_lossy(bytes).into_owned()],
        Resp::Simple(text) => vec![text.clone()],
        Resp::Array(items) => items.iter().flat_map(strings_of).collect(),
        _ => Vec::new(),
    }
}

/// Ok once every live host reports no under-replicated partition, and the primaries
/// are spread: the live hosts (of equal capacity) lead numbers of partitions at most one
/// apart, all 16 together.
fn settled(cluster: &Cluster) -> Result<(), String> {
    let mut led = Vec::new();
    for i in cluster.live() {
        let info = cluster.try_info(i)?;
        match info
            .get("shoal_partitions_under_replicated")
            .map(String::as_str)
        {
            Some("0") => {}
            other => return Err(format!("host {i}: under-replicated partitions {other:?}")),
        }
        let owned = info
            .get("shoal_partitions_owned")
            .and_then(|v| v.parse().ok());
        led.push(owned.unwrap_or(0usize));
    }
    let (least, most) = (led.iter().min(), led.iter().max());
    match (led.iter().sum::<usize>(), least, most) {
        (16, Some(least), Some(most)) if most - least <= 1 => Ok(()),
        _ => Err(format!("the live hosts lead {led:?} partitions")),
    }
}

/// The reply to `args` through `host`, asked again while it fails (a partition that is
/// failing over answers TRYAGAIN or NOREPLICAS for a few seconds).
fn until_served(cluster: &Cluster, host: usize, args: &[&str]) -> Resp {
    let what = format!("{args:?} served through host {host}");
    cluster
        .wait_for(&what, RESUME_TIMEOUT, |c| c.query(host, args))
        .0
}

/// Whether `host` leads the partition of `key`, as its `CLUSTER NODES` says.
fn leads(cluster: &Cluster, host: usize, key: &str) -> bool {
    let slot = shoal_shared::partition::key_slot(key.as_bytes());
    let me = cluster.host_id(host);
    cluster.nodes(host).iter().any(|line| {
        line.host_id == me
            && line
                .slots
                .iter()
                .any(|&(first, last)| (first..=last).contains(&slot))
    })
}

#[test]
fn every_acknowledged_write_survives_the_kill_of_the_primary_host() {
    let mut cluster = Cluster::start(3, REPLICATED);
    cluster.wait_voters(3, Duration::from_secs(60));
    let started = Instant::now();
    let (_, took) = cluster.wait_for(
        "every partition on three hosts, in sync, the primaries spread",
        SETTLE_TIMEOUT,
        settled,
    );
    println!("every partition had its three copies in sync after {took:?}");
    // CLUSTER SHARDS shows each shard's primary and two replicas, all online.
    let shards = match cluster
        .query(2, &["CLUSTER", "SHARDS"])
        .expect("CLUSTER SHARDS")
    {
        Resp::Array(shards) => shards,
        other => panic!("CLUSTER SHARDS: {other:?}"),
    };
    assert!(!shards.is_empty());
    for shard in &shards {
        let words = strings_of(shard);
        let count = |word: &str| words.iter().filter(|w| *w == word).count();
        assert_eq!(
            (count("master"), count("replica"), count("online")),
            (1, 2, 3),
            "{words:?}"
        );
    }
    let led = |c: &Cluster, host: usize, field: &str| -> u64 {
        c.info_section(host, "replication")
            .get(field)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // The primaries were handed over from the founder until spread; every host holds a
    // copy of every partition.
    let led_by_1 = led(&cluster, 1, "shoal_partitions_led");
    let mut handovers = 0;
    for host in 1..=3 {
        let (leads, follows) = (
            led(&cluster, host, "shoal_partitions_led"),
            led(&cluster, host, "shoal_partitions_followed"),
        );
        assert!((5..=6).contains(&leads), "host {host} leads {leads}");
        assert_eq!(leads + follows, 16, "host {host}");
        handovers += led(&cluster, host, "shoal_handovers_led");
    }
    assert!(handovers > 0, "no handover recorded");
    let mut acknowledged: BTreeMap<String, String> = BTreeMap::new();
    let mut refused = 0;
    for i in 0..300 {
        let key = format!("key:{i}");
        let value = format!("value-{i}");
        match set(&cluster, 2 + i % 2, &key, &value) {
            Ok(()) => {
                acknowledged.insert(key, value);
            }
            Err(_) => refused += 1,
        }
    }
    println!(
        "{} writes acknowledged, {refused} refused, in {:?}",
        acknowledged.len(),
        started.elapsed()
    );
    assert!(
        acknowledged.len() >= 290,
        "too many writes refused: {refused}"
    );
    copies_serve_wait_readonly_and_show_their_offsets(&cluster, &acknowledged);
    // Clients write without pause through the survivors-to-be while host 1 dies.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| spawn_writer(&cluster, 2 + w % 2, w, Arc::clone(&stop)))
        .collect();
    sleep(Duration::from_millis(500));
    // Host 1 founded the cluster, leads the metadata group and a third of the partitions.
    cluster.kill(1);
    let killed = Instant::now();
    if std::env::var_os("SHOAL_SHOW_FAILOVER").is_some() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        println!(
            "killed at {}.{:03} (Unix s)",
            now.as_secs() % 86400,
            now.subsec_millis()
        );
    }
    let (_, resumed) = cluster.wait_for("a write through a survivor", RESUME_TIMEOUT, |c| {
        (0..16).try_for_each(|i| set(c, 3, &format!("after{{{i}}}"), "y"))
    });
    println!("writes to every partition resumed {resumed:?} after the kill");
    sleep(Duration::from_secs(2));
    let writes = stop_writers(writers, killed - Duration::from_millis(500), &stop);
    let (in_doubt, longest_gap) = (writes.failed, writes.longest_gap);
    let writer_keys: Vec<String> = writes.acknowledged.keys().cloned().collect();
    acknowledged.extend(writes.acknowledged);
    println!(
        "the longest a partition went without an acknowledged write: {longest_gap:?}; \
         {} writes failed (in doubt)",
        in_doubt.len()
    );
    assert!(
        longest_gap < WRITE_GAP_BOUND,
        "a writer waited {longest_gap:?} for an acknowledgement"
    );
    if std::env::var_os("SHOAL_SHOW_FAILOVER").is_some() {
        for host in [2, 3] {
            for line in cluster.host(host).server.logs().lines() {
                if line.contains("failover round starts partition=0")
                    || line.contains("new primary partition=0")
                    || line.contains("unfenc")
                    || line.contains("lifting")
                    || line.contains("vote")
                {
                    println!("host {host}: {line}");
                }
            }
        }
    }
    let (lost, checked) =
        cluster.wait_for("every acknowledged write read back", RESUME_TIMEOUT, |c| {
            let mut lost = Vec::new();
            for (key, value) in &acknowledged {
                for host in [2, 3] {
                    let found = get(c, host, key)?;
                    if found.as_deref() != Some(value.as_str()) {
                        lost.push(format!(
                            "{key} through host {host}: {found:?}, wrote {value}"
                        ));
                    }
                }
            }
            Ok(lost)
        });
    println!(
        "read back {} keys through both survivors {:?} after the kill",
        acknowledged.len(),
        checked + resumed
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    // An MGET over many partitions reads through their new primaries too.
    let keys: Vec<&String> = acknowledged.keys().take(50).collect();
    let mut mget = vec!["MGET"];
    mget.extend(keys.iter().map(|k| k.as_str()));
    match cluster.query(3, &mget).expect("MGET through host 3") {
        Resp::Array(values) => {
            let values: Vec<Option<String>> = values
                .iter()
                .map(|v| match v {
                    Resp::Bulk(bytes) => Some(String::from_utf8_lossy(bytes).into_owned()),
                    _ => None,
                })
                .collect();
            let wanted: Vec<Option<String>> =
                keys.iter().map(|k| acknowledged.get(*k).cloned()).collect();
            assert_eq!(values, wanted);
        }
        other => panic!("MGET through host 3: {other:?}"),
    }
    // Host 1's partitions are led by the survivors now, and the failovers were counted
    // (a promotion whose commit its leader did not see confirmed, as when the metadata
    // leader changes under it, is not: the count may fall short of host 1's share).
    wait_until_hosts_2_and_3_lead_all(&cluster, RESUME_TIMEOUT);
    let promoted =
        led(&cluster, 2, "shoal_failovers_led") + led(&cluster, 3, "shoal_failovers_led");
    println!("{promoted} failover promotions recorded; host 1 led {led_by_1} partitions");
    assert!(promoted >= 1, "no failover recorded");
    // Each survivor saw new primaries for the partitions it holds: the handovers that
    // spread them at the start, and the failovers of host 1's.
    for host in [2, 3] {
        let seen = count_of(&cluster, host, "shoal_new_primaries_seen");
        assert!(seen >= led_by_1, "host {host} saw {seen} new primaries");
    }
    // A failed write may or may not have been kept: count those that were. One that
    // failed at its client may still land until its owner gives up on it (the owner
    // waits up to its own deadline for the new primary), so the count is taken again
    // until DBSIZE agrees with it.
    let with_kept = |c: &Cluster| -> Result<i64, String> {
        let mut kept = 0;
        for key in in_doubt
            .iter()
            .filter(|key| !acknowledged.contains_key(*key))
        {
            if get(c, 2, key)?.is_some() {
                kept += 1;
            }
        }
        Ok((acknowledged.len() + kept) as i64 + 16)
    };
    // The keyspace stays exact while the host is down: every key is counted once, by
    // its partition's new primary.
    let (expected, _) = cluster.wait_for("DBSIZE to count the keys found", RESUME_TIMEOUT, |c| {
        let expected = with_kept(c)?;
        match c.query(2, &["DBSIZE"])? {
            Resp::Int(size) if size == expected => Ok(expected),
            other => Err(format!(
                "DBSIZE through host 2: {other:?}, expected {expected}"
            )),
        }
    });
    for host in [2, 3] {
        let (size, _) = cluster.wait_for("an exact DBSIZE", RESUME_TIMEOUT, |c| {
            match c.query(host, &["DBSIZE"])? {
                Resp::Int(size) if size == expected => Ok(size),
                other => Err(format!(
                    "DBSIZE through host {host}: {other:?}, expected {expected}"
                )),
            }
        });
        assert_eq!(size, expected);
        assert_eq!(
            scan_all(&cluster, host),
            expected as usize,
            "SCAN through host {host}"
        );
        let keys = match until_served(&cluster, host, &["KEYS", "*"]) {
            Resp::Array(keys) => keys.len(),
            other => panic!("KEYS through host {host}: {other:?}"),
        };
        assert_eq!(keys, expected as usize, "KEYS through host {host}");
        // The change feed holds every write the clients saw acknowledged during the
        // failover, and shows no key that is not in the keyspace.
        let fed = feed_keys(&cluster, host);
        let missing: Vec<&String> = writer_keys
            .iter()
            .filter(|key| !fed.contains(*key))
            .collect();
        assert!(
            missing.is_empty(),
            "SHOAL.FEED through host {host} misses {missing:?}"
        );
        let unknown: Vec<&String> = fed
            .iter()
            .filter(|key| !acknowledged.contains_key(*key) && !in_doubt.contains(key))
            .filter(|key| !key.starts_with("after"))
            .collect();
        assert!(
            unknown.is_empty(),
            "SHOAL.FEED through host {host} shows {unknown:?}"
        );
    }
    // SHOAL.LOG reads each partition's log from its new primary.
    for partition in 0..16 {
        let p = partition.to_string();
        match until_served(&cluster, 3, &["SHOAL.LOG", &p, "0", "COUNT", "1"]) {
            Resp::Array(entries) if !entries.is_empty() => {}
            other => panic!("SHOAL.LOG {partition}: {other:?}"),
        }
    }
    // WAIT counts the followers that hold a write: one survives of each partition's two.
    let mut connection = client_of(&cluster, 2);
    let _: () = redis::cmd("SET")
        .arg("after-kill")
        .arg("z")
        .query(&mut connection)
        .expect("SET");
    // The surviving follower holds it (a handover under way may delay its count).
    let held: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(10_000)
        .query(&mut connection)
        .expect("WAIT");
    assert_eq!(held, 1, "WAIT 1 with one follower host dead");
    // Two cannot: the WAIT waits out its timeout.
    let waited = Instant::now();
    let held: i64 = redis::cmd("WAIT")
        .arg(2)
        .arg(300)
        .query(&mut connection)
        .expect("WAIT");
    assert!(
        held <= 1,
        "WAIT 2 counted {held} followers with one follower host dead"
    );
    assert!(
        waited.elapsed() >= Duration::from_millis(300),
        "WAIT answered before its timeout"
    );
    // FLUSHALL through a survivor empties every partition, the dead host's included.
    match until_served(&cluster, 3, &["FLUSHALL"]) {
        Resp::Simple(ok) if ok == "OK" => {}
        other => panic!("FLUSHALL: {other:?}"),
    }
    for host in [2, 3] {
        assert_eq!(
            cluster.query(host, &["DBSIZE"]).expect("DBSIZE"),
            Resp::Int(0),
            "DBSIZE through host {host} after FLUSHALL"
        );
    }
    println!("total {:?}", killed.elapsed());
}

/// The longest a client writing without pause may wait for an acknowledgement while a
/// primary host dies: the 5 s for the failover, and room for a loaded machine.
const WRITE_GAP_BOUND: Duration = Duration::from_secs(10);

/// The longest a partition may go without an acknowledged write while copies move and
/// primaries are handed over (a handover pauses its partition for a few round trips:
/// 0.2 to 0.6 s measured here, once 2.5 s; the rest is room for a loaded machine).
const HANDOVER_GAP_BOUND: Duration = Duration::from_secs(4);

/// What one writer did: the writes acknowledged (key, value, when), and the keys of
/// those that failed, which may or may not have been kept.
struct WriterLog {
    acknowledged: Vec<(String, String, Instant)>,
    failed: Vec<String>,
}

/// What the writers of [`spawn_writer`] did together.
struct Writes {
    /// The writes acknowledged: key → value.
    acknowledged: BTreeMap<String, String>,
    /// The keys of the writes that failed (they may or may not have been kept).
    failed: Vec<String>,
    /// The longest that one of the 16 partitions went without an acknowledged write,
    /// from `since` until the writers stopped.
    longest_gap: Duration,
}

/// Stops the writers and gathers what they did.
fn stop_writers(
    writers: Vec<std::thread::JoinHandle<WriterLog>>,
    since: Instant,
    stop: &AtomicBool,
) -> Writes {
    stop.store(true, Ordering::Relaxed);
    let mut writes = Writes {
        acknowledged: BTreeMap::new(),
        failed: Vec::new(),
        longest_gap: Duration::ZERO,
    };
    let mut times: BTreeMap<u16, Vec<Instant>> = (0..16).map(|p| (p, vec![since])).collect();
    for writer in writers {
        let log = writer.join().expect("a writer");
        for (key, value, at) in log.acknowledged {
            let slot = shoal_shared::partition::key_slot(key.as_bytes());
            let partition = shoal_shared::partition::slot_partition(slot, 16);
            times.entry(partition).or_default().push(at);
            writes.acknowledged.insert(key, value);
        }
        writes.failed.extend(log.failed);
    }
    let stopped = Instant::now();
    writes.longest_gap = times
        .values_mut()
        .filter_map(|at| {
            at.retain(|&t| t >= since);
            at.sort();
            at.push(stopped);
            at.windows(2).map(|w| w[1] - w[0]).max()
        })
        .max()
        .unwrap_or_default();
    writes
}

/// A client that SETs keys `w{writer}:n` through `host` one after another until `stop`,
/// over all partitions, reconnecting after an error.
fn spawn_writer(
    cluster: &Cluster,
    host: usize,
    writer: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<WriterLog> {
    let url = format!("redis://{}/", cluster.host(host).server.addr());
    std::thread::spawn(move || {
        let client = redis::Client::open(url).expect("client");
        let mut log = WriterLog {
            acknowledged: Vec::new(),
            failed: Vec::new(),
        };
        let mut connection = None;
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            if connection.is_none() {
                connection = connect_until(&client, Instant::now() + Duration::from_secs(5));
            }
            let Some(con) = connection.as_mut() else {
                continue;
            };
            let (key, value) = (format!("w{writer}:{n}"), format!("v{n}"));
            n += 1;
            match redis::cmd("SET").arg(&key).arg(&value).query::<()>(con) {
                Ok(()) => log.acknowledged.push((key, value, Instant::now())),
                Err(error) => {
                    log.failed.push(key);
                    if error.is_io_error() {
                        connection = None;
                    }
                    sleep(Duration::from_millis(20));
                }
            }
        }
        log
    })
}

/// The keys of every entry of `SHOAL.FEED` through `host`, read from the start of the
/// log until the feed has nothing more.
fn feed_keys(cluster: &Cluster, host: usize) -> std::collections::BTreeSet<String> {
    let mut keys = std::collections::BTreeSet::new();
    let mut cursor = "0".to_string();
    loop {
        let reply = until_served(cluster, host, &["SHOAL.FEED", &cursor, "COUNT", "1000"]);
        let Resp::Array(parts) = reply else {
            panic!("SHOAL.FEED: {reply:?}")
        };
        let [Resp::Bulk(next), Resp::Array(entries)] = &parts[..] else {
            panic!("SHOAL.FEED: {parts:?}")
        };
        if entries.is_empty() {
            return keys;
        }
        // An entry: [partition, commit id, time, change, collection, key, data, expiry].
        for entry in entries {
            let Resp::Array(fields) = entry else {
                panic!("a feed entry: {entry:?}")
            };
            if let (Resp::Bulk(change), Resp::Bulk(key)) = (&fields[3], &fields[5]) {
                let key = String::from_utf8_lossy(key).into_owned();
                match change.as_slice() {
                    b"create" | b"update" => keys.insert(key),
                    b"delete" => keys.remove(&key),
                    _ => false,
                };
            }
        }
        cursor = String::from_utf8_lossy(next).into_owned();
    }
}

/// A connection to host `i` through the `redis` crate.
fn client_of(cluster: &Cluster, i: usize) -> redis::Connection {
    let url = format!("redis://{}/", cluster.host(i).server.addr());
    let client = redis::Client::open(url).expect("client");
    connect_until(&client, Instant::now() + Duration::from_secs(10)).expect("a connection")
}

/// On a settled 3-host cluster with `acknowledged` written: `WAIT` counts both followers
/// of a write and waits out its timeout for more than there are; `READONLY` reads are
/// served by the local follower copy and return what was written; `CLUSTER SHARDS`
/// shows every copy's replication-offset, equal across a shard once it settles; and
/// `INFO replication` lists both follower hosts, caught up.
fn copies_serve_wait_readonly_and_show_their_offsets(
    cluster: &Cluster,
    acknowledged: &BTreeMap<String, String>,
) {
    let mut connection = client_of(cluster, 2);
    let keys: Vec<&String> = acknowledged.keys().take(60).collect();
    for key in &keys {
        let _: () = redis::cmd("SET")
            .arg(key.as_str())
            .arg(&acknowledged[*key])
            .query(&mut connection)
            .expect("SET");
    }
    let held: i64 = redis::cmd("WAIT")
        .arg(2)
        .arg(5000)
        .query(&mut connection)
        .expect("WAIT");
    assert_eq!(held, 2, "both followers hold the connection's writes");
    let waited = Instant::now();
    let held: i64 = redis::cmd("WAIT")
        .arg(3)
        .arg(200)
        .query(&mut connection)
        .expect("WAIT");
    assert_eq!(held, 2, "there are only two followers");
    assert!(
        waited.elapsed() >= Duration::from_millis(200),
        "WAIT answered before its timeout"
    );
    let bad = redis::cmd("WAIT")
        .arg(1)
        .arg(-1)
        .query::<i64>(&mut connection)
        .expect_err("a negative timeout");
    assert!(bad.to_string().contains("timeout is negative"), "{bad}");

    // READONLY through host 3, which holds a copy of every partition: the keys it does
    // not lead are read from its follower copy.
    let followed: Vec<&String> = keys
        .iter()
        .copied()
        .filter(|k| !leads(cluster, 3, k))
        .collect();
    assert!(!followed.is_empty());
    let served = |c: &Cluster| -> u64 {
        c.info_section(3, "replication")["shoal_readonly_reads_served"]
            .parse()
            .unwrap()
    };
    let mut reader = client_of(cluster, 3);
    let _: () = redis::cmd("READONLY").query(&mut reader).expect("READONLY");
    let before = served(cluster);
    for key in &followed {
        let value: Option<String> = redis::cmd("GET")
            .arg(key.as_str())
            .query(&mut reader)
            .expect("GET");
        assert_eq!(
            value.as_deref(),
            Some(acknowledged[*key].as_str()),
            "READONLY GET {key}"
        );
    }
    let from_copies = served(cluster) - before;
    println!(
        "{from_copies} of {} READONLY reads served by host 3's follower copies",
        followed.len()
    );
    assert_eq!(from_copies, followed.len() as u64);
    let _: () = redis::cmd("READWRITE")
        .query(&mut reader)
        .expect("READWRITE");
    let value: Option<String> = redis::cmd("GET")
        .arg(followed[0].as_str())
        .query(&mut reader)
        .expect("GET");
    assert_eq!(value.as_deref(), Some(acknowledged[followed[0]].as_str()));
    assert_eq!(
        served(cluster) - before,
        from_copies,
        "READWRITE reads from the primaries"
    );

    // CLUSTER SLOTS lists both followers after each range's primary, and CLUSTER REPLICAS
    // of a host names the two others as its slaves.
    let Resp::Array(ranges) = cluster
        .query(1, &["CLUSTER", "SLOTS"])
        .expect("CLUSTER SLOTS")
    else {
        panic!("CLUSTER SLOTS is no array")
    };
    for range in &ranges {
        let fields = match range {
            Resp::Array(fields) => fields.len(),
            _ => 0,
        };
        assert_eq!(
            fields, 5,
            "two slots, a primary and two followers: {range:?}"
        );
    }
    let first = cluster
        .query(1, &["CLUSTER", "MYID"])
        .expect("CLUSTER MYID");
    let first = strings_of(&first).remove(0);
    let lines = strings_of(&until_served(cluster, 2, &["CLUSTER", "REPLICAS", &first]));
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        assert!(line.contains(&format!("slave {first} ")), "{line}");
    }
    // A cluster client from the redis crate reads from the followers that CLUSTER SLOTS
    // names, and writes through the primaries.
    let nodes: Vec<String> = (1..=3)
        .map(|i| format!("redis://{}/", cluster.host(i).server.addr()))
        .collect();
    let client = redis::cluster::ClusterClientBuilder::new(nodes)
        .read_routing_strategy(redis::cluster_read_routing::RandomReplicaStrategy)
        .build()
        .expect("a cluster client");
    let mut routed = client.get_connection().expect("a cluster connection");
    for key in &keys {
        let value: Option<String> = redis::cmd("GET")
            .arg(key.as_str())
            .query(&mut routed)
            .expect("GET through the cluster client");
        assert_eq!(value.as_deref(), Some(acknowledged[*key].as_str()), "{key}");
    }
    let _: () = redis::cmd("SET")
        .arg(keys[0].as_str())
        .arg(&acknowledged[keys[0]])
        .query(&mut routed)
        .expect("SET through the cluster client");

    // Offsets: each copy's sum of its shard's last commit ids, equal once caught up.
    let (offsets, _) = cluster.wait_for(
        "equal replication offsets in every shard",
        SETTLE_TIMEOUT,
        |c| {
            let Resp::Array(shards) = c.query(1, &["CLUSTER", "SHARDS"])? else {
                return Err("CLUSTER SHARDS is no array".into());
            };
            let mut all = Vec::new();
            for shard in &shards {
                let words = strings_of(shard);
                let offsets: Vec<i64> = match shard {
                    Resp::Array(fields) => fields
                        .iter()
                        .filter_map(|field| match field {
                            Resp::Array(nodes) => Some(nodes),
                            _ => None,
                        })
                        .flatten()
                        .filter_map(node_offset)
                        .collect(),
                    _ => Vec::new(),
                };
                if offsets.len() != 3 || offsets[0] <= 0 || offsets.iter().any(|&o| o != offsets[0])
                {
                    return Err(format!("shard {words:?}: offsets {offsets:?}"));
                }
                all.push(offsets[0]);
            }
            Ok(all)
        },
    );
    println!("replication offsets per shard: {offsets:?}");
    for host in 1..=3 {
        let info = cluster.info_section(host, "replication");
        assert_eq!(info["connected_slaves"], "2", "host {host}: {info:?}");
        for n in 0..2 {
            let line = &info[&format!("slave{n}")];
            assert!(
                line.contains("state=online") && line.contains("lag_entries=0"),
                "host {host}: {line}"
            );
        }
    }
}

/// Waits until hosts 2 and 3 together lead all 16 partitions (host 1 failed over);
/// answers how long it took.
fn wait_until_hosts_2_and_3_lead_all(cluster: &Cluster, timeout: Duration) -> Duration {
    let (_, took) = cluster.wait_for("hosts 2 and 3 to lead every partition", timeout, |c| {
        let mut led = 0;
        for host in [2, 3] {
            led += c
                .try_info(host)?
                .get("shoal_partitions_owned")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
        }
        match led {
            16 => Ok(()),
            other => Err(format!("hosts 2 and 3 lead {other} partitions")),
        }
    });
    took
}

/// The `replication-offset` of one node of a `CLUSTER SHARDS` reply.
fn node_offset(node: &Resp) -> Option<i64> {
    let Resp::Array(fields) = node else {
        return None;
    };
    fields.chunks(2).find_map(|pair| match pair {
        [Resp::Bulk(name), Resp::Int(offset)] if name.as_slice() == b"replication-offset" => {
            Some(*offset)
        }
        _ => None,
    })
}

/// The number of distinct keys a full SCAN through `host` returns.
fn scan_all(cluster: &Cluster, host: usize) -> usize {
    let mut keys = std::collections::BTreeSet::new();
    let mut cursor = "0".to_string();
    loop {
        let reply = cluster
            .query(host, &["SCAN", &cursor, "COUNT", "100"])
            .unwrap_or_else(|error| panic!("SCAN through host {host}: {error}"));
        let Resp::Array(parts) = reply else {
            panic!("SCAN through host {host}: {reply:?}")
        };
        let (Some(Resp::Bulk(next)), Some(Resp::Array(found))) = (parts.first(), parts.get(1))
        else {
            panic!("SCAN through host {host}: {parts:?}")
        };
        for key in found {
            if let Resp::Bulk(key) = key {
                keys.insert(key.clone());
            }
        }
        cursor = String::from_utf8_lossy(next).into_owned();
        if cursor == "0" {
            return keys.len();
        }
    }
}

/// The digest of every partition on `host`: (last commit id, keys, checksum) each.
fn digests(cluster: &Cluster, host: usize) -> Result<Vec<(i64, i64, Vec<u8>)>, String> {
    (0..16)
        .map(
            |partition| match cluster.query(host, &["SHOAL.DIGEST", &partition.to_string()])? {
                Resp::Array(parts) => match &parts[..] {
                    [Resp::Int(last), Resp::Int(keys), Resp::Bulk(checksum)] => {
                        Ok((*last, *keys, checksum.clone()))
                    }
                    other => Err(format!(
                        "SHOAL.DIGEST {partition} on host {host}: {other:?}"
                    )),
                },
                other => Err(format!(
                    "SHOAL.DIGEST {partition} on host {host}: {other:?}"
                )),
            },
        )
        .collect()
}

/// Stops follower host 3, writes and deletes through host 2 while it is away, starts it
/// again, and waits until every copy of every partition has the same digest. Answers
/// how long the catching up took and the keys deleted while host 3 was away.
/// `storage_toml` goes into the hosts' `[storage]` section.
fn resync_after_absence(storage_toml: &str) -> (Resync, Cluster) {
    let mut cluster = Cluster::start(3, &format!("{REPLICATED}{storage_toml}"));
    cluster.wait_voters(3, Duration::from_secs(60));
    cluster.wait_for(
        "every partition on three hosts, in sync, the primaries spread",
        SETTLE_TIMEOUT,
        settled,
    );
    for i in 0..200 {
        // Asked again while it fails: a primary that a balancing move just named may take
        // a moment to open its term on a loaded machine.
        let key = format!("key:{i}");
        cluster.wait_for("a write with every host up", RESUME_TIMEOUT, |c| {
            set(c, 2, &key, "first")
        });
    }
    cluster.kill(3);
    let mut deleted = Vec::new();
    // Host 3 led some partitions too: they fail over while the writes go on.
    for i in 0..200 {
        let key = format!("key:{i}");
        if i % 2 == 0 {
            // 0 if an earlier try deleted it but its answer was lost.
            match until_served(&cluster, 2, &["DEL", &key]) {
                Resp::Int(0 | 1) => deleted.push(key),
                other => panic!("DEL {key} with host 3 away: {other:?}"),
            }
        } else {
            until_served(&cluster, 2, &["SET", &key, "second"]);
        }
        until_served(&cluster, 2, &["SET", &format!("new:{i}"), "third"]);
    }
    let past_hold: u64 = [1, 2]
        .into_iter()
        .map(|host| count_of(&cluster, host, "shoal_partitions_past_log_hold"))
        .sum();
    println!("{past_hold} partitions kept less log than host 3 needed");
    cluster.host_mut(3).server.restart();
    let back = Instant::now();
    cluster.wait_for("every copy of every partition alike", SETTLE_TIMEOUT, |c| {
        let primary = digests(c, 1)?;
        for host in [2, 3] {
            let copy = digests(c, host)?;
            if copy != primary {
                return Err(format!(
                    "host {host} differs from the primary: {copy:?} against {primary:?}"
                ));
            }
        }
        Ok(())
    });
    let resyncs: u64 = [1, 2]
        .into_iter()
        .map(|host| count_of(&cluster, host, "shoal_resyncs"))
        .sum();
    println!("the primaries brought host 3 back in sync {resyncs} times");
    assert!(resyncs > 0, "no follower reported back in sync");
    let resync = Resync {
        took: back.elapsed(),
        deleted,
        full_copies: count_of(&cluster, 3, "shoal_full_copies"),
        past_hold,
    };
    (resync, cluster)
}

/// What [`resync_after_absence`] saw.
struct Resync {
    /// From host 3's restart until every copy was alike.
    took: Duration,
    /// The keys deleted while host 3 was away.
    deleted: Vec<String>,
    /// Full copies host 3 took after its restart.
    full_copies: u64,
    /// Partitions whose primaries kept less log than host 3 needed, before it returned.
    past_hold: u64,
}

/// An `INFO replication` counter of host `host`.
fn count_of(cluster: &Cluster, host: usize, field: &str) -> u64 {
    let info = cluster.info_section(host, "replication");
    match info.get(field).and_then(|v| v.parse().ok()) {
        Some(count) => count,
        None => panic!("host {host}: no {field} in {info:?}"),
    }
}

#[test]
fn a_copy_changed_on_disk_is_reported_by_the_digest_comparison() {
    // Followers here never serve READONLY reads: they hear from their primaries every
    // 200 ms, which is staler than the 1 ms allowed.
    let config = REPLICATED.replace("[cluster]\n", "[cluster]\nmax_read_staleness_ms = 1\n");
    let mut cluster = Cluster::start(3, &config);
    cluster.wait_voters(3, Duration::from_secs(60));
    cluster.wait_for(
        "every partition on three hosts, in sync, the primaries spread",
        SETTLE_TIMEOUT,
        settled,
    );
    let leader_of = |c: &Cluster| -> Result<usize, String> {
        for host in 1..=3 {
            c.try_host_id(host)?;
        }
        let id = c.try_leader(1)?.ok_or("no metadata leader")?;
        c.number_of(id)
            .ok_or_else(|| format!("no host has id {id}"))
    };
    let (leader, _) = cluster.wait_for("a metadata leader", RESUME_TIMEOUT, leader_of);
    let counts = |c: &Cluster| {
        (
            count_of(c, leader, "shoal_digest_checks"),
            count_of(c, leader, "shoal_digest_divergences"),
        )
    };
    // A full pass over the 16 partitions finds every copy alike.
    cluster.wait_for(
        "a pass of digest comparisons",
        RESUME_TIMEOUT,
        |c| match counts(c) {
            (checks, 0) if checks >= 16 => Ok(()),
            other => Err(format!("checks and divergences {other:?}")),
        },
    );
    // A value on a follower's disk changes outside the log, as a failing disk might.
    let key = "rot";
    let value = "needle-0123456789abcdef";
    set(&cluster, 1, key, value).expect("SET");
    let follower = (1..=3)
        .find(|&host| host != leader && !leads(&cluster, host, key))
        .expect("a follower of the key that does not lead the metadata group");
    let mut connection = client_of(&cluster, 1);
    let held: i64 = redis::cmd("WAIT")
        .arg(2)
        .arg(5000)
        .query(&mut connection)
        .expect("WAIT");
    assert_eq!(held, 2);
    cluster.kill(follower);
    let mut changed = 0;
    let data_dir = cluster.host(follower).server.data_dir.clone();
    for shard in std::fs::read_dir(&data_dir)
        .expect("the data dir")
        .flatten()
    {
        let file = shard.path().join("data.mdb");
        let Ok(mut bytes) = std::fs::read(&file) else {
            continue;
        };
        let mut at = 0;
        while let Some(found) = bytes[at..]
            .windows(value.len())
            .position(|w| w == value.as_bytes())
        {
            bytes[at + found + 7] = b'X';
            at += found + value.len();
            changed += 1;
        }
        std::fs::write(&file, &bytes).expect("write the data file");
    }
    assert!(
        changed > 0,
        "the value is nowhere in host {follower}'s data files"
    );
    cluster.host_mut(follower).server.restart();
    // A READONLY read through the follower goes to the primary: no copy is fresh enough.
    let mut reader = client_of(&cluster, follower);
    let _: () = redis::cmd("READONLY").query(&mut reader).expect("READONLY");
    let value_read: Option<String> = redis::cmd("GET").arg(key).query(&mut reader).expect("GET");
    assert_eq!(value_read.as_deref(), Some(value));
    assert_eq!(
        count_of(&cluster, follower, "shoal_readonly_reads_served"),
        0
    );
    let (found, took) = cluster.wait_for(
        "the divergence reported",
        SETTLE_TIMEOUT,
        |c| match counts(c) {
            (_, 0) => Err("no divergence yet".to_string()),
            (_, divergences) => Ok(divergences),
        },
    );
    println!("{changed} copies of the value changed on host {follower}'s disk; the leader reported {found} divergence(s) {took:?} after its restart");
}

#[test]
fn a_wiped_host_that_founds_a_cluster_of_its_own_is_not_taken_for_the_host_it_was() {
    // Host 1, the founder, loses its disk and starts again with its config: it has no
    // seeds, so it founds a new cluster at its old address. The others must see the
    // old host 1 gone, not this empty stranger, and lose nothing.
    let mut cluster = Cluster::start(3, REPLICATED);
    cluster.wait_voters(3, Duration::from_secs(60));
    cluster.wait_for(
        "every partition on three hosts, in sync, the primaries spread",
        SETTLE_TIMEOUT,
        settled,
    );
    let mut acknowledged = BTreeMap::new();
    for i in 0..200 {
        let (key, value) = (format!("key:{i}"), format!("v{i}"));
        set(&cluster, 2, &key, &value).expect("a write with every host up");
        acknowledged.insert(key, value);
    }
    cluster.kill(1);
    let data_dir = cluster.host(1).server.data_dir.clone();
    std::fs::remove_dir_all(&data_dir).expect("wipe host 1's data");
    std::fs::create_dir_all(&data_dir).expect("an empty data dir");
    cluster.host_mut(1).server.restart();
    let wiped = Instant::now();
    // Host 1 is a cluster of its own now.
    cluster.wait_for("host 1 founded a cluster", RESUME_TIMEOUT, |c| {
        match c
            .try_info(1)?
            .get("cluster_known_nodes")
            .map(String::as_str)
        {
            Some("1") => Ok(()),
            other => Err(format!("host 1 knows {other:?} hosts")),
        }
    });
    // The others mark the old host 1 failed and fail its partitions over.
    let took = wait_until_hosts_2_and_3_lead_all(&cluster, Duration::from_secs(60));
    println!("hosts 2 and 3 led every partition {took:?} after host 1 came back empty");
    cluster.wait_for("the old host 1 marked failed", RESUME_TIMEOUT, |c| {
        let nodes = c.try_nodes(2)?;
        match nodes.iter().any(|line| line.host_id == 1 && line.failed()) {
            true => Ok(()),
            false => Err(format!("host 2 sees {nodes:?}")),
        }
    });
    for (key, value) in &acknowledged {
        for host in [2, 3] {
            assert_eq!(
                get_served(&cluster, host, key).as_deref(),
                Some(value.as_str()),
                "{key} through host {host}"
            );
        }
    }
    let log = cluster.host(2).server.logs() + &cluster.host(1).server.logs();
    assert!(
        log.contains("refused a request from a host of another cluster"),
        "no refusal logged"
    );
    println!(
        "every acknowledged write read back {:?} after the wipe",
        wiped.elapsed()
    );
}

#[test]
fn a_follower_back_from_a_crash_catches_up_from_the_log() {
    let (resync, cluster) = resync_after_absence("");
    println!(
        "host 3 caught up from the log {:?} after its restart",
        resync.took
    );
    assert_eq!(resync.past_hold, 0, "the log was kept for host 3");
    assert_eq!(resync.full_copies, 0, "host 3 took a full copy");
    for key in &resync.deleted {
        assert_eq!(get_served(&cluster, 3, key), None, "{key} came back");
    }
    assert_eq!(get_served(&cluster, 3, "key:1").as_deref(), Some("second"));
}

#[test]
fn a_follower_behind_the_trimmed_log_takes_a_full_copy() {
    // The primaries keep at most ten times one entry for a follower that is away.
    let (resync, cluster) = resync_after_absence("log_retention_entries = 1\n");
    println!(
        "host 3 took {} full copies and caught up {:?} after its restart",
        resync.full_copies, resync.took
    );
    assert!(
        resync.past_hold > 0,
        "no partition kept less log than host 3 needed"
    );
    assert!(resync.full_copies > 0, "host 3 took no full copy");
    for key in &resync.deleted {
        assert_eq!(get_served(&cluster, 3, key), None, "{key} came back");
    }
}

/// Runs random GET, SET and INCR on `keys` through one host until `stop`; records every
/// operation with its key. Answers the records and the errors that no rule explains.
fn record_operations(
    client: usize,
    host: redis::Client,
    keys: Vec<String>,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> (Vec<(usize, Operation)>, Vec<String>) {
    let mut rng = Rng::new(seed);
    let mut recorded = Vec::new();
    let mut unexpected = Vec::new();
    let mut connection = None;
    let mut sequence = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if connection.is_none() {
            connection = connect_until(&host, Instant::now() + Duration::from_secs(30));
        }
        let Some(con) = connection.as_mut() else {
            unexpected.push("could not connect within 30 s".into());
            break;
        };
        let key = rng.below(keys.len() as u64) as usize;
        sequence += 1;
        let value = ((client as u64 + 1) * 1_000_000_000 + sequence).to_string();
        let (op, cmd) = match rng.below(10) {
            0..=3 => (Op::Get, redis::cmd("GET").arg(&keys[key]).clone()),
            4..=6 => (
                Op::Set(value.clone().into_bytes()),
                redis::cmd("SET").arg(&keys[key]).arg(&value).clone(),
            ),
            _ => (Op::Incr, redis::cmd("INCR").arg(&keys[key]).clone()),
        };
        let invoke = Instant::now();
        let answer = Answer::of(con.req_command(&cmd));
        let complete = Instant::now();
        let outcome = match (&op, &answer) {
            (Op::Get, Answer::Reply(Value::Nil)) => Outcome::Ok(Output::Value(None)),
            (Op::Get, Answer::Reply(Value::BulkString(bytes))) => {
                Outcome::Ok(Output::Value(Some(bytes.clone())))
            }
            (Op::Set(_), Answer::Reply(Value::Okay)) => Outcome::Ok(Output::Done),
            (Op::Incr, Answer::Reply(Value::Int(n))) => Outcome::Ok(Output::Integer(*n)),
            (_, Answer::Reply(other)) => {
                unexpected.push(format!("{cmd:?} answered {other:?}"));
                Outcome::Unknown
            }
            (_, Answer::Failed(text)) => {
                if !text.starts_with("TRYAGAIN") && !text.starts_with("NOREPLICAS") {
                    unexpected.push(format!("{op:?}: {text}"));
                }
                Outcome::Fail
            }
            (_, Answer::Unknown(_)) => Outcome::Unknown,
        };
        if answer.connection_lost() {
            connection = None;
        }
        let failed = outcome != Outcome::Unknown && !matches!(outcome, Outcome::Ok(_));
        recorded.push((
            key,
            Operation {
                client,
                op,
                invoke,
                complete,
                outcome,
            },
        ));
        if failed {
            sleep(Duration::from_millis(20));
        }
    }
    (recorded, unexpected)
}

#[test]
fn histories_stay_linearizable_when_the_primary_is_cut_off() {
    let cluster = Cluster::start(3, REPLICATED);
    cluster.wait_voters(3, Duration::from_secs(60));
    cluster.wait_for(
        "every partition on three hosts, in sync, the primaries spread",
        SETTLE_TIMEOUT,
        settled,
    );
    let seed = test_seed("replicated linearizability");
    // Keys whose partitions host 1 leads: the cut fences their primary off.
    let keys: Vec<String> = (0..)
        .map(|i| format!("hot:{i}"))
        .filter(|key| leads(&cluster, 1, key))
        .take(4)
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    // Clients on both sides of the cut: two on host 1 (the keys' primary), which will be
    // cut off, and three on the others.
    let handles: Vec<_> = [1, 1, 2, 2, 3]
        .into_iter()
        .enumerate()
        .map(|(client, host)| {
            let redis_client = cluster.host(host).server.client();
            let (keys, stop) = (keys.clone(), Arc::clone(&stop));
            let client_seed = seed
                .wrapping_add(client as u64 + 1)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15);
            std::thread::spawn(move || {
                record_operations(client, redis_client, keys, client_seed, stop)
            })
        })
        .collect();
    sleep(Duration::from_secs(2));
    // Keys of host 1's partitions that no recorded client touches, chosen just before the
    // cut (a partition may still move while the cluster balances).
    let lone: Vec<String> = (0..)
        .map(|i| format!("cut:{i}"))
        .filter(|key| leads(&cluster, 1, key))
        .take(2)
        .collect();
    let cut = cluster.isolate(1);
    let cut_at = Instant::now();
    // Through the cut-off primary, a write fails with NOREPLICAS within the request
    // timeout (5 s): refused before it starts once no follower answered lately, or at
    // the deadline if it was admitted just before the cut. It is never acknowledged.
    for (key, after) in lone.iter().zip([Duration::ZERO, Duration::from_secs(2)]) {
        sleep(after);
        let asked = Instant::now();
        let answer = cluster.query(1, &["SET", key, "cut-off"]);
        let took = asked.elapsed();
        println!(
            "SET {key} through the cut-off primary {:?} after the cut: {answer:?} in {took:?}",
            asked - cut_at
        );
        match answer {
            Err(error)
                if error
                    .contains("answered Error(\"NOREPLICAS Not enough good replicas to write.") => {
            }
            other => panic!("SET {key} through the cut-off primary: {other:?}"),
        }
        assert!(took <= Duration::from_secs(6), "NOREPLICAS after {took:?}");
    }
    sleep(Duration::from_secs(6));
    // The majority side failed over: hosts 2 and 3 lead every partition.
    wait_until_hosts_2_and_3_lead_all(&cluster, RESUME_TIMEOUT);
    for key in &lone {
        assert_eq!(
            get_served(&cluster, 2, key),
            None,
            "{key} was never acknowledged"
        );
    }
    cut.heal();
    println!("host 1 was cut off for {:?}", cut_at.elapsed());
    sleep(Duration::from_secs(4));
    stop.store(true, Ordering::Relaxed);
    let mut histories: BTreeMap<usize, Vec<Operation>> = BTreeMap::new();
    let mut unexpected = Vec::new();
    for handle in handles {
        let (recorded, errors) = handle.join().expect("client thread");
        unexpected.extend(errors);
        for (key, operation) in recorded {
            histories.entry(key).or_default().push(operation);
        }
    }
    assert!(unexpected.is_empty(), "unexpected answers: {unexpected:?}");
    let (mut ok, mut unknown, mut failed) = (0, 0, 0);
    for (key, history) in &histories {
        for operation in history {
            match operation.outcome {
                Outcome::Ok(_) => ok += 1,
                Outcome::Unknown => unknown += 1,
                Outcome::Fail => failed += 1,
            }
        }
        match check(history, None) {
            Verdict::Linearizable => {}
            Verdict::NotLinearizable(violation) => {
                panic!(
                    "key {}: not linearizable (seed {seed}): {violation:?}",
                    keys[*key]
                )
            }
            Verdict::Inconclusive(why) => panic!("key {}: inconclusive: {why:?}", keys[*key]),
        }
    }
    println!(
        "{} operations on {} keys: {ok} answered, {unknown} unknown, {failed} refused; linearizable",
        ok + unknown + failed,
        keys.len()
    );
    assert!(ok > 100, "too few operations answered: {ok}");
}

#[test]
fn copies_on_a_host_gone_past_the_offline_threshold_are_made_again_elsewhere() {
    let mut cluster = Cluster::start(
        4,
        "[cluster]\nreplicas = 3\noffline_threshold_secs = 5\n[storage]\npartitions = 16\n",
    );
    cluster.wait_voters(4, Duration::from_secs(60));
    cluster.wait_for(
        "every partition on three hosts, in sync, the primaries spread",
        SETTLE_TIMEOUT,
        settled,
    );
    for i in 0..100 {
        set(&cluster, 2, &format!("key:{i}"), "kept").expect("a write with every host up");
    }
    let held_by_4: Vec<usize> = (0..16)
        .filter(|partition| {
            matches!(
                cluster.query(4, &["SHOAL.DIGEST", &partition.to_string()]),
                Ok(Resp::Array(_))
            )
        })
        .collect();
    assert!(!held_by_4.is_empty(), "host 4 holds no copy");
    cluster.kill(4);
    let killed = Instant::now();
    let (_, took) = cluster.wait_for(
        "three in-sync copies of every partition on hosts 1 to 3",
        Duration::from_secs(90),
        |c| {
            for host in [1, 2, 3] {
                for partition in &held_by_4 {
                    match c.query(host, &["SHOAL.DIGEST", &partition.to_string()])? {
                        Resp::Array(_) => {}
                        other => {
                            return Err(format!("host {host}, partition {partition}: {other:?}"))
                        }
                    }
                }
            }
            settled(c)
        },
    );
    println!(
        "the {} partitions host 4 held had three copies again {took:?} after it was killed",
        held_by_4.len()
    );
    // The new copies hold what the old ones did.
    cluster.wait_for(
        "every copy of host 4's partitions alike",
        Duration::from_secs(30),
        |c| {
            for partition in &held_by_4 {
                let mut checksums = Vec::new();
                for host in [1, 2, 3] {
                    match c.query(host, &["SHOAL.DIGEST", &partition.to_string()])? {
                        Resp::Array(parts) => checksums.push(format!("{:?}", parts)),
                        other => return Err(format!("host {host}: {other:?}")),
                    }
                }
                if checksums.windows(2).any(|pair| pair[0] != pair[1]) {
                    return Err(format!(
                        "partition {partition}: copies differ: {checksums:?}"
                    ));
                }
            }
            Ok(())
        },
    );
    println!("total {:?}", killed.elapsed());
    for i in 0..100 {
        assert_eq!(
            get(&cluster, 3, &format!("key:{i}")).unwrap().as_deref(),
            Some("kept")
        );
    }
    // Back after its copies were dropped, host 4 is given its share again: copies move
    // to it from the others until each of the 4 hosts holds 12 of the 48.
    // Clients write all along: the copies that move and the primaries handed over pause
    // their partitions only briefly.
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| spawn_writer(&cluster, 1 + w % 3, w, Arc::clone(&stop)))
        .collect();
    let back = Instant::now();
    cluster.host_mut(4).server.restart();
    let (held, took) = cluster.wait_for(
        "12 copies on each host, the primaries spread",
        Duration::from_secs(120),
        |c| {
            settled(c)?;
            let held: Vec<usize> = (1..=4)
                .map(|host| {
                    (0..16)
                        .filter(|p| {
                            matches!(
                                c.query(host, &["SHOAL.DIGEST", &p.to_string()]),
                                Ok(Resp::Array(_))
                            )
                        })
                        .count()
                })
                .collect();
            match held == [12, 12, 12, 12] {
                true => Ok(held),
                false => Err(format!("copies per host {held:?}")),
            }
        },
    );
    println!("host 4 held its share again {took:?} after it came back: {held:?} copies");
    let writes = stop_writers(writers, back, &stop);
    println!(
        "while copies and primaries moved to host 4: {} writes acknowledged, {} failed, \
         the longest a partition went without one {:?}",
        writes.acknowledged.len(),
        writes.failed.len(),
        writes.longest_gap
    );
    assert!(
        writes.longest_gap < HANDOVER_GAP_BOUND,
        "a partition went {:?} without an acknowledged write",
        writes.longest_gap
    );
    for (key, value) in writes.acknowledged.iter().step_by(7) {
        assert_eq!(
            get_served(&cluster, 4, key).as_deref(),
            Some(value.as_str()),
            "{key}"
        );
    }
    for i in 0..100 {
        assert_eq!(
            get_served(&cluster, 4, &format!("key:{i}")).as_deref(),
            Some("kept")
        );
    }
}

/// What one writer of `multi_key_writes_in_doubt_...` did: the last MSET acknowledged,
/// and the last one sent (its outcome may be unknown).
#[derive(Debug, Default, Clone, Copy)]
struct Written {
    acknowledged: Option<u64>,
    sent: Option<u64>,
}

/// The keys of writer `writer`: one in each of the 16 partitions, so that each MSET has a
/// part on both workers of the primary (a two-phase commit), and several partitions on each.
fn writer_keys(writer: usize) -> Vec<String> {
    (0..16u32)
        .map(|partition| {
            (0..)
                .map(|n| format!("txw{writer}:{n}"))
                .find(|key| key_slot(key.as_bytes()) * 16 / 16384 == partition)
                .expect("a key in every partition")
        })
        .collect()
}

#[test]
fn multi_key_writes_in_doubt_when_the_primary_host_dies_end_whole_and_unlocked() {
    // Two workers a host: an MSET over many partitions has two participants on the primary.
    let mut cluster = Cluster::start(3, &format!("workers = 2\n{REPLICATED}"));
    cluster.wait_voters(3, Duration::from_secs(60));
    cluster.wait_for(
        "every partition on three hosts, in sync, the primaries spread",
        SETTLE_TIMEOUT,
        settled,
    );
    // Host 1 leads a third of the partitions, so every MSET has a participant there.
    // Writers coordinate their MSETs on host 1 itself (the coordinator dies with the
    // primary) and on host 2.
    const WRITERS: usize = 8;
    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut threads = Vec::new();
    for writer in 0..WRITERS {
        let client = cluster.host(1 + writer % 2).server.client();
        let stop = Arc::clone(&stop);
        let acknowledged = Arc::clone(&acknowledged);
        threads.push(std::thread::spawn(move || {
            let keys = writer_keys(writer);
            let mut written = Written::default();
            let Some(mut con) = connect_until(&client, Instant::now() + Duration::from_secs(10))
            else {
                return written;
            };
            let mut counter = 0u64;
            while !stop.load(Ordering::Relaxed) {
                counter += 1;
                let value = format!("{writer}:{counter}");
                let mut mset = redis::cmd("MSET");
                for key in &keys {
                    mset.arg(key).arg(&value);
                }
                written.sent = Some(counter);
                match con.req_command(&mset) {
                    Ok(Value::Okay) => {
                        if written.acknowledged.is_none() {
                            acknowledged.fetch_add(1, Ordering::Relaxed);
                        }
                        written.acknowledged = Some(counter);
                    }
                    Ok(_) | Err(_) => {
                        // Unknown outcome; a dead connection ends this writer.
                        if con.check_connection() {
                            continue;
                        }
                        break;
                    }
                }
            }
            written
        }));
    }
    // Every writer has had an MSET acknowledged, and they are all at work.
    let started = Instant::now();
    while acknowledged.load(Ordering::Relaxed) < WRITERS {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not every writer had an MSET acknowledged in 30 s"
        );
        sleep(Duration::from_millis(20));
    }
    sleep(Duration::from_millis(500));
    cluster.kill(1);
    let killed = Instant::now();
    sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let written: Vec<Written> = threads
        .into_iter()
        .map(|thread| thread.join().expect("writer thread"))
        .collect();
    println!("writers: {written:?}");
    assert!(
        written.iter().all(|w| w.acknowledged.is_some()),
        "every writer had an MSET acknowledged before the kill: {written:?}"
    );
    // After the failover every group of keys is whole: all of one MSET, never a mix, and
    // never older than the last acknowledged one. A key locked by a transaction in doubt
    // answers TRYAGAIN until the new primaries' recovery settles it.
    let (values, whole) =
        cluster.wait_for("every MSET whole on the survivors", RESUME_TIMEOUT, |c| {
            let mut values = Vec::new();
            for writer in 0..WRITERS {
                let keys = writer_keys(writer);
                let mut args = vec!["MGET"];
                args.extend(keys.iter().map(String::as_str));
                let found: Vec<String> = match c.query(2 + writer % 2, &args)? {
                    Resp::Array(items) => items
                        .iter()
                        .map(|item| match item {
                            Resp::Bulk(bytes) => Ok(String::from_utf8_lossy(bytes).into_owned()),
                            other => Err(format!("writer {writer}: {other:?}")),
                        })
                        .collect::<Result<_, _>>()?,
                    other => return Err(format!("MGET of writer {writer}: {other:?}")),
                };
                values.push(found);
            }
            Ok(values)
        });
    println!("every group read back {whole:?} after the kill");
    for (writer, found) in values.iter().enumerate() {
        let first = &found[0];
        assert!(
            found.iter().all(|value| value == first),
            "writer {writer}: an MSET applied in part: {found:?}"
        );
        let counter: u64 = first
            .split_once(':')
            .and_then(|(_, counter)| counter.parse().ok())
            .expect("a value the writer wrote");
        let Written { acknowledged, sent } = written[writer];
        assert!(
            Some(counter) >= acknowledged && Some(counter) <= sent,
            "writer {writer}: holds MSET {counter}, acknowledged {acknowledged:?}, sent {sent:?}"
        );
    }
    // No key stays locked: a new write to each goes through within a few seconds.
    let (_, unlocked) = cluster.wait_for("a SET on every key", Duration::from_secs(15), |c| {
        (0..WRITERS).try_for_each(|writer| {
            writer_keys(writer)
                .iter()
                .try_for_each(|key| set(c, 3 - writer % 2, key, "after"))
        })
    });
    println!("every key written again {unlocked:?} later");
    let (_, settled) =
        cluster.wait_for("no transaction left prepared", RESUME_TIMEOUT, |c| match c
            .query(2, &["SHOAL.TXNS"])?
        {
            Resp::Int(0) => Ok(()),
            other => Err(format!("SHOAL.TXNS: {other:?}")),
        });
    let resolved: usize = [2, 3]
        .iter()
        .map(|&host| {
            cluster
                .host(host)
                .server
                .logs()
                .matches("resolving a transaction left in doubt")
                .count()
        })
        .sum();
    println!(
        "{resolved} transactions in doubt resolved by the survivors; none prepared {:?} after the kill",
        killed.elapsed().max(settled)
    );
    // Eight writers were each in the middle of a two-phase commit when the primary died:
    // the new primaries found the intents it had prepared (replicated with their
    // partitions' logs) and settled them.
    assert!(
        resolved > 0,
        "no transaction in doubt was found on the new primaries"
    );
}

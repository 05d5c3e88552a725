//! Replication across real hosts: `shoal serve` hosts on 127.0.T.x (see
//! `common::cluster`) with `cluster.replicas = 3`. Clients write through some hosts,
//! a host is killed with SIGKILL, and every acknowledged write is read back through
//! the survivors. Each test prints what it measured.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::Resp;

const REPLICATED: &str = "[cluster]\nreplicas = 3\n[storage]\npartitions = 16\n";
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

/// Ok once every live host reports no under-replicated partition.
fn replicated_everywhere(cluster: &Cluster) -> Result<(), String> {
    for i in cluster.live() {
        let info = cluster.try_info(i)?;
        match info
            .get("shoal_partitions_under_replicated")
            .map(String::as_str)
        {
            Some("0") => {}
            other => return Err(format!("host {i}: under-replicated partitions {other:?}")),
        }
    }
    Ok(())
}

#[test]
fn every_acknowledged_write_survives_the_kill_of_the_primary_host() {
    let mut cluster = Cluster::start(3, REPLICATED);
    cluster.wait_voters(3, Duration::from_secs(60));
    let started = Instant::now();
    let (_, took) = cluster.wait_for(
        "every partition on three hosts, in sync",
        SETTLE_TIMEOUT,
        replicated_everywhere,
    );
    println!("every partition had its three copies in sync after {took:?}");
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
    // Host 1 founded the cluster and leads every partition.
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
    // The keyspace stays exact while the host is down: every key is counted once, by
    // its partition's new primary.
    let expected = acknowledged.len() as i64 + 16;
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
    }
    println!("total {:?}", killed.elapsed());
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

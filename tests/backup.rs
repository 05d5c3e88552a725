//! Backup and restore: `shoal backup` of a server under write load, `shoal restore`
//! into a new data dir, and a server on it that holds exactly the commits at or
//! before each partition's manifest commit id. Also the refusals (a damaged
//! backup, a data dir that is not empty or is in use, another partition count, a
//! backup with the server down) and restores onto another worker count.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{call, call_str, wait_until, Server};
use redis::Value;
use serde_json::Value as Json;

const LAYOUT: &str = "workers = 3\n[storage]\npartitions = 16\n";

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn read_manifest(dir: &Path) -> Json {
    let text = std::fs::read_to_string(dir.join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest is JSON")
}

/// The manifest's commit id for each partition.
fn manifest_commit_ids(manifest: &Json) -> Vec<u64> {
    manifest["commit_ids"]
        .as_array()
        .expect("commit_ids")
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            assert_eq!(
                entry["partition"].as_u64(),
                Some(index as u64),
                "commit ids are in partition order"
            );
            entry["last_commit_id"].as_u64().expect("last_commit_id")
        })
        .collect()
}

fn int(value: &Value) -> i64 {
    match value {
        Value::Int(n) => *n,
        other => panic!("expected an integer, got {other:?}"),
    }
}

fn bytes(value: &Value) -> Vec<u8> {
    match value {
        Value::BulkString(bytes) => bytes.clone(),
        other => panic!("expected a bulk string, got {other:?}"),
    }
}

/// One commit-log entry: (commit id, change type, collection, key, data).
type Entry = (u64, String, i64, Vec<u8>, Vec<u8>);

/// Every entry of `partition`'s log, through SHOAL.LOG.
fn read_log(con: &mut redis::Connection, partition: u32) -> Vec<Entry> {
    let mut entries = Vec::new();
    let mut from = 0u64;
    loop {
        let reply = call_str(
            con,
            &[
                "SHOAL.LOG",
                &partition.to_string(),
                &from.to_string(),
                "COUNT",
                "10000",
            ],
        );
        let Value::Array(items) = reply else {
            panic!("SHOAL.LOG answers an array: {reply:?}")
        };
        if items.is_empty() {
            return entries;
        }
        for item in items {
            let Value::Array(fields) = item else {
                panic!("log entry {item:?}")
            };
            let entry = (
                int(&fields[0]) as u64,
                String::from_utf8(bytes(&fields[2])).unwrap(),
                int(&fields[3]),
                bytes(&fields[4]),
                bytes(&fields[5]),
            );
            from = entry.0 + 1;
            entries.push(entry);
        }
    }
}

/// Every key of collection 0 and its value.
fn keyspace(con: &mut redis::Connection) -> HashMap<Vec<u8>, Vec<u8>> {
    let Value::Array(keys) = call_str(con, &["KEYS", "*"]) else {
        panic!("KEYS answers an array")
    };
    let mut found = HashMap::new();
    for key in keys {
        let key = bytes(&key);
        found.insert(key.clone(), bytes(&call(con, &[b"GET", &key])));
    }
    found
}

/// A write acknowledged by the server: the key, its new value (None: deleted), and when
/// the request was sent.
struct Acked {
    key: String,
    value: Option<String>,
    sent: Instant,
}

#[test]
fn backup_under_write_load_restores_exactly_the_manifest_commits() {
    let server = Server::start(LAYOUT);
    let mut con = server.conn();
    // Enough data that the copies take a moment.
    let filler = "x".repeat(2000);
    let mut pipe = redis::pipe();
    for i in 0..3000 {
        pipe.cmd("SET")
            .arg(format!("preload:{i}"))
            .arg(&filler)
            .ignore();
    }
    pipe.query::<()>(&mut con).expect("preload");

    let stop = Arc::new(AtomicBool::new(false));
    let acked_count = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..3)
        .map(|writer| {
            let mut con = server.conn();
            let (stop, acked_count) = (Arc::clone(&stop), Arc::clone(&acked_count));
            thread::spawn(move || {
                let mut acked = Vec::new();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let key = format!("w{writer}:{}", seq % 200);
                    let sent = Instant::now();
                    let value = if seq.is_multiple_of(7) {
                        let _: i64 = redis::cmd("DEL").arg(&key).query(&mut con).expect("DEL");
                        None
                    } else {
                        let value = format!("w{writer}-{seq}");
                        let _: () = redis::cmd("SET")
                            .arg(&key)
                            .arg(&value)
                            .query(&mut con)
                            .expect("SET");
                        Some(value)
                    };
                    acked.push(Acked { key, value, sent });
                    acked_count.fetch_add(1, Ordering::Relaxed);
                }
                acked
            })
        })
        .collect();

    let wait_for_writes = |more: u64, what: &str| {
        let from = acked_count.load(Ordering::Relaxed);
        wait_until(what, Duration::from_secs(30), || {
            match acked_count.load(Ordering::Relaxed) - from {
                done if done >= more => Ok(()),
                done => Err(format!("{done} of {more} writes acknowledged")),
            }
        });
    };
    wait_for_writes(100, "the writers to be under way before the backup");
    let backup_dir = server.dir.path().join("backups").join("b1");
    let backup_started = Instant::now();
    let output = server.run_verb("backup", &backup_dir);
    let backup_ended = Instant::now();
    assert!(
        output.status.success(),
        "shoal backup failed: {}",
        stderr(&output)
    );
    assert!(
        stderr(&output).contains("shard-2"),
        "backup shows per-shard progress: {}",
        stderr(&output)
    );
    wait_for_writes(
        100,
        "writes after the backup, to tell them apart from those in it",
    );
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<Acked> = writers
        .into_iter()
        .flat_map(|writer| writer.join().expect("writer"))
        .collect();

    let during = acked
        .iter()
        .filter(|op| op.sent >= backup_started && op.sent < backup_ended)
        .count();
    assert!(during > 0, "writes went on while the backup ran");

    let manifest = read_manifest(&backup_dir);
    assert_eq!(manifest["workers"], 3);
    assert_eq!(manifest["partitions"], 16);
    let commit_ids = manifest_commit_ids(&manifest);

    // What the backup must hold: the original server's log replayed up to each
    // partition's manifest commit id.
    let mut expected: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
    let mut newer = 0;
    for partition in 0..16u32 {
        let limit = commit_ids[partition as usize];
        for (commit_id, change, collection, key, data) in read_log(&mut con, partition) {
            assert_eq!(collection, 0);
            if commit_id > limit {
                newer += 1;
                continue;
            }
            if change == "delete" {
                expected.remove(&key);
            } else {
                expected.insert(key, data);
            }
        }
    }
    assert!(
        newer > 0,
        "some writes committed after the backup, so the test can tell them apart"
    );

    let mut restored = Server::configure(LAYOUT);
    let output = restored.run_verb("restore", &backup_dir);
    assert!(
        output.status.success(),
        "shoal restore failed: {}",
        stderr(&output)
    );
    assert!(
        stderr(&output).contains("checksum ok"),
        "restore shows verification progress: {}",
        stderr(&output)
    );
    restored.spawn_and_wait();
    let mut restored_con = restored.conn();
    let found = keyspace(&mut restored_con);
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !found.contains_key(*k))
        .take(5)
        .collect();
    let extra: Vec<_> = found
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, extra {extra:?}"
    );
    for (key, value) in &expected {
        assert_eq!(
            found.get(key),
            Some(value),
            "value of {}",
            String::from_utf8_lossy(key)
        );
    }
    // Each restored partition's log ends exactly at its manifest commit id.
    for partition in 0..16u32 {
        let log = read_log(&mut restored_con, partition);
        assert_eq!(
            log.last().map_or(0, |entry| entry.0),
            commit_ids[partition as usize],
            "partition {partition}"
        );
    }

    // The same from the clients' side: each key holds the state after one of its writes that
    // is no older than the last write acknowledged before the backup began, and that was
    // sent before the backup ended.
    let mut by_key: HashMap<&str, Vec<&Acked>> = HashMap::new();
    for op in &acked {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    for (key, ops) in by_key {
        let state = found
            .get(key.as_bytes())
            .map(|v| String::from_utf8(v.clone()).unwrap());
        let floor = ops.iter().rposition(|op| op.sent < backup_started);
        let fits = |index: usize| ops[index].value == state && ops[index].sent < backup_ended;
        let matched = match floor {
            Some(floor) => (floor..ops.len()).any(fits),
            // Not written before the backup began: absent, or a write sent before it ended.
            None => state.is_none() || (0..ops.len()).any(fits),
        };
        assert!(
            matched,
            "key {key} holds {state:?}, which no acknowledged write in the backup's window left"
        );
    }
}

/// A stopped server with a few keys, and a backup of it. Database 0 holds `k0` to
/// `k49`; database 5 holds `s0` to `s4`, moved there from 3 by SWAPDB.
fn backed_up_server() -> (Server, PathBuf) {
    let mut server = Server::start("[storage]\npartitions = 8\n");
    let mut con = server.conn();
    for i in 0..50 {
        let _: () = redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg(format!("v{i}"))
            .query(&mut con)
            .unwrap();
    }
    let mut db3 = server.client().get_connection().unwrap();
    assert_eq!(call_str(&mut db3, &["SELECT", "3"]), Value::Okay);
    for i in 0..5 {
        assert_eq!(
            call_str(&mut db3, &["SET", &format!("s{i}"), "swapped"]),
            Value::Okay
        );
    }
    assert_eq!(call_str(&mut db3, &["SWAPDB", "3", "5"]), Value::Okay);
    let backup_dir = server.dir.path().join("b");
    let output = server.run_verb("backup", &backup_dir);
    assert!(
        output.status.success(),
        "shoal backup failed: {}",
        stderr(&output)
    );
    server.stop();
    (server, backup_dir)
}

#[test]
fn restore_refuses_a_damaged_backup_before_touching_the_data_dir() {
    let (_server, backup_dir) = backed_up_server();
    let target = Server::configure("[storage]\npartitions = 8\n");

    let shard = backup_dir.join("shard-1").join("data.mdb");
    let original = std::fs::read(&shard).unwrap();
    let mut damaged = original.clone();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0x40;
    std::fs::write(&shard, &damaged).unwrap();
    let output = target.run_verb("restore", &backup_dir);
    assert!(!output.status.success(), "a flipped byte is refused");
    assert!(
        stderr(&output).contains("checksum"),
        "says why: {}",
        stderr(&output)
    );
    assert!(!target.data_dir.exists(), "the data dir was not created");

    std::fs::write(&shard, &original[..original.len() - 4096]).unwrap();
    let output = target.run_verb("restore", &backup_dir);
    assert!(!output.status.success(), "a truncated shard is refused");
    assert!(
        stderr(&output).contains("bytes"),
        "says why: {}",
        stderr(&output)
    );
    assert!(!target.data_dir.exists());

    std::fs::write(&shard, &original).unwrap();
    let manifest_path = backup_dir.join("manifest.json");
    let manifest = std::fs::read_to_string(&manifest_path).unwrap();
    std::fs::remove_file(&manifest_path).unwrap();
    let output = target.run_verb("restore", &backup_dir);
    assert!(
        !output.status.success(),
        "a backup without a manifest is refused"
    );
    assert!(
        stderr(&output).contains("manifest.json"),
        "says why: {}",
        stderr(&output)
    );
    assert!(!target.data_dir.exists());

    std::fs::write(
        &manifest_path,
        manifest.replace("\"workers\": 2", "\"workers\": 3"),
    )
    .unwrap();
    let output = target.run_verb("restore", &backup_dir);
    assert!(
        !output.status.success(),
        "an inconsistent manifest is refused"
    );
    assert!(
        stderr(&output).contains("not a valid manifest"),
        "says why: {}",
        stderr(&output)
    );
    assert!(!target.data_dir.exists());

    // Repaired, the same backup restores.
    std::fs::write(&manifest_path, manifest).unwrap();
    let output = target.run_verb("restore", &backup_dir);
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn restore_refuses_a_data_dir_in_use_or_not_empty_and_fits_the_worker_count() {
    let (mut server, backup_dir) = backed_up_server();
    let shard_file = server.data_dir.join("shard-0").join("data.mdb");
    let before = std::fs::read(&shard_file).unwrap();

    server.spawn_and_wait();
    let output = server.run_verb("restore", &backup_dir);
    assert!(
        !output.status.success(),
        "restore into a running server is refused"
    );
    assert!(
        stderr(&output).contains("running"),
        "says why: {}",
        stderr(&output)
    );
    server.stop();

    let output = server.run_verb("restore", &backup_dir);
    assert!(
        !output.status.success(),
        "restore into a data dir with data is refused"
    );
    assert!(
        stderr(&output).contains("not empty"),
        "says why: {}",
        stderr(&output)
    );
    assert_eq!(
        std::fs::read(&shard_file).unwrap(),
        before,
        "the data was not touched"
    );

    let other = Server::configure("[storage]\npartitions = 16\n");
    let output = other.run_verb("restore", &backup_dir);
    assert!(
        !output.status.success(),
        "another partition count is refused"
    );
    assert!(
        stderr(&output).contains("partitions"),
        "says why: {}",
        stderr(&output)
    );

    // With `workers` left to the core count, the backup's worker count is used.
    let mut adopting = Server::configure("workers = 0\n[storage]\npartitions = 8\n");
    let output = adopting.run_verb("restore", &backup_dir);
    assert!(output.status.success(), "{}", stderr(&output));
    adopting.spawn_and_wait();
    let mut con = adopting.conn();
    assert_eq!(int(&call_str(&mut con, &["DBSIZE"])), 50);
    assert_eq!(bytes(&call_str(&mut con, &["GET", "k7"])), b"v7");
    assert_eq!(adopting.status_json().unwrap()["workers"], 2);
    // The databases SWAPDB had moved are where they were.
    assert_eq!(call_str(&mut con, &["SELECT", "5"]), Value::Okay);
    assert_eq!(int(&call_str(&mut con, &["DBSIZE"])), 5);
    assert_eq!(bytes(&call_str(&mut con, &["GET", "s3"])), b"swapped");
    assert_eq!(call_str(&mut con, &["SELECT", "3"]), Value::Okay);
    assert_eq!(int(&call_str(&mut con, &["DBSIZE"])), 0);

    // With another worker count named, the first start moves partitions to it.
    let mut moving = Server::configure("workers = 3\n[storage]\npartitions = 8\n");
    let output = moving.run_verb("restore", &backup_dir);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("will move partitions to 3 workers"),
        "{}",
        stderr(&output)
    );
    moving.spawn_and_wait();
    let mut con = moving.conn();
    assert_eq!(int(&call_str(&mut con, &["DBSIZE"])), 50);
    for i in 0..50 {
        assert_eq!(
            bytes(&call_str(&mut con, &["GET", &format!("k{i}")])),
            format!("v{i}").into_bytes()
        );
    }
    assert_eq!(moving.status_json().unwrap()["workers"], 3);
}

#[test]
fn backup_refuses_a_non_empty_target_and_a_stopped_server() {
    let mut server = Server::start("");
    let taken = server.dir.path().join("taken");
    std::fs::create_dir(&taken).unwrap();
    std::fs::write(taken.join("something"), b"x").unwrap();
    let output = server.run_verb("backup", &taken);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("not empty"),
        "says why: {}",
        stderr(&output)
    );
    // The server refuses it too, for clients that ask it directly.
    let mut con = server.conn();
    let reply = call(
        &mut con,
        &[b"SHOAL.BACKUP", taken.to_str().unwrap().as_bytes()],
    );
    assert!(
        common::error_text(&reply).contains("not empty"),
        "{reply:?}"
    );
    let reply = call_str(&mut con, &["SHOAL.BACKUP", "relative/dir"]);
    assert!(common::error_text(&reply).contains("absolute"), "{reply:?}");

    server.stop();
    let target = server.dir.path().join("never");
    let output = server.run_verb("backup", &target);
    assert!(!output.status.success(), "no server, no backup");
    assert!(
        stderr(&output).contains("is shoal serve running"),
        "says why: {}",
        stderr(&output)
    );
    assert!(!target.exists(), "nothing was created");
}

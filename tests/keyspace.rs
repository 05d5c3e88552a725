//! The whole keyspace across workers: SCAN (cursor, MATCH, COUNT, TYPE) over
//! 100,000 keys while other keys come and go, KEYS, DBSIZE, FLUSHDB and
//! FLUSHALL (each cleared key logged as a delete), and expiry: keys vanish on
//! time without a client touching them, TTL/PTTL answer as in Redis, and each
//! expiry is logged as a delete.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{encode_command, error_text, wait_until, Server};
use redis::{ConnectionLike, Value};

/// Sends `commands` in one pipeline and returns every reply (server errors included).
fn pipeline(con: &mut redis::Connection, commands: &[Vec<String>]) -> Vec<Value> {
    let mut bytes = Vec::new();
    for command in commands {
        let args: Vec<&[u8]> = command.iter().map(|a| a.as_bytes()).collect();
        bytes.extend(encode_command(&args));
    }
    con.req_packed_commands(&bytes, 0, commands.len())
        .expect("pipeline")
}

/// Sends `commands` in pipelines of `batch` and asserts that every reply is OK.
fn load(
    con: &mut redis::Connection,
    commands: impl Iterator<Item = Vec<String>>,
    batch: usize,
) -> usize {
    let commands: Vec<Vec<String>> = commands.collect();
    for chunk in commands.chunks(batch) {
        for (command, reply) in chunk.iter().zip(pipeline(con, chunk)) {
            assert_eq!(reply, Value::Okay, "{command:?}");
        }
    }
    commands.len()
}

fn cmd(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

fn stable_key(i: usize) -> String {
    format!("k:{i:06}")
}

/// One SCAN call: (next cursor, keys).
fn scan_once(con: &mut redis::Connection, cursor: &str, options: &[&str]) -> (String, Vec<String>) {
    let mut args = vec!["SCAN", cursor];
    args.extend_from_slice(options);
    match common::call_str(con, &args) {
        Value::Array(parts) if parts.len() == 2 => {
            let cursor = match &parts[0] {
                Value::BulkString(bytes) => String::from_utf8(bytes.clone()).expect("cursor text"),
                other => panic!("SCAN cursor {other:?}"),
            };
            assert!(
                cursor.parse::<u64>().is_ok(),
                "the cursor is an unsigned integer: {cursor:?}"
            );
            let keys = match &parts[1] {
                Value::Array(keys) => keys
                    .iter()
                    .map(|k| match k {
                        Value::BulkString(bytes) => {
                            String::from_utf8(bytes.clone()).expect("key text")
                        }
                        other => panic!("SCAN key {other:?}"),
                    })
                    .collect(),
                other => panic!("SCAN keys {other:?}"),
            };
            (cursor, keys)
        }
        other => panic!("SCAN {args:?} answered {other:?}"),
    }
}

/// A full iteration: every key returned (with repeats) and the number of calls.
fn scan_all(con: &mut redis::Connection, options: &[&str]) -> (Vec<String>, usize) {
    let mut cursor = "0".to_string();
    let mut keys = Vec::new();
    let mut calls = 0;
    loop {
        let (next, batch) = scan_once(con, &cursor, options);
        calls += 1;
        keys.extend(batch);
        if next == "0" {
            return (keys, calls);
        }
        assert!(
            calls < 1_000_000,
            "SCAN {options:?} never returned cursor 0"
        );
        cursor = next;
    }
}

fn keys_cmd(con: &mut redis::Connection, pattern: &str) -> Vec<String> {
    redis::cmd("KEYS").arg(pattern).query(con).expect("KEYS")
}

fn dbsize(con: &mut redis::Connection) -> i64 {
    redis::cmd("DBSIZE").query(con).expect("DBSIZE")
}

fn set_of(keys: &[String]) -> HashSet<String> {
    keys.iter().cloned().collect()
}

/// A commit-log entry as SHOAL.LOG returns it.
#[derive(Debug, Clone)]
struct Entry {
    commit_id: i64,
    change: String,
    key: String,
    expires_at_ms: i64,
}

/// A SHOAL.LOG entry as the redis crate parses it:
/// `(commit_id, timestamp_ms, change_type, collection, key, data, expires_at_ms)`.
type LogRow = (i64, i64, String, i64, Vec<u8>, Vec<u8>, i64);

/// Every entry of `partition`'s log from commit 0, paging with COUNT.
fn read_log(con: &mut redis::Connection, partition: u32) -> Vec<Entry> {
    let mut entries: Vec<Entry> = Vec::new();
    loop {
        let from = entries.last().map_or(0, |e| e.commit_id + 1);
        let page: Vec<LogRow> = redis::cmd("SHOAL.LOG")
            .arg(partition)
            .arg(from)
            .arg("COUNT")
            .arg(10_000)
            .query(con)
            .expect("SHOAL.LOG");
        if page.is_empty() {
            return entries;
        }
        entries.extend(
            page.into_iter()
                .map(|(commit_id, _, change, _, key, _, expires_at_ms)| Entry {
                    commit_id,
                    change,
                    key: String::from_utf8(key).expect("key text"),
                    expires_at_ms,
                }),
        );
    }
}

/// The change types logged per key, in order.
fn changes_by_key(entries: &[Entry]) -> BTreeMap<String, Vec<String>> {
    let mut by_key: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in entries {
        by_key
            .entry(entry.key.clone())
            .or_default()
            .push(entry.change.clone());
    }
    by_key
}

// ---------------------------------------------------------------- SCAN, KEYS, DBSIZE

#[test]
fn scan_over_100k_keys_returns_every_key_while_other_keys_come_and_go() {
    const KEYS: usize = 100_000;
    let server = Server::start("workers = 3\n");
    let mut con = server.conn();
    let started = Instant::now();
    load(
        &mut con,
        (0..KEYS).map(|i| cmd(&["SET", &stable_key(i), "v"])),
        1000,
    );
    eprintln!("loaded {KEYS} keys in {:?}", started.elapsed());
    let stable: HashSet<String> = (0..KEYS).map(stable_key).collect();
    for worker in 0..3 {
        assert!(
            stable
                .iter()
                .any(|k| server.worker_of(k.as_bytes()) == worker),
            "keys on worker {worker}"
        );
    }
    assert_eq!(dbsize(&mut con), KEYS as i64);

    // A full iteration returns every key and ends with cursor 0; COUNT sets the work per call.
    let (keys, calls) = scan_all(&mut con, &["COUNT", "1000"]);
    let found = set_of(&keys);
    assert_eq!(found.len(), KEYS, "distinct keys returned by a full SCAN");
    assert!(
        found == stable,
        "SCAN returned keys that were never written"
    );
    assert!(
        (50..=300).contains(&calls),
        "a full SCAN COUNT 1000 over {KEYS} keys took {calls} calls"
    );

    // COUNT is a hint: the default (10) returns a small batch, a large COUNT a large one.
    let (_, small) = scan_once(&mut con, "0", &[]);
    assert!(
        !small.is_empty() && small.len() <= 40,
        "SCAN 0 returned {} keys",
        small.len()
    );
    let (_, large) = scan_once(&mut con, "0", &["COUNT", "5000"]);
    assert!(
        large.len() >= 2500 && large.len() <= 20_000,
        "SCAN 0 COUNT 5000 returned {} keys",
        large.len()
    );
    assert_eq!(
        error_text(&common::call_str(&mut con, &["SCAN", "0", "COUNT", "0"])),
        "ERR syntax error"
    );
    assert!(
        error_text(&common::call_str(&mut con, &["SCAN", "0", "COUNT", "x"])).starts_with("ERR")
    );
    assert_eq!(
        error_text(&common::call_str(&mut con, &["SCAN", "nope"])),
        "ERR invalid cursor"
    );

    // MATCH filters what COUNT examined: a call may return nothing with a non-zero cursor.
    let (cursor, batch) = scan_once(&mut con, "0", &["MATCH", "nomatch:*", "COUNT", "100"]);
    assert!(
        batch.is_empty() && cursor != "0",
        "SCAN 0 MATCH nomatch:* COUNT 100 -> {cursor} {batch:?}"
    );
    for (pattern, expected) in [
        (
            "k:0123*",
            (12300..12400).map(stable_key).collect::<HashSet<_>>(),
        ),
        ("k:00001?", (10..20).map(stable_key).collect()),
        (
            "k:0000[12]0",
            [10, 20].into_iter().map(stable_key).collect(),
        ),
        (
            "k:09999[^0-8]",
            [99999].into_iter().map(stable_key).collect(),
        ),
        ("nomatch:*", HashSet::new()),
    ] {
        let (keys, _) = scan_all(&mut con, &["MATCH", pattern, "COUNT", "2000"]);
        assert_eq!(set_of(&keys), expected, "SCAN MATCH {pattern}");
        assert_eq!(
            set_of(&keys_cmd(&mut con, pattern)),
            expected,
            "KEYS {pattern}"
        );
    }
    let (strings, _) = scan_all(&mut con, &["TYPE", "string", "COUNT", "5000"]);
    assert_eq!(set_of(&strings).len(), KEYS, "SCAN TYPE string");
    let (hashes, _) = scan_all(&mut con, &["TYPE", "hash", "COUNT", "5000"]);
    assert!(
        hashes.is_empty(),
        "SCAN TYPE hash: {:?}",
        &hashes[..hashes.len().min(5)]
    );
    assert_eq!(keys_cmd(&mut con, "*").len(), KEYS, "KEYS *");

    // Keys present for the whole scan are never missed while other keys are created and
    // deleted during it, on every worker.
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (stop, rounds) = (Arc::clone(&stop), Arc::clone(&rounds));
        let mut con = server.conn();
        std::thread::spawn(move || {
            let mut written = 0usize;
            let mut next = 0usize;
            while !stop.load(Ordering::Relaxed) {
                // 100 new keys, and one DEL of the 100 made two rounds ago.
                let mut batch: Vec<Vec<String>> = (next..next + 100)
                    .map(|i| cmd(&["SET", &format!("w:{i}"), "x"]))
                    .collect();
                if next >= 200 {
                    let mut del = vec!["DEL".to_string()];
                    del.extend((next - 200..next - 100).map(|i| format!("w:{i}")));
                    batch.push(del);
                }
                for reply in pipeline(&mut con, &batch) {
                    assert!(
                        matches!(reply, Value::Okay | Value::Int(100)),
                        "writer: {reply:?}"
                    );
                }
                written += if next >= 200 { 200 } else { 100 };
                next += 100;
                rounds.fetch_add(1, Ordering::Relaxed);
            }
            // Leave nothing behind.
            let mut del = vec!["DEL".to_string()];
            del.extend((next.saturating_sub(200)..next).map(|i| format!("w:{i}")));
            pipeline(&mut con, &[del]);
            written
        })
    };
    // The scan starts once the writer is creating and deleting keys.
    wait_until(
        "the writer's first rounds of creates and deletes",
        Duration::from_secs(10),
        || match rounds.load(Ordering::Relaxed) {
            done if done >= 3 => Ok(()),
            done => Err(format!("{done} rounds written")),
        },
    );
    let scan_started = Instant::now();
    let (keys, calls) = scan_all(&mut con, &["COUNT", "25"]);
    let scan_time = scan_started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().expect("writer thread");
    eprintln!("a full SCAN COUNT 25 took {calls} calls and {scan_time:?}; {written} writes by the writer meanwhile");
    let found = set_of(&keys);
    let missed: Vec<&String> = stable
        .iter()
        .filter(|k| !found.contains(*k))
        .take(10)
        .collect();
    assert!(
        missed.is_empty(),
        "keys present for the whole scan were missed, e.g. {missed:?}"
    );
    let strangers: Vec<&String> = found
        .iter()
        .filter(|k| !stable.contains(*k) && !k.starts_with("w:"))
        .take(10)
        .collect();
    assert!(
        strangers.is_empty(),
        "SCAN returned keys never written: {strangers:?}"
    );
    assert!(
        written >= 2000,
        "the writer ran during the scan ({written} keys written or deleted)"
    );
    assert_eq!(
        dbsize(&mut con),
        KEYS as i64,
        "DBSIZE once the writer cleaned up"
    );

    // FLUSHDB clears all of them, and logs each one as deleted.
    let partition = server.partition_of(stable_key(0).as_bytes());
    let last = read_log(&mut con, partition)
        .last()
        .map_or(0, |e| e.commit_id);
    let flush_started = Instant::now();
    assert_eq!(common::call_str(&mut con, &["FLUSHDB"]), Value::Okay);
    eprintln!("FLUSHDB of {KEYS} keys took {:?}", flush_started.elapsed());
    assert_eq!(dbsize(&mut con), 0);
    assert_eq!(
        scan_all(&mut con, &["COUNT", "1000"]).0,
        Vec::<String>::new()
    );
    let deleted: Vec<Entry> = read_log(&mut con, partition)
        .into_iter()
        .filter(|e| e.commit_id > last)
        .collect();
    assert!(
        deleted.iter().all(|e| e.change == "delete"),
        "{:?}",
        &deleted[..deleted.len().min(5)]
    );
    let in_partition: HashSet<String> = stable
        .iter()
        .filter(|k| server.partition_of(k.as_bytes()) == partition)
        .cloned()
        .collect();
    assert_eq!(
        deleted.len(),
        in_partition.len(),
        "one delete per key of partition {partition}"
    );
    assert!(set_of(&deleted.iter().map(|e| e.key.clone()).collect::<Vec<_>>()) == in_partition);
}

#[test]
fn flushdb_and_flushall_clear_every_worker_and_log_each_key_as_deleted() {
    let server = Server::start("workers = 3\n");
    let mut con = server.conn();
    let keys: Vec<String> = (0..3000).map(|i| format!("f:{i}")).collect();
    load(&mut con, keys.iter().map(|k| cmd(&["SET", k, "v"])), 500);
    assert_eq!(dbsize(&mut con), 3000);

    // The last commit of a few partitions before the flush.
    let partitions: Vec<u32> = (0..3)
        .map(|worker| {
            let key = keys
                .iter()
                .find(|k| server.worker_of(k.as_bytes()) == worker)
                .expect("a key on every worker");
            server.partition_of(key.as_bytes())
        })
        .collect();
    assert_eq!(
        partitions.len(),
        3,
        "one partition per worker: {partitions:?}"
    );
    let before: Vec<i64> = partitions
        .iter()
        .map(|p| read_log(&mut con, *p).last().map_or(0, |e| e.commit_id))
        .collect();

    assert_eq!(common::call_str(&mut con, &["FLUSHDB"]), Value::Okay);
    assert_eq!(dbsize(&mut con), 0);
    assert!(keys_cmd(&mut con, "*").is_empty());
    assert_eq!(
        scan_all(&mut con, &["COUNT", "1000"]).0,
        Vec::<String>::new()
    );
    let values: Vec<Option<String>> = redis::cmd("MGET")
        .arg(&keys[..10])
        .query(&mut con)
        .expect("MGET");
    assert!(values.iter().all(Option::is_none), "{values:?}");

    for (partition, last) in partitions.iter().zip(before) {
        let expected: HashSet<String> = keys
            .iter()
            .filter(|k| server.partition_of(k.as_bytes()) == *partition)
            .cloned()
            .collect();
        let after: Vec<Entry> = read_log(&mut con, *partition)
            .into_iter()
            .filter(|e| e.commit_id > last)
            .collect();
        assert!(
            after.iter().all(|e| e.change == "delete"),
            "partition {partition}: {after:?}"
        );
        let deleted: Vec<String> = after.iter().map(|e| e.key.clone()).collect();
        assert_eq!(
            deleted.len(),
            expected.len(),
            "one delete per key in partition {partition}"
        );
        assert_eq!(
            set_of(&deleted),
            expected,
            "partition {partition}: the deleted keys"
        );
    }

    // FLUSHALL clears every collection; FLUSHDB only the selected one.
    let mut raw = server.raw();
    for db in ["0", "1", "2"] {
        assert!(!raw.cmd(&["SELECT", db]).is_error());
        for i in 0..20 {
            assert!(!raw.cmd(&["SET", &format!("db{db}:{i}"), "v"]).is_error());
        }
    }
    assert!(!raw.cmd(&["SELECT", "2"]).is_error());
    assert_eq!(raw.cmd(&["FLUSHDB"]).text(), "OK");
    assert_eq!(raw.cmd(&["DBSIZE"]).int(), 0);
    assert!(!raw.cmd(&["SELECT", "1"]).is_error());
    assert_eq!(
        raw.cmd(&["DBSIZE"]).int(),
        20,
        "FLUSHDB in db 2 left db 1 alone"
    );
    assert_eq!(raw.cmd(&["FLUSHALL"]).text(), "OK");
    for db in ["0", "1", "2"] {
        assert!(!raw.cmd(&["SELECT", db]).is_error());
        assert_eq!(raw.cmd(&["DBSIZE"]).int(), 0, "db {db} after FLUSHALL");
    }
    assert!(raw.cmd(&["FLUSHDB", "BOGUS"]).is_error());
}

// ---------------------------------------------------------------- expiry

#[test]
fn a_key_set_with_px_200_is_gone_within_a_second_and_its_expiry_is_logged_as_a_delete() {
    let server = Server::start("");
    let mut con = server.conn();
    let set_at = Instant::now();
    assert_eq!(
        common::call_str(&mut con, &["SET", "brief", "v", "PX", "200"]),
        Value::Okay
    );
    let value: Option<String> = redis::cmd("GET").arg("brief").query(&mut con).expect("GET");
    if set_at.elapsed() < Duration::from_millis(150) {
        assert_eq!(value.as_deref(), Some("v"), "the key lives until its time");
    }
    let mut gone_by_get = None;
    let mut gone_by_dbsize = None;
    while set_at.elapsed() < Duration::from_millis(1500)
        && (gone_by_get.is_none() || gone_by_dbsize.is_none())
    {
        let value: Option<String> = redis::cmd("GET").arg("brief").query(&mut con).expect("GET");
        if value.is_none() && gone_by_get.is_none() {
            gone_by_get = Some(set_at.elapsed());
        }
        if dbsize(&mut con) == 0 && gone_by_dbsize.is_none() {
            gone_by_dbsize = Some(set_at.elapsed());
        }
        sleep(Duration::from_millis(10));
    }
    let limit = Duration::from_secs(1);
    assert!(
        gone_by_get.is_some_and(|t| t <= limit),
        "GET still returned the key after 1 s: {gone_by_get:?}"
    );
    assert!(
        gone_by_dbsize.is_some_and(|t| t <= limit),
        "DBSIZE still counted the key after 1 s: {gone_by_dbsize:?}"
    );
    assert!(
        gone_by_get.is_some_and(|t| t >= Duration::from_millis(190)),
        "expired too early: {gone_by_get:?}"
    );

    // The expiry is in the commit log as a delete, after the create that carried the time.
    let entries = read_log(&mut con, server.partition_of(b"brief"));
    let changes: Vec<(&str, bool)> = entries
        .iter()
        .filter(|e| e.key == "brief")
        .map(|e| (e.change.as_str(), e.expires_at_ms >= 0))
        .collect();
    assert_eq!(
        changes,
        vec![("create", true), ("delete", false)],
        "{entries:?}"
    );
}

#[test]
fn fifty_thousand_keys_with_short_ttls_expire_without_any_client_touching_them() {
    const EXPIRING: usize = 50_000;
    const KEPT: usize = 1000;
    let server = Server::start("");
    let mut con = server.conn();
    let started = Instant::now();
    load(
        &mut con,
        (0..EXPIRING).map(|i| {
            cmd(&[
                "SET",
                &format!("t:{i}"),
                "v",
                "PX",
                &(300 + (i * 7919) % 500).to_string(),
            ])
        }),
        1000,
    );
    load(
        &mut con,
        (0..KEPT).map(|i| cmd(&["SET", &format!("keep:{i}"), "v"])),
        1000,
    );
    let loaded = started.elapsed();
    let load_end = Instant::now();

    // Only DBSIZE is asked, which reads no key: the workers expire the keys by themselves.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut sizes = Vec::new();
    loop {
        let size = dbsize(&mut con);
        sizes.push(size);
        if size == KEPT as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "DBSIZE did not come down to {KEPT} within 15 s after loading (loaded in {loaded:?}); sizes seen: {:?}",
            &sizes[sizes.len().saturating_sub(20)..]
        );
        sleep(Duration::from_millis(100));
    }
    eprintln!(
        "loaded in {loaded:?}; every key expired {:?} after loading",
        load_end.elapsed()
    );
    // Not a wait for a condition: the keys without a TTL must still be there a while later.
    sleep(Duration::from_millis(300));
    assert_eq!(dbsize(&mut con), KEPT as i64, "keys without a TTL stay");
    let sample: Vec<Option<String>> = redis::cmd("MGET")
        .arg(&["t:0", "t:1", "t:49999", "keep:0", "keep:999"])
        .query(&mut con)
        .expect("MGET");
    assert_eq!(
        sample,
        vec![None, None, None, Some("v".into()), Some("v".into())]
    );

    // Each expiry is logged as a delete of a key that was created with a time to live.
    let partition = server.partition_of(b"t:0");
    let by_key = changes_by_key(&read_log(&mut con, partition));
    let expected: Vec<String> = (0..EXPIRING)
        .map(|i| format!("t:{i}"))
        .filter(|k| server.partition_of(k.as_bytes()) == partition)
        .collect();
    assert!(
        expected.len() > 50,
        "{} expiring keys in partition {partition}",
        expected.len()
    );
    for key in &expected {
        assert_eq!(
            by_key.get(key).map(Vec::as_slice),
            Some(&["create".to_string(), "delete".to_string()][..]),
            "{key}"
        );
    }
}

#[test]
fn ttl_and_pttl_answer_minus_2_and_minus_1_where_redis_does() {
    let server = Server::start("");
    let mut con = server.conn();
    let int = |con: &mut redis::Connection, args: &[&str]| -> i64 {
        match common::call_str(con, args) {
            Value::Int(n) => n,
            other => panic!("{args:?} answered {other:?}"),
        }
    };
    let now_s = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64
    };

    // A missing key: -2 everywhere.
    for command in ["TTL", "PTTL", "EXPIRETIME", "PEXPIRETIME"] {
        assert_eq!(
            int(&mut con, &[command, "missing"]),
            -2,
            "{command} of a missing key"
        );
    }
    assert_eq!(int(&mut con, &["PERSIST", "missing"]), 0);
    assert_eq!(int(&mut con, &["EXPIRE", "missing", "100"]), 0);

    // A key without expiry: -1.
    assert_eq!(common::call_str(&mut con, &["SET", "p", "v"]), Value::Okay);
    for command in ["TTL", "PTTL", "EXPIRETIME", "PEXPIRETIME"] {
        assert_eq!(
            int(&mut con, &[command, "p"]),
            -1,
            "{command} of a key without expiry"
        );
    }
    assert_eq!(
        int(&mut con, &["PERSIST", "p"]),
        0,
        "PERSIST of a key without expiry"
    );

    // With a time to live.
    assert_eq!(int(&mut con, &["EXPIRE", "p", "100"]), 1);
    assert!((99..=100).contains(&int(&mut con, &["TTL", "p"])));
    assert!((99_000..=100_000).contains(&int(&mut con, &["PTTL", "p"])));
    assert!((now_s() + 98..=now_s() + 101).contains(&int(&mut con, &["EXPIRETIME", "p"])));
    assert_eq!(int(&mut con, &["PERSIST", "p"]), 1);
    assert_eq!(int(&mut con, &["TTL", "p"]), -1);

    // NX / XX / GT / LT.
    assert_eq!(
        int(&mut con, &["EXPIRE", "p", "100", "XX"]),
        0,
        "XX without a TTL"
    );
    assert_eq!(
        int(&mut con, &["EXPIRE", "p", "100", "GT"]),
        0,
        "GT without a TTL (no TTL is infinite)"
    );
    assert_eq!(int(&mut con, &["EXPIRE", "p", "100", "NX"]), 1);
    assert_eq!(int(&mut con, &["EXPIRE", "p", "200", "NX"]), 0);
    assert_eq!(int(&mut con, &["EXPIRE", "p", "50", "GT"]), 0);
    assert_eq!(int(&mut con, &["EXPIRE", "p", "200", "GT"]), 1);
    assert_eq!(int(&mut con, &["EXPIRE", "p", "300", "LT"]), 0);
    assert_eq!(int(&mut con, &["EXPIRE", "p", "150", "LT"]), 1);
    assert!((149..=150).contains(&int(&mut con, &["TTL", "p"])));
    assert_eq!(int(&mut con, &["EXPIRE", "p", "150", "XX"]), 1);

    // SET clears the TTL unless KEEPTTL; GETEX changes it.
    assert_eq!(
        common::call_str(&mut con, &["SET", "p", "w", "KEEPTTL"]),
        Value::Okay
    );
    assert!(
        (149..=150).contains(&int(&mut con, &["TTL", "p"])),
        "KEEPTTL keeps it"
    );
    assert_eq!(common::call_str(&mut con, &["SET", "p", "x"]), Value::Okay);
    assert_eq!(int(&mut con, &["TTL", "p"]), -1, "a plain SET clears it");
    assert_eq!(
        common::call_str(&mut con, &["GETEX", "p", "PX", "5000"]),
        Value::BulkString(b"x".to_vec())
    );
    assert!((4000..=5000).contains(&int(&mut con, &["PTTL", "p"])));
    assert_eq!(
        common::call_str(&mut con, &["GETEX", "p", "PERSIST"]),
        Value::BulkString(b"x".to_vec())
    );
    assert_eq!(int(&mut con, &["PTTL", "p"]), -1);
    assert_eq!(
        common::call_str(
            &mut con,
            &["SET", "p", "y", "EXAT", &(now_s() + 1000).to_string()]
        ),
        Value::Okay
    );
    assert!((998..=1000).contains(&int(&mut con, &["TTL", "p"])));
    let at_ms = (now_s() + 2000) * 1000;
    assert_eq!(
        common::call_str(&mut con, &["SET", "p", "y", "PXAT", &at_ms.to_string()]),
        Value::Okay
    );
    assert_eq!(int(&mut con, &["PEXPIRETIME", "p"]), at_ms);

    // A time in the past deletes the key at once.
    assert_eq!(int(&mut con, &["EXPIRE", "p", "-1"]), 1);
    assert_eq!(int(&mut con, &["TTL", "p"]), -2);
    assert_eq!(common::call_str(&mut con, &["SET", "q", "v"]), Value::Okay);
    assert_eq!(
        int(
            &mut con,
            &["PEXPIREAT", "q", &(at_ms - 3_000_000).to_string()]
        ),
        1
    );
    assert_eq!(common::call_str(&mut con, &["GET", "q"]), Value::Nil);
    assert_eq!(int(&mut con, &["EXISTS", "q"]), 0);

    // A key that expired reads as missing: -2.
    assert_eq!(
        common::call_str(&mut con, &["SET", "r", "v", "PX", "100"]),
        Value::Okay
    );
    assert!((1..=100).contains(&int(&mut con, &["PTTL", "r"])));
    // The behaviour under test: once its 100 ms have passed, the key reads as missing.
    sleep(Duration::from_millis(250));
    assert_eq!(int(&mut con, &["TTL", "r"]), -2);
    assert_eq!(int(&mut con, &["PTTL", "r"]), -2);
    assert_eq!(common::call_str(&mut con, &["GET", "r"]), Value::Nil);
}

// ---------------------------------------------------------------- SWAPDB

/// The texts of an array reply of bulk strings.
fn texts(reply: &common::Resp) -> Vec<String> {
    reply.array().iter().map(|item| item.text()).collect()
}

#[test]
fn swapdb_exchanges_two_databases_for_every_client_and_keeps_the_swap_across_a_restart() {
    let mut server = Server::start("workers = 3\n");
    let mut setup = server.raw();
    // Database 0: strings on every worker, a hash, a list and a key with a TTL.
    for i in 0..30 {
        assert_eq!(setup.cmd(&["SET", &format!("a:{i}"), "zero"]).text(), "OK");
    }
    assert_eq!(setup.cmd(&["HSET", "h", "f", "zero"]).int(), 1);
    assert_eq!(setup.cmd(&["RPUSH", "l", "x", "y"]).int(), 2);
    assert_eq!(setup.cmd(&["SET", "t", "v", "EX", "1000"]).text(), "OK");
    // Database 1: other strings, a sorted set, and the list a pop blocked in 0 waits for.
    assert_eq!(setup.cmd(&["SELECT", "1"]).text(), "OK");
    for i in 0..20 {
        assert_eq!(setup.cmd(&["SET", &format!("b:{i}"), "one"]).text(), "OK");
    }
    assert_eq!(setup.cmd(&["ZADD", "z", "1", "m"]).int(), 1);
    assert_eq!(setup.cmd(&["RPUSH", "q", "item"]).int(), 1);

    let mut blocked = server.raw();
    blocked.send(&encode_command(&[b"BLPOP", b"q", b"10"]));
    // A client that watches a key of database 0 sees its EXEC fail: the key it names is
    // another one after the swap, as Redis makes it.
    let mut watcher = server.raw();
    assert_eq!(watcher.cmd(&["WATCH", "a:1"]).text(), "OK");
    sleep(Duration::from_millis(200));

    assert_eq!(setup.cmd(&["SWAPDB", "0", "1"]).text(), "OK");

    // The pop blocked in database 0 is served from the list that came into it.
    assert_eq!(
        texts(&blocked.read_reply().expect("BLPOP reply")),
        ["q", "item"]
    );
    assert_eq!(watcher.cmd(&["MULTI"]).text(), "OK");
    assert_eq!(watcher.cmd(&["SET", "a:1", "mine"]).text(), "QUEUED");
    assert!(
        watcher.cmd(&["EXEC"]) == common::Resp::NilArray,
        "EXEC ran though SWAPDB changed the watched key"
    );

    // The connection that had selected 1 now sees what 0 held; a new one (in 0) sees 1's.
    assert_eq!(setup.cmd(&["GET", "a:7"]).text(), "zero");
    assert_eq!(setup.cmd(&["HGET", "h", "f"]).text(), "zero");
    assert_eq!(texts(&setup.cmd(&["LRANGE", "l", "0", "-1"])), ["x", "y"]);
    let ttl = setup.cmd(&["TTL", "t"]).int();
    assert!((990..=1000).contains(&ttl), "TTL {ttl} after SWAPDB");
    assert_eq!(setup.cmd(&["DBSIZE"]).int(), 33);
    let mut fresh = server.raw();
    assert_eq!(fresh.cmd(&["DBSIZE"]).int(), 21);
    assert_eq!(fresh.cmd(&["TYPE", "z"]).text(), "zset");
    assert_eq!(fresh.cmd(&["GET", "a:7"]), common::Resp::NilBulk);
    let mget = fresh.cmd(&["MGET", "b:0", "b:1", "b:2", "b:3", "a:0"]);
    assert_eq!(
        mget.array()
            .iter()
            .map(|r| *r == common::Resp::NilBulk)
            .collect::<Vec<_>>(),
        [false, false, false, false, true]
    );
    let info = fresh.cmd(&["INFO", "keyspace"]).text();
    assert!(info.contains("db0:keys=21,"), "{info}");
    assert!(info.contains("db1:keys=33,"), "{info}");
    // MOVE and COPY ... DB name databases, not where they are kept.
    assert_eq!(fresh.cmd(&["MOVE", "b:0", "1"]).int(), 1);
    assert_eq!(fresh.cmd(&["COPY", "b:1", "b:1", "DB", "1"]).int(), 1);
    assert_eq!(setup.cmd(&["GET", "b:0"]).text(), "one");
    assert_eq!(setup.cmd(&["GET", "b:1"]).text(), "one");

    // Errors, as Redis words them; a transaction refuses SWAPDB and nothing of it runs.
    let error = |reply: common::Resp| reply.error();
    assert_eq!(
        error(fresh.cmd(&["SWAPDB", "0", "16"])),
        "ERR DB index is out of range"
    );
    assert_eq!(
        error(fresh.cmd(&["SWAPDB", "x", "1"])),
        "ERR invalid first DB index"
    );
    assert_eq!(
        error(fresh.cmd(&["SWAPDB", "0", "y"])),
        "ERR invalid second DB index"
    );
    assert!(error(fresh.cmd(&["SWAPDB", "0"])).contains("wrong number of arguments"));
    assert_eq!(fresh.cmd(&["MULTI"]).text(), "OK");
    assert_eq!(fresh.cmd(&["SET", "in-multi", "v"]).text(), "QUEUED");
    assert_eq!(fresh.cmd(&["SWAPDB", "0", "1"]).text(), "QUEUED");
    assert!(error(fresh.cmd(&["EXEC"])).contains("SWAPDB"));
    assert_eq!(fresh.cmd(&["GET", "in-multi"]), common::Resp::NilBulk);

    // The swap is on disk: a restart keeps it.
    let map_file = server.data_dir.join("databases");
    assert!(map_file.exists());
    server.stop();
    server.restart();
    let mut after = server.raw();
    assert_eq!(after.cmd(&["GET", "b:5"]).text(), "one");
    assert_eq!(after.cmd(&["TYPE", "z"]).text(), "zset");
    assert_eq!(after.cmd(&["SELECT", "1"]).text(), "OK");
    assert_eq!(after.cmd(&["GET", "a:7"]).text(), "zero");
    // Swapping back puts every database home, and the map file goes.
    assert_eq!(after.cmd(&["SWAPDB", "1", "0"]).text(), "OK");
    assert_eq!(after.cmd(&["GET", "b:5"]).text(), "one");
    assert_eq!(after.cmd(&["GET", "a:7"]), common::Resp::NilBulk);
    assert!(!map_file.exists());
}

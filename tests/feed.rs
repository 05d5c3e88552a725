//! The change feed (`SHOAL.FEED`): a client following it from cursor 0 while
//! 10,000 mixed writes run sees every change exactly once, in commit order per
//! partition, with the right change types and values; BLOCK waits for new
//! entries; and a cursor behind the retained log gets an error that says so.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{test_seed, wait_until, Resp, Rng, Server};

const WORKERS: usize = 3;
const KEYS: usize = 300;
const WRITES: usize = 10_000;
const PIPELINE: usize = 50;
/// Writers running at once, each on its own share of the keys.
const WRITERS: usize = 4;
const _: () = assert!(WRITES.is_multiple_of(WRITERS));
/// Longest time to live the writer sets, in milliseconds.
const MAX_TTL_MS: u64 = 300;

/// A feed entry: `[partition, commit_id, timestamp_ms, change_type, collection, key, data, expires_at_ms]`.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    partition: i64,
    commit_id: i64,
    change: String,
    collection: i64,
    key: String,
    data: String,
    expires_at_ms: i64,
}

impl Entry {
    fn from_feed(reply: &Resp) -> Entry {
        match reply.array() {
            [partition, commit_id, timestamp, change, collection, key, data, expires] => {
                assert!(timestamp.int() > 0, "{reply:?}");
                Entry {
                    partition: partition.int(),
                    commit_id: commit_id.int(),
                    change: change.text(),
                    collection: collection.int(),
                    key: key.text(),
                    data: data.text(),
                    expires_at_ms: expires.int(),
                }
            }
            _ => panic!("a feed entry has 8 fields: {reply:?}"),
        }
    }
}

/// One SHOAL.FEED call: (next cursor, entries), or the error text.
fn feed(raw: &mut common::RawConn, args: &[&str]) -> Result<(String, Vec<Entry>), String> {
    let mut command = vec!["SHOAL.FEED"];
    command.extend_from_slice(args);
    let reply = raw.cmd(&command);
    if reply.is_error() {
        return Err(reply.error());
    }
    match reply.array() {
        [cursor, entries] => Ok((
            cursor.text(),
            entries.array().iter().map(Entry::from_feed).collect(),
        )),
        _ => panic!("SHOAL.FEED answered {reply:?}"),
    }
}

fn key_name(i: usize) -> String {
    format!("feed:{i}")
}

fn pick(rng: &mut Rng, keys: &[String]) -> String {
    keys[rng.below(keys.len() as u64) as usize].clone()
}

/// `n` distinct keys of `from`.
fn distinct_keys(rng: &mut Rng, from: &[String], n: usize) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    while keys.len() < n {
        let key = pick(rng, from);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    keys
}

/// One write and what its reply means for the data values logged per key.
enum Write {
    /// SET/MSET/INCR/SET PX: each key gets a value (INCR: the reply).
    Put {
        command: Vec<String>,
        keys: Vec<String>,
        values: Vec<String>,
        incr: bool,
    },
    /// DEL of one or more keys.
    Delete { command: Vec<String> },
    /// PEXPIRE: an update carrying the current value when the reply is 1, or a delete
    /// when the worker applies it after its deadline (taken when the net-daemon
    /// received it), which only a reply that took at least the time to live can show.
    Expire {
        command: Vec<String>,
        key: String,
        ttl: Duration,
    },
}

/// What a write left in a key's log: its value, or for a PEXPIRE answered 1 after at
/// least its time to live its value or a delete ([`Write::Expire`]).
#[derive(Clone, Debug, PartialEq)]
enum Logged {
    Value(String),
    ValueOrDelete(String),
}

/// Whether a key's entries in the feed (`None` for a delete) are the values written to
/// it, in order: a delete stands for the PEXPIRE expected next, if one is (the key was
/// present when the PEXPIRE was applied, so no other delete can come before it), and
/// is otherwise one of the deletes (DEL, expiry) that leave no value.
fn logged_as_written(written: &[Logged], seen: &[Option<String>]) -> bool {
    let mut written = written.iter().peekable();
    for entry in seen {
        match entry {
            Some(value) => match written.next() {
                Some(Logged::Value(expected) | Logged::ValueOrDelete(expected))
                    if expected == value => {}
                _ => return false,
            },
            None => {
                if let Some(Logged::ValueOrDelete(_)) = written.peek() {
                    written.next();
                }
            }
        }
    }
    written.next().is_none()
}

/// A random write on the keys `from`.
fn random_write(rng: &mut Rng, from: &[String]) -> Write {
    let roll = rng.below(100);
    match roll {
        0..=29 => {
            let key = pick(rng, from);
            let v = rng.below(1_000_000).to_string();
            Write::Put {
                command: vec!["SET".into(), key.clone(), v.clone()],
                keys: vec![key],
                values: vec![v],
                incr: false,
            }
        }
        30..=39 => {
            let key = pick(rng, from);
            let v = rng.below(1_000_000).to_string();
            let ttl = (50 + rng.below(MAX_TTL_MS - 50)).to_string();
            Write::Put {
                command: vec!["SET".into(), key.clone(), v.clone(), "PX".into(), ttl],
                keys: vec![key],
                values: vec![v],
                incr: false,
            }
        }
        40..=54 => {
            let key = pick(rng, from);
            Write::Put {
                command: vec!["INCR".into(), key.clone()],
                keys: vec![key],
                values: Vec::new(),
                incr: true,
            }
        }
        55..=69 => {
            let n = 3 + rng.below(3) as usize;
            let keys = distinct_keys(rng, from, n);
            let values: Vec<String> = keys
                .iter()
                .map(|_| rng.below(1_000_000).to_string())
                .collect();
            let mut command = vec!["MSET".to_string()];
            for (key, value) in keys.iter().zip(&values) {
                command.push(key.clone());
                command.push(value.clone());
            }
            Write::Put {
                command,
                keys,
                values,
                incr: false,
            }
        }
        70..=84 => {
            let n = 1 + rng.below(3) as usize;
            let keys = distinct_keys(rng, from, n);
            let mut command = vec!["DEL".to_string()];
            command.extend(keys);
            Write::Delete { command }
        }
        _ => {
            let key = pick(rng, from);
            let ttl = 20 + rng.below(MAX_TTL_MS - 20);
            Write::Expire {
                command: vec!["PEXPIRE".into(), key.clone(), ttl.to_string()],
                key,
                ttl: Duration::from_millis(ttl),
            }
        }
    }
}

impl Write {
    fn command(&self) -> &[String] {
        match self {
            Write::Put { command, .. }
            | Write::Delete { command }
            | Write::Expire { command, .. } => command,
        }
    }
}

#[test]
fn the_feed_check_takes_a_delete_only_for_a_pexpire_that_may_have_come_late() {
    let value = |v: &str| Logged::Value(v.to_string());
    let expire = |v: &str| Logged::ValueOrDelete(v.to_string());
    let seen = |entries: &[Option<&str>]| -> Vec<Option<String>> {
        entries.iter().map(|e| e.map(str::to_string)).collect()
    };
    let written = [value("a"), expire("a"), value("b")];
    // The PEXPIRE logged as an update, then its expiry, then a new value.
    assert!(logged_as_written(
        &written,
        &seen(&[Some("a"), Some("a"), None, Some("b")])
    ));
    // The PEXPIRE applied after its deadline: a delete.
    assert!(logged_as_written(
        &written,
        &seen(&[Some("a"), None, Some("b")])
    ));
    // A value missing, out of order, or one too many.
    assert!(!logged_as_written(&written, &seen(&[Some("a"), Some("b")])));
    assert!(!logged_as_written(&written, &seen(&[Some("a"), None])));
    assert!(!logged_as_written(
        &written,
        &seen(&[Some("a"), Some("b"), Some("a")])
    ));
    assert!(!logged_as_written(
        &written,
        &seen(&[Some("a"), Some("a"), Some("b"), Some("c")])
    ));
    // A delete never stands for a plain value: a PEXPIRE answered within its time to
    // live must be logged as an update, even when the key expires afterwards.
    assert!(!logged_as_written(&[value("a")], &seen(&[None])));
    assert!(!logged_as_written(
        &[value("a"), value("a")],
        &seen(&[Some("a"), None])
    ));
}

/// Sends `writes` random writes on `keys` in pipelines. Returns, per key, what the writes
/// left in its log, in order, and how many writes of each kind were made.
fn run_writer(
    mut raw: common::RawConn,
    seed: u64,
    keys: &[String],
    writes: usize,
) -> (HashMap<String, Vec<Logged>>, BTreeMap<&'static str, usize>) {
    let mut rng = Rng::new(seed);
    let mut expected: HashMap<String, Vec<Logged>> = HashMap::new();
    let mut last_value: HashMap<String, String> = HashMap::new();
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut written = 0;
    while written < writes {
        let batch: Vec<Write> = (0..PIPELINE.min(writes - written))
            .map(|_| random_write(&mut rng, keys))
            .collect();
        let mut bytes = Vec::new();
        for write in &batch {
            let args: Vec<&[u8]> = write.command().iter().map(|a| a.as_bytes()).collect();
            bytes.extend(common::encode_command(&args));
        }
        let sent = Instant::now();
        raw.send(&bytes);
        for write in &batch {
            let reply = raw.read_reply().expect("reply");
            assert!(!reply.is_error(), "{:?} -> {reply:?}", write.command());
            match write {
                Write::Put {
                    keys, values, incr, ..
                } => {
                    let values = if *incr {
                        vec![reply.int().to_string()]
                    } else {
                        values.clone()
                    };
                    for (key, value) in keys.iter().zip(values) {
                        expected
                            .entry(key.clone())
                            .or_default()
                            .push(Logged::Value(value.clone()));
                        last_value.insert(key.clone(), value);
                    }
                    *counts
                        .entry(if *incr { "incr" } else { "put" })
                        .or_default() += 1;
                }
                Write::Delete { .. } => *counts.entry("del").or_default() += 1,
                Write::Expire { key, ttl, .. } => {
                    if reply.int() == 1 {
                        let value = last_value
                            .get(key)
                            .cloned()
                            .expect("PEXPIRE 1 on a key the writer set");
                        // Its deadline is at least the send plus the time to live, and it
                        // was applied before the reply was read.
                        let logged = match sent.elapsed() >= *ttl {
                            true => Logged::ValueOrDelete(value),
                            false => Logged::Value(value),
                        };
                        expected.entry(key.clone()).or_default().push(logged);
                        *counts.entry("pexpire 1").or_default() += 1;
                    } else {
                        *counts.entry("pexpire 0").or_default() += 1;
                    }
                }
            }
        }
        written += batch.len();
    }
    (expected, counts)
}

#[test]
fn a_follower_from_cursor_0_sees_every_change_of_10000_mixed_writes_exactly_once_in_commit_order() {
    let server = Server::start(&format!("workers = {WORKERS}\n"));
    let seed = test_seed("write");

    // The follower starts first, from cursor 0, and blocks while nothing is new.
    let stop = Arc::new(AtomicBool::new(false));
    let follower = {
        let stop = Arc::clone(&stop);
        let mut raw = server.raw();
        std::thread::spawn(move || {
            let mut cursor = "0".to_string();
            let mut entries = Vec::new();
            let mut calls = 0usize;
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let stopping = stop.load(Ordering::Acquire);
                let (next, batch) = feed(&mut raw, &[&cursor, "COUNT", "1000", "BLOCK", "200"])
                    .unwrap_or_else(|e| panic!("SHOAL.FEED {cursor}: {e}"));
                calls += 1;
                cursor = next;
                let empty = batch.is_empty();
                entries.extend(batch);
                if stopping && empty {
                    return (entries, calls, cursor);
                }
                assert!(Instant::now() < deadline, "the follower did not finish");
            }
        })
    };

    // Writers on disjoint keys, each pipelined on one connection, so that the order of the
    // writes to a key is the order of their replies.
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let raw = server.raw();
            let keys: Vec<String> = (0..KEYS)
                .filter(|i| i % WRITERS == writer)
                .map(key_name)
                .collect();
            let seed = seed
                .wrapping_add(writer as u64)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                | 1;
            std::thread::spawn(move || run_writer(raw, seed, &keys, WRITES / WRITERS))
        })
        .collect();
    let mut expected: HashMap<String, Vec<Logged>> = HashMap::new();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for writer in writers {
        let (values, writer_counts) = writer.join().expect("writer thread");
        expected.extend(values);
        for (kind, n) in writer_counts {
            *counts.entry(kind).or_default() += n;
        }
    }
    eprintln!("writes: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), WRITES);

    // Every time to live has passed and active expiry has logged its deletes; then the
    // follower drains the feed. A read hides an expired key without purging it, while
    // DBSIZE counts every stored key: the two agree once expiry has purged them all.
    let all_keys: Vec<String> = (0..KEYS).map(key_name).collect();
    let mut probe = server.conn();
    wait_until(
        "every time to live to pass and active expiry to purge the expired keys",
        Duration::from_millis(MAX_TTL_MS) + Duration::from_secs(30),
        || {
            let mut ttls = redis::pipe();
            for key in &all_keys {
                ttls.cmd("PTTL").arg(key);
            }
            let ttls: Vec<i64> = ttls.query(&mut probe).map_err(|e| e.to_string())?;
            let pending = ttls.iter().filter(|&&ttl| ttl >= 0).count();
            if pending > 0 {
                return Err(format!("{pending} keys still have a time to live"));
            }
            let mut exists = redis::pipe();
            for key in &all_keys {
                exists.cmd("EXISTS").arg(key);
            }
            let live: i64 = exists
                .query::<Vec<i64>>(&mut probe)
                .map_err(|e| e.to_string())?
                .iter()
                .sum();
            let stored: i64 = redis::cmd("DBSIZE")
                .query(&mut probe)
                .map_err(|e| e.to_string())?;
            if stored == live {
                Ok(())
            } else {
                Err(format!("{stored} keys stored, {live} of them live"))
            }
        },
    );
    stop.store(true, Ordering::Release);
    let (entries, calls, cursor) = follower.join().expect("follower thread");
    eprintln!(
        "the follower read {} entries in {calls} calls",
        entries.len()
    );
    assert!(
        entries.len() >= WRITES,
        "{} entries for {WRITES} writes",
        entries.len()
    );

    // Commit order per partition: ids 1, 2, 3, ... with no gap and no repeat.
    let mut by_partition: BTreeMap<i64, Vec<&Entry>> = BTreeMap::new();
    for entry in &entries {
        by_partition.entry(entry.partition).or_default().push(entry);
    }
    for (partition, list) in &by_partition {
        for (index, entry) in list.iter().enumerate() {
            assert_eq!(
                entry.commit_id,
                index as i64 + 1,
                "partition {partition}: entry {index} is {entry:?}"
            );
        }
        assert!(
            list.iter()
                .all(|e| i64::from(server.partition_of(e.key.as_bytes())) == *partition),
            "partition {partition} holds only its own keys"
        );
    }
    assert!(
        by_partition.len() > 100,
        "the writes touched many partitions: {}",
        by_partition.len()
    );

    // Replaying the feed in order: a create only for a missing key, an update or a delete only
    // for a present one; per key, the values logged are exactly the values written, in order.
    let mut state: HashMap<String, (String, i64)> = HashMap::new();
    let mut logged: HashMap<String, Vec<Option<String>>> = HashMap::new();
    let mut types: BTreeMap<String, usize> = BTreeMap::new();
    for entry in &entries {
        assert_eq!(entry.collection, 0, "{entry:?}");
        *types.entry(entry.change.clone()).or_default() += 1;
        let present = state.contains_key(&entry.key);
        match entry.change.as_str() {
            "create" => assert!(!present, "a create of a present key: {entry:?}"),
            "update" => assert!(present, "an update of a missing key: {entry:?}"),
            "delete" => assert!(present, "a delete of a missing key: {entry:?}"),
            other => panic!("unknown change type {other:?}: {entry:?}"),
        }
        if entry.change == "delete" {
            assert!(
                entry.data.is_empty() && entry.expires_at_ms == -1,
                "{entry:?}"
            );
            state.remove(&entry.key);
            logged.entry(entry.key.clone()).or_default().push(None);
        } else {
            state.insert(entry.key.clone(), (entry.data.clone(), entry.expires_at_ms));
            logged
                .entry(entry.key.clone())
                .or_default()
                .push(Some(entry.data.clone()));
        }
    }
    eprintln!("change types: {types:?}");
    assert!(
        types.get("create").is_some_and(|&n| n > 0) && types.get("update").is_some_and(|&n| n > 0)
    );
    assert!(types.get("delete").is_some_and(|&n| n > 0));
    for i in 0..KEYS {
        let key = key_name(i);
        let written = expected.get(&key).cloned().unwrap_or_default();
        let seen = logged.get(&key).cloned().unwrap_or_default();
        assert!(
            logged_as_written(&written, &seen),
            "{key}: values written {written:?}\nentries in the feed (None: a delete) {seen:?}"
        );
    }

    // The state replayed from the feed is the server's data.
    let keys: Vec<String> = (0..KEYS).map(key_name).collect();
    let mut con = server.conn();
    let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query(&mut con).expect("MGET");
    for (key, value) in keys.iter().zip(values) {
        let replayed = state.get(key);
        assert_eq!(
            replayed.map(|(data, _)| data.clone()),
            value,
            "{key}: replayed from the feed vs stored"
        );
        if let Some((_, expires_at_ms)) = replayed {
            assert_eq!(
                *expires_at_ms, -1,
                "{key}: every time to live has passed, so no live key keeps one"
            );
        }
    }

    // The feed and SHOAL.LOG tell the same story.
    let (partition, list) = by_partition
        .iter()
        .max_by_key(|(_, list)| list.len())
        .expect("partitions");
    type LogRow = (i64, i64, String, i64, String, String, i64);
    let log: Vec<(i64, String, String, String, i64)> = redis::cmd("SHOAL.LOG")
        .arg(*partition)
        .arg(0)
        .arg("COUNT")
        .arg(10_000)
        .query::<Vec<LogRow>>(&mut con)
        .expect("SHOAL.LOG")
        .into_iter()
        .map(|(commit_id, _, change, _, key, data, expires)| {
            (commit_id, change, key, data, expires)
        })
        .collect();
    let from_feed: Vec<(i64, String, String, String, i64)> = list
        .iter()
        .map(|e| {
            (
                e.commit_id,
                e.change.clone(),
                e.key.clone(),
                e.data.clone(),
                e.expires_at_ms,
            )
        })
        .collect();
    assert_eq!(log, from_feed, "partition {partition}");

    // The follower's cursor is the end of every partition's log, as `$` names it.
    let mut raw = server.raw();
    let (now, _) = feed(&mut raw, &["$", "COUNT", "1"]).expect("feed from now");
    assert_eq!(
        cursor, now,
        "the follower's last cursor vs the end of the log"
    );

    // Resuming from the returned cursor gives only what is new.
    let (_, nothing) = feed(&mut raw, &[&cursor, "COUNT", "10"]).expect("feed");
    assert!(nothing.is_empty(), "{nothing:?}");
    assert_eq!(
        raw.cmd(&["SET", "feed:new", "1"]),
        Resp::Simple("OK".into())
    );
    let (_, new) = feed(&mut raw, &[&cursor, "COUNT", "10"]).expect("feed");
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(
        (
            new[0].change.as_str(),
            new[0].key.as_str(),
            new[0].data.as_str()
        ),
        ("create", "feed:new", "1")
    );
}

#[test]
fn a_blocked_feed_wakes_up_for_a_new_write_and_dollar_starts_from_now() {
    let server = Server::start("");
    let mut raw = server.raw();
    for i in 0..20 {
        assert_eq!(
            raw.cmd(&["SET", &format!("old:{i}"), "v"]),
            Resp::Simple("OK".into())
        );
    }
    // `$` skips what is already in the log.
    let started = Instant::now();
    let (cursor, entries) = feed(&mut raw, &["$", "COUNT", "10", "BLOCK", "300"]).expect("feed");
    assert!(entries.is_empty(), "{entries:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "BLOCK 300 waited {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "BLOCK 300 waited {:?}",
        started.elapsed()
    );

    let writer = {
        let mut raw = server.raw();
        std::thread::spawn(move || {
            // Not a wait for a condition: the write comes 400 ms into the BLOCK under test.
            sleep(Duration::from_millis(400));
            assert_eq!(raw.cmd(&["SET", "fresh", "1"]), Resp::Simple("OK".into()));
        })
    };
    let started = Instant::now();
    let (next, entries) = feed(&mut raw, &[&cursor, "BLOCK", "5000"]).expect("feed");
    let waited = started.elapsed();
    writer.join().expect("writer");
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(
        (entries[0].change.as_str(), entries[0].key.as_str()),
        ("create", "fresh")
    );
    assert_eq!(
        entries[0].partition,
        i64::from(server.partition_of(b"fresh"))
    );
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "woke up after {waited:?}"
    );
    assert!(
        next.contains(&format!(
            "{}:{}",
            entries[0].partition, entries[0].commit_id
        )),
        "{next}"
    );

    assert!(feed(&mut raw, &["not-a-cursor"]).is_err());
    assert!(feed(&mut raw, &["0", "BLOCK", "-1"]).is_err());
    assert!(feed(&mut raw, &["0", "COUNT", "0"]).is_err());
}

#[test]
fn a_cursor_behind_the_retained_log_gets_an_error_that_says_it_was_trimmed() {
    let server = Server::start("[storage]\nlog_retention_entries = 10\n");
    let mut raw = server.raw();
    let keys: Vec<String> = (0..100).map(|i| format!("{{trim}}:{i}")).collect();
    let partition = server.partition_of(keys[0].as_bytes());
    assert!(keys
        .iter()
        .all(|k| server.partition_of(k.as_bytes()) == partition));
    for key in &keys {
        assert_eq!(raw.cmd(&["SET", key, "v"]), Resp::Simple("OK".into()));
    }
    // Retention runs in the workers' housekeeping, every 100 ms.
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = raw.cmd(&["SHOAL.LOG", &partition.to_string(), "0", "COUNT", "1000"]);
        if log.array().len() <= 10 {
            break log;
        }
        assert!(
            Instant::now() < deadline,
            "the log of partition {partition} kept {} entries",
            log.array().len()
        );
        sleep(Duration::from_millis(50));
    };
    let ids: Vec<i64> = log.array().iter().map(|e| e.array()[0].int()).collect();
    assert_eq!(
        ids,
        (91..=100).collect::<Vec<i64>>(),
        "the last 10 entries are kept"
    );

    for cursor in [
        "0".to_string(),
        format!("{partition}:50"),
        format!("{partition}:89"),
    ] {
        let error =
            feed(&mut raw, &[&cursor]).expect_err("a cursor behind the retained log is refused");
        assert!(
            error.starts_with("ERR") && error.contains("trimmed"),
            "cursor {cursor}: {error}"
        );
    }
    // A cursor inside the retained log reads on.
    let (_, entries) =
        feed(&mut raw, &[&format!("{partition}:90")]).expect("feed from the oldest retained entry");
    assert_eq!(
        entries.iter().map(|e| e.commit_id).collect::<Vec<_>>(),
        (91..=100).collect::<Vec<i64>>()
    );
    let (_, entries) = feed(&mut raw, &["$"]).expect("feed from now");
    assert!(entries.is_empty());
}

//! Hashes, lists, sets and sorted sets across real hosts: `shoal serve` hosts on
//! 127.0.T.x (see `common::cluster`) with `cluster.replicas = 3`, driven through the
//! `redis` crate.
//!
//! A typed key is a metadata record plus elements in tables of their own, and every
//! element change is its own log entry; replication, failover, resync and the copies
//! made for a new host replay those entries without knowing their types. These tests
//! check, through real clients, that:
//!
//! - typed keys written through one host (HSET, HINCRBY, HDEL, RPUSH, LPUSH, LINSERT,
//!   SADD, SREM, ZADD, ZINCRBY, DEL, EXPIRE) read the same through every host (HGETALL,
//!   LRANGE, SMEMBERS, ZRANGE WITHSCORES, TYPE, TTL), and MULTI/EXEC (and WATCH) on
//!   one hash tag works through a host that does not own it;
//! - after a SIGKILL of the primary of those keys' partitions, while a client pushes
//!   numbered elements onto lists and sets, every acknowledged element is still there,
//!   once, with the acknowledged ones of a list in the order they were pushed; writes
//!   to the same keys go on through the survivors; and the killed host, restarted and
//!   caught up, holds copies identical to the others' and serves the same content;
//! - a fourth host that joins while a client pushes gets its share of copies and
//!   primaries, its copies are identical to the others', and every key reads the same
//!   through it.
//! - MGETs through two hosts of keys led by all three never see part of an MSET or
//!   EXEC of those keys (two-phase commits across the hosts) made through the others.
//!
//! Each test prints what it measured.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{sleep, JoinHandle};
use std::time::{Duration, Instant};

use common::cluster::Cluster;
use common::{connect_until, error_text, key_partition, Answer, Resp};
use redis::{ConnectionLike, Value};

/// Partitions of every test cluster (`storage.partitions`).
const PARTITIONS: u32 = 16;
/// Three copies of 16 partitions, their digests compared by the metadata leader every 4 s.
const REPLICATED: &str =
    "[cluster]\nreplicas = 3\ndigest_check_secs = 4\n[storage]\npartitions = 16\n";
/// How long the copies may take to be placed and caught up (at the start, after a
/// restart, after a join).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a failover may take before reads and writes through the survivors resume.
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);
/// Bounds of a background writer: operations (each one RPUSH and one SADD) and time.
const WRITER_MAX_OPS: u64 = 20_000;
const WRITER_MAX_TIME: Duration = Duration::from_secs(90);
/// The TTL given to the expiring key of a workload.
const TEMP_TTL_SECS: i64 = 1000;

// ---------------------------------------------------------------- typed values

/// What a typed key holds, as a client reads it.
#[derive(Debug, Clone, PartialEq)]
enum Typed {
    Missing,
    Hash(BTreeMap<String, String>),
    List(Vec<String>),
    Set(BTreeSet<String>),
    /// Members in ZRANGE order (score, then member), with their scores.
    Zset(Vec<(String, f64)>),
}

fn hash(pairs: &[(&str, &str)]) -> Typed {
    Typed::Hash(
        pairs
            .iter()
            .map(|(f, v)| (f.to_string(), v.to_string()))
            .collect(),
    )
}

fn list(items: &[&str]) -> Typed {
    Typed::List(items.iter().map(|s| s.to_string()).collect())
}

fn set(items: &[&str]) -> Typed {
    Typed::Set(items.iter().map(|s| s.to_string()).collect())
}

fn zset(pairs: &[(&str, f64)]) -> Typed {
    let mut members: Vec<(String, f64)> = pairs.iter().map(|(m, s)| (m.to_string(), *s)).collect();
    members.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    Typed::Zset(members)
}

/// What a key must read as: its value, and whether it has a TTL.
#[derive(Debug, Clone, PartialEq)]
struct Expected {
    value: Typed,
    expiring: bool,
}

/// Key → what it must read as.
type Model = BTreeMap<String, Expected>;

/// Key → what it read as, with its TTL.
type Found = BTreeMap<String, (Typed, i64)>;

fn put(model: &mut Model, key: &str, value: Typed) {
    model.insert(
        key.to_string(),
        Expected {
            value,
            expiring: false,
        },
    );
}

/// Waits until no partition is led by `victim`, as `asked` sees it.
fn wait_survivors_lead(cluster: &Cluster, asked: usize, victim: usize) {
    cluster.wait_for(
        "the survivors to lead every partition",
        RESUME_TIMEOUT,
        |c| match primaries(c, asked)?
            .iter()
            .filter(|&&h| h == victim)
            .count()
        {
            0 => Ok(()),
            n => Err(format!("host {victim} still leads {n} partitions")),
        },
    );
}

// ---------------------------------------------------------------- redis crate plumbing

fn command(args: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd
}

/// One command; an error reply or an I/O error is an `Err` with its text.
fn run(con: &mut redis::Connection, args: &[&str]) -> Result<Value, String> {
    match con.req_command(&command(args)) {
        Ok(reply @ Value::ServerError(_)) => Err(format!("{args:?}: {}", error_text(&reply))),
        Ok(reply) => Ok(reply),
        Err(error) => Err(format!("{args:?}: I/O: {error}")),
    }
}

/// One command that must answer `want`.
fn expect(con: &mut redis::Connection, args: &[&str], want: Value) {
    let got = run(con, args);
    assert_eq!(got, Ok(want.clone()), "{args:?}");
}

fn expect_int(con: &mut redis::Connection, args: &[&str], want: i64) {
    expect(con, args, Value::Int(want));
}

/// A command answering a score (ZINCRBY: a bulk string in RESP2, a double in RESP3).
fn expect_score(con: &mut redis::Connection, args: &[&str], want: f64) {
    let score = match run(con, args) {
        Ok(Value::BulkString(bytes)) => String::from_utf8_lossy(&bytes).parse::<f64>().ok(),
        Ok(Value::Double(value)) => Some(value),
        other => panic!("{args:?}: {other:?}"),
    };
    assert_eq!(score, Some(want), "{args:?}");
}

/// The strings of a reply: an array of bulk strings, or a map (flattened).
fn texts(value: &Value) -> Result<Vec<String>, String> {
    let one = |item: &Value| match item {
        Value::BulkString(bytes) => Ok(String::from_utf8_lossy(bytes).into_owned()),
        Value::SimpleString(text) => Ok(text.clone()),
        Value::Double(value) => Ok(value.to_string()),
        Value::Int(n) => Ok(n.to_string()),
        other => Err(format!("not a string: {other:?}")),
    };
    match value {
        Value::Array(items) | Value::Set(items) => items.iter().map(one).collect(),
        Value::Map(pairs) => pairs.iter().flat_map(|(k, v)| [one(k), one(v)]).collect(),
        other => Err(format!("not an array: {other:?}")),
    }
}

/// A connection to host `host` with bounded timeouts.
fn try_connect(cluster: &Cluster, host: usize) -> Result<redis::Connection, String> {
    let client = cluster.host(host).server.client();
    connect_until(&client, Instant::now() + Duration::from_secs(5))
        .ok_or_else(|| format!("no connection to host {host} within 5 s"))
}

fn connect(cluster: &Cluster, host: usize) -> redis::Connection {
    try_connect(cluster, host).unwrap_or_else(|e| panic!("{e}"))
}

/// What `key` holds, read with TYPE and the read of its type; an error (TRYAGAIN while
/// a partition fails over, a lost connection) is an `Err`.
fn read_typed(con: &mut redis::Connection, key: &str) -> Result<Typed, String> {
    let kind = match run(con, &["TYPE", key])? {
        Value::SimpleString(kind) => kind,
        other => return Err(format!("TYPE {key}: {other:?}")),
    };
    match kind.as_str() {
        "none" => Ok(Typed::Missing),
        "hash" => {
            let items = texts(&run(con, &["HGETALL", key])?)?;
            if items.len() % 2 != 0 {
                return Err(format!("HGETALL {key}: an odd count: {items:?}"));
            }
            Ok(Typed::Hash(
                items
                    .chunks(2)
                    .map(|pair| (pair[0].clone(), pair[1].clone()))
                    .collect(),
            ))
        }
        "list" => Ok(Typed::List(texts(&run(con, &["LRANGE", key, "0", "-1"])?)?)),
        "set" => Ok(Typed::Set(
            texts(&run(con, &["SMEMBERS", key])?)?.into_iter().collect(),
        )),
        "zset" => {
            let items = texts(&run(con, &["ZRANGE", key, "0", "-1", "WITHSCORES"])?)?;
            if items.len() % 2 != 0 {
                return Err(format!("ZRANGE {key} WITHSCORES: an odd count: {items:?}"));
            }
            items
                .chunks(2)
                .map(|pair| match pair[1].parse::<f64>() {
                    Ok(score) => Ok((pair[0].clone(), score)),
                    Err(_) => Err(format!("ZRANGE {key}: score {:?}", pair[1])),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Typed::Zset)
        }
        other => Err(format!("TYPE {key} answered {other:?}")),
    }
}

/// Every key of `keys` read through host `host`, with its TTL.
fn read_all<'a>(
    cluster: &Cluster,
    host: usize,
    keys: impl IntoIterator<Item = &'a String>,
) -> Result<Found, String> {
    let mut con = try_connect(cluster, host)?;
    let mut found = BTreeMap::new();
    for key in keys {
        let value = read_typed(&mut con, key).map_err(|e| format!("host {host}: {e}"))?;
        let ttl = match run(&mut con, &["TTL", key]).map_err(|e| format!("host {host}: {e}"))? {
            Value::Int(ttl) => ttl,
            other => return Err(format!("host {host}: TTL {key}: {other:?}")),
        };
        found.insert(key.clone(), (value, ttl));
    }
    Ok(found)
}

/// Reads every key of `model` through each of `hosts` (asked again while a host answers
/// errors) and asserts that each reads as the model says, TTL included.
fn assert_reads_as(cluster: &Cluster, hosts: &[usize], model: &Model, when: &str) {
    for &host in hosts {
        let (found, _) = cluster.wait_for(
            &format!("every typed key read through host {host} {when}"),
            RESUME_TIMEOUT,
            |c| read_all(c, host, model.keys()),
        );
        for (key, expected) in model {
            let (value, ttl) = &found[key];
            assert_eq!(value, &expected.value, "{key} through host {host} {when}");
            let ttl_ok = match (&expected.value, expected.expiring) {
                (Typed::Missing, _) => *ttl == -2,
                (_, false) => *ttl == -1,
                (_, true) => (1..=TEMP_TTL_SECS).contains(ttl),
            };
            assert!(
                ttl_ok,
                "TTL {key} through host {host} {when}: {ttl} (expiring: {})",
                expected.expiring
            );
        }
    }
    println!(
        "{} typed keys read alike through hosts {hosts:?} {when}",
        model.len()
    );
}

// ---------------------------------------------------------------- the workload

/// Writes hashes, a list, a set, a sorted set, a deleted set and an expiring hash, all
/// under the hash tag `tag` (one partition), through `con`; adds what they must read as
/// to `model`. Every reply is checked.
fn write_workload(con: &mut redis::Connection, tag: &str, model: &mut Model) {
    let key = |what: &str| format!("{what}:{{{tag}}}");
    let (h, l, s, z, gone, temp) = (
        key("hash"),
        key("list"),
        key("set"),
        key("zset"),
        key("gone"),
        key("temp"),
    );
    expect_int(
        con,
        &[
            "HSET", &h, "name", "shoal", "kind", "database", "lang", "rust", "stars", "0",
            "counter", "10",
        ],
        5,
    );
    expect_int(con, &["HSET", &h, "lang", "Rust", "extra", "1"], 1);
    expect_int(con, &["HINCRBY", &h, "counter", "32"], 42);
    expect_int(con, &["HDEL", &h, "extra", "absent"], 1);
    put(
        model,
        &h,
        hash(&[
            ("name", "shoal"),
            ("kind", "database"),
            ("lang", "Rust"),
            ("stars", "0"),
            ("counter", "42"),
        ]),
    );

    expect_int(con, &["RPUSH", &l, "a", "b", "c"], 3);
    expect_int(con, &["LPUSH", &l, "z", "y"], 5);
    expect_int(con, &["LINSERT", &l, "BEFORE", "c", "x"], 6);
    expect_int(con, &["LINSERT", &l, "AFTER", "absent", "w"], -1);
    put(model, &l, list(&["y", "z", "a", "b", "x", "c"]));

    expect_int(
        con,
        &["SADD", &s, "m1", "m2", "m3", "m4", "m5", "m6", "m1"],
        6,
    );
    expect_int(con, &["SREM", &s, "m2", "m4", "m9"], 2);
    put(model, &s, set(&["m1", "m3", "m5", "m6"]));

    expect_int(
        con,
        &[
            "ZADD", &z, "-2.5", "neg", "0", "zero", "1", "one", "1", "uno", "3.75", "frac",
            "1000000", "big",
        ],
        6,
    );
    expect_score(con, &["ZINCRBY", &z, "2", "zero"], 2.0);
    expect_score(con, &["ZINCRBY", &z, "4", "neg"], 1.5);
    put(
        model,
        &z,
        zset(&[
            ("one", 1.0),
            ("uno", 1.0),
            ("neg", 1.5),
            ("zero", 2.0),
            ("frac", 3.75),
            ("big", 1_000_000.0),
        ]),
    );

    expect_int(con, &["SADD", &gone, "a", "b", "c"], 3);
    expect_int(con, &["DEL", &gone], 1);
    put(model, &gone, Typed::Missing);

    expect_int(con, &["HSET", &temp, "f", "v", "g", "w"], 2);
    expect_int(con, &["EXPIRE", &temp, &TEMP_TTL_SECS.to_string()], 1);
    model.insert(
        temp,
        Expected {
            value: hash(&[("f", "v"), ("g", "w")]),
            expiring: true,
        },
    );
}

/// More writes to the keys of [`write_workload`] under `tag`, through `con`, once every
/// partition serves writes: each changes a key as a client would go on doing.
fn write_more(con: &mut redis::Connection, tag: &str, model: &mut Model) {
    let key = |what: &str| format!("{what}:{{{tag}}}");
    let (h, l, s, z) = (key("hash"), key("list"), key("set"), key("zset"));
    expect_int(con, &["HSET", &h, "after", "yes"], 1);
    expect_int(con, &["HINCRBY", &h, "counter", "-2"], 40);
    expect_int(con, &["RPUSH", &l, "after"], 7);
    expect_int(con, &["LINSERT", &l, "AFTER", "y", "y2"], 8);
    expect_int(con, &["SADD", &s, "after", "m1"], 1);
    expect_int(con, &["SREM", &s, "m3"], 1);
    expect_int(con, &["ZADD", &z, "-7", "after"], 1);
    expect_score(con, &["ZINCRBY", &z, "0.25", "frac"], 4.0);
    let mut update = |k: &str, change: &dyn Fn(&mut Typed)| {
        let expected = model.get_mut(k).expect("a key of the workload");
        change(&mut expected.value);
    };
    update(&h, &|v| {
        if let Typed::Hash(fields) = v {
            fields.insert("after".into(), "yes".into());
            fields.insert("counter".into(), "40".into());
        }
    });
    update(&l, &|v| {
        *v = list(&["y", "y2", "z", "a", "b", "x", "c", "after"])
    });
    update(&s, &|v| *v = set(&["m1", "m5", "m6", "after"]));
    update(&z, &|v| {
        *v = zset(&[
            ("after", -7.0),
            ("one", 1.0),
            ("uno", 1.0),
            ("neg", 1.5),
            ("zero", 2.0),
            ("frac", 4.0),
            ("big", 1_000_000.0),
        ])
    });
}

/// MULTI/EXEC over four typed keys of hash tag `tag`, through `con` (a host that does
/// not own them), then a WATCHed transaction that another host's write (`other`) makes
/// fail. Adds what the keys must read as to `model`.
fn transactions(
    con: &mut redis::Connection,
    other: &mut redis::Connection,
    tag: &str,
    model: &mut Model,
) {
    let key = |what: &str| format!("{what}:{{{tag}}}");
    let (h, l, s, z) = (key("txh"), key("txl"), key("txs"), key("txz"));
    let queued = || Value::SimpleString("QUEUED".into());
    expect(con, &["MULTI"], Value::Okay);
    for args in [
        &["HSET", &h, "f1", "v1", "f2", "v2"][..],
        &["HINCRBY", &h, "n", "5"],
        &["RPUSH", &l, "a", "b", "c"],
        &["LPUSH", &l, "z"],
        &["LINSERT", &l, "AFTER", "a", "a2"],
        &["SADD", &s, "x", "y", "w"],
        &["SREM", &s, "x"],
        &["ZADD", &z, "1", "a", "2", "b"],
        &["ZINCRBY", &z, "5", "a"],
    ] {
        expect(con, args, queued());
    }
    let replies = match run(con, &["EXEC"]) {
        Ok(Value::Array(replies)) => replies,
        other => panic!("EXEC through a host that does not own {tag}: {other:?}"),
    };
    let ints: Vec<Option<i64>> = replies
        .iter()
        .map(|r| match r {
            Value::Int(n) => Some(*n),
            _ => None,
        })
        .collect();
    assert_eq!(
        ints[..8],
        [
            Some(2),
            Some(5),
            Some(3),
            Some(4),
            Some(5),
            Some(3),
            Some(1),
            Some(2)
        ],
        "EXEC: {replies:?}"
    );
    assert!(
        matches!(&replies[8], Value::BulkString(b) if b.as_slice() == b"6")
            || replies[8] == Value::Double(6.0),
        "EXEC's ZINCRBY: {replies:?}"
    );
    // WATCH through this host; another host changes the key; EXEC runs nothing.
    expect(con, &["WATCH", &h], Value::Okay);
    expect_int(other, &["HSET", &h, "f3", "v3"], 1);
    expect(con, &["MULTI"], Value::Okay);
    expect(con, &["HSET", &h, "f4", "v4"], queued());
    expect(con, &["RPUSH", &l, "never"], queued());
    let aborted = run(con, &["EXEC"]);
    assert!(
        matches!(aborted, Ok(Value::Nil)),
        "EXEC after a watched key changed: {aborted:?}"
    );
    put(
        model,
        &h,
        hash(&[("f1", "v1"), ("f2", "v2"), ("n", "5"), ("f3", "v3")]),
    );
    put(model, &l, list(&["z", "a", "a2", "b", "c"]));
    put(model, &s, set(&["y", "w"]));
    put(model, &z, zset(&[("b", 2.0), ("a", 6.0)]));
}

// ---------------------------------------------------------------- the background writer

/// What a writer did to one key: the numbers sent (each once), acknowledged, and
/// refused with an error that says nothing was written.
#[derive(Debug, Default)]
struct Outcomes {
    sent: BTreeSet<u64>,
    acknowledged: BTreeSet<u64>,
    refused: BTreeSet<u64>,
}

/// What one background writer did.
#[derive(Debug, Default)]
struct WriterLog {
    /// List key → its RPUSHes.
    pushes: BTreeMap<String, Outcomes>,
    /// Set key → its SADDs.
    adds: BTreeMap<String, Outcomes>,
    /// Error replies and I/O errors, by their first eight words.
    errors: BTreeMap<String, usize>,
    /// The full text of the first few errors.
    error_samples: Vec<String>,
    /// Replies that contradict what was sent (a length or count no history explains).
    anomalies: Vec<String>,
    /// When each write was acknowledged.
    acknowledged_at: Vec<Instant>,
}

impl WriterLog {
    fn acknowledged(&self) -> usize {
        self.pushes
            .values()
            .chain(self.adds.values())
            .map(|o| o.acknowledged.len())
            .sum()
    }

    fn sent(&self) -> usize {
        self.pushes
            .values()
            .chain(self.adds.values())
            .map(|o| o.sent.len())
            .sum()
    }

    fn keys(&self) -> Vec<String> {
        self.pushes
            .keys()
            .chain(self.adds.keys())
            .cloned()
            .collect()
    }
}

/// A client that, for n = 1, 2, ... through host `host`, RPUSHes `n` onto
/// `lists[n % len]` and SADDs `m<n>` to `sets[n % len]`, each once, until `stop`, or
/// [`WRITER_MAX_OPS`] or [`WRITER_MAX_TIME`]. It reconnects after a lost connection and
/// never sends a number again.
fn spawn_writer(
    cluster: &Cluster,
    host: usize,
    lists: Vec<String>,
    sets: Vec<String>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<WriterLog> {
    assert_eq!(lists.len(), sets.len());
    let client = cluster.host(host).server.client();
    std::thread::spawn(move || {
        let mut log = WriterLog::default();
        let deadline = Instant::now() + WRITER_MAX_TIME;
        let mut connection = None;
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && n < WRITER_MAX_OPS {
            n += 1;
            let index = n as usize % lists.len();
            let member = format!("m{n}");
            let number = n.to_string();
            for (list_op, key, args) in [
                (
                    true,
                    &lists[index],
                    ["RPUSH", lists[index].as_str(), &number],
                ),
                (false, &sets[index], ["SADD", sets[index].as_str(), &member]),
            ] {
                if connection.is_none() {
                    connection = connect_until(&client, Instant::now() + Duration::from_secs(5));
                }
                let Some(con) = connection.as_mut() else {
                    continue;
                };
                let outcomes = match list_op {
                    true => log.pushes.entry(key.clone()).or_default(),
                    false => log.adds.entry(key.clone()).or_default(),
                };
                outcomes.sent.insert(n);
                let answer = Answer::of(con.req_command(&command(&args)));
                if answer.connection_lost() {
                    connection = None;
                }
                match answer {
                    Answer::Reply(Value::Int(reply)) => {
                        outcomes.acknowledged.insert(n);
                        log.acknowledged_at.push(Instant::now());
                        // A list is never longer than what was pushed onto it, nor shorter
                        // than what was acknowledged; a member sent once is always new.
                        let (sent, acknowledged) = (
                            outcomes.sent.len() as i64,
                            outcomes.acknowledged.len() as i64,
                        );
                        let contradicts = match list_op {
                            true => reply > sent || reply < acknowledged,
                            false => reply != 1,
                        };
                        if contradicts {
                            log.anomalies.push(format!(
                                "{args:?} answered {reply} after {sent} sent, {acknowledged} acknowledged"
                            ));
                        }
                    }
                    Answer::Reply(other) => {
                        log.anomalies.push(format!("{args:?} answered {other:?}"));
                    }
                    Answer::Failed(text) | Answer::Unknown(text) => {
                        let words: Vec<&str> = text.split_whitespace().take(8).collect();
                        *log.errors.entry(words.join(" ")).or_default() += 1;
                        if log.error_samples.len() < 3 {
                            log.error_samples.push(format!("{args:?}: {text}"));
                        }
                        if !text.contains("may or may not") && !text.starts_with("I/O") {
                            outcomes.refused.insert(n);
                        }
                        sleep(Duration::from_millis(20));
                    }
                }
            }
        }
        log
    })
}

/// What contradicts the writer's log in what the keys hold: an acknowledged element
/// missing, an element twice, an element never sent, acknowledged elements of a list out
/// of their order. Also reports the refused writes found (answered as not written).
fn writer_violations(found: &Found, log: &WriterLog) -> Vec<String> {
    let mut violations = Vec::new();
    let mut refused_but_present = Vec::new();
    for (key, outcomes) in &log.pushes {
        let items = match found.get(key).map(|(value, _)| value) {
            Some(Typed::List(items)) => items.clone(),
            Some(Typed::Missing) | None => Vec::new(),
            Some(other) => {
                violations.push(format!("{key} is not a list: {other:?}"));
                continue;
            }
        };
        let mut seen = BTreeSet::new();
        let mut acknowledged_order = Vec::new();
        for item in &items {
            let Ok(n) = item.parse::<u64>() else {
                violations.push(format!("{key} holds {item:?}, never pushed"));
                continue;
            };
            if !outcomes.sent.contains(&n) {
                violations.push(format!("{key} holds {n}, never pushed onto it"));
            }
            if !seen.insert(n) {
                violations.push(format!("{key} holds {n} twice, pushed once"));
            }
            if outcomes.acknowledged.contains(&n) {
                acknowledged_order.push(n);
            }
            if outcomes.refused.contains(&n) {
                refused_but_present.push(format!("{key}: {n}"));
            }
        }
        let lost: Vec<&u64> = outcomes.acknowledged.difference(&seen).collect();
        if !lost.is_empty() {
            violations.push(format!(
                "{key} lost acknowledged pushes {lost:?} ({} elements held)",
                items.len()
            ));
        }
        if acknowledged_order.windows(2).any(|w| w[0] > w[1]) {
            violations.push(format!(
                "{key}: acknowledged pushes out of order: {acknowledged_order:?}"
            ));
        }
    }
    for (key, outcomes) in &log.adds {
        let members = match found.get(key).map(|(value, _)| value) {
            Some(Typed::Set(members)) => members.clone(),
            Some(Typed::Missing) | None => BTreeSet::new(),
            Some(other) => {
                violations.push(format!("{key} is not a set: {other:?}"));
                continue;
            }
        };
        let mut held = BTreeSet::new();
        for member in &members {
            match member.strip_prefix('m').and_then(|n| n.parse::<u64>().ok()) {
                Some(n) if outcomes.sent.contains(&n) => {
                    held.insert(n);
                    if outcomes.refused.contains(&n) {
                        refused_but_present.push(format!("{key}: {member}"));
                    }
                }
                _ => violations.push(format!("{key} holds {member:?}, never added to it")),
            }
        }
        let lost: Vec<&u64> = outcomes.acknowledged.difference(&held).collect();
        if !lost.is_empty() {
            violations.push(format!(
                "{key} lost acknowledged members {lost:?} ({} held)",
                members.len()
            ));
        }
    }
    if !refused_but_present.is_empty() {
        println!("writes refused as not written, yet present: {refused_but_present:?}");
    }
    violations
}

/// Reads the writer's keys through each of `hosts` and asserts that they agree with its
/// log and with one another.
fn assert_writer_kept(cluster: &Cluster, hosts: &[usize], log: &WriterLog, when: &str) {
    let keys = log.keys();
    let mut first: Option<(usize, Found)> = None;
    for &host in hosts {
        let (found, _) = cluster.wait_for(
            &format!("the writer's keys read through host {host} {when}"),
            RESUME_TIMEOUT,
            |c| read_all(c, host, &keys),
        );
        let violations = writer_violations(&found, log);
        assert!(
            violations.is_empty(),
            "through host {host} {when}: {violations:#?}"
        );
        match &first {
            None => first = Some((host, found)),
            Some((other, earlier)) => assert!(
                *earlier == found,
                "the writer's keys read differently through hosts {other} and {host} {when}"
            ),
        }
    }
    let held: usize = first
        .map(|(_, found)| {
            found
                .values()
                .map(|(value, _)| match value {
                    Typed::List(items) => items.len(),
                    Typed::Set(members) => members.len(),
                    _ => 0,
                })
                .sum()
        })
        .unwrap_or(0);
    println!(
        "the writer's {} acknowledged of {} sent elements all held, once, through hosts \
         {hosts:?} {when} ({held} held in all)",
        log.acknowledged(),
        log.sent()
    );
}

// ---------------------------------------------------------------- the cluster

/// Ok once every live host reports no under-replicated partition, and the primaries are
/// spread: the live hosts (of equal capacity) lead numbers of partitions at most one
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

/// The host number of each partition's primary, as host `through` sees it.
fn primaries(cluster: &Cluster, through: usize) -> Result<Vec<usize>, String> {
    let lines = cluster.try_nodes(through)?;
    (0..PARTITIONS)
        .map(|partition| {
            let slot = (partition * 16384 / PARTITIONS) as u16;
            let line = lines
                .iter()
                .find(|l| l.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
                .ok_or_else(|| format!("host {through}: no primary for slot {slot}"))?;
            cluster
                .number_of(line.host_id)
                .ok_or_else(|| format!("no host has id {}", line.host_id))
        })
        .collect()
}

/// The first tag `<prefix><i>` whose keys fall in `partition`.
fn tag_in(partition: u32, prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|tag| key_partition(tag.as_bytes(), PARTITIONS) == partition)
        .expect("a tag in every partition")
}

/// The digests of every copy of every partition: Ok once each partition has `copies`
/// copies on the live hosts and they are all alike (last commit id, keys, checksum of
/// records and live elements). Answers how many copies each live host holds.
fn copies_alike(cluster: &Cluster, copies: usize) -> Result<BTreeMap<usize, usize>, String> {
    let mut held: BTreeMap<usize, usize> = cluster.live().into_iter().map(|h| (h, 0)).collect();
    for partition in 0..PARTITIONS {
        let mut digests = Vec::new();
        for host in cluster.live() {
            if let Ok(Resp::Array(parts)) =
                cluster.query(host, &["SHOAL.DIGEST", &partition.to_string()])
            {
                digests.push((host, parts));
                *held.entry(host).or_default() += 1;
            }
        }
        if digests.len() != copies {
            return Err(format!(
                "partition {partition}: {} copies: {digests:?}",
                digests.len()
            ));
        }
        if digests.windows(2).any(|pair| pair[0].1 != pair[1].1) {
            return Err(format!("partition {partition}: copies differ: {digests:?}"));
        }
    }
    Ok(held)
}

/// The digest divergences the metadata leaders among the live hosts reported.
fn divergences(cluster: &Cluster) -> u64 {
    cluster
        .live()
        .into_iter()
        .map(|host| {
            cluster
                .info_section(host, "replication")
                .get("shoal_digest_divergences")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("host {host}: no shoal_digest_divergences"))
        })
        .sum()
}

/// Starts a 3-host replicated cluster, waits until it is whole and settled, and reads
/// every host's id.
fn start_settled_cluster() -> Cluster {
    let cluster = Cluster::start(3, REPLICATED);
    cluster.wait_voters(3, Duration::from_secs(60));
    let (_, took) = cluster.wait_for(
        "every partition on three hosts, in sync, the primaries spread",
        SETTLE_TIMEOUT,
        settled,
    );
    println!("every partition had its three copies in sync after {took:?}");
    for host in 1..=3 {
        cluster.host_id(host);
    }
    cluster
}

// ---------------------------------------------------------------- the tests

#[test]
fn typed_keys_read_alike_everywhere_and_survive_the_kill_of_their_primary() {
    let started = Instant::now();
    let mut cluster = start_settled_cluster();
    // The victim leads the keys' partitions; it is not the metadata leader, so the
    // failover is the partitions' own. `writer` writes, `reader` is the third host.
    let (leader_id, _) = cluster.wait_leader(RESUME_TIMEOUT);
    let leader = cluster.number_of(leader_id).expect("the leader is a host");
    let victim = if leader == 2 { 3 } else { 2 };
    let survivors: Vec<usize> = (1..=3).filter(|&h| h != victim).collect();
    let (writer, reader) = (survivors[0], survivors[1]);
    let led = primaries(&cluster, writer).expect("CLUSTER NODES");
    let victim_partitions: Vec<u32> = (0..PARTITIONS)
        .filter(|&p| led[p as usize] == victim)
        .collect();
    println!(
        "host {victim} leads partitions {victim_partitions:?}; host {leader} leads the \
         metadata group; writes go through host {writer}"
    );
    assert!(victim_partitions.len() >= 3, "{led:?}");
    let workload_tags: Vec<String> = victim_partitions[..2]
        .iter()
        .map(|&p| tag_in(p, "w"))
        .collect();
    let tx_tag = tag_in(victim_partitions[2], "tx");

    // 1. Written through one host, read alike through every host.
    let mut model = Model::new();
    let mut con = connect(&cluster, writer);
    for tag in &workload_tags {
        write_workload(&mut con, tag, &mut model);
    }
    let mut other = connect(&cluster, reader);
    transactions(&mut con, &mut other, &tx_tag, &mut model);
    assert_reads_as(&cluster, &[1, 2, 3], &model, "with every host up");
    // The databases are the cluster's, not one host's: SWAPDB is refused, as in Redis Cluster.
    let swap = common::call_str(&mut con, &["SWAPDB", "0", "1"]);
    assert_eq!(
        error_text(&swap),
        "ERR SWAPDB is not allowed in cluster mode"
    );

    // 2. A client pushes numbered elements onto lists and sets of the victim's
    // partitions through `writer` while the victim is killed.
    let lists: Vec<String> = workload_tags
        .iter()
        .chain([&tx_tag])
        .map(|t| format!("pushed:{{{t}}}"))
        .collect();
    let sets: Vec<String> = workload_tags
        .iter()
        .chain([&tx_tag])
        .map(|t| format!("added:{{{t}}}"))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let background = spawn_writer(&cluster, writer, lists, sets, Arc::clone(&stop));
    sleep(Duration::from_secs(1));
    cluster.kill(victim);
    let killed = Instant::now();
    // Writes to the keys' partitions resume through the other survivor (HSET of one
    // field with one value: safe to repeat after an unknown outcome).
    let tags: Vec<&String> = workload_tags.iter().chain([&tx_tag]).collect();
    let write_resumed = |c: &Cluster| {
        let mut con = try_connect(c, reader)?;
        for tag in &tags {
            run(&mut con, &["HSET", &format!("resumed:{{{tag}}}"), "f", "1"])?;
        }
        Ok(())
    };
    let (_, resumed) = cluster.wait_for(
        "a write to each of the keys' partitions through a survivor",
        RESUME_TIMEOUT,
        write_resumed,
    );
    println!("writes to the victim's partitions resumed {resumed:?} after the kill");
    for tag in workload_tags.iter().chain([&tx_tag]) {
        put(
            &mut model,
            &format!("resumed:{{{tag}}}"),
            hash(&[("f", "1")]),
        );
    }
    // Failover rounds of the victim's other partitions may still change the primary of
    // these keys' partitions, and a write caught by such a change ends "may or may not
    // have been applied", which the writes below cannot repeat: they wait until the
    // survivors lead every partition, and one more idempotent write to each goes through.
    wait_survivors_lead(&cluster, writer, victim);
    cluster.wait_for(
        "an idempotent write to each of the keys' partitions once the survivors lead",
        RESUME_TIMEOUT,
        write_resumed,
    );
    // The same keys take more writes through the other survivor.
    let mut con = connect(&cluster, reader);
    for tag in &workload_tags {
        write_more(&mut con, tag, &mut model);
    }
    sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let log = background.join().expect("the writer");
    println!(
        "the writer: {} of {} writes acknowledged; errors {:?} (first: {:?})",
        log.acknowledged(),
        log.sent(),
        log.errors,
        log.error_samples
    );
    assert!(log.anomalies.is_empty(), "{:#?}", log.anomalies);
    let after_failover = log
        .acknowledged_at
        .iter()
        .filter(|&&at| at > killed + resumed)
        .count();
    assert!(
        after_failover > 0,
        "no write of the writer acknowledged after the failover"
    );
    assert!(log.acknowledged() > 50, "too few writes acknowledged");
    // The survivors lead every partition, and hold every acknowledged write.
    wait_survivors_lead(&cluster, writer, victim);
    assert_reads_as(&cluster, &survivors, &model, "after the failover");
    assert_writer_kept(&cluster, &survivors, &log, "after the failover");

    // The victim restarts and catches up while another client pushes onto other lists
    // and sets of its old partitions; then it serves the same content, and its copies
    // are identical to the others'.
    let stop = Arc::new(AtomicBool::new(false));
    let lists = workload_tags
        .iter()
        .map(|t| format!("pushed-during-restart:{{{t}}}"))
        .collect();
    let sets = workload_tags
        .iter()
        .map(|t| format!("added-during-restart:{{{t}}}"))
        .collect();
    let background = spawn_writer(&cluster, reader, lists, sets, Arc::clone(&stop));
    sleep(Duration::from_millis(500));
    cluster.host_mut(victim).server.restart();
    let back = Instant::now();
    cluster.wait_for(
        "every partition on three hosts, in sync, the primaries spread",
        SETTLE_TIMEOUT,
        settled,
    );
    sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let during_restart = background.join().expect("the writer");
    println!(
        "the writer during the restart: {} of {} writes acknowledged; errors {:?} (first: {:?})",
        during_restart.acknowledged(),
        during_restart.sent(),
        during_restart.errors,
        during_restart.error_samples
    );
    assert!(
        during_restart.anomalies.is_empty(),
        "{:#?}",
        during_restart.anomalies
    );
    assert!(
        during_restart.acknowledged() > 20,
        "too few writes acknowledged"
    );
    let (_, alike) = cluster.wait_for(
        "three alike copies of every partition",
        SETTLE_TIMEOUT,
        |c| copies_alike(c, 3),
    );
    println!(
        "host {victim} back in sync, its copies alike, {:?} after its restart",
        back.elapsed().max(alike)
    );
    let led_again: Vec<u32> = primaries(&cluster, victim)
        .expect("CLUSTER NODES")
        .iter()
        .enumerate()
        .filter(|&(_, &h)| h == victim)
        .map(|(p, _)| p as u32)
        .collect();
    println!("host {victim} leads partitions {led_again:?} again");
    assert_reads_as(
        &cluster,
        &[victim, writer, reader],
        &model,
        "after the restart",
    );
    assert_writer_kept(
        &cluster,
        &[victim, writer, reader],
        &log,
        "after the restart",
    );
    assert_writer_kept(
        &cluster,
        &[victim, writer, reader],
        &during_restart,
        "after the restart, of the writes during it",
    );
    assert_eq!(
        divergences(&cluster),
        0,
        "the digest checks found copies that differ"
    );
    println!("total {:?}", started.elapsed());
}

#[test]
fn typed_keys_read_alike_through_a_host_that_joined_and_took_its_share() {
    let started = Instant::now();
    let mut cluster = start_settled_cluster();
    // A workload in every partition, written through host 1.
    let mut model = Model::new();
    let mut con = connect(&cluster, 1);
    let tags: Vec<String> = (0..PARTITIONS).map(|p| tag_in(p, "j")).collect();
    for tag in &tags {
        write_workload(&mut con, tag, &mut model);
    }
    println!(
        "{} typed keys written in {:?}",
        model.len(),
        started.elapsed()
    );
    // A client pushes onto lists and sets of four partitions through host 2 while host 4
    // joins and copies and primaries move to it.
    let pushed: Vec<&String> = tags.iter().step_by(4).collect();
    let lists = pushed.iter().map(|t| format!("pushed:{{{t}}}")).collect();
    let sets = pushed.iter().map(|t| format!("added:{{{t}}}")).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let background = spawn_writer(&cluster, 2, lists, sets, Arc::clone(&stop));
    sleep(Duration::from_millis(500));
    let joined = cluster.add_host(1, "");
    let join_started = Instant::now();
    cluster.wait_agreed_on(4, Duration::from_secs(30));
    cluster.host_id(joined);
    let (held, took) = cluster.wait_for(
        "12 copies on each host, the primaries spread",
        SETTLE_TIMEOUT,
        |c| {
            settled(c)?;
            let held = copies_held(c);
            match held.values().all(|&n| n == 12) {
                true => Ok(held),
                false => Err(format!("copies per host {held:?}")),
            }
        },
    );
    println!("host {joined} held its share {took:?} after it was started: {held:?}");
    stop.store(true, Ordering::Relaxed);
    let log = background.join().expect("the writer");
    println!(
        "the writer: {} of {} writes acknowledged while host {joined} joined; errors {:?} (first: {:?})",
        log.acknowledged(),
        log.sent(),
        log.errors,
        log.error_samples
    );
    assert!(log.anomalies.is_empty(), "{:#?}", log.anomalies);
    assert!(log.acknowledged() > 50, "too few writes acknowledged");
    let (held, _) = cluster.wait_for(
        "three alike copies of every partition",
        SETTLE_TIMEOUT,
        |c| copies_alike(c, 3),
    );
    assert_eq!(held[&joined], 12, "{held:?}");
    let led = primaries(&cluster, joined).expect("CLUSTER NODES");
    let led_by_joined = led.iter().filter(|&&h| h == joined).count();
    assert!(led_by_joined >= 1, "host {joined} leads nothing: {led:?}");
    println!(
        "every copy alike {:?} after the join; host {joined} leads {led_by_joined} partitions",
        join_started.elapsed()
    );
    assert_reads_as(&cluster, &[joined, 1, 2, 3], &model, "after the join");
    assert_writer_kept(&cluster, &[joined, 1, 2, 3], &log, "after the join");
    assert_eq!(
        divergences(&cluster),
        0,
        "the digest checks found copies that differ"
    );
    println!("total {:?}", started.elapsed());
}

/// How many copies each live host holds (the partitions whose SHOAL.DIGEST it answers).
fn copies_held(cluster: &Cluster) -> BTreeMap<usize, usize> {
    cluster
        .live()
        .into_iter()
        .map(|host| {
            let held = (0..PARTITIONS)
                .filter(|p| {
                    matches!(
                        cluster.query(host, &["SHOAL.DIGEST", &p.to_string()]),
                        Ok(Resp::Array(_))
                    )
                })
                .count();
            (host, held)
        })
        .collect()
}

#[test]
fn reads_across_hosts_never_see_part_of_a_multi_key_write() {
    let cluster = start_settled_cluster();
    // One key in a partition led by each host, twice over: every MSET and EXEC of the
    // group is a two-phase commit across the three hosts.
    let primaries = primaries(&cluster, 1).expect("primaries");
    let mut keys = Vec::new();
    for round in 0..2 {
        for host in 1..=3 {
            let partition = (0..PARTITIONS)
                .filter(|&p| primaries[p as usize] == host)
                .nth(round)
                .unwrap_or_else(|| panic!("host {host} leads two partitions: {primaries:?}"));
            keys.push(format!("{{{}}}:k", tag_in(partition, "whole")));
        }
    }
    const WRITES: usize = 150;
    let done = Arc::new(AtomicBool::new(false));
    let writers: Vec<JoinHandle<()>> = (0..2)
        .map(|w| {
            let (mut con, keys) = (connect(&cluster, 1 + w), keys.clone());
            std::thread::spawn(move || {
                for n in 0..WRITES {
                    let value = format!("{w}-{n}");
                    let reply = if w == 0 {
                        let mut mset = redis::cmd("MSET");
                        for key in &keys {
                            mset.arg(key).arg(&value);
                        }
                        con.req_command(&mset)
                    } else {
                        let mut pipe = redis::pipe();
                        pipe.atomic();
                        for key in &keys {
                            pipe.cmd("SET").arg(key).arg(&value).ignore();
                        }
                        con.req_packed_commands(&pipe.get_packed_pipeline(), keys.len() + 1, 1)
                            .map(|mut replies| replies.pop().unwrap_or(Value::Nil))
                    };
                    match reply {
                        // A partition may still move between hosts: nothing was applied.
                        Ok(reply @ Value::ServerError(_))
                            if error_text(&reply).starts_with("TRYAGAIN") =>
                        {
                            std::thread::sleep(Duration::from_millis(50))
                        }
                        Ok(Value::ServerError(_)) | Err(_) => {
                            panic!("writer {w}: {reply:?}")
                        }
                        Ok(_) => {}
                    }
                }
            })
        })
        .collect();
    let readers: Vec<JoinHandle<usize>> = [2usize, 3]
        .into_iter()
        .map(|host| {
            let (mut con, keys, done) = (connect(&cluster, host), keys.clone(), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut checked = 0;
                let deadline = Instant::now() + Duration::from_secs(120);
                while (!done.load(Ordering::SeqCst) || checked < 20) && Instant::now() < deadline {
                    match con.req_command(redis::cmd("MGET").arg(&keys)) {
                        Ok(Value::Array(values)) => {
                            assert!(
                                values.iter().all(|v| *v == values[0]),
                                "an MGET through host {host} saw part of a write: {values:?}"
                            );
                            checked += 1;
                        }
                        Ok(reply @ Value::ServerError(_))
                            if error_text(&reply).starts_with("TRYAGAIN") => {}
                        other => panic!("MGET through host {host}: {other:?}"),
                    }
                }
                checked
            })
        })
        .collect();
    for writer in writers {
        writer.join().expect("writer");
    }
    done.store(true, Ordering::SeqCst);
    let checked: Vec<usize> = readers
        .into_iter()
        .map(|r| r.join().expect("reader"))
        .collect();
    println!("MGETs across 3 hosts checked beside {WRITES} MSETs and {WRITES} EXECs: {checked:?}");
    assert!(checked.iter().all(|&n| n >= 20), "{checked:?}");
}

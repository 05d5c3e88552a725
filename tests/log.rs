//! The per-partition commit log, read through `SHOAL.LOG <partition> <from> [COUNT n]`.

mod common;

use common::{call_str, error_text, Server};
use redis::Value;

#[derive(Debug, Clone, PartialEq)]
struct Entry {
    commit_id: i64,
    timestamp_ms: i64,
    change: String,
    collection: i64,
    key: Vec<u8>,
    data: Vec<u8>,
}

fn parse_entries(reply: Value) -> Vec<Entry> {
    let Value::Array(items) = reply else {
        panic!("SHOAL.LOG replies with an array, got {reply:?}")
    };
    items
        .into_iter()
        .map(|item| {
            let Value::Array(fields) = item else {
                panic!("a log entry is an array, got {item:?}")
            };
            assert_eq!(fields.len(), 7, "entry fields: {fields:?}");
            let int = |v: &Value| match v {
                Value::Int(n) => *n,
                other => panic!("expected an integer, got {other:?}"),
            };
            let bytes = |v: &Value| match v {
                Value::BulkString(b) => b.clone(),
                other => panic!("expected a bulk string, got {other:?}"),
            };
            Entry {
                commit_id: int(&fields[0]),
                timestamp_ms: int(&fields[1]),
                change: String::from_utf8(bytes(&fields[2])).expect("change type"),
                collection: int(&fields[3]),
                key: bytes(&fields[4]),
                data: bytes(&fields[5]),
            }
        })
        .collect()
}

fn log(con: &mut redis::Connection, partition: i64, from: i64, count: Option<usize>) -> Vec<Entry> {
    let (partition, from) = (partition.to_string(), from.to_string());
    let mut args = vec!["SHOAL.LOG", partition.as_str(), from.as_str()];
    let count = count.map(|c| c.to_string());
    if let Some(count) = &count {
        args.extend(["COUNT", count.as_str()]);
    }
    parse_entries(call_str(con, &args))
}

fn partition_of(con: &mut redis::Connection, key: &str) -> i64 {
    match call_str(con, &["SHOAL.PARTITION", key]) {
        Value::Int(p) => p,
        other => panic!("SHOAL.PARTITION {key}: {other:?}"),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn assert_strictly_increasing(entries: &[Entry]) {
    for pair in entries.windows(2) {
        assert!(
            pair[0].commit_id < pair[1].commit_id,
            "commit ids not strictly increasing: {pair:?}"
        );
        assert!(
            pair[0].timestamp_ms <= pair[1].timestamp_ms,
            "timestamps go back: {pair:?}"
        );
    }
}

#[test]
fn create_update_delete_of_one_key_makes_three_entries() {
    let server = Server::start("");
    let mut con = server.conn();
    let started = now_ms();
    let key = "logged-key";
    let partition = partition_of(&mut con, key);
    assert_eq!(partition, i64::from(server.partition_of(key.as_bytes())));
    assert_eq!(call_str(&mut con, &["SET", key, "first"]), Value::Okay);
    assert_eq!(call_str(&mut con, &["SET", key, "second"]), Value::Okay);
    assert_eq!(call_str(&mut con, &["DEL", key]), Value::Int(1));
    let finished = now_ms();

    let entries = log(&mut con, partition, 0, None);
    assert_eq!(entries.len(), 3, "{entries:?}");
    let summary: Vec<(&str, &[u8], &[u8], i64)> = entries
        .iter()
        .map(|e| {
            (
                e.change.as_str(),
                e.key.as_slice(),
                e.data.as_slice(),
                e.collection,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("create", key.as_bytes(), &b"first"[..], 0),
            ("update", key.as_bytes(), &b"second"[..], 0),
            ("delete", key.as_bytes(), &b""[..], 0),
        ]
    );
    assert_strictly_increasing(&entries);
    for entry in &entries {
        assert!(entry.commit_id > 0, "{entry:?}");
        assert!(
            entry.timestamp_ms >= started - 1000 && entry.timestamp_ms <= finished + 1000,
            "timestamp of {entry:?}"
        );
    }

    // from_commit_id is inclusive; COUNT limits.
    let ids: Vec<i64> = entries.iter().map(|e| e.commit_id).collect();
    assert_eq!(log(&mut con, partition, 0, Some(2)), entries[..2].to_vec());
    assert_eq!(
        log(&mut con, partition, ids[1], None),
        entries[1..].to_vec()
    );
    assert_eq!(
        log(&mut con, partition, ids[1], Some(1)),
        entries[1..2].to_vec()
    );
    assert_eq!(
        log(&mut con, partition, ids[0] + 1, None),
        entries[1..].to_vec(),
        "from between ids"
    );
    assert!(log(&mut con, partition, ids[2] + 1, None).is_empty());

    // The log is per partition: another partition saw nothing.
    let other = (partition + 1) % i64::from(server.partitions);
    assert!(log(&mut con, other, 0, None).is_empty());
}

#[test]
fn every_write_command_is_logged_and_failed_writes_are_not() {
    let server = Server::start("");
    let mut con = server.conn();
    // Hash tags keep these keys in one partition.
    let (a, b) = ("{tag}a", "{tag}b");
    let partition = partition_of(&mut con, a);
    assert_eq!(partition_of(&mut con, b), partition);

    assert_eq!(call_str(&mut con, &["INCR", a]), Value::Int(1));
    assert_eq!(call_str(&mut con, &["INCRBY", a, "5"]), Value::Int(6));
    assert_eq!(call_str(&mut con, &["APPEND", a, "x"]), Value::Int(2));
    assert_eq!(call_str(&mut con, &["SETNX", a, "no"]), Value::Int(0));
    assert_eq!(call_str(&mut con, &["SET", a, "no", "NX"]), Value::Nil);
    assert_eq!(call_str(&mut con, &["SET", b, "no", "XX"]), Value::Nil);
    assert_eq!(call_str(&mut con, &["DEL", b]), Value::Int(0));
    assert!(
        matches!(call_str(&mut con, &["INCR", a]), Value::ServerError(_)),
        "INCR on \"6x\" fails"
    );
    assert_eq!(
        call_str(&mut con, &["GETSET", a, "g"]),
        Value::BulkString(b"6x".to_vec())
    );
    assert_eq!(call_str(&mut con, &["SETNX", b, "nx"]), Value::Int(1));
    assert_eq!(
        call_str(&mut con, &["GETDEL", a]),
        Value::BulkString(b"g".to_vec())
    );
    assert_eq!(call_str(&mut con, &["SELECT", "3"]), Value::Okay);
    assert_eq!(call_str(&mut con, &["SET", a, "in-three"]), Value::Okay);
    assert_eq!(
        call_str(&mut con, &["INCRBYFLOAT", b, "1.5"]),
        Value::BulkString(b"1.5".to_vec())
    );

    let entries = log(&mut con, partition, 0, None);
    let summary: Vec<(String, String, String, i64)> = entries
        .iter()
        .map(|e| {
            (
                e.change.clone(),
                String::from_utf8_lossy(&e.key).into_owned(),
                String::from_utf8_lossy(&e.data).into_owned(),
                e.collection,
            )
        })
        .collect();
    let expected: Vec<(String, String, String, i64)> = [
        ("create", a, "1", 0),
        ("update", a, "6", 0),
        ("update", a, "6x", 0),
        ("update", a, "g", 0),
        ("create", b, "nx", 0),
        ("delete", a, "", 0),
        ("create", a, "in-three", 3),
        ("create", b, "1.5", 3),
    ]
    .iter()
    .map(|(c, k, d, n)| (c.to_string(), k.to_string(), d.to_string(), *n))
    .collect();
    assert_eq!(summary, expected);
    assert_strictly_increasing(&entries);
}

#[test]
fn one_group_commit_gives_each_write_its_own_commit_id() {
    let server = Server::start("");
    let mut con = server.conn();
    let keys: Vec<String> = (0..200).map(|i| format!("{{group}}{i}")).collect();
    let mut pipe = redis::pipe();
    for (i, key) in keys.iter().enumerate() {
        pipe.cmd("SET").arg(key).arg(i);
    }
    let replies: Vec<Value> = pipe.query(&mut con).expect("pipeline");
    assert!(replies.iter().all(|r| *r == Value::Okay));
    let partition = partition_of(&mut con, &keys[0]);
    let entries = log(&mut con, partition, 0, Some(1000));
    assert_eq!(entries.len(), 200);
    assert_strictly_increasing(&entries);
    let logged: Vec<String> = entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e.key).into_owned())
        .collect();
    assert_eq!(
        logged, keys,
        "the log keeps the order in which one client's writes were acknowledged"
    );
    assert_eq!(
        log(&mut con, partition, 0, Some(10)),
        entries[..10].to_vec()
    );
    assert_eq!(
        log(&mut con, partition, 0, None),
        entries[..100].to_vec(),
        "without COUNT, at most 100 entries"
    );
    assert_eq!(
        log(&mut con, partition, entries[150].commit_id, Some(1000)),
        entries[150..].to_vec()
    );
}

#[test]
fn commit_ids_keep_increasing_across_a_crash() {
    let mut server = Server::start("");
    let mut con = server.conn();
    let key = "across-restart";
    let partition = partition_of(&mut con, key);
    for value in ["1", "2", "3"] {
        assert_eq!(call_str(&mut con, &["SET", key, value]), Value::Okay);
    }
    let before = log(&mut con, partition, 0, None);
    assert_eq!(before.len(), 3);
    drop(con);
    server.kill_tree();
    server.restart();

    let mut con = server.conn();
    assert_eq!(
        log(&mut con, partition, 0, None),
        before,
        "the log survives kill -9"
    );
    assert_eq!(call_str(&mut con, &["SET", key, "4"]), Value::Okay);
    let after = log(&mut con, partition, 0, None);
    assert_eq!(after.len(), 4);
    assert!(
        after[3].commit_id > before[2].commit_id,
        "a new write after restart: {:?} vs {:?}",
        after[3],
        before[2]
    );
    assert_eq!(
        (after[3].change.as_str(), after[3].data.as_slice()),
        ("update", &b"4"[..])
    );
}

#[test]
fn bad_shoal_log_requests_get_errors() {
    let server = Server::start("[storage]\npartitions = 32\n");
    let mut con = server.conn();
    assert!(
        matches!(
            call_str(&mut con, &["SHOAL.LOG", "32", "0"]),
            Value::ServerError(_)
        ),
        "partition out of range"
    );
    assert!(matches!(
        call_str(&mut con, &["SHOAL.LOG", "-1", "0"]),
        Value::ServerError(_)
    ));
    assert!(matches!(
        call_str(&mut con, &["SHOAL.LOG", "x", "0"]),
        Value::ServerError(_)
    ));
    assert!(matches!(
        call_str(&mut con, &["SHOAL.LOG", "0", "0", "COUNT", "many"]),
        Value::ServerError(_)
    ));
    assert!(matches!(
        call_str(&mut con, &["SHOAL.LOG", "0", "0", "COUNT", "0"]),
        Value::ServerError(_)
    ));
    assert!(matches!(
        call_str(&mut con, &["SHOAL.LOG", "0", "0", "LIMIT", "1"]),
        Value::ServerError(_)
    ));
    assert_eq!(
        error_text(&call_str(&mut con, &["SHOAL.LOG", "0"])),
        "ERR wrong number of arguments for 'shoal.log' command"
    );
    assert_eq!(
        error_text(&call_str(&mut con, &["SHOAL.PARTITION"])),
        "ERR wrong number of arguments for 'shoal.partition' command"
    );
    assert_eq!(
        log(&mut con, 31, 0, None),
        Vec::new(),
        "the last partition exists and is empty"
    );
}

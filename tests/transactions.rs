//! MULTI, EXEC, DISCARD, WATCH and UNWATCH on a real Shoal (2 workers), through the
//! `redis` crate: queueing and its errors, WATCH, isolation from a concurrent reader,
//! the refusal of a transaction across workers, and atomicity when the worker is
//! killed with SIGKILL in the middle of a stream of transactions.

mod common;

use std::time::{Duration, Instant};

use common::{call_str, error_text, Server};
use redis::Value;

fn int(n: i64) -> Value {
    Value::Int(n)
}

fn bulk(text: &str) -> Value {
    Value::BulkString(text.as_bytes().to_vec())
}

fn queued() -> Value {
    Value::SimpleString("QUEUED".into())
}

#[test]
fn queued_commands_run_in_order_and_errors_abort_or_stay_per_command() {
    let server = Server::start("");
    let mut con = server.conn();
    assert_eq!(call_str(&mut con, &["MULTI"]), Value::Okay);
    assert_eq!(call_str(&mut con, &["SET", "{t}x", "1"]), queued());
    assert_eq!(call_str(&mut con, &["INCR", "{t}x"]), queued());
    assert_eq!(call_str(&mut con, &["HSET", "{t}h", "f", "v"]), queued());
    assert_eq!(call_str(&mut con, &["INCR", "{t}h"]), queued());
    assert_eq!(call_str(&mut con, &["GET", "{t}x"]), queued());
    let Value::Array(replies) = call_str(&mut con, &["EXEC"]) else {
        panic!("EXEC answers an array");
    };
    assert_eq!(replies.len(), 5);
    assert_eq!(replies[..3], [Value::Okay, int(2), int(1)]);
    assert!(
        error_text(&replies[3]).starts_with("WRONGTYPE"),
        "a runtime error answers its own command and leaves the others applied"
    );
    assert_eq!(replies[4], bulk("2"));

    // A command refused while queueing aborts the whole transaction.
    assert_eq!(call_str(&mut con, &["MULTI"]), Value::Okay);
    assert_eq!(call_str(&mut con, &["SET", "{t}x", "100"]), queued());
    let arity = call_str(&mut con, &["SET", "{t}x"]);
    assert!(error_text(&arity).contains("wrong number of arguments"));
    let unknown = call_str(&mut con, &["NOSUCHCOMMAND"]);
    assert!(error_text(&unknown).contains("unknown command"));
    let exec = call_str(&mut con, &["EXEC"]);
    assert!(error_text(&exec).starts_with("EXECABORT"));
    assert_eq!(
        call_str(&mut con, &["GET", "{t}x"]),
        bulk("2"),
        "nothing ran"
    );

    // DISCARD drops the queue; the control commands out of place are errors.
    assert_eq!(call_str(&mut con, &["MULTI"]), Value::Okay);
    assert_eq!(call_str(&mut con, &["SET", "{t}x", "300"]), queued());
    let nested = call_str(&mut con, &["MULTI"]);
    assert!(error_text(&nested).contains("can not be nested"));
    let watch = call_str(&mut con, &["WATCH", "{t}x"]);
    assert!(error_text(&watch).contains("WATCH inside MULTI"));
    assert_eq!(call_str(&mut con, &["DISCARD"]), Value::Okay);
    assert_eq!(call_str(&mut con, &["GET", "{t}x"]), bulk("2"));
    let exec = call_str(&mut con, &["EXEC"]);
    assert!(error_text(&exec).contains("EXEC without MULTI"));
    let discard = call_str(&mut con, &["DISCARD"]);
    assert!(error_text(&discard).contains("DISCARD without MULTI"));

    // An empty transaction answers an empty array.
    assert_eq!(call_str(&mut con, &["MULTI"]), Value::Okay);
    assert_eq!(call_str(&mut con, &["EXEC"]), Value::Array(vec![]));
}

#[test]
fn watch_refuses_exec_after_any_change_of_a_watched_key() {
    let server = Server::start("");
    let mut a = server.conn();
    let mut b = server.conn();
    call_str(&mut a, &["SET", "{w}k", "1"]);

    // Unchanged: EXEC runs.
    assert_eq!(call_str(&mut a, &["WATCH", "{w}k"]), Value::Okay);
    call_str(&mut a, &["MULTI"]);
    call_str(&mut a, &["INCR", "{w}k"]);
    assert_eq!(call_str(&mut a, &["EXEC"]), Value::Array(vec![int(2)]));

    // Changed by another client between WATCH and EXEC: a null reply, nothing runs.
    call_str(&mut a, &["WATCH", "{w}k"]);
    call_str(&mut b, &["SET", "{w}k", "10"]);
    call_str(&mut a, &["MULTI"]);
    call_str(&mut a, &["INCR", "{w}k"]);
    assert_eq!(call_str(&mut a, &["EXEC"]), Value::Nil);
    assert_eq!(call_str(&mut a, &["GET", "{w}k"]), bulk("10"));

    // EXEC forgets the watch: the next transaction runs.
    call_str(&mut a, &["MULTI"]);
    call_str(&mut a, &["INCR", "{w}k"]);
    assert_eq!(call_str(&mut a, &["EXEC"]), Value::Array(vec![int(11)]));

    // A missing key that appears, and a hash whose existing field changes, count too.
    call_str(&mut a, &["WATCH", "{w}new"]);
    call_str(&mut b, &["SET", "{w}new", "x"]);
    call_str(&mut a, &["MULTI"]);
    call_str(&mut a, &["GET", "{w}k"]);
    assert_eq!(call_str(&mut a, &["EXEC"]), Value::Nil);
    call_str(&mut b, &["HSET", "{w}h", "f", "1"]);
    call_str(&mut a, &["WATCH", "{w}h"]);
    call_str(&mut b, &["HSET", "{w}h", "f", "2"]);
    call_str(&mut a, &["MULTI"]);
    call_str(&mut a, &["HGET", "{w}h", "f"]);
    assert_eq!(call_str(&mut a, &["EXEC"]), Value::Nil);

    // UNWATCH and DISCARD forget the watch too.
    call_str(&mut a, &["WATCH", "{w}k"]);
    call_str(&mut b, &["SET", "{w}k", "0"]);
    assert_eq!(call_str(&mut a, &["UNWATCH"]), Value::Okay);
    call_str(&mut a, &["MULTI"]);
    call_str(&mut a, &["INCR", "{w}k"]);
    assert_eq!(call_str(&mut a, &["EXEC"]), Value::Array(vec![int(1)]));
}

#[test]
fn a_transaction_across_workers_commits_whole() {
    let server = Server::start("");
    let mut con = server.conn();
    let zero = server.keys_on_worker("a", 0, 1).remove(0);
    let one = server.keys_on_worker("b", 1, 1).remove(0);
    call_str(&mut con, &["MULTI"]);
    call_str(&mut con, &["SET", &zero, "1"]);
    call_str(&mut con, &["INCR", &one]);
    call_str(&mut con, &["RPUSH", &format!("{one}:list"), "x", "y"]);
    call_str(&mut con, &["GET", &zero]);
    assert_eq!(
        call_str(&mut con, &["EXEC"]),
        Value::Array(vec![Value::Okay, int(1), int(2), bulk("1")])
    );
    assert_eq!(
        call_str(&mut con, &["MGET", &zero, &one]),
        Value::Array(vec![bulk("1"), bulk("1")])
    );
    // WATCH across workers: a change of a watched key on another worker fails it.
    let mut other = server.conn();
    call_str(&mut con, &["WATCH", &zero]);
    call_str(&mut other, &["SET", &zero, "changed"]);
    call_str(&mut con, &["MULTI"]);
    call_str(&mut con, &["INCR", &one]);
    call_str(&mut con, &["SET", &zero, "mine"]);
    assert_eq!(call_str(&mut con, &["EXEC"]), Value::Nil);
    assert_eq!(
        call_str(&mut con, &["MGET", &zero, &one]),
        Value::Array(vec![bulk("changed"), bulk("1")])
    );
    // DEL, MSET and TTL over both workers run inside a transaction too.
    call_str(&mut con, &["EXPIRE", &one, "1000"]);
    call_str(&mut con, &["MULTI"]);
    call_str(&mut con, &["MSET", &zero, "m0", &one, "m1"]);
    call_str(&mut con, &["TTL", &one]);
    call_str(&mut con, &["DEL", &zero, &one, "missing"]);
    call_str(&mut con, &["EXISTS", &zero, &one]);
    let Value::Array(replies) = call_str(&mut con, &["EXEC"]) else {
        panic!("EXEC answers an array");
    };
    assert_eq!(replies[0], Value::Okay);
    assert_eq!(replies[1], int(-1), "MSET cleared the TTL before TTL ran");
    assert_eq!(replies[2..], [int(2), int(0)]);
    call_str(&mut con, &["SET", &zero, "changed"]);
    // A command that fans out to every worker cannot be part of a transaction.
    call_str(&mut con, &["MULTI"]);
    call_str(&mut con, &["SET", &zero, "1"]);
    call_str(&mut con, &["DBSIZE"]);
    let exec = call_str(&mut con, &["EXEC"]);
    assert!(error_text(&exec).contains("cannot run as one"));
    // Nor can one that needs a worker's answer to be planned; it is refused at once.
    call_str(&mut con, &["MULTI"]);
    call_str(&mut con, &["OBJECT", "REFCOUNT", &zero]);
    let asked = std::time::Instant::now();
    let exec = call_str(&mut con, &["EXEC"]);
    assert!(error_text(&exec).contains("cannot run as one"), "{exec:?}");
    assert!(
        asked.elapsed() < std::time::Duration::from_millis(900),
        "EXEC waited {:?} to refuse OBJECT",
        asked.elapsed()
    );
    assert_eq!(call_str(&mut con, &["GET", &zero]), bulk("changed"));
}

#[test]
fn concurrent_transactions_across_workers_are_serializable() {
    let server = Server::start("");
    let zero = server.keys_on_worker("a", 0, 1).remove(0);
    let one = server.keys_on_worker("b", 1, 1).remove(0);
    const ROUNDS: i64 = 100;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let client = server.client();
        let (zero, one) = (zero.clone(), one.clone());
        clients.push(std::thread::spawn(move || {
            let mut con = common::connect(&client);
            for _ in 0..ROUNDS {
                let (a, b): (i64, i64) = redis::pipe()
                    .atomic()
                    .cmd("INCR")
                    .arg(&zero)
                    .cmd("INCR")
                    .arg(&one)
                    .query(&mut con)
                    .expect("EXEC");
                assert_eq!(a, b, "a transaction saw the other key at another point");
            }
        }));
    }
    for client in clients {
        client.join().expect("client");
    }
    let mut con = server.conn();
    let total = (3 * ROUNDS).to_string();
    assert_eq!(
        call_str(&mut con, &["MGET", &zero, &one]),
        Value::Array(vec![bulk(&total), bulk(&total)])
    );
}

#[test]
fn a_reader_never_sees_half_a_transaction() {
    let server = Server::start("");
    let mut writer = server.conn();
    let mut reader = server.conn();
    call_str(&mut writer, &["MSET", "{i}a", "0", "{i}b", "0"]);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = std::sync::Arc::clone(&done);
    let writes = std::thread::spawn(move || {
        for n in 1..=300 {
            let n = n.to_string();
            let _: Value = redis::pipe()
                .atomic()
                .cmd("SET")
                .arg("{i}a")
                .arg(&n)
                .cmd("SET")
                .arg("{i}b")
                .arg(&n)
                .query(&mut writer)
                .expect("EXEC");
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let mut reads = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
        let values: Vec<String> = redis::cmd("MGET")
            .arg("{i}a")
            .arg("{i}b")
            .query(&mut reader)
            .expect("MGET");
        assert_eq!(values[0], values[1], "MGET saw half a transaction");
        reads += 1;
    }
    writes.join().expect("writer");
    assert!(reads > 0);
    assert_eq!(
        call_str(&mut reader, &["MGET", "{i}a", "{i}b"]),
        Value::Array(vec![bulk("300"), bulk("300")])
    );
}

#[test]
fn a_killed_worker_leaves_each_transaction_whole() {
    let server = Server::start("");
    let mut con = server.conn();
    let worker = server.worker_of(b"{k}a");
    call_str(&mut con, &["MSET", "{k}a", "0", "{k}b", "0"]);
    let client = server.client();
    let writes = std::thread::spawn(move || {
        let mut con = common::connect(&client);
        let mut acknowledged = 0u64;
        let deadline = Instant::now() + Duration::from_secs(30);
        for _ in 0..2000 {
            if Instant::now() > deadline {
                break;
            }
            let done: redis::RedisResult<Value> = redis::pipe()
                .atomic()
                .cmd("INCR")
                .arg("{k}a")
                .cmd("INCR")
                .arg("{k}b")
                .query(&mut con);
            match done {
                Ok(_) => acknowledged += 1,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(20));
                    con = common::connect(&client);
                }
            }
        }
        acknowledged
    });
    std::thread::sleep(Duration::from_millis(300));
    let old = server.worker_pid(worker as u64);
    common::signal(old, libc::SIGKILL);
    server.wait_restarted("shard-worker", worker as u64, old, Duration::from_secs(30));
    let acknowledged = writes.join().expect("writer");
    let values: Vec<u64> = redis::cmd("MGET")
        .arg("{k}a")
        .arg("{k}b")
        .query(&mut con)
        .expect("MGET");
    assert_eq!(values[0], values[1], "a transaction was applied in part");
    assert!(
        values[0] >= acknowledged,
        "{} transactions acknowledged, {} applied",
        acknowledged,
        values[0]
    );
}

#[test]
fn a_killed_worker_leaves_each_transaction_across_workers_whole() {
    let server = Server::start("");
    let zero = server.keys_on_worker("a", 0, 1).remove(0);
    let one = server.keys_on_worker("b", 1, 1).remove(0);
    let mut con = server.conn();
    call_str(&mut con, &["MSET", &zero, "0", &one, "0"]);
    let client = server.client();
    let (a, b) = (zero.clone(), one.clone());
    let writes = std::thread::spawn(move || {
        let mut con = common::connect(&client);
        let mut acknowledged = 0u64;
        let deadline = Instant::now() + Duration::from_secs(30);
        for _ in 0..1000 {
            if Instant::now() > deadline {
                break;
            }
            let done: redis::RedisResult<Value> = redis::pipe()
                .atomic()
                .cmd("INCR")
                .arg(&a)
                .cmd("INCR")
                .arg(&b)
                .query(&mut con);
            match done {
                Ok(_) => acknowledged += 1,
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(20));
                    con = common::connect(&client);
                }
            }
        }
        acknowledged
    });
    std::thread::sleep(Duration::from_millis(500));
    let old = server.worker_pid(1);
    common::signal(old, libc::SIGKILL);
    server.wait_restarted("shard-worker", 1, old, Duration::from_secs(30));
    let acknowledged = writes.join().expect("writer");
    // Transactions left prepared by the kill are settled by recovery within seconds.
    let (values, _) = common::wait_until("both keys agree", Duration::from_secs(15), || {
        let values: Vec<u64> = redis::cmd("MGET")
            .arg(&zero)
            .arg(&one)
            .query(&mut con)
            .map_err(|e| e.to_string())?;
        match values[0] == values[1] {
            true => Ok(values),
            false => Err(format!("{values:?}")),
        }
    });
    assert!(
        values[0] >= acknowledged,
        "{acknowledged} transactions acknowledged, {} applied",
        values[0]
    );
}

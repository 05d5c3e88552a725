//! Hashes, lists, sets and sorted sets on a real Shoal (2 workers) where the
//! differential test cannot look: blocking pops that wait for another client, RESP3
//! reply shapes, the element size limit, a big collection deleted at once, and keys
//! written and read across a restart.

mod common;

use std::time::{Duration, Instant};

use common::{call_str, error_text, Resp, Server};
use redis::Value;

fn bulk(text: &str) -> Value {
    Value::BulkString(text.as_bytes().to_vec())
}

#[test]
fn blocking_pops_wait_for_a_push_and_time_out_as_redis_does() {
    let server = Server::start("");
    let mut con = server.conn();
    // Nothing there: BLPOP answers a null array after its timeout, not before.
    let started = Instant::now();
    assert_eq!(
        call_str(&mut con, &["BLPOP", "q1", "q2", "0.2"]),
        Value::Nil
    );
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(190), "{waited:?}");
    assert!(waited < Duration::from_secs(2), "{waited:?}");

    // A push from another client, to the second key (maybe on another worker), wakes it.
    let client = server.client();
    let pusher = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let mut other = common::connect(&client);
        call_str(&mut other, &["RPUSH", "q2", "hello"]);
    });
    let started = Instant::now();
    assert_eq!(
        call_str(&mut con, &["BLPOP", "q1", "q2", "5"]),
        Value::Array(vec![bulk("q2"), bulk("hello")])
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    pusher.join().expect("pusher");

    // BZPOPMIN answers key, member and score; BLMOVE moves between keys of one worker.
    call_str(&mut con, &["ZADD", "z", "2.5", "m"]);
    assert_eq!(
        call_str(&mut con, &["BZPOPMIN", "nothing", "z", "1"]),
        Value::Array(vec![bulk("z"), bulk("m"), bulk("2.5")])
    );
    call_str(&mut con, &["RPUSH", "{b}src", "x"]);
    assert_eq!(
        call_str(
            &mut con,
            &["BLMOVE", "{b}src", "{b}dst", "LEFT", "RIGHT", "1"]
        ),
        bulk("x")
    );
    assert_eq!(
        call_str(&mut con, &["LRANGE", "{b}dst", "0", "-1"]),
        Value::Array(vec![bulk("x")])
    );
    let negative = call_str(&mut con, &["BLPOP", "q1", "-1"]);
    assert!(error_text(&negative).contains("timeout is negative"));
    let invalid = call_str(&mut con, &["BLPOP", "q1", "soon"]);
    assert!(error_text(&invalid).contains("timeout is not a float"));
}

/// INFO's `blocked_clients`.
fn blocked_clients(con: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("clients").query(con).expect("INFO");
    info.lines()
        .find_map(|line| line.strip_prefix("blocked_clients:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("INFO clients has blocked_clients")
}

#[test]
fn blocked_pops_are_served_in_the_order_they_blocked_without_polling_their_worker() {
    let server = Server::start("");
    let mut con = server.conn();
    let mut blocked = Vec::new();
    for i in 1..=4 {
        let mut raw = server.raw();
        raw.send(b"*3\r\n$5\r\nBLPOP\r\n$4\r\nfifo\r\n$2\r\n10\r\n");
        common::wait_until(
            "the pop blocks",
            Duration::from_secs(5),
            || match blocked_clients(&mut con) {
                n if n == i => Ok(()),
                n => Err(format!("{n} blocked")),
            },
        );
        blocked.push(raw);
    }
    // While they wait, their worker serves about what an idle worker does: the blocked
    // pops look again when it commits, not on a timer.
    let worker = server.worker_of(b"fifo") as u64;
    let ops = || {
        server.process_status("shard-worker", worker)["ops"]
            .as_u64()
            .expect("ops")
    };
    let before = ops();
    std::thread::sleep(Duration::from_millis(1500));
    let served = ops() - before;
    assert!(
        served < 30,
        "the worker served {served} requests in 1.5 s for 4 idle blocked pops"
    );

    // One push of four elements: the first to block gets the first, and so on.
    assert_eq!(
        call_str(&mut con, &["RPUSH", "fifo", "a", "b", "c", "d"]),
        Value::Int(4)
    );
    for (raw, element) in blocked.iter_mut().zip(["a", "b", "c", "d"]) {
        assert_eq!(
            raw.read_reply().expect("BLPOP reply"),
            Resp::Array(vec![
                Resp::Bulk(b"fifo".to_vec()),
                Resp::Bulk(element.as_bytes().to_vec())
            ])
        );
    }
    assert_eq!(blocked_clients(&mut con), 0);
}

#[test]
fn a_client_that_hangs_up_while_blocked_is_gone() {
    let server = Server::start("");
    let mut watcher = server.conn();
    let clients = |con: &mut redis::Connection| -> usize {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query(con)
            .expect("CLIENT LIST");
        list.lines().count()
    };
    let before = clients(&mut watcher);
    {
        let mut blocked = server.raw();
        blocked.send(b"*3\r\n$5\r\nBLPOP\r\n$5\r\nnever\r\n$1\r\n0\r\n");
        common::wait_until(
            "the blocked client shows",
            Duration::from_secs(5),
            || match clients(&mut watcher) {
                n if n == before + 1 => Ok(()),
                n => Err(format!("{n} clients")),
            },
        );
    }
    // The socket is closed: the blocked pop stops and its connection goes.
    common::wait_until(
        "the blocked client is gone",
        Duration::from_secs(5),
        || match clients(&mut watcher) {
            n if n == before => Ok(()),
            n => Err(format!("{n} clients")),
        },
    );
    // Nothing was popped for it: a later push stays.
    call_str(&mut watcher, &["RPUSH", "never", "v"]);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(call_str(&mut watcher, &["LLEN", "never"]), Value::Int(1));
}

#[test]
fn resp3_replies_have_redis_shapes() {
    let server = Server::start("");
    let mut raw = server.raw();
    assert!(matches!(raw.cmd(&["HELLO", "3"]), Resp::Map(_)));
    raw.cmd(&["HSET", "h", "f", "v"]);
    assert_eq!(
        raw.cmd(&["HGETALL", "h"]),
        Resp::Map(vec![(Resp::Bulk(b"f".to_vec()), Resp::Bulk(b"v".to_vec()))])
    );
    raw.cmd(&["ZADD", "z", "1", "a", "2", "b"]);
    assert_eq!(raw.cmd(&["ZSCORE", "z", "a"]), Resp::Double("1".into()));
    assert_eq!(
        raw.cmd(&["ZRANGE", "z", "0", "-1", "WITHSCORES"]),
        Resp::Array(vec![
            Resp::Array(vec![Resp::Bulk(b"a".to_vec()), Resp::Double("1".into())]),
            Resp::Array(vec![Resp::Bulk(b"b".to_vec()), Resp::Double("2".into())]),
        ])
    );
    assert_eq!(
        raw.cmd(&["ZPOPMIN", "z"]),
        Resp::Array(vec![Resp::Bulk(b"a".to_vec()), Resp::Double("1".into())]),
        "ZPOPMIN without a count is one flat pair"
    );
    assert_eq!(raw.cmd(&["LPOP", "missing", "2"]), Resp::Null);
    assert_eq!(raw.cmd(&["TYPE", "h"]), Resp::Simple("hash".into()));
}

#[test]
fn an_element_too_long_for_its_key_is_refused_and_nothing_is_written() {
    let server = Server::start("");
    let mut con = server.conn();
    let key = "k".repeat(100);
    let field = "f".repeat(400);
    let refused = call_str(&mut con, &["HSET", &key, "ok", "1", &field, "2"]);
    assert!(
        error_text(&refused).contains("longer than 499 bytes"),
        "{refused:?}"
    );
    assert_eq!(call_str(&mut con, &["EXISTS", &key]), Value::Int(0));
    let fits = "f".repeat(399);
    assert_eq!(
        call_str(&mut con, &["HSET", &key, &fits, "2"]),
        Value::Int(1)
    );
    // A sorted-set member also sits after its 8-byte score.
    let refused = call_str(&mut con, &["ZADD", "z", "1", &"m".repeat(491)]);
    assert!(error_text(&refused).contains("longer than"));
    assert_eq!(
        call_str(&mut con, &["ZADD", "z", "1", &"m".repeat(490)]),
        Value::Int(1)
    );
}

#[test]
fn a_big_collection_is_deleted_at_once_and_its_space_reused() {
    let server = Server::start("");
    let mut con = server.conn();
    const MEMBERS: usize = 200_000;
    for chunk in 0..MEMBERS / 1000 {
        let mut cmd = redis::cmd("SADD");
        cmd.arg("big");
        for i in 0..1000 {
            cmd.arg(format!("member-{}", chunk * 1000 + i));
        }
        let _: i64 = cmd.query(&mut con).expect("SADD");
    }
    assert_eq!(
        call_str(&mut con, &["SCARD", "big"]),
        Value::Int(MEMBERS as i64)
    );
    let started = Instant::now();
    assert_eq!(call_str(&mut con, &["DEL", "big"]), Value::Int(1));
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(500),
        "DEL of {MEMBERS} members took {took:?}"
    );
    assert_eq!(call_str(&mut con, &["SCARD", "big"]), Value::Int(0));
    // The same key made again starts empty, while the old members are reclaimed.
    assert_eq!(
        call_str(&mut con, &["SADD", "big", "member-1"]),
        Value::Int(1)
    );
    assert_eq!(call_str(&mut con, &["SCARD", "big"]), Value::Int(1));
    assert_eq!(
        call_str(&mut con, &["SISMEMBER", "big", "member-2"]),
        Value::Int(0)
    );
}

#[test]
fn typed_keys_survive_a_restart() {
    let mut server = Server::start("");
    let mut con = server.conn();
    call_str(&mut con, &["HSET", "h", "a", "1", "b", "2"]);
    call_str(&mut con, &["RPUSH", "l", "x", "y", "z"]);
    call_str(&mut con, &["SADD", "s", "m"]);
    call_str(&mut con, &["ZADD", "z", "1.5", "p", "-3", "q"]);
    call_str(&mut con, &["EXPIRE", "h", "1000"]);
    drop(con);
    server.stop();
    server.restart();
    let mut con = server.conn();
    assert_eq!(call_str(&mut con, &["HGET", "h", "b"]), bulk("2"));
    assert!(matches!(call_str(&mut con, &["TTL", "h"]), Value::Int(ttl) if ttl > 900));
    assert_eq!(
        call_str(&mut con, &["LRANGE", "l", "0", "-1"]),
        Value::Array(vec![bulk("x"), bulk("y"), bulk("z")])
    );
    assert_eq!(call_str(&mut con, &["SISMEMBER", "s", "m"]), Value::Int(1));
    assert_eq!(
        call_str(&mut con, &["ZRANGE", "z", "0", "-1"]),
        Value::Array(vec![bulk("q"), bulk("p")])
    );
}

#[test]
fn moves_across_workers_neither_lose_nor_duplicate_elements() {
    let server = Server::start("");
    let a = server.keys_on_worker("list-a", 0, 1).remove(0);
    let b = server.keys_on_worker("list-b", 1, 1).remove(0);
    let sa = server.keys_on_worker("set-a", 0, 1).remove(0);
    let sb = server.keys_on_worker("set-b", 1, 1).remove(0);
    let mut con = server.conn();
    let elements: Vec<String> = (0..100).map(|i| format!("e{i}")).collect();
    let _: i64 = redis::cmd("RPUSH")
        .arg(&a)
        .arg(&elements)
        .query(&mut con)
        .expect("RPUSH");
    let _: i64 = redis::cmd("SADD")
        .arg(&sa)
        .arg(&elements)
        .query(&mut con)
        .expect("SADD");
    let mut movers = Vec::new();
    for mover in 0..3 {
        let client = server.client();
        let (a, b, sa, sb) = (a.clone(), b.clone(), sa.clone(), sb.clone());
        movers.push(std::thread::spawn(move || {
            let mut con = common::connect(&client);
            for round in 0..100 {
                let (from, to, set_from, set_to) = match (round + mover) % 2 {
                    0 => (&a, &b, &sa, &sb),
                    _ => (&b, &a, &sb, &sa),
                };
                let _: Value = redis::cmd("LMOVE")
                    .arg(from)
                    .arg(to)
                    .arg("LEFT")
                    .arg("RIGHT")
                    .query(&mut con)
                    .expect("LMOVE");
                let member = format!("e{}", (round * 7 + mover) % 100);
                let _: i64 = redis::cmd("SMOVE")
                    .arg(set_from)
                    .arg(set_to)
                    .arg(&member)
                    .query(&mut con)
                    .expect("SMOVE");
            }
        }));
    }
    for mover in movers {
        mover.join().expect("mover");
    }
    let mut listed: Vec<String> = redis::cmd("LRANGE")
        .arg(&a)
        .arg(0)
        .arg(-1)
        .query(&mut con)
        .expect("LRANGE");
    let other: Vec<String> = redis::cmd("LRANGE")
        .arg(&b)
        .arg(0)
        .arg(-1)
        .query(&mut con)
        .expect("LRANGE");
    listed.extend(other);
    listed.sort();
    let mut expected = elements.clone();
    expected.sort();
    assert_eq!(
        listed, expected,
        "the lists hold every element exactly once"
    );
    let mut members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&sa)
        .query(&mut con)
        .expect("SMEMBERS");
    let other: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&sb)
        .query(&mut con)
        .expect("SMEMBERS");
    let overlap = members.iter().filter(|m| other.contains(m)).count();
    assert_eq!(overlap, 0, "no member is in both sets");
    members.extend(other);
    members.sort();
    assert_eq!(members, expected, "the sets hold every member once");
}

#[test]
fn a_rename_to_a_key_too_long_for_the_elements_is_refused_and_keeps_the_source() {
    let server = Server::start("");
    let mut con = server.conn();
    let field = "f".repeat(40);
    // On one worker (the names share a tag).
    call_str(&mut con, &["HSET", "{r}h", &field, "v"]);
    let long = format!("{{r}}{}", "k".repeat(480));
    let refused = call_str(&mut con, &["RENAME", "{r}h", &long]);
    assert!(error_text(&refused).contains("longer than"), "{refused:?}");
    assert_eq!(call_str(&mut con, &["HLEN", "{r}h"]), Value::Int(1));
    assert_eq!(call_str(&mut con, &["EXISTS", &long]), Value::Int(0));
    // Across workers: the destination's prepare refuses, and nothing stays locked.
    let source = server.keys_on_worker("src", 0, 1).remove(0);
    let far = server.keys_on_worker(&"k".repeat(470), 1, 1).remove(0);
    assert!(far.len() + field.len() > 499);
    call_str(&mut con, &["HSET", &source, &field, "v"]);
    for command in ["RENAME", "COPY"] {
        let refused = call_str(&mut con, &[command, &source, &far]);
        assert!(
            error_text(&refused).contains("longer than"),
            "{command}: {refused:?}"
        );
        assert_eq!(call_str(&mut con, &["HLEN", &source]), Value::Int(1));
        assert_eq!(call_str(&mut con, &["EXISTS", &far]), Value::Int(0));
    }
    assert_eq!(call_str(&mut con, &["SHOAL.TXNS"]), Value::Int(0));
}

#[test]
fn a_lex_range_over_members_of_several_scores_answers_as_redis_does() {
    let server = Server::start("");
    let mut con = server.conn();
    call_str(&mut con, &["ZADD", "z", "-4.5", "fg", "3", ""]);
    // Redis finds the range empty: its last member (by score) is below the low end.
    assert_eq!(
        call_str(&mut con, &["ZLEXCOUNT", "z", "(a", "+"]),
        Value::Int(0)
    );
    assert_eq!(
        call_str(&mut con, &["ZRANGE", "z", "(a", "+", "BYLEX"]),
        Value::Array(vec![])
    );
    assert_eq!(
        call_str(&mut con, &["ZLEXCOUNT", "z", "-", "+"]),
        Value::Int(2)
    );
}

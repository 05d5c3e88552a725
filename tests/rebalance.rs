//! Changing the worker count moves partitions between shard environments before
//! serving, keeps every key exactly once, and survives kill -9 in the middle.

mod common;

use std::time::{Duration, Instant};

use common::Server;

const KEYS: usize = 200_000;

fn key(i: usize) -> String {
    format!("rb:{i}")
}

fn value(i: usize) -> String {
    format!("value-{i}-{}", i * 7919 % 1000)
}

fn load(server: &Server) {
    let mut con = server.conn();
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(5000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            pipe.cmd("SET").arg(key(i)).arg(value(i)).ignore();
        }
        pipe.query::<()>(&mut con).expect("pipelined SETs");
    }
}

/// Every key has its value, and DBSIZE counts each key once.
fn assert_all_present(server: &Server) {
    let mut con = server.conn();
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(5000) {
        let mut cmd = redis::cmd("MGET");
        for &i in chunk {
            cmd.arg(key(i));
        }
        let values: Vec<Option<String>> = cmd.query(&mut con).expect("MGET");
        for (&i, got) in chunk.iter().zip(values) {
            assert_eq!(got.as_deref(), Some(value(i).as_str()), "{}", key(i));
        }
    }
    let size: usize = redis::cmd("DBSIZE").query(&mut con).expect("DBSIZE");
    assert_eq!(size, KEYS, "every key is present exactly once");
}

fn assert_shard_dirs(server: &Server, workers: usize) {
    let mut shards: Vec<String> = std::fs::read_dir(&server.data_dir)
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("shard-"))
        .collect();
    shards.sort();
    let expected: Vec<String> = (0..workers).map(|i| format!("shard-{i}")).collect();
    assert_eq!(shards, expected);
}

#[test]
fn growing_then_shrinking_the_worker_count_keeps_every_key() {
    let mut server = Server::start("");
    load(&server);
    let _: () = redis::cmd("SET")
        .arg("rb:ttl")
        .arg("x")
        .arg("EX")
        .arg(1000)
        .query(&mut server.conn())
        .unwrap();
    let old_id: i64 = redis::cmd("ID.NEW").query(&mut server.conn()).unwrap();
    server.stop();

    for workers in [5, 1] {
        server.update_config(&format!("workers = {workers}\n"));
        server.spawn_and_wait();
        let status = server.status_json().unwrap();
        assert_eq!(status["workers"].as_u64(), Some(workers as u64), "{status}");
        assert!(
            status["rebalance"]["partitions_moved"].as_u64() > Some(0),
            "{status}"
        );
        // The key with a TTL is counted by DBSIZE: remove it from the count check.
        let ttl: i64 = redis::cmd("TTL")
            .arg("rb:ttl")
            .query(&mut server.conn())
            .unwrap();
        assert!(ttl > 900, "expiry kept across the move: {ttl}");
        let _: () = redis::cmd("DEL")
            .arg("rb:ttl")
            .query(&mut server.conn())
            .unwrap();
        assert_all_present(&server);
        let new_id: i64 = redis::cmd("ID.NEW").query(&mut server.conn()).unwrap();
        assert!(
            new_id > old_id,
            "ids stay unique across the move: {new_id} <= {old_id}"
        );
        assert_shard_dirs(&server, workers);
        let _: () = redis::cmd("SET")
            .arg("rb:ttl")
            .arg("x")
            .arg("EX")
            .arg(1000)
            .query(&mut server.conn())
            .unwrap();
        server.stop();
    }
}

#[test]
fn a_kill_9_in_the_middle_of_a_move_loses_and_duplicates_nothing() {
    let mut server = Server::start("");
    load(&server);
    server.stop();
    server.update_config("workers = 3\n");

    let mut killed_mid_move = 0;
    for round in 0..4 {
        server.spawn();
        // Wait until some partitions have moved (but not all), then kill everything.
        let deadline = Instant::now() + Duration::from_secs(60);
        let target = 1 + round * 20;
        loop {
            if let Ok(status) = server.status_json() {
                let moved = status["rebalance"]["partitions_moved"]
                    .as_u64()
                    .unwrap_or(0);
                let total = status["rebalance"]["partitions_total"]
                    .as_u64()
                    .unwrap_or(0);
                if total > 0 && moved >= target.min(total) {
                    killed_mid_move += usize::from(moved < total);
                    break;
                }
                if status["processes"]
                    .as_array()
                    .is_some_and(|p| p.iter().all(|p| p["state"] == "ready"))
                {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the move made no progress\n{}",
                server.logs()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        server.kill_tree();
    }
    assert!(
        killed_mid_move >= 1,
        "no kill landed in the middle of a move"
    );
    server.spawn_and_wait();
    assert_all_present(&server);
    assert_shard_dirs(&server, 3);
}

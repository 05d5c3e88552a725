//! `ID.NEW`: ids from parallel connections are all distinct, and after a kill -9
//! of the whole process tree the ids issued next are above every id issued before.

mod common;

use std::collections::HashSet;

use common::{error_text, Server};
use redis::Value;

const THREADS: usize = 8;
const CALLS_PER_THREAD: usize = 125;
const IDS_PER_CALL: usize = 1000;

/// `ID.NEW count` as a vector of ids; checks that they are positive and consecutive.
fn new_ids(con: &mut redis::Connection, count: usize) -> Vec<i64> {
    let ids = match common::call_str(con, &["ID.NEW", &count.to_string()]) {
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::Int(id) => id,
                other => panic!("ID.NEW returned a non-integer id: {other:?}"),
            })
            .collect::<Vec<i64>>(),
        other => panic!("ID.NEW {count} answered {other:?}"),
    };
    assert_eq!(ids.len(), count, "ID.NEW {count} returns {count} ids");
    assert!(ids[0] > 0, "ids are positive: {}", ids[0]);
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "one call's ids are consecutive"
    );
    ids
}

#[test]
fn a_million_ids_from_parallel_connections_are_distinct_and_new_ids_after_kill_9_are_above_them() {
    let mut server = Server::start("workers = 3\n");
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let mut con = server.conn();
            std::thread::spawn(move || {
                let mut ids = Vec::with_capacity(CALLS_PER_THREAD * IDS_PER_CALL);
                let mut last = 0;
                for _ in 0..CALLS_PER_THREAD {
                    let batch = new_ids(&mut con, IDS_PER_CALL);
                    assert!(
                        batch[0] != last,
                        "a connection never gets the same batch twice"
                    );
                    last = batch[0];
                    ids.extend(batch);
                }
                ids
            })
        })
        .collect();
    let mut seen = HashSet::with_capacity(THREADS * CALLS_PER_THREAD * IDS_PER_CALL);
    for thread in threads {
        for id in thread.join().expect("id thread") {
            assert!(seen.insert(id), "id {id} was issued twice");
        }
    }
    assert_eq!(seen.len(), THREADS * CALLS_PER_THREAD * IDS_PER_CALL);

    // Without a count: one integer. Out-of-range counts are refused.
    let mut con = server.conn();
    let single = match common::call_str(&mut con, &["ID.NEW"]) {
        Value::Int(id) => id,
        other => panic!("ID.NEW answered {other:?}"),
    };
    assert!(seen.insert(single), "id {single} was issued twice");
    for bad in ["0", "-1", "1000001", "many"] {
        let reply = common::call_str(&mut con, &["ID.NEW", bad]);
        assert!(
            error_text(&reply).starts_with("ERR"),
            "ID.NEW {bad} -> {reply:?}"
        );
    }
    let highest = *seen.iter().max().expect("ids");
    drop(con);

    // Kill -9 everything; ids issued after the restart are above every id issued before.
    server.kill_tree();
    server.restart();
    let mut con = server.conn();
    let mut after = Vec::new();
    for _ in 0..(3 * 2) {
        after.extend(new_ids(&mut con, IDS_PER_CALL));
    }
    match common::call_str(&mut con, &["ID.NEW"]) {
        Value::Int(id) => after.push(id),
        other => panic!("ID.NEW answered {other:?}"),
    }
    after.extend(new_ids(&mut con, 1_000_000));
    let lowest_after = *after.iter().min().expect("ids");
    assert!(
        lowest_after > highest,
        "an id issued after kill -9 ({lowest_after}) is not above the old ones (up to {highest})"
    );
    let distinct: HashSet<i64> = after.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        after.len(),
        "ids issued after the restart are distinct"
    );
}

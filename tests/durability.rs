//! Acknowledged writes survive crashes: kill -9 of the whole process tree, kill -9
//! of one worker under load, and a graceful SIGTERM.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{describe, key_partition, process_alive, signal, wait_until, Server};
use redis::Value;

/// Writes `count` keys `prefix{i}` = `v1-{i}` in pipelines of 1000, then overwrites
/// every 7th key with `v2-{i}` and deletes every 13th. Returns the expected contents.
fn write_keys(
    con: &mut redis::Connection,
    prefix: &str,
    count: usize,
) -> Vec<(String, Option<String>)> {
    let mut expected: Vec<(String, Option<String>)> = (0..count)
        .map(|i| (format!("{prefix}{i}"), Some(format!("v1-{i}"))))
        .collect();
    for chunk in expected.chunks(1000) {
        let mut pipe = redis::pipe();
        for (key, value) in chunk {
            pipe.cmd("SET").arg(key).arg(value.as_deref().unwrap());
        }
        let replies: Vec<Value> = pipe.query(con).expect("pipelined SETs");
        assert!(
            replies.iter().all(|r| *r == Value::Okay),
            "every SET is acknowledged with OK"
        );
    }
    let mut pipe = redis::pipe();
    for (i, (key, value)) in expected.iter_mut().enumerate() {
        if i % 13 == 0 {
            pipe.cmd("DEL").arg(&*key);
            *value = None;
        } else if i % 7 == 0 {
            *value = Some(format!("v2-{i}"));
            pipe.cmd("SET").arg(&*key).arg(value.as_deref().unwrap());
        }
    }
    let replies: Vec<Value> = pipe.query(con).expect("overwrites and deletes");
    assert!(
        replies
            .iter()
            .all(|r| *r == Value::Okay || *r == Value::Int(1)),
        "overwrites and deletes acknowledged"
    );
    expected
}

/// Checks every key with MGET, in batches.
fn assert_contents(con: &mut redis::Connection, expected: &[(String, Option<String>)]) {
    let mut missing = Vec::new();
    for chunk in expected.chunks(1000) {
        let mut cmd = redis::cmd("MGET");
        for (key, _) in chunk {
            cmd.arg(key);
        }
        let values: Vec<Option<String>> = cmd.query(con).expect("MGET");
        assert_eq!(values.len(), chunk.len());
        for ((key, want), got) in chunk.iter().zip(values) {
            if *want != got {
                missing.push(format!("{key}: want {want:?}, got {got:?}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} keys differ, first: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
}

#[test]
fn ten_thousand_keys_survive_kill_9_of_the_whole_tree() {
    let mut server = Server::start("");
    let mut con = server.conn();
    let expected = write_keys(&mut con, "durable:", 10_000);
    let live = expected.iter().filter(|(_, v)| v.is_some()).count() as i64;
    assert_eq!(
        redis::cmd("DBSIZE").query::<i64>(&mut con).expect("DBSIZE"),
        live
    );
    drop(con);

    server.kill_tree();
    server.restart();
    let mut con = server.conn();
    assert_contents(&mut con, &expected);
    assert_eq!(
        redis::cmd("DBSIZE").query::<i64>(&mut con).expect("DBSIZE"),
        live
    );
}

#[test]
fn async_durability_survives_a_process_crash() {
    // A flush interval far beyond the test: only the process crash is simulated,
    // and LMDB's writes are in the page cache already.
    let mut server =
        Server::start("[storage]\ndurability = \"async\"\nflush_interval_ms = 600000\n");
    let mut con = server.conn();
    let expected = write_keys(&mut con, "async:", 2_000);
    drop(con);
    server.kill_tree();
    server.restart();
    assert_contents(&mut server.conn(), &expected);
}

#[test]
fn the_map_grows_on_demand() {
    // 1 MiB initial maps, then about 8 MiB of values: each worker must grow its map.
    let mut server = Server::start("[storage]\nmap_size_bytes = 1048576\n");
    let mut con = server.conn();
    let value = |i: usize| format!("{i:06}").repeat(32 * 1024 / 6);
    for batch in 0..4 {
        let mut pipe = redis::pipe();
        for i in batch * 64..(batch + 1) * 64 {
            pipe.cmd("SET").arg(format!("big:{i}")).arg(value(i));
        }
        let replies: Vec<Value> = pipe.query(&mut con).expect("pipelined SETs");
        assert!(
            replies.iter().all(|r| *r == Value::Okay),
            "{:?}",
            replies.iter().find(|r| **r != Value::Okay)
        );
    }
    let expected: Vec<(String, Option<String>)> = (0..256)
        .map(|i| (format!("big:{i}"), Some(value(i))))
        .collect();
    assert_contents(&mut con, &expected);
    drop(con);
    server.kill_tree();
    server.restart();
    assert_contents(&mut server.conn(), &expected);
}

#[test]
fn sigterm_drains_exits_0_and_keeps_every_acknowledged_write() {
    for durability in ["fsync", "async"] {
        let mut server = Server::start(&format!("[storage]\ndurability = \"{durability}\"\n"));
        let mut con = server.conn();
        let expected = write_keys(&mut con, "term:", 1_000);

        // A client keeps writing while the server is told to stop.
        let acked = Arc::new(Mutex::new(Vec::new()));
        let writer = {
            let acked = Arc::clone(&acked);
            let mut con = server.conn();
            thread::spawn(move || {
                for i in 0..100_000 {
                    let key = format!("during-term:{i}");
                    match redis::cmd("SET").arg(&key).arg(i).query::<Value>(&mut con) {
                        Ok(Value::Okay) => acked.lock().unwrap().push(key),
                        _ => return,
                    }
                }
            })
        };
        wait_until(
            "the writer to be under way before the stop",
            Duration::from_secs(30),
            || match acked.lock().unwrap().len() {
                done if done >= 100 => Ok(()),
                done => Err(format!("{done} writes acknowledged")),
            },
        );
        let children: Vec<i32> = server.status_json().expect("status")["processes"]
            .as_array()
            .expect("processes")
            .iter()
            .filter_map(|p| p["pid"].as_i64())
            .map(|p| p as i32)
            .collect();
        let status = server.stop();
        assert_eq!(
            status.code(),
            Some(0),
            "shoal serve after SIGTERM ({durability}): {}\n{}",
            describe(&status),
            server.logs()
        );
        writer.join().expect("writer thread");
        for pid in children {
            assert!(
                !process_alive(pid),
                "child {pid} still running after the supervisor exited"
            );
        }

        server.restart();
        let mut con = server.conn();
        assert_contents(&mut con, &expected);
        let acked = acked.lock().unwrap().clone();
        assert!(
            !acked.is_empty(),
            "the writer got some writes in before the stop"
        );
        let during: Vec<(String, Option<String>)> = acked
            .iter()
            .map(|k| {
                (
                    k.clone(),
                    Some(k.trim_start_matches("during-term:").to_string()),
                )
            })
            .collect();
        assert_contents(&mut con, &during);
    }
}

#[test]
fn sigint_is_a_graceful_stop_too() {
    let mut server = Server::start("");
    let mut con = server.conn();
    let expected = write_keys(&mut con, "int:", 200);
    drop(con);
    let status = server.stop_with(libc::SIGINT);
    assert_eq!(
        status.code(),
        Some(0),
        "after SIGINT: {}",
        describe(&status)
    );
    server.restart();
    assert_contents(&mut server.conn(), &expected);
}

/// Outcome of one timed request.
enum Outcome {
    Ok,
    TryAgain,
    Other(String),
}

fn timed_set(con: &mut redis::Connection, key: &str, value: &str) -> (Outcome, Duration) {
    let started = Instant::now();
    let result = redis::cmd("SET").arg(key).arg(value).query::<Value>(con);
    let outcome = match result {
        Ok(Value::Okay) => Outcome::Ok,
        Ok(other) => Outcome::Other(format!("{other:?}")),
        Err(e) if e.code() == Some("TRYAGAIN") => Outcome::TryAgain,
        Err(e) => Outcome::Other(e.to_string()),
    };
    (outcome, started.elapsed())
}

/// A connection whose requests give up after `timeout`, so a hang shows as an error.
fn conn_with_timeout(server: &Server, timeout: Duration) -> redis::Connection {
    let con = server.conn();
    con.set_read_timeout(Some(timeout)).expect("read timeout");
    con
}

#[test]
fn a_killed_worker_costs_only_its_partitions_and_loses_no_acknowledged_write() {
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
    let server = Server::start("");
    let (workers, partitions) = (server.workers, server.partitions);
    let victim = 1usize;
    let victim_pid = server.worker_pid(victim as u64);
    let survivor_pid = server.worker_pid(0);

    // A client loop writes fresh keys on every partition and records what was acknowledged.
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<String>::new()));
    let problems = Arc::new(Mutex::new(Vec::<String>::new()));
    let tryagain_seen = Arc::new(Mutex::new(0usize));
    let writer = {
        let (stop, acked, problems, tryagain_seen) = (
            Arc::clone(&stop),
            Arc::clone(&acked),
            Arc::clone(&problems),
            Arc::clone(&tryagain_seen),
        );
        let mut con = conn_with_timeout(&server, REQUEST_TIMEOUT);
        thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("load:{i}");
                let worker = key_partition(key.as_bytes(), partitions) as usize % workers;
                let (outcome, took) = timed_set(&mut con, &key, &format!("value-{i}"));
                match outcome {
                    Outcome::Ok => acked.lock().unwrap().push(key),
                    Outcome::TryAgain if worker == victim => *tryagain_seen.lock().unwrap() += 1,
                    Outcome::TryAgain => problems
                        .lock()
                        .unwrap()
                        .push(format!("TRYAGAIN for {key} on the live worker {worker}")),
                    Outcome::Other(e) => {
                        problems
                            .lock()
                            .unwrap()
                            .push(format!("SET {key} (worker {worker}) after {took:?}: {e}"));
                        return;
                    }
                }
                i += 1;
            }
        })
    };
    wait_until(
        "the writer to make progress before the kill",
        Duration::from_secs(30),
        || match acked.lock().unwrap().len() {
            done if done >= 100 => Ok(()),
            done => Err(format!(
                "{done} writes acknowledged; problems: {:?}",
                problems.lock().unwrap()
            )),
        },
    );
    let before_kill = acked.lock().unwrap().len();
    assert!(
        before_kill > 0,
        "the writer made progress before the kill: {:?}",
        problems.lock().unwrap()
    );

    signal(victim_pid, libc::SIGKILL);
    let killed_at = Instant::now();

    // While the worker is gone and coming back, the other worker's keys keep answering,
    // and the victim's keys answer too (OK or TRYAGAIN), never hang.
    let mut probe = conn_with_timeout(&server, REQUEST_TIMEOUT);
    let survivor_keys = server.keys_on_worker("probe-live:", 0, 1000);
    let victim_keys = server.keys_on_worker("probe-dead:", victim, 1000);
    let mut recovered = None;
    let mut probes = 0;
    while killed_at.elapsed() < Duration::from_secs(20) {
        let (outcome, took) = timed_set(&mut probe, &survivor_keys[probes % 1000], "x");
        match outcome {
            Outcome::Ok => {}
            Outcome::TryAgain => panic!("a key of the live worker got TRYAGAIN after {took:?}"),
            Outcome::Other(e) => panic!("a key of the live worker failed after {took:?}: {e}"),
        }
        let (outcome, took) = timed_set(&mut probe, &victim_keys[probes % 1000], "x");
        if let Outcome::Other(e) = outcome {
            panic!("a key of the dead worker got neither OK nor TRYAGAIN after {took:?}: {e}");
        }
        assert!(
            took < Duration::from_secs(2),
            "a request to the dead worker took {took:?}"
        );
        probes += 1;
        if probes % 5 == 0 {
            if let Ok(status) = server.status_json() {
                let worker = common::find_process(&status, "shard-worker", victim as u64)
                    .cloned()
                    .unwrap_or_default();
                let pid = worker["pid"].as_i64().unwrap_or(0) as i32;
                if worker["state"] == "ready" && pid != victim_pid && pid > 0 {
                    recovered = Some(worker);
                    break;
                }
            }
        }
    }
    let worker =
        recovered.unwrap_or_else(|| panic!("worker {victim} was not back and ready within 20 s"));
    assert!(
        worker["restarts"].as_u64().unwrap_or(0) >= 1,
        "restarts counted: {worker}"
    );
    assert!(process_alive(worker["pid"].as_i64().unwrap() as i32));
    let survivor = server.process_status("shard-worker", 0);
    assert_eq!(
        survivor["pid"].as_i64(),
        Some(i64::from(survivor_pid)),
        "the other worker was not restarted: {survivor}"
    );
    assert_eq!(survivor["restarts"].as_u64(), Some(0), "{survivor}");

    // Let the writer run on the recovered worker until it has acknowledged writes there,
    // then stop it.
    let recovered_at = acked.lock().unwrap().len();
    wait_until(
        "writes acknowledged on the recovered worker",
        Duration::from_secs(30),
        || {
            let on_victim = acked.lock().unwrap()[recovered_at..]
                .iter()
                .filter(|k| key_partition(k.as_bytes(), partitions) as usize % workers == victim)
                .count();
            if on_victim >= 20 {
                Ok(())
            } else {
                Err(format!(
                    "{on_victim} writes acknowledged on worker {victim}; problems: {:?}",
                    problems.lock().unwrap()
                ))
            }
        },
    );
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread");
    let problems = problems.lock().unwrap().clone();
    assert!(problems.is_empty(), "writer problems: {problems:?}");

    // Every acknowledged write is there, on both workers.
    let acked = acked.lock().unwrap().clone();
    let on_victim = acked
        .iter()
        .filter(|k| key_partition(k.as_bytes(), partitions) as usize % workers == victim)
        .count();
    assert!(
        on_victim > 0 && on_victim < acked.len(),
        "writes reached both workers ({on_victim} of {})",
        acked.len()
    );
    let expected: Vec<(String, Option<String>)> = acked
        .iter()
        .map(|k| {
            (
                k.clone(),
                Some(format!("value-{}", k.trim_start_matches("load:"))),
            )
        })
        .collect();
    let mut con = server.conn();
    assert_contents(&mut con, &expected);
    for key in &victim_keys[..3] {
        assert_eq!(
            redis::cmd("SET")
                .arg(key)
                .arg("after")
                .query::<Value>(&mut con)
                .expect("SET"),
            Value::Okay
        );
    }
    eprintln!(
        "acknowledged {} writes ({} before the kill), {} TRYAGAIN replies from the dead worker, {probes} probe rounds",
        acked.len(),
        before_kill,
        tryagain_seen.lock().unwrap()
    );
}

#[test]
fn a_dead_worker_answers_tryagain_while_it_is_not_restarted() {
    // Hold the supervisor stopped so that the worker stays dead for a known time.
    let server = Server::start("");
    let victim_pid = server.worker_pid(1);
    let survivor_keys = server.keys_on_worker("live:", 0, 50);
    let victim_keys = server.keys_on_worker("dead:", 1, 50);
    let mut con = conn_with_timeout(&server, Duration::from_secs(3));
    for key in victim_keys.iter().chain(&survivor_keys) {
        assert_eq!(
            redis::cmd("SET")
                .arg(key)
                .arg("before")
                .query::<Value>(&mut con)
                .expect("SET"),
            Value::Okay
        );
    }

    signal(server.pid(), libc::SIGSTOP);
    struct Resume(i32);
    impl Drop for Resume {
        fn drop(&mut self) {
            signal(self.0, libc::SIGCONT);
        }
    }
    let resume = Resume(server.pid());
    signal(victim_pid, libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(victim_pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    // The net-daemon has seen the worker's link close once a key of it answers TRYAGAIN.
    let mut probe = conn_with_timeout(&server, Duration::from_secs(3));
    wait_until(
        "the net-daemon to answer TRYAGAIN for a key of the dead worker",
        Duration::from_secs(10),
        || match redis::cmd("GET")
            .arg(&victim_keys[0])
            .query::<Option<String>>(&mut probe)
        {
            Err(e) if e.code() == Some("TRYAGAIN") => Ok(()),
            Err(e) if e.is_io_error() || e.is_timeout() => {
                probe = conn_with_timeout(&server, Duration::from_secs(3));
                Err(e.to_string())
            }
            other => Err(format!("{other:?}")),
        },
    );

    let mut tryagain = 0;
    for (live, dead) in survivor_keys.iter().zip(&victim_keys).take(20) {
        let started = Instant::now();
        let reply = redis::cmd("GET")
            .arg(dead)
            .query::<Option<String>>(&mut con);
        let took = started.elapsed();
        match reply {
            Err(e) if e.code() == Some("TRYAGAIN") => tryagain += 1,
            other => panic!(
                "GET of a key on the dead worker: expected TRYAGAIN, got {other:?} after {took:?}"
            ),
        }
        assert!(took < Duration::from_secs(1), "TRYAGAIN took {took:?}");
        let reply = redis::cmd("SET")
            .arg(dead)
            .arg("during")
            .query::<Value>(&mut con);
        assert!(
            matches!(&reply, Err(e) if e.code() == Some("TRYAGAIN")),
            "SET on the dead worker: {reply:?}"
        );
        let value: Option<String> = redis::cmd("GET")
            .arg(live)
            .query(&mut con)
            .expect("GET on the live worker");
        assert_eq!(value.as_deref(), Some("before"));
        assert_eq!(
            redis::cmd("SET")
                .arg(live)
                .arg("during")
                .query::<Value>(&mut con)
                .expect("SET live"),
            Value::Okay
        );
    }
    assert_eq!(tryagain, 20);
    // A multi-key command touching the dead worker fails clearly instead of hanging.
    let started = Instant::now();
    let reply = redis::cmd("MGET")
        .arg(&survivor_keys[0])
        .arg(&victim_keys[0])
        .query::<Value>(&mut con);
    assert!(reply.is_err(), "MGET over a dead worker: {reply:?}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // Let the supervisor run again: it restarts the worker by itself.
    drop(resume);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match redis::cmd("GET")
            .arg(&victim_keys[0])
            .query::<Option<String>>(&mut con)
        {
            Ok(value) => {
                assert_eq!(
                    value.as_deref(),
                    Some("before"),
                    "the failed SET during the outage stored nothing"
                );
                break;
            }
            Err(e) if e.code() == Some("TRYAGAIN") && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("worker did not come back: {e}"),
        }
    }
    let worker = server.process_status("shard-worker", 1);
    assert!(worker["restarts"].as_u64().unwrap_or(0) >= 1, "{worker}");
    for key in &victim_keys {
        let value: Option<String> = redis::cmd("GET")
            .arg(key)
            .query(&mut con)
            .expect("GET after recovery");
        assert_eq!(value.as_deref(), Some("before"), "{key}");
    }
}

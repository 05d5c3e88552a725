//! GET and MGET are answered from the shards' LMDB maps by the net-daemon: they keep
//! working while a worker is paused, they see the writes sent before them in the same
//! pipeline, and they follow the map as the worker grows it.

mod common;

use std::time::{Duration, Instant};

use common::{encode_command, signal, wait_until, Resp, Server};

#[test]
fn reads_are_answered_while_the_worker_is_paused_and_writes_wait_for_it() {
    let server = Server::start("workers = 1\n");
    let mut conn = server.raw();
    assert_eq!(conn.cmd(&["SET", "k", "v"]), Resp::Simple("OK".into()));
    assert_eq!(conn.cmd(&["SET", "k2", "v2"]), Resp::Simple("OK".into()));
    // With write-back, the map shows the writes once the worker has committed them in
    // LMDB (within `storage.writeback_ms`); until then reads go through the worker.
    wait_until(
        "the worker to commit its writes in LMDB",
        Duration::from_secs(10),
        || match server.process_status("shard-worker", 0)["unsettled"].as_bool() {
            Some(false) => Ok(()),
            other => Err(format!("unsettled: {other:?}")),
        },
    );

    let worker = server.worker_pid(0);
    signal(worker, libc::SIGSTOP);
    let started = Instant::now();
    let get = conn.cmd(&["GET", "k"]);
    let mget = conn.cmd(&["MGET", "k", "missing", "k2"]);
    let read_time = started.elapsed();

    // A write needs the worker: it is still waiting when the worker resumes.
    let mut writer = server.raw();
    writer.send(&encode_command(&[b"SET", b"k", b"new"]));
    writer.set_read_timeout(Duration::from_millis(300));
    let write_waited = writer.read_reply().is_err();
    signal(worker, libc::SIGCONT);
    writer.set_read_timeout(Duration::from_secs(10));

    assert_eq!(get, Resp::Bulk(b"v".to_vec()));
    assert_eq!(
        mget,
        Resp::Array(vec![
            Resp::Bulk(b"v".to_vec()),
            Resp::NilBulk,
            Resp::Bulk(b"v2".to_vec())
        ])
    );
    assert!(
        read_time < Duration::from_secs(1),
        "reads did not need the paused worker ({read_time:?})"
    );
    assert!(write_waited, "a write waits for its worker");
    assert_eq!(
        writer.read_reply().expect("SET reply"),
        Resp::Simple("OK".into())
    );
    assert_eq!(conn.cmd(&["GET", "k"]), Resp::Bulk(b"new".to_vec()));
}

#[test]
fn a_pipelined_read_sees_the_writes_sent_before_it() {
    let server = Server::start("");
    let mut conn = server.raw();
    let rounds = 500;
    let mut pipeline = Vec::new();
    for i in 0..rounds {
        let key = format!("p:{i}");
        let value = format!("v{i}");
        pipeline.extend(encode_command(&[b"SET", key.as_bytes(), value.as_bytes()]));
        pipeline.extend(encode_command(&[b"GET", key.as_bytes()]));
        pipeline.extend(encode_command(&[b"INCR", b"counter"]));
        pipeline.extend(encode_command(&[b"MGET", key.as_bytes(), b"counter"]));
    }
    conn.send(&pipeline);
    for i in 0..rounds {
        let value = format!("v{i}").into_bytes();
        assert_eq!(conn.read_reply().unwrap(), Resp::Simple("OK".into()));
        assert_eq!(conn.read_reply().unwrap(), Resp::Bulk(value.clone()));
        assert_eq!(conn.read_reply().unwrap(), Resp::Int(i + 1));
        assert_eq!(
            conn.read_reply().unwrap(),
            Resp::Array(vec![
                Resp::Bulk(value),
                Resp::Bulk((i + 1).to_string().into_bytes())
            ])
        );
    }
}

#[test]
fn reads_follow_the_map_as_the_worker_grows_it() {
    // A 1 MiB map that the worker doubles as 16 MiB of values arrive.
    let server = Server::start("workers = 1\n[storage]\nmap_size_bytes = 1048576\n");
    let mut conn = server.raw();
    let value = vec![b'x'; 16 * 1024];
    let data_file = server.data_dir.join("shard-0").join("data.mdb");
    for i in 0..1024 {
        let key = format!("grow:{i}");
        assert_eq!(
            conn.cmd_bytes(&[b"SET", key.as_bytes(), &value]),
            Resp::Simple("OK".into())
        );
        if i % 64 == 63 {
            // Every key written so far reads back through the grown map.
            for j in (0..=i).step_by(7) {
                let key = format!("grow:{j}");
                assert_eq!(
                    conn.cmd(&["GET", &key]),
                    Resp::Bulk(value.clone()),
                    "{key} after {i} writes"
                );
            }
        }
    }
    // The last keys are read from the grown map itself, not through the worker.
    let worker = server.worker_pid(0);
    signal(worker, libc::SIGSTOP);
    conn.set_read_timeout(Duration::from_secs(2));
    conn.send(&encode_command(&[b"GET", b"grow:1023"]));
    let last = conn.read_reply();
    signal(worker, libc::SIGCONT);
    assert_eq!(
        last.expect("GET while the worker is paused"),
        Resp::Bulk(value)
    );
    let size = std::fs::metadata(&data_file).expect("data.mdb").len();
    assert!(
        size > 8 << 20,
        "the map grew well past its first 1 MiB ({size} bytes)"
    );
}

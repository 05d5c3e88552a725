//! Write-back (`storage.writeback_ms`): writes acknowledged from the journal while
//! LMDB has not committed them are read by every path, survive kill -9 of their
//! worker, and are in backups and digests; reads of the other keys still go straight
//! to the map.

mod common;

use std::time::Duration;

use common::{encode_command, signal, wait_until, RawConn, Resp, Server};
use redis::Value;

/// A window far beyond the test, and no commit when writes pause: LMDB commits only
/// when something asks it to.
const LONG_WINDOW: &str =
    "[storage]\nwriteback_ms = 10000\nwriteback_idle_ms = 0\nwriteback_min_free_bytes = 0\n";

fn unsettled(server: &Server, worker: u64) -> bool {
    server.process_status("shard-worker", worker)["unsettled"]
        .as_bool()
        .expect("the status shows whether a worker holds unsettled writes")
}

/// Waits (5 s at most) until `worker` holds no unsettled writes.
fn wait_settled(server: &Server, worker: u64, what: &str) {
    wait_until(what, Duration::from_secs(5), || {
        match unsettled(server, worker) {
            false => Ok(()),
            true => Err("still unsettled".to_string()),
        }
    });
}

/// Runs `shoal <verb> <dir>` with `server`'s config, which must succeed.
fn shoal(server: &Server, verb: &str, dir: &std::path::Path) {
    let output = server.run_verb(verb, dir);
    assert!(
        output.status.success(),
        "shoal {verb}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn set_all(con: &mut redis::Connection, keys: &[String], value: &str) {
    for key in keys {
        assert_eq!(
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .query::<Value>(con)
                .expect("SET"),
            Value::Okay
        );
    }
}

fn assert_all(con: &mut redis::Connection, keys: &[String], value: &str) {
    let values: Vec<Option<String>> = redis::cmd("MGET").arg(keys).query(con).expect("MGET");
    assert!(
        values.iter().all(|v| v.as_deref() == Some(value)),
        "MGET: {values:?}"
    );
    for key in keys {
        let got: Option<String> = redis::cmd("GET").arg(key).query(con).expect("GET");
        assert_eq!(got.as_deref(), Some(value), "GET {key}");
    }
}

#[test]
fn unsettled_writes_are_read_back_at_once_and_survive_kill_9_of_their_worker() {
    let server = Server::start(LONG_WINDOW);
    let keys = server.keys_on_worker("wb:", 1, 40);
    let mut con = server.conn();
    set_all(&mut con, &keys, "one");
    assert!(unsettled(&server, 1), "worker 1 holds the writes back");
    // The net-daemon reads the shard through its worker: every read sees every write.
    assert_all(&mut con, &keys, "one");
    set_all(&mut con, &keys[..10], "two");
    let exists: i64 = redis::cmd("EXISTS").arg(&keys).query(&mut con).unwrap();
    assert_eq!(exists, keys.len() as i64);
    let watched: Vec<Value> = {
        redis::cmd("WATCH")
            .arg(&keys[0])
            .query::<()>(&mut con)
            .unwrap();
        redis::pipe()
            .atomic()
            .cmd("GET")
            .arg(&keys[0])
            .query(&mut con)
            .expect("EXEC")
    };
    assert_eq!(watched, vec![Value::BulkString(b"two".to_vec())]);

    // Killed with the writes still unsettled: its successor replays them.
    let victim = server.worker_pid(1);
    assert!(unsettled(&server, 1));
    signal(victim, libc::SIGKILL);
    wait_until(
        "the worker's successor to answer",
        Duration::from_secs(30),
        || match redis::cmd("GET")
            .arg(&keys[0])
            .query::<Option<String>>(&mut con)
        {
            Ok(value) => Ok(value),
            Err(error) if error.is_io_error() => {
                con = server.conn();
                Err(error.to_string())
            }
            Err(error) => Err(error.to_string()),
        },
    );
    assert_ne!(server.worker_pid(1), victim);
    assert!(!unsettled(&server, 1), "the successor replayed them");
    assert_all(&mut con, &keys[..10], "two");
    assert_all(&mut con, &keys[10..], "one");
    assert!(
        server.logs().contains("replaying the journal"),
        "the successor replayed its journal"
    );
}

#[test]
fn a_digest_and_a_backup_hold_the_unsettled_writes() {
    let server = Server::start(LONG_WINDOW);
    let keys = server.keys_on_worker("dg:", 0, 20);
    let partition = server.partition_of(keys[0].as_bytes());
    let same: Vec<String> = keys
        .iter()
        .filter(|k| server.partition_of(k.as_bytes()) == partition)
        .cloned()
        .collect();
    let mut con = server.conn();
    let digest = |con: &mut redis::Connection| -> (i64, i64) {
        let reply: (i64, i64, String) = redis::cmd("SHOAL.DIGEST")
            .arg(partition)
            .query(con)
            .expect("SHOAL.DIGEST");
        (reply.0, reply.1)
    };
    let (_, before) = digest(&mut con);
    set_all(&mut con, &same, "x");
    assert!(unsettled(&server, 0));
    let (last_commit_id, after) = digest(&mut con);
    assert_eq!(
        after,
        before + same.len() as i64,
        "the digest counts every key"
    );
    assert!(last_commit_id > 0);
    assert!(!unsettled(&server, 0), "the digest settled the worker");

    set_all(&mut con, &keys, "y");
    assert!(unsettled(&server, 0));
    let backup = server.dir.path().join("backup");
    shoal(&server, "backup", &backup);
    // Restored into a data dir of its own, the copy holds the last writes.
    let mut restored = Server::configure(LONG_WINDOW);
    shoal(&restored, "restore", &backup);
    restored.spawn_and_wait();
    assert_all(&mut restored.conn(), &keys, "y");
}

#[test]
fn a_pause_in_writes_commits_them_before_the_window_is_over() {
    // A 10 s window, and the default pause of 20 ms: the worker commits soon after the
    // writes stop, and the net-daemon reads the map directly again.
    let server = Server::start("[storage]\nwriteback_ms = 10000\nwriteback_min_free_bytes = 0\n");
    let keys = server.keys_on_worker("idle:", 0, 10);
    let mut con = server.conn();
    set_all(&mut con, &keys, "v");
    wait_settled(&server, 0, "the worker to commit after the writes paused");
    assert_all(&mut con, &keys, "v");
}

/// Sends GET `key` on `conn` while the worker is paused: whether the net-daemon
/// answered it from the map (within 2 s), or left it to the worker (no reply within
/// 300 ms; the caller resumes the worker and reads the reply).
fn answered_while_paused(conn: &mut RawConn, key: &str) -> Option<Resp> {
    conn.send(&encode_command(&[b"GET", key.as_bytes()]));
    conn.set_read_timeout(Duration::from_millis(300));
    let reply = conn.read_reply().ok();
    conn.set_read_timeout(Duration::from_secs(10));
    reply
}

#[test]
fn reads_of_keys_without_unsettled_writes_go_straight_to_the_map() {
    let server = Server::start(LONG_WINDOW);
    let keys = server.keys_on_worker("pk:", 0, 20);
    let other = server.keys_on_worker("pk:", 1, 1);
    let mut con = server.conn();
    set_all(&mut con, &keys, "old");
    // SHOAL.DIGEST commits the worker's batches first: LMDB holds them all.
    let partition = server.partition_of(keys[0].as_bytes());
    redis::cmd("SHOAL.DIGEST")
        .arg(partition)
        .query::<Value>(&mut con)
        .expect("SHOAL.DIGEST");
    assert!(!unsettled(&server, 0));
    set_all(&mut con, &keys[..5], "new");
    assert!(unsettled(&server, 0));

    // With the worker paused, the keys written since are left to it, and the others
    // are read from the map.
    let worker = server.worker_pid(0);
    signal(worker, libc::SIGSTOP);
    let mut untouched = server.raw();
    let untouched_reply = answered_while_paused(&mut untouched, &keys[10]);
    let mut pending = server.raw();
    let pending_reply = answered_while_paused(&mut pending, &keys[0]);
    signal(worker, libc::SIGCONT);
    assert_eq!(untouched_reply, Some(Resp::Bulk(b"old".to_vec())));
    assert_eq!(
        pending_reply, None,
        "a key with an unsettled write waits for its worker"
    );
    assert_eq!(
        pending.read_reply().expect("GET reply"),
        Resp::Bulk(b"new".to_vec())
    );
    assert_all(&mut con, &keys[..5], "new");
    assert_all(&mut con, &keys[5..], "old");
    // Reads that had to go to the worker make it commit soon, far within its window.
    wait_settled(
        &server,
        0,
        "the worker to commit once reads of its unsettled keys came",
    );

    // In a pipeline, a GET after one that went to the worker waits for its answer,
    // then reads the map: the worker serves one of the two.
    set_all(&mut con, &keys[..5], "three");
    let ops = |server: &Server| {
        server.process_status("shard-worker", 0)["ops"]
            .as_u64()
            .unwrap()
    };
    let before = ops(&server);
    let mut pipelined = server.raw();
    let mut both = encode_command(&[b"GET", keys[0].as_bytes()]);
    both.extend(encode_command(&[b"GET", keys[10].as_bytes()]));
    pipelined.send(&both);
    assert_eq!(
        pipelined.read_reply().unwrap(),
        Resp::Bulk(b"three".to_vec())
    );
    assert_eq!(pipelined.read_reply().unwrap(), Resp::Bulk(b"old".to_vec()));
    assert_eq!(
        ops(&server) - before,
        1,
        "the second GET was read from the map"
    );
    wait_settled(&server, 0, "the worker to commit");

    // A transaction's intents lock keys through a record the map does not show yet:
    // after an MSET across both workers, every read of the shard needs the worker.
    let mset: Value = redis::cmd("MSET")
        .arg(&keys[1])
        .arg("tx")
        .arg(&other[0])
        .arg("tx")
        .query(&mut con)
        .expect("MSET");
    assert_eq!(mset, Value::Okay);
    signal(worker, libc::SIGSTOP);
    let mut shard = server.raw();
    let shard_reply = answered_while_paused(&mut shard, &keys[15]);
    signal(worker, libc::SIGCONT);
    assert_eq!(
        shard_reply, None,
        "the whole shard is read through its worker"
    );
    assert_eq!(
        shard.read_reply().expect("GET reply"),
        Resp::Bulk(b"old".to_vec())
    );
    assert_all(&mut con, &keys[1..2], "tx");
}

/// How many keys collection 0 of `worker`'s environment holds, read from a separate
/// read-only environment handle: what LMDB has committed.
fn committed_keys(server: &Server, worker: usize) -> u64 {
    let dir = server.data_dir.join(format!("shard-{worker}"));
    let collections = shoal_shared::config::StorageSection::default().collections;
    let mut options = shoal_shared::lmdb::env_options(collections);
    // SAFETY: opened read-only, once, in this process; the worker writes it meanwhile,
    // as LMDB allows.
    let env = unsafe {
        options
            .flags(heed::EnvFlags::READ_ONLY)
            .open(&dir)
            .expect("open the shard read-only")
    };
    let db = shoal_shared::lmdb::open_database_if_present(&env, "c0")
        .expect("open c0")
        .expect("c0 exists");
    let txn = env.read_txn().expect("read txn");
    db.len(&txn).expect("count c0")
}

#[test]
fn past_writeback_max_changes_the_window_is_committed_before_it_is_over() {
    // A 10 s window and no commit on a pause: only the limit on changes commits it.
    let limited = format!("{LONG_WINDOW}writeback_max_changes = 1000\n");
    for (config, commits) in [(LONG_WINDOW.to_string(), false), (limited, true)] {
        let server = Server::start(&config);
        let keys = server.keys_on_worker("limit:", 0, 600);
        set_all(&mut server.conn(), &keys, "v");
        // 600 SETs are about 2,400 changes: past 1,000, not past the default 25,000.
        let committed = committed_keys(&server, 0);
        match commits {
            true => assert!(
                committed >= 200,
                "{committed} keys committed with the limit"
            ),
            false => assert_eq!(committed, 0, "keys committed within the default limit"),
        }
        assert_all(&mut server.conn(), &keys, "v");
    }
}

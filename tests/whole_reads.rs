//! Reads of keys on several workers are seen whole, on a real Shoal with 3 workers:
//! an MGET, EXISTS, read-only EXEC, SUNION or SINTER that runs beside multi-key writes
//! whose keys span every worker (MSET, EXEC, DEL of many keys, SMOVE) never sees part
//! of one; and a STORE form is one atomic change, so a write to its destination made
//! while it runs is never lost.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{call_str, error_text, Server};
use redis::{ConnectionLike, Value};

const WORKERS: usize = 3;
/// Writes each writer thread makes.
const WRITES: usize = 400;
/// How many times a writer sends a write again after `TRYAGAIN`.
const MAX_RETRIES: usize = 20;
/// Keys of a group: key `i` lives on worker `i % WORKERS`.
const GROUP: usize = 8;

fn group(server: &Server, prefix: &str) -> Vec<String> {
    (0..GROUP)
        .map(|i| {
            server
                .keys_on_worker(&format!("{prefix}:{i}:"), i % WORKERS, 1)
                .remove(0)
        })
        .collect()
}

fn cmd(args: &[&str]) -> redis::Cmd {
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    cmd
}

fn with_keys(name: &str, keys: &[String]) -> Vec<String> {
    std::iter::once(name.to_string())
        .chain(keys.iter().cloned())
        .collect()
}

/// Whether `reply` is a `-TRYAGAIN` error (a read or store that could not settle).
fn tryagain(reply: &Value) -> bool {
    matches!(reply, Value::ServerError(_)) && error_text(reply).starts_with("TRYAGAIN")
}

/// Runs `read` until `done`, at least `min` times; returns how many reads it checked.
fn reader(done: &AtomicBool, min: usize, mut read: impl FnMut() -> bool) -> usize {
    let mut checked = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while (!done.load(Ordering::Relaxed) || checked < min) && Instant::now() < deadline {
        if read() {
            checked += 1;
        }
    }
    checked
}

#[test]
fn reads_across_workers_never_see_part_of_a_multi_key_write() {
    let server = Server::start(&format!("workers = {WORKERS}\n"));
    let values = group(&server, "whole");
    let presence = group(&server, "present");
    let strs = |keys: &[String]| keys.to_vec();
    let done = Arc::new(AtomicBool::new(false));
    let writers_left = Arc::new(AtomicUsize::new(3));

    // Writers: MSETs and EXECs of the whole value group (every key the same value), and
    // MSET / DEL of the whole presence group.
    let mut writers = Vec::new();
    for writer in 0..2 {
        let (client, keys, done, left) = (
            server.client(),
            strs(&values),
            Arc::clone(&done),
            Arc::clone(&writers_left),
        );
        writers.push(thread::spawn(move || {
            let mut con = common::connect(&client);
            let mut retried = 0;
            for n in 0..WRITES {
                let value = format!("{writer}-{n}");
                let mut write = || {
                    if writer == 0 {
                        let mut mset = redis::cmd("MSET");
                        for key in &keys {
                            mset.arg(key).arg(&value);
                        }
                        con.req_command(&mset).expect("MSET")
                    } else {
                        let mut pipe = redis::pipe();
                        pipe.atomic();
                        for key in &keys {
                            pipe.cmd("SET").arg(key).arg(&value).ignore();
                        }
                        con.req_packed_commands(&pipe.get_packed_pipeline(), GROUP + 1, 1)
                            .expect("EXEC")
                            .pop()
                            .unwrap_or(Value::Nil)
                    }
                };
                // An EXEC across workers is planned optimistically (and holds its keys
                // after a failed plan): one that still found its keys changed 20 times
                // answers TRYAGAIN, having written nothing, and is sent again as a
                // client would.
                let mut reply = write();
                for _ in 0..MAX_RETRIES {
                    if !tryagain(&reply) {
                        break;
                    }
                    retried += 1;
                    reply = write();
                }
                assert!(
                    !matches!(reply, Value::ServerError(_)),
                    "writer {writer}: {}",
                    error_text(&reply)
                );
            }
            eprintln!("writer {writer}: {WRITES} writes, {retried} sent again after TRYAGAIN");
            if left.fetch_sub(1, Ordering::SeqCst) == 1 {
                done.store(true, Ordering::SeqCst);
            }
        }));
    }
    {
        let (client, keys, done, left) = (
            server.client(),
            strs(&presence),
            Arc::clone(&done),
            Arc::clone(&writers_left),
        );
        writers.push(thread::spawn(move || {
            let mut con = common::connect(&client);
            for n in 0..WRITES {
                let args = match n % 2 {
                    0 => keys.iter().flat_map(|k| [k.clone(), "v".into()]).collect(),
                    _ => keys.clone(),
                };
                let name = if n % 2 == 0 { "MSET" } else { "DEL" };
                let reply = con
                    .req_command(redis::cmd(name).arg(&args))
                    .expect("MSET/DEL");
                assert!(!matches!(reply, Value::ServerError(_)), "{reply:?}");
            }
            if left.fetch_sub(1, Ordering::SeqCst) == 1 {
                done.store(true, Ordering::SeqCst);
            }
        }));
    }

    // Readers: MGET (straight from the maps, and in a pipeline behind a write, which reads
    // through the workers), a read-only EXEC, and EXISTS.
    let uniform = |values: &[Value], what: &str| {
        assert!(
            values.iter().all(|v| *v == values[0]),
            "{what} saw part of a multi-key write: {values:?}"
        );
    };
    let mut readers = Vec::new();
    for kind in 0..3 {
        let (client, keys, done) = (server.client(), strs(&values), Arc::clone(&done));
        readers.push(thread::spawn(move || {
            let mut con = common::connect(&client);
            let mget = cmd(&with_keys("MGET", &keys)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>());
            reader(&done, 50, || {
                let reply = match kind {
                    0 => con.req_command(&mget).expect("MGET"),
                    1 => {
                        let mut pipe = redis::pipe();
                        pipe.cmd("SET").arg("elsewhere").arg("x").ignore();
                        pipe.add_command(mget.clone());
                        con.req_packed_commands(&pipe.get_packed_pipeline(), 1, 1)
                            .expect("pipeline")
                            .pop()
                            .unwrap_or(Value::Nil)
                    }
                    _ => {
                        let mut pipe = redis::pipe();
                        pipe.atomic().add_command(mget.clone());
                        match con
                            .req_packed_commands(&pipe.get_packed_pipeline(), 2, 1)
                            .expect("EXEC")
                            .pop()
                        {
                            Some(Value::Array(mut replies)) => replies.pop().unwrap_or(Value::Nil),
                            other => other.unwrap_or(Value::Nil),
                        }
                    }
                };
                match reply {
                    Value::Array(values) => {
                        uniform(&values, ["MGET", "pipelined MGET", "MGET in EXEC"][kind]);
                        true
                    }
                    other if tryagain(&other) => false,
                    other => panic!("reader {kind}: {other:?}"),
                }
            })
        }));
    }
    {
        let (client, keys, done) = (server.client(), strs(&presence), Arc::clone(&done));
        readers.push(thread::spawn(move || {
            let mut con = common::connect(&client);
            let exists = cmd(&with_keys("EXISTS", &keys)
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>());
            reader(&done, 50, || {
                match con.req_command(&exists).expect("EXISTS") {
                    Value::Int(n) => {
                        assert!(
                            n == 0 || n == GROUP as i64,
                            "EXISTS saw part of an MSET or DEL: {n} of {GROUP} keys"
                        );
                        true
                    }
                    other if tryagain(&other) => false,
                    other => panic!("EXISTS: {other:?}"),
                }
            })
        }));
    }
    for writer in writers {
        writer.join().expect("writer");
    }
    let checked: Vec<usize> = readers
        .into_iter()
        .map(|r| r.join().expect("reader"))
        .collect();
    eprintln!("reads checked (MGET, pipelined MGET, MGET in EXEC, EXISTS): {checked:?}");
    assert!(checked.iter().all(|&n| n >= 50), "{checked:?}");
}

#[test]
fn set_algebra_sees_smove_whole_and_store_forms_lose_no_concurrent_write() {
    let server = Server::start(&format!("workers = {WORKERS}\n"));
    let a = server.keys_on_worker("algebra:a:", 0, 1).remove(0);
    let b = server.keys_on_worker("algebra:b:", 1, 1).remove(0);
    let mut con = server.conn();
    const MEMBERS: usize = 20;
    for m in 0..MEMBERS {
        call_str(&mut con, &["SADD", &a, &format!("m{m}")]);
    }
    let done = Arc::new(AtomicBool::new(false));
    let mover = {
        let (client, a, b, done) = (server.client(), a.clone(), b.clone(), Arc::clone(&done));
        thread::spawn(move || {
            let mut con = common::connect(&client);
            for n in 0..WRITES {
                let member = format!("m{}", n % MEMBERS);
                let (from, to) = if (n / MEMBERS).is_multiple_of(2) {
                    (&a, &b)
                } else {
                    (&b, &a)
                };
                let reply = call_str(&mut con, &["SMOVE", from, to, &member]);
                assert_eq!(reply, Value::Int(1), "SMOVE {member}");
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let checked = {
        let (client, a, b, done) = (server.client(), a.clone(), b.clone(), Arc::clone(&done));
        let union_dest = server.keys_on_worker("union:dest:", 2, 1).remove(0);
        thread::spawn(move || {
            let mut con = common::connect(&client);
            reader(&done, 50, || {
                let union = call_str(&mut con, &["SUNION", &a, &b]);
                let inter = call_str(&mut con, &["SINTER", &a, &b]);
                let stored = call_str(&mut con, &["SUNIONSTORE", &union_dest, &a, &b]);
                match (&union, &inter, &stored) {
                    (Value::Array(union), Value::Array(inter), Value::Int(stored)) => {
                        assert_eq!(
                            union.len(),
                            MEMBERS,
                            "SUNION saw an SMOVE in part: {union:?}"
                        );
                        assert!(inter.is_empty(), "SINTER saw an SMOVE in part: {inter:?}");
                        assert_eq!(*stored, MEMBERS as i64, "SUNIONSTORE saw an SMOVE in part");
                        true
                    }
                    _ => {
                        for reply in [&union, &inter, &stored] {
                            assert!(
                                matches!(reply, Value::Array(_) | Value::Int(_)) || tryagain(reply),
                                "{reply:?}"
                            );
                        }
                        false
                    }
                }
            })
        })
    };
    mover.join().expect("mover");
    let checked = checked.join().expect("reader");
    eprintln!("set algebra reads checked: {checked}");

    // SUNIONSTORE d d s beside SADDs to d: every SADD acknowledged is in d at the end.
    let d = server.keys_on_worker("store:d:", 0, 1).remove(0);
    let s = server.keys_on_worker("store:s:", 1, 1).remove(0);
    call_str(&mut con, &["SADD", &s, "from-s"]);
    // The adder keeps the last WINDOW members it added: it adds one, then removes the one
    // added WINDOW steps before, which must still be there (a store that wrote what it
    // read earlier would have dropped it, or brought back one removed). It goes on until
    // STORES stores have run beside it (at most MAX_ADDS adds). It sends each write as
    // soon as the last is answered: a store plans optimistically (it reads, then commits
    // if what it read is unchanged), and after a plan that found `d` changed, the next
    // holds its keys (net-daemon/src/holds.rs); without that, nearly every plan is
    // refused.
    const STORES: usize = 20;
    const MAX_ADDS: usize = 20_000;
    const WINDOW: usize = 50;
    let stores_done = Arc::new(AtomicUsize::new(0));
    let adder = {
        let (client, d, stores_done) = (server.client(), d.clone(), Arc::clone(&stores_done));
        thread::spawn(move || {
            let mut con = common::connect(&client);
            let mut added = 0;
            while added < MAX_ADDS && stores_done.load(Ordering::SeqCst) < STORES {
                let member = format!("a{added}");
                assert_eq!(
                    call_str(&mut con, &["SADD", &d, &member]),
                    Value::Int(1),
                    "SADD {member}"
                );
                if added >= WINDOW {
                    let old = format!("a{}", added - WINDOW);
                    assert_eq!(
                        call_str(&mut con, &["SREM", &d, &old]),
                        Value::Int(1),
                        "{old}, added and not removed yet, is gone: a SUNIONSTORE lost it"
                    );
                }
                added += 1;
            }
            added
        })
    };
    let mut refused = 0;
    while !adder.is_finished() {
        match call_str(&mut con, &["SUNIONSTORE", &d, &d, &s]) {
            Value::Int(_) => {
                stores_done.fetch_add(1, Ordering::SeqCst);
            }
            other if tryagain(&other) => refused += 1,
            other => panic!("SUNIONSTORE: {other:?}"),
        }
    }
    let added = adder.join().expect("adder");
    let stores = stores_done.load(Ordering::SeqCst);
    let Value::Array(members) = call_str(&mut con, &["SMEMBERS", &d]) else {
        panic!("SMEMBERS");
    };
    let members: BTreeSet<Vec<u8>> = members
        .into_iter()
        .map(|m| match m {
            Value::BulkString(bytes) => bytes,
            other => panic!("{other:?}"),
        })
        .collect();
    let expected: BTreeSet<Vec<u8>> = (added.saturating_sub(WINDOW)..added)
        .map(|n| format!("a{n}").into_bytes())
        .chain([b"from-s".to_vec()])
        .collect();
    eprintln!("{stores} SUNIONSTOREs ({refused} refused with TRYAGAIN) ran beside {added} SADDs");
    assert!(stores >= STORES, "the stores ran beside the adds: {stores}");
    assert_eq!(members, expected, "the last adds, and nothing removed");
    assert!(members.contains(b"from-s".as_slice()));
}

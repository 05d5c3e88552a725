//! Single-key operations are linearizable while processes die: client threads
//! run GET, SET, INCR and MSET (across workers) on a few hot keys spread over
//! every worker while shard-workers (and the net-daemon) are killed -9, and each
//! key's history is checked by the Wing–Gong–Lowe search in
//! `common::linearizability` (an MSET counts as a SET in the history of each of
//! its keys).
//!
//! The first tests check the checker itself on hand-written histories, so that
//! it is known to reject what it must reject.
//!
//! `SHOAL_LONG_TESTS=1` runs the long form (60 s of load instead of 8 s, more
//! net-daemon kills); `SHOAL_LINEARIZABILITY_SECS` sets the load time directly;
//! `SHOAL_TEST_SEED` repeats a kill schedule.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::linearizability::{check, check_with_budget, Op, Operation, Outcome, Output, Verdict};
use common::{connect_until, env_count, long_tests, signal, test_seed, Answer, Rng, Server};
use redis::{ConnectionLike, Value};

// ---------------------------------------------------------------- the checker on known histories

/// Builds histories with times in milliseconds from one origin.
struct Builder {
    origin: Instant,
    ops: Vec<Operation>,
}

impl Builder {
    fn new() -> Builder {
        Builder {
            origin: Instant::now(),
            ops: Vec::new(),
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.origin + Duration::from_millis(ms)
    }

    fn add(mut self, client: usize, op: Op, from_ms: u64, to_ms: u64, outcome: Outcome) -> Builder {
        self.ops.push(Operation {
            client,
            op,
            invoke: self.at(from_ms),
            complete: self.at(to_ms),
            outcome,
        });
        self
    }

    fn set(self, client: usize, value: &str, from: u64, to: u64) -> Builder {
        self.add(
            client,
            Op::Set(value.into()),
            from,
            to,
            Outcome::Ok(Output::Done),
        )
    }

    fn get(self, client: usize, seen: Option<&str>, from: u64, to: u64) -> Builder {
        let seen = seen.map(|s| s.as_bytes().to_vec());
        self.add(client, Op::Get, from, to, Outcome::Ok(Output::Value(seen)))
    }

    fn incr(self, client: usize, returned: i64, from: u64, to: u64) -> Builder {
        self.add(
            client,
            Op::Incr,
            from,
            to,
            Outcome::Ok(Output::Integer(returned)),
        )
    }

    fn verdict(&self) -> Verdict {
        check(&self.ops, None)
    }

    fn assert_linearizable(&self) {
        match self.verdict() {
            Verdict::Linearizable => {}
            other => panic!("expected linearizable, got {other:#?}"),
        }
    }

    fn assert_not_linearizable(&self) {
        match self.verdict() {
            Verdict::NotLinearizable(violation) => eprintln!("{violation}"),
            other => panic!("expected a violation, got {other:?}"),
        }
    }
}

#[test]
fn checker_accepts_a_sequential_history() {
    Builder::new()
        .get(0, None, 0, 1)
        .set(0, "5", 2, 3)
        .get(1, Some("5"), 4, 5)
        .incr(1, 6, 6, 7)
        .incr(0, 7, 8, 9)
        .get(0, Some("7"), 10, 11)
        .add(1, Op::Del, 12, 13, Outcome::Ok(Output::Done))
        .incr(1, 1, 14, 15)
        .assert_linearizable();
}

#[test]
fn checker_accepts_either_order_of_overlapping_operations() {
    // A read concurrent with a write may see the old or the new value.
    Builder::new()
        .set(0, "a", 0, 10)
        .get(1, None, 2, 3)
        .get(2, Some("a"), 4, 5)
        .assert_linearizable();
    // Two concurrent increments return 1 and 2 in either order.
    Builder::new()
        .incr(0, 2, 0, 10)
        .incr(1, 1, 1, 11)
        .get(2, Some("2"), 12, 13)
        .assert_linearizable();
    // Reads that overlap two writes may see them in the order the writes took effect.
    Builder::new()
        .set(0, "a", 0, 10)
        .set(1, "b", 0, 10)
        .get(2, Some("b"), 1, 2)
        .get(2, Some("a"), 3, 4)
        .get(3, Some("a"), 11, 12)
        .assert_linearizable();
}

#[test]
fn checker_rejects_a_stale_read_after_a_completed_write() {
    Builder::new()
        .set(0, "a", 0, 1)
        .set(0, "b", 2, 3)
        .get(1, Some("a"), 4, 5)
        .assert_not_linearizable();
}

#[test]
fn checker_rejects_a_read_of_a_value_written_later() {
    Builder::new()
        .get(1, Some("a"), 0, 1)
        .set(0, "a", 2, 3)
        .assert_not_linearizable();
}

#[test]
fn checker_rejects_reads_that_go_back_in_time() {
    // Both reads overlap the write, but once one saw the new value a later read cannot see the old.
    Builder::new()
        .set(0, "a", 0, 100)
        .get(1, Some("a"), 10, 20)
        .get(2, None, 30, 40)
        .assert_not_linearizable();
}

#[test]
fn checker_rejects_a_duplicated_incr_value() {
    Builder::new()
        .incr(0, 1, 0, 10)
        .incr(1, 1, 1, 11)
        .assert_not_linearizable();
    // A lost increment: three acknowledged INCRs, then a read of 2.
    Builder::new()
        .incr(0, 1, 0, 1)
        .incr(1, 2, 2, 3)
        .incr(0, 3, 4, 5)
        .get(1, Some("2"), 6, 7)
        .assert_not_linearizable();
}

#[test]
fn checker_lets_unknown_operations_happen_late_or_never() {
    // Never happened.
    Builder::new()
        .add(0, Op::Set("x".into()), 0, 1, Outcome::Unknown)
        .get(1, None, 5, 6)
        .assert_linearizable();
    // Happened long after its client gave up on it.
    Builder::new()
        .add(0, Op::Set("x".into()), 0, 1, Outcome::Unknown)
        .get(1, None, 5, 6)
        .get(1, Some("x"), 50, 51)
        .assert_linearizable();
    // An unknown INCR that took effect, between two acknowledged ones.
    Builder::new()
        .incr(0, 1, 0, 1)
        .add(1, Op::Incr, 2, 3, Outcome::Unknown)
        .incr(0, 3, 4, 5)
        .assert_linearizable();
}

#[test]
fn checker_rejects_what_unknown_operations_cannot_explain() {
    // An unknown write cannot be undone.
    Builder::new()
        .add(0, Op::Set("x".into()), 0, 1, Outcome::Unknown)
        .get(1, Some("x"), 5, 6)
        .get(1, None, 7, 8)
        .assert_not_linearizable();
    // One unknown INCR cannot account for two missing increments.
    Builder::new()
        .incr(0, 1, 0, 1)
        .add(1, Op::Incr, 2, 3, Outcome::Unknown)
        .incr(0, 4, 4, 5)
        .assert_not_linearizable();
    // An unknown operation cannot take effect before it was invoked.
    Builder::new()
        .get(1, Some("x"), 0, 1)
        .add(0, Op::Set("x".into()), 5, 6, Outcome::Unknown)
        .assert_not_linearizable();
}

#[test]
fn checker_treats_failed_operations_as_never_applied() {
    Builder::new()
        .add(0, Op::Set("x".into()), 0, 1, Outcome::Fail)
        .get(1, None, 2, 3)
        .assert_linearizable();
    Builder::new()
        .add(0, Op::Set("x".into()), 0, 1, Outcome::Fail)
        .get(1, Some("x"), 2, 3)
        .assert_not_linearizable();
}

#[test]
fn checker_stays_small_when_many_replies_were_lost() {
    // After one SET, each round loses the reply of a SET (first 18 rounds) or of an
    // INCR (last 18), then acknowledges an INCR whose result shows that no lost
    // operation has taken effect. Nothing overwrites the key later, so no lost
    // operation fits anywhere: a plain search tries every subset of the pending ones
    // in every round (about 2^18 orders); with the reductions it needs a few thousand
    // steps.
    let mut history = Builder::new().set(0, "1000", 0, 1);
    for k in 0..36u64 {
        let t = 10 * (k + 1);
        let lost = if k < 18 {
            Op::Set(format!("{}", 7_000_000 + k).into())
        } else {
            Op::Incr
        };
        history = history
            .add(1 + k as usize % 4, lost, t, t + 1, Outcome::Unknown)
            .incr(0, 1000 + k as i64 + 1, t + 2, t + 3);
    }
    match check_with_budget(&history.ops, None, 200_000) {
        Verdict::Linearizable => {}
        other => panic!("expected linearizable within 200,000 steps, got {other:?}"),
    }
    // The reductions keep what the lost operations can explain, and only that.
    Builder::new()
        .add(0, Op::Set("41".into()), 0, 1, Outcome::Unknown)
        .add(1, Op::Incr, 0, 1, Outcome::Unknown)
        .get(2, Some("42"), 5, 6)
        .assert_linearizable();
    Builder::new()
        .add(0, Op::Set("41".into()), 0, 1, Outcome::Unknown)
        .add(1, Op::Del, 0, 1, Outcome::Unknown)
        .get(2, Some("42"), 5, 6)
        .assert_not_linearizable();
    Builder::new()
        .set(0, "1", 0, 1)
        .add(1, Op::Incr, 2, 3, Outcome::Unknown)
        .add(1, Op::Incr, 4, 5, Outcome::Unknown)
        .add(2, Op::Del, 2, 3, Outcome::Unknown)
        .get(0, Some("2"), 6, 7)
        .incr(0, 1, 8, 9)
        .get(0, Some("2"), 10, 11)
        .assert_linearizable();
}

/// Random concurrent histories that are linearizable by construction (each operation takes
/// effect at a random instant inside its interval), some with lost replies; then one read is
/// corrupted, which the checker must notice.
#[test]
fn checker_handles_long_random_histories() {
    let seed = test_seed("random history");
    let mut rng = Rng::new(seed);
    for round in 0..20 {
        let origin = Instant::now();
        let clients = 2 + round % 5;
        let mut state: Option<Vec<u8>> = None;
        let mut ops = Vec::new();
        // Each client has one operation open at a time; effects happen in time order.
        let mut busy_until = vec![0u64; clients];
        let mut time = 0u64;
        for n in 0..400u64 {
            time += rng.below(3);
            let client = rng.below(clients as u64) as usize;
            let invoke = busy_until[client].max(time.saturating_sub(rng.below(20)));
            time = time.max(invoke);
            let effect = time;
            let complete = effect + rng.below(20);
            busy_until[client] = complete + 1;
            let op = match rng.below(3) {
                0 => Op::Get,
                1 => Op::Set(format!("{}", 1000 + n).into_bytes()),
                _ => Op::Incr,
            };
            let output = match &op {
                Op::Get => Output::Value(state.clone()),
                Op::Incr => {
                    let next = common::linearizability::step(&state, &op, None).expect("integer");
                    let value = String::from_utf8(next.clone().expect("set")).expect("text");
                    state = next;
                    Output::Integer(value.parse().expect("integer"))
                }
                _ => {
                    state = common::linearizability::step(&state, &op, None).expect("step");
                    Output::Done
                }
            };
            let outcome = if op != Op::Get && rng.below(40) == 0 {
                Outcome::Unknown
            } else {
                Outcome::Ok(output)
            };
            ops.push(Operation {
                client,
                op,
                invoke: origin + Duration::from_millis(invoke),
                complete: origin + Duration::from_millis(complete),
                outcome,
            });
        }
        match check_with_budget(&ops, None, 1_000_000) {
            Verdict::Linearizable => {}
            other => panic!(
                "round {round}: a history linearizable by construction, within 1,000,000 steps: {other:?}"
            ),
        }
        // A read of a value nobody wrote.
        let reads: Vec<usize> = (0..ops.len())
            .filter(|&i| matches!(ops[i].outcome, Outcome::Ok(Output::Value(_))))
            .collect();
        if let Some(&i) = reads.get(rng.below(reads.len().max(1) as u64) as usize) {
            ops[i].outcome = Outcome::Ok(Output::Value(Some(b"never-written".to_vec())));
            assert!(
                matches!(check(&ops, None), Verdict::NotLinearizable(_)),
                "round {round}: a read of a value nobody wrote was accepted"
            );
        }
    }
}

// ---------------------------------------------------------------- against a server

const WORKERS: usize = 3;
const KEYS_PER_WORKER: usize = 2;
const CLIENTS: usize = 5;

/// One recorded operation, with the key it was on.
struct Recorded {
    key: usize,
    operation: Operation,
}

/// Runs random GET, SET, INCR and MSET on the hot keys until `stop`; every operation is recorded.
fn run_client(
    client: usize,
    redis_client: redis::Client,
    keys: Vec<String>,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> (Vec<Recorded>, Vec<String>) {
    let mut rng = Rng::new(seed);
    let mut recorded = Vec::new();
    let mut failures = Vec::new();
    let mut con: Option<redis::Connection> = None;
    let mut sequence = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if con.is_none() {
            con = connect_until(&redis_client, Instant::now() + Duration::from_secs(60));
            if con.is_none() {
                failures.push("could not reconnect within 60 s".into());
                break;
            }
        }
        let Some(connection) = con.as_mut() else {
            unreachable!()
        };
        let key = rng.below(keys.len() as u64) as usize;
        sequence += 1;
        // SET and MSET write integers unique to this client and operation, so INCR works on them.
        let value = |i: usize| {
            ((client as u64 + 1) * 1_000_000_000 + sequence * 1000 + i as u64).to_string()
        };
        // Each target is a key and what the request does to it; an MSET writes several keys (on
        // different workers, through two-phase commit) and counts as a SET in each key's history.
        let (targets, cmd): (Vec<(usize, Op)>, redis::Cmd) = match rng.below(20) {
            0..=7 => (
                vec![(key, Op::Get)],
                redis::cmd("GET").arg(&keys[key]).clone(),
            ),
            8..=12 => (
                vec![(key, Op::Set(value(0).into_bytes()))],
                redis::cmd("SET").arg(&keys[key]).arg(value(0)).clone(),
            ),
            13..=17 => (
                vec![(key, Op::Incr)],
                redis::cmd("INCR").arg(&keys[key]).clone(),
            ),
            _ => {
                let mut chosen = vec![key];
                let wanted = 2 + rng.below(2) as usize;
                while chosen.len() < wanted {
                    let other = rng.below(keys.len() as u64) as usize;
                    if !chosen.contains(&other) {
                        chosen.push(other);
                    }
                }
                let mut cmd = redis::cmd("MSET");
                let mut targets = Vec::new();
                for (i, k) in chosen.into_iter().enumerate() {
                    cmd.arg(&keys[k]).arg(value(i));
                    targets.push((k, Op::Set(value(i).into_bytes())));
                }
                (targets, cmd)
            }
        };
        let invoke = Instant::now();
        let answer = Answer::of(connection.req_command(&cmd));
        let complete = Instant::now();
        let op = &targets[0].1;
        let outcome = match (op, &answer) {
            (Op::Get, Answer::Reply(Value::Nil)) => Outcome::Ok(Output::Value(None)),
            (Op::Get, Answer::Reply(Value::BulkString(bytes))) => {
                Outcome::Ok(Output::Value(Some(bytes.clone())))
            }
            (Op::Set(_), Answer::Reply(Value::Okay)) => Outcome::Ok(Output::Done),
            (Op::Incr, Answer::Reply(Value::Int(n))) => Outcome::Ok(Output::Integer(*n)),
            (_, Answer::Reply(other)) => panic!("{cmd:?} answered {other:?}"),
            (_, Answer::Failed(text)) => {
                if !text.starts_with("TRYAGAIN") {
                    failures.push(format!("{op:?}: {text}"));
                }
                Outcome::Fail
            }
            (_, Answer::Unknown(_)) => Outcome::Unknown,
        };
        if answer.connection_lost() {
            con = None;
        }
        let failed = outcome == Outcome::Fail;
        for (key, op) in targets {
            recorded.push(Recorded {
                key,
                operation: Operation {
                    client,
                    op,
                    invoke,
                    complete,
                    outcome: outcome.clone(),
                },
            });
        }
        if failed {
            // A dead worker answers at once: give it a moment.
            sleep(Duration::from_millis(10));
        }
    }
    (recorded, failures)
}

#[test]
fn single_key_operations_stay_linearizable_while_workers_and_the_net_daemon_are_killed() {
    linearizable_under_kills("");
}

#[test]
fn with_write_back_single_key_operations_stay_linearizable_under_kills() {
    // Reads must go through a worker whose writes LMDB has not committed, and a
    // killed worker's successor replays them before anyone reads its shard again.
    linearizable_under_kills(
        "[storage]\nwriteback_ms = 300\nwriteback_idle_ms = 0\nwriteback_min_free_bytes = 0\n",
    );
}

/// Clients run single-key operations while workers and the net-daemon are killed;
/// `config` is added to the server's.
fn linearizable_under_kills(config: &str) {
    let load_secs = env_count(
        "SHOAL_LINEARIZABILITY_SECS",
        if long_tests() { 60 } else { 8 },
    );
    let net_daemon_kills = if long_tests() { 3 } else { 1 };
    let server = Server::start(&format!(
        "workers = {WORKERS}\n{config}[supervisor]\nmax_restarts = 1000\nrestart_window_ms = 2000\n"
    ));
    let seed = test_seed("linearizability kill schedule");
    let mut rng = Rng::new(seed);
    let keys: Vec<String> = (0..WORKERS)
        .flat_map(|worker| {
            server.keys_on_worker(&format!("hot:{worker}:"), worker, KEYS_PER_WORKER)
        })
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (redis_client, keys, stop) = (server.client(), keys.clone(), Arc::clone(&stop));
            let client_seed = seed
                .wrapping_add(client as u64 + 1)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15);
            std::thread::spawn(move || run_client(client, redis_client, keys, client_seed, stop))
        })
        .collect();

    // Kill a random worker at random instants; the net-daemon at evenly spread points.
    let started = Instant::now();
    let load = Duration::from_secs(load_secs);
    let mut kills: Vec<(String, f64)> = Vec::new();
    let mut net_daemon_kills_done = 0;
    while started.elapsed() < load {
        sleep(rng.duration_between(Duration::from_millis(200), Duration::from_millis(1200)));
        if started.elapsed() >= load {
            break;
        }
        let due = (net_daemon_kills_done + 1) as f64 / (net_daemon_kills + 1) as f64;
        let (role, index) = if net_daemon_kills_done < net_daemon_kills
            && started.elapsed().as_secs_f64() >= due * load.as_secs_f64()
        {
            net_daemon_kills_done += 1;
            ("net-daemon", 0)
        } else {
            ("shard-worker", rng.below(WORKERS as u64))
        };
        let pid = server.pid_of(role, index);
        signal(pid, libc::SIGKILL);
        kills.push((format!("{role} {index}"), started.elapsed().as_secs_f64()));
        server.wait_restarted(role, index, pid, Duration::from_secs(30));
    }
    stop.store(true, Ordering::Relaxed);
    let mut histories: BTreeMap<usize, Vec<Operation>> = BTreeMap::new();
    let mut failures = Vec::new();
    for handle in handles {
        let (recorded, client_failures) = handle.join().expect("client thread");
        failures.extend(client_failures);
        for r in recorded {
            histories.entry(r.key).or_default().push(r.operation);
        }
    }
    eprintln!("kills (process, seconds into the load): {kills:?}");
    assert!(failures.is_empty(), "unexpected errors: {failures:?}");
    assert!(
        kills.iter().any(|(p, _)| p.starts_with("net-daemon")),
        "the net-daemon was killed: {kills:?}"
    );
    assert!(kills.len() >= 3, "{kills:?}");

    let mut totals = (0usize, 0usize, 0usize, 0usize);
    let check_started = Instant::now();
    for (key, history) in &histories {
        let ok = history
            .iter()
            .filter(|o| matches!(o.outcome, Outcome::Ok(_)))
            .count();
        let unknown = history
            .iter()
            .filter(|o| o.outcome == Outcome::Unknown)
            .count();
        let failed = history.len() - ok - unknown;
        totals = (
            totals.0 + history.len(),
            totals.1 + ok,
            totals.2 + unknown,
            totals.3 + failed,
        );
        match check(history, None) {
            Verdict::Linearizable => {}
            Verdict::NotLinearizable(violation) => {
                panic!("key {}: {violation}\n{}", keys[*key], server.logs())
            }
            Verdict::Inconclusive(why) => {
                // The history, to tell a costly but valid one from a violation.
                let start = history.iter().map(|o| o.invoke).min();
                let at = |t: Instant| start.map_or(0, |s| t.duration_since(s).as_micros());
                for o in history {
                    eprintln!(
                        "client {} {:?} [{} us, {} us] {:?}",
                        o.client,
                        o.op,
                        at(o.invoke),
                        at(o.complete),
                        o.outcome
                    );
                }
                panic!("key {}: the check did not finish: {why:?}", keys[*key])
            }
        }
    }
    eprintln!(
        "linearizability: {} histories, {} operations checked ({} ok, {} unknown, {} failed) in {:?}; \
         {} kills over {load_secs} s of load",
        histories.len(),
        totals.0,
        totals.1,
        totals.2,
        totals.3,
        check_started.elapsed(),
        kills.len()
    );
    assert_eq!(histories.len(), keys.len(), "every hot key was used");
    assert!(
        totals.1 >= 200,
        "enough operations completed to mean something: {totals:?}"
    );
}

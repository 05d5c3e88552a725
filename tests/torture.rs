//! Crash torture: a mixed load (SET, APPEND, DEL, INCR, MSET across workers,
//! GET) runs from several client threads while a random Shoal process (a
//! shard-worker, the net-daemon, or the supervisor with its whole tree) is
//! killed -9 at a random instant, round after round.
//!
//! Each client owns its keys and sends one request at a time, so it keeps an
//! exact model of them: an acknowledged write is applied to the model; a write
//! answered with a definite error ("nothing was written") is not; a write whose
//! reply was lost (connection error, or "may or may not have been applied") is
//! *unknown*, and the client resolves it by reading the keys it touched once
//! the server answers again: each must hold its old or its new value, and an
//! MSET must be all old or all new (atomicity). Unknown writes never count as
//! lost. Every reply is checked against the model too (GET values, INCR
//! results, DEL counts, APPEND lengths).
//!
//! After each round the clients pause, recovery resolves the multi-key writes
//! left in doubt (`SHOAL.TXNS` reaches 0), and the whole keyspace is compared
//! with the models: no acknowledged write lost, no value that no operation
//! wrote, no key that should not exist. (Before that wait, SCAN may show an
//! acknowledged MSET's keys on a participant that died before its commit phase
//! reached it in their old state; the test counts and prints such keys.) Every few rounds, and after the last, every
//! partition's commit log is read from its start with `SHOAL.LOG`, replayed
//! (create/update set the value, delete removes it) and compared with the
//! keyspace (SCAN + MGET); each entry must also fit the replayed state (create
//! of a missing key, update or delete of an existing one) and commit ids must
//! increase.
//!
//! `SHOAL_TORTURE_ROUNDS=50` (or `SHOAL_LONG_TESTS=1`) runs the long form;
//! the default is 8 rounds. `SHOAL_TEST_SEED` repeats a schedule.
//! `SHOAL_TORTURE_DURABILITY=async` runs it with `storage.durability = "async"`,
//! whose acknowledged writes must survive a crash of the processes too.
//! `SHOAL_TORTURE_WRITEBACK_MS=n` sets `storage.writeback_ms` of the first test (default:
//! Shoal's); the second always runs with write-back.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{connect_until, env_count, long_tests, signal, test_seed, Answer, Rng, Server};
use redis::{ConnectionLike, Value};

const WORKERS: usize = 3;
const PARTITIONS: u32 = 64;
const CLIENTS: usize = 4;
/// String keys per client on each worker; MSETs pick among all of them.
const STRINGS_PER_WORKER: usize = 4;
/// Counter keys (INCR) per client on each worker.
const COUNTERS_PER_WORKER: usize = 1;
/// APPEND turns into SET past this length, so values stay small.
const MAX_VALUE_BYTES: usize = 256;
/// How long a client may wait for the server to answer again.
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(90);
/// Commit-log check every this many rounds (and after the last).
const LOG_CHECK_EVERY: usize = 4;

/// One request a client sends.
#[derive(Debug, Clone)]
enum Request {
    Get(String),
    Set(String, Vec<u8>),
    Append(String, Vec<u8>),
    Del(String),
    Incr(String),
    Mset(Vec<(String, Vec<u8>)>),
}

impl Request {
    fn command(&self) -> redis::Cmd {
        let mut cmd;
        match self {
            Request::Get(key) => {
                cmd = redis::cmd("GET");
                cmd.arg(key);
            }
            Request::Set(key, value) => {
                cmd = redis::cmd("SET");
                cmd.arg(key).arg(value.as_slice());
            }
            Request::Append(key, suffix) => {
                cmd = redis::cmd("APPEND");
                cmd.arg(key).arg(suffix.as_slice());
            }
            Request::Del(key) => {
                cmd = redis::cmd("DEL");
                cmd.arg(key);
            }
            Request::Incr(key) => {
                cmd = redis::cmd("INCR");
                cmd.arg(key);
            }
            Request::Mset(pairs) => {
                cmd = redis::cmd("MSET");
                for (key, value) in pairs {
                    cmd.arg(key).arg(value.as_slice());
                }
            }
        }
        cmd
    }

    /// The keys the request writes, with their values after it (`None`: deleted).
    fn effect(&self, model: &BTreeMap<String, Option<Vec<u8>>>) -> Vec<(String, Option<Vec<u8>>)> {
        let old = |key: &String| model.get(key).cloned().flatten();
        match self {
            Request::Get(_) => Vec::new(),
            Request::Set(key, value) => vec![(key.clone(), Some(value.clone()))],
            Request::Append(key, suffix) => {
                let mut value = old(key).unwrap_or_default();
                value.extend_from_slice(suffix);
                vec![(key.clone(), Some(value))]
            }
            Request::Del(key) => vec![(key.clone(), None)],
            Request::Incr(key) => {
                let current: i64 = old(key).map_or(0, |v| {
                    String::from_utf8_lossy(&v)
                        .parse()
                        .expect("counters hold integers")
                });
                vec![(key.clone(), Some((current + 1).to_string().into_bytes()))]
            }
            Request::Mset(pairs) => pairs
                .iter()
                .map(|(key, value)| (key.clone(), Some(value.clone())))
                .collect(),
        }
    }

    /// The reply an acknowledged request must have had, given the model before it.
    fn expected_reply(&self, model: &BTreeMap<String, Option<Vec<u8>>>) -> Value {
        let old = |key: &String| model.get(key).cloned().flatten();
        match self {
            Request::Get(key) => old(key).map_or(Value::Nil, Value::BulkString),
            Request::Set(..) | Request::Mset(..) => Value::Okay,
            Request::Append(..) => match &self.effect(model)[0].1 {
                Some(value) => Value::Int(value.len() as i64),
                None => unreachable!(),
            },
            Request::Del(key) => Value::Int(i64::from(old(key).is_some())),
            Request::Incr(..) => match &self.effect(model)[0].1 {
                Some(value) => Value::Int(String::from_utf8_lossy(value).parse().expect("integer")),
                None => unreachable!(),
            },
        }
    }

    fn describe(&self) -> String {
        let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        match self {
            Request::Get(key) => format!("GET {key}"),
            Request::Set(key, value) => format!("SET {key} {}", text(value)),
            Request::Append(key, suffix) => format!("APPEND {key} {}", text(suffix)),
            Request::Del(key) => format!("DEL {key}"),
            Request::Incr(key) => format!("INCR {key}"),
            Request::Mset(pairs) => {
                let pairs: Vec<String> = pairs
                    .iter()
                    .map(|(k, v)| format!("{k} {}", text(v)))
                    .collect();
                format!("MSET {}", pairs.join(" "))
            }
        }
    }
}

fn show(value: &Option<Vec<u8>>) -> String {
    match value {
        None => "nil".into(),
        Some(bytes) => format!("{:?}", String::from_utf8_lossy(bytes)),
    }
}

/// What one client knows and has counted.
#[derive(Default)]
struct ClientState {
    /// The exact state of the client's keys (`None`: absent), unknown writes resolved.
    model: BTreeMap<String, Option<Vec<u8>>>,
    /// The last requests on each key and how they ended, for failure messages.
    recent: HashMap<String, VecDeque<String>>,
    acknowledged: u64,
    unknown_applied: u64,
    unknown_not_applied: u64,
    failed: u64,
    msets_across_workers: u64,
    /// Error replies by kind (first words).
    errors: BTreeMap<String, u64>,
    /// Anything that contradicts the model.
    violations: Vec<String>,
}

impl ClientState {
    fn note(&mut self, request: &Request, outcome: &str) {
        let keys: Vec<String> = match request {
            Request::Mset(pairs) => pairs.iter().map(|(k, _)| k.clone()).collect(),
            Request::Get(k)
            | Request::Set(k, _)
            | Request::Append(k, _)
            | Request::Del(k)
            | Request::Incr(k) => vec![k.clone()],
        };
        for key in keys {
            let recent = self.recent.entry(key).or_default();
            if recent.len() == 6 {
                recent.pop_front();
            }
            recent.push_back(format!("{} -> {outcome}", request.describe()));
        }
    }

    fn history_of(&self, key: &str) -> String {
        self.recent
            .get(key)
            .map(|r| r.iter().cloned().collect::<Vec<_>>().join("; "))
            .unwrap_or_default()
    }
}

/// Coordination between the round loop and the clients.
struct Control {
    pause: AtomicBool,
    stop: AtomicBool,
    parked: Vec<AtomicBool>,
    /// Acknowledged requests of all clients, to see the load go on after a kill.
    acknowledged: AtomicU64,
}

struct Client {
    index: usize,
    redis: redis::Client,
    strings: Vec<String>,
    counters: Vec<String>,
    /// The worker of each string key, to count MSETs that span workers.
    worker_of: HashMap<String, usize>,
    rng: Rng,
    sequence: u64,
    connection: Option<redis::Connection>,
}

impl Client {
    fn pick<'a>(&mut self, keys: &'a [String]) -> &'a String {
        &keys[self.rng.below(keys.len() as u64) as usize]
    }

    fn next_request(&mut self, model: &BTreeMap<String, Option<Vec<u8>>>) -> Request {
        self.sequence += 1;
        let tag = format!("c{}.{}", self.index, self.sequence);
        let strings = self.strings.clone();
        let counters = self.counters.clone();
        match self.rng.below(100) {
            0..=14 => {
                let keys = if self.rng.below(3) == 0 {
                    &counters
                } else {
                    &strings
                };
                Request::Get(self.pick(keys).clone())
            }
            15..=36 => Request::Set(self.pick(&strings).clone(), tag.into_bytes()),
            37..=49 => {
                let key = self.pick(&strings).clone();
                let long = model
                    .get(&key)
                    .and_then(|v| v.as_ref())
                    .is_some_and(|v| v.len() > MAX_VALUE_BYTES);
                if long {
                    Request::Set(key, tag.into_bytes())
                } else {
                    Request::Append(key, format!("+{tag}").into_bytes())
                }
            }
            50..=56 => {
                let keys = if self.rng.below(3) == 0 {
                    &counters
                } else {
                    &strings
                };
                Request::Del(self.pick(keys).clone())
            }
            57..=79 => Request::Incr(self.pick(&counters).clone()),
            _ => {
                let count = 2 + self.rng.below(3) as usize;
                let mut chosen = BTreeSet::new();
                while chosen.len() < count {
                    chosen.insert(self.pick(&strings).clone());
                }
                Request::Mset(
                    chosen
                        .into_iter()
                        .enumerate()
                        .map(|(i, key)| (key, format!("{tag}m{i}").into_bytes()))
                        .collect(),
                )
            }
        }
    }

    /// Sends one request; on a lost connection the connection is dropped.
    fn send(&mut self, request: &Request) -> Answer {
        let Some(connection) = self.connection.as_mut() else {
            return Answer::Unknown("I/O: not connected".into());
        };
        let answer = Answer::of(connection.req_command(&request.command()));
        if answer.connection_lost() {
            self.connection = None;
        }
        answer
    }

    fn ensure_connected(&mut self) -> bool {
        if self.connection.is_none() {
            self.connection = connect_until(&self.redis, Instant::now() + RECONNECT_TIMEOUT);
        }
        self.connection.is_some()
    }

    /// Reads a key until the server gives a value (it may be restarting, or the key locked by a
    /// multi-key write in doubt).
    fn read_settled(&mut self, key: &str) -> Result<Option<Vec<u8>>, String> {
        let deadline = Instant::now() + RECONNECT_TIMEOUT;
        let mut last = String::new();
        while Instant::now() < deadline {
            if !self.ensure_connected() {
                break;
            }
            match self.send(&Request::Get(key.to_string())) {
                Answer::Reply(Value::Nil) => return Ok(None),
                Answer::Reply(Value::BulkString(bytes)) => return Ok(Some(bytes)),
                Answer::Reply(other) => return Err(format!("GET {key} answered {other:?}")),
                Answer::Failed(text) | Answer::Unknown(text) => last = text,
            }
            sleep(Duration::from_millis(50));
        }
        Err(format!(
            "GET {key} did not succeed within {RECONNECT_TIMEOUT:?}: {last}"
        ))
    }

    /// Runs one request and folds its outcome into the model.
    fn step(&mut self, state: &mut ClientState) {
        let request = self.next_request(&state.model);
        if let Request::Mset(pairs) = &request {
            let workers: BTreeSet<usize> = pairs.iter().map(|(k, _)| self.worker_of[k]).collect();
            if workers.len() > 1 {
                state.msets_across_workers += 1;
            }
        }
        let effect = request.effect(&state.model);
        match self.send(&request) {
            Answer::Reply(reply) => {
                let expected = request.expected_reply(&state.model);
                if reply != expected {
                    let key_history = match &request {
                        Request::Mset(_) => String::new(),
                        _ => state.history_of(&effect_key(&request)),
                    };
                    state.violations.push(format!(
                        "{} answered {reply:?}, the model expects {expected:?}; earlier on this key: {key_history}",
                        request.describe()
                    ));
                }
                state.acknowledged += 1;
                for (key, value) in effect {
                    state.model.insert(key, value);
                }
                state.note(&request, &format!("{reply:?}"));
            }
            Answer::Failed(text) => {
                state.failed += 1;
                let kind: String = text
                    .split_whitespace()
                    .take(4)
                    .collect::<Vec<_>>()
                    .join(" ");
                *state.errors.entry(kind).or_default() += 1;
                if !text.starts_with("TRYAGAIN") {
                    state.violations.push(format!(
                        "{} answered an unexpected error: {text}",
                        request.describe()
                    ));
                }
                state.note(&request, &format!("failed: {text}"));
                // A dead worker answers at once: give it a moment.
                sleep(Duration::from_millis(10));
            }
            Answer::Unknown(text) => {
                let kind: String = text
                    .split_whitespace()
                    .take(4)
                    .collect::<Vec<_>>()
                    .join(" ");
                *state.errors.entry(kind).or_default() += 1;
                self.resolve(state, &request, effect, &text);
            }
        }
    }

    /// Reads the keys an unknown write touched and decides whether it took effect.
    fn resolve(
        &mut self,
        state: &mut ClientState,
        request: &Request,
        effect: Vec<(String, Option<Vec<u8>>)>,
        why: &str,
    ) {
        if effect.is_empty() {
            // A read with a lost reply changes nothing.
            state.note(request, &format!("unknown: {why}"));
            return;
        }
        let mut actual = Vec::new();
        for (key, _) in &effect {
            match self.read_settled(key) {
                Ok(value) => actual.push(value),
                Err(error) => {
                    state
                        .violations
                        .push(format!("resolving {}: {error}", request.describe()));
                    return;
                }
            }
        }
        let old: Vec<Option<Vec<u8>>> = effect
            .iter()
            .map(|(key, _)| state.model.get(key).cloned().flatten())
            .collect();
        let new: Vec<Option<Vec<u8>>> = effect.iter().map(|(_, v)| v.clone()).collect();
        let applied = actual == new;
        let not_applied = actual == old;
        if applied {
            state.unknown_applied += 1;
        } else if not_applied {
            state.unknown_not_applied += 1;
        } else {
            let detail: Vec<String> = effect
                .iter()
                .zip(&actual)
                .zip(&old)
                .map(|(((key, new), actual), old)| {
                    format!(
                        "{key}: holds {}, old {}, new {}; earlier: {}",
                        show(actual),
                        show(old),
                        show(new),
                        state.history_of(key)
                    )
                })
                .collect();
            let what = if effect.len() > 1 {
                "took effect on some keys only (not atomic)"
            } else {
                "left a value that is neither the old nor the new one"
            };
            state.violations.push(format!(
                "{} with a lost reply ({why}) {what}: {}",
                request.describe(),
                detail.join(" | ")
            ));
        }
        // Go on from what the server holds, so one violation is reported once.
        for ((key, _), value) in effect.iter().zip(actual) {
            state.model.insert(key.clone(), value);
        }
        let verdict = if applied {
            "unknown, found applied"
        } else if not_applied {
            "unknown, found not applied"
        } else {
            "unknown, found inconsistent"
        };
        state.note(request, &format!("{verdict} ({why})"));
    }
}

fn effect_key(request: &Request) -> String {
    match request {
        Request::Get(k)
        | Request::Set(k, _)
        | Request::Append(k, _)
        | Request::Del(k)
        | Request::Incr(k) => k.clone(),
        Request::Mset(pairs) => pairs[0].0.clone(),
    }
}

fn run_client(mut client: Client, state: Arc<Mutex<ClientState>>, control: Arc<Control>) {
    let index = client.index;
    loop {
        if control.stop.load(Ordering::Acquire) {
            break;
        }
        if control.pause.load(Ordering::Acquire) {
            control.parked[index].store(true, Ordering::Release);
            while control.pause.load(Ordering::Acquire) && !control.stop.load(Ordering::Acquire) {
                sleep(Duration::from_millis(2));
            }
            control.parked[index].store(false, Ordering::Release);
            continue;
        }
        let mut state = state.lock().expect("client state");
        if !client.ensure_connected() {
            state.violations.push(format!(
                "client {index} could not reconnect within {RECONNECT_TIMEOUT:?}"
            ));
            drop(state);
            // Park for good; the round loop reports the violation.
            control.parked[index].store(true, Ordering::Release);
            while !control.stop.load(Ordering::Acquire) {
                sleep(Duration::from_millis(10));
            }
            break;
        }
        let before = state.acknowledged;
        client.step(&mut state);
        if state.acknowledged > before {
            control.acknowledged.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// ---------------------------------------------------------------- checks

/// Sends one command until it gets an answer that is not an error (the server may be
/// restarting, keys may be locked for a moment); panics past the deadline.
fn call_settled(server: &Server, args: &[&[u8]], deadline: Instant) -> Value {
    let mut last = String::new();
    let mut con = None;
    while Instant::now() < deadline {
        if con.is_none() {
            con = connect_until(&server.client(), deadline);
        }
        let Some(connection) = con.as_mut() else {
            break;
        };
        let mut cmd = redis::cmd(std::str::from_utf8(args[0]).expect("command name"));
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        match Answer::of(connection.req_command(&cmd)) {
            Answer::Reply(reply) => return reply,
            answer => {
                if answer.connection_lost() {
                    con = None;
                }
                last = format!("{answer:?}");
            }
        }
        sleep(Duration::from_millis(100));
    }
    panic!(
        "{:?} kept failing: {last}\n{}",
        String::from_utf8_lossy(args[0]),
        server.logs()
    );
}

/// Every key and its value, from SCAN and MGET.
fn keyspace(server: &Server, deadline: Instant) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut keys = BTreeSet::new();
    let mut cursor = b"0".to_vec();
    loop {
        let reply = call_settled(server, &[b"SCAN", &cursor, b"COUNT", b"1000"], deadline);
        let Value::Array(parts) = reply else {
            panic!("SCAN answered {reply:?}")
        };
        let [Value::BulkString(next), Value::Array(found)] = &parts[..] else {
            panic!("SCAN answered {parts:?}")
        };
        for key in found {
            let Value::BulkString(key) = key else {
                panic!("SCAN key {key:?}")
            };
            keys.insert(key.clone());
        }
        if next.as_slice() == b"0" {
            break;
        }
        cursor = next.clone();
    }
    let keys: Vec<Vec<u8>> = keys.into_iter().collect();
    let mut data = BTreeMap::new();
    for chunk in keys.chunks(200) {
        let mut args: Vec<&[u8]> = vec![b"MGET"];
        args.extend(chunk.iter().map(Vec::as_slice));
        let Value::Array(values) = call_settled(server, &args, deadline) else {
            panic!("MGET did not answer an array")
        };
        for (key, value) in chunk.iter().zip(values) {
            match value {
                Value::BulkString(bytes) => {
                    data.insert(key.clone(), bytes);
                }
                // Deleted between SCAN and MGET: the clients are paused, so this is a finding.
                Value::Nil => panic!(
                    "SCAN listed {:?}, but MGET found nothing while no client was writing",
                    String::from_utf8_lossy(key)
                ),
                other => panic!("MGET value {other:?}"),
            }
        }
    }
    data
}

/// Compares `actual` with the clients' models: the number of keys checked, and every difference.
fn compare_with_models(
    actual: &BTreeMap<Vec<u8>, Vec<u8>>,
    states: &[Arc<Mutex<ClientState>>],
) -> (usize, Vec<String>) {
    let mut problems = Vec::new();
    let mut checked = 0;
    let mut known = BTreeSet::new();
    for (client, state) in states.iter().enumerate() {
        let state = state.lock().expect("client state");
        for (key, value) in &state.model {
            checked += 1;
            known.insert(key.clone().into_bytes());
            let found = actual.get(key.as_bytes()).cloned();
            if found != *value {
                let what = match (value, &found) {
                    (Some(_), None) => "an acknowledged write was lost: the key is missing",
                    (None, Some(_)) => "a deleted (or never written) key exists",
                    _ => "the value differs from the last write",
                };
                problems.push(format!(
                    "client {client} key {key}: {what}: holds {}, expected {}; last requests: {}",
                    show(&found),
                    show(value),
                    state.history_of(key)
                ));
            }
        }
    }
    for key in actual.keys() {
        if !known.contains(key) {
            problems.push(format!(
                "a key no client wrote exists: {:?}",
                String::from_utf8_lossy(key)
            ));
        }
    }
    (checked, problems)
}

/// The number of multi-key writes still prepared on some worker (`SHOAL.TXNS`).
fn in_doubt(server: &Server, deadline: Instant) -> i64 {
    match call_settled(server, &[b"SHOAL.TXNS"], deadline) {
        Value::Int(n) => n,
        other => panic!("SHOAL.TXNS answered {other:?}"),
    }
}

/// Waits until no multi-key write is in doubt (recovery resolves intents older than 5 s).
fn wait_until_no_transaction_in_doubt(server: &Server, round: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let count = in_doubt(server, deadline);
        if count == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "round {round}: SHOAL.TXNS still {count} after 30 s\n{}",
            server.logs()
        );
        sleep(Duration::from_millis(100));
    }
}

/// Reads every partition's log from its start, replays it, and compares the result with the
/// keyspace. Returns the number of entries replayed.
fn check_log(
    server: &Server,
    actual: &BTreeMap<Vec<u8>, Vec<u8>>,
    round: usize,
    deadline: Instant,
) -> usize {
    let mut replayed: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut entries = 0;
    let mut problems = Vec::new();
    for partition in 0..server.partitions {
        let partition_arg = partition.to_string();
        let mut from: i64 = 0;
        let mut last_commit_id = 0;
        loop {
            let from_arg = from.to_string();
            let reply = call_settled(
                server,
                &[
                    b"SHOAL.LOG",
                    partition_arg.as_bytes(),
                    from_arg.as_bytes(),
                    b"COUNT",
                    b"10000",
                ],
                deadline,
            );
            let Value::Array(items) = reply else {
                panic!("SHOAL.LOG answered {reply:?}")
            };
            let count = items.len();
            for item in items {
                let Value::Array(fields) = item else {
                    panic!("a log entry is an array: {item:?}")
                };
                let (
                    Value::Int(commit_id),
                    Value::BulkString(change),
                    Value::Int(collection),
                    Value::BulkString(key),
                    Value::BulkString(data),
                ) = (&fields[0], &fields[2], &fields[3], &fields[4], &fields[5])
                else {
                    panic!("log entry fields: {fields:?}")
                };
                entries += 1;
                let show_key = String::from_utf8_lossy(key);
                if *commit_id <= last_commit_id {
                    problems.push(format!(
                        "partition {partition}: commit id {commit_id} after {last_commit_id}"
                    ));
                }
                last_commit_id = *commit_id;
                if *collection != 0 {
                    problems.push(format!(
                        "partition {partition} commit {commit_id}: collection {collection} was never written"
                    ));
                    continue;
                }
                if server.partition_of(key) != partition {
                    problems.push(format!(
                        "partition {partition} commit {commit_id}: key {show_key} belongs to partition {}",
                        server.partition_of(key)
                    ));
                }
                let existed = replayed.contains_key(key);
                match change.as_slice() {
                    b"create" | b"update" => {
                        if existed != (change.as_slice() == b"update") {
                            problems.push(format!(
                                "partition {partition} commit {commit_id}: {} of {show_key}, which {}",
                                String::from_utf8_lossy(change),
                                if existed { "existed" } else { "did not exist" }
                            ));
                        }
                        replayed.insert(key.clone(), data.clone());
                    }
                    b"delete" => {
                        if !existed {
                            problems.push(format!(
                                "partition {partition} commit {commit_id}: delete of {show_key}, which did not exist"
                            ));
                        }
                        replayed.remove(key);
                    }
                    other => problems.push(format!(
                        "partition {partition} commit {commit_id}: change type {:?}",
                        String::from_utf8_lossy(other)
                    )),
                }
            }
            if count < 10_000 {
                break;
            }
            from = last_commit_id + 1;
        }
    }
    for (key, value) in actual {
        match replayed.get(key) {
            Some(logged) if logged == value => {}
            logged => problems.push(format!(
                "key {:?} holds {:?}, the log replays to {:?}",
                String::from_utf8_lossy(key),
                String::from_utf8_lossy(value),
                logged.map(|l| String::from_utf8_lossy(l).into_owned())
            )),
        }
    }
    for key in replayed.keys() {
        if !actual.contains_key(key) {
            problems.push(format!(
                "the log replays key {:?}, which does not exist",
                String::from_utf8_lossy(key)
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "round {round}: the commit log does not match the data ({entries} entries):\n{}\n{}",
        problems.join("\n"),
        server.logs()
    );
    entries
}

// ---------------------------------------------------------------- the test

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Worker(usize),
    NetDaemon,
    Tree,
}

#[test]
fn acknowledged_writes_survive_kill_9_of_any_process_and_the_log_matches_the_data() {
    let writeback = std::env::var("SHOAL_TORTURE_WRITEBACK_MS")
        .map(|ms| format!("writeback_ms = {ms}\n"))
        .unwrap_or_default();
    torture(&writeback, 8);
}

#[test]
fn with_write_back_acknowledged_writes_survive_kill_9_of_any_process() {
    // Writes are acknowledged from the journal and wait in each worker's transaction:
    // the kills land while some are not in LMDB.
    torture(
        "writeback_ms = 300\nwriteback_idle_ms = 0\nwriteback_min_free_bytes = 0\n",
        4,
    );
}

/// The torture run: `writeback` is a `[storage]` line (or nothing), `default_rounds`
/// the rounds without `SHOAL_TORTURE_ROUNDS` or `SHOAL_LONG_TESTS`.
fn torture(writeback: &str, default_rounds: u64) {
    let rounds = env_count(
        "SHOAL_TORTURE_ROUNDS",
        if long_tests() { 50 } else { default_rounds },
    ) as usize;
    let time_limit = Duration::from_secs(120 + 60 * rounds as u64);
    let started = Instant::now();
    // kill -9 is not a power failure: acknowledged writes survive it with either durability.
    let durability = std::env::var("SHOAL_TORTURE_DURABILITY").unwrap_or_else(|_| "fsync".into());
    eprintln!("durability = {durability:?} {writeback}");
    let mut server = Server::start(&format!(
        "workers = {WORKERS}\n\
         [storage]\npartitions = {PARTITIONS}\nlog_retention_entries = 100000000\nlog_retention_secs = 0\n\
         durability = {durability:?}\n{writeback}\
         [supervisor]\nmax_restarts = 1000\nrestart_window_ms = 2000\n"
    ));
    let seed = test_seed("torture");
    let mut rng = Rng::new(seed);

    let control = Arc::new(Control {
        pause: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        parked: (0..CLIENTS).map(|_| AtomicBool::new(false)).collect(),
        acknowledged: AtomicU64::new(0),
    });
    let mut states = Vec::new();
    let mut handles = Vec::new();
    for index in 0..CLIENTS {
        let mut strings = Vec::new();
        let mut counters = Vec::new();
        let mut worker_of = HashMap::new();
        for worker in 0..WORKERS {
            for key in
                server.keys_on_worker(&format!("t{index}:s{worker}:"), worker, STRINGS_PER_WORKER)
            {
                worker_of.insert(key.clone(), worker);
                strings.push(key);
            }
            counters.extend(server.keys_on_worker(
                &format!("t{index}:n{worker}:"),
                worker,
                COUNTERS_PER_WORKER,
            ));
        }
        let state = ClientState {
            model: strings
                .iter()
                .chain(&counters)
                .map(|k| (k.clone(), None))
                .collect(),
            ..ClientState::default()
        };
        let state = Arc::new(Mutex::new(state));
        states.push(Arc::clone(&state));
        let client = Client {
            index,
            redis: server.client(),
            strings,
            counters,
            worker_of,
            rng: Rng::new(
                seed.wrapping_add(index as u64 + 1)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ),
            sequence: 0,
            connection: None,
        };
        let control = Arc::clone(&control);
        handles.push(std::thread::spawn(move || {
            run_client(client, state, control)
        }));
    }

    let mut kills: BTreeMap<String, usize> = BTreeMap::new();
    let mut schedule = Vec::new();
    let mut keys_checked = 0;
    let mut log_entries = 0;
    let mut log_checks = 0;
    let mut rounds_in_doubt = 0;
    let mut keys_behind_while_in_doubt = 0;
    for round in 0..rounds {
        assert!(
            started.elapsed() < time_limit,
            "round {round}: over the time limit of {time_limit:?}"
        );
        control.pause.store(false, Ordering::Release);
        // Every kind of process in the first three rounds, then at random.
        let target = if round < 3 {
            let kinds = [Target::Worker(0), Target::NetDaemon, Target::Tree];
            match kinds[(round + (seed % 3) as usize) % 3] {
                Target::Worker(_) => Target::Worker(rng.below(WORKERS as u64) as usize),
                other => other,
            }
        } else {
            match rng.below(20) {
                0..=11 => Target::Worker(rng.below(WORKERS as u64) as usize),
                12..=16 => Target::NetDaemon,
                _ => Target::Tree,
            }
        };
        let round_started = Instant::now();
        let delay = rng.duration_between(Duration::from_millis(100), Duration::from_millis(1200));
        sleep(delay);
        let acknowledged_at_kill = control.acknowledged.load(Ordering::Relaxed);
        let name = match target {
            Target::Worker(index) => {
                let pid = server.pid_of("shard-worker", index as u64);
                signal(pid, libc::SIGKILL);
                server.wait_restarted("shard-worker", index as u64, pid, Duration::from_secs(30));
                format!("shard-worker {index}")
            }
            Target::NetDaemon => {
                let pid = server.pid_of("net-daemon", 0);
                signal(pid, libc::SIGKILL);
                server.wait_restarted("net-daemon", 0, pid, Duration::from_secs(30));
                "net-daemon".to_string()
            }
            Target::Tree => {
                server.kill_tree();
                sleep(rng.duration_between(Duration::ZERO, Duration::from_millis(300)));
                server.restart();
                "whole tree".to_string()
            }
        };
        *kills.entry(name.clone()).or_default() += 1;
        schedule.push(format!("{name} after {} ms", delay.as_millis()));
        let restarted_in = round_started.elapsed() - delay;

        // The load goes on after the restart.
        let deadline = Instant::now() + Duration::from_secs(30);
        while control.acknowledged.load(Ordering::Relaxed)
            < acknowledged_at_kill + 20 * CLIENTS as u64
        {
            assert!(
                Instant::now() < deadline,
                "round {round}: the load did not resume within 30 s after killing the {name}\n{}",
                server.logs()
            );
            sleep(Duration::from_millis(10));
        }

        // Pause the clients (each resolves its unknown write first), then check.
        let resumed_in = round_started.elapsed() - delay - restarted_in;
        let pausing = Instant::now();
        control.pause.store(true, Ordering::Release);
        let deadline = Instant::now() + RECONNECT_TIMEOUT + Duration::from_secs(30);
        while !control.parked.iter().all(|p| p.load(Ordering::Acquire)) {
            assert!(
                Instant::now() < deadline,
                "round {round}: the clients did not pause\n{}",
                server.logs()
            );
            sleep(Duration::from_millis(5));
        }
        let violations: Vec<String> = states
            .iter()
            .enumerate()
            .flat_map(|(client, s)| {
                s.lock()
                    .expect("client state")
                    .violations
                    .iter()
                    .map(|v| format!("client {client}: {v}"))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert!(
            violations.is_empty(),
            "round {round} (seed {seed}, kills so far: {schedule:?}):\n{}\n{}",
            violations.join("\n"),
            server.logs()
        );
        // A multi-key write acknowledged while one of its participants died is applied there by
        // recovery; until then SCAN (which does not wait for locks) shows the old state of those
        // keys. Count that, then wait for recovery and compare exactly.
        let paused_in = pausing.elapsed();
        let check_deadline = Instant::now() + Duration::from_secs(60);
        let waited = Instant::now();
        if in_doubt(&server, check_deadline) > 0 {
            let early = keyspace(&server, check_deadline);
            let (_, lagging) = compare_with_models(&early, &states);
            wait_until_no_transaction_in_doubt(&server, round);
            rounds_in_doubt += 1;
            keys_behind_while_in_doubt += lagging.len();
            if !lagging.is_empty() {
                eprintln!(
                    "round {round}: while a multi-key write was in doubt, SCAN + MGET showed {} keys \
                     behind the acknowledged writes (recovery took {} ms): {}",
                    lagging.len(),
                    waited.elapsed().as_millis(),
                    lagging.join(" | ")
                );
            }
        }
        let actual = keyspace(&server, check_deadline);
        let (checked, problems) = compare_with_models(&actual, &states);
        assert!(
            problems.is_empty(),
            "round {round} (seed {seed}, kills: {schedule:?}): the data does not match the \
             acknowledged writes:\n{}\n{}",
            problems.join("\n"),
            server.logs()
        );
        keys_checked += checked;
        let log_checked = (round + 1) % LOG_CHECK_EVERY == 0 || round + 1 == rounds;
        if log_checked {
            log_entries = check_log(&server, &actual, round, check_deadline);
            log_checks += 1;
        }
        eprintln!(
            "round {round}: killed the {name} after {} ms, serving again after {} ms, load resumed \
             after {} ms more, clients paused in {} ms; {} keys match{}; {:.1} s",
            delay.as_millis(),
            restarted_in.as_millis(),
            resumed_in.as_millis(),
            paused_in.as_millis(),
            actual.len(),
            if log_checked {
                format!(", and so does the log ({log_entries} entries)")
            } else {
                String::new()
            },
            round_started.elapsed().as_secs_f64()
        );
    }
    control.stop.store(true, Ordering::Release);
    for handle in handles {
        handle.join().expect("client thread");
    }

    let mut totals = ClientState::default();
    for state in &states {
        let state = state.lock().expect("client state");
        totals.acknowledged += state.acknowledged;
        totals.unknown_applied += state.unknown_applied;
        totals.unknown_not_applied += state.unknown_not_applied;
        totals.failed += state.failed;
        totals.msets_across_workers += state.msets_across_workers;
        for (kind, n) in &state.errors {
            *totals.errors.entry(kind.clone()).or_default() += n;
        }
    }
    eprintln!("kill schedule: {schedule:?}");
    eprintln!(
        "torture: {rounds} rounds in {:.1} s (seed {seed}); kills {kills:?}; {} requests acknowledged, \
         {} unknown ({} found applied, {} not), {} failed with a definite error; {} MSETs across workers; \
         {keys_checked} key values checked against the model; {log_checks} log checks, the last replaying \
         {log_entries} entries",
        started.elapsed().as_secs_f64(),
        totals.acknowledged,
        totals.unknown_applied + totals.unknown_not_applied,
        totals.unknown_applied,
        totals.unknown_not_applied,
        totals.failed,
        totals.msets_across_workers,
    );
    eprintln!("error replies by kind: {:?}", totals.errors);
    eprintln!(
        "{rounds_in_doubt} rounds ended with a multi-key write in doubt; SCAN + MGET showed \
         {keys_behind_while_in_doubt} keys behind an acknowledged write until recovery applied it"
    );
    assert!(totals.acknowledged > 0);
    assert!(log_checks > 0);
}

//! LMDB under process faults: a process killed inside a read transaction leaves no
//! reader slot behind once Shoal has noticed, so the data file stops growing; a worker
//! killed inside a write transaction leaves its environment at the last commit, and the
//! restarted worker serves every acknowledged write and takes new ones.
//!
//! The reader table and the page count are read with `mdb_stat` built from the LMDB
//! sources that Shoal itself links (lmdb-master-sys, LMDB 0.9.70). Debian's
//! `lmdb-utils` (0.9.24) cannot be used: its lock-file format differs and it fails with
//! MDB_VERSION_MISMATCH. Set `SHOAL_LMDB_TOOLS` to a directory holding `mdb_stat` and
//! `mdb_dump` of that LMDB version to skip the build; without either, the tests fail
//! with a message that says so.
//!
//! `SHOAL_LONG_TESTS=1` adds 16 write-fault kills at random (seeded) instants.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{encode_command, signal, wait_until, Resp, Server};

// ---------------------------------------------------------------- LMDB tools

/// The directory of the LMDB sources that lmdb-master-sys (as locked) builds Shoal with.
fn lmdb_sources() -> Result<PathBuf, String> {
    let lock_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    let lock = std::fs::read_to_string(&lock_path)
        .map_err(|e| format!("reading {}: {e}", lock_path.display()))?;
    let version = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"lmdb-master-sys\""))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = ")))
        .map(|v| v.trim_matches('"').to_string())
        .ok_or("no lmdb-master-sys in Cargo.lock")?;
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .ok_or("neither CARGO_HOME nor HOME is set")?;
    let registry = cargo_home.join("registry/src");
    let entries =
        std::fs::read_dir(&registry).map_err(|e| format!("{}: {e}", registry.display()))?;
    for entry in entries.flatten() {
        let dir = entry
            .path()
            .join(format!("lmdb-master-sys-{version}/lmdb/libraries/liblmdb"));
        if dir.join("mdb_stat.c").exists() {
            return Ok(dir);
        }
    }
    Err(format!(
        "lmdb-master-sys-{version} sources not found under {}",
        registry.display()
    ))
}

/// `mdb_stat` and `mdb_dump` of the LMDB version Shoal links; built once per test run.
fn lmdb_tools() -> &'static Path {
    static TOOLS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let tools = TOOLS.get_or_init(|| {
        if let Some(dir) = std::env::var_os("SHOAL_LMDB_TOOLS") {
            return Ok(PathBuf::from(dir));
        }
        let sources = lmdb_sources()?;
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("lmdb-tools");
        std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
        for tool in ["mdb_stat", "mdb_dump"] {
            if out.join(tool).exists() {
                continue;
            }
            let output = Command::new("cc")
                .args(["-O1", "-pthread", "-DMDB_IDL_LOGN=16", "-w", "-I"])
                .arg(&sources)
                .arg(sources.join(format!("{tool}.c")))
                .arg(sources.join("mdb.c"))
                .arg(sources.join("midl.c"))
                .arg("-o")
                .arg(out.join(format!("{tool}.tmp")))
                .output()
                .map_err(|e| format!("running cc: {e}"))?;
            if !output.status.success() {
                return Err(format!(
                    "cc {tool}: {}",
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
            std::fs::rename(out.join(format!("{tool}.tmp")), out.join(tool))
                .map_err(|e| e.to_string())?;
        }
        Ok(out)
    });
    match tools {
        Ok(dir) => dir,
        Err(why) => panic!(
            "these tests need mdb_stat and mdb_dump of the LMDB version Shoal links \
             (Debian's lmdb-utils is too old: MDB_VERSION_MISMATCH). Building them from the \
             lmdb-master-sys sources failed: {why}. Install a C compiler (cc), or set \
             SHOAL_LMDB_TOOLS to a directory holding both tools."
        ),
    }
}

fn mdb_stat(env: &Path, flag: &str) -> String {
    let output = Command::new(lmdb_tools().join("mdb_stat"))
        .arg(flag)
        .arg(env)
        .output()
        .expect("run mdb_stat");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    // `mdb_stat -r` exits 1 after listing the table (its last call's return value).
    let listed = flag == "-r" && stdout.starts_with("Reader Table Status");
    assert!(
        output.status.success() || listed,
        "mdb_stat {flag} {}: {}",
        env.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// "Number of pages used" of an environment: the high-water mark of its data file.
fn pages_used(env: &Path) -> u64 {
    let text = mdb_stat(env, "-e");
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Number of pages used:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no page count in mdb_stat -e:\n{text}"))
}

/// The reader table: (pid, txnid or None for an idle slot).
fn readers(env: &Path) -> Vec<(i32, Option<u64>)> {
    mdb_stat(env, "-r")
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let pid = fields.next()?.parse().ok()?;
            let _thread = fields.next()?;
            let txnid = fields.next()?.parse().ok();
            Some((pid, txnid))
        })
        .collect()
}

fn holds_reader(env: &Path, pid: i32) -> bool {
    readers(env)
        .iter()
        .any(|&(p, txnid)| p == pid && txnid.is_some())
}

/// A process that holds a read transaction on `env` and stays inside it: `mdb_dump` of
/// collection 0 writing to a pipe nobody reads.
fn stuck_reader(env: &Path) -> Child {
    let child = Command::new(lmdb_tools().join("mdb_dump"))
        .args(["-s", "c0"])
        .arg(env)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mdb_dump");
    let pid = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !holds_reader(env, pid) {
        assert!(
            Instant::now() < deadline,
            "mdb_dump never showed in the reader table: {:?}",
            readers(env)
        );
        sleep(Duration::from_millis(20));
    }
    // Its pipe fills and it blocks inside the transaction (or it finishes, which the
    // assertion below reports).
    wait_until(
        "mdb_dump to block on its full output pipe",
        Duration::from_secs(10),
        || {
            if blocked_on_full_pipe(&child) || !common::process_alive(pid) {
                Ok(())
            } else {
                Err(format!("{} bytes in its pipe", pipe_queued_bytes(&child).0))
            }
        },
    );
    assert!(
        holds_reader(env, pid),
        "mdb_dump finished instead of blocking"
    );
    child
}

fn kill_and_reap(mut child: Child) -> i32 {
    let pid = child.id() as i32;
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    pid
}

// ---------------------------------------------------------------- writes

/// A connection with its own reader, for pipelines larger than the socket buffers.
fn pipeline(port: u16, commands: Vec<Vec<u8>>) -> std::thread::JoinHandle<Vec<Resp>> {
    std::thread::spawn(move || {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut writer = stream.try_clone().expect("clone");
        let count = commands.len();
        let sender = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            for command in commands {
                bytes.extend_from_slice(&command);
                if bytes.len() > 256 * 1024 {
                    if writer.write_all(&bytes).is_err() {
                        return;
                    }
                    bytes.clear();
                }
            }
            let _ = writer.write_all(&bytes);
        });
        let mut reader = BufReader::new(stream);
        let mut replies = Vec::with_capacity(count);
        while replies.len() < count {
            match read_simple_reply(&mut reader) {
                Some(reply) => replies.push(reply),
                None => break,
            }
        }
        let _ = sender.join();
        replies
    })
}

/// Reads one reply of the kinds these tests get (+, -, :, $); None at EOF or an error.
fn read_simple_reply(reader: &mut BufReader<TcpStream>) -> Option<Resp> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at(1);
    Some(match kind {
        "+" => Resp::Simple(rest.into()),
        "-" => Resp::Error(rest.into()),
        ":" => Resp::Int(rest.parse().ok()?),
        "$" => {
            let len: i64 = rest.parse().ok()?;
            if len < 0 {
                Resp::NilBulk
            } else {
                let mut bytes = vec![0u8; len as usize + 2];
                reader.read_exact(&mut bytes).ok()?;
                bytes.truncate(len as usize);
                Resp::Bulk(bytes)
            }
        }
        _ => return None,
    })
}

/// Sets every key to `value` in pipelined batches and checks the replies.
fn set_all(server: &Server, keys: &[String], value: &[u8]) {
    let commands = keys
        .iter()
        .map(|k| encode_command(&[b"SET", k.as_bytes(), value]))
        .collect();
    let replies = pipeline(server.port, commands).join().expect("pipeline");
    assert_eq!(replies.len(), keys.len(), "a reply per SET");
    assert!(
        replies.iter().all(|r| *r == Resp::Simple("OK".into())),
        "every SET succeeded: {:?}",
        replies.iter().find(|r| **r != Resp::Simple("OK".into()))
    );
}

/// `rounds` overwrites of every key, each followed by a wait for housekeeping to trim the
/// commit log of every partition written to its one retained entry (see [`ONE_WORKER`]).
fn overwrite_rounds(server: &Server, keys: &[String], rounds: usize, round_tag: &mut u64) {
    let mut partitions: Vec<u32> = keys
        .iter()
        .map(|k| server.partition_of(k.as_bytes()))
        .collect();
    partitions.sort_unstable();
    partitions.dedup();
    let mut conn = server.raw();
    for _ in 0..rounds {
        *round_tag += 1;
        let value = format!("{:0>1000}", *round_tag);
        set_all(server, keys, value.as_bytes());
        wait_until(
            "housekeeping to trim every written partition's log to one entry",
            Duration::from_secs(10),
            || {
                let untrimmed: Vec<(u32, usize)> = partitions
                    .iter()
                    .map(|p| {
                        let log = conn.cmd(&["SHOAL.LOG", &p.to_string(), "0", "COUNT", "10"]);
                        (*p, log.array().len())
                    })
                    .filter(|&(_, entries)| entries > 1)
                    .collect();
                match untrimmed.first() {
                    None => Ok(()),
                    Some((p, entries)) => Err(format!(
                        "{} partitions untrimmed, e.g. {p} with {entries} entries",
                        untrimmed.len()
                    )),
                }
            },
        );
    }
}

fn worker_env(server: &Server) -> PathBuf {
    server.data_dir.join("shard-0")
}

/// One worker, and a commit log trimmed to one entry per partition, so that steady
/// overwrites of the same keys need a steady number of pages.
const ONE_WORKER: &str = "workers = 1\n[storage]\nlog_retention_entries = 1\n";

/// Rounds of overwrites after which the file must have stopped growing once nothing pins
/// old pages: free-list churn, the commit log (trimmed between ticks, so it briefly holds
/// more than one entry per partition) and the pages written since the last checkpoint
/// (reused only after the next, docs/architecture.md, *Durability*) settle within a few.
const MAX_ROUNDS_TO_STEADY: usize = 30;
/// Rounds in a row that must leave the page count unchanged to call the file steady.
const STEADY_ROUNDS: usize = 3;

/// Overwrites `keys` round after round until [`STEADY_ROUNDS`] rounds in a row leave the
/// file's page count unchanged; returns that count. Panics, with the counts seen, if the
/// file still grows after [`MAX_ROUNDS_TO_STEADY`] rounds.
fn rounds_until_steady(server: &Server, keys: &[String], round_tag: &mut u64, what: &str) -> u64 {
    let env = worker_env(server);
    let mut seen = vec![pages_used(&env)];
    while seen.len() <= MAX_ROUNDS_TO_STEADY {
        overwrite_rounds(server, keys, 1, round_tag);
        seen.push(pages_used(&env));
        let last = &seen[seen.len().saturating_sub(STEADY_ROUNDS + 1)..];
        if last.len() == STEADY_ROUNDS + 1 && last.iter().all(|&p| p == last[0]) {
            eprintln!("{what}: pages used per round {seen:?}");
            return last[0];
        }
    }
    panic!("{what}: the file still grew after {MAX_ROUNDS_TO_STEADY} rounds of overwrites: pages used per round {seen:?}");
}

/// Pages that one round of overwrites of `keys` with 1000-byte values needs at least:
/// what a reader pinning the old pages makes the file grow by, every round.
fn pages_per_round(keys: &[String]) -> u64 {
    (keys.len() as u64 * 1000) / 4096
}

// ---------------------------------------------------------------- tests

#[test]
fn reader_slot_of_a_process_killed_mid_read_is_freed_and_the_file_stops_growing() {
    lmdb_tools();
    let server = Server::start(ONE_WORKER);
    let env = worker_env(&server);
    let keys: Vec<String> = (0..2000).map(|i| format!("over:{i}")).collect();
    let mut tag = 0;
    let settled = rounds_until_steady(&server, &keys, &mut tag, "with no reader");

    // A reader inside its transaction pins the snapshot: overwrites must take new pages.
    let dump = stuck_reader(&env);
    let before_pin = pages_used(&env);
    let pinned_rounds = 12;
    overwrite_rounds(&server, &keys, pinned_rounds, &mut tag);
    let pinned = pages_used(&env);

    // Killed -9 inside the transaction: its slot stays in the lock file until a live
    // process frees it. The worker's housekeeping does, within about a second.
    let dead = kill_and_reap(dump);
    let killed_at = Instant::now();
    let seen_stale = holds_reader(&env, dead);
    while holds_reader(&env, dead) {
        assert!(
            killed_at.elapsed() < Duration::from_secs(5),
            "the slot of dead pid {dead} is still in the reader table 5 s later: {:?}",
            readers(&env)
        );
        sleep(Duration::from_millis(50));
    }
    let freed_after = killed_at.elapsed();
    eprintln!(
        "stuck reader: steady at {settled} pages with no reader; {before_pin} -> {pinned} over \
         {pinned_rounds} rounds with a reader pinned; slot of killed pid {dead} (seen right \
         after the kill: {seen_stale}) freed after {freed_after:?}"
    );
    let needed = pinned_rounds as u64 * pages_per_round(&keys);
    assert!(
        pinned - before_pin >= needed,
        "a pinned reader makes every round of overwrites take new pages, at least {needed} \
         over {pinned_rounds} rounds (else this test could not tell): {before_pin} -> {pinned}"
    );
    // Once the dead reader's slot is freed, the file stops growing again.
    rounds_until_steady(
        &server,
        &keys,
        &mut tag,
        "after the dead reader's slot was freed",
    );
}

/// Stops the worker in short steps until it is seen inside a read transaction, then kills
/// it there. Returns false if `done` reports the read finished first.
fn kill_inside_read(env: &Path, worker: i32, done: &mut dyn FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        signal(worker, libc::SIGSTOP);
        while common::process_alive(worker) && !is_stopped(worker) {
            std::thread::yield_now();
        }
        if holds_reader(env, worker) {
            signal(worker, libc::SIGKILL);
            return true;
        }
        signal(worker, libc::SIGCONT);
        if done() {
            return false;
        }
        sleep(Duration::from_micros(300));
    }
    false
}

/// The bytes waiting in `child`'s stdout pipe, and the pipe's capacity.
fn pipe_queued_bytes(child: &Child) -> (i32, i32) {
    use std::os::fd::AsRawFd;
    let Some(stdout) = child.stdout.as_ref() else {
        return (0, 0);
    };
    let fd = stdout.as_raw_fd();
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer; F_GETPIPE_SZ only reads the
    // fd, which stays open while `child` is borrowed.
    let (read, capacity) = unsafe {
        (
            libc::ioctl(fd, libc::FIONREAD, &mut queued),
            libc::fcntl(fd, libc::F_GETPIPE_SZ),
        )
    };
    if read == 0 {
        (queued, capacity)
    } else {
        (0, capacity)
    }
}

/// Whether `child` sleeps in a write to its stdout pipe, which is full.
fn blocked_on_full_pipe(child: &Child) -> bool {
    let (queued, capacity) = pipe_queued_bytes(child);
    let in_pipe_write = std::fs::read_to_string(format!("/proc/{}/wchan", child.id()))
        .is_ok_and(|wchan| wchan.ends_with("pipe_write"));
    in_pipe_write || (capacity > 0 && queued >= capacity)
}

fn is_stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            rest.trim_start().chars().next()
        })
        .is_some_and(|state| state == 'T' || state == 't')
}

/// Waits (bounded) until shard-worker 0 runs with a pid other than `old`, is ready, and
/// the net-daemon's link to it is back.
fn wait_for_restart(server: &Server, old: i32) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let pid = server.wait_restarted("shard-worker", 0, old, Duration::from_secs(30));
    while server.raw().cmd(&["GET", "probe"]).is_error() {
        assert!(
            Instant::now() < deadline,
            "shard-worker 0 was not reachable within 30 s\n{}",
            server.logs()
        );
        sleep(Duration::from_millis(50));
    }
    pid
}

#[test]
fn worker_killed_inside_a_backup_read_leaves_no_reader_slot_after_restart() {
    lmdb_tools();
    let server = Server::start(ONE_WORKER);
    let env = worker_env(&server);
    // Enough data that copying it takes a while.
    let big: Vec<String> = (0..20_000).map(|i| format!("bulk:{i}")).collect();
    set_all(&server, &big, &[b'b'; 1000]);
    let keys: Vec<String> = (0..2000).map(|i| format!("over:{i}")).collect();
    let mut tag = 0;
    overwrite_rounds(&server, &keys, 3, &mut tag);

    // A live reader from another process keeps the lock file open across the worker's
    // death, so the restarted worker cannot just reset the table: it must find the dead
    // slot itself.
    let witness = stuck_reader(&env);
    let old = server.worker_pid(0);
    let mut caught = false;
    for attempt in 0..10 {
        let dir = server.dir.path().join(format!("backup-{attempt}"));
        let mut conn = server.raw();
        conn.send(&encode_command(&[
            b"SHOAL.BACKUP",
            dir.to_str().unwrap().as_bytes(),
        ]));
        conn.set_read_timeout(Duration::from_millis(1));
        let mut done = || conn.read_line().is_ok();
        if kill_inside_read(&env, old, &mut done) {
            caught = true;
            break;
        }
    }
    assert!(caught, "never caught the worker inside its backup read");
    let stale_seen = holds_reader(&env, old);
    let new = wait_for_restart(&server, old);
    let table = readers(&env);
    eprintln!(
        "worker {old} killed inside a read (slot seen after the kill: {stale_seen}); \
         restarted as {new}; reader table now {table:?}"
    );
    assert!(
        stale_seen,
        "the dead worker's slot was in the table after the kill"
    );
    assert!(
        !table.iter().any(|&(pid, _)| pid == old),
        "the restarted worker freed the dead worker's slot: {table:?}"
    );
    assert!(
        holds_reader(&env, witness.id() as i32),
        "the live reader's slot is kept: {table:?}"
    );

    // With the live reader gone too, overwrites reach a steady state again.
    let dead_witness = kill_and_reap(witness);
    let deadline = Instant::now() + Duration::from_secs(5);
    while holds_reader(&env, dead_witness) {
        assert!(Instant::now() < deadline, "witness slot not freed");
        sleep(Duration::from_millis(50));
    }
    rounds_until_steady(&server, &keys, &mut tag, "after the restart");
    assert_eq!(
        server.raw().cmd(&["GET", "bulk:19999"]),
        Resp::Bulk(vec![b'b'; 1000])
    );
}

#[test]
fn worker_killed_inside_write_transactions_keeps_every_acknowledged_write() {
    lmdb_tools();
    let server = Server::start("workers = 1\n[supervisor]\nmax_restarts = 100\n");
    let env = worker_env(&server);
    let n = 20_000;
    // Four fixed kill instants; the long form adds 16 at random (seeded) instants.
    let mut delays = vec![20u64, 60, 150, 1000];
    if common::long_tests() {
        let mut rng = common::Rng::new(common::test_seed("write-fault kill instants"));
        delays.extend((0..16).map(|_| 5 + rng.below(1500)));
    }
    for (round, delay_ms) in delays.into_iter().enumerate() {
        let old = server.worker_pid(0);
        let set_keys: Vec<String> = (0..n).map(|i| format!("set:{round}:{i}")).collect();
        let sets = pipeline(
            server.port,
            set_keys
                .iter()
                .map(|k| encode_command(&[b"SET", k.as_bytes(), k.as_bytes()]))
                .collect(),
        );
        let mset_keys: Vec<String> = (0..n).map(|i| format!("mset:{round}:{i}")).collect();
        let mut mset: Vec<&[u8]> = vec![b"MSET"];
        for key in &mset_keys {
            mset.push(key.as_bytes());
            mset.push(b"m");
        }
        let mset = pipeline(server.port, vec![encode_command(&mset)]);
        // The kill instant under test, not a wait for a condition.
        sleep(Duration::from_millis(delay_ms));
        signal(old, libc::SIGKILL);
        let set_replies = sets.join().expect("SET pipeline");
        let mset_reply = mset.join().expect("MSET").pop();
        wait_for_restart(&server, old);

        let acked: Vec<&String> = set_keys
            .iter()
            .zip(&set_replies)
            .filter(|(_, reply)| **reply == Resp::Simple("OK".into()))
            .map(|(key, _)| key)
            .collect();
        let mut conn = server.conn();
        let mut missing = 0;
        for chunk in acked.chunks(1000) {
            let values: Vec<Option<String>> = redis::cmd("MGET")
                .arg(chunk)
                .query(&mut conn)
                .expect("MGET");
            missing += chunk
                .iter()
                .zip(values)
                .filter(|(key, value)| value.as_deref() != Some(key.as_str()))
                .count();
        }
        let mset_present: usize = mset_keys
            .chunks(1000)
            .map(|chunk| {
                let count: usize = redis::cmd("EXISTS")
                    .arg(chunk)
                    .query(&mut conn)
                    .expect("EXISTS");
                count
            })
            .sum();
        eprintln!(
            "write fault {round} (kill after {delay_ms} ms): {} of {n} pipelined SETs \
             acknowledged, {missing} of them missing after the restart; MSET replied \
             {mset_reply:?}, {mset_present} of {n} keys present",
            acked.len()
        );
        assert_eq!(missing, 0, "every acknowledged SET survived");
        assert!(
            mset_present == 0 || mset_present == n,
            "MSET is all or nothing: {mset_present} of {n}"
        );
        if mset_reply == Some(Resp::Simple("OK".into())) {
            assert_eq!(mset_present, n, "an acknowledged MSET survived whole");
        }
        // The environment opens for other processes and new writes work.
        assert!(pages_used(&env) > 0);
        let _: () = redis::cmd("SET")
            .arg(format!("after:{round}"))
            .arg("x")
            .query(&mut conn)
            .expect("a write after the restart");
    }

    // FLUSHALL of a full shard, killed at several points: all or nothing.
    for delay_ms in [5u64, 40, 150] {
        let mut before: usize = redis::cmd("DBSIZE")
            .query(&mut server.conn())
            .expect("DBSIZE");
        if before < n {
            let refill: Vec<String> = (0..n).map(|i| format!("refill:{delay_ms}:{i}")).collect();
            set_all(&server, &refill, b"r");
            before = redis::cmd("DBSIZE")
                .query(&mut server.conn())
                .expect("DBSIZE");
        }
        let old = server.worker_pid(0);
        let flush = pipeline(server.port, vec![encode_command(&[b"FLUSHALL"])]);
        // The kill instant under test, not a wait for a condition.
        sleep(Duration::from_millis(delay_ms));
        signal(old, libc::SIGKILL);
        let flush_reply = flush.join().expect("FLUSHALL").pop();
        wait_for_restart(&server, old);
        let after: usize = redis::cmd("DBSIZE")
            .query(&mut server.conn())
            .expect("DBSIZE");
        eprintln!(
            "FLUSHALL killed after {delay_ms} ms: replied {flush_reply:?}; DBSIZE {before} -> \
             {after}"
        );
        assert!(
            after == 0 || after == before,
            "FLUSHALL is all or nothing: {before} -> {after}"
        );
        if flush_reply == Some(Resp::Simple("OK".into())) {
            assert_eq!(after, 0);
        }
    }
    let mut conn = server.raw();
    assert_eq!(
        conn.cmd(&["SET", "last", "write"]),
        Resp::Simple("OK".into())
    );
    assert_eq!(conn.cmd(&["GET", "last"]), Resp::Bulk(b"write".to_vec()));
}

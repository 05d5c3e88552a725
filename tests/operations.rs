//! Running Shoal as a service: systemd notifications and watchdog, hung children
//! replaced within `supervisor.child_timeout_ms`, and the shipped unit file.

mod common;

use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{signal, Server, SHOAL};

/// Reads every datagram that arrives within `window`.
fn collect(socket: &UnixDatagram, window: Duration) -> Vec<String> {
    let deadline = Instant::now() + window;
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        if let Ok(len) = socket.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..len]).into_owned());
        }
    }
    messages
}

#[test]
fn systemd_sees_ready_status_watchdog_and_stopping() {
    let server = Server::configure("");
    let socket_path = server.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    let mut child = server
        .command()
        .arg("serve")
        .arg("--config")
        .arg(&server.config_path)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "1000000")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(server.dir.path().join("serve.stderr")).unwrap())
        .process_group(0)
        .spawn()
        .expect("spawn shoal serve");

    let messages = collect(&socket, Duration::from_secs(4));
    let ready = messages.iter().position(|m| m.contains("READY=1"));
    let Some(ready) = ready else {
        signal(-(child.id() as i32), libc::SIGKILL);
        panic!("no READY=1 within 4 s: {messages:?}");
    };
    assert!(
        messages[ready].contains("STATUS=serving on"),
        "READY comes with a status line: {messages:?}"
    );
    let watchdogs = messages[ready..]
        .iter()
        .filter(|m| m.contains("WATCHDOG=1"))
        .count();
    // The watchdog timeout is 1 s, so the supervisor pings every 0.5 s.
    assert!(
        watchdogs >= 4,
        "expected periodic WATCHDOG=1 after READY, got {watchdogs}: {messages:?}"
    );
    for message in &messages[..ready] {
        assert!(
            !message.contains("WATCHDOG=1"),
            "no watchdog before READY: {messages:?}"
        );
    }

    signal(child.id() as i32, libc::SIGTERM);
    let stopping = collect(&socket, Duration::from_secs(2));
    assert!(
        stopping.iter().any(|m| m.contains("STOPPING=1")),
        "STOPPING=1 on SIGTERM: {stopping:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "shoal did not stop within 15 s");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
}

#[test]
fn a_stopped_worker_is_replaced_within_child_timeout_and_loses_nothing() {
    let server = Server::start("[supervisor]\nchild_timeout_ms = 1500\n");
    let mut con = server.conn();
    let keys: Vec<String> = (0..400).map(|i| format!("hb:{i}")).collect();
    for (i, key) in keys.iter().enumerate() {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(i)
            .query(&mut con)
            .expect("SET before the stop");
    }
    let victim = server.worker_pid(0);
    signal(victim, libc::SIGSTOP);
    let stopped = Instant::now();

    // Keys of the other worker keep answering while the stopped one is replaced.
    let survivor_key = server.keys_on_worker("hb-live:", 1, 1).remove(0);
    let _: () = redis::cmd("SET")
        .arg(&survivor_key)
        .arg("x")
        .query(&mut con)
        .expect("the live worker answers");

    let replaced = loop {
        let status = server.status_json().expect("status");
        let worker = common::find_process(&status, "shard-worker", 0)
            .expect("worker 0")
            .clone();
        if worker["pid"].as_i64() != Some(i64::from(victim)) && worker["state"] == "ready" {
            break stopped.elapsed();
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "worker 0 was not replaced: {status}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        replaced <= Duration::from_millis(1500 + 1000),
        "replaced after {replaced:?}; the limit is child_timeout_ms + 1 s"
    );
    assert!(
        !common::process_alive(victim),
        "the stopped worker was killed"
    );

    // The net-daemon reconnects to the new worker within a few hundred ms.
    let mut con = server.conn();
    let reconnect_deadline = Instant::now() + Duration::from_secs(3);
    while redis::cmd("GET")
        .arg(&keys[0])
        .query::<Option<i64>>(&mut con)
        .is_err()
    {
        assert!(
            Instant::now() < reconnect_deadline,
            "worker 0's keys did not answer again within 3 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every acknowledged write is still there, and the new worker takes writes.
    for (i, key) in keys.iter().enumerate() {
        let value: Option<i64> = redis::cmd("GET")
            .arg(key)
            .query(&mut con)
            .expect("GET after the restart");
        assert_eq!(value, Some(i as i64), "{key}");
    }
    let _: () = redis::cmd("SET")
        .arg("hb:after")
        .arg(1)
        .query(&mut con)
        .expect("SET after the restart");
    let status = server.status_json().expect("status");
    assert!(
        common::find_process(&status, "shard-worker", 0).unwrap()["restarts"].as_u64() >= Some(1)
    );
}

#[test]
fn the_unit_file_verifies() {
    let Ok(output) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("systemd-analyze is not installed; skipping");
        return;
    };
    assert!(output.status.success());
    // The unit names the installed path; verify it against the binary built here.
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/shoal.service"
    ))
    .unwrap();
    assert!(
        unit.contains("Type=notify")
            && unit.contains("WatchdogSec=")
            && unit.contains("NoNewPrivileges=yes")
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shoal.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/shoal", SHOAL)).unwrap();
    let output = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Running outside a booted systemd may warn about the host; only errors about the unit fail.
    let unit_errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("shoal.service"))
        .collect();
    assert!(unit_errors.is_empty(), "systemd-analyze verify: {stderr}");
}

/// Writes 64 KiB values under `prefix{i}` until one is refused; returns the keys
/// acknowledged and the refusal's text.
fn fill(con: &mut redis::Connection, prefix: &str, limit: usize) -> (Vec<String>, String) {
    let value = vec![b'v'; 64 * 1024];
    let mut written = Vec::new();
    for i in 0..limit {
        let key = format!("{prefix}{i}");
        match redis::cmd("SET").arg(&key).arg(&value).query::<()>(con) {
            Ok(()) => written.push(key),
            Err(error) => return (written, error.to_string()),
        }
    }
    panic!("{limit} writes of 64 KiB were all accepted");
}

/// Retries a 64 KiB SET until it is accepted, for at most `timeout`.
fn writes_resume(con: &mut redis::Connection, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        match redis::cmd("SET")
            .arg("disk:after")
            .arg(vec![b'v'; 64 * 1024])
            .query::<()>(con)
        {
            Ok(()) => return,
            Err(error) => assert!(Instant::now() < deadline, "writes did not resume: {error}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_all_present(con: &mut redis::Connection, keys: &[String]) {
    for key in keys {
        let len: usize = redis::cmd("STRLEN").arg(key).query(con).expect("STRLEN");
        assert_eq!(len, 64 * 1024, "{key} lost");
    }
}

#[test]
fn a_map_at_its_cap_refuses_writes_keeps_reads_and_takes_writes_after_a_raise() {
    // Every group commit committed in LMDB.
    map_at_its_cap("writeback_ms = 0\n");
}

#[test]
fn with_write_back_a_map_at_its_cap_refuses_writes_and_loses_none() {
    map_at_its_cap("writeback_ms = 200\nwriteback_min_free_bytes = 0\n");
}

fn map_at_its_cap(storage: &str) {
    let mut server = Server::start(&format!(
        "workers = 1\n[storage]\nmap_size_bytes = 1048576\nmax_map_size_bytes = 4194304\n{storage}"
    ));
    let mut con = server.conn();
    let (written, refusal) = fill(&mut con, "cap:", 200);
    assert!(
        refusal.contains("OOM") && refusal.contains("max_map_size_bytes"),
        "{refusal}"
    );
    assert!(!written.is_empty());
    assert_all_present(&mut con, &written);
    let pong: String = redis::cmd("PING")
        .query(&mut con)
        .expect("the server stays up");
    assert_eq!(pong, "PONG");
    drop(con);

    server.stop();
    server.update_config(&format!(
        "[storage]\nmax_map_size_bytes = 67108864\n{storage}"
    ));
    server.spawn_and_wait();
    let mut con = server.conn();
    assert_all_present(&mut con, &written);
    let _: () = redis::cmd("SET")
        .arg("cap:after")
        .arg(vec![b'v'; 64 * 1024])
        .query(&mut con)
        .expect("writes resume");
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(path: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .ok()?;
        status.success().then(|| Tmpfs(path.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_refuses_writes_keeps_reads_and_recovers_when_space_returns() {
    let mut server = Server::configure("workers = 1\n[storage]\nmap_size_bytes = 1048576\n");
    let Some(_disk) = Tmpfs::mount(&server.data_dir, "8m") else {
        eprintln!("cannot mount a tmpfs here (not root?); skipping the full-disk test");
        return;
    };
    // Space to give back later.
    let filler = server.data_dir.join("filler");
    std::fs::write(&filler, vec![0u8; 3 << 20]).unwrap();
    server.spawn_and_wait();
    let mut con = server.conn();
    let (written, refusal) = fill(&mut con, "disk:", 200);
    assert!(refusal.contains("DISKFULL"), "{refusal}");
    assert_all_present(&mut con, &written);
    server.assert_alive("after the disk filled");
    // Write-back (on by default) pauses on a disk with little room: every group commit
    // is committed, so the restart below has none to commit first.
    assert!(
        server.logs().contains("write-back paused"),
        "write-back pauses with little free space\n{}",
        server.logs()
    );

    // A worker that starts on the full disk (killed, and started again by the
    // supervisor) has no room for its checkpoint: it serves reads and refuses writes.
    // The refused batch may have left some room: a second filler takes it.
    let rest = server.data_dir.join("rest");
    fill_the_disk(&rest);
    let victim = server.worker_pid(0);
    signal(victim, libc::SIGKILL);
    let killed = Instant::now();
    loop {
        let status = server.status_json().expect("status");
        let worker = common::find_process(&status, "shard-worker", 0).expect("worker 0");
        if worker["pid"].as_i64() != Some(i64::from(victim)) && worker["state"] == "ready" {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "worker 0 did not start again on the full disk: {status}\n{}",
            server.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut con = server.conn();
    // The net-daemon takes the worker back once it has connected to it again.
    while let Err(error) = redis::cmd("STRLEN")
        .arg(&written[0])
        .query::<usize>(&mut con)
    {
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "worker 0 does not serve reads on the full disk: {error}\n{}",
            server.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_all_present(&mut con, &written);
    let refused = redis::cmd("SET")
        .arg("disk:restarted")
        .arg(vec![b'v'; 64 * 1024])
        .query::<()>(&mut con)
        .expect_err("a write on the full disk is refused");
    assert!(refused.to_string().contains("DISKFULL"), "{refused}");
    assert!(
        server.logs().contains("no room for a checkpoint"),
        "the restarted worker found no room for its checkpoint\n{}",
        server.logs()
    );

    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(&rest).unwrap();
    writes_resume(&mut con, Duration::from_secs(5));
    assert_all_present(&mut con, &written);
    drop(con);
    server.stop();
}

/// Writes `path` until its filesystem has no room left.
fn fill_the_disk(path: &std::path::Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 4096];
    while file
        .write_all(&block)
        .and_then(|()| file.sync_data())
        .is_ok()
    {}
}

#[test]
fn with_write_back_a_full_disk_refuses_writes_keeps_reads_and_recovers_when_space_returns() {
    // Acknowledged writes that LMDB cannot commit for want of room stay in the worker's
    // transaction: reads see them, writes are refused until the commit succeeds. The
    // commit needs about as much room again as their journal records took, so more
    // than that is given back.
    let mut server = Server::configure(
        "workers = 1\n[storage]\nmap_size_bytes = 1048576\nwriteback_ms = 2000\nwriteback_idle_ms = 0\nwriteback_min_free_bytes = 0\n",
    );
    let Some(_disk) = Tmpfs::mount(&server.data_dir, "16m") else {
        eprintln!("cannot mount a tmpfs here (not root?); skipping the full-disk test");
        return;
    };
    let filler = server.data_dir.join("filler");
    std::fs::write(&filler, vec![0u8; 10 << 20]).unwrap();
    server.spawn_and_wait();
    let mut con = server.conn();
    let (written, refusal) = fill(&mut con, "disk:", 200);
    assert!(refusal.contains("DISKFULL"), "{refusal}");
    assert_all_present(&mut con, &written);
    // Past the window the worker tries to commit them, finds no room, and keeps them:
    // still refused and still read.
    common::wait_until(
        "a commit that finds no room",
        Duration::from_secs(20),
        || match server
            .logs()
            .contains("no room to commit acknowledged writes")
        {
            true => Ok(()),
            false => Err("not yet".to_string()),
        },
    );
    let refused = redis::cmd("SET")
        .arg("disk:more")
        .arg(vec![b'v'; 64 * 1024])
        .query::<()>(&mut con)
        .expect_err("a write on the full disk is refused");
    assert!(refused.to_string().contains("DISKFULL"), "{refused}");
    assert_all_present(&mut con, &written);
    server.assert_alive("with the disk full");

    std::fs::remove_file(&filler).unwrap();
    writes_resume(&mut con, Duration::from_secs(10));
    assert_all_present(&mut con, &written);
    drop(con);
    assert!(server.stop().success(), "a clean stop\n{}", server.logs());
    server.spawn_and_wait();
    assert_all_present(&mut server.conn(), &written);
}

/// GETs a path over plain HTTP/1.1 and returns the status line and body.
fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics endpoint");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .expect("read the response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    (
        head.lines().next().unwrap_or_default().to_string(),
        body.to_string(),
    )
}

/// The value of the first sample whose name and labels start with `prefix`.
fn sample(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| line.starts_with(prefix))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

#[test]
fn the_metrics_endpoint_serves_counters_that_move_under_load() {
    let port = common::free_port();
    let server = Server::start(&format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"));
    let (status, before) = http_get(port, "/metrics");
    assert!(status.contains("200"), "{status}");
    for name in [
        "shoal_commands_total{command=\"set\"}",
        "shoal_client_connections",
        "shoal_worker_queue_depth_requests{worker=\"0\"}",
        "shoal_group_commit_requests_count{worker=\"0\"}",
        "shoal_commit_duration_seconds_count{worker=\"1\"}",
        "shoal_lmdb_map_size_bytes{worker=\"0\"}",
        "shoal_lmdb_used_bytes{worker=\"1\"}",
        "shoal_journal_bytes{worker=\"0\"}",
        "shoal_worker_unsettled{worker=\"1\"}",
        "shoal_process_restarts_total{process=\"shard-0\"}",
    ] {
        assert!(
            sample(&before, name).is_some(),
            "{name} missing from:\n{before}"
        );
    }

    let mut con = server.conn();
    let mut pipe = redis::pipe();
    for i in 0..500 {
        pipe.cmd("SET").arg(format!("metrics:{i}")).arg(i).ignore();
    }
    pipe.query::<()>(&mut con).expect("pipelined SETs");
    let _: Option<String> = redis::cmd("GET").arg("metrics:1").query(&mut con).unwrap();

    let (_, after) = http_get(port, "/metrics");
    let moved =
        |name: &str| sample(&after, name).unwrap_or(0.0) - sample(&before, name).unwrap_or(0.0);
    assert_eq!(moved("shoal_commands_total{command=\"set\"}"), 500.0);
    assert!(moved("shoal_command_duration_seconds_count{command=\"set\"}") >= 500.0);
    let commits = moved("shoal_commit_duration_seconds_count{worker=\"0\"}")
        + moved("shoal_commit_duration_seconds_count{worker=\"1\"}");
    assert!(commits >= 1.0, "group commits were timed");
    let batches = moved("shoal_group_commit_requests_sum{worker=\"0\"}")
        + moved("shoal_group_commit_requests_sum{worker=\"1\"}");
    assert!(
        batches >= 500.0,
        "every SET went through a group commit: {batches}"
    );
    assert!(sample(&after, "shoal_client_connections").unwrap() >= 1.0);
    // Each worker records a checkpoint when it opens its environment, and publishes its
    // time at its next housekeeping tick.
    let mut checkpoint_secs = 0.0;
    for _ in 0..100 {
        let (_, body) = http_get(port, "/metrics");
        checkpoint_secs = sample(
            &body,
            "shoal_last_checkpoint_timestamp_seconds{worker=\"1\"}",
        )
        .expect("a checkpoint timestamp");
        if checkpoint_secs > 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        checkpoint_secs > now_secs - 600.0 && checkpoint_secs <= now_secs + 1.0,
        "a recent checkpoint: {checkpoint_secs} at {now_secs}"
    );
    assert!(
        after.contains("shoal_partition_last_commit_id{partition="),
        "per-partition commit ids"
    );
    let (status, _) = http_get(port, "/other");
    assert!(status.contains("404"), "{status}");

    // INFO shows the same figures.
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut con)
        .unwrap();
    assert!(info.contains("cmdstat_set:calls="), "{info}");
}

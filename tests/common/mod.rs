//! Helpers shared by the integration tests: a real `shoal serve` process tree
//! started from a generated config in a temp dir, a raw RESP connection for
//! byte-exact checks, and the key routing rules (CRC16 slots, partitions).
//!
//! Everything here goes through Shoal's public interfaces only: the binary,
//! its config file, RESP on TCP or the Unix socket, and `shoal status --json`.
//!
//! Submodules: `linearizability` (a checker for single-key histories), `cluster`
//! (several hosts on their own 127.0.x.y addresses, and faults on the links between them).

#![allow(dead_code)]

pub mod cluster;
pub mod linearizability;

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

/// Path of the `shoal` binary built for these tests.
pub const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

/// Number of hash slots, as in Redis Cluster.
pub const SLOTS: u32 = 16384;

/// How long a server may take to answer PING after it was spawned.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a graceful stop may take.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    free_port_on(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// A port that was free a moment ago on `ip`.
pub fn free_port_on(ip: IpAddr) -> u16 {
    let listener = TcpListener::bind((ip, 0)).expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}

/// A running (or stopped) `shoal serve` with its own temp dir, config and data dir.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub data_dir: PathBuf,
    /// The IP and port of the TCP client listener (`client.listen`; 127.0.0.1 and a
    /// free port unless the config says otherwise).
    pub ip: IpAddr,
    pub port: u16,
    pub workers: usize,
    pub partitions: u32,
    pub child: Option<Child>,
    /// Process group of the last spawned supervisor (its pid), killed on drop.
    pgid: Option<i32>,
    starts: usize,
    /// Environment variables set for every `shoal` command.
    envs: Vec<(String, String)>,
}

impl Server {
    /// Starts a server with a generated config: data dir in a temp dir, TCP on a
    /// free port of 127.0.0.1, 2 workers. `extra_toml` is merged over that base (so it
    /// may set `workers`, `[client]` (`listen` on another address too), `[storage]`,
    /// `[supervisor]` keys).
    pub fn start(extra_toml: &str) -> Server {
        let mut server = Server::configure(extra_toml);
        server.spawn_and_wait();
        server
    }

    /// Writes the config but starts nothing.
    pub fn configure(extra_toml: &str) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("shoal-test")
            .tempdir()
            .expect("temp dir");
        let data_dir = dir.path().join("data");
        let port = free_port();
        let mut table: toml::Table = toml::from_str(&format!(
            "data_dir = {data:?}\nworkers = 2\n[client]\nlisten = \"127.0.0.1:{port}\"\n[metrics]\nlisten = \"\"\n",
            data = data_dir.display().to_string()
        ))
        .expect("base config");
        let extra: toml::Table = toml::from_str(extra_toml).expect("extra_toml is valid TOML");
        merge(&mut table, extra);
        let (ip, port) = client_listen(&table).unwrap_or((IpAddr::V4(Ipv4Addr::LOCALHOST), port));
        let workers = table
            .get("workers")
            .and_then(|v| v.as_integer())
            .unwrap_or(2) as usize;
        let partitions = table
            .get("storage")
            .and_then(|s| s.get("partitions"))
            .and_then(|v| v.as_integer())
            .unwrap_or(256) as u32;
        let config_path = dir.path().join("shoal.toml");
        std::fs::write(
            &config_path,
            toml::to_string(&table).expect("serialize config"),
        )
        .expect("write config");
        Server {
            dir,
            config_path,
            data_dir,
            ip,
            port,
            workers,
            partitions,
            child: None,
            pgid: None,
            starts: 0,
            envs: Vec::new(),
        }
    }

    /// Sets an environment variable for every `shoal` command started from now on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.envs.push((key.to_string(), value.to_string()));
    }

    /// Merges `extra_toml` into the config file (for the next start).
    pub fn update_config(&mut self, extra_toml: &str) {
        let mut table: toml::Table = toml::from_str(&self.config_text()).expect("config");
        merge(
            &mut table,
            toml::from_str(extra_toml).expect("extra_toml is valid TOML"),
        );
        if let Some((ip, port)) = client_listen(&table) {
            (self.ip, self.port) = (ip, port);
        }
        self.workers = table
            .get("workers")
            .and_then(|v| v.as_integer())
            .unwrap_or(2) as usize;
        self.partitions = table
            .get("storage")
            .and_then(|s| s.get("partitions"))
            .and_then(|v| v.as_integer())
            .unwrap_or(256) as u32;
        std::fs::write(
            &self.config_path,
            toml::to_string(&table).expect("serialize config"),
        )
        .expect("write config");
    }

    /// The config text as written.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config_path).expect("read config")
    }

    /// The default Unix socket: `<data_dir>/shoal.sock`.
    pub fn unix_socket(&self) -> PathBuf {
        self.data_dir.join("shoal.sock")
    }

    /// Runs `shoal <verb> <dir> --config <this server's config>` (backup, restore) and
    /// waits for it, for at most two minutes.
    pub fn run_verb(&self, verb: &str, dir: &Path) -> std::process::Output {
        let mut command = self.command();
        command
            .arg(verb)
            .arg(dir)
            .arg("--config")
            .arg(&self.config_path);
        run_with_timeout(command, Duration::from_secs(120)).expect("shoal finishes")
    }

    /// A `shoal` command with a clean environment for the config.
    pub fn command(&self) -> Command {
        let mut command = Command::new(SHOAL);
        command
            .env_remove("SHOAL_CONFIG")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .current_dir(self.dir.path());
        command
    }

    /// Spawns `shoal serve --config FILE` in its own process group, with stdout and
    /// stderr going to files in the temp dir. Does not wait.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "server already running");
        if let Some(old) = self.pgid.take() {
            // Anything left of the previous start goes before the next one begins.
            signal(-old, libc::SIGKILL);
        }
        self.starts += 1;
        let stderr = File::create(
            self.dir
                .path()
                .join(format!("serve-{}.stderr", self.starts)),
        )
        .expect("stderr file");
        let stdout = File::create(
            self.dir
                .path()
                .join(format!("serve-{}.stdout", self.starts)),
        )
        .expect("stdout file");
        let child = self
            .command()
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .expect("spawn shoal serve");
        self.pgid = Some(child.id() as i32);
        self.child = Some(child);
    }

    /// Spawns the server and waits until it answers PING and reports every process ready.
    pub fn spawn_and_wait(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    /// Waits (bounded) until the server answers PING on TCP and `shoal status` shows
    /// every process ready. Panics with the server's stderr if it exits or times out.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.assert_alive("while starting");
            if ping_answers((self.ip, self.port).into()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "server did not answer PING within {START_TIMEOUT:?}\n{}",
                self.logs()
            );
            sleep(Duration::from_millis(25));
        }
        // PING answers; give the status table a moment to show every process ready.
        while Instant::now() < deadline {
            if let Ok(status) = self.status_json() {
                let all_ready = status["processes"]
                    .as_array()
                    .map(|procs| !procs.is_empty() && procs.iter().all(|p| p["state"] == "ready"))
                    .unwrap_or(false);
                if all_ready {
                    return;
                }
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// The supervisor's pid (the process we spawned).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("server not running").id() as i32
    }

    /// Panics with the logs if the supervisor has exited.
    pub fn assert_alive(&mut self, context: &str) {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))
        {
            self.child = None;
            panic!("shoal serve exited {context}: {status:?}\n{}", self.logs());
        }
    }

    /// Whether the supervisor has exited; returns its status if so (and forgets the child).
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        let status = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().expect("try_wait"))?;
        self.child = None;
        Some(status)
    }

    /// Waits (bounded) for the supervisor to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.try_exit_status() {
                return Some(status);
            }
            sleep(Duration::from_millis(20));
        }
        None
    }

    /// Everything the server wrote to stderr and stdout so far, across restarts.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for n in 1..=self.starts {
            for stream in ["stderr", "stdout"] {
                let path = self.dir.path().join(format!("serve-{n}.{stream}"));
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                if !text.is_empty() {
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = &lines[lines.len().saturating_sub(200)..];
                    out.push_str(&format!(
                        "---- shoal serve #{n} {stream} (last {} lines) ----\n",
                        tail.len()
                    ));
                    for line in tail {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
            }
        }
        out
    }

    /// The stderr of the current (last) start.
    pub fn last_stderr(&self) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("serve-{}.stderr", self.starts)),
        )
        .unwrap_or_default()
    }

    /// `shoal status --config FILE --json`, parsed.
    pub fn status_json(&self) -> Result<Json, String> {
        let mut command = self.command();
        command
            .args(["status", "--json", "--config"])
            .arg(&self.config_path);
        let output = run_with_timeout(command, Duration::from_secs(10))?;
        if !output.status.success() {
            return Err(format!(
                "shoal status --json exited {:?}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        serde_json::from_slice(&output.stdout).map_err(|e| {
            format!(
                "shoal status --json printed invalid JSON ({e}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    /// The status entry of one process.
    pub fn process_status(&self, role: &str, index: u64) -> Json {
        let status = self.status_json().unwrap_or_else(|e| panic!("{e}"));
        find_process(&status, role, index)
            .unwrap_or_else(|| panic!("no {role} {index} in status: {status}"))
            .clone()
    }

    /// The pid of shard-worker `index`, from `shoal status --json`.
    pub fn worker_pid(&self, index: u64) -> i32 {
        self.pid_of("shard-worker", index)
    }

    /// Pids of every child listed in the status table (best effort).
    fn child_pids(&self) -> Vec<i32> {
        match self.status_json() {
            Ok(status) => status["processes"]
                .as_array()
                .map(|procs| {
                    procs
                        .iter()
                        .filter_map(|p| p["pid"].as_i64())
                        .map(|p| p as i32)
                        .filter(|&p| p > 0)
                        .collect()
                })
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    /// SIGKILLs the whole process tree (the supervisor's process group, plus any listed
    /// child that left the group) and reaps the supervisor.
    pub fn kill_tree(&mut self) {
        let Some(pgid) = self.pgid.take() else { return };
        let listed = self.child_pids();
        signal(-pgid, libc::SIGKILL);
        for pid in listed {
            if is_shoal_process(pid) {
                signal(pid, libc::SIGKILL);
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        // Children are reparented on the supervisor's death; wait until they are gone (a
        // process in the middle of a sync on a busy disk dies only once the sync returns).
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && group_alive(pgid) {
            sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM to the supervisor; waits up to [`STOP_TIMEOUT`] and returns its exit status.
    /// Panics (after killing the tree) if it does not exit in time.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_with(libc::SIGTERM)
    }

    /// Sends `sig` to the supervisor only, and waits for it to exit.
    pub fn stop_with(&mut self, sig: i32) -> ExitStatus {
        let pid = self.pid();
        signal(pid, sig);
        match self.wait_exit(STOP_TIMEOUT) {
            Some(status) => status,
            None => {
                self.kill_tree();
                panic!(
                    "shoal serve did not exit within {STOP_TIMEOUT:?} after signal {sig}\n{}",
                    self.logs()
                );
            }
        }
    }

    /// Starts the server again on the same config and data dir.
    pub fn restart(&mut self) {
        assert!(
            self.child.is_none(),
            "stop or kill the server before restarting it"
        );
        self.spawn_and_wait();
    }

    /// A `redis` crate client for this server's TCP listener.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url("")).expect("redis client")
    }

    /// The client listener's address.
    pub fn addr(&self) -> SocketAddr {
        (self.ip, self.port).into()
    }

    /// `redis://IP:PORT/<suffix>`.
    pub fn url(&self, suffix: &str) -> String {
        format!("redis://{}/{suffix}", self.addr())
    }

    /// A synchronous connection with a 10 s read/write timeout, so no test hangs.
    pub fn conn(&self) -> redis::Connection {
        connect(&self.client())
    }

    /// A raw RESP connection over TCP.
    pub fn raw(&self) -> RawConn {
        RawConn::tcp_to(self.addr())
    }

    /// The partition of a key under this server's layout.
    pub fn partition_of(&self, key: &[u8]) -> u32 {
        key_partition(key, self.partitions)
    }

    /// The worker that owns a key under this server's layout.
    pub fn worker_of(&self, key: &[u8]) -> usize {
        self.partition_of(key) as usize % self.workers
    }

    /// `n` distinct keys starting with `prefix` that all belong to `worker`.
    pub fn keys_on_worker(&self, prefix: &str, worker: usize, n: usize) -> Vec<String> {
        (0..)
            .map(|i| format!("{prefix}{i}"))
            .filter(|k| self.worker_of(k.as_bytes()) == worker)
            .take(n)
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "==== shoal logs (temp dir {}) ====\n{}",
                self.dir.path().display(),
                self.logs()
            );
        }
        self.kill_tree();
    }
}

/// Connects with bounded timeouts.
pub fn connect(client: &redis::Client) -> redis::Connection {
    let con = client
        .get_connection_with_timeout(Duration::from_secs(10))
        .expect("connect to shoal");
    con.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    con.set_write_timeout(Some(Duration::from_secs(10)))
        .expect("write timeout");
    con
}

/// Deep-merges `extra` into `base` (tables merge, other values replace).
fn merge(base: &mut toml::Table, extra: toml::Table) {
    for (key, value) in extra {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(base_table)), toml::Value::Table(extra_table)) => {
                merge(base_table, extra_table)
            }
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// The IP and port of `client.listen` in a config table, if it is an IP address.
fn client_listen(table: &toml::Table) -> Option<(IpAddr, u16)> {
    let listen = table.get("client")?.get("listen")?.as_str()?;
    let addr: SocketAddr = listen.parse().ok()?;
    Some((addr.ip(), addr.port()))
}

/// Whether something on `addr` answers a RESP PING with any reply.
fn ping_answers(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(1000)));
    if stream.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte), Ok(1) if byte[0] == b'+' || byte[0] == b'-')
}

/// How often [`wait_until`] looks again.
pub const WAIT_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Calls `check` every [`WAIT_POLL_INTERVAL`] until it answers `Ok` (returned with the
/// time it took), or panics after `timeout` naming `what` was awaited and the last error.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    check: impl FnMut() -> Result<T, String>,
) -> (T, Duration) {
    poll_until(what, timeout, WAIT_POLL_INTERVAL, check)
}

/// [`wait_until`] with another interval between the checks.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> (T, Duration) {
    let started = Instant::now();
    loop {
        let last = match check() {
            Ok(value) => return (value, started.elapsed()),
            Err(error) => error,
        };
        if started.elapsed() >= timeout {
            panic!("waited {timeout:?} for {what}; last: {last}");
        }
        // The backoff between checks, not a wait for the condition itself.
        sleep(interval);
    }
}

/// Runs a command to completion, killing it after `timeout`.
pub fn run_with_timeout(
    mut command: Command,
    timeout: Duration,
) -> Result<std::process::Output, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).map_err(|e| e.to_string())?)
        .stderr(File::create(&err_path).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| format!("spawn {command:?}: {e}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{command:?} did not finish within {timeout:?}"));
        }
        sleep(Duration::from_millis(10));
    };
    Ok(std::process::Output {
        status,
        stdout: std::fs::read(&out_path).unwrap_or_default(),
        stderr: std::fs::read(&err_path).unwrap_or_default(),
    })
}

/// The process entry with this role and index in a status document.
pub fn find_process<'a>(status: &'a Json, role: &str, index: u64) -> Option<&'a Json> {
    status["processes"]
        .as_array()?
        .iter()
        .find(|p| p["role"] == role && p["index"].as_u64() == Some(index))
}

/// Sends a signal; ignores ESRCH.
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Whether a process exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// The parent pid of a process, from /proc.
pub fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The command line of a process, arguments joined by spaces.
pub fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            raw.split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Whether `pid` is alive and runs the shoal binary (guards against pid reuse).
fn is_shoal_process(pid: i32) -> bool {
    process_alive(pid)
        && std::fs::read_link(format!("/proc/{pid}/exe"))
            .map(|exe| exe == Path::new(SHOAL))
            .unwrap_or(false)
}

/// Whether any live (non-zombie) process is left in process group `pgid`.
pub fn group_alive(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .any(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    let mut fields = rest.split_whitespace();
                    let state = fields.next()?;
                    let group: i32 = fields.nth(2)?.parse().ok()?;
                    Some(group == pgid && state != "Z" && state != "X")
                })
                .unwrap_or(false)
        })
}

/// Describes an exit status for assertion messages.
pub fn describe(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{status:?}"),
    }
}

// ---------------------------------------------------------------- fault injection

/// A tiny deterministic generator (xorshift64*), so that a run can be repeated from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }

    /// A duration in `[low, high)`.
    pub fn duration_between(&mut self, low: Duration, high: Duration) -> Duration {
        let span = high.saturating_sub(low).as_millis().max(1) as u64;
        low + Duration::from_millis(self.below(span))
    }
}

/// The seed of a randomized test: `SHOAL_TEST_SEED` if set, else the clock. Printed, so that a
/// failing run can be repeated.
pub fn test_seed(what: &str) -> u64 {
    let seed = std::env::var("SHOAL_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("{what} seed: {seed} (set SHOAL_TEST_SEED={seed} to repeat it)");
    seed
}

/// An unsigned setting from the environment, or `default`.
pub fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Whether the long forms of the fault-injection tests were asked for (`SHOAL_LONG_TESTS=1`).
pub fn long_tests() -> bool {
    std::env::var("SHOAL_LONG_TESTS").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Connects with bounded timeouts, retrying until `deadline` (the server may be restarting).
pub fn connect_until(client: &redis::Client, deadline: Instant) -> Option<redis::Connection> {
    while Instant::now() < deadline {
        if let Ok(con) = client.get_connection_with_timeout(Duration::from_secs(2)) {
            con.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("read timeout");
            con.set_write_timeout(Some(Duration::from_secs(10)))
                .expect("write timeout");
            return Some(con);
        }
        sleep(Duration::from_millis(50));
    }
    None
}

/// How a request ended, from the client's side, for tests that model the outcome of writes.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// A reply that is not an error.
    Reply(redis::Value),
    /// An error reply that says nothing was done (`TRYAGAIN shard-1 is down ...`, `... nothing was
    /// written`): the request did not take effect.
    Failed(String),
    /// A lost connection, or an error reply that says the request "may or may not have been
    /// applied": it may have taken effect, or not.
    Unknown(String),
}

impl Answer {
    /// Classifies the result of one request on a `redis::Connection`.
    pub fn of(result: redis::RedisResult<redis::Value>) -> Answer {
        match result {
            Ok(reply @ redis::Value::ServerError(_)) => {
                let text = error_text(&reply);
                if text.contains("may or may not") {
                    Answer::Unknown(text)
                } else {
                    Answer::Failed(text)
                }
            }
            Ok(reply) => Answer::Reply(reply),
            Err(error) => Answer::Unknown(format!("I/O: {error}")),
        }
    }

    /// Whether the connection should be dropped (it broke).
    pub fn connection_lost(&self) -> bool {
        matches!(self, Answer::Unknown(text) if text.starts_with("I/O"))
    }
}

impl Server {
    /// Waits (bounded) until `role index` is ready with a pid other than `old`; returns the pid.
    pub fn wait_restarted(&self, role: &str, index: u64, old: i32, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(status) = self.status_json() {
                if let Some(process) = find_process(&status, role, index) {
                    let pid = process["pid"].as_i64().unwrap_or(0) as i32;
                    if pid > 0 && pid != old && process["state"] == "ready" {
                        return pid;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "{role} {index} (pid {old}) was not restarted within {timeout:?}\n{}",
                self.logs()
            );
            sleep(Duration::from_millis(20));
        }
    }

    /// The pid of `role index` from `shoal status --json`.
    pub fn pid_of(&self, role: &str, index: u64) -> i32 {
        self.process_status(role, index)["pid"]
            .as_i64()
            .unwrap_or_else(|| panic!("no pid for {role} {index}")) as i32
    }
}

// ---------------------------------------------------------------- routing

/// CRC16/XMODEM, as used by Redis Cluster for key slots.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The Redis Cluster hash slot of a key, honouring `{hash tags}`.
pub fn key_slot(key: &[u8]) -> u32 {
    let mut hashed = key;
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                hashed = &key[open + 1..open + 1 + len];
            }
        }
    }
    u32::from(crc16(hashed)) % SLOTS
}

/// partition = slot * partitions / 16384.
pub fn key_partition(key: &[u8], partitions: u32) -> u32 {
    key_slot(key) * partitions / SLOTS
}

// ---------------------------------------------------------------- redis crate helpers

/// Sends one command and returns the raw reply; server errors come back as
/// `Value::ServerError`, not as `Err`.
pub fn call(con: &mut redis::Connection, args: &[&[u8]]) -> redis::Value {
    use redis::ConnectionLike;
    let mut cmd = redis::cmd(std::str::from_utf8(args[0]).expect("command name is UTF-8"));
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    con.req_command(&cmd)
        .unwrap_or_else(|e| panic!("I/O error on {:?}: {e}", String::from_utf8_lossy(args[0])))
}

/// `call` with string arguments.
pub fn call_str(con: &mut redis::Connection, args: &[&str]) -> redis::Value {
    let bytes: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    call(con, &bytes)
}

/// The "CODE detail" text of a server error reply, or panics.
pub fn error_text(value: &redis::Value) -> String {
    match value {
        redis::Value::ServerError(err) => match err.details() {
            Some(detail) => format!("{} {detail}", err.code()),
            None => err.code().to_string(),
        },
        other => panic!("expected an error reply, got {other:?}"),
    }
}

// ---------------------------------------------------------------- raw RESP

/// A RESP reply, as read off the wire (RESP2 and RESP3 types).
#[derive(Debug, Clone, PartialEq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Vec<u8>),
    /// `$-1` (RESP2 nil bulk).
    NilBulk,
    Array(Vec<Resp>),
    /// `*-1` (RESP2 nil array).
    NilArray,
    /// `_` (RESP3 null).
    Null,
    Map(Vec<(Resp, Resp)>),
    Set(Vec<Resp>),
    Double(String),
    Bool(bool),
    BigNumber(String),
    Verbatim(String, Vec<u8>),
    BlobError(Vec<u8>),
    Push(Vec<Resp>),
}

impl Resp {
    /// The bytes of a bulk or simple string.
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Resp::Bulk(b) => b.clone(),
            Resp::Simple(s) => s.as_bytes().to_vec(),
            Resp::Verbatim(_, b) => b.clone(),
            other => panic!("expected a string reply, got {other:?}"),
        }
    }

    /// The text of a bulk or simple string.
    pub fn text(&self) -> String {
        String::from_utf8(self.bytes()).expect("UTF-8 reply")
    }

    pub fn int(&self) -> i64 {
        match self {
            Resp::Int(n) => *n,
            other => panic!("expected an integer reply, got {other:?}"),
        }
    }

    pub fn array(&self) -> &[Resp] {
        match self {
            Resp::Array(items) | Resp::Set(items) | Resp::Push(items) => items,
            other => panic!("expected an array reply, got {other:?}"),
        }
    }

    pub fn is_error(&self) -> bool {
        matches!(self, Resp::Error(_) | Resp::BlobError(_))
    }

    pub fn error(&self) -> String {
        match self {
            Resp::Error(e) => e.clone(),
            Resp::BlobError(e) => String::from_utf8_lossy(e).into_owned(),
            other => panic!("expected an error reply, got {other:?}"),
        }
    }
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A plain socket speaking RESP by hand, for byte-exact checks.
pub struct RawConn {
    reader: BufReader<Box<dyn ReadWrite>>,
}

pub trait ReadWrite: Read + Write + Send {
    fn set_timeout(&self, timeout: Duration);
    fn shutdown_write(&self);
}

impl ReadWrite for TcpStream {
    fn set_timeout(&self, timeout: Duration) {
        self.set_read_timeout(Some(timeout)).expect("read timeout");
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

impl ReadWrite for std::os::unix::net::UnixStream {
    fn set_timeout(&self, timeout: Duration) {
        self.set_read_timeout(Some(timeout)).expect("read timeout");
    }
    fn shutdown_write(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

impl RawConn {
    /// Connects to 127.0.0.1 over TCP with a 10 s read timeout.
    pub fn tcp(port: u16) -> RawConn {
        RawConn::tcp_to(([127, 0, 0, 1], port).into())
    }

    /// Connects to `addr` over TCP with a 10 s read timeout.
    pub fn tcp_to(addr: SocketAddr) -> RawConn {
        RawConn::try_tcp(addr, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
    }

    /// Connects to `addr` over TCP, giving up after `timeout`; reads and writes time out
    /// after `timeout` too.
    pub fn try_tcp(addr: SocketAddr, timeout: Duration) -> io::Result<RawConn> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(RawConn {
            reader: BufReader::new(Box::new(stream)),
        })
    }

    /// Connects over a Unix socket with a 10 s read timeout.
    pub fn unix(path: &Path) -> RawConn {
        let stream = std::os::unix::net::UnixStream::connect(path).expect("connect unix socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("read timeout");
        RawConn {
            reader: BufReader::new(Box::new(stream)),
        }
    }

    /// Writes raw bytes.
    pub fn send(&mut self, bytes: &[u8]) {
        let stream = self.reader.get_mut();
        stream.write_all(bytes).expect("write to shoal");
        stream.flush().expect("flush");
    }

    /// Sends a command (RESP array of bulk strings) and reads one reply.
    pub fn cmd(&mut self, args: &[&str]) -> Resp {
        let bytes: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.cmd_bytes(&bytes)
    }

    pub fn cmd_bytes(&mut self, args: &[&[u8]]) -> Resp {
        self.send(&encode_command(args));
        self.read_reply().expect("read reply")
    }

    /// Sends a command and reads one reply; I/O errors (a timeout, a closed
    /// connection) come back as errors instead of panics.
    pub fn try_cmd(&mut self, args: &[&str]) -> io::Result<Resp> {
        let bytes: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        let stream = self.reader.get_mut();
        stream.write_all(&encode_command(&bytes))?;
        stream.flush()?;
        self.read_reply()
    }

    /// Reads one complete reply.
    pub fn read_reply(&mut self) -> io::Result<Resp> {
        let line = self.read_line()?;
        let (kind, rest) = line.split_at(1);
        let bad =
            |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {line:?}"));
        let int = |text: &str| text.parse::<i64>().map_err(|_| bad("bad integer"));
        Ok(match kind {
            "+" => Resp::Simple(rest.to_string()),
            "-" => Resp::Error(rest.to_string()),
            ":" => Resp::Int(int(rest)?),
            "$" => match int(rest)? {
                -1 => Resp::NilBulk,
                len => Resp::Bulk(self.read_blob(len as usize)?),
            },
            "!" => Resp::BlobError(self.read_blob(int(rest)? as usize)?),
            "=" => {
                let blob = self.read_blob(int(rest)? as usize)?;
                let format = String::from_utf8_lossy(&blob[..3.min(blob.len())]).into_owned();
                Resp::Verbatim(format, blob.get(4..).unwrap_or_default().to_vec())
            }
            "*" => match int(rest)? {
                -1 => Resp::NilArray,
                n => Resp::Array(self.read_items(n as usize)?),
            },
            "~" => Resp::Set(self.read_items(int(rest)? as usize)?),
            ">" => Resp::Push(self.read_items(int(rest)? as usize)?),
            "%" => {
                let n = int(rest)? as usize;
                let mut pairs = Vec::with_capacity(n);
                for _ in 0..n {
                    let key = self.read_reply()?;
                    let value = self.read_reply()?;
                    pairs.push((key, value));
                }
                Resp::Map(pairs)
            }
            "_" => Resp::Null,
            "," => Resp::Double(rest.to_string()),
            "#" => Resp::Bool(rest == "t"),
            "(" => Resp::BigNumber(rest.to_string()),
            _ => return Err(bad("unknown reply type")),
        })
    }

    fn read_items(&mut self, n: usize) -> io::Result<Vec<Resp>> {
        (0..n).map(|_| self.read_reply()).collect()
    }

    fn read_blob(&mut self, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len + 2];
        self.reader.read_exact(&mut buf)?;
        if &buf[len..] != b"\r\n" {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bulk not followed by CRLF",
            ));
        }
        buf.truncate(len);
        Ok(buf)
    }

    /// Reads one CRLF-terminated line, without the CRLF. EOF is an error.
    pub fn read_line(&mut self) -> io::Result<String> {
        let mut line = Vec::new();
        let n = self.reader.read_until(b'\n', &mut line)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        if !line.ends_with(b"\r\n") {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("line without CRLF: {line:?}"),
            ));
        }
        line.truncate(line.len() - 2);
        String::from_utf8(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Exact bytes available next (reads exactly `n` bytes).
    pub fn read_exact_bytes(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; n];
        self.reader.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Waits (up to the read timeout) for the server to close the connection.
    /// Returns whatever bytes arrived before the close, or an error if it stayed open.
    pub fn expect_closed(&mut self) -> Result<Vec<u8>, String> {
        let mut rest = Vec::new();
        loop {
            let mut buf = [0u8; 4096];
            match self.reader.read(&mut buf) {
                Ok(0) => return Ok(rest),
                Ok(n) => rest.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(rest),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(format!(
                        "connection not closed ({e}); got {:?}",
                        String::from_utf8_lossy(&rest)
                    ))
                }
            }
        }
    }

    /// Sets the read timeout.
    pub fn set_read_timeout(&mut self, timeout: Duration) {
        self.reader.get_ref().set_timeout(timeout);
    }

    /// Closes the writing half, as a client that has nothing more to say.
    pub fn shutdown_write(&mut self) {
        self.reader.get_ref().shutdown_write();
    }
}

// ---------------------------------------------------------------- reference redis-server

/// A real `redis-server` started for a test, as the reference that Shoal's replies
/// are compared with: loopback only, on a free port, with no persistence
/// (`--save ''`, `--appendonly no`) and its files in its own temp dir. It is
/// stopped (SIGTERM, then SIGKILL) when dropped.
pub struct RedisServer {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts `redis-server` and waits (bounded) until it answers PING. Panics with
    /// its log if it is not installed, exits, or does not answer in time.
    pub fn start() -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("shoal-test-redis")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let log = File::create(dir.path().join("redis.log")).expect("redis log file");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--databases", "16"])
            .arg("--dir")
            .arg(dir.path())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log file"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start redis-server ({e}); install the Debian package redis-server (.ci/run does)")
            });
        let mut server = RedisServer {
            dir,
            port,
            child: Some(child),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !ping_answers(([127, 0, 0, 1], port).into()) {
            if let Some(status) = server
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait"))
            {
                server.child = None;
                panic!(
                    "redis-server exited while starting: {status:?}\n{}",
                    server.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING within {START_TIMEOUT:?}\n{}",
                server.log()
            );
            sleep(Duration::from_millis(20));
        }
        server
    }

    /// A raw RESP connection over TCP.
    pub fn raw(&self) -> RawConn {
        RawConn::tcp(self.port)
    }

    /// The version `redis-server` reports in `INFO server` (e.g. "7.0.15").
    pub fn version(&self) -> String {
        let info = self.raw().cmd(&["INFO", "server"]).text();
        info.lines()
            .find_map(|line| line.strip_prefix("redis_version:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into())
    }

    /// What redis-server wrote to its log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(child.id() as i32, libc::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

//! The supervisor: `shoal serve`.
//!
//! It prepares the data dir (PID file lock, status table, layout record; when
//! `workers` changed, it first runs `shoal rebalance`, which moves partitions),
//! starts the shard-workers and then the net-daemon by re-executing its own
//! binary, and waits until each reports ready in the status table. It restarts
//! a child that dies, following [`RestartPolicy`], and gives up (stopping
//! everything, exiting non-zero) when a child dies too often. SIGTERM or
//! SIGINT drains: the net-daemon first (it finishes in-flight requests), then
//! the workers (they commit what they have queued).
//!
//! Under systemd (Type=notify) it sends READY=1 once every child is ready, a
//! STATUS= line whenever the picture changes, and WATCHDOG=1 while every child
//! heartbeats. A serving child whose heartbeat is older than
//! `supervisor.child_timeout_ms` (hung, or stopped) is killed and restarted.
//!
//! It never opens an LMDB environment: LMDB must not be used across fork().

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use shoal_shared::config::{Config, DataDirLayout, CHILD_CONFIG_ENV};
use shoal_shared::status::{Field, ProcessState, Role, StatusTable};

use crate::policy::{Decision, RestartPolicy};

/// Environment variable that tells a child its supervisor's pid.
const SUPERVISOR_PID_ENV: &str = "SHOAL_SUPERVISOR_PID";
const POLL: Duration = Duration::from_millis(20);

/// Prepares a child process: it ignores SIGINT and SIGHUP (a Ctrl-C or a closed terminal
/// reaches the whole process group; the supervisor orders the shutdown with SIGTERM), and it exits when its
/// supervisor dies (kill -9 included).
pub fn child_setup() {
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    let Some(expected) = std::env::var(SUPERVISOR_PID_ENV)
        .ok()
        .and_then(|p| p.parse::<i32>().ok())
    else {
        return;
    };
    // SAFETY: prctl with PR_SET_PDEATHSIG only sets a signal number for this process.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
    // SAFETY: getppid has no preconditions.
    if unsafe { libc::getppid() } != expected {
        eprintln!("shoal: the supervisor (pid {expected}) is gone; exiting");
        std::process::exit(1);
    }
}

/// One supervised process.
struct Supervised {
    role: Role,
    /// Worker index (0 for the net-daemon).
    index: usize,
    /// Its slot in the status table.
    slot: usize,
    process: Option<Child>,
    policy: RestartPolicy,
    restart_at: Option<Instant>,
}

impl Supervised {
    fn name(&self) -> String {
        match self.role {
            Role::ShardWorker => format!("shard-{}", self.index),
            Role::NetDaemon => "net-daemon".into(),
        }
    }
}

struct Supervisor {
    config: Config,
    config_json: String,
    status: StatusTable,
    children: Vec<Supervised>,
}

/// Runs `shoal serve` until a signal (Ok) or until a child fails for good (Err).
pub fn run(mut config: Config) -> anyhow::Result<()> {
    config
        .make_paths_absolute()
        .with_context(|| format!("preparing data dir {}", config.data_dir.display()))?;
    config.check_paths()?;
    let _pid_lock = lock_pid_file(&config)?;
    std::fs::create_dir_all(config.run_dir()).context("creating the run dir")?;
    let status = StatusTable::create(
        &config.status_path(),
        config.workers,
        config.storage.partitions,
    )
    .context("creating the status table")?;
    let config_json =
        serde_json::to_string(&config).context("encoding the config for the children")?;
    check_layout(&mut config, &config_json)?;
    // The net-daemon reads it again; a bad one stops the start here, with its reason.
    shoal_shared::databases::DatabaseMap::load_for(&config).map_err(anyhow::Error::msg)?;
    // The worker count may have been taken from the data dir.
    let status = if status.workers() == config.workers {
        status
    } else {
        StatusTable::create(
            &config.status_path(),
            config.workers,
            config.storage.partitions,
        )
        .context("creating the status table")?
    };

    let terminate = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&terminate))
            .context("installing signal handlers")?;
    }
    let hangup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, Arc::clone(&hangup))
        .context("installing the SIGHUP handler")?;

    let window = Duration::from_millis(config.supervisor.restart_window_ms);
    let max_restarts = config.supervisor.max_restarts;
    let mut children: Vec<Supervised> = (0..config.workers)
        .map(|index| Supervised {
            role: Role::ShardWorker,
            index,
            slot: index,
            process: None,
            policy: RestartPolicy::new(max_restarts, window),
            restart_at: None,
        })
        .collect();
    children.push(Supervised {
        role: Role::NetDaemon,
        index: 0,
        slot: config.workers,
        process: None,
        policy: RestartPolicy::new(max_restarts, window),
        restart_at: None,
    });
    let config_json =
        serde_json::to_string(&config).context("encoding the config for the children")?;
    let mut supervisor = Supervisor {
        config,
        config_json,
        status,
        children,
    };

    tracing::info!(
        data_dir = %supervisor.config.data_dir.display(),
        workers = supervisor.config.workers,
        partitions = supervisor.config.storage.partitions,
        "starting shoal"
    );
    let started = supervisor.start_all(&terminate);
    let result = match started {
        Ok(()) => {
            tracing::info!(listen = ?supervisor.config.client.listen, unix_socket = ?supervisor.config.client.unix_socket, "shoal is ready");
            let status = supervisor.status_line();
            notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&status),
            ]);
            supervisor.supervise(&terminate, &hangup)
        }
        // Asked to stop while starting: a clean stop, not a failure.
        Err(_) if terminate.load(Ordering::Acquire) => Ok(()),
        Err(error) => Err(error),
    };
    notify(&[
        sd_notify::NotifyState::Stopping,
        sd_notify::NotifyState::Status("stopping"),
    ]);
    supervisor.stop_all();
    match &result {
        Ok(()) => tracing::info!("shoal stopped"),
        Err(error) => tracing::error!("shoal stopped: {error:#}"),
    }
    result
}

impl Supervisor {
    /// Starts the workers, waits for them, then the net-daemon, and waits for it.
    fn start_all(&mut self, terminate: &AtomicBool) -> anyhow::Result<()> {
        let workers: Vec<usize> = (0..self.children.len() - 1).collect();
        for &child in &workers {
            self.spawn(child)?;
        }
        for &child in &workers {
            self.wait_ready(child, terminate)?;
        }
        let net_daemon = self.children.len() - 1;
        self.spawn(net_daemon)?;
        self.wait_ready(net_daemon, terminate)
    }

    fn spawn(&mut self, child: usize) -> anyhow::Result<()> {
        let exe = own_binary();
        let supervised = &mut self.children[child];
        let mut command = Command::new(exe);
        match supervised.role {
            Role::ShardWorker => command
                .arg("shard-worker")
                .arg("--index")
                .arg(supervised.index.to_string()),
            Role::NetDaemon => command.arg("net-daemon"),
        };
        command
            .env(CHILD_CONFIG_ENV, &self.config_json)
            .env(SUPERVISOR_PID_ENV, std::process::id().to_string())
            // Only the supervisor talks to systemd.
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .stdin(Stdio::null());
        let slot = self.status.slot(supervised.slot);
        slot.set_state(ProcessState::Starting);
        let process = command
            .spawn()
            .with_context(|| format!("starting {}", supervised.name()))?;
        tracing::info!(child = %supervised.name(), pid = process.id(), "started");
        supervised.process = Some(process);
        supervised.restart_at = None;
        Ok(())
    }

    /// Waits until `child` reports ready, or fails if it exits or takes too long.
    fn wait_ready(&mut self, child: usize, terminate: &AtomicBool) -> anyhow::Result<()> {
        let deadline =
            Instant::now() + Duration::from_millis(self.config.supervisor.ready_timeout_ms);
        let name = self.children[child].name();
        loop {
            let supervised = &mut self.children[child];
            let Some(process) = supervised.process.as_mut() else {
                bail!("{name} is not running")
            };
            let slot = self.status.slot(supervised.slot);
            if slot.get(Field::Pid) == u64::from(process.id())
                && slot.state() == ProcessState::Ready
            {
                return Ok(());
            }
            if let Some(exit) = process.try_wait().context("waiting for a child")? {
                supervised.process = None;
                bail!("{name} exited during startup ({exit}); see its log above");
            }
            if terminate.load(Ordering::Acquire) {
                bail!("interrupted during startup");
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} did not become ready within {} ms",
                    self.config.supervisor.ready_timeout_ms
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Watches the children until a signal arrives (Ok) or one fails for good (Err): restarts
    /// the dead, kills the hung, and keeps systemd's status line and watchdog up to date.
    fn supervise(&mut self, terminate: &AtomicBool, hangup: &AtomicBool) -> anyhow::Result<()> {
        let watchdog = sd_notify::watchdog_enabled().map(|timeout| timeout / 2);
        let mut last_watchdog: Option<Instant> = None;
        let mut last_status = self.status_line();
        while !terminate.load(Ordering::Acquire) {
            if hangup.swap(false, Ordering::AcqRel) {
                tracing::warn!(
                    "SIGHUP: this version reloads nothing; restart shoal to apply config changes"
                );
            }
            let now = Instant::now();
            for child in 0..self.children.len() {
                self.kill_if_hung(child);
                self.check_child(child, now)?;
            }
            let status = self.status_line();
            if status != last_status {
                notify(&[sd_notify::NotifyState::Status(&status)]);
                last_status = status;
            }
            if let Some(interval) = watchdog {
                if last_watchdog.is_none_or(|at| at.elapsed() >= interval) && self.healthy() {
                    notify(&[sd_notify::NotifyState::Watchdog]);
                    last_watchdog = Some(Instant::now());
                }
            }
            std::thread::sleep(POLL);
        }
        tracing::info!("shutting down: draining the net-daemon, then the workers");
        Ok(())
    }

    /// How stale a serving child's heartbeat is, if it is serving.
    fn heartbeat_age_ms(&self, child: usize) -> Option<u64> {
        let supervised = &self.children[child];
        let process = supervised.process.as_ref()?;
        let slot = self.status.slot(supervised.slot);
        let serving = matches!(slot.state(), ProcessState::Ready | ProcessState::Draining);
        (serving && slot.get(Field::Pid) == u64::from(process.id()))
            .then(|| shoal_shared::now_ms().saturating_sub(slot.get(Field::HeartbeatMs)))
    }

    /// Kills a serving child that stopped heartbeating (hung, or stopped); it is then
    /// restarted like any child that dies.
    fn kill_if_hung(&mut self, child: usize) {
        let timeout_ms = self.config.supervisor.child_timeout_ms;
        let Some(age_ms) = self.heartbeat_age_ms(child).filter(|&age| age > timeout_ms) else {
            return;
        };
        let supervised = &mut self.children[child];
        let name = supervised.name();
        if let Some(process) = supervised.process.as_mut() {
            tracing::warn!(
                child = %name,
                pid = process.id(),
                age_ms,
                "child stopped heartbeating (limit: supervisor.child_timeout_ms = {timeout_ms}); killing it"
            );
            let _ = process.kill();
        }
        // Not serving any more: the next round reaps it and schedules the restart.
        self.status
            .slot(supervised.slot)
            .set_state(ProcessState::Down);
    }

    /// Every child is running with a fresh heartbeat, or is being restarted.
    fn healthy(&self) -> bool {
        (0..self.children.len()).all(|child| {
            self.heartbeat_age_ms(child)
                .is_none_or(|age| age <= self.config.supervisor.child_timeout_ms)
        })
    }

    /// A one-line summary for systemd's STATUS=.
    fn status_line(&self) -> String {
        let down: Vec<String> = self
            .children
            .iter()
            .filter(|child| self.status.slot(child.slot).state() != ProcessState::Ready)
            .map(Supervised::name)
            .collect();
        let serving = match self.config.client.listen {
            Some(address) => format!("serving on {address}"),
            None => "serving".to_string(),
        };
        if down.is_empty() {
            format!("{serving}; {} workers ready", self.config.workers)
        } else {
            format!("{serving}; not ready: {}", down.join(", "))
        }
    }

    fn check_child(&mut self, child: usize, now: Instant) -> anyhow::Result<()> {
        let supervised = &mut self.children[child];
        let slot = self.status.slot(supervised.slot);
        if let Some(process) = supervised.process.as_mut() {
            let Some(exit) = process.try_wait().context("waiting for a child")? else {
                return Ok(());
            };
            supervised.process = None;
            slot.set_state(ProcessState::Down);
            match supervised.policy.on_exit(now) {
                Decision::RestartAfter(delay) => {
                    tracing::warn!(child = %supervised.name(), %exit, delay_ms = delay.as_millis() as u64, "child died; restarting");
                    supervised.restart_at = Some(now + delay);
                }
                Decision::GiveUp { restarts } => {
                    return Err(anyhow!(
                        "{} died {restarts} times within {} ms (limit: supervisor.max_restarts = {}); giving up",
                        supervised.name(),
                        self.config.supervisor.restart_window_ms,
                        self.config.supervisor.max_restarts
                    ));
                }
            }
        } else if supervised.restart_at.is_some_and(|at| now >= at) {
            slot.add(Field::Restarts, 1);
            if let Err(error) = self.spawn(child) {
                // A failed start counts as a death: back off, and give up by the same rule.
                let supervised = &mut self.children[child];
                match supervised.policy.on_exit(now) {
                    Decision::RestartAfter(delay) => {
                        tracing::error!(child = %supervised.name(), "{error:#}; retrying");
                        supervised.restart_at = Some(now + delay);
                    }
                    Decision::GiveUp { .. } => return Err(error),
                }
            }
        }
        Ok(())
    }

    /// Stops the net-daemon, then the workers: SIGTERM, wait, SIGKILL after the drain timeout.
    fn stop_all(&mut self) {
        let drain = Duration::from_millis(self.config.supervisor.drain_timeout_ms);
        let net_daemon = self.children.len() - 1;
        self.stop(&[net_daemon], drain);
        let workers: Vec<usize> = (0..net_daemon).collect();
        self.stop(&workers, drain);
    }

    fn stop(&mut self, children: &[usize], drain: Duration) {
        for &child in children {
            if let Some(process) = &self.children[child].process {
                // SAFETY: kill has no memory-safety preconditions; the pid is our own child.
                unsafe { libc::kill(process.id() as i32, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + drain;
        for &child in children {
            let supervised = &mut self.children[child];
            let Some(mut process) = supervised.process.take() else {
                continue;
            };
            loop {
                match process.try_wait() {
                    Ok(Some(exit)) => {
                        if !exit.success() {
                            tracing::warn!(child = %supervised.name(), %exit, "child exited uncleanly during shutdown");
                        }
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
                    _ => {
                        tracing::warn!(child = %supervised.name(), "child did not stop in time; killing it");
                        let _ = process.kill();
                        let _ = process.wait();
                        break;
                    }
                }
            }
            self.status
                .slot(supervised.slot)
                .set_state(ProcessState::Stopped);
        }
    }
}

/// The binary children are started from. `/proc/self/exe` still names this process's
/// binary after the file on disk is replaced (an upgrade in place).
fn own_binary() -> std::path::PathBuf {
    std::path::PathBuf::from("/proc/self/exe")
}

/// Sends a notification to systemd when running under it (NOTIFY_SOCKET set).
fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify systemd");
    }
}

/// Takes the data dir's PID file lock, or explains who holds it.
pub(crate) fn lock_pid_file(config: &Config) -> anyhow::Result<File> {
    let path = config.pid_path();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match lock_waiting_out_probes(&file) {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            bail!(
                "another shoal is already running on data dir {} (pid {}); stop it first or use another data_dir",
                config.data_dir.display(),
                holder.trim()
            );
        }
        Err(std::fs::TryLockError::Error(error)) => {
            return Err(error).with_context(|| format!("locking {}", path.display()));
        }
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    file.sync_all()?;
    Ok(file)
}

/// How long a starting supervisor retries a PID file lock that is taken: `shoal status`
/// holds a shared lock for an instant when it checks whether a supervisor runs.
const PROBE_LOCK_WAIT: Duration = Duration::from_secs(2);

/// Takes `file`'s exclusive lock, retrying for [`PROBE_LOCK_WAIT`] while it is taken.
fn lock_waiting_out_probes(file: &File) -> Result<(), std::fs::TryLockError> {
    let deadline = Instant::now() + PROBE_LOCK_WAIT;
    loop {
        match file.try_lock() {
            Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            result => return result,
        }
    }
}

/// Records the layout on first start, refuses a partition count that differs from the
/// data dir's, and moves partitions when the worker count changed. A worker count taken
/// from the core count follows the data dir instead.
fn check_layout(config: &mut Config, config_json: &str) -> anyhow::Result<()> {
    let path = config.layout_path();
    let wanted = DataDirLayout {
        partitions: config.storage.partitions,
        workers: config.workers,
    };
    let Some(found) =
        DataDirLayout::load(&path).with_context(|| format!("reading {}", path.display()))?
    else {
        return wanted
            .store(&path)
            .with_context(|| format!("writing {}", path.display()));
    };
    if found.partitions != wanted.partitions {
        bail!(
            "data dir {} was created with storage.partitions = {}, but the config says {}; \
             the partition count is fixed when a data dir is created",
            config.data_dir.display(),
            found.partitions,
            wanted.partitions
        );
    }
    if found.workers == wanted.workers {
        return Ok(());
    }
    if config.workers_from_cores {
        tracing::info!(
            workers = found.workers,
            cores = wanted.workers,
            "using the data dir's worker count; set `workers` to choose another"
        );
        config.workers = found.workers;
        return Ok(());
    }
    tracing::info!(
        from = found.workers,
        to = wanted.workers,
        "the worker count changed; moving partitions before serving"
    );
    let exe = own_binary();
    let status = Command::new(exe)
        .arg("rebalance")
        .arg("--from")
        .arg(found.workers.to_string())
        .env(CHILD_CONFIG_ENV, config_json)
        .env(SUPERVISOR_PID_ENV, std::process::id().to_string())
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .status()
        .context("running the partition move")?;
    if !status.success() {
        bail!(
            "moving partitions from {} to {} workers failed ({status}); the data is intact, and starting again \
             resumes the move",
            found.workers,
            wanted.workers
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_waits_out_a_status_probe_but_not_a_running_supervisor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shoal.pid");
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .unwrap()
        };
        // A probe (`shoal status`) holds a shared lock for a moment.
        let probe = open();
        probe.try_lock_shared().unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(probe);
        });
        let starting = open();
        assert!(lock_waiting_out_probes(&starting).is_ok());
        release.join().unwrap();

        // A running supervisor keeps its lock: the next start gives up.
        let started = Instant::now();
        assert!(matches!(
            lock_waiting_out_probes(&open()),
            Err(std::fs::TryLockError::WouldBlock)
        ));
        assert!(started.elapsed() >= PROBE_LOCK_WAIT);
    }
}

//! The `shoal` binary.
//!
//! - `shoal serve` runs the supervisor ([`supervisor`]).
//! - `shoal shard-worker --index i` and `shoal net-daemon` are the child roles
//!   the supervisor re-executes itself as; they read the validated config from
//!   the environment ([`CHILD_CONFIG_ENV`]).
//! - `shoal status` prints the processes of a running Shoal ([`status`]).
//! - `shoal backup DIR` asks a running Shoal for a copy of every shard ([`backup`]);
//!   `shoal restore DIR` turns such a copy into the data dir of a stopped one ([`restore`]).
//!
//! Modules: [`supervisor`], [`policy`] (the restart rule), [`status`], [`backup`], [`restore`].

mod admin;
mod backup;
mod cluster;
mod policy;
mod restore;
mod status;
mod supervisor;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use shoal_shared::config::{Config, CHILD_CONFIG_ENV};

/// Exit code for a config that cannot be used.
const EXIT_BAD_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "Shoal: a distributed key-value database that speaks the Redis protocol"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: the supervisor, its shard-workers and its net-daemon.
    Serve {
        /// Config file (TOML). Without one, embedded defaults apply.
        #[arg(long, env = "SHOAL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Show the processes of a running Shoal.
    Status {
        /// Config file of the Shoal to inspect (for its data dir).
        #[arg(long, env = "SHOAL_CONFIG")]
        config: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show the cluster as the running host sees it.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Hand every partition of the running host to the others, then leave the cluster.
    Leave {
        /// Config file of the Shoal that leaves (for its socket and password).
        #[arg(long, env = "SHOAL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Copy every shard of a running Shoal into DIR, with a manifest of commit ids.
    Backup {
        /// Directory to create (or an empty one). It is written by the server, so it must be
        /// on the server's host and writable by the server's user.
        dir: PathBuf,
        /// Config file of the Shoal to back up (for its socket and password).
        #[arg(long, env = "SHOAL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Restore a backup into the (new or empty) data dir of a stopped Shoal.
    Restore {
        /// A directory written by `shoal backup`.
        dir: PathBuf,
        /// Config file of the Shoal to restore into (for its data dir and layout).
        #[arg(long, env = "SHOAL_CONFIG")]
        config: Option<PathBuf>,
    },
    /// (internal) A shard-worker process, started by `shoal serve`.
    #[command(hide = true)]
    ShardWorker {
        #[arg(long)]
        index: usize,
    },
    /// (internal) The net-daemon process, started by `shoal serve`.
    #[command(hide = true)]
    NetDaemon,
    /// (internal) Moves partitions to the configured worker count, started by `shoal serve`.
    #[command(hide = true)]
    Rebalance {
        /// The worker count the data dir has now.
        #[arg(long)]
        from: usize,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// The hosts of the cluster: state, addresses, voters, scores and round trips.
    Status {
        /// Config file of the Shoal to ask (for its socket and password).
        #[arg(long, env = "SHOAL_CONFIG")]
        config: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            init_logging("supervisor");
            let config = match load_config(config) {
                Ok(config) => config,
                Err(message) => {
                    eprintln!("shoal: {message}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            report(supervisor::run(config))
        }
        Command::Status { config, json } => {
            let config = match load_config(config) {
                Ok(config) => config,
                Err(message) => {
                    eprintln!("shoal: {message}");
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            report(status::print(&config, json))
        }
        Command::Cluster {
            command: ClusterCommand::Status { config, json },
        } => match load_config(config) {
            Ok(config) => report(cluster::status(&config, json)),
            Err(message) => {
                eprintln!("shoal: {message}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Leave { config } => match load_config(config) {
            Ok(config) => report(cluster::leave(&config)),
            Err(message) => {
                eprintln!("shoal: {message}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Backup { dir, config } => match load_config(config) {
            Ok(config) => report(backup::run(&config, &dir)),
            Err(message) => {
                eprintln!("shoal: {message}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Restore { dir, config } => match load_config(config) {
            Ok(config) => report(restore::run(config, &dir)),
            Err(message) => {
                eprintln!("shoal: {message}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::ShardWorker { index } => {
            init_logging(&format!("shard-{index}"));
            report(child_config().and_then(|config| {
                supervisor::child_setup();
                shoal_shard_worker::run(&config, index)
            }))
        }
        Command::Rebalance { from } => {
            init_logging("rebalance");
            report(child_config().and_then(|config| {
                supervisor::child_setup();
                shoal_shard_worker::rebalance::run(&config, from)
            }))
        }
        Command::NetDaemon => {
            init_logging("net-daemon");
            report(child_config().and_then(|config| {
                supervisor::child_setup();
                shoal_net_daemon::run(config)
            }))
        }
    }
}

/// Loads and validates the config; the error is one line naming the file and the key.
fn load_config(path: Option<PathBuf>) -> Result<Config, String> {
    let config = Config::load(path.as_deref()).map_err(|e| e.to_string())?;
    Ok(config)
}

fn child_config() -> anyhow::Result<Config> {
    let json = std::env::var(CHILD_CONFIG_ENV).with_context(|| {
        format!("{CHILD_CONFIG_ENV} is not set: this role is started by `shoal serve`")
    })?;
    serde_json::from_str(&json).context("decoding the config passed by the supervisor")
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("shoal: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prefixes each log line with the time (unless journald adds its own) and the process
/// role (`shard-0`, `net-daemon`, ...).
struct TimeAndRole {
    role: String,
    with_time: bool,
}

impl tracing_subscriber::fmt::time::FormatTime for TimeAndRole {
    fn format_time(
        &self,
        writer: &mut tracing_subscriber::fmt::format::Writer<'_>,
    ) -> std::fmt::Result {
        if self.with_time {
            tracing_subscriber::fmt::time::SystemTime.format_time(writer)?;
            write!(writer, " ")?;
        }
        write!(writer, "{}", self.role)
    }
}

/// Logs go to stderr, one line per event. The filter comes from `SHOAL_LOG` or `RUST_LOG`
/// (default `info`, with the consensus library's own chatter at `warn`). Under systemd (JOURNAL_STREAM set) lines carry no time and no colours:
/// the journal records both.
/// A panic is logged and aborts the process, so the supervisor restarts a clean one.
fn init_logging(role: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| "info,openraft=warn".into());
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(!journald && std::io::stderr().is_terminal())
        .with_target(false)
        .with_timer(TimeAndRole {
            role: role.to_string(),
            with_time: !journald,
        })
        .init();
    let role = role.to_string();
    std::panic::set_hook(Box::new(move |info| {
        tracing::error!(role = %role, "panic: {info}");
        eprintln!("shoal {role}: panic: {info}");
        std::process::abort();
    }));
}

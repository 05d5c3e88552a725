//! The configuration: one serde struct for the TOML file, validated into [`Config`].
//!
//! `FileConfig` mirrors the file exactly: every key has a default and a doc
//! comment, and unknown keys are errors. `FileConfig::validate` turns it into
//! the runtime [`Config`], or into a [`ConfigError`] that names the file, the key
//! and what is wrong, on one line. `docs/config.md` lists the same keys.
//!
//! The supervisor validates the config once and hands the runtime struct to its
//! children as JSON in [`CHILD_CONFIG_ENV`], so that every process sees the same
//! values even if the file changes underneath.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::limits::MAX_VALUE_BYTES_LIMIT;

/// Environment variable through which the supervisor passes the validated config to its children.
pub const CHILD_CONFIG_ENV: &str = "SHOAL_CHILD_CONFIG";

/// Longest path a Unix socket address can hold on Linux (`sun_path` minus the NUL).
const MAX_UNIX_SOCKET_PATH_BYTES: usize = 107;

/// Longest `storage.writeback_ms`: the journal since LMDB's last commit is held in
/// memory, and read back at the next start.
const MAX_WRITEBACK_MS: u64 = 10_000;
/// Bounds of `storage.writeback_max_changes`. Each change may dirty a 4 KiB page that
/// the worker holds in memory until LMDB commits the window: the top allows a few GiB
/// in the worst case (every change on a page of its own).
const WRITEBACK_CHANGES: std::ops::RangeInclusive<usize> = 1_000..=1_000_000;

/// The config file as written by the operator. Every field has a default.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct FileConfig {
    /// Directory that holds everything Shoal stores: one `shard-<i>/` LMDB environment per
    /// worker, the PID file, the status table and the internal sockets.
    pub(crate) data_dir: PathBuf,
    /// Number of shard-worker processes (one LMDB environment each). 0 means one per CPU core.
    pub(crate) workers: usize,
    /// Client-facing listeners and limits.
    pub(crate) client: ClientSection,
    /// Storage engine settings.
    pub(crate) storage: StorageSection,
    /// How the supervisor restarts and stops its children.
    pub(crate) supervisor: SupervisorSection,
    /// The Prometheus metrics endpoint.
    pub(crate) metrics: MetricsSection,
    /// Joining other hosts into one cluster.
    pub(crate) cluster: ClusterSection,
}

/// `[cluster]`: how this host finds, authenticates and watches the other hosts.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ClusterSection {
    /// Peer addresses ("host:port") of hosts already in the cluster. Empty: this host
    /// starts a cluster of its own. Needs `cluster_secret`.
    pub(crate) seeds: Vec<String>,
    /// TCP address on which this host accepts the other hosts.
    pub(crate) peer_listen: String,
    /// The peer address the other hosts should use to reach this one. "" means
    /// `peer_listen`, which must then not be a wildcard address such as 0.0.0.0.
    pub(crate) advertise_addr: String,
    /// Shared secret that every host of the cluster proves it knows (at least 16 bytes).
    /// "" keeps the host on its own: it opens no peer listener and joins nothing.
    pub(crate) cluster_secret: String,
    /// How often a host sends each peer a heartbeat, in milliseconds.
    pub(crate) heartbeat_interval_ms: u64,
    /// Unreliability score past which a host proposes that a peer is inactive. A missed
    /// heartbeat adds 1 to a peer's score; an answered one lowers it.
    pub(crate) suspect_threshold: f64,
    /// A host unreachable for longer than this, in seconds, loses the unused part of its
    /// id ranges.
    pub(crate) offline_threshold_secs: u64,
    /// Share of its capacity past which a host gets no new partitions (0 to 1).
    pub(crate) max_fill_ratio: f64,
    /// Copies of each partition, the primary's included, on distinct hosts (1 to 7).
    /// With fewer hosts, every host holds one. Equal on every host of a cluster.
    pub(crate) replicas: usize,
    /// Copies a write must reach, the primary's included, before it is acknowledged;
    /// otherwise it fails with `-NOREPLICAS`. Unset: 2 when `replicas` is 2 or more.
    pub(crate) min_replicas_to_write: Option<usize>,
    /// The metadata leader compares the digests of every partition's copies once in
    /// this many seconds, one partition at a time, and reports a divergence. 0: never.
    pub(crate) digest_check_secs: u64,
    /// A follower serves `READONLY` reads only while it heard from its primary within
    /// this many milliseconds: the most a `READONLY` read lags behind.
    pub(crate) max_read_staleness_ms: u64,
    /// A follower that has not reached a commit point of this many milliseconds ago is
    /// reported out of sync.
    pub(crate) out_of_sync_after_ms: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            seeds: Vec::new(),
            peer_listen: "127.0.0.1:7380".into(),
            advertise_addr: String::new(),
            cluster_secret: String::new(),
            heartbeat_interval_ms: 500,
            suspect_threshold: 8.0,
            offline_threshold_secs: 24 * 3600,
            max_fill_ratio: 0.9,
            replicas: 3,
            min_replicas_to_write: None,
            digest_check_secs: 600,
            max_read_staleness_ms: 1000,
            out_of_sync_after_ms: 3000,
        }
    }
}

/// Validated `[cluster]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterConfig {
    /// Seed peer addresses, as written ("host:port"); resolved when used.
    pub seeds: Vec<String>,
    /// Where this host accepts peers; `None` when it runs on its own (no secret).
    pub peer_listen: Option<SocketAddr>,
    /// The peer address this host advertises.
    pub advertise_addr: String,
    /// The shared secret; `None` when the host runs on its own.
    pub secret: Option<String>,
    /// How often a host sends each peer a heartbeat, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// Unreliability score past which a host proposes that a peer is inactive.
    pub suspect_threshold: f64,
    /// How long, in seconds, a host may be unreachable before it loses the unused part
    /// of its id ranges.
    pub offline_threshold_secs: u64,
    /// Share of its capacity (0 to 1) past which a host gets no new partitions.
    pub max_fill_ratio: f64,
    /// Copies of each partition, the primary's included.
    pub replicas: usize,
    /// Copies a write must reach before it is acknowledged.
    pub min_replicas_to_write: usize,
    /// A whole pass of the leader's digest comparison takes this long, in seconds (0:
    /// none).
    pub digest_check_secs: u64,
    /// How long after its primary's last message a follower still serves `READONLY`
    /// reads, in milliseconds.
    pub max_read_staleness_ms: u64,
    /// How long a follower may lag behind a commit point before it is reported out of
    /// sync, in milliseconds.
    pub out_of_sync_after_ms: u64,
}

/// Most copies of a partition `cluster.replicas` may ask for.
pub const MAX_REPLICAS: usize = 7;

/// Fewest bytes a cluster secret may have.
pub(crate) const MIN_CLUSTER_SECRET_BYTES: usize = 16;

/// `[metrics]`: the Prometheus text endpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct MetricsSection {
    /// Address of the HTTP endpoint that serves `/metrics`. "" disables it.
    pub(crate) listen: String,
}

impl Default for MetricsSection {
    fn default() -> Self {
        MetricsSection {
            listen: "127.0.0.1:7381".into(),
        }
    }
}

/// `[client]`: how clients reach Shoal.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ClientSection {
    /// TCP address for RESP clients. "" disables TCP.
    pub(crate) listen: String,
    /// Unix socket path for RESP clients. Unset means `<data_dir>/shoal.sock`; "" disables it.
    pub(crate) unix_socket: Option<String>,
    /// Password that clients must give with AUTH (or HELLO ... AUTH). "" means no password.
    pub(crate) requirepass: String,
    /// Most client connections open at once; further connections get an error and are closed.
    pub(crate) max_connections: usize,
    /// Largest string value a client may store, in bytes.
    pub(crate) max_value_bytes: usize,
    /// Most bytes of replies a connection may have waiting to be sent. A client whose
    /// unsent replies pass it (one that does not read what it asked for) is disconnected.
    pub(crate) max_output_buffer_bytes: usize,
}

/// `[storage]`: the LMDB environments and the data model.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSection {
    /// Number of collections (Redis numbered databases, chosen with SELECT).
    pub collections: u16,
    /// Number of partitions the 16384 slots are grouped into. Fixed when the data dir is created.
    pub partitions: u16,
    /// "fsync": a write is acknowledged after its group commit's journal record is on disk.
    /// "async": the journal is flushed every `flush_interval_ms`; survives process crashes,
    /// but a power failure can lose the writes of the last interval.
    pub durability: Durability,
    /// Initial size of each shard's LMDB map, in bytes. It grows on demand.
    pub map_size_bytes: usize,
    /// Largest size the map may grow to. A shard whose map reaches it refuses writes
    /// (reads go on) until the limit is raised and the shard restarted.
    pub max_map_size_bytes: usize,
    /// With durability = "async", how often the journal is flushed to disk.
    pub flush_interval_ms: u64,
    /// Write-back: each worker keeps its acknowledged group commits in one LMDB
    /// transaction and commits it this often (default 1000; 0: every group commit is
    /// committed). Hosts in a cluster always commit every group commit.
    pub writeback_ms: u64,
    /// With write-back, a pause in client writes this long commits them before the
    /// window is over, so that reads go straight to the map again (0: only the window).
    pub writeback_idle_ms: u64,
    /// With write-back, the changes (puts and deletes of records) after which the window
    /// is committed before it is over. Each may dirty a page (4 KiB) that the worker
    /// holds in memory until then: more changes, fewer and cheaper commits under load,
    /// more memory.
    pub writeback_max_changes: usize,
    /// Write-back pauses (every group commit is committed) while the data dir's
    /// filesystem has less free space than this: acknowledged writes that LMDB has not
    /// committed need room to be committed, and a worker restarted on a full disk must
    /// commit them before it serves.
    pub writeback_min_free_bytes: u64,
    /// Commit-log entries kept per partition; older entries are trimmed.
    pub log_retention_entries: u64,
    /// Age, in seconds, past which commit-log entries are trimmed. 0 keeps entries of any age.
    pub log_retention_secs: u64,
    /// Bytes this host offers the cluster for data; partitions are placed in proportion to
    /// it. 0 means the free space of the data dir's filesystem plus what Shoal already uses.
    pub capacity_bytes: u64,
}

/// `[supervisor]`: child restarts and shutdown.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorSection {
    /// A child that dies more than this many times within `restart_window_ms` makes the
    /// supervisor stop everything and exit non-zero.
    pub max_restarts: u32,
    /// The window, in milliseconds, over which restarts are counted.
    pub restart_window_ms: u64,
    /// How long a child may take to report that it is ready.
    pub ready_timeout_ms: u64,
    /// How long a graceful shutdown may take before children are killed.
    pub drain_timeout_ms: u64,
    /// A serving child whose heartbeat is older than this is killed and restarted.
    pub child_timeout_ms: u64,
}

/// When a write is acknowledged relative to its fsync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledge after the group commit has been fsynced.
    Fsync,
    /// Acknowledge after commit; flush periodically.
    Async,
}

impl Default for FileConfig {
    fn default() -> Self {
        FileConfig {
            data_dir: PathBuf::from("./shoal-data"),
            workers: 0,
            client: ClientSection::default(),
            storage: StorageSection::default(),
            supervisor: SupervisorSection::default(),
            metrics: MetricsSection::default(),
            cluster: ClusterSection::default(),
        }
    }
}

impl Default for ClientSection {
    fn default() -> Self {
        ClientSection {
            listen: "127.0.0.1:7379".into(),
            unix_socket: None,
            requirepass: String::new(),
            max_connections: 10_000,
            max_value_bytes: 64 * 1024 * 1024,
            max_output_buffer_bytes: 256 * 1024 * 1024,
        }
    }
}

impl Default for StorageSection {
    fn default() -> Self {
        StorageSection {
            collections: 16,
            partitions: 256,
            durability: Durability::Fsync,
            map_size_bytes: 1 << 30,
            max_map_size_bytes: 1 << 40,
            flush_interval_ms: 1000,
            writeback_ms: 1000,
            writeback_idle_ms: 20,
            writeback_max_changes: 25_000,
            writeback_min_free_bytes: 512 << 20,
            log_retention_entries: 1_000_000,
            log_retention_secs: 7 * 24 * 3600,
            capacity_bytes: 0,
        }
    }
}

impl Default for SupervisorSection {
    fn default() -> Self {
        SupervisorSection {
            max_restarts: 5,
            restart_window_ms: 60_000,
            ready_timeout_ms: 30_000,
            drain_timeout_ms: 10_000,
            child_timeout_ms: 10_000,
        }
    }
}

/// The validated runtime configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// The file it came from, if any (embedded defaults otherwise).
    pub source: Option<PathBuf>,
    /// Absolute data directory.
    pub data_dir: PathBuf,
    /// Number of shard workers (resolved: never 0).
    pub workers: usize,
    /// Whether `workers` came from the core count (the file said 0 or nothing).
    pub workers_from_cores: bool,
    /// `[client]`, validated.
    pub client: ClientConfig,
    /// `[storage]`, as written (its values are checked, not converted).
    pub storage: StorageSection,
    /// `[supervisor]`, as written.
    pub supervisor: SupervisorSection,
    /// Where `/metrics` is served; `None` when disabled.
    pub metrics_listen: Option<SocketAddr>,
    /// `[cluster]`, validated.
    pub cluster: ClusterConfig,
}

/// Validated `[client]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientConfig {
    /// TCP address for RESP clients; `None` when TCP is disabled.
    pub listen: Option<SocketAddr>,
    /// Unix socket path for RESP clients; `None` when disabled.
    pub unix_socket: Option<PathBuf>,
    /// The password AUTH must give; `None` when there is none.
    pub requirepass: Option<String>,
    /// Most client connections open at once.
    pub max_connections: usize,
    /// Largest string value a client may store, in bytes.
    pub max_value_bytes: usize,
    /// Most bytes of unsent replies a connection may hold before it is closed.
    pub max_output_buffer_bytes: usize,
}

/// A config that cannot be used: which file, which key, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub(crate) file: String,
    pub(crate) key: String,
    pub(crate) reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "bad config {}: {}", self.file, self.reason)
        } else {
            write!(
                f,
                "bad config {}: key `{}`: {}",
                self.file, self.key, self.reason
            )
        }
    }
}

impl std::error::Error for ConfigError {}

impl FileConfig {
    /// Parses TOML text. `file` names the source in errors.
    pub(crate) fn parse(text: &str, file: &str) -> Result<FileConfig, ConfigError> {
        let deserializer = toml::Deserializer::new(text);
        serde_path_to_error::deserialize(deserializer).map_err(|err| {
            let path = err.path().to_string();
            let message = err.inner().message().trim().to_string();
            let message = message.replace('\n', "; ");
            let key = if path == "." { String::new() } else { path };
            let reason = if message.starts_with("unknown field") {
                "unknown key".to_string()
            } else if let (true, Some(span)) = (key.is_empty(), err.inner().span()) {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}: {message}")
            } else {
                message
            };
            ConfigError {
                file: file.to_string(),
                key,
                reason,
            }
        })
    }

    /// Reads and parses a config file.
    pub(crate) fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            key: String::new(),
            reason: format!("cannot read it: {e}"),
        })?;
        FileConfig::parse(&text, &file)
    }

    /// Checks every value and resolves defaults that depend on the machine or on other keys.
    /// Relative paths stay relative to the current directory; the supervisor makes them absolute.
    pub(crate) fn validate(self, source: Option<&Path>) -> Result<Config, ConfigError> {
        let file = source
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(embedded defaults)".into());
        let bad = |key: &str, reason: String| ConfigError {
            file: file.clone(),
            key: key.into(),
            reason,
        };

        if self.data_dir.as_os_str().is_empty() {
            return Err(bad("data_dir", "must not be empty".into()));
        }
        let workers = match self.workers {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            n if n > 256 => {
                return Err(bad(
                    "workers",
                    format!("{n} is more than the maximum of 256"),
                ))
            }
            n => n,
        };
        let listen = match self.client.listen.trim() {
            "" => None,
            text => Some(text.parse::<SocketAddr>().map_err(|_| {
                bad(
                    "client.listen",
                    format!("{text:?} is not an address like \"127.0.0.1:7379\""),
                )
            })?),
        };
        let unix_socket = match self.client.unix_socket.as_deref() {
            None => Some(self.data_dir.join("shoal.sock")),
            Some("") => None,
            Some(path) => Some(PathBuf::from(path)),
        };
        let metrics_listen = match self.metrics.listen.trim() {
            "" => None,
            text => Some(text.parse::<SocketAddr>().map_err(|_| {
                bad(
                    "metrics.listen",
                    format!("{text:?} is not an address like \"127.0.0.1:7381\""),
                )
            })?),
        };
        if listen.is_none() && unix_socket.is_none() {
            return Err(bad(
                "client.listen",
                "both client.listen and client.unix_socket are disabled".into(),
            ));
        }
        if self.client.max_connections == 0 {
            return Err(bad("client.max_connections", "must be at least 1".into()));
        }
        if self.client.max_value_bytes == 0 || self.client.max_value_bytes > MAX_VALUE_BYTES_LIMIT {
            return Err(bad(
                "client.max_value_bytes",
                format!(
                    "must be between 1 and {MAX_VALUE_BYTES_LIMIT}, got {}",
                    self.client.max_value_bytes
                ),
            ));
        }
        if self.client.max_output_buffer_bytes < self.client.max_value_bytes {
            return Err(bad(
                "client.max_output_buffer_bytes",
                format!(
                    "must be at least client.max_value_bytes ({}), so that a reply holding the \
                     largest value always fits, got {}",
                    self.client.max_value_bytes, self.client.max_output_buffer_bytes
                ),
            ));
        }
        let storage = &self.storage;
        if storage.collections == 0 || storage.collections > crate::limits::MAX_COLLECTIONS {
            return Err(bad(
                "storage.collections",
                format!("must be between 1 and 1024, got {}", storage.collections),
            ));
        }
        if storage.partitions == 0 || storage.partitions > crate::partition::SLOTS {
            return Err(bad(
                "storage.partitions",
                format!(
                    "must be between 1 and {}, got {}",
                    crate::partition::SLOTS,
                    storage.partitions
                ),
            ));
        }
        if (storage.partitions as usize) < workers {
            return Err(bad(
                "workers",
                format!(
                    "{workers} workers need at least as many partitions ({})",
                    storage.partitions
                ),
            ));
        }
        if storage.map_size_bytes < 1 << 20 {
            return Err(bad(
                "storage.map_size_bytes",
                format!("must be at least 1048576, got {}", storage.map_size_bytes),
            ));
        }
        if storage.max_map_size_bytes < storage.map_size_bytes {
            return Err(bad(
                "storage.max_map_size_bytes",
                format!(
                    "{} is below storage.map_size_bytes ({})",
                    storage.max_map_size_bytes, storage.map_size_bytes
                ),
            ));
        }
        if storage.log_retention_entries == 0 {
            return Err(bad(
                "storage.log_retention_entries",
                "must be at least 1".into(),
            ));
        }
        if storage.flush_interval_ms == 0 {
            return Err(bad(
                "storage.flush_interval_ms",
                "must be at least 1".into(),
            ));
        }
        if storage.writeback_ms > MAX_WRITEBACK_MS {
            return Err(bad(
                "storage.writeback_ms",
                format!("must be at most {MAX_WRITEBACK_MS} (0 turns write-back off)"),
            ));
        }
        if !WRITEBACK_CHANGES.contains(&storage.writeback_max_changes) {
            return Err(bad(
                "storage.writeback_max_changes",
                format!(
                    "must be {} to {}",
                    WRITEBACK_CHANGES.start(),
                    WRITEBACK_CHANGES.end()
                ),
            ));
        }
        let cluster = validate_cluster(self.cluster, &bad)?;
        let sup = &self.supervisor;
        for (key, value) in [
            ("supervisor.restart_window_ms", sup.restart_window_ms),
            ("supervisor.ready_timeout_ms", sup.ready_timeout_ms),
            ("supervisor.drain_timeout_ms", sup.drain_timeout_ms),
            ("supervisor.child_timeout_ms", sup.child_timeout_ms),
        ] {
            if value == 0 {
                return Err(bad(key, "must be at least 1".into()));
            }
        }
        Ok(Config {
            source: source.map(Path::to_path_buf),
            data_dir: self.data_dir,
            workers,
            workers_from_cores: self.workers == 0,
            client: ClientConfig {
                listen,
                unix_socket,
                requirepass: Some(self.client.requirepass).filter(|p| !p.is_empty()),
                max_connections: self.client.max_connections,
                max_value_bytes: self.client.max_value_bytes,
                max_output_buffer_bytes: self.client.max_output_buffer_bytes,
            },
            storage: self.storage,
            supervisor: self.supervisor,
            metrics_listen,
            cluster,
        })
    }
}

/// Checks `[cluster]`: a host with a secret needs a reachable peer address; seeds need a secret.
fn validate_cluster(
    section: ClusterSection,
    bad: &dyn Fn(&str, String) -> ConfigError,
) -> Result<ClusterConfig, ConfigError> {
    for seed in &section.seeds {
        if !is_host_port(seed) {
            return Err(bad(
                "cluster.seeds",
                format!("{seed:?} is not an address like \"10.0.0.1:7380\" or \"db1:7380\""),
            ));
        }
    }
    let secret = Some(section.cluster_secret).filter(|secret| !secret.is_empty());
    match &secret {
        None if !section.seeds.is_empty() => {
            return Err(bad(
                "cluster.seeds",
                "joining a cluster needs cluster.cluster_secret (the secret the cluster uses)"
                    .into(),
            ))
        }
        Some(secret) if secret.len() < MIN_CLUSTER_SECRET_BYTES => {
            return Err(bad(
                "cluster.cluster_secret",
                format!(
                    "must be at least {MIN_CLUSTER_SECRET_BYTES} bytes, got {}",
                    secret.len()
                ),
            ))
        }
        _ => {}
    }
    let peer_listen = match (&secret, section.peer_listen.trim()) {
        (None, _) => None,
        (Some(_), "") => {
            return Err(bad(
                "cluster.peer_listen",
                "must be set when cluster.cluster_secret is".into(),
            ))
        }
        (Some(_), text) => Some(text.parse::<SocketAddr>().map_err(|_| {
            bad(
                "cluster.peer_listen",
                format!("{text:?} is not an address like \"127.0.0.1:7380\""),
            )
        })?),
    };
    let advertise_addr = match (section.advertise_addr.trim(), peer_listen) {
        ("", Some(listen)) if listen.ip().is_unspecified() => {
            return Err(bad(
                "cluster.advertise_addr",
                format!("must be set when cluster.peer_listen is the wildcard address {listen}"),
            ))
        }
        ("", Some(listen)) => listen.to_string(),
        ("", None) => String::new(),
        (text, _) if is_host_port(text) => text.to_string(),
        (text, _) => {
            return Err(bad(
                "cluster.advertise_addr",
                format!("{text:?} is not an address like \"10.0.0.1:7380\""),
            ))
        }
    };
    if section.heartbeat_interval_ms == 0 {
        return Err(bad(
            "cluster.heartbeat_interval_ms",
            "must be at least 1".into(),
        ));
    }
    if !(section.suspect_threshold.is_finite() && section.suspect_threshold >= 1.0) {
        return Err(bad(
            "cluster.suspect_threshold",
            format!(
                "must be a number of at least 1, got {}",
                section.suspect_threshold
            ),
        ));
    }
    if section.offline_threshold_secs == 0 {
        return Err(bad(
            "cluster.offline_threshold_secs",
            "must be at least 1".into(),
        ));
    }
    if !(section.max_fill_ratio > 0.0 && section.max_fill_ratio <= 1.0) {
        return Err(bad(
            "cluster.max_fill_ratio",
            format!(
                "must be above 0 and at most 1, got {}",
                section.max_fill_ratio
            ),
        ));
    }
    if !(1..=60_000).contains(&section.max_read_staleness_ms) {
        return Err(bad(
            "cluster.max_read_staleness_ms",
            format!("must be 1 to 60000, got {}", section.max_read_staleness_ms),
        ));
    }
    if !(1000..=3_600_000).contains(&section.out_of_sync_after_ms) {
        return Err(bad(
            "cluster.out_of_sync_after_ms",
            format!(
                "must be 1000 to 3600000, got {}",
                section.out_of_sync_after_ms
            ),
        ));
    }
    if !(1..=MAX_REPLICAS).contains(&section.replicas) {
        return Err(bad(
            "cluster.replicas",
            format!("must be 1 to {MAX_REPLICAS}, got {}", section.replicas),
        ));
    }
    let min_replicas_to_write = section
        .min_replicas_to_write
        .unwrap_or(section.replicas.min(2));
    if !(1..=section.replicas).contains(&min_replicas_to_write) {
        return Err(bad(
            "cluster.min_replicas_to_write",
            format!(
                "must be 1 to cluster.replicas ({}), got {min_replicas_to_write}",
                section.replicas
            ),
        ));
    }
    Ok(ClusterConfig {
        seeds: section.seeds,
        peer_listen,
        advertise_addr,
        secret,
        heartbeat_interval_ms: section.heartbeat_interval_ms,
        suspect_threshold: section.suspect_threshold,
        offline_threshold_secs: section.offline_threshold_secs,
        max_fill_ratio: section.max_fill_ratio,
        replicas: section.replicas,
        min_replicas_to_write,
        digest_check_secs: section.digest_check_secs,
        max_read_staleness_ms: section.max_read_staleness_ms,
        out_of_sync_after_ms: section.out_of_sync_after_ms,
    })
}

/// Whether `text` looks like "host:port" with a non-empty host and a port number.
fn is_host_port(text: &str) -> bool {
    match text.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
        }
        None => false,
    }
}

impl Config {
    /// Loads the config from `path` (or embedded defaults when `None`) and validates it.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let file = match path {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        file.validate(path)
    }

    /// Creates the data dir and makes every path absolute, so that children and
    /// sockets do not depend on the working directory.
    pub fn make_paths_absolute(&mut self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.data_dir)?;
        let cwd = std::env::current_dir()?;
        self.data_dir = self.data_dir.canonicalize()?;
        if let Some(socket) = &mut self.client.unix_socket {
            if socket.is_relative() {
                // `components` drops the "." of the default "./shoal-data/shoal.sock".
                *socket = cwd.join(&*socket).components().collect();
            }
        }
        if let Some(source) = &mut self.source {
            if source.is_relative() {
                *source = cwd.join(&*source);
            }
        }
        Ok(())
    }

    /// Checks paths that depend on the resolved (absolute) data dir.
    pub fn check_paths(&self) -> Result<(), ConfigError> {
        let file = self
            .source
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(embedded defaults)".into());
        let too_long = |path: &Path| path.as_os_str().len() > MAX_UNIX_SOCKET_PATH_BYTES;
        if let Some(socket) = &self.client.unix_socket {
            if too_long(socket) {
                return Err(ConfigError {
                    file,
                    key: "client.unix_socket".into(),
                    reason: format!(
                        "{} is longer than {MAX_UNIX_SOCKET_PATH_BYTES} bytes",
                        socket.display()
                    ),
                });
            }
        }
        if too_long(&self.worker_socket(self.workers)) {
            return Err(ConfigError {
                file,
                key: "data_dir".into(),
                reason: format!(
                    "{} is too long to hold Unix sockets",
                    self.data_dir.display()
                ),
            });
        }
        Ok(())
    }

    /// `<data_dir>/shard-<i>/`: the LMDB environment of worker `i`.
    pub fn shard_dir(&self, index: usize) -> PathBuf {
        self.data_dir.join(format!("shard-{index}"))
    }

    /// `<data_dir>/run/`: sockets and the status table, recreated at every start.
    pub fn run_dir(&self) -> PathBuf {
        self.data_dir.join("run")
    }

    /// The Unix socket on which worker `index` accepts the net-daemon.
    pub fn worker_socket(&self, index: usize) -> PathBuf {
        self.run_dir().join(format!("shard-{index}.sock"))
    }

    /// One line saying what the cluster layer is doing ("member", "joining: ..."),
    /// written by the net-daemon for `shoal status`.
    pub fn cluster_phase_path(&self) -> PathBuf {
        self.run_dir().join("cluster-phase")
    }

    /// The shared-memory status table.
    pub fn status_path(&self) -> PathBuf {
        self.run_dir().join("status")
    }

    /// Worker `index`'s pending-key index (write-back; [`crate::pending`]).
    pub fn pending_path(&self, index: usize) -> PathBuf {
        self.run_dir().join(format!("pending-{index}"))
    }

    /// The flock'd PID file that keeps a second supervisor off this data dir.
    pub fn pid_path(&self) -> PathBuf {
        self.data_dir.join("shoal.pid")
    }

    /// Which shard holds each partition, kept while the worker count changes.
    pub fn partition_map_path(&self) -> PathBuf {
        self.data_dir.join("partition_map.json")
    }

    /// The record of the layout (partitions, workers) the data dir was created with.
    pub fn layout_path(&self) -> PathBuf {
        self.data_dir.join("layout.json")
    }

    /// Limits for the client-facing RESP parser.
    pub fn request_limits(&self) -> crate::resp::RequestLimits {
        let max_bulk_bytes = self.client.max_value_bytes + crate::limits::BULK_SLACK_BYTES;
        crate::resp::RequestLimits {
            max_args: crate::limits::MAX_REQUEST_ARGS,
            max_bulk_bytes,
            max_request_bytes: (2 * max_bulk_bytes).max(crate::limits::MIN_REQUEST_BYTES),
            max_inline_bytes: crate::limits::MAX_INLINE_BYTES,
        }
    }
}

/// The shape of a data dir, fixed when it is created and changed only by moving
/// partitions: `<data_dir>/layout.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataDirLayout {
    /// How many partitions the data dir's keys hash into.
    pub partitions: u16,
    /// How many shard-workers (and shard environments) the data dir has.
    pub workers: usize,
}

impl DataDirLayout {
    /// Reads the layout record; `Ok(None)` for a data dir that has none yet.
    pub fn load(path: &Path) -> std::io::Result<Option<DataDirLayout>> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Writes the layout record durably (a temp file renamed into place, then synced).
    pub fn store(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        write_durably(path, text.as_bytes())
    }
}

/// Replaces `path` with `bytes` so that a crash leaves either the old or the new file:
/// write a temp file, fsync it, rename it, fsync the directory.
pub fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temporary)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let config = FileConfig::parse("", "t.toml")
            .unwrap()
            .validate(None)
            .unwrap();
        assert_eq!(
            config.client.listen,
            Some("127.0.0.1:7379".parse().unwrap())
        );
        assert_eq!(
            config.client.unix_socket,
            Some(PathBuf::from("./shoal-data/shoal.sock"))
        );
        assert_eq!(config.storage.partitions, 256);
        assert_eq!(config.storage.collections, 16);
        assert_eq!(config.storage.durability, Durability::Fsync);
        assert!(config.workers >= 1);
    }

    fn cluster_error(text: &str) -> ConfigError {
        FileConfig::parse(text, "t.toml")
            .unwrap()
            .validate(None)
            .unwrap_err()
    }

    #[test]
    fn cluster_defaults_keep_the_host_on_its_own() {
        let config = FileConfig::default().validate(None).unwrap();
        assert_eq!(config.cluster.peer_listen, None);
        assert_eq!(config.cluster.secret, None);
        assert!(config.cluster.seeds.is_empty());
        // Three copies once there are hosts for them; writes reach two.
        assert_eq!(config.cluster.replicas, 3);
        assert_eq!(config.cluster.min_replicas_to_write, 2);
    }

    #[test]
    fn cluster_section_is_validated() {
        let secret = "cluster_secret = \"0123456789abcdef\"\n";
        let config = FileConfig::parse(
            &format!("[cluster]\n{secret}seeds = [\"db1:7380\", \"10.0.0.2:7380\"]\n"),
            "t.toml",
        )
        .unwrap()
        .validate(None)
        .unwrap();
        assert_eq!(
            config.cluster.peer_listen,
            Some("127.0.0.1:7380".parse().unwrap())
        );
        assert_eq!(config.cluster.advertise_addr, "127.0.0.1:7380");
        assert_eq!(config.cluster.seeds.len(), 2);

        let err = cluster_error("[cluster]\nseeds = [\"db1:7380\"]\n");
        assert_eq!(err.key, "cluster.seeds");
        assert!(err.reason.contains("cluster_secret"), "{err}");
        let err = cluster_error("[cluster]\ncluster_secret = \"short\"\n");
        assert_eq!(err.key, "cluster.cluster_secret");
        let err = cluster_error(&format!("[cluster]\n{secret}seeds = [\"db1\"]\n"));
        assert_eq!(err.key, "cluster.seeds");
        let err = cluster_error(&format!(
            "[cluster]\n{secret}peer_listen = \"0.0.0.0:7380\"\n"
        ));
        assert_eq!(err.key, "cluster.advertise_addr");
        let err = cluster_error(&format!("[cluster]\n{secret}peer_listen = \"nowhere\"\n"));
        assert_eq!(err.key, "cluster.peer_listen");
        let err = cluster_error(&format!("[cluster]\n{secret}suspect_threshold = 0.5\n"));
        assert_eq!(err.key, "cluster.suspect_threshold");
        let err = cluster_error(&format!("[cluster]\n{secret}heartbeat_interval_ms = 0\n"));
        assert_eq!(err.key, "cluster.heartbeat_interval_ms");
        let err = cluster_error(&format!("[cluster]\n{secret}max_fill_ratio = 1.5\n"));
        assert_eq!(err.key, "cluster.max_fill_ratio");
        let err = cluster_error(&format!("[cluster]\n{secret}replicas = 0\n"));
        assert_eq!(err.key, "cluster.replicas");
        let err = cluster_error(&format!(
            "[cluster]\n{secret}replicas = 2\nmin_replicas_to_write = 3\n"
        ));
        assert_eq!(err.key, "cluster.min_replicas_to_write");
        let err = cluster_error(&format!("[cluster]\n{secret}max_read_staleness_ms = 0\n"));
        assert_eq!(err.key, "cluster.max_read_staleness_ms");
        let err = cluster_error(&format!("[cluster]\n{secret}out_of_sync_after_ms = 10\n"));
        assert_eq!(err.key, "cluster.out_of_sync_after_ms");
    }

    #[test]
    fn unknown_key_is_named_with_its_section() {
        let err = FileConfig::parse("[client]\nlisten_addr = \"x\"\n", "t.toml").unwrap_err();
        assert_eq!(err.key, "client.listen_addr");
        assert_eq!(
            err.to_string(),
            "bad config t.toml: key `client.listen_addr`: unknown key"
        );
        let err = FileConfig::parse("wokers = 2\n", "t.toml").unwrap_err();
        assert_eq!(err.key, "wokers");
    }

    #[test]
    fn syntax_errors_give_one_line_with_a_line_number() {
        let err = FileConfig::parse("workers = 2\nworkers = \n", "t.toml").unwrap_err();
        assert!(err.reason.starts_with("line 2: "), "{err}");
        assert!(!err.to_string().contains('\n'));
    }

    #[test]
    fn wrong_type_names_the_key() {
        let err = FileConfig::parse("[storage]\npartitions = \"many\"\n", "t.toml").unwrap_err();
        assert_eq!(err.key, "storage.partitions");
        assert!(!err.to_string().contains('\n'));
        let err =
            FileConfig::parse("[storage]\ndurability = \"sometimes\"\n", "t.toml").unwrap_err();
        assert_eq!(err.key, "storage.durability");
    }

    #[test]
    fn bad_values_are_rejected() {
        let check = |text: &str, key: &str| {
            let err = FileConfig::parse(text, "t.toml")
                .unwrap()
                .validate(Some(Path::new("t.toml")))
                .unwrap_err();
            assert_eq!(err.key, key, "{err}");
        };
        check("[client]\nlisten = \"nonsense\"\n", "client.listen");
        check("[client]\nmax_value_bytes = 0\n", "client.max_value_bytes");
        check(
            "[client]\nmax_output_buffer_bytes = 1000\n",
            "client.max_output_buffer_bytes",
        );
        check(
            "[client]\nmax_value_bytes = 2048\nmax_output_buffer_bytes = 2047\n",
            "client.max_output_buffer_bytes",
        );
        check("[storage]\npartitions = 0\n", "storage.partitions");
        check(
            "[storage]\nwriteback_max_changes = 10\n",
            "storage.writeback_max_changes",
        );
        check(
            "[storage]\nwriteback_max_changes = 100000000\n",
            "storage.writeback_max_changes",
        );
        check("[storage]\npartitions = 20000\n", "storage.partitions");
        check("workers = 8\n[storage]\npartitions = 4\n", "workers");
        check(
            "[client]\nlisten = \"\"\nunix_socket = \"\"\n",
            "client.listen",
        );
    }

    #[test]
    fn empty_unix_socket_disables_it() {
        let config = FileConfig::parse("[client]\nunix_socket = \"\"\n", "t")
            .unwrap()
            .validate(None)
            .unwrap();
        assert_eq!(config.client.unix_socket, None);
    }
}

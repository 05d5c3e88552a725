//! The status table: a small shared-memory file that every process of one host maps.
//!
//! The supervisor creates it at `<data_dir>/run/status` at every start. Each
//! child writes its own slot (pid, state, heartbeat, counters); the supervisor
//! writes restarts; the net-daemon reads all slots to answer INFO; `shoal
//! status` reads it from outside. Fields are 64-bit atomics, so readers never
//! see torn values and nobody takes a lock.
//!
//! Layout (native byte order: the file never leaves the host), in u64 words:
//! - header, 16 words: `MAGIC`, `VERSION`, slot count, supervisor pid,
//!   supervisor start time (ms), workers, partitions, reserved, then the
//!   progress of a worker-count change: partitions to move, partitions moved,
//!   bytes moved, start time (ms); the rest reserved;
//! - then one slot of `SLOT_WORDS` words per process (histograms take
//!   `HISTOGRAM_BUCKETS` consecutive words): workers `0..workers`
//!   take slots `0..workers`, the net-daemon takes slot `workers`. The words of
//!   a slot are the [`Field`]s, in order.

use std::fs::OpenOptions;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{Mmap, MmapMut};

const MAGIC: u64 = u64::from_be_bytes(*b"SHOALST1");
const VERSION: u64 = 2;
const HEADER_WORDS: usize = 16;
/// Words per process slot.
pub(crate) const SLOT_WORDS: usize = 48;
/// Most slots a table holds (workers plus the net-daemon).
pub(crate) const MAX_SLOTS: usize = 1024;

const _: () = assert!((Field::Reserved as usize) < SLOT_WORDS);

/// The words of one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Field {
    /// The process id of the slot's current process.
    Pid = 0,
    /// The [`Role`] code.
    Role = 1,
    /// The worker index (0 for the net-daemon).
    Index = 2,
    /// The [`ProcessState`] code.
    State = 3,
    /// How many times the supervisor restarted the slot's process.
    Restarts = 4,
    /// The last heartbeat, in Unix ms; the supervisor restarts a process whose heartbeat stops.
    HeartbeatMs = 5,
    /// A worker's highest commit id over its partitions.
    LastCommitId = 6,
    /// Requests in a worker's current group commit (0 between batches).
    QueueDepth = 7,
    /// Requests served since the process started (a counter).
    Ops = 8,
    /// When the process claimed the slot, in Unix ms.
    StartedMs = 9,
    /// Group commits a worker has made that changed data (a counter).
    Commits = 10,
    /// The net-daemon's open client connections.
    Connections = 11,
    /// Size of the worker's LMDB map, in bytes.
    MapSizeBytes = 12,
    /// Bytes of the map in use (last page number × page size).
    MapUsedBytes = 13,
    /// Sum of group-commit durations, in microseconds (with the histogram below).
    CommitMicrosSum = 14,
    /// When a worker's last checkpoint was recorded, in Unix seconds (0 before the first).
    CheckpointSecs = 15,
    /// First of `HISTOGRAM_BUCKETS` words: group commits per batch-size bucket.
    BatchSizeBuckets = 16,
    /// First of `HISTOGRAM_BUCKETS` words: group commits per duration bucket.
    CommitMicrosBuckets = 16 + HISTOGRAM_BUCKETS,
    /// Bytes of a worker's journal segments: what a restart after a power failure
    /// would read (it shrinks at each checkpoint).
    JournalBytes = 16 + 2 * HISTOGRAM_BUCKETS,
    /// Whether a worker holds acknowledged writes that LMDB has not committed
    /// (write-back), and which: [`crate::pending`]'s `SETTLED`, `KEYS` or `SHARD`. The
    /// net-daemon reads what is pending through the worker, not from its environment.
    /// Set before such a batch is acknowledged; it stays set if the worker dies, until
    /// its successor has replayed its journal.
    Unsettled = 17 + 2 * HISTOGRAM_BUCKETS,
    /// How many prepared transactions may lock keys of a worker's shard, counted high:
    /// at least as many as any state of the environment that a reader may see holds
    /// ([`PREPARED_UNKNOWN`] until the worker has opened its store). Raised before the
    /// worker answers a `Prepare`, lowered once LMDB has committed the transaction's
    /// end. The net-daemon reads a shard's map only while it is 0: only the worker
    /// waits for locks.
    Prepared = 18 + 2 * HISTOGRAM_BUCKETS,
    /// The first unused word; must stay below the slot's size.
    Reserved = 19 + 2 * HISTOGRAM_BUCKETS,
}

/// The `Prepared` word of a worker that has not yet counted its prepared transactions.
pub const PREPARED_UNKNOWN: u64 = u64::MAX;

/// Buckets of the histograms a worker keeps in its slot (the last one is +Inf).
pub(crate) const HISTOGRAM_BUCKETS: usize = 10;
/// Upper bounds of the batch-size buckets (requests per group commit).
pub const BATCH_SIZE_BOUNDS: [u64; HISTOGRAM_BUCKETS - 1] = [1, 2, 4, 8, 16, 32, 64, 256, 1024];
/// Upper bounds of the commit-duration buckets, in microseconds.
pub const COMMIT_MICROS_BOUNDS: [u64; HISTOGRAM_BUCKETS - 1] =
    [100, 250, 500, 1000, 2500, 5000, 10_000, 50_000, 250_000];

/// The bucket of `value` among `bounds` (values above the last bound go to +Inf).
pub fn bucket(bounds: &[u64], value: u64) -> usize {
    bounds
        .iter()
        .position(|&bound| value <= bound)
        .unwrap_or(bounds.len())
}

/// What a slot's process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A shard-worker: one shard's LMDB environment.
    ShardWorker,
    /// The net-daemon: clients and peers. It has the last slot.
    NetDaemon,
}

impl Role {
    fn code(self) -> u64 {
        match self {
            Role::ShardWorker => 1,
            Role::NetDaemon => 2,
        }
    }

    /// The name `shoal status` shows.
    pub fn name(self) -> &'static str {
        match self {
            Role::ShardWorker => "shard-worker",
            Role::NetDaemon => "net-daemon",
        }
    }
}

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum ProcessState {
    /// Never started.
    Empty = 0,
    /// Started, loading.
    Starting = 1,
    /// Serving.
    Ready = 2,
    /// Finishing in-flight work before it exits.
    Draining = 3,
    /// Died; the supervisor will restart it.
    Down = 4,
    /// Exited on purpose.
    Stopped = 5,
}

impl ProcessState {
    pub(crate) fn from_code(code: u64) -> ProcessState {
        match code {
            1 => ProcessState::Starting,
            2 => ProcessState::Ready,
            3 => ProcessState::Draining,
            4 => ProcessState::Down,
            5 => ProcessState::Stopped,
            _ => ProcessState::Empty,
        }
    }

    /// The name `shoal status` shows.
    pub fn name(self) -> &'static str {
        match self {
            ProcessState::Empty => "empty",
            ProcessState::Starting => "starting",
            ProcessState::Ready => "ready",
            ProcessState::Draining => "draining",
            ProcessState::Down => "down",
            ProcessState::Stopped => "stopped",
        }
    }
}

enum Map {
    ReadWrite(MmapMut),
    ReadOnly(Mmap),
}

/// A mapped status table.
pub struct StatusTable {
    map: Map,
}

impl StatusTable {
    /// Creates (or replaces) the table for `workers` workers plus the net-daemon.
    pub fn create(path: &Path, workers: usize, partitions: u16) -> io::Result<StatusTable> {
        let slots = workers + 1;
        if slots > MAX_SLOTS {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "too many processes for the status table",
            ));
        }
        // A new file renamed into place: processes of an earlier run that still map the
        // old one (exiting after their supervisor was killed) cannot scribble on this one.
        let temporary = path.with_extension("new");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temporary)?;
        file.set_len(((HEADER_WORDS + slots * SLOT_WORDS) * 8) as u64)?;
        std::fs::rename(&temporary, path)?;
        // SAFETY: the file is ours, sized above, and only accessed through atomics.
        let map = unsafe { MmapMut::map_mut(&file)? };
        let table = StatusTable {
            map: Map::ReadWrite(map),
        };
        let header = table.header();
        header[1].store(VERSION, Ordering::Relaxed);
        header[2].store(slots as u64, Ordering::Relaxed);
        header[3].store(u64::from(std::process::id()), Ordering::Relaxed);
        header[4].store(crate::now_ms(), Ordering::Relaxed);
        header[5].store(workers as u64, Ordering::Relaxed);
        header[6].store(u64::from(partitions), Ordering::Relaxed);
        for index in 0..slots {
            let (role, role_index) = if index < workers {
                (Role::ShardWorker, index)
            } else {
                (Role::NetDaemon, 0)
            };
            let slot = table.slot(index);
            slot.set(Field::Role, role.code());
            slot.set(Field::Index, role_index as u64);
        }
        header[0].store(MAGIC, Ordering::Release);
        Ok(table)
    }

    /// Maps an existing table for writing (children).
    pub fn open(path: &Path) -> io::Result<StatusTable> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        // SAFETY: fields are only accessed through atomics; the length is checked in `check`.
        let map = unsafe { MmapMut::map_mut(&file)? };
        StatusTable {
            map: Map::ReadWrite(map),
        }
        .check()
    }

    /// Maps an existing table for reading (`shoal status`).
    pub fn open_read_only(path: &Path) -> io::Result<StatusTable> {
        let file = OpenOptions::new().read(true).open(path)?;
        // SAFETY: as in `open`; this mapping is never written.
        let map = unsafe { Mmap::map(&file)? };
        StatusTable {
            map: Map::ReadOnly(map),
        }
        .check()
    }

    fn check(self) -> io::Result<StatusTable> {
        let bytes = self.bytes();
        let invalid = |why: &str| {
            Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("status table: {why}"),
            ))
        };
        if bytes.len() < HEADER_WORDS * 8 {
            return invalid("file too short");
        }
        let header = self.header();
        if header[0].load(Ordering::Acquire) != MAGIC
            || header[1].load(Ordering::Relaxed) != VERSION
        {
            return invalid("bad magic or version");
        }
        let slots = header[2].load(Ordering::Relaxed) as usize;
        if slots > MAX_SLOTS || bytes.len() < (HEADER_WORDS + slots * SLOT_WORDS) * 8 {
            return invalid("slot count does not match the file size");
        }
        Ok(self)
    }

    fn bytes(&self) -> &[u8] {
        match &self.map {
            Map::ReadWrite(map) => map,
            Map::ReadOnly(map) => map,
        }
    }

    fn words(&self) -> &[AtomicU64] {
        let bytes = self.bytes();
        // SAFETY: mappings are page-aligned, so 8-byte aligned; AtomicU64 has the layout of
        // u64, and every access goes through the atomic API, so concurrent writers in other
        // processes are fine. A read-only mapping is only ever loaded from.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<AtomicU64>(), bytes.len() / 8) }
    }

    fn header(&self) -> &[AtomicU64] {
        &self.words()[..HEADER_WORDS]
    }

    /// Number of slots (workers + 1).
    pub fn slot_count(&self) -> usize {
        self.header()[2].load(Ordering::Relaxed) as usize
    }

    /// The supervisor's pid.
    pub fn supervisor_pid(&self) -> u32 {
        self.header()[3].load(Ordering::Relaxed) as u32
    }

    /// When the supervisor started (ms since the epoch).
    #[expect(dead_code, reason = "no caller in the workspace")]
    pub(crate) fn started_ms(&self) -> u64 {
        self.header()[4].load(Ordering::Relaxed)
    }

    /// Workers the table was made for.
    pub fn workers(&self) -> usize {
        self.header()[5].load(Ordering::Relaxed) as usize
    }

    /// Partitions of the data dir.
    pub fn partitions(&self) -> u16 {
        self.header()[6].load(Ordering::Relaxed) as u16
    }

    /// Records the progress of a worker-count change.
    pub fn set_rebalance(&self, progress: Rebalance) {
        let header = self.header();
        header[8].store(progress.total, Ordering::Release);
        header[9].store(progress.done, Ordering::Release);
        header[10].store(progress.bytes, Ordering::Release);
        header[11].store(progress.started_ms, Ordering::Release);
    }

    /// The progress of a worker-count change (all zero if none ran).
    pub fn rebalance(&self) -> Rebalance {
        let header = self.header();
        Rebalance {
            total: header[8].load(Ordering::Acquire),
            done: header[9].load(Ordering::Acquire),
            bytes: header[10].load(Ordering::Acquire),
            started_ms: header[11].load(Ordering::Acquire),
        }
    }

    /// The slot of process `index` (see the module docs).
    ///
    /// # Panics
    /// If `index` is not below [`StatusTable::slot_count`]: slot indices come from the config, not from input.
    pub fn slot(&self, index: usize) -> Slot<'_> {
        assert!(
            index < self.slot_count(),
            "status slot {index} out of range"
        );
        let start = HEADER_WORDS + index * SLOT_WORDS;
        Slot {
            words: &self.words()[start..start + SLOT_WORDS],
        }
    }

    /// The net-daemon's slot.
    pub fn net_daemon_slot(&self) -> Slot<'_> {
        self.slot(self.slot_count() - 1)
    }
}

/// Progress of moving partitions between shards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rebalance {
    /// Partitions to move.
    pub total: u64,
    /// Partitions moved so far.
    pub done: u64,
    /// Bytes of records copied so far.
    pub bytes: u64,
    /// When the move started, in Unix ms (0: no move has run).
    pub started_ms: u64,
}

/// One process's slot.
#[derive(Clone, Copy)]
pub struct Slot<'a> {
    words: &'a [AtomicU64],
}

impl Slot<'_> {
    /// Reads one word.
    pub fn get(&self, field: Field) -> u64 {
        self.words[field as usize].load(Ordering::Acquire)
    }

    /// Writes one word.
    pub fn set(&self, field: Field, value: u64) {
        self.words[field as usize].store(value, Ordering::Release);
    }

    /// Adds to a counter word.
    pub fn add(&self, field: Field, delta: u64) {
        self.words[field as usize].fetch_add(delta, Ordering::AcqRel);
    }

    /// Counts one observation in the histogram that starts at `first`.
    pub fn observe(&self, first: Field, bounds: &[u64], value: u64) {
        self.words[first as usize + bucket(bounds, value)].fetch_add(1, Ordering::AcqRel);
    }

    /// The counts of the histogram that starts at `first`, per bucket (not cumulative).
    pub fn histogram(&self, first: Field) -> [u64; HISTOGRAM_BUCKETS] {
        std::array::from_fn(|i| self.words[first as usize + i].load(Ordering::Acquire))
    }

    /// Where the slot's process is in its life.
    pub fn state(&self) -> ProcessState {
        ProcessState::from_code(self.get(Field::State))
    }

    /// Records where the slot's process is in its life.
    pub fn set_state(&self, state: ProcessState) {
        self.set(Field::State, state as u64);
    }

    /// What the slot's process does.
    pub fn role(&self) -> Role {
        if self.get(Field::Role) == Role::NetDaemon.code() {
            Role::NetDaemon
        } else {
            Role::ShardWorker
        }
    }

    /// Records a heartbeat now.
    pub fn beat(&self) {
        self.set(Field::HeartbeatMs, crate::now_ms());
    }

    /// Marks the slot as taken by the calling process, starting.
    pub fn claim(&self) {
        self.set(Field::Pid, u64::from(std::process::id()));
        self.set(Field::StartedMs, crate::now_ms());
        self.beat();
        self.set_state(ProcessState::Starting);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_and_readers_share_the_table() {
        let dir = std::env::temp_dir().join(format!("shoal-status-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("status");
        let supervisor = StatusTable::create(&path, 3, 256).unwrap();
        let child = StatusTable::open(&path).unwrap();
        child.slot(1).claim();
        child.slot(1).set_state(ProcessState::Ready);
        child.slot(1).add(Field::Ops, 5);
        let reader = StatusTable::open_read_only(&path).unwrap();
        assert_eq!(reader.slot_count(), 4);
        assert_eq!(reader.workers(), 3);
        assert_eq!(reader.partitions(), 256);
        assert_eq!(reader.slot(1).state(), ProcessState::Ready);
        assert_eq!(reader.slot(1).get(Field::Ops), 5);
        assert_eq!(
            reader.slot(1).get(Field::Pid),
            u64::from(std::process::id())
        );
        assert_eq!(reader.net_daemon_slot().role(), Role::NetDaemon);
        assert_eq!(supervisor.slot(0).role(), Role::ShardWorker);
        std::fs::write(&path, b"garbage").unwrap();
        assert!(StatusTable::open_read_only(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

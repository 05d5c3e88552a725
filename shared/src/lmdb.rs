//! What every process that opens a shard's LMDB environment shares: the raw
//! database type, the error of opening and using an environment, the opening of
//! named databases, and the free space of the filesystem that holds it.
//!
//! The shard-worker creates and writes its environment; the net-daemon opens it
//! read-only ([`crate::reader`]). This module never keeps an environment open
//! itself.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::path::Path;

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, Env, EnvOpenOptions, RoTxn, WithoutTls};

use crate::frame::{LogEntry, Partition};
use crate::layout;

/// A named database of raw bytes to raw bytes; [`crate::layout`] gives the bytes meaning.
pub type RawDatabase = Database<'static, Bytes, Bytes>;

/// Why a shard environment could not be opened, read or committed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// LMDB refused: the map is full, the disk failed, the environment is locked, ...
    #[error("lmdb: {0}")]
    Lmdb(#[from] heed::Error),
    /// Stored bytes that do not decode.
    #[error(transparent)]
    Corrupt(#[from] layout::CorruptError),
    /// The environment does not match what the caller expects (its format, its shard id,
    /// its databases).
    #[error("{0}")]
    Mismatch(String),
    /// A flush of the environment failed: what reached the disk is not known, and only
    /// a restart (which recovers from the last checkpoint and the journal) is safe.
    #[error("{0}")]
    InDoubt(String),
    /// The directory of the environment could not be created.
    #[error("cannot create {path}: {source}")]
    CreateDir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether a write failed for want of room: the map at its limit, or a full disk
    /// (ENOSPC, or the EIO that LMDB reports for a short write).
    pub fn is_out_of_room(&self) -> bool {
        match self {
            StoreError::Lmdb(heed::Error::Mdb(heed::MdbError::MapFull)) => true,
            StoreError::Lmdb(heed::Error::Io(error)) => {
                matches!(error.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EIO))
            }
            _ => false,
        }
    }
}

/// The options every shard environment is opened with: read transactions without
/// thread-local storage (they may move between threads under tokio), and room for
/// [`max_dbs`] named databases.
pub fn env_options(collections: u16) -> EnvOpenOptions<WithoutTls> {
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.max_dbs(max_dbs(collections));
    options
}

/// Named databases of a shard: one per collection, `expiry`, `log`, `recent`, `txns`,
/// `meta`, `reclaim`, and the element tables.
pub fn max_dbs(collections: u16) -> u32 {
    u32::from(collections) + 6 + layout::typed::ElementTable::ALL.len() as u32
}

/// Where one process has seen the entries of `recent`: by partition and commit id, their
/// sequence numbers. A reader that follows many partitions' newest entries (replication)
/// finds them through it instead of walking `recent` back for each read.
#[derive(Default)]
pub struct RecentIndex {
    /// The sequence number of the last entry indexed.
    through: Option<u64>,
    /// What is indexed, in sequence order: (seq, partition, commit id).
    order: VecDeque<(u64, Partition, u64)>,
    /// By partition: commit id to sequence number.
    by_partition: HashMap<Partition, BTreeMap<u64, u64>>,
}

impl RecentIndex {
    /// Brings the index up to `recent` as `txn` sees it: forgets what was moved out, and
    /// adds what is new. A worker that restarted numbers `recent` anew: the index starts
    /// over when its last entry is not where it was.
    fn update(&mut self, txn: &RoTxn<WithoutTls>, recent: RawDatabase) -> Result<(), StoreError> {
        let Some((first, _)) = recent.first(txn)? else {
            *self = RecentIndex::default();
            return Ok(());
        };
        let first = layout::decode_recent_key(first)?;
        if let Some(through) = self.through {
            let same = match recent.get(txn, &layout::recent_key(through))? {
                Some(raw) => {
                    let (key, _) = layout::split_recent_value(raw)?;
                    let seen = self.order.back().map(|&(_, p, c)| (p, c));
                    seen == Some(layout::decode_log_key(key)?)
                }
                None => through < first,
            };
            if !same {
                *self = RecentIndex::default();
            }
        }
        while let Some(&(seq, partition, commit_id)) = self.order.front() {
            if seq >= first {
                break;
            }
            self.order.pop_front();
            if let Some(ids) = self.by_partition.get_mut(&partition) {
                ids.remove(&commit_id);
            }
        }
        let from = self
            .through
            .map_or(first, |through| (through + 1).max(first));
        let start = layout::recent_key(from);
        for item in recent.range(txn, &(Bound::Included(&start[..]), Bound::Unbounded))? {
            let (key, raw) = item?;
            let seq = layout::decode_recent_key(key)?;
            let (log_key, _) = layout::split_recent_value(raw)?;
            let (partition, commit_id) = layout::decode_log_key(log_key)?;
            self.order.push_back((seq, partition, commit_id));
            self.by_partition
                .entry(partition)
                .or_default()
                .insert(commit_id, seq);
            self.through = Some(seq);
        }
        Ok(())
    }
}

/// [`read_partition_log`] for a reader that keeps a [`RecentIndex`]: the entries in
/// `recent` are found through `index` (brought up to date first) rather than by walking
/// `recent` back.
#[allow(clippy::too_many_arguments)]
pub fn read_partition_log_indexed(
    txn: &RoTxn<WithoutTls>,
    log: RawDatabase,
    recent: RawDatabase,
    index: &mut RecentIndex,
    partition: Partition,
    first: u64,
    last: u64,
) -> Result<Vec<LogEntry>, StoreError> {
    let mut entries = read_partition_log(
        txn,
        log,
        None,
        partition,
        first,
        last,
        usize::MAX,
        usize::MAX,
    )?;
    let next = entries.last().map_or(first, |entry| entry.commit_id + 1);
    if next > last || first > last {
        return Ok(entries);
    }
    index.update(txn, recent)?;
    let Some(ids) = index.by_partition.get(&partition) else {
        return Ok(entries);
    };
    for (expected, (&commit_id, &seq)) in (next..).zip(ids.range(next..=last)) {
        // Commit ids are dense: a gap ends what can be read.
        if commit_id != expected {
            break;
        }
        let Some(raw) = recent.get(txn, &layout::recent_key(seq))? else {
            break;
        };
        let (key, value) = layout::split_recent_value(raw)?;
        if layout::decode_log_key(key)? != (partition, commit_id) {
            // Not what was indexed: the worker restarted in between; look again.
            *index = RecentIndex::default();
            return read_partition_log(
                txn,
                log,
                Some(recent),
                partition,
                first,
                last,
                usize::MAX,
                usize::MAX,
            );
        }
        entries.push(layout::decode_log_entry(key, value)?);
    }
    Ok(entries)
}

/// The entries of `partition` with commit ids `first..=last`, in order, at most `limit` of
/// them, and no more once they carry `max_bytes` of values (at least one): first from
/// `log`, then from `recent` when given (see [`layout::recent_key`]), where a partition's
/// entries are always newer than its entries in `log`. Fewer when the log does not hold them all
/// (trimmed, or not that far yet).
#[allow(clippy::too_many_arguments)]
pub fn read_partition_log(
    txn: &RoTxn<WithoutTls>,
    log: RawDatabase,
    recent: Option<RawDatabase>,
    partition: Partition,
    first: u64,
    last: u64,
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<LogEntry>, StoreError> {
    let mut entries = Vec::new();
    if first > last || limit == 0 {
        return Ok(entries);
    }
    let mut bytes = 0;
    let mut take = |key: &[u8], value: &[u8], entries: &mut Vec<LogEntry>| {
        bytes += value.len();
        if entries.len() >= limit || (bytes > max_bytes && !entries.is_empty()) {
            return Ok(false);
        }
        entries.push(layout::decode_log_entry(key, value)?);
        Ok::<bool, StoreError>(true)
    };
    let start = layout::log_key(partition, first);
    let end = layout::log_key(partition, last);
    let range = (Bound::Included(&start[..]), Bound::Included(&end[..]));
    for item in log.range(txn, &range)? {
        let (key, value) = item?;
        if !take(key, value, &mut entries)? {
            return Ok(entries);
        }
    }
    let next = entries.last().map_or(first, |entry| entry.commit_id + 1);
    let Some(recent) = recent.filter(|_| next <= last) else {
        return Ok(entries);
    };
    // Newest first, back to the partition's entry before `next`.
    let mut newer = Vec::new();
    for item in recent.rev_iter(txn)? {
        let (_, raw) = item?;
        let (key, value) = layout::split_recent_value(raw)?;
        let (of, commit_id) = layout::decode_log_key(key)?;
        if of != partition {
            continue;
        }
        if commit_id < next {
            break;
        }
        if commit_id <= last {
            newer.push((key, value));
        }
    }
    for (key, value) in newer.into_iter().rev() {
        if !take(key, value, &mut entries)? {
            break;
        }
    }
    Ok(entries)
}

/// Opens the named database `name`, creating it in a write transaction if it is missing.
pub fn create_database(env: &Env<WithoutTls>, name: &str) -> Result<RawDatabase, StoreError> {
    let txn = env.write_txn()?;
    let database = env
        .create_databases_and_commit(txn, |opener, txn| {
            opener
                .create_database::<Bytes, Bytes>(txn, Some(name))
                .map(CommitOrAbort::<_, ()>::Commit)
        })?
        .unwrap_commit();
    Ok(database)
}

/// Opens the named database `name` in a read transaction; its worker must have created it.
pub(crate) fn open_database(env: &Env<WithoutTls>, name: &str) -> Result<RawDatabase, StoreError> {
    open_database_if_present(env, name)?.ok_or_else(|| {
        StoreError::Mismatch(format!(
            "the shard has no database {name:?}; is its worker running?"
        ))
    })
}

/// Opens the named database `name` in a read transaction, if it exists.
pub fn open_database_if_present(
    env: &Env<WithoutTls>,
    name: &str,
) -> Result<Option<RawDatabase>, StoreError> {
    let txn = env.read_txn()?;
    let database = env
        .open_databases_and_commit(txn, |opener, txn| {
            opener
                .open_database::<Bytes, Bytes>(txn, Some(name))
                .map(CommitOrAbort::<_, ()>::Commit)
        })?
        .unwrap_commit();
    Ok(database)
}

/// Bytes available to this process on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `stat` a valid out-pointer.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    (rc == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
}

//! What every process that opens a shard's LMDB environment shares: the raw
//! database type, the error of opening and using an environment, the opening of
//! named databases, and the free space of the filesystem that holds it.
//!
//! The shard-worker creates and writes its environment; the net-daemon opens it
//! read-only ([`crate::reader`]). This module never keeps an environment open
//! itself.

use std::path::Path;

use heed::types::Bytes;
use heed::{CommitOrAbort, Database, Env, EnvOpenOptions, WithoutTls};

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
    /// The directory of the environment could not be created.
    #[error("cannot create {path}: {source}")]
    CreateDir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The options every shard environment is opened with: read transactions without
/// thread-local storage (they may move between threads under tokio), and room for
/// [`max_dbs`] named databases.
pub fn env_options(collections: u16) -> EnvOpenOptions<WithoutTls> {
    let mut options = EnvOpenOptions::new().read_txn_without_tls();
    options.max_dbs(max_dbs(collections));
    options
}

/// Named databases of a shard: one per collection, `expiry`, `log`, `txns`, `meta`,
/// `reclaim`, and the element tables.
pub fn max_dbs(collections: u16) -> u32 {
    u32::from(collections) + 5 + layout::typed::ElementTable::ALL.len() as u32
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
    let txn = env.read_txn()?;
    let database = env
        .open_databases_and_commit(txn, |opener, txn| {
            match opener.open_database::<Bytes, Bytes>(txn, Some(name))? {
                Some(database) => Ok(CommitOrAbort::<_, ()>::Commit(database)),
                None => Err(StoreError::Mismatch(format!(
                    "the shard has no database {name:?}; is its worker running?"
                ))),
            }
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

//! Checkpoints: the point up to which LMDB's own pages are known to be on disk, and
//! from which the journal is replayed after a power failure.
//!
//! LMDB commits without syncing (`MDB_NOSYNC`), and the journal makes each commit
//! durable (`journal`). After a power failure the data file may hold any mix of the
//! pages written since its last sync: a meta page may point to pages that never
//! reached the disk. A checkpoint makes that safe:
//!
//! 1. Right after a commit `S`, the store opens a read transaction on `S` and keeps
//!    it open until the next checkpoint. LMDB reuses a page only once no reader can
//!    see it, so no page of `S` is written over while the pin lasts: the only pages of
//!    `S` that later commits write are the two meta pages.
//! 2. It copies `S`'s meta page out of the data file, starts a new journal segment,
//!    and (in a thread of its own) flushes the data file: every page of `S` is then
//!    on disk.
//! 3. It writes the checkpoint file (`S`, the segment to replay from, the boot it was
//!    taken in, and the meta page), durably; then the older segments and the older
//!    pin are dropped.
//!
//! At open, if the checkpoint was taken in another boot of the machine, the page
//! cache may have lost writes: both meta pages are overwritten with `S`'s, which makes
//! the environment `S` again (intact, by 1.). Within the same boot (a process killed,
//! not the machine) the page cache lost nothing, so nothing is rewound; rewinding then
//! would be wrong as well as needless, since the net-daemon may still read the newer
//! snapshots. Either way, before anything is written the environment as it is becomes
//! the checkpoint ([`Checkpoints::pin_current`]). After a rewind the journal's records
//! after the environment's journal position are then replayed. In the same boot those
//! acknowledged ahead of LMDB's commit (write-back, `writeback`) are replayed too; the
//! others can only be of commits LMDB never made, never acknowledged, and are cut off
//! (`Store::open_with_clock`).
//!
//! The store's checkpoint methods are here too: [`Store::checkpoint`] (now, waiting
//! for it), [`Store::checkpoint_tick`] (every second while writes go on, flushing in a
//! thread), and `Store::ensure_checkpoint` (before a commit, when there is none).
//!
//! The checkpoint file, `journal/checkpoint`:
//!
//! ```text
//! magic "SHOALCKP" | version u32 | txnid u64 | segment u64 | boot id length u16 |
//! boot id | page size u32 | meta page | crc32 u32 (of everything before it)
//! ```

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use heed::{Env, RoTxn, WithoutTls};

use super::journal::{self, sync_dir};
use super::{io_error, Store, StoreError};

/// How often a checkpoint is taken while writes go on.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

const MAGIC: &[u8; 8] = b"SHOALCKP";
const VERSION: u32 = 1;
const FILE_NAME: &str = "checkpoint";

// The meta page's layout below is that of a 64-bit build of LMDB.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("the checkpoint's meta page offsets assume a 64-bit LMDB");

/// Where the meta page keeps the transaction id that committed it (after the 16-byte
/// page header: magic, version, address, map size, two database records of 48 bytes,
/// last page).
const META_TXNID_AT: usize = 16 + 4 + 4 + 8 + 8 + 2 * 48 + 8;
const META_MAGIC_AT: usize = 16;
const LMDB_MAGIC: u32 = 0xBEEF_C0DE;

/// The environment variable naming a file to read the boot id from instead of the
/// kernel's (for tests that model a reboot after a power cut).
pub const BOOT_ID_PATH_VAR: &str = "SHOAL_BOOT_ID_PATH";

/// A checkpoint as written to its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    /// The LMDB transaction whose pages were all on disk.
    pub(crate) txnid: u64,
    /// The first journal segment that may hold records after `txnid`.
    pub(crate) segment: u64,
    /// The boot of the machine in which the checkpoint was taken.
    pub(crate) boot_id: String,
    /// The meta page of `txnid`, as it was in the data file.
    pub(crate) meta: Vec<u8>,
}

fn path(journal_dir: &Path) -> PathBuf {
    journal_dir.join(FILE_NAME)
}

/// When the checkpoint file in `journal_dir` was last written, in Unix seconds (0 if
/// there is none).
fn recorded_secs(journal_dir: &Path) -> u64 {
    std::fs::metadata(path(journal_dir))
        .and_then(|metadata| metadata.modified())
        .ok()
        .and_then(|modified| modified.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |since| since.as_secs())
}

/// This boot of the machine: the kernel's boot id, or what the file named by
/// [`BOOT_ID_PATH_VAR`] holds.
pub(crate) fn boot_id() -> io::Result<String> {
    let path = std::env::var_os(BOOT_ID_PATH_VAR).map_or_else(
        || PathBuf::from("/proc/sys/kernel/random/boot_id"),
        PathBuf::from,
    );
    // Without it a reboot would go unnoticed, and a shard torn by a power failure
    // opened as it is.
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        Ok(_) => Err(io::Error::other(format!(
            "{} is empty: the machine's boot id is needed to tell a restart after a power failure",
            path.display()
        ))),
        Err(error) => Err(io::Error::new(
            error.kind(),
            format!(
                "cannot read the machine's boot id from {} ({error}): it is needed to tell a restart after a power failure",
                path.display()
            ),
        )),
    }
}

impl Checkpoint {
    /// The checkpoint in `journal_dir`, if one was written.
    pub(crate) fn read(journal_dir: &Path) -> io::Result<Option<Checkpoint>> {
        let mut bytes = Vec::new();
        match File::open(path(journal_dir)) {
            Ok(mut file) => file.read_to_end(&mut bytes)?,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error),
        };
        let bad = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{}: {what}; the shard cannot be recovered from it",
                    path(journal_dir).display()
                ),
            )
        };
        if bytes.len() < 4 || !bytes.starts_with(MAGIC) {
            return Err(bad("not a checkpoint file"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err(bad("checksum mismatch"));
        }
        let mut rest = &body[MAGIC.len()..];
        let mut take = |n: usize| -> io::Result<&[u8]> {
            if rest.len() < n {
                return Err(bad("cut short"));
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        let version = u32::from_le_bytes(take(4)?.try_into().unwrap());
        if version != VERSION {
            return Err(bad(&format!("version {version} is not {VERSION}")));
        }
        let txnid = u64::from_le_bytes(take(8)?.try_into().unwrap());
        let segment = u64::from_le_bytes(take(8)?.try_into().unwrap());
        let boot_len = u16::from_le_bytes(take(2)?.try_into().unwrap()) as usize;
        let boot_id = String::from_utf8_lossy(take(boot_len)?).into_owned();
        let page_size = u32::from_le_bytes(take(4)?.try_into().unwrap()) as usize;
        let meta = take(page_size)?.to_vec();
        Ok(Some(Checkpoint {
            txnid,
            segment,
            boot_id,
            meta,
        }))
    }

    /// Writes the checkpoint durably, replacing the one before.
    pub(crate) fn write(&self, journal_dir: &Path) -> io::Result<()> {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&self.txnid.to_le_bytes());
        bytes.extend_from_slice(&self.segment.to_le_bytes());
        bytes.extend_from_slice(&(self.boot_id.len() as u16).to_le_bytes());
        bytes.extend_from_slice(self.boot_id.as_bytes());
        bytes.extend_from_slice(&(self.meta.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&self.meta);
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let temporary = journal_dir.join(format!("{FILE_NAME}.tmp"));
        let mut file = File::create(&temporary)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path(journal_dir))?;
        sync_dir(journal_dir)
    }
}

fn meta_txnid(page: &[u8]) -> Option<u64> {
    let magic = u32::from_ne_bytes(
        page.get(META_MAGIC_AT..META_MAGIC_AT + 4)?
            .try_into()
            .ok()?,
    );
    (magic == LMDB_MAGIC)
        .then(|| u64::from_ne_bytes(page[META_TXNID_AT..META_TXNID_AT + 8].try_into().unwrap()))
}

/// The meta page of transaction `txnid` of `env`, just committed, read from its data
/// file (from the page cache).
pub(crate) fn meta_page(env: &Env<WithoutTls>, txnid: u64) -> io::Result<Vec<u8>> {
    let data_file = env.path().join("data.mdb");
    let page_size = env.unnamed_database_stat().page_size as usize;
    let mut page = vec![0; page_size];
    let slot = txnid % 2;
    File::open(&data_file)?.read_exact_at(&mut page, slot * page_size as u64)?;
    match meta_txnid(&page) {
        Some(found) if found == txnid => Ok(page),
        found => Err(io::Error::other(format!(
            "{}: meta page {slot} is of transaction {found:?}, not {txnid}",
            data_file.display()
        ))),
    }
}

/// Makes the environment in `data_file` the snapshot of `checkpoint` again, by writing
/// its meta page over both meta pages, and flushes.
pub(crate) fn rewind(data_file: &Path, checkpoint: &Checkpoint) -> io::Result<()> {
    if meta_txnid(&checkpoint.meta) != Some(checkpoint.txnid) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the checkpoint's meta page is not of its transaction",
        ));
    }
    let file = File::options().write(true).open(data_file)?;
    let page_size = checkpoint.meta.len();
    for slot in 0..2u64 {
        let mut page = checkpoint.meta.clone();
        // The page header starts with the page's own number.
        page[..8].copy_from_slice(&slot.to_ne_bytes());
        file.write_all_at(&page, slot * page_size as u64)?;
    }
    file.sync_all()
}

/// The checkpoints of a store (see `checkpoint`).
pub(super) struct Checkpoints {
    /// The journal's directory, which holds the checkpoint file.
    pub(super) dir: std::path::PathBuf,
    /// A read transaction on the last checkpoint's snapshot: none of its pages is
    /// reused while it is open. None while there is no checkpoint to recover from that
    /// the environment's pages can be trusted to (no commit may be made then).
    pub(super) pin: Option<RoTxn<'static, WithoutTls>>,
    /// The transaction id of the last checkpoint, if there is one.
    txnid: Option<u64>,
    /// The checkpoint being taken: its data file flush runs in a thread.
    running: Option<RunningCheckpoint>,
    /// When the last checkpoint was started.
    started: std::time::Instant,
    /// While the journal is replayed at open: the first segment it is replayed from,
    /// which a checkpoint must keep.
    pub(super) keep_from: Option<u64>,
}

impl Checkpoints {
    /// The checkpoints of a store whose journal is in `dir`: the last one recorded
    /// (its transaction id, if there is one), and the first segment that replay at open
    /// still needs.
    pub(super) fn new(dir: &Path, txnid: Option<u64>, keep_from: Option<u64>) -> Checkpoints {
        Checkpoints {
            dir: dir.to_path_buf(),
            pin: None,
            txnid,
            running: None,
            started: std::time::Instant::now(),
            keep_from,
        }
    }

    /// Pins the environment as it is and, unless it is already the last checkpoint,
    /// flushes it and records it as the checkpoint (with the journal's segments from
    /// `keep_from`, or from the next one, to replay). Run at open, before anything is
    /// written.
    pub(super) fn pin_current(
        &mut self,
        env: &Env<WithoutTls>,
        boot_id: &str,
    ) -> Result<(), StoreError> {
        let txnid = env.info().last_txn_id as u64;
        let pin = env.clone().static_read_txn()?;
        if self.txnid != Some(txnid) {
            let taken = Checkpoint {
                txnid,
                segment: match self.keep_from {
                    Some(segment) => segment,
                    None => journal::next_segment(&self.dir).map_err(io_error)?,
                },
                boot_id: boot_id.to_string(),
                meta: meta_page(env, txnid).map_err(io_error)?,
            };
            env.force_sync()?;
            taken.write(&self.dir).map_err(io_error)?;
            self.txnid = Some(txnid);
        }
        self.pin = Some(pin);
        Ok(())
    }
}

struct RunningCheckpoint {
    pub(super) pin: RoTxn<'static, WithoutTls>,
    pub(super) txnid: u64,
    done: std::thread::JoinHandle<Result<(), CheckpointFailure>>,
}

/// How a checkpoint's thread failed.
enum CheckpointFailure {
    /// The data file's flush: what reached the disk is in doubt.
    Flush(heed::Error),
    /// The checkpoint file or the removal of old segments: the last checkpoint stays.
    Record(std::io::Error),
}

impl Store {
    /// Makes ready for a commit: takes a checkpoint if there is none to recover from
    /// (none could be taken at open, for want of room), since no commit may reuse pages
    /// before one is, and opens a journal segment if none is.
    pub(super) fn ensure_checkpoint(&mut self) -> Result<(), StoreError> {
        if self.checkpoints.pin.is_none() {
            return self.checkpoint();
        }
        if !self.journal.is_open() {
            self.journal.roll().map_err(io_error)?;
        }
        Ok(())
    }

    /// When the last checkpoint was recorded, in Unix seconds (0 before the first),
    /// and the bytes of the journal's segments.
    pub(crate) fn checkpoint_state(&self) -> (u64, u64) {
        (
            recorded_secs(&self.checkpoints.dir),
            journal::bytes(&self.checkpoints.dir),
        )
    }

    /// Takes a checkpoint now, after the one being taken if any, and waits for it. LMDB
    /// commits write-back's batches first.
    pub fn checkpoint(&mut self) -> Result<(), StoreError> {
        self.settle()?;
        self.checkpoint_committed()
    }

    /// Takes a checkpoint of what LMDB committed now, and waits for it.
    pub(super) fn checkpoint_committed(&mut self) -> Result<(), StoreError> {
        match self.finish_checkpoint(true) {
            Err(error @ StoreError::InDoubt(_)) => return Err(error),
            Err(error) => tracing::warn!(%error, "the checkpoint before failed"),
            Ok(()) => {}
        }
        let running = self.start_checkpoint()?;
        self.checkpoints.running = Some(running);
        self.finish_checkpoint(true)
    }

    /// Finishes the checkpoint being taken if its flush is done, and starts one if one
    /// is due: every [`CHECKPOINT_EVERY`] once something was committed since the last.
    /// A checkpoint that could not be recorded (no room for its file or segment) is
    /// logged and tried again later; an error here means the data file could not be
    /// flushed, after which the worker must stop.
    pub(crate) fn checkpoint_tick(&mut self) -> Result<(), StoreError> {
        self.check_failed()?;
        if let Err(error) = self.finish_checkpoint(false) {
            if matches!(error, StoreError::InDoubt(_)) {
                return Err(error);
            }
            tracing::warn!(%error, "checkpoint failed; retrying at the next tick");
        }
        let due = self.checkpoints.running.is_none()
            && self.checkpoints.started.elapsed() >= CHECKPOINT_EVERY
            && Some(self.env.info().last_txn_id as u64) != self.checkpoints.txnid;
        if due {
            match self.start_checkpoint() {
                Ok(running) => self.checkpoints.running = Some(running),
                Err(error) => {
                    tracing::warn!(%error, "checkpoint failed; retrying at the next tick")
                }
            }
        }
        Ok(())
    }

    fn start_checkpoint(&mut self) -> Result<RunningCheckpoint, StoreError> {
        self.checkpoints.started = std::time::Instant::now();
        let txnid = self.env.info().last_txn_id as u64;
        let pin = self.env.clone().static_read_txn()?;
        let meta = meta_page(&self.env, txnid).map_err(io_error)?;
        let segment = self.journal.roll().map_err(io_error)?;
        // A checkpoint is of what LMDB committed: the segments of write-back's batches
        // not committed yet stay.
        let unsettled = self
            .unsettled
            .as_ref()
            .and_then(|open| open.first_segment());
        let taken = Checkpoint {
            txnid,
            segment: [self.checkpoints.keep_from, unsettled]
                .into_iter()
                .flatten()
                .fold(segment, u64::min),
            boot_id: self.clock.boot_id().map_err(io_error)?,
            meta,
        };
        let env = self.env.clone();
        let dir = self.checkpoints.dir.clone();
        let done = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                env.force_sync().map_err(CheckpointFailure::Flush)?;
                taken.write(&dir).map_err(CheckpointFailure::Record)?;
                journal::remove_before(&dir, taken.segment).map_err(CheckpointFailure::Record)
            })
            .map_err(io_error)?;
        Ok(RunningCheckpoint { pin, txnid, done })
    }

    /// Ends the checkpoint being taken: at once if `wait`, else only if its flush is
    /// done. Once its file is written, its pin replaces the last checkpoint's. If it
    /// failed, the last checkpoint stays the one to recover from. A failed flush of
    /// the data file comes back as [`StoreError::InDoubt`]: the pages LMDB wrote are
    /// then in doubt, and only a restart (which recovers from the last checkpoint and
    /// the journal) is safe.
    fn finish_checkpoint(&mut self, wait: bool) -> Result<(), StoreError> {
        let Some(running) = self
            .checkpoints
            .running
            .take_if(|running| wait || running.done.is_finished())
        else {
            return Ok(());
        };
        match running.done.join() {
            Ok(Ok(())) => {
                self.checkpoints.pin = Some(running.pin);
                self.checkpoints.txnid = Some(running.txnid);
                Ok(())
            }
            Ok(Err(CheckpointFailure::Record(error))) => Err(io_error(error)),
            Ok(Err(CheckpointFailure::Flush(error))) => Err(StoreError::InDoubt(format!(
                "flushing the data file for a checkpoint failed: {error}"
            ))),
            Err(_) => Err(StoreError::InDoubt("the checkpoint thread panicked".into())),
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // A checkpoint's thread must not outlive the store (its files may be removed
        // next).
        if let Err(error) = self.finish_checkpoint(true) {
            tracing::warn!(%error, "the last checkpoint failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_reads_back_as_written_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Checkpoint::read(dir.path()).unwrap(), None);
        let mut meta = vec![7u8; 4096];
        meta[META_MAGIC_AT..META_MAGIC_AT + 4].copy_from_slice(&LMDB_MAGIC.to_ne_bytes());
        meta[META_TXNID_AT..META_TXNID_AT + 8].copy_from_slice(&42u64.to_ne_bytes());
        let checkpoint = Checkpoint {
            txnid: 42,
            segment: 3,
            boot_id: "boot-a".into(),
            meta,
        };
        checkpoint.write(dir.path()).unwrap();
        assert_eq!(Checkpoint::read(dir.path()).unwrap(), Some(checkpoint));
        let file = path(dir.path());
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[30] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        let error = Checkpoint::read(dir.path()).unwrap_err();
        assert!(error.to_string().contains("checksum"), "{error}");
    }
}

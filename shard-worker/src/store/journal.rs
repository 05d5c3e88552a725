//! The journal: what every write transaction changed, appended to a file and flushed
//! before the transaction commits.
//!
//! LMDB commits without syncing (`MDB_NOSYNC`). A write is durable once its
//! transaction's record is in the journal and the journal is flushed: one sequential
//! append and one `fdatasync` per group commit, where a synced LMDB commit costs two
//! flushes of scattered pages. LMDB's pages reach the disk later, at a checkpoint
//! (`checkpoint`), after which the journal before it is deleted.
//!
//! Every change goes through [`Table`] and [`WriteTxn`]: a `Table` wraps a named
//! database and records each `put`, `delete`, `delete_range` and `clear` into the
//! transaction's record as it makes it. A [`WriteTxn`] gives reads (it derefs to a
//! read transaction) and, for EXEC's dry run, a nested transaction that is always
//! aborted, but no way to write around the record.
//!
//! Every record has a sequence number, one more than the record before it (never
//! reused, not even for a record that did not commit), and each transaction writes
//! its record's number into `meta` ([`layout::META_JOURNAL_SEQ`]), so that the
//! environment tells which records it holds: at open, the records after that number
//! are replayed, in order, in one transaction, on exactly the state they were first
//! made on.
//!
//! Files, in `<shard dir>/journal/`: segments `<number, 16 hex digits>.log`, numbered
//! upwards; a new one starts at every checkpoint. A segment is a sequence of records:
//!
//! ```text
//! record  = length u32 (of body) | crc32 u32 (of body) | body
//! body    = kind u8 | seq u64 | ...
//!   kind 0, tables: count u16, then per table: id u16 | name length u8 | name
//!   kind 1, commit: changes until the end of the body
//!   kind 2, abort: nothing more (the commit record `seq` did not commit)
//!   kind 3, acknowledged: as kind 1, of a batch acknowledged before LMDB committed
//!           it (write-back); it is replayed at every open that finds it missing
//! change  = 1 put    | table u16 | key length u32 | key | value length u32 | value
//!         | 2 delete | table u16 | key length u32 | key
//!         | 3 range  | table u16 | bound | bound          (delete_range)
//!         | 4 clear  | table u16
//! bound   = 0 unbounded | 1 included, length u32, bytes | 2 excluded, length u32, bytes
//! ```
//!
//! Integers are little-endian. Every segment starts with a tables record naming the
//! databases its table numbers refer to. A record cut short or failing its checksum
//! ends its segment: nothing after it in that segment was ever acknowledged (records
//! are flushed in order, and a record that failed to be written or flushed is cut off
//! before the next is appended).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::{Bound, Deref};
use std::path::{Path, PathBuf};

use heed::{RoTxn, RwTxn, WithoutTls};
use shoal_shared::layout;
use shoal_shared::lmdb::{RawDatabase, StoreError};

const KIND_TABLES: u8 = 0;
const KIND_COMMIT: u8 = 1;
const KIND_ABORT: u8 = 2;
const KIND_ACKED: u8 = 3;

const PUT: u8 = 1;
const DELETE: u8 = 2;
const RANGE: u8 = 3;
const CLEAR: u8 = 4;

/// A write transaction that records its changes for the journal.
pub(crate) struct WriteTxn<'e> {
    txn: RwTxn<'e>,
    changes: Vec<u8>,
    /// Changes made in the transaction, recorded or not yet.
    count: usize,
}

impl<'e> WriteTxn<'e> {
    pub(crate) fn new(txn: RwTxn<'e>) -> WriteTxn<'e> {
        WriteTxn {
            txn,
            changes: Vec::new(),
            count: 0,
        }
    }

    /// The transaction itself, for opening a nested one. A nested transaction's
    /// changes are not recorded in this one's: it must be aborted (EXEC's dry run).
    pub(crate) fn inner(&mut self) -> &mut RwTxn<'e> {
        &mut self.txn
    }

    pub(crate) fn abort(self) {
        self.txn.abort()
    }

    /// How many changes (puts, deletes, range deletes, clears) the transaction made.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    /// Whether changes were made since the last record was taken.
    pub(crate) fn has_changes(&self) -> bool {
        !self.changes.is_empty()
    }

    /// Commits the LMDB transaction, whose changes the journal already holds.
    pub(crate) fn commit_journaled(self) -> heed::Result<()> {
        self.txn.commit()
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.changes
            .extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.changes.extend_from_slice(bytes);
    }

    fn bound(&mut self, bound: Bound<&[u8]>) {
        match bound {
            Bound::Unbounded => self.changes.push(0),
            Bound::Included(bytes) => {
                self.changes.push(1);
                self.bytes(bytes);
            }
            Bound::Excluded(bytes) => {
                self.changes.push(2);
                self.bytes(bytes);
            }
        }
    }
}

impl<'e> Deref for WriteTxn<'e> {
    type Target = RoTxn<'e, WithoutTls>;

    fn deref(&self) -> &Self::Target {
        &self.txn
    }
}

/// A named database whose changes are recorded in the transaction's journal record.
/// Reads go to the database itself (it derefs to it).
#[derive(Clone, Copy)]
pub(crate) struct Table {
    db: RawDatabase,
    id: u16,
}

impl Deref for Table {
    type Target = RawDatabase;

    fn deref(&self) -> &RawDatabase {
        &self.db
    }
}

impl Table {
    /// The table's number in journal records.
    pub(crate) fn id(&self) -> u16 {
        self.id
    }

    pub(crate) fn put(&self, txn: &mut WriteTxn, key: &[u8], value: &[u8]) -> heed::Result<()> {
        self.db.put(&mut txn.txn, key, value)?;
        txn.count += 1;
        txn.changes.push(PUT);
        txn.changes.extend_from_slice(&self.id.to_le_bytes());
        txn.bytes(key);
        txn.bytes(value);
        Ok(())
    }

    pub(crate) fn delete(&self, txn: &mut WriteTxn, key: &[u8]) -> heed::Result<bool> {
        let deleted = self.db.delete(&mut txn.txn, key)?;
        if deleted {
            txn.count += 1;
            txn.changes.push(DELETE);
            txn.changes.extend_from_slice(&self.id.to_le_bytes());
            txn.bytes(key);
        }
        Ok(deleted)
    }

    pub(crate) fn delete_range(
        &self,
        txn: &mut WriteTxn,
        range: &(Bound<&[u8]>, Bound<&[u8]>),
    ) -> heed::Result<usize> {
        let deleted = self.db.delete_range(&mut txn.txn, range)?;
        if deleted > 0 {
            txn.count += deleted;
            txn.changes.push(RANGE);
            txn.changes.extend_from_slice(&self.id.to_le_bytes());
            txn.bound(range.0);
            txn.bound(range.1);
        }
        Ok(deleted)
    }

    pub(crate) fn clear(&self, txn: &mut WriteTxn) -> heed::Result<()> {
        self.db.clear(&mut txn.txn)?;
        txn.count += 1;
        txn.changes.push(CLEAR);
        txn.changes.extend_from_slice(&self.id.to_le_bytes());
        Ok(())
    }
}

/// The databases a store writes, numbered for the journal's records.
#[derive(Default)]
pub(crate) struct Tables {
    names: Vec<String>,
    tables: HashMap<String, Table>,
}

impl Tables {
    /// Numbers `db` (opened under `name`) for the journal.
    pub(crate) fn add(&mut self, name: &str, db: RawDatabase) -> Table {
        let id = u16::try_from(self.names.len()).expect("at most 65536 databases");
        self.names.push(name.to_string());
        let table = Table { db, id };
        self.tables.insert(name.to_string(), table);
        table
    }

    fn by_id(&self) -> Vec<Table> {
        self.names.iter().map(|name| self.tables[name]).collect()
    }

    fn record(&self) -> Vec<u8> {
        let mut body = vec![KIND_TABLES];
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend_from_slice(&(self.names.len() as u16).to_le_bytes());
        for (id, name) in self.names.iter().enumerate() {
            body.extend_from_slice(&(id as u16).to_le_bytes());
            body.push(name.len() as u8);
            body.extend_from_slice(name.as_bytes());
        }
        body
    }
}

/// The sequence number of the last journal record the environment holds (0 if none).
pub(crate) fn position(env: &heed::Env<WithoutTls>) -> Result<u64, StoreError> {
    let Some(meta) = shoal_shared::lmdb::open_database_if_present(env, "meta")? else {
        return Ok(0);
    };
    let txn = env.read_txn()?;
    match meta.get(&txn, layout::META_JOURNAL_SEQ)? {
        Some(raw) => Ok(layout::decode_u64(raw, "journal position")?),
        None => Ok(0),
    }
}

/// The journal's directory in a shard's directory.
pub(crate) fn dir(shard_dir: &Path) -> PathBuf {
    shard_dir.join("journal")
}

fn segment_path(dir: &Path, segment: u64) -> PathBuf {
    dir.join(format!("{segment:016x}.log"))
}

/// The segments in `dir`, in order.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(number) = name
            .strip_suffix(".log")
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        {
            found.push(number);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// The bytes of the segments in `dir` (0 if it cannot be read).
pub(crate) fn bytes(dir: &Path) -> u64 {
    segments(dir)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|segment| std::fs::metadata(segment_path(dir, segment)).ok())
        .map(|metadata| metadata.len())
        .sum()
}

/// Creates the journal's directory `dir` if it is missing, durably.
pub(crate) fn create_dir(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// The number the next segment of `dir` gets.
pub(crate) fn next_segment(dir: &Path) -> io::Result<u64> {
    if !dir.exists() {
        return Ok(1);
    }
    Ok(segments(dir)?.last().map_or(1, |last| last + 1))
}

/// Flushes a directory, so that files created or renamed in it stay after a power loss.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The journal of a store: the segment being appended, once one is open.
pub(crate) struct Journal {
    dir: PathBuf,
    tables: Vec<u8>,
    /// The tables by number.
    by_id: Vec<Table>,
    /// Where each transaction records its record's sequence number (`meta`).
    position: Table,
    /// The sequence number of the next record.
    next_seq: u64,
    /// The number of the segment being appended, or of the last one in the directory.
    segment: u64,
    /// The segment being appended. None until the first [`Journal::roll`].
    file: Option<File>,
    /// Bytes appended since the last flush.
    unsynced: usize,
    /// Bytes in the current segment.
    written: u64,
}

impl Journal {
    /// The journal in `dir`, whose next record is numbered after `after` and after every
    /// record in the directory. Nothing can be appended before [`Journal::roll`]
    /// starts a segment after those there.
    pub(crate) fn new(
        dir: &Path,
        tables: &Tables,
        position: Table,
        after: u64,
    ) -> io::Result<Journal> {
        create_dir(dir)?;
        Ok(Journal {
            dir: dir.to_path_buf(),
            tables: tables.record(),
            by_id: tables.by_id(),
            position,
            next_seq: after + 1,
            segment: segments(dir)?.last().copied().unwrap_or(0),
            file: None,
            unsynced: 0,
            written: 0,
        })
    }

    fn create_segment(dir: &Path, segment: u64, tables: &[u8]) -> io::Result<File> {
        let path = segment_path(dir, segment);
        let mut file = File::options().create_new(true).append(true).open(&path)?;
        let written = file
            .write_all(&frame(&[tables])?)
            .and_then(|()| file.sync_data())
            .and_then(|()| sync_dir(dir));
        if let Err(error) = written {
            // Out of room, most likely: the next try starts the same segment again.
            let _ = std::fs::remove_file(&path);
            return Err(error);
        }
        Ok(file)
    }

    /// Commits `txn`: it records its record's sequence number, the record is appended,
    /// and flushed if `sync`, and then LMDB commits it (without a sync). A record whose
    /// write or flush failed is cut off again; one whose LMDB commit failed is
    /// followed by an abort record, so that it is never replayed. The journal's I/O
    /// errors come as [`heed::Error::Io`]; those that leave the journal in doubt (a
    /// record that could not be cut off or cancelled) have no OS error code, and the
    /// store treats them as fatal.
    pub(crate) fn commit(&mut self, mut txn: WriteTxn, sync: bool) -> heed::Result<()> {
        let seq = self.append(&mut txn, KIND_COMMIT, sync)?;
        if let Err(error) = txn.txn.commit() {
            frame(&[&[KIND_ABORT], &seq.to_le_bytes()])
                .and_then(|abort| self.write(&abort))
                .and_then(|()| self.sync())
                .map_err(|cause| in_doubt("cancel a record whose commit failed", cause))?;
            return Err(error);
        }
        Ok(())
    }

    /// Appends the changes `txn` made since its last record as an acknowledged record
    /// (write-back), flushed if `sync`; the transaction stays open. Returns the changes,
    /// which [`Journal::replay_changes`] makes again if the transaction is aborted
    /// before LMDB commits it. On an error the record is cut off again, and the
    /// transaction holds changes that no record has: the caller aborts it.
    pub(crate) fn append_acknowledged(
        &mut self,
        txn: &mut WriteTxn,
        sync: bool,
    ) -> heed::Result<Vec<u8>> {
        self.append(txn, KIND_ACKED, sync)?;
        Ok(std::mem::take(&mut txn.changes))
    }

    /// Records the sequence number in `txn`, then appends its changes as a record of
    /// `kind`, flushed if `sync`. Returns the sequence number.
    fn append(&mut self, txn: &mut WriteTxn, kind: u8, sync: bool) -> heed::Result<u64> {
        let seq = self.next_seq;
        self.position
            .put(txn, layout::META_JOURNAL_SEQ, &seq.to_be_bytes())?;
        // A number is used once, whatever becomes of its record.
        self.next_seq += 1;
        let record = frame(&[&[kind], &seq.to_le_bytes(), &txn.changes])?;
        let start = self.written;
        self.write(&record)?;
        if sync {
            if let Err(error) = self.sync() {
                self.cut_back(start)?;
                return Err(error.into());
            }
        }
        Ok(seq)
    }

    /// Makes `changes` (as [`Journal::append_acknowledged`] returned them) again in
    /// `txn`, which does not record them: the journal has them already.
    pub(crate) fn replay_changes(
        &self,
        changes: &[u8],
        txn: &mut WriteTxn,
    ) -> Result<(), ReplayError> {
        replay(changes, txn, |id| {
            self.by_id
                .get(usize::from(id))
                .copied()
                .ok_or_else(|| corrupt(format!("table number {id}")))
        })?;
        txn.changes.clear();
        Ok(())
    }

    /// The number of the segment being appended.
    pub(crate) fn segment(&self) -> u64 {
        self.segment
    }

    /// Appends a [`frame`]d record.
    fn write(&mut self, framed: &[u8]) -> io::Result<()> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("the journal has no segment open"))?;
        if let Err(error) = file.write_all(framed) {
            let start = self.written;
            self.cut_back(start)?;
            return Err(error);
        }
        self.unsynced += framed.len();
        self.written += framed.len() as u64;
        Ok(())
    }

    /// Cuts the segment back to `len` bytes and flushes: a record written or flushed in
    /// part would end the segment for every record after it.
    fn cut_back(&mut self, len: u64) -> io::Result<()> {
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| io::Error::other("the journal has no segment open"))?;
        file.set_len(len)
            .and_then(|()| file.sync_data())
            .map_err(|cause| in_doubt("cut off a record that failed", cause))?;
        self.written = len;
        self.unsynced = 0;
        Ok(())
    }

    /// Whether a segment is open for appending.
    pub(crate) fn is_open(&self) -> bool {
        self.file.is_some()
    }

    /// Flushes what was appended. Costs nothing when nothing was.
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        if let Some(file) = self.file.as_ref().filter(|_| self.unsynced > 0) {
            file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(())
    }

    /// Flushes the current segment and starts the next; returns its number. A
    /// segment with no record yet is kept (a checkpoint that failed and is tried
    /// again does not pile up empty segments).
    pub(crate) fn roll(&mut self) -> io::Result<u64> {
        if self.file.is_some() && self.written == frame_len(&self.tables) {
            return Ok(self.segment);
        }
        self.sync()?;
        let next = self.segment + 1;
        self.file = Some(Journal::create_segment(&self.dir, next, &self.tables)?);
        self.segment = next;
        self.written = frame_len(&self.tables);
        Ok(next)
    }
}

/// An error after which the journal's end is not known: the store must stop.
fn in_doubt(what: &str, cause: io::Error) -> io::Error {
    io::Error::other(format!("the journal could not {what}: {cause}"))
}

/// Cuts the journal in `dir` off at `offset` of `segment`: that segment ends there and
/// the later ones are deleted, durably. What was there is never replayed.
pub(crate) fn cut_off(dir: &Path, segment: u64, offset: u64) -> io::Result<()> {
    let file = File::options()
        .write(true)
        .open(segment_path(dir, segment))?;
    file.set_len(offset)?;
    file.sync_data()?;
    for later in segments(dir)?.into_iter().filter(|&s| s > segment) {
        std::fs::remove_file(segment_path(dir, later))?;
    }
    sync_dir(dir)
}

/// Deletes the segments in `dir` before `segment`.
pub(crate) fn remove_before(dir: &Path, segment: u64) -> io::Result<()> {
    let mut removed = false;
    for old in segments(dir)?.into_iter().filter(|&s| s < segment) {
        std::fs::remove_file(segment_path(dir, old))?;
        removed = true;
    }
    if removed {
        sync_dir(dir)?;
    }
    Ok(())
}

fn frame_len(body: &[u8]) -> u64 {
    8 + body.len() as u64
}

/// A record whose body is `parts` one after the other, framed: `len ++ crc32 ++ body`
/// (little-endian u32s). The body is copied once.
fn frame(parts: &[&[u8]]) -> io::Result<Vec<u8>> {
    let body_len: usize = parts.iter().map(|part| part.len()).sum();
    let len = u32::try_from(body_len)
        .map_err(|_| io::Error::other("a journal record of 4 GiB or more"))?;
    let mut framed = Vec::with_capacity(8 + body_len);
    framed.extend_from_slice(&len.to_le_bytes());
    framed.extend_from_slice(&[0; 4]);
    for part in parts {
        framed.extend_from_slice(part);
    }
    let crc = crc32fast::hash(&framed[8..]);
    framed[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(framed)
}

/// A committed transaction read back from the journal.
pub(crate) struct Recorded {
    pub(crate) seq: u64,
    /// The segment it was read from.
    pub(crate) segment: u64,
    /// Where its frame starts in its segment.
    pub(crate) offset: u64,
    /// Acknowledged before LMDB committed it (write-back): never cut off.
    pub(crate) acknowledged: bool,
    /// Table number to database name, from its segment's tables record.
    names: std::rc::Rc<HashMap<u16, String>>,
    changes: Vec<u8>,
}

/// The journal as found in a directory.
pub(crate) struct Found {
    /// The commit records of the segments from the one asked for on, in order, without
    /// those an abort record cancels.
    pub(crate) records: Vec<Recorded>,
    /// The highest sequence number of any record in them.
    pub(crate) last_seq: u64,
}

/// The journal of `dir`, from segment `from_segment` on.
pub(crate) fn read(dir: &Path, from_segment: u64) -> io::Result<Found> {
    let mut found = Found {
        records: Vec::new(),
        last_seq: 0,
    };
    if !dir.exists() {
        return Ok(found);
    }
    for segment in segments(dir)?.into_iter().filter(|&s| s >= from_segment) {
        let path = segment_path(dir, segment);
        let mut bytes = Vec::new();
        File::open(&path)?.read_to_end(&mut bytes)?;
        let mut names = std::rc::Rc::new(HashMap::new());
        let mut at = 0;
        loop {
            let offset = at as u64;
            let Some(body) = next_body(&bytes, &mut at) else {
                break;
            };
            let (kind, seq) = (body[0], u64::from_le_bytes(body[1..9].try_into().unwrap()));
            found.last_seq = found.last_seq.max(seq);
            match kind {
                KIND_TABLES => names = std::rc::Rc::new(decode_tables(&body[9..])?),
                KIND_COMMIT | KIND_ACKED => found.records.push(Recorded {
                    seq,
                    segment,
                    offset,
                    acknowledged: kind == KIND_ACKED,
                    names: std::rc::Rc::clone(&names),
                    changes: body[9..].to_vec(),
                }),
                KIND_ABORT => found.records.retain(|r| r.seq != seq),
                other => return Err(corrupt(format!("record kind {other}"))),
            }
        }
        if at < bytes.len() {
            tracing::warn!(
                segment = %path.display(),
                ignored = bytes.len() - at,
                "the journal ends in a record cut short (never acknowledged)"
            );
        }
    }
    Ok(found)
}

/// The body of the record at `*at`, if it is whole and its checksum holds.
fn next_body<'a>(bytes: &'a [u8], at: &mut usize) -> Option<&'a [u8]> {
    let header = bytes.get(*at..*at + 8)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    let body = bytes.get(*at + 8..(*at + 8).checked_add(len)?)?;
    if body.len() < 9 || crc32fast::hash(body) != crc {
        return None;
    }
    *at += 8 + len;
    Some(body)
}

fn corrupt(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("journal: bad {what}"))
}

fn decode_tables(mut body: &[u8]) -> io::Result<HashMap<u16, String>> {
    let count = take_u16(&mut body)?;
    let mut names = HashMap::new();
    for _ in 0..count {
        let id = take_u16(&mut body)?;
        let len = take(&mut body, 1)?[0] as usize;
        let name = String::from_utf8(take(&mut body, len)?.to_vec())
            .map_err(|_| corrupt("table name".into()))?;
        names.insert(id, name);
    }
    Ok(names)
}

fn take<'a>(body: &mut &'a [u8], n: usize) -> io::Result<&'a [u8]> {
    if body.len() < n {
        return Err(corrupt("record length".into()));
    }
    let (head, rest) = body.split_at(n);
    *body = rest;
    Ok(head)
}

fn take_u16(body: &mut &[u8]) -> io::Result<u16> {
    Ok(u16::from_le_bytes(take(body, 2)?.try_into().unwrap()))
}

fn take_bytes<'a>(body: &mut &'a [u8]) -> io::Result<&'a [u8]> {
    let len = u32::from_le_bytes(take(body, 4)?.try_into().unwrap()) as usize;
    take(body, len)
}

fn take_bound<'a>(body: &mut &'a [u8]) -> io::Result<Bound<&'a [u8]>> {
    Ok(match take(body, 1)?[0] {
        0 => Bound::Unbounded,
        1 => Bound::Included(take_bytes(body)?),
        2 => Bound::Excluded(take_bytes(body)?),
        other => return Err(corrupt(format!("range bound {other}"))),
    })
}

impl Recorded {
    /// Makes this record's changes again in `txn` (which records them in turn), on the
    /// databases of the same names in `tables`.
    pub(crate) fn replay(&self, txn: &mut WriteTxn, tables: &Tables) -> Result<(), ReplayError> {
        replay(&self.changes, txn, |id| {
            let name = self
                .names
                .get(&id)
                .ok_or_else(|| corrupt(format!("table number {id}")))?;
            tables.tables.get(name).copied().ok_or_else(|| {
                corrupt(format!(
                    "table name {name} (a database this configuration does not have)"
                ))
            })
        })
    }
}

/// Makes the changes of a record's body again in `txn`, on the table `table_of` gives
/// for each table number.
fn replay(
    body: &[u8],
    txn: &mut WriteTxn,
    table_of: impl Fn(u16) -> io::Result<Table>,
) -> Result<(), ReplayError> {
    for_each_change(body, |change| {
        match change {
            Change::Put { table, key, value } => table_of(table)?.put(txn, key, value)?,
            Change::Delete { table, key } => {
                table_of(table)?.delete(txn, key)?;
            }
            Change::Range { table, range } => {
                table_of(table)?.delete_range(txn, &range)?;
            }
            Change::Clear { table } => table_of(table)?.clear(txn)?,
        }
        Ok(())
    })
}

/// One change of a record, on the table numbered `table`.
pub(crate) enum Change<'a> {
    Put {
        table: u16,
        key: &'a [u8],
        value: &'a [u8],
    },
    Delete {
        table: u16,
        key: &'a [u8],
    },
    Range {
        table: u16,
        range: (Bound<&'a [u8]>, Bound<&'a [u8]>),
    },
    Clear {
        table: u16,
    },
}

/// Calls `visit` with each change of a record's changes, in order.
pub(crate) fn for_each_change<'a, E: From<io::Error>>(
    mut body: &'a [u8],
    mut visit: impl FnMut(Change<'a>) -> Result<(), E>,
) -> Result<(), E> {
    while !body.is_empty() {
        let op = take(&mut body, 1)?[0];
        let table = take_u16(&mut body)?;
        let change = match op {
            PUT => Change::Put {
                table,
                key: take_bytes(&mut body)?,
                value: take_bytes(&mut body)?,
            },
            DELETE => Change::Delete {
                table,
                key: take_bytes(&mut body)?,
            },
            RANGE => Change::Range {
                table,
                range: (take_bound(&mut body)?, take_bound(&mut body)?),
            },
            CLEAR => Change::Clear { table },
            other => return Err(corrupt(format!("change {other}")).into()),
        };
        visit(change)?;
    }
    Ok(())
}

/// Why a record could not be replayed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReplayError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("lmdb: {0}")]
    Lmdb(#[from] heed::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A journal in `dir`, with its position table in an environment of its own.
    fn journal(dir: &Path) -> (Journal, tempfile::TempDir) {
        let env_dir = tempfile::tempdir().unwrap();
        let env = unsafe {
            shoal_shared::lmdb::env_options(1)
                .open(env_dir.path())
                .unwrap()
        };
        let mut tables = Tables::default();
        let meta = tables.add(
            "meta",
            shoal_shared::lmdb::create_database(&env, "meta").unwrap(),
        );
        (Journal::new(dir, &tables, meta, 0).unwrap(), env_dir)
    }

    fn put_change(key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut change = vec![PUT, 0, 0];
        for bytes in [key, value] {
            change.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            change.extend_from_slice(bytes);
        }
        change
    }

    fn record(journal: &mut Journal, kind: u8, seq: u64, changes: &[u8]) {
        journal
            .write(&frame(&[&[kind], &seq.to_le_bytes(), changes]).unwrap())
            .unwrap();
    }

    #[test]
    fn a_record_is_its_length_its_checksum_and_its_body() {
        let framed = frame(&[&[KIND_ABORT], &7u64.to_le_bytes()]).unwrap();
        let body = [KIND_ABORT, 7, 0, 0, 0, 0, 0, 0, 0];
        let mut expected = 9u32.to_le_bytes().to_vec();
        expected.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        expected.extend_from_slice(&body);
        assert_eq!(framed, expected);
        assert_eq!(frame_len(&body), framed.len() as u64);
    }

    fn seqs(found: &Found) -> Vec<u64> {
        found.records.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn an_aborted_commit_is_not_read_back_and_a_record_cut_short_ends_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _env) = journal(dir.path());
        journal.roll().unwrap();
        record(&mut journal, KIND_COMMIT, 5, &put_change(b"a", b"1"));
        record(&mut journal, KIND_COMMIT, 6, &put_change(b"b", b"2"));
        record(&mut journal, KIND_ABORT, 6, &[]);
        record(&mut journal, KIND_COMMIT, 7, &put_change(b"b", b"3"));
        record(&mut journal, KIND_COMMIT, 8, &put_change(b"c", b"4"));
        journal.sync().unwrap();
        let found = read(dir.path(), 0).unwrap();
        assert_eq!(seqs(&found), vec![5, 7, 8]);
        assert_eq!(found.records[1].changes, put_change(b"b", b"3"));
        assert_eq!(found.last_seq, 8);
        // The last record loses its last byte: it is not read, the others are.
        let path = segment_path(dir.path(), journal.segment);
        let len = std::fs::metadata(&path).unwrap().len();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        assert_eq!(seqs(&read(dir.path(), 0).unwrap()), vec![5, 7]);
        // A flipped bit fails the checksum just the same: one in the record before
        // the torn one (that one is 8 + 9 + 13 bytes long, less the byte cut off).
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 29 - 3;
        bytes[at] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(seqs(&read(dir.path(), 0).unwrap()), vec![5]);
    }

    #[test]
    fn a_journal_cut_off_at_a_record_keeps_only_what_came_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _env) = journal(dir.path());
        journal.roll().unwrap();
        record(&mut journal, KIND_COMMIT, 1, &put_change(b"a", b"1"));
        record(&mut journal, KIND_COMMIT, 2, &put_change(b"b", b"2"));
        record(&mut journal, KIND_COMMIT, 3, &put_change(b"c", b"3"));
        journal.roll().unwrap();
        record(&mut journal, KIND_COMMIT, 4, &put_change(b"d", b"4"));
        journal.sync().unwrap();
        let found = read(dir.path(), 0).unwrap();
        let second = &found.records[1];
        cut_off(dir.path(), second.segment, second.offset).unwrap();
        let left = read(dir.path(), 0).unwrap();
        assert_eq!(seqs(&left), vec![1]);
        assert_eq!(segments(dir.path()).unwrap(), vec![second.segment]);
    }

    #[test]
    fn a_new_segment_starts_after_the_last_and_older_ones_can_be_removed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut journal, _env) = journal(dir.path());
        let first = journal.roll().unwrap();
        assert_eq!(journal.roll().unwrap(), first, "an empty segment is kept");
        record(&mut journal, KIND_COMMIT, 1, &put_change(b"a", b"1"));
        let second = journal.roll().unwrap();
        assert_eq!(second, first + 1);
        record(&mut journal, KIND_COMMIT, 2, &put_change(b"b", b"2"));
        journal.sync().unwrap();
        drop(journal);
        let (mut reopened, _env) = self::journal(dir.path());
        assert_eq!(reopened.roll().unwrap(), second + 1);
        assert_eq!(seqs(&read(dir.path(), second).unwrap()), vec![2]);
        assert_eq!(seqs(&read(dir.path(), 0).unwrap()), vec![1, 2]);
        remove_before(dir.path(), second).unwrap();
        assert_eq!(segments(dir.path()).unwrap(), vec![second, second + 1]);
        assert_eq!(seqs(&read(dir.path(), 0).unwrap()), vec![2]);
    }
}

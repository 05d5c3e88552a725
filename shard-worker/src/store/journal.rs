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
//! read transaction) but no way to write around the record. Each change is *blind*
//! (the value set, the key removed), so replaying a record on a state that already
//! has it, or that has some later records too, ends at the same state.
//!
//! Files, in `<shard dir>/journal/`: segments `<number, 16 hex digits>.log`, numbered
//! upwards; a new one starts at every checkpoint. A segment is a sequence of records:
//!
//! ```text
//! record  = length u32 (of body) | crc32 u32 (of body) | body
//! body    = kind u8 | txnid u64 | ...
//!   kind 0, tables: count u16, then per table: id u8 | name length u8 | name
//!   kind 1, commit: changes until the end of the body
//!   kind 2, abort: nothing more (the commit record of `txnid` did not commit)
//! change  = 1 put    | table u8 | key length u32 | key | value length u32 | value
//!         | 2 delete | table u8 | key length u32 | key
//!         | 3 range  | table u8 | bound | bound          (delete_range)
//!         | 4 clear  | table u8
//! bound   = 0 unbounded | 1 included, length u32, bytes | 2 excluded, length u32, bytes
//! ```
//!
//! Integers are little-endian. `txnid` is the LMDB transaction id the record commits
//! as. Every segment starts with a tables record naming the databases its table
//! numbers refer to. A record cut short or failing its checksum ends the journal
//! (nothing after it was ever acknowledged: records are flushed in order).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::ops::{Bound, Deref};
use std::path::{Path, PathBuf};

use heed::{RoTxn, RwTxn, WithoutTls};
use shoal_shared::lmdb::RawDatabase;

const KIND_TABLES: u8 = 0;
const KIND_COMMIT: u8 = 1;
const KIND_ABORT: u8 = 2;

const PUT: u8 = 1;
const DELETE: u8 = 2;
const RANGE: u8 = 3;
const CLEAR: u8 = 4;

/// A write transaction that records its changes for the journal.
pub(crate) struct WriteTxn<'e> {
    txn: RwTxn<'e>,
    changes: Vec<u8>,
}

impl<'e> WriteTxn<'e> {
    pub(crate) fn new(txn: RwTxn<'e>) -> WriteTxn<'e> {
        WriteTxn {
            txn,
            changes: Vec::new(),
        }
    }

    /// The LMDB transaction id this transaction commits as.
    pub(crate) fn id(&self) -> u64 {
        self.txn.id() as u64
    }

    /// The changes recorded so far (empty when nothing was written).
    pub(crate) fn changes(&self) -> &[u8] {
        &self.changes
    }

    /// The transaction itself, for opening a nested one.
    pub(crate) fn inner(&mut self) -> &mut RwTxn<'e> {
        &mut self.txn
    }

    pub(crate) fn commit(self) -> heed::Result<()> {
        self.txn.commit()
    }

    pub(crate) fn abort(self) {
        self.txn.abort()
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
    id: u8,
}

impl Deref for Table {
    type Target = RawDatabase;

    fn deref(&self) -> &RawDatabase {
        &self.db
    }
}

impl Table {
    pub(crate) fn put(&self, txn: &mut WriteTxn, key: &[u8], value: &[u8]) -> heed::Result<()> {
        self.db.put(&mut txn.txn, key, value)?;
        txn.changes.extend_from_slice(&[PUT, self.id]);
        txn.bytes(key);
        txn.bytes(value);
        Ok(())
    }

    pub(crate) fn delete(&self, txn: &mut WriteTxn, key: &[u8]) -> heed::Result<bool> {
        let deleted = self.db.delete(&mut txn.txn, key)?;
        if deleted {
            txn.changes.extend_from_slice(&[DELETE, self.id]);
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
            txn.changes.extend_from_slice(&[RANGE, self.id]);
            txn.bound(range.0);
            txn.bound(range.1);
        }
        Ok(deleted)
    }

    pub(crate) fn clear(&self, txn: &mut WriteTxn) -> heed::Result<()> {
        self.db.clear(&mut txn.txn)?;
        txn.changes.extend_from_slice(&[CLEAR, self.id]);
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
        let id = u8::try_from(self.names.len()).expect("at most 256 databases");
        self.names.push(name.to_string());
        let table = Table { db, id };
        self.tables.insert(name.to_string(), table);
        table
    }

    fn record(&self) -> Vec<u8> {
        let mut body = vec![KIND_TABLES];
        body.extend_from_slice(&0u64.to_le_bytes());
        body.extend_from_slice(&(self.names.len() as u16).to_le_bytes());
        for (id, name) in self.names.iter().enumerate() {
            body.push(id as u8);
            body.push(name.len() as u8);
            body.extend_from_slice(name.as_bytes());
        }
        body
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

/// Flushes a directory, so that files created or renamed in it stay after a power loss.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The journal of a store: the segment being appended, once one is open.
pub(crate) struct Journal {
    dir: PathBuf,
    tables: Vec<u8>,
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
    /// The journal in `dir`. Nothing can be appended before [`Journal::roll`] starts a
    /// segment after those there.
    pub(crate) fn new(dir: &Path, tables: &Tables) -> io::Result<Journal> {
        std::fs::create_dir_all(dir)?;
        Ok(Journal {
            dir: dir.to_path_buf(),
            tables: tables.record(),
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
            .write_all(&frame(tables))
            .and_then(|()| file.sync_data())
            .and_then(|()| sync_dir(dir));
        if let Err(error) = written {
            // Out of room, most likely: the next try starts the same segment again.
            let _ = std::fs::remove_file(&path);
            return Err(error);
        }
        Ok(file)
    }

    /// Appends the commit record of transaction `txnid` (not flushed).
    fn append(&mut self, txnid: u64, changes: &[u8]) -> io::Result<()> {
        let mut body = Vec::with_capacity(9 + changes.len());
        body.push(KIND_COMMIT);
        body.extend_from_slice(&txnid.to_le_bytes());
        body.extend_from_slice(changes);
        self.write(&body)
    }

    /// Commits `txn`: its record is appended, and flushed if `sync`, and then LMDB
    /// commits it (without a sync). A failed LMDB commit is recorded as such, so that
    /// it is never replayed. The journal's I/O errors come as [`heed::Error::Io`].
    pub(crate) fn commit(&mut self, txn: WriteTxn, sync: bool) -> heed::Result<()> {
        let txnid = txn.id();
        self.append(txnid, txn.changes())?;
        if sync {
            self.sync()?;
        }
        if let Err(error) = txn.commit() {
            self.abort(txnid)?;
            return Err(error);
        }
        Ok(())
    }

    /// Records that the commit record of `txnid` did not commit, and flushes.
    fn abort(&mut self, txnid: u64) -> io::Result<()> {
        let mut body = vec![KIND_ABORT];
        body.extend_from_slice(&txnid.to_le_bytes());
        self.write(&body)?;
        self.sync()
    }

    fn write(&mut self, body: &[u8]) -> io::Result<()> {
        let framed = frame(body);
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("the journal has no segment open"))?;
        if let Err(error) = file.write_all(&framed) {
            // A record written in part would end the journal for every record after it.
            file.set_len(self.written)?;
            return Err(error);
        }
        self.unsynced += framed.len();
        self.written += framed.len() as u64;
        Ok(())
    }

    /// Flushes what was appended. Costs nothing when nothing was.
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        if let Some(file) = self.file.as_ref().filter(|_| self.unsynced > 0) {
            file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(())
    }

    /// Flushes the current segment and starts the next; returns its number.
    pub(crate) fn roll(&mut self) -> io::Result<u64> {
        self.sync()?;
        let next = self.segment + 1;
        self.file = Some(Journal::create_segment(&self.dir, next, &self.tables)?);
        self.segment = next;
        self.written = frame_len(&self.tables);
        Ok(next)
    }
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

fn frame(body: &[u8]) -> Vec<u8> {
    let mut framed = Vec::with_capacity(8 + body.len());
    framed.extend_from_slice(&(body.len() as u32).to_le_bytes());
    framed.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    framed.extend_from_slice(body);
    framed
}

/// A committed transaction read back from the journal.
pub(crate) struct Recorded {
    pub(crate) txnid: u64,
    /// The segment it was read from.
    pub(crate) segment: u64,
    /// Table number to database name, from its segment's tables record.
    names: std::rc::Rc<HashMap<u8, String>>,
    changes: Vec<u8>,
}

/// The commit records of the segments of `dir` from `segment` on, in order, without
/// those an abort record cancels.
pub(crate) fn read(dir: &Path, from_segment: u64) -> io::Result<Vec<Recorded>> {
    let mut records: Vec<Recorded> = Vec::new();
    if !dir.exists() {
        return Ok(records);
    }
    for segment in segments(dir)?.into_iter().filter(|&s| s >= from_segment) {
        let path = segment_path(dir, segment);
        let mut bytes = Vec::new();
        File::open(&path)?.read_to_end(&mut bytes)?;
        let mut names = std::rc::Rc::new(HashMap::new());
        let mut at = 0;
        while let Some(body) = next_body(&bytes, &mut at) {
            let (kind, txnid) = (body[0], u64::from_le_bytes(body[1..9].try_into().unwrap()));
            match kind {
                KIND_TABLES => names = std::rc::Rc::new(decode_tables(&body[9..])?),
                KIND_COMMIT => records.push(Recorded {
                    txnid,
                    segment,
                    names: std::rc::Rc::clone(&names),
                    changes: body[9..].to_vec(),
                }),
                KIND_ABORT => records.retain(|r| r.txnid != txnid),
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
    Ok(records)
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

fn decode_tables(mut body: &[u8]) -> io::Result<HashMap<u8, String>> {
    let count = take_u16(&mut body)?;
    let mut names = HashMap::new();
    for _ in 0..count {
        let id = take(&mut body, 1)?[0];
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
        let mut body = &self.changes[..];
        while !body.is_empty() {
            let op = take(&mut body, 1)?[0];
            let id = take(&mut body, 1)?[0];
            let name = self
                .names
                .get(&id)
                .ok_or_else(|| corrupt(format!("table number {id}")))?;
            let table = tables
                .tables
                .get(name)
                .ok_or_else(|| corrupt(format!("table name {name}")))?;
            match op {
                PUT => {
                    let key = take_bytes(&mut body)?;
                    let value = take_bytes(&mut body)?;
                    table.put(txn, key, value)?;
                }
                DELETE => {
                    table.delete(txn, take_bytes(&mut body)?)?;
                }
                RANGE => {
                    let range = (take_bound(&mut body)?, take_bound(&mut body)?);
                    table.delete_range(txn, &range)?;
                }
                CLEAR => table.clear(txn)?,
                other => return Err(corrupt(format!("change {other}")).into()),
            }
        }
        Ok(())
    }
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

    fn tables() -> Tables {
        Tables {
            names: vec!["meta".into()],
            tables: HashMap::new(),
        }
    }

    fn put_change(key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut change = vec![PUT, 0];
        for bytes in [key, value] {
            change.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            change.extend_from_slice(bytes);
        }
        change
    }

    #[test]
    fn an_aborted_commit_is_not_read_back_and_a_record_cut_short_ends_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::new(dir.path(), &tables()).unwrap();
        journal.roll().unwrap();
        journal.append(5, &put_change(b"a", b"1")).unwrap();
        journal.append(6, &put_change(b"b", b"2")).unwrap();
        journal.abort(6).unwrap();
        journal.append(6, &put_change(b"b", b"3")).unwrap();
        journal.append(7, &put_change(b"c", b"4")).unwrap();
        journal.sync().unwrap();
        let read_ids = || -> Vec<(u64, Vec<u8>)> {
            read(dir.path(), 0)
                .unwrap()
                .into_iter()
                .map(|r| (r.txnid, r.changes))
                .collect()
        };
        assert_eq!(
            read_ids(),
            vec![
                (5, put_change(b"a", b"1")),
                (6, put_change(b"b", b"3")),
                (7, put_change(b"c", b"4"))
            ]
        );
        // The last record loses its last byte: it is not read, the others are.
        let path = segment_path(dir.path(), journal.segment);
        let len = std::fs::metadata(&path).unwrap().len();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        assert_eq!(
            read_ids().iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            vec![5, 6]
        );
        // A flipped bit fails the checksum just the same: one in the record before
        // the torn one (that one is 8 + 9 + 12 bytes long, less the byte cut off).
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 28 - 3;
        bytes[at] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            read_ids().iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            vec![5]
        );
    }

    #[test]
    fn a_new_segment_starts_after_the_last_and_older_ones_can_be_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::new(dir.path(), &tables()).unwrap();
        let first = journal.roll().unwrap();
        assert!(journal.append(1, &put_change(b"a", b"1")).is_ok());
        let second = journal.roll().unwrap();
        assert_eq!(second, first + 1);
        journal.append(2, &put_change(b"b", b"2")).unwrap();
        journal.sync().unwrap();
        drop(journal);
        let mut reopened = Journal::new(dir.path(), &tables()).unwrap();
        assert_eq!(reopened.roll().unwrap(), second + 1);
        assert_eq!(read(dir.path(), second).unwrap().len(), 1);
        assert_eq!(read(dir.path(), 0).unwrap().len(), 2);
        remove_before(dir.path(), second).unwrap();
        assert_eq!(segments(dir.path()).unwrap(), vec![second, second + 1]);
        assert_eq!(read(dir.path(), 0).unwrap()[0].txnid, 2);
    }
}

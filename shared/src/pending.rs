//! The pending-key index: which keys a worker has acknowledged writes to that its LMDB
//! environment does not hold yet (write-back).
//!
//! With write-back a worker acknowledges a batch once its journal record is flushed,
//! and commits LMDB later. The net-daemon reads values straight from the shard's map,
//! which must never answer an acknowledged write with the value before it. The worker
//! says which keys such a read must leave to it in two places:
//! - the `Unsettled` word of its status slot ([`crate::status::Field::Unsettled`]):
//!   [`SETTLED`], [`KEYS`] (only the keys marked here are pending) or [`SHARD`] (the
//!   whole shard is: a change that no key names, such as a prepared transaction or a
//!   flush);
//! - this index: a bitmap of [`BITS`] bits in `<data_dir>/run/pending-<worker>`, one
//!   bit per hash of a collection and stored key ([`key_hash`]).
//!
//! A key whose bit is clear has no pending write: its value in the map is the last
//! acknowledged one. A bit shared by two keys only sends a read to the worker. The
//! worker sets the word and the bits before it acknowledges the batch, and clears
//! them after LMDB commits: bits first, then the word, each store with `Release`
//! ordering, so that a reader that finds them clear (loads with `Acquire`) and then
//! opens a read transaction sees the commit. A reader checks the keys before it opens
//! its transaction. The bits stay set if the worker dies, until its successor has
//! replayed the journal.

use std::fs::OpenOptions;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{Mmap, MmapMut};

use crate::frame::{Collection, Partition};

/// The `Unsettled` word: LMDB holds every acknowledged write.
pub const SETTLED: u64 = 0;
/// The `Unsettled` word: the whole shard is pending (reads go to the worker).
pub const SHARD: u64 = 1;
/// The `Unsettled` word: the keys marked in the index are pending.
pub const KEYS: u64 = 2;

/// Bits in a worker's index: with the at most 25,000 changes a worker holds before it
/// commits, at most 2.4% of them are set.
pub const BITS: usize = 1 << 20;
const WORDS: usize = BITS / 64;

/// The hash of a key of `collection` stored under the bytes `parts` joined
/// ([`crate::layout::data_key`]: partition, then the key): FNV-1a, 64 bits, finished
/// with murmur3's mix so that keys differing in their last byte land far apart.
pub fn key_hash(collection: Collection, parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &byte in bytes {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    feed(&collection.to_le_bytes());
    for part in parts {
        feed(part);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// [`key_hash`] of `key` of `collection` in `partition`, as stored
/// ([`crate::layout::data_key`]), without building the stored key.
pub fn data_key_hash(collection: Collection, partition: Partition, key: &[u8]) -> u64 {
    key_hash(collection, &[&partition.to_be_bytes(), key])
}

fn position(hash: u64) -> (usize, u64) {
    let bit = (hash as usize) % BITS;
    (bit / 64, 1 << (bit % 64))
}

enum Map {
    ReadWrite(MmapMut),
    ReadOnly(Mmap),
}

/// A worker's mapped index.
pub struct PendingKeys {
    map: Map,
}

impl PendingKeys {
    /// Maps the index at `path` for writing (its worker), creating it if missing. An
    /// existing one keeps its bits: those of a predecessor that died before LMDB
    /// committed its writes stay set until [`PendingKeys::clear`].
    pub fn open_or_create(path: &Path) -> io::Result<PendingKeys> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if file.metadata()?.len() != (WORDS * 8) as u64 {
            file.set_len((WORDS * 8) as u64)?;
        }
        // SAFETY: sized above; only accessed through atomics.
        let map = unsafe { MmapMut::map_mut(&file)? };
        Ok(PendingKeys {
            map: Map::ReadWrite(map),
        })
    }

    /// Maps the index at `path` for reading (the net-daemon).
    pub fn open_read_only(path: &Path) -> io::Result<PendingKeys> {
        let file = OpenOptions::new().read(true).open(path)?;
        // SAFETY: never written through this mapping; its length is checked below.
        let map = unsafe { Mmap::map(&file)? };
        if map.len() != WORDS * 8 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("pending-key index {} has the wrong size", path.display()),
            ));
        }
        Ok(PendingKeys {
            map: Map::ReadOnly(map),
        })
    }

    fn words(&self) -> &[AtomicU64] {
        let bytes: &[u8] = match &self.map {
            Map::ReadWrite(map) => map,
            Map::ReadOnly(map) => map,
        };
        // SAFETY: the map is page-aligned, WORDS * 8 bytes long (checked when mapped),
        // and every process accesses it only through these atomics.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<AtomicU64>(), WORDS) }
    }

    /// Marks the key of `hash` pending.
    pub fn mark(&self, hash: u64) {
        let (word, bit) = position(hash);
        self.words()[word].fetch_or(bit, Ordering::Release);
    }

    /// Whether the key of `hash` may be pending.
    pub fn contains(&self, hash: u64) -> bool {
        let (word, bit) = position(hash);
        self.words()[word].load(Ordering::Acquire) & bit != 0
    }

    /// Clears every bit (after LMDB committed every pending write).
    pub fn clear(&self) {
        for word in self.words() {
            if word.load(Ordering::Relaxed) != 0 {
                word.store(0, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_seen_by_a_reader_until_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pending-0");
        let writer = PendingKeys::open_or_create(&path).unwrap();
        let reader = PendingKeys::open_read_only(&path).unwrap();
        let stored = [&[0u8, 7][..], b"user:1"];
        let hash = key_hash(0, &stored);
        // The same bytes split differently hash alike; another collection does not.
        assert_eq!(hash, key_hash(0, &[b"\0\x07user:1"]));
        assert_eq!(hash, data_key_hash(0, 7, b"user:1"));
        assert_eq!(hash, key_hash(0, &[&crate::layout::data_key(7, b"user:1")]));
        assert_ne!(hash, key_hash(1, &stored));
        assert!(!reader.contains(hash));
        writer.mark(hash);
        assert!(reader.contains(hash));
        assert!(!reader.contains(key_hash(0, &[&[0u8, 7][..], b"user:2"])));
        // A successor keeps its predecessor's marks until it clears them.
        let successor = PendingKeys::open_or_create(&path).unwrap();
        assert!(successor.contains(hash));
        successor.clear();
        assert!(!reader.contains(hash));
    }

    #[test]
    fn keys_spread_over_the_bitmap() {
        let dir = tempfile::tempdir().unwrap();
        let index = PendingKeys::open_or_create(&dir.path().join("pending")).unwrap();
        for n in 0..25_000u32 {
            index.mark(key_hash(0, &[b"key:", n.to_string().as_bytes()]));
        }
        let others = (25_000..125_000u32)
            .filter(|n| index.contains(key_hash(0, &[b"key:", n.to_string().as_bytes()])))
            .count();
        // 25,000 of 2^20 bits set: about 2.4% of other keys collide.
        assert!(others < 4_000, "{others} of 100,000 other keys collide");
    }
}

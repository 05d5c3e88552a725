//! The byte layout of collection-typed keys: hashes, sets, sorted sets and lists.
//!
//! A typed key has one *metadata record* in its collection's `c<N>` database, like a
//! string, with [`super::FLAG_TYPED`] set in its flags. Its value bytes are:
//! ```text
//! kind u8 ++ version u64 ++ count u64 [++ head u64 ++ tail u64, lists only]
//! ```
//! `version` tells this incarnation of the key from earlier ones: it is the commit id
//! the partition was at when the key was created, plus one (the first commit id that
//! write took), so no two incarnations of keys of one partition share it, on any copy.
//! `count` is the number of elements. A list's elements sit at positions
//! `head..tail` (`count = tail - head`); a new list starts at `head = tail = 2^63`.
//!
//! The elements live in one named database per element table, shared by every collection:
//! ```text
//! hash    key = element prefix ++ field          value = record header ++ field's value
//! set     key = element prefix ++ member         value = record header
//! zset    key = element prefix ++ member         value = record header ++ score (8, sortable)
//! zscore  key = element prefix ++ score (8, sortable) ++ member   value = record header
//! list    key = element prefix ++ position u64   value = record header ++ element
//!
//! element prefix = partition u16 ++ key_len u16 ++ user key ++ version u64
//! record header  = commit_id u64 ++ flags u8 (as a `c<N>` value, with no flag set)
//! ```
//! A score is stored so that byte order is numeric order (see [`score_bytes`]).
//!
//! Elements of a version that is no longer the key's (the key was deleted, expired or
//! overwritten) are invisible, since readers look only under the live version. They are
//! removed at once when few, and otherwise recorded in `reclaim` and removed in the
//! background in small transactions:
//! ```text
//! reclaim key = partition u16 ++ kind u8 ++ element prefix without its partition
//!         value = empty
//! ```
//!
//! In the commit log, an entry's collection field carries the table it changes in its
//! top 4 bits (see [`LogTable`]); its key is the stored key without the partition (for
//! an element: `key_len ++ user key ++ version ++ element`), and its data the stored
//! value without its header.

use super::{corrupt, read_u64, CorruptError};
use crate::frame::{Collection, Partition};
pub use crate::frame::{ElementTable, Kind};
use crate::limits::LMDB_MAX_KEY_BYTES;

/// The element tables that hold `kind`'s elements.
pub fn tables(kind: Kind) -> &'static [ElementTable] {
    match kind {
        Kind::Hash => &[ElementTable::Hash],
        Kind::Set => &[ElementTable::Set],
        Kind::SortedSet => &[ElementTable::Zset, ElementTable::Zscore],
        Kind::List => &[ElementTable::List],
    }
}

/// Where a log entry's change goes: the top 4 bits of its collection field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTable {
    /// `c<N>`, a string value (and markers and txn entries, collection 0).
    Plain,
    /// `c<N>`, a typed key's metadata record.
    Typed,
    /// An element table.
    Element(ElementTable),
}

const LOG_TABLE_SHIFT: u16 = 12;
const _: () = assert!(
    crate::limits::MAX_COLLECTIONS <= 1 << LOG_TABLE_SHIFT,
    "collection numbers leave the top 4 bits of a log entry's collection field free"
);

impl LogTable {
    /// The collection field of a log entry of this table in `collection`.
    pub fn field(self, collection: Collection) -> u16 {
        let table: u16 = match self {
            LogTable::Plain => 0,
            LogTable::Typed => 1,
            LogTable::Element(table) => 1 + table as u16,
        };
        table << LOG_TABLE_SHIFT | collection
    }

    /// The table and collection of a log entry's collection field.
    pub fn split(field: u16) -> Result<(LogTable, Collection), CorruptError> {
        let collection = field & ((1 << LOG_TABLE_SHIFT) - 1);
        let table = match (field >> LOG_TABLE_SHIFT) as u8 {
            0 => LogTable::Plain,
            1 => LogTable::Typed,
            n => LogTable::Element(ElementTable::from_byte(n - 1).ok_or_else(|| {
                corrupt(
                    "log entry",
                    format!("unknown table {n} in collection field"),
                )
            })?),
        };
        Ok((table, collection))
    }

    /// The name a change feed shows.
    pub fn name(self) -> &'static str {
        match self {
            LogTable::Plain => "string",
            LogTable::Typed => "key",
            LogTable::Element(table) => table.name(),
        }
    }
}

/// A typed key's metadata record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeMeta {
    /// The key's type.
    pub kind: Kind,
    /// This incarnation of the key (see the module header).
    pub version: u64,
    /// Number of elements.
    pub count: u64,
    /// Lists: position of the first element.
    pub head: u64,
    /// Lists: position after the last element.
    pub tail: u64,
}

/// Where a new list's head and tail start.
pub const LIST_START: u64 = 1 << 63;

impl TypeMeta {
    /// An empty key of `kind` with `version`.
    pub fn new(kind: Kind, version: u64) -> TypeMeta {
        TypeMeta {
            kind,
            version,
            count: 0,
            head: LIST_START,
            tail: LIST_START,
        }
    }
}

/// Encodes a metadata record's value bytes.
pub fn encode_type_meta(meta: &TypeMeta) -> Vec<u8> {
    let mut out = Vec::with_capacity(33);
    out.push(meta.kind as u8);
    out.extend_from_slice(&meta.version.to_be_bytes());
    out.extend_from_slice(&meta.count.to_be_bytes());
    if meta.kind == Kind::List {
        out.extend_from_slice(&meta.head.to_be_bytes());
        out.extend_from_slice(&meta.tail.to_be_bytes());
    }
    out
}

/// Decodes a metadata record's value bytes.
pub fn decode_type_meta(raw: &[u8]) -> Result<TypeMeta, CorruptError> {
    let kind = raw
        .first()
        .and_then(|b| Kind::from_byte(*b))
        .ok_or_else(|| corrupt("type metadata", "unknown kind"))?;
    let expected = if kind == Kind::List { 33 } else { 17 };
    if raw.len() != expected {
        return Err(corrupt(
            "type metadata",
            format!("{} bytes, expected {expected}", raw.len()),
        ));
    }
    let mut meta = TypeMeta::new(kind, read_u64(&raw[1..9]));
    meta.count = read_u64(&raw[9..17]);
    if kind == Kind::List {
        meta.head = read_u64(&raw[17..25]);
        meta.tail = read_u64(&raw[25..33]);
        if meta.tail < meta.head || meta.tail - meta.head != meta.count {
            return Err(corrupt("type metadata", "list count is not tail - head"));
        }
    }
    Ok(meta)
}

/// Bytes of an element prefix besides the user key: partition, key length, version.
pub const ELEMENT_PREFIX_BYTES: usize = 2 + 2 + 8;
/// Longest user key plus element (field, member, or score ++ member) that fits an LMDB key.
pub const MAX_KEY_AND_ELEMENT_BYTES: usize = LMDB_MAX_KEY_BYTES - ELEMENT_PREFIX_BYTES;

/// `partition ++ key_len ++ key ++ version`.
pub fn element_prefix(partition: Partition, key: &[u8], version: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(ELEMENT_PREFIX_BYTES + key.len() + 16);
    out.extend_from_slice(&partition.to_be_bytes());
    out.extend_from_slice(&(key.len() as u16).to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&version.to_be_bytes());
    out
}

/// `element prefix ++ element`.
pub fn element_key(partition: Partition, key: &[u8], version: u64, element: &[u8]) -> Vec<u8> {
    let mut out = element_prefix(partition, key, version);
    out.extend_from_slice(element);
    out
}

/// The user key of a stored element key (partition included), if it is well formed.
pub fn element_user_key(raw: &[u8]) -> Option<&[u8]> {
    let len = usize::from(u16::from_be_bytes([*raw.get(2)?, *raw.get(3)?]));
    raw.get(4..4 + len).filter(|_| raw.len() >= 4 + len + 8)
}

/// The user key and version of a stored element key (partition included).
pub fn element_owner(raw: &[u8]) -> Option<(&[u8], u64)> {
    let key = element_user_key(raw)?;
    let at = 4 + key.len();
    Some((key, read_u64(raw.get(at..at + 8)?)))
}

/// A score as 8 bytes whose byte order is the numeric order (-inf first, +inf last).
/// NaN is never stored.
pub fn score_bytes(score: f64) -> [u8; 8] {
    // -0.0 and 0.0 are one score.
    let bits = if score == 0.0 { 0 } else { score.to_bits() };
    let ordered = if bits >> 63 == 1 {
        !bits
    } else {
        bits | 1 << 63
    };
    ordered.to_be_bytes()
}

/// The score of [`score_bytes`]' output.
pub fn score_from_bytes(raw: &[u8]) -> Result<f64, CorruptError> {
    let bytes: [u8; 8] = raw
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt("score", "shorter than 8 bytes"))?;
    let ordered = u64::from_be_bytes(bytes);
    let bits = if ordered >> 63 == 1 {
        ordered & !(1 << 63)
    } else {
        !ordered
    };
    Ok(f64::from_bits(bits))
}

/// `partition ++ kind ++ (element prefix without its partition)`.
pub fn reclaim_key(partition: Partition, kind: Kind, key: &[u8], version: u64) -> Vec<u8> {
    let prefix = element_prefix(partition, key, version);
    let mut out = Vec::with_capacity(prefix.len() + 1);
    out.extend_from_slice(&prefix[..2]);
    out.push(kind as u8);
    out.extend_from_slice(&prefix[2..]);
    out
}

/// The kind and the element prefix of a `reclaim` key.
pub fn decode_reclaim_key(raw: &[u8]) -> Result<(Kind, Vec<u8>), CorruptError> {
    let kind = raw
        .get(2)
        .and_then(|b| Kind::from_byte(*b))
        .ok_or_else(|| corrupt("reclaim entry", "no kind"))?;
    let mut prefix = raw[..2].to_vec();
    prefix.extend_from_slice(&raw[3..]);
    match element_user_key(&prefix) {
        Some(key) if prefix.len() == ELEMENT_PREFIX_BYTES + key.len() => Ok((kind, prefix)),
        _ => Err(corrupt("reclaim entry", "malformed element prefix")),
    }
}

/// A typed key's whole content, as RENAME, COPY and MOVE carry it between workers:
/// `kind u8 ++ (element_len u32 ++ element ++ value_len u32 ++ value)*`, the elements of
/// the kind's first table in stored order (a list's values in order, with empty elements;
/// a sorted set's members with their 8-byte scores).
pub fn encode_snapshot(kind: Kind, elements: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let bytes: usize = elements.iter().map(|(e, v)| 8 + e.len() + v.len()).sum();
    let mut out = Vec::with_capacity(1 + bytes);
    out.push(kind as u8);
    for (element, value) in elements {
        out.extend_from_slice(&(element.len() as u32).to_be_bytes());
        out.extend_from_slice(element);
        out.extend_from_slice(&(value.len() as u32).to_be_bytes());
        out.extend_from_slice(value);
    }
    out
}

/// Elements with their values, in stored order.
pub type Elements = Vec<(Vec<u8>, Vec<u8>)>;

/// Decodes [`encode_snapshot`]'s bytes.
pub fn decode_snapshot(raw: &[u8]) -> Result<(Kind, Elements), CorruptError> {
    let kind = raw
        .first()
        .and_then(|b| Kind::from_byte(*b))
        .ok_or_else(|| corrupt("snapshot", "unknown kind"))?;
    let mut rest = &raw[1..];
    let mut elements = Vec::new();
    let take = |rest: &mut &[u8]| -> Result<Vec<u8>, CorruptError> {
        let len = rest
            .get(..4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| corrupt("snapshot", "truncated length"))?;
        let bytes = rest
            .get(4..4 + len)
            .ok_or_else(|| corrupt("snapshot", "truncated element"))?
            .to_vec();
        *rest = &rest[4 + len..];
        Ok(bytes)
    };
    while !rest.is_empty() {
        let element = take(&mut rest)?;
        let value = take(&mut rest)?;
        elements.push((element, value));
    }
    Ok((kind, elements))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_sort_as_numbers() {
        let scores = [
            f64::NEG_INFINITY,
            -1e300,
            -2.5,
            -1.0,
            -f64::MIN_POSITIVE,
            0.0,
            f64::MIN_POSITIVE,
            1.0,
            2.5,
            1e300,
            f64::INFINITY,
        ];
        for pair in scores.windows(2) {
            assert!(score_bytes(pair[0]) < score_bytes(pair[1]), "{pair:?}");
        }
        for score in scores {
            assert_eq!(score_from_bytes(&score_bytes(score)).unwrap(), score);
        }
        assert_eq!(score_bytes(-0.0), score_bytes(0.0));
    }

    #[test]
    fn metadata_and_keys_round_trip() {
        let mut list = TypeMeta::new(Kind::List, 7);
        list.head -= 2;
        list.count = 2;
        assert_eq!(decode_type_meta(&encode_type_meta(&list)).unwrap(), list);
        let hash = TypeMeta::new(Kind::Hash, 9);
        assert_eq!(encode_type_meta(&hash).len(), 17);
        assert_eq!(decode_type_meta(&encode_type_meta(&hash)).unwrap(), hash);
        assert!(decode_type_meta(&[9; 17]).is_err());
        assert!(decode_type_meta(&encode_type_meta(&list)[..17]).is_err());
        let key = element_key(3, b"user", 5, b"field");
        assert_eq!(element_user_key(&key), Some(&b"user"[..]));
        assert!(element_prefix(3, b"user", 5) < element_prefix(3, b"user", 6));
        let reclaim = reclaim_key(3, Kind::SortedSet, b"user", 5);
        assert_eq!(
            decode_reclaim_key(&reclaim).unwrap(),
            (Kind::SortedSet, element_prefix(3, b"user", 5))
        );
        for table in [
            LogTable::Plain,
            LogTable::Typed,
            LogTable::Element(ElementTable::Zscore),
        ] {
            assert_eq!(LogTable::split(table.field(1023)).unwrap(), (table, 1023));
        }
        assert!(LogTable::split(0xf000).is_err());
        let elements = vec![(b"f".to_vec(), b"v".to_vec()), (Vec::new(), b"x".to_vec())];
        let snapshot = encode_snapshot(Kind::Hash, &elements);
        assert_eq!(decode_snapshot(&snapshot).unwrap(), (Kind::Hash, elements));
        assert!(decode_snapshot(&snapshot[..snapshot.len() - 1]).is_err());
        assert!(decode_snapshot(&[9]).is_err());
    }
}

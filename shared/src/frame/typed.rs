//! The commands on typed keys (hashes, sets, sorted sets, lists) that the net-daemon
//! sends a worker in a `WorkerRequest::Typed`, and the answers the worker gives.
//! The net-daemon parses and checks the arguments; the worker applies the semantics.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// The type of a typed key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum Kind {
    /// Fields with values.
    Hash = 1,
    /// Distinct members.
    Set = 2,
    /// Distinct members ordered by score.
    SortedSet = 3,
    /// Elements in order.
    List = 4,
}

impl Kind {
    /// The kind stored as `byte`.
    pub fn from_byte(byte: u8) -> Option<Kind> {
        match byte {
            1 => Some(Kind::Hash),
            2 => Some(Kind::Set),
            3 => Some(Kind::SortedSet),
            4 => Some(Kind::List),
            _ => None,
        }
    }

    /// The name TYPE answers.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Hash => "hash",
            Kind::Set => "set",
            Kind::SortedSet => "zset",
            Kind::List => "list",
        }
    }

    /// The encoding OBJECT ENCODING answers.
    pub fn encoding(self) -> &'static str {
        match self {
            Kind::Hash => "hashtable",
            Kind::Set => "hashtable",
            Kind::SortedSet => "skiplist",
            Kind::List => "quicklist",
        }
    }
}

/// A named database of elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum ElementTable {
    /// `hash`: a hash's fields and values.
    Hash = 1,
    /// `set`: a set's members.
    Set = 2,
    /// `zset`: a sorted set's members and their scores.
    Zset = 3,
    /// `zscore`: a sorted set's members by score.
    Zscore = 4,
    /// `list`: a list's elements by position.
    List = 5,
}

impl ElementTable {
    /// Every element table, in export order.
    pub const ALL: [ElementTable; 5] = [
        ElementTable::Hash,
        ElementTable::Set,
        ElementTable::Zset,
        ElementTable::Zscore,
        ElementTable::List,
    ];

    /// The LMDB database name.
    pub fn name(self) -> &'static str {
        match self {
            ElementTable::Hash => "hash",
            ElementTable::Set => "set",
            ElementTable::Zset => "zset",
            ElementTable::Zscore => "zscore",
            ElementTable::List => "list",
        }
    }

    /// The table stored as `byte`.
    pub fn from_byte(byte: u8) -> Option<ElementTable> {
        ElementTable::ALL.into_iter().find(|t| *t as u8 == byte)
    }
}

/// One end of a score range: `1.5`, `(1.5`, `-inf`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScoreBound {
    /// The score.
    pub value: f64,
    /// The end itself is out of the range.
    pub exclusive: bool,
}

/// One end of a lexicographic range: `-`, `+`, `[a`, `(a`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LexBound {
    /// `-`: before every member.
    Min,
    /// `+`: after every member.
    Max,
    /// `[member`.
    Inclusive(ByteBuf),
    /// `(member`.
    Exclusive(ByteBuf),
}

/// Which members of a sorted set a range takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RangeBy {
    /// By rank, inclusive; negative ranks count from the end.
    Rank(i64, i64),
    /// By score, from the low end to the high end.
    Score(ScoreBound, ScoreBound),
    /// By member, from the low end to the high end (for members of one score).
    Lex(LexBound, LexBound),
}

/// A range of a sorted set (ZRANGE and its older forms, ZREMRANGEBY*).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZRange {
    /// Which members.
    pub by: RangeBy,
    /// From the highest score down (the bounds are then given high end first by the
    /// client; here they are always low end first).
    pub reverse: bool,
    /// `LIMIT offset count` (count < 0: all).
    pub limit: Option<(i64, i64)>,
}

/// ZADD's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ZAddFlags {
    /// Only add new members.
    pub nx: bool,
    /// Only update existing members.
    pub xx: bool,
    /// Update only when the new score is greater.
    pub gt: bool,
    /// Update only when the new score is less.
    pub lt: bool,
    /// Count changed members, not only added ones.
    pub ch: bool,
    /// Add the score to the member's (one pair only); answer the new score.
    pub incr: bool,
}

/// A command on one typed key. The answer is named on each variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TypedOp {
    /// TYPE → `Status` (`none` when missing; `string` for a string).
    Type,
    /// OBJECT ENCODING → `Bulk` (`Nil` when missing).
    Encoding,
    /// HLEN, SCARD, ZCARD, LLEN → `Integer`.
    Len(Kind),
    /// A page of elements for HSCAN/SSCAN/ZSCAN, in stored order, after `after` (a
    /// field or member) → `Array[next (Bulk, Nil at the end), Array of items]`.
    Scan {
        /// The kind the key must be.
        kind: Kind,
        /// Resume after this element.
        after: Option<ByteBuf>,
        /// About how many elements to look at.
        count: u32,
        /// Only elements matching this glob pattern.
        pattern: Option<ByteBuf>,
        /// HSCAN NOVALUES: fields without values.
        no_values: bool,
    },
    /// Every member of a set, or every member and score of a sorted set (as `Pairs`
    /// with `Double` scores), for SMEMBERS and multi-key commands → `Array` or `Pairs`
    /// (empty when the key is missing). Asked of a set, `Members(SortedSet)` answers its
    /// members as `Array`.
    Members(Kind),

    /// HSET, HMSET, HSETNX (`if_absent`) → `Integer` (fields added).
    HSet {
        /// Fields and values.
        pairs: Vec<(ByteBuf, ByteBuf)>,
        /// Only set a field that is absent.
        if_absent: bool,
    },
    /// HGET, HMGET → `Array` of `Bulk`/`Nil`.
    HGet {
        /// The fields.
        fields: Vec<ByteBuf>,
    },
    /// HDEL → `Integer`.
    HDel {
        /// The fields.
        fields: Vec<ByteBuf>,
    },
    /// HEXISTS → `Integer`.
    HExists {
        /// The field.
        field: ByteBuf,
    },
    /// HSTRLEN → `Integer`.
    HStrLen {
        /// The field.
        field: ByteBuf,
    },
    /// HGETALL (`Pairs`), HKEYS, HVALS (`Array`).
    HGetAll {
        /// Answer the fields.
        fields: bool,
        /// Answer the values.
        values: bool,
    },
    /// HINCRBY → `Integer`.
    HIncrBy {
        /// The field.
        field: ByteBuf,
        /// What to add.
        delta: i64,
    },
    /// HINCRBYFLOAT → `Bulk`.
    HIncrByFloat {
        /// The field.
        field: ByteBuf,
        /// What to add, as the client sent it.
        increment: ByteBuf,
    },
    /// HRANDFIELD → `Bulk`/`Nil` without a count, `Array` or `Pairs` with one.
    HRandField {
        /// Negative: may repeat.
        count: Option<i64>,
        /// With the values.
        with_values: bool,
    },

    /// SADD → `Integer`.
    SAdd {
        /// The members.
        members: Vec<ByteBuf>,
    },
    /// SREM → `Integer`.
    SRem {
        /// The members.
        members: Vec<ByteBuf>,
    },
    /// SISMEMBER, SMISMEMBER → `Array` of `Integer`.
    SIsMember {
        /// The members.
        members: Vec<ByteBuf>,
    },
    /// SRANDMEMBER → `Bulk`/`Nil` without a count, `Array` with one.
    SRandMember {
        /// Negative: may repeat.
        count: Option<i64>,
    },
    /// SPOP → `Bulk`/`Nil` without a count, `Array` with one.
    SPop {
        /// How many.
        count: Option<u64>,
    },

    /// SMOVE to the set `to`, a key of the same worker → `Integer` (moved or not).
    SMove {
        /// The destination set.
        to: crate::frame::Key,
        /// The member.
        member: ByteBuf,
    },

    /// ZADD, ZINCRBY → `Integer`, or with INCR the new score (`Double`, `Nil` when not
    /// applied).
    ZAdd {
        /// The options.
        flags: ZAddFlags,
        /// Scores and members.
        pairs: Vec<(f64, ByteBuf)>,
    },
    /// ZREM → `Integer`.
    ZRem {
        /// The members.
        members: Vec<ByteBuf>,
    },
    /// ZSCORE, ZMSCORE → `Array` of `Double`/`Nil`.
    ZScore {
        /// The members.
        members: Vec<ByteBuf>,
    },
    /// ZRANK, ZREVRANK → `Integer`/`Nil`.
    ZRank {
        /// The member.
        member: ByteBuf,
        /// ZREVRANK.
        reverse: bool,
    },
    /// ZCOUNT, ZLEXCOUNT → `Integer`.
    ZCount {
        /// The range.
        range: RangeBy,
    },
    /// ZRANGE and its forms → `Array`, or `Pairs` with scores.
    ZRange {
        /// The range.
        range: ZRange,
        /// With the scores.
        with_scores: bool,
    },
    /// ZREMRANGEBYRANK, ZREMRANGEBYSCORE, ZREMRANGEBYLEX → `Integer`.
    ZRemRange {
        /// The range.
        range: RangeBy,
    },
    /// ZPOPMIN, ZPOPMAX → `Pairs` (a flat pair without a count is still `Pairs`).
    ZPop {
        /// ZPOPMAX.
        max: bool,
        /// How many (1 when absent).
        count: u64,
    },
    /// ZRANDMEMBER → `Bulk`/`Nil` without a count, `Array` or `Pairs` with one.
    ZRandMember {
        /// Negative: may repeat.
        count: Option<i64>,
        /// With the scores.
        with_scores: bool,
    },

    /// LPUSH, RPUSH, LPUSHX, RPUSHX → `Integer` (the new length).
    Push {
        /// At the head.
        left: bool,
        /// The elements, pushed one after the other.
        values: Vec<ByteBuf>,
        /// Only onto an existing list.
        if_exists: bool,
    },
    /// LPOP, RPOP → `Bulk`/`Nil` without a count, `Array`/`NilArray` with one.
    Pop {
        /// From the head.
        left: bool,
        /// How many.
        count: Option<u64>,
    },
    /// LMOVE, RPOPLPUSH: pops from one end of this list and pushes onto one end of the
    /// list `to`, a key of the same worker → `Bulk`/`Nil`.
    LMove {
        /// The destination list.
        to: crate::frame::Key,
        /// Pop from the head.
        from_left: bool,
        /// Push at the head.
        to_left: bool,
    },
    /// LINDEX → `Bulk`/`Nil`.
    LIndex {
        /// Negative counts from the end.
        index: i64,
    },
    /// LSET → `Ok`.
    LSet {
        /// Negative counts from the end.
        index: i64,
        /// The new element.
        value: ByteBuf,
    },
    /// LRANGE → `Array`.
    LRange {
        /// First index, inclusive.
        start: i64,
        /// Last index, inclusive.
        stop: i64,
    },
    /// LTRIM → `Ok`.
    LTrim {
        /// First index kept.
        start: i64,
        /// Last index kept.
        stop: i64,
    },
    /// LREM → `Integer`.
    LRem {
        /// How many (negative: from the tail; 0: all).
        count: i64,
        /// The element to remove.
        value: ByteBuf,
    },
    /// LINSERT → `Integer` (the new length, -1 without the pivot, 0 without the list).
    LInsert {
        /// Before the pivot.
        before: bool,
        /// The element to insert next to.
        pivot: ByteBuf,
        /// The new element.
        value: ByteBuf,
    },
    /// LPOS → `Integer`/`Nil` without a count, `Array` with one.
    LPos {
        /// The element.
        value: ByteBuf,
        /// Which match to start at (negative: from the tail).
        rank: i64,
        /// How many matches (0: all).
        count: Option<u64>,
        /// How many elements to compare at most (0: all).
        max_len: u64,
    },
}

impl TypedOp {
    /// Whether the command may change the key.
    pub fn is_write(&self) -> bool {
        use TypedOp::*;
        matches!(
            self,
            HSet { .. }
                | HDel { .. }
                | HIncrBy { .. }
                | HIncrByFloat { .. }
                | SAdd { .. }
                | SRem { .. }
                | SPop { .. }
                | ZAdd { .. }
                | ZRem { .. }
                | ZRemRange { .. }
                | ZPop { .. }
                | Push { .. }
                | Pop { .. }
                | LSet { .. }
                | LTrim { .. }
                | LRem { .. }
                | LInsert { .. }
                | SMove { .. }
                | LMove { .. }
        )
    }

    /// The second key of a command on two keys of one worker (SMOVE, LMOVE).
    pub fn other_key(&self) -> Option<&crate::frame::Key> {
        match self {
            TypedOp::SMove { to, .. } | TypedOp::LMove { to, .. } => Some(to),
            _ => None,
        }
    }

    /// Bytes of elements the command writes (what it may need on disk).
    pub fn payload_bytes(&self) -> usize {
        use TypedOp::*;
        match self {
            HSet { pairs, .. } => pairs.iter().map(|(f, v)| f.len() + v.len()).sum(),
            SAdd { members } => members.iter().map(|m| m.len()).sum(),
            ZAdd { pairs, .. } => pairs.iter().map(|(_, m)| 2 * m.len() + 16).sum(),
            Push { values, .. } => values.iter().map(|v| v.len()).sum(),
            LSet { value, .. } | LInsert { value, .. } => value.len(),
            _ => 0,
        }
    }
}

/// What a worker answers to a `Typed` request: a reply tree that the net-daemon
/// renders in the client's protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Answer {
    /// `+OK`.
    Ok,
    /// A status line (TYPE's answer).
    Status(String),
    /// A missing value.
    Nil,
    /// A missing array (`*-1` in RESP2).
    NilArray,
    /// An integer.
    Integer(i64),
    /// A byte string.
    Bulk(ByteBuf),
    /// A score.
    Double(f64),
    /// An array.
    Array(Vec<Answer>),
    /// Pairs: a flat array in RESP2, an array of 2-arrays in RESP3 (ZRANGE WITHSCORES)
    /// or a map when `map` (HGETALL).
    Pairs {
        /// The pairs.
        pairs: Vec<(Answer, Answer)>,
        /// A map in RESP3.
        map: bool,
    },
}

impl Answer {
    /// A byte string.
    pub fn bulk(bytes: impl Into<Vec<u8>>) -> Answer {
        Answer::Bulk(ByteBuf::from(bytes.into()))
    }
}

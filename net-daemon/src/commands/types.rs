//! Commands on hashes, sets, sorted sets and lists: their arguments are parsed and
//! checked here, and each becomes one [`TypedOp`] for the worker that owns the key,
//! which applies it atomically. [`Shape`] turns the worker's [`Answer`] into the reply
//! the command gives. Commands over several keys (SINTER, ZUNION, SMOVE, LMOVE, ...)
//! are in [`super::typed_multi`].

use bytes::Bytes;
use serde_bytes::ByteBuf;
use shoal_shared::frame::{
    Answer, LexBound, RangeBy, ScoreBound, TypedOp, WorkerRequest, WorkerResponse, ZAddFlags,
    ZRange,
};
use shoal_shared::layout::typed::Kind;
use shoal_shared::resp::{parse_i64, Reply};

use super::strings::single;
use super::{Merge, Pending, Session};
use crate::errors;
use crate::state::Shared;

/// How a worker's answer becomes the command's reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// As it is.
    Plain,
    /// The first element of an array answer (HGET, SISMEMBER, ZSCORE).
    First,
    /// `+OK` in place of a count (HMSET).
    Done,
    /// Pairs as one flat array in every protocol (ZPOPMIN without a count).
    Flat,
}

impl Shape {
    /// The reply for a worker's response.
    pub fn reply(self, response: WorkerResponse) -> Reply {
        match response {
            WorkerResponse::Answer(answer) => match (self, answer) {
                (Shape::First, Answer::Array(items)) => {
                    items.into_iter().next().map_or(Reply::Nil, answer_reply)
                }
                (Shape::Done, _) => Reply::Ok,
                (Shape::Flat, Answer::Pairs { pairs, .. }) => Reply::Array(
                    pairs
                        .into_iter()
                        .flat_map(|(a, b)| [answer_reply(a), answer_reply(b)])
                        .collect(),
                ),
                (_, answer) => answer_reply(answer),
            },
            WorkerResponse::Error(error) => errors::worker_error(&error),
            other => super::response_reply(other),
        }
    }
}

/// A worker's answer as a reply.
pub fn answer_reply(answer: Answer) -> Reply {
    match answer {
        Answer::Ok => Reply::Ok,
        Answer::Status(text) => Reply::Simple(text),
        Answer::Nil => Reply::Nil,
        Answer::NilArray => Reply::NilArray,
        Answer::Integer(n) => Reply::Integer(n),
        Answer::Bulk(bytes) => Reply::Bulk(bytes.into_vec().into()),
        Answer::Double(value) => Reply::Double(value),
        Answer::Array(items) => Reply::Array(items.into_iter().map(answer_reply).collect()),
        Answer::Pairs { pairs, map } => {
            let pairs = pairs
                .into_iter()
                .map(|(a, b)| (answer_reply(a), answer_reply(b)))
                .collect();
            match map {
                true => Reply::Map(pairs),
                false => Reply::Pairs(pairs),
            }
        }
    }
}

/// Sends `op` on the key `key` to its owner.
pub async fn run(
    shared: &Shared,
    session: &Session,
    key: &Bytes,
    op: TypedOp,
    shape: Shape,
) -> Pending {
    let collection = session.collection;
    let pending = single(shared, key, |key| WorkerRequest::Typed {
        collection,
        key,
        op,
    })
    .await;
    match pending {
        Pending::Calls { calls, .. } => Pending::Calls {
            calls,
            merge: Merge::Answer(shape),
        },
        other => other,
    }
}

fn buf(arg: &Bytes) -> ByteBuf {
    ByteBuf::from(arg.to_vec())
}

fn bufs(args: &[Bytes]) -> Vec<ByteBuf> {
    args.iter().map(buf).collect()
}

fn integer(arg: &Bytes) -> Result<i64, Reply> {
    parse_i64(arg).ok_or_else(errors::not_integer)
}

/// A count that must be a non-negative integer (`ERR value is out of range, must be
/// positive` otherwise, as Redis answers).
fn positive(arg: &Bytes) -> Result<u64, Reply> {
    match parse_i64(arg) {
        Some(n) if n >= 0 => Ok(n as u64),
        _ => Err(Reply::error("ERR value is out of range, must be positive")),
    }
}

/// C's `strtod` on `arg`: the value, whether all of `arg` was read, and whether it was out
/// of range (ERANGE). `None` when `arg` holds a NUL byte (C cannot read past it).
fn strtod(arg: &[u8]) -> Option<(f64, bool, bool)> {
    let text = std::ffi::CString::new(arg).ok()?;
    let mut end: *mut libc::c_char = std::ptr::null_mut();
    // SAFETY: `text` is NUL-terminated and outlives the call; `end` receives a pointer
    // into it; errno is this thread's.
    let (value, errno) = unsafe {
        *libc::__errno_location() = 0;
        let value = libc::strtod(text.as_ptr(), &mut end);
        (value, *libc::__errno_location())
    };
    let read = end as usize - text.as_ptr() as usize;
    Some((value, read == arg.len(), errno == libc::ERANGE))
}

/// A score as Redis reads a ZADD or ZINCRBY argument: all of it a float (`inf` too),
/// not empty, no leading space, not out of range, never NaN.
pub fn score(arg: &[u8]) -> Option<f64> {
    let (value, whole, out_of_range) = strtod(arg)?;
    let overflow = out_of_range && (value.is_infinite() || value == 0.0);
    let valid = !arg.is_empty() && !arg[0].is_ascii_whitespace() && whole && !overflow;
    (valid && !value.is_nan()).then_some(value)
}

/// One end of a score range as Redis reads it: `(` for exclusive, then anything C's
/// strtod reads whole (an empty string is 0), never NaN.
fn score_bound(arg: &[u8]) -> Result<ScoreBound, Reply> {
    let (text, exclusive) = match arg.strip_prefix(b"(") {
        Some(rest) => (rest, true),
        None => (arg, false),
    };
    match strtod(text) {
        Some((value, true, _)) if !value.is_nan() => Ok(ScoreBound { value, exclusive }),
        _ => Err(Reply::error("ERR min or max is not a float")),
    }
}

fn lex_bound(arg: &[u8]) -> Result<LexBound, Reply> {
    match arg {
        b"-" => Ok(LexBound::Min),
        b"+" => Ok(LexBound::Max),
        [b'[', rest @ ..] => Ok(LexBound::Inclusive(ByteBuf::from(rest.to_vec()))),
        [b'(', rest @ ..] => Ok(LexBound::Exclusive(ByteBuf::from(rest.to_vec()))),
        _ => Err(Reply::error("ERR min or max not valid string range item")),
    }
}

fn is(arg: &Bytes, word: &str) -> bool {
    arg.eq_ignore_ascii_case(word.as_bytes())
}

/// Runs `name` if it is a command on one typed key; `None` otherwise. Arity is checked.
pub async fn dispatch(
    shared: &std::sync::Arc<Shared>,
    session: &Session,
    name: &str,
    args: &[Bytes],
) -> Option<Pending> {
    // LINDEX and LSET look the key up before they read the index, as Redis does.
    if matches!(name, "lindex" | "lset") && parse_i64(&args[2]).is_none() {
        let missing = match name {
            "lindex" => Reply::Nil,
            _ => Reply::error("ERR no such key"),
        };
        let probe = run(shared, session, &args[1], TypedOp::Type, Shape::Plain).await;
        return Some(Pending::barrier(async move {
            match probe.resolve().await {
                Reply::Simple(kind) if kind == "list" => errors::not_integer(),
                Reply::Simple(kind) if kind == "none" => missing,
                Reply::Simple(_) => errors::wrong_type(),
                other => other,
            }
        }));
    }
    if let Some(kind) = match name {
        "hscan" => Some(Kind::Hash),
        "sscan" => Some(Kind::Set),
        "zscan" => Some(Kind::SortedSet),
        _ => None,
    } {
        return Some(scan(shared, session, kind, args).await);
    }
    let parsed = match parse(name, args) {
        None => return None,
        Some(Ok(parsed)) => parsed,
        Some(Err(reply)) => return Some(Pending::Ready(reply)),
    };
    let (op, shape) = parsed;
    Some(run(shared, session, &args[1], op, shape).await)
}

type Parsed = Result<(TypedOp, Shape), Reply>;

/// The op and reply shape of a one-key typed command; `None` if `name` is not one.
fn parse(name: &str, args: &[Bytes]) -> Option<Parsed> {
    use Shape::*;
    use TypedOp::*;
    let plain = |op| Ok((op, Plain));
    Some(match name {
        "type" => plain(Type),
        "hlen" => plain(Len(Kind::Hash)),
        "scard" => plain(Len(Kind::Set)),
        "zcard" => plain(Len(Kind::SortedSet)),
        "llen" => plain(Len(Kind::List)),

        "hset" | "hmset" => {
            if !args.len().is_multiple_of(2) {
                return Some(Err(errors::wrong_arity(name)));
            }
            let pairs = args[2..]
                .chunks(2)
                .map(|p| (buf(&p[0]), buf(&p[1])))
                .collect();
            let op = HSet {
                pairs,
                if_absent: false,
            };
            Ok((op, if name == "hmset" { Done } else { Plain }))
        }
        "hsetnx" => plain(HSet {
            pairs: vec![(buf(&args[2]), buf(&args[3]))],
            if_absent: true,
        }),
        "hget" => Ok((
            HGet {
                fields: bufs(&args[2..3]),
            },
            First,
        )),
        "hmget" => plain(HGet {
            fields: bufs(&args[2..]),
        }),
        "hdel" => plain(HDel {
            fields: bufs(&args[2..]),
        }),
        "hexists" => plain(HExists {
            field: buf(&args[2]),
        }),
        "hstrlen" => plain(HStrLen {
            field: buf(&args[2]),
        }),
        "hgetall" => plain(HGetAll {
            fields: true,
            values: true,
        }),
        "hkeys" => plain(HGetAll {
            fields: true,
            values: false,
        }),
        "hvals" => plain(HGetAll {
            fields: false,
            values: true,
        }),
        "hincrby" => integer(&args[3]).map(|delta| {
            (
                HIncrBy {
                    field: buf(&args[2]),
                    delta,
                },
                Plain,
            )
        }),
        "hincrbyfloat" => plain(HIncrByFloat {
            field: buf(&args[2]),
            increment: buf(&args[3]),
        }),
        "hrandfield" => random_count(args, "withvalues")
            .map(|(count, with_values)| (HRandField { count, with_values }, Plain)),

        "sadd" => plain(SAdd {
            members: bufs(&args[2..]),
        }),
        "srem" => plain(SRem {
            members: bufs(&args[2..]),
        }),
        "sismember" => {
            if args.len() != 3 {
                return Some(Err(errors::wrong_arity(name)));
            }
            Ok((
                SIsMember {
                    members: bufs(&args[2..]),
                },
                First,
            ))
        }
        "smismember" => plain(SIsMember {
            members: bufs(&args[2..]),
        }),
        "smembers" => plain(Members(Kind::Set)),
        "srandmember" => match args.len() {
            2 => plain(SRandMember { count: None }),
            3 => {
                random_pick_count(&args[2]).map(|count| (SRandMember { count: Some(count) }, Plain))
            }
            _ => Err(errors::syntax()),
        },
        "spop" => match args.len() {
            2 => plain(SPop { count: None }),
            3 => positive(&args[2]).map(|count| (SPop { count: Some(count) }, Plain)),
            _ => Err(errors::syntax()),
        },

        "zadd" => zadd(args),
        "zincrby" => match score(&args[2]) {
            None => Err(errors::not_float()),
            Some(increment) => plain(ZAdd {
                flags: ZAddFlags {
                    incr: true,
                    ..ZAddFlags::default()
                },
                pairs: vec![(increment, buf(&args[3]))],
            }),
        },
        "zrem" => plain(ZRem {
            members: bufs(&args[2..]),
        }),
        "zscore" => Ok((
            ZScore {
                members: bufs(&args[2..3]),
            },
            First,
        )),
        "zmscore" => plain(ZScore {
            members: bufs(&args[2..]),
        }),
        "zrank" | "zrevrank" => plain(ZRank {
            member: buf(&args[2]),
            reverse: name == "zrevrank",
        }),
        "zcount" => score_bound(&args[2]).and_then(|min| {
            Ok((
                ZCount {
                    range: RangeBy::Score(min, score_bound(&args[3])?),
                },
                Plain,
            ))
        }),
        "zlexcount" => lex_bound(&args[2]).and_then(|min| {
            Ok((
                ZCount {
                    range: RangeBy::Lex(min, lex_bound(&args[3])?),
                },
                Plain,
            ))
        }),
        "zrange" | "zrangebyscore" | "zrevrangebyscore" | "zrangebylex" | "zrevrangebylex"
        | "zrevrange" => {
            zrange(name, args).map(|(range, with_scores)| (ZRange { range, with_scores }, Plain))
        }
        "zremrangebyrank" => integer(&args[2]).and_then(|start| {
            Ok((
                ZRemRange {
                    range: RangeBy::Rank(start, integer(&args[3])?),
                },
                Plain,
            ))
        }),
        "zremrangebyscore" => score_bound(&args[2]).and_then(|min| {
            Ok((
                ZRemRange {
                    range: RangeBy::Score(min, score_bound(&args[3])?),
                },
                Plain,
            ))
        }),
        "zremrangebylex" => lex_bound(&args[2]).and_then(|min| {
            Ok((
                ZRemRange {
                    range: RangeBy::Lex(min, lex_bound(&args[3])?),
                },
                Plain,
            ))
        }),
        "zpopmin" | "zpopmax" => {
            let max = name == "zpopmax";
            match args.len() {
                2 => Ok((ZPop { max, count: 1 }, Flat)),
                3 => positive(&args[2]).map(|count| (ZPop { max, count }, Plain)),
                _ => Err(errors::syntax()),
            }
        }
        "zrandmember" => random_count(args, "withscores")
            .map(|(count, with_scores)| (ZRandMember { count, with_scores }, Plain)),

        "lpush" | "rpush" | "lpushx" | "rpushx" => plain(Push {
            left: name.starts_with('l'),
            values: bufs(&args[2..]),
            if_exists: name.ends_with('x'),
        }),
        "lpop" | "rpop" => {
            let left = name == "lpop";
            match args.len() {
                2 => plain(Pop { left, count: None }),
                3 => positive(&args[2]).map(|count| {
                    (
                        Pop {
                            left,
                            count: Some(count),
                        },
                        Plain,
                    )
                }),
                _ => Err(errors::syntax()),
            }
        }
        "lindex" => integer(&args[2]).map(|index| (LIndex { index }, Plain)),
        "lset" => integer(&args[2]).map(|index| {
            (
                LSet {
                    index,
                    value: buf(&args[3]),
                },
                Plain,
            )
        }),
        "lrange" => integer(&args[2]).and_then(|start| {
            Ok((
                LRange {
                    start,
                    stop: integer(&args[3])?,
                },
                Plain,
            ))
        }),
        "ltrim" => integer(&args[2]).and_then(|start| {
            Ok((
                LTrim {
                    start,
                    stop: integer(&args[3])?,
                },
                Plain,
            ))
        }),
        "lrem" => integer(&args[2]).map(|count| {
            (
                LRem {
                    count,
                    value: buf(&args[3]),
                },
                Plain,
            )
        }),
        "linsert" => {
            let before = match &args[2] {
                a if is(a, "before") => true,
                a if is(a, "after") => false,
                _ => return Some(Err(errors::syntax())),
            };
            plain(LInsert {
                before,
                pivot: buf(&args[3]),
                value: buf(&args[4]),
            })
        }
        "lpos" => lpos(args),
        _ => return None,
    })
}

/// Most picks a random-member command returns when it may repeat (a negative count).
const MAX_RANDOM_PICKS: i64 = 1 << 24;

/// The count of SRANDMEMBER, HRANDFIELD and ZRANDMEMBER: within Redis's range, and no more
/// repeated picks than [`MAX_RANDOM_PICKS`].
fn random_pick_count(arg: &Bytes) -> Result<i64, Reply> {
    match integer(arg)? {
        i64::MIN => Err(Reply::error(
            "ERR value is out of range, value must between -9223372036854775807 and 9223372036854775807",
        )),
        count if count < -MAX_RANDOM_PICKS => Err(Reply::error(format!(
            "ERR count is out of range: at most {MAX_RANDOM_PICKS} repeated picks"
        ))),
        count => Ok(count),
    }
}

/// `[count [WITH...]]` of HRANDFIELD and ZRANDMEMBER.
fn random_count(args: &[Bytes], with: &str) -> Result<(Option<i64>, bool), Reply> {
    match args.len() {
        2 => Ok((None, false)),
        3 => Ok((Some(random_pick_count(&args[2])?), false)),
        4 if is(&args[3], with) => {
            let count = random_pick_count(&args[2])?;
            // Redis refuses counts whose doubled reply would overflow.
            if count.checked_mul(2).is_none() {
                return Err(Reply::error("ERR value is out of range"));
            }
            Ok((Some(count), true))
        }
        _ => Err(errors::syntax()),
    }
}

fn zadd(args: &[Bytes]) -> Parsed {
    let mut flags = ZAddFlags::default();
    let mut at = 2;
    while at < args.len() {
        let arg = &args[at];
        match () {
            _ if is(arg, "nx") => flags.nx = true,
            _ if is(arg, "xx") => flags.xx = true,
            _ if is(arg, "gt") => flags.gt = true,
            _ if is(arg, "lt") => flags.lt = true,
            _ if is(arg, "ch") => flags.ch = true,
            _ if is(arg, "incr") => flags.incr = true,
            _ => break,
        }
        at += 1;
    }
    let rest = &args[at..];
    if rest.is_empty() || !rest.len().is_multiple_of(2) {
        return Err(errors::syntax());
    }
    if flags.nx && flags.xx {
        return Err(Reply::error(
            "ERR XX and NX options at the same time are not compatible",
        ));
    }
    if (flags.nx && (flags.gt || flags.lt)) || (flags.gt && flags.lt) {
        return Err(Reply::error(
            "ERR GT, LT, and/or NX options at the same time are not compatible",
        ));
    }
    if flags.incr && rest.len() > 2 {
        return Err(Reply::error(
            "ERR INCR option supports a single increment-element pair",
        ));
    }
    let mut pairs = Vec::with_capacity(rest.len() / 2);
    for pair in rest.chunks(2) {
        let value = score(&pair[0]).ok_or_else(errors::not_float)?;
        pairs.push((value, buf(&pair[1])));
    }
    Ok((TypedOp::ZAdd { flags, pairs }, Shape::Plain))
}

/// ZRANGE in all its forms: the range (bounds low end first) and WITHSCORES.
pub fn zrange(name: &str, args: &[Bytes]) -> Result<(ZRange, bool), Reply> {
    enum By {
        Rank,
        Score,
        Lex,
    }
    let (mut by, mut reverse) = match name {
        "zrangebyscore" => (By::Score, false),
        "zrevrangebyscore" => (By::Score, true),
        "zrangebylex" => (By::Lex, false),
        "zrevrangebylex" => (By::Lex, true),
        "zrevrange" => (By::Rank, true),
        _ => (By::Rank, false),
    };
    // Only ZRANGE takes REV and BY*, each once, as Redis parses them.
    let (mut direction_open, mut by_open) = (name == "zrange", name == "zrange");
    let (mut with_scores, mut limit) = (false, None);
    let mut at = 4;
    while at < args.len() {
        let arg = &args[at];
        if is(arg, "withscores") {
            with_scores = true;
        } else if is(arg, "limit") && at + 2 < args.len() {
            limit = Some((integer(&args[at + 1])?, integer(&args[at + 2])?));
            at += 2;
        } else if direction_open && is(arg, "rev") {
            reverse = true;
            direction_open = false;
        } else if by_open && is(arg, "bylex") {
            by = By::Lex;
            by_open = false;
        } else if by_open && is(arg, "byscore") {
            by = By::Score;
            by_open = false;
        } else {
            return Err(errors::syntax());
        }
        at += 1;
    }
    if limit.is_some() && matches!(by, By::Rank) {
        return Err(Reply::error(
            "ERR syntax error, LIMIT is only supported in combination with either BYSCORE or BYLEX",
        ));
    }
    if with_scores && matches!(by, By::Lex) {
        return Err(Reply::error(
            "ERR syntax error, WITHSCORES not supported in combination with BYLEX",
        ));
    }
    // The reversed score and lex forms take the high end first.
    let (low, high) = match reverse {
        true => (&args[3], &args[2]),
        false => (&args[2], &args[3]),
    };
    let by = match by {
        // Ranks are not swapped: ZREVRANGE 0 1 is the first two from the top.
        By::Rank => RangeBy::Rank(integer(&args[2])?, integer(&args[3])?),
        By::Score => RangeBy::Score(score_bound(low)?, score_bound(high)?),
        By::Lex => RangeBy::Lex(lex_bound(low)?, lex_bound(high)?),
    };
    Ok((ZRange { by, reverse, limit }, with_scores))
}

fn lpos(args: &[Bytes]) -> Parsed {
    let (mut rank, mut count, mut max_len) = (1, None, 0);
    let mut at = 3;
    while at < args.len() {
        let Some(value) = args.get(at + 1) else {
            return Err(errors::syntax());
        };
        let arg = &args[at];
        if is(arg, "rank") {
            rank = integer(value)?;
            // Redis negates the rank to walk from the tail; the lowest one stays negative
            // and then takes the first match from the tail.
            if rank == i64::MIN {
                rank = -1;
            }
            if rank == 0 {
                return Err(Reply::error("ERR RANK can't be zero: use 1 to start from the first match, 2 from the second ... or use negative to start from the end of the list"));
            }
        } else if is(arg, "count") {
            match parse_i64(value) {
                Some(n) if n >= 0 => count = Some(n as u64),
                _ => return Err(Reply::error("ERR COUNT can't be negative")),
            }
        } else if is(arg, "maxlen") {
            match parse_i64(value) {
                Some(n) if n >= 0 => max_len = n as u64,
                _ => return Err(Reply::error("ERR MAXLEN can't be negative")),
            }
        } else {
            return Err(errors::syntax());
        }
        at += 2;
    }
    Ok((
        TypedOp::LPos {
            value: buf(&args[2]),
            rank,
            count,
            max_len,
        },
        Shape::Plain,
    ))
}

/// `HSCAN|SSCAN|ZSCAN key cursor [MATCH pattern] [COUNT count]`: a page of the key's
/// elements in stored order. The cursor names the last element returned (kept in the
/// SCAN cursor table); a cursor the table has dropped starts over, so an element present
/// for the whole iteration is still returned at least once.
async fn scan(
    shared: &std::sync::Arc<Shared>,
    session: &Session,
    kind: Kind,
    args: &[Bytes],
) -> Pending {
    let Some(cursor) = std::str::from_utf8(&args[2])
        .ok()
        .and_then(|c| c.parse::<u64>().ok())
    else {
        return Pending::Ready(Reply::error("ERR invalid cursor"));
    };
    let (mut pattern, mut count) = (None, 10u32);
    let mut options = args[3..].iter();
    while let Some(option) = options.next() {
        let Some(value) = options.next() else {
            return Pending::Ready(errors::syntax());
        };
        if is(option, "match") {
            pattern = Some(buf(value));
        } else if is(option, "count") {
            match parse_i64(value) {
                Some(n) if n >= 1 => count = n.min(100_000) as u32,
                Some(_) => return Pending::Ready(errors::syntax()),
                None => return Pending::Ready(errors::not_integer()),
            }
        } else {
            return Pending::Ready(errors::syntax());
        }
    }
    let Some(position) = shared.scan_cursors.load(cursor, 1) else {
        return Pending::Ready(Reply::error("ERR invalid cursor"));
    };
    let after = position.after.and_then(|after| {
        after
            .get(2..)
            .map(|element| ByteBuf::from(element.to_vec()))
    });
    let op = TypedOp::Scan {
        kind,
        after,
        count,
        pattern,
        no_values: false,
    };
    let page = run(shared, session, &args[1], op, Shape::Plain).await;
    let shared = std::sync::Arc::clone(shared);
    Pending::barrier(async move {
        match page.resolve().await {
            Reply::Array(mut parts) if parts.len() == 2 => {
                let items = parts.pop().unwrap_or(Reply::Nil);
                let next = match parts.pop() {
                    Some(Reply::Bulk(last)) => {
                        let after = [&[0u8, 0][..], &last[..]].concat();
                        let position = crate::cursors::ScanPosition {
                            worker: 0,
                            after: Some(after),
                        };
                        shared.scan_cursors.save(&position).to_string()
                    }
                    _ => "0".to_string(),
                };
                // Scores are strings in a SCAN page, in both protocols.
                let items = match items {
                    Reply::Array(items) => items
                        .into_iter()
                        .map(|item| match item {
                            Reply::Double(score) => {
                                Reply::bulk(shoal_shared::resp::format_double(score))
                            }
                            other => other,
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                Reply::Array(vec![Reply::bulk(next), Reply::Array(items)])
            }
            other => other,
        }
    })
}

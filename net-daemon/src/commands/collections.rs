//! Commands on several typed keys: set algebra (SINTER, SUNION, SDIFF and their
//! STORE and CARD forms), sorted-set algebra (ZUNION, ZINTER, ZDIFF, their STORE forms,
//! ZINTERCARD, ZRANGESTORE), moves between keys (SMOVE, LMOVE, RPOPLPUSH), pops from
//! the first non-empty key (LMPOP, ZMPOP) and the blocking pops (BLPOP, BRPOP, BLMOVE,
//! BRPOPLPUSH, BLMPOP, BZPOPMIN, BZPOPMAX, BZMPOP).
//!
//! - The algebra reads each source key from its owner and computes here; a STORE form
//!   then replaces the destination in one write. The sources are read as of one instant
//!   ([`whole_reads`]).
//! - A move is one atomic request when both keys are on one worker; across workers (or
//!   hosts) it is a dry run at each and one two-phase commit of both, like an EXEC
//!   across workers (see `transaction`).
//! - A blocking pop tries its keys in order and, while all are empty, tries again every
//!   few milliseconds until its timeout; so it works whichever worker or host owns each
//!   key.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_bytes::ByteBuf;
use shoal_shared::frame::{versions, Answer, TxAction, TxOp, TypedOp, WorkerRequest};
use shoal_shared::layout::typed::{score_bytes, Kind};
use shoal_shared::resp::{parse_i64, Reply};

use super::types::{run, Shape};
use super::{Pending, Session};
use crate::errors;
use crate::state::Shared;
use crate::whole_reads;

/// How often a blocked pop tries again a key on another host (whose commits this host
/// does not see), at first and after a second.
const BLOCKED_RETRY_FIRST: Duration = Duration::from_millis(5);
const BLOCKED_RETRY_LATER: Duration = Duration::from_millis(25);

/// Runs `name` if it is a command of this module; `None` otherwise. Arity is checked.
pub async fn dispatch(
    shared: &Arc<Shared>,
    session: &Session,
    name: &str,
    args: &[Bytes],
) -> Option<Pending> {
    let collection = session.collection;
    let shared = Arc::clone(shared);
    let args = args.to_vec();
    let work = match name {
        "sinter" | "sunion" | "sdiff" => {
            let op = name.to_string();
            async move { set_algebra(shared, collection, &op, args, None).await }.boxed()
        }
        "sinterstore" | "sunionstore" | "sdiffstore" => {
            let dest = args[1].clone();
            let op = name[..name.len() - 5].to_string();
            async move { set_algebra(shared, collection, &op, args[1..].to_vec(), Some(dest)).await }.boxed()
        }
        "sintercard" => sintercard(shared, collection, args).boxed(),
        "smove" => return Some(smove(&shared, session, &args).await),
        "lmove" | "rpoplpush" => return Some(lmove(&shared, session, name, &args).await),
        "zunion" | "zinter" | "zdiff" => {
            let op = name.to_string();
            async move { zset_algebra(shared, collection, &op, args, None).await }.boxed()
        }
        "zunionstore" | "zinterstore" | "zdiffstore" => {
            let dest = args[1].clone();
            let op = name[..name.len() - 5].to_string();
            async move { zset_algebra(shared, collection, &op, args[1..].to_vec(), Some(dest)).await }.boxed()
        }
        "zintercard" => zintercard(shared, collection, args).boxed(),
        "zrangestore" => zrangestore(shared, collection, args).boxed(),
        "lmpop" | "zmpop" => {
            let name = name.to_string();
            async move {
                match mpop(&name, &args[1..]) {
                    Ok(pop) => pop
                        .attempt(&shared, collection, &pop.keys)
                        .await
                        .unwrap_or(Reply::NilArray),
                    Err(reply) => reply,
                }
            }
            .boxed()
        }
        "blpop" | "brpop" | "bzpopmin" | "bzpopmax" | "blmpop" | "bzmpop" | "blmove"
        | "brpoplpush" => return Some(Pending::Blocking(blocking(shared, session.db, name, args))),
        _ => return None,
    };
    Some(Pending::Barrier(work))
}

type Work = std::pin::Pin<Box<dyn std::future::Future<Output = Reply> + Send>>;

trait Boxed {
    fn boxed(self) -> Work;
}

impl<F: std::future::Future<Output = Reply> + Send + 'static> Boxed for F {
    fn boxed(self) -> Work {
        Box::pin(self)
    }
}

/// A session view for reads issued from a barrier.
fn session_for(collection: u16) -> Session {
    let mut session = Session::new(0, true);
    session.collection = collection;
    session
}

/// The members of each set `keys` names (a missing key is empty), each read on its own
/// (a caller reads them whole, see [`whole_reads`]), or the error reply.
async fn read_sets(
    shared: &Shared,
    collection: u16,
    keys: &[Bytes],
) -> Result<Vec<BTreeSet<Bytes>>, Reply> {
    let session = session_for(collection);
    let mut reads = Vec::with_capacity(keys.len());
    for key in keys {
        reads.push(
            run(
                shared,
                &session,
                key,
                TypedOp::Members(Kind::Set),
                Shape::Plain,
            )
            .await,
        );
    }
    let mut sets = Vec::with_capacity(keys.len());
    for read in reads {
        match read.resolve().await {
            Reply::Array(items) => sets.push(
                items
                    .into_iter()
                    .filter_map(|item| match item {
                        Reply::Bulk(member) => Some(member),
                        _ => None,
                    })
                    .collect(),
            ),
            other => return Err(other),
        }
    }
    Ok(sets)
}

fn combine_sets(op: &str, sets: Vec<BTreeSet<Bytes>>) -> BTreeSet<Bytes> {
    let mut sets = sets.into_iter();
    let first = sets.next().unwrap_or_default();
    match op {
        "sinter" => sets.fold(first, |acc, set| acc.intersection(&set).cloned().collect()),
        "sunion" => sets.fold(first, |mut acc, set| {
            acc.extend(set);
            acc
        }),
        _ => sets.fold(first, |acc, set| acc.difference(&set).cloned().collect()),
    }
}

/// SINTER, SUNION, SDIFF, and with `store` their STORE forms (`args[0]` is the name or
/// the destination; the sources follow).
async fn set_algebra(
    shared: Arc<Shared>,
    collection: u16,
    op: &str,
    args: Vec<Bytes>,
    store: Option<Bytes>,
) -> Reply {
    let sources = &args[1..];
    let read = || read_sets(&shared, collection, sources);
    match store {
        None => match whole_reads::read_whole(&shared.dispatch, collection, sources, read).await {
            Ok(sets) => Reply::Array(
                combine_sets(op, sets)
                    .into_iter()
                    .map(Reply::Bulk)
                    .collect(),
            ),
            Err(reply) => reply,
        },
        Some(dest) => {
            let compute = |sets| {
                let members = combine_sets(op, sets).into_iter();
                let elements = members.map(|m| (m.to_vec(), Vec::new())).collect();
                Ok(Stored::Collection(Kind::Set, elements))
            };
            self::store(&shared, collection, sources, &dest, read, compute).await
        }
    }
}

/// What the destination of a STORE form becomes.
pub enum Stored {
    /// A typed key of these elements (`layout::typed::encode_snapshot`); deleted when
    /// there are none.
    Collection(Kind, Vec<(Vec<u8>, Vec<u8>)>),
    /// A string (BITOP); deleted when empty.
    String(Vec<u8>),
}

impl Stored {
    fn len(&self) -> usize {
        match self {
            Stored::Collection(_, elements) => elements.len(),
            Stored::String(value) => value.len(),
        }
    }

    fn action(self) -> TxAction {
        if self.len() == 0 {
            return TxAction::Delete;
        }
        match self {
            Stored::Collection(kind, elements) => TxAction::PutCollection {
                snapshot: shoal_shared::layout::typed::encode_snapshot(kind, &elements),
                expires_at_ms: None,
                if_absent: false,
            },
            Stored::String(value) => TxAction::Put {
                value,
                expires_at_ms: None,
                if_absent: false,
            },
        }
    }
}

/// A STORE form (SINTERSTORE, ZUNIONSTORE, ZRANGESTORE, SORT ... STORE, BITOP, ...) as one
/// atomic change: `read` reads `sources` whole ([`whole_reads::read_whole_at`]), `compute`
/// makes the destination's new content of what it read, and the write of `dest` expects
/// every source unchanged since (one `Atomic` when all the keys are on one worker, else
/// two-phase commit). When a source changed in between, it all runs again, at most
/// `MAX_PLANS` times. Answers the length of what was stored.
pub async fn store<T, F, Fut>(
    shared: &Shared,
    collection: u16,
    sources: &[Bytes],
    dest: &Bytes,
    mut read: F,
    mut compute: impl FnMut(T) -> Result<Stored, Reply>,
) -> Reply
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Reply>>,
{
    use super::transaction::{backoff, commit, hold, kept_changing, MAX_PLANS};
    for attempt in 0..MAX_PLANS {
        backoff(attempt).await;
        let _held = hold(shared, attempt, || {
            let keys = sources.iter().chain(std::iter::once(dest));
            keys.map(|key| (collection, key.clone())).collect()
        });
        let (found, versions) = match whole_reads::read_whole_at(
            &shared.dispatch,
            collection,
            sources,
            &mut read,
        )
        .await
        {
            Ok(read) => read,
            Err(reply) => return reply,
        };
        let stored = match compute(found) {
            Ok(stored) => stored,
            Err(reply) => return reply,
        };
        let count = stored.len() as i64;
        let mut ops = Vec::with_capacity(sources.len() + 1);
        let mut expected: Vec<&Bytes> = Vec::with_capacity(sources.len());
        for (source, version) in sources.iter().zip(versions) {
            if expected.contains(&source) {
                continue;
            }
            expected.push(source);
            let commit_id = versions::expected_commit_id(version);
            match op(shared, collection, source, TxAction::Expect { commit_id }) {
                Ok(op) => ops.push(op),
                Err(reply) => return reply,
            }
        }
        match op(shared, collection, dest, stored.action()) {
            Ok(op) => ops.push(op),
            Err(reply) => return reply,
        }
        match commit(shared, ops).await {
            Ok(true) => return Reply::Integer(count),
            Ok(false) => continue,
            Err(reply) => return reply,
        }
    }
    kept_changing()
}

/// `action` on `key`, routed.
fn op(
    shared: &Shared,
    collection: u16,
    key: &Bytes,
    action: TxAction,
) -> Result<(crate::dispatch::Dest, TxOp), Reply> {
    let (dest, key) = shared.dispatch.route(key)?;
    Ok((
        dest,
        TxOp {
            collection,
            key,
            action,
        },
    ))
}

/// `SINTERCARD numkeys key [key ...] [LIMIT limit]`.
async fn sintercard(shared: Arc<Shared>, collection: u16, args: Vec<Bytes>) -> Reply {
    let (keys, rest) = match numkeys(&args[1..], NumKeys::Sets) {
        Ok(split) => split,
        Err(reply) => return reply,
    };
    let limit = match card_limit(rest) {
        Ok(limit) => limit,
        Err(reply) => return reply,
    };
    let read = || read_sets(&shared, collection, keys);
    let sets = match whole_reads::read_whole(&shared.dispatch, collection, keys, read).await {
        Ok(sets) => sets,
        Err(reply) => return reply,
    };
    let count = combine_sets("sinter", sets).len();
    Reply::Integer(match limit {
        0 => count,
        limit => count.min(limit),
    } as i64)
}

/// How a command words its `numkeys` errors, as Redis does.
#[derive(Clone, Copy)]
enum NumKeys<'a> {
    /// SINTERCARD.
    Sets,
    /// LMPOP, ZMPOP and their blocking forms.
    Pops,
    /// The sorted-set algebra, named for its error text.
    Zsets(&'a str),
}

/// `numkeys key ...`: the keys and what follows them.
fn numkeys<'a>(
    args: &'a [Bytes],
    flavor: NumKeys<'_>,
) -> Result<(&'a [Bytes], &'a [Bytes]), Reply> {
    let positive = || Reply::error("ERR numkeys should be greater than 0");
    let n = match (parse_i64(&args[0]), flavor) {
        (Some(n), _) if n > 0 => n as usize,
        (None, NumKeys::Zsets(_)) => return Err(errors::not_integer()),
        (Some(_), NumKeys::Zsets(name)) => {
            return Err(Reply::error(format!(
                "ERR at least 1 input key is needed for '{name}' command"
            )))
        }
        _ => return Err(positive()),
    };
    let rest = &args[1..];
    if n > rest.len() {
        return Err(match flavor {
            NumKeys::Sets => {
                Reply::error("ERR Number of keys can't be greater than number of args")
            }
            _ => errors::syntax(),
        });
    }
    Ok(rest.split_at(n))
}

/// `[LIMIT limit]` of SINTERCARD and ZINTERCARD (0: none).
fn card_limit(rest: &[Bytes]) -> Result<usize, Reply> {
    match rest {
        [] => Ok(0),
        [word, n] if word.eq_ignore_ascii_case(b"limit") => match parse_i64(n) {
            Some(n) if n >= 0 => Ok(n as usize),
            _ => Err(Reply::error("ERR LIMIT can't be negative")),
        },
        _ => Err(errors::syntax()),
    }
}

/// A move between two keys (SMOVE, LMOVE): one atomic request when both are on one
/// worker; across workers, a dry run at each and a two-phase commit of both
/// ([`move_across`]).
async fn two_keys(
    shared: &Arc<Shared>,
    session: &Session,
    first: &Bytes,
    second: &Bytes,
    moving: Move,
) -> Pending {
    let (first_dest, second_dest, to) =
        match (shared.dispatch.route(first), shared.dispatch.route(second)) {
            (Ok((a, _)), Ok((b, to))) => (a, b, to),
            (Err(reply), _) | (_, Err(reply)) => return Pending::Ready(reply),
        };
    if first_dest == second_dest {
        let op = match moving {
            Move::Member(member) => TypedOp::SMove { to, member },
            Move::End { from_left, to_left } => TypedOp::LMove {
                to,
                from_left,
                to_left,
            },
        };
        return run(shared, session, first, op, Shape::Plain).await;
    }
    let shared = Arc::clone(shared);
    let collection = session.collection;
    let (first, second) = (first.clone(), second.clone());
    Pending::barrier(async move { move_across(&shared, collection, &first, &second, moving).await })
}

/// What a move takes from its source.
#[derive(Clone)]
enum Move {
    /// SMOVE: this member.
    Member(ByteBuf),
    /// LMOVE: an end of the list, pushed at an end of the destination.
    End { from_left: bool, to_left: bool },
}

/// A move between keys of two workers: the source's part is dry-run first (it says what
/// moves), then the destination's, and both commit through two-phase commit, planned
/// again while a key changes under it.
async fn move_across(
    shared: &Shared,
    collection: u16,
    source: &Bytes,
    destination: &Bytes,
    moving: Move,
) -> Reply {
    use super::transaction::{backoff, commit, dry_run, hold, kept_changing, MAX_PLANS};
    let typed = |key: &Bytes, op| {
        let (dest, key) = shared.dispatch.route(key)?;
        Ok::<_, Reply>((
            dest,
            WorkerRequest::Typed {
                collection,
                key,
                op,
            },
        ))
    };
    for attempt in 0..MAX_PLANS {
        backoff(attempt).await;
        let _held = hold(shared, attempt, || {
            vec![
                (collection, source.clone()),
                (collection, destination.clone()),
            ]
        });
        let take = match &moving {
            Move::Member(member) => TypedOp::SRem {
                members: vec![member.clone()],
            },
            Move::End { from_left, .. } => TypedOp::Pop {
                left: *from_left,
                count: None,
            },
        };
        let (source_dest, request) = match typed(source, take) {
            Ok(routed) => routed,
            Err(reply) => return reply,
        };
        let taken = match dry_run(shared, source_dest, vec![request]).await {
            Ok(run) => run,
            Err(reply) => return reply,
        };
        let answer = match taken.responses.into_iter().next() {
            Some(shoal_shared::frame::WorkerResponse::Answer(answer)) => answer,
            Some(other) => return super::response_reply(other),
            None => return Reply::error("ERR internal error: no answer from a dry run"),
        };
        let put = match (&moving, answer) {
            (Move::Member(member), Answer::Integer(1)) => TypedOp::SAdd {
                members: vec![member.clone()],
            },
            // Not there: SMOVE answers 0 once the destination's type is checked too.
            (Move::Member(_), Answer::Integer(_)) => {
                return match type_of(shared, collection, destination).await {
                    Ok(kind) if kind == "set" || kind == "none" => Reply::Integer(0),
                    Ok(_) if exists(shared, collection, source).await => errors::wrong_type(),
                    Ok(_) => Reply::Integer(0),
                    Err(reply) => reply,
                }
            }
            (Move::End { to_left, .. }, Answer::Bulk(value)) => TypedOp::Push {
                left: *to_left,
                values: vec![value],
                if_exists: false,
            },
            (Move::End { .. }, _) => return Reply::Nil,
            (_, other) => return super::types::answer_reply(other),
        };
        let moved = match &put {
            TypedOp::Push { values, .. } => Reply::Bulk(values[0].to_vec().into()),
            _ => Reply::Integer(1),
        };
        let (destination_dest, request) = match typed(destination, put) {
            Ok(routed) => routed,
            Err(reply) => return reply,
        };
        let placed = match dry_run(shared, destination_dest, vec![request]).await {
            Ok(run) => run,
            Err(reply) => return reply,
        };
        if let Some(shoal_shared::frame::WorkerResponse::Error(error)) = placed.responses.first() {
            return errors::worker_error(error);
        }
        let ops = taken.ops.into_iter().chain(placed.ops).collect();
        match commit(shared, ops).await {
            Ok(true) => return moved,
            Ok(false) => {}
            Err(reply) => return reply,
        }
    }
    kept_changing()
}

/// TYPE of a key, as its status text.
async fn type_of(shared: &Shared, collection: u16, key: &Bytes) -> Result<String, Reply> {
    let session = session_for(collection);
    match run(shared, &session, key, TypedOp::Type, Shape::Plain)
        .await
        .resolve()
        .await
    {
        Reply::Simple(kind) => Ok(kind),
        other => Err(other),
    }
}

/// Whether a key exists.
async fn exists(shared: &Shared, collection: u16, key: &Bytes) -> bool {
    type_of(shared, collection, key)
        .await
        .is_ok_and(|kind| kind != "none")
}

async fn smove(shared: &Arc<Shared>, session: &Session, args: &[Bytes]) -> Pending {
    let member = ByteBuf::from(args[3].to_vec());
    two_keys(shared, session, &args[1], &args[2], Move::Member(member)).await
}

/// `LMOVE source destination LEFT|RIGHT LEFT|RIGHT`, `RPOPLPUSH source destination`.
async fn lmove(shared: &Arc<Shared>, session: &Session, name: &str, args: &[Bytes]) -> Pending {
    let (from_left, to_left) = match name {
        "rpoplpush" => (false, true),
        _ => match (side(&args[3]), side(&args[4])) {
            (Some(from), Some(to)) => (from, to),
            _ => return Pending::Ready(errors::syntax()),
        },
    };
    two_keys(
        shared,
        session,
        &args[1],
        &args[2],
        Move::End { from_left, to_left },
    )
    .await
}

/// `LEFT` (true) or `RIGHT` (false).
fn side(arg: &[u8]) -> Option<bool> {
    match () {
        _ if arg.eq_ignore_ascii_case(b"left") => Some(true),
        _ if arg.eq_ignore_ascii_case(b"right") => Some(false),
        _ => None,
    }
}

/// How ZUNION and ZINTER combine a member's weighted scores.
#[derive(Clone, Copy)]
enum Aggregate {
    Sum,
    Min,
    Max,
}

/// The members and scores of each key (a set's members score 1; a missing key is
/// empty), each read on its own (a caller reads them whole, see [`whole_reads`]).
async fn read_zsets(
    shared: &Shared,
    collection: u16,
    keys: &[Bytes],
) -> Result<Vec<BTreeMap<Bytes, f64>>, Reply> {
    let session = session_for(collection);
    let mut reads = Vec::with_capacity(keys.len());
    for key in keys {
        let op = TypedOp::Members(Kind::SortedSet);
        reads.push(run(shared, &session, key, op, Shape::Plain).await);
    }
    let mut sets = Vec::with_capacity(keys.len());
    for read in reads {
        match read.resolve().await {
            Reply::Pairs(pairs) => sets.push(
                pairs
                    .into_iter()
                    .filter_map(|pair| match pair {
                        (Reply::Bulk(member), Reply::Double(score)) => Some((member, score)),
                        _ => None,
                    })
                    .collect(),
            ),
            Reply::Array(members) => sets.push(
                members
                    .into_iter()
                    .filter_map(|member| match member {
                        Reply::Bulk(member) => Some((member, 1.0)),
                        _ => None,
                    })
                    .collect(),
            ),
            other => return Err(other),
        }
    }
    Ok(sets)
}

/// Members in score order (ties by member), as a sorted set lists them.
fn ranked(members: BTreeMap<Bytes, f64>) -> Vec<(Bytes, f64)> {
    let mut ranked: Vec<(Bytes, f64)> = members.into_iter().collect();
    ranked.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    ranked
}

/// `ZUNION|ZINTER|ZDIFF numkeys key ... [WEIGHTS w ...] [AGGREGATE SUM|MIN|MAX]
/// [WITHSCORES]`, and with `store` the STORE forms (`args[0]` is then the destination).
async fn zset_algebra(
    shared: Arc<Shared>,
    collection: u16,
    op: &str,
    args: Vec<Bytes>,
    store: Option<Bytes>,
) -> Reply {
    let full_name = match store {
        Some(_) => format!("{op}store"),
        None => op.to_string(),
    };
    let (keys, rest) = match numkeys(&args[1..], NumKeys::Zsets(&full_name)) {
        Ok(split) => split,
        Err(reply) => return reply,
    };
    // The keys are read (and their types checked) before the options, as Redis does.
    let read = || read_zsets(&shared, collection, keys);
    let Some(dest) = store else {
        return match whole_reads::read_whole(&shared.dispatch, collection, keys, read).await {
            Ok(sets) => match zset_combine(op, keys.len(), rest, sets, false) {
                Ok((ranked, true)) => Reply::Pairs(
                    ranked
                        .into_iter()
                        .map(|(m, s)| (Reply::Bulk(m), Reply::Double(s)))
                        .collect(),
                ),
                Ok((ranked, false)) => {
                    Reply::Array(ranked.into_iter().map(|(m, _)| Reply::Bulk(m)).collect())
                }
                Err(reply) => reply,
            },
            Err(reply) => reply,
        };
    };
    let compute = |sets| {
        let (ranked, _) = zset_combine(op, keys.len(), rest, sets, true)?;
        Ok(zset_stored(ranked))
    };
    self::store(&shared, collection, keys, &dest, read, compute).await
}

/// What a sorted set of `ranked` members is stored as.
fn zset_stored(ranked: Vec<(Bytes, f64)>) -> Stored {
    let elements = ranked
        .into_iter()
        .map(|(m, s)| (m.to_vec(), score_bytes(s).to_vec()))
        .collect();
    Stored::Collection(Kind::SortedSet, elements)
}

/// ZUNION, ZINTER or ZDIFF (`op`) of `sets` (of `keys` keys) with the options `rest`
/// (WITHSCORES only when not `storing`): the members ranked, and whether WITHSCORES was
/// given.
fn zset_combine(
    op: &str,
    keys: usize,
    mut rest: &[Bytes],
    sets: Vec<BTreeMap<Bytes, f64>>,
    storing: bool,
) -> Result<(Vec<(Bytes, f64)>, bool), Reply> {
    let mut weights = vec![1.0; keys];
    let (mut aggregate, mut with_scores) = (Aggregate::Sum, false);
    while let Some(option) = rest.first() {
        if option.eq_ignore_ascii_case(b"weights") && op != "zdiff" && rest.len() > keys {
            for (i, weight) in rest[1..=keys].iter().enumerate() {
                match super::types::score(weight) {
                    Some(w) => weights[i] = w,
                    None => return Err(Reply::error("ERR weight value is not a float")),
                }
            }
            rest = &rest[1 + keys..];
        } else if option.eq_ignore_ascii_case(b"aggregate") && op != "zdiff" && rest.len() > 1 {
            aggregate = match () {
                _ if rest[1].eq_ignore_ascii_case(b"sum") => Aggregate::Sum,
                _ if rest[1].eq_ignore_ascii_case(b"min") => Aggregate::Min,
                _ if rest[1].eq_ignore_ascii_case(b"max") => Aggregate::Max,
                _ => return Err(errors::syntax()),
            };
            rest = &rest[2..];
        } else if option.eq_ignore_ascii_case(b"withscores") && !storing {
            with_scores = true;
            rest = &rest[1..];
        } else {
            return Err(errors::syntax());
        }
    }
    let weighted = |score: f64, weight: f64| {
        let value = score * weight;
        if value.is_nan() {
            0.0
        } else {
            value
        }
    };
    let combine = |a: f64, b: f64| {
        let value = match aggregate {
            Aggregate::Sum => a + b,
            Aggregate::Min => a.min(b),
            Aggregate::Max => a.max(b),
        };
        if value.is_nan() {
            0.0
        } else {
            value
        }
    };
    let mut sets = sets.into_iter().zip(weights);
    let (first, first_weight) = sets.next().unwrap_or_default();
    let mut result: BTreeMap<Bytes, f64> = first
        .into_iter()
        .map(|(member, score)| (member, weighted(score, first_weight)))
        .collect();
    for (set, weight) in sets {
        match op {
            "zunion" => {
                for (member, score) in set {
                    let score = weighted(score, weight);
                    result
                        .entry(member)
                        .and_modify(|s| *s = combine(*s, score))
                        .or_insert(score);
                }
            }
            "zinter" => {
                result = result
                    .into_iter()
                    .filter_map(|(member, s)| {
                        let other = set.get(&member)?;
                        Some((member, combine(s, weighted(*other, weight))))
                    })
                    .collect();
            }
            _ => result.retain(|member, _| !set.contains_key(member)),
        }
    }
    Ok((ranked(result), with_scores))
}

/// `ZINTERCARD numkeys key ... [LIMIT limit]`.
async fn zintercard(shared: Arc<Shared>, collection: u16, args: Vec<Bytes>) -> Reply {
    let (keys, rest) = match numkeys(&args[1..], NumKeys::Zsets("zintercard")) {
        Ok(split) => split,
        Err(reply) => return reply,
    };
    // The keys are read (and their types checked) before the options, as Redis does.
    let read = || read_zsets(&shared, collection, keys);
    let sets = match whole_reads::read_whole(&shared.dispatch, collection, keys, read).await {
        Ok(sets) => sets,
        Err(reply) => return reply,
    };
    let limit = match card_limit(rest) {
        Ok(limit) => limit,
        Err(reply) => return reply,
    };
    let mut sets = sets.into_iter();
    let first: BTreeSet<Bytes> = sets.next().unwrap_or_default().into_keys().collect();
    let count = sets
        .fold(first, |acc, set| {
            acc.into_iter().filter(|m| set.contains_key(m)).collect()
        })
        .len();
    Reply::Integer(match limit {
        0 => count,
        limit => count.min(limit),
    } as i64)
}

/// `ZRANGESTORE dst src min max [BYSCORE|BYLEX] [REV] [LIMIT offset count]`.
async fn zrangestore(shared: Arc<Shared>, collection: u16, args: Vec<Bytes>) -> Reply {
    let (range, with_scores) = match super::types::zrange("zrange", &args[1..]) {
        Ok(parsed) => parsed,
        Err(reply) => return reply,
    };
    if with_scores {
        return errors::syntax();
    }
    let session = session_for(collection);
    let op = TypedOp::ZRange {
        range,
        with_scores: true,
    };
    let (shared, session, op, source) = (&shared, &session, &op, &args[2]);
    let read = || async move {
        match run(shared, session, source, op.clone(), Shape::Plain)
            .await
            .resolve()
            .await
        {
            Reply::Pairs(pairs) => Ok(pairs
                .into_iter()
                .filter_map(|pair| match pair {
                    (Reply::Bulk(member), Reply::Double(score)) => Some((member, score)),
                    _ => None,
                })
                .collect()),
            other => Err(other),
        }
    };
    let compute = |ranked| Ok(zset_stored(ranked));
    store(shared, collection, &args[2..3], &args[1], read, compute).await
}

/// A pop from the first non-empty of several keys (LMPOP, ZMPOP and their blocking forms,
/// BLPOP, BRPOP, BZPOPMIN, BZPOPMAX).
struct MultiPop {
    keys: Vec<Bytes>,
    /// From the head (lists), or the lowest scores (sorted sets).
    first: bool,
    kind: Kind,
    /// `Some`: the MPOP reply `[key, elements]` with up to this many; `None`: the
    /// BLPOP/BZPOPMIN reply `[key, element(, score)]`.
    count: Option<u64>,
}

impl MultiPop {
    /// One try over the keys in order: the reply of the first pop that found something.
    async fn attempt(&self, shared: &Shared, collection: u16, keys: &[Bytes]) -> Option<Reply> {
        let session = session_for(collection);
        for key in keys {
            let op = match self.kind {
                Kind::List => TypedOp::Pop {
                    left: self.first,
                    count: Some(self.count.unwrap_or(1)),
                },
                _ => TypedOp::ZPop {
                    max: !self.first,
                    count: self.count.unwrap_or(1),
                },
            };
            let reply = run(shared, &session, key, op, Shape::Plain)
                .await
                .resolve()
                .await;
            let elements = match reply {
                Reply::Array(items) if !items.is_empty() => items,
                Reply::Pairs(pairs) if !pairs.is_empty() => match self.count {
                    // ZMPOP lists [member, score] pairs; BZPOPMIN one flat triple.
                    Some(_) => pairs
                        .into_iter()
                        .map(|(m, s)| Reply::Array(vec![m, s]))
                        .collect(),
                    None => pairs.into_iter().flat_map(|(m, s)| [m, s]).collect(),
                },
                Reply::Error(text) => return Some(Reply::Error(text)),
                _ => continue,
            };
            let key = Reply::Bulk(key.clone());
            return Some(match self.count {
                Some(_) => Reply::Array(vec![key, Reply::Array(elements)]),
                None => Reply::Array(std::iter::once(key).chain(elements).collect()),
            });
        }
        None
    }
}

/// `LMPOP|ZMPOP numkeys key ... LEFT|RIGHT|MIN|MAX [COUNT count]` (from `numkeys`).
fn mpop(name: &str, args: &[Bytes]) -> Result<MultiPop, Reply> {
    let (keys, rest) = numkeys(args, NumKeys::Pops)?;
    let list = name.contains('l');
    let Some(direction) = rest.first() else {
        return Err(errors::syntax());
    };
    let first = match () {
        _ if list && direction.eq_ignore_ascii_case(b"left") => true,
        _ if list && direction.eq_ignore_ascii_case(b"right") => false,
        _ if !list && direction.eq_ignore_ascii_case(b"min") => true,
        _ if !list && direction.eq_ignore_ascii_case(b"max") => false,
        _ => return Err(errors::syntax()),
    };
    let count = match &rest[1..] {
        [] => 1,
        [word, n] if word.eq_ignore_ascii_case(b"count") => match parse_i64(n) {
            Some(n) if n > 0 => n as u64,
            _ => return Err(Reply::error("ERR count should be greater than 0")),
        },
        _ => return Err(errors::syntax()),
    };
    Ok(MultiPop {
        keys: keys.to_vec(),
        first,
        kind: if list { Kind::List } else { Kind::SortedSet },
        count: Some(count),
    })
}

/// A blocking command's timeout in seconds (0: none), as Redis reads it.
fn timeout(arg: &[u8]) -> Result<Option<Duration>, Reply> {
    match super::types::score(arg) {
        Some(seconds) if seconds < 0.0 => Err(Reply::error("ERR timeout is negative")),
        Some(seconds) if seconds.is_finite() && seconds < 1e12 => {
            Ok((seconds > 0.0).then(|| Duration::from_secs_f64(seconds)))
        }
        _ => Err(Reply::error("ERR timeout is not a float or out of range")),
    }
}

/// The local workers that hold `keys`, and whether any is on another host.
fn whereabouts(shared: &Shared, keys: &[Bytes]) -> (Vec<usize>, bool) {
    let (mut workers, mut remote) = (Vec::new(), false);
    for key in keys {
        match shared
            .dispatch
            .route(key)
            .map(|(dest, _)| shared.dispatch.local_worker(dest))
        {
            Ok(Some(worker)) => workers.push(worker),
            _ => remote = true,
        }
    }
    (workers, remote)
}

/// The blocking pops: try, and while nothing is there wait in the keys' lines
/// ([`crate::blocked`]) and try again until the timeout. Each try finds database `db`'s
/// collection anew (SWAPDB may have moved it meanwhile).
fn blocking(shared: Arc<Shared>, db: u16, name: &str, args: Vec<Bytes>) -> Work {
    let name = name.to_string();
    async move {
        let last = args.len() - 1;
        enum Attempt {
            Pop(MultiPop),
            Move { to_left: bool, from_left: bool },
        }
        let parsed = match name.as_str() {
            "blpop" | "brpop" | "bzpopmin" | "bzpopmax" => timeout(&args[last]).map(|t| {
                let list = name.starts_with("bl") || name == "brpop";
                (
                    t,
                    Attempt::Pop(MultiPop {
                        keys: args[1..last].to_vec(),
                        first: name == "blpop" || name == "bzpopmin",
                        kind: if list { Kind::List } else { Kind::SortedSet },
                        count: None,
                    }),
                )
            }),
            "blmpop" | "bzmpop" => timeout(&args[1])
                .and_then(|t| mpop(&name[1..], &args[2..]).map(|pop| (t, Attempt::Pop(pop)))),
            "brpoplpush" => timeout(&args[3]).map(|t| {
                (
                    t,
                    Attempt::Move {
                        from_left: false,
                        to_left: true,
                    },
                )
            }),
            _ => match (side(&args[3]), side(&args[4])) {
                (Some(from_left), Some(to_left)) => {
                    timeout(&args[5]).map(|t| (t, Attempt::Move { from_left, to_left }))
                }
                _ => Err(errors::syntax()),
            },
        };
        let (limit, attempt) = match parsed {
            Ok(parsed) => parsed,
            Err(reply) => return reply,
        };
        let deadline = limit.map(|limit| tokio::time::Instant::now() + limit);
        let started = Instant::now();
        let keys: Vec<Bytes> = match &attempt {
            Attempt::Pop(pop) => pop.keys.clone(),
            Attempt::Move { .. } => vec![args[1].clone()],
        };
        let mut waiter = shared.blocked.join(db, &keys);
        loop {
            // Only the keys whose line this client heads: one blocked longer takes first.
            let heads = waiter.heads();
            let ticket = shared.databases.ticket().await;
            let collection = ticket.collection(db);
            let found = match &attempt {
                Attempt::Pop(pop) => {
                    let mine: Vec<Bytes> = (pop.keys.iter().zip(&heads))
                        .filter(|(_, &head)| head)
                        .map(|(key, _)| key.clone())
                        .collect();
                    pop.attempt(&shared, collection, &mine).await
                }
                Attempt::Move { from_left, to_left } if heads[0] => {
                    let moving = Move::End {
                        from_left: *from_left,
                        to_left: *to_left,
                    };
                    let session = session_for(collection);
                    let moved = two_keys(&shared, &session, &args[1], &args[2], moving)
                        .await
                        .resolve()
                        .await;
                    (moved != Reply::Nil).then_some(moved)
                }
                Attempt::Move { .. } => None,
            };
            if let Some(reply) = found {
                return reply;
            }
            drop(ticket);
            // Redis answers a timed-out blocking command with a null array, whichever it is.
            if deadline.is_some_and(|deadline| tokio::time::Instant::now() >= deadline) {
                return Reply::NilArray;
            }
            let (workers, remote) = whereabouts(&shared, &keys);
            let poll = remote.then(|| match started.elapsed() < Duration::from_secs(1) {
                true => BLOCKED_RETRY_FIRST,
                false => BLOCKED_RETRY_LATER,
            });
            waiter.next_chance(&workers, poll, deadline).await;
        }
    }
    .boxed()
}

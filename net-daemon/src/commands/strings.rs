//! Commands on one key: strings, counters and ranges (and MGET/EXISTS, whose keys on
//! several workers are read whole, see [`whole_reads`]). Each builds a
//! [`WorkerRequest`] for the worker that owns the key.

use std::sync::Arc;

use bytes::Bytes;
use shoal_shared::frame::{Expiry, Key, SetCondition, SetReply, WorkerRequest};
use shoal_shared::resp::{parse_i64, Reply};

use super::{call_one, Merge, Pending, Session};
use crate::errors;
use crate::state::Shared;
use crate::whole_reads;

/// Runs `name` if it is a one-key command; `None` otherwise. Arity is already checked.
pub async fn dispatch(
    shared: &Arc<Shared>,
    session: &Session,
    name: &str,
    args: &[Bytes],
) -> Option<Pending> {
    let collection = session.collection;
    let pending = match name {
        "get" => match direct_read(shared, session, &args[1..]) {
            Direct::Values(mut values) => Pending::Ready(value_reply(values.pop().flatten())),
            Direct::AfterEarlier => {
                let (shared, key) = (Arc::clone(shared), args[1].clone());
                Pending::barrier(async move {
                    match read_maps(&shared, collection, std::slice::from_ref(&key)) {
                        Some(mut values) => value_reply(values.pop().flatten()),
                        None => get(&shared, collection, &key).await.resolve().await,
                    }
                })
            }
            Direct::Worker => get(shared, collection, &args[1]).await,
        },
        "getdel" => {
            single(shared, &args[1], |key| WorkerRequest::GetDel {
                collection,
                key,
            })
            .await
        }
        "strlen" => {
            single(shared, &args[1], |key| WorkerRequest::StrLen {
                collection,
                key,
            })
            .await
        }
        "set" => set(shared, collection, args).await,
        "setnx" | "getset" => {
            let (condition, reply) = match name {
                "setnx" => (SetCondition::IfAbsent, SetReply::WrittenFlag),
                _ => (SetCondition::Always, SetReply::OldValue),
            };
            write_set(shared, collection, args, condition, reply, Expiry::Clear).await
        }
        "getex" => match StringOptions::parse(&args[2..], false) {
            Err(reply) => Pending::Ready(reply),
            Ok(options) => match options.expiry("getex") {
                Ok(expiry) => {
                    single(shared, &args[1], |key| WorkerRequest::GetEx {
                        collection,
                        key,
                        expiry,
                    })
                    .await
                }
                // Redis checks the expiry only once it has found the key: a missing key is nil.
                Err(reply) => {
                    let get = single(shared, &args[1], |key| WorkerRequest::Get {
                        collection,
                        key,
                    })
                    .await;
                    Pending::barrier(async move {
                        match get.resolve().await {
                            Reply::Nil => Reply::Nil,
                            Reply::Bulk(_) => reply,
                            other => other,
                        }
                    })
                }
            },
        },
        "append" => {
            write_value(shared, &args[1], &args[2], |key, value| {
                WorkerRequest::Append {
                    collection,
                    key,
                    value,
                }
            })
            .await
        }
        "incr" | "decr" | "incrby" | "decrby" => {
            let delta = match name {
                "incr" => Ok(1),
                "decr" => Ok(-1),
                "incrby" => parse_i64(&args[2]).ok_or_else(errors::not_integer),
                _ => parse_i64(&args[2])
                    .ok_or_else(errors::not_integer)
                    .and_then(|n| {
                        n.checked_neg()
                            .ok_or_else(|| Reply::error("ERR decrement would overflow"))
                    }),
            };
            match delta {
                Ok(delta) => {
                    single(shared, &args[1], |key| WorkerRequest::IncrBy {
                        collection,
                        key,
                        delta,
                    })
                    .await
                }
                Err(reply) => Pending::Ready(reply),
            }
        }
        "incrbyfloat" => {
            let increment = args[2].to_vec();
            single(shared, &args[1], |key| WorkerRequest::IncrByFloat {
                collection,
                key,
                increment,
            })
            .await
        }
        "setex" | "psetex" => {
            let options = StringOptions {
                condition: SetCondition::Always,
                get: false,
                keep_ttl: false,
                persist: false,
                expire: Some((&args[2], if name == "setex" { 1000 } else { 1 }, false)),
            };
            match options.expiry(name) {
                Ok(expiry) => {
                    let values = [args[0].clone(), args[1].clone(), args[3].clone()];
                    let (condition, reply) = (SetCondition::Always, SetReply::Status);
                    write_set(shared, collection, &values, condition, reply, expiry).await
                }
                Err(reply) => Pending::Ready(reply),
            }
        }
        // SUBSTR is GETRANGE's old name.
        "getrange" | "substr" => match (parse_i64(&args[2]), parse_i64(&args[3])) {
            (Some(start), Some(end)) => {
                single(shared, &args[1], |key| WorkerRequest::GetRange {
                    collection,
                    key,
                    start,
                    end,
                })
                .await
            }
            _ => Pending::Ready(errors::not_integer()),
        },
        "setrange" => match parse_i64(&args[2]) {
            Some(offset) if offset >= 0 => {
                let max = shared.config.client.max_value_bytes;
                if offset as u64 + args[3].len() as u64 > max as u64 {
                    return Some(Pending::Ready(errors::value_too_large(max)));
                }
                let value = args[3].to_vec();
                let offset = offset as u64;
                single(shared, &args[1], |key| WorkerRequest::SetRange {
                    collection,
                    key,
                    offset,
                    value,
                })
                .await
            }
            Some(_) => Pending::Ready(Reply::error("ERR offset is out of range")),
            None => Pending::Ready(errors::not_integer()),
        },
        // Shoal keeps no access times: TOUCH counts the keys that exist, as EXISTS does.
        "exists" | "touch" if whole_reads::spans_owners(&shared.dispatch, &args[1..]) => {
            read_whole(shared, session, false, &args[1..])
        }
        "exists" | "touch" => exists(shared, collection, &args[1..]).await,
        "mget" => {
            // Read whole from the maps when they can answer (`direct_read`).
            if let Direct::Values(values) = direct_read(shared, session, &args[1..]) {
                return Some(Pending::Ready(Reply::Array(
                    values.into_iter().map(value_reply).collect(),
                )));
            }
            match whole_reads::spans_owners(&shared.dispatch, &args[1..]) {
                true => read_whole(shared, session, true, &args[1..]),
                false => multi_values(shared, collection, &args[1..]).await,
            }
        }
        _ => return None,
    };
    Some(pending)
}

/// The reply `compute` makes of `key`'s string value (`None` when it is missing), read
/// through its worker; errors pass unchanged.
pub async fn on_value(
    shared: &Shared,
    collection: u16,
    key: &Bytes,
    compute: impl FnOnce(Option<&[u8]>) -> Reply + Send + 'static,
) -> Pending {
    match single(shared, key, |key| WorkerRequest::Get { collection, key }).await {
        Pending::Calls { calls, .. } => Pending::Calls {
            calls,
            merge: Merge::Value(Box::new(compute)),
        },
        other => other,
    }
}

/// A command on one key.
pub async fn single(
    shared: &Shared,
    key: &Bytes,
    make: impl FnOnce(Key) -> WorkerRequest,
) -> Pending {
    match shared.dispatch.route(key) {
        Ok((dest, key)) => call_one(shared, dest, make(key)).await,
        Err(reply) => Pending::Ready(reply),
    }
}

/// A command that stores a value under one key; the value size is checked first.
async fn write_value(
    shared: &Shared,
    key: &Bytes,
    value: &Bytes,
    make: impl FnOnce(Key, Vec<u8>) -> WorkerRequest,
) -> Pending {
    let max = shared.config.client.max_value_bytes;
    if value.len() > max {
        return Pending::Ready(errors::value_too_large(max));
    }
    single(shared, key, |key| make(key, value.to_vec())).await
}

/// GET through the key's worker.
async fn get(shared: &Arc<Shared>, collection: u16, key: &Bytes) -> Pending {
    single(shared, key, |key| WorkerRequest::Get { collection, key }).await
}

/// How a GET or MGET can be read now ([`direct_read`]).
enum Direct {
    /// Read from the maps.
    Values(Vec<Option<Vec<u8>>>),
    /// From the maps, but only once the reads of the batch that went to workers are
    /// answered (GET makes it a barrier; MGET goes to the workers).
    AfterEarlier,
    /// Through the workers.
    Worker,
}

/// The values of `keys` read straight from the shards ([`crate::reads`]), in order, if
/// they can be. A read never overtakes an earlier request of its connection: on a host
/// on its own, none but reads may be in flight, and then it waits for them
/// ([`Direct::AfterEarlier`], if the maps can answer now: a shard that sent an earlier
/// read to its worker for a reason of its own, such as a prepared transaction, likely
/// would again); in a cluster, none on the keys' partitions.
fn direct_read(shared: &Shared, session: &Session, keys: &[Bytes]) -> Direct {
    let clustered = shared.dispatch.router.is_some();
    // Inside a transaction's plan, reads are held for the transaction like its writes.
    if (!session.direct_reads && !clustered) || crate::dispatch::Dispatch::is_holding() {
        return Direct::Worker;
    }
    match read_maps(shared, session.collection, keys) {
        // The maps can answer, but must again once the earlier reads are answered.
        Some(_) if session.behind_reads && !clustered => Direct::AfterEarlier,
        Some(values) => Direct::Values(values),
        None => Direct::Worker,
    }
}

/// The values of `keys` of `collection` read straight from the shards' maps, in order;
/// `None` when any of them must be read through its worker. Keys on several workers
/// are read whole: each worker's with their versions, then those of all but the last
/// worker read checked unchanged ([`whole_reads::unchanged_directly`]), a few times at
/// most.
fn read_maps(shared: &Shared, collection: u16, keys: &[Bytes]) -> Option<Vec<Option<Vec<u8>>>> {
    // One key (a GET): one worker, nothing to read whole, no grouping.
    if let [key] = keys {
        let (dest, key) = shared.dispatch.route(key).ok()?;
        if !readable_here(shared, &key) {
            return None;
        }
        let worker = shared.dispatch.local_worker(dest)?;
        return shared.dispatch.read_directly(worker, collection, &[&key]);
    }
    let groups = shared.dispatch.group_by_dest(keys).ok()?;
    if !groups
        .iter()
        .all(|(_, keys, _)| keys.iter().all(|key| readable_here(shared, key)))
    {
        return None;
    }
    let whole = groups.len() > 1;
    for _ in 0..whole_reads::DIRECT_TRIES {
        let mut values = vec![None; keys.len()];
        let mut versions = Vec::with_capacity(groups.len());
        for (dest, keys, positions) in &groups {
            let worker = shared.dispatch.local_worker(*dest)?;
            let keys: Vec<&Key> = keys.iter().collect();
            let found = match whole {
                true => {
                    let (found, seen) = shared
                        .dispatch
                        .read_versioned_directly(worker, collection, &keys)?;
                    versions.push(seen);
                    found
                }
                false => shared.dispatch.read_directly(worker, collection, &keys)?,
            };
            for (value, &position) in found.into_iter().zip(positions) {
                values[position] = value;
            }
        }
        let earlier = groups.len().saturating_sub(1);
        if !whole
            || whole_reads::unchanged_directly(
                &shared.dispatch,
                collection,
                &groups[..earlier],
                &versions,
            )
        {
            return Some(values);
        }
    }
    None
}

/// Whether `key` may be read from a local map: on a host on its own, always; in a
/// cluster, while no handoff or copy moves its partition and it has no followers (a
/// replicated partition is read through its primary's replication rules).
fn readable_here(shared: &Shared, key: &Key) -> bool {
    match &shared.dispatch.router {
        None => true,
        Some(router) => {
            crate::routing::idle(key.partition) && router.local_worker(key.partition).is_some()
        }
    }
}

/// The string values of `keys` (`None`: missing), read whole ([`whole_reads`]), or the
/// first error (WRONGTYPE for a typed key).
pub async fn values_whole(
    shared: &Shared,
    collection: u16,
    keys: &[Bytes],
) -> Result<Vec<Option<Bytes>>, Reply> {
    let read = || string_values(shared, collection, keys);
    whole_reads::read_whole(&shared.dispatch, collection, keys, read).await
}

/// The string values of `keys` (`None`: missing), each read on its own, or the first
/// error.
pub async fn string_values(
    shared: &Shared,
    collection: u16,
    keys: &[Bytes],
) -> Result<Vec<Option<Bytes>>, Reply> {
    let mut reads = Vec::with_capacity(keys.len());
    for key in keys {
        reads.push(single(shared, key, |key| WorkerRequest::Get { collection, key }).await);
    }
    let mut values = Vec::with_capacity(reads.len());
    for read in reads {
        match read.resolve().await {
            Reply::Bulk(value) => values.push(Some(value)),
            Reply::Nil => values.push(None),
            other => return Err(other),
        }
    }
    Ok(values)
}

/// How many of `keys` exist, through their workers.
async fn exists(shared: &Shared, collection: u16, keys: &[Bytes]) -> Pending {
    multi_read(shared, keys, Merge::Sum, |keys| WorkerRequest::Exists {
        collection,
        keys,
    })
    .await
}

/// MGET (`mget`) or EXISTS of keys on several workers or hosts, seen whole
/// ([`whole_reads`]), as a barrier through the workers.
fn read_whole(shared: &Arc<Shared>, session: &Session, mget: bool, keys: &[Bytes]) -> Pending {
    let collection = session.collection;
    let shared = Arc::clone(shared);
    let keys = keys.to_vec();
    Pending::barrier(async move {
        let (shared_ref, keys_ref) = (&shared, &keys);
        let read = move || async move {
            let pending = match mget {
                true => multi_values(shared_ref, collection, keys_ref).await,
                false => exists(shared_ref, collection, keys_ref).await,
            };
            match pending.resolve().await {
                error @ Reply::Error(_) => Err(error),
                reply => Ok(reply),
            }
        };
        whole_reads::read_whole(&shared.dispatch, collection, &keys, read)
            .await
            .unwrap_or_else(|error| error)
    })
}

fn value_reply(value: Option<Vec<u8>>) -> Reply {
    value.map_or(Reply::Nil, |value| Reply::Bulk(value.into()))
}

/// The values of `keys` (an array, nil for a missing key) through their workers.
pub async fn multi_values(shared: &Shared, collection: u16, keys: &[Bytes]) -> Pending {
    let merge = Merge::Values {
        positions: Vec::new(),
        total: keys.len(),
    };
    multi_read(shared, keys, merge, |keys| WorkerRequest::MGet {
        collection,
        keys,
    })
    .await
}

/// A read of many keys: one request per worker that owns some of them (each one
/// snapshot; across workers, see [`read_whole`]). For [`Merge::Values`], the positions of
/// each worker's keys are filled in here.
async fn multi_read(
    shared: &Shared,
    keys: &[Bytes],
    mut merge: Merge,
    make: impl Fn(Vec<Key>) -> WorkerRequest,
) -> Pending {
    let groups = match shared.dispatch.group_by_dest(keys) {
        Ok(groups) => groups,
        Err(reply) => return Pending::Ready(reply),
    };
    let mut calls = Vec::new();
    let mut all_positions = Vec::new();
    for (dest, keys, positions) in groups {
        calls.push(shared.dispatch.send(dest, make(keys)).await);
        all_positions.push(positions);
    }
    if let Merge::Values { positions, .. } = &mut merge {
        *positions = all_positions;
    }
    Pending::Calls { calls, merge }
}

/// The options of SET or GETEX, parsed as Redis does: an option may repeat, but options
/// that contradict each other are a syntax error.
struct StringOptions<'a> {
    condition: SetCondition,
    get: bool,
    keep_ttl: bool,
    persist: bool,
    /// EX/PX/EXAT/PXAT: the raw amount, ms per unit, and whether it is absolute.
    expire: Option<(&'a Bytes, u64, bool)>,
}

impl<'a> StringOptions<'a> {
    fn parse(options: &'a [Bytes], set: bool) -> Result<StringOptions<'a>, Reply> {
        let mut parsed = StringOptions {
            condition: SetCondition::Always,
            get: false,
            keep_ttl: false,
            persist: false,
            expire: None,
        };
        let mut i = 0;
        while i < options.len() {
            let option = options[i].to_ascii_uppercase();
            let timed = |unit: u64, absolute: bool, parsed: &StringOptions| {
                let conflicting = parsed.keep_ttl
                    || parsed.persist
                    || parsed
                        .expire
                        .is_some_and(|(_, u, a)| (u, a) != (unit, absolute));
                (!conflicting).then_some((unit, absolute))
            };
            let expire = match option.as_slice() {
                b"EX" => timed(1000, false, &parsed),
                b"PX" => timed(1, false, &parsed),
                b"EXAT" => timed(1000, true, &parsed),
                b"PXAT" => timed(1, true, &parsed),
                _ => None,
            };
            match (option.as_slice(), expire) {
                (_, Some((unit, absolute))) if i + 1 < options.len() => {
                    parsed.expire = Some((&options[i + 1], unit, absolute));
                    i += 1;
                }
                (b"NX", _) if set && parsed.condition != SetCondition::IfPresent => {
                    parsed.condition = SetCondition::IfAbsent
                }
                (b"XX", _) if set && parsed.condition != SetCondition::IfAbsent => {
                    parsed.condition = SetCondition::IfPresent
                }
                (b"GET", _) if set => parsed.get = true,
                (b"KEEPTTL", _) if set && parsed.expire.is_none() => parsed.keep_ttl = true,
                (b"PERSIST", _) if !set && parsed.expire.is_none() => parsed.persist = true,
                _ => return Err(errors::syntax()),
            }
            i += 1;
        }
        Ok(parsed)
    }

    /// The expiry the options ask for; an invalid time is an error naming `command`.
    fn expiry(&self, command: &str) -> Result<Expiry, Reply> {
        let Some((amount, unit, absolute)) = self.expire else {
            return Ok(if self.keep_ttl || (!self.persist && command == "getex") {
                Expiry::Keep
            } else {
                Expiry::Clear
            });
        };
        let invalid = || Reply::error(format!("ERR invalid expire time in '{command}' command"));
        let amount = parse_i64(amount).ok_or_else(errors::not_integer)?;
        if amount <= 0 {
            return Err(invalid());
        }
        let ms = (amount as u64)
            .checked_mul(unit)
            .filter(|&ms| ms <= i64::MAX as u64)
            .ok_or_else(invalid)?;
        let at = if absolute {
            Some(ms)
        } else {
            shoal_shared::now_ms().checked_add(ms)
        };
        at.filter(|&at| at <= i64::MAX as u64)
            .map(Expiry::At)
            .ok_or_else(invalid)
    }
}

/// `SET key value [NX|XX] [GET] [EX s|PX ms|EXAT s|PXAT ms|KEEPTTL]`.
async fn set(shared: &Shared, collection: u16, args: &[Bytes]) -> Pending {
    let (options, expiry) = match StringOptions::parse(&args[3..], true)
        .and_then(|o| o.expiry("set").map(|e| (o, e)))
    {
        Ok(parsed) => parsed,
        Err(reply) => return Pending::Ready(reply),
    };
    let condition = options.condition;
    let reply = if options.get {
        SetReply::OldValue
    } else {
        SetReply::Status
    };
    write_set(shared, collection, args, condition, reply, expiry).await
}

/// `args[1] = args[2]` through a worker `Set` request.
async fn write_set(
    shared: &Shared,
    collection: u16,
    args: &[Bytes],
    condition: SetCondition,
    reply: SetReply,
    expiry: Expiry,
) -> Pending {
    write_value(shared, &args[1], &args[2], |key, value| {
        WorkerRequest::Set {
            collection,
            key,
            value,
            condition,
            reply,
            expiry,
        }
    })
    .await
}

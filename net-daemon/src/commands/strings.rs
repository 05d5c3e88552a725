//! String and keyspace commands: everything that reads or writes keys, and
//! the commit-log reader. Each builds [`WorkerRequest`]s for the workers that
//! own the keys and says how to merge their answers.

use bytes::Bytes;
use shoal_shared::frame::{Key, SetCondition, SetReply, WorkerRequest};
use shoal_shared::partition::{key_partition, partition_worker};
use shoal_shared::resp::{parse_f64, parse_i64, Reply};

use super::{call_all_sum, call_one, route, Merge, Pending, Session};
use crate::errors;
use crate::Shared;

/// Default and largest COUNT of SHOAL.LOG.
const LOG_DEFAULT_COUNT: u32 = 100;
const LOG_MAX_COUNT: u32 = 10_000;

/// Runs `name` if it is a key command; `None` otherwise. Arity is already checked.
pub async fn dispatch(shared: &Shared, session: &Session, name: &str, args: &[Bytes]) -> Option<Pending> {
    let collection = session.collection;
    let pending = match name {
        "get" => single(shared, &args[1], |key| WorkerRequest::Get { collection, key }).await,
        "getdel" => single(shared, &args[1], |key| WorkerRequest::GetDel { collection, key }).await,
        "strlen" => single(shared, &args[1], |key| WorkerRequest::StrLen { collection, key }).await,
        "set" => set(shared, collection, args).await,
        "setnx" => {
            write_value(shared, &args[1], &args[2], |key, value| WorkerRequest::Set {
                collection,
                key,
                value,
                condition: SetCondition::IfAbsent,
                reply: SetReply::WrittenFlag,
            })
            .await
        }
        "getset" => {
            write_value(shared, &args[1], &args[2], |key, value| WorkerRequest::Set {
                collection,
                key,
                value,
                condition: SetCondition::Always,
                reply: SetReply::OldValue,
            })
            .await
        }
        "append" => {
            write_value(shared, &args[1], &args[2], |key, value| WorkerRequest::Append { collection, key, value }).await
        }
        "incr" | "decr" | "incrby" | "decrby" => {
            let delta = match name {
                "incr" => Some(1),
                "decr" => Some(-1),
                "incrby" => parse_i64(&args[2]),
                _ => parse_i64(&args[2]).and_then(i64::checked_neg),
            };
            match delta {
                Some(delta) => single(shared, &args[1], |key| WorkerRequest::IncrBy { collection, key, delta }).await,
                None => Pending::Ready(errors::not_integer()),
            }
        }
        "incrbyfloat" => match parse_f64(&args[2]) {
            Some(delta) if delta.is_finite() => {
                single(shared, &args[1], |key| WorkerRequest::IncrByFloat { collection, key, delta }).await
            }
            Some(_) => Pending::Ready(Reply::error("ERR increment would produce NaN or Infinity")),
            None => Pending::Ready(errors::not_float()),
        },
        "del" | "unlink" => {
            multi(shared, &args[1..], Merge::Sum, |keys| WorkerRequest::Delete { collection, keys }).await
        }
        "exists" => multi(shared, &args[1..], Merge::Sum, |keys| WorkerRequest::Exists { collection, keys }).await,
        "mget" => {
            let merge = Merge::Values { positions: Vec::new(), total: args.len() - 1 };
            multi(shared, &args[1..], merge, |keys| WorkerRequest::MGet { collection, keys }).await
        }
        "dbsize" => call_all_sum(shared, || WorkerRequest::DbSize { collection }).await,
        "shoal.partition" => Pending::Ready(Reply::Integer(i64::from(key_partition(
            &args[1],
            shared.config.storage.partitions,
        )))),
        "shoal.log" => read_log(shared, args).await,
        _ => return None,
    };
    Some(pending)
}

/// A command on one key.
async fn single(shared: &Shared, key: &Bytes, make: impl FnOnce(Key) -> WorkerRequest) -> Pending {
    match route(shared, key) {
        Ok((worker, key)) => call_one(shared, worker, make(key)).await,
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

/// A command on many keys: one request per worker that owns some of them.
/// For [`Merge::Values`], the positions of each worker's keys are filled in here.
async fn multi(shared: &Shared, keys: &[Bytes], mut merge: Merge, make: impl Fn(Vec<Key>) -> WorkerRequest) -> Pending {
    let workers = shared.links.len();
    let mut groups: Vec<(Vec<Key>, Vec<usize>)> = vec![(Vec::new(), Vec::new()); workers];
    for (position, key) in keys.iter().enumerate() {
        match route(shared, key) {
            Ok((worker, key)) => {
                groups[worker].0.push(key);
                groups[worker].1.push(position);
            }
            Err(reply) => return Pending::Ready(reply),
        }
    }
    let mut calls = Vec::new();
    let mut all_positions = Vec::new();
    for (worker, (keys, positions)) in groups.into_iter().enumerate() {
        if keys.is_empty() {
            continue;
        }
        calls.push(shared.links[worker].send(make(keys)).await);
        all_positions.push(positions);
    }
    if let Merge::Values { positions, .. } = &mut merge {
        *positions = all_positions;
    }
    Pending::Calls { calls, merge }
}

/// `SET key value [NX|XX] [GET] [KEEPTTL]`.
async fn set(shared: &Shared, collection: u16, args: &[Bytes]) -> Pending {
    let mut condition = SetCondition::Always;
    let mut reply = SetReply::Status;
    for option in &args[3..] {
        match option.to_ascii_uppercase().as_slice() {
            b"NX" if condition == SetCondition::Always => condition = SetCondition::IfAbsent,
            b"XX" if condition == SetCondition::Always => condition = SetCondition::IfPresent,
            b"GET" => reply = SetReply::OldValue,
            // No key has a time to live yet, so keeping it changes nothing.
            b"KEEPTTL" => {}
            b"EX" | b"PX" | b"EXAT" | b"PXAT" => {
                return Pending::Ready(Reply::error(
                    "ERR SET with an expiry (EX, PX, EXAT, PXAT) is not supported by this version of Shoal",
                ))
            }
            _ => return Pending::Ready(errors::syntax()),
        }
    }
    write_value(shared, &args[1], &args[2], |key, value| WorkerRequest::Set { collection, key, value, condition, reply })
        .await
}

/// `SHOAL.LOG partition from_commit_id [COUNT n]`.
async fn read_log(shared: &Shared, args: &[Bytes]) -> Pending {
    let partitions = shared.config.storage.partitions;
    let Some(partition) = parse_i64(&args[1]).filter(|p| (0..i64::from(partitions)).contains(p)) else {
        return Pending::Ready(Reply::error(format!("ERR partition must be between 0 and {}", partitions - 1)));
    };
    let Some(from_commit_id) = parse_i64(&args[2]).filter(|id| *id >= 0) else {
        return Pending::Ready(errors::not_integer());
    };
    let count = match &args[3..] {
        [] => LOG_DEFAULT_COUNT,
        [option, count] if option.eq_ignore_ascii_case(b"COUNT") => {
            match parse_i64(count).filter(|n| (1..=i64::from(LOG_MAX_COUNT)).contains(n)) {
                Some(n) => n as u32,
                None => return Pending::Ready(Reply::error(format!("ERR COUNT must be between 1 and {LOG_MAX_COUNT}"))),
            }
        }
        _ => return Pending::Ready(errors::syntax()),
    };
    let partition = partition as u16;
    let worker = partition_worker(partition, shared.links.len());
    call_one(shared, worker, WorkerRequest::ReadLog { partition, from_commit_id: from_commit_id as u64, count }).await
}

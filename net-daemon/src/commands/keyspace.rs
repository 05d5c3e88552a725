//! Keyspace commands: expiry (EXPIRE family, TTL family, PERSIST), TYPE, OBJECT,
//! MEMORY USAGE, the fan-out ones: SCAN, KEYS, RANDOMKEY, DBSIZE, FLUSHDB, FLUSHALL, and
//! SWAPDB.
//! In a cluster, SCAN, KEYS and the flushes go partition by partition, each to its
//! owner, so that a partition in the middle of a move is neither missed nor left
//! unflushed; DBSIZE adds up every host's workers.
//!
//! SCAN walks the workers in order, and each worker's B-tree in stored-key
//! order (partition, then key). A cursor names a position: the worker and
//! partition are encoded in the cursor itself, and the exact key to resume
//! after is kept in a bounded table under the cursor's token. A cursor whose
//! token is gone (evicted, or the daemon restarted) resumes at the start of
//! its partition: keys may then be returned twice, but none present for the
//! whole scan is missed.

use std::sync::Arc;

use bytes::Bytes;
use shoal_shared::frame::{ExpireCondition, WorkerRequest, WorkerResponse};
use shoal_shared::limits::MAX_STORED_KEY_BYTES;
use shoal_shared::resp::{parse_i64, Reply};

use super::strings::single;
use super::{call_all_sum, Pending, Session};
use crate::cursors::{partition_end, ScanPosition};
use crate::dispatch::wait_all;
use crate::errors;
use crate::state::Shared;
use crate::workers::Call;

/// Runs `name` if it is a keyspace command; `None` otherwise. Arity is already checked.
pub async fn dispatch(
    shared: &Arc<Shared>,
    session: &Session,
    name: &str,
    args: &[Bytes],
) -> Option<Pending> {
    let collection = session.collection;
    let pending = match name {
        "expire" | "pexpire" | "expireat" | "pexpireat" => {
            expire(shared, collection, name, args).await
        }
        "persist" => {
            single(shared, &args[1], |key| WorkerRequest::Persist {
                collection,
                key,
            })
            .await
        }
        "ttl" | "pttl" | "expiretime" | "pexpiretime" => {
            let name = match name {
                "ttl" => "ttl",
                "pttl" => "pttl",
                "expiretime" => "expiretime",
                _ => "pexpiretime",
            };
            match single(shared, &args[1], |key| WorkerRequest::ExpireTime {
                collection,
                key,
            })
            .await
            {
                Pending::Calls { calls, .. } => Pending::Calls {
                    calls,
                    merge: super::Merge::Expiry(name),
                },
                other => other,
            }
        }
        "object" => object(shared, session, args).await,
        "randomkey" => {
            let shared = Arc::clone(shared);
            Pending::barrier(async move { random_key(&shared, collection).await })
        }
        "memory" => memory(shared, collection, args).await,
        "dbsize" => call_all_sum(shared, || WorkerRequest::DbSize { collection }).await,
        "keys" => {
            let pattern = Some(args[1].to_vec());
            // In a cluster, each partition at its owner (a partition moving now is
            // answered once the move is done, never missed).
            let calls = match &shared.dispatch.router {
                Some(_) => {
                    per_partition(shared, |partition| WorkerRequest::Scan {
                        collection,
                        after: None,
                        count: u32::MAX,
                        pattern: pattern.clone(),
                        partition: Some(partition),
                        of_type: None,
                    })
                    .await
                }
                None => {
                    shared
                        .dispatch
                        .send_everywhere(|| WorkerRequest::Keys {
                            collection,
                            pattern: pattern.clone(),
                        })
                        .await
                }
            };
            Pending::barrier(async move {
                match wait_all(calls).await {
                    Ok(responses) => Reply::Array(
                        responses
                            .into_iter()
                            .flat_map(|response| match response {
                                WorkerResponse::Scanned { keys, .. } => keys,
                                _ => Vec::new(),
                            })
                            .map(|key| Reply::Bulk(key.into_vec().into()))
                            .collect(),
                    ),
                    Err(reply) => reply,
                }
            })
        }
        "scan" => {
            let shared = Arc::clone(shared);
            let args = args.to_vec();
            Pending::barrier(async move { scan(&shared, collection, &args).await })
        }
        "flushdb" | "flushall" => {
            if args.len() > 2
                || args.get(1).is_some_and(|mode| {
                    !mode.eq_ignore_ascii_case(b"SYNC") && !mode.eq_ignore_ascii_case(b"ASYNC")
                })
            {
                return Some(Pending::Ready(errors::syntax()));
            }
            let target = (name == "flushdb").then_some(collection);
            let calls = match &shared.dispatch.router {
                Some(_) => {
                    per_partition(shared, |partition| WorkerRequest::Flush {
                        collection: target,
                        partition: Some(partition),
                    })
                    .await
                }
                None => {
                    shared
                        .dispatch
                        .send_everywhere(|| WorkerRequest::Flush {
                            collection: target,
                            partition: None,
                        })
                        .await
                }
            };
            Pending::barrier(async move {
                match wait_all(calls).await {
                    Ok(_) => Reply::Ok,
                    Err(reply) => reply,
                }
            })
        }
        "swapdb" => swapdb(shared, args),
        _ => return None,
    };
    Some(pending)
}

/// SWAPDB a b: clients of database `a` see `b`'s keys and the other way round, from one
/// instant on every worker ([`crate::databases`]). A host in a cluster refuses it, as
/// Redis Cluster does (its databases are the cluster's, not the host's).
fn swapdb(shared: &Arc<Shared>, args: &[Bytes]) -> Pending {
    if shared.cluster.is_some() {
        return Pending::Ready(Reply::error("ERR SWAPDB is not allowed in cluster mode"));
    }
    let index = |arg: &[u8], which: &str| {
        parse_i64(arg)
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(|| Reply::error(format!("ERR invalid {which} DB index")))
    };
    let (a, b) = match (index(&args[1], "first"), index(&args[2], "second")) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(reply), _) | (_, Err(reply)) => return Pending::Ready(reply),
    };
    let count = i32::from(shared.config.storage.collections);
    if !(0..count).contains(&a) || !(0..count).contains(&b) {
        return Pending::Ready(Reply::error("ERR DB index is out of range"));
    }
    let shared = Arc::clone(shared);
    Pending::Blocking(Box::pin(async move {
        match shared.databases.swap(a as u16, b as u16).await {
            Ok(()) => {
                // A pop blocked on either database may find keys there now.
                shared.blocked.wake_all();
                Reply::Ok
            }
            Err(error) => Reply::error(format!("ERR {error}")),
        }
    }))
}

/// Sends one request per partition, each to the partition's owner.
async fn per_partition(shared: &Shared, make: impl Fn(u16) -> WorkerRequest) -> Vec<Call> {
    let mut calls = Vec::with_capacity(usize::from(shared.config.storage.partitions));
    for partition in 0..shared.config.storage.partitions {
        let dest = shared.dispatch.of_partition(partition);
        calls.push(shared.dispatch.send(dest, make(partition)).await);
    }
    calls
}

/// Sends one request for one key and waits for the answer.
async fn ask_one(
    shared: &Shared,
    key: &Bytes,
    make: impl FnOnce(shoal_shared::frame::Key) -> WorkerRequest,
) -> Result<WorkerResponse, Reply> {
    let (dest, key) = shared.dispatch.route(key)?;
    shared.dispatch.ask_dest(dest, make(key)).await
}

async fn exists(shared: &Shared, collection: u16, key: &Bytes) -> Result<bool, Reply> {
    match ask_one(shared, key, |key| WorkerRequest::Exists {
        collection,
        keys: vec![key],
    })
    .await?
    {
        WorkerResponse::Integer(n) => Ok(n > 0),
        _ => Err(Reply::error("ERR internal error: unexpected response")),
    }
}

/// `EXPIRE key seconds [NX|XX|GT|LT]` and its PEXPIRE/EXPIREAT/PEXPIREAT forms.
async fn expire(shared: &Shared, collection: u16, name: &str, args: &[Bytes]) -> Pending {
    let Some(amount) = parse_i64(&args[2]) else {
        return Pending::Ready(errors::not_integer());
    };
    let mut condition = ExpireCondition::Always;
    for option in &args[3..] {
        let next = match option.to_ascii_uppercase().as_slice() {
            b"NX" => ExpireCondition::IfNone,
            b"XX" => ExpireCondition::IfSome,
            b"GT" => ExpireCondition::IfGreater,
            b"LT" => ExpireCondition::IfLess,
            _ => {
                return Pending::Ready(Reply::error(format!(
                    "ERR Unsupported option {}",
                    String::from_utf8_lossy(option)
                )))
            }
        };
        if condition != ExpireCondition::Always && condition != next {
            let both = matches!(
                (condition, next),
                (ExpireCondition::IfGreater, ExpireCondition::IfLess)
                    | (ExpireCondition::IfLess, ExpireCondition::IfGreater)
            );
            return Pending::Ready(Reply::error(if both {
                "ERR GT and LT options at the same time are not compatible"
            } else {
                "ERR NX and XX, GT or LT options at the same time are not compatible"
            }));
        }
        condition = next;
    }
    let invalid = || {
        Pending::Ready(Reply::error(format!(
            "ERR invalid expire time in '{name}' command"
        )))
    };
    let unit: i64 = if name.starts_with('p') { 1 } else { 1000 };
    let Some(ms) = amount.checked_mul(unit) else {
        return invalid();
    };
    let at = if name.ends_with("at") {
        Some(ms)
    } else {
        (shoal_shared::now_ms() as i64).checked_add(ms)
    };
    let Some(at) = at else { return invalid() };
    // A time in the past deletes the key; the worker sees any value <= now as past.
    let at_ms = at.max(0) as u64;
    single(shared, &args[1], |key| WorkerRequest::Expire {
        collection,
        key,
        at_ms,
        condition,
    })
    .await
}

/// `OBJECT ENCODING key` (always "raw" for an existing key) and the other introspection
/// subcommands Shoal can answer.
async fn object(shared: &Shared, session: &Session, args: &[Bytes]) -> Pending {
    let collection = session.collection;
    let subcommand = args[1].to_ascii_uppercase();
    let reply = match (subcommand.as_slice(), args.len()) {
        (b"ENCODING", 3) => {
            let op = shoal_shared::frame::TypedOp::Encoding;
            return super::types::run(shared, session, &args[2], op, super::types::Shape::Plain)
                .await;
        }
        (b"REFCOUNT" | b"IDLETIME", 3) => match exists(shared, collection, &args[2]).await {
            Ok(false) => Reply::Nil,
            Ok(true) if subcommand == b"REFCOUNT" => Reply::Integer(1),
            Ok(true) => Reply::Integer(0),
            Err(reply) => reply,
        },
        (b"FREQ", 3) => match exists(shared, collection, &args[2]).await {
            Ok(false) => Reply::Nil,
            // As Redis answers without an LFU eviction policy: Shoal counts no accesses.
            Ok(true) => Reply::error(
                "ERR An LFU maxmemory policy is not selected, access frequency not tracked. \
                 Please note that when switching between policies at runtime LRU and LFU data \
                 will take some time to adjust.",
            ),
            Err(reply) => reply,
        },
        (b"ENCODING" | b"REFCOUNT" | b"IDLETIME" | b"FREQ", _) => errors::wrong_arity(&format!(
            "object|{}",
            String::from_utf8_lossy(&subcommand).to_lowercase()
        )),
        _ => Reply::error(format!(
            "ERR unknown subcommand '{}'. Try OBJECT HELP.",
            String::from_utf8_lossy(&args[1])
        )),
    };
    Pending::Ready(reply)
}

/// `RANDOMKEY`: the first live key after a random point of a random partition, the
/// partitions walked from there (each at its owner) and the first one again from its
/// start; nil when the collection is empty.
async fn random_key(shared: &Shared, collection: u16) -> Reply {
    match call_all_sum(shared, || WorkerRequest::DbSize { collection })
        .await
        .resolve()
        .await
    {
        Reply::Integer(0) => return Reply::Nil,
        Reply::Integer(_) => {}
        other => return other,
    }
    let partitions = shared.config.storage.partitions;
    let random = shoal_shared::random_u64();
    let start = (random % u64::from(partitions)) as u16;
    let mut point = start.to_be_bytes().to_vec();
    point.extend_from_slice(&(random >> 16).to_be_bytes());
    for step in 0..=partitions {
        let partition = ((u32::from(start) + u32::from(step)) % u32::from(partitions)) as u16;
        let request = WorkerRequest::Scan {
            collection,
            after: (step == 0).then(|| point.clone()),
            count: 64,
            pattern: None,
            partition: Some(partition),
            of_type: None,
        };
        match shared
            .dispatch
            .ask_dest(shared.dispatch.of_partition(partition), request)
            .await
        {
            Ok(WorkerResponse::Scanned { keys, .. }) => {
                if let Some(key) = keys.into_iter().next() {
                    return Reply::Bulk(key.into_vec().into());
                }
            }
            Ok(_) => return Reply::error("ERR internal error: unexpected scan response"),
            // A partition that cannot answer now (moving, failing over) is passed over.
            Err(_) => {}
        }
    }
    // Every key expired or went away meanwhile.
    Reply::Nil
}

/// Bytes a stored string costs beyond its key and value: the partition prefix, the value
/// header with an expiry, and LMDB's node header.
const RECORD_OVERHEAD_BYTES: usize = 2 + 17 + 8;

/// `MEMORY USAGE key [SAMPLES n]`: the bytes the key's record takes on disk, as an
/// estimate (key, value and [`RECORD_OVERHEAD_BYTES`]); nil for a missing key.
/// `MEMORY DOCTOR`, `STATS` and the others are not there.
async fn memory(shared: &Shared, collection: u16, args: &[Bytes]) -> Pending {
    let subcommand = args[1].to_ascii_uppercase();
    match (subcommand.as_slice(), &args[2..]) {
        (b"USAGE", [key, rest @ ..]) => {
            match rest {
                [] => {}
                [option, count] if option.eq_ignore_ascii_case(b"SAMPLES") => {
                    if parse_i64(count).is_none() {
                        return Pending::Ready(errors::not_integer());
                    }
                }
                _ => return Pending::Ready(errors::syntax()),
            }
            let key_len = key.len();
            super::dump::whole(shared, collection, key, move |found| match found {
                Some((_, value)) => {
                    Reply::Integer((key_len + value.len() + RECORD_OVERHEAD_BYTES) as i64)
                }
                None => Reply::Nil,
            })
            .await
        }
        (b"USAGE", _) => Pending::Ready(errors::wrong_arity("memory|usage")),
        _ => Pending::Ready(Reply::error(format!(
            "ERR unknown subcommand '{}'. Try MEMORY HELP.",
            String::from_utf8_lossy(&args[1])
        ))),
    }
}

/// SCAN in a cluster: partition by partition, each asked of its owner wherever it is, so a
/// cursor (a partition and a key in it) stays valid while partitions move between hosts.
async fn scan_partitions(
    shared: &Shared,
    collection: u16,
    cursor: u64,
    count: u32,
    pattern: Option<Vec<u8>>,
    of_type: Option<String>,
) -> Reply {
    let Some(position) = shared.scan_cursors.load(cursor, 1) else {
        return Reply::error("ERR invalid cursor");
    };
    let partitions = shared.config.storage.partitions;
    let mut after = position.after;
    let mut keys = Vec::new();
    loop {
        let (partition, past_its_end) = match after.as_deref() {
            // Past every key of its partition: the next partition, from its start.
            Some(key @ [high, low, ..]) => (
                u16::from_be_bytes([*high, *low]),
                key.len() > MAX_STORED_KEY_BYTES,
            ),
            _ => (0, false),
        };
        let partition = if past_its_end {
            after = None;
            partition + 1
        } else {
            partition
        };
        if partition >= partitions {
            return Reply::Array(vec![Reply::bulk("0"), Reply::Array(keys)]);
        }
        let request = WorkerRequest::Scan {
            collection,
            after: after.clone(),
            count,
            pattern: pattern.clone(),
            partition: Some(partition),
            of_type: of_type.clone(),
        };
        match shared
            .dispatch
            .ask_dest(shared.dispatch.of_partition(partition), request)
            .await
        {
            Ok(WorkerResponse::Scanned { keys: found, next }) => {
                keys.extend(found.into_iter().map(|k| Reply::Bulk(k.into_vec().into())));
                match next {
                    Some(next) => {
                        after = Some(next);
                        break;
                    }
                    None => {
                        after = Some(partition_end(partition));
                        if keys.len() >= count as usize && partition + 1 < partitions {
                            break;
                        }
                    }
                }
            }
            Ok(_) => return Reply::error("ERR internal error: unexpected scan response"),
            Err(reply) => return reply,
        }
    }
    let next = shared.scan_cursors.save(&ScanPosition { worker: 0, after });
    Reply::Array(vec![Reply::bulk(next.to_string()), Reply::Array(keys)])
}

/// `SCAN cursor [MATCH pattern] [COUNT count] [TYPE type]`.
async fn scan(shared: &Shared, collection: u16, args: &[Bytes]) -> Reply {
    let Some(cursor) = std::str::from_utf8(&args[1])
        .ok()
        .and_then(|c| c.parse::<u64>().ok())
    else {
        return Reply::error("ERR invalid cursor");
    };
    let mut pattern = None;
    let mut count: u32 = 10;
    let mut of_type = None;
    let mut options = args[2..].iter();
    while let Some(option) = options.next() {
        let Some(value) = options.next() else {
            return errors::syntax();
        };
        match option.to_ascii_uppercase().as_slice() {
            b"MATCH" => pattern = Some(value.to_vec()),
            b"COUNT" => match parse_i64(value) {
                Some(n) if n >= 1 => count = n.min(100_000) as u32,
                Some(_) => return errors::syntax(),
                None => return errors::not_integer(),
            },
            b"TYPE" => of_type = Some(String::from_utf8_lossy(value).to_lowercase()),
            _ => return errors::syntax(),
        }
    }
    if shared.dispatch.router.is_some() {
        return scan_partitions(shared, collection, cursor, count, pattern, of_type).await;
    }
    let workers = shared.dispatch.links.len();
    let Some(mut position) = shared.scan_cursors.load(cursor, workers) else {
        return Reply::error("ERR invalid cursor");
    };
    let mut keys = Vec::new();
    loop {
        let request = WorkerRequest::Scan {
            collection,
            after: position.after.clone(),
            count,
            pattern: pattern.clone(),
            partition: None,
            of_type: of_type.clone(),
        };
        match shared.dispatch.ask(position.worker, request).await {
            Ok(WorkerResponse::Scanned { keys: found, next }) => {
                keys.extend(found.into_iter().map(|k| Reply::Bulk(k.into_vec().into())));
                match next {
                    Some(after) => {
                        position.after = Some(after);
                        break;
                    }
                    None if position.worker + 1 < workers => {
                        position = ScanPosition {
                            worker: position.worker + 1,
                            after: None,
                        };
                        if keys.len() >= count as usize {
                            break;
                        }
                    }
                    None => {
                        return Reply::Array(vec![Reply::bulk("0"), Reply::Array(keys)]);
                    }
                }
            }
            Ok(_) => return Reply::error("ERR internal error: unexpected scan response"),
            Err(reply) => return reply,
        }
    }
    let next = shared.scan_cursors.save(&position);
    Reply::Array(vec![Reply::bulk(next.to_string()), Reply::Array(keys)])
}

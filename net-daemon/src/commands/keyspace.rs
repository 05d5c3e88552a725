//! Keyspace commands: expiry (EXPIRE family, TTL family, PERSIST), TYPE,
//! OBJECT ENCODING, and the fan-out ones: SCAN, KEYS, DBSIZE, FLUSHDB, FLUSHALL.
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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use shoal_shared::frame::{ExpireCondition, WorkerRequest, WorkerResponse};
use shoal_shared::limits::MAX_STORED_KEY_BYTES;
use shoal_shared::resp::{parse_i64, Reply};

use super::strings::single;
use super::{ask, call_all_sum, send_everywhere, wait_all, Pending, Session};
use crate::errors;
use crate::workers::Call;
use crate::Shared;

/// Cursors kept for SCAN; older ones fall back to their partition's start.
const MAX_SCAN_CURSORS: usize = 100_000;
/// Cursor layout (all below bit 63, so clients that read it as a signed integer cope):
/// worker in bits 55..63, partition in bits 39..55, token below.
const CURSOR_TOKEN_BITS: u32 = 39;
const CURSOR_WORKER_SHIFT: u32 = 55;

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
            let reply = match ask_one(shared, &args[1], |key| WorkerRequest::ExpireTime {
                collection,
                key,
            })
            .await
            {
                Ok(WorkerResponse::Integer(at)) if at < 0 => Reply::Integer(at),
                Ok(WorkerResponse::Integer(at)) => {
                    let remaining_ms = (at - shoal_shared::now_ms() as i64).max(0);
                    Reply::Integer(match name {
                        "ttl" => (remaining_ms + 500) / 1000,
                        "pttl" => remaining_ms,
                        "expiretime" => at / 1000,
                        _ => at,
                    })
                }
                Ok(_) => Reply::error("ERR internal error: unexpected response"),
                Err(reply) => reply,
            };
            Pending::Ready(reply)
        }
        "type" => Pending::Ready(match exists(shared, collection, &args[1]).await {
            Ok(true) => Reply::Simple("string".into()),
            Ok(false) => Reply::Simple("none".into()),
            Err(reply) => reply,
        }),
        "object" => object(shared, collection, args).await,
        "dbsize" => call_all_sum(shared, || WorkerRequest::DbSize { collection }).await,
        "keys" => {
            let pattern = Some(args[1].to_vec());
            // In a cluster, each partition at its owner (a partition moving now is
            // answered once the move is done, never missed).
            let calls = match &shared.router {
                Some(_) => {
                    per_partition(shared, |partition| WorkerRequest::Scan {
                        collection,
                        after: None,
                        count: u32::MAX,
                        pattern: pattern.clone(),
                        partition: Some(partition),
                    })
                    .await
                }
                None => {
                    send_everywhere(shared, || WorkerRequest::Keys {
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
            let calls = match &shared.router {
                Some(_) => {
                    per_partition(shared, |partition| WorkerRequest::Flush {
                        collection: target,
                        partition: Some(partition),
                    })
                    .await
                }
                None => {
                    send_everywhere(shared, || WorkerRequest::Flush {
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
        _ => return None,
    };
    Some(pending)
}

/// Sends one request per partition, each to the partition's owner.
async fn per_partition(shared: &Shared, make: impl Fn(u16) -> WorkerRequest) -> Vec<Call> {
    let mut calls = Vec::with_capacity(usize::from(shared.config.storage.partitions));
    for partition in 0..shared.config.storage.partitions {
        let dest = super::Dest::of_partition(shared, partition);
        calls.push(super::send(shared, dest, make(partition)).await);
    }
    calls
}

/// Sends one request for one key and waits for the answer.
async fn ask_one(
    shared: &Shared,
    key: &Bytes,
    make: impl FnOnce(shoal_shared::frame::Key) -> WorkerRequest,
) -> Result<WorkerResponse, Reply> {
    let (dest, key) = super::route(shared, key)?;
    super::ask_dest(shared, dest, make(key)).await
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
async fn object(shared: &Shared, collection: u16, args: &[Bytes]) -> Pending {
    let subcommand = args[1].to_ascii_uppercase();
    let reply = match (subcommand.as_slice(), args.len()) {
        (b"ENCODING" | b"REFCOUNT" | b"IDLETIME", 3) => {
            match exists(shared, collection, &args[2]).await {
                Ok(false) => Reply::Nil,
                Ok(true) if subcommand == b"ENCODING" => Reply::bulk("raw"),
                Ok(true) if subcommand == b"REFCOUNT" => Reply::Integer(1),
                Ok(true) => Reply::Integer(0),
                Err(reply) => reply,
            }
        }
        (b"ENCODING" | b"REFCOUNT" | b"IDLETIME", _) => errors::wrong_arity(&format!(
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

/// SCAN in a cluster: partition by partition, each asked of its owner wherever it is, so a
/// cursor (a partition and a key in it) stays valid while partitions move between hosts.
async fn scan_partitions(
    shared: &Shared,
    collection: u16,
    cursor: u64,
    count: u32,
    pattern: Option<Vec<u8>>,
    only_strings: bool,
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
            let keys = if only_strings { keys } else { Vec::new() };
            return Reply::Array(vec![Reply::bulk("0"), Reply::Array(keys)]);
        }
        let request = WorkerRequest::Scan {
            collection,
            after: after.clone(),
            count,
            pattern: pattern.clone(),
            partition: Some(partition),
        };
        match super::ask_dest(
            shared,
            super::Dest::of_partition(shared, partition),
            request,
        )
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
    let keys = if only_strings { keys } else { Vec::new() };
    Reply::Array(vec![Reply::bulk(next.to_string()), Reply::Array(keys)])
}

/// A stored key after every key of `partition`: a scan resuming after it starts the next.
fn partition_end(partition: u16) -> Vec<u8> {
    let mut end = partition.to_be_bytes().to_vec();
    end.extend(std::iter::repeat_n(0xff, MAX_STORED_KEY_BYTES + 1));
    end
}

/// Where a SCAN resumes: the worker, and the stored key (partition ++ key) to continue after.
#[derive(Clone)]
struct ScanPosition {
    worker: usize,
    after: Option<Vec<u8>>,
}

/// Positions of SCANs in progress, under their cursor tokens; bounded, oldest dropped first.
#[derive(Default)]
pub struct ScanCursors {
    next_token: AtomicU64,
    table: Mutex<CursorTable>,
}

/// Resume keys by token, and the tokens in the order they were made (for eviction).
type CursorTable = (HashMap<u64, Vec<u8>>, VecDeque<u64>);

impl ScanCursors {
    /// A cursor for `position`: worker (8 bits) and partition (16 bits) above a token.
    fn save(&self, position: &ScanPosition) -> u64 {
        let after = position.after.clone().unwrap_or_default();
        let partition = match after.as_slice() {
            [high, low, ..] => u64::from(u16::from_be_bytes([*high, *low])),
            _ => 0,
        };
        let token =
            (self.next_token.fetch_add(1, Ordering::Relaxed) % ((1 << CURSOR_TOKEN_BITS) - 1)) + 1;
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let (map, order) = &mut *table;
        map.insert(token, after);
        order.push_back(token);
        while order.len() > MAX_SCAN_CURSORS {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
        ((position.worker as u64) << CURSOR_WORKER_SHIFT) | (partition << CURSOR_TOKEN_BITS) | token
    }

    /// The position a cursor names; `None` for a malformed cursor.
    fn load(&self, cursor: u64, workers: usize) -> Option<ScanPosition> {
        if cursor == 0 {
            return Some(ScanPosition {
                worker: 0,
                after: None,
            });
        }
        let worker = (cursor >> CURSOR_WORKER_SHIFT) as usize;
        let partition = ((cursor >> CURSOR_TOKEN_BITS) & 0xffff) as u16;
        let token = cursor & ((1 << CURSOR_TOKEN_BITS) - 1);
        if worker >= workers || token == 0 {
            return None;
        }
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let after = match table.0.get(&token) {
            Some(after)
                if after.len() >= 2 && u16::from_be_bytes([after[0], after[1]]) == partition =>
            {
                after.clone()
            }
            // Unknown token: restart at the beginning of the partition, after every key
            // of the partition before it.
            _ => match partition.checked_sub(1) {
                Some(previous) => partition_end(previous),
                None => {
                    return Some(ScanPosition {
                        worker,
                        after: None,
                    })
                }
            },
        };
        Some(ScanPosition {
            worker,
            after: Some(after),
        })
    }
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
    let mut only_strings = true;
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
            b"TYPE" => only_strings = value.eq_ignore_ascii_case(b"string"),
            _ => return errors::syntax(),
        }
    }
    if shared.router.is_some() {
        return scan_partitions(shared, collection, cursor, count, pattern, only_strings).await;
    }
    let workers = shared.links.len();
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
        };
        match ask(shared, position.worker, request).await {
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
                        let keys = if only_strings { keys } else { Vec::new() };
                        return Reply::Array(vec![Reply::bulk("0"), Reply::Array(keys)]);
                    }
                }
            }
            Ok(_) => return Reply::error("ERR internal error: unexpected scan response"),
            Err(reply) => return reply,
        }
    }
    let next = shared.scan_cursors.save(&position);
    let keys = if only_strings { keys } else { Vec::new() };
    Reply::Array(vec![Reply::bulk(next.to_string()), Reply::Array(keys)])
}

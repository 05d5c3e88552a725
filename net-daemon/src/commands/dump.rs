//! DUMP and RESTORE with Shoal's own payload: a key's value, serialized so that
//! RESTORE on any Shoal host recreates it. The payload is not Redis's RDB format (a
//! Redis server refuses it, and Shoal refuses Redis's), but it has the same shape: the
//! data, then a version, then a checksum over both.
//!
//! Payload, byte by byte:
//!
//! | bytes | field                                                  |
//! |-------|--------------------------------------------------------|
//! | 1     | the value's type: `00` string, `01` a typed key        |
//! | n     | the value, or a typed key's snapshot (its type and elements, as `shoal_shared::layout::typed::encode_snapshot` writes it) |
//! | 2     | ASCII `SH`                                             |
//! | 1     | the payload version, `01`                              |
//! | 8     | FNV-1a 64 of every byte before, big-endian             |

use bytes::Bytes;
use shoal_shared::frame::{
    Expiry, Key, SetCondition, SetReply, TxAction, TxOp, TxOutcome, WorkerError, WorkerRequest,
    WorkerResponse,
};
use shoal_shared::resp::{parse_i64, Reply};

use super::strings::single;
use super::{Pending, Session};
use crate::errors;
use crate::state::Shared;

const STRING_TYPE: u8 = 0;
const TYPED_TYPE: u8 = 1;
const MAGIC: &[u8; 2] = b"SH";
const VERSION: u8 = 1;
/// The bytes after the value.
const TRAILER_BYTES: usize = MAGIC.len() + 1 + 8;

/// Runs `name` if it is DUMP or RESTORE; `None` otherwise. Arity is already checked.
pub async fn dispatch(
    shared: &Shared,
    session: &Session,
    name: &str,
    args: &[Bytes],
) -> Option<Pending> {
    let collection = session.collection;
    let pending = match name {
        "dump" => {
            whole(shared, collection, &args[1], |found| match found {
                Some((kind, bytes)) => Reply::Bulk(payload(kind, &bytes).into()),
                None => Reply::Nil,
            })
            .await
        }
        "restore" => restore(shared, collection, args).await,
        _ => return None,
    };
    Some(pending)
}

/// A key's whole value, of any type: `(STRING_TYPE, value)` or `(TYPED_TYPE, snapshot)`,
/// `None` when missing, passed to `compute` (DUMP, MEMORY USAGE).
pub async fn whole(
    shared: &Shared,
    collection: u16,
    key: &Bytes,
    compute: impl FnOnce(Option<(u8, Vec<u8>)>) -> Reply + Send + 'static,
) -> Pending {
    let (dest, key) = match shared.dispatch.route(key) {
        Ok(routed) => routed,
        Err(reply) => return Pending::Ready(reply),
    };
    let read = TxOp {
        collection,
        key,
        action: TxAction::Read,
    };
    let call = shared
        .dispatch
        .send(dest, WorkerRequest::Atomic { ops: vec![read] })
        .await;
    Pending::barrier(async move {
        match call.wait().await {
            Ok(WorkerResponse::TxOutcomes(outcomes)) => match outcomes.into_iter().next() {
                Some(TxOutcome::Value { value, .. }) => compute(Some((STRING_TYPE, value))),
                Some(TxOutcome::Collection { snapshot, .. }) => {
                    compute(Some((TYPED_TYPE, snapshot)))
                }
                _ => compute(None),
            },
            Ok(WorkerResponse::Error(WorkerError::TxNoSuchKey)) => compute(None),
            Ok(other) => super::response_reply(other),
            Err(error) => errors::link_error(&error),
        }
    })
}

/// Stores a typed key's snapshot under `key`: `Integer(1)` when written, `Integer(0)`
/// when `if_absent` and the key exists (as SET NX answers for a string).
pub async fn put_collection(
    shared: &Shared,
    collection: u16,
    key: &Bytes,
    snapshot: Vec<u8>,
    expires_at_ms: Option<u64>,
    if_absent: bool,
) -> Pending {
    let (dest, key) = match shared.dispatch.route(key) {
        Ok(routed) => routed,
        Err(reply) => return Pending::Ready(reply),
    };
    let put = TxOp {
        collection,
        key,
        action: TxAction::PutCollection {
            snapshot,
            expires_at_ms,
            if_absent,
        },
    };
    let call = shared
        .dispatch
        .send(dest, WorkerRequest::Atomic { ops: vec![put] })
        .await;
    Pending::barrier(async move {
        match call.wait().await {
            Ok(WorkerResponse::TxOutcomes(_)) => Reply::Integer(1),
            Ok(WorkerResponse::Error(WorkerError::TxKeyExists)) => Reply::Integer(0),
            Ok(other) => super::response_reply(other),
            Err(error) => errors::link_error(&error),
        }
    })
}

/// The payload of a value of type `kind` (`STRING_TYPE` or `TYPED_TYPE`).
fn payload(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(1 + value.len() + TRAILER_BYTES);
    bytes.push(kind);
    bytes.extend_from_slice(value);
    bytes.extend_from_slice(MAGIC);
    bytes.push(VERSION);
    let checksum = fnv1a(&bytes);
    bytes.extend_from_slice(&checksum.to_be_bytes());
    bytes
}

/// The type and value a payload holds, if it is one of this version with a good checksum.
fn value_of(payload: &[u8]) -> Option<(u8, &[u8])> {
    if payload.len() < 1 + TRAILER_BYTES {
        return None;
    }
    let (body, checksum) = payload.split_at(payload.len() - 8);
    let checksum = u64::from_be_bytes(checksum.try_into().ok()?);
    let (data, version) = body.split_at(body.len() - MAGIC.len() - 1);
    if fnv1a(body) != checksum || version[..2] != MAGIC[..] || version[2] != VERSION {
        return None;
    }
    match data.split_first() {
        Some((&STRING_TYPE, value)) => Some((STRING_TYPE, value)),
        Some((&TYPED_TYPE, snapshot))
            if shoal_shared::layout::typed::decode_snapshot(snapshot).is_ok() =>
        {
            Some((TYPED_TYPE, snapshot))
        }
        _ => None,
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `RESTORE key ttl payload [REPLACE] [ABSTTL] [IDLETIME s] [FREQ n]`, its errors in
/// Redis's order: the options, then an existing key without REPLACE, then the TTL, then
/// the payload. IDLETIME and FREQ are checked and otherwise ignored (Shoal keeps no
/// access statistics).
async fn restore(shared: &Shared, collection: u16, args: &[Bytes]) -> Pending {
    let (mut replace, mut absolute, mut idle, mut freq) = (false, false, false, false);
    let mut i = 4;
    while i < args.len() {
        let more = i + 1 < args.len();
        match args[i].to_ascii_uppercase().as_slice() {
            b"REPLACE" => replace = true,
            b"ABSTTL" => absolute = true,
            b"IDLETIME" if more && !freq => {
                match parse_i64(&args[i + 1]) {
                    None => return Pending::Ready(errors::not_integer()),
                    Some(n) if n < 0 => {
                        return Pending::Ready(Reply::error(
                            "ERR Invalid IDLETIME value, must be >= 0",
                        ))
                    }
                    Some(_) => idle = true,
                }
                i += 1;
            }
            b"FREQ" if more && !idle => {
                match parse_i64(&args[i + 1]) {
                    None => return Pending::Ready(errors::not_integer()),
                    Some(n) if !(0..=255).contains(&n) => {
                        return Pending::Ready(Reply::error(
                            "ERR Invalid FREQ value, must be >= 0 and <= 255",
                        ))
                    }
                    Some(_) => freq = true,
                }
                i += 1;
            }
            _ => return Pending::Ready(errors::syntax()),
        }
        i += 1;
    }
    let exists = if replace {
        None
    } else {
        Some(
            single(shared, &args[1], |key: Key| WorkerRequest::Exists {
                collection,
                keys: vec![key],
            })
            .await,
        )
    };
    let ttl = parse_i64(&args[2]);
    let value = value_of(&args[3]).map(|(kind, value)| (kind, value.to_vec()));
    let max = shared.config.client.max_value_bytes;
    let set = match (ttl, &value) {
        (Some(ttl), Some((kind, value))) if ttl >= 0 && value.len() <= max => {
            let expiry = match (ttl, absolute) {
                (0, _) => Expiry::Clear,
                (at, true) => Expiry::At(at as u64),
                (ms, false) => Expiry::At(shoal_shared::now_ms().saturating_add(ms as u64)),
            };
            let condition = if replace {
                SetCondition::Always
            } else {
                SetCondition::IfAbsent
            };
            let value = value.clone();
            Some(match *kind {
                STRING_TYPE => {
                    single(shared, &args[1], |key| WorkerRequest::Set {
                        collection,
                        key,
                        value,
                        condition,
                        reply: SetReply::WrittenFlag,
                        expiry,
                    })
                    .await
                }
                _ => {
                    let expires_at_ms = match expiry {
                        Expiry::At(at) => Some(at),
                        _ => None,
                    };
                    put_collection(shared, collection, &args[1], value, expires_at_ms, !replace)
                        .await
                }
            })
        }
        _ => None,
    };
    Pending::barrier(async move {
        let busy = || Reply::error("BUSYKEY Target key name already exists.");
        if let Some(exists) = exists {
            match exists.resolve().await {
                Reply::Integer(0) => {}
                Reply::Integer(_) => return busy(),
                other => return other,
            }
        }
        match (ttl, value) {
            (None, _) => return errors::not_integer(),
            (Some(ttl), _) if ttl < 0 => {
                return Reply::error("ERR Invalid TTL value, must be >= 0")
            }
            (_, None) => return Reply::error("ERR DUMP payload version or checksum are wrong"),
            (_, Some((_, value))) if value.len() > max => return errors::value_too_large(max),
            _ => {}
        }
        match set {
            // An expiry already past stores nothing (the worker drops it at once).
            Some(set) => match set.resolve().await {
                Reply::Integer(1) => Reply::Ok,
                Reply::Integer(_) => busy(),
                other => other,
            },
            None => errors::syntax(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_holds_its_value_and_refuses_any_change() {
        for value in [&b""[..], b"v", b"\x00\xffSH\x01binary"] {
            assert_eq!(
                value_of(&payload(STRING_TYPE, value)),
                Some((STRING_TYPE, value))
            );
        }
        let snapshot = shoal_shared::layout::typed::encode_snapshot(
            shoal_shared::layout::typed::Kind::Set,
            &[(b"m".to_vec(), Vec::new())],
        );
        assert_eq!(
            value_of(&payload(TYPED_TYPE, &snapshot)),
            Some((TYPED_TYPE, &snapshot[..]))
        );
        let good = payload(STRING_TYPE, b"value");
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x20;
            assert_eq!(value_of(&bad), None, "byte {at} changed");
        }
        assert_eq!(value_of(&good[..good.len() - 1]), None);
        assert_eq!(value_of(b""), None);
        // A Redis payload (RDB version 10, CRC64) is refused.
        assert_eq!(
            value_of(b"\x00\x03bar\n\x00\xa8\xe3\x1b\xf4\xb4\xd2\x88\xe9"),
            None
        );
    }
}

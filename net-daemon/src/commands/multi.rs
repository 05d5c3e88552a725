//! Multi-key writes, atomic even when their keys live on different workers:
//! MSET, MSETNX, DEL/UNLINK, RENAME, RENAMENX, COPY, MOVE. Each is turned into
//! per-worker transaction ops and run by [`crate::txn::run`] (one worker: one
//! LMDB transaction; several: two-phase commit). They are barriers: they run
//! after the connection's earlier commands and before its later ones.

use std::sync::Arc;

use bytes::Bytes;
use shoal_shared::frame::{Key, TxAction, TxOp, TxOutcome, WorkerError, WorkerRequest};
use shoal_shared::resp::Reply;

use super::{Merge, Pending, Session};
use crate::databases;
use crate::dispatch::Dest;
use crate::errors;
use crate::state::Shared;
use crate::txn::{self, Participant, TxFailure};

/// Runs `name` if it is a multi-key write; `None` otherwise. Arity is already checked.
pub async fn dispatch(
    shared: &Arc<Shared>,
    session: &Session,
    name: &str,
    args: &[Bytes],
) -> Option<Pending> {
    let collection = session.collection;
    let count = shared.config.storage.collections;
    let work = match name {
        "mset" | "msetnx" => {
            if args.len().is_multiple_of(2) {
                return Some(Pending::Ready(errors::wrong_arity(name)));
            }
            let max = shared.config.client.max_value_bytes;
            if args[2..].iter().step_by(2).any(|value| value.len() > max) {
                return Some(Pending::Ready(errors::value_too_large(max)));
            }
            Work::Mset {
                pairs: args[1..]
                    .chunks(2)
                    .map(|pair| (pair[0].clone(), pair[1].clone()))
                    .collect(),
                if_absent: name == "msetnx",
            }
        }
        "del" | "unlink" => {
            let mut keys: Vec<Bytes> = args[1..].to_vec();
            keys.sort();
            keys.dedup();
            Work::Delete { keys }
        }
        "rename" | "renamenx" => Work::Rename {
            from: args[1].clone(),
            to: args[2].clone(),
            if_absent: name == "renamenx",
        },
        "copy" => {
            let mut to_collection = collection;
            let mut replace = false;
            let mut options = args[3..].iter();
            while let Some(option) = options.next() {
                match option.to_ascii_uppercase().as_slice() {
                    b"REPLACE" => replace = true,
                    b"DB" => match options.next().map(|db| databases::number(db, count)) {
                        Some(Ok(db)) => to_collection = session.collection_of(db),
                        Some(Err(reply)) => return Some(Pending::Ready(reply)),
                        None => return Some(Pending::Ready(errors::syntax())),
                    },
                    _ => return Some(Pending::Ready(errors::syntax())),
                }
            }
            if args[1] == args[2] && to_collection == collection {
                return Some(Pending::Ready(Reply::error(
                    "ERR source and destination objects are the same",
                )));
            }
            Work::Copy {
                from: args[1].clone(),
                to: args[2].clone(),
                to_collection,
                replace,
            }
        }
        "move" => {
            let to_collection = match databases::number(&args[2], count) {
                Ok(db) => session.collection_of(db),
                Err(reply) => return Some(Pending::Ready(reply)),
            };
            if to_collection == collection {
                return Some(Pending::Ready(Reply::error(
                    "ERR source and destination objects are the same",
                )));
            }
            Work::Move {
                key: args[1].clone(),
                to_collection,
            }
        }
        _ => return None,
    };
    // Inside an EXEC, DEL and MSET become one plain request per worker: the EXEC makes
    // them atomic across workers itself (see `transaction`).
    if crate::dispatch::Dispatch::is_holding() {
        if let Some(pending) = work.held(shared, collection).await {
            return Some(pending);
        }
    }
    let shared = Arc::clone(shared);
    Some(Pending::barrier(async move {
        work.run(&shared, collection).await
    }))
}

enum Work {
    Mset {
        pairs: Vec<(Bytes, Bytes)>,
        if_absent: bool,
    },
    Delete {
        keys: Vec<Bytes>,
    },
    Rename {
        from: Bytes,
        to: Bytes,
        if_absent: bool,
    },
    Copy {
        from: Bytes,
        to: Bytes,
        to_collection: u16,
        replace: bool,
    },
    /// MOVE: the key, with its TTL, to another collection, unless it is there already.
    Move {
        key: Bytes,
        to_collection: u16,
    },
}

fn op(collection: u16, key: Key, action: TxAction) -> TxOp {
    TxOp {
        collection,
        key,
        action,
    }
}

/// One participant per worker that owns some of `keys`; `make` builds the op of the key at
/// each position.
fn per_worker(
    shared: &Shared,
    keys: &[Bytes],
    make: impl Fn(Key, usize) -> TxOp,
) -> Result<Vec<Participant>, Reply> {
    Ok(shared
        .dispatch
        .group_by_dest(keys)?
        .into_iter()
        .map(|(dest, keys, positions)| Participant {
            dest,
            ops: keys
                .into_iter()
                .zip(positions)
                .map(|(key, position)| make(key, position))
                .collect(),
        })
        .collect())
}

/// Orders participants so that the ones holding a source (`Take`/`Read`) come first:
/// their outcome feeds the destination's `PutTaken`.
pub(super) fn participants(keyed: Vec<(Dest, TxOp)>) -> Vec<Participant> {
    let mut participants: Vec<Participant> = Vec::new();
    for (dest, op) in keyed {
        match participants.iter_mut().find(|p| p.dest == dest) {
            Some(participant) => participant.ops.push(op),
            None => participants.push(Participant {
                dest,
                ops: vec![op],
            }),
        }
    }
    participants
}

impl Work {
    /// DEL and MSET as one request per worker, for an EXEC to hold; `None` for the others.
    async fn held(&self, shared: &Shared, collection: u16) -> Option<Pending> {
        let (participants, merge) = match self {
            Work::Delete { keys } => (
                per_worker(shared, keys, |key, _| op(collection, key, TxAction::Delete)),
                Merge::Sum,
            ),
            Work::Mset {
                pairs,
                if_absent: false,
            } => {
                let keys: Vec<Bytes> = pairs.iter().map(|(key, _)| key.clone()).collect();
                let put = |key, position: usize| {
                    let value = pairs[position].1.to_vec();
                    let action = TxAction::Put {
                        value,
                        expires_at_ms: None,
                        if_absent: false,
                    };
                    op(collection, key, action)
                };
                (per_worker(shared, &keys, put), Merge::Fixed(Reply::Ok))
            }
            _ => return None,
        };
        let participants = match participants {
            Ok(participants) => participants,
            Err(reply) => return Some(Pending::Ready(reply)),
        };
        let mut calls = Vec::with_capacity(participants.len());
        for Participant { dest, ops } in participants {
            let request = match merge {
                Merge::Sum => WorkerRequest::Delete {
                    collection,
                    keys: ops.into_iter().map(|op| op.key).collect(),
                },
                _ => WorkerRequest::Atomic { ops },
            };
            calls.push(shared.dispatch.send(dest, request).await);
        }
        Some(Pending::Calls { calls, merge })
    }

    async fn run(self, shared: &Shared, collection: u16) -> Reply {
        match self {
            Work::Mset { pairs, if_absent } => {
                let keys: Vec<Bytes> = pairs.iter().map(|(key, _)| key.clone()).collect();
                let participants = match per_worker(shared, &keys, |key, position| {
                    let value = pairs[position].1.to_vec();
                    op(
                        collection,
                        key,
                        TxAction::Put {
                            value,
                            expires_at_ms: None,
                            if_absent,
                        },
                    )
                }) {
                    Ok(participants) => participants,
                    Err(reply) => return reply,
                };
                match txn::run(&shared.dispatch, &shared.txids, participants).await {
                    Ok(_) if if_absent => Reply::Integer(1),
                    Ok(_) => Reply::Ok,
                    Err(TxFailure::Refused(WorkerError::TxKeyExists)) if if_absent => {
                        Reply::Integer(0)
                    }
                    Err(failure) => failure_reply(failure),
                }
            }
            Work::Delete { keys } => {
                let participants = match per_worker(shared, &keys, |key, _| {
                    op(collection, key, TxAction::Delete)
                }) {
                    Ok(participants) => participants,
                    Err(reply) => return reply,
                };
                match txn::run(&shared.dispatch, &shared.txids, participants).await {
                    Ok(outcomes) => Reply::Integer(
                        outcomes
                            .iter()
                            .flatten()
                            .filter(|outcome| **outcome == TxOutcome::Existed(true))
                            .count() as i64,
                    ),
                    Err(failure) => failure_reply(failure),
                }
            }
            Work::Rename {
                from,
                to,
                if_absent,
            } => {
                let ((from_dest, from_key), (to_dest, to_key)) =
                    match route_pair(shared, &from, &to) {
                        Ok(routed) => routed,
                        Err(reply) => return reply,
                    };
                if from == to {
                    // RENAME k k: nothing moves; the answer depends only on whether k exists.
                    let ops = vec![op(collection, from_key, TxAction::Read)];
                    return match txn::run(
                        &shared.dispatch,
                        &shared.txids,
                        vec![Participant {
                            dest: from_dest,
                            ops,
                        }],
                    )
                    .await
                    {
                        Ok(_) if if_absent => Reply::Integer(0),
                        Ok(_) => Reply::Ok,
                        Err(failure) => rename_failure(failure),
                    };
                }
                let keyed = vec![
                    (from_dest, op(collection, from_key, TxAction::Take)),
                    (
                        to_dest,
                        op(collection, to_key, TxAction::PutTaken { if_absent }),
                    ),
                ];
                match txn::run(&shared.dispatch, &shared.txids, participants(keyed)).await {
                    Ok(_) if if_absent => Reply::Integer(1),
                    Ok(_) => Reply::Ok,
                    Err(TxFailure::Refused(WorkerError::TxKeyExists)) => Reply::Integer(0),
                    Err(failure) => rename_failure(failure),
                }
            }
            Work::Copy {
                from,
                to,
                to_collection,
                replace,
            } => {
                let ((from_dest, from_key), (to_dest, to_key)) =
                    match route_pair(shared, &from, &to) {
                        Ok(routed) => routed,
                        Err(reply) => return reply,
                    };
                let keyed = vec![
                    (from_dest, op(collection, from_key, TxAction::Read)),
                    (
                        to_dest,
                        op(
                            to_collection,
                            to_key,
                            TxAction::PutTaken {
                                if_absent: !replace,
                            },
                        ),
                    ),
                ];
                match txn::run(&shared.dispatch, &shared.txids, participants(keyed)).await {
                    Ok(_) => Reply::Integer(1),
                    Err(TxFailure::Refused(_)) => Reply::Integer(0),
                    Err(failure) => failure_reply(failure),
                }
            }
            Work::Move { key, to_collection } => {
                // The same key in another collection: the same partition and worker.
                let (dest, routed) = match shared.dispatch.route(&key) {
                    Ok(routed) => routed,
                    Err(reply) => return reply,
                };
                let keyed = vec![
                    (dest, op(collection, routed.clone(), TxAction::Take)),
                    (
                        dest,
                        op(
                            to_collection,
                            routed,
                            TxAction::PutTaken { if_absent: true },
                        ),
                    ),
                ];
                match txn::run(&shared.dispatch, &shared.txids, participants(keyed)).await {
                    Ok(_) => Reply::Integer(1),
                    Err(TxFailure::Refused(
                        WorkerError::TxNoSuchKey | WorkerError::TxKeyExists,
                    )) => Reply::Integer(0),
                    Err(failure) => failure_reply(failure),
                }
            }
        }
    }
}

/// A key with where it is served.
type Routed = (Dest, Key);

/// Routes a source and a destination key.
fn route_pair(shared: &Shared, from: &Bytes, to: &Bytes) -> Result<(Routed, Routed), Reply> {
    Ok((shared.dispatch.route(from)?, shared.dispatch.route(to)?))
}

fn rename_failure(failure: TxFailure) -> Reply {
    match failure {
        TxFailure::Refused(WorkerError::TxNoSuchKey) => Reply::error("ERR no such key"),
        other => failure_reply(other),
    }
}

pub(super) fn failure_reply(failure: TxFailure) -> Reply {
    match failure {
        TxFailure::Refused(error) => errors::worker_error(&error),
        TxFailure::Failed(reply) => reply,
    }
}

//! MULTI, EXEC, DISCARD, WATCH and UNWATCH.
//!
//! - MULTI starts queueing: each later command is checked (unknown commands and wrong
//!   arity are errors now, and make EXEC answer EXECABORT, as in Redis) and answered
//!   `+QUEUED`.
//! - EXEC plans the queued commands with every worker request held back
//!   ([`Dispatch::holding`]); when all of them go to one worker, it sends them there as
//!   one `Exec` request, which the worker applies in order in one write transaction:
//!   the transaction is atomic and isolated, and survives a crash whole or not at all.
//! - When its keys are on several workers (or hosts), each worker first *dry-runs* its
//!   part (`ExecDryRun`: applied in a nested LMDB transaction and undone), answering
//!   what each command answers and what each key was and would become. The effects
//!   then commit through two-phase commit, each key expecting the commit id it had
//!   when it was read; a key changed since refuses the prepare, and the transaction is
//!   planned again (optimistic concurrency); each plan after the first holds its keys
//!   ([`crate::holds`]), so that a writer in a tight loop cannot change them between
//!   every plan's reads and its commit. So it is atomic across workers and hosts,
//!   survives crashes as every two-phase commit does, and is serializable. A typed key
//!   it changes travels whole (its snapshot), so this path costs more for big ones.
//! - DEL and MSET inside a transaction are one plain request per worker (the
//!   transaction makes them atomic); a command that cannot be held (a fan-out such as
//!   DBSIZE, RENAME or COPY across workers, MSETNX, a blocking pop) makes EXEC refuse
//!   the transaction, and nothing of it runs.
//! - WATCH records each key's last commit id; the worker refuses the `Exec` (EXEC
//!   answers a null array) when one has changed; across workers, the watched keys are
//!   checked before each plan and expected unchanged by the two-phase commit.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shoal_shared::frame::{TxAction, TxOp, WorkerError, WorkerRequest, WorkerResponse};
use shoal_shared::resp::Reply;

use super::{After, Pending, Session};
use crate::dispatch::{Dest, Dispatch};
use crate::errors;
use crate::holds::Hold;
use crate::state::Shared;

/// How long planning one queued command may take (it never waits for a worker).
const PLAN_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection's open transaction.
#[derive(Default)]
pub struct Multi {
    /// The queued commands, in order.
    queued: Vec<Vec<Bytes>>,
    /// A command was refused while queueing: EXEC answers EXECABORT.
    failed: bool,
}

/// A watched key and its last commit id when WATCH ran (0: missing). EXEC looks the key
/// up in the collection that holds `db` then: after a SWAPDB it is another key.
pub struct Watched {
    db: u16,
    key: Bytes,
    commit_id: u64,
}

/// Whether `name` is handled here rather than queued.
pub fn controls(name: &str) -> bool {
    matches!(name, "multi" | "exec" | "discard" | "watch")
}

/// Queues a command of an open transaction.
pub fn queue(session: &mut Session, args: Vec<Bytes>) -> Reply {
    if let Some(multi) = &mut session.multi {
        multi.queued.push(args);
    }
    Reply::Simple("QUEUED".into())
}

/// Makes EXEC answer EXECABORT (a command was refused while queueing).
pub fn fail(session: &mut Session) {
    if let Some(multi) = &mut session.multi {
        multi.failed = true;
    }
}

/// Runs MULTI, EXEC, DISCARD or WATCH. (A boxed future: EXEC dispatches the queued
/// commands, so the command dispatcher and this function call each other.)
pub fn dispatch<'a>(
    shared: &'a Arc<Shared>,
    session: &'a mut Session,
    name: &'a str,
    args: &'a [Bytes],
) -> Pin<Box<dyn Future<Output = Pending> + Send + 'a>> {
    Box::pin(async move {
        let reply = match name {
            "multi" if session.multi.is_some() => Reply::error("ERR MULTI calls can not be nested"),
            "multi" => {
                session.multi = Some(Multi::default());
                Reply::Ok
            }
            "discard" => match session.multi.take() {
                Some(_) => {
                    session.watched.clear();
                    Reply::Ok
                }
                None => Reply::error("ERR DISCARD without MULTI"),
            },
            "watch" if session.multi.is_some() => {
                Reply::error("ERR WATCH inside MULTI is not allowed")
            }
            "watch" => watch(shared, session, &args[1..]).await,
            _ => return exec(shared, session).await,
        };
        Pending::Ready(reply)
    })
}

/// UNWATCH.
pub fn unwatch(session: &mut Session) -> Reply {
    session.watched.clear();
    Reply::Ok
}

/// WATCH: each key's last commit id, asked of its worker now.
async fn watch(shared: &Shared, session: &mut Session, keys: &[Bytes]) -> Reply {
    let collection = session.collection;
    let groups = match shared.dispatch.group_by_dest(keys) {
        Ok(groups) => groups,
        Err(reply) => return reply,
    };
    for (dest, group, positions) in groups {
        let request = WorkerRequest::CommitIds {
            collection,
            keys: group,
        };
        match shared.dispatch.ask_dest(dest, request).await {
            Ok(WorkerResponse::Positions(ids)) => {
                for ((_, commit_id), position) in ids.into_iter().zip(positions) {
                    session.watched.push(Watched {
                        db: session.db,
                        key: keys[position].clone(),
                        commit_id,
                    });
                }
            }
            Ok(_) => return Reply::error("ERR internal error: unexpected response to WATCH"),
            Err(reply) => return reply,
        }
    }
    Reply::Ok
}

/// The plan of one queued command: its reply, once its held requests are answered.
type Planned<'a> = Pin<Box<dyn Future<Output = (Pending, After)> + Send + 'a>>;

/// EXEC: plans the queued commands, then sends them to their one worker as one `Exec`.
async fn exec(shared: &Arc<Shared>, session: &mut Session) -> Pending {
    let Some(multi) = session.multi.take() else {
        return Pending::Ready(Reply::error("ERR EXEC without MULTI"));
    };
    let watched = std::mem::take(&mut session.watched);
    if multi.failed {
        return Pending::Ready(Reply::error(
            "EXECABORT Transaction discarded because of previous errors.",
        ));
    }
    session.direct_reads = false;
    let ((pendings, planned), holding) = Dispatch::holding(async {
        let mut pendings = Vec::with_capacity(multi.queued.len());
        for args in multi.queued {
            let index = crate::table::index_of_request(&args[0]);
            let plan: Planned<'_> = Box::pin(super::dispatch(shared, session, index, args));
            match tokio::time::timeout(PLAN_TIMEOUT, plan).await {
                Ok((pending, _)) => pendings.push(pending),
                Err(_) => return (pendings, false),
            }
        }
        (pendings, true)
    })
    .await;
    let refused = || {
        Pending::Ready(Reply::error(
            "ERR this transaction cannot run as one: a command of it fans out to every worker \
             (DBSIZE, KEYS, FLUSHDB, SWAPDB, ...), blocks, needs an answer to be planned (OBJECT \
             REFCOUNT, ...), or is a multi-key write that moves values between workers (RENAME, \
             COPY, MSETNX, ...); nothing of it ran",
        ))
    };
    if !planned
        || holding.unheld
        || pendings
            .iter()
            .any(|p| matches!(p, Pending::Barrier(_) | Pending::Blocking(_)))
    {
        return refused();
    }
    let mut dests: Vec<Dest> = holding.held.iter().map(|held| held.dest).collect();
    let mut watched_keys = Vec::with_capacity(watched.len());
    for watch in &watched {
        match shared.dispatch.route(&watch.key) {
            Ok((dest, key)) => {
                dests.push(dest);
                watched_keys.push((session.collection_of(watch.db), key, watch.commit_id));
            }
            Err(reply) => return Pending::Ready(reply),
        }
    }
    let Some(&dest) = dests.first() else {
        // Nothing for a worker: every reply is ready.
        return Pending::barrier(async move {
            let mut replies = Vec::with_capacity(pendings.len());
            for pending in pendings {
                replies.push(pending.resolve().await);
            }
            Reply::Array(replies)
        });
    };
    if dests.iter().any(|other| *other != dest) {
        let shared = Arc::clone(shared);
        return Pending::barrier(async move {
            across_workers(&shared, holding.held, pendings, watched_keys).await
        });
    }
    let (requests, responders): (Vec<_>, Vec<_>) = holding
        .held
        .into_iter()
        .map(|held| (held.request, held.responder))
        .unzip();
    let call = shared
        .dispatch
        .send(
            dest,
            WorkerRequest::Exec {
                watched: watched_keys,
                requests,
            },
        )
        .await;
    Pending::barrier(async move {
        match call.wait().await {
            Ok(WorkerResponse::Exec(Some(responses))) => {
                for (responder, response) in responders.into_iter().zip(responses) {
                    let _ = responder.send(Ok(response));
                }
                let mut replies = Vec::with_capacity(pendings.len());
                for pending in pendings {
                    replies.push(pending.resolve().await);
                }
                Reply::Array(replies)
            }
            Ok(WorkerResponse::Exec(None)) => Reply::NilArray,
            Ok(WorkerResponse::Error(error)) => errors::worker_error(&error),
            Ok(other) => super::response_reply(other),
            Err(error) => errors::link_error(&error),
        }
    })
}

/// How many times a transaction across workers is planned again when its keys change
/// under it, before it gives up with `TRYAGAIN`.
pub const MAX_PLANS: usize = 20;

/// The reply when a transaction across workers was planned [`MAX_PLANS`] times in vain.
pub fn kept_changing() -> Reply {
    Reply::error("TRYAGAIN the transaction's keys kept changing while it ran; nothing was written")
}

/// Waits a little before planning again (attempt 1 and later), with jitter.
pub async fn backoff(attempt: usize) {
    if attempt > 0 {
        let jitter = shoal_shared::random_u64() % (5 * attempt as u64);
        tokio::time::sleep(Duration::from_millis(1 + jitter)).await;
    }
}

/// Before planning again (attempt 1 and later), on a host on its own: holds the keys
/// that `keys` makes (`(collection, key)`, made only then) until the returned hold is
/// dropped, after the plan's commit ([`crate::holds`]).
pub fn hold(
    shared: &Shared,
    attempt: usize,
    keys: impl FnOnce() -> Vec<(u16, Bytes)>,
) -> Option<Hold<'_>> {
    if attempt == 0 || shared.dispatch.router.is_some() {
        return None;
    }
    let keys = keys();
    (!keys.is_empty()).then(|| shared.holds.hold(keys))
}

/// What a dry run answered, and the ops that commit what it did.
pub struct DryRun {
    pub responses: Vec<WorkerResponse>,
    pub ops: Vec<(Dest, TxOp)>,
}

/// Dry-runs `requests` at `dest` (`ExecDryRun`): their answers, and for each key they
/// touched an `Expect` of its commit id and the write of its new state.
pub async fn dry_run(
    shared: &Shared,
    dest: Dest,
    requests: Vec<WorkerRequest>,
) -> Result<DryRun, Reply> {
    match shared
        .dispatch
        .ask_dest(dest, WorkerRequest::ExecDryRun { requests })
        .await?
    {
        WorkerResponse::DryRun { responses, effects } => {
            let mut ops = Vec::with_capacity(2 * effects.len());
            for effect in effects {
                let op = |action| TxOp {
                    collection: effect.collection,
                    key: effect.key.clone(),
                    action,
                };
                ops.push((
                    dest,
                    op(TxAction::Expect {
                        commit_id: effect.commit_id,
                    }),
                ));
                if let Some(write) = effect.write.clone() {
                    ops.push((dest, op(write)));
                }
            }
            Ok(DryRun { responses, ops })
        }
        other => Err(super::response_reply(other)),
    }
}

/// Commits dry runs' ops through two-phase commit: `Ok(true)` when committed,
/// `Ok(false)` when a key changed since its dry run (plan again).
pub async fn commit(shared: &Shared, ops: Vec<(Dest, TxOp)>) -> Result<bool, Reply> {
    let participants = super::multi::participants(ops);
    match crate::txn::run(&shared.dispatch, &shared.txids, participants).await {
        Ok(_) => Ok(true),
        Err(crate::txn::TxFailure::Refused(WorkerError::TxStale)) => Ok(false),
        Err(failure) => Err(super::multi::failure_reply(failure)),
    }
}

/// EXEC over several workers: dry runs, then two-phase commit of their effects.
async fn across_workers(
    shared: &Shared,
    held: Vec<crate::dispatch::Held>,
    pendings: Vec<Pending>,
    watched: Vec<(u16, shoal_shared::frame::Key, u64)>,
) -> Reply {
    let mut groups: Vec<(Dest, Vec<usize>)> = Vec::new();
    for (index, item) in held.iter().enumerate() {
        match groups.iter_mut().find(|(dest, _)| *dest == item.dest) {
            Some((_, indexes)) => indexes.push(index),
            None => groups.push((item.dest, vec![index])),
        }
    }
    let (requests, responders): (Vec<_>, Vec<_>) = held
        .into_iter()
        .map(|item| (item.request, item.responder))
        .unzip();
    for attempt in 0..MAX_PLANS {
        backoff(attempt).await;
        let _held = hold(shared, attempt, || {
            requests
                .iter()
                .flat_map(WorkerRequest::keys)
                .map(|(collection, key)| (collection, Bytes::from(key.bytes.clone())))
                .collect()
        });
        // A watched key that changed fails the transaction, as on one worker.
        for (collection, key, seen) in &watched {
            let dest = shared.dispatch.of_partition(key.partition);
            let request = WorkerRequest::CommitIds {
                collection: *collection,
                keys: vec![key.clone()],
            };
            match shared.dispatch.ask_dest(dest, request).await {
                Ok(WorkerResponse::Positions(ids))
                    if ids.first().map(|(_, id)| *id) == Some(*seen) => {}
                Ok(WorkerResponse::Positions(_)) => return Reply::NilArray,
                Ok(_) => return Reply::error("ERR internal error: unexpected response to WATCH"),
                Err(reply) => return reply,
            }
        }
        let mut responses: Vec<Option<WorkerResponse>> = vec![None; requests.len()];
        let mut ops: Vec<(Dest, TxOp)> = Vec::new();
        for (dest, indexes) in &groups {
            let part = indexes.iter().map(|&i| requests[i].clone()).collect();
            let run = match dry_run(shared, *dest, part).await {
                Ok(run) => run,
                Err(reply) => return reply,
            };
            for (&index, response) in indexes.iter().zip(run.responses) {
                responses[index] = Some(response);
            }
            ops.extend(run.ops);
        }
        for (collection, key, seen) in &watched {
            let dest = shared.dispatch.of_partition(key.partition);
            let expect = TxOp {
                collection: *collection,
                key: key.clone(),
                action: TxAction::Expect { commit_id: *seen },
            };
            ops.push((dest, expect));
        }
        match commit(shared, ops).await {
            Ok(true) => {
                for (responder, response) in responders.into_iter().zip(responses) {
                    let response = response.unwrap_or(WorkerResponse::Error(WorkerError::Storage(
                        "no answer from a dry run".into(),
                    )));
                    let _ = responder.send(Ok(response));
                }
                let mut replies = Vec::with_capacity(pendings.len());
                for pending in pendings {
                    replies.push(pending.resolve().await);
                }
                return Reply::Array(replies);
            }
            Ok(false) => {}
            Err(reply) => return reply,
        }
    }
    kept_changing()
}

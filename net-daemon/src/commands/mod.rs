//! Client commands: parse the arguments, route to workers, merge the answers.
//!
//! [`dispatch`] takes one request (its arguments) and the connection's
//! [`Session`], checks arity and authentication, and returns a [`Pending`]
//! reply. Requests to workers are *sent* during dispatch, so every command
//! of a pipeline is in flight at once; the connection then resolves the
//! pendings in order, which keeps replies in request order.
//!
//! Modules:
//! - [`table`]: the command table (arity, key positions, docs).
//! - [`strings`]: string and keyspace commands, which go to the workers.
//! - [`server`]: connection and server commands answered by the net-daemon.

pub mod server;
pub mod strings;
pub mod table;

use bytes::Bytes;
use shoal_shared::frame::{Key, WorkerRequest, WorkerResponse};
use shoal_shared::limits::MAX_KEY_BYTES;
use shoal_shared::partition::{key_partition, partition_worker};
use shoal_shared::resp::{Protocol, Reply};

use crate::errors;
use crate::workers::Call;
use crate::Shared;

/// Per-connection state that commands read and change.
pub struct Session {
    pub id: u64,
    pub name: Option<Bytes>,
    pub protocol: Protocol,
    pub collection: u16,
    pub authenticated: bool,
}

/// What the connection does after replying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Continue,
    Close,
}

/// A reply that may still be waiting for workers.
pub enum Pending {
    Ready(Reply),
    Calls { calls: Vec<Call>, merge: Merge },
}

/// How the responses of a command's worker calls become its reply.
pub enum Merge {
    /// One call; its response is the reply.
    Single,
    /// The integer responses are added up (DEL, EXISTS, DBSIZE).
    Sum,
    /// MGET: `positions[i]` are the places in the reply of call `i`'s values.
    Values { positions: Vec<Vec<usize>>, total: usize },
}

impl Pending {
    /// Waits for every worker involved and builds the reply.
    pub async fn resolve(self) -> Reply {
        let (calls, merge) = match self {
            Pending::Ready(reply) => return reply,
            Pending::Calls { calls, merge } => (calls, merge),
        };
        let mut responses = Vec::with_capacity(calls.len());
        let mut failure = None;
        for call in calls {
            match call.wait().await {
                Ok(WorkerResponse::Error(error)) => failure = failure.or(Some(errors::worker_error(&error))),
                Ok(response) => responses.push(response),
                Err(error) => failure = failure.or(Some(errors::link_error(&error))),
            }
        }
        if let Some(reply) = failure {
            return reply;
        }
        merge.apply(responses)
    }
}

impl Merge {
    fn apply(self, responses: Vec<WorkerResponse>) -> Reply {
        match self {
            Merge::Single => responses.into_iter().next().map_or(Reply::Nil, response_reply),
            Merge::Sum => Reply::Integer(
                responses.iter().map(|r| if let WorkerResponse::Integer(n) = r { *n } else { 0 }).sum(),
            ),
            Merge::Values { positions, total } => {
                let mut values = vec![Reply::Nil; total];
                for (response, positions) in responses.into_iter().zip(positions) {
                    if let WorkerResponse::Values(found) = response {
                        for (value, position) in found.into_iter().zip(positions) {
                            values[position] = value.map_or(Reply::Nil, |v| Reply::Bulk(v.into_vec().into()));
                        }
                    }
                }
                Reply::Array(values)
            }
        }
    }
}

/// The reply for one worker response.
fn response_reply(response: WorkerResponse) -> Reply {
    match response {
        WorkerResponse::Ok => Reply::Ok,
        WorkerResponse::Integer(n) => Reply::Integer(n),
        WorkerResponse::Value(None) => Reply::Nil,
        WorkerResponse::Value(Some(bytes)) => Reply::Bulk(bytes.into()),
        WorkerResponse::Values(values) => Reply::Array(
            values.into_iter().map(|v| v.map_or(Reply::Nil, |v| Reply::Bulk(v.into_vec().into()))).collect(),
        ),
        WorkerResponse::Log(entries) => Reply::Array(
            entries
                .into_iter()
                .map(|entry| {
                    Reply::Array(vec![
                        Reply::Integer(entry.commit_id as i64),
                        Reply::Integer(entry.timestamp_ms as i64),
                        Reply::bulk(entry.change.name()),
                        Reply::Integer(i64::from(entry.collection)),
                        Reply::Bulk(entry.key.into()),
                        Reply::Bulk(entry.data.into()),
                    ])
                })
                .collect(),
        ),
        WorkerResponse::Error(error) => errors::worker_error(&error),
    }
}

/// Runs one request. `args[0]` is the command name.
pub async fn dispatch(shared: &Shared, session: &mut Session, args: Vec<Bytes>) -> (Pending, After) {
    let mut lower = [0u8; 32];
    let name = &args[0];
    let spec = match name.len() <= lower.len() {
        true => {
            let lower = &mut lower[..name.len()];
            lower.copy_from_slice(name);
            lower.make_ascii_lowercase();
            std::str::from_utf8(lower).ok().and_then(table::lookup)
        }
        false => None,
    };
    let Some(spec) = spec else {
        return ready(errors::unknown_command(name, &args[1..]));
    };
    if !spec.arity_ok(args.len()) {
        return ready(errors::wrong_arity(spec.name));
    }
    if !session.authenticated && !matches!(spec.name, "auth" | "hello" | "quit") {
        return ready(errors::no_auth());
    }
    if let Some(pending) = strings::dispatch(shared, session, spec.name, &args).await {
        return (pending, After::Continue);
    }
    server::dispatch(shared, session, spec.name, &args).await
}

fn ready(reply: Reply) -> (Pending, After) {
    (Pending::Ready(reply), After::Continue)
}

/// Routes a key to its worker, or explains why it cannot be stored.
pub fn route(shared: &Shared, key: &Bytes) -> Result<(usize, Key), Reply> {
    if key.len() > MAX_KEY_BYTES {
        return Err(errors::key_too_long(key.len()));
    }
    let partition = key_partition(key, shared.config.storage.partitions);
    Ok((partition_worker(partition, shared.links.len()), Key { partition, bytes: key.to_vec() }))
}

/// Sends one request to one worker.
pub async fn call_one(shared: &Shared, worker: usize, request: WorkerRequest) -> Pending {
    let call = shared.links[worker].send(request).await;
    Pending::Calls { calls: vec![call], merge: Merge::Single }
}

/// Sends one request to every worker and adds up the integer answers.
pub async fn call_all_sum(shared: &Shared, make: impl Fn() -> WorkerRequest) -> Pending {
    let mut calls = Vec::with_capacity(shared.links.len());
    for link in &shared.links {
        calls.push(link.send(make()).await);
    }
    Pending::Calls { calls, merge: Merge::Sum }
}

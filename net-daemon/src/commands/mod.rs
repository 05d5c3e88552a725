//! Client commands: parse the arguments, route to workers, merge the answers.
//!
//! [`dispatch`] takes one request (its arguments) and the connection's
//! [`Session`], checks arity and authentication, and returns a [`Pending`]
//! reply. Requests to workers are *sent* during dispatch, so every command
//! of a pipeline is in flight at once; the connection then resolves the
//! pendings in order, which keeps replies in request order.
//!
//! Modules:
//! - [`backup`]: SHOAL.BACKUP, a copy of every shard with its manifest.
//! - [`strings`]: commands on one key (strings, counters, ranges).
//! - [`bits`]: GETBIT, SETBIT, BITCOUNT, BITPOS, BITFIELD, BITOP and LCS: computations on
//!   string values.
//! - [`sort`]: SORT and SORT_RO of a list, set or sorted set.
//! - [`types`]: hashes, sets, sorted sets and lists, one key at a time.
//! - [`collections`]: commands over several of those keys (SINTER, ZUNION, LMOVE, ...)
//!   and the blocking pops.
//! - [`dump`]: DUMP and RESTORE, with Shoal's own payload.
//! - [`keyspace`]: expiry, TYPE/OBJECT, SCAN, KEYS, DBSIZE, FLUSHDB/FLUSHALL.
//! - [`multi`]: multi-key writes (MSET, MSETNX, DEL, RENAME, COPY, MOVE), atomic across
//!   workers.
//! - [`replicas`]: READONLY, READWRITE and WAIT: a connection and the partitions' copies.
//! - [`pubsub`]: SUBSCRIBE and the other pub/sub commands, across the cluster's hosts.
//! - [`transaction`]: MULTI, EXEC, DISCARD and WATCH.
//! - [`shoal`]: Shoal's own commands (ID.NEW, SHOAL.LOG, SHOAL.FEED, ...).
//! - [`server`]: connection and server commands answered by the net-daemon.

pub mod backup;
pub mod bits;
pub mod cluster;
pub mod collections;
pub mod dump;
pub mod keyspace;
pub mod multi;
pub mod pubsub;
pub mod replicas;
pub mod server;
pub mod shoal;
pub mod sort;
pub mod strings;
pub mod transaction;
pub mod types;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use shoal_shared::frame::{WorkerRequest, WorkerResponse};

use shoal_shared::resp::{Protocol, Reply};

use crate::databases::Ticket;
use crate::dispatch::{wait_all, Dest};
use crate::errors;
use crate::state::Shared;
use crate::table;
use crate::workers::Call;

/// Per-connection state that commands read and change.
pub struct Session {
    pub id: u64,
    pub name: Option<Bytes>,
    pub protocol: Protocol,
    /// The database SELECT chose.
    pub db: u16,
    /// The storage collection that holds `db` under the batch's ticket: what commands
    /// send to the workers.
    pub collection: u16,
    /// The database map this batch of commands is dispatched under
    /// ([`crate::databases`]); `None` between batches.
    pub ticket: Option<Ticket>,
    pub authenticated: bool,
    /// GET and MGET may be answered from the shards' maps ([`crate::reads`]): true at the
    /// start of each batch of pipelined requests, false once a request of the batch
    /// other than GET or MGET has gone to a worker, so that later reads of the batch
    /// queue behind it.
    pub direct_reads: bool,
    /// A GET or MGET of the batch has gone to a worker (its key had a write the map
    /// does not hold yet, most often): a later GET reads the maps only once every
    /// earlier request of the connection is answered (a barrier), so that it never
    /// shows an older state than a read before it.
    pub behind_reads: bool,
    /// The connection's pub/sub subscriptions, once it has subscribed.
    pub subscriber: Option<crate::pubsub::Subscriber>,
    /// What the client said of its library (CLIENT SETINFO).
    pub lib_name: Option<Bytes>,
    pub lib_ver: Option<Bytes>,
    /// The open MULTI transaction, if any.
    pub multi: Option<transaction::Multi>,
    /// The keys WATCH recorded, until EXEC, DISCARD or UNWATCH.
    pub watched: Vec<transaction::Watched>,
}

impl Session {
    /// A fresh session with id `id` (authenticated unless a password is required).
    pub fn new(id: u64, authenticated: bool) -> Session {
        Session {
            id,
            name: None,
            protocol: Protocol::Resp2,
            db: 0,
            collection: 0,
            ticket: None,
            authenticated,
            direct_reads: true,
            behind_reads: false,
            subscriber: None,
            lib_name: None,
            lib_ver: None,
            multi: None,
            watched: Vec::new(),
        }
    }
}

impl Session {
    /// Starts dispatching a batch of commands under `ticket`.
    pub fn enter(&mut self, ticket: Ticket) {
        self.collection = ticket.collection(self.db);
        self.ticket = Some(ticket);
    }

    /// The collection that holds database `db` under the batch's ticket.
    pub fn collection_of(&self, db: u16) -> u16 {
        self.ticket
            .as_ref()
            .map_or(db, |ticket| ticket.collection(db))
    }

    /// SELECT `db`.
    pub fn select(&mut self, db: u16) {
        self.db = db;
        self.collection = self.collection_of(db);
    }

    /// What CLIENT LIST shows of this connection, after running `command`.
    pub fn client_state(&self, command: &'static str) -> crate::clients::State {
        let subscriptions = self
            .subscriber
            .as_ref()
            .map_or((0, 0, 0), |subscriber| subscriber.counts());
        crate::clients::State {
            name: self.name.clone(),
            lib_name: self.lib_name.clone(),
            lib_ver: self.lib_ver.clone(),
            db: self.db,
            resp: match self.protocol {
                Protocol::Resp2 => 2,
                Protocol::Resp3 => 3,
            },
            subscriptions,
            command,
        }
    }

    /// Whether a RESP2 connection is in subscribed mode: it then takes only pub/sub
    /// commands, PING, QUIT and RESET, as in Redis.
    pub fn subscribed_resp2(&self) -> bool {
        self.protocol == Protocol::Resp2 && self.subscriber.as_ref().is_some_and(|s| s.active())
    }
}

/// What the connection does after replying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Continue,
    Close,
    /// Close once the earlier replies are sent, and send none for this request
    /// (SHUTDOWN, as Redis's connection ends without one).
    CloseWithoutReply,
}

/// A reply that may still be waiting for workers.
pub enum Pending {
    Ready(Reply),
    Calls {
        calls: Vec<Call>,
        merge: Merge,
    },
    /// Work that must run after every earlier command of the connection has been answered,
    /// and before any later one is dispatched (multi-worker writes, fan-out admin commands).
    Barrier(Pin<Box<dyn Future<Output = Reply> + Send>>),
    /// A barrier that may wait on other clients (a blocking pop, SWAPDB): it runs holding
    /// no database ticket ([`crate::databases`]), and takes one when it needs one.
    Blocking(Pin<Box<dyn Future<Output = Reply> + Send>>),
}

impl Pending {
    /// A barrier running `work`.
    pub fn barrier(work: impl Future<Output = Reply> + Send + 'static) -> Pending {
        Pending::Barrier(Box::pin(work))
    }
}

/// Computes a reply from a string value (`None`: missing).
pub type OnValue = Box<dyn FnOnce(Option<&[u8]>) -> Reply + Send>;

/// How the responses of a command's worker calls become its reply.
pub enum Merge {
    /// One call; its response is the reply.
    Single,
    /// The integer responses are added up (DEL, EXISTS, DBSIZE).
    Sum,
    /// This reply once every call succeeded (MSET inside an EXEC).
    Fixed(Reply),
    /// A reply computed from one string value (`None`: missing), as GETBIT does.
    Value(OnValue),
    /// TTL, PTTL, EXPIRETIME or PEXPIRETIME (the command's name) from one `ExpireTime`
    /// answer, reckoned when the reply is made.
    Expiry(&'static str),
    /// A typed command: its one answer, shaped for the command.
    Answer(types::Shape),
    /// MGET: `positions[i]` are the places in the reply of call `i`'s values.
    Values {
        positions: Vec<Vec<usize>>,
        total: usize,
    },
}

impl Pending {
    /// Waits for every worker involved and builds the reply.
    pub async fn resolve(self) -> Reply {
        let (calls, merge) = match self {
            Pending::Ready(reply) => return reply,
            Pending::Barrier(work) | Pending::Blocking(work) => return work.await,
            Pending::Calls { calls, merge } => (calls, merge),
        };
        match wait_all(calls).await {
            Ok(responses) => merge.apply(responses),
            Err(reply) => reply,
        }
    }
}

impl Merge {
    fn apply(self, responses: Vec<WorkerResponse>) -> Reply {
        match self {
            Merge::Single => responses
                .into_iter()
                .next()
                .map_or(Reply::Nil, response_reply),
            Merge::Answer(shape) => responses
                .into_iter()
                .next()
                .map_or(Reply::Nil, |response| shape.reply(response)),
            Merge::Fixed(reply) => reply,
            Merge::Value(compute) => match responses.into_iter().next() {
                Some(WorkerResponse::Value(value)) => compute(value.as_deref()),
                Some(other) => response_reply(other),
                None => Reply::error("ERR internal error: no response"),
            },
            Merge::Expiry(name) => match responses.first() {
                Some(WorkerResponse::Integer(at)) if *at < 0 => Reply::Integer(*at),
                Some(WorkerResponse::Integer(at)) => {
                    let remaining_ms = (at - shoal_shared::now_ms() as i64).max(0);
                    Reply::Integer(match name {
                        "ttl" => (remaining_ms + 500) / 1000,
                        "pttl" => remaining_ms,
                        "expiretime" => at / 1000,
                        _ => *at,
                    })
                }
                _ => Reply::error("ERR internal error: unexpected response"),
            },
            Merge::Sum => Reply::Integer(
                responses
                    .iter()
                    .map(|r| {
                        if let WorkerResponse::Integer(n) = r {
                            *n
                        } else {
                            0
                        }
                    })
                    .sum(),
            ),
            Merge::Values { positions, total } => {
                let mut values = vec![Reply::Nil; total];
                for (response, positions) in responses.into_iter().zip(positions) {
                    if let WorkerResponse::Values(found) = response {
                        for (value, position) in found.into_iter().zip(positions) {
                            values[position] =
                                value.map_or(Reply::Nil, |v| Reply::Bulk(v.into_vec().into()));
                        }
                    }
                }
                Reply::Array(values)
            }
        }
    }
}

/// The reply for one worker response.
pub(crate) fn response_reply(response: WorkerResponse) -> Reply {
    match response {
        WorkerResponse::Ok => Reply::Ok,
        WorkerResponse::Integer(n) => Reply::Integer(n),
        WorkerResponse::Value(None) => Reply::Nil,
        WorkerResponse::Value(Some(bytes)) => Reply::Bulk(bytes.into()),
        WorkerResponse::Values(values) => Reply::Array(
            values
                .into_iter()
                .map(|v| v.map_or(Reply::Nil, |v| Reply::Bulk(v.into_vec().into())))
                .collect(),
        ),
        WorkerResponse::Log(entries) => Reply::Array(
            entries
                .into_iter()
                .map(|entry| log_entry_reply(entry, false))
                .collect(),
        ),
        WorkerResponse::Error(error) => errors::worker_error(&error),
        WorkerResponse::Answer(answer) => types::answer_reply(answer),
        other => {
            tracing::error!(
                ?other,
                "a worker answered with a response this command does not expect"
            );
            Reply::error("ERR internal error: unexpected response from a shard worker")
        }
    }
}

/// A commit-log entry as clients see it:
/// `[partition (feed only), commit_id, timestamp_ms, change_type, collection, key, data, expires_at_ms]`.
/// `expires_at_ms` is -1 when the key has no expiry.
pub fn log_entry_reply(entry: shoal_shared::frame::LogEntry, with_partition: bool) -> Reply {
    let mut fields = Vec::with_capacity(8);
    if with_partition {
        fields.push(Reply::Integer(i64::from(entry.partition)));
    }
    fields.extend([
        Reply::Integer(entry.commit_id as i64),
        Reply::Integer(entry.timestamp_ms as i64),
        Reply::bulk(entry.change.name()),
        Reply::Integer(i64::from(entry.collection)),
        Reply::Bulk(entry.key.into()),
        Reply::Bulk(entry.data.into()),
        Reply::Integer(entry.expires_at_ms.map_or(-1, |at| at as i64)),
    ]);
    Reply::Array(fields)
}

/// The key arguments of a command, by its spec's first key, last key and step (none for
/// a command whose keys move, such as those that take a key count).
fn key_args<'a>(spec: &table::CommandSpec, args: &'a [Bytes]) -> Vec<&'a Bytes> {
    if spec.first_key <= 0 || spec.step <= 0 {
        return Vec::new();
    }
    let last = if spec.last_key < 0 {
        args.len() as i64 + spec.last_key
    } else {
        spec.last_key.min(args.len() as i64 - 1)
    };
    (spec.first_key..=last)
        .step_by(spec.step as usize)
        .filter_map(|i| args.get(i as usize))
        .collect()
}

/// Runs one request. `args[0]` is the command name, and `index` its place in the command
/// table (`table::index_of_request`; `None`: unknown).
pub async fn dispatch(
    shared: &Arc<Shared>,
    session: &mut Session,
    index: Option<usize>,
    args: Vec<Bytes>,
) -> (Pending, After) {
    let name = &args[0];
    let Some(spec) = index.map(|index| &table::COMMANDS[index]) else {
        transaction::fail(session);
        return ready(errors::unknown_command(name, &args[1..]));
    };
    if !spec.arity_ok(args.len()) {
        transaction::fail(session);
        return ready(errors::wrong_arity(spec.name));
    }
    if !session.authenticated && !matches!(spec.name, "auth" | "hello" | "quit" | "reset") {
        return ready(errors::no_auth());
    }
    if transaction::controls(spec.name) {
        return (
            transaction::dispatch(shared, session, spec.name, &args).await,
            After::Continue,
        );
    }
    if session.multi.is_some() && !matches!(spec.name, "quit" | "reset") {
        return ready(transaction::queue(session, args));
    }
    if spec.name == "unwatch" {
        return ready(transaction::unwatch(session));
    }
    if session.subscribed_resp2() {
        match spec.name {
            "subscribe" | "psubscribe" | "ssubscribe" | "unsubscribe" | "punsubscribe"
            | "sunsubscribe" | "quit" | "reset" => {}
            // PING in subscribed mode answers a push, as Redis does.
            "ping" if args.len() <= 2 => {
                let message = args.get(1).cloned().unwrap_or_default();
                let pong = Reply::Push(vec![Reply::bulk("pong"), Reply::Bulk(message)]);
                return ready(pong);
            }
            other => {
                return ready(Reply::error(format!(
                    "ERR Can't execute '{other}': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context"
                )))
            }
        }
    }
    if let Some(pending) = pubsub::dispatch(shared, session, spec.name, &args) {
        return (pending, After::Continue);
    }
    // A write to keys that a multi-key command holds for its next plan waits here, so
    // that the connection's later requests wait too ([`crate::holds`]).
    if shared.holds.any()
        && spec.flags.contains(&"write")
        && !crate::dispatch::Dispatch::is_holding()
    {
        let keys = key_args(spec, &args);
        if !keys.is_empty() {
            shared.holds.wait_free(session.collection, &keys).await;
        }
    }
    if let Some(pending) = strings::dispatch(shared, session, spec.name, &args).await {
        return (pending, After::Continue);
    }
    if let Some(pending) = bits::dispatch(shared, session, spec.name, &args).await {
        return (pending, After::Continue);
    }
    if let Some(pending) = sort::dispatch(shared, session, spec.name, &args).await {
        return (pending, After::Continue);
    }
    if let Some(pending) = dump::dispatch(shared, session, spec.name, &args).await {
        return (pending, After::Continue);
    }
    if let Some(pending) = collections::dispatch(shared, session, spec.name, &args).await {
        return (pending, After::Continue);
    }
    if let Some(pending) = types::dispatch(shared, session, spec.name, &args).await {
        return (pending, After::Continue);
    }
    if let Some(pending) = keyspace::dispatch(shared, session, spec.name, &args).await {
        return (pending, After::Continue);
    }
    if let Some(pending) = multi::dispatch(shared, session, spec.name, &args).await {
        return (pending, After::Continue);
    }
    if spec.name == "cluster"
        && args
            .get(1)
            .is_some_and(|sub| sub.eq_ignore_ascii_case(b"leave"))
    {
        if args.len() != 2 {
            return ready(errors::wrong_arity("cluster|leave"));
        }
        return (cluster::leave(shared), After::Continue);
    }
    if spec.name == "cluster" && args.len() == 2 && args[1].eq_ignore_ascii_case(b"shards") {
        return (cluster::shards_pending(shared), After::Continue);
    }
    if let Some(pending) = replicas::dispatch(shared, spec.name, &args) {
        return (pending, After::Continue);
    }
    if let Some(reply) = cluster::dispatch(shared, spec.name, &args) {
        return ready(reply);
    }
    if spec.name == "shoal.backup" {
        return (backup::dispatch(shared, &args), After::Continue);
    }
    if let Some(pending) = shoal::dispatch(shared, session, spec.name, &args).await {
        return (pending, After::Continue);
    }
    server::dispatch(shared, session, spec.name, &args).await
}

fn ready(reply: Reply) -> (Pending, After) {
    (Pending::Ready(reply), After::Continue)
}

/// Sends one request to one destination; its response is the reply.
pub async fn call_one(shared: &Shared, dest: Dest, request: WorkerRequest) -> Pending {
    let call = shared.dispatch.send(dest, request).await;
    Pending::Calls {
        calls: vec![call],
        merge: Merge::Single,
    }
}

/// Sends one request to every worker of the cluster (of this host, on its own) and adds up
/// the integer answers.
pub async fn call_all_sum(shared: &Shared, make: impl Fn() -> WorkerRequest) -> Pending {
    Pending::Calls {
        calls: shared.dispatch.send_everywhere(make).await,
        merge: Merge::Sum,
    }
}

//! Connection and server commands that the net-daemon answers itself:
//! PING, ECHO, HELLO, AUTH, SELECT, CLIENT, QUIT, COMMAND, CONFIG GET, INFO.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use shoal_cluster::node::ClusterNode;
use shoal_shared::frame::{WorkerRequest, WorkerResponse};
use shoal_shared::glob::glob_match;
use shoal_shared::partition::worker_partitions;
use shoal_shared::resp::{parse_i64, Protocol, Reply};
use shoal_shared::status::{Field, ProcessState};

use super::{After, Pending, Session};
use crate::databases;
use crate::errors;
use crate::routing::Router;
use crate::state::Shared;
use crate::table::{CommandSpec, COMMANDS};

/// The Redis version whose behaviour Shoal's commands follow.
pub const REDIS_COMPAT_VERSION: &str = "7.2.0";

/// Runs a server or connection command. Arity is already checked.
pub async fn dispatch(
    shared: &Shared,
    session: &mut Session,
    name: &str,
    args: &[Bytes],
) -> (Pending, After) {
    let reply = match name {
        "ping" => match args.get(1) {
            None => Reply::Simple("PONG".into()),
            Some(message) if args.len() == 2 => Reply::Bulk(message.clone()),
            Some(_) => errors::wrong_arity("ping"),
        },
        "echo" => Reply::Bulk(args[1].clone()),
        "quit" => return (Pending::Ready(Reply::Ok), After::Close),
        "auth" => auth(shared, session, &args[1..]),
        "hello" => hello(shared, session, &args[1..]),
        "select" => match databases::number(&args[1], shared.config.storage.collections) {
            Ok(db) => {
                session.select(db);
                Reply::Ok
            }
            Err(reply) => reply,
        },
        "client" => client(shared, session, &args[1..]),
        "command" => command(&args[1..]),
        "config" => config(shared, &args[1..]),
        "info" => info(shared, session, &args[1..]).await,
        "time" => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            Reply::Array(vec![
                Reply::bulk(now.as_secs().to_string()),
                Reply::bulk(now.subsec_micros().to_string()),
            ])
        }
        // Every acknowledged write is on disk already; the last "save" is the start.
        "lastsave" => Reply::Integer((shared.started_unix_ms / 1000) as i64),
        "reset" => {
            let (direct_reads, behind_reads, ticket) = (
                session.direct_reads,
                session.behind_reads,
                session.ticket.take(),
            );
            *session = Session::new(session.id, shared.requirepass().is_none());
            session.direct_reads = direct_reads;
            session.behind_reads = behind_reads;
            session.ticket = ticket;
            session.select(0);
            crate::routing::set_readonly(false);
            Reply::Simple("RESET".into())
        }
        "function" => match args[1].to_ascii_uppercase().as_slice() {
            // Shoal runs no functions: FLUSH has nothing to remove, LIST nothing to show.
            b"FLUSH" if args.len() <= 3 => Reply::Ok,
            b"LIST" => Reply::Array(Vec::new()),
            _ => Reply::error(format!(
                "ERR unknown subcommand '{}'. Try FUNCTION HELP.",
                String::from_utf8_lossy(&args[1])
            )),
        },
        "debug" => match (args[1].to_ascii_uppercase().as_slice(), args.get(2)) {
            (b"SLEEP", Some(seconds)) => match std::str::from_utf8(seconds)
                .ok()
                .and_then(|text| text.parse::<f64>().ok())
                .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
            {
                Some(seconds) => {
                    // Only this connection waits, at most a minute.
                    let pause = std::time::Duration::from_secs_f64(seconds.min(60.0));
                    return (
                        Pending::barrier(async move {
                            tokio::time::sleep(pause).await;
                            Reply::Ok
                        }),
                        After::Continue,
                    );
                }
                None => errors::not_float(),
            },
            _ => Reply::error(format!(
                "ERR DEBUG subcommand '{}' is not supported by Shoal (only DEBUG SLEEP)",
                String::from_utf8_lossy(&args[1])
            )),
        },
        "shutdown" => return shutdown(shared, &args[1..]),
        _ => errors::unknown_command(name.as_bytes(), &args[1..]),
    };
    (Pending::Ready(reply), After::Continue)
}

/// `SHUTDOWN [NOSAVE|SAVE] [NOW] [FORCE] [ABORT]`: asks the supervisor to stop the
/// host as SIGTERM does (the workers drain, then every process exits). There is nothing
/// to save, so the options change nothing; ABORT finds no shutdown to cancel. On success
/// the connection closes without a reply, as Redis's does.
fn shutdown(shared: &Shared, options: &[Bytes]) -> (Pending, After) {
    let mut abort = false;
    for option in options {
        match option.to_ascii_uppercase().as_slice() {
            b"NOSAVE" | b"SAVE" | b"NOW" | b"FORCE" => {}
            b"ABORT" => abort = true,
            _ => return (Pending::Ready(errors::syntax()), After::Continue),
        }
    }
    if abort {
        return (
            Pending::Ready(Reply::error("ERR No shutdown in progress.")),
            After::Continue,
        );
    }
    let supervisor = shared.status.supervisor_pid();
    // SAFETY: kill() with a pid and a signal number has no memory effects.
    let sent =
        supervisor > 0 && unsafe { libc::kill(supervisor as libc::pid_t, libc::SIGTERM) } == 0;
    if !sent {
        let reason = std::io::Error::last_os_error();
        return (
            Pending::Ready(Reply::error(format!(
                "ERR Errors trying to SHUTDOWN: cannot signal the supervisor (pid {supervisor}): {reason}"
            ))),
            After::Continue,
        );
    }
    tracing::info!(supervisor, "SHUTDOWN asked for: stopping the host");
    (Pending::Ready(Reply::Nil), After::CloseWithoutReply)
}

fn check_password(shared: &Shared, session: &mut Session, user: &[u8], password: &[u8]) -> Reply {
    match &shared.requirepass() {
        Some(expected)
            if user.eq_ignore_ascii_case(b"default") && password == expected.as_bytes() =>
        {
            session.authenticated = true;
            Reply::Ok
        }
        _ => errors::wrong_pass(),
    }
}

fn auth(shared: &Shared, session: &mut Session, args: &[Bytes]) -> Reply {
    let (user, password) = match args {
        [password] => (&b"default"[..], password),
        [user, password] => (&user[..], password),
        _ => return errors::syntax(),
    };
    if shared.requirepass().is_none() {
        // Without requirepass the default user takes any password, as in Redis.
        return match args {
            [_] => Reply::error(
                "ERR AUTH <password> called without any password configured for the default user. \
                 Are you sure your configuration is correct?",
            ),
            _ if user.eq_ignore_ascii_case(b"default") => Reply::Ok,
            _ => errors::wrong_pass(),
        };
    }
    check_password(shared, session, user, password)
}

fn hello(shared: &Shared, session: &mut Session, args: &[Bytes]) -> Reply {
    let mut protocol = session.protocol;
    let mut rest = args;
    if let Some((version, tail)) = args.split_first() {
        protocol = match parse_i64(version) {
            Some(2) => Protocol::Resp2,
            Some(3) => Protocol::Resp3,
            Some(_) => return Reply::error("NOPROTO unsupported protocol version"),
            None => return Reply::error("ERR Protocol version is not an integer or out of range"),
        };
        rest = tail;
    }
    let mut name = None;
    while let Some((option, tail)) = rest.split_first() {
        match (option.to_ascii_uppercase().as_slice(), tail) {
            (b"AUTH", [user, password, tail @ ..]) => {
                let reply = check_password(shared, session, user, password);
                if reply.is_error() {
                    return reply;
                }
                rest = tail;
            }
            (b"SETNAME", [client_name, tail @ ..]) => {
                if !valid_client_name(client_name) {
                    return invalid_client_name();
                }
                name = Some(client_name.clone());
                rest = tail;
            }
            _ => {
                return Reply::error(format!(
                    "ERR Syntax error in HELLO option '{}'",
                    String::from_utf8_lossy(option).to_lowercase()
                ))
            }
        }
    }
    if !session.authenticated {
        return Reply::error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time");
    }
    if let Some(name) = name {
        session.name = Some(name);
    }
    session.protocol = protocol;
    let text = |s: &str| Reply::bulk(Bytes::copy_from_slice(s.as_bytes()));
    Reply::Map(vec![
        (text("server"), text("shoal")),
        (text("version"), text(REDIS_COMPAT_VERSION)),
        (text("shoal_version"), text(env!("CARGO_PKG_VERSION"))),
        (
            text("proto"),
            Reply::Integer(if protocol == Protocol::Resp3 { 3 } else { 2 }),
        ),
        (text("id"), Reply::Integer(session.id as i64)),
        (text("mode"), text("standalone")),
        (text("role"), text("master")),
        (text("modules"), Reply::Array(vec![])),
    ])
}

fn valid_client_name(name: &[u8]) -> bool {
    name.iter().all(|&b| (b'!'..=b'~').contains(&b))
}

fn invalid_client_name() -> Reply {
    Reply::error("ERR Client names cannot contain spaces, newlines or special characters.")
}

fn client(shared: &Shared, session: &mut Session, args: &[Bytes]) -> Reply {
    let subcommand = args[0].to_ascii_uppercase();
    match (subcommand.as_slice(), &args[1..]) {
        (b"ID", []) => Reply::Integer(session.id as i64),
        (b"LIST", filters) => client_list(shared, filters),
        (b"INFO", []) => match shared.clients.get(session.id) {
            Some(client) => Reply::Verbatim(client.line() + "\n"),
            None => Reply::Nil,
        },
        (b"KILL", filters) => client_kill(shared, session, filters),
        (b"NO-EVICT" | b"NO-TOUCH", [switch])
            if switch.eq_ignore_ascii_case(b"on") || switch.eq_ignore_ascii_case(b"off") =>
        {
            // Shoal evicts nothing and keeps no access times: both are always as asked.
            Reply::Ok
        }
        (b"NO-EVICT" | b"NO-TOUCH", [_]) => errors::syntax(),
        (b"GETNAME", []) => session.name.clone().map_or(Reply::Nil, Reply::Bulk),
        (b"SETNAME", [name]) => {
            if !valid_client_name(name) {
                return invalid_client_name();
            }
            session.name = (!name.is_empty()).then(|| name.clone());
            Reply::Ok
        }
        (b"SETINFO", [attribute, value]) => {
            if attribute.eq_ignore_ascii_case(b"LIB-NAME") {
                session.lib_name = Some(value.clone());
                Reply::Ok
            } else if attribute.eq_ignore_ascii_case(b"LIB-VER") {
                session.lib_ver = Some(value.clone());
                Reply::Ok
            } else {
                Reply::error(format!(
                    "ERR Unrecognized option '{}'",
                    String::from_utf8_lossy(attribute)
                ))
            }
        }
        (b"ID" | b"GETNAME" | b"SETNAME" | b"SETINFO" | b"INFO" | b"NO-EVICT" | b"NO-TOUCH", _) => {
            errors::wrong_arity(&format!(
                "client|{}",
                String::from_utf8_lossy(&subcommand).to_lowercase()
            ))
        }
        _ => Reply::error(format!(
            "ERR unknown subcommand '{}'. Try CLIENT HELP.",
            String::from_utf8_lossy(&args[0])
        )),
    }
}

/// `CLIENT LIST [TYPE normal|pubsub|master|replica] [ID id ...]`: a line per
/// connection open on this host.
fn client_list(shared: &Shared, filters: &[Bytes]) -> Reply {
    let mut kind: Option<bool> = None;
    let mut ids: Option<Vec<u64>> = None;
    let mut rest = filters;
    while let Some((option, tail)) = rest.split_first() {
        match (option.to_ascii_uppercase().as_slice(), tail) {
            (b"TYPE", [name, tail @ ..]) => {
                kind = match name.to_ascii_lowercase().as_slice() {
                    b"normal" => Some(false),
                    b"pubsub" => Some(true),
                    // No connection here is a replication link.
                    b"master" | b"replica" | b"slave" => return Reply::Verbatim(String::new()),
                    _ => {
                        return Reply::error(format!(
                            "ERR Unknown client type '{}'",
                            String::from_utf8_lossy(name)
                        ))
                    }
                };
                rest = tail;
            }
            (b"ID", tail) if !tail.is_empty() => {
                let mut wanted = Vec::new();
                for id in tail {
                    match parse_i64(id).filter(|id| *id > 0) {
                        Some(id) => wanted.push(id as u64),
                        None => return Reply::error("ERR Invalid client ID"),
                    }
                }
                ids = Some(wanted);
                rest = &[];
            }
            _ => return errors::syntax(),
        }
    }
    let mut text = String::new();
    for client in shared.clients.all() {
        if ids.as_ref().is_some_and(|ids| !ids.contains(&client.id)) {
            continue;
        }
        let (sub, psub, ssub) = client.state().subscriptions;
        if kind.is_some_and(|pubsub| pubsub != (sub + psub + ssub > 0)) {
            continue;
        }
        text.push_str(&client.line());
        text.push('\n');
    }
    Reply::Verbatim(text)
}

/// `CLIENT KILL addr` (answers OK or an error), or `CLIENT KILL <filter> <value> ...`
/// with ID, ADDR, LADDR, USER, SKIPME and MAXAGE (answers how many it closed).
fn client_kill(shared: &Shared, session: &Session, filters: &[Bytes]) -> Reply {
    if let [addr] = filters {
        return match shared
            .clients
            .all()
            .into_iter()
            .find(|c| c.addr.as_bytes() == &addr[..])
        {
            Some(client) => {
                client.kill();
                Reply::Ok
            }
            None => Reply::error("ERR No such client"),
        };
    }
    if filters.is_empty() || !filters.len().is_multiple_of(2) {
        return errors::syntax();
    }
    let (mut id, mut addr, mut laddr, mut user, mut max_age) = (None, None, None, None, None);
    // TYPE: whether to kill subscribers (pubsub) or the others (normal).
    let mut pubsub: Option<bool> = None;
    let mut skip_me = true;
    for pair in filters.chunks(2) {
        let value = &pair[1];
        match pair[0].to_ascii_uppercase().as_slice() {
            b"ID" => match parse_i64(value).filter(|id| *id > 0) {
                Some(n) => id = Some(n as u64),
                None => return Reply::error("ERR client-id should be greater than 0"),
            },
            b"ADDR" => addr = Some(value.clone()),
            b"LADDR" => laddr = Some(value.clone()),
            b"USER" => user = Some(value.clone()),
            b"MAXAGE" => match parse_i64(value) {
                Some(n) => max_age = Some(n),
                None => return errors::not_integer(),
            },
            b"SKIPME" => match value.to_ascii_lowercase().as_slice() {
                b"yes" => skip_me = true,
                b"no" => skip_me = false,
                _ => return errors::syntax(),
            },
            b"TYPE" => match value.to_ascii_lowercase().as_slice() {
                b"normal" => pubsub = Some(false),
                b"pubsub" => pubsub = Some(true),
                b"master" | b"replica" | b"slave" => return Reply::Integer(0),
                _ => {
                    return Reply::error(format!(
                        "ERR Unknown client type '{}'",
                        String::from_utf8_lossy(value)
                    ))
                }
            },
            _ => return errors::syntax(),
        }
    }
    // Every client is the default user.
    if user
        .as_ref()
        .is_some_and(|user| !user.eq_ignore_ascii_case(b"default"))
    {
        return Reply::Integer(0);
    }
    let mut killed = 0;
    for client in shared.clients.all() {
        let matches = id.is_none_or(|id| client.id == id)
            && addr
                .as_ref()
                .is_none_or(|a| client.addr.as_bytes() == &a[..])
            && laddr
                .as_ref()
                .is_none_or(|a| client.laddr.as_bytes() == &a[..])
            && max_age.is_none_or(|age| client.age_secs() as i64 >= age)
            && pubsub.is_none_or(|pubsub| {
                let (sub, psub, ssub) = client.state().subscriptions;
                pubsub == (sub + psub + ssub > 0)
            })
            && !(skip_me && client.id == session.id);
        if matches {
            client.kill();
            killed += 1;
        }
    }
    Reply::Integer(killed)
}

fn command_info(spec: &CommandSpec) -> Reply {
    Reply::Array(vec![
        Reply::bulk(spec.name),
        Reply::Integer(spec.arity),
        Reply::Array(
            spec.flags
                .iter()
                .map(|f| Reply::Simple((*f).into()))
                .collect(),
        ),
        Reply::Integer(spec.first_key),
        Reply::Integer(spec.last_key),
        Reply::Integer(spec.step),
        Reply::Array(vec![]),
        Reply::Array(vec![]),
        Reply::Array(vec![]),
        Reply::Array(vec![]),
    ])
}

fn command(args: &[Bytes]) -> Reply {
    let find = |name: &Bytes| {
        let name = String::from_utf8_lossy(name).to_lowercase();
        COMMANDS.iter().find(|spec| spec.name == name)
    };
    let Some(subcommand) = args.first() else {
        return Reply::Array(COMMANDS.iter().map(command_info).collect());
    };
    match subcommand.to_ascii_uppercase().as_slice() {
        b"COUNT" if args.len() == 1 => Reply::Integer(COMMANDS.len() as i64),
        b"COUNT" => errors::wrong_arity("command|count"),
        b"INFO" => {
            if args.len() == 1 {
                return Reply::Array(COMMANDS.iter().map(command_info).collect());
            }
            Reply::Array(
                args[1..]
                    .iter()
                    .map(|name| find(name).map_or(Reply::Nil, command_info))
                    .collect(),
            )
        }
        b"DOCS" => {
            let specs: Vec<&CommandSpec> = if args.len() == 1 {
                COMMANDS.iter().collect()
            } else {
                args[1..].iter().filter_map(find).collect()
            };
            Reply::Map(
                specs
                    .into_iter()
                    .map(|spec| {
                        let doc = Reply::Map(vec![
                            (Reply::bulk("summary"), Reply::bulk(spec.summary)),
                            (Reply::bulk("since"), Reply::bulk("1.0.0")),
                            (Reply::bulk("group"), Reply::bulk(spec.group)),
                        ]);
                        (Reply::bulk(spec.name), doc)
                    })
                    .collect(),
            )
        }
        _ => Reply::error(format!(
            "ERR unknown subcommand '{}'. Try COMMAND HELP.",
            String::from_utf8_lossy(subcommand)
        )),
    }
}

/// The settings CONFIG GET reports, under Redis names where Redis has one.
fn config_pairs(shared: &Shared) -> Vec<(&'static str, String)> {
    let config = &shared.config;
    let fsync = config.storage.durability == shoal_shared::config::Durability::Fsync;
    let path =
        |p: Option<&std::path::PathBuf>| p.map(|p| p.display().to_string()).unwrap_or_default();
    vec![
        (
            "appendfsync",
            if fsync { "always" } else { "everysec" }.into(),
        ),
        ("appendonly", "yes".into()),
        (
            "bind",
            config
                .client
                .listen
                .map(|a| a.ip().to_string())
                .unwrap_or_default(),
        ),
        ("databases", config.storage.collections.to_string()),
        ("dir", config.data_dir.display().to_string()),
        ("durability", if fsync { "fsync" } else { "async" }.into()),
        ("map_size_bytes", config.storage.map_size_bytes.to_string()),
        ("maxclients", config.client.max_connections.to_string()),
        ("partitions", config.storage.partitions.to_string()),
        (
            "port",
            config
                .client
                .listen
                .map(|a| a.port().to_string())
                .unwrap_or_else(|| "0".into()),
        ),
        (
            "proto-max-bulk-len",
            config.client.max_value_bytes.to_string(),
        ),
        ("requirepass", shared.requirepass().unwrap_or_default()),
        ("save", String::new()),
        ("unixsocket", path(config.client.unix_socket.as_ref())),
        ("workers", config.workers.to_string()),
    ]
}

fn config(shared: &Shared, args: &[Bytes]) -> Reply {
    let subcommand = args[0].to_ascii_uppercase();
    match subcommand.as_slice() {
        b"GET" if args.len() >= 2 => {
            let pairs = config_pairs(shared);
            let matched = pairs
                .into_iter()
                .filter(|(name, _)| {
                    args[1..]
                        .iter()
                        .any(|pattern| glob_match(pattern, name.as_bytes(), true))
                })
                .map(|(name, value)| (Reply::bulk(name), Reply::bulk(value)))
                .collect();
            Reply::Map(matched)
        }
        b"GET" => errors::wrong_arity("config|get"),
        b"RESETSTAT" if args.len() == 1 => {
            shared.command_stats.reset();
            Reply::Ok
        }
        b"SET" if args.len() >= 3 && !args.len().is_multiple_of(2) => {
            config_set(shared, &args[1..])
        }
        b"SET" => errors::wrong_arity("config|set"),
        b"REWRITE" => Reply::error(
            "ERR CONFIG REWRITE is not supported: edit the config file (docs/config.md)",
        ),
        _ => Reply::error(format!(
            "ERR unknown subcommand '{}'. Try CONFIG HELP.",
            String::from_utf8_lossy(&args[0])
        )),
    }
}

/// `CONFIG SET name value [name value ...]`, all or nothing, as in Redis 7. `requirepass`
/// changes at run time; any other known setting may be "set" to the value it has
/// (tools do that), and otherwise needs a restart with the config file changed.
fn config_set(shared: &Shared, pairs: &[Bytes]) -> Reply {
    let current = config_pairs(shared);
    let mut new_password = None;
    for pair in pairs.chunks(2) {
        let name = String::from_utf8_lossy(&pair[0]).to_lowercase();
        let value = String::from_utf8_lossy(&pair[1]).into_owned();
        let Some((_, now)) = current.iter().find(|(known, _)| *known == name) else {
            return Reply::error(format!(
                "ERR Unknown option or number of arguments for CONFIG SET - '{name}'"
            ));
        };
        match name.as_str() {
            "requirepass" => new_password = Some((!value.is_empty()).then_some(value)),
            _ if *now == value => {}
            _ => {
                return Reply::error(format!(
                    "ERR CONFIG SET failed (possibly related to argument '{name}') - it can \
                     only change at startup: edit the config file and restart (docs/config.md)"
                ))
            }
        }
    }
    if let Some(password) = new_password {
        shared.set_requirepass(password);
    }
    Reply::Ok
}

/// Keys per database, summed over the workers; `None` for a database a worker could not
/// count. Every request is sent before any answer is awaited.
async fn keyspace(shared: &Shared, session: &Session) -> Vec<(u16, Option<i64>)> {
    let mut calls = Vec::new();
    for db in 0..shared.config.storage.collections {
        let collection = session.collection_of(db);
        for link in &shared.dispatch.links {
            calls.push((db, link.send(WorkerRequest::DbSize { collection }).await));
        }
    }
    let mut counts: Vec<(u16, Option<i64>)> = (0..shared.config.storage.collections)
        .map(|db| (db, Some(0)))
        .collect();
    for (db, call) in calls {
        let total = &mut counts[usize::from(db)].1;
        match call.wait().await {
            Ok(WorkerResponse::Integer(n)) => *total = total.map(|t| t + n),
            _ => *total = None,
        }
    }
    counts
}

async fn info(shared: &Shared, session: &Session, args: &[Bytes]) -> Reply {
    let wanted: Vec<String> = args
        .iter()
        .map(|a| String::from_utf8_lossy(a).to_lowercase())
        .collect();
    let all = wanted.is_empty()
        || wanted
            .iter()
            .any(|w| w == "all" || w == "everything" || w == "default");
    let show = |section: &str| all || wanted.iter().any(|w| w == section);
    let config = &shared.config;
    let status = &shared.status;
    let mut text = String::new();
    if show("server") {
        let _ = write!(
            text,
            "# Server\r\nredis_version:{REDIS_COMPAT_VERSION}\r\nshoal_version:{}\r\nredis_mode:standalone\r\n\
             os:{}\r\nprocess_id:{}\r\nsupervisor_pid:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{}\r\n\
             config_file:{}\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            std::env::consts::OS,
            std::process::id(),
            status.supervisor_pid(),
            config.client.listen.map_or(0, |a| a.port()),
            shared.started.elapsed().as_secs(),
            config.source.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        );
    }
    if show("clients") {
        let _ = write!(
            text,
            "# Clients\r\nconnected_clients:{}\r\nmaxclients:{}\r\nblocked_clients:{}\r\n\r\n",
            shared.connections.load(Ordering::Relaxed),
            config.client.max_connections,
            shared.blocked.count()
        );
    }
    if show("persistence") {
        let durability = match config.storage.durability {
            shoal_shared::config::Durability::Fsync => "fsync",
            shoal_shared::config::Durability::Async => "async",
        };
        let _ = write!(
            text,
            "# Persistence\r\nloading:0\r\ndurability:{durability}\r\nrdb_changes_since_last_save:0\r\n\
             aof_enabled:1\r\n\r\n"
        );
    }
    if show("replication") {
        text.push_str("# Replication\r\nrole:master\r\n");
        match (&shared.cluster, &shared.dispatch.router) {
            (Some(node), Some(router)) => replication_info(&mut text, config, node, router),
            _ => text.push_str("connected_slaves:0\r\n"),
        }
        text.push_str("\r\n");
    }
    if show("keyspace") {
        text.push_str("# Keyspace\r\n");
        for (db, keys) in keyspace(shared, session).await {
            match keys {
                Some(0) => {}
                Some(keys) => {
                    let _ = write!(text, "db{db}:keys={keys},expires=0,avg_ttl=0\r\n");
                }
                None => {
                    let _ = write!(text, "db{db}:keys=unavailable\r\n");
                }
            }
        }
        text.push_str("\r\n");
    }
    if show("shards") {
        text.push_str("# Shards\r\n");
        let workers = shared.dispatch.links.len();
        for worker in 0..workers {
            let slot = status.slot(worker);
            let state = if slot.state() == ProcessState::Ready
                && !shared.dispatch.links[worker].is_connected()
            {
                "unreachable"
            } else {
                slot.state().name()
            };
            let commits = slot.get(Field::Commits);
            let commit_usec = slot.get(Field::CommitMicrosSum) / commits.max(1);
            let _ = write!(
                text,
                "shard{worker}:pid={},state={state},restarts={},partitions={},last_commit_id={},ops={},commits={commits},\
                 commit_usec_per_call={commit_usec},map_size={},map_used={}\r\n",
                slot.get(Field::Pid),
                slot.get(Field::Restarts),
                worker_partitions(worker, workers, config.storage.partitions).len(),
                slot.get(Field::LastCommitId),
                slot.get(Field::Ops),
                slot.get(Field::MapSizeBytes),
                slot.get(Field::MapUsedBytes),
            );
        }
        text.push_str("\r\n");
    }
    // Like Redis, command statistics only when asked for by name (or "all"/"everything").
    let everything = wanted.iter().any(|w| w == "all" || w == "everything");
    if everything || wanted.iter().any(|w| w == "commandstats") {
        text.push_str("# Commandstats\r\n");
        for (name, calls, errors, micros) in shared.command_stats.summary() {
            let _ = write!(
                text,
                "cmdstat_{name}:calls={calls},usec={micros},usec_per_call={:.2},rejected_calls=0,failed_calls={errors}\r\n",
                micros as f64 / calls as f64
            );
        }
        text.push_str("\r\n");
    }
    Reply::Verbatim(text.trim_end_matches("\r\n").to_string() + "\r\n")
}

/// INFO replication in a cluster: the partitions this host leads and follows, what the
/// replication counted, and Redis's `slaveN` lines, one per follower host of the
/// partitions led here, with its lag.
fn replication_info(
    text: &mut String,
    config: &shoal_shared::config::Config,
    node: &ClusterNode,
    router: &Router,
) {
    let ni = node.ni();
    let me = node.host_id().unwrap_or(0);
    let replicated = ni.partitions.iter().filter(|e| !e.replicas.is_empty());
    let (mut led, mut followed, mut behind) = (0, 0, 0);
    for entry in replicated {
        if entry.owner == me {
            led += 1;
        } else if entry.replicas.contains(&me) {
            followed += 1;
            behind += usize::from(entry.out_of_sync.contains(&me));
        }
    }
    let hold = router.log_hold();
    let (digest_checks, digest_divergences) = router.digest_checks();
    let _ = write!(
        text,
        "shoal_replicas:{}\r\nshoal_min_replicas_to_write:{}\r\n\
         shoal_partitions_led:{led}\r\nshoal_partitions_followed:{followed}\r\n\
         shoal_partitions_followed_out_of_sync:{behind}\r\n\
         shoal_partitions_under_replicated:{}\r\nshoal_failovers_led:{}\r\n\
         shoal_handovers_led:{}\r\nshoal_new_primaries_seen:{}\r\n\
         shoal_full_copies:{}\r\nshoal_resyncs:{}\r\n\
         shoal_log_hold_entries:{}\r\nshoal_partitions_past_log_hold:{}\r\n\
         shoal_digest_checks:{}\r\nshoal_digest_divergences:{}\r\n\
         shoal_readonly_reads_served:{}\r\n",
        config.cluster.replicas,
        config.cluster.min_replicas_to_write,
        node.under_replicated(),
        node.failovers_led(),
        node.handovers_led(),
        router.new_primaries_seen(),
        router.full_copies(),
        router.resyncs(),
        hold.most_entries,
        hold.past_limit,
        digest_checks,
        digest_divergences,
        router.copy_reads(),
    );
    let lags = router.followers_lag();
    let _ = write!(text, "connected_slaves:{}\r\n", lags.len());
    for (n, lag) in lags.iter().enumerate() {
        let addr = ni
            .hosts
            .get(&lag.host)
            .map_or("", |host| host.client_addr.as_str());
        let (ip, port) = addr.rsplit_once(':').unwrap_or((addr, "0"));
        let state = match lag.behind {
            0 => "online",
            _ => "catching_up",
        };
        let _ = write!(
            text,
            "slave{n}:ip={ip},port={port},state={state},host={},partitions={},\
             behind={},lag_entries={},lag_ms={}\r\n",
            lag.host, lag.partitions, lag.behind, lag.entries, lag.ms,
        );
    }
}

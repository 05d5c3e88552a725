//! The one place where internal failures become client error replies.
//!
//! Texts follow Redis wherever Redis has the same error, so that client
//! libraries recognise them; Shoal's own conditions use `TRYAGAIN` (retry
//! later) or `ERR` with a sentence that says what to do.

use shoal_shared::frame::WorkerError;
use shoal_shared::limits::MAX_KEY_BYTES;
use shoal_shared::resp::Reply;

use crate::workers::{LinkError, REQUEST_TIMEOUT};

pub fn worker_error(error: &WorkerError) -> Reply {
    match error {
        WorkerError::NotInteger => not_integer(),
        WorkerError::Overflow => Reply::error("ERR increment or decrement would overflow"),
        WorkerError::WrongType => wrong_type(),
        WorkerError::Command(text) => Reply::error(text.clone()),
        WorkerError::NotFloat => not_float(),
        WorkerError::NanOrInfinity => Reply::error("ERR increment would produce NaN or Infinity"),
        WorkerError::ValueTooLarge { max_value_bytes } => value_too_large(*max_value_bytes),
        WorkerError::Locked => Reply::error(
            "TRYAGAIN the key is locked by a multi-key write that has not finished; nothing was done",
        ),
        WorkerError::TxKeyExists => Reply::error("ERR a key that must not exist exists; nothing was written"),
        WorkerError::TxNoSuchKey => Reply::error("ERR no such key"),
        WorkerError::TxStale => Reply::error(
            "TRYAGAIN a key changed while the transaction ran; nothing was written",
        ),
        WorkerError::TxConflict => {
            Reply::error("TRYAGAIN the keys are locked by another multi-key write; nothing was written")
        }
        WorkerError::TxAborted => Reply::error("TRYAGAIN the multi-key write was aborted; nothing was written"),
        WorkerError::MapFull { max_map_size_bytes } => Reply::error(format!(
            "OOM the shard is full: its map reached storage.max_map_size_bytes ({max_map_size_bytes} bytes); \
             nothing was written. Raise the limit and restart, or delete keys"
        )),
        WorkerError::DiskFull => Reply::error(
            "DISKFULL no space left on the shard's disk; nothing was written. Writes resume once space is freed",
        ),
        WorkerError::ReplyTooLarge => Reply::error(format!(
            "ERR the reply would be larger than {} bytes; ask for fewer keys at a time",
            shoal_shared::limits::MAX_REPLY_BYTES
        )),
        WorkerError::TxCommitted => Reply::error("ERR the multi-key write was already committed"),
        WorkerError::TxInProgress => Reply::error("TRYAGAIN the multi-key write is still in progress"),
        WorkerError::LogTrimmed { partition, trimmed_through } => Reply::error(format!(
            "ERR partition {partition}'s log was trimmed through commit {trimmed_through} by log retention"
        )),
        WorkerError::Storage(message) => Reply::error(format!("ERR storage error: {message}")),
        WorkerError::PartitionMoved { partition } => Reply::error(format!(
            "TRYAGAIN partition {partition} is moving to another host; nothing was written"
        )),
        WorkerError::TermFenced { fenced } => Reply::error(format!(
            "TRYAGAIN this copy follows a newer primary (term {fenced}); nothing was written"
        )),
    }
}

pub fn link_error(error: &LinkError) -> Reply {
    match error {
        LinkError::Down { worker } => Reply::error(format!(
            "TRYAGAIN shard-{worker} is down; its partitions are unavailable until it restarts"
        )),
        LinkError::Lost { worker } => Reply::error(format!(
            "TRYAGAIN shard-{worker} went down during the request; if it was a write, it may or may not have \
             been applied"
        )),
        LinkError::Timeout { worker } => Reply::error(format!(
            "TRYAGAIN shard-{worker} did not answer within {} ms; if it was a write, it may or may not have \
             been applied",
            REQUEST_TIMEOUT.as_millis()
        )),
        LinkError::NotJoined => {
            Reply::error("TRYAGAIN this host has not joined its cluster yet; retry shortly")
        }
        LinkError::Moved | LinkError::Moving { .. } => Reply::error(format!(
            "TRYAGAIN {error}; nothing was applied, retry shortly"
        )),
        LinkError::Host { .. } => Reply::error(format!(
            "TRYAGAIN the host that owns the key is unavailable ({error}); if it was a write, it may \
             or may not have been applied"
        )),
        LinkError::NoReplicas { started: false } => {
            Reply::error("NOREPLICAS Not enough good replicas to write.")
        }
        LinkError::NoReplicas { started: true } => Reply::error(
            "NOREPLICAS Not enough good replicas to write. The write was not acknowledged by enough \
             replicas in time; it may or may not be kept",
        ),
        LinkError::NotReady { .. } => Reply::error(format!(
            "TRYAGAIN {error} (a failover may be under way); nothing was applied, retry shortly"
        )),
    }
}

pub fn wrong_arity(command: &str) -> Reply {
    Reply::error(format!(
        "ERR wrong number of arguments for '{command}' command"
    ))
}

/// Redis's text: the arguments, quoted, until the list passes 128 bytes.
pub fn unknown_command(name: &[u8], args: &[bytes::Bytes]) -> Reply {
    let mut listed = String::new();
    for arg in args {
        if listed.len() >= 128 {
            break;
        }
        let room = 128 - listed.len();
        let arg = String::from_utf8_lossy(&arg[..arg.len().min(room)]).into_owned();
        listed.push_str(&format!("'{arg}' "));
    }
    let name = String::from_utf8_lossy(&name[..name.len().min(128)]).into_owned();
    Reply::error(format!(
        "ERR unknown command '{name}', with args beginning with: {listed}"
    ))
}

pub fn syntax() -> Reply {
    Reply::error("ERR syntax error")
}

pub fn wrong_type() -> Reply {
    Reply::error("WRONGTYPE Operation against a key holding the wrong kind of value")
}

pub fn not_integer() -> Reply {
    Reply::error("ERR value is not an integer or out of range")
}

pub fn not_float() -> Reply {
    Reply::error("ERR value is not a valid float")
}

pub fn key_too_long(len: usize) -> Reply {
    Reply::error(format!(
        "ERR key is too long ({len} bytes; the limit is {MAX_KEY_BYTES})"
    ))
}

pub fn value_too_large(max_value_bytes: usize) -> Reply {
    Reply::error(format!(
        "ERR value is too large (the limit is max_value_bytes = {max_value_bytes})"
    ))
}

pub fn no_auth() -> Reply {
    Reply::error("NOAUTH Authentication required.")
}

pub fn wrong_pass() -> Reply {
    Reply::error("WRONGPASS invalid username-password pair or user is disabled.")
}

pub fn max_clients() -> Reply {
    Reply::error("ERR max number of clients reached")
}

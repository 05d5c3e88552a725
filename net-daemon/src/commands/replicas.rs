//! A connection and the copies of its partitions: `READONLY`, `READWRITE` and `WAIT`.
//!
//! - `READONLY` lets the connection's GET and MGET be served by the in-sync copy of the
//!   partition nearest to this host (see [`crate::routing`]); such reads may miss the
//!   writes of the last `max_read_staleness` (1 s). `READWRITE` ends it.
//! - `WAIT numreplicas timeout` answers, once the connection's earlier requests are
//!   answered, how many followers hold the connection's writes: for every partition it
//!   wrote, the followers holding the primary's log up to where it stands when asked,
//!   the fewest over the partitions. It waits up to `timeout` ms (0: no limit) for
//!   `numreplicas`. A connection that wrote nothing gets the number of in-sync followers
//!   every partition has. A host on its own has none.

use std::time::Duration;

use bytes::Bytes;
use shoal_shared::resp::{parse_i64, Reply};
use tokio::time::Instant;

use super::Pending;
use crate::errors;
use crate::routing;
use crate::state::Shared;

/// A `WAIT` without a timeout waits this long at most.
const WAIT_FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);
/// How often a `WAIT` that cannot be met yet asks again.
const RECHECK: Duration = Duration::from_millis(100);

/// Runs `name` if it is one of these commands; `None` otherwise. Arity is already checked.
pub fn dispatch(shared: &Shared, name: &str, args: &[Bytes]) -> Option<Pending> {
    let pending = match name {
        "readonly" | "readwrite" => {
            routing::set_readonly(name == "readonly");
            Pending::Ready(Reply::Ok)
        }
        "wait" => wait(shared, &args[1], &args[2]),
        _ => return None,
    };
    Some(pending)
}

fn wait(shared: &Shared, wanted: &[u8], timeout: &[u8]) -> Pending {
    let (Some(wanted), Some(timeout_ms)) = (parse_i64(wanted), parse_i64(timeout)) else {
        return Pending::Ready(errors::not_integer());
    };
    if timeout_ms < 0 {
        return Pending::Ready(Reply::error("ERR timeout is negative"));
    }
    let wait_for = match timeout_ms {
        0 => WAIT_FOREVER,
        ms => Duration::from_millis(ms as u64),
    };
    let wanted = wanted.max(0) as usize;
    let router = shared.dispatch.router.clone();
    let written = routing::written();
    Pending::barrier(async move {
        let deadline = Instant::now() + wait_for;
        loop {
            let count = match &router {
                None => 0,
                Some(router) if written.is_empty() => router.in_sync_followers(),
                Some(router) => router.acknowledged(&written, wanted, deadline).await,
            };
            // As in Redis: with too few, the answer comes at the timeout. A count cut
            // short by a failover is asked again of the new primary.
            let now = Instant::now();
            if count >= wanted || now >= deadline {
                return Reply::Integer(count as i64);
            }
            tokio::time::sleep_until((now + RECHECK).min(deadline)).await;
        }
    })
}

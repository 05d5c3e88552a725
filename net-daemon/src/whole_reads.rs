//! Reads of several keys, seen whole: a read of keys on several workers or hosts (MGET,
//! EXISTS, SINTER, ZUNION, ...) never shows part of a multi-key write (MSET, EXEC, SMOVE,
//! RENAME, ...), committed or in flight.
//!
//! The read runs between two `Versions` answers for its keys. When they agree and no key
//! is locked, all it read was the data of one instant ([`versions::settled`] says why).
//! Otherwise it runs again, the last answer becoming the first; while a key is locked by
//! a prepared transaction, the owners are first asked to answer once it resolves. Reads
//! take no locks and never make a writer wait; one runs twice only when a key it read
//! changed under it. A read that cannot settle within [`GIVE_UP`] (its keys are
//! rewritten without pause, or a transaction stays in doubt) answers `-TRYAGAIN`.
//!
//! The versions come from the shards' maps when they can ([`crate::reads`]), else from
//! the keys' owners: a worker, or another host's net-daemon.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use shoal_shared::frame::{versions, Collection, Key, WorkerRequest, WorkerResponse};
use shoal_shared::resp::Reply;
use tokio::time::Instant;

use crate::dispatch::{DestKeys, Dispatch};

/// How long a read tries to settle before it answers `-TRYAGAIN`.
pub const GIVE_UP: Duration = Duration::from_secs(4);
/// How many times a read from the shards' maps tries before it leaves the read to
/// [`read_whole`].
pub const DIRECT_TRIES: usize = 3;

/// Whether a read of `keys` with one request per owner must be checked: they span
/// several owners. A read inside a transaction's plan never is (the transaction
/// checks its keys itself).
pub fn spans_owners(dispatch: &Dispatch, keys: &[Bytes]) -> bool {
    !Dispatch::is_holding()
        && dispatch
            .group_by_dest(keys)
            .is_ok_and(|groups| groups.len() > 1)
}

/// Runs `read` (of `keys` in `collection`, one request per key or per owner) until what
/// it read was one instant's data, and returns that. An error from `read` is returned at
/// once. A read of one key needs no check.
pub async fn read_whole<T, F, Fut>(
    dispatch: &Dispatch,
    collection: Collection,
    keys: &[Bytes],
    mut read: F,
) -> Result<T, Reply>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Reply>>,
{
    let one_key = keys.iter().all(|key| *key == keys[0]);
    if Dispatch::is_holding() || one_key {
        return read().await;
    }
    Ok(read_whole_at(dispatch, collection, keys, read).await?.0)
}

/// [`read_whole`], also for one key, with the versions of `keys` (in order) at the
/// instant it read: a write that depends on what was read expects them
/// ([`versions::expected_commit_id`]).
pub async fn read_whole_at<T, F, Fut>(
    dispatch: &Dispatch,
    collection: Collection,
    keys: &[Bytes],
    mut read: F,
) -> Result<(T, Vec<u64>), Reply>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Reply>>,
{
    let groups = dispatch.group_by_dest(keys)?;
    let give_up = Instant::now() + GIVE_UP;
    let mut before = versions_of(dispatch, collection, &groups, keys.len(), false).await?;
    loop {
        if before.contains(&versions::LOCKED) {
            // The owners answer as soon as the transactions holding the keys resolve.
            before = versions_of(dispatch, collection, &groups, keys.len(), true).await?;
        } else {
            let result = read().await?;
            let after = versions_of(dispatch, collection, &groups, keys.len(), false).await?;
            if versions::settled(&before, &after) {
                return Ok((result, after));
            }
            before = after;
        }
        if Instant::now() >= give_up {
            return Err(Reply::error(
                "TRYAGAIN the keys kept changing (or stayed locked by a transaction) while they were read",
            ));
        }
    }
}

/// Whether the keys of `groups` still have the versions `seen` (one list per group),
/// read from the shards' maps; false when some cannot be read there.
///
/// A read of keys on several workers from the maps reads each worker's keys with their
/// versions in one transaction, which finds no transaction prepared on that shard; the
/// last worker's read is the instant the answer stands for. Every earlier worker's keys
/// must then still have the versions read, with no transaction prepared (checked here,
/// after the last read): each of those keys held what was read up to that instant, and
/// no multi-key write was half visible then ([`versions::settled`]; on the last worker,
/// nothing was prepared at its read).
pub fn unchanged_directly(
    dispatch: &Dispatch,
    collection: Collection,
    groups: &[DestKeys],
    seen: &[Vec<u64>],
) -> bool {
    groups.iter().zip(seen).all(|((dest, keys, _), seen)| {
        group_versions_directly(dispatch, collection, *dest, keys).as_ref() == Some(seen)
    })
}

/// The versions of the `count` keys of `groups`, in key order, from the maps where they
/// can be read, else from their owners; with `wait`, from the owners once no
/// transaction locks the keys.
async fn versions_of(
    dispatch: &Dispatch,
    collection: Collection,
    groups: &[DestKeys],
    count: usize,
    wait: bool,
) -> Result<Vec<u64>, Reply> {
    let mut all = vec![0; count];
    let mut asked = Vec::new();
    for (dest, keys, positions) in groups {
        let direct = match wait {
            true => None,
            false => group_versions_directly(dispatch, collection, *dest, keys),
        };
        match direct {
            Some(versions) => place(&mut all, positions, versions),
            None => {
                let request = WorkerRequest::Versions {
                    collection,
                    keys: keys.clone(),
                    wait,
                };
                asked.push((dispatch.send(*dest, request).await, positions));
            }
        }
    }
    let (calls, positions): (Vec<_>, Vec<_>) = asked.into_iter().unzip();
    let answers = crate::dispatch::wait_all(calls).await?;
    for (answer, positions) in answers.into_iter().zip(positions) {
        match answer {
            WorkerResponse::Positions(versions) if versions.len() == positions.len() => place(
                &mut all,
                positions,
                versions.into_iter().map(|(_, v)| v).collect(),
            ),
            other => {
                return Err(Reply::error(format!(
                    "ERR internal error: unexpected answer to Versions: {other:?}"
                )))
            }
        }
    }
    Ok(all)
}

fn place(all: &mut [u64], positions: &[usize], versions: Vec<u64>) {
    for (&position, version) in positions.iter().zip(versions) {
        all[position] = version;
    }
}

fn group_versions_directly(
    dispatch: &Dispatch,
    collection: Collection,
    dest: crate::dispatch::Dest,
    keys: &[Key],
) -> Option<Vec<u64>> {
    let worker = dispatch.local_worker(dest)?;
    if let Some(router) = &dispatch.router {
        // A replicated partition is read through its primary's replication rules.
        if keys
            .iter()
            .any(|key| router.local_worker(key.partition).is_none())
        {
            return None;
        }
    }
    let keys: Vec<&Key> = keys.iter().collect();
    dispatch.read_versions_directly(worker, collection, &keys)
}

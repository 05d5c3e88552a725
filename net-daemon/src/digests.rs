//! The metadata leader's background comparison of each partition's copies: the NI's
//! "size and checksum" of a partition, checked.
//!
//! While this host leads the metadata group, [`run`] takes one replicated partition
//! after another, so that a whole pass lasts `cluster.digest_check_secs`. It asks every
//! copy in sync on an active host for its digest (`SHOAL.DIGEST`: last commit id, keys,
//! order-independent checksum) and [`compare`]s them. Copies with equal last commit
//! ids must hold the same data; when they do not, a copy has been changed outside the
//! log (a disk that returned other bytes, a bug), and the divergence is logged as an
//! error and counted (`shoal_digest_divergences`). Copies whose logs differ (writes in
//! flight) are asked again a few times, then left for the next pass.
//!
//! It only reads and reports: it repairs nothing, and never writes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shoal_cluster::ni::HostState;
use shoal_cluster::HostId;
use shoal_shared::reader::PartitionDigest;

use crate::routing::Router;

/// Copies whose logs differ are asked again this often, at most [`TRIES`] times.
const ASK_AGAIN_AFTER: Duration = Duration::from_millis(200);
const TRIES: usize = 5;

/// What the digests of a partition's copies say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every copy holds the same log and the same data.
    Alike,
    /// The copies' logs end at different commit ids: nothing can be said yet.
    Moving,
    /// The logs end alike but these copies' data differ from the first copy's (the
    /// primary's, when it answered).
    Diverged(Vec<HostId>),
}

/// Compares the digests of one partition's copies, the primary's first.
pub fn compare(digests: &[(HostId, PartitionDigest)]) -> Verdict {
    let Some((_, first)) = digests.first() else {
        return Verdict::Alike;
    };
    if digests
        .iter()
        .any(|(_, digest)| digest.last_commit_id != first.last_commit_id)
    {
        return Verdict::Moving;
    }
    let differing: Vec<HostId> = digests
        .iter()
        .filter(|(_, digest)| (digest.keys, digest.checksum) != (first.keys, first.checksum))
        .map(|(host, _)| *host)
        .collect();
    match differing.is_empty() {
        true => Verdict::Alike,
        false => Verdict::Diverged(differing),
    }
}

/// Compares the copies of one partition after another while this host leads the
/// metadata group, a whole pass in `pass`, until shutdown.
pub async fn run(router: Arc<Router>, pass: Duration, shutting_down: Arc<AtomicBool>) {
    let node = Arc::clone(router.node());
    let mut next: usize = 0;
    loop {
        let partitions = node.ni().partitions.len().max(1);
        tokio::time::sleep(pass / partitions as u32).await;
        if shutting_down.load(Ordering::Acquire) {
            return;
        }
        let me = node.host_id();
        let leading = me.is_some() && node.raft_view().is_some_and(|(leader, _)| leader == me);
        if !leading {
            continue;
        }
        let partition = (next % partitions) as u16;
        next = next.wrapping_add(1);
        if let Some(verdict) = check(&router, partition).await {
            router.note_digest_check(matches!(verdict, Verdict::Diverged(_)));
            if let Verdict::Diverged(hosts) = verdict {
                tracing::error!(
                    partition,
                    ?hosts,
                    "copies of a partition hold different data at the same commit id"
                );
            }
        }
    }
}

/// The verdict on `partition`'s copies in sync on active hosts, asked again while their
/// logs differ; `None` when it is not replicated, is moving, or a copy did not answer.
async fn check(router: &Router, partition: u16) -> Option<Verdict> {
    for _ in 0..TRIES {
        let ni = router.node().ni();
        let entry = ni.partitions.get(usize::from(partition))?;
        if entry.replicas.is_empty() || entry.target.is_some() {
            return None;
        }
        let hosts: Vec<HostId> = entry
            .members()
            .into_iter()
            .filter(|host| !entry.out_of_sync.contains(host) && entry.dropping != Some(*host))
            .filter(|host| {
                ni.hosts
                    .get(host)
                    .is_some_and(|info| info.state != HostState::Inactive)
            })
            .collect();
        if hosts.len() < 2 {
            return None;
        }
        let mut digests = Vec::with_capacity(hosts.len());
        for host in hosts {
            match router.digest_of(host, partition).await {
                Ok(digest) => digests.push((host, digest)),
                Err(error) => {
                    tracing::debug!(partition, host, %error, "no digest for the comparison");
                    return None;
                }
            }
        }
        match compare(&digests) {
            Verdict::Moving => tokio::time::sleep(ASK_AGAIN_AFTER).await,
            verdict => return Some(verdict),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(last_commit_id: u64, keys: u64, checksum: u64) -> PartitionDigest {
        PartitionDigest {
            last_commit_id,
            keys,
            checksum,
        }
    }

    #[test]
    fn copies_at_the_same_commit_id_must_hold_the_same_data() {
        let alike = [
            (1, digest(9, 3, 77)),
            (2, digest(9, 3, 77)),
            (3, digest(9, 3, 77)),
        ];
        assert_eq!(compare(&alike), Verdict::Alike);
        let one_off = [
            (1, digest(9, 3, 77)),
            (2, digest(9, 3, 78)),
            (3, digest(9, 3, 77)),
        ];
        assert_eq!(compare(&one_off), Verdict::Diverged(vec![2]));
        let fewer_keys = [(1, digest(9, 3, 77)), (3, digest(9, 2, 77))];
        assert_eq!(compare(&fewer_keys), Verdict::Diverged(vec![3]));
    }

    #[test]
    fn copies_whose_logs_differ_say_nothing_yet() {
        let moving = [(1, digest(10, 4, 1)), (2, digest(9, 3, 77))];
        assert_eq!(compare(&moving), Verdict::Moving);
        assert_eq!(compare(&[]), Verdict::Alike);
    }
}

//! What a client connection asks of a partition's copies beyond its primary:
//! - `READONLY` reads ([`Router::read_copy`]): a GET or MGET of a replicated partition
//!   is served by the in-sync copy nearest to this host by the network coordinates,
//!   this host's own copy first, as long as that copy heard from its primary within
//!   `max_read_staleness` and holds all it knows to be committed (the core's rule,
//!   [`shoal_cluster::replication::replica::Replica::stale_readable_until`]). At equal
//!   distance a follower goes before the primary. When the primary is the nearest, or
//!   no copy may serve, the read takes the ordinary path.
//! - `WAIT` ([`Router::acknowledged`]): how many followers of each partition the
//!   connection wrote hold its primary's log up to where it stood when asked.
//! - digests ([`Router::digest_of`]): `SHOAL.DIGEST` of any host's copy, for the
//!   metadata leader's comparison of the copies (`crate::digests`).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use shoal_shared::frame::{Partition, WorkerRequest, WorkerResponse};
use shoal_shared::partition::partition_worker;
use shoal_shared::reader::PartitionDigest;
use tokio::time::Instant;

use shoal_cluster::messages::{DataRequest, PeerRequest, PeerResponse};
use shoal_cluster::ni::HostState;
use shoal_cluster::HostId;

use super::{plain_read, read_with, Router, FORWARD_TIMEOUT};
use crate::replication::FollowerLag;

impl Router {
    /// A `READONLY` connection's GET or MGET of `partition`, served by its nearest copy
    /// if that is a follower that may serve it; `None` sends it the ordinary way.
    pub(super) async fn read_copy(
        &self,
        partition: Partition,
        request: &WorkerRequest,
    ) -> Option<WorkerResponse> {
        if !plain_read(request) {
            return None;
        }
        let ni = self.node.ni();
        let me = self.node.host_id()?;
        let entry = ni.partitions.get(usize::from(partition))?;
        if entry.replicas.is_empty() || !ni.owns_all(entry.owner, request) {
            return None;
        }
        // An MGET over several partitions goes to a copy that holds them all, in sync.
        let touched: Vec<_> = request
            .client_partitions()
            .into_iter()
            .filter_map(|p| ni.partitions.get(usize::from(p)))
            .collect();
        let in_sync_everywhere = |host: &HostId| {
            touched
                .iter()
                .all(|e| e.is_member(*host) && !e.out_of_sync.contains(host))
        };
        let nearest = entry
            .members()
            .into_iter()
            .filter(in_sync_everywhere)
            .filter(|host| {
                ni.hosts
                    .get(host)
                    .is_some_and(|info| info.state != HostState::Inactive)
            })
            .map(|host| {
                let distance = self.node.distance_s(host).unwrap_or(f64::MAX);
                // At equal distance: this host, then a follower, then the primary.
                (distance, (host != me, host == entry.owner, host))
            })
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
            .map(|(_, (_, _, host))| host)?;
        if nearest == entry.owner {
            return None;
        }
        if nearest == me {
            return self.read_local_copy(partition, request);
        }
        let asked = PeerRequest::Data(DataRequest::ReadCopy {
            partition,
            request: request.clone(),
        });
        match self.node.call_host(nearest, asked, FORWARD_TIMEOUT).await {
            Ok(PeerResponse::Worker(response)) => Some(response),
            _ => None,
        }
    }

    /// `request` read from this host's follower copy of `partition` (the worker fences it
    /// for clients, so the read goes to the shard's map), if the copy may serve it now.
    pub(super) fn read_local_copy(
        &self,
        partition: Partition,
        request: &WorkerRequest,
    ) -> Option<WorkerResponse> {
        let worker = partition_worker(partition, self.links.len());
        let now = Instant::now();
        let all_readable = request.client_partitions().into_iter().all(|p| {
            partition_worker(p, self.links.len()) == worker
                && self.replication.status(p).is_some_and(|status| {
                    status.stale_readable_until.is_some_and(|until| now < until)
                })
        });
        let response = all_readable
            .then(|| {
                read_with(request, |collection, keys| {
                    self.readers.read_copy(worker, collection, keys)
                })
            })
            .flatten()?;
        self.copy_reads.fetch_add(1, Ordering::Relaxed);
        Some(response)
    }

    /// `WAIT`: the fewest followers, over `partitions`, that hold the primary's log up to
    /// where it stands now, each waiting until `wanted` do or until `deadline`. Each
    /// partition is asked of its primary; one that does not answer counts 0.
    pub async fn acknowledged(
        &self,
        partitions: &[Partition],
        wanted: usize,
        deadline: Instant,
    ) -> usize {
        let ni = self.node.ni();
        let me = self.node.host_id();
        let mut by_owner: Vec<(HostId, Vec<Partition>)> = Vec::new();
        for &partition in partitions {
            let Some(entry) = ni.partitions.get(usize::from(partition)) else {
                return 0;
            };
            match by_owner.iter_mut().find(|(owner, _)| *owner == entry.owner) {
                Some((_, led)) => led.push(partition),
                None => by_owner.push((entry.owner, vec![partition])),
            }
        }
        // One after the other: every wait ends by the same deadline.
        let mut fewest = usize::MAX;
        for (owner, led) in by_owner {
            let count = if Some(owner) == me {
                self.acknowledged_here(&led, wanted, deadline).await
            } else {
                let timeout = deadline.saturating_duration_since(Instant::now());
                let asked = PeerRequest::Data(DataRequest::Acknowledged {
                    partitions: led,
                    wanted: wanted as u32,
                    timeout_ms: timeout.as_millis() as u64,
                });
                match self
                    .node
                    .call_host(owner, asked, timeout + FORWARD_TIMEOUT)
                    .await
                {
                    Ok(PeerResponse::Worker(WorkerResponse::Integer(count))) => count as usize,
                    _ => 0,
                }
            };
            fewest = fewest.min(count);
        }
        match fewest {
            usize::MAX => 0,
            fewest => fewest,
        }
    }

    /// [`Router::acknowledged`] for partitions this host leads (0 for one it does not).
    pub(super) async fn acknowledged_here(
        &self,
        partitions: &[Partition],
        wanted: usize,
        deadline: Instant,
    ) -> usize {
        let mut fewest = usize::MAX;
        for &partition in partitions {
            let count = self
                .replication
                .acknowledged(partition, wanted, deadline)
                .await;
            fewest = fewest.min(count);
        }
        match fewest {
            usize::MAX => 0,
            fewest => fewest,
        }
    }

    /// The fewest in-sync followers any replicated partition has (0 without replication).
    pub fn in_sync_followers(&self) -> usize {
        let ni = self.node.ni();
        ni.partitions
            .iter()
            .filter(|entry| !entry.replicas.is_empty())
            .map(|entry| {
                entry
                    .replicas
                    .iter()
                    .filter(|host| !entry.out_of_sync.contains(host))
                    .filter(|host| {
                        ni.hosts
                            .get(host)
                            .is_some_and(|info| info.state != HostState::Inactive)
                    })
                    .count()
            })
            .min()
            .unwrap_or(0)
    }

    /// How far behind the followers of the partitions led here are, per follower host.
    pub fn followers_lag(&self) -> Vec<FollowerLag> {
        self.replication.followers_lag()
    }

    /// Full copies this host's followers took from their primaries.
    pub fn full_copies(&self) -> u64 {
        self.replication.full_copies()
    }

    /// Followers that primaries here brought into sync in the NI.
    pub fn resyncs(&self) -> u64 {
        self.replication.resyncs()
    }

    /// New primaries (failovers and handovers) seen for the partitions held here.
    pub fn new_primaries_seen(&self) -> u64 {
        self.replication.new_primaries_seen()
    }

    /// How much log the partitions led here keep for lagging followers.
    pub fn log_hold(&self) -> crate::replication::LogHold {
        self.replication.log_hold()
    }

    /// The digest of `host`'s copy of `partition` (this host's or another's).
    pub async fn digest_of(
        &self,
        host: HostId,
        partition: Partition,
    ) -> Result<PartitionDigest, String> {
        if Some(host) == self.node.host_id() {
            return self.local_digest(partition).await;
        }
        let request = PeerRequest::Data(DataRequest::Digest { partition });
        match self.node.call_host(host, request, FORWARD_TIMEOUT).await {
            Ok(PeerResponse::Digest {
                last_commit_id,
                keys,
                checksum,
            }) => Ok(PartitionDigest {
                last_commit_id,
                keys,
                checksum,
            }),
            Ok(PeerResponse::Refused(reason)) => Err(reason),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(error) => Err(error.to_string()),
        }
    }

    /// The digest of this host's copy of `partition`, read off the runtime's threads (it
    /// reads the whole partition).
    pub(super) async fn local_digest(
        &self,
        partition: Partition,
    ) -> Result<PartitionDigest, String> {
        if !self.node.holds_copy(partition) {
            return Err(format!("this host holds no copy of partition {partition}"));
        }
        let readers = Arc::clone(&self.readers);
        let worker = partition_worker(partition, self.links.len());
        tokio::task::spawn_blocking(move || readers.digest(worker, partition))
            .await
            .map_err(|error| error.to_string())?
            .map_err(|error| error.to_string())
    }

    /// Counts one comparison of a partition's copies by this host as metadata leader.
    pub fn note_digest_check(&self, diverged: bool) {
        self.digest_checks.fetch_add(1, Ordering::Relaxed);
        if diverged {
            self.digest_divergences.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Comparisons of a partition's copies this host made as metadata leader, and the
    /// divergences they found.
    pub fn digest_checks(&self) -> (u64, u64) {
        (
            self.digest_checks.load(Ordering::Relaxed),
            self.digest_divergences.load(Ordering::Relaxed),
        )
    }

    /// `READONLY` reads this host's follower copies served.
    pub fn copy_reads(&self) -> u64 {
        self.copy_reads.load(Ordering::Relaxed)
    }
}

//! Requests for partitions in a cluster: to this host's worker or to the owning host.
//!
//! On a host on its own, commands send to their worker directly and this module
//! is not used. In a cluster, the NI's partition table says which host owns each
//! partition, and [`Router::send`] delivers a request for a partition to its owner:
//! to the local worker, or over the peer link to the owner's net-daemon, which
//! checks that it still owns the partition and hands the request to its worker.
//!
//! A request is retried, within [`FORWARD_TIMEOUT`], when it reached a host that
//! does not own the partition any more (its table is newer or older than this
//! host's), or a worker that fenced the partition for the final step of a handoff:
//! in both cases nothing was applied. The client never sees MOVED or ASK; when no
//! owner answers in time it gets a `-TRYAGAIN` error that names the reason.
//!
//! Requests of one client connection are applied in the order the client sent
//! them on each partition, as Redis promises: each waits until the connection's
//! earlier requests on the partitions it touches have been answered (see
//! [`in_order`]). Requests for different partitions go
//! out at once, so a pipeline of keys spread over partitions keeps its
//! parallelism.
//!
//! The peer side is the [`DataPath`] that [`shoal_cluster::node::ClusterNode`] hands
//! the data requests of other hosts to: it checks that this host owns the partition
//! (and, for a fence, that its table shows the move), then asks its worker.
//!
//! A partition with followers is served by its primary only through the replication
//! rules ([`Router::replicated`]): a write starts only while enough followers answer,
//! and no answer (of a write or a read) goes out before the commit point covers what the
//! request wrote or saw. A two-phase commit request counts every partition of its
//! transaction record that this host leads, and recovery's requests to local workers
//! take the same gate ([`Router::local`]).
//!
//! A GET or MGET for another host that may go out at once travels in that host's next
//! batch of reads ([`batched`]), answered by the owner straight from its maps.
//!
//! [`copies`] serves what a connection asks of the other copies: `READONLY` reads from
//! the nearest in-sync follower, and `WAIT`.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use shoal_shared::config::ClusterConfig;
use shoal_shared::frame::{
    Collection, Key, LogEntry, Partition, WorkerError, WorkerRequest, WorkerResponse,
};
use shoal_shared::partition::partition_worker;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use shoal_cluster::messages::{DataRequest, PeerRequest, PeerResponse};
use shoal_cluster::node::{ClusterNode, DataFuture, DataPath};
use shoal_cluster::HostId;

use crate::pubsub::Broker;
use crate::reads::Readers;
use crate::replication::{Replication, Status};
use crate::workers::{Call, LinkError, WorkerLink, REQUEST_TIMEOUT};

/// Longest a request follows its partition: a little less than the caller waits, so that
/// the caller gets the reason rather than a bare timeout.
const FORWARD_TIMEOUT: Duration = Duration::from_millis(REQUEST_TIMEOUT.as_millis() as u64 - 300);
/// Set in a group's worker number when the owner has not reported its worker count: each
/// partition is then a group of its own (partition numbers stay below this bit).
const UNREPORTED_WORKERS: u16 = 0x8000;
const _: () = assert!(shoal_shared::partition::SLOTS <= UNREPORTED_WORKERS);
/// Longest a write waits for a primary that has just been promoted to open its term.
const READY_WAIT: Duration = Duration::from_millis(1500);
/// Longest an owner waits for its table to show the move a fence request names.
const FENCE_TABLE_WAIT: Duration = Duration::from_secs(3);
const RETRY_MIN: Duration = Duration::from_millis(5);
const RETRY_MAX: Duration = Duration::from_millis(200);

mod batched;
mod copies;

/// What the routing keeps for one client connection.
#[derive(Default)]
struct Connection {
    /// For each partition, whether the connection's latest request on it is answered.
    answered: HashMap<Partition, watch::Receiver<bool>>,
    /// For each partition whose latest request is a read in a batch: the host and the
    /// number of that batch ([`batched`]).
    in_batch: HashMap<Partition, (HostId, u64)>,
    /// The partitions the connection wrote to (for `WAIT`).
    written: BTreeSet<Partition>,
    /// `READONLY`: its GET and MGET may be served by the nearest in-sync copy.
    readonly: bool,
}

tokio::task_local! {
    static CONNECTION: RefCell<Connection>;
}

/// Runs a client connection: its requests are applied in order on each partition.
pub async fn in_order<F: Future>(connection: F) -> F::Output {
    CONNECTION.scope(RefCell::default(), connection).await
}

/// Whether the current connection has no request on `partition` in flight (a read may
/// then be answered at once without overtaking one). False outside a connection.
pub fn idle(partition: Partition) -> bool {
    CONNECTION
        .try_with(|connection| {
            connection
                .borrow()
                .answered
                .get(&partition)
                .is_none_or(|done| *done.borrow())
        })
        .unwrap_or(false)
}

/// `READONLY` (true) or `READWRITE` (false) for the current connection.
pub fn set_readonly(readonly: bool) {
    let _ = CONNECTION.try_with(|connection| connection.borrow_mut().readonly = readonly);
}

/// The partitions the current connection has written to.
pub fn written() -> Vec<Partition> {
    CONNECTION
        .try_with(|connection| connection.borrow().written.iter().copied().collect())
        .unwrap_or_default()
}

/// Delivers requests for partitions to their owners.
pub struct Router {
    node: Arc<ClusterNode>,
    links: Vec<WorkerLink>,
    /// GET and MGET from other hosts are read from the shards' maps when they can be.
    readers: Arc<Readers>,
    /// This host's copies of replicated partitions.
    replication: Arc<Replication>,
    /// This host's pub/sub subscriptions, for messages published on other hosts.
    pubsub: Arc<Broker>,
    /// Reads of other hosts' partitions waiting to go out together ([`batched`]).
    read_batches: batched::ReadBatches,
    /// Batches of reads sent, and the reads they answered.
    read_batches_sent: AtomicU64,
    reads_batched: AtomicU64,
    /// `READONLY` reads served by this host's follower copies.
    copy_reads: AtomicU64,
    /// Comparisons of a partition's copies made here as metadata leader.
    digest_checks: AtomicU64,
    /// Those that found copies with equal logs and different contents.
    digest_divergences: AtomicU64,
}

impl Router {
    /// The router of `node`, over this host's worker `links`. A primary keeps at most
    /// `hold_limit_entries` log entries for a lagging follower beyond log retention.
    pub fn new(
        node: Arc<ClusterNode>,
        links: Vec<WorkerLink>,
        readers: Arc<Readers>,
        config: &ClusterConfig,
        hold_limit_entries: u64,
        pubsub: Arc<Broker>,
    ) -> Router {
        let replication = Replication::start(
            Arc::clone(&node),
            links.clone(),
            Arc::clone(&readers),
            config,
            hold_limit_entries,
        );
        Router {
            node,
            links,
            readers,
            replication,
            pubsub,
            read_batches: Default::default(),
            read_batches_sent: AtomicU64::new(0),
            reads_batched: AtomicU64::new(0),
            copy_reads: AtomicU64::new(0),
            digest_checks: AtomicU64::new(0),
            digest_divergences: AtomicU64::new(0),
        }
    }

    /// Whether `partition` has followers (its primary then serves it through
    /// [`Router::replicated`]).
    pub fn is_replicated(&self, partition: Partition) -> bool {
        self.node
            .ni()
            .partitions
            .get(usize::from(partition))
            .is_some_and(|entry| !entry.replicas.is_empty())
    }

    /// Whether `request` for `partition`'s group touches a partition with followers.
    fn touches_replicated(&self, partition: Partition, request: &WorkerRequest) -> bool {
        request
            .client_partitions()
            .into_iter()
            .chain([partition])
            .any(|p| self.is_replicated(p))
    }

    /// Serves `request` for `partition`, replicated with this host as its primary:
    /// - a write starts only while enough followers answer (else `NoReplicas`, nothing
    ///   applied), and is answered once the commit point covers the partition's log as the
    ///   worker left it (else `NoReplicas` at the deadline: it may or may not be kept);
    /// - a read needs the lease, and is answered once the commit point covers the log as
    ///   the read found it, so it never shows an entry a failover could lose;
    /// - a request that finds the copy not ready while the NI moves the partition on (a
    ///   handover or a failover: another primary, or the `epoch` it was routed at gone)
    ///   stops waiting and answers `Moved`: nothing was applied, and the caller routes it
    ///   again.
    ///
    /// A request may touch several partitions of one worker: each replicated one must be
    /// ready, and is waited for. A two-phase commit request (`Commit`, `Abort`, `Decide`,
    /// `Forget`) names only its transaction: the partitions of its record here count too.
    async fn replicated(
        &self,
        partition: Partition,
        epoch: u64,
        request: WorkerRequest,
        deadline: Instant,
    ) -> Result<WorkerResponse, LinkError> {
        let worker = partition_worker(partition, self.links.len());
        let mut touched: Vec<Partition> = request
            .client_partitions()
            .into_iter()
            .chain([partition])
            .chain(self.record_partitions(worker, &request)?)
            .filter(|&p| self.is_replicated(p))
            .collect();
        touched.sort_unstable();
        touched.dedup();
        self.gated(worker, touched, request, deadline, Some((partition, epoch)))
            .await
    }

    /// The partitions of the transaction record that a two-phase commit request (`Commit`,
    /// `Abort`, `Decide`, `Forget`) may change on `worker`: those of its record there
    /// (read from the shard's map before the request is sent: a record only loses parts
    /// once prepared) that this host owns. None for other requests.
    fn record_partitions(
        &self,
        worker: usize,
        request: &WorkerRequest,
    ) -> Result<Vec<Partition>, LinkError> {
        let txid = match request {
            WorkerRequest::Commit { txid }
            | WorkerRequest::Abort { txid }
            | WorkerRequest::Decide { txid, .. }
            | WorkerRequest::Forget { txid } => *txid,
            _ => return Ok(Vec::new()),
        };
        let me = self.node.host_id();
        let ni = self.node.ni();
        let partitions = self
            .readers
            .transaction_partitions(worker, txid)
            .map_err(|error| LinkError::Host {
                host: me.unwrap_or(0),
                reason: error.to_string(),
            })?;
        Ok(partitions
            .into_iter()
            .filter(|&p| {
                ni.partitions
                    .get(usize::from(p))
                    .is_some_and(|entry| Some(entry.owner) == me)
            })
            .collect())
    }

    /// Sends `request` to this host's `worker` once every partition of `touched` (all
    /// replicated, led here) is ready, and answers once their commit points cover what the
    /// request wrote (or, for a read, saw), in the term that admitted it. `routed` is the
    /// partition the request was routed by and the epoch it was routed at, if any. See
    /// [`Router::replicated`].
    async fn gated(
        &self,
        worker: usize,
        touched: Vec<Partition>,
        request: WorkerRequest,
        deadline: Instant,
        routed: Option<(Partition, u64)>,
    ) -> Result<WorkerResponse, LinkError> {
        let write = request.is_write();
        if !write {
            if let Some(response) = self.read_committed_directly(worker, &touched, &request) {
                return Ok(response);
            }
        }
        let ready_by = (Instant::now() + READY_WAIT).min(deadline);
        let moved_on = || {
            let ni = self.node.ni();
            let me = self.node.host_id();
            let entry = |p: Partition| ni.partitions.get(usize::from(p));
            routed.is_some_and(|(partition, epoch)| {
                entry(partition).is_none_or(|entry| entry.epoch != epoch)
            }) || touched
                .iter()
                .any(|&p| entry(p).is_none_or(|entry| Some(entry.owner) != me))
        };
        let mut terms = Vec::with_capacity(touched.len());
        for &p in &touched {
            let mut term = self.ready(p, write, ready_by, &moved_on).await;
            if term.is_none() && !moved_on() && self.replication.in_round(p) {
                // A failover or handover is naming a new primary (up to a lease): wait for
                // it rather than refuse, since nothing was applied.
                term = self.ready(p, write, deadline, &moved_on).await;
            }
            match term {
                Some(term) => terms.push((p, term)),
                None if moved_on() => return Err(LinkError::Moved),
                None => {
                    return Err(match write {
                        true => LinkError::NoReplicas { started: false },
                        false => LinkError::NotReady { partition: p },
                    })
                }
            }
        }
        let response = self.links[worker].send(request).await.wait().await?;
        if let WorkerResponse::Error(WorkerError::PartitionMoved { .. }) = response {
            // The worker fenced the partition (a higher term was promised) before the
            // request: nothing was applied, and the caller routes it again.
            return Err(LinkError::Moved);
        }
        for (p, term) in terms {
            let last = self
                .readers
                .last_commit_id(worker, p)
                .map_err(|error| LinkError::Host {
                    host: self.node.host_id().unwrap_or(0),
                    reason: error.to_string(),
                })?;
            if write {
                self.replication.written(p, last);
            }
            if !self.replication.wait_commit(p, term, last, deadline).await {
                return Err(match write {
                    true => LinkError::NoReplicas { started: true },
                    false => LinkError::NotReady { partition: p },
                });
            }
            // A read checks the lease again once it has run: a fence answered while it
            // waited means a newer primary may have acknowledged writes it missed.
            if !write && self.ready(p, false, Instant::now(), &|| false).await != Some(term) {
                return Err(LinkError::NotReady { partition: p });
            }
        }
        Ok(response)
    }

    /// A GET or MGET of replicated partitions (`touched`, led here) answered from the
    /// shard's map with no wait, if it can be: this copy holds the lease before and after
    /// the read, in one term, and the log the map shows afterwards is all committed (so
    /// the values read, from an earlier snapshot, are too). `None` sends it the slow way.
    fn read_committed_directly(
        &self,
        worker: usize,
        touched: &[Partition],
        request: &WorkerRequest,
    ) -> Option<WorkerResponse> {
        let leased = |p: Partition| {
            let status = self.replication.status(p)?;
            let held = status
                .readable_until
                .is_some_and(|end| Instant::now() < end);
            held.then_some(status.primary_term).flatten()
        };
        let terms: Vec<u64> = touched.iter().map(|&p| leased(p)).collect::<Option<_>>()?;
        let response = self.read_directly(worker, request)?;
        for (&p, term) in touched.iter().zip(terms) {
            let last = self.readers.last_commit_id(worker, p).ok()?;
            let commit = self.replication.status(p)?.commit;
            if leased(p) != Some(term) || commit < last {
                return None;
            }
        }
        Some(response)
    }

    /// Sends a request of the recovery of transactions to this host's `worker`: a
    /// two-phase commit request on a record with replicated partitions led here is
    /// answered only once their commit points cover it, like a write
    /// ([`Router::replicated`]), so that recovery never acts on a change a failover could
    /// lose. Parts of partitions this host does not lead are fenced in the worker, which
    /// leaves them to their own primary.
    pub fn local(self: &Arc<Self>, worker: usize, request: WorkerRequest) -> Call {
        let (sender, receiver) = oneshot::channel();
        let router = Arc::clone(self);
        tokio::spawn(async move {
            let deadline = Instant::now() + FORWARD_TIMEOUT;
            let result = match router.record_partitions(worker, &request) {
                Err(error) => Err(error),
                Ok(partitions) => {
                    let touched: Vec<Partition> = partitions
                        .into_iter()
                        .filter(|&p| router.is_replicated(p))
                        .collect();
                    match touched.is_empty() {
                        true => router.links[worker].send(request).await.wait().await,
                        false => router.gated(worker, touched, request, deadline, None).await,
                    }
                }
            };
            let _ = sender.send(result);
        });
        Call::pending(receiver, Instant::now() + REQUEST_TIMEOUT)
    }

    /// This copy's term, if it is the primary of `partition` and may start a write
    /// (`write`) or serve a read, waiting for that until `until` or until `give_up`.
    async fn ready(
        &self,
        partition: Partition,
        write: bool,
        until: Instant,
        give_up: &(dyn Fn() -> bool + Sync),
    ) -> Option<u64> {
        let open = |status: &Status, now: Instant| {
            let open_until = match write {
                true => status.writable_until,
                false => status.readable_until,
            };
            status.primary_term.is_some() && open_until.is_some_and(|end| now < end)
        };
        let status = self
            .replication
            .wait_status(partition, until, |status, now| {
                open(status, now) || give_up()
            })
            .await?;
        open(&status, Instant::now())
            .then_some(status.primary_term)
            .flatten()
    }

    /// `request` (a GET or MGET of `worker`) answered from the shard's map, if it can be.
    fn read_directly(&self, worker: usize, request: &WorkerRequest) -> Option<WorkerResponse> {
        let connected = self.links[worker].is_connected();
        read_with(request, |collection, keys| {
            self.readers.read(worker, connected, collection, keys)
        })
    }

    pub fn node(&self) -> &Arc<ClusterNode> {
        &self.node
    }

    /// The local worker of `partition` when this host owns it now and may read it
    /// straight from the map (not while the partition has followers: such reads go
    /// through [`Router::replicated`]).
    pub fn local_worker(&self, partition: Partition) -> Option<usize> {
        let ni = self.node.ni();
        let me = self.node.host_id()?;
        let entry = ni.partitions.get(usize::from(partition))?;
        (entry.owner == me && entry.replicas.is_empty())
            .then(|| partition_worker(partition, self.links.len()))
    }

    /// The owner of `partition` and its worker for it: requests of one group go to one
    /// worker. A host that has not reported its worker count has a group per partition.
    pub fn group(&self, partition: Partition) -> (HostId, u16) {
        let ni = self.node.ni();
        let Some(entry) = ni.partitions.get(usize::from(partition)) else {
            return (0, partition);
        };
        let workers = match self.node.host_id() == Some(entry.owner) {
            true => self.links.len(),
            false => ni
                .hosts
                .get(&entry.owner)
                .map_or(0, |host| usize::from(host.capacity.workers)),
        };
        match workers {
            0 => (entry.owner, UNREPORTED_WORKERS | partition),
            workers => (entry.owner, partition_worker(partition, workers) as u16),
        }
    }

    /// Sends `request` (whose keys are all in `partition`'s group) to the partition's owner,
    /// after the connection's previous requests for the partitions it touches have been
    /// answered. A read for another host joins that host's batch instead when it need wait
    /// for nothing, or only for reads of that same batch ([`batched`]): the owner answers
    /// a batch in order.
    pub fn send(self: &Arc<Self>, partition: Partition, mut request: WorkerRequest) -> Call {
        let (mut sender, receiver) = oneshot::channel();
        let (mut answered, next_waits) = watch::channel(false);
        let touched = touched(partition, &request);
        let write = request.is_write();
        // The earlier requests not answered yet, and the batch of reads each is in.
        let (previous, in_batches, readonly) = CONNECTION
            .try_with(|connection| {
                let mut connection = connection.borrow_mut();
                if write {
                    connection.written.extend(&touched);
                }
                let mut previous = Vec::new();
                let mut in_batches = Vec::new();
                for &p in &touched {
                    let Some(earlier) = connection.answered.insert(p, next_waits.clone()) else {
                        continue;
                    };
                    if !*earlier.borrow() {
                        previous.push(earlier);
                        in_batches.push(connection.in_batch.get(&p).copied());
                    }
                }
                (previous, in_batches, connection.readonly)
            })
            .unwrap_or_default();
        let deadline = Instant::now() + FORWARD_TIMEOUT;
        let batch = self
            .batched_owner(partition, &request)
            .filter(|_| !readonly)
            .and_then(|(host, epoch)| {
                let after = batched::batch_to_join(host, &in_batches)?;
                Some((host, epoch, after))
            });
        if let Some((host, epoch, after)) = batch {
            let read = batched::QueuedRead {
                partition,
                epoch,
                request,
                deadline,
                done: sender,
                answered,
            };
            match self.send_read(host, read, after) {
                Ok(number) => {
                    let _ = CONNECTION.try_with(|connection| {
                        let mut connection = connection.borrow_mut();
                        for &p in &touched {
                            connection.in_batch.insert(p, (host, number));
                        }
                    });
                    return Call::pending(receiver, Instant::now() + REQUEST_TIMEOUT);
                }
                // The batch it had to join has left: it waits for its answers.
                Err(read) => (request, sender, answered) = (read.request, read.done, read.answered),
            }
        }
        let _ = CONNECTION.try_with(|connection| {
            let mut connection = connection.borrow_mut();
            for p in &touched {
                connection.in_batch.remove(p);
            }
        });
        let router = Arc::clone(self);
        tokio::spawn(async move {
            for mut previous in previous {
                // Answered, or dropped with its task: either way it is done.
                let _ = tokio::time::timeout_at(deadline, previous.wait_for(|done| *done)).await;
            }
            let from_copy = match readonly {
                true => router.read_copy(partition, &request).await,
                false => None,
            };
            let result = match from_copy {
                Some(response) => Ok(response),
                None => router.forward(partition, request, deadline).await,
            };
            let _ = sender.send(result);
            let _ = answered.send(true);
        });
        Call::pending(receiver, Instant::now() + REQUEST_TIMEOUT)
    }

    /// Sends `request` to the owner of `partition` until an owner answers it or `deadline`
    /// passes.
    pub async fn forward(
        &self,
        partition: Partition,
        request: WorkerRequest,
        deadline: Instant,
    ) -> Result<WorkerResponse, LinkError> {
        let mut backoff = RETRY_MIN;
        loop {
            let ni = self.node.ni();
            let (Some(me), Some(entry)) = (
                self.node.host_id(),
                ni.partitions.get(usize::from(partition)),
            ) else {
                return Err(LinkError::NotJoined);
            };
            let result = if entry.owner == me {
                if !ni.owns_all(me, &request) {
                    Err(LinkError::Moved)
                } else if self.touches_replicated(partition, &request) {
                    self.replicated(partition, entry.epoch, request.clone(), deadline)
                        .await
                } else {
                    let worker = partition_worker(partition, self.links.len());
                    self.links[worker].send(request.clone()).await.wait().await
                }
            } else {
                self.remote(
                    entry.owner,
                    partition,
                    entry.epoch,
                    request.clone(),
                    deadline,
                )
                .await
            };
            match result {
                Ok(WorkerResponse::Error(WorkerError::PartitionMoved { .. }))
                | Err(LinkError::Moved) => {}
                other => return other,
            }
            if Instant::now() + backoff >= deadline {
                return Err(LinkError::Moving { partition });
            }
            // Wait for a newer table, or at most the backoff.
            let version = ni.version;
            let waited = Instant::now();
            while self.node.ni().version == version && waited.elapsed() < backoff {
                tokio::time::sleep(RETRY_MIN).await;
            }
            backoff = (backoff * 2).min(RETRY_MAX);
        }
    }

    /// The owner of each partition, as this host knows it.
    pub fn owners(&self) -> Vec<HostId> {
        self.node
            .ni()
            .partitions
            .iter()
            .map(|entry| entry.owner)
            .collect()
    }

    /// Sends one request to every worker of every other host that is the primary of a
    /// partition: one call per host. A fan-out over the data (DBSIZE, KEYS, FLUSH, the
    /// transactions held, ...) needs no more, since each host serves only the partitions
    /// it leads; a host that died and whose partitions failed over is not asked.
    pub fn send_to_other_owners(self: &Arc<Self>, make: impl Fn() -> WorkerRequest) -> Vec<Call> {
        let mut owners: Vec<HostId> = self.owners();
        owners.sort_unstable();
        owners.dedup();
        self.send_to_hosts(owners, make)
    }

    fn send_to_hosts(
        self: &Arc<Self>,
        hosts: Vec<HostId>,
        make: impl Fn() -> WorkerRequest,
    ) -> Vec<Call> {
        let me = self.node.host_id();
        hosts
            .into_iter()
            .filter(|&host| Some(host) != me)
            .map(|host| self.send_to_host(host, make()))
            .collect()
    }

    /// Sends one request to every worker of `host` (this one or another); the call's
    /// response is the workers' responses merged (integers added, keys and entries joined).
    pub fn send_to_host(self: &Arc<Self>, host: HostId, request: WorkerRequest) -> Call {
        let (sender, receiver) = oneshot::channel();
        let router = Arc::clone(self);
        tokio::spawn(async move {
            let result = if Some(host) == router.node.host_id() {
                router
                    .serve_all(request)
                    .await
                    .map(merge_responses)
                    .map_err(|reason| LinkError::Host { host, reason })
            } else {
                let request = PeerRequest::Data(DataRequest::AllWorkers(request));
                match router.node.call_host(host, request, FORWARD_TIMEOUT).await {
                    Ok(PeerResponse::Workers(responses)) => Ok(merge_responses(responses)),
                    Ok(other) => Err(refusal(host, other)),
                    Err(error) => Err(error.into()),
                }
            };
            let _ = sender.send(result);
        });
        Call::pending(receiver, Instant::now() + REQUEST_TIMEOUT)
    }

    async fn remote(
        &self,
        host: HostId,
        partition: Partition,
        epoch: u64,
        request: WorkerRequest,
        deadline: Instant,
    ) -> Result<WorkerResponse, LinkError> {
        let left = deadline.saturating_duration_since(Instant::now());
        let request = PeerRequest::Data(DataRequest::Worker {
            partition,
            epoch,
            request,
        });
        match self.node.call_host(host, request, left).await? {
            PeerResponse::Worker(response) => Ok(response),
            PeerResponse::Moved => Err(LinkError::Moved),
            other => Err(refusal(host, other)),
        }
    }
}

/// The failure a peer's answer other than the one expected stands for.
fn refusal(host: HostId, answer: PeerResponse) -> LinkError {
    let reason = match answer {
        PeerResponse::Refused(reason) => reason,
        other => format!("unexpected answer {other:?}"),
    };
    LinkError::Host { host, reason }
}

/// One host's workers' responses as one: integers added, scanned keys, log entries,
/// positions and transactions in doubt joined, the first error kept.
fn merge_responses(responses: Vec<WorkerResponse>) -> WorkerResponse {
    let mut merged: Option<WorkerResponse> = None;
    for response in responses {
        merged = Some(match (merged, response) {
            (None, response) => response,
            (Some(error @ WorkerResponse::Error(_)), _) => error,
            (_, error @ WorkerResponse::Error(_)) => error,
            (Some(WorkerResponse::Integer(a)), WorkerResponse::Integer(b)) => {
                WorkerResponse::Integer(a + b)
            }
            (
                Some(WorkerResponse::Scanned { mut keys, .. }),
                WorkerResponse::Scanned { keys: more, .. },
            ) => {
                keys.extend(more);
                WorkerResponse::Scanned { keys, next: None }
            }
            (Some(WorkerResponse::Log(mut entries)), WorkerResponse::Log(more)) => {
                entries.extend(more);
                WorkerResponse::Log(entries)
            }
            (Some(WorkerResponse::InDoubt(mut found)), WorkerResponse::InDoubt(more)) => {
                found.extend(more);
                WorkerResponse::InDoubt(found)
            }
            (Some(WorkerResponse::Positions(mut positions)), WorkerResponse::Positions(more)) => {
                positions.extend(more);
                WorkerResponse::Positions(positions)
            }
            (Some(first), _) => first,
        });
    }
    merged.unwrap_or(WorkerResponse::Ok)
}

impl Router {
    /// Runs `request` on the worker of `partition`, or on every worker for `None`.
    async fn serve(
        &self,
        partition: Option<Partition>,
        request: WorkerRequest,
    ) -> Result<Vec<WorkerResponse>, String> {
        let workers: Vec<usize> = match partition {
            Some(partition) => vec![partition_worker(partition, self.links.len())],
            None => (0..self.links.len()).collect(),
        };
        if let [worker] = workers[..] {
            if let Some(response) = self.read_directly(worker, &request) {
                return Ok(vec![response]);
            }
        }
        let mut calls = Vec::with_capacity(workers.len());
        for worker in workers {
            calls.push(self.links[worker].send(request.clone()).await);
        }
        let mut responses = Vec::with_capacity(calls.len());
        for call in calls {
            responses.push(call.wait().await.map_err(|error| error.to_string())?);
        }
        Ok(responses)
    }

    /// Runs `request` on every worker of this host. A feed read keeps, of each replicated
    /// partition, only the entries a client may see: up to the commit point, while this
    /// copy leads the partition in one term under its lease, before and after the read
    /// (nothing of a partition it does not lead so).
    async fn serve_all(&self, request: WorkerRequest) -> Result<Vec<WorkerResponse>, String> {
        let WorkerRequest::ReadFeed { positions, .. } = &request else {
            return self.serve(None, request).await;
        };
        let leased_term = |partition: Partition| {
            let status = self.replication.status(partition)?;
            let held = status
                .readable_until
                .is_some_and(|end| Instant::now() < end);
            held.then_some(status.primary_term).flatten()
        };
        let before: HashMap<Partition, Option<u64>> = positions
            .iter()
            .filter(|(partition, _)| self.is_replicated(*partition))
            .map(|&(partition, _)| (partition, leased_term(partition)))
            .collect();
        // A partition with nothing to show is not read at all: its entries would take
        // the whole count and starve the partitions after it.
        let request = match request {
            WorkerRequest::ReadFeed { positions, count } => WorkerRequest::ReadFeed {
                positions: positions
                    .into_iter()
                    .filter(|(partition, _)| before.get(partition) != Some(&None))
                    .collect(),
                count,
            },
            other => other,
        };
        let responses = self.serve(None, request).await?;
        // After the read, once per partition: the last commit id it may show, if its
        // term and lease held throughout.
        let shown_up_to: HashMap<Partition, Option<u64>> = before
            .iter()
            .map(|(&partition, &term)| {
                let still = term.is_some() && leased_term(partition) == term;
                let commit = self.replication.status(partition).map(|s| s.commit);
                (partition, commit.filter(|_| still))
            })
            .collect();
        let visible = |entry: &LogEntry| match shown_up_to.get(&entry.partition) {
            None => true,
            Some(up_to) => up_to.is_some_and(|up_to| entry.commit_id <= up_to),
        };
        Ok(responses
            .into_iter()
            .map(|response| match response {
                WorkerResponse::Log(entries) => {
                    WorkerResponse::Log(entries.into_iter().filter(visible).collect())
                }
                other => other,
            })
            .collect())
    }

    /// Answers another host's request for this host's data; this host is `me`.
    async fn serve_peer(&self, me: HostId, request: DataRequest) -> PeerResponse {
        match request {
            DataRequest::Worker {
                partition,
                epoch,
                request,
            } => {
                // A table older than the sender's (a higher epoch) cannot vouch for
                // ownership either: the sender retries.
                let ni = self.node.ni();
                let owned = ni
                    .partitions
                    .get(usize::from(partition))
                    .is_some_and(|entry| entry.owner == me && entry.epoch >= epoch);
                // Every key must be on the worker the request goes to (the sender groups
                // keys by the worker count this host reported).
                let workers = self.links.len();
                let one_worker = request
                    .client_partitions()
                    .into_iter()
                    .all(|p| partition_worker(p, workers) == partition_worker(partition, workers));
                if !owned || !one_worker || !ni.owns_all(me, &request) {
                    return PeerResponse::Moved;
                }
                if self.touches_replicated(partition, &request) {
                    let deadline = Instant::now() + FORWARD_TIMEOUT;
                    let epoch = ni.partitions[usize::from(partition)].epoch;
                    return match self.replicated(partition, epoch, request, deadline).await {
                        Ok(response) => PeerResponse::Worker(response),
                        Err(LinkError::Moved) => PeerResponse::Moved,
                        Err(error) => PeerResponse::Refused(error.to_string()),
                    };
                }
                one_response(self.serve(Some(partition), request).await)
            }
            DataRequest::Partition { partition, request } => {
                one_response(self.serve(Some(partition), request).await)
            }
            DataRequest::Fence { partition, epoch } => {
                if let Err(reason) = self.await_move(me, partition, epoch).await {
                    return PeerResponse::Refused(reason);
                }
                let request = WorkerRequest::SetFence {
                    partition,
                    fenced: true,
                };
                one_response(self.serve(Some(partition), request).await)
            }
            DataRequest::Reads(reads) => PeerResponse::Reads(self.read_batch_now(me, &reads)),
            DataRequest::AllWorkers(request) => match self.serve_all(request).await {
                Ok(responses) => PeerResponse::Workers(responses),
                Err(reason) => PeerResponse::Refused(reason),
            },
            DataRequest::Acknowledged {
                partitions,
                wanted,
                timeout_ms,
            } => {
                let deadline = Instant::now() + Duration::from_millis(timeout_ms);
                let count = self
                    .acknowledged_here(&partitions, wanted as usize, deadline)
                    .await;
                PeerResponse::Worker(WorkerResponse::Integer(count as i64))
            }
            DataRequest::Publish {
                channel,
                message,
                shard,
            } => {
                let received = self.pubsub.publish(&channel.into(), &message.into(), shard);
                PeerResponse::Worker(WorkerResponse::Integer(received as i64))
            }
            DataRequest::Digest { partition } => match self.local_digest(partition).await {
                Ok(digest) => PeerResponse::Digest {
                    last_commit_id: digest.last_commit_id,
                    keys: digest.keys,
                    checksum: digest.checksum,
                },
                Err(reason) => PeerResponse::Refused(reason),
            },
            DataRequest::ReadCopy { partition, request } => {
                match self.read_local_copy(partition, &request) {
                    Some(response) => PeerResponse::Worker(response),
                    None => PeerResponse::Moved,
                }
            }
        }
    }

    /// Waits, at most [`FENCE_TABLE_WAIT`], until this host's table shows the move of
    /// `partition` at `epoch` away from `me`: an owner fences only for a move its own table
    /// shows, so its fences never run ahead of its table.
    async fn await_move(&self, me: HostId, partition: Partition, epoch: u64) -> Result<(), String> {
        let deadline = Instant::now() + FENCE_TABLE_WAIT;
        let mut changes = self
            .node
            .ni_changes()
            .ok_or("this host is not a cluster member yet")?;
        loop {
            let ni = Arc::clone(&changes.borrow_and_update().state);
            let Some(entry) = ni.partitions.get(usize::from(partition)) else {
                return Err(format!("no partition {partition}"));
            };
            if entry.epoch == epoch && entry.target.is_some() && entry.owner == me {
                return Ok(());
            }
            let not_moving = || {
                format!(
                    "partition {partition} is not moving at epoch {epoch} here (epoch {}, \
                     owner {}, target {:?})",
                    entry.epoch, entry.owner, entry.target
                )
            };
            if entry.epoch > epoch {
                return Err(not_moving());
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Err(not_moving()),
            }
        }
    }
}

/// The partitions `request`, routed by `partition`, touches, in order.
fn touched(partition: Partition, request: &WorkerRequest) -> Vec<Partition> {
    let mut touched = request.client_partitions();
    touched.push(partition);
    touched.sort_unstable();
    touched.dedup();
    touched
}

/// Whether `request` is a GET or MGET: a read that a map can answer ([`read_with`]).
fn plain_read(request: &WorkerRequest) -> bool {
    matches!(
        request,
        WorkerRequest::Get { .. } | WorkerRequest::MGet { .. }
    )
}

/// `request` (a GET or MGET) answered with the values `read` finds; `None` for another
/// request, or when `read` finds none.
fn read_with(
    request: &WorkerRequest,
    read: impl Fn(Collection, &[&Key]) -> Option<Vec<Option<Vec<u8>>>>,
) -> Option<WorkerResponse> {
    match request {
        WorkerRequest::Get { collection, key } => {
            let mut values = read(*collection, &[key])?;
            Some(WorkerResponse::Value(values.pop().flatten()))
        }
        WorkerRequest::MGet { collection, keys } => {
            let keys: Vec<&Key> = keys.iter().collect();
            let values = read(*collection, &keys)?;
            Some(WorkerResponse::Values(
                values
                    .into_iter()
                    .map(|value| value.map(serde_bytes::ByteBuf::from))
                    .collect(),
            ))
        }
        _ => None,
    }
}

/// A peer's answer from one worker's responses.
fn one_response(result: Result<Vec<WorkerResponse>, String>) -> PeerResponse {
    match result {
        Ok(mut responses) if responses.len() == 1 => PeerResponse::Worker(responses.remove(0)),
        Ok(_) => PeerResponse::Refused("no worker answered".into()),
        Err(reason) => PeerResponse::Refused(reason),
    }
}

impl DataPath for Router {
    fn handle(&self, me: HostId, request: DataRequest) -> DataFuture<'_> {
        Box::pin(self.serve_peer(me, request))
    }

    fn replica(
        &self,
        from: HostId,
        partition: u16,
        message: shoal_cluster::replication::Message,
        entries: Vec<shoal_shared::frame::LogEntry>,
    ) {
        self.replication.deliver(from, partition, message, entries);
    }
}

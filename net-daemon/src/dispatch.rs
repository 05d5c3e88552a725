//! Where a request for the workers goes, and how it gets there: the layer below
//! the commands, which [`crate::txn`], [`crate::ids`] and [`crate::handoff`] use too.
//!
//! A key routes to its partition ([`Dispatch::route`]), and a partition to a
//! [`Dest`]: a local worker on a host on its own, or in a cluster the partition's
//! owner, which [`crate::routing`] reaches (this host's worker or another host's
//! net-daemon). [`Dispatch::send`] puts a request in flight and returns its
//! [`Call`]; [`Dispatch::ask`] and [`Dispatch::ask_dest`] wait for the answer and
//! map failures to client replies. GET and MGET may read the shard's map directly
//! ([`Dispatch::read_directly`]).
//!
//! It holds no state of its own beyond the links, the router and the readers, and
//! it knows nothing of commands, sessions or transactions.

use std::sync::Arc;

use bytes::Bytes;
use shoal_shared::frame::{Collection, Key, WorkerRequest, WorkerResponse};
use shoal_shared::limits::MAX_KEY_BYTES;
use shoal_shared::partition::{key_partition, partition_worker};
use shoal_shared::resp::Reply;

use crate::errors;
use crate::reads::Readers;
use crate::routing::Router;
use crate::workers::{Call, LinkError, WorkerLink};
use tokio::sync::oneshot;

/// The ways to this host's workers and to the partitions' owners.
pub struct Dispatch {
    /// One link per shard-worker, indexed by worker.
    pub links: Vec<WorkerLink>,
    /// In a cluster: delivers requests to the owners of partitions.
    pub router: Option<Arc<Router>>,
    /// Read-only views of the shards' environments, one per worker.
    pub readers: Arc<Readers>,
    /// The partitions of the keyspace.
    partitions: u16,
}

/// Where a request goes.
#[derive(Debug, Clone, Copy)]
pub enum Dest {
    /// A local worker, on a host on its own.
    Worker(usize),
    /// In a cluster: the owner of `partition`, this host or another ([`crate::routing`]).
    /// Destinations with the same `group` (the owner and its worker for the partition) are
    /// the same worker: their keys go in one request.
    Partition { partition: u16, group: (u64, u16) },
}

impl Dest {
    fn order_key(self) -> (u64, u64) {
        match self {
            Dest::Worker(worker) => (0, worker as u64),
            Dest::Partition { group, .. } => (group.0, u64::from(group.1)),
        }
    }
}

impl PartialEq for Dest {
    fn eq(&self, other: &Dest) -> bool {
        self.order_key() == other.order_key()
    }
}

impl Eq for Dest {}

impl PartialOrd for Dest {
    fn partial_cmp(&self, other: &Dest) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Dest {
    fn cmp(&self, other: &Dest) -> std::cmp::Ordering {
        self.order_key().cmp(&other.order_key())
    }
}

/// A request held back while a MULTI transaction is planned: EXEC sends the held
/// requests together and answers each through its responder.
pub struct Held {
    pub dest: Dest,
    pub request: WorkerRequest,
    pub responder: oneshot::Sender<Result<WorkerResponse, LinkError>>,
}

/// What the sends of a task running inside [`Dispatch::holding`] were.
#[derive(Default)]
pub struct Holding {
    pub held: Vec<Held>,
    /// A request could not be held: it went to every worker of the cluster, or its
    /// answer was needed at once (see [`Dispatch::ask_dest`]).
    pub unheld: bool,
}

tokio::task_local! {
    static HOLDING: std::cell::RefCell<Holding>;
}

/// A destination, the keys it serves, and their positions in the request.
pub type DestKeys = (Dest, Vec<Key>, Vec<usize>);

impl Dispatch {
    /// The dispatch of a daemon with these links, router (in a cluster) and readers, over
    /// `partitions` partitions.
    pub fn new(
        links: Vec<WorkerLink>,
        router: Option<Arc<Router>>,
        readers: Arc<Readers>,
        partitions: u16,
    ) -> Dispatch {
        Dispatch {
            links,
            router,
            readers,
            partitions,
        }
    }

    /// The local worker that serves `dest` now, if it is on this host.
    pub fn local_worker(&self, dest: Dest) -> Option<usize> {
        match (dest, &self.router) {
            (Dest::Worker(worker), _) => Some(worker),
            (Dest::Partition { partition, .. }, Some(router)) => router.local_worker(partition),
            (Dest::Partition { partition, .. }, None) => {
                Some(partition_worker(partition, self.links.len()))
            }
        }
    }

    /// Where requests for `partition` go.
    pub fn of_partition(&self, partition: u16) -> Dest {
        match &self.router {
            Some(router) => Dest::Partition {
                partition,
                group: router.group(partition),
            },
            None => Dest::Worker(partition_worker(partition, self.links.len())),
        }
    }

    /// Routes a key to where it is served, or explains why it cannot be stored.
    pub fn route(&self, key: &Bytes) -> Result<(Dest, Key), Reply> {
        if key.len() > MAX_KEY_BYTES {
            return Err(errors::key_too_long(key.len()));
        }
        let partition = key_partition(key, self.partitions);
        Ok((
            self.of_partition(partition),
            Key {
                partition,
                bytes: key.to_vec(),
            },
        ))
    }

    /// Groups keys by their destination: `(dest, keys, positions in the input)`, in
    /// destination order.
    pub fn group_by_dest(&self, keys: &[Bytes]) -> Result<Vec<DestKeys>, Reply> {
        let mut groups: Vec<DestKeys> = Vec::new();
        for (position, key) in keys.iter().enumerate() {
            let (dest, key) = self.route(key)?;
            match groups.iter_mut().find(|(d, _, _)| *d == dest) {
                Some((_, keys, positions)) => {
                    keys.push(key);
                    positions.push(position);
                }
                None => groups.push((dest, vec![key], vec![position])),
            }
        }
        groups.sort_by_key(|(dest, _, _)| *dest);
        Ok(groups)
    }

    /// Runs `work` with every send held back instead of sent; returns its output and the
    /// held requests, in the order they were made.
    pub async fn holding<T>(work: impl std::future::Future<Output = T>) -> (T, Holding) {
        HOLDING
            .scope(std::cell::RefCell::new(Holding::default()), async move {
                let output = work.await;
                let holding = HOLDING.with(|holding| std::mem::take(&mut *holding.borrow_mut()));
                (output, holding)
            })
            .await
    }

    /// Whether this task runs inside [`Dispatch::holding`].
    pub fn is_holding() -> bool {
        HOLDING.try_with(|_| ()).is_ok()
    }

    /// Holds `request` (this task is inside [`Dispatch::holding`]).
    fn hold(dest: Dest, request: WorkerRequest) -> Call {
        let (responder, receiver) = oneshot::channel();
        HOLDING.with(|holding| {
            holding.borrow_mut().held.push(Held {
                dest,
                request,
                responder,
            })
        });
        Call::pending(
            receiver,
            tokio::time::Instant::now() + crate::workers::REQUEST_TIMEOUT,
        )
    }

    /// Marks a request that cannot be held inside [`Dispatch::holding`]; whether this
    /// task is inside it.
    fn unheld() -> bool {
        HOLDING
            .try_with(|holding| holding.borrow_mut().unheld = true)
            .is_ok()
    }

    /// Sends one request to one destination.
    pub async fn send(&self, dest: Dest, request: WorkerRequest) -> Call {
        if Self::is_holding() {
            return Self::hold(dest, request);
        }
        match (dest, &self.router) {
            (Dest::Worker(worker), _) => self.links[worker].send(request).await,
            (Dest::Partition { partition, .. }, Some(router)) => router.send(partition, request),
            (Dest::Partition { partition, .. }, None) => {
                let worker = partition_worker(partition, self.links.len());
                self.links[worker].send(request).await
            }
        }
    }

    /// Sends one request to every worker of every host: this host's workers, and each
    /// other host of the cluster through its net-daemon. Workers skip the partitions their
    /// host does not own, so each partition is counted once.
    pub async fn send_everywhere(&self, make: impl Fn() -> WorkerRequest) -> Vec<Call> {
        if Self::unheld() {
            return Vec::new();
        }
        let mut calls = self.send_all(&make).await;
        if let Some(router) = &self.router {
            calls.extend(router.send_to_other_owners(make));
        }
        calls
    }

    /// Sends one request to every worker of this host.
    pub async fn send_all(&self, make: impl Fn() -> WorkerRequest) -> Vec<Call> {
        if Self::unheld() {
            return Vec::new();
        }
        let mut calls = Vec::with_capacity(self.links.len());
        for link in &self.links {
            calls.push(link.send(make()).await);
        }
        calls
    }

    /// Sends one request to one worker and waits for its answer, mapping failures to replies.
    pub async fn ask(
        &self,
        worker: usize,
        request: WorkerRequest,
    ) -> Result<WorkerResponse, Reply> {
        self.ask_dest(Dest::Worker(worker), request).await
    }

    /// Sends one request to one destination and waits for its answer, mapping failures to
    /// replies.
    pub async fn ask_dest(
        &self,
        dest: Dest,
        request: WorkerRequest,
    ) -> Result<WorkerResponse, Reply> {
        // A held request is answered only once the plan is sent: a command that needs an
        // answer to go on cannot be planned.
        if Self::unheld() {
            return Err(Reply::error("ERR the command needs an answer to go on"));
        }
        match self.send(dest, request).await.wait().await {
            Ok(WorkerResponse::Error(error)) => Err(errors::worker_error(&error)),
            Ok(response) => Ok(response),
            Err(error) => Err(errors::link_error(&error)),
        }
    }

    /// The live values of `keys`, all owned by `worker`, read from its environment; `None`
    /// when the worker must answer ([`crate::reads`]).
    pub fn read_directly(
        &self,
        worker: usize,
        collection: Collection,
        keys: &[&Key],
    ) -> Option<Vec<Option<Vec<u8>>>> {
        self.readers
            .read(worker, self.links[worker].is_connected(), collection, keys)
    }

    /// [`Dispatch::read_directly`], with the keys' versions read in the same transaction
    /// ([`crate::whole_reads`]).
    pub fn read_versioned_directly(
        &self,
        worker: usize,
        collection: Collection,
        keys: &[&Key],
    ) -> Option<crate::reads::Versioned> {
        self.readers
            .read_versioned(worker, self.links[worker].is_connected(), collection, keys)
    }

    /// The versions of `keys`, all owned by `worker`, read from its environment
    /// ([`crate::whole_reads`]); `None` when the worker must answer.
    pub fn read_versions_directly(
        &self,
        worker: usize,
        collection: Collection,
        keys: &[&Key],
    ) -> Option<Vec<u64>> {
        self.readers
            .versions(worker, self.links[worker].is_connected(), collection, keys)
    }
}

/// Waits for calls made with [`Dispatch::send_all`] or [`Dispatch::send_everywhere`],
/// mapping the first failure to a reply.
pub async fn wait_all(calls: Vec<Call>) -> Result<Vec<WorkerResponse>, Reply> {
    let mut responses = Vec::with_capacity(calls.len());
    let mut failure = None;
    for call in calls {
        match call.wait().await {
            Ok(WorkerResponse::Error(error)) => {
                failure = failure.or(Some(errors::worker_error(&error)))
            }
            Ok(response) => responses.push(response),
            Err(error) => failure = failure.or(Some(errors::link_error(&error))),
        }
    }
    match failure {
        Some(reply) => Err(reply),
        None => Ok(responses),
    }
}

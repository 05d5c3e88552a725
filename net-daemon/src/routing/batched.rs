//! Reads of other hosts' partitions, sent to each host in batches.
//!
//! A GET or MGET of a partition that another host owns joins that host's batch
//! ([`Router::send_read`]) when the connection may send it at once (nothing of its own in
//! flight on the partitions it reads) or when what it must wait for are reads in that
//! same batch, not sent yet: the owner answers a batch in order. The first read of a
//! batch starts a task that lets the tasks ready to run (the rest of a pipeline, other
//! connections) add theirs, then takes the batch and sends it as one
//! [`DataRequest::Reads`]. The owner answers each read from its shards' maps, as it
//! answers a forwarded GET when it can ([`Router::read_now`]), with no task or worker
//! round trip per read. A read it cannot answer so (it does not own the
//! partition at that epoch, a prepared transaction holds the key, the copy has no lease,
//! ...) comes back empty, and is then forwarded on its own, as every read was before:
//! retried through moves, and waited for as long as it must.
//!
//! A read in a batch is answered, and marked answered for the connection's later requests
//! on its partitions, like any forwarded request. Once the owner cannot answer a read, it
//! answers none of the later reads of the batch on the same partitions, and the sender
//! forwards them each after the ones before it: no read shows an older state than one its
//! connection sent before it. The answers of one batch carry at most
//! [`BATCH_ANSWER_BYTES`] of values; the reads past that are forwarded on their own too,
//! so that one frame stays small whatever the values' sizes.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use shoal_shared::frame::{Partition, WorkerRequest, WorkerResponse};
use shoal_shared::lock;
use shoal_shared::partition::partition_worker;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use shoal_cluster::messages::{DataRequest, PeerRequest, PeerResponse};
use shoal_cluster::HostId;

use super::{plain_read, touched, Router};
use crate::workers::LinkError;

/// The most value bytes that the answers of one batch of reads carry.
pub(super) const BATCH_ANSWER_BYTES: usize = 16 << 20;

/// A read waiting for its host's batch: `done` gets its answer, and `answered` is set
/// then.
pub(super) struct QueuedRead {
    pub(super) partition: Partition,
    /// The partition's epoch in this host's NI.
    pub(super) epoch: u64,
    pub(super) request: WorkerRequest,
    pub(super) deadline: Instant,
    pub(super) done: oneshot::Sender<Result<WorkerResponse, LinkError>>,
    pub(super) answered: watch::Sender<bool>,
}

/// The reads waiting for each host.
pub(super) type ReadBatches = std::sync::Mutex<HashMap<HostId, PendingBatch>>;

/// The batch of reads being gathered for one host.
#[derive(Default)]
pub(super) struct PendingBatch {
    /// Counts the host's batches: a read may join this one only if the reads it must
    /// follow are in it.
    number: u64,
    reads: Vec<QueuedRead>,
}

impl Router {
    /// The host that owns `partition` and its epoch there, when `request` is a GET or
    /// MGET that may join that host's batch: the host is another one.
    pub(super) fn batched_owner(
        &self,
        partition: Partition,
        request: &WorkerRequest,
    ) -> Option<(HostId, u64)> {
        if !plain_read(request) {
            return None;
        }
        let me = self.node.host_id()?;
        let ni = self.node.ni();
        let entry = ni.partitions.get(usize::from(partition))?;
        (entry.owner != me).then_some((entry.owner, entry.epoch))
    }

    /// Queues `read` (a GET or MGET of a partition that `host` owns) for `host`'s next
    /// batch, which must be batch number `after` if given (the reads that `read` follows
    /// are in it); returns the batch's number, or gives `read` back when that batch has
    /// left.
    pub(super) fn send_read(
        self: &Arc<Self>,
        host: HostId,
        read: QueuedRead,
        after: Option<u64>,
    ) -> Result<u64, Box<QueuedRead>> {
        let (number, first) = {
            let mut batches = lock(&self.read_batches);
            let batch = batches.entry(host).or_default();
            if after.is_some_and(|number| number != batch.number) {
                return Err(Box::new(read));
            }
            batch.reads.push(read);
            (batch.number, batch.reads.len() == 1)
        };
        if first {
            let router = Arc::clone(self);
            tokio::spawn(async move {
                // Reads of the tasks ready to run now join this batch.
                tokio::task::yield_now().await;
                let batch = match lock(&router.read_batches).get_mut(&host) {
                    Some(batch) => {
                        batch.number += 1;
                        std::mem::take(&mut batch.reads)
                    }
                    None => Vec::new(),
                };
                router.send_batch(host, batch).await;
            });
        }
        Ok(number)
    }

    /// Sends `batch` to `host` in one frame, answers what it answered, and forwards the
    /// rest one by one.
    async fn send_batch(self: &Arc<Self>, host: HostId, batch: Vec<QueuedRead>) {
        if batch.is_empty() {
            return;
        }
        let reads = batch
            .iter()
            .map(|read| (read.partition, read.epoch, read.request.clone()))
            .collect();
        let request = PeerRequest::Data(DataRequest::Reads(reads));
        self.read_batches_sent.fetch_add(1, Ordering::Relaxed);
        // The batch waits no longer than its most pressed read may.
        let now = Instant::now();
        let deadline = batch.iter().map(|read| read.deadline).min().unwrap_or(now);
        let timeout = deadline.saturating_duration_since(now);
        let answers = match self.node.call_host(host, request, timeout).await {
            Ok(PeerResponse::Reads(answers)) if answers.len() == batch.len() => answers,
            // The host is unreachable or refused: each read follows its partition alone.
            _ => vec![None; batch.len()],
        };
        // The reads not answered are forwarded one by one, each after those before it in
        // the batch that touch its partitions, as the connections sent them.
        let touched: Vec<Vec<Partition>> = batch
            .iter()
            .map(|read| touched(read.partition, &read.request))
            .collect();
        let answered: Vec<bool> = answers.iter().map(Option::is_some).collect();
        let follows = forward_after(&touched, &answered);
        let done: Vec<watch::Receiver<bool>> =
            batch.iter().map(|read| read.answered.subscribe()).collect();
        for ((read, answer), follows) in batch.into_iter().zip(answers).zip(follows) {
            if let Some(response) = answer {
                self.reads_batched.fetch_add(1, Ordering::Relaxed);
                let _ = read.done.send(Ok(response));
                let _ = read.answered.send(true);
                continue;
            }
            let before: Vec<watch::Receiver<bool>> =
                follows.iter().map(|&j| done[j].clone()).collect();
            let router = Arc::clone(self);
            tokio::spawn(async move {
                for mut earlier in before {
                    let _ = tokio::time::timeout_at(read.deadline, earlier.wait_for(|done| *done))
                        .await;
                }
                let result = router
                    .forward(read.partition, read.request, read.deadline)
                    .await;
                let _ = read.done.send(result);
                let _ = read.answered.send(true);
            });
        }
    }

    /// Another host's batch of reads answered from the maps now, where each read can be
    /// ([`Router::read_now`]). Once a read is not, the reads after it that touch its
    /// partitions are not either: they are forwarded after it, so that none shows an
    /// older state than a read sent before it.
    pub(super) fn read_batch_now(
        &self,
        me: HostId,
        reads: &[(Partition, u64, WorkerRequest)],
    ) -> Vec<Option<WorkerResponse>> {
        let touched: Vec<Vec<Partition>> = reads
            .iter()
            .map(|(partition, _, request)| touched(*partition, request))
            .collect();
        let answer = |i: usize| {
            let (partition, epoch, request) = &reads[i];
            self.read_now(me, *partition, *epoch, request)
        };
        answer_in_order(
            &touched,
            within_budget(BATCH_ANSWER_BYTES, value_bytes, answer),
        )
    }

    /// Batches of reads sent to other hosts, and reads those batches answered.
    pub fn read_batches(&self) -> (u64, u64) {
        (
            self.read_batches_sent.load(Ordering::Relaxed),
            self.reads_batched.load(Ordering::Relaxed),
        )
    }

    /// Another host's read of `partition` (which it believes this host, `me`, owns at
    /// `epoch`) answered from the shard's map now, if it can be: this host owns the
    /// partition at that epoch or a later one, the keys are all on one of its workers,
    /// and the map may serve the read (a replicated partition through its lease, see
    /// [`Router::read_committed_directly`]). `None` otherwise.
    pub(super) fn read_now(
        &self,
        me: HostId,
        partition: Partition,
        epoch: u64,
        request: &WorkerRequest,
    ) -> Option<WorkerResponse> {
        let ni = self.node.ni();
        let entry = ni.partitions.get(usize::from(partition))?;
        if !plain_read(request)
            || entry.owner != me
            || entry.epoch < epoch
            || !ni.owns_all(me, request)
        {
            return None;
        }
        let workers = self.links.len();
        let worker = partition_worker(partition, workers);
        let touched = touched(partition, request);
        if touched
            .iter()
            .any(|&p| partition_worker(p, workers) != worker)
        {
            return None;
        }
        let replicated: Vec<Partition> = touched
            .into_iter()
            .filter(|&p| self.is_replicated(p))
            .collect();
        match replicated.is_empty() {
            true => self.read_directly(worker, request),
            false => self.read_committed_directly(worker, &replicated, request),
        }
    }
}

/// The batch of `host` that a read may join, given the batch each unanswered earlier
/// request of its connection on its partitions is in (`None` for one in no batch):
/// `Some(None)` for any batch when there is none, `Some(Some(n))` for batch `n` when they
/// are all in it, `None` when the read must wait for them instead.
pub(super) fn batch_to_join(
    host: HostId,
    earlier: &[Option<(HostId, u64)>],
) -> Option<Option<u64>> {
    let Some(&first) = earlier.first() else {
        return Some(None);
    };
    let (in_host, number) = first?;
    let all_in_it = earlier.iter().all(|&other| other == first);
    (in_host == host && all_in_it).then_some(Some(number))
}

/// The answers of a batch of reads touching `touched` (one list of partitions per read),
/// each from `answer` until one has none: from then on, a read touching a partition of
/// one without an answer gets none either (it must follow that one).
fn answer_in_order<R>(
    touched: &[Vec<Partition>],
    mut answer: impl FnMut(usize) -> Option<R>,
) -> Vec<Option<R>> {
    let mut left: Vec<Partition> = Vec::new();
    (0..touched.len())
        .map(|i| {
            let found = match touched[i].iter().any(|p| left.contains(p)) {
                true => None,
                false => answer(i),
            };
            if found.is_none() {
                left.extend(&touched[i]);
            }
            found
        })
        .collect()
}

/// `answer`, until the answers given carry `budget` bytes (`bytes` of each): from the
/// first that would pass it on, none.
fn within_budget<R>(
    mut budget: usize,
    bytes: impl Fn(&R) -> usize,
    mut answer: impl FnMut(usize) -> Option<R>,
) -> impl FnMut(usize) -> Option<R> {
    let mut spent = false;
    move |i| {
        if spent {
            return None;
        }
        let found = answer(i)?;
        match budget.checked_sub(bytes(&found)) {
            Some(left) => {
                budget = left;
                Some(found)
            }
            None => {
                spent = true;
                None
            }
        }
    }
}

/// The bytes of the values a read's answer carries.
fn value_bytes(response: &WorkerResponse) -> usize {
    match response {
        WorkerResponse::Value(value) => value.as_ref().map_or(0, Vec::len),
        WorkerResponse::Values(values) => values.iter().flatten().map(|value| value.len()).sum(),
        _ => 0,
    }
}

/// For each read of a batch left without an answer (`answered[i]` false), the earlier
/// such reads it must follow: those touching one of its partitions.
fn forward_after(touched: &[Vec<Partition>], answered: &[bool]) -> Vec<Vec<usize>> {
    (0..touched.len())
        .map(|i| match answered[i] {
            true => Vec::new(),
            false => (0..i)
                .filter(|&j| !answered[j] && touched[j].iter().any(|p| touched[i].contains(p)))
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_budget_no_read_is_answered_and_the_rest_follow_in_order() {
        // Values of 4, 5, 3 and 1 bytes on partitions 1, 2, 3, 1, with 10 bytes to spend:
        // the third would pass it, so it and every read after it go unanswered.
        let sizes = [4usize, 5, 3, 1];
        let touched = vec![vec![1], vec![2], vec![3], vec![1]];
        let answers = answer_in_order(
            &touched,
            within_budget(10, |size: &usize| *size, |i| Some(sizes[i])),
        );
        assert_eq!(answers, vec![Some(4), Some(5), None, None]);
        assert_eq!(
            forward_after(&touched, &[true, true, false, false]),
            vec![Vec::<usize>::new(); 4]
        );
        // A read the owner cannot answer spends nothing.
        let answers = answer_in_order(
            &touched,
            within_budget(10, |size: &usize| *size, |i| (i != 1).then_some(sizes[i])),
        );
        assert_eq!(answers, vec![Some(4), None, Some(3), Some(1)]);
        // One value over the whole budget is forwarded on its own.
        let answers = answer_in_order(
            &touched[..1],
            within_budget(3, |size: &usize| *size, |i| Some(sizes[i])),
        );
        assert_eq!(answers, vec![None]);
    }

    #[test]
    fn an_answer_weighs_its_values() {
        assert_eq!(value_bytes(&WorkerResponse::Value(Some(vec![0; 7]))), 7);
        assert_eq!(value_bytes(&WorkerResponse::Value(None)), 0);
        let values = vec![Some(serde_bytes::ByteBuf::from(vec![0; 3])), None];
        assert_eq!(value_bytes(&WorkerResponse::Values(values)), 3);
    }

    #[test]
    fn a_read_joins_a_batch_only_when_all_it_follows_are_in_that_one() {
        assert_eq!(batch_to_join(2, &[]), Some(None));
        assert_eq!(
            batch_to_join(2, &[Some((2, 7)), Some((2, 7))]),
            Some(Some(7))
        );
        // An earlier request that is not a batched read (a write, a read forwarded alone).
        assert_eq!(batch_to_join(2, &[None]), None);
        assert_eq!(batch_to_join(2, &[Some((2, 7)), None]), None);
        // Earlier reads in another batch of the host, or in another host's batch.
        assert_eq!(batch_to_join(2, &[Some((2, 7)), Some((2, 8))]), None);
        assert_eq!(batch_to_join(2, &[Some((3, 7))]), None);
    }

    #[test]
    fn after_a_read_without_an_answer_none_on_its_partitions_is_answered() {
        let touched = vec![vec![1], vec![2], vec![1, 3], vec![3], vec![4]];
        let answers = answer_in_order(&touched, |i| (i != 0).then_some(i));
        // Read 0 has none; read 2 shares partition 1 with it, and read 3 partition 3
        // with read 2.
        assert_eq!(answers, vec![None, Some(1), None, None, Some(4)]);
        let answered: Vec<bool> = answers.iter().map(Option::is_some).collect();
        assert_eq!(
            forward_after(&touched, &answered),
            vec![vec![], vec![], vec![0], vec![2], vec![]]
        );
    }
}

//! Replication messages on their way to other hosts: one queue per destination, sent in
//! order, many messages to a frame.
//!
//! Each destination host has a queue and one task that sends it ([`crate::node`] starts
//! the task). The task takes everything queued, up to [`MAX_BATCH_BYTES`], into one
//! `PeerRequest::Replicas`, and waits for its answer before it sends the next. So the
//! messages this host sends reach a host in the order they were queued, and a busy host
//! sends few, large frames rather than one frame and one task per message.
//!
//! A queue holds at most [`MAX_QUEUED_BYTES`] of messages that carry log entries. Past
//! that, a new one is dropped, just as the network could lose it: the replication protocol
//! sends again what matters. Messages without entries (fences and their answers,
//! acknowledgements, heartbeats) are small and keep a failover moving: they may use
//! [`CONTROL_RESERVE_BYTES`] more. The queue of a host that left the NI goes with its
//! sender ([`Outboxes::remove`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::messages::ReplicaMessage;
use crate::HostId;
use shoal_shared::lock;

/// A batch is closed once it holds this many bytes (it always takes one message).
pub(crate) const MAX_BATCH_BYTES: usize = 4 << 20;
/// The most a destination's queue holds of messages with log entries; those past it are
/// dropped.
pub(crate) const MAX_QUEUED_BYTES: usize = 64 << 20;
/// What messages without log entries may queue beyond [`MAX_QUEUED_BYTES`].
pub(crate) const CONTROL_RESERVE_BYTES: usize = 8 << 20;

/// The queues of every destination this host has sent to.
#[derive(Default)]
pub(crate) struct Outboxes {
    queues: Mutex<HashMap<HostId, Arc<Queue>>>,
}

/// The messages waiting for one destination.
#[derive(Default)]
pub(crate) struct Queue {
    pending: Mutex<Pending>,
    queued: Notify,
}

#[derive(Default)]
struct Pending {
    messages: VecDeque<ReplicaMessage>,
    bytes: usize,
}

impl Outboxes {
    /// Queues `message` for `to`. Returns the queue if it is new: the caller starts the
    /// task that sends it.
    pub(crate) fn push(&self, to: HostId, message: ReplicaMessage) -> Option<Arc<Queue>> {
        let mut queues = lock(&self.queues);
        let mut created = None;
        let queue = queues.entry(to).or_insert_with(|| {
            let queue = Arc::new(Queue::default());
            created = Some(Arc::clone(&queue));
            queue
        });
        if !queue.push(message) {
            tracing::debug!(to, "replication outbox full; message dropped");
        }
        created
    }

    /// Forgets `to`'s queue and what it holds (the host left the cluster).
    pub(crate) fn remove(&self, to: HostId) {
        lock(&self.queues).remove(&to);
    }
}

impl Queue {
    /// Adds `message`, unless the queue is full (`false`).
    fn push(&self, message: ReplicaMessage) -> bool {
        let size = message_bytes(&message);
        let bound = match message.entries.is_empty() {
            true => MAX_QUEUED_BYTES + CONTROL_RESERVE_BYTES,
            false => MAX_QUEUED_BYTES,
        };
        let mut pending = lock(&self.pending);
        if pending.bytes + size > bound && !pending.messages.is_empty() {
            return false;
        }
        pending.bytes += size;
        pending.messages.push_back(message);
        drop(pending);
        self.queued.notify_one();
        true
    }

    /// The oldest messages queued, at least one and up to [`MAX_BATCH_BYTES`], waiting
    /// for one if there are none.
    pub(crate) async fn next_batch(&self) -> Vec<ReplicaMessage> {
        loop {
            if let Some(batch) = self.take() {
                return batch;
            }
            self.queued.notified().await;
        }
    }

    fn take(&self) -> Option<Vec<ReplicaMessage>> {
        let mut pending = lock(&self.pending);
        let mut batch = Vec::new();
        let mut bytes = 0;
        while let Some(message) = pending.messages.front() {
            let size = message_bytes(message);
            if !batch.is_empty() && bytes + size > MAX_BATCH_BYTES {
                break;
            }
            bytes += size;
            batch.extend(pending.messages.pop_front());
        }
        pending.bytes -= bytes;
        (!batch.is_empty()).then_some(batch)
    }
}

/// About how many bytes `message` takes in a frame.
fn message_bytes(message: &ReplicaMessage) -> usize {
    const OVERHEAD: usize = 64;
    OVERHEAD
        + message
            .entries
            .iter()
            .map(|entry| OVERHEAD + entry.key.len() + entry.data.len())
            .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::Message;
    use shoal_shared::frame::{ChangeType, LogEntry};

    fn fence(partition: u16) -> ReplicaMessage {
        ReplicaMessage {
            partition,
            message: Message::Fence {
                term: 1,
                released: None,
            },
            entries: Vec::new(),
        }
    }

    fn append(partition: u16, data_bytes: usize) -> ReplicaMessage {
        let entry = LogEntry {
            partition,
            commit_id: 1,
            timestamp_ms: 0,
            change: ChangeType::Create,
            collection: 0,
            expires_at_ms: None,
            key: b"k".to_vec(),
            data: vec![0; data_bytes],
        };
        ReplicaMessage {
            entries: vec![entry],
            ..fence(partition)
        }
    }

    #[tokio::test]
    async fn messages_leave_in_the_order_they_were_queued_many_to_a_batch() {
        let outboxes = Outboxes::default();
        let queue = outboxes.push(7, fence(1)).expect("a new queue");
        for partition in 2..=5 {
            assert!(outboxes.push(7, fence(partition)).is_none());
        }
        let batch = queue.next_batch().await;
        let order: Vec<u16> = batch.iter().map(|m| m.partition).collect();
        assert_eq!(order, [1, 2, 3, 4, 5]);
        assert_eq!(lock(&queue.pending).bytes, 0);
    }

    #[tokio::test]
    async fn a_batch_stops_at_its_size_but_always_takes_one_message() {
        let outboxes = Outboxes::default();
        let queue = outboxes.push(1, append(1, MAX_BATCH_BYTES * 2)).unwrap();
        outboxes.push(1, append(2, 10));
        outboxes.push(1, append(3, 10));
        let first = queue.next_batch().await;
        assert_eq!(first.len(), 1, "an oversized message goes alone");
        let second = queue.next_batch().await;
        assert_eq!(
            second.iter().map(|m| m.partition).collect::<Vec<_>>(),
            [2, 3]
        );
    }

    #[tokio::test]
    async fn a_full_queue_drops_new_entries_and_keeps_the_old_and_the_control_messages() {
        let outboxes = Outboxes::default();
        let queue = outboxes
            .push(1, append(1, MAX_QUEUED_BYTES - 1000))
            .unwrap();
        outboxes.push(1, append(2, 2000));
        outboxes.push(1, fence(3));
        // Past the bound of entries, but within the control reserve.
        outboxes.push(1, append(4, CONTROL_RESERVE_BYTES / 2));
        outboxes.push(1, fence(5));
        let mut seen = Vec::new();
        while let Some(batch) = queue.take() {
            seen.extend(batch.into_iter().map(|m| m.partition));
        }
        assert_eq!(
            seen,
            [1, 3, 5],
            "the messages with entries past the bound are the ones dropped"
        );
        // The reserve has a bound too.
        let queue = outboxes
            .push(2, append(1, MAX_QUEUED_BYTES + CONTROL_RESERVE_BYTES))
            .unwrap();
        outboxes.push(2, fence(2));
        assert_eq!(queue.take().map(|batch| batch.len()), Some(1));
        assert!(queue.take().is_none());
    }

    #[tokio::test]
    async fn the_queue_of_a_removed_host_is_made_anew() {
        let outboxes = Outboxes::default();
        outboxes.push(3, fence(1)).unwrap();
        assert!(outboxes.push(3, fence(2)).is_none());
        outboxes.remove(3);
        let queue = outboxes
            .push(3, fence(4))
            .expect("a new queue, and a new sender");
        assert_eq!(
            queue
                .take()
                .unwrap()
                .iter()
                .map(|m| m.partition)
                .collect::<Vec<_>>(),
            [4]
        );
    }

    #[tokio::test]
    async fn a_waiting_sender_wakes_when_a_message_is_queued() {
        let outboxes = Arc::new(Outboxes::default());
        let queue = outboxes.push(1, fence(1)).unwrap();
        assert_eq!(queue.next_batch().await.len(), 1);
        let waiting = tokio::spawn({
            let queue = Arc::clone(&queue);
            async move { queue.next_batch().await }
        });
        tokio::task::yield_now().await;
        outboxes.push(1, fence(9));
        let batch = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken")
            .unwrap();
        assert_eq!(batch[0].partition, 9);
    }
}

//! Replication messages on their way to other hosts: one queue per destination, sent in
//! order, many messages to a frame.
//!
//! Each destination host has a queue and one task that sends it ([`crate::node`] starts
//! the task). The task takes everything queued, up to [`MAX_BATCH_BYTES`], into one
//! `PeerRequest::Replicas`, and waits for its answer before it sends the next. So the
//! messages this host sends reach a host in the order they were queued, and a busy host
//! sends few, large frames rather than one frame and one task per message.
//!
//! A queue holds at most [`MAX_QUEUED_BYTES`]. Past that, a new message is dropped, just
//! as the network could lose it: the replication protocol sends again what matters.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::messages::ReplicaMessage;
use crate::HostId;

/// A batch is closed once it holds this many bytes (it always takes one message).
pub(crate) const MAX_BATCH_BYTES: usize = 4 << 20;
/// The most a destination's queue holds; messages past it are dropped.
pub(crate) const MAX_QUEUED_BYTES: usize = 64 << 20;

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
}

impl Queue {
    /// Adds `message`, unless the queue is full (`false`).
    fn push(&self, message: ReplicaMessage) -> bool {
        let size = message_bytes(&message);
        let mut pending = lock(&self.pending);
        if pending.bytes + size > MAX_QUEUED_BYTES && !pending.messages.is_empty() {
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::Message;
    use shoal_shared::frame::{ChangeType, LogEntry};

    fn fence(partition: u16) -> ReplicaMessage {
        ReplicaMessage {
            partition,
            message: Message::Fence { term: 1 },
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
    async fn a_full_queue_drops_new_messages_and_keeps_the_old() {
        let outboxes = Outboxes::default();
        let queue = outboxes
            .push(1, append(1, MAX_QUEUED_BYTES - 1000))
            .unwrap();
        outboxes.push(1, append(2, 2000));
        outboxes.push(1, fence(3));
        let mut seen = Vec::new();
        while let Some(batch) = queue.take() {
            seen.extend(batch.into_iter().map(|m| m.partition));
        }
        assert_eq!(
            seen,
            [1, 3],
            "the message past the bound is the one dropped"
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

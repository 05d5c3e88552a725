//! Pub/sub on this host: which connection is subscribed to which channel, shard
//! channel and pattern, and the delivery of a published message to them.
//!
//! A connection that subscribes gets a [`Subscriber`]: the receiving end of its queue
//! of messages, which its connection loop writes out as they come. [`Broker::publish`]
//! puts a message on the queue of every matching subscriber of this host; the commands
//! (`commands::pubsub`) forward it to the other hosts of a cluster, which deliver it to
//! theirs. A subscriber whose queued messages pass `max_queued_bytes` is cut off: its
//! queue takes no more, and its connection closes (Redis's
//! `client-output-buffer-limit pubsub`).
//!
//! It holds no sockets and never blocks: a delivery is a push on an unbounded queue
//! whose size is accounted in bytes.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use shoal_shared::glob::glob_match;
use shoal_shared::lock;
use shoal_shared::resp::Reply;
use tokio::sync::mpsc;

/// What a subscription is to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// SUBSCRIBE: a channel, by its exact name.
    Channel,
    /// PSUBSCRIBE: every channel whose name matches a glob pattern.
    Pattern,
    /// SSUBSCRIBE: a shard channel (SPUBLISH), by its exact name.
    Shard,
}

/// Bytes a queued message is counted for beyond its channel and payload.
const MESSAGE_OVERHEAD_BYTES: usize = 64;

/// The subscriptions of this host's connections.
pub struct Broker {
    inner: Mutex<Inner>,
    max_queued_bytes: usize,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    /// Per kind, each name and the subscribers to it.
    names: HashMap<Kind, HashMap<Bytes, HashSet<u64>>>,
    outlets: HashMap<u64, Outlet>,
}

/// The sending end of one subscriber's queue.
struct Outlet {
    sender: mpsc::UnboundedSender<Reply>,
    queue: Arc<Queue>,
}

/// How much one subscriber has queued, and whether it was cut off.
#[derive(Default)]
pub struct Queue {
    bytes: AtomicUsize,
    cut_off: AtomicBool,
    /// Woken when the subscriber is cut off, so that a connection blocked writing to a
    /// client that does not read closes.
    cut: tokio::sync::Notify,
}

impl Queue {
    /// Waits until the subscriber is cut off.
    pub async fn cut_off(&self) {
        while !self.cut_off.load(Ordering::Relaxed) {
            self.cut.notified().await;
        }
    }
}

/// One connection's side of pub/sub: its queue and what it is subscribed to. Dropping
/// it ends every subscription.
pub struct Subscriber {
    id: u64,
    broker: Arc<Broker>,
    receiver: mpsc::UnboundedReceiver<Reply>,
    queue: Arc<Queue>,
    subscribed: HashMap<Kind, BTreeSet<Bytes>>,
}

impl Broker {
    /// A broker that cuts a subscriber off once it has `max_queued_bytes` waiting.
    pub fn new(max_queued_bytes: usize) -> Broker {
        Broker {
            inner: Mutex::default(),
            max_queued_bytes,
        }
    }

    /// A new subscriber, subscribed to nothing yet.
    pub fn subscriber(self: &Arc<Self>) -> Subscriber {
        let (sender, receiver) = mpsc::unbounded_channel();
        let queue = Arc::new(Queue::default());
        let mut inner = lock(&self.inner);
        inner.next_id += 1;
        let id = inner.next_id;
        let outlet = Outlet {
            sender,
            queue: Arc::clone(&queue),
        };
        inner.outlets.insert(id, outlet);
        Subscriber {
            id,
            broker: Arc::clone(self),
            receiver,
            queue,
            subscribed: HashMap::new(),
        }
    }

    /// Delivers `message` on `channel` (a shard channel for `shard`) to this host's
    /// subscribers; answers how many received it.
    pub fn publish(&self, channel: &Bytes, message: &Bytes, shard: bool) -> usize {
        let inner = lock(&self.inner);
        let mut deliveries: Vec<(u64, Reply)> = Vec::new();
        let exact = if shard { Kind::Shard } else { Kind::Channel };
        let kind_name = if shard { "smessage" } else { "message" };
        if let Some(ids) = inner.names.get(&exact).and_then(|names| names.get(channel)) {
            for &id in ids {
                let push = Reply::Push(vec![
                    Reply::bulk(kind_name),
                    Reply::Bulk(channel.clone()),
                    Reply::Bulk(message.clone()),
                ]);
                deliveries.push((id, push));
            }
        }
        if !shard {
            for (pattern, ids) in inner.names.get(&Kind::Pattern).into_iter().flatten() {
                if !glob_match(pattern, channel, false) {
                    continue;
                }
                for &id in ids {
                    let push = Reply::Push(vec![
                        Reply::bulk("pmessage"),
                        Reply::Bulk(pattern.clone()),
                        Reply::Bulk(channel.clone()),
                        Reply::Bulk(message.clone()),
                    ]);
                    deliveries.push((id, push));
                }
            }
        }
        let size = channel.len() + message.len() + MESSAGE_OVERHEAD_BYTES;
        let mut received = 0;
        let mut cut = Vec::new();
        for (id, push) in deliveries {
            let Some(outlet) = inner.outlets.get(&id) else {
                continue;
            };
            received += 1;
            let queue = &outlet.queue;
            if queue.bytes.load(Ordering::Relaxed) + size > self.max_queued_bytes {
                queue.cut_off.store(true, Ordering::Relaxed);
                queue.cut.notify_one();
                cut.push(id);
                continue;
            }
            queue.bytes.fetch_add(size, Ordering::Relaxed);
            let _ = outlet.sender.send(push);
        }
        drop(inner);
        // A subscriber cut off receives nothing more; its connection closes.
        for id in cut {
            self.forget(id);
        }
        received
    }

    /// The names subscribed to as `kind` on this host that match `pattern` (all without).
    pub fn names(&self, kind: Kind, pattern: Option<&[u8]>) -> Vec<Bytes> {
        let inner = lock(&self.inner);
        let mut names: Vec<Bytes> = inner
            .names
            .get(&kind)
            .into_iter()
            .flatten()
            .filter(|(_, ids)| !ids.is_empty())
            .map(|(name, _)| name.clone())
            .filter(|name| pattern.is_none_or(|p| glob_match(p, name, false)))
            .collect();
        names.sort();
        names
    }

    /// How many subscribers `name` has as `kind` on this host.
    pub fn count(&self, kind: Kind, name: &[u8]) -> usize {
        let inner = lock(&self.inner);
        inner
            .names
            .get(&kind)
            .and_then(|names| names.get(name))
            .map_or(0, HashSet::len)
    }

    fn add(&self, id: u64, kind: Kind, name: &Bytes) {
        let mut inner = lock(&self.inner);
        let names = inner.names.entry(kind).or_default();
        names.entry(name.clone()).or_default().insert(id);
    }

    fn remove(&self, id: u64, kind: Kind, name: &Bytes) {
        let mut inner = lock(&self.inner);
        if let Some(names) = inner.names.get_mut(&kind) {
            if let Some(ids) = names.get_mut(name) {
                ids.remove(&id);
                if ids.is_empty() {
                    names.remove(name);
                }
            }
        }
    }

    fn forget(&self, id: u64) {
        let mut inner = lock(&self.inner);
        inner.outlets.remove(&id);
        for names in inner.names.values_mut() {
            names.retain(|_, ids| {
                ids.remove(&id);
                !ids.is_empty()
            });
        }
    }
}

impl Subscriber {
    /// Subscribes to `name` as `kind` (again is harmless); answers the confirmation to
    /// send the client.
    pub fn subscribe(&mut self, kind: Kind, name: Bytes) -> Reply {
        if self
            .subscribed
            .entry(kind)
            .or_default()
            .insert(name.clone())
        {
            self.broker.add(self.id, kind, &name);
        }
        self.confirmation(kind, true, Some(name))
    }

    /// Unsubscribes from `names` as `kind`, or from every name of that kind when empty;
    /// answers one confirmation per name (one with a nil name when there was none).
    pub fn unsubscribe(&mut self, kind: Kind, names: Vec<Bytes>) -> Vec<Reply> {
        let names = if names.is_empty() {
            self.subscribed
                .get(&kind)
                .map(|set| set.iter().cloned().collect())
                .unwrap_or_default()
        } else {
            names
        };
        if names.is_empty() {
            return vec![self.confirmation(kind, false, None)];
        }
        names
            .into_iter()
            .map(|name| {
                if self.subscribed.entry(kind).or_default().remove(&name) {
                    self.broker.remove(self.id, kind, &name);
                }
                self.confirmation(kind, false, Some(name))
            })
            .collect()
    }

    /// Subscriptions counted in confirmations: channels and patterns together, shard
    /// channels apart (as Redis counts them).
    fn count(&self, kind: Kind) -> usize {
        let of = |kind| self.subscribed.get(&kind).map_or(0, BTreeSet::len);
        match kind {
            Kind::Shard => of(Kind::Shard),
            _ => of(Kind::Channel) + of(Kind::Pattern),
        }
    }

    /// How many channels, patterns and shard channels it is subscribed to.
    pub fn counts(&self) -> (usize, usize, usize) {
        let of = |kind| self.subscribed.get(&kind).map_or(0, BTreeSet::len);
        (of(Kind::Channel), of(Kind::Pattern), of(Kind::Shard))
    }

    /// Whether any subscription is left (a RESP2 connection then takes only pub/sub
    /// commands).
    pub fn active(&self) -> bool {
        self.subscribed.values().any(|set| !set.is_empty())
    }

    fn confirmation(&self, kind: Kind, subscribe: bool, name: Option<Bytes>) -> Reply {
        let word = match (kind, subscribe) {
            (Kind::Channel, true) => "subscribe",
            (Kind::Channel, false) => "unsubscribe",
            (Kind::Pattern, true) => "psubscribe",
            (Kind::Pattern, false) => "punsubscribe",
            (Kind::Shard, true) => "ssubscribe",
            (Kind::Shard, false) => "sunsubscribe",
        };
        Reply::Push(vec![
            Reply::bulk(word),
            name.map_or(Reply::Nil, Reply::Bulk),
            Reply::Integer(self.count(kind) as i64),
        ])
    }

    /// The next message for this connection, once one comes.
    pub async fn next(&mut self) -> Option<Reply> {
        self.receiver.recv().await
    }

    /// A message already waiting, if any.
    pub fn try_next(&mut self) -> Option<Reply> {
        self.receiver.try_recv().ok()
    }

    /// The connection wrote out a message of `size` bytes (its channel and payload).
    pub fn written(&self, size: usize) {
        let _ = self
            .queue
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |queued| {
                Some(queued.saturating_sub(size + MESSAGE_OVERHEAD_BYTES))
            });
    }

    /// Whether this subscriber fell too far behind and was cut off.
    pub fn cut_off(&self) -> bool {
        self.queue.cut_off.load(Ordering::Relaxed)
    }

    /// Its queue, to wait for a cut-off while the connection is busy.
    pub fn queue(&self) -> Arc<Queue> {
        Arc::clone(&self.queue)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.broker.forget(self.id);
    }
}

/// The bytes a message push is counted for: its channel and payload (the last two
/// elements).
pub fn message_size(push: &Reply) -> usize {
    match push {
        Reply::Push(items) => items
            .iter()
            .rev()
            .take(2)
            .map(|item| match item {
                Reply::Bulk(bytes) => bytes.len(),
                _ => 0,
            })
            .sum(),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(text: &str) -> Bytes {
        Bytes::from(text.to_string())
    }

    #[tokio::test]
    async fn messages_reach_channel_pattern_and_shard_subscribers_once_each() {
        let broker = Arc::new(Broker::new(1 << 20));
        let mut a = broker.subscriber();
        let mut b = broker.subscriber();
        a.subscribe(Kind::Channel, bytes("news"));
        a.subscribe(Kind::Channel, bytes("news"));
        b.subscribe(Kind::Pattern, bytes("n*"));
        assert_eq!(broker.publish(&bytes("news"), &bytes("hi"), false), 2);
        assert_eq!(
            a.next().await,
            Some(Reply::Push(vec![
                Reply::bulk("message"),
                Reply::bulk("news"),
                Reply::bulk("hi")
            ]))
        );
        assert!(a.try_next().is_none(), "subscribing twice delivers once");
        assert!(matches!(b.next().await, Some(Reply::Push(items)) if items.len() == 4));
        // A shard channel is apart from the channels of the same name.
        assert_eq!(broker.publish(&bytes("news"), &bytes("x"), true), 0);
        a.subscribe(Kind::Shard, bytes("news"));
        assert_eq!(broker.publish(&bytes("news"), &bytes("x"), true), 1);
        assert_eq!(broker.names(Kind::Channel, None), vec![bytes("news")]);
        assert_eq!(broker.count(Kind::Pattern, b"n*"), 1);
        drop(b);
        assert_eq!(
            broker.count(Kind::Pattern, b"n*"),
            0,
            "a dropped subscriber is gone"
        );
        let replies = a.unsubscribe(Kind::Channel, Vec::new());
        assert_eq!(replies.len(), 1);
        assert_eq!(
            a.unsubscribe(Kind::Channel, Vec::new()),
            vec![Reply::Push(vec![
                Reply::bulk("unsubscribe"),
                Reply::Nil,
                Reply::Integer(0)
            ])]
        );
    }

    #[tokio::test]
    async fn a_subscriber_that_does_not_keep_up_is_cut_off() {
        let broker = Arc::new(Broker::new(1000));
        let mut slow = broker.subscriber();
        slow.subscribe(Kind::Channel, bytes("c"));
        let payload = Bytes::from(vec![b'x'; 300]);
        for _ in 0..10 {
            broker.publish(&bytes("c"), &payload, false);
        }
        assert!(slow.cut_off());
        let mut queued = 0;
        while slow.try_next().is_some() {
            queued += 1;
        }
        assert!(queued < 10, "{queued} messages queued past the limit");
    }
}

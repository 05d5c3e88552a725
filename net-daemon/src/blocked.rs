//! Clients blocked in a pop (BLPOP, BRPOP, BLMOVE, BZPOPMIN, ...): who waits for which
//! key, in the order they came, and when each should look again.
//!
//! Each blocked pop joins the line of every key it waits on ([`Blocked::join`]) and only
//! tries the keys whose line it heads, so the client that has waited longest for a key
//! gets its next element, as in Redis. It looks again when a worker that holds one of
//! its keys commits (the workers count their commits in the status table, which a
//! watcher reads every millisecond while anyone waits), when a line changes (a client
//! ahead was served, timed out or went away, or SWAPDB moved databases), and for a key
//! on another host, every few milliseconds: that host's commits are not seen here.
//! Lines are this host's: clients blocked on the same key through two hosts are served
//! in no set order.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// How often the watcher reads the workers' commit counters while anyone waits.
const WATCH_EVERY: Duration = Duration::from_millis(1);
/// A blocked pop looks again at least this often, whatever it heard.
const LOOK_AT_LEAST_EVERY: Duration = Duration::from_secs(1);

/// A key a client waits on: its database and name.
type Line = (u16, Bytes);

/// The blocked clients of this host.
pub struct Blocked {
    lines: Mutex<HashMap<Line, VecDeque<u64>>>,
    next_id: AtomicU64,
    /// Clients blocked now.
    waiting: AtomicUsize,
    /// Woken when the first client blocks, to start the watcher reading.
    first_waiter: Notify,
    /// Each local worker's commit count, as the watcher last read it.
    commits: watch::Sender<Vec<u64>>,
    /// Bumped when a line changes, or when SWAPDB moved databases.
    generation: watch::Sender<u64>,
}

impl Blocked {
    pub fn new() -> Blocked {
        Blocked {
            lines: Mutex::default(),
            next_id: AtomicU64::new(1),
            waiting: AtomicUsize::new(0),
            first_waiter: Notify::new(),
            commits: watch::Sender::new(Vec::new()),
            generation: watch::Sender::new(0),
        }
    }

    /// Clients blocked now (INFO's `blocked_clients`).
    pub fn count(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Reads the workers' commit counters with `read` while anyone waits, until
    /// `stop` says so. Runs as a task of its own.
    pub async fn watch_commits(&self, read: impl Fn() -> Vec<u64>, stop: impl Fn() -> bool) {
        let mut tick = tokio::time::interval(WATCH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !stop() {
            if self.waiting.load(Ordering::Acquire) == 0 {
                let first = self.first_waiter.notified();
                if self.waiting.load(Ordering::Acquire) == 0 {
                    // Wakes now and then to see `stop`.
                    let _ = tokio::time::timeout(LOOK_AT_LEAST_EVERY, first).await;
                    continue;
                }
            }
            tick.tick().await;
            let now = read();
            self.commits.send_if_modified(|seen| {
                let changed = *seen != now;
                if changed {
                    *seen = now;
                }
                changed
            });
        }
    }

    /// Tells every blocked client to look again (SWAPDB moved databases).
    pub fn wake_all(&self) {
        self.generation.send_modify(|generation| *generation += 1);
    }

    /// Puts a client at the end of the lines of `keys` in database `db`.
    pub fn join(self: &Arc<Self>, db: u16, keys: &[Bytes]) -> Waiter {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let lines: Vec<Line> = keys.iter().map(|key| (db, key.clone())).collect();
        {
            let mut all = shoal_shared::lock(&self.lines);
            for line in &lines {
                all.entry(line.clone()).or_default().push_back(id);
            }
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) == 0 {
            self.first_waiter.notify_one();
        }
        Waiter {
            blocked: Arc::clone(self),
            id,
            lines,
            commits: self.commits.subscribe(),
            seen: Vec::new(),
            generation: self.generation.subscribe(),
        }
    }
}

/// One blocked client's place in its keys' lines; leaving them on drop.
pub struct Waiter {
    blocked: Arc<Blocked>,
    id: u64,
    lines: Vec<Line>,
    commits: watch::Receiver<Vec<u64>>,
    /// The commit counts as of the last [`Waiter::heads`]: what its try saw at least.
    seen: Vec<u64>,
    generation: watch::Receiver<u64>,
}

impl Waiter {
    /// Which of its keys, in order, this client heads the line of: the ones it may take
    /// from now. Marks what it has heard so far as seen, so that [`Self::next_chance`]
    /// waits only for what happens after.
    pub fn heads(&mut self) -> Vec<bool> {
        self.seen = self.commits.borrow_and_update().clone();
        self.generation.borrow_and_update();
        let all = shoal_shared::lock(&self.blocked.lines);
        self.lines
            .iter()
            .map(|line| all.get(line).and_then(|ids| ids.front()) == Some(&self.id))
            .collect()
    }

    /// Waits until something may have changed for this client: a commit of one of
    /// `workers` (the local workers of its keys), a line change, `poll` (when a key is on
    /// another host), or `deadline`.
    pub async fn next_chance(
        &mut self,
        workers: &[usize],
        poll: Option<Duration>,
        deadline: Option<Instant>,
    ) {
        let wake = Instant::now() + poll.unwrap_or(LOOK_AT_LEAST_EVERY).min(LOOK_AT_LEAST_EVERY);
        let wake = deadline.map_or(wake, |deadline| wake.min(deadline));
        loop {
            tokio::select! {
                changed = self.commits.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let now = self.commits.borrow_and_update();
                    if workers.iter().any(|&w| now.get(w) != self.seen.get(w)) {
                        return;
                    }
                }
                _ = self.generation.changed() => return,
                _ = tokio::time::sleep_until(wake) => return,
            }
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut headed = false;
        {
            let mut all = shoal_shared::lock(&self.blocked.lines);
            for line in &self.lines {
                if let Some(ids) = all.get_mut(line) {
                    headed |= ids.front() == Some(&self.id);
                    ids.retain(|&id| id != self.id);
                    if ids.is_empty() {
                        all.remove(line);
                    }
                }
            }
        }
        self.blocked.waiting.fetch_sub(1, Ordering::AcqRel);
        // The next in a line it headed may take from that key now.
        if headed {
            self.blocked.wake_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&str]) -> Vec<Bytes> {
        names
            .iter()
            .map(|name| Bytes::from(name.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn each_key_serves_its_line_in_order_and_a_leaver_wakes_the_next() {
        let blocked = Arc::new(Blocked::new());
        let mut first = blocked.join(0, &keys(&["a", "b"]));
        let mut second = blocked.join(0, &keys(&["b"]));
        let mut third = blocked.join(0, &keys(&["c", "b"]));
        let mut other_db = blocked.join(1, &keys(&["b"]));
        assert_eq!(blocked.count(), 4);
        assert_eq!(first.heads(), [true, true]);
        assert_eq!(second.heads(), [false]);
        assert_eq!(third.heads(), [true, false]);
        assert_eq!(other_db.heads(), [true]);

        // The first is served and leaves: the second heads `b` now, and hears of it.
        drop(first);
        let woke = tokio::time::timeout(
            Duration::from_millis(500),
            second.next_chance(&[], None, None),
        )
        .await;
        assert!(woke.is_ok(), "the next in line was not woken");
        assert_eq!(second.heads(), [true]);
        assert_eq!(third.heads(), [true, false]);

        // A commit of a worker it does not wait on leaves a waiter asleep until its
        // deadline; one of its own wakes it.
        blocked.commits.send_replace(vec![0, 0]);
        second.heads();
        let deadline = Instant::now() + Duration::from_millis(50);
        blocked.commits.send_replace(vec![1, 0]);
        second.next_chance(&[1], None, Some(deadline)).await;
        assert!(
            Instant::now() >= deadline,
            "woken by another worker's commit"
        );
        second.heads();
        blocked.commits.send_replace(vec![1, 1]);
        let woke = tokio::time::timeout(
            Duration::from_millis(500),
            second.next_chance(&[1], None, None),
        )
        .await;
        assert!(woke.is_ok(), "a commit of its worker did not wake it");
        drop((second, third, other_db));
        assert_eq!(blocked.count(), 0);
        assert!(shoal_shared::lock(&blocked.lines).is_empty());
    }
}

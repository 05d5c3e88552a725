//! Keys held for the next plan of a multi-key command across workers.
//!
//! EXEC across workers, the STORE forms and SMOVE/LMOVE across workers plan
//! optimistically: they read, then commit only if what they read is unchanged, and plan
//! again otherwise. A client that writes one of the keys as soon as its last write is
//! answered is answered from the same group commit as the plan's read, so its next
//! write would reach the worker before the plan's commit nearly every time. After a
//! plan that found its keys changed, the next one holds them: writes to them from
//! client connections wait (in [`crate::commands::dispatch`], before they are sent,
//! so that each connection's requests keep their order) until the plan has committed
//! or failed, or [`MAX_HOLD`] has passed. Reads never wait. A host on its own only:
//! in a cluster, writes also come from other hosts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

/// The longest a hold lasts, should its plan take that long.
pub const MAX_HOLD: Duration = Duration::from_millis(100);

/// The holds of this daemon.
#[derive(Default)]
pub struct Holds {
    /// How many holds there are: writes look at the list only when some are.
    count: AtomicUsize,
    list: Mutex<Vec<Held>>,
    /// Woken whenever a hold ends.
    ended: Notify,
    next_id: AtomicUsize,
}

struct Held {
    id: usize,
    /// `(collection, key)`.
    keys: Vec<(u16, Bytes)>,
    until: Instant,
}

/// A hold, ended when dropped.
pub struct Hold<'a> {
    holds: &'a Holds,
    id: usize,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut list = self.holds.list.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|held| held.id != self.id);
        self.holds.count.store(list.len(), Ordering::Release);
        drop(list);
        self.holds.ended.notify_waiters();
    }
}

impl Holds {
    /// Holds `keys` (`(collection, key)`) until the returned hold is dropped, or
    /// [`MAX_HOLD`] has passed.
    pub fn hold(&self, keys: Vec<(u16, Bytes)>) -> Hold<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        list.push(Held {
            id,
            keys,
            until: Instant::now() + MAX_HOLD,
        });
        self.count.store(list.len(), Ordering::Release);
        Hold { holds: self, id }
    }

    /// Whether any key is held now (or was a moment ago).
    pub fn any(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }

    /// Waits until no hold keeps any of `keys` of `collection`.
    pub async fn wait_free(&self, collection: u16, keys: &[&Bytes]) {
        loop {
            // Registered before the list is read, so that an end in between wakes it.
            let ended = self.ended.notified();
            let Some(until) = self.held_until(collection, keys) else {
                return;
            };
            tokio::select! {
                _ = ended => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// When the last hold that keeps one of `keys` ends at the latest; `None` when none
    /// does.
    fn held_until(&self, collection: u16, keys: &[&Bytes]) -> Option<Instant> {
        let now = Instant::now();
        let list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        list.iter()
            .filter(|held| held.until > now)
            .filter(|held| {
                held.keys
                    .iter()
                    .any(|(c, k)| *c == collection && keys.contains(&k))
            })
            .map(|held| held.until)
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_write_waits_while_its_key_is_held_and_goes_once_the_hold_ends() {
        let holds = Holds::default();
        let (a, b) = (Bytes::from_static(b"a"), Bytes::from_static(b"b"));
        // Nothing held: no wait.
        holds.wait_free(0, &[&a]).await;
        let hold = holds.hold(vec![(0, a.clone())]);
        // Other keys and other collections go at once.
        holds.wait_free(0, &[&b]).await;
        holds.wait_free(1, &[&a]).await;
        let started = Instant::now();
        let waiter = async {
            holds.wait_free(0, &[&b, &a]).await;
            started.elapsed()
        };
        let release = async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            drop(hold);
        };
        let (waited, ()) = tokio::join!(waiter, release);
        // On tokio's paused clock, which moves only when every task waits.
        assert_eq!(waited, Duration::from_millis(30), "until the hold ended");
        assert_eq!(holds.count.load(Ordering::Acquire), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hold_never_dropped_ends_after_its_longest() {
        let holds = Holds::default();
        let a = Bytes::from_static(b"a");
        let _hold = holds.hold(vec![(0, a.clone())]);
        let started = Instant::now();
        holds.wait_free(0, &[&a]).await;
        assert_eq!(started.elapsed(), MAX_HOLD);
    }
}

//! The store's clock: the one place `store/` reads the time from.
//!
//! Expiry, TTLs, a value's `mtime`, commit-log timestamps, log retention by age and
//! the age of transaction records all use the time read once per write transaction
//! (`Batch::now_ms`) from the [`Clock`] the store was opened with. The worker opens
//! its store with [`SystemClock`]; tests open it with a `ManualClock` that they set
//! and advance, so that no test waits on the wall clock.
//!
//! The clock also tells which boot of the machine this is (`Clock::boot_id`): a
//! checkpoint taken in another boot means the page cache may have lost writes
//! (`checkpoint`). Tests model a reboot with `ManualClock::reboot`.
//!
//! The commit latency the store reports for metrics is a duration measured on the
//! monotonic clock around the commit; no decision depends on it, and it stays outside
//! this seam. Nothing in this module waits.

/// A source of the current time for the store.
pub(crate) trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;

    /// This boot of the machine.
    fn boot_id(&self) -> std::io::Result<String>;
}

/// The wall clock, for production.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        shoal_shared::now_ms()
    }

    fn boot_id(&self) -> std::io::Result<String> {
        super::checkpoint::boot_id()
    }
}

/// A clock that moves only when told to. Clones share the same time, so a test keeps
/// one clone and hands another to the store.
#[cfg(test)]
#[derive(Debug, Clone)]
pub(crate) struct ManualClock {
    now_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    boots: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

#[cfg(test)]
impl ManualClock {
    /// A clock that reads `now_ms` until it is set or advanced.
    pub(crate) fn new(now_ms: u64) -> ManualClock {
        ManualClock {
            now_ms: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(now_ms)),
            boots: std::sync::Arc::default(),
        }
    }

    /// Makes the machine boot again, as after a power failure.
    pub(crate) fn reboot(&self) {
        self.boots.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Moves the clock forward by `by_ms`.
    pub(crate) fn advance(&self, by_ms: u64) {
        self.now_ms
            .fetch_add(by_ms, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn boot_id(&self) -> std::io::Result<String> {
        Ok(format!(
            "boot-{}",
            self.boots.load(std::sync::atomic::Ordering::SeqCst)
        ))
    }
}

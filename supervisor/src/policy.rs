//! The restart policy, as a pure function of restart history and time.
//!
//! A child that dies is restarted after a capped exponential backoff. If it
//! has died more than `max_restarts` times within `window`, the supervisor
//! gives up (the OTP restart-intensity rule) so that systemd can take over.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// What to do about a child that just died.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    RestartAfter(Duration),
    GiveUp { restarts: usize },
}

/// Restart history of one child.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    max_restarts: u32,
    window: Duration,
    deaths: VecDeque<Instant>,
}

impl RestartPolicy {
    pub fn new(max_restarts: u32, window: Duration) -> RestartPolicy {
        RestartPolicy {
            max_restarts,
            window,
            deaths: VecDeque::new(),
        }
    }

    /// Records a death at `now` and decides.
    pub fn on_exit(&mut self, now: Instant) -> Decision {
        while self
            .deaths
            .front()
            .is_some_and(|&death| now.duration_since(death) > self.window)
        {
            self.deaths.pop_front();
        }
        self.deaths.push_back(now);
        let recent = self.deaths.len();
        if recent > self.max_restarts as usize {
            return Decision::GiveUp { restarts: recent };
        }
        let exponent = (recent - 1).min(16) as u32;
        Decision::RestartAfter(BACKOFF_MIN.saturating_mul(1 << exponent).min(BACKOFF_MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_then_gives_up() {
        let start = Instant::now();
        let mut policy = RestartPolicy::new(3, Duration::from_secs(10));
        assert_eq!(
            policy.on_exit(start),
            Decision::RestartAfter(Duration::from_millis(100))
        );
        assert_eq!(
            policy.on_exit(start),
            Decision::RestartAfter(Duration::from_millis(200))
        );
        assert_eq!(
            policy.on_exit(start),
            Decision::RestartAfter(Duration::from_millis(400))
        );
        assert_eq!(policy.on_exit(start), Decision::GiveUp { restarts: 4 });
    }

    #[test]
    fn old_deaths_leave_the_window() {
        let start = Instant::now();
        let mut policy = RestartPolicy::new(1, Duration::from_secs(10));
        assert!(matches!(policy.on_exit(start), Decision::RestartAfter(_)));
        assert_eq!(
            policy.on_exit(start + Duration::from_secs(11)),
            Decision::RestartAfter(BACKOFF_MIN)
        );
        assert!(matches!(
            policy.on_exit(start + Duration::from_secs(12)),
            Decision::GiveUp { .. }
        ));
    }

    #[test]
    fn backoff_is_capped() {
        let start = Instant::now();
        let mut policy = RestartPolicy::new(100, Duration::from_secs(1000));
        let mut last = Decision::RestartAfter(Duration::ZERO);
        for _ in 0..50 {
            last = policy.on_exit(start);
        }
        assert_eq!(last, Decision::RestartAfter(BACKOFF_MAX));
    }
}

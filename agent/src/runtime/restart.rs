//! The restart policy: how many restarts a window allows, and what happens when they
//! run out. Pure; the caller passes `now`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use novacron_common::wire::RestartSpec;

/// The shortest wait before a restart, whatever the policy says: a task that exits at
/// once with `delay_ms: 0` and no window cannot spin the daemon.
pub const MIN_RESTART_DELAY: Duration = Duration::from_millis(100);

/// What to do after a failed run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    /// Start again at this instant.
    RestartAt {
        /// When.
        at: Instant,
        /// Whether the window's attempts had run out (delay mode waits for it to pass).
        exhausted: bool,
    },
    /// Give up: the allocation has failed.
    Fail,
}

/// The restarts made within the policy's window.
#[derive(Debug, Clone, Default)]
pub struct RestartWindow {
    recent: VecDeque<Instant>,
}

impl RestartWindow {
    /// Decides what follows a failed run that ended at `now`.
    ///
    /// With fewer than `attempts` restarts in the last `interval_ms`, restart after
    /// `delay_ms`. Otherwise fail, or in delay mode restart once the oldest restart
    /// has left the window (and not before `delay_ms`).
    pub fn decide(&mut self, policy: &RestartSpec, now: Instant) -> RestartDecision {
        let interval = Duration::from_millis(policy.interval_ms);
        self.prune(interval, now);
        let delay = Duration::from_millis(policy.delay_ms).max(MIN_RESTART_DELAY);
        if self.recent.len() < policy.attempts as usize {
            return RestartDecision::RestartAt {
                at: now + delay,
                exhausted: false,
            };
        }
        if !policy.delay_mode {
            return RestartDecision::Fail;
        }
        let window_clears = match self.recent.front() {
            Some(oldest) => *oldest + interval,
            None => now + interval,
        };
        RestartDecision::RestartAt {
            at: window_clears.max(now + delay),
            exhausted: true,
        }
    }

    /// Records a restart made at `at`.
    pub fn record(&mut self, at: Instant) {
        self.recent.push_back(at);
        // Only the last `attempts` restarts matter; a bound keeps a policy with a
        // huge window from growing this without end.
        while self.recent.len() > MAX_REMEMBERED {
            self.recent.pop_front();
        }
    }

    /// Forgets every restart (a new spec starts afresh).
    pub fn clear(&mut self) {
        self.recent.clear();
    }

    fn prune(&mut self, interval: Duration, now: Instant) {
        while let Some(oldest) = self.recent.front() {
            if now.saturating_duration_since(*oldest) >= interval {
                self.recent.pop_front();
            } else {
                break;
            }
        }
    }
}

const MAX_REMEMBERED: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(attempts: u32, interval_ms: u64, delay_ms: u64, delay_mode: bool) -> RestartSpec {
        RestartSpec {
            attempts,
            interval_ms,
            delay_ms,
            delay_mode,
        }
    }

    #[test]
    fn restarts_until_attempts_then_fails() {
        let p = policy(2, 60_000, 500, false);
        let t0 = Instant::now();
        let mut w = RestartWindow::default();
        let d = w.decide(&p, t0);
        assert_eq!(
            d,
            RestartDecision::RestartAt {
                at: t0 + Duration::from_millis(500),
                exhausted: false
            }
        );
        w.record(t0 + Duration::from_millis(500));
        let t1 = t0 + Duration::from_secs(1);
        assert!(matches!(
            w.decide(&p, t1),
            RestartDecision::RestartAt {
                exhausted: false,
                ..
            }
        ));
        w.record(t1 + Duration::from_millis(500));
        assert_eq!(
            w.decide(&p, t0 + Duration::from_secs(2)),
            RestartDecision::Fail
        );
    }

    #[test]
    fn window_slides() {
        let p = policy(1, 10_000, 0, false);
        let t0 = Instant::now();
        let mut w = RestartWindow::default();
        w.record(t0);
        assert_eq!(
            w.decide(&p, t0 + Duration::from_secs(5)),
            RestartDecision::Fail
        );
        let later = t0 + Duration::from_secs(10);
        assert_eq!(
            w.decide(&p, later),
            RestartDecision::RestartAt {
                at: later + MIN_RESTART_DELAY,
                exhausted: false
            }
        );
    }

    #[test]
    fn delay_mode_waits_for_the_window() {
        let p = policy(1, 10_000, 200, true);
        let t0 = Instant::now();
        let mut w = RestartWindow::default();
        w.record(t0);
        let now = t0 + Duration::from_secs(3);
        assert_eq!(
            w.decide(&p, now),
            RestartDecision::RestartAt {
                at: t0 + Duration::from_secs(10),
                exhausted: true
            }
        );
    }

    #[test]
    fn zero_attempts_fail_at_once_or_wait_a_window() {
        let t0 = Instant::now();
        let mut w = RestartWindow::default();
        assert_eq!(
            w.decide(&policy(0, 1000, 0, false), t0),
            RestartDecision::Fail
        );
        assert_eq!(
            w.decide(&policy(0, 1000, 0, true), t0),
            RestartDecision::RestartAt {
                at: t0 + Duration::from_secs(1),
                exhausted: true
            }
        );
    }

    #[test]
    fn delay_has_a_floor() {
        let t0 = Instant::now();
        let mut w = RestartWindow::default();
        assert_eq!(
            w.decide(&policy(5, 0, 0, false), t0),
            RestartDecision::RestartAt {
                at: t0 + MIN_RESTART_DELAY,
                exhausted: false
            }
        );
    }
}

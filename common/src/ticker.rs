//! One periodic loop: a tick every `period` until a stop signal fires.
//!
//! Services that wake on a clock write `while ticker.tick().await { .. }` (or call
//! [`run_every`]) instead of their own `interval` + `select!` pair, so every one
//! stops the same way: promptly, between runs, never in the middle of one.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Interval, MissedTickBehavior};

/// A tick every `period` (the first at once) until `stop` completes.
pub struct Ticker<S> {
    interval: Interval,
    stop: Pin<Box<S>>,
    stopped: bool,
}

impl<S> std::fmt::Debug for Ticker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticker")
            .field("period", &self.interval.period())
            .field("stopped", &self.stopped)
            .finish()
    }
}

impl<S: Future<Output = ()>> Ticker<S> {
    /// A ticker that treats missed ticks as `missed` says and ends when `stop`
    /// completes (for example `cancel.cancelled()` of a cancellation token).
    /// Panics when `period` is zero (as [`tokio::time::interval`] does).
    pub fn new(period: Duration, missed: MissedTickBehavior, stop: S) -> Self {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(missed);
        Ticker {
            interval,
            stop: Box::pin(stop),
            stopped: false,
        }
    }

    /// Waits for the next tick: `true` when it came, `false` once `stop` has
    /// completed (and from then on, without waiting). A stop that is due wins over
    /// a tick that is due. Cancel safe: it may be one branch of a `select!` (a
    /// tick or a stop it did not return stays due for the next call).
    pub async fn tick(&mut self) -> bool {
        if self.stopped {
            return false;
        }
        tokio::select! {
            biased;
            () = &mut self.stop => {
                self.stopped = true;
                false
            }
            _ = self.interval.tick() => true,
        }
    }
}

/// Runs `work` at once and then every `period` until `stop` completes; a run
/// that is under way when `stop` completes finishes first.
pub async fn run_every<S, F, W>(period: Duration, missed: MissedTickBehavior, stop: S, mut work: F)
where
    S: Future<Output = ()>,
    F: FnMut() -> W,
    W: Future<Output = ()>,
{
    let mut ticker = Ticker::new(period, missed, stop);
    while ticker.tick().await {
        work().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::sync::oneshot;
    use tokio::time::Instant;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ticks_at_once_then_every_period_until_stopped() {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let start = Instant::now();
        let mut ticker = Ticker::new(
            Duration::from_secs(10),
            MissedTickBehavior::Delay,
            async move {
                let _ = stop_rx.await;
            },
        );
        let mut at = Vec::new();
        for _ in 0..3 {
            assert!(ticker.tick().await);
            at.push(start.elapsed());
        }
        assert_eq!(
            at,
            [
                Duration::ZERO,
                Duration::from_secs(10),
                Duration::from_secs(20)
            ]
        );
        stop_tx.send(()).expect("stop");
        assert!(!ticker.tick().await);
        assert!(!ticker.tick().await, "stays stopped");
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(20),
            "stopping does not wait"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_run_delays_the_next_tick_with_delay() {
        let runs = Arc::new(AtomicU32::new(0));
        let start = Instant::now();
        let counted = runs.clone();
        run_every(
            Duration::from_secs(1),
            MissedTickBehavior::Delay,
            tokio::time::sleep(Duration::from_millis(6500)),
            move || {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            },
        )
        .await;
        // Runs start at 0, 2, 4 and 6 s (each takes 2 s); the stop at 6.5 s waits
        // for the run under way.
        assert_eq!(runs.load(Ordering::Relaxed), 4);
        assert_eq!(start.elapsed(), Duration::from_secs(8));
    }
}

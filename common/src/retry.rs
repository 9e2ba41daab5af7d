//! One retry loop: attempts counted, delays from [`Backoff`] with jitter, and a
//! wait that a stop signal cuts short.
//!
//! ```ignore
//! let mut retry = Retry::new(Backoff::default());
//! loop {
//!     match connect().await {
//!         Ok(c) => { retry.reset(); serve(c).await }
//!         Err(e) => warn!(attempt = retry.attempts(), error = %e, "cannot connect"),
//!     }
//!     if !retry.wait(cancel.cancelled()).await { break }
//! }
//! ```

use std::future::Future;
use std::time::Duration;

use crate::backoff::Backoff;

/// The retry state of one operation: how many tries failed in a row.
#[derive(Debug, Clone)]
pub struct Retry {
    backoff: Backoff,
    attempts: u32,
    jitter: fn() -> f64,
}

impl Retry {
    /// A retry whose delays come from `backoff`, with uniform random jitter.
    pub fn new(backoff: Backoff) -> Self {
        Retry {
            backoff,
            attempts: 0,
            jitter: rand::random::<f64>,
        }
    }

    /// Draws the jitter (a number in `[0, 1]`) from `jitter` instead (tests).
    pub fn with_jitter(mut self, jitter: fn() -> f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delays of this retry.
    pub fn backoff(&self) -> Backoff {
        self.backoff
    }

    /// The delays taken since the last [`Retry::reset`].
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Starts over from the first (shortest) delay: after a success.
    pub fn reset(&mut self) {
        self.attempts = 0;
    }

    /// The delay before the next try; counts it.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.backoff.delay(self.attempts, (self.jitter)());
        self.attempts = self.attempts.saturating_add(1);
        delay
    }

    /// Sleeps [`Retry::next_delay`]; `false` when `stop` completed first.
    pub async fn wait(&mut self, stop: impl Future<Output = ()>) -> bool {
        let delay = self.next_delay();
        sleep_unless(delay, stop).await
    }
}

/// Sleeps `delay`; `false` when `stop` completed first (a stop that is due wins).
pub async fn sleep_unless(delay: Duration, stop: impl Future<Output = ()>) -> bool {
    tokio::select! {
        biased;
        () = stop => false,
        () = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_grow_from_the_backoff_and_reset_starts_over() {
        let backoff = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(4),
        };
        let mut retry = Retry::new(backoff).with_jitter(|| 1.0);
        let mut waited = Vec::new();
        for _ in 0..4 {
            let start = Instant::now();
            assert!(retry.wait(std::future::pending()).await);
            waited.push(start.elapsed().as_secs());
        }
        assert_eq!(waited, [1, 2, 4, 4]);
        assert_eq!(retry.attempts(), 4);
        retry.reset();
        assert_eq!(retry.next_delay(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_keeps_each_delay_between_half_and_full() {
        let mut retry = Retry::new(Backoff::default());
        for attempt in 0..20 {
            let full = Backoff::default().delay(attempt, 1.0);
            let d = retry.next_delay();
            assert!(d >= full / 2 && d <= full, "{attempt}: {d:?} of {full:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_cuts_the_wait_short() {
        let mut retry = Retry::new(Backoff {
            initial: Duration::from_secs(60),
            max: Duration::from_secs(60),
        });
        let start = Instant::now();
        let stopped = !retry.wait(tokio::time::sleep(Duration::from_secs(3))).await;
        assert!(stopped);
        assert_eq!(start.elapsed(), Duration::from_secs(3));
        assert!(!sleep_unless(Duration::from_secs(1), std::future::ready(())).await);
    }
}

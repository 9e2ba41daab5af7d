//! Reconnect delays: exponential backoff with jitter, as a pure function.

use std::time::Duration;

/// Default first delay after a failed connection attempt.
pub const DEFAULT_INITIAL: Duration = Duration::from_millis(200);
/// Default ceiling of the delay.
pub const DEFAULT_MAX: Duration = Duration::from_secs(5);

/// Exponential backoff with "equal jitter": the delay for attempt `n` lies in
/// `[b/2, b]` where `b = min(max, initial * 2^n)`. Half of it is fixed, so a storm of
/// agents never retries at once, and none waits longer than `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The base delay of the first retry.
    pub initial: Duration,
    /// The ceiling.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: DEFAULT_INITIAL,
            max: DEFAULT_MAX,
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based); `jitter` is a uniform
    /// random number in `[0, 1]` supplied by the caller.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(31));
        let base = self.initial.saturating_mul(factor).min(self.max);
        let jitter = jitter.clamp(0.0, 1.0);
        base / 2 + (base / 2).mul_f64(jitter)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn grows_then_caps() {
        let b = Backoff::default();
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(200));
        assert_eq!(b.delay(1, 1.0), Duration::from_millis(400));
        assert_eq!(b.delay(3, 0.0), Duration::from_millis(800));
        assert_eq!(b.delay(40, 1.0), DEFAULT_MAX);
    }

    proptest! {
        #[test]
        fn stays_within_half_and_full_base(attempt in 0u32..100, jitter in 0f64..=1.0) {
            let b = Backoff::default();
            let d = b.delay(attempt, jitter);
            prop_assert!(d <= DEFAULT_MAX);
            prop_assert!(d >= DEFAULT_INITIAL / 2);
        }
    }
}

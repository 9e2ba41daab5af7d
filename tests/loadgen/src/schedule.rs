//! The open-loop schedule: when request `i` is due, as a pure function of the
//! rate. No clock is read here; callers pass the time elapsed since the start.
//!
//! Request `i` is due at `start + i / rate` (rounded down to the nanosecond), no
//! matter when earlier requests completed. That is what makes the load open-loop
//! and the latencies free of coordinated omission: a request's latency runs from
//! this scheduled instant, so time spent waiting for a free connection counts.

use std::num::NonZeroU32;
use std::time::Duration;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// A run's schedule: `rate` requests per second for `warmup` and then for
/// `measured`. Requests scheduled during the warmup are sent but not reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Requests per second.
    pub rate: NonZeroU32,
    /// The leading part of the run whose requests are left out of the report.
    pub warmup: Duration,
    /// The part of the run that is reported.
    pub measured: Duration,
}

impl Plan {
    /// When request `i` is due, as an offset from the start: `i / rate`, rounded
    /// down to the nanosecond.
    pub fn offset(&self, i: u64) -> Duration {
        let nanos = u128::from(i) * NANOS_PER_SEC / u128::from(self.rate.get());
        duration_from_nanos(nanos)
    }

    /// How many requests are due once `elapsed` has passed since the start: the
    /// number of `i` with `offset(i) <= elapsed`, capped at [`Plan::total`].
    pub fn due(&self, elapsed: Duration) -> u64 {
        self.count_due(elapsed).min(self.total())
    }

    /// Every request of the run: those due strictly before `warmup + measured`.
    pub fn total(&self) -> u64 {
        self.count_before(self.warmup.saturating_add(self.measured))
    }

    /// The index of the first reported request: requests `0..first_measured()`
    /// fall in the warmup.
    pub fn first_measured(&self) -> u64 {
        self.count_before(self.warmup)
    }

    /// Whether request `i` is reported (it is due at or after the warmup's end).
    pub fn is_measured(&self, i: u64) -> bool {
        i >= self.first_measured()
    }

    /// The whole run's length: warmup plus measured window.
    pub fn length(&self) -> Duration {
        self.warmup.saturating_add(self.measured)
    }

    /// The number of `i` with `offset(i) <= t`. `floor(i * 1e9 / r) <= t` holds
    /// exactly when `i * 1e9 < (t + 1) * r`, so the count is
    /// `ceil((t + 1) * r / 1e9)`.
    fn count_due(&self, t: Duration) -> u64 {
        let r = u128::from(self.rate.get());
        let n = ((t.as_nanos() + 1) * r).div_ceil(NANOS_PER_SEC);
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    /// The number of `i` with `offset(i) < t`.
    fn count_before(&self, t: Duration) -> u64 {
        match t.checked_sub(Duration::from_nanos(1)) {
            Some(just_before) => self.count_due(just_before),
            None => 0,
        }
    }
}

fn duration_from_nanos(nanos: u128) -> Duration {
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // The remainder is below 1e9, so it fits in a u32.
    let sub = u32::try_from(nanos % NANOS_PER_SEC).unwrap_or(0);
    Duration::new(secs, sub)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(rate: u32, warmup_ms: u64, measured_ms: u64) -> Plan {
        Plan {
            rate: NonZeroU32::new(rate).expect("non-zero rate"),
            warmup: Duration::from_millis(warmup_ms),
            measured: Duration::from_millis(measured_ms),
        }
    }

    #[test]
    fn request_i_is_due_at_i_over_rate() {
        let p = plan(2000, 0, 10_000);
        assert_eq!(p.offset(0), Duration::ZERO);
        assert_eq!(p.offset(1), Duration::from_micros(500));
        assert_eq!(p.offset(2000), Duration::from_secs(1));
        assert_eq!(p.offset(19_999), Duration::from_micros(9_999_500));

        // 3/s does not divide a second: offsets round down to the nanosecond and
        // do not drift (request 3k is due at exactly k seconds).
        let p = plan(3, 0, 10_000);
        assert_eq!(p.offset(1), Duration::from_nanos(333_333_333));
        assert_eq!(p.offset(2), Duration::from_nanos(666_666_666));
        assert_eq!(p.offset(3_000_000), Duration::from_secs(1_000_000));
    }

    #[test]
    fn due_counts_exactly_the_requests_whose_offset_has_passed() {
        for rate in [1, 3, 7, 1000, 2000, 4999, 5000, 1_000_000] {
            let p = plan(rate, 0, u64::MAX);
            for i in (0..5000).chain([123_456, 9_999_999]) {
                let at = p.offset(i);
                assert_eq!(
                    p.due(at),
                    i + 1,
                    "rate {rate}: request {i} due at its offset"
                );
                if let Some(before) = at.checked_sub(Duration::from_nanos(1)) {
                    assert_eq!(p.due(before), i, "rate {rate}: request {i} not due before");
                }
            }
        }
    }

    #[test]
    fn total_and_warmup_split_the_run_at_the_boundaries() {
        let p = plan(2000, 2000, 10_000);
        assert_eq!(p.total(), 24_000);
        assert_eq!(p.first_measured(), 4000);
        assert!(!p.is_measured(3999));
        assert!(p.is_measured(4000));
        assert_eq!(p.offset(4000), Duration::from_secs(2));
        // The last request is due before the end, the next one would not be.
        assert!(p.offset(p.total() - 1) < p.length());
        assert_eq!(p.offset(p.total()), p.length());
        // `due` never runs past the end.
        assert_eq!(p.due(Duration::from_secs(3600)), p.total());

        let p = plan(3, 0, 1000);
        assert_eq!(p.first_measured(), 0);
        assert_eq!(p.total(), 3); // 0, 333 ms and 666 ms
        assert_eq!(plan(3, 0, 0).total(), 0);
    }
}

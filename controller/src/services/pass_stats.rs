//! [`PassStats`]: the reconcile loop's counters, written by each pass and read by
//! each scrape of `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Statistics of the reconcile loop, recorded by each pass of
/// [`Workloads::tick`](crate::services::workloads::Workloads::tick). Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct PassStats {
    pub(crate) durations: Histogram,
    pub(crate) passes: Arc<AtomicU64>,
    pub(crate) placed: Arc<AtomicU64>,
    pub(crate) unplaced: Arc<AtomicU64>,
}

impl Default for PassStats {
    fn default() -> PassStats {
        PassStats {
            // 100 µs doubling to about 3.3 s.
            durations: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            passes: Arc::default(),
            placed: Arc::default(),
            unplaced: Arc::default(),
        }
    }
}

impl PassStats {
    /// Records one pass: how long it took, how many replicas it placed and how many
    /// it was asked to place but could not.
    pub fn record(&self, took: Duration, placed: u64, unplaced: u64) {
        self.durations.observe(took.as_secs_f64());
        self.passes.fetch_add(1, Ordering::Relaxed);
        self.placed.fetch_add(placed, Ordering::Relaxed);
        self.unplaced.store(unplaced, Ordering::Relaxed);
    }

    /// Passes recorded so far.
    pub fn passes(&self) -> u64 {
        self.passes.load(Ordering::Relaxed)
    }
}

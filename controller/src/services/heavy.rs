//! Bounded room for CPU-heavy request work (parsing and validating manifests),
//! off the async workers: the agent link, `/healthz` and every other handler keep
//! their threads however many manifests arrive at once.
//!
//! **Architecture Invariant:** API handlers parse YAML only inside
//! [`HeavyWork::run`]: at most [`HeavyWork::permits`] parses run at once, each on a
//! blocking thread; callers past that wait up to [`QUEUE_WAIT`], then get a 503.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

/// How long a request waits for a free permit before it is refused.
pub const QUEUE_WAIT: Duration = Duration::from_secs(10);

/// Why [`HeavyWork::run`] did not run the work to its end.
#[derive(Debug, thiserror::Error)]
pub enum HeavyError {
    /// Every permit was taken for [`QUEUE_WAIT`].
    #[error(
        "the controller is busy: {permits} manifest(s) are being checked and this one waited {waited:?} for its turn; retry in a few seconds"
    )]
    Busy {
        /// Permits of the pool.
        permits: usize,
        /// How long it waited.
        waited: Duration,
    },
    /// The work panicked (a bug); the message is the panic's.
    #[error("internal error while checking the manifest: {0}")]
    Panicked(String),
}

/// A semaphore-limited `spawn_blocking`.
#[derive(Debug, Clone)]
pub struct HeavyWork {
    permits: Arc<Semaphore>,
    count: usize,
    wait: Duration,
}

impl HeavyWork {
    /// Room for `permits` (at least one) pieces of work at once; a caller waits at
    /// most `wait` for its turn.
    pub fn new(permits: usize, wait: Duration) -> HeavyWork {
        let count = permits.max(1);
        HeavyWork {
            permits: Arc::new(Semaphore::new(count)),
            count,
            wait,
        }
    }

    /// Half the CPUs (at least one), waiting [`QUEUE_WAIT`]: the other half stays
    /// for the async workers and the reconciler.
    pub fn for_this_host() -> HeavyWork {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        HeavyWork::new(cpus / 2, QUEUE_WAIT)
    }

    /// How many pieces of work may run at once.
    pub fn permits(&self) -> usize {
        self.count
    }

    /// Runs `work` on a blocking thread once a permit is free. The permit is held
    /// until `work` returns, also when the caller stopped waiting (a request past
    /// its deadline), so the bound holds.
    pub async fn run<T, F>(&self, work: F) -> Result<T, HeavyError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let busy = || HeavyError::Busy {
            permits: self.count,
            waited: self.wait,
        };
        let permit = tokio::time::timeout(self.wait, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| busy())?
            // The semaphore is never closed.
            .map_err(|_| busy())?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|e| HeavyError::Panicked(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn no_more_than_the_permits_run_at_once_and_the_rest_are_refused() {
        let pool = HeavyWork::new(2, Duration::from_millis(200));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
        let mut held = Vec::new();
        for _ in 0..2 {
            let (pool, running, most, rx) = (
                pool.clone(),
                running.clone(),
                most.clone(),
                release_rx.clone(),
            );
            held.push(tokio::spawn(async move {
                pool.run(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    let _ = rx.lock().map(|rx| rx.recv());
                    running.fetch_sub(1, Ordering::SeqCst);
                })
                .await
            }));
        }
        // Both permits are taken (the blocked work holds them).
        while running.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let third = pool.run(|| ()).await;
        assert!(
            matches!(third, Err(HeavyError::Busy { permits: 2, .. })),
            "{third:?}"
        );
        release_tx.send(()).expect("send");
        release_tx.send(()).expect("send");
        for h in held {
            h.await.expect("join").expect("ran");
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
        assert_eq!(pool.run(|| 7).await.expect("a permit is free again"), 7);
    }

    #[tokio::test]
    async fn a_panic_is_an_error_and_frees_its_permit() {
        let pool = HeavyWork::new(1, Duration::from_millis(200));
        let e = pool.run(|| panic!("boom")).await;
        assert!(matches!(e, Err(HeavyError::Panicked(_))), "{e:?}");
        assert_eq!(pool.run(|| 1).await.expect("permit freed"), 1);
    }
}

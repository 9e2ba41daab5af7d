//! Blocking queries: a `GET` with `?index=N` waits until the store's revision
//! ([`crate::state::revision`]) passes `N`, as Consul's and Nomad's do.
//!
//! What raises the index: every store write that changes a record (jobs,
//! allocations, nodes' enrollment and cordons, revocations, tokens, policies,
//! checkpoints, migrations, the event log). What does not: node liveness and
//! metrics, which live in the registry's memory, not in the store; a client that
//! watches them polls.
//!
//! There is no single hook on the store's write path (each store commits its own
//! transactions), so one task ([`IndexWatch::run`]) reads the revision every
//! [`POLL`] while a query waits, and publishes it on a `watch` channel the
//! waiting queries sleep on. No query polls on its own, and at most
//! [`MAX_WAITERS`] wait at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, watch};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use novacron_common::ticker::Ticker;

use crate::state::store::{Store, StoreError};

/// How long a blocking query waits when it names no `wait` (Consul's default).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
/// The longest wait a blocking query may ask for; longer ones are cut to it.
pub const MAX_WAIT: Duration = Duration::from_secs(5 * 60);
/// How often the revision is read while a query waits.
pub const POLL: Duration = Duration::from_millis(100);
/// Blocking queries waiting at once; one more is refused (503, retry later).
pub const MAX_WAITERS: usize = 1024;

/// Why a blocking query was not answered.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Too many queries wait already.
    #[error("{max} blocking queries are waiting already; retry later, or ask without `index`")]
    Busy {
        /// [`MAX_WAITERS`].
        max: usize,
    },
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The store's revision as blocking queries wait on it.
#[derive(Debug)]
pub struct IndexWatch {
    store: Arc<dyn Store>,
    revision: watch::Sender<u64>,
    waiters: Arc<Semaphore>,
}

impl IndexWatch {
    /// A watch of `store`'s revision; [`IndexWatch::run`] keeps it current.
    pub fn new(store: Arc<dyn Store>) -> IndexWatch {
        IndexWatch {
            store,
            revision: watch::channel(0).0,
            waiters: Arc::new(Semaphore::new(MAX_WAITERS)),
        }
    }

    /// The store's revision now: the index of an answer read after this call.
    pub fn current(&self) -> Result<u64, StoreError> {
        self.store.revision()
    }

    /// Waits until the revision differs from `index` (it only rises, so: passes
    /// it) or `wait` ends, and returns the revision then. An index the store has
    /// passed, or one it never reached (a client of another controller's store),
    /// answers at once.
    pub async fn wait_past(&self, index: u64, wait: Duration) -> Result<u64, IndexError> {
        let _permit = self
            .waiters
            .clone()
            .try_acquire_owned()
            .map_err(|_| IndexError::Busy { max: MAX_WAITERS })?;
        let mut seen = self.revision.subscribe();
        let now = self.current()?;
        if now != index {
            return Ok(now);
        }
        let wait = wait.min(MAX_WAIT);
        // A published revision is never above the store's, so one past `index`
        // is a real change.
        let _ = tokio::time::timeout(wait, seen.wait_for(|r| *r > index)).await;
        Ok(self.current()?)
    }

    /// Reads the revision every [`POLL`] while a query waits and wakes the
    /// queries it passed, until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut ticker = Ticker::new(POLL, MissedTickBehavior::Delay, cancel.cancelled());
        while ticker.tick().await {
            if self.revision.receiver_count() == 0 {
                continue;
            }
            match self.store.revision() {
                Ok(now) => {
                    self.revision.send_if_modified(|r| {
                        let raised = now > *r;
                        if raised {
                            *r = now;
                        }
                        raised
                    });
                }
                Err(e) => debug!(error = %e, "cannot read the store's revision"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::MemoryStore;

    fn watch() -> (Arc<MemoryStore>, Arc<IndexWatch>, CancellationToken) {
        let store = Arc::new(MemoryStore::new());
        let index = Arc::new(IndexWatch::new(store.clone()));
        let cancel = CancellationToken::new();
        tokio::spawn(index.clone().run(cancel.clone()));
        (store, index, cancel)
    }

    #[tokio::test]
    async fn a_query_at_the_current_index_waits_for_the_next_write() {
        let (store, index, cancel) = watch();
        let now = index.current().expect("revision");
        let waiting = tokio::spawn({
            let index = index.clone();
            async move { index.wait_past(now, Duration::from_secs(30)).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "nothing was written yet");
        store.next_link_epoch().expect("a write");
        let after = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken promptly")
            .expect("join")
            .expect("answered");
        assert!(after > now);
        cancel.cancel();
    }

    #[tokio::test]
    async fn a_query_ends_after_its_wait_and_an_old_or_future_index_answers_at_once() {
        let (_store, index, cancel) = watch();
        let now = index.current().expect("revision");
        let started = std::time::Instant::now();
        let same = index
            .wait_past(now, Duration::from_millis(300))
            .await
            .expect("answered");
        assert_eq!(same, now);
        assert!(started.elapsed() >= Duration::from_millis(300));
        let quick = std::time::Instant::now();
        index
            .wait_past(now + 10, Duration::from_secs(30))
            .await
            .expect("future");
        if now > 0 {
            index
                .wait_past(now - 1, Duration::from_secs(30))
                .await
                .expect("old");
        }
        assert!(quick.elapsed() < Duration::from_secs(5));
        cancel.cancel();
    }
}

//! Leadership: the services that must run on one controller only (the reconcile
//! loop, migrations, the autoscaler, the pool manager, the budget watch) start and
//! stop as one unit, while this controller leads.
//!
//! A [`Leadership`] handle says whether this controller leads now and announces
//! every change. A single controller is always the leader ([`Leadership::always`]);
//! the HA issue drives the same handle from an etcd lease. [`run_while_leader`]
//! starts the unit when leadership is gained and cancels it, then waits for every
//! task of it, when leadership is lost or the controller shuts down.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// One task of the unit: a future that ends when its token is cancelled.
pub type UnitTask = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Whether this controller leads, and every change of it.
#[derive(Debug, Clone)]
pub struct Leadership {
    tx: watch::Sender<bool>,
}

impl Leadership {
    /// The handle of a single controller: leader from the start, for good.
    pub fn always() -> Leadership {
        Leadership::starting(true)
    }

    /// A handle that starts as `leader` and changes with [`Leadership::set`]
    /// (driven by an election).
    pub fn starting(leader: bool) -> Leadership {
        Leadership {
            tx: watch::Sender::new(leader),
        }
    }

    /// Records a change: `true` when this controller gained leadership, `false`
    /// when it lost it.
    pub fn set(&self, leader: bool) {
        self.tx.send_if_modified(|now| {
            let changed = *now != leader;
            *now = leader;
            changed
        });
    }

    /// Whether this controller leads now.
    pub fn is_leader(&self) -> bool {
        *self.tx.borrow()
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

/// Runs the unit while this controller leads, until `shutdown`: each time
/// leadership is gained it calls `start` with a fresh token (a child of
/// `shutdown`) and spawns the tasks it returns; when leadership is lost it
/// cancels that token and waits for every task to end before it may start them
/// again. Returns after `shutdown`, once the unit has stopped.
pub async fn run_while_leader<F>(leadership: Leadership, shutdown: CancellationToken, mut start: F)
where
    F: FnMut(CancellationToken) -> Vec<UnitTask> + Send,
{
    let mut leader = leadership.subscribe();
    loop {
        tokio::select! {
            gained = leader.wait_for(|l| *l) => if gained.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
        let term = shutdown.child_token();
        let tasks: Vec<_> = start(term.clone()).into_iter().map(tokio::spawn).collect();
        info!(services = tasks.len(), "leader: singleton services started");
        tokio::select! {
            _ = leader.wait_for(|l| !*l) => {}
            _ = shutdown.cancelled() => {}
        }
        term.cancel();
        for task in tasks {
            if let Err(error) = task.await {
                warn!(%error, "a singleton service ended abnormally");
            }
        }
        if shutdown.is_cancelled() {
            return;
        }
        info!("leadership lost: singleton services stopped");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// A unit of two tasks that count their starts and how many run now.
    fn counting(
        started: Arc<AtomicUsize>,
        running: Arc<AtomicUsize>,
    ) -> impl FnMut(CancellationToken) -> Vec<UnitTask> + Send {
        move |token: CancellationToken| {
            (0..2)
                .map(|_| {
                    let (started, running, token) =
                        (started.clone(), running.clone(), token.clone());
                    Box::pin(async move {
                        started.fetch_add(1, Ordering::SeqCst);
                        running.fetch_add(1, Ordering::SeqCst);
                        token.cancelled().await;
                        running.fetch_sub(1, Ordering::SeqCst);
                    }) as UnitTask
                })
                .collect()
        }
    }

    async fn until(what: &str, mut ok: impl FnMut() -> bool) {
        for _ in 0..200 {
            if ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("timed out waiting until {what}");
    }

    /// Runs the counting unit under `leadership`: (shutdown, started, running,
    /// the runner's task).
    fn spawn_unit(
        leadership: &Leadership,
    ) -> (
        CancellationToken,
        Arc<AtomicUsize>,
        Arc<AtomicUsize>,
        tokio::task::JoinHandle<()>,
    ) {
        let shutdown = CancellationToken::new();
        let (started, running) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let unit = tokio::spawn(run_while_leader(
            leadership.clone(),
            shutdown.clone(),
            counting(started.clone(), running.clone()),
        ));
        (shutdown, started, running, unit)
    }

    #[tokio::test]
    async fn losing_leadership_stops_the_unit_and_regaining_starts_it() {
        let leadership = Leadership::always();
        let (shutdown, started, running, unit) = spawn_unit(&leadership);
        until("the unit runs", || running.load(Ordering::SeqCst) == 2).await;

        leadership.set(false);
        until("the unit stopped", || running.load(Ordering::SeqCst) == 0).await;
        assert_eq!(
            started.load(Ordering::SeqCst),
            2,
            "not started again while not leading"
        );

        leadership.set(true);
        until("the unit runs again", || {
            running.load(Ordering::SeqCst) == 2
        })
        .await;
        assert_eq!(started.load(Ordering::SeqCst), 4);

        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), unit)
            .await
            .expect("returns after shutdown")
            .expect("no panic");
        assert_eq!(running.load(Ordering::SeqCst), 0, "shutdown stops the unit");
    }

    #[tokio::test]
    async fn a_follower_starts_nothing_until_it_leads() {
        let leadership = Leadership::starting(false);
        let (shutdown, started, running, unit) = spawn_unit(&leadership);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(started.load(Ordering::SeqCst), 0);
        assert!(!leadership.is_leader());
        leadership.set(true);
        until("the unit runs", || running.load(Ordering::SeqCst) == 2).await;
        shutdown.cancel();
        unit.await.expect("no panic");
    }
}

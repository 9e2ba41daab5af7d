//! The event log: an append-only, persisted record of every decision, state change
//! and operator call, with who asked for it.
//!
//! [`EventLog::record`] numbers events (one position per event, strictly
//! increasing across restarts), writes them to the [`Store`] in one transaction and
//! then publishes them to live followers. A follower that falls behind the bounded
//! live channel reads the gap back from the store, so following never skips an
//! event. The store keeps the newest [`DEFAULT_RETAIN`] events.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use novacron_api::Event;
use novacron_common::sync::lock;
use tokio::sync::broadcast;
use tracing::warn;

pub use crate::state::events::{DEFAULT_LIMIT, EventQuery};
use crate::state::store::{EventScan, Store, StoreError};
use novacron_common::clock::unix_ms;

/// Events kept in the store; older ones are dropped.
pub const DEFAULT_RETAIN: usize = 100_000;
/// Live events buffered per follower before it must catch up from the store.
pub const LIVE_CAPACITY: usize = 1024;

/// The actor of the controller's own decisions.
pub const CONTROLLER: &str = "controller";

/// Event kinds, dotted: the resource, then what happened to it.
pub mod kind {
    /// A job manifest was applied (new version or unchanged).
    pub const JOB_APPLIED: &str = "job.applied";
    /// A job was stopped by an operator.
    pub const JOB_STOPPED: &str = "job.stopped";
    /// A stopped job was purged: forgotten with its versions and allocations.
    pub const JOB_PURGED: &str = "job.purged";
    /// A job version became stable, was reverted, completed or is failing.
    pub const JOB_CHANGED: &str = "job.changed";
    /// An allocation was placed on a node.
    pub const ALLOC_PLACED: &str = "alloc.placed";
    /// An allocation could not be placed.
    pub const ALLOC_UNPLACED: &str = "alloc.unplaced";
    /// An allocation changed state as its agent reported.
    pub const ALLOC_STATE: &str = "alloc.state";
    /// An allocation was lost with its node.
    pub const ALLOC_LOST: &str = "alloc.lost";
    /// An allocation was told to stop.
    pub const ALLOC_STOPPED: &str = "alloc.stopped";
    /// An operator restarted an allocation (it is replaced).
    pub const ALLOC_RESTARTED: &str = "alloc.restarted";
    /// A node enrolled.
    pub const NODE_ENROLLED: &str = "node.enrolled";
    /// A node was revoked.
    pub const NODE_REVOKED: &str = "node.revoked";
    /// An operator cordoned a node.
    pub const NODE_CORDONED: &str = "node.cordoned";
    /// An operator lifted a node's cordon.
    pub const NODE_UNCORDONED: &str = "node.uncordoned";
    /// A certificate (operator or node) was revoked by serial.
    pub const CERT_REVOKED: &str = "cert.revoked";
    /// A call that would have changed something was refused (403): who, what, why.
    pub const ACCESS_DENIED: &str = "access.denied";
    /// A join token was created.
    pub const TOKEN_CREATED: &str = "token.created";
    /// An API token was created or revoked.
    pub const API_TOKEN: &str = "apitoken";
    /// A remote command finished (or failed to start).
    pub const EXEC: &str = "exec.finished";
    /// Controller internals were reset by an operator.
    pub const STATS_RESET: &str = "stats.reset";
    /// The autoscaler changed a job's replicas; the message is its explanation.
    pub const AUTOSCALE: &str = "autoscale.scaled";
    /// An autoscaling policy was applied (created, updated or unchanged).
    pub const POLICY_APPLIED: &str = "policy.applied";
    /// An autoscaling policy was deleted.
    pub const POLICY_DELETED: &str = "policy.deleted";
    /// A node pool or node template was applied.
    pub const POOL_APPLIED: &str = "pool.applied";
    /// A VM template was applied or deleted.
    pub const VM_TEMPLATE: &str = "vm.template";
    /// An operator asked for a VM to be suspended or resumed.
    pub const VM_SUSPEND_ASKED: &str = "vm.suspend_asked";
    /// A VM's node reports its guest paused (suspended).
    pub const VM_SUSPENDED: &str = "vm.suspended";
    /// A suspended VM's node reports its guest running again.
    pub const VM_RESUMED: &str = "vm.resumed";
    /// A node pool grew: nodes were created.
    pub const POOL_SCALED: &str = "pool.scaled";
    /// A pool member was cordoned to be removed.
    pub const POOL_DRAINING: &str = "pool.draining";
    /// A pool member was removed.
    pub const POOL_REMOVED: &str = "pool.removed";
    /// A drained pool member was stopped into the pool's warm pool.
    pub const POOL_PARKED: &str = "pool.parked";
    /// A provider call failed.
    pub const POOL_FAILED: &str = "pool.failed";
    /// Consolidation chose pool members to retire: their allocations are evicted
    /// (and replaced elsewhere), then the members drain and are removed.
    pub const POOL_CONSOLIDATED: &str = "pool.consolidated";
    /// A budget of the pricing catalog is exceeded; the message says by how much.
    pub const BUDGET_EXCEEDED: &str = "cost.budget_exceeded";
    /// An exceeded budget is met again.
    pub const BUDGET_RECOVERED: &str = "cost.budget_ok";
    /// A workload class's spot share strays more than 0.2 from its target.
    pub const MIX_OFF_TARGET: &str = "cost.mix_off_target";
    /// A workload class's spot share is back near its target.
    pub const MIX_ON_TARGET: &str = "cost.mix_ok";
    /// A job labelled idleStop was stopped for being idle.
    pub const IDLE_STOPPED: &str = "cost.idle_stopped";
    /// A job labelled rightsize: apply got new requests.
    pub const RIGHTSIZED: &str = "cost.rightsized";
    /// A checkpoint was taken and stored.
    pub const CHECKPOINT_CREATED: &str = "checkpoint.created";
    /// A checkpoint could not be taken or stored.
    pub const CHECKPOINT_FAILED: &str = "checkpoint.failed";
    /// A migration began.
    pub const MIGRATION_STARTED: &str = "migration.started";
    /// A migration finished: the allocation runs on its new node.
    pub const MIGRATION_COMPLETED: &str = "migration.completed";
    /// A migration failed; the allocation goes on (rolled back) on its source.
    pub const MIGRATION_ROLLED_BACK: &str = "migration.rolled_back";
    /// A secret was set (a new version) or deleted; the event names keys, never
    /// values.
    pub const SECRET_CHANGED: &str = "secret.changed";
    /// A node began or finished pulling an allocation's image.
    pub const ALLOC_PULL: &str = "alloc.pull";
    /// An image was pushed to the controller's image store.
    pub const IMAGE_PUSHED: &str = "image.pushed";
    /// A node announced a spot interruption.
    pub const SPOT_NOTICE: &str = "node.spot_notice";
    /// An agent was refused: it speaks no wire protocol version this controller
    /// speaks (the message says which side to upgrade).
    pub const NODE_VERSION_REFUSED: &str = "node.version_refused";
    /// The metrics history's head went over its memory budget: open chunks
    /// were written to disk early (nothing was lost unless the details say
    /// chunks were dropped).
    pub const HISTORY_OVER_BUDGET: &str = "metrics.history_over_budget";
    /// An alert's condition began to hold (it fires after the rule's `for`).
    pub const ALERT_PENDING: &str = "alert.pending";
    /// An alert fires.
    pub const ALERT_FIRING: &str = "alert.firing";
    /// A firing alert's condition no longer holds.
    pub const ALERT_RESOLVED: &str = "alert.resolved";
    /// A pending alert's condition stopped holding before `for` passed.
    pub const ALERT_CLEARED: &str = "alert.cleared";
    /// An alert rule or notification channel was applied or deleted, or an
    /// alert was silenced or acknowledged.
    pub const ALERT_CONFIG: &str = "alert.config";
    /// A notification was delivered to its channel.
    pub const ALERT_NOTIFIED: &str = "alert.notified";
    /// A notification could not be delivered and was given up (after retries
    /// for a day, or its channel was deleted, or the outbox was full).
    pub const ALERT_NOTIFY_FAILED: &str = "alert.notify_failed";
}

/// An event before it has a position and a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    kind: String,
    actor: String,
    node: Option<String>,
    job: Option<String>,
    alloc: Option<String>,
    message: String,
    details: BTreeMap<String, String>,
}

impl NewEvent {
    /// An event of `kind` caused by `actor`.
    pub fn new(kind: &str, actor: impl Into<String>, message: impl Into<String>) -> NewEvent {
        NewEvent {
            kind: kind.to_owned(),
            actor: actor.into(),
            node: None,
            job: None,
            alloc: None,
            message: message.into(),
            details: BTreeMap::new(),
        }
    }

    /// The node concerned.
    pub fn node(mut self, node: impl Into<String>) -> NewEvent {
        self.node = Some(node.into());
        self
    }

    /// The job concerned.
    pub fn job(mut self, job: impl Into<String>) -> NewEvent {
        self.job = Some(job.into());
        self
    }

    /// The allocation concerned.
    pub fn alloc(mut self, alloc: impl Into<String>) -> NewEvent {
        self.alloc = Some(alloc.into());
        self
    }

    /// A structured detail.
    pub fn detail(mut self, key: &str, value: impl ToString) -> NewEvent {
        self.details.insert(key.to_owned(), value.to_string());
        self
    }

    fn at(self, seq: u64, time_unix_ms: u64) -> Event {
        Event {
            seq,
            time_unix_ms,
            kind: self.kind,
            actor: self.actor,
            node: self.node,
            job: self.job,
            alloc: self.alloc,
            message: self.message,
            details: self.details,
        }
    }
}

/// The event log.
#[derive(Debug)]
pub struct EventLog {
    store: Arc<dyn Store>,
    /// The last position given out; held while writing so positions reach the
    /// store and the followers in order.
    last: Mutex<u64>,
    live: broadcast::Sender<Event>,
    retain: usize,
}

impl EventLog {
    /// Opens the log on `store`, continuing after its last stored position.
    pub fn open(store: Arc<dyn Store>, retain: usize) -> Result<EventLog, StoreError> {
        let last = store.last_event_seq()?;
        let (live, _) = broadcast::channel(LIVE_CAPACITY);
        Ok(EventLog {
            store,
            last: Mutex::new(last),
            live,
            retain: retain.max(1),
        })
    }

    /// Records one event now. A store failure is logged and returned; the event is
    /// then not published either.
    pub fn record(&self, event: NewEvent) -> Result<Event, StoreError> {
        let mut out = self.record_all(vec![event], SystemTime::now())?;
        // record_all returns one event per input.
        Ok(out.remove(0))
    }

    /// Records one event and only logs a failure: for call sites whose action has
    /// already happened and must not be reported as failed because of the log.
    pub fn note(&self, event: NewEvent) {
        if let Err(error) = self.record(event) {
            warn!(%error, "cannot record an event");
        }
    }

    /// Records events in one transaction, in order, all at `now`.
    pub fn record_all(
        &self,
        events: Vec<NewEvent>,
        now: SystemTime,
    ) -> Result<Vec<Event>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let time = unix_ms(now);
        let mut last = lock(&self.last);
        let first = *last + 1;
        let numbered: Vec<Event> = events
            .into_iter()
            .zip(first..)
            .map(|(e, seq)| e.at(seq, time))
            .collect();
        if let Err(error) = self.store.append_events(&numbered, self.retain) {
            warn!(%error, count = numbered.len(), "cannot persist events");
            return Err(error);
        }
        *last += numbered.len() as u64;
        for e in &numbered {
            // No follower is not an error.
            let _ = self.live.send(e.clone());
        }
        Ok(numbered)
    }

    /// The last recorded position (0 when the log is empty).
    pub fn last_seq(&self) -> u64 {
        *lock(&self.last)
    }

    /// Reads a page from the store.
    pub fn read(&self, query: &EventQuery) -> Result<EventScan, StoreError> {
        self.store.events(query)
    }

    /// Live events from now on. Call before reading the backlog so that nothing
    /// falls between the two.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.live.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::{MemoryStore, RedbStore};

    fn applied(job: &str) -> NewEvent {
        NewEvent::new(
            kind::JOB_APPLIED,
            "alice (operator)",
            format!("{job} applied"),
        )
        .job(job)
    }

    fn log_on(store: Arc<dyn Store>, retain: usize) -> EventLog {
        EventLog::open(store, retain).expect("open")
    }

    #[test]
    fn positions_continue_after_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("s.redb");
        {
            let log = log_on(Arc::new(RedbStore::open(&path).expect("open")), 10);
            log.record(applied("a")).expect("record");
            log.record(applied("b")).expect("record");
        }
        let log = log_on(Arc::new(RedbStore::open(&path).expect("open")), 10);
        assert_eq!(log.last_seq(), 2);
        let e = log.record(applied("c")).expect("record");
        assert_eq!(e.seq, 3);
        let page = log.read(&EventQuery::default()).expect("read");
        let jobs: Vec<_> = page
            .events
            .iter()
            .map(|e| e.job.clone().expect("job events name their job"))
            .collect();
        assert_eq!(jobs, ["a", "b", "c"]);
        assert!(!page.more);
        assert_eq!(page.last_scanned, 3);
    }

    fn retention_drops_oldest(store: Arc<dyn Store>) {
        let log = log_on(store, 3);
        for i in 0..5 {
            log.record(applied(&format!("j{i}"))).expect("record");
        }
        let page = log.read(&EventQuery::default()).expect("read");
        let seqs: Vec<_> = page.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
    }

    #[test]
    fn retention_drops_oldest_memory() {
        retention_drops_oldest(Arc::new(MemoryStore::new()));
    }

    #[test]
    fn retention_drops_oldest_redb() {
        let dir = tempfile::tempdir().expect("tmp");
        retention_drops_oldest(Arc::new(
            RedbStore::open(&dir.path().join("s.redb")).expect("open"),
        ));
    }

    fn filters_and_pages(store: Arc<dyn Store>) {
        let log = log_on(store, 100);
        log.record(applied("web")).expect("record");
        log.record(
            NewEvent::new(kind::ALLOC_PLACED, CONTROLLER, "placed")
                .job("web")
                .node("n1")
                .alloc("web-1"),
        )
        .expect("record");
        log.record(NewEvent::new(kind::NODE_REVOKED, "root (admin)", "revoked").node("n2"))
            .expect("record");
        log.record(applied("db")).expect("record");

        let by = |q: EventQuery| -> Vec<u64> {
            log.read(&q)
                .expect("read")
                .events
                .iter()
                .map(|e| e.seq)
                .collect()
        };
        let q = EventQuery::default;
        assert_eq!(
            by(EventQuery {
                job: Some("web".into()),
                ..q()
            }),
            [1, 2]
        );
        assert_eq!(
            by(EventQuery {
                node: Some("n2".into()),
                ..q()
            }),
            [3]
        );
        assert_eq!(
            by(EventQuery {
                kind: Some("job".into()),
                ..q()
            }),
            [1, 4]
        );
        assert_eq!(
            by(EventQuery {
                kind: Some("job.applied".into()),
                ..q()
            }),
            [1, 4]
        );
        // A prefix that is not a whole resource name matches nothing.
        assert!(
            by(EventQuery {
                kind: Some("jo".into()),
                ..q()
            })
            .is_empty()
        );
        assert_eq!(
            by(EventQuery {
                alloc: Some("web-1".into()),
                ..q()
            }),
            [2]
        );

        // Paging: two at a time, resuming from last_scanned.
        let first = log.read(&EventQuery { limit: 2, ..q() }).expect("read");
        assert_eq!(first.events.len(), 2);
        assert!(first.more);
        let second = log
            .read(&EventQuery {
                limit: 2,
                after: first.last_scanned,
                ..q()
            })
            .expect("read");
        let seqs: Vec<_> = second.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3, 4]);
    }

    #[test]
    fn filters_and_pages_memory() {
        filters_and_pages(Arc::new(MemoryStore::new()));
    }

    #[test]
    fn filters_and_pages_redb() {
        let dir = tempfile::tempdir().expect("tmp");
        filters_and_pages(Arc::new(
            RedbStore::open(&dir.path().join("s.redb")).expect("open"),
        ));
    }

    #[test]
    fn newest_reads_the_tail_oldest_first() {
        let log = log_on(Arc::new(MemoryStore::new()), 100);
        for i in 0..6 {
            log.record(applied(&format!("j{}", i % 2))).expect("record");
        }
        let page = log
            .read(&EventQuery {
                newest: true,
                limit: 2,
                job: Some("j0".into()),
                ..EventQuery::default()
            })
            .expect("read");
        let seqs: Vec<_> = page.events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3, 5]);
        assert_eq!(page.last_scanned, 6, "following continues after the newest");
    }

    #[test]
    fn subscribers_see_events_in_order() {
        let log = log_on(Arc::new(MemoryStore::new()), 100);
        let mut rx = log.subscribe();
        log.record_all(vec![applied("a"), applied("b")], SystemTime::now())
            .expect("record");
        assert_eq!(rx.try_recv().expect("first").seq, 1);
        assert_eq!(rx.try_recv().expect("second").seq, 2);
    }

    #[test]
    fn limit_is_validated_with_the_accepted_range() {
        let q = EventQuery {
            limit: 0,
            ..EventQuery::default()
        };
        let err = q.validate().expect_err("0 is refused");
        assert!(
            err.contains("limit: 0") && err.contains("1 to 1000"),
            "{err}"
        );
    }
}

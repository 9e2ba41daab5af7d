//! The workload service and the executor of its decisions: it keeps jobs and
//! allocations (persisted through the [`Store`]), asks the planner
//! ([`plan::plan`], which runs the [`reconcile`] core and the
//! [`scheduler`](novacron_common::scheduler)) for a plan on each tick, applies
//! the plan's actions to its state and the store, and then publishes each node's
//! desired set (level-triggered, numbered by generation) for the agent link to
//! send.
//!
//! **Architecture Invariant:** decisions come only from the planner; this module
//! applies them, disk first: what must survive a restart is persisted before any
//! node is told.
//! **Architecture Invariant:** no decision reads a human-readable message; a
//! moving allocation's progress is kept in typed fields ([`MoveReport`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use novacron_common::checkpoint::BundleInfo;
use novacron_common::manifest::{Job, JobType, parse_job};
use novacron_common::reconcile::{self, FailureCounts, JobChange};
use novacron_common::scheduler;
use novacron_common::wire::{
    AllocState, AllocationReport, AllocationSpec, DesiredAllocations, PrePull, RestoreFrom,
};

use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::services::events::{CONTROLLER, EventLog, NewEvent, kind};
use crate::services::pass_stats::PassStats;
use crate::services::secrets::Secrets;
use crate::state::registry::{PlacementNode, Registry};
use crate::state::store::{
    AllocPort, AllocRecord, JobRecord, PublishedAddress, ReplicaOverride, Store, StoreError,
};
pub use novacron_api::{
    ApplyResult, JobDetail, JobPlan, JobSummary, JobVersionView, PlannedPlacement, PlannedStop,
};
use novacron_common::clock::unix_ms;
use novacron_common::manifest::diff::manifest_changes;
use novacron_common::manifest::secret::SecretType;
use plan::{
    Action, Jobs, NewVersion, alloc_ports, node_views, push_record_version, scheduling_snapshot,
};

mod plan;

/// How often the reconciler runs without a wake-up.
pub const TICK: Duration = Duration::from_millis(500);
/// Terminal allocations kept per job for `alloc list` and `job status`.
pub const KEEP_TERMINAL_PER_JOB: usize = 20;

/// Errors of workload operations.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The manifest is invalid.
    #[error("{0}")]
    Invalid(String),
    /// No such job.
    #[error("unknown job {0:?}; `novacron job list` shows the jobs")]
    UnknownJob(String),
    /// No such allocation.
    #[error("unknown allocation {0:?}; `novacron alloc list` shows the allocations")]
    UnknownAlloc(String),
    /// No such stored version of a job (the message names the kept ones).
    #[error("{0}")]
    UnknownVersion(String),
    /// The job's state does not allow it (the message says what would).
    #[error("{0}")]
    Conflict(String),
    /// Persisting failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A job with its allocations as the controller keeps them (the API shows it as
/// [`JobDetail`]).
#[derive(Debug, Clone)]
pub struct JobState {
    /// The summary.
    pub summary: JobSummary,
    /// Allocations, newest first.
    pub allocations: Vec<AllocRecord>,
    /// The current manifest as submitted.
    pub manifest: String,
}

#[derive(Debug, Clone)]
struct JobEntry {
    record: JobRecord,
    parsed: BTreeMap<u64, Job>,
}

impl JobEntry {
    fn current(&self) -> Option<&Job> {
        self.parsed.get(&self.record.current)
    }
}

/// What decides whether a node's desired set changed, per allocation: id,
/// version, checkpoint digest and image digest.
type DesiredKey = (String, u64, Option<String>, Option<String>, bool);

#[derive(Debug)]
struct NodeDesired {
    generation: u64,
    key: Vec<DesiredKey>,
    /// The images of the last set's `prepull`.
    prepull: Vec<String>,
    tx: watch::Sender<Arc<DesiredAllocations>>,
}

#[derive(Debug, Default)]
struct State {
    /// This controller run's link epoch (see [`Store::next_link_epoch`]).
    link_epoch: u64,
    /// Where allocation ids come from when seeded (simulations); the thread RNG
    /// otherwise.
    ids: Option<rand::rngs::StdRng>,
    jobs: BTreeMap<String, JobEntry>,
    allocs: BTreeMap<String, AllocRecord>,
    failures: FailureCounts,
    nodes: BTreeMap<String, NodeDesired>,
    dirty_allocs: BTreeSet<String>,
    dirty_jobs: BTreeSet<String>,
    deleted_allocs: Vec<String>,
    /// Replicas the last pass could not place: job → (version, count).
    unplaced: BTreeMap<String, (u64, u32)>,
    /// Decisions and state changes to record in the event log after the next
    /// persist (bounded: one tick's worth).
    events: Vec<NewEvent>,
    /// Checkpoints of lost allocations, per job, waiting for the replacements the
    /// same pass places (bounded by the lost allocations of one pass).
    recoveries: plan::Recoveries,
    /// Allocations being moved by a migration (or its rollback), with what their
    /// new node reported since.
    migrating: BTreeMap<String, MoveReport>,
    /// Allocations whose node reports a pull in progress: the image and when the
    /// first report of it came (Unix ms). In memory only, for the events.
    pulling: BTreeMap<String, (String, u64)>,
}

/// What the new node of an allocation moved with a checkpoint (a migration or its
/// rollback) reported about it since the move: the migration decides from these
/// typed fields, never from the human-readable message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MoveReport {
    /// The restarts in the new node's first report since the move (`None`: no
    /// report yet). A node that held the allocation before (a rollback to the
    /// source) counts on from its earlier runs.
    pub first_restarts: Option<u32>,
    /// The restarts in its latest report.
    pub restarts: u32,
    /// A start there could not restore the checkpoint.
    pub restore_failed: bool,
    /// The terminal state it reached there (the restore failed for good; the
    /// record shows it as `migrating` for the migration to roll back).
    pub ended: Option<AllocState>,
}

impl MoveReport {
    /// Whether a start on the new node failed since the move: the checkpoint
    /// could not be restored, or the agent counted a restart (it retries a
    /// start that failed).
    pub fn start_failed(&self) -> bool {
        self.restore_failed || self.first_restarts.is_some_and(|f| self.restarts > f)
    }
}

/// Where the workload manager finds an allocation's latest checkpoint, for
/// node-loss recovery (the controller's bundle store serves it).
pub trait CheckpointIndex: Send + Sync + std::fmt::Debug {
    /// The newest complete checkpoint of `alloc`, if any.
    fn latest(&self, alloc: &str) -> Option<BundleInfo>;
}

/// The workload manager.
#[derive(Debug)]
pub struct Workloads {
    state: Mutex<State>,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    events: Arc<EventLog>,
    wake: Notify,
    passes: PassStats,
    checkpoints: OnceLock<Arc<dyn CheckpointIndex>>,
    secrets: OnceLock<Arc<Secrets>>,
}

impl Workloads {
    /// Draws allocation ids from a generator seeded with `seed`, so that a
    /// simulation replays the same ids (and so the same decisions) from its seed.
    pub fn seed_ids(&self, seed: u64) {
        self.lock().ids = Some(rand::SeedableRng::seed_from_u64(seed));
    }

    /// Runs a reconcile pass soon (something it reads changed, such as a cordon).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Loads jobs and allocations from the store, and raises the link epoch in
    /// it: every desired set this instance sends carries that epoch, so agents
    /// that applied sets of an earlier controller run obey this one.
    pub fn load(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        events: Arc<EventLog>,
    ) -> Result<Workloads, StoreError> {
        let mut state = State {
            link_epoch: store.next_link_epoch()?,
            ..State::default()
        };
        for record in store.jobs()? {
            let mut parsed = BTreeMap::new();
            for v in &record.versions {
                match parse_job(&v.file, &v.source) {
                    Ok(job) => {
                        parsed.insert(v.version, job);
                    }
                    Err(e) => {
                        warn!(job = %record.name, version = v.version, error = %e, "stored job version no longer parses")
                    }
                }
            }
            state
                .jobs
                .insert(record.name.clone(), JobEntry { record, parsed });
        }
        for a in store.allocations()? {
            if a.state == AllocState::Failed {
                let f = state
                    .failures
                    .entry((a.job.clone(), a.version))
                    .or_default();
                f.count += 1;
                f.last_ms = f.last_ms.max(a.updated_unix_ms);
            }
            state.allocs.insert(a.id.clone(), a);
        }
        Ok(Workloads {
            state: Mutex::new(state),
            store,
            registry,
            events,
            wake: Notify::new(),
            passes: PassStats::default(),
            checkpoints: OnceLock::new(),
            secrets: OnceLock::new(),
        })
    }

    /// Validates and records a manifest; the reconciler acts on it at once.
    pub fn apply(
        &self,
        file: &str,
        text: &str,
        by: &str,
        now: SystemTime,
    ) -> Result<ApplyResult, WorkloadError> {
        let job = parse_job(file, text).map_err(|e| WorkloadError::Invalid(e.to_string()))?;
        let pins = self.secret_pins(file, &job)?;
        let vm = self.vm_pin(file, &job)?;
        let mut st = self.lock();
        let name = job.name.clone();
        let all: Vec<super::ingress::JobPorts> = st
            .jobs
            .values()
            .filter_map(|e| {
                let spec = &e.current()?.spec;
                Some((
                    e.record.name.clone(),
                    spec.services.clone(),
                    super::ingress::static_tcp_ports(&spec.task.ports),
                ))
            })
            .collect();
        let services = &job.spec.services;
        let host_ports = super::ingress::static_tcp_ports(&job.spec.task.ports);
        if let Some(why) = super::ingress::conflict(&name, services, &all)
            .or_else(|| super::ingress::host_port_conflict(&name, services, &host_ports, &all))
        {
            return Err(WorkloadError::Invalid(format!("{file}: {why}")));
        }
        // The new record is written first; the jobs the API lists and the
        // reconciler schedules change only once it is on disk (under the lock, so
        // nothing sees one without the other).
        let (record, outcome) = match next_record(
            st.jobs.get(&name),
            &job,
            file,
            text,
            by,
            now,
            Pinned {
                secrets: &pins,
                vm: vm.as_ref(),
            },
        ) {
            Next::Unchanged(version) => {
                return Ok(ApplyResult {
                    job: name,
                    version,
                    outcome: "unchanged".into(),
                });
            }
            Next::Record(record, outcome) => (record, outcome),
        };
        let version = record.current;
        self.store.put_job(&record)?;
        let entry = st.jobs.entry(name.clone()).or_insert_with(|| JobEntry {
            record: record.clone(),
            parsed: BTreeMap::new(),
        });
        entry.parsed.insert(version, job);
        entry
            .parsed
            .retain(|v, _| record.versions.iter().any(|k| k.version == *v));
        entry.record = record;
        drop(st);
        info!(job = %name, version, by, outcome, "job applied");
        self.wake.notify_one();
        Ok(ApplyResult {
            job: name,
            version,
            outcome: outcome.into(),
        })
    }

    /// What applying `text` would do, without keeping anything: the real
    /// reconcile pass ([`plan::plan`]) and scheduler run on a copy of the jobs
    /// with the new version in, against the allocations and nodes as they are;
    /// the decisions about this job are returned.
    pub fn plan_apply(
        &self,
        file: &str,
        text: &str,
        by: &str,
        now: SystemTime,
        at: Instant,
    ) -> Result<JobPlan, WorkloadError> {
        let job = parse_job(file, text).map_err(|e| WorkloadError::Invalid(e.to_string()))?;
        let pins = self.secret_pins(file, &job)?;
        let vm = self.vm_pin(file, &job)?;
        let name = job.name.clone();
        let nodes = self.registry.placement_nodes(at);
        let index = self.checkpoints.get().cloned();
        let latest = |id: &str| index.as_ref()?.latest(id);
        let st = self.lock();
        let current = st.jobs.get(&name);
        let current_version = current.map(|e| e.record.current);
        let current_source = current.and_then(|e| {
            e.record
                .versions
                .iter()
                .find(|v| v.version == e.record.current)
                .map(|v| v.source.clone())
        });
        let mut jobs = st.jobs.clone();
        let pinned = Pinned {
            secrets: &pins,
            vm: vm.as_ref(),
        };
        let (outcome, version) = match next_record(current, &job, file, text, by, now, pinned) {
            Next::Unchanged(version) => ("unchanged", version),
            Next::Record(record, outcome) => {
                let version = record.current;
                let entry = jobs.entry(name.clone()).or_insert_with(|| JobEntry {
                    record: record.clone(),
                    parsed: BTreeMap::new(),
                });
                entry.parsed.insert(version, job);
                entry.record = record;
                (outcome, version)
            }
        };
        let changes = if outcome == "unchanged" {
            Vec::new()
        } else {
            manifest_changes(current_source.as_deref(), text)
        };
        // Ids are not shown: a counter keeps the plan deterministic.
        let mut n = 0u64;
        let mut next_id = || {
            n += 1;
            n
        };
        let snapshot = plan::Snapshot {
            now_ms: unix_ms(now),
            jobs: &jobs,
            allocs: &st.allocs,
            nodes: &nodes,
            failures: &st.failures,
            recoveries: &st.recoveries,
            migrating: &st.migrating,
        };
        let decided = plan::plan(&snapshot, &latest, &mut next_id);
        let mut result = JobPlan {
            job: name.clone(),
            outcome: outcome.into(),
            version,
            current_version,
            changes,
            placements: Vec::new(),
            stops: Vec::new(),
            unplaced: decided.unplaced.get(&name).map_or(0, |(_, n)| *n),
            message: String::new(),
        };
        let stop = |alloc: &str, reason: &str, by_this: bool| {
            let a = st.allocs.get(alloc)?;
            (a.job == name || by_this).then(|| PlannedStop {
                alloc: a.id.clone(),
                job: a.job.clone(),
                node: a.node.clone(),
                reason: reason.to_string(),
            })
        };
        for action in &decided.actions {
            match action {
                Action::Place(r) if r.job == name => result.placements.push(PlannedPlacement {
                    node: r.node.clone(),
                    version: r.version,
                    ports: r
                        .ports
                        .iter()
                        .map(|p| format!("{}/{}", p.host_port, p.protocol))
                        .collect(),
                }),
                Action::Stop { alloc, message }
                | Action::MarkLost { alloc, message }
                | Action::Fail { alloc, message, .. } => {
                    result.stops.extend(stop(alloc, message, false));
                }
                Action::Preempt { alloc, by, message } => {
                    result.stops.extend(stop(alloc, message, *by == name));
                }
                Action::SetJobStatus { job, message, .. } if *job == name => {
                    result.message.clone_from(message);
                }
                _ => {}
            }
        }
        if result.unplaced == 0 {
            result.message.clear();
        }
        Ok(result)
    }

    /// The stored versions of a job, newest first, each with what changed from
    /// the one before it (at most [`MAX_JOB_VERSIONS`] are kept).
    ///
    /// [`MAX_JOB_VERSIONS`]: crate::state::store::MAX_JOB_VERSIONS
    pub fn versions(&self, name: &str) -> Result<Vec<JobVersionView>, WorkloadError> {
        let record = self
            .lock()
            .jobs
            .get(name)
            .map(|e| e.record.clone())
            .ok_or_else(|| WorkloadError::UnknownJob(name.to_string()))?;
        let mut out = Vec::with_capacity(record.versions.len());
        let mut before: Option<&str> = None;
        for v in &record.versions {
            out.push(JobVersionView {
                version: v.version,
                submitted_at_unix_ms: v.submitted_at_unix_ms,
                by: v.by.clone(),
                file: v.file.clone(),
                current: v.version == record.current,
                stable: record.stable == Some(v.version),
                changes: manifest_changes(before, &v.source),
                manifest: v.source.clone(),
                image_digest: v.image_digest.clone(),
                secrets: v.secrets.clone(),
            });
            before = Some(&v.source);
        }
        out.reverse();
        Ok(out)
    }

    /// Submits stored version `version` of job `name` again, as a new version
    /// (as Nomad's `job revert` does); `unchanged` when it is the current one.
    pub fn revert(
        &self,
        name: &str,
        version: u64,
        by: &str,
        now: SystemTime,
    ) -> Result<ApplyResult, WorkloadError> {
        let source = {
            let st = self.lock();
            let entry = st
                .jobs
                .get(name)
                .ok_or_else(|| WorkloadError::UnknownJob(name.to_string()))?;
            let kept: Vec<String> = entry
                .record
                .versions
                .iter()
                .map(|v| v.version.to_string())
                .collect();
            entry
                .record
                .versions
                .iter()
                .find(|v| v.version == version)
                .map(|v| v.source.clone())
                .ok_or_else(|| {
                    WorkloadError::UnknownVersion(format!(
                        "job {name} has no stored version {version}; the kept versions are {} (`novacron job history {name}`)",
                        kept.join(", ")
                    ))
                })?
        };
        self.apply(
            &format!("revert of job {name} to version {version}"),
            &source,
            by,
            now,
        )
    }

    /// The `metadata.labels` of job `name`'s current version, as parsed.
    pub fn labels(&self, name: &str) -> Option<BTreeMap<String, String>> {
        self.lock()
            .jobs
            .get(name)
            .and_then(JobEntry::current)
            .map(|j| j.labels.clone())
    }

    /// Whether job `name` is stopped.
    pub fn is_stopped(&self, name: &str) -> bool {
        self.lock().jobs.get(name).is_some_and(|e| e.record.stopped)
    }

    /// Stops job `name`: its allocations stop and stay stopped until it is
    /// started or applied again.
    pub fn stop(&self, name: &str, by: &str) -> Result<(), WorkloadError> {
        let mut st = self.lock();
        let entry = st
            .jobs
            .get_mut(name)
            .ok_or_else(|| WorkloadError::UnknownJob(name.to_string()))?;
        let mut record = entry.record.clone();
        record.stopped = true;
        // A stopped VM powers off: nothing is left to keep suspended.
        record.suspended = false;
        record.status = "stopped".into();
        record.message = format!("stopped by {by}");
        self.store.put_job(&record)?;
        entry.record = record;
        drop(st);
        info!(job = name, by, "job stopped");
        self.wake.notify_one();
        Ok(())
    }

    /// Purges job `name`: a stopped job whose allocations have all ended is
    /// forgotten with its versions and allocations (its events stay). The
    /// name is free again; a later apply starts at version 1. Refused while
    /// the job runs or an allocation of it is still stopping.
    pub fn purge(&self, name: &str, by: &str) -> Result<(), WorkloadError> {
        let mut st = self.lock();
        let entry = st
            .jobs
            .get(name)
            .ok_or_else(|| WorkloadError::UnknownJob(name.to_string()))?;
        if !entry.record.stopped {
            return Err(WorkloadError::Conflict(format!(
                "job {name} is not stopped; stop it first (novacron job stop {name} --purge does both)"
            )));
        }
        let allocs: Vec<&AllocRecord> = st.allocs.values().filter(|a| a.job == name).collect();
        let stopping: Vec<&str> = allocs
            .iter()
            .filter(|a| !a.state.is_terminal())
            .map(|a| a.id.as_str())
            .collect();
        if !stopping.is_empty() {
            return Err(WorkloadError::Conflict(format!(
                "job {name} still has {} allocation(s) stopping ({}); purge it once they have stopped",
                stopping.len(),
                stopping.join(", ")
            )));
        }
        let ids: Vec<String> = allocs.iter().map(|a| a.id.clone()).collect();
        // Its allocations first: a purge cut short leaves a stopped job with
        // fewer records, never allocations without their job.
        self.store.save_allocations(&[], &ids)?;
        self.store.delete_job(name)?;
        st.jobs.remove(name);
        for id in &ids {
            st.allocs.remove(id);
            st.dirty_allocs.remove(id);
            st.migrating.remove(id);
            st.pulling.remove(id);
        }
        st.deleted_allocs.retain(|id| !ids.contains(id));
        st.dirty_jobs.remove(name);
        st.unplaced.remove(name);
        st.failures.retain(|(job, _), _| job != name);
        st.recoveries.remove(name);
        drop(st);
        info!(job = name, by, allocations = ids.len(), "job purged");
        // The nodes forget its allocations (and remove what is left of them).
        self.publish();
        self.wake.notify_one();
        Ok(())
    }

    /// Whether job `name` is a VM suspended by an operator.
    pub fn is_suspended(&self, name: &str) -> bool {
        self.lock()
            .jobs
            .get(name)
            .is_some_and(|e| e.record.suspended)
    }

    /// Suspends (`true`) or resumes VM job `name`: persisted first, then its
    /// node's desired set says so, and the node pauses or resumes the guest
    /// (QMP `stop`/`cont`, its memory kept). Returns whether anything changed.
    /// Refused for a job that does not run a VM, and for a stopped one.
    pub fn set_suspended(
        &self,
        name: &str,
        suspended: bool,
        by: &str,
    ) -> Result<bool, WorkloadError> {
        let mut st = self.lock();
        let entry = st
            .jobs
            .get_mut(name)
            .ok_or_else(|| WorkloadError::UnknownJob(name.to_string()))?;
        if entry.current().is_none_or(|j| j.spec.task.vm.is_none()) {
            return Err(WorkloadError::Conflict(format!(
                "job {name} runs containers, not a virtual machine; only VMs can be suspended (stop it with novacron job stop {name})"
            )));
        }
        if entry.record.stopped {
            return Err(WorkloadError::Conflict(format!(
                "vm {name} is stopped; start it with novacron vm start {name}"
            )));
        }
        if entry.record.suspended == suspended {
            return Ok(false);
        }
        let mut record = entry.record.clone();
        record.suspended = suspended;
        self.store.put_job(&record)?;
        entry.record = record;
        drop(st);
        info!(job = name, by, suspended, "vm suspension changed");
        self.wake.notify_one();
        Ok(true)
    }

    /// Evicts one allocation: the controller no longer wants it to run (its agent
    /// stops it), and since it no longer counts toward its job's replicas the
    /// reconciler places a replacement on another node, as for a stopped one.
    /// Returns whether it was evicted (`false`: already stopped or terminal).
    pub fn evict(&self, id: &str, reason: &str, by: &str) -> Result<bool, WorkloadError> {
        self.release(id, by, format!("evicted: {reason}"), |a| {
            NewEvent::new(kind::ALLOC_STOPPED, by, format!("evicting {id}: {reason}"))
                .node(&a.node)
                .job(&a.job)
                .alloc(id)
                .detail("evicted", "true")
        })
    }

    /// Restarts one allocation (`novacron alloc restart`): as [`Workloads::evict`],
    /// its agent stops it and the reconciler's next pass places a fresh one for
    /// its job (an agent has no in-place restart). Returns whether it was
    /// restarted (`false`: already stopped or terminal).
    pub fn restart(&self, id: &str, by: &str) -> Result<bool, WorkloadError> {
        self.release(id, by, format!("restarted by {by}"), |a| {
            NewEvent::new(
                kind::ALLOC_RESTARTED,
                by,
                format!(
                    "restarting {id} of job {} on {}: a replacement is placed",
                    a.job, a.node
                ),
            )
            .node(&a.node)
            .job(&a.job)
            .alloc(id)
        })
    }

    /// Stops wanting allocation `id`, with `message`, and records `event`.
    fn release(
        &self,
        id: &str,
        by: &str,
        message: String,
        event: impl FnOnce(&AllocRecord) -> NewEvent,
    ) -> Result<bool, WorkloadError> {
        let now = SystemTime::now();
        let mut st = self.lock();
        let a = st
            .allocs
            .get_mut(id)
            .ok_or_else(|| WorkloadError::UnknownAlloc(id.to_string()))?;
        if !a.desired_run || a.state.is_terminal() {
            return Ok(false);
        }
        let mut released = a.clone();
        released.desired_run = false;
        released.message = message;
        released.updated_unix_ms = unix_ms(now);
        self.store
            .save_allocations(std::slice::from_ref(&released), &[])?;
        *a = released;
        let event = event(a);
        info!(alloc = %id, job = %a.job, node = %a.node, reason = %a.message, by, "releasing allocation");
        drop(st);
        self.record(vec![event], now);
        self.wake.notify_one();
        Ok(true)
    }

    /// Sets the replicas of `name` apart from its manifest (the autoscaler's
    /// decision); the reconciler acts on it at once. A new version applied later
    /// keeps them, until [`Workloads::unscale`] hands the count back to the
    /// manifest. Returns the replicas wanted before.
    pub fn scale(
        &self,
        name: &str,
        replicas: u32,
        by: &str,
        reason: &str,
        now: SystemTime,
    ) -> Result<u32, WorkloadError> {
        let mut st = self.lock();
        let entry = st
            .jobs
            .get_mut(name)
            .ok_or_else(|| WorkloadError::UnknownJob(name.to_string()))?;
        let before = effective_replicas(entry);
        let mut record = entry.record.clone();
        record.replicas_override = Some(ReplicaOverride {
            replicas,
            by: by.to_string(),
            reason: reason.to_string(),
            at_unix_ms: unix_ms(now),
        });
        self.store.put_job(&record)?;
        entry.record = record;
        drop(st);
        info!(
            job = name,
            from = before,
            to = replicas,
            by,
            reason,
            "job scaled"
        );
        self.wake.notify_one();
        Ok(before)
    }

    /// Drops the replicas [`Workloads::scale`] set, so the manifest's count holds
    /// again. Returns whether there were any.
    pub fn unscale(&self, name: &str) -> Result<bool, WorkloadError> {
        let mut st = self.lock();
        let Some(entry) = st.jobs.get_mut(name) else {
            return Ok(false);
        };
        let mut record = entry.record.clone();
        if record.replicas_override.take().is_none() {
            return Ok(false);
        }
        self.store.put_job(&record)?;
        entry.record = record;
        drop(st);
        info!(job = name, "replicas handed back to the manifest");
        self.wake.notify_one();
        Ok(true)
    }

    /// Jobs whose replicas were set apart from their manifest, and by whom.
    pub fn scaled_jobs(&self) -> Vec<(String, String)> {
        self.lock()
            .jobs
            .values()
            .filter_map(|e| {
                let o = e.record.replicas_override.as_ref()?;
                Some((e.record.name.clone(), o.by.clone()))
            })
            .collect()
    }

    /// All jobs.
    pub fn jobs(&self) -> Vec<JobSummary> {
        let nodes = self.node_views(Instant::now());
        let st = self.lock();
        st.jobs
            .values()
            .map(|e| summary(e, &st.allocs, &nodes))
            .collect()
    }

    /// The nodes as the reconciler sees them.
    fn node_views(&self, now: Instant) -> Vec<reconcile::NodeView> {
        node_views(&self.registry.placement_nodes(now))
    }

    /// `spec.task.shutdownDelay` of the job version `alloc` runs.
    pub fn shutdown_delay(&self, alloc: &str) -> Option<std::time::Duration> {
        let st = self.lock();
        let a = st.allocs.get(alloc)?;
        st.jobs
            .get(&a.job)?
            .parsed
            .get(&a.version)?
            .spec
            .task
            .shutdown_delay
    }

    /// Each job's current services (`spec.services`), for the service catalog.
    pub fn job_services(&self) -> Vec<(String, Vec<novacron_common::manifest::ServiceSpec>)> {
        let st = self.lock();
        st.jobs
            .values()
            .filter_map(|e| {
                let services = &e.current()?.spec.services;
                (!services.is_empty()).then(|| (e.record.name.clone(), services.clone()))
            })
            .collect()
    }

    /// One job with its allocations, as the API shows it.
    pub fn job(&self, name: &str) -> Result<JobDetail, WorkloadError> {
        let state = self.job_state(name)?;
        Ok(JobDetail {
            summary: state.summary,
            allocations: state.allocations.into_iter().map(Into::into).collect(),
            manifest: state.manifest,
        })
    }

    /// One job with its allocations as the controller keeps them.
    pub fn job_state(&self, name: &str) -> Result<JobState, WorkloadError> {
        let nodes = self.node_views(Instant::now());
        let st = self.lock();
        let entry = st
            .jobs
            .get(name)
            .ok_or_else(|| WorkloadError::UnknownJob(name.to_string()))?;
        let mut allocations: Vec<AllocRecord> = st
            .allocs
            .values()
            .filter(|a| a.job == name)
            .cloned()
            .collect();
        allocations.sort_by(|a, b| {
            b.created_unix_ms
                .cmp(&a.created_unix_ms)
                .then(a.id.cmp(&b.id))
        });
        let manifest = entry
            .record
            .versions
            .iter()
            .find(|v| v.version == entry.record.current)
            .map(|v| v.source.clone())
            .unwrap_or_default();
        Ok(JobState {
            summary: summary(entry, &st.allocs, &nodes),
            allocations,
            manifest,
        })
    }

    /// Allocations, optionally of one job or node.
    pub fn allocations(&self, job: Option<&str>, node: Option<&str>) -> Vec<AllocRecord> {
        let st = self.lock();
        st.allocs
            .values()
            .filter(|a| job.is_none_or(|j| a.job == j) && node.is_none_or(|n| a.node == n))
            .cloned()
            .collect()
    }

    /// The job of allocation `id`, if it is known.
    pub fn job_of(&self, id: &str) -> Option<String> {
        self.lock().allocs.get(id).map(|a| a.job.clone())
    }

    /// One allocation.
    pub fn allocation(&self, id: &str) -> Result<AllocRecord, WorkloadError> {
        self.lock()
            .allocs
            .get(id)
            .cloned()
            .ok_or_else(|| WorkloadError::UnknownAlloc(id.to_string()))
    }

    /// The desired set of `node`, updated as it changes.
    pub fn subscribe(&self, node: &str) -> watch::Receiver<Arc<DesiredAllocations>> {
        let labels = self.prepull_labels();
        let mut st = self.lock();
        let link_epoch = st.link_epoch;
        let entry = st
            .nodes
            .entry(node.to_string())
            .or_insert_with(|| NodeDesired {
                generation: 0,
                key: vec![],
                prepull: vec![],
                tx: watch::channel(Arc::new(DesiredAllocations {
                    epoch: link_epoch,
                    generation: 0,
                    allocations: vec![],
                    prepull: vec![],
                }))
                .0,
            });
        let rx = entry.tx.subscribe();
        // The first value comes from the current allocations; only this node's set
        // is computed, so a reconnect storm stays linear.
        let secrets = self.secrets.get().map(|s| &**s);
        let specs = desired_specs(&st, Some(node), secrets)
            .remove(node)
            .unwrap_or_default();
        let prepull = labels
            .as_ref()
            .and_then(|l| l.get(node))
            .map(|l| prepull_for(&st, l, secrets))
            .unwrap_or_default();
        send_if_changed(st.nodes.get_mut(node), link_epoch, specs, prepull);
        rx
    }

    /// Every node's labels, when some job asks for its image to be pulled ahead
    /// (`None` otherwise: nothing to compute). Read before the state's lock.
    fn prepull_labels(&self) -> Option<BTreeMap<String, BTreeMap<String, String>>> {
        let any = self
            .lock()
            .jobs
            .values()
            .any(|e| !e.record.stopped && e.current().is_some_and(|j| j.spec.pre_pull));
        any.then(|| {
            self.registry
                .placement_nodes(Instant::now())
                .into_iter()
                .map(|n| (n.name, n.labels))
                .collect()
        })
    }

    /// Takes an agent's report of its allocations.
    pub fn report(&self, node: &str, report: &AllocationReport, now: SystemTime) {
        let now_ms = unix_ms(now);
        let mut st = self.lock();
        let mut changed = false;
        let reported: BTreeSet<&str> = report.allocations.iter().map(|a| a.id.as_str()).collect();
        let State {
            jobs,
            allocs,
            failures,
            dirty_allocs,
            dirty_jobs,
            events,
            migrating,
            pulling,
            ..
        } = &mut *st;
        for status in &report.allocations {
            let Some(a) = allocs.get_mut(&status.id) else {
                continue;
            };
            // Terminal states are final: later reports (a container being removed)
            // must not hide why it ended.
            if a.node != node || a.state.is_terminal() {
                continue;
            }
            let before = (
                a.state,
                a.healthy,
                a.restarts,
                a.exit_code,
                a.message.clone(),
            );
            let published_before = (a.published.clone(), a.address);
            if let Some(seen) = migrating.get_mut(&a.id) {
                // Failures stick: the first one is enough to roll back.
                *seen = MoveReport {
                    first_restarts: seen.first_restarts.or(Some(status.restarts)),
                    restarts: status.restarts,
                    restore_failed: seen.restore_failed || status.restore_failed,
                    ended: seen
                        .ended
                        .or(status.state.is_terminal().then_some(status.state)),
                };
            }
            if migrating.contains_key(&a.id) && status.state.is_terminal() {
                // A restore that failed during a migration is the migration's to
                // roll back, not the reconciler's to replace.
                a.state = AllocState::Migrating;
                a.healthy = None;
                a.message = format!("restore failed: {}", status.message);
                continue;
            }
            if status.state == AllocState::Failed {
                let f = failures.entry((a.job.clone(), a.version)).or_default();
                f.count += 1;
                f.last_ms = now_ms;
            }
            a.state = status.state;
            a.healthy = status.healthy;
            a.restarts = status.restarts;
            a.exit_code = status.exit_code;
            a.message = status.message.clone();
            a.failure = status
                .failure
                .filter(|_| status.state == AllocState::Failed);
            a.published = published(status);
            a.address = status
                .address
                .filter(|_| status.state == AllocState::Running);
            let suspended = status.suspended && status.state == AllocState::Running;
            if suspended != a.suspended {
                a.suspended = suspended;
                let (what, text) = if suspended {
                    (
                        kind::VM_SUSPENDED,
                        format!(
                            "virtual machine {} ({}) is suspended on {node}: its guest is paused, its memory kept",
                            a.job, a.id
                        ),
                    )
                } else {
                    (
                        kind::VM_RESUMED,
                        format!("virtual machine {} ({}) runs again on {node}", a.job, a.id),
                    )
                };
                events.push(
                    NewEvent::new(what, format!("node/{node}"), text)
                        .node(node)
                        .job(&a.job)
                        .alloc(&a.id),
                );
            }
            match (&status.pull, pulling.get(&a.id)) {
                (Some(p), None) => {
                    pulling.insert(a.id.clone(), (p.image.clone(), now_ms));
                    events.push(
                        NewEvent::new(
                            kind::ALLOC_PULL,
                            format!("node/{node}"),
                            format!("{} is pulling image {} on {node}", a.id, p.image),
                        )
                        .node(node)
                        .job(&a.job)
                        .alloc(&a.id)
                        .detail("image", &p.image),
                    );
                }
                (None, Some(_)) => {
                    if let Some((image, since)) = pulling.remove(&a.id) {
                        let took = now_ms.saturating_sub(since);
                        events.push(
                            NewEvent::new(
                                kind::ALLOC_PULL,
                                format!("node/{node}"),
                                format!(
                                    "{} pulled image {image} on {node} ({:.1} s; {})",
                                    a.id,
                                    took as f64 / 1e3,
                                    status.state
                                ),
                            )
                            .node(node)
                            .job(&a.job)
                            .alloc(&a.id)
                            .detail("image", image)
                            .detail("took_ms", took),
                        );
                    }
                }
                _ => {}
            }
            if let Some(digest) = &status.image_digest
                && let Some(event) = pin_digest(jobs, &a.job, a.version, digest)
            {
                dirty_jobs.insert(a.job.clone());
                events.push(event.node(node));
                changed = true;
            }
            // A VM arriving live is the migration service's to settle, even
            // after a restart lost the migration (its state is on the source:
            // never "from scratch").
            if !migrating.contains_key(&a.id)
                && let Some(r) = &a.restore
                && r.incoming_vm.is_none()
            {
                if a.state == AllocState::Running {
                    // Restored (recovery): a later restart starts the container
                    // as it is, not from this older checkpoint.
                    a.restore = None;
                } else if status.restore_failed {
                    // The checkpoint cannot be used (corrupt, gone, wrong node):
                    // availability first, the replacement starts from scratch.
                    warn!(alloc = %a.id, %node, checkpoint = %r.digest, message = %status.message, "checkpoint unusable; starting from scratch");
                    events.push(
                        NewEvent::new(
                            kind::CHECKPOINT_FAILED,
                            format!("node/{node}"),
                            format!(
                                "{} could not restore checkpoint {} on {node} ({}); it starts from scratch",
                                a.id, r.digest, status.message
                            ),
                        )
                        .node(node)
                        .job(&a.job)
                        .alloc(&a.id)
                        .detail("checkpoint", &r.digest),
                    );
                    a.restore = None;
                }
            }
            let checked = jobs
                .get(&a.job)
                .and_then(|e| e.parsed.get(&a.version))
                .is_some_and(|j| j.spec.health.is_some());
            let good = a.state == AllocState::Running
                && (a.healthy == Some(true) || (!checked && a.healthy.is_none()));
            a.healthy_since_unix_ms = if good {
                a.healthy_since_unix_ms.or(Some(now_ms))
            } else {
                None
            };
            if published_before != (a.published.clone(), a.address) {
                dirty_allocs.insert(a.id.clone());
                changed = true;
            }
            if before
                != (
                    a.state,
                    a.healthy,
                    a.restarts,
                    a.exit_code,
                    a.message.clone(),
                )
            {
                a.updated_unix_ms = now_ms;
                dirty_allocs.insert(a.id.clone());
                changed = true;
                if before.0 != a.state {
                    let mut message = format!("{} is {}", a.id, a.state);
                    if !a.message.is_empty() {
                        message = format!("{message}: {}", a.message);
                    }
                    let mut event =
                        NewEvent::new(kind::ALLOC_STATE, format!("node/{node}"), message)
                            .node(node)
                            .job(&a.job)
                            .alloc(&a.id)
                            .detail("state", a.state.to_string())
                            .detail("previous", before.0.to_string());
                    if let Some(code) = a.exit_code {
                        event = event.detail("exit_code", code);
                    }
                    events.push(event);
                }
            }
        }
        // Pulls of allocations that are gone are forgotten.
        pulling.retain(|id, _| allocs.get(id).is_some_and(|a| !a.state.is_terminal()));
        // Allocations the controller stopped and the agent no longer runs.
        for a in allocs.values_mut() {
            if a.node == node
                && !a.desired_run
                && !a.state.is_terminal()
                && !reported.contains(a.id.as_str())
            {
                a.state = AllocState::Stopped;
                a.published.clear();
                a.address = None;
                a.updated_unix_ms = now_ms;
                dirty_allocs.insert(a.id.clone());
                changed = true;
            }
        }
        let recorded = if changed {
            std::mem::take(&mut st.events)
        } else {
            Vec::new()
        };
        drop(st);
        if changed {
            self.record(recorded, now);
            self.wake.notify_one();
        }
    }

    /// Runs the reconcile loop until `cancel` fires.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.tick(Instant::now(), SystemTime::now()))
                .await
            {
                Ok(Err(error)) => warn!(%error, "reconcile tick failed"),
                Err(error) => warn!(%error, "reconcile task failed"),
                Ok(Ok(())) => {}
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(TICK) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// One reconcile pass: decide ([`plan::plan`]), apply, persist, publish.
    pub fn tick(&self, now: Instant, wall: SystemTime) -> Result<(), StoreError> {
        let started = Instant::now();
        let now_ms = unix_ms(wall);
        let nodes = self.registry.placement_nodes(now);
        let index = self.checkpoints.get().cloned();
        let latest = |id: &str| index.as_ref()?.latest(id);
        let mut st = self.lock();
        let plan = {
            let State {
                jobs,
                allocs,
                failures,
                recoveries,
                migrating,
                ids,
                ..
            } = &mut *st;
            let mut next_id = || match ids.as_mut() {
                Some(rng) => rand::Rng::random::<u64>(rng),
                None => rand::random::<u64>(),
            };
            let snapshot = plan::Snapshot {
                now_ms,
                jobs,
                allocs,
                nodes: &nodes,
                failures,
                recoveries,
                migrating,
            };
            plan::plan(&snapshot, &latest, &mut next_id)
        };
        let (requested, placed) = (plan.requested, plan.placed());
        self.apply_plan(&mut st, plan, now_ms);
        let recorded = std::mem::take(&mut st.events);
        drop(st);
        self.persist()?;
        self.record(recorded, wall);
        self.publish();
        self.passes
            .record(started.elapsed(), placed, requested.saturating_sub(placed));
        Ok(())
    }

    /// Applies a pass's plan to the in-memory state, in order; [`Workloads::tick`]
    /// then persists it before anything acts on it. A job change is written at
    /// once, before the in-memory view shows it: when the write fails the change
    /// (and its event) is dropped, and the next pass decides it again from the
    /// unchanged state.
    fn apply_plan(&self, st: &mut State, plan: plan::Plan, now_ms: u64) {
        st.recoveries = plan.recoveries;
        // What this pass cannot place replaces what the last one could not.
        st.unplaced = plan.unplaced;
        for action in plan.actions {
            match action {
                Action::MarkLost { alloc, message } => {
                    if let Some(a) = unwant(&mut st.allocs, &alloc, message, now_ms) {
                        a.state = AllocState::Lost;
                        a.healthy_since_unix_ms = None;
                        a.published.clear();
                        a.address = None;
                        warn!(alloc = %alloc, node = %a.node, job = %a.job, "allocation lost");
                    }
                    st.dirty_allocs.insert(alloc);
                }
                Action::Stop { alloc, message } => {
                    if let Some(a) = unwant(&mut st.allocs, &alloc, message, now_ms) {
                        info!(alloc = %alloc, job = %a.job, reason = %a.message, "stopping allocation");
                    }
                    st.dirty_allocs.insert(alloc);
                }
                Action::Preempt { alloc, by, message } => {
                    if unwant(&mut st.allocs, &alloc, message, now_ms).is_some() {
                        warn!(alloc = %alloc, by = %by, "preempted");
                    }
                    st.dirty_allocs.insert(alloc);
                }
                Action::Fail {
                    alloc,
                    failure,
                    message,
                } => {
                    if let Some(a) = unwant(&mut st.allocs, &alloc, message, now_ms) {
                        warn!(alloc = %alloc, job = %a.job, reason = %a.message, "stopping allocation as failed");
                        a.state = AllocState::Failed;
                        a.healthy_since_unix_ms = None;
                        a.published.clear();
                        a.address = None;
                        a.failure = Some(failure);
                        let f = st.failures.entry((a.job.clone(), a.version)).or_default();
                        f.count += 1;
                        f.last_ms = now_ms;
                    }
                    st.dirty_allocs.insert(alloc);
                }
                Action::ChangeJob {
                    change,
                    entry,
                    event,
                } => {
                    let name = entry.record.name.clone();
                    if let Err(error) = self.store.put_job(&entry.record) {
                        warn!(job = %name, %error, "cannot save a job change; deciding it again next pass");
                        continue;
                    }
                    log_job_change(&change);
                    st.jobs.insert(name, *entry);
                    st.events.push(event);
                }
                Action::Place(record) => {
                    info!(alloc = %record.id, job = %record.job, node = %record.node, "placed");
                    st.dirty_allocs.insert(record.id.clone());
                    st.allocs.insert(record.id.clone(), *record);
                }
                Action::SetJobStatus {
                    job,
                    status,
                    message,
                } => {
                    if let Some(e) = st.jobs.get_mut(&job) {
                        e.record.status = status;
                        e.record.message = message;
                        st.dirty_jobs.insert(job);
                    }
                }
                Action::Forget { alloc } => {
                    st.allocs.remove(&alloc);
                    st.dirty_allocs.remove(&alloc);
                    st.deleted_allocs.push(alloc);
                }
                Action::Record(event) => st.events.push(event),
            }
        }
    }

    /// Timings and placement counts of the reconcile passes, for `/metrics`.
    pub fn pass_stats(&self) -> &PassStats {
        &self.passes
    }

    /// The replicas the last reconcile pass could not place, with what one replica
    /// needs (for the node pool autoscaler), by job name.
    pub fn unplaced(&self) -> Vec<novacron_common::pools::Demand> {
        let st = self.lock();
        st.unplaced
            .iter()
            .filter_map(|(name, &(version, count))| demand(&st, name, version, count))
            .collect()
    }

    /// `count` replicas of `job`'s current version as a demand for the node pools;
    /// `None` for a stopped or unknown job.
    pub fn demand_of(&self, job: &str, count: u32) -> Option<novacron_common::pools::Demand> {
        let st = self.lock();
        let version = st.jobs.get(job)?.record.current;
        demand(&st, job, version, count)
    }

    /// The replicas wanted running on `nodes` (which are going away: a spot
    /// notice), as demands by job and version, with what one replica needs.
    pub fn leaving(&self, nodes: &BTreeSet<String>) -> Vec<novacron_common::pools::Demand> {
        if nodes.is_empty() {
            return Vec::new();
        }
        let st = self.lock();
        let mut counts: BTreeMap<(&str, u64), u32> = BTreeMap::new();
        for a in st.allocs.values() {
            if a.desired_run && !a.state.is_terminal() && nodes.contains(&a.node) {
                *counts.entry((a.job.as_str(), a.version)).or_default() += 1;
            }
        }
        counts
            .into_iter()
            .filter_map(|((job, version), count)| demand(&st, job, version, count))
            .collect()
    }

    /// Records decided events after the state they describe was persisted.
    fn record(&self, events: Vec<NewEvent>, now: SystemTime) {
        // Failures are logged by the event log; the decisions stand.
        let _ = self.events.record_all(events, now);
    }

    fn persist(&self) -> Result<(), StoreError> {
        let (jobs, allocs, deleted) = {
            let mut st = self.lock();
            let jobs: Vec<JobRecord> = std::mem::take(&mut st.dirty_jobs)
                .into_iter()
                .filter_map(|n| st.jobs.get(&n).map(|e| e.record.clone()))
                .collect();
            let allocs: Vec<AllocRecord> = std::mem::take(&mut st.dirty_allocs)
                .into_iter()
                .filter_map(|id| st.allocs.get(&id).cloned())
                .collect();
            (jobs, allocs, std::mem::take(&mut st.deleted_allocs))
        };
        let mut saved = 0;
        let mut result = Ok(());
        for j in &jobs {
            if let Err(e) = self.store.put_job(j) {
                result = Err(e);
                break;
            }
            saved += 1;
        }
        if result.is_ok() && (!allocs.is_empty() || !deleted.is_empty()) {
            result = self.store.save_allocations(&allocs, &deleted);
            if result.is_ok() {
                return Ok(());
            }
        }
        if result.is_err() {
            // Not on disk: written again at the next persist, so that nothing the
            // controller decided is lost once the store writes again.
            let mut st = self.lock();
            st.dirty_jobs
                .extend(jobs.into_iter().skip(saved).map(|j| j.name));
            st.dirty_allocs.extend(allocs.into_iter().map(|a| a.id));
            let mut again = deleted;
            again.append(&mut st.deleted_allocs);
            st.deleted_allocs = again;
        }
        result
    }

    /// Recomputes every node's desired set and sends those that changed.
    /// Gives the manager the checkpoint index used for node-loss recovery (once).
    pub fn set_checkpoints(&self, index: Arc<dyn CheckpointIndex>) {
        let _ = self.checkpoints.set(index);
    }

    /// Gives the workload manager the secrets that jobs reference (once, at
    /// start).
    pub fn set_secrets(&self, secrets: Arc<Secrets>) {
        let _ = self.secrets.set(secrets);
    }

    /// The secret versions a new version of `job` runs: the latest version of
    /// each secret it references. Refused when a secret or key does not exist, or
    /// when the `imagePullSecret` is not a registry secret.
    /// The job's virtual machine with its `VMTemplate` resolved (`None` when it
    /// names no template): refused when the template does not exist or the
    /// job's resources cannot hold the machine.
    fn vm_pin(
        &self,
        file: &str,
        job: &Job,
    ) -> Result<Option<novacron_common::wire::VmSpec>, WorkloadError> {
        let Some(task) = &job.spec.task.vm else {
            return Ok(None);
        };
        let Some(name) = &task.template else {
            return Ok(None);
        };
        let templates = super::vms::templates(self.store.as_ref())?;
        let Some(template) = templates.iter().find(|t| &t.name == name) else {
            let known: Vec<&str> = templates.iter().map(|t| t.name.as_str()).collect();
            return Err(WorkloadError::Invalid(format!(
                "{file}: spec.task.vm.template: no VMTemplate named {name:?}; expected one of [{}] \
                 (apply one with novacron apply -f)",
                known.join(", ")
            )));
        };
        let vm = novacron_common::manifest::vm::resolve(task, Some(&template.spec));
        if let Some(why) =
            novacron_common::manifest::vm::resources_problem(&vm, &job.spec.resources)
        {
            return Err(WorkloadError::Invalid(format!(
                "{file}: spec.resources.memory: {why} (the guest's memory comes from VMTemplate {name})"
            )));
        }
        if let Some(why) = novacron_common::manifest::vm::gpus_problem(
            template.spec.gpus.as_ref(),
            &job.spec.resources,
        ) {
            return Err(WorkloadError::Invalid(format!(
                "{file}: spec.resources.gpus: {why} (VMTemplate {name})"
            )));
        }
        if let Some(why) = novacron_common::manifest::vm::network_problem(&vm) {
            return Err(WorkloadError::Invalid(format!(
                "{file}: spec.task.vm.network: {why} (the limit comes from VMTemplate {name})"
            )));
        }
        Ok(Some(vm))
    }

    fn secret_pins(&self, file: &str, job: &Job) -> Result<BTreeMap<String, u64>, WorkloadError> {
        let names = job.secret_names();
        if names.is_empty() {
            return Ok(BTreeMap::new());
        }
        let Some(secrets) = self.secrets.get() else {
            return Err(WorkloadError::Invalid(format!(
                "{file}: this controller keeps no secrets; the job cannot use any"
            )));
        };
        let missing = |at: String, name: &str| {
            WorkloadError::Invalid(format!(
                "{file}: {at}: secret {name:?} does not exist; create it first with `novacron secret set {name} KEY=VALUE` or a kind: Secret manifest"
            ))
        };
        let mut pins = BTreeMap::new();
        let t = &job.spec.task;
        for (i, r) in t.secrets.iter().enumerate() {
            let at = format!("spec.task.secrets[{i}]");
            let (version, _, keys) = secrets
                .latest(&r.secret)
                .ok_or_else(|| missing(format!("{at}.secret"), &r.secret))?;
            if !keys.contains(&r.key) {
                return Err(WorkloadError::Invalid(format!(
                    "{file}: {at}.key: secret {:?} has no key {:?}; its keys are {}",
                    r.secret,
                    r.key,
                    keys.join(", ")
                )));
            }
            pins.insert(r.secret.clone(), version);
        }
        if let Some(name) = &t.image_pull_secret {
            let at = "spec.task.imagePullSecret".to_string();
            let (version, kind, _) = secrets
                .latest(name)
                .ok_or_else(|| missing(at.clone(), name))?;
            if kind != SecretType::Registry {
                return Err(WorkloadError::Invalid(format!(
                    "{file}: {at}: secret {name:?} is an {kind} secret; expected a registry secret (type: registry, with username and password)"
                )));
            }
            pins.insert(name.clone(), version);
        }
        Ok(pins)
    }

    /// The jobs whose current or last stable version uses secret `name`, by name.
    pub fn secret_users(&self, name: &str) -> Vec<(String, u64)> {
        let st = self.lock();
        st.jobs
            .values()
            .filter_map(|e| {
                let r = &e.record;
                [Some(r.current), r.stable]
                    .into_iter()
                    .flatten()
                    .filter_map(|n| r.versions.iter().find(|v| v.version == n))
                    .find_map(|v| v.secrets.get(name))
                    .map(|v| (r.name.clone(), *v))
            })
            .collect()
    }

    /// The versions of secret `name` that some kept job version runs.
    pub fn secret_versions_in_use(&self, name: &str) -> BTreeSet<u64> {
        let st = self.lock();
        st.jobs
            .values()
            .flat_map(|e| e.record.versions.iter())
            .filter_map(|v| v.secrets.get(name).copied())
            .collect()
    }

    /// Whether a job uses secret `name` as its image pull secret.
    pub fn secret_used_for_pulls(&self, name: &str) -> bool {
        let st = self.lock();
        st.jobs.values().any(|e| {
            e.current()
                .is_some_and(|j| j.spec.task.image_pull_secret.as_deref() == Some(name))
        })
    }

    /// Secret `name` has a new version: every running job whose current version
    /// runs an older one gets a new version with the same manifest and the new
    /// secret version, which rolls out like any change (health-gated, reverted on
    /// failure). Stopped and completed jobs are left alone. Returns each job and
    /// its new version.
    pub fn secret_changed(
        &self,
        name: &str,
        version: u64,
        by: &str,
        now: SystemTime,
    ) -> Result<Vec<(String, u64)>, WorkloadError> {
        let mut st = self.lock();
        let mut rolled = Vec::new();
        let mut records = Vec::new();
        for e in st.jobs.values() {
            let r = &e.record;
            if r.stopped || r.status == "complete" {
                continue;
            }
            let Some(current) = r.versions.iter().find(|v| v.version == r.current) else {
                continue;
            };
            if current.secrets.get(name).is_none_or(|v| *v == version) {
                continue;
            }
            let Some(job) = e.current() else {
                continue;
            };
            let mut pins = current.secrets.clone();
            pins.insert(name.to_string(), version);
            let mut record = r.clone();
            let new_version = record.versions.last().map_or(1, |v| v.version + 1);
            push_record_version(
                &mut record,
                &NewVersion {
                    version: new_version,
                    source: &current.source,
                    file: &current.file,
                    hash: &current.spec_hash,
                    by,
                    at_ms: unix_ms(now),
                    secrets: &pins,
                    image_digest: current.image_digest.as_deref(),
                    vm: current.vm.as_ref(),
                },
            );
            record.status = "running".into();
            record.message =
                format!("version {new_version}: secret {name} version {version}, set by {by}");
            records.push((record, job.clone()));
        }
        let mut events = Vec::new();
        for (record, job) in records {
            self.store.put_job(&record)?;
            let version = record.current;
            let jname = record.name.clone();
            events.push(
                NewEvent::new(kind::JOB_CHANGED, by, record.message.clone())
                    .job(&jname)
                    .detail("version", version)
                    .detail("secret", name),
            );
            if let Some(entry) = st.jobs.get_mut(&jname) {
                entry.parsed.insert(version, job);
                entry
                    .parsed
                    .retain(|v, _| record.versions.iter().any(|k| k.version == *v));
                entry.record = record;
            }
            rolled.push((jname, version));
        }
        drop(st);
        if !rolled.is_empty() {
            let _ = self.events.record_all(events, now);
            self.wake.notify_one();
        }
        Ok(rolled)
    }

    /// The job's checkpoint policy for an allocation (of the version it runs).
    pub fn checkpoint_policy(
        &self,
        alloc: &str,
    ) -> Result<Option<novacron_common::manifest::CheckpointPolicy>, WorkloadError> {
        let st = self.lock();
        let a = st
            .allocs
            .get(alloc)
            .ok_or_else(|| WorkloadError::UnknownAlloc(alloc.to_string()))?;
        Ok(st
            .jobs
            .get(&a.job)
            .and_then(|e| e.parsed.get(&a.version))
            .and_then(|j| j.spec.checkpoint.clone()))
    }

    /// The network of the VM `alloc` runs; `None` for a container.
    pub fn vm_network(&self, alloc: &str) -> Option<novacron_common::wire::VmNetwork> {
        let st = self.lock();
        st.allocs
            .get(alloc)
            .and_then(|a| st.jobs.get(&a.job)?.parsed.get(&a.version))
            .and_then(|j| j.spec.task.vm.as_ref())
            .map(|vm| vm.network.unwrap_or_default())
    }

    /// Whether the allocation `alloc` runs a virtual machine.
    pub fn is_vm(&self, alloc: &str) -> bool {
        self.vm_network(alloc).is_some()
    }

    /// Whether the job of `alloc` has a health check (a migration then waits for
    /// it to pass on the target before switching over).
    pub fn has_health_check(&self, alloc: &str) -> bool {
        let st = self.lock();
        st.allocs
            .get(alloc)
            .and_then(|a| st.jobs.get(&a.job)?.parsed.get(&a.version))
            .is_some_and(|j| j.spec.health.is_some())
    }

    /// Moves a live allocation to `node`, to start there from `restore` (migration,
    /// and its rollback). Both nodes get new desired sets at once.
    pub fn relocate(
        &self,
        id: &str,
        node: &str,
        restore: Option<RestoreFrom>,
        why: &str,
    ) -> Result<(), WorkloadError> {
        let now = SystemTime::now();
        let nodes = self.registry.placement_nodes(Instant::now());
        let mut st = self.lock();
        let ports = relocated_ports(&st, &nodes, id, node);
        let a = st
            .allocs
            .get_mut(id)
            .ok_or_else(|| WorkloadError::UnknownAlloc(id.to_string()))?;
        if !a.desired_run || a.state.is_terminal() {
            return Err(WorkloadError::Invalid(format!(
                "allocation {id} is {} and no longer wanted; only a live allocation moves",
                a.state
            )));
        }
        info!(alloc = %id, from = %a.node, to = %node, %why, "relocating allocation");
        let mut moved = a.clone();
        moved.node = node.to_string();
        if let Some(ports) = ports {
            moved.ports = ports;
        }
        let moving = restore.is_some();
        moved.restore = restore;
        moved.state = AllocState::Pending;
        moved.published.clear();
        moved.address = None;
        moved.healthy = None;
        moved.healthy_since_unix_ms = None;
        moved.message = why.to_string();
        moved.updated_unix_ms = unix_ms(now);
        // On disk first: the move exists for the nodes only once it does.
        self.store
            .save_allocations(std::slice::from_ref(&moved), &[])?;
        *a = moved;
        if moving {
            st.migrating.insert(id.to_string(), MoveReport::default());
        }
        drop(st);
        self.publish();
        Ok(())
    }

    /// Where a migration of `alloc` goes: `to` when given (checked), else the
    /// scheduler's choice among the ready nodes other than its own that pass
    /// `eligible` (for example: can restore live checkpoints; `Err` says why
    /// not). No allocation is preempted for a migration.
    pub fn migration_target(
        &self,
        alloc: &str,
        to: Option<&str>,
        eligible: impl Fn(&str) -> Result<(), String>,
    ) -> Result<String, WorkloadError> {
        let nodes = self.registry.placement_nodes(Instant::now());
        let st = self.lock();
        let a = st
            .allocs
            .get(alloc)
            .ok_or_else(|| WorkloadError::UnknownAlloc(alloc.to_string()))?;
        let job = st
            .jobs
            .get(&a.job)
            .and_then(|e| e.parsed.get(&a.version))
            .ok_or_else(|| WorkloadError::Invalid(format!("job {} of {alloc} is gone", a.job)))?;
        if let Some(to) = to {
            if to == a.node {
                return Err(WorkloadError::Invalid(format!(
                    "allocation {alloc} already runs on {to}; name another node with --to"
                )));
            }
            if !nodes.iter().any(|n| n.name == to) {
                return Err(WorkloadError::Invalid(format!(
                    "node {to:?} is not enrolled; `novacron node list` shows the nodes"
                )));
            }
            if let Err(why) = eligible(to) {
                return Err(WorkloadError::Invalid(format!("node {to} {why}")));
            }
        }
        let source = a.node.clone();
        let eligible_nodes: Vec<PlacementNode> = nodes
            .into_iter()
            .map(|mut n| {
                if n.name == source || eligible(&n.name).is_err() {
                    n.cordoned = true;
                }
                n
            })
            .collect();
        let mut snapshot = scheduling_snapshot(
            &Jobs::new(&st.jobs),
            &st.allocs,
            &eligible_nodes,
            &BTreeSet::new(),
        )
        .map_err(|e| WorkloadError::Invalid(format!("cannot plan the migration: {e}")))?;
        snapshot.remove(alloc);
        let mut request = scheduler::Request::from_spec(&job.name, &job.spec, 1);
        request.priority = 0;
        request.node = to.map(str::to_string);
        let outcome = scheduler::schedule(&snapshot, &request);
        match outcome.assignments.first() {
            Some(p) if outcome.preemptions.is_empty() => Ok(p.node.clone()),
            _ => Err(WorkloadError::Invalid(format!(
                "no node can take allocation {alloc} of job {} now: {}",
                a.job, outcome.explanation
            ))),
        }
    }

    /// What the new node of a moving allocation reported since the move, in typed
    /// fields; `None` when it is not moving (see [`Workloads::relocate`]).
    pub fn move_report(&self, id: &str) -> Option<MoveReport> {
        self.lock().migrating.get(id).copied()
    }

    /// Forgets the checkpoint an allocation started from, once it runs (or its
    /// migration ended).
    pub fn clear_restore(&self, id: &str) -> Result<(), WorkloadError> {
        let mut st = self.lock();
        st.migrating.remove(id);
        if let Some(a) = st.allocs.get_mut(id)
            && a.restore.take().is_some()
        {
            st.dirty_allocs.insert(id.to_string());
            drop(st);
            self.persist()?;
        }
        Ok(())
    }

    fn publish(&self) {
        let labels = self.prepull_labels();
        let mut st = self.lock();
        let secrets = self.secrets.get().map(|s| &**s);
        let mut per_node = desired_specs(&st, None, secrets);
        let mut prepull: BTreeMap<String, Vec<PrePull>> = labels
            .iter()
            .flatten()
            .filter(|(name, _)| st.nodes.contains_key(*name))
            .map(|(name, l)| (name.clone(), prepull_for(&st, l, secrets)))
            .collect();
        let epoch = st.link_epoch;
        for (name, desired) in st.nodes.iter_mut() {
            send_if_changed(
                Some(desired),
                epoch,
                per_node.remove(name).unwrap_or_default(),
                prepull.remove(name).unwrap_or_default(),
            );
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation leaves the state consistent at each statement.
        novacron_common::sync::lock(&self.state)
    }
}

/// The allocations each node should run (only `only`'s when given).
/// `count` replicas of `job`'s `version` as a demand for the node pools, with
/// what one replica needs; `None` for a stopped or unknown job.
fn demand(
    st: &State,
    job: &str,
    version: u64,
    count: u32,
) -> Option<novacron_common::pools::Demand> {
    let e = st.jobs.get(job)?;
    if e.record.stopped {
        return None;
    }
    let spec = &e.parsed.get(&version)?.spec;
    Some(novacron_common::pools::Demand {
        job: job.to_string(),
        count,
        cpu_millis: spec.resources.cpu.0,
        memory_bytes: spec.resources.memory.0,
        gpus: spec.resources.gpus.as_ref().map_or(0, |g| g.count),
        // The scheduler's own constraints (a VM only where QEMU runs), so a pool
        // grows only for replicas its nodes could hold.
        constraints: novacron_common::scheduler::Request::from_spec(job, spec, count)
            .placement
            .constraints,
        // The pool manager steers by the pricing catalog's mix.
        prefer: None,
        headroom: false,
    })
}

fn desired_specs(
    st: &State,
    only: Option<&str>,
    secrets: Option<&Secrets>,
) -> BTreeMap<String, Vec<AllocationSpec>> {
    let mut per_node: BTreeMap<String, Vec<AllocationSpec>> = BTreeMap::new();
    for a in st
        .allocs
        .values()
        .filter(|a| a.desired_run && !a.state.is_terminal() && only.is_none_or(|n| a.node == n))
    {
        let Some(entry) = st.jobs.get(&a.job) else {
            continue;
        };
        let Some(job) = entry.parsed.get(&a.version) else {
            continue;
        };
        let mut task = job.task_spec();
        task.gpu_uuids = a.gpu_uuids.clone();
        if let Some(v) = entry
            .record
            .versions
            .iter()
            .find(|v| v.version == a.version)
        {
            task.image_digest = v.image_digest.clone();
            if v.vm.is_some() {
                task.vm = v.vm.clone();
            }
            if !v.secrets.is_empty() {
                deliver_secrets(&mut task, job, &v.secrets, secrets, &a.id);
            }
        }
        let task_is_vm = task.vm.is_some();
        for mapping in &mut task.ports {
            if let Some(p) = a.ports.iter().find(|p| p.name == mapping.name) {
                mapping.host_port = Some(p.host_port);
            }
        }
        per_node
            .entry(a.node.clone())
            .or_default()
            .push(AllocationSpec {
                id: a.id.clone(),
                job: a.job.clone(),
                job_version: a.version,
                task,
                restore: a.restore.clone(),
                suspended: entry.record.suspended && task_is_vm,
            });
    }
    per_node
}

/// Records `digest` as what version `version` of `job` runs, when it has no
/// digest yet and follows no moving tag (its image is a tag and its pull policy
/// is not `always`); the event that says so.
fn pin_digest(
    jobs: &mut BTreeMap<String, JobEntry>,
    job: &str,
    version: u64,
    digest: &str,
) -> Option<NewEvent> {
    let entry = jobs.get_mut(job)?;
    let task = &entry.parsed.get(&version)?.spec.task;
    if task.image.contains("@sha256:")
        || task.pull_policy == Some(novacron_common::wire::PullPolicy::Always)
        || !digest.contains("@sha256:")
    {
        return None;
    }
    let image = task.image.clone();
    let v = entry
        .record
        .versions
        .iter_mut()
        .find(|v| v.version == version)?;
    if v.image_digest.is_some() {
        return None;
    }
    v.image_digest = Some(digest.to_owned());
    Some(
        NewEvent::new(
            kind::JOB_CHANGED,
            CONTROLLER,
            format!("job {job} version {version}: image {image} is {digest}; every new replica and migration of this version runs it"),
        )
        .job(job)
        .detail("version", version)
        .detail("image_digest", digest),
    )
}

/// Fills `task`'s secret values and registry credentials from the versions
/// `pins` names. A value that is not there (a version that did not open with this
/// controller's key) is left out, and logged by name only.
fn deliver_secrets(
    task: &mut novacron_common::wire::TaskSpec,
    job: &Job,
    pins: &BTreeMap<String, u64>,
    secrets: Option<&Secrets>,
    alloc: &str,
) {
    use novacron_common::wire::{RegistryAuth, SecretBytes, SecretTarget, SecretUse};
    let values = |name: &str| {
        let version = *pins.get(name)?;
        Some((version, secrets?.values(name, version)?))
    };
    let t = &job.spec.task;
    for r in &t.secrets {
        let value = values(&r.secret).and_then(|(v, d)| Some((v, d.0.get(&r.key)?.clone())));
        let (Some((version, value)), Some(target)) = (
            value,
            r.env
                .clone()
                .map(SecretTarget::Env)
                .or_else(|| r.file.clone().map(SecretTarget::File)),
        ) else {
            warn!(%alloc, secret = %r.secret, key = %r.key, "a secret value the job uses is not available; it is left out");
            continue;
        };
        task.secrets.push(SecretUse {
            secret: r.secret.clone(),
            version,
            key: r.key.clone(),
            target,
            value: SecretBytes(value.into_bytes()),
        });
    }
    if let Some(name) = &t.image_pull_secret {
        match values(name) {
            Some((version, d)) => {
                task.registry_auth = Some(RegistryAuth {
                    secret: name.clone(),
                    version,
                    server: d.0.get("server").cloned(),
                    username: SecretBytes(
                        d.0.get("username")
                            .cloned()
                            .unwrap_or_default()
                            .into_bytes(),
                    ),
                    password: SecretBytes(
                        d.0.get("password")
                            .cloned()
                            .unwrap_or_default()
                            .into_bytes(),
                    ),
                })
            }
            None => {
                warn!(%alloc, secret = %name, "the job's image pull secret is not available; pulling without credentials")
            }
        }
    }
}

/// The record of a job not submitted yet.
/// What applying a manifest makes of a job's record.
enum Next {
    /// Nothing: the current version has the same spec and the job runs.
    Unchanged(u64),
    /// The record with the new version current, and `created` or `updated`.
    Record(JobRecord, &'static str),
}

/// What a version pins when it is submitted: the secret versions it runs and
/// its virtual machine with the template resolved.
#[derive(Clone, Copy)]
struct Pinned<'a> {
    secrets: &'a BTreeMap<String, u64>,
    vm: Option<&'a novacron_common::wire::VmSpec>,
}

/// The job's record after applying `job` (from `text` in `file`, by `by`) to
/// `entry`, the job as it is (`None`: new).
fn next_record(
    entry: Option<&JobEntry>,
    job: &Job,
    file: &str,
    text: &str,
    by: &str,
    now: SystemTime,
    pinned: Pinned<'_>,
) -> Next {
    let Pinned { secrets, vm } = pinned;
    let hash = job.version_hash();
    let (mut record, outcome) = match entry {
        Some(entry) => {
            let same = entry
                .record
                .versions
                .iter()
                .find(|v| v.version == entry.record.current)
                .is_some_and(|v| {
                    v.spec_hash == hash && v.secrets == *secrets && v.vm.as_ref() == vm
                });
            if same && !entry.record.stopped {
                return Next::Unchanged(entry.record.current);
            }
            (entry.record.clone(), "updated")
        }
        None => (new_job_record(&job.name), "created"),
    };
    let version = record.versions.last().map_or(1, |v| v.version + 1);
    let new = NewVersion {
        version,
        source: text,
        file,
        hash: &hash,
        by,
        at_ms: unix_ms(now),
        secrets,
        image_digest: None,
        vm,
    };
    push_record_version(&mut record, &new);
    record.stopped = false;
    record.status = "running".into();
    record.message = if outcome == "created" {
        format!("submitted by {by}")
    } else {
        format!("version {version} submitted by {by}")
    };
    Next::Record(record, outcome)
}

fn new_job_record(name: &str) -> JobRecord {
    JobRecord {
        name: name.to_string(),
        versions: vec![],
        current: 1,
        stable: None,
        stopped: false,
        status: "running".into(),
        message: String::new(),
        replicas_override: None,
        suspended: false,
    }
}

/// An allocation of job `api` version 1 on `node`, wanted, for tests.
/// The published addresses of an agent's status, as kept (at most
/// [`MAX_PUBLISHED`](novacron_common::wire::MAX_PUBLISHED), in the agent's order).
fn published(status: &novacron_common::wire::AllocationStatus) -> Vec<PublishedAddress> {
    status
        .published
        .iter()
        .take(novacron_common::wire::MAX_PUBLISHED)
        .map(PublishedAddress::from)
        .collect()
}

#[cfg(test)]
pub(crate) fn test_alloc(id: &str, node: &str, state: AllocState) -> AllocRecord {
    AllocRecord {
        id: id.into(),
        job: "api".into(),
        version: 1,
        node: node.into(),
        desired_run: true,
        state,
        healthy: None,
        healthy_since_unix_ms: None,
        created_unix_ms: 0,
        updated_unix_ms: 0,
        restarts: 0,
        exit_code: None,
        message: String::new(),
        cpu_millis: 100,
        memory_bytes: 32 << 20,
        gpu_uuids: vec![],
        priority: 50,
        disk_bytes: 0,
        ports: vec![],
        restore: None,
        failure: None,
        published: vec![],
        suspended: false,
        address: None,
    }
}

/// Marks an allocation no longer wanted, with why, and returns it (`None` when
/// it is gone).
fn unwant<'a>(
    allocs: &'a mut BTreeMap<String, AllocRecord>,
    id: &str,
    message: String,
    now_ms: u64,
) -> Option<&'a mut AllocRecord> {
    let a = allocs.get_mut(id)?;
    a.desired_run = false;
    a.message = message;
    a.updated_unix_ms = now_ms;
    Some(a)
}

/// Logs a job-level change once it is on disk.
fn log_job_change(change: &JobChange) {
    match change {
        JobChange::Stable { .. } => info!(?change, "version rolled out healthy"),
        JobChange::Complete { .. } => info!(?change, "batch job complete"),
        JobChange::Revert { .. } => warn!(?change, "rollout failed: auto-revert"),
        JobChange::Failing { .. } => warn!(?change, "job failing"),
    }
}

/// Sends `specs` to the node's channel with a new generation if they changed.
/// The images a node with `labels` pulls ahead: those of the running jobs that
/// ask for it and whose constraints the node meets (each image once, at most
/// [`MAX_PREPULL`](novacron_common::wire::MAX_PREPULL)).
fn prepull_for(
    st: &State,
    labels: &BTreeMap<String, String>,
    secrets: Option<&Secrets>,
) -> Vec<PrePull> {
    let mut out: Vec<PrePull> = Vec::new();
    for e in st.jobs.values().filter(|e| !e.record.stopped) {
        let Some(job) = e.current() else { continue };
        if !job.spec.pre_pull
            || !job
                .spec
                .placement
                .constraints
                .iter()
                .all(|c| c.operator.matches(labels, &c.key, &c.values))
        {
            continue;
        }
        let version = e
            .record
            .versions
            .iter()
            .find(|v| v.version == e.record.current);
        let image = version
            .and_then(|v| v.image_digest.clone())
            .unwrap_or_else(|| job.spec.task.image.clone());
        if out.iter().any(|p| p.image == image) {
            continue;
        }
        let mut task = job.task_spec();
        if let Some(v) = version.filter(|v| !v.secrets.is_empty()) {
            deliver_secrets(&mut task, job, &v.secrets, secrets, &e.record.name);
        }
        out.push(PrePull {
            image,
            registry_auth: task.registry_auth,
        });
        if out.len() == novacron_common::wire::MAX_PREPULL {
            break;
        }
    }
    out
}

fn send_if_changed(
    desired: Option<&mut NodeDesired>,
    epoch: u64,
    specs: Vec<AllocationSpec>,
    prepull: Vec<PrePull>,
) {
    let Some(desired) = desired else { return };
    // What can change for one allocation: its version, the checkpoint it starts
    // from, the image digest its version recorded since it was placed, and
    // whether its VM is suspended.
    let key: Vec<DesiredKey> = specs
        .iter()
        .map(|s| {
            (
                s.id.clone(),
                s.job_version,
                s.restore.as_ref().map(|r| r.digest.clone()),
                s.task.image_digest.clone(),
                s.suspended,
            )
        })
        .collect();
    let prepull_key: Vec<String> = prepull.iter().map(|p| p.image.clone()).collect();
    if key == desired.key && prepull_key == desired.prepull && desired.generation > 0 {
        return;
    }
    desired.generation += 1;
    desired.key = key;
    desired.prepull = prepull_key;
    // send_replace, not send: with no agent connected (no receiver) `send` drops
    // the value, and a reconnecting agent would get a stale desired set.
    desired.tx.send_replace(Arc::new(DesiredAllocations {
        epoch,
        generation: desired.generation,
        allocations: specs,
        prepull,
    }));
}

/// The host ports allocation `id` gets on `node`, where it moves: its static
/// ports, and free ports of the node's dynamic range. `None` (keep its ports)
/// when it publishes none, or when they cannot be had (the migration target was
/// checked by the scheduler, so only a race gets there).
fn relocated_ports(
    st: &State,
    nodes: &[PlacementNode],
    id: &str,
    node: &str,
) -> Option<Vec<AllocPort>> {
    let a = st.allocs.get(id)?;
    let job = st.jobs.get(&a.job)?.parsed.get(&a.version)?;
    if job.spec.task.ports.is_empty() {
        return None;
    }
    let mut snapshot =
        scheduling_snapshot(&Jobs::new(&st.jobs), &st.allocs, nodes, &BTreeSet::new()).ok()?;
    snapshot.remove(id);
    let request = scheduler::Request::from_spec(&job.name, &job.spec, 1);
    match snapshot.assign_ports(node, &request) {
        Some(assigned) => Some(alloc_ports(&job.task_spec(), &assigned)),
        None => {
            warn!(alloc = %id, %node, "the allocation's host ports are taken on its new node; keeping its ports");
            None
        }
    }
}

/// The replicas wanted: the override when set, else the current manifest's.
fn effective_replicas(e: &JobEntry) -> u32 {
    match &e.record.replicas_override {
        Some(o) => o.replicas,
        None => e.current().map_or(0, |j| j.spec.replicas),
    }
}

fn summary(
    e: &JobEntry,
    allocs: &BTreeMap<String, AllocRecord>,
    nodes: &[reconcile::NodeView],
) -> JobSummary {
    let job = e.current();
    // A system job wants one replica per eligible node, whatever its manifest's
    // `replicas` says.
    let replicas = match job {
        Some(j) if j.spec.job_type == JobType::System => {
            reconcile::system_replicas(&j.spec.placement, nodes)
        }
        _ => effective_replicas(e),
    };
    let mine = allocs
        .values()
        .filter(|a| a.job == e.record.name && a.desired_run);
    let (mut running, mut healthy) = (0, 0);
    for a in mine {
        if a.state == AllocState::Running {
            running += 1;
            if a.healthy_since_unix_ms.is_some() {
                healthy += 1;
            }
        }
    }
    let current = e
        .record
        .versions
        .iter()
        .find(|v| v.version == e.record.current);
    JobSummary {
        name: e.record.name.clone(),
        job_type: e.current().map(|j| j.spec.job_type).unwrap_or_default(),
        version: e.record.current,
        stable_version: e.record.stable,
        replicas,
        manifest_replicas: e.current().map_or(0, |j| j.spec.replicas),
        scaled_by: e.record.replicas_override.as_ref().map(|o| o.by.clone()),
        scale_reason: e
            .record
            .replicas_override
            .as_ref()
            .map(|o| o.reason.clone()),
        running,
        healthy,
        status: e.record.status.clone(),
        message: e.record.message.clone(),
        submitted_at_unix_ms: current.map_or(0, |v| v.submitted_at_unix_ms),
        submitted_by: current.map(|v| v.by.clone()).unwrap_or_default(),
        vm: current
            .and_then(|v| v.vm.clone())
            .or_else(|| job.and_then(|j| j.task_spec().vm)),
        suspended: e.record.suspended,
    }
}

#[cfg(test)]
mod tests {
    use novacron_common::fleet::NodeStatus;

    use super::plan::{held_ports, job_view, lifecycle_view};
    use super::*;

    #[allow(clippy::too_many_arguments)]
    fn push_version(
        entry: &mut JobEntry,
        version: u64,
        source: &str,
        file: &str,
        hash: &str,
        by: &str,
        at: SystemTime,
        job: Job,
    ) {
        let new = NewVersion {
            version,
            source,
            file,
            hash,
            by,
            at_ms: unix_ms(at),
            secrets: &BTreeMap::new(),
            image_digest: None,
            vm: None,
        };
        plan::push_version(entry, &new, job);
    }

    fn entry(replicas: u32, over: Option<u32>) -> JobEntry {
        let text = format!(
            "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {{name: api}}\nspec:\n  type: service\n  replicas: {replicas}\n  task: {{image: busybox:1}}\n  resources: {{cpu: 100m, memory: 32Mi}}\n"
        );
        let job = parse_job("api.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
        let mut e = JobEntry {
            record: JobRecord {
                replicas_override: over.map(|replicas| ReplicaOverride {
                    replicas,
                    by: "autoscaler (policy p)".into(),
                    reason: "api 2 → 5: cpu 91% over 5m, target 75%".into(),
                    at_unix_ms: 1,
                }),
                ..new_job_record("api")
            },
            parsed: BTreeMap::new(),
        };
        push_version(
            &mut e,
            1,
            &text,
            "api.yaml",
            "h",
            "me",
            SystemTime::UNIX_EPOCH,
            job,
        );
        e
    }

    #[test]
    fn reconcile_sees_the_override_instead_of_the_manifest_replicas() {
        let plain = job_view(&entry(2, None)).expect("view");
        assert_eq!(plain.replicas, 2);
        let scaled = job_view(&entry(2, Some(5))).expect("view");
        assert_eq!(scaled.replicas, 5);
        let allocs = BTreeMap::new();
        let s = summary(&entry(2, Some(5)), &allocs, &[]);
        assert_eq!((s.replicas, s.manifest_replicas), (5, 2));
        assert_eq!(s.scaled_by.as_deref(), Some("autoscaler (policy p)"));
        let s = summary(&entry(2, None), &allocs, &[]);
        assert_eq!((s.replicas, s.manifest_replicas, s.scaled_by), (2, 2, None));
    }

    /// Regression: a system job on two nodes showed `1 wanted, 2 running` (its
    /// manifest's default `replicas`).
    #[test]
    fn a_system_job_wants_one_replica_per_eligible_node() {
        let text = "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {name: sidecar}\nspec:\n  type: system\n  task: {image: busybox:1}\n  resources: {cpu: 100m, memory: 32Mi}\n  placement:\n    constraints: [{key: zone, operator: In, values: [a]}]\n";
        let job = parse_job("sidecar.yaml", text).unwrap_or_else(|e| panic!("{e}"));
        let mut e = entry(1, None);
        e.record.name = "sidecar".into();
        push_version(
            &mut e,
            2,
            text,
            "sidecar.yaml",
            "h2",
            "me",
            SystemTime::UNIX_EPOCH,
            job,
        );
        let node = |name: &str, zone: &str, status: NodeStatus| reconcile::NodeView {
            name: name.into(),
            status,
            labels: [("zone".to_string(), zone.to_string())].into(),
        };
        let nodes = [
            node("n1", "a", NodeStatus::Ready),
            node("n2", "a", NodeStatus::Ready),
            node("n3", "b", NodeStatus::Ready),
            node("n4", "a", NodeStatus::Down),
        ];
        let s = summary(&e, &BTreeMap::new(), &nodes);
        assert_eq!((s.replicas, s.manifest_replicas), (2, 1));
        assert_eq!(summary(&e, &BTreeMap::new(), &nodes[2..]).replicas, 0);
    }

    /// An allocation stored before host ports were scheduled still holds its
    /// static ports in the scheduler's view; one placed since holds what it got.
    #[test]
    fn allocations_hold_their_recorded_or_static_host_ports() {
        let text = "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {name: api}\nspec:\n  task:\n    image: busybox:1\n    ports: [{name: http, containerPort: 80, hostPort: 8080}, {name: metrics, containerPort: 9100}]\n  resources: {cpu: 100m, memory: 32Mi}\n";
        let job = parse_job("api.yaml", text).unwrap_or_else(|e| panic!("{e}"));
        let mut e = entry(1, None);
        push_version(
            &mut e,
            2,
            text,
            "api.yaml",
            "h2",
            "me",
            SystemTime::UNIX_EPOCH,
            job,
        );
        let mut st = State::default();
        st.jobs.insert("api".into(), e);
        let mut a = AllocRecord {
            version: 2,
            ..test_alloc("api-1", "n1", AllocState::Running)
        };
        assert_eq!(
            held_ports(&Jobs::new(&st.jobs), &a),
            [scheduler::HostPort::tcp(8080)]
        );
        let task = st.jobs["api"].parsed[&2].task_spec();
        a.ports = alloc_ports(
            &task,
            &[
                scheduler::AssignedPort {
                    name: "http".into(),
                    host_port: 8080,
                    udp: false,
                },
                scheduler::AssignedPort {
                    name: "metrics".into(),
                    host_port: 20000,
                    udp: false,
                },
            ],
        );
        assert_eq!(a.ports[1].container_port, 9100);
        assert_eq!(
            held_ports(&Jobs::new(&st.jobs), &a),
            [
                scheduler::HostPort::tcp(8080),
                scheduler::HostPort::tcp(20000)
            ]
        );
    }

    #[test]
    fn a_new_version_keeps_the_override() {
        let mut e = entry(2, Some(5));
        let text = "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {name: api}\nspec:\n  type: service\n  replicas: 3\n  task: {image: busybox:2}\n  resources: {cpu: 100m, memory: 32Mi}\n";
        let job = parse_job("api.yaml", text).unwrap_or_else(|e| panic!("{e}"));
        push_version(
            &mut e,
            2,
            text,
            "api.yaml",
            "h2",
            "me",
            SystemTime::UNIX_EPOCH,
            job,
        );
        let v = job_view(&e).expect("view");
        assert_eq!((v.version, v.replicas), (2, 5));
    }

    #[test]
    fn the_reconciler_sees_the_lifecycle_and_when_the_version_was_applied() {
        let mut e = entry(1, None);
        assert_eq!(lifecycle_view(&e), None);
        let text = "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {name: api}\nspec:\n  task: {image: busybox:2}\n  resources: {cpu: 100m, memory: 32Mi}\n  lifecycle:\n    schedule: {start: '0 8 * * 1-5', stop: '0 20 * * 1-5'}\n    maxRuntime: 8h\n";
        let job = parse_job("api.yaml", text).unwrap_or_else(|e| panic!("{e}"));
        let applied = SystemTime::UNIX_EPOCH + Duration::from_secs(5);
        push_version(&mut e, 2, text, "api.yaml", "h2", "me", applied, job);
        let v = lifecycle_view(&e).expect("a lifecycle");
        assert_eq!(v.since_ms, 5_000);
        assert_eq!(v.lifecycle.max_runtime, Some(Duration::from_secs(8 * 3600)));
        assert_eq!(
            v.lifecycle.schedule.map(|s| s.start),
            Some("0 8 * * 1-5".to_string())
        );
    }

    fn workloads_with(a: AllocRecord) -> Workloads {
        let store: Arc<dyn Store> = Arc::new(crate::store::MemoryStore::new());
        store.save_allocations(&[a], &[]).expect("save");
        let config = crate::registry::RegistryConfig::new(60, Duration::from_secs(3));
        let registry =
            Arc::new(Registry::load(store.clone(), config, Instant::now()).expect("registry"));
        let events = Arc::new(EventLog::open(store.clone(), 100).expect("events"));
        Workloads::load(store, registry, events).expect("workloads")
    }

    fn status(state: AllocState, restarts: u32, restore_failed: bool) -> AllocationReport {
        AllocationReport {
            generation: 1,
            allocations: vec![novacron_common::wire::AllocationStatus {
                id: "api-1".into(),
                state,
                healthy: None,
                restarts,
                exit_code: None,
                message: "words decide nothing".into(),
                image_digest: None,
                pull: None,
                suspended: false,
                failure: None,
                restore_failed,
                container_id: None,
                started_at_unix_ms: None,
                published: Vec::new(),
                address: None,
            }],
        }
    }

    /// A purge forgets only a stopped job, and only once its allocations have
    /// ended; then the job and its allocations are gone.
    #[test]
    fn a_job_is_purged_only_stopped_and_once_its_allocations_have_ended() {
        let w = workloads_with(test_alloc("api-1", "n1", AllocState::Running));
        let job = "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {name: api}\nspec:\n  task: {image: img:1}\n  resources: {cpu: 100m, memory: 32Mi}\n";
        w.apply("api.yaml", job, "me", SystemTime::now())
            .expect("apply");
        let conflict = |r: Result<(), WorkloadError>| match r {
            Err(WorkloadError::Conflict(m)) => m,
            other => panic!("expected a conflict, got {other:?}"),
        };
        let running = conflict(w.purge("api", "me"));
        assert!(running.contains("not stopped"), "{running}");
        w.stop("api", "me").expect("stop");
        let stopping = conflict(w.purge("api", "me"));
        assert!(stopping.contains("stopping (api-1)"), "{stopping}");
        w.report(
            "n1",
            &status(AllocState::Stopped, 0, false),
            SystemTime::now(),
        );
        w.purge("api", "me").expect("purge");
        assert!(matches!(w.job("api"), Err(WorkloadError::UnknownJob(_))));
        assert!(w.allocations(Some("api"), None).is_empty());
        assert!(matches!(
            w.purge("api", "me"),
            Err(WorkloadError::UnknownJob(_))
        ));
        assert!(w.store.jobs().expect("jobs").is_empty());
        assert!(w.store.allocations().expect("allocations").is_empty());
    }

    /// A VM job's replicas, as demands for the node pools, go only where QEMU
    /// runs, as the scheduler places them: a pool whose nodes cannot run VMs
    /// (a `qemu` pool's guests) is never grown for them.
    #[test]
    fn a_vm_job_s_demand_asks_for_a_node_that_runs_vms() {
        let w = workloads_with(test_alloc("api-1", "n1", AllocState::Running));
        let vm = "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {name: guest}\nspec:\n  task: {image: img:1, vm: {memory: 128Mi}}\n  resources: {cpu: 1, memory: 512Mi}\n  placement:\n    constraints: [{key: zone, operator: In, values: [a]}]\n";
        w.apply("vm.yaml", vm, "me", SystemTime::now())
            .expect("applied");
        let d = w.demand_of("guest", 1).expect("a demand");
        use novacron_common::manifest::Operator;
        let keys: Vec<(&str, Operator)> = d
            .constraints
            .iter()
            .map(|c| (c.key.as_str(), c.operator))
            .collect();
        assert_eq!(
            keys,
            [
                ("zone", Operator::In),
                (novacron_common::manifest::VM_NODE_LABEL, Operator::Exists)
            ]
        );
        let plain = "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {name: web}\nspec:\n  task: {image: img:1}\n  resources: {cpu: 1, memory: 512Mi}\n";
        w.apply("web.yaml", plain, "me", SystemTime::now())
            .expect("applied");
        assert!(
            w.demand_of("web", 1)
                .expect("a demand")
                .constraints
                .is_empty()
        );
    }

    /// A pull the node reports makes an event when it begins and one when it
    /// ends, from the typed field (the message is for people).
    #[test]
    fn a_pull_makes_an_event_when_it_begins_and_when_it_ends() {
        let w = workloads_with(test_alloc("api-1", "n1", AllocState::Starting));
        let mut report = status(AllocState::Starting, 0, false);
        report.allocations[0].pull = Some(novacron_common::wire::PullProgress {
            image: "img:1".into(),
            done_bytes: 1,
            total_bytes: 2,
        });
        w.report("n1", &report, SystemTime::now());
        report.allocations[0]
            .pull
            .as_mut()
            .expect("pull")
            .done_bytes = 2;
        w.report("n1", &report, SystemTime::now());
        let logged = |w: &Workloads| {
            let scan = w
                .events
                .read(&crate::state::events::EventQuery::default())
                .expect("events");
            scan.events
                .iter()
                .map(|e| e.message.clone())
                .collect::<Vec<_>>()
                .join("\n")
        };
        let events = logged(&w);
        assert_eq!(
            events.matches("is pulling image img:1 on n1").count(),
            1,
            "{events}"
        );
        w.report(
            "n1",
            &status(AllocState::Running, 0, false),
            SystemTime::now(),
        );
        let events = logged(&w);
        assert!(
            events.contains("api-1 pulled image img:1 on n1"),
            "{events}"
        );
        assert!(w.lock().pulling.is_empty());
    }

    /// The node's published addresses are kept with the allocation (at most
    /// `MAX_PUBLISHED`), replaced by each report, and dropped when it stops
    /// running or its node is lost.
    #[test]
    fn published_addresses_are_kept_from_the_reports() {
        use novacron_common::wire::{MAX_PUBLISHED, PublishedPort};
        let w = workloads_with(test_alloc("api-1", "n1", AllocState::Starting));
        let bound = |port: u16| PublishedPort {
            host_ip: "127.0.0.1".parse().expect("an address"),
            host_port: port,
            container_port: 8080,
            udp: false,
        };
        let mut report = status(AllocState::Running, 0, false);
        report.allocations[0].published = vec![bound(20001)];
        w.report("n1", &report, SystemTime::now());
        let a = w.allocation("api-1").expect("alloc");
        assert_eq!(
            a.published,
            [PublishedAddress {
                host_ip: "127.0.0.1".parse().expect("an address"),
                host_port: 20001,
                container_port: 8080,
                protocol: "tcp".into(),
            }]
        );
        let view = novacron_api::AllocView::from(a);
        assert_eq!(view.published[0].address().to_string(), "127.0.0.1:20001");
        // A report from another node changes nothing.
        report.allocations[0].published = vec![bound(20002)];
        w.report("n2", &report, SystemTime::now());
        assert_eq!(
            w.allocation("api-1").expect("alloc").published[0].host_port,
            20001
        );
        // Bounded: a node cannot make the record grow past the limit.
        report.allocations[0].published = (0..=MAX_PUBLISHED as u16 + 10).map(bound).collect();
        w.report("n1", &report, SystemTime::now());
        assert_eq!(
            w.allocation("api-1").expect("alloc").published.len(),
            MAX_PUBLISHED
        );
        // Not running any more: nothing published.
        w.report(
            "n1",
            &status(AllocState::Starting, 1, false),
            SystemTime::now(),
        );
        assert!(w.allocation("api-1").expect("alloc").published.is_empty());
    }

    /// The typed record of a move that the migration decides from: what the new
    /// node reported since, with failures sticking, and a terminal state held
    /// as `migrating` for the migration to roll back.
    #[test]
    fn a_move_records_what_the_new_node_reports() {
        let a = AllocRecord {
            restarts: 3,
            ..test_alloc("api-1", "n1", AllocState::Running)
        };
        let w = workloads_with(a);
        assert_eq!(w.move_report("api-1"), None);
        let restore = RestoreFrom {
            digest: "d".repeat(64),
            size: 1,
            mode: novacron_common::checkpoint::CheckpointMode::Fs,
            incoming_vm: None,
        };
        w.relocate("api-1", "n2", Some(restore), "moving")
            .expect("relocate");
        assert_eq!(w.move_report("api-1"), Some(MoveReport::default()));
        // The old node's reports are not the new node's.
        w.report(
            "n1",
            &status(AllocState::Starting, 9, true),
            SystemTime::now(),
        );
        assert_eq!(w.move_report("api-1"), Some(MoveReport::default()));

        w.report(
            "n2",
            &status(AllocState::Starting, 0, false),
            SystemTime::now(),
        );
        let seen = w.move_report("api-1").expect("moving");
        assert_eq!((seen.first_restarts, seen.start_failed()), (Some(0), false));
        w.report(
            "n2",
            &status(AllocState::Starting, 1, true),
            SystemTime::now(),
        );
        w.report(
            "n2",
            &status(AllocState::Failed, 1, false),
            SystemTime::now(),
        );
        let seen = w.move_report("api-1").expect("moving");
        assert!(seen.start_failed() && seen.restore_failed);
        assert_eq!(seen.ended, Some(AllocState::Failed));
        assert_eq!(
            w.allocation("api-1").expect("alloc").state,
            AllocState::Migrating
        );
        w.clear_restore("api-1").expect("clear");
        assert_eq!(w.move_report("api-1"), None);
    }
}

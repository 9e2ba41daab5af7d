//! The workload reconciler's decision for one pass: from a [`Snapshot`] of the
//! jobs, allocations, nodes and failure counts at `now`, a [`Plan`] of typed
//! [`Action`]s (mark lost, stop, preempt, fail, change a job, place, set a job's
//! status, forget, record an event).
//!
//! **Architecture Invariant:** this module changes nothing. It reads its inputs
//! and the two lookups it is handed (a lost allocation's latest checkpoint, the
//! next id) and returns the plan; [`super::Workloads::tick`] applies it, to the
//! store first and then to the fleet.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use novacron_common::checkpoint::BundleInfo;
use novacron_common::fleet::NodeStatus;
use novacron_common::manifest::Job;
use novacron_common::reconcile::{
    self, AllocView, FailureCounts, JobChange, JobView, LifecycleView, Lifecycles, PlaceRequest,
};
use novacron_common::scheduler;
use novacron_common::wire::{AllocState, FailureReason, RestoreFrom, TaskSpec};

use super::{JobEntry, KEEP_TERMINAL_PER_JOB, effective_replicas};
use crate::services::events::{CONTROLLER, NewEvent, kind};
use crate::state::registry::PlacementNode;
use crate::state::store::{AllocPort, AllocRecord, JobRecord, JobVersion, MAX_JOB_VERSIONS};

/// Checkpoints of lost allocations, per job, waiting for the replacements a pass
/// places: (version, checkpoint, lost allocation).
pub(super) type Recoveries = BTreeMap<String, VecDeque<(u64, RestoreFrom, String)>>;

/// What one pass decides from.
#[derive(Debug, Clone, Copy)]
pub(super) struct Snapshot<'a> {
    /// Now (Unix ms).
    pub now_ms: u64,
    /// The jobs, by name.
    pub jobs: &'a BTreeMap<String, JobEntry>,
    /// The allocations, by id.
    pub allocs: &'a BTreeMap<String, AllocRecord>,
    /// The nodes.
    pub nodes: &'a [PlacementNode],
    /// Failures of each job version.
    pub failures: &'a FailureCounts,
    /// Checkpoints still waiting for a replacement from earlier passes.
    pub recoveries: &'a Recoveries,
    /// The allocations a migration moves.
    pub migrating: &'a BTreeMap<String, super::MoveReport>,
}

/// One pass's decisions, in the order they apply.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// The actions.
    pub actions: Vec<Action>,
    /// Checkpoints of lost allocations still waiting for a replacement after this
    /// pass.
    pub recoveries: Recoveries,
    /// Replicas this pass could not place: job → (version, count).
    pub unplaced: BTreeMap<String, (u64, u32)>,
    /// Replicas this pass asked the scheduler for.
    pub requested: u64,
}

impl Plan {
    /// How many allocations the plan places.
    pub fn placed(&self) -> u64 {
        self.actions
            .iter()
            .filter(|a| matches!(a, Action::Place(_)))
            .count() as u64
    }
}

/// One decision.
#[derive(Debug, Clone)]
pub(super) enum Action {
    /// The allocation's node is down: it is lost and no longer wanted.
    MarkLost {
        /// The allocation.
        alloc: String,
        /// Why, for people.
        message: String,
    },
    /// The allocation is no longer wanted (its agent stops it).
    Stop {
        /// The allocation.
        alloc: String,
        /// Why, for people.
        message: String,
    },
    /// The allocation gives way to a higher-priority placement.
    Preempt {
        /// The allocation.
        alloc: String,
        /// The job it gives way to.
        by: String,
        /// Why, for people.
        message: String,
    },
    /// The allocation is stopped and counted as failed.
    Fail {
        /// The allocation.
        alloc: String,
        /// Why, typed.
        failure: FailureReason,
        /// Why, for people.
        message: String,
    },
    /// A job-level change: the job's new entry, written to the store before
    /// anything shows it, and the event to record once it is (dropped with the
    /// change when the write fails; the next pass decides it again).
    ChangeJob {
        /// What the reconciler decided.
        change: JobChange,
        /// The job after the change.
        entry: Box<JobEntry>,
        /// What to record.
        event: NewEvent,
    },
    /// A new allocation.
    Place(Box<AllocRecord>),
    /// A job's status word and message (placement blocked or unblocked).
    SetJobStatus {
        /// The job.
        job: String,
        /// The status word.
        status: String,
        /// The explanation.
        message: String,
    },
    /// A terminal allocation past [`KEEP_TERMINAL_PER_JOB`]: deleted.
    Forget {
        /// The allocation.
        alloc: String,
    },
    /// An event to record once the state it describes is persisted.
    Record(NewEvent),
}

/// Decides one pass. `latest` finds a lost allocation's newest checkpoint;
/// `next_id` draws the random part of a new allocation's id.
pub(super) fn plan(
    snap: &Snapshot<'_>,
    latest: &dyn Fn(&str) -> Option<BundleInfo>,
    next_id: &mut dyn FnMut() -> u64,
) -> Plan {
    let now_ms = snap.now_ms;
    let job_views: Vec<JobView> = snap.jobs.values().filter_map(job_view).collect();
    let lifecycles: Lifecycles = snap
        .jobs
        .values()
        .filter_map(|e| Some((e.record.name.clone(), lifecycle_view(e)?)))
        .collect();
    let alloc_views: Vec<AllocView> = snap
        .allocs
        .values()
        .map(|a| alloc_view(a, snap.migrating.contains_key(&a.id)))
        .collect();
    let decided = reconcile::reconcile_with_lifecycles(
        &job_views,
        &lifecycles,
        &alloc_views,
        &node_views(snap.nodes),
        snap.failures,
        now_ms,
    );
    let mut pass = Pass {
        snap,
        plan: Plan {
            recoveries: snap.recoveries.clone(),
            ..Plan::default()
        },
        jobs: Jobs::new(snap.jobs),
        changed: BTreeMap::new(),
        status: BTreeMap::new(),
    };
    for id in &decided.lost {
        pass.lost(id, latest);
    }
    for (id, reason) in &decided.stop {
        if let Some(a) = snap.allocs.get(id) {
            pass.change(a, None);
            pass.push(Action::Stop {
                alloc: id.clone(),
                message: reason.clone(),
            });
            pass.record(
                NewEvent::new(
                    kind::ALLOC_STOPPED,
                    CONTROLLER,
                    format!("stopping {id}: {reason}"),
                )
                .node(&a.node)
                .job(&a.job)
                .alloc(id),
            );
        }
    }
    for (id, failure, reason) in &decided.fail {
        if let Some(a) = snap.allocs.get(id) {
            pass.change(a, Some(AllocState::Failed));
            pass.push(Action::Fail {
                alloc: id.clone(),
                failure: *failure,
                message: reason.clone(),
            });
            pass.record(
                NewEvent::new(
                    kind::ALLOC_STOPPED,
                    CONTROLLER,
                    format!("stopping {id} as failed: {reason}"),
                )
                .node(&a.node)
                .job(&a.job)
                .alloc(id),
            );
        }
    }
    for change in &decided.jobs {
        pass.job_change(change);
    }
    pass.plan.requested = decided.place.iter().map(|r| u64::from(r.count)).sum();
    if !decided.place.is_empty() {
        // One snapshot per pass; each outcome is committed into it, so later
        // requests see the earlier placements and preemptions.
        let gone: BTreeSet<&str> = pass.changed.keys().copied().collect();
        match scheduling_snapshot(&pass.jobs, snap.allocs, snap.nodes, &gone) {
            Ok(mut scheduling) => {
                for req in &decided.place {
                    pass.place(&mut scheduling, req, next_id);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "inconsistent scheduling snapshot; retrying next tick");
            }
        }
    }
    pass.gc_terminal();
    pass.plan
}

/// A pass under way: the plan so far, and what it changed, so that later
/// decisions of the pass see the earlier ones.
struct Pass<'s, 'a> {
    snap: &'s Snapshot<'a>,
    plan: Plan,
    jobs: Jobs<'a>,
    /// Allocations this pass no longer wants: (state, updated) after the pass.
    changed: BTreeMap<&'a str, (AllocState, u64)>,
    /// Jobs' (status, message) as this pass set them.
    status: BTreeMap<String, (String, String)>,
}

impl<'a> Pass<'_, 'a> {
    fn push(&mut self, action: Action) {
        self.plan.actions.push(action);
    }

    fn record(&mut self, event: NewEvent) {
        self.plan.actions.push(Action::Record(event));
    }

    /// Notes that `a` is no longer wanted after this pass (in `state` when it
    /// changes).
    fn change(&mut self, a: &'a AllocRecord, state: Option<AllocState>) {
        let updated = self.snap.now_ms;
        let state = state
            .or_else(|| self.changed.get(a.id.as_str()).map(|c| c.0))
            .unwrap_or(a.state);
        self.changed.insert(a.id.as_str(), (state, updated));
    }

    fn lost(&mut self, id: &String, latest: &dyn Fn(&str) -> Option<BundleInfo>) {
        let snap = self.snap;
        let Some(a) = snap.allocs.get(id) else {
            return;
        };
        let checkpointed = snap
            .jobs
            .get(&a.job)
            .and_then(|e| e.parsed.get(&a.version))
            .is_some_and(|j| j.spec.checkpoint.is_some());
        if checkpointed && let Some(b) = latest(id) {
            self.plan
                .recoveries
                .entry(a.job.clone())
                .or_default()
                .push_back((
                    a.version,
                    RestoreFrom {
                        digest: b.digest,
                        size: b.size,
                        mode: b.mode,
                        incoming_vm: None,
                    },
                    id.clone(),
                ));
        }
        self.change(a, Some(AllocState::Lost));
        self.push(Action::MarkLost {
            alloc: id.clone(),
            message: format!("node {} is down", a.node),
        });
        self.record(
            NewEvent::new(
                kind::ALLOC_LOST,
                CONTROLLER,
                format!("{id} lost: node {} is down", a.node),
            )
            .node(&a.node)
            .job(&a.job)
            .alloc(id),
        );
    }

    fn job_change(&mut self, change: &JobChange) {
        let job = match change {
            JobChange::Stable { job, .. }
            | JobChange::Revert { job, .. }
            | JobChange::Complete { job }
            | JobChange::Failing { job, .. } => job,
        };
        let Some(mut e) = self.jobs.get(job).cloned() else {
            return;
        };
        let Some(event) = job_change(&mut e, change, self.snap.now_ms) else {
            return;
        };
        self.jobs.changed.insert(job.clone(), e.clone());
        self.status.remove(job);
        self.push(Action::ChangeJob {
            change: change.clone(),
            entry: Box::new(e),
            event,
        });
    }

    fn place(
        &mut self,
        scheduling: &mut scheduler::Snapshot,
        req: &PlaceRequest,
        next_id: &mut dyn FnMut() -> u64,
    ) {
        let snap = self.snap;
        let Some(job) = self
            .jobs
            .get(&req.job)
            .and_then(|e| e.parsed.get(&req.version))
            .cloned()
        else {
            return;
        };
        let mut request = scheduler::Request::from_spec(&job.name, &job.spec, req.count);
        request.node = req.node.clone();
        request.avoid = req.avoid.clone();
        let digest = self
            .jobs
            .get(&req.job)
            .and_then(|e| e.record.versions.iter().find(|v| v.version == req.version))
            .and_then(|v| v.image_digest.clone());
        request.image_nodes = snap
            .nodes
            .iter()
            .filter(|n| {
                n.holds_image(&job.spec.task.image)
                    || digest.as_deref().is_some_and(|d| n.holds_image(d))
            })
            .map(|n| n.name.clone())
            .collect();
        let outcome = scheduler::schedule(scheduling, &request);
        let ids: Vec<String> = outcome
            .assignments
            .iter()
            .map(|_| format!("{}-{:012x}", req.job, next_id() & 0xffff_ffff_ffff))
            .collect();
        if let Err(error) = scheduling.commit(&request, &outcome, &ids) {
            tracing::warn!(job = %req.job, %error, "scheduling outcome does not fit the snapshot; retrying next tick");
            return;
        }
        for victim in &outcome.preemptions {
            let Some(a) = snap.allocs.get(victim) else {
                continue;
            };
            let message = format!(
                "preempted by job {} (priority {})",
                req.job, job.spec.priority
            );
            self.change(a, None);
            self.push(Action::Preempt {
                alloc: victim.clone(),
                by: req.job.clone(),
                message: message.clone(),
            });
            self.record(
                NewEvent::new(kind::ALLOC_STOPPED, CONTROLLER, message)
                    .node(&a.node)
                    .job(&a.job)
                    .alloc(victim),
            );
        }
        self.placements(req, &job, &outcome, ids);
        if outcome.unplaced > 0 {
            self.plan
                .unplaced
                .insert(req.job.clone(), (req.version, outcome.unplaced));
        }
        self.blocked(req, &outcome);
    }

    /// The new allocations of one scheduled request.
    fn placements(
        &mut self,
        req: &PlaceRequest,
        job: &Job,
        outcome: &scheduler::Outcome,
        ids: Vec<String>,
    ) {
        let now_ms = self.snap.now_ms;
        let task = job.task_spec();
        for (p, id) in outcome.assignments.iter().zip(ids) {
            let restore = self.plan.recoveries.get_mut(&req.job).and_then(|q| {
                let at = q.iter().position(|(v, ..)| *v == req.version)?;
                q.remove(at)
            });
            if let Some((_, r, lost)) = &restore {
                self.record(
                    NewEvent::new(
                        kind::ALLOC_PLACED,
                        CONTROLLER,
                        format!(
                            "{id} replaces lost {lost} and restores its latest checkpoint {} ({})",
                            &r.digest[..12],
                            r.mode
                        ),
                    )
                    .job(&req.job)
                    .alloc(&id)
                    .detail("checkpoint", &r.digest),
                );
            }
            let record = AllocRecord {
                restore: restore.map(|(_, r, _)| r),
                id: id.clone(),
                job: req.job.clone(),
                version: req.version,
                node: p.node.clone(),
                desired_run: true,
                state: AllocState::Pending,
                healthy: None,
                healthy_since_unix_ms: None,
                created_unix_ms: now_ms,
                updated_unix_ms: now_ms,
                restarts: 0,
                exit_code: None,
                message: format!("placed on {}", p.node),
                failure: None,
                cpu_millis: task.cpu_millis,
                memory_bytes: task.memory_bytes,
                gpu_uuids: p.gpu_uuids.clone(),
                priority: job.spec.priority,
                disk_bytes: job.spec.resources.disk.0,
                ports: alloc_ports(&task, &p.ports),
                published: Vec::new(),
                suspended: false,
                address: None,
            };
            let event = NewEvent::new(
                kind::ALLOC_PLACED,
                CONTROLLER,
                format!(
                    "{id} (job {} version {}) placed on {}",
                    req.job, req.version, p.node
                ),
            )
            .node(&p.node)
            .job(&req.job)
            .alloc(&id)
            .detail("version", req.version);
            self.push(Action::Place(Box::new(record)));
            self.record(event);
        }
    }

    /// The job's status after a placement: blocked while replicas cannot be
    /// placed, running again once they all are.
    fn blocked(&mut self, req: &PlaceRequest, outcome: &scheduler::Outcome) {
        let Some(e) = self.jobs.get(&req.job) else {
            return;
        };
        let (status, message) = self
            .status
            .get(&req.job)
            .cloned()
            .unwrap_or_else(|| (e.record.status.clone(), e.record.message.clone()));
        if outcome.unplaced > 0 {
            let wanted = format!(
                "{} of {} replicas could not be placed: {}",
                outcome.unplaced, req.count, outcome.explanation
            );
            if message == wanted {
                return;
            }
            tracing::warn!(job = %req.job, unplaced = outcome.unplaced, explanation = %outcome.explanation, "cannot place");
            self.record(
                NewEvent::new(kind::ALLOC_UNPLACED, CONTROLLER, wanted.clone())
                    .job(&req.job)
                    .detail("unplaced", outcome.unplaced),
            );
            self.set_status(&req.job, "blocked", wanted);
        } else if status == "blocked" {
            self.set_status(&req.job, "running", String::new());
        }
    }

    fn set_status(&mut self, job: &str, status: &str, message: String) {
        self.status
            .insert(job.to_string(), (status.to_string(), message.clone()));
        self.push(Action::SetJobStatus {
            job: job.to_string(),
            status: status.to_string(),
            message,
        });
    }

    /// Forgets the oldest terminal allocations beyond [`KEEP_TERMINAL_PER_JOB`]
    /// per job, as they stand after this pass.
    fn gc_terminal(&mut self) {
        let mut per_job: BTreeMap<&str, Vec<(u64, &str)>> = BTreeMap::new();
        for a in self.snap.allocs.values() {
            let (state, desired_run, updated) = match self.changed.get(a.id.as_str()) {
                Some(&(state, updated)) => (state, false, updated),
                None => (a.state, a.desired_run, a.updated_unix_ms),
            };
            if state.is_terminal() && !desired_run {
                per_job
                    .entry(a.job.as_str())
                    .or_default()
                    .push((updated, a.id.as_str()));
            }
        }
        for (_, mut list) in per_job {
            if list.len() <= KEEP_TERMINAL_PER_JOB {
                continue;
            }
            list.sort();
            for (_, id) in list.iter().take(list.len() - KEEP_TERMINAL_PER_JOB) {
                self.plan.actions.push(Action::Forget {
                    alloc: id.to_string(),
                });
            }
        }
    }
}

/// The jobs as a pass sees them: the snapshot's, with the entries it changed.
#[derive(Debug)]
pub(super) struct Jobs<'a> {
    base: &'a BTreeMap<String, JobEntry>,
    changed: BTreeMap<String, JobEntry>,
}

impl<'a> Jobs<'a> {
    /// The jobs as they are.
    pub fn new(base: &'a BTreeMap<String, JobEntry>) -> Self {
        Jobs {
            base,
            changed: BTreeMap::new(),
        }
    }

    /// One job.
    pub fn get(&self, name: &str) -> Option<&JobEntry> {
        self.changed.get(name).or_else(|| self.base.get(name))
    }
}

/// What a job-level decision does to the job's entry, and the event that says
/// so; `None` when it changes nothing (already in that state).
pub(super) fn job_change(e: &mut JobEntry, change: &JobChange, now_ms: u64) -> Option<NewEvent> {
    match change {
        JobChange::Stable { job, version } => {
            e.record.stable = Some(*version);
            if e.record.status != "reverted" {
                e.record.status = "running".into();
            }
            Some(
                NewEvent::new(
                    kind::JOB_CHANGED,
                    CONTROLLER,
                    format!("job {job} version {version} is stable"),
                )
                .job(job)
                .detail("status", "stable")
                .detail("version", version),
            )
        }
        JobChange::Revert {
            job,
            failed,
            to,
            reason,
        } => {
            let stable = e
                .record
                .versions
                .iter()
                .find(|v| v.version == *to)
                .cloned()?;
            let parsed = e.parsed.get(to).cloned()?;
            let version = e.record.versions.last().map_or(1, |v| v.version + 1);
            let new = NewVersion {
                version,
                source: &stable.source,
                file: &stable.file,
                hash: &stable.spec_hash,
                by: "novacron (auto-revert)",
                at_ms: now_ms,
                secrets: &stable.secrets,
                image_digest: stable.image_digest.as_deref(),
                vm: stable.vm.as_ref(),
            };
            push_version(e, &new, parsed);
            e.record.stable = Some(version);
            e.record.status = "reverted".into();
            e.record.message = format!(
                "version {failed} failed ({reason}); reverted to version {to}'s spec as version {version}"
            );
            Some(
                NewEvent::new(kind::JOB_CHANGED, CONTROLLER, e.record.message.clone())
                    .job(job)
                    .detail("status", "reverted")
                    .detail("failed_version", failed)
                    .detail("version", version),
            )
        }
        JobChange::Complete { job } => {
            if e.record.status == "complete" {
                return None;
            }
            e.record.status = "complete".into();
            e.record.message = "every replica exited 0".into();
            Some(
                NewEvent::new(
                    kind::JOB_CHANGED,
                    CONTROLLER,
                    format!("job {job} complete: every replica exited 0"),
                )
                .job(job)
                .detail("status", "complete"),
            )
        }
        JobChange::Failing {
            job,
            version,
            reason,
        } => {
            if e.record.status == "failing" {
                return None;
            }
            e.record.status = "failing".into();
            e.record.message = reason.clone();
            Some(
                NewEvent::new(
                    kind::JOB_CHANGED,
                    CONTROLLER,
                    format!("job {job} version {version} is failing: {reason}"),
                )
                .job(job)
                .detail("status", "failing")
                .detail("version", version),
            )
        }
    }
}

/// A version to add to a job.
#[derive(Debug, Clone, Copy)]
pub(super) struct NewVersion<'v> {
    /// Its number.
    pub version: u64,
    /// The manifest as submitted.
    pub source: &'v str,
    /// The manifest's file name.
    pub file: &'v str,
    /// The spec's hash.
    pub hash: &'v str,
    /// Who submitted it.
    pub by: &'v str,
    /// When (Unix ms).
    pub at_ms: u64,
    /// The secret versions it runs.
    pub secrets: &'v BTreeMap<String, u64>,
    /// Its virtual machine with the template resolved.
    pub vm: Option<&'v novacron_common::wire::VmSpec>,
    /// The image digest it runs, when it repeats a version that ran (a revert).
    pub image_digest: Option<&'v str>,
}

/// Adds `new` (parsed as `job`) to the entry as its current version.
pub(super) fn push_version(entry: &mut JobEntry, new: &NewVersion<'_>, job: Job) {
    push_record_version(&mut entry.record, new);
    entry.parsed.insert(new.version, job);
    let kept = &entry.record.versions;
    entry
        .parsed
        .retain(|v, _| kept.iter().any(|k| k.version == *v));
}

/// Adds `new` to the record as its current version, dropping the oldest past
/// [`MAX_JOB_VERSIONS`].
pub(super) fn push_record_version(record: &mut JobRecord, new: &NewVersion<'_>) {
    record.versions.push(JobVersion {
        version: new.version,
        source: new.source.to_string(),
        file: new.file.to_string(),
        spec_hash: new.hash.to_string(),
        submitted_at_unix_ms: new.at_ms,
        by: new.by.to_string(),
        secrets: new.secrets.clone(),
        image_digest: new.image_digest.map(str::to_owned),
        vm: new.vm.cloned(),
    });
    record.current = new.version;
    while record.versions.len() > MAX_JOB_VERSIONS {
        record.versions.remove(0);
    }
}

/// The scheduler's view: every node, and the allocations holding resources
/// (less `gone`, which a pass no longer wants, and those stopping, which hold
/// only their host ports until they are reported gone).
pub(super) fn scheduling_snapshot(
    jobs: &Jobs<'_>,
    allocs: &BTreeMap<String, AllocRecord>,
    nodes: &[PlacementNode],
    gone: &BTreeSet<&str>,
) -> Result<scheduler::Snapshot, scheduler::SnapshotError> {
    let known: BTreeSet<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    let snapshot_nodes: Vec<scheduler::NodeInfo> = nodes
        .iter()
        .map(|n| scheduler::NodeInfo {
            name: n.name.clone(),
            labels: n.labels.clone(),
            capacity: n.capacity.clone(),
            ready: n.status == NodeStatus::Ready && !n.cordoned,
        })
        .collect();
    let existing = allocs
        .values()
        .filter(|a| {
            a.desired_run
                && !a.state.is_terminal()
                && known.contains(a.node.as_str())
                && !gone.contains(a.id.as_str())
        })
        .map(|a| scheduler::Placed {
            alloc_id: a.id.clone(),
            job: a.job.clone(),
            node: a.node.clone(),
            cpu_millis: a.cpu_millis,
            memory_bytes: a.memory_bytes,
            gpu_uuids: a.gpu_uuids.clone(),
            priority: a.priority,
            disk_bytes: a.disk_bytes,
            host_ports: held_ports(jobs, a),
        });
    // An allocation on its way out (stopped by this pass or an earlier one, its
    // container not yet reported gone) still has its host ports bound on the
    // node, through its shutdown delay too: it keeps them in the snapshot, and
    // nothing else, so a replacement gets another port (or waits) instead of
    // failing to bind. It cannot be preempted.
    let stopping = allocs
        .values()
        .filter(|a| {
            (!a.desired_run || gone.contains(a.id.as_str()))
                && !a.state.is_terminal()
                && known.contains(a.node.as_str())
        })
        .map(|a| scheduler::Placed {
            alloc_id: a.id.clone(),
            job: a.job.clone(),
            node: a.node.clone(),
            cpu_millis: 0,
            memory_bytes: 0,
            gpu_uuids: Vec::new(),
            priority: u32::MAX,
            disk_bytes: 0,
            host_ports: held_ports(jobs, a),
        })
        .filter(|p| !p.host_ports.is_empty());
    scheduler::Snapshot::new(snapshot_nodes, existing.chain(stopping).collect())
}

/// The host ports `a` holds on its node. An allocation placed before host ports
/// were scheduled has none recorded: it holds its job version's static ports
/// (Docker picked its other ports outside any dynamic range).
pub(super) fn held_ports(jobs: &Jobs<'_>, a: &AllocRecord) -> Vec<scheduler::HostPort> {
    if !a.ports.is_empty() {
        return a
            .ports
            .iter()
            .map(|p| scheduler::HostPort {
                port: p.host_port,
                udp: p.protocol == "udp",
            })
            .collect();
    }
    let Some(job) = jobs.get(&a.job).and_then(|e| e.parsed.get(&a.version)) else {
        return Vec::new();
    };
    scheduler::Request::from_spec(&job.name, &job.spec, 1)
        .static_ports()
        .collect()
}

/// The allocation's ports: each of the task's mappings with the host port the
/// scheduler assigned it.
pub(super) fn alloc_ports(task: &TaskSpec, assigned: &[scheduler::AssignedPort]) -> Vec<AllocPort> {
    assigned
        .iter()
        .filter_map(|p| {
            let mapping = task.ports.iter().find(|m| m.name == p.name)?;
            Some(AllocPort {
                name: p.name.clone(),
                container_port: mapping.container_port,
                host_port: p.host_port,
                protocol: if p.udp { "udp" } else { "tcp" }.into(),
            })
        })
        .collect()
}

/// What the reconciler sees of a job: its current version, with the replicas the
/// autoscaler set in place of the manifest's.
pub(super) fn job_view(e: &JobEntry) -> Option<JobView> {
    let job = e.current()?;
    Some(JobView {
        name: e.record.name.clone(),
        version: e.record.current,
        stable_version: e.record.stable,
        job_type: job.spec.job_type,
        replicas: effective_replicas(e),
        placement: job.spec.placement.clone(),
        update: job.spec.update.clone(),
        has_health_check: job.spec.health.is_some(),
        static_host_ports: job.spec.task.ports.iter().any(|p| p.host_port.is_some()),
        stopped: e.record.stopped || matches!(e.record.status.as_str(), "complete"),
    })
}

/// The current version's `lifecycle`, if it has one, with when it was applied.
pub(super) fn lifecycle_view(e: &JobEntry) -> Option<LifecycleView> {
    let lifecycle = e.current()?.spec.lifecycle.clone()?;
    let since_ms = e
        .record
        .versions
        .iter()
        .find(|v| v.version == e.record.current)
        .map_or(0, |v| v.submitted_at_unix_ms);
    Some(LifecycleView {
        lifecycle,
        since_ms,
    })
}

/// What the reconciler sees of an allocation.
fn alloc_view(a: &AllocRecord, migrating: bool) -> AllocView {
    AllocView {
        id: a.id.clone(),
        job: a.job.clone(),
        version: a.version,
        node: a.node.clone(),
        state: a.state,
        desired_run: a.desired_run,
        healthy: a.healthy,
        healthy_since_ms: a.healthy_since_unix_ms,
        created_ms: a.created_unix_ms,
        failure: a.failure,
        migrating,
    }
}

/// The nodes as the reconciler sees them.
pub(super) fn node_views(nodes: &[PlacementNode]) -> Vec<reconcile::NodeView> {
    nodes
        .iter()
        .map(|n| reconcile::NodeView {
            name: n.name.clone(),
            status: n.status,
            labels: n.labels.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use novacron_common::checkpoint::CheckpointMode;
    use novacron_common::manifest::parse_job;
    use novacron_common::wire::Capacity;

    use super::*;

    fn entry(text: &str) -> JobEntry {
        let job = parse_job("job.yaml", text).unwrap_or_else(|e| panic!("{e}"));
        let mut e = JobEntry {
            record: super::super::new_job_record(&job.name),
            parsed: BTreeMap::new(),
        };
        let new = NewVersion {
            version: 1,
            source: text,
            file: "job.yaml",
            hash: "h",
            by: "me",
            at_ms: 0,
            secrets: &BTreeMap::new(),
            image_digest: None,
            vm: None,
        };
        push_version(&mut e, &new, job);
        e
    }

    fn jobs(replicas: u32, extra: &str) -> BTreeMap<String, JobEntry> {
        let text = format!(
            "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {{name: api}}\nspec:\n  replicas: {replicas}\n  task: {{image: busybox:1}}\n  resources: {{cpu: 100m, memory: 32Mi}}\n{extra}"
        );
        [("api".to_string(), entry(&text))].into()
    }

    fn node(name: &str, status: NodeStatus) -> PlacementNode {
        PlacementNode {
            name: name.into(),
            status,
            labels: BTreeMap::new(),
            capacity: Capacity {
                cpu_millis: 4_000,
                memory_bytes: 8 << 30,
                disk_bytes: 100 << 30,
                ..Capacity::default()
            },
            cordoned: false,
            images: Default::default(),
        }
    }

    fn alloc(id: &str, node: &str, state: AllocState, desired_run: bool) -> AllocRecord {
        AllocRecord {
            desired_run,
            healthy_since_unix_ms: Some(1),
            created_unix_ms: 1,
            updated_unix_ms: 1,
            ..super::super::test_alloc(id, node, state)
        }
    }

    fn allocs(list: Vec<AllocRecord>) -> BTreeMap<String, AllocRecord> {
        list.into_iter().map(|a| (a.id.clone(), a)).collect()
    }

    /// Plans one pass with no checkpoints and ids 1, 2, 3…
    fn run(
        jobs: &BTreeMap<String, JobEntry>,
        allocs: &BTreeMap<String, AllocRecord>,
        nodes: &[PlacementNode],
        latest: &dyn Fn(&str) -> Option<BundleInfo>,
    ) -> Plan {
        let failures = FailureCounts::new();
        let recoveries = Recoveries::new();
        let migrating = BTreeMap::new();
        let snap = Snapshot {
            now_ms: 1_000,
            jobs,
            allocs,
            nodes,
            failures: &failures,
            recoveries: &recoveries,
            migrating: &migrating,
        };
        let mut n = 0;
        plan(&snap, latest, &mut || {
            n += 1;
            n
        })
    }

    fn placed(plan: &Plan) -> Vec<&AllocRecord> {
        plan.actions
            .iter()
            .filter_map(|a| match a {
                Action::Place(r) => Some(&**r),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn missing_replicas_are_placed_with_ids_from_the_given_source() {
        let plan = run(
            &jobs(2, ""),
            &BTreeMap::new(),
            &[node("n1", NodeStatus::Ready)],
            &|_| None,
        );
        let ids: Vec<&str> = placed(&plan).iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["api-000000000001", "api-000000000002"]);
        assert!(placed(&plan).iter().all(|a| a.node == "n1"
            && a.state == AllocState::Pending
            && a.desired_run
            && a.created_unix_ms == 1_000));
        assert_eq!((plan.requested, plan.placed()), (2, 2));
        assert!(plan.unplaced.is_empty());
        // Each placement is followed by its event.
        assert!(matches!(plan.actions[1], Action::Record(_)));
    }

    #[test]
    fn planning_changes_nothing_and_repeats_itself() {
        let jobs = jobs(3, "");
        let allocs = allocs(vec![alloc("api-a", "n1", AllocState::Running, true)]);
        let nodes = [node("n1", NodeStatus::Ready)];
        let first = run(&jobs, &allocs, &nodes, &|_| None);
        let second = run(&jobs, &allocs, &nodes, &|_| None);
        assert_eq!(format!("{first:?}"), format!("{second:?}"));
        assert_eq!(first.placed(), 2);
        assert_eq!(allocs["api-a"].state, AllocState::Running);
    }

    /// A lost allocation of a job with checkpoints: its replacement, placed in
    /// the same pass on a live node, restores its latest checkpoint.
    #[test]
    fn a_lost_allocation_is_replaced_from_its_latest_checkpoint() {
        let jobs = jobs(1, "  checkpoint: {mode: fs}\n");
        let allocs = allocs(vec![alloc("api-a", "n1", AllocState::Running, true)]);
        let nodes = [node("n1", NodeStatus::Down), node("n2", NodeStatus::Ready)];
        let bundle = |id: &str| {
            (id == "api-a").then(|| BundleInfo {
                digest: "d".repeat(64),
                size: 10,
                mode: CheckpointMode::Fs,
                alloc: id.into(),
                job: "api".into(),
                node: "n1".into(),
                created_unix_ms: 1,
                dump_ms: 1,
            })
        };
        let plan = run(&jobs, &allocs, &nodes, &bundle);
        assert!(matches!(
            &plan.actions[0],
            Action::MarkLost { alloc, message } if alloc == "api-a" && message == "node n1 is down"
        ));
        let new = placed(&plan);
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].node, "n2");
        assert_eq!(
            new[0].restore.as_ref().map(|r| r.digest.as_str()),
            Some("d".repeat(64).as_str())
        );
        // The checkpoint went to the replacement: nothing waits any more.
        assert!(plan.recoveries.values().all(VecDeque::is_empty));
    }

    #[test]
    fn a_job_that_cannot_be_placed_is_blocked_and_unblocked_once_it_is() {
        let mut jobs = jobs(1, "");
        let plan = run(&jobs, &BTreeMap::new(), &[], &|_| None);
        assert_eq!(plan.unplaced.get("api"), Some(&(1, 1)));
        let status = plan.actions.iter().find_map(|a| match a {
            Action::SetJobStatus {
                status, message, ..
            } => Some((status.clone(), message.clone())),
            _ => None,
        });
        let (status, message) = status.expect("a status");
        assert_eq!(status, "blocked");
        assert!(message.starts_with("1 of 1 replicas could not be placed"));

        let e = jobs.get_mut("api").expect("job");
        e.record.status = status;
        e.record.message = message;
        let plan = run(
            &jobs,
            &BTreeMap::new(),
            &[node("n1", NodeStatus::Ready)],
            &|_| None,
        );
        assert!(plan.actions.iter().any(|a| matches!(
            a,
            Action::SetJobStatus { status, message, .. } if status == "running" && message.is_empty()
        )));
    }

    #[test]
    fn terminal_allocations_past_the_limit_are_forgotten_oldest_first() {
        let mut list = vec![alloc("api-live", "n1", AllocState::Running, true)];
        for i in 0..KEEP_TERMINAL_PER_JOB + 2 {
            let mut a = alloc(&format!("api-{i:02}"), "n1", AllocState::Stopped, false);
            a.updated_unix_ms = 100 + i as u64;
            list.push(a);
        }
        let plan = run(
            &jobs(1, ""),
            &allocs(list),
            &[node("n1", NodeStatus::Ready)],
            &|_| None,
        );
        let forgotten: Vec<&str> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Forget { alloc } => Some(alloc.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(forgotten, ["api-00", "api-01"]);
    }

    #[test]
    fn a_stopped_job_stops_its_allocations() {
        let mut jobs = jobs(1, "");
        jobs.get_mut("api").expect("job").record.stopped = true;
        let plan = run(
            &jobs,
            &allocs(vec![alloc("api-a", "n1", AllocState::Running, true)]),
            &[node("n1", NodeStatus::Ready)],
            &|_| None,
        );
        assert!(matches!(&plan.actions[0], Action::Stop { alloc, .. } if alloc == "api-a"));
        assert_eq!(plan.placed(), 0);
    }

    /// Regression: a stopping replica (its shutdown delay running) freed its
    /// dynamic host port in the scheduler's view, so the replacement got the same
    /// port and failed to bind while the old container still held it.
    #[test]
    fn a_stopping_replica_keeps_its_host_port_until_it_is_gone() {
        let text = "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {name: api}\nspec:\n  replicas: 1\n  task:\n    image: busybox:1\n    ports: [{name: http, containerPort: 80}]\n  resources: {cpu: 100m, memory: 32Mi}\n";
        let jobs: BTreeMap<String, JobEntry> = [("api".to_string(), entry(text))].into();
        let task = jobs["api"].parsed[&1].task_spec();
        let first = novacron_common::wire::DEFAULT_DYNAMIC_PORT_FIRST;
        let on_port = |id: &str, state: AllocState, desired_run: bool, port: u16| AllocRecord {
            ports: alloc_ports(
                &task,
                &[scheduler::AssignedPort {
                    name: "http".into(),
                    host_port: port,
                    udp: false,
                }],
            ),
            ..alloc(id, "n1", state, desired_run)
        };
        let nodes = [node("n1", NodeStatus::Ready)];
        // Stopping (still running): its port is not handed out again.
        let stopping = allocs(vec![on_port("old", AllocState::Running, false, first)]);
        let plan = run(&jobs, &stopping, &nodes, &|_| None);
        let new = placed(&plan);
        assert_eq!(new.len(), 1);
        assert_eq!(new[0].ports[0].host_port, first + 1, "{:?}", new[0].ports);
        // Once it is reported stopped, the port is free again.
        let stopped = allocs(vec![on_port("old", AllocState::Stopped, false, first)]);
        let plan = run(&jobs, &stopped, &nodes, &|_| None);
        assert_eq!(placed(&plan)[0].ports[0].host_port, first);
        // It holds nothing else: a node with no CPU left but for it still fits.
        let snapshot = scheduling_snapshot(&Jobs::new(&jobs), &stopping, &nodes, &BTreeSet::new())
            .expect("snapshot");
        let usage = snapshot.usage("n1").expect("n1");
        assert_eq!((usage.cpu_millis, usage.memory_bytes), (0, 0));
        assert_eq!(usage.host_ports, [scheduler::HostPort::tcp(first)]);
    }
}

//! The reconciler: from jobs, allocations and node liveness at `now`, the decisions
//! that move the fleet toward what the jobs ask for. Pure and deterministic: it
//! places nothing itself (the scheduler does, for each [`PlaceRequest`]), reads no
//! clock and owns no I/O.
//!
//! Rules:
//! - an allocation on a `down` node is **lost** and replaced;
//! - a **service** keeps `replicas` live allocations of its current version; when
//!   the version changed, a **rolling update** starts new allocations beside the
//!   old ones, at most `max_parallel` on their way to healthy at a time, and stops
//!   an old one only once a new one has been healthy for `min_healthy_time` (a
//!   rollout never leaves fewer healthy replicas than before); a new allocation
//!   that fails, or is not healthy within `healthy_deadline`, fails the update,
//!   which reverts to the last stable version when `auto_revert` is set;
//! - a **batch** job is complete when `replicas` allocations exited 0;
//! - a **system** job runs one allocation on every ready node that matches its
//!   constraints;
//! - a stopped job stops all its allocations;
//! - a job version whose allocations failed [`MAX_FAILURES_PER_VERSION`] times is
//!   not replaced again (it says so), so a broken image does not loop forever;
//! - a job with a `lifecycle` (see [`crate::manifest::lifecycle`]) wants no
//!   replicas outside its schedule window, nor (service, system) once it ran longer
//!   than `maxRuntime`; a batch replica older than `maxRuntime` is stopped as
//!   failed ([`Plan::fail`], [`FailureReason::MaxRuntime`]) and the version is not
//!   run again (a retry would hit the same limit): the job is failing.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::fleet::NodeStatus;
use crate::manifest::lifecycle::{exceeded, off_reason, over};
use crate::manifest::{JobType, Lifecycle, Placement, Update};
use novacron_wire::{AllocState, FailureReason};

/// Failed allocations of one job version after which it is no longer replaced.
pub const MAX_FAILURES_PER_VERSION: u32 = 5;

/// A job as the reconciler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    /// Name.
    pub name: String,
    /// Current version.
    pub version: u64,
    /// Last version that completed a rollout healthy.
    pub stable_version: Option<u64>,
    /// Service, batch or system.
    pub job_type: JobType,
    /// Replicas wanted (service, batch).
    pub replicas: u32,
    /// Placement (system jobs match nodes with it).
    pub placement: Placement,
    /// Rolling update settings.
    pub update: Update,
    /// Whether the job has a health check.
    pub has_health_check: bool,
    /// Whether its replicas publish static host ports: a new replica then cannot
    /// start beside the old one on its node, so a rolling update stops an old
    /// replica first (at most `max_parallel` at a time), as Nomad's destructive
    /// updates do.
    pub static_host_ports: bool,
    /// Stopped by an operator.
    pub stopped: bool,
}

/// An allocation as the reconciler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct AllocView {
    /// Id.
    pub id: String,
    /// Job.
    pub job: String,
    /// Job version it runs.
    pub version: u64,
    /// Node.
    pub node: String,
    /// Last known state.
    pub state: AllocState,
    /// Whether the controller still wants it to run.
    pub desired_run: bool,
    /// Health as last reported.
    pub healthy: Option<bool>,
    /// Since when it has been running and healthy (Unix ms).
    pub healthy_since_ms: Option<u64>,
    /// Created (Unix ms).
    pub created_ms: u64,
    /// Why it failed, when it did and the reason is known (typed: decisions read
    /// this, never the allocation's message).
    pub failure: Option<FailureReason>,
    /// A migration moves it: its node's loss is the migration's to settle
    /// (it rolls back to the source, which still holds the workload), not a
    /// loss to replace.
    pub migrating: bool,
}

impl AllocView {
    fn live(&self) -> bool {
        self.desired_run && !self.state.is_terminal()
    }
}

/// A node as the reconciler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    /// Name.
    pub name: String,
    /// Liveness.
    pub status: NodeStatus,
    /// Labels.
    pub labels: BTreeMap<String, String>,
}

/// Ask the scheduler for `count` new allocations of `job` at `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceRequest {
    /// Job.
    pub job: String,
    /// Version.
    pub version: u64,
    /// How many.
    pub count: u32,
    /// Pinned node (system jobs).
    pub node: Option<String>,
    /// Nodes to stay off when another fits: where allocations of this version
    /// failed (a container that keeps failing its checks on one node gets its
    /// replacement elsewhere).
    pub avoid: Vec<String>,
}

/// What happens to a job as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum JobChange {
    /// The current version rolled out healthy: it becomes the stable version.
    Stable {
        /// The job.
        job: String,
        /// The version.
        version: u64,
    },
    /// The rollout failed; go back to the stable version's spec.
    Revert {
        /// The job.
        job: String,
        /// The failed version.
        failed: u64,
        /// The version to go back to.
        to: u64,
        /// Why.
        reason: String,
    },
    /// A batch job finished.
    Complete {
        /// The job.
        job: String,
    },
    /// The version keeps failing; no more replacements.
    Failing {
        /// The job.
        job: String,
        /// The version.
        version: u64,
        /// Why.
        reason: String,
    },
}

/// The reconciler's decisions.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Plan {
    /// Allocations whose node is down: mark them lost.
    pub lost: Vec<String>,
    /// Allocations to stop, with the reason.
    pub stop: Vec<(String, String)>,
    /// Allocations to stop and count as failed, with the reason (a batch replica
    /// past its `maxRuntime`).
    pub fail: Vec<(String, FailureReason, String)>,
    /// New allocations to place.
    pub place: Vec<PlaceRequest>,
    /// Job-level changes.
    pub jobs: Vec<JobChange>,
}

/// Failures so far of one job version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Failures {
    /// How many allocations of the version failed.
    pub count: u32,
    /// When the last one failed (Unix ms).
    pub last_ms: u64,
}

/// Failures of each (job, version), as counted by the caller.
pub type FailureCounts = BTreeMap<(String, u64), Failures>;

/// First delay before a failed allocation is replaced; it doubles with each
/// failure of the same version, up to [`MAX_RESCHEDULE_DELAY_MS`].
pub const RESCHEDULE_DELAY_MS: u64 = 1_000;
/// Longest delay before a failed allocation is replaced.
pub const MAX_RESCHEDULE_DELAY_MS: u64 = 30_000;

/// How long after its last failure a version may be placed again.
pub fn reschedule_delay_ms(failures: u32) -> u64 {
    if failures == 0 {
        return 0;
    }
    RESCHEDULE_DELAY_MS
        .saturating_mul(1 << (failures - 1).min(16))
        .min(MAX_RESCHEDULE_DELAY_MS)
}

/// A job's `lifecycle` as the reconciler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct LifecycleView {
    /// The manifest's section.
    pub lifecycle: Lifecycle,
    /// When the job's current version was applied (Unix ms): a service's
    /// `maxRuntime` counts from then (or from its window's opening, if later).
    pub since_ms: u64,
}

/// Lifecycles by job name; jobs not in it have none.
pub type Lifecycles = BTreeMap<String, LifecycleView>;

/// Decides what to do now, for jobs without lifecycles.
pub fn reconcile(
    jobs: &[JobView],
    allocs: &[AllocView],
    nodes: &[NodeView],
    failures: &FailureCounts,
    now_ms: u64,
) -> Plan {
    reconcile_with_lifecycles(jobs, &Lifecycles::new(), allocs, nodes, failures, now_ms)
}

/// Decides what to do now, honouring each job's lifecycle.
pub fn reconcile_with_lifecycles(
    jobs: &[JobView],
    lifecycles: &Lifecycles,
    allocs: &[AllocView],
    nodes: &[NodeView],
    failures: &FailureCounts,
    now_ms: u64,
) -> Plan {
    let mut plan = Plan::default();
    let node_status: BTreeMap<&str, NodeStatus> =
        nodes.iter().map(|n| (n.name.as_str(), n.status)).collect();

    // Lost: live allocations on down (or unknown) nodes.
    let mut lost = BTreeSet::new();
    for a in allocs.iter().filter(|a| a.live() && !a.migrating) {
        if !matches!(
            node_status.get(a.node.as_str()),
            Some(NodeStatus::Ready | NodeStatus::Disconnected)
        ) {
            plan.lost.push(a.id.clone());
            lost.insert(a.id.as_str());
        }
    }

    let job_names: BTreeSet<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
    // Allocations of jobs that no longer exist.
    for a in allocs
        .iter()
        .filter(|a| a.live() && !lost.contains(a.id.as_str()))
    {
        if !job_names.contains(a.job.as_str()) {
            plan.stop
                .push((a.id.clone(), format!("job {} no longer exists", a.job)));
        }
    }

    for job in jobs {
        let mine: Vec<&AllocView> = allocs
            .iter()
            .filter(|a| a.job == job.name && !lost.contains(a.id.as_str()))
            .collect();
        let mut live: Vec<&AllocView> = mine.iter().copied().filter(|a| a.live()).collect();
        if job.stopped {
            for a in live {
                plan.stop.push((a.id.clone(), "job stopped".into()));
            }
            continue;
        }
        let batch = job.job_type == JobType::Batch;
        let lifecycle = lifecycles.get(&job.name);
        if let Some(reason) =
            lifecycle.and_then(|l| off_reason(&l.lifecycle, batch, l.since_ms, now_ms))
        {
            for a in live {
                plan.stop.push((a.id.clone(), reason.clone()));
            }
            continue;
        }
        // Batch replicas past maxRuntime fail, and the version is not run again:
        // a retry would hit the same limit.
        let mut deadline_hit = mine
            .iter()
            .find(|a| a.version == job.version && a.failure == Some(FailureReason::MaxRuntime))
            .map(|a| a.id.clone());
        if let Some(max) = lifecycle.and_then(|l| l.lifecycle.max_runtime)
            && batch
        {
            let (expired, rest): (Vec<&AllocView>, Vec<&AllocView>) = live
                .into_iter()
                .partition(|a| over(a.created_ms, now_ms, max));
            for a in &expired {
                plan.fail
                    .push((a.id.clone(), FailureReason::MaxRuntime, exceeded(max)));
                if a.version == job.version && deadline_hit.is_none() {
                    deadline_hit = Some(a.id.clone());
                }
            }
            live = rest;
        }
        let expired_now = deadline_hit.is_some();
        if let Some(id) = &deadline_hit {
            let max = lifecycle
                .and_then(|l| l.lifecycle.max_runtime)
                .map_or_else(|| "exceeded maxRuntime".to_string(), exceeded);
            plan.jobs.push(JobChange::Failing {
                job: job.name.clone(),
                version: job.version,
                reason: format!(
                    "replica {id} {max}; a batch job past its maxRuntime is not run again (raise maxRuntime and apply the job again)"
                ),
            });
        }
        let f = failures
            .get(&(job.name.clone(), job.version))
            .copied()
            .unwrap_or_default();
        let failed = f.count;
        let exhausted = failed >= MAX_FAILURES_PER_VERSION;
        let backing_off = now_ms < f.last_ms.saturating_add(reschedule_delay_ms(failed));
        let may_place = !exhausted && !backing_off && !expired_now;
        if exhausted && live.iter().all(|a| a.version != job.version) {
            plan.jobs.push(JobChange::Failing {
                job: job.name.clone(),
                version: job.version,
                reason: format!(
                    "{failed} allocations of version {} failed; fix the job and apply it again",
                    job.version
                ),
            });
        }
        let placed_before = plan.place.len();
        match job.job_type {
            JobType::System => reconcile_system(job, &live, nodes, may_place, &mut plan),
            JobType::Batch => reconcile_batch(job, &mine, &live, may_place, &mut plan),
            JobType::Service => reconcile_service(job, &live, may_place, failed, now_ms, &mut plan),
        }
        let failed_on: BTreeSet<&str> = mine
            .iter()
            .filter(|a| a.version == job.version && a.state == AllocState::Failed)
            .map(|a| a.node.as_str())
            .collect();
        for req in plan.place[placed_before..]
            .iter_mut()
            .filter(|r| r.node.is_none())
        {
            req.avoid = failed_on.iter().map(|n| n.to_string()).collect();
        }
    }
    plan
}

/// The replicas a system job wants: one per ready node that matches its
/// placement constraints (the nodes [`reconcile`] places it on).
pub fn system_replicas(placement: &Placement, nodes: &[NodeView]) -> u32 {
    let count = nodes
        .iter()
        .filter(|n| n.status == NodeStatus::Ready && system_matches(placement, n))
        .count();
    u32::try_from(count).unwrap_or(u32::MAX)
}

/// Whether a system job with `placement` belongs on `node` by its labels.
fn system_matches(placement: &Placement, node: &NodeView) -> bool {
    placement
        .constraints
        .iter()
        .all(|c| c.operator.matches(&node.labels, &c.key, &c.values))
}

fn reconcile_system(
    job: &JobView,
    live: &[&AllocView],
    nodes: &[NodeView],
    may_place: bool,
    plan: &mut Plan,
) {
    let matches = |n: &NodeView| system_matches(&job.placement, n);
    for node in nodes.iter().filter(|n| n.status == NodeStatus::Ready) {
        let here: Vec<&&AllocView> = live.iter().filter(|a| a.node == node.name).collect();
        if !matches(node) {
            for a in here {
                plan.stop.push((
                    a.id.clone(),
                    format!("node {} no longer matches", node.name),
                ));
            }
            continue;
        }
        let current = here.iter().any(|a| a.version == job.version);
        for a in here.iter().filter(|a| a.version != job.version) {
            plan.stop
                .push((a.id.clone(), format!("replaced by version {}", job.version)));
        }
        // Extra copies on one node (a node that came back): keep the oldest.
        let mut same: Vec<&&&AllocView> =
            here.iter().filter(|a| a.version == job.version).collect();
        same.sort_by_key(|a| (a.created_ms, a.id.clone()));
        for a in same.iter().skip(1) {
            plan.stop
                .push((a.id.clone(), "duplicate on this node".into()));
        }
        if !current && may_place {
            plan.place.push(PlaceRequest {
                job: job.name.clone(),
                version: job.version,
                count: 1,
                node: Some(node.name.clone()),
                avoid: Vec::new(),
            });
        }
    }
}

fn reconcile_batch(
    job: &JobView,
    mine: &[&AllocView],
    live: &[&AllocView],
    may_place: bool,
    plan: &mut Plan,
) {
    let complete = mine
        .iter()
        .filter(|a| a.version == job.version && a.state == AllocState::Complete)
        .count() as u32;
    if complete >= job.replicas {
        for a in live {
            plan.stop.push((a.id.clone(), "batch job complete".into()));
        }
        plan.jobs.push(JobChange::Complete {
            job: job.name.clone(),
        });
        return;
    }
    let running = trim_duplicates(job, live, job.replicas - complete, plan);
    let missing = job.replicas - complete - running.min(job.replicas - complete);
    if missing > 0 && may_place {
        plan.place.push(PlaceRequest {
            job: job.name.clone(),
            version: job.version,
            count: missing,
            node: None,
            avoid: Vec::new(),
        });
    }
}

fn reconcile_service(
    job: &JobView,
    live: &[&AllocView],
    may_place: bool,
    failed_new: u32,
    now_ms: u64,
    plan: &mut Plan,
) {
    let (new, old): (Vec<&AllocView>, Vec<&AllocView>) =
        live.iter().copied().partition(|a| a.version == job.version);
    let healthy_for_long_enough = |a: &AllocView| {
        a.state == AllocState::Running
            && (!job.has_health_check || a.healthy == Some(true))
            && a.healthy_since_ms.is_some_and(|since| {
                now_ms.saturating_sub(since) >= job.update.min_healthy_time.as_millis() as u64
            })
    };

    if old.is_empty() {
        // Steady state: the right number of replicas of the current version.
        let kept = trim_duplicates(job, &new, job.replicas, plan);
        if kept < job.replicas && may_place {
            plan.place.push(PlaceRequest {
                job: job.name.clone(),
                version: job.version,
                count: job.replicas - kept,
                node: None,
                avoid: Vec::new(),
            });
        }
        if kept >= job.replicas
            && job.stable_version != Some(job.version)
            && new.iter().all(|a| healthy_for_long_enough(a))
        {
            plan.jobs.push(JobChange::Stable {
                job: job.name.clone(),
                version: job.version,
            });
        }
        return;
    }

    // Rolling update in progress. It never makes the service worse: new replicas
    // start beside the old ones (at most `max_parallel` not yet healthy at a
    // time), and an old replica stops only once a new one has been healthy for
    // `min_healthy_time` in its place. Any allocation of the new version that
    // fails (a missing image, a container that does not start) or stays
    // unhealthy past `healthy_deadline` fails the rollout.
    let deadline = job.update.healthy_deadline.as_millis() as u64;
    let late = new.iter().find(|a| {
        !healthy_for_long_enough(a)
            && a.healthy != Some(true)
            && now_ms.saturating_sub(a.created_ms) > deadline
    });
    let failure = if failed_new > 0 {
        Some(format!(
            "{failed_new} allocation(s) of version {} failed during the rolling update",
            job.version
        ))
    } else {
        late.map(|a| {
            format!(
                "allocation {} of version {} was not healthy within {:?}",
                a.id, job.version, job.update.healthy_deadline
            )
        })
    };
    if let Some(reason) = failure {
        match job.stable_version {
            Some(to) if job.update.auto_revert && to != job.version => {
                plan.jobs.push(JobChange::Revert {
                    job: job.name.clone(),
                    failed: job.version,
                    to,
                    reason,
                });
            }
            _ => plan.jobs.push(JobChange::Failing {
                job: job.name.clone(),
                version: job.version,
                reason,
            }),
        }
        return;
    }
    // Canaries: with `canary: N`, the new version first runs N replicas beside all
    // the old ones; the rolling replacement starts only once they have all been
    // healthy for `min_healthy_time` (automatic promotion). The canary phase lasts
    // while no old replica has been replaced yet.
    let canaries = job.update.canary;
    if canaries > 0 && old.len() as u32 >= job.replicas {
        if (new.len() as u32) < canaries {
            if may_place {
                plan.place.push(PlaceRequest {
                    job: job.name.clone(),
                    version: job.version,
                    count: canaries - new.len() as u32,
                    node: None,
                    avoid: Vec::new(),
                });
            }
            return;
        }
        if !new.iter().all(|a| healthy_for_long_enough(a)) {
            return;
        }
    }
    let healthy_new = new.iter().filter(|a| healthy_for_long_enough(a)).count() as u32;
    let in_flight = new.len() as u32 - healthy_new;
    // Old replicas stop only as healthy new ones take their places; broken old
    // ones go first, then the oldest. With static host ports a new replica needs
    // the port its old one holds, so up to `max_parallel` old replicas make way
    // for new ones on their way to healthy (never more: a failing new replica
    // fails the rollout above before the next one stops).
    let taken = if job.static_host_ports {
        new.len() as u32 + job.update.max_parallel.saturating_sub(in_flight)
    } else {
        healthy_new
    };
    let keep_old = job.replicas.saturating_sub(taken) as usize;
    let mut old_sorted = old.clone();
    old_sorted.sort_by_key(|a| (healthy_for_long_enough(a), a.created_ms, a.id.clone()));
    for a in old_sorted.iter().take(old.len().saturating_sub(keep_old)) {
        plan.stop.push((
            a.id.clone(),
            format!("rolling update to version {}", job.version),
        ));
    }
    // Surge: up to `max_parallel` new replicas on their way to healthy (beside
    // the old ones, or in the places of those that made way).
    let room = job.replicas.saturating_sub(new.len() as u32);
    let to_place = room.min(job.update.max_parallel.saturating_sub(in_flight));
    if to_place > 0 && may_place {
        plan.place.push(PlaceRequest {
            job: job.name.clone(),
            version: job.version,
            count: to_place,
            node: None,
            avoid: Vec::new(),
        });
    }
}

/// Stops live allocations beyond `want` (newest first, so the longest-running stay);
/// returns how many are kept.
fn trim_duplicates(job: &JobView, live: &[&AllocView], want: u32, plan: &mut Plan) -> u32 {
    let mut sorted: Vec<&&AllocView> = live.iter().collect();
    sorted.sort_by_key(|a| (a.created_ms, a.id.clone()));
    for a in sorted.iter().skip(want as usize) {
        plan.stop.push((
            a.id.clone(),
            format!("{} has more than {} replicas", job.name, want),
        ));
    }
    (sorted.len() as u32).min(want)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::manifest::{Constraint, Operator};

    fn job(name: &str, t: JobType, replicas: u32, version: u64) -> JobView {
        JobView {
            name: name.into(),
            version,
            stable_version: Some(version),
            job_type: t,
            replicas,
            placement: Placement::default(),
            update: Update {
                max_parallel: 1,
                min_healthy_time: Duration::from_secs(5),
                healthy_deadline: Duration::from_secs(30),
                auto_revert: true,
                canary: 0,
            },
            has_health_check: true,
            static_host_ports: false,
            stopped: false,
        }
    }

    fn alloc(id: &str, job: &str, version: u64, node: &str, state: AllocState) -> AllocView {
        AllocView {
            id: id.into(),
            job: job.into(),
            version,
            node: node.into(),
            state,
            desired_run: true,
            healthy: Some(true),
            healthy_since_ms: Some(0),
            created_ms: 0,
            failure: None,
            migrating: false,
        }
    }

    fn node(name: &str, status: NodeStatus) -> NodeView {
        NodeView {
            name: name.into(),
            status,
            labels: BTreeMap::from([("zone".into(), "a".into())]),
        }
    }

    fn run(jobs: &[JobView], allocs: &[AllocView], nodes: &[NodeView], now: u64) -> Plan {
        reconcile(jobs, allocs, nodes, &FailureCounts::new(), now)
    }

    #[test]
    fn a_new_service_places_all_replicas() {
        let plan = run(
            &[job("api", JobType::Service, 3, 1)],
            &[],
            &[node("n1", NodeStatus::Ready)],
            0,
        );
        assert_eq!(
            plan.place,
            vec![PlaceRequest {
                job: "api".into(),
                version: 1,
                count: 3,
                node: None,
                avoid: Vec::new()
            }]
        );
    }

    /// An allocation that a migration moves to a node that goes down is the
    /// migration's to roll back (the source still holds it): not lost, not
    /// replaced (a target killed mid-migration had the allocation replaced
    /// from scratch while the source held its memory).
    #[test]
    fn a_migrating_allocation_on_a_down_node_is_not_lost() {
        let mut a = alloc("a1", "api", 1, "n2", AllocState::Starting);
        a.migrating = true;
        let nodes = [node("n1", NodeStatus::Ready), node("n2", NodeStatus::Down)];
        let plan = run(&[job("api", JobType::Service, 1, 1)], &[a], &nodes, 10_000);
        assert!(plan.lost.is_empty(), "{plan:?}");
        assert!(plan.place.is_empty(), "{plan:?}");
    }

    #[test]
    fn allocations_on_down_nodes_are_lost_and_replaced() {
        let allocs = [
            alloc("a1", "api", 1, "n1", AllocState::Running),
            alloc("a2", "api", 1, "n2", AllocState::Running),
        ];
        let nodes = [node("n1", NodeStatus::Ready), node("n2", NodeStatus::Down)];
        let plan = run(
            &[job("api", JobType::Service, 2, 1)],
            &allocs,
            &nodes,
            10_000,
        );
        assert_eq!(plan.lost, vec!["a2".to_string()]);
        assert_eq!(plan.place[0].count, 1);
        assert!(plan.stop.is_empty());
    }

    #[test]
    fn disconnected_nodes_keep_their_allocations_for_now() {
        let allocs = [alloc("a1", "api", 1, "n1", AllocState::Running)];
        let plan = run(
            &[job("api", JobType::Service, 1, 1)],
            &allocs,
            &[node("n1", NodeStatus::Disconnected)],
            0,
        );
        assert!(plan.lost.is_empty() && plan.place.is_empty());
    }

    #[test]
    fn duplicates_after_a_node_returns_are_stopped_newest_first() {
        let mut old = alloc("a-old", "api", 1, "n1", AllocState::Running);
        old.created_ms = 1;
        let mut replacement = alloc("a-new", "api", 1, "n2", AllocState::Running);
        replacement.created_ms = 2;
        let plan = run(
            &[job("api", JobType::Service, 1, 1)],
            &[old, replacement],
            &[node("n1", NodeStatus::Ready), node("n2", NodeStatus::Ready)],
            10,
        );
        assert_eq!(plan.stop.len(), 1);
        assert_eq!(plan.stop[0].0, "a-new");
    }

    #[test]
    fn rolling_update_surges_one_at_a_time_and_stops_old_only_for_healthy_new() {
        let mut j = job("api", JobType::Service, 3, 2);
        j.stable_version = Some(1);
        let nodes = [node("n1", NodeStatus::Ready)];
        let old: Vec<AllocView> = (0..3)
            .map(|i| alloc(&format!("o{i}"), "api", 1, "n1", AllocState::Running))
            .collect();
        // First step: one new replica beside the three old ones; nothing stops.
        let plan = run(std::slice::from_ref(&j), &old, &nodes, 100_000);
        assert!(plan.stop.is_empty(), "{plan:?}");
        assert_eq!(plan.place[0].count, 1);

        // One new replica, not yet healthy long enough: wait.
        let mut new = alloc("n0", "api", 2, "n1", AllocState::Running);
        new.created_ms = 99_000;
        new.healthy_since_ms = Some(99_000);
        let mut allocs = old.clone();
        allocs.push(new.clone());
        let plan = run(std::slice::from_ref(&j), &allocs, &nodes, 100_000);
        assert!(plan.stop.is_empty() && plan.place.is_empty(), "{plan:?}");

        // Healthy for 5 s: one old replica makes way, and the next new one starts.
        let plan = run(std::slice::from_ref(&j), &allocs, &nodes, 104_500);
        assert_eq!(plan.stop.len(), 1, "{plan:?}");
        assert_eq!(plan.place[0].count, 1);

        // The last step: three healthy new replicas, the last old one stops.
        let mut end: Vec<AllocView> = (0..3)
            .map(|i| alloc(&format!("n{i}"), "api", 2, "n1", AllocState::Running))
            .collect();
        end.push(old[2].clone());
        let plan = run(&[j], &end, &nodes, 200_000);
        assert_eq!(
            plan.stop,
            vec![("o2".to_string(), "rolling update to version 2".to_string())]
        );
        assert!(plan.place.is_empty(), "{plan:?}");
    }

    /// With static host ports a new replica needs its old one's port: one old
    /// replica makes way per step (`maxParallel`), and a failing new one still
    /// fails the rollout before the next old one stops.
    #[test]
    fn a_rollout_with_static_host_ports_replaces_one_old_replica_at_a_time() {
        let mut j = job("api", JobType::Service, 3, 2);
        j.stable_version = Some(1);
        j.static_host_ports = true;
        let nodes = [node("n1", NodeStatus::Ready)];
        let old: Vec<AllocView> = (0..3)
            .map(|i| alloc(&format!("o{i}"), "api", 1, "n1", AllocState::Running))
            .collect();
        let plan = run(std::slice::from_ref(&j), &old, &nodes, 100_000);
        assert_eq!(plan.stop.len(), 1, "{plan:?}");
        assert_eq!(plan.place[0].count, 1, "{plan:?}");
        // The new one on its way: nothing more stops or starts.
        let mut new = alloc("n0", "api", 2, "n1", AllocState::Starting);
        new.healthy = None;
        new.healthy_since_ms = None;
        new.created_ms = 99_000;
        let mut allocs = old[1..].to_vec();
        allocs.push(new);
        let plan = run(std::slice::from_ref(&j), &allocs, &nodes, 100_000);
        assert!(plan.stop.is_empty() && plan.place.is_empty(), "{plan:?}");
        // It failed: revert, the two old replicas kept.
        let failures = FailureCounts::from([(
            ("api".to_string(), 2),
            Failures {
                count: 1,
                last_ms: 100_000,
            },
        )]);
        allocs[2].state = AllocState::Failed;
        let plan = reconcile(&[j], &allocs, &nodes, &failures, 100_500);
        assert!(plan.stop.is_empty() && plan.place.is_empty(), "{plan:?}");
        assert!(
            matches!(&plan.jobs[..], [JobChange::Revert { .. }]),
            "{plan:?}"
        );
    }

    /// Regression: a rolling update to an image that does not exist stopped every
    /// healthy old replica (the failed new one no longer counted as in flight) and
    /// never reverted.
    #[test]
    fn a_rollout_whose_new_allocation_fails_keeps_every_old_replica_and_reverts() {
        let mut j = job("api", JobType::Service, 3, 2);
        j.stable_version = Some(1);
        let nodes = [node("n1", NodeStatus::Ready)];
        let mut allocs: Vec<AllocView> = (0..3)
            .map(|i| alloc(&format!("o{i}"), "api", 1, "n1", AllocState::Running))
            .collect();
        let mut failed = alloc("n0", "api", 2, "n1", AllocState::Failed);
        failed.healthy = None;
        failed.healthy_since_ms = None;
        failed.created_ms = 99_000;
        allocs.push(failed);
        let failures = FailureCounts::from([(
            ("api".to_string(), 2),
            Failures {
                count: 1,
                last_ms: 99_500,
            },
        )]);
        let plan = reconcile(
            std::slice::from_ref(&j),
            &allocs,
            &nodes,
            &failures,
            100_000,
        );
        assert!(plan.stop.is_empty(), "no old replica stops: {plan:?}");
        assert!(plan.place.is_empty(), "{plan:?}");
        assert!(
            matches!(
                &plan.jobs[..],
                [JobChange::Revert {
                    failed: 2,
                    to: 1,
                    ..
                }]
            ),
            "{plan:?}"
        );
        // Without auto-revert the rollout stops where it is, old replicas kept.
        j.update.auto_revert = false;
        let plan = reconcile(&[j], &allocs, &nodes, &failures, 200_000);
        assert!(plan.stop.is_empty() && plan.place.is_empty(), "{plan:?}");
        assert!(
            matches!(&plan.jobs[..], [JobChange::Failing { version: 2, .. }]),
            "{plan:?}"
        );
    }

    #[test]
    fn canaries_run_beside_the_old_version_until_healthy_then_the_rollout_proceeds() {
        let mut j = job("api", JobType::Service, 3, 2);
        j.stable_version = Some(1);
        j.update.canary = 1;
        let old: Vec<AllocView> = (0..3)
            .map(|i| alloc(&format!("o{i}"), "api", 1, "n1", AllocState::Running))
            .collect();
        let nodes = [node("n1", NodeStatus::Ready)];
        // Phase 1: one canary, nothing stopped.
        let plan = run(std::slice::from_ref(&j), &old, &nodes, 100_000);
        assert!(plan.stop.is_empty(), "{plan:?}");
        assert_eq!(
            plan.place,
            vec![PlaceRequest {
                job: "api".into(),
                version: 2,
                count: 1,
                node: None,
                avoid: Vec::new()
            }]
        );
        // The canary is not healthy long enough yet: wait, nothing stopped.
        let mut canary = alloc("c0", "api", 2, "n1", AllocState::Running);
        canary.created_ms = 99_000;
        canary.healthy_since_ms = Some(99_000);
        let mut allocs = old.clone();
        allocs.push(canary);
        let plan = run(std::slice::from_ref(&j), &allocs, &nodes, 100_000);
        assert!(plan.stop.is_empty() && plan.place.is_empty(), "{plan:?}");
        // Healthy: promoted, the rolling replacement of the old version begins
        // (one old out, one new in; the canary stays as the surge).
        let plan = run(std::slice::from_ref(&j), &allocs, &nodes, 104_500);
        assert_eq!(plan.stop.len(), 1, "{plan:?}");
        assert_eq!(plan.place[0].count, 1, "{plan:?}");
        // The last old replica goes without a replacement: 3 replicas in the end.
        let mut end: Vec<AllocView> = (0..3)
            .map(|i| {
                let mut a = alloc(&format!("n{i}"), "api", 2, "n1", AllocState::Running);
                a.healthy_since_ms = Some(0);
                a
            })
            .collect();
        end.push(alloc("o2", "api", 1, "n1", AllocState::Running));
        let plan = run(std::slice::from_ref(&j), &end, &nodes, 104_500);
        assert_eq!(plan.stop.len(), 1, "{plan:?}");
        assert!(plan.place.is_empty(), "{plan:?}");
        // A failing canary reverts like any new replica.
        let mut bad = alloc("c1", "api", 2, "n1", AllocState::Running);
        bad.healthy = Some(false);
        bad.healthy_since_ms = None;
        let mut allocs = old.clone();
        allocs.push(bad);
        let plan = run(std::slice::from_ref(&j), &allocs, &nodes, 100_000);
        assert!(
            matches!(&plan.jobs[0], JobChange::Revert { .. }),
            "{plan:?}"
        );
    }

    #[test]
    fn an_unhealthy_new_version_reverts_after_the_deadline() {
        let mut j = job("api", JobType::Service, 2, 2);
        j.stable_version = Some(1);
        let mut bad = alloc("n0", "api", 2, "n1", AllocState::Running);
        bad.healthy = Some(false);
        bad.healthy_since_ms = None;
        bad.created_ms = 0;
        let allocs = [alloc("o1", "api", 1, "n1", AllocState::Running), bad];
        let plan = run(
            &[j.clone()],
            &allocs,
            &[node("n1", NodeStatus::Ready)],
            10_000,
        );
        assert!(plan.jobs.is_empty(), "within the deadline: {plan:?}");
        let plan = run(&[j], &allocs, &[node("n1", NodeStatus::Ready)], 31_000);
        assert!(
            matches!(
                &plan.jobs[0],
                JobChange::Revert {
                    failed: 2,
                    to: 1,
                    ..
                }
            ),
            "{plan:?}"
        );
    }

    #[test]
    fn steady_healthy_rollout_becomes_stable() {
        let mut j = job("api", JobType::Service, 1, 2);
        j.stable_version = Some(1);
        let plan = run(
            &[j],
            &[alloc("n0", "api", 2, "n1", AllocState::Running)],
            &[node("n1", NodeStatus::Ready)],
            10_000,
        );
        assert_eq!(
            plan.jobs,
            vec![JobChange::Stable {
                job: "api".into(),
                version: 2
            }]
        );
    }

    #[test]
    fn batch_jobs_complete_and_failed_ones_are_replaced() {
        let j = job("train", JobType::Batch, 2, 1);
        let allocs = [
            alloc("b1", "train", 1, "n1", AllocState::Complete),
            alloc("b2", "train", 1, "n1", AllocState::Failed),
        ];
        let plan = run(
            std::slice::from_ref(&j),
            &allocs,
            &[node("n1", NodeStatus::Ready)],
            0,
        );
        assert_eq!(plan.place[0].count, 1);
        let done = [
            alloc("b1", "train", 1, "n1", AllocState::Complete),
            alloc("b3", "train", 1, "n1", AllocState::Complete),
        ];
        let plan = run(&[j], &done, &[node("n1", NodeStatus::Ready)], 0);
        assert_eq!(
            plan.jobs,
            vec![JobChange::Complete {
                job: "train".into()
            }]
        );
        assert!(plan.place.is_empty());
    }

    #[test]
    fn system_jobs_run_once_on_every_matching_ready_node() {
        let mut j = job("agent-sidecar", JobType::System, 0, 1);
        j.placement.constraints = vec![Constraint {
            key: "zone".into(),
            operator: Operator::In,
            values: vec!["a".into()],
        }];
        let mut other = node("n3", NodeStatus::Ready);
        other.labels.insert("zone".into(), "b".into());
        let nodes = [
            node("n1", NodeStatus::Ready),
            node("n2", NodeStatus::Ready),
            other,
        ];
        let allocs = [alloc("s1", "agent-sidecar", 1, "n1", AllocState::Running)];
        let plan = run(&[j.clone()], &allocs, &nodes, 0);
        assert_eq!(
            plan.place,
            vec![PlaceRequest {
                job: "agent-sidecar".into(),
                version: 1,
                count: 1,
                node: Some("n2".into()),
                avoid: Vec::new()
            }]
        );
        // Wanted: n1 and n2 (n3 does not match); a down node is not counted.
        assert_eq!(system_replicas(&j.placement, &nodes), 2);
        let mut with_down = nodes.to_vec();
        with_down.push(node("n4", NodeStatus::Down));
        assert_eq!(system_replicas(&j.placement, &with_down), 2);
    }

    #[test]
    fn stopped_jobs_stop_everything_and_orphans_are_stopped() {
        let mut j = job("api", JobType::Service, 2, 1);
        j.stopped = true;
        let allocs = [
            alloc("a1", "api", 1, "n1", AllocState::Running),
            alloc("x1", "gone", 1, "n1", AllocState::Running),
        ];
        let plan = run(&[j], &allocs, &[node("n1", NodeStatus::Ready)], 0);
        let stopped: BTreeSet<&str> = plan.stop.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(stopped, BTreeSet::from(["a1", "x1"]));
    }

    #[test]
    fn failed_allocations_are_replaced_after_a_growing_delay() {
        let j = job("api", JobType::Service, 1, 1);
        let failures = |count, last_ms| {
            FailureCounts::from([(("api".to_string(), 1), Failures { count, last_ms })])
        };
        let nodes = [node("n1", NodeStatus::Ready)];
        let plan = reconcile(
            std::slice::from_ref(&j),
            &[],
            &nodes,
            &failures(1, 10_000),
            10_500,
        );
        assert!(plan.place.is_empty(), "within 1 s of the first failure");
        let plan = reconcile(
            std::slice::from_ref(&j),
            &[],
            &nodes,
            &failures(1, 10_000),
            11_000,
        );
        assert_eq!(plan.place.len(), 1);
        let plan = reconcile(
            std::slice::from_ref(&j),
            &[],
            &nodes,
            &failures(3, 10_000),
            13_000,
        );
        assert!(plan.place.is_empty(), "third failure waits 4 s");
        assert_eq!(reschedule_delay_ms(40), MAX_RESCHEDULE_DELAY_MS);
    }

    #[test]
    fn a_failed_allocation_is_replaced_off_the_node_it_failed_on() {
        let j = job("api", JobType::Service, 2, 2);
        let nodes = [node("n1", NodeStatus::Ready), node("n2", NodeStatus::Ready)];
        let allocs = [
            alloc("a1", "api", 2, "n1", AllocState::Failed),
            alloc("a2", "api", 2, "n2", AllocState::Running),
            // A failure of an older version says nothing about this one.
            alloc("a0", "api", 1, "n2", AllocState::Failed),
        ];
        let plan = reconcile(
            std::slice::from_ref(&j),
            &allocs,
            &nodes,
            &FailureCounts::new(),
            0,
        );
        assert_eq!(
            plan.place,
            vec![PlaceRequest {
                job: "api".into(),
                version: 2,
                count: 1,
                node: None,
                avoid: vec!["n1".into()],
            }]
        );
        // Nothing failed: nothing avoided.
        let plan = reconcile(&[j], &allocs[1..2], &nodes, &FailureCounts::new(), 0);
        assert_eq!(plan.place[0].avoid, Vec::<String>::new());
    }

    #[test]
    fn a_version_that_keeps_failing_is_not_replaced_forever() {
        let j = job("api", JobType::Service, 1, 1);
        let failures = FailureCounts::from([(
            ("api".to_string(), 1),
            Failures {
                count: MAX_FAILURES_PER_VERSION,
                last_ms: 0,
            },
        )]);
        let plan = reconcile(&[j], &[], &[node("n1", NodeStatus::Ready)], &failures, 0);
        assert!(plan.place.is_empty());
        assert!(matches!(plan.jobs[0], JobChange::Failing { .. }));
    }

    fn lifecycles(
        name: &str,
        schedule: Option<(&str, &str)>,
        max: Option<Duration>,
        since_ms: u64,
    ) -> Lifecycles {
        let lifecycle = Lifecycle {
            schedule: schedule.map(|(start, stop)| crate::manifest::LifecycleSchedule {
                start: start.into(),
                stop: stop.into(),
            }),
            max_runtime: max,
        };
        Lifecycles::from([(
            name.into(),
            LifecycleView {
                lifecycle,
                since_ms,
            },
        )])
    }

    /// 2026-11-23 (a Monday) at `h` o'clock UTC, in Unix ms.
    fn monday(h: u64) -> u64 {
        1_795_392_000_000 + h * 3_600_000
    }

    #[test]
    fn a_job_outside_its_window_stops_and_inside_it_runs() {
        let l = lifecycles("api", Some(("0 8 * * 1-5", "0 20 * * 1-5")), None, 0);
        let jobs = [job("api", JobType::Service, 2, 1)];
        let allocs = [
            alloc("a1", "api", 1, "n1", AllocState::Running),
            alloc("a2", "api", 1, "n1", AllocState::Running),
        ];
        let nodes = [node("n1", NodeStatus::Ready)];
        let f = FailureCounts::new();
        let off = reconcile_with_lifecycles(&jobs, &l, &allocs, &nodes, &f, monday(21));
        let why = "outside its lifecycle window (starts 0 8 * * 1-5)".to_string();
        assert_eq!(
            off.stop,
            vec![("a1".to_string(), why.clone()), ("a2".to_string(), why)]
        );
        assert!(off.place.is_empty() && off.jobs.is_empty());
        let off = reconcile_with_lifecycles(&jobs, &l, &[], &nodes, &f, monday(7));
        assert!(off.place.is_empty(), "nothing placed before the window");
        let on = reconcile_with_lifecycles(&jobs, &l, &[], &nodes, &f, monday(9));
        assert_eq!(on.place.len(), 1);
        assert_eq!(on.place[0].count, 2);
        let on = reconcile_with_lifecycles(&jobs, &l, &allocs, &nodes, &f, monday(9));
        assert!(on.stop.is_empty() && on.place.is_empty());
    }

    #[test]
    fn a_service_stops_after_max_runtime() {
        let l = lifecycles("api", None, Some(Duration::from_secs(3600)), monday(8));
        let jobs = [job("api", JobType::Service, 1, 1)];
        let allocs = [alloc("a1", "api", 1, "n1", AllocState::Running)];
        let nodes = [node("n1", NodeStatus::Ready)];
        let f = FailureCounts::new();
        let early = reconcile_with_lifecycles(&jobs, &l, &allocs, &nodes, &f, monday(8) + 1000);
        assert!(early.stop.is_empty());
        let late = reconcile_with_lifecycles(&jobs, &l, &allocs, &nodes, &f, monday(9) + 1);
        assert_eq!(
            late.stop,
            vec![("a1".to_string(), "exceeded maxRuntime 1h".to_string())]
        );
        assert!(late.fail.is_empty() && late.place.is_empty());
    }

    /// Regression (issue 12): a batch replica past `maxRuntime` was replaced, and
    /// the job ran five more times before its failures stopped it.
    #[test]
    fn a_batch_replica_past_max_runtime_fails_the_job_and_is_not_run_again() {
        let l = lifecycles("etl", None, Some(Duration::from_secs(60)), 0);
        let jobs = [job("etl", JobType::Batch, 2, 1)];
        let mut old = alloc("old", "etl", 1, "n1", AllocState::Running);
        old.created_ms = 1_000;
        let mut young = alloc("young", "etl", 1, "n1", AllocState::Running);
        young.created_ms = 50_000;
        let nodes = [node("n1", NodeStatus::Ready)];
        let f = FailureCounts::new();
        let plan = reconcile_with_lifecycles(
            &jobs,
            &l,
            &[old.clone(), young.clone()],
            &nodes,
            &f,
            61_001 + 1,
        );
        assert_eq!(
            plan.fail,
            vec![(
                "old".to_string(),
                FailureReason::MaxRuntime,
                "exceeded maxRuntime 1m".to_string()
            )]
        );
        assert!(plan.stop.is_empty());
        assert!(plan.place.is_empty(), "{plan:?}");
        assert!(
            matches!(&plan.jobs[..], [JobChange::Failing { version: 1, .. }]),
            "{plan:?}"
        );
        // Later passes, long after any back-off: still no replacement, still failing.
        old.state = AllocState::Failed;
        old.desired_run = false;
        old.failure = Some(FailureReason::MaxRuntime);
        let f = FailureCounts::from([(
            ("etl".to_string(), 1),
            Failures {
                count: 1,
                last_ms: 62_002,
            },
        )]);
        let plan = reconcile_with_lifecycles(&jobs, &l, &[old, young], &nodes, &f, 100_500);
        assert!(plan.fail.is_empty());
        assert!(plan.place.is_empty(), "{plan:?}");
        assert!(
            matches!(&plan.jobs[..], [JobChange::Failing { .. }]),
            "{plan:?}"
        );
    }

    #[test]
    fn without_lifecycles_nothing_changes() {
        let jobs = [job("api", JobType::Service, 1, 1)];
        let allocs = [alloc("a1", "api", 1, "n1", AllocState::Running)];
        let nodes = [node("n1", NodeStatus::Ready)];
        let plan = run(&jobs, &allocs, &nodes, u64::MAX / 2);
        assert!(plan.stop.is_empty() && plan.fail.is_empty() && plan.place.is_empty());
    }
}

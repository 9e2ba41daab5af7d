//! The job autoscaler's shell around the pure [`autoscale`] core.
//!
//! Every [`TICK`] it takes each `AutoScalingPolicy` that targets a job, builds the
//! job's [`Observations`] from real data (each live allocation's CPU, memory and
//! GPU usage against what it requested, from the agents' samples in the registry's
//! metrics windows, and the job's pending replicas from [`Workloads`]), calls
//! [`autoscale::decide`] with `now`, applies a change with [`Workloads::scale`] and
//! records an `autoscale.scaled` event whose message is the decision's explanation.
//!
//! Policies live in memory and in the [`Store`] as [`PolicyRecord`]s, with the
//! autoscaler's memory (last scale times, recent recommendations) so that a
//! restarted controller keeps its cooldowns and stabilization windows. The memory
//! is saved when the size changes and otherwise at most every [`PERSIST_EVERY`].
//!
//! **Architecture Invariant:** decisions come only from `autoscale::decide`; this
//! module reads inputs and carries out outputs. Policies that target a node pool
//! are kept and listed here but scaled by the pool manager.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use novacron_api::MetricsWindow;
use novacron_common::autoscale::{
    self, AutoScalingPolicy, MetricKind, Observations, Sample, Target, parse_policy,
};
use novacron_common::sync::lock;
use novacron_common::ticker::Ticker;
use novacron_common::wire::AllocState;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::services::events::{EventLog, NewEvent, kind};
use crate::services::workloads::{WorkloadError, Workloads};
pub use crate::state::policies::{DecisionRecord, PolicyRecord, RecommendationRecord, ScaleRecord};
use crate::state::registry::Registry;
use crate::state::store::{AllocRecord, Store, StoreError};
pub use novacron_api::{PolicyApplyResult, PolicyView};
use novacron_common::clock::unix_ms;

/// How often the autoscaler decides.
pub const TICK: Duration = Duration::from_secs(1);
/// The longest the autoscaler's memory goes unsaved while the size holds.
pub const PERSIST_EVERY: Duration = Duration::from_secs(5);
/// The actor prefix of the autoscaler's changes: `autoscaler (policy NAME)`.
pub const ACTOR: &str = "autoscaler";

/// Errors of policy operations.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The manifest is invalid (the message names file, line, field and what is
    /// accepted).
    #[error("{0}")]
    Invalid(String),
    /// Another policy scales the same target already.
    #[error(
        "policy {policy:?} targets {target}, which policy {other:?} scales already; delete {other:?} first or target something else (one policy per job or pool)"
    )]
    Conflict {
        /// The policy applied.
        policy: String,
        /// The target.
        target: String,
        /// The policy that has it.
        other: String,
    },
    /// No such policy.
    #[error("unknown policy {0:?}; `novacron policy list` shows the policies")]
    Unknown(String),
    /// Handing a job's replicas back to its manifest failed.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// Persisting failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The autoscaler: the policies and the loop that carries out their decisions.
#[derive(Debug)]
pub struct Autoscaler {
    policies: Mutex<BTreeMap<String, Entry>>,
    /// Node pools a policy targets: the size it decided (a floor the pool manager
    /// keeps) and the template's hourly price the pool manager reports.
    pools: Mutex<BTreeMap<String, PoolTarget>>,
    /// Prices nodes, so a job policy's `maxCostPerHour` knows a replica's price.
    pricing: novacron_common::cost::PriceCatalog,
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    workloads: Arc<Workloads>,
    events: Arc<EventLog>,
    /// Where the observations come from: the metrics history, else the
    /// registry's in-memory window.
    history: Option<Arc<crate::services::history::MetricsHistory>>,
}

#[derive(Debug)]
struct Entry {
    record: PolicyRecord,
    policy: AutoScalingPolicy,
    /// The job's pending replicas, one sample per tick, within the longest window.
    pending: VecDeque<Sample>,
    /// When the record was last saved (Unix ms).
    saved_at_ms: u64,
}

/// One tick's work on one policy, taken out of the lock.
struct Work {
    name: String,
    applied_at_unix_ms: u64,
    policy: AutoScalingPolicy,
    scale: ScaleRecord,
    pending: VecDeque<Sample>,
}

/// What the autoscaler knows of a targeted node pool.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct PoolTarget {
    /// The size the policy decided.
    size: Option<u32>,
    /// One node's hourly price (from the pool's template), for `maxCostPerHour`.
    unit_price: Option<f64>,
}

/// One tick's result for one policy.
struct Outcome {
    scale: ScaleRecord,
    pending: VecDeque<Sample>,
    decision: DecisionRecord,
    changed: bool,
}

impl Autoscaler {
    /// Loads the policies from the store. A stored policy that no longer parses
    /// is logged and left out (it can still be deleted).
    pub fn load(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        workloads: Arc<Workloads>,
        events: Arc<EventLog>,
    ) -> Result<Autoscaler, StoreError> {
        let mut policies = BTreeMap::new();
        for record in store.policies()? {
            match parse_policy(&record.file, &record.source) {
                Ok(policy) => {
                    let saved_at_ms = record.last_decision.as_ref().map_or(0, |d| d.at_unix_ms);
                    policies.insert(
                        record.name.clone(),
                        Entry {
                            record,
                            policy,
                            pending: VecDeque::new(),
                            saved_at_ms,
                        },
                    );
                }
                Err(error) => {
                    warn!(policy = %record.name, %error, "stored policy no longer parses; it is not applied")
                }
            }
        }
        Ok(Autoscaler {
            policies: Mutex::new(policies),
            pools: Mutex::default(),
            pricing: novacron_common::cost::PriceCatalog::default(),
            store,
            registry,
            workloads,
            events,
            history: None,
        })
    }

    /// Validates and stores a policy; the next tick acts on it. Updating a policy
    /// that keeps its target keeps the autoscaler's memory (cooldowns,
    /// recommendations); a policy that moves to another job hands the old job's
    /// replicas back to its manifest.
    pub fn apply(
        &self,
        file: &str,
        text: &str,
        by: &str,
        now: SystemTime,
    ) -> Result<PolicyApplyResult, PolicyError> {
        let policy = parse_policy(file, text).map_err(|e| PolicyError::Invalid(e.to_string()))?;
        let name = policy.name.clone();
        let target = policy.target.to_string();
        let mut policies = self.lock();
        if let Some(other) = policies
            .values()
            .find(|e| e.record.name != name && e.policy.target == policy.target)
        {
            return Err(PolicyError::Conflict {
                policy: name,
                target,
                other: other.record.name.clone(),
            });
        }
        let previous = policies.get(&name);
        if previous.is_some_and(|e| e.record.source == text) {
            return Ok(PolicyApplyResult {
                policy: name,
                target,
                outcome: "unchanged".into(),
            });
        }
        let kept = previous.filter(|e| e.policy.target == policy.target);
        let moved_from = previous
            .filter(|e| e.policy.target != policy.target)
            .and_then(|e| job_of(&e.policy).map(str::to_owned));
        let record = PolicyRecord {
            name: name.clone(),
            source: text.to_string(),
            file: file.to_string(),
            applied_by: by.to_string(),
            applied_at_unix_ms: unix_ms(now),
            scale: kept.map(|e| e.record.scale.clone()).unwrap_or_default(),
            last_decision: kept.and_then(|e| e.record.last_decision.clone()),
        };
        let pending = kept.map(|e| e.pending.clone()).unwrap_or_default();
        let outcome = if previous.is_some() {
            "updated"
        } else {
            "created"
        };
        self.store.put_policy(&record)?;
        policies.insert(
            name.clone(),
            Entry {
                record,
                policy,
                pending,
                saved_at_ms: unix_ms(now),
            },
        );
        drop(policies);
        if let Some(job) = moved_from {
            self.workloads.unscale(&job)?;
        }
        info!(policy = %name, %target, by, outcome, "policy applied");
        Ok(PolicyApplyResult {
            policy: name,
            target,
            outcome: outcome.into(),
        })
    }

    /// Deletes a policy; a job it scaled goes back to its manifest's replicas.
    /// Returns what it targeted.
    pub fn delete(&self, name: &str, by: &str) -> Result<String, PolicyError> {
        let mut policies = self.lock();
        let entry = policies.remove(name);
        let stored = self.store.delete_policy(name)?;
        drop(policies);
        let target = match &entry {
            Some(e) => e.policy.target.to_string(),
            None if stored => "a target it no longer parses to".to_string(),
            None => return Err(PolicyError::Unknown(name.to_string())),
        };
        if let Some(job) = entry.as_ref().and_then(|e| job_of(&e.policy)) {
            self.workloads.unscale(job)?;
        }
        info!(policy = name, %target, by, "policy deleted");
        Ok(target)
    }

    /// Every policy with its target's size and the latest decision.
    pub fn list(&self) -> Vec<PolicyView> {
        let policies: Vec<(PolicyRecord, AutoScalingPolicy)> = self
            .lock()
            .values()
            .map(|e| (e.record.clone(), e.policy.clone()))
            .collect();
        policies
            .into_iter()
            .map(|(record, policy)| {
                let (target_kind, current) = match &policy.target {
                    Target::Job(job) => (
                        "job",
                        self.workloads.job(job).ok().map(|d| d.summary.replicas),
                    ),
                    Target::Pool(pool) => ("pool", self.pool_target(pool).size),
                };
                PolicyView {
                    name: record.name,
                    target_kind: target_kind.into(),
                    target: policy.target.name().to_string(),
                    min_size: policy.spec.min_size,
                    max_size: policy.spec.max_size,
                    metrics: policy.spec.metrics.iter().map(describe_metric).collect(),
                    current,
                    last_decision: record.last_decision.map(Into::into),
                    file: record.file,
                    applied_by: record.applied_by,
                    applied_at_unix_ms: record.applied_at_unix_ms,
                }
            })
            .collect()
    }

    /// Runs the loop until `cancel` fires.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut ticker = Ticker::new(TICK, MissedTickBehavior::Delay, cancel.cancelled());
        while ticker.tick().await {
            let me = self.clone();
            if let Err(error) =
                tokio::task::spawn_blocking(move || me.tick(SystemTime::now())).await
            {
                warn!(%error, "autoscaler task failed");
            }
        }
    }

    /// One pass: decide every job policy at `wall` and carry the decisions out.
    pub fn tick(&self, wall: SystemTime) {
        let now_ms = unix_ms(wall);
        let work: Vec<Work> = self
            .lock()
            .values()
            .map(|e| Work {
                name: e.record.name.clone(),
                applied_at_unix_ms: e.record.applied_at_unix_ms,
                policy: e.policy.clone(),
                scale: e.record.scale.clone(),
                pending: e.pending.clone(),
            })
            .collect();
        let mut events = Vec::new();
        let mut done = Vec::new();
        for w in work {
            let outcome = self.step(&w, wall, now_ms, &mut events);
            done.push((w.name, w.applied_at_unix_ms, outcome));
        }
        let mut to_save = Vec::new();
        {
            let mut policies = self.lock();
            for (name, applied_at, outcome) in done {
                // Re-applied or deleted meanwhile: this pass's result is stale.
                let Some(e) = policies
                    .get_mut(&name)
                    .filter(|e| e.record.applied_at_unix_ms == applied_at)
                else {
                    continue;
                };
                e.record.scale = outcome.scale;
                e.record.last_decision = Some(outcome.decision);
                e.pending = outcome.pending;
                if outcome.changed || now_ms.saturating_sub(e.saved_at_ms) >= millis(PERSIST_EVERY)
                {
                    e.saved_at_ms = now_ms;
                    to_save.push(e.record.clone());
                }
            }
        }
        for record in &to_save {
            if let Err(error) = self.store.put_policy(record) {
                warn!(policy = %record.name, %error, "cannot save the autoscaler's state");
            }
        }
        if let Err(error) = self.events.record_all(events, wall) {
            warn!(%error, "cannot record autoscaler events");
        }
        self.release_orphans();
    }

    /// Decides one policy and carries out a change.
    fn step(&self, w: &Work, wall: SystemTime, now_ms: u64, events: &mut Vec<NewEvent>) -> Outcome {
        let policy = &w.policy;
        let hold = |current: u32, explanation: String| Outcome {
            scale: w.scale.clone(),
            pending: w.pending.clone(),
            decision: DecisionRecord {
                at_unix_ms: now_ms,
                from: current,
                to: current,
                explanation,
            },
            changed: false,
        };
        let Some(job) = job_of(policy) else {
            let Target::Pool(pool) = &policy.target else {
                return hold(0, format!("{} has no target", policy.target));
            };
            return self.step_pool(w, pool, now_ms, events);
        };
        let detail = match self.workloads.job_state(job) {
            Ok(d) => d,
            Err(_) => {
                return hold(
                    w.scale.current,
                    format!("{job} holds: job {job} does not exist; apply it to scale it"),
                );
            }
        };
        let current = detail.summary.replicas;
        if matches!(detail.summary.status.as_str(), "stopped" | "complete") {
            return hold(
                current,
                format!(
                    "{job} holds at {current}: the job is {}",
                    detail.summary.status
                ),
            );
        }
        let horizon = horizon(policy);
        let since_ms = now_ms.saturating_sub(millis(horizon));
        let forecast = policy
            .spec
            .trend
            .as_ref()
            .is_some_and(|t| t.history.is_some());
        // A forecast of the CPU in use reads every replica that ran within the
        // history, the ones gone since too: demand is what they used together.
        let ran: Vec<AllocRecord> = if forecast {
            detail
                .allocations
                .iter()
                .filter(|a| !a.state.is_terminal() || a.updated_unix_ms > since_ms)
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        let live: Vec<AllocRecord> = detail
            .allocations
            .into_iter()
            .filter(|a| a.desired_run && !a.state.is_terminal())
            .collect();
        let nodes: BTreeSet<&str> = live.iter().chain(&ran).map(|a| a.node.as_str()).collect();
        let windows: Vec<MetricsWindow> = nodes
            .into_iter()
            .filter_map(|n| self.window(n, since_ms))
            .collect();
        let mut obs = observations(&live, &windows, since_ms);
        if forecast {
            obs.cpu_used = cpu_used(&ran, &windows, since_ms, CPU_USED_BUCKET);
            // What one replica of the newest version requests.
            obs.cpu_request_millis = live
                .iter()
                .max_by_key(|a| (a.version, a.created_unix_ms))
                .map_or(0, |a| a.cpu_millis);
        }
        let mut pending = w.pending.clone();
        pending.push_back(Sample {
            at_ms: now_ms,
            value: f64::from(pending_replicas(current, &live)),
        });
        while pending.front().is_some_and(|s| s.at_ms <= since_ms) {
            pending.pop_front();
        }
        obs.pending = pending.iter().copied().collect();

        let mut state = w.scale.state(current);
        let views = self.registry.views(std::time::Instant::now());
        state.unit_price_per_hour = replica_price(&live, &views, &self.pricing);
        let decision = autoscale::decide(policy, &state, &obs, now_ms);
        let mut record = DecisionRecord {
            at_unix_ms: now_ms,
            from: decision.from,
            to: decision.to,
            explanation: decision.explanation.clone(),
        };
        if decision.changed() {
            let by = format!("{ACTOR} (policy {})", w.name);
            if let Err(error) =
                self.workloads
                    .scale(job, decision.to, &by, &decision.explanation, wall)
            {
                warn!(policy = %w.name, job, %error, "cannot scale");
                record.to = record.from;
                record.explanation = format!("{}; not carried out: {error}", record.explanation);
                return Outcome {
                    scale: w.scale.clone(),
                    pending,
                    decision: record,
                    changed: false,
                };
            }
            info!(policy = %w.name, job, from = decision.from, to = decision.to, explanation = %decision.explanation, "autoscaled");
            events.push(
                NewEvent::new(kind::AUTOSCALE, by, decision.explanation.clone())
                    .job(job)
                    .detail("policy", &w.name)
                    .detail("from", decision.from)
                    .detail("to", decision.to),
            );
        }
        state.record(policy, &decision, now_ms);
        Outcome {
            scale: ScaleRecord::from_state(&state),
            pending,
            decision: record,
            changed: decision.changed(),
        }
    }

    /// Decides a policy that targets a node pool: the pool's nodes' CPU, memory
    /// and GPU utilization and the replicas waiting for room → the size the pool
    /// manager then keeps as its floor (it adds nodes up to it; nodes above it go
    /// when idle, as always). `maxCostPerHour` reads the template's price.
    fn step_pool(&self, w: &Work, pool: &str, now_ms: u64, events: &mut Vec<NewEvent>) -> Outcome {
        let policy = &w.policy;
        let views = self.registry.views(std::time::Instant::now());
        let members: Vec<&novacron_api::NodeView> = views
            .iter()
            .filter(|v| {
                v.labels.get("pool").map(String::as_str) == Some(pool)
                    && v.status != novacron_common::fleet::NodeStatus::Down
            })
            .collect();
        let current = u32::try_from(members.len()).unwrap_or(u32::MAX);
        let since_ms = now_ms.saturating_sub(millis(horizon(policy)));
        let windows: Vec<MetricsWindow> = members
            .iter()
            .filter_map(|v| self.window(&v.name, since_ms))
            .collect();
        let mut obs = pool_observations(&windows, since_ms);
        let waiting: u32 = self.workloads.unplaced().iter().map(|d| d.count).sum();
        let mut pending = w.pending.clone();
        pending.push_back(Sample {
            at_ms: now_ms,
            value: f64::from(waiting),
        });
        while pending.front().is_some_and(|s| s.at_ms <= since_ms) {
            pending.pop_front();
        }
        obs.pending = pending.iter().copied().collect();
        let target = self.pool_target(pool);
        let mut state = w.scale.state(current);
        state.unit_price_per_hour = target.unit_price;
        let decision = autoscale::decide(policy, &state, &obs, now_ms);
        if decision.changed() || target.size != Some(decision.to) {
            self.pools_lock().entry(pool.to_owned()).or_default().size = Some(decision.to);
        }
        if decision.changed() {
            let by = format!("{ACTOR} (policy {})", w.name);
            info!(policy = %w.name, pool, from = decision.from, to = decision.to, explanation = %decision.explanation, "autoscaled pool");
            events.push(
                NewEvent::new(kind::AUTOSCALE, by, decision.explanation.clone())
                    .detail("policy", &w.name)
                    .detail("pool", pool)
                    .detail("from", decision.from)
                    .detail("to", decision.to),
            );
        }
        state.record(policy, &decision, now_ms);
        Outcome {
            scale: ScaleRecord::from_state(&state),
            pending,
            decision: DecisionRecord {
                at_unix_ms: now_ms,
                from: decision.from,
                to: decision.to,
                explanation: decision.explanation.clone(),
            },
            changed: decision.changed(),
        }
    }

    /// Reads observations from `history` (the metrics history) instead of the
    /// registry's short in-memory window.
    pub fn with_history(
        mut self,
        history: Option<Arc<crate::services::history::MetricsHistory>>,
    ) -> Autoscaler {
        self.history = history;
        self
    }

    /// A node's samples newer than `since_ms`: from the history when there is
    /// one, else the registry's window.
    fn window(&self, node: &str, since_ms: u64) -> Option<MetricsWindow> {
        match &self.history {
            Some(h) => Some(h.window(node, since_ms, std::time::SystemTime::now())),
            None => self.registry.window(node),
        }
    }

    /// Uses `pricing` for replica prices (the controller's pricing catalog).
    pub fn with_pricing(mut self, pricing: novacron_common::cost::PriceCatalog) -> Autoscaler {
        self.pricing = pricing;
        self
    }

    /// The size a policy decided for `pool`, if one targets it.
    pub fn pool_floor(&self, pool: &str) -> Option<u32> {
        let targeted = self
            .lock()
            .values()
            .any(|e| matches!(&e.policy.target, Target::Pool(p) if p == pool));
        if targeted {
            self.pool_target(pool).size
        } else {
            None
        }
    }

    /// The pool manager reports a pool's node price (its template's).
    pub fn note_pool_price(&self, pool: &str, price_per_hour: f64) {
        self.pools_lock()
            .entry(pool.to_owned())
            .or_default()
            .unit_price = Some(price_per_hour);
    }

    fn pool_target(&self, pool: &str) -> PoolTarget {
        self.pools_lock().get(pool).copied().unwrap_or_default()
    }

    fn pools_lock(&self) -> MutexGuard<'_, BTreeMap<String, PoolTarget>> {
        // Every mutation is a single field assignment.
        lock(&self.pools)
    }

    /// Hands back to their manifests the replicas of jobs the autoscaler scaled
    /// but no policy targets any more (a policy deleted while the controller was
    /// down, or a failed hand-back).
    fn release_orphans(&self) {
        let targeted: BTreeSet<String> = self
            .lock()
            .values()
            .filter_map(|e| job_of(&e.policy).map(str::to_owned))
            .collect();
        for (job, by) in self.workloads.scaled_jobs() {
            if by.starts_with(ACTOR)
                && !targeted.contains(&job)
                && let Err(error) = self.workloads.unscale(&job)
            {
                warn!(job, %error, "cannot hand replicas back to the manifest");
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Entry>> {
        // Every mutation is a single insert, remove or assignment.
        novacron_common::sync::lock(&self.policies)
    }
}

/// The hourly price of one replica of a job: the mean, over its live allocations
/// on known nodes, of the node's price times the share of it the allocation holds;
/// `None` before any replica is placed (a cost cap then waits for a price).
pub fn replica_price(
    live: &[AllocRecord],
    nodes: &[novacron_api::NodeView],
    pricing: &novacron_common::cost::PriceCatalog,
) -> Option<f64> {
    let prices: Vec<f64> = live
        .iter()
        .filter_map(|a| {
            let n = nodes.iter().find(|n| n.name == a.node)?;
            let node = pricing.node_hourly(&n.labels, &n.capacity).hourly;
            Some(
                node * novacron_common::cost::allocation_share(
                    a.cpu_millis,
                    a.memory_bytes,
                    &n.capacity,
                ),
            )
        })
        .collect();
    if prices.is_empty() {
        None
    } else {
        Some(prices.iter().sum::<f64>() / prices.len() as f64)
    }
}

/// Builds a node pool's utilization series from its nodes' metrics windows: one
/// sample per node sample newer than `since_ms`, in percent of the node (CPU: the
/// host's total; memory: used over total; GPU: the mean of its GPUs).
pub fn pool_observations(windows: &[MetricsWindow], since_ms: u64) -> Observations {
    let mut obs = Observations::default();
    for w in windows {
        for s in w.samples.iter().filter(|s| s.at_unix_ms > since_ms) {
            let at_ms = s.at_unix_ms;
            obs.cpu.push(Sample {
                at_ms,
                value: f64::from(s.cpu.total_percent),
            });
            if s.memory.total_bytes > 0 {
                obs.memory.push(Sample {
                    at_ms,
                    value: s.memory.used_bytes as f64 * 100.0 / s.memory.total_bytes as f64,
                });
            }
            if !s.gpus.is_empty() {
                let sum: f64 = s
                    .gpus
                    .iter()
                    .map(|g| f64::from(g.utilization_percent))
                    .sum();
                obs.gpu.push(Sample {
                    at_ms,
                    value: sum / s.gpus.len() as f64,
                });
            }
        }
    }
    obs
}

/// Builds a job's utilization series from its nodes' metrics windows: one sample
/// per allocation per node sample newer than `since_ms`, in percent of what the
/// allocation requested (CPU: `cpu_percent` is 100 per core, so `cpu_percent × 1000
/// / cpu_millis`; memory: bytes in use over bytes requested, else over the
/// container's limit), and GPU utilization averaged over the allocation's GPUs.
/// Allocations not in a sample (not started yet) add nothing; `pending` and
/// reported metrics are left empty for the caller.
pub fn observations(
    allocs: &[AllocRecord],
    windows: &[MetricsWindow],
    since_ms: u64,
) -> Observations {
    let mut obs = Observations::default();
    for w in windows {
        let mine: Vec<&AllocRecord> = allocs.iter().filter(|a| a.node == w.node).collect();
        if mine.is_empty() {
            continue;
        }
        for s in w.samples.iter().filter(|s| s.at_unix_ms > since_ms) {
            for a in &mine {
                let Some(u) = s.allocations.iter().find(|u| u.id == a.id) else {
                    continue;
                };
                let at_ms = s.at_unix_ms;
                if a.cpu_millis > 0 {
                    obs.cpu.push(Sample {
                        at_ms,
                        value: f64::from(u.cpu_percent) * 1000.0 / a.cpu_millis as f64,
                    });
                }
                let requested = if a.memory_bytes > 0 {
                    a.memory_bytes
                } else {
                    u.memory_limit_bytes
                };
                if requested > 0 {
                    obs.memory.push(Sample {
                        at_ms,
                        value: u.memory_bytes as f64 * 100.0 / requested as f64,
                    });
                }
                let gpus: Vec<f64> = s
                    .gpus
                    .iter()
                    .filter(|g| a.gpu_uuids.contains(&g.uuid))
                    .map(|g| f64::from(g.utilization_percent))
                    .collect();
                if !gpus.is_empty() {
                    obs.gpu.push(Sample {
                        at_ms,
                        value: gpus.iter().sum::<f64>() / gpus.len() as f64,
                    });
                }
            }
        }
    }
    for series in [&mut obs.cpu, &mut obs.memory, &mut obs.gpu] {
        series.sort_by_key(|s| s.at_ms);
    }
    obs
}

/// The bucket [`cpu_used`] sums the replicas' CPU over.
pub const CPU_USED_BUCKET: Duration = Duration::from_secs(5);

/// The CPU `allocs` used together, in millicores, one sample per `bucket` after
/// `since_ms` (at the bucket's end): each allocation's mean over the bucket,
/// summed over the allocations sampled in it. From the nodes' samples in
/// `windows` (`cpu_percent` is 100 per core).
pub fn cpu_used(
    allocs: &[AllocRecord],
    windows: &[MetricsWindow],
    since_ms: u64,
    bucket: Duration,
) -> Vec<Sample> {
    let bucket_ms = millis(bucket).max(1);
    let ids: BTreeSet<&str> = allocs.iter().map(|a| a.id.as_str()).collect();
    // (bucket, allocation) → (sum, count)
    let mut per: BTreeMap<(u64, &str), (f64, u32)> = BTreeMap::new();
    for w in windows {
        for s in w.samples.iter().filter(|s| s.at_unix_ms > since_ms) {
            let b = (s.at_unix_ms - since_ms - 1) / bucket_ms;
            for u in s.allocations.iter().filter(|u| ids.contains(u.id.as_str())) {
                let e = per.entry((b, u.id.as_str())).or_default();
                e.0 += f64::from(u.cpu_percent) * 10.0;
                e.1 += 1;
            }
        }
    }
    let mut sums: BTreeMap<u64, f64> = BTreeMap::new();
    for ((b, _), (sum, n)) in per {
        *sums.entry(b).or_default() += sum / f64::from(n);
    }
    sums.into_iter()
        .map(|(b, value)| Sample {
            at_ms: since_ms + (b + 1) * bucket_ms,
            value,
        })
        .collect()
}

/// Replicas wanted but not running yet: placed and pending, or not placed at all.
pub fn pending_replicas(wanted: u32, live: &[AllocRecord]) -> u32 {
    let placed_pending = live
        .iter()
        .filter(|a| a.state == AllocState::Pending)
        .count();
    let unplaced = (wanted as usize).saturating_sub(live.len());
    u32::try_from(placed_pending + unplaced).unwrap_or(u32::MAX)
}

/// The job a policy scales, if it scales a job.
fn job_of(policy: &AutoScalingPolicy) -> Option<&str> {
    match &policy.target {
        Target::Job(job) => Some(job),
        Target::Pool(_) => None,
    }
}

/// How far back the observations must reach: the longest metric window, or the
/// trend's forecast history.
fn horizon(policy: &AutoScalingPolicy) -> Duration {
    policy.lookback()
}

fn describe_metric(m: &autoscale::MetricSpec) -> String {
    let window = humantime::format_duration(m.window);
    if m.kind == MetricKind::Queue {
        format!("{} {} per replica over {window}", m.label(), m.target)
    } else {
        format!("{} {}% over {window}", m.kind, m.target)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use novacron_common::wire::{AllocationUsage, GpuSample, NodeSample};

    use super::*;

    fn alloc(id: &str, node: &str, cpu_millis: u64, gpus: &[&str]) -> AllocRecord {
        AllocRecord {
            restore: None,
            id: id.into(),
            job: "api".into(),
            version: 1,
            node: node.into(),
            desired_run: true,
            state: AllocState::Running,
            healthy: None,
            healthy_since_unix_ms: None,
            created_unix_ms: 0,
            updated_unix_ms: 0,
            restarts: 0,
            exit_code: None,
            message: String::new(),
            failure: None,
            cpu_millis,
            memory_bytes: 100 << 20,
            gpu_uuids: gpus.iter().map(|g| g.to_string()).collect(),
            priority: 50,
            disk_bytes: 0,
            ports: vec![],
            published: vec![],
            suspended: false,
            address: None,
        }
    }

    fn usage(id: &str, cpu_percent: f32, memory_mib: u64) -> AllocationUsage {
        AllocationUsage {
            id: id.into(),
            cpu_percent,
            memory_bytes: memory_mib << 20,
            memory_limit_bytes: 100 << 20,
            ..AllocationUsage::default()
        }
    }

    fn sample(at: u64, allocs: Vec<AllocationUsage>, gpus: &[(&str, u32)]) -> NodeSample {
        NodeSample {
            seq: at,
            at_unix_ms: at,
            allocations: allocs,
            gpus: gpus
                .iter()
                .map(|(uuid, util)| GpuSample {
                    uuid: uuid.to_string(),
                    utilization_percent: *util,
                    ..GpuSample::default()
                })
                .collect(),
            ..NodeSample::default()
        }
    }

    #[test]
    fn a_replica_costs_its_share_of_its_node() {
        let node = novacron_api::NodeView {
            name: "n1".into(),
            status: novacron_common::fleet::NodeStatus::Ready,
            labels: [("price_per_hour".to_string(), "2.0".to_string())].into(),
            capacity: novacron_common::wire::Capacity {
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
                ..Default::default()
            },
            capabilities: Default::default(),
            agent_version: String::new(),
            address: None,
            enrolled_at_unix_ms: 0,
            last_seen_unix_ms: None,
            cert_expires_unix_ms: None,
            samples_dropped: 0,
            cordoned: false,
            warm: false,
            latest: None,
            images: 0,
            image_bytes: 0,
        };
        let pricing = novacron_common::cost::PriceCatalog::default();
        // 250m of a 1-core node priced 2.0/h: 0.5/h (its 100 MiB is a smaller share).
        let live = [alloc("a1", "n1", 250, &[])];
        assert_eq!(
            replica_price(&live, std::slice::from_ref(&node), &pricing),
            Some(0.5)
        );
        assert_eq!(replica_price(&[], &[node], &pricing), None);
    }

    #[test]
    fn pool_usage_is_a_percentage_of_each_node() {
        let mut busy = sample(2_000, vec![], &[("g0", 80), ("g1", 40)]);
        busy.cpu.total_percent = 90.0;
        busy.memory.total_bytes = 1000;
        busy.memory.used_bytes = 250;
        let mut old = sample(500, vec![], &[]);
        old.cpu.total_percent = 10.0;
        let windows = [MetricsWindow {
            node: "p1".into(),
            samples: vec![old, busy],
        }];
        let obs = pool_observations(&windows, 1_000);
        let cpu: Vec<(u64, f64)> = obs.cpu.iter().map(|s| (s.at_ms, s.value)).collect();
        assert_eq!(
            cpu,
            vec![(2_000, 90.0)],
            "the sample before the window is left out"
        );
        assert_eq!(obs.memory[0].value, 25.0);
        assert_eq!(obs.gpu[0].value, 60.0);
    }

    #[test]
    fn usage_is_a_percentage_of_what_each_allocation_requested() {
        // a1 asks for 100m and burns a tenth of a core: 100%. a2 asks for 500m and
        // uses a quarter core: 50%. The other job's allocation is not counted.
        let allocs = [alloc("a1", "n1", 100, &[]), alloc("a2", "n2", 500, &[])];
        let windows = [
            MetricsWindow {
                node: "n1".into(),
                samples: vec![
                    sample(1_000, vec![usage("a1", 10.0, 25)], &[]),
                    sample(
                        2_000,
                        vec![usage("a1", 10.0, 50), usage("other", 90.0, 90)],
                        &[],
                    ),
                ],
            },
            MetricsWindow {
                node: "n2".into(),
                samples: vec![sample(2_500, vec![usage("a2", 25.0, 75)], &[])],
            },
        ];
        let obs = observations(&allocs, &windows, 0);
        let cpu: Vec<(u64, f64)> = obs.cpu.iter().map(|s| (s.at_ms, s.value)).collect();
        assert_eq!(cpu, vec![(1_000, 100.0), (2_000, 100.0), (2_500, 50.0)]);
        let mem: Vec<f64> = obs.memory.iter().map(|s| s.value).collect();
        assert_eq!(mem, vec![25.0, 50.0, 75.0]);
        assert!(obs.gpu.is_empty() && obs.pending.is_empty());
    }

    #[test]
    fn the_cpu_in_use_sums_each_replicas_mean_over_a_bucket_gone_replicas_too() {
        // a1 on n1 and a2 on n2 (a2 gone since: the caller passes it too), one
        // sample a second, out of step with each other; `other` belongs to
        // another job and adds nothing.
        let allocs = [alloc("a1", "n1", 1000, &[]), alloc("a2", "n2", 1000, &[])];
        let n1 = (1..=10)
            .map(|i| {
                sample(
                    i * 1000,
                    vec![usage("a1", 50.0, 10), usage("other", 300.0, 10)],
                    &[],
                )
            })
            .collect();
        let n2 = (0..5)
            .map(|i| sample(i * 1000 + 500, vec![usage("a2", 20.0 + i as f32, 10)], &[]))
            .collect();
        let windows = [
            MetricsWindow {
                node: "n1".into(),
                samples: n1,
            },
            MetricsWindow {
                node: "n2".into(),
                samples: n2,
            },
        ];
        let used = cpu_used(&allocs, &windows, 0, Duration::from_secs(5));
        // (0, 5 s]: a1 500m, a2 the mean of 200m..240m at 0.5-4.5 s = 220m;
        // (5, 10 s]: a1 alone.
        assert_eq!(
            used,
            [
                Sample {
                    at_ms: 5_000,
                    value: 720.0
                },
                Sample {
                    at_ms: 10_000,
                    value: 500.0
                }
            ]
        );
    }

    #[test]
    fn samples_before_the_window_and_unstarted_allocations_add_nothing() {
        let allocs = [alloc("a1", "n1", 100, &[]), alloc("new", "n1", 100, &[])];
        let windows = [MetricsWindow {
            node: "n1".into(),
            samples: vec![
                sample(1_000, vec![usage("a1", 50.0, 10)], &[]),
                sample(5_000, vec![usage("a1", 5.0, 10)], &[]),
            ],
        }];
        let obs = observations(&allocs, &windows, 1_000);
        assert_eq!(obs.cpu.len(), 1);
        assert_eq!(obs.cpu[0].value, 50.0);
    }

    #[test]
    fn gpu_utilization_averages_the_allocations_own_gpus() {
        let allocs = [alloc("a1", "n1", 0, &["GPU-a", "GPU-b"])];
        let windows = [MetricsWindow {
            node: "n1".into(),
            samples: vec![sample(
                1_000,
                vec![usage("a1", 0.0, 10)],
                &[("GPU-a", 80), ("GPU-b", 40), ("GPU-c", 100)],
            )],
        }];
        let obs = observations(&allocs, &windows, 0);
        assert_eq!(obs.gpu.len(), 1);
        assert_eq!(obs.gpu[0].value, 60.0);
        assert!(obs.cpu.is_empty(), "no CPU request, no CPU utilization");
    }

    #[test]
    fn pending_counts_placed_but_not_started_and_unplaced_replicas() {
        let mut starting = alloc("a2", "n1", 100, &[]);
        starting.state = AllocState::Pending;
        let live = [alloc("a1", "n1", 100, &[]), starting];
        assert_eq!(pending_replicas(2, &live), 1);
        assert_eq!(pending_replicas(4, &live), 3);
        assert_eq!(pending_replicas(1, &live[..1]), 0);
    }

    #[test]
    fn the_persisted_state_round_trips_through_the_core() {
        let text = "apiVersion: novacron.io/v1\nkind: AutoScalingPolicy\nmetadata: {name: p}\nspec:\n  target: {job: api}\n  minSize: 1\n  maxSize: 10\n  metrics:\n    - {type: cpu, target: 50, window: 5s}\n  scaleOut: {cooldown: 2s, step: 100%, stabilizationWindow: 0s}\n";
        let policy = parse_policy("p.yaml", text).unwrap_or_else(|e| panic!("{e}"));
        let allocs = [alloc("a1", "n1", 100, &[])];
        let windows = [MetricsWindow {
            node: "n1".into(),
            samples: vec![sample(9_000, vec![usage("a1", 10.0, 10)], &[])],
        }];
        let obs = observations(&allocs, &windows, 5_000);
        let mut state = ScaleRecord::default().state(1);
        let d = autoscale::decide(&policy, &state, &obs, 10_000);
        assert_eq!((d.from, d.to), (1, 2), "{}", d.explanation);
        assert!(
            d.explanation.starts_with("api 1 → 2: cpu 100%"),
            "{}",
            d.explanation
        );
        state.record(&policy, &d, 10_000);
        let saved = ScaleRecord::from_state(&state);
        assert_eq!(saved.last_scale_out_unix_ms, Some(10_000));
        assert_eq!(saved.state(2), state);
        // Restored, the cooldown still holds the next scale-out.
        let d = autoscale::decide(&policy, &saved.state(2), &obs, 11_000);
        assert_eq!(d.to, 2, "{}", d.explanation);
        assert!(d.explanation.contains("cooldown"), "{}", d.explanation);
    }

    /// The API's view of a decision has the record's JSON.
    #[test]
    fn decision_view_json_is_the_records() {
        let record = DecisionRecord {
            at_unix_ms: 1_700_000_000_000,
            from: 4,
            to: 6,
            explanation: "api 4 → 6: cpu 91% over 5m, target 75%".into(),
        };
        let want = serde_json::to_string(&record).expect("record JSON");
        let got =
            serde_json::to_string(&novacron_api::DecisionView::from(record)).expect("view JSON");
        assert_eq!(got, want);
    }
}

//! The reconciler: the supervisor's I/O-free core.
//!
//! It holds the desired set and what it knows of every allocation. The shell feeds
//! it three things, each with the time: a new desired set ([`Reconciler::apply`]),
//! an observation of the node's containers ([`Reconciler::observe`]) and the outcome
//! of an action it asked for ([`Reconciler::complete`]). In return
//! [`Reconciler::plan`] says what to do next, [`Reconciler::next_deadline`] when to
//! ask again, and [`Reconciler::report`] what to tell the controller.
//!
//! Rules it keeps:
//! - One action at a time per allocation. Observations taken before an allocation's
//!   last change are ignored for it (each change bumps an epoch; an observation
//!   carries the epoch it started at), so a slow listing never causes a second
//!   container.
//! - Nothing is created before the first observation after an allocation appeared,
//!   so a restarted agent adopts its containers instead of doubling them.
//! - Nothing is removed as an orphan before the first desired set has arrived, so a
//!   restarted agent that has not yet heard from the controller stops nothing; a
//!   container listed as an orphan before then is its allocation's once a set wants
//!   it (adopted at the next observation, not removed).
//! - A missing image fails the allocation once; it is tried again only for a new
//!   spec.
//! - A batch task (`TaskSpec::batch`) that exits 0 is complete. Any other exit, and
//!   every exit of a service, is a failure that the restart policy handles.
//! - Health checks follow [`super::probes`]: a failed startup or liveness check
//!   stops the container, then the health restart budget decides (restart after a
//!   backoff, or fail with [`FailureReason::Unhealthy`]); a failed readiness check
//!   only changes the reported health. Health restarts do not count against the
//!   restart policy, which is about exits.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use novacron_common::wire::{
    AllocState, AllocationReport, AllocationSpec, AllocationStatus, DesiredAllocations,
    FailureReason, HealthCheckKind, HealthSpec, PublishedPort, RestoreFrom,
};

use super::probes::{self, HealthRestart, Probes, RestartBudget, Verdict};
pub use super::probes::{DEFAULT_PROBE_TIMEOUT, MIN_PROBE_INTERVAL, ProbeRole};
use super::restart::{RestartDecision, RestartWindow};
use super::spec::{alloc_labels, spec_hash};
use super::{ContainerDetails, ContainerStatus, RuntimeError};

/// How long to wait before trying again to remove a container that would not go.
pub const DEFAULT_REMOVE_RETRY: Duration = Duration::from_secs(5);

/// Settings of the core.
#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    /// The node's name (in messages).
    pub node_name: String,
    /// Wait between attempts to remove a container that would not go.
    pub remove_retry: Duration,
}

impl ReconcilerConfig {
    /// Defaults for `node_name`.
    pub fn new(node_name: impl Into<String>) -> Self {
        ReconcilerConfig {
            node_name: node_name.into(),
            remove_retry: DEFAULT_REMOVE_RETRY,
        }
    }
}

/// One managed container as observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Container id.
    pub container_id: String,
    /// Its [`LABEL_ALLOC`](super::LABEL_ALLOC).
    pub alloc_id: String,
    /// Its [`LABEL_SPEC`](super::LABEL_SPEC) (empty when missing).
    pub spec_hash: String,
    /// Where it is in its life.
    pub status: ContainerStatus,
    /// When its current (or last) run started, Unix ms.
    pub started_at_unix_ms: Option<u64>,
    /// Its address.
    pub ip: Option<IpAddr>,
    /// Its ports as published on the host.
    pub published: Vec<PublishedPort>,
    /// Running but paused (a suspended guest).
    pub paused: bool,
}

impl Observed {
    /// The observation of a container, or `None` when it is not an allocation's.
    pub fn from_details(details: ContainerDetails) -> Option<Observed> {
        let (alloc, hash) = alloc_labels(&details.labels)?;
        Some(Observed {
            alloc_id: alloc.to_owned(),
            spec_hash: hash.to_owned(),
            container_id: details.id,
            status: details.status,
            started_at_unix_ms: details.started_at_unix_ms,
            ip: details.ip,
            published: details.published,
            paused: details.paused,
        })
    }
}

/// Something the shell should do. Every action is answered by one [`Outcome`].
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Stop and remove `replace` (when set), then check the image, create the
    /// container and start it.
    Launch {
        /// Allocation id.
        alloc: String,
        /// What to run.
        spec: Arc<AllocationSpec>,
        /// [`spec_hash`] of `spec.task`.
        spec_hash: String,
        /// A container of the allocation to remove first.
        replace: Option<String>,
    },
    /// Start the allocation's existing (exited) container again.
    Start {
        /// Allocation id.
        alloc: String,
        /// The container.
        container_id: String,
    },
    /// Stop (with the grace period) and remove a container.
    Remove {
        /// The allocation it belongs to.
        alloc: String,
        /// The container.
        container_id: String,
    },
    /// Stop a running container (with the grace period) and keep it: a health
    /// check failed, and the container is started again or the allocation fails.
    Stop {
        /// Allocation id.
        alloc: String,
        /// The container.
        container_id: String,
    },
    /// Pause (`paused`) or resume a running guest: the desired set suspends
    /// or resumes it.
    Pause {
        /// Allocation id.
        alloc: String,
        /// The container (a VM).
        container_id: String,
        /// Pause, or resume.
        paused: bool,
    },
    /// Run one health check.
    Probe {
        /// Allocation id.
        alloc: String,
        /// The container checked.
        container_id: String,
        /// Which of the allocation's checks.
        role: ProbeRole,
        /// What to check.
        check: HealthCheckKind,
        /// The container's address (HTTP and TCP checks).
        ip: Option<IpAddr>,
        /// How long the check may take.
        timeout: Duration,
    },
}

/// A container that runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    /// Container id.
    pub container_id: String,
    /// When it started, Unix ms.
    pub started_at_unix_ms: Option<u64>,
    /// Its address.
    pub ip: Option<IpAddr>,
    /// Its ports as published on the host.
    pub published: Vec<PublishedPort>,
    /// The registry digest of its image, when known (a launch reads it; an
    /// adopted container keeps the one reported before).
    pub image_digest: Option<String>,
}

/// Why a launch failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchError {
    /// The image is not on the node.
    ImageMissing {
        /// The image reference.
        image: String,
    },
    /// The image could not be pulled (a failed start: restarts back off).
    PullFailed {
        /// The image reference.
        image: String,
        /// Why, in the words of [`super::PullError`].
        message: String,
    },
    /// The container being replaced could not be removed; it is still there.
    Replace {
        /// What went wrong.
        message: String,
    },
    /// Restoring the allocation's checkpoint into its new container failed.
    RestoreFailed {
        /// The container, created but not started.
        container_id: String,
        /// What went wrong.
        message: String,
    },
    /// Anything else; the container exists when it was created but did not start.
    Failed {
        /// The container, when it was created.
        container_id: Option<String>,
        /// What went wrong.
        message: String,
    },
}

/// What became of an [`Action`].
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Answers [`Action::Launch`].
    Launched {
        /// Allocation id.
        alloc: String,
        /// The hash that was launched.
        spec_hash: String,
        /// The running container, or why there is none.
        result: Result<Run, LaunchError>,
    },
    /// Answers [`Action::Start`].
    Started {
        /// Allocation id.
        alloc: String,
        /// The container.
        container_id: String,
        /// The run, or why it did not start.
        result: Result<Run, RuntimeError>,
    },
    /// Answers [`Action::Remove`].
    Removed {
        /// Allocation id.
        alloc: String,
        /// The container.
        container_id: String,
        /// Done (a container already gone counts as done), or why not.
        result: Result<(), RuntimeError>,
    },
    /// Answers [`Action::Stop`].
    Stopped {
        /// Allocation id.
        alloc: String,
        /// The container.
        container_id: String,
        /// Stopped (a container already gone counts as stopped), or why not.
        result: Result<(), RuntimeError>,
    },
    /// Answers [`Action::Pause`].
    Paused {
        /// Allocation id.
        alloc: String,
        /// The container.
        container_id: String,
        /// Paused, or resumed.
        paused: bool,
        /// Done, or why not.
        result: Result<(), RuntimeError>,
    },
    /// Answers [`Action::Probe`].
    Probed {
        /// Allocation id.
        alloc: String,
        /// The container checked.
        container_id: String,
        /// Which of the allocation's checks.
        role: ProbeRole,
        /// Healthy, or why not.
        result: Result<(), String>,
    },
}

/// A running allocation (for usage readings).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningAlloc {
    /// Allocation id.
    pub alloc: String,
    /// Its container.
    pub container_id: String,
    /// Its memory limit, bytes (0: none).
    pub memory_limit_bytes: u64,
}

/// The supervisor's I/O-free core (see the module documentation).
#[derive(Debug)]
pub struct Reconciler {
    config: ReconcilerConfig,
    /// `(epoch, generation)` of the desired set in force.
    applied: Option<(u64, u64)>,
    records: BTreeMap<String, Record>,
    orphans: BTreeMap<String, Orphan>,
    epoch: u64,
    runtime_error: Option<String>,
    /// Allocations held for a migration, until when: nothing is done to them or their
    /// containers (no restart after the checkpoint stopped them, no removal when they
    /// leave the desired set) until released or expired.
    holds: BTreeMap<String, Instant>,
}

impl Reconciler {
    /// An empty core: no desired set yet, nothing observed.
    pub fn new(config: ReconcilerConfig) -> Self {
        Reconciler {
            config,
            applied: None,
            records: BTreeMap::new(),
            orphans: BTreeMap::new(),
            epoch: 0,
            runtime_error: None,
            holds: BTreeMap::new(),
        }
    }

    /// Holds `alloc` until `until` (see [`Reconciler::release`]).
    pub fn hold(&mut self, alloc: &str, until: Instant) {
        self.holds.insert(alloc.to_string(), until);
        if let Some(rec) = self.records.get_mut(alloc) {
            rec.message = "held for a checkpoint or migration".into();
        }
    }

    /// Ends the hold on `alloc`; what is observed next decides what happens to it.
    /// Returns whether it was held.
    pub fn release(&mut self, alloc: &str, restore: Option<RestoreFrom>) -> bool {
        self.epoch += 1;
        if let Some(rec) = self.records.get_mut(alloc) {
            rec.changed_epoch = self.epoch;
            // What was known before the hold is stale: wait for a fresh look.
            rec.state = AllocState::Pending;
            rec.observed = false;
            rec.message = "released; looking at its container".into();
            if let (Some(from), Some(desired)) = (restore, rec.desired.as_mut()) {
                let mut spec = (*desired.spec).clone();
                spec.restore = Some(from);
                desired.spec = Arc::new(spec);
            }
        }
        self.holds.remove(alloc).is_some()
    }

    /// Whether `alloc` is held at `now`.
    pub fn is_held(&self, alloc: &str, now: Instant) -> bool {
        self.holds.get(alloc).is_some_and(|until| *until > now)
    }

    /// Replaces the desired set. Returns `false` (and changes nothing) when
    /// `desired` is older than the set in force: sets are ordered by the
    /// controller's epoch first, then by generation, so a restarted controller
    /// (a newer epoch, generations counting from 1 again) is obeyed and a set from
    /// an older epoch is refused.
    pub fn apply(&mut self, desired: DesiredAllocations) -> bool {
        let version = (desired.epoch, desired.generation);
        if self.applied.is_some_and(|applied| version < applied) {
            return false;
        }
        self.applied = Some(version);
        self.epoch += 1;
        let mut wanted = BTreeMap::new();
        for spec in desired.allocations {
            let hash = spec_hash(&spec.task);
            wanted.insert(
                spec.id.clone(),
                Desired {
                    spec: Arc::new(spec),
                    hash,
                },
            );
        }
        for (id, rec) in &mut self.records {
            if wanted.contains_key(id) {
                continue;
            }
            if let Some(old) = rec.desired.take() {
                rec.message = "stopping: no longer desired on this node".into();
                let delay = old.spec.task.shutdown_delay_ms;
                if delay > 0 && rec.state == AllocState::Running && rec.container.is_some() {
                    rec.shutdown_delay = Some(Duration::from_millis(delay));
                }
            }
        }
        for (id, desired) in wanted {
            match self.records.get_mut(&id) {
                Some(rec) => rec.desired = Some(desired),
                None => {
                    self.records.insert(id, Record::new(desired, self.epoch));
                }
            }
        }
        // Containers listed as orphans before their allocation was wanted (a
        // restarted agent lists before the first set arrives) are its own: the
        // next observation attaches them to the allocation (or orphans a second
        // one again). Those already being removed stay orphans.
        let records = &self.records;
        self.orphans
            .retain(|_, o| o.busy || !records.contains_key(&o.alloc));
        true
    }

    /// The generation of the desired set in force.
    pub fn generation(&self) -> Option<u64> {
        self.applied.map(|(_, generation)| generation)
    }

    /// The controller epoch of the desired set in force.
    pub fn controller_epoch(&self) -> Option<u64> {
        self.applied.map(|(epoch, _)| epoch)
    }

    /// Call before listing the containers; pass the token to [`Reconciler::observe`].
    pub fn observe_begin(&self) -> u64 {
        self.epoch
    }

    /// The listing begun at `token` could not be made.
    pub fn observe_failed(&mut self, error: String) {
        self.runtime_error = Some(error);
    }

    /// The last error of the container runtime, until an observation succeeds.
    pub fn runtime_error(&self) -> Option<&str> {
        self.runtime_error.as_deref()
    }

    /// Takes in every managed container of the node, as listed from `token` on.
    pub fn observe(&mut self, now: Instant, token: u64, observed: Vec<Observed>) {
        self.runtime_error = None;
        let busy_orphans: HashSet<&String> = self
            .orphans
            .iter()
            .filter(|(_, o)| o.busy)
            .map(|(id, _)| id)
            .collect();
        self.holds.retain(|_, until| *until > now);
        let mut by_alloc: HashMap<String, Vec<Observed>> = HashMap::new();
        for o in observed {
            if self.holds.contains_key(&o.alloc_id) {
                continue;
            }
            if !busy_orphans.contains(&o.container_id) {
                by_alloc.entry(o.alloc_id.clone()).or_default().push(o);
            }
        }
        let mut orphaned = Vec::new();
        for (id, rec) in &mut self.records {
            let mine = by_alloc.remove(id).unwrap_or_default();
            if rec.busy || rec.changed_epoch > token || self.holds.contains_key(id) {
                // Taken before this allocation's last change: says nothing about it.
                continue;
            }
            let (primary, extra) = choose_primary(rec, mine);
            orphaned.extend(extra);
            rec.observe(now, primary);
            rec.observed = true;
        }
        orphaned.extend(by_alloc.into_values().flatten());
        let seen: HashSet<&String> = orphaned.iter().map(|o| &o.container_id).collect();
        self.orphans.retain(|id, o| o.busy || seen.contains(id));
        for o in orphaned {
            let state = match &o.status {
                ContainerStatus::Created => AllocState::Pending,
                ContainerStatus::Running => AllocState::Running,
                ContainerStatus::Exited { code: 0, .. } => AllocState::Complete,
                ContainerStatus::Exited { .. } => AllocState::Failed,
            };
            let entry = self.orphans.entry(o.container_id).or_insert(Orphan {
                alloc: o.alloc_id,
                state,
                busy: false,
                retry_at: None,
            });
            entry.state = state;
        }
    }

    /// Takes in the outcome of an action.
    pub fn complete(&mut self, now: Instant, outcome: Outcome) {
        self.epoch += 1;
        let epoch = self.epoch;
        match outcome {
            Outcome::Launched {
                alloc,
                spec_hash,
                result,
            } => {
                let node = &self.config.node_name;
                let Some(rec) = self.records.get_mut(&alloc) else {
                    return;
                };
                rec.busy = false;
                rec.changed_epoch = epoch;
                match result {
                    Ok(run) => {
                        rec.container = Some(Container {
                            id: run.container_id.clone(),
                            hash: spec_hash,
                        });
                        rec.enter_running(now, run, "started");
                    }
                    Err(LaunchError::ImageMissing { image }) => {
                        rec.lacks_image(format!(
                            "image {image:?} is not present on node {node} and its pullPolicy is never; build or load it there, or let the node pull it"
                        ));
                    }
                    Err(LaunchError::PullFailed { image, message }) => {
                        let what =
                            format!("could not pull image {image:?} on node {node}: {message}");
                        if rec
                            .desired
                            .as_ref()
                            .is_some_and(|d| d.spec.restore.is_some())
                        {
                            // A restore (a migration's target, a replacement from a
                            // checkpoint) does not wait for a registry: it fails at
                            // once, with why, and the controller moves on.
                            rec.lacks_image(what);
                        } else {
                            rec.failed_run(now, None, what);
                        }
                    }
                    Err(LaunchError::Replace { message }) => {
                        rec.failed_run(
                            now,
                            None,
                            format!("could not remove the container it replaces: {message}"),
                        );
                    }
                    Err(LaunchError::Failed {
                        container_id,
                        message,
                    }) => {
                        rec.container = container_id.map(|id| Container {
                            id,
                            hash: spec_hash,
                        });
                        rec.failed_run(now, None, format!("could not start: {message}"));
                    }
                    Err(LaunchError::RestoreFailed {
                        container_id,
                        message,
                    }) => {
                        rec.container = Some(Container {
                            id: container_id,
                            hash: spec_hash,
                        });
                        rec.restore_failed = true;
                        rec.failed_run(
                            now,
                            None,
                            format!("could not restore its checkpoint: {message}"),
                        );
                    }
                }
            }
            Outcome::Started {
                alloc,
                container_id,
                result,
            } => {
                let Some(rec) = self.records.get_mut(&alloc) else {
                    return;
                };
                rec.busy = false;
                rec.changed_epoch = epoch;
                match result {
                    Ok(run) => rec.enter_running(now, run, "restarted"),
                    Err(e) => {
                        if e.is_not_found()
                            && rec.container.as_ref().is_some_and(|c| c.id == container_id)
                        {
                            rec.container = None;
                        }
                        rec.failed_run(now, None, format!("could not restart: {e}"));
                    }
                }
            }
            Outcome::Removed {
                alloc,
                container_id,
                result,
            } => {
                let retry_at = now + self.config.remove_retry;
                let done = match &result {
                    Ok(()) => true,
                    Err(e) => e.is_not_found(),
                };
                if let Some(orphan) = self.orphans.get_mut(&container_id) {
                    orphan.busy = false;
                    if done {
                        self.orphans.remove(&container_id);
                    } else {
                        orphan.retry_at = Some(retry_at);
                    }
                    return;
                }
                let Some(rec) = self.records.get_mut(&alloc) else {
                    return;
                };
                rec.busy = false;
                rec.changed_epoch = epoch;
                if !done {
                    rec.retry_at = Some(retry_at);
                    if let Err(e) = result {
                        rec.message = format!("cannot remove the container: {e}");
                    }
                    return;
                }
                rec.retry_at = None;
                if rec.container.as_ref().is_some_and(|c| c.id == container_id) {
                    rec.container = None;
                }
                if rec.desired.is_none() {
                    if rec.container.is_none() {
                        self.records.remove(&alloc);
                    }
                } else {
                    // Desired again while it was being removed: start over once the
                    // next observation has been taken.
                    rec.reset_for_new_spec();
                    rec.observed = false;
                }
            }
            Outcome::Stopped {
                alloc,
                container_id,
                result,
            } => {
                let retry_at = now + self.config.remove_retry;
                let Some(rec) = self.records.get_mut(&alloc) else {
                    return;
                };
                rec.busy = false;
                rec.changed_epoch = epoch;
                match result {
                    Err(e) if !e.is_not_found() => {
                        // Still running: try again later; nothing else changes.
                        rec.retry_at = Some(retry_at);
                        rec.message = format!("cannot stop the unhealthy container: {e}");
                    }
                    _ => {
                        rec.retry_at = None;
                        if rec.container.as_ref().is_some_and(|c| c.id == container_id) {
                            rec.health_stopped(now);
                        }
                    }
                }
            }
            Outcome::Paused {
                alloc,
                container_id,
                paused,
                result,
            } => {
                let retry_at = now + self.config.remove_retry;
                let Some(rec) = self.records.get_mut(&alloc) else {
                    return;
                };
                rec.busy = false;
                rec.changed_epoch = epoch;
                if rec.container.as_ref().is_none_or(|c| c.id != container_id) {
                    return;
                }
                match result {
                    Ok(()) => {
                        rec.retry_at = None;
                        rec.paused = paused;
                        if paused {
                            rec.message = "suspended: the guest is paused".into();
                        } else {
                            rec.message = "resumed".into();
                            // Checks start over, with their initial delays.
                            rec.probes = rec.health().map(|h| Probes::start(h, now));
                        }
                    }
                    // Gone: the next observation says what became of it.
                    Err(e) if e.is_not_found() => {}
                    Err(e) => {
                        rec.retry_at = Some(retry_at);
                        rec.message =
                            format!("cannot {}: {e}", if paused { "suspend" } else { "resume" });
                    }
                }
            }
            Outcome::Probed {
                alloc,
                container_id,
                role,
                result,
            } => {
                let Some(rec) = self.records.get_mut(&alloc) else {
                    return;
                };
                let Some(health) = rec.health().cloned() else {
                    rec.probes = None;
                    return;
                };
                // A result taken while the guest was being suspended, or
                // after, says nothing of its health.
                let suspended =
                    rec.paused || rec.desired.as_ref().is_some_and(|d| d.spec.suspended);
                let current = rec.state == AllocState::Running
                    && rec.unhealthy.is_none()
                    && !suspended
                    && !rec.busy
                    && rec.container.as_ref().is_some_and(|c| c.id == container_id);
                let Some(p) = rec.probes.as_mut().filter(|_| current) else {
                    if let Some(p) = rec.probes.as_mut() {
                        // A result about another run, or one being stopped: the
                        // check may run again, the result counts for nothing.
                        p.abandon(role);
                    }
                    return;
                };
                let verdict = p.record(&health, role, result, now);
                rec.health_restarts.settle(p, now);
                let healthy = p.healthy(&health);
                if healthy == Some(false) && rec.healthy != Some(false) {
                    rec.message = format!("{} check failing", role.name());
                }
                if healthy == Some(true) && rec.healthy == Some(false) {
                    rec.message = format!("{} check passing again", role.name());
                }
                rec.healthy = healthy;
                if let Verdict::Restart {
                    role,
                    failures,
                    why,
                } = verdict
                {
                    rec.healthy = Some(false);
                    rec.unhealthy = Some(format!(
                        "{} check failed {failures} times in a row: {why}",
                        role.name()
                    ));
                    rec.message = format!(
                        "{} check failed {failures} times in a row ({why}); stopping the container",
                        role.name()
                    );
                }
            }
        }
    }

    /// What to do now: at most `budget` actions. Every action returned must be
    /// answered with [`Reconciler::complete`].
    pub fn plan(&mut self, now: Instant, budget: usize) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut gone = Vec::new();
        self.holds.retain(|_, until| *until > now);
        // Host ports still bound by containers being removed (an allocation the
        // controller dropped or replaced): a launch that needs one waits for the
        // removal, rather than fail to bind while the old container stops.
        let releasing: HashMap<u16, String> = self
            .records
            .iter()
            .filter(|(_, r)| r.desired.is_none() && r.container.is_some())
            .flat_map(|(id, r)| r.published.iter().map(move |p| (p.host_port, id.clone())))
            .collect();
        for (id, rec) in &mut self.records {
            if actions.len() >= budget {
                break;
            }
            if rec.busy || self.holds.contains_key(id) {
                continue;
            }
            let Some(desired) = &rec.desired else {
                match &rec.container {
                    None => gone.push(id.clone()),
                    Some(_) if rec.shutdown_delay.is_some() => {
                        let delay = rec.shutdown_delay.take().unwrap_or_default();
                        rec.retry_at = Some(now + delay);
                        rec.message = format!(
                            "stopping in {} (shutdownDelay): no longer desired on this node",
                            novacron_common::units::duration(delay)
                        );
                    }
                    Some(c) if rec.retry_at.is_none_or(|t| t <= now) => {
                        rec.busy = true;
                        actions.push(Action::Remove {
                            alloc: id.clone(),
                            container_id: c.id.clone(),
                        });
                    }
                    Some(_) => {}
                }
                continue;
            };
            let desired_hash = desired.hash.clone();
            let spec = desired.spec.clone();
            if rec.state != AllocState::Pending && rec.run_hash.as_ref() != Some(&desired_hash) {
                rec.reset_for_new_spec();
            }
            match rec.state {
                AllocState::Pending if rec.observed => {
                    let held = spec
                        .task
                        .ports
                        .iter()
                        .filter_map(|p| p.host_port)
                        .find_map(|port| releasing.get(&port).map(|holder| (port, holder)));
                    if let Some((port, holder)) = held {
                        rec.message = format!(
                            "waiting for allocation {holder}'s container to stop and release host port {port}"
                        );
                        continue;
                    }
                    rec.busy = true;
                    rec.state = AllocState::Starting;
                    rec.run_hash = Some(desired_hash.clone());
                    rec.message = "creating the container".into();
                    actions.push(Action::Launch {
                        alloc: id.clone(),
                        spec,
                        spec_hash: desired_hash,
                        replace: rec.container.as_ref().map(|c| c.id.clone()),
                    });
                }
                AllocState::Starting if rec.restart_at.is_none_or(|t| t <= now) => {
                    rec.busy = true;
                    rec.restart_at = None;
                    rec.restarts = rec.restarts.saturating_add(1);
                    // A restart for a failed check is the health budget's, not
                    // the exit policy's.
                    if !std::mem::take(&mut rec.health_restart) {
                        rec.window.record(now);
                    }
                    rec.message = format!("restarting (restart {})", rec.restarts);
                    match &rec.container {
                        // A container to restore from a checkpoint is made anew.
                        Some(c) if c.hash == desired_hash && spec.restore.is_none() => actions
                            .push(Action::Start {
                                alloc: id.clone(),
                                container_id: c.id.clone(),
                            }),
                        other => actions.push(Action::Launch {
                            alloc: id.clone(),
                            spec,
                            spec_hash: desired_hash,
                            replace: other.as_ref().map(|c| c.id.clone()),
                        }),
                    }
                }
                AllocState::Running => {
                    let Some(c) = &rec.container else { continue };
                    if rec.unhealthy.is_some() {
                        if rec.retry_at.is_none_or(|t| t <= now) {
                            rec.busy = true;
                            actions.push(Action::Stop {
                                alloc: id.clone(),
                                container_id: c.id.clone(),
                            });
                        }
                        continue;
                    }
                    if spec.suspended != rec.paused {
                        if rec.retry_at.is_none_or(|t| t <= now) {
                            rec.busy = true;
                            rec.retry_at = None;
                            actions.push(Action::Pause {
                                alloc: id.clone(),
                                container_id: c.id.clone(),
                                paused: spec.suspended,
                            });
                        }
                        continue;
                    }
                    if rec.paused {
                        // A suspended guest answers nothing: no checks until
                        // it is resumed.
                        continue;
                    }
                    let (Some(health), Some(p)) = (
                        rec.desired
                            .as_ref()
                            .and_then(|d| d.spec.task.health.as_ref()),
                        rec.probes.as_mut(),
                    ) else {
                        continue;
                    };
                    for role in p.due(health, now) {
                        if actions.len() >= budget {
                            break;
                        }
                        let Some(spec) = role.spec(health) else {
                            continue;
                        };
                        p.begin(role);
                        actions.push(Action::Probe {
                            alloc: id.clone(),
                            container_id: c.id.clone(),
                            role,
                            check: spec.check.clone(),
                            ip: rec.ip,
                            timeout: probes::timeout(spec),
                        });
                    }
                }
                _ => {}
            }
        }
        for id in gone {
            self.records.remove(&id);
        }
        if self.applied.is_some() {
            for (container_id, orphan) in &mut self.orphans {
                if actions.len() >= budget {
                    break;
                }
                if self.holds.contains_key(&orphan.alloc) {
                    continue;
                }
                if !orphan.busy && orphan.retry_at.is_none_or(|t| t <= now) {
                    orphan.busy = true;
                    actions.push(Action::Remove {
                        alloc: orphan.alloc.clone(),
                        container_id: container_id.clone(),
                    });
                }
            }
        }
        actions
    }

    /// The next instant at which [`Reconciler::plan`] has something to do without any
    /// new input (a restart, a health check, a removal to retry).
    pub fn next_deadline(&self) -> Option<Instant> {
        let records =
            self.records
                .values()
                .filter(|r| !r.busy)
                .filter_map(|r| match (r.state, &r.desired) {
                    (_, None) => r.container.as_ref().and(r.retry_at),
                    (AllocState::Starting, Some(_)) => r.restart_at,
                    (AllocState::Running, Some(d)) if r.container.is_some() => {
                        if r.unhealthy.is_some() || d.spec.suspended != r.paused {
                            // `plan` stops, pauses or resumes it at once; only
                            // a failed attempt waits.
                            r.retry_at
                        } else if r.paused {
                            None
                        } else {
                            r.probes.as_ref().and_then(Probes::next_deadline)
                        }
                    }
                    _ => None,
                });
        let orphans = self
            .orphans
            .values()
            .filter(|_| self.applied.is_some())
            .filter(|o| !o.busy)
            .filter_map(|o| o.retry_at);
        let holds = self.holds.values().copied();
        records.chain(orphans).chain(holds).min()
    }

    /// The state of every allocation: desired ones, ones being stopped, and
    /// containers of allocations that are not desired (orphans) until they are gone.
    pub fn report(&self) -> AllocationReport {
        let mut allocations: Vec<AllocationStatus> = self
            .records
            .iter()
            .map(|(id, rec)| {
                let mut message = rec.message.clone();
                let held = self.holds.contains_key(id);
                if rec.state == AllocState::Pending
                    && let Some(e) = &self.runtime_error
                {
                    message = format!("waiting for the container runtime: {e}");
                }
                AllocationStatus {
                    id: id.clone(),
                    state: if held {
                        AllocState::Checkpointing
                    } else {
                        rec.state
                    },
                    healthy: rec.healthy,
                    restarts: rec.restarts,
                    exit_code: rec.exit_code,
                    message,
                    failure: rec.failure.filter(|_| rec.state == AllocState::Failed),
                    restore_failed: rec.restore_failed,
                    container_id: rec.container.as_ref().map(|c| c.id.clone()),
                    started_at_unix_ms: rec.started_at_unix_ms,
                    published: if rec.state == AllocState::Running {
                        rec.published.clone()
                    } else {
                        Vec::new()
                    },
                    image_digest: rec.image_digest.clone(),
                    pull: None,
                    suspended: rec.paused && rec.state == AllocState::Running,
                    address: rec.ip.filter(|_| rec.state == AllocState::Running),
                }
            })
            .collect();
        for (container_id, orphan) in &self.orphans {
            // Before the first desired set, a listed container may well be a
            // wanted allocation's (a restarted agent lists before the set
            // arrives): nothing is known of it yet, so nothing is said. Its
            // state, an exit included, is reported once the set adopts it,
            // under its allocation's restart policy.
            if self.applied.is_none() || self.records.contains_key(&orphan.alloc) {
                continue;
            }
            allocations.push(AllocationStatus {
                id: orphan.alloc.clone(),
                state: orphan.state,
                healthy: None,
                restarts: 0,
                exit_code: None,
                message: "not desired on this node; removing its container".into(),
                failure: None,
                restore_failed: false,
                container_id: Some(container_id.clone()),
                started_at_unix_ms: None,
                published: Vec::new(),
                image_digest: None,
                pull: None,
                suspended: false,
                address: None,
            });
        }
        allocations.sort_by(|a, b| a.id.cmp(&b.id));
        AllocationReport {
            generation: self.generation().unwrap_or(0),
            allocations,
        }
    }

    /// The spec an allocation is desired with on this node.
    pub fn desired_spec(&self, alloc: &str) -> Option<Arc<AllocationSpec>> {
        self.records
            .get(alloc)
            .and_then(|r| r.desired.as_ref())
            .map(|d| d.spec.clone())
    }

    /// The container of an allocation (running or not), for its logs.
    pub fn container_of(&self, alloc: &str) -> Option<String> {
        self.records
            .get(alloc)
            .and_then(|r| r.container.as_ref())
            .map(|c| c.id.clone())
    }

    /// The allocations whose container runs.
    pub fn running(&self) -> Vec<RunningAlloc> {
        self.records
            .iter()
            .filter(|(_, r)| r.state == AllocState::Running)
            .filter_map(|(id, r)| {
                Some(RunningAlloc {
                    alloc: id.clone(),
                    container_id: r.container.as_ref()?.id.clone(),
                    memory_limit_bytes: r.desired.as_ref().map_or(0, |d| d.spec.task.memory_bytes),
                })
            })
            .collect()
    }
}

#[derive(Debug)]
struct Desired {
    spec: Arc<AllocationSpec>,
    hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Container {
    id: String,
    hash: String,
}

#[derive(Debug)]
struct Orphan {
    alloc: String,
    state: AllocState,
    busy: bool,
    retry_at: Option<Instant>,
}

/// What the core knows of one allocation.
#[derive(Debug)]
struct Record {
    /// `None` once it has left the desired set (its container is being removed).
    desired: Option<Desired>,
    state: AllocState,
    /// The spec hash `state` is about (`None` while pending).
    run_hash: Option<String>,
    container: Option<Container>,
    healthy: Option<bool>,
    /// The checks of the current run (while running, with checks).
    probes: Option<Probes>,
    /// Health restarts made.
    health_restarts: RestartBudget,
    /// A startup or liveness check failed: why. The container is being stopped.
    unhealthy: Option<String>,
    /// The pending restart is for a failed check.
    health_restart: bool,
    /// Why it failed, once failed.
    /// The last start failed to restore the checkpoint (reported, typed).
    restore_failed: bool,
    failure: Option<FailureReason>,
    restarts: u32,
    exit_code: Option<i64>,
    message: String,
    started_at_unix_ms: Option<u64>,
    ip: Option<IpAddr>,
    published: Vec<PublishedPort>,
    image_digest: Option<String>,
    /// Its guest is paused (observed, or a pause that succeeded).
    paused: bool,
    /// A launch, start or removal is in flight.
    busy: bool,
    /// The epoch of the last change; older observations are ignored.
    changed_epoch: u64,
    /// An observation newer than the last change has been taken in.
    observed: bool,
    window: RestartWindow,
    restart_at: Option<Instant>,
    retry_at: Option<Instant>,
    /// Left the desired set while running with a `shutdown_delay_ms`: the
    /// removal waits this long (set when `plan` first sees it).
    shutdown_delay: Option<Duration>,
}

impl Record {
    fn new(desired: Desired, epoch: u64) -> Self {
        Record {
            desired: Some(desired),
            state: AllocState::Pending,
            run_hash: None,
            container: None,
            healthy: None,
            probes: None,
            health_restarts: RestartBudget::default(),
            unhealthy: None,
            health_restart: false,
            failure: None,
            restore_failed: false,
            restarts: 0,
            exit_code: None,
            message: String::new(),
            started_at_unix_ms: None,
            ip: None,
            published: Vec::new(),
            image_digest: None,
            paused: false,
            busy: false,
            changed_epoch: epoch,
            observed: false,
            window: RestartWindow::default(),
            restart_at: None,
            retry_at: None,
            shutdown_delay: None,
        }
    }

    fn health(&self) -> Option<&HealthSpec> {
        self.desired.as_ref()?.spec.task.health.as_ref()
    }

    fn reset_for_new_spec(&mut self) {
        self.state = AllocState::Pending;
        self.run_hash = None;
        self.healthy = None;
        self.probes = None;
        self.health_restarts = RestartBudget::default();
        self.unhealthy = None;
        self.health_restart = false;
        self.failure = None;
        self.restarts = 0;
        self.exit_code = None;
        self.message.clear();
        self.window.clear();
        self.restart_at = None;
    }

    fn enter_running(&mut self, now: Instant, run: Run, message: &str) {
        self.state = AllocState::Running;
        self.paused = false;
        self.restore_failed = false;
        self.restart_at = None;
        self.started_at_unix_ms = run.started_at_unix_ms;
        self.ip = run.ip;
        self.published = run.published;
        if run.image_digest.is_some() {
            self.image_digest = run.image_digest;
        }
        self.healthy = None;
        self.probes = self.health().map(|h| Probes::start(h, now));
        self.unhealthy = None;
        self.health_restart = false;
        self.failure = None;
        self.message = message.to_owned();
    }

    /// The container stopped after a failed startup or liveness check: restart it
    /// after the backoff, or fail once the health restart budget is spent.
    fn health_stopped(&mut self, now: Instant) {
        let why = self.unhealthy.take().unwrap_or_default();
        self.probes = None;
        self.healthy = Some(false);
        let Some(health) = self.health().cloned() else {
            // No check any more (a new spec is coming): restart as after an exit.
            self.failed_run(now, None, why);
            return;
        };
        match self.health_restarts.decide(&health, now) {
            HealthRestart::RestartAt { at, attempt } => {
                self.health_restarts.record();
                self.state = AllocState::Starting;
                self.restart_at = Some(at);
                self.health_restart = true;
                self.message = format!(
                    "{why}; health restart {attempt} of {} in {}",
                    health.max_restarts,
                    fmt_ms(at.saturating_duration_since(now).as_millis() as u64)
                );
            }
            HealthRestart::Fail => {
                self.state = AllocState::Failed;
                self.failure = Some(FailureReason::Unhealthy);
                self.restart_at = None;
                self.message = format!(
                    "{why}; all {} health restarts used up, giving up",
                    health.max_restarts
                );
            }
        }
    }

    /// Takes in the observation of this allocation's container (`None`: it has none).
    fn observe(&mut self, now: Instant, primary: Option<Observed>) {
        let Some(desired_hash) = self.desired.as_ref().map(|d| d.hash.clone()) else {
            self.container = primary.map(|o| Container {
                id: o.container_id,
                hash: o.spec_hash,
            });
            return;
        };
        let Some(o) = primary else {
            if self.container.take().is_some() && self.state == AllocState::Running {
                self.failed_run(now, None, "the container disappeared".into());
            }
            return;
        };
        // The same run as known (a start time learnt only now is the same run).
        let same_run = self
            .container
            .as_ref()
            .is_some_and(|c| c.id == o.container_id)
            && (self.started_at_unix_ms.is_none()
                || self.started_at_unix_ms == o.started_at_unix_ms);
        self.container = Some(Container {
            id: o.container_id.clone(),
            hash: o.spec_hash.clone(),
        });
        if o.spec_hash != desired_hash {
            // Made from another spec: `plan` replaces it.
            return;
        }
        let run = Run {
            container_id: o.container_id,
            started_at_unix_ms: o.started_at_unix_ms,
            ip: o.ip,
            published: o.published,
            image_digest: None,
        };
        let running = o.status == ContainerStatus::Running;
        self.observe_status(now, desired_hash, same_run, run, o.status);
        // A paused guest is seen as such (adopted after an agent restart
        // too); `plan` then pauses or resumes it as the set says.
        self.paused = running && self.state == AllocState::Running && o.paused;
    }

    fn observe_status(
        &mut self,
        now: Instant,
        desired_hash: String,
        same_run: bool,
        run: Run,
        status: ContainerStatus,
    ) {
        match (self.state, status) {
            (AllocState::Pending, ContainerStatus::Running) => {
                self.run_hash = Some(desired_hash);
                self.enter_running(now, run, "adopted the running container");
            }
            (AllocState::Running, ContainerStatus::Running) => {
                if same_run {
                    self.started_at_unix_ms = run.started_at_unix_ms;
                    self.ip = run.ip.or(self.ip);
                    if !run.published.is_empty() {
                        self.published = run.published;
                    }
                } else {
                    self.enter_running(now, run, "the container was restarted outside NovaCron");
                }
            }
            (
                AllocState::Starting | AllocState::Complete | AllocState::Failed,
                ContainerStatus::Running,
            ) => {
                self.enter_running(now, run, "the container was started outside NovaCron");
            }
            (
                AllocState::Pending | AllocState::Running,
                ContainerStatus::Exited {
                    code,
                    oom_killed,
                    error,
                },
            ) => {
                self.run_hash = Some(desired_hash);
                self.started_at_unix_ms = run.started_at_unix_ms;
                let mut what = format!("exited with code {code}");
                if oom_killed {
                    what.push_str(" (out of memory)");
                }
                if !error.is_empty() {
                    what = format!("{what}: {error}");
                }
                self.failed_run(now, Some(code), what);
            }
            // Pending + Created: never started; `plan` replaces it. The rest were
            // taken in already.
            _ => {}
        }
    }

    /// A run ended (`code`) or could not begin (`None`): complete (a batch task that
    /// exited 0), restart or fail.
    /// Fails for good for want of its image (no restart), saying `why`.
    fn lacks_image(&mut self, why: String) {
        self.container = None;
        self.state = AllocState::Failed;
        self.failure = Some(FailureReason::ImageMissing);
        self.restart_at = None;
        self.message = why;
    }

    fn failed_run(&mut self, now: Instant, code: Option<i64>, what: String) {
        self.healthy = None;
        self.probes = None;
        self.unhealthy = None;
        self.health_restart = false;
        if code.is_some() {
            self.exit_code = code;
        }
        let batch = self.desired.as_ref().is_some_and(|d| d.spec.task.batch);
        if batch && code == Some(0) {
            self.state = AllocState::Complete;
            self.restart_at = None;
            self.message = what;
            return;
        }
        let Some(desired) = &self.desired else {
            self.state = AllocState::Failed;
            self.message = what;
            return;
        };
        let policy = &desired.spec.task.restart;
        match self.window.decide(policy, now) {
            RestartDecision::RestartAt { at, exhausted } => {
                self.state = AllocState::Starting;
                self.restart_at = Some(at);
                let wait = at.saturating_duration_since(now);
                self.message = if exhausted {
                    format!(
                        "{what}; {} restarts within {} used up, waiting {} for the window to pass",
                        policy.attempts,
                        fmt_ms(policy.interval_ms),
                        fmt_ms(wait.as_millis() as u64)
                    )
                } else {
                    format!("{what}; restarting in {}", fmt_ms(wait.as_millis() as u64))
                };
            }
            RestartDecision::Fail => {
                self.state = AllocState::Failed;
                self.failure = Some(FailureReason::RestartsExhausted);
                self.restart_at = None;
                self.message = format!(
                    "{what}; the restart policy allows {} restarts within {}, giving up",
                    policy.attempts,
                    fmt_ms(policy.interval_ms)
                );
            }
        }
    }
}

/// Picks the container that is the allocation's own; any others are orphans.
fn choose_primary(rec: &Record, mut mine: Vec<Observed>) -> (Option<Observed>, Vec<Observed>) {
    if mine.is_empty() {
        return (None, mine);
    }
    let want = rec.desired.as_ref().map(|d| d.hash.as_str());
    let known = rec
        .container
        .as_ref()
        .and_then(|c| mine.iter().position(|o| o.container_id == c.id));
    let matching = |running: bool| {
        mine.iter().position(|o| {
            Some(o.spec_hash.as_str()) == want && (!running || o.status == ContainerStatus::Running)
        })
    };
    let index = known
        .or_else(|| matching(true))
        .or_else(|| matching(false))
        .unwrap_or(0);
    let primary = mine.swap_remove(index);
    (Some(primary), mine)
}

fn fmt_ms(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use novacron_common::wire::{ProbeSpec, RestartSpec, TaskSpec};

    use super::*;

    const NODE: &str = "node-a";

    fn spec(id: &str, restart: RestartSpec) -> AllocationSpec {
        AllocationSpec {
            restore: None,
            suspended: false,
            id: id.into(),
            job: "job".into(),
            job_version: 1,
            task: TaskSpec {
                image: "img:1".into(),
                restart,
                ..TaskSpec::default()
            },
        }
    }

    fn once() -> RestartSpec {
        RestartSpec {
            attempts: 1,
            interval_ms: 60_000,
            delay_ms: 1000,
            delay_mode: false,
        }
    }

    fn desired(generation: u64, allocs: Vec<AllocationSpec>) -> DesiredAllocations {
        DesiredAllocations {
            epoch: 1,
            generation,
            allocations: allocs,
            prepull: Vec::new(),
        }
    }

    fn observed(alloc: &AllocationSpec, container: &str, status: ContainerStatus) -> Observed {
        Observed {
            container_id: container.into(),
            alloc_id: alloc.id.clone(),
            spec_hash: spec_hash(&alloc.task),
            status,
            started_at_unix_ms: Some(1_000),
            ip: None,
            published: Vec::new(),
            paused: false,
        }
    }

    fn exited(code: i64) -> ContainerStatus {
        ContainerStatus::Exited {
            code,
            oom_killed: false,
            error: String::new(),
        }
    }

    fn run(id: &str) -> Run {
        Run {
            container_id: id.into(),
            started_at_unix_ms: Some(2_000),
            ip: None,
            published: Vec::new(),
            image_digest: None,
        }
    }

    fn status(r: &Reconciler, id: &str) -> AllocationStatus {
        r.report()
            .allocations
            .into_iter()
            .find(|a| a.id == id)
            .expect("allocation in the report")
    }

    fn core() -> Reconciler {
        Reconciler::new(ReconcilerConfig::new(NODE))
    }

    /// Applies `a` alone, observes nothing, plans its launch and completes it with
    /// `result`.
    fn launch_ends(
        r: &mut Reconciler,
        now: Instant,
        a: &AllocationSpec,
        result: Result<Run, LaunchError>,
    ) {
        r.apply(desired(1, vec![a.clone()]));
        let token = r.observe_begin();
        r.observe(now, token, vec![]);
        assert_eq!(r.plan(now, 16).len(), 1);
        r.complete(
            now,
            Outcome::Launched {
                alloc: a.id.clone(),
                spec_hash: spec_hash(&a.task),
                result,
            },
        );
    }

    /// Applies, observes nothing and completes the launch with container `cid`.
    fn launched(r: &mut Reconciler, now: Instant, a: &AllocationSpec, cid: &str) {
        let token = r.observe_begin();
        r.observe(now, token, vec![]);
        let actions = r.plan(now, 16);
        assert!(
            matches!(&actions[..], [Action::Launch { alloc, replace: None, .. }] if *alloc == a.id),
            "{actions:?}"
        );
        r.complete(
            now,
            Outcome::Launched {
                alloc: a.id.clone(),
                spec_hash: spec_hash(&a.task),
                result: Ok(run(cid)),
            },
        );
    }

    #[test]
    fn nothing_is_launched_before_an_observation() {
        let mut r = core();
        let now = Instant::now();
        let a = spec("a", once());
        assert!(r.apply(desired(1, vec![a.clone()])));
        assert!(r.plan(now, 16).is_empty());
        assert_eq!(status(&r, "a").state, AllocState::Pending);
        launched(&mut r, now, &a, "c1");
        let s = status(&r, "a");
        assert_eq!(s.state, AllocState::Running);
        assert_eq!(s.container_id.as_deref(), Some("c1"));
        assert_eq!(s.started_at_unix_ms, Some(2_000));
        assert!(r.plan(now, 16).is_empty());
    }

    #[test]
    fn older_generations_are_ignored() {
        let mut r = core();
        assert!(r.apply(desired(5, vec![spec("a", once())])));
        assert!(!r.apply(desired(4, vec![])));
        assert_eq!(r.report().generation, 5);
        assert_eq!(r.report().allocations.len(), 1);
        assert!(
            r.apply(desired(5, vec![])),
            "the same generation is re-applied"
        );
    }

    /// Regression: a restarted controller counted generations from 1 again, and
    /// every running agent refused its desired sets until the agent restarted.
    #[test]
    fn a_newer_controller_epoch_wins_over_a_higher_generation() {
        let mut r = core();
        assert!(r.apply(desired(7, vec![spec("a", once())])));
        let restarted = DesiredAllocations {
            epoch: 2,
            generation: 1,
            allocations: vec![],
            prepull: Vec::new(),
        };
        assert!(r.apply(restarted), "the restarted controller is obeyed");
        assert_eq!(r.controller_epoch(), Some(2));
        assert_eq!(r.generation(), Some(1));
        // A set from the older epoch (a deposed controller) is refused.
        assert!(!r.apply(desired(9, vec![spec("a", once())])));
        assert_eq!(r.controller_epoch(), Some(2));
    }

    #[test]
    fn running_containers_are_adopted_not_restarted() {
        let mut r = core();
        let now = Instant::now();
        let a = spec("a", once());
        r.apply(desired(1, vec![a.clone()]));
        let token = r.observe_begin();
        r.observe(
            now,
            token,
            vec![observed(&a, "c0", ContainerStatus::Running)],
        );
        assert!(r.plan(now, 16).is_empty());
        let s = status(&r, "a");
        assert_eq!(s.state, AllocState::Running);
        assert_eq!(s.container_id.as_deref(), Some("c0"));
        assert_eq!(s.started_at_unix_ms, Some(1_000));
        assert_eq!(s.restarts, 0);
    }

    #[test]
    fn an_observation_from_before_the_apply_does_not_count() {
        let mut r = core();
        let now = Instant::now();
        let token = r.observe_begin();
        let a = spec("a", once());
        r.apply(desired(1, vec![a.clone()]));
        // Listed before the allocation arrived: its container may simply be missing
        // from this listing.
        r.observe(now, token, vec![]);
        assert!(r.plan(now, 16).is_empty());
    }

    #[test]
    fn a_stale_listing_does_not_launch_twice() {
        let mut r = core();
        let now = Instant::now();
        let a = spec("a", once());
        r.apply(desired(1, vec![a.clone()]));
        let token = r.observe_begin();
        r.observe(now, token, vec![]);
        assert_eq!(r.plan(now, 16).len(), 1);
        let stale = r.observe_begin();
        r.complete(
            now,
            Outcome::Launched {
                alloc: "a".into(),
                spec_hash: spec_hash(&a.task),
                result: Ok(run("c1")),
            },
        );
        // Listed while the launch was in flight: shows no container.
        r.observe(now, stale, vec![]);
        assert_eq!(status(&r, "a").state, AllocState::Running);
        assert!(r.plan(now, 16).is_empty());
    }

    #[test]
    fn a_failed_run_restarts_after_the_delay_then_fails() {
        let mut r = core();
        let t0 = Instant::now();
        let a = spec("a", once());
        r.apply(desired(1, vec![a.clone()]));
        launched(&mut r, t0, &a, "c1");

        let t1 = t0 + Duration::from_secs(5);
        let token = r.observe_begin();
        r.observe(t1, token, vec![observed(&a, "c1", exited(3))]);
        let s = status(&r, "a");
        assert_eq!(s.state, AllocState::Starting);
        assert_eq!(s.exit_code, Some(3));
        assert!(s.message.contains("restarting in 1s"), "{}", s.message);
        assert!(r.plan(t1, 16).is_empty());
        assert_eq!(r.next_deadline(), Some(t1 + Duration::from_secs(1)));

        let t2 = t1 + Duration::from_secs(1);
        let actions = r.plan(t2, 16);
        assert_eq!(
            actions,
            vec![Action::Start {
                alloc: "a".into(),
                container_id: "c1".into()
            }]
        );
        assert_eq!(status(&r, "a").restarts, 1);
        r.complete(
            t2,
            Outcome::Started {
                alloc: "a".into(),
                container_id: "c1".into(),
                result: Ok(run("c1")),
            },
        );
        assert_eq!(status(&r, "a").state, AllocState::Running);

        let t3 = t2 + Duration::from_secs(1);
        let token = r.observe_begin();
        r.observe(t3, token, vec![observed(&a, "c1", exited(3))]);
        let s = status(&r, "a");
        assert_eq!(s.state, AllocState::Failed);
        assert_eq!(s.exit_code, Some(3));
        assert_eq!(s.restarts, 1);
        assert!(s.message.contains("giving up"), "{}", s.message);
        assert!(r.plan(t3 + Duration::from_secs(60), 16).is_empty());
    }

    #[test]
    fn batch_exit_zero_completes() {
        let mut r = core();
        let now = Instant::now();
        let mut a = spec("a", once());
        a.task.batch = true;
        r.apply(desired(1, vec![a.clone()]));
        launched(&mut r, now, &a, "c1");
        let token = r.observe_begin();
        r.observe(now, token, vec![observed(&a, "c1", exited(0))]);
        let s = status(&r, "a");
        assert_eq!(s.state, AllocState::Complete);
        assert_eq!(s.exit_code, Some(0));
        assert_eq!(s.restarts, 0);
        assert!(r.plan(now + Duration::from_secs(10), 16).is_empty());
        assert_eq!(r.next_deadline(), None);
    }

    #[test]
    fn a_service_exiting_zero_is_restarted() {
        let mut r = core();
        let now = Instant::now();
        let a = spec("a", once());
        r.apply(desired(1, vec![a.clone()]));
        launched(&mut r, now, &a, "c1");
        let token = r.observe_begin();
        r.observe(now, token, vec![observed(&a, "c1", exited(0))]);
        let s = status(&r, "a");
        assert_eq!(s.state, AllocState::Starting);
        assert_eq!(s.exit_code, Some(0));
        assert!(
            s.message.starts_with("exited with code 0; restarting"),
            "{}",
            s.message
        );
        assert_eq!(r.plan(now + Duration::from_secs(1), 16).len(), 1);
    }

    /// A failed checkpoint restore is reported as a typed flag (the controller's
    /// fallback to a fresh start reads it, never the message), cleared once the
    /// allocation runs.
    #[test]
    fn a_failed_restore_is_reported_typed_until_it_runs() {
        let mut r = core();
        let now = Instant::now();
        let a = spec("a", once());
        launch_ends(
            &mut r,
            now,
            &a,
            Err(LaunchError::RestoreFailed {
                container_id: "c1".into(),
                message: "bundle is corrupt".into(),
            }),
        );
        let s = status(&r, "a");
        assert!(s.restore_failed, "{s:?}");
        assert_ne!(s.state, AllocState::Running);
        assert!(
            s.message.contains("could not restore its checkpoint"),
            "{}",
            s.message
        );
        r.complete(
            now,
            Outcome::Launched {
                alloc: "a".into(),
                spec_hash: spec_hash(&a.task),
                result: Ok(run("c2")),
            },
        );
        let s = status(&r, "a");
        assert_eq!(s.state, AllocState::Running);
        assert!(!s.restore_failed);
    }

    /// A failed pull is a failed start (restarts follow the policy), except for
    /// a restore, which fails at once with the reason.
    #[test]
    fn a_failed_pull_restarts_but_a_restore_that_cannot_pull_fails_at_once() {
        let mut r = core();
        let now = Instant::now();
        let fresh = spec("a", once());
        let pull = || {
            Err(LaunchError::PullFailed {
                image: "reg:5000/x:1".into(),
                message: "not found: manifest unknown".into(),
            })
        };
        launch_ends(&mut r, now, &fresh, pull());
        let s = status(&r, "a");
        assert_eq!(s.state, AllocState::Starting, "{s:?}");
        assert!(
            s.message
                .starts_with("could not pull image \"reg:5000/x:1\""),
            "{}",
            s.message
        );
        let mut restore = spec("b", once());
        restore.restore = Some(novacron_common::wire::RestoreFrom {
            digest: "d".into(),
            size: 1,
            mode: novacron_common::checkpoint::CheckpointMode::Live,
            incoming_vm: None,
        });
        launch_ends(&mut r, now, &restore, pull());
        let s = status(&r, "b");
        assert_eq!(
            (s.state, s.failure),
            (AllocState::Failed, Some(FailureReason::ImageMissing))
        );
        assert!(
            s.message.contains("not found: manifest unknown"),
            "{}",
            s.message
        );
    }

    #[test]
    fn a_missing_image_fails_once_with_a_clear_message() {
        let mut r = core();
        let now = Instant::now();
        let a = spec("a", once());
        launch_ends(
            &mut r,
            now,
            &a,
            Err(LaunchError::ImageMissing {
                image: "busybox:nope".into(),
            }),
        );
        let s = status(&r, "a");
        assert_eq!(s.state, AllocState::Failed);
        assert_eq!(
            s.message,
            "image \"busybox:nope\" is not present on node node-a and its pullPolicy is never; build or load it there, or let the node pull it"
        );
        let token = r.observe_begin();
        r.observe(now, token, vec![]);
        assert!(r.plan(now + Duration::from_secs(600), 16).is_empty());
        // The same spec again changes nothing; a new spec is tried.
        r.apply(desired(2, vec![a.clone()]));
        assert!(r.plan(now, 16).is_empty());
        let mut fixed = a;
        fixed.task.image = "img:2".into();
        r.apply(desired(3, vec![fixed]));
        assert!(matches!(&r.plan(now, 16)[..], [Action::Launch { .. }]));
    }

    #[test]
    fn a_new_spec_replaces_the_container() {
        let mut r = core();
        let now = Instant::now();
        let a = spec("a", once());
        r.apply(desired(1, vec![a.clone()]));
        launched(&mut r, now, &a, "c1");
        let mut b = a.clone();
        b.task.env.insert("X".into(), "1".into());
        r.apply(desired(2, vec![b.clone()]));
        let actions = r.plan(now, 16);
        assert!(
            matches!(&actions[..], [Action::Launch { replace: Some(old), spec_hash, .. }] if old == "c1" && *spec_hash == super::spec_hash(&b.task)),
            "{actions:?}"
        );
        // A new restart policy alone is not a new container.
        let mut c = b.clone();
        c.task.restart.attempts = 7;
        r.complete(
            now,
            Outcome::Launched {
                alloc: "a".into(),
                spec_hash: spec_hash(&b.task),
                result: Ok(run("c2")),
            },
        );
        r.apply(desired(3, vec![c]));
        assert!(r.plan(now, 16).is_empty());
        assert_eq!(status(&r, "a").container_id.as_deref(), Some("c2"));
    }

    #[test]
    fn undesired_allocations_are_removed_then_forgotten() {
        let mut r = core();
        let now = Instant::now();
        let a = spec("a", once());
        r.apply(desired(1, vec![a.clone()]));
        launched(&mut r, now, &a, "c1");
        r.apply(desired(2, vec![]));
        let actions = r.plan(now, 16);
        assert_eq!(
            actions,
            vec![Action::Remove {
                alloc: "a".into(),
                container_id: "c1".into()
            }]
        );
        assert!(status(&r, "a").message.contains("no longer desired"));
        r.complete(
            now,
            Outcome::Removed {
                alloc: "a".into(),
                container_id: "c1".into(),
                result: Ok(()),
            },
        );
        assert!(r.report().allocations.is_empty());
    }

    /// A replacement placed on the host port of an allocation that is being
    /// removed (a rolling update frees the port in the same pass) launches only
    /// once the old container is gone, instead of failing to bind.
    #[test]
    fn a_launch_waits_for_a_removed_container_to_release_its_host_port() {
        let mut r = core();
        let now = Instant::now();
        let mut old = spec("old", once());
        old.task.ports = vec![novacron_common::wire::PortMapping {
            name: "http".into(),
            container_port: 80,
            host_port: Some(20000),
            udp: false,
        }];
        r.apply(desired(1, vec![old.clone()]));
        let token = r.observe_begin();
        r.observe(now, token, vec![]);
        assert_eq!(r.plan(now, 16).len(), 1);
        let mut bound = run("c1");
        bound.published = vec![PublishedPort {
            host_ip: "0.0.0.0".parse().expect("ip"),
            host_port: 20000,
            container_port: 80,
            udp: false,
        }];
        r.complete(
            now,
            Outcome::Launched {
                alloc: "old".into(),
                spec_hash: spec_hash(&old.task),
                result: Ok(bound),
            },
        );
        let mut new = old.clone();
        new.id = "new".into();
        new.task.env.insert("VERSION".into(), "2".into());
        r.apply(desired(2, vec![new]));
        let token = r.observe_begin();
        r.observe(
            now,
            token,
            vec![observed(&old, "c1", ContainerStatus::Running)],
        );
        let actions = r.plan(now, 16);
        assert_eq!(
            actions,
            vec![Action::Remove {
                alloc: "old".into(),
                container_id: "c1".into()
            }],
            "the new allocation waits"
        );
        assert!(
            status(&r, "new")
                .message
                .contains("release host port 20000"),
            "{}",
            status(&r, "new").message
        );
        r.complete(
            now,
            Outcome::Removed {
                alloc: "old".into(),
                container_id: "c1".into(),
                result: Ok(()),
            },
        );
        assert!(matches!(&r.plan(now, 16)[..], [Action::Launch { alloc, .. }] if alloc == "new"));
    }

    /// `shutdownDelay`: an allocation that leaves the desired set while running
    /// is removed only once the delay has passed (its endpoints left the catalog
    /// when the controller dropped it).
    #[test]
    fn a_shutdown_delay_holds_the_removal() {
        let mut r = core();
        let now = Instant::now();
        let mut a = spec("a", once());
        a.task.shutdown_delay_ms = 5_000;
        r.apply(desired(1, vec![a.clone()]));
        launched(&mut r, now, &a, "c1");
        r.apply(desired(2, vec![]));
        assert!(r.plan(now, 16).is_empty(), "not removed at once");
        assert!(
            status(&r, "a")
                .message
                .starts_with("stopping in 5s (shutdownDelay)"),
            "{}",
            status(&r, "a").message
        );
        assert_eq!(r.next_deadline(), Some(now + Duration::from_secs(5)));
        assert!(r.plan(now + Duration::from_secs(4), 16).is_empty());
        assert_eq!(
            r.plan(now + Duration::from_secs(5), 16),
            vec![Action::Remove {
                alloc: "a".into(),
                container_id: "c1".into()
            }]
        );
    }

    #[test]
    fn failed_removals_are_retried_later() {
        let mut r = core();
        let now = Instant::now();
        r.apply(desired(1, vec![]));
        let stranger = spec("x", once());
        let token = r.observe_begin();
        r.observe(
            now,
            token,
            vec![observed(&stranger, "cx", ContainerStatus::Running)],
        );
        assert_eq!(r.plan(now, 16).len(), 1);
        r.complete(
            now,
            Outcome::Removed {
                alloc: "x".into(),
                container_id: "cx".into(),
                result: Err(RuntimeError::Daemon {
                    op: "stop",
                    message: "boom".into(),
                }),
            },
        );
        assert!(r.plan(now, 16).is_empty());
        assert_eq!(r.next_deadline(), Some(now + DEFAULT_REMOVE_RETRY));
        assert_eq!(r.plan(now + DEFAULT_REMOVE_RETRY, 16).len(), 1);
    }

    #[test]
    fn orphans_wait_for_the_first_desired_set() {
        let mut r = core();
        let now = Instant::now();
        let stranger = spec("x", once());
        let token = r.observe_begin();
        r.observe(
            now,
            token,
            vec![observed(&stranger, "cx", ContainerStatus::Running)],
        );
        assert!(
            r.plan(now, 16).is_empty(),
            "no desired set yet: keep everything"
        );
        let mine = spec("a", once());
        r.apply(desired(1, vec![mine.clone()]));
        let token = r.observe_begin();
        r.observe(
            now,
            token,
            vec![
                observed(&stranger, "cx", ContainerStatus::Running),
                observed(&mine, "ca", ContainerStatus::Running),
            ],
        );
        let actions = r.plan(now, 16);
        assert_eq!(
            actions,
            vec![Action::Remove {
                alloc: "x".into(),
                container_id: "cx".into()
            }]
        );
        assert_eq!(status(&r, "a").state, AllocState::Running);
        assert_eq!(status(&r, "x").state, AllocState::Running);
        r.complete(
            now,
            Outcome::Removed {
                alloc: "x".into(),
                container_id: "cx".into(),
                result: Err(RuntimeError::NotFound {
                    op: "remove",
                    message: "gone".into(),
                }),
            },
        );
        assert_eq!(r.report().allocations.len(), 1);
    }

    /// A restarted agent that lists its containers before the first desired set
    /// arrives sees them as orphans; once the set wants them, they are adopted,
    /// never removed and started again (the upgrade test caught a rolling
    /// upgrade starting a second container of every allocation).
    #[test]
    fn containers_listed_before_the_first_desired_set_are_adopted_not_removed() {
        let mut r = core();
        let now = Instant::now();
        let mine = spec("a", once());
        let token = r.observe_begin();
        r.observe(
            now,
            token,
            vec![observed(&mine, "ca", ContainerStatus::Running)],
        );
        assert!(r.plan(now, 16).is_empty(), "no desired set yet");
        assert!(
            r.report().allocations.is_empty(),
            "nothing is said of a container before the set says whose it is"
        );
        r.apply(desired(1, vec![mine.clone()]));
        assert!(
            r.plan(now, 16).is_empty(),
            "not removed, not launched before it is observed again"
        );
        let token = r.observe_begin();
        r.observe(
            now,
            token,
            vec![observed(&mine, "ca", ContainerStatus::Running)],
        );
        assert!(r.plan(now, 16).is_empty(), "adopted");
        assert_eq!(status(&r, "a").state, AllocState::Running);
        assert_eq!(status(&r, "a").container_id.as_deref(), Some("ca"));
    }

    /// A container that exited while its agent was down, listed before the
    /// first desired set: nothing is reported of it (a report of a failed
    /// orphan made the controller replace the allocation elsewhere); once the
    /// set wants it, it is adopted and restarted under its restart policy.
    #[test]
    fn a_container_that_exited_while_the_agent_was_down_is_restarted_not_reported_failed() {
        let mut r = core();
        let now = Instant::now();
        let mine = spec("a", once());
        let token = r.observe_begin();
        r.observe(now, token, vec![observed(&mine, "ca", exited(137))]);
        assert!(r.report().allocations.is_empty());
        r.apply(desired(1, vec![mine.clone()]));
        let token = r.observe_begin();
        r.observe(now, token, vec![observed(&mine, "ca", exited(137))]);
        assert_ne!(status(&r, "a").state, AllocState::Failed);
        let later = now + Duration::from_secs(2);
        assert_eq!(
            r.plan(later, 16),
            vec![Action::Start {
                alloc: "a".into(),
                container_id: "ca".into()
            }]
        );
        assert_eq!(status(&r, "a").restarts, 1);
    }

    #[test]
    fn a_second_container_of_one_allocation_is_an_orphan() {
        let mut r = core();
        let now = Instant::now();
        let a = spec("a", once());
        r.apply(desired(1, vec![a.clone()]));
        let token = r.observe_begin();
        r.observe(
            now,
            token,
            vec![
                observed(&a, "old", exited(1)),
                observed(&a, "live", ContainerStatus::Running),
            ],
        );
        assert_eq!(status(&r, "a").container_id.as_deref(), Some("live"));
        assert_eq!(
            r.plan(now, 16),
            vec![Action::Remove {
                alloc: "a".into(),
                container_id: "old".into()
            }]
        );
    }

    #[test]
    fn a_vanished_container_is_launched_again_as_a_restart() {
        let mut r = core();
        let now = Instant::now();
        let a = spec("a", once());
        r.apply(desired(1, vec![a.clone()]));
        launched(&mut r, now, &a, "c1");
        let token = r.observe_begin();
        r.observe(now, token, vec![]);
        let s = status(&r, "a");
        assert_eq!(s.state, AllocState::Starting);
        assert!(s.message.contains("disappeared"), "{}", s.message);
        let later = now + Duration::from_secs(1);
        let actions = r.plan(later, 16);
        assert!(
            matches!(&actions[..], [Action::Launch { replace: None, .. }]),
            "{actions:?}"
        );
        assert_eq!(status(&r, "a").restarts, 1);
    }

    #[test]
    fn delay_mode_waits_for_the_window_instead_of_failing() {
        let mut r = core();
        let t0 = Instant::now();
        let a = spec(
            "a",
            RestartSpec {
                attempts: 1,
                interval_ms: 10_000,
                delay_ms: 100,
                delay_mode: true,
            },
        );
        r.apply(desired(1, vec![a.clone()]));
        launched(&mut r, t0, &a, "c1");
        let token = r.observe_begin();
        r.observe(t0, token, vec![observed(&a, "c1", exited(1))]);
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(r.plan(t1, 16).len(), 1);
        r.complete(
            t1,
            Outcome::Started {
                alloc: "a".into(),
                container_id: "c1".into(),
                result: Ok(run("c1")),
            },
        );
        let token = r.observe_begin();
        r.observe(t1, token, vec![observed(&a, "c1", exited(1))]);
        let s = status(&r, "a");
        assert_eq!(s.state, AllocState::Starting);
        assert!(s.message.contains("window"), "{}", s.message);
        assert_eq!(r.next_deadline(), Some(t1 + Duration::from_secs(10)));
    }

    fn tcp_probe(port: u16, threshold: u32) -> ProbeSpec {
        ProbeSpec {
            check: HealthCheckKind::Tcp { port },
            period_ms: 1000,
            timeout_ms: 0,
            failure_threshold: threshold,
            initial_delay_ms: 1000,
        }
    }

    fn checked(
        liveness: Option<ProbeSpec>,
        readiness: Option<ProbeSpec>,
        startup: Option<ProbeSpec>,
    ) -> AllocationSpec {
        let mut a = spec("a", once());
        a.task.health = Some(HealthSpec {
            liveness,
            readiness,
            startup,
            max_restarts: 2,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 60_000,
        });
        a
    }

    /// Runs the checks due at `now` on container `cid`, each answering per `ok`.
    fn probe_all(
        r: &mut Reconciler,
        now: Instant,
        cid: &str,
        ok: &dyn Fn(ProbeRole) -> bool,
    ) -> Vec<Action> {
        let actions = r.plan(now, 16);
        let mut others = Vec::new();
        for action in actions {
            match action {
                Action::Probe { alloc, role, .. } => r.complete(
                    now,
                    Outcome::Probed {
                        alloc,
                        container_id: cid.into(),
                        role,
                        result: if ok(role) {
                            Ok(())
                        } else {
                            Err("refused".into())
                        },
                    },
                ),
                other => others.push(other),
            }
        }
        // What the results call for (a stop) comes with the next plan.
        others.extend(r.plan(now, 16));
        others
    }

    #[test]
    fn health_turns_unhealthy_after_retries_and_back() {
        let mut r = core();
        let t0 = Instant::now();
        let a = checked(None, Some(tcp_probe(80, 2)), None);
        r.apply(desired(1, vec![a.clone()]));
        launched(&mut r, t0, &a, "c1");
        assert_eq!(r.next_deadline(), Some(t0 + Duration::from_secs(1)));
        let mut now = t0;
        let mut probe = |r: &mut Reconciler, ok: bool| {
            now += Duration::from_secs(1);
            let actions = r.plan(now, 16);
            assert!(
                matches!(&actions[..], [Action::Probe { timeout, role: ProbeRole::Readiness, .. }] if *timeout == DEFAULT_PROBE_TIMEOUT),
                "{actions:?}"
            );
            assert!(r.plan(now, 16).is_empty(), "one probe at a time");
            r.complete(
                now,
                Outcome::Probed {
                    alloc: "a".into(),
                    container_id: "c1".into(),
                    role: ProbeRole::Readiness,
                    result: if ok { Ok(()) } else { Err("refused".into()) },
                },
            );
            status(r, "a").healthy
        };
        assert_eq!(probe(&mut r, false), None);
        assert_eq!(probe(&mut r, false), Some(false));
        assert!(
            status(&r, "a").message.contains("readiness check failing"),
            "{}",
            status(&r, "a").message
        );
        assert_eq!(probe(&mut r, true), Some(true));
    }

    #[test]
    fn readiness_failures_never_stop_the_container() {
        let mut r = core();
        let t0 = Instant::now();
        let a = checked(None, Some(tcp_probe(80, 1)), None);
        r.apply(desired(1, vec![a.clone()]));
        launched(&mut r, t0, &a, "c1");
        for i in 1..=30u64 {
            let others = probe_all(&mut r, t0 + Duration::from_secs(i), "c1", &|_| false);
            assert!(others.is_empty(), "at {i}s: {others:?}");
        }
        let s = status(&r, "a");
        assert_eq!(
            (s.state, s.healthy, s.restarts, s.failure),
            (AllocState::Running, Some(false), 0, None)
        );
    }

    #[test]
    fn liveness_failures_restart_with_backoff_then_fail_as_unhealthy() {
        let mut r = core();
        let t0 = Instant::now();
        let a = checked(Some(tcp_probe(80, 2)), None, None);
        r.apply(desired(1, vec![a.clone()]));
        launched(&mut r, t0, &a, "c1");
        let s = Duration::from_secs;
        let mut now = t0;
        // Each round: two failed checks, the container stopped, a restart after
        // the backoff (1s, then 2s); the third round spends the budget of 2.
        for round in 0..3u32 {
            now += s(1);
            assert!(probe_all(&mut r, now, "c1", &|_| false).is_empty());
            assert_eq!(status(&r, "a").healthy, None, "one failure is no verdict");
            now += s(1);
            let others = probe_all(&mut r, now, "c1", &|_| false);
            assert!(
                matches!(&others[..], [Action::Stop { container_id, .. }] if container_id == "c1"),
                "round {round}: {others:?}"
            );
            assert_eq!(status(&r, "a").healthy, Some(false));
            assert!(r.plan(now, 16).is_empty(), "one stop at a time");
            r.complete(
                now,
                Outcome::Stopped {
                    alloc: "a".into(),
                    container_id: "c1".into(),
                    result: Ok(()),
                },
            );
            let st = status(&r, "a");
            if round == 2 {
                assert_eq!(st.state, AllocState::Failed);
                assert_eq!(st.failure, Some(FailureReason::Unhealthy));
                assert!(
                    st.message.contains("health restarts used up"),
                    "{}",
                    st.message
                );
                assert_eq!(r.next_deadline(), None);
                assert!(r.plan(now + s(600), 16).is_empty(), "failed is final");
                return;
            }
            assert_eq!(st.state, AllocState::Starting, "round {round}");
            assert_eq!(st.failure, None);
            let backoff = s(1 << round);
            assert_eq!(r.next_deadline(), Some(now + backoff), "round {round}");
            assert!(
                r.plan(now + backoff - Duration::from_millis(1), 16)
                    .is_empty()
            );
            now += backoff;
            let actions = r.plan(now, 16);
            assert!(
                matches!(&actions[..], [Action::Start { container_id, .. }] if container_id == "c1"),
                "{actions:?}"
            );
            r.complete(
                now,
                Outcome::Started {
                    alloc: "a".into(),
                    container_id: "c1".into(),
                    result: Ok(run("c1")),
                },
            );
            let st = status(&r, "a");
            assert_eq!(
                (st.state, st.restarts, st.healthy),
                (AllocState::Running, round + 1, None)
            );
        }
        unreachable!("the budget of 2 ends the third round");
    }

    #[test]
    fn health_restarts_leave_the_exit_restart_policy_alone() {
        // `once()` allows one restart after an exit; two health restarts before it
        // must not use it up.
        let mut r = core();
        let t0 = Instant::now();
        let a = checked(Some(tcp_probe(80, 1)), None, None);
        r.apply(desired(1, vec![a.clone()]));
        launched(&mut r, t0, &a, "c1");
        let mut now = t0;
        for _ in 0..2 {
            now += Duration::from_secs(1);
            let others = probe_all(&mut r, now, "c1", &|_| false);
            assert!(matches!(&others[..], [Action::Stop { .. }]), "{others:?}");
            r.complete(
                now,
                Outcome::Stopped {
                    alloc: "a".into(),
                    container_id: "c1".into(),
                    result: Ok(()),
                },
            );
            now += Duration::from_secs(10);
            assert!(matches!(&r.plan(now, 16)[..], [Action::Start { .. }]));
            r.complete(
                now,
                Outcome::Started {
                    alloc: "a".into(),
                    container_id: "c1".into(),
                    result: Ok(run("c1")),
                },
            );
        }
        // Now it exits: the exit policy still has its one restart.
        now += Duration::from_secs(1);
        let token = r.observe_begin();
        let mut o = observed(&a, "c1", exited(1));
        o.started_at_unix_ms = Some(2_000);
        r.observe(now, token, vec![o]);
        let st = status(&r, "a");
        assert_eq!(st.state, AllocState::Starting, "{}", st.message);
    }

    #[test]
    fn startup_holds_liveness_back_and_its_own_failures_restart() {
        let mut r = core();
        let t0 = Instant::now();
        // Liveness would fail at once; startup gets 3 tries.
        let a = checked(
            Some(tcp_probe(81, 1)),
            Some(tcp_probe(82, 1)),
            Some(tcp_probe(80, 3)),
        );
        r.apply(desired(1, vec![a.clone()]));
        launched(&mut r, t0, &a, "c1");
        for i in 1..=2u64 {
            let now = t0 + Duration::from_secs(i);
            let actions = r.plan(now, 16);
            assert!(
                matches!(
                    &actions[..],
                    [Action::Probe {
                        role: ProbeRole::Startup,
                        ..
                    }]
                ),
                "only startup runs before it passes: {actions:?}"
            );
            r.complete(
                now,
                Outcome::Probed {
                    alloc: "a".into(),
                    container_id: "c1".into(),
                    role: ProbeRole::Startup,
                    result: Err("refused".into()),
                },
            );
            assert_eq!(status(&r, "a").healthy, None, "not ready during startup");
        }
        let now = t0 + Duration::from_secs(3);
        let others = probe_all(&mut r, now, "c1", &|_| false);
        assert!(matches!(&others[..], [Action::Stop { .. }]), "{others:?}");
        assert!(
            status(&r, "a")
                .message
                .contains("startup check failed 3 times")
        );
    }

    #[test]
    fn a_stale_probe_result_counts_for_nothing() {
        let mut r = core();
        let t0 = Instant::now();
        let a = checked(Some(tcp_probe(80, 1)), None, None);
        r.apply(desired(1, vec![a.clone()]));
        launched(&mut r, t0, &a, "c2");
        let now = t0 + Duration::from_secs(1);
        assert!(matches!(&r.plan(now, 16)[..], [Action::Probe { .. }]));
        r.complete(
            now,
            Outcome::Probed {
                alloc: "a".into(),
                container_id: "c1".into(),
                role: ProbeRole::Liveness,
                result: Err("refused".into()),
            },
        );
        assert_eq!(status(&r, "a").healthy, None);
        // The check may run again.
        assert!(matches!(&r.plan(now, 16)[..], [Action::Probe { .. }]));
    }

    #[test]
    fn the_budget_bounds_actions_in_flight() {
        let mut r = core();
        let now = Instant::now();
        let allocs: Vec<_> = (0..5).map(|i| spec(&format!("a{i}"), once())).collect();
        r.apply(desired(1, allocs));
        let token = r.observe_begin();
        r.observe(now, token, vec![]);
        assert_eq!(r.plan(now, 2).len(), 2);
        assert_eq!(r.plan(now, 2).len(), 2);
        assert_eq!(r.plan(now, 2).len(), 1);
        assert!(r.plan(now, 2).is_empty());
    }

    #[test]
    fn running_lists_containers_and_limits() {
        let mut r = core();
        let now = Instant::now();
        let mut a = spec("a", once());
        a.task.memory_bytes = 1 << 20;
        r.apply(desired(1, vec![a.clone()]));
        launched(&mut r, now, &a, "c1");
        assert_eq!(
            r.running(),
            vec![RunningAlloc {
                alloc: "a".into(),
                container_id: "c1".into(),
                memory_limit_bytes: 1 << 20
            }]
        );
        assert_eq!(r.container_of("a").as_deref(), Some("c1"));
        assert_eq!(r.container_of("b"), None);
    }

    fn paused(alloc: &str, cid: &str, paused: bool, result: Result<(), RuntimeError>) -> Outcome {
        Outcome::Paused {
            alloc: alloc.into(),
            container_id: cid.into(),
            paused,
            result,
        }
    }

    #[test]
    fn a_suspended_guest_is_paused_kept_unchecked_and_resumed_with_fresh_checks() {
        let mut r = core();
        let t0 = Instant::now();
        let a = checked(Some(tcp_probe(80, 1)), None, None);
        r.apply(desired(1, vec![a.clone()]));
        launched(&mut r, t0, &a, "c1");
        let t1 = t0 + Duration::from_secs(2);
        let probes = probe_all(&mut r, t1, "c1", &|_| true);
        assert!(probes.is_empty(), "{probes:?}");
        assert_eq!(status(&r, "a").healthy, Some(true));
        // The set suspends it: one pause, and nothing else until it is done.
        let mut s = a.clone();
        s.suspended = true;
        r.apply(desired(2, vec![s.clone()]));
        let actions = r.plan(t1, 16);
        assert_eq!(
            actions,
            vec![Action::Pause {
                alloc: "a".into(),
                container_id: "c1".into(),
                paused: true,
            }]
        );
        assert!(r.plan(t1, 16).is_empty(), "one pause at a time");
        r.complete(t1, paused("a", "c1", true, Ok(())));
        let st = status(&r, "a");
        assert!(st.suspended && st.state == AllocState::Running, "{st:?}");
        // Paused, as observed: no check runs, however long, and nothing is due.
        let token = r.observe_begin();
        let mut o = observed(&s, "c1", ContainerStatus::Running);
        o.paused = true;
        r.observe(t1, token, vec![o.clone()]);
        assert_eq!(r.next_deadline(), None);
        for secs in [3, 10, 120] {
            let actions = r.plan(t0 + Duration::from_secs(secs), 16);
            assert!(actions.is_empty(), "at {secs} s: {actions:?}");
        }
        assert_eq!(status(&r, "a").state, AllocState::Running);
        // Resumed: one resume, then the checks start over after their delay.
        r.apply(desired(3, vec![a.clone()]));
        let t2 = t0 + Duration::from_secs(200);
        assert_eq!(
            r.plan(t2, 16),
            vec![Action::Pause {
                alloc: "a".into(),
                container_id: "c1".into(),
                paused: false,
            }]
        );
        r.complete(t2, paused("a", "c1", false, Ok(())));
        assert!(!status(&r, "a").suspended);
        assert!(
            r.plan(t2, 16).is_empty(),
            "no check before its initial delay"
        );
        let t3 = t2 + Duration::from_secs(1);
        assert!(
            matches!(&r.plan(t3, 16)[..], [Action::Probe { .. }]),
            "the checks run again"
        );
    }

    #[test]
    fn a_check_that_fails_while_its_guest_is_paused_counts_for_nothing() {
        let mut r = core();
        let t0 = Instant::now();
        let a = checked(Some(tcp_probe(80, 1)), None, None);
        r.apply(desired(1, vec![a.clone()]));
        launched(&mut r, t0, &a, "c1");
        let t1 = t0 + Duration::from_secs(1);
        let probe = r.plan(t1, 16);
        assert!(matches!(&probe[..], [Action::Probe { .. }]), "{probe:?}");
        // The guest is suspended while its check is in flight; the check
        // then times out.
        let mut s = a.clone();
        s.suspended = true;
        r.apply(desired(2, vec![s]));
        let pause = r.plan(t1, 16);
        assert!(
            matches!(&pause[..], [Action::Pause { paused: true, .. }]),
            "{pause:?}"
        );
        r.complete(t1, paused("a", "c1", true, Ok(())));
        r.complete(
            t1,
            Outcome::Probed {
                alloc: "a".into(),
                container_id: "c1".into(),
                role: ProbeRole::Liveness,
                result: Err("timed out".into()),
            },
        );
        let st = status(&r, "a");
        assert_eq!(st.state, AllocState::Running, "{st:?}");
        assert_ne!(st.healthy, Some(false), "{st:?}");
        assert!(r.plan(t1 + Duration::from_secs(5), 16).is_empty());
    }

    #[test]
    fn a_paused_guest_found_after_an_agent_restart_is_kept_paused_or_resumed_as_the_set_says() {
        for suspended in [true, false] {
            let mut r = core();
            let t0 = Instant::now();
            let mut a = checked(Some(tcp_probe(80, 1)), None, None);
            a.suspended = suspended;
            r.apply(desired(1, vec![a.clone()]));
            let token = r.observe_begin();
            let mut o = observed(&a, "c1", ContainerStatus::Running);
            o.paused = true;
            r.observe(t0, token, vec![o]);
            let actions = r.plan(t0, 16);
            let st = status(&r, "a");
            assert_eq!(st.state, AllocState::Running, "adopted, not restarted");
            assert!(st.suspended, "reported as it is");
            if suspended {
                assert!(actions.is_empty(), "{actions:?}");
            } else {
                assert!(
                    matches!(&actions[..], [Action::Pause { paused: false, .. }]),
                    "{actions:?}"
                );
            }
        }
    }

    #[test]
    fn a_pause_that_fails_is_tried_again_later_and_says_why() {
        let mut r = core();
        let t0 = Instant::now();
        let mut a = spec("a", once());
        r.apply(desired(1, vec![a.clone()]));
        launched(&mut r, t0, &a, "c1");
        a.suspended = true;
        r.apply(desired(2, vec![a]));
        assert_eq!(r.plan(t0, 16).len(), 1);
        let error = RuntimeError::Daemon {
            op: "suspend",
            message: "qmp: connection refused".into(),
        };
        r.complete(t0, paused("a", "c1", true, Err(error)));
        let st = status(&r, "a");
        assert!(
            !st.suspended && st.message.contains("cannot suspend"),
            "{st:?}"
        );
        assert!(r.plan(t0, 16).is_empty(), "not at once");
        let retry = r.next_deadline().expect("a retry is due");
        assert!(matches!(
            &r.plan(retry, 16)[..],
            [Action::Pause { paused: true, .. }]
        ));
    }
}

//! [`Supervisor`]: the thin shell around the [`Reconciler`]. It owns the node's
//! desired set, lists and inspects containers, carries out the core's actions on a
//! [`ContainerRuntime`], and publishes the report.
//!
//! One loop ([`Supervisor::run`]) does the work. It wakes on a poll tick
//! ([`SupervisorConfig::poll_interval`]), on a runtime event (a container started,
//! died or went away), on a new desired set, when an action finishes and at the
//! core's next deadline (a restart or a health check that is due). Actions run as
//! tasks, at most [`SupervisorConfig::max_in_flight`] at a time and one per
//! allocation. Listings are cheap; a container is inspected again only when its
//! listed state changed, an event named it or an action touched it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::stream::{self, Stream, StreamExt};
use novacron_common::backoff::Backoff;
use novacron_common::retry::Retry;
use novacron_common::sync::lock;
use novacron_common::ticker::Ticker;
use novacron_common::wire::{
    AllocationReport, AllocationSpec, AllocationUsage, DesiredAllocations, HealthCheckKind,
    LogChunk, LogRequest, PullPolicy, RestoreFrom,
};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::reconcile::{Action, LaunchError, Observed, Outcome, Reconciler, ReconcilerConfig, Run};
use super::spec::{container_config, container_name, fallback_container_name};
use super::usage::UsageTracker;
use super::{
    ContainerDetails, ContainerRuntime, ContainerStatus, LABEL_ALLOC, LABEL_NODE, RuntimeError,
    health, logs,
};

/// Default time between two listings of the node's containers.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Default time a container gets to stop before it is killed.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// Default limit on runtime actions in flight.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 16;
/// Default age after which a container's usage is read again.
pub const DEFAULT_USAGE_REFRESH: Duration = Duration::from_secs(1);
/// Default limit on stats readings per [`Supervisor::usage`] call.
pub const DEFAULT_MAX_STATS_PER_CALL: usize = 32;

/// Concurrent inspects during one observation, and concurrent stats readings.
const RUNTIME_CONCURRENCY: usize = 8;
/// Containers named by events and not yet inspected again; past this, all are.
const MAX_STALE: usize = 1024;
/// The wait before the event stream is opened again after it first ends (half to
/// all of it: the delays carry jitter, so agents do not reconnect in step).
const EVENTS_RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait before the event stream is opened again.
const EVENTS_RETRY_MAX: Duration = Duration::from_secs(30);

/// Settings of a [`Supervisor`].
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// This node's name: containers are labelled with it, and only containers with
    /// it are ever stopped or removed.
    pub node_name: String,
    /// Time between two listings (the backstop; events wake the loop sooner).
    pub poll_interval: Duration,
    /// Time a container gets between SIGTERM and SIGKILL when it is stopped.
    pub stop_grace: Duration,
    /// Runtime actions in flight at most.
    pub max_in_flight: usize,
    /// [`Supervisor::usage`] reads a container again once its reading is this old
    /// (give or take a quarter).
    pub usage_refresh: Duration,
    /// [`Supervisor::usage`] reads at most this many containers per call; the
    /// others keep their last values.
    pub max_stats_per_call: usize,
    /// Where secret files are written for allocations (a tmpfs).
    pub secrets_dir: std::path::PathBuf,
    /// The loopback registry's port (the controller's image store): a missing
    /// image is pulled from there first. `None`: registries only.
    pub image_store_port: Option<u16>,
    /// Where the images this agent pulls are recorded (for the collector);
    /// `None`: not recorded.
    pub pulled_images: Option<std::path::PathBuf>,
    /// The disk the pulled images may take before unused ones are removed;
    /// `None`: never removed.
    pub image_gc_budget: Option<u64>,
}

impl SupervisorConfig {
    /// Defaults for `node_name`.
    pub fn new(node_name: impl Into<String>) -> Self {
        let node_name = node_name.into();
        SupervisorConfig {
            node_name: node_name.clone(),
            poll_interval: DEFAULT_POLL_INTERVAL,
            stop_grace: DEFAULT_STOP_GRACE,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            usage_refresh: DEFAULT_USAGE_REFRESH,
            max_stats_per_call: DEFAULT_MAX_STATS_PER_CALL,
            secrets_dir: super::secrets::default_dir(&node_name),
            image_store_port: None,
            pulled_images: None,
            image_gc_budget: None,
        }
    }
}

/// Runs the node's allocations on a [`ContainerRuntime`]. Cheap to clone; clones
/// share everything.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use novacron_agent::runtime::{DockerRuntime, Supervisor, SupervisorConfig};
/// use tokio_util::sync::CancellationToken;
///
/// let runtime = DockerRuntime::new(None)?;
/// let supervisor = Supervisor::new(runtime, SupervisorConfig::new("node-1"));
/// let cancel = CancellationToken::new();
/// let task = supervisor.spawn(cancel.clone());
/// let mut reports = supervisor.subscribe();
/// // supervisor.apply(desired) for every `ControllerMessage::Desired`;
/// // reports.changed().await, then send reports.borrow().clone().
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Supervisor<R> {
    inner: Arc<Inner<R>>,
}

impl<R> Clone for Supervisor<R> {
    fn clone(&self) -> Self {
        Supervisor {
            inner: self.inner.clone(),
        }
    }
}

#[derive(Debug)]
struct Inner<R> {
    runtime: R,
    config: SupervisorConfig,
    core: Mutex<Reconciler>,
    wake: Notify,
    report: watch::Sender<AllocationReport>,
    usage: tokio::sync::Mutex<UsageTracker>,
    stale: Mutex<Stale>,
    restorer: std::sync::OnceLock<Arc<dyn Restorer>>,
    pulled: Option<Arc<super::images::PulledImages>>,
    /// The allocations the secret files were last swept for.
    swept: Mutex<HashSet<String>>,
    /// The pulls in progress, by allocation (reported while they last).
    pulling: Mutex<HashMap<String, novacron_common::wire::PullProgress>>,
    /// The images the controller asks this node to pull ahead.
    prepull: watch::Sender<Vec<novacron_common::wire::PrePull>>,
}

/// Starts a created container from a checkpoint bundle (the agent's checkpoint
/// service serves it; the supervisor itself knows nothing of bundles).
pub trait Restorer: Send + Sync + std::fmt::Debug + 'static {
    /// Restores `from` into the created, not yet started container `container_id` of
    /// `alloc`, and starts it.
    fn restore<'a>(
        &'a self,
        alloc: &'a str,
        from: &'a RestoreFrom,
        container_id: &'a str,
    ) -> futures_util::future::BoxFuture<'a, Result<(), String>>;
}

/// Containers to inspect again at the next observation.
#[derive(Debug, Default)]
struct Stale {
    ids: HashSet<String>,
    all: bool,
}

impl<R: ContainerRuntime> Supervisor<R> {
    /// A supervisor with an empty desired set. Nothing happens until
    /// [`Supervisor::run`] runs; no container is stopped before the first
    /// [`Supervisor::apply`].
    pub fn new(runtime: R, config: SupervisorConfig) -> Self {
        let core = Reconciler::new(ReconcilerConfig::new(config.node_name.clone()));
        let pulled = config
            .pulled_images
            .clone()
            .map(|p| Arc::new(super::images::PulledImages::load(p)));
        let (report, _) = watch::channel(core.report());
        Supervisor {
            inner: Arc::new(Inner {
                runtime,
                config,
                core: Mutex::new(core),
                wake: Notify::new(),
                report,
                usage: tokio::sync::Mutex::new(UsageTracker::default()),
                stale: Mutex::new(Stale::default()),
                restorer: std::sync::OnceLock::new(),
                pulled,
                swept: Mutex::new(HashSet::new()),
                pulling: Mutex::new(HashMap::new()),
                prepull: watch::channel(Vec::new()).0,
            }),
        }
    }

    /// Gives the supervisor what restores checkpoints (once).
    pub fn set_restorer(&self, restorer: Arc<dyn Restorer>) {
        let _ = self.inner.restorer.set(restorer);
    }

    /// Holds `alloc` for `for_how_long`: its container is neither restarted nor
    /// removed meanwhile (a migration's checkpoint stopped it).
    pub fn hold(&self, alloc: &str, for_how_long: Duration) {
        self.inner.core().hold(alloc, Instant::now() + for_how_long);
        self.inner.publish();
    }

    /// Ends a hold; the allocation is reconciled again at once.
    pub fn release(&self, alloc: &str, restore: Option<RestoreFrom>) -> bool {
        let was = self.inner.core().release(alloc, restore);
        self.inner.mark_all_stale();
        self.inner.wake.notify_one();
        was
    }

    /// The spec `alloc` is desired with on this node.
    pub fn spec_of(&self, alloc: &str) -> Option<Arc<AllocationSpec>> {
        self.inner.core().desired_spec(alloc)
    }

    /// The runtime.
    pub fn runtime(&self) -> &R {
        &self.inner.runtime
    }

    /// Replaces the desired set (level-triggered). Returns `false`, changing nothing,
    /// when `desired` is older than the set in force.
    pub fn apply(&self, mut desired: DesiredAllocations) -> bool {
        let generation = desired.generation;
        let prepull = std::mem::take(&mut desired.prepull);
        if !self.inner.core().apply(desired) {
            debug!(generation, "ignored an older desired set");
            return false;
        }
        self.inner.prepull.send_if_modified(|current| {
            if *current == prepull {
                false
            } else {
                *current = prepull;
                true
            }
        });
        self.inner.publish();
        self.inner.wake.notify_one();
        true
    }

    /// The state of every allocation now.
    pub fn report(&self) -> AllocationReport {
        self.inner.core().report()
    }

    /// The report, updated whenever it changes: `changed().await` wakes on every
    /// change, `borrow()` reads the latest.
    pub fn subscribe(&self) -> watch::Receiver<AllocationReport> {
        self.inner.report.subscribe()
    }

    /// Runs [`Supervisor::run`] on a new task.
    pub fn spawn(&self, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let supervisor = self.clone();
        tokio::spawn(async move { supervisor.run(cancel).await })
    }

    /// The reconcile loop, until `cancel` fires. Run it once per supervisor. Stopping
    /// it leaves the containers running (a restarted agent adopts them); actions in
    /// flight are abandoned.
    pub async fn run(&self, cancel: CancellationToken) {
        let inner = &self.inner;
        let events = tokio::spawn(watch_events(inner.clone(), cancel.child_token()));
        let prefetch = tokio::spawn(prefetch(inner.clone(), cancel.clone()));
        let gc = match (&inner.pulled, inner.config.image_gc_budget) {
            (Some(pulled), Some(budget)) => {
                let (inner, pulled, cancel) = (inner.clone(), pulled.clone(), cancel.clone());
                Some(tokio::spawn(async move {
                    loop {
                        tokio::select! {
                            () = tokio::time::sleep(super::images::GC_INTERVAL) => {}
                            () = cancel.cancelled() => return,
                        }
                        super::images::collect(&inner.runtime, &pulled, budget).await;
                    }
                }))
            }
            _ => None,
        };
        let mut jobs: JoinSet<Outcome> = JoinSet::new();
        let mut in_flight: HashMap<tokio::task::Id, Action> = HashMap::new();
        let mut cache = InspectCache::default();
        let mut ticker = Ticker::new(
            inner.config.poll_interval,
            MissedTickBehavior::Delay,
            cancel.cancelled(),
        );
        let mut observe = true;
        info!(node = %inner.config.node_name, "container supervisor running");
        loop {
            if observe {
                observe = false;
                inner.observe(&mut cache).await;
            }
            let budget = inner.config.max_in_flight.saturating_sub(jobs.len());
            let actions = inner.core().plan(Instant::now(), budget);
            for action in actions {
                cache.forget(action_container(&action));
                let handle = jobs.spawn(execute(inner.clone(), action.clone()));
                in_flight.insert(handle.id(), action);
            }
            inner.publish();
            // With every slot taken, whatever is due waits for a slot: a deadline
            // already past would only spin the loop.
            let deadline = if jobs.len() < inner.config.max_in_flight {
                inner.core().next_deadline()
            } else {
                None
            };
            tokio::select! {
                // A tick, or `false` once `cancel` fired.
                ticked = ticker.tick() => {
                    if !ticked {
                        break;
                    }
                    observe = true;
                }
                _ = inner.wake.notified() => observe = true,
                Some(joined) = jobs.join_next_with_id(), if !jobs.is_empty() => {
                    let outcome = match joined {
                        Ok((id, outcome)) => {
                            in_flight.remove(&id);
                            outcome
                        }
                        Err(e) => {
                            let action = in_flight.remove(&e.id());
                            error!(error = %e, ?action, "runtime action panicked");
                            let Some(action) = action else { continue };
                            panicked(action)
                        }
                    };
                    cache.forget(outcome_container(&outcome));
                    inner.core().complete(Instant::now(), outcome);
                }
                _ = sleep_until(deadline) => {}
            }
        }
        events.abort();
        prefetch.abort();
        if let Some(gc) = gc {
            gc.abort();
        }
        jobs.abort_all();
        info!(node = %inner.config.node_name, "container supervisor stopped");
    }

    /// The usage of every running allocation. Reads at most
    /// [`SupervisorConfig::max_stats_per_call`] containers, only those whose
    /// last reading is older than about [`SupervisorConfig::usage_refresh`]; the
    /// others report their last values. Allocations never read yet are left out.
    pub async fn usage(&self) -> Vec<AllocationUsage> {
        let inner = &self.inner;
        let running = inner.core().running();
        let containers: Vec<String> = running.iter().map(|r| r.container_id.clone()).collect();
        let mut tracker = inner.usage.lock().await;
        tracker.retain(&containers);
        let due = tracker.due(
            Instant::now(),
            &containers,
            inner.config.usage_refresh,
            inner.config.max_stats_per_call,
        );
        let readings: Vec<(String, Result<_, RuntimeError>, Instant)> = stream::iter(due)
            .map(|id| async move {
                let reading = inner.runtime.stats(&id).await;
                (id, reading, Instant::now())
            })
            .buffer_unordered(RUNTIME_CONCURRENCY)
            .collect()
            .await;
        for (id, reading, at) in readings {
            match reading {
                Ok(reading) => tracker.record(&id, reading, at),
                Err(e) => debug!(container = %id, error = %e, "no stats reading"),
            }
        }
        running
            .iter()
            .filter_map(|r| tracker.usage(&r.alloc, &r.container_id, r.memory_limit_bytes))
            .collect()
    }

    /// An allocation's output as wire chunks (each at most 64 KiB), ending with a
    /// chunk whose `end` is set. An allocation without a container gives one chunk
    /// with an error. With `follow`, the stream goes on until the container stops
    /// or the caller drops it.
    pub fn logs(&self, request: LogRequest) -> impl Stream<Item = LogChunk> + Send + 'static {
        match self.inner.core().container_of(&request.allocation) {
            Some(container) => logs::chunks(self.inner.runtime.logs(
                &container,
                request.follow,
                request.tail,
            ))
            .left_stream(),
            None => logs::failed(format!(
                "allocation {} has no container on node {}",
                request.allocation, self.inner.config.node_name
            ))
            .right_stream(),
        }
    }

    /// The running container of `alloc`, for remote exec, or why there is none.
    /// The container must be one this supervisor manages and, as the daemon reports
    /// it now, labelled with the allocation and this node, and running.
    pub async fn exec_container(&self, alloc: &str) -> Result<String, String> {
        let node = &self.inner.config.node_name;
        let Some(container) = self.inner.core().container_of(alloc) else {
            return Err(format!(
                "allocation {alloc} has no container on node {node}; `novacron alloc list` shows where each allocation runs"
            ));
        };
        let details = self.inner.runtime.inspect(&container).await.map_err(|e| {
            format!("cannot inspect the container of allocation {alloc} on node {node}: {e}")
        })?;
        let owned = details.labels.get(LABEL_ALLOC).map(String::as_str) == Some(alloc)
            && details.labels.get(LABEL_NODE) == Some(node);
        if !owned {
            return Err(format!(
                "container {container} is not labelled {LABEL_ALLOC}={alloc} and {LABEL_NODE}={node}; node {node} only runs commands in its own allocations' containers"
            ));
        }
        match details.status {
            ContainerStatus::Running => Ok(container),
            ContainerStatus::Created => Err(format!(
                "the container of allocation {alloc} on node {node} has not started yet; exec needs a running container"
            )),
            ContainerStatus::Exited { code, .. } => Err(format!(
                "the container of allocation {alloc} on node {node} is not running (it exited with {code}); exec needs a running container"
            )),
        }
    }
}

impl<R: ContainerRuntime> Inner<R> {
    fn core(&self) -> MutexGuard<'_, Reconciler> {
        // A panic while holding the lock leaves a consistent core (every method
        // finishes its updates before returning), so the poison is ignored.
        lock(&self.core)
    }

    fn publish(&self) {
        let mut report = self.core().report();
        {
            let pulling = lock(&self.pulling);
            for a in report.allocations.iter_mut().filter(|a| {
                matches!(
                    a.state,
                    novacron_common::wire::AllocState::Pending
                        | novacron_common::wire::AllocState::Starting
                )
            }) {
                if let Some(p) = pulling.get(&a.id) {
                    a.message = p.to_string();
                    a.pull = Some(p.clone());
                }
            }
        }
        self.report.send_if_modified(|current| {
            if *current == report {
                false
            } else {
                *current = report;
                true
            }
        });
    }

    fn mark_all_stale(&self) {
        let mut stale = lock(&self.stale);
        stale.all = true;
        stale.ids.clear();
    }

    fn mark_stale(&self, container: String) {
        let mut stale = lock(&self.stale);
        if stale.ids.len() >= MAX_STALE {
            stale.all = true;
            stale.ids.clear();
        } else if !stale.all {
            stale.ids.insert(container);
        }
    }

    /// Lists the node's containers, inspects those that changed, and feeds the
    /// result to the core. Any failure (other than a container vanishing between
    /// listing and inspection) discards the whole observation: a partial one would
    /// look like containers that disappeared.
    async fn observe(&self, cache: &mut InspectCache) {
        let token = self.core().observe_begin();
        let node = &self.config.node_name;
        let listing = match self.runtime.list(node).await {
            Ok(listing) => listing,
            Err(e) => {
                let error = e.to_string();
                // Once per distinct error: Docker may stay away for a long time
                // (not installed yet, still starting), and the poll is every second.
                if self.core().runtime_error() != Some(error.as_str()) {
                    warn!(%node, %error, "cannot list containers; retrying every poll");
                } else {
                    debug!(%node, %error, "cannot list containers");
                }
                self.core().observe_failed(error);
                return;
            }
        };
        if self.core().runtime_error().is_some() {
            info!(%node, "the container runtime answers again");
        }
        {
            let mut stale = lock(&self.stale);
            if std::mem::take(&mut stale.all) {
                cache.entries.clear();
            }
            for id in stale.ids.drain() {
                cache.entries.remove(&id);
            }
        }
        let listed: HashSet<&str> = listing.iter().map(|l| l.id.as_str()).collect();
        cache.entries.retain(|id, _| listed.contains(id.as_str()));
        let changed: Vec<(String, String)> = listing
            .iter()
            .filter(|l| {
                cache
                    .entries
                    .get(&l.id)
                    .is_none_or(|(state, _)| *state != l.state)
            })
            .map(|l| (l.id.clone(), l.state.clone()))
            .collect();
        let inspected: Vec<_> = stream::iter(changed)
            .map(|(id, state)| async move {
                let details = self.runtime.inspect(&id).await;
                (id, state, details)
            })
            .buffer_unordered(RUNTIME_CONCURRENCY)
            .collect()
            .await;
        for (id, state, details) in inspected {
            match details {
                Ok(details) => {
                    cache.entries.insert(id, (state, details));
                }
                Err(e) if e.is_not_found() => {
                    cache.entries.remove(&id);
                }
                Err(e) => {
                    warn!(%node, container = %id, error = %e, "cannot inspect container");
                    self.core().observe_failed(e.to_string());
                    return;
                }
            }
        }
        let observed: Vec<Observed> = listing
            .iter()
            .filter_map(|l| cache.entries.get(&l.id))
            .filter_map(|(_, details)| Observed::from_details(details.clone()))
            .collect();
        self.core().observe(Instant::now(), token, observed);
        // Secret files of allocations this node no longer runs nor wants: the
        // directory is read again only when that set of allocations changed.
        let keep: HashSet<String> = self
            .core()
            .report()
            .allocations
            .into_iter()
            .map(|a| a.id)
            .collect();
        let changed = {
            let mut last = lock(&self.swept);
            let changed = *last != keep;
            if changed {
                last.clone_from(&keep);
            }
            changed
        };
        if changed {
            super::secrets::sweep(&self.config.secrets_dir, keep).await;
        }
    }
}

/// The last inspection of each listed container, with the listed state it was made
/// at.
#[derive(Debug, Default)]
struct InspectCache {
    entries: HashMap<String, (String, ContainerDetails)>,
}

impl InspectCache {
    fn forget(&mut self, container: Option<&str>) {
        if let Some(id) = container {
            self.entries.remove(id);
        }
    }
}

fn action_container(action: &Action) -> Option<&str> {
    match action {
        Action::Launch { replace, .. } => replace.as_deref(),
        Action::Start { container_id, .. }
        | Action::Remove { container_id, .. }
        | Action::Stop { container_id, .. }
        | Action::Pause { container_id, .. } => Some(container_id),
        Action::Probe { .. } => None,
    }
}

fn outcome_container(outcome: &Outcome) -> Option<&str> {
    match outcome {
        Outcome::Launched {
            result: Ok(run), ..
        } => Some(&run.container_id),
        Outcome::Launched {
            result:
                Err(LaunchError::Failed {
                    container_id: Some(id),
                    ..
                }),
            ..
        } => Some(id),
        Outcome::Started { container_id, .. }
        | Outcome::Removed { container_id, .. }
        | Outcome::Stopped { container_id, .. }
        | Outcome::Paused { container_id, .. } => Some(container_id),
        _ => None,
    }
}

/// The outcome that stands in for an action whose task panicked.
fn panicked(action: Action) -> Outcome {
    let error = RuntimeError::Daemon {
        op: "supervisor",
        message: "the action panicked".into(),
    };
    match action {
        Action::Launch {
            alloc, spec_hash, ..
        } => Outcome::Launched {
            alloc,
            spec_hash,
            result: Err(LaunchError::Failed {
                container_id: None,
                message: error.to_string(),
            }),
        },
        Action::Start {
            alloc,
            container_id,
        } => Outcome::Started {
            alloc,
            container_id,
            result: Err(error),
        },
        Action::Remove {
            alloc,
            container_id,
        } => Outcome::Removed {
            alloc,
            container_id,
            result: Err(error),
        },
        Action::Stop {
            alloc,
            container_id,
        } => Outcome::Stopped {
            alloc,
            container_id,
            result: Err(error),
        },
        Action::Pause {
            alloc,
            container_id,
            paused,
        } => Outcome::Paused {
            alloc,
            container_id,
            paused,
            result: Err(error),
        },
        Action::Probe {
            alloc,
            container_id,
            role,
            ..
        } => Outcome::Probed {
            alloc,
            container_id,
            role,
            result: Err(error.to_string()),
        },
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Carries out one action.
async fn execute<R: ContainerRuntime>(inner: Arc<Inner<R>>, action: Action) -> Outcome {
    let runtime = &inner.runtime;
    match action {
        Action::Launch {
            alloc,
            spec,
            spec_hash,
            replace,
        } => {
            let result = launch(&inner, &spec, &spec_hash, replace.as_deref()).await;
            match &result {
                Ok(run) => info!(%alloc, container = %run.container_id, "started"),
                Err(LaunchError::ImageMissing { image }) => {
                    warn!(%alloc, %image, "image not present on this node")
                }
                Err(LaunchError::PullFailed { image, message }) => {
                    warn!(%alloc, %image, error = %message, "could not pull the image")
                }
                Err(
                    LaunchError::Failed { message, .. }
                    | LaunchError::RestoreFailed { message, .. }
                    | LaunchError::Replace { message },
                ) => {
                    warn!(%alloc, error = %message, "launch failed")
                }
            }
            Outcome::Launched {
                alloc,
                spec_hash,
                result,
            }
        }
        Action::Start {
            alloc,
            container_id,
        } => {
            // A VM or runc container that must arrive live (its state is on
            // another node) never boots afresh: a start after a failed arrival waits for its
            // state again, which a settled migration sends or takes away.
            let arriving = inner
                .core()
                .desired_spec(&alloc)
                .and_then(|s| s.restore.clone())
                .filter(|r| {
                    r.incoming_vm.is_some()
                        && (super::vm::is_vm(&container_id) || super::oci::is_oci(&container_id))
                });
            let started = match (arriving, inner.restorer.get()) {
                (Some(from), Some(restorer)) => restorer
                    .restore(&alloc, &from, &container_id)
                    .await
                    .map_err(|message| RuntimeError::Daemon {
                        op: "restore",
                        message,
                    }),
                _ => runtime.start(&container_id).await,
            };
            let result = match started {
                Ok(()) => Ok(run_of(runtime, &container_id).await),
                Err(e) => Err(e),
            };
            match &result {
                Ok(_) => info!(%alloc, container = %container_id, "restarted"),
                Err(e) => warn!(%alloc, container = %container_id, error = %e, "restart failed"),
            }
            Outcome::Started {
                alloc,
                container_id,
                result,
            }
        }
        Action::Remove {
            alloc,
            container_id,
        } => {
            let result = stop_and_remove(&inner, &container_id).await;
            match &result {
                Ok(()) => info!(%alloc, container = %container_id, "stopped and removed"),
                Err(e) => warn!(%alloc, container = %container_id, error = %e, "remove failed"),
            }
            Outcome::Removed {
                alloc,
                container_id,
                result,
            }
        }
        Action::Stop {
            alloc,
            container_id,
        } => {
            let result = match runtime.stop(&container_id, inner.config.stop_grace).await {
                Err(e) if e.is_not_found() => Ok(()),
                other => other,
            };
            match &result {
                Ok(()) => {
                    info!(%alloc, container = %container_id, "stopped after a failed health check")
                }
                Err(e) => warn!(%alloc, container = %container_id, error = %e, "stop failed"),
            }
            Outcome::Stopped {
                alloc,
                container_id,
                result,
            }
        }
        Action::Pause {
            alloc,
            container_id,
            paused,
        } => {
            let result = runtime.set_paused(&container_id, paused).await;
            let what = if paused { "suspended" } else { "resumed" };
            match &result {
                Ok(()) => info!(%alloc, container = %container_id, "{what}"),
                Err(e) => warn!(%alloc, container = %container_id, error = %e, "cannot be {what}"),
            }
            Outcome::Paused {
                alloc,
                container_id,
                paused,
                result,
            }
        }
        Action::Probe {
            alloc,
            container_id,
            role,
            check,
            ip,
            timeout,
        } => {
            let result = probe(runtime, &container_id, &check, ip, timeout).await;
            if let Err(why) = &result {
                debug!(%alloc, container = %container_id, check = role.name(), error = %why, "health check failed");
            }
            Outcome::Probed {
                alloc,
                container_id,
                role,
                result,
            }
        }
    }
}

/// Removes `replace`, checks the image, creates and starts the container.
async fn launch<R: ContainerRuntime>(
    inner: &Inner<R>,
    spec: &AllocationSpec,
    spec_hash: &str,
    replace: Option<&str>,
) -> Result<Run, LaunchError> {
    let runtime = &inner.runtime;
    let failed = |container_id: Option<String>, e: RuntimeError| LaunchError::Failed {
        container_id,
        message: e.to_string(),
    };
    if let Some(old) = replace {
        stop_and_remove(inner, old)
            .await
            .map_err(|e| LaunchError::Replace {
                message: e.to_string(),
            })?;
    }
    // A version's recorded digest, unless the job follows its tag (always).
    let mut image: String = match (&spec.task.image_digest, spec.task.pull_policy) {
        (Some(digest), PullPolicy::IfNotPresent | PullPolicy::Never) => digest,
        _ => &spec.task.image,
    }
    .clone();
    let image = &mut image;
    let present = runtime
        .image_present(image)
        .await
        .map_err(|e| failed(None, e))?;
    match (spec.task.pull_policy, present) {
        (PullPolicy::Never, false) => {
            return Err(LaunchError::ImageMissing {
                image: image.clone(),
            });
        }
        (PullPolicy::Never | PullPolicy::IfNotPresent, true) => {}
        (PullPolicy::Always, _) | (PullPolicy::IfNotPresent, false) => {
            let started = std::time::Instant::now();
            let now_ms = novacron_common::clock::unix_ms(std::time::SystemTime::now());
            // Progress is reported on the allocation while it pulls.
            let progress = |p: novacron_common::wire::PullProgress| {
                lock(&inner.pulling).insert(spec.id.clone(), p);
                inner.publish();
            };
            let pulled = pull_from_store(inner, &spec.id, image, &progress).await;
            if let Some((local, relayed)) = pulled {
                lock(&inner.pulling).remove(&spec.id);
                info!(alloc = %spec.id, %image, took = ?started.elapsed(), "pulled the image from the controller's image store");
                if let Some(p) = &inner.pulled {
                    p.pulled(&relayed, now_ms);
                    p.pulled(&local, now_ms);
                }
                *image = local;
            } else {
                let result = runtime
                    .pull(image, spec.task.registry_auth.as_ref(), &progress)
                    .await;
                lock(&inner.pulling).remove(&spec.id);
                result.map_err(|e| LaunchError::PullFailed {
                    image: image.clone(),
                    message: e.to_string(),
                })?;
                info!(alloc = %spec.id, %image, took = ?started.elapsed(), "pulled the image");
                if let Some(p) = &inner.pulled {
                    p.pulled(image, now_ms);
                }
            }
        }
    }
    if let Some(p) = &inner.pulled {
        p.used(
            image,
            novacron_common::clock::unix_ms(std::time::SystemTime::now()),
        );
    }
    let image_digest = match runtime.repo_digests(image).await {
        Ok(digests) => super::registry_digest(image, &digests),
        Err(e) => {
            debug!(alloc = %spec.id, %image, error = %e, "cannot read the image's digests");
            None
        }
    };
    let mut config = container_config(&inner.config.node_name, spec, spec_hash);
    config.image = image.clone();
    config.mounts.extend(
        super::secrets::write_files(&inner.config.secrets_dir, spec, true)
            .await
            .map_err(|message| LaunchError::Failed {
                container_id: None,
                message,
            })?,
    );
    let node = &inner.config.node_name;
    let name = container_name(node, &spec.job, &spec.id);
    let id = match runtime.create(&name, &config).await {
        Ok(id) => id,
        Err(RuntimeError::Conflict { .. }) => {
            let fallback = fallback_container_name(node, &spec.job, &spec.id, spec_hash);
            debug!(alloc = %spec.id, %name, %fallback, "container name taken; adding the spec hash");
            runtime
                .create(&fallback, &config)
                .await
                .map_err(|e| failed(None, e))?
        }
        Err(e) => return Err(failed(None, e)),
    };
    match (&spec.restore, inner.restorer.get()) {
        (None, _) => runtime
            .start(&id)
            .await
            .map_err(|e| failed(Some(id.clone()), e))?,
        (Some(from), Some(restorer)) => {
            restorer
                .restore(&spec.id, from, &id)
                .await
                .map_err(|message| LaunchError::RestoreFailed {
                    container_id: id.clone(),
                    message: format!("restoring checkpoint {}: {message}", from.digest),
                })?
        }
        (Some(from), None) => {
            return Err(LaunchError::RestoreFailed {
                container_id: id.clone(),
                message: format!(
                    "checkpoint {} cannot be restored: this agent has no checkpoint service",
                    from.digest
                ),
            });
        }
    }
    let mut run = run_of(runtime, &id).await;
    run.image_digest = image_digest;
    Ok(run)
}

/// How often images to pull ahead are checked again (one may have been
/// removed, or a pull failed).
const PREFETCH_RECHECK: Duration = Duration::from_secs(60);

/// Pulls the images the controller asks this node to pull ahead (`prePull`
/// jobs), one at a time, whenever the list changes and every
/// [`PREFETCH_RECHECK`]: from the controller's image store when it has them,
/// else from their registries.
async fn prefetch<R: ContainerRuntime>(inner: Arc<Inner<R>>, cancel: CancellationToken) {
    let mut rx = inner.prepull.subscribe();
    loop {
        let wanted = rx.borrow_and_update().clone();
        for p in wanted {
            if cancel.is_cancelled() {
                return;
            }
            match inner.runtime.image_present(&p.image).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    debug!(image = %p.image, error = %e, "pull ahead: cannot check the image");
                    continue;
                }
            }
            let started = std::time::Instant::now();
            let now_ms = novacron_common::clock::unix_ms(std::time::SystemTime::now());
            if let Some((local, relayed)) =
                pull_from_store(&inner, "(pull ahead)", &p.image, &|_| {}).await
            {
                info!(image = %p.image, took = ?started.elapsed(), "pulled ahead from the controller's image store");
                if let Some(record) = &inner.pulled {
                    record.pulled(&relayed, now_ms);
                    record.pulled(&local, now_ms);
                }
                continue;
            }
            match inner
                .runtime
                .pull(&p.image, p.registry_auth.as_ref(), &|_| {})
                .await
            {
                Ok(()) => {
                    info!(image = %p.image, took = ?started.elapsed(), "pulled ahead");
                    if let Some(record) = &inner.pulled {
                        record.pulled(&p.image, now_ms);
                    }
                }
                Err(e) => {
                    warn!(image = %p.image, error = %e, "pull ahead failed; trying again later")
                }
            }
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            () = tokio::time::sleep(PREFETCH_RECHECK) => {}
            () = cancel.cancelled() => return,
        }
    }
}

/// Pulls `image` through the loopback registry (the controller's image store),
/// when it can come from there: the reference to create the container from (the
/// image tagged as named; the relayed reference for a digest), or `None` when
/// the store does not have it (or cannot be reached): then the registry.
async fn pull_from_store<R: ContainerRuntime>(
    inner: &Inner<R>,
    alloc: &str,
    image: &str,
    progress: &(dyn Fn(novacron_common::wire::PullProgress) + Send + Sync),
) -> Option<(String, String)> {
    let port = inner.config.image_store_port?;
    let (name, reference) = crate::registry::store_reference(image)?;
    let relayed = format!("127.0.0.1:{port}/{name}{reference}");
    let named = |mut p: novacron_common::wire::PullProgress| {
        p.image = image.to_owned();
        progress(p);
    };
    if let Err(e) = inner.runtime.pull(&relayed, None, &named).await {
        debug!(%alloc, %image, error = %e, "not from the controller's image store");
        return None;
    }
    if reference.starts_with('@') {
        return Some((relayed.clone(), relayed));
    }
    match inner.runtime.tag(&relayed, image).await {
        Ok(()) => Some((image.to_owned(), relayed)),
        Err(e) => {
            warn!(%alloc, %image, error = %e, "cannot tag the image pulled from the controller's store; running it by its relayed name");
            Some((relayed.clone(), relayed))
        }
    }
}

/// The run of a container just started. Without an answer from inspect, the start
/// time and address stay unknown until the next observation fills them in.
async fn run_of<R: ContainerRuntime>(runtime: &R, id: &str) -> Run {
    match runtime.inspect(id).await {
        Ok(details) => Run {
            container_id: id.to_owned(),
            started_at_unix_ms: details.started_at_unix_ms,
            ip: details.ip,
            published: details.published,
            image_digest: None,
        },
        Err(e) => {
            debug!(container = %id, error = %e, "cannot inspect a started container");
            Run {
                container_id: id.to_owned(),
                started_at_unix_ms: None,
                ip: None,
                published: Vec::new(),
                image_digest: None,
            }
        }
    }
}

/// Stops (with the grace period) and removes a container; one already gone counts as
/// removed.
async fn stop_and_remove<R: ContainerRuntime>(
    inner: &Inner<R>,
    id: &str,
) -> Result<(), RuntimeError> {
    match inner.runtime.stop(id, inner.config.stop_grace).await {
        Ok(()) => {}
        Err(e) if e.is_not_found() => return Ok(()),
        // Removal is forced, so a failed stop only costs the grace period.
        Err(e) => debug!(container = %id, error = %e, "stop failed; removing by force"),
    }
    match inner.runtime.remove(id).await {
        Err(e) if !e.is_not_found() => Err(e),
        _ => Ok(()),
    }
}

async fn probe<R: ContainerRuntime>(
    runtime: &R,
    container: &str,
    check: &HealthCheckKind,
    ip: Option<std::net::IpAddr>,
    timeout: Duration,
) -> Result<(), String> {
    let no_ip = || "the container has no IP address".to_owned();
    match check {
        HealthCheckKind::Http { port, path } => {
            let ip = ip.ok_or_else(no_ip)?;
            health::http_check(SocketAddr::new(ip, *port), path, timeout).await
        }
        HealthCheckKind::Tcp { port } => {
            let ip = ip.ok_or_else(no_ip)?;
            health::tcp_check(SocketAddr::new(ip, *port), timeout).await
        }
        HealthCheckKind::Exec { command } => {
            match tokio::time::timeout(timeout, runtime.exec(container, command)).await {
                Ok(Ok(0)) => Ok(()),
                Ok(Ok(code)) => Err(format!("{command:?} exited with code {code}")),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("{command:?} did not finish within {timeout:?}")),
            }
        }
    }
}

/// Follows the runtime's events for this node: each one marks its container for
/// inspection and wakes the loop. Reopens the stream, backing off, when it ends.
async fn watch_events<R: ContainerRuntime>(inner: Arc<Inner<R>>, cancel: CancellationToken) {
    let node = inner.config.node_name.clone();
    let mut retry = Retry::new(Backoff {
        initial: EVENTS_RETRY_FIRST,
        max: EVENTS_RETRY_MAX,
    });
    loop {
        let mut events = inner.runtime.events(&node);
        loop {
            let item = tokio::select! {
                _ = cancel.cancelled() => return,
                item = events.next() => item,
            };
            match item {
                Some(Ok(event)) => {
                    retry.reset();
                    debug!(container = %event.container_id, action = %event.action, "container event");
                    inner.mark_stale(event.container_id);
                    inner.wake.notify_one();
                }
                Some(Err(e)) => {
                    debug!(%node, error = %e, "container events failed");
                    break;
                }
                None => break,
            }
        }
        if !retry.wait(cancel.cancelled()).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use futures_util::stream::BoxStream;
    use novacron_common::wire::{AllocState, RestartSpec, TaskSpec};

    use super::*;
    use crate::runtime::{
        ContainerConfig, ContainerEvent, ContainerListing, ContainerStatus, LogFrame, StatsReading,
    };

    /// An in-memory container runtime.
    #[derive(Debug, Default)]
    struct Fake {
        state: Mutex<FakeState>,
    }

    #[derive(Debug, Default)]
    struct FakeState {
        containers: BTreeMap<String, FakeContainer>,
        images: HashSet<String>,
        /// Images a pull finds.
        registry: HashSet<String>,
        pulls: u32,
        next_id: u32,
        clock_ms: u64,
        list_error: Option<String>,
        /// How many listings were made.
        lists: u32,
        creates: u32,
        /// How long a pull takes (it reports half its bytes first).
        pull_time: Duration,
    }

    #[derive(Debug, Clone)]
    struct FakeContainer {
        name: String,
        labels: HashMap<String, String>,
        status: ContainerStatus,
        started_at: Option<u64>,
        paused: bool,
    }

    impl Fake {
        fn with_image(image: &str) -> Self {
            let fake = Fake::default();
            fake.state().images.insert(image.to_owned());
            fake
        }

        fn state(&self) -> MutexGuard<'_, FakeState> {
            self.state.lock().expect("fake state")
        }

        fn exit(&self, id: &str, code: i64) {
            let mut st = self.state();
            let c = st.containers.get_mut(id).expect("container");
            c.status = ContainerStatus::Exited {
                code,
                oom_killed: false,
                error: String::new(),
            };
        }

        fn add(&self, id: &str, labels: &[(&str, &str)]) {
            self.state().containers.insert(
                id.to_owned(),
                FakeContainer {
                    name: id.to_owned(),
                    labels: labels
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                    status: ContainerStatus::Running,
                    started_at: Some(1),
                    paused: false,
                },
            );
        }
    }

    fn not_found(op: &'static str) -> RuntimeError {
        RuntimeError::NotFound {
            op,
            message: "no such container".into(),
        }
    }

    impl ContainerRuntime for Fake {
        async fn local_images(
            &self,
        ) -> Result<Vec<super::super::images::LocalImage>, RuntimeError> {
            Ok(self
                .state()
                .images
                .iter()
                .map(|i| super::super::images::LocalImage {
                    id: i.clone(),
                    tags: vec![i.clone()],
                    digests: vec![],
                    size: 1,
                })
                .collect())
        }

        async fn images_in_use(&self) -> Result<HashSet<String>, RuntimeError> {
            // The fake's containers all come from its one image.
            Ok(self.state().images.iter().take(1).cloned().collect())
        }

        async fn remove_image(&self, reference: &str) -> Result<(), RuntimeError> {
            self.state().images.remove(reference);
            Ok(())
        }

        async fn tag(&self, _source: &str, target: &str) -> Result<(), RuntimeError> {
            self.state().images.insert(target.to_owned());
            Ok(())
        }

        async fn image_inventory(
            &self,
        ) -> Result<novacron_common::wire::ImageInventory, RuntimeError> {
            Ok(super::super::inventory(
                self.state().images.iter().cloned(),
                0,
            ))
        }

        async fn repo_digests(&self, _image: &str) -> Result<Vec<String>, RuntimeError> {
            Ok(Vec::new())
        }

        async fn pull(
            &self,
            image: &str,
            _auth: Option<&novacron_common::wire::RegistryAuth>,
            progress: &(dyn Fn(novacron_common::wire::PullProgress) + Send + Sync),
        ) -> Result<(), super::super::PullError> {
            let pull_time = self.state().pull_time;
            if !pull_time.is_zero() {
                progress(novacron_common::wire::PullProgress {
                    image: image.to_owned(),
                    done_bytes: 50 << 20,
                    total_bytes: 100 << 20,
                });
                tokio::time::sleep(pull_time).await;
            }
            let mut st = self.state();
            st.pulls += 1;
            if st.registry.contains(image) {
                st.images.insert(image.to_owned());
                Ok(())
            } else {
                Err(super::super::PullError::classify(
                    Some(404),
                    &format!("manifest for {image} not found: manifest unknown"),
                ))
            }
        }

        async fn list(&self, node: &str) -> Result<Vec<ContainerListing>, RuntimeError> {
            let mut st = self.state();
            st.lists += 1;
            if let Some(message) = &st.list_error {
                return Err(RuntimeError::Daemon {
                    op: "list",
                    message: message.clone(),
                });
            }
            Ok(st
                .containers
                .iter()
                .filter(|(_, c)| {
                    c.labels.contains_key(super::super::LABEL_ALLOC)
                        && c.labels.get(super::super::LABEL_NODE).map(String::as_str) == Some(node)
                })
                .map(|(id, c)| ContainerListing {
                    id: id.clone(),
                    labels: c.labels.clone(),
                    state: format!("{:?}", c.status),
                })
                .collect())
        }

        async fn inspect(&self, id: &str) -> Result<ContainerDetails, RuntimeError> {
            let st = self.state();
            let c = st.containers.get(id).ok_or_else(|| not_found("inspect"))?;
            Ok(ContainerDetails {
                id: id.to_owned(),
                labels: c.labels.clone(),
                status: c.status.clone(),
                started_at_unix_ms: c.started_at,
                ip: None,
                published: Vec::new(),
                paused: c.paused,
            })
        }

        async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
            Ok(self.state().images.contains(image))
        }

        async fn create(
            &self,
            name: &str,
            config: &ContainerConfig,
        ) -> Result<String, RuntimeError> {
            let mut st = self.state();
            if st.containers.values().any(|c| c.name == name) {
                return Err(RuntimeError::Conflict {
                    op: "create",
                    message: name.to_owned(),
                });
            }
            st.next_id += 1;
            st.creates += 1;
            let id = format!("c{}", st.next_id);
            st.containers.insert(
                id.clone(),
                FakeContainer {
                    name: name.to_owned(),
                    labels: config.labels.clone().into_iter().collect(),
                    status: ContainerStatus::Created,
                    started_at: None,
                    paused: false,
                },
            );
            Ok(id)
        }

        async fn start(&self, id: &str) -> Result<(), RuntimeError> {
            let mut st = self.state();
            st.clock_ms += 1000;
            let now = st.clock_ms;
            let c = st
                .containers
                .get_mut(id)
                .ok_or_else(|| not_found("start"))?;
            c.status = ContainerStatus::Running;
            c.started_at = Some(now);
            Ok(())
        }

        async fn stop(&self, id: &str, _grace: Duration) -> Result<(), RuntimeError> {
            self.exit(id, 143);
            Ok(())
        }

        async fn set_paused(&self, id: &str, paused: bool) -> Result<(), RuntimeError> {
            let mut st = self.state();
            let c = st
                .containers
                .get_mut(id)
                .ok_or_else(|| not_found("pause"))?;
            c.paused = paused;
            Ok(())
        }

        async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
            self.state()
                .containers
                .remove(id)
                .map(|_| ())
                .ok_or_else(|| not_found("remove"))
        }

        async fn stats(&self, id: &str) -> Result<StatsReading, RuntimeError> {
            self.state()
                .containers
                .get(id)
                .map(|_| StatsReading {
                    memory_bytes: 42,
                    ..StatsReading::default()
                })
                .ok_or_else(|| not_found("stats"))
        }

        async fn exec(&self, _id: &str, _command: &[String]) -> Result<i64, RuntimeError> {
            Ok(0)
        }

        async fn exec_attached(
            &self,
            id: &str,
            command: &[String],
        ) -> Result<crate::runtime::ExecSession, RuntimeError> {
            match self.state().containers.get(id).map(|c| c.status.clone()) {
                Some(ContainerStatus::Running) => {}
                Some(_) => {
                    return Err(RuntimeError::Conflict {
                        op: "exec",
                        message: format!("container {id} is not running"),
                    });
                }
                None => return Err(not_found("exec")),
            }
            let data = format!("ran {}\n", command.join(" ")).into_bytes();
            Ok(crate::runtime::ExecSession {
                id: format!("exec-{id}"),
                output: stream::iter([Ok(LogFrame {
                    stderr: false,
                    data,
                })])
                .boxed(),
            })
        }

        async fn exec_state(
            &self,
            _exec_id: &str,
        ) -> Result<crate::runtime::ExecState, RuntimeError> {
            Ok(crate::runtime::ExecState {
                running: false,
                exit_code: Some(0),
                pid: None,
            })
        }

        async fn exec_kill(&self, _exec_id: &str) -> Result<(), RuntimeError> {
            Ok(())
        }

        fn logs(
            &self,
            _id: &str,
            _follow: bool,
            _tail: u32,
        ) -> BoxStream<'static, Result<LogFrame, RuntimeError>> {
            stream::iter([Ok(LogFrame {
                stderr: false,
                data: b"hello\n".to_vec(),
            })])
            .boxed()
        }

        fn events(&self, _node: &str) -> BoxStream<'static, Result<ContainerEvent, RuntimeError>> {
            stream::pending().boxed()
        }
    }

    const NODE: &str = "fake-node";

    fn config() -> SupervisorConfig {
        SupervisorConfig {
            poll_interval: Duration::from_millis(20),
            ..SupervisorConfig::new(NODE)
        }
    }

    fn alloc(id: &str) -> AllocationSpec {
        AllocationSpec {
            restore: None,
            suspended: false,
            id: id.into(),
            job: "job".into(),
            job_version: 1,
            task: TaskSpec {
                image: "img:1".into(),
                restart: RestartSpec {
                    attempts: 3,
                    interval_ms: 60_000,
                    delay_ms: 0,
                    delay_mode: false,
                },
                memory_bytes: 1 << 20,
                ..TaskSpec::default()
            },
        }
    }

    async fn until(
        supervisor: &Supervisor<Fake>,
        what: &str,
        check: impl Fn(&AllocationReport) -> bool,
    ) -> AllocationReport {
        let mut reports = supervisor.subscribe();
        let wait = async {
            loop {
                let report = reports.borrow_and_update().clone();
                if check(&report) {
                    return report;
                }
                reports.changed().await.expect("supervisor alive");
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), wait).await {
            Ok(report) => report,
            Err(_) => panic!("timed out waiting for {what}: {:?}", supervisor.report()),
        }
    }

    fn state_of(report: &AllocationReport, id: &str) -> Option<AllocState> {
        report
            .allocations
            .iter()
            .find(|a| a.id == id)
            .map(|a| a.state)
    }

    #[tokio::test]
    async fn a_pull_in_progress_shows_on_its_allocation_until_it_ends() {
        let fake = Fake::default();
        {
            let mut st = fake.state();
            st.registry.insert("img:1".into());
            st.pull_time = Duration::from_millis(300);
        }
        let supervisor = Supervisor::new(fake, config());
        let cancel = CancellationToken::new();
        let task = supervisor.spawn(cancel.clone());
        assert!(supervisor.apply(DesiredAllocations {
            epoch: 1,
            generation: 1,
            allocations: vec![alloc("a1")],
            prepull: Vec::new(),
        }));
        let pulling = until(&supervisor, "the pull reported", |r| {
            r.allocations.iter().any(|a| a.pull.is_some())
        })
        .await;
        let a = &pulling.allocations[0];
        assert_eq!(a.state, AllocState::Starting);
        assert_eq!(a.message, "pulling image img:1: 52.4 of 104.9 MB");
        let done = until(&supervisor, "running", |r| {
            state_of(r, "a1") == Some(AllocState::Running)
        })
        .await;
        assert_eq!(done.allocations[0].pull, None, "gone once pulled");
        cancel.cancel();
        let _ = task.await;
    }

    #[tokio::test]
    async fn launches_restarts_and_reads_usage_and_logs() {
        let supervisor = Supervisor::new(Fake::with_image("img:1"), config());
        let cancel = CancellationToken::new();
        let task = supervisor.spawn(cancel.clone());
        assert!(supervisor.apply(DesiredAllocations {
            epoch: 1,
            generation: 1,
            allocations: vec![alloc("a1")],
            prepull: Vec::new(),
        }));
        let report = until(&supervisor, "running", |r| {
            state_of(r, "a1") == Some(AllocState::Running)
        })
        .await;
        let container = report.allocations[0]
            .container_id
            .clone()
            .expect("container id");
        assert!(report.allocations[0].started_at_unix_ms.is_some());

        supervisor.runtime().exit(&container, 1);
        let report = until(&supervisor, "a restart", |r| {
            r.allocations[0].restarts == 1 && r.allocations[0].state == AllocState::Running
        })
        .await;
        assert_eq!(report.allocations[0].exit_code, Some(1));
        assert_eq!(report.allocations[0].container_id, Some(container));
        assert_eq!(
            supervisor.runtime().state().creates,
            1,
            "restarted, not re-created"
        );

        let usage = supervisor.usage().await;
        assert_eq!(usage.len(), 1);
        assert_eq!(
            (usage[0].memory_bytes, usage[0].memory_limit_bytes),
            (42, 1 << 20)
        );

        let chunks: Vec<LogChunk> = supervisor
            .logs(LogRequest {
                request_id: 1,
                allocation: "a1".into(),
                follow: false,
                tail: 0,
            })
            .collect()
            .await;
        assert_eq!(chunks[0].data, b"hello\n");
        assert_eq!(chunks.last().and_then(|c| c.end.clone()), Some(Ok(())));

        cancel.cancel();
        task.await.expect("loop ends");
        assert_eq!(
            supervisor.runtime().state().containers.len(),
            1,
            "stopping the supervisor leaves containers running"
        );
    }

    #[tokio::test]
    async fn nothing_is_removed_before_the_first_desired_set() {
        let fake = Fake::with_image("img:1");
        let mine = [
            (super::super::LABEL_ALLOC, "old"),
            (super::super::LABEL_NODE, NODE),
        ];
        fake.add("orphan", &mine);
        fake.add(
            "other-node",
            &[
                (super::super::LABEL_ALLOC, "x"),
                (super::super::LABEL_NODE, "another"),
            ],
        );
        fake.add("unlabelled", &[]);
        let supervisor = Supervisor::new(fake, config());
        let cancel = CancellationToken::new();
        let task = supervisor.spawn(cancel.clone());
        // Listed (twice: a plan came after the first), and neither removed nor
        // reported: whose it is, nothing says yet.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while supervisor.runtime().state().lists < 2 {
            assert!(tokio::time::Instant::now() < deadline, "never listed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(supervisor.report().allocations.is_empty());
        assert!(
            supervisor
                .runtime()
                .state()
                .containers
                .contains_key("orphan")
        );

        supervisor.apply(DesiredAllocations {
            epoch: 1,
            generation: 1,
            allocations: vec![],
            prepull: Vec::new(),
        });
        until(&supervisor, "the orphan gone", |r| r.allocations.is_empty()).await;
        let left: Vec<String> = supervisor
            .runtime()
            .state()
            .containers
            .keys()
            .cloned()
            .collect();
        assert_eq!(left, vec!["other-node", "unlabelled"]);
        cancel.cancel();
        task.await.expect("loop ends");
    }

    #[tokio::test]
    async fn an_unreachable_runtime_leaves_allocations_pending_with_the_reason() {
        let fake = Fake::with_image("img:1");
        fake.state().list_error = Some("connection refused".into());
        let supervisor = Supervisor::new(fake, config());
        let cancel = CancellationToken::new();
        let task = supervisor.spawn(cancel.clone());
        supervisor.apply(DesiredAllocations {
            epoch: 1,
            generation: 1,
            allocations: vec![alloc("a1")],
            prepull: Vec::new(),
        });
        let report = until(&supervisor, "the error", |r| {
            r.allocations
                .first()
                .is_some_and(|a| a.message.contains("connection refused"))
        })
        .await;
        assert_eq!(report.allocations[0].state, AllocState::Pending);
        assert_eq!(supervisor.runtime().state().creates, 0);
        supervisor.runtime().state().list_error = None;
        until(&supervisor, "running", |r| {
            state_of(r, "a1") == Some(AllocState::Running)
        })
        .await;
        cancel.cancel();
        task.await.expect("loop ends");
    }

    #[tokio::test]
    async fn logs_of_an_unknown_allocation_end_with_an_error() {
        let supervisor = Supervisor::new(Fake::default(), config());
        let chunks: Vec<LogChunk> = supervisor
            .logs(LogRequest {
                request_id: 1,
                allocation: "nope".into(),
                follow: true,
                tail: 10,
            })
            .collect()
            .await;
        assert_eq!(chunks.len(), 1);
        assert_eq!(
            chunks[0].end,
            Some(Err(
                "allocation nope has no container on node fake-node".into()
            ))
        );
    }

    #[tokio::test]
    async fn stale_generations_are_refused() {
        let supervisor = Supervisor::new(Fake::default(), config());
        let mut reports = supervisor.subscribe();
        assert!(supervisor.apply(DesiredAllocations {
            epoch: 1,
            generation: 2,
            allocations: vec![alloc("a")],
            prepull: Vec::new(),
        }));
        assert!(reports.has_changed().expect("open"));
        assert_eq!(reports.borrow_and_update().generation, 2);
        assert!(!supervisor.apply(DesiredAllocations {
            epoch: 1,
            generation: 1,
            allocations: vec![],
            prepull: Vec::new(),
        }));
        assert!(!reports.has_changed().expect("open"));
        assert_eq!(supervisor.report().allocations.len(), 1);
    }
}

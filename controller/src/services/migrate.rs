//! Checkpoints and migration, the controller's side.
//!
//! - **Checkpoint** (`novacron alloc checkpoint`, the job's `checkpoint.interval`):
//!   the source agent dumps the allocation into a bundle without stopping it; the
//!   controller fetches the bundle into its [`BundleStore`] (resuming a broken
//!   transfer from the bytes it has, checking the digest at the end) and keeps the
//!   job's newest `keep`.
//! - **Migration** (`novacron alloc migrate`, `node drain --migrate`, spot notices):
//!   pick a target through the scheduler, checkpoint on the source with the
//!   allocation held there (stopped, neither restarted nor removed), move the bundle
//!   into the store, relocate the allocation to the target with `restore` set (the
//!   target fetches the bundle and restores it), wait for it to run, then release
//!   the source (which removes its old container). A failure at any step rolls
//!   back: the allocation returns to the source, restored from the same bundle (or
//!   just released when no bundle was made), and the failure is an event.
//! - **Recovery**: the workload manager restores a lost allocation's replacement
//!   from its latest checkpoint ([`CheckpointIndex`]).
//!
//! The decisions (which node, whether a checkpoint is due) are pure; this module is
//! the I/O around them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use novacron_common::checkpoint::{BundleInfo, CheckpointMode};
use novacron_common::retry::Retry;
use novacron_common::sync::lock;
use novacron_common::ticker::Ticker;
use novacron_common::transfer;
use novacron_common::wire::{
    self, AllocState, BiRequest, CheckpointReply, CheckpointRequest, OciCapability, ReleaseReply,
    ReleaseRequest, RestoreFrom, VmMigrationProgress,
};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::services::agents::Agents as LinkContext;
use crate::services::events::{CONTROLLER, EventLog, NewEvent, kind};
use crate::services::workloads::{CheckpointIndex, MoveReport, Workloads};
use crate::state::bundles::{BundleStore, Have};
use crate::state::registry::Registry;
use crate::state::store::AllocRecord;
pub use novacron_api::{CopyMode, MigrationStatus, Phase};
use novacron_common::fleet::NodeStatus;

pub mod precopy;
mod vm;
use novacron_common::clock::unix_ms;

/// How long a source holds a migrating allocation without a release.
const HOLD: Duration = Duration::from_secs(10 * 60);
/// How long the source may take to checkpoint.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long the target may take to fetch, restore and start.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(300);
/// Migrations remembered for `GET /v1/migrations`.
const KEEP_MIGRATIONS: usize = 200;
/// Spot notices queued for the migration loop.
pub const SPOT_QUEUE: usize = 64;

/// How often allocations of a node under a spot notice that found no room are
/// tried again, until the deadline.
pub const SPOT_RETRY: Duration = Duration::from_secs(2);

/// A spot interruption notice from a node.
#[derive(Debug, Clone)]
pub struct SpotEvent {
    /// The node.
    pub node: String,
    /// `terminate`, `stop` or `hibernate`.
    pub action: String,
    /// When the node goes (Unix ms).
    pub deadline_unix_ms: u64,
}

/// Errors of checkpoint and migration requests.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The request cannot be carried out as asked.
    #[error("{0}")]
    Invalid(String),
    /// No such allocation or node.
    #[error("{0}")]
    NotFound(String),
    /// Something failed on the way.
    #[error("{0}")]
    Failed(String),
    /// Another checkpoint or migration of the allocation is in progress.
    #[error("{0}")]
    Busy(String),
}

/// How long an operator's checkpoint or migration waits for one already in
/// progress on the same allocation (a periodic checkpoint, the checkpoint
/// after a move) before it is refused as busy.
pub const BUSY_WAIT: Duration = Duration::from_secs(120);

/// Checkpoints and migrations.
#[derive(Debug)]
pub struct Migrations {
    link: Arc<LinkContext>,
    workloads: Arc<Workloads>,
    registry: Arc<Registry>,
    bundles: Arc<BundleStore>,
    events: Arc<EventLog>,
    state: Arc<Mutex<State>>,
    /// Woken whenever an allocation's operation ends ([`Busy`]'s drop).
    released: Arc<tokio::sync::Notify>,
    /// When this service started: migrations interrupted by a restart are
    /// settled only once the nodes had time to reconnect and report.
    started: Instant,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    migrations: BTreeMap<u64, MigrationStatus>,
    /// Allocations being checkpointed or migrated (one operation at a time each).
    busy: BTreeSet<String>,
    /// Nodes whose spot notice is being handled.
    spot: BTreeSet<String>,
}

impl CheckpointIndex for BundleStore {
    fn latest(&self, alloc: &str) -> Option<BundleInfo> {
        BundleStore::latest(self, alloc)
    }
}

impl Migrations {
    /// The service.
    pub fn new(
        link: Arc<LinkContext>,
        workloads: Arc<Workloads>,
        registry: Arc<Registry>,
        bundles: Arc<BundleStore>,
        events: Arc<EventLog>,
    ) -> Self {
        Migrations {
            link,
            workloads,
            registry,
            bundles,
            events,
            state: Arc::new(Mutex::new(State::default())),
            released: Arc::new(tokio::sync::Notify::new()),
            started: Instant::now(),
        }
    }

    /// Runs `op` (an operator's checkpoint or migration of one allocation),
    /// again each time an operation in progress ends, while `op` is refused as
    /// busy, for at most `limit`.
    pub async fn taking_turns<T, F, Fut>(
        &self,
        limit: Duration,
        mut op: F,
    ) -> Result<T, MigrateError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, MigrateError>>,
    {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Made before the attempt, so that an end between the refusal and
            // the wait still wakes it.
            let released = self.released.notified();
            match op().await {
                Err(MigrateError::Busy(why)) => {
                    if tokio::time::timeout_at(deadline, released).await.is_err() {
                        return Err(MigrateError::Busy(format!(
                            "{why} (waited {}s)",
                            limit.as_secs()
                        )));
                    }
                }
                other => return other,
            }
        }
    }

    /// The bundle store.
    pub fn bundles(&self) -> &Arc<BundleStore> {
        &self.bundles
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        novacron_common::sync::lock(&self.state)
    }

    fn record(&self, event: NewEvent) {
        if let Err(e) = self.events.record(event) {
            warn!(error = %e, "cannot record an event");
        }
    }

    fn claim(&self, alloc: &str) -> Result<Busy, MigrateError> {
        if !self.lock().busy.insert(alloc.to_string()) {
            return Err(MigrateError::Busy(format!(
                "allocation {alloc} is being checkpointed or migrated already; wait for that to finish"
            )));
        }
        Ok(Busy {
            state: self.state.clone(),
            released: self.released.clone(),
            alloc: alloc.to_string(),
        })
    }

    /// A running allocation, the mode to use (`mode`, else the job's policy, else
    /// auto) and how many checkpoints its job keeps.
    fn running(
        &self,
        alloc: &str,
        mode: Option<CheckpointMode>,
        to: &str,
    ) -> Result<(AllocRecord, CheckpointMode, u32), MigrateError> {
        let not_found = |e: crate::workloads::WorkloadError| MigrateError::NotFound(e.to_string());
        let record = self.workloads.allocation(alloc).map_err(not_found)?;
        if record.state != AllocState::Running || !record.desired_run {
            return Err(MigrateError::Invalid(format!(
                "allocation {alloc} is {}; only a running allocation can {to}",
                record.state
            )));
        }
        if self.workloads.is_vm(alloc)
            && let Some(why) = passthrough_problem(&record.gpu_uuids, to)
        {
            return Err(MigrateError::Invalid(format!("allocation {alloc} {why}")));
        }
        let policy = self.workloads.checkpoint_policy(alloc).map_err(not_found)?;
        let mode = mode
            .or(policy.as_ref().map(|p| p.mode))
            .unwrap_or(CheckpointMode::Auto);
        let keep = policy
            .as_ref()
            .map_or(novacron_common::manifest::DEFAULT_KEEP, |p| p.keep);
        Ok((record, mode, keep))
    }

    /// Checkpoints `alloc` where it runs, without stopping it, and stores the bundle.
    pub async fn checkpoint(
        &self,
        alloc: &str,
        mode: Option<CheckpointMode>,
        by: &str,
    ) -> Result<BundleInfo, MigrateError> {
        let (record, mode, keep) = self.running(alloc, mode, "be checkpointed")?;
        let _busy = self.claim(alloc)?;
        let result = async {
            let info = self
                .request_checkpoint(&record.node, alloc, mode, false)
                .await?;
            self.transfer(&record.node, &info, |_, _| {}).await?;
            Ok::<_, MigrateError>(info)
        }
        .await;
        match result {
            Ok(info) => {
                self.record(
                    NewEvent::new(
                        kind::CHECKPOINT_CREATED,
                        by,
                        format!(
                            "checkpoint of {alloc} ({}, {} bytes, dump {} ms) stored as {}",
                            info.mode,
                            info.size,
                            info.dump_ms,
                            &info.digest[..12]
                        ),
                    )
                    .node(&record.node)
                    .job(&record.job)
                    .alloc(alloc)
                    .detail("digest", &info.digest),
                );
                match self.bundles.prune(&record.job, keep) {
                    Ok(gone) if !gone.is_empty() => {
                        info!(job = %record.job, keep, pruned = gone.len(), "older checkpoints pruned")
                    }
                    Ok(_) => {}
                    Err(e) => warn!(job = %record.job, error = %e, "cannot prune checkpoints"),
                }
                Ok(info)
            }
            Err(e) => {
                self.record(
                    NewEvent::new(
                        kind::CHECKPOINT_FAILED,
                        by,
                        format!("checkpoint of {alloc} failed: {e}"),
                    )
                    .node(&record.node)
                    .job(&record.job)
                    .alloc(alloc),
                );
                Err(e)
            }
        }
    }

    /// Starts migrating `alloc` (to `to`, or where the scheduler says) and returns
    /// at once; [`Migrations::status`] follows it.
    pub fn start_migration(
        self: &Arc<Self>,
        alloc: &str,
        to: Option<&str>,
        mode: Option<CheckpointMode>,
        by: &str,
    ) -> Result<MigrationStatus, MigrateError> {
        self.start_migration_with(alloc, to, mode, None, None, by)
    }

    /// [`Migrations::start_migration`] with a VM's longest planned pause
    /// (`max_downtime`; refused for a container, whose migration stops it)
    /// and a runc container's copy mode (`copy`: post-copy or stop-copy;
    /// default [`plan_copy`]'s choice; refused elsewhere).
    pub fn start_migration_with(
        self: &Arc<Self>,
        alloc: &str,
        to: Option<&str>,
        mode: Option<CheckpointMode>,
        max_downtime: Option<Duration>,
        copy: Option<CopyMode>,
        by: &str,
    ) -> Result<MigrationStatus, MigrateError> {
        let asked = mode;
        if copy.is_some() && mode == Some(CheckpointMode::Fs) {
            return Err(MigrateError::Invalid(format!(
                "a copy mode ({}) is for live migrations; --mode fs copies files only",
                copy.map_or("", CopyMode::as_str)
            )));
        }
        let mode = if copy.is_some() {
            Some(CheckpointMode::Live)
        } else {
            mode
        };
        let (record, mode, _) = self.running(alloc, mode, "migrate")?;
        if self.workloads.is_suspended(&record.job) {
            return Err(MigrateError::Invalid(format!(
                "vm {} is suspended; resume it (novacron vm resume {}) before moving it",
                record.job, record.job
            )));
        }
        if self.workloads.is_vm(alloc) {
            if let Some(c) = copy {
                return Err(MigrateError::Invalid(format!(
                    "allocation {alloc} is a virtual machine: it migrates with QEMU's pre-copy, so {c} does not apply"
                )));
            }
            return self.start_vm_migration(record, to, asked, max_downtime, by);
        }
        if max_downtime.is_some() {
            return Err(MigrateError::Invalid(format!(
                "allocation {alloc} is a container: its migration stops it for the checkpoint, so a downtime limit does not apply (it is for virtual machines)"
            )));
        }
        let source_live = self.live_capable(&record.node);
        let needs_live = match mode {
            CheckpointMode::Live => true,
            CheckpointMode::Auto => source_live,
            CheckpointMode::Fs => false,
        };
        if mode == CheckpointMode::Live && !source_live {
            let why = self
                .registry
                .view(&record.node, Instant::now())
                .and_then(|v| v.capabilities.live_checkpoint_reason)
                .map(|r| format!(" ({r})"))
                .unwrap_or_default();
            return Err(MigrateError::Invalid(format!(
                "node {} cannot take live checkpoints{why}; migrate with --mode fs or auto",
                record.node
            )));
        }
        let target = self
            .workloads
            .migration_target(alloc, to, |n| {
                if !needs_live {
                    Ok(())
                } else if !self.live_capable(n) {
                    Err("cannot restore this checkpoint (no live checkpoint support); use mode fs or another node".into())
                } else if self.runs_runc(n) != self.runs_runc(&record.node) {
                    // runc's CRIU image and Docker's differ in their mounts.
                    let runtime = |runc: bool| if runc { "runc" } else { "docker" };
                    Err(format!(
                        "runs its containers under {} and the source under {}: a live checkpoint restores only under the runtime that took it; use mode fs or another node",
                        runtime(self.runs_runc(n)),
                        runtime(self.runs_runc(&record.node))
                    ))
                } else {
                    Ok(())
                }
            })
            .map_err(|e| MigrateError::Invalid(e.to_string()))?;
        let busy = self.claim(alloc)?;
        // Between two runc nodes a live migration streams from source to
        // target (relayed, never stored), on the streams of a VM's migration.
        let streamed = needs_live
            && self.runs_runc(&record.node)
            && self.link.protocol_version(&record.node) >= wire::VM_MIGRATE_SINCE
            && self.link.protocol_version(&target) >= wire::VM_MIGRATE_SINCE;
        let copy = if streamed {
            let caps = |n: &str| {
                self.registry
                    .view(n, Instant::now())
                    .and_then(|v| v.capabilities.oci)
            };
            match plan_copy(copy, caps(&record.node).as_ref(), caps(&target).as_ref()) {
                Ok(c) => Some(c),
                Err(why) => {
                    return Err(MigrateError::Invalid(format!(
                        "cannot migrate {alloc} from {} to {target}: {why}",
                        record.node
                    )));
                }
            }
        } else if let Some(c) = copy {
            return Err(MigrateError::Invalid(format!(
                "{c} applies to a live migration between two nodes that run containers under runc; {} and {target} do not both",
                record.node
            )));
        } else {
            None
        };
        let planned = streamed.then(|| VmMigrationProgress {
            status: "none".to_owned(),
            ..Default::default()
        });
        let mode = if streamed { CheckpointMode::Live } else { mode };
        let status = self.launch(busy, &record, target, mode, by, planned, copy);
        Ok(status)
    }

    /// Records migration of `record` to `target` as started and runs it in the
    /// background ([`Migrations::run_migration`], or
    /// [`Migrations::run_vm_migration`] for a VM).
    #[allow(clippy::too_many_arguments)]
    fn launch(
        self: &Arc<Self>,
        busy: Busy,
        record: &AllocRecord,
        target: String,
        mode: CheckpointMode,
        by: &str,
        vm: Option<VmMigrationProgress>,
        copy: Option<CopyMode>,
    ) -> MigrationStatus {
        let alloc = record.id.as_str();
        let status = {
            let mut st = self.lock();
            st.next += 1;
            let id = st.next;
            let status = MigrationStatus {
                id: format!("m-{id}"),
                alloc: alloc.to_string(),
                job: record.job.clone(),
                from: record.node.clone(),
                to: target.clone(),
                mode,
                phase: Phase::Checkpointing,
                bytes_done: 0,
                bytes_total: 0,
                digest: None,
                started_unix_ms: unix_ms(SystemTime::now()),
                finished_unix_ms: None,
                downtime_ms: None,
                error: None,
                vm: vm.clone(),
                copy,
            };
            st.migrations.insert(id, status.clone());
            while st.migrations.len() > KEEP_MIGRATIONS {
                st.migrations.pop_first();
            }
            status
        };
        self.record(
            NewEvent::new(
                kind::MIGRATION_STARTED,
                by,
                format!(
                    "{}: migrating {alloc} from {} to {target} ({mode}{})",
                    status.id,
                    record.node,
                    copy.map(|c| format!(", {c}")).unwrap_or_default()
                ),
            )
            .node(&record.node)
            .job(&record.job)
            .alloc(alloc)
            .detail("migration", &status.id)
            .detail("to", &target),
        );
        let me = self.clone();
        let id = status.id.clone();
        let by = by.to_string();
        tokio::spawn(async move {
            {
                let _busy = busy;
                if vm.is_some() {
                    me.run_vm_migration(&id, &by).await;
                } else {
                    me.run_migration(&id, &by).await;
                }
            }
            me.checkpoint_after_move(&id).await;
        });
        status
    }

    /// After a migration that streamed its state (no bundle reached the
    /// store), takes a checkpoint of the allocation where it now runs, when
    /// its job has a checkpoint policy ([`checkpoint_after`]). This is off the
    /// critical path: the workload already serves on the target, and the
    /// pause is the policy's own (a periodic checkpoint's). Recovery from a
    /// loss of the target then restores this state, not one taken on the
    /// source before the move.
    async fn checkpoint_after_move(&self, id: &str) {
        let Some(status) = self.status(id) else {
            return;
        };
        let policy = self
            .workloads
            .checkpoint_policy(&status.alloc)
            .ok()
            .flatten();
        if !checkpoint_after(&status, policy.is_some()) {
            return;
        }
        info!(alloc = %status.alloc, node = %status.to, migration = %id, "checkpointing the moved allocation where it runs now");
        if let Err(e) = self.checkpoint(&status.alloc, None, CONTROLLER).await {
            // The failure is an event (checkpoint.failed); the job's periodic
            // checkpoints go on.
            warn!(alloc = %status.alloc, migration = %id, error = %e, "the checkpoint after the migration failed");
        }
    }

    /// A migration by id.
    pub fn status(&self, id: &str) -> Option<MigrationStatus> {
        let n: u64 = id.strip_prefix("m-")?.parse().ok()?;
        self.lock().migrations.get(&n).cloned()
    }

    /// Recent migrations, newest first.
    pub fn list(&self) -> Vec<MigrationStatus> {
        self.lock().migrations.values().rev().cloned().collect()
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut MigrationStatus)) {
        let Some(n) = id.strip_prefix("m-").and_then(|n| n.parse::<u64>().ok()) else {
            return;
        };
        if let Some(s) = self.lock().migrations.get_mut(&n) {
            f(s);
        }
    }

    /// Whether `node` runs its containers under runc (agent-owned).
    fn runs_runc(&self, node: &str) -> bool {
        self.registry
            .view(node, Instant::now())
            .is_some_and(|v| v.capabilities.oci.is_some())
    }

    fn live_capable(&self, node: &str) -> bool {
        self.registry
            .view(node, Instant::now())
            .is_some_and(|v| v.capabilities.live_checkpoint)
    }

    async fn run_migration(&self, id: &str, by: &str) {
        let Some(status) = self.status(id) else {
            return;
        };
        let (alloc, from, to) = (status.alloc.clone(), status.from.clone(), status.to.clone());
        // 0. The allocation left the catalog, DNS and the ingress when the
        // migration began (it counts as moving): with a shutdownDelay, give
        // clients that long to move off it before it freezes.
        if let Some(delay) = self.workloads.shutdown_delay(&alloc) {
            tokio::time::sleep(delay).await;
        }
        let started = Instant::now();
        // 1. Checkpoint on the source, holding the allocation there.
        let info = match self
            .request_checkpoint(&from, &alloc, status.mode, true)
            .await
        {
            Ok(info) => info,
            Err(e) => {
                // The agent released its hold: the source goes on as it was.
                self.fail(id, by, &format!("checkpoint on {from} failed: {e}"), None)
                    .await;
                return;
            }
        };
        self.update(id, |s| {
            s.phase = Phase::Transferring;
            s.bytes_total = info.size;
            s.digest = Some(info.digest.clone());
        });
        // 2. Move the bundle into the store.
        let progress = |done: u64, _total: u64| self.update(id, |s| s.bytes_done = done);
        if let Err(e) = self.transfer(&from, &info, progress).await {
            let reason = format!("moving bundle {} from {from} failed: {e}", info.digest);
            self.fail(id, by, &reason, Some(&info)).await;
            return;
        }
        self.update(id, |s| {
            s.phase = Phase::Restoring;
            s.bytes_done = info.size;
        });
        // 3. The target restores it.
        let restore = restore_of(&info);
        if let Err(e) = self.workloads.relocate(
            &alloc,
            &to,
            Some(restore),
            &format!("migrating from {from}: restoring checkpoint"),
        ) {
            self.fail(id, by, &format!("cannot relocate: {e}"), Some(&info))
                .await;
            return;
        }
        match self.wait_running(&alloc, &to).await {
            Ok(()) => {}
            Err(e) => {
                let reason = format!("restore on {to} failed: {e}");
                self.fail(id, by, &reason, Some(&info)).await;
                return;
            }
        }
        let downtime = started.elapsed();
        // 4. Switch over: the source removes its stopped container.
        for step in switch_over_plan(&from) {
            if let Err(e) = self.run_step(&alloc, &step).await {
                log_step_failure(&alloc, &step, &e);
            }
        }
        let now = unix_ms(SystemTime::now());
        self.update(id, |s| {
            s.phase = Phase::Completed;
            s.finished_unix_ms = Some(now);
            s.downtime_ms = Some(downtime.as_millis() as u64);
        });
        info!(%alloc, %from, %to, downtime_ms = downtime.as_millis() as u64, "migration completed");
        self.record(
            NewEvent::new(
                kind::MIGRATION_COMPLETED,
                by,
                format!(
                    "{id}: {alloc} runs on {to} (from {from}, {} checkpoint of {} bytes, {} ms from checkpoint to running)",
                    info.mode,
                    info.size,
                    downtime.as_millis()
                ),
            )
            .node(&to)
            .job(&info.job)
            .alloc(&alloc)
            .detail("migration", id)
            .detail("digest", &info.digest)
            .detail("downtime_ms", downtime.as_millis()),
        );
    }

    /// Rolls a failed migration back: the allocation returns to its source
    /// (restored from the bundle when one was made) and the failure is recorded.
    /// The steps are [`rollback_plan`]'s; this runs them.
    async fn fail(&self, id: &str, by: &str, reason: &str, bundle: Option<&BundleInfo>) {
        let Some(status) = self.status(id) else {
            return;
        };
        let (alloc, from) = (&status.alloc, &status.from);
        warn!(%alloc, %from, to = %status.to, %reason, "migration failed; rolling back");
        let mut rollback = String::from("the source goes on");
        for step in rollback_plan(from, reason, bundle) {
            let result = self.run_step(alloc, &step).await;
            match (&step, result) {
                (Step::Relocate { node, restore, .. }, Ok(())) => {
                    rollback = format!("{node} restores checkpoint {}", &restore.digest[..12]);
                }
                (Step::Relocate { node, .. }, Err(e)) => {
                    rollback = format!("cannot move it back to {node}: {e}");
                }
                (Step::AwaitRunning { .. }, Err(e)) => {
                    rollback = format!("{rollback}, but it did not come back: {e}");
                }
                (step, Err(e)) => log_step_failure(alloc, step, &e),
                (_, Ok(())) => {}
            }
        }
        self.rolled_back(&status, by, reason, &rollback, "");
    }

    /// Records migration `status` as rolled back (`what` names the workload
    /// for people: "" or "virtual machine ").
    fn rolled_back(
        &self,
        status: &MigrationStatus,
        by: &str,
        reason: &str,
        rollback: &str,
        what: &str,
    ) {
        let (id, alloc) = (&status.id, &status.alloc);
        let now = unix_ms(SystemTime::now());
        let error = format!("{reason}; rolled back: {rollback}");
        self.update(id, |s| {
            s.phase = Phase::RolledBack;
            s.finished_unix_ms = Some(now);
            s.error = Some(error.clone());
        });
        self.record(
            NewEvent::new(
                kind::MIGRATION_ROLLED_BACK,
                by,
                format!(
                    "{id}: migration of {what}{alloc} to {} failed: {error}",
                    status.to
                ),
            )
            .node(&status.from)
            .job(&status.job)
            .alloc(alloc)
            .detail("migration", id),
        );
    }

    /// Runs one step of a migration plan.
    async fn run_step(&self, alloc: &str, step: &Step) -> Result<(), String> {
        match step {
            Step::Relocate { node, restore, why } => self
                .workloads
                .relocate(alloc, node, Some(restore.clone()), why)
                .map_err(|e| e.to_string()),
            Step::Release { node, restore } => self
                .release(node, alloc, restore.clone())
                .await
                .map_err(|e| e.to_string()),
            Step::AwaitRunning { node } => self.wait_running(alloc, node).await,
            Step::ClearRestore => self
                .workloads
                .clear_restore(alloc)
                .map_err(|e| e.to_string()),
        }
    }

    /// Whether `node` is down (or unknown).
    fn node_down(&self, node: &str) -> bool {
        matches!(
            self.registry.status(node, Instant::now()),
            None | Some(NodeStatus::Down)
        )
    }

    /// Waits until `alloc` runs on `node` (and is not unhealthy), or fails: each
    /// look is decided by [`restore_progress`].
    async fn wait_running(&self, alloc: &str, node: &str) -> Result<(), String> {
        let deadline = Instant::now() + RESTORE_TIMEOUT;
        let checked = self.workloads.has_health_check(alloc);
        loop {
            let a = self
                .workloads
                .allocation(alloc)
                .map_err(|e| e.to_string())?;
            let seen = self.workloads.move_report(alloc);
            match restore_progress(&a, node, checked, seen, self.node_down(node)) {
                Progress::Running => return Ok(()),
                Progress::Failed(why) => return Err(why),
                Progress::Waiting => {}
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{alloc} did not run on {node} within {} s (last: {} {})",
                    RESTORE_TIMEOUT.as_secs(),
                    a.state,
                    a.message
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn open(
        &self,
        node: &str,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), MigrateError> {
        let conn = self
            .link
            .connection(node)
            .ok_or_else(|| MigrateError::Failed(format!("node {node} is not connected")))?;
        conn.open_bi()
            .await
            .map_err(|e| MigrateError::Failed(format!("cannot open a stream to {node}: {e}")))
    }

    async fn request_checkpoint(
        &self,
        node: &str,
        alloc: &str,
        mode: CheckpointMode,
        stop: bool,
    ) -> Result<BundleInfo, MigrateError> {
        let (mut send, mut recv) = self.open(node).await?;
        let request = BiRequest::Checkpoint(CheckpointRequest {
            protocol_version: self.link.protocol_version(node),
            alloc_id: alloc.to_string(),
            mode,
            stop,
            hold_ms: HOLD.as_millis() as u64,
        });
        let lost = |e: String| MigrateError::Failed(format!("link to {node}: {e}"));
        wire::write_frame(&mut send, &request)
            .await
            .map_err(|e| lost(e.to_string()))?;
        let _ = send.finish();
        let mut scratch = Vec::new();
        let reply = tokio::time::timeout(
            CHECKPOINT_TIMEOUT,
            wire::read_frame::<CheckpointReply, _>(&mut recv, &mut scratch),
        )
        .await
        .map_err(|_| {
            lost(format!(
                "no answer within {} s",
                CHECKPOINT_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| lost(e.to_string()))?
        .ok_or_else(|| lost("the stream ended without an answer".into()))?;
        let info = reply.result.map_err(MigrateError::Failed)?;
        if info.alloc != alloc || info.mode == CheckpointMode::Auto {
            return Err(MigrateError::Failed(format!(
                "node {node} answered with a bundle of {} in mode {}; expected {alloc} in live or fs",
                info.alloc, info.mode
            )));
        }
        Ok(info)
    }

    async fn release(
        &self,
        node: &str,
        alloc: &str,
        restore: Option<RestoreFrom>,
    ) -> Result<(), MigrateError> {
        let (mut send, mut recv) = self.open(node).await?;
        let lost = |e: String| MigrateError::Failed(format!("link to {node}: {e}"));
        wire::write_frame(
            &mut send,
            &BiRequest::Release(ReleaseRequest {
                protocol_version: self.link.protocol_version(node),
                alloc_id: alloc.to_string(),
                restore,
            }),
        )
        .await
        .map_err(|e| lost(e.to_string()))?;
        let _ = send.finish();
        let mut scratch = Vec::new();
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            wire::read_frame::<ReleaseReply, _>(&mut recv, &mut scratch),
        )
        .await
        .map_err(|_| lost("no answer within 10 s".into()))?
        .map_err(|e| lost(e.to_string()))?
        .ok_or_else(|| lost("the stream ended without an answer".into()))?;
        reply.result.map_err(MigrateError::Failed)
    }

    /// Moves bundle `info` from `node` into the store: resumes from the bytes the
    /// store has, retries a broken stream, and checks the digest at the end (a bad
    /// one is discarded and refused).
    async fn transfer(
        &self,
        node: &str,
        info: &BundleInfo,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<(), MigrateError> {
        let mut last = String::new();
        let mut retry = Retry::new(transfer::FETCH_BACKOFF);
        for attempt in 1..=transfer::FETCH_ATTEMPTS {
            let offset = match self.bundles.begin(info) {
                Ok(Have::Complete) => return Ok(()),
                Ok(Have::Partial(offset)) => offset,
                Err(e) => return Err(MigrateError::Failed(e.to_string())),
            };
            match self.fetch_once(node, info, offset, &mut progress).await {
                Ok(()) => {
                    return self
                        .bundles
                        .finish(info)
                        .await
                        .map_err(|e| MigrateError::Failed(e.to_string()));
                }
                Err(Fetch::Refused(why)) => return Err(MigrateError::Failed(why)),
                Err(Fetch::Broken(why)) => {
                    warn!(%node, digest = %info.digest, attempt, error = %why, "bundle transfer broke; resuming");
                    last = why;
                    tokio::time::sleep(retry.next_delay()).await;
                }
            }
        }
        Err(MigrateError::Failed(format!(
            "bundle {} could not be moved from {node} in {} attempts: {last}",
            info.digest,
            transfer::FETCH_ATTEMPTS
        )))
    }

    async fn fetch_once(
        &self,
        node: &str,
        info: &BundleInfo,
        offset: u64,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<(), Fetch> {
        let (mut send, mut recv) = self
            .open(node)
            .await
            .map_err(|e| Fetch::Broken(e.to_string()))?;
        wire::write_frame(
            &mut send,
            &BiRequest::Fetch(transfer::fetch_request(
                self.link.protocol_version(node),
                &info.digest,
                offset,
            )),
        )
        .await
        .map_err(|e| Fetch::Broken(e.to_string()))?;
        let _ = send.finish();
        let mut scratch = Vec::new();
        let reply = wire::read_frame::<wire::FetchReply, _>(&mut recv, &mut scratch)
            .await
            .map_err(|e| Fetch::Broken(e.to_string()))?
            .ok_or_else(|| Fetch::Broken("the stream ended before the answer".into()))?;
        let size = reply.result.map_err(Fetch::Refused)?;
        if size != info.size {
            return Err(Fetch::Refused(format!(
                "node {node} has bundle {} with {size} bytes; it announced {}",
                info.digest, info.size
            )));
        }
        let mut have = offset;
        let mut buf = vec![0u8; 256 * 1024];
        while have < size {
            let want = ((size - have) as usize).min(buf.len());
            let n = AsyncReadExt::read(&mut recv, &mut buf[..want])
                .await
                .map_err(|e| Fetch::Broken(format!("after {have} of {size} bytes: {e}")))?;
            if n == 0 {
                return Err(Fetch::Broken(format!(
                    "the stream ended after {have} of {size} bytes"
                )));
            }
            have = self
                .bundles
                .write_at(&info.digest, have, &buf[..n])
                .await
                .map_err(|e| Fetch::Refused(e.to_string()))?;
            progress(have, size);
        }
        Ok(())
    }

    /// Cordons `node` (nothing new is placed there) and returns its running
    /// allocations, the ones a drain migrates.
    pub fn cordon(&self, node: &str, by: &str) -> Result<Vec<String>, MigrateError> {
        self.registry
            .set_cordoned(node, true)
            .map_err(|e| MigrateError::NotFound(e.to_string()))?;
        let allocs: Vec<String> = self
            .workloads
            .allocations(None, Some(node))
            .into_iter()
            .filter(|a| a.desired_run && a.state == AllocState::Running)
            .map(|a| a.id)
            .collect();
        info!(%node, %by, allocations = allocs.len(), "node cordoned for a drain");
        Ok(allocs)
    }

    /// Migrates every running allocation off `node` (one after another), for
    /// spot notices. Returns the migrations started;
    /// allocations that cannot migrate are listed with why.
    pub async fn drain(
        self: &Arc<Self>,
        node: &str,
        by: &str,
    ) -> Result<(Vec<MigrationStatus>, Vec<(String, String)>), MigrateError> {
        let mut started = Vec::new();
        let mut refused = Vec::new();
        for id in self.cordon(node, by)? {
            match self.start_migration(&id, None, None, by) {
                Ok(s) => {
                    // One at a time: the next starts once this one ended.
                    let id = s.id.clone();
                    started.push(s);
                    while self
                        .status(&id)
                        .is_some_and(|s| s.finished_unix_ms.is_none())
                    {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                Err(e) => refused.push((id, e.to_string())),
            }
        }
        Ok((started, refused))
    }

    /// The background work: periodic checkpoints by job policy, and spot notices.
    pub async fn run(
        self: Arc<Self>,
        mut spot: mpsc::Receiver<SpotEvent>,
        cancel: CancellationToken,
    ) {
        let mut ticker = Ticker::new(
            Duration::from_secs(2),
            MissedTickBehavior::Burst,
            cancel.cancelled(),
        );
        loop {
            tokio::select! {
                ticked = ticker.tick() => {
                    if !ticked {
                        return;
                    }
                    self.periodic();
                }
                Some(notice) = spot.recv() => self.on_spot(notice),
            }
        }
    }

    fn on_spot(self: &Arc<Self>, notice: SpotEvent) {
        if !self.lock().spot.insert(notice.node.clone()) {
            return;
        }
        let left = notice
            .deadline_unix_ms
            .saturating_sub(unix_ms(SystemTime::now()));
        warn!(node = %notice.node, action = %notice.action, left_ms = left, "spot interruption: migrating the node's allocations away");
        self.record(
            NewEvent::new(
                kind::SPOT_NOTICE,
                CONTROLLER,
                format!(
                    "node {} will {} in {} s; migrating its allocations away",
                    notice.node,
                    notice.action,
                    left / 1000
                ),
            )
            .node(&notice.node)
            .detail("deadline_unix_ms", notice.deadline_unix_ms),
        );
        let me = self.clone();
        tokio::spawn(async move {
            match me.drain(&notice.node, CONTROLLER).await {
                Ok((started, refused)) => {
                    info!(node = %notice.node, migrated = started.len(), refused = refused.len(), "spot drain done");
                    // What found no room yet moves as soon as room appears (the
                    // node's pool replaces it at the notice), until the deadline.
                    let mut left: Vec<String> = refused.into_iter().map(|(id, _)| id).collect();
                    while !left.is_empty() && unix_ms(SystemTime::now()) < notice.deadline_unix_ms {
                        tokio::time::sleep(SPOT_RETRY).await;
                        // Only what still runs there, wanted, is tried again.
                        let there: BTreeSet<String> = me
                            .workloads
                            .allocations(None, Some(&notice.node))
                            .into_iter()
                            .filter(|a| a.desired_run && a.state == AllocState::Running)
                            .map(|a| a.id)
                            .collect();
                        let mut still = Vec::new();
                        for id in left.into_iter().filter(|id| there.contains(id)) {
                            match me.start_migration(&id, None, None, CONTROLLER) {
                                Ok(s) => {
                                    while me
                                        .status(&s.id)
                                        .is_some_and(|s| s.finished_unix_ms.is_none())
                                    {
                                        tokio::time::sleep(Duration::from_millis(100)).await;
                                    }
                                }
                                Err(_) => still.push(id),
                            }
                        }
                        left = still;
                    }
                    if !left.is_empty() {
                        warn!(node = %notice.node, left = left.len(), "spot deadline passed with allocations that found no room");
                    }
                }
                Err(e) => warn!(node = %notice.node, error = %e, "spot drain failed"),
            }
            // A later notice (the node came back and is interrupted again) drains
            // it again.
            me.lock().spot.remove(&notice.node);
        });
    }

    /// Starts the checkpoints that are due by their job's interval.
    fn periodic(self: &Arc<Self>) {
        let now = unix_ms(SystemTime::now());
        let settle = self.started.elapsed() >= vm::SETTLE_AFTER_START;
        for a in self.workloads.allocations(None, None) {
            if settle {
                self.settle_interrupted_vm_move(&a);
            }
            if a.state != AllocState::Running || !a.desired_run {
                continue;
            }
            let Ok(Some(policy)) = self.workloads.checkpoint_policy(&a.id) else {
                continue;
            };
            let Some(interval) = policy.interval else {
                continue;
            };
            let last = self
                .bundles
                .latest(&a.id)
                .map_or(a.healthy_since_unix_ms.unwrap_or(a.created_unix_ms), |b| {
                    b.created_unix_ms
                });
            if !checkpoint_due(now, last, interval) || self.lock().busy.contains(&a.id) {
                continue;
            }
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.checkpoint(&a.id, None, CONTROLLER).await {
                    warn!(alloc = %a.id, error = %e, "periodic checkpoint failed");
                }
            });
        }
    }
}

/// Whether the migration `status` is followed by a checkpoint of the moved
/// allocation ([`Migrations::checkpoint_after_move`]): it completed by streaming
/// (a live runc or VM migration, whose state never reached the store) and its
/// job has a checkpoint policy (`has_policy`). A bundle migration stored its
/// bundle already, and a job without a policy never asked for checkpoints or
/// their pauses. Pure.
pub fn checkpoint_after(status: &MigrationStatus, has_policy: bool) -> bool {
    status.phase == Phase::Completed && status.vm.is_some() && has_policy
}

/// Whether a periodic checkpoint is due: `interval` has passed since `last`.
pub fn checkpoint_due(now_ms: u64, last_ms: u64, interval: Duration) -> bool {
    now_ms.saturating_sub(last_ms) >= interval.as_millis() as u64
}

/// One step of a migration's switch-over or rollback.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// Move the allocation to `node`, to start there from `restore`.
    Relocate {
        /// Where to.
        node: String,
        /// The checkpoint it starts from.
        restore: RestoreFrom,
        /// Why, for people (the allocation's message).
        why: String,
    },
    /// Tell `node` to let go of its hold on the allocation: remove its stopped
    /// container, or restore it there from `restore` when set.
    Release {
        /// The node holding it.
        node: String,
        /// The checkpoint to restore locally, if any.
        restore: Option<RestoreFrom>,
    },
    /// Wait for the allocation to run on `node` ([`restore_progress`]).
    AwaitRunning {
        /// The node.
        node: String,
    },
    /// Forget the checkpoint it started from and that it is moving.
    ClearRestore,
}

/// Why a virtual machine with the GPUs `gpu_uuids` cannot `to` (be
/// checkpointed, migrate): QEMU cannot save the state of a device passed
/// through, so a guest with one neither snapshots nor moves live.
pub fn passthrough_problem(gpu_uuids: &[String], to: &str) -> Option<String> {
    (!gpu_uuids.is_empty()).then(|| {
        format!(
            "is a virtual machine with passthrough GPUs ({}): QEMU cannot save a passed-through device's state, so it cannot {to}; stop it and start it elsewhere instead",
            gpu_uuids.join(", ")
        )
    })
}

/// How a live migration between two runc nodes moves memory (pure): the
/// copy mode asked for when both ends can run it, else post-copy when both
/// support lazy pages, else stop-copy. Pre-copy rounds (CRIU's `pre-dump`
/// with dirty-memory tracking) are not offered yet, so a node's
/// `dirty_tracking` does not change the choice ([`precopy`] decides the
/// rounds, for an executor still to come).
pub fn plan_copy(
    asked: Option<CopyMode>,
    source: Option<&OciCapability>,
    target: Option<&OciCapability>,
) -> Result<CopyMode, String> {
    let lazy = |c: Option<&OciCapability>| c.is_some_and(|c| c.lazy_pages);
    match asked {
        Some(CopyMode::StopCopy) => Ok(CopyMode::StopCopy),
        Some(CopyMode::PostCopy) => match (lazy(source), lazy(target)) {
            (true, true) => Ok(CopyMode::PostCopy),
            (false, _) => Err("post-copy needs lazy pages (userfaultfd) on the source, which it does not report; use --mode stop-copy".to_owned()),
            (true, false) => Err("post-copy needs lazy pages (userfaultfd) on the target, which it does not report; use --mode stop-copy".to_owned()),
        },
        None if lazy(source) && lazy(target) => Ok(CopyMode::PostCopy),
        None => Ok(CopyMode::StopCopy),
    }
}

/// The switch-over once the allocation runs on its target: the source removes
/// its stopped container, and the restore mark goes.
fn switch_over_plan(from: &str) -> Vec<Step> {
    vec![
        Step::Release {
            node: from.to_string(),
            restore: None,
        },
        Step::ClearRestore,
    ]
}

/// The rollback of a migration that failed for `reason`: with a bundle, the
/// allocation returns to its source `from` and restores it there (the source
/// holds it in its cache), and the migration waits for it to run; without one,
/// the source just lets go of its hold and goes on.
fn rollback_plan(from: &str, reason: &str, bundle: Option<&BundleInfo>) -> Vec<Step> {
    let mut steps = Vec::new();
    if let Some(info) = bundle {
        steps.push(Step::Relocate {
            node: from.to_string(),
            restore: restore_of(info),
            why: format!("migration rolled back: {reason}"),
        });
    }
    steps.push(Step::Release {
        node: from.to_string(),
        restore: bundle.map(restore_of),
    });
    if bundle.is_some() {
        steps.push(Step::AwaitRunning {
            node: from.to_string(),
        });
    }
    steps.push(Step::ClearRestore);
    steps
}

/// Logs a step whose failure does not change the migration's outcome.
fn log_step_failure(alloc: &str, step: &Step, error: &str) {
    match step {
        Step::Release { node, .. } => {
            warn!(%alloc, %node, %error, "cannot release the source's hold; it expires by itself")
        }
        Step::ClearRestore => warn!(%alloc, %error, "cannot clear the restore mark"),
        Step::Relocate { node, .. } => warn!(%alloc, %node, %error, "cannot relocate"),
        Step::AwaitRunning { node } => warn!(%alloc, %node, %error, "did not run"),
    }
}

/// Where a moving allocation stands, as a migration waiting for it sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Progress {
    /// It runs on the node (and passes its check, when it has one).
    Running,
    /// Not yet.
    Waiting,
    /// It will not run there without help: roll back (why, for people).
    Failed(String),
}

/// Decides whether `a`, moving to `node`, runs there, is still on its way, or
/// failed, from typed fields only: its state and health, and what its new node
/// reported since the move (`seen`, [`Workloads::move_report`]). Messages only
/// go into the explanation.
fn restore_progress(
    a: &AllocRecord,
    node: &str,
    checked: bool,
    seen: Option<MoveReport>,
    node_down: bool,
) -> Progress {
    let alloc = &a.id;
    if a.node != node {
        return Progress::Failed(format!("allocation {alloc} moved to {} meanwhile", a.node));
    }
    // A migrating allocation is not marked lost with its node (the source
    // still holds it): the node's loss fails the move here.
    if node_down {
        return Progress::Failed(format!("node {node} is down"));
    }
    let seen = seen.unwrap_or_default();
    match a.state {
        AllocState::Running if a.healthy == Some(true) || !checked => Progress::Running,
        // The restore ended there for good; the record holds it as migrating
        // for the migration to roll back.
        AllocState::Migrating if seen.ended.is_some() => {
            Progress::Failed(format!("{alloc} on {node}: {}", a.message))
        }
        AllocState::Failed | AllocState::Lost | AllocState::Stopped => {
            Progress::Failed(format!("{alloc} is {} on {node}: {}", a.state, a.message))
        }
        // A start that failed is retried by the agent; the first failure is
        // enough to roll back.
        AllocState::Starting | AllocState::Pending if seen.start_failed() => {
            Progress::Failed(format!("{alloc} on {node}: {}", a.message))
        }
        _ => Progress::Waiting,
    }
}

fn restore_of(info: &BundleInfo) -> RestoreFrom {
    RestoreFrom {
        digest: info.digest.clone(),
        size: info.size,
        mode: info.mode,
        incoming_vm: None,
    }
}

enum Fetch {
    Refused(String),
    Broken(String),
}

/// Ends an allocation's busy mark when the operation ends (owned, so a spawned
/// migration carries it).
struct Busy {
    state: Arc<Mutex<State>>,
    released: Arc<tokio::sync::Notify>,
    alloc: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        lock(&self.state).busy.remove(&self.alloc);
        self.released.notify_waiters();
    }
}

/// Serves the bi-streams an agent opens to the controller (bundle fetches for
/// restores) until the connection closes.
pub async fn serve_agent_streams(
    conn: quinn::Connection,
    bundles: Arc<BundleStore>,
    images: Option<Arc<crate::services::images::Images>>,
    node: String,
) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let bundles = bundles.clone();
        let images = images.clone();
        let node = node.clone();
        tokio::spawn(async move {
            let mut scratch = Vec::new();
            let request = tokio::time::timeout(
                Duration::from_secs(5),
                wire::read_frame::<BiRequest, _>(&mut recv, &mut scratch),
            )
            .await;
            match request {
                Ok(Ok(Some(BiRequest::Fetch(r)))) => {
                    match transfer::serve_fetch(&r, |d| bundles.path(d).ok(), &mut send).await {
                        Ok(n) => {
                            info!(%node, digest = %r.digest, offset = r.offset, bytes = n, "bundle sent to node");
                            let _ = send.finish();
                        }
                        Err(e) => {
                            warn!(%node, digest = %r.digest, error = %e, "bundle send failed")
                        }
                    }
                }
                Ok(Ok(Some(BiRequest::Registry(r)))) if images.is_some() => {
                    let images = images.expect("checked");
                    match crate::services::images::serve_registry(images, &r, &mut send).await {
                        Ok(n) => {
                            debug!(%node, path = %r.path, head = r.head, bytes = n, "image store read");
                            let _ = send.finish();
                        }
                        Err(e) => {
                            warn!(%node, path = %r.path, error = %e, "image store read failed")
                        }
                    }
                }
                Ok(Ok(Some(_))) => {
                    warn!(%node, "agent opened a stream other than a fetch; resetting it");
                    let _ = send.reset(wire::CloseCode::Unexpected.code().into());
                }
                _ => {
                    let _ = send.reset(wire::CloseCode::Malformed.code().into());
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    fn oci(lazy: bool, dirty: bool) -> OciCapability {
        OciCapability {
            runc_version: "1.1.5".to_owned(),
            criu_version: "4.2.1".to_owned(),
            lazy_pages: lazy,
            dirty_tracking: dirty,
        }
    }

    #[test]
    fn a_guest_with_passthrough_gpus_neither_snapshots_nor_moves() {
        assert_eq!(passthrough_problem(&[], "migrate"), None);
        let why =
            passthrough_problem(&["VFIO-0000:65:00.0".to_owned()], "migrate").expect("refused");
        assert!(
            why.contains("VFIO-0000:65:00.0") && why.contains("cannot migrate"),
            "{why}"
        );
    }

    #[test]
    fn post_copy_is_the_default_only_where_both_ends_have_lazy_pages() {
        let (yes, no) = (oci(true, false), oci(false, true));
        assert_eq!(
            plan_copy(None, Some(&yes), Some(&yes)),
            Ok(CopyMode::PostCopy)
        );
        assert_eq!(
            plan_copy(None, Some(&yes), Some(&no)),
            Ok(CopyMode::StopCopy)
        );
        assert_eq!(
            plan_copy(None, Some(&no), Some(&yes)),
            Ok(CopyMode::StopCopy)
        );
        assert_eq!(plan_copy(None, None, Some(&yes)), Ok(CopyMode::StopCopy));
        // Dirty tracking alone chooses nothing (pre-copy is not offered).
        assert_eq!(
            plan_copy(None, Some(&oci(false, true)), Some(&oci(false, true))),
            Ok(CopyMode::StopCopy)
        );
    }

    #[test]
    fn an_asked_copy_mode_is_kept_or_refused_with_the_end_that_lacks_it() {
        let (yes, no) = (oci(true, false), oci(false, false));
        assert_eq!(
            plan_copy(Some(CopyMode::StopCopy), Some(&yes), Some(&yes)),
            Ok(CopyMode::StopCopy)
        );
        assert_eq!(
            plan_copy(Some(CopyMode::PostCopy), Some(&yes), Some(&yes)),
            Ok(CopyMode::PostCopy)
        );
        let e = plan_copy(Some(CopyMode::PostCopy), Some(&yes), Some(&no))
            .expect_err("the target lacks lazy pages");
        assert!(e.contains("on the target"), "{e}");
        let e = plan_copy(Some(CopyMode::PostCopy), Some(&no), Some(&yes))
            .expect_err("the source lacks lazy pages");
        assert!(e.contains("on the source"), "{e}");
    }

    use super::*;

    #[test]
    fn only_a_completed_streamed_move_of_a_job_with_a_policy_is_checkpointed_after() {
        let status = |phase: Phase, streamed: bool| MigrationStatus {
            id: "m-1".into(),
            alloc: "a-1".into(),
            job: "j".into(),
            from: "n1".into(),
            to: "n2".into(),
            mode: CheckpointMode::Live,
            phase,
            bytes_done: 0,
            bytes_total: 0,
            digest: None,
            started_unix_ms: 0,
            finished_unix_ms: None,
            downtime_ms: None,
            error: None,
            vm: streamed.then(VmMigrationProgress::default),
            copy: None,
        };
        assert!(checkpoint_after(&status(Phase::Completed, true), true));
        // No policy: the job never asked for checkpoints (nor their pauses).
        assert!(!checkpoint_after(&status(Phase::Completed, true), false));
        // A bundle migration stored its bundle on the way.
        assert!(!checkpoint_after(&status(Phase::Completed, false), true));
        // Rolled back: the source's checkpoints stand.
        assert!(!checkpoint_after(&status(Phase::RolledBack, true), true));
    }

    #[test]
    fn checkpoints_fall_due_after_their_interval() {
        let i = Duration::from_secs(60);
        assert!(!checkpoint_due(100_000, 50_000, i));
        assert!(checkpoint_due(110_000, 50_000, i));
        // A clock that went back never makes one due early.
        assert!(!checkpoint_due(10_000, 50_000, i));
    }

    fn moving(state: AllocState, message: &str) -> AllocRecord {
        AllocRecord {
            message: message.into(),
            ..crate::workloads::test_alloc("api-a", "b", state)
        }
    }

    #[test]
    fn a_vm_move_a_restart_interrupted_goes_on_if_it_runs_else_back() {
        use super::vm::{Settle, settle};
        let mut a = moving(AllocState::Pending, "migrating live from a");
        // Not a VM arriving live: nothing to settle.
        assert_eq!(settle(&a, false), None);
        a.restore = Some(RestoreFrom::incoming_vm("m-3", "a"));
        let back = Some(Settle::Back { source: "a".into() });
        assert_eq!(settle(&a, false), back);
        // A migration of this controller owns it: left alone.
        assert_eq!(settle(&a, true), None);
        // The target reported it running: kept there.
        a.state = AllocState::Running;
        assert_eq!(
            settle(&a, false),
            Some(Settle::Forward { source: "a".into() })
        );
        // Still starting on the target, or failed there: back.
        a.state = AllocState::Starting;
        assert_eq!(settle(&a, false), back);
        // No longer wanted: nothing to do.
        a.desired_run = false;
        assert_eq!(settle(&a, false), None);
    }

    fn seen(first_restarts: u32, restarts: u32) -> Option<MoveReport> {
        Some(MoveReport {
            first_restarts: Some(first_restarts),
            restarts,
            ..MoveReport::default()
        })
    }

    fn failed(p: Progress) -> String {
        match p {
            Progress::Failed(why) => why,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    /// Was: `AllocState::Migrating` with a message starting "restore failed".
    #[test]
    fn a_restore_that_ended_on_the_target_rolls_back() {
        let a = moving(AllocState::Migrating, "restore failed: criu said no");
        let ended = MoveReport {
            ended: Some(AllocState::Failed),
            ..seen(0, 0).unwrap_or_default()
        };
        let why = failed(restore_progress(&a, "b", false, Some(ended), false));
        assert_eq!(why, "api-a on b: restore failed: criu said no");
        // The state alone, without the typed report, is not taken for a failure;
        // nor is the message.
        assert_eq!(
            restore_progress(&a, "b", false, seen(0, 0), false),
            Progress::Waiting
        );
    }

    /// Was: `Starting` with a message starting "could not start": the agent
    /// retries a failed start, counting a restart.
    #[test]
    fn a_start_that_failed_on_the_target_rolls_back() {
        let a = moving(AllocState::Starting, "restarting (restart 1)");
        assert!(
            failed(restore_progress(&a, "b", false, seen(0, 1), false)).starts_with("api-a on b:")
        );
        // A checkpoint that could not be restored fails at once.
        let unrestorable = MoveReport {
            restore_failed: true,
            ..seen(0, 0).unwrap_or_default()
        };
        let a = moving(
            AllocState::Starting,
            "could not restore its checkpoint: bad bundle; restarting in 1s",
        );
        failed(restore_progress(&a, "b", false, Some(unrestorable), false));
    }

    /// Was: a message starting "could not start" or "restarting": the words do
    /// not decide any more, the typed fields do.
    #[test]
    fn messages_alone_decide_nothing() {
        for message in ["could not start: no such image", "restarting (restart 3)"] {
            let a = moving(AllocState::Starting, message);
            assert_eq!(
                restore_progress(&a, "b", false, seen(0, 0), false),
                Progress::Waiting
            );
            assert_eq!(
                restore_progress(&a, "b", false, None, false),
                Progress::Waiting
            );
        }
    }

    /// A rollback to the source: its agent counts on from its earlier runs, so
    /// restarts from before the move are not a failed start.
    #[test]
    fn earlier_restarts_on_the_node_are_not_a_failed_start() {
        let mut a = moving(AllocState::Starting, "restoring checkpoint");
        a.restarts = 4;
        assert_eq!(
            restore_progress(&a, "b", false, seen(4, 4), false),
            Progress::Waiting
        );
        failed(restore_progress(&a, "b", false, seen(4, 5), false));
    }

    #[test]
    fn the_move_completes_once_it_runs_and_passes_its_check() {
        let mut a = moving(AllocState::Running, "started");
        assert_eq!(
            restore_progress(&a, "b", false, seen(0, 0), false),
            Progress::Running
        );
        assert_eq!(
            restore_progress(&a, "b", true, seen(0, 0), false),
            Progress::Waiting
        );
        a.healthy = Some(true);
        assert_eq!(
            restore_progress(&a, "b", true, seen(0, 0), false),
            Progress::Running
        );
        for state in [AllocState::Failed, AllocState::Lost, AllocState::Stopped] {
            failed(restore_progress(
                &moving(state, ""),
                "b",
                false,
                None,
                false,
            ));
        }
        let why = failed(restore_progress(&a, "c", false, None, false));
        assert_eq!(why, "allocation api-a moved to b meanwhile");
    }

    /// A migrating allocation is not marked lost when its target goes down
    /// (the source still holds it): the target's loss fails the move, which
    /// rolls back, whatever the target last reported.
    #[test]
    fn a_target_that_goes_down_fails_the_move() {
        for state in [
            AllocState::Pending,
            AllocState::Starting,
            AllocState::Running,
        ] {
            let why = failed(restore_progress(&moving(state, ""), "b", false, None, true));
            assert_eq!(why, "node b is down");
        }
    }

    fn bundle() -> BundleInfo {
        BundleInfo {
            digest: "d".repeat(64),
            size: 10,
            mode: CheckpointMode::Fs,
            alloc: "api-a".into(),
            job: "api".into(),
            node: "a".into(),
            created_unix_ms: 1,
            dump_ms: 1,
        }
    }

    #[test]
    fn a_rollback_with_a_bundle_restores_it_on_the_source_and_waits() {
        let info = bundle();
        let restore = restore_of(&info);
        assert_eq!(
            rollback_plan("a", "restore on b failed", Some(&info)),
            [
                Step::Relocate {
                    node: "a".into(),
                    restore: restore.clone(),
                    why: "migration rolled back: restore on b failed".into(),
                },
                Step::Release {
                    node: "a".into(),
                    restore: Some(restore),
                },
                Step::AwaitRunning { node: "a".into() },
                Step::ClearRestore,
            ]
        );
    }

    #[test]
    fn a_rollback_without_a_bundle_only_releases_the_source() {
        assert_eq!(
            rollback_plan("a", "checkpoint failed", None),
            [
                Step::Release {
                    node: "a".into(),
                    restore: None,
                },
                Step::ClearRestore,
            ]
        );
        assert_eq!(
            switch_over_plan("a"),
            [
                Step::Release {
                    node: "a".into(),
                    restore: None,
                },
                Step::ClearRestore,
            ]
        );
    }
}

//! Live migration of a virtual machine, the controller's side: QEMU's own
//! pre-copy, its stream relayed from the source agent to the target agent over
//! their links (never stored), see [`VmMigrateRequest`].
//!
//! 1. The source holds the allocation and finds its VM (`Ready`).
//! 2. The allocation moves to the target with [`RestoreFrom::incoming_vm`]: the
//!    target starts a QEMU that waits for the state, and says `Ready` on its
//!    stream.
//! 3. `Go`: the source's QEMU copies memory while the guest runs, then pauses it
//!    for the last copy; the controller writes each piece into the target's
//!    stream as it comes and follows QEMU's progress.
//! 4. The target's QEMU loads the state and the guest runs there; once it passes
//!    its check, `Commit` leaves the source paused and the release removes it.
//!
//! A failure at any step rolls back: the allocation returns to the source, whose
//! agent cancels the migration and resumes the guest (`Abort`, or the stream's
//! end), and the target's half-started VM goes with the move.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use novacron_common::checkpoint::CheckpointMode;
use novacron_common::clock::unix_ms;
use novacron_common::wire::{
    self, BiRequest, PagesRequest, RestoreFrom, VM_MIGRATE_SINCE, VmCapability, VmControl,
    VmMigrateRequest, VmMigrationProgress, VmNetwork, VmReceiveEvent, VmReceiveRequest,
    VmSendEvent, VmSendRequest,
};
use tracing::{info, warn};

use super::{CopyMode, HOLD, MigrateError, Migrations, Phase};
use crate::services::events::{NewEvent, kind};
use crate::state::store::AllocRecord;
pub use novacron_api::MigrationStatus;
use novacron_common::wire::AllocState;

/// The longest pause QEMU may plan for the last copy, unless the request
/// says otherwise (between [`MIN_DOWNTIME_LIMIT`] and [`MAX_DOWNTIME_LIMIT`]).
pub const DOWNTIME_LIMIT: Duration = Duration::from_millis(300);
/// The shortest downtime limit a request may ask for.
pub const MIN_DOWNTIME_LIMIT: Duration = Duration::from_millis(10);
/// The longest downtime limit a request may ask for.
pub const MAX_DOWNTIME_LIMIT: Duration = Duration::from_secs(60);
/// How long a guest may run while its memory is copied before it is paused
/// so that the copy ends (a busy guest under TCG on shared cores may never
/// converge otherwise).
pub const CONVERGE_WITHIN: Duration = Duration::from_secs(90);
/// How long the whole transfer may take before it is given up.
pub const TRANSFER_LIMIT: Duration = Duration::from_secs(300);
/// How long the target may take to pull the image and start its QEMU.
const PREPARE_LIMIT: Duration = Duration::from_secs(300);
/// The longest silence on the source's stream (it reports every 100 ms).
const SILENCE: Duration = Duration::from_secs(30);
/// How long each end of a page channel waits for its side to be ready.
const PAGES_WAIT: Duration = Duration::from_secs(60);

/// How long after it starts the controller waits before it settles VM
/// migrations that a restart interrupted (nodes reconnect and report first).
pub const SETTLE_AFTER_START: Duration = Duration::from_secs(20);

/// How a VM migration that no running migration owns (the controller
/// restarted in the middle) is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Settle {
    /// The guest runs on the target: keep it there; the source, paused and
    /// held since the copy ended, is released (and removes its VM).
    Forward {
        /// The source node.
        source: String,
    },
    /// Not running on the target: back to the source, which resumes the
    /// guest it kept.
    Back {
        /// The source node.
        source: String,
    },
}

/// Decides how to settle allocation `a` if it is a VM arriving live that no
/// migration of this controller owns (`owned`). Pure.
pub(super) fn settle(a: &AllocRecord, owned: bool) -> Option<Settle> {
    let source = a.restore.as_ref()?.incoming_vm.clone()?;
    if owned || !a.desired_run || a.state.is_terminal() {
        return None;
    }
    Some(if a.state == AllocState::Running {
        Settle::Forward { source }
    } else {
        Settle::Back { source }
    })
}

/// Where a failed VM migration had got to: what its rollback must undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reached {
    /// Nothing yet: the source was not held.
    Nothing,
    /// The source holds the allocation.
    Held,
    /// The allocation was moved to the target.
    Relocated,
}

impl Migrations {
    /// Settles `a` if it is a VM migration that a restart interrupted (see
    /// [`settle`]), on a task of its own.
    pub(super) fn settle_interrupted_vm_move(self: &Arc<Self>, a: &AllocRecord) {
        let owned = self.lock().busy.contains(&a.id);
        let Some(decision) = settle(a, owned) else {
            return;
        };
        let Ok(busy) = self.claim(&a.id) else {
            return;
        };
        let me = self.clone();
        let a = a.clone();
        tokio::spawn(async move {
            let _busy = busy;
            me.settle_vm_move(&a, decision).await;
        });
    }

    async fn settle_vm_move(&self, a: &AllocRecord, decision: Settle) {
        let alloc = &a.id;
        let (kind, text, source) = match &decision {
            Settle::Forward { source } => {
                info!(%alloc, %source, to = %a.node, "a restart interrupted this vm migration after the guest ran on its target: keeping it there");
                if let Err(e) = self.workloads.clear_restore(alloc) {
                    warn!(%alloc, error = %e, "cannot clear the restore mark");
                }
                (
                    kind::MIGRATION_COMPLETED,
                    format!(
                        "virtual machine {alloc} runs on {} (from {source}); its migration was interrupted by a controller restart and is kept",
                        a.node
                    ),
                    source,
                )
            }
            Settle::Back { source } => {
                info!(%alloc, %source, to = %a.node, "a restart interrupted this vm migration before the guest ran on its target: back to the source");
                let why = format!(
                    "migration to {} interrupted by a controller restart: back to {source}",
                    a.node
                );
                if let Err(e) = self.workloads.relocate(alloc, source, None, &why) {
                    warn!(%alloc, error = %e, "cannot move it back");
                }
                if let Err(e) = self.workloads.clear_restore(alloc) {
                    warn!(%alloc, error = %e, "cannot clear the restore mark");
                }
                (kind::MIGRATION_ROLLED_BACK, why, source)
            }
        };
        // Forward: the source removes its paused VM; back: it resumes it.
        if let Err(e) = self.release(source, alloc, None).await {
            warn!(%alloc, %source, error = %e, "cannot release the source's hold; it expires by itself");
        }
        self.record(
            NewEvent::new(kind, crate::services::events::CONTROLLER, text)
                .node(&a.node)
                .job(&a.job)
                .alloc(alloc),
        );
    }

    /// Starts the live migration of a VM allocation (`start_migration` for a VM).
    pub(super) fn start_vm_migration(
        self: &Arc<Self>,
        record: AllocRecord,
        to: Option<&str>,
        mode: Option<CheckpointMode>,
        max_downtime: Option<Duration>,
        by: &str,
    ) -> Result<MigrationStatus, MigrateError> {
        let alloc = record.id.clone();
        let limit = max_downtime.unwrap_or(DOWNTIME_LIMIT);
        if !(MIN_DOWNTIME_LIMIT..=MAX_DOWNTIME_LIMIT).contains(&limit) {
            return Err(MigrateError::Invalid(format!(
                "a downtime limit of {} ms is out of range; expected {} to {} ms",
                limit.as_millis(),
                MIN_DOWNTIME_LIMIT.as_millis(),
                MAX_DOWNTIME_LIMIT.as_millis()
            )));
        }
        if mode == Some(CheckpointMode::Fs) {
            return Err(MigrateError::Invalid(format!(
                "allocation {alloc} is a virtual machine: it migrates live (QEMU's pre-copy); --mode fs does not apply"
            )));
        }
        let vm_of = |node: &str| {
            self.registry
                .view(node, Instant::now())
                .and_then(|v| v.capabilities.vm)
        };
        let accel = |node: &str| vm_of(node).map(|c| c.accelerator);
        let source = accel(&record.node).ok_or_else(|| {
            MigrateError::Invalid(format!(
                "node {} reports no virtual machine support",
                record.node
            ))
        })?;
        let bridged = self.workloads.vm_network(&alloc) == Some(VmNetwork::Bridge);
        let source_range = vm_of(&record.node).and_then(|c| c.bridge);
        let target = self
            .workloads
            .migration_target(&alloc, to, |n| {
                if self.link.protocol_version(n) < VM_MIGRATE_SINCE {
                    return Err(format!(
                        "speaks protocol {}; migrating a VM needs {VM_MIGRATE_SINCE}",
                        self.link.protocol_version(n)
                    ));
                }
                match vm_of(n) {
                    // A bridged guest keeps the address its kernel was given:
                    // only a node with the same range can hold it.
                    Some(c) if bridged && c.bridge != source_range => Err(match &c.bridge {
                        None => "has no VM bridge, and the guest is on the bridge network".to_owned(),
                        Some(r) => format!(
                            "has the VM bridge range {r} and the source {}; a guest on the bridge network keeps its address, so it migrates only between nodes of the same range",
                            source_range.as_deref().unwrap_or("none")
                        ),
                    }),
                    Some(c) if c.accelerator == source => Ok(()),
                    // A node that has booted no VM yet assumes kvm until its
                    // first probe: the incoming VM's boot decides, and a
                    // choice other than the source's fails the move (rolled back).
                    Some(c) if !c.probed => Ok(()),
                    Some(VmCapability { accelerator: a, .. }) => Err(format!(
                        "runs virtual machines under {a} and the source under {source}; a guest migrates only between nodes of the same accelerator"
                    )),
                    None => Err("runs no virtual machines".to_owned()),
                }
            })
            .map_err(|e| MigrateError::Invalid(e.to_string()))?;
        let busy = self.claim(&alloc)?;
        let planned = VmMigrationProgress {
            status: "none".to_owned(),
            downtime_limit_ms: limit.as_millis() as u64,
            ..Default::default()
        };
        Ok(self.launch(
            busy,
            &record,
            target,
            CheckpointMode::Live,
            by,
            Some(planned),
            None,
        ))
    }

    /// Runs VM migration `id` (see the module's steps).
    pub(super) async fn run_vm_migration(&self, id: &str, by: &str) {
        let Some(status) = self.status(id) else {
            return;
        };
        let (alloc, from, to) = (status.alloc.clone(), status.from.clone(), status.to.clone());
        let limit = status
            .vm
            .as_ref()
            .map_or(DOWNTIME_LIMIT.as_millis() as u64, |v| v.downtime_limit_ms);
        let mut reached = Reached::Nothing;
        let mut source = None;
        let result = self
            .vm_migrate(&status, limit, &mut reached, &mut source)
            .await;
        match result {
            Ok(done) => {
                if let Some((send, _)) = source.as_mut() {
                    let _ = wire::write_frame(send, &VmControl::Commit).await;
                    let _ = send.finish();
                }
                for step in super::switch_over_plan(&from) {
                    if let Err(e) = self.run_step(&alloc, &step).await {
                        super::log_step_failure(&alloc, &step, &e);
                    }
                }
                let now = unix_ms(SystemTime::now());
                let downtime = done.downtime_ms.unwrap_or(0);
                self.update(id, |s| {
                    s.phase = Phase::Completed;
                    s.finished_unix_ms = Some(now);
                    s.downtime_ms = done.downtime_ms;
                    s.bytes_done = done.transferred;
                    s.bytes_total = done.total;
                    s.vm = Some(done.clone());
                });
                info!(%alloc, %from, %to, downtime_ms = downtime, rounds = done.rounds, "live stream migration completed");
                let text = if self.workloads.is_vm(&alloc) {
                    format!(
                        "{id}: virtual machine {alloc} runs on {to} (from {from}, live: {} MiB in {} rounds over {} ms, guest paused {downtime} ms{})",
                        done.transferred >> 20,
                        done.rounds,
                        done.elapsed_ms,
                        if done.forced_pause {
                            ", paused early because it did not converge"
                        } else {
                            ""
                        }
                    )
                } else {
                    format!(
                        "{id}: {alloc} runs on {to} (from {from}, live under runc, {}: dumped in {downtime} ms, {} MiB sent over {} ms)",
                        status.copy.unwrap_or(CopyMode::StopCopy),
                        done.transferred >> 20,
                        done.elapsed_ms,
                    )
                };
                self.record(
                    NewEvent::new(kind::MIGRATION_COMPLETED, by, text)
                        .node(&to)
                        .job(&status.job)
                        .alloc(&alloc)
                        .detail("migration", id)
                        .detail("downtime_ms", downtime)
                        .detail("rounds", done.rounds),
                );
            }
            Err(reason) => {
                self.vm_fail(id, by, &reason, reached, source).await;
            }
        }
    }

    /// Steps 1 to 4; the source's stream is left in `source` for the end.
    async fn vm_migrate(
        &self,
        status: &MigrationStatus,
        downtime_limit_ms: u64,
        reached: &mut Reached,
        source: &mut Option<(quinn::SendStream, quinn::RecvStream)>,
    ) -> Result<VmMigrationProgress, String> {
        let (id, alloc, from, to) = (
            status.id.as_str(),
            status.alloc.as_str(),
            status.from.as_str(),
            status.to.as_str(),
        );
        let text = |e: MigrateError| e.to_string();
        // 1. The source holds the allocation.
        let (mut s_send, mut s_recv) = self.open(from).await.map_err(text)?;
        let post_copy = status.copy == Some(CopyMode::PostCopy);
        let asked = VmSendRequest {
            protocol_version: self.link.protocol_version(from),
            alloc_id: alloc.to_owned(),
            with_disk: true,
            hold_ms: HOLD.as_millis() as u64,
            downtime_limit_ms,
            converge_ms: CONVERGE_WITHIN.as_millis() as u64,
            limit_ms: TRANSFER_LIMIT.as_millis() as u64,
        };
        let request = BiRequest::VmMigrate(if post_copy {
            VmMigrateRequest::PostCopy(asked)
        } else {
            VmMigrateRequest::Send(asked)
        });
        wire::write_frame(&mut s_send, &request)
            .await
            .map_err(|e| format!("link to {from}: {e}"))?;
        let mut s_scratch = Vec::new();
        let first = read_within::<VmSendEvent>(&mut s_recv, &mut s_scratch, SILENCE, from).await;
        *source = Some((s_send, s_recv));
        match first? {
            VmSendEvent::Ready => *reached = Reached::Held,
            VmSendEvent::Failed(why) => return Err(format!("source {from}: {why}")),
            other => return Err(format!("source {from} answered {other:?} instead of Ready")),
        }
        // 2. The target starts a QEMU that waits for the state.
        self.workloads
            .relocate(
                alloc,
                to,
                Some(RestoreFrom::incoming_vm(id, from)),
                &format!("migrating live from {from}: waiting for its state"),
            )
            .map_err(|e| format!("cannot relocate: {e}"))?;
        *reached = Reached::Relocated;
        let (mut t_send, mut t_recv) = self.open(to).await.map_err(text)?;
        let request = BiRequest::VmMigrate(VmMigrateRequest::Receive(VmReceiveRequest {
            protocol_version: self.link.protocol_version(to),
            alloc_id: alloc.to_owned(),
            wait_ms: PREPARE_LIMIT.as_millis() as u64,
        }));
        wire::write_frame(&mut t_send, &request)
            .await
            .map_err(|e| format!("link to {to}: {e}"))?;
        let mut t_scratch = Vec::new();
        // A target that cannot start the allocation (its image cannot be
        // pulled, say) reports that long before its wait ends.
        let ready = tokio::select! {
            r = read_within::<VmReceiveEvent>(&mut t_recv, &mut t_scratch, PREPARE_LIMIT + SILENCE, to) => r?,
            why = self.failure_on(alloc, to) => return Err(format!("target {to}: {why}")),
        };
        match ready {
            VmReceiveEvent::Ready => {}
            VmReceiveEvent::Done(Err(why)) => return Err(format!("target {to}: {why}")),
            VmReceiveEvent::Done(Ok(())) => {
                return Err(format!("target {to} ended before it received anything"));
            }
        }
        // 3. Go: relay the source's stream into the target's.
        self.update(id, |s| s.phase = Phase::Transferring);
        let Some((s_send, s_recv)) = source.as_mut() else {
            return Err("the source's stream is gone".to_owned());
        };
        wire::write_frame(s_send, &VmControl::Go)
            .await
            .map_err(|e| format!("link to {from}: {e}"))?;
        let mut relayed: u64 = 0;
        // Post-copy: the page channel, once the images are across.
        let mut pages: Option<tokio::task::JoinHandle<()>> = None;
        let done = loop {
            let event = if pages.is_some() {
                // The target runs on pages fetched from the source: a target
                // that fails meanwhile ends the migration (the source's CRIU
                // then resumes it), not only the source's word.
                tokio::select! {
                    e = read_within::<VmSendEvent>(s_recv, &mut s_scratch, SILENCE, from) => e?,
                    why = self.failure_on(alloc, to) => return Err(format!("target {to}: {why}")),
                }
            } else {
                read_within::<VmSendEvent>(s_recv, &mut s_scratch, SILENCE, from).await?
            };
            match event {
                VmSendEvent::Images(p) if post_copy && pages.is_none() => {
                    // Everything but the pages is across: the target restores
                    // now and fetches the pages through the channel.
                    t_send.finish().map_err(|e| format!("link to {to}: {e}"))?;
                    pages = Some(self.page_channel(alloc, from, to).await?);
                    match read_within::<VmReceiveEvent>(&mut t_recv, &mut t_scratch, SILENCE, to)
                        .await?
                    {
                        VmReceiveEvent::Done(Ok(())) => {}
                        VmReceiveEvent::Done(Err(why)) => {
                            return Err(format!("target {to}: {why}"));
                        }
                        VmReceiveEvent::Ready => {
                            return Err(format!("target {to} said Ready twice"));
                        }
                    }
                    info!(%alloc, %from, %to, relayed, dump_ms = ?p.downtime_ms, "post-copy: images relayed; the target restores and fetches its pages");
                    self.update(id, |s| {
                        s.phase = Phase::Restoring;
                        s.bytes_done = p.transferred;
                        s.bytes_total = p.total;
                        s.vm = Some(p.clone());
                    });
                }
                VmSendEvent::Images(_) => {
                    return Err(format!(
                        "source {from} sent its images twice or outside a post-copy migration"
                    ));
                }
                VmSendEvent::Data(_) if pages.is_some() => {
                    return Err(format!("source {from} sent data after its images"));
                }
                VmSendEvent::Data(bytes) => {
                    t_send
                        .write_all(&bytes)
                        .await
                        .map_err(|e| format!("link to {to}: {e}"))?;
                    relayed += bytes.len() as u64;
                }
                VmSendEvent::Progress(p) => {
                    self.update(id, |s| {
                        s.bytes_done = p.transferred;
                        s.bytes_total = p.total;
                        s.vm = Some(p.clone());
                    });
                }
                VmSendEvent::Done(p) => break p,
                VmSendEvent::Failed(why) => return Err(format!("source {from}: {why}")),
                VmSendEvent::Ready => return Err(format!("source {from} said Ready twice")),
            }
        };
        if let Some(channel) = pages {
            // All pages arrived: the source's page server closed the channel.
            if tokio::time::timeout(SILENCE, channel).await.is_err() {
                warn!(%alloc, "the page channel did not close after the last page");
            }
            info!(%alloc, %from, %to, pages_bytes = done.transferred, "post-copy: every page arrived");
        } else {
            t_send.finish().map_err(|e| format!("link to {to}: {e}"))?;
            info!(%alloc, %from, %to, relayed, downtime_ms = ?done.downtime_ms, "vm migration stream relayed");
            match read_within::<VmReceiveEvent>(&mut t_recv, &mut t_scratch, SILENCE, to).await? {
                VmReceiveEvent::Done(Ok(())) => {}
                VmReceiveEvent::Done(Err(why)) => return Err(format!("target {to}: {why}")),
                VmReceiveEvent::Ready => return Err(format!("target {to} said Ready twice")),
            }
        }
        // 4. The target runs the guest and passes its check.
        self.update(id, |s| {
            s.phase = Phase::Restoring;
            s.vm = Some(done.clone());
        });
        self.wait_running(alloc, to)
            .await
            .map_err(|e| format!("it did not run on {to}: {e}"))?;
        Ok(done)
    }

    /// Rolls a failed VM migration back from where it had got to.
    async fn vm_fail(
        &self,
        id: &str,
        by: &str,
        reason: &str,
        reached: Reached,
        source: Option<(quinn::SendStream, quinn::RecvStream)>,
    ) {
        let Some(status) = self.status(id) else {
            return;
        };
        let (alloc, from) = (&status.alloc, &status.from);
        warn!(%alloc, %from, to = %status.to, %reason, "vm migration failed; rolling back");
        let mut rollback = String::from("the source goes on");
        if reached == Reached::Relocated
            && let Err(e) = self.workloads.relocate(
                alloc,
                from,
                None,
                &format!("migration rolled back: {reason}"),
            )
        {
            rollback = format!("cannot move it back to {from}: {e}");
        }
        // The source cancels and resumes the guest on Abort (or the stream's end).
        if let Some((mut send, _recv)) = source {
            let _ = wire::write_frame(&mut send, &VmControl::Abort).await;
            let _ = send.finish();
        }
        if reached != Reached::Nothing
            && let Err(e) = self.release(from, alloc, None).await
        {
            warn!(%alloc, %from, error = %e, "cannot release the source's hold; it expires by itself");
        }
        // The target's reports are not the source's: forget the move first.
        if let Err(e) = self.workloads.clear_restore(alloc) {
            warn!(%alloc, error = %e, "cannot clear the restore mark");
        }
        if reached == Reached::Relocated
            && let Err(e) = self.wait_running(alloc, from).await
        {
            rollback = format!("{rollback}, but it did not come back: {e}");
        }
        let what = if self.workloads.is_vm(alloc) {
            "virtual machine "
        } else {
            ""
        };
        self.rolled_back(&status, by, reason, &rollback, what);
    }
}

impl Migrations {
    /// Opens a post-copy migration's page channel: a
    /// [`VmMigrateRequest::Pages`] stream to each agent, relayed both ways
    /// (the target's `criu lazy-pages` asks, the source's page server
    /// answers) until either end closes. The task ends with the channel.
    async fn page_channel(
        &self,
        alloc: &str,
        from: &str,
        to: &str,
    ) -> Result<tokio::task::JoinHandle<()>, String> {
        let mut ends = Vec::with_capacity(2);
        for (node, source) in [(from, true), (to, false)] {
            let (mut send, recv) = self.open(node).await.map_err(|e| e.to_string())?;
            let request = BiRequest::VmMigrate(VmMigrateRequest::Pages(PagesRequest {
                protocol_version: self.link.protocol_version(node),
                alloc_id: alloc.to_owned(),
                source,
                wait_ms: PAGES_WAIT.as_millis() as u64,
            }));
            wire::write_frame(&mut send, &request)
                .await
                .map_err(|e| format!("link to {node}: {e}"))?;
            ends.push((send, recv));
        }
        let (Some((mut t_send, mut t_recv)), Some((mut s_send, mut s_recv))) =
            (ends.pop(), ends.pop())
        else {
            return Err("the page channel lost an end".to_owned());
        };
        let alloc = alloc.to_owned();
        Ok(tokio::spawn(async move {
            // Requests from the target to the source; pages back.
            // A clean end is passed on as an end, a reset as a reset: the
            // source's CRIU takes an end for a finished transfer.
            let asks = async {
                let r = tokio::io::copy(&mut t_recv, &mut s_send).await;
                let _ = match &r {
                    Ok(_) => s_send.finish(),
                    Err(_) => s_send.reset(quinn::VarInt::from_u32(1)),
                };
                r
            };
            let answers = async {
                let r = tokio::io::copy(&mut s_recv, &mut t_send).await;
                let _ = match &r {
                    Ok(_) => t_send.finish(),
                    Err(_) => t_send.reset(quinn::VarInt::from_u32(1)),
                };
                r
            };
            let (asked, answered) = tokio::join!(asks, answers);
            info!(%alloc, asked = ?asked.as_ref().ok(), answered = ?answered.as_ref().ok(), "page channel closed");
        }))
    }

    /// Resolves with why allocation `alloc` failed on `node`, once it has;
    /// never while it prepares or runs.
    async fn failure_on(&self, alloc: &str, node: &str) -> String {
        let checked = self.workloads.has_health_check(alloc);
        loop {
            if let Ok(a) = self.workloads.allocation(alloc) {
                let seen = self.workloads.move_report(alloc);
                if let super::Progress::Failed(why) =
                    super::restore_progress(&a, node, checked, seen, self.node_down(node))
                {
                    return why;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One frame from `recv` within `limit`.
async fn read_within<T: wire::Decode<()>>(
    recv: &mut quinn::RecvStream,
    scratch: &mut Vec<u8>,
    limit: Duration,
    node: &str,
) -> Result<T, String> {
    tokio::time::timeout(limit, wire::read_frame::<T, _>(recv, scratch))
        .await
        .map_err(|_| format!("node {node} said nothing for {} s", limit.as_secs()))?
        .map_err(|e| format!("link to {node}: {e}"))?
        .ok_or_else(|| format!("node {node} ended the migration stream"))
}

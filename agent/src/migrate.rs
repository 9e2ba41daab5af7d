//! The agent's side of checkpoints and migration: it answers the controller's
//! [`BiRequest::Checkpoint`], [`BiRequest::Fetch`] and [`BiRequest::Release`]
//! streams, and it restores allocations whose spec says
//! [`restore`](novacron_common::wire::AllocationSpec::restore), fetching the bundle
//! from the controller when its own cache lacks it.
//!
//! A migration, seen from here:
//! - **source**: `Checkpoint { stop: true }` holds the allocation (the supervisor
//!   neither restarts nor removes it), dumps it into a bundle in the cache and
//!   answers with the bundle; the controller fetches the bytes; `Release` ends the
//!   hold, after which the new desired set decides (removed when it moved, restored
//!   from the bundle when the migration rolled back).
//! - **target**: the allocation arrives in the desired set with `restore`; the
//!   supervisor creates its container and calls [`Restorer::restore`], which makes
//!   sure the bundle is local (resuming a partial download), checks its digest and
//!   restores it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use novacron_common::checkpoint::{CheckpointMode, resolve_mode};
use novacron_common::retry::Retry;
use novacron_common::sync::lock;
use novacron_common::transfer::{self, FETCH_ATTEMPTS, FETCH_BACKOFF, FetchError};
use novacron_common::wire::{
    self, BiRequest, CheckpointReply, CheckpointRequest, ReleaseReply, RestoreFrom, SUPPORTED,
    VmControl, VmMigrateRequest, VmReceiveEvent, VmReceiveRequest, VmSendEvent, VmSendRequest,
};
use quinn::{RecvStream, SendStream};
use tracing::{info, warn};

mod oci;

use crate::checkpoint::Checkpointer;
use crate::runtime::supervisor::Restorer;
use crate::runtime::{HostRuntime, Supervisor};

/// Live-migration streams this agent serves now: the link does not end a
/// session for news of its own (changed capabilities) while one is open.
static MOVES_IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Whether a live migration's stream is open on this agent.
pub fn moves_in_flight() -> bool {
    MOVES_IN_FLIGHT.load(std::sync::atomic::Ordering::SeqCst) > 0
}

/// Counts one open live-migration stream while it lives.
struct MoveInFlight;

impl MoveInFlight {
    fn start() -> MoveInFlight {
        MOVES_IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        MoveInFlight
    }
}

impl Drop for MoveInFlight {
    fn drop(&mut self) {
        MOVES_IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Checkpoints of one allocation kept in the agent's cache.
const KEEP_LOCAL: usize = 2;
/// The longest hold a controller may ask for.
const MAX_HOLD: Duration = Duration::from_secs(30 * 60);

/// Serves checkpoint streams and restores checkpoints on one node.
#[derive(Debug)]
pub struct CheckpointService {
    node: String,
    supervisor: Supervisor<HostRuntime>,
    checkpointer: Arc<Checkpointer>,
    live: Result<(), String>,
    stop_grace: Duration,
    /// The connection and its negotiated protocol version.
    conn: Mutex<Option<(quinn::Connection, u16)>>,
    /// Post-copy page channel ends waiting for the controller's stream, by
    /// allocation and side (source: true).
    page_ends: Mutex<std::collections::HashMap<(String, bool), oci::PageEnd>>,
}

impl CheckpointService {
    /// The service of `node`; `live` is the node's live-checkpoint capability (or why
    /// it has none).
    pub fn new(
        node: String,
        supervisor: Supervisor<HostRuntime>,
        checkpointer: Arc<Checkpointer>,
        live: Result<(), String>,
    ) -> Self {
        CheckpointService {
            node,
            supervisor,
            checkpointer,
            live,
            stop_grace: Duration::from_secs(10),
            conn: Mutex::new(None),
            page_ends: Mutex::new(Default::default()),
        }
    }

    /// The connection to the controller now (bundles are fetched over it), with
    /// the protocol version negotiated on it.
    pub fn set_connection(&self, conn: Option<(quinn::Connection, u16)>) {
        *lock(&self.conn) = conn;
    }

    /// Answers one stream the controller opened.
    pub async fn serve(&self, request: BiRequest, mut send: SendStream, recv: RecvStream) {
        let _moving = matches!(request, BiRequest::VmMigrate(_)).then(MoveInFlight::start);
        let outcome = match request {
            BiRequest::Checkpoint(r) => {
                let reply = CheckpointReply {
                    result: self.checkpoint(&r).await,
                };
                wire::write_frame(&mut send, &reply)
                    .await
                    .map_err(|e| e.to_string())
            }
            BiRequest::Fetch(r) => {
                let cache = self.checkpointer.clone();
                transfer::serve_fetch(&r, |d| cache.bundle_path(d).ok(), &mut send)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            BiRequest::Release(r) => {
                let was = self.supervisor.release(&r.alloc_id, r.restore.clone());
                info!(alloc = %r.alloc_id, was_held = was, "hold released");
                self.resume_if_back(&r.alloc_id);
                wire::write_frame(&mut send, &ReleaseReply { result: Ok(()) })
                    .await
                    .map_err(|e| e.to_string())
            }
            BiRequest::Exec(_) | BiRequest::Terminal(_) => {
                Err("an exec request reached the checkpoint service".into())
            }
            BiRequest::Registry(_) => {
                Err("agents serve no registry reads; the controller does".into())
            }
            BiRequest::VmMigrate(VmMigrateRequest::Send(r)) => {
                self.send_vm(&r, false, &mut send, recv).await
            }
            BiRequest::VmMigrate(VmMigrateRequest::PostCopy(r)) => {
                self.send_vm(&r, true, &mut send, recv).await
            }
            BiRequest::VmMigrate(VmMigrateRequest::Pages(r)) => {
                self.serve_pages(&r, &mut send, recv).await
            }
            BiRequest::VmMigrate(VmMigrateRequest::Receive(r)) => {
                self.receive_vm(&r, &mut send, recv).await
            }
        };
        match outcome {
            Ok(()) => {
                let _ = send.finish();
            }
            Err(e) => warn!(error = %e, "checkpoint stream failed"),
        }
    }

    async fn checkpoint(
        &self,
        r: &CheckpointRequest,
    ) -> Result<novacron_common::checkpoint::BundleInfo, String> {
        let node = &self.node;
        if !SUPPORTED.contains(r.protocol_version) {
            return Err(format!(
                "checkpoint protocol version {} is not supported; node {node} speaks {SUPPORTED}",
                r.protocol_version
            ));
        }
        let alloc = &r.alloc_id;
        let spec = self.supervisor.spec_of(alloc).ok_or_else(|| {
            format!("allocation {alloc} is not desired on node {node}; nothing to checkpoint")
        })?;
        let container = self.supervisor.exec_container(alloc).await?;
        if spec.task.vm.is_some() {
            return self.checkpoint_vm(r, &spec, &container).await;
        }
        let why_not = self.live.as_ref().err().cloned().unwrap_or_default();
        let mode = resolve_mode(r.mode, self.live.is_ok(), &why_not)?;
        let oci = crate::runtime::oci::is_oci(&container)
            .then(|| self.supervisor.runtime().oci().cloned())
            .flatten();
        let volumes: Vec<String> = spec
            .task
            .volumes
            .iter()
            .filter(|v| !v.read_only)
            .map(|v| v.target.clone())
            .collect();
        if r.stop {
            let hold = Duration::from_millis(r.hold_ms).min(MAX_HOLD);
            self.supervisor.hold(alloc, hold);
        }
        info!(%alloc, %mode, stop = r.stop, "checkpointing");
        let result = if let Some(oci) = &oci {
            self.checkpointer
                .checkpoint_oci(
                    oci,
                    &container,
                    alloc,
                    &spec.job,
                    node,
                    mode,
                    &volumes,
                    !r.stop,
                    self.stop_grace,
                )
                .await
        } else if r.stop {
            self.checkpointer
                .checkpoint(
                    &container,
                    alloc,
                    &spec.job,
                    node,
                    mode,
                    &volumes,
                    self.stop_grace,
                )
                .await
        } else {
            self.checkpointer
                .checkpoint_running(&container, alloc, &spec.job, node, mode, &volumes)
                .await
        };
        match result {
            Ok(info) => {
                info!(%alloc, digest = %info.digest, size = info.size, dump_ms = info.dump_ms, "checkpoint taken");
                if let Err(e) = self.checkpointer.prune(alloc, KEEP_LOCAL) {
                    warn!(%alloc, error = %e, "cannot prune older local checkpoints");
                }
                Ok(info)
            }
            Err(e) => {
                if r.stop {
                    // The source goes on: whatever state the container is in, the
                    // supervisor takes it from here (a stopped one restarts).
                    self.supervisor.release(alloc, None);
                }
                Err(format!(
                    "checkpoint of allocation {alloc} on node {node} failed: {e}"
                ))
            }
        }
    }

    /// A snapshot of the VM of allocation `r.alloc_id` (see
    /// [`Checkpointer::checkpoint_vm`]): always live, whatever the node's CRIU.
    async fn checkpoint_vm(
        &self,
        r: &CheckpointRequest,
        spec: &novacron_common::wire::AllocationSpec,
        vm_id: &str,
    ) -> Result<novacron_common::checkpoint::BundleInfo, String> {
        let (alloc, node) = (&r.alloc_id, &self.node);
        if r.mode == CheckpointMode::Fs {
            return Err(format!(
                "allocation {alloc} is a virtual machine: its snapshot holds its memory (mode live or auto), there is no filesystem-only checkpoint"
            ));
        }
        let vms = self.vms()?;
        if r.stop {
            let hold = Duration::from_millis(r.hold_ms).min(MAX_HOLD);
            self.supervisor.hold(alloc, hold);
        }
        info!(%alloc, vm = %vm_id, stop = r.stop, "snapshotting the virtual machine");
        let result = self
            .checkpointer
            .checkpoint_vm(vms, vm_id, alloc, &spec.job, node, &spec.task.image, r.stop)
            .await;
        match result {
            Ok(info) => {
                if let Err(e) = self.checkpointer.prune(alloc, KEEP_LOCAL) {
                    warn!(%alloc, error = %e, "cannot prune older local checkpoints");
                }
                Ok(info)
            }
            Err(e) => {
                if r.stop {
                    self.supervisor.release(alloc, None);
                }
                Err(format!(
                    "snapshot of allocation {alloc} on node {node} failed: {e}"
                ))
            }
        }
    }

    /// Makes sure bundle `from` is in the cache and intact, fetching it from the
    /// controller (resuming a partial download) when it is not.
    async fn ensure_local(&self, from: &RestoreFrom) -> Result<PathBuf, String> {
        let path = self
            .checkpointer
            .bundle_path(&from.digest)
            .map_err(|e| e.to_string())?;
        if path.exists() && self.checkpointer.verify(&from.digest).await.is_ok() {
            return Ok(path);
        }
        let partial = path.with_extension("partial");
        let mut last = String::new();
        let mut retry = Retry::new(FETCH_BACKOFF);
        for attempt in 1..=FETCH_ATTEMPTS {
            let conn = lock(&self.conn).clone().ok_or_else(|| {
                format!(
                    "bundle {} is not on node {} and the controller is not connected",
                    from.digest, self.node
                )
            })?;
            let offset = tokio::fs::metadata(&partial)
                .await
                .map(|m| m.len())
                .unwrap_or(0);
            match fetch(&conn.0, conn.1, &from.digest, offset, &partial).await {
                Ok(size) if size == from.size => {
                    tokio::fs::rename(&partial, &path)
                        .await
                        .map_err(|e| format!("cannot move {} into place: {e}", path.display()))?;
                    match self.checkpointer.verify(&from.digest).await {
                        Ok(_) => return Ok(path),
                        Err(e) => {
                            let _ = tokio::fs::remove_file(&path).await;
                            return Err(e.to_string());
                        }
                    }
                }
                Ok(size) => {
                    let _ = tokio::fs::remove_file(&partial).await;
                    return Err(format!(
                        "bundle {} has {size} bytes; the allocation's spec says {}",
                        from.digest, from.size
                    ));
                }
                Err(FetchError::Refused(why)) => return Err(why),
                Err(FetchError::Broken(why)) => {
                    warn!(digest = %from.digest, attempt, error = %why, "bundle fetch broke; resuming");
                    last = why;
                    tokio::time::sleep(retry.next_delay()).await;
                }
            }
        }
        Err(format!(
            "bundle {} could not be fetched in {FETCH_ATTEMPTS} attempts: {last}",
            from.digest
        ))
    }
}

/// One fetch of `digest` from `offset` over a new stream to the controller.
async fn fetch(
    conn: &quinn::Connection,
    version: u16,
    digest: &str,
    offset: u64,
    partial: &std::path::Path,
) -> Result<u64, FetchError> {
    let broken = |e: String| FetchError::Broken(e);
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| broken(e.to_string()))?;
    wire::write_frame(
        &mut send,
        &BiRequest::Fetch(transfer::fetch_request(version, digest, offset)),
    )
    .await
    .map_err(|e| broken(e.to_string()))?;
    let _ = send.finish();
    transfer::receive_fetch(&mut recv, partial, offset, |_, _| {}).await
}

/// The controller's next word on a VM's send stream; `None` when the stream
/// ended, broke or stayed silent for [`VM_DECISION_WAIT`].
async fn control(scratch: &mut Vec<u8>, recv: &mut RecvStream) -> Option<VmControl> {
    let read = wire::read_frame::<VmControl, _>(recv, scratch);
    match tokio::time::timeout(VM_DECISION_WAIT, read).await {
        Ok(Ok(Some(c))) => Some(c),
        _ => None,
    }
}

/// How long a VM waiting for its state from a live migration may wait.
const INCOMING_LIMIT: Duration = Duration::from_secs(20 * 60);
/// How long a released VM's allocation may take to be desired here again.
const BACK_WAIT: Duration = Duration::from_secs(10);
/// How long the source waits for the controller's word after its part.
const VM_DECISION_WAIT: Duration = Duration::from_secs(10 * 60);

impl CheckpointService {
    fn vms(&self) -> Result<&Arc<crate::runtime::vm::VmDriver>, String> {
        self.supervisor.runtime().vms().ok_or_else(|| {
            format!(
                "node {} runs no virtual machines (qemu-system-x86_64 is not installed)",
                self.node
            )
        })
    }

    /// After a release: if the allocation is (or becomes, within
    /// [`BACK_WAIT`]: the desired set travels on another stream) desired here
    /// and its VM was left paused by a migration, resume the guest. A VM that
    /// moved away is removed by the supervisor meanwhile, which ends the wait.
    fn resume_if_back(&self, alloc: &str) {
        let Some(vms) = self.supervisor.runtime().vms().cloned() else {
            return;
        };
        let supervisor = self.supervisor.clone();
        let alloc = alloc.to_owned();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + BACK_WAIT;
            while tokio::time::Instant::now() < deadline {
                let Some(id) = vms.vm_of_alloc(&alloc) else {
                    return;
                };
                if supervisor
                    .spec_of(&alloc)
                    .is_some_and(|s| s.task.vm.is_some())
                {
                    if let Err(e) = vms.resume_after_abort(&id).await {
                        warn!(%alloc, vm = %id, error = %e, "cannot resume the virtual machine after its migration was undone");
                    }
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    /// The source's side of a VM's live migration (see
    /// [`VmMigrateRequest`]): `Ok` once the controller said how it ends.
    async fn send_vm(
        &self,
        r: &VmSendRequest,
        post_copy: bool,
        send: &mut SendStream,
        mut recv: RecvStream,
    ) -> Result<(), String> {
        let failed = |why: String| VmSendEvent::Failed(why);
        let alloc = &r.alloc_id;
        let found = async {
            if !SUPPORTED.contains(r.protocol_version) {
                return Err(format!(
                    "migration protocol version {} is not supported; node {} speaks {SUPPORTED}",
                    r.protocol_version, self.node
                ));
            }
            let spec = self.supervisor.spec_of(alloc).ok_or_else(|| {
                format!("allocation {alloc} is not desired on node {}", self.node)
            })?;
            let id = self.supervisor.exec_container(alloc).await?;
            if crate::runtime::oci::is_oci(&id) {
                return Ok(Err((id, spec)));
            }
            let vms = self.vms()?;
            if spec.task.vm.is_none() {
                return Err(format!(
                    "allocation {alloc} is a container, not a virtual machine"
                ));
            }
            if vms.disk(&id).is_some() {
                vms.block_migration()
                    .map_err(|why| format!("allocation {alloc}: {why}"))?;
            }
            Ok(Ok(id))
        }
        .await;
        let id = match found {
            Ok(Ok(id)) => id,
            Ok(Err((id, spec))) => {
                let volumes = spec
                    .task
                    .volumes
                    .iter()
                    .filter(|v| !v.read_only)
                    .map(|v| v.target.clone())
                    .collect();
                return self
                    .send_oci(
                        r,
                        post_copy,
                        id,
                        volumes,
                        spec.task.image.clone(),
                        send,
                        recv,
                    )
                    .await;
            }
            Err(why) => {
                let _ = wire::write_frame(send, &failed(why.clone())).await;
                return Err(why);
            }
        };
        if post_copy {
            let why = format!(
                "allocation {alloc} is a virtual machine: post-copy is for runc containers"
            );
            let _ = wire::write_frame(send, &failed(why.clone())).await;
            return Err(why);
        }
        let vms = self.vms()?.clone();
        self.supervisor
            .hold(alloc, Duration::from_millis(r.hold_ms).min(MAX_HOLD));
        wire::write_frame(send, &VmSendEvent::Ready)
            .await
            .map_err(|e| e.to_string())?;
        let mut scratch = Vec::new();
        if control(&mut scratch, &mut recv).await != Some(VmControl::Go) {
            info!(%alloc, "vm migration given up before it began");
            return Ok(());
        }
        info!(%alloc, vm = %id, "migrating the virtual machine out");
        // QEMU's bytes and progress go out as frames, in order, from one writer.
        // Each receiver is owned by the future that reads it: when the
        // controller's stream breaks, the writer ends, its receiver goes, and
        // every send up the chain fails, down to QEMU's socket (the migration
        // is then cancelled) instead of waiting for a reader that is gone.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<VmSendEvent>(8);
        let (data_tx, mut data_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        let progress_tx = tx.clone();
        let data_out = tx.clone();
        let migrate = async {
            let forward = async move {
                while let Some(chunk) = data_rx.recv().await {
                    if data_out.send(VmSendEvent::Data(chunk)).await.is_err() {
                        break;
                    }
                }
            };
            let run = vms.send_migration(&id, r, data_tx, |p| {
                let _ = progress_tx.try_send(VmSendEvent::Progress(p.clone()));
            });
            let (result, ()) = tokio::join!(run, forward);
            let end = match result {
                Ok(p) => VmSendEvent::Done(p),
                Err(why) => VmSendEvent::Failed(why),
            };
            let _ = tx.send(end).await;
            drop(tx);
            drop(progress_tx);
        };
        let write = async move {
            while let Some(event) = rx.recv().await {
                let end = matches!(event, VmSendEvent::Done(_) | VmSendEvent::Failed(_));
                if let Err(e) = wire::write_frame(send, &event).await {
                    return Err(e.to_string());
                }
                if end {
                    return Ok(matches!(event, VmSendEvent::Done(_)));
                }
            }
            Err("the migration ended without a result".to_owned())
        };
        let ((), written) = tokio::join!(migrate, write);
        let completed = written.as_ref().is_ok_and(|c| *c);
        let word = if completed {
            control(&mut scratch, &mut recv).await
        } else {
            Some(VmControl::Abort)
        };
        match word {
            Some(VmControl::Commit) => {
                info!(%alloc, "vm migration committed; the source stays paused until released");
                return Ok(());
            }
            None => {
                // Everything was sent and the target may run the guest: resuming
                // here could run it twice. The hold keeps it paused until the
                // controller (perhaps restarted) releases it: resumed when the
                // allocation is back here, removed when it is not.
                warn!(%alloc, "the controller said nothing after the copy; the source stays paused and held");
                return Ok(());
            }
            Some(_) => {}
        }
        match vms.resume_after_abort(&id).await {
            Ok(()) => info!(%alloc, "vm migration aborted; the source runs on"),
            Err(e) => warn!(%alloc, error = %e, "vm migration aborted; cannot resume the source"),
        }
        written.map(|_| ())
    }

    /// The target's side of a VM's live migration (see [`VmMigrateRequest`]).
    async fn receive_vm(
        &self,
        r: &VmReceiveRequest,
        send: &mut SendStream,
        mut recv: RecvStream,
    ) -> Result<(), String> {
        let alloc = &r.alloc_id;
        let wait = Duration::from_millis(r.wait_ms).min(INCOMING_LIMIT);
        let ready = async {
            if !SUPPORTED.contains(r.protocol_version) {
                return Err(format!(
                    "migration protocol version {} is not supported; node {} speaks {SUPPORTED}",
                    r.protocol_version, self.node
                ));
            }
            let deadline = tokio::time::Instant::now() + wait;
            // The desired set travels on another stream: it may arrive after
            // this request.
            let spec = loop {
                if let Some(spec) = self.supervisor.spec_of(alloc) {
                    break spec;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!(
                        "allocation {alloc} is not desired on node {} after {} s",
                        self.node,
                        wait.as_secs()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            if spec.task.vm.is_none() && self.supervisor.runtime().oci().is_some() {
                return Ok(None);
            }
            let vms = self.vms()?.clone();
            let id = loop {
                if let Some(id) = vms.vm_of_alloc(alloc) {
                    break id;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!(
                        "allocation {alloc} has no virtual machine on node {} after {} s",
                        self.node,
                        wait.as_secs()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let conn = vms.incoming_connection(&id, left).await?;
            Ok(Some((vms, id, conn)))
        }
        .await;
        let (vms, id, conn) = match ready {
            Ok(Some(found)) => found,
            Ok(None) => {
                let left = wait.min(INCOMING_LIMIT);
                let result = self.receive_oci(alloc, left, send, &mut recv).await;
                if let Err(e) = &result {
                    warn!(%alloc, error = %e, "runc container's stream broke");
                }
                wire::write_frame(send, &VmReceiveEvent::Done(result.clone()))
                    .await
                    .map_err(|e| e.to_string())?;
                return result;
            }
            Err(why) => {
                let _ = wire::write_frame(send, &VmReceiveEvent::Done(Err(why.clone()))).await;
                return Err(why);
            }
        };
        wire::write_frame(send, &VmReceiveEvent::Ready)
            .await
            .map_err(|e| e.to_string())?;
        let result = vms.receive_migration(&id, &mut recv, conn).await;
        match &result {
            Ok(bytes) => info!(%alloc, vm = %id, bytes, "vm migration stream written into qemu"),
            Err(e) => warn!(%alloc, vm = %id, error = %e, "vm migration stream broke"),
        }
        let result = result.map(|_| ());
        wire::write_frame(send, &VmReceiveEvent::Done(result.clone()))
            .await
            .map_err(|e| e.to_string())?;
        result
    }
}

impl Restorer for CheckpointService {
    fn restore<'a>(
        &'a self,
        alloc: &'a str,
        from: &'a RestoreFrom,
        container_id: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            if from.incoming_vm.is_some() && crate::runtime::oci::is_oci(container_id) {
                info!(%alloc, migration = %from.digest, container = %container_id, "waiting for the runc container's state");
                let supervisor = &self.supervisor;
                return self
                    .await_incoming_oci(alloc, container_id, INCOMING_LIMIT, || {
                        supervisor.spec_of(alloc).is_some_and(|s| {
                            s.restore.as_ref().is_some_and(|r| r.incoming_vm.is_some())
                        })
                    })
                    .await;
            }
            if from.incoming_vm.is_some() {
                let vms = self.vms()?;
                vms.start_incoming(container_id)
                    .await
                    .map_err(|e| e.to_string())?;
                info!(%alloc, migration = %from.digest, vm = %container_id, "waiting for the virtual machine's state");
                let supervisor = &self.supervisor;
                vms.await_incoming(container_id, INCOMING_LIMIT, || {
                    supervisor.spec_of(alloc).is_some_and(|s| {
                        s.restore.as_ref().is_some_and(|r| r.incoming_vm.is_some())
                    })
                })
                .await?;
                info!(%alloc, migration = %from.digest, vm = %container_id, "virtual machine arrived live");
                return Ok(());
            }
            if crate::runtime::vm::is_vm(container_id) {
                let vms = self.vms()?;
                self.ensure_local(from).await?;
                self.checkpointer
                    .restore_vm(vms, &from.digest, container_id)
                    .await
                    .map_err(|e| e.to_string())?;
                info!(%alloc, digest = %from.digest, vm = %container_id, "restored from its snapshot");
                return Ok(());
            }
            if crate::runtime::oci::is_oci(container_id) {
                let oci = self.supervisor.runtime().oci().cloned().ok_or_else(|| {
                    format!("node {} does not run containers under runc", self.node)
                })?;
                self.ensure_local(from).await?;
                let mode = self
                    .checkpointer
                    .restore_oci(&oci, &from.digest, container_id)
                    .await
                    .map_err(|e| e.to_string())?;
                info!(%alloc, digest = %from.digest, %mode, container = %container_id, "restored from checkpoint under runc");
                return Ok(());
            }
            if from.mode == CheckpointMode::Live
                && let Err(why) = &self.live
            {
                return Err(format!(
                    "checkpoint {} is live and node {} cannot restore live checkpoints: {why}",
                    from.digest, self.node
                ));
            }
            self.ensure_local(from).await?;
            let mode = self
                .checkpointer
                .restore(&from.digest, container_id)
                .await
                .map_err(|e| e.to_string())?;
            info!(%alloc, digest = %from.digest, %mode, container = %container_id, "restored from checkpoint");
            Ok(())
        })
    }
}

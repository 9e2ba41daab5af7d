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
};
use quinn::{RecvStream, SendStream};
use tracing::{info, warn};

use crate::checkpoint::Checkpointer;
use crate::runtime::supervisor::Restorer;
use crate::runtime::{HostRuntime, Supervisor};

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
        }
    }

    /// The connection to the controller now (bundles are fetched over it), with
    /// the protocol version negotiated on it.
    pub fn set_connection(&self, conn: Option<(quinn::Connection, u16)>) {
        *lock(&self.conn) = conn;
    }

    /// Answers one stream the controller opened.
    pub async fn serve(&self, request: BiRequest, mut send: SendStream, _recv: RecvStream) {
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
        let why_not = self.live.as_ref().err().cloned().unwrap_or_default();
        let mode = resolve_mode(r.mode, self.live.is_ok(), &why_not)?;
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
        let result = if r.stop {
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

impl Restorer for CheckpointService {
    fn restore<'a>(
        &'a self,
        alloc: &'a str,
        from: &'a RestoreFrom,
        container_id: &'a str,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
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

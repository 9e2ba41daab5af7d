//! Live migration of a runc container, streamed from source to target over
//! the links (the controller relays each piece, never stores it), on the same
//! streams as a VM's ([`VmMigrateRequest`](novacron_common::wire::VmMigrateRequest)):
//! no bundle, no compression and no digest pass while the container is frozen
//! (the authenticated QUIC streams carry the integrity).
//!
//! - **source**: holds the allocation (`Ready`); on `Go`, `runc checkpoint`
//!   dumps the container into its [`OciDriver::checkpoint_dir`] (it stops),
//!   the writable layer and volumes are staged beside the dump, and the whole
//!   directory goes out as one tar in `Data` frames, then `Done`. On `Commit`
//!   the source stays stopped until the release removes it; on `Abort` it
//!   starts again from its own dump.
//! - **target**: the allocation arrived with
//!   [`RestoreFrom::incoming_vm`](novacron_common::wire::RestoreFrom::incoming_vm)
//!   (the live stream's source); the supervisor created the container; the
//!   stream is unpacked into [`OciDriver::incoming_dir`] as it comes, and the
//!   restorer, which waited for it, restores from it with `runc restore`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use novacron_common::checkpoint::{BUNDLE_FORMAT, BundleMeta, CheckpointMode};
use novacron_common::wire::{self, VmControl, VmMigrationProgress, VmSendEvent, VmSendRequest};
use quinn::{RecvStream, SendStream};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{CheckpointService, MAX_HOLD, VM_DECISION_WAIT, control};
use crate::checkpoint::oci::{apply_files, copy_files};
use crate::runtime::oci::OciDriver;

/// The most bytes one `Data` frame carries.
const CHUNK: usize = 256 * 1024;
/// The file that says an incoming stream arrived whole.
const COMPLETE: &str = ".complete";
/// The stream's record of the dump (deleted paths, volume targets).
const META: &str = "bundle.json";
/// The most bytes an incoming stream may unpack to.
const INCOMING_LIMIT_BYTES: u64 = 64 << 30;

/// A [`Write`] that cuts what is written into chunks on a channel (for a tar
/// builder on a blocking thread); it fails once the receiver is gone.
struct ChunkWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::other("the migration stream is gone"))
    }
}

/// A [`Read`] over chunks from a channel (for a tar reader on a blocking
/// thread).
struct ChunkReader {
    rx: mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    at: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.buf.len() {
            match self.rx.blocking_recv() {
                Some(chunk) => {
                    self.buf = chunk;
                    self.at = 0;
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

impl CheckpointService {
    fn oci(&self) -> Result<Arc<OciDriver>, String> {
        self.supervisor
            .runtime()
            .oci()
            .cloned()
            .ok_or_else(|| format!("node {} does not run containers under runc", self.node))
    }

    /// The source's side of a runc container's live migration (see the
    /// module): `Ok` once the controller said how it ends.
    pub(super) async fn send_oci(
        &self,
        r: &VmSendRequest,
        id: String,
        volumes: Vec<String>,
        image: String,
        send: &mut SendStream,
        mut recv: RecvStream,
    ) -> Result<(), String> {
        let alloc = &r.alloc_id;
        let oci = match self.oci() {
            Ok(o) => o,
            Err(why) => {
                let _ = wire::write_frame(send, &VmSendEvent::Failed(why.clone())).await;
                return Err(why);
            }
        };
        // The mounts come from the sandbox, which the dump stops.
        let mounts = match oci.mounts(&id).await {
            Ok(m) => m,
            Err(e) => {
                let why = format!("allocation {alloc}: {e}");
                let _ = wire::write_frame(send, &VmSendEvent::Failed(why.clone())).await;
                return Err(why);
            }
        };
        self.supervisor
            .hold(alloc, Duration::from_millis(r.hold_ms).min(MAX_HOLD));
        wire::write_frame(send, &VmSendEvent::Ready)
            .await
            .map_err(|e| e.to_string())?;
        let mut scratch = Vec::new();
        if control(&mut scratch, &mut recv).await != Some(VmControl::Go) {
            info!(%alloc, "migration given up before it began");
            return Ok(());
        }
        let started = Instant::now();
        let dir = oci.checkpoint_dir(&id);
        let _ = std::fs::remove_dir_all(&dir);
        let dumped = oci.checkpoint(&id, &dir.join("criu"), false).await;
        let staged = match dumped {
            Ok(dump_ms) => {
                let (upper, d, v) = (oci.upper_dir(&id), dir.clone(), volumes.clone());
                let m = mounts.clone();
                tokio::task::spawn_blocking(move || copy_files(&upper, &m, &v, &d))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r.map_err(|e| e.to_string()))
                    .and_then(|(bytes, deleted)| {
                        let meta = BundleMeta {
                            format: BUNDLE_FORMAT,
                            mode: CheckpointMode::Live,
                            alloc: alloc.clone(),
                            job: String::new(),
                            image,
                            criu_name: Some("runc".to_owned()),
                            deleted,
                            volumes,
                            created_unix_ms: novacron_common::clock::unix_ms(
                                std::time::SystemTime::now(),
                            ),
                            container: None,
                            vm: false,
                            runc: true,
                        };
                        let json = serde_json::to_vec(&meta).map_err(|e| e.to_string())?;
                        std::fs::write(dir.join(META), json).map_err(|e| e.to_string())?;
                        Ok((dump_ms, bytes))
                    })
            }
            Err(e) => Err(e.to_string()),
        };
        let (dump_ms, staged_bytes) = match staged {
            Ok(s) => s,
            Err(why) => {
                let why = format!("dumping allocation {alloc}: {why}");
                let _ = wire::write_frame(send, &VmSendEvent::Failed(why.clone())).await;
                self.resume_oci(&oci, &id).await;
                return Err(why);
            }
        };
        info!(%alloc, container = %id, dump_ms, staged_bytes, "runc container dumped; streaming it");
        // The directory goes out as one tar: a blocking writer cuts it into
        // chunks; this task frames them. Each receiver is owned by its reader.
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
        let from = dir.clone();
        let writer = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut tar = tar::Builder::new(ChunkWriter {
                tx,
                buf: Vec::with_capacity(CHUNK),
            });
            tar.follow_symlinks(false);
            tar.append_dir_all(".", &from)?;
            let mut w = tar.into_inner()?;
            w.flush()
        });
        let mut sent: u64 = 0;
        let mut frames: u64 = 0;
        let mut broken = None;
        while let Some(chunk) = rx.recv().await {
            sent += chunk.len() as u64;
            frames += 1;
            if let Err(e) = wire::write_frame(send, &VmSendEvent::Data(chunk)).await {
                broken = Some(e.to_string());
                break;
            }
            if frames.is_multiple_of(16) {
                let p = progress("active", sent, started, dump_ms);
                if let Err(e) = wire::write_frame(send, &VmSendEvent::Progress(p)).await {
                    broken = Some(e.to_string());
                    break;
                }
            }
        }
        drop(rx);
        let written = writer.await.map_err(|e| e.to_string());
        let outcome = match (broken, written) {
            (Some(why), _) => Err(format!("the controller's stream broke: {why}")),
            (None, Ok(Ok(()))) => Ok(()),
            (None, Ok(Err(e))) => Err(format!("writing the stream: {e}")),
            (None, Err(why)) => Err(why),
        };
        let end = match &outcome {
            Ok(()) => VmSendEvent::Done(progress("completed", sent, started, dump_ms)),
            Err(why) => VmSendEvent::Failed(why.clone()),
        };
        let told = wire::write_frame(send, &end).await;
        let word = if outcome.is_ok() && told.is_ok() {
            tokio::time::timeout(VM_DECISION_WAIT, control(&mut scratch, &mut recv))
                .await
                .ok()
                .flatten()
        } else {
            Some(VmControl::Abort)
        };
        match word {
            Some(VmControl::Commit) => {
                info!(%alloc, sent, "migration committed; the source stays stopped until released");
                Ok(())
            }
            None => {
                // Everything was sent and the target may run it: starting here
                // could run it twice. The hold keeps it stopped until the
                // controller (perhaps restarted) releases it: started again
                // from its dump when it is desired here, removed when not.
                warn!(%alloc, "the controller said nothing after the stream; the source stays stopped and held");
                Ok(())
            }
            Some(_) => {
                self.resume_oci(&oci, &id).await;
                outcome
            }
        }
    }

    /// Starts a source container again from its own dump after a failed or
    /// undone migration.
    async fn resume_oci(&self, oci: &OciDriver, id: &str) {
        match oci.start(id).await {
            Ok(()) => info!(container = %id, "migration undone; the source goes on from its dump"),
            Err(e) => {
                warn!(container = %id, error = %e, "migration undone; cannot start the source again")
            }
        }
    }

    /// The target's side: waits for the allocation's container, answers
    /// `Ready`, unpacks the stream into its incoming directory and marks it
    /// whole.
    pub(super) async fn receive_oci(
        &self,
        alloc: &str,
        wait: Duration,
        send: &mut SendStream,
        recv: &mut RecvStream,
    ) -> Result<(), String> {
        let oci = self.oci()?;
        let deadline = tokio::time::Instant::now() + wait;
        let id = loop {
            if let Some(id) = oci.container_of_alloc(alloc) {
                break id;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "allocation {alloc} has no container on node {} after {} s",
                    self.node,
                    wait.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let dir = oci.incoming_dir(&id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        wire::write_frame(send, &wire::VmReceiveEvent::Ready)
            .await
            .map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel::<Vec<u8>>(8);
        let into = dir.clone();
        let reader = tokio::task::spawn_blocking(move || unpack_stream(rx, &into));
        let mut received: u64 = 0;
        let mut broken = None;
        loop {
            match recv.read_chunk(CHUNK, true).await {
                Ok(Some(chunk)) => {
                    received += chunk.bytes.len() as u64;
                    if received > INCOMING_LIMIT_BYTES {
                        broken = Some(format!(
                            "the stream passed {INCOMING_LIMIT_BYTES} bytes; refused"
                        ));
                        break;
                    }
                    if tx.send(chunk.bytes.to_vec()).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    broken = Some(format!("the stream broke: {e}"));
                    break;
                }
            }
        }
        drop(tx);
        let unpacked = reader
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| format!("unpacking the stream: {e}")));
        match (broken, unpacked) {
            (Some(why), _) | (None, Err(why)) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(why)
            }
            (None, Ok(())) => {
                std::fs::write(dir.join(COMPLETE), b"").map_err(|e| e.to_string())?;
                info!(%alloc, container = %id, received, "runc container's stream arrived");
                Ok(())
            }
        }
    }

    /// The restorer's part on the target: waits (while `still` holds, at most
    /// `limit`) for the stream to arrive whole, then puts the files in place
    /// and restores the container with `runc restore`.
    pub(super) async fn await_incoming_oci(
        &self,
        alloc: &str,
        id: &str,
        limit: Duration,
        still: impl Fn() -> bool,
    ) -> Result<(), String> {
        let oci = self.oci()?;
        let dir = oci.incoming_dir(id);
        let deadline = tokio::time::Instant::now() + limit;
        while !dir.join(COMPLETE).exists() {
            if !still() {
                return Err(format!(
                    "allocation {alloc} no longer arrives live on node {}",
                    self.node
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "the state of allocation {alloc} did not arrive within {} s",
                    limit.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let started = Instant::now();
        let meta: BundleMeta = std::fs::read(dir.join(META))
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            .map_err(|e| format!("the stream's {META}: {e}"))?;
        let mounts = oci.mounts(id).await.map_err(|e| e.to_string())?;
        let (from, upper) = (dir.clone(), oci.upper_dir(id));
        tokio::task::spawn_blocking(move || apply_files(&from, &upper, &mounts, &meta))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let applied_ms = started.elapsed().as_millis();
        oci.restore(id, &dir.join("criu"))
            .await
            .map_err(|e| e.to_string())?;
        let _ = std::fs::remove_dir_all(&dir);
        info!(%alloc, container = %id, applied_ms, total_ms = started.elapsed().as_millis(), "runc container restored from its stream");
        Ok(())
    }
}

fn progress(status: &str, sent: u64, started: Instant, dump_ms: u64) -> VmMigrationProgress {
    VmMigrationProgress {
        status: status.to_owned(),
        transferred: sent,
        total: sent,
        elapsed_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        downtime_ms: Some(dump_ms),
        ..Default::default()
    }
}

/// Unpacks the tar arriving on `rx` into `into`, refusing members that leave it.
fn unpack_stream(rx: mpsc::Receiver<Vec<u8>>, into: &Path) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(ChunkReader {
        rx,
        buf: Vec::new(),
        at: 0,
    });
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path: PathBuf = entry.path()?.into_owned();
        if path.components().any(|c| {
            !matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        }) {
            return Err(std::io::Error::other(format!(
                "member {} leaves the directory",
                path.display()
            )));
        }
        entry.unpack_in(into)?;
    }
    Ok(())
}

//! Live migration of a runc container, streamed from source to target over
//! the links (the controller relays each piece, never stores it), on the same
//! streams as a VM's ([`VmMigrateRequest`](novacron_common::wire::VmMigrateRequest)):
//! no bundle, no compression and no digest pass while the container is frozen
//! (the authenticated QUIC streams carry the integrity).
//!
//! - **source**: holds the allocation (`Ready`); on `Go`, `runc checkpoint`
//!   first sends the writable layer and the volumes while the container still
//!   serves (one tar under `early/`, [`early::send_files`]), then `runc
//!   checkpoint` dumps the container into its [`OciDriver::checkpoint_dir`]
//!   (it stops), what changed in its files since the early copy is staged
//!   beside the dump with the paths that went away, and that directory goes
//!   out as a second tar in `Data` frames, then `Done`. On `Commit`
//!   the source stays stopped until the release removes it; on `Abort` it
//!   starts again from its own dump.
//! - **target**: the allocation arrived with
//!   [`RestoreFrom::incoming_vm`](novacron_common::wire::RestoreFrom::incoming_vm)
//!   (the live stream's source); the supervisor created the container; the
//!   stream is unpacked into [`OciDriver::incoming_dir`] as it comes, and the
//!   restorer, which waited for it, moves the early copy into place
//!   ([`early::place_files`]), applies the delta and restores with `runc
//!   restore`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use novacron_common::checkpoint::{BUNDLE_FORMAT, BundleMeta, CheckpointMode};
use novacron_common::sync::lock;
use novacron_common::wire::{
    self, PagesRequest, VmControl, VmMigrationProgress, VmSendEvent, VmSendRequest,
};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{CheckpointService, MAX_HOLD, VM_DECISION_WAIT, control};
use crate::checkpoint::early::{self, EARLY_DIR, REMOVED, Snapshot};
use crate::checkpoint::oci::{Copied, apply_files, copy_files};
use crate::runtime::oci::OciDriver;
use crate::runtime::oci::guard::PortGuard;

/// The most bytes one `Data` frame carries.
const CHUNK: usize = 256 * 1024;
/// The file that says an incoming stream arrived whole.
const COMPLETE: &str = ".complete";
/// The stream's record of the dump (deleted paths, volume targets).
const META: &str = "bundle.json";
/// The most bytes an incoming stream may unpack to.
const INCOMING_LIMIT_BYTES: u64 = 64 << 30;
/// The file that marks a post-copy dump (its pages come through the page
/// channel).
const POST_COPY: &str = ".post-copy";
/// How long the target may take to fetch every page of a post-copy dump.
const PAGES_LIMIT: Duration = Duration::from_secs(30 * 60);
/// The longest a page channel's end waits to be registered.
const MAX_PAGES_WAIT: Duration = Duration::from_secs(10 * 60);

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
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn send_oci(
        &self,
        r: &VmSendRequest,
        post_copy: bool,
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
        if post_copy && !oci.capability().lazy_pages {
            let why = format!("node {} cannot serve lazy pages (post-copy)", self.node);
            let _ = wire::write_frame(send, &VmSendEvent::Failed(why.clone())).await;
            return Err(why);
        }
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
        let staging = Staging {
            alloc: alloc.clone(),
            image,
            volumes,
            mounts,
        };
        let started = Instant::now();
        let (early, early_sent) =
            match send_early(send, &oci.upper_dir(&id), &staging, started).await {
                Ok(e) => e,
                Err(why) => return fail(send, format!("allocation {alloc}: {why}")).await,
            };
        if post_copy {
            return self
                .send_oci_post_copy(&oci, &id, staging, early, early_sent, send, recv)
                .await;
        }
        let dir = oci.checkpoint_dir(&id);
        let _ = std::fs::remove_dir_all(&dir);
        let staged = match oci.checkpoint(&id, &dir.join("criu"), false).await {
            Ok(dump_ms) => stage(&dir, &oci.upper_dir(&id), staging, early, false)
                .await
                .map(|bytes| (dump_ms, bytes)),
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
        let (sent, outcome) = stream_dir(send, &dir, started, dump_ms).await;
        let sent = sent + early_sent;
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

    /// [`Self::send_oci`] in post-copy: the dump leaves the pages in CRIU's
    /// page server (loopback), everything else goes out as in stop-copy, then
    /// `Images`; the page channel ([`Self::serve_pages`]) carries the pages
    /// while `Progress` reports them, and `Done` follows once the last one
    /// was fetched (the container has then left this node). A failure before
    /// that resumes the container here.
    #[allow(clippy::too_many_arguments)]
    async fn send_oci_post_copy(
        &self,
        oci: &Arc<OciDriver>,
        id: &str,
        staging: Staging,
        early: Snapshot,
        early_sent: u64,
        send: &mut SendStream,
        recv: RecvStream,
    ) -> Result<(), String> {
        let alloc = staging.alloc.clone();
        let started = Instant::now();
        let dir = oci.checkpoint_dir(id);
        let _ = std::fs::remove_dir_all(&dir);
        let port = match free_port() {
            Ok(p) => p,
            Err(why) => return fail(send, why).await,
        };
        // CRIU's page server listens on every address; only the agent, over
        // loopback, may reach it. The rules go when the guard does, on every
        // path out of here.
        let guard = match PortGuard::arm(port).await {
            Ok(g) => {
                info!(%alloc, port, "the page server's port is closed to other hosts");
                g
            }
            Err(why) => {
                return fail(
                    send,
                    format!("{why}; --mode stop-copy needs no page server"),
                )
                .await;
            }
        };
        let dump = match oci.checkpoint_lazy(id, &dir.join("criu"), port).await {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return fail(send, format!("dumping allocation {alloc}: {e}")).await;
            }
        };
        let dump_ms = dump.dump_ms;
        // The frozen container needs no ports: the target takes them (on the
        // same host, too).
        if let Err(e) = oci.release_ports(id).await {
            warn!(%alloc, error = %e, "cannot give up the source's ports");
        }
        let (sent, outcome) = match stage(&dir, &oci.upper_dir(id), staging, early, true).await {
            Ok(_) => stream_dir(send, &dir, started, dump_ms).await,
            Err(why) => (0, Err(why)),
        };
        let sent = sent + early_sent;
        let key = (alloc.clone(), true);
        let pages = Arc::new(AtomicU64::new(0));
        let images = progress("postcopy", sent, started, dump_ms);
        let told = match outcome {
            Ok(()) => {
                lock(&self.page_ends).insert(
                    key.clone(),
                    PageEnd::Server {
                        port,
                        sent: pages.clone(),
                    },
                );
                wire::write_frame(send, &VmSendEvent::Images(images))
                    .await
                    .map_err(|e| format!("the controller's stream broke: {e}"))
            }
            Err(why) => Err(why),
        };
        if let Err(why) = told {
            lock(&self.page_ends).remove(&key);
            oci.abort_lazy(id, dump).await;
            let _ = std::fs::remove_dir_all(&dir);
            let out = fail(send, format!("migrating allocation {alloc} out: {why}")).await;
            self.recover_post_copy_source(oci, id, &dir).await;
            return out;
        }
        info!(%alloc, container = %id, dump_ms, sent, "post-copy: images sent; CRIU serves the pages");
        // The controller's word, read once and for all on its own task: an
        // abort (or a broken stream) while the pages go ends the dump.
        let mut word = tokio::spawn(async move {
            let mut recv = recv;
            let mut scratch = Vec::new();
            control(&mut scratch, &mut recv).await
        });
        let mut heard: Option<Option<VmControl>> = None;
        let group = dump.process_group();
        let finish = oci.finish_lazy(id, dump, PAGES_LIMIT);
        tokio::pin!(finish);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let transferred = |pages: &AtomicU64| sent + pages.load(Ordering::Relaxed);
        let result = loop {
            tokio::select! {
                r = &mut finish => break r,
                _ = tick.tick() => {
                    let mut p = progress("postcopy-active", transferred(&pages), started, dump_ms);
                    p.total = p.transferred;
                    if wire::write_frame(send, &VmSendEvent::Progress(p)).await.is_err() {
                        warn!(%alloc, "the controller's stream broke during the page transfer; giving the dump up");
                        kill_group(group);
                    }
                }
                w = &mut word, if heard.is_none() => {
                    let w = w.ok().flatten();
                    if w != Some(VmControl::Commit) {
                        warn!(%alloc, word = ?w, "the controller gave the migration up during the page transfer");
                        kill_group(group);
                    }
                    heard = Some(w);
                }
            }
        };
        lock(&self.page_ends).remove(&key);
        guard.disarm().await;
        // A post-copy dump holds no pages: it can never be restored here.
        let _ = std::fs::remove_dir_all(&dir);
        let total = transferred(&pages);
        match result {
            Ok(()) => {
                let mut done = progress("completed", total, started, dump_ms);
                done.total = total;
                let _ = wire::write_frame(send, &VmSendEvent::Done(done)).await;
                let w = match heard {
                    Some(w) => w,
                    None => word.await.ok().flatten(),
                };
                match w {
                    Some(VmControl::Commit) => {
                        info!(%alloc, total, "post-copy migration committed; the container left this node")
                    }
                    other => {
                        warn!(%alloc, word = ?other, "every page went to the target, so the container lives only there now")
                    }
                }
                Ok(())
            }
            Err(e) => {
                oci.thaw(id).await;
                let why = format!("the page transfer failed: {e}");
                let _ = wire::write_frame(send, &VmSendEvent::Failed(why.clone())).await;
                self.recover_post_copy_source(oci, id, &dir).await;
                Err(why)
            }
        }
    }

    /// Brings a post-copy source whose migration failed back into service.
    /// CRIU thawed it, but in its old sandbox it answers nothing (seen here;
    /// the network lock that the killed dump left in the sandbox's namespace
    /// is the likely cause): the sandbox is stopped, and a local dump and restore move
    /// the container, memory and all, into a new one (as a stop-copy
    /// rollback does). A container that did not survive starts afresh.
    async fn recover_post_copy_source(&self, oci: &Arc<OciDriver>, id: &str, dir: &Path) {
        let _ = std::fs::remove_dir_all(dir);
        if oci.is_running(id).await {
            if let Err(e) = oci.retire_sandbox(id).await {
                warn!(container = %id, error = %e, "cannot stop the source's sandbox");
            }
            if let Err(e) = oci.checkpoint(id, &dir.join("criu"), false).await {
                warn!(container = %id, error = %e, "cannot dump the thawed source again; it starts afresh");
                let _ = oci.stop(id, Duration::ZERO).await;
                let _ = std::fs::remove_dir_all(dir);
            }
        } else {
            warn!(container = %id, "the container did not survive the failed transfer here; it starts afresh");
        }
        self.resume_oci(oci, id).await;
    }

    /// One end of a post-copy page channel (see
    /// [`VmMigrateRequest::Pages`](novacron_common::wire::VmMigrateRequest::Pages)):
    /// waits for this node's end to be registered, then relays the stream to
    /// and from CRIU, raw, until either side closes.
    pub(super) async fn serve_pages(
        &self,
        r: &PagesRequest,
        send: &mut SendStream,
        mut recv: RecvStream,
    ) -> Result<(), String> {
        let key = (r.alloc_id.clone(), r.source);
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(r.wait_ms).min(MAX_PAGES_WAIT);
        let end = loop {
            if let Some(end) = lock(&self.page_ends).remove(&key) {
                break end;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(format!(
                    "allocation {} has no post-copy {} on node {}",
                    r.alloc_id,
                    if r.source { "page server" } else { "restore" },
                    self.node
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let (tcp, counter, mut done) = match end {
            PageEnd::Server { port, sent } => (
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .map_err(|e| format!("CRIU's page server on port {port}: {e}"))?,
                Some(sent),
                None,
            ),
            PageEnd::Client { listener, done } => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let (tcp, _) =
                    tokio::time::timeout(left.max(Duration::from_secs(5)), listener.accept())
                        .await
                        .map_err(|_| "criu lazy-pages never connected".to_owned())?
                        .map_err(|e| format!("accepting criu lazy-pages: {e}"))?;
                (tcp, None, Some(done))
            }
        };
        let _ = tcp.set_nodelay(true);
        let (mut from_criu, mut to_criu) = tcp.into_split();
        // CRIU's page server takes the end of its connection for a finished
        // transfer (it then removes the container), so an end reaches it only
        // when the daemon got every page: the target finishes its stream
        // then, and resets it otherwise; the source passes on a clean end
        // alone and leaves a reset connection open until the dump is given
        // up (CRIU killed, the container thawed).
        let inward = async {
            let r = tokio::io::copy(&mut recv, &mut to_criu).await;
            if r.is_ok() {
                let _ = to_criu.shutdown().await;
            }
            r
        };
        let outward = async {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total: u64 = 0;
            loop {
                let n = from_criu.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                send.write_all(&buf[..n]).await?;
                total += n as u64;
                if let Some(c) = &counter {
                    c.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
            // The daemon closed: did every page arrive?
            let arrived = match done.as_mut() {
                None => true,
                Some(done) => {
                    tokio::time::timeout(Duration::from_secs(60), done.wait_for(Option::is_some))
                        .await
                        .ok()
                        .and_then(|r| r.ok().and_then(|d| *d))
                        .unwrap_or(false)
                }
            };
            if arrived {
                let _ = send.finish();
            } else {
                let _ = send.reset(quinn::VarInt::from_u32(1));
            }
            Ok::<u64, std::io::Error>(total)
        };
        let (inward, outward) = tokio::join!(inward, outward);
        info!(alloc = %r.alloc_id, source = r.source, received = ?inward.as_ref().ok(), sent = ?outward.as_ref().ok(), "page channel closed");
        Ok(())
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
        // The sandbox starts now, while the source still serves: it holds no
        // port, so the same host is no obstacle, and the restore finds it up.
        let sandbox = Instant::now();
        oci.mounts(&id)
            .await
            .map_err(|e| format!("starting the sandbox of {id}: {e}"))?;
        info!(%alloc, container = %id, sandbox_ms = sandbox.elapsed().as_millis(), "the target's sandbox is up before the freeze");
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
        tokio::task::spawn_blocking(move || {
            let early_dir = from.join(EARLY_DIR);
            if early_dir.exists() {
                let removed: Vec<String> = std::fs::read(from.join(REMOVED))
                    .map_err(|e| e.to_string())
                    .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                    .map_err(|e| format!("the stream's {REMOVED}: {e}"))?;
                early::place_files(&early_dir, &upper, &mounts, &meta.volumes, &removed)
                    .map_err(|e| e.to_string())?;
            }
            apply_files(&from, &upper, &mounts, &meta).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
        let applied_ms = started.elapsed().as_millis();
        if dir.join(POST_COPY).exists() {
            return self.restore_post_copy(&oci, alloc, id, &dir, started).await;
        }
        oci.restore(id, &dir.join("criu"))
            .await
            .map_err(|e| e.to_string())?;
        let _ = std::fs::remove_dir_all(&dir);
        info!(%alloc, container = %id, applied_ms, total_ms = started.elapsed().as_millis(), "runc container restored from its stream");
        Ok(())
    }

    /// The target's post-copy restore: its end of the page channel (a
    /// loopback listener for `criu lazy-pages`) is registered, the container
    /// restored at once, and a watcher waits for the last page: a transfer
    /// that fails stops the container (its memory would be incomplete).
    async fn restore_post_copy(
        &self,
        oci: &Arc<OciDriver>,
        alloc: &str,
        id: &str,
        dir: &Path,
        started: Instant,
    ) -> Result<(), String> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| format!("no loopback port for the page channel: {e}"))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let key = (alloc.to_owned(), false);
        let (done_tx, done) = tokio::sync::watch::channel(None);
        lock(&self.page_ends).insert(key.clone(), PageEnd::Client { listener, done });
        let restored = oci.restore_lazy(id, &dir.join("criu"), port).await;
        let mut daemon = match restored {
            Ok(d) => d,
            Err(e) => {
                lock(&self.page_ends).remove(&key);
                let _ = std::fs::remove_dir_all(dir);
                return Err(e.to_string());
            }
        };
        info!(%alloc, container = %id, restore_ms = started.elapsed().as_millis(), "runc container restored (post-copy); its pages follow");
        let (oci, id, dir, alloc) = (
            oci.clone(),
            id.to_owned(),
            dir.to_path_buf(),
            alloc.to_owned(),
        );
        tokio::spawn(async move {
            let waited = tokio::time::timeout(PAGES_LIMIT, daemon.wait()).await;
            let arrived = matches!(&waited, Ok(Ok(status)) if status.success());
            let _ = done_tx.send(Some(arrived));
            match waited {
                Ok(Ok(status)) if status.success() => {
                    info!(%alloc, container = %id, total_ms = started.elapsed().as_millis(), "post-copy: every page arrived");
                }
                other => {
                    warn!(%alloc, container = %id, outcome = ?other, "post-copy: the pages did not all arrive; stopping the container, whose memory is incomplete");
                    let _ = daemon.start_kill();
                    if let Err(e) = oci.stop(&id, Duration::ZERO).await {
                        warn!(container = %id, error = %e, "cannot stop the container");
                    }
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
        });
        Ok(())
    }
}

/// What the source stages beside its dump.
struct Staging {
    alloc: String,
    image: String,
    volumes: Vec<String>,
    mounts: Vec<(String, PathBuf)>,
}

/// Stages the writable layer and the volumes beside the dump in `dir`: only
/// what changed since the `early` copy, and the paths it had that are gone,
/// with the stream's record (and, for post-copy, its mark); `Ok` is the bytes
/// staged.
async fn stage(
    dir: &Path,
    upper: &Path,
    s: Staging,
    early: Snapshot,
    post_copy: bool,
) -> Result<u64, String> {
    let (dir, upper) = (dir.to_path_buf(), upper.to_path_buf());
    tokio::task::spawn_blocking(move || {
        let Copied {
            bytes,
            deleted,
            removed,
            unchanged,
        } = copy_files(&upper, &s.mounts, &s.volumes, &dir, Some(&early))
            .map_err(|e| e.to_string())?;
        let json = serde_json::to_vec(&removed).map_err(|e| e.to_string())?;
        std::fs::write(dir.join(REMOVED), json).map_err(|e| e.to_string())?;
        info!(alloc = %s.alloc, changed_bytes = bytes, unchanged, removed = removed.len(), "the files' delta since the early copy is staged");
        let meta = BundleMeta {
            format: BUNDLE_FORMAT,
            mode: CheckpointMode::Live,
            alloc: s.alloc,
            job: String::new(),
            image: s.image,
            criu_name: Some("runc".to_owned()),
            deleted,
            volumes: s.volumes,
            created_unix_ms: novacron_common::clock::unix_ms(std::time::SystemTime::now()),
            container: None,
            vm: false,
            runc: true,
            vm_address: None,
        };
        let json = serde_json::to_vec(&meta).map_err(|e| e.to_string())?;
        std::fs::write(dir.join(META), json).map_err(|e| e.to_string())?;
        if post_copy {
            std::fs::write(dir.join(POST_COPY), b"").map_err(|e| e.to_string())?;
        }
        Ok(bytes)
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Sends directory `dir` as one tar in `Data` frames (with `Progress` now and
/// then): the bytes sent, and whether all went.
async fn stream_dir(
    send: &mut SendStream,
    dir: &Path,
    started: Instant,
    dump_ms: u64,
) -> (u64, Result<(), String>) {
    let from = dir.to_path_buf();
    stream_tar(send, started, "active", Some(dump_ms), move |tar| {
        tar.append_dir_all(".", &from).map_err(|e| e.to_string())
    })
    .await
}

/// Sends the writable layer and the volumes while the container serves, as
/// one tar under [`EARLY_DIR`]: what was sent (to compare with after the
/// freeze), and the bytes on the stream.
async fn send_early(
    send: &mut SendStream,
    upper: &Path,
    s: &Staging,
    started: Instant,
) -> Result<(Snapshot, u64), String> {
    let (upper, mounts, targets) = (upper.to_path_buf(), s.mounts.clone(), s.volumes.clone());
    let walk_started = early::now_ns();
    let (sent, out) = stream_tar(send, started, "files", None, move |tar| {
        early::send_files(tar, &upper, &mounts, &targets, walk_started).map_err(|e| e.to_string())
    })
    .await;
    let (snap, bytes) = out.map_err(|why| format!("copying its files before the freeze: {why}"))?;
    info!(alloc = %s.alloc, paths = snap.len(), file_bytes = bytes, sent, ms = started.elapsed().as_millis(), "files sent before the freeze");
    Ok((snap, sent))
}

/// Sends what `fill` writes into a tar in `Data` frames (with `Progress` of
/// `status` now and then): the bytes sent, and what `fill` returned once all
/// went.
async fn stream_tar<T: Send + 'static>(
    send: &mut SendStream,
    started: Instant,
    status: &'static str,
    dump_ms: Option<u64>,
    fill: impl FnOnce(&mut tar::Builder<ChunkWriter>) -> Result<T, String> + Send + 'static,
) -> (u64, Result<T, String>) {
    // A blocking writer cuts the tar into chunks; this task frames them. Each
    // receiver is owned by its reader.
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(8);
    let writer = tokio::task::spawn_blocking(move || -> Result<T, String> {
        let mut tar = tar::Builder::new(ChunkWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        });
        tar.follow_symlinks(false);
        let out = fill(&mut tar)?;
        let mut w = tar.into_inner().map_err(|e| e.to_string())?;
        w.flush().map_err(|e| e.to_string())?;
        Ok(out)
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
            let mut p = progress(status, sent, started, 0);
            p.downtime_ms = dump_ms;
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
        (None, Ok(Ok(out))) => Ok(out),
        (None, Ok(Err(e))) => Err(format!("writing the stream: {e}")),
        (None, Err(why)) => Err(why),
    };
    (sent, outcome)
}

/// One end of a post-copy page channel, registered until the controller's
/// [`PagesRequest`] stream takes it.
#[derive(Debug)]
pub(super) enum PageEnd {
    /// The source's CRIU page server (loopback), and the bytes of pages sent
    /// through the channel so far.
    Server { port: u16, sent: Arc<AtomicU64> },
    /// The target's listener, which its `criu lazy-pages` connects to, and
    /// the daemon's outcome once it ended (every page arrived, or not).
    Client {
        listener: tokio::net::TcpListener,
        done: tokio::sync::watch::Receiver<Option<bool>>,
    },
}

/// Tells the controller the migration failed (and why).
async fn fail(send: &mut SendStream, why: String) -> Result<(), String> {
    let _ = wire::write_frame(send, &VmSendEvent::Failed(why.clone())).await;
    Err(why)
}

/// A loopback port free now (for CRIU's page server, which takes a number).
fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port for the page server: {e}"))
}

/// Kills a post-copy dump's runc and CRIU: the transfer then fails and the
/// container is thawed.
fn kill_group(group: Option<u32>) {
    if let Some(pid) = group.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
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
    // The early copy and the dump come as two tars, one after the other.
    archive.set_ignore_zeros(true);
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

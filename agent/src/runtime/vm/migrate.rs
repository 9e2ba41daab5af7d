//! Live migration of a VM with QEMU's own pre-copy, as the agent drives it.
//!
//! - **Source** ([`VmDriver::send_migration`]): QEMU migrates into a Unix socket
//!   of the agent's (`out.sock` in the VM's directory); the agent reads what QEMU
//!   writes and hands it on in pieces of at most [`VM_MIGRATE_CHUNK`], and asks
//!   `query-migrate` every [`POLL`] how it goes. [`next_step`] decides, from that
//!   answer and the time, whether to wait, to pause a guest that does not
//!   converge, or to give up.
//! - **Target** ([`VmDriver::start_incoming`]): QEMU starts with `-incoming` on
//!   `in.sock` and waits; the agent writes the stream into it
//!   ([`VmDriver::receive_migration`]), and the VM runs once QEMU has loaded it
//!   ([`VmDriver::await_incoming`]).
//! - **Rollback** ([`VmDriver::resume_after_abort`]): a migration in progress is
//!   cancelled and a paused source resumed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use novacron_common::wire::{VM_MIGRATE_CHUNK, VmMigrationProgress, VmSendRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{VmDriver, qmp};

/// How often the source asks QEMU how the migration goes (the end is seen
/// at the next question, so the switch-over waits up to this long).
pub const POLL: Duration = Duration::from_millis(100);

/// Reads QEMU's migration stream until it ends, handing each piece on; the
/// bytes read.
async fn pump(
    mut conn: tokio::net::UnixStream,
    data: mpsc::Sender<Vec<u8>>,
) -> Result<u64, String> {
    let mut buf = vec![0u8; VM_MIGRATE_CHUNK];
    let mut total = 0u64;
    loop {
        match conn.read(&mut buf).await {
            Ok(0) => return Ok(total),
            Ok(n) => {
                total += n as u64;
                if data.send(buf[..n].to_vec()).await.is_err() {
                    return Err("the migration stream to the controller ended".to_owned());
                }
            }
            Err(e) => return Err(format!("reading qemu's migration stream: {e}")),
        }
    }
}

/// Runs `qemu-img ARGS PATH` (at most 60 s); its standard output.
async fn qemu_img(args: &[&str], path: &Path) -> Result<String, String> {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("qemu-img")
            .args(args)
            .arg(path)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| format!("qemu-img {} did not finish within 60 s", args[0]))?
    .map_err(|e| format!("qemu-img: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "qemu-img {}: {}",
            args[0],
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How long QEMU may take to connect to the source's socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the source does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Let QEMU go on.
    Wait,
    /// Pause the guest so that the copy ends: it did not converge within
    /// `converge_ms`.
    Pause,
    /// Give up (the reason).
    Cancel(String),
    /// QEMU finished: completed.
    Completed,
    /// QEMU finished: failed or cancelled (its reason).
    Failed(String),
}

/// Decides the source's next step from QEMU's progress and the time since the
/// migration began. Pure.
pub fn next_step(
    progress: &VmMigrationProgress,
    error: Option<&str>,
    elapsed: Duration,
    request: &VmSendRequest,
) -> Step {
    match progress.status.as_str() {
        "completed" => return Step::Completed,
        "failed" | "cancelled" | "cancelling" => {
            return Step::Failed(error.map_or_else(
                || format!("qemu says the migration is {}", progress.status),
                |e| format!("qemu: {e}"),
            ));
        }
        _ => {}
    }
    let ms = elapsed.as_millis() as u64;
    if ms >= request.limit_ms {
        return Step::Cancel(format!(
            "the migration did not finish within {} s ({} of {} MiB sent, {} rounds)",
            request.limit_ms / 1000,
            progress.transferred >> 20,
            progress.total >> 20,
            progress.rounds
        ));
    }
    if ms >= request.converge_ms && !progress.forced_pause {
        return Step::Pause;
    }
    Step::Wait
}

/// QEMU's `query-migrate` answer as progress (absent fields are 0), with its
/// `error-desc` when it failed. Pure.
pub fn parse_progress(v: &serde_json::Value) -> (VmMigrationProgress, Option<String>) {
    let n = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    let ram = v.get("ram").cloned().unwrap_or_default();
    let progress = VmMigrationProgress {
        status: v
            .get("status")
            .and_then(|s| s.as_str())
            .unwrap_or("none")
            .to_owned(),
        transferred: n(&ram, "transferred"),
        remaining: n(&ram, "remaining"),
        total: n(&ram, "total"),
        rounds: n(&ram, "dirty-sync-count"),
        dirty_pages_rate: n(&ram, "dirty-pages-rate"),
        elapsed_ms: n(v, "total-time"),
        downtime_ms: v.get("downtime").and_then(|d| d.as_u64()),
        forced_pause: false,
        downtime_limit_ms: 0,
    };
    let error = v
        .get("error-desc")
        .and_then(|e| e.as_str())
        .map(str::to_owned);
    (progress, error)
}

impl VmDriver {
    /// The socket a VM waiting for its state listens on.
    fn incoming_socket(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("in.sock")
    }

    /// The VM of allocation `alloc` on this node, if any.
    pub fn vm_of_alloc(&self, alloc: &str) -> Option<String> {
        self.ids().into_iter().find(|id| {
            self.read_meta(id).is_ok_and(|m| {
                m.labels.get(super::super::LABEL_ALLOC).map(String::as_str) == Some(alloc)
            })
        })
    }

    /// VM `id`'s address on the node's VM bridge, when it is a bridged guest.
    pub fn bridged_address(&self, id: &str) -> Option<std::net::Ipv4Addr> {
        let meta = self.read_meta(id).ok()?;
        (meta.vm.network == novacron_common::wire::VmNetwork::Bridge).then_some(meta.address)
    }

    /// VM `id`'s own disk (its copy-on-write overlay), if it has one.
    pub fn disk(&self, id: &str) -> Option<PathBuf> {
        self.read_meta(id).ok()?.disk
    }

    /// Whether this QEMU can carry a VM's own disk in its migration stream
    /// (`blk`, removed in QEMU 9.1), or why not.
    pub fn block_migration(&self) -> Result<(), String> {
        let mut parts = self
            .version
            .split('.')
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if (major, minor) >= (9, 1) {
            return Err(format!(
                "QEMU {} has no block migration (removed in 9.1); a VM with a disk of its own migrates only with an older QEMU",
                self.version
            ));
        }
        Ok(())
    }

    /// Puts the disk of a snapshot (`from`, a qcow2 overlay made on another
    /// node) in place of VM `id`'s created, never started, overlay, pointed at
    /// this node's copy of the same base disk. `from` comes from a peer: it
    /// must be a plain qcow2 image (no external data file), and its backing
    /// file is rewritten before QEMU opens it.
    pub async fn adopt_disk(&self, id: &str, from: &Path) -> Result<(), String> {
        let meta = self.read_meta(id).map_err(|e| e.to_string())?;
        let (Some(overlay), Some(base)) = (meta.disk.clone(), meta.vm.disk.clone()) else {
            return Err("the snapshot has a disk and this virtual machine has none".to_owned());
        };
        let base = self
            .image_dir(&meta.image_id)
            .join(base.trim_start_matches('/'));
        let info = qemu_img(&["info", "-f", "qcow2", "--output=json"], from).await?;
        let info: serde_json::Value =
            serde_json::from_str(&info).map_err(|e| format!("qemu-img info: {e}"))?;
        if info["format"] != "qcow2" || !info["format-specific"]["data"]["data-file"].is_null() {
            return Err("the snapshot's disk is not a plain qcow2 overlay".to_owned());
        }
        let staged = overlay.with_extension("incoming");
        tokio::fs::copy(from, &staged)
            .await
            .map_err(|e| format!("{}: {e}", staged.display()))?;
        let format = if base.extension().is_some_and(|e| e == "qcow2") {
            "qcow2"
        } else {
            "raw"
        };
        let base_text = base.to_string_lossy().into_owned();
        qemu_img(
            &[
                "rebase", "-u", "-f", "qcow2", "-F", format, "-b", &base_text,
            ],
            &staged,
        )
        .await?;
        tokio::fs::rename(&staged, &overlay)
            .await
            .map_err(|e| format!("{}: {e}", overlay.display()))
    }

    /// Starts a created VM waiting for its state from a live migration.
    pub async fn start_incoming(&self, id: &str) -> Result<(), super::RuntimeError> {
        let sock = self.incoming_socket(id);
        let _ = std::fs::remove_file(&sock);
        self.launch(id, Some(&sock)).await
    }

    /// Waits until VM `id` listens for its state: its QEMU lives and its
    /// socket accepts. The connection, to write the stream into.
    pub async fn incoming_connection(
        &self,
        id: &str,
        wait: Duration,
    ) -> Result<tokio::net::UnixStream, String> {
        let deadline = Instant::now() + wait;
        let sock = self.incoming_socket(id);
        loop {
            if self.pid(id).is_some()
                && let Ok(conn) = tokio::net::UnixStream::connect(&sock).await
            {
                return Ok(conn);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "virtual machine {id} was not waiting for its state within {} s",
                    wait.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Writes the stream `from` into VM `id`'s waiting QEMU through `conn`;
    /// the bytes written.
    pub async fn receive_migration<R: tokio::io::AsyncRead + Unpin>(
        &self,
        id: &str,
        from: &mut R,
        mut conn: tokio::net::UnixStream,
    ) -> Result<u64, String> {
        // Large reads: tokio's copy moves 8 KiB at a time, a system call each.
        let mut from = tokio::io::BufReader::with_capacity(VM_MIGRATE_CHUNK, from);
        let copied = tokio::io::copy_buf(&mut from, &mut conn)
            .await
            .map_err(|e| format!("writing the migration stream into {id}: {e}"))?;
        conn.shutdown()
            .await
            .map_err(|e| format!("ending the migration stream of {id}: {e}"))?;
        Ok(copied)
    }

    /// Waits until VM `id`, started with [`VmDriver::start_incoming`], has
    /// loaded its state and runs; `still_wanted` is asked now and then (a
    /// migration given up elsewhere ends the wait).
    pub async fn await_incoming(
        &self,
        id: &str,
        limit: Duration,
        still_wanted: impl Fn() -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let sock = self.vm_dir(id).join("qmp.sock");
        loop {
            if self.pid(id).is_none() {
                let serial = std::fs::read_to_string(self.vm_dir(id).join("serial.run.log"))
                    .unwrap_or_default();
                let tail: String = serial.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
                return Err(format!(
                    "qemu ended before the migration's state was loaded{}",
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!(" (console: {tail})")
                    }
                ));
            }
            match qmp::status(&sock).await.as_deref() {
                Ok("running") => return Ok(()),
                Ok("inmigrate") | Ok("prelaunch") | Err(_) => {}
                Ok(other) => {
                    return Err(format!(
                        "after the migration the virtual machine is {other}, not running"
                    ));
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "the migration's state did not arrive within {} s",
                    limit.as_secs()
                ));
            }
            if !still_wanted() {
                return Err("the allocation left this node during the migration".to_owned());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Migrates VM `id` out: QEMU writes into a socket of ours, and each piece
    /// read goes to `data`; `progress` hears how it goes. The final progress
    /// when QEMU completed (the guest is then paused), or why not (the guest
    /// may be paused; [`VmDriver::resume_after_abort`] resumes it).
    pub async fn send_migration(
        &self,
        id: &str,
        request: &VmSendRequest,
        data: mpsc::Sender<Vec<u8>>,
        progress: impl Fn(&VmMigrationProgress),
    ) -> Result<VmMigrationProgress, String> {
        if self.pid(id).is_none() {
            return Err(format!("virtual machine {id} is not running"));
        }
        let dir = self.vm_dir(id);
        let qmp_sock = dir.join("qmp.sock");
        let out = dir.join("out.sock");
        let _ = std::fs::remove_file(&out);
        let listener =
            tokio::net::UnixListener::bind(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        let result = self
            .send_through(id, &qmp_sock, &out, listener, request, data, progress)
            .await;
        let _ = std::fs::remove_file(&out);
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_through(
        &self,
        id: &str,
        qmp_sock: &Path,
        out: &Path,
        listener: tokio::net::UnixListener,
        request: &VmSendRequest,
        data: mpsc::Sender<Vec<u8>>,
        progress: impl Fn(&VmMigrationProgress),
    ) -> Result<VmMigrationProgress, String> {
        let qmp_err = |what: &str, e: std::io::Error| format!("qmp {what}: {e}");
        qmp::prepare_migration(qmp_sock, request.downtime_limit_ms)
            .await
            .map_err(|e| qmp_err("migrate-set-parameters", e))?;
        let started = Instant::now();
        // A disk of its own travels in the stream too: only what the overlay
        // holds (`inc`), since the base is the same image on both nodes.
        let block = request.with_disk && self.disk(id).is_some();
        qmp::migrate(qmp_sock, &format!("unix:{}", out.display()), block)
            .await
            .map_err(|e| qmp_err("migrate", e))?;
        let (conn, _) = tokio::time::timeout(CONNECT_TIMEOUT, listener.accept())
            .await
            .map_err(|_| "qemu did not connect to the migration socket".to_owned())?
            .map_err(|e| format!("accepting qemu's migration stream: {e}"))?;
        info!(vm = %id, "migration: qemu sends");
        // The socket is read without pause, apart from the QMP questions: at
        // the end QEMU writes the last pages holding its main lock, so a
        // reader waiting for QMP would wait for itself.
        let pump = pump(conn, data);
        let watch = self.watch(id, qmp_sock, started, request, progress);
        tokio::pin!(pump, watch);
        let mut pumped = None;
        let mut watched = None;
        while pumped.is_none() || watched.is_none() {
            tokio::select! {
                r = &mut pump, if pumped.is_none() => {
                    if let Err(e) = &r {
                        let _ = qmp::migrate_cancel(qmp_sock).await;
                        return Err(e.clone());
                    }
                    pumped = Some(r);
                }
                r = &mut watch, if watched.is_none() => {
                    if let Err(e) = &r {
                        let _ = qmp::migrate_cancel(qmp_sock).await;
                        return Err(e.clone());
                    }
                    watched = Some(r);
                }
                _ = tokio::time::sleep(CONNECT_TIMEOUT), if watched.is_some() => {
                    return Err("qemu completed but its migration stream did not end".to_owned());
                }
            }
        }
        let (last, forced_pause) = watched.unwrap_or_else(|| Err(String::new()))?;
        // QEMU's final word, with its downtime.
        let done = match qmp::query_migrate(qmp_sock).await {
            Ok(answer) => parse_progress(&answer).0,
            Err(_) => last.clone(),
        };
        let mut done = if done.status == "completed" {
            done
        } else {
            last
        };
        done.forced_pause = forced_pause;
        done.downtime_limit_ms = request.downtime_limit_ms;
        Ok(done)
    }

    /// Follows QEMU's progress until it completes: pauses a guest that does
    /// not converge in time and gives up past the limit. The last progress
    /// seen, and whether the guest was paused early.
    async fn watch(
        &self,
        id: &str,
        qmp_sock: &Path,
        started: Instant,
        request: &VmSendRequest,
        progress: impl Fn(&VmMigrationProgress),
    ) -> Result<(VmMigrationProgress, bool), String> {
        let mut forced_pause = false;
        let mut poll = tokio::time::interval(POLL);
        loop {
            poll.tick().await;
            // A monitor that does not answer in time (QEMU busy) is asked again
            // at the next tick; the limit still holds.
            let (mut p, error) = match qmp::query_migrate(qmp_sock).await {
                Ok(answer) => parse_progress(&answer),
                Err(e) => {
                    warn!(vm = %id, error = %e, "query-migrate did not answer");
                    let p = VmMigrationProgress {
                        status: "active".to_owned(),
                        ..Default::default()
                    };
                    (p, None)
                }
            };
            p.forced_pause = forced_pause;
            p.downtime_limit_ms = request.downtime_limit_ms;
            match next_step(&p, error.as_deref(), started.elapsed(), request) {
                Step::Wait => progress(&p),
                Step::Completed => return Ok((p, forced_pause)),
                Step::Failed(why) => return Err(why),
                Step::Pause => {
                    warn!(vm = %id, rounds = p.rounds, "migration does not converge; pausing the guest");
                    qmp::stop(qmp_sock)
                        .await
                        .map_err(|e| format!("qmp stop: {e}"))?;
                    forced_pause = true;
                    p.forced_pause = true;
                    progress(&p);
                }
                Step::Cancel(why) => return Err(why),
            }
        }
    }

    /// Cancels VM `id`'s outgoing migration if it is in progress, and resumes
    /// the guest if it is paused (by the migration's end or by the agent).
    pub async fn resume_after_abort(&self, id: &str) -> Result<(), String> {
        let sock = self.vm_dir(id).join("qmp.sock");
        if self.pid(id).is_none() {
            return Err(format!("virtual machine {id} is not running"));
        }
        if let Ok(answer) = qmp::query_migrate(&sock).await {
            let (p, _) = parse_progress(&answer);
            if matches!(
                p.status.as_str(),
                "setup" | "active" | "pre-switchover" | "device" | "wait-unplug"
            ) {
                let _ = qmp::migrate_cancel(&sock).await;
                for _ in 0..50 {
                    let still = qmp::query_migrate(&sock)
                        .await
                        .map(|a| parse_progress(&a).0.status)
                        .unwrap_or_default();
                    if !matches!(still.as_str(), "active" | "cancelling" | "device" | "setup") {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        self.resume(id).await
    }

    /// Resumes VM `id`'s guest if it is paused (after a migration into a
    /// snapshot, or one given up).
    pub async fn resume(&self, id: &str) -> Result<(), String> {
        if self.read_meta(id).is_ok_and(|m| m.suspended) {
            // Suspended by the operator: a snapshot's end leaves it asleep.
            info!(vm = %id, "the guest stays suspended after its snapshot");
            return Ok(());
        }
        let sock = self.vm_dir(id).join("qmp.sock");
        match qmp::status(&sock).await.as_deref() {
            // Paused by a migration (its end, or the agent's pause of a guest
            // that did not converge); other states are not a migration's.
            Ok("paused") | Ok("postmigrate") => {
                qmp::cont(&sock)
                    .await
                    .map_err(|e| format!("qmp cont: {e}"))?;
                info!(vm = %id, "the guest runs again");
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => Err(format!("qmp query-status: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> VmSendRequest {
        VmSendRequest {
            protocol_version: 3,
            alloc_id: "a".into(),
            with_disk: false,
            hold_ms: 600_000,
            downtime_limit_ms: 300,
            converge_ms: 60_000,
            limit_ms: 120_000,
        }
    }

    /// QEMU 7.2's answer while active, as seen on this project's machines.
    const ACTIVE: &str = r#"{"expected-downtime": 300, "status": "active", "setup-time": 3,
        "total-time": 1513, "ram": {"total": 268763136, "postcopy-requests": 0,
        "dirty-sync-count": 2, "multifd-bytes": 0, "pages-per-second": 24000,
        "downtime-bytes": 0, "page-size": 4096, "remaining": 1232896,
        "postcopy-bytes": 0, "mbps": 800.4, "transferred": 64000000,
        "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 64000000,
        "duplicate": 50000, "dirty-pages-rate": 120, "skipped": 0,
        "normal-bytes": 60000000, "normal": 14648}}"#;

    #[test]
    fn progress_is_read_from_query_migrate() {
        let v: serde_json::Value = serde_json::from_str(ACTIVE).expect("json");
        let (p, error) = parse_progress(&v);
        assert_eq!(error, None);
        assert_eq!(p.status, "active");
        assert_eq!(
            (p.transferred, p.remaining, p.total, p.rounds),
            (64_000_000, 1_232_896, 268_763_136, 2)
        );
        assert_eq!(
            (p.dirty_pages_rate, p.elapsed_ms, p.downtime_ms),
            (120, 1513, None)
        );
        let done: serde_json::Value =
            serde_json::from_str(r#"{"status": "completed", "downtime": 41, "total-time": 2200}"#)
                .expect("json");
        let (p, _) = parse_progress(&done);
        assert_eq!((p.status.as_str(), p.downtime_ms), ("completed", Some(41)));
        let failed: serde_json::Value = serde_json::from_str(
            r#"{"status": "failed", "error-desc": "Unable to write to socket"}"#,
        )
        .expect("json");
        let (p, error) = parse_progress(&failed);
        assert_eq!(
            next_step(&p, error.as_deref(), Duration::ZERO, &request()),
            Step::Failed("qemu: Unable to write to socket".into())
        );
        // Nothing at all: not started, so wait.
        let (p, _) = parse_progress(&serde_json::json!({}));
        assert_eq!(p.status, "none");
    }

    #[test]
    fn a_guest_that_does_not_converge_is_paused_then_given_up() {
        let r = request();
        let mut p = VmMigrationProgress {
            status: "active".into(),
            ..Default::default()
        };
        assert_eq!(next_step(&p, None, Duration::from_secs(10), &r), Step::Wait);
        assert_eq!(
            next_step(&p, None, Duration::from_secs(60), &r),
            Step::Pause
        );
        // Paused once; not again.
        p.forced_pause = true;
        assert_eq!(next_step(&p, None, Duration::from_secs(90), &r), Step::Wait);
        match next_step(&p, None, Duration::from_secs(120), &r) {
            Step::Cancel(why) => assert!(why.contains("120 s"), "{why}"),
            other => panic!("{other:?}"),
        }
        // A completed migration is completed whatever the time.
        p.status = "completed".into();
        assert_eq!(
            next_step(&p, None, Duration::from_secs(500), &r),
            Step::Completed
        );
    }
}

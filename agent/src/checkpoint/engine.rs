//! Driving Docker and CRIU: [`Checkpointer::checkpoint`] and
//! [`Checkpointer::checkpoint_running`] halt a container, dump it and copy its
//! files into a stage directory that [`super::bundle`] packs;
//! [`Checkpointer::restore`] fills a created container from an unpacked bundle and
//! starts it. Docker is reached only through the runtime's adapter
//! ([`crate::runtime::docker::checkpoint`]); every call carries a timeout.

use std::fmt::Display;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use novacron_common::checkpoint::{
    BUNDLE_FORMAT, BundleInfo, BundleMeta, CheckpointMode, MAX_BUNDLE_BYTES,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::OnceCell;
use tracing::{debug, info, warn};

use super::bundle::{Budget, CHUNK, CRIU_DIR, META_FILE, ROOTFS_TAR, VOLUMES_DIR, pack, unpack};
use super::cache::ensure_space;
use super::rootfs::{
    container_path, merge_rootfs, plan_rootfs, remove_deleted, tar_has_members, volume_tar,
};
use super::{
    CALL_TIMEOUT, CheckpointError, Checkpointer, DUMP_TIMEOUT, LIVE_PROBE_TIMEOUT,
    PROBE_CALL_TIMEOUT, TRANSFER_TIMEOUT, blocking, mkdir, now_ms,
};
use crate::runtime::docker::checkpoint::{CheckpointDocker, Endpoint};
use crate::runtime::docker::sandbox::pause_program;
use crate::runtime::docker::version::DEFAULT_DOCKER_HOST;

impl Checkpointer {
    /// A checkpointer for `docker_host` (`unix:///path`, a socket path,
    /// `tcp://HOST:PORT`; `None` is [`DEFAULT_DOCKER_HOST`]) keeping bundles in
    /// `cache_dir` (created when missing). Makes no call to the daemon (the first
    /// call that needs it connects and agrees on the API version).
    pub fn new(docker_host: Option<&str>, cache_dir: PathBuf) -> Result<Self, CheckpointError> {
        let host = docker_host.unwrap_or(DEFAULT_DOCKER_HOST);
        let endpoint = Endpoint::parse(host).ok_or_else(|| CheckpointError::Host {
            host: host.to_owned(),
        })?;
        std::fs::create_dir_all(&cache_dir).map_err(|source| CheckpointError::Io {
            what: "creating the checkpoint cache",
            path: cache_dir.clone(),
            source,
        })?;
        Ok(Checkpointer {
            host: host.to_owned(),
            endpoint,
            negotiated: OnceCell::new(),
            cache_dir,
            max_bytes: MAX_BUNDLE_BYTES,
            index_lock: std::sync::Mutex::new(()),
        })
    }

    /// Lowers the bundle size limit (compressed and decompressed) below
    /// [`MAX_BUNDLE_BYTES`]; a larger value is clamped to it.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes.min(MAX_BUNDLE_BYTES);
        self
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// Whether live checkpoints work here, found out by doing one: a throwaway
    /// container ([`PROBE_REPO`], a program that only waits, imported from this
    /// binary; no registry needed) is checkpointed through the daemon, its CRIU
    /// image is read from the daemon's checkpoint directory and written into that of
    /// a second, created container (as [`Checkpointer::checkpoint`] and
    /// [`Checkpointer::restore`] do), which is started from it. So it exercises, under this process's own
    /// user, capabilities and sandbox, every access the live path performs: the
    /// daemon's experimental API, its CRIU (dump and restore, the kernel, runc's
    /// settings) and the daemon's data root. The steps take at most
    /// [`LIVE_PROBE_TIMEOUT`]; the container and image are removed afterwards.
    ///
    /// The error says which step failed, the daemon's or the system's words, and
    /// what to do. A missing [`RUNC_CRIU_CONF`] option is logged, not an error: only
    /// containers holding connections need it.
    pub async fn probe_live(&self) -> Result<(), String> {
        let docker = self
            .docker()
            .await
            .map_err(|e| format!("cannot reach the Docker daemon at {}: {e}", self.host))?;
        let info = timed("info", &self.host, CALL_TIMEOUT, docker.info())
            .await
            .map_err(|e| e.to_string())?;
        if !info.experimental {
            return Err(format!(
                "the Docker daemon at {} runs without experimental features; start dockerd with --experimental (or \"experimental\": true in daemon.json) and install criu 4 or newer",
                self.host
            ));
        }
        let arch = std::env::consts::ARCH;
        let program = pause_program(arch).ok_or_else(|| {
            format!("the live checkpoint probe has no test program for {arch}; live checkpoints are untested here")
        })?;
        if let Some(missing) =
            runc_criu_options_missing(&std::fs::read_to_string(RUNC_CRIU_CONF).unwrap_or_default())
        {
            warn!(
                file = RUNC_CRIU_CONF,
                missing = %missing.join(", "),
                "live checkpoints of containers that serve connections fail without these CRIU options (runc reads them from this file); add one per line"
            );
        }
        let root = self.root_dir(&docker).await.map_err(|e| e.to_string())?;
        let tag = format!("{}-{}", std::process::id(), now_ms());
        let image = format!("{PROBE_REPO}:{tag}");
        let rootfs =
            probe_rootfs(&program).map_err(|e| format!("building the probe image: {e}"))?;
        let import = docker.import_image(PROBE_REPO, &tag, rootfs.into(), &[PROBE_ENTRYPOINT]);
        timed("image import", &image, PROBE_CALL_TIMEOUT, import)
            .await
            .map_err(|e| format!("live checkpoint probe: {e}"))?;
        let name = format!("novacron-live-probe-{tag}");
        let mut created = Vec::new();
        let outcome = tokio::time::timeout(
            LIVE_PROBE_TIMEOUT,
            self.probe_steps(&docker, &image, &name, &root, &mut created),
        )
        .await
        .unwrap_or_else(|_| {
            Err(CheckpointError::Timeout {
                op: "live checkpoint probe",
                target: name.clone(),
                after: LIVE_PROBE_TIMEOUT,
            })
        });
        for id in &created {
            let removed = timed(
                "remove",
                id,
                PROBE_CALL_TIMEOUT,
                docker.remove_container(id),
            )
            .await;
            if let Err(e) = removed {
                warn!(container = %id, error = %e, "could not remove the live checkpoint probe's container");
            }
        }
        if let Err(e) = timed(
            "image remove",
            &image,
            PROBE_CALL_TIMEOUT,
            docker.remove_image(&image),
        )
        .await
        {
            warn!(%image, error = %e, "could not remove the live checkpoint probe's image");
        }
        outcome.map_err(|e| {
            let hint = match &e {
                CheckpointError::Io { .. } => {
                    "; the agent reads and writes CRIU images under the daemon's data root: run it as root on the daemon's host, with that directory writable (the packaged unit does, for /var/lib/docker)"
                }
                _ => "",
            };
            format!("live checkpoint probe: {e}{hint}")
        })
    }

    async fn probe_steps(
        &self,
        docker: &CheckpointDocker,
        image: &str,
        name: &str,
        root: &Path,
        created: &mut Vec<String>,
    ) -> Result<(), CheckpointError> {
        let id = timed(
            "create",
            name,
            CALL_TIMEOUT,
            docker.create_isolated(name, image),
        )
        .await?;
        created.push(id.clone());
        timed("start", &id, CALL_TIMEOUT, docker.start(&id)).await?;
        self.dump(docker, &id, PROBE_CHECKPOINT, true).await?;
        self.wait_stopped(docker, &id).await?;
        let checkpoints = root.join("containers").join(&id).join("checkpoints");
        let stage = self.temp_dir(".probe-")?;
        let (src, copy) = (
            checkpoints.join(PROBE_CHECKPOINT),
            stage.path().join(CRIU_DIR),
        );
        let limit = self.max_bytes;
        let read = blocking(move || copy_dir(&src, &copy, limit)).await?;
        if read == 0 {
            return Err(CheckpointError::Daemon {
                op: "checkpoint",
                target: id,
                message: format!(
                    "the daemon reported success but {} holds no CRIU image",
                    checkpoints.join(PROBE_CHECKPOINT).display()
                ),
            });
        }
        // As a migration's restore does: into a second container created from the
        // same image, never started, under the same checkpoint name.
        let restored_name = format!("{name}-restored");
        let create = docker.create_isolated(&restored_name, image);
        let restored = timed("create", &restored_name, CALL_TIMEOUT, create).await?;
        created.push(restored.clone());
        let dst = root
            .join("containers")
            .join(&restored)
            .join("checkpoints")
            .join(PROBE_CHECKPOINT);
        let src = stage.path().join(CRIU_DIR);
        let target = restored.clone();
        blocking(move || copy_checkpoint_in(&src, &dst, &target, limit)).await?;
        let start = docker.start_from_checkpoint(&restored, PROBE_CHECKPOINT);
        timed("start from checkpoint", &restored, DUMP_TIMEOUT, start).await?;
        let inspect = docker.inspect(&restored, false);
        let inspect = timed("inspect", &restored, CALL_TIMEOUT, inspect).await?;
        if !inspect.running {
            return Err(CheckpointError::State {
                container: restored,
                state: inspect.state.clone(),
                expected: "the probe's restored container runs",
            });
        }
        debug!(container = %id, bytes = read, "live checkpoint probe: dump, copy and restore worked");
        Ok(())
    }

    /// Checkpoints `container_id` in `mode` ([`CheckpointMode::Live`] or
    /// [`CheckpointMode::Fs`]) into a cached bundle, stopping it: the step before a
    /// migration.
    ///
    /// Live: a CRIU dump that stops the container. Fs: the container is stopped
    /// (`stop_grace` before it is killed). Then the CRIU image, the rootfs diff and
    /// each of `volume_targets` are copied and packed. Once stopped, the container
    /// stays stopped, also on error (a failed dump or stop can leave it running). `dump_ms` runs from the stop or dump request until the state
    /// is captured (CRIU image and file copies; compression not included).
    #[allow(clippy::too_many_arguments)]
    pub async fn checkpoint(
        &self,
        container_id: &str,
        alloc: &str,
        job: &str,
        node: &str,
        mode: CheckpointMode,
        volume_targets: &[String],
        stop_grace: Duration,
    ) -> Result<BundleInfo, CheckpointError> {
        let halt = Halt::Stop(stop_grace);
        self.take(container_id, alloc, job, node, mode, volume_targets, halt)
            .await
    }

    /// Checkpoints the running `container_id` and lets it go on: the periodic
    /// checkpoint. The container is paused (cgroup freezer) while the CRIU image
    /// (live, `--leave-running`) and the file copies are taken, so they agree, and
    /// unpaused afterwards, also on error. `dump_ms` is the time it was paused.
    pub async fn checkpoint_running(
        &self,
        container_id: &str,
        alloc: &str,
        job: &str,
        node: &str,
        mode: CheckpointMode,
        volume_targets: &[String],
    ) -> Result<BundleInfo, CheckpointError> {
        self.take(
            container_id,
            alloc,
            job,
            node,
            mode,
            volume_targets,
            Halt::Pause,
        )
        .await
    }

    /// Restores the cached bundle `digest` into `new_id`, a container created (not
    /// started) from the bundle's image with the caller's config, and starts it:
    /// from the CRIU image in live mode, normally in fs mode. Verifies the digest
    /// and checks the whole bundle before anything is changed; an error after that
    /// can leave `new_id` partly filled, so the caller removes it.
    ///
    /// Deleted paths are replayed as overlay whiteouts (overlay2 only; on other
    /// storage drivers they are logged and left in place).
    pub async fn restore(
        &self,
        digest: &str,
        new_id: &str,
    ) -> Result<CheckpointMode, CheckpointError> {
        let size = self.verify(digest).await?;
        // Unpacked, a bundle is at least as large as compressed.
        ensure_space(&self.cache_dir, size)?;
        let docker = self.docker().await?;
        let inspect = timed(
            "inspect",
            new_id,
            CALL_TIMEOUT,
            docker.inspect(new_id, false),
        )
        .await?;
        let id = inspect.id.clone().unwrap_or_else(|| new_id.to_owned());
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(CheckpointError::Daemon {
                op: "inspect",
                target: new_id.to_owned(),
                message: format!("the daemon answered container id {id:?}; expected hex digits"),
            });
        }
        if !inspect.created {
            return Err(CheckpointError::State {
                container: id,
                state: inspect.state.clone(),
                expected: "restore needs a container that was created and never started",
            });
        }

        let stage = self.temp_dir(".restore-")?;
        let bundle = self.bundle_path(digest)?;
        let dest = stage.path().to_path_buf();
        let limit = self.max_bytes;
        let started = Instant::now();
        let meta = blocking(move || unpack(&bundle, &dest, limit)).await?;
        let unpacked_ms = started.elapsed().as_millis();
        if meta.runc && meta.mode == CheckpointMode::Live {
            return Err(CheckpointError::BadBundle {
                bundle: digest.to_owned(),
                reason: "its CRIU image was made by runc from an agent-owned container and restores only into one; this node runs its containers under Docker (restore it on a node with container_runtime runc, or take a filesystem checkpoint)".to_owned(),
            });
        }

        let rootfs = stage.path().join(ROOTFS_TAR);
        if tar_has_members(&rootfs)? {
            self.upload(&docker, &id, "/", &rootfs).await?;
        }
        if !meta.deleted.is_empty() {
            remove_deleted(&inspect, &meta.deleted)?;
        }
        for (n, target) in meta.volumes.iter().enumerate() {
            let tar = stage.path().join(VOLUMES_DIR).join(format!("{n}.tar"));
            if tar_has_members(&tar)? {
                self.upload(&docker, &id, target, &tar).await?;
            }
        }
        let copied_ms = started.elapsed().as_millis();
        match (&meta.mode, &meta.criu_name) {
            (CheckpointMode::Live, Some(name)) => {
                let root = self.root_dir(&docker).await?;
                let dst = root
                    .join("containers")
                    .join(&id)
                    .join("checkpoints")
                    .join(name);
                let src = stage.path().join(CRIU_DIR);
                let target = id.clone();
                blocking(move || copy_checkpoint_in(&src, &dst, &target, limit)).await?;
                timed(
                    "start from checkpoint",
                    &id,
                    DUMP_TIMEOUT,
                    docker.start_from_checkpoint(&id, name),
                )
                .await?;
            }
            _ => {
                timed("start", &id, CALL_TIMEOUT, docker.start(&id)).await?;
            }
        }
        info!(container = %id, digest, mode = %meta.mode, unpacked_ms, copied_ms, total_ms = started.elapsed().as_millis(), "restored from checkpoint");
        Ok(meta.mode)
    }
}

// --- Docker plumbing -------------------------------------------------------------

impl Checkpointer {
    #[allow(clippy::too_many_arguments)]
    async fn take(
        &self,
        container_id: &str,
        alloc: &str,
        job: &str,
        node: &str,
        mode: CheckpointMode,
        volume_targets: &[String],
        halt: Halt,
    ) -> Result<BundleInfo, CheckpointError> {
        if mode == CheckpointMode::Auto {
            return Err(CheckpointError::Invalid {
                what: "checkpoint mode",
                value: mode.to_string(),
                expected: "live or fs (resolve auto with resolve_mode first)",
            });
        }
        for target in volume_targets {
            container_path(target)?;
        }
        let docker = self.docker().await?;
        let inspect = timed(
            "inspect",
            container_id,
            CALL_TIMEOUT * 2,
            docker.inspect(container_id, true),
        )
        .await?;
        let id = inspect
            .id
            .clone()
            .unwrap_or_else(|| container_id.to_owned());
        let image = inspect.image.clone().unwrap_or_default();
        let (running, paused) = (inspect.running, inspect.paused);
        if (mode == CheckpointMode::Live || halt == Halt::Pause) && (!running || paused) {
            return Err(CheckpointError::State {
                container: id,
                state: inspect.state.clone(),
                expected: "a live or a keep-running checkpoint needs a running, unpaused container",
            });
        }
        ensure_space(&self.cache_dir, inspect.size_rw.saturating_mul(2))?;

        let created_unix_ms = now_ms();
        let criu_name = (mode == CheckpointMode::Live).then(|| format!("nc-{created_unix_ms}"));
        let stage = self.temp_dir(".stage-")?;
        let mut budget = Budget::new(self.max_bytes);
        let started = Instant::now();
        let deleted = match halt {
            Halt::Stop(grace) => {
                if let Some(name) = &criu_name {
                    self.dump(&docker, &id, name, true).await?;
                } else if running {
                    let grace_secs = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
                    timed(
                        "stop",
                        &id,
                        grace + CALL_TIMEOUT,
                        docker.stop(&id, grace_secs),
                    )
                    .await?;
                }
                self.wait_stopped(&docker, &id).await?;
                self.capture(
                    &docker,
                    &id,
                    criu_name.as_deref(),
                    stage.path(),
                    volume_targets,
                    &mut budget,
                )
                .await?
            }
            Halt::Pause => {
                timed("pause", &id, CALL_TIMEOUT, docker.pause(&id)).await?;
                let captured = async {
                    if let Some(name) = &criu_name {
                        self.dump(&docker, &id, name, false).await?;
                    }
                    self.capture(
                        &docker,
                        &id,
                        criu_name.as_deref(),
                        stage.path(),
                        volume_targets,
                        &mut budget,
                    )
                    .await
                }
                .await;
                let resumed = timed("unpause", &id, CALL_TIMEOUT, docker.unpause(&id)).await;
                if let (Err(_), Err(e)) = (&captured, &resumed) {
                    warn!(container = %id, error = %e, "could not unpause the container after a failed checkpoint");
                }
                let deleted = captured?;
                resumed?;
                deleted
            }
        };
        let dump_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        debug!(container = %id, %mode, dump_ms, "state captured");

        let meta = BundleMeta {
            format: BUNDLE_FORMAT,
            mode,
            alloc: alloc.to_owned(),
            job: job.to_owned(),
            image,
            criu_name,
            deleted,
            volumes: volume_targets.to_vec(),
            created_unix_ms,
            container: Some(inspect.config),
            vm: false,
            runc: false,
            vm_address: None,
        };
        let bundle = self.seal(stage, &meta, budget.used, node, dump_ms).await?;
        info!(container = %id, alloc, %mode, digest = %bundle.digest, size = bundle.size, dump_ms, total_ms = started.elapsed().as_millis(), "checkpoint written");
        Ok(bundle)
    }

    /// Writes `meta` into `stage`, packs it into the cache and indexes it:
    /// the bundle made on `node`. `staged` is what the stage holds, bytes.
    pub(super) async fn seal(
        &self,
        stage: tempfile::TempDir,
        meta: &BundleMeta,
        staged: u64,
        node: &str,
        dump_ms: u64,
    ) -> Result<BundleInfo, CheckpointError> {
        let meta_path = stage.path().join(META_FILE);
        let json = serde_json::to_vec_pretty(meta).map_err(|e| CheckpointError::Io {
            what: "encoding",
            path: meta_path.clone(),
            source: io::Error::other(e),
        })?;
        std::fs::write(&meta_path, json).map_err(|source| CheckpointError::Io {
            what: "writing",
            path: meta_path.clone(),
            source,
        })?;
        ensure_space(&self.cache_dir, staged)?;
        let stage_path = stage.path().to_path_buf();
        let cache_dir = self.cache_dir.clone();
        let limit = self.max_bytes;
        let (digest, size) = blocking(move || pack(&stage_path, &cache_dir, limit)).await?;
        drop(stage);
        let bundle = BundleInfo {
            digest,
            size,
            mode: meta.mode,
            alloc: meta.alloc.clone(),
            job: meta.job.clone(),
            node: node.to_owned(),
            created_unix_ms: meta.created_unix_ms,
            dump_ms,
        };
        self.index_update(|index| index.bundles.push(bundle.clone()))?;
        Ok(bundle)
    }

    /// The CRIU dump through Docker; `exit` stops the container afterwards.
    async fn dump(
        &self,
        docker: &CheckpointDocker,
        id: &str,
        name: &str,
        exit: bool,
    ) -> Result<(), CheckpointError> {
        timed(
            "checkpoint",
            id,
            DUMP_TIMEOUT,
            docker.create_checkpoint(id, name, exit),
        )
        .await
        .map_err(with_criu_log)
    }

    /// Copies the CRIU image `criu_name` (then drops Docker's copy), the rootfs
    /// diff and the volumes of the halted container into `stage`; returns the
    /// paths deleted from the image.
    async fn capture(
        &self,
        docker: &CheckpointDocker,
        id: &str,
        criu_name: Option<&str>,
        stage: &Path,
        volume_targets: &[String],
        budget: &mut Budget,
    ) -> Result<Vec<String>, CheckpointError> {
        if let Some(name) = criu_name {
            let root = self.root_dir(docker).await?;
            let src = root
                .join("containers")
                .join(id)
                .join("checkpoints")
                .join(name);
            let dst = stage.join(CRIU_DIR);
            let limit = self.max_bytes;
            let copied = blocking(move || copy_dir(&src, &dst, limit)).await?;
            budget.add(copied, "the CRIU image")?;
            let removed = docker.delete_checkpoint(id, name);
            if let Err(e) = timed("checkpoint delete", id, CALL_TIMEOUT, removed).await {
                warn!(container = %id, checkpoint = %name, error = %e, "could not delete Docker's copy of the checkpoint");
            }
        }

        let changes = timed("changes", id, CALL_TIMEOUT * 2, docker.changes(id)).await?;
        let plan = plan_rootfs(&changes, volume_targets);
        let rootfs = stage.join(ROOTFS_TAR);
        let mut pieces = Vec::new();
        for (n, path) in plan.copy.iter().enumerate() {
            let raw = stage.join(format!("raw-{n}.tar"));
            self.download(docker, id, path, &raw, budget).await?;
            let parent = Path::new(path)
                .parent()
                .map(|p| p.strip_prefix("/").unwrap_or(p).to_path_buf())
                .unwrap_or_default();
            pieces.push((raw, parent));
        }
        blocking(move || merge_rootfs(&pieces, &rootfs)).await?;
        let volumes_dir = stage.join(VOLUMES_DIR);
        mkdir(&volumes_dir)?;
        for (n, target) in volume_targets.iter().enumerate() {
            let raw = stage.join(format!("raw-volume-{n}.tar"));
            self.download(docker, id, target, &raw, budget).await?;
            let out_path = volumes_dir.join(format!("{n}.tar"));
            blocking(move || volume_tar(&raw, &out_path)).await?;
        }
        Ok(plan.deleted)
    }

    async fn docker(&self) -> Result<CheckpointDocker, CheckpointError> {
        self.negotiated
            .get_or_try_init(|| async {
                let base = self
                    .endpoint
                    .client()
                    .map_err(|message| CheckpointError::Daemon {
                        op: "connect",
                        target: self.host.clone(),
                        message,
                    })?;
                timed(
                    "version negotiation",
                    &self.host,
                    CALL_TIMEOUT,
                    base.negotiate(),
                )
                .await
            })
            .await
            .cloned()
    }

    async fn root_dir(&self, docker: &CheckpointDocker) -> Result<PathBuf, CheckpointError> {
        let info = timed("info", &self.host, CALL_TIMEOUT, docker.info()).await?;
        info.root_dir
            .filter(|d| d.starts_with('/'))
            .map(PathBuf::from)
            .ok_or_else(|| CheckpointError::Daemon {
                op: "info",
                target: self.host.clone(),
                message: "the daemon did not report its DockerRootDir".to_owned(),
            })
    }

    async fn wait_stopped(
        &self,
        docker: &CheckpointDocker,
        id: &str,
    ) -> Result<(), CheckpointError> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let inspect = timed("inspect", id, CALL_TIMEOUT, docker.inspect(id, false)).await?;
            if !inspect.running {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(CheckpointError::Timeout {
                    op: "stop",
                    target: id.to_owned(),
                    after: CALL_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Downloads the archive of `path` in container `id` into the file `out`.
    async fn download(
        &self,
        docker: &CheckpointDocker,
        id: &str,
        path: &str,
        out: &Path,
        budget: &mut Budget,
    ) -> Result<(), CheckpointError> {
        let target = format!("{id}:{path}");
        let work = async {
            let mut file =
                tokio::fs::File::create(out)
                    .await
                    .map_err(|source| CheckpointError::Io {
                        what: "creating",
                        path: out.to_path_buf(),
                        source,
                    })?;
            let stream = docker.download(id, path);
            let mut stream = std::pin::pin!(stream);
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|message| CheckpointError::Daemon {
                    op: "archive download",
                    target: target.clone(),
                    message,
                })?;
                budget.add(chunk.len() as u64, "the container's files")?;
                file.write_all(&chunk)
                    .await
                    .map_err(|source| CheckpointError::Io {
                        what: "writing",
                        path: out.to_path_buf(),
                        source,
                    })?;
            }
            file.flush().await.map_err(|source| CheckpointError::Io {
                what: "writing",
                path: out.to_path_buf(),
                source,
            })
        };
        match tokio::time::timeout(TRANSFER_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(CheckpointError::Timeout {
                op: "archive download",
                target,
                after: TRANSFER_TIMEOUT,
            }),
        }
    }

    /// Uploads the tar file `tar` into container `id`, extracted at `path`.
    async fn upload(
        &self,
        docker: &CheckpointDocker,
        id: &str,
        path: &str,
        tar: &Path,
    ) -> Result<(), CheckpointError> {
        let file = tokio::fs::File::open(tar)
            .await
            .map_err(|source| CheckpointError::Io {
                what: "opening",
                path: tar.to_path_buf(),
                source,
            })?;
        let body = futures_util::stream::unfold(file, |mut file| async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; CHUNK];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(Bytes::from(buf)), file))
                }
                Err(e) => Some((Err(e), file)),
            }
        });
        timed(
            "archive upload",
            &format!("{id}:{path}"),
            TRANSFER_TIMEOUT,
            docker.upload(id, path, body),
        )
        .await
    }
}

/// How the container is held still while its state is captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Halt {
    /// Stopped for good (the grace period before SIGKILL in fs mode).
    Stop(Duration),
    /// Paused, then unpaused.
    Pause,
}

/// Docker reports a failed dump as `criu failed: ... path= <dir>/criu-dump.log`;
/// that file (on this host, and gone once the container is removed) says why.
/// The error gets its `Error` lines.
fn with_criu_log(e: CheckpointError) -> CheckpointError {
    let CheckpointError::Daemon {
        op,
        target,
        message,
    } = e
    else {
        return e;
    };
    let Some(path) = message
        .split_whitespace()
        .find(|w| w.ends_with("criu-dump.log") || w.ends_with("criu-dump.log:"))
        .map(|w| w.trim_end_matches(':').to_owned())
    else {
        return CheckpointError::Daemon {
            op,
            target,
            message,
        };
    };
    let errors: Vec<String> = std::fs::read_to_string(&path)
        .map(|log| {
            log.lines()
                .filter(|l| l.contains("Error"))
                .take(5)
                .map(|l| l.trim().to_owned())
                .collect()
        })
        .unwrap_or_default();
    let message = if errors.is_empty() {
        message
    } else {
        format!("{message}; CRIU says: {}", errors.join(" | "))
    };
    CheckpointError::Daemon {
        op,
        target,
        message,
    }
}

/// Where runc (under Docker) reads CRIU options.
pub const RUNC_CRIU_CONF: &str = "/etc/criu/runc.conf";

/// The CRIU options a serving container needs: established connections are
/// restored closed (clients reconnect) and connections not yet accepted are
/// dropped, instead of failing the dump.
pub const RUNC_CRIU_OPTIONS: [&str; 2] = ["tcp-close", "skip-in-flight"];

/// Which of [`RUNC_CRIU_OPTIONS`] the text of [`RUNC_CRIU_CONF`] lacks.
pub fn runc_criu_options_missing(conf: &str) -> Option<Vec<&'static str>> {
    let set: Vec<&str> = conf
        .lines()
        .map(|l| {
            l.split('#')
                .next()
                .unwrap_or("")
                .trim()
                .trim_start_matches("--")
        })
        .collect();
    let missing: Vec<&'static str> = RUNC_CRIU_OPTIONS
        .into_iter()
        .filter(|o| !set.contains(o))
        .collect();
    (!missing.is_empty()).then_some(missing)
}

/// The repository of the live probe's throwaway image (tagged per probe).
pub const PROBE_REPO: &str = "novacron-live-probe";
/// The probe image's entry point.
const PROBE_ENTRYPOINT: &str = r#"ENTRYPOINT ["/probe"]"#;
/// The probe's checkpoint name.
const PROBE_CHECKPOINT: &str = "probe";
/// The file [`copy_checkpoint_in`] adds to a CRIU image it copies in.
const RESTORE_MARKER: &str = "novacron-restore";

/// The probe image's root file system: a tar holding `/probe` (mode 0755).
fn probe_rootfs(program: &[u8]) -> io::Result<Vec<u8>> {
    crate::runtime::docker::sandbox::program_rootfs("probe", program)
}

async fn timed<T, E: Display>(
    op: &'static str,
    target: &str,
    limit: Duration,
    call: impl Future<Output = Result<T, E>>,
) -> Result<T, CheckpointError> {
    match tokio::time::timeout(limit, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(CheckpointError::Daemon {
            op,
            target: target.to_owned(),
            message: e.to_string(),
        }),
        Err(_) => Err(CheckpointError::Timeout {
            op,
            target: target.to_owned(),
            after: limit,
        }),
    }
}

/// Copies the CRIU image `src` into `dst`, the daemon's checkpoint directory of
/// `container`, and adds a file naming that container. Docker uploads the
/// directory to containerd as a tar when it restores, and fails ("already
/// exists") when that content is there already, as a copy of an image dumped on
/// the same daemon within the same second (tar times are whole seconds) would be;
/// the file tells them apart (CRIU reads only its own image files).
fn copy_checkpoint_in(
    src: &Path,
    dst: &Path,
    container: &str,
    limit: u64,
) -> Result<u64, CheckpointError> {
    let copied = copy_dir(src, dst, limit)?;
    let marker = dst.join(RESTORE_MARKER);
    std::fs::write(&marker, container).map_err(|source| CheckpointError::Io {
        what: "writing",
        path: marker,
        source,
    })?;
    Ok(copied)
}

/// Recursively copies the directory `src` (files and directories only) to `dst`;
/// returns the bytes copied.
fn copy_dir(src: &Path, dst: &Path, limit: u64) -> Result<u64, CheckpointError> {
    let io_err = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| CheckpointError::Io { what, path, source }
    };
    mkdir(dst)?;
    let mut total = 0u64;
    let mut stack = vec![(src.to_path_buf(), dst.to_path_buf())];
    while let Some((from, to)) = stack.pop() {
        for entry in std::fs::read_dir(&from).map_err(io_err("reading", &from))? {
            let entry = entry.map_err(io_err("reading", &from))?;
            let kind = entry
                .file_type()
                .map_err(io_err("reading", &entry.path()))?;
            let target = to.join(entry.file_name());
            if kind.is_dir() {
                mkdir(&target)?;
                stack.push((entry.path(), target));
            } else if kind.is_file() {
                total += std::fs::copy(entry.path(), &target)
                    .map_err(io_err("copying", &entry.path()))?;
                if total > limit {
                    return Err(CheckpointError::TooLarge {
                        what: format!("the checkpoint (copying {})", src.display()),
                        bytes: total,
                        limit,
                    });
                }
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::tests::checkpointer;

    #[test]
    fn runc_conf_is_checked_for_the_connection_options() {
        assert_eq!(
            runc_criu_options_missing(""),
            Some(vec!["tcp-close", "skip-in-flight"])
        );
        assert_eq!(
            runc_criu_options_missing("# ours\ntcp-close\n--skip-in-flight # in flight\n"),
            None
        );
        assert_eq!(
            runc_criu_options_missing("tcp-close\n"),
            Some(vec!["skip-in-flight"])
        );
    }

    #[test]
    fn the_probe_programs_are_static_elf_executables_entered_at_their_code() {
        assert_eq!(pause_program("riscv64"), None);
        for (arch, machine) in [("x86_64", 0x3e_u16), ("aarch64", 0xb7)] {
            let elf = pause_program(arch).expect(arch);
            let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]);
            let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().expect("8"));
            assert_eq!(&elf[..4], b"\x7fELF", "{arch}");
            assert_eq!(u16_at(16), 2, "{arch}: ET_EXEC");
            assert_eq!(u16_at(18), machine, "{arch}");
            assert_eq!(u16_at(56), 1, "{arch}: one program header");
            // The loadable segment covers the whole file, and the entry its code.
            let (vaddr, filesz) = (u64_at(64 + 16), u64_at(64 + 32));
            assert_eq!(filesz, elf.len() as u64, "{arch}");
            assert_eq!(
                u64_at(24),
                vaddr + 120,
                "{arch}: entry right after the headers"
            );
        }
        let tar = probe_rootfs(&pause_program("x86_64").expect("x86_64")).expect("tar");
        let mut archive = tar::Archive::new(tar.as_slice());
        let entry = archive
            .entries()
            .expect("entries")
            .next()
            .expect("one")
            .expect("ok");
        assert_eq!(entry.path().expect("path").to_str(), Some("probe"));
        assert_eq!(entry.header().mode().expect("mode"), 0o755);
    }

    #[tokio::test]
    async fn auto_mode_and_bad_hosts_are_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        assert!(matches!(
            Checkpointer::new(Some("ssh://x"), tmp.path().to_path_buf()),
            Err(CheckpointError::Host { .. })
        ));
        let cp = checkpointer(tmp.path());
        let err = cp
            .checkpoint(
                "c",
                "a",
                "j",
                "n",
                CheckpointMode::Auto,
                &[],
                Duration::ZERO,
            )
            .await
            .expect_err("auto accepted");
        assert!(err.to_string().contains("live or fs"), "{err}");
    }

    mod docker {
        //! Against a real experimental daemon with CRIU (`NOVACRON_CKPT_DOCKER_A`).

        use std::process::Command;

        use std::io::Read;

        use super::*;

        const ENV_DOCKER: &str = "NOVACRON_CKPT_DOCKER_A";
        const ENV_REQUIRE: &str = "NOVACRON_REQUIRE_LIVE";
        const IMAGE: &str = "novacron-ckpt-test:busybox";

        /// Removes what the test made, also when it fails.
        struct Cleanup {
            host: String,
            containers: Vec<String>,
            volumes: Vec<String>,
        }

        impl Drop for Cleanup {
            fn drop(&mut self) {
                let docker = |args: &[&str]| {
                    let _ = Command::new("docker")
                        .env("DOCKER_HOST", &self.host)
                        .args(args)
                        .output();
                };
                for c in &self.containers {
                    docker(&["rm", "-f", "-v", c]);
                }
                for v in &self.volumes {
                    docker(&["volume", "rm", "-f", v]);
                }
            }
        }

        fn host() -> Option<String> {
            match std::env::var(ENV_DOCKER) {
                Ok(h) if !h.is_empty() => Some(h),
                _ => {
                    if std::env::var(ENV_REQUIRE).as_deref() == Ok("1") {
                        panic!("{ENV_REQUIRE}=1 but {ENV_DOCKER} is not set");
                    }
                    eprintln!(
                        "SKIPPED live checkpoint test: {ENV_DOCKER} is not set (e.g. unix:///tmp/criutest/d/docker.sock, an experimental dockerd with criu)"
                    );
                    None
                }
            }
        }

        fn build_image(host: &str) {
            let ctx = tempfile::tempdir().expect("tmp");
            std::fs::copy("/bin/busybox", ctx.path().join("busybox")).expect("static busybox");
            std::fs::write(
                ctx.path().join("Dockerfile"),
                "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\",\"--install\",\"-s\",\"/bin\"]\nCMD [\"/bin/sh\"]\n",
            )
            .expect("w");
            let out = Command::new("docker")
                .env("DOCKER_HOST", host)
                .env("DOCKER_BUILDKIT", "0")
                .args(["build", "-q", "-t", IMAGE])
                .arg(ctx.path())
                .output()
                .expect("docker CLI");
            assert!(
                out.status.success(),
                "docker build: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        /// Runs the docker CLI against `host`; its output, or `None` when it fails.
        fn cli(host: &str, args: &[&str]) -> Option<Vec<u8>> {
            let out = Command::new("docker")
                .env("DOCKER_HOST", host)
                .args(args)
                .output()
                .expect("docker CLI");
            out.status.success().then_some(out.stdout)
        }

        fn create(
            host: &str,
            name: &str,
            volume: &str,
            script: &str,
            guard: &mut Cleanup,
        ) -> String {
            guard.volumes.push(volume.to_owned());
            guard.containers.push(name.to_owned());
            let mount = format!("type=volume,source={volume},target=/data");
            let id = cli(
                host,
                &[
                    "create", "--name", name, "--mount", &mount, IMAGE, "sh", "-c", script,
                ],
            )
            .expect("create container");
            String::from_utf8_lossy(&id).trim().to_owned()
        }

        /// The content of one file in a container, through the archive API.
        fn read_file(host: &str, id: &str, path: &str) -> Option<String> {
            let bytes = cli(host, &["cp", &format!("{id}:{path}"), "-"])?;
            let mut archive = tar::Archive::new(bytes.as_slice());
            let mut entry = archive.entries().ok()?.next()?.ok()?;
            let mut text = String::new();
            entry.read_to_string(&mut text).ok()?;
            Some(text)
        }

        /// The last value the loop wrote to its log (the log is appended through an
        /// open descriptor, one write per line, so it is never seen half-written as
        /// the truncated counter file can be).
        fn counter(host: &str, id: &str) -> u64 {
            let log = read_file(host, id, "/data/log").unwrap_or_default();
            log.lines()
                .rev()
                .find_map(|l| l.trim().parse().ok())
                .unwrap_or(0)
        }

        /// Counts in a volume holding the log open (CRIU checks open files' sizes)
        /// and goes on from the volume's counter when started afresh. The counter
        /// is replaced by a rename, never truncated in place: a stop's SIGKILL
        /// between a truncation and the write left it empty, and the restored
        /// copy counted from 1 (CI on bde032b: 112 -> 16 under load). Only a first
        /// start (no /marker yet) deletes /bin/vi, so its absence after an fs restore
        /// shows that the deletion was carried.
        const SCRIPT: &str = "[ -f /marker ] || { echo first-$RANDOM$RANDOM > /marker; rm -f /bin/vi; }; \
            i=$(cat /data/counter 2>/dev/null || echo 0); exec 3>>/data/log; \
            while true; do i=$((i+1)); echo $i > /data/counter.new; mv /data/counter.new /data/counter; echo $i >&3; sleep 0.05; done";

        #[tokio::test]
        async fn live_and_fs_checkpoints_restore_into_new_containers() {
            let Some(host) = host() else { return };
            build_image(&host);
            let tag = format!("nc-ckpt-{}-{}", std::process::id(), now_ms() % 100_000);
            let mut guard = Cleanup {
                host: host.clone(),
                containers: vec![],
                volumes: vec![],
            };
            let cache = tempfile::tempdir().expect("tmp");
            let cp = Checkpointer::new(Some(&host), cache.path().to_path_buf()).expect("cp");
            cp.probe_live().await.expect("live probe");
            let volumes = vec!["/data".to_owned()];

            // Live.
            let a = create(
                &host,
                &format!("{tag}-a"),
                &format!("{tag}-va"),
                SCRIPT,
                &mut guard,
            );
            cli(&host, &["start", &a]).expect("start");
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let t = Instant::now();
            let live = cp
                .checkpoint(
                    &a,
                    "alloc-1",
                    "job-1",
                    "node-a",
                    CheckpointMode::Live,
                    &volumes,
                    Duration::from_secs(1),
                )
                .await
                .expect("live checkpoint");
            let checkpoint_ms = t.elapsed().as_millis();
            let at_dump = counter(&host, &a);
            assert!(at_dump > 5, "the loop ran before the dump: {at_dump}");
            let b = create(
                &host,
                &format!("{tag}-b"),
                &format!("{tag}-vb"),
                SCRIPT,
                &mut guard,
            );
            let t = Instant::now();
            assert_eq!(
                cp.restore(&live.digest, &b).await.expect("live restore"),
                CheckpointMode::Live
            );
            let restore_ms = t.elapsed().as_millis();
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let after = counter(&host, &b);
            let log = read_file(&host, &b, "/data/log").unwrap_or_default();
            eprintln!(
                "live: bundle {} bytes, dump_ms {}, checkpoint {checkpoint_ms} ms, restore {restore_ms} ms, counter {at_dump} -> {after}",
                live.size, live.dump_ms
            );
            assert!(
                after > at_dump,
                "the restored process went on counting: {at_dump} -> {after}"
            );
            assert!(
                log.lines().count() as u64 >= at_dump,
                "volume log carried: {} lines",
                log.lines().count()
            );
            assert_eq!(
                read_file(&host, &a, "/marker"),
                read_file(&host, &b, "/marker"),
                "rootfs file carried"
            );

            // Live, keep running: b goes on, and d continues from the dump.
            let t = Instant::now();
            let periodic = cp
                .checkpoint_running(
                    &b,
                    "alloc-1",
                    "job-1",
                    "node-a",
                    CheckpointMode::Live,
                    &volumes,
                )
                .await
                .expect("keep-running checkpoint");
            let checkpoint_ms = t.elapsed().as_millis();
            let at_dump = counter(&host, &b);
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(counter(&host, &b) > at_dump, "the source went on running");
            let d = create(
                &host,
                &format!("{tag}-d"),
                &format!("{tag}-vd"),
                SCRIPT,
                &mut guard,
            );
            let t = Instant::now();
            cp.restore(&periodic.digest, &d)
                .await
                .expect("restore of a keep-running checkpoint");
            let restore_ms = t.elapsed().as_millis();
            tokio::time::sleep(Duration::from_millis(700)).await;
            let resumed = counter(&host, &d);
            let running =
                cli(&host, &["inspect", "-f", "{{.State.Running}}", &d]).expect("inspect");
            assert_eq!(
                String::from_utf8_lossy(&running).trim(),
                "true",
                "the restored copy runs"
            );
            eprintln!(
                "live keep-running: bundle {} bytes, paused (dump_ms) {}, checkpoint {checkpoint_ms} ms, restore {restore_ms} ms, counter at dump <= {at_dump}, restored -> {resumed}",
                periodic.size, periodic.dump_ms
            );
            assert!(resumed > 0, "the restored copy counts: {resumed}");
            let log = read_file(&host, &d, "/data/log").unwrap_or_default();
            let first: Vec<&str> = log.lines().take(3).collect();
            assert_eq!(
                first,
                ["1", "2", "3"],
                "the volume log was carried from the start"
            );

            // Fs, from the restored container.
            let marker = read_file(&host, &b, "/marker").expect("marker");
            let t = Instant::now();
            let fs = cp
                .checkpoint(
                    &b,
                    "alloc-1",
                    "job-1",
                    "node-a",
                    CheckpointMode::Fs,
                    &volumes,
                    Duration::from_secs(1),
                )
                .await
                .expect("fs checkpoint");
            let checkpoint_ms = t.elapsed().as_millis();
            let at_stop = counter(&host, &b);
            let c = create(
                &host,
                &format!("{tag}-c"),
                &format!("{tag}-vc"),
                SCRIPT,
                &mut guard,
            );
            let t = Instant::now();
            assert_eq!(
                cp.restore(&fs.digest, &c).await.expect("fs restore"),
                CheckpointMode::Fs
            );
            let restore_ms = t.elapsed().as_millis();
            tokio::time::sleep(Duration::from_millis(700)).await;
            let after = counter(&host, &c);
            eprintln!(
                "fs: bundle {} bytes, dump_ms {}, checkpoint {checkpoint_ms} ms, restore {restore_ms} ms, counter {at_stop} -> {after}",
                fs.size, fs.dump_ms
            );
            assert!(
                after > at_stop,
                "the volume counter was carried: {at_stop} -> {after}"
            );
            assert_eq!(
                read_file(&host, &c, "/marker").as_deref(),
                Some(marker.as_str())
            );
            assert_eq!(
                read_file(&host, &c, "/bin/vi"),
                None,
                "deleted path stays deleted"
            );

            // A started container is refused, and nothing is touched.
            let err = cp
                .restore(&fs.digest, &c)
                .await
                .expect_err("restored into a running container");
            assert!(matches!(err, CheckpointError::State { .. }), "{err}");
            assert_eq!(cp.bundles().expect("list").len(), 3);
            cp.prune("alloc-1", 1).expect("prune");
            assert_eq!(cp.bundles().expect("list"), vec![fs]);
        }
    }
}

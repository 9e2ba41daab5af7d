//! Checkpoints on this node: [`Checkpointer`] makes bundles from Docker containers
//! and restores them into new ones.
//!
//! A bundle (see `novacron_common::checkpoint`) is a zstd-compressed tar:
//! `bundle.json` first, then `criu/` (live mode: the CRIU image Docker wrote under
//! `<DockerRootDir>/containers/<id>/checkpoints/<name>`), `rootfs.tar` (the writable
//! layer's added and modified paths, members relative to `/`) and `volumes/<n>.tar`
//! (one per volume target, members relative to the target). It lives in the cache
//! directory as `<sha256>.ncb`; `index.json` there lists what this node made.
//!
//! [`Checkpointer::checkpoint`] stops the container (before a migration);
//! [`Checkpointer::checkpoint_running`] pauses it while the state is captured and
//! lets it go on (periodic checkpoints).
//!
//! The filesystem copies are taken **after** the container stopped (CRIU checks the
//! sizes of the files a process holds open when it restores, so the data must be
//! exactly as at dump time). Every Docker call carries a timeout. Bundles can come
//! from peers, so reading one never panics: members must be plain files or
//! directories under relative paths without `..`, and unpacking stops at the size
//! limit of decompressed bytes.
//!
//! **Needs the daemon's host:** live mode and deleted-path replay read and write
//! under the daemon's data root and the container's overlay upper directory, so the
//! agent must run as root next to a local daemon.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::fs::File;
use std::future::Future;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bollard::container::CreateCheckpointOptions;
use bollard::models::{ChangeType, ContainerInspectResponse, ContainerStateStatusEnum};
use bollard::query_parameters::{
    DownloadFromContainerOptions, InspectContainerOptions, StopContainerOptions,
    UploadToContainerOptions,
};
use bollard::{API_DEFAULT_VERSION, Docker};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use novacron_common::checkpoint::{
    BUNDLE_FORMAT, BundleInfo, BundleMeta, CheckpointMode, MAX_BUNDLE_BYTES, check_digest,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::OnceCell;
use tracing::{debug, info, warn};

use crate::collect::DEFAULT_DOCKER_HOST;

/// The limit on one short call to the daemon (inspect, info, start, changes).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The limit on the CRIU dump (`POST /containers/{id}/checkpoints`).
pub const DUMP_TIMEOUT: Duration = Duration::from_secs(300);
/// The limit on one archive download or upload.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(900);
/// The limit on running `criu --version` or `criu check`.
pub const CRIU_PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// Free space kept on the cache's file system beyond what a bundle needs.
pub const FREE_SPACE_MARGIN: u64 = 64 * 1024 * 1024;
/// The file name extension of a cached bundle.
pub const BUNDLE_EXT: &str = "ncb";
/// The cache's list of bundles made here.
pub const INDEX_FILE: &str = "index.json";

const META_FILE: &str = "bundle.json";
const CRIU_DIR: &str = "criu";
const ROOTFS_TAR: &str = "rootfs.tar";
const VOLUMES_DIR: &str = "volumes";
/// The largest `bundle.json` read.
const MAX_META_BYTES: u64 = 4 * 1024 * 1024;
/// Paths Docker manages in every container; never carried in a bundle.
const DOCKER_MANAGED: &[&str] = &[
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/proc",
    "/sys",
    "/dev",
];
/// Client-side limit on waiting for response headers; above every per-call limit.
const CLIENT_TIMEOUT_SECS: u64 = 1200;
const CHUNK: usize = 256 * 1024;

/// Errors of checkpoint and restore.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The Docker host address cannot be used.
    #[error(
        "unsupported Docker host {host:?}: expected unix://PATH, a socket path, tcp://HOST:PORT or http://HOST:PORT"
    )]
    Host {
        /// The address given.
        host: String,
    },
    /// A call to the Docker daemon failed.
    #[error("Docker {op} of {target} failed: {message}")]
    Daemon {
        /// The operation.
        op: &'static str,
        /// The container, path or daemon it was about.
        target: String,
        /// What the daemon or the connection said.
        message: String,
    },
    /// A call to the Docker daemon did not finish in time.
    #[error(
        "Docker {op} of {target} did not finish within {after:?}; check the daemon (docker info) and retry"
    )]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The container, path or daemon it was about.
        target: String,
        /// The limit.
        after: Duration,
    },
    /// An argument is not acceptable.
    #[error("{what} {value:?} is not valid; expected {expected}")]
    Invalid {
        /// What the argument is.
        what: &'static str,
        /// Its value.
        value: String,
        /// What would be accepted.
        expected: &'static str,
    },
    /// The container is in a state the operation cannot work from.
    #[error("container {container} is {state}; {expected}")]
    State {
        /// The container.
        container: String,
        /// Its state.
        state: String,
        /// What the operation needs.
        expected: &'static str,
    },
    /// No cached bundle has this digest.
    #[error(
        "no bundle {digest} in the checkpoint cache {dir}; fetch it from a node or the controller first"
    )]
    NotFound {
        /// The digest asked for.
        digest: String,
        /// The cache directory.
        dir: PathBuf,
    },
    /// A cached bundle's bytes do not hash to its name.
    #[error(
        "bundle {path} is corrupt: expected sha256 {expected}, its bytes hash to {actual}; delete it and fetch it again"
    )]
    DigestMismatch {
        /// The bundle file.
        path: PathBuf,
        /// Its name.
        expected: String,
        /// What its bytes hash to.
        actual: String,
    },
    /// A bundle, or what would go in one, is over the size limit.
    #[error("{what} is over the limit: {bytes} bytes or more, at most {limit} are accepted")]
    TooLarge {
        /// What is too large.
        what: String,
        /// Its size so far.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The cache's file system has too little free space.
    #[error(
        "not enough free space in {dir}: {free} bytes free, {needed} needed; free space or move the checkpoint cache"
    )]
    NoSpace {
        /// The directory.
        dir: PathBuf,
        /// Bytes free for unprivileged use.
        free: u64,
        /// Bytes needed (with a margin of FREE_SPACE_MARGIN).
        needed: u64,
    },
    /// A bundle is malformed or unsafe; nothing from it was applied.
    #[error("bundle {bundle} is not acceptable: {reason}")]
    BadBundle {
        /// The bundle (digest or path).
        bundle: String,
        /// What is wrong, and what is accepted.
        reason: String,
    },
    /// A local file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Makes, verifies, restores and prunes checkpoint bundles for one Docker daemon.
#[derive(Debug)]
pub struct Checkpointer {
    host: String,
    endpoint: Endpoint,
    negotiated: OnceCell<Docker>,
    cache_dir: PathBuf,
    max_bytes: u64,
    criu: Option<PathBuf>,
    index_lock: std::sync::Mutex<()>,
}

/// One entry of `index.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Index {
    bundles: Vec<BundleInfo>,
}

impl Checkpointer {
    /// A checkpointer for `docker_host` (`unix:///path`, a socket path,
    /// `tcp://HOST:PORT`; `None` is [`DEFAULT_DOCKER_HOST`]) keeping bundles in
    /// `cache_dir` (created when missing). Makes no call to the daemon (the first
    /// call that needs it connects and agrees on the API version).
    pub fn new(docker_host: Option<&str>, cache_dir: PathBuf) -> Result<Self, CheckpointError> {
        let host = docker_host.unwrap_or(DEFAULT_DOCKER_HOST);
        let bad = || CheckpointError::Host {
            host: host.to_owned(),
        };
        let endpoint = if let Some(path) = host
            .strip_prefix("unix://")
            .or_else(|| host.starts_with('/').then_some(host))
        {
            Endpoint::Unix(PathBuf::from(path))
        } else if let Some(addr) = host
            .strip_prefix("tcp://")
            .or_else(|| host.strip_prefix("http://"))
        {
            let addr = addr.trim_end_matches('/');
            if addr.is_empty() || addr.contains('/') {
                return Err(bad());
            }
            Endpoint::Tcp(addr.to_owned())
        } else {
            return Err(bad());
        };
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
            criu: None,
            index_lock: std::sync::Mutex::new(()),
        })
    }

    /// Lowers the bundle size limit (compressed and decompressed) below
    /// [`MAX_BUNDLE_BYTES`]; a larger value is clamped to it.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes.min(MAX_BUNDLE_BYTES);
        self
    }

    /// Names the `criu` binary the daemon uses, for [`Checkpointer::live_capability`].
    /// Without it, `criu` is looked up on this process's `PATH`, then on the `PATH`
    /// of the local `dockerd` serving the socket.
    pub fn with_criu(mut self, criu: PathBuf) -> Self {
        self.criu = Some(criu);
        self
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// Whether live checkpoints can work here: the daemon runs with experimental
    /// features and `criu` answers (and, as root, `criu check` passes). The error
    /// names what is missing and how to fix it.
    pub async fn live_capability(&self) -> Result<(), String> {
        let docker = self.docker().await.map_err(|e| e.to_string())?;
        let info = timed("info", &self.host, CALL_TIMEOUT, docker.info())
            .await
            .map_err(|e| e.to_string())?;
        if info.experimental_build != Some(true) {
            return Err(format!(
                "the Docker daemon at {} runs without experimental features; start dockerd with --experimental (or \"experimental\": true in daemon.json)",
                self.host
            ));
        }
        let criu = self.criu_binary().ok_or_else(|| {
            "criu was found neither on the agent's PATH nor on the Docker daemon's PATH; install criu 4 or newer where dockerd finds it (`criu check` must say \"Looks good\")".to_owned()
        })?;
        probe_criu(&criu, &["--version"]).await?;
        if rustix::process::geteuid().is_root() {
            probe_criu(&criu, &["check"]).await?;
        }
        if let Some(missing) =
            runc_criu_options_missing(&std::fs::read_to_string(RUNC_CRIU_CONF).unwrap_or_default())
        {
            warn!(
                file = RUNC_CRIU_CONF,
                missing = %missing.join(", "),
                "live checkpoints of containers that serve connections fail without these CRIU options (runc reads them from this file); add one per line"
            );
        }
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

    /// The path of the cached bundle `digest` (which need not exist yet).
    pub fn bundle_path(&self, digest: &str) -> Result<PathBuf, CheckpointError> {
        check_digest(digest).map_err(|_| CheckpointError::Invalid {
            what: "bundle digest",
            value: digest.to_owned(),
            expected: "64 lowercase hex digits (SHA-256)",
        })?;
        Ok(self.cache_dir.join(format!("{digest}.{BUNDLE_EXT}")))
    }

    /// Checks that the cached bundle `digest` hashes to its name; returns its size.
    pub async fn verify(&self, digest: &str) -> Result<u64, CheckpointError> {
        let path = self.bundle_path(digest)?;
        if !path.is_file() {
            return Err(CheckpointError::NotFound {
                digest: digest.to_owned(),
                dir: self.cache_dir.clone(),
            });
        }
        let expected = digest.to_owned();
        blocking(move || verify_file(&path, &expected)).await
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
            docker.inspect_container(new_id, None::<InspectContainerOptions>),
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
        let status = inspect.state.as_ref().and_then(|s| s.status);
        if status != Some(ContainerStateStatusEnum::CREATED) {
            return Err(CheckpointError::State {
                container: id,
                state: state_of(&inspect),
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
                blocking(move || copy_dir(&src, &dst, limit)).await?;
                let uri = format!("/containers/{id}/start?checkpoint={name}");
                let (status, body) = timed(
                    "start from checkpoint",
                    &id,
                    DUMP_TIMEOUT,
                    self.endpoint.post(&uri, Bytes::new()),
                )
                .await?;
                if !(200..300).contains(&status) && status != 304 {
                    return Err(CheckpointError::Daemon {
                        op: "start from checkpoint",
                        target: id,
                        message: format!(
                            "HTTP {status}: {}",
                            String::from_utf8_lossy(&body).trim()
                        ),
                    });
                }
            }
            _ => {
                timed(
                    "start",
                    &id,
                    CALL_TIMEOUT,
                    docker.start_container(
                        &id,
                        None::<bollard::query_parameters::StartContainerOptions>,
                    ),
                )
                .await?;
            }
        }
        info!(container = %id, digest, mode = %meta.mode, unpacked_ms, copied_ms, total_ms = started.elapsed().as_millis(), "restored from checkpoint");
        Ok(meta.mode)
    }

    /// The bundles this node made that are still listed in the index, oldest first.
    pub fn bundles(&self) -> Result<Vec<BundleInfo>, CheckpointError> {
        let _guard = self.index_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut list = self.index_load()?.bundles;
        list.sort_by_key(|b| b.created_unix_ms);
        Ok(list)
    }

    /// Deletes the cached bundles of `alloc` except the newest `keep`.
    pub fn prune(&self, alloc: &str, keep: usize) -> Result<(), CheckpointError> {
        let mut doomed = Vec::new();
        self.index_update(|index| {
            let mut mine: Vec<&BundleInfo> =
                index.bundles.iter().filter(|b| b.alloc == alloc).collect();
            mine.sort_by(|a, b| {
                b.created_unix_ms
                    .cmp(&a.created_unix_ms)
                    .then_with(|| b.digest.cmp(&a.digest))
            });
            doomed = mine
                .iter()
                .skip(keep)
                .map(|b| b.digest.clone())
                .collect::<Vec<_>>();
            index.bundles.retain(|b| !doomed.contains(&b.digest));
        })?;
        for digest in doomed {
            let path = self.bundle_path(&digest)?;
            match std::fs::remove_file(&path) {
                Ok(()) => debug!(alloc, %digest, "pruned checkpoint"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(CheckpointError::Io {
                        what: "deleting",
                        path,
                        source,
                    });
                }
            }
        }
        Ok(())
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
            docker.inspect_container(container_id, Some(InspectContainerOptions { size: true })),
        )
        .await?;
        let id = inspect
            .id
            .clone()
            .unwrap_or_else(|| container_id.to_owned());
        let image = inspect
            .config
            .as_ref()
            .and_then(|c| c.image.clone())
            .or_else(|| inspect.image.clone())
            .unwrap_or_default();
        let state = inspect.state.as_ref();
        let running = state.and_then(|s| s.running).unwrap_or(false);
        let paused = state.and_then(|s| s.paused).unwrap_or(false);
        if (mode == CheckpointMode::Live || halt == Halt::Pause) && (!running || paused) {
            return Err(CheckpointError::State {
                container: id,
                state: state_of(&inspect),
                expected: "a live or a keep-running checkpoint needs a running, unpaused container",
            });
        }
        let size_rw = u64::try_from(inspect.size_rw.unwrap_or(0)).unwrap_or(0);
        ensure_space(&self.cache_dir, size_rw.saturating_mul(2))?;

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
                    let options = StopContainerOptions {
                        signal: None,
                        t: Some(i32::try_from(grace.as_secs()).unwrap_or(i32::MAX)),
                    };
                    timed(
                        "stop",
                        &id,
                        grace + CALL_TIMEOUT,
                        docker.stop_container(&id, Some(options)),
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
                timed("pause", &id, CALL_TIMEOUT, docker.pause_container(&id)).await?;
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
                let resumed =
                    timed("unpause", &id, CALL_TIMEOUT, docker.unpause_container(&id)).await;
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
            container: Some(serde_json::json!({
                "Config": inspect.config,
                "HostConfig": inspect.host_config,
            })),
        };
        let meta_path = stage.path().join(META_FILE);
        let json = serde_json::to_vec_pretty(&meta).map_err(|e| CheckpointError::Io {
            what: "encoding",
            path: meta_path.clone(),
            source: io::Error::other(e),
        })?;
        std::fs::write(&meta_path, json).map_err(|source| CheckpointError::Io {
            what: "writing",
            path: meta_path.clone(),
            source,
        })?;
        ensure_space(&self.cache_dir, budget.used)?;

        let stage_path = stage.path().to_path_buf();
        let cache_dir = self.cache_dir.clone();
        let limit = self.max_bytes;
        let (digest, size) = blocking(move || pack(&stage_path, &cache_dir, limit)).await?;
        drop(stage);
        let bundle = BundleInfo {
            digest,
            size,
            mode,
            alloc: alloc.to_owned(),
            job: job.to_owned(),
            node: node.to_owned(),
            created_unix_ms,
            dump_ms,
        };
        self.index_update(|index| index.bundles.push(bundle.clone()))?;
        info!(container = %id, alloc, %mode, digest = %bundle.digest, size, dump_ms, total_ms = started.elapsed().as_millis(), "checkpoint written");
        Ok(bundle)
    }

    /// The CRIU dump through Docker; `exit` stops the container afterwards.
    async fn dump(
        &self,
        docker: &Docker,
        id: &str,
        name: &str,
        exit: bool,
    ) -> Result<(), CheckpointError> {
        let options = CreateCheckpointOptions {
            checkpoint_id: name.to_owned(),
            checkpoint_dir: None,
            exit,
        };
        timed(
            "checkpoint",
            id,
            DUMP_TIMEOUT,
            docker.create_checkpoint(id, options),
        )
        .await
        .map_err(with_criu_log)
    }

    /// Copies the CRIU image `criu_name` (then drops Docker's copy), the rootfs
    /// diff and the volumes of the halted container into `stage`; returns the
    /// paths deleted from the image.
    async fn capture(
        &self,
        docker: &Docker,
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
            let removed = docker.delete_checkpoint(
                id,
                name,
                None::<bollard::container::DeleteCheckpointOptions>,
            );
            if let Err(e) = timed("checkpoint delete", id, CALL_TIMEOUT, removed).await {
                warn!(container = %id, checkpoint = %name, error = %e, "could not delete Docker's copy of the checkpoint");
            }
        }

        let changes = timed(
            "changes",
            id,
            CALL_TIMEOUT * 2,
            docker.container_changes(id),
        )
        .await?
        .unwrap_or_default();
        let changes: Vec<(String, ChangeKind)> = changes
            .into_iter()
            .map(|c| {
                let kind = match c.kind {
                    ChangeType::_0 => ChangeKind::Modified,
                    ChangeType::_1 => ChangeKind::Added,
                    ChangeType::_2 => ChangeKind::Deleted,
                };
                (c.path, kind)
            })
            .collect();
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
        blocking(move || {
            let mut out = tar::Builder::new(BufWriter::new(create(&rootfs)?));
            for (raw, parent) in &pieces {
                retar(raw, &mut out, |member| Some(parent.join(member)))?;
                remove_file(raw)?;
            }
            finish_tar(out, &rootfs)
        })
        .await?;
        let volumes_dir = stage.join(VOLUMES_DIR);
        mkdir(&volumes_dir)?;
        for (n, target) in volume_targets.iter().enumerate() {
            let raw = stage.join(format!("raw-volume-{n}.tar"));
            self.download(docker, id, target, &raw, budget).await?;
            let out_path = volumes_dir.join(format!("{n}.tar"));
            blocking(move || {
                let mut out = tar::Builder::new(BufWriter::new(create(&out_path)?));
                // Members come as `<basename>/...`; keep them relative to the target.
                retar(&raw, &mut out, |member| {
                    let rest: PathBuf = member.components().skip(1).collect();
                    (!rest.as_os_str().is_empty()).then_some(rest)
                })?;
                remove_file(&raw)?;
                finish_tar(out, &out_path)
            })
            .await?;
        }
        Ok(plan.deleted)
    }

    async fn docker(&self) -> Result<Docker, CheckpointError> {
        self.negotiated
            .get_or_try_init(|| async {
                let base = match &self.endpoint {
                    Endpoint::Unix(path) => Docker::connect_with_unix(
                        &path.to_string_lossy(),
                        CLIENT_TIMEOUT_SECS,
                        API_DEFAULT_VERSION,
                    ),
                    Endpoint::Tcp(addr) => Docker::connect_with_http(
                        &format!("http://{addr}"),
                        CLIENT_TIMEOUT_SECS,
                        API_DEFAULT_VERSION,
                    ),
                }
                .map_err(|e| CheckpointError::Daemon {
                    op: "connect",
                    target: self.host.clone(),
                    message: e.to_string(),
                })?;
                timed(
                    "version negotiation",
                    &self.host,
                    CALL_TIMEOUT,
                    base.negotiate_version(),
                )
                .await
            })
            .await
            .cloned()
    }

    async fn root_dir(&self, docker: &Docker) -> Result<PathBuf, CheckpointError> {
        let info = timed("info", &self.host, CALL_TIMEOUT, docker.info()).await?;
        info.docker_root_dir
            .filter(|d| d.starts_with('/'))
            .map(PathBuf::from)
            .ok_or_else(|| CheckpointError::Daemon {
                op: "info",
                target: self.host.clone(),
                message: "the daemon did not report its DockerRootDir".to_owned(),
            })
    }

    async fn wait_stopped(&self, docker: &Docker, id: &str) -> Result<(), CheckpointError> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let inspect = timed(
                "inspect",
                id,
                CALL_TIMEOUT,
                docker.inspect_container(id, None::<InspectContainerOptions>),
            )
            .await?;
            if !inspect.state.and_then(|s| s.running).unwrap_or(false) {
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
        docker: &Docker,
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
            let options = DownloadFromContainerOptions {
                path: path.to_owned(),
            };
            let mut stream = docker.download_from_container(id, Some(options));
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| CheckpointError::Daemon {
                    op: "archive download",
                    target: target.clone(),
                    message: e.to_string(),
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
        docker: &Docker,
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
        let options = UploadToContainerOptions {
            path: path.to_owned(),
            ..Default::default()
        };
        timed(
            "archive upload",
            &format!("{id}:{path}"),
            TRANSFER_TIMEOUT,
            docker.upload_to_container(id, Some(options), bollard::body_try_stream(body)),
        )
        .await
    }

    fn temp_dir(&self, prefix: &str) -> Result<tempfile::TempDir, CheckpointError> {
        tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(&self.cache_dir)
            .map_err(|source| CheckpointError::Io {
                what: "creating a work directory in",
                path: self.cache_dir.clone(),
                source,
            })
    }

    fn index_load(&self) -> Result<Index, CheckpointError> {
        let path = self.cache_dir.join(INDEX_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Io {
                what: "reading the bundle index",
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Index::default()),
            Err(source) => Err(CheckpointError::Io {
                what: "reading",
                path,
                source,
            }),
        }
    }

    fn index_update(&self, change: impl FnOnce(&mut Index)) -> Result<(), CheckpointError> {
        let _guard = self.index_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut index = self.index_load()?;
        change(&mut index);
        let path = self.cache_dir.join(INDEX_FILE);
        let tmp = self.cache_dir.join(format!(".{INDEX_FILE}.tmp"));
        let io_err = |source| CheckpointError::Io {
            what: "writing",
            path: tmp.clone(),
            source,
        };
        let json = serde_json::to_vec_pretty(&index).map_err(|e| io_err(io::Error::other(e)))?;
        std::fs::write(&tmp, json).map_err(io_err)?;
        std::fs::rename(&tmp, &path).map_err(io_err)
    }

    fn criu_binary(&self) -> Option<PathBuf> {
        if let Some(criu) = &self.criu {
            return Some(criu.clone());
        }
        let ours = std::env::var_os("PATH").unwrap_or_default();
        let socket = match &self.endpoint {
            Endpoint::Unix(p) => Some(p.clone()),
            Endpoint::Tcp(_) => None,
        };
        let daemon = socket.and_then(|s| daemon_path_var(&s)).unwrap_or_default();
        std::env::split_paths(&ours)
            .chain(std::env::split_paths(&daemon))
            .map(|dir| dir.join("criu"))
            .find(|p| p.is_file())
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

/// Where raw Engine API requests go (calls bollard lacks: start from a checkpoint).
#[derive(Debug, Clone)]
enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl Endpoint {
    /// `POST uri` with a JSON body; returns the status and (at most 1 MiB of) body.
    async fn post(&self, uri: &str, body: Bytes) -> Result<(u16, Bytes), String> {
        match self {
            Endpoint::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| format!("connecting to {}: {e}", path.display()))?;
                send(TokioIo::new(stream), uri, body).await
            }
            Endpoint::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(|e| format!("connecting to {addr}: {e}"))?;
                send(TokioIo::new(stream), uri, body).await
            }
        }
    }
}

async fn send<I>(io: I, uri: &str, body: Bytes) -> Result<(u16, Bytes), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let driver = tokio::spawn(conn);
    let request = hyper::Request::post(uri)
        .header(hyper::header::HOST, "docker")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| format!("request {uri}: {e}"))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request {uri}: {e}"))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), 1024 * 1024)
            .collect()
            .await
            .map_err(|e| format!("reading the answer to {uri}: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    driver.abort();
    result
}

/// Docker reports a failed dump as "criu failed: ... path= <dir>/criu-dump.log";
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

async fn probe_criu(criu: &Path, args: &[&str]) -> Result<(), String> {
    let shown = format!("{} {}", criu.display(), args.join(" "));
    let run = tokio::process::Command::new(criu)
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(CRIU_PROBE_TIMEOUT, run)
        .await
        .map_err(|_| format!("`{shown}` did not answer within {CRIU_PROBE_TIMEOUT:?}"))?
        .map_err(|e| format!("`{shown}` could not run: {e}; install criu 4 or newer"))?;
    if output.status.success() {
        return Ok(());
    }
    let text = String::from_utf8_lossy(&output.stderr).to_string()
        + &String::from_utf8_lossy(&output.stdout);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    Err(format!(
        "`{shown}` failed ({}): {last}; criu 4 or newer that passes `criu check` is needed",
        output.status
    ))
}

/// The `PATH` of the local `dockerd` serving `socket`, read from `/proc`.
fn daemon_path_var(socket: &Path) -> Option<std::ffi::OsString> {
    let default = [
        Path::new("/var/run/docker.sock"),
        Path::new("/run/docker.sock"),
    ];
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.first().is_some_and(|a| a.ends_with("dockerd")) {
            continue;
        }
        let mut hosts = Vec::new();
        let mut it = args.iter().skip(1);
        while let Some(a) = it.next() {
            if a == "-H" || a == "--host" {
                hosts.extend(it.next().cloned());
            } else if let Some(h) = a.strip_prefix("-H=").or_else(|| a.strip_prefix("--host=")) {
                hosts.push(h.to_owned());
            }
        }
        let serves = if hosts.is_empty() {
            default.contains(&socket)
        } else {
            hosts
                .iter()
                .any(|h| Path::new(h.strip_prefix("unix://").unwrap_or(h)) == socket)
        };
        if serves {
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            return environ
                .split(|b| *b == 0)
                .find_map(|kv| kv.strip_prefix(b"PATH="))
                .map(|v| std::ffi::OsString::from(String::from_utf8_lossy(v).into_owned()));
        }
    }
    None
}

fn state_of(inspect: &ContainerInspectResponse) -> String {
    inspect
        .state
        .as_ref()
        .and_then(|s| s.status)
        .map(|s| s.to_string())
        .unwrap_or_else(|| "in an unknown state".to_owned())
}

/// Replays deleted paths into a created container's overlay upper directory as
/// whiteouts (the archive API cannot delete).
fn remove_deleted(
    inspect: &ContainerInspectResponse,
    deleted: &[String],
) -> Result<(), CheckpointError> {
    let driver = inspect.graph_driver.as_ref();
    let upper = driver
        .filter(|d| d.name == "overlay2")
        .and_then(|d| d.data.get("UpperDir"));
    let Some(upper) = upper else {
        warn!(
            driver = driver.map(|d| d.name.as_str()).unwrap_or("unknown"),
            count = deleted.len(),
            "paths deleted in the checkpointed container are not removed: that needs the overlay2 storage driver"
        );
        return Ok(());
    };
    let upper = Path::new(upper);
    for path in deleted {
        let rel = container_path(path)?;
        let at = upper.join(rel);
        if let Some(parent) = at.parent() {
            mkdir(parent)?;
        }
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&at),
            Ok(_) => std::fs::remove_file(&at),
            Err(_) => Ok(()),
        }
        .map_err(|source| CheckpointError::Io {
            what: "removing",
            path: at.clone(),
            source,
        })?;
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &at,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::empty(),
            rustix::fs::makedev(0, 0),
        )
        .map_err(|e| CheckpointError::Io {
            what: "creating a whiteout at",
            path: at.clone(),
            source: e.into(),
        })?;
    }
    Ok(())
}

// --- Pure parts: planning, paths, packing ----------------------------------------

/// A rootfs change as `GET /containers/{id}/changes` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChangeKind {
    Modified,
    Added,
    Deleted,
}

/// What to carry of the writable layer.
#[derive(Debug, Default, PartialEq, Eq)]
struct RootfsPlan {
    /// Paths to download whole (added paths, and modified paths without changed
    /// descendants), ancestors before descendants.
    copy: Vec<String>,
    /// Paths deleted from the image (topmost only).
    deleted: Vec<String>,
}

fn plan_rootfs(changes: &[(String, ChangeKind)], volumes: &[String]) -> RootfsPlan {
    let skipped = |p: &str| {
        DOCKER_MANAGED
            .iter()
            .copied()
            .chain(volumes.iter().map(String::as_str))
            .any(|m| p == m || is_under(p, m))
            || container_path(p).is_err()
            || p == "/"
    };
    let all: BTreeMap<&str, ChangeKind> = changes
        .iter()
        .filter(|(p, _)| !skipped(p))
        .map(|(p, k)| (p.as_str(), *k))
        .collect();
    let ancestor_is = |p: &str, kind: ChangeKind| {
        let mut cur = Path::new(p).parent();
        while let Some(a) = cur.and_then(Path::to_str) {
            if all.get(a) == Some(&kind) {
                return true;
            }
            cur = Path::new(a).parent();
        }
        false
    };
    let mut plan = RootfsPlan::default();
    for (&p, &kind) in &all {
        match kind {
            ChangeKind::Deleted => {
                if !ancestor_is(p, ChangeKind::Deleted) {
                    plan.deleted.push(p.to_owned());
                }
            }
            ChangeKind::Added | ChangeKind::Modified => {
                if ancestor_is(p, ChangeKind::Added) {
                    continue;
                }
                let prefix = format!("{p}/");
                let has_descendants = all
                    .range(prefix.as_str()..)
                    .next()
                    .is_some_and(|(d, _)| d.starts_with(&prefix));
                if kind == ChangeKind::Added || !has_descendants {
                    plan.copy.push(p.to_owned());
                }
            }
        }
    }
    plan
}

fn is_under(path: &str, dir: &str) -> bool {
    path.strip_prefix(dir.trim_end_matches('/'))
        .is_some_and(|rest| rest.starts_with('/'))
}

/// An absolute path inside a container, as a relative path without `..`.
fn container_path(path: &str) -> Result<PathBuf, CheckpointError> {
    let bad = || CheckpointError::Invalid {
        what: "container path",
        value: path.to_owned(),
        expected: "an absolute path without `..`, e.g. /data",
    };
    let rest = path.strip_prefix('/').ok_or_else(bad)?;
    let rel = safe_relative(Path::new(rest)).ok_or_else(bad)?;
    if rel.as_os_str().is_empty() {
        return Err(bad());
    }
    Ok(rel)
}

/// `path` when it is relative and has only normal components (`.` is dropped).
fn safe_relative(path: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// A byte budget for what goes into one bundle.
#[derive(Debug)]
struct Budget {
    used: u64,
    limit: u64,
}

impl Budget {
    fn new(limit: u64) -> Self {
        Budget { used: 0, limit }
    }

    fn add(&mut self, n: u64, what: &str) -> Result<(), CheckpointError> {
        self.used = self.used.saturating_add(n);
        if self.used > self.limit {
            return Err(CheckpointError::TooLarge {
                what: format!("the checkpoint (at {what})"),
                bytes: self.used,
                limit: self.limit,
            });
        }
        Ok(())
    }
}

fn ensure_space(dir: &Path, bytes: u64) -> Result<(), CheckpointError> {
    let st = rustix::fs::statvfs(dir).map_err(|e| CheckpointError::Io {
        what: "reading free space of",
        path: dir.to_path_buf(),
        source: e.into(),
    })?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let needed = bytes.saturating_add(FREE_SPACE_MARGIN);
    if free < needed {
        return Err(CheckpointError::NoSpace {
            dir: dir.to_path_buf(),
            free,
            needed,
        });
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, CheckpointError> + Send + 'static,
) -> Result<T, CheckpointError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| CheckpointError::Io {
            what: "a worker thread failed while handling",
            path: PathBuf::from("the checkpoint"),
            source: io::Error::other(e.to_string()),
        })?
}

fn now_ms() -> u64 {
    novacron_common::clock::unix_ms(SystemTime::now())
}

fn create(path: &Path) -> Result<File, CheckpointError> {
    File::create(path).map_err(|source| CheckpointError::Io {
        what: "creating",
        path: path.to_path_buf(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(path).map_err(|source| CheckpointError::Io {
        what: "creating",
        path: path.to_path_buf(),
        source,
    })
}

fn remove_file(path: &Path) -> Result<(), CheckpointError> {
    std::fs::remove_file(path).map_err(|source| CheckpointError::Io {
        what: "deleting",
        path: path.to_path_buf(),
        source,
    })
}

fn tar_io(path: &Path) -> impl Fn(io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        what: "copying tar members of",
        path: path.to_path_buf(),
        source,
    }
}

fn finish_tar(out: tar::Builder<BufWriter<File>>, path: &Path) -> Result<(), CheckpointError> {
    out.into_inner()
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .and_then(|f| f.sync_all())
        .map_err(tar_io(path))
}

/// Copies the members of the tar file `src` into `out`, renamed by `rename`
/// (`None` drops a member). Hard link targets are renamed the same way.
fn retar(
    src: &Path,
    out: &mut tar::Builder<BufWriter<File>>,
    rename: impl Fn(&Path) -> Option<PathBuf>,
) -> Result<(), CheckpointError> {
    let err = tar_io(src);
    let file = File::open(src).map_err(&err)?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    for entry in archive.entries().map_err(&err)? {
        let mut entry = entry.map_err(&err)?;
        let name = entry.path().map_err(&err)?.into_owned();
        let Some(name) = safe_relative(&name).and_then(|n| rename(&n)) else {
            continue;
        };
        let mut header = entry.header().clone();
        let kind = header.entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            let target = entry.link_name().map_err(&err)?.map(|t| t.into_owned());
            let Some(mut target) = target else { continue };
            if kind.is_hard_link() {
                match safe_relative(&target).and_then(|t| rename(&t)) {
                    Some(t) => target = t,
                    None => continue,
                }
            }
            header.set_size(0);
            out.append_link(&mut header, &name, &target).map_err(&err)?;
        } else if kind.is_file() || kind.is_dir() || kind == tar::EntryType::Fifo {
            header.set_size(if kind.is_file() { entry.size() } else { 0 });
            out.append_data(&mut header, &name, &mut entry)
                .map_err(&err)?;
        }
    }
    Ok(())
}

/// Whether a tar file exists and holds at least one member.
fn tar_has_members(path: &Path) -> Result<bool, CheckpointError> {
    let Ok(file) = File::open(path) else {
        return Ok(false);
    };
    let mut archive = tar::Archive::new(BufReader::new(file));
    let mut entries = archive.entries().map_err(tar_io(path))?;
    Ok(entries.next().is_some())
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

/// A writer that hashes and counts what passes and refuses to pass more than
/// `limit` bytes.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
    limit: u64,
    exceeded: Arc<AtomicBool>,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written + buf.len() as u64 > self.limit {
            self.exceeded.store(true, Ordering::Relaxed);
            return Err(io::Error::other("bundle size limit reached"));
        }
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A reader that refuses to yield more than `limit` bytes.
struct LimitedReader<R> {
    inner: R,
    read: u64,
    limit: u64,
    exceeded: Arc<AtomicBool>,
}

impl<R: Read> Read for LimitedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        if self.read > self.limit {
            self.exceeded.store(true, Ordering::Relaxed);
            return Err(io::Error::other("decompressed bundle size limit reached"));
        }
        Ok(n)
    }
}

/// Packs the staged directory `stage` (bundle.json, criu/, rootfs.tar, volumes/)
/// into `<cache_dir>/<digest>.ncb`; returns the digest and size.
fn pack(stage: &Path, cache_dir: &Path, limit: u64) -> Result<(String, u64), CheckpointError> {
    let tmp = tempfile::Builder::new()
        .prefix(".pack-")
        .tempfile_in(cache_dir)
        .map_err(|source| CheckpointError::Io {
            what: "creating a temporary bundle in",
            path: cache_dir.to_path_buf(),
            source,
        })?;
    let file = tmp
        .as_file()
        .try_clone()
        .map_err(|source| CheckpointError::Io {
            what: "opening",
            path: tmp.path().to_path_buf(),
            source,
        })?;
    let exceeded = Arc::new(AtomicBool::new(false));
    let writer = HashingWriter {
        inner: BufWriter::new(file),
        hasher: Sha256::new(),
        written: 0,
        limit,
        exceeded: exceeded.clone(),
    };
    let result = (|| -> io::Result<HashingWriter<BufWriter<File>>> {
        let mut encoder = zstd::stream::Encoder::new(writer, 3)?;
        // Two workers: compression overlaps reading; a failure here only costs speed.
        let _ = encoder.multithread(2);
        let mut builder = tar::Builder::new(encoder);
        builder.follow_symlinks(false);
        builder.append_path_with_name(stage.join(META_FILE), META_FILE)?;
        if stage.join(CRIU_DIR).is_dir() {
            builder.append_dir_all(CRIU_DIR, stage.join(CRIU_DIR))?;
        }
        builder.append_path_with_name(stage.join(ROOTFS_TAR), ROOTFS_TAR)?;
        if stage.join(VOLUMES_DIR).is_dir() {
            builder.append_dir_all(VOLUMES_DIR, stage.join(VOLUMES_DIR))?;
        }
        let encoder = builder.into_inner()?;
        let mut writer = encoder.finish()?;
        writer.flush()?;
        Ok(writer)
    })();
    let writer = match result {
        Ok(w) => w,
        Err(_) if exceeded.load(Ordering::Relaxed) => {
            return Err(CheckpointError::TooLarge {
                what: "the compressed bundle".to_owned(),
                bytes: limit,
                limit,
            });
        }
        Err(source) => {
            return Err(CheckpointError::Io {
                what: "packing",
                path: stage.to_path_buf(),
                source,
            });
        }
    };
    let size = writer.written;
    let digest = hex::encode(writer.hasher.finalize());
    let path = cache_dir.join(format!("{digest}.{BUNDLE_EXT}"));
    tmp.as_file()
        .sync_all()
        .map_err(|source| CheckpointError::Io {
            what: "writing",
            path: tmp.path().to_path_buf(),
            source,
        })?;
    tmp.persist(&path).map_err(|e| CheckpointError::Io {
        what: "naming",
        path: path.clone(),
        source: e.error,
    })?;
    Ok((digest, size))
}

/// Streams the SHA-256 of `path` and compares it with `expected`.
fn verify_file(path: &Path, expected: &str) -> Result<u64, CheckpointError> {
    let err = |source| CheckpointError::Io {
        what: "reading",
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let actual = hex::encode(hasher.finalize());
    if actual != expected {
        return Err(CheckpointError::DigestMismatch {
            path: path.to_path_buf(),
            expected: expected.to_owned(),
            actual,
        });
    }
    Ok(size)
}

/// Unpacks the bundle at `bundle` into the empty directory `dest` and checks it
/// whole: member names and kinds, the inner tars, and `bundle.json`.
fn unpack(bundle: &Path, dest: &Path, limit: u64) -> Result<BundleMeta, CheckpointError> {
    let name = bundle
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bad = |reason: String| CheckpointError::BadBundle {
        bundle: name.clone(),
        reason,
    };
    let file = File::open(bundle).map_err(|source| CheckpointError::Io {
        what: "opening",
        path: bundle.to_path_buf(),
        source,
    })?;
    let exceeded = Arc::new(AtomicBool::new(false));
    let decoder = zstd::stream::Decoder::new(file)
        .map_err(|e| bad(format!("it is not zstd-compressed: {e}")))?;
    let reader = LimitedReader {
        inner: decoder,
        read: 0,
        limit,
        exceeded: exceeded.clone(),
    };
    let too_large = || CheckpointError::TooLarge {
        what: format!("bundle {name} once decompressed"),
        bytes: limit,
        limit,
    };
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("it is not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| {
            if exceeded.load(Ordering::Relaxed) {
                too_large()
            } else {
                bad(format!("reading a member: {e}"))
            }
        })?;
        let raw = entry
            .path()
            .map_err(|e| bad(format!("a member name is not valid: {e}")))?
            .into_owned();
        let rel = safe_relative(&raw)
            .filter(|r| !r.as_os_str().is_empty())
            .ok_or_else(|| {
                bad(format!(
                    "member {raw:?} is absolute or leaves the bundle (`..`); only relative paths inside it are accepted"
                ))
            })?;
        let at = dest.join(&rel);
        let kind = entry.header().entry_type();
        if kind.is_dir() {
            mkdir(&at)?;
        } else if kind.is_file() {
            if let Some(parent) = at.parent() {
                mkdir(parent)?;
            }
            let mut out = create(&at)?;
            io::copy(&mut entry, &mut out).map_err(|e| {
                if exceeded.load(Ordering::Relaxed) {
                    too_large()
                } else {
                    bad(format!("reading member {raw:?}: {e}"))
                }
            })?;
        } else {
            return Err(bad(format!(
                "member {raw:?} is a {kind:?}; only files and directories are accepted"
            )));
        }
    }

    let meta_path = dest.join(META_FILE);
    let mut json = Vec::new();
    File::open(&meta_path)
        .map_err(|_| bad(format!("it has no {META_FILE}")))?
        .take(MAX_META_BYTES)
        .read_to_end(&mut json)
        .map_err(|e| bad(format!("reading {META_FILE}: {e}")))?;
    let meta: BundleMeta =
        serde_json::from_slice(&json).map_err(|e| bad(format!("{META_FILE} is not valid: {e}")))?;
    if meta.format != BUNDLE_FORMAT {
        return Err(bad(format!(
            "format {} is not supported; this agent reads format {BUNDLE_FORMAT}",
            meta.format
        )));
    }
    match (&meta.mode, &meta.criu_name) {
        (CheckpointMode::Live, Some(n)) => {
            let ok = !n.is_empty()
                && n.len() <= 128
                && n != "."
                && n != ".."
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(bad(format!(
                    "CRIU checkpoint name {n:?} is not valid; expected letters, digits, '.', '_' or '-'"
                )));
            }
            if !dest.join(CRIU_DIR).is_dir() {
                return Err(bad(format!("mode live but no {CRIU_DIR}/ directory")));
            }
        }
        (CheckpointMode::Live, None) => {
            return Err(bad("mode live but no CRIU checkpoint name".to_owned()));
        }
        (CheckpointMode::Fs, _) => {}
        (CheckpointMode::Auto, _) => {
            return Err(bad("mode auto; a bundle is live or fs".to_owned()));
        }
    }
    for path in meta.deleted.iter().chain(&meta.volumes) {
        container_path(path).map_err(|e| bad(e.to_string()))?;
    }
    let mut inner = vec![dest.join(ROOTFS_TAR)];
    inner.extend((0..meta.volumes.len()).map(|n| dest.join(VOLUMES_DIR).join(format!("{n}.tar"))));
    for tar in inner.iter().filter(|t| t.exists()) {
        check_inner_tar(tar).map_err(bad)?;
    }
    Ok(meta)
}

/// Checks that every member of an inner tar has a relative name without `..`.
fn check_inner_tar(path: &Path) -> Result<(), String> {
    let shown = path.file_name().unwrap_or_default().to_string_lossy();
    let file = File::open(path).map_err(|e| format!("opening {shown}: {e}"))?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    let entries = archive
        .entries()
        .map_err(|e| format!("{shown} is not a tar archive: {e}"))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("reading {shown}: {e}"))?;
        let name = entry
            .path()
            .map_err(|e| format!("a member name in {shown} is not valid: {e}"))?;
        if safe_relative(&name).is_none() {
            return Err(format!(
                "{shown} member {name:?} is absolute or leaves its root (`..`); only relative paths are accepted"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn fs_meta(volumes: Vec<String>) -> BundleMeta {
        BundleMeta {
            format: BUNDLE_FORMAT,
            mode: CheckpointMode::Fs,
            alloc: "a1".into(),
            job: "j1".into(),
            image: "img".into(),
            criu_name: None,
            deleted: vec!["/bin/vi".into()],
            volumes,
            created_unix_ms: 7,
            container: None,
        }
    }

    fn tar_with(path: &Path, files: &[(&str, &[u8])]) {
        let mut b = tar::Builder::new(File::create(path).expect("create tar"));
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, name, *data).expect("append");
        }
        b.finish().expect("finish tar");
    }

    /// A stage directory as `checkpoint` leaves it before packing.
    fn stage(dir: &Path, live: bool) -> BundleMeta {
        let mut meta = fs_meta(vec!["/data".into()]);
        if live {
            meta.mode = CheckpointMode::Live;
            meta.criu_name = Some("nc-1".into());
            std::fs::create_dir_all(dir.join("criu/sub")).expect("mkdir");
            std::fs::write(dir.join("criu/pages-1.img"), vec![7u8; 100_000]).expect("w");
            std::fs::write(dir.join("criu/sub/x.img"), b"x").expect("w");
        }
        std::fs::write(
            dir.join(META_FILE),
            serde_json::to_vec(&meta).expect("json"),
        )
        .expect("w");
        tar_with(&dir.join(ROOTFS_TAR), &[("etc/marker", b"hello")]);
        std::fs::create_dir_all(dir.join(VOLUMES_DIR)).expect("mkdir");
        tar_with(&dir.join("volumes/0.tar"), &[("counter", b"41")]);
        meta
    }

    fn checkpointer(cache: &Path) -> Checkpointer {
        Checkpointer::new(Some("unix:///nonexistent/docker.sock"), cache.to_path_buf())
            .expect("checkpointer")
    }

    /// Writes `tar_bytes` zstd-compressed into the cache under its digest.
    fn cache_raw(cache: &Path, tar_bytes: &[u8]) -> String {
        let z = zstd::encode_all(tar_bytes, 3).expect("zstd");
        let digest = hex::encode(Sha256::digest(&z));
        std::fs::write(cache.join(format!("{digest}.{BUNDLE_EXT}")), z).expect("w");
        digest
    }

    #[tokio::test]
    async fn bundles_pack_and_unpack_to_the_same_content() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (st, cache, out) = (
            tmp.path().join("s"),
            tmp.path().join("c"),
            tmp.path().join("o"),
        );
        for d in [&st, &out] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        let meta = stage(&st, true);
        let cp = checkpointer(&cache);
        let (digest, size) = pack(&st, &cache, MAX_BUNDLE_BYTES).expect("pack");
        assert_eq!(cp.verify(&digest).await.expect("verify"), size);
        let back = unpack(
            &cp.bundle_path(&digest).expect("path"),
            &out,
            MAX_BUNDLE_BYTES,
        )
        .expect("unpack");
        assert_eq!(back, meta);
        for rel in [
            "criu/pages-1.img",
            "criu/sub/x.img",
            ROOTFS_TAR,
            "volumes/0.tar",
        ] {
            assert_eq!(
                std::fs::read(st.join(rel)).expect("read"),
                std::fs::read(out.join(rel)).expect("read"),
                "{rel}"
            );
        }
        assert!(tar_has_members(&out.join(ROOTFS_TAR)).expect("tar"));
        assert!(size < 100_000, "zstd compressed the image: {size}");
    }

    #[tokio::test]
    async fn a_flipped_byte_fails_verify_naming_both_digests() {
        let tmp = tempfile::tempdir().expect("tmp");
        let st = tmp.path().join("s");
        std::fs::create_dir_all(&st).expect("mkdir");
        stage(&st, false);
        let cp = checkpointer(&tmp.path().join("c"));
        let (digest, _) = pack(&st, cp.cache_dir(), MAX_BUNDLE_BYTES).expect("pack");
        let path = cp.bundle_path(&digest).expect("path");
        let mut bytes = std::fs::read(&path).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        std::fs::write(&path, bytes).expect("write");
        let err = cp.verify(&digest).await.expect_err("corrupt bundle passed");
        let CheckpointError::DigestMismatch { actual, .. } = &err else {
            panic!("unexpected error {err}");
        };
        let msg = err.to_string();
        assert!(
            msg.contains(&digest) && msg.contains(actual.as_str()),
            "{msg}"
        );
        assert_ne!(actual, &digest);
        // Restore refuses before it touches Docker (the socket here does not exist).
        let err = cp
            .restore(&digest, "c1")
            .await
            .expect_err("restored corrupt");
        assert!(
            matches!(err, CheckpointError::DigestMismatch { .. }),
            "{err}"
        );
        // Bad names never become paths.
        assert!(matches!(
            cp.verify("../../etc/passwd").await,
            Err(CheckpointError::Invalid { .. })
        ));
        assert!(matches!(
            cp.verify(&"0".repeat(64)).await,
            Err(CheckpointError::NotFound { .. })
        ));
    }

    /// A tar whose one member is named `name` verbatim (tar::Builder refuses `..`).
    fn raw_tar(name: &[u8]) -> Vec<u8> {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_size(1);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        out.push(b'x');
        out.resize(1024 + 1536, 0);
        out
    }

    #[test]
    fn members_that_escape_are_refused() {
        let tmp = tempfile::tempdir().expect("tmp");
        let out = tmp.path().join("o");
        for name in [&b"../x"[..], b"/etc/passwd", b"criu/../../x"] {
            std::fs::create_dir_all(&out).expect("mkdir");
            let digest = cache_raw(tmp.path(), &raw_tar(name));
            let bundle = tmp.path().join(format!("{digest}.{BUNDLE_EXT}"));
            let err = unpack(&bundle, &out, MAX_BUNDLE_BYTES).expect_err("escaped");
            let msg = err.to_string();
            assert!(
                matches!(err, CheckpointError::BadBundle { .. }) && msg.contains("`..`"),
                "{msg}"
            );
            assert!(!tmp.path().join("x").exists());
            std::fs::remove_dir_all(&out).expect("rm");
        }
        // Inside the inner tars too.
        let inner = tmp.path().join("rootfs.tar");
        std::fs::write(&inner, raw_tar(b"../../etc/shadow")).expect("w");
        assert!(
            check_inner_tar(&inner)
                .expect_err("escaped")
                .contains("`..`")
        );
    }

    #[test]
    fn unpacking_stops_at_the_decompressed_limit() {
        let tmp = tempfile::tempdir().expect("tmp");
        let st = tmp.path().join("s");
        std::fs::create_dir_all(&st).expect("mkdir");
        stage(&st, true);
        let (digest, size) = pack(&st, tmp.path(), MAX_BUNDLE_BYTES).expect("pack");
        let bundle = tmp.path().join(format!("{digest}.{BUNDLE_EXT}"));
        let out = tmp.path().join("o");
        std::fs::create_dir_all(&out).expect("mkdir");
        let err = unpack(&bundle, &out, 50_000).expect_err("bomb unpacked");
        assert!(
            matches!(err, CheckpointError::TooLarge { limit: 50_000, .. }),
            "{err}"
        );
        let err = pack(&st, tmp.path(), size / 2).expect_err("over the limit");
        assert!(matches!(err, CheckpointError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn the_rootfs_plan_copies_each_change_once() {
        use ChangeKind::*;
        let changes: Vec<(String, ChangeKind)> = [
            ("/etc", Modified),
            ("/etc/marker", Added),
            ("/etc/hosts", Modified),
            ("/app", Added),
            ("/app/lib", Added),
            ("/app/lib/x", Added),
            ("/bin", Modified),
            ("/bin/vi", Deleted),
            ("/opt", Deleted),
            ("/opt/y", Deleted),
            ("/root/.ash_history", Modified),
            ("/root", Modified),
            ("/data", Added),
            ("/data/counter", Added),
            ("/../x", Added),
        ]
        .into_iter()
        .map(|(p, k)| (p.to_owned(), k))
        .collect();
        let plan = plan_rootfs(&changes, &["/data".to_owned()]);
        assert_eq!(plan.copy, ["/app", "/etc/marker", "/root/.ash_history"]);
        assert_eq!(plan.deleted, ["/bin/vi", "/opt"]);
        assert!(container_path("/data").is_ok());
        for bad in ["data", "/", "/a/../b", ""] {
            assert!(container_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn prune_keeps_the_newest_of_an_allocation() {
        let tmp = tempfile::tempdir().expect("tmp");
        let cp = checkpointer(tmp.path());
        let info = |alloc: &str, d: char, at: u64| BundleInfo {
            digest: d.to_string().repeat(64),
            size: 1,
            mode: CheckpointMode::Fs,
            alloc: alloc.into(),
            job: "j".into(),
            node: "n".into(),
            created_unix_ms: at,
            dump_ms: 1,
        };
        let all = [
            info("a", '1', 1),
            info("a", '2', 3),
            info("a", '3', 2),
            info("b", '4', 1),
        ];
        for b in &all {
            std::fs::write(cp.bundle_path(&b.digest).expect("p"), b"x").expect("w");
        }
        cp.index_update(|i| i.bundles.extend(all.iter().cloned()))
            .expect("index");
        cp.prune("a", 1).expect("prune");
        let left: Vec<String> = cp
            .bundles()
            .expect("list")
            .into_iter()
            .map(|b| b.digest)
            .collect();
        assert_eq!(left, ["4".repeat(64), "2".repeat(64)]);
        assert!(!cp.bundle_path(&"1".repeat(64)).expect("p").exists());
        assert!(!cp.bundle_path(&"3".repeat(64)).expect("p").exists());
        assert!(cp.bundle_path(&"2".repeat(64)).expect("p").exists());
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

        use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType};
        use bollard::query_parameters::CreateContainerOptionsBuilder;

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

        async fn client(host: &str) -> Docker {
            Docker::connect_with_unix(host, 120, API_DEFAULT_VERSION)
                .expect("connect")
                .negotiate_version()
                .await
                .expect("negotiate")
        }

        async fn create(
            docker: &Docker,
            name: &str,
            volume: &str,
            script: &str,
            guard: &mut Cleanup,
        ) -> String {
            guard.volumes.push(volume.to_owned());
            guard.containers.push(name.to_owned());
            let body = ContainerCreateBody {
                image: Some(IMAGE.to_owned()),
                cmd: Some(vec!["sh".into(), "-c".into(), script.to_owned()]),
                host_config: Some(HostConfig {
                    mounts: Some(vec![Mount {
                        typ: Some(MountType::VOLUME),
                        source: Some(volume.to_owned()),
                        target: Some("/data".into()),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let options = CreateContainerOptionsBuilder::default().name(name).build();
            docker
                .create_container(Some(options), body)
                .await
                .expect("create container")
                .id
        }

        /// The content of one file in a container, through the archive API.
        async fn read_file(docker: &Docker, id: &str, path: &str) -> Option<String> {
            let options = DownloadFromContainerOptions {
                path: path.to_owned(),
            };
            let mut stream = docker.download_from_container(id, Some(options));
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.next().await {
                bytes.extend_from_slice(&chunk.ok()?);
            }
            let mut archive = tar::Archive::new(bytes.as_slice());
            let mut entry = archive.entries().ok()?.next()?.ok()?;
            let mut text = String::new();
            entry.read_to_string(&mut text).ok()?;
            Some(text)
        }

        /// The last value the loop wrote to its log (the log is appended through an
        /// open descriptor, one write per line, so it is never seen half-written as
        /// the truncated counter file can be).
        async fn counter(docker: &Docker, id: &str) -> u64 {
            let log = read_file(docker, id, "/data/log").await.unwrap_or_default();
            log.lines()
                .rev()
                .find_map(|l| l.trim().parse().ok())
                .unwrap_or(0)
        }

        /// Counts in a volume holding the log open (CRIU checks open files' sizes)
        /// and goes on from the volume's counter when started afresh. Only a first
        /// start (no /marker yet) deletes /bin/vi, so its absence after an fs restore
        /// shows that the deletion was carried.
        const SCRIPT: &str = "[ -f /marker ] || { echo first-$RANDOM$RANDOM > /marker; rm -f /bin/vi; }; \
            i=$(cat /data/counter 2>/dev/null || echo 0); exec 3>>/data/log; \
            while true; do i=$((i+1)); echo $i > /data/counter; echo $i >&3; sleep 0.05; done";

        #[tokio::test]
        async fn live_and_fs_checkpoints_restore_into_new_containers() {
            let Some(host) = host() else { return };
            build_image(&host);
            let docker = client(&host).await;
            let tag = format!("nc-ckpt-{}-{}", std::process::id(), now_ms() % 100_000);
            let mut guard = Cleanup {
                host: host.clone(),
                containers: vec![],
                volumes: vec![],
            };
            let cache = tempfile::tempdir().expect("tmp");
            let cp = Checkpointer::new(Some(&host), cache.path().to_path_buf()).expect("cp");
            cp.live_capability().await.expect("live capability");
            let volumes = vec!["/data".to_owned()];

            // Live.
            let a = create(
                &docker,
                &format!("{tag}-a"),
                &format!("{tag}-va"),
                SCRIPT,
                &mut guard,
            )
            .await;
            docker
                .start_container(&a, None::<bollard::query_parameters::StartContainerOptions>)
                .await
                .expect("start");
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
            let at_dump = counter(&docker, &a).await;
            assert!(at_dump > 5, "the loop ran before the dump: {at_dump}");
            let b = create(
                &docker,
                &format!("{tag}-b"),
                &format!("{tag}-vb"),
                SCRIPT,
                &mut guard,
            )
            .await;
            let t = Instant::now();
            assert_eq!(
                cp.restore(&live.digest, &b).await.expect("live restore"),
                CheckpointMode::Live
            );
            let restore_ms = t.elapsed().as_millis();
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let after = counter(&docker, &b).await;
            let log = read_file(&docker, &b, "/data/log")
                .await
                .unwrap_or_default();
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
                read_file(&docker, &a, "/marker").await,
                read_file(&docker, &b, "/marker").await,
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
            let at_dump = counter(&docker, &b).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            assert!(
                counter(&docker, &b).await > at_dump,
                "the source went on running"
            );
            let d = create(
                &docker,
                &format!("{tag}-d"),
                &format!("{tag}-vd"),
                SCRIPT,
                &mut guard,
            )
            .await;
            let t = Instant::now();
            cp.restore(&periodic.digest, &d)
                .await
                .expect("restore of a keep-running checkpoint");
            let restore_ms = t.elapsed().as_millis();
            tokio::time::sleep(Duration::from_millis(700)).await;
            let resumed = counter(&docker, &d).await;
            let running = docker
                .inspect_container(&d, None::<InspectContainerOptions>)
                .await
                .expect("inspect")
                .state
                .and_then(|s| s.running);
            assert_eq!(running, Some(true), "the restored copy runs");
            eprintln!(
                "live keep-running: bundle {} bytes, paused (dump_ms) {}, checkpoint {checkpoint_ms} ms, restore {restore_ms} ms, counter at dump <= {at_dump}, restored -> {resumed}",
                periodic.size, periodic.dump_ms
            );
            assert!(resumed > 0, "the restored copy counts: {resumed}");
            let log = read_file(&docker, &d, "/data/log")
                .await
                .unwrap_or_default();
            let first: Vec<&str> = log.lines().take(3).collect();
            assert_eq!(
                first,
                ["1", "2", "3"],
                "the volume log was carried from the start"
            );

            // Fs, from the restored container.
            let marker = read_file(&docker, &b, "/marker").await.expect("marker");
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
            let at_stop = counter(&docker, &b).await;
            let c = create(
                &docker,
                &format!("{tag}-c"),
                &format!("{tag}-vc"),
                SCRIPT,
                &mut guard,
            )
            .await;
            let t = Instant::now();
            assert_eq!(
                cp.restore(&fs.digest, &c).await.expect("fs restore"),
                CheckpointMode::Fs
            );
            let restore_ms = t.elapsed().as_millis();
            tokio::time::sleep(Duration::from_millis(700)).await;
            let after = counter(&docker, &c).await;
            eprintln!(
                "fs: bundle {} bytes, dump_ms {}, checkpoint {checkpoint_ms} ms, restore {restore_ms} ms, counter {at_stop} -> {after}",
                fs.size, fs.dump_ms
            );
            assert!(
                after > at_stop,
                "the volume counter was carried: {at_stop} -> {after}"
            );
            assert_eq!(
                read_file(&docker, &c, "/marker").await.as_deref(),
                Some(marker.as_str())
            );
            assert_eq!(
                read_file(&docker, &c, "/bin/vi").await,
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

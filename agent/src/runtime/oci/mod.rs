//! Agent-owned containers: runc containers that the agent builds, starts,
//! supervises, adopts, checkpoints and restores itself, behind the same
//! [`super::ContainerRuntime`] operations as Docker's (through
//! [`super::host::HostRuntime`]). They exist so that CRIU can be driven
//! directly: Docker 20.10's checkpoint API copies the image through
//! containerd's content store on both sides (most of a migration's pause), and
//! it cannot adopt a process that runc restored behind its back.
//!
//! A node runs its containers this way with `container_runtime = "runc"` (the
//! agent's `--container-runtime runc`); Docker stays the image store, and GPU
//! tasks stay Docker's (the NVIDIA hook is Docker's).
//!
//! - **Root file system:** the image's files, exported from Docker once per
//!   image id into `oci/images/<id>/rootfs`, are the lower layer of an overlay
//!   mounted at `oci/<id>/rootfs`; its upper directory `oci/<id>/upper` is the
//!   container's writable layer.
//! - **Network:** a sandbox, a Docker container that only waits (see
//!   [`super::docker::sandbox`]), holds the network namespace that the runc
//!   container joins: Docker's address, DNS files and volumes, as a
//!   Kubernetes pod's pause container does. CRIU treats that namespace as
//!   external, so a restore joins the target's sandbox.
//! - **Published ports** are the agent's DNAT rules to the sandbox's address
//!   ([`publish`]), written once the container runs and withdrawn when it
//!   stops or freezes for a migration: a migration's target starts its
//!   sandbox before the source freezes (the same host included), and the
//!   ports move with one rule change.
//! - **Supervision:** each run is `runc run` in the foreground under a small
//!   shell (its own session), which appends the output to `console.log` and
//!   writes runc's exit status to `exit`; the container outlives an agent
//!   restart and the next agent adopts it from `oci/<id>/meta.json` and
//!   `runc state`.
//! - **Checkpoints:** `runc checkpoint` and `runc restore`, CRIU reading the
//!   options in `oci/criu.conf` (`tcp-close`, `skip-in-flight`) through the
//!   `org.criu.config` annotation.

pub mod confinement;
pub mod guard;
pub mod publish;
pub mod spec;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, BoxStream, StreamExt};
use novacron_common::wire::OciCapability;
use serde::{Deserialize, Serialize};
use tokio::process::Command;
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::docker::DockerRuntime;
use super::netfilter::Dnat;
use super::vm::{find_on_path, last_lines, now_ms, read_from};
use super::{
    ContainerConfig, ContainerDetails, ContainerListing, ContainerRuntime, ContainerStatus,
    LABEL_NODE, LogFrame, MountConfig, RuntimeError, StatsReading,
};
use spec::Bind;

/// Ids of agent-owned containers begin with this; Docker's are hexadecimal.
pub const ID_PREFIX: &str = "oci-";

pub use super::docker::sandbox::LABEL_SANDBOX;

/// The CRIU options every dump and restore of an agent-owned container needs:
/// clients see a reset instead of a hang (the address changes across hosts).
pub const CRIU_OPTIONS: &str = "tcp-close\nskip-in-flight\n";

/// How long a run may take to be running.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The limit on one short runc call (state, kill, delete, events).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The limit on a dump or a restore.
const CRIU_TIMEOUT: Duration = Duration::from_secs(300);
/// The console keeps this much of earlier runs.
const CONSOLE_KEEP: usize = 1 << 20;

/// Whether `id` names an agent-owned container.
pub fn is_oci(id: &str) -> bool {
    id.starts_with(ID_PREFIX)
}

/// How the container's process is set up, kept from create to each start.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Run {
    args: Vec<String>,
    env: Vec<String>,
    cwd: String,
    uid: u32,
    gid: u32,
    memory_bytes: Option<i64>,
    nano_cpus: Option<i64>,
    /// Mount targets mounted read-only.
    read_only: Vec<String>,
}

/// What the driver keeps of one container, in `meta.json` (mode 0600: the
/// environment may hold secrets, as Docker's own config does).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    id: String,
    name: String,
    labels: HashMap<String, String>,
    image: String,
    image_id: String,
    /// The sandbox's Docker id.
    sandbox: String,
    /// The image's files (the overlay's lower layer).
    lower: PathBuf,
    run: Run,
    started_unix_ms: Option<u64>,
    /// How its last run ended, when the driver ended it or saw it end.
    exit: Option<Exit>,
    /// The ports it publishes, host ports fixed at create.
    #[serde(default)]
    ports: Vec<Port>,
    /// The address they are published on.
    #[serde(default = "unspecified")]
    publish: std::net::Ipv4Addr,
    /// The rules in force for them (empty while it does not run, or is
    /// frozen for a migration).
    #[serde(default)]
    published: Vec<Dnat>,
    /// The sandbox itself publishes the ports through Docker (a container
    /// made by an agent from before [`publish`]).
    #[serde(default = "yes")]
    sandbox_publishes: bool,
}

fn unspecified() -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::UNSPECIFIED
}

fn yes() -> bool {
    true
}

/// One port of a container to publish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Port {
    container_port: u16,
    host_port: u16,
    udp: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Exit {
    code: i64,
    error: String,
}

/// A post-copy dump in progress ([`OciDriver::checkpoint_lazy`]): runc and
/// CRIU, whose page server serves the container's pages.
#[derive(Debug)]
pub struct LazyDump {
    child: Option<tokio::process::Child>,
    /// runc's process group (runc and CRIU).
    pgid: Option<u32>,
    /// How long the freeze and the dump of everything but the pages took, ms.
    pub dump_ms: u64,
    work: PathBuf,
}

/// The bytes CRIU's page server puts in one pipe (`PIPE_MAX_SIZE`, 1024
/// pages): without `CAP_SYS_RESOURCE`, a smaller `fs.pipe-max-size` makes it
/// fail every page request (its `splice` then reports EBADF), so the agent
/// raises the limit to this at start where it is lower.
pub const LAZY_PIPE_BYTES: u64 = 4 << 20;
const PIPE_MAX_SIZE: &str = "/proc/sys/fs/pipe-max-size";

impl LazyDump {
    /// runc's process group (runc and CRIU), to kill them together.
    pub fn process_group(&self) -> Option<u32> {
        self.pgid
    }
}

/// Whether CRIU's page server can fill its pipes here, raising
/// `fs.pipe-max-size` when needed (and allowed); `Err` says why not.
fn lazy_pipes_fit() -> Result<(), String> {
    let read = || {
        std::fs::read_to_string(PIPE_MAX_SIZE)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
    };
    let now = read().ok_or_else(|| format!("cannot read {PIPE_MAX_SIZE}"))?;
    if now >= LAZY_PIPE_BYTES || has_sys_resource() {
        return Ok(());
    }
    std::fs::write(PIPE_MAX_SIZE, LAZY_PIPE_BYTES.to_string()).map_err(|e| {
        format!("fs.pipe-max-size is {now} and cannot be raised to {LAZY_PIPE_BYTES}: {e}")
    })?;
    info!(
        from = now,
        to = LAZY_PIPE_BYTES,
        "raised fs.pipe-max-size for CRIU's lazy pages"
    );
    Ok(())
}

/// Whether this process holds `CAP_SYS_RESOURCE` (bit 24 of `CapEff`).
fn has_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

/// The agent-owned container driver of one node.
#[derive(Debug)]
pub struct OciDriver {
    dir: PathBuf,
    runc: PathBuf,
    criu: PathBuf,
    capability: OciCapability,
    docker: DockerRuntime,
    /// One lock per container, so that start, stop, checkpoint and remove of
    /// one container do not interleave.
    locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    publisher: publish::Publisher,
    /// Held while the rules are rebuilt from the containers' records.
    ports: Mutex<()>,
}

impl OciDriver {
    /// The driver, when runc and CRIU are installed and `criu check` passes:
    /// `state_dir/oci` is made and the CRIU options written. `criu`: the CRIU
    /// binary (default `criu` on `PATH`). `Err` says why not.
    pub async fn detect(
        state_dir: &Path,
        criu: Option<&Path>,
        docker: DockerRuntime,
    ) -> Result<OciDriver, String> {
        if let Some(why) = confinement::refusal(&confinement::problems(&confinement::current())) {
            return Err(why);
        }
        let runc = find_on_path("runc")
            .ok_or("runc is not installed (Debian: apt-get install runc)".to_owned())?;
        let criu = match criu {
            Some(p) => p.to_path_buf(),
            None => find_on_path("criu")
                .ok_or("criu is not installed (criu 4.2 or newer is needed)".to_owned())?,
        };
        let runc_version = first_line(&output(&runc, &["--version"]).await?)
            .trim_start_matches("runc version ")
            .to_owned();
        let criu_version = first_line(&output(&criu, &["--version"]).await?)
            .trim_start_matches("Version: ")
            .to_owned();
        output(&criu, &["check"])
            .await
            .map_err(|e| format!("criu check failed, so runc cannot checkpoint here: {e}"))?;
        let feature = |name: &'static str| {
            let criu = criu.clone();
            async move {
                output(&criu, &["check", "--feature", name])
                    .await
                    .is_ok_and(|out| out.contains("is supported"))
            }
        };
        let capability = OciCapability {
            runc_version,
            criu_version,
            lazy_pages: feature("uffd-noncoop").await
                && lazy_pipes_fit()
                    .inspect_err(|why| warn!(%why, "post-copy migration is off on this node"))
                    .is_ok()
                // CRIU's page server listens on every address: post-copy
                // only where its port can be closed to other hosts.
                && guard::usable()
                    .await
                    .inspect_err(|why| warn!(%why, "post-copy migration is off on this node: the page server's port cannot be closed to other hosts"))
                    .is_ok(),
            dirty_tracking: feature("mem_dirty_track").await,
        };
        if capability.lazy_pages {
            guard::sweep().await;
        }
        let dir = state_dir.join("oci");
        std::fs::create_dir_all(dir.join("images"))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        std::fs::write(dir.join("criu.conf"), CRIU_OPTIONS)
            .map_err(|e| format!("{}: {e}", dir.join("criu.conf").display()))?;
        let publisher = publish::Publisher::new(&dir);
        publisher
            .setup()
            .await
            .map_err(|e| format!("runc containers' ports cannot be published here: {e}"))?;
        let driver = OciDriver {
            dir,
            runc,
            criu,
            capability,
            docker,
            locks: Default::default(),
            publisher,
            ports: Mutex::new(()),
        };
        // The rules outlived the last agent; they are rewritten from the
        // records, in case one changed while no agent ran.
        driver
            .sync_ports()
            .await
            .map_err(|e| format!("runc containers' ports cannot be published here: {e}"))?;
        Ok(driver)
    }

    /// Makes the published ports those the containers' records hold.
    async fn sync_ports(&self) -> Result<(), RuntimeError> {
        let _held = self.ports.lock().await;
        let forwards: Vec<Dnat> = self
            .ids()
            .iter()
            .filter_map(|id| self.read_meta(id).ok())
            .flat_map(|m| m.published)
            .collect();
        self.publisher
            .set(&forwards)
            .await
            .map_err(|e| daemon("publish", e))
    }

    /// Publishes the ports of container `meta` (which runs now) to its
    /// sandbox's address, and records them.
    async fn publish(&self, meta: &mut Meta) -> Result<(), RuntimeError> {
        if meta.ports.is_empty() || meta.sandbox_publishes {
            return Ok(());
        }
        let to = match self.docker.inspect(&meta.sandbox).await?.ip {
            Some(std::net::IpAddr::V4(ip)) => ip,
            other => {
                return Err(daemon(
                    "publish",
                    format!(
                        "the sandbox of {} has no IPv4 address ({other:?}), so its ports cannot be published",
                        meta.id
                    ),
                ));
            }
        };
        meta.published = meta
            .ports
            .iter()
            .map(|p| Dnat {
                owner: meta.id.clone(),
                publish: meta.publish,
                host_port: p.host_port,
                to,
                to_port: p.container_port,
                udp: p.udp,
            })
            .collect();
        self.write_meta(meta)?;
        self.sync_ports().await?;
        info!(container = %meta.id, ports = meta.published.len(), address = %to, "published");
        Ok(())
    }

    /// Withdraws the published ports of container `meta` (stopped, removed,
    /// or frozen for a migration), and records it.
    async fn withdraw(&self, meta: &mut Meta) -> Result<(), RuntimeError> {
        if meta.published.is_empty() {
            return Ok(());
        }
        meta.published.clear();
        self.write_meta(meta)?;
        self.sync_ports().await
    }

    /// What the node reports.
    pub fn capability(&self) -> OciCapability {
        self.capability.clone()
    }

    fn container_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    /// Where the files of the image with id `image_id` are kept.
    pub fn image_dir(&self, image_id: &str) -> PathBuf {
        let key: String = image_id
            .trim_start_matches("sha256:")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(24)
            .collect();
        self.dir.join("images").join(key)
    }

    /// The container's writable layer (the overlay's upper directory).
    pub fn upper_dir(&self, id: &str) -> PathBuf {
        self.container_dir(id).join("upper")
    }

    fn lock_of(&self, id: &str) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.to_owned()).or_default().clone()
    }

    fn read_meta(&self, id: &str) -> Result<Meta, RuntimeError> {
        let path = self.container_dir(id).join("meta.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                RuntimeError::NotFound {
                    op: "oci",
                    message: format!("no container {id}"),
                }
            } else {
                daemon("oci", format!("{}: {e}", path.display()))
            }
        })?;
        serde_json::from_str(&text).map_err(|e| daemon("oci", format!("{}: {e}", path.display())))
    }

    fn write_meta(&self, meta: &Meta) -> Result<(), RuntimeError> {
        let path = self.container_dir(&meta.id).join("meta.json");
        let text = serde_json::to_string_pretty(meta).map_err(|e| daemon("oci", e.to_string()))?;
        novacron_common::files::write_atomic(&path, &text, 0o600)
            .map_err(|e| daemon("oci", format!("{}: {e}", path.display())))
    }

    fn ids(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| is_oci(n))
            .collect();
        ids.sort();
        ids
    }

    fn runc_cmd(&self) -> Command {
        let mut cmd = Command::new(&self.runc);
        cmd.arg("--root")
            .arg(self.dir.join("runc"))
            .arg("--criu")
            .arg(&self.criu)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// runc's word for the container (`created`, `running`, `paused`,
    /// `stopped`), `None` when runc does not know it or cannot be asked.
    async fn runc_status(&self, id: &str) -> Option<String> {
        self.runc_state(id).await.ok().flatten()
    }

    /// runc's word for the container; `Ok(None)` only when runc says it does
    /// not know it, an error when runc could not be asked (a timeout, a
    /// failure to start it, any other error): "I could not look" is never
    /// "it is gone".
    async fn runc_state(&self, id: &str) -> Result<Option<String>, RuntimeError> {
        let mut cmd = self.runc_cmd();
        cmd.arg("state").arg(id);
        let out = tokio::time::timeout(CALL_TIMEOUT, cmd.output())
            .await
            .map_err(|_| RuntimeError::Timeout {
                op: "state",
                after: CALL_TIMEOUT,
            })?
            .map_err(|e| daemon("state", format!("{}: {e}", self.runc.display())))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.contains("does not exist") {
                return Ok(None);
            }
            return Err(daemon(
                "state",
                format!("runc state {id}: {}", stderr.trim()),
            ));
        }
        let state: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| daemon("state", format!("runc state {id}: {e}")))?;
        Ok(state["status"].as_str().map(str::to_owned))
    }

    async fn runc(&self, op: &'static str, args: &[&str]) -> Result<(), RuntimeError> {
        let mut cmd = self.runc_cmd();
        cmd.args(args);
        let out = tokio::time::timeout(CALL_TIMEOUT, cmd.output())
            .await
            .map_err(|_| RuntimeError::Timeout {
                op,
                after: CALL_TIMEOUT,
            })?
            .map_err(|e| daemon(op, format!("{}: {e}", self.runc.display())))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(daemon(
                op,
                format!(
                    "runc {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ))
        }
    }

    /// The exit status the run's shell recorded.
    fn exit_code(&self, id: &str) -> Option<i64> {
        std::fs::read_to_string(self.container_dir(id).join("exit"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `created`, `running`, `paused` or `exited`; an error when runc could
    /// not be asked.
    async fn state_word(&self, id: &str, meta: &Meta) -> Result<String, RuntimeError> {
        let runc = self.runc_state(id).await?;
        Ok(match runc.as_deref() {
            Some("running") => "running".to_owned(),
            Some("paused") => "paused".to_owned(),
            // `created` by runc is a run still starting.
            Some("created") => "running".to_owned(),
            _ if meta.started_unix_ms.is_none() => "created".to_owned(),
            // The run's shell writes the exit status when runc returns: until
            // then the run is not over, whatever runc's state directory says
            // (a run whose state runc lost is still a live container).
            // A run that a dump ended (a migration's, kept until it is
            // restored or removed) is over, whatever its shell does yet: seen
            // as running in that window, a post-copy source's recovery was
            // then failed by its health checks and started afresh.
            _ if self.exit_code(id).is_none()
                && self.shell_alive(id)
                && self.pending_dump(id).is_none() =>
            {
                if runc.is_none() {
                    warn!(container = %id, "runc does not know the container, but its run has not ended; it is still running");
                }
                "running".to_owned()
            }
            _ => "exited".to_owned(),
        })
    }

    /// Whether the shell that runs container `id`'s current run still runs
    /// (the same process: its pid and start time, as [`Self::launch`]
    /// recorded them).
    fn shell_alive(&self, id: &str) -> bool {
        let Ok(text) = std::fs::read_to_string(self.container_dir(id).join("shell")) else {
            return false;
        };
        let mut parts = text.split_whitespace();
        let (Some(pid), Some(start)) = (parts.next(), parts.next()) else {
            return false;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            return false;
        };
        process_start(pid).is_some_and(|now| now.to_string() == start)
    }

    /// Kills every process left in container `id`'s cgroup: the last resort
    /// of a removal when runc no longer knows the container.
    fn kill_cgroup(&self, id: &str) {
        for root in ["/sys/fs/cgroup/pids", "/sys/fs/cgroup"] {
            let procs = Path::new(root)
                .join("novacron")
                .join(id)
                .join("cgroup.procs");
            let Ok(text) = std::fs::read_to_string(&procs) else {
                continue;
            };
            for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
    }

    /// Every agent-owned container of `node`.
    pub async fn list(&self, node: &str) -> Result<Vec<ContainerListing>, RuntimeError> {
        let mut out = Vec::new();
        for id in self.ids() {
            let Ok(meta) = self.read_meta(&id) else {
                continue;
            };
            if meta.labels.get(LABEL_NODE).map(String::as_str) != Some(node) {
                continue;
            }
            let state = self.state_word(&id, &meta).await?;
            out.push(ContainerListing {
                id,
                labels: meta.labels,
                state,
            });
        }
        Ok(out)
    }

    /// One container in detail: its state from runc, its address from its
    /// sandbox, its ports from its record.
    pub async fn inspect(&self, id: &str) -> Result<ContainerDetails, RuntimeError> {
        let meta = self.read_meta(id)?;
        let word = self.state_word(id, &meta).await?;
        let status = match word.as_str() {
            "created" => ContainerStatus::Created,
            "running" | "paused" => ContainerStatus::Running,
            _ => match (&meta.exit, self.exit_code(id)) {
                (Some(e), _) => ContainerStatus::Exited {
                    code: e.code,
                    oom_killed: false,
                    error: e.error.clone(),
                },
                (None, Some(code)) => ContainerStatus::Exited {
                    code,
                    oom_killed: false,
                    error: String::new(),
                },
                (None, None) => ContainerStatus::Exited {
                    code: 137,
                    oom_killed: false,
                    error: "the container's run ended without an exit status (host restart?)"
                        .to_owned(),
                },
            },
        };
        let running = status == ContainerStatus::Running;
        let (ip, published) = match running {
            true => match self.docker.inspect(&meta.sandbox).await {
                Ok(d) if meta.sandbox_publishes => (d.ip, d.published),
                Ok(d) => (d.ip, published_of(&meta.published)),
                Err(e) => {
                    warn!(container = %id, sandbox = %meta.sandbox, error = %e, "cannot inspect the container's sandbox");
                    (None, Vec::new())
                }
            },
            false => (None, Vec::new()),
        };
        Ok(ContainerDetails {
            id: id.to_owned(),
            labels: meta.labels,
            status,
            started_at_unix_ms: meta.started_unix_ms,
            ip,
            published,
            paused: false,
        })
    }

    /// Creates (does not start) container `name` from `config`: the image's
    /// files (exported once per image id), the sandbox, the directories.
    pub async fn create(
        &self,
        name: &str,
        config: &ContainerConfig,
    ) -> Result<String, RuntimeError> {
        self.docker.ensure_sandbox_image().await?;
        let (image_id, image) = self.docker.image_run(&config.image).await?;
        let images = self.image_dir(&image_id);
        let lower = images.join("rootfs");
        let rootfs = ["rootfs".to_owned()];
        let exported =
            crate::runtime::image_files::ensure(&images, &rootfs, |scratch, _| async move {
                self.docker
                    .export_image(&config.image, &scratch.join("rootfs"))
                    .await
            })
            .await
            .map_err(|e| {
                daemon(
                    "create",
                    format!("the files of image {}: {e}", config.image),
                )
            })?;
        if exported {
            info!(image = %config.image, dir = %images.display(), "image files exported for runc containers");
        }
        let id = format!("{ID_PREFIX}{}", &hex::encode(rand::random::<[u8; 8]>()));
        let dir = self.container_dir(&id);
        for sub in ["upper", "work", "rootfs", "bundle"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(|e| daemon("create", format!("{}: {e}", dir.display())))?;
        }
        let hostname = hostname(name);
        let (uid, gid) = spec::user(&image.user, &lower).map_err(|e| daemon("create", e))?;
        let mut env_task = config.env.clone();
        for (k, v) in &config.secret_env {
            env_task.insert(k.clone(), v.text());
        }
        let run = Run {
            args: spec::args(&config.entrypoint, &config.cmd, &image),
            env: spec::env(&image.env, &env_task, &hostname),
            cwd: config
                .working_dir
                .clone()
                .unwrap_or_else(|| image.working_dir.clone()),
            uid,
            gid,
            memory_bytes: config.memory_bytes,
            nano_cpus: config.nano_cpus,
            read_only: config
                .mounts
                .iter()
                .filter_map(|m| match m {
                    MountConfig::Volume {
                        target, read_only, ..
                    }
                    | MountConfig::Bind {
                        target, read_only, ..
                    } => read_only.then(|| target.clone()),
                })
                .collect(),
        };
        if run.args.is_empty() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(daemon(
                "create",
                format!(
                    "image {} has no command and the task gives none",
                    config.image
                ),
            ));
        }
        let publish = match self.docker.publish_address() {
            std::net::IpAddr::V4(a) => a,
            std::net::IpAddr::V6(a) if a.is_unspecified() => std::net::Ipv4Addr::UNSPECIFIED,
            std::net::IpAddr::V6(a) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(daemon(
                    "create",
                    format!("runc containers publish ports on IPv4 addresses only, not on {a}"),
                ));
            }
        };
        let mut ports = Vec::with_capacity(config.ports.len());
        for p in &config.ports {
            let host_port = match p.host_port {
                Some(port) => port,
                None => match free_port(publish, p.udp) {
                    Ok(port) => port,
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&dir);
                        return Err(daemon("create", e));
                    }
                },
            };
            ports.push(Port {
                container_port: p.container_port,
                host_port,
                udp: p.udp,
            });
        }
        let sandbox_config = ContainerConfig {
            image: super::docker::sandbox::SANDBOX_IMAGE.to_owned(),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            env: Default::default(),
            working_dir: None,
            // The job's and node's labels (tools find it by job; an agent
            // sweeps only its own node's), not the allocation's: the
            // supervisor lists containers that carry one.
            labels: config
                .labels
                .iter()
                .filter(|(k, _)| k.as_str() != super::spec::LABEL_ALLOC)
                .map(|(k, v)| (k.clone(), v.clone()))
                .chain([
                    (super::spec::LABEL_MANAGED.to_owned(), "true".to_owned()),
                    (LABEL_SANDBOX.to_owned(), id.clone()),
                ])
                .collect(),
            nano_cpus: None,
            memory_bytes: None,
            gpu_uuids: Vec::new(),
            // The agent publishes them itself ([`publish`]).
            ports: Vec::new(),
            mounts: config.mounts.clone(),
            secret_env: Vec::new(),
            vm: None,
        };
        let sandbox = match self
            .docker
            .create(&format!("{name}-sandbox"), &sandbox_config)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let meta = Meta {
            id: id.clone(),
            name: name.to_owned(),
            labels: config.labels.clone().into_iter().collect(),
            image: config.image.clone(),
            image_id,
            sandbox,
            lower,
            run,
            started_unix_ms: None,
            exit: None,
            ports,
            publish,
            published: Vec::new(),
            sandbox_publishes: false,
        };
        self.write_meta(&meta)?;
        info!(container = %id, name, "runc container created");
        Ok(id)
    }

    /// Mounts the overlay (unless mounted), starts the sandbox (unless
    /// running) and writes `config.json` for its network namespace.
    async fn prepare(&self, meta: &Meta) -> Result<(), RuntimeError> {
        let dir = self.container_dir(&meta.id);
        let rootfs = dir.join("rootfs");
        if !mounted(&rootfs) {
            let options = format!(
                "lowerdir={},upperdir={},workdir={}",
                meta.lower.display(),
                dir.join("upper").display(),
                dir.join("work").display()
            );
            let data = std::ffi::CString::new(options)
                .map_err(|e| daemon("start", format!("overlay options: {e}")))?;
            rustix::mount::mount(
                "overlay",
                &rootfs,
                "overlay",
                rustix::mount::MountFlags::empty(),
                Some(data.as_c_str()),
            )
            .map_err(|e| {
                daemon(
                    "start",
                    format!("mounting the overlay at {}: {e}", rootfs.display()),
                )
            })?;
        }
        let sandbox_running = matches!(
            self.docker.inspect(&meta.sandbox).await.map(|d| d.status),
            Ok(ContainerStatus::Running)
        );
        if !sandbox_running {
            self.docker.start(&meta.sandbox).await?;
        }
        let sandbox = self.docker.sandbox(&meta.sandbox).await?;
        let mut binds: Vec<Bind> = sandbox
            .etc
            .iter()
            .map(|(source, target)| Bind {
                source: source.clone(),
                target: (*target).to_owned(),
                read_only: false,
            })
            .collect();
        binds.extend(sandbox.mounts.iter().map(|(target, source)| Bind {
            source: source.clone(),
            target: target.clone(),
            read_only: meta.run.read_only.contains(target),
        }));
        // The sandbox's network namespace, bound to a file of the container's
        // own: it outlives a stopped sandbox, so that a container still in it
        // (frozen for a post-copy migration) can be dumped again.
        let netns = dir.join("netns");
        bind_netns(
            &PathBuf::from(format!("/proc/{}/ns/net", sandbox.pid)),
            &netns,
        )
        .map_err(|e| daemon("start", e))?;
        let criu_config = self.dir.join("criu.conf");
        let spec = spec::build(&spec::Input {
            hostname: &hostname(&meta.name),
            rootfs: &rootfs,
            args: meta.run.args.clone(),
            env: meta.run.env.clone(),
            cwd: meta.run.cwd.clone(),
            uid: meta.run.uid,
            gid: meta.run.gid,
            netns: &netns,
            binds: &binds,
            memory_bytes: meta.run.memory_bytes,
            nano_cpus: meta.run.nano_cpus,
            cgroup: format!("/novacron/{}", meta.id),
            criu_config: &criu_config,
            nofile: nofile_limit(),
        })
        .map_err(|e| daemon("start", e))?;
        let text =
            serde_json::to_string_pretty(&spec).map_err(|e| daemon("start", e.to_string()))?;
        novacron_common::files::write_atomic(&dir.join("bundle/config.json"), &text, 0o600)
            .map_err(|e| daemon("start", e.to_string()))?;
        // A stopped run of the same id is in runc's way.
        let _ = self.runc("delete", &["delete", "--force", &meta.id]).await;
        let _ = std::fs::remove_file(dir.join("exit"));
        let _ = std::fs::remove_file(dir.join("shell"));
        trim_console(&dir.join("console.log"));
        Ok(())
    }

    /// Runs `runc <args>` in the foreground under the run's shell, in a
    /// session of its own, and waits until the container runs.
    async fn launch(&self, id: &str, args: &[String]) -> Result<(), RuntimeError> {
        let dir = self.container_dir(id);
        let script = r#"log="$1"; exit_file="$2"; shift 2; "$@" >>"$log" 2>&1; echo $? >"$exit_file.tmp"; mv "$exit_file.tmp" "$exit_file""#;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg("novacron-oci-run")
            .arg(dir.join("console.log"))
            .arg(dir.join("exit"))
            .arg(&self.runc)
            .arg("--root")
            .arg(self.dir.join("runc"))
            .arg("--criu")
            .arg(&self.criu)
            .args(args)
            .current_dir(dir.join("bundle"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let console_before = std::fs::metadata(dir.join("console.log")).map_or(0, |m| m.len());
        let mut child = cmd
            .spawn()
            .map_err(|e| daemon("start", format!("sh: {e}")))?;
        // Which process runs the run, for `shell_alive` after a restart.
        if let Some(pid) = child.id()
            && let Some(start) = process_start(pid)
        {
            let _ = novacron_common::files::write_atomic(
                &dir.join("shell"),
                &format!("{pid} {start}\n"),
                0o600,
            );
        }
        // Reaped here while this agent lives; after a restart, by init.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            if let Some(word) = self.runc_status(id).await
                && (word == "running" || word == "paused")
            {
                return Ok(());
            }
            if let Some(code) = self.exit_code(id) {
                let text = read_from(&dir.join("console.log"), console_before);
                return Err(daemon(
                    "start",
                    format!(
                        "runc {} exited with status {code}: {}",
                        args.first().map_or("", String::as_str),
                        String::from_utf8_lossy(&last_lines(&text, 5)).trim()
                    ),
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RuntimeError::Timeout {
                    op: "start",
                    after: START_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Where a live migration's dump of container `id` is kept on its source
    /// until the container is removed: a start resumes from it (see
    /// [`Self::start`]).
    pub fn checkpoint_dir(&self, id: &str) -> PathBuf {
        self.container_dir(id).join("checkpoint")
    }

    /// The CRIU image of container `id` that [`Self::checkpoint_dir`] holds,
    /// when there is one: its next start restores from it.
    fn pending_dump(&self, id: &str) -> Option<PathBuf> {
        let dump = self.checkpoint_dir(id).join("criu");
        dump.join("inventory.img").exists().then_some(dump)
    }

    /// Where a live migration's stream for container `id` is unpacked on its
    /// target; `.complete` marks it whole.
    pub fn incoming_dir(&self, id: &str) -> PathBuf {
        self.container_dir(id).join("incoming")
    }

    /// The container of allocation `alloc` on this node.
    pub fn container_of_alloc(&self, alloc: &str) -> Option<String> {
        self.ids().into_iter().find(|id| {
            self.read_meta(id).is_ok_and(|m| {
                m.labels.get(super::spec::LABEL_ALLOC).map(String::as_str) == Some(alloc)
            })
        })
    }

    /// Starts container `id` from its image's files and writable layer, or,
    /// when a live migration dumped it here and did not take it away (rolled
    /// back), from that dump: a migrated-out container that comes back goes on
    /// where it stopped and never starts afresh.
    pub async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let lock = self.lock_of(id);
        let _held = lock.lock().await;
        // Two starts may race (a rolled-back migration's resume and the
        // supervisor's restart of the container it saw dumped): the second
        // finds it running and leaves it be. Starting it anew would kill the
        // resumed process and lose its memory.
        if self.runc_status(id).await.as_deref() == Some("running") {
            info!(container = %id, "already running; nothing to start");
            return Ok(());
        }
        if let Some(dump) = self.pending_dump(id) {
            self.restore_held(id, &dump).await?;
            let _ = std::fs::remove_dir_all(self.checkpoint_dir(id));
            info!(container = %id, "resumed from its migration's dump");
            return Ok(());
        }
        let mut meta = self.read_meta(id)?;
        self.prepare(&meta).await?;
        let bundle = self.container_dir(id).join("bundle");
        let args = vec![
            "run".to_owned(),
            "--bundle".to_owned(),
            bundle.display().to_string(),
            id.to_owned(),
        ];
        self.launch(id, &args).await?;
        meta.started_unix_ms = Some(now_ms());
        meta.exit = None;
        self.write_meta(&meta)?;
        self.publish(&mut meta).await?;
        info!(container = %id, "runc container started");
        Ok(())
    }

    /// Runs `runc restore` (with `--lazy-pages` for a post-copy dump, whose
    /// daemon already listens in `work`) from the CRIU image in `images`, and
    /// waits until the container runs; an error names CRIU's logs.
    async fn launch_restore(
        &self,
        id: &str,
        images: &Path,
        work: &Path,
        lazy: bool,
    ) -> Result<(), RuntimeError> {
        let mut args = vec!["restore".to_owned()];
        if lazy {
            args.push("--lazy-pages".to_owned());
        }
        args.extend([
            "--image-path".to_owned(),
            images.display().to_string(),
            "--work-path".to_owned(),
            work.display().to_string(),
            "--bundle".to_owned(),
            self.container_dir(id).join("bundle").display().to_string(),
            id.to_owned(),
        ]);
        let mut logs = work.join("restore.log").display().to_string();
        if lazy {
            logs = format!("{logs}, {}", work.join("lazy-pages.log").display());
        }
        tokio::time::timeout(CRIU_TIMEOUT, self.launch(id, &args))
            .await
            .map_err(|_| RuntimeError::Timeout {
                op: "restore",
                after: CRIU_TIMEOUT,
            })?
            .map_err(|e| match e {
                RuntimeError::Daemon { message, .. } => {
                    daemon("restore", format!("{message} (CRIU's logs: {logs})"))
                }
                other => other,
            })
    }

    /// Starts container `id` (created, never started) from the CRIU image in
    /// `images`: its writable layer must already be in [`Self::upper_dir`].
    pub async fn restore(&self, id: &str, images: &Path) -> Result<(), RuntimeError> {
        let lock = self.lock_of(id);
        let _held = lock.lock().await;
        self.restore_held(id, images).await
    }

    /// What a restore needs first (the container's lock held): its metadata,
    /// [`Self::prepare`], and an empty CRIU work directory, returned.
    async fn prepare_restore(&self, id: &str) -> Result<(Meta, PathBuf), RuntimeError> {
        let meta = self.read_meta(id)?;
        self.prepare(&meta).await?;
        let work = self.container_dir(id).join("criu.restore");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)
            .map_err(|e| daemon("restore", format!("{}: {e}", work.display())))?;
        Ok((meta, work))
    }

    /// [`Self::restore`], with the container's lock held by the caller.
    async fn restore_held(&self, id: &str, images: &Path) -> Result<(), RuntimeError> {
        let (mut meta, work) = self.prepare_restore(id).await?;
        let started = std::time::Instant::now();
        self.launch_restore(id, images, &work, false).await?;
        meta.started_unix_ms = Some(now_ms());
        meta.exit = None;
        self.write_meta(&meta)?;
        self.publish(&mut meta).await?;
        info!(container = %id, restore_ms = started.elapsed().as_millis(), "runc container restored");
        Ok(())
    }

    /// The container's mounts from its sandbox: (target, host source). Starts
    /// the sandbox when it is not running (a created container's).
    pub async fn mounts(&self, id: &str) -> Result<Vec<(String, PathBuf)>, RuntimeError> {
        let meta = self.read_meta(id)?;
        if !matches!(
            self.docker.inspect(&meta.sandbox).await.map(|d| d.status),
            Ok(ContainerStatus::Running)
        ) {
            self.docker.start(&meta.sandbox).await?;
        }
        Ok(self.docker.sandbox(&meta.sandbox).await?.mounts)
    }

    /// Freezes container `id` (cgroup freezer).
    pub async fn pause(&self, id: &str) -> Result<(), RuntimeError> {
        self.runc("pause", &["pause", id]).await
    }

    /// Thaws container `id`.
    pub async fn resume(&self, id: &str) -> Result<(), RuntimeError> {
        self.runc("resume", &["resume", id]).await
    }

    /// Dumps running container `id` into `images` with CRIU (through `runc
    /// checkpoint`); the container stops, unless `leave_running`. `Ok` is how
    /// long it took, ms.
    pub async fn checkpoint(
        &self,
        id: &str,
        images: &Path,
        leave_running: bool,
    ) -> Result<u64, RuntimeError> {
        let lock = self.lock_of(id);
        let _held = lock.lock().await;
        let mut meta = self.read_meta(id)?;
        let work = self.container_dir(id).join("criu.dump");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)
            .and_then(|()| std::fs::create_dir_all(images))
            .map_err(|e| daemon("checkpoint", format!("{}: {e}", work.display())))?;
        let started = std::time::Instant::now();
        let mut cmd = self.runc_cmd();
        cmd.arg("checkpoint")
            .arg("--image-path")
            .arg(images)
            .arg("--work-path")
            .arg(&work);
        if leave_running {
            cmd.arg("--leave-running");
        }
        cmd.arg(id);
        let out = tokio::time::timeout(CRIU_TIMEOUT, cmd.output())
            .await
            .map_err(|_| RuntimeError::Timeout {
                op: "checkpoint",
                after: CRIU_TIMEOUT,
            })?
            .map_err(|e| daemon("checkpoint", format!("{}: {e}", self.runc.display())))?;
        if !out.status.success() {
            return Err(daemon(
                "checkpoint",
                format!(
                    "runc checkpoint: {} (CRIU's log: {})",
                    String::from_utf8_lossy(&out.stderr).trim(),
                    work.join("dump.log").display()
                ),
            ));
        }
        let dump_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        if !leave_running {
            meta.exit = Some(Exit {
                code: 0,
                error: "checkpointed".to_owned(),
            });
            self.write_meta(&meta)?;
            // A migration's dump: the target takes the ports at once; the
            // sandbox waits for a rollback's restore or the removal.
            if meta.sandbox_publishes {
                self.stop_sandbox(&mut meta).await;
            } else if let Err(e) = self.withdraw(&mut meta).await {
                warn!(container = %id, error = %e, "cannot withdraw the published ports");
            }
        }
        info!(container = %id, dump_ms, "runc container checkpointed");
        Ok(dump_ms)
    }

    /// The first half of a post-copy dump: `runc checkpoint --lazy-pages`
    /// freezes container `id` and writes everything except its memory pages
    /// into `images`, then CRIU serves the pages on `127.0.0.1:port` (loopback
    /// only: the agent relays them). `Ok` once CRIU says the page server is
    /// ready (`--status-fd`); [`Self::finish_lazy`] or [`Self::abort_lazy`]
    /// ends it. The container stays frozen until every page was fetched.
    pub async fn checkpoint_lazy(
        &self,
        id: &str,
        images: &Path,
        port: u16,
    ) -> Result<LazyDump, RuntimeError> {
        use std::io::Read;
        let lock = self.lock_of(id);
        let _held = lock.lock().await;
        self.read_meta(id)?;
        let work = self.container_dir(id).join("criu.dump");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work)
            .and_then(|()| std::fs::create_dir_all(images))
            .map_err(|e| daemon("checkpoint", format!("{}: {e}", work.display())))?;
        let errors = std::fs::File::create(work.join("runc.err"))
            .map_err(|e| daemon("checkpoint", format!("{}: {e}", work.display())))?;
        // CRIU writes a byte to `--status-fd` once its page server listens:
        // a FIFO, opened as descriptor 3 by the shell that execs runc.
        let fifo = work.join("ready.fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .map_err(|e| daemon("checkpoint", format!("{}: {e}", fifo.display())))?;
        let started = std::time::Instant::now();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(r#"fifo="$1"; shift; exec "$@" 3>"$fifo""#)
            .arg("novacron-lazy-dump")
            .arg(&fifo)
            .arg(&self.runc)
            .arg("--root")
            .arg(self.dir.join("runc"))
            .arg("--criu")
            .arg(&self.criu)
            .arg("checkpoint")
            .arg("--image-path")
            .arg(images)
            .arg("--work-path")
            .arg(&work)
            .arg("--lazy-pages")
            .arg("--page-server")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--status-fd")
            .arg("3")
            .arg(id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(errors)
            // Its own group, so that an abort kills runc and CRIU together.
            .process_group(0)
            .kill_on_drop(false);
        let read_from = fifo.clone();
        let ready = tokio::task::spawn_blocking(move || {
            let mut byte = [0u8; 1];
            std::fs::File::open(&read_from)?.read(&mut byte)
        });
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                // Let the reader's open return.
                let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
                return Err(daemon("checkpoint", format!("sh: {e}")));
            }
        };
        let dump = LazyDump {
            pgid: child.id(),
            child: None,
            dump_ms: 0,
            work: work.clone(),
        };
        match tokio::time::timeout(CRIU_TIMEOUT, ready).await {
            Ok(Ok(Ok(1))) => {}
            Ok(_) => {
                // CRIU ended before its page server was ready.
                let status = tokio::time::timeout(CALL_TIMEOUT, child.wait()).await;
                return Err(daemon(
                    "checkpoint",
                    format!(
                        "runc checkpoint --lazy-pages ended ({status:?}): {} (CRIU's log: {})",
                        std::fs::read_to_string(work.join("runc.err"))
                            .unwrap_or_default()
                            .trim(),
                        work.join("dump.log").display()
                    ),
                ));
            }
            Err(_) => {
                let mut dump = dump;
                dump.child = Some(child);
                self.abort_lazy(id, dump).await;
                return Err(RuntimeError::Timeout {
                    op: "checkpoint",
                    after: CRIU_TIMEOUT,
                });
            }
        }
        let dump_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        info!(container = %id, dump_ms, port, "runc container dumped without its pages; CRIU serves them");
        Ok(LazyDump {
            child: Some(child),
            dump_ms,
            ..dump
        })
    }

    /// Waits (at most `limit`) until the target has fetched every page of a
    /// post-copy dump: the container is then gone from here (its sandbox is
    /// stopped). `Err`: the transfer failed, and CRIU resumed the container
    /// here (see [`Self::abort_lazy`] when it did not).
    pub async fn finish_lazy(
        &self,
        id: &str,
        mut dump: LazyDump,
        limit: Duration,
    ) -> Result<(), RuntimeError> {
        let Some(mut child) = dump.child.take() else {
            return Err(daemon("checkpoint", "no dump in progress".to_owned()));
        };
        let status = match tokio::time::timeout(limit, child.wait()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(daemon("checkpoint", format!("runc: {e}"))),
            Err(_) => {
                dump.child = Some(child);
                self.abort_lazy(id, dump).await;
                return Err(RuntimeError::Timeout {
                    op: "checkpoint",
                    after: limit,
                });
            }
        };
        if !status.success() {
            return Err(daemon(
                "checkpoint",
                format!(
                    "the page transfer failed ({status}): {} (CRIU's log: {})",
                    std::fs::read_to_string(dump.work.join("runc.err"))
                        .unwrap_or_default()
                        .trim(),
                    dump.work.join("dump.log").display()
                ),
            ));
        }
        let lock = self.lock_of(id);
        let _held = lock.lock().await;
        let mut meta = self.read_meta(id)?;
        meta.exit = Some(Exit {
            code: 0,
            error: "migrated (post-copy)".to_owned(),
        });
        self.write_meta(&meta)?;
        self.stop_sandbox(&mut meta).await;
        info!(container = %id, "every page was fetched; the container left this node");
        Ok(())
    }

    /// Gives a post-copy dump up: kills runc and CRIU (the page server) and
    /// thaws the container, which runs on here.
    pub async fn abort_lazy(&self, id: &str, mut dump: LazyDump) {
        if let Some(pgid) = dump
            .pgid
            .and_then(|p| rustix::process::Pid::from_raw(p as i32))
        {
            let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
        }
        if let Some(mut child) = dump.child.take() {
            let _ = tokio::time::timeout(CALL_TIMEOUT, child.wait()).await;
        }
        self.thaw(id).await;
        let state = self.runc_status(id).await;
        warn!(container = %id, ?state, "post-copy dump given up; the container runs on here");
    }

    /// Thaws container `id` if it is frozen (a dump that CRIU gave up may
    /// leave it so).
    pub async fn thaw(&self, id: &str) {
        if self.runc_status(id).await.as_deref() == Some("paused") {
            let _ = self.runc("resume", &["resume", id]).await;
        }
        // Tasks that a killed CRIU left stopped.
        let _ = self.runc("kill", &["kill", "--all", id, "CONT"]).await;
    }

    /// Gives up the published ports of container `id`, frozen for a
    /// post-copy migration, so that the target takes them (on the same host,
    /// too). The sandbox stays up until the container leaves: a rollback
    /// goes on in it. A sandbox that publishes the ports itself (a container
    /// from an older agent) is stopped instead; the next start (or a
    /// restore) starts it again.
    pub async fn release_ports(&self, id: &str) -> Result<(), RuntimeError> {
        let mut meta = self.read_meta(id)?;
        if meta.sandbox_publishes {
            self.stop_sandbox(&mut meta).await;
            return Ok(());
        }
        self.withdraw(&mut meta).await
    }

    /// Stops the sandbox of container `id`, whose post-copy dump was given
    /// up: the thawed container answers nothing in it (see
    /// `recover_post_copy_source`), so it is dumped again and restored into a
    /// new sandbox.
    pub async fn retire_sandbox(&self, id: &str) -> Result<(), RuntimeError> {
        let mut meta = self.read_meta(id)?;
        self.stop_sandbox(&mut meta).await;
        Ok(())
    }

    /// Whether container `id` runs (or is frozen) here.
    pub async fn is_running(&self, id: &str) -> bool {
        matches!(
            self.runc_status(id).await.as_deref(),
            Some("running" | "paused")
        )
    }

    /// Starts container `id` (created, never started) from a post-copy dump
    /// in `images`: a `criu lazy-pages` daemon that fetches the pages from
    /// `127.0.0.1:page_port` (the agent's end of the page channel) is started
    /// first, then `runc restore --lazy-pages`. `Ok` once the container runs,
    /// with the daemon, which goes on until every page arrived: its exit
    /// status says whether they did.
    pub async fn restore_lazy(
        &self,
        id: &str,
        images: &Path,
        page_port: u16,
    ) -> Result<tokio::process::Child, RuntimeError> {
        let lock = self.lock_of(id);
        let _held = lock.lock().await;
        let (mut meta, work) = self.prepare_restore(id).await?;
        let started = std::time::Instant::now();
        let mut daemon_cmd = Command::new(&self.criu);
        daemon_cmd
            .arg("lazy-pages")
            .arg("--page-server")
            .arg("--address")
            .arg("127.0.0.1")
            .arg("--port")
            .arg(page_port.to_string())
            .arg("--images-dir")
            .arg(images)
            .arg("--work-dir")
            .arg(&work)
            .arg("--log-file")
            .arg("lazy-pages.log")
            .arg("-v2")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut lazy = daemon_cmd
            .spawn()
            .map_err(|e| daemon("restore", format!("{}: {e}", self.criu.display())))?;
        // runc's CRIU connects to the daemon's socket in the work directory.
        let socket = work.join("lazy-pages.socket");
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        while !socket.exists() {
            if let Ok(Some(status)) = lazy.try_wait() {
                return Err(daemon(
                    "restore",
                    format!(
                        "criu lazy-pages ended ({status}) before it listened (its log: {})",
                        work.join("lazy-pages.log").display()
                    ),
                ));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RuntimeError::Timeout {
                    op: "restore",
                    after: START_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.launch_restore(id, images, &work, true).await?;
        meta.started_unix_ms = Some(now_ms());
        meta.exit = None;
        self.write_meta(&meta)?;
        self.publish(&mut meta).await?;
        info!(container = %id, restore_ms = started.elapsed().as_millis(), "runc container restored; its pages follow");
        Ok(lazy)
    }

    /// Pausing is not offered for runc containers: a freeze is CRIU's during
    /// a migration, and a paused state would read as one.
    pub async fn set_paused(&self, id: &str, _paused: bool) -> Result<(), RuntimeError> {
        Err(daemon(
            "pause",
            format!("runc container {id}: pausing is offered for virtual machines only"),
        ))
    }

    /// Stops container `id`: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let lock = self.lock_of(id);
        let _held = lock.lock().await;
        let mut meta = self.read_meta(id)?;
        if !matches!(
            self.runc_status(id).await.as_deref(),
            Some("running" | "paused" | "created")
        ) {
            return Ok(());
        }
        if self.runc_status(id).await.as_deref() == Some("paused") {
            let _ = self.runc("resume", &["resume", id]).await;
        }
        let _ = self.runc("kill", &["kill", id, "TERM"]).await;
        let mut killed = false;
        if !self.wait_exit(id, grace).await {
            killed = true;
            let _ = self.runc("kill", &["kill", "--all", id, "KILL"]).await;
            self.wait_exit(id, Duration::from_secs(10)).await;
        }
        self.stop_sandbox(&mut meta).await;
        let code = self.exit_code(id).unwrap_or(137);
        meta.exit = Some(Exit {
            code,
            error: if killed {
                format!("the container did not stop within {grace:?}; it was killed")
            } else {
                String::new()
            },
        });
        self.write_meta(&meta)?;
        info!(container = %id, code, killed, "runc container stopped");
        Ok(())
    }

    /// Withdraws the published ports of a container that no longer runs and
    /// stops its sandbox (as a stopped Docker container's network goes); the
    /// next start starts it again.
    async fn stop_sandbox(&self, meta: &mut Meta) {
        if let Err(e) = self.withdraw(meta).await {
            warn!(container = %meta.id, error = %e, "cannot withdraw the published ports");
        }
        if let Err(e) = self.docker.stop(&meta.sandbox, Duration::ZERO).await {
            warn!(container = %meta.id, sandbox = %meta.sandbox, error = %e, "cannot stop the sandbox");
        }
    }

    async fn wait_exit(&self, id: &str, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.exit_code(id).is_some() || self.runc_status(id).await.is_none() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Removes container `id`: its processes, runc's state, the overlay, the
    /// sandbox and its directory.
    pub async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let lock = self.lock_of(id);
        let _held = lock.lock().await;
        let meta = self.read_meta(id)?;
        if self.runc_status(id).await.is_some() {
            let _ = self.runc("kill", &["kill", "--all", id, "KILL"]).await;
            self.wait_exit(id, Duration::from_secs(10)).await;
            let _ = self.runc("delete", &["delete", "--force", id]).await;
        }
        // Whatever runc knows, nothing of the container outlives its removal.
        self.kill_cgroup(id);
        let dir = self.container_dir(id);
        let rootfs = dir.join("rootfs");
        if mounted(&rootfs) {
            rustix::mount::unmount(&rootfs, rustix::mount::UnmountFlags::DETACH)
                .map_err(|e| daemon("remove", format!("{}: {e}", rootfs.display())))?;
        }
        let netns = dir.join("netns");
        if mounted(&netns) {
            let _ = rustix::mount::unmount(&netns, rustix::mount::UnmountFlags::DETACH);
        }
        match self.docker.remove(&meta.sandbox).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        std::fs::remove_dir_all(&dir)
            .map_err(|e| daemon("remove", format!("{}: {e}", dir.display())))?;
        if !meta.published.is_empty()
            && let Err(e) = self.sync_ports().await
        {
            warn!(container = %id, error = %e, "cannot withdraw the published ports");
        }
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        info!(container = %id, "runc container removed");
        Ok(())
    }

    /// CPU time and memory from runc's cgroup statistics.
    pub async fn stats(&self, id: &str) -> Result<StatsReading, RuntimeError> {
        let mut cmd = self.runc_cmd();
        cmd.args(["events", "--stats", id]);
        let out = tokio::time::timeout(CALL_TIMEOUT, cmd.output())
            .await
            .map_err(|_| RuntimeError::Timeout {
                op: "stats",
                after: CALL_TIMEOUT,
            })?
            .map_err(|e| daemon("stats", e.to_string()))?;
        if !out.status.success() {
            return Err(RuntimeError::NotFound {
                op: "stats",
                message: format!("container {id} is not running"),
            });
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| daemon("stats", e.to_string()))?;
        let data = &v["data"];
        Ok(StatsReading {
            cpu_total_ns: data["cpu"]["usage"]["total"].as_u64().unwrap_or(0),
            system_cpu_ns: None,
            online_cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_bytes: data["memory"]["usage"]["usage"].as_u64().unwrap_or(0),
            rx_bytes: 0,
            tx_bytes: 0,
        })
    }

    /// Runs `command` in container `id` (`runc exec`); its exit status.
    pub async fn exec(&self, id: &str, command: &[String]) -> Result<i64, RuntimeError> {
        let mut cmd = self.runc_cmd();
        cmd.args(["exec", id]).args(command);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let status = cmd
            .status()
            .await
            .map_err(|e| daemon("exec", e.to_string()))?;
        Ok(i64::from(status.code().unwrap_or(137)))
    }

    /// The container's output: the last `tail` lines (0: all), then, with
    /// `follow`, what it prints until its run ends.
    pub fn logs(
        self: &Arc<Self>,
        id: &str,
        follow: bool,
        tail: u32,
    ) -> BoxStream<'static, Result<LogFrame, RuntimeError>> {
        let path = self.container_dir(id).join("console.log");
        let text = std::fs::read(&path).unwrap_or_default();
        let offset = text.len() as u64;
        let head = stream::iter([Ok(LogFrame {
            stderr: false,
            data: last_lines(&text, tail),
        })]);
        if !follow {
            return head.boxed();
        }
        let driver = self.clone();
        let id = id.to_owned();
        let rest = stream::unfold(offset, move |mut offset| {
            let path = path.clone();
            let driver = driver.clone();
            let id = id.clone();
            async move {
                loop {
                    let data = read_from(&path, offset);
                    if !data.is_empty() {
                        offset += data.len() as u64;
                        return Some((
                            Ok(LogFrame {
                                stderr: false,
                                data,
                            }),
                            offset,
                        ));
                    }
                    driver.runc_status(&id).await?;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        });
        head.chain(rest).boxed()
    }

    /// The ids of the images of every agent-owned container on this host.
    pub fn images_in_use(&self) -> Vec<String> {
        self.ids()
            .iter()
            .filter_map(|id| self.read_meta(id).ok())
            .map(|m| m.image_id)
            .collect()
    }

    /// The image reference container `id` was made from.
    pub fn image_of(&self, id: &str) -> Option<String> {
        self.read_meta(id).ok().map(|m| m.image)
    }

    /// Removes sandboxes whose container is gone (an agent that died between
    /// creating the sandbox and writing the container's state).
    pub async fn sweep_sandboxes(&self, sandboxes: Vec<(String, String)>) {
        for (sandbox, of) in sandboxes {
            if !self.container_dir(&of).join("meta.json").exists() {
                match self.docker.remove(&sandbox).await {
                    Ok(()) => {
                        info!(%sandbox, container = %of, "removed the sandbox of a container that is gone")
                    }
                    Err(e) => warn!(%sandbox, error = %e, "cannot remove an orphaned sandbox"),
                }
            }
        }
    }
}

/// This process's open-files limit (soft, hard), which containers get.
fn nofile_limit() -> (u64, u64) {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    let hard = limit.maximum.unwrap_or(1 << 20);
    (limit.current.unwrap_or(hard).min(hard), hard)
}

/// A hostname from a container name (at most 63 characters).
fn hostname(name: &str) -> String {
    name.chars().take(63).collect()
}

/// Whether `path` is a mount point (listed in `/proc/self/mountinfo`).
/// Binds network namespace `ns` (a `/proc/PID/ns/net`) to file `at`,
/// replacing an earlier binding.
fn bind_netns(ns: &Path, at: &Path) -> Result<(), String> {
    if mounted(at) {
        rustix::mount::unmount(at, rustix::mount::UnmountFlags::DETACH)
            .map_err(|e| format!("unbinding {}: {e}", at.display()))?;
    }
    if !at.exists() {
        std::fs::File::create(at).map_err(|e| format!("{}: {e}", at.display()))?;
    }
    rustix::mount::mount_bind(ns, at)
        .map_err(|e| format!("binding {} to {}: {e}", ns.display(), at.display()))
}

fn mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.display().to_string();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| m == want)
}

/// Keeps the last [`CONSOLE_KEEP`] bytes of the console before a new run.
fn trim_console(path: &Path) {
    let Ok(text) = std::fs::read(path) else {
        return;
    };
    if text.len() > CONSOLE_KEEP {
        let _ = std::fs::write(path, &text[text.len() - CONSOLE_KEEP..]);
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("").trim()
}

/// The published ports of `rules`, as the node reports them.
fn published_of(rules: &[Dnat]) -> Vec<super::PublishedPort> {
    rules
        .iter()
        .map(|r| super::PublishedPort {
            host_ip: std::net::IpAddr::V4(r.publish),
            host_port: r.host_port,
            container_port: r.to_port,
            udp: r.udp,
        })
        .collect()
}

/// A port of `address` free now, for a port that the task left to the node.
fn free_port(address: std::net::Ipv4Addr, udp: bool) -> Result<u16, String> {
    let port = if udp {
        std::net::UdpSocket::bind((address, 0)).and_then(|s| s.local_addr())
    } else {
        std::net::TcpListener::bind((address, 0)).and_then(|l| l.local_addr())
    };
    port.map(|a| a.port())
        .map_err(|e| format!("no free port on {address} to publish: {e}"))
}

async fn output(program: &Path, args: &[&str]) -> Result<String, String> {
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| format!("{} {} did not answer", program.display(), args.join(" ")))?
    .map_err(|e| format!("{}: {e}", program.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "{} {}: {}",
            program.display(),
            args.join(" "),
            text.trim()
        ))
    }
}

/// A process's start time (clock ticks since boot, `/proc/PID/stat`'s 22nd
/// field), which tells it from a later process with the same pid.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    novacron_common::exposition::process::parse_stat(&stat).map(|s| s.start_ticks)
}

fn daemon(op: &'static str, message: String) -> RuntimeError {
    RuntimeError::Daemon { op, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_start_time_tells_a_live_process() {
        let me = std::process::id();
        let start = process_start(me).expect("this process's start");
        assert_eq!(process_start(me), Some(start), "stable");
        assert!(start > 0);
        assert_eq!(process_start(u32::MAX), None);
    }

    #[test]
    fn ids_and_hostnames() {
        assert!(is_oci("oci-0011") && !is_oci("0123abcd") && !is_oci("vm-1"));
        assert_eq!(hostname(&"x".repeat(80)).len(), 63);
        assert_eq!(
            first_line("runc version 1.1.5\ncommit: x\n"),
            "runc version 1.1.5"
        );
    }
}

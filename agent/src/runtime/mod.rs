//! The container runtime: runs the node's desired allocations as containers,
//! restarts them by their policy, checks their health and reports on them.
//!
//! Layers, the pure ones first:
//! - [`spec`]: container names, labels, the spec hash and the runtime-neutral
//!   [`ContainerConfig`] of an allocation. Pure.
//! - [`restart`]: the restart policy's sliding window. Pure, takes `now`.
//! - [`reconcile`]: the [`Reconciler`], the I/O-free core. The desired set,
//!   observations of the containers and the outcomes of actions go in; [`Action`]s, a
//!   deadline and the [`AllocationReport`] come out. Pure, takes `now`.
//! - [`usage`]: CPU, memory and network rates from raw counters. Pure.
//! - [`logs`]: cuts the runtime's log frames into wire [`LogChunk`]s.
//! - [`health`]: the HTTP and TCP probes.
//! - [`docker`]: [`DockerRuntime`], the [`ContainerRuntime`] on bollard.
//! - [`supervisor`]: [`Supervisor`], the thin shell that drives the core with a
//!   runtime and the clock, and that the link talks to.
//!
//! **Architecture Invariant:** only [`docker`] knows about bollard; everything else
//! talks to the narrow [`ContainerRuntime`] trait, so tests run the supervisor
//! against a fake.
//!
//! **Architecture Invariant:** the supervisor only ever lists, stops or removes
//! containers that carry both [`LABEL_ALLOC`] and [`LABEL_NODE`]` = <its node name>`.
//! Unlabelled containers and those of another node (several agents may share one
//! Docker daemon, as `novacron dev` does) are never touched.
//!
//! [`AllocationReport`]: novacron_common::wire::AllocationReport
//! [`LogChunk`]: novacron_common::wire::LogChunk

pub mod docker;
pub mod health;
pub mod host;
pub mod image_files;
pub mod images;
pub mod logs;
pub mod netfilter;
pub mod oci;
pub mod probes;
pub mod reconcile;
pub mod restart;
pub mod secrets;
pub mod spec;
pub mod supervisor;
pub mod usage;
pub mod vm;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use futures_util::stream::BoxStream;
use novacron_common::wire::{PortMapping, PublishedPort, TerminalSize};

pub use docker::DockerRuntime;
pub use host::HostRuntime;
pub use reconcile::{Action, Outcome, Reconciler};
pub use spec::{
    LABEL_ALLOC, LABEL_JOB, LABEL_MANAGED, LABEL_NODE, LABEL_SPEC, LABEL_VERSION, container_name,
    spec_hash,
};
pub use supervisor::{Supervisor, SupervisorConfig};

/// The Docker-facing operations the supervisor needs, and nothing more.
///
/// Every method answers within a bounded time: implementations put a timeout on each
/// call to the daemon and return [`RuntimeError::Timeout`] when it passes. Streams
/// ([`logs`](ContainerRuntime::logs), [`events`](ContainerRuntime::events)) end when
/// the daemon closes them or on the first error.
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Every container (running or not) labelled [`LABEL_ALLOC`] and
    /// [`LABEL_NODE`]` = node`.
    fn list(
        &self,
        node: &str,
    ) -> impl Future<Output = Result<Vec<ContainerListing>, RuntimeError>> + Send;

    /// The details of one container; [`RuntimeError::NotFound`] when it is gone.
    fn inspect(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<ContainerDetails, RuntimeError>> + Send;

    /// Whether `image` is present on the node.
    fn image_present(&self, image: &str)
    -> impl Future<Output = Result<bool, RuntimeError>> + Send;

    /// Every image on the node with its references and size.
    fn local_images(
        &self,
    ) -> impl Future<Output = Result<Vec<images::LocalImage>, RuntimeError>> + Send;

    /// The ids of the images any container on the node (running or not) uses.
    fn images_in_use(
        &self,
    ) -> impl Future<Output = Result<std::collections::HashSet<String>, RuntimeError>> + Send;

    /// Removes image reference `reference` (the image goes with its last one).
    fn remove_image(
        &self,
        reference: &str,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Tags image `source` as `target` (`repo:tag`).
    fn tag(
        &self,
        source: &str,
        target: &str,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Every image reference on the node (tags and digests, sorted, at most
    /// [`MAX_INVENTORY_IMAGES`](novacron_common::wire::MAX_INVENTORY_IMAGES)) and
    /// the images' bytes.
    fn image_inventory(
        &self,
    ) -> impl Future<Output = Result<novacron_common::wire::ImageInventory, RuntimeError>> + Send;

    /// The registry digests (`repo@sha256:...`) of `image` on the node: empty
    /// for an image built or loaded here, or absent.
    fn repo_digests(
        &self,
        image: &str,
    ) -> impl Future<Output = Result<Vec<String>, RuntimeError>> + Send;

    /// Pulls `image` from its registry (with `auth`, else anonymously), within
    /// [`PULL_TIMEOUT`].
    /// `progress` hears how far it is (at most twice a second).
    fn pull(
        &self,
        image: &str,
        auth: Option<&novacron_common::wire::RegistryAuth>,
        progress: &(dyn Fn(novacron_common::wire::PullProgress) + Send + Sync),
    ) -> impl Future<Output = Result<(), PullError>> + Send;

    /// Creates (does not start) a container named `name`, creating the named volumes
    /// it mounts when they are missing. Returns the container id;
    /// [`RuntimeError::Conflict`] when the name is taken.
    fn create(
        &self,
        name: &str,
        config: &ContainerConfig,
    ) -> impl Future<Output = Result<String, RuntimeError>> + Send;

    /// Starts a created or exited container.
    fn start(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Stops a container: SIGTERM, then SIGKILL after `grace`. Stopping a stopped
    /// container succeeds.
    fn stop(
        &self,
        id: &str,
        grace: Duration,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Removes a container (forcibly, with its anonymous volumes).
    fn remove(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// Pauses (`true`) or resumes (`false`) a running container or guest: its
    /// processes (a VM's vCPUs) stop and keep their memory. Pausing a paused
    /// one, or resuming a running one, succeeds.
    fn set_paused(
        &self,
        id: &str,
        paused: bool,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// One reading of a running container's counters (no waiting for a second one).
    fn stats(&self, id: &str) -> impl Future<Output = Result<StatsReading, RuntimeError>> + Send;

    /// Runs `command` in a running container and returns its exit code.
    fn exec(
        &self,
        id: &str,
        command: &[String],
    ) -> impl Future<Output = Result<i64, RuntimeError>> + Send;

    /// Starts `command` in a running container with standard output and error
    /// attached (remote exec). The output stream ends when the command's output
    /// closes; [`exec_state`](ContainerRuntime::exec_state) then has its exit code.
    fn exec_attached(
        &self,
        id: &str,
        command: &[String],
    ) -> impl Future<Output = Result<ExecSession, RuntimeError>> + Send;

    /// Starts `command` in a running container with standard input attached too,
    /// on a pseudo-terminal of size `tty` when given (`novacron exec -it`). The
    /// default: this runtime has no interactive exec.
    fn exec_interactive(
        &self,
        id: &str,
        command: &[String],
        tty: Option<TerminalSize>,
    ) -> impl Future<Output = Result<InteractiveExec, RuntimeError>> + Send {
        let _ = (id, command, tty);
        async {
            Err(RuntimeError::Daemon {
                op: "exec",
                message: "this container runtime has no interactive exec".into(),
            })
        }
    }

    /// Resizes the pseudo-terminal of an interactive exec instance.
    fn exec_resize(
        &self,
        exec_id: &str,
        size: TerminalSize,
    ) -> impl Future<Output = Result<(), RuntimeError>> + Send {
        let _ = (exec_id, size);
        async {
            Err(RuntimeError::Daemon {
                op: "exec resize",
                message: "this container runtime has no interactive exec".into(),
            })
        }
    }

    /// The state of an exec instance made by
    /// [`exec_attached`](ContainerRuntime::exec_attached).
    fn exec_state(
        &self,
        exec_id: &str,
    ) -> impl Future<Output = Result<ExecState, RuntimeError>> + Send;

    /// Kills (SIGKILL) an exec instance's process and every process it started
    /// (cancelled or timed out remote exec). Killing a finished one succeeds.
    fn exec_kill(&self, exec_id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;

    /// A container's output: the last `tail` lines (0: all), then, with `follow`, new
    /// output until the container stops.
    fn logs(
        &self,
        id: &str,
        follow: bool,
        tail: u32,
    ) -> BoxStream<'static, Result<LogFrame, RuntimeError>>;

    /// Lifecycle events of the containers [`list`](ContainerRuntime::list) would
    /// return for `node`.
    fn events(&self, node: &str) -> BoxStream<'static, Result<ContainerEvent, RuntimeError>>;
}

/// Why a runtime operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeError {
    /// The container, image or exec instance does not exist.
    #[error("{op}: not found: {message}")]
    NotFound {
        /// The operation.
        op: &'static str,
        /// The daemon's words.
        message: String,
    },
    /// The name is already in use (create).
    #[error("{op}: conflict: {message}")]
    Conflict {
        /// The operation.
        op: &'static str,
        /// The daemon's words.
        message: String,
    },
    /// The daemon did not answer in time.
    #[error("{op}: no answer from the container runtime within {after:?}")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The limit that passed.
        after: Duration,
    },
    /// The daemon refused or failed the request, or could not be reached.
    #[error("{op}: {message}")]
    Daemon {
        /// The operation.
        op: &'static str,
        /// The daemon's (or the transport's) words.
        message: String,
    },
}

/// The longest a pull may take.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Why a pull failed, in the words the allocation's message and its events use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullFailure {
    /// The registry wants credentials, or refused the ones it got.
    Unauthorized,
    /// The registry has no such repository, tag or digest.
    NotFound,
    /// The registry could not be reached (name, connection, TLS, timeout).
    Unreachable,
    /// Anything else the daemon said.
    Other,
}

impl std::fmt::Display for PullFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PullFailure::Unauthorized => "unauthorized",
            PullFailure::NotFound => "not found",
            PullFailure::Unreachable => "registry unreachable",
            PullFailure::Other => "pull failed",
        })
    }
}

/// A failed pull: its kind and the daemon's words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct PullError {
    /// What kind of failure.
    pub kind: PullFailure,
    /// The daemon's (or the transport's) words.
    pub message: String,
}

impl PullError {
    /// Sorts the daemon's answer to a pull: its HTTP status, when it gave one,
    /// and its words (the daemon wraps the registry's answer in a 500 or a 404,
    /// or in an error line of the progress stream).
    pub fn classify(status: Option<u16>, message: &str) -> PullError {
        let m = message.to_ascii_lowercase();
        let any = |words: &[&str]| words.iter().any(|w| m.contains(w));
        let kind = if any(&[
            "unauthorized",
            "authentication required",
            "access denied",
            "denied: ",
            "no basic auth credentials",
            "incorrect username or password",
        ]) {
            PullFailure::Unauthorized
        } else if any(&[
            "no such host",
            "connection refused",
            "dial tcp",
            "i/o timeout",
            "timeout exceeded",
            "tls: ",
            "x509",
            "network is unreachable",
            "connection reset",
            "server gave http response to https client",
        ]) {
            PullFailure::Unreachable
        } else if status == Some(404)
            || any(&[
                "manifest unknown",
                "not found",
                "name unknown",
                "does not exist",
            ])
        {
            PullFailure::NotFound
        } else {
            PullFailure::Other
        };
        PullError {
            kind,
            message: message.trim().to_owned(),
        }
    }
}

impl RuntimeError {
    /// Whether the object the operation named does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, RuntimeError::NotFound { .. })
    }
}

/// One managed container as a listing shows it (cheap; no exit code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerListing {
    /// Container id.
    pub id: String,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// The runtime's state word (`running`, `exited`, `created`, ...). A change of
    /// this word is what makes the supervisor inspect the container again.
    pub state: String,
}

/// One container in detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerDetails {
    /// Container id.
    pub id: String,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// Where it is in its life.
    pub status: ContainerStatus,
    /// When its current (or last) run started, Unix ms.
    pub started_at_unix_ms: Option<u64>,
    /// Its address on its network, when it has one.
    pub ip: Option<IpAddr>,
    /// Its ports as published on the host (empty unless it runs).
    pub published: Vec<PublishedPort>,
    /// A VM whose guest is paused (QMP `paused`). Containers always say
    /// `false`: Docker's and runc's freezes are a checkpoint's.
    pub paused: bool,
}

/// Where a container is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerStatus {
    /// Created, never started.
    Created,
    /// Running (paused and restarting count as running).
    Running,
    /// Its process ended.
    Exited {
        /// The exit code.
        code: i64,
        /// The kernel killed it for going over its memory limit.
        oom_killed: bool,
        /// The runtime's error, when starting it failed.
        error: String,
    },
}

/// A container to create, in runtime-neutral terms (see [`spec::container_config`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerConfig {
    /// Image reference; must be present on the node.
    pub image: String,
    /// Entrypoint override; empty keeps the image's.
    pub entrypoint: Vec<String>,
    /// Command (arguments); empty keeps the image's.
    pub cmd: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Working directory override.
    pub working_dir: Option<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// CPU limit in billionths of a core; `None`: unlimited.
    pub nano_cpus: Option<i64>,
    /// Memory limit in bytes (swap included, so no swap); `None`: unlimited.
    pub memory_bytes: Option<i64>,
    /// NVIDIA GPUs by UUID.
    pub gpu_uuids: Vec<String>,
    /// Published ports.
    pub ports: Vec<PortMapping>,
    /// Volumes and bind mounts.
    pub mounts: Vec<MountConfig>,
    /// Variables set from secrets (added to `env`; their values never print).
    pub secret_env: Vec<(String, novacron_common::wire::SecretBytes)>,
    /// Run as a virtual machine ([`vm`]) instead of a container: `image` holds
    /// its kernel and disks.
    pub vm: Option<novacron_common::wire::VmSpec>,
}

/// One mount of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountConfig {
    /// A named volume, created (labelled [`LABEL_MANAGED`]) when missing.
    Volume {
        /// Volume name.
        name: String,
        /// Path in the container.
        target: String,
        /// Read-only.
        read_only: bool,
    },
    /// A host path; it must exist.
    Bind {
        /// Absolute host path.
        source: String,
        /// Path in the container.
        target: String,
        /// Read-only.
        read_only: bool,
    },
}

/// Raw counters of one running container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsReading {
    /// CPU time used by the container since it started, ns.
    pub cpu_total_ns: u64,
    /// CPU time of the whole host, ns (all cores), when the runtime reports it.
    pub system_cpu_ns: Option<u64>,
    /// Cores the host has online.
    pub online_cpus: u32,
    /// Memory in use (page cache that can be dropped not counted), bytes.
    pub memory_bytes: u64,
    /// Bytes received on all its interfaces.
    pub rx_bytes: u64,
    /// Bytes sent on all its interfaces.
    pub tx_bytes: u64,
}

/// A piece of a container's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFrame {
    /// `true` for standard error.
    pub stderr: bool,
    /// The bytes.
    pub data: Vec<u8>,
}

/// Something happened to a container (started, died, was removed, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    /// The container.
    pub container_id: String,
    /// The runtime's word for it (`start`, `die`, `destroy`, ...).
    pub action: String,
}

/// A command started in a container by
/// [`ContainerRuntime::exec_attached`].
pub struct ExecSession {
    /// The runtime's id of the exec instance.
    pub id: String,
    /// Its output, in order, as the runtime delivers it.
    pub output: BoxStream<'static, Result<LogFrame, RuntimeError>>,
}

/// An exec instance with its standard input attached
/// ([`ContainerRuntime::exec_interactive`]).
pub struct InteractiveExec {
    /// The runtime's id of the exec instance.
    pub id: String,
    /// Its output, in order (on a terminal, all of it as standard output).
    pub output: BoxStream<'static, Result<LogFrame, RuntimeError>>,
    /// Its standard input; shutting it down closes the command's input.
    pub input: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
}

impl std::fmt::Debug for InteractiveExec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InteractiveExec")
            .field("id", &self.id)
            .finish()
    }
}

impl std::fmt::Debug for ExecSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecSession").field("id", &self.id).finish()
    }
}

/// The state of an exec instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecState {
    /// Its process still runs.
    pub running: bool,
    /// Its exit code, once it ended.
    pub exit_code: Option<i64>,
    /// Its process id in the host's namespace, when the runtime reports one.
    pub pid: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_failure_is_sorted_by_the_daemon_s_words() {
        let kind = |status, m: &str| PullError::classify(status, m).kind;
        // Docker 20.10's words for each case.
        assert_eq!(
            kind(
                Some(500),
                "Get \"https://registry-1.docker.io/v2/\": dial tcp: lookup registry-1.docker.io on 10.0.0.53:53: no such host"
            ),
            PullFailure::Unreachable
        );
        assert_eq!(
            kind(
                Some(500),
                "Get \"http://127.0.0.1:1/v2/\": dial tcp 127.0.0.1:1: connect: connection refused"
            ),
            PullFailure::Unreachable
        );
        assert_eq!(
            kind(
                Some(404),
                "manifest for 127.0.0.1:5000/x:1 not found: manifest unknown: manifest unknown"
            ),
            PullFailure::NotFound
        );
        assert_eq!(
            kind(
                Some(500),
                "Head \"http://127.0.0.1:5000/v2/x/manifests/1\": no basic auth credentials"
            ),
            PullFailure::Unauthorized
        );
        assert_eq!(
            kind(
                Some(404),
                "pull access denied for nope, repository does not exist or may require 'docker login': denied: requested access to the resource is denied"
            ),
            PullFailure::Unauthorized
        );
        assert_eq!(kind(Some(500), "disk full"), PullFailure::Other);
        assert_eq!(
            PullError::classify(None, " x509: certificate signed by unknown authority ")
                .to_string(),
            "registry unreachable: x509: certificate signed by unknown authority"
        );
    }
}

/// An inventory of `refs`: sorted, deduplicated, bounded (with `truncated`).
pub fn inventory(
    refs: impl Iterator<Item = String>,
    bytes: u64,
) -> novacron_common::wire::ImageInventory {
    use novacron_common::wire::MAX_INVENTORY_IMAGES;
    let mut images: Vec<String> = refs.collect();
    images.sort();
    images.dedup();
    let truncated = images.len() > MAX_INVENTORY_IMAGES;
    images.truncate(MAX_INVENTORY_IMAGES);
    novacron_common::wire::ImageInventory {
        images,
        truncated,
        bytes,
    }
}

/// Reads the node's image inventory every `every` into `tx` (only when it
/// changed), until `cancel` fires.
pub async fn watch_images<R: ContainerRuntime>(
    runtime: &R,
    every: Duration,
    tx: tokio::sync::watch::Sender<Option<novacron_common::wire::ImageInventory>>,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        match runtime.image_inventory().await {
            Ok(inventory) => {
                tx.send_if_modified(|current| {
                    if current.as_ref() == Some(&inventory) {
                        false
                    } else {
                        *current = Some(inventory);
                        true
                    }
                });
            }
            Err(e) => tracing::debug!(error = %e, "cannot list the node's images"),
        }
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = cancel.cancelled() => return,
        }
    }
}

/// The digest reference of `image` among the node's `repo_digests` of it: the
/// one of the same repository (`registry:5000/team/api:1.4` →
/// `registry:5000/team/api@sha256:...`); `image` itself when it is a digest
/// reference already; `None` for an image that came from no registry.
pub fn registry_digest(image: &str, repo_digests: &[String]) -> Option<String> {
    if image.contains("@sha256:") {
        return Some(image.to_owned());
    }
    let (repo, _) = novacron_common::names::split_image_tag(image);
    let normal = |r: &str| {
        let r = r.strip_prefix("docker.io/").unwrap_or(r);
        r.strip_prefix("library/").unwrap_or(r).to_owned()
    };
    repo_digests
        .iter()
        .find(|d| {
            d.split_once('@')
                .is_some_and(|(r, _)| normal(r) == normal(repo))
        })
        .cloned()
}

#[cfg(test)]
mod digest_tests {
    use super::registry_digest;

    #[test]
    fn the_digest_of_the_same_repository_is_picked() {
        let digests = vec![
            "other/x@sha256:aa".to_string(),
            "127.0.0.1:5000/team/api@sha256:bb".to_string(),
            "busybox@sha256:cc".to_string(),
        ];
        assert_eq!(
            registry_digest("127.0.0.1:5000/team/api:1.4", &digests).as_deref(),
            Some("127.0.0.1:5000/team/api@sha256:bb")
        );
        assert_eq!(
            registry_digest("docker.io/library/busybox:1", &digests).as_deref(),
            Some("busybox@sha256:cc")
        );
        assert_eq!(registry_digest("local/built:1", &digests), None);
        assert_eq!(
            registry_digest("x@sha256:dd", &[]).as_deref(),
            Some("x@sha256:dd")
        );
        assert_eq!(
            registry_digest("127.0.0.1:5000/team/api", &digests).as_deref(),
            Some("127.0.0.1:5000/team/api@sha256:bb")
        );
    }
}

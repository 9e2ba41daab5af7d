//! Job manifests (`apiVersion: novacron.io/v1`, `kind: Job`): the types an operator
//! writes in YAML, parsed into values that cannot be invalid.
//!
//! Quantities are typed at the edge: CPU in millicores ([`Millicores`], written
//! `500m`, `2` or `1.5`), memory in bytes ([`ByteSize`], written `256Mi`, `1G`,
//! `1073741824`), durations as `5s`, `1m30s`.
//!
//! [`parse_job`] and [`parse_jobs`] turn YAML text into a validated [`Job`] in three
//! steps, each collecting what it can:
//!
//! 1. YAML syntax, document by document (`---` separates jobs);
//! 2. the schema: [`JobManifest`] with `deny_unknown_fields`, typed quantities and
//!    durations (errors here carry yaml_serde's line and column);
//! 3. the rules no type can express (ranges, arity of operators, uniqueness, cross
//!    field checks), all of them, located by re-reading the document (see the
//!    `locate` module).
//!
//! Every error names the file, line, column, field path, the bad value and what is
//! accepted: `job.yaml:12:15: spec.resources.memory: "12XB" is not a size; expected a
//! size like 256Mi, 1Gi, 500M or a number of bytes`.
//!
//! **Invariant:** a [`Job`] exists only if its manifest passed every check.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Serialize};

// checkpoint: added for spec.checkpoint (checkpoint policy).
pub mod checkpoint;
pub mod diff;
pub(crate) mod document;
pub mod guard;
pub mod health;
mod job;
pub mod lifecycle;
mod load;
mod locate;
pub mod scale;
pub mod secret;
mod validate;
pub mod vm;
pub mod vm_templates;

// checkpoint: re-export of the spec.checkpoint types.
pub use checkpoint::{CheckpointPolicy, DEFAULT_KEEP};
pub use job::Job;
pub use lifecycle::{Lifecycle, LifecycleSchedule, MIN_MAX_RUNTIME};
pub use load::{parse_job, parse_jobs, yaml_documents};
pub use scale::scaled_manifest;
pub use vm::{VM_BRIDGE_LABEL, VM_NODE_LABEL, VmTask, VmTemplate, VmTemplateSpec};

/// The only accepted `apiVersion`.
pub const API_VERSION: &str = "novacron.io/v1";
/// The only accepted `kind`.
pub const KIND: &str = "Job";
/// Most replicas a service or batch job may ask for.
pub const MAX_REPLICAS: u32 = 10_000;
/// Highest priority.
pub const MAX_PRIORITY: u32 = 1000;
/// Least memory a replica may ask for: Docker refuses memory limits below 6 MiB
/// (its `linuxMinMemory`, 6291456 bytes), so every allocation would fail to start.
pub const MIN_MEMORY: ByteSize = ByteSize(6 << 20);
/// Most GPUs one replica may ask for.
pub const MAX_GPUS: u32 = 16;
/// Most restarts within one restart interval.
pub const MAX_RESTART_ATTEMPTS: u32 = 100;
/// Most consecutive failed health checks before unhealthy.
pub const MAX_HEALTH_RETRIES: u32 = 100;
/// Shortest time between health checks.
pub const MIN_HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// Highest weight of an affinity, anti-affinity or spread rule.
pub const MAX_WEIGHT: u32 = 100;
/// Most CPU one replica may ask for: a million cores.
pub const MAX_CPU: Millicores = Millicores(1_000_000_000);

/// One problem in a manifest, located in its file.
///
/// Displays as `FILE:LINE:COLUMN: PATH: MESSAGE`, leaving out the parts that are
/// unknown. The message names the bad value and what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    /// The file name given to the parser.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// The field, like `spec.task.ports[1].hostPort`; empty for the whole file.
    pub path: String,
    /// What is wrong and what is accepted.
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ManifestError {}

/// Every problem found in a manifest file, in file order; never empty.
///
/// Displays one error per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestErrors(pub Vec<ManifestError>);

impl ManifestErrors {
    /// The first error in file order.
    pub fn first(&self) -> Option<&ManifestError> {
        self.0.first()
    }

    /// The errors, in file order.
    pub fn iter(&self) -> std::slice::Iter<'_, ManifestError> {
        self.0.iter()
    }

    /// How many errors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none (never, for an error returned by this module).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for ManifestErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ManifestErrors {}

impl IntoIterator for ManifestErrors {
    type Item = ManifestError;
    type IntoIter = std::vec::IntoIter<ManifestError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a ManifestErrors {
    type Item = &'a ManifestError;
    type IntoIter = std::slice::Iter<'a, ManifestError>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// The envelope of every manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JobManifest {
    /// Must be [`API_VERSION`].
    pub api_version: String,
    /// Must be `Job`.
    pub kind: String,
    /// Name and labels.
    pub metadata: Metadata,
    /// What to run.
    pub spec: JobSpec,
}

/// Name and labels of a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// The job's name (same rules as node names).
    pub name: String,
    /// Free labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The kind of job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum JobType {
    /// Long-running: keep `replicas` running.
    #[default]
    Service,
    /// Runs to completion: done when every replica exited 0.
    Batch,
    /// One allocation on every node that matches the constraints.
    System,
}

/// The desired work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct JobSpec {
    /// Service, batch or system.
    #[serde(default, rename = "type")]
    pub job_type: JobType,
    /// Replicas (ignored for system jobs).
    #[serde(default = "one")]
    pub replicas: u32,
    /// Higher may preempt lower; 0–1000, default 50.
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// The container.
    pub task: TaskTemplate,
    /// What each replica needs.
    #[serde(default)]
    pub resources: Resources,
    /// Where replicas may and should go.
    #[serde(default)]
    pub placement: Placement,
    /// Restarts on the node.
    #[serde(default)]
    pub restart: Restart,
    /// Health check.
    #[serde(default)]
    pub health: Option<Health>,
    /// Rolling updates.
    #[serde(default)]
    pub update: Update,
    /// When the job runs and for how long (left out of the hash when absent, so
    /// jobs without it keep their versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
    // checkpoint: added with the spec.checkpoint block.
    /// Periodic checkpoints, their mode and retention (left out of the hash when
    /// absent, like `lifecycle`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<CheckpointPolicy>,
    /// The services its replicas offer, each on one of the task's named ports
    /// (left out of the hash when empty, so jobs without services keep their
    /// versions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceSpec>,
    /// Pull the image ahead on every node the job's constraints allow, so that
    /// new replicas (scale-out, replacements, migrations) start without waiting
    /// for a pull. Left out of the hash when false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub pre_pull: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// A service a job offers: the endpoints of its running replicas on one port
/// join the controller's service catalog (`GET /v1/services/{name}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// The service's name (a DNS label: `web`, `api-v2`); jobs that name the same
    /// service share it (their endpoints are listed together).
    pub name: String,
    /// The name of the task port it is reached on (`spec.task.ports[].name`).
    pub port: String,
    /// Free tags (`primary`, `v2`) that clients may filter on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Publish the service on a port of every node through the agents' ingress,
    /// which balances over its healthy endpoints fleet-wide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<IngressSpec>,
    /// Each endpoint's share of traffic against the service's other endpoints
    /// (1-256, default 100): DNS SRV weights, the ingress's choice and the
    /// generated HAProxy configuration follow it. Jobs that share a service can
    /// send a canary a tenth of the traffic per replica with `weight: 10`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u16>,
}

/// An endpoint's weight when its service names none.
pub const DEFAULT_SERVICE_WEIGHT: u16 = 100;
/// The largest `spec.services[].weight` (HAProxy's largest server weight).
pub const MAX_SERVICE_WEIGHT: u16 = 256;

impl ServiceSpec {
    /// Its endpoints' weight.
    pub fn weight(&self) -> u16 {
        self.weight.unwrap_or(DEFAULT_SERVICE_WEIGHT)
    }
}

/// `spec.services[].ingress`: where and how every node's agent serves a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IngressSpec {
    /// The port each node's ingress listens on (on the agent's `ingress_address`).
    pub port: u16,
    /// `http` (default: HTTP/1.1 and HTTP/2, balanced per request) or `tcp`
    /// (balanced per connection).
    #[serde(default)]
    pub protocol: novacron_wire::IngressProtocol,
    /// Terminate TLS with this certificate chain and key (PEM files present on
    /// every node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<IngressTlsSpec>,
}

/// Files of `spec.services[].ingress.tls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IngressTlsSpec {
    /// The certificate chain (PEM), an absolute path on the node.
    pub cert_file: String,
    /// Its private key (PEM), an absolute path on the node.
    pub key_file: String,
}

/// The container of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TaskTemplate {
    /// Image reference, present on the node (`busybox:latest`).
    pub image: String,
    /// Entrypoint override.
    #[serde(default)]
    pub command: Vec<String>,
    /// Arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Published ports.
    #[serde(default)]
    pub ports: Vec<Port>,
    /// Mounted volumes.
    #[serde(default)]
    pub volumes: Vec<Volume>,
    /// Working directory in the container.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// When a replica is to stop (a rolling update, a scale-down, a stop), its
    /// endpoints leave the service catalog, DNS and the ingress at once, and the
    /// container is stopped only this long after (`5s`; at most 5m; default: at
    /// once), so that clients and balancers move off it first.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "health::optional_duration"
    )]
    pub shutdown_delay: Option<Duration>,
    /// When the node pulls the image: `if-not-present` (default: only when the
    /// node lacks it), `always` (before every start, following a moved tag) or
    /// `never` (it must be on the node already). Pin a digest
    /// (`image@sha256:...`) to run exactly the same content everywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_policy: Option<novacron_wire::PullPolicy>,
    /// A `registry` secret whose credentials the node uses to pull the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secret: Option<String>,
    /// Values of secrets the container sees, each as a variable or a file. A job
    /// version runs the secrets' versions current when it was applied; setting a
    /// new version of a secret rolls out the jobs that use it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretRef>,
    /// Run the task as a virtual machine (QEMU) instead of a container. `image`
    /// is then a disk image packaged as a container image ("containerDisk"):
    /// the kernel, initrd and base disk named here are files in it. Only nodes
    /// that can run VMs (label `novacron.io/vm`) take it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmTask>,
}

/// `spec.task.secrets[]`: one key of a secret, as a variable or a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecretRef {
    /// The secret's name.
    pub secret: String,
    /// The key within it.
    pub key: String,
    /// Set this environment variable to the value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// Or write the value to this absolute path in the container: a read-only
    /// file (mode 0444), kept on the node's tmpfs, never on its disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// A published port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Port {
    /// Name (`http`).
    pub name: String,
    /// Port inside the container.
    pub container_port: u16,
    /// Fixed host port; none takes a free port of the node's dynamic range (the
    /// scheduler picks it).
    #[serde(default)]
    pub host_port: Option<u16>,
    /// `tcp` or `udp`.
    #[serde(default)]
    pub protocol: Protocol,
}

/// A transport protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

/// A mounted volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Volume {
    /// A named volume (`data`) or an absolute host path (`/srv/data`).
    pub source: String,
    /// Absolute path in the container.
    pub target: String,
    /// Mount read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// What a replica needs.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU.
    #[serde(default)]
    pub cpu: Millicores,
    /// Memory.
    #[serde(default)]
    pub memory: ByteSize,
    /// Disk (scheduled against each node's disk; 0 asks for none). Left out of
    /// the serialized spec when 0, so that jobs without it keep their version hash.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub disk: ByteSize,
    /// GPUs: a container gets GPUs of the host's NVIDIA driver, a virtual
    /// machine GPUs bound to vfio-pci, passed through whole (chosen by model).
    #[serde(default)]
    pub gpus: Option<GpuRequest>,
}

fn is_zero(b: &ByteSize) -> bool {
    b.0 == 0
}

/// A GPU request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuRequest {
    /// How many.
    pub count: u32,
    /// A model name substring (`A100`), if it matters.
    #[serde(default)]
    pub model: Option<String>,
    /// Least memory per GPU.
    #[serde(default)]
    pub memory: Option<ByteSize>,
}

/// Placement rules.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Placement {
    /// Hard rules on node labels.
    #[serde(default)]
    pub constraints: Vec<Constraint>,
    /// Soft preferences for nodes (positive weights).
    #[serde(default)]
    pub affinity: Vec<WeightedConstraint>,
    /// Soft aversions to nodes (positive weights, subtracted).
    #[serde(default)]
    pub anti_affinity: Vec<WeightedConstraint>,
    /// Keep replicas of this job on different nodes (hard when true).
    #[serde(default)]
    pub job_anti_affinity: bool,
    /// Spread replicas evenly across the values of these labels.
    #[serde(default)]
    pub spread: Vec<Spread>,
    /// How to choose among feasible nodes.
    #[serde(default)]
    pub strategy: Strategy,
}

/// Scoring strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Fill nodes up: fewer nodes, cheaper fleets.
    #[default]
    Binpack,
    /// Prefer the emptiest nodes.
    Spread,
}

/// A rule on a node label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraint {
    /// The label key.
    pub key: String,
    /// The operator.
    pub operator: Operator,
    /// Values for `In`/`NotIn` (several) and `==`/`!=` (exactly one).
    #[serde(default)]
    pub values: Vec<String>,
}

/// A constraint with a weight (1–100).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedConstraint {
    /// The label key.
    pub key: String,
    /// The operator.
    pub operator: Operator,
    /// Values as for [`Constraint`].
    #[serde(default)]
    pub values: Vec<String>,
    /// 1–100.
    pub weight: u32,
}

/// Label operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    /// The label's value is one of `values`.
    In,
    /// The label is absent or its value is none of `values`.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
    /// The label equals the one value.
    #[serde(rename = "==")]
    Equal,
    /// The label is absent or differs from the one value.
    #[serde(rename = "!=")]
    NotEqual,
}

impl Operator {
    /// Whether `labels` satisfy `key <op> values`.
    pub fn matches(self, labels: &BTreeMap<String, String>, key: &str, values: &[String]) -> bool {
        let v = labels.get(key);
        match self {
            Operator::In => v.is_some_and(|v| values.contains(v)),
            Operator::NotIn => v.is_none_or(|v| !values.contains(v)),
            Operator::Exists => v.is_some(),
            Operator::DoesNotExist => v.is_none(),
            Operator::Equal => v.is_some_and(|v| values.first() == Some(v)),
            Operator::NotEqual => v.is_none_or(|v| values.first() != Some(v)),
        }
    }
}

impl fmt::Display for Operator {
    /// The spelling a manifest uses: `In`, `NotIn`, `Exists`, `DoesNotExist`, `==`,
    /// `!=`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Operator::In => "In",
            Operator::NotIn => "NotIn",
            Operator::Exists => "Exists",
            Operator::DoesNotExist => "DoesNotExist",
            Operator::Equal => "==",
            Operator::NotEqual => "!=",
        })
    }
}

/// Spread across a label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spread {
    /// The label key (`zone`).
    pub key: String,
    /// 1–100, default 50.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

/// Restart policy on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Restart {
    /// Restarts allowed within `interval`.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// The window `attempts` counts over.
    #[serde(default = "default_restart_interval", with = "duration")]
    pub interval: Duration,
    /// Wait before each restart.
    #[serde(default = "default_restart_delay", with = "duration")]
    pub delay: Duration,
    /// What happens when attempts run out.
    #[serde(default)]
    pub mode: RestartMode,
}

impl Default for Restart {
    fn default() -> Self {
        Restart {
            attempts: default_attempts(),
            interval: default_restart_interval(),
            delay: default_restart_delay(),
            mode: RestartMode::default(),
        }
    }
}

/// What happens when restart attempts run out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RestartMode {
    /// The allocation fails; the controller places a replacement.
    #[default]
    Fail,
    /// Wait until the interval has passed, then try again.
    Delay,
}

/// Health checks (see [`health`] for what each does).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// An HTTP GET that must answer 2xx or 3xx (the older form of `liveness`).
    #[serde(default)]
    pub http: Option<HttpCheck>,
    /// A TCP connect (the older form of `liveness`).
    #[serde(default)]
    pub tcp: Option<TcpCheck>,
    /// A command in the container that must exit 0 (the older form of `liveness`).
    #[serde(default)]
    pub exec: Option<ExecCheck>,
    /// Restarts the container when it keeps failing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<health::Probe>,
    /// Marks the allocation not ready (not healthy) when it fails; never restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<health::Probe>,
    /// Holds the other checks back until it first passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<health::Probe>,
    /// Restarts for failed liveness or startup checks before the allocation fails
    /// (default 3).
    #[serde(
        default,
        rename = "maxRestarts",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_restarts: Option<u32>,
    /// Wait before the first health restart (default 1s); it doubles with each, up
    /// to 5m.
    #[serde(
        default,
        rename = "restartBackoff",
        skip_serializing_if = "Option::is_none",
        with = "health::optional_duration"
    )]
    pub restart_backoff: Option<Duration>,
    /// Time between checks.
    #[serde(default = "default_health_interval", with = "duration")]
    pub interval: Duration,
    /// Time one check may take.
    #[serde(default = "default_health_timeout", with = "duration")]
    pub timeout: Duration,
    /// Consecutive failures before unhealthy.
    #[serde(default = "default_retries")]
    pub retries: u32,
}

/// HTTP check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    /// Container port.
    pub port: u16,
    /// Path, default `/`.
    #[serde(default = "default_path")]
    pub path: String,
}

/// TCP check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpCheck {
    /// Container port.
    pub port: u16,
}

/// Exec check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecCheck {
    /// The command.
    pub command: Vec<String>,
}

/// Rolling update settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Update {
    /// Replicas replaced at once.
    #[serde(default = "one")]
    pub max_parallel: u32,
    /// How long a new replica must stay healthy to count.
    #[serde(default = "default_min_healthy", with = "duration")]
    pub min_healthy_time: Duration,
    /// How long a new replica has to become healthy.
    #[serde(default = "default_healthy_deadline", with = "duration")]
    pub healthy_deadline: Duration,
    /// Go back to the last good version when an update fails.
    #[serde(default = "yes")]
    pub auto_revert: bool,
    /// Replicas of the new version started first, alongside the old ones.
    #[serde(default)]
    pub canary: u32,
}

impl Default for Update {
    fn default() -> Self {
        Update {
            max_parallel: 1,
            min_healthy_time: default_min_healthy(),
            healthy_deadline: default_healthy_deadline(),
            auto_revert: true,
            canary: 0,
        }
    }
}

/// CPU in millicores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Millicores(pub u64);

/// A size in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct ByteSize(pub u64);

impl fmt::Display for Millicores {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_multiple_of(1000) {
            write!(f, "{}", self.0 / 1000)
        } else {
            write!(f, "{}m", self.0)
        }
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("Ti", 1 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ];
        for (unit, size) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// What a CPU quantity may look like, for error messages.
const CPU_ACCEPTED: &str = "millicores like 500m, or cores like 2 or 1.5";
/// What a size may look like, for error messages.
const SIZE_ACCEPTED: &str = "a size like 256Mi, 1Gi, 500M or a number of bytes";

/// Parses `500m`, `2`, `1.5` into millicores, up to [`MAX_CPU`].
///
/// Decimal cores are read exactly (no floating point): `1.001` is 1001m, and
/// anything finer than a millicore (`0.0005`) is refused rather than rounded.
pub fn parse_cpu(s: &str) -> Result<Millicores, String> {
    let t = s.trim();
    let not_cpu = || format!("{t:?} is not a CPU quantity; expected {CPU_ACCEPTED}");
    let too_large =
        || format!("{t:?} is too large; expected {CPU_ACCEPTED}, up to {MAX_CPU} cores");
    let millis = if let Some(m) = t.strip_suffix('m') {
        if m.is_empty() || !m.bytes().all(|b| b.is_ascii_digit()) {
            return Err(not_cpu());
        }
        // Only ASCII digits remain, so the one possible failure is overflow.
        m.parse::<u64>().map_err(|_| too_large())?
    } else {
        let (whole, frac) = split_decimal(t).ok_or_else(not_cpu)?;
        let frac = frac.trim_end_matches('0');
        if frac.len() > 3 {
            return Err(format!(
                "{t:?} is finer than one millicore; expected {CPU_ACCEPTED}"
            ));
        }
        let whole: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| too_large())?
        };
        // At most three digits, padded to exactly three: "5" is 500m.
        let frac: u64 = format!("{frac:0<3}").parse().unwrap_or(0);
        whole
            .checked_mul(1000)
            .and_then(|m| m.checked_add(frac))
            .ok_or_else(too_large)?
    };
    if millis > MAX_CPU.0 {
        return Err(too_large());
    }
    Ok(Millicores(millis))
}

/// Parses `256Mi`, `1G`, `512k`, `1.5Gi`, `1073741824` into bytes.
///
/// Units: `k`/`K`, `M`, `G`, `T` (powers of 1000) and `Ki`, `Mi`, `Gi`, `Ti` (powers
/// of 1024). A decimal must come to a whole number of bytes.
pub fn parse_bytes(s: &str) -> Result<ByteSize, String> {
    let t = s.trim();
    let not_size = || format!("{t:?} is not a size; expected {SIZE_ACCEPTED}");
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let (whole, frac) = split_decimal(num).ok_or_else(not_size)?;
    let mult: u128 = match unit {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(not_size()),
    };
    let too_large = || format!("{t:?} is too large; expected {SIZE_ACCEPTED}, below 16Ei");
    let frac = frac.trim_end_matches('0');
    // 10^38 is the largest power of ten in a u128; 18 decimals are plenty.
    if frac.len() > 18 || whole.len() > 20 {
        return Err(too_large());
    }
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_large())?
    };
    let scale = 10u128.pow(frac.len() as u32);
    let frac: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().map_err(|_| not_size())?
    };
    let frac_bytes = frac * mult;
    if !frac_bytes.is_multiple_of(scale) {
        return Err(format!(
            "{t:?} is not a whole number of bytes; expected {SIZE_ACCEPTED}"
        ));
    }
    let bytes = whole
        .checked_mul(mult)
        .and_then(|b| b.checked_add(frac_bytes / scale))
        .ok_or_else(too_large)?;
    u64::try_from(bytes).map(ByteSize).map_err(|_| too_large())
}

/// Splits `12.5` into `("12", "5")`, `7` into `("7", "")` and `.5` into `("", "5")`;
/// `None` unless the text is digits with at most one point and at least one digit.
fn split_decimal(s: &str) -> Option<(&str, &str)> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    (digits(whole) && digits(frac) && !(whole.is_empty() && frac.is_empty()))
        .then_some((whole, frac))
}

impl<'de> Deserialize<'de> for Millicores {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A visitor rather than a buffered untagged enum, so that yaml_serde stamps
        // errors with the position of the scalar itself.
        struct V;
        impl Visitor<'_> for V {
            type Value = Millicores;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(CPU_ACCEPTED)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Millicores, E> {
                parse_cpu(s).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Millicores, E> {
                parse_cpu(&n.to_string()).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Millicores, E> {
                parse_cpu(&n.to_string()).map_err(E::custom)
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Millicores, E> {
                parse_cpu(&n.to_string()).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Millicores {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(SIZE_ACCEPTED)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ByteSize, E> {
                parse_bytes(s).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(n))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<ByteSize, E> {
                parse_bytes(&n.to_string()).map_err(E::custom)
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<ByteSize, E> {
                parse_bytes(&n.to_string()).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// Durations written the humantime way (`500ms`, `5s`, `1m30s`), with errors that
/// say what is accepted.
pub(crate) mod duration {
    use std::fmt;
    use std::time::Duration;

    use humantime_serde::re::humantime;
    use serde::de::{self, Visitor};

    /// What a duration may look like, for error messages.
    pub(super) const ACCEPTED: &str = "a duration like 500ms, 5s, 1m30s or 2h";

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(ACCEPTED)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
                humantime::parse_duration(s.trim()).map_err(|e| {
                    E::custom(format!(
                        "{s:?} is not a duration ({e}); expected {ACCEPTED}"
                    ))
                })
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
                match n {
                    0 => Ok(Duration::ZERO),
                    n => Err(E::custom(format!("{n} has no unit; expected {ACCEPTED}"))),
                }
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Duration, E> {
                Err(E::custom(format!(
                    "{n} is not a duration; expected {ACCEPTED}"
                )))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Duration, E> {
                Err(E::custom(format!("{n} has no unit; expected {ACCEPTED}")))
            }
        }
        d.deserialize_any(V)
    }
}

/// An optional humantime duration.
pub(crate) mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    use super::duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct W(#[serde(with = "duration")] Duration);
        W::deserialize(d).map(|w| Some(w.0))
    }
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn default_priority() -> u32 {
    50
}
fn default_weight() -> u32 {
    50
}
fn default_attempts() -> u32 {
    3
}
fn default_retries() -> u32 {
    3
}
fn default_restart_interval() -> Duration {
    Duration::from_secs(300)
}
fn default_restart_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_health_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_min_healthy() -> Duration {
    Duration::from_secs(5)
}
fn default_healthy_deadline() -> Duration {
    Duration::from_secs(60)
}
fn default_path() -> String {
    "/".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn values(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn cpu_quantities() {
        let ok = [
            ("500m", 500),
            ("0m", 0),
            ("2", 2000),
            ("1.5", 1500),
            ("0.5", 500),
            (".25", 250),
            ("3.", 3000),
            ("1.001", 1001),
            ("0.1", 100),
            ("1.2500", 1250),
            (" 2 ", 2000),
            ("1000000", 1_000_000_000),
            ("1000000000m", 1_000_000_000),
        ];
        for (text, millis) in ok {
            assert_eq!(parse_cpu(text), Ok(Millicores(millis)), "{text:?}");
        }
        let bad = [
            ("", "is not a CPU quantity"),
            ("m", "is not a CPU quantity"),
            ("1.5m", "is not a CPU quantity"),
            ("-1", "is not a CPU quantity"),
            ("+1", "is not a CPU quantity"),
            ("1e3", "is not a CPU quantity"),
            ("inf", "is not a CPU quantity"),
            ("NaN", "is not a CPU quantity"),
            ("two", "is not a CPU quantity"),
            (".", "is not a CPU quantity"),
            ("1..2", "is not a CPU quantity"),
            ("0.0005", "finer than one millicore"),
            ("1.0001", "finer than one millicore"),
            ("1000001", "too large"),
            ("1000000001m", "too large"),
            ("99999999999999999999999", "too large"),
            ("99999999999999999999999m", "too large"),
        ];
        for (text, why) in bad {
            let e = parse_cpu(text).expect_err(text);
            assert!(e.contains(why), "{text:?}: {e}");
            assert!(e.contains("expected millicores like 500m"), "{text:?}: {e}");
        }
    }

    #[test]
    fn byte_quantities() {
        let ok = [
            ("0", 0),
            ("1073741824", 1 << 30),
            ("512k", 512_000),
            ("512K", 512_000),
            ("256Mi", 256 << 20),
            ("1G", 1_000_000_000),
            ("2Ti", 2 << 40),
            ("1T", 1_000_000_000_000),
            ("1.5Gi", 3 << 29),
            ("0.5Ki", 512),
            ("1.50M", 1_500_000),
            ("18446744073709551615", u64::MAX),
        ];
        for (text, bytes) in ok {
            assert_eq!(parse_bytes(text), Ok(ByteSize(bytes)), "{text:?}");
        }
        let bad = [
            ("", "is not a size"),
            ("12XB", "is not a size"),
            ("1 Gi", "is not a size"),
            ("Gi", "is not a size"),
            ("-1Gi", "is not a size"),
            ("1gi", "is not a size"),
            ("1.2.3M", "is not a size"),
            ("0.1Ki", "not a whole number of bytes"),
            ("1.5", "not a whole number of bytes"),
            ("18446744073709551616", "too large"),
            ("16777216Ti", "too large"),
            ("1.0000000000000000001Ti", "too large"),
        ];
        for (text, why) in bad {
            let e = parse_bytes(text).expect_err(text);
            assert!(e.contains(why), "{text:?}: {e}");
            assert!(e.contains("expected a size like 256Mi"), "{text:?}: {e}");
        }
        assert_eq!(
            parse_bytes("12XB").expect_err("unknown unit"),
            "\"12XB\" is not a size; expected a size like 256Mi, 1Gi, 500M or a number of bytes"
        );
    }

    #[test]
    fn quantities_display_in_a_form_that_parses_back() {
        for cpu in [
            Millicores(0),
            Millicores(1),
            Millicores(1500),
            Millicores(2000),
        ] {
            assert_eq!(parse_cpu(&cpu.to_string()), Ok(cpu));
        }
        for size in [
            ByteSize(0),
            ByteSize(1000),
            ByteSize(1 << 20),
            ByteSize(3 << 29),
        ] {
            assert_eq!(parse_bytes(&size.to_string()), Ok(size));
        }
    }

    #[test]
    fn quantities_from_yaml_numbers() {
        #[derive(Deserialize)]
        struct R {
            cpu: Millicores,
            memory: ByteSize,
        }
        let r: R = yaml_serde::from_str("cpu: 1.5\nmemory: 1048576\n").expect("numbers");
        assert_eq!((r.cpu, r.memory), (Millicores(1500), ByteSize(1 << 20)));
        let r: R = yaml_serde::from_str("cpu: 2\nmemory: '1Mi'\n").expect("mixed");
        assert_eq!((r.cpu, r.memory), (Millicores(2000), ByteSize(1 << 20)));
        let e = yaml_serde::from_str::<R>("cpu: -1\nmemory: 1\n")
            .err()
            .expect("negative");
        assert!(e.to_string().contains("is not a CPU quantity"), "{e}");
        let e = yaml_serde::from_str::<R>("cpu: 1\nmemory: 1.5\n")
            .err()
            .expect("fraction");
        assert!(e.to_string().contains("not a whole number of bytes"), "{e}");
    }

    #[test]
    fn durations_from_yaml() {
        #[derive(Deserialize, Serialize)]
        struct D {
            #[serde(with = "duration")]
            d: Duration,
        }
        let d: D = yaml_serde::from_str("d: 1m30s").expect("humantime");
        assert_eq!(d.d, Duration::from_secs(90));
        let d: D = yaml_serde::from_str("d: 0").expect("zero needs no unit");
        assert_eq!(d.d, Duration::ZERO);
        let back: D = yaml_serde::from_str(
            &yaml_serde::to_string(&D {
                d: Duration::from_millis(1500),
            })
            .expect("serialize"),
        )
        .expect("round trip");
        assert_eq!(back.d, Duration::from_millis(1500));
        for (text, why) in [
            ("d: 5", "has no unit"),
            ("d: 5 parsecs", "is not a duration"),
        ] {
            let e = yaml_serde::from_str::<D>(text).err().expect(text);
            assert!(e.to_string().contains(why), "{e}");
            assert!(
                e.to_string().contains("expected a duration like 500ms"),
                "{e}"
            );
        }
    }

    #[test]
    fn operator_in() {
        let l = labels(&[("zone", "a")]);
        assert!(Operator::In.matches(&l, "zone", &values(&["a", "b"])));
        assert!(!Operator::In.matches(&l, "zone", &values(&["b"])));
        assert!(!Operator::In.matches(&l, "tier", &values(&["a"])));
        assert!(!Operator::In.matches(&l, "zone", &[]));
    }

    #[test]
    fn operator_not_in() {
        let l = labels(&[("zone", "a")]);
        assert!(!Operator::NotIn.matches(&l, "zone", &values(&["a", "b"])));
        assert!(Operator::NotIn.matches(&l, "zone", &values(&["b"])));
        assert!(
            Operator::NotIn.matches(&l, "tier", &values(&["a"])),
            "absent label"
        );
    }

    #[test]
    fn operator_exists_and_does_not_exist() {
        let l = labels(&[("gpu", "")]);
        assert!(Operator::Exists.matches(&l, "gpu", &[]));
        assert!(!Operator::Exists.matches(&l, "zone", &[]));
        assert!(!Operator::DoesNotExist.matches(&l, "gpu", &[]));
        assert!(Operator::DoesNotExist.matches(&l, "zone", &[]));
    }

    #[test]
    fn operator_equal() {
        let l = labels(&[("zone", "a")]);
        assert!(Operator::Equal.matches(&l, "zone", &values(&["a"])));
        assert!(!Operator::Equal.matches(&l, "zone", &values(&["b"])));
        assert!(!Operator::Equal.matches(&l, "tier", &values(&["a"])));
        assert!(!Operator::Equal.matches(&l, "zone", &[]));
    }

    #[test]
    fn operator_not_equal() {
        let l = labels(&[("zone", "a")]);
        assert!(!Operator::NotEqual.matches(&l, "zone", &values(&["a"])));
        assert!(Operator::NotEqual.matches(&l, "zone", &values(&["b"])));
        assert!(
            Operator::NotEqual.matches(&l, "tier", &values(&["a"])),
            "absent label"
        );
    }

    #[test]
    fn operators_parse_and_display_as_written() {
        for (text, op) in [
            ("In", Operator::In),
            ("NotIn", Operator::NotIn),
            ("Exists", Operator::Exists),
            ("DoesNotExist", Operator::DoesNotExist),
            ("==", Operator::Equal),
            ("!=", Operator::NotEqual),
        ] {
            let parsed: Operator = yaml_serde::from_str(&format!("'{text}'")).expect(text);
            assert_eq!(parsed, op);
            assert_eq!(op.to_string(), text);
        }
    }

    #[test]
    fn error_display_leaves_out_unknown_parts() {
        let mut e = ManifestError {
            file: "job.yaml".into(),
            line: Some(12),
            column: Some(15),
            path: "spec.resources.memory".into(),
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "job.yaml:12:15: spec.resources.memory: bad");
        e.column = None;
        assert_eq!(e.to_string(), "job.yaml:12: spec.resources.memory: bad");
        e.line = None;
        e.path.clear();
        assert_eq!(e.to_string(), "job.yaml: bad");
        let all = ManifestErrors(vec![e.clone(), e]);
        assert_eq!(all.to_string(), "job.yaml: bad\njob.yaml: bad");
    }
}

//! Job manifests (`apiVersion: novacron.io/v1`, `kind: Job`): the types an operator
//! writes in YAML, parsed into values that cannot be invalid.
//!
//! Quantities are typed at the edge: CPU in millicores ([`Millicores`], written
//! `500m`, `2` or `1.5`), memory in bytes ([`ByteSize`], written `256Mi`, `1G`,
//! `1073741824`), durations as `5s`, `1m30s`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The only accepted `apiVersion`.
pub const API_VERSION: &str = "novacron.io/v1";

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
}

/// A published port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Port {
    /// Name (`http`).
    pub name: String,
    /// Port inside the container.
    pub container_port: u16,
    /// Fixed host port; none means the runtime picks one.
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
    /// GPUs.
    #[serde(default)]
    pub gpus: Option<GpuRequest>,
}

/// A GPU request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    #[serde(default = "default_restart_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Wait before each restart.
    #[serde(default = "default_restart_delay", with = "humantime_serde")]
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

/// A health check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    /// An HTTP GET that must answer 2xx or 3xx.
    #[serde(default)]
    pub http: Option<HttpCheck>,
    /// A TCP connect.
    #[serde(default)]
    pub tcp: Option<TcpCheck>,
    /// A command in the container that must exit 0.
    #[serde(default)]
    pub exec: Option<ExecCheck>,
    /// Time between checks.
    #[serde(default = "default_health_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Time one check may take.
    #[serde(default = "default_health_timeout", with = "humantime_serde")]
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
    #[serde(default = "default_min_healthy", with = "humantime_serde")]
    pub min_healthy_time: Duration,
    /// How long a new replica has to become healthy.
    #[serde(default = "default_healthy_deadline", with = "humantime_serde")]
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
        if self.0 % 1000 == 0 {
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
            if self.0 >= size && self.0 % size == 0 {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// Parses `500m`, `2`, `1.5` into millicores.
pub fn parse_cpu(s: &str) -> Result<Millicores, String> {
    let accepted = "expected millicores like 500m, or cores like 2 or 1.5";
    let s = s.trim();
    if let Some(m) = s.strip_suffix('m') {
        return m
            .parse::<u64>()
            .map(Millicores)
            .map_err(|_| format!("{s:?}: {accepted}"));
    }
    let cores: f64 = s.parse().map_err(|_| format!("{s:?}: {accepted}"))?;
    if !cores.is_finite() || cores < 0.0 || cores > 1_000_000.0 {
        return Err(format!("{s:?}: {accepted}"));
    }
    let millis = cores * 1000.0;
    if millis.fract() != 0.0 {
        return Err(format!("{s:?}: finer than one millicore; {accepted}"));
    }
    Ok(Millicores(millis as u64))
}

/// Parses `256Mi`, `1G`, `512k`, `1073741824` into bytes.
pub fn parse_bytes(s: &str) -> Result<ByteSize, String> {
    let accepted = "expected a size like 256Mi, 1Gi, 500M or a number of bytes";
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: {accepted}"))?;
    let mult: u64 = match unit {
        "" => 1,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; {accepted}")),
    };
    n.checked_mul(mult)
        .map(ByteSize)
        .ok_or_else(|| format!("{s:?}: too large; {accepted}"))
}

/// Accepts a string or a number.
#[derive(Deserialize)]
#[serde(untagged)]
enum StrOrNum {
    S(String),
    U(u64),
    F(f64),
}

impl<'de> Deserialize<'de> for Millicores {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match StrOrNum::deserialize(d)? {
            StrOrNum::S(s) => parse_cpu(&s),
            StrOrNum::U(n) => parse_cpu(&n.to_string()),
            StrOrNum::F(f) => parse_cpu(&f.to_string()),
        }
        .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Millicores {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match StrOrNum::deserialize(d)? {
            StrOrNum::S(s) => parse_bytes(&s),
            StrOrNum::U(n) => Ok(ByteSize(n)),
            StrOrNum::F(f) => Err(format!(
                "{f}: expected a whole number of bytes or a size like 256Mi"
            )),
        }
        .map_err(serde::de::Error::custom)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
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

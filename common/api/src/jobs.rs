//! Job bodies: `POST /v1/jobs` and its answer, `GET /v1/jobs[/{name}]`, and the
//! allocations a job's detail shows.

use novacron_common::manifest::JobType;
use novacron_common::wire::{AllocState, FailureReason, RestoreFrom};
use serde::{Deserialize, Serialize};

/// `POST /v1/jobs` body.
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ApplyRequest {
    /// The file name, for error messages.
    #[cfg_attr(feature = "openapi", schema(max_length = 4096))]
    pub file: String,
    /// The YAML manifest.
    #[cfg_attr(feature = "openapi", schema(max_length = 262144))]
    pub manifest: String,
}

/// What `apply` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApplyResult {
    /// The job.
    pub job: String,
    /// The version now current.
    pub version: u64,
    /// `created`, `updated` or `unchanged`.
    pub outcome: String,
}

/// A job as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobSummary {
    /// Name.
    pub name: String,
    /// Type.
    pub job_type: JobType,
    /// Current version.
    pub version: u64,
    /// Last stable version.
    pub stable_version: Option<u64>,
    /// Replicas wanted: the autoscaler's when it set them, else the manifest's;
    /// for a system job, one per ready node matching its constraints.
    pub replicas: u32,
    /// Replicas the current manifest asks for.
    #[serde(default)]
    pub manifest_replicas: u32,
    /// Who set `replicas` apart from the manifest (`autoscaler (policy NAME)`);
    /// `None` while the manifest decides.
    #[serde(default)]
    pub scaled_by: Option<String>,
    /// Why, as the autoscaler explained it.
    #[serde(default)]
    pub scale_reason: Option<String>,
    /// Allocations running.
    pub running: u32,
    /// Allocations healthy.
    pub healthy: u32,
    /// Status word.
    pub status: String,
    /// Latest explanation.
    pub message: String,
    /// Submitted (Unix ms) and by whom.
    pub submitted_at_unix_ms: u64,
    /// Who submitted the current version.
    pub submitted_by: String,
    /// The virtual machine its task runs (template resolved), when it runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<novacron_common::wire::VmSpec>,
    /// A VM suspended by an operator (`novacron vm suspend`): its guest is kept
    /// paused until it is resumed; each allocation's `suspended` says whether
    /// its node has paused it yet.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
}

/// `job status`: the summary plus the allocations.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobDetail {
    /// The summary.
    pub summary: JobSummary,
    /// Allocations, newest first.
    pub allocations: Vec<AllocView>,
    /// The current manifest as submitted.
    pub manifest: String,
}

// The API's view of the controller's allocation record (which converts to it with
// `From`); the JSON and the OpenAPI schema are the record's.
/// One allocation as the controller keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = AllocRecord))]
pub struct AllocView {
    /// Id.
    pub id: String,
    /// Job.
    pub job: String,
    /// Job version.
    pub version: u64,
    /// Node.
    pub node: String,
    /// Whether the controller wants it running.
    pub desired_run: bool,
    /// Last known state.
    pub state: AllocState,
    /// Health as last reported.
    pub healthy: Option<bool>,
    /// Running and healthy since (Unix ms).
    pub healthy_since_unix_ms: Option<u64>,
    /// Created (Unix ms).
    pub created_unix_ms: u64,
    /// Last change (Unix ms).
    pub updated_unix_ms: u64,
    /// Restarts on the node.
    pub restarts: u32,
    /// Last exit code.
    pub exit_code: Option<i64>,
    /// Latest message.
    pub message: String,
    /// Why it failed, when its state is `failed` and its node said why
    /// (decisions read this, never the message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureReason>,
    /// CPU reserved (millicores).
    pub cpu_millis: u64,
    /// Memory reserved (bytes).
    pub memory_bytes: u64,
    /// GPUs assigned.
    pub gpu_uuids: Vec<String>,
    /// Job priority when placed.
    pub priority: u32,
    /// Disk reserved (bytes).
    #[serde(default)]
    pub disk_bytes: u64,
    /// Its published ports, each with the host port it holds on the node (empty
    /// for allocations placed before host ports were scheduled).
    #[serde(default)]
    pub ports: Vec<AllocPortView>,
    /// The checkpoint it starts from (migration, recovery, rollback); cleared once
    /// it runs.
    #[serde(default)]
    pub restore: Option<RestoreFrom>,
    /// Where its node published its ports, as the node's container runtime bound
    /// them and last reported (empty unless it runs): the address to reach it at.
    #[serde(default)]
    pub published: Vec<PublishedAddressView>,
    /// Its node reports its guest paused: a suspended VM (`novacron vm suspend`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
    /// The address its node reaches it at while it runs: a container's on its
    /// network, a VM's own (on the node's VM bridge, or its loopback address
    /// under QEMU's user network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "10.215.7.9"))]
    pub address: Option<std::net::IpAddr>,
}

/// A port of a running allocation as its node published it: `host_ip:host_port`
/// on the node reaches `container_port`/`protocol` in the container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = PublishedAddress))]
pub struct PublishedAddressView {
    /// The node address the port is bound to (`0.0.0.0` or `::` mean every
    /// address of the node; `127.0.0.1` only the node itself).
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "127.0.0.1"))]
    pub host_ip: std::net::IpAddr,
    /// The port on the node.
    pub host_port: u16,
    /// The port in the container.
    pub container_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

impl PublishedAddressView {
    /// `127.0.0.1:20001`, `[::]:20001`: where to connect on the node.
    pub fn address(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.host_ip, self.host_port)
    }
}

/// A published port of an allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = AllocPort))]
pub struct AllocPortView {
    /// Its name in the manifest.
    pub name: String,
    /// The port in the container.
    pub container_port: u16,
    /// The host port on the allocation's node: the manifest's `hostPort`, or the
    /// one the scheduler took from the node's dynamic range.
    pub host_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

pub use novacron_common::manifest::diff::FieldChange;

/// `POST /v1/jobs/plan`: what applying a manifest would do, decided by the
/// controller's real reconcile pass and scheduler on a copy of its state;
/// nothing is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobPlan {
    /// The job.
    pub job: String,
    /// `created`, `updated` or `unchanged`: what `apply` would answer.
    pub outcome: String,
    /// The version the job would have (the current one when unchanged).
    pub version: u64,
    /// The version now current; `None` for a new job.
    pub current_version: Option<u64>,
    /// The fields that would change from the current manifest (all of them for
    /// a new job; none when unchanged). A stopped job's apply runs it again.
    pub changes: Vec<FieldChange>,
    /// The allocations the next reconcile pass would start for this job (a
    /// rolling update starts its first batch; later batches follow as those
    /// become healthy).
    pub placements: Vec<PlannedPlacement>,
    /// The allocations it would stop (of this job, or preempted by it).
    pub stops: Vec<PlannedStop>,
    /// Replicas it could not place.
    pub unplaced: u32,
    /// The scheduler's explanation when some replicas cannot be placed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// One allocation a plan would start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlannedPlacement {
    /// The node.
    pub node: String,
    /// The job version it would run.
    pub version: u64,
    /// Host ports it would take (`8080/tcp`).
    pub ports: Vec<String>,
}

/// One allocation a plan would stop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlannedStop {
    /// The allocation.
    pub alloc: String,
    /// Its job.
    pub job: String,
    /// Its node.
    pub node: String,
    /// Why.
    pub reason: String,
}

/// One stored version of a job (`GET /v1/jobs/{name}/versions`, newest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobVersionView {
    /// The version number, from 1.
    pub version: u64,
    /// When it was submitted (Unix ms).
    pub submitted_at_unix_ms: u64,
    /// Who submitted it (`admin:NAME`, `operator:NAME`, a token's name).
    pub by: String,
    /// The file it came from (`job web (reverted to version 2)` for a revert).
    pub file: String,
    /// Whether it is the version that should run.
    pub current: bool,
    /// Whether it is the last version that rolled out healthy.
    pub stable: bool,
    /// What changed from the version before it that is still kept (every field
    /// for the oldest kept one).
    pub changes: Vec<FieldChange>,
    /// The manifest as submitted.
    pub manifest: String,
    /// The registry digest its image resolved to when it first ran, which every
    /// later replica and migration of it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// The version of each secret it runs.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub secrets: std::collections::BTreeMap<String, u64>,
}

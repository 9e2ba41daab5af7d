//! The controller's persistent state behind one trait, [`Store`].
//!
//! [`RedbStore`] keeps it in one embedded redb file in the data directory;
//! [`MemoryStore`] keeps it in memory for tests and simulations and behaves the same
//! (one test suite runs against both).
//!
//! In the redb file every kind of record has its own table, keyed by a string (node
//! name, token id), with the record as JSON bytes. A `meta` table holds the schema
//! version; a file written by a newer controller is refused rather than misread.
//! **Architecture Invariant:** only this module knows the file layout; everything
//! else sees records.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::SystemTime;

use novacron_common::sync::{lock, read, write};
use novacron_common::wire::{Capabilities, Capacity};
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, WriteTransaction,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::state::api_tokens::ApiTokenRecord;
use crate::state::events::EventQuery;
use crate::state::policies::PolicyRecord;
use crate::state::revision::{self, CHANGE_LOG_REVISIONS, ChangeLog, ChangePage, Touched};
use crate::state::tokens::{self, JoinToken, TokenError, TokenRecord};

use novacron_api::{AllocPortView, AllocView, Event, PublishedAddressView};

pub mod etcd;
mod memory;

pub use etcd::{EtcdConfig, EtcdStore};
pub use memory::MemoryStore;

/// The most bytes a manifest may have (an apply's largest record).
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// The controller's persistent state.
///
/// Every method is one transaction: it either happens entirely or not at all.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Inserts or replaces the node with `node.name`.
    fn upsert_node(&self, node: &NodeRecord) -> Result<(), StoreError>;
    /// The node called `name`, if enrolled.
    fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError>;
    /// All nodes, sorted by name.
    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// Inserts or replaces the token with `token.id`.
    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    /// All tokens (including expired and used-up ones), sorted by id.
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// One token by id.
    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Atomically (one write transaction): looks the token up by id,
    /// [`tokens::check`]s it, decrements `uses_left`, saves it; returns the updated
    /// record. Of concurrent calls with a token that has one use left, exactly one
    /// succeeds.
    fn consume_token(
        &self,
        token: &JoinToken,
        now: SystemTime,
    ) -> Result<TokenRecord, ConsumeError>;
    /// Raises the controller's link epoch and returns the new value, durably (the
    /// write is committed before this returns). A controller calls it once when it
    /// starts serving: every desired set it sends carries the epoch, so agents obey
    /// it over any set of an earlier controller run (see
    /// [`DesiredAllocations::epoch`](novacron_common::wire::DesiredAllocations)).
    fn next_link_epoch(&self) -> Result<u64, StoreError>;
    /// Records that a node's identity is revoked (replacing an earlier revocation of
    /// the same name).
    fn revoke(&self, revocation: &Revocation) -> Result<(), StoreError>;
    /// All revocations, sorted by node name.
    fn revocations(&self) -> Result<Vec<Revocation>, StoreError>;
    /// Records that the certificate with `revocation.serial` is revoked, unless it
    /// already is; returns the record that holds (the earlier one, if any).
    fn revoke_cert(&self, revocation: &CertRevocation) -> Result<CertRevocation, StoreError>;
    /// All certificate revocations, sorted by serial.
    fn cert_revocations(&self) -> Result<Vec<CertRevocation>, StoreError>;
    /// Saves, per node, the highest metrics sequence seen plus one, for all the given
    /// nodes in one write transaction. Nodes not listed keep their saved mark.
    fn save_metric_marks(&self, marks: &[(String, MetricMark)]) -> Result<(), StoreError>;
    /// The saved metrics marks by node name.
    fn metric_marks(&self) -> Result<HashMap<String, MetricMark>, StoreError>;
    /// Inserts or replaces the job with `job.name`.
    fn put_job(&self, job: &JobRecord) -> Result<(), StoreError>;
    /// All jobs, sorted by name.
    fn jobs(&self) -> Result<Vec<JobRecord>, StoreError>;
    /// Deletes job `name` with its versions (a purge); whether there was one.
    fn delete_job(&self, name: &str) -> Result<bool, StoreError>;
    /// Saves `put` and deletes `delete` (allocation ids) in one write transaction.
    fn save_allocations(&self, put: &[AllocRecord], delete: &[String]) -> Result<(), StoreError>;
    /// All allocations, sorted by id.
    fn allocations(&self) -> Result<Vec<AllocRecord>, StoreError>;
    /// Appends events (their `seq` above every stored one), then drops the oldest
    /// so that at most `retain` remain.
    fn append_events(&self, events: &[Event], retain: usize) -> Result<(), StoreError>;
    /// Reads events after `query.after`, oldest first: at most `query.limit`
    /// matching ones, scanning at most [`EventQuery::MAX_SCAN`] records.
    fn events(&self, query: &EventQuery) -> Result<EventScan, StoreError>;
    /// The highest stored event position, 0 when there is none.
    fn last_event_seq(&self) -> Result<u64, StoreError>;
    /// Creates or replaces an API token record.
    fn put_api_token(&self, token: &ApiTokenRecord) -> Result<(), StoreError>;
    /// One API token record.
    fn api_token(&self, id: &str) -> Result<Option<ApiTokenRecord>, StoreError>;
    /// Every API token record, by id.
    fn api_tokens(&self) -> Result<Vec<ApiTokenRecord>, StoreError>;
    /// Inserts or replaces the autoscaling policy with `policy.name`.
    fn put_policy(&self, policy: &PolicyRecord) -> Result<(), StoreError>;
    /// All autoscaling policies, sorted by name.
    fn policies(&self) -> Result<Vec<PolicyRecord>, StoreError>;
    /// Deletes the policy called `name`; whether there was one.
    fn delete_policy(&self, name: &str) -> Result<bool, StoreError>;
    /// Inserts or replaces the node pool with `pool.name`.
    fn put_node_pool(&self, pool: &PoolManifestRecord) -> Result<(), StoreError>;
    /// All node pools, sorted by name.
    fn node_pools(&self) -> Result<Vec<PoolManifestRecord>, StoreError>;
    /// Deletes the node pool called `name`; whether there was one.
    fn delete_node_pool(&self, name: &str) -> Result<bool, StoreError>;
    /// Inserts or replaces the node template with `template.name`.
    fn put_node_template(&self, template: &PoolManifestRecord) -> Result<(), StoreError>;
    /// All node templates, sorted by name.
    fn node_templates(&self) -> Result<Vec<PoolManifestRecord>, StoreError>;
    /// Deletes the node template called `name`; whether there was one.
    fn delete_node_template(&self, name: &str) -> Result<bool, StoreError>;
    /// Inserts or replaces the VM template with `template.name`.
    fn put_vm_template(&self, template: &PoolManifestRecord) -> Result<(), StoreError>;
    /// All VM templates, sorted by name.
    fn vm_templates(&self) -> Result<Vec<PoolManifestRecord>, StoreError>;
    /// Deletes the VM template called `name`; whether there was one.
    fn delete_vm_template(&self, name: &str) -> Result<bool, StoreError>;
    /// Inserts or replaces the secret with `secret.name` (values sealed; see
    /// [`crate::services::secrets`]).
    fn put_secret(&self, secret: &SecretRecord) -> Result<(), StoreError>;
    /// All secrets, sorted by name.
    fn secrets(&self) -> Result<Vec<SecretRecord>, StoreError>;
    /// Deletes the secret called `name`; whether there was one.
    fn delete_secret(&self, name: &str) -> Result<bool, StoreError>;
    /// Inserts or replaces the image tag `image.name:image.tag`.
    fn put_image(&self, image: &ImageRecord) -> Result<(), StoreError>;
    /// Every image tag, sorted by `name:tag`.
    fn images(&self) -> Result<Vec<ImageRecord>, StoreError>;
    /// Deletes image tag `key` (`name:tag`); whether there was one.
    fn delete_image(&self, key: &str) -> Result<bool, StoreError>;
    /// Saves one alerting record (JSON) of `kind` under `key`.
    fn put_alerting(
        &self,
        kind: AlertingKind,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<(), StoreError>;
    /// Every alerting record of `kind`, in key order.
    fn alerting(&self, kind: AlertingKind) -> Result<Vec<(String, serde_json::Value)>, StoreError>;
    /// Deletes one alerting record; whether it existed.
    fn delete_alerting(&self, kind: AlertingKind, key: &str) -> Result<bool, StoreError>;
    /// The store's revision: raised by one by every write that changes a record,
    /// in the same transaction; never lower than before, across reopens included
    /// (0 for a new store). See [`crate::state::revision`].
    fn revision(&self) -> Result<u64, StoreError>;
    /// A watch from revision `after`: the changes after it, oldest first, from at
    /// most `limit` writes, or [`ChangePage::Compacted`] when the change log no
    /// longer holds them.
    fn changes(&self, after: u64, limit: usize) -> Result<ChangePage, StoreError>;
    /// Whether the store can write now. After a failed write it tries again (and
    /// reopens the file when the failure left it unusable); `Ok` until then.
    fn writable(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Every record as (key in the etcd layout, JSON bytes), read in one
    /// consistent snapshot: backups and `store migrate`. The in-memory store
    /// of tests has no such copy and says so.
    fn export(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Err(StoreError::Encode {
            path: PathBuf::from("(memory)"),
            table: "all",
            key: String::new(),
            reason: "this store cannot be exported".into(),
        })
    }
}

/// A `NodePool` or `NodeTemplate` as applied: its one manifest document, parsed
/// again on load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolManifestRecord {
    /// `metadata.name`.
    pub name: String,
    /// The file it came from, for messages.
    pub file: String,
    /// The manifest document (YAML).
    pub source: String,
    /// When it was applied (Unix ms).
    pub applied_unix_ms: u64,
    /// Who applied it.
    pub by: String,
}

/// A secret as the store keeps it: metadata in clear, each version's values
/// sealed (AES-256-GCM) with the controller's secrets key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    /// `metadata.name`.
    pub name: String,
    /// `opaque` or `registry`.
    pub secret_type: novacron_common::manifest::secret::SecretType,
    /// Versions kept, oldest first.
    pub versions: Vec<SecretVersionRecord>,
}

/// One version of a secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretVersionRecord {
    /// From 1, raised by every change.
    pub version: u64,
    /// The keys, sorted (the values are in `sealed`).
    pub keys: Vec<String>,
    /// Bytes of the values together.
    pub bytes: u64,
    /// When it was set (Unix ms).
    pub created_unix_ms: u64,
    /// Who set it.
    pub by: String,
    /// Which secrets key sealed it (the first 16 hex digits of the key's SHA-256).
    pub key_id: String,
    /// The AES-GCM nonce, hex.
    pub nonce: String,
    /// The sealed JSON map of keys to values, with its tag, hex.
    pub sealed: String,
}

pub use novacron_api::ImageRecord;

/// What [`Store::events`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventScan {
    /// The matching events, oldest first.
    pub events: Vec<Event>,
    /// The last position scanned (the `after` of the next read); `query.after` when
    /// nothing was scanned.
    pub last_scanned: u64,
    /// Whether the scan stopped before the end of the log.
    pub more: bool,
}

/// A job and its versions, as the controller keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job name.
    pub name: String,
    /// Versions, oldest first (the last [`MAX_JOB_VERSIONS`] are kept).
    pub versions: Vec<JobVersion>,
    /// The version that should run.
    pub current: u64,
    /// The last version that rolled out healthy.
    pub stable: Option<u64>,
    /// Stopped by an operator.
    pub stopped: bool,
    /// `running`, `complete`, `stopped`, `failing`, `reverted`.
    pub status: String,
    /// The latest explanation (placement failures, reverts).
    pub message: String,
    /// Replicas set by `Workloads::scale` (the autoscaler), used instead of the
    /// manifest's while set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_override: Option<ReplicaOverride>,
    /// A VM job suspended by an operator (`novacron vm suspend`): its guest is
    /// kept paused, memory and all, until it is resumed. Cleared when the job
    /// is stopped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
}

/// Replicas of a job set apart from its manifest, and by whom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaOverride {
    /// The replicas to run.
    pub replicas: u32,
    /// Who set them (`autoscaler (policy api-cpu)`).
    pub by: String,
    /// Why, in one line.
    pub reason: String,
    /// When (Unix ms).
    pub at_unix_ms: u64,
}

/// How many versions of a job are kept.
pub const MAX_JOB_VERSIONS: usize = 10;

/// One submitted version of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobVersion {
    /// Version number, from 1.
    pub version: u64,
    /// The manifest as submitted (YAML); parsed again on load.
    pub source: String,
    /// The file name it came from, for messages.
    pub file: String,
    /// Hash of the validated spec.
    pub spec_hash: String,
    /// When it was submitted (Unix ms).
    pub submitted_at_unix_ms: u64,
    /// Who submitted it.
    pub by: String,
    /// The version of each secret the job uses that this version runs (pinned
    /// when it was submitted, or when a secret changed).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, u64>,
    /// The registry digest the image resolved to when this version first ran
    /// (`repo@sha256:...`): every later replica, restart from scratch and
    /// migration of the version runs it. Not set for `pullPolicy: always`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// The virtual machine this version runs, with its `VMTemplate` resolved
    /// when it was submitted (`None`: no template, or no VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<novacron_common::wire::VmSpec>,
}

/// One allocation as the controller keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllocRecord {
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
    pub state: novacron_common::wire::AllocState,
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
    pub failure: Option<novacron_common::wire::FailureReason>,
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
    pub ports: Vec<AllocPort>,
    /// The checkpoint it starts from (migration, recovery, rollback); cleared once
    /// it runs.
    #[serde(default)]
    pub restore: Option<novacron_common::wire::RestoreFrom>,
    /// Where its node's container runtime published its ports, as last reported
    /// (empty unless it runs).
    #[serde(default)]
    pub published: Vec<PublishedAddress>,
    /// Its node reports its guest paused: the VM is suspended (its job's
    /// [`JobRecord::suspended`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
    /// The address its node reaches it at, as last reported while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::IpAddr>,
}

/// A port of a running allocation as its node published it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedAddress {
    /// The node address it is bound to (`0.0.0.0` or `::`: every address).
    pub host_ip: std::net::IpAddr,
    /// The port on the node.
    pub host_port: u16,
    /// The port in the container.
    pub container_port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

impl From<&novacron_common::wire::PublishedPort> for PublishedAddress {
    fn from(p: &novacron_common::wire::PublishedPort) -> Self {
        PublishedAddress {
            host_ip: p.host_ip,
            host_port: p.host_port,
            container_port: p.container_port,
            protocol: if p.udp { "udp" } else { "tcp" }.into(),
        }
    }
}

impl From<PublishedAddress> for PublishedAddressView {
    fn from(p: PublishedAddress) -> Self {
        PublishedAddressView {
            host_ip: p.host_ip,
            host_port: p.host_port,
            container_port: p.container_port,
            protocol: p.protocol,
        }
    }
}

/// A published port of an allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocPort {
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

impl From<AllocRecord> for AllocView {
    fn from(a: AllocRecord) -> Self {
        AllocView {
            id: a.id,
            job: a.job,
            version: a.version,
            node: a.node,
            desired_run: a.desired_run,
            state: a.state,
            healthy: a.healthy,
            healthy_since_unix_ms: a.healthy_since_unix_ms,
            created_unix_ms: a.created_unix_ms,
            updated_unix_ms: a.updated_unix_ms,
            restarts: a.restarts,
            exit_code: a.exit_code,
            message: a.message,
            failure: a.failure,
            cpu_millis: a.cpu_millis,
            memory_bytes: a.memory_bytes,
            gpu_uuids: a.gpu_uuids,
            priority: a.priority,
            disk_bytes: a.disk_bytes,
            ports: a.ports.into_iter().map(AllocPortView::from).collect(),
            restore: a.restore,
            published: a
                .published
                .into_iter()
                .map(PublishedAddressView::from)
                .collect(),
            suspended: a.suspended,
            address: a.address,
        }
    }
}

impl From<AllocPort> for AllocPortView {
    fn from(p: AllocPort) -> Self {
        AllocPortView {
            name: p.name,
            container_port: p.container_port,
            host_port: p.host_port,
            protocol: p.protocol,
        }
    }
}

/// What the controller remembers about an enrolled node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node name (from its certificate).
    pub name: String,
    /// Node labels as last reported.
    pub labels: BTreeMap<String, String>,
    /// Allocatable resources as last reported.
    pub capacity: Capacity,
    /// Capabilities as last reported.
    pub capabilities: Capabilities,
    /// The agent's build version as last reported.
    pub agent_version: String,
    /// When the node enrolled, Unix milliseconds.
    pub enrolled_at_unix_ms: u64,
    /// When the controller last heard from it, Unix milliseconds.
    pub last_seen_unix_ms: Option<u64>,
    /// Serial (hex) of the node's current certificate.
    pub cert_serial: Option<String>,
    /// When that certificate expires, Unix milliseconds.
    pub cert_expires_unix_ms: Option<u64>,
    /// Samples the agent reported dropping (its buffer was full while disconnected).
    pub samples_dropped: u64,
    /// Cordoned: nothing new is placed on it until an operator uncordons it.
    /// Persisted, so a cordon outlives a controller restart.
    #[serde(default)]
    pub cordoned: bool,
    /// Stopped by its pool into the warm pool (a scale-in kept it rather than
    /// removing it); persisted, so that a restarted controller starts it rather
    /// than removing it as broken.
    #[serde(default)]
    pub parked: bool,
}

/// A revoked node identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revocation {
    /// The revoked node name.
    pub name: String,
    /// When it was revoked, Unix milliseconds.
    pub at_unix_ms: u64,
    /// Who revoked it (the operator identity).
    pub by: String,
    /// Why, as the operator gave it.
    pub reason: String,
}

/// A revoked certificate (operator or node), by serial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CertRevocation {
    /// The serial, lowercase hex without leading zeros
    /// ([`novacron_common::pki::Serial`]'s form).
    pub serial: String,
    /// When it was revoked, Unix milliseconds.
    pub at_unix_ms: u64,
    /// Who revoked it (the operator identity).
    pub by: String,
    /// Why, as the operator gave it.
    pub reason: String,
}

/// How far the controller has read a node's metrics: the agent instance (a random
/// number per agent process) and the first sequence number not yet seen from it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricMark {
    /// The agent instance the sequence numbers belong to.
    pub instance: u64,
    /// The first sequence number not yet seen.
    pub next_seq: u64,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (or another store in this one) holds the file's lock.
    #[error(
        "the data directory {} is in use by another novacron-controller process (its store {} is locked); stop that process or use another data directory",
        data_dir(.path).display(),
        .path.display()
    )]
    Locked {
        /// The store file.
        path: PathBuf,
    },
    /// The file was written by a newer controller with a schema this build cannot read.
    #[error(
        "store {}: schema version {found} is newer than this novacron-controller supports (version {supported}); run a newer novacron-controller, or restore the data directory from a backup made by this version",
        .path.display()
    )]
    NewerSchema {
        /// The store file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// [`SCHEMA_VERSION`].
        supported: u32,
    },
    /// The database failed (I/O, corruption detected by redb, ...).
    #[error("store {}: {op} failed: {source}", .path.display())]
    Database {
        /// The store file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: Box<redb::Error>,
    },
    /// A stored value does not decode as the record its table holds.
    #[error(
        "store {}: the value in table {table:?} under key {key:?} is corrupt ({reason}); restore the data directory from a backup, or delete that entry",
        .path.display()
    )]
    Corrupt {
        /// The store file.
        path: PathBuf,
        /// The table.
        table: &'static str,
        /// The key.
        key: String,
        /// The decoding error.
        reason: String,
    },
    /// etcd failed or did not answer (no quorum, unreachable, a limit met).
    #[error("etcd store at {endpoints}: {op} failed: {reason}")]
    Etcd {
        /// The configured client URLs.
        endpoints: String,
        /// What was being done.
        op: &'static str,
        /// The cause.
        reason: String,
    },
    /// A write of a controller that is not (or no longer) the leader was refused.
    #[error("{op} refused: {reason}; writes go to the leading controller")]
    Fenced {
        /// What was being done.
        op: &'static str,
        /// Why this controller may not write.
        reason: String,
    },
    /// A record could not be encoded (this is a bug).
    #[error("store {}: cannot encode the value for table {table:?} under key {key:?}: {reason}", .path.display())]
    Encode {
        /// The store file.
        path: PathBuf,
        /// The table.
        table: &'static str,
        /// The key.
        key: String,
        /// The encoding error.
        reason: String,
    },
}

impl StoreError {
    /// Whether the failure is the disk's (an I/O error, or an earlier one that left
    /// the file to be reopened) rather than the data's: the same write may succeed
    /// once the disk is fixed.
    pub fn is_io(&self) -> bool {
        match self {
            StoreError::Database { source, .. } => io_error(source),
            StoreError::Etcd { .. } | StoreError::Fenced { .. } => true,
            _ => false,
        }
    }

    /// Whether the write was refused because this controller does not lead.
    pub fn is_fenced(&self) -> bool {
        matches!(self, StoreError::Fenced { .. })
    }

    /// Whether the disk is full (`ENOSPC`).
    pub fn is_disk_full(&self) -> bool {
        let StoreError::Database { source, .. } = self else {
            return false;
        };
        let redb::Error::Io(io) = source.as_ref() else {
            return false;
        };
        io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(ENOSPC)
    }
}

/// `ENOSPC` on Linux.
const ENOSPC: i32 = 28;

/// Whether redb failed on I/O (now or before: it then refuses every operation with
/// `PreviousIo` until the database is reopened).
fn io_error(e: &redb::Error) -> bool {
    matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo)
}

/// Why [`Store::consume_token`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// The token was refused (unknown, wrong secret, expired, used up).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The store failed; the token was not consumed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The [`Store`] on a redb file. The file is locked while this value lives.
///
/// After an I/O error (a full disk) redb refuses every later operation until the
/// database is reopened: the store then reopens the file at the next operation, so
/// that once the disk is fixed writes succeed again without a restart. A write
/// that failed left nothing behind (redb's transactions are atomic).
pub struct RedbStore {
    /// `None` only while being reopened, or when reopening failed.
    db: RwLock<Option<Database>>,
    path: PathBuf,
    /// The last write failure, until a write succeeds again.
    failure: Mutex<Option<String>>,
    /// Revisions the change log keeps ([`CHANGE_LOG_REVISIONS`]; fewer in tests).
    change_log_revisions: u64,
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Memory redb may keep for cached pages. Its default is 1 GiB, in a process
/// whose memory should stay in the hundreds of MB at 10,000 agents (the
/// metrics marks of every node are rewritten every 2 s; the file reached
/// 414 MB in a 10,000-agent fan-in). The store's working set (nodes, jobs,
/// allocations, recent events) is far smaller.
pub const STORE_CACHE_BYTES: usize = 64 << 20;

fn open_database(path: &Path) -> Result<Database, redb::DatabaseError> {
    Database::builder()
        .set_cache_size(STORE_CACHE_BYTES)
        .create(path)
}

impl RedbStore {
    /// Opens the store at `path`, creating the file and its tables when missing (the
    /// directory must exist). Fails with [`StoreError::Locked`] when another process
    /// has it open, and with [`StoreError::NewerSchema`] when a newer controller
    /// wrote it.
    pub fn open(path: &Path) -> Result<RedbStore, StoreError> {
        let db = open_database(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen
            | redb::DatabaseError::LockProtocolMismatch => StoreError::Locked {
                path: path.to_owned(),
            },
            other => StoreError::Database {
                path: path.to_owned(),
                op: "opening the database",
                source: Box::new(other.into()),
            },
        })?;
        let store = RedbStore {
            db: RwLock::new(Some(db)),
            path: path.to_owned(),
            failure: Mutex::new(None),
            change_log_revisions: CHANGE_LOG_REVISIONS,
        };
        store.init_schema()?;
        Ok(store)
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Checks the schema version and creates the tables, in one write transaction
    /// (which is dropped, so aborted, when the version is newer).
    fn init_schema(&self) -> Result<(), StoreError> {
        const OP: &str = "initializing the schema";
        let txn = self.begin_write(OP)?;
        let found: Option<u32> = self.get_in(&txn, META, SCHEMA_VERSION_KEY, OP)?;
        match found {
            Some(found) if found > SCHEMA_VERSION => {
                return Err(StoreError::NewerSchema {
                    path: self.path.clone(),
                    found,
                    supported: SCHEMA_VERSION,
                });
            }
            Some(found) if found == SCHEMA_VERSION => {}
            // A new file, or (in future versions) an older schema to migrate here.
            _ => self.put_in(&txn, META, SCHEMA_VERSION_KEY, &SCHEMA_VERSION, OP)?,
        }
        for table in ALL_TABLES {
            txn.open_table(table.def()).map_err(self.fail(OP))?;
        }
        txn.open_table(EVENTS).map_err(self.fail(OP))?;
        txn.open_table(CHANGES).map_err(self.fail(OP))?;
        self.commit(txn, OP)
    }

    /// Turns a redb error into a [`StoreError`], noting an I/O failure (which
    /// [`Store::writable`] then reports until a write succeeds).
    fn fail<E: Into<redb::Error>>(&self, op: &'static str) -> impl FnOnce(E) -> StoreError + '_ {
        move |e| {
            let e = StoreError::Database {
                path: self.path.clone(),
                op,
                source: Box::new(e.into()),
            };
            if e.is_io() {
                *lock(&self.failure) = Some(e.to_string());
            }
            e
        }
    }

    /// Runs `f` on the database; when redb refuses it because of an earlier I/O
    /// error, reopens the file and runs `f` once more.
    fn with_db<T, E: Into<redb::Error>>(
        &self,
        op: &'static str,
        f: impl Fn(&Database) -> Result<T, E>,
    ) -> Result<T, StoreError> {
        {
            let db = read(&self.db);
            if let Some(db) = db.as_ref() {
                match f(db).map_err(Into::into) {
                    Ok(t) => return Ok(t),
                    Err(e) if !io_error(&e) => return Err(self.fail(op)(e)),
                    Err(_) => {}
                }
            }
        }
        self.reopen(op)?;
        let db = read(&self.db);
        match db.as_ref() {
            Some(db) => f(db).map_err(self.fail(op)),
            None => Err(self.fail(op)(redb::Error::PreviousIo)),
        }
    }

    /// Closes and reopens the file (redb latches an I/O error until then).
    fn reopen(&self, op: &'static str) -> Result<(), StoreError> {
        let mut db = write(&self.db);
        // Never wait for a writer here (it could need this lock to finish): a
        // live writer, or a write that can begin, means the file is usable (another
        // caller reopened it meanwhile).
        if let Some(open) = db.as_ref() {
            match open.try_begin_write() {
                Ok(_) | Err(redb::TransactionError::WouldBlock) => return Ok(()),
                Err(_) => {}
            }
        }
        // The old handle holds the file lock: drop it first.
        *db = None;
        let reopened = open_database(&self.path).map_err(self.fail(op))?;
        tracing::warn!(path = %self.path.display(), "store reopened after an I/O error");
        *db = Some(reopened);
        Ok(())
    }

    fn begin_write(&self, op: &'static str) -> Result<WriteTransaction, StoreError> {
        self.with_db(op, |db| db.begin_write())
    }

    fn begin_read(&self, op: &'static str) -> Result<ReadTransaction, StoreError> {
        self.with_db(op, |db| db.begin_read())
    }

    /// Commits `txn`, clearing the noted failure on success.
    fn commit(&self, txn: WriteTransaction, op: &'static str) -> Result<(), StoreError> {
        txn.commit().map_err(self.fail(op))?;
        *lock(&self.failure) = None;
        Ok(())
    }

    fn decode<T: DeserializeOwned>(
        &self,
        table: Table,
        key: &str,
        bytes: &[u8],
    ) -> Result<T, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            table: table.name,
            key: key.to_owned(),
            reason: e.to_string(),
        })
    }

    fn get_in<T: DeserializeOwned>(
        &self,
        txn: &WriteTransaction,
        table: Table,
        key: &str,
        op: &'static str,
    ) -> Result<Option<T>, StoreError> {
        let t = txn.open_table(table.def()).map_err(self.fail(op))?;
        let Some(guard) = t.get(key).map_err(self.fail(op))? else {
            return Ok(None);
        };
        self.decode(table, key, guard.value()).map(Some)
    }

    fn put_in<T: Serialize>(
        &self,
        txn: &WriteTransaction,
        table: Table,
        key: &str,
        value: &T,
        op: &'static str,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|e| StoreError::Encode {
            path: self.path.clone(),
            table: table.name,
            key: key.to_owned(),
            reason: e.to_string(),
        })?;
        let mut t = txn.open_table(table.def()).map_err(self.fail(op))?;
        t.insert(key, bytes.as_slice()).map_err(self.fail(op))?;
        Ok(())
    }

    /// One record, in a write transaction of its own.
    fn put<T: Serialize>(
        &self,
        table: Table,
        key: &str,
        value: &T,
        op: &'static str,
    ) -> Result<(), StoreError> {
        let txn = self.begin_write(op)?;
        self.put_in(&txn, table, key, value, op)?;
        self.log_in(&txn, vec![Touched::put(table.name, key)], op)?;
        self.commit(txn, op)
    }

    /// Raises the revision and logs the write that touched `touched`, inside `txn`
    /// (nothing when it touched nothing); drops the log's oldest write past
    /// [`CHANGE_LOG_REVISIONS`].
    fn log_in(
        &self,
        txn: &WriteTransaction,
        touched: Vec<Touched>,
        op: &'static str,
    ) -> Result<(), StoreError> {
        if touched.is_empty() {
            return Ok(());
        }
        let revision = self
            .get_in::<u64>(txn, META, REVISION_KEY, op)?
            .unwrap_or(0)
            + 1;
        self.put_in(txn, META, REVISION_KEY, &revision, op)?;
        let bytes = serde_json::to_vec(&touched).map_err(|e| StoreError::Encode {
            path: self.path.clone(),
            table: CHANGES_NAME,
            key: revision.to_string(),
            reason: e.to_string(),
        })?;
        let mut t = txn.open_table(CHANGES).map_err(self.fail(op))?;
        t.insert(revision, bytes.as_slice())
            .map_err(self.fail(op))?;
        if revision > self.change_log_revisions {
            t.remove(revision - self.change_log_revisions)
                .map_err(self.fail(op))?;
        }
        Ok(())
    }

    fn get<T: DeserializeOwned>(
        &self,
        table: Table,
        key: &str,
        op: &'static str,
    ) -> Result<Option<T>, StoreError> {
        let txn = self.begin_read(op)?;
        let t = txn.open_table(table.def()).map_err(self.fail(op))?;
        let Some(guard) = t.get(key).map_err(self.fail(op))? else {
            return Ok(None);
        };
        self.decode(table, key, guard.value()).map(Some)
    }

    /// Every record of a table, in key order.
    fn all<T: DeserializeOwned>(
        &self,
        table: Table,
        op: &'static str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let txn = self.begin_read(op)?;
        let t = txn.open_table(table.def()).map_err(self.fail(op))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(self.fail(op))? {
            let (key, value) = entry.map_err(self.fail(op))?;
            let key = key.value().to_owned();
            let record = self.decode(table, &key, value.value())?;
            out.push((key, record));
        }
        Ok(out)
    }
}

impl RedbStore {
    /// Every record of the file as (key, JSON bytes) in the etcd store's layout
    /// (`t/<table>/<key>`, `events/<seq>`, `changes/<revision>`, `meta/<key>`),
    /// read in one transaction: what `novacron-controller store migrate` copies.
    fn export_all(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        const OP: &str = "exporting the store";
        let txn = self.begin_read(OP)?;
        let mut out = Vec::new();
        for table in ALL_TABLES {
            let t = txn.open_table(table.def()).map_err(self.fail(OP))?;
            for entry in t.iter().map_err(self.fail(OP))? {
                let (k, v) = entry.map_err(self.fail(OP))?;
                out.push((
                    format!("t/{}/{}", table.name, k.value()),
                    v.value().to_vec(),
                ));
            }
        }
        let meta = txn.open_table(META.def()).map_err(self.fail(OP))?;
        for entry in meta.iter().map_err(self.fail(OP))? {
            let (k, v) = entry.map_err(self.fail(OP))?;
            if k.value() != PROBE_KEY {
                out.push((format!("meta/{}", k.value()), v.value().to_vec()));
            }
        }
        for (name, def) in [("events", EVENTS), ("changes", CHANGES)] {
            let t = txn.open_table(def).map_err(self.fail(OP))?;
            for entry in t.iter().map_err(self.fail(OP))? {
                let (k, v) = entry.map_err(self.fail(OP))?;
                out.push((format!("{name}/{:020}", k.value()), v.value().to_vec()));
            }
        }
        Ok(out)
    }

    /// Writes `entries` (keys as [`Store::export`] gives them) into this store
    /// in one transaction: `restore` into a new data directory. Refuses a key of
    /// no known table.
    pub fn import(&self, entries: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        const OP: &str = "importing records";
        let txn = self.begin_write(OP)?;
        for (key, value) in entries {
            let bad = || StoreError::Corrupt {
                path: self.path.clone(),
                table: "backup",
                key: key.clone(),
                reason: "not a key of this store's layout".into(),
            };
            if let Some(rest) = key.strip_prefix("t/") {
                let (table, k) = rest.split_once('/').ok_or_else(bad)?;
                let table = ALL_TABLES
                    .iter()
                    .find(|t| t.name == table)
                    .ok_or_else(bad)?;
                let mut t = txn.open_table(table.def()).map_err(self.fail(OP))?;
                t.insert(k, value.as_slice()).map_err(self.fail(OP))?;
            } else if let Some(k) = key.strip_prefix("meta/") {
                let mut t = txn.open_table(META.def()).map_err(self.fail(OP))?;
                t.insert(k, value.as_slice()).map_err(self.fail(OP))?;
            } else {
                let (name, n) = key.split_once('/').ok_or_else(bad)?;
                let n: u64 = n.parse().map_err(|_| bad())?;
                let def = match name {
                    "events" => EVENTS,
                    "changes" => CHANGES,
                    _ => return Err(bad()),
                };
                let mut t = txn.open_table(def).map_err(self.fail(OP))?;
                t.insert(n, value.as_slice()).map_err(self.fail(OP))?;
            }
        }
        self.commit(txn, OP)
    }
}

impl RedbStore {
    /// Removes one record in a write transaction of its own; whether it existed.
    fn remove(&self, table: Table, key: &str, op: &'static str) -> Result<bool, StoreError> {
        let txn = self.begin_write(op)?;
        let existed = {
            let mut t = txn.open_table(table.def()).map_err(self.fail(op))?;
            t.remove(key).map_err(self.fail(op))?.is_some()
        };
        // The write probe's key in `meta` is bookkeeping, not a record.
        if existed && table.name != META.name {
            self.log_in(&txn, vec![Touched::delete(table.name, key)], op)?;
        }
        self.commit(txn, op)?;
        Ok(existed)
    }
}

impl Store for RedbStore {
    fn export(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.export_all()
    }

    fn revision(&self) -> Result<u64, StoreError> {
        Ok(self
            .get(META, REVISION_KEY, "reading the revision")?
            .unwrap_or(0))
    }

    fn changes(&self, after: u64, limit: usize) -> Result<ChangePage, StoreError> {
        const OP: &str = "reading changes";
        let txn = self.begin_read(OP)?;
        let meta = txn.open_table(META.def()).map_err(self.fail(OP))?;
        let current = match meta.get(REVISION_KEY).map_err(self.fail(OP))? {
            Some(v) => self.decode(META, REVISION_KEY, v.value())?,
            None => 0,
        };
        let t = txn.open_table(CHANGES).map_err(self.fail(OP))?;
        let oldest = t.first().map_err(self.fail(OP))?.map(|(k, _)| k.value());
        let mut writes = Vec::new();
        for entry in t
            .range(after.saturating_add(1)..)
            .map_err(self.fail(OP))?
            .take(limit)
        {
            let (k, v) = entry.map_err(self.fail(OP))?;
            let key = k.value().to_string();
            let touched = serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                table: CHANGES_NAME,
                key,
                reason: e.to_string(),
            })?;
            writes.push((k.value(), touched));
        }
        Ok(revision::page(current, oldest, after, writes.into_iter()))
    }

    fn writable(&self) -> Result<(), StoreError> {
        const OP: &str = "checking that the store can write";
        let failed = lock(&self.failure).is_some();
        if !failed {
            return Ok(());
        }
        // As much as the largest manifest: room for this is room for an apply.
        let probe = "x".repeat(MAX_MANIFEST_BYTES);
        let txn = self.begin_write(OP)?;
        self.put_in(&txn, META, PROBE_KEY, &probe, OP)?;
        self.commit(txn, OP)?;
        self.remove(META, PROBE_KEY, OP).map(|_| ())
    }

    fn put_node_pool(&self, pool: &PoolManifestRecord) -> Result<(), StoreError> {
        self.put(NODE_POOLS, &pool.name, pool, "saving a node pool")
    }

    fn node_pools(&self) -> Result<Vec<PoolManifestRecord>, StoreError> {
        Ok(values(self.all(NODE_POOLS, "listing node pools")?))
    }

    fn delete_node_pool(&self, name: &str) -> Result<bool, StoreError> {
        self.remove(NODE_POOLS, name, "deleting a node pool")
    }

    fn put_secret(&self, secret: &SecretRecord) -> Result<(), StoreError> {
        self.put(SECRETS, &secret.name, secret, "saving a secret")
    }

    fn secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        Ok(values(self.all(SECRETS, "listing secrets")?))
    }

    fn delete_secret(&self, name: &str) -> Result<bool, StoreError> {
        self.remove(SECRETS, name, "deleting a secret")
    }

    fn put_image(&self, image: &ImageRecord) -> Result<(), StoreError> {
        self.put(IMAGES, &image.key(), image, "saving an image tag")
    }

    fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        Ok(values(self.all(IMAGES, "listing images")?))
    }

    fn delete_image(&self, key: &str) -> Result<bool, StoreError> {
        self.remove(IMAGES, key, "deleting an image tag")
    }

    fn put_node_template(&self, template: &PoolManifestRecord) -> Result<(), StoreError> {
        self.put(
            NODE_TEMPLATES,
            &template.name,
            template,
            "saving a node template",
        )
    }

    fn node_templates(&self) -> Result<Vec<PoolManifestRecord>, StoreError> {
        Ok(values(self.all(NODE_TEMPLATES, "listing node templates")?))
    }

    fn delete_node_template(&self, name: &str) -> Result<bool, StoreError> {
        self.remove(NODE_TEMPLATES, name, "deleting a node template")
    }

    fn put_vm_template(&self, template: &PoolManifestRecord) -> Result<(), StoreError> {
        self.put(
            VM_TEMPLATES,
            &template.name,
            template,
            "saving a VM template",
        )
    }

    fn vm_templates(&self) -> Result<Vec<PoolManifestRecord>, StoreError> {
        Ok(values(self.all(VM_TEMPLATES, "listing VM templates")?))
    }

    fn delete_vm_template(&self, name: &str) -> Result<bool, StoreError> {
        self.remove(VM_TEMPLATES, name, "deleting a VM template")
    }

    fn put_alerting(
        &self,
        kind: AlertingKind,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.put(kind.table(), key, value, "saving an alerting record")
    }

    fn alerting(&self, kind: AlertingKind) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        self.all(kind.table(), "listing alerting records")
    }

    fn delete_alerting(&self, kind: AlertingKind, key: &str) -> Result<bool, StoreError> {
        self.remove(kind.table(), key, "deleting an alerting record")
    }

    fn put_policy(&self, policy: &PolicyRecord) -> Result<(), StoreError> {
        self.put(POLICIES, &policy.name, policy, "saving a policy")
    }

    fn policies(&self) -> Result<Vec<PolicyRecord>, StoreError> {
        Ok(values(self.all(POLICIES, "listing policies")?))
    }

    fn delete_policy(&self, name: &str) -> Result<bool, StoreError> {
        const OP: &str = "deleting a policy";
        let txn = self.begin_write(OP)?;
        let existed = {
            let mut t = txn.open_table(POLICIES.def()).map_err(self.fail(OP))?;
            t.remove(name).map_err(self.fail(OP))?.is_some()
        };
        if existed {
            self.log_in(&txn, vec![Touched::delete(POLICIES.name, name)], OP)?;
        }
        self.commit(txn, OP)?;
        Ok(existed)
    }

    fn put_api_token(&self, token: &ApiTokenRecord) -> Result<(), StoreError> {
        self.put(API_TOKENS, &token.id, token, "saving an API token")
    }

    fn api_token(&self, id: &str) -> Result<Option<ApiTokenRecord>, StoreError> {
        self.get(API_TOKENS, id, "reading an API token")
    }

    fn api_tokens(&self) -> Result<Vec<ApiTokenRecord>, StoreError> {
        Ok(values(self.all(API_TOKENS, "listing API tokens")?))
    }

    fn append_events(&self, events: &[Event], retain: usize) -> Result<(), StoreError> {
        const OP: &str = "appending events";
        let txn = self.begin_write(OP)?;
        {
            let mut t = txn.open_table(EVENTS).map_err(self.fail(OP))?;
            for e in events {
                let bytes = serde_json::to_vec(e).map_err(|err| StoreError::Encode {
                    path: self.path.clone(),
                    table: EVENTS_NAME,
                    key: e.seq.to_string(),
                    reason: err.to_string(),
                })?;
                t.insert(e.seq, bytes.as_slice()).map_err(self.fail(OP))?;
            }
            let len = t.len().map_err(self.fail(OP))?;
            let excess = len.saturating_sub(retain as u64);
            if excess > 0 {
                let first = t.first().map_err(self.fail(OP))?.map(|(k, _)| k.value());
                if let Some(first) = first {
                    let cut = first.saturating_add(excess);
                    t.retain_in(..cut, |_, _| false).map_err(self.fail(OP))?;
                }
            }
        }
        let touched = events
            .iter()
            .map(|e| Touched::put(EVENTS_NAME, e.seq.to_string()))
            .collect();
        self.log_in(&txn, touched, OP)?;
        self.commit(txn, OP)
    }

    fn events(&self, query: &EventQuery) -> Result<EventScan, StoreError> {
        const OP: &str = "reading events";
        let txn = self.begin_read(OP)?;
        let t = txn.open_table(EVENTS).map_err(self.fail(OP))?;
        let last = t.last().map_err(self.fail(OP))?.map(|(k, _)| k.value());
        let range = t
            .range(query.after.saturating_add(1)..)
            .map_err(self.fail(OP))?;
        let decode = |entry: Result<
            (redb::AccessGuard<'_, u64>, redb::AccessGuard<'_, &[u8]>),
            redb::StorageError,
        >| {
            let (key, value) = entry.map_err(self.fail(OP))?;
            let seq = key.value();
            let event: Event =
                self.decode(Table { name: EVENTS_NAME }, &seq.to_string(), value.value())?;
            Ok((seq, event))
        };
        if query.newest {
            scan_events(range.rev().map(decode), query, last.unwrap_or(0))
        } else {
            scan_events(range.map(decode), query, last.unwrap_or(0))
        }
    }

    fn last_event_seq(&self) -> Result<u64, StoreError> {
        const OP: &str = "reading the last event";
        let txn = self.begin_read(OP)?;
        let t = txn.open_table(EVENTS).map_err(self.fail(OP))?;
        let last = t.last().map_err(self.fail(OP))?;
        Ok(last.map(|(k, _)| k.value()).unwrap_or(0))
    }

    fn put_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        self.put(JOBS, &job.name, job, "saving a job")
    }

    fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        Ok(values(self.all(JOBS, "listing jobs")?))
    }

    fn delete_job(&self, name: &str) -> Result<bool, StoreError> {
        self.remove(JOBS, name, "deleting a job")
    }

    fn save_allocations(&self, put: &[AllocRecord], delete: &[String]) -> Result<(), StoreError> {
        const OP: &str = "saving allocations";
        let txn = self.begin_write(OP)?;
        for a in put {
            self.put_in(&txn, ALLOCATIONS, &a.id, a, OP)?;
        }
        {
            let mut t = txn.open_table(ALLOCATIONS.def()).map_err(self.fail(OP))?;
            for id in delete {
                t.remove(id.as_str()).map_err(self.fail(OP))?;
            }
        }
        let mut touched: Vec<Touched> = put
            .iter()
            .map(|a| Touched::put(ALLOCATIONS.name, &a.id))
            .collect();
        touched.extend(
            delete
                .iter()
                .map(|id| Touched::delete(ALLOCATIONS.name, id)),
        );
        self.log_in(&txn, touched, OP)?;
        self.commit(txn, OP)
    }

    fn allocations(&self) -> Result<Vec<AllocRecord>, StoreError> {
        Ok(values(self.all(ALLOCATIONS, "listing allocations")?))
    }

    fn upsert_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        self.put(NODES, &node.name, node, "saving a node")
    }

    fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        self.get(NODES, name, "reading a node")
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        Ok(values(self.all(NODES, "listing nodes")?))
    }

    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.put(TOKENS, &token.id, token, "saving a join token")
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        Ok(values(self.all(TOKENS, "listing join tokens")?))
    }

    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.get(TOKENS, id, "reading a join token")
    }

    fn consume_token(
        &self,
        token: &JoinToken,
        now: SystemTime,
    ) -> Result<TokenRecord, ConsumeError> {
        const OP: &str = "consuming a join token";
        // redb allows one write transaction at a time: concurrent consumers queue here,
        // and each sees the previous one's decrement.
        let txn = self.begin_write(OP)?;
        let record: Option<TokenRecord> = self.get_in(&txn, TOKENS, token.id(), OP)?;
        // On any early return the transaction is dropped, which aborts it.
        let updated = use_token(record, token, now)?;
        self.put_in(&txn, TOKENS, &updated.id, &updated, OP)?;
        self.log_in(&txn, vec![Touched::put(TOKENS.name, &updated.id)], OP)?;
        self.commit(txn, OP)?;
        Ok(updated)
    }

    fn next_link_epoch(&self) -> Result<u64, StoreError> {
        const OP: &str = "raising the link epoch";
        let txn = self.begin_write(OP)?;
        let epoch = self
            .get_in::<u64>(&txn, META, LINK_EPOCH_KEY, OP)?
            .unwrap_or(0)
            + 1;
        self.put_in(&txn, META, LINK_EPOCH_KEY, &epoch, OP)?;
        self.log_in(&txn, vec![Touched::put(META.name, LINK_EPOCH_KEY)], OP)?;
        txn.commit().map_err(self.fail(OP))?;
        Ok(epoch)
    }

    fn revoke(&self, revocation: &Revocation) -> Result<(), StoreError> {
        self.put(
            REVOCATIONS,
            &revocation.name,
            revocation,
            "saving a revocation",
        )
    }

    fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        Ok(values(self.all(REVOCATIONS, "listing revocations")?))
    }

    fn revoke_cert(&self, revocation: &CertRevocation) -> Result<CertRevocation, StoreError> {
        const OP: &str = "saving a certificate revocation";
        let txn = self.begin_write(OP)?;
        let earlier: Option<CertRevocation> =
            self.get_in(&txn, CERT_REVOCATIONS, &revocation.serial, OP)?;
        if let Some(earlier) = earlier {
            return Ok(earlier);
        }
        self.put_in(&txn, CERT_REVOCATIONS, &revocation.serial, revocation, OP)?;
        let touched = vec![Touched::put(CERT_REVOCATIONS.name, &revocation.serial)];
        self.log_in(&txn, touched, OP)?;
        txn.commit().map_err(self.fail(OP))?;
        Ok(revocation.clone())
    }

    fn cert_revocations(&self) -> Result<Vec<CertRevocation>, StoreError> {
        Ok(values(self.all(
            CERT_REVOCATIONS,
            "listing certificate revocations",
        )?))
    }

    fn save_metric_marks(&self, marks: &[(String, MetricMark)]) -> Result<(), StoreError> {
        const OP: &str = "saving metrics marks";
        let txn = self.begin_write(OP)?;
        for (node, mark) in marks {
            self.put_in(&txn, METRIC_MARKS, node, mark, OP)?;
        }
        // Not logged: see the module documentation of `revision`.
        self.commit(txn, OP)
    }

    fn metric_marks(&self) -> Result<HashMap<String, MetricMark>, StoreError> {
        Ok(self
            .all(METRIC_MARKS, "reading metrics marks")?
            .into_iter()
            .collect())
    }
}

/// A table of the store file: string keys, JSON values.
#[derive(Debug, Clone, Copy)]
struct Table {
    name: &'static str,
}

impl Table {
    fn def(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        TableDefinition::new(self.name)
    }
}

const META: Table = Table { name: "meta" };
const NODES: Table = Table { name: "nodes" };
const TOKENS: Table = Table { name: "tokens" };
const REVOCATIONS: Table = Table {
    name: "revocations",
};
const CERT_REVOCATIONS: Table = Table {
    name: "cert_revocations",
};
const METRIC_MARKS: Table = Table {
    name: "metric_marks",
};
const JOBS: Table = Table { name: "jobs" };
const API_TOKENS: Table = Table { name: "api_tokens" };
const POLICIES: Table = Table { name: "policies" };
const NODE_POOLS: Table = Table { name: "node_pools" };
const SECRETS: Table = Table { name: "secrets" };
const IMAGES: Table = Table { name: "images" };
const NODE_TEMPLATES: Table = Table {
    name: "node_templates",
};
const VM_TEMPLATES: Table = Table {
    name: "vm_templates",
};
const ALLOCATIONS: Table = Table {
    name: "allocations",
};
const ALERT_RULES: Table = Table {
    name: "alert_rules",
};
const ALERT_CHANNELS: Table = Table {
    name: "alert_channels",
};
const ALERT_STATES: Table = Table {
    name: "alert_states",
};
const ALERT_SILENCES: Table = Table {
    name: "alert_silences",
};
const ALERT_OUTBOX: Table = Table {
    name: "alert_outbox",
};

/// The alerting records, each kind a table of its own (the alert service owns
/// their shape; the store keeps JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertingKind {
    /// `AlertRule` manifests as applied.
    Rules,
    /// `NotificationChannel` manifests as applied.
    Channels,
    /// The active alerts of each rule (pending and firing, with send times).
    States,
    /// Silences.
    Silences,
    /// Notifications not yet delivered.
    Outbox,
}

impl AlertingKind {
    fn table(self) -> Table {
        match self {
            AlertingKind::Rules => ALERT_RULES,
            AlertingKind::Channels => ALERT_CHANNELS,
            AlertingKind::States => ALERT_STATES,
            AlertingKind::Silences => ALERT_SILENCES,
            AlertingKind::Outbox => ALERT_OUTBOX,
        }
    }
}

/// Every record table (not `meta`, the event log or the change log).
const ALL_TABLES: [Table; 19] = [
    NODES,
    TOKENS,
    REVOCATIONS,
    CERT_REVOCATIONS,
    METRIC_MARKS,
    JOBS,
    ALLOCATIONS,
    API_TOKENS,
    POLICIES,
    NODE_POOLS,
    NODE_TEMPLATES,
    VM_TEMPLATES,
    SECRETS,
    IMAGES,
    ALERT_RULES,
    ALERT_CHANNELS,
    ALERT_STATES,
    ALERT_SILENCES,
    ALERT_OUTBOX,
];
/// The `meta` key [`Store::writable`] writes and removes again.
const PROBE_KEY: &str = "write-probe";
const SCHEMA_VERSION_KEY: &str = "schema_version";
const LINK_EPOCH_KEY: &str = "link_epoch";
/// The `meta` key of the store's revision ([`Store::revision`]).
const REVISION_KEY: &str = "revision";
const CHANGES_NAME: &str = "changes";
/// The change log: revision → JSON list of the records its write touched.
const CHANGES: TableDefinition<'static, u64, &'static [u8]> = TableDefinition::new(CHANGES_NAME);
const EVENTS_NAME: &str = "events";
/// The event log: position → JSON event.
const EVENTS: TableDefinition<'static, u64, &'static [u8]> = TableDefinition::new(EVENTS_NAME);

/// The shared read of both stores: walks `entries` (in the direction the query
/// asks for) and keeps the matching events, within the query's limit and
/// [`EventQuery::MAX_SCAN`]. `last` is the newest stored position.
fn scan_events(
    entries: impl Iterator<Item = Result<(u64, Event), StoreError>>,
    query: &EventQuery,
    last: u64,
) -> Result<EventScan, StoreError> {
    let mut scan = EventScan {
        last_scanned: query.after,
        ..EventScan::default()
    };
    for (scanned, entry) in entries.enumerate() {
        if scan.events.len() >= query.limit || scanned >= EventQuery::MAX_SCAN {
            scan.more = true;
            break;
        }
        let (seq, event) = entry?;
        if !query.newest {
            scan.last_scanned = seq;
        }
        if query.matches(&event) {
            scan.events.push(event);
        }
    }
    if query.newest {
        // Newest first was only the reading order: answer oldest first, and continue
        // after everything stored.
        scan.events.reverse();
        scan.last_scanned = last.max(query.after);
    }
    Ok(scan)
}

/// The shared decision of both stores: the token record after one use, or why not.
fn use_token(
    record: Option<TokenRecord>,
    token: &JoinToken,
    now: SystemTime,
) -> Result<TokenRecord, TokenError> {
    let Some(mut record) = record else {
        return Err(TokenError::Unknown {
            id: token.id().to_owned(),
        });
    };
    tokens::check(&record, token.secret(), now)?;
    // check() refused uses_left == 0, so this does not underflow.
    record.uses_left = record.uses_left.saturating_sub(1);
    Ok(record)
}

fn values<T>(entries: Vec<(String, T)>) -> Vec<T> {
    entries.into_iter().map(|(_, v)| v).collect()
}

/// The directory named in the "in use" message: the store file's parent.
fn data_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => path,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;
    use std::time::{Duration, UNIX_EPOCH};

    use novacron_common::wire::GpuInfo;

    use super::*;

    fn t0() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn node(name: &str) -> NodeRecord {
        NodeRecord {
            name: name.to_owned(),
            labels: BTreeMap::from([("zone".to_owned(), "a".to_owned())]),
            capacity: Capacity {
                cpu_millis: 4000,
                memory_bytes: 8 << 30,
                disk_bytes: 100 << 30,
                dynamic_ports: Default::default(),
                gpus: vec![GpuInfo {
                    index: 0,
                    uuid: "GPU-1".into(),
                    model: "H100".into(),
                    memory_bytes: 80 << 30,
                    vfio_address: None,
                }],
            },
            capabilities: Capabilities {
                docker_version: Some("27.0".into()),
                live_checkpoint: true,
                gpu_driver: None,
                os: "linux".into(),
                arch: "x86_64".into(),
                live_checkpoint_reason: None,
                vm: None,
                oci: None,
            },
            agent_version: "0.1.0".into(),
            enrolled_at_unix_ms: 1,
            last_seen_unix_ms: Some(2),
            cert_serial: Some("ab01".into()),
            cert_expires_unix_ms: Some(3),
            samples_dropped: 4,
            cordoned: false,
            parked: false,
        }
    }

    fn revocation(name: &str) -> Revocation {
        Revocation {
            name: name.to_owned(),
            at_unix_ms: 5,
            by: "admin".into(),
            reason: "stolen laptop".into(),
        }
    }

    fn new_token(store: &impl Store, uses: u32) -> JoinToken {
        let token = JoinToken::generate();
        let record = TokenRecord::new(&token, Duration::from_secs(3600), uses, "t", t0())
            .expect("valid limits");
        store.put_token(&record).expect("put token");
        token
    }

    // The suite: every case runs against both stores (see `store_suite!` below).

    fn node_round_trip(store: &impl Store) {
        assert_eq!(store.node("n1").expect("read"), None);
        assert!(store.nodes().expect("list").is_empty());
        for name in ["n2", "n1", "n10"] {
            store.upsert_node(&node(name)).expect("upsert");
        }
        assert_eq!(store.node("n1").expect("read"), Some(node("n1")));
        let names: Vec<_> = store
            .nodes()
            .expect("list")
            .into_iter()
            .map(|n| n.name)
            .collect();
        assert_eq!(names, ["n1", "n10", "n2"]);
        let mut changed = node("n1");
        changed.last_seen_unix_ms = Some(99);
        store.upsert_node(&changed).expect("upsert");
        assert_eq!(store.node("n1").expect("read"), Some(changed));
        assert_eq!(store.nodes().expect("list").len(), 3);
    }

    fn token_round_trip(store: &impl Store) {
        assert!(store.tokens().expect("list").is_empty());
        let a = new_token(store, 2);
        let b = new_token(store, 1);
        let mut ids: Vec<_> = [a.id(), b.id()].map(str::to_owned).to_vec();
        ids.sort();
        let listed: Vec<_> = store
            .tokens()
            .expect("list")
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(listed, ids);
    }

    fn consume_decrements_then_refuses(store: &impl Store) {
        let token = new_token(store, 2);
        let first = store.consume_token(&token, t0()).expect("first use");
        assert_eq!(first.uses_left, 1);
        let second = store.consume_token(&token, t0()).expect("second use");
        assert_eq!(second.uses_left, 0);
        let err = store.consume_token(&token, t0()).expect_err("used up");
        assert!(
            matches!(err, ConsumeError::Token(TokenError::UsedUp { ref id }) if id == token.id()),
            "{err:?}"
        );
        let saved = store.tokens().expect("list");
        assert_eq!(
            store.token(&saved[0].id).expect("read").as_ref(),
            Some(&saved[0])
        );
        assert_eq!(store.token("000000000000").expect("read"), None);
        assert_eq!(saved.len(), 1);
        assert_eq!(saved[0].uses_left, 0);
    }

    fn consume_refuses_expired(store: &impl Store) {
        let token = new_token(store, 1);
        let later = t0() + Duration::from_secs(3600);
        let err = store.consume_token(&token, later).expect_err("expired");
        assert!(
            matches!(err, ConsumeError::Token(TokenError::Expired { .. })),
            "{err:?}"
        );
        assert_eq!(
            store.tokens().expect("list")[0].uses_left,
            1,
            "not consumed"
        );
    }

    fn consume_refuses_wrong_secret(store: &impl Store) {
        let token = new_token(store, 1);
        let other = JoinToken::generate();
        let forged: JoinToken = format!("{}.{}", token.id(), other.secret())
            .parse()
            .expect("well-formed");
        let err = store
            .consume_token(&forged, t0())
            .expect_err("wrong secret");
        assert!(
            matches!(err, ConsumeError::Token(TokenError::WrongSecret { .. })),
            "{err:?}"
        );
        assert_eq!(
            store.tokens().expect("list")[0].uses_left,
            1,
            "not consumed"
        );
        store
            .consume_token(&token, t0())
            .expect("the right secret still works");
    }

    fn consume_refuses_unknown(store: &impl Store) {
        let token = JoinToken::generate();
        let err = store.consume_token(&token, t0()).expect_err("unknown");
        assert!(
            matches!(err, ConsumeError::Token(TokenError::Unknown { ref id }) if id == token.id()),
            "{err:?}"
        );
        assert!(store.tokens().expect("list").is_empty());
    }

    fn concurrent_consume_of_one_use_succeeds_once(store: &impl Store) {
        const THREADS: usize = 8;
        let token = new_token(store, 1);
        let barrier = Barrier::new(THREADS);
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        store.consume_token(&token, t0())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("consumer thread panicked"))
                .collect()
        });
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok, 1, "{results:?}");
        for r in results.iter().filter(|r| r.is_err()) {
            assert!(
                matches!(r, Err(ConsumeError::Token(TokenError::UsedUp { .. }))),
                "{r:?}"
            );
        }
    }

    fn revocation_round_trip(store: &impl Store) {
        assert!(store.revocations().expect("list").is_empty());
        store.revoke(&revocation("b")).expect("revoke");
        store.revoke(&revocation("a")).expect("revoke");
        let mut again = revocation("b");
        again.reason = "again".into();
        store.revoke(&again).expect("revoke");
        assert_eq!(
            store.revocations().expect("list"),
            vec![revocation("a"), again]
        );
    }

    fn cert_revocation_keeps_the_first_record(store: &impl Store) {
        assert!(store.cert_revocations().expect("list").is_empty());
        let first = CertRevocation {
            serial: "ab01".into(),
            at_unix_ms: 7,
            by: "admin:root".into(),
            reason: "leaked".into(),
        };
        assert_eq!(store.revoke_cert(&first).expect("revoke"), first);
        let again = CertRevocation {
            reason: "again".into(),
            ..first.clone()
        };
        assert_eq!(store.revoke_cert(&again).expect("revoke again"), first);
        let other = CertRevocation {
            serial: "0f".into(),
            ..first.clone()
        };
        store.revoke_cert(&other).expect("revoke other");
        assert_eq!(store.cert_revocations().expect("list"), vec![other, first]);
    }

    fn mark(next_seq: u64) -> MetricMark {
        MetricMark {
            instance: 7,
            next_seq,
        }
    }

    fn alloc_record(id: &str) -> AllocRecord {
        AllocRecord {
            restore: None,
            id: id.into(),
            job: "api".into(),
            version: 1,
            node: "n1".into(),
            desired_run: true,
            state: novacron_common::wire::AllocState::Running,
            healthy: Some(true),
            healthy_since_unix_ms: Some(5),
            created_unix_ms: 1,
            updated_unix_ms: 2,
            restarts: 0,
            exit_code: None,
            message: String::new(),
            failure: None,
            cpu_millis: 500,
            memory_bytes: 64 << 20,
            gpu_uuids: vec![],
            priority: 50,
            disk_bytes: 0,
            ports: vec![],
            published: vec![],
            suspended: false,
            address: None,
        }
    }

    fn jobs_and_allocations_round_trip(store: &impl Store) {
        let job = JobRecord {
            name: "api".into(),
            versions: vec![JobVersion {
                version: 1,
                source: "apiVersion: novacron.io/v1".into(),
                file: "api.yaml".into(),
                spec_hash: "abc".into(),
                submitted_at_unix_ms: 1,
                by: "admin:admin".into(),
                secrets: BTreeMap::from([("db".to_string(), 2)]),
                image_digest: Some("r/api@sha256:00".into()),
                vm: None,
            }],
            current: 1,
            stable: None,
            stopped: false,
            status: "running".into(),
            message: String::new(),
            replicas_override: Some(ReplicaOverride {
                replicas: 4,
                by: "autoscaler (policy p)".into(),
                reason: "api 2 → 4: cpu 91% over 5m, target 75%".into(),
                at_unix_ms: 3,
            }),
            suspended: false,
        };
        store.put_job(&job).expect("put job");
        assert_eq!(store.jobs().expect("jobs"), vec![job.clone()]);
        // A purge deletes it, once.
        let other = JobRecord {
            name: "gone".into(),
            ..job.clone()
        };
        store.put_job(&other).expect("put job");
        assert!(store.delete_job("gone").expect("delete"));
        assert!(!store.delete_job("gone").expect("delete again"));
        assert_eq!(store.jobs().expect("jobs"), vec![job]);
        store
            .save_allocations(&[alloc_record("a1"), alloc_record("a2")], &[])
            .expect("save");
        store
            .save_allocations(&[alloc_record("a3")], &["a1".into()])
            .expect("save and delete");
        let ids: Vec<String> = store
            .allocations()
            .expect("allocs")
            .into_iter()
            .map(|a| a.id)
            .collect();
        assert_eq!(ids, vec!["a2", "a3"]);
    }

    fn policy(name: &str) -> PolicyRecord {
        PolicyRecord {
            name: name.into(),
            source: "apiVersion: novacron.io/v1".into(),
            file: "p.yaml".into(),
            applied_by: "admin:admin".into(),
            applied_at_unix_ms: 1,
            scale: crate::state::policies::ScaleRecord {
                current: 3,
                last_scale_out_unix_ms: Some(5),
                last_scale_in_unix_ms: None,
                recommendations: vec![crate::state::policies::RecommendationRecord {
                    at_unix_ms: 5,
                    size: 3,
                }],
            },
            last_decision: None,
        }
    }

    fn pool_manifest(name: &str) -> PoolManifestRecord {
        PoolManifestRecord {
            name: name.into(),
            file: "pools.yaml".into(),
            source: format!("kind: NodePool\nmetadata: {{name: {name}}}\n"),
            applied_unix_ms: 7,
            by: "admin".into(),
        }
    }

    fn node_pools_and_templates_round_trip(store: &impl Store) {
        assert!(store.node_pools().expect("list").is_empty());
        store.put_node_pool(&pool_manifest("b")).expect("put");
        store.put_node_pool(&pool_manifest("a")).expect("put");
        store.put_node_template(&pool_manifest("t")).expect("put");
        let names = |v: Vec<PoolManifestRecord>| v.into_iter().map(|r| r.name).collect::<Vec<_>>();
        assert_eq!(names(store.node_pools().expect("list")), ["a", "b"]);
        assert_eq!(names(store.node_templates().expect("list")), ["t"]);
        assert!(store.delete_node_pool("a").expect("delete"));
        assert!(!store.delete_node_pool("a").expect("delete again"));
        assert!(store.delete_node_template("t").expect("delete"));
        assert_eq!(names(store.node_pools().expect("list")), ["b"]);
        assert!(store.node_templates().expect("list").is_empty());
        store.put_vm_template(&pool_manifest("small")).expect("put");
        assert_eq!(names(store.vm_templates().expect("list")), ["small"]);
        assert!(
            store.node_templates().expect("list").is_empty(),
            "a table of its own"
        );
        assert!(store.delete_vm_template("small").expect("delete"));
        assert!(!store.delete_vm_template("small").expect("delete again"));
        assert!(store.vm_templates().expect("list").is_empty());
    }

    fn secrets_round_trip(store: &impl Store) {
        assert!(store.secrets().expect("list").is_empty());
        let secret = |name: &str| SecretRecord {
            name: name.into(),
            secret_type: Default::default(),
            versions: vec![SecretVersionRecord {
                version: 1,
                keys: vec!["password".into()],
                bytes: 7,
                created_unix_ms: 1,
                by: "admin".into(),
                key_id: "00".into(),
                nonce: "00".into(),
                sealed: "00".into(),
            }],
        };
        store.put_secret(&secret("b")).expect("put");
        store.put_secret(&secret("a")).expect("put");
        let names: Vec<String> = store
            .secrets()
            .expect("list")
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert!(store.delete_secret("a").expect("delete"));
        assert!(!store.delete_secret("a").expect("delete again"));
        assert_eq!(store.secrets().expect("list"), vec![secret("b")]);
    }

    fn images_round_trip(store: &impl Store) {
        let image = |name: &str, tag: &str| ImageRecord {
            name: name.into(),
            tag: tag.into(),
            digest: "sha256:00".into(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            size: 7,
            layers: 1,
            pushed_unix_ms: 1,
            by: "admin".into(),
        };
        store.put_image(&image("team/api", "2")).expect("put");
        store.put_image(&image("team/api", "1")).expect("put");
        let keys: Vec<String> = store
            .images()
            .expect("list")
            .iter()
            .map(ImageRecord::key)
            .collect();
        assert_eq!(keys, ["team/api:1", "team/api:2"]);
        assert!(store.delete_image("team/api:1").expect("delete"));
        assert!(!store.delete_image("team/api:1").expect("again"));
        assert_eq!(store.images().expect("list"), vec![image("team/api", "2")]);
    }

    fn policies_round_trip(store: &impl Store) {
        assert!(store.policies().expect("list").is_empty());
        store.put_policy(&policy("b")).expect("put");
        store.put_policy(&policy("a")).expect("put");
        let mut changed = policy("b");
        changed.scale.current = 4;
        store.put_policy(&changed).expect("replace");
        assert_eq!(store.policies().expect("list"), vec![policy("a"), changed]);
        assert!(store.delete_policy("a").expect("delete"));
        assert!(!store.delete_policy("a").expect("delete again"));
        assert_eq!(store.policies().expect("list").len(), 1);
    }

    fn metric_marks_round_trip(store: &impl Store) {
        assert!(store.metric_marks().expect("read").is_empty());
        store
            .save_metric_marks(&[("n1".into(), mark(10)), ("n2".into(), mark(20))])
            .expect("save");
        store
            .save_metric_marks(&[("n1".into(), mark(11))])
            .expect("save");
        store.save_metric_marks(&[]).expect("save nothing");
        let marks = store.metric_marks().expect("read");
        assert_eq!(
            marks,
            HashMap::from([("n1".to_owned(), mark(11)), ("n2".to_owned(), mark(20))])
        );
    }

    /// Metrics marks are the controller's bookkeeping, rewritten for every node
    /// every few seconds: they raise no revision and stay out of the change log
    /// (logged, 10,000 nodes wrote 10,000 entries every 2 s into a log that keeps
    /// 10,000 writes, and the store file grew by 1.2 GB in 30 minutes).
    fn metric_marks_stay_out_of_the_change_log(store: &impl Store) {
        store.put_policy(&policy("a")).expect("put");
        let revision = store.revision().expect("revision");
        let marks: Vec<(String, MetricMark)> =
            (0..100).map(|i| (format!("n{i}"), mark(i))).collect();
        for _ in 0..3 {
            store.save_metric_marks(&marks).expect("save");
        }
        assert_eq!(store.revision().expect("revision"), revision);
        assert_eq!(
            changes_of(store.changes(revision, 100).expect("changes")),
            Vec::<(u64, String, bool)>::new()
        );
        assert_eq!(store.metric_marks().expect("read").len(), 100);
    }

    /// Alerting records come back with their keys, per kind, in key order.
    /// (The etcd store once decoded each value as a `(key, value)` pair and
    /// called every stored alert state corrupt: chaos seed
    /// 7503521262084198522 found it.)
    fn alerting_round_trip(store: &impl Store) {
        let state = serde_json::json!({"n1": {"subject": "n1", "state": "firing"}});
        store
            .put_alerting(AlertingKind::States, "rule-b", &state)
            .expect("put");
        store
            .put_alerting(AlertingKind::States, "rule-a", &serde_json::json!({}))
            .expect("put");
        store
            .put_alerting(
                AlertingKind::Silences,
                "s1",
                &serde_json::json!({"id": "s1"}),
            )
            .expect("put");
        let states = store.alerting(AlertingKind::States).expect("list");
        assert_eq!(
            states,
            vec![
                ("rule-a".to_string(), serde_json::json!({})),
                ("rule-b".to_string(), state)
            ]
        );
        assert_eq!(
            store.alerting(AlertingKind::Silences).expect("list").len(),
            1
        );
        assert!(
            store
                .alerting(AlertingKind::Outbox)
                .expect("list")
                .is_empty()
        );
        assert!(
            store
                .delete_alerting(AlertingKind::States, "rule-b")
                .expect("delete")
        );
        assert!(
            !store
                .delete_alerting(AlertingKind::States, "rule-b")
                .expect("delete")
        );
        assert_eq!(store.alerting(AlertingKind::States).expect("list").len(), 1);
    }

    macro_rules! store_suite {
        ($($case:ident),* $(,)?) => {
            mod memory {
                $(
                    #[test]
                    fn $case() {
                        super::$case(&super::MemoryStore::new());
                    }
                )*
            }
            mod redb {
                $(
                    #[test]
                    fn $case() {
                        let dir = tempfile::tempdir().expect("temp dir");
                        let store = super::RedbStore::open(&dir.path().join("state.redb"))
                            .expect("open a new store");
                        super::$case(&store);
                    }
                )*
            }
            mod etcd {
                $(
                    #[test]
                    fn $case() {
                        let (_member, store) = super::etcd_store(stringify!($case));
                        super::$case(&store);
                    }
                )*
            }
        };
    }

    /// An etcd member of its own (killed on drop) and a store on it.
    pub(super) fn etcd_store(
        case: &str,
    ) -> (crate::state::store::etcd::testing::TestEtcd, EtcdStore) {
        let member = crate::state::store::etcd::testing::TestEtcd::start();
        let config = EtcdConfig {
            endpoints: vec![member.endpoint.clone()],
            prefix: format!("/test/{case}/"),
            tls: None,
        };
        let store = EtcdStore::open(config, false).expect("open an etcd store");
        (member, store)
    }

    fn changes_of(page: ChangePage) -> Vec<(u64, String, bool)> {
        match page {
            ChangePage::Changes { changes, .. } => changes
                .into_iter()
                .map(|c| {
                    let t = c.touched;
                    (c.revision, format!("{}/{}", t.table, t.key), t.deleted)
                })
                .collect(),
            ChangePage::Compacted { .. } => panic!("compacted: {page:?}"),
        }
    }

    fn every_write_raises_the_revision_and_is_watched(store: &impl Store) {
        assert_eq!(store.revision().expect("revision"), 0, "a new store");
        store.upsert_node(&node("n1")).expect("upsert");
        store.put_policy(&policy("p")).expect("policy");
        store
            .save_allocations(&[alloc_record("a-1"), alloc_record("a-2")], &[])
            .expect("save");
        store
            .save_allocations(&[], &["a-1".to_string()])
            .expect("delete");
        assert_eq!(store.revision().expect("revision"), 4);
        // Writes that change no record keep the revision.
        assert!(!store.delete_policy("missing").expect("delete"));
        store.writable().expect("writable");
        assert_eq!(store.revision().expect("revision"), 4);
        assert!(store.delete_policy("p").expect("delete"));
        assert_eq!(store.revision().expect("revision"), 5);
        assert_eq!(
            changes_of(store.changes(0, 100).expect("changes")),
            vec![
                (1, "nodes/n1".to_string(), false),
                (2, "policies/p".to_string(), false),
                (3, "allocations/a-1".to_string(), false),
                (3, "allocations/a-2".to_string(), false),
                (4, "allocations/a-1".to_string(), true),
                (5, "policies/p".to_string(), true),
            ]
        );
        assert_eq!(
            changes_of(store.changes(2, 1).expect("changes")),
            vec![
                (3, "allocations/a-1".to_string(), false),
                (3, "allocations/a-2".to_string(), false),
            ],
            "the limit counts writes, and a write comes whole"
        );
        assert_eq!(
            store.changes(5, 100).expect("changes"),
            ChangePage::Changes {
                changes: vec![],
                revision: 5
            }
        );
    }

    store_suite!(
        node_round_trip,
        token_round_trip,
        consume_decrements_then_refuses,
        consume_refuses_expired,
        consume_refuses_wrong_secret,
        consume_refuses_unknown,
        concurrent_consume_of_one_use_succeeds_once,
        revocation_round_trip,
        cert_revocation_keeps_the_first_record,
        metric_marks_round_trip,
        metric_marks_stay_out_of_the_change_log,
        jobs_and_allocations_round_trip,
        policies_round_trip,
        node_pools_and_templates_round_trip,
        secrets_round_trip,
        images_round_trip,
        alerting_round_trip,
        every_write_raises_the_revision_and_is_watched,
    );

    // redb-only cases.

    /// The store file stays the size of its records while every node's mark is
    /// rewritten again and again: redb reuses the pages each commit frees.
    #[test]
    fn rewriting_every_nodes_mark_does_not_grow_the_store_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.redb");
        let store = RedbStore::open(&path).expect("open");
        let size = || std::fs::metadata(&path).expect("stat").len();
        let flush = |round: u64| {
            let marks: Vec<(String, MetricMark)> = (0..2_000)
                .map(|i| (format!("node-{i:05}"), mark(round * 10_000 + i)))
                .collect();
            store.save_metric_marks(&marks).expect("save");
        };
        for round in 0..20 {
            flush(round);
        }
        let settled = size();
        for round in 20..220 {
            flush(round);
        }
        // 200 more flushes of 2,000 marks: logged, they added 200 entries of
        // about 100 KB each (about 20 MB).
        assert!(
            size() <= settled + (2 << 20),
            "the store file grew from {settled} to {} bytes",
            size()
        );
    }

    #[test]
    fn the_revision_and_its_changes_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.redb");
        {
            let store = RedbStore::open(&path).expect("open");
            store.upsert_node(&node("n1")).expect("upsert");
            store.upsert_node(&node("n2")).expect("upsert");
        }
        let store = RedbStore::open(&path).expect("reopen");
        assert_eq!(store.revision().expect("revision"), 2);
        store.put_policy(&policy("p")).expect("policy");
        assert_eq!(store.revision().expect("revision"), 3, "never goes back");
        assert_eq!(
            changes_of(store.changes(1, 100).expect("changes")),
            vec![
                (2, "nodes/n2".to_string(), false),
                (3, "policies/p".to_string(), false),
            ]
        );
    }

    #[test]
    fn a_watcher_behind_the_redb_change_log_is_told_to_list_again() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = RedbStore::open(&dir.path().join("state.redb")).expect("open");
        let mut store = store;
        // A short log, so that the test stays fast (one write transaction each).
        store.change_log_revisions = 10;
        for i in 0..12 {
            store.put_policy(&policy(&format!("p{i}"))).expect("put");
        }
        let revision = 12;
        assert_eq!(
            store.changes(1, 10).expect("changes"),
            ChangePage::Compacted {
                oldest: 3,
                revision
            }
        );
        assert_eq!(
            changes_of(store.changes(2, 1).expect("changes")),
            vec![(3, "policies/p2".to_string(), false)]
        );
    }

    #[test]
    fn a_failed_write_keeps_the_revision() {
        let store = MemoryStore::new();
        store.upsert_node(&node("n1")).expect("upsert");
        store.set_full(true);
        store.upsert_node(&node("n2")).expect_err("full");
        assert_eq!(store.revision().expect("revision"), 1);
    }

    #[test]
    fn a_full_memory_store_refuses_writes_and_changes_nothing() {
        let store = MemoryStore::new();
        store.upsert_node(&node("n1")).expect("upsert");
        store.set_full(true);
        let err = store.upsert_node(&node("n2")).expect_err("full");
        assert!(err.is_disk_full(), "{err}");
        assert!(store.writable().is_err());
        assert_eq!(store.nodes().expect("nodes"), vec![node("n1")]);
        store.set_full(false);
        store.writable().expect("space again");
        store.upsert_node(&node("n2")).expect("upsert");
    }

    #[test]
    fn the_link_epoch_rises_and_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.redb");
        {
            let store = RedbStore::open(&path).expect("open");
            assert_eq!(store.next_link_epoch().expect("epoch"), 1);
            assert_eq!(store.next_link_epoch().expect("epoch"), 2);
        }
        let store = RedbStore::open(&path).expect("reopen");
        assert_eq!(store.next_link_epoch().expect("epoch"), 3);
        let memory = MemoryStore::new();
        assert_eq!(memory.next_link_epoch().expect("epoch"), 1);
        assert_eq!(memory.next_link_epoch().expect("epoch"), 2);
    }

    #[test]
    fn reopening_keeps_everything() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.redb");
        let token;
        {
            let store = RedbStore::open(&path).expect("open");
            store.upsert_node(&node("n1")).expect("upsert");
            token = new_token(&store, 2);
            store.consume_token(&token, t0()).expect("consume");
            store.revoke(&revocation("n2")).expect("revoke");
            store
                .save_metric_marks(&[("n1".into(), mark(42))])
                .expect("save marks");
        }
        let store = RedbStore::open(&path).expect("reopen");
        assert_eq!(store.nodes().expect("nodes"), vec![node("n1")]);
        let tokens = store.tokens().expect("tokens");
        assert_eq!(tokens.len(), 1);
        assert_eq!(tokens[0].id, token.id());
        assert_eq!(tokens[0].uses_left, 1);
        assert_eq!(
            store.revocations().expect("revocations"),
            vec![revocation("n2")]
        );
        assert_eq!(
            store.metric_marks().expect("marks"),
            HashMap::from([("n1".to_owned(), mark(42))])
        );
        store
            .consume_token(&token, t0())
            .expect("last use after reopen");
    }

    #[test]
    fn second_open_says_the_data_directory_is_in_use() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.redb");
        let first = RedbStore::open(&path).expect("first open");
        let err = RedbStore::open(&path).expect_err("second open must fail");
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
        let msg = err.to_string();
        let expected = format!(
            "the data directory {} is in use by another novacron-controller process",
            dir.path().display()
        );
        assert!(msg.contains(&expected), "{msg}");
        drop(first);
        RedbStore::open(&path).expect("opens once the first is closed");
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.redb");
        {
            let store = RedbStore::open(&path).expect("open");
            store.upsert_node(&node("n1")).expect("upsert");
            let txn = store.begin_write("test").expect("write");
            store
                .put_in(
                    &txn,
                    META,
                    SCHEMA_VERSION_KEY,
                    &(SCHEMA_VERSION + 1),
                    "test",
                )
                .expect("put");
            txn.commit().expect("commit");
        }
        let err = RedbStore::open(&path).expect_err("newer schema");
        assert!(
            matches!(err, StoreError::NewerSchema { found, supported, .. }
                if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("newer than this novacron-controller supports"),
            "{msg}"
        );
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }

    #[test]
    fn corrupt_value_names_table_and_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.redb");
        let store = RedbStore::open(&path).expect("open");
        store.upsert_node(&node("good")).expect("upsert");
        let txn = store.begin_write("test").expect("write");
        {
            let mut t = txn.open_table(NODES.def()).expect("table");
            t.insert("bad", b"{not json".as_slice()).expect("insert");
        }
        txn.commit().expect("commit");

        for err in [
            store.node("bad").expect_err("corrupt node"),
            store.nodes().expect_err("corrupt node in list"),
        ] {
            assert!(
                matches!(err, StoreError::Corrupt { table: "nodes", ref key, .. } if key == "bad"),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains("\"nodes\"") && msg.contains("\"bad\""),
                "{msg}"
            );
        }
        assert_eq!(store.node("good").expect("read"), Some(node("good")));
    }

    #[test]
    fn a_file_that_is_not_a_store_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.redb");
        std::fs::write(&path, vec![7u8; 8192]).expect("write garbage");
        let err = RedbStore::open(&path).expect_err("garbage file");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn missing_directory_is_an_error_naming_the_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("nope").join("state.redb");
        let err = RedbStore::open(&path).expect_err("no directory");
        assert!(
            matches!(
                err,
                StoreError::Database {
                    op: "opening the database",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    /// The API's view of an allocation has the record's JSON, field for field,
    /// both with every optional field set and with none.
    #[test]
    fn alloc_view_json_is_the_records() {
        let full = AllocRecord {
            id: "a1".into(),
            job: "api".into(),
            version: 3,
            node: "n1".into(),
            desired_run: true,
            state: novacron_common::wire::AllocState::Failed,
            healthy: Some(false),
            healthy_since_unix_ms: Some(5),
            created_unix_ms: 1,
            updated_unix_ms: 2,
            restarts: 4,
            exit_code: Some(137),
            message: "killed".into(),
            failure: Some(novacron_common::wire::FailureReason::Unhealthy),
            cpu_millis: 500,
            memory_bytes: 1 << 20,
            gpu_uuids: vec!["GPU-1".into()],
            priority: 50,
            disk_bytes: 1 << 30,
            ports: vec![AllocPort {
                name: "http".into(),
                container_port: 80,
                host_port: 30080,
                protocol: "tcp".into(),
            }],
            restore: Some(novacron_common::wire::RestoreFrom {
                digest: "ab".repeat(32),
                size: 42,
                mode: novacron_common::checkpoint::CheckpointMode::Fs,
                incoming_vm: None,
            }),
            published: vec![
                PublishedAddress {
                    host_ip: "127.0.0.1".parse().expect("an address"),
                    host_port: 30080,
                    container_port: 80,
                    protocol: "tcp".into(),
                },
                PublishedAddress {
                    host_ip: "::".parse().expect("an address"),
                    host_port: 30080,
                    container_port: 80,
                    protocol: "tcp".into(),
                },
            ],
            suspended: true,
            address: None,
        };
        let bare = AllocRecord {
            healthy: None,
            healthy_since_unix_ms: None,
            exit_code: None,
            failure: None,
            gpu_uuids: vec![],
            ports: vec![],
            restore: None,
            published: vec![],
            suspended: false,
            ..full.clone()
        };
        for record in [full, bare] {
            let want = serde_json::to_string(&record).expect("record JSON");
            let got = serde_json::to_string(&AllocView::from(record)).expect("view JSON");
            assert_eq!(got, want);
        }
    }
}

//! Migration and drain bodies: `GET /v1/migrations[/{id}]`, the answer of
//! `POST /v1/allocations/{id}/migrate`, and `POST /v1/nodes/{name}/drain`.

use novacron_common::checkpoint::CheckpointMode;
use serde::{Deserialize, Serialize};

/// Where a migration stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Taking the checkpoint on the source.
    Checkpointing,
    /// Moving the bundle to the controller's store.
    Transferring,
    /// The target fetches and restores it.
    Restoring,
    /// The allocation runs on the target.
    Completed,
    /// Failed; the allocation goes on on the source.
    RolledBack,
}

/// How a live migration between two runc nodes moves the container's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum CopyMode {
    /// Freeze, dump everything except the memory pages, restore on the target
    /// at once; the target fetches the pages from the source on demand and in
    /// the background (CRIU's lazy pages). The pause no longer grows with the
    /// memory, but a source lost before the last page arrived loses the
    /// workload (its last checkpoint remains).
    PostCopy,
    /// Freeze, dump everything, send it, restore: a longer pause, and the
    /// source keeps the whole state until the target runs.
    StopCopy,
}

impl CopyMode {
    /// The word the API and the CLI use.
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMode::PostCopy => "post-copy",
            CopyMode::StopCopy => "stop-copy",
        }
    }
}

impl std::fmt::Display for CopyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CopyMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "post-copy" => Ok(CopyMode::PostCopy),
            "stop-copy" => Ok(CopyMode::StopCopy),
            other => Err(format!(
                "unknown copy mode {other:?}; expected post-copy or stop-copy"
            )),
        }
    }
}

/// One migration, as `GET /v1/migrations/{id}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MigrationStatus {
    /// Id (`m-<n>`).
    pub id: String,
    /// The allocation.
    pub alloc: String,
    /// Its job.
    pub job: String,
    /// Source node.
    pub from: String,
    /// Target node.
    pub to: String,
    /// Mode asked for (`auto` resolves on the source).
    pub mode: CheckpointMode,
    /// Where it stands.
    pub phase: Phase,
    /// Bundle bytes moved so far.
    pub bytes_done: u64,
    /// Bundle size (0 until the checkpoint is taken).
    pub bytes_total: u64,
    /// The bundle, once taken.
    pub digest: Option<String>,
    /// Started (Unix ms).
    pub started_unix_ms: u64,
    /// Finished (Unix ms).
    pub finished_unix_ms: Option<u64>,
    /// From the checkpoint request to the allocation reported running on the
    /// target, ms (the workload's downtime as the controller sees it).
    pub downtime_ms: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
    /// A virtual machine's live migration (QEMU's pre-copy): how it goes, as
    /// QEMU reports it (memory sent, rounds, dirty rate, and at the end the
    /// guest's own pause). For a VM the phases mean: `checkpointing`, the
    /// source is held and the target starts a QEMU that waits for the state;
    /// `transferring`, memory is copied while the guest runs; `restoring`, the
    /// target loaded it and must pass its check.
    #[serde(default)]
    pub vm: Option<novacron_common::wire::VmMigrationProgress>,
    /// How a runc container's live migration moves its memory (chosen when it
    /// starts); absent for other migrations.
    #[serde(default)]
    pub copy: Option<CopyMode>,
}

/// The answer of `POST /v1/nodes/{name}/drain`.
#[derive(Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DrainPlan {
    /// The node, now cordoned.
    pub node: String,
    /// Its running allocations, to migrate one after another
    /// (`POST /v1/allocations/{id}/migrate`).
    pub allocations: Vec<String>,
}

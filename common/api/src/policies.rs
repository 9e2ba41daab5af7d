//! Autoscaling policy bodies: `GET /v1/policies` and `POST /v1/policies`.

use serde::{Deserialize, Serialize};

// The API's view of the controller's decision record (which converts to it with
// `From`); the JSON and the OpenAPI schema are the record's.
/// A decision as kept and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = DecisionRecord))]
pub struct DecisionView {
    /// When (Unix ms).
    pub at_unix_ms: u64,
    /// The size before.
    pub from: u32,
    /// The size decided (equal to `from` when holding).
    pub to: u32,
    /// Why, in one line: `api 4 → 6: cpu 91% over 5m, target 75%`.
    pub explanation: String,
}

/// A policy as `GET /v1/policies` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PolicyView {
    /// Name.
    pub name: String,
    /// `job` or `pool`.
    pub target_kind: String,
    /// The job's or pool's name.
    pub target: String,
    /// Fewest replicas or nodes.
    pub min_size: u32,
    /// Most replicas or nodes.
    pub max_size: u32,
    /// What it measures: `cpu 75% over 5m`, `pending 10 per replica over 1m`.
    pub metrics: Vec<String>,
    /// The target's size now (a job's replicas wanted); `None` when the target
    /// does not exist.
    pub current: Option<u32>,
    /// The latest decision and its explanation.
    pub last_decision: Option<DecisionView>,
    /// The file it was applied from.
    pub file: String,
    /// Who applied it.
    pub applied_by: String,
    /// When (Unix ms).
    pub applied_at_unix_ms: u64,
}

/// What `POST /v1/policies` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PolicyApplyResult {
    /// The policy.
    pub policy: String,
    /// What it scales: `job api`, `pool gpu`.
    pub target: String,
    /// `created`, `updated` or `unchanged`.
    pub outcome: String,
}

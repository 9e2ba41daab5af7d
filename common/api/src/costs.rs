//! Cost bodies: `GET /v1/costs` and `GET /v1/recommendations`.

use novacron_common::cost::{self, Rightsize};
use serde::{Deserialize, Serialize};

/// `GET /v1/costs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CostReport {
    /// The currency of every amount here (the pricing catalog's `currency`, an
    /// ISO 4217 code such as `USD`).
    #[serde(default)]
    pub currency: String,
    /// The whole fleet, per hour.
    pub total_hourly: f64,
    /// Per node.
    pub nodes: Vec<NodeCost>,
    /// Per job: the share of each node its allocations hold.
    pub jobs: Vec<GroupCost>,
    /// Per pool (the `pool` label; `-` when none).
    pub pools: Vec<GroupCost>,
    /// Per capacity type (`spot`, `on-demand`, `-`).
    pub capacity: Vec<GroupCost>,
    /// Every budget of the catalog's `[budgets]` against the cost now; those
    /// `exceeded` are the alerts.
    #[serde(default)]
    pub budgets: Vec<cost::BudgetStatus>,
    /// Per workload class of the catalog's `[mix]` (the job label `class`): the
    /// share of its running replicas on spot nodes against the target.
    #[serde(default)]
    pub mix: Vec<cost::MixStatus>,
}

/// One node's cost.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeCost {
    /// Node.
    pub node: String,
    /// Its pool label.
    pub pool: String,
    /// Its capacity label.
    pub capacity: String,
    /// Per hour.
    pub hourly: f64,
    /// Why this price.
    pub source: String,
    /// The share of it that allocations hold (0 to 1): the rest is idle capacity.
    pub allocated: f64,
}

/// The cost of a group (a job, a pool, a capacity type).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupCost {
    /// The group.
    pub name: String,
    /// Per hour.
    pub hourly: f64,
    /// Nodes (pools, capacity types) or allocations (jobs) counted.
    pub count: u32,
}

/// `GET /v1/recommendations`: one entry per job with enough samples.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobRecommendation {
    /// The job.
    pub job: String,
    /// Running replicas observed.
    pub replicas: u32,
    /// The recommendation.
    pub rightsize: Rightsize,
    /// Hourly cost of the job now and with the recommended requests.
    pub hourly_now: f64,
    /// With the recommendation applied (same nodes, smaller shares).
    pub hourly_recommended: f64,
    /// The currency of both (the pricing catalog's `currency`).
    #[serde(default)]
    pub currency: String,
}

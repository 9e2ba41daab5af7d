//! Node pool bodies: `GET /v1/pools`.

use serde::{Deserialize, Serialize};

/// One pool as `GET /v1/pools` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PoolStatus {
    /// The pool.
    pub name: String,
    /// Its template's provider.
    pub provider: String,
    /// Its template's instance type.
    pub instance_type: String,
    /// `spot` or `on-demand`.
    pub capacity_type: String,
    /// Price of one node for one hour.
    pub price_per_hour: f64,
    /// Fewest nodes.
    pub min_size: u32,
    /// Most nodes.
    pub max_size: u32,
    /// Members not draining.
    pub size: u32,
    /// Members × price per hour.
    pub hourly_cost: f64,
    /// The currency of both prices (the pricing catalog's `currency`).
    #[serde(default)]
    pub currency: String,
    /// The members.
    pub nodes: Vec<PoolNodeStatus>,
    /// Why the pool cannot be observed or managed, if it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// One member of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PoolNodeStatus {
    /// The node name.
    pub name: String,
    /// `ready`, `provisioning` (made, not ready), `draining` or the registry's status.
    pub status: String,
    /// Allocations not yet terminal on it.
    pub allocations: u32,
}

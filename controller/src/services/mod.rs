//! The controller's logic: workloads, migrations, autoscaling, pools, events,
//! costs, budgets, certificates. No axum types; services call [`crate::state`] and
//! each other without cycles.

pub mod autoscaler;
pub mod budgets;
pub mod certs;
pub mod costs;
pub mod events;
pub mod heavy;
pub mod metrics;
pub mod migrate;
pub mod pools;
pub mod providers;
pub mod workloads;

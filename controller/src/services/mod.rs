//! The controller's logic: workloads, migrations, autoscaling, pools, events,
//! costs, budgets, certificates. No axum types; services call [`crate::state`] and
//! each other without cycles.

pub mod agents;
pub mod alert_eval;
pub mod alerts;
pub mod autoscaler;
pub mod budgets;
pub mod catalog;
pub mod certs;
pub mod context;
pub mod costs;
pub mod events;
pub mod group;
pub mod heavy;
pub mod history;
pub mod history_copy;
pub mod idle;
pub mod images;
pub mod index;
pub mod ingress;
pub mod leadership;
pub mod metrics;
pub mod migrate;
pub mod pass_stats;
pub mod pools;
pub mod providers;
pub mod remote_write;
pub mod secrets;
pub mod vms;
pub mod workloads;

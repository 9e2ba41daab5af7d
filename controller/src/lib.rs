//! The NovaCron controller. (The operator CLI `novacron` is the `novacron-cli`
//! crate, a client of the HTTPS API.)
//!
//! The binary (`novacron-controller`) only parses and dispatches; the
//! modules here hold the logic: [`server`] wires [`store`], [`registry`], [`link`]
//! (the agent endpoint) and [`api`] (HTTPS, served through [`https`]).

pub mod api;
pub mod api_tokens;
pub mod autoscaler;
pub mod budgets;
pub mod bundles;
pub mod cert_api;
pub mod certs;
pub mod config_file;
pub mod costs;
pub mod ctl;
pub mod events;
pub mod exec;
pub mod heavy;
pub mod https;
pub mod link;
pub mod metrics;
pub mod migrate;
pub mod migrate_api;
pub mod pki_files;
pub mod policies;
pub mod pool_api;
pub mod pools;
pub mod providers;
pub mod registry;
pub mod server;
pub mod store;
pub mod tokens;
pub mod workloads;

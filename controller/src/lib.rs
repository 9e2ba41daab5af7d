//! The NovaCron controller and the operator CLI.
//!
//! The binaries (`novacron-controller`, `novacron`) only parse and dispatch; the
//! modules here hold the logic: [`server`] wires [`store`], [`registry`], [`link`]
//! (the agent endpoint) and [`api`] (HTTPS, served through [`https`]).

pub mod api;
pub mod cli;
pub mod ctl;
pub mod https;
pub mod link;
pub mod pki_files;
pub mod registry;
pub mod server;
pub mod store;
pub mod tokens;
pub mod workloads;

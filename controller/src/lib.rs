//! The NovaCron controller and the operator CLI.
//!
//! The binaries (`novacron-controller`, `novacron`) only parse and dispatch. The
//! server is in layers that only point down: [`http`] (the router, handlers and TLS
//! listener) calls [`services`] (workloads, migrations, autoscaler, pools, events,
//! costs, certificates, leadership), which call [`state`] (the record store, the
//! blob store, the registry). [`link`], the agents' QUIC endpoint, is an adapter
//! beside [`http`]. [`server`] wires them together and [`ctl`] is the binary's
//! entry.

pub mod cli;
pub mod config_file;
pub mod ctl;
pub mod http;
pub mod link;
pub mod pki_files;
pub mod server;
pub mod services;
pub mod state;

// The modules' former paths, for the operator CLI (until it moves to its own
// crate) and other callers that still name them.
#[doc(hidden)]
pub use http::{
    api, certs as cert_api, exec, https, migrations as migrate_api, policies, pools as pool_api,
};
#[doc(hidden)]
pub use services::{
    autoscaler, budgets, certs, costs, events, heavy, metrics, migrate, pools, providers, workloads,
};
#[doc(hidden)]
pub use state::{api_tokens, bundles, registry, store, tokens};

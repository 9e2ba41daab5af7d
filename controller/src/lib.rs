//! The NovaCron controller. (The operator CLI `novacron` is the `novacron-cli`
//! crate, a client of the HTTPS API.)
//!
//! The binary (`novacron-controller`) only parses and dispatches.
//! The server is in layers that only point down: [`http`] (the router, handlers and TLS
//! listener) calls [`services`] (workloads, migrations, autoscaler, pools, events,
//! costs, certificates, leadership), which call [`state`] (the record store, the
//! blob store, the registry). [`link`], the agents' QUIC endpoint, is an adapter
//! beside [`http`]. [`server`] wires them together and [`ctl`] is the binary's
//! entry.

pub mod config_file;
pub mod ctl;
pub mod ha;
pub mod http;
pub mod link;
pub mod pki_files;
pub mod server;
pub mod services;
pub mod state;

// The modules' former paths, for the integration tests that still name them.
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

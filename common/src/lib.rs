//! NovaCron's shared edge helpers: TLS and PKI, files, checkpoint transfer, config,
//! signals, logging, lock helpers, tickers and retries, and the Prometheus
//! exposition the controller and the agent share. The HTTP API bodies are the
//! `novacron-api` crate.
//!
//! The pure decision core lives in `novacron-core` and the wire protocol in
//! `novacron-wire`; both are re-exported here at their old paths
//! (`novacron_common::scheduler`, `novacron_common::wire`, ...) so that callers need
//! one dependency. [`wire`] adds the async frame reader and writer to the protocol.

pub mod config;
pub mod exposition;
pub mod files;
pub mod logging;
pub mod pki;
pub mod retry;
pub mod signal;
pub mod sync;
pub mod ticker;
pub mod tls;
pub mod transfer;
pub mod wire;

pub use novacron_core::{
    alert, autoscale, backoff, clock, consolidate, cost, cron, fleet, manifest, names, pools,
    reconcile, scheduler, sim, units,
};
pub use novacron_wire::checkpoint;

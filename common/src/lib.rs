//! NovaCron's shared core: the wire protocol, identity and PKI helpers, API bodies,
//! and the pure decision functions. Nothing here opens a socket, talks to Docker or
//! reads the clock on its own: time is always a parameter.

pub mod autoscale;
pub mod backoff;
pub mod checkpoint;
pub mod clock;
pub mod config;
pub mod consolidate;
pub mod cost;
pub mod files;
pub mod fleet;
pub mod logging;
pub mod manifest;
pub mod pki;
pub mod pools;
pub mod reconcile;
pub mod retry;
pub mod scheduler;
pub mod signal;
pub mod sim;
pub mod sync;
pub mod ticker;
pub mod tls;
pub mod transfer;
pub mod wire;

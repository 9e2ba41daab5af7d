//! The NovaCron agent: host metrics, the link to the controller, enrollment.
//!
//! `main` only parses and dispatches to [`cli`]. [`collect`] reads the host,
//! [`buffer`] keeps the bounded window of samples, [`enroll`] joins the fleet and
//! owns the state directory, and [`link`] holds the one QUIC connection.

pub mod buffer;
pub mod checkpoint;
pub mod cli;
pub mod collect;
pub mod config;
pub mod dns;
pub mod enroll;
pub mod exec;
pub mod ingress;
pub mod link;
pub mod listen;
pub mod metrics;
pub mod migrate;
pub mod registry;
pub mod runtime;
pub mod spot;

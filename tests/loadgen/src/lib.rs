//! `novacron-loadgen`: an open-loop HTTP/1.1 load generator and the trivial
//! backend it is pointed at, for measuring proxies in front of NovaCron's
//! services. It stands alone: it depends on no other workspace crate.
//!
//! - [`schedule`]: the pure open-loop schedule (request `i` at `start + i/R`).
//! - [`stats`]: counts, latency histograms and the report.
//! - [`engine`]: the open- and closed-loop engines, generic over the transport.
//! - [`http`]: the hyper HTTP/1.1 transport and the backend server.
//! - [`cli`]: the command line.

pub mod cli;
pub mod engine;
pub mod http;
pub mod schedule;
pub mod stats;

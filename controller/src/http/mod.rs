//! The HTTPS API: the router, authentication, the TLS listener and one module per
//! resource with its handlers. It calls [`crate::services`] and [`crate::state`];
//! nothing below it imports it.

pub mod api;
pub mod certs;
pub mod exec;
pub mod https;
pub mod migrations;
pub mod policies;
pub mod pools;

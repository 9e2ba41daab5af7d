//! What the controller keeps: the store trait and its backends, the fleet
//! registry, the records and tokens they hold, and checkpoint bundles on disk.
//! Nothing here imports a service or a handler.

pub mod api_tokens;
pub mod blobs;
pub mod bundles;
pub mod election;
pub mod events;
pub mod policies;
pub mod registry;
pub mod revision;
pub mod store;
pub mod tokens;

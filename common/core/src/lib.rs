//! NovaCron's pure decision core (`novacron-core`): manifests and their validation,
//! the scheduler, reconcile, autoscale, cost, consolidation, node pools, the
//! simulator, fleet liveness, backoff, the clock conversions and the formats of
//! sizes and durations for people (`units`).
//!
//! **Architecture Invariant:** everything here is a pure function of its inputs. No
//! tokio, no `std::fs`/`std::net`/`std::process`/`std::thread`, and no reading the
//! clock: time is always a parameter (`now`). The I/O lives at the edges (the agent,
//! the controller and `novacron-common`); the tidy test enforces this.
//!
//! **Dependency direction:** this crate depends on `novacron-wire`, never the other
//! way round. The types both need (`Capacity`, `TaskSpec`, `AllocState`, ...) cross
//! the agent link, so they derive bincode's traits where they are declared (the orphan
//! rule allows it nowhere else), and bincode stays in the wire crate alone; the wire
//! crate needs nothing from here. The core uses those types as plain data and never
//! encodes a frame.

pub mod alert;
pub mod autoscale;
pub mod backoff;
pub mod clock;
pub mod consolidate;
pub mod cost;
pub mod cron;
pub mod fleet;
pub mod manifest;
pub mod names;
pub mod pools;
pub mod reconcile;
pub mod scheduler;
pub mod sim;
pub mod units;

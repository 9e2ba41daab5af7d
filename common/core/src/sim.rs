//! The fleet simulator: replays a [`Scenario`] (node pools, service load curves,
//! batch arrivals, node failures, spot interruptions, zone outages) through the
//! real [`reconcile`](crate::reconcile::reconcile), the real
//! [`scheduler`](crate::scheduler) and the real
//! [`decide`](crate::autoscale::decide) on a virtual clock, and reports cost,
//! availability, reaction time and placements against a static fleet sized for
//! the peak, simulated under the same faults.
//!
//! Pure and deterministic: no clock, no I/O; every random choice (load noise,
//! which nodes fail) comes from a ChaCha8 generator seeded with the scenario's
//! seed, and every collection that drives a decision is ordered. The same scenario
//! and seed give the same [`Report`], byte for byte.
//!
//! # The model
//!
//! Each step (`spec.step`, say 30 s) at virtual time `now`:
//!
//! 1. **Faults and arrivals** due by `now` happen: failed, interrupted or zoned-out
//!    nodes leave the fleet (a spot interruption first drains its nodes for the
//!    notice: they take no new work, then terminate); batch jobs arrive;
//!    provisioned nodes become ready; started replicas begin serving after their
//!    `startDelay`; batch replicas that ran `runFor` complete.
//! 2. **Reconcile** (the real one) decides what is lost, what to stop and what to
//!    place; the shell applies it and asks the **scheduler** (the real one, on a
//!    snapshot kept up to date incrementally) for every placement. What fits nowhere
//!    stays pending.
//! 3. **Replace** nodes that left toward each pool's desired size (see 6).
//! 4. **Measure** over the step: each service's demand (its load curve, with seeded
//!    noise) against its serving capacity (running replicas × `capacityPerReplica`);
//!    served is the smaller. Availability is served over demanded, summed over
//!    services and time. Cost is every node's price for the time it exists
//!    (provisioning and draining included).
//! 5. **Autoscale** (autoscaled run only): each policy sees its metric windows
//!    (a job: CPU utilization = demand / capacity, the `requests` metric = demand,
//!    pending replicas; a pool: requested CPU, memory and GPUs over allocatable on
//!    its ready nodes, and pending replicas of its jobs) and decides.
//! 6. **Provision**: each pool launches nodes toward its desired size (ready after
//!    `provisionDelay`, in the zone with the fewest nodes that is not out) or
//!    removes the emptiest ones (their replicas are lost and placed again).
//!
//! The static baseline runs the same steps with autoscaling off: each service at the
//! replicas its peak demand needs, each pool at the nodes that hold them (found by
//! the real scheduler) plus the largest set of batch jobs that overlap; failed nodes
//! are replaced as in the autoscaled run.
//!
//! **Reaction time** is how long a service stays under-provisioned (demand above
//! capacity) from the step it starts to the step capacity catches up.

mod engine;
mod scenario;

pub use engine::{BatchStats, PoolStats, Reaction, Report, RunReport, simulate, simulate_run};
pub use scenario::{
    BatchSpec, Faults, KIND, LoadCurve, LoadPoint, MAX_DELAY, MAX_DURATION, MAX_REPLICAS,
    MAX_STEPS, NodeFailure, PolicyEntry, PoolSpec, REQUESTS_METRIC, Scenario, ScenarioManifest,
    ScenarioSpec, ServiceSpec, SpotInterruption, ZoneOutage, demand_at, parse_scenario,
};

/// Which fleet a run simulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The scenario's policies drive job replicas and pool sizes.
    Autoscaled,
    /// No policies: services at their peak replicas, pools sized for the peak.
    StaticPeak,
}

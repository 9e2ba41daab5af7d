//! The simulation loop and its report.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Mode;
use super::scenario::{PoolSpec, REQUESTS_METRIC, Scenario, demand_at};
use crate::autoscale::pool::{CapacityType, warm_price_per_hour, warm_start_delay};
use crate::autoscale::{self, AutoScalingPolicy, Observations, Sample, ScaleState, Target};
use crate::fleet::NodeStatus;
use crate::manifest::{Constraint, JobType, Operator, Placement, Resources, Spread, Update};
use crate::reconcile::{self, AllocView, FailureCounts, JobChange, JobView, NodeView};
use crate::scheduler::{NodeInfo, Placed, Request, Scheduler, Snapshot};
use novacron_wire::{AllocState, Capacity, GpuInfo};

/// Both runs of a scenario.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Report {
    /// The scenario's name.
    pub scenario: String,
    /// The seed used.
    pub seed: u64,
    /// Simulated time.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// One step.
    #[serde(with = "humantime_serde")]
    pub step: Duration,
    /// With the scenario's policies.
    pub autoscaled: RunReport,
    /// Without them, sized for the peak.
    pub static_peak: RunReport,
}

impl Report {
    /// How much cheaper the autoscaled fleet is, as a fraction of the static cost
    /// (0.4 is 40% cheaper); 0 when the static fleet costs nothing.
    pub fn cost_saving(&self) -> f64 {
        if self.static_peak.cost > 0.0 {
            1.0 - self.autoscaled.cost / self.static_peak.cost
        } else {
            0.0
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct RunReport {
    /// Node cost over the run.
    pub cost: f64,
    /// Node-hours over the run.
    pub node_hours: f64,
    /// Served demand over demand, across services (1 without services).
    pub availability: f64,
    /// Requests demanded over the run.
    pub demand: f64,
    /// Requests served over the run.
    pub served: f64,
    /// Replicas placed by the scheduler.
    pub placements: u64,
    /// Replicas evicted for higher-priority work.
    pub preemptions: u64,
    /// Replicas lost with their node.
    pub lost: u64,
    /// Replicas stopped (scale-in, surplus).
    pub stopped: u64,
    /// Replicas still pending at the end.
    pub pending_at_end: u32,
    /// Under-provisioned episodes of services.
    pub reaction: Reaction,
    /// Per service.
    pub jobs: Vec<JobStats>,
    /// Cost by kind of capacity.
    pub cost_by: CostBreakdown,
    /// Warm nodes taken by scale-outs.
    pub warm_starts: u64,
    /// Replicas replaced elsewhere at a spot notice, serving on until their node
    /// goes.
    pub replaced_at_notice: u64,
    /// Batch jobs.
    pub batches: BatchStats,
    /// Per pool.
    pub pools: Vec<PoolStats>,
    /// Size changes decided by the autoscaler.
    pub scale_events: u64,
    /// `HH:MM:SS explanation` of every size change and fault, in order.
    pub events: Vec<String>,
    /// Broken invariants (none, unless there is a bug).
    pub violations: Vec<String>,
}

/// Under-provisioned episodes: from the step demand exceeds capacity to the step
/// capacity catches up.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct Reaction {
    /// How many.
    pub episodes: u32,
    /// Mean length, seconds.
    pub mean_s: f64,
    /// Median length, seconds.
    pub p50_s: f64,
    /// 99th percentile (nearest rank), seconds.
    pub p99_s: f64,
    /// Longest, seconds.
    pub max_s: f64,
}

/// One service of a run.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct JobStats {
    /// Name.
    pub name: String,
    /// Served over demanded requests.
    pub availability: f64,
    /// Share of the time its serving capacity covered its demand.
    pub time_availability: f64,
    /// Longest under-provisioned episode, seconds.
    pub longest_episode_s: f64,
}

/// Where the cost of a run went.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct CostBreakdown {
    /// Running on-demand nodes.
    pub on_demand: f64,
    /// Running spot nodes.
    pub spot: f64,
    /// Warm nodes (at their warm price once provisioned, in full while they are).
    pub warm: f64,
}

/// Batch jobs of a run.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct BatchStats {
    /// Arrived.
    pub arrived: u32,
    /// Completed.
    pub completed: u32,
    /// Mean time from arrival to completion, seconds.
    pub mean_turnaround_s: f64,
    /// Longest time from arrival to completion, seconds.
    pub max_turnaround_s: f64,
}

/// One pool of a run.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize)]
pub struct PoolStats {
    /// Name.
    pub name: String,
    /// Most nodes at once.
    pub peak_nodes: u32,
    /// Node-hours.
    pub node_hours: f64,
    /// Cost.
    pub cost: f64,
    /// Warm node-hours.
    pub warm_node_hours: f64,
    /// Cost of its warm nodes.
    pub warm_cost: f64,
}

/// Runs the scenario twice, autoscaled and static at the peak.
pub fn simulate(scenario: &Scenario) -> Report {
    Report {
        scenario: scenario.name.clone(),
        seed: scenario.spec.seed,
        duration: scenario.spec.duration,
        step: scenario.spec.step,
        autoscaled: simulate_run(scenario, Mode::Autoscaled),
        static_peak: simulate_run(scenario, Mode::StaticPeak),
    }
}

/// Runs the scenario once.
pub fn simulate_run(scenario: &Scenario, mode: Mode) -> RunReport {
    let mut sim = Sim::new(scenario, mode);
    sim.run();
    sim.finish()
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (a, s) = (&self.autoscaled, &self.static_peak);
        writeln!(
            f,
            "scenario {} (seed {}): {} in steps of {}",
            self.scenario,
            self.seed,
            autoscale::human(self.duration),
            autoscale::human(self.step)
        )?;
        writeln!(f, "{:<28}{:>18}{:>18}", "", "autoscaled", "static peak")?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, a: String, s: String| {
            writeln!(f, "{name:<28}{a:>18}{s:>18}")
        };
        row(
            f,
            "cost",
            format!("{:.2}", a.cost),
            format!("{:.2}", s.cost),
        )?;
        row(
            f,
            "availability",
            format!("{:.3}%", a.availability * 100.0),
            format!("{:.3}%", s.availability * 100.0),
        )?;
        row(
            f,
            "node-hours",
            format!("{:.1}", a.node_hours),
            format!("{:.1}", s.node_hours),
        )?;
        for (pa, ps) in a.pools.iter().zip(&s.pools) {
            row(
                f,
                &format!("pool {} peak nodes", pa.name),
                pa.peak_nodes.to_string(),
                ps.peak_nodes.to_string(),
            )?;
        }
        row(
            f,
            "placements",
            a.placements.to_string(),
            s.placements.to_string(),
        )?;
        row(
            f,
            "lost / stopped / preempted",
            format!("{}/{}/{}", a.lost, a.stopped, a.preemptions),
            format!("{}/{}/{}", s.lost, s.stopped, s.preemptions),
        )?;
        row(
            f,
            "under-provisioned episodes",
            a.reaction.episodes.to_string(),
            s.reaction.episodes.to_string(),
        )?;
        // A row whose two cells say the same of each run.
        let both = |f: &mut fmt::Formatter<'_>, name: &str, cell: fn(&RunReport) -> String| {
            row(f, name, cell(a), cell(s))
        };
        both(f, "reaction p50 / p99 / max (s)", |r| {
            let e = &r.reaction;
            format!("{:.0}/{:.0}/{:.0}", e.p50_s, e.p99_s, e.max_s)
        })?;
        for (ja, js) in a.jobs.iter().zip(&s.jobs) {
            row(
                f,
                &format!("{} availability (time)", ja.name),
                format!("{:.3}%", ja.time_availability * 100.0),
                format!("{:.3}%", js.time_availability * 100.0),
            )?;
        }
        both(f, "cost on-demand / spot / warm", |r| {
            let c = &r.cost_by;
            format!("{:.2}/{:.2}/{:.2}", c.on_demand, c.spot, c.warm)
        })?;
        if a.warm_starts > 0 || a.replaced_at_notice > 0 || s.replaced_at_notice > 0 {
            both(f, "warm starts / moved at notice", |r| {
                format!("{}/{}", r.warm_starts, r.replaced_at_notice)
            })?;
        }
        if a.batches.arrived > 0 {
            row(
                f,
                "batches done / arrived",
                format!("{}/{}", a.batches.completed, a.batches.arrived),
                format!("{}/{}", s.batches.completed, s.batches.arrived),
            )?;
            row(
                f,
                "batch turnaround mean (s)",
                format!("{:.0}", a.batches.mean_turnaround_s),
                format!("{:.0}", s.batches.mean_turnaround_s),
            )?;
        }
        row(
            f,
            "scale events",
            a.scale_events.to_string(),
            s.scale_events.to_string(),
        )?;
        row(
            f,
            "invariant violations",
            a.violations.len().to_string(),
            s.violations.len().to_string(),
        )?;
        write!(
            f,
            "autoscaled cost is {:.1}% lower at {:.3}% availability",
            self.cost_saving() * 100.0,
            a.availability * 100.0
        )
    }
}

/// A node of the simulated fleet.
#[derive(Debug, Clone)]
struct SimNode {
    pool: usize,
    zone: usize,
    launched_ms: u64,
    ready_at_ms: u64,
    terminate_at_ms: Option<u64>,
}

/// A replica.
#[derive(Debug, Clone)]
struct SimAlloc {
    job: usize,
    node: String,
    created_ms: u64,
    running_at_ms: u64,
    /// Batch replicas complete at this time (once running).
    run_for_ms: Option<u64>,
    complete: bool,
    /// Its node is under a spot notice: a replacement is placed elsewhere while it
    /// serves on until the node goes.
    leaving: bool,
}

/// A node kept warm: provisioned (from `ready_at_ms`) and set aside.
#[derive(Debug, Clone)]
struct WarmNode {
    zone: usize,
    ready_at_ms: u64,
}

#[derive(Debug, Clone)]
enum JobKind {
    Service {
        capacity: f64,
        noise: f64,
        scenario_index: usize,
    },
    Batch {
        arrive_ms: u64,
        run_for_ms: u64,
    },
}

#[derive(Debug, Clone)]
struct SimJob {
    name: String,
    pool: usize,
    kind: JobKind,
    replicas: u32,
    priority: u32,
    resources: Resources,
    placement: Placement,
    start_delay_ms: u64,
    active: bool,
    done_ms: Option<u64>,
    pending: u32,
    under_since_ms: Option<u64>,
    /// Served and demanded requests, steps covered and measured, longest episode.
    served: f64,
    demanded: f64,
    covered_steps: u64,
    measured_steps: u64,
    longest_ms: u64,
}

#[derive(Debug)]
struct Scaler<'a> {
    policy: &'a AutoScalingPolicy,
    target: TargetIdx,
    state: ScaleState,
    obs: Observations,
    keep: Duration,
}

#[derive(Debug, Clone, Copy)]
enum TargetIdx {
    Job(usize),
    Pool(usize),
}

struct Sim<'a> {
    sc: &'a Scenario,
    mode: Mode,
    rng: ChaCha8Rng,
    start_ms: u64,
    step_ms: u64,
    now_ms: u64,
    pools: Vec<&'a PoolSpec>,
    desired: Vec<u32>,
    next_node: Vec<u64>,
    zone_names: Vec<String>,
    zone_down_until: Vec<u64>,
    jobs: Vec<SimJob>,
    job_index: BTreeMap<String, usize>,
    nodes: BTreeMap<String, SimNode>,
    allocs: BTreeMap<String, SimAlloc>,
    snap: Snapshot,
    /// The node set changed: rebuild the snapshot.
    dirty: bool,
    /// Something reconcile reads changed since its last pass; without a change its
    /// plan would be the last one again (it is deterministic), so it is skipped,
    /// as the controller's loop runs on a change.
    changed: bool,
    /// Nodes removed since the last reconcile pass: their replicas are gone, but
    /// only the next pass says so.
    gone: BTreeSet<String>,
    scheduler: Scheduler,
    next_alloc: u64,
    scalers: Vec<Scaler<'a>>,
    fired: BTreeSet<(u8, usize)>,
    outage_ends: Vec<(u64, usize)>,
    episodes: Vec<u64>,
    report: RunReport,
    pool_stats: Vec<PoolStats>,
    /// Per pool: its warm nodes (autoscaled runs of pools with `warm`).
    warm: Vec<Vec<WarmNode>>,
}

impl<'a> Sim<'a> {
    fn new(sc: &'a Scenario, mode: Mode) -> Sim<'a> {
        let spec = &sc.spec;
        let pools: Vec<&PoolSpec> = spec.pools.iter().collect();
        let pool_index: BTreeMap<&str, usize> = pools
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.as_str(), i))
            .collect();
        let mut zone_names: Vec<String> = pools
            .iter()
            .flat_map(|p| p.zones.iter().cloned())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        zone_names.sort();
        let pool_for = |name: &Option<String>| {
            name.as_deref()
                .and_then(|n| pool_index.get(n).copied())
                .unwrap_or(0)
        };
        let mut jobs = Vec::new();
        for (i, j) in spec.jobs.iter().enumerate() {
            let pool = pool_for(&j.pool);
            jobs.push(SimJob {
                name: j.name.clone(),
                pool,
                kind: JobKind::Service {
                    capacity: j.capacity_per_replica,
                    noise: j.load.noise,
                    scenario_index: i,
                },
                replicas: j.replicas,
                priority: j.priority,
                resources: j.resources.clone(),
                placement: placement(&pools[pool].name, j.spread_zones),
                start_delay_ms: ms(j.start_delay),
                active: true,
                done_ms: None,
                pending: 0,
                under_since_ms: None,
                served: 0.0,
                demanded: 0.0,
                covered_steps: 0,
                measured_steps: 0,
                longest_ms: 0,
            });
        }
        for b in &spec.batches {
            let pool = pool_for(&b.pool);
            jobs.push(SimJob {
                name: b.name.clone(),
                pool,
                kind: JobKind::Batch {
                    arrive_ms: sc.start_ms.saturating_add(ms(b.at)),
                    run_for_ms: ms(b.run_for),
                },
                replicas: b.replicas,
                priority: b.priority,
                resources: b.resources.clone(),
                placement: placement(&pools[pool].name, false),
                start_delay_ms: ms(b.start_delay),
                active: false,
                done_ms: None,
                pending: 0,
                under_since_ms: None,
                served: 0.0,
                demanded: 0.0,
                covered_steps: 0,
                measured_steps: 0,
                longest_ms: 0,
            });
        }
        let job_index = jobs
            .iter()
            .enumerate()
            .map(|(i, j)| (j.name.clone(), i))
            .collect();
        let mut desired: Vec<u32> = pools.iter().map(|p| p.size.unwrap_or(p.min_size)).collect();
        let mut scalers = Vec::new();
        match mode {
            Mode::Autoscaled => {
                for policy in &sc.policies {
                    let target = match &policy.target {
                        Target::Job(n) => {
                            TargetIdx::Job(jobs.iter().position(|j| &j.name == n).unwrap_or(0))
                        }
                        Target::Pool(n) => {
                            TargetIdx::Pool(pool_index.get(n.as_str()).copied().unwrap_or(0))
                        }
                    };
                    let current = match target {
                        TargetIdx::Job(j) => jobs[j].replicas,
                        TargetIdx::Pool(p) => desired[p],
                    };
                    let keep = policy.lookback();
                    scalers.push(Scaler {
                        policy,
                        target,
                        state: ScaleState::new(current),
                        obs: Observations::default(),
                        keep,
                    });
                }
            }
            Mode::StaticPeak => {
                let peak = peak_replicas(sc);
                for (j, r) in jobs.iter_mut().zip(&peak) {
                    if let Some(r) = r {
                        j.replicas = *r;
                    }
                }
                for (p, d) in desired.iter_mut().enumerate() {
                    *d = static_pool_size(sc, &jobs, p).max(*d);
                }
            }
        }
        let n_pools = pools.len();
        let n_zones = zone_names.len();
        Sim {
            sc,
            mode,
            rng: ChaCha8Rng::seed_from_u64(spec.seed),
            start_ms: sc.start_ms,
            step_ms: ms(spec.step).max(1),
            now_ms: sc.start_ms,
            pool_stats: pools
                .iter()
                .map(|p| PoolStats {
                    name: p.name.clone(),
                    ..PoolStats::default()
                })
                .collect(),
            pools,
            desired,
            next_node: vec![0; n_pools],
            zone_names,
            zone_down_until: vec![0; n_zones],
            jobs,
            job_index,
            nodes: BTreeMap::new(),
            allocs: BTreeMap::new(),
            // Rebuilt before any use. An empty snapshot has no duplicate node and no
            // GPU, the only reasons Snapshot::new refuses one.
            snap: Snapshot::new(Vec::new(), Vec::new()).expect("an empty snapshot is valid"),
            dirty: true,
            changed: true,
            gone: BTreeSet::new(),
            scheduler: Scheduler::default(),
            next_alloc: 0,
            scalers,
            fired: BTreeSet::new(),
            outage_ends: Vec::new(),
            episodes: Vec::new(),
            report: RunReport::default(),
            warm: vec![Vec::new(); n_pools],
        }
    }

    fn run(&mut self) {
        // The fleet as it was before the trace: nodes ready, replicas serving.
        for p in 0..self.pools.len() {
            self.provision(p, true);
        }
        let steps = ms(self.sc.spec.duration) / self.step_ms;
        for k in 0..steps {
            self.now_ms = self.start_ms + k * self.step_ms;
            self.events();
            self.transitions();
            if std::mem::take(&mut self.changed) {
                self.reconcile(k == 0);
                self.check_invariants();
            }
            // Replace what failed before measuring, so the policies see the
            // replacements as launching.
            for p in 0..self.pools.len() {
                self.provision(p, false);
            }
            self.measure();
            if self.mode == Mode::Autoscaled {
                self.autoscale();
            }
            for p in 0..self.pools.len() {
                self.provision(p, false);
            }
        }
        self.now_ms = self.start_ms + steps * self.step_ms;
    }

    fn finish(mut self) -> RunReport {
        let end = self.now_ms;
        for j in &mut self.jobs {
            if let Some(since) = j.under_since_ms.take() {
                self.episodes.push(end - since);
                j.longest_ms = j.longest_ms.max(end - since);
            }
        }
        let mut r = std::mem::take(&mut self.report);
        r.availability = if r.demand > 0.0 {
            r.served / r.demand
        } else {
            1.0
        };
        let mut e = std::mem::take(&mut self.episodes);
        e.sort_unstable();
        if !e.is_empty() {
            let secs = |v: u64| v as f64 / 1000.0;
            // Nearest rank: the smallest value with at least 99% at or below it.
            let p99 = (e.len() * 99).div_ceil(100).max(1) - 1;
            r.reaction = Reaction {
                episodes: e.len() as u32,
                mean_s: secs(e.iter().sum::<u64>()) / e.len() as f64,
                p50_s: secs(e[e.len() / 2]),
                p99_s: secs(e[p99]),
                max_s: secs(e[e.len() - 1]),
            };
        }
        r.jobs = self
            .jobs
            .iter()
            .filter(|j| matches!(j.kind, JobKind::Service { .. }))
            .map(|j| JobStats {
                name: j.name.clone(),
                availability: if j.demanded > 0.0 {
                    j.served / j.demanded
                } else {
                    1.0
                },
                time_availability: if j.measured_steps > 0 {
                    j.covered_steps as f64 / j.measured_steps as f64
                } else {
                    1.0
                },
                longest_episode_s: j.longest_ms as f64 / 1000.0,
            })
            .collect();
        let turnarounds: Vec<f64> = self
            .jobs
            .iter()
            .filter_map(|j| match (&j.kind, j.done_ms) {
                (JobKind::Batch { arrive_ms, .. }, Some(done)) => {
                    Some(done.saturating_sub(*arrive_ms) as f64 / 1000.0)
                }
                _ => None,
            })
            .collect();
        r.batches = BatchStats {
            arrived: self
                .jobs
                .iter()
                .filter(|j| matches!(j.kind, JobKind::Batch { arrive_ms, .. } if arrive_ms < end))
                .count() as u32,
            completed: turnarounds.len() as u32,
            mean_turnaround_s: if turnarounds.is_empty() {
                0.0
            } else {
                turnarounds.iter().sum::<f64>() / turnarounds.len() as f64
            },
            max_turnaround_s: turnarounds.iter().copied().fold(0.0, f64::max),
        };
        r.pending_at_end = self.jobs.iter().map(|j| j.pending).sum();
        r.pools = std::mem::take(&mut self.pool_stats);
        r
    }

    // 1. Faults, arrivals, timers.
    fn events(&mut self) {
        let now = self.now_ms;
        let offset = now - self.start_ms;
        let faults = &self.sc.spec.faults;
        for (i, z) in faults.zone_outages.iter().enumerate() {
            if offset >= ms(z.at) && self.fired.insert((0, i)) {
                let zone = self.zone_names.iter().position(|n| n == &z.zone);
                if let Some(zone) = zone {
                    let until = now.saturating_add(ms(z.duration));
                    self.zone_down_until[zone] = self.zone_down_until[zone].max(until);
                    self.outage_ends.push((until, zone));
                    let victims: Vec<String> = self
                        .nodes
                        .iter()
                        .filter(|(_, n)| n.zone == zone)
                        .map(|(k, _)| k.clone())
                        .collect();
                    self.event(format!(
                        "zone {} is out for {}: {} nodes lost",
                        z.zone,
                        autoscale::human(z.duration),
                        victims.len()
                    ));
                    for v in victims {
                        self.remove_node(&v);
                    }
                }
            }
        }
        for (i, nf) in faults.node_failures.iter().enumerate() {
            if offset >= ms(nf.at) && self.fired.insert((1, i)) {
                let pool = self.pool_index(&nf.pool);
                let candidates: Vec<String> = self
                    .nodes
                    .iter()
                    .filter(|(_, n)| Some(n.pool) == pool && n.ready_at_ms <= now)
                    .map(|(k, _)| k.clone())
                    .collect();
                let victims = choose(&mut self.rng, candidates, nf.count as usize);
                self.event(format!(
                    "{} nodes of pool {} fail: {}",
                    victims.len(),
                    nf.pool,
                    victims.join(", ")
                ));
                for v in victims {
                    self.remove_node(&v);
                }
            }
        }
        for (i, si) in faults.spot_interruptions.iter().enumerate() {
            if offset >= ms(si.at) && self.fired.insert((2, i)) {
                let pool = self.pool_index(&si.pool);
                let candidates: Vec<String> = self
                    .nodes
                    .iter()
                    .filter(|(_, n)| Some(n.pool) == pool && n.terminate_at_ms.is_none())
                    .map(|(k, _)| k.clone())
                    .collect();
                let count = (candidates.len() as f64 * si.percent / 100.0).ceil() as usize;
                let victims = choose(&mut self.rng, candidates, count);
                self.event(format!(
                    "spot interruption: {} nodes of pool {} terminate in {}",
                    victims.len(),
                    si.pool,
                    autoscale::human(si.notice)
                ));
                let at = now.saturating_add(ms(si.notice));
                let doomed: BTreeSet<&str> = victims.iter().map(String::as_str).collect();
                // Their replicas are replaced now, elsewhere, and serve on until
                // the node goes: the drain restarts work before the deadline.
                for a in self.allocs.values_mut() {
                    if !a.complete && !a.leaving && doomed.contains(a.node.as_str()) {
                        a.leaving = true;
                        self.report.replaced_at_notice += 1;
                    }
                }
                for v in &victims {
                    if let Some(n) = self.nodes.get_mut(v) {
                        n.terminate_at_ms = Some(at);
                    }
                }
                self.dirty = true;
            }
        }
        let rate = faults.node_failure_rate;
        if rate > 0.0 {
            let p = rate * self.step_ms as f64 / 3_600_000.0;
            let names: Vec<String> = self.nodes.keys().cloned().collect();
            let mut failed = Vec::new();
            for n in names {
                if self.rng.random::<f64>() < p {
                    failed.push(n);
                }
            }
            if !failed.is_empty() {
                self.event(format!("random failure: {}", failed.join(", ")));
            }
            for n in failed {
                self.remove_node(&n);
            }
        }
        let ending: Vec<String> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.terminate_at_ms.is_some_and(|t| t <= now))
            .map(|(k, _)| k.clone())
            .collect();
        for n in ending {
            self.remove_node(&n);
        }
        self.outage_ends.retain(|&(until, _)| until > now);
        for j in &mut self.jobs {
            if let JobKind::Batch { arrive_ms, .. } = j.kind
                && !j.active
                && j.done_ms.is_none()
                && arrive_ms <= now
            {
                j.active = true;
                self.changed = true;
            }
        }
    }

    fn transitions(&mut self) {
        let now = self.now_ms;
        if self
            .nodes
            .values()
            .any(|n| n.ready_at_ms <= now && n.ready_at_ms > now.saturating_sub(self.step_ms))
        {
            self.dirty = true;
        }
        let mut completed = Vec::new();
        let batches = self
            .jobs
            .iter()
            .any(|j| j.active && matches!(j.kind, JobKind::Batch { .. }));
        if batches {
            for (id, a) in &mut self.allocs {
                if let Some(run) = a.run_for_ms
                    && !a.complete
                    && a.running_at_ms.saturating_add(run) <= now
                {
                    a.complete = true;
                    completed.push(id.clone());
                }
            }
        }
        self.changed |= !completed.is_empty();
        for id in completed {
            self.snap.remove(&id);
        }
        self.rebuild();
    }

    fn rebuild(&mut self) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        self.changed = true;
        let now = self.now_ms;
        let mut infos = Vec::new();
        for (name, n) in &self.nodes {
            if n.ready_at_ms > now {
                continue;
            }
            let p = self.pools[n.pool];
            infos.push(node_info(
                name,
                p,
                &self.zone_names[n.zone],
                n.terminate_at_ms.is_none(),
            ));
        }
        let present: BTreeSet<&str> = infos.iter().map(|i| i.name.as_str()).collect();
        let placed: Vec<Placed> = self
            .allocs
            .iter()
            .filter(|(_, a)| !a.complete && present.contains(a.node.as_str()))
            .map(|(id, a)| self.placed(id, a))
            .collect();
        match Snapshot::new(infos, placed) {
            Ok(s) => self.snap = s,
            Err(e) => self.report.violations.push(format!(
                "{} snapshot refused: {e}",
                clock(self.now_ms - self.start_ms)
            )),
        }
    }

    fn placed(&self, id: &str, a: &SimAlloc) -> Placed {
        let j = &self.jobs[a.job];
        Placed {
            alloc_id: id.to_string(),
            job: j.name.clone(),
            node: a.node.clone(),
            cpu_millis: j.resources.cpu.0,
            memory_bytes: j.resources.memory.0,
            // GPU ids are re-chosen on a rebuild: the scheduler only counts them.
            gpu_uuids: Vec::new(),
            priority: j.priority,
            disk_bytes: j.resources.disk.0,
            // Simulated jobs publish no ports.
            host_ports: Vec::new(),
        }
    }

    // 2. Reconcile and place.
    fn reconcile(&mut self, prewarm: bool) {
        let now = self.now_ms;
        self.gone.clear();
        // Replicas that were leaving a spot node end with it (their replacements
        // were placed at the notice).
        let ended: Vec<String> = self
            .allocs
            .iter()
            .filter(|(_, a)| a.leaving && !self.nodes.contains_key(&a.node))
            .map(|(k, _)| k.clone())
            .collect();
        for id in ended {
            self.drop_alloc(&id);
        }
        let jobs: Vec<JobView> = self
            .jobs
            .iter()
            .filter(|j| j.active)
            .map(|j| JobView {
                name: j.name.clone(),
                version: 1,
                stable_version: Some(1),
                job_type: match j.kind {
                    JobKind::Service { .. } => JobType::Service,
                    JobKind::Batch { .. } => JobType::Batch,
                },
                replicas: j.replicas,
                placement: Placement::default(),
                update: Update::default(),
                has_health_check: false,
                static_host_ports: false,
                stopped: false,
            })
            .collect();
        let allocs: Vec<AllocView> = self
            .allocs
            .iter()
            .filter(|(_, a)| !a.leaving)
            .map(|(id, a)| {
                let running = a.running_at_ms <= now;
                AllocView {
                    id: id.clone(),
                    job: self.jobs[a.job].name.clone(),
                    version: 1,
                    node: a.node.clone(),
                    state: if a.complete {
                        AllocState::Complete
                    } else if running {
                        AllocState::Running
                    } else {
                        AllocState::Starting
                    },
                    desired_run: true,
                    healthy: Some(running),
                    healthy_since_ms: running.then_some(a.running_at_ms),
                    created_ms: a.created_ms,
                    failure: None,
                    migrating: false,
                }
            })
            .collect();
        let nodes: Vec<NodeView> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.ready_at_ms <= now)
            .map(|(name, _)| NodeView {
                name: name.clone(),
                status: NodeStatus::Ready,
                labels: BTreeMap::new(),
            })
            .collect();
        let plan = reconcile::reconcile(&jobs, &allocs, &nodes, &FailureCounts::new(), now);
        self.changed |= !(plan.lost.is_empty() && plan.stop.is_empty())
            || plan
                .jobs
                .iter()
                .any(|c| matches!(c, JobChange::Complete { .. }));
        for id in &plan.lost {
            self.drop_alloc(id);
            self.report.lost += 1;
        }
        for (id, _) in &plan.stop {
            self.drop_alloc(id);
            self.report.stopped += 1;
        }
        for change in &plan.jobs {
            if let JobChange::Complete { job } = change
                && let Some(&j) = self.job_index.get(job)
            {
                self.jobs[j].active = false;
                self.jobs[j].done_ms = Some(now);
                let done: Vec<String> = self
                    .allocs
                    .iter()
                    .filter(|(_, a)| a.job == j)
                    .map(|(k, _)| k.clone())
                    .collect();
                for id in done {
                    self.drop_alloc(&id);
                }
                self.event(format!("batch {job} complete"));
            }
        }
        for j in &mut self.jobs {
            j.pending = 0;
        }
        for pr in &plan.place {
            let Some(&j) = self.job_index.get(&pr.job) else {
                continue;
            };
            let job = &self.jobs[j];
            let mut req = Request::new(job.name.clone(), pr.count);
            req.priority = job.priority;
            req.resources = job.resources.clone();
            req.placement = job.placement.clone();
            let out = self.scheduler.schedule(&self.snap, &req);
            let ids: Vec<String> = (0..out.assignments.len())
                .map(|_| {
                    self.next_alloc += 1;
                    format!("{}-{}", job.name, self.next_alloc)
                })
                .collect();
            if let Err(e) = self.snap.commit(&req, &out, &ids) {
                self.report.violations.push(format!(
                    "{} commit of {} refused: {e}",
                    clock(now - self.start_ms),
                    job.name
                ));
                continue;
            }
            for victim in &out.preemptions {
                self.allocs.remove(victim);
                self.report.preemptions += 1;
            }
            let delay = if prewarm { 0 } else { job.start_delay_ms };
            let run_for = match job.kind {
                JobKind::Batch { run_for_ms, .. } => Some(run_for_ms),
                JobKind::Service { .. } => None,
            };
            for (a, id) in out.assignments.iter().zip(ids) {
                self.allocs.insert(
                    id,
                    SimAlloc {
                        job: j,
                        node: a.node.clone(),
                        created_ms: now,
                        running_at_ms: now.saturating_add(delay),
                        run_for_ms: run_for,
                        complete: false,
                        leaving: false,
                    },
                );
            }
            self.report.placements += out.assignments.len() as u64;
            self.changed |= !out.assignments.is_empty() || !out.preemptions.is_empty();
            self.jobs[j].pending += out.unplaced;
            if out.unplaced > 0 {
                let mut one = req.clone();
                one.count = 1;
                if !self
                    .scheduler
                    .schedule(&self.snap, &one)
                    .assignments
                    .is_empty()
                {
                    self.report.violations.push(format!(
                        "{} {} left pending though a replica fits",
                        clock(now - self.start_ms),
                        self.jobs[j].name
                    ));
                }
            }
        }
    }

    fn check_invariants(&mut self) {
        let mut live: BTreeMap<usize, u32> = BTreeMap::new();
        let mut bad = Vec::new();
        for (id, a) in &self.allocs {
            if a.complete {
                continue;
            }
            if !a.leaving {
                *live.entry(a.job).or_default() += 1;
            }
            let in_snap = self.snap.allocation(id).map(|p| p.node.as_str());
            if !self.nodes.contains_key(&a.node) || in_snap != Some(a.node.as_str()) {
                bad.push(format!(
                    "{} allocation {id} runs on {} but the fleet has it on {}",
                    clock(self.now_ms - self.start_ms),
                    a.node,
                    in_snap.unwrap_or("no node")
                ));
            }
        }
        for (j, n) in live {
            let job = &self.jobs[j];
            if n > job.replicas {
                bad.push(format!(
                    "{} {} runs {n} replicas, more than the {} it wants",
                    clock(self.now_ms - self.start_ms),
                    job.name,
                    job.replicas
                ));
            }
        }
        self.report.violations.extend(bad);
    }

    // 3. Measure.
    fn measure(&mut self) {
        let now = self.now_ms;
        let dt_h = self.step_ms as f64 / 3_600_000.0;
        let offset = Duration::from_millis(now - self.start_ms);
        // Replicas serving, and replicas holding resources on nodes that are not
        // draining, per job.
        let draining: BTreeSet<&str> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.terminate_at_ms.is_some())
            .map(|(k, _)| k.as_str())
            .collect();
        let gone = &self.gone;
        let mut running = vec![0u32; self.jobs.len()];
        let mut holding = vec![0u32; self.jobs.len()];
        for a in self.allocs.values() {
            if a.complete || (!gone.is_empty() && gone.contains(&a.node)) {
                continue;
            }
            if a.running_at_ms <= now {
                running[a.job] += 1;
            }
            if draining.is_empty() || !draining.contains(a.node.as_str()) {
                holding[a.job] += 1;
            }
        }
        let mut pool_counts = vec![0u32; self.pools.len()];
        for n in self.nodes.values() {
            let p = self.pools[n.pool];
            let cost = p.template.price_per_hour * dt_h;
            self.report.cost += cost;
            self.report.node_hours += dt_h;
            match p.template.capacity_type {
                CapacityType::Spot => self.report.cost_by.spot += cost,
                CapacityType::OnDemand => self.report.cost_by.on_demand += cost,
            }
            let s = &mut self.pool_stats[n.pool];
            s.cost += cost;
            s.node_hours += dt_h;
            pool_counts[n.pool] += 1;
        }
        for (p, warm) in self.warm.iter().enumerate() {
            let pool = self.pools[p];
            let Some(spec) = &pool.warm else { continue };
            let price = spec
                .price_per_hour
                .unwrap_or_else(|| warm_price_per_hour(&pool.template, spec.state));
            for w in warm {
                // Provisioning runs the node in full; once set aside, its warm price.
                let rate = if w.ready_at_ms > now {
                    pool.template.price_per_hour
                } else {
                    price
                };
                let cost = rate * dt_h;
                self.report.cost += cost;
                self.report.cost_by.warm += cost;
                let s = &mut self.pool_stats[p];
                s.cost += cost;
                s.warm_cost += cost;
                s.warm_node_hours += dt_h;
            }
        }
        for (s, c) in self.pool_stats.iter_mut().zip(&pool_counts) {
            s.peak_nodes = s.peak_nodes.max(*c);
        }
        let mut demands = vec![0.0; self.jobs.len()];
        for (j, job) in self.jobs.iter_mut().enumerate() {
            let JobKind::Service {
                capacity,
                noise,
                scenario_index,
            } = job.kind
            else {
                continue;
            };
            let curve = &self.sc.spec.jobs[scenario_index].load;
            let mut demand = demand_at(curve, offset);
            if noise > 0.0 {
                let u: f64 = self.rng.random_range(-1.0..=1.0);
                demand *= 1.0 + noise / 100.0 * u;
            }
            let cap = f64::from(running[j]) * capacity;
            let served = demand.min(cap);
            self.report.demand += demand * dt_h * 3600.0;
            self.report.served += served * dt_h * 3600.0;
            job.demanded += demand * dt_h * 3600.0;
            job.served += served * dt_h * 3600.0;
            job.measured_steps += 1;
            demands[j] = demand;
            if cap + 1e-9 < demand {
                job.under_since_ms.get_or_insert(now);
            } else {
                job.covered_steps += 1;
                if let Some(since) = job.under_since_ms.take() {
                    self.episodes.push(now - since);
                    job.longest_ms = job.longest_ms.max(now - since);
                }
            }
        }
        if self.mode != Mode::Autoscaled {
            return;
        }
        // Pool utilization over ready nodes.
        let n_pools = self.pools.len();
        let (mut alloc_cpu, mut alloc_mem, mut alloc_gpu) = (
            vec![0f64; n_pools],
            vec![0f64; n_pools],
            vec![0f64; n_pools],
        );
        let (mut cap_cpu, mut cap_mem, mut cap_gpu) = (
            vec![0f64; n_pools],
            vec![0f64; n_pools],
            vec![0f64; n_pools],
        );
        // Over the nodes that are ready or launching: the size the policy sets
        // counts launching nodes, so their capacity counts as coming.
        for n in self.nodes.values() {
            if n.terminate_at_ms.is_none() {
                let r = &self.pools[n.pool].template.resources;
                cap_cpu[n.pool] += r.cpu.0 as f64;
                cap_mem[n.pool] += r.memory.0 as f64;
                cap_gpu[n.pool] += f64::from(r.gpus.as_ref().map_or(0, |g| g.count));
            }
        }
        for (j, job) in self.jobs.iter().enumerate() {
            let (n, r) = (f64::from(holding[j]), &job.resources);
            alloc_cpu[job.pool] += n * r.cpu.0 as f64;
            alloc_mem[job.pool] += n * r.memory.0 as f64;
            alloc_gpu[job.pool] += n * f64::from(r.gpus.as_ref().map_or(0, |g| g.count));
        }
        // Pending replicas that the nodes already launching will not hold: a pool
        // that counted those again on every step would launch nodes for the same
        // replicas until the first ones are ready.
        let mut launching = vec![0u64; n_pools];
        for n in self.nodes.values() {
            if n.ready_at_ms > now && n.terminate_at_ms.is_none() {
                launching[n.pool] += 1;
            }
        }
        let mut pool_pending = vec![0u32; n_pools];
        for j in &self.jobs {
            if j.pending == 0 {
                continue;
            }
            let fit = u64::from(per_node(
                &self.pools[j.pool].template.resources,
                &j.resources,
            ));
            let covered = u64::from(j.pending).min(launching[j.pool].saturating_mul(fit));
            launching[j.pool] -= covered.div_ceil(fit.max(1));
            pool_pending[j.pool] += j.pending - covered as u32;
        }
        let pct = |a: f64, c: f64| if c > 0.0 { 100.0 * a / c } else { 0.0 };
        for s in &mut self.scalers {
            let at_ms = now;
            let sample = |value: f64| Sample { at_ms, value };
            match s.target {
                TargetIdx::Job(j) => {
                    let job = &self.jobs[j];
                    let JobKind::Service { capacity, .. } = job.kind else {
                        continue;
                    };
                    if running[j] > 0 {
                        let util = demands[j] / (f64::from(running[j]) * capacity);
                        s.obs.cpu.push(sample((util * 100.0).min(100.0)));
                        s.obs.memory.push(sample((util * 100.0).min(100.0)));
                    }
                    s.obs.pending.push(sample(f64::from(job.pending)));
                    s.obs
                        .reported
                        .entry(REQUESTS_METRIC.to_string())
                        .or_default()
                        .push(sample(demands[j]));
                }
                TargetIdx::Pool(p) => {
                    if cap_cpu[p] > 0.0 {
                        s.obs.cpu.push(sample(pct(alloc_cpu[p], cap_cpu[p])));
                        s.obs.memory.push(sample(pct(alloc_mem[p], cap_mem[p])));
                    }
                    if cap_gpu[p] > 0.0 {
                        s.obs.gpu.push(sample(pct(alloc_gpu[p], cap_gpu[p])));
                    }
                    s.obs.pending.push(sample(f64::from(pool_pending[p])));
                }
            }
            s.obs.prune(now, s.keep);
        }
    }

    // 4. Autoscale.
    fn autoscale(&mut self) {
        let now = self.now_ms;
        let mut events = Vec::new();
        for s in &mut self.scalers {
            let (current, price) = match s.target {
                TargetIdx::Job(j) => {
                    let job = &self.jobs[j];
                    let t = &self.pools[job.pool].template;
                    let share_cpu = job.resources.cpu.0 as f64 / t.resources.cpu.0.max(1) as f64;
                    let share_mem =
                        job.resources.memory.0 as f64 / t.resources.memory.0.max(1) as f64;
                    (job.replicas, t.price_per_hour * share_cpu.max(share_mem))
                }
                TargetIdx::Pool(p) => (self.desired[p], self.pools[p].template.price_per_hour),
            };
            s.state.current = current;
            s.state.unit_price_per_hour = Some(price);
            let d = autoscale::decide(s.policy, &s.state, &s.obs, now);
            s.state.record(s.policy, &d, now);
            if d.changed() {
                match s.target {
                    TargetIdx::Job(j) => {
                        self.jobs[j].replicas = d.to;
                        self.changed = true;
                    }
                    TargetIdx::Pool(p) => self.desired[p] = d.to,
                }
                events.push(d.explanation);
            }
        }
        self.report.scale_events += events.len() as u64;
        for e in events {
            self.event(e);
        }
    }

    // 5. Provision.
    fn provision(&mut self, p: usize, initial: bool) {
        let now = self.now_ms;
        let active: Vec<(String, &SimNode)> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.pool == p && n.terminate_at_ms.is_none())
            .map(|(k, n)| (k.clone(), n))
            .collect();
        let have = active.len() as u32;
        let want = self.wanted(p);
        if have < want {
            let mut per_zone: BTreeMap<usize, u32> = BTreeMap::new();
            for (_, n) in &active {
                *per_zone.entry(n.zone).or_default() += 1;
            }
            let pool = self.pools[p];
            let zones: Vec<usize> = pool
                .zones
                .iter()
                .filter_map(|z| self.zone_names.iter().position(|n| n == z))
                .filter(|&z| self.zone_down_until[z] <= now)
                .collect();
            if zones.is_empty() {
                return;
            }
            let delay = if initial { 0 } else { ms(pool.provision_delay) };
            let warm_delay = pool.warm.as_ref().map_or(0, |w| {
                ms(w.start_delay
                    .or_else(|| warm_start_delay(&pool.template.provider, w.state))
                    .unwrap_or(pool.provision_delay))
            });
            for _ in have..want {
                // A warm node first (seconds), in the zone with the fewest nodes
                // among the warm ones ready; else a new one in the zone with the
                // fewest nodes, in the pool's order on ties.
                let taken = self.warm[p]
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| w.ready_at_ms <= now && zones.contains(&w.zone))
                    .min_by_key(|(_, w)| per_zone.get(&w.zone).copied().unwrap_or(0))
                    .map(|(i, _)| i);
                let (zone, ready_at_ms) = match taken {
                    Some(i) => {
                        let w = self.warm[p].swap_remove(i);
                        self.report.warm_starts += 1;
                        (w.zone, now.saturating_add(warm_delay))
                    }
                    None => {
                        let zone = zones
                            .iter()
                            .copied()
                            .min_by_key(|z| per_zone.get(z).copied().unwrap_or(0))
                            .unwrap_or(zones[0]);
                        (zone, now.saturating_add(delay))
                    }
                };
                *per_zone.entry(zone).or_default() += 1;
                self.next_node[p] += 1;
                let name = format!(
                    "{}-{}-{:05}",
                    pool.name, self.zone_names[zone], self.next_node[p]
                );
                self.nodes.insert(
                    name,
                    SimNode {
                        pool: p,
                        zone,
                        launched_ms: now,
                        ready_at_ms,
                        terminate_at_ms: None,
                    },
                );
            }
            if initial {
                self.dirty = true;
            }
        } else if have > want {
            let mut load: BTreeMap<&str, u32> = BTreeMap::new();
            for a in self.allocs.values().filter(|a| !a.complete) {
                *load.entry(a.node.as_str()).or_default() += 1;
            }
            let mut order: Vec<(u32, u32, u64, String)> = active
                .iter()
                .map(|(name, n)| {
                    let provisioning = u32::from(n.ready_at_ms <= now);
                    let count = load.get(name.as_str()).copied().unwrap_or(0);
                    (provisioning, count, u64::MAX - n.launched_ms, name.clone())
                })
                .collect();
            order.sort();
            let victims: Vec<String> = order
                .into_iter()
                .take((have - want) as usize)
                .map(|(_, _, _, n)| n)
                .collect();
            for v in victims {
                // Back to the warm pool while it has room (already provisioned).
                if let Some(n) = self.nodes.get(&v)
                    && self.mode == Mode::Autoscaled
                    && self.pools[p]
                        .warm
                        .as_ref()
                        .is_some_and(|w| (self.warm[p].len() as u32) < w.size)
                {
                    self.warm[p].push(WarmNode {
                        zone: n.zone,
                        ready_at_ms: now,
                    });
                }
                self.remove_node(&v);
            }
        }
        self.refill_warm(p, initial);
    }

    /// The nodes pool `p` wants: its policy's size, and in the autoscaled run at
    /// least the nodes holding replicas plus the headroom's empty ones.
    fn wanted(&self, p: usize) -> u32 {
        let pool = self.pools[p];
        let Some(Ok(headroom)) = pool.headroom.as_ref().map(|h| h.parse()) else {
            return self.desired[p];
        };
        if self.mode != Mode::Autoscaled {
            return self.desired[p];
        }
        let busy: BTreeSet<&str> = self
            .allocs
            .values()
            .filter(|a| !a.complete)
            .map(|a| a.node.as_str())
            .collect();
        let used = self
            .nodes
            .iter()
            .filter(|(k, n)| {
                n.pool == p && n.terminate_at_ms.is_none() && busy.contains(k.as_str())
            })
            .count() as u32;
        let floor = used.saturating_add(headroom.nodes(used)).min(pool.max_size);
        self.desired[p].max(floor)
    }

    /// Provisions warm nodes up to the pool's warm size, in the zones with the
    /// fewest warm nodes (ready at once before the trace, else after the
    /// provisioning delay).
    fn refill_warm(&mut self, p: usize, initial: bool) {
        let pool = self.pools[p];
        let Some(spec) = &pool.warm else { return };
        if self.mode != Mode::Autoscaled {
            return;
        }
        let now = self.now_ms;
        let zones: Vec<usize> = pool
            .zones
            .iter()
            .filter_map(|z| self.zone_names.iter().position(|n| n == z))
            .filter(|&z| self.zone_down_until[z] <= now)
            .collect();
        let delay = if initial { 0 } else { ms(pool.provision_delay) };
        while (self.warm[p].len() as u32) < spec.size && !zones.is_empty() {
            let zone = zones
                .iter()
                .copied()
                .min_by_key(|z| self.warm[p].iter().filter(|w| w.zone == *z).count())
                .unwrap_or(zones[0]);
            self.warm[p].push(WarmNode {
                zone,
                ready_at_ms: now.saturating_add(delay),
            });
        }
    }

    fn remove_node(&mut self, name: &str) {
        if self.nodes.remove(name).is_some() {
            self.dirty = true;
            self.gone.insert(name.to_string());
        }
    }

    fn drop_alloc(&mut self, id: &str) {
        self.allocs.remove(id);
        self.snap.remove(id);
    }

    fn pool_index(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name == name)
    }

    fn event(&mut self, text: String) {
        let at = clock(self.now_ms - self.start_ms);
        self.report.events.push(format!("{at} {text}"));
    }
}

/// Each service's replicas at its peak demand (noise included); `None` for
/// batches.
fn peak_replicas(sc: &Scenario) -> Vec<Option<u32>> {
    let step = sc.spec.step.max(Duration::from_secs(1));
    let steps = ms(sc.spec.duration) / ms(step).max(1);
    let mut out: Vec<Option<u32>> = sc
        .spec
        .jobs
        .iter()
        .map(|j| {
            let mut peak: f64 = 0.0;
            for k in 0..steps {
                let d = demand_at(&j.load, Duration::from_millis(k * ms(step)));
                peak = peak.max(d);
            }
            let need = peak * (1.0 + j.load.noise / 100.0) / j.capacity_per_replica;
            Some(
                (need - 1e-9)
                    .ceil()
                    .clamp(0.0, f64::from(super::MAX_REPLICAS)) as u32,
            )
        })
        .collect();
    out.extend(sc.spec.batches.iter().map(|_| None));
    out
}

/// Nodes pool `p` needs to hold its services at their peak replicas and the most
/// demanding set of overlapping batches, found with the real scheduler.
fn static_pool_size(sc: &Scenario, jobs: &[SimJob], p: usize) -> u32 {
    let pool = &sc.spec.pools[p];
    let services: Vec<&SimJob> = jobs
        .iter()
        .filter(|j| j.pool == p && matches!(j.kind, JobKind::Service { .. }))
        .collect();
    let batches: Vec<(&SimJob, u64, u64)> = jobs
        .iter()
        .filter(|j| j.pool == p)
        .filter_map(|j| match j.kind {
            JobKind::Batch {
                arrive_ms,
                run_for_ms,
            } => Some((
                j,
                arrive_ms,
                arrive_ms
                    .saturating_add(run_for_ms)
                    .saturating_add(j.start_delay_ms),
            )),
            JobKind::Service { .. } => None,
        })
        .collect();
    let mut sets: Vec<Vec<&SimJob>> = vec![Vec::new()];
    for &(_, at, _) in &batches {
        sets.push(
            batches
                .iter()
                .filter(|&&(_, a, end)| a <= at && at < end)
                .map(|&(j, _, _)| j)
                .collect(),
        );
    }
    let mut need = pool.min_size;
    for set in sets {
        let all: Vec<&SimJob> = services.iter().copied().chain(set).collect();
        let fits = |n: u32| fits_on(pool, &all, n);
        if fits(need) {
            continue;
        }
        let (mut lo, mut hi) = (need, pool.max_size);
        if !fits(hi) {
            need = hi;
            continue;
        }
        while lo + 1 < hi {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        need = hi;
    }
    need
}

fn fits_on(pool: &PoolSpec, jobs: &[&SimJob], n: u32) -> bool {
    let infos: Vec<NodeInfo> = (0..n)
        .map(|i| {
            // The scenario checked that every pool has a zone.
            let zone = pool
                .zones
                .get(i as usize % pool.zones.len().max(1))
                .map_or("default", String::as_str);
            node_info(&format!("{}-{zone}-{i:05}", pool.name), pool, zone, true)
        })
        .collect();
    let Ok(mut snap) = Snapshot::new(infos, Vec::new()) else {
        return false;
    };
    let scheduler = Scheduler::default();
    let mut next = 0u64;
    for j in jobs {
        let mut req = Request::new(j.name.clone(), j.replicas);
        req.priority = j.priority;
        req.resources = j.resources.clone();
        req.placement = j.placement.clone();
        let out = scheduler.schedule(&snap, &req);
        if out.unplaced > 0 || !out.preemptions.is_empty() {
            return false;
        }
        let ids: Vec<String> = out
            .assignments
            .iter()
            .map(|_| {
                next += 1;
                format!("s{next}")
            })
            .collect();
        if snap.commit(&req, &out, &ids).is_err() {
            return false;
        }
    }
    true
}

/// How many replicas needing `job` fit on an empty node offering `node` (at
/// least 1: the scenario checked that one fits).
fn per_node(node: &crate::autoscale::pool::NodeResources, job: &Resources) -> u32 {
    let ratio = |have: u64, need: u64| have.checked_div(need).unwrap_or(u64::MAX);
    let gpus = job.gpus.as_ref().map_or(0, |g| u64::from(g.count));
    let node_gpus = node.gpus.as_ref().map_or(0, |g| u64::from(g.count));
    let n = ratio(node.cpu.0, job.cpu.0)
        .min(ratio(node.memory.0, job.memory.0))
        .min(ratio(node_gpus, gpus));
    u32::try_from(n).unwrap_or(u32::MAX).max(1)
}

fn node_info(name: &str, pool: &PoolSpec, zone: &str, ready: bool) -> NodeInfo {
    let t = &pool.template;
    let mut labels = t.labels.clone();
    labels.insert("pool".into(), pool.name.clone());
    labels.insert("zone".into(), zone.to_string());
    labels.insert("instance_type".into(), t.instance_type.clone());
    labels.insert("capacity".into(), t.capacity_type.to_string());
    let gpus = t.resources.gpus.as_ref().map_or_else(Vec::new, |g| {
        (0..g.count)
            .map(|i| GpuInfo {
                index: i,
                uuid: format!("{name}-gpu{i}"),
                model: g.model.clone(),
                memory_bytes: g.memory.0,
                vfio_address: None,
            })
            .collect()
    });
    NodeInfo {
        name: name.to_string(),
        labels,
        capacity: Capacity {
            cpu_millis: t.resources.cpu.0,
            memory_bytes: t.resources.memory.0,
            // Node templates do not describe disk yet.
            disk_bytes: 0,
            gpus,
            ..Capacity::default()
        },
        ready,
    }
}

fn placement(pool: &str, spread_zones: bool) -> Placement {
    Placement {
        constraints: vec![Constraint {
            key: "pool".into(),
            operator: Operator::In,
            values: vec![pool.to_string()],
        }],
        spread: if spread_zones {
            vec![Spread {
                key: "zone".into(),
                weight: 50,
            }]
        } else {
            Vec::new()
        },
        ..Placement::default()
    }
}

/// `count` of `items`, chosen at random (a partial Fisher–Yates shuffle), sorted.
fn choose(rng: &mut ChaCha8Rng, mut items: Vec<String>, count: usize) -> Vec<String> {
    let count = count.min(items.len());
    for i in 0..count {
        let j = rng.random_range(i..items.len());
        items.swap(i, j);
    }
    items.truncate(count);
    items.sort();
    items
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `HH:MM:SS` since the start (hours go past 24).
fn clock(offset_ms: u64) -> String {
    let s = offset_ms / 1000;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

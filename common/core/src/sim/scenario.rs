//! Scenario files (`kind: Scenario`): the fleet, the workload trace and the faults
//! a simulation replays, parsed and checked like every other manifest.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::DateTime;
use serde::{Deserialize, Serialize};
use yaml_serde::Value;

use crate::autoscale::pool::{self, CapacityType, NodeTemplateSpec};
use crate::autoscale::{self, AutoScalingPolicy, MetricKind, PolicySpec, Target, human};
use crate::manifest::document::{self, Kind, Rule};
use crate::manifest::{ManifestErrors, Metadata, Resources, duration, opt_duration};

/// The `kind` of a scenario.
pub const KIND: &str = "Scenario";
/// The job-reported metric the simulator offers: each job's demand, in requests/s.
pub const REQUESTS_METRIC: &str = "requests";
/// Longest scenario.
pub const MAX_DURATION: Duration = Duration::from_secs(31 * 24 * 3600);
/// Most steps in one run.
pub const MAX_STEPS: u64 = 1_000_000;
/// Most replicas of one job or batch.
pub const MAX_REPLICAS: u32 = 100_000;
/// Longest provisioning delay, start delay and spot notice.
pub const MAX_DELAY: Duration = Duration::from_secs(3600);

/// A scenario as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ScenarioManifest {
    /// `novacron.io/v1`.
    pub api_version: String,
    /// `Scenario`.
    pub kind: String,
    /// Name and labels.
    pub metadata: Metadata,
    /// The trace.
    pub spec: ScenarioSpec,
}

/// The fleet, the trace and the faults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ScenarioSpec {
    /// Seeds every random choice (load noise, failure victims).
    pub seed: u64,
    /// Wall-clock start of the virtual clock, RFC 3339 (cron schedules read it).
    pub start: String,
    /// How long to simulate.
    #[serde(with = "duration")]
    pub duration: Duration,
    /// One tick of the virtual clock: reconcile, schedule and autoscale once.
    #[serde(with = "duration")]
    pub step: Duration,
    /// Node pools.
    pub pools: Vec<PoolSpec>,
    /// Services with a load curve.
    #[serde(default)]
    pub jobs: Vec<ServiceSpec>,
    /// Batch jobs that arrive during the run.
    #[serde(default)]
    pub batches: Vec<BatchSpec>,
    /// Autoscaling policies; each targets a job or a pool of this scenario.
    #[serde(default)]
    pub policies: Vec<PolicyEntry>,
    /// Faults.
    #[serde(default)]
    pub faults: Faults,
}

/// A node pool of the scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PoolSpec {
    /// Name (the `pool` label of its nodes).
    pub name: String,
    /// Its nodes.
    pub template: NodeTemplateSpec,
    /// Fewest nodes.
    pub min_size: u32,
    /// Most nodes.
    pub max_size: u32,
    /// Nodes at the start (default minSize), already running.
    #[serde(default)]
    pub size: Option<u32>,
    /// Zones, filled evenly.
    pub zones: Vec<String>,
    /// From launch to ready.
    #[serde(default = "default_provision_delay", with = "duration")]
    pub provision_delay: Duration,
    /// Nodes kept warm for the autoscaled run (the static run has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<crate::autoscale::pool::WarmSpec>,
    /// Empty nodes kept ready for the autoscaled run (`2` or `"20%"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headroom: Option<crate::autoscale::pool::HeadroomSpec>,
}

/// A service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Name.
    pub name: String,
    /// The pool its replicas run in (required when there are several pools).
    #[serde(default)]
    pub pool: Option<String>,
    /// Replicas at the start (a policy may change them).
    pub replicas: u32,
    /// 0–1000, default 50.
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// What each replica needs.
    pub resources: Resources,
    /// Requests per second one replica serves.
    pub capacity_per_replica: f64,
    /// From placement to serving.
    #[serde(default = "default_start_delay", with = "duration")]
    pub start_delay: Duration,
    /// Spread replicas evenly across zones.
    #[serde(default)]
    pub spread_zones: bool,
    /// The demand over time.
    pub load: LoadCurve,
}

/// Demand in requests/s: `base` times a piecewise-linear multiplier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadCurve {
    /// Requests/s at multiplier 1.
    pub base: f64,
    /// Multipliers at offsets from the start, linear in between.
    pub points: Vec<LoadPoint>,
    /// The points repeat with this period (`24h` for a daily shape).
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub repeat: Option<Duration>,
    /// Random noise, in percent of the demand (uniform, seeded), default 0.
    #[serde(default)]
    pub noise: f64,
}

/// One point of a load curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadPoint {
    /// Offset from the start (or from the start of the period).
    #[serde(with = "duration")]
    pub at: Duration,
    /// Multiplier of `base`.
    pub multiplier: f64,
}

/// A batch job that arrives once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BatchSpec {
    /// Name.
    pub name: String,
    /// Arrival, as an offset from the start.
    #[serde(with = "duration")]
    pub at: Duration,
    /// The pool it runs in (required when there are several pools).
    #[serde(default)]
    pub pool: Option<String>,
    /// Replicas, each run to completion.
    pub replicas: u32,
    /// 0–1000, default 50.
    #[serde(default = "default_priority")]
    pub priority: u32,
    /// What each replica needs.
    pub resources: Resources,
    /// How long one replica runs once started.
    #[serde(with = "duration")]
    pub run_for: Duration,
    /// From placement to running.
    #[serde(default = "default_start_delay", with = "duration")]
    pub start_delay: Duration,
}

/// An autoscaling policy of the scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyEntry {
    /// Name.
    pub name: String,
    /// As in an `AutoScalingPolicy` manifest.
    pub spec: PolicySpec,
}

/// Faults to inject.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Faults {
    /// Random node failures, per node-hour (0.001 = one node in a thousand each
    /// hour).
    #[serde(default)]
    pub node_failure_rate: f64,
    /// Nodes that die at a given time.
    #[serde(default)]
    pub node_failures: Vec<NodeFailure>,
    /// Spot capacity taken back.
    #[serde(default)]
    pub spot_interruptions: Vec<SpotInterruption>,
    /// Zones that go dark.
    #[serde(default)]
    pub zone_outages: Vec<ZoneOutage>,
}

/// `count` random nodes of `pool` die at `at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFailure {
    /// When.
    #[serde(with = "duration")]
    pub at: Duration,
    /// Which pool.
    pub pool: String,
    /// How many nodes (chosen at random).
    pub count: u32,
}

/// A share of a spot pool's nodes is taken back after a notice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpotInterruption {
    /// When the notice comes.
    #[serde(with = "duration")]
    pub at: Duration,
    /// Which (spot) pool.
    pub pool: String,
    /// Percent of its nodes, chosen at random.
    pub percent: f64,
    /// From notice to termination; the nodes take no new work meanwhile.
    #[serde(default = "default_notice", with = "duration")]
    pub notice: Duration,
}

/// A zone loses every node, and takes no new ones, for a while.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneOutage {
    /// The zone.
    pub zone: String,
    /// When.
    #[serde(with = "duration")]
    pub at: Duration,
    /// How long.
    #[serde(with = "duration")]
    pub duration: Duration,
}

/// A scenario that passed every check.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Scenario {
    /// `metadata.name`.
    pub name: String,
    /// The spec as written.
    pub spec: ScenarioSpec,
    /// The start, Unix ms.
    pub start_ms: u64,
    /// The policies, validated.
    pub policies: Vec<AutoScalingPolicy>,
}

impl Scenario {
    /// The same scenario with another seed.
    pub fn with_seed(&self, seed: u64) -> Scenario {
        let mut s = self.clone();
        s.spec.seed = seed;
        s
    }
}

/// Parses a scenario file. `file` is the name errors show.
pub fn parse_scenario(file: &str, text: &str) -> Result<Scenario, ManifestErrors> {
    document::load_one(
        file,
        text,
        &Kind {
            kind: KIND,
            noun: "scenario",
        },
        |m: ScenarioManifest, _: &Value| checked(m),
        |s: &Scenario| &s.name,
    )
}

/// The demand of a curve at `offset` from the start, before noise.
pub fn demand_at(curve: &LoadCurve, offset: Duration) -> f64 {
    let pts = &curve.points;
    let (Some(first), Some(last)) = (pts.first(), pts.last()) else {
        return 0.0;
    };
    let mut t = offset.as_secs_f64();
    if let Some(period) = curve.repeat {
        t %= period.as_secs_f64();
    }
    let at = |p: &LoadPoint| p.at.as_secs_f64();
    let lerp = |t0: f64, m0: f64, t1: f64, m1: f64, t: f64| {
        if t1 <= t0 {
            m1
        } else {
            m0 + (m1 - m0) * (t - t0) / (t1 - t0)
        }
    };
    let m = if t < at(first) {
        match curve.repeat {
            // Wrap around: from the last point of the previous period.
            Some(period) => lerp(
                at(last) - period.as_secs_f64(),
                last.multiplier,
                at(first),
                first.multiplier,
                t,
            ),
            None => first.multiplier,
        }
    } else if t >= at(last) {
        match curve.repeat {
            Some(period) => lerp(
                at(last),
                last.multiplier,
                at(first) + period.as_secs_f64(),
                first.multiplier,
                t,
            ),
            None => last.multiplier,
        }
    } else {
        let i = pts.partition_point(|p| at(p) <= t);
        // 0 < i < len here: t is at or after the first point and before the last.
        let (a, b) = (&pts[i - 1], &pts[i]);
        lerp(at(a), a.multiplier, at(b), b.multiplier, t)
    };
    curve.base * m.max(0.0)
}

fn checked(m: ScenarioManifest) -> Result<Scenario, Vec<Rule>> {
    let mut r = document::envelope(&m.api_version, &m.kind, KIND, &m.metadata, "scenario");
    let s = &m.spec;
    let start_ms = match DateTime::parse_from_rfc3339(s.start.trim()) {
        Ok(t) => u64::try_from(t.timestamp_millis()).ok(),
        Err(_) => None,
    };
    if start_ms.is_none() {
        r.push(Rule::at(
            "spec.start",
            format!(
                "{:?} is not a time; expected an RFC 3339 time from 1970 on, like \
                 2026-11-27T00:00:00Z",
                s.start
            ),
        ));
    }
    if s.duration < Duration::from_secs(60) || s.duration > MAX_DURATION {
        r.push(Rule::at(
            "spec.duration",
            format!(
                "{} is out of range; expected a duration from 1m to 31d",
                human(s.duration)
            ),
        ));
    }
    if s.step < Duration::from_secs(1) || s.step > Duration::from_secs(3600) {
        r.push(Rule::at(
            "spec.step",
            format!(
                "{} is out of range; expected a step from 1s to 1h",
                human(s.step)
            ),
        ));
    } else if s.duration.as_millis() / s.step.as_millis() > u128::from(MAX_STEPS) {
        r.push(Rule::at(
            "spec.step",
            format!(
                "{} makes more than {MAX_STEPS} steps over {}; expected a longer step",
                human(s.step),
                human(s.duration)
            ),
        ));
    }
    let in_run = |r: &mut Vec<Rule>, path: String, at: Duration| {
        if at >= s.duration {
            r.push(Rule::at(
                path,
                format!(
                    "{} is not within the run; expected a time before the duration ({})",
                    human(at),
                    human(s.duration)
                ),
            ));
        }
    };

    // Pools.
    if s.pools.is_empty() {
        r.push(Rule::at(
            "spec.pools",
            "is empty; expected at least one node pool",
        ));
    }
    let mut pools: BTreeMap<&str, &PoolSpec> = BTreeMap::new();
    let mut zones: BTreeSet<&str> = BTreeSet::new();
    for (i, p) in s.pools.iter().enumerate() {
        let pp = format!("spec.pools[{i}]");
        if let Some(msg) = crate::names::problem(&p.name, "pool") {
            r.push(Rule::at(format!("{pp}.name"), msg));
        } else if pools.insert(&p.name, p).is_some() {
            r.push(Rule::at(
                format!("{pp}.name"),
                format!(
                    "{:?} is already the name of another pool; expected a different name for \
                     each pool",
                    p.name
                ),
            ));
        }
        r.extend(pool::check_template(&p.template, &format!("{pp}.template")));
        r.extend(pool::check_sizes(p.min_size, p.max_size, &pp));
        if let Some(size) = p.size
            && (size < p.min_size || size > p.max_size)
        {
            r.push(Rule::at(
                format!("{pp}.size"),
                format!(
                    "{size} is outside minSize..maxSize ({}..{}); expected a size in between",
                    p.min_size, p.max_size
                ),
            ));
        }
        if p.zones.is_empty() {
            r.push(Rule::at(
                format!("{pp}.zones"),
                "is empty; expected at least one zone, like [a, b, c]",
            ));
        }
        r.extend(pool::check_zones(&p.zones, &pp));
        zones.extend(p.zones.iter().map(String::as_str));
        if let Some(Err(e)) = p.headroom.as_ref().map(pool::HeadroomSpec::parse) {
            r.push(Rule::at(format!("{pp}.headroom"), e));
        }
        if let Some(w) = &p.warm {
            r.extend(pool::check_warm(
                w,
                p.max_size,
                &format!("{pp}.warm"),
                Some(&p.template),
            ));
        }
        if p.provision_delay > MAX_DELAY {
            r.push(Rule::at(
                format!("{pp}.provisionDelay"),
                format!(
                    "{} is too long; expected a delay up to 1h",
                    human(p.provision_delay)
                ),
            ));
        }
    }
    let known_pools = || pools.keys().copied().collect::<Vec<_>>().join(", ");
    let pool_of = |r: &mut Vec<Rule>, path: String, name: &Option<String>| -> Option<&PoolSpec> {
        match name {
            Some(n) => {
                let found = pools.get(n.as_str()).copied();
                if found.is_none() {
                    r.push(Rule::at(
                        path,
                        format!(
                            "{n:?} is not a pool of this scenario; expected one of: {}",
                            known_pools()
                        ),
                    ));
                }
                found
            }
            None if s.pools.len() == 1 => s.pools.first(),
            None => {
                r.push(Rule::at(
                    path,
                    format!(
                        "is missing; expected the pool to run in, one of: {}",
                        known_pools()
                    ),
                ));
                None
            }
        }
    };
    let fits = |r: &mut Vec<Rule>, path: String, res: &Resources, p: &PoolSpec| {
        let node = &p.template.resources;
        let gpus = res.gpus.as_ref().map_or(0, |g| g.count);
        let node_gpus = node.gpus.as_ref().map_or(0, |g| g.count);
        if res.cpu > node.cpu || res.memory > node.memory || gpus > node_gpus {
            r.push(Rule::at(
                path.clone(),
                format!(
                    "needs cpu {}, memory {}, {gpus} GPUs, but a node of pool {} offers cpu {}, \
                     memory {}, {node_gpus} GPUs; expected resources that fit on one node",
                    res.cpu, res.memory, p.name, node.cpu, node.memory
                ),
            ));
        }
        if res.cpu.0 == 0 && res.memory.0 == 0 {
            r.push(Rule::at(
                path,
                "asks for nothing; expected cpu and memory, like {cpu: 500m, memory: 1Gi}"
                    .to_string(),
            ));
        }
    };

    // Jobs and batches.
    let mut names: BTreeSet<&str> = BTreeSet::new();
    let unique = |r: &mut Vec<Rule>, names: &BTreeSet<&str>, path: String, name: &str| -> bool {
        if let Some(msg) = crate::names::problem(name, "job") {
            r.push(Rule::at(path, msg));
            false
        } else if names.contains(name) {
            r.push(Rule::at(
                path,
                format!(
                    "{name:?} is already the name of another job or batch; expected a \
                     different name for each"
                ),
            ));
            false
        } else {
            true
        }
    };
    let mut services: BTreeSet<&str> = BTreeSet::new();
    for (i, j) in s.jobs.iter().enumerate() {
        let jp = format!("spec.jobs[{i}]");
        if unique(&mut r, &names, format!("{jp}.name"), &j.name) {
            services.insert(&j.name);
            names.insert(&j.name);
        }
        if let Some(p) = pool_of(&mut r, format!("{jp}.pool"), &j.pool) {
            fits(&mut r, format!("{jp}.resources"), &j.resources, p);
        }
        if j.replicas > MAX_REPLICAS {
            r.push(Rule::at(
                format!("{jp}.replicas"),
                format!(
                    "{} is out of range; expected a whole number from 0 to {MAX_REPLICAS}",
                    j.replicas
                ),
            ));
        }
        r.extend(priority(j.priority, &format!("{jp}.priority")));
        if !(j.capacity_per_replica.is_finite() && j.capacity_per_replica > 0.0) {
            r.push(Rule::at(
                format!("{jp}.capacityPerReplica"),
                format!(
                    "{} is not a capacity; expected the requests/s one replica serves, above \
                     0, like 100",
                    j.capacity_per_replica
                ),
            ));
        }
        if j.start_delay > MAX_DELAY {
            r.push(Rule::at(
                format!("{jp}.startDelay"),
                format!(
                    "{} is too long; expected a delay up to 1h",
                    human(j.start_delay)
                ),
            ));
        }
        r.extend(check_curve(&j.load, &format!("{jp}.load")));
    }
    for (i, b) in s.batches.iter().enumerate() {
        let bp = format!("spec.batches[{i}]");
        if unique(&mut r, &names, format!("{bp}.name"), &b.name) {
            names.insert(&b.name);
        }
        in_run(&mut r, format!("{bp}.at"), b.at);
        if let Some(p) = pool_of(&mut r, format!("{bp}.pool"), &b.pool) {
            fits(&mut r, format!("{bp}.resources"), &b.resources, p);
        }
        if b.replicas == 0 || b.replicas > MAX_REPLICAS {
            r.push(Rule::at(
                format!("{bp}.replicas"),
                format!(
                    "{} is out of range; expected a whole number from 1 to {MAX_REPLICAS}",
                    b.replicas
                ),
            ));
        }
        r.extend(priority(b.priority, &format!("{bp}.priority")));
        if b.run_for.is_zero() || b.run_for > MAX_DURATION {
            r.push(Rule::at(
                format!("{bp}.runFor"),
                format!(
                    "{} is out of range; expected a run time from 1s to 31d",
                    human(b.run_for)
                ),
            ));
        }
        if b.start_delay > MAX_DELAY {
            r.push(Rule::at(
                format!("{bp}.startDelay"),
                format!(
                    "{} is too long; expected a delay up to 1h",
                    human(b.start_delay)
                ),
            ));
        }
    }

    // Policies.
    let mut policies = Vec::new();
    let mut targets: BTreeSet<Target> = BTreeSet::new();
    for (i, p) in s.policies.iter().enumerate() {
        let pp = format!("spec.policies[{i}]");
        if let Some(msg) = crate::names::problem(&p.name, "policy") {
            r.push(Rule::at(format!("{pp}.name"), msg));
        }
        let rules = autoscale::check_spec(&p.spec, &format!("{pp}.spec"), None);
        let valid = rules.is_empty();
        r.extend(rules);
        if let Some(job) = &p.spec.target.job
            && !services.contains(job.as_str())
        {
            r.push(Rule::at(
                format!("{pp}.spec.target.job"),
                format!(
                    "{job:?} is not a service of this scenario; expected one of: {}",
                    services.iter().copied().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        if let Some(name) = &p.spec.target.pool
            && !pools.contains_key(name.as_str())
        {
            r.push(Rule::at(
                format!("{pp}.spec.target.pool"),
                format!(
                    "{name:?} is not a pool of this scenario; expected one of: {}",
                    known_pools()
                ),
            ));
        }
        for (k, m) in p.spec.metrics.iter().enumerate() {
            if m.kind == MetricKind::Queue
                && let Some(name) = &m.metric
                && (name != REQUESTS_METRIC || p.spec.target.pool.is_some())
            {
                r.push(Rule::at(
                    format!("{pp}.spec.metrics[{k}].metric"),
                    format!(
                        "{name:?} is not reported in a simulation; expected {REQUESTS_METRIC} \
                         (a job's demand in requests/s, for a job target) or no metric \
                         (pending allocations)"
                    ),
                ));
            }
            if m.kind == MetricKind::Gpu && p.spec.target.job.is_some() {
                r.push(Rule::at(
                    format!("{pp}.spec.metrics[{k}].type"),
                    "gpu is measured per pool in a simulation; expected cpu, memory or queue \
                     for a job target",
                ));
            }
        }
        if valid {
            match AutoScalingPolicy::from_spec(&p.name, p.spec.clone()) {
                Ok(policy) => {
                    if !targets.insert(policy.target.clone()) {
                        r.push(Rule::at(
                            format!("{pp}.spec.target"),
                            format!(
                                "{} already has a policy; expected one policy per target",
                                policy.target
                            ),
                        ));
                    }
                    policies.push(policy);
                }
                Err(problems) => {
                    for pr in problems {
                        r.push(Rule::at(pp.clone(), pr));
                    }
                }
            }
        }
    }

    // Faults.
    let f = &s.faults;
    if !(f.node_failure_rate.is_finite() && (0.0..=1.0).contains(&f.node_failure_rate)) {
        r.push(Rule::at(
            "spec.faults.nodeFailureRate",
            format!(
                "{} is out of range; expected failures per node-hour from 0 to 1, like 0.001",
                f.node_failure_rate
            ),
        ));
    }
    for (i, nf) in f.node_failures.iter().enumerate() {
        let fp = format!("spec.faults.nodeFailures[{i}]");
        in_run(&mut r, format!("{fp}.at"), nf.at);
        pool_of(&mut r, format!("{fp}.pool"), &Some(nf.pool.clone()));
        if nf.count == 0 {
            r.push(Rule::at(
                format!("{fp}.count"),
                "0 fails nothing; expected a whole number of at least 1",
            ));
        }
    }
    for (i, si) in f.spot_interruptions.iter().enumerate() {
        let fp = format!("spec.faults.spotInterruptions[{i}]");
        in_run(&mut r, format!("{fp}.at"), si.at);
        if let Some(p) = pool_of(&mut r, format!("{fp}.pool"), &Some(si.pool.clone()))
            && p.template.capacity_type != CapacityType::Spot
        {
            r.push(Rule::at(
                format!("{fp}.pool"),
                format!(
                    "{:?} is an on-demand pool; expected a pool with capacityType: spot",
                    p.name
                ),
            ));
        }
        if !(si.percent.is_finite() && si.percent > 0.0 && si.percent <= 100.0) {
            r.push(Rule::at(
                format!("{fp}.percent"),
                format!(
                    "{} is out of range; expected a percentage of the pool's nodes above 0 and \
                     up to 100",
                    si.percent
                ),
            ));
        }
        if si.notice > MAX_DELAY {
            r.push(Rule::at(
                format!("{fp}.notice"),
                format!(
                    "{} is too long; expected a notice up to 1h",
                    human(si.notice)
                ),
            ));
        }
    }
    for (i, z) in f.zone_outages.iter().enumerate() {
        let fp = format!("spec.faults.zoneOutages[{i}]");
        if !zones.contains(z.zone.as_str()) {
            r.push(Rule::at(
                format!("{fp}.zone"),
                format!(
                    "{:?} is no pool's zone; expected one of: {}",
                    z.zone,
                    zones.iter().copied().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        in_run(&mut r, format!("{fp}.at"), z.at);
        if z.duration.is_zero() {
            r.push(Rule::at(
                format!("{fp}.duration"),
                "0s is no outage; expected a duration like 2h",
            ));
        }
    }

    match start_ms {
        Some(start_ms) if r.is_empty() => Ok(Scenario {
            name: m.metadata.name,
            spec: m.spec,
            start_ms,
            policies,
        }),
        _ => Err(r),
    }
}

fn priority(p: u32, path: &str) -> Vec<Rule> {
    if p > crate::manifest::MAX_PRIORITY {
        vec![Rule::at(
            path,
            format!("{p} is out of range; expected a whole number from 0 to 1000"),
        )]
    } else {
        Vec::new()
    }
}

fn check_curve(c: &LoadCurve, prefix: &str) -> Vec<Rule> {
    let mut r = Vec::new();
    if !(c.base.is_finite() && c.base >= 0.0) {
        r.push(Rule::at(
            format!("{prefix}.base"),
            format!(
                "{} is not a demand; expected requests/s of 0 or more, like 500",
                c.base
            ),
        ));
    }
    if !(c.noise.is_finite() && (0.0..=100.0).contains(&c.noise)) {
        r.push(Rule::at(
            format!("{prefix}.noise"),
            format!(
                "{} is out of range; expected a percentage from 0 to 100",
                c.noise
            ),
        ));
    }
    if c.points.is_empty() {
        r.push(Rule::at(
            format!("{prefix}.points"),
            "is empty; expected at least one point, like [{at: 0s, multiplier: 1}]",
        ));
    }
    for (i, p) in c.points.iter().enumerate() {
        if !(p.multiplier.is_finite() && p.multiplier >= 0.0) {
            r.push(Rule::at(
                format!("{prefix}.points[{i}].multiplier"),
                format!(
                    "{} is not a multiplier; expected a number of 0 or more, like 5",
                    p.multiplier
                ),
            ));
        }
        if let Some(prev) = i.checked_sub(1).and_then(|k| c.points.get(k))
            && p.at <= prev.at
        {
            r.push(Rule::at(
                format!("{prefix}.points[{i}].at"),
                format!(
                    "{} is not after the previous point ({}); expected points in time order",
                    human(p.at),
                    human(prev.at)
                ),
            ));
        }
        if let Some(period) = c.repeat
            && p.at >= period
        {
            r.push(Rule::at(
                format!("{prefix}.points[{i}].at"),
                format!(
                    "{} is not within the repeat period ({}); expected offsets below it",
                    human(p.at),
                    human(period)
                ),
            ));
        }
    }
    if c.repeat.is_some_and(|p| p.is_zero()) {
        r.push(Rule::at(
            format!("{prefix}.repeat"),
            "0s never advances; expected a period like 24h, or no repeat",
        ));
    }
    r
}

fn default_priority() -> u32 {
    50
}
fn default_provision_delay() -> Duration {
    Duration::from_secs(90)
}
fn default_start_delay() -> Duration {
    Duration::from_secs(20)
}
fn default_notice() -> Duration {
    Duration::from_secs(120)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curve(points: &[(u64, f64)], repeat: Option<u64>) -> LoadCurve {
        LoadCurve {
            base: 100.0,
            points: points
                .iter()
                .map(|&(h, m)| LoadPoint {
                    at: Duration::from_secs(h * 3600),
                    multiplier: m,
                })
                .collect(),
            repeat: repeat.map(|h| Duration::from_secs(h * 3600)),
            noise: 0.0,
        }
    }

    #[test]
    fn curves_interpolate_and_repeat() {
        let h = |x: f64| Duration::from_secs_f64(x * 3600.0);
        let c = curve(&[(8, 1.0), (9, 5.0), (20, 5.0), (21, 1.0)], Some(24));
        assert_eq!(demand_at(&c, h(8.5)), 300.0);
        assert_eq!(demand_at(&c, h(12.0)), 500.0);
        assert_eq!(demand_at(&c, h(3.0)), 100.0, "night, wrapping around");
        assert_eq!(demand_at(&c, h(24.0 + 8.5)), 300.0, "the next day");
        let once = curve(&[(1, 2.0), (2, 4.0)], None);
        assert_eq!(demand_at(&once, h(0.0)), 200.0);
        assert_eq!(demand_at(&once, h(5.0)), 400.0);
    }
}

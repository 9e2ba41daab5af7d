//! Cost: a pricing catalog, the hourly price of a node, the attribution of node
//! cost to the jobs running on it, and right-sizing recommendations from observed
//! usage. Pure: prices, usage samples and capacities come in as values.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use novacron_wire::Capacity;

use crate::autoscale::pool::CapacityType;

/// The node label that states a node's own hourly price (set by node pools).
pub const PRICE_LABEL: &str = "price_per_hour";
/// The node label naming the instance type looked up in the catalog.
pub const INSTANCE_TYPE_LABEL: &str = "instance_type";
/// The node label `capacity=spot|on-demand`.
pub const CAPACITY_LABEL: &str = "capacity";
/// The job label (manifest `metadata.labels`) naming its workload class.
pub const CLASS_LABEL: &str = "class";
/// How far a class's actual spot share may stray from its target before it is
/// off target.
pub const MIX_TOLERANCE: f64 = 0.2;

/// The pricing catalog (`<data dir>/pricing.toml` on the controller).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceCatalog {
    /// The currency of every price, budget and cost (an ISO 4217 code such as
    /// `USD` or `EUR`); shown with every cost.
    #[serde(default = "default_currency")]
    pub currency: String,
    /// Hourly on-demand price by instance type.
    #[serde(default)]
    pub instance_types: BTreeMap<String, f64>,
    /// Price of a node with no known type: per core-hour…
    #[serde(default = "default_core_hour")]
    pub per_core_hour: f64,
    /// …plus per GiB-hour of memory.
    #[serde(default = "default_gib_hour")]
    pub per_gib_hour: f64,
    /// Spot price as a fraction of on-demand (0.3 = 70% cheaper).
    #[serde(default = "default_spot_fraction")]
    pub spot_fraction: f64,
    /// Hourly budgets (`[budgets]`).
    #[serde(default)]
    pub budgets: Budgets,
    /// Spot share targets by workload class (`[mix]`, e.g. `web = { spot = 0.7 }`).
    #[serde(default)]
    pub mix: BTreeMap<String, MixTarget>,
}

/// Hourly budgets: of the whole fleet, per pool and per job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budgets {
    /// The whole fleet, per hour.
    #[serde(default)]
    pub fleet_per_hour: Option<f64>,
    /// Per pool (the node label `pool`), per hour.
    #[serde(default)]
    pub pools: BTreeMap<String, f64>,
    /// Per job, per hour.
    #[serde(default)]
    pub jobs: BTreeMap<String, f64>,
}

/// The spot / on-demand mix a workload class aims at.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixTarget {
    /// The share (0 to 1) of the class's replicas to run on `capacity=spot` nodes.
    pub spot: f64,
}

/// Default per core-hour (about a general-purpose cloud VM).
pub const DEFAULT_CORE_HOUR: f64 = 0.04;
/// Default per GiB-hour.
pub const DEFAULT_GIB_HOUR: f64 = 0.005;
/// Default spot fraction.
pub const DEFAULT_SPOT_FRACTION: f64 = 0.3;
/// Default currency of the prices.
pub const DEFAULT_CURRENCY: &str = "USD";

fn default_currency() -> String {
    DEFAULT_CURRENCY.to_owned()
}

fn default_core_hour() -> f64 {
    DEFAULT_CORE_HOUR
}
fn default_gib_hour() -> f64 {
    DEFAULT_GIB_HOUR
}
fn default_spot_fraction() -> f64 {
    DEFAULT_SPOT_FRACTION
}

impl Default for PriceCatalog {
    fn default() -> Self {
        PriceCatalog {
            currency: default_currency(),
            instance_types: BTreeMap::new(),
            per_core_hour: DEFAULT_CORE_HOUR,
            per_gib_hour: DEFAULT_GIB_HOUR,
            spot_fraction: DEFAULT_SPOT_FRACTION,
            budgets: Budgets::default(),
            mix: BTreeMap::new(),
        }
    }
}

impl PriceCatalog {
    /// Parses and checks a catalog; the message names the file, the key, the value
    /// and what is accepted.
    pub fn parse(file: &str, text: &str) -> Result<PriceCatalog, String> {
        let c: PriceCatalog = toml::from_str(text).map_err(|e| format!("{file}: {e}"))?;
        if !(c.currency.len() == 3 && c.currency.bytes().all(|b| b.is_ascii_uppercase())) {
            return Err(format!(
                "{file}: `currency` = {:?} is not accepted; expected an ISO 4217 code of three capital letters, such as \"USD\" or \"EUR\"",
                c.currency
            ));
        }
        let bad = |key: &str, v: f64, want: &str| {
            format!("{file}: `{key}` = {v} is not accepted; expected {want}")
        };
        for (t, p) in &c.instance_types {
            if !p.is_finite() || *p < 0.0 {
                return Err(bad(
                    &format!("instance_types.{t}"),
                    *p,
                    "a price of 0 or more",
                ));
            }
        }
        for (key, v) in [
            ("per_core_hour", c.per_core_hour),
            ("per_gib_hour", c.per_gib_hour),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(bad(key, v, "a price of 0 or more"));
            }
        }
        if !(c.spot_fraction > 0.0 && c.spot_fraction <= 1.0) {
            return Err(bad(
                "spot_fraction",
                c.spot_fraction,
                "a fraction above 0 and at most 1",
            ));
        }
        let budget = |key: String, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(bad(&key, v, "an hourly budget above 0"))
            }
        };
        if let Some(v) = c.budgets.fleet_per_hour {
            budget("budgets.fleet_per_hour".into(), v)?;
        }
        for (scope, map) in [("pools", &c.budgets.pools), ("jobs", &c.budgets.jobs)] {
            for (name, v) in map {
                budget(format!("budgets.{scope}.{name}"), *v)?;
            }
        }
        for (class, t) in &c.mix {
            if !(t.spot.is_finite() && (0.0..=1.0).contains(&t.spot)) {
                return Err(bad(
                    &format!("mix.{class}.spot"),
                    t.spot,
                    "a share from 0 to 1",
                ));
            }
        }
        Ok(c)
    }

    /// A node's hourly price and where it came from: its own `price_per_hour`
    /// label, else its instance type in the catalog, else cores and memory at the
    /// catalog's rates; spot nodes (`capacity=spot`) at `spot_fraction` unless the
    /// node states its own price.
    pub fn node_hourly(&self, labels: &BTreeMap<String, String>, capacity: &Capacity) -> NodePrice {
        if let Some(p) = labels
            .get(PRICE_LABEL)
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|p| p.is_finite() && *p >= 0.0)
        {
            return NodePrice {
                hourly: p,
                source: format!("label {PRICE_LABEL}"),
            };
        }
        let spot = labels.get(CAPACITY_LABEL).is_some_and(|c| c == "spot");
        let (on_demand, source) = match labels
            .get(INSTANCE_TYPE_LABEL)
            .and_then(|t| self.instance_types.get(t).map(|p| (t, *p)))
        {
            Some((t, p)) => (p, format!("catalog {t}")),
            None => {
                let cores = capacity.cpu_millis as f64 / 1000.0;
                let gib = capacity.memory_bytes as f64 / GIB;
                (
                    cores * self.per_core_hour + gib * self.per_gib_hour,
                    format!("{cores:.1} cores + {gib:.1} GiB at catalog rates"),
                )
            }
        };
        if spot {
            NodePrice {
                hourly: on_demand * self.spot_fraction,
                source: format!("{source}, spot"),
            }
        } else {
            NodePrice {
                hourly: on_demand,
                source,
            }
        }
    }
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// A node's hourly price.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodePrice {
    /// Per hour.
    pub hourly: f64,
    /// Why this price.
    pub source: String,
}

/// The share of a node's price an allocation carries: the larger of its CPU and
/// memory shares of the node (what it keeps others from using).
pub fn allocation_share(cpu_millis: u64, memory_bytes: u64, node: &Capacity) -> f64 {
    let share = |part: u64, whole: u64| {
        if whole == 0 {
            0.0
        } else {
            (part as f64 / whole as f64).min(1.0)
        }
    };
    share(cpu_millis, node.cpu_millis).max(share(memory_bytes, node.memory_bytes))
}

/// One hourly budget and how the cost stands against it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BudgetStatus {
    /// `fleet`, `pool` or `job`.
    pub scope: String,
    /// The pool or job (`fleet` for the fleet).
    pub name: String,
    /// The cost now, per hour.
    pub hourly: f64,
    /// The budget, per hour.
    pub budget: f64,
    /// The cost is over the budget.
    pub exceeded: bool,
    /// By how much, per hour (0 when within).
    pub over: f64,
    /// What, for people.
    pub message: String,
}

impl BudgetStatus {
    /// `fleet`, `pool web`, `job api`: what the budget is of.
    pub fn subject(&self) -> String {
        if self.scope == "fleet" {
            "fleet".into()
        } else {
            format!("{} {}", self.scope, self.name)
        }
    }
}

/// Every configured budget against the hourly costs of the fleet, its pools and
/// its jobs (a pool or job with no cost costs 0).
pub fn budget_status(
    budgets: &Budgets,
    fleet_hourly: f64,
    pools: &BTreeMap<String, f64>,
    jobs: &BTreeMap<String, f64>,
    currency: &str,
) -> Vec<BudgetStatus> {
    let status = |scope: &str, name: &str, hourly: f64, budget: f64| {
        let exceeded = hourly > budget;
        let subject = if scope == "fleet" {
            "fleet".to_string()
        } else {
            format!("{scope} {name}")
        };
        let message = if exceeded {
            format!(
                "{subject} costs {hourly:.2} {currency}/h, over its budget of {budget:.2} {currency}/h by {:.2} {currency}/h",
                hourly - budget
            )
        } else {
            format!(
                "{subject} costs {hourly:.2} {currency}/h, within its budget of {budget:.2} {currency}/h"
            )
        };
        BudgetStatus {
            scope: scope.into(),
            name: name.into(),
            hourly,
            budget,
            exceeded,
            over: if exceeded { hourly - budget } else { 0.0 },
            message,
        }
    };
    let mut out = Vec::new();
    if let Some(b) = budgets.fleet_per_hour {
        out.push(status("fleet", "fleet", fleet_hourly, b));
    }
    for (scope, map, costs) in [
        ("pool", &budgets.pools, pools),
        ("job", &budgets.jobs, jobs),
    ] {
        for (name, b) in map {
            out.push(status(
                scope,
                name,
                costs.get(name).copied().unwrap_or(0.0),
                *b,
            ));
        }
    }
    out
}

/// The budgets exceeded, with by how much ([`budget_status`] of those over).
pub fn budget_alerts(
    budgets: &Budgets,
    fleet_hourly: f64,
    pools: &BTreeMap<String, f64>,
    jobs: &BTreeMap<String, f64>,
    currency: &str,
) -> Vec<BudgetStatus> {
    budget_status(budgets, fleet_hourly, pools, jobs, currency)
        .into_iter()
        .filter(|b| b.exceeded)
        .collect()
}

/// A workload class's actual spot share against its target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MixStatus {
    /// The class (the job label `class`).
    pub class: String,
    /// The target share of its replicas on spot nodes.
    pub target_spot: f64,
    /// The share now (0 with no replicas).
    pub actual_spot: f64,
    /// Replicas of the class running.
    pub replicas: u32,
    /// Of which on `capacity=spot` nodes.
    pub spot_replicas: u32,
    /// Replicas run and the share strays more than [`MIX_TOLERANCE`] from the target.
    pub off_target: bool,
    /// What, for people.
    pub message: String,
}

/// Each targeted class's mix from its running replicas, given as (class, on a
/// spot node); classes with no target are left out.
pub fn mix_status(
    targets: &BTreeMap<String, MixTarget>,
    replicas: &[(String, bool)],
) -> Vec<MixStatus> {
    targets
        .iter()
        .map(|(class, t)| {
            let mine = replicas.iter().filter(|(c, _)| c == class);
            let total = mine.clone().count() as u32;
            let spot = mine.filter(|(_, s)| *s).count() as u32;
            let actual = if total == 0 {
                0.0
            } else {
                f64::from(spot) / f64::from(total)
            };
            let off_target = total > 0 && (actual - t.spot).abs() > MIX_TOLERANCE + 1e-9;
            let message = if total == 0 {
                format!("class {class} runs no replicas (target {:.0}% spot)", t.spot * 100.0)
            } else {
                format!(
                    "class {class} runs {spot} of {total} replicas on spot ({:.0}%), target {:.0}%{}",
                    actual * 100.0,
                    t.spot * 100.0,
                    if off_target { ", off target" } else { "" }
                )
            };
            MixStatus {
                class: class.clone(),
                target_spot: t.spot,
                actual_spot: actual,
                replicas: total,
                spot_replicas: spot,
                off_target,
                message,
            }
        })
        .collect()
}

/// The capacity a class's next node should have to move its mix toward the
/// target, with the status line that says why: spot while its share is below the
/// target, on-demand while above; `None` on target (or with nothing running and a
/// target of exactly one half).
pub fn mix_preference(status: &MixStatus) -> Option<(CapacityType, String)> {
    let (actual, target) = if status.replicas == 0 {
        // Nothing runs yet: the first replicas go where most of them should.
        (0.5, status.target_spot)
    } else {
        (status.actual_spot, status.target_spot)
    };
    if (actual - target).abs() < 1e-9 {
        None
    } else if actual < target {
        Some((CapacityType::Spot, status.message.clone()))
    } else {
        Some((CapacityType::OnDemand, status.message.clone()))
    }
}

/// Right-sizing settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RightsizeConfig {
    /// Samples needed before recommending anything.
    pub min_samples: usize,
    /// Headroom over the p95 (0.2 = 20%).
    pub headroom: f64,
    /// A job whose p95 CPU is below this fraction of its request is idle.
    pub idle_fraction: f64,
}

impl Default for RightsizeConfig {
    fn default() -> Self {
        RightsizeConfig {
            min_samples: 30,
            headroom: 0.2,
            idle_fraction: 0.05,
        }
    }
}

/// The smallest CPU request recommended, millicores.
pub const MIN_CPU_MILLIS: u64 = 10;
/// The smallest memory request recommended.
pub const MIN_MEMORY_BYTES: u64 = 16 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

/// A right-sizing recommendation for one job's per-replica requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Rightsize {
    /// Samples the percentiles cover (replica-seconds).
    pub samples: usize,
    /// Requested CPU per replica, millicores.
    pub requested_cpu_millis: u64,
    /// Requested memory per replica.
    pub requested_memory_bytes: u64,
    /// 95th percentile of CPU use, millicores.
    pub p95_cpu_millis: u64,
    /// 95th percentile of memory use.
    pub p95_memory_bytes: u64,
    /// Recommended CPU request.
    pub recommended_cpu_millis: u64,
    /// Recommended memory request.
    pub recommended_memory_bytes: u64,
    /// p95 CPU below the idle fraction of the request.
    pub idle: bool,
    /// What and why, for people.
    pub explanation: String,
}

/// The `p`-th percentile (0..=100) by nearest rank; `None` when empty.
pub fn percentile<T: Copy + PartialOrd>(values: &[T], p: f64) -> Option<T> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v.get(rank.clamp(1, v.len()) - 1).copied()
}

/// Recommends per-replica requests from usage samples (CPU in millicores, memory
/// in bytes, one per replica per sample time); `None` with fewer than
/// `config.min_samples`.
pub fn rightsize(
    requested_cpu_millis: u64,
    requested_memory_bytes: u64,
    cpu_millis: &[f64],
    memory_bytes: &[u64],
    config: &RightsizeConfig,
) -> Option<Rightsize> {
    let samples = cpu_millis.len().min(memory_bytes.len());
    if samples < config.min_samples.max(1) {
        return None;
    }
    let cpu: Vec<f64> = cpu_millis
        .iter()
        .copied()
        .filter(|c| c.is_finite() && *c >= 0.0)
        .collect();
    let p95_cpu = percentile(&cpu, 95.0)?.ceil() as u64;
    let p95_mem = percentile(memory_bytes, 95.0)?;
    let grow = 1.0 + config.headroom.max(0.0);
    let rec_cpu = round_up((p95_cpu as f64 * grow).ceil() as u64, 10).max(MIN_CPU_MILLIS);
    let rec_mem = round_up((p95_mem as f64 * grow).ceil() as u64, MIB).max(MIN_MEMORY_BYTES);
    let idle = (p95_cpu as f64) < config.idle_fraction * requested_cpu_millis as f64;
    let mut explanation = format!(
        "cpu p95 {p95_cpu}m of {requested_cpu_millis}m requested → {rec_cpu}m; memory p95 {}Mi of {}Mi → {}Mi",
        p95_mem / MIB,
        requested_memory_bytes / MIB,
        rec_mem / MIB
    );
    if idle {
        explanation.push_str(&format!(
            "; idle (p95 CPU under {:.0}% of its request)",
            config.idle_fraction * 100.0
        ));
    }
    Some(Rightsize {
        samples,
        requested_cpu_millis,
        requested_memory_bytes,
        p95_cpu_millis: p95_cpu,
        p95_memory_bytes: p95_mem,
        recommended_cpu_millis: rec_cpu,
        recommended_memory_bytes: rec_mem,
        idle,
        explanation,
    })
}

/// Bounds on applying a right-sizing automatically.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ApplyBounds {
    /// The most one change moves a request, as a fraction of it (0.5: half).
    pub max_step: f64,
    /// Never below the observed p99 times `1 + margin`.
    pub margin: f64,
    /// Changes smaller than this fraction of the request are not worth a rollout.
    pub min_change: f64,
}

impl Default for ApplyBounds {
    fn default() -> Self {
        ApplyBounds {
            max_step: 0.5,
            margin: 0.2,
            min_change: 0.1,
        }
    }
}

/// New per-replica requests to roll out from a recommendation, within `bounds`
/// (pure): each request moves toward `recommended`, at most `max_step` of itself,
/// never below the samples' p99 plus the margin; `None` when neither moves by
/// `min_change` or more. Also says why, for the event.
pub fn bounded_rightsize(
    r: &Rightsize,
    cpu_millis: &[f64],
    memory_bytes: &[u64],
    bounds: &ApplyBounds,
) -> Option<(u64, u64, String)> {
    let cpu: Vec<f64> = cpu_millis
        .iter()
        .copied()
        .filter(|c| c.is_finite() && *c >= 0.0)
        .collect();
    let p99_cpu = percentile(&cpu, 99.0)?;
    let p99_mem = percentile(memory_bytes, 99.0)? as f64;
    let step = |now: u64, want: u64, p99: f64, unit: u64, least: u64| -> u64 {
        let now_f = now as f64;
        let lo = (now_f * (1.0 - bounds.max_step)).max(p99 * (1.0 + bounds.margin));
        let hi = now_f * (1.0 + bounds.max_step);
        let v = (want as f64).clamp(lo.min(hi), hi);
        round_up(v.ceil() as u64, unit).max(least)
    };
    let new_cpu = step(
        r.requested_cpu_millis,
        r.recommended_cpu_millis,
        p99_cpu,
        10,
        MIN_CPU_MILLIS,
    );
    let new_mem = step(
        r.requested_memory_bytes,
        r.recommended_memory_bytes,
        p99_mem,
        MIB,
        MIN_MEMORY_BYTES,
    );
    let moved = |now: u64, new: u64| {
        now > 0 && (new as f64 - now as f64).abs() >= bounds.min_change * now as f64
    };
    if !moved(r.requested_cpu_millis, new_cpu) && !moved(r.requested_memory_bytes, new_mem) {
        return None;
    }
    let why = format!(
        "cpu {}m → {new_cpu}m (p95 {}m, p99 {:.0}m), memory {}Mi → {}Mi (p95 {}Mi, p99 {}Mi); \
         at most {:.0}% a change, never under p99 plus {:.0}%",
        r.requested_cpu_millis,
        r.p95_cpu_millis,
        p99_cpu,
        r.requested_memory_bytes / MIB,
        new_mem / MIB,
        r.p95_memory_bytes / MIB,
        (p99_mem / MIB as f64).ceil(),
        bounds.max_step * 100.0,
        bounds.margin * 100.0
    );
    Some((new_cpu, new_mem, why))
}

/// Whether a job stayed idle over a whole period: its replicas' CPU use (`(Unix
/// ms, millicores)` samples, one per replica per sample time) in `(since_ms,
/// now_ms]`, against what one replica requests.
#[derive(Debug, Clone, PartialEq)]
pub enum IdleVerdict {
    /// Its p95 CPU stayed under `fraction` of its request for the whole period.
    Idle {
        /// p95 CPU, millicores.
        p95_cpu_millis: u64,
        /// What and why, for people.
        explanation: String,
    },
    /// It used more.
    Busy,
    /// The samples do not cover the period yet (it started, or the history was
    /// off, within it).
    TooShort,
}

/// Judges idleness (pure): idle when the samples reach back to within a tenth of
/// the period (at least 3 s) of its start, there are at least three, and their
/// p95 is under `fraction` of `requested_cpu_millis`.
pub fn idle_verdict(
    requested_cpu_millis: u64,
    samples: &[(u64, f64)],
    since_ms: u64,
    now_ms: u64,
    fraction: f64,
) -> IdleVerdict {
    let inside: Vec<(u64, f64)> = samples
        .iter()
        .copied()
        .filter(|(at, c)| *at > since_ms && *at <= now_ms && c.is_finite() && *c >= 0.0)
        .collect();
    let slack = (now_ms.saturating_sub(since_ms) / 10).max(3_000);
    let earliest = inside.iter().map(|(at, _)| *at).min();
    if inside.len() < 3 || earliest.is_none_or(|e| e > since_ms.saturating_add(slack)) {
        return IdleVerdict::TooShort;
    }
    let cpu: Vec<f64> = inside.iter().map(|(_, c)| *c).collect();
    let Some(p95) = percentile(&cpu, 95.0) else {
        return IdleVerdict::TooShort;
    };
    if p95 < fraction * requested_cpu_millis as f64 {
        let p95_cpu_millis = p95.ceil() as u64;
        IdleVerdict::Idle {
            p95_cpu_millis,
            explanation: format!(
                "cpu p95 {p95_cpu_millis}m of {requested_cpu_millis}m requested over {}, under \
                 {:.0}% of its request",
                crate::units::duration(std::time::Duration::from_millis(
                    now_ms.saturating_sub(since_ms)
                )),
                fraction * 100.0
            ),
        }
    } else {
        IdleVerdict::Busy
    }
}

fn round_up(v: u64, unit: u64) -> u64 {
    v.div_ceil(unit).saturating_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(cores: u64, gib: u64) -> Capacity {
        Capacity {
            cpu_millis: cores * 1000,
            memory_bytes: gib * 1024 * MIB,
            ..Capacity::default()
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn node_price_prefers_label_then_catalog_then_rates() {
        let mut c = PriceCatalog::default();
        c.instance_types.insert("m5.large".into(), 0.096);
        let own = c.node_hourly(&labels(&[(PRICE_LABEL, "0.5")]), &cap(2, 8));
        assert_eq!(own.hourly, 0.5);
        let typed = c.node_hourly(&labels(&[(INSTANCE_TYPE_LABEL, "m5.large")]), &cap(2, 8));
        assert_eq!(typed.hourly, 0.096);
        let spot = c.node_hourly(
            &labels(&[(INSTANCE_TYPE_LABEL, "m5.large"), (CAPACITY_LABEL, "spot")]),
            &cap(2, 8),
        );
        assert!((spot.hourly - 0.096 * DEFAULT_SPOT_FRACTION).abs() < 1e-12);
        let rated = c.node_hourly(&labels(&[]), &cap(4, 16));
        assert!((rated.hourly - (4.0 * DEFAULT_CORE_HOUR + 16.0 * DEFAULT_GIB_HOUR)).abs() < 1e-12);
        assert!(rated.source.contains("catalog rates"), "{}", rated.source);
    }

    #[test]
    fn the_catalog_names_its_currency() {
        assert_eq!(PriceCatalog::default().currency, "USD");
        assert_eq!(
            PriceCatalog::parse("p.toml", "").expect("empty").currency,
            "USD"
        );
        let eur = PriceCatalog::parse("p.toml", "currency = \"EUR\"\n").expect("EUR");
        assert_eq!(eur.currency, "EUR");
        for bad in ["eur", "EURO", "$", ""] {
            let err = PriceCatalog::parse("p.toml", &format!("currency = {bad:?}\n"))
                .expect_err("not a currency code");
            assert!(
                err.contains("p.toml") && err.contains("`currency`") && err.contains("ISO 4217"),
                "{err}"
            );
        }
    }

    #[test]
    fn catalog_errors_name_the_key_value_and_range() {
        let err = PriceCatalog::parse("p.toml", "spot_fraction = 0\n").expect_err("zero");
        assert!(
            err.contains("p.toml") && err.contains("spot_fraction") && err.contains("above 0"),
            "{err}"
        );
        let err =
            PriceCatalog::parse("p.toml", "[instance_types]\nbig = -1.0\n").expect_err("negative");
        assert!(
            err.contains("instance_types.big") && err.contains("-1"),
            "{err}"
        );
        let err = PriceCatalog::parse("p.toml", "per_core = 1\n").expect_err("unknown key");
        assert!(err.contains("per_core"), "{err}");
    }

    #[test]
    fn applied_right_sizing_moves_at_most_a_step_and_never_under_p99() {
        // 1000m requested, using about 100m with a p99 of 300m.
        let mut cpu: Vec<f64> = vec![100.0; 98];
        cpu.extend([300.0, 300.0]);
        let mem: Vec<u64> = vec![64 * MIB; 100];
        let r = rightsize(1000, 512 * MIB, &cpu, &mem, &RightsizeConfig::default()).expect("r");
        assert_eq!(r.recommended_cpu_millis, 120);
        let (new_cpu, new_mem, why) =
            bounded_rightsize(&r, &cpu, &mem, &ApplyBounds::default()).expect("a change");
        // Half at most: 1000m → 500m (not 120m); memory 512Mi → 256Mi.
        assert_eq!((new_cpu, new_mem), (500, 256 * MIB), "{why}");
        assert!(
            why.starts_with("cpu 1000m → 500m (p95 100m, p99 300m)"),
            "{why}"
        );
        // From 500m: the p99 plus 20% (360m) stops it above the 120m asked.
        let mut r2 = r.clone();
        r2.requested_cpu_millis = 500;
        r2.requested_memory_bytes = 80 * MIB;
        let (c2, _, _) = bounded_rightsize(&r2, &cpu, &mem, &ApplyBounds::default()).expect("c");
        assert_eq!(c2, 360);
        // Close enough already: no rollout.
        let mut r3 = r.clone();
        r3.requested_cpu_millis = 365;
        r3.requested_memory_bytes = 77 * MIB;
        assert_eq!(
            bounded_rightsize(&r3, &cpu, &mem, &ApplyBounds::default()),
            None
        );
    }

    #[test]
    fn idleness_needs_the_whole_period_and_a_low_p95() {
        let quiet: Vec<(u64, f64)> = (1..=60).map(|s| (s * 1000, 2.0)).collect();
        match idle_verdict(500, &quiet, 0, 60_000, 0.05) {
            IdleVerdict::Idle {
                p95_cpu_millis,
                explanation,
            } => {
                assert_eq!(p95_cpu_millis, 2);
                assert_eq!(
                    explanation,
                    "cpu p95 2m of 500m requested over 1m, under 5% of its request"
                );
            }
            other => panic!("{other:?}"),
        }
        let mut spiky = quiet.clone();
        for s in spiky.iter_mut().step_by(10) {
            s.1 = 400.0;
        }
        assert_eq!(
            idle_verdict(500, &spiky, 0, 60_000, 0.05),
            IdleVerdict::Busy
        );
        // Samples only from the last 20 s of a minute: too short to say.
        assert_eq!(
            idle_verdict(500, &quiet[40..], 0, 60_000, 0.05),
            IdleVerdict::TooShort
        );
        assert_eq!(
            idle_verdict(500, &[], 0, 60_000, 0.05),
            IdleVerdict::TooShort
        );
    }

    #[test]
    fn the_mix_steers_toward_its_target() {
        let targets = BTreeMap::from([("web".to_string(), MixTarget { spot: 0.7 })]);
        let low = mix_status(&targets, &[("web".into(), true), ("web".into(), false)]);
        let (cap, why) = mix_preference(&low[0]).expect("below target");
        assert_eq!(cap, CapacityType::Spot);
        assert_eq!(
            why,
            "class web runs 1 of 2 replicas on spot (50%), target 70%"
        );
        let high = mix_status(&targets, &[("web".into(), true)]);
        assert_eq!(
            mix_preference(&high[0]).map(|p| p.0),
            Some(CapacityType::OnDemand)
        );
        let none = mix_status(&targets, &[]);
        assert_eq!(
            mix_preference(&none[0]).map(|p| p.0),
            Some(CapacityType::Spot)
        );
        let even = BTreeMap::from([("web".to_string(), MixTarget { spot: 0.5 })]);
        let on = mix_status(&even, &[("web".into(), true), ("web".into(), false)]);
        assert_eq!(mix_preference(&on[0]), None);
    }

    #[test]
    fn budgets_and_mix_parse_and_errors_name_the_key() {
        let c = PriceCatalog::parse(
            "p.toml",
            "[budgets]\nfleet_per_hour = 10.0\npools = { web = 3.0 }\njobs = { api = 1.0 }\n\n[mix]\nweb = { spot = 0.7 }\n",
        )
        .expect("valid");
        assert_eq!(c.budgets.fleet_per_hour, Some(10.0));
        assert_eq!(c.budgets.pools["web"], 3.0);
        assert_eq!(c.budgets.jobs["api"], 1.0);
        assert_eq!(c.mix["web"].spot, 0.7);
        let err =
            PriceCatalog::parse("p.toml", "[budgets]\npools = { web = 0 }\n").expect_err("zero");
        assert!(
            err.contains("budgets.pools.web") && err.contains("= 0") && err.contains("above 0"),
            "{err}"
        );
        let err =
            PriceCatalog::parse("p.toml", "[budgets]\nfleet_per_hour = nan\n").expect_err("nan");
        assert!(
            err.contains("budgets.fleet_per_hour") && err.contains("NaN"),
            "{err}"
        );
        let err = PriceCatalog::parse("p.toml", "[budgets]\njobs = { api = -2.5 }\n")
            .expect_err("negative");
        assert!(
            err.contains("budgets.jobs.api") && err.contains("-2.5"),
            "{err}"
        );
        let err = PriceCatalog::parse("p.toml", "[budgets]\nfleet = 1.0\n").expect_err("unknown");
        assert!(err.contains("fleet"), "{err}");
        let err =
            PriceCatalog::parse("p.toml", "[mix]\nweb = { spot = 1.5 }\n").expect_err("share");
        assert!(
            err.contains("mix.web.spot") && err.contains("1.5") && err.contains("0 to 1"),
            "{err}"
        );
        let err = PriceCatalog::parse("p.toml", "[mix]\nweb = { spott = 0.5 }\n")
            .expect_err("unknown mix key");
        assert!(err.contains("spott"), "{err}");
    }

    #[test]
    fn budget_alerts_name_the_budget_and_the_overrun() {
        let budgets = Budgets {
            fleet_per_hour: Some(10.0),
            pools: BTreeMap::from([("web".into(), 3.0), ("empty".into(), 1.0)]),
            jobs: BTreeMap::from([("api".into(), 1.0)]),
        };
        let pools = BTreeMap::from([("web".to_string(), 4.2)]);
        let jobs = BTreeMap::from([("api".to_string(), 0.5)]);
        let all = budget_status(&budgets, 8.0, &pools, &jobs, "EUR");
        assert_eq!(all.len(), 4);
        let alerts = budget_alerts(&budgets, 8.0, &pools, &jobs, "EUR");
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        let web = &alerts[0];
        assert_eq!((web.scope.as_str(), web.name.as_str()), ("pool", "web"));
        assert!((web.over - 1.2).abs() < 1e-9);
        assert!(
            web.message
                .starts_with("pool web costs 4.20 EUR/h, over its budget of 3.00 EUR/h"),
            "{}",
            web.message
        );
        assert_eq!(web.subject(), "pool web");
        let fleet = budget_alerts(&budgets, 10.5, &pools, &jobs, "EUR");
        assert!(
            fleet
                .iter()
                .any(|b| b.scope == "fleet" && (b.over - 0.5).abs() < 1e-9)
        );
        let empty = all.iter().find(|b| b.name == "empty").expect("empty pool");
        assert_eq!(empty.hourly, 0.0);
        assert!(!empty.exceeded && empty.over == 0.0);
    }

    #[test]
    fn mix_compares_the_spot_share_with_the_target() {
        let targets = BTreeMap::from([
            ("web".to_string(), MixTarget { spot: 0.7 }),
            ("batch".to_string(), MixTarget { spot: 1.0 }),
            ("db".to_string(), MixTarget { spot: 0.0 }),
        ]);
        let r = |c: &str, s: bool| (c.to_string(), s);
        let replicas = [
            r("web", true),
            r("web", true),
            r("web", false),
            r("batch", false),
            r("batch", true),
            r("other", true),
        ];
        let mix = mix_status(&targets, &replicas);
        assert_eq!(mix.len(), 3);
        let web = mix.iter().find(|m| m.class == "web").expect("web");
        assert_eq!((web.replicas, web.spot_replicas), (3, 2));
        assert!(!web.off_target, "{}", web.message);
        let batch = mix.iter().find(|m| m.class == "batch").expect("batch");
        assert!((batch.actual_spot - 0.5).abs() < 1e-9);
        assert!(batch.off_target, "{}", batch.message);
        assert!(batch.message.contains("1 of 2"), "{}", batch.message);
        let db = mix.iter().find(|m| m.class == "db").expect("db");
        assert_eq!(db.replicas, 0);
        assert!(!db.off_target);
    }

    #[test]
    fn share_is_the_larger_of_cpu_and_memory() {
        let node = cap(4, 16);
        assert!((allocation_share(1000, 1024 * MIB, &node) - 0.25).abs() < 1e-12);
        assert!((allocation_share(100, 8 * 1024 * MIB, &node) - 0.5).abs() < 1e-12);
        assert_eq!(allocation_share(100, 100, &Capacity::default()), 0.0);
    }

    #[test]
    fn rightsize_uses_p95_with_headroom_and_flags_idle() {
        let cpu: Vec<f64> = (0..100)
            .map(|i| if i < 95 { 10.0 } else { 400.0 })
            .collect();
        let mem: Vec<u64> = vec![40 * MIB; 100];
        let r = rightsize(500, 256 * MIB, &cpu, &mem, &RightsizeConfig::default()).expect("enough");
        assert_eq!(r.p95_cpu_millis, 10);
        assert_eq!(r.recommended_cpu_millis, MIN_CPU_MILLIS.max(20));
        assert_eq!(r.p95_memory_bytes, 40 * MIB);
        assert_eq!(r.recommended_memory_bytes, 48 * MIB);
        assert!(r.idle, "{}", r.explanation);
        assert!(
            r.explanation.contains("500m requested"),
            "{}",
            r.explanation
        );
    }

    #[test]
    fn rightsize_waits_for_enough_samples() {
        let config = RightsizeConfig::default();
        assert!(rightsize(500, MIB, &[1.0; 10], &[MIB; 10], &config).is_none());
    }

    #[test]
    fn percentile_by_nearest_rank() {
        assert_eq!(percentile(&[5, 1, 3, 2, 4], 95.0), Some(5));
        assert_eq!(percentile(&[5, 1, 3, 2, 4], 50.0), Some(3));
        assert_eq!(percentile::<u64>(&[], 95.0), None);
    }
}

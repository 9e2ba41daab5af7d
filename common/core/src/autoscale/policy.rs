//! The `AutoScalingPolicy` manifest: its types, its rules, and the parsers.

pub(crate) use crate::units::duration as human;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use croner::Cron;
use serde::de::{self, Visitor};
use serde::{Deserialize, Serialize};
use yaml_serde::Value;

use crate::cron::parse_cron;
use crate::manifest::document::{self, Kind, Rule};
use crate::manifest::{ManifestErrors, Metadata, duration, opt_duration};

/// The only accepted `kind`.
pub const KIND: &str = "AutoScalingPolicy";
/// Largest `maxSize` of a policy.
pub const MAX_SIZE: u32 = 100_000;
/// Longest metric window and stabilization window.
pub const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Longest cooldown.
pub const MAX_COOLDOWN: Duration = Duration::from_secs(24 * 3600);
/// Longest time a schedule stays active after it fires.
pub const MAX_SCHEDULE_DURATION: Duration = Duration::from_secs(31 * 24 * 3600);
/// Default tolerance band, in percent of the target.
pub const DEFAULT_TOLERANCE: f64 = 10.0;
/// Default metric window.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
/// Default metric weight.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Default scale-out cooldown.
pub const DEFAULT_SCALE_OUT_COOLDOWN: Duration = Duration::from_secs(30);
/// Default scale-in cooldown.
pub const DEFAULT_SCALE_IN_COOLDOWN: Duration = Duration::from_secs(120);
/// Default scale-in stabilization window (as the Kubernetes HPA's).
pub const DEFAULT_SCALE_IN_STABILIZATION: Duration = Duration::from_secs(300);

/// An `AutoScalingPolicy` as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyManifest {
    /// Must be `novacron.io/v1`.
    pub api_version: String,
    /// Must be [`KIND`].
    pub kind: String,
    /// Name and labels.
    pub metadata: Metadata,
    /// The policy.
    pub spec: PolicySpec,
}

/// What a policy scales, on what, and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicySpec {
    /// The job or node pool it scales (exactly one).
    pub target: TargetSpec,
    /// Fewest replicas (or nodes).
    pub min_size: u32,
    /// Most replicas (or nodes).
    pub max_size: u32,
    /// Spending cap: no scale-out past this hourly cost (minSize still holds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_per_hour: Option<f64>,
    /// What to measure; combined by weight.
    #[serde(default)]
    pub metrics: Vec<MetricSpec>,
    /// Band around the target, in percent, inside which nothing changes.
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// How to grow.
    #[serde(default = "Behavior::scale_out")]
    pub scale_out: Behavior,
    /// How to shrink.
    #[serde(default = "Behavior::scale_in")]
    pub scale_in: Behavior,
    /// Cron schedules that raise the floor for a while.
    #[serde(default)]
    pub schedules: Vec<ScheduleSpec>,
    /// Scale ahead of a rising curve: the metrics' slope and a forecast.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trend: Option<TrendSpec>,
}

/// `trend: {lookahead: 2m, history: 30m, confidence: 80}`: two inputs that look
/// ahead, each combined with the reactive ask by taking the highest. The slope:
/// each metric's least-squares line over its own window, projected `lookahead`
/// past now (only a rising line counts). The forecast (with `history`): Holt's
/// linear forecast (Holt–Winters with `season`) of each demand over `history`,
/// `lookahead` ahead, at the upper bound of its one-sided `confidence`
/// interval. A demand is what does not depend on the size the autoscaler chose:
/// a job-reported queue metric, or, for a `cpu` metric of a job, the CPU all its
/// replicas use together (from the metrics history), asking for that over
/// `target`% of one replica's request. A utilization itself is never forecast.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrendSpec {
    /// How far ahead to look: about the time new capacity takes to serve
    /// (a node's provisioning plus a replica's start).
    #[serde(with = "duration")]
    pub lookahead: Duration,
    /// The span the forecast fits; without it, no forecast.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub history: Option<Duration>,
    /// The forecast's one-sided confidence, in percent (50–99.9), default 80.
    #[serde(default = "default_confidence")]
    pub confidence: f64,
    /// A season (`24h` for a daily pattern): the forecast is Holt–Winters
    /// additive, which needs a history of at least two seasons.
    #[serde(
        default,
        with = "opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub season: Option<Duration>,
}

/// Default forecast confidence, percent.
pub const DEFAULT_CONFIDENCE: f64 = 80.0;
/// Longest trend lookahead.
pub const MAX_LOOKAHEAD: Duration = Duration::from_secs(3600);
/// Longest forecast history.
pub const MAX_HISTORY: Duration = Duration::from_secs(7 * 24 * 3600);

fn default_confidence() -> f64 {
    DEFAULT_CONFIDENCE
}

/// `target: {job: api}` or `target: {pool: gpu}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    /// A job's replicas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// A node pool's nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

/// What a validated policy scales.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// The replicas of a job.
    Job(String),
    /// The nodes of a pool.
    Pool(String),
}

impl Target {
    /// The job's or pool's name.
    pub fn name(&self) -> &str {
        match self {
            Target::Job(n) | Target::Pool(n) => n,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Job(n) => write!(f, "job {n}"),
            Target::Pool(n) => write!(f, "pool {n}"),
        }
    }
}

/// What a metric measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricKind {
    /// CPU utilization, percent of what is requested (or allocatable, for a pool).
    Cpu,
    /// GPU utilization, percent.
    Gpu,
    /// Memory utilization, percent.
    Memory,
    /// A queue length: pending allocations, or a metric the job reports.
    Queue,
}

impl MetricKind {
    /// Whether the metric is a utilization in percent.
    pub fn is_utilization(self) -> bool {
        !matches!(self, MetricKind::Queue)
    }
}

impl fmt::Display for MetricKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MetricKind::Cpu => "cpu",
            MetricKind::Gpu => "gpu",
            MetricKind::Memory => "memory",
            MetricKind::Queue => "queue",
        })
    }
}

/// One metric of a policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    /// `cpu`, `gpu`, `memory` or `queue`.
    #[serde(rename = "type")]
    pub kind: MetricKind,
    /// Utilization in percent (1–100), or queue items one replica handles.
    pub target: f64,
    /// 1–100, default 100.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Samples averaged over this long, default 1m.
    #[serde(default = "default_window", with = "duration")]
    pub window: Duration,
    /// For `queue`: the job-reported metric; without it, pending allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<String>,
}

impl MetricSpec {
    /// How the metric is named in explanations: `cpu`, `queue pending`, `requests`.
    pub fn label(&self) -> String {
        match (&self.kind, &self.metric) {
            (MetricKind::Queue, Some(m)) => m.clone(),
            (MetricKind::Queue, None) => "pending".into(),
            (k, _) => k.to_string(),
        }
    }
}

/// How one direction of scaling behaves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Behavior {
    /// Least time between two changes in this direction (scale-in also waits this
    /// long after a scale-out).
    #[serde(with = "duration")]
    pub cooldown: Duration,
    /// The most one change moves: `50%` of the current size (at least 1; no limit
    /// from zero) or a count.
    pub step: Step,
    /// A cap on one change, in replicas or nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_event: Option<u32>,
    /// Recommendations are remembered this long: scale-out takes the lowest of
    /// them, scale-in the highest, so a brief swing does not move the size.
    #[serde(with = "duration")]
    pub stabilization_window: Duration,
}

impl Behavior {
    /// The default for scaling out: 30 s cooldown, up to doubling, no stabilization.
    pub fn scale_out() -> Behavior {
        Behavior {
            cooldown: DEFAULT_SCALE_OUT_COOLDOWN,
            step: Step::Percent(100.0),
            max_per_event: None,
            stabilization_window: Duration::ZERO,
        }
    }

    /// The default for scaling in: 2 min cooldown, half at most, 5 min window.
    pub fn scale_in() -> Behavior {
        Behavior {
            cooldown: DEFAULT_SCALE_IN_COOLDOWN,
            step: Step::Percent(50.0),
            max_per_event: None,
            stabilization_window: DEFAULT_SCALE_IN_STABILIZATION,
        }
    }

    /// The most one change may move from `current`: the step (a percentage rounds
    /// up, at least 1; from zero it does not limit), capped by `maxPerEvent`.
    pub fn limit(&self, current: u32) -> u32 {
        let by_step = match self.step {
            Step::Count(n) => n,
            // A percentage of nothing says nothing: from zero, one change goes all
            // the way (still capped by maxPerEvent).
            Step::Percent(_) if current == 0 => u32::MAX,
            Step::Percent(p) => {
                let n = (f64::from(current) * p / 100.0).ceil();
                // Clamped into u32 before the cast; at least one.
                n.clamp(1.0, f64::from(u32::MAX)) as u32
            }
        };
        self.max_per_event.map_or(by_step, |m| by_step.min(m))
    }
}

/// A step: a percentage of the current size or a count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    /// Percent of the current size, rounded up, at least 1.
    Percent(f64),
    /// A number of replicas or nodes.
    Count(u32),
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Percent(p) => write!(f, "{p}%"),
            Step::Count(n) => write!(f, "{n}"),
        }
    }
}

/// What a step may look like, for error messages.
const STEP_ACCEPTED: &str = "a percentage like 50% (of the current size) or a count like 4";

fn parse_step(s: &str) -> Result<Step, String> {
    let t = s.trim();
    if let Some(p) = t.strip_suffix('%') {
        return match p.trim().parse::<f64>() {
            Ok(v) if v.is_finite() && v > 0.0 && v <= 1000.0 => Ok(Step::Percent(v)),
            Ok(_) => Err(format!(
                "{t:?} is out of range; expected a percentage above 0% and up to 1000%"
            )),
            Err(_) => Err(format!("{t:?} is not a step; expected {STEP_ACCEPTED}")),
        };
    }
    match t.parse::<u32>() {
        Ok(0) => Err(format!(
            "0 moves nothing; expected {STEP_ACCEPTED}, at least 1"
        )),
        Ok(n) => Ok(Step::Count(n)),
        Err(_) => Err(format!("{t:?} is not a step; expected {STEP_ACCEPTED}")),
    }
}

impl<'de> Deserialize<'de> for Step {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Step;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(STEP_ACCEPTED)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Step, E> {
                parse_step(s).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Step, E> {
                parse_step(&n.to_string()).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Step, E> {
                parse_step(&n.to_string()).map_err(E::custom)
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<Step, E> {
                Err(E::custom(format!(
                    "{n} is not a whole count; expected {STEP_ACCEPTED}"
                )))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Step {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Step::Percent(_) => s.collect_str(self),
            Step::Count(n) => s.serialize_u32(*n),
        }
    }
}

/// A cron schedule that raises the floor while it is active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ScheduleSpec {
    /// Shown in explanations.
    pub name: String,
    /// A 5-field cron expression (minute hour day-of-month month day-of-week), UTC.
    pub cron: String,
    /// How long the schedule stays active after each time it fires.
    #[serde(with = "duration")]
    pub duration: Duration,
    /// The size the target has at least while active.
    pub min_size: u32,
}

/// A schedule whose cron expression parsed.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// As written.
    pub spec: ScheduleSpec,
    /// The parsed expression.
    pub cron: Cron,
}

/// A policy that passed every check.
///
/// The only ways to get one are [`parse_policy`], [`parse_policies`] and
/// [`AutoScalingPolicy::from_manifest`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AutoScalingPolicy {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// What it scales.
    pub target: Target,
    /// The spec as written (defaults filled in).
    pub spec: PolicySpec,
    /// The schedules, parsed.
    pub schedules: Vec<Schedule>,
}

impl AutoScalingPolicy {
    /// How far back [`decide`](super::decide) reads samples: the longest metric
    /// window, or the trend's forecast history when longer.
    pub fn lookback(&self) -> Duration {
        let windows = self.spec.metrics.iter().map(|m| m.window).max();
        let history = self.spec.trend.as_ref().and_then(|t| t.history);
        windows
            .into_iter()
            .chain(history)
            .max()
            .unwrap_or(DEFAULT_WINDOW)
    }

    /// Validates a manifest that did not come from text; errors name `source`.
    pub fn from_manifest(
        source: &str,
        manifest: PolicyManifest,
    ) -> Result<AutoScalingPolicy, ManifestErrors> {
        checked(manifest, None).map_err(|rules| document::unlocated(source, rules))
    }

    /// Validates a bare spec (a scenario embeds them) under `name`.
    pub fn from_spec(name: &str, spec: PolicySpec) -> Result<AutoScalingPolicy, Vec<String>> {
        let manifest = PolicyManifest {
            api_version: crate::manifest::API_VERSION.into(),
            kind: KIND.into(),
            metadata: Metadata {
                name: name.to_string(),
                labels: BTreeMap::new(),
            },
            spec,
        };
        checked(manifest, None).map_err(|rules| {
            rules
                .into_iter()
                .map(|r| format!("{}: {}", r.path, r.message))
                .collect()
        })
    }
}

/// Parses a file that holds exactly one policy. `file` is the name errors show.
pub fn parse_policy(file: &str, text: &str) -> Result<AutoScalingPolicy, ManifestErrors> {
    document::load_one(
        file,
        text,
        &POLICY,
        |m, v| checked(m, Some(v)),
        |p: &AutoScalingPolicy| &p.name,
    )
}

/// Parses a file of one or more policies separated by `---`.
pub fn parse_policies(file: &str, text: &str) -> Result<Vec<AutoScalingPolicy>, ManifestErrors> {
    document::load_all(
        file,
        text,
        &POLICY,
        |m, v| checked(m, Some(v)),
        |p: &AutoScalingPolicy| &p.name,
    )
}

const POLICY: Kind<'static> = Kind {
    kind: KIND,
    noun: "policy",
};

/// Checks a spec's rules, with paths under `prefix` (`spec`, or
/// `policies[2].spec` in a scenario).
pub(crate) fn check_spec(s: &PolicySpec, prefix: &str, source: Option<&Value>) -> Vec<Rule> {
    let mut r = Vec::new();
    let p = |field: &str| format!("{prefix}.{field}");
    match (&s.target.job, &s.target.pool) {
        (Some(_), Some(_)) => r.push(Rule::at(
            p("target"),
            "names both a job and a pool; expected exactly one of job or pool".to_string(),
        )),
        (None, None) => r.push(Rule::at(
            p("target"),
            "names nothing; expected exactly one of job: NAME or pool: NAME".to_string(),
        )),
        (Some(n), None) | (None, Some(n)) => {
            let which = if s.target.job.is_some() {
                "job"
            } else {
                "pool"
            };
            if let Some(m) = crate::names::problem(n, which) {
                r.push(Rule::at(p(&format!("target.{which}")), m));
            }
        }
    }
    if s.max_size == 0 || s.max_size > MAX_SIZE {
        r.push(Rule::at(
            p("maxSize"),
            format!(
                "{} is out of range; expected a whole number from 1 to {MAX_SIZE}",
                s.max_size
            ),
        ));
    }
    if s.min_size > s.max_size {
        r.push(Rule::at(
            p("minSize"),
            format!(
                "{} is above maxSize ({}); expected a minSize at most maxSize",
                s.min_size, s.max_size
            ),
        ));
    }
    if let Some(c) = s.max_cost_per_hour
        && !(c.is_finite() && c > 0.0)
    {
        r.push(Rule::at(
            p("maxCostPerHour"),
            format!("{c} is not a cost cap; expected a positive hourly cost like 25.5"),
        ));
    }
    if !(s.tolerance.is_finite() && (0.0..100.0).contains(&s.tolerance)) {
        r.push(Rule::at(
            p("tolerance"),
            format!(
                "{} is out of range; expected a percentage from 0 up to (not including) 100, \
                 like 10",
                s.tolerance
            ),
        ));
    }
    if s.metrics.is_empty() && s.schedules.is_empty() {
        let written =
            source.is_some_and(|v| lookup(v, prefix).and_then(|s| s.get("metrics")).is_some());
        let message = "nothing to scale on; expected at least one metric (cpu, gpu, memory or \
                       queue) or one schedule";
        if written {
            r.push(Rule::at(p("metrics"), message));
        } else {
            r.push(Rule::at(prefix.to_string(), message));
        }
    }
    let mut seen = BTreeSet::new();
    for (i, m) in s.metrics.iter().enumerate() {
        let mp = format!("{prefix}.metrics[{i}]");
        if !seen.insert((m.kind, m.metric.clone())) {
            r.push(Rule::at(
                format!("{mp}.type"),
                format!(
                    "{} is measured twice; expected each metric once (give a queue metric a \
                     different metric name)",
                    m.label()
                ),
            ));
        }
        if m.kind.is_utilization() {
            if !(m.target.is_finite() && m.target > 0.0 && m.target <= 100.0) {
                r.push(Rule::at(
                    format!("{mp}.target"),
                    format!(
                        "{} is out of range; expected a utilization in percent above 0 and up \
                         to 100, like 75",
                        m.target
                    ),
                ));
            }
            if let Some(name) = &m.metric {
                r.push(Rule::at(
                    format!("{mp}.metric"),
                    format!(
                        "{name:?} names a reported metric, but {} is a utilization; expected \
                         metric only with type: queue",
                        m.kind
                    ),
                ));
            }
        } else {
            if !(m.target.is_finite() && m.target > 0.0) {
                r.push(Rule::at(
                    format!("{mp}.target"),
                    format!(
                        "{} is out of range; expected the queue length one replica handles, \
                         above 0, like 10",
                        m.target
                    ),
                ));
            }
            if let Some(name) = &m.metric
                && !is_metric_name(name)
            {
                r.push(Rule::at(
                    format!("{mp}.metric"),
                    format!(
                        "{name:?} is not a metric name; expected letters, digits and _ . -, \
                         starting with a letter, like requests or queue_depth (or no metric, \
                         for pending allocations)"
                    ),
                ));
            }
        }
        if !(1..=100).contains(&m.weight) {
            r.push(Rule::at(
                format!("{mp}.weight"),
                format!(
                    "{} is out of range; expected a whole number from 1 to 100",
                    m.weight
                ),
            ));
        }
        if m.window < Duration::from_secs(1) || m.window > MAX_WINDOW {
            r.push(Rule::at(
                format!("{mp}.window"),
                format!(
                    "{} is out of range; expected a window from 1s to 24h",
                    human(m.window)
                ),
            ));
        }
    }
    let has_queue = s.metrics.iter().any(|m| m.kind == MetricKind::Queue);
    if s.min_size == 0 && !has_queue && s.schedules.is_empty() {
        r.push(Rule::at(
            p("minSize"),
            "0 needs a queue metric or a schedule to scale up from zero (utilization says \
             nothing when nothing runs); expected minSize of at least 1, or a queue metric"
                .to_string(),
        ));
    }
    for (dir, b) in [("scaleOut", &s.scale_out), ("scaleIn", &s.scale_in)] {
        if b.cooldown > MAX_COOLDOWN {
            r.push(Rule::at(
                format!("{prefix}.{dir}.cooldown"),
                format!(
                    "{} is too long; expected a cooldown up to 24h",
                    human(b.cooldown)
                ),
            ));
        }
        if b.stabilization_window > MAX_WINDOW {
            r.push(Rule::at(
                format!("{prefix}.{dir}.stabilizationWindow"),
                format!(
                    "{} is too long; expected a window up to 24h",
                    human(b.stabilization_window)
                ),
            ));
        }
        if b.max_per_event == Some(0) {
            r.push(Rule::at(
                format!("{prefix}.{dir}.maxPerEvent"),
                "0 would never move; expected a whole number of at least 1, or no \
                 maxPerEvent"
                    .to_string(),
            ));
        }
    }
    if let Some(t) = &s.trend {
        let tp = |f: &str| format!("{prefix}.trend.{f}");
        if t.lookahead < Duration::from_secs(1) || t.lookahead > MAX_LOOKAHEAD {
            r.push(Rule::at(
                tp("lookahead"),
                format!(
                    "{} is out of range; expected a lookahead from 1s to 1h, about the time \
                     new capacity takes to serve",
                    human(t.lookahead)
                ),
            ));
        }
        if !(t.confidence.is_finite() && (50.0..=99.9).contains(&t.confidence)) {
            r.push(Rule::at(
                tp("confidence"),
                format!(
                    "{} is out of range; expected a percentage from 50 to 99.9, like 80",
                    t.confidence
                ),
            ));
        }
        if t.season.is_some() && t.history.is_none() {
            r.push(Rule::at(
                tp("season"),
                "needs a history to forecast from; expected history of at least two seasons"
                    .to_string(),
            ));
        }
        if let Some(h) = t.history {
            if h < Duration::from_secs(60) || h > MAX_HISTORY {
                r.push(Rule::at(
                    tp("history"),
                    format!(
                        "{} is out of range; expected a history from 1m to 7d",
                        human(h)
                    ),
                ));
            } else if h < t.lookahead.saturating_mul(2) {
                r.push(Rule::at(
                    tp("history"),
                    format!(
                        "{} is shorter than twice the lookahead ({}); expected a history of \
                         at least {} to forecast from",
                        human(h),
                        human(t.lookahead),
                        human(t.lookahead.saturating_mul(2))
                    ),
                ));
            }
            if let Some(season) = t.season
                && (season < Duration::from_secs(600) || h < season.saturating_mul(2))
            {
                r.push(Rule::at(
                    tp("season"),
                    format!(
                        "{} with a history of {}; expected a season of at least 10m and a \
                         history of at least two seasons",
                        human(season),
                        human(h)
                    ),
                ));
            }
            let job = s.target.job.is_some();
            if !s.metrics.iter().any(|m| {
                (m.kind == MetricKind::Queue && m.metric.is_some())
                    || (job && m.kind == MetricKind::Cpu)
            }) {
                r.push(Rule::at(
                    tp("history"),
                    "a forecast needs a demand: a metric the job reports (type: queue with \
                     metric: NAME), or a cpu metric of a job (the CPU its replicas use \
                     together); a utilization of a pool depends on the size the autoscaler \
                     chose; expected such a metric, or no history (slope only)"
                        .to_string(),
                ));
            }
        }
    }
    let mut names = BTreeSet::new();
    for (i, sc) in s.schedules.iter().enumerate() {
        let sp = format!("{prefix}.schedules[{i}]");
        if let Some(m) = crate::names::problem(&sc.name, "schedule") {
            r.push(Rule::at(format!("{sp}.name"), m));
        } else if !names.insert(sc.name.as_str()) {
            r.push(Rule::at(
                format!("{sp}.name"),
                format!(
                    "{:?} is already the name of another schedule; expected a different name \
                     for each schedule",
                    sc.name
                ),
            ));
        }
        if let Err(e) = parse_cron(&sc.cron) {
            r.push(Rule::at(format!("{sp}.cron"), e));
        }
        if sc.duration.is_zero() || sc.duration > MAX_SCHEDULE_DURATION {
            r.push(Rule::at(
                format!("{sp}.duration"),
                format!(
                    "{} is out of range; expected a duration from 1s to 31d",
                    human(sc.duration)
                ),
            ));
        }
        if sc.min_size > s.max_size {
            r.push(Rule::at(
                format!("{sp}.minSize"),
                format!(
                    "{} is above maxSize ({}); expected a size at most maxSize",
                    sc.min_size, s.max_size
                ),
            ));
        }
    }
    r
}

fn checked(m: PolicyManifest, source: Option<&Value>) -> Result<AutoScalingPolicy, Vec<Rule>> {
    let mut rules = document::envelope(&m.api_version, &m.kind, KIND, &m.metadata, "policy");
    rules.extend(check_spec(&m.spec, "spec", source));
    if !rules.is_empty() {
        return Err(rules);
    }
    let target = match (&m.spec.target.job, &m.spec.target.pool) {
        (Some(j), _) => Target::Job(j.clone()),
        (None, Some(p)) => Target::Pool(p.clone()),
        // Unreachable after check_spec; reported rather than panicking.
        (None, None) => return Err(vec![Rule::at("spec.target", "names nothing")]),
    };
    let mut schedules = Vec::new();
    for sc in &m.spec.schedules {
        match parse_cron(&sc.cron) {
            Ok(cron) => schedules.push(Schedule {
                spec: sc.clone(),
                cron,
            }),
            Err(e) => return Err(vec![Rule::at("spec.schedules", e)]),
        }
    }
    Ok(AutoScalingPolicy {
        name: m.metadata.name,
        labels: m.metadata.labels,
        target,
        spec: m.spec,
        schedules,
    })
}

/// The value at a dotted path without indexes (`spec`, `policies`), if written.
fn lookup<'v>(v: &'v Value, path: &str) -> Option<&'v Value> {
    let mut cur = v;
    for part in path.split('.') {
        let (key, index) = match part.split_once('[') {
            Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        cur = cur.get(key)?;
        if let Some(i) = index {
            cur = cur.get(i)?;
        }
    }
    Some(cur)
}

/// `[A-Za-z][A-Za-z0-9_.-]*`, at most 128 characters.
fn is_metric_name(s: &str) -> bool {
    s.len() <= 128
        && s.bytes().next().is_some_and(|c| c.is_ascii_alphabetic())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(&c))
}

fn default_tolerance() -> f64 {
    DEFAULT_TOLERANCE
}
fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}
fn default_window() -> Duration {
    DEFAULT_WINDOW
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse_as_percentages_or_counts() {
        assert_eq!(parse_step("50%"), Ok(Step::Percent(50.0)));
        assert_eq!(parse_step(" 4 "), Ok(Step::Count(4)));
        for bad in ["0", "0%", "-1", "x", "2000%", "%"] {
            let e = parse_step(bad).expect_err(bad);
            assert!(e.contains("expected"), "{bad}: {e}");
        }
    }

    #[test]
    fn step_limits_round_up_and_respect_the_per_event_cap() {
        let mut b = Behavior::scale_out();
        b.step = Step::Percent(50.0);
        assert_eq!(b.limit(4), 2);
        assert_eq!(b.limit(3), 2, "1.5 rounds up");
        assert_eq!(b.limit(1), 1, "at least one");
        assert_eq!(b.limit(0), u32::MAX, "from zero, no limit");
        b.max_per_event = Some(5);
        assert_eq!(b.limit(100), 5);
        b.step = Step::Count(3);
        assert_eq!(b.limit(100), 3);
    }

    #[test]
    fn policies_refuse_deep_nesting_before_parsing() {
        let block: String = (0..2000)
            .map(|d| format!("{}k:\n", " ".repeat(d)))
            .collect();
        let errors = parse_policies("p.yaml", &block).expect_err("too deep");
        assert!(errors.to_string().contains("levels deep"), "{errors}");
    }
}

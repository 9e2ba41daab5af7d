//! The autoscaler: how many replicas (or nodes) a target should have now. Pure and
//! deterministic: [`decide`] takes the [`AutoScalingPolicy`], the [`ScaleState`]
//! (current size, last changes, recent recommendations), the metric
//! [`Observations`] and `now`, and returns a [`Decision`] with the new size and a
//! sentence that says why: `api 4 → 6: cpu 91% over 5m, target 75%`. No clock, no
//! I/O, no randomness.
//!
//! # The decision, step by step
//!
//! 1. **Bounds.** The ceiling is `maxSize`, lowered to what `maxCostPerHour`
//!    affords at the state's unit price (never below `minSize`). The floor is
//!    `minSize`, raised by every active schedule (a 5-field cron expression in UTC
//!    that fired within its `duration`), never above the ceiling. A size outside
//!    the bounds moves straight to them, without cooldown or step limits.
//! 2. **Metrics.** Each metric averages its samples in `(now - window, now]`. A
//!    utilization asks for `current × observed / target`; a job-reported queue
//!    metric for `observed / target` (target items per replica); pending
//!    allocations for `current + pending / target` (the pending work needs capacity
//!    on top of what runs; with nothing pending it abstains, so scale-in is left to
//!    the utilizations). The asks are averaged by weight over the metrics that
//!    have samples. Within the tolerance band (`|ask / current − 1| ≤ tolerance`)
//!    the recommendation is the current size; otherwise the ask rounded up, within
//!    the bounds.
//! 3. **Stabilization** (as the Kubernetes HPA's): scale-out goes to the *lowest*
//!    recommendation of its window, scale-in to the *highest* of its own, so a
//!    short swing in either direction does not move the size.
//! 4. **Cooldowns and steps.** A scale-out waits `scaleOut.cooldown` after the
//!    last scale-out; a scale-in waits `scaleIn.cooldown` after the last change in
//!    either direction. One change moves at most `step` (a percentage of the
//!    current size, at least 1, or a count), capped by `maxPerEvent`.
//!
//! The caller records each decision with [`ScaleState::record`], which remembers
//! the recommendation (for stabilization) and the change (for cooldowns).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};

pub mod forecast;
mod policy;
pub mod pool;

pub use crate::cron::parse_cron;

pub use policy::{
    AutoScalingPolicy, Behavior, DEFAULT_CONFIDENCE, DEFAULT_SCALE_IN_COOLDOWN,
    DEFAULT_SCALE_IN_STABILIZATION, DEFAULT_SCALE_OUT_COOLDOWN, DEFAULT_TOLERANCE, DEFAULT_WEIGHT,
    DEFAULT_WINDOW, KIND, MAX_COOLDOWN, MAX_HISTORY, MAX_LOOKAHEAD, MAX_SCHEDULE_DURATION,
    MAX_SIZE, MAX_WINDOW, MetricKind, MetricSpec, PolicyManifest, PolicySpec, Schedule,
    ScheduleSpec, Step, Target, TargetSpec, TrendSpec, parse_policies, parse_policy,
};
pub(crate) use policy::{check_spec, human};

/// One measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// When (Unix ms).
    pub at_ms: u64,
    /// Utilization in percent, or a queue length.
    pub value: f64,
}

/// The metric windows of one target. Utilizations are in percent (mean over the
/// replicas or nodes); `pending` counts pending allocations; `reported` holds the
/// queue metrics the job reports, by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observations {
    /// CPU utilization.
    pub cpu: Vec<Sample>,
    /// GPU utilization.
    pub gpu: Vec<Sample>,
    /// Memory utilization.
    pub memory: Vec<Sample>,
    /// Pending allocations.
    pub pending: Vec<Sample>,
    /// Job-reported queue metrics.
    pub reported: BTreeMap<String, Vec<Sample>>,
    /// The job's CPU in use, all its replicas together (millicores), over the
    /// trend's history: the demand a `cpu` metric's forecast reads (unlike a
    /// utilization, it does not depend on how many replicas share it).
    pub cpu_used: Vec<Sample>,
    /// The CPU one replica requests (millicores); 0 when unknown (no forecast
    /// of CPU then).
    pub cpu_request_millis: u64,
}

impl Observations {
    /// The samples a metric reads.
    pub fn series(&self, m: &MetricSpec) -> &[Sample] {
        match (m.kind, &m.metric) {
            (MetricKind::Cpu, _) => &self.cpu,
            (MetricKind::Gpu, _) => &self.gpu,
            (MetricKind::Memory, _) => &self.memory,
            (MetricKind::Queue, None) => &self.pending,
            (MetricKind::Queue, Some(name)) => self.reported.get(name).map_or(&[], Vec::as_slice),
        }
    }

    /// Drops samples older than `keep` before `now_ms` (a caller keeping windows).
    pub fn prune(&mut self, now_ms: u64, keep: Duration) {
        let cut = now_ms.saturating_sub(millis(keep));
        let f = |v: &mut Vec<Sample>| v.retain(|s| s.at_ms > cut);
        f(&mut self.cpu);
        f(&mut self.gpu);
        f(&mut self.memory);
        f(&mut self.pending);
        self.reported.values_mut().for_each(f);
    }
}

/// A recommendation remembered for stabilization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recommendation {
    /// When (Unix ms).
    pub at_ms: u64,
    /// The size the metrics asked for, within the bounds.
    pub size: u32,
}

/// What the autoscaler remembers about one target between decisions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScaleState {
    /// The current size (replicas or nodes asked for).
    pub current: u32,
    /// The last scale-out (Unix ms).
    pub last_scale_out_ms: Option<u64>,
    /// The last scale-in (Unix ms).
    pub last_scale_in_ms: Option<u64>,
    /// Recent recommendations, oldest first.
    pub recommendations: VecDeque<Recommendation>,
    /// Hourly price of one replica or node, for `maxCostPerHour`.
    pub unit_price_per_hour: Option<f64>,
}

impl ScaleState {
    /// A target at `current` with no history.
    pub fn new(current: u32) -> ScaleState {
        ScaleState {
            current,
            ..ScaleState::default()
        }
    }

    /// Records `decision`, taken at `now_ms`: its recommendation, and the change
    /// if the size moved. History older than the longer stabilization window is
    /// forgotten.
    pub fn record(&mut self, policy: &AutoScalingPolicy, decision: &Decision, now_ms: u64) {
        if let Some(size) = decision.recommendation {
            self.recommendations.push_back(Recommendation {
                at_ms: now_ms,
                size,
            });
        }
        if decision.to > decision.from {
            self.last_scale_out_ms = Some(now_ms);
        } else if decision.to < decision.from {
            self.last_scale_in_ms = Some(now_ms);
        }
        self.current = decision.to;
        let keep = policy
            .spec
            .scale_out
            .stabilization_window
            .max(policy.spec.scale_in.stabilization_window);
        let cut = now_ms.saturating_sub(millis(keep));
        while self.recommendations.front().is_some_and(|r| r.at_ms < cut) {
            self.recommendations.pop_front();
        }
    }
}

/// What the autoscaler decided, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The size before.
    pub from: u32,
    /// The size now (equal to `from` when holding).
    pub to: u32,
    /// What the metrics recommended within the bounds, to remember for
    /// stabilization; `None` when no metric had samples.
    pub recommendation: Option<u32>,
    /// Why the size changes or holds, in one line.
    pub explanation: String,
}

impl Decision {
    /// Whether the size changes.
    pub fn changed(&self) -> bool {
        self.from != self.to
    }
}

/// Decides the size of the policy's target at `now_ms` (Unix ms, UTC).
pub fn decide(
    policy: &AutoScalingPolicy,
    state: &ScaleState,
    obs: &Observations,
    now_ms: u64,
) -> Decision {
    let spec = &policy.spec;
    let name = policy.target.name();
    let cur = state.current;

    // 1. Bounds.
    let cost_cap = match (spec.max_cost_per_hour, state.unit_price_per_hour) {
        (Some(cap), Some(price)) if price > 0.0 && price.is_finite() => {
            let n = (cap / price + 1e-9).floor();
            Some(n.clamp(0.0, f64::from(u32::MAX)) as u32)
        }
        _ => None,
    };
    let upper = match cost_cap {
        Some(c) if c.max(spec.min_size) < spec.max_size => c.max(spec.min_size),
        _ => spec.max_size,
    };
    let capped_by_cost = upper < spec.max_size;
    let schedule = active_schedule(policy, now_ms);
    let sched_floor = schedule.map_or(0, |(_, s)| s.min(upper));
    let lower = spec.min_size.max(sched_floor);
    let upper_reason = || match (capped_by_cost, state.unit_price_per_hour) {
        (true, Some(price)) => format!(
            "maxCostPerHour {} at {} per hour allows at most {upper}",
            num(spec.max_cost_per_hour.unwrap_or(0.0)),
            num(price)
        ),
        _ => format!("maxSize is {upper}"),
    };

    // 2. Metrics.
    let metrics = evaluate(policy, obs, cur, now_ms);
    let mut recommendation = None;
    let mut within_tolerance = false;
    let mut ask = None;
    if let Some(m) = &metrics {
        let rec = if cur > 0 && (m.desired / f64::from(cur) - 1.0).abs() <= spec.tolerance / 100.0 {
            within_tolerance = true;
            cur
        } else {
            let r = (m.desired - 1e-9).ceil().clamp(0.0, f64::from(u32::MAX)) as u32;
            ask = Some(r);
            r
        };
        recommendation = Some(rec.clamp(lower, upper));
    }
    let why = metrics
        .as_ref()
        .map_or_else(|| no_samples(policy), |m| m.parts.join(", "));

    // Out of bounds: straight there.
    if cur < lower {
        let reason = match schedule {
            Some((sname, size)) if size >= spec.min_size && sched_floor == lower => {
                let sc = policy.schedules.iter().find(|s| s.spec.name == sname);
                let cron = sc.map_or(String::new(), |s| {
                    format!(" ({}, for {})", s.spec.cron, human(s.spec.duration))
                });
                format!("schedule {sname}{cron} sets at least {lower}")
            }
            _ => format!("minSize is {lower}"),
        };
        return Decision {
            from: cur,
            to: lower,
            recommendation,
            explanation: format!("{name} {cur} → {lower}: {reason}"),
        };
    }
    if cur > upper {
        return Decision {
            from: cur,
            to: upper,
            recommendation,
            explanation: format!("{name} {cur} → {upper}: {}", upper_reason()),
        };
    }
    let hold = |why: String| Decision {
        from: cur,
        to: cur,
        recommendation,
        explanation: format!("{name} holds at {cur}: {why}"),
    };
    let Some(rec) = recommendation else {
        return hold(why);
    };

    // 3. Stabilization.
    let out = &spec.scale_out;
    let inn = &spec.scale_in;
    let since = |w: Duration| now_ms.saturating_sub(millis(w));
    let window = |w: Duration| {
        state
            .recommendations
            .iter()
            .filter(move |r| r.at_ms > since(w) && r.at_ms <= now_ms && !w.is_zero())
            .map(|r| r.size.clamp(lower, upper))
    };
    let up = window(out.stabilization_window).fold(rec, u32::min);
    let down = window(inn.stabilization_window).fold(rec, u32::max);
    let mut target = cur;
    if target < up {
        target = up;
    }
    if target > down {
        target = down;
    }

    if target == cur {
        let mut why = why;
        if within_tolerance {
            let _ = write!(why, ", within the {}% tolerance", num(spec.tolerance));
        } else if rec > cur {
            let _ = write!(
                why,
                "; scale-out to {rec} held back by the {} stabilization window (lowest \
                 recommendation {up})",
                human(out.stabilization_window)
            );
        } else if rec < cur {
            let _ = write!(
                why,
                "; scale-in to {rec} held back by the {} stabilization window (highest \
                 recommendation {down})",
                human(inn.stabilization_window)
            );
        } else if ask.is_some_and(|a| a > upper) {
            let _ = write!(
                why,
                "; asks for {}, but {}",
                ask.unwrap_or(0),
                upper_reason()
            );
        } else if ask.is_some_and(|a| a < lower) {
            let _ = write!(
                why,
                "; asks for {}, but the floor is {lower}",
                ask.unwrap_or(0)
            );
        }
        return hold(why);
    }

    // 4. Cooldowns and steps.
    let (behavior, dir, last) = if target > cur {
        (out, "scaleOut", state.last_scale_out_ms)
    } else {
        let last = match (state.last_scale_out_ms, state.last_scale_in_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        (inn, "scaleIn", last)
    };
    if let Some(last) = last {
        let ready_at = last.saturating_add(millis(behavior.cooldown));
        if now_ms < ready_at {
            let left = Duration::from_millis(ready_at - now_ms);
            let verb = if target > cur {
                "scale-out"
            } else {
                "scale-in"
            };
            return hold(format!(
                "{why}; {verb} to {target} waits for the {} cooldown ({} left)",
                human(behavior.cooldown),
                human(Duration::from_secs(left.as_secs().max(1)))
            ));
        }
    }
    let limit = behavior.limit(cur);
    let to = if target > cur {
        target.min(cur.saturating_add(limit))
    } else {
        target.max(cur.saturating_sub(limit))
    };
    let mut explanation = format!("{name} {cur} → {to}: {why}");
    if to != target {
        let _ = write!(
            explanation,
            " (wants {target}; {dir} moves at most {limit} per change)"
        );
    } else if target != rec {
        let (w, which) = if target > cur {
            (out.stabilization_window, "lowest")
        } else {
            (inn.stabilization_window, "highest")
        };
        let _ = write!(
            explanation,
            " ({which} recommendation over the {} stabilization window)",
            human(w)
        );
    } else if ask.is_some_and(|a| a > upper) {
        let _ = write!(
            explanation,
            " (asks for {}; {})",
            ask.unwrap_or(0),
            upper_reason()
        );
    }
    Decision {
        from: cur,
        to,
        recommendation,
        explanation,
    }
}

/// The active schedule with the highest floor, if any: its name and `minSize`.
pub fn active_schedule(policy: &AutoScalingPolicy, now_ms: u64) -> Option<(&str, u32)> {
    let now = DateTime::<Utc>::from_timestamp_millis(i64::try_from(now_ms).ok()?)?;
    let mut best: Option<(&str, u32)> = None;
    for s in &policy.schedules {
        let Ok(fired) = s.cron.find_previous_occurrence(&now, true) else {
            continue;
        };
        let Ok(age) = (now - fired).to_std() else {
            continue;
        };
        if age < s.spec.duration && best.is_none_or(|(_, b)| s.spec.min_size > b) {
            best = Some((s.spec.name.as_str(), s.spec.min_size));
        }
    }
    best
}

/// The weighted ask of the metrics that have samples, and how each reads.
struct Evaluated {
    /// The highest of the inputs' asks.
    desired: f64,
    /// How each metric reads now, and, when an input that looks ahead asks for
    /// more than the reactive one, what it saw.
    parts: Vec<String>,
}

/// What one input asks of one metric.
struct Asks {
    reactive: f64,
    slope: Option<(f64, String)>,
    forecast: Option<(f64, String)>,
}

fn evaluate(
    policy: &AutoScalingPolicy,
    obs: &Observations,
    cur: u32,
    now_ms: u64,
) -> Option<Evaluated> {
    let mut weights = 0.0;
    let (mut reactive, mut by_slope, mut by_forecast) = (0.0, 0.0, 0.0);
    let mut parts = Vec::new();
    let (mut slope_parts, mut forecast_parts) = (Vec::new(), Vec::new());
    let unit = match policy.target {
        Target::Job(_) => "replica",
        Target::Pool(_) => "node",
    };
    for m in &policy.spec.metrics {
        let from = now_ms.saturating_sub(millis(m.window));
        let series = obs.series(m);
        let in_window: Vec<Sample> = series
            .iter()
            .filter(|s| s.at_ms > from && s.at_ms <= now_ms && s.value.is_finite())
            .map(|s| Sample {
                at_ms: s.at_ms,
                value: s.value.max(0.0),
            })
            .collect();
        if in_window.is_empty() {
            continue;
        }
        let avg = in_window.iter().map(|s| s.value).sum::<f64>() / in_window.len() as f64;
        // What the metric at `value` asks for; `None` when it abstains.
        let ask = |value: f64| match (m.kind, &m.metric) {
            (MetricKind::Queue, Some(_)) => Some(value / m.target),
            // Nothing pending says nothing about surplus: abstain, and leave
            // scale-in to the utilizations.
            (MetricKind::Queue, None) if value <= 0.0 => None,
            (MetricKind::Queue, None) => Some(f64::from(cur) + value / m.target),
            // Utilization says nothing when nothing runs.
            _ if cur == 0 => None,
            _ => Some(f64::from(cur) * value / m.target),
        };
        let Some(now_ask) = ask(avg) else {
            continue;
        };
        let mut asks = Asks {
            reactive: now_ask,
            slope: None,
            forecast: None,
        };
        if let Some(trend) = &policy.spec.trend {
            let ahead = trend.lookahead.as_secs_f64();
            if let Some(line) = forecast::slope(&in_window)
                && line.per_sec > 0.0
            {
                let projected = line.project(ahead).max(0.0);
                if let Some(a) = ask(projected) {
                    asks.slope = Some((
                        a,
                        format!(
                            "{} rising {} per minute, {} in {}",
                            m.label(),
                            num(round2(line.per_sec * 60.0)),
                            num(round2(projected)),
                            human(trend.lookahead)
                        ),
                    ));
                }
            }
            // What the forecast reads and how a forecast value asks: a reported
            // queue metric per replica, or the job's CPU in use over what
            // `target`% of one replica's request is.
            let demand: Option<(&[Sample], Option<f64>, String)> = match (m.kind, &m.metric) {
                (MetricKind::Queue, Some(_)) => Some((series, None, m.label())),
                (MetricKind::Cpu, _)
                    if obs.cpu_request_millis > 0 && matches!(policy.target, Target::Job(_)) =>
                {
                    let per_replica = obs.cpu_request_millis as f64 * m.target / 100.0;
                    Some((
                        obs.cpu_used.as_slice(),
                        Some(per_replica),
                        "cpu in use (millicores)".to_string(),
                    ))
                }
                _ => None,
            };
            if let (Some(history), Some((series, per_replica, label))) = (trend.history, demand) {
                // Without a season: about 60 buckets over the history, and at
                // least one per lookahead. With one: 96 buckets a season.
                let bucket = match trend.season {
                    Some(season) => (millis(season) / 96).max(1_000),
                    None => (millis(history) / 60).clamp(1_000, millis(trend.lookahead).max(1_000)),
                };
                let from = now_ms.saturating_sub(millis(history));
                let values = forecast::buckets(series, from, now_ms, bucket);
                let steps = u32::try_from(millis(trend.lookahead).div_ceil(bucket)).unwrap_or(1);
                let conf = trend.confidence / 100.0;
                let (fit, method) = match trend.season {
                    Some(season) => (
                        forecast::holt_winters(&values, 96, steps, conf),
                        format!("Holt-Winters, season {}", human(season)),
                    ),
                    None => (forecast::holt(&values, steps, conf), "Holt".to_string()),
                };
                let asked = |f: &forecast::Forecast| match per_replica {
                    Some(per) => Some(f.upper.max(0.0) / per),
                    None => ask(f.upper.max(0.0)),
                };
                if let Some(f) = fit
                    && let Some(a) = asked(&f)
                {
                    asks.forecast = Some((
                        a,
                        format!(
                            "{label} forecast {} in {} ({}% bound {}, {method} over {})",
                            num(round2(f.mean.max(0.0))),
                            human(trend.lookahead),
                            num(trend.confidence),
                            num(round2(f.upper.max(0.0))),
                            human(history)
                        ),
                    ));
                }
            }
        }
        let w = f64::from(m.weight);
        weights += w;
        reactive += w * asks.reactive;
        let ahead =
            |input: Option<(f64, String)>, total: &mut f64, said: &mut Vec<String>| match input {
                Some((a, text)) if a > asks.reactive => {
                    *total += w * a;
                    said.push(text);
                }
                _ => *total += w * asks.reactive,
            };
        ahead(asks.slope, &mut by_slope, &mut slope_parts);
        ahead(asks.forecast, &mut by_forecast, &mut forecast_parts);
        parts.push(if m.kind.is_utilization() {
            format!(
                "{} {}% over {}, target {}%",
                m.kind,
                num(avg.round()),
                human(m.window),
                num(m.target)
            )
        } else {
            format!(
                "{} {} over {}, target {} per {unit}",
                m.label(),
                num(round2(avg)),
                human(m.window),
                num(m.target)
            )
        });
    }
    if weights <= 0.0 {
        return None;
    }
    let (reactive, by_slope, by_forecast) = (
        reactive / weights,
        by_slope / weights,
        by_forecast / weights,
    );
    let mut desired = reactive;
    // The input that asks for most drives; a tie leaves the reactive one.
    if by_forecast > desired && by_forecast >= by_slope {
        desired = by_forecast;
        parts.push(format!(
            "ahead: {} (forecast drives)",
            forecast_parts.join(", ")
        ));
    } else if by_slope > desired {
        desired = by_slope;
        parts.push(format!("ahead: {} (trend drives)", slope_parts.join(", ")));
    }
    Some(Evaluated { desired, parts })
}

fn no_samples(policy: &AutoScalingPolicy) -> String {
    let names: Vec<String> = policy.spec.metrics.iter().map(MetricSpec::label).collect();
    if names.is_empty() {
        "no metrics; only schedules move it".into()
    } else {
        format!("no {} samples in their windows", names.join(", "))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// A number without a trailing `.0`: `75`, `0.5`.
fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml_spec: &str) -> AutoScalingPolicy {
        let text = format!(
            "apiVersion: novacron.io/v1\nkind: AutoScalingPolicy\nmetadata: {{name: p}}\nspec:\n{yaml_spec}"
        );
        parse_policy("p.yaml", &text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn explanation_names_the_metric_window_and_target() {
        let p = policy(
            "  target: {job: api}\n  minSize: 1\n  maxSize: 10\n  metrics:\n    - {type: cpu, target: 75, window: 5m}\n",
        );
        let obs = Observations {
            cpu: vec![Sample {
                at_ms: 1_000,
                value: 91.0,
            }],
            ..Observations::default()
        };
        let d = decide(&p, &ScaleState::new(4), &obs, 2_000);
        assert_eq!(d.to, 5);
        assert_eq!(d.explanation, "api 4 → 5: cpu 91% over 5m, target 75%");
    }

    fn requests(points: &[(u64, f64)]) -> Observations {
        let mut obs = Observations::default();
        obs.reported.insert(
            "requests".into(),
            points
                .iter()
                .map(|&(s, value)| Sample {
                    at_ms: s * 1000,
                    value,
                })
                .collect(),
        );
        obs
    }

    const QUEUE: &str = "  target: {job: shop}\n  minSize: 1\n  maxSize: 100\n  metrics:\n    - {type: queue, metric: requests, target: 100, window: 1m}\n  scaleOut: {cooldown: 0s, step: 1000%, stabilizationWindow: 0s}\n";

    #[test]
    fn a_rising_slope_scales_ahead_of_the_mean_and_says_so() {
        // Requests climb 10/s each second: 400 → 1000 over the last minute.
        let pts: Vec<(u64, f64)> = (0..=60)
            .step_by(5)
            .map(|s| (1000 + s, 400.0 + 10.0 * s as f64))
            .collect();
        let obs = requests(&pts);
        let reactive = decide(&policy(QUEUE), &ScaleState::new(7), &obs, 1_060_000);
        assert_eq!(
            reactive.to, 7,
            "the mean (700) asks for 7: {}",
            reactive.explanation
        );
        let p = policy(&format!("{QUEUE}  trend: {{lookahead: 2m}}\n"));
        let d = decide(&p, &ScaleState::new(7), &obs, 1_060_000);
        // The line is at 1000 now and 2200 two minutes on: 22 replicas.
        assert_eq!(d.to, 22, "{}", d.explanation);
        assert!(
            d.explanation
                .contains("requests rising 600 per minute, 2200 in 2m (trend drives)"),
            "{}",
            d.explanation
        );
    }

    #[test]
    fn a_falling_slope_does_not_scale_in_faster() {
        let pts: Vec<(u64, f64)> = (0..=60)
            .step_by(5)
            .map(|s| (1000 + s, 1000.0 - 10.0 * s as f64))
            .collect();
        let p = policy(&format!("{QUEUE}  trend: {{lookahead: 2m}}\n"));
        let with = decide(&p, &ScaleState::new(7), &requests(&pts), 1_060_000);
        let without = decide(
            &policy(QUEUE),
            &ScaleState::new(7),
            &requests(&pts),
            1_060_000,
        );
        assert_eq!(with, without);
        assert!(!with.explanation.contains("ahead"), "{}", with.explanation);
    }

    #[test]
    fn the_forecast_reads_the_history_past_the_window() {
        // Thirty minutes rising 20/s per minute, one sample a minute: the 1m
        // window holds one sample, too few for a slope; the history holds 31.
        let pts: Vec<(u64, f64)> = (0..=1800)
            .step_by(60)
            .map(|s| (s + 60, 100.0 + s as f64 / 3.0))
            .collect();
        let obs = requests(&pts);
        let p = policy(&format!(
            "{QUEUE}  trend: {{lookahead: 5m, history: 30m, confidence: 80}}\n"
        ));
        let d = decide(&p, &ScaleState::new(7), &obs, 1_860_000);
        // 700 now, about 800 in five minutes (the minute samples fill 30 s
        // buckets as a staircase), and the bound above it.
        assert!((8..=10).contains(&d.to), "{}", d.explanation);
        assert!(
            d.explanation.contains("requests forecast 80"),
            "{}",
            d.explanation
        );
        assert!(
            d.explanation.contains("(forecast drives)"),
            "{}",
            d.explanation
        );
        assert!(d.explanation.contains("80% bound"), "{}", d.explanation);
        assert_eq!(p.lookback(), Duration::from_secs(1800));
    }

    #[test]
    fn a_cpu_metric_forecasts_the_cpu_the_replicas_use_together() {
        // Four replicas of 1000m at 95% of their request now (flat over the
        // window: no slope), while together they went from 200m to 3800m over
        // twenty minutes: 180m more a minute.
        let now = 1_200_000;
        let obs = Observations {
            cpu: (0..6)
                .map(|i| Sample {
                    at_ms: now - i * 10_000,
                    value: 95.0,
                })
                .collect(),
            cpu_used: (0..=120)
                .map(|i| Sample {
                    at_ms: i * 10_000,
                    value: 200.0 + 180.0 * (i as f64 / 6.0),
                })
                .collect(),
            cpu_request_millis: 1000,
            ..Observations::default()
        };
        let p = policy(
            "  target: {job: api}\n  minSize: 1\n  maxSize: 20\n  metrics:\n    - {type: cpu, target: 75, window: 1m}\n  trend: {lookahead: 5m, history: 20m}\n",
        );
        let d = decide(&p, &ScaleState::new(4), &obs, now);
        // Reactive: 4 × 95 / 75 = 5.07 → 6. Forecast: about 4700m in five
        // minutes, over 750m a replica: 6.3, and its bound above → 7 or more.
        assert!((7..=9).contains(&d.to), "{}", d.explanation);
        assert!(
            d.explanation
                .contains("cpu in use (millicores) forecast 46"),
            "{}",
            d.explanation
        );
        assert!(
            d.explanation.contains("(forecast drives)"),
            "{}",
            d.explanation
        );
        // Without the request, nothing is forecast: the reactive ask stands.
        let without = Observations {
            cpu_request_millis: 0,
            ..obs
        };
        let d = decide(&p, &ScaleState::new(4), &without, now);
        assert_eq!(d.to, 6, "{}", d.explanation);
        assert!(!d.explanation.contains("forecast"), "{}", d.explanation);
    }

    #[test]
    fn trend_settings_are_checked() {
        let text = |t: &str| {
            format!(
                "apiVersion: novacron.io/v1\nkind: AutoScalingPolicy\nmetadata: {{name: p}}\nspec:\n  target: {{job: api}}\n  minSize: 1\n  maxSize: 10\n  metrics:\n    - {{type: cpu, target: 75}}\n  trend: {t}\n"
            )
        };
        for (t, want) in [
            ("{lookahead: 0s}", "spec.trend.lookahead"),
            ("{lookahead: 2h}", "expected a lookahead from 1s to 1h"),
            (
                "{lookahead: 1m, confidence: 40}",
                "expected a percentage from 50 to 99.9",
            ),
            (
                "{lookahead: 1m, history: 90s}",
                "shorter than twice the lookahead",
            ),
            ("{lookahead: 1m, horizon: 5m}", "unknown field"),
            (
                "{lookahead: 1m, season: 24h}",
                "needs a history to forecast from",
            ),
            (
                "{lookahead: 1m, history: 30h, season: 24h}",
                "expected a season of at least 10m and a history of at least two seasons",
            ),
        ] {
            let e = parse_policy("p.yaml", &text(t)).expect_err(t).to_string();
            assert!(e.contains(want), "{t}: {e}");
        }
        assert!(parse_policy("p.yaml", &text("{lookahead: 90s}")).is_ok());
        // A job's CPU in use is a demand to forecast; its memory is not.
        assert!(parse_policy("p.yaml", &text("{lookahead: 1m, history: 30m}")).is_ok());
        let memory = text("{lookahead: 1m, history: 30m}").replace("type: cpu", "type: memory");
        let e = parse_policy("p.yaml", &memory)
            .expect_err("memory")
            .to_string();
        assert!(e.contains("a forecast needs a demand"), "{e}");
    }

    #[test]
    fn numbers_print_without_trailing_zero() {
        assert_eq!(num(75.0), "75");
        assert_eq!(num(0.5), "0.5");
    }
}

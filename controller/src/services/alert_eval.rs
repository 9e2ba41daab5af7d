//! The alert evaluation loop of the leading controller: every interval it
//! gathers what the rules read, once however many rules read it (one history
//! query per metric and window, so 1,000 rules over the same metrics cost what
//! one does), then hands it to [`Alerts::evaluate`]. Kept apart from
//! [`crate::services::alerts`] because it reads the whole [`ApiState`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use novacron_api::metrics::{MetricsQuery, StepFn};
use novacron_common::alert::catalog::{self, Source};
use novacron_common::alert::expr::{Agg, Subject, ValueRef};
use novacron_common::clock::unix_ms;
use novacron_common::fleet::NodeStatus;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::services::alerts::Alerts;
use crate::services::alerts::facts::{Facts, INSTANT_LOOKBACK_MS};
use crate::services::context::ApiState;
use crate::services::history::MetricsHistory;

/// The most steps a window query reads (the aggregate is over the steps'
/// values).
const MAX_WINDOW_STEPS: u64 = 600;

/// Runs the evaluation every interval until `cancel` (the leader's term).
pub async fn run(this: Arc<Alerts>, st: Arc<ApiState>, cancel: CancellationToken) {
    // The state of the previous term (this controller's or another's) first:
    // evaluating without it would fire and notify again what already fired. A
    // store that cannot be read stops alerting, never the rest of the leader.
    let mut wait = Duration::from_secs(1);
    loop {
        let me = this.clone();
        match tokio::task::spawn_blocking(move || me.load()).await {
            Ok(Ok(())) => break,
            Ok(Err(error)) => {
                warn!(%error, "cannot load the alerting state; alerts are not evaluated until it loads")
            }
            Err(error) => warn!(%error, "loading the alerting state panicked"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(30));
    }
    let sender = tokio::spawn(crate::services::alerts::deliver::run(
        this.clone(),
        cancel.clone(),
    ));
    let mut ticker = novacron_common::ticker::Ticker::new(
        this.interval(),
        tokio::time::MissedTickBehavior::Delay,
        cancel.cancelled(),
    );
    while ticker.tick().await {
        let (me, st) = (this.clone(), st.clone());
        let round = tokio::task::spawn_blocking(move || {
            let now = SystemTime::now();
            let f = gather(&st, &me, now);
            me.evaluate(&f, now)
        })
        .await;
        match round {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => warn!(%error, "alert evaluation could not save its state"),
            Err(error) => warn!(%error, "alert evaluation panicked"),
        }
    }
    sender.abort();
}

/// Gathers what `alerts`' rules need now.
pub fn gather(st: &ApiState, alerts: &Alerts, now: SystemTime) -> Facts {
    let rules = alerts.rules();
    let needed: BTreeSet<ValueRef> = rules
        .iter()
        .flat_map(|r| r.expr.values().into_iter().cloned())
        .collect();
    let kinds: BTreeSet<Subject> = rules
        .iter()
        .map(|r| r.subject)
        .chain(needed.iter().map(|v| v.subject))
        .collect();
    let now_ms = unix_ms(now);
    let mut f = Facts::default();
    let views = if kinds.contains(&Subject::Node) || kinds.contains(&Subject::Fleet) {
        st.registry.views(std::time::Instant::now())
    } else {
        Vec::new()
    };
    if kinds.contains(&Subject::Node) {
        let nodes = f.subjects.entry(Subject::Node).or_default();
        for n in views.iter().filter(|n| !n.warm) {
            let mut labels = BTreeMap::from([("node".to_string(), n.name.clone())]);
            for key in ["pool", "zone", "capacity"] {
                if let Some(v) = n.labels.get(key) {
                    labels.insert(key.to_string(), v.clone());
                }
            }
            nodes.insert(n.name.clone(), labels);
        }
    }
    let allocs = if kinds.contains(&Subject::Alloc) || kinds.contains(&Subject::Job) {
        st.workloads.allocations(None, None)
    } else {
        Vec::new()
    };
    if kinds.contains(&Subject::Alloc) {
        let subjects = f.subjects.entry(Subject::Alloc).or_default();
        for a in allocs.iter().filter(|a| !a.state.is_terminal()) {
            subjects.insert(
                a.id.clone(),
                BTreeMap::from([
                    ("alloc".to_string(), a.id.clone()),
                    ("job".to_string(), a.job.clone()),
                    ("node".to_string(), a.node.clone()),
                ]),
            );
        }
    }
    let jobs = if kinds.contains(&Subject::Job) {
        st.workloads.jobs()
    } else {
        Vec::new()
    };
    if kinds.contains(&Subject::Job) {
        let subjects = f.subjects.entry(Subject::Job).or_default();
        for j in &jobs {
            subjects.insert(
                j.name.clone(),
                BTreeMap::from([("job".to_string(), j.name.clone())]),
            );
        }
    }
    let migrations = if kinds.contains(&Subject::Migration) {
        st.migrations.list()
    } else {
        Vec::new()
    };
    const HOUR_MS: u64 = 3_600_000;
    let recent_migrations: Vec<_> = migrations
        .iter()
        .filter(|m| {
            m.finished_unix_ms
                .is_none_or(|t| now_ms.saturating_sub(t) <= HOUR_MS)
        })
        .collect();
    if kinds.contains(&Subject::Migration) {
        let subjects = f.subjects.entry(Subject::Migration).or_default();
        for m in &recent_migrations {
            subjects.insert(
                m.id.clone(),
                BTreeMap::from([
                    ("migration".to_string(), m.id.clone()),
                    ("alloc".to_string(), m.alloc.clone()),
                    ("job".to_string(), m.job.clone()),
                    ("node".to_string(), m.from.clone()),
                ]),
            );
        }
    }
    let needs_costs = needed.iter().any(|v| {
        v.metric == "cost_per_hour" || v.metric == "budgets_exceeded" || v.subject == Subject::Pool
    }) || kinds.contains(&Subject::Pool);
    let report = needs_costs.then(|| crate::services::costs::live_report(st));
    if kinds.contains(&Subject::Pool)
        && let Some(r) = &report
    {
        let subjects = f.subjects.entry(Subject::Pool).or_default();
        for p in r.pools.iter().filter(|p| p.name != "-") {
            subjects.insert(
                p.name.clone(),
                BTreeMap::from([("pool".to_string(), p.name.clone())]),
            );
        }
    }
    let restarts = if needed
        .iter()
        .any(|v| v.subject == Subject::Alloc && v.metric == "restarts_recent")
    {
        let seen: Vec<(String, u32)> = allocs
            .iter()
            .filter(|a| !a.state.is_terminal())
            .map(|a| (a.id.clone(), a.restarts))
            .collect();
        alerts.recent_restarts(&seen, now_ms)
    } else {
        HashMap::new()
    };
    let from_history: Vec<(&ValueRef, &str)> = needed
        .iter()
        .filter_map(|v| match catalog::find(v.subject, &v.metric)?.source {
            Source::History(series) => Some((v, series)),
            Source::State => None,
        })
        .collect();
    if let Some(h) = &st.history {
        history_values(h, &mut f, &from_history, now);
    }
    for v in &needed {
        let Some(m) = catalog::find(v.subject, &v.metric) else {
            continue;
        };
        match m.source {
            Source::History(_) => {}
            Source::State => {
                let key = (v.subject, v.metric.as_str());
                match key {
                    (Subject::Node, "up") => {
                        for n in views.iter().filter(|n| !n.warm) {
                            let up = if n.status == NodeStatus::Ready {
                                1.0
                            } else {
                                0.0
                            };
                            f.put(v, &n.name, up);
                        }
                    }
                    (Subject::Node, "cert_expiry_days") => {
                        for n in &views {
                            if let Some(t) = n.cert_expires_unix_ms {
                                f.put(v, &n.name, (t as f64 - now_ms as f64) / 86_400_000.0);
                            }
                        }
                    }
                    (Subject::Node, "cost_per_hour") => {
                        for n in report.iter().flat_map(|r| &r.nodes) {
                            f.put(v, &n.node, n.hourly);
                        }
                    }
                    (Subject::Alloc, "restarts") => {
                        for a in allocs.iter().filter(|a| !a.state.is_terminal()) {
                            f.put(v, &a.id, f64::from(a.restarts));
                        }
                    }
                    (Subject::Alloc, "restarts_recent") => {
                        for (id, n) in &restarts {
                            f.put(v, id, f64::from(*n));
                        }
                    }
                    (Subject::Job, "replicas_desired") => {
                        for j in &jobs {
                            f.put(v, &j.name, f64::from(j.replicas));
                        }
                    }
                    (Subject::Job, "replicas_running") => {
                        for j in &jobs {
                            f.put(v, &j.name, f64::from(j.running));
                        }
                    }
                    (Subject::Job, "replicas_missing") => {
                        for j in &jobs {
                            f.put(v, &j.name, f64::from(j.replicas.saturating_sub(j.running)));
                        }
                    }
                    (Subject::Job, "cost_per_hour") => {
                        for j in report.iter().flat_map(|r| &r.jobs) {
                            f.put(v, &j.name, j.hourly);
                        }
                    }
                    (Subject::Pool, "cost_per_hour") => {
                        for p in report.iter().flat_map(|r| &r.pools) {
                            f.put(v, &p.name, p.hourly);
                        }
                    }
                    (Subject::Pool, "nodes") => {
                        for p in report.iter().flat_map(|r| &r.pools) {
                            f.put(v, &p.name, f64::from(p.count));
                        }
                    }
                    (Subject::Migration, "failed") => {
                        for m in &recent_migrations {
                            let failed = m.phase == novacron_api::Phase::RolledBack;
                            f.put(v, &m.id, if failed { 1.0 } else { 0.0 });
                        }
                    }
                    (Subject::Fleet, "cost_per_hour") => {
                        if let Some(r) = &report {
                            f.put(v, "fleet", r.total_hourly);
                        }
                    }
                    (Subject::Fleet, "budgets_exceeded") => {
                        if let Some(r) = &report {
                            let n = r.budgets.iter().filter(|b| b.exceeded).count();
                            f.put(v, "fleet", n as f64);
                        }
                    }
                    (Subject::Fleet, "nodes_down") => {
                        let n = views
                            .iter()
                            .filter(|n| !n.warm && n.status != NodeStatus::Ready)
                            .count();
                        f.put(v, "fleet", n as f64);
                    }
                    _ => debug!(value = %v, "no source for this alert value"),
                }
            }
        }
    }
    f
}

/// Reads `values` (all of one metric-history series and one subject kind is
/// best, but any mix works) from the metrics history in as few queries as
/// possible: one per series for the newest points (within
/// [`INSTANT_LOOKBACK_MS`]), and one per series and function for every window
/// of it (`avg(m, 1m)` … `avg(m, 10m)` share one query over the longest, at a
/// step of a tenth of the shortest, and each window aggregates its last
/// steps). Answers how many queries it made.
pub fn history_values(
    h: &MetricsHistory,
    f: &mut Facts,
    values: &[(&ValueRef, &str)],
    now: SystemTime,
) -> usize {
    let mut groups: BTreeMap<(&str, Subject, Option<Agg>), Vec<&ValueRef>> = BTreeMap::new();
    for (v, series) in values {
        groups
            .entry((series, v.subject, v.window.map(|(a, _)| a)))
            .or_default()
            .push(v);
    }
    let mut queries = 0;
    for ((series, subject, agg), refs) in groups {
        let windows: Vec<u64> = refs
            .iter()
            .map(|v| {
                v.window.map_or(INSTANT_LOOKBACK_MS, |(_, w)| {
                    u64::try_from(w.as_millis()).unwrap_or(u64::MAX)
                })
            })
            .collect();
        let longest = windows.iter().copied().max().unwrap_or(INSTANT_LOOKBACK_MS);
        let shortest = windows.iter().copied().min().unwrap_or(INSTANT_LOOKBACK_MS);
        let step_ms = (shortest / 10).max(longest / MAX_WINDOW_STEPS).max(1000) / 1000 * 1000;
        let function = match agg {
            None => StepFn::Last,
            Some(Agg::Avg) => StepFn::Mean,
            Some(Agg::Min) => StepFn::Min,
            Some(Agg::Max) => StepFn::Max,
        };
        let now_ms = unix_ms(now);
        let q = MetricsQuery {
            metric: series.to_string(),
            from: Some(now_ms.saturating_sub(longest).to_string()),
            to: Some(now_ms.to_string()),
            step: Some(format!("{step_ms}ms")),
            function: Some(function),
            ..MetricsQuery::default()
        };
        queries += 1;
        let answer = match h.query(&q, &|_| true, now) {
            Ok(a) => a,
            Err(e) => {
                debug!(series, error = ?e, "alert history query failed");
                continue;
            }
        };
        let key = if subject == Subject::Alloc {
            "allocation"
        } else {
            "node"
        };
        for s in &answer.series {
            let Some(name) = s.labels.get(key) else {
                continue;
            };
            for (v, window) in refs.iter().zip(&windows) {
                // The steps that lie within the window, newest last.
                let k = usize::try_from(window.div_ceil(step_ms)).unwrap_or(usize::MAX);
                let recent = &s.values[s.values.len().saturating_sub(k)..];
                let points = recent.iter().flatten().copied();
                let value = match function {
                    StepFn::Last => s.values.iter().rev().flatten().next().copied(),
                    StepFn::Mean => {
                        let (sum, n) = points.fold((0.0, 0u32), |(s, n), x| (s + x, n + 1));
                        (n > 0).then(|| sum / f64::from(n))
                    }
                    StepFn::Min => points.reduce(f64::min),
                    StepFn::Max => points.reduce(f64::max),
                };
                if let Some(x) = value {
                    f.put(v, name, x);
                }
            }
        }
    }
    queries
}

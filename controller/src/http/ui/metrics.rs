//! The charts' data: one metric of a node or a job over a range, from the
//! metrics history (as `GET /v1/metrics/query` answers it), or from the node's
//! in-memory window when the history is turned off.

use std::time::SystemTime;

use axum::http::StatusCode;
use novacron_api::{MetricsQuery, SeriesAgg, StepFn};
use novacron_common::clock::unix_ms;

use super::Ui;
use super::chart::{Scale, Series};

/// The ranges the pickers offer: `(query value, label, milliseconds)`.
pub const RANGES: &[(&str, &str, u64)] = &[
    ("15m", "15 min", 15 * 60_000),
    ("1h", "1 hour", 3_600_000),
    ("6h", "6 hours", 6 * 3_600_000),
    ("24h", "24 hours", 24 * 3_600_000),
];

/// The range a `?range=` names (the first, 15 minutes, when unknown).
pub fn range(text: Option<&str>) -> (&'static str, u64) {
    RANGES
        .iter()
        .find(|(v, _, _)| Some(*v) == text)
        .map_or((RANGES[0].0, RANGES[0].2), |(v, _, ms)| (v, *ms))
}

/// A chart a page can show: its path segment, title and scale.
#[derive(Debug, Clone, Copy)]
pub struct ChartKind {
    /// The metric in the history.
    pub metric: &'static str,
    /// The chart's title.
    pub title: &'static str,
    /// How its values read.
    pub scale: Scale,
}

/// The charts of a node page.
pub const NODE_CHARTS: &[ChartKind] = &[
    ChartKind {
        metric: "cpu_percent",
        title: "CPU",
        scale: Scale::Percent,
    },
    ChartKind {
        metric: "memory_percent",
        title: "Memory",
        scale: Scale::Percent,
    },
];

/// The charts of a job page (its allocations summed).
pub const JOB_CHARTS: &[ChartKind] = &[
    ChartKind {
        metric: "alloc_cpu_percent",
        title: "CPU (percent of one core, all replicas)",
        scale: Scale::Open,
    },
    ChartKind {
        metric: "alloc_memory_bytes",
        title: "Memory (all replicas)",
        scale: Scale::Bytes,
    },
];

/// Which node or job a chart is of.
#[derive(Debug, Clone)]
pub enum Subject {
    /// A node's own metric.
    Node(String),
    /// The sum over a job's allocations.
    Job(String),
}

/// The points of `metric` for `subject` over the last `range_ms`, about 300 of
/// them. Runs the query off the async workers (it decodes chunks).
pub async fn series(
    ui: &Ui,
    subject: Subject,
    metric: &str,
    range_ms: u64,
) -> Result<Series, (StatusCode, String)> {
    let now = SystemTime::now();
    let to_ms = unix_ms(now);
    let from_ms = to_ms.saturating_sub(range_ms);
    let Some(history) = ui.api.history.clone() else {
        return Ok(match subject {
            Subject::Node(node) => window_series(ui, &node, metric, from_ms, to_ms),
            Subject::Job(_) => Series {
                from_ms,
                to_ms,
                points: Vec::new(),
            },
        });
    };
    let mut q = MetricsQuery {
        metric: metric.to_owned(),
        from: Some(from_ms.to_string()),
        to: Some(to_ms.to_string()),
        function: Some(StepFn::Mean),
        ..MetricsQuery::default()
    };
    match subject {
        Subject::Node(node) => q.node = Some(node),
        Subject::Job(job) => {
            q.job = Some(job);
            q.agg = Some(SeriesAgg::Sum);
        }
    }
    let answer = ui
        .api
        .heavy
        .run(move || history.query(&q, &|_| true, now))
        .await
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
        .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
    let values = answer
        .series
        .first()
        .map(|s| s.values.clone())
        .unwrap_or_default();
    Ok(Series {
        from_ms: answer.from_unix_ms,
        to_ms: answer.to_unix_ms,
        points: answer.timestamps.into_iter().zip(values).collect(),
    })
}

/// The node's recent samples from the registry's window (history turned off).
fn window_series(ui: &Ui, node: &str, metric: &str, from_ms: u64, to_ms: u64) -> Series {
    let samples = ui
        .api
        .registry
        .window(node)
        .map(|w| w.samples)
        .unwrap_or_default();
    let points = samples
        .iter()
        .filter(|s| s.at_unix_ms >= from_ms)
        .map(|s| {
            let v = match metric {
                "cpu_percent" => Some(f64::from(s.cpu.total_percent)),
                "memory_percent" if s.memory.total_bytes > 0 => {
                    Some(s.memory.used_bytes as f64 * 100.0 / s.memory.total_bytes as f64)
                }
                _ => None,
            };
            (s.at_unix_ms, v)
        })
        .collect();
    Series {
        from_ms,
        to_ms,
        points,
    }
}

//! `GET /v1/metrics/query` and `GET /v1/metrics/storage`: the controller's
//! metrics history, as `novacron metrics` and `novacron top` read it.
//!
//! The history holds one series per (source, metric, label): a node's CPU, a
//! disk's used bytes, an allocation's memory. [`NODE_METRICS`] and
//! [`ALLOC_METRICS`] name what is recorded.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a metric describes, and the label that tells its series apart on one
/// source (a disk's mount, an interface, a GPU's index), if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricInfo {
    /// Its name in queries.
    pub name: &'static str,
    /// The per-source label (`mount`, `interface`, `gpu`), if the source has
    /// several.
    pub label: Option<&'static str>,
    /// Its unit, for display.
    pub unit: Unit,
    /// What it is.
    pub help: &'static str,
}

/// How a value is displayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    /// 0–100 (or more, for an allocation's CPU: percent of one core).
    Percent,
    /// Bytes.
    Bytes,
    /// Bytes per second.
    BytesPerSecond,
    /// Degrees Celsius.
    Celsius,
    /// Watts.
    Watts,
    /// A plain number (load average).
    Number,
}

/// The metrics recorded for every node, from its agent's samples.
pub const NODE_METRICS: &[MetricInfo] = &[
    metric("cpu_percent", None, Unit::Percent, "whole-host CPU use"),
    metric("load1", None, Unit::Number, "load average over 1 minute"),
    metric("load5", None, Unit::Number, "load average over 5 minutes"),
    metric("load15", None, Unit::Number, "load average over 15 minutes"),
    metric(
        "memory_percent",
        None,
        Unit::Percent,
        "memory in use over total",
    ),
    metric("memory_used_bytes", None, Unit::Bytes, "memory in use"),
    metric(
        "memory_available_bytes",
        None,
        Unit::Bytes,
        "memory available",
    ),
    metric("memory_total_bytes", None, Unit::Bytes, "memory installed"),
    metric("swap_used_bytes", None, Unit::Bytes, "swap in use"),
    metric(
        "disk_percent",
        Some("mount"),
        Unit::Percent,
        "filesystem use, as df's Use%",
    ),
    metric(
        "disk_used_bytes",
        Some("mount"),
        Unit::Bytes,
        "filesystem space in use",
    ),
    metric(
        "disk_available_bytes",
        Some("mount"),
        Unit::Bytes,
        "filesystem space available",
    ),
    metric(
        "disk_read_bytes_per_sec",
        Some("mount"),
        Unit::BytesPerSecond,
        "device reads",
    ),
    metric(
        "disk_written_bytes_per_sec",
        Some("mount"),
        Unit::BytesPerSecond,
        "device writes",
    ),
    metric(
        "network_rx_bytes_per_sec",
        Some("interface"),
        Unit::BytesPerSecond,
        "received",
    ),
    metric(
        "network_tx_bytes_per_sec",
        Some("interface"),
        Unit::BytesPerSecond,
        "transmitted",
    ),
    metric(
        "gpu_utilization_percent",
        Some("gpu"),
        Unit::Percent,
        "GPU busy",
    ),
    metric(
        "gpu_memory_used_bytes",
        Some("gpu"),
        Unit::Bytes,
        "GPU memory in use",
    ),
    metric(
        "gpu_temperature_celsius",
        Some("gpu"),
        Unit::Celsius,
        "GPU temperature",
    ),
    metric(
        "gpu_power_watts",
        Some("gpu"),
        Unit::Watts,
        "GPU power draw",
    ),
];

/// The metrics recorded for every allocation, from its node's samples.
pub const ALLOC_METRICS: &[MetricInfo] = &[
    metric(
        "alloc_cpu_percent",
        None,
        Unit::Percent,
        "CPU, percent of one core",
    ),
    metric("alloc_memory_bytes", None, Unit::Bytes, "memory in use"),
    metric(
        "alloc_memory_limit_bytes",
        None,
        Unit::Bytes,
        "memory limit (0: none)",
    ),
    metric(
        "alloc_rx_bytes_per_sec",
        None,
        Unit::BytesPerSecond,
        "received",
    ),
    metric(
        "alloc_tx_bytes_per_sec",
        None,
        Unit::BytesPerSecond,
        "transmitted",
    ),
];

const fn metric(
    name: &'static str,
    label: Option<&'static str>,
    unit: Unit,
    help: &'static str,
) -> MetricInfo {
    MetricInfo {
        name,
        label,
        unit,
        help,
    }
}

/// The metric called `name`, node or allocation.
pub fn metric_info(name: &str) -> Option<&'static MetricInfo> {
    NODE_METRICS
        .iter()
        .chain(ALLOC_METRICS)
        .find(|m| m.name == name)
}

/// How the points of one series within a step become one value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum StepFn {
    /// The mean of the points.
    #[default]
    Mean,
    /// The smallest.
    Min,
    /// The largest.
    Max,
    /// The newest.
    Last,
}

impl StepFn {
    /// Its name in queries.
    pub fn as_str(self) -> &'static str {
        match self {
            StepFn::Mean => "mean",
            StepFn::Min => "min",
            StepFn::Max => "max",
            StepFn::Last => "last",
        }
    }
}

/// How the selected series combine at each step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum SeriesAgg {
    /// Each series on its own.
    #[default]
    None,
    /// Their sum.
    Sum,
    /// Their mean.
    Mean,
    /// The smallest.
    Min,
    /// The largest.
    Max,
    /// How many have a value.
    Count,
}

impl SeriesAgg {
    /// Its name in queries.
    pub fn as_str(self) -> &'static str {
        match self {
            SeriesAgg::None => "none",
            SeriesAgg::Sum => "sum",
            SeriesAgg::Mean => "mean",
            SeriesAgg::Min => "min",
            SeriesAgg::Max => "max",
            SeriesAgg::Count => "count",
        }
    }
}

/// `GET /v1/metrics/query`'s parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[serde(deny_unknown_fields)]
pub struct MetricsQuery {
    /// The metric (`cpu_percent`, `alloc_memory_bytes`, …; `GET
    /// /v1/metrics/storage` lists them).
    pub metric: String,
    /// The start: Unix milliseconds, or a duration before `to` (`1h`, `30m`).
    /// Default: one hour before `to`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The end: Unix milliseconds, or `now` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The step between points (`15s`, `1m`). Default: the range over 300,
    /// rounded up to a whole second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// Within a step: `mean` (default), `min`, `max` or `last`.
    #[serde(default, rename = "fn", skip_serializing_if = "Option::is_none")]
    pub function: Option<StepFn>,
    /// Across series: `none` (default: each series), `sum`, `mean`, `min`,
    /// `max` or `count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agg: Option<SeriesAgg>,
    /// Only this node's series (or its allocations').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Only this job's allocations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// Only this allocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<String>,
    /// Only nodes whose labels match (`pool=gpu,zone=a`; for allocation
    /// metrics, the allocations' nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Read this tier first: `raw`, `1m` or `1h`. Default: by the step (raw
    /// below a minute, 1m below an hour, else 1h). Hours the tier no longer
    /// (or does not yet) hold come from the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<String>,
}

/// `GET /v1/metrics/query`'s answer: points aligned on `timestamps`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetricsQueryResult {
    /// The metric.
    pub metric: String,
    /// The first step's start, Unix milliseconds (a multiple of the step).
    pub from_unix_ms: u64,
    /// The end of the range, Unix milliseconds.
    pub to_unix_ms: u64,
    /// The step, milliseconds.
    pub step_ms: u64,
    /// Within a step.
    #[serde(rename = "fn")]
    pub function: StepFn,
    /// Across series.
    pub agg: SeriesAgg,
    /// Which data answered: `raw`, `1m` or `1h` (rollups), or several joined
    /// with `+` where the range crosses a retention boundary.
    pub resolution: String,
    /// Each step's start, Unix milliseconds.
    pub timestamps: Vec<u64>,
    /// The series, each with one value (or null: no data) per timestamp.
    pub series: Vec<SeriesPoints>,
}

/// One series of a query's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SeriesPoints {
    /// Its labels: `node`, and `allocation` and `job` for allocation metrics,
    /// and the metric's own label (`mount`, `interface`, `gpu`); empty when
    /// the series were aggregated.
    pub labels: BTreeMap<String, String>,
    /// One value per timestamp; null where the series has no point.
    pub values: Vec<Option<f64>>,
}

/// `GET /v1/metrics/storage`: what the history holds and what it costs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistoryStats {
    /// Series with a point in the head.
    pub series: u64,
    /// Sources (nodes and allocations) with an open chunk.
    pub sources: u64,
    /// Values in open (in-memory) chunks.
    pub head_values: u64,
    /// Bytes those chunks take (encoded bits and their bookkeeping).
    pub head_bytes: u64,
    /// The head's memory budget, bytes.
    pub head_budget_bytes: u64,
    /// Bytes per value in the head.
    pub head_bytes_per_value: f64,
    /// Values in closed chunks on disk, full resolution.
    pub disk_values: u64,
    /// Bytes of full-resolution files on disk.
    pub disk_bytes: u64,
    /// Bytes per value on disk, full resolution.
    pub disk_bytes_per_value: f64,
    /// Bytes of the 1-minute and 1-hour rollup files.
    pub rollup_bytes: u64,
    /// Open chunks closed early because the head went over its budget.
    pub budget_evictions: u64,
    /// Chunks skipped because they were corrupt (logged).
    pub corrupt_chunks: u64,
    /// The oldest full-resolution point kept, Unix milliseconds.
    pub oldest_raw_unix_ms: Option<u64>,
    /// The retention of each tier: raw, 1m, 1h (seconds).
    pub retention_secs: [u64; 3],
    /// Every metric name, node ones then allocation ones.
    pub metrics: Vec<String>,
}

/// One file of `GET /v1/metrics/files`: a segment of the metrics history, which
/// a follower of a controller group copies so that it holds the history when it
/// takes over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistoryFile {
    /// Its tier: `raw`, `1m` or `1h`.
    pub tier: String,
    /// The start of the span it holds, Unix milliseconds (its name).
    pub start_ms: i64,
    /// Its length in bytes (whole records).
    pub bytes: u64,
    /// Its first record's header as one number (0: empty): a file replaced
    /// by compaction starts differently.
    pub first: u64,
}

/// `GET /v1/metrics/files/{tier}/{start}`'s parameters: where the caller's
/// copy ends, and where its last record starts with that record's CRC-32 (the
/// controller checks that this record is its own before it sends more).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
#[serde(deny_unknown_fields)]
pub struct HistoryFileRange {
    /// The copy's length: records after it are sent (default 0).
    #[serde(default)]
    pub offset: u64,
    /// Where the copy's last record starts (needed when `offset` > 0).
    pub last_at: Option<u64>,
    /// That record's CRC-32.
    pub last_crc: Option<u32>,
}

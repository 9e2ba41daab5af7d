//! The metrics history: every accepted node sample becomes points of the
//! node's series and of its allocations' series in a [`novacron_tsdb::History`]
//! under `<data_dir>/history`, and `GET /v1/metrics/query`, the autoscaler and
//! the cost recommendations read them back through [`MetricsHistory::query`]
//! and [`MetricsHistory::window`].
//!
//! Sources: a node is `n␟<node>`, an allocation `a␟<node>␟<job>␟<allocation>`
//! (␟ is U+001F, which no name may hold). Values are quantized to the
//! resolution their source has (percentages to 0.01, memory to the KiB the
//! kernel counts in, power to the milliwatt NVML gives).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use novacron_api::metrics::{ALLOC_METRICS, MetricInfo, NODE_METRICS, metric_info};
use novacron_api::{
    HistoryStats, MetricsQuery, MetricsQueryResult, MetricsWindow, SeriesAgg, SeriesPoints, StepFn,
};
use novacron_common::wire::{AllocationUsage, CpuSample, GpuSample, MemorySample, NodeSample};
use novacron_tsdb::{ColumnRef, Encoding, History, Query, Reduce, Tier};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::services::events::{CONTROLLER, EventLog, NewEvent, kind};
use crate::services::remote_write::{RemoteWriteSettings, RemoteWriter, node_series_with};
use crate::state::registry::SampleSink;

/// Separates the parts of a source key.
const SEP: char = '\u{1f}';
/// The most steps a query may ask for.
pub const MAX_STEPS: u64 = 11_000;
/// The default number of steps when a query names no step.
pub const DEFAULT_STEPS: u64 = 300;
/// How often the rollups and retention run.
pub const MAINTAIN_EVERY: Duration = Duration::from_secs(60);

/// `[history]` in controller.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistorySettings {
    /// Record metrics history (default true).
    pub enabled: bool,
    /// The head's memory budget, MiB (default 128).
    pub head_budget_mib: u64,
    /// Points per chunk (default 120): a chunk is written when full, so a
    /// crash (or, in a group, a failover) loses at most this many points of
    /// each source; fewer compress less well.
    pub chunk_points: u32,
    /// How long full-resolution points are kept (default 24h).
    #[serde(with = "humantime_serde")]
    pub raw_retention: Duration,
    /// How long 1-minute rollups are kept (default 30 days).
    #[serde(with = "humantime_serde")]
    pub minute_retention: Duration,
    /// How long 1-hour rollups are kept (default 90 days).
    #[serde(with = "humantime_serde")]
    pub hour_retention: Duration,
    /// Prometheus remote_write out, if set.
    pub remote_write: Option<RemoteWriteSettings>,
}

impl Default for HistorySettings {
    fn default() -> HistorySettings {
        HistorySettings {
            enabled: true,
            head_budget_mib: 128,
            chunk_points: 120,
            raw_retention: Duration::from_secs(24 * 3600),
            minute_retention: Duration::from_secs(30 * 86_400),
            hour_retention: Duration::from_secs(90 * 86_400),
            remote_write: None,
        }
    }
}

impl HistorySettings {
    /// Checks the values; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.head_budget_mib == 0 || self.head_budget_mib > 1 << 20 {
            return Err(format!(
                "history.head_budget_mib = {}: use 1 to 1048576 (MiB)",
                self.head_budget_mib
            ));
        }
        if !(2..=10_000).contains(&self.chunk_points) {
            return Err(format!(
                "history.chunk_points = {}: use 2 to 10000",
                self.chunk_points
            ));
        }
        let hour = Duration::from_secs(3600);
        for (key, v) in [
            ("raw_retention", self.raw_retention),
            ("minute_retention", self.minute_retention),
            ("hour_retention", self.hour_retention),
        ] {
            if v < hour {
                return Err(format!(
                    "history.{key} = {}: keep at least 1h",
                    humantime::format_duration(v)
                ));
            }
        }
        if let Some(rw) = &self.remote_write {
            rw.validate()?;
        }
        Ok(())
    }
}

/// An allocation's job by its id.
pub type JobLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The controller's metrics history.
pub struct MetricsHistory {
    db: History,
    /// An allocation's job, from the workloads (set once they are loaded).
    jobs: OnceLock<JobLookup>,
    remote: Option<RemoteWriter>,
}

impl std::fmt::Debug for MetricsHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsHistory")
            .field("db", &self.db)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(ms)
        .unwrap_or(0)
}

const fn int(scale: f64) -> Encoding {
    Encoding::Int { scale }
}

fn col<'a>(metric: &'a str, label: &'a str, encoding: Encoding) -> ColumnRef<'a> {
    ColumnRef {
        metric,
        label,
        encoding,
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        f64::NAN
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

/// A node sample as history columns and values.
fn node_columns<'a>(s: &'a NodeSample, cols: &mut Vec<ColumnRef<'a>>, vals: &mut Vec<f64>) {
    let mut put = |c: ColumnRef<'a>, v: f64| {
        cols.push(c);
        vals.push(v);
    };
    let p = int(0.01);
    let kib = int(1024.0);
    let one = int(1.0);
    put(col("cpu_percent", "", p), f64::from(s.cpu.total_percent));
    put(col("load1", "", p), f64::from(s.cpu.load[0]));
    put(col("load5", "", p), f64::from(s.cpu.load[1]));
    put(col("load15", "", p), f64::from(s.cpu.load[2]));
    let m = &s.memory;
    put(
        col("memory_percent", "", p),
        percent(m.used_bytes, m.total_bytes),
    );
    put(col("memory_used_bytes", "", kib), m.used_bytes as f64);
    put(
        col("memory_available_bytes", "", kib),
        m.available_bytes as f64,
    );
    put(col("memory_total_bytes", "", kib), m.total_bytes as f64);
    put(col("swap_used_bytes", "", kib), m.swap_used_bytes as f64);
    for d in &s.disks {
        let l = d.mount.as_str();
        put(
            col("disk_percent", l, p),
            percent(d.used(), d.used() + d.available_bytes),
        );
        put(col("disk_used_bytes", l, one), d.used() as f64);
        put(
            col("disk_available_bytes", l, one),
            d.available_bytes as f64,
        );
        put(
            col("disk_read_bytes_per_sec", l, one),
            d.read_bytes_per_sec as f64,
        );
        put(
            col("disk_written_bytes_per_sec", l, one),
            d.written_bytes_per_sec as f64,
        );
    }
    for n in &s.networks {
        let l = n.interface.as_str();
        put(
            col("network_rx_bytes_per_sec", l, one),
            n.rx_bytes_per_sec as f64,
        );
        put(
            col("network_tx_bytes_per_sec", l, one),
            n.tx_bytes_per_sec as f64,
        );
    }
    for g in &s.gpus {
        let l = g.uuid.as_str();
        put(
            col("gpu_utilization_percent", l, one),
            f64::from(g.utilization_percent),
        );
        put(
            col("gpu_memory_used_bytes", l, one),
            g.memory_used_bytes as f64,
        );
        put(
            col("gpu_temperature_celsius", l, one),
            f64::from(g.temperature_celsius),
        );
        put(
            col("gpu_power_watts", l, int(0.001)),
            f64::from(g.power_milliwatts) / 1000.0,
        );
    }
}

/// The node series one sample gives, as recorded before quantization:
/// `(metric, label value, value)` (benchmarks export the same values to
/// Prometheus).
pub fn node_values(s: &NodeSample) -> Vec<(&str, &str, f64)> {
    let mut cols = Vec::new();
    let mut vals = Vec::new();
    node_columns(s, &mut cols, &mut vals);
    cols.into_iter()
        .zip(vals)
        .map(|(c, v)| (c.metric, c.label, v))
        .collect()
}

fn alloc_columns(u: &AllocationUsage) -> ([ColumnRef<'static>; 5], [f64; 5]) {
    let one = int(1.0);
    (
        [
            col("alloc_cpu_percent", "", int(0.01)),
            col("alloc_memory_bytes", "", one),
            col("alloc_memory_limit_bytes", "", one),
            col("alloc_rx_bytes_per_sec", "", one),
            col("alloc_tx_bytes_per_sec", "", one),
        ],
        [
            f64::from(u.cpu_percent),
            u.memory_bytes as f64,
            u.memory_limit_bytes as f64,
            u.rx_bytes_per_sec as f64,
            u.tx_bytes_per_sec as f64,
        ],
    )
}

/// A source key, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source<'a> {
    Node(&'a str),
    Alloc {
        node: &'a str,
        job: &'a str,
        alloc: &'a str,
    },
}

fn node_key(node: &str) -> String {
    format!("n{SEP}{node}")
}

fn alloc_key(node: &str, job: &str, alloc: &str) -> String {
    format!("a{SEP}{node}{SEP}{job}{SEP}{alloc}")
}

fn parse_key(key: &str) -> Option<Source<'_>> {
    let mut parts = key.split(SEP);
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("n"), Some(node), None, None) => Some(Source::Node(node)),
        (Some("a"), Some(node), Some(job), Some(alloc)) => Some(Source::Alloc { node, job, alloc }),
        _ => None,
    }
}

/// What a query asked for, checked: a 400 when not.
#[derive(Debug, thiserror::Error)]
pub enum QueryProblem {
    /// The request is not usable.
    #[error("{0}")]
    Bad(String),
    /// History is turned off.
    #[error("metrics history is turned off ([history] enabled = false)")]
    Disabled,
}

fn parse_time(text: &str, key: &str, now_ms: i64, relative_to: i64) -> Result<i64, QueryProblem> {
    let t = text.trim();
    if t.is_empty() || t == "now" {
        return Ok(now_ms);
    }
    if let Ok(v) = t.parse::<i64>() {
        return Ok(v);
    }
    if let Ok(d) = humantime::parse_duration(t.trim_start_matches('-')) {
        return Ok(relative_to - ms(d));
    }
    if let Ok(at) = humantime::parse_rfc3339_weak(t) {
        return Ok(unix_ms(at));
    }
    Err(QueryProblem::Bad(format!(
        "{key}={t:?}: give Unix milliseconds, an RFC 3339 time (2026-12-05T10:00:00Z), `now`, or a duration before the end (1h, 30m)"
    )))
}

/// Where a controller keeps its history: `<data_dir>/history`.
pub fn history_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("history")
}

impl MetricsHistory {
    /// Opens the history under `data_dir/history` (remote_write starts when
    /// configured).
    pub fn open(
        data_dir: &Path,
        settings: &HistorySettings,
        shutdown: CancellationToken,
    ) -> anyhow::Result<MetricsHistory> {
        let mut cfg = novacron_tsdb::Config::new(history_dir(data_dir));
        cfg.head_budget_bytes =
            usize::try_from(settings.head_budget_mib << 20).unwrap_or(usize::MAX);
        cfg.chunk_points = settings.chunk_points;
        cfg.raw_retention_ms = ms(settings.raw_retention);
        cfg.minute_retention_ms = ms(settings.minute_retention);
        cfg.hour_retention_ms = ms(settings.hour_retention);
        let db = History::open(cfg).map_err(|e| {
            anyhow::anyhow!(
                "metrics history in {}: {e}",
                history_dir(data_dir).display()
            )
        })?;
        let remote = match &settings.remote_write {
            Some(rw) => Some(RemoteWriter::spawn(rw.clone(), shutdown)?),
            None => None,
        };
        Ok(MetricsHistory {
            db,
            jobs: OnceLock::new(),
            remote,
        })
    }

    /// Names allocations' jobs with `f` (the workloads' lookup).
    pub fn set_jobs(&self, f: JobLookup) {
        let _ = self.jobs.set(f);
    }

    /// The store underneath (tests, benchmarks).
    pub fn db(&self) -> &History {
        &self.db
    }

    /// Remote write's counters, when it is configured.
    pub fn remote_stats(&self) -> Option<crate::services::remote_write::RemoteWriteStats> {
        self.remote.as_ref().map(RemoteWriter::stats)
    }

    /// Writes the open chunks (shutdown).
    pub fn close(&self) {
        self.db.close();
    }

    /// Runs the rollups and retention every [`MAINTAIN_EVERY`], and records an
    /// event when the head went over its budget.
    ///
    /// The rollups and compaction decode and re-encode a whole hour: they run
    /// on their own thread at a lower priority (nice 10), so that on a busy
    /// host the link's tasks (whose agents time out after 2 s of silence) are
    /// served first.
    pub async fn run(self: Arc<Self>, events: Arc<EventLog>, cancel: CancellationToken) {
        let mut evictions = self.db.stats().budget_evictions;
        let mut dropped = self.db.stats().dropped_chunks;
        type Reply = tokio::sync::oneshot::Sender<std::io::Result<()>>;
        let (work_tx, work_rx) = std::sync::mpsc::sync_channel::<(i64, Reply)>(1);
        let worker = self.clone();
        let spawned = std::thread::Builder::new()
            .name("novacron-rollup".into())
            .spawn(move || {
                // Linux: the nice value is the calling thread's.
                if let Err(error) = rustix::process::setpriority_process(None, 10) {
                    warn!(%error, "metrics history: cannot lower the rollup thread's priority");
                }
                while let Ok((now, reply)) = work_rx.recv() {
                    let _ = reply.send(worker.db.maintain(now));
                }
            });
        if let Err(error) = spawned {
            warn!(%error, "metrics history: cannot start the rollup thread; no rollups or retention");
            return;
        }
        let mut tick = tokio::time::interval(MAINTAIN_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = unix_ms(SystemTime::now());
            let (reply, done) = tokio::sync::oneshot::channel();
            // The thread takes one round at a time and this loop waits for
            // it: the channel (of one) is always empty here.
            if work_tx.try_send((now, reply)).is_err() {
                warn!("metrics history: the rollup thread stopped");
                return;
            }
            match done.await {
                Ok(Err(error)) => warn!(%error, "metrics history: rollups or retention failed"),
                Err(_) => warn!("metrics history: the rollup thread stopped"),
                Ok(Ok(())) => {}
            }
            let s = self.db.stats();
            if s.budget_evictions > evictions || s.dropped_chunks > dropped {
                let message = format!(
                    "the metrics history's head went over its {} MiB budget: {} open chunks were written early{}",
                    s.head_budget_bytes >> 20,
                    s.budget_evictions - evictions,
                    if s.dropped_chunks > dropped {
                        format!(
                            ", {} chunks were dropped (the writer was behind or the disk refused them)",
                            s.dropped_chunks - dropped
                        )
                    } else {
                        String::new()
                    }
                );
                warn!("{message}");
                if let Err(error) = events.record(
                    NewEvent::new(kind::HISTORY_OVER_BUDGET, CONTROLLER, message)
                        .detail("evictions", s.budget_evictions - evictions)
                        .detail("dropped_chunks", s.dropped_chunks - dropped),
                ) {
                    warn!(%error, "cannot record an event");
                }
                evictions = s.budget_evictions;
                dropped = s.dropped_chunks;
            }
        }
    }

    /// What the history holds.
    pub fn stats(&self) -> HistoryStats {
        let s = self.db.stats();
        let c = self.db.config();
        let per = |bytes: u64, values: u64| {
            if values == 0 {
                0.0
            } else {
                bytes as f64 / values as f64
            }
        };
        HistoryStats {
            series: s.head_series,
            sources: s.head_sources,
            head_values: s.head_values,
            head_bytes: s.head_bytes,
            head_budget_bytes: s.head_budget_bytes,
            head_bytes_per_value: per(s.head_bytes, s.head_values),
            disk_values: s.disk_values,
            disk_bytes: s.disk_bytes,
            disk_bytes_per_value: per(s.disk_bytes, s.disk_values),
            rollup_bytes: s.rollup_bytes,
            budget_evictions: s.budget_evictions,
            corrupt_chunks: s.corrupt_chunks,
            oldest_raw_unix_ms: s.oldest_raw_ms.and_then(|t| u64::try_from(t).ok()),
            retention_secs: [
                (c.raw_retention_ms / 1000) as u64,
                (c.minute_retention_ms / 1000) as u64,
                (c.hour_retention_ms / 1000) as u64,
            ],
            metrics: NODE_METRICS
                .iter()
                .chain(ALLOC_METRICS)
                .map(|m| m.name.to_string())
                .collect(),
        }
    }

    /// Answers `GET /v1/metrics/query`. `node_ok` says whether a node's labels
    /// match the query's selector (the caller resolves it on the registry).
    pub fn query(
        &self,
        q: &MetricsQuery,
        node_ok: &dyn Fn(&str) -> bool,
        now: SystemTime,
    ) -> Result<MetricsQueryResult, QueryProblem> {
        let info: &MetricInfo = metric_info(&q.metric).ok_or_else(|| {
            let names: Vec<&str> = NODE_METRICS
                .iter()
                .chain(ALLOC_METRICS)
                .map(|m| m.name)
                .collect();
            QueryProblem::Bad(format!(
                "unknown metric {:?}; known: {}",
                q.metric,
                names.join(", ")
            ))
        })?;
        let is_alloc = ALLOC_METRICS.iter().any(|m| m.name == info.name);
        let now_ms = unix_ms(now);
        let to = parse_time(q.to.as_deref().unwrap_or("now"), "to", now_ms, now_ms)?;
        let from = match q.from.as_deref() {
            Some(f) => parse_time(f, "from", now_ms, to)?,
            None => to - 3_600_000,
        };
        if from > to {
            return Err(QueryProblem::Bad(format!(
                "from ({from}) is after to ({to})"
            )));
        }
        let range = (to - from).max(1) as u64;
        let step_ms = match q.step.as_deref() {
            Some(s) => {
                let d = humantime::parse_duration(s).map_err(|e| {
                    QueryProblem::Bad(format!("step={s:?}: {e}; use e.g. 15s, 1m, 1h"))
                })?;
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
            }
            None => range.div_ceil(DEFAULT_STEPS).div_ceil(1000).max(1) * 1000,
        };
        if step_ms == 0 {
            return Err(QueryProblem::Bad("step must be at least 1ms".into()));
        }
        if range / step_ms + 1 > MAX_STEPS {
            return Err(QueryProblem::Bad(format!(
                "{} steps of {} over the range exceed the maximum of {MAX_STEPS}; raise the step or shorten the range",
                range / step_ms + 1,
                humantime::format_duration(Duration::from_millis(step_ms))
            )));
        }
        if !is_alloc && (q.job.is_some() || q.allocation.is_some()) {
            return Err(QueryProblem::Bad(format!(
                "{} is a node metric: job and allocation select allocation metrics (alloc_*)",
                info.name
            )));
        }
        let filter = |key: &str| -> bool {
            match parse_key(key) {
                Some(Source::Node(node)) => {
                    !is_alloc && q.node.as_deref().is_none_or(|n| n == node) && node_ok(node)
                }
                Some(Source::Alloc { node, job, alloc }) => {
                    is_alloc
                        && q.node.as_deref().is_none_or(|n| n == node)
                        && q.job.as_deref().is_none_or(|j| j == job)
                        && q.allocation.as_deref().is_none_or(|a| a == alloc)
                        && node_ok(node)
                }
                None => false,
            }
        };
        let tier = match q.resolution.as_deref() {
            None | Some("") => None,
            Some("raw") => Some(Tier::Raw),
            Some("1m") => Some(Tier::Minute),
            Some("1h") => Some(Tier::Hour),
            Some(other) => {
                return Err(QueryProblem::Bad(format!(
                    "resolution={other:?}: use raw, 1m or 1h"
                )));
            }
        };
        let function = q.function.unwrap_or_default();
        // A query of one node reads only that node's sources.
        let node_prefix = q.node.as_deref().map(|n| {
            if is_alloc {
                format!("a{SEP}{n}{SEP}")
            } else {
                node_key(n)
            }
        });
        let prefixes: Vec<&str> = node_prefix.iter().map(String::as_str).collect();
        let answer = self
            .db
            .query(&Query {
                metric: info.name,
                sources: &filter,
                from_ms: from,
                to_ms: to,
                step_ms: i64::try_from(step_ms).unwrap_or(i64::MAX),
                reduce: match function {
                    StepFn::Mean => Reduce::Mean,
                    StepFn::Min => Reduce::Min,
                    StepFn::Max => Reduce::Max,
                    StepFn::Last => Reduce::Last,
                },
                now_ms,
                tier,
                prefixes: node_prefix.is_some().then_some(prefixes.as_slice()),
            })
            .map_err(|e| QueryProblem::Bad(e.to_string()))?;
        let mut series: Vec<SeriesPoints> = answer
            .series
            .into_iter()
            .map(|s| {
                let mut labels = BTreeMap::new();
                match parse_key(&s.source) {
                    Some(Source::Node(node)) => {
                        labels.insert("node".to_string(), node.to_string());
                    }
                    Some(Source::Alloc { node, job, alloc }) => {
                        labels.insert("node".to_string(), node.to_string());
                        labels.insert("job".to_string(), job.to_string());
                        labels.insert("allocation".to_string(), alloc.to_string());
                    }
                    None => {}
                }
                if let Some(l) = info.label {
                    labels.insert(l.to_string(), s.label);
                }
                SeriesPoints {
                    labels,
                    values: s.values,
                }
            })
            .collect();
        let agg = q.agg.unwrap_or_default();
        if agg != SeriesAgg::None {
            series = vec![SeriesPoints {
                labels: BTreeMap::new(),
                values: aggregate(&series, answer.steps, agg),
            }];
        }
        let tiers: Vec<&str> = answer.tiers.iter().map(|t| t.name()).collect();
        Ok(MetricsQueryResult {
            metric: info.name.to_string(),
            from_unix_ms: u64::try_from(answer.from_ms).unwrap_or(0),
            to_unix_ms: u64::try_from(to).unwrap_or(0),
            step_ms,
            function,
            agg,
            resolution: if tiers.is_empty() {
                "raw".to_string()
            } else {
                tiers.join("+")
            },
            timestamps: (0..answer.steps)
                .map(|i| u64::try_from(answer.from_ms).unwrap_or(0) + i as u64 * step_ms)
                .collect(),
            series,
        })
    }

    /// Rebuilds `node`'s samples since `since_ms` from the history (one per
    /// second with a CPU reading): CPU, memory, GPU utilization and its
    /// allocations' CPU and memory, which is what the autoscaler and the
    /// right-sizing read.
    pub fn window(&self, node: &str, since_ms: u64, now: SystemTime) -> MetricsWindow {
        let mut w = MetricsWindow {
            node: node.to_string(),
            samples: Vec::new(),
        };
        let now_ms = unix_ms(now);
        let from = i64::try_from(since_ms).unwrap_or(0) + 1;
        if from > now_ms {
            return w;
        }
        let step = 1000i64;
        let node_src = node_key(node);
        let alloc_prefix = format!("a{SEP}{node}{SEP}");
        let node_prefixes = [node_src.as_str()];
        let alloc_prefixes = [alloc_prefix.as_str()];
        // Two reads, each chunk once: the node's four metrics, then its
        // allocations' three.
        let is_node = |key: &str| key == node_src;
        let is_alloc =
            |key: &str| matches!(parse_key(key), Some(Source::Alloc { node: n, .. }) if n == node);
        let get = |metrics: &[&str], sources: &dyn Fn(&str) -> bool, prefixes: &[&str]| {
            self.db
                .query_many(
                    &Query {
                        metric: metrics.first().copied().unwrap_or_default(),
                        sources,
                        from_ms: from,
                        to_ms: now_ms,
                        step_ms: step,
                        reduce: Reduce::Last,
                        now_ms,
                        tier: Some(Tier::Raw),
                        prefixes: Some(prefixes),
                    },
                    metrics,
                )
                .ok()
                .map(|answers| answers.into_iter().map(Some).collect::<Vec<_>>())
                .unwrap_or_else(|| metrics.iter().map(|_| None).collect())
        };
        let mut node_answers = get(
            &[
                "cpu_percent",
                "memory_used_bytes",
                "memory_total_bytes",
                "gpu_utilization_percent",
            ],
            &is_node,
            &node_prefixes,
        )
        .into_iter();
        let (Some(Some(cpu)), Some(used), Some(total), Some(gpu)) = (
            node_answers.next(),
            node_answers.next(),
            node_answers.next(),
            node_answers.next(),
        ) else {
            return w;
        };
        let Some(cpu_series) = cpu.series.first() else {
            return w;
        };
        let value = |a: &Option<novacron_tsdb::Answer>, i: usize| -> Option<f64> {
            a.as_ref()?.series.first()?.values.get(i).copied().flatten()
        };
        let mut alloc_answers = get(
            &[
                "alloc_cpu_percent",
                "alloc_memory_bytes",
                "alloc_memory_limit_bytes",
            ],
            &is_alloc,
            &alloc_prefixes,
        )
        .into_iter();
        let a_cpu = alloc_answers.next().flatten();
        let a_mem = alloc_answers.next().flatten();
        let a_limit = alloc_answers.next().flatten();
        let alloc_of = |key: &str| match parse_key(key) {
            Some(Source::Alloc { alloc, .. }) => alloc.to_string(),
            _ => String::new(),
        };
        let per_alloc = |a: &Option<novacron_tsdb::Answer>, i: usize| -> BTreeMap<String, f64> {
            a.iter()
                .flat_map(|a| a.series.iter())
                .filter_map(|s| Some((alloc_of(&s.source), s.values.get(i).copied().flatten()?)))
                .collect()
        };
        for (i, c) in cpu_series.values.iter().enumerate() {
            let Some(c) = c else { continue };
            let at = cpu.from_ms + i as i64 * step;
            let cpus = per_alloc(&a_cpu, i);
            let mems = per_alloc(&a_mem, i);
            let limits = per_alloc(&a_limit, i);
            let ids: BTreeSet<&String> = cpus.keys().chain(mems.keys()).collect();
            w.samples.push(NodeSample {
                seq: i as u64,
                at_unix_ms: u64::try_from(at).unwrap_or(0),
                cpu: CpuSample {
                    total_percent: *c as f32,
                    ..CpuSample::default()
                },
                memory: MemorySample {
                    used_bytes: value(&used, i).unwrap_or(0.0) as u64,
                    total_bytes: value(&total, i).unwrap_or(0.0) as u64,
                    ..MemorySample::default()
                },
                gpus: gpu
                    .iter()
                    .flat_map(|a| a.series.iter())
                    .filter_map(|s| {
                        Some(GpuSample {
                            uuid: s.label.clone(),
                            utilization_percent: s.values.get(i).copied().flatten()? as u32,
                            ..GpuSample::default()
                        })
                    })
                    .collect(),
                allocations: ids
                    .into_iter()
                    .map(|id| AllocationUsage {
                        id: id.clone(),
                        cpu_percent: cpus.get(id).copied().unwrap_or(0.0) as f32,
                        memory_bytes: mems.get(id).copied().unwrap_or(0.0) as u64,
                        memory_limit_bytes: limits.get(id).copied().unwrap_or(0.0) as u64,
                        ..AllocationUsage::default()
                    })
                    .collect(),
                ..NodeSample::default()
            });
        }
        w
    }
}

/// Combines series step by step.
fn aggregate(series: &[SeriesPoints], steps: usize, agg: SeriesAgg) -> Vec<Option<f64>> {
    (0..steps)
        .map(|i| {
            let vals: Vec<f64> = series
                .iter()
                .filter_map(|s| s.values.get(i).copied().flatten())
                .collect();
            match agg {
                SeriesAgg::Count => Some(vals.len() as f64),
                _ if vals.is_empty() => None,
                SeriesAgg::Sum | SeriesAgg::None => Some(vals.iter().sum()),
                SeriesAgg::Mean => Some(vals.iter().sum::<f64>() / vals.len() as f64),
                SeriesAgg::Min => vals.iter().copied().reduce(f64::min),
                SeriesAgg::Max => vals.iter().copied().reduce(f64::max),
            }
        })
        .collect()
}

impl SampleSink for MetricsHistory {
    fn record(&self, node: &str, sample: &NodeSample) {
        let t = i64::try_from(sample.at_unix_ms).unwrap_or(i64::MAX);
        let mut cols = Vec::with_capacity(16 + 5 * sample.disks.len());
        let mut vals = Vec::with_capacity(cols.capacity());
        node_columns(sample, &mut cols, &mut vals);
        self.db.append(&node_key(node), t, &cols, &vals);
        let jobs = self.jobs.get();
        for u in &sample.allocations {
            let job = jobs.and_then(|f| f(&u.id)).unwrap_or_default();
            let (c, v) = alloc_columns(u);
            self.db.append(&alloc_key(node, &job, &u.id), t, &c, &v);
        }
        if let Some(rw) = &self.remote {
            rw.push(node_series_with(node, "", sample, |id| {
                jobs.and_then(|f| f(id))
            }));
        }
    }
}

/// Logs what the history holds at start.
pub fn log_opened(h: &MetricsHistory) {
    let s = h.db.stats();
    info!(
        disk_bytes = s.disk_bytes,
        rollup_bytes = s.rollup_bytes,
        corrupt_chunks = s.corrupt_chunks,
        dir = %h.db.dir().display(),
        "metrics history opened"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_reject_garbage() {
        assert_eq!(parse_key(&node_key("n1")), Some(Source::Node("n1")));
        assert_eq!(
            parse_key(&alloc_key("n1", "web", "web-1")),
            Some(Source::Alloc {
                node: "n1",
                job: "web",
                alloc: "web-1"
            })
        );
        assert_eq!(parse_key("x\u{1f}y"), None);
        assert_eq!(parse_key("n1"), None);
    }

    #[test]
    fn series_combine_step_by_step() {
        let s = |v: Vec<Option<f64>>| SeriesPoints {
            labels: BTreeMap::new(),
            values: v,
        };
        let series = [
            s(vec![Some(1.0), None, Some(3.0)]),
            s(vec![Some(3.0), None, None]),
        ];
        assert_eq!(
            aggregate(&series, 3, SeriesAgg::Sum),
            vec![Some(4.0), None, Some(3.0)]
        );
        assert_eq!(
            aggregate(&series, 3, SeriesAgg::Mean),
            vec![Some(2.0), None, Some(3.0)]
        );
        assert_eq!(
            aggregate(&series, 3, SeriesAgg::Max),
            vec![Some(3.0), None, Some(3.0)]
        );
        assert_eq!(
            aggregate(&series, 3, SeriesAgg::Count),
            vec![Some(2.0), Some(0.0), Some(1.0)]
        );
    }

    fn sample(at: u64, cpu: f32) -> NodeSample {
        NodeSample {
            seq: at,
            at_unix_ms: at,
            cpu: CpuSample {
                total_percent: cpu,
                load: [0.5, 0.25, 0.125],
                ..CpuSample::default()
            },
            memory: MemorySample {
                total_bytes: 8 << 30,
                used_bytes: 2 << 30,
                available_bytes: 6 << 30,
                ..MemorySample::default()
            },
            allocations: vec![AllocationUsage {
                id: "web-1".into(),
                cpu_percent: cpu / 2.0,
                memory_bytes: 100 << 20,
                memory_limit_bytes: 200 << 20,
                ..AllocationUsage::default()
            }],
            ..NodeSample::default()
        }
    }

    #[test]
    fn samples_are_queried_back_and_rebuilt_as_a_window() {
        let dir = tempfile::tempdir().expect("tmp");
        let h = MetricsHistory::open(
            dir.path(),
            &HistorySettings::default(),
            CancellationToken::new(),
        )
        .expect("open");
        h.set_jobs(Arc::new(|id: &str| {
            id.split('-').next().map(str::to_string)
        }));
        let now = SystemTime::now();
        let t0 = (unix_ms(now) / 1000 - 60) as u64 * 1000;
        for i in 0..30u64 {
            h.record("n1", &sample(t0 + i * 1000, i as f32));
            h.record("n2", &sample(t0 + i * 1000, 50.0));
        }
        let q = |m: &str, f: &dyn Fn(&mut MetricsQuery)| {
            let mut q = MetricsQuery {
                metric: m.into(),
                from: Some(t0.to_string()),
                to: Some((t0 + 29_000).to_string()),
                step: Some("1s".into()),
                ..MetricsQuery::default()
            };
            f(&mut q);
            h.query(&q, &|_| true, now)
        };
        let r = q("cpu_percent", &|_| {}).expect("query");
        assert_eq!(r.series.len(), 2);
        assert_eq!(
            r.series[0].labels.get("node").map(String::as_str),
            Some("n1")
        );
        assert_eq!(r.series[0].values[7], Some(7.0));
        let mean = q("cpu_percent", &|q| q.agg = Some(SeriesAgg::Mean)).expect("query");
        assert_eq!(mean.series.len(), 1);
        assert_eq!(mean.series[0].values[10], Some(30.0));
        let a = q("alloc_cpu_percent", &|q| q.job = Some("web".into())).expect("query");
        assert_eq!(a.series.len(), 2);
        assert_eq!(
            a.series[0].labels.get("allocation").map(String::as_str),
            Some("web-1")
        );
        assert_eq!(a.series[0].values[8], Some(4.0));
        assert!(q("nope", &|_| {}).is_err_and(|e| e.to_string().contains("known: cpu_percent")));
        assert!(q("cpu_percent", &|q| q.job = Some("web".into())).is_err());
        assert!(q("cpu_percent", &|q| q.step = Some("1ms".into())).is_err());
        assert!(q("cpu_percent", &|q| q.from = Some("yesterday-ish".into())).is_err());

        let w = h.window("n1", t0 - 1, now);
        assert_eq!(w.samples.len(), 30);
        assert_eq!(w.samples[5].cpu.total_percent, 5.0);
        assert_eq!(w.samples[5].memory.used_bytes, 2 << 30);
        assert_eq!(w.samples[5].allocations[0].id, "web-1");
        assert_eq!(w.samples[5].allocations[0].memory_limit_bytes, 200 << 20);
        let s = h.stats();
        assert_eq!(s.sources, 4);
        assert!(s.head_bytes_per_value > 0.0);
    }
}

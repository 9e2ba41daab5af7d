//! Prometheus remote write 1.0 out: ships the fleet's metrics history to an existing
//! Prometheus, Mimir or VictoriaMetrics (`[history.remote_write]` in
//! `controller.toml`).
//!
//! The ingest path calls [`RemoteWriter::push`], which never awaits or blocks
//! beyond one short std mutex: it checks and normalises the series (labels sorted
//! by name, [`RemoteWriteSettings::extra_labels`] added, samples in time order)
//! and appends them to a queue bounded by
//! [`RemoteWriteSettings::max_queue_samples`]; past the bound the oldest queued
//! samples are dropped and counted. One sender task ([`RemoteWriter::spawn`])
//! takes batches of at most [`RemoteWriteSettings::max_samples_per_request`]
//! samples every [`RemoteWriteSettings::interval`] (at once when a full batch is
//! waiting), encodes them as a snappy-compressed (block format) protobuf
//! `WriteRequest` and POSTs it:
//!
//! - 2xx: sent;
//! - 5xx, 429 and network errors: the same batch is retried after an
//!   exponential backoff with jitter ([`RETRY_INITIAL`] up to [`RETRY_MAX`], or
//!   a longer `Retry-After`), while new samples keep queuing (bounded);
//! - any other answer (4xx, or a redirect, which is not followed): the batch is
//!   dropped, its samples counted as failed, and the answer's body (at most
//!   [`MAX_ERROR_BODY`] bytes) logged.
//!
//! Series names and labels are those of the controller's `/metrics`
//! ([`node_series`]), so one dashboard reads either.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use novacron_common::backoff::Backoff;
use novacron_common::exposition::{Family, Kind, SAMPLE_FAMILIES, Samples, Value, collect_sample};
use novacron_common::retry::{Retry, sleep_unless};
use novacron_common::sync::lock;
use novacron_common::tls;
use novacron_common::wire::NodeSample;
use prost::Message as _;
use reqwest::header::{self, HeaderMap, HeaderValue};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Default of [`RemoteWriteSettings::interval`].
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Default of [`RemoteWriteSettings::timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`RemoteWriteSettings::max_queue_samples`].
pub const DEFAULT_MAX_QUEUE_SAMPLES: usize = 100_000;
/// Default of [`RemoteWriteSettings::max_samples_per_request`] (Prometheus'
/// own `max_samples_per_send`).
pub const DEFAULT_MAX_SAMPLES_PER_REQUEST: usize = 2_000;
/// The first delay before a failed batch is sent again.
pub const RETRY_INITIAL: Duration = Duration::from_millis(100);
/// The longest delay between two tries of a batch (a `Retry-After` is capped to it).
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// How much of a refusing receiver's answer is logged and kept in
/// [`RemoteWriteStats::last_error`], in bytes.
pub const MAX_ERROR_BODY: usize = 512;
/// The `User-Agent` of every request.
pub const USER_AGENT: &str = concat!("novacron/", env!("CARGO_PKG_VERSION"));
/// The value of the `X-Prometheus-Remote-Write-Version` header (remote write 1.0).
pub const PROTOCOL_VERSION: &str = "0.1.0";
/// The largest bearer token file read.
const MAX_TOKEN_FILE: u64 = 64 * 1024;
/// Where the settings sit in `controller.toml`, for error messages.
const SECTION: &str = "history.remote_write";

/// `[history.remote_write]` in `controller.toml`.
///
/// ```toml
/// [history.remote_write]
/// url = "https://mimir.example.com/api/v1/push"
/// interval = "5s"
/// bearer_token_file = "/etc/novacron/remote-write.token"
/// extra_labels = { fleet = "prod" }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteWriteSettings {
    /// The receiver's endpoint, `http://` or `https://` (Prometheus:
    /// `/api/v1/write`; Mimir: `/api/v1/push`; VictoriaMetrics: `/api/v1/write`).
    pub url: String,
    /// How long pushed samples wait at most before they are sent (a full batch
    /// goes at once).
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// The limit of one request, from connecting to the end of the answer; also
    /// the limit of the last flush at shutdown.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// The most samples waiting to be sent; past it the oldest are dropped.
    #[serde(default = "default_max_queue_samples")]
    pub max_queue_samples: usize,
    /// The most samples in one request.
    #[serde(default = "default_max_samples_per_request")]
    pub max_samples_per_request: usize,
    /// A file holding the token sent as `Authorization: Bearer <token>`; read at
    /// start and again for every request, so it can be rotated in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_file: Option<PathBuf>,
    /// A PEM file of the CAs that sign the receiver's certificate; without it the
    /// system's trust store is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Labels added to every series that does not carry them already (as
    /// Prometheus' `external_labels`), e.g. `fleet = "prod"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_labels: BTreeMap<String, String>,
}

fn default_interval() -> Duration {
    DEFAULT_INTERVAL
}

fn default_timeout() -> Duration {
    DEFAULT_TIMEOUT
}

fn default_max_queue_samples() -> usize {
    DEFAULT_MAX_QUEUE_SAMPLES
}

fn default_max_samples_per_request() -> usize {
    DEFAULT_MAX_SAMPLES_PER_REQUEST
}

impl RemoteWriteSettings {
    /// Settings for `url` with every default.
    pub fn new(url: impl Into<String>) -> RemoteWriteSettings {
        RemoteWriteSettings {
            url: url.into(),
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            max_queue_samples: DEFAULT_MAX_QUEUE_SAMPLES,
            max_samples_per_request: DEFAULT_MAX_SAMPLES_PER_REQUEST,
            bearer_token_file: None,
            ca_file: None,
            extra_labels: BTreeMap::new(),
        }
    }

    /// Checks the settings; the error names the field, the bad value and what
    /// would be accepted.
    pub fn validate(&self) -> Result<(), String> {
        let url = reqwest::Url::parse(&self.url).map_err(|e| {
            format!(
                "{SECTION}.url: {:?} is not a URL ({e}); expected http://HOST[:PORT]/PATH or https://..., e.g. http://prometheus:9090/api/v1/write",
                self.url
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!(
                "{SECTION}.url: scheme {:?} in {:?} is not supported; use http:// or https://",
                url.scheme(),
                self.url
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("{SECTION}.url: {:?} names no host", self.url));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!(
                "{SECTION}.url: credentials in the URL would end up in logs; put a token in {SECTION}.bearer_token_file instead"
            ));
        }
        for (field, value) in [("interval", self.interval), ("timeout", self.timeout)] {
            if value.is_zero() {
                return Err(format!(
                    "{SECTION}.{field}: must be longer than 0 (e.g. \"5s\")"
                ));
            }
        }
        for (field, value) in [
            ("max_queue_samples", self.max_queue_samples),
            ("max_samples_per_request", self.max_samples_per_request),
        ] {
            if value == 0 {
                return Err(format!("{SECTION}.{field}: must be at least 1"));
            }
        }
        for (name, value) in &self.extra_labels {
            if !is_label_name(name) {
                return Err(format!(
                    "{SECTION}.extra_labels: {name:?} is not a Prometheus label name ([a-zA-Z_][a-zA-Z0-9_]*)"
                ));
            }
            if name.starts_with("__") {
                return Err(format!(
                    "{SECTION}.extra_labels: {name:?} begins with \"__\", which Prometheus reserves"
                ));
            }
            if value.is_empty() {
                return Err(format!(
                    "{SECTION}.extra_labels.{name}: the value is empty (Prometheus treats an empty label as absent)"
                ));
            }
        }
        Ok(())
    }
}

/// One series to write: its labels (`__name__` among them) and its samples.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// Label names and values, `__name__` included; any order.
    pub labels: Vec<(String, String)>,
    /// (Unix milliseconds, value); any order.
    pub samples: Vec<(i64, f64)>,
}

/// What the writer has done since it started.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RemoteWriteStats {
    /// Samples the receiver accepted (2xx).
    pub samples_sent: u64,
    /// Samples dropped unsent: the oldest of a full queue, those left when the
    /// writer stopped, those pushed after it stopped.
    pub samples_dropped: u64,
    /// Samples refused for good: by the receiver (a 4xx other than 429, not
    /// retried) or before queuing (an invalid label name, no `__name__`).
    pub samples_failed: u64,
    /// Requests that failed and were tried again (5xx, 429, network errors).
    pub requests_failed: u64,
    /// Samples waiting now (not counting the batch being sent).
    pub queued: usize,
    /// The last error, with the receiver's answer when it gave one.
    pub last_error: Option<String>,
    /// When a request last succeeded, Unix milliseconds.
    pub last_success_unix_ms: Option<u64>,
}

/// The handle of a running remote writer; clones share it.
#[derive(Debug, Clone)]
pub struct RemoteWriter {
    shared: Arc<Shared>,
}

impl RemoteWriter {
    /// Starts the sender task on the current tokio runtime; it stops when
    /// `shutdown` is cancelled (flushing what is queued once, bounded by the
    /// timeout). Fails on invalid settings, an unreadable token or CA file, or
    /// outside a tokio runtime.
    pub fn spawn(
        settings: RemoteWriteSettings,
        shutdown: CancellationToken,
    ) -> anyhow::Result<RemoteWriter> {
        settings.validate().map_err(anyhow::Error::msg)?;
        let runtime = tokio::runtime::Handle::try_current()
            .context("the remote writer must be started inside a tokio runtime")?;
        let url = reqwest::Url::parse(&settings.url)
            .with_context(|| format!("{SECTION}.url: {:?}", settings.url))?;
        if let Some(path) = &settings.bearer_token_file {
            bearer(path).map_err(anyhow::Error::msg)?;
        }
        let client = http_client(&settings)?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            stopped: CancellationToken::new(),
            max_queue_samples: settings.max_queue_samples,
            max_samples_per_request: settings.max_samples_per_request,
            extra_labels: settings
                .extra_labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            overflowing: AtomicBool::new(false),
            warned_invalid: AtomicBool::new(false),
        });
        info!(
            url = %url,
            interval = ?settings.interval,
            max_queue_samples = settings.max_queue_samples,
            "remote write started"
        );
        let sender = Sender {
            shared: shared.clone(),
            client,
            url,
            token_file: settings.bearer_token_file,
            interval: settings.interval,
            timeout: settings.timeout,
            shutdown,
        };
        runtime.spawn(sender.run());
        Ok(RemoteWriter { shared })
    }

    /// Queues series without blocking (for the synchronous ingest path). When the
    /// queue would exceed `max_queue_samples` the oldest queued samples are
    /// dropped and counted. Series without samples are ignored; series with an
    /// invalid label name or without `__name__` are refused and counted as failed.
    pub fn push(&self, series: Vec<Series>) {
        let shared = &self.shared;
        let mut ready = Vec::with_capacity(series.len());
        let mut invalid = 0u64;
        let mut first_error = None;
        for s in series {
            if s.samples.is_empty() {
                continue;
            }
            let count = s.samples.len() as u64;
            match normalize(s, &shared.extra_labels) {
                Ok(s) => ready.push(s),
                Err(e) => {
                    invalid += count;
                    first_error.get_or_insert(e);
                }
            }
        }
        let (queued, dropped, stopped) = {
            let mut state = lock(&shared.state);
            let stopped = state.closed || shared.stopped.is_cancelled();
            let mut dropped = 0u64;
            if stopped {
                dropped = ready.iter().map(|s| s.samples.len() as u64).sum();
            } else {
                for s in ready {
                    dropped += state.queue.push(s, shared.max_queue_samples) as u64;
                }
            }
            state.stats.samples_dropped += dropped;
            state.stats.samples_failed += invalid;
            if let Some(e) = &first_error {
                state.stats.last_error = Some(e.clone());
            }
            (state.queue.samples, dropped, stopped)
        };
        if let Some(error) = first_error {
            if shared.warned_invalid.swap(true, Ordering::Relaxed) {
                debug!(samples = invalid, %error, "remote write refused series");
            } else {
                warn!(samples = invalid, %error, "remote write refused series (logged once; see the samples_failed count)");
            }
        }
        if dropped > 0 && !stopped && !shared.overflowing.swap(true, Ordering::Relaxed) {
            warn!(
                dropped,
                max_queue_samples = shared.max_queue_samples,
                "remote write queue is full; dropping the oldest samples until the receiver keeps up"
            );
        }
        if queued >= shared.max_samples_per_request {
            shared.wake.notify_one();
        }
    }

    /// What the writer has done so far.
    pub fn stats(&self) -> RemoteWriteStats {
        let state = lock(&self.shared.state);
        let mut stats = state.stats.clone();
        stats.queued = state.queue.samples;
        stats
    }

    /// Completes once the sender task has ended (after `shutdown` was cancelled
    /// and the last flush), so a controller's shutdown can wait for it.
    pub async fn stopped(&self) {
        self.shared.stopped.cancelled().await;
    }
}

/// The series of one node reading, with the metric names and labels of the
/// controller's `/metrics` for nodes (`novacron_node_*` with the `node` label,
/// node_exporter's `device` and `mountpoint`, counters with their `_total`
/// suffix), plus the usage of each allocation the reading lists
/// (`novacron_allocation_*` with `alloc` and `node`), all at the reading's time.
/// `/metrics` also labels them with the node's `zone` and the allocation's
/// `novacron_job`; [`node_series_with`] adds those.
pub fn node_series(node: &str, sample: &NodeSample) -> Vec<Series> {
    node_series_with(node, "", sample, |_| None)
}

/// [`node_series`] with the node's `zone` (none when empty) and each
/// allocation's `novacron_job` (`job_of` takes an allocation id), as `/metrics`
/// labels them.
pub fn node_series_with(
    node: &str,
    zone: &str,
    sample: &NodeSample,
    job_of: impl Fn(&str) -> Option<String>,
) -> Vec<Series> {
    let at = i64::try_from(sample.at_unix_ms).unwrap_or(i64::MAX);
    let mut samples = Samples::default();
    collect_sample(node, zone, sample, &mut samples);
    let mut out = Vec::new();
    for family in SAMPLE_FAMILIES {
        let name = series_name(family);
        for (labels, value) in samples.take(family) {
            let labels = labels.into_iter().map(|(k, v)| (k.to_string(), v));
            out.extend(one_sample(&name, labels, at, value));
        }
    }
    let mut seen = BTreeSet::new();
    for u in &sample.allocations {
        if !seen.insert(u.id.as_str()) {
            continue;
        }
        let mut labels = vec![
            ("alloc".to_string(), u.id.clone()),
            ("node".to_string(), node.to_string()),
        ];
        if let Some(job) = job_of(&u.id) {
            labels.push(("novacron_job".to_string(), job));
        }
        let mut add = |name: &str, value: Value| {
            out.extend(one_sample(name, labels.iter().cloned(), at, value));
        };
        add(
            ALLOC_CPU_USAGE,
            Value::Float(f64::from(u.cpu_percent) / 100.0),
        );
        add(ALLOC_MEMORY_USAGE, Value::Int(u.memory_bytes));
        if u.memory_limit_bytes > 0 {
            add(ALLOC_MEMORY_LIMIT, Value::Int(u.memory_limit_bytes));
        }
        add(ALLOC_NET_RX, Value::Int(u.rx_bytes_per_sec));
        add(ALLOC_NET_TX, Value::Int(u.tx_bytes_per_sec));
    }
    out
}

/// `prometheus.WriteRequest` of remote write 1.0 (the fields NovaCron sends).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    /// The series.
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

/// `prometheus.TimeSeries`: labels sorted by name, samples in time order.
#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    /// The labels, `__name__` included, sorted by name.
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    /// The samples, oldest first.
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

/// `prometheus.Label`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Label {
    /// The label name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// The label value.
    #[prost(string, tag = "2")]
    pub value: String,
}

/// `prometheus.Sample`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    /// The value.
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Unix milliseconds.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

// The allocation usage families of the controller's `/metrics` (declared in
// `services::metrics`, where they are private; its tests check the names match).
/// `/metrics`' allocation CPU family.
pub const ALLOC_CPU_USAGE: &str = "novacron_allocation_cpu_usage_cores";
/// `/metrics`' allocation memory use family.
pub const ALLOC_MEMORY_USAGE: &str = "novacron_allocation_memory_usage_bytes";
/// `/metrics`' allocation memory limit family.
pub const ALLOC_MEMORY_LIMIT: &str = "novacron_allocation_memory_limit_bytes";
/// `/metrics`' allocation receive rate family.
pub const ALLOC_NET_RX: &str = "novacron_allocation_network_receive_bytes_per_second";
/// `/metrics`' allocation transmit rate family.
pub const ALLOC_NET_TX: &str = "novacron_allocation_network_transmit_bytes_per_second";

/// The name a family's samples have in Prometheus' storage: a counter's with
/// `_total`, as the text format exposes it.
fn series_name(family: &Family) -> String {
    match family.kind {
        Kind::Counter => format!("{}_total", family.name),
        Kind::Gauge | Kind::Histogram => family.name.to_string(),
    }
}

/// One sample as a series with sorted labels and no empty ones; nothing for a
/// value that is not finite (as `/metrics`).
fn one_sample(
    name: &str,
    labels: impl Iterator<Item = (String, String)>,
    at: i64,
    value: Value,
) -> Option<Series> {
    let value = match value {
        Value::Int(v) => v as f64,
        Value::Float(v) if v.is_finite() => v,
        Value::Float(_) => return None,
    };
    let mut labels: Vec<(String, String)> = std::iter::once(("__name__".into(), name.into()))
        .chain(labels)
        .filter(|(_, v)| !v.is_empty())
        .collect();
    labels.sort();
    Some(Series {
        labels,
        samples: vec![(at, value)],
    })
}

/// State shared by the handles and the sender task.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the sender early when a full batch waits.
    wake: Notify,
    /// Cancelled when the sender task has ended.
    stopped: CancellationToken,
    max_queue_samples: usize,
    max_samples_per_request: usize,
    /// Sorted by name.
    extra_labels: Vec<(String, String)>,
    /// Whether the queue dropped samples since the last successful request (the
    /// warning is logged once per episode).
    overflowing: AtomicBool,
    /// Whether a refused series was logged at warning level already.
    warned_invalid: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    queue: Queue,
    stats: RemoteWriteStats,
    /// Set by the last flush: from then on pushed samples are dropped.
    closed: bool,
}

/// The samples waiting, oldest first, bounded by a sample count.
#[derive(Debug, Default)]
struct Queue {
    series: VecDeque<Series>,
    samples: usize,
}

impl Queue {
    /// Appends `series` (samples in time order), then drops the oldest samples
    /// beyond `max`; returns how many were dropped.
    fn push(&mut self, mut series: Series, max: usize) -> usize {
        let mut dropped = 0;
        if series.samples.len() > max {
            dropped += series.samples.len() - max;
            series.samples.drain(..series.samples.len() - max);
        }
        if series.samples.is_empty() {
            return dropped;
        }
        self.samples += series.samples.len();
        self.series.push_back(series);
        while self.samples > max {
            let excess = self.samples - max;
            let Some(front) = self.series.front_mut() else {
                break;
            };
            let n = front.samples.len();
            if n <= excess {
                self.series.pop_front();
                self.samples -= n;
                dropped += n;
            } else {
                front.samples.drain(..excess);
                self.samples -= excess;
                dropped += excess;
            }
        }
        dropped
    }

    /// Takes the oldest series, at most `max` samples in all (the last one split
    /// when needed).
    fn take(&mut self, max: usize) -> Vec<Series> {
        let mut out = Vec::new();
        let mut budget = max;
        while budget > 0 {
            let Some(front) = self.series.front_mut() else {
                break;
            };
            let n = front.samples.len();
            if n <= budget {
                budget -= n;
                self.samples -= n;
                if let Some(s) = self.series.pop_front() {
                    out.push(s);
                }
            } else {
                let head: Vec<(i64, f64)> = front.samples.drain(..budget).collect();
                self.samples -= budget;
                out.push(Series {
                    labels: front.labels.clone(),
                    samples: head,
                });
                budget = 0;
            }
        }
        out
    }

    /// Empties the queue; returns how many samples it held.
    fn clear(&mut self) -> usize {
        let n = self.samples;
        self.series.clear();
        self.samples = 0;
        n
    }
}

/// Checks a pushed series and puts it in the queue's form: empty labels
/// removed, `extra` added where absent, labels sorted by name, samples in time
/// order.
fn normalize(mut series: Series, extra: &[(String, String)]) -> Result<Series, String> {
    series.labels.retain(|(_, v)| !v.is_empty());
    let mut names = BTreeSet::new();
    for (name, _) in &series.labels {
        if !is_label_name(name) {
            return Err(format!(
                "label name {name:?} is not valid ([a-zA-Z_][a-zA-Z0-9_]*)"
            ));
        }
        if !names.insert(name.as_str()) {
            return Err(format!("label {name:?} appears twice in one series"));
        }
    }
    let Some((_, metric)) = series.labels.iter().find(|(n, _)| n == "__name__") else {
        return Err("a series has no __name__ label".into());
    };
    if !is_metric_name(metric) {
        return Err(format!(
            "metric name {metric:?} is not valid ([a-zA-Z_:][a-zA-Z0-9_:]*)"
        ));
    }
    let missing: Vec<(String, String)> = extra
        .iter()
        .filter(|(name, _)| !names.contains(name.as_str()))
        .cloned()
        .collect();
    series.labels.extend(missing);
    series.labels.sort();
    series.samples.sort_by_key(|(t, _)| *t);
    Ok(series)
}

/// `[a-zA-Z_][a-zA-Z0-9_]*`.
fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`.
fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// The `WriteRequest` of a batch: series with equal labels merged, samples in
/// time order, one sample per timestamp (the last pushed wins).
fn write_request(batch: &[Series]) -> WriteRequest {
    let mut merged: BTreeMap<&[(String, String)], Points> = BTreeMap::new();
    for s in batch {
        merged
            .entry(s.labels.as_slice())
            .or_default()
            .extend_from_slice(&s.samples);
    }
    let timeseries = merged
        .into_iter()
        .map(|(labels, mut samples)| {
            // Stable: equal timestamps keep the order they were pushed in.
            samples.sort_by_key(|(t, _)| *t);
            let mut out: Vec<Sample> = Vec::with_capacity(samples.len());
            for (timestamp, value) in samples {
                match out.last_mut() {
                    Some(last) if last.timestamp == timestamp => last.value = value,
                    _ => out.push(Sample { value, timestamp }),
                }
            }
            TimeSeries {
                labels: labels
                    .iter()
                    .map(|(name, value)| Label {
                        name: name.clone(),
                        value: value.clone(),
                    })
                    .collect(),
                samples: out,
            }
        })
        .collect();
    WriteRequest { timeseries }
}

/// A request body: the protobuf, snappy-compressed in the block format.
fn encode(request: &WriteRequest) -> Result<Vec<u8>, snap::Error> {
    snap::raw::Encoder::new().compress_vec(&request.encode_to_vec())
}

/// Samples as (Unix milliseconds, value).
type Points = Vec<(i64, f64)>;

fn sample_count(batch: &[Series]) -> u64 {
    batch.iter().map(|s| s.samples.len() as u64).sum()
}

/// What became of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Accepted.
    Sent,
    /// Refused for good: the batch is dropped.
    Rejected,
    /// Try the same batch again, not before `after` when the receiver asked.
    Retry { after: Option<Duration> },
}

/// How a receiver's status is handled (remote write 1.0): 2xx sent; 5xx and 429
/// retried; anything else (4xx, an unfollowed redirect) refused for good.
fn classify(status: reqwest::StatusCode) -> Outcome {
    if status.is_success() {
        Outcome::Sent
    } else if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
        Outcome::Retry { after: None }
    } else {
        Outcome::Rejected
    }
}

/// A `Retry-After` in seconds (the HTTP-date form is ignored), capped at
/// [`RETRY_MAX`].
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds).min(RETRY_MAX))
}

/// The `Authorization` header from a token file (at most [`MAX_TOKEN_FILE`]
/// bytes, surrounding whitespace ignored).
fn bearer(path: &Path) -> Result<HeaderValue, String> {
    let what = || format!("{SECTION}.bearer_token_file {}", path.display());
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", what()))?;
    let mut text = String::new();
    file.take(MAX_TOKEN_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: {e}", what()))?;
    if text.len() as u64 > MAX_TOKEN_FILE {
        return Err(format!(
            "{}: larger than {MAX_TOKEN_FILE} bytes; is it the token?",
            what()
        ));
    }
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("{}: the file is empty", what()));
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
        format!(
            "{}: the token holds characters an HTTP header cannot carry",
            what()
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// The HTTP client: rustls with the ring provider, the system's roots or the
/// CAs of `ca_file`, no redirects (a redirect is refused like a 4xx).
fn http_client(settings: &RemoteWriteSettings) -> anyhow::Result<reqwest::Client> {
    tls::install_crypto_provider();
    let builder = reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout)
        .redirect(reqwest::redirect::Policy::none());
    let builder = match &settings.ca_file {
        Some(path) => {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("{SECTION}.ca_file {}", path.display()))?;
            let config = tls::client_config(&pem, None, &[b"h2", b"http/1.1"])
                .with_context(|| format!("{SECTION}.ca_file {}", path.display()))?;
            builder.tls_backend_preconfigured(config)
        }
        None => builder,
    };
    builder
        .build()
        .context("cannot build the remote write HTTP client")
}

/// An error with its sources (reqwest's own message is terse).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let more = cause.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = cause.source();
    }
    text
}

/// The first `limit` bytes of an answer's body, as text.
async fn body_prefix(mut response: reqwest::Response, limit: usize) -> String {
    let mut buf = Vec::new();
    while buf.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let take = chunk.len().min(limit - buf.len());
                buf.extend_from_slice(&chunk[..take]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    String::from_utf8_lossy(&buf).trim().to_string()
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The sender task.
struct Sender {
    shared: Arc<Shared>,
    client: reqwest::Client,
    url: reqwest::Url,
    token_file: Option<PathBuf>,
    interval: Duration,
    timeout: Duration,
    shutdown: CancellationToken,
}

impl Sender {
    async fn run(self) {
        // Marks the writer stopped however this task ends.
        let _stopped = self.shared.stopped.clone().drop_guard();
        let mut retry = Retry::new(Backoff {
            initial: RETRY_INITIAL,
            max: RETRY_MAX,
        });
        let mut pending: Option<Vec<Series>> = None;
        'run: loop {
            while let Some(batch) = pending.take().or_else(|| self.take_batch()) {
                match self.send(&batch, retry.attempts()).await {
                    Outcome::Sent | Outcome::Rejected => {
                        if retry.attempts() > 0 {
                            info!(url = %self.url, failures = retry.attempts(), "remote write receiver reachable again");
                        }
                        retry.reset();
                    }
                    Outcome::Retry { after } => {
                        let delay = retry.next_delay().max(after.unwrap_or_default());
                        pending = Some(batch);
                        if !sleep_unless(delay, self.shutdown.cancelled()).await {
                            break 'run;
                        }
                        continue;
                    }
                }
                if self.shutdown.is_cancelled() {
                    break 'run;
                }
            }
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break 'run,
                () = tokio::time::sleep(self.interval) => {}
                () = self.shared.wake.notified() => {}
            }
        }
        self.flush(pending).await;
    }

    fn take_batch(&self) -> Option<Vec<Series>> {
        let batch = lock(&self.shared.state)
            .queue
            .take(self.shared.max_samples_per_request);
        (!batch.is_empty()).then_some(batch)
    }

    /// At shutdown: one try for the pending batch and each queued one, all
    /// within the timeout; what is left is dropped and counted.
    async fn flush(&self, pending: Option<Vec<Series>>) {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut lost = 0;
        let mut batch = pending.or_else(|| self.take_batch());
        while let Some(b) = batch {
            match tokio::time::timeout_at(deadline, self.send(&b, 0)).await {
                Ok(Outcome::Sent | Outcome::Rejected) => {}
                Ok(Outcome::Retry { .. }) | Err(_) => {
                    lost += sample_count(&b);
                    break;
                }
            }
            batch = self.take_batch();
        }
        let left = {
            let mut state = lock(&self.shared.state);
            state.closed = true;
            let left = lost + state.queue.clear() as u64;
            state.stats.samples_dropped += left;
            left
        };
        if left > 0 {
            warn!(url = %self.url, samples = left, "remote write stopped; samples not sent were dropped");
        } else {
            info!(url = %self.url, "remote write stopped; everything queued was sent");
        }
    }

    /// One try of one batch; updates the statistics.
    async fn send(&self, batch: &[Series], attempt: u32) -> Outcome {
        let samples = sample_count(batch);
        let body = match encode(&write_request(batch)) {
            Ok(body) => body,
            Err(e) => {
                self.rejected(samples, format!("cannot compress a batch: {e}"));
                return Outcome::Rejected;
            }
        };
        let mut request = self
            .client
            .post(self.url.clone())
            .header(header::CONTENT_ENCODING, "snappy")
            .header(header::CONTENT_TYPE, "application/x-protobuf")
            .header("X-Prometheus-Remote-Write-Version", PROTOCOL_VERSION)
            .body(body);
        if let Some(path) = &self.token_file {
            match bearer(path) {
                Ok(value) => request = request.header(header::AUTHORIZATION, value),
                Err(e) => return self.failed(e, None, attempt),
            }
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => {
                let error = format!("{}: {}", self.url, error_chain(&e));
                return self.failed(error, None, attempt);
            }
        };
        let status = response.status();
        match classify(status) {
            Outcome::Sent => {
                let mut state = lock(&self.shared.state);
                state.stats.samples_sent += samples;
                state.stats.last_success_unix_ms = Some(now_unix_ms());
                drop(state);
                self.shared.overflowing.store(false, Ordering::Relaxed);
                debug!(url = %self.url, samples, "remote write batch sent");
                Outcome::Sent
            }
            Outcome::Retry { .. } => {
                let after = retry_after(response.headers());
                let body = body_prefix(response, MAX_ERROR_BODY).await;
                let error = format!("{} answered {status}: {body}", self.url);
                self.failed(error, after, attempt)
            }
            Outcome::Rejected => {
                let location = response
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .map(|l| {
                        let l: String = l.chars().take(MAX_ERROR_BODY).collect();
                        format!(" (redirected to {l}; set {SECTION}.url to it)")
                    })
                    .unwrap_or_default();
                let body = body_prefix(response, MAX_ERROR_BODY).await;
                let error = format!("{} answered {status}{location}: {body}", self.url);
                self.rejected(samples, error);
                Outcome::Rejected
            }
        }
    }

    /// A batch the receiver refused for good.
    fn rejected(&self, samples: u64, error: String) {
        warn!(samples, %error, "remote write batch refused; dropped, not retried");
        let mut state = lock(&self.shared.state);
        state.stats.samples_failed += samples;
        state.stats.last_error = Some(error);
    }

    /// A failed try that is retried.
    fn failed(&self, error: String, after: Option<Duration>, attempt: u32) -> Outcome {
        warn!(attempt, %error, "remote write failed; retrying the batch");
        let mut state = lock(&self.shared.state);
        state.stats.requests_failed += 1;
        state.stats.last_error = Some(error);
        Outcome::Retry { after }
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::net::SocketAddr;
    use std::process::{Child, Command, Stdio};

    use axum::body::Bytes;
    use axum::extract::State as AxumState;
    use axum::http::StatusCode;
    use novacron_common::exposition::render_text;
    use novacron_common::wire::{
        AllocationUsage, CpuSample, CpuSeconds, DiskSample, GpuSample, MemorySample, NetworkSample,
    };

    use super::*;

    const GIB: u64 = 1 << 30;

    /// Samples by (name, sorted labels, value bits).
    type Exposed = BTreeSet<(String, Vec<(String, String)>, u64)>;
    /// Samples by series (sorted labels), in time order.
    type Stored = BTreeMap<Vec<(String, String)>, Points>;

    /// A node reading taken at `at_ms`; `i` varies the values.
    fn reading(at_ms: u64, i: u64) -> NodeSample {
        let f = i as f32;
        NodeSample {
            seq: i,
            at_unix_ms: at_ms,
            cpu: CpuSample {
                total_percent: 25.0 + f,
                per_core_percent: vec![20.0, 30.0],
                load: [1.5 + f, 1.25, 1.0],
                seconds_total: Some(CpuSeconds {
                    user: 120.5 + i as f64,
                    idle: 3000.25 + i as f64,
                    ..CpuSeconds::default()
                }),
            },
            memory: MemorySample {
                total_bytes: 16 * GIB,
                used_bytes: 4 * GIB + i,
                available_bytes: 12 * GIB - i,
                swap_total_bytes: 2 * GIB,
                swap_used_bytes: 0,
            },
            disks: vec![DiskSample {
                mount: "/".into(),
                device: "/dev/sda1".into(),
                total_bytes: 100 * GIB,
                available_bytes: 60 * GIB,
                read_bytes_per_sec: 1024,
                written_bytes_per_sec: 2048,
                used_bytes: 35 * GIB,
                read_bytes_total: Some(10 * GIB + i),
                written_bytes_total: Some(20 * GIB + i),
            }],
            networks: vec![NetworkSample {
                interface: "eth0".into(),
                rx_bytes_per_sec: 1000,
                tx_bytes_per_sec: 500,
                rx_bytes_total: Some(7_000_000 + i),
                tx_bytes_total: Some(5_000_000 + i),
            }],
            gpus: vec![GpuSample {
                index: 0,
                uuid: "GPU-0".into(),
                name: "NVIDIA H100".into(),
                utilization_percent: 75,
                memory_used_bytes: 10 * GIB,
                memory_total_bytes: 80 * GIB,
                temperature_celsius: 61,
                power_milliwatts: 312_500,
            }],
            uptime_secs: 3600 + i,
            allocations: vec![AllocationUsage {
                id: "web-1".into(),
                cpu_percent: 50.0 + f,
                memory_bytes: 30 << 20,
                memory_limit_bytes: 32 << 20,
                rx_bytes_per_sec: 10,
                tx_bytes_per_sec: 20,
            }],
        }
    }

    fn series(name: &str, samples: &[(i64, f64)]) -> Series {
        Series {
            labels: vec![
                ("node".into(), "n1".into()),
                ("__name__".into(), name.into()),
            ],
            samples: samples.to_vec(),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Polls `probe` every 50 ms until it gives a value; panics naming `what`
    /// past `limit`.
    async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(value) = probe().await {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {limit:?} waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port()
    }

    fn settings(url: String) -> RemoteWriteSettings {
        RemoteWriteSettings {
            interval: Duration::from_millis(50),
            timeout: Duration::from_secs(5),
            ..RemoteWriteSettings::new(url)
        }
    }

    // ---- settings ----

    #[test]
    fn settings_parse_with_defaults_and_refuse_unknown_fields() {
        let s: RemoteWriteSettings =
            toml::from_str("url = \"http://prom:9090/api/v1/write\"").expect("parses");
        assert_eq!(s, RemoteWriteSettings::new("http://prom:9090/api/v1/write"));
        assert_eq!(s.interval, Duration::from_secs(5));
        assert_eq!(s.timeout, Duration::from_secs(10));
        assert_eq!(s.max_queue_samples, 100_000);
        assert_eq!(s.max_samples_per_request, 2_000);
        s.validate().expect("valid");

        let s: RemoteWriteSettings = toml::from_str(
            "url = \"https://mimir/api/v1/push\"\ninterval = \"250ms\"\ntimeout = \"1m\"\nbearer_token_file = \"/t\"\nextra_labels = { fleet = \"prod\" }",
        )
        .expect("parses");
        assert_eq!(s.interval, Duration::from_millis(250));
        assert_eq!(s.timeout, Duration::from_secs(60));
        assert_eq!(s.extra_labels["fleet"], "prod");
        let back: RemoteWriteSettings =
            toml::from_str(&toml::to_string(&s).expect("serializes")).expect("round trip");
        assert_eq!(back, s);

        let e = toml::from_str::<RemoteWriteSettings>("url = \"http://p\"\nintervall = \"1s\"")
            .expect_err("unknown field");
        assert!(e.to_string().contains("intervall"), "{e}");
        assert!(toml::from_str::<RemoteWriteSettings>("interval = \"1s\"").is_err());
    }

    #[test]
    fn validate_names_the_field_and_the_fix() {
        let bad = |f: fn(&mut RemoteWriteSettings)| {
            let mut s = RemoteWriteSettings::new("http://prom:9090/api/v1/write");
            f(&mut s);
            s.validate().expect_err("invalid")
        };
        assert!(bad(|s| s.url = "prom:9090".into()).contains("http://"));
        assert!(bad(|s| s.url = "ftp://prom/x".into()).contains("ftp"));
        assert!(bad(|s| s.url = "not a url".into()).contains("history.remote_write.url"));
        assert!(bad(|s| s.url = "http://u:p@prom/x".into()).contains("bearer_token_file"));
        assert!(bad(|s| s.interval = Duration::ZERO).contains("interval"));
        assert!(bad(|s| s.timeout = Duration::ZERO).contains("timeout"));
        assert!(bad(|s| s.max_queue_samples = 0).contains("max_queue_samples"));
        assert!(bad(|s| s.max_samples_per_request = 0).contains("max_samples_per_request"));
        for name in ["1abc", "a-b", "", "é"] {
            let mut s = RemoteWriteSettings::new("https://prom/x");
            s.extra_labels.insert(name.into(), "v".into());
            let e = s.validate().expect_err("bad label name");
            assert!(e.contains("[a-zA-Z_][a-zA-Z0-9_]*"), "{e}");
        }
        assert!(
            bad(|s| {
                s.extra_labels.insert("__x".into(), "v".into());
            })
            .contains("reserves")
        );
        assert!(
            bad(|s| {
                s.extra_labels.insert("fleet".into(), String::new());
            })
            .contains("empty")
        );
        let mut ok = RemoteWriteSettings::new("https://prom:443/api/v1/write");
        ok.extra_labels.insert("_fleet2".into(), "prod".into());
        ok.validate().expect("valid");
    }

    // ---- pure core ----

    /// Test 1: a WriteRequest round-trips through prost and raw snappy.
    #[test]
    fn a_write_request_round_trips_through_prost_and_raw_snappy() {
        let batch = vec![
            normalize(series("b_metric", &[(30, 3.0), (10, 1.0)]), &[]).expect("valid"),
            normalize(series("a_metric", &[(5, -0.5)]), &[]).expect("valid"),
            normalize(series("b_metric", &[(20, 2.0), (30, 3.5)]), &[]).expect("valid"),
        ];
        let request = write_request(&batch);
        let body = encode(&request).expect("compresses");
        // Raw (block) snappy, not the framed format (which starts with 0xff "sNaPpY").
        assert_ne!(body.first(), Some(&0xff));
        let raw = snap::raw::Decoder::new()
            .decompress_vec(&body)
            .expect("raw snappy");
        let decoded = WriteRequest::decode(raw.as_slice()).expect("protobuf");
        assert_eq!(decoded, request);
        let label = |n: &str, v: &str| Label {
            name: n.into(),
            value: v.into(),
        };
        let sample = |timestamp, value| Sample { value, timestamp };
        assert_eq!(
            decoded,
            WriteRequest {
                timeseries: vec![
                    TimeSeries {
                        labels: vec![label("__name__", "a_metric"), label("node", "n1")],
                        samples: vec![sample(5, -0.5)],
                    },
                    // Merged, in time order, the later push winning at t=30.
                    TimeSeries {
                        labels: vec![label("__name__", "b_metric"), label("node", "n1")],
                        samples: vec![sample(10, 1.0), sample(20, 2.0), sample(30, 3.5)],
                    },
                ],
            }
        );
        // The field numbers and types of remote write 1.0, byte by byte:
        // WriteRequest.timeseries = 1, TimeSeries.labels = 1 and samples = 2,
        // Label.name = 1 and value = 2 (length-delimited: tag bytes 0x0a, 0x12),
        // Sample.value = 1 (double: 0x09) and timestamp = 2 (varint: 0x10).
        let one = WriteRequest {
            timeseries: vec![TimeSeries {
                labels: vec![label("a", "b")],
                samples: vec![sample(1, 1.0)],
            }],
        }
        .encode_to_vec();
        let mut want = vec![
            0x0a, 21, 0x0a, 6, 0x0a, 1, b'a', 0x12, 1, b'b', 0x12, 11, 0x09,
        ];
        want.extend_from_slice(&1.0f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 1]);
        assert_eq!(one, want);
    }

    #[test]
    fn normalize_sorts_labels_adds_extra_ones_and_refuses_bad_names() {
        let extra = labels(&[("fleet", "prod"), ("node", "ignored")]);
        let s = normalize(
            Series {
                labels: labels(&[("zone", ""), ("node", "n1"), ("__name__", "m")]),
                samples: vec![(3, 3.0), (1, 1.0), (2, 2.0)],
            },
            &extra,
        )
        .expect("valid");
        assert_eq!(
            s.labels,
            labels(&[("__name__", "m"), ("fleet", "prod"), ("node", "n1")])
        );
        assert_eq!(s.samples, vec![(1, 1.0), (2, 2.0), (3, 3.0)]);
        for bad in [
            labels(&[("node", "n1")]),
            labels(&[("__name__", "1m")]),
            labels(&[("__name__", "m"), ("a-b", "x")]),
            labels(&[("__name__", "m"), ("a", "x"), ("a", "y")]),
        ] {
            let s = Series {
                labels: bad.clone(),
                samples: vec![(1, 1.0)],
            };
            assert!(normalize(s, &[]).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_queue_drops_the_oldest_samples_and_batches_in_order() {
        let mut q = Queue::default();
        let s = |name: &str, ts: &[i64]| Series {
            labels: labels(&[("__name__", name)]),
            samples: ts.iter().map(|t| (*t, *t as f64)).collect(),
        };
        assert_eq!(q.push(s("a", &[1, 2, 3]), 5), 0);
        assert_eq!(q.push(s("b", &[4, 5]), 5), 0);
        assert_eq!(q.samples, 5);
        // Two over: a's two oldest go.
        assert_eq!(q.push(s("c", &[6, 7]), 5), 2);
        assert_eq!(q.samples, 5);
        // Larger than the whole queue: only its newest 5 stay.
        let mut r = Queue::default();
        assert_eq!(r.push(s("d", &[1, 2, 3, 4, 5, 6, 7]), 5), 2);
        assert_eq!(r.take(100), vec![s("d", &[3, 4, 5, 6, 7])]);
        assert_eq!(r.samples, 0);
        // Batches of at most 2, oldest first, a series split where needed.
        assert_eq!(q.take(2), vec![s("a", &[3]), s("b", &[4])]);
        assert_eq!(q.take(2), vec![s("b", &[5]), s("c", &[6])]);
        assert_eq!(q.samples, 1);
        assert_eq!(q.take(2), vec![s("c", &[7])]);
        assert!(q.take(2).is_empty());
        assert_eq!(q.samples, 0);
        assert_eq!(q.push(s("e", &[8]), 5), 0);
        assert_eq!(q.clear(), 1);
    }

    #[test]
    fn statuses_are_sent_retried_or_refused_per_the_spec() {
        use reqwest::StatusCode as S;
        assert_eq!(classify(S::OK), Outcome::Sent);
        assert_eq!(classify(S::NO_CONTENT), Outcome::Sent);
        for s in [
            S::INTERNAL_SERVER_ERROR,
            S::BAD_GATEWAY,
            S::SERVICE_UNAVAILABLE,
            S::TOO_MANY_REQUESTS,
        ] {
            assert_eq!(classify(s), Outcome::Retry { after: None }, "{s}");
        }
        for s in [
            S::BAD_REQUEST,
            S::UNAUTHORIZED,
            S::NOT_FOUND,
            S::PAYLOAD_TOO_LARGE,
            S::MOVED_PERMANENTLY,
        ] {
            assert_eq!(classify(s), Outcome::Rejected, "{s}");
        }
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("86400"));
        assert_eq!(retry_after(&h), Some(RETRY_MAX));
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn the_bearer_token_is_read_trimmed_and_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").expect("write");
        let v = bearer(&path).expect("token");
        assert_eq!(v.to_str().expect("ascii"), "Bearer s3cret");
        assert!(v.is_sensitive());
        std::fs::write(&path, "\n").expect("write");
        assert!(bearer(&path).expect_err("empty").contains("empty"));
        std::fs::write(&path, "a\nb").expect("write");
        assert!(bearer(&path).is_err());
        std::fs::write(&path, vec![b'a'; MAX_TOKEN_FILE as usize + 1]).expect("write");
        assert!(bearer(&path).expect_err("large").contains("larger"));
        let missing = bearer(&dir.path().join("nope")).expect_err("missing");
        assert!(missing.contains("bearer_token_file"), "{missing}");
    }

    /// Parses a text-format exposition into (name, labels without empty ones,
    /// value); the test data has no escaped characters.
    fn exposition_samples(text: &str) -> Exposed {
        let mut out = BTreeSet::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').expect("a value");
            let value: f64 = value.parse().expect("a number");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.strip_suffix('}').expect("closing brace");
                    let labels = inner
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").expect("k=\"v\"");
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .filter(|(_, v)| !v.is_empty())
                        .collect();
                    (name, labels)
                }
                None => (series, vec![]),
            };
            let mut labels: Vec<(String, String)> = labels;
            labels.push(("__name__".into(), name.into()));
            labels.sort();
            out.insert((name.to_string(), labels, value.to_bits()));
        }
        out
    }

    #[test]
    fn node_series_carry_the_names_and_labels_of_the_metrics_endpoint() {
        let sample = reading(1_700_000_100_000, 1);
        let mut collected = Samples::default();
        collect_sample("n1", "", &sample, &mut collected);
        let families: Vec<&Family> = SAMPLE_FAMILIES.iter().collect();
        let text = render_text(&families, collected);
        let expected = exposition_samples(&text);
        let node: Exposed = node_series("n1", &sample)
            .into_iter()
            .filter(|s| !s.labels.iter().any(|(k, _)| k == "alloc"))
            .map(|s| {
                assert_eq!(s.samples.len(), 1);
                assert_eq!(s.samples[0].0, 1_700_000_100_000);
                let name = s
                    .labels
                    .iter()
                    .find(|(k, _)| k == "__name__")
                    .expect("name");
                (name.1.clone(), s.labels.clone(), s.samples[0].1.to_bits())
            })
            .collect();
        assert!(expected.len() > 30, "{text}");
        assert_eq!(node, expected);
        assert!(
            node.iter()
                .any(|(n, _, _)| n == "novacron_node_cpu_seconds_total")
        );

        // Allocation usage: the families of /metrics, labelled alloc and node.
        let allocs: Vec<Series> = node_series("n1", &sample)
            .into_iter()
            .filter(|s| s.labels.iter().any(|(k, _)| k == "alloc"))
            .collect();
        assert_eq!(allocs.len(), 5);
        for s in &allocs {
            let name = &s.labels[0].1;
            // (services::metrics' tests check these names against its
            // families: importing them here would make a module cycle.)
            assert!(name.starts_with("novacron_allocation_"), "{name}");
            assert_eq!(
                s.labels[1..],
                labels(&[("alloc", "web-1"), ("node", "n1")])[..]
            );
        }
        let cpu = allocs
            .iter()
            .find(|s| s.labels[0].1 == ALLOC_CPU_USAGE)
            .expect("cpu");
        assert_eq!(cpu.samples, vec![(1_700_000_100_000, 0.51)]);

        // With the zone and the job, as /metrics labels them.
        let with = node_series_with("n1", "eu-1", &sample, |id| {
            (id == "web-1").then(|| "web".to_string())
        });
        assert_eq!(with.len(), node_series("n1", &sample).len());
        assert!(with.iter().all(|s| {
            let alloc = s.labels.iter().any(|(k, _)| k == "alloc");
            let key = if alloc { "novacron_job" } else { "zone" };
            s.labels.iter().any(|(k, _)| k == key)
        }));

        // Not finite: left out, as /metrics does.
        let mut nan = sample.clone();
        nan.cpu.total_percent = f32::NAN;
        let n = node_series("n1", &nan);
        assert!(
            !n.iter()
                .any(|s| s.labels[0].1 == "novacron_node_cpu_usage_ratio")
        );
    }

    // ---- the sender against a small receiver ----

    /// One request a test receiver got.
    #[derive(Debug, Clone)]
    struct Received {
        headers: axum::http::HeaderMap,
        request: WriteRequest,
    }

    #[derive(Clone)]
    struct Receiver {
        got: Arc<Mutex<Vec<Received>>>,
        answer: fn(usize) -> (StatusCode, String),
    }

    async fn receive(
        AxumState(r): AxumState<Receiver>,
        headers: axum::http::HeaderMap,
        body: Bytes,
    ) -> (StatusCode, String) {
        let raw = match snap::raw::Decoder::new().decompress_vec(&body) {
            Ok(raw) => raw,
            Err(e) => return (StatusCode::UNPROCESSABLE_ENTITY, format!("snappy: {e}")),
        };
        let request = match WriteRequest::decode(raw.as_slice()) {
            Ok(r) => r,
            Err(e) => return (StatusCode::UNPROCESSABLE_ENTITY, format!("protobuf: {e}")),
        };
        let n = {
            let mut got = lock(&r.got);
            got.push(Received { headers, request });
            got.len() - 1
        };
        (r.answer)(n)
    }

    /// A receiver on a loopback port answering request `n` with `answer(n)`.
    async fn receiver(
        answer: fn(usize) -> (StatusCode, String),
    ) -> (String, Arc<Mutex<Vec<Received>>>) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let app = axum::Router::new()
            .route("/api/v1/write", axum::routing::post(receive))
            .with_state(Receiver {
                got: got.clone(),
                answer,
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (format!("http://{addr}/api/v1/write"), got)
    }

    fn received(got: &Arc<Mutex<Vec<Received>>>) -> Vec<Received> {
        lock(got).clone()
    }

    /// Test 5: a 400 drops the batch, counts its samples as failed, logs the
    /// (truncated) answer, and is not retried.
    #[tokio::test]
    async fn a_4xx_drops_the_batch_and_is_not_retried() {
        let (url, got) = receiver(|_| {
            (
                StatusCode::BAD_REQUEST,
                format!("out of order sample {}", "x".repeat(2000)),
            )
        })
        .await;
        let shutdown = CancellationToken::new();
        let writer = RemoteWriter::spawn(settings(url), shutdown.clone()).expect("spawn");
        writer.push(vec![series("first", &[(1, 1.0), (2, 2.0), (3, 3.0)])]);
        let stats = eventually(
            "the first batch to be refused",
            Duration::from_secs(20),
            || {
                let s = writer.stats();
                std::future::ready((s.samples_failed == 3).then_some(s))
            },
        )
        .await;
        assert_eq!(stats.requests_failed, 0);
        assert_eq!(stats.samples_sent, 0);
        assert_eq!(stats.queued, 0);
        let error = stats.last_error.expect("an error");
        assert!(
            error.contains("400") && error.contains("out of order sample"),
            "{error}"
        );
        assert_eq!(
            error.matches('x').count(),
            MAX_ERROR_BODY - "out of order sample ".len()
        );

        // The next batch goes out next: the refused one was not sent again.
        writer.push(vec![series("second", &[(4, 4.0)])]);
        eventually(
            "the second batch to be refused",
            Duration::from_secs(20),
            || std::future::ready((writer.stats().samples_failed == 4).then_some(())),
        )
        .await;
        let requests = received(&got);
        assert_eq!(requests.len(), 2, "{requests:?}");
        assert_eq!(requests[0].request.timeseries[0].labels[0].value, "first");
        assert_eq!(requests[1].request.timeseries[0].labels[0].value, "second");
        shutdown.cancel();
        writer.stopped().await;
    }

    /// 5xx and 429 are retried with the same batch, then it is sent; the
    /// request carries the headers of remote write 1.0.
    #[tokio::test]
    async fn a_5xx_or_429_is_retried_with_the_same_batch() {
        let (url, got) = receiver(|n| match n {
            0 => (StatusCode::SERVICE_UNAVAILABLE, "starting".into()),
            1 => (StatusCode::TOO_MANY_REQUESTS, "slow down".into()),
            _ => (StatusCode::NO_CONTENT, String::new()),
        })
        .await;
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("token");
        std::fs::write(&token, "tok\n").expect("token");
        let shutdown = CancellationToken::new();
        let mut s = settings(url);
        s.bearer_token_file = Some(token);
        s.extra_labels.insert("fleet".into(), "ci".into());
        let writer = RemoteWriter::spawn(s, shutdown.clone()).expect("spawn");
        writer.push(vec![
            series("m", &[(2, 2.0), (1, 1.0)]),
            series("m", &[(3, 3.0)]),
        ]);
        let stats = eventually("the batch to be sent", Duration::from_secs(20), || {
            let s = writer.stats();
            std::future::ready((s.samples_sent == 3).then_some(s))
        })
        .await;
        assert_eq!(stats.requests_failed, 2);
        assert_eq!(stats.samples_failed, 0);
        assert!(stats.last_success_unix_ms.is_some());
        assert!(stats.last_error.expect("an error").contains("429"));
        let requests = received(&got);
        assert_eq!(requests.len(), 3);
        assert_eq!(requests[0].request, requests[2].request);
        assert_eq!(requests[1].request, requests[2].request);
        let r = &requests[2];
        let h = |name: &str| {
            r.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        };
        assert_eq!(h("content-encoding"), "snappy");
        assert_eq!(h("content-type"), "application/x-protobuf");
        assert_eq!(h("x-prometheus-remote-write-version"), "0.1.0");
        assert_eq!(
            h("user-agent"),
            format!("novacron/{}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(h("authorization"), "Bearer tok");
        let ts = &r.request.timeseries;
        assert_eq!(ts.len(), 1);
        let names: Vec<&str> = ts[0].labels.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["__name__", "fleet", "node"]);
        let times: Vec<i64> = ts[0].samples.iter().map(|s| s.timestamp).collect();
        assert_eq!(times, [1, 2, 3]);
        shutdown.cancel();
        writer.stopped().await;
    }

    /// Test 4: with no receiver, the queue stays within max_queue_samples and
    /// the oldest samples are dropped and counted.
    #[tokio::test]
    async fn the_queue_stays_bounded_without_a_receiver() {
        let port = free_port();
        let shutdown = CancellationToken::new();
        let mut s = settings(format!("http://127.0.0.1:{port}/api/v1/write"));
        s.max_queue_samples = 100;
        s.max_samples_per_request = 10;
        s.timeout = Duration::from_millis(500);
        let writer = RemoteWriter::spawn(s, shutdown.clone()).expect("spawn");
        for round in 0..10i64 {
            let samples: Vec<(i64, f64)> = (0..100).map(|i| (round * 100 + i, 1.0)).collect();
            writer.push(vec![series("m", &samples)]);
            let stats = writer.stats();
            assert!(stats.queued <= 100, "{stats:?}");
            tokio::task::yield_now().await;
        }
        let stats = eventually("a failed request", Duration::from_secs(20), || {
            let s = writer.stats();
            std::future::ready((s.requests_failed > 0).then_some(s))
        })
        .await;
        // Every pushed sample is queued, dropped, or in the one batch being retried.
        assert!(stats.queued <= 100, "{stats:?}");
        assert_eq!(stats.samples_sent, 0);
        assert_eq!(stats.samples_failed, 0);
        let accounted = stats.samples_dropped + stats.queued as u64;
        assert!((990..=1000).contains(&accounted), "{stats:?}");
        assert!(
            stats
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains(&port.to_string()))
        );

        // Shutdown: one try within the timeout, then the rest is counted as dropped.
        shutdown.cancel();
        writer.stopped().await;
        let stats = writer.stats();
        assert_eq!(stats.queued, 0);
        assert_eq!(stats.samples_dropped, 1000, "{stats:?}");
        writer.push(vec![series("m", &[(5000, 1.0)])]);
        assert_eq!(writer.stats().samples_dropped, 1001);
        assert_eq!(writer.stats().queued, 0);
    }

    #[tokio::test]
    async fn shutdown_flushes_what_is_queued() {
        let (url, got) = receiver(|_| (StatusCode::NO_CONTENT, String::new())).await;
        let shutdown = CancellationToken::new();
        let mut s = settings(url);
        s.interval = Duration::from_secs(3600);
        s.max_samples_per_request = 2;
        let writer = RemoteWriter::spawn(s, shutdown.clone()).expect("spawn");
        writer.push(vec![series("m", &[(1, 1.0)])]);
        shutdown.cancel();
        writer.stopped().await;
        let stats = writer.stats();
        assert_eq!(stats.samples_sent, 1, "{stats:?}");
        assert_eq!(stats.samples_dropped, 0);
        assert_eq!(received(&got).len(), 1);
    }

    #[tokio::test]
    async fn spawn_refuses_bad_settings_and_missing_files() {
        let shutdown = CancellationToken::new();
        let e = RemoteWriter::spawn(RemoteWriteSettings::new("ftp://x/"), shutdown.clone())
            .expect_err("bad url");
        assert!(e.to_string().contains("http://"), "{e}");
        let mut s = RemoteWriteSettings::new("https://x/api/v1/write");
        s.bearer_token_file = Some("/nonexistent/token".into());
        let e = RemoteWriter::spawn(s, shutdown.clone()).expect_err("no token");
        assert!(e.to_string().contains("bearer_token_file"), "{e}");
        let mut s = RemoteWriteSettings::new("https://x/api/v1/write");
        s.ca_file = Some("/nonexistent/ca.pem".into());
        let e = RemoteWriter::spawn(s, shutdown).expect_err("no CA");
        assert!(format!("{e:#}").contains("ca_file"), "{e:#}");
    }

    // ---- a real Prometheus ----

    /// A Prometheus 2.x with the remote-write receiver on a loopback port, killed
    /// on drop.
    struct Prometheus {
        child: Child,
        port: u16,
        dir: tempfile::TempDir,
    }

    impl Prometheus {
        /// Starts Prometheus on `port` and waits for `/-/ready`.
        async fn start(port: u16) -> Prometheus {
            let dir = tempfile::tempdir().expect("tempdir");
            let config = dir.path().join("p.yml");
            std::fs::write(&config, "global: {}\n").expect("config");
            let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
            let child = Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--web.enable-remote-write-receiver")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "prometheus is needed for this test ({e}): `bash .ci/setup` installs it (Debian package prometheus)"
                    )
                });
            let mut p = Prometheus { child, port, dir };
            let client = test_client();
            let ready = format!("http://127.0.0.1:{port}/-/ready");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(Some(status)) = p.child.try_wait() {
                    panic!("prometheus exited ({status}):\n{}", p.log());
                }
                if let Ok(r) = client.get(&ready).send().await
                    && r.status().is_success()
                {
                    return p;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "prometheus not ready after 60 s:\n{}",
                    p.log()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }

        fn log(&self) -> String {
            std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
        }

        /// The raw samples of `selector` in the 10 minutes before `at_ms`, per
        /// series (labels sorted, `__name__` included).
        async fn raw(&self, selector: &str, at_ms: i64) -> Stored {
            let url = reqwest::Url::parse_with_params(
                &format!("http://127.0.0.1:{}/api/v1/query", self.port),
                &[
                    ("query", format!("{selector}[10m]")),
                    ("time", format!("{:.3}", at_ms as f64 / 1000.0)),
                ],
            )
            .expect("query url");
            let body: serde_json::Value = test_client()
                .get(url)
                .send()
                .await
                .expect("query")
                .json()
                .await
                .expect("JSON");
            assert_eq!(body["status"], "success", "{body}");
            let mut out = BTreeMap::new();
            for series in body["data"]["result"].as_array().expect("a matrix") {
                let mut labels: Vec<(String, String)> = series["metric"]
                    .as_object()
                    .expect("labels")
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().expect("a string").to_string()))
                    .collect();
                labels.sort();
                let values = series["values"]
                    .as_array()
                    .expect("values")
                    .iter()
                    .map(|pair| {
                        let t = pair[0].as_f64().expect("a time");
                        let v: f64 = pair[1]
                            .as_str()
                            .expect("a value")
                            .parse()
                            .expect("a number");
                        ((t * 1000.0).round() as i64, v)
                    })
                    .collect();
                out.insert(labels, values);
            }
            out
        }
    }

    impl Drop for Prometheus {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn test_client() -> reqwest::Client {
        tls::install_crypto_provider();
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client")
    }

    fn now_ms() -> i64 {
        i64::try_from(now_unix_ms()).expect("a recent time")
    }

    /// What Prometheus should hold after `series` were written with `extra`
    /// labels: per label set, its samples in time order.
    fn expected(series: &[Series], extra: &[(String, String)]) -> Stored {
        let mut out: Stored = BTreeMap::new();
        for s in series {
            let s = normalize(s.clone(), extra).expect("valid");
            out.entry(s.labels).or_default().extend(s.samples);
        }
        for samples in out.values_mut() {
            samples.sort_by_key(|(t, _)| *t);
        }
        out
    }

    /// Test 2: node series written to a real Prometheus come back exactly: every
    /// series, label and sample of node n1.
    #[tokio::test]
    async fn node_series_arrive_in_a_real_prometheus_exactly() {
        let prometheus = Prometheus::start(free_port()).await;
        let shutdown = CancellationToken::new();
        let mut s = settings(format!("http://127.0.0.1:{}/api/v1/write", prometheus.port));
        s.extra_labels.insert("fleet".into(), "ci".into());
        // Small requests, so the samples of one series span several of them.
        s.max_samples_per_request = 25;
        let extra = labels(&[("fleet", "ci")]);
        let writer = RemoteWriter::spawn(s, shutdown.clone()).expect("spawn");
        let now = now_ms();
        let mut all = Vec::new();
        for i in 0..3u64 {
            let at = now - 30_000 + 10_000 * i as i64;
            let series = node_series("n1", &reading(at as u64, i));
            all.extend(series.clone());
            writer.push(series);
        }
        let want = expected(&all, &extra);
        assert!(want.len() > 30);
        let got = eventually("the samples in Prometheus", Duration::from_secs(30), || {
            let query = prometheus.raw("{node=\"n1\"}", now);
            let want = &want;
            async move {
                let got = query.await;
                let complete = got.len() == want.len() && got.values().all(|v| v.len() == 3);
                complete.then_some(got)
            }
        })
        .await;
        assert_eq!(got, want);
        let memory = got
            .iter()
            .find(|(l, _)| l[0].1 == "novacron_node_memory_used_bytes")
            .expect("memory series");
        assert_eq!(
            memory.1,
            &vec![
                (now - 30_000, (4 * GIB) as f64),
                (now - 20_000, (4 * GIB + 1) as f64),
                (now - 10_000, (4 * GIB + 2) as f64),
            ]
        );
        let stats = writer.stats();
        assert_eq!(stats.samples_sent as usize, all.len(), "{stats:?}");
        assert_eq!(stats.samples_failed + stats.samples_dropped, 0, "{stats:?}");
        shutdown.cancel();
        writer.stopped().await;
    }

    /// Test 3: while Prometheus is not running the samples wait and the batch is
    /// retried; once it starts on that port they arrive.
    #[tokio::test]
    async fn samples_wait_for_prometheus_to_start_and_then_arrive() {
        let port = free_port();
        let shutdown = CancellationToken::new();
        let writer = RemoteWriter::spawn(
            settings(format!("http://127.0.0.1:{port}/api/v1/write")),
            shutdown.clone(),
        )
        .expect("spawn");
        let now = now_ms();
        let batch: Vec<Series> = (0..4)
            .map(|i| {
                series(
                    "novacron_test_queued",
                    &[(now - 40_000 + 10_000 * i, i as f64 + 0.25)],
                )
            })
            .collect();
        writer.push(batch);
        let stats = eventually("a failed try", Duration::from_secs(20), || {
            let s = writer.stats();
            std::future::ready((s.requests_failed >= 1).then_some(s))
        })
        .await;
        assert_eq!(stats.samples_sent, 0);
        assert_eq!(stats.samples_dropped + stats.samples_failed, 0);
        // More samples queue while the batch is retried.
        writer.push(vec![series("novacron_test_queued", &[(now - 1_000, 9.5)])]);

        let prometheus = Prometheus::start(port).await;
        let got = eventually(
            "the queued samples in Prometheus",
            Duration::from_secs(60),
            || {
                let query = prometheus.raw("novacron_test_queued", now);
                async move {
                    let got = query.await;
                    got.values()
                        .next()
                        .is_some_and(|v| v.len() == 5)
                        .then_some(got)
                }
            },
        )
        .await;
        let want: Vec<(i64, f64)> = vec![
            (now - 40_000, 0.25),
            (now - 30_000, 1.25),
            (now - 20_000, 2.25),
            (now - 10_000, 3.25),
            (now - 1_000, 9.5),
        ];
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            vec![(
                labels(&[("__name__", "novacron_test_queued"), ("node", "n1")]),
                want
            )]
        );
        let stats = writer.stats();
        assert_eq!(stats.samples_sent, 5, "{stats:?}");
        assert!(stats.requests_failed >= 1);
        shutdown.cancel();
        writer.stopped().await;
    }
}

//! Prometheus exposition shared by the controller's `/metrics` (the whole fleet)
//! and the agent's optional `/metrics` (its own host): the family declarations, the
//! sample collection of one host reading ([`collect_sample`]) and of this process
//! ([`collect_process`]), and the rendering with `prometheus-client` in the
//! OpenMetrics text format or the Prometheus text format 0.0.4
//! ([`to_text_format`]).
//!
//! A host's series carry the same names and labels wherever they are scraped
//! (`node`, `zone`, node_exporter's `device` and `mountpoint`), so one dashboard
//! serves both endpoints.

pub mod process;

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use novacron_wire::{GpuSample, NodeSample};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

pub use process::ProcessStats;

/// Content type of the OpenMetrics answer.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text format answer.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    /// The family name (a counter's samples add `_total`, a histogram's
    /// `_bucket`, `_sum` and `_count`).
    pub name: &'static str,
    /// One line of help, without backslashes or quotes.
    pub help: &'static str,
    /// Its type.
    pub kind: Kind,
}

/// A family's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A value that goes up and down.
    Gauge,
    /// A monotonic count.
    Counter,
    /// Buckets, sum and count.
    Histogram,
}

impl Family {
    /// A gauge.
    pub const fn gauge(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind: Kind::Gauge,
        }
    }

    /// A counter.
    pub const fn counter(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind: Kind::Counter,
        }
    }

    /// A histogram (its samples come from [`Samples::histogram`]).
    pub const fn histogram(name: &'static str, help: &'static str) -> Family {
        Family {
            name,
            help,
            kind: Kind::Histogram,
        }
    }

    /// The `prometheus-client` type.
    pub fn metric_type(&self) -> MetricType {
        match self.kind {
            Kind::Gauge => MetricType::Gauge,
            Kind::Counter => MetricType::Counter,
            Kind::Histogram => MetricType::Histogram,
        }
    }
}

/// The labels of one sample, in output order.
pub type Labels = Vec<(&'static str, String)>;

/// A sample's value.
#[derive(Debug, Clone, Copy)]
pub enum Value {
    /// An integer.
    Int(u64),
    /// A float (dropped when not finite).
    Float(f64),
}

/// One histogram sample: its sum, its count and its buckets as (upper bound,
/// observations in that bucket alone), the last bound `f64::INFINITY` (`+Inf`).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// The sum of the observations.
    pub sum: f64,
    /// How many observations.
    pub count: u64,
    /// Per bucket, not cumulative.
    pub buckets: Vec<(f64, u64)>,
}

/// The samples of one scrape, per family name.
#[derive(Debug, Default)]
pub struct Samples {
    rows: HashMap<&'static str, Vec<(Labels, Value)>>,
    histograms: HashMap<&'static str, Vec<(Labels, Histogram)>>,
    seen: HashMap<&'static str, HashSet<Labels>>,
}

impl Samples {
    /// Adds a sample; a second sample with the same labels is dropped (a node could
    /// report the same mount twice), and so is a value that is not finite.
    pub fn add(&mut self, family: &Family, labels: Labels, value: Value) {
        if let Value::Float(v) = value
            && !v.is_finite()
        {
            return;
        }
        if self
            .seen
            .entry(family.name)
            .or_default()
            .insert(labels.clone())
        {
            self.rows
                .entry(family.name)
                .or_default()
                .push((labels, value));
        }
    }

    /// Adds an integer sample.
    pub fn int(&mut self, family: &Family, labels: Labels, value: u64) {
        self.add(family, labels, Value::Int(value));
    }

    /// Adds a float sample.
    pub fn float(&mut self, family: &Family, labels: Labels, value: f64) {
        self.add(family, labels, Value::Float(value));
    }

    /// Adds a histogram sample (dropped like [`Samples::add`]'s duplicates).
    pub fn histogram(&mut self, family: &Family, labels: Labels, value: Histogram) {
        if self
            .seen
            .entry(family.name)
            .or_default()
            .insert(labels.clone())
        {
            self.histograms
                .entry(family.name)
                .or_default()
                .push((labels, value));
        }
    }

    /// Takes the samples of `family` out, in the order they were added.
    pub fn take(&mut self, family: &Family) -> Vec<(Labels, Value)> {
        self.rows.remove(family.name).unwrap_or_default()
    }

    /// Takes the histogram samples of `family` out, in the order they were added.
    pub fn take_histograms(&mut self, family: &Family) -> Vec<(Labels, Histogram)> {
        self.histograms.remove(family.name).unwrap_or_default()
    }

    /// The families that still have samples (none once every family was taken).
    pub fn left(&self) -> Vec<&'static str> {
        self.rows
            .keys()
            .chain(self.histograms.keys())
            .copied()
            .collect()
    }
}

/// Encodes `family` (a gauge or a counter) with its `rows`.
pub fn encode_rows(
    encoder: &mut DescriptorEncoder<'_>,
    family: &Family,
    rows: Vec<(Labels, Value)>,
) -> Result<(), std::fmt::Error> {
    let mut metric =
        encoder.encode_descriptor(family.name, family.help, None, family.metric_type())?;
    for (labels, value) in rows {
        if labels.is_empty() {
            encode_value(&mut metric, family.kind, value)?;
        } else {
            let mut labelled = metric.encode_family(&labels)?;
            encode_value(&mut labelled, family.kind, value)?;
        }
    }
    Ok(())
}

fn encode_value(
    metric: &mut prometheus_client::encoding::MetricEncoder<'_>,
    kind: Kind,
    value: Value,
) -> Result<(), std::fmt::Error> {
    match (kind, value) {
        (Kind::Counter, Value::Int(v)) => metric.encode_counter::<NoLabelSet, _, u64>(&v, None),
        (Kind::Counter, Value::Float(v)) => metric.encode_counter::<NoLabelSet, _, f64>(&v, None),
        (_, Value::Int(v)) => metric.encode_gauge(&v),
        (_, Value::Float(v)) => metric.encode_gauge(&v),
    }
}

/// Gauge and counter families with their samples, for [`render_text`].
#[derive(Debug)]
struct Plain {
    families: Vec<Family>,
    samples: std::sync::Mutex<Samples>,
}

impl Collector for Plain {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut samples = crate::sync::lock(&self.samples);
        for family in &self.families {
            if family.kind == Kind::Histogram {
                let rows = samples.take_histograms(family);
                let mut metric = encoder.encode_descriptor(
                    family.name,
                    family.help,
                    None,
                    family.metric_type(),
                )?;
                for (labels, h) in rows {
                    metric
                        .encode_family(&labels)?
                        .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
                }
                continue;
            }
            let rows = samples.take(family);
            encode_rows(&mut encoder, family, rows)?;
        }
        Ok(())
    }
}

/// Renders `families` (gauges, counters and histograms; each announced even
/// without a sample) with `samples` in the Prometheus text format 0.0.4.
pub fn render_text(families: &[&Family], samples: Samples) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Plain {
        families: families.iter().map(|f| **f).collect(),
        samples: std::sync::Mutex::new(samples),
    }));
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &registry) {
        Ok(()) => to_text_format(&out),
        // Writing into a String does not fail.
        Err(_) => String::new(),
    }
}

/// Turns OpenMetrics output into the Prometheus text format 0.0.4: the samples
/// are the same; counter families are named with their `_total` suffix, `info`
/// families become gauges named `_info`, and the `# UNIT` and `# EOF` lines go.
pub fn to_text_format(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest.split_once(' ').map_or("", |(_, text)| text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_string(), "untyped"),
                other => (name.to_string(), other),
            };
            if let Some(text) = help.take() {
                let _ = writeln!(out, "# HELP {name} {text}");
            }
            let _ = writeln!(out, "# TYPE {name} {kind}");
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Whether an `Accept` header admits OpenMetrics (Prometheus asks for it first).
pub fn accepts_openmetrics<'a>(values: impl Iterator<Item = &'a str>) -> bool {
    values.flat_map(|v| v.split(',')).any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("");
        let q = parts
            .filter_map(|p| p.strip_prefix("q="))
            .find_map(|q| q.parse::<f32>().ok())
            .unwrap_or(1.0);
        media.eq_ignore_ascii_case("application/openmetrics-text") && q > 0.0
    })
}

/// The names of the series a scrape in the text format 0.0.4 announces (from its
/// `# TYPE` lines), with a histogram's `_bucket`, `_sum` and `_count`: what a
/// PromQL expression may select.
pub fn series_names(text_format: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text_format.lines() {
        let Some((name, kind)) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.split_once(' '))
        else {
            continue;
        };
        if kind == "histogram" {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        }
        names.insert(name.to_string());
    }
    names
}

// A host reading (a node's latest sample).
/// When the sample was taken.
pub const NODE_SAMPLE_TIME: Family = Family::gauge(
    "novacron_node_sample_timestamp_seconds",
    "When the node's latest sample was taken (agent clock), Unix seconds.",
);
/// Host uptime.
pub const NODE_UPTIME: Family = Family::gauge(
    "novacron_node_uptime_seconds",
    "Time since the node booted, at its latest sample.",
);
/// Whole-host CPU use.
pub const NODE_CPU_USAGE: Family = Family::gauge(
    "novacron_node_cpu_usage_ratio",
    "Whole-host CPU usage, 0 to 1.",
);
/// Logical cores.
pub const NODE_CPU_CORES: Family =
    Family::gauge("novacron_node_cpu_cores", "Logical CPU cores of the host.");
/// Load averages.
pub const NODE_LOAD1: Family = Family::gauge("novacron_node_load1", "Load average over 1 minute.");
/// Load averages.
pub const NODE_LOAD5: Family = Family::gauge("novacron_node_load5", "Load average over 5 minutes.");
/// Load averages.
pub const NODE_LOAD15: Family =
    Family::gauge("novacron_node_load15", "Load average over 15 minutes.");
/// Memory.
pub const NODE_MEMORY_TOTAL: Family = Family::gauge(
    "novacron_node_memory_total_bytes",
    "Total memory of the host.",
);
/// Memory.
pub const NODE_MEMORY_USED: Family = Family::gauge(
    "novacron_node_memory_used_bytes",
    "Memory in use on the host.",
);
/// Memory.
pub const NODE_MEMORY_AVAILABLE: Family = Family::gauge(
    "novacron_node_memory_available_bytes",
    "Memory available for new work on the host.",
);
/// Swap.
pub const NODE_SWAP_TOTAL: Family =
    Family::gauge("novacron_node_swap_total_bytes", "Total swap of the host.");
/// Swap.
pub const NODE_SWAP_USED: Family =
    Family::gauge("novacron_node_swap_used_bytes", "Swap in use on the host.");
/// Filesystems.
pub const NODE_FS_SIZE: Family = Family::gauge(
    "novacron_node_filesystem_size_bytes",
    "Size of a mounted filesystem.",
);
/// Filesystems.
pub const NODE_FS_AVAILABLE: Family = Family::gauge(
    "novacron_node_filesystem_available_bytes",
    "Free space of a mounted filesystem available to unprivileged users.",
);
/// Filesystems: free blocks, reserved ones included.
pub const NODE_FS_FREE: Family = Family::gauge(
    "novacron_node_filesystem_free_bytes",
    "Free space of a mounted filesystem, blocks reserved for root included (as node_filesystem_free_bytes; absent from agents that do not report usage).",
);
/// CPU time by mode.
pub const NODE_CPU_SECONDS: Family = Family::counter(
    "novacron_node_cpu_seconds",
    "CPU time of the host since boot by mode, all cores together (as node_cpu_seconds_total summed over cpu; absent from agents before wire protocol 3).",
);
/// Disk I/O.
pub const NODE_DISK_READ: Family = Family::counter(
    "novacron_node_disk_read_bytes",
    "Bytes read from a mounted filesystem's block device since boot (absent from agents before wire protocol 3).",
);
/// Disk I/O.
pub const NODE_DISK_WRITTEN: Family = Family::counter(
    "novacron_node_disk_written_bytes",
    "Bytes written to a mounted filesystem's block device since boot (absent from agents before wire protocol 3).",
);
/// Network.
pub const NODE_NET_RX: Family = Family::counter(
    "novacron_node_network_receive_bytes",
    "Bytes received by a network interface since it came up (absent from agents before wire protocol 3).",
);
/// Network.
pub const NODE_NET_TX: Family = Family::counter(
    "novacron_node_network_transmit_bytes",
    "Bytes transmitted by a network interface since it came up (absent from agents before wire protocol 3).",
);
/// GPUs.
pub const GPU_UTILIZATION: Family = Family::gauge(
    "novacron_node_gpu_utilization_ratio",
    "GPU utilization, 0 to 1.",
);
/// GPUs.
pub const GPU_MEMORY_USED: Family =
    Family::gauge("novacron_node_gpu_memory_used_bytes", "GPU memory in use.");
/// GPUs.
pub const GPU_MEMORY_TOTAL: Family =
    Family::gauge("novacron_node_gpu_memory_total_bytes", "Total GPU memory.");
/// GPUs.
pub const GPU_TEMPERATURE: Family =
    Family::gauge("novacron_node_gpu_temperature_celsius", "GPU temperature.");
/// GPUs.
pub const GPU_POWER: Family = Family::gauge("novacron_node_gpu_power_watts", "GPU power draw.");

/// The families [`collect_sample`] fills, in output order.
pub const SAMPLE_FAMILIES: &[Family] = &[
    NODE_SAMPLE_TIME,
    NODE_UPTIME,
    NODE_CPU_USAGE,
    NODE_CPU_CORES,
    NODE_LOAD1,
    NODE_LOAD5,
    NODE_LOAD15,
    NODE_MEMORY_TOTAL,
    NODE_MEMORY_USED,
    NODE_MEMORY_AVAILABLE,
    NODE_SWAP_TOTAL,
    NODE_SWAP_USED,
    NODE_FS_SIZE,
    NODE_FS_AVAILABLE,
    NODE_FS_FREE,
    NODE_CPU_SECONDS,
    NODE_DISK_READ,
    NODE_DISK_WRITTEN,
    NODE_NET_RX,
    NODE_NET_TX,
    GPU_UTILIZATION,
    GPU_MEMORY_USED,
    GPU_MEMORY_TOTAL,
    GPU_TEMPERATURE,
    GPU_POWER,
];

/// Adds the series of one host reading of `node` (in `zone`, empty without one),
/// in base units: ratios 0 to 1, bytes, seconds, watts; the cumulative counters
/// (CPU seconds by mode, disk and network bytes) only where the sample has them
/// (agents before wire protocol 3 send rates only, which are not exported).
pub fn collect_sample(node: &str, zone: &str, sample: &NodeSample, out: &mut Samples) {
    let base = || vec![("node", node.to_string()), ("zone", zone.to_string())];
    let with = |extra: &[(&'static str, &str)]| {
        let mut l = base();
        l.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        l
    };
    out.float(&NODE_SAMPLE_TIME, base(), sample.at_unix_ms as f64 / 1000.0);
    out.int(&NODE_UPTIME, base(), sample.uptime_secs);
    out.float(
        &NODE_CPU_USAGE,
        base(),
        f64::from(sample.cpu.total_percent) / 100.0,
    );
    out.int(
        &NODE_CPU_CORES,
        base(),
        sample.cpu.per_core_percent.len() as u64,
    );
    for (family, load) in [NODE_LOAD1, NODE_LOAD5, NODE_LOAD15]
        .iter()
        .zip(sample.cpu.load)
    {
        out.float(family, base(), f64::from(load));
    }
    let m = &sample.memory;
    out.int(&NODE_MEMORY_TOTAL, base(), m.total_bytes);
    out.int(&NODE_MEMORY_USED, base(), m.used_bytes);
    out.int(&NODE_MEMORY_AVAILABLE, base(), m.available_bytes);
    out.int(&NODE_SWAP_TOTAL, base(), m.swap_total_bytes);
    out.int(&NODE_SWAP_USED, base(), m.swap_used_bytes);
    if let Some(seconds) = &sample.cpu.seconds_total {
        for (mode, value) in seconds.modes() {
            out.float(&NODE_CPU_SECONDS, with(&[("mode", mode)]), value);
        }
    }
    for d in &sample.disks {
        let l = || with(&[("mountpoint", &d.mount), ("device", &d.device)]);
        out.int(&NODE_FS_SIZE, l(), d.total_bytes);
        out.int(&NODE_FS_AVAILABLE, l(), d.available_bytes);
        // Older agents send no usage (0): nothing is made up for them.
        if d.used_bytes > 0 {
            out.int(
                &NODE_FS_FREE,
                l(),
                d.total_bytes.saturating_sub(d.used_bytes),
            );
        }
        // node_exporter's disk counters carry the device only.
        let dev = || with(&[("device", &d.device)]);
        if let Some(read) = d.read_bytes_total {
            out.int(&NODE_DISK_READ, dev(), read);
        }
        if let Some(written) = d.written_bytes_total {
            out.int(&NODE_DISK_WRITTEN, dev(), written);
        }
    }
    for n in &sample.networks {
        let l = || with(&[("device", &n.interface)]);
        if let Some(rx) = n.rx_bytes_total {
            out.int(&NODE_NET_RX, l(), rx);
        }
        if let Some(tx) = n.tx_bytes_total {
            out.int(&NODE_NET_TX, l(), tx);
        }
    }
    for g in &sample.gpus {
        let l = || gpu_labels(base(), g);
        out.float(
            &GPU_UTILIZATION,
            l(),
            f64::from(g.utilization_percent) / 100.0,
        );
        out.int(&GPU_MEMORY_USED, l(), g.memory_used_bytes);
        out.int(&GPU_MEMORY_TOTAL, l(), g.memory_total_bytes);
        out.int(&GPU_TEMPERATURE, l(), u64::from(g.temperature_celsius));
        out.float(&GPU_POWER, l(), f64::from(g.power_milliwatts) / 1000.0);
    }
}

/// A GPU's labels after `labels`: its NVML index, UUID and model.
pub fn gpu_labels(mut labels: Labels, g: &GpuSample) -> Labels {
    labels.push(("gpu", g.index.to_string()));
    labels.push(("uuid", g.uuid.clone()));
    labels.push(("model", g.name.clone()));
    labels
}

// This process, read from /proc/self (Linux).
/// CPU time.
pub const PROCESS_CPU: Family = Family::counter(
    "process_cpu_seconds",
    "Total user and system CPU time spent by this process, in seconds.",
);
/// Resident memory.
pub const PROCESS_RESIDENT: Family = Family::gauge(
    "process_resident_memory_bytes",
    "Resident memory size of this process, in bytes.",
);
/// Virtual memory.
pub const PROCESS_VIRTUAL: Family = Family::gauge(
    "process_virtual_memory_bytes",
    "Virtual memory size of this process, in bytes.",
);
/// Open descriptors.
pub const PROCESS_OPEN_FDS: Family =
    Family::gauge("process_open_fds", "Open file descriptors of this process.");
/// Descriptor limit.
pub const PROCESS_MAX_FDS: Family = Family::gauge(
    "process_max_fds",
    "Soft limit on open file descriptors of this process (absent when unlimited).",
);
/// Start time.
pub const PROCESS_START_TIME: Family = Family::gauge(
    "process_start_time_seconds",
    "Start time of this process since the Unix epoch, in seconds.",
);

/// The families [`collect_process`] fills, in output order.
pub const PROCESS_FAMILIES: &[Family] = &[
    PROCESS_CPU,
    PROCESS_RESIDENT,
    PROCESS_VIRTUAL,
    PROCESS_OPEN_FDS,
    PROCESS_MAX_FDS,
    PROCESS_START_TIME,
];

/// Adds the `process_*` series of `process` (nothing when it could not be read).
pub fn collect_process(process: Option<ProcessStats>, out: &mut Samples) {
    let Some(p) = process else {
        return;
    };
    out.float(&PROCESS_CPU, vec![], p.cpu_seconds);
    out.int(&PROCESS_RESIDENT, vec![], p.resident_memory_bytes);
    out.int(&PROCESS_VIRTUAL, vec![], p.virtual_memory_bytes);
    out.int(&PROCESS_OPEN_FDS, vec![], p.open_fds);
    if let Some(max) = p.max_fds {
        out.int(&PROCESS_MAX_FDS, vec![], max);
    }
    out.float(&PROCESS_START_TIME, vec![], p.start_time_seconds);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_text_announces_every_family_and_names_counters_with_total() {
        let mut out = Samples::default();
        out.int(&NODE_UPTIME, vec![("node", "a".into())], 7);
        out.float(&PROCESS_CPU, vec![], 1.5);
        out.float(&NODE_CPU_USAGE, vec![("node", "a".into())], f64::NAN);
        let text = render_text(&[&NODE_UPTIME, &NODE_CPU_USAGE, &PROCESS_CPU], out);
        assert!(
            text.contains("# TYPE novacron_node_uptime_seconds gauge"),
            "{text}"
        );
        assert!(
            text.contains("novacron_node_uptime_seconds{node=\"a\"} 7"),
            "{text}"
        );
        // Announced without a sample: the NaN was dropped.
        assert!(
            text.contains("# TYPE novacron_node_cpu_usage_ratio gauge"),
            "{text}"
        );
        assert!(!text.contains("NaN"), "{text}");
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter"),
            "{text}"
        );
        assert!(text.contains("process_cpu_seconds_total 1.5"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }
}

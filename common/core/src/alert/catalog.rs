//! The metrics a condition may read, where the controller gets each, and its
//! PromQL form for [`super::export`].

use super::expr::Subject;

/// Where a metric's values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A series of the metrics history (its name there). A metric with labels
    /// (a disk per mount, a GPU per index) gives one value per subject: the
    /// largest for `>`/`>=`, the smallest for `<`/`<=` (so "any disk" matches).
    History(&'static str),
    /// The controller's state now (registry, workloads, costs); windows are
    /// not available.
    State,
}

/// One metric of the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric {
    /// Whose.
    pub subject: Subject,
    /// Its name after the subject.
    pub name: &'static str,
    /// Where from.
    pub source: Source,
    /// What it measures, with its unit.
    pub help: &'static str,
    /// The same as a PromQL expression over the controller's `/metrics`
    /// (`None`: no equivalent there).
    pub promql: Option<&'static str>,
}

const fn h(
    subject: Subject,
    name: &'static str,
    series: &'static str,
    help: &'static str,
    promql: Option<&'static str>,
) -> Metric {
    Metric {
        subject,
        name,
        source: Source::History(series),
        help,
        promql,
    }
}

const fn s(
    subject: Subject,
    name: &'static str,
    help: &'static str,
    promql: Option<&'static str>,
) -> Metric {
    Metric {
        subject,
        name,
        source: Source::State,
        help,
        promql,
    }
}

/// Every metric a condition may read.
pub const CATALOG: &[Metric] = &[
    h(
        Subject::Node,
        "cpu_percent",
        "cpu_percent",
        "CPU in use, percent of the node",
        Some("novacron_node_cpu_usage_ratio * 100"),
    ),
    h(
        Subject::Node,
        "memory_percent",
        "memory_percent",
        "memory in use, percent",
        Some("novacron_node_memory_used_bytes / novacron_node_memory_total_bytes * 100"),
    ),
    h(
        Subject::Node,
        "memory_available_bytes",
        "memory_available_bytes",
        "memory available, bytes",
        Some("novacron_node_memory_available_bytes"),
    ),
    h(
        Subject::Node,
        "swap_used_bytes",
        "swap_used_bytes",
        "swap in use, bytes",
        Some("novacron_node_swap_used_bytes"),
    ),
    h(
        Subject::Node,
        "load1",
        "load1",
        "1-minute load average",
        None,
    ),
    h(
        Subject::Node,
        "disk_percent",
        "disk_percent",
        "a filesystem's space in use, percent",
        Some(
            "(1 - novacron_node_filesystem_available_bytes / novacron_node_filesystem_size_bytes) * 100",
        ),
    ),
    h(
        Subject::Node,
        "gpu_utilization_percent",
        "gpu_utilization_percent",
        "a GPU's utilisation, percent",
        Some("novacron_node_gpu_utilization_ratio * 100"),
    ),
    h(
        Subject::Node,
        "gpu_temperature_celsius",
        "gpu_temperature_celsius",
        "a GPU's temperature, °C",
        Some("novacron_node_gpu_temperature_celsius"),
    ),
    h(
        Subject::Node,
        "gpu_memory_used_bytes",
        "gpu_memory_used_bytes",
        "a GPU's memory in use, bytes",
        Some("novacron_node_gpu_memory_used_bytes"),
    ),
    h(
        Subject::Node,
        "gpu_power_watts",
        "gpu_power_watts",
        "a GPU's power draw, W",
        Some("novacron_node_gpu_power_watts"),
    ),
    s(
        Subject::Node,
        "up",
        "1 while the node's agent is connected, else 0 (warm nodes are not counted)",
        Some("novacron_node_status{status=\"ready\"}"),
    ),
    s(
        Subject::Node,
        "cert_expiry_days",
        "days until the node's certificate expires",
        Some("(novacron_node_certificate_expiry_timestamp_seconds - time()) / 86400"),
    ),
    s(
        Subject::Node,
        "cost_per_hour",
        "the node's price per hour",
        None,
    ),
    h(
        Subject::Alloc,
        "cpu_percent",
        "alloc_cpu_percent",
        "CPU in use, percent of one core",
        Some("novacron_allocation_cpu_usage_cores * 100"),
    ),
    h(
        Subject::Alloc,
        "memory_bytes",
        "alloc_memory_bytes",
        "memory in use, bytes",
        Some("novacron_allocation_memory_usage_bytes"),
    ),
    h(
        Subject::Alloc,
        "memory_limit_bytes",
        "alloc_memory_limit_bytes",
        "memory limit, bytes",
        Some("novacron_allocation_memory_limit_bytes"),
    ),
    s(
        Subject::Alloc,
        "restarts",
        "restarts since the allocation was placed",
        Some("novacron_allocation_restarts"),
    ),
    s(
        Subject::Alloc,
        "restarts_recent",
        "restarts seen in the last hour",
        Some("increase(novacron_allocation_restarts[1h])"),
    ),
    s(
        Subject::Job,
        "replicas_desired",
        "replicas wanted",
        Some("novacron_job_replicas_desired"),
    ),
    s(
        Subject::Job,
        "replicas_running",
        "replicas running",
        Some("novacron_job_replicas_running"),
    ),
    s(
        Subject::Job,
        "replicas_missing",
        "replicas wanted but not running",
        Some("novacron_job_replicas_desired - novacron_job_replicas_running"),
    ),
    s(
        Subject::Job,
        "cost_per_hour",
        "the job's share of its nodes' prices per hour",
        None,
    ),
    s(
        Subject::Pool,
        "cost_per_hour",
        "the pool's nodes' prices per hour",
        None,
    ),
    s(Subject::Pool, "nodes", "nodes in the pool", None),
    s(
        Subject::Migration,
        "failed",
        "1 for a migration that failed in the last hour",
        None,
    ),
    s(
        Subject::Fleet,
        "cost_per_hour",
        "the fleet's price per hour",
        None,
    ),
    s(
        Subject::Fleet,
        "budgets_exceeded",
        "cost budgets exceeded now",
        None,
    ),
    s(
        Subject::Fleet,
        "nodes_down",
        "nodes whose agents are not connected",
        Some("count(novacron_node_status{status!=\"ready\",status!=\"warm\"} == 1)"),
    ),
];

/// The catalog entry of `subject.name`.
pub fn find(subject: Subject, name: &str) -> Option<&'static Metric> {
    CATALOG
        .iter()
        .find(|m| m.subject == subject && m.name == name)
}

/// The names of `subject`'s metrics, for error messages.
pub fn names(subject: Subject) -> String {
    CATALOG
        .iter()
        .filter(|m| m.subject == subject)
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

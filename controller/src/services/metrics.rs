//! Prometheus metrics: `GET /metrics` on the HTTPS API.
//!
//! Nothing is kept for Prometheus between scrapes except the reconcile loop's
//! [`PassStats`]: each scrape takes a [`Snapshot`] of the live state (the registry's
//! nodes with their latest sample, jobs, allocations, ingest statistics, the event
//! log's position) and [`render`]s it with `prometheus-client` in the OpenMetrics
//! text format. A scraper that does not ask for OpenMetrics (curl, `promtool check
//! metrics`) gets the same samples in the Prometheus text format 0.0.4
//! ([`to_text_format`]).
//!
//! Every family is declared in [`FAMILIES`] and always announced (`# HELP`, `# TYPE`),
//! even when it has no sample at the moment (no GPU in the fleet, no job yet), so a
//! scrape lists everything the controller can export. Two groups are the
//! exception, because the part they describe may not exist: the metrics
//! history's own health (`novacron_history_*`) is absent while `[history]` is
//! off, and remote write's (`novacron_remote_write_*`) while
//! `[history.remote_write]` is not configured. Names carry the `novacron_`
//! prefix and base units (bytes, seconds, ratios, cores); labels are `node`, `zone`,
//! `novacron_job`, `alloc`, `gpu` (the NVML index) and a few descriptive ones.
//!
//! Names that Prometheus and node_exporter users know are kept as they know them:
//! the job label is `novacron_job`, because Prometheus gives every scraped series
//! its own `job` label (the scrape job) and renames a clashing one to
//! `exported_job`; network interfaces and disks are labelled `device` and
//! filesystems `mountpoint`, as node_exporter does; the controller's own process
//! is described by the standard `process_*` families ([`ProcessStats`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::Instant;

use novacron_api::{ControllerStats, NodeView};
use novacron_common::exposition::{
    Family, Kind, Labels, PROCESS_FAMILIES, SAMPLE_FAMILIES, Samples, collect_process,
    collect_sample, encode_rows, gpu_labels,
};
pub use novacron_common::exposition::{
    OPENMETRICS_CONTENT_TYPE, ProcessStats, TEXT_CONTENT_TYPE, accepts_openmetrics, series_names,
    to_text_format,
};
use novacron_common::fleet::NodeStatus;
use novacron_common::wire::AllocState;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::histogram::Histogram;

use crate::services::context::ApiState;
pub use crate::services::pass_stats::PassStats;
use crate::services::remote_write::RemoteWriteStats;
use crate::services::workloads::JobSummary;
use crate::state::store::AllocRecord;

/// Everything one scrape shows, read from the live state.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Nodes with their latest sample.
    pub nodes: Vec<NodeView>,
    /// Jobs.
    pub jobs: Vec<JobSummary>,
    /// Allocations, terminal ones included.
    pub allocations: Vec<AllocRecord>,
    /// Ingest statistics.
    pub stats: ControllerStats,
    /// The reconcile loop's statistics.
    pub passes: PassStats,
    /// The event log's last position.
    pub events: u64,
    /// Every ingest latency since the controller started, in seconds.
    pub ingest_latency: Histogram,
    /// The controller process (`None` where `/proc` cannot be read).
    pub process: Option<ProcessStats>,
    /// This controller's term: the store (`redb`, `etcd`), the epoch (the
    /// election key's revision; 0 for redb) and when it was elected (Unix ms).
    pub term: (&'static str, i64, u64),
    /// The metrics history's own health (`None` when `[history]` is off).
    pub history: Option<HistoryHealth>,
}

/// The metrics history's store and remote writer, as one scrape shows them.
#[derive(Debug, Clone)]
pub struct HistoryHealth {
    /// The store's sizes and counters.
    pub store: novacron_tsdb::Stats,
    /// Remote write's counters (`None` when it is not configured).
    pub remote_write: Option<RemoteWriteStats>,
}

impl Snapshot {
    /// Reads the live state of a running controller.
    pub fn capture(state: &ApiState, now: Instant) -> Snapshot {
        Snapshot {
            nodes: state.registry.views(now),
            jobs: state.workloads.jobs(),
            allocations: state.workloads.allocations(None, None),
            stats: state.registry.stats(),
            passes: state.workloads.pass_stats().clone(),
            events: state.events.last_seq(),
            ingest_latency: state.registry.ingest_latency(),
            process: ProcessStats::read(),
            term: match &state.group {
                Some(group) => ("etcd", group.epoch(), group.elected_unix_ms()),
                None => ("redb", 0, 0),
            },
            history: state.history.as_ref().map(|h| HistoryHealth {
                store: h.db().stats(),
                remote_write: h.remote_stats(),
            }),
        }
    }
}

/// Renders `snapshot` in the OpenMetrics text format (ending with `# EOF`).
pub fn render(snapshot: Snapshot) -> Result<String, std::fmt::Error> {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(FleetCollector(snapshot)));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

// Controller internals.
const BUILD_INFO: Family = Family::gauge(
    "novacron_build_info",
    "Always 1; the version label is the controller's build.",
);
const CONNECTED_AGENTS: Family = Family::gauge(
    "novacron_connected_agents",
    "Agents holding a live QUIC connection to this controller.",
);
const SAMPLES_INGESTED: Family = Family::counter(
    "novacron_samples_ingested",
    "Metrics samples ingested from agents since the controller started.",
);
const SAMPLES_DUPLICATE: Family = Family::counter(
    "novacron_samples_duplicate",
    "Metrics samples skipped as already seen (replays after a reconnect) since the controller started.",
);
const INGEST_LATENCY: Family = Family {
    name: "novacron_ingest_latency_seconds",
    help: "Delay from an agent taking a sample (agent clock) to the controller ingesting it (controller clock), replays after a reconnect included.",
    kind: Kind::Histogram,
};
const PASS_DURATION: Family = Family {
    name: "novacron_scheduling_pass_duration_seconds",
    help: "Duration of each reconcile and scheduling pass (decide, place, persist, publish).",
    kind: Kind::Histogram,
};
const PLACEMENTS: Family = Family::counter(
    "novacron_scheduling_placements",
    "Replicas placed on nodes by the scheduler since the controller started.",
);
const UNPLACED: Family = Family::gauge(
    "novacron_scheduling_unplaced_replicas",
    "Pending queue: replicas the last pass had to place but could not (no node fits); they are retried every pass.",
);
const EVENTS: Family = Family::counter(
    "novacron_events",
    "Events appended to the event log (its last position).",
);
const LEADER: Family = Family::gauge(
    "novacron_controller_leader",
    "1 on the controller that leads (only the leader serves); the store label is redb or etcd.",
);
const LEADER_EPOCH: Family = Family::gauge(
    "novacron_controller_leader_epoch",
    "The leader's epoch: the revision of its etcd election key (0 for one controller on redb); it changes at each election.",
);
const LEADER_SINCE: Family = Family::gauge(
    "novacron_controller_leader_since_seconds",
    "When this controller was elected leader, as a Unix time in seconds (0 for one controller on redb).",
);
const JOBS: Family = Family::gauge("novacron_jobs", "Jobs by status.");
const ALLOCATIONS: Family = Family::gauge(
    "novacron_allocations",
    "Allocations known to the controller by state (terminal ones are kept for a while).",
);

// The metrics history's own health (announced only while the history is on).
const HISTORY_HEAD_BYTES: Family = Family::gauge(
    "novacron_history_head_bytes",
    "Memory the metrics history's open chunks take.",
);
const HISTORY_HEAD_BUDGET: Family = Family::gauge(
    "novacron_history_head_budget_bytes",
    "The metrics history's head budget (history.head_budget_mib); past it, open chunks are written early.",
);
const HISTORY_HEAD_SERIES: Family = Family::gauge(
    "novacron_history_head_series",
    "Series (a metric with its labels, per node or allocation) in the metrics history's open chunks.",
);
const HISTORY_DISK_BYTES: Family = Family::gauge(
    "novacron_history_disk_bytes",
    "Size of the metrics history's files; the tier label is raw (full resolution) or rollup (1-minute and 1-hour).",
);
const HISTORY_APPENDED: Family = Family::counter(
    "novacron_history_values_appended",
    "Values appended to the metrics history since the controller started.",
);
const HISTORY_EVICTIONS: Family = Family::counter(
    "novacron_history_budget_evictions",
    "Open chunks the metrics history wrote early to stay within its head budget, since the controller started.",
);
const HISTORY_DROPPED_CHUNKS: Family = Family::counter(
    "novacron_history_dropped_chunks",
    "Chunks the metrics history lost (its writer was behind or the disk refused them) since the controller started.",
);
const HISTORY_LATE_POINTS: Family = Family::counter(
    "novacron_history_late_points",
    "Points the metrics history refused as older than its out-of-order bound, since the controller started.",
);
const HISTORY_CORRUPT_CHUNKS: Family = Family::counter(
    "novacron_history_corrupt_chunks",
    "Corrupt chunks the metrics history skipped in its files since the controller started.",
);

// Remote write (announced only while it is configured).
const REMOTE_SENT: Family = Family::counter(
    "novacron_remote_write_samples_sent",
    "Samples the remote_write receiver accepted since the controller started.",
);
const REMOTE_DROPPED: Family = Family::counter(
    "novacron_remote_write_samples_dropped",
    "Samples dropped unsent (the oldest of a full queue, those left at shutdown) since the controller started.",
);
const REMOTE_FAILED: Family = Family::counter(
    "novacron_remote_write_samples_failed",
    "Samples refused for good (by the receiver with a 4xx other than 429, or invalid before queuing) since the controller started.",
);
const REMOTE_REQUESTS_FAILED: Family = Family::counter(
    "novacron_remote_write_requests_failed",
    "Requests to the remote_write receiver that failed and were tried again (5xx, 429, network errors) since the controller started.",
);
const REMOTE_QUEUED: Family = Family::gauge(
    "novacron_remote_write_queued_samples",
    "Samples waiting to be sent to the remote_write receiver, not counting the batch being sent.",
);
const REMOTE_LAST_SUCCESS: Family = Family::gauge(
    "novacron_remote_write_last_success_timestamp_seconds",
    "When a request to the remote_write receiver last succeeded, Unix seconds (absent before the first).",
);

// Jobs.
const JOB_DESIRED: Family = Family::gauge(
    "novacron_job_replicas_desired",
    "Replicas the job's current version asks for.",
);
const JOB_RUNNING: Family = Family::gauge(
    "novacron_job_replicas_running",
    "Replicas of the job running now.",
);
const JOB_HEALTHY: Family = Family::gauge(
    "novacron_job_replicas_healthy",
    "Replicas of the job running and healthy now.",
);
const JOB_VERSION: Family =
    Family::gauge("novacron_job_version", "The job's current version number.");

// Nodes: registry.
const NODE_STATUS: Family = Family::gauge(
    "novacron_node_status",
    "Node liveness: 1 for the node's current status (ready, disconnected, down, or warm: kept stopped in its pool's warm pool), 0 for the others.",
);
const NODE_INFO: Family = Family::gauge(
    "novacron_node_info",
    "Always 1; labels describe the node (placement labels, agent version, platform).",
);
const NODE_LAST_SEEN: Family = Family::gauge(
    "novacron_node_last_seen_timestamp_seconds",
    "When the controller last heard from the node, Unix seconds.",
);
const NODE_CERT_EXPIRY: Family = Family::gauge(
    "novacron_node_certificate_expiry_timestamp_seconds",
    "When the node's current certificate expires, Unix seconds.",
);
const NODE_DROPPED: Family = Family::counter(
    "novacron_node_samples_dropped",
    "Samples the node's agent dropped because its offline buffer overflowed (per agent process).",
);
const NODE_CPU_CAPACITY: Family = Family::gauge(
    "novacron_node_cpu_capacity_cores",
    "Allocatable CPU of the node, in cores.",
);
const NODE_MEMORY_CAPACITY: Family = Family::gauge(
    "novacron_node_memory_capacity_bytes",
    "Allocatable memory of the node.",
);
const NODE_DISK_CAPACITY: Family = Family::gauge(
    "novacron_node_disk_capacity_bytes",
    "Allocatable disk of the node (its data filesystem).",
);
const NODE_GPU_CAPACITY: Family = Family::gauge("novacron_node_gpus", "GPUs the node offers.");
const NODE_CPU_ALLOCATED: Family = Family::gauge(
    "novacron_node_cpu_allocated_cores",
    "CPU reserved on the node by allocations that are not terminal, in cores.",
);
const NODE_MEMORY_ALLOCATED: Family = Family::gauge(
    "novacron_node_memory_allocated_bytes",
    "Memory reserved on the node by allocations that are not terminal.",
);
const NODE_GPU_ALLOCATED: Family = Family::gauge(
    "novacron_node_gpus_allocated",
    "GPUs assigned on the node to allocations that are not terminal.",
);

// Allocations.
const ALLOC_STATE: Family = Family::gauge(
    "novacron_allocation_state",
    "Always 1 for each allocation that is not terminal; the state label is its current state.",
);
const ALLOC_HEALTHY: Family = Family::gauge(
    "novacron_allocation_healthy",
    "1 when the allocation's health check passes, 0 when it fails (absent without a result).",
);
const ALLOC_RESTARTS: Family = Family::counter(
    "novacron_allocation_restarts",
    "Restarts of the allocation's container on its node.",
);
const ALLOC_CPU_REQUESTED: Family = Family::gauge(
    "novacron_allocation_cpu_requested_cores",
    "CPU reserved for the allocation, in cores.",
);
const ALLOC_MEMORY_REQUESTED: Family = Family::gauge(
    "novacron_allocation_memory_requested_bytes",
    "Memory reserved for the allocation.",
);
const ALLOC_CPU_USAGE: Family = Family::gauge(
    "novacron_allocation_cpu_usage_cores",
    "CPU the allocation uses, in cores (1 is one core busy).",
);
const ALLOC_MEMORY_USAGE: Family = Family::gauge(
    "novacron_allocation_memory_usage_bytes",
    "Memory the allocation uses.",
);
const ALLOC_MEMORY_LIMIT: Family = Family::gauge(
    "novacron_allocation_memory_limit_bytes",
    "Memory limit of the allocation's container (absent when unlimited).",
);
const ALLOC_NET_RX: Family = Family::gauge(
    "novacron_allocation_network_receive_bytes_per_second",
    "Receive rate of the allocation's container.",
);
const ALLOC_NET_TX: Family = Family::gauge(
    "novacron_allocation_network_transmit_bytes_per_second",
    "Transmit rate of the allocation's container.",
);
const ALLOC_GPU_UTILIZATION: Family = Family::gauge(
    "novacron_allocation_gpu_utilization_ratio",
    "Utilization of a GPU assigned to the allocation, 0 to 1.",
);
const ALLOC_GPU_MEMORY_USED: Family = Family::gauge(
    "novacron_allocation_gpu_memory_used_bytes",
    "Memory in use on a GPU assigned to the allocation.",
);

/// The controller's internals, before its `process_*` families.
const INTERNAL_FAMILIES: &[Family] = &[
    BUILD_INFO,
    CONNECTED_AGENTS,
    SAMPLES_INGESTED,
    SAMPLES_DUPLICATE,
    INGEST_LATENCY,
    PASS_DURATION,
    PLACEMENTS,
    UNPLACED,
    EVENTS,
    LEADER,
    LEADER_EPOCH,
    LEADER_SINCE,
    JOBS,
    ALLOCATIONS,
];

/// The metrics history's own health, after the controller's internals.
const HISTORY_FAMILIES: &[Family] = &[
    HISTORY_HEAD_BYTES,
    HISTORY_HEAD_BUDGET,
    HISTORY_HEAD_SERIES,
    HISTORY_DISK_BYTES,
    HISTORY_APPENDED,
    HISTORY_EVICTIONS,
    HISTORY_DROPPED_CHUNKS,
    HISTORY_LATE_POINTS,
    HISTORY_CORRUPT_CHUNKS,
];

/// Remote write, after the history.
const REMOTE_WRITE_FAMILIES: &[Family] = &[
    REMOTE_SENT,
    REMOTE_DROPPED,
    REMOTE_FAILED,
    REMOTE_REQUESTS_FAILED,
    REMOTE_QUEUED,
    REMOTE_LAST_SUCCESS,
];

/// Jobs and the nodes' registry entries, before the nodes' latest samples.
const JOB_AND_NODE_FAMILIES: &[Family] = &[
    JOB_DESIRED,
    JOB_RUNNING,
    JOB_HEALTHY,
    JOB_VERSION,
    NODE_STATUS,
    NODE_INFO,
    NODE_LAST_SEEN,
    NODE_CERT_EXPIRY,
    NODE_DROPPED,
    NODE_CPU_CAPACITY,
    NODE_MEMORY_CAPACITY,
    NODE_DISK_CAPACITY,
    NODE_GPU_CAPACITY,
    NODE_CPU_ALLOCATED,
    NODE_MEMORY_ALLOCATED,
    NODE_GPU_ALLOCATED,
];

/// Allocations, last.
const ALLOCATION_FAMILIES: &[Family] = &[
    ALLOC_STATE,
    ALLOC_HEALTHY,
    ALLOC_RESTARTS,
    ALLOC_CPU_REQUESTED,
    ALLOC_MEMORY_REQUESTED,
    ALLOC_CPU_USAGE,
    ALLOC_MEMORY_USAGE,
    ALLOC_MEMORY_LIMIT,
    ALLOC_NET_RX,
    ALLOC_NET_TX,
    ALLOC_GPU_UTILIZATION,
    ALLOC_GPU_MEMORY_USED,
];

/// Every family, in the order of the output: the controller's own, the metrics
/// history's and remote write's, its process, jobs and nodes, each node's latest
/// sample (the families the agent's `/metrics` shares), allocations.
pub static FAMILIES: std::sync::LazyLock<Vec<Family>> = std::sync::LazyLock::new(|| {
    [
        INTERNAL_FAMILIES,
        HISTORY_FAMILIES,
        REMOTE_WRITE_FAMILIES,
        PROCESS_FAMILIES,
        JOB_AND_NODE_FAMILIES,
        SAMPLE_FAMILIES,
        ALLOCATION_FAMILIES,
    ]
    .concat()
});

/// The families a scrape of `s` announces: every one of [`FAMILIES`] but the
/// metrics history's while it is off and remote write's while it is not
/// configured.
fn announced(s: &Snapshot) -> impl Iterator<Item = &'static Family> {
    let history = s.history.is_some();
    let remote = s.history.as_ref().is_some_and(|h| h.remote_write.is_some());
    FAMILIES.iter().filter(move |f| {
        if HISTORY_FAMILIES.contains(*f) {
            history
        } else if REMOTE_WRITE_FAMILIES.contains(*f) {
            remote
        } else {
            true
        }
    })
}

#[derive(Debug)]
struct FleetCollector(Snapshot);

impl Collector for FleetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut samples = collect(&self.0);
        for family in announced(&self.0) {
            if family.kind == Kind::Histogram {
                let metric = encoder.encode_descriptor(
                    family.name,
                    family.help,
                    None,
                    family.metric_type(),
                )?;
                let histogram = if family.name == INGEST_LATENCY.name {
                    &self.0.ingest_latency
                } else {
                    &self.0.passes.durations
                };
                histogram.encode(metric)?;
                continue;
            }
            let rows = samples.take(family);
            encode_rows(&mut encoder, family, rows)?;
        }
        debug_assert!(
            samples.left().is_empty(),
            "families missing from FAMILIES: {:?}",
            samples.left()
        );
        Ok(())
    }
}

/// Known job statuses, always reported (0 when no job has them).
const JOB_STATUSES: [&str; 6] = [
    "running", "blocked", "failing", "reverted", "complete", "stopped",
];

/// Allocation states, always reported (0 when no allocation has them).
const ALLOC_STATES: [AllocState; 9] = [
    AllocState::Pending,
    AllocState::Starting,
    AllocState::Running,
    AllocState::Checkpointing,
    AllocState::Migrating,
    AllocState::Stopped,
    AllocState::Complete,
    AllocState::Failed,
    AllocState::Lost,
];

const NODE_STATUSES: [NodeStatus; 3] = [
    NodeStatus::Ready,
    NodeStatus::Disconnected,
    NodeStatus::Down,
];

fn collect(s: &Snapshot) -> Samples {
    let mut out = Samples::default();
    collect_internals(s, &mut out);
    if let Some(history) = &s.history {
        collect_history(history, &mut out);
    }
    collect_jobs(s, &mut out);
    let live: Vec<&AllocRecord> = s
        .allocations
        .iter()
        .filter(|a| !a.state.is_terminal())
        .collect();
    for node in &s.nodes {
        collect_node(node, &live, &mut out);
    }
    collect_allocations(s, &live, &mut out);
    out
}

fn collect_internals(s: &Snapshot, out: &mut Samples) {
    out.int(
        &BUILD_INFO,
        vec![("version", env!("CARGO_PKG_VERSION").to_string())],
        1,
    );
    out.int(&CONNECTED_AGENTS, vec![], s.stats.connected_agents);
    out.int(&SAMPLES_INGESTED, vec![], s.stats.samples_ingested);
    out.int(&SAMPLES_DUPLICATE, vec![], s.stats.duplicates_skipped);
    collect_process(s.process, out);
    out.int(&PLACEMENTS, vec![], s.passes.placed.load(Ordering::Relaxed));
    out.int(&UNPLACED, vec![], s.passes.unplaced.load(Ordering::Relaxed));
    out.int(&EVENTS, vec![], s.events);
    let (store, epoch, since_ms) = s.term;
    out.int(&LEADER, vec![("store", store.to_string())], 1);
    out.int(&LEADER_EPOCH, vec![], epoch.max(0) as u64);
    out.int(&LEADER_SINCE, vec![], since_ms / 1000);
    let mut by_state: BTreeMap<String, u64> =
        ALLOC_STATES.iter().map(|st| (st.to_string(), 0)).collect();
    for a in &s.allocations {
        *by_state.entry(a.state.to_string()).or_default() += 1;
    }
    for (state, n) in by_state {
        out.int(&ALLOCATIONS, vec![("state", state)], n);
    }
}

fn collect_history(h: &HistoryHealth, out: &mut Samples) {
    let db = &h.store;
    out.int(&HISTORY_HEAD_BYTES, vec![], db.head_bytes);
    out.int(&HISTORY_HEAD_BUDGET, vec![], db.head_budget_bytes);
    out.int(&HISTORY_HEAD_SERIES, vec![], db.head_series);
    out.int(
        &HISTORY_DISK_BYTES,
        vec![("tier", "raw".to_string())],
        db.disk_bytes,
    );
    out.int(
        &HISTORY_DISK_BYTES,
        vec![("tier", "rollup".to_string())],
        db.rollup_bytes,
    );
    out.int(&HISTORY_APPENDED, vec![], db.appended_values);
    out.int(&HISTORY_EVICTIONS, vec![], db.budget_evictions);
    out.int(&HISTORY_DROPPED_CHUNKS, vec![], db.dropped_chunks);
    out.int(&HISTORY_LATE_POINTS, vec![], db.late_points);
    out.int(&HISTORY_CORRUPT_CHUNKS, vec![], db.corrupt_chunks);
    let Some(rw) = &h.remote_write else {
        return;
    };
    out.int(&REMOTE_SENT, vec![], rw.samples_sent);
    out.int(&REMOTE_DROPPED, vec![], rw.samples_dropped);
    out.int(&REMOTE_FAILED, vec![], rw.samples_failed);
    out.int(&REMOTE_REQUESTS_FAILED, vec![], rw.requests_failed);
    out.int(&REMOTE_QUEUED, vec![], rw.queued as u64);
    if let Some(ms) = rw.last_success_unix_ms {
        out.float(&REMOTE_LAST_SUCCESS, vec![], ms as f64 / 1000.0);
    }
}

fn collect_jobs(s: &Snapshot, out: &mut Samples) {
    let mut by_status: BTreeMap<String, u64> =
        JOB_STATUSES.iter().map(|st| (st.to_string(), 0)).collect();
    for j in &s.jobs {
        *by_status.entry(j.status.clone()).or_default() += 1;
        let job = || vec![("novacron_job", j.name.clone())];
        out.int(&JOB_DESIRED, job(), u64::from(j.replicas));
        out.int(&JOB_RUNNING, job(), u64::from(j.running));
        out.int(&JOB_HEALTHY, job(), u64::from(j.healthy));
        out.int(&JOB_VERSION, job(), j.version);
    }
    for (status, n) in by_status {
        out.int(&JOBS, vec![("status", status)], n);
    }
}

fn collect_node(node: &NodeView, live: &[&AllocRecord], out: &mut Samples) {
    let label = |key: &str| node.labels.get(key).cloned().unwrap_or_default();
    let zone = label("zone");
    let base = || vec![("node", node.name.clone()), ("zone", zone.clone())];
    let with = |extra: &[(&'static str, &str)]| {
        let mut l = base();
        l.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
        l
    };

    // A warm node is stopped on purpose: `warm`, not down.
    for status in NODE_STATUSES {
        let value = u64::from(!node.warm && node.status == status);
        out.int(
            &NODE_STATUS,
            with(&[("status", &status.to_string())]),
            value,
        );
    }
    out.int(
        &NODE_STATUS,
        with(&[("status", "warm")]),
        u64::from(node.warm),
    );
    let caps = &node.capabilities;
    out.int(
        &NODE_INFO,
        with(&[
            ("region", &label("region")),
            ("pool", &label("pool")),
            ("instance_type", &label("instance_type")),
            ("capacity", &label("capacity")),
            ("agent_version", &node.agent_version),
            ("os", &caps.os),
            ("arch", &caps.arch),
            (
                "docker_version",
                caps.docker_version.as_deref().unwrap_or(""),
            ),
            ("gpu_driver", caps.gpu_driver.as_deref().unwrap_or("")),
        ]),
        1,
    );
    if let Some(ms) = node.last_seen_unix_ms {
        out.float(&NODE_LAST_SEEN, base(), ms as f64 / 1000.0);
    }
    if let Some(ms) = node.cert_expires_unix_ms {
        out.float(&NODE_CERT_EXPIRY, base(), ms as f64 / 1000.0);
    }
    out.int(&NODE_DROPPED, base(), node.samples_dropped);

    let cap = &node.capacity;
    out.float(&NODE_CPU_CAPACITY, base(), cap.cpu_millis as f64 / 1000.0);
    out.int(&NODE_MEMORY_CAPACITY, base(), cap.memory_bytes);
    out.int(&NODE_DISK_CAPACITY, base(), cap.disk_bytes);
    out.int(&NODE_GPU_CAPACITY, base(), cap.gpus.len() as u64);
    let mine = || live.iter().filter(|a| a.node == node.name && a.desired_run);
    let cpu_millis: u64 = mine().map(|a| a.cpu_millis).sum();
    out.float(&NODE_CPU_ALLOCATED, base(), cpu_millis as f64 / 1000.0);
    out.int(
        &NODE_MEMORY_ALLOCATED,
        base(),
        mine().map(|a| a.memory_bytes).sum(),
    );
    out.int(
        &NODE_GPU_ALLOCATED,
        base(),
        mine().map(|a| a.gpu_uuids.len() as u64).sum(),
    );

    let Some(sample) = &node.latest else {
        return;
    };
    collect_sample(&node.name, &zone, sample, out);
}

fn collect_allocations(s: &Snapshot, live: &[&AllocRecord], out: &mut Samples) {
    let labels = |a: &AllocRecord| -> Labels {
        vec![
            ("alloc", a.id.clone()),
            ("novacron_job", a.job.clone()),
            ("node", a.node.clone()),
        ]
    };
    for a in live {
        let mut state = labels(a);
        state.push(("state", a.state.to_string()));
        out.int(&ALLOC_STATE, state, 1);
        if let Some(healthy) = a.healthy {
            out.int(&ALLOC_HEALTHY, labels(a), u64::from(healthy));
        }
        out.int(&ALLOC_RESTARTS, labels(a), u64::from(a.restarts));
        out.float(
            &ALLOC_CPU_REQUESTED,
            labels(a),
            a.cpu_millis as f64 / 1000.0,
        );
        out.int(&ALLOC_MEMORY_REQUESTED, labels(a), a.memory_bytes);
    }
    // Usage comes from the latest sample of the node the allocation is bound to.
    let by_id: HashMap<&str, &AllocRecord> = live.iter().map(|a| (a.id.as_str(), *a)).collect();
    for node in &s.nodes {
        let Some(sample) = &node.latest else {
            continue;
        };
        for u in &sample.allocations {
            let Some(a) = by_id.get(u.id.as_str()).filter(|a| a.node == node.name) else {
                continue;
            };
            out.float(
                &ALLOC_CPU_USAGE,
                labels(a),
                f64::from(u.cpu_percent) / 100.0,
            );
            out.int(&ALLOC_MEMORY_USAGE, labels(a), u.memory_bytes);
            if u.memory_limit_bytes > 0 {
                out.int(&ALLOC_MEMORY_LIMIT, labels(a), u.memory_limit_bytes);
            }
            out.int(&ALLOC_NET_RX, labels(a), u.rx_bytes_per_sec);
            out.int(&ALLOC_NET_TX, labels(a), u.tx_bytes_per_sec);
        }
        for a in live.iter().filter(|a| a.node == node.name) {
            for g in sample.gpus.iter().filter(|g| a.gpu_uuids.contains(&g.uuid)) {
                let l = || gpu_labels(labels(a), g);
                out.float(
                    &ALLOC_GPU_UTILIZATION,
                    l(),
                    f64::from(g.utilization_percent) / 100.0,
                );
                out.int(&ALLOC_GPU_MEMORY_USED, l(), g.memory_used_bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use novacron_common::manifest::JobType;
    use novacron_common::wire::{
        AllocationUsage, Capabilities, Capacity, CpuSample, CpuSeconds, DiskSample, GpuInfo,
        GpuSample, MemorySample, NetworkSample, NodeSample,
    };

    use super::*;

    const GIB: u64 = 1 << 30;

    fn node(name: &str, zone: &str, status: NodeStatus, latest: Option<NodeSample>) -> NodeView {
        NodeView {
            name: name.into(),
            status,
            labels: [("zone".to_string(), zone.to_string())].into(),
            capacity: Capacity {
                cpu_millis: 8000,
                memory_bytes: 16 * GIB,
                disk_bytes: 100 * GIB,
                dynamic_ports: Default::default(),
                gpus: vec![GpuInfo {
                    index: 0,
                    uuid: format!("GPU-{name}-0"),
                    model: "NVIDIA H100".into(),
                    memory_bytes: 80 * GIB,
                    vfio_address: None,
                }],
            },
            capabilities: Capabilities {
                docker_version: Some("26.1.5".into()),
                live_checkpoint: false,
                gpu_driver: Some("550.54".into()),
                os: "Debian 12".into(),
                arch: "x86_64".into(),
                live_checkpoint_reason: None,
                vm: None,
                oci: None,
            },
            agent_version: "0.1.0".into(),
            address: None,
            enrolled_at_unix_ms: 1_700_000_000_000,
            last_seen_unix_ms: Some(1_700_000_100_500),
            cert_expires_unix_ms: Some(1_800_000_000_000),
            samples_dropped: 3,
            cordoned: false,
            warm: false,
            latest,
            images: 0,
            image_bytes: 0,
        }
    }

    fn sample(name: &str) -> NodeSample {
        NodeSample {
            seq: 41,
            at_unix_ms: 1_700_000_100_000,
            cpu: CpuSample {
                total_percent: 25.0,
                per_core_percent: vec![20.0, 30.0, 25.0, 25.0],
                load: [1.5, 1.25, 1.0],
                seconds_total: Some(CpuSeconds {
                    user: 120.5,
                    idle: 3000.25,
                    ..CpuSeconds::default()
                }),
            },
            memory: MemorySample {
                total_bytes: 16 * GIB,
                used_bytes: 4 * GIB,
                available_bytes: 12 * GIB,
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
                read_bytes_total: Some(10 * GIB),
                written_bytes_total: Some(20 * GIB),
            }],
            networks: vec![NetworkSample {
                interface: "eth0".into(),
                rx_bytes_per_sec: 1000,
                tx_bytes_per_sec: 500,
                rx_bytes_total: Some(7_000_000),
                tx_bytes_total: Some(5_000_000),
            }],
            gpus: vec![GpuSample {
                index: 0,
                uuid: format!("GPU-{name}-0"),
                name: "NVIDIA H100".into(),
                utilization_percent: 75,
                memory_used_bytes: 10 * GIB,
                memory_total_bytes: 80 * GIB,
                temperature_celsius: 61,
                power_milliwatts: 312_500,
            }],
            uptime_secs: 3600,
            allocations: vec![AllocationUsage {
                id: "web-1".into(),
                cpu_percent: 50.0,
                memory_bytes: 30 << 20,
                memory_limit_bytes: 32 << 20,
                rx_bytes_per_sec: 10,
                tx_bytes_per_sec: 20,
            }],
        }
    }

    fn alloc(id: &str, job: &str, node: &str, state: AllocState, gpus: &[&str]) -> AllocRecord {
        AllocRecord {
            restore: None,
            id: id.into(),
            job: job.into(),
            version: 1,
            node: node.into(),
            desired_run: !state.is_terminal(),
            state,
            healthy: (state == AllocState::Running).then_some(true),
            healthy_since_unix_ms: None,
            created_unix_ms: 0,
            updated_unix_ms: 0,
            restarts: 2,
            exit_code: None,
            message: String::new(),
            failure: None,
            cpu_millis: 500,
            memory_bytes: 32 << 20,
            gpu_uuids: gpus.iter().map(|g| g.to_string()).collect(),
            priority: 50,
            disk_bytes: 0,
            ports: vec![],
            published: vec![],
            suspended: false,
            address: None,
        }
    }

    fn job(name: &str, status: &str) -> JobSummary {
        JobSummary {
            name: name.into(),
            job_type: JobType::Service,
            version: 3,
            stable_version: Some(2),
            replicas: 2,
            manifest_replicas: 2,
            scaled_by: None,
            scale_reason: None,
            running: 1,
            healthy: 1,
            status: status.into(),
            message: String::new(),
            submitted_at_unix_ms: 0,
            submitted_by: "alice".into(),
            vm: None,
            suspended: false,
        }
    }

    fn stats() -> ControllerStats {
        ControllerStats {
            connected_agents: 1,
            samples_ingested: 1234,
            duplicates_skipped: 5,
            ingest_latency_p50_ms: 2.0,
            ingest_latency_p99_ms: 15.0,
            ingest_latency_count: 100,
        }
    }

    /// A fleet where every family has at least one sample.
    fn fleet() -> Snapshot {
        let passes = PassStats::default();
        passes.record(Duration::from_micros(300), 2, 0);
        passes.record(Duration::from_millis(3), 0, 1);
        Snapshot {
            nodes: vec![
                node("n1", "a", NodeStatus::Ready, Some(sample("n1"))),
                node("n2", "b", NodeStatus::Down, None),
            ],
            jobs: vec![job("web", "running"), job("train", "blocked")],
            allocations: vec![
                alloc("web-1", "web", "n1", AllocState::Running, &["GPU-n1-0"]),
                alloc("web-0", "web", "n1", AllocState::Failed, &[]),
                alloc("train-1", "train", "n2", AllocState::Pending, &[]),
            ],
            stats: stats(),
            passes,
            events: 77,
            ingest_latency: {
                let h = crate::state::registry::ingest_latency_histogram();
                h.observe(0.002);
                h.observe(0.015);
                h
            },
            process: Some(ProcessStats {
                cpu_seconds: 12.5,
                resident_memory_bytes: 40 << 20,
                virtual_memory_bytes: 900 << 20,
                open_fds: 17,
                max_fds: Some(65_536),
                start_time_seconds: 1_700_000_000.25,
            }),
            term: ("etcd", 42, 1_700_000_100_000),
            history: Some(history()),
        }
    }

    /// A history with remote write configured, which last succeeded.
    fn history() -> HistoryHealth {
        HistoryHealth {
            store: novacron_tsdb::Stats {
                head_series: 120,
                head_bytes: 6_000,
                head_budget_bytes: 128 << 20,
                disk_bytes: 100_000,
                rollup_bytes: 20_000,
                budget_evictions: 4,
                dropped_chunks: 1,
                late_points: 7,
                corrupt_chunks: 2,
                appended_values: 94_000,
                ..novacron_tsdb::Stats::default()
            },
            remote_write: Some(RemoteWriteStats {
                samples_sent: 9_000,
                samples_dropped: 10,
                samples_failed: 11,
                requests_failed: 12,
                queued: 13,
                last_error: Some("receiver answered 503".into()),
                last_success_unix_ms: Some(1_700_000_100_250),
            }),
        }
    }

    /// Whether `family` is announced only when the history (or remote write) is.
    fn optional(family: &Family) -> bool {
        HISTORY_FAMILIES.contains(family) || REMOTE_WRITE_FAMILIES.contains(family)
    }

    fn announces(text: &str, family: &Family) -> bool {
        text.contains(&format!("# HELP {} {}\n", family.name, family.help))
    }

    fn empty() -> Snapshot {
        Snapshot {
            nodes: vec![],
            jobs: vec![],
            allocations: vec![],
            stats: ControllerStats {
                connected_agents: 0,
                samples_ingested: 0,
                duplicates_skipped: 0,
                ingest_latency_p50_ms: 0.0,
                ingest_latency_p99_ms: 0.0,
                ingest_latency_count: 0,
            },
            passes: PassStats::default(),
            events: 0,
            ingest_latency: crate::state::registry::ingest_latency_histogram(),
            process: None,
            term: ("redb", 0, 0),
            history: None,
        }
    }

    fn rendered(s: Snapshot) -> String {
        render(s).expect("rendering into a String cannot fail")
    }

    /// Sample lines as (name, labels, value); panics on a line that does not parse.
    fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, String)> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("a value");
                let (name, labels) = match series.split_once('{') {
                    Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').expect("}"))),
                    None => (series, BTreeMap::new()),
                };
                (name.to_string(), labels, value.to_string())
            })
            .collect()
    }

    fn parse_labels(text: &str) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::new();
        let mut chars = text.chars().peekable();
        while chars.peek().is_some() {
            let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
            assert_eq!(
                chars.next(),
                Some('"'),
                "label {key} opens a quote in {text}"
            );
            let mut value = String::new();
            loop {
                match chars.next().expect("closing quote") {
                    '\\' => match chars.next().expect("escaped char") {
                        'n' => value.push('\n'),
                        c @ ('\\' | '"') => value.push(c),
                        c => panic!("bad escape \\{c} in {text}"),
                    },
                    '"' => break,
                    c => value.push(c),
                }
            }
            labels.insert(key, value);
            if chars.peek() == Some(&',') {
                chars.next();
            }
        }
        labels
    }

    fn value_of(text: &str, name: &str, want: &[(&str, &str)]) -> Option<String> {
        samples(text)
            .into_iter()
            .find(|(n, labels, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
    }

    fn number(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
        value_of(text, name, want)
            .unwrap_or_else(|| panic!("no sample {name} {want:?} in\n{text}"))
            .parse()
            .expect("a number")
    }

    #[test]
    fn remote_write_names_the_allocation_families_of_this_endpoint() {
        use crate::services::remote_write as rw;
        for name in [
            rw::ALLOC_CPU_USAGE,
            rw::ALLOC_MEMORY_USAGE,
            rw::ALLOC_MEMORY_LIMIT,
            rw::ALLOC_NET_RX,
            rw::ALLOC_NET_TX,
        ] {
            let family = FAMILIES
                .iter()
                .find(|f| f.name == name)
                .unwrap_or_else(|| panic!("{name} is not a /metrics family"));
            assert_eq!(family.kind, Kind::Gauge, "{name}");
        }
    }
    #[test]
    fn families_have_valid_unique_names_and_plain_help() {
        let mut seen = BTreeSet::new();
        for f in FAMILIES.iter() {
            assert!(seen.insert(f.name), "{} declared twice", f.name);
            assert!(
                f.name.starts_with("novacron_") || f.name.starts_with("process_"),
                "{}",
                f.name
            );
            assert!(
                f.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                f.name
            );
            // prometheus-client adds `_total` to counters; nothing else may end so.
            assert!(!f.name.ends_with("_total"), "{}", f.name);
            // prometheus-client writes HELP as is: it must need no escaping.
            assert!(
                !f.help.is_empty() && !f.help.contains(['\\', '\n', '"']),
                "{}",
                f.name
            );
        }
    }

    #[test]
    fn an_empty_controller_announces_every_family() {
        let text = rendered(empty());
        assert!(text.ends_with("# EOF\n"), "{text}");
        // All but the history's: this one has none.
        for f in FAMILIES.iter() {
            assert_eq!(announces(&text, f), !optional(f), "{}", f.name);
        }
        assert_eq!(number(&text, "novacron_connected_agents", &[]), 0.0);
        assert_eq!(
            number(&text, "novacron_allocations", &[("state", "running")]),
            0.0
        );
        assert_eq!(
            number(&text, "novacron_jobs", &[("status", "blocked")]),
            0.0
        );
        assert_eq!(
            number(
                &text,
                "novacron_scheduling_pass_duration_seconds_count",
                &[]
            ),
            0.0
        );
        assert_eq!(
            number(&text, "novacron_ingest_latency_seconds_count", &[]),
            0.0
        );
        // No reading of the process: no made-up zero.
        assert_eq!(value_of(&text, "process_open_fds", &[]), None);
    }

    #[test]
    fn history_health_is_exported_in_base_units() {
        let text = to_text_format(&rendered(fleet()));
        for (name, labels, want) in [
            ("novacron_history_head_bytes", &[][..], 6_000.0),
            (
                "novacron_history_head_budget_bytes",
                &[],
                f64::from(128u32 << 20),
            ),
            ("novacron_history_head_series", &[], 120.0),
            ("novacron_history_disk_bytes", &[("tier", "raw")], 100_000.0),
            (
                "novacron_history_disk_bytes",
                &[("tier", "rollup")],
                20_000.0,
            ),
            ("novacron_history_values_appended_total", &[], 94_000.0),
            ("novacron_history_budget_evictions_total", &[], 4.0),
            ("novacron_history_dropped_chunks_total", &[], 1.0),
            ("novacron_history_late_points_total", &[], 7.0),
            ("novacron_history_corrupt_chunks_total", &[], 2.0),
            ("novacron_remote_write_samples_sent_total", &[], 9_000.0),
            ("novacron_remote_write_samples_dropped_total", &[], 10.0),
            ("novacron_remote_write_samples_failed_total", &[], 11.0),
            ("novacron_remote_write_requests_failed_total", &[], 12.0),
            ("novacron_remote_write_queued_samples", &[], 13.0),
            (
                "novacron_remote_write_last_success_timestamp_seconds",
                &[],
                1_700_000_100.25,
            ),
        ] {
            assert_eq!(number(&text, name, labels), want, "{name} {labels:?}");
        }
        assert!(text.contains("# TYPE novacron_history_values_appended_total counter\n"));
        assert!(text.contains("# TYPE novacron_history_head_bytes gauge\n"));
        assert!(text.contains("# TYPE novacron_remote_write_queued_samples gauge\n"));
    }

    #[test]
    fn history_families_are_absent_while_the_history_is_off() {
        let mut s = fleet();
        s.history = None;
        let text = rendered(s);
        for f in FAMILIES.iter() {
            assert_eq!(announces(&text, f), !optional(f), "{}", f.name);
        }
        assert!(
            !text.contains("novacron_history_") && !text.contains("novacron_remote_write_"),
            "{text}"
        );
    }

    #[test]
    fn remote_write_families_need_remote_write_and_a_success_to_date() {
        // The history without remote write.
        let mut s = fleet();
        s.history.as_mut().expect("a history").remote_write = None;
        let text = rendered(s);
        for f in HISTORY_FAMILIES {
            assert!(announces(&text, f), "{}", f.name);
        }
        for f in REMOTE_WRITE_FAMILIES {
            assert!(!announces(&text, f), "{}", f.name);
        }
        assert!(!text.contains("novacron_remote_write_"), "{text}");

        // Remote write that has not succeeded yet: announced, no timestamp.
        let mut s = fleet();
        let health = s.history.as_mut().expect("a history");
        health.remote_write = Some(RemoteWriteStats::default());
        let text = rendered(s);
        for f in REMOTE_WRITE_FAMILIES {
            assert!(announces(&text, f), "{}", f.name);
        }
        let last = "novacron_remote_write_last_success_timestamp_seconds";
        assert_eq!(value_of(&text, last, &[]), None);
        assert_eq!(
            number(&text, "novacron_remote_write_samples_sent_total", &[]),
            0.0
        );
        let (ok, report) = promtool_check(&to_text_format(&text));
        assert!(ok, "promtool check metrics failed:\n{report}\n{text}");
    }

    #[test]
    fn a_sample_without_counters_exposes_none() {
        // An agent before wire protocol 3 sends rates only: no counter is made up.
        let mut snapshot = fleet();
        for node in &mut snapshot.nodes {
            if let Some(s) = &mut node.latest {
                s.cpu.seconds_total = None;
                for d in &mut s.disks {
                    d.read_bytes_total = None;
                    d.written_bytes_total = None;
                }
                for n in &mut s.networks {
                    n.rx_bytes_total = None;
                    n.tx_bytes_total = None;
                }
            }
        }
        let text = to_text_format(&rendered(snapshot));
        for name in [
            "novacron_node_cpu_seconds_total",
            "novacron_node_disk_read_bytes_total",
            "novacron_node_disk_written_bytes_total",
            "novacron_node_network_receive_bytes_total",
            "novacron_node_network_transmit_bytes_total",
        ] {
            assert!(
                !samples(&text).iter().any(|(n, _, _)| n == name),
                "{name} has a sample"
            );
            assert!(text.contains(&format!("# TYPE {name} counter")), "{name}");
        }
    }

    #[test]
    fn every_family_has_samples_in_the_test_fleet() {
        let text = to_text_format(&rendered(fleet()));
        let names: BTreeSet<String> = samples(&text).into_iter().map(|(n, _, _)| n).collect();
        for f in FAMILIES.iter() {
            let sample = match f.kind {
                Kind::Counter => format!("{}_total", f.name),
                Kind::Histogram => format!("{}_count", f.name),
                Kind::Gauge => f.name.to_string(),
            };
            assert!(names.contains(&sample), "no sample of {}", f.name);
        }
    }

    #[test]
    fn node_gauges_carry_the_latest_sample_in_base_units() {
        let text = rendered(fleet());
        let n1 = [("node", "n1"), ("zone", "a")];
        let gib = GIB as f64;
        assert_eq!(
            number(&text, "novacron_node_memory_total_bytes", &n1),
            16.0 * gib
        );
        assert_eq!(
            number(&text, "novacron_node_memory_used_bytes", &n1),
            4.0 * gib
        );
        assert_eq!(number(&text, "novacron_node_cpu_usage_ratio", &n1), 0.25);
        assert_eq!(number(&text, "novacron_node_cpu_cores", &n1), 4.0);
        assert_eq!(number(&text, "novacron_node_load5", &n1), 1.25);
        assert_eq!(number(&text, "novacron_node_cpu_capacity_cores", &n1), 8.0);
        assert_eq!(
            number(&text, "novacron_node_sample_timestamp_seconds", &n1),
            1_700_000_100.0
        );
        assert_eq!(
            number(&text, "novacron_node_last_seen_timestamp_seconds", &n1),
            1_700_000_100.5
        );
        assert_eq!(
            number(&text, "novacron_node_samples_dropped_total", &n1),
            3.0
        );
        let root = [("node", "n1"), ("mountpoint", "/"), ("device", "/dev/sda1")];
        assert_eq!(
            number(&text, "novacron_node_filesystem_available_bytes", &root),
            60.0 * gib
        );
        // Free = size less used: 5 GiB reserved for root are free, not available.
        assert_eq!(
            number(&text, "novacron_node_filesystem_free_bytes", &root),
            65.0 * gib
        );
        let eth0 = [("node", "n1"), ("device", "eth0")];
        assert_eq!(
            number(&text, "novacron_node_network_transmit_bytes_total", &eth0),
            5_000_000.0
        );
        let sda = [("node", "n1"), ("device", "/dev/sda1")];
        assert_eq!(
            number(&text, "novacron_node_disk_written_bytes_total", &sda),
            20.0 * gib
        );
        assert_eq!(
            number(
                &text,
                "novacron_node_cpu_seconds_total",
                &[("node", "n1"), ("mode", "idle")]
            ),
            3000.25
        );
        assert_eq!(
            number(
                &text,
                "novacron_node_cpu_seconds_total",
                &[("node", "n1"), ("mode", "steal")]
            ),
            0.0
        );
        let gpu = [
            ("node", "n1"),
            ("gpu", "0"),
            ("uuid", "GPU-n1-0"),
            ("model", "NVIDIA H100"),
        ];
        assert_eq!(
            number(&text, "novacron_node_gpu_utilization_ratio", &gpu),
            0.75
        );
        assert_eq!(number(&text, "novacron_node_gpu_power_watts", &gpu), 312.5);
        assert_eq!(
            number(&text, "novacron_node_gpu_temperature_celsius", &gpu),
            61.0
        );
        // Reservations count only allocations that are not terminal.
        assert_eq!(number(&text, "novacron_node_cpu_allocated_cores", &n1), 0.5);
        assert_eq!(number(&text, "novacron_node_gpus_allocated", &n1), 1.0);
        let info = [
            ("node", "n1"),
            ("zone", "a"),
            ("arch", "x86_64"),
            ("gpu_driver", "550.54"),
        ];
        assert_eq!(number(&text, "novacron_node_info", &info), 1.0);
        // A node without a sample has its registry gauges only.
        let n2 = [("node", "n2")];
        assert_eq!(
            value_of(&text, "novacron_node_memory_total_bytes", &n2),
            None
        );
        assert_eq!(
            number(&text, "novacron_node_memory_capacity_bytes", &n2),
            16.0 * gib
        );
    }

    #[test]
    fn node_status_is_one_of_three_labelled_gauges() {
        let text = rendered(fleet());
        for (node, status, want) in [
            ("n1", "ready", 1.0),
            ("n1", "disconnected", 0.0),
            ("n1", "down", 0.0),
            ("n2", "ready", 0.0),
            ("n2", "down", 1.0),
        ] {
            let labels = [("node", node), ("status", status)];
            assert_eq!(
                number(&text, "novacron_node_status", &labels),
                want,
                "{node} {status}"
            );
        }
    }

    #[test]
    fn allocation_gauges_join_usage_with_the_allocation() {
        let text = rendered(fleet());
        let web1 = [("alloc", "web-1"), ("novacron_job", "web"), ("node", "n1")];
        assert_eq!(
            number(&text, "novacron_allocation_cpu_usage_cores", &web1),
            0.5
        );
        assert_eq!(
            number(&text, "novacron_allocation_memory_usage_bytes", &web1),
            f64::from(30 << 20)
        );
        assert_eq!(
            number(&text, "novacron_allocation_memory_limit_bytes", &web1),
            f64::from(32 << 20)
        );
        assert_eq!(
            number(&text, "novacron_allocation_cpu_requested_cores", &web1),
            0.5
        );
        assert_eq!(number(&text, "novacron_allocation_healthy", &web1), 1.0);
        assert_eq!(
            number(&text, "novacron_allocation_restarts_total", &web1),
            2.0
        );
        let gpu = [("alloc", "web-1"), ("gpu", "0"), ("uuid", "GPU-n1-0")];
        assert_eq!(
            number(&text, "novacron_allocation_gpu_utilization_ratio", &gpu),
            0.75
        );
        let state = [("alloc", "web-1"), ("state", "running")];
        assert_eq!(number(&text, "novacron_allocation_state", &state), 1.0);
        // Terminal allocations are counted, not listed.
        assert_eq!(
            value_of(&text, "novacron_allocation_state", &[("alloc", "web-0")]),
            None
        );
        assert_eq!(
            number(&text, "novacron_allocations", &[("state", "failed")]),
            1.0
        );
        assert_eq!(
            number(&text, "novacron_allocations", &[("state", "pending")]),
            1.0
        );
        // Usage is only taken from the node the allocation is bound to.
        let mut s = fleet();
        s.allocations[0].node = "n2".into();
        let text = rendered(s);
        assert_eq!(
            value_of(
                &text,
                "novacron_allocation_cpu_usage_cores",
                &[("alloc", "web-1")]
            ),
            None
        );
    }

    #[test]
    fn controller_internals_are_exported() {
        let text = rendered(fleet());
        assert_eq!(number(&text, "novacron_connected_agents", &[]), 1.0);
        assert_eq!(
            number(&text, "novacron_samples_ingested_total", &[]),
            1234.0
        );
        assert_eq!(number(&text, "novacron_samples_duplicate_total", &[]), 5.0);
        let l = "novacron_ingest_latency_seconds";
        assert_eq!(number(&text, &format!("{l}_count"), &[]), 2.0);
        assert!((number(&text, &format!("{l}_sum"), &[]) - 0.017).abs() < 1e-9);
        assert_eq!(
            number(&text, &format!("{l}_bucket"), &[("le", "0.002")]),
            1.0
        );
        assert_eq!(
            number(&text, &format!("{l}_bucket"), &[("le", "0.016")]),
            2.0
        );
        assert_eq!(number(&text, "process_cpu_seconds_total", &[]), 12.5);
        assert_eq!(
            number(&text, "process_resident_memory_bytes", &[]),
            f64::from(40u32 << 20)
        );
        assert_eq!(number(&text, "process_open_fds", &[]), 17.0);
        assert_eq!(number(&text, "process_max_fds", &[]), 65_536.0);
        assert_eq!(
            number(&text, "process_start_time_seconds", &[]),
            1_700_000_000.25
        );
        assert_eq!(number(&text, "novacron_events_total", &[]), 77.0);
        assert_eq!(
            number(&text, "novacron_scheduling_placements_total", &[]),
            2.0
        );
        assert_eq!(
            number(&text, "novacron_scheduling_unplaced_replicas", &[]),
            1.0
        );
        let h = "novacron_scheduling_pass_duration_seconds";
        assert_eq!(number(&text, &format!("{h}_count"), &[]), 2.0);
        assert!((number(&text, &format!("{h}_sum"), &[]) - 0.0033).abs() < 1e-9);
        assert_eq!(
            number(&text, &format!("{h}_bucket"), &[("le", "0.0004")]),
            1.0
        );
        assert_eq!(
            number(&text, &format!("{h}_bucket"), &[("le", "+Inf")]),
            2.0
        );
        assert_eq!(
            number(&text, "novacron_jobs", &[("status", "blocked")]),
            1.0
        );
        assert_eq!(
            number(
                &text,
                "novacron_job_replicas_desired",
                &[("novacron_job", "web")]
            ),
            2.0
        );
        assert_eq!(
            number(&text, "novacron_job_version", &[("novacron_job", "train")]),
            3.0
        );
        assert_eq!(
            number(
                &text,
                "novacron_build_info",
                &[("version", env!("CARGO_PKG_VERSION"))]
            ),
            1.0
        );
    }

    /// Issue 15: Prometheus gives every scraped series its own `job` (the scrape
    /// job) and `instance` labels and renames a target's clashing ones to
    /// `exported_job` and `exported_instance`, which emptied the dashboard's
    /// per-job panels.
    #[test]
    fn no_series_carries_a_label_prometheus_renames() {
        let text = rendered(fleet());
        for (name, labels, _) in samples(&text) {
            for reserved in ["job", "instance"] {
                assert!(
                    !labels.contains_key(reserved),
                    "{name} carries a {reserved} label"
                );
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        let mut s = fleet();
        let tricky = "eu \"west\"\\1\nnext";
        s.nodes[0].labels.insert("zone".into(), tricky.into());
        s.nodes[0].latest.as_mut().expect("a sample").disks[0].mount = "/mnt/a\"b".into();
        let text = rendered(s);
        assert!(
            text.contains(r#"zone="eu \"west\"\\1\nnext""#),
            "escaped zone missing in\n{text}"
        );
        // Every line still parses, and the values come back unchanged.
        let labels = [("node", "n1"), ("zone", tricky)];
        assert_eq!(number(&text, "novacron_node_cpu_cores", &labels), 4.0);
        let mount = [("node", "n1"), ("mountpoint", "/mnt/a\"b")];
        assert_eq!(
            number(&text, "novacron_node_filesystem_size_bytes", &mount),
            100.0 * GIB as f64
        );
        assert_eq!(text.lines().filter(|l| l.starts_with("next")).count(), 0);
    }

    #[test]
    fn untrusted_values_neither_break_nor_duplicate_series() {
        let mut s = fleet();
        let latest = s.nodes[0].latest.as_mut().expect("a sample");
        latest.cpu.total_percent = f32::NAN;
        latest.allocations[0].cpu_percent = f32::INFINITY;
        let disk = latest.disks[0].clone();
        latest.disks.push(disk);
        let text = rendered(s);
        assert_eq!(
            value_of(&text, "novacron_node_cpu_usage_ratio", &[("node", "n1")]),
            None
        );
        assert_eq!(
            value_of(
                &text,
                "novacron_allocation_cpu_usage_cores",
                &[("alloc", "web-1")]
            ),
            None
        );
        let size = samples(&text)
            .into_iter()
            .filter(|(n, _, _)| n == "novacron_node_filesystem_size_bytes")
            .count();
        assert_eq!(size, 1);
    }

    #[test]
    fn the_text_format_names_counters_with_total_and_drops_eof() {
        let om = rendered(fleet());
        let text = to_text_format(&om);
        assert!(text.contains("# TYPE novacron_samples_ingested_total counter\n"));
        assert!(text.contains(
            "# HELP novacron_samples_ingested_total Metrics samples ingested from agents since the controller started.\n"
        ));
        assert!(text.contains("# TYPE novacron_node_status gauge\n"));
        assert!(text.contains("# TYPE novacron_scheduling_pass_duration_seconds histogram\n"));
        assert!(!text.contains("# EOF"));
        assert!(!text.contains("# UNIT"));
        // Same samples in both formats.
        assert_eq!(samples(&om), samples(&text));
        let converted = to_text_format(
            "# HELP a_info Build.\n# TYPE a info\na_info{v=\"1\"} 1\n# HELP b B.\n# TYPE b unknown\nb 2\n# EOF\n",
        );
        assert_eq!(
            converted,
            "# HELP a_info Build.\n# TYPE a_info gauge\na_info{v=\"1\"} 1\n# HELP b B.\n# TYPE b untyped\nb 2\n"
        );
    }

    #[test]
    fn openmetrics_is_served_only_when_asked_for() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(accepts_openmetrics([prometheus].into_iter()));
        assert!(accepts_openmetrics(
            ["text/html", "Application/OpenMetrics-Text; version=1.0.0"].into_iter()
        ));
        assert!(!accepts_openmetrics(["*/*"].into_iter()));
        assert!(!accepts_openmetrics(
            ["text/plain;version=0.0.4"].into_iter()
        ));
        assert!(!accepts_openmetrics(
            ["application/openmetrics-text;q=0"].into_iter()
        ));
        assert!(!accepts_openmetrics(std::iter::empty()));
    }

    /// `promtool check metrics` (Debian's `prometheus` package) lints the text
    /// format: names, units, HELP, counters, histograms.
    #[test]
    fn promtool_accepts_the_text_format() {
        let text = to_text_format(&rendered(fleet()));
        let (ok, report) = promtool_check(&text);
        assert!(
            ok,
            "promtool check metrics failed:\n{report}\n--- input ---\n{text}"
        );
    }

    /// Runs `promtool check metrics` on `text`; panics with the install command when
    /// promtool is missing.
    fn promtool_check(text: &str) -> (bool, String) {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("promtool is needed ({e}): install it with `apt-get install -y prometheus`")
            });
        child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(text.as_bytes())
            .expect("promtool reads its input");
        let out = child.wait_with_output().expect("promtool runs");
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), report)
    }

    const RULES: &str = "../packaging/prometheus/novacron-rules.yml";

    /// The shipped alert rules load in Prometheus (`promtool check rules`) and
    /// select only series this controller exports.
    #[test]
    fn promtool_accepts_the_alert_rules() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(RULES);
        let out = std::process::Command::new("promtool")
            .args(["check", "rules"])
            .arg(&path)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "promtool is needed ({e}): `bash .ci/setup` installs it (Debian package prometheus)"
                )
            });
        assert!(
            out.status.success(),
            "promtool check rules {} failed:\n{}{}",
            path.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let rules = std::fs::read_to_string(&path).expect("the rules file");
        let text = to_text_format(&rendered(fleet()));
        let exported = series_names(&text);
        let labels: BTreeSet<String> = samples(&text)
            .into_iter()
            .flat_map(|(_, l, _)| l.into_keys())
            .collect();
        let mut alerts = 0;
        for line in rules.lines().map(str::trim) {
            if let Some(expr) = line.strip_prefix("expr:") {
                alerts += 1;
                let names: Vec<&str> = identifiers(expr)
                    .into_iter()
                    .filter(|w| w.starts_with("novacron_") && !labels.contains(*w))
                    .collect();
                assert!(!names.is_empty(), "rule selects no novacron metric: {expr}");
                for name in names {
                    assert!(
                        exported.contains(name),
                        "{name} is not exported (in {expr})"
                    );
                }
                for label in label_names(expr) {
                    assert!(
                        labels.contains(&label) || label == "le",
                        "label {label:?} in {expr}"
                    );
                }
            }
            // Annotations name labels the series carry.
            for part in line.split("$labels.").skip(1) {
                let label: String = part
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(labels.contains(&label), "label {label:?} in {line}");
            }
        }
        assert!(alerts >= 5, "found only {alerts} rules");
    }

    const DASHBOARD: &str = include_str!("../../../packaging/grafana/novacron-dashboard.json");

    /// Every PromQL text of the dashboard: panel targets and variable queries.
    fn queries(value: &serde_json::Value, out: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr" | "definition", serde_json::Value::String(q)) => {
                            out.push(q.clone())
                        }
                        ("query", serde_json::Value::String(q)) if q.contains("novacron_") => {
                            out.push(q.clone())
                        }
                        _ => queries(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| queries(v, out)),
            _ => {}
        }
    }

    fn identifiers(query: &str) -> Vec<&str> {
        query
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .filter(|w| !w.is_empty())
            .collect()
    }

    /// Label names a query uses: in `by (...)`, `without (...)`, `{...}` matchers and
    /// `label_values(metric, label)`.
    fn label_names(query: &str) -> Vec<String> {
        let mut names = Vec::new();
        let mut rest = query;
        while let Some(i) = rest.find(['{', '(']) {
            let open = rest.as_bytes()[i];
            let before = rest[..i].trim_end();
            let close = if open == b'{' { '}' } else { ')' };
            let Some(len) = rest[i + 1..].find(close) else {
                break;
            };
            let inside = &rest[i + 1..i + 1 + len];
            if open == b'{' {
                for matcher in inside.split(',') {
                    let key: String = matcher
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    names.push(key.trim().to_string());
                }
            } else if before.ends_with(" by") || before.ends_with(" without") || before == "by" {
                names.extend(inside.split(',').map(|l| l.trim().to_string()));
            } else if before.ends_with("label_values")
                && let Some((_, label)) = inside.split_once(',')
            {
                names.push(label.trim().to_string());
            }
            rest = &rest[i + 1..];
        }
        names.retain(|n| !n.is_empty());
        names
    }

    #[test]
    fn the_grafana_dashboard_uses_only_exported_metrics_and_labels() {
        let dashboard: serde_json::Value =
            serde_json::from_str(DASHBOARD).expect("the dashboard is valid JSON");
        assert_eq!(dashboard["schemaVersion"], 39);
        assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
        let text = to_text_format(&rendered(fleet()));
        let exported = series_names(&text);
        let mut labels: BTreeSet<String> = samples(&text)
            .into_iter()
            .flat_map(|(_, l, _)| l.into_keys())
            .collect();
        labels.insert("le".into());
        let mut all = Vec::new();
        queries(&dashboard, &mut all);
        assert!(all.len() > 20, "found only {} queries", all.len());
        let mut used = BTreeSet::new();
        for q in &all {
            let names: Vec<&str> = identifiers(q)
                .into_iter()
                .filter(|w| w.starts_with("novacron_") && !labels.contains(*w))
                .collect();
            assert!(!names.is_empty(), "query selects no novacron metric: {q}");
            for name in names {
                assert!(exported.contains(name), "{name} is not exported (in {q})");
                used.insert(name.to_string());
            }
            for label in label_names(q) {
                assert!(
                    labels.contains(&label),
                    "label {label:?} is not exported (in {q})"
                );
            }
        }
        // Panels must reference the data source input, not a local one.
        for panel in dashboard["panels"].as_array().expect("panels") {
            if panel["type"] != "row" {
                assert_eq!(
                    panel["datasource"]["uid"], "${DS_PROMETHEUS}",
                    "{}",
                    panel["title"]
                );
            }
        }
        for wanted in [
            "novacron_node_status",
            "novacron_node_cpu_seconds_total",
            "novacron_node_network_receive_bytes_total",
            "novacron_node_disk_written_bytes_total",
            "novacron_node_memory_used_bytes",
            "novacron_node_gpu_utilization_ratio",
            "novacron_allocation_cpu_usage_cores",
            "novacron_allocation_memory_usage_bytes",
            "novacron_scheduling_pass_duration_seconds_bucket",
            "novacron_scheduling_unplaced_replicas",
            "novacron_connected_agents",
        ] {
            assert!(used.contains(wanted), "the dashboard shows no {wanted}");
        }
    }

    #[test]
    fn the_label_scanner_finds_matchers_groupings_and_variables() {
        assert_eq!(
            label_names(r#"sum by (le, node) (rate(x_bucket{node=~"$node",job!="a"}[5m]))"#),
            ["le", "node", "node", "job"]
        );
        assert_eq!(
            label_names("label_values(novacron_node_info, zone)"),
            ["zone"]
        );
        assert!(label_names("rate(x[5m])").is_empty());
    }
}

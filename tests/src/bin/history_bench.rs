//! `novacron-history-bench`: the metrics history's size and query latency.
//!
//! - `real --dir D --seconds N [--interval 1s]`: samples this host through the
//!   agent's own sampler (sysinfo, NVML when present) every interval into a
//!   fresh history, as the controller records a node, then prints the bytes per
//!   stored value in the head (before the flush) and on disk (after it).
//!   `--openmetrics FILE` also writes the same values (before quantization) as
//!   OpenMetrics text, which `promtool tsdb create-blocks-from openmetrics`
//!   turns into Prometheus TSDB blocks for a side-by-side size.
//! - `query --dir D --nodes N --node-hours H --runs R`: writes H hours of 1 Hz
//!   samples of one node and the last hour of N nodes (varied random walks, 2
//!   disks, 2 interfaces, 2 allocations each) into a fresh history, rolls them
//!   up, then times R runs of each query through `MetricsHistory::query` (the
//!   path `GET /v1/metrics/query` takes, without HTTP): one node over 24 h at a
//!   1 min step; the fleet's CPU mean over 1 h at 15 s from the 1-minute rollups;
//!   the same from raw points; one node's window (`MetricsHistory::window`,
//!   the autoscaler's and right-sizing's read) over the last hour. Prints one
//!   JSON line per query (p50, p99, max).
//!   `--reuse` queries what an earlier run wrote into D instead (the same
//!   `--nodes` and `--node-hours`), for profiling.
//!
//! - `copy --dir D --to D2`: a follower's first copy of the history `query`
//!   wrote into D, as `Mirror::sync` fetches it in the API's 4 MiB pieces
//!   (without HTTP and TLS), then a second round; prints the time and rate.
//!
//! All print JSON lines; BENCHMARKS.md records them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use novacron_api::{MetricsQuery, SeriesAgg};
use novacron_common::wire::{
    AllocationUsage, CpuSample, DiskSample, MemorySample, NetworkSample, NodeSample,
};
use novacron_controller::services::history::{HistorySettings, MetricsHistory};
use novacron_controller::state::registry::SampleSink;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn open(dir: &std::path::Path) -> anyhow::Result<MetricsHistory> {
    let settings = HistorySettings {
        raw_retention: Duration::from_secs(48 * 3600),
        ..HistorySettings::default()
    };
    MetricsHistory::open(dir, &settings, CancellationToken::new())
}

fn real(args: &[String]) -> anyhow::Result<()> {
    let dir = PathBuf::from(arg(args, "--dir", "/tmp/history-bench-real".to_string()));
    let seconds: u64 = arg(args, "--seconds", 600);
    let interval = humantime::parse_duration(&arg(args, "--interval", "1s".to_string()))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let h = open(&dir)?;
    let host = novacron_agent::collect::host::SysinfoCollector::new()
        .map_err(|e| anyhow::anyhow!("sysinfo: {e}"))?;
    let mut sampler = novacron_agent::collect::Sampler::new(
        Box::new(host),
        novacron_agent::collect::gpu::detect_gpus(),
    );
    let n = (seconds * 1000 / interval.as_millis().max(1) as u64).max(1);
    let start = Instant::now();
    let mut first: Option<NodeSample> = None;
    let export = args
        .iter()
        .position(|a| a == "--openmetrics")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    // metric → series labels → points, for the OpenMetrics export.
    let mut families: std::collections::BTreeMap<
        String,
        std::collections::BTreeMap<String, Vec<(u64, f64)>>,
    > = std::collections::BTreeMap::new();
    for i in 0..n {
        let due = start + interval * i as u32;
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let mut s = sampler.sample(Instant::now());
        // The agent's link stamps each sample as it sends it; so does this.
        s.at_unix_ms = now_ms() as u64;
        if first.is_none() {
            first = Some(s.clone());
        }
        h.record("real", &s);
        if export.is_some() {
            for (metric, label, v) in novacron_controller::services::history::node_values(&s) {
                if v.is_nan() {
                    continue;
                }
                let labels = if label.is_empty() {
                    "node=\"real\"".to_string()
                } else {
                    format!("node=\"real\",label=\"{}\"", label.replace('"', "_"))
                };
                families
                    .entry(metric.to_string())
                    .or_default()
                    .entry(labels)
                    .or_default()
                    .push((s.at_unix_ms, v));
            }
        }
    }
    if let Some(path) = &export {
        use std::io::Write;
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        let mut samples = 0u64;
        for (metric, series) in &families {
            writeln!(out, "# TYPE novacron_{metric} gauge")?;
            for (labels, points) in series {
                for (t, v) in points {
                    writeln!(
                        out,
                        "novacron_{metric}{{{labels}}} {v} {}.{:03}",
                        t / 1000,
                        t % 1000
                    )?;
                    samples += 1;
                }
            }
        }
        writeln!(out, "# EOF")?;
        eprintln!("wrote {samples} samples to {}", path.display());
    }
    let head = h.stats();
    h.close();
    let disk = h.stats();
    let sample = first.context("no sample")?;
    println!(
        "{}",
        serde_json::json!({
            "bench": "history_real",
            "samples": n,
            "interval_ms": interval.as_millis() as u64,
            "values_per_sample": disk.disk_values / n.max(1),
            "disks": sample.disks.len(),
            "interfaces": sample.networks.len(),
            "gpus": sample.gpus.len(),
            "head_values": head.head_values,
            "head_bytes": head.head_bytes,
            "head_bytes_per_value": head.head_bytes_per_value,
            "disk_values": disk.disk_values,
            "disk_bytes": disk.disk_bytes,
            "disk_bytes_per_value": disk.disk_bytes_per_value,
            "in_memory_window_bytes_per_value_before": 32,
        })
    );
    Ok(())
}

/// A node's synthetic 1 Hz state: random walks with the noise real readings
/// have (CPU as sysinfo's f32, memory in KiB steps, noisy network rates).
struct Walk {
    cpu: f64,
    mem: u64,
    disk: u64,
    rx: f64,
}

impl Walk {
    fn new(rng: &mut impl Rng) -> Walk {
        Walk {
            cpu: rng.random_range(5.0..60.0),
            mem: rng.random_range(1u64..3) << 30,
            disk: rng.random_range(5_000_000_000u64..9_000_000_000),
            rx: rng.random_range(1_000.0..50_000.0),
        }
    }

    fn step(&mut self, rng: &mut impl Rng, t: i64, i: usize) -> NodeSample {
        self.cpu = (self.cpu + rng.random_range(-4.0..4.0)).clamp(0.0, 100.0);
        self.mem = (self.mem as i64 + rng.random_range(-64i64..64) * 1024).max(1 << 28) as u64;
        self.disk += rng.random_range(0u64..3) * 4096;
        self.rx = (self.rx * rng.random_range(0.8..1.25)).clamp(100.0, 1e8);
        let cpu = self.cpu as f32 + rng.random_range(0.0f32..0.01);
        NodeSample {
            seq: i as u64,
            at_unix_ms: t as u64,
            cpu: CpuSample {
                total_percent: cpu,
                load: [
                    (self.cpu / 50.0) as f32,
                    (self.cpu / 55.0) as f32,
                    (self.cpu / 60.0) as f32,
                ],
                ..CpuSample::default()
            },
            memory: MemorySample {
                total_bytes: 8 << 30,
                used_bytes: self.mem,
                available_bytes: (8 << 30) - self.mem,
                ..MemorySample::default()
            },
            disks: vec![
                DiskSample {
                    mount: "/".into(),
                    total_bytes: 40_000_000_000,
                    used_bytes: self.disk,
                    available_bytes: 38_000_000_000 - self.disk,
                    read_bytes_per_sec: rng.random_range(0..3) * 4096,
                    written_bytes_per_sec: rng.random_range(0..40) * 4096,
                    ..DiskSample::default()
                },
                DiskSample {
                    mount: "/var/lib/docker".into(),
                    total_bytes: 100_000_000_000,
                    used_bytes: 15_000_000_000,
                    available_bytes: 80_000_000_000,
                    written_bytes_per_sec: rng.random_range(0..4) * 4096,
                    ..DiskSample::default()
                },
            ],
            networks: vec![
                NetworkSample {
                    interface: "eth0".into(),
                    rx_bytes_per_sec: self.rx as u64,
                    tx_bytes_per_sec: (self.rx * 0.6) as u64,
                    ..NetworkSample::default()
                },
                NetworkSample {
                    interface: "docker0".into(),
                    rx_bytes_per_sec: rng.random_range(0..2000),
                    tx_bytes_per_sec: rng.random_range(0..2000),
                    ..NetworkSample::default()
                },
            ],
            allocations: (0..2)
                .map(|k| AllocationUsage {
                    id: format!("web-{i}-{k}", i = 0),
                    cpu_percent: (self.cpu / 3.0) as f32,
                    memory_bytes: 100 << 20,
                    memory_limit_bytes: 256 << 20,
                    rx_bytes_per_sec: self.rx as u64 / 3,
                    tx_bytes_per_sec: self.rx as u64 / 5,
                })
                .collect(),
            ..NodeSample::default()
        }
    }
}

fn percentiles(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    (at(0.5), at(0.99), v[v.len() - 1])
}

/// Writes `node_hours` of one node and the last hour of `nodes` nodes, ending
/// at `end`, rolls them up and prints what it took.
fn write_fleet(h: &MetricsHistory, end: i64, nodes: usize, node_hours: i64) -> anyhow::Result<()> {
    let hour = 3_600_000i64;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let written = Instant::now();
    let mut one = Walk::new(&mut rng);
    for i in 0..(node_hours * 3600) as usize {
        let t = end - node_hours * hour + i as i64 * 1000;
        h.record("n0", &one.step(&mut rng, t, i));
    }
    let mut walks: Vec<Walk> = (1..nodes).map(|_| Walk::new(&mut rng)).collect();
    for s in 0..3600usize {
        let t = end - hour + s as i64 * 1000;
        for (k, w) in walks.iter_mut().enumerate() {
            h.record(&format!("n{}", k + 1), &w.step(&mut rng, t, s));
        }
    }
    let write_secs = written.elapsed().as_secs_f64();
    let rolled = Instant::now();
    h.db().maintain(now_ms())?;
    let roll_secs = rolled.elapsed().as_secs_f64();
    let stats = h.stats();
    println!(
        "{}",
        serde_json::json!({
            "bench": "history_query_setup", "nodes": nodes, "node_hours": node_hours,
            "write_secs": write_secs, "rollup_secs": roll_secs,
            "disk_bytes": stats.disk_bytes, "disk_values": stats.disk_values,
            "disk_bytes_per_value": stats.disk_bytes_per_value, "rollup_bytes": stats.rollup_bytes,
        })
    );
    Ok(())
}

/// The history of `--dir` for `query` and `alerts`: written afresh (`--nodes`,
/// `--node-hours`, default `default_hours`), or with `--reuse` the one an
/// earlier run of the same arguments wrote (its end is kept beside it).
/// Answers it with the end of its data: the start of the previous hour, so
/// every hour is rolled up.
fn prepare(args: &[String], default_hours: i64) -> anyhow::Result<(MetricsHistory, i64)> {
    let dir = PathBuf::from(arg(args, "--dir", "/tmp/history-bench-query".to_string()));
    let nodes: usize = arg(args, "--nodes", 1000);
    let node_hours: i64 = arg(args, "--node-hours", default_hours);
    let hour = 3_600_000i64;
    let marker = dir.join("bench-end");
    let kept: Option<i64> = args
        .iter()
        .any(|a| a == "--reuse")
        .then(|| std::fs::read_to_string(&marker).ok()?.trim().parse().ok())
        .flatten();
    if kept.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    std::fs::create_dir_all(&dir)?;
    let h = open(&dir)?;
    h.set_jobs(std::sync::Arc::new(|_: &str| Some("web".to_string())));
    let end = match kept {
        Some(end) => end,
        None => {
            let end = (now_ms() / hour - 1) * hour;
            write_fleet(&h, end, nodes, node_hours)?;
            std::fs::write(&marker, end.to_string())?;
            end
        }
    };
    Ok((h, end))
}

fn query(args: &[String]) -> anyhow::Result<()> {
    let nodes: usize = arg(args, "--nodes", 1000);
    let runs: usize = arg(args, "--runs", 50);
    let hour = 3_600_000i64;
    let (h, end) = prepare(args, 24)?;
    let cases: Vec<(&str, MetricsQuery)> = vec![
        (
            "one node, 24 h at 1 min",
            MetricsQuery {
                metric: "cpu_percent".into(),
                node: Some("n0".into()),
                from: Some((end - 24 * hour).to_string()),
                to: Some((end - 1).to_string()),
                step: Some("1m".into()),
                ..MetricsQuery::default()
            },
        ),
        (
            "fleet CPU mean, 1 h at 15 s, 1-minute rollups",
            MetricsQuery {
                metric: "cpu_percent".into(),
                from: Some((end - hour).to_string()),
                to: Some((end - 1).to_string()),
                step: Some("15s".into()),
                agg: Some(SeriesAgg::Mean),
                resolution: Some("1m".into()),
                ..MetricsQuery::default()
            },
        ),
        (
            "fleet CPU mean, 1 h at 15 s, raw",
            MetricsQuery {
                metric: "cpu_percent".into(),
                from: Some((end - hour).to_string()),
                to: Some((end - 1).to_string()),
                step: Some("15s".into()),
                agg: Some(SeriesAgg::Mean),
                resolution: Some("raw".into()),
                ..MetricsQuery::default()
            },
        ),
    ];
    for (name, q) in cases {
        let mut times = Vec::with_capacity(runs);
        let mut resolution = String::new();
        let mut series = 0;
        for _ in 0..runs {
            let t = Instant::now();
            let r = h
                .query(&q, &|_| true, SystemTime::now())
                .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            resolution = r.resolution;
            series = r.series.len();
        }
        let (p50, p99, max) = percentiles(times);
        println!(
            "{}",
            serde_json::json!({
                "bench": "history_query", "query": name, "nodes": nodes, "runs": runs,
                "resolution": resolution, "series": series,
                "p50_ms": p50, "p99_ms": p99, "max_ms": max,
            })
        );
    }
    // What the autoscaler and right-sizing read per node: its last hour
    // rebuilt as samples (`MetricsHistory::window`, seven queries at 1 s).
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(end).unwrap_or(0));
    let mut times = Vec::with_capacity(runs);
    let mut samples = 0;
    for _ in 0..runs {
        let t = Instant::now();
        let w = h.window("n1", u64::try_from(end - hour).unwrap_or(0), at);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        samples = w.samples.len();
    }
    let (p50, p99, max) = percentiles(times);
    println!(
        "{}",
        serde_json::json!({
            "bench": "history_query", "query": "one node's window, 1 h at 1 s (autoscaler, right-sizing)",
            "nodes": nodes, "runs": runs, "samples": samples,
            "p50_ms": p50, "p99_ms": p99, "max_ms": max,
        })
    );
    h.close();
    Ok(())
}

/// `alerts --dir D --nodes N [--node-hours H] [--runs R] [--reuse]`: the
/// alert evaluation over N nodes' history (written as `query` does, or reused):
/// 1,000 instant-threshold rules, then 100 range rules (`avg`/`max` over
/// windows of 1 to 10 minutes, `for: 5m`), each set on a fresh `Alerts` with
/// the built-in rules. Per run: the facts (one history query per distinct
/// series and function, `alert_eval::history_values`), then `Alerts::evaluate`
/// (every rule on every node, states and events into a memory store). `now` is
/// the end of the written data.
fn alerts(args: &[String]) -> anyhow::Result<()> {
    use novacron_common::alert::catalog::{self, Source};
    use novacron_common::alert::expr::{Subject, ValueRef};
    use novacron_controller::services::alert_eval::history_values;
    use novacron_controller::services::alerts::facts::Facts;
    use novacron_controller::services::alerts::{AlertSettings, Alerts};
    use novacron_controller::services::events::EventLog;
    use novacron_controller::state::store::{MemoryStore, Store};
    use std::collections::{BTreeMap, BTreeSet};

    let nodes: usize = arg(args, "--nodes", 1000);
    let runs: usize = arg(args, "--runs", 5);
    let (h, end) = prepare(args, 1)?;
    let now = SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(end).unwrap_or(0));
    let doc = |name: String, condition: String, for_: &str| {
        format!(
            "apiVersion: novacron.io/v1\nkind: AlertRule\nmetadata:\n  name: {name}\nspec:\n  condition: {condition}\n  for: {for_}\n---\n"
        )
    };
    let metrics = ["cpu_percent", "memory_percent", "disk_percent", "load1"];
    let instant: String = (0..1000)
        .map(|i| {
            let m = metrics[i % metrics.len()];
            doc(
                format!("instant-{i}"),
                format!("node.{m} > {}", 90 + i % 10),
                "1m",
            )
        })
        .collect();
    let range: String = (0..100)
        .map(|i| {
            let w = 1 + i % 10;
            doc(
                format!("range-{i}"),
                format!(
                    "avg(node.cpu_percent, {w}m) > {} and max(node.memory_percent, {w}m) > 50",
                    80 + i % 20
                ),
                "5m",
            )
        })
        .collect();
    let names: Vec<String> = (0..nodes).map(|i| format!("n{i}")).collect();
    for (set, text) in [
        ("1000 instant-threshold rules", instant),
        ("100 range rules", range),
    ] {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let events = Arc::new(EventLog::open(store.clone(), 10_000)?);
        let a = Alerts::open(
            store,
            events,
            AlertSettings::default(),
            "https://bench".into(),
        )?;
        a.apply_rules("bench.yaml", &text, "bench", now)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let needed: BTreeSet<ValueRef> = a
            .rules()
            .iter()
            .flat_map(|r| r.expr.values().into_iter().cloned())
            .collect();
        let (mut fetch, mut eval) = (Vec::new(), Vec::new());
        let (mut queries, mut active) = (0, 0);
        for _ in 0..runs {
            let t = Instant::now();
            let mut f = Facts::default();
            let subjects = f.subjects.entry(Subject::Node).or_default();
            for n in &names {
                subjects.insert(n.clone(), BTreeMap::from([("node".to_string(), n.clone())]));
            }
            let from_history: Vec<(&ValueRef, &str)> = needed
                .iter()
                .filter_map(|v| match catalog::find(v.subject, &v.metric)?.source {
                    Source::History(series) => Some((v, series)),
                    Source::State => None,
                })
                .collect();
            queries = history_values(&h, &mut f, &from_history, now);
            fetch.push(t.elapsed().as_secs_f64() * 1000.0);
            let t = Instant::now();
            a.evaluate(&f, now)?;
            eval.push(t.elapsed().as_secs_f64() * 1000.0);
            active = a.active(now).len();
        }
        let (f50, _, fmax) = percentiles(fetch);
        let (e50, _, emax) = percentiles(eval);
        println!(
            "{}",
            serde_json::json!({
                "bench": "alert_evaluation", "rules": set, "nodes": nodes, "runs": runs,
                "history_queries": queries, "active_alerts": active,
                "facts_p50_ms": f50, "facts_max_ms": fmax,
                "evaluate_p50_ms": e50, "evaluate_max_ms": emax,
                "round_p50_ms": f50 + e50,
            })
        );
    }
    h.close();
    Ok(())
}

/// `copy --dir D --to D2`: a follower's first copy of the history in D (as
/// `query` wrote it) into the empty D2, through `History::read_file` and
/// `Mirror::sync` in 4 MiB pieces (the API's, without HTTP and TLS); then a
/// second round, which finds nothing to fetch.
fn copy(args: &[String]) -> anyhow::Result<()> {
    let dir = PathBuf::from(arg(args, "--dir", "/tmp/history-bench-query".to_string()));
    let to = PathBuf::from(arg(args, "--to", "/tmp/history-bench-copy".to_string()));
    let _ = std::fs::remove_dir_all(&to);
    let h = open(&dir)?;
    let mut mirror = novacron_tsdb::mirror::Mirror::open(&to)?;
    let piece = novacron_controller::http::history::FILE_PIECE;
    let mut fetches = 0u64;
    let mut fetch = |(tier, start): novacron_tsdb::mirror::FileKey, offset: u64, last| {
        fetches += 1;
        h.db()
            .read_file(tier, start, offset, last, piece)
            .map_err(|e| novacron_tsdb::mirror::FetchError::Failed(e.to_string()))
    };
    let files = h.db().files();
    let total: u64 = files.iter().map(|f| f.len).sum();
    let t = Instant::now();
    let first = mirror
        .sync(&files, &mut fetch, &|| false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let first_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let second = mirror
        .sync(&h.db().files(), &mut fetch, &|| false)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let second_ms = t.elapsed().as_secs_f64() * 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "bench": "history_copy", "files": files.len(), "bytes": total,
            "copied_bytes": first.bytes, "whole_files": first.whole, "fetches": fetches,
            "first_secs": first_secs, "mb_per_sec": total as f64 / 1e6 / first_secs,
            "second_round_ms": second_ms, "second_round_bytes": second.bytes,
        })
    );
    h.close();
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("real") => real(&args),
        Some("query") => query(&args),
        Some("copy") => copy(&args),
        Some("alerts") => alerts(&args),
        _ => {
            eprintln!(
                "usage: novacron-history-bench real --dir D --seconds N [--interval 1s]\n       novacron-history-bench query --dir D [--nodes 1000] [--node-hours 24] [--runs 50] [--reuse]\n       novacron-history-bench copy --dir D --to D2\n       novacron-history-bench alerts --dir D [--nodes 1000] [--node-hours 1] [--runs 5] [--reuse]"
            );
            std::process::exit(64);
        }
    }
}

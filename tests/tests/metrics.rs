//! Prometheus `/metrics` end to end: a controller and two agents on loopback, a job
//! running in the real Docker daemon, and a scrape checked line by line, against the
//! nodes' own reports and through `promtool check metrics` (Debian's `prometheus`
//! package); then the metrics history's own health, with remote write to a
//! receiver on loopback and with the history off.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use novacron_common::tls;
use novacron_common::wire::AllocState;
use novacron_controller::metrics::{OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, series_names};
use novacron_tests::{
    Agent, Controller, JobCleanup, TEST_IMAGE, ensure_test_image, host_mem_total, wait_for,
};
use reqwest::StatusCode;

/// What Prometheus 2.x sends.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

type Labels = BTreeMap<String, String>;

/// A parsed scrape: families by name (with their type) and samples.
#[derive(Debug, Default)]
struct Scrape {
    types: BTreeMap<String, String>,
    samples: Vec<(String, Labels, f64)>,
}

impl Scrape {
    /// Parses the text exposition strictly: every line is a known comment or a
    /// sample of a declared family with a numeric value; panics otherwise.
    fn parse(text: &str, openmetrics: bool) -> Scrape {
        let mut s = Scrape::default();
        let mut helped = BTreeSet::new();
        let lines: Vec<&str> = text.lines().collect();
        if openmetrics {
            assert_eq!(lines.last(), Some(&"# EOF"), "OpenMetrics ends with # EOF");
        }
        for (i, line) in lines.iter().enumerate() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP name text");
                assert!(!help.trim().is_empty(), "empty help for {name}");
                helped.insert(name.to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name type");
                assert!(helped.contains(name), "TYPE before HELP for {name}");
                assert!(
                    s.types.insert(name.to_string(), kind.to_string()).is_none(),
                    "{name} declared twice"
                );
            } else if *line == "# EOF" {
                assert_eq!(i + 1, lines.len(), "# EOF is the last line");
            } else {
                assert!(!line.starts_with('#'), "unexpected comment: {line}");
                let (name, labels, value) = parse_sample(line);
                let declared = ["", "_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .filter_map(|suffix| name.strip_suffix(suffix))
                    .any(|base| s.types.contains_key(base));
                assert!(declared, "sample of an undeclared family: {line}");
                s.samples.push((name, labels, value));
            }
        }
        s
    }

    fn find(&self, name: &str, want: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, labels, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
    }

    fn get(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.find(name, want)
            .unwrap_or_else(|| panic!("no sample {name} {want:?}"))
    }
}

fn parse_sample(line: &str) -> (String, Labels, f64) {
    let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("bad value in {line}")),
    };
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (
            name,
            parse_labels(rest.strip_suffix('}').expect("labels end with }")),
        ),
        None => (series, Labels::new()),
    };
    assert!(
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':'),
        "bad metric name in {line}"
    );
    (name.to_string(), labels, value)
}

fn parse_labels(text: &str) -> Labels {
    let mut labels = Labels::new();
    let mut chars = text.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        assert!(
            key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "bad label name {key:?}"
        );
        assert_eq!(chars.next(), Some('"'), "label {key} opens a quote");
        let mut value = String::new();
        loop {
            match chars.next().expect("closing quote") {
                '\\' => match chars.next().expect("escaped char") {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    c => panic!("bad escape \\{c}"),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        assert!(
            labels.insert(key, value).is_none(),
            "label repeated in {text}"
        );
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    labels
}

/// Runs `promtool check metrics`; fails loudly when promtool is not installed.
fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool is needed to check /metrics ({e}); install it with `apt-get install -y prometheus`"
            )
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

/// `GET /metrics` with `accept`; returns the content type and the body.
async fn scrape(
    client: &reqwest::Client,
    c: &Controller,
    accept: Option<&str>,
) -> (String, String) {
    let mut req = client.get(format!("{}/metrics", c.api()));
    if let Some(a) = accept {
        req = req.header(reqwest::header::ACCEPT, a);
    }
    let resp = req.send().await.expect("scrape");
    assert_eq!(resp.status(), StatusCode::OK);
    let ct = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (ct, resp.text().await.expect("body"))
}

fn service(name: &str, memory: &str) -> String {
    format!(
        "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: {name}
spec:
  type: service
  replicas: 2
  task:
    image: {TEST_IMAGE}
    command: [sh, -c, 'while true; do sleep 1; done']
  resources:
    cpu: 100m
    memory: {memory}
"
    )
}

#[tokio::test]
async fn metrics_show_every_node_and_allocation_and_pass_promtool() {
    ensure_test_image().expect("test image");
    let dir = tempfile::Builder::new()
        .prefix("novacron-metrics-")
        .tempdir()
        .expect("tempdir");
    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let mut agents = Vec::new();
    for (i, zone) in ["a", "b"].iter().enumerate() {
        let name = format!("m{}-{i}", std::process::id());
        let label = format!("zone={zone}");
        agents.push(
            Agent::join_and_run(dir.path(), &c, &name, &["--label", &label])
                .await
                .expect("agent"),
        );
    }
    let job = format!("metered-{}", std::process::id());
    let _cleanup = JobCleanup(job.clone());
    c.apply("metered.yaml", &service(&job, "32Mi"))
        .await
        .expect("apply");
    // Both replicas run, and each node's latest sample carries their usage.
    wait_for(
        Duration::from_secs(45),
        "2 running replicas with usage",
        || async {
            let Ok(detail) = c.job(&job).await else {
                return false;
            };
            let running: Vec<_> = detail
                .allocations
                .iter()
                .filter(|a| a.desired_run && a.state == AllocState::Running)
                .collect();
            if running.len() != 2 {
                return false;
            }
            for a in running {
                let Ok(Some(view)) = c.node(&a.node).await else {
                    return false;
                };
                let reported = view.latest.as_ref().is_some_and(|s| {
                    s.allocations
                        .iter()
                        .any(|u| u.id == a.id && u.memory_bytes > 0)
                });
                if !reported {
                    return false;
                }
            }
            true
        },
    )
    .await
    .expect("running with usage");

    let admin = c.admin_client().expect("admin client");
    let (ct, om) = scrape(&admin, &c, Some(PROMETHEUS_ACCEPT)).await;
    assert_eq!(ct, OPENMETRICS_CONTENT_TYPE);
    let s = Scrape::parse(&om, true);

    // Per node: status, labels, and the values of its latest sample.
    for agent in &agents {
        let view = c.node(&agent.name).await.expect("node").expect("enrolled");
        let latest = view.latest.as_ref().expect("a sample");
        let node = [("node", agent.name.as_str())];
        let zone = view.labels.get("zone").expect("zone label").as_str();
        let status = |st: &str| {
            s.get(
                "novacron_node_status",
                &[
                    ("node", agent.name.as_str()),
                    ("status", st),
                    ("zone", zone),
                ],
            )
        };
        assert_eq!(
            (status("ready"), status("disconnected"), status("down")),
            (1.0, 0.0, 0.0)
        );
        assert_eq!(
            s.get("novacron_node_memory_total_bytes", &node),
            host_mem_total() as f64,
            "memory total of {} is the host's MemTotal",
            agent.name
        );
        assert_eq!(
            s.get("novacron_node_memory_total_bytes", &node),
            latest.memory.total_bytes as f64
        );
        assert_eq!(
            s.get("novacron_node_cpu_cores", &node),
            latest.cpu.per_core_percent.len() as f64
        );
        assert_eq!(
            s.get("novacron_node_cpu_capacity_cores", &node),
            view.capacity.cpu_millis as f64 / 1000.0
        );
        assert_eq!(
            s.get("novacron_node_memory_capacity_bytes", &node),
            view.capacity.memory_bytes as f64
        );
        let usage = s.get("novacron_node_cpu_usage_ratio", &node);
        assert!((0.0..=1.0).contains(&usage), "cpu usage ratio {usage}");
        let used = s.get("novacron_node_memory_used_bytes", &node);
        assert!(used > 0.0 && used <= host_mem_total() as f64, "{used}");
        assert_eq!(
            s.get(
                "novacron_node_info",
                &[("node", agent.name.as_str()), ("zone", zone)]
            ),
            1.0
        );
        assert_eq!(
            s.get("novacron_node_gpus", &node),
            view.capacity.gpus.len() as f64
        );
        let seen = s.get("novacron_node_sample_timestamp_seconds", &node);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        assert!(
            (now - seen).abs() < 30.0,
            "sample taken at {seen}, now {now}"
        );
        // Every mounted filesystem the node reported.
        for d in &latest.disks {
            let fs = [
                ("node", agent.name.as_str()),
                ("mountpoint", d.mount.as_str()),
            ];
            assert!(
                s.find("novacron_node_filesystem_size_bytes", &fs).is_some(),
                "no filesystem gauge for {} on {}",
                d.mount,
                agent.name
            );
        }
        assert_eq!(
            s.samples
                .iter()
                .filter(|(n, l, _)| n == "novacron_node_gpu_utilization_ratio"
                    && l.get("node") == Some(&agent.name))
                .count(),
            latest.gpus.len()
        );
    }

    // Per allocation: reservation, state and usage.
    let detail = c.job(&job).await.expect("job");
    let running: Vec<_> = detail
        .allocations
        .iter()
        .filter(|a| a.desired_run && a.state == AllocState::Running)
        .collect();
    assert_eq!(running.len(), 2);
    for a in running {
        let alloc = [
            ("alloc", a.id.as_str()),
            ("novacron_job", job.as_str()),
            ("node", a.node.as_str()),
        ];
        assert_eq!(
            s.get(
                "novacron_allocation_state",
                &[("alloc", a.id.as_str()), ("state", "running")]
            ),
            1.0
        );
        assert_eq!(
            s.get("novacron_allocation_cpu_requested_cores", &alloc),
            0.1
        );
        assert_eq!(
            s.get("novacron_allocation_memory_requested_bytes", &alloc),
            f64::from(32u32 << 20)
        );
        assert_eq!(
            s.get("novacron_allocation_memory_limit_bytes", &alloc),
            f64::from(32u32 << 20)
        );
        let mem = s.get("novacron_allocation_memory_usage_bytes", &alloc);
        assert!(mem > 0.0 && mem <= f64::from(32u32 << 20), "{mem}");
        let cpu = s.get("novacron_allocation_cpu_usage_cores", &alloc);
        assert!(cpu >= 0.0, "{cpu}");
    }
    // The two replicas' reservations show on their nodes.
    let reserved: f64 = s
        .samples
        .iter()
        .filter(|(n, _, _)| n == "novacron_node_cpu_allocated_cores")
        .map(|(_, _, v)| v)
        .sum();
    assert!((reserved - 0.2).abs() < 1e-9, "{reserved}");

    // Controller internals.
    assert_eq!(s.get("novacron_connected_agents", &[]), 2.0);
    assert!(s.get("novacron_samples_ingested_total", &[]) > 0.0);
    assert!(s.get("novacron_scheduling_pass_duration_seconds_count", &[]) > 0.0);
    assert!(
        s.get(
            "novacron_scheduling_pass_duration_seconds_bucket",
            &[("le", "+Inf")]
        ) > 0.0
    );
    assert_eq!(s.get("novacron_scheduling_placements_total", &[]), 2.0);
    assert_eq!(s.get("novacron_scheduling_unplaced_replicas", &[]), 0.0);
    assert_eq!(s.get("novacron_allocations", &[("state", "running")]), 2.0);
    assert_eq!(s.get("novacron_jobs", &[("status", "running")]), 1.0);
    assert_eq!(
        s.get("novacron_job_replicas_running", &[("novacron_job", &job)]),
        2.0
    );
    assert!(s.get("novacron_events_total", &[]) > 0.0);
    assert!(s.get("novacron_ingest_latency_seconds_count", &[]) > 0.0);
    assert!(s.get("novacron_ingest_latency_seconds_bucket", &[("le", "+Inf")]) > 0.0);
    // The metrics history (on by default) holds the agents' samples.
    assert_history_is_healthy(&s);
    assert!(
        !s.types
            .keys()
            .any(|n| n.starts_with("novacron_remote_write_")),
        "remote write is not configured"
    );
    // The controller process, as Prometheus' own clients describe theirs.
    assert!(s.get("process_cpu_seconds_total", &[]) > 0.0);
    assert!(s.get("process_resident_memory_bytes", &[]) > 0.0);
    assert!(s.get("process_open_fds", &[]) > 0.0);
    let started = s.get("process_start_time_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        started <= now && now - started < 600.0,
        "the controller started at {started}, now {now}"
    );
    // No series carries a label Prometheus would rename (`job`, `instance`).
    for (name, labels, _) in &s.samples {
        assert!(
            !labels.contains_key("job") && !labels.contains_key("instance"),
            "{name} {labels:?}"
        );
    }

    // The text format: the same samples, and promtool accepts it.
    let (ct, text) = scrape(&admin, &c, None).await;
    assert_eq!(ct, TEXT_CONTENT_TYPE);
    let t = Scrape::parse(&text, false);
    assert!(t.types.keys().all(|n| !n.is_empty()));
    let (ok, report) = promtool_check(&text);
    assert!(
        ok,
        "promtool check metrics failed:\n{report}\n--- input ---\n{text}"
    );
    println!("promtool check metrics: ok {report}");

    // The Grafana dashboard selects only what this controller announces.
    let exported = series_names(&text);
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../packaging/grafana/novacron-dashboard.json"),
    )
    .expect("the dashboard");
    let names: BTreeSet<&str> = dashboard
        .split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_'))
        .filter(|w| w.starts_with("novacron_") && *w != "novacron_job")
        .collect();
    assert!(names.len() > 20, "{names:?}");
    for name in names {
        assert!(
            exported.contains(name),
            "the dashboard uses {name}, which /metrics does not announce"
        );
    }

    // A job that cannot fit waits in the pending queue.
    let big = format!("toobig-{}", std::process::id());
    let _cleanup_big = JobCleanup(big.clone());
    c.apply("toobig.yaml", &service(&big, "64Ti"))
        .await
        .expect("apply");
    wait_for(Duration::from_secs(15), "unplaced replicas", || async {
        let (_, text) = scrape(&admin, &c, None).await;
        let s = Scrape::parse(&text, false);
        s.find("novacron_scheduling_unplaced_replicas", &[]) == Some(2.0)
            && s.find("novacron_jobs", &[("status", "blocked")]) == Some(1.0)
    })
    .await
    .expect("pending queue");
}

/// The metrics history's families in a scrape of a controller whose agents have
/// sent samples: their types, and values a fresh history has.
fn assert_history_is_healthy(s: &Scrape) {
    for (name, kind) in [
        ("novacron_history_head_bytes", "gauge"),
        ("novacron_history_head_budget_bytes", "gauge"),
        ("novacron_history_head_series", "gauge"),
        ("novacron_history_disk_bytes", "gauge"),
        ("novacron_history_values_appended", "counter"),
        ("novacron_history_budget_evictions", "counter"),
        ("novacron_history_dropped_chunks", "counter"),
        ("novacron_history_late_points", "counter"),
        ("novacron_history_corrupt_chunks", "counter"),
    ] {
        assert_eq!(s.types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    let budget = s.get("novacron_history_head_budget_bytes", &[]);
    assert_eq!(budget, f64::from(128u32 << 20), "the default head budget");
    let head = s.get("novacron_history_head_bytes", &[]);
    assert!(head > 0.0 && head <= budget, "head {head} of {budget}");
    assert!(s.get("novacron_history_head_series", &[]) > 0.0);
    assert!(s.get("novacron_history_values_appended_total", &[]) > 0.0);
    for tier in ["raw", "rollup"] {
        let bytes = s.get("novacron_history_disk_bytes", &[("tier", tier)]);
        assert!(bytes >= 0.0, "{tier}: {bytes}");
    }
    for sound in [
        "novacron_history_budget_evictions_total",
        "novacron_history_dropped_chunks_total",
        "novacron_history_corrupt_chunks_total",
    ] {
        assert_eq!(s.get(sound, &[]), 0.0, "{sound}");
    }
    assert!(s.get("novacron_history_late_points_total", &[]) >= 0.0);
}

/// A remote_write receiver on loopback that accepts every request (204) and
/// counts them; returns its URL.
async fn remote_write_receiver(requests: Arc<AtomicU64>) -> String {
    let app = axum::Router::new().route(
        "/api/v1/write",
        axum::routing::post(move |body: axum::body::Bytes| async move {
            assert!(!body.is_empty(), "an empty remote_write request");
            requests.fetch_add(1, Ordering::Relaxed);
            StatusCode::NO_CONTENT
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the receiver");
    let addr = listener.local_addr().expect("the receiver's address");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}/api/v1/write")
}

#[tokio::test]
async fn metrics_show_the_history_and_remote_write_health_and_pass_promtool() {
    let dir = tempfile::Builder::new()
        .prefix("novacron-metrics-history-")
        .tempdir()
        .expect("tempdir");
    let requests = Arc::new(AtomicU64::new(0));
    let url = remote_write_receiver(requests.clone()).await;
    let config = dir.path().join("controller.toml");
    std::fs::write(
        &config,
        format!("[history.remote_write]\nurl = \"{url}\"\ninterval = \"200ms\"\n"),
    )
    .expect("write controller.toml");
    let config = config.to_str().expect("UTF-8 path");
    let c = Controller::start(dir.path(), &["--config", config])
        .await
        .expect("controller");
    let name = format!("mh{}", std::process::id());
    let _agent = Agent::join_and_run(dir.path(), &c, &name, &["--interval", "200ms"])
        .await
        .expect("agent");
    let admin = c.admin_client().expect("admin client");
    // Samples reach the history and the receiver, which says so.
    wait_for(
        Duration::from_secs(30),
        "samples in the history and sent by remote write",
        || async {
            let (_, text) = scrape(&admin, &c, Some(PROMETHEUS_ACCEPT)).await;
            let s = Scrape::parse(&text, true);
            s.find("novacron_history_head_series", &[])
                .is_some_and(|v| v > 0.0)
                && s.find("novacron_remote_write_samples_sent_total", &[])
                    .is_some_and(|v| v > 0.0)
                && s.find("novacron_remote_write_last_success_timestamp_seconds", &[])
                    .is_some()
        },
    )
    .await
    .expect("history and remote write");
    assert!(requests.load(Ordering::Relaxed) > 0);

    let (_, om) = scrape(&admin, &c, Some(PROMETHEUS_ACCEPT)).await;
    let s = Scrape::parse(&om, true);
    assert_history_is_healthy(&s);
    for (name, kind) in [
        ("novacron_remote_write_samples_sent", "counter"),
        ("novacron_remote_write_samples_dropped", "counter"),
        ("novacron_remote_write_samples_failed", "counter"),
        ("novacron_remote_write_requests_failed", "counter"),
        ("novacron_remote_write_queued_samples", "gauge"),
        (
            "novacron_remote_write_last_success_timestamp_seconds",
            "gauge",
        ),
    ] {
        assert_eq!(s.types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    // The receiver accepts everything: nothing is dropped or refused.
    assert_eq!(
        s.get("novacron_remote_write_samples_dropped_total", &[]),
        0.0
    );
    assert_eq!(
        s.get("novacron_remote_write_samples_failed_total", &[]),
        0.0
    );
    assert!(s.get("novacron_remote_write_requests_failed_total", &[]) >= 0.0);
    assert!(s.get("novacron_remote_write_queued_samples", &[]) >= 0.0);
    let last = s.get("novacron_remote_write_last_success_timestamp_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        last <= now && now - last < 60.0,
        "last success at {last}, now {now}"
    );
    let (_, text) = scrape(&admin, &c, None).await;
    let (ok, report) = promtool_check(&text);
    assert!(
        ok,
        "promtool check metrics failed:\n{report}\n--- input ---\n{text}"
    );
}

#[tokio::test]
async fn metrics_leave_out_the_history_while_it_is_off() {
    let dir = tempfile::Builder::new()
        .prefix("novacron-metrics-nohistory-")
        .tempdir()
        .expect("tempdir");
    let config = dir.path().join("controller.toml");
    std::fs::write(&config, "[history]\nenabled = false\n").expect("write controller.toml");
    let config = config.to_str().expect("UTF-8 path");
    let c = Controller::start(dir.path(), &["--config", config])
        .await
        .expect("controller");
    let admin = c.admin_client().expect("admin client");
    let (_, text) = scrape(&admin, &c, None).await;
    let s = Scrape::parse(&text, false);
    assert_eq!(s.find("novacron_connected_agents", &[]), Some(0.0));
    let history: Vec<&String> = s
        .types
        .keys()
        .filter(|n| n.starts_with("novacron_history_") || n.starts_with("novacron_remote_write_"))
        .collect();
    assert!(
        history.is_empty(),
        "announced without a history: {history:?}"
    );
    let (ok, report) = promtool_check(&text);
    assert!(ok, "promtool check metrics failed:\n{report}");
}

#[tokio::test]
async fn metrics_need_a_viewer_certificate_or_token() {
    let dir = tempfile::Builder::new()
        .prefix("novacron-metrics-auth-")
        .tempdir()
        .expect("tempdir");
    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    // No credentials.
    tls::install_crypto_provider();
    let ca = std::fs::read_to_string(c.data_dir.join("pki/ca.pem")).expect("ca");
    let config = tls::client_config(&ca, None, &[b"h2", b"http/1.1"]).expect("tls");
    let anonymous = reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .build()
        .expect("client");
    let resp = anonymous
        .get(format!("{}/metrics", c.api()))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    // A viewer certificate.
    let out = c.ctl(&[
        "admin",
        "issue",
        "--name",
        "grafana",
        "--role",
        "viewer",
        "--out",
        dir.path().to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let viewer = c
        .client_with(
            &dir.path().join("grafana.pem"),
            &dir.path().join("grafana-key.pem"),
        )
        .expect("client");
    let (_, text) = scrape(&viewer, &c, None).await;
    assert!(Scrape::parse(&text, false).find("novacron_connected_agents", &[]) == Some(0.0));

    // A viewer API token, as Prometheus would send it.
    let out = c.ctl(&["admin", "token", "--name", "prometheus", "--role", "viewer"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let resp = anonymous
        .get(format!("{}/metrics", c.api()))
        .bearer_auth(&token)
        .header(reqwest::header::ACCEPT, PROMETHEUS_ACCEPT)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.text().await.expect("body");
    Scrape::parse(&body, true);
}

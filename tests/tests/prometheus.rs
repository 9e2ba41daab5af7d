//! A real Prometheus (Debian's `prometheus` package) scrapes a real controller with
//! the shipped scrape configuration (`packaging/prometheus/prometheus.yml`) and
//! loads the shipped alert rules; then every query of the shipped Grafana dashboard
//! must return data through Prometheus' HTTP API, and every rule must evaluate.
//! This is what issue 15 found broken: Prometheus renamed the series' `job` label
//! to `exported_job`, and the dashboard's per-job panels were empty.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use novacron_common::tls;
use novacron_common::wire::AllocState;
use novacron_tests::{
    Agent, Controller, JobCleanup, ensure_test_image, free_port, service_job, wait_for,
};

/// Kills and reaps Prometheus when dropped, also when the test fails.
struct Prometheus {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts `prometheus` on a free loopback port with `config`, its storage in
    /// `dir`; fails naming the setup step when the binary is missing.
    fn start(dir: &Path, config: &Path) -> Prometheus {
        let port = free_port();
        let log = dir.join("prometheus.log");
        let out = std::fs::File::create(&log).expect("prometheus log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "prometheus is needed ({e}): `bash .ci/setup` installs it (Debian package prometheus)"
                )
            });
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /api/v1/query`: the result vector (or matrix, or scalar) of `query`.
    async fn query(
        &self,
        http: &reqwest::Client,
        query: &str,
    ) -> Result<serde_json::Value, String> {
        let url = format!("{}/api/v1/query?query={}", self.url, percent_encode(query));
        let resp = http.get(url).send().await.map_err(|e| e.to_string())?;
        let body: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(format!("{query}: {body}"));
        }
        Ok(body["data"]["result"].clone())
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Every PromQL text of the dashboard (panel targets; variable definitions,
/// `label_values(metric, label)`, become `count by (label) (metric)`).
fn dashboard_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(q)) => out.push(q.clone()),
                    _ => dashboard_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

/// The dashboard's query as Prometheus runs it: Grafana's variables replaced, a
/// node and a job selected (as an operator picking them would).
fn as_promql(query: &str, node: &str, job: &str) -> String {
    let q = query
        .replace("$__rate_interval", "1m")
        .replace("$node", node)
        .replace("$job", job);
    match q
        .strip_prefix("label_values(")
        .and_then(|rest| rest.strip_suffix(')'))
        .and_then(|args| args.split_once(','))
    {
        Some((metric, label)) => format!("count by ({}) ({})", label.trim(), metric.trim()),
        None => q,
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[tokio::test]
async fn prometheus_scrapes_the_controller_and_every_dashboard_query_has_data() {
    ensure_test_image().expect("test image");
    let dir = tempfile::Builder::new()
        .prefix("novacron-prometheus-")
        .tempdir()
        .expect("tempdir");
    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let name = format!("p{}", std::process::id());
    let agent = Agent::join_and_run(dir.path(), &c, &name, &["--label", "zone=a"])
        .await
        .expect("agent");
    let job = format!("scraped-{}", std::process::id());
    let _cleanup = JobCleanup(job.clone());
    c.apply(
        "scraped.yaml",
        &service_job(&job, 1, "while true; do sleep 1; done", "", ""),
    )
    .await
    .expect("apply");

    // The shipped configuration, pointed at this controller, scraping every second.
    let out = c.ctl(&["admin", "token", "--name", "prometheus", "--role", "viewer"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = dir.path().join("novacron.token");
    std::fs::write(&token, String::from_utf8_lossy(&out.stdout).trim()).expect("token file");
    let shipped = std::fs::read_to_string(root().join("packaging/prometheus/prometheus.yml"))
        .expect("the shipped scrape configuration");
    let rules = root().join("packaging/prometheus/novacron-rules.yml");
    let mut config = shipped.clone();
    for (from, to) in [
        ("scrape_interval: 15s", "scrape_interval: 1s".to_string()),
        (
            "evaluation_interval: 15s",
            "evaluation_interval: 1s".to_string(),
        ),
        (
            "/etc/prometheus/novacron-rules.yml",
            rules.display().to_string(),
        ),
        (
            "/etc/prometheus/novacron.token",
            token.display().to_string(),
        ),
        (
            "/etc/prometheus/novacron-ca.pem",
            c.data_dir.join("pki/ca.pem").display().to_string(),
        ),
        ("ctl.example.com:7443", format!("127.0.0.1:{}", c.port)),
    ] {
        assert!(
            shipped.contains(from),
            "the shipped configuration has no {from:?}"
        );
        config = config.replace(from, &to);
    }
    let config_path = dir.path().join("prometheus.yml");
    std::fs::write(&config_path, config).expect("prometheus.yml");
    let prom = Prometheus::start(dir.path(), &config_path);

    tls::install_crypto_provider();
    let http = reqwest::Client::new();
    let up = wait_for(Duration::from_secs(30), "a successful scrape", || async {
        prom.query(&http, "up{job=\"novacron\"} == 1")
            .await
            .is_ok_and(|r| r.as_array().is_some_and(|a| !a.is_empty()))
    })
    .await;
    assert!(
        up.is_ok(),
        "Prometheus never scraped the controller:\n{}",
        prom.log()
    );
    wait_for(Duration::from_secs(45), "the replica running", || async {
        c.job(&job).await.is_ok_and(|d| {
            d.allocations
                .iter()
                .any(|a| a.desired_run && a.state == AllocState::Running)
        })
    })
    .await
    .expect("running");

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("packaging/grafana/novacron-dashboard.json"))
            .expect("the dashboard"),
    )
    .expect("dashboard JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    assert!(queries.len() > 20, "found only {} queries", queries.len());
    // Without a GPU in the fleet, the per-GPU series have no samples.
    let gpus = c
        .node(&agent.name)
        .await
        .expect("node")
        .expect("enrolled")
        .capacity
        .gpus
        .len();
    let (queries, skipped): (Vec<String>, Vec<String>) = queries.into_iter().partition(|q| {
        gpus > 0 || !(q.contains("novacron_node_gpu_") || q.contains("novacron_allocation_gpu_"))
    });
    println!("skipped without a GPU: {skipped:#?}");

    let empty = Mutex::new(Vec::new());
    let all = wait_for(Duration::from_secs(60), "data for every query", || async {
        let mut missing = Vec::new();
        for q in &queries {
            match prom.query(&http, &as_promql(q, &agent.name, &job)).await {
                Ok(r) if r.as_array().is_some_and(|a| !a.is_empty()) => {}
                Ok(_) => missing.push(format!("no data: {q}")),
                Err(e) => missing.push(format!("error: {e}")),
            }
        }
        let done = missing.is_empty();
        *empty.lock().expect("lock") = missing;
        done
    })
    .await;
    assert!(
        all.is_ok(),
        "dashboard queries without data:\n{}",
        empty.lock().expect("lock").join("\n")
    );
    println!("{} dashboard queries return data", queries.len());

    // The recording rules over the node counters produce their rates.
    let rules_text = std::fs::read_to_string(&rules).expect("the rules file");
    let records: Vec<String> = rules_text
        .lines()
        .filter_map(|l| l.trim().trim_start_matches("- ").strip_prefix("record:"))
        .map(|r| r.trim().to_string())
        .collect();
    assert!(records.len() >= 5, "{records:?}");
    let missing_records = Mutex::new(Vec::new());
    let recorded = wait_for(Duration::from_secs(60), "every recorded rate", || async {
        let mut missing = Vec::new();
        for r in &records {
            let q = format!("{r}{{node=\"{}\"}}", agent.name);
            match prom.query(&http, &q).await {
                Ok(v) if v.as_array().is_some_and(|a| !a.is_empty()) => {}
                other => missing.push(format!("{r}: {other:?}")),
            }
        }
        let done = missing.is_empty();
        *missing_records.lock().expect("lock") = missing;
        done
    })
    .await;
    assert!(
        recorded.is_ok(),
        "recorded rates without data:\n{}",
        missing_records.lock().expect("lock").join("\n")
    );
    // A host's CPU time goes up: the busy ratio is a real fraction. Until two
    // scrapes have seen the counters move, the rule's 0/0 is NaN: wait for it.
    let ratio = std::sync::Mutex::new(f64::NAN);
    let _ = wait_for(Duration::from_secs(60), "a busy ratio", || {
        let (prom, http, agent, ratio) = (&prom, &http, &agent, &ratio);
        async move {
            let Ok(busy) = prom
                .query(
                    http,
                    &format!(
                        "node:novacron_node_cpu_busy:ratio_rate5m{{node=\"{}\"}}",
                        agent.name
                    ),
                )
                .await
            else {
                return false;
            };
            let value: f64 = busy[0]["value"][1]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or(f64::NAN);
            *ratio.lock().expect("lock") = value;
            !value.is_nan()
        }
    })
    .await;
    let ratio = *ratio.lock().expect("lock");
    assert!((0.0..=1.0).contains(&ratio), "busy ratio {ratio}");

    // Nothing Prometheus had to rename (issue 15: `job` became `exported_job`).
    for renamed in ["exported_job", "exported_instance"] {
        let r = prom
            .query(&http, &format!("count({{{renamed}!=\"\"}})"))
            .await
            .expect("query");
        assert_eq!(r, serde_json::json!([]), "series carry {renamed}");
    }

    // The shipped rules loaded and evaluate without errors (a group not yet
    // evaluated since loading says "unknown": wait for its first round).
    let last_rules = Mutex::new(serde_json::Value::Null);
    let healthy = wait_for(Duration::from_secs(30), "every rule evaluated", || async {
        let Ok(resp) = http.get(format!("{}/api/v1/rules", prom.url)).send().await else {
            return false;
        };
        let Ok(rules) = resp.json::<serde_json::Value>().await else {
            return false;
        };
        let loaded: Vec<&serde_json::Value> = rules["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        let ok = loaded.len() >= 5 && loaded.iter().all(|r| r["health"] == "ok");
        *last_rules.lock().expect("lock") = rules.clone();
        ok
    })
    .await;
    assert!(
        healthy.is_ok(),
        "rules not loaded or not healthy: {}",
        last_rules.lock().expect("lock")
    );
}

//! Cost and right-sizing end to end: a real agent runs an idle job; `novacron cost`
//! attributes the node's price to the job and `novacron recommend` shrinks its
//! requests from the usage the agent reported.

use std::time::Duration;

use novacron_tests::{Agent, Controller, JobCleanup, TEST_IMAGE, ensure_test_image, wait_for};

fn idle_job(name: &str) -> String {
    format!(
        "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: {name}
spec:
  type: service
  replicas: 1
  task:
    image: {TEST_IMAGE}
    command: [sh, -c, 'while true; do sleep 1; done']
  resources:
    cpu: 1000m
    memory: 256Mi
"
    )
}

/// A controller and one agent named `<agent><pid>` in a fresh directory.
async fn controller_and_agent(prefix: &str, agent: &str) -> (tempfile::TempDir, Controller, Agent) {
    ensure_test_image().expect("image");
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir");
    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let name = format!("{agent}{}", std::process::id());
    let a = Agent::join_and_run(dir.path(), &c, &name, &[])
        .await
        .expect("agent");
    (dir, c, a)
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[tokio::test]
async fn cost_attributes_node_prices_and_recommend_shrinks_an_idle_job() {
    ensure_test_image().expect("image");
    let dir = tempfile::Builder::new()
        .prefix("novacron-cost-")
        .tempdir()
        .expect("tempdir");
    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let name = format!("cost{}", std::process::id());
    let _agent = Agent::join_and_run(
        dir.path(),
        &c,
        &name,
        &["--label", "price_per_hour=0.5", "--label", "pool=batch"],
    )
    .await
    .expect("agent");
    let job = format!("idle{}", std::process::id());
    let _cleanup = JobCleanup(job.clone());
    c.apply("idle.yaml", &idle_job(&job)).await.expect("apply");
    wait_for(Duration::from_secs(60), "the job running", || async {
        c.job(&job).await.is_ok_and(|d| {
            d.allocations
                .iter()
                .any(|a| a.state == novacron_common::wire::AllocState::Running)
        })
    })
    .await
    .expect("running");

    let report = json(&c.cli(&["cost", "-o", "json"]));
    let node = report["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["node"] == name.as_str())
        .expect("our node")
        .clone();
    assert_eq!(node["hourly"], 0.5);
    assert_eq!(node["pool"], "batch");
    let job_cost = report["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .find(|j| j["name"] == job.as_str())
        .expect("our job")["hourly"]
        .as_f64()
        .expect("number");
    assert!(job_cost > 0.0 && job_cost <= 0.5, "{job_cost}");

    // 30 samples of the allocation's usage (one a second) make a recommendation.
    let mut recs = serde_json::Value::Null;
    wait_for(Duration::from_secs(90), "a recommendation", || {
        let out = c.cli(&["recommend", "-o", "json"]);
        let v = json(&out);
        let found = v
            .as_array()
            .is_some_and(|a| a.iter().any(|r| r["job"] == job.as_str()));
        if found {
            recs = v;
        }
        async move { found }
    })
    .await
    .expect("recommendation");
    let rec = recs
        .as_array()
        .expect("list")
        .iter()
        .find(|r| r["job"] == job.as_str())
        .expect("ours")
        .clone();
    let r = &rec["rightsize"];
    assert_eq!(r["requested_cpu_millis"], 1000);
    let recommended = r["recommended_cpu_millis"].as_u64().expect("cpu");
    assert!(recommended < 1000, "a sleeping shell needs far less: {rec}");
    assert_eq!(r["idle"], true, "{rec}");
    assert!(
        rec["hourly_recommended"].as_f64() < rec["hourly_now"].as_f64(),
        "{rec}"
    );
    // The only node holds the job: consolidation has nowhere to move it.
    let plan = json(&c.cli(&["consolidate", "-o", "json"]));
    assert_eq!(plan["retire"], serde_json::json!([]), "{plan}");
    let table = c.cli(&["recommend"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("1000m →"));
}

/// Costs name their currency: the pricing catalog's `currency` (USD unless set)
/// is in the API's cost views and in the CLI's output, and its budget messages.
#[tokio::test]
async fn costs_name_the_catalogs_currency() {
    let dir = tempfile::Builder::new()
        .prefix("novacron-currency-")
        .tempdir()
        .expect("tempdir");
    let mut c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let report = json(&c.cli(&["cost", "-o", "json"]));
    assert_eq!(report["currency"], "USD", "the default: {report}");

    std::fs::write(
        c.data_dir.join("pricing.toml"),
        "currency = \"EUR\"\n[budgets]\nfleet_per_hour = 2.5\n",
    )
    .expect("pricing.toml");
    c.stop().await;
    c.restart().await.expect("restart");
    let report = json(&c.cli(&["cost", "-o", "json"]));
    assert_eq!(report["currency"], "EUR", "{report}");
    let budget = &report["budgets"][0];
    assert!(
        budget["message"]
            .as_str()
            .is_some_and(|m| m.contains("0.00 EUR/h") && m.contains("2.50 EUR/h")),
        "{budget}"
    );
    let plan = json(&c.cli(&["consolidate", "-o", "json"]));
    assert_eq!(plan["currency"], "EUR", "{plan}");
    let table = c.cli(&["cost"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.starts_with("fleet: 0.0000 EUR per hour (amounts in EUR)")
            && text.contains("nodes (EUR):")
            && text.contains("budgets (EUR):"),
        "{text}"
    );

    // A currency that is not an ISO 4217 code stops the controller at start,
    // naming the key.
    std::fs::write(c.data_dir.join("pricing.toml"), "currency = \"euro\"\n").expect("write");
    c.stop().await;
    let out = std::process::Command::new(novacron_tests::bin("novacron-controller"))
        .arg("--data-dir")
        .arg(&c.data_dir)
        .args([
            "serve",
            "--api-listen",
            "127.0.0.1:0",
            "--quic-listen",
            "127.0.0.1:0",
        ])
        .output()
        .expect("novacron-controller runs");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("`currency`") && said.contains("ISO 4217"),
        "{said}"
    );
}

/// A job labelled `idleStop: 20s` whose replica sleeps is stopped once it has
/// been idle that long, with an event that says what was measured; a busy one
/// with the same label keeps running.
#[tokio::test]
async fn a_job_labelled_idle_stop_is_stopped_once_idle_for_its_period() {
    let (_dir, c, _agent) = controller_and_agent("novacron-idle-", "idle").await;
    let labelled = |job: &str, script: &str| {
        format!(
            "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: {job}
  labels: {{idleStop: 20s}}
spec:
  type: service
  replicas: 1
  task:
    image: {TEST_IMAGE}
    command: [sh, -c, '{script}']
  resources:
    cpu: 200m
    memory: 32Mi
"
        )
    };
    let idle = format!("sleepy{}", std::process::id());
    let busy = format!("busy{}", std::process::id());
    let _cleanup = (JobCleanup(idle.clone()), JobCleanup(busy.clone()));
    c.apply(
        "idle.yaml",
        &labelled(&idle, "while true; do sleep 1; done"),
    )
    .await
    .expect("apply idle");
    c.apply("busy.yaml", &labelled(&busy, "while :; do :; done"))
        .await
        .expect("apply busy");
    let started = std::time::Instant::now();
    wait_for(Duration::from_secs(120), "the idle job stopped", || async {
        c.job(&idle)
            .await
            .is_ok_and(|d| d.summary.status == "stopped")
    })
    .await
    .expect("stopped");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(20),
        "stopped after {took:?}, before its 20 s period"
    );
    let events = c.cli(&["events", "--job", &idle, "-o", "json"]);
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(
        events.contains("cost.idle_stopped") && events.contains("requested over"),
        "{events}"
    );
    let busy_job = c.job(&busy).await.expect("busy job");
    assert_ne!(busy_job.summary.status, "stopped", "the busy job runs on");
}

/// A job labelled `rightsize: apply` gets its right-sizing as a new version once
/// its replicas ran for the window: half its CPU at most in one change.
#[tokio::test]
async fn a_job_labelled_rightsize_apply_is_resized_within_its_bounds() {
    let (_dir, c, _agent) = controller_and_agent("novacron-rightsize-", "rs").await;
    let job = format!("oversized{}", std::process::id());
    let _cleanup = JobCleanup(job.clone());
    c.apply(
        "oversized.yaml",
        &format!(
            "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: {job}
  labels: {{rightsize: apply, rightsizeWindow: 35s}}
spec:
  type: service
  replicas: 1
  task:
    image: {TEST_IMAGE}
    command: [sh, -c, 'while true; do sleep 1; done']
  resources:
    cpu: 1000m
    memory: 256Mi
"
        ),
    )
    .await
    .expect("apply");
    wait_for(Duration::from_secs(150), "version 2 running", || async {
        c.job(&job).await.is_ok_and(|d| {
            d.summary.version == 2
                && d.allocations.iter().any(|a| {
                    a.version == 2 && a.state == novacron_common::wire::AllocState::Running
                })
        })
    })
    .await
    .expect("resized");
    let detail = c.job(&job).await.expect("job");
    let manifest = novacron_common::manifest::parse_job("m.yaml", &detail.manifest).expect("valid");
    assert_eq!(manifest.spec.resources.cpu.0, 500, "{}", detail.manifest);
    assert_eq!(
        manifest.spec.resources.memory.0,
        128 << 20,
        "{}",
        detail.manifest
    );
    let events = c.cli(&["events", "--job", &job, "-o", "json"]);
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(
        events.contains("cost.rightsized") && events.contains("cpu 1000m → 500m"),
        "{events}"
    );
}

//! The metrics history end to end: a real controller and agent, the query API,
//! a restart, a job's allocations under their job's name, and the CLI as typed.

use std::time::{Duration, SystemTime};

use novacron_api::{HistoryStats, MetricsQueryResult};
use novacron_tests::{Agent, Controller, JobCleanup, ensure_test_image, service_job, wait_for};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

async fn query(c: &Controller, params: &str) -> reqwest::Response {
    c.admin_client()
        .expect("client")
        .get(format!("{}/v1/metrics/query?{params}", c.api()))
        .send()
        .await
        .expect("request")
}

async fn points(c: &Controller, params: &str) -> MetricsQueryResult {
    c.metrics_query(params)
        .await
        .expect("a 200 answer with JSON")
}

/// The points a query returned, as (series labels, step index, value).
fn present(r: &MetricsQueryResult) -> Vec<(String, usize, f64)> {
    r.series
        .iter()
        .flat_map(|s| {
            let labels = format!("{:?}", s.labels);
            s.values
                .iter()
                .enumerate()
                .filter_map(move |(i, v)| v.map(|v| (labels.clone(), i, v)))
        })
        .collect()
}

#[tokio::test]
async fn history_is_queried_survives_a_restart_and_names_jobs() {
    ensure_test_image().expect("test image");
    let dir = tempfile::Builder::new()
        .prefix("novacron-hist-")
        .tempdir()
        .expect("tempdir");
    let mut controller = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let node = format!("h{}", std::process::id());
    let _agent = Agent::join_and_run(dir.path(), &controller, &node, &["--interval", "200ms"])
        .await
        .expect("agent");
    controller
        .wait_ready(&node, Duration::from_secs(20))
        .await
        .expect("ready");
    let job = format!("hist-{}", std::process::id());
    let _cleanup = JobCleanup(job.clone());
    controller
        .apply(
            "hist.yaml",
            &service_job(&job, 1, "while true; do sleep 1; done", "", ""),
        )
        .await
        .expect("apply");

    // The job's allocation shows under its job's name.
    let by_job = format!("metric=alloc_memory_bytes&job={job}&from=2m&step=1s&fn=last");
    wait_for(
        Duration::from_secs(60),
        "the allocation's memory in history",
        || async {
            let r = points(&controller, &by_job).await;
            r.series.len() == 1 && r.series[0].values.iter().flatten().any(|v| *v > 0.0)
        },
    )
    .await
    .expect("allocation series");
    let r = points(&controller, &by_job).await;
    assert_eq!(r.series[0].labels.get("job"), Some(&job));
    assert_eq!(r.series[0].labels.get("node"), Some(&node));
    assert!(r.series[0].labels.contains_key("allocation"));

    // Node series: exact points at a 1 ms step over a fixed range.
    let from = now_ms();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let to = now_ms();
    let range =
        format!("metric=memory_used_bytes&node={node}&from={from}&to={to}&step=1ms&fn=last");
    // A sample stamped before `to` may still be on its way: once one stamped
    // after it is in, every earlier one is (one stream, in order).
    let later = format!(
        "metric=memory_used_bytes&node={node}&from={}&step=1ms",
        to + 1
    );
    wait_for(
        Duration::from_secs(20),
        "a sample after the range",
        || async {
            points(&controller, &later)
                .await
                .series
                .iter()
                .any(|s| s.values.iter().any(Option::is_some))
        },
    )
    .await
    .expect("a later sample");
    let before = points(&controller, &range).await;
    assert_eq!(before.resolution, "raw");
    let n = before.series[0].values.iter().flatten().count();
    assert!(n >= 10, "4 s at 200 ms gave {n} points");

    // Bad queries get a 400 that says why.
    for (params, says) in [
        ("metric=nope", "unknown metric"),
        ("metric=cpu_percent&step=1ms&from=1h", "steps"),
        ("metric=cpu_percent&from=whenever", "from="),
        ("metric=cpu_percent&job=x", "node metric"),
        ("metric=cpu_percent&selector=zone", "key=value"),
    ] {
        let resp = query(&controller, params).await;
        assert_eq!(resp.status(), 400, "{params}");
        let body = resp.text().await.expect("body");
        assert!(body.contains(says), "{params}: {body}");
    }

    // A clean restart writes the open chunks; the same points come back.
    controller.stop().await;
    controller.restart().await.expect("restart");
    let after = points(&controller, &range).await;
    assert_eq!(
        present(&after),
        present(&before),
        "history changed across a restart"
    );
    let stats: HistoryStats = controller
        .admin_client()
        .expect("client")
        .get(format!("{}/v1/metrics/storage", controller.api()))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("json");
    assert!(stats.disk_values > 0 && stats.disk_bytes > 0, "{stats:?}");

    // The CLI as typed.
    let out = controller.cli(&[
        "metrics",
        "cpu_percent",
        "--node",
        &node,
        "--since",
        "5m",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: MetricsQueryResult = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(cli.series.len(), 1);
    assert!(cli.series[0].values.iter().flatten().count() > 0);
    let spark = controller.cli(&["metrics", "memory_percent", "--since", "5m"]);
    let text = String::from_utf8_lossy(&spark.stdout);
    assert!(spark.status.success() && text.contains(&node), "{text}");
    let top = controller.cli(&["top", "--once"]);
    let text = String::from_utf8_lossy(&top.stdout);
    assert!(
        top.status.success() && text.contains(&node),
        "{text}{}",
        String::from_utf8_lossy(&top.stderr)
    );
    let unknown = controller.cli(&["metrics", "cpu_pct"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("cpu_percent"));
}

//! The job autoscaler end to end: a controller and an agent on loopback running
//! busy containers through the real Docker daemon; policies applied with the CLI
//! and the API; the autoscaler reads the containers' real CPU usage.
//!
//! `autoscaling_reaction_benchmark` (ignored by default) measures how long a load
//! step takes to become a new running replica:
//! `cargo nextest run -p novacron-tests --test autoscale --run-ignored only --no-capture`.

use std::time::{Duration, Instant};

use novacron_api::Event;
use novacron_common::wire::AllocState;
use novacron_controller::autoscaler::PolicyView;
use novacron_tests::{Agent, Controller, TEST_IMAGE, docker, ensure_test_image, wait_for};

struct Fleet {
    dir: tempfile::TempDir,
    controller: Controller,
    _agent: Agent,
}

async fn fleet() -> Fleet {
    ensure_test_image().expect("test image");
    let dir = tempfile::Builder::new()
        .prefix("novacron-as-")
        .tempdir()
        .expect("tempdir");
    let controller = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let name = format!("as{}", std::process::id());
    let agent = Agent::join_and_run(dir.path(), &controller, &name, &[])
        .await
        .expect("agent");
    controller
        .wait_ready(&name, Duration::from_secs(20))
        .await
        .expect("ready");
    Fleet {
        dir,
        controller,
        _agent: agent,
    }
}

/// A service of 100m CPU replicas running `script`.
fn job(name: &str, script: &str) -> String {
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
    command: [sh, -c, '{script}']
  resources:
    cpu: 100m
    memory: 32Mi
"
    )
}

/// Burns its CPU share until /tmp/idle exists, then idles.
const BURN_UNTIL_IDLE: &str = "while [ ! -e /tmp/idle ]; do :; done; while :; do sleep 1; done";
/// Idles until /tmp/go exists, then burns its CPU share.
const IDLE_UNTIL_GO: &str = "while [ ! -e /tmp/go ]; do sleep 0.2; done; while :; do :; done";

/// 50% CPU of what is requested, 1 to 3 replicas, windows and cooldowns short
/// enough for a test.
fn policy(name: &str, job: &str) -> String {
    format!(
        "apiVersion: novacron.io/v1
kind: AutoScalingPolicy
metadata:
  name: {name}
spec:
  target:
    job: {job}
  minSize: 1
  maxSize: 3
  metrics:
    - type: cpu
      target: 50
      window: 5s
  scaleOut:
    cooldown: 2s
    step: 100%
    stabilizationWindow: 0s
  scaleIn:
    cooldown: 2s
    step: 100%
    stabilizationWindow: 3s
"
    )
}

async fn running(c: &Controller, job: &str) -> Vec<String> {
    c.job(job)
        .await
        .map(|d| {
            d.allocations
                .into_iter()
                .filter(|a| a.desired_run && a.state == AllocState::Running)
                .map(|a| a.id)
                .collect()
        })
        .unwrap_or_default()
}

async fn wanted(c: &Controller, job: &str) -> u32 {
    c.job(job).await.map_or(0, |d| d.summary.replicas)
}

async fn autoscale_events(c: &Controller, job: &str) -> Vec<Event> {
    let page: serde_json::Value = match c
        .admin_client()
        .expect("client")
        .get(format!(
            "{}/v1/events?job={job}&type=autoscale&limit=1000",
            c.api()
        ))
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => return vec![],
    };
    serde_json::from_value(page["events"].clone()).unwrap_or_default()
}

async fn post_policy(c: &Controller, file: &str, manifest: &str) -> (u16, serde_json::Value) {
    let resp = c
        .admin_client()
        .expect("client")
        .post(format!("{}/v1/policies", c.api()))
        .json(&serde_json::json!({ "file": file, "manifest": manifest }))
        .send()
        .await
        .expect("send");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json body"))
}

async fn delete_policy(c: &Controller, name: &str) -> u16 {
    c.admin_client()
        .expect("client")
        .post(format!("{}/v1/policies/{name}/delete", c.api()))
        .send()
        .await
        .expect("send")
        .status()
        .as_u16()
}

/// Runs `sh -c script` in each allocation's container.
fn exec_in(allocs: &[String], script: &str) {
    for alloc in allocs {
        let id = docker(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=novacron.alloc={alloc}"),
        ])
        .expect("docker ps");
        for c in id.lines() {
            docker(&["exec", c, "sh", "-c", script]).expect("docker exec");
        }
    }
}

/// Removes every container this test's job left (also when the test fails).
struct Cleanup(String);
impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(ids) = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=novacron.job={}", self.0),
        ]) {
            for id in ids.lines() {
                let _ = docker(&["rm", "-f", id]);
            }
        }
    }
}

/// Applies `name`, one replica burning its 100m, and waits until it runs.
async fn one_busy_replica(c: &Controller, name: &str) {
    c.apply(&format!("{name}.yaml"), &job(name, BURN_UNTIL_IDLE))
        .await
        .expect("apply job");
    wait_for(Duration::from_secs(30), "1 running replica", || async {
        running(c, name).await.len() == 1
    })
    .await
    .expect("running");
}

#[tokio::test]
async fn a_busy_job_scales_out_on_cpu_and_back_in_when_the_load_stops() {
    let f = fleet().await;
    let c = &f.controller;
    let name = format!("busy-{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    one_busy_replica(c, &name).await;

    // The CLI sends the policy to /v1/policies by its kind.
    let file = f.dir.path().join("policy.yaml");
    std::fs::write(&file, policy(&format!("{name}-cpu"), &name)).expect("write policy");
    let out = c.cli(&["apply", "-f", &file.display().to_string()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("policy {name}-cpu for job {name} created")),
        "{stdout}"
    );

    // One replica burns 100% of its 100m: the policy asks for 2, then 3 (maxSize).
    wait_for(Duration::from_secs(60), "scaled out to 3", || async {
        wanted(c, &name).await == 3 && running(c, &name).await.len() == 3
    })
    .await
    .expect("scale-out");
    let events = autoscale_events(c, &name).await;
    let first = events.first().expect("an autoscale.scaled event");
    assert_eq!(first.kind, "autoscale.scaled");
    assert!(
        first.message.starts_with(&format!("{name} 1 → ")) && first.message.contains("cpu "),
        "{first:?}"
    );
    assert!(first.message.contains("target 50%"), "{first:?}");
    let detail = c.job(&name).await.expect("job");
    assert_eq!(detail.summary.manifest_replicas, 1);
    assert_eq!(
        detail.summary.scaled_by.as_deref(),
        Some(format!("autoscaler (policy {name}-cpu)").as_str())
    );

    let out = c.cli(&["policy", "list", "-o", "json"]);
    assert!(out.status.success());
    let views: Vec<PolicyView> = serde_json::from_slice(&out.stdout).expect("policy list json");
    let view = views
        .iter()
        .find(|v| v.name == format!("{name}-cpu"))
        .expect("listed");
    assert_eq!((view.target_kind.as_str(), view.current), ("job", Some(3)));
    assert!(view.last_decision.is_some(), "{view:?}");

    // The load stops: back to minSize.
    exec_in(&running(c, &name).await, "touch /tmp/idle");
    wait_for(Duration::from_secs(60), "scaled in to 1", || async {
        wanted(c, &name).await == 1
    })
    .await
    .expect("scale-in");
    // The tick records its events after carrying the decisions out: give the
    // explanation a bounded moment to be written.
    let _ = wait_for(Duration::from_secs(10), "the scale-in event", || async {
        autoscale_events(c, &name)
            .await
            .last()
            .is_some_and(|e| e.message.contains(" → 1: "))
    })
    .await;
    let events = autoscale_events(c, &name).await;
    let last = events.last().expect("events");
    assert!(
        last.message.contains(" → 1: cpu "),
        "scale-in explained: {events:?}"
    );

    // Deleting the policy hands the replicas back to the manifest.
    assert_eq!(delete_policy(c, &format!("{name}-cpu")).await, 204);
    let detail = c.job(&name).await.expect("job");
    assert_eq!(detail.summary.scaled_by, None);
    assert_eq!(delete_policy(c, &format!("{name}-cpu")).await, 404);
}

#[tokio::test]
async fn a_cpu_forecast_reads_what_the_replicas_use_together_on_real_agents() {
    let f = fleet().await;
    let c = &f.controller;
    let name = format!("ahead-{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    one_busy_replica(c, &name).await;
    // Some history first: one replica burning its 100m.
    tokio::time::sleep(Duration::from_secs(15)).await;
    // The policy of the test above up to 5 replicas, plus a forecast of the CPU
    // in use over the last minute, thirty seconds ahead.
    let manifest = format!(
        "{}  trend:\n    lookahead: 30s\n    history: 1m\n",
        policy(&format!("{name}-ahead"), &name).replace("maxSize: 3", "maxSize: 5")
    );
    let (status, body) = post_policy(c, "ahead.yaml", &manifest).await;
    assert_eq!(status, 200, "{body}");
    // Each new replica burns its 100m too: the job's CPU in use climbs with
    // every scale-out, and the forecast of it (with its bound) asks for more
    // than the utilization now does.
    let waited = wait_for(
        Duration::from_secs(90),
        "a decision the forecast drives",
        || async {
            autoscale_events(c, &name).await.iter().any(|e| {
                e.message.contains("cpu in use (millicores) forecast")
                    && e.message.contains("Holt over 1m")
                    && e.message.contains("(forecast drives)")
            })
        },
    )
    .await;
    let events: Vec<String> = autoscale_events(c, &name)
        .await
        .into_iter()
        .map(|e| e.message)
        .collect();
    assert!(waited.is_ok(), "{events:#?}");
    println!("forecast decisions: {events:#?}");
    exec_in(&running(c, &name).await, "touch /tmp/idle");
    assert_eq!(delete_policy(c, &format!("{name}-ahead")).await, 204);
}

#[tokio::test]
async fn a_bad_policy_is_refused_with_a_located_message() {
    let dir = tempfile::Builder::new()
        .prefix("novacron-as-")
        .tempdir()
        .expect("tempdir");
    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let bad = policy("bad", "api").replace("target: 50", "target: 150");
    let (status, body) = post_policy(&c, "bad.yaml", &bad).await;
    assert_eq!(status, 422, "{body}");
    let error = body["error"].as_str().expect("error message");
    assert!(
        error.starts_with("bad.yaml:12:") && error.contains("spec.metrics[0].target"),
        "{error}"
    );
    assert!(
        error.contains("150") && error.contains("expected"),
        "{error}"
    );

    // Two policies may not scale one job.
    let (status, _) = post_policy(&c, "a.yaml", &policy("a", "api")).await;
    assert_eq!(status, 200);
    let (status, body) = post_policy(&c, "b.yaml", &policy("b", "api")).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("\"a\"")),
        "{body}"
    );

    // The CLI names a kind it does not know, and the kinds it does.
    let file = dir.path().join("odd.yaml");
    std::fs::write(
        &file,
        "apiVersion: novacron.io/v1\nkind: Deployment\nmetadata: {name: x}\n",
    )
    .expect("write");
    let out = c.cli(&["apply", "-f", &file.display().to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("kind \"Deployment\"")
            && stderr.contains("Job, AutoScalingPolicy, NodePool, NodeTemplate"),
        "{stderr}"
    );
}

/// Load step → new replica running, in seconds: the median of
/// NOVACRON_AUTOSCALE_ROUNDS rounds (default 5).
#[tokio::test]
#[ignore = "benchmark: run with --run-ignored only --no-capture"]
async fn autoscaling_reaction_benchmark() {
    let rounds: usize = std::env::var("NOVACRON_AUTOSCALE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let f = fleet().await;
    let c = &f.controller;
    let mut times = Vec::new();
    for round in 0..rounds {
        let name = format!("react-{}-{round}", std::process::id());
        let _cleanup = Cleanup(name.clone());
        c.apply("react.yaml", &job(&name, IDLE_UNTIL_GO))
            .await
            .expect("apply job");
        let (status, body) = post_policy(c, "p.yaml", &policy(&name, &name)).await;
        assert_eq!(status, 200, "{body}");
        wait_for(Duration::from_secs(30), "1 running replica", || async {
            running(c, &name).await.len() == 1
        })
        .await
        .expect("running");
        // A full window of idle samples first.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(wanted(c, &name).await, 1, "idle stays at 1");
        let first = running(c, &name).await;
        let step = Instant::now();
        exec_in(&first, "touch /tmp/go");
        wait_for(Duration::from_secs(60), "a new replica running", || async {
            running(c, &name).await.len() >= 2
        })
        .await
        .expect("scale-out");
        let took = step.elapsed().as_secs_f64();
        println!("round {round}: load step → new replica running in {took:.2} s");
        times.push(took);
        assert_eq!(delete_policy(c, &name).await, 204);
        let stop = c
            .admin_client()
            .expect("client")
            .post(format!("{}/v1/jobs/{name}/stop", c.api()))
            .send()
            .await
            .expect("stop");
        assert!(stop.status().is_success());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "autoscaling reaction: median {median:.2} s over {rounds} rounds (min {:.2}, max {:.2})",
        times[0],
        times[times.len() - 1]
    );
}

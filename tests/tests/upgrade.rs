//! Upgrades and version skew with the real binaries over real QUIC and mutual
//! TLS: the controller and the agents negotiate the wire protocol version; an
//! agent one version older than the controller (or a controller one version older
//! than its agents) keeps working, a peer beyond that is refused with a message
//! that says what to upgrade; and a rolling upgrade of the agents (each restarted
//! in place, its containers adopted) and then of the controller keeps every
//! workload running.
//!
//! The "older" side is the current build told to speak fewer versions with the
//! hidden, test-only `--wire-versions` flag of `novacron-agent run` and
//! `novacron-controller serve`: version 2 is this build's frozen copy of release
//! 0.1's encoding (`novacron_wire::v2`, whose golden frames come from that release).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use novacron_common::wire::AllocState;
use novacron_tests::{
    Agent, Controller, JobCleanup, docker, ensure_test_image, service_job, wait_for,
};

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("novacron-upgrade-")
        .tempdir()
        .expect("tempdir")
}

/// The allocations of `job` that run, by id, with their container ids.
async fn running(c: &Controller, job: &str) -> BTreeMap<String, String> {
    c.job(job)
        .await
        .map(|d| {
            d.allocations
                .into_iter()
                .filter(|a| a.desired_run && a.state == AllocState::Running)
                .map(|a| {
                    let container = docker(&[
                        "ps",
                        "-q",
                        "--filter",
                        &format!("label=novacron.alloc={}", a.id),
                    ])
                    .expect("docker ps");
                    (a.id, container)
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_running(c: &Controller, job: &str, n: usize) -> BTreeMap<String, String> {
    wait_for(
        Duration::from_secs(60),
        &format!("{n} replicas of {job} running"),
        || async { running(c, job).await.len() == n },
    )
    .await
    .expect("running");
    running(c, job).await
}

/// The `protocol_version` the agent logged for its last connection.
fn negotiated(agent: &Agent) -> Option<u16> {
    agent
        .log()
        .lines()
        .filter(|l| l.contains("connected to the controller"))
        .filter_map(|l| l.split("protocol_version=").nth(1))
        .filter_map(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .filter_map(|v| v.parse().ok())
        .next_back()
}

/// Waits for the agent to log a connection with protocol `version` (the node is
/// ready on the controller a moment before the agent logs it).
async fn wait_negotiated(agent: &Agent, version: u16) {
    wait_for(
        Duration::from_secs(20),
        &format!("{} connected with protocol version {version}", agent.name),
        || async { negotiated(agent) == Some(version) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", agent.log()));
}

/// The controller's `/metrics` text.
async fn metrics(c: &Controller) -> String {
    c.admin_client()
        .expect("client")
        .get(format!("{}/metrics", c.api()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// Whether `/metrics` has a sample of `family` for `node`.
fn has_sample(text: &str, family: &str, node: &str) -> bool {
    let node = format!("node=\"{node}\"");
    text.lines()
        .any(|l| l.starts_with(&format!("{family}{{")) && l.contains(&node))
}

/// Stops an agent as systemd does (SIGTERM) and waits for it: its containers keep
/// running for the next start to adopt.
async fn stop(agent: &mut Agent) {
    if let Some(mut child) = agent.child.take() {
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
    }
}

fn controller_log(dir: &Path) -> String {
    let mut all = String::new();
    for n in 1..=4 {
        all +=
            &std::fs::read_to_string(dir.join(format!("controller-{n}.log"))).unwrap_or_default();
    }
    all
}

async fn events_of_kind(c: &Controller, kind: &str) -> Vec<serde_json::Value> {
    let page: serde_json::Value = c
        .admin_client()
        .expect("client")
        .get(format!("{}/v1/events", c.api()))
        .send()
        .await
        .expect("events")
        .json()
        .await
        .expect("events JSON");
    page["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no events array: {page}"))
        .iter()
        .filter(|e| e["kind"] == kind)
        .cloned()
        .collect()
}

#[tokio::test]
async fn an_agent_one_version_older_runs_jobs_and_reports_without_counters() {
    ensure_test_image().expect("test image");
    let dir = tempdir();
    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let pid = std::process::id();
    let (old_name, new_name) = (format!("old{pid}"), format!("new{pid}"));
    let old = Agent::join_and_run(
        dir.path(),
        &c,
        &old_name,
        &["--wire-versions", "2", "--label", "gen=old"],
    )
    .await
    .expect("old agent");
    let new = Agent::join_and_run(dir.path(), &c, &new_name, &[])
        .await
        .expect("new agent");
    for a in [&old, &new] {
        c.wait_ready(&a.name, Duration::from_secs(20))
            .await
            .expect("ready");
    }
    wait_negotiated(&old, 2).await;
    wait_negotiated(&new, 3).await;
    let version: serde_json::Value = c
        .admin_client()
        .expect("client")
        .get(format!("{}/v1/version", c.api()))
        .send()
        .await
        .expect("version")
        .json()
        .await
        .expect("JSON");
    assert_eq!(version["wire_protocol_versions"], serde_json::json!([2, 3]));
    assert_eq!(version["api_versions"], serde_json::json!(["v1"]));

    // A job runs on the version-2 agent (the desired set, its reports and its
    // logs cross the version-2 encoding).
    let job = format!("skew-{pid}");
    let _cleanup = JobCleanup(job.clone());
    let manifest = service_job(
        &job,
        1,
        "echo hello from v2; while true; do sleep 1; done",
        "",
        "  placement:\n    constraints:\n      - {key: gen, operator: '==', values: [old]}\n",
    );
    c.apply("skew.yaml", &manifest).await.expect("apply");
    let allocs = wait_running(&c, &job, 1).await;
    let alloc = allocs.keys().next().expect("one").clone();
    let detail = c.job(&job).await.expect("job");
    assert!(
        detail.allocations.iter().all(|a| a.node == old_name),
        "placed on the version-2 node: {:#?}",
        detail.allocations
    );
    wait_for(
        Duration::from_secs(20),
        "logs through a version-2 link",
        || async {
            let logs = c.cli(&["alloc", "logs", &alloc]);
            String::from_utf8_lossy(&logs.stdout).contains("hello from v2")
        },
    )
    .await
    .expect("logs");

    // Metrics arrive from both; only the version-3 agent sends counters.
    wait_for(
        Duration::from_secs(20),
        "samples from both nodes",
        || async {
            let text = metrics(&c).await;
            has_sample(&text, "novacron_node_memory_used_bytes", &old_name)
                && has_sample(&text, "novacron_node_cpu_seconds_total", &new_name)
        },
    )
    .await
    .expect("samples");
    let text = metrics(&c).await;
    for family in [
        "novacron_node_cpu_seconds_total",
        "novacron_node_network_receive_bytes_total",
        "novacron_node_disk_read_bytes_total",
    ] {
        assert!(
            !has_sample(&text, family, &old_name),
            "a version-2 agent sends no {family}"
        );
    }
    assert!(has_sample(
        &text,
        "novacron_node_network_receive_bytes_total",
        &new_name
    ));
}

#[tokio::test]
async fn a_controller_one_version_older_works_with_a_newer_agent() {
    ensure_test_image().expect("test image");
    let dir = tempdir();
    let c = Controller::start(dir.path(), &["--wire-versions", "2"])
        .await
        .expect("controller");
    let pid = std::process::id();
    let agent = Agent::join_and_run(dir.path(), &c, &format!("n{pid}"), &[])
        .await
        .expect("agent");
    c.wait_ready(&agent.name, Duration::from_secs(20))
        .await
        .expect("ready");
    wait_negotiated(&agent, 2).await;
    let job = format!("older-ctl-{pid}");
    let _cleanup = JobCleanup(job.clone());
    c.apply(
        "older.yaml",
        &service_job(&job, 2, "while true; do sleep 1; done", "", ""),
    )
    .await
    .expect("apply");
    wait_running(&c, &job, 2).await;
    wait_for(Duration::from_secs(20), "a sample", || async {
        matches!(c.node(&agent.name).await, Ok(Some(v)) if v.latest.is_some())
    })
    .await
    .expect("metrics over version 2");
}

#[tokio::test]
async fn peers_without_a_common_version_are_refused_with_what_to_upgrade() {
    let dir = tempdir();
    // A controller that speaks only version 3 and an agent that speaks only 2.
    let mut c = Controller::start(dir.path(), &["--wire-versions", "3"])
        .await
        .expect("controller");
    let pid = std::process::id();
    let mut agent = Agent::join_and_run(
        dir.path(),
        &c,
        &format!("o{pid}"),
        &["--wire-versions", "2"],
    )
    .await
    .expect("agent");
    let too_old = "upgrade the agent to a release that speaks version 3 or later";
    wait_for(
        Duration::from_secs(20),
        "the agent logs the refusal",
        || async { agent.log().contains(too_old) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", agent.log()));
    assert!(agent.log().contains("VersionMismatch"), "{}", agent.log());
    assert!(
        controller_log(dir.path()).contains(too_old),
        "{}",
        controller_log(dir.path())
    );
    let events = events_of_kind(&c, "node.version_refused").await;
    assert_eq!(events.len(), 1, "one event, not one per retry: {events:#?}");
    assert_eq!(events[0]["node"], agent.name.as_str());
    assert!(
        events[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains(too_old)),
        "{events:#?}"
    );
    let view = c.node(&agent.name).await.expect("node").expect("enrolled");
    assert_ne!(view.status.to_string(), "ready");

    // The other way round: the agent is newer than the controller.
    stop(&mut agent).await;
    c.serve_args = vec!["--wire-versions".into(), "2".into()];
    c.restart().await.expect("restart");
    agent.run_args = vec!["--wire-versions".into(), "3".into()];
    agent.start().expect("agent");
    let too_new = "the controller speaks wire protocol versions 2, this agent speaks 3: upgrade the controller to a release that speaks version 3 or later";
    wait_for(
        Duration::from_secs(20),
        "the agent logs the refusal",
        || async { agent.log().contains(too_new) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", agent.log()));
    assert!(
        controller_log(dir.path()).contains("upgrade this controller"),
        "{}",
        controller_log(dir.path())
    );
    assert_eq!(events_of_kind(&c, "node.version_refused").await.len(), 2);

    // Once the controller speaks both, the same agent connects.
    c.serve_args.clear();
    c.restart().await.expect("restart");
    c.wait_ready(&agent.name, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", agent.log()));
    wait_negotiated(&agent, 3).await;
}

/// The documented rolling upgrade (README, "Upgrades"): agents one at a time,
/// each stopped and started in place on the new release while the controller
/// runs; then the controller. Every allocation keeps its id and its container.
#[tokio::test]
async fn a_rolling_upgrade_of_agents_then_controller_keeps_every_workload() {
    ensure_test_image().expect("test image");
    let dir = tempdir();
    let mut c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let pid = std::process::id();
    let mut agents = Vec::new();
    for i in 0..2 {
        // The old release: speaks version 2 only.
        agents.push(
            Agent::join_and_run(
                dir.path(),
                &c,
                &format!("u{i}-{pid}"),
                &["--wire-versions", "2"],
            )
            .await
            .expect("agent"),
        );
    }
    for a in &agents {
        c.wait_ready(&a.name, Duration::from_secs(20))
            .await
            .expect("ready");
        wait_negotiated(a, 2).await;
    }
    let job = format!("rolling-{pid}");
    let _cleanup = JobCleanup(job.clone());
    c.apply(
        "rolling.yaml",
        &service_job(&job, 4, "while true; do sleep 1; done", "", ""),
    )
    .await
    .expect("apply");
    let before = wait_running(&c, &job, 4).await;
    let started =
        |id: &str| docker(&["inspect", "-f", "{{.State.StartedAt}}", id]).expect("inspect");
    let starts: Vec<String> = before.values().map(|c| started(c)).collect();

    for a in &mut agents {
        stop(a).await;
        // The new release: everything this build speaks.
        a.run_args.clear();
        a.start().expect("start the upgraded agent");
        wait_negotiated(a, 3).await;
        c.wait_ready(&a.name, Duration::from_secs(30))
            .await
            .expect("ready again");
        assert_eq!(
            wait_running(&c, &job, 4).await,
            before,
            "the same allocations in the same containers after upgrading {}",
            a.name
        );
    }

    // The controller: stopped and started; the agents reconnect by themselves.
    c.stop().await;
    c.restart().await.expect("controller restarts");
    for a in &agents {
        c.wait_ready(&a.name, Duration::from_secs(30))
            .await
            .expect("reconnected");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(wait_running(&c, &job, 4).await, before);
    let starts_after: Vec<String> = before.values().map(|c| started(c)).collect();
    assert_eq!(starts, starts_after, "no workload container was restarted");
}

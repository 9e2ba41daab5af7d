//! Workloads end to end: a controller and two agents on loopback running containers
//! through the real Docker daemon.
//!
//! Both agents share this machine's daemon; each manages only the containers
//! labelled with its own node name.

use std::time::{Duration, Instant};

use novacron_api::AllocView;
use novacron_common::wire::AllocState;
use novacron_tests::{
    Agent, Controller, JobCleanup, TEST_IMAGE, docker, ensure_test_image, service_job, wait_for,
};

struct Fleet {
    _dir: tempfile::TempDir,
    controller: Controller,
    agents: Vec<Agent>,
}

async fn fleet(agents: usize) -> Fleet {
    ensure_test_image().expect("test image");
    let dir = tempfile::Builder::new()
        .prefix("novacron-wl-")
        .tempdir()
        .expect("tempdir");
    let controller = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let mut list = Vec::new();
    for i in 0..agents {
        let name = format!("w{}-{}", std::process::id(), i);
        let zone = format!("zone={}", ["a", "b"][i % 2]);
        list.push(
            Agent::join_and_run(dir.path(), &controller, &name, &["--label", &zone])
                .await
                .expect("agent"),
        );
    }
    for a in &list {
        controller
            .wait_ready(&a.name, Duration::from_secs(20))
            .await
            .expect("ready");
    }
    Fleet {
        _dir: dir,
        controller,
        agents: list,
    }
}

fn service(name: &str, replicas: u32, extra: &str) -> String {
    service_job(
        name,
        replicas,
        "echo started $NOVACRON_TEST; while true; do sleep 1; done",
        "    env:\n      NOVACRON_TEST: hello\n",
        extra,
    )
}

async fn running(c: &Controller, job: &str) -> Vec<AllocView> {
    c.job(job)
        .await
        .map(|d| {
            d.allocations
                .into_iter()
                .filter(|a| a.desired_run && a.state == AllocState::Running)
                .collect()
        })
        .unwrap_or_default()
}

fn container_of(alloc: &str) -> String {
    docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=novacron.alloc={alloc}"),
    ])
    .expect("docker ps")
}

#[tokio::test]
async fn a_service_runs_with_limits_restarts_and_moves_when_its_node_dies() {
    let mut f = fleet(2).await;
    let job = format!("web-{}", std::process::id());
    let _cleanup = JobCleanup(job.clone());
    f.controller
        .apply(
            "web.yaml",
            &service(&job, 3, "  placement:\n    spread:\n      - key: zone\n"),
        )
        .await
        .expect("apply");
    wait_for(Duration::from_secs(30), "3 running replicas", || async {
        running(&f.controller, &job).await.len() == 3
    })
    .await
    .expect("running");
    let allocs = running(&f.controller, &job).await;
    let nodes: std::collections::BTreeSet<&str> = allocs.iter().map(|a| a.node.as_str()).collect();
    assert_eq!(nodes.len(), 2, "spread across both zones: {allocs:?}");

    // Per-allocation usage arrives in the node's metrics stream.
    let first = allocs[0].clone();
    wait_for(Duration::from_secs(15), "allocation usage in the metrics stream", || async {
        matches!(f.controller.node(&first.node).await, Ok(Some(v)) if v.latest.as_ref().is_some_and(|s| {
            s.allocations.iter().any(|u| u.id == first.id && u.memory_bytes > 0 && u.memory_limit_bytes == 32 << 20)
        }))
    })
    .await
    .expect("usage reported");

    // Requested limits and env reach Docker.
    let id = container_of(&allocs[0].id);
    let limits = docker(&[
        "inspect",
        "-f",
        "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}",
        &id,
    ])
    .expect("inspect");
    assert_eq!(limits, format!("{} {}", 100_000_000u64, 32u64 << 20));

    // A killed container restarts per its policy.
    docker(&["kill", &id]).expect("kill");
    let target = allocs[0].id.clone();
    wait_for(
        Duration::from_secs(20),
        "the killed container restarted",
        || async {
            running(&f.controller, &job)
                .await
                .iter()
                .any(|a| a.id == target && a.restarts >= 1)
        },
    )
    .await
    .expect("restarted");

    // Kill an agent: its allocations are replaced on the other one.
    let victim = f.agents[0].name.clone();
    f.agents[0].kill().await;
    let killed = Instant::now();
    wait_for(
        Duration::from_secs(15),
        "replacements on the surviving node",
        || async {
            let r = running(&f.controller, &job).await;
            r.len() == 3 && r.iter().all(|a| a.node != victim)
        },
    )
    .await
    .expect("moved");
    eprintln!(
        "replacements running {:?} after the agent kill",
        killed.elapsed()
    );
}

#[tokio::test]
async fn a_restarted_agent_adopts_its_containers() {
    let mut f = fleet(1).await;
    let job = format!("adopt-{}", std::process::id());
    let _cleanup = JobCleanup(job.clone());
    f.controller
        .apply("adopt.yaml", &service(&job, 2, ""))
        .await
        .expect("apply");
    wait_for(Duration::from_secs(30), "2 running", || async {
        running(&f.controller, &job).await.len() == 2
    })
    .await
    .expect("running");
    let before: Vec<(String, String)> = running(&f.controller, &job)
        .await
        .iter()
        .map(|a| (a.id.clone(), container_of(&a.id)))
        .collect();
    let started = |c: &str| docker(&["inspect", "-f", "{{.State.StartedAt}}", c]).expect("inspect");
    let starts: Vec<String> = before.iter().map(|(_, c)| started(c)).collect();
    f.agents[0].kill().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.agents[0].start().expect("restart agent");
    f.controller
        .wait_ready(&f.agents[0].name, Duration::from_secs(20))
        .await
        .expect("back");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after: Vec<(String, String)> = running(&f.controller, &job)
        .await
        .iter()
        .map(|a| (a.id.clone(), container_of(&a.id)))
        .collect();
    let mut b = before.clone();
    b.sort();
    let mut a = after.clone();
    a.sort();
    assert_eq!(a, b, "same allocations, same containers");
    let starts_after: Vec<String> = before.iter().map(|(_, c)| started(c)).collect();
    assert_eq!(starts, starts_after, "containers were not restarted");
}

fn job_containers(job: &str) -> String {
    docker(&["ps", "-q", "--filter", &format!("label=novacron.job={job}")]).expect("docker ps")
}

async fn restart_controller(f: &mut Fleet, kill: bool) {
    if kill {
        f.controller.kill().await;
    } else {
        f.controller.stop().await;
    }
    f.controller.restart().await.expect("controller restarts");
    let node = f.agents[0].name.clone();
    f.controller
        .wait_ready(&node, Duration::from_secs(30))
        .await
        .expect("agent back");
}

/// Regression (issue 12): a restarted controller counted desired-set generations
/// from 1 again, and every running agent refused its sets as older than the one it
/// had applied: after a restart, stops, placements and rollouts did nothing.
#[tokio::test]
async fn a_restarted_controller_is_obeyed_by_running_agents() {
    let mut f = fleet(1).await;
    let pid = std::process::id();
    let (a, b, c) = (
        format!("rst-a-{pid}"),
        format!("rst-b-{pid}"),
        format!("rst-c-{pid}"),
    );
    let _cleanup = (
        JobCleanup(a.clone()),
        JobCleanup(b.clone()),
        JobCleanup(c.clone()),
    );
    for job in [&a, &b] {
        f.controller
            .apply("rst.yaml", &service(job, 1, ""))
            .await
            .expect("apply");
    }
    wait_for(Duration::from_secs(40), "a and b running", || async {
        running(&f.controller, &a).await.len() == 1 && running(&f.controller, &b).await.len() == 1
    })
    .await
    .expect("running");
    // Raise the agent's applied generation well above what a restarted controller
    // starts from: every placement and every stop is a new desired set.
    let churn: Vec<String> = (0..3).map(|i| format!("rst-d{i}-{pid}")).collect();
    let _churn_cleanup: Vec<JobCleanup> = churn.iter().map(|j| JobCleanup(j.clone())).collect();
    for job in &churn {
        f.controller
            .apply("rst.yaml", &service(job, 1, ""))
            .await
            .expect("apply");
        wait_for(Duration::from_secs(30), "churn job running", || async {
            running(&f.controller, job).await.len() == 1
        })
        .await
        .expect("running");
        let out = f.controller.cli(&["job", "stop", job]);
        assert!(out.status.success(), "job stop: {out:?}");
        wait_for(Duration::from_secs(30), "churn job stopped", || async {
            job_containers(job).is_empty()
        })
        .await
        .expect("stopped");
    }

    // A clean restart (SIGTERM), then a stop and a new job.
    restart_controller(&mut f, false).await;
    let out = f.controller.cli(&["job", "stop", &a]);
    assert!(out.status.success(), "job stop: {out:?}");
    f.controller
        .apply("rst.yaml", &service(&c, 1, ""))
        .await
        .expect("apply c");
    wait_for(Duration::from_secs(30), "a stopped, c running", || async {
        job_containers(&a).is_empty()
            && running(&f.controller, &c).await.len() == 1
            && !job_containers(&c).is_empty()
    })
    .await
    .expect("the agent obeyed the restarted controller");

    // A crash (SIGKILL), then a rollout and a stop.
    restart_controller(&mut f, true).await;
    f.controller
        .apply(
            "rst.yaml",
            &service(&b, 1, "").replace("NOVACRON_TEST: hello", "NOVACRON_TEST: v2"),
        )
        .await
        .expect("apply b v2");
    let out = f.controller.cli(&["job", "stop", &c]);
    assert!(out.status.success(), "job stop: {out:?}");
    wait_for(
        Duration::from_secs(40),
        "b at version 2, c stopped",
        || async {
            let b_v2 = running(&f.controller, &b)
                .await
                .iter()
                .any(|r| r.version == 2);
            b_v2 && job_containers(&c).is_empty()
        },
    )
    .await
    .expect("the agent obeyed the crashed-and-restarted controller");
    let container = job_containers(&b);
    let env = docker(&[
        "inspect",
        "-f",
        "{{.Config.Env}}",
        container.lines().next().expect("b runs"),
    ])
    .expect("inspect");
    assert!(env.contains("NOVACRON_TEST=v2"), "{env}");
}

/// Regression (issue 12): cordons lived only in memory and nothing lifted one.
#[tokio::test]
async fn a_cordon_survives_a_controller_restart_until_uncordoned() {
    let mut f = fleet(1).await;
    let node = f.agents[0].name.clone();
    let job = format!("cordon-{}", std::process::id());
    let _cleanup = JobCleanup(job.clone());
    let out = f.controller.cli(&["node", "cordon", &node]);
    assert!(out.status.success(), "node cordon: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cordoned"),
        "{out:?}"
    );
    restart_controller(&mut f, true).await;
    let view = f
        .controller
        .node(&node)
        .await
        .expect("node")
        .expect("known");
    assert!(view.cordoned, "the cordon was lost in the restart");
    let list = f.controller.cli(&["node", "list"]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains("ready,cordoned"),
        "{list:?}"
    );
    f.controller
        .apply("cordon.yaml", &service(&job, 1, ""))
        .await
        .expect("apply");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        running(&f.controller, &job).await.is_empty(),
        "placed on a cordoned node"
    );
    let out = f.controller.cli(&["node", "uncordon", &node]);
    assert!(out.status.success(), "node uncordon: {out:?}");
    wait_for(
        Duration::from_secs(30),
        "placed once uncordoned",
        || async { running(&f.controller, &job).await.len() == 1 },
    )
    .await
    .expect("placed");
    let events = f.controller.cli(&["events", "--node", &node]);
    let text = String::from_utf8_lossy(&events.stdout);
    assert!(
        text.contains("node.cordoned") && text.contains("node.uncordoned"),
        "{text}"
    );
}

#[tokio::test]
async fn an_unplaceable_job_says_why() {
    let f = fleet(1).await;
    let job = format!("huge-{}", std::process::id());
    let manifest = service(&job, 1, "").replace("memory: 32Mi", "memory: 4000Gi");
    f.controller
        .apply("huge.yaml", &manifest)
        .await
        .expect("apply");
    wait_for(Duration::from_secs(10), "an explanation", || async {
        f.controller
            .job(&job)
            .await
            .is_ok_and(|d| d.summary.status == "blocked" && d.summary.message.contains("memory"))
    })
    .await
    .expect("explained");
    let d = f.controller.job(&job).await.expect("job");
    eprintln!("{}", d.summary.message);
    assert!(
        d.summary
            .message
            .contains("1 of 1 replicas could not be placed"),
        "{}",
        d.summary.message
    );
}

fn futures_job(c: &Controller, job: &str) -> String {
    let rt = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        rt.block_on(c.job(job))
            .map(|d| format!("{:#?}", d.allocations))
            .unwrap_or_default()
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_image_fails_the_allocation_clearly() {
    let f = fleet(1).await;
    let job = format!("noimage-{}", std::process::id());
    let _cleanup = JobCleanup(job.clone());
    let manifest = service(&job, 1, "").replace(TEST_IMAGE, "novacron-test/does-not-exist:1");
    f.controller
        .apply("noimage.yaml", &manifest)
        .await
        .expect("apply");
    wait_for(Duration::from_secs(20), "a failed allocation", || async {
        f.controller.job(&job).await.is_ok_and(|d| {
            d.allocations
                .iter()
                .any(|a| a.state == AllocState::Failed && a.message.contains("does-not-exist"))
        })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:#?}", futures_job(&f.controller, &job)));
    // Replacements back off (1 s, 2 s, 4 s, ...): no retry storm.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let failed = f
        .controller
        .job(&job)
        .await
        .expect("job")
        .allocations
        .iter()
        .filter(|a| a.state == AllocState::Failed)
        .count();
    assert!(
        (1..=3).contains(&failed),
        "{failed} failed allocations in 2.5 s"
    );
}

#[tokio::test]
async fn a_rolling_update_that_fails_its_health_check_reverts() {
    let f = fleet(1).await;
    let job = format!("roll-{}", std::process::id());
    let _cleanup = JobCleanup(job.clone());
    let health = |port: u16| {
        format!(
            "  health:
    tcp:
      port: {port}
    interval: 1s
    timeout: 500ms
    retries: 1
  update:
    maxParallel: 1
    minHealthyTime: 1s
    healthyDeadline: 6s
    autoRevert: true
"
        )
    };
    let v1 = service(&job, 2, &health(8080)).replace(
        "'echo started $NOVACRON_TEST; while true; do sleep 1; done'",
        "'httpd -f -p 8080'",
    );
    f.controller
        .apply("roll.yaml", &v1)
        .await
        .expect("apply v1");
    wait_for(Duration::from_secs(40), "v1 stable", || async {
        f.controller
            .job(&job)
            .await
            .is_ok_and(|d| d.summary.stable_version == Some(1) && d.summary.healthy == 2)
    })
    .await
    .expect("v1 healthy");
    // Version 2 checks a port nothing listens on.
    let v2 = v1.replace("port: 8080", "port: 9999");
    f.controller
        .apply("roll.yaml", &v2)
        .await
        .expect("apply v2");
    wait_for(Duration::from_secs(60), "auto-revert", || async {
        f.controller
            .job(&job)
            .await
            .is_ok_and(|d| d.summary.status == "reverted")
    })
    .await
    .expect("reverted");
    wait_for(
        Duration::from_secs(40),
        "the reverted version healthy",
        || async {
            f.controller.job(&job).await.is_ok_and(|d| {
                d.summary.version == 3 && d.summary.healthy == 2 && d.summary.running == 2
            })
        },
    )
    .await
    .expect("healthy again");
    let d = f.controller.job(&job).await.expect("job");
    assert!(
        d.summary.message.contains("version 2 failed"),
        "{}",
        d.summary.message
    );
}

/// Regression (issue 12): a rolling update to an image that does not exist stopped
/// the healthy old replicas one after another (0 of 3 ran) and never reverted.
#[tokio::test]
async fn a_rollout_to_a_missing_image_keeps_every_old_replica_serving_and_reverts() {
    // Declared before the fleet, so it runs after the agent has stopped: an
    // agent still running restarts what the cleanup removed (a container
    // of this test outlived it).
    let job = format!("badimg-{}", std::process::id());
    let _cleanup = JobCleanup(job.clone());
    let f = fleet(1).await;
    let v1 = service(
        &job,
        3,
        "  health:
    tcp:
      port: 8080
    interval: 1s
    timeout: 500ms
    retries: 1
  update:
    maxParallel: 1
    minHealthyTime: 1s
    healthyDeadline: 20s
    autoRevert: true
",
    )
    .replace(
        "'echo started $NOVACRON_TEST; while true; do sleep 1; done'",
        "'httpd -f -p 8080'",
    );
    f.controller.apply("bad.yaml", &v1).await.expect("apply v1");
    wait_for(Duration::from_secs(60), "v1 stable", || async {
        f.controller
            .job(&job)
            .await
            .is_ok_and(|d| d.summary.stable_version == Some(1) && d.summary.healthy == 3)
    })
    .await
    .expect("v1 healthy");
    let old: Vec<String> = running(&f.controller, &job)
        .await
        .iter()
        .map(|a| a.id.clone())
        .collect();
    let v2 = v1.replace(TEST_IMAGE, "novacron-test/does-not-exist:404");
    f.controller.apply("bad.yaml", &v2).await.expect("apply v2");
    // Until the revert, and for a while after it, all three old replicas run.
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut reverted = false;
    while Instant::now() < deadline {
        let d = f.controller.job(&job).await.expect("job");
        let old_running = d
            .allocations
            .iter()
            .filter(|a| old.contains(&a.id) && a.desired_run && a.state == AllocState::Running)
            .count();
        assert_eq!(
            old_running, 3,
            "an old replica stopped during the failing rollout: {:?}",
            d.allocations
        );
        if d.summary.status == "reverted" {
            reverted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(reverted, "the rollout to a missing image did not revert");
    let d = f.controller.job(&job).await.expect("job");
    assert!(
        d.summary.message.contains("version 2 failed"),
        "{}",
        d.summary.message
    );
    // The revert rolls the old spec out again, never below three healthy.
    wait_for(
        Duration::from_secs(60),
        "the reverted version healthy",
        || async {
            f.controller.job(&job).await.is_ok_and(|d| {
                d.summary.version == 3
                    && d.summary.healthy >= 3
                    && d.summary.stable_version == Some(3)
            })
        },
    )
    .await
    .expect("healthy again");
}

#[tokio::test]
async fn the_cli_applies_lists_and_reads_logs() {
    let f = fleet(1).await;
    let job = format!("cli-{}", std::process::id());
    let _cleanup = JobCleanup(job.clone());
    let file = f.controller.data_dir.with_file_name("cli-job.yaml");
    std::fs::write(&file, service(&job, 1, "")).expect("write manifest");
    let file = file.display().to_string();
    let out = f.controller.cli(&["apply", "-f", &file]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("created (version 1)"));
    let again = f.controller.cli(&["apply", "-f", &file]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("unchanged"));

    wait_for(Duration::from_secs(30), "1 running", || async {
        running(&f.controller, &job).await.len() == 1
    })
    .await
    .expect("running");
    let list = String::from_utf8_lossy(&f.controller.cli(&["job", "list"]).stdout).into_owned();
    assert!(list.contains(&job) && list.contains("running"), "{list}");
    let status =
        String::from_utf8_lossy(&f.controller.cli(&["job", "status", &job]).stdout).into_owned();
    assert!(status.contains("1 wanted, 1 running"), "{status}");
    let alloc = running(&f.controller, &job).await.remove(0);
    let allocs =
        String::from_utf8_lossy(&f.controller.cli(&["alloc", "list", "--job", &job]).stdout)
            .into_owned();
    assert!(allocs.contains(&alloc.id), "{allocs}");

    let logs = f.controller.cli(&["alloc", "logs", &alloc.id]);
    assert!(
        logs.status.success(),
        "{}",
        String::from_utf8_lossy(&logs.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&logs.stdout).trim(),
        "started hello"
    );

    // A bad manifest is refused with its file, line and field.
    let bad = f.controller.data_dir.with_file_name("bad.yaml");
    std::fs::write(
        &bad,
        service(&job, 1, "").replace("memory: 32Mi", "memory: 12XB"),
    )
    .expect("write");
    let out = f
        .controller
        .cli(&["apply", "-f", &bad.display().to_string()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml:") && err.contains("spec.resources.memory") && err.contains("12XB"),
        "{err}"
    );

    let stop = f.controller.cli(&["job", "stop", &job]);
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    wait_for(Duration::from_secs(20), "the container gone", || async {
        docker(&["ps", "-q", "--filter", &format!("label=novacron.job={job}")])
            .is_ok_and(|s| s.is_empty())
    })
    .await
    .expect("stopped");
}

/// Serves /www on 8080; /www/health is written on the container's first start only,
/// so a check on it that fails after `docker exec rm` keeps failing across restarts
/// of that container (a new container, elsewhere, is healthy again).
const FLAKY_WEB: &str = "mkdir -p /www; [ -f /www/started ] || echo ok > /www/health; \
                         touch /www/started; exec httpd -f -p 8080 -h /www";

fn checked_service(name: &str, health: &str, placement: &str) -> String {
    service_job(
        name,
        1,
        FLAKY_WEB,
        "",
        &format!("  health:\n{health}{placement}"),
    )
}

async fn allocs_of(c: &Controller, job: &str) -> Vec<AllocView> {
    c.job(job).await.map(|d| d.allocations).unwrap_or_default()
}

#[tokio::test]
async fn an_unhealthy_container_is_restarted_then_replaced_on_another_node() {
    let f = fleet(2).await;
    let job = format!("live-{}", std::process::id());
    let _cleanup = JobCleanup(job.clone());
    // Affinity for zone a (the first agent): without avoiding the node where it
    // failed, the replacement would go straight back there.
    let health = "    liveness:
      http: {port: 8080, path: /health}
      period: 1s
      timeout: 500ms
      failureThreshold: 2
    maxRestarts: 1
    restartBackoff: 200ms
";
    let placement = "  placement:
    affinity:
      - {key: zone, operator: In, values: [a], weight: 100}
";
    f.controller
        .apply("live.yaml", &checked_service(&job, health, placement))
        .await
        .expect("apply");
    wait_for(Duration::from_secs(30), "a live replica", || async {
        running(&f.controller, &job)
            .await
            .iter()
            .any(|a| a.healthy == Some(true))
    })
    .await
    .expect("live");
    let first = running(&f.controller, &job).await.remove(0);
    assert_eq!(first.node, f.agents[0].name, "affinity for zone a");
    docker(&["exec", &container_of(&first.id), "rm", "/www/health"]).expect("break it");

    // Restarted once (the file stays gone), then failed with a typed reason...
    wait_for(Duration::from_secs(30), "the allocation failed", || async {
        allocs_of(&f.controller, &job)
            .await
            .iter()
            .any(|a| a.id == first.id && a.state == AllocState::Failed)
    })
    .await
    .expect("failed");
    let failed = allocs_of(&f.controller, &job)
        .await
        .into_iter()
        .find(|a| a.id == first.id)
        .expect("still listed");
    assert_eq!(
        failed.failure,
        Some(novacron_common::wire::FailureReason::Unhealthy),
        "{}",
        failed.message
    );
    assert_eq!(failed.restarts, 1, "{}", failed.message);
    let list = String::from_utf8_lossy(&f.controller.cli(&["alloc", "list", "--job", &job]).stdout)
        .to_string();
    assert!(list.contains("failed (unhealthy)"), "{list}");

    // ...and replaced on the other node, where it is live.
    wait_for(Duration::from_secs(30), "a live replacement", || async {
        running(&f.controller, &job)
            .await
            .iter()
            .any(|a| a.id != first.id && a.healthy == Some(true))
    })
    .await
    .expect("replaced");
    let replacement = running(&f.controller, &job).await.remove(0);
    assert_eq!(
        replacement.node, f.agents[1].name,
        "the replacement avoids {}",
        first.node
    );
}

#[tokio::test]
async fn a_failing_readiness_check_marks_the_allocation_unhealthy_without_restarting_it() {
    let f = fleet(1).await;
    let job = format!("ready-{}", std::process::id());
    let _cleanup = JobCleanup(job.clone());
    let health = "    readiness:
      http: {port: 8080, path: /health}
      period: 1s
      timeout: 500ms
      failureThreshold: 1
";
    f.controller
        .apply("ready.yaml", &checked_service(&job, health, ""))
        .await
        .expect("apply");
    wait_for(Duration::from_secs(30), "a ready replica", || async {
        running(&f.controller, &job)
            .await
            .iter()
            .any(|a| a.healthy == Some(true))
    })
    .await
    .expect("ready");
    let before = running(&f.controller, &job).await.remove(0);
    docker(&["exec", &container_of(&before.id), "rm", "/www/health"]).expect("break it");
    wait_for(Duration::from_secs(15), "reported not ready", || async {
        running(&f.controller, &job)
            .await
            .iter()
            .any(|a| a.id == before.id && a.healthy == Some(false))
    })
    .await
    .expect("not ready");
    // Five more periods: the same allocation, running, never restarted.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = allocs_of(&f.controller, &job).await;
    assert_eq!(after.len(), 1, "no replacement: {after:?}");
    assert_eq!(
        (after[0].state, after[0].healthy, after[0].restarts),
        (AllocState::Running, Some(false), 0),
        "{}",
        after[0].message
    );
}

#[tokio::test]
async fn an_agent_started_before_docker_keeps_running() {
    // Regression: a missing Docker socket made `novacron-agent run` exit 64, the
    // code its systemd unit does not restart.
    let dir = tempfile::Builder::new()
        .prefix("novacron-nodocker-")
        .tempdir()
        .expect("tempdir");
    let controller = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let socket_path = dir.path().join("docker.sock");
    let socket = format!("unix://{}", socket_path.display());
    let mut agent = Agent::join_and_run(
        dir.path(),
        &controller,
        &format!("nd{}", std::process::id()),
        &["--docker-host", &socket],
    )
    .await
    .expect("agent");
    controller
        .wait_ready(&agent.name, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let child = agent.child.as_mut().expect("started");
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "the agent exited; log:\n{}",
        agent.log()
    );
    let log = agent.log();
    assert_eq!(
        log.matches("cannot list containers; retrying every poll")
            .count(),
        1,
        "said once, not every second:\n{log}"
    );
    // Docker comes up (its socket appears): the agent runs containers.
    ensure_test_image().expect("test image");
    let real = std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(str::to_owned))
        .unwrap_or_else(|| "/var/run/docker.sock".into());
    std::os::unix::fs::symlink(&real, &socket_path).expect("symlink the socket");
    let job = format!("late-docker-{}", std::process::id());
    let _cleanup = JobCleanup(job.clone());
    controller
        .apply("late.yaml", &service(&job, 1, ""))
        .await
        .expect("apply");
    wait_for(Duration::from_secs(30), "a running replica", || async {
        running(&controller, &job).await.len() == 1
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log()));
    assert!(
        agent.log().contains("the container runtime answers again"),
        "{}",
        agent.log()
    );
}

/// A service of one replica that answers HTTP with its own job name on container
/// port 80, published on host port `host_port` (none: the node's dynamic range).
fn web_on_port(name: &str, host_port: Option<u16>) -> String {
    let host_port = host_port.map_or(String::new(), |p| format!(", hostPort: {p}"));
    service_job(
        name,
        1,
        &format!("mkdir -p /www && echo {name} > /www/index.html && exec httpd -f -p 80 -h /www"),
        &format!("    ports:\n      - {{name: http, containerPort: 80{host_port}}}\n"),
        "",
    )
}

/// `GET http://{ip}:{port}/`, the body trimmed.
async fn http_get(ip: &str, port: u16) -> Option<String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let resp = client
        .get(format!("http://{ip}:{port}/"))
        .send()
        .await
        .ok()?;
    Some(resp.text().await.ok()?.trim().to_string())
}

/// Host ports are a scheduled resource: two jobs asking for the same static host
/// port land on different nodes and both answer there; a third, with no node left
/// that has the port free, is reported unplaceable with the holder named (no
/// allocation is created to fail); a port without `hostPort` gets a port of the
/// node's dynamic range, which the API reports and which answers.
///
/// Both agents share this machine's Docker daemon, so each publishes on its own
/// loopback address (`--publish-address`), as two hosts would on theirs.
#[tokio::test]
async fn jobs_with_the_same_static_host_port_go_to_different_nodes() {
    ensure_test_image().expect("test image");
    let pid = std::process::id();
    let dir = tempfile::Builder::new()
        .prefix("novacron-ports-")
        .tempdir()
        .expect("tempdir");
    let controller = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    // A dynamic range of 10 ports per test process, away from the kernel's
    // ephemeral ports (32768 and up) that other tests' containers may hold.
    let first = 22000 + (pid % 900) as u16 * 10;
    let range = format!("{first}-{}", first + 9);
    let mut agents = Vec::new();
    let mut ip_of = std::collections::BTreeMap::new();
    for i in 0..2 {
        let name = format!("p{pid}-{i}");
        let ip = format!("127.0.0.{}", i + 2);
        agents.push(
            Agent::join_and_run(
                dir.path(),
                &controller,
                &name,
                &["--publish-address", &ip, "--dynamic-ports", &range],
            )
            .await
            .expect("agent"),
        );
        ip_of.insert(name, ip);
    }
    for a in &agents {
        controller
            .wait_ready(&a.name, Duration::from_secs(20))
            .await
            .expect("ready");
    }
    let port = novacron_tests::free_port();
    let jobs: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|j| format!("port{j}-{pid}"))
        .collect();
    let _cleanup: Vec<JobCleanup> = jobs.iter().map(|j| JobCleanup(j.clone())).collect();

    // Two jobs on the same static port: one per node, each answering there.
    let mut nodes = Vec::new();
    for job in &jobs[..2] {
        controller
            .apply("web.yaml", &web_on_port(job, Some(port)))
            .await
            .expect("apply");
        wait_for(Duration::from_secs(30), "the replica running", || async {
            running(&controller, job).await.len() == 1
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", futures_job(&controller, job)));
        let alloc = running(&controller, job).await.remove(0);
        assert_eq!(alloc.ports.len(), 1, "{alloc:?}");
        assert_eq!(alloc.ports[0].host_port, port);
        assert_eq!(alloc.ports[0].container_port, 80);
        let ip = ip_of[&alloc.node].clone();
        wait_for(
            Duration::from_secs(15),
            "the job answering on its port",
            || async { http_get(&ip, port).await.as_deref() == Some(job.as_str()) },
        )
        .await
        .expect("answers");
        nodes.push(alloc.node);
    }
    assert_ne!(nodes[0], nodes[1], "the same host port on one node twice");

    // A third job on the port: no node is left; blocked with the reason, nothing
    // placed to fail.
    let third = &jobs[2];
    controller
        .apply("web.yaml", &web_on_port(third, Some(port)))
        .await
        .expect("apply");
    wait_for(
        Duration::from_secs(15),
        "the job blocked on its port",
        || async {
            controller.job(third).await.is_ok_and(|d| {
                d.summary.status == "blocked"
                    && d.summary
                        .message
                        .contains(&format!("port {port}/tcp in use on"))
            })
        },
    )
    .await
    .expect("blocked");
    let d = controller.job(third).await.expect("job");
    eprintln!("{}", d.summary.message);
    assert!(
        d.summary
            .message
            .contains("1 of 1 replicas could not be placed: 0/2 nodes fit: 2 port"),
        "{}",
        d.summary.message
    );
    assert!(
        jobs[..2]
            .iter()
            .any(|j| d.summary.message.contains(&format!("by job {j}"))),
        "{}",
        d.summary.message
    );
    assert!(d.allocations.is_empty(), "{:?}", d.allocations);
    // Still running, still answering: the first two were not disturbed.
    for (job, node) in jobs[..2].iter().zip(&nodes) {
        assert_eq!(
            http_get(&ip_of[node], port).await.as_deref(),
            Some(job.as_str())
        );
    }

    // A port without hostPort: the API reports the port taken from the range,
    // and the job answers there.
    let dynamic = &jobs[3];
    controller
        .apply("web.yaml", &web_on_port(dynamic, None))
        .await
        .expect("apply");
    wait_for(
        Duration::from_secs(30),
        "the dynamic replica running",
        || async { running(&controller, dynamic).await.len() == 1 },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", futures_job(&controller, dynamic)));
    let alloc = running(&controller, dynamic).await.remove(0);
    let host_port = alloc.ports[0].host_port;
    assert!(
        (first..=first + 9).contains(&host_port),
        "{host_port} outside {range}"
    );
    let ip = ip_of[&alloc.node].clone();
    wait_for(
        Duration::from_secs(15),
        "the dynamic port answering",
        || async { http_get(&ip, host_port).await.as_deref() == Some(dynamic.as_str()) },
    )
    .await
    .expect("answers");
    // The CLI shows the same port.
    let out = controller.cli(&["alloc", "list", "--job", dynamic, "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(listed[0]["ports"][0]["host_port"], u64::from(host_port));
}

/// Regression: a system job on two nodes showed `1 wanted, 2 running` in `job
/// status` and `job list`; it wants one replica per eligible node.
#[tokio::test]
async fn a_system_job_wants_one_replica_per_eligible_node() {
    let f = fleet(2).await;
    let job = format!("sys-{}", std::process::id());
    let _cleanup = JobCleanup(job.clone());
    let manifest = service(&job, 1, "").replace("type: service", "type: system");
    f.controller
        .apply("sys.yaml", &manifest)
        .await
        .expect("apply");
    wait_for(Duration::from_secs(30), "one replica per node", || async {
        running(&f.controller, &job).await.len() == 2
    })
    .await
    .expect("running");
    let d = f.controller.job(&job).await.expect("job");
    assert_eq!((d.summary.replicas, d.summary.running), (2, 2));
    let out = f.controller.cli(&["job", "status", &job]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("2 wanted, 2 running"), "{text}");
}

/// `novacron job stop NAME --purge`, as typed: the job stops, and once its
/// allocations have stopped the controller forgets it (versions and
/// allocations; its events stay), its containers go, and the name is free:
/// applied again, it starts at version 1.
#[tokio::test]
async fn a_purged_job_is_forgotten_with_its_allocations_and_its_name_is_free() {
    let f = fleet(1).await;
    let c = &f.controller;
    let job = format!("purged-{}", std::process::id());
    let _cleanup = JobCleanup(job.clone());
    c.apply("purged.yaml", &service(&job, 1, ""))
        .await
        .expect("apply");
    wait_for(Duration::from_secs(60), "purged running", || async {
        running(c, &job).await.len() == 1
    })
    .await
    .expect("running");
    let alloc = running(c, &job).await[0].id.clone();
    assert!(!container_of(&alloc).is_empty(), "its container runs");
    let out = c.cli(&["job", "stop", &job, "--purge", "--wait", "60s"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("job {job} stopped and purged")),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Gone from the API and the CLI's views.
    assert!(c.job(&job).await.is_err(), "the job is still shown");
    let list = c.cli(&["job", "list"]);
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(&job),
        "{}",
        String::from_utf8_lossy(&list.stdout)
    );
    let show = c.cli(&["job", "show", &job]);
    assert!(!show.status.success(), "job show of a purged job succeeded");
    let allocs = c.cli(&["alloc", "list", "-o", "json"]);
    assert!(
        !String::from_utf8_lossy(&allocs.stdout).contains(&alloc),
        "the allocation is still listed"
    );
    // Its container goes from the node, stopped or not.
    wait_for(Duration::from_secs(30), "the container removed", || async {
        docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=novacron.alloc={alloc}"),
        ])
        .is_ok_and(|s| s.is_empty())
    })
    .await
    .expect("container removed");
    // The events stay, with the purge.
    let events = c.cli(&["events", "--job", &job, "-o", "json"]);
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(
        events.contains("job.stopped") && events.contains("job.purged"),
        "{events}"
    );
    // The name is free: a new job, version 1.
    let again = c
        .apply("purged.yaml", &service(&job, 1, ""))
        .await
        .expect("apply again");
    assert_eq!(again["version"], 1, "{again}");
    // Unknown jobs are said so.
    let unknown = c.cli(&["job", "stop", "nosuchjob", "--purge"]);
    assert!(
        !unknown.status.success() && String::from_utf8_lossy(&unknown.stderr).contains("nosuchjob"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
}

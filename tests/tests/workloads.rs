//! Workloads end to end: a controller and two agents on loopback running containers
//! through the real Docker daemon.
//!
//! Both agents share this machine's daemon; each manages only the containers
//! labelled with its own node name.

use std::time::{Duration, Instant};

use novacron_common::wire::AllocState;
use novacron_controller::store::AllocRecord;
use novacron_tests::{
    Agent, Controller, JobCleanup, TEST_IMAGE, docker, ensure_test_image, wait_for,
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
        wait_for(Duration::from_secs(20), "agents ready", || async {
            matches!(controller.node(&a.name).await, Ok(Some(v)) if v.status.to_string() == "ready")
        })
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
    format!(
        "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: {name}
spec:
  type: service
  replicas: {replicas}
  task:
    image: {TEST_IMAGE}
    command: [sh, -c, 'echo started $NOVACRON_TEST; while true; do sleep 1; done']
    env:
      NOVACRON_TEST: hello
  resources:
    cpu: 100m
    memory: 32Mi
{extra}"
    )
}

async fn running(c: &Controller, job: &str) -> Vec<AllocRecord> {
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
    wait_for(Duration::from_secs(20), "the agent back", || async {
        matches!(f.controller.node(&f.agents[0].name).await, Ok(Some(v)) if v.status.to_string() == "ready")
    })
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

/// A service of one replica that answers HTTP with its own job name on container
/// port 80, published on host port `host_port` (none: the node's dynamic range).
fn web_on_port(name: &str, host_port: Option<u16>) -> String {
    let host_port = host_port.map_or(String::new(), |p| format!(", hostPort: {p}"));
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
    command: [sh, -c, 'mkdir -p /www && echo {name} > /www/index.html && exec httpd -f -p 80 -h /www']
    ports:
      - {{name: http, containerPort: 80{host_port}}}
  resources:
    cpu: 50m
    memory: 16Mi
"
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
        wait_for(Duration::from_secs(20), "agents ready", || async {
            matches!(controller.node(&a.name).await, Ok(Some(v)) if v.status.to_string() == "ready")
        })
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

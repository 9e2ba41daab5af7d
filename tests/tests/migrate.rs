//! Checkpoint and migration against real agents, real Docker daemons with CRIU, and
//! the project's own stateful workload (`novacron-counter`: an in-memory counter
//! over HTTP that also appends each count to a volume).
//!
//! Two agents run against two experimental Docker daemons (`NOVACRON_CKPT_DOCKER_A`
//! and `_B`, started by `packaging/checkpoint/setup-criu-docker.sh`, as `.ci/run`
//! does), like two hosts: an allocation migrated from one to the other must keep
//! its in-memory count (live) and its volume data (live and fs).
//!
//! Without those daemons the tests print a loud SKIPPED message and pass, unless
//! `NOVACRON_REQUIRE_LIVE=1` (CI sets it), where they fail.

use std::time::{Duration, Instant};

use novacron_api::AllocView;
use novacron_common::wire::AllocState;
use novacron_tests::counter_image::{CounterJob, counter_image};
use novacron_tests::{
    Agent, Controller, DaemonsCleanup, RuncCleanup, docker_on, free_port, wait_for,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Daemons {
    a: String,
    b: String,
}

fn daemons(test: &str) -> Option<Daemons> {
    let a = std::env::var("NOVACRON_CKPT_DOCKER_A").ok();
    let b = std::env::var("NOVACRON_CKPT_DOCKER_B").ok();
    match (a, b) {
        (Some(a), Some(b)) if !a.is_empty() && !b.is_empty() => Some(Daemons { a, b }),
        _ => {
            let msg = format!(
                "\n\n==============================================================\n\
                 SKIPPED {test}: live checkpoint/migration needs two experimental\n\
                 Docker daemons with CRIU. Run\n\
                 `sudo bash packaging/checkpoint/setup-criu-docker.sh` and export\n\
                 the variables it writes to /var/tmp/novacron-ckpt/env\n\
                 (NOVACRON_CKPT_DOCKER_A, NOVACRON_CKPT_DOCKER_B).\n\
                 ==============================================================\n"
            );
            if std::env::var("NOVACRON_REQUIRE_LIVE").as_deref() == Ok("1") {
                panic!("{msg}NOVACRON_REQUIRE_LIVE=1: refusing to skip");
            }
            eprintln!("{msg}");
            None
        }
    }
}

// Dropped in this order: the agents stop before their runc containers are
// removed, and the directory (which holds the runc containers' overlays) goes last.
struct Setup {
    controller: Controller,
    agents: Vec<Agent>,
    _runc: RuncCleanup,
    job: String,
    port: u16,
    d: Daemons,
    _cleanup: DaemonsCleanup,
    _dir: tempfile::TempDir,
}

/// A controller, agent `a` on daemon A running the counter job (mode `mode`), and
/// agent `b` on daemon B. `image_on_b`: build the image on B too.
async fn setup(test: &str, mode: &str, image_on_b: bool) -> Option<Setup> {
    setup_with(test, mode, image_on_b, &[], "").await
}

/// [`setup`] with extra flags for agent a and extra lines for the job's
/// `checkpoint:` block.
async fn setup_with(
    test: &str,
    mode: &str,
    image_on_b: bool,
    a_args: &[&str],
    checkpoint_extra: &str,
) -> Option<Setup> {
    setup_full(test, mode, image_on_b, a_args, &[], checkpoint_extra, "").await
}

/// [`setup_with`] with extra flags for agent b and extra lines for the job's
/// spec (after its `checkpoint:` block, indented two spaces).
async fn setup_full(
    test: &str,
    mode: &str,
    image_on_b: bool,
    a_args: &[&str],
    b_args: &[&str],
    checkpoint_extra: &str,
    spec_extra: &str,
) -> Option<Setup> {
    setup_serve(
        test,
        mode,
        image_on_b,
        a_args,
        b_args,
        checkpoint_extra,
        spec_extra,
        Extra::default(),
    )
    .await
}

/// What [`setup_serve`] adds to [`setup_full`].
#[derive(Default, Clone, Copy)]
struct Extra<'a> {
    /// The controller's `serve` flags.
    serve_args: &'a [&'a str],
    /// The counter's `DIRTY_MB`.
    dirty_mb: u64,
}

/// [`setup_full`] with [`Extra`]: the controller's `serve` flags, a dirtied
/// region.
#[allow(clippy::too_many_arguments)]
async fn setup_serve(
    test: &str,
    mode: &str,
    image_on_b: bool,
    a_args: &[&str],
    b_args: &[&str],
    checkpoint_extra: &str,
    spec_extra: &str,
    extra: Extra<'_>,
) -> Option<Setup> {
    let Extra {
        serve_args,
        dirty_mb,
    } = extra;
    let d = daemons(test)?;
    let image = counter_image(Some(&d.a)).expect("counter image on A");
    let image = if image_on_b {
        assert_eq!(
            counter_image(Some(&d.b)).expect("counter image on B"),
            image
        );
        image
    } else {
        // A tag that exists on A only.
        let only_a = format!("novacron-counter-only-a:{}", std::process::id());
        docker_on(&d.a, &["tag", &image, &only_a]).expect("tag");
        only_a
    };
    let dir = tempfile::Builder::new()
        .prefix("novacron-migrate-")
        .tempdir()
        .expect("tempdir");
    let controller = Controller::start(dir.path(), serve_args)
        .await
        .expect("controller");
    let pid = std::process::id();
    let job = format!("counter-{test}-{pid}").replace('_', "-");
    let volume = format!("{job}-data");
    let cleanup = DaemonsCleanup {
        hosts: vec![d.a.clone(), d.b.clone()],
        job: job.clone(),
        volume: volume.clone(),
    };
    let mut args = vec!["--docker-host", d.a.as_str()];
    args.extend_from_slice(a_args);
    let a = Agent::join_and_run(
        dir.path(),
        &controller,
        &format!("ma{pid}-{}", &test[..4.min(test.len())]),
        &args,
    )
    .await
    .expect("agent a");
    wait_ready(&controller, &a.name).await;
    let port = free_port();
    let manifest = CounterJob {
        disk_mb: 0,
        job: &job,
        image: &image,
        ballast_mb: 16,
        dirty_mb,
        port,
        volume: &volume,
        // Half a core: generating and summing the 16 MiB ballast (a debug build)
        // takes about 6 s and 2.8 s at 100m on these machines, past the
        // health checks and the 2 s request timeout.
        cpu_millis: 500,
        mode,
        checkpoint_extra,
    }
    .manifest()
        + spec_extra;
    controller
        .apply("counter.yaml", &manifest)
        .await
        .expect("apply");
    wait_for(
        Duration::from_secs(60),
        "the counter serves on a",
        || async { get(port, "/health").await.is_ok() },
    )
    .await
    .unwrap_or_else(|e| panic!("counter up: {e}\nagent a: {}", a.log()));
    let b = Agent::join_and_run(
        dir.path(),
        &controller,
        &format!("mb{pid}-{}", &test[..4.min(test.len())]),
        &[&["--docker-host", d.b.as_str()], b_args].concat(),
    )
    .await
    .expect("agent b");
    wait_ready(&controller, &b.name).await;
    let runc = RuncCleanup {
        state_dirs: vec![a.state_dir.clone(), b.state_dir.clone()],
    };
    Some(Setup {
        _dir: dir,
        _runc: runc,
        controller,
        agents: vec![a, b],
        job,
        port,
        d,
        _cleanup: cleanup,
    })
}

/// Node a dies: its agent and its containers.
async fn lose_node_a(s: &mut Setup) {
    s.agents[0].kill().await;
    let filter = format!("label=novacron.job={}", s.job);
    for id in docker_on(&s.d.a, &["ps", "-aq", "--filter", &filter])
        .expect("ps")
        .lines()
    {
        docker_on(&s.d.a, &["rm", "-f", id]).expect("rm");
    }
}

async fn wait_ready(c: &Controller, name: &str) {
    c.wait_ready(name, Duration::from_secs(30))
        .await
        .expect("ready");
}

async fn get(port: u16, path: &str) -> anyhow::Result<String> {
    get_at("127.0.0.1", port, path).await
}

async fn get_at(ip: &str, port: u16, path: &str) -> anyhow::Result<String> {
    let resp = reqwest::Client::new()
        .get(format!("http://{ip}:{port}{path}"))
        .timeout(Duration::from_secs(2))
        .send()
        .await?
        .error_for_status()?;
    Ok(resp.text().await?)
}

/// The job's running allocation, once the controller has heard that it runs: the
/// workload can answer before its agent's report arrives, so this waits (up to
/// 30 s) rather than reading one snapshot.
async fn the_alloc(s: &Setup) -> AllocView {
    let started = Instant::now();
    loop {
        let running = s
            .controller
            .job(&s.job)
            .await
            .expect("job")
            .allocations
            .into_iter()
            .find(|a| a.desired_run && a.state == AllocState::Running);
        match running {
            Some(a) => return a,
            None if started.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            None => panic!("no running allocation of {} after 30 s", s.job),
        }
    }
}

fn count_log(host: &str, job: &str) -> Vec<u64> {
    let id = docker_on(
        host,
        &["ps", "-q", "--filter", &format!("label=novacron.job={job}")],
    )
    .expect("ps");
    let id = id.lines().next().expect("a running container of the job");
    docker_on(host, &["exec", id, "cat", "/data/count.log"])
        .expect("read the volume")
        .lines()
        .map(|l| l.trim().parse().expect("a count per line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_keeps_the_in_memory_count_and_the_volume() {
    let Some(s) = setup("live", "live", true).await else {
        return;
    };
    for n in 1..=5 {
        assert_eq!(get(s.port, "/").await.expect("count"), n.to_string());
    }
    let ballast = get(s.port, "/ballast").await.expect("ballast");
    let alloc = the_alloc(&s).await;
    assert_eq!(alloc.node, s.agents[0].name);
    // A client keeps reading during the migration: open and queued connections
    // must not stop the dump (CRIU's tcp-close and skip-in-flight).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = tokio::spawn({
        let stop = stop.clone();
        let port = s.port;
        async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match get(port, "/count").await {
                    Ok(c) => {
                        assert_eq!(c, "5", "reads see the count of before, never a reset");
                        ok += 1;
                    }
                    Err(_) => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, failed)
        }
    });
    let out = s
        .controller
        .cli(&["alloc", "migrate", &alloc.id, "--to", &s.agents[1].name]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = poller.await.expect("the poller saw only the right count");
    eprintln!("during the migration: {ok} reads answered, {failed} failed");
    assert!(ok > 0, "the poller ran");
    assert!(
        out.status.success(),
        "migrate failed: {}{}\nagent a: {}\nagent b: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.agents[0].log(),
        s.agents[1].log()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("migrated") && text.contains(&s.agents[1].name),
        "{text}"
    );
    // The process went on where it stopped: memory, not a fresh start.
    assert_eq!(get(s.port, "/count").await.expect("count"), "5");
    assert_eq!(get(s.port, "/ballast").await.expect("ballast"), ballast);
    assert_eq!(get(s.port, "/").await.expect("count"), "6");
    let moved = the_alloc(&s).await;
    assert_eq!(moved.id, alloc.id);
    assert_eq!(moved.node, s.agents[1].name);
    assert_eq!(count_log(&s.d.b, &s.job), (1..=6).collect::<Vec<_>>());
    // The source removes its stopped container.
    wait_for(
        Duration::from_secs(30),
        "source container removed",
        || async {
            docker_on(
                &s.d.a,
                &[
                    "ps",
                    "-aq",
                    "--filter",
                    &format!("label=novacron.job={}", s.job),
                ],
            )
            .is_ok_and(|ids| ids.is_empty())
        },
    )
    .await
    .expect("the source cleans up");
    let events = s
        .controller
        .cli(&["events", "--alloc", &alloc.id, "-o", "json"]);
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(events.contains("migration.completed"), "{events}");
    // The bundle is listed.
    let list = s
        .controller
        .cli(&["checkpoint", "list", "--alloc", &alloc.id]);
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(list.contains("live"), "{list}");
}

/// The flags of an agent that runs its containers under runc, with the CRIU
/// that the setup script installed.
fn runc_args() -> Vec<String> {
    let criu = std::env::var("NOVACRON_CKPT_CRIU").unwrap_or_else(|_| {
        panic!(
            "NOVACRON_CKPT_CRIU is not set: run `sudo bash packaging/checkpoint/setup-criu-docker.sh` and export the variables in /var/tmp/novacron-ckpt/env"
        )
    });
    vec![
        "--container-runtime".to_owned(),
        "runc".to_owned(),
        "--criu".to_owned(),
        criu,
    ]
}

/// The lines of the counter's `count.log` in its volume on `host`, read from the
/// volume's directory (a runc container is not Docker's, so `docker exec`
/// cannot reach it).
fn volume_count_log(host: &str, volume: &str) -> Vec<u64> {
    let dir = docker_on(
        host,
        &["volume", "inspect", "-f", "{{.Mountpoint}}", volume],
    )
    .expect("volume inspect");
    std::fs::read_to_string(std::path::Path::new(&dir).join("count.log"))
        .expect("count.log in the volume")
        .lines()
        .map(|l| l.trim().parse().expect("a count per line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runc_container_migrates_live_post_copy_by_default() {
    runc_live_migration("runc", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runc_container_migrates_live_with_stop_copy_when_asked() {
    runc_live_migration("runcstop", Some("stop-copy")).await;
}

/// A runc container migrates live (post-copy unless `copy` says otherwise)
/// with its memory, its writable layer and its volume, while a client polls
/// it every 5 ms and never sees a reset count.
async fn runc_live_migration(test: &str, copy: Option<&str>) {
    let args = runc_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let Some(s) = setup_full(test, "live", true, &args, &args, "", "").await else {
        return;
    };
    // The container is the agent's, not Docker's: Docker holds only its sandbox.
    let alloc_containers =
        docker_on(&s.d.a, &["ps", "-aq", "--filter", "label=novacron.alloc"]).expect("ps");
    let sandboxes = docker_on(
        &s.d.a,
        &[
            "ps",
            "-q",
            "--filter",
            &format!("label=novacron.job={}", s.job),
        ],
    )
    .expect("ps");
    assert_eq!(
        sandboxes.lines().count(),
        1,
        "one running sandbox: {sandboxes}"
    );
    assert!(
        !alloc_containers.lines().any(|id| sandboxes.contains(id)),
        "the sandbox is not an allocation's container"
    );
    let shown = s.controller.cli(&["node", "show", &s.agents[0].name]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    let line = shown
        .lines()
        .find(|l| l.contains("Containers"))
        .unwrap_or_else(|| panic!("no Containers line in:\n{shown}"));
    assert!(
        line.contains("runc") && line.contains("agent-owned") && line.contains("CRIU"),
        "{line}"
    );

    for n in 1..=5 {
        assert_eq!(get(s.port, "/").await.expect("count"), n.to_string());
    }
    let ballast = get(s.port, "/ballast").await.expect("ballast");
    let alloc = the_alloc(&s).await;
    assert_eq!(alloc.node, s.agents[0].name);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = tokio::spawn({
        let stop = stop.clone();
        let port = s.port;
        async move {
            let (mut ok, mut failed, mut wrong) = (0u32, 0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match get(port, "/count").await {
                    Ok(c) if c == "5" => ok += 1,
                    Ok(c) => wrong.push(c),
                    Err(_) => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, failed, wrong)
        }
    });
    let mut migrate = vec!["alloc", "migrate", &alloc.id, "--to", &s.agents[1].name];
    if let Some(c) = copy {
        migrate.extend(["--mode", c]);
    }
    let out = s.controller.cli(&migrate);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed, wrong) = poller.await.expect("the poller");
    eprintln!("during the migration: {ok} reads answered, {failed} failed");
    assert!(
        wrong.is_empty(),
        "reads see the count of before, never a reset: {wrong:?}\nagent a: {}\nagent b: {}",
        s.agents[0].log(),
        s.agents[1].log()
    );
    assert!(
        out.status.success(),
        "migrate failed: {}{}\nagent a: {}\nagent b: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.agents[0].log(),
        s.agents[1].log()
    );
    assert_eq!(get(s.port, "/count").await.expect("count"), "5");
    assert_eq!(get(s.port, "/ballast").await.expect("ballast"), ballast);
    assert_eq!(get(s.port, "/").await.expect("count"), "6");
    let moved = the_alloc(&s).await;
    assert_eq!(
        (moved.id.as_str(), moved.node.as_str()),
        (alloc.id.as_str(), s.agents[1].name.as_str())
    );
    let volume = format!("{}-data", s.job);
    assert_eq!(
        volume_count_log(&s.d.b, &volume),
        (1..=6).collect::<Vec<_>>()
    );
    // The source removes its container and its sandbox.
    wait_for(Duration::from_secs(30), "source cleaned up", || async {
        let sandbox_gone = docker_on(
            &s.d.a,
            &[
                "ps",
                "-aq",
                "--filter",
                &format!("label=novacron.job={}", s.job),
            ],
        )
        .is_ok_and(|ids| ids.is_empty());
        let dirs = std::fs::read_dir(s.agents[0].state_dir.join("oci"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("oci-"))
                    .count()
            })
            .unwrap_or(0);
        sandbox_gone && dirs == 0
    })
    .await
    .expect("the source cleans up");
    // Streamed from source to target, not through a bundle.
    let events = s
        .controller
        .cli(&["events", "--alloc", &alloc.id, "-o", "json"]);
    let events = String::from_utf8_lossy(&events.stdout);
    let copy = copy.unwrap_or("post-copy");
    assert!(
        events.contains("migration.completed")
            && events.contains("live under runc")
            && events.contains(copy),
        "{events}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(copy), "{stdout}");
    // An operator's checkpoint right after the move, while the controller's
    // own (below) runs: it waits its turn instead of being refused as busy.
    novacron_tests::succeeded(&s.controller.cli(&["alloc", "checkpoint", &alloc.id]));
    // Nothing was stored on the way, so the store then gets a checkpoint of
    // the container where it runs now (its job has a checkpoint policy), for
    // a recovery if b is lost.
    let target = s.agents[1].name.clone();
    wait_for(
        Duration::from_secs(90),
        "a checkpoint taken on the target after the move",
        || async {
            let out = s
                .controller
                .cli(&["events", "--alloc", &alloc.id, "-o", "json"]);
            serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).is_ok_and(|events| {
                events.iter().any(|e| {
                    e["kind"] == "checkpoint.created"
                        && e["node"] == target.as_str()
                        && e["actor"] == "controller"
                })
            })
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent b: {}", s.agents[1].log()));
    // The files went out while the container served; inside the freeze only
    // what changed since (the volume's log, unchanged, stays out).
    let log_a = s.agents[0].log();
    assert!(
        log_a.contains("files sent before the freeze")
            && log_a.contains("the files' delta since the early copy is staged"),
        "agent a: {log_a}"
    );
    let restored = if copy == "post-copy" {
        "every page arrived"
    } else {
        "restored from its stream"
    };
    assert!(
        s.agents[1].log().contains(restored),
        "agent b: {}",
        s.agents[1].log()
    );
    if copy == "post-copy" {
        // CRIU's page server was reachable from loopback only, and its rule
        // is gone with it.
        let log = s.agents[0].log();
        let port = log
            .lines()
            .find(|l| l.contains("the page server's port is closed to other hosts"))
            .and_then(|l| l.split("port=").nth(1))
            .and_then(|p| p.split(|c: char| !c.is_ascii_digit()).next())
            .unwrap_or_else(|| panic!("the source did not guard its page server: {log}"))
            .to_owned();
        assert!(
            !page_server_rules().contains(&format!("--dport {port} ")),
            "the page server's rule outlived it: {}",
            page_server_rules()
        );
    }
}

/// A workload that rewrites 32 MiB at 4 MiB/s while it moves: post-copy
/// (the default) and stop-copy both bring every page across as it was at the
/// freeze, and the writer goes on from where it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runc_container_dirtying_its_memory_migrates_post_copy_with_every_page_intact() {
    dirtying_migration("runcdirty", "post-copy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runc_container_dirtying_its_memory_migrates_stop_copy_with_every_page_intact() {
    dirtying_migration("runcdirtys", "stop-copy").await;
}

/// `ok <round> <page>` from `/dirty`, as the writer's position in pages.
fn dirty_position(answer: &str, pages: u64) -> u64 {
    let mut parts = answer.split_whitespace();
    assert_eq!(parts.next(), Some("ok"), "{answer}");
    let round: u64 = parts.next().and_then(|r| r.parse().ok()).expect(answer);
    let page: u64 = parts.next().and_then(|p| p.parse().ok()).expect(answer);
    (round - 1) * pages + page
}

async fn dirtying_migration(test: &str, copy: &str) {
    const DIRTY_MB: u64 = 32;
    const PAGES: u64 = DIRTY_MB * 256;
    let args = runc_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let Some(s) = setup_serve(
        test,
        "live",
        true,
        &args,
        &args,
        "",
        "",
        Extra {
            dirty_mb: DIRTY_MB,
            ..Extra::default()
        },
    )
    .await
    else {
        return;
    };
    for n in 1..=3 {
        assert_eq!(get(s.port, "/").await.expect("count"), n.to_string());
    }
    let ballast = get(s.port, "/ballast").await.expect("ballast");
    let before = dirty_position(&get(s.port, "/dirty").await.expect("dirty"), PAGES);
    // A client holds a connection open through the move, half its request
    // sent.
    let mut held = tokio::net::TcpStream::connect(("127.0.0.1", s.port))
        .await
        .expect("connect");
    held.write_all(b"GET /count HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("half a request");
    let alloc = the_alloc(&s).await;
    let out = s.controller.cli(&[
        "alloc",
        "migrate",
        &alloc.id,
        "--to",
        &s.agents[1].name,
        "--mode",
        copy,
    ]);
    assert!(
        out.status.success(),
        "migrate failed: {}{}\nagent a: {}\nagent b: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.agents[0].log(),
        s.agents[1].log()
    );
    assert_eq!(the_alloc(&s).await.node, s.agents[1].name);
    // The held connection gets the answer (the connection moved) or a clean
    // end (closed, reset): never a hang.
    let _ = held.write_all(b"\r\n").await;
    let mut answer = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(20), held.read_to_end(&mut answer))
        .await
        .expect("the held connection ends, it does not hang");
    eprintln!(
        "{copy}: the held connection ended with {:?}, {} bytes",
        ended.as_ref().map_err(std::io::Error::kind),
        answer.len()
    );
    match ended {
        Ok(_) if answer.is_empty() => {}
        Ok(_) => {
            let text = String::from_utf8_lossy(&answer);
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        }
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            "{e}"
        ),
    }
    let after = get(s.port, "/dirty").await.expect("dirty after");
    let moved = dirty_position(&after, PAGES);
    assert!(moved > before, "the writer went on: {before} then {after}");
    // It keeps writing on the target, every page consistent.
    wait_for(Duration::from_secs(30), "the writer moves on", || async {
        get(s.port, "/dirty")
            .await
            .is_ok_and(|a| dirty_position(&a, PAGES) > moved)
    })
    .await
    .expect("writing on the target");
    assert_eq!(get(s.port, "/ballast").await.expect("ballast"), ballast);
    assert_eq!(get(s.port, "/").await.expect("count"), "4");
    if copy == "post-copy" {
        assert!(
            s.agents[1].log().contains("post-copy: every page arrived"),
            "agent a: {}\nagent b: {}",
            s.agents[0].log(),
            s.agents[1].log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_runc_migration_rolls_back_and_the_source_goes_on() {
    let args = runc_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // The image's tag exists on daemon A alone: the target cannot pull it.
    let Some(s) = setup_full("runcback", "live", false, &args, &args, "", "").await else {
        return;
    };
    for n in 1..=4 {
        assert_eq!(get(s.port, "/").await.expect("count"), n.to_string());
    }
    let alloc = the_alloc(&s).await;
    let out = s
        .controller
        .cli(&["alloc", "migrate", &alloc.id, "--to", &s.agents[1].name]);
    assert!(!out.status.success(), "the migration must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rolled back"), "{err}");
    // Back on the source, restored by runc from its own checkpoint.
    wait_for(
        Duration::from_secs(60),
        "running on the source again",
        || async { get(s.port, "/count").await.is_ok() },
    )
    .await
    .expect("the source serves again");
    assert_eq!(
        get(s.port, "/count").await.expect("count"),
        "4",
        "agent a: {}",
        s.agents[0].log()
    );
    assert_eq!(the_alloc(&s).await.node, s.agents[0].name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runc_migration_whose_target_cannot_restore_resumes_the_source_from_its_dump() {
    target_fails("runcdump", "stop-copy", Fault::Restore).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_copy_migration_whose_target_cannot_restore_thaws_the_source() {
    target_fails("runclazy", "post-copy", Fault::Restore).await;
}

/// The target's agent is killed (SIGKILL) once the whole stream is on the
/// target, as it starts the restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_copy_migration_whose_target_dies_resumes_the_source_from_its_dump() {
    target_fails("runcdies", "stop-copy", Fault::Dies).await;
}

/// The target's agent is killed (SIGKILL) as its page daemon starts: the
/// target dies at the start of the page transfer, while the source's frozen
/// process still holds every page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_copy_migration_whose_target_dies_mid_transfer_thaws_the_source() {
    target_fails("runclazydies", "post-copy", Fault::Dies).await;
}

/// What goes wrong on the target of [`target_fails`].
#[derive(Clone, Copy, PartialEq)]
enum Fault {
    /// Its CRIU fails every restore.
    Restore,
    /// Its agent is killed as the restore starts (post-copy: as its page
    /// daemon starts).
    Dies,
}

/// A live migration whose target fails after the source's freeze rolls back,
/// and the source goes on with the same memory: from its dump in stop-copy,
/// thawed by its CRIU in post-copy.
async fn target_fails(test: &str, copy: &str, fault: Fault) {
    let args = runc_args();
    let real = args[3].clone();
    // The target's CRIU answers its checks but fails every dump and restore
    // (runc drives CRIU as `criu swrk`), or kills its agent there: the failure
    // comes after the source's freeze and the whole stream. Only the target's
    // agent runs with this CRIU, so its command line names it.
    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("criu");
    // The target's host dies with its agent: its Docker containers (the
    // sandbox that publishes the ports) go too.
    let b_docker = std::env::var("NOVACRON_CKPT_DOCKER_B").unwrap_or_default();
    let dies = format!(
        "pkill -KILL -f \"novacron-agent run .*--criu $0\"; \
         docker -H {b_docker} ps -aq --filter name=counter-{test}- | xargs -r docker -H {b_docker} rm -f >/dev/null; exit 1;;"
    );
    let action = match (fault, copy) {
        (Fault::Restore, _) => "swrk|restore) echo 'injected failure' >&2; exit 1;;".to_owned(),
        (Fault::Dies, "post-copy") => format!("lazy-pages) {dies}"),
        (Fault::Dies, _) => format!("swrk) {dies}"),
    };
    std::fs::write(
        &broken,
        format!("#!/bin/sh\ncase \"$1\" in {action} esac\nexec {real} \"$@\"\n"),
    )
    .expect("wrapper");
    std::process::Command::new("chmod")
        .args(["+x"])
        .arg(&broken)
        .status()
        .expect("chmod");
    let a_args: Vec<&str> = args.iter().map(String::as_str).collect();
    let b_args = [
        "--container-runtime",
        "runc",
        "--criu",
        broken.to_str().expect("path"),
    ];
    let Some(mut s) = setup_full(test, "live", true, &a_args, &b_args, "", "").await else {
        return;
    };
    for n in 1..=4 {
        assert_eq!(get(s.port, "/").await.expect("count"), n.to_string());
    }
    let ballast = get(s.port, "/ballast").await.expect("ballast");
    let alloc = the_alloc(&s).await;
    let out = s.controller.cli(&[
        "alloc",
        "migrate",
        &alloc.id,
        "--to",
        &s.agents[1].name,
        "--mode",
        copy,
    ]);
    assert!(!out.status.success(), "the migration must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rolled back"), "{err}");
    wait_for(
        Duration::from_secs(60),
        "running on the source again",
        || async { get(s.port, "/count").await.is_ok() },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{err}\nagent a: {}\nagent b: {}\nevents: {}",
            s.agents[0].log(),
            s.agents[1].log(),
            String::from_utf8_lossy(&s.controller.cli(&["events"]).stdout)
        )
    });
    // From its own dump: the same memory, not a fresh start.
    assert_eq!(
        get(s.port, "/count").await.expect("count"),
        "4",
        "agent a: {}",
        s.agents[0].log()
    );
    assert_eq!(get(s.port, "/ballast").await.expect("ballast"), ballast);
    assert_eq!(the_alloc(&s).await.node, s.agents[0].name);
    let log = s.agents[0].log();
    let resumed = if copy == "post-copy" {
        // CRIU killed, the container thawed, then dumped and restored into
        // a new sandbox: its memory is kept.
        log.contains("images sent; CRIU serves the pages")
            && log.contains("gave the migration up during the page transfer")
            && log.contains("resumed from its migration's dump")
    } else {
        log.contains("streaming it") && log.contains("resumed from its migration's dump")
    };
    assert!(resumed, "agent a: {log}");
    assert_eq!(get(s.port, "/").await.expect("count"), "5");
    if fault == Fault::Dies {
        // The target comes back: whatever it had of the allocation is not
        // desired there, and the allocation stays where it runs.
        assert!(
            s.agents[1].log().contains("connected to the controller"),
            "agent b: {}",
            s.agents[1].log()
        );
        s.agents[1].start().expect("agent b again");
        wait_ready(&s.controller, &s.agents[1].name.clone()).await;
        let root = s.agents[1].state_dir.join("oci/runc");
        wait_for(
            Duration::from_secs(60),
            "nothing left on the target",
            || async {
                std::process::Command::new("runc")
                    .arg("--root")
                    .arg(&root)
                    .args(["list", "-q"])
                    .output()
                    .is_ok_and(|o| o.stdout.iter().all(u8::is_ascii_whitespace))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\nagent b: {}", s.agents[1].log()));
        let alloc = the_alloc(&s).await;
        assert_eq!(
            (alloc.node.as_str(), alloc.state),
            (s.agents[0].name.as_str(), AllocState::Running)
        );
        assert_eq!(get(s.port, "/").await.expect("count"), "6");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runc_container_outlives_its_agent_and_is_restarted_when_it_dies() {
    let args = runc_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // The agent's restart (a debug build under load) may take longer than the
    // default wait before a silent node is down, and a node that is down has
    // its work rescheduled: this test is about adoption, not node loss.
    let Some(mut s) = setup_serve(
        "runcadopt",
        "live",
        true,
        &args,
        &args,
        "",
        "",
        Extra {
            serve_args: &["--down-after", "60s"],
            ..Extra::default()
        },
    )
    .await
    else {
        return;
    };
    for n in 1..=3 {
        assert_eq!(get(s.port, "/").await.expect("count"), n.to_string());
    }
    let root = s.agents[0].state_dir.join("oci/runc");
    let list = std::process::Command::new("runc")
        .arg("--root")
        .arg(&root)
        .args(["list", "-q"])
        .output()
        .expect("runc list");
    let ids = String::from_utf8_lossy(&list.stdout).to_string();
    assert_eq!(ids.lines().count(), 1, "one runc container: {ids}");
    // The agent dies and comes back: the container ran on, and is adopted.
    s.agents[0].kill().await;
    assert_eq!(
        get(s.port, "/")
            .await
            .expect("count while the agent is down"),
        "4"
    );
    // runc's state of the running container is out of sight when the agent
    // comes back (seen under load: its directory missing for the agent's
    // first looks): a run whose shell has not ended is still running, never
    // "exited" and then replaced elsewhere.
    let state = root.join(ids.trim());
    let hidden = root.with_file_name("runc-hidden");
    std::fs::rename(&state, &hidden).expect("hide runc's state");
    s.agents[0].start().expect("agent a again");
    wait_ready(&s.controller, &s.agents[0].name.clone()).await;
    const UNKNOWN: &str = "runc does not know the container, but its run has not ended";
    let name = s.agents[0].name.clone();
    wait_for(
        Duration::from_secs(30),
        "the agent's first look",
        || async {
            s.agents[0].log().contains(UNKNOWN)
                || the_alloc(&s).await.node != name
                || the_alloc(&s).await.state != AllocState::Running
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent a: {}", s.agents[0].log()));
    let alloc = the_alloc(&s).await;
    assert_eq!(
        (alloc.node.as_str(), alloc.state),
        (name.as_str(), AllocState::Running),
        "agent a: {}\nevents: {}",
        s.agents[0].log(),
        String::from_utf8_lossy(&s.controller.cli(&["events"]).stdout)
    );
    assert!(s.agents[0].log().contains(UNKNOWN));
    assert_eq!(
        get(s.port, "/").await.expect("count after the restart"),
        "5"
    );
    std::fs::rename(&hidden, &state).expect("runc's state back");
    // Its process is killed behind the agent's back: the supervisor sees the
    // exit and starts it again, from the image (the count starts over).
    let killed = std::process::Command::new("runc")
        .arg("--root")
        .arg(&root)
        .args(["kill", ids.trim(), "KILL"])
        .output()
        .expect("runc kill");
    assert!(killed.status.success(), "{killed:?}");
    wait_for(Duration::from_secs(60), "restarted", || async {
        get(s.port, "/count").await.is_ok_and(|c| c == "0")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent a: {}", s.agents[0].log()));
    let alloc = the_alloc(&s).await;
    let shown = s.controller.cli(&["alloc", "show", &alloc.id]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown
            .lines()
            .any(|l| l.trim_start().starts_with("Restarts")
                && l.split_whitespace().last() == Some("1")),
        "{shown}\nagent a: {}\nevents: {}",
        s.agents[0].log(),
        String::from_utf8_lossy(&s.controller.cli(&["events"]).stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_migration_keeps_the_volume_data() {
    let Some(s) = setup("fsmode", "fs", true).await else {
        return;
    };
    for n in 1..=3 {
        assert_eq!(get(s.port, "/").await.expect("count"), n.to_string());
    }
    let alloc = the_alloc(&s).await;
    let out = s.controller.cli(&["alloc", "migrate", &alloc.id]);
    assert!(
        out.status.success(),
        "migrate failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(the_alloc(&s).await.node, s.agents[1].name);
    // A fresh process (fs mode carries files, not memory) on the same data.
    assert_eq!(get(s.port, "/count").await.expect("count"), "0");
    assert_eq!(count_log(&s.d.b, &s.job), vec![1, 2, 3]);
}

/// During a rolling upgrade, work moves from a node still on the old release
/// (wire protocol 2) to an upgraded one: the checkpoint request, the bundle's
/// transfer from the old node and the desired sets cross the version-2 link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_migration_from_a_version_2_node_to_an_upgraded_one() {
    let Some(s) = setup_with("oldlive", "live", true, &["--wire-versions", "2"], "").await else {
        return;
    };
    for n in 1..=3 {
        assert_eq!(get(s.port, "/").await.expect("count"), n.to_string());
    }
    let alloc = the_alloc(&s).await;
    assert_eq!(alloc.node, s.agents[0].name);
    assert!(
        s.agents[0].log().contains("protocol_version=2"),
        "{}",
        s.agents[0].log()
    );
    let out = s
        .controller
        .cli(&["alloc", "migrate", &alloc.id, "--to", &s.agents[1].name]);
    assert!(
        out.status.success(),
        "migrate failed: {}{}\nagent a: {}\nagent b: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.agents[0].log(),
        s.agents[1].log()
    );
    // The process went on where it stopped on the upgraded node.
    assert_eq!(get(s.port, "/count").await.expect("count"), "3");
    assert_eq!(get(s.port, "/").await.expect("count"), "4");
    let moved = the_alloc(&s).await;
    assert_eq!((moved.id, moved.node), (alloc.id, s.agents[1].name.clone()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_to_a_node_without_the_image_rolls_back_and_keeps_running() {
    let Some(s) = setup("noimage", "live", false).await else {
        return;
    };
    for n in 1..=4 {
        assert_eq!(get(s.port, "/").await.expect("count"), n.to_string());
    }
    let alloc = the_alloc(&s).await;
    let out = s
        .controller
        .cli(&["alloc", "migrate", &alloc.id, "--to", &s.agents[1].name]);
    assert!(
        !out.status.success(),
        "a migration to a node without the image must fail"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    // The target tries to pull the image (its tag exists on A alone, so the pull
    // fails) and the migration rolls back.
    assert!(
        err.contains("could not pull image") && err.contains("rolled back"),
        "{err}"
    );
    // Back on the source, from its checkpoint: the count goes on.
    wait_for(
        Duration::from_secs(60),
        "running on the source again",
        || async { get(s.port, "/count").await.is_ok() },
    )
    .await
    .expect("the source serves again");
    let count = get(s.port, "/count").await.expect("count");
    assert_eq!(count, "4", "agent a: {}", s.agents[0].log());
    let back = the_alloc(&s).await;
    assert_eq!(back.node, s.agents[0].name);
    let events = s
        .controller
        .cli(&["events", "--alloc", &alloc.id, "-o", "json"]);
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(events.contains("migration.rolled_back"), "{events}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_s_allocation_restores_from_its_latest_checkpoint() {
    let Some(mut s) = setup("nodeloss", "live", true).await else {
        return;
    };
    for n in 1..=7 {
        assert_eq!(get(s.port, "/").await.expect("count"), n.to_string());
    }
    let alloc = the_alloc(&s).await;
    let out = s.controller.cli(&["alloc", "checkpoint", &alloc.id]);
    assert!(
        out.status.success(),
        "checkpoint failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Work after the checkpoint is lost with the node.
    assert_eq!(get(s.port, "/").await.expect("count"), "8");
    // The node dies: its agent and its containers.
    lose_node_a(&mut s).await;
    let started = Instant::now();
    wait_for(
        Duration::from_secs(90),
        "the replacement serves",
        || async { get(s.port, "/count").await.is_ok() },
    )
    .await
    .expect("replacement up");
    eprintln!("recovered in {:?}", started.elapsed());
    // Restored from the checkpoint: 7, not a fresh 0.
    assert_eq!(get(s.port, "/count").await.expect("count"), "7");
    // The container answers a moment before its agent reports it running.
    wait_for(
        Duration::from_secs(10),
        "the replacement reported running",
        || async {
            s.controller.job(&s.job).await.is_ok_and(|j| {
                j.allocations
                    .iter()
                    .any(|a| a.desired_run && a.state == AllocState::Running)
            })
        },
    )
    .await
    .expect("reported running");
    let replacement = the_alloc(&s).await;
    assert_ne!(replacement.id, alloc.id);
    assert_eq!(replacement.node, s.agents[1].name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_checkpoint_is_refused_by_digest_and_the_replacement_starts_fresh() {
    let Some(mut s) = setup("corrupt", "live", true).await else {
        return;
    };
    for n in 1..=3 {
        assert_eq!(get(s.port, "/").await.expect("count"), n.to_string());
    }
    let alloc = the_alloc(&s).await;
    let out = s
        .controller
        .cli(&["alloc", "checkpoint", &alloc.id, "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let digest = info["digest"].as_str().expect("digest").to_string();
    // Flip one byte in the controller's stored copy.
    let stored = s
        .controller
        .data_dir
        .join("bundles")
        .join("sha256")
        .join(&digest);
    let mut bytes = std::fs::read(&stored).expect("the stored bundle");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&stored, &bytes).expect("corrupt it");
    // The node dies; its replacement must not restore the corrupted bundle.
    lose_node_a(&mut s).await;
    wait_for(
        Duration::from_secs(90),
        "the replacement serves",
        || async { get(s.port, "/health").await.is_ok() },
    )
    .await
    .expect("replacement up");
    // From scratch, not from the damaged state.
    assert_eq!(get(s.port, "/count").await.expect("count"), "0");
    let events = s
        .controller
        .cli(&["events", "--type", "checkpoint", "-o", "json"]);
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(
        events.contains(&digest) && events.contains("starts from scratch"),
        "{events}"
    );
    assert!(
        s.agents[1].log().contains(&digest) && s.agents[1].log().contains("is corrupt"),
        "agent b: {}",
        s.agents[1].log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spot_notice_moves_the_work_away_before_the_deadline() {
    let notice = tempfile::NamedTempFile::new().expect("notice file");
    let path = notice.path().to_str().expect("utf-8 path").to_string();
    let Some(s) = setup_with(
        "spot",
        "auto",
        true,
        &["--spot-notice", &path],
        "    interval: 10s\n",
    )
    .await
    else {
        return;
    };
    for n in 1..=2 {
        assert_eq!(get(s.port, "/").await.expect("count"), n.to_string());
    }
    let alloc = the_alloc(&s).await;
    // The job's interval takes periodic checkpoints on its own.
    wait_for(Duration::from_secs(40), "a periodic checkpoint", || async {
        let out = s
            .controller
            .cli(&["checkpoint", "list", "--alloc", &alloc.id, "-o", "json"]);
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).is_ok_and(|l| !l.is_empty())
    })
    .await
    .expect("periodic checkpoint");
    // The provider announces the end of node a in two minutes.
    let in_two_minutes = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
        + 120;
    let deadline =
        chrono::DateTime::from_timestamp(in_two_minutes as i64, 0).expect("a valid time");
    std::fs::write(
        &path,
        format!(
            "{{\"action\": \"terminate\", \"time\": \"{}\"}}",
            deadline.format("%Y-%m-%dT%H:%M:%SZ")
        ),
    )
    .expect("write the notice");
    wait_for(Duration::from_secs(60), "moved to b", || async {
        s.controller.job(&s.job).await.is_ok_and(|j| {
            j.allocations.iter().any(|a| {
                a.id == alloc.id && a.node == s.agents[1].name && a.state == AllocState::Running
            })
        })
    })
    .await
    .expect("the spot notice moved the allocation");
    assert_eq!(get(s.port, "/count").await.expect("count"), "2");
    let events = s
        .controller
        .cli(&["events", "--node", &s.agents[0].name, "-o", "json"]);
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(events.contains("node.spot_notice"), "{events}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_drain_migrate_moves_every_allocation_with_its_state() {
    let Some(s) = setup("drain", "live", true).await else {
        return;
    };
    for n in 1..=3 {
        assert_eq!(get(s.port, "/").await.expect("count"), n.to_string());
    }
    let refused = s.controller.cli(&["node", "drain", &s.agents[0].name]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--migrate"));
    let out = s
        .controller
        .cli(&["node", "drain", &s.agents[0].name, "--migrate"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("moved to"));
    assert_eq!(the_alloc(&s).await.node, s.agents[1].name);
    assert_eq!(get(s.port, "/count").await.expect("count"), "3");
}

/// The agents' ingress follows a live migration: before it, both nodes' ingress
/// reach the replica on a; after it, both reach it on b, with its memory. A
/// single replica has no other endpoint while it is frozen, so requests during
/// the migration may get the ingress's 503; the two-replica case is in
/// `tests/tests/ingress.rs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingress_follows_a_live_migration() {
    let pid = std::process::id();
    let ingress = free_port();
    let (ip_a, ip_b) = ("127.0.0.31", "127.0.0.32");
    let Some(s) = setup_full(
        "ingress",
        "live",
        true,
        &["--ingress-address", ip_a],
        &["--ingress-address", ip_b],
        "",
        &format!(
            "  services:\n    - {{name: counter{pid}, port: http, ingress: {{port: {ingress}}}}}\n"
        ),
    )
    .await
    else {
        return;
    };
    for ip in [ip_a, ip_b] {
        wait_for(Duration::from_secs(30), "the ingress to serve", || async {
            get_at(ip, ingress, "/count").await.is_ok()
        })
        .await
        .unwrap_or_else(|e| panic!("{e} on {ip}"));
    }
    for n in 1..=2 {
        assert_eq!(
            get_at(ip_a, ingress, "/").await.expect("via a").trim(),
            n.to_string()
        );
    }
    assert_eq!(get_at(ip_b, ingress, "/").await.expect("via b").trim(), "3");
    let alloc = the_alloc(&s).await;
    let out = s
        .controller
        .cli(&["alloc", "migrate", &alloc.id, "--to", &s.agents[1].name]);
    assert!(
        out.status.success(),
        "migrate failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let moved = Instant::now();
    for ip in [ip_a, ip_b] {
        wait_for(Duration::from_secs(15), "the ingress to follow", || async {
            get_at(ip, ingress, "/count")
                .await
                .is_ok_and(|c| c.trim() == "3")
        })
        .await
        .unwrap_or_else(|e| panic!("{e} on {ip}"));
    }
    eprintln!(
        "migration done to both ingresses serving: {:?}",
        moved.elapsed()
    );
    assert_eq!(get_at(ip_a, ingress, "/").await.expect("via a").trim(), "4");
    assert_eq!(the_alloc(&s).await.node, s.agents[1].name);
}

/// The promise for services: a two-replica HTTP service behind the
/// agents' ingress answers every request of a client that never retries while
/// one replica is live-migrated to another node. The moving replica leaves the
/// catalog and the ingress table first (`shutdownDelay` before the freeze), so
/// the ingress sends everything to the other replica until it runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_replica_service_answers_every_request_through_a_live_migration() {
    let Some(d) = daemons("two_replica_migration") else {
        return;
    };
    let image = counter_image(Some(&d.a)).expect("counter image on A");
    assert_eq!(
        counter_image(Some(&d.b)).expect("counter image on B"),
        image
    );
    let dir = tempfile::Builder::new()
        .prefix("novacron-migrate-2r-")
        .tempdir()
        .expect("tempdir");
    let controller = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let pid = std::process::id();
    let job = format!("two-{pid}");
    let _cleanup = DaemonsCleanup {
        hosts: vec![d.a.clone(), d.b.clone()],
        job: job.clone(),
        volume: format!("{job}-none"),
    };
    // Each agent publishes on its own loopback address: the two daemons share
    // the host's ports, and the scheduler hands out each node's ports alone.
    let (ip_a, ip_b) = ("127.0.0.41", "127.0.0.42");
    let mut agents = Vec::new();
    for (name, host, ip) in [("a", &d.a, ip_a), ("b", &d.b, ip_b)] {
        let agent = Agent::join_and_run(
            dir.path(),
            &controller,
            &format!("t{name}{pid}"),
            &[
                "--docker-host",
                host.as_str(),
                "--publish-address",
                ip,
                "--ingress-address",
                ip,
            ],
        )
        .await
        .expect("agent");
        wait_ready(&controller, &agent.name).await;
        agents.push(agent);
    }
    let ingress = free_port();
    let manifest = format!(
        "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: {job}
spec:
  type: service
  replicas: 2
  task:
    image: {image}
    env:
      DATA_FILE: /tmp/count.log
    ports:
      - name: http
        containerPort: 8080
    shutdownDelay: 2s
  resources:
    cpu: 100m
    memory: 64Mi
  health:
    readiness:
      http: {{port: 8080, path: /health}}
      period: 1s
      timeout: 500ms
  checkpoint:
    mode: live
  services:
    - {{name: two{pid}, port: http, ingress: {{port: {ingress}}}}}
"
    );
    controller
        .apply("two.yaml", &manifest)
        .await
        .expect("apply");
    let running = || async {
        controller
            .job(&job)
            .await
            .map(|j| {
                j.allocations
                    .into_iter()
                    .filter(|a| a.desired_run && a.state == AllocState::Running)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    wait_for(
        Duration::from_secs(60),
        "two replicas behind the ingress",
        || async {
            running().await.len() == 2
                && get_at(ip_a, ingress, "/count").await.is_ok()
                && get_at(ip_b, ingress, "/count").await.is_ok()
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; agent a log:\n{}", agents[0].log()));
    // Both replicas must be behind the ingress before the move.
    wait_for(
        Duration::from_secs(15),
        "two endpoints in the catalog",
        || async {
            controller
                .cli(&["service", "show", &format!("two{pid}"), "-o", "json"])
                .stdout
                .windows(b"\"healthy\": true".len())
                .filter(|w| *w == b"\"healthy\": true")
                .count()
                == 2
        },
    )
    .await
    .expect("two healthy endpoints");
    let allocs = running().await;
    let moving = &allocs[0];
    let target = agents
        .iter()
        .find(|a| a.name != moving.node)
        .expect("another node")
        .name
        .clone();

    // A client that never retries, one GET every 20 ms through node a's ingress.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("client");
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = http
                    .get(format!("http://{ip_a}:{ingress}/count"))
                    .send()
                    .await;
                match r {
                    Ok(resp) if resp.status().is_success() => ok += 1,
                    Ok(resp) => failed.push(resp.status().to_string()),
                    Err(e) => failed.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    // The CLI blocks this thread; the client runs on the other worker.
    let out = controller.cli(&["alloc", "migrate", &moving.id, "--to", &target]);
    assert!(
        out.status.success(),
        "migrate failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let migrated = started.elapsed();
    wait_for(
        Duration::from_secs(20),
        "both replicas serve again",
        || async {
            let now = running().await;
            now.len() == 2 && now.iter().any(|a| a.node == target && a.id == moving.id)
        },
    )
    .await
    .expect("moved");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = client.await.expect("client");
    eprintln!(
        "two replicas, one live-migrated in {migrated:?}: {ok} requests answered, {} failed",
        failed.len()
    );
    assert!(ok > 50, "the client ran through the migration ({ok})");
    assert!(failed.is_empty(), "failed requests: {failed:?}");
}

/// Whether a container on the default bridge reaches this host's `port` at
/// its default gateway (the bridge's address on this host), as another host
/// would: its packets arrive on the bridge, not on `lo`.
fn reachable_from_a_container(port: u16) -> anyhow::Result<bool> {
    let script = format!(
        "gw=$(ip route | sed -n 's/^default via \\([0-9.]*\\).*/\\1/p'); \
         [ -n \"$gw\" ] || exit 99; nc -w 3 \"$gw\" {port} </dev/null"
    );
    let out = std::process::Command::new("docker")
        .args([
            "run",
            "--rm",
            novacron_tests::TEST_IMAGE,
            "sh",
            "-c",
            &script,
        ])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.code() != Some(99) && !stderr.contains("Unable to find image"),
        "the container found no gateway or did not run: {stderr}"
    );
    Ok(out.status.success())
}

fn page_server_rules() -> String {
    let out = std::process::Command::new("iptables")
        .args(["-w", "5", "-S", "INPUT"])
        .output()
        .expect("iptables");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(novacron_agent::runtime::oci::guard::COMMENT))
        .collect::<Vec<_>>()
        .join("\n")
}

/// CRIU's page server listens on every address (runc passes it only a port):
/// while it serves a post-copy migration, its port is closed to everything
/// but loopback, and opened again after, by the real rules in the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_server_s_port_is_closed_to_other_hosts_while_guarded() -> anyhow::Result<()> {
    use novacron_agent::runtime::oci::guard::{PortGuard, sweep, usable};
    novacron_tests::ensure_test_image()?;
    usable()
        .await
        .map_err(|e| anyhow::anyhow!("{e}: install iptables (bash .ci/setup checkpoint)"))?;
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", 0)).await?;
    let port = listener.local_addr()?.port();
    let accepting = tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            drop(conn);
        }
    });
    assert!(
        reachable_from_a_container(port)?,
        "the listener is not reachable from a container even unguarded"
    );

    let guard = PortGuard::arm(port).await.map_err(anyhow::Error::msg)?;
    let ours = || {
        page_server_rules()
            .lines()
            .filter(|l| l.contains(&format!("--dport {port} ")))
            .count()
    };
    assert!(ours() > 0, "{}", page_server_rules());
    // Another agent starting on this host (as the tests run them, in
    // parallel) sweeps only the rules of processes gone: this one stays.
    sweep().await;
    assert!(
        ours() > 0,
        "a sweep removed a running process's rule: {}",
        page_server_rules()
    );
    assert!(
        !reachable_from_a_container(port)?,
        "a guarded port answered another host"
    );
    // The agent's own way in, loopback, stays open.
    tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    guard.disarm().await;
    assert_eq!(ours(), 0, "{}", page_server_rules());
    assert!(reachable_from_a_container(port)?);

    // An agent that died while it guarded left its rule (written here as it
    // would have, under its process id); the next agent's start removes it.
    let mut gone = std::process::Command::new("true").spawn()?;
    let dead = gone.id();
    gone.wait()?;
    let mut args = vec!["-I".to_owned(), "INPUT".to_owned(), "1".to_owned()];
    args.extend(novacron_agent::runtime::oci::guard::rule(port, dead));
    let out = std::process::Command::new("iptables")
        .args(&args)
        .output()?;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(ours(), 1, "{}", page_server_rules());
    sweep().await;
    assert_eq!(ours(), 0, "{}", page_server_rules());
    accepting.abort();
    Ok(())
}

/// A live checkpoint of a runc container (the container runs on) pauses its
/// clients for the dump and resets none of them: neither a connection held
/// open through it nor new ones made while it runs (CRIU's `tcp-close` on a
/// dump leaves live connections alone). The held connection ended at the
/// first checkpoint until the test server retried the read that CRIU's
/// freeze interrupts (EINTR, on a socket with a timeout); one held as long
/// without a checkpoint answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_checkpoint_of_a_runc_container_resets_no_client() {
    let args = runc_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let Some(s) = setup_serve(
        "runcckpt",
        "live",
        true,
        &args,
        &args,
        "",
        "",
        Extra::default(),
    )
    .await
    else {
        return;
    };
    assert_eq!(get(s.port, "/").await.expect("count"), "1");
    let mut held = tokio::net::TcpStream::connect(("127.0.0.1", s.port))
        .await
        .expect("connect");
    held.write_all(b"GET /count HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("half a request");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = tokio::spawn({
        let stop = stop.clone();
        let port = s.port;
        async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match get(port, "/count").await {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(format!("{e:#}")),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, failed)
        }
    });
    let alloc = the_alloc(&s).await;
    for _ in 0..3 {
        novacron_tests::succeeded(&s.controller.cli(&["alloc", "checkpoint", &alloc.id]));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = poller.await.expect("the poller");
    eprintln!(
        "through 3 checkpoints: {ok} reads answered, {} failed",
        failed.len()
    );
    held.write_all(b"\r\n")
        .await
        .expect("the rest of the request");
    let mut answer = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), held.read(&mut answer))
        .await
        .expect("the held connection answers")
        .expect("the held connection is not reset");
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(failed.is_empty(), "reads failed: {failed:?}");
}

//! The control plane stays trustworthy under hostile or failing input (issue 12):
//! manifests built to stall the parser are refused while the API and the agent
//! links keep going, and a full disk neither invents nor loses state.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use novacron_controller::api::MAX_MANIFEST_BYTES;
use novacron_tests::{Agent, Controller, JobCleanup, ensure_test_image, service_job, wait_for};

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("novacron-e2e-")
        .tempdir()
        .expect("tempdir")
}

/// How many times the agent log says it (re)connected.
fn connections(agent: &Agent) -> usize {
    agent.log().matches("connected to the controller").count()
}

/// A manifest of `open`/`close` pairs nested as deep as the size limit allows.
fn deep(open: &str, close: &str) -> String {
    let pairs = (MAX_MANIFEST_BYTES - 16) / (open.len() + close.len());
    format!("{}1{}\n", open.repeat(pairs), close.repeat(pairs))
}

/// Issue 12: two deeply nested manifests (240 KB took 81 s of CPU each) stalled
/// the API for 21-50 s and dropped every agent's link. Two at once, each as large
/// as the limit allows, are now refused with the depth and the limit, while
/// `/healthz` keeps answering within 1 s and the node stays ready and connected.
#[tokio::test]
async fn two_deep_manifests_at_once_are_refused_while_the_api_and_links_stay_up() {
    let dir = tempdir();
    let controller = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let agent = Agent::join_and_run(dir.path(), &controller, "n1", &[])
        .await
        .expect("agent");
    controller
        .wait_ready("n1", Duration::from_secs(20))
        .await
        .expect("ready");
    // The controller counts the node ready on its hello; the agent logs the link
    // once the welcome is back, a moment later.
    wait_for(
        Duration::from_secs(10),
        "the agent's connected line",
        || async { connections(&agent) >= 1 },
    )
    .await
    .expect("connected");
    let connected = connections(&agent);
    assert_eq!(connected, 1, "one connection before: {}", agent.log());

    let client = controller.admin_client().expect("client");
    let apply = |manifest: String| {
        let (client, url) = (client.clone(), format!("{}/v1/jobs", controller.api()));
        tokio::spawn(async move {
            let resp = client
                .post(url)
                .json(&serde_json::json!({ "file": "deep.yaml", "manifest": manifest }))
                .send()
                .await
                .expect("an answer");
            let status = resp.status();
            let body: serde_json::Value = resp.json().await.expect("JSON");
            (status, body)
        })
    };
    let started = Instant::now();
    let flow = apply(deep("[", "]"));
    let mapping = apply(deep("{a: ", "}"));

    // Probe while they are in flight, and for a while after.
    let mut slowest = Duration::ZERO;
    let mut probes = 0;
    while started.elapsed() < Duration::from_secs(5)
        || !(flow.is_finished() && mapping.is_finished())
    {
        let asked = Instant::now();
        let health = tokio::time::timeout(
            Duration::from_secs(1),
            client.get(format!("{}/healthz", controller.api())).send(),
        )
        .await;
        assert!(
            matches!(&health, Ok(Ok(r)) if r.status().is_success()),
            "/healthz did not answer 200 within 1 s ({health:?})"
        );
        slowest = slowest.max(asked.elapsed());
        let node = controller.node("n1").await.expect("api").expect("n1");
        assert_eq!(node.status.to_string(), "ready", "n1 while parsing");
        probes += 1;
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the applies did not finish within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("{probes} probes, slowest /healthz {slowest:?}");

    for (what, task) in [("[[[", flow), ("{a: {a:", mapping)] {
        let (status, body) = task.await.expect("join");
        assert_eq!(status.as_u16(), 422, "{what}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with("deep.yaml:1:") && error.contains("65 levels deep"),
            "{what}: {error}"
        );
        assert!(error.contains("limit of 64"), "{what}: {error}");
    }
    assert_eq!(connections(&agent), connected, "the link never dropped");
    let node = controller.node("n1").await.expect("api").expect("n1");
    assert_eq!(node.status.to_string(), "ready");

    // The CLI refuses the same file before sending it.
    let file = dir.path().join("deep.yaml");
    std::fs::write(&file, deep("[", "]")).expect("write");
    let out = controller.cli(&["apply", "-f", &file.display().to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("levels deep"), "{stderr}");
}

/// A tmpfs mounted for the test, unmounted (lazily, so also while something still
/// holds it) when dropped, also when the test fails.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs to fill it, and needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes `path` until the filesystem is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("filler");
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(28), "filling stops at ENOSPC: {e}");
                break;
            }
        }
    }
    // The last partial page, byte by byte.
    while f.write(&[0x5a]).is_ok_and(|n| n == 1) {
        written += 1;
    }
    written
}

/// A job whose manifest is `pad` bytes longer than it needs to be (a comment), so
/// that saving it needs fresh space in the store file.
fn padded_job(name: &str, pad: usize) -> String {
    service_job(
        name,
        1,
        "while true; do sleep 1; done",
        "",
        &format!("# {}\n", "p".repeat(pad)),
    )
}

async fn get(c: &Controller, path: &str) -> (u16, String) {
    let resp = c
        .admin_client()
        .expect("client")
        .get(format!("{}{path}", c.api()))
        .send()
        .await
        .expect("an answer");
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

async fn post_job(c: &Controller, manifest: &str) -> (u16, serde_json::Value) {
    let resp = c
        .admin_client()
        .expect("client")
        .post(format!("{}/v1/jobs", c.api()))
        .json(&serde_json::json!({ "file": "job.yaml", "manifest": manifest }))
        .send()
        .await
        .expect("an answer");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

async fn job_names(c: &Controller) -> Vec<(String, u64)> {
    let (status, body) = get(c, "/v1/jobs").await;
    assert_eq!(status, 200, "{body}");
    let jobs: Vec<serde_json::Value> = serde_json::from_str(&body).expect("jobs");
    jobs.iter()
        .map(|j| {
            (
                j["name"].as_str().unwrap_or_default().to_string(),
                j["version"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

async fn allocations_of(c: &Controller, job: &str) -> usize {
    let (status, body) = get(c, &format!("/v1/allocations?job={job}")).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Vec<serde_json::Value>>(&body)
        .expect("allocations")
        .len()
}

/// Issue 12: on a full disk an apply answered 500 yet the job stayed listed (and
/// would be scheduled) until a restart lost it; once space was freed every write
/// kept failing until a restart, while `/healthz` said ok. Now: 507, the job is
/// neither listed nor scheduled, `/readyz` is 503; after freeing space the next
/// apply succeeds without a restart, and a restart shows what was acknowledged.
#[tokio::test]
async fn a_full_disk_refuses_an_apply_without_inventing_or_losing_state() {
    ensure_test_image().expect("test image");
    let dir = tempdir();
    // The data directory on the tmpfs; the logs stay on the real disk.
    let disk = dir.path().join("controller");
    let _tmpfs = Tmpfs::mount(&disk, "48m");
    let mut controller = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let agents = dir.path().join("agents");
    std::fs::create_dir_all(&agents).expect("agents dir");
    let _agent = Agent::join_and_run(&agents, &controller, "n1", &[])
        .await
        .expect("agent");
    controller
        .wait_ready("n1", Duration::from_secs(20))
        .await
        .expect("ready");
    let suffix = std::process::id();
    let kept = format!("kept-{suffix}");
    let refused = format!("refused-{suffix}");
    let later = format!("later-{suffix}");
    let _cleanup = [
        JobCleanup(kept.clone()),
        JobCleanup(refused.clone()),
        JobCleanup(later.clone()),
    ];
    let (status, body) = post_job(&controller, &padded_job(&kept, 0)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(get(&controller, "/readyz").await.0, 200);

    let filler = disk.join("filler");
    let filled = fill(&filler);
    eprintln!("filled the tmpfs with {filled} bytes");
    let (status, body) = post_job(&controller, &padded_job(&refused, 200 * 1024)).await;
    assert_eq!(status, 507, "a full disk is 507: {body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("nothing was saved") && error.contains("full"),
        "{error}"
    );
    let listed = job_names(&controller).await;
    assert!(
        listed.iter().all(|(n, _)| *n != refused),
        "a refused job is not listed: {listed:?}"
    );
    let (ready, why) = get(&controller, "/readyz").await;
    assert_eq!(ready, 503, "not ready while the store cannot write: {why}");
    assert!(why.contains("cannot write"), "{why}");
    assert_eq!(get(&controller, "/healthz").await.0, 200, "alive all along");
    // Several reconcile passes later, nothing was placed for it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        allocations_of(&controller, &refused).await,
        0,
        "not scheduled"
    );
    assert!(
        job_names(&controller)
            .await
            .iter()
            .all(|(n, _)| *n != refused)
    );

    std::fs::remove_file(&filler).expect("free the space");
    wait_for(
        Duration::from_secs(10),
        "/readyz 200 once space is back",
        || async { get(&controller, "/readyz").await.0 == 200 },
    )
    .await
    .expect("ready again without a restart");
    let log = std::fs::read_to_string(dir.path().join("controller-1.log")).unwrap_or_default();
    assert!(
        log.contains("store reopened after an I/O error"),
        "redb latches an I/O error; the store reopened its file: {log}"
    );
    let (status, body) = post_job(&controller, &padded_job(&later, 200 * 1024)).await;
    assert_eq!(status, 200, "writes work again without a restart: {body}");
    assert_eq!(body["outcome"], "created");
    wait_for(Duration::from_secs(20), "the new job placed", || async {
        allocations_of(&controller, &later).await > 0
    })
    .await
    .expect("scheduled");

    let before = job_names(&controller).await;
    assert!(before.contains(&(kept.clone(), 1)), "{before:?}");
    assert!(before.contains(&(later.clone(), 1)), "{before:?}");
    assert!(before.iter().all(|(n, _)| *n != refused), "{before:?}");
    controller.stop().await;
    controller.restart().await.expect("restart");
    let after = job_names(&controller).await;
    assert_eq!(
        after, before,
        "a restart shows exactly what was acknowledged"
    );
    controller.stop().await;
}

//! Image pulls against a real registry: Debian's `docker-registry` (the CNCF
//! distribution registry) started by the test on a loopback port, which Docker
//! reaches over plain HTTP. A job whose image is only in the registry runs once
//! the node pulls it, a pinned digest runs that content, and a missing tag or an
//! unreachable registry fails the start with its reason.

use std::time::Duration;

use novacron_tests::registry::Registry;
use novacron_tests::{
    Agent, Controller, JobCleanup, TEST_IMAGE, commit_test_image, docker, ensure_test_image,
    free_port, job_containers, job_running, service_job, wait_for,
};

/// The message of the job's newest allocation that has one.
async fn message(c: &Controller, job: &str) -> String {
    c.job(job)
        .await
        .ok()
        .and_then(|d| {
            d.allocations
                .into_iter()
                .filter(|a| !a.message.is_empty())
                .max_by_key(|a| a.id.clone())
                .map(|a| a.message)
        })
        .unwrap_or_default()
}

async fn running(c: &Controller, job: &str) -> bool {
    job_running(c, job).await
}

/// The job's first running container (empty when none).
fn first_container(job: &str) -> String {
    job_containers(job).into_iter().next().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_pulls_what_the_job_names_and_says_why_a_pull_failed() {
    ensure_test_image().expect("test image");
    let dir = tempfile::Builder::new()
        .prefix("novacron-images-")
        .tempdir()
        .expect("tempdir");
    let registry = Registry::start(dir.path(), None)
        .await
        .expect("registry up");
    let port = registry.port;

    // An image that exists only in the registry.
    let pid = std::process::id();
    let remote = format!("127.0.0.1:{port}/novacron-test/pulled-{pid}:1");
    commit_test_image(&remote, "v1").expect("commit");
    docker(&["push", &remote]).expect("push to the loopback registry");
    let digest = docker(&[
        "image",
        "inspect",
        "-f",
        "{{index .RepoDigests 0}}",
        &remote,
    ])
    .expect("digest");
    assert!(digest.contains("@sha256:"), "{digest}");
    docker(&["rmi", &remote]).expect("untag");
    assert!(docker(&["image", "inspect", &remote]).is_err());

    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let agent = Agent::join_and_run(dir.path(), &c, &format!("img{pid}"), &[])
        .await
        .expect("agent");
    c.wait_ready(&agent.name, Duration::from_secs(20))
        .await
        .expect("ready");
    let script = "exec sleep 3600";
    let job = |name: &str, image: &str, extra: &str| {
        service_job(name, 1, script, extra, "").replace(TEST_IMAGE, image)
    };

    // if-not-present (the default): the node pulls the missing image and runs it.
    let pulled = format!("pull-{pid}");
    let _c1 = JobCleanup(pulled.clone());
    c.apply("pulled.yaml", &job(&pulled, &remote, ""))
        .await
        .expect("apply");
    wait_for(Duration::from_secs(60), "the pulled image to run", || {
        running(&c, &pulled)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", message_now(&c, &pulled)));
    assert!(docker(&["image", "inspect", &remote]).is_ok(), "pulled");

    // The version records the digest the tag resolved to...
    let history = c.cli(&["job", "history", &pulled, "-o", "json"]);
    let history = String::from_utf8_lossy(&history.stdout);
    assert!(
        history.contains(&format!("\"image_digest\": \"{digest}\"")),
        "{history}"
    );
    // ...and runs it after the tag moved: v2 is pushed under the same tag, v1 is
    // gone from the node, and the replica starting again pulls v1 by digest.
    commit_test_image(&remote, "v2").expect("commit");
    docker(&["push", &remote]).expect("push v2 under the same tag");
    let first = first_container(&pulled);
    docker(&["rm", "-f", &first]).expect("remove the container");
    docker(&["rmi", "-f", &digest]).expect("drop v1 from the node");
    wait_for(
        Duration::from_secs(60),
        "the replica running again",
        || async { running(&c, &pulled).await && first_container(&pulled) != first },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", message_now(&c, &pulled)));
    let again = first_container(&pulled);
    assert_eq!(
        docker(&["exec", &again, "cat", "/version"]).expect("exec"),
        "v1",
        "the pinned content, not the moved tag"
    );

    // A pinned digest runs that content after the local copy is gone.
    let stop = c.cli(&["job", "stop", &pulled]);
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    wait_for(Duration::from_secs(30), "the first job stopped", || async {
        !running(&c, &pulled).await
    })
    .await
    .expect("stopped");
    let _ = docker(&["rmi", "-f", &remote]);
    let pinned = format!("pin-{pid}");
    let _c2 = JobCleanup(pinned.clone());
    c.apply(
        "pinned.yaml",
        &job(&pinned, &digest, "    pullPolicy: if-not-present\n"),
    )
    .await
    .expect("apply");
    wait_for(Duration::from_secs(60), "the pinned digest to run", || {
        running(&c, &pinned)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", message_now(&c, &pinned)));

    // A tag the registry lacks: a failed start that says so.
    let absent = format!("absent-{pid}");
    let _c3 = JobCleanup(absent.clone());
    let missing = format!("127.0.0.1:{port}/novacron-test/absent-{pid}:1");
    c.apply("absent.yaml", &job(&absent, &missing, ""))
        .await
        .expect("apply");
    wait_for(Duration::from_secs(30), "a not-found pull", || async {
        message(&c, &absent).await.contains("could not pull image")
    })
    .await
    .expect("failed");
    let said = message(&c, &absent).await;
    assert!(said.contains("not found"), "{said}");

    // A registry nobody answers at: unreachable.
    let nowhere = format!("nowhere-{pid}");
    let _c4 = JobCleanup(nowhere.clone());
    c.apply(
        "nowhere.yaml",
        &job(&nowhere, &format!("127.0.0.1:{}/x/y:1", free_port()), ""),
    )
    .await
    .expect("apply");
    wait_for(
        Duration::from_secs(30),
        "an unreachable registry",
        || async { message(&c, &nowhere).await.contains("registry unreachable") },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", message_now(&c, &nowhere)));

    // never: the image must be there already.
    let never = format!("never-{pid}");
    let _c5 = JobCleanup(never.clone());
    c.apply(
        "never.yaml",
        &job(&never, &missing, "    pullPolicy: never\n"),
    )
    .await
    .expect("apply");
    wait_for(Duration::from_secs(30), "a refusal to pull", || async {
        message(&c, &never).await.contains("pullPolicy is never")
    })
    .await
    .expect("never pulled");
    let _ = docker(&["rmi", "-f", &digest]);
}

/// What the job's allocations say, for a failure message.
fn message_now(c: &Controller, job: &str) -> String {
    let rt = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| rt.block_on(message(c, job)))
}

/// Pulls of `repo` the registry refused (401): Docker starts each pull with one
/// HEAD of the manifest.
fn refused_pulls(registry: &Registry, repo: &str) -> usize {
    registry
        .requests()
        .lines()
        .filter(|l| l.contains(&format!("\"HEAD /v2/{repo}/manifests/")) && l.contains("\" 401 "))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_pulls_with_its_registry_secret_and_wrong_credentials_say_unauthorized() {
    ensure_test_image().expect("test image");
    let dir = tempfile::Builder::new()
        .prefix("novacron-images-auth-")
        .tempdir()
        .expect("tempdir");
    let pid = std::process::id();
    let password = format!("s3cret-{pid}");
    let registry = Registry::start(dir.path(), Some(("ci", &password)))
        .await
        .expect("registry up");
    let host = registry.host();
    let repo = format!("novacron-test/private-{pid}");
    let remote = format!("{host}/{repo}:1");
    docker(&["tag", TEST_IMAGE, &remote]).expect("tag");
    let login = std::process::Command::new("docker")
        .args(["login", "-u", "ci", "--password-stdin", &host])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(password.as_bytes())?;
            child.wait_with_output()
        })
        .expect("docker login");
    assert!(
        login.status.success(),
        "{}",
        String::from_utf8_lossy(&login.stderr)
    );
    docker(&["push", &remote]).expect("push to the private registry");
    docker(&["logout", &host]).expect("logout");
    docker(&["rmi", &remote]).expect("untag");

    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let agent = Agent::join_and_run(dir.path(), &c, &format!("auth{pid}"), &[])
        .await
        .expect("agent");
    c.wait_ready(&agent.name, Duration::from_secs(20))
        .await
        .expect("ready");
    let set = |name: &str, password: &str| {
        let mut child = std::process::Command::new(novacron_tests::bin("novacron"))
            .arg("--config")
            .arg(dir.path().join("cli-config.toml"))
            .args(["secret", "set", name, "--type", "registry", "username=ci"])
            .arg(format!("server={host}"))
            .args(["--from-stdin", "password"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("novacron runs");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(password.as_bytes())
            .expect("write");
        child.wait_with_output().expect("novacron ends")
    };
    // The CLI writes its context file on first use.
    let _ = c.cli(&["version", "--client"]);
    let out = set("registry", &password);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("secret registry created (version 1)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = set("wrong", "not-the-password");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let job = |name: &str, extra: &str| {
        service_job(
            name,
            1,
            "exec sleep 3600",
            extra,
            "  restart: {attempts: 1, interval: 1m, delay: 5s, mode: fail}\n",
        )
        .replace(TEST_IMAGE, &remote)
    };
    // The right credentials: the node pulls and runs the private image.
    let private = format!("private-{pid}");
    let _c1 = JobCleanup(private.clone());
    c.apply(
        "private.yaml",
        &job(&private, "    imagePullSecret: registry\n"),
    )
    .await
    .expect("apply");
    wait_for(Duration::from_secs(60), "the private image to run", || {
        running(&c, &private)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", message_now(&c, &private)));

    // Wrong credentials: a failed start that says unauthorized, retried only as
    // the restart policy allows (one restart after 5 s), not in a loop.
    docker(&["rmi", "-f", &remote]).expect("drop the pulled copy");
    let wrong = format!("wrong-{pid}");
    let _c2 = JobCleanup(wrong.clone());
    let before = refused_pulls(&registry, &repo);
    c.apply("wrong.yaml", &job(&wrong, "    imagePullSecret: wrong\n"))
        .await
        .expect("apply");
    wait_for(Duration::from_secs(30), "an unauthorized pull", || async {
        message(&c, &wrong).await.contains("unauthorized")
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", message_now(&c, &wrong)));
    tokio::time::sleep(Duration::from_secs(12)).await;
    let refused = refused_pulls(&registry, &repo) - before;
    // At most: the first start, its one restart 5 s later, then the controller's
    // replacement (1 s after the failure, the delay doubling with each failure
    // of the version up to 30 s) and its restart.
    assert!(
        (1..=4).contains(&refused),
        "{refused} refused pulls in 12 s with one restart allowed:\n{}",
        registry.requests()
    );

    // A job that names a secret that does not exist, or one that is not a
    // registry secret, is refused at apply.
    let err = c
        .apply(
            "none.yaml",
            &job("nosecret", "    imagePullSecret: absent\n"),
        )
        .await
        .expect_err("refused");
    assert!(
        err.to_string()
            .contains("secret \\\"absent\\\" does not exist"),
        "{err}"
    );
    let _ = docker(&["rmi", "-f", &remote]);
}

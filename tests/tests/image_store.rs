//! Registry-less images: `novacron image push` sends an image from this
//! machine's Docker to the controller (a second image sends only the layers the
//! first did not), and a node that never had the image runs a job that names it,
//! pulled through its loopback registry over the agent's link.

use std::time::Duration;

use novacron_tests::{
    JobCleanup, TEST_IMAGE, commit_test_image as commit, docker, ensure_test_image, job_running,
    one_node_fleet, service_job, succeeded as ok, wait_for,
};

/// The number before `word` in `text` (`sent 2 blobs` → 2 for "blobs").
fn count_before(text: &str, after: &str) -> u64 {
    text.split(after)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.trim_start_matches('(').parse().ok())
        .unwrap_or_else(|| panic!("no number after {after:?} in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_image_runs_on_a_node_that_never_had_it() {
    ensure_test_image().expect("test image");
    let pid = std::process::id();
    let (_dir, c, agent) = one_node_fleet("novacron-image-store-", &format!("store{pid}"), &[])
        .await
        .expect("fleet");

    let one = format!("novacron-test/stored-{pid}:1");
    let two = format!("novacron-test/stored-{pid}:2");
    commit(&one, "one").expect("commit");
    commit(&two, "two").expect("commit");
    let first = ok(&c.cli(&["image", "push", &one]));
    assert!(first.contains(&format!("pushed {one} (sha256:")), "{first}");
    let sent = count_before(&first, "sent ");
    assert!(sent >= 2, "the config and the layers: {first}");
    // The second image shares every layer but its last with the first.
    let second = ok(&c.cli(&["image", "push", &two]));
    let stored = count_before(&second, "), ");
    assert!(stored >= 1, "base layers are not sent again: {second}");
    assert_eq!(
        count_before(&second, "sent "),
        2,
        "only its config and its own layer: {second}"
    );
    let list = ok(&c.cli(&["image", "list"]));
    assert!(list.contains(&one) && list.contains(&two), "{list}");

    // The node has neither image any more; the job pulls from the controller.
    for image in [&one, &two] {
        docker(&["rmi", "-f", image]).expect("rmi");
    }
    assert!(docker(&["image", "inspect", &one]).is_err());
    let job = format!("stored-{pid}");
    let _cleanup = JobCleanup(job.clone());
    c.apply(
        "stored.yaml",
        &service_job(&job, 1, "exec sleep 3600", "", "").replace(TEST_IMAGE, &one),
    )
    .await
    .expect("apply");
    wait_for(Duration::from_secs(90), "the pushed image to run", || {
        job_running(&c, &job)
    })
    .await
    .unwrap_or_else(|e| {
        let d =
            tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(c.job(&job)));
        panic!("{e}: {:?}\n{}", d.map(|d| d.allocations), agent.log())
    });
    let id = docker(&["ps", "-q", "--filter", &format!("label=novacron.job={job}")]).expect("ps");
    let id = id.lines().next().expect("a container");
    assert_eq!(
        docker(&["exec", id, "cat", "/version"]).expect("exec"),
        "one"
    );
    assert!(
        docker(&["image", "inspect", &one]).is_ok(),
        "tagged as the job names it"
    );

    // A name the store does not have still says why.
    let rm = ok(&c.cli(&["image", "rm", &two]));
    assert!(rm.contains("removed"), "{rm}");
    let again = c.cli(&["image", "rm", &two]);
    assert!(!again.status.success());
    let _ = docker(&["rmi", "-f", &one]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulled_images_past_the_budget_are_collected_unless_in_use() {
    ensure_test_image().expect("test image");
    let pid = std::process::id();
    // A budget of one byte: every pulled image no container uses goes.
    let (_dir, c, agent) = one_node_fleet(
        "novacron-image-gc-",
        &format!("gc{pid}"),
        &["--image-gc-budget", "1"],
    )
    .await
    .expect("fleet");
    let kept = format!("novacron-test/gc-kept-{pid}:1");
    let gone = format!("novacron-test/gc-gone-{pid}:1");
    for (image, v) in [(&kept, "kept"), (&gone, "gone")] {
        commit(image, v).expect("commit");
        ok(&c.cli(&["image", "push", image]));
        docker(&["rmi", "-f", image]).expect("rmi");
    }
    let jobs = [format!("gc-kept-{pid}"), format!("gc-gone-{pid}")];
    let _c1 = JobCleanup(jobs[0].clone());
    let _c2 = JobCleanup(jobs[1].clone());
    for (job, image) in jobs.iter().zip([&kept, &gone]) {
        c.apply(
            "gc.yaml",
            &service_job(job, 1, "exec sleep 3600", "", "").replace(TEST_IMAGE, image),
        )
        .await
        .expect("apply");
    }
    wait_for(Duration::from_secs(90), "both jobs running", || async {
        let mut all = true;
        for job in &jobs {
            all &= job_running(&c, job).await;
        }
        all
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    ok(&c.cli(&["job", "stop", &jobs[1]]));
    // The collector runs every 30 s; the stopped job's image goes, the running
    // job's stays, and images the agent did not pull are never touched.
    wait_for(
        Duration::from_secs(120),
        "the unused image collected",
        || async { docker(&["image", "inspect", &gone]).is_err() },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert!(docker(&["image", "inspect", &kept]).is_ok(), "in use: kept");
    assert!(
        docker(&["image", "inspect", TEST_IMAGE]).is_ok(),
        "not pulled: kept"
    );
    assert!(
        agent.log().contains("removed an unused pulled image"),
        "{}",
        agent.log()
    );
    let _ = docker(&["rmi", "-f", &kept]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_pull_job_puts_its_image_on_eligible_nodes_before_any_replica() {
    ensure_test_image().expect("test image");
    let pid = std::process::id();
    let (_dir, c, agent) = one_node_fleet(
        "novacron-prepull-",
        &format!("pre{pid}"),
        &["--label", "tier=edge"],
    )
    .await
    .expect("fleet");
    let image = format!("novacron-test/prepulled-{pid}:1");
    commit(&image, "ahead").expect("commit");
    ok(&c.cli(&["image", "push", &image]));
    docker(&["rmi", "-f", &image]).expect("rmi");
    let before = c
        .node(&agent.name)
        .await
        .expect("node")
        .expect("known")
        .images;
    // No replica fits anywhere (64 cores), so only the pull ahead brings the
    // image; a second job whose constraint excludes the node brings nothing.
    let job = format!("prepull-{pid}");
    let _c = JobCleanup(job.clone());
    let manifest = |name: &str, image: &str, tier: &str| {
        format!(
            "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {{name: {name}}}\nspec:\n  prePull: true\n  task: {{image: \"{image}\", command: [sleep, '3600']}}\n  resources: {{cpu: 64, memory: 32Mi}}\n  placement:\n    constraints:\n      - {{key: tier, operator: In, values: [{tier}]}}\n"
        )
    };
    let other = format!("novacron-test/not-here-{pid}:1");
    commit(&other, "no").expect("commit");
    ok(&c.cli(&["image", "push", &other]));
    docker(&["rmi", "-f", &other]).expect("rmi");
    c.apply("prepull.yaml", &manifest(&job, &image, "edge"))
        .await
        .expect("apply");
    c.apply(
        "elsewhere.yaml",
        &manifest(&format!("elsewhere-{pid}"), &other, "core"),
    )
    .await
    .expect("apply");
    wait_for(
        Duration::from_secs(60),
        "the image pulled ahead",
        || async { docker(&["image", "inspect", &image]).is_ok() },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log()));
    assert!(agent.log().contains("pulled ahead"), "{}", agent.log());
    assert!(
        docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=novacron.job={job}")
        ])
        .expect("ps")
        .trim()
        .is_empty(),
        "no replica ran"
    );
    assert!(
        docker(&["image", "inspect", &other]).is_err(),
        "the node does not meet the other job's constraint"
    );
    // The node reports what it holds (the inventory is read every 10 s).
    wait_for(Duration::from_secs(30), "the inventory to grow", || async {
        c.node(&agent.name)
            .await
            .ok()
            .flatten()
            .is_some_and(|n| n.images > before)
    })
    .await
    .expect("inventory");
    let listed = ok(&c.cli(&["node", "images", &agent.name]));
    assert!(listed.contains(&image), "{listed}");
    let _ = docker(&["rmi", "-f", &image]);
}

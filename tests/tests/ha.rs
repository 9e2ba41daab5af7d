//! A highly available control plane, tested as operators would break it: three
//! etcd members (Debian's etcd-server, started by packaging/ha/local-group.sh),
//! three controllers on the etcd store with a 2 s leader lease, and an agent
//! running a Docker workload, given the three controllers' addresses.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use novacron_common::wire::AllocState;
use novacron_tests::ha::Group;
use novacron_tests::{
    Agent, Controller, JobCleanup, ensure_test_image, job_containers, service_job, wait_for,
};

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The ids of `job`'s wanted allocations that run, as `c` has them.
async fn running(c: &Controller, job: &str) -> BTreeSet<String> {
    match c.job(job).await {
        Ok(d) => d
            .allocations
            .iter()
            .filter(|a| a.desired_run && a.state == AllocState::Running)
            .map(|a| a.id.clone())
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// Waits until `node` reports to `c` after `since` (Unix ms): its agent holds
/// a link to that controller.
async fn reconnected(c: &Controller, node: &str, since: u64, limit: Duration) -> Result<()> {
    wait_for(
        limit,
        &format!("{node} reporting to the new leader"),
        || async {
            matches!(c.node(node).await, Ok(Some(v))
            if v.status.to_string() == "ready" && v.last_seen_unix_ms.is_some_and(|t| t >= since))
        },
    )
    .await
}

/// A running group, an agent on it and a two-replica job: (group, agent, the
/// leader's index, the job's running allocations).
async fn group_with_work(
    dir: &std::path::Path,
    job: &str,
) -> Result<(Group, Agent, usize, BTreeSet<String>)> {
    ensure_test_image()?;
    let group = Group::start(dir, 3, "2s").await?;
    let l = group.leader(Duration::from_secs(30)).await?;
    let links = group.link_addresses();
    let agent = Agent::join_and_run(
        dir,
        &group.controllers[l],
        &format!("{job}-node"),
        &["--controller", &links],
    )
    .await?;
    group.controllers[l]
        .wait_ready(&agent.name, Duration::from_secs(30))
        .await?;
    group.controllers[l]
        .apply("job.yaml", &service_job(job, 2, "sleep 100000", "", ""))
        .await?;
    let leader = &group.controllers[l];
    wait_for(Duration::from_secs(90), "two replicas running", || async {
        running(leader, job).await.len() == 2
    })
    .await?;
    let allocs = running(leader, job).await;
    Ok((group, agent, l, allocs))
}

/// Checks the workload after a failover: the same two allocations run, and
/// Docker runs exactly two containers of the job (nothing lost, nothing
/// duplicated), for a while.
async fn same_work(c: &Controller, job: &str, before: &BTreeSet<String>) -> Result<()> {
    wait_for(
        Duration::from_secs(30),
        "the same allocations running",
        || async { &running(c, job).await == before },
    )
    .await?;
    for _ in 0..6 {
        assert_eq!(&running(c, job).await, before, "allocations changed");
        assert_eq!(
            job_containers(job).len(),
            2,
            "Docker must run exactly the job's two replicas"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_no_work_is_lost_or_duplicated() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("nc-ha-kill").tempdir()?;
    let _cleanup = (
        JobCleanup("ha-web".into()),
        JobCleanup("ha-late".into()),
        JobCleanup("ha-after".into()),
    );
    let (mut group, agent, l, before) = group_with_work(dir.path(), "ha-web").await?;

    // An apply in flight when the leader dies: afterwards it exists, or its
    // request failed (no acknowledged write is lost).
    let leader = &group.controllers[l];
    let (client, url) = (leader.admin_client()?, format!("{}/v1/jobs", leader.api()));
    let manifest = service_job("ha-late", 1, "sleep 100000", "", "");
    let racing = tokio::spawn(async move {
        client
            .post(url)
            .json(&serde_json::json!({ "file": "late.yaml", "manifest": manifest }))
            .send()
            .await
            .map(|r| r.status())
    });
    tokio::time::sleep(Duration::from_millis(15)).await;
    let killed = Instant::now();
    let killed_ms = unix_ms();
    group.controllers[l].kill().await;
    let late = racing.await.context("the racing apply's task")?;

    let n = group.leader(Duration::from_secs(30)).await?;
    assert_ne!(n, l, "a follower took over");
    let new = &group.controllers[n];
    wait_for(
        Duration::from_secs(30),
        "the new leader accepting a write",
        || async {
            match new
                .apply(
                    "after.yaml",
                    &service_job("ha-after", 1, "sleep 100000", "", ""),
                )
                .await
            {
                Ok(_) => true,
                Err(e) => {
                    eprintln!("apply on the new leader: {e:#}");
                    false
                }
            }
        },
    )
    .await?;
    let took = killed.elapsed();
    reconnected(new, &agent.name, killed_ms, Duration::from_secs(30)).await?;
    let agents_back = killed.elapsed();
    println!(
        "failover after SIGKILL: a new leader accepted a write after {:?}, the agent reported to it after {agents_back:?}",
        took
    );
    if matches!(late, Ok(status) if status.is_success()) {
        new.job("ha-late")
            .await
            .context("an acknowledged apply was lost in the failover")?;
    }
    same_work(new, "ha-web", &before).await?;

    let list = new.cli(&["controller", "list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert!(
        text.contains("store: etcd") && text.contains("leader"),
        "{text}"
    );
    let events = new.cli(&["events", "--type", "controller.elected", "-o", "json"]);
    assert!(
        String::from_utf8_lossy(&events.stdout).contains("controller.elected"),
        "the election is an event: {}{}",
        String::from_utf8_lossy(&events.stdout),
        String::from_utf8_lossy(&events.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_fenced_steps_down_and_rejoins_as_a_follower() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("nc-ha-stop").tempdir()?;
    let _cleanup = (
        JobCleanup("ha-paused".into()),
        JobCleanup("ha-after".into()),
    );
    let (group, agent, l, before) = group_with_work(dir.path(), "ha-paused").await?;

    group.controllers[l].signal("STOP");
    let paused_ms = unix_ms();
    let n = group.leader(Duration::from_secs(30)).await?;
    assert_ne!(n, l);
    let new = &group.controllers[n];
    new.apply(
        "after.yaml",
        &service_job("ha-after", 1, "sleep 100000", "", ""),
    )
    .await?;
    reconnected(new, &agent.name, paused_ms, Duration::from_secs(30)).await?;

    group.controllers[l].signal("CONT");
    let old = &group.controllers[l];
    wait_for(
        Duration::from_secs(20),
        "the old leader stepping down",
        || async { old.logs().contains("stepping down") },
    )
    .await?;
    // It rejoined the group as a follower: listed, not leading, not serving.
    wait_for(
        Duration::from_secs(20),
        "the old leader listed as a follower",
        || async {
            let Ok(client) = new.admin_client() else {
                return false;
            };
            let Ok(resp) = client
                .get(format!("{}/v1/controllers", new.api()))
                .send()
                .await
            else {
                return false;
            };
            let Ok(view) = resp.json::<novacron_api::ControllersView>().await else {
                return false;
            };
            view.members
                .iter()
                .any(|m| m.api_url.ends_with(&format!(":{}", old.port)) && !m.leader)
        },
    )
    .await?;
    assert_eq!(group.serving_leader().await, Some(n), "one leader serves");
    assert_eq!(
        old.logs().matches("elected leader member=").count(),
        1,
        "the old leader was not elected again"
    );
    same_work(new, "ha-paused", &before).await?;
    Ok(())
}

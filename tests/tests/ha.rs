//! A highly available control plane, tested as operators would break it: three
//! etcd members (Debian's etcd-server, started by packaging/ha/local-group.sh),
//! three controllers on the etcd store with a 2 s leader lease, and an agent
//! running a Docker workload, given the three controllers' addresses.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result};
use novacron_common::wire::AllocState;
use novacron_tests::ha::{Group, store_env};
use novacron_tests::{
    Agent, Controller, JobCleanup, ensure_test_image, job_containers, one_node_fleet, service_job,
    succeeded, wait_for,
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
    let agent = group
        .agents(dir, &[format!("{job}-node")])
        .await?
        .pop()
        .expect("one agent");
    let l = group.leader(Duration::from_secs(30)).await?;
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
        // An unanswered query would read as no allocations: say which it was
        // (a local CI run once failed here with an empty set, nothing more).
        if let Err(e) = c.job(job).await {
            panic!(
                "the controller did not answer for job {job}: {e:#}\n{}",
                c.logs()
            );
        }
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

/// A single controller on redb with a node running a two-replica job: (dir,
/// controller, agent, the job's running allocations, its containers).
async fn single_with_work(
    prefix: &str,
    job: &str,
) -> Result<(
    tempfile::TempDir,
    Controller,
    Agent,
    BTreeSet<String>,
    BTreeSet<String>,
)> {
    ensure_test_image()?;
    let (dir, c, agent) = one_node_fleet(prefix, &format!("{job}-node"), &[]).await?;
    c.apply("job.yaml", &service_job(job, 2, "sleep 100000", "", ""))
        .await?;
    wait_for(Duration::from_secs(90), "two replicas running", || async {
        running(&c, job).await.len() == 2
    })
    .await?;
    let allocs = running(&c, job).await;
    let containers: BTreeSet<String> = job_containers(job).into_iter().collect();
    assert_eq!(containers.len(), 2);
    Ok((dir, c, agent, allocs, containers))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restored_into_a_fresh_data_directory_brings_the_fleet_back() -> Result<()> {
    let _cleanup = JobCleanup("ha-backup".into());
    let (dir, mut c, agent, allocs, containers) =
        single_with_work("nc-ha-backup", "ha-backup").await?;

    // Online: the running controller takes the snapshot.
    let backup = dir.path().join("backup");
    let out = succeeded(&c.ctl(&["backup", "--out", &backup.display().to_string()]));
    assert!(out.contains("backed up"), "{out}");
    for file in ["store.json", "pki/ca.pem", "pki/ca-key.pem", "secrets.key"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(backup.join(file))?.permissions(),
        );
        assert_eq!(mode & 0o077, 0, "{file} is private");
    }

    // The controller's machine is lost: a new one comes up from the backup.
    c.kill().await;
    let fresh = dir.path().join("restored");
    let restore = std::process::Command::new(novacron_tests::bin("novacron-controller"))
        .arg("--data-dir")
        .arg(&fresh)
        .args(["restore", "--from", &backup.display().to_string()])
        .output()?;
    let text = succeeded(&restore);
    assert!(text.contains("restored"), "{text}");
    // Restoring over a controller is refused.
    let again = std::process::Command::new(novacron_tests::bin("novacron-controller"))
        .arg("--data-dir")
        .arg(&fresh)
        .args(["restore", "--from", &backup.display().to_string()])
        .output()?;
    assert!(
        !again.status.success(),
        "a second restore into the same directory must fail"
    );
    c.data_dir = fresh;
    c.restart().await?;
    c.wait_ready(&agent.name, Duration::from_secs(30)).await?;
    wait_for(
        Duration::from_secs(30),
        "the same allocations running",
        || async { running(&c, "ha-backup").await == allocs },
    )
    .await?;
    let now: BTreeSet<String> = job_containers("ha-backup").into_iter().collect();
    assert_eq!(now, containers, "the workload's containers are untouched");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_migrate_moves_a_single_controller_onto_etcd_without_touching_its_work() -> Result<()>
{
    let _cleanup = JobCleanup("ha-migrate".into());
    let (dir, mut c, agent, allocs, containers) =
        single_with_work("nc-ha-migrate", "ha-migrate").await?;
    let etcd = Group::start(&dir.path().join("etcd"), 0, "2s").await?;
    let env = store_env(&etcd.etcd, "2s");
    let migrate = |c: &Controller| {
        std::process::Command::new(novacron_tests::bin("novacron-controller"))
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .arg("--data-dir")
            .arg(&c.data_dir)
            .args(["store", "migrate"])
            .output()
            .expect("novacron-controller runs")
    };
    // The running controller holds its store: migrate says so.
    let busy = migrate(&c);
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&busy.stderr)
    );
    c.stop().await;
    let out = succeeded(&migrate(&c));
    assert!(out.contains("copied"), "{out}");
    // A second copy into the same prefix is refused.
    let twice = migrate(&c);
    assert!(
        !twice.status.success(),
        "a non-empty prefix must be refused"
    );

    c.env = env.clone();
    c.restart().await?;
    c.wait_ready(&agent.name, Duration::from_secs(30)).await?;
    wait_for(
        Duration::from_secs(30),
        "the same allocations running",
        || async { running(&c, "ha-migrate").await == allocs },
    )
    .await?;
    let now: BTreeSet<String> = job_containers("ha-migrate").into_iter().collect();
    assert_eq!(now, containers, "the workload's containers are untouched");
    let list = c.cli(&["controller", "list"]);
    assert!(String::from_utf8_lossy(&list.stdout).contains("store: etcd"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_etcd_quorum_stops_decisions_but_not_workloads() -> Result<()> {
    let dir = tempfile::Builder::new().prefix("nc-ha-quorum").tempdir()?;
    let _cleanup = JobCleanup("ha-quorum".into());
    let (group, agent, l, before) = group_with_work(dir.path(), "ha-quorum").await?;
    let signal_etcd = |signal: &str, members: &[usize]| {
        for &i in members {
            let pid = group
                .etcd_pid(i)
                .expect("the script wrote the member's pid");
            let _ = std::process::Command::new("kill")
                .args([&format!("-{signal}"), &pid.to_string()])
                .status();
        }
    };
    // Two of three members stop: no quorum.
    signal_etcd("STOP", &[1, 2]);
    let old = &group.controllers[l];
    wait_for(
        Duration::from_secs(30),
        "the leader stepping down",
        || async { old.logs().contains("stepping down") },
    )
    .await?;
    // Nobody decides, and the logs say why; the workload runs on.
    for _ in 0..8 {
        assert_eq!(
            group.serving_leader().await,
            None,
            "no leader without quorum"
        );
        assert_eq!(
            job_containers("ha-quorum").len(),
            2,
            "workloads keep running"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let logs: String = group.controllers.iter().map(|c| c.logs()).collect();
    assert!(
        logs.contains("no keep-alive answered for a whole lease")
            || logs.contains("etcd says the lease expired"),
        "the leader says why it stopped: {logs}"
    );
    assert!(
        logs.contains("cannot campaign (etcd unavailable?)"),
        "the others say why nobody leads: {logs}"
    );

    // Quorum back: a leader serves again and the fleet is as it was.
    let back = unix_ms();
    signal_etcd("CONT", &[1, 2]);
    let n = group.leader(Duration::from_secs(60)).await?;
    reconnected(
        &group.controllers[n],
        &agent.name,
        back,
        Duration::from_secs(30),
    )
    .await?;
    same_work(&group.controllers[n], "ha-quorum", &before).await?;
    Ok(())
}

/// The sizes of the raw history files under `data_dir`, by name.
fn raw_files(data_dir: &std::path::Path) -> std::collections::BTreeMap<String, u64> {
    std::fs::read_dir(data_dir.join("history").join("raw"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let len = e.metadata().ok()?.len();
                    name.ends_with(".seg").then_some((name, len))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_copies_the_history_and_answers_for_the_time_before_the_failover() -> Result<()>
{
    let dir = tempfile::Builder::new().prefix("nc-ha-hist").tempdir()?;
    // Five points per chunk: a chunk reaches the disk (and the copy) every 5 s.
    let config = dir.path().join("controller.toml");
    std::fs::write(&config, "[history]\nchunk_points = 5\n")?;
    let env = [(
        "NOVACRON_CONTROLLER_CONFIG".to_string(),
        config.display().to_string(),
    )];
    let mut group = Group::start_with(dir.path(), 2, "2s", &env).await?;
    let node = "ha-hist-node".to_string();
    let _agent = group
        .agents(dir.path(), std::slice::from_ref(&node))
        .await?;
    let l = group.leader(Duration::from_secs(30)).await?;
    let f = 1 - l;
    let from = unix_ms();
    tokio::time::sleep(Duration::from_secs(20)).await;
    // The range ends 10 s back: its points are in closed chunks by now.
    let to = unix_ms() - 10_000;
    let range = format!("metric=memory_used_bytes&node={node}&from={from}&to={to}&step=1s&fn=last");
    let before = group.controllers[l].metrics_query(&range).await?;
    let points = |r: &novacron_api::MetricsQueryResult| -> Vec<(usize, f64)> {
        r.series
            .iter()
            .flat_map(|s| {
                s.values
                    .iter()
                    .enumerate()
                    .filter_map(|(i, v)| v.map(|v| (i, v)))
            })
            .collect()
    };
    let had = points(&before);
    assert!(had.len() >= 5, "the leader recorded the node: {before:?}");

    // The follower's copy catches up with what the leader has on disk now.
    let on_leader = raw_files(&group.controllers[l].data_dir);
    assert!(!on_leader.is_empty(), "the leader wrote raw files");
    wait_for(Duration::from_secs(20), "the follower's copy", || async {
        let copy = raw_files(&group.controllers[f].data_dir);
        on_leader
            .iter()
            .all(|(name, len)| copy.get(name).is_some_and(|c| c >= len))
    })
    .await?;

    group.controllers[l].kill().await;
    let n = group.leader(Duration::from_secs(30)).await?;
    assert_eq!(n, f, "the follower took over");
    let after = group.controllers[n].metrics_query(&range).await?;
    assert_eq!(
        points(&after),
        had,
        "the new leader answers the range as the old one did"
    );
    Ok(())
}

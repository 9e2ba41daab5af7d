//! A chaos run on a highly available control plane: three etcd members, three
//! controllers (2 s lease) and two agents running Docker workloads, through at
//! least 50 seeded faults (SIGKILL of a controller, SIGSTOP of a controller or
//! of one etcd member for 1-3 s) mixed with applies, scale changes and new jobs.
//! At the end the store and Docker must agree: every wanted replica runs once,
//! no container runs that the store does not want, and every acknowledged job
//! exists. `NOVACRON_CHAOS_SEED` replays a run; the seed is printed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Result;
use novacron_common::wire::AllocState;
use novacron_tests::ha::Group;
use novacron_tests::{JobCleanup, docker, ensure_test_image, service_job, wait_for};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Faults the run injects at least.
const FAULTS: usize = 50;
/// The run stops injecting after this long even if it has fewer faults.
const BUDGET: Duration = Duration::from_secs(240);

/// Running containers of the chaos jobs (named `chaos-…`): allocation id → job.
fn docker_allocs() -> BTreeMap<String, String> {
    docker(&[
        "ps",
        "--filter",
        "label=novacron.job",
        "--format",
        "{{.Label \"novacron.alloc\"}} {{.Label \"novacron.job\"}}",
    ])
    .unwrap_or_default()
    .lines()
    .filter_map(|l| l.split_once(' '))
    .filter(|(_, j)| j.starts_with("chaos-"))
    .map(|(a, j)| (a.to_string(), j.to_string()))
    .collect()
}

fn chaos_job(name: &str, replicas: u32) -> String {
    service_job(name, replicas, "sleep 100000", "", "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_kills_and_pauses_lose_and_duplicate_nothing() -> Result<()> {
    ensure_test_image()?;
    let seed: u64 = std::env::var("NOVACRON_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("chaos seed {seed} (NOVACRON_CHAOS_SEED={seed} replays the choices)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::Builder::new().prefix("nc-ha-chaos").tempdir()?;
    let mut group = Group::start(dir.path(), 3, "2s").await?;
    let agents = group
        .agents(dir.path(), &["chaos-0".into(), "chaos-1".into()])
        .await?;
    let l = group.leader(Duration::from_secs(30)).await?;
    let mut cleanup = vec![JobCleanup("chaos-a".into())];
    group.controllers[l]
        .apply("a.yaml", &chaos_job("chaos-a", 2))
        .await?;

    let start = Instant::now();
    let (mut faults, mut acked_jobs) = (0usize, BTreeSet::from(["chaos-a".to_string()]));
    let mut log = Vec::new();
    let mut next_job = 0;
    while faults < FAULTS && start.elapsed() < BUDGET {
        let action = rng.random_range(0..5);
        match action {
            0 => {
                let i = rng.random_range(0..3);
                group.controllers[i].kill().await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
                group.controllers[i].spawn()?;
                log.push(format!("kill controller {i}"));
                faults += 1;
            }
            1 => {
                let i = rng.random_range(0..3);
                let pause = Duration::from_millis(rng.random_range(1000..3000));
                group.controllers[i].signal("STOP");
                tokio::time::sleep(pause).await;
                group.controllers[i].signal("CONT");
                log.push(format!("pause controller {i} {pause:?}"));
                faults += 1;
            }
            2 => {
                let i = rng.random_range(0..3);
                let pause = Duration::from_millis(rng.random_range(1000..3000));
                if let Some(pid) = group.etcd_pid(i) {
                    let _ = std::process::Command::new("kill")
                        .args(["-STOP", &pid.to_string()])
                        .status();
                    tokio::time::sleep(pause).await;
                    let _ = std::process::Command::new("kill")
                        .args(["-CONT", &pid.to_string()])
                        .status();
                }
                log.push(format!("pause etcd member {i} {pause:?}"));
                faults += 1;
            }
            3 => {
                let replicas = rng.random_range(1..=4);
                let acked = match group.serving_leader().await {
                    Some(i) => group.controllers[i]
                        .apply("a.yaml", &chaos_job("chaos-a", replicas))
                        .await
                        .is_ok(),
                    None => false,
                };
                log.push(format!("scale chaos-a to {replicas}: acknowledged {acked}"));
            }
            _ => {
                let name = format!("chaos-b{next_job}");
                next_job += 1;
                cleanup.push(JobCleanup(name.clone()));
                let acked = match group.serving_leader().await {
                    Some(i) => group.controllers[i]
                        .apply("b.yaml", &chaos_job(&name, 1))
                        .await
                        .is_ok(),
                    None => false,
                };
                if acked {
                    acked_jobs.insert(name.clone());
                }
                log.push(format!("apply {name}: acknowledged {acked}"));
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
    }
    println!(
        "{faults} faults in {:?}:\n{}",
        start.elapsed(),
        log.join("\n")
    );
    assert!(faults >= FAULTS, "only {faults} faults within {BUDGET:?}");

    // Settle: every process runs, a leader serves, the scale is known.
    for c in &group.controllers {
        c.signal("CONT");
    }
    for (i, c) in group.controllers.iter_mut().enumerate() {
        if !c.is_running() {
            c.spawn()?;
            println!("controller {i} started again for the check");
        }
    }
    let n = group.leader(Duration::from_secs(60)).await?;
    let leader = &group.controllers[n];
    wait_for(
        Duration::from_secs(30),
        "the final scale applied",
        || async {
            leader
                .apply("a.yaml", &chaos_job("chaos-a", 3))
                .await
                .is_ok()
        },
    )
    .await?;
    // A lost job stays lost; a connection the leader resets while it settles
    // (seen in CI: "Connection reset by peer" right after the faults) is asked
    // again. The last error is what a failure reports.
    for job in &acked_jobs {
        let why = std::sync::Mutex::new(String::new());
        let found = wait_for(Duration::from_secs(30), "the acknowledged job", || async {
            match leader.job(job).await {
                Ok(_) => true,
                Err(e) => {
                    *why.lock().expect("lock") = format!("{e:#}");
                    false
                }
            }
        })
        .await;
        if found.is_err() {
            anyhow::bail!(
                "the acknowledged job {job} was lost: {}",
                why.lock().expect("lock")
            );
        }
    }

    // The store and Docker converge and agree: nothing lost, nothing twice.
    let want = |job: &str| if job == "chaos-a" { 3 } else { 1 };
    let last = std::sync::Mutex::new(String::new());
    let agreed = wait_for(
        Duration::from_secs(120),
        "the store and Docker agreeing",
        || async {
            let mut store: BTreeMap<String, String> = BTreeMap::new();
            let mut names: Vec<String> = acked_jobs.iter().cloned().collect();
            // Jobs applied without an acknowledgement may exist too: the store says.
            for k in 0..next_job {
                let name = format!("chaos-b{k}");
                if !names.contains(&name) && leader.job(&name).await.is_ok() {
                    names.push(name);
                }
            }
            for job in &names {
                let Ok(detail) = leader.job(job).await else {
                    return false;
                };
                let running: Vec<_> = detail
                    .allocations
                    .iter()
                    .filter(|a| a.desired_run && a.state == AllocState::Running)
                    .collect();
                if running.len() != want(job) {
                    *last.lock().expect("lock") =
                        format!("{job}: {} running, {} wanted", running.len(), want(job));
                    return false;
                }
                for a in running {
                    store.insert(a.id.clone(), job.clone());
                }
            }
            let docker = docker_allocs();
            if docker != store {
                *last.lock().expect("lock") = format!("store {store:?}\ndocker {docker:?}");
                return false;
            }
            true
        },
    )
    .await;
    if let Err(e) = agreed {
        let last = last.lock().expect("lock").clone();
        anyhow::bail!("{e:#}\nlast difference: {last}\nseed {seed}");
    }
    drop(agents);
    Ok(())
}

//! `novacron-workload-bench`: end-to-end workload timings on a real controller and
//! real agents (release binaries, loopback, the local Docker daemon).
//!
//! For each round it measures:
//! - **apply → running**: from `POST /v1/jobs` to every replica reported running;
//! - **failover**: from SIGKILL of the agent holding replicas to their
//!   replacements running on the other agent.
//!
//! Run: `cargo build --release --bins && target/release/novacron-workload-bench --rounds 5 --replicas 6`

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use novacron_common::wire::AllocState;
use novacron_tests::{Agent, Controller, TEST_IMAGE, docker, ensure_test_image, wait_for};

/// Workload timing benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Rounds (a fresh controller and two agents each).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Replicas of the service.
    #[arg(long, default_value_t = 6)]
    replicas: u32,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure_test_image()?;
    let mut apply_times = Vec::new();
    let mut failover_times = Vec::new();
    for round in 0..args.rounds {
        let (a, f) = round_trip(round, args.replicas).await?;
        println!(
            "round {round}: apply→running {:.0} ms, failover {:.0} ms",
            a.as_secs_f64() * 1e3,
            f.as_secs_f64() * 1e3
        );
        apply_times.push(a);
        failover_times.push(f);
    }
    println!(
        "replicas {}: apply→all running median {:.0} ms (min {:.0}, max {:.0}); agent kill→replacements running median {:.0} ms (min {:.0}, max {:.0})",
        args.replicas,
        median(&apply_times) * 1e3,
        min(&apply_times) * 1e3,
        max(&apply_times) * 1e3,
        median(&failover_times) * 1e3,
        min(&failover_times) * 1e3,
        max(&failover_times) * 1e3,
    );
    Ok(())
}

async fn round_trip(round: usize, replicas: u32) -> Result<(Duration, Duration)> {
    let dir = tempfile::Builder::new()
        .prefix("novacron-bench-")
        .tempdir()?;
    let controller = Controller::start(dir.path(), &[]).await?;
    let mut agents = Vec::new();
    for (i, zone) in ["a", "b"].iter().enumerate() {
        let name = format!("bench-{round}-{i}");
        agents.push(
            Agent::join_and_run(
                dir.path(),
                &controller,
                &name,
                &["--label", &format!("zone={zone}")],
            )
            .await?,
        );
    }
    for a in &agents {
        wait_for(Duration::from_secs(20), "agent ready", || async {
            matches!(controller.node(&a.name).await, Ok(Some(v)) if v.status.to_string() == "ready")
        })
        .await?;
    }
    let job = format!("bench-{}-{round}", std::process::id());
    let manifest = format!(
        "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: {job}
spec:
  replicas: {replicas}
  task:
    image: {TEST_IMAGE}
    command: [sh, -c, 'while true; do sleep 1; done']
  resources:
    cpu: 50m
    memory: 16Mi
  placement:
    spread:
      - key: zone
"
    );
    let running = |c: &Controller| {
        let job = job.clone();
        let c_api = c.api();
        let client = c.admin_client();
        async move {
            let Ok(client) = client else {
                return Vec::new();
            };
            let detail: Option<novacron_controller::workloads::JobDetail> = async {
                client
                    .get(format!("{c_api}/v1/jobs/{job}"))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()
            }
            .await;
            detail
                .map(|d| {
                    d.allocations
                        .into_iter()
                        .filter(|a| a.desired_run && a.state == AllocState::Running)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        }
    };
    let start = Instant::now();
    controller.apply("bench.yaml", &manifest).await?;
    poll(Duration::from_secs(60), || async {
        running(&controller).await.len() == replicas as usize
    })
    .await?;
    let apply = start.elapsed();

    let victim = agents[0].name.clone();
    if !running(&controller).await.iter().any(|a| a.node == victim) {
        bail!("no replica on {victim}");
    }
    agents[0].kill().await;
    let killed = Instant::now();
    poll(Duration::from_secs(60), || async {
        let r = running(&controller).await;
        r.len() == replicas as usize && r.iter().all(|a| a.node != victim)
    })
    .await?;
    let failover = killed.elapsed();

    for id in docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=novacron.job={job}"),
    ])
    .context("docker ps")?
    .lines()
    {
        let _ = docker(&["rm", "-f", id]);
    }
    Ok((apply, failover))
}

/// Polls every 20 ms (finer than the harness' 100 ms, for timing).
async fn poll<F, Fut>(limit: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("timed out after {limit:?}")
}

fn secs(v: &[Duration]) -> Vec<f64> {
    let mut s: Vec<f64> = v.iter().map(Duration::as_secs_f64).collect();
    s.sort_by(f64::total_cmp);
    s
}

fn median(v: &[Duration]) -> f64 {
    let s = secs(v);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

fn min(v: &[Duration]) -> f64 {
    secs(v).first().copied().unwrap_or(0.0)
}

fn max(v: &[Duration]) -> f64 {
    secs(v).last().copied().unwrap_or(0.0)
}

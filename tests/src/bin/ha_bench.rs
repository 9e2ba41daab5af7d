//! `novacron-ha-bench`: failover of a highly available control plane (three
//! etcd members, three controllers on the etcd store, `--agents` agents), over
//! `--kills` SIGKILLs of the leader: leader gone → a new leader accepts a write,
//! and → every agent reports to it; then graceful handovers (SIGTERM of the
//! leader → a new leader accepts a write). Then write and read throughput on
//! etcd against the embedded redb store: sequential applies per second and the
//! p99 of `GET /v1/jobs/{name}`.
//!
//! Run: `cargo build --release --bins && target/release/novacron-ha-bench --lease 2s --kills 10`

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use clap::Parser;
use novacron_tests::ha::Group;
use novacron_tests::{Agent, Controller, ensure_test_image, service_job, wait_for};

/// HA failover benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// The leader lease.
    #[arg(long, default_value = "2s")]
    lease: String,
    /// Leader SIGKILLs.
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// Leader SIGTERMs (graceful handovers).
    #[arg(long, default_value_t = 5)]
    handovers: usize,
    /// Agents.
    #[arg(long, default_value_t = 3)]
    agents: usize,
    /// Applies and reads for the throughput comparison (0: skip it).
    #[arg(long, default_value_t = 200)]
    ops: usize,
}

/// A placement no node satisfies: the benchmark's jobs are writes only.
const NOWHERE: &str =
    "  placement:\n    constraints:\n      - {key: nowhere, operator: In, values: [\"yes\"]}\n";

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Waits until some controller accepts a write; how long since `from`.
async fn first_write(group: &Group, from: Instant, n: usize) -> Result<(usize, Duration)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(i) = group.serving_leader().await {
            let job = service_job(&format!("bench-write-{n}"), 1, "sleep 1", "", NOWHERE);
            if group.controllers[i].apply("w.yaml", &job).await.is_ok() {
                return Ok((i, from.elapsed()));
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no leader accepted a write in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every agent reported to `c` after `since`; how long since `from`.
async fn agents_back(
    c: &Controller,
    agents: &[Agent],
    since: u64,
    from: Instant,
) -> Result<Duration> {
    for a in agents {
        wait_for(Duration::from_secs(60), "an agent reconnecting", || async {
            matches!(c.node(&a.name).await, Ok(Some(v))
                if v.last_seen_unix_ms.is_some_and(|t| t >= since))
        })
        .await?;
    }
    Ok(from.elapsed())
}

async fn throughput(c: &Controller, ops: usize, tag: &str) -> Result<(f64, Duration)> {
    let start = Instant::now();
    for i in 0..ops {
        // Jobs that never place (a node label no node has): writes only.
        let job = service_job(&format!("tp-{tag}-{i}"), 1, "sleep 1", "", NOWHERE);
        c.apply("tp.yaml", &job).await?;
    }
    let applies = ops as f64 / start.elapsed().as_secs_f64();
    let client = c.admin_client()?;
    let mut reads = Vec::with_capacity(ops);
    for i in 0..ops {
        let t = Instant::now();
        client
            .get(format!("{}/v1/jobs/tp-{tag}-{}", c.api(), i % ops))
            .send()
            .await?
            .error_for_status()?;
        reads.push(t.elapsed());
    }
    reads.sort();
    let p99 = reads[(reads.len() * 99 / 100).min(reads.len() - 1)];
    Ok((applies, p99))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure_test_image()?;
    let dir = tempfile::Builder::new().prefix("nc-ha-bench").tempdir()?;
    let mut group = Group::start(dir.path(), 3, &args.lease).await?;
    let names: Vec<String> = (0..args.agents).map(|i| format!("bench-{i}")).collect();
    let agents = group.agents(dir.path(), &names).await?;
    let (mut writes, mut reconnects, mut handovers) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..args.kills {
        let l = group.leader(Duration::from_secs(60)).await?;
        let since = unix_ms();
        let killed = Instant::now();
        group.controllers[l].kill().await;
        let (n, write) = first_write(&group, killed, k).await?;
        let back = agents_back(&group.controllers[n], &agents, since, killed).await?;
        println!(
            "kill {k}: new leader accepted a write after {}, all agents reported after {}",
            ms(write),
            ms(back)
        );
        writes.push(write);
        reconnects.push(back);
        group.controllers[l].spawn()?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for h in 0..args.handovers {
        let l = group.leader(Duration::from_secs(60)).await?;
        let t = Instant::now();
        group.controllers[l].signal("TERM");
        let (_, write) = first_write(&group, t, 1000 + h).await?;
        println!(
            "handover {h}: new leader accepted a write after {}",
            ms(write)
        );
        handovers.push(write);
        if let Some(mut child) = group.controllers[l].child.take() {
            let _ = child.wait().await;
        }
        group.controllers[l].spawn()?;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    if !writes.is_empty() {
        println!(
            "SIGKILL, lease {}: new leader accepting writes median {} max {}; all {} agents reconnected median {} max {}",
            args.lease,
            ms(median(writes.clone())),
            ms(*writes.iter().max().expect("some")),
            args.agents,
            ms(median(reconnects.clone())),
            ms(*reconnects.iter().max().expect("some")),
        );
    }
    if !handovers.is_empty() {
        println!(
            "SIGTERM handover: median {} max {}",
            ms(median(handovers.clone())),
            ms(*handovers.iter().max().expect("some"))
        );
    }
    if args.ops > 0 {
        let l = group.leader(Duration::from_secs(60)).await?;
        let (applies, p99) = throughput(&group.controllers[l], args.ops, "etcd").await?;
        println!(
            "etcd: {applies:.1} applies/s, GET /v1/jobs/{{name}} p99 {}",
            ms(p99)
        );
        let single = tempfile::Builder::new()
            .prefix("nc-ha-bench-redb")
            .tempdir()?;
        let c = Controller::start(single.path(), &[]).await?;
        let (applies, p99) = throughput(&c, args.ops, "redb").await?;
        println!(
            "redb: {applies:.1} applies/s, GET /v1/jobs/{{name}} p99 {}",
            ms(p99)
        );
    }
    for mut a in agents {
        a.kill().await;
    }
    Ok(())
}

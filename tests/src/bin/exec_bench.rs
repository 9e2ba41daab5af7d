//! `novacron-exec-bench`: remote exec timings on a real controller and real agents
//! (release binaries, loopback, processes on this machine).
//!
//! - **round trip**: `POST /v1/exec` of `true` on one node's host, from the request
//!   to the last line (the summary with the exit code), `--runs` times: p50, p99.
//! - **fan-out**: one command (`true`) to `--agents` agents selected by a label, from
//!   the request to every node's result, `--fanout-runs` times: the median.
//!
//! Run: `cargo build --release --bins && target/release/novacron-exec-bench --runs 500 --agents 100`

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use novacron_api::{ExecBody, ExecLine};
use novacron_tests::{Agent, Controller, wait_for};

/// Remote exec benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Round trips of `true` on one node.
    #[arg(long, default_value_t = 500)]
    runs: usize,
    /// Agents for the fan-out (0 skips it).
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Fan-out repetitions.
    #[arg(long, default_value_t = 7)]
    fanout_runs: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::Builder::new()
        .prefix("novacron-exec-bench-")
        .tempdir()?;
    let controller = Controller::start(dir.path(), &[]).await?;
    let client = controller.admin_client()?;
    let url = format!("{}/v1/exec", controller.api());
    // Slow sampling: the agents' own work should not be what is measured.
    let quiet = ["--allow-host-exec", "--interval", "10s"];

    let mut one = Agent::join_and_run(dir.path(), &controller, "rt", &quiet).await?;
    wait_ready(&controller, &[one.name.clone()]).await?;
    let body = ExecBody {
        node: Some(one.name.clone()),
        argv: vec!["true".into()],
        ..ExecBody::default()
    };
    for _ in 0..20 {
        exec(&client, &url, &body, 1).await?;
    }
    let mut times = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        let t0 = Instant::now();
        exec(&client, &url, &body, 1).await?;
        times.push(t0.elapsed());
    }
    times.sort();
    println!(
        "exec round trip (`true`, 1 node, {} runs): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        args.runs,
        percentile(&times, 0.50),
        percentile(&times, 0.99),
        percentile(&times, 1.0),
    );
    one.kill().await;

    if args.agents == 0 {
        return Ok(());
    }
    let mut agents = Vec::with_capacity(args.agents);
    let started = Instant::now();
    for i in 0..args.agents {
        let name = format!("fan-{i:03}");
        let mut flags = quiet.to_vec();
        flags.extend(["--label", "bench=fan"]);
        agents.push(Agent::join_and_run(dir.path(), &controller, &name, &flags).await?);
    }
    let names: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
    wait_ready(&controller, &names).await?;
    println!(
        "{} agents ready in {:.1} s",
        args.agents,
        started.elapsed().as_secs_f64()
    );
    let body = ExecBody {
        selector: Some([("bench".to_string(), "fan".to_string())].into()),
        argv: vec!["true".into()],
        ..ExecBody::default()
    };
    exec(&client, &url, &body, args.agents).await?;
    let mut fan = Vec::with_capacity(args.fanout_runs);
    for run in 0..args.fanout_runs {
        let t0 = Instant::now();
        exec(&client, &url, &body, args.agents).await?;
        let took = t0.elapsed();
        println!("fan-out run {run}: {:.1} ms", took.as_secs_f64() * 1e3);
        fan.push(took);
    }
    fan.sort();
    println!(
        "exec fan-out (`true`, {} agents, {} runs): median {:.1} ms, min {:.1} ms, max {:.1} ms",
        args.agents,
        args.fanout_runs,
        percentile(&fan, 0.5),
        percentile(&fan, 0.0),
        percentile(&fan, 1.0),
    );
    for a in &mut agents {
        a.kill().await;
    }
    Ok(())
}

/// Runs one exec and checks that `nodes` nodes all returned 0.
async fn exec(client: &reqwest::Client, url: &str, body: &ExecBody, nodes: usize) -> Result<()> {
    let response = client
        .post(url)
        .timeout(Duration::from_secs(60))
        .json(body)
        .send()
        .await?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        bail!("exec refused ({status}): {text}");
    }
    let last = text.lines().last().context("an empty answer")?;
    match serde_json::from_str::<ExecLine>(last)? {
        ExecLine::Summary(s) if s.nodes == nodes && s.exit_code == 0 => Ok(()),
        other => bail!("unexpected end of the answer: {other:?}"),
    }
}

async fn wait_ready(controller: &Controller, names: &[String]) -> Result<()> {
    wait_for(Duration::from_secs(300), "agents ready", || async {
        let Ok(client) = controller.admin_client() else {
            return false;
        };
        let Ok(resp) = client
            .get(format!("{}/v1/nodes", controller.api()))
            .send()
            .await
        else {
            return false;
        };
        let Ok(nodes) = resp.json::<Vec<novacron_api::NodeView>>().await else {
            return false;
        };
        names.iter().all(|n| {
            nodes
                .iter()
                .any(|v| &v.name == n && v.status.to_string() == "ready")
        })
    })
    .await
}

/// The `q` quantile (0..=1) of `times`, in milliseconds, by nearest rank
/// (`novacron_common::cost::percentile`, the project's one definition).
fn percentile(times: &[Duration], q: f64) -> f64 {
    novacron_common::cost::percentile(times, q * 100.0).map_or(0.0, |t| t.as_secs_f64() * 1e3)
}

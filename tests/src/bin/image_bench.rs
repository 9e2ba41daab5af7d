//! `novacron-image-bench`: time to first start of an image a node lacks, pulled
//! from a registry (Debian's docker-registry on loopback, what `docker push`
//! stores: gzip layers) and from the controller's image store (`novacron image
//! push`, relayed over the agent's link), and the bytes a second image sharing
//! the base layers sends to the store.
//!
//! Run: `cargo build --release --bins && target/release/novacron-image-bench --rounds 5 --mib 100`

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use novacron_common::wire::AllocState;
use novacron_tests::registry::Registry;
use novacron_tests::{
    Agent, Controller, TEST_IMAGE, docker, ensure_test_image, service_job, wait_for,
};

/// Image distribution benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Rounds (each starts the image once from each source).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Size of the image's own layer, MiB (random bytes: nothing compresses).
    #[arg(long, default_value_t = 100)]
    mib: u64,
}

fn out(o: &std::process::Output, what: &str) -> Result<String> {
    if !o.status.success() {
        bail!(
            "{what}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Commits, as `image`, the test image plus `script`'s changes.
fn commit(image: &str, script: &str) -> Result<()> {
    let name = format!("novacron-bench-commit-{}", std::process::id());
    let _ = docker(&["rm", "-f", &name]);
    docker(&["run", "--name", &name, TEST_IMAGE, "sh", "-c", script])?;
    docker(&["commit", &name, image])?;
    docker(&["rm", "-f", &name])?;
    Ok(())
}

/// Removes every local copy of the image the job ran (all its references).
fn forget(id: &str) {
    let _ = docker(&["rmi", "-f", id]);
}

async fn first_start(c: &Controller, job: &str, image: &str) -> Result<Duration> {
    let manifest = service_job(job, 1, "exec sleep 3600", "", "").replace(TEST_IMAGE, image);
    let started = Instant::now();
    c.apply(&format!("{job}.yaml"), &manifest).await?;
    wait_for(Duration::from_secs(600), "the replica running", || async {
        c.job(job).await.is_ok_and(|d| {
            d.allocations
                .iter()
                .any(|a| a.desired_run && a.state == AllocState::Running)
        })
    })
    .await?;
    let took = started.elapsed();
    let stop = c.cli(&["job", "stop", job]);
    out(&stop, "job stop")?;
    wait_for(Duration::from_secs(60), "the container gone", || async {
        docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=novacron.job={job}"),
        ])
        .is_ok_and(|s| s.trim().is_empty())
    })
    .await?;
    Ok(took)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure_test_image()?;
    let dir = tempfile::Builder::new()
        .prefix("novacron-image-bench-")
        .tempdir()?;
    let pid = std::process::id();
    let big = format!("novacron-bench/big-{pid}:1");
    let second = format!("novacron-bench/big-{pid}:2");
    commit(
        &big,
        &format!("head -c {} /dev/urandom > /payload", args.mib << 20),
    )?;
    let big_id = docker(&["image", "inspect", "-f", "{{.Id}}", &big])?;
    let c = Controller::start(dir.path(), &[]).await?;
    let agent = Agent::join_and_run(dir.path(), &c, &format!("bench{pid}"), &[]).await?;
    c.wait_ready(&agent.name, Duration::from_secs(30)).await?;

    // The registry copy (docker push: gzip layers).
    let registry = Registry::start(dir.path(), None).await?;
    let remote = format!("{}/novacron-bench/big-{pid}:1", registry.host());
    docker(&["tag", &big, &remote])?;
    let t = Instant::now();
    docker(&["push", &remote]).context("docker push")?;
    let registry_push = t.elapsed();
    // The controller's copy, then a second image on the same base.
    let t = Instant::now();
    let first = out(&c.cli(&["image", "push", &big, "-o", "json"]), "image push")?;
    let store_push = t.elapsed();
    docker(&[
        "run",
        "--name",
        &format!("novacron-bench-2-{pid}"),
        &big,
        "sh",
        "-c",
        "echo 2 > /second",
    ])?;
    docker(&["commit", &format!("novacron-bench-2-{pid}"), &second])?;
    docker(&["rm", "-f", &format!("novacron-bench-2-{pid}")])?;
    let dedup = out(
        &c.cli(&["image", "push", &second, "-o", "json"]),
        "image push",
    )?;
    let parse = |text: &str| -> Result<serde_json::Value> {
        let v: serde_json::Value = serde_json::from_str(text)?;
        Ok(v[0].clone())
    };
    let (first, dedup) = (parse(&first)?, parse(&dedup)?);
    let total =
        dedup["sent_bytes"].as_u64().unwrap_or(0) + dedup["skipped_bytes"].as_u64().unwrap_or(0);
    println!(
        "push {} MiB image: docker push to the registry {:.2} s; novacron image push {:.2} s (sent {} bytes)",
        args.mib,
        registry_push.as_secs_f64(),
        store_push.as_secs_f64(),
        first["sent_bytes"]
    );
    println!(
        "second image on the same base: sent {} of {} bytes ({:.4} of the image; {} of {} blobs already stored)",
        dedup["sent_bytes"],
        total,
        dedup["sent_bytes"].as_u64().unwrap_or(0) as f64 / total.max(1) as f64,
        dedup["skipped_blobs"],
        dedup["skipped_blobs"].as_u64().unwrap_or(0) + dedup["sent_blobs"].as_u64().unwrap_or(0),
    );
    let _ = docker(&["rmi", "-f", &second]);

    let mut from_registry = Vec::new();
    let mut from_store = Vec::new();
    for round in 0..args.rounds {
        // Alternate the order, so that neither source always goes first.
        let order: [(&str, &str); 2] = if round % 2 == 0 {
            [("registry", &remote), ("store", &big)]
        } else {
            [("store", &big), ("registry", &remote)]
        };
        for (source, image) in order {
            forget(&big_id);
            if docker(&["image", "inspect", image]).is_ok() {
                bail!("{image} is still on the node");
            }
            let job = format!("bench-{source}-{round}");
            let took = first_start(&c, &job, image).await?;
            println!("round {round}: {source} {:.0} ms", took.as_secs_f64() * 1e3);
            match source {
                "registry" => from_registry.push(took),
                _ => from_store.push(took),
            }
        }
    }
    let (r, s) = (median(&from_registry), median(&from_store));
    println!(
        "first start of a {} MiB image the node lacks: registry median {:.0} ms (min {:.0}, max {:.0}); controller store median {:.0} ms (min {:.0}, max {:.0}); store/registry {:.2}",
        args.mib,
        r * 1e3,
        min(&from_registry) * 1e3,
        max(&from_registry) * 1e3,
        s * 1e3,
        min(&from_store) * 1e3,
        max(&from_store) * 1e3,
        s / r
    );
    forget(&big_id);
    drop(agent);
    Ok(())
}

fn median(v: &[Duration]) -> f64 {
    let mut s: Vec<f64> = v.iter().map(Duration::as_secs_f64).collect();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

fn min(v: &[Duration]) -> f64 {
    v.iter()
        .map(Duration::as_secs_f64)
        .fold(f64::INFINITY, f64::min)
}

fn max(v: &[Duration]) -> f64 {
    v.iter().map(Duration::as_secs_f64).fold(0.0, f64::max)
}

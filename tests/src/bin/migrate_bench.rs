//! `novacron-migrate-bench`: live migration (CRIU) timings of the project's counter
//! workload between two agents on two experimental Docker daemons, against a raw
//! CRIU dump and restore of the same binary on the host as the floor.
//!
//! Per size (`--sizes`, MiB of incompressible ballast) one controller, agent `a` on
//! daemon A and agent `b` on daemon B, one job (`checkpoint: {mode: live}`); then
//! `--runs` migrations, alternating a→b, b→a, … and after each a raw CRIU round:
//!
//! - **downtime** (bench): a poller GETs `/count` every 5 ms (250 ms timeout); the
//!   largest gap between consecutive successful answers around the migration;
//! - **total**: from `POST /v1/allocations/{id}/migrate` to phase `completed` as the
//!   bench sees it (polling `GET /v1/migrations/{id}` every 10 ms), with the times
//!   it first saw `transferring` and `restoring`;
//! - the controller's `downtime_ms` and `bytes_total`, the agents' `dump_ms` (source)
//!   and restore `total_ms` (target) from their logs;
//! - **raw CRIU**: `novacron-counter` started directly on the host (`setsid`), then
//!   `criu dump -t PID -D DIR --shell-job` and `criu restore -D DIR --shell-job -d`,
//!   wall times; `/count` must answer the same count after the restore.
//!
//! Correctness: `/count` (and `/ballast`) after each migration equal what they were
//! before (the poller only reads).
//!
//! Needs `NOVACRON_CKPT_DOCKER_A`, `_B` and `NOVACRON_CKPT_CRIU` (read from
//! `/var/tmp/novacron-ckpt/env` when unset) and root (CRIU).
//!
//! Run: `cargo build --release --bins && target/release/novacron-migrate-bench --sizes 64,256,1024 --runs 3`

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use novacron_common::wire::AllocState;
use novacron_tests::counter_image::{CounterJob, counter_image};
use novacron_tests::{Agent, Controller, DaemonsCleanup, bin, docker_on, free_port, wait_for};
use serde::Serialize;

/// Live migration benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Ballast sizes, MiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    sizes: Vec<usize>,
    /// Migrations (and raw CRIU rounds) per size.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Skip the raw CRIU floor.
    #[arg(long)]
    no_raw: bool,
    /// Interval of the `/count` poller, ms (0: no poller, no bench-side downtime).
    #[arg(long, default_value_t = 5)]
    poll_ms: u64,
    /// What runs the agents' containers: docker (Docker's checkpoint API) or
    /// runc (agent-owned containers, CRIU driven directly; uses
    /// NOVACRON_CKPT_CRIU).
    #[arg(long, default_value = "docker")]
    container_runtime: String,
    /// How a live migration between runc agents copies memory: post-copy or
    /// stop-copy (default: the controller's choice, post-copy where both
    /// agents support lazy pages).
    #[arg(long)]
    copy: Option<String>,
    /// A region of this many MiB that the workload rewrites at 4 MiB/s while
    /// it migrates (0: idle); its pages are checked after each move.
    #[arg(long, default_value_t = 0)]
    dirty_mb: u64,
    /// A file of this many MiB that the workload writes into its writable
    /// layer at start (0: none); its length and sum are checked after each
    /// move.
    #[arg(long, default_value_t = 0)]
    disk_mb: u64,
    /// Write each agent's log here after each size (`<size>-a.log`,
    /// `<size>-b.log`), for a breakdown of where the time went.
    #[arg(long)]
    logs: Option<PathBuf>,
}

/// The environment of the checkpoint daemons.
#[derive(Debug, Clone)]
struct Env {
    a: String,
    b: String,
    criu: String,
}

fn env() -> Result<Env> {
    let file = std::fs::read_to_string("/var/tmp/novacron-ckpt/env").unwrap_or_default();
    let get = |key: &str| -> Result<String> {
        if let Ok(v) = std::env::var(key)
            && !v.is_empty()
        {
            return Ok(v);
        }
        file.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{key}=")))
            .map(|v| v.trim().trim_matches('"').to_string())
            .with_context(|| format!("{key} is not set (source /var/tmp/novacron-ckpt/env)"))
    };
    Ok(Env {
        a: get("NOVACRON_CKPT_DOCKER_A")?,
        b: get("NOVACRON_CKPT_DOCKER_B")?,
        criu: get("NOVACRON_CKPT_CRIU")?,
    })
}

/// The `/tmp/ctrd-checkpoint*` copies Docker 20.10 leaves behind.
fn ctrd_checkpoints() -> HashSet<PathBuf> {
    std::fs::read_dir("/tmp")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("ctrd-checkpoint")
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Deletes, when dropped (and on `sweep`), the checkpoint copies that appeared
/// since it was made.
struct CtrdSweep(HashSet<PathBuf>);

impl CtrdSweep {
    fn sweep(&self) -> usize {
        let mut n = 0;
        for p in ctrd_checkpoints() {
            if !self.0.contains(&p) && std::fs::remove_dir_all(&p).is_ok() {
                n += 1;
            }
        }
        n
    }
}

impl Drop for CtrdSweep {
    fn drop(&mut self) {
        self.sweep();
    }
}

/// One migration and one raw CRIU round.
#[derive(Debug, Clone, Serialize)]
struct Run {
    size_mb: usize,
    run: usize,
    from: String,
    to: String,
    migration: String,
    /// Largest gap between successful `/count` answers, ms.
    downtime_ms: f64,
    /// Request to `completed` as the bench saw it, ms.
    total_ms: f64,
    /// Request to first seen `transferring`, ms.
    seen_transferring_ms: Option<f64>,
    /// Request to first seen `restoring`, ms.
    seen_restoring_ms: Option<f64>,
    controller_downtime_ms: Option<u64>,
    bytes_total: u64,
    /// The source agent's `dump_ms` and checkpoint `total_ms`.
    agent_dump_ms: Option<u64>,
    agent_checkpoint_total_ms: Option<u64>,
    /// The target agent's restore `unpacked_ms`, `copied_ms`, `total_ms`.
    agent_restore_unpacked_ms: Option<u64>,
    agent_restore_copied_ms: Option<u64>,
    agent_restore_total_ms: Option<u64>,
    polls_ok: usize,
    polls_failed: usize,
    count: u64,
    raw_dump_ms: Option<f64>,
    raw_restore_ms: Option<f64>,
    raw_image_bytes: Option<u64>,
}

/// Medians of one size.
#[derive(Debug, Clone, Serialize)]
struct Summary {
    size_mb: usize,
    runs: usize,
    downtime_ms: f64,
    total_ms: f64,
    controller_downtime_ms: f64,
    bytes_total: f64,
    raw_dump_ms: Option<f64>,
    raw_restore_ms: Option<f64>,
    raw_total_ms: Option<f64>,
    ratio_total_raw: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    sizes: Vec<Summary>,
    runs: Vec<Run>,
    errors: Vec<String>,
    raw_criu_flags: String,
}

const RAW_FLAGS: &str =
    "--shell-job (no extra flag: the listening socket is dumped by default; no file locks held)";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let env = env()?;
    let sweep = CtrdSweep(ctrd_checkpoints());
    let mut runs = Vec::new();
    let mut errors = Vec::new();
    for &size in &args.sizes {
        eprintln!("== {size} MiB");
        match bench_size(&env, size, &args, &mut runs).await {
            Ok(()) => {}
            Err(e) => {
                eprintln!("size {size} MiB failed: {e:#}");
                errors.push(format!("{size} MiB: {e:#}"));
            }
        }
        let n = sweep.sweep();
        eprintln!("removed {n} /tmp/ctrd-checkpoint* copies");
    }
    let mut sizes = Vec::new();
    for &size in &args.sizes {
        let rs: Vec<&Run> = runs.iter().filter(|r| r.size_mb == size).collect();
        if rs.is_empty() {
            continue;
        }
        let med =
            |f: &dyn Fn(&Run) -> Option<f64>| median(rs.iter().filter_map(|r| f(r)).collect());
        let total = med(&|r| Some(r.total_ms)).unwrap_or(f64::NAN);
        let raw_total = med(&|r| Some(r.raw_dump_ms? + r.raw_restore_ms?));
        sizes.push(Summary {
            size_mb: size,
            runs: rs.len(),
            downtime_ms: med(&|r| Some(r.downtime_ms)).unwrap_or(f64::NAN),
            total_ms: total,
            controller_downtime_ms: med(&|r| r.controller_downtime_ms.map(|v| v as f64))
                .unwrap_or(f64::NAN),
            bytes_total: med(&|r| Some(r.bytes_total as f64)).unwrap_or(f64::NAN),
            raw_dump_ms: med(&|r| r.raw_dump_ms),
            raw_restore_ms: med(&|r| r.raw_restore_ms),
            raw_total_ms: raw_total,
            ratio_total_raw: raw_total.map(|raw| total / raw),
        });
    }
    let report = Report {
        sizes,
        runs,
        errors,
        raw_criu_flags: RAW_FLAGS.to_string(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    drop(sweep);
    if !report.errors.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!("per run:");
    println!(
        "{:>6} {:>3} {:>5} {:>10} {:>9} {:>8} {:>8} {:>9} {:>8} {:>9} {:>8} {:>8}",
        "MiB",
        "run",
        "dir",
        "downtime",
        "total",
        "->xfer",
        "->rest",
        "ctrl dt",
        "dump",
        "restore",
        "raw dmp",
        "raw rst"
    );
    for x in &r.runs {
        let o = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        let ou = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        println!(
            "{:>6} {:>3} {:>5} {:>10.0} {:>9.0} {:>8} {:>8} {:>9} {:>8} {:>9} {:>8} {:>8}",
            x.size_mb,
            x.run,
            format!("{}>{}", &x.from, &x.to),
            x.downtime_ms,
            x.total_ms,
            o(x.seen_transferring_ms),
            o(x.seen_restoring_ms),
            ou(x.controller_downtime_ms),
            ou(x.agent_dump_ms),
            ou(x.agent_restore_total_ms),
            o(x.raw_dump_ms),
            o(x.raw_restore_ms),
        );
    }
    println!();
    println!(
        "| size | runs | downtime (bench) | total | controller downtime_ms | bundle bytes | raw dump | raw restore | raw total | total / raw |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in &r.sizes {
        let o = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} ms"));
        println!(
            "| {} MiB | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.0} | {} | {} | {} | {} |",
            s.size_mb,
            s.runs,
            s.downtime_ms,
            s.total_ms,
            s.controller_downtime_ms,
            s.bytes_total,
            o(s.raw_dump_ms),
            o(s.raw_restore_ms),
            o(s.raw_total_ms),
            s.ratio_total_raw
                .map_or("-".to_string(), |v| format!("{v:.1}×")),
        );
    }
    println!("raw CRIU flags: {}", r.raw_criu_flags);
    for e in &r.errors {
        println!("ERROR: {e}");
    }
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

async fn get(client: &reqwest::Client, port: u16, path: &str, timeout: Duration) -> Result<String> {
    let resp = client
        .get(format!("http://127.0.0.1:{port}{path}"))
        .timeout(timeout)
        .send()
        .await?
        .error_for_status()?;
    Ok(resp.text().await?)
}

async fn wait_ready(c: &Controller, name: &str) -> Result<()> {
    wait_for(Duration::from_secs(60), "agent ready", || async {
        matches!(c.node(name).await, Ok(Some(v)) if v.status.to_string() == "ready")
    })
    .await
}

/// The running allocation of `job`: (id, node).
async fn the_alloc(c: &Controller, job: &str) -> Result<Option<(String, String)>> {
    Ok(c.job(job)
        .await?
        .allocations
        .into_iter()
        .find(|a| a.desired_run && a.state == AllocState::Running)
        .map(|a| (a.id, a.node)))
}

async fn bench_size(env: &Env, size: usize, args: &Args, runs: &mut Vec<Run>) -> Result<()> {
    let image = counter_image(Some(&env.a)).context("counter image on A")?;
    let on_b = counter_image(Some(&env.b)).context("counter image on B")?;
    if on_b != image {
        bail!("the counter image differs on A ({image}) and B ({on_b})");
    }
    let dir = tempfile::Builder::new()
        .prefix("novacron-migrate-bench-")
        .tempdir()?;
    let controller = Controller::start(dir.path(), &[]).await?;
    let pid = std::process::id();
    let job = format!("mbench-{size}-{pid}");
    let volume = format!("{job}-data");
    let _cleanup = DaemonsCleanup {
        hosts: vec![env.a.clone(), env.b.clone()],
        job: job.clone(),
        volume: volume.clone(),
    };
    let na = format!("mba{pid}-{size}");
    let nb = format!("mbb{pid}-{size}");
    // Dropped after the agents (declared before them).
    let _runc = novacron_tests::RuncCleanup {
        state_dirs: [&na, &nb]
            .iter()
            .map(|n| dir.path().join(format!("agent-{n}")))
            .collect(),
    };
    let criu = std::env::var("NOVACRON_CKPT_CRIU").unwrap_or_else(|_| "criu".to_owned());
    let extra: Vec<&str> = match args.container_runtime.as_str() {
        "runc" => vec!["--container-runtime", "runc", "--criu", &criu],
        "docker" => Vec::new(),
        other => bail!("--container-runtime {other}: expected docker or runc"),
    };
    let agent_a = Agent::join_and_run(
        dir.path(),
        &controller,
        &na,
        &[&["--docker-host", env.a.as_str()][..], &extra].concat(),
    )
    .await?;
    wait_ready(&controller, &na).await?;
    let port = free_port();
    let manifest = CounterJob {
        disk_mb: args.disk_mb,
        job: &job,
        image: &image,
        ballast_mb: size as u64,
        dirty_mb: args.dirty_mb,
        port,
        volume: &volume,
        cpu_millis: 1000,
        mode: "live",
        checkpoint_extra: "",
    }
    .manifest();
    controller.apply("bench.yaml", &manifest).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let ok = wait_for(
        Duration::from_secs(180),
        "the counter serves on a",
        || async {
            get(&http, port, "/health", Duration::from_secs(1))
                .await
                .is_ok()
        },
    )
    .await;
    if let Err(e) = ok {
        bail!("{e}\nagent a: {}", tail(&agent_a.log(), 3000));
    }
    let agent_b = Agent::join_and_run(
        dir.path(),
        &controller,
        &nb,
        &[&["--docker-host", env.b.as_str()][..], &extra].concat(),
    )
    .await?;
    wait_ready(&controller, &nb).await?;
    // A count that is not 0, so that a fresh start would show.
    for _ in 0..7 {
        get(&http, port, "/", Duration::from_secs(5)).await?;
    }
    let admin = controller.admin_client()?;
    let agents = [&agent_a, &agent_b];
    let names = [na.clone(), nb.clone()];
    let keep_logs = || -> Result<()> {
        if let Some(dir) = &args.logs {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join(format!("{size}-a.log")), agent_a.log())?;
            std::fs::write(dir.join(format!("{size}-b.log")), agent_b.log())?;
        }
        Ok(())
    };
    for run in 0..args.runs {
        let (from, to) = if run % 2 == 0 { (0, 1) } else { (1, 0) };
        let r = migrate_once(
            &controller,
            &admin,
            &http,
            &job,
            port,
            &names,
            agents,
            from,
            to,
            size,
            run,
            args.poll_ms,
            args.copy.as_deref(),
        )
        .await;
        keep_logs()?;
        let mut r = r.with_context(|| format!("run {run} ({} -> {})", names[from], names[to]))?;
        if !args.no_raw {
            match raw_criu(env, size).await {
                Ok((d, re, bytes)) => {
                    r.raw_dump_ms = Some(d);
                    r.raw_restore_ms = Some(re);
                    r.raw_image_bytes = Some(bytes);
                }
                Err(e) => bail!("raw CRIU round {run}: {e:#}"),
            }
        }
        eprintln!(
            "{size} MiB run {run} {}->{}: downtime {:.0} ms, total {:.0} ms (xfer at {:?}, restore at {:?}), controller {:?} ms, {} bytes, agent dump {:?} ms, agent restore {:?} ms; raw dump {:?} restore {:?} ms",
            r.from,
            r.to,
            r.downtime_ms,
            r.total_ms,
            r.seen_transferring_ms.map(|v| v.round()),
            r.seen_restoring_ms.map(|v| v.round()),
            r.controller_downtime_ms,
            r.bytes_total,
            r.agent_dump_ms,
            r.agent_restore_total_ms,
            r.raw_dump_ms.map(|v| v.round()),
            r.raw_restore_ms.map(|v| v.round()),
        );
        runs.push(r);
    }
    drop(agent_a);
    drop(agent_b);
    drop(controller);
    Ok(())
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The values of `keys` on the last log line after `from` that contains `message`.
fn log_fields(log: &str, from: usize, message: &str, keys: &[&str]) -> Vec<Option<u64>> {
    let text = log.get(from..).unwrap_or("");
    // The last line with the message that carries the fields (an agent may log
    // the same words again without them).
    let first = format!("{}=", keys.first().copied().unwrap_or(""));
    let Some(line) = text
        .lines()
        .rev()
        .find(|l| l.contains(message) && l.contains(&first))
    else {
        return vec![None; keys.len()];
    };
    // Strip ANSI escapes.
    let mut clean = String::with_capacity(line.len());
    let mut esc = false;
    for c in line.chars() {
        if esc {
            if c.is_ascii_alphabetic() {
                esc = false;
            }
        } else if c == '\u{1b}' {
            esc = true;
        } else {
            clean.push(c);
        }
    }
    keys.iter()
        .map(|k| {
            clean
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .and_then(|v| v.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn migrate_once(
    controller: &Controller,
    admin: &reqwest::Client,
    http: &reqwest::Client,
    job: &str,
    port: u16,
    names: &[String; 2],
    agents: [&Agent; 2],
    from: usize,
    to: usize,
    size: usize,
    run: usize,
    poll_ms: u64,
    copy: Option<&str>,
) -> Result<Run> {
    // Settled on `from`: running there, serving, nothing left on the other side.
    let settle = Instant::now();
    let alloc = loop {
        if let Ok(Some((id, node))) = the_alloc(controller, job).await
            && node == names[from]
        {
            break id;
        }
        if settle.elapsed() > Duration::from_secs(60) {
            bail!(
                "no allocation of {job} running on {} after 60 s",
                names[from]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    wait_for(Duration::from_secs(60), "the counter serves", || async {
        get(http, port, "/health", Duration::from_secs(1))
            .await
            .is_ok()
    })
    .await?;
    let count_before: u64 = get(http, port, "/count", Duration::from_secs(5))
        .await?
        .parse()?;
    let ballast_before = get(http, port, "/ballast", Duration::from_secs(30)).await?;
    let disk_before = get(http, port, "/disk", Duration::from_secs(60)).await?;
    let logs_from = [agents[0].log().len(), agents[1].log().len()];

    // The poller.
    let stop = Arc::new(AtomicBool::new(false));
    let oks: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let wrong = Arc::new(Mutex::new(Vec::<String>::new()));
    let poller = {
        let (stop, oks, failed, wrong) = (stop.clone(), oks.clone(), failed.clone(), wrong.clone());
        let http = http.clone();
        let want = count_before.to_string();
        tokio::spawn(async move {
            if poll_ms == 0 {
                return;
            }
            let mut tick = tokio::time::interval(Duration::from_millis(poll_ms));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                match get(&http, port, "/count", Duration::from_millis(250)).await {
                    Ok(body) => {
                        let now = Instant::now();
                        if body != want {
                            wrong.lock().unwrap_or_else(|p| p.into_inner()).push(body);
                        }
                        oks.lock().unwrap_or_else(|p| p.into_inner()).push(now);
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let _stop_guard = StopOnDrop(stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    let t0 = Instant::now();
    let resp = admin
        .post(format!(
            "{}/v1/allocations/{alloc}/migrate",
            controller.api()
        ))
        .json(&match copy {
            Some(c) => serde_json::json!({ "to": names[to], "copy": c }),
            None => serde_json::json!({ "to": names[to] }),
        })
        .send()
        .await?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await?;
    if !status.is_success() {
        bail!("migrate refused ({status}): {body}");
    }
    let mid = body["id"].as_str().context("no migration id")?.to_string();
    let mut seen_transferring = None;
    let mut seen_restoring = None;
    let limit = Duration::from_secs(120 + size as u64 / 2);
    let last = loop {
        if t0.elapsed() > limit {
            bail!(
                "migration {mid} not finished after {limit:?}\nagent {}: {}\nagent {}: {}",
                names[from],
                tail(&agents[from].log(), 2000),
                names[to],
                tail(&agents[to].log(), 2000)
            );
        }
        let st: serde_json::Value = match admin
            .get(format!("{}/v1/migrations/{mid}", controller.api()))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => r.json().await?,
            _ => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let el = t0.elapsed().as_secs_f64() * 1000.0;
        match st["phase"].as_str() {
            Some("transferring") => {
                seen_transferring.get_or_insert(el);
            }
            Some("restoring") => {
                seen_transferring.get_or_insert(el);
                seen_restoring.get_or_insert(el);
            }
            Some("completed") => break (st, t0.elapsed()),
            Some("rolled_back") => bail!(
                "migration {mid} rolled back: {}\nagent {}: {}\nagent {}: {}",
                st["error"],
                names[from],
                tail(&agents[from].log(), 2000),
                names[to],
                tail(&agents[to].log(), 2000)
            ),
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (st, total) = last;
    let done_at = t0 + total;
    // The first answer after the end, to close the gap.
    let closed = wait_for(
        Duration::from_secs(30),
        "an answer from the target",
        || async {
            poll_ms == 0
                || oks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .last()
                    .is_some_and(|t| *t > done_at)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(2), poller).await;
    closed?;
    let oks = oks.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let wrong = wrong.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if !wrong.is_empty() {
        bail!("/count answered {wrong:?} during the migration, want {count_before}");
    }
    // The largest gap between consecutive successes that ends after the request.
    let mut downtime = Duration::ZERO;
    for w in oks.windows(2) {
        if w[1] > t0 && w[0] < done_at + Duration::from_secs(1) {
            downtime = downtime.max(w[1] - w[0]);
        }
    }
    let count_after: u64 = get(http, port, "/count", Duration::from_secs(5))
        .await?
        .parse()?;
    if count_after != count_before {
        bail!("count {count_after} after the migration, {count_before} before");
    }
    let ballast_after = get(http, port, "/ballast", Duration::from_secs(30)).await?;
    if ballast_after != ballast_before {
        bail!("ballast checksum {ballast_after} after the migration, {ballast_before} before");
    }
    let disk_after = get(http, port, "/disk", Duration::from_secs(60)).await?;
    if disk_after != disk_before {
        bail!("disk file (length, sum) {disk_after} after the migration, {disk_before} before");
    }
    match the_alloc(controller, job).await? {
        Some((id, node)) if id == alloc && node == names[to] => {}
        other => bail!(
            "after the migration the allocation is {other:?}, want {alloc} on {}",
            names[to]
        ),
    }
    // The source removes its stopped container before the next run goes back.
    let src_host = agents[from]
        .run_args
        .get(1)
        .cloned()
        .context("agent has no --docker-host")?;
    wait_for(
        Duration::from_secs(60),
        "source container removed",
        || async {
            docker_on(
                &src_host,
                &[
                    "ps",
                    "-aq",
                    "--filter",
                    &format!("label=novacron.job={job}"),
                ],
            )
            .is_ok_and(|ids| ids.is_empty())
        },
    )
    .await?;
    let ckpt = log_fields(
        &agents[from].log(),
        logs_from[from],
        "checkpoint written",
        &["dump_ms", "total_ms"],
    );
    let rest = log_fields(
        &agents[to].log(),
        logs_from[to],
        "restored from checkpoint",
        &["unpacked_ms", "copied_ms", "total_ms"],
    );
    Ok(Run {
        size_mb: size,
        run,
        from: if from == 0 { "a" } else { "b" }.into(),
        to: if to == 0 { "a" } else { "b" }.into(),
        migration: mid,
        downtime_ms: downtime.as_secs_f64() * 1000.0,
        total_ms: total.as_secs_f64() * 1000.0,
        seen_transferring_ms: seen_transferring,
        seen_restoring_ms: seen_restoring,
        controller_downtime_ms: st["downtime_ms"].as_u64(),
        bytes_total: st["bytes_total"].as_u64().unwrap_or(0),
        agent_dump_ms: ckpt[0],
        agent_checkpoint_total_ms: ckpt[1],
        agent_restore_unpacked_ms: rest[0],
        agent_restore_copied_ms: rest[1],
        agent_restore_total_ms: rest[2],
        polls_ok: oks.len(),
        polls_failed: failed.load(Ordering::Relaxed),
        count: count_after,
        raw_dump_ms: None,
        raw_restore_ms: None,
        raw_image_bytes: None,
    })
}

/// Kills a raw counter process by pid when dropped.
struct KillPid(Option<u32>);

impl Drop for KillPid {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Raw CRIU: (dump ms, restore ms, image bytes).
async fn raw_criu(env: &Env, size: usize) -> Result<(f64, f64, u64)> {
    let dir = tempfile::Builder::new()
        .prefix("novacron-migrate-bench-raw-")
        .tempdir()?;
    let images = dir.path().join("images");
    std::fs::create_dir(&images)?;
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("counter.log"))?;
    // Not a process group leader (same group as the bench), so `setsid` calls
    // setsid(2) and execs: the pid stays the child's.
    let mut child = std::process::Command::new("setsid")
        .arg(bin("novacron-counter"))
        .env("BALLAST_MB", size.to_string())
        .env("PORT", port.to_string())
        .env("DATA_FILE", dir.path().join("count.log"))
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("spawning setsid novacron-counter")?;
    let pid = child.id();
    let mut guard = KillPid(Some(pid));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let up = wait_for(Duration::from_secs(120), "the raw counter", || async {
        get(&http, port, "/health", Duration::from_secs(1))
            .await
            .is_ok()
    })
    .await;
    if let Err(e) = up {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    for _ in 0..3 {
        get(&http, port, "/", Duration::from_secs(5)).await?;
    }
    let want = get(&http, port, "/count", Duration::from_secs(5)).await?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if !comm.starts_with("novacron-counte") {
        bail!("pid {pid} is {comm:?}, not the counter (setsid forked?)");
    }
    let criu = |args: Vec<String>| {
        let criu = env.criu.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(300),
                tokio::process::Command::new(&criu)
                    .args(&args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .kill_on_drop(true)
                    .status(),
            )
            .await
        }
    };
    let img = images.display().to_string();
    let t = Instant::now();
    let st = criu(vec![
        "dump".into(),
        "-t".into(),
        pid.to_string(),
        "-D".into(),
        img.clone(),
        "--shell-job".into(),
        "-o".into(),
        "dump.log".into(),
    ])
    .await
    .context("criu dump timed out")??;
    let dump = t.elapsed();
    // Reap it: the restore needs its pid free.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    if !st.success() {
        let _ = child.kill();
        let _ = child.wait();
        bail!(
            "criu dump failed ({st}): {}",
            tail(
                &std::fs::read_to_string(images.join("dump.log")).unwrap_or_default(),
                2000
            )
        );
    }
    guard.0 = None;
    let bytes = dir_bytes(&images);
    let pidfile = dir.path().join("restored.pid");
    let t = Instant::now();
    let st = criu(vec![
        "restore".into(),
        "-D".into(),
        img.clone(),
        "--shell-job".into(),
        "-d".into(),
        "--pidfile".into(),
        pidfile.display().to_string(),
        "-o".into(),
        "restore.log".into(),
    ])
    .await
    .context("criu restore timed out")??;
    let restore = t.elapsed();
    if let Some(p) = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|s| s.trim().parse().ok())
    {
        guard.0 = Some(p);
    } else {
        guard.0 = Some(pid);
    }
    if !st.success() {
        bail!(
            "criu restore failed ({st}): {}",
            tail(
                &std::fs::read_to_string(images.join("restore.log")).unwrap_or_default(),
                2000
            )
        );
    }
    let got = get(&http, port, "/count", Duration::from_secs(5))
        .await
        .context("/count after the raw restore")?;
    if got != want {
        bail!("raw restore: /count {got}, want {want}");
    }
    drop(guard);
    Ok((
        dump.as_secs_f64() * 1000.0,
        restore.as_secs_f64() * 1000.0,
        bytes,
    ))
}

//! `novacron-footprint`: the real agent's memory and CPU next to Debian's
//! `prometheus-node-exporter`.
//!
//! It starts the **release** controller on loopback, enrolls and runs one release
//! `novacron-agent` (`join`, then `run --interval 1s`), and runs
//! `prometheus-node-exporter` on a free loopback port, scraped with `GET /metrics`
//! once a second (as a Prometheus server with a 1 s scrape interval would, the
//! exporter's equivalent of the agent's 1 s sampling). It installs the exporter with
//! `apt-get` when it is missing.
//!
//! After `--warmup` it samples both processes once a second for `--duration`:
//! `VmRSS` (median and max) and CPU (utime + stime delta over the wall time, as a
//! share of one core). It also prints each process's `VmHWM`, `RssAnon`, `RssFile`,
//! thread count and `Pss` (from `/proc/<pid>/smaps_rollup`) at the end, checks the
//! agent against its targets (≤ 15 MB RSS, ≤ 1 % of one core) and confirms through
//! `GET /v1/stats` that the controller received the agent's samples.
//!
//! Every child is stopped on every exit path (guards stop them on error and on panic).
//!
//! ```text
//! cargo build --release --bins
//! target/release/novacron-footprint --duration 60s
//! ```

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use novacron_api::ControllerStats;
use novacron_common::pki::{self, Fingerprint};
use novacron_common::tls;
use novacron_controller::api::{TokenRequest, TokenResponse};
use novacron_tests::procfs::{
    clock_ticks_per_sec, cpu_ticks, kib_field, mb, median, read, sibling_binary, status_field,
};
use serde::Serialize;

/// The agent's RSS target, bytes (15 MB).
const AGENT_RSS_TARGET_BYTES: f64 = 15e6;
/// The agent's CPU target, percent of one core.
const AGENT_CPU_TARGET_PERCENT: f64 = 1.0;
/// How long a child may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The Debian package that provides the exporter.
const NODE_EXPORTER_PACKAGE: &str = "prometheus-node-exporter";

/// Command line of `novacron-footprint`.
#[derive(Debug, Parser)]
#[command(
    name = "novacron-footprint",
    about = "Agent footprint next to prometheus-node-exporter"
)]
struct Args {
    /// How long to measure after the warm-up (at least 60s for a reportable number).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Time between starting both processes and the start of the measurement.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// The agent's sampling interval.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Work directory (controller data, agent state, logs); default: a temporary one,
    /// removed at the end.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The controller binary (default: next to this binary).
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// The agent binary (default: next to this binary).
    #[arg(long)]
    agent_bin: Option<PathBuf>,
    /// The node exporter binary; installed with apt-get when missing.
    #[arg(long, default_value = "/usr/bin/prometheus-node-exporter")]
    node_exporter_bin: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.duration < Duration::from_secs(1) {
        bail!("--duration {:?}: expected at least 1s", args.duration);
    }
    tls::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        tokio::select! {
            result = run(args) => result,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        }
    })
}

/// The whole benchmark; child guards stop every process on every exit.
async fn run(args: Args) -> anyhow::Result<()> {
    let controller_bin = args
        .controller_bin
        .clone()
        .map_or_else(|| sibling_binary("novacron-controller"), Ok)?;
    let agent_bin = args
        .agent_bin
        .clone()
        .map_or_else(|| sibling_binary("novacron-agent"), Ok)?;
    ensure_node_exporter(&args.node_exporter_bin)?;
    let clk_tck = clock_ticks_per_sec();

    let _temp;
    let work = match &args.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.clone()
        }
        None => {
            let dir = tempfile::tempdir().context("creating a temporary directory")?;
            let path = dir.path().to_path_buf();
            _temp = dir;
            path
        }
    };
    let data_dir = work.join("controller");
    let state_dir = work.join("agent");
    let _ = std::fs::remove_dir_all(&state_dir);

    // Controller.
    if !data_dir.join("pki/ca.pem").exists() {
        run_checked(
            Command::new(&controller_bin)
                .arg("--data-dir")
                .arg(&data_dir)
                .arg("init"),
        )?;
    }
    let controller_log = work.join("controller.log");
    let mut controller = Guard::spawn(
        "controller",
        Command::new(&controller_bin)
            .arg("--data-dir")
            .arg(&data_dir)
            .args([
                "serve",
                "--api-listen",
                "127.0.0.1:0",
                "--quic-listen",
                "127.0.0.1:0",
            ]),
        &controller_log,
    )?;
    let (api_url, quic_addr) = wait_ready(&mut controller, &controller_log)?;
    let ca_pem = read(&data_dir.join("pki/ca.pem"))?;
    let admin = https_client(
        &ca_pem,
        &read(&data_dir.join("pki/admin.pem"))?,
        &read(&data_dir.join("pki/admin-key.pem"))?,
    )?;

    // Agent: the real join and run.
    let token: TokenResponse = {
        let req = TokenRequest {
            ttl_secs: 600,
            uses: 1,
            description: "novacron-footprint".into(),
        };
        let resp = admin
            .post(format!("{api_url}/v1/tokens"))
            .json(&req)
            .send()
            .await?
            .error_for_status()?;
        resp.json().await?
    };
    let fingerprint = Fingerprint::of(&pki::first_cert_der(&ca_pem)?);
    run_checked(
        Command::new(&agent_bin)
            .args(["join", "--controller", &api_url, "--token", &token.token])
            .args([
                "--ca-fingerprint",
                &fingerprint.to_string(),
                "--name",
                "footprint-node",
            ])
            .arg("--state-dir")
            .arg(&state_dir),
    )?;
    let agent_log = work.join("agent.log");
    let agent = Guard::spawn(
        "agent",
        Command::new(&agent_bin)
            .arg("run")
            .arg("--state-dir")
            .arg(&state_dir)
            .args([
                "--interval",
                &humantime::format_duration(args.interval).to_string(),
            ])
            .args([
                "--controller",
                &quic_addr.to_string(),
                "--label",
                "bench=footprint",
            ]),
        &agent_log,
    )?;

    // Node exporter, scraped every second.
    let port = free_tcp_port()?;
    let exporter_log = work.join("node-exporter.log");
    let mut exporter = Guard::spawn(
        "node-exporter",
        Command::new(&args.node_exporter_bin).arg(format!("--web.listen-address=127.0.0.1:{port}")),
        &exporter_log,
    )?;
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    wait_for_scrape(&plain, &metrics_url, &mut exporter).await?;
    let scrapes = Arc::new(ScrapeCounters::default());
    let scraper = tokio::spawn(scrape_loop(plain, metrics_url, scrapes.clone()));
    let _stop_scraper = AbortOnDrop(scraper);

    println!(
        "controller pid {} ({api_url}), agent pid {}, node exporter pid {} (127.0.0.1:{port}); warming up for {:?}",
        controller.pid(),
        agent.pid(),
        exporter.pid(),
        args.warmup
    );
    tokio::time::sleep(args.warmup).await;
    let stats_url = format!("{api_url}/v1/stats");
    let before: ControllerStats = admin
        .get(&stats_url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    if before.connected_agents != 1 {
        bail!(
            "the agent is not connected after the warm-up (connected_agents = {}); see {}",
            before.connected_agents,
            agent_log.display()
        );
    }

    // Measurement window.
    let start = (
        Instant::now(),
        cpu_ticks(&format!("/proc/{}/stat", agent.pid()))?,
        cpu_ticks(&format!("/proc/{}/stat", exporter.pid()))?,
        scrapes.ok.load(Ordering::Relaxed),
    );
    let mut agent_rss = Vec::new();
    let mut exporter_rss = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let window_end = Instant::now() + args.duration;
    println!("measuring for {:?}", args.duration);
    loop {
        tick.tick().await;
        agent_rss.push(status_field(
            &format!("/proc/{}/status", agent.pid()),
            "VmRSS",
        )?);
        exporter_rss.push(status_field(
            &format!("/proc/{}/status", exporter.pid()),
            "VmRSS",
        )?);
        if Instant::now() >= window_end {
            break;
        }
    }
    let wall = start.0.elapsed().as_secs_f64();
    let agent_ticks = cpu_ticks(&format!("/proc/{}/stat", agent.pid()))? - start.1;
    let exporter_ticks = cpu_ticks(&format!("/proc/{}/stat", exporter.pid()))? - start.2;
    let scrapes_ok = scrapes.ok.load(Ordering::Relaxed) - start.3;
    let after: ControllerStats = admin
        .get(&stats_url)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let agent_detail = Detail::read(agent.pid())?;
    let exporter_detail = Detail::read(exporter.pid())?;
    drop((exporter, agent, controller));

    let report = Report {
        bench: "footprint",
        window_secs: wall,
        interval_ms: u64::try_from(args.interval.as_millis()).unwrap_or(u64::MAX),
        agent: Side::new(&agent_rss, agent_ticks, clk_tck, wall, agent_detail),
        node_exporter: Side::new(
            &exporter_rss,
            exporter_ticks,
            clk_tck,
            wall,
            exporter_detail,
        ),
        agent_samples_ingested_per_sec: after
            .samples_ingested
            .saturating_sub(before.samples_ingested) as f64
            / wall,
        agent_connected_at_end: after.connected_agents == 1,
        scrapes_per_sec: scrapes_ok as f64 / wall,
        scrape_failures: scrapes.failed.load(Ordering::Relaxed),
        scrape_bytes: scrapes.last_bytes.load(Ordering::Relaxed),
        agent_meets_rss_target: false,
        agent_meets_cpu_target: false,
    }
    .checked();
    report.print();
    Ok(())
}

/// One process's measured footprint.
#[derive(Debug, Serialize)]
struct Side {
    rss_median_mb: f64,
    rss_max_mb: f64,
    cpu_percent: f64,
    peak_rss_mb: f64,
    rss_anon_mb: f64,
    rss_file_mb: f64,
    pss_mb: f64,
    threads: u64,
}

impl Side {
    fn new(rss_kib: &[u64], ticks: u64, clk_tck: u64, wall: f64, detail: Detail) -> Side {
        Side {
            rss_median_mb: mb(median(rss_kib)),
            rss_max_mb: mb(rss_kib.iter().copied().max().unwrap_or(0)),
            cpu_percent: 100.0 * ticks as f64 / clk_tck as f64 / wall,
            peak_rss_mb: mb(detail.hwm_kib),
            rss_anon_mb: mb(detail.anon_kib),
            rss_file_mb: mb(detail.file_kib),
            pss_mb: mb(detail.pss_kib),
            threads: detail.threads,
        }
    }
}

/// What one run measured.
#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    window_secs: f64,
    interval_ms: u64,
    agent: Side,
    node_exporter: Side,
    agent_samples_ingested_per_sec: f64,
    agent_connected_at_end: bool,
    scrapes_per_sec: f64,
    scrape_failures: u64,
    scrape_bytes: u64,
    agent_meets_rss_target: bool,
    agent_meets_cpu_target: bool,
}

impl Report {
    fn checked(mut self) -> Report {
        self.agent_meets_rss_target = self.agent.rss_max_mb * 1e6 <= AGENT_RSS_TARGET_BYTES;
        self.agent_meets_cpu_target = self.agent.cpu_percent <= AGENT_CPU_TARGET_PERCENT;
        self
    }

    fn print(&self) {
        let (a, e) = (&self.agent, &self.node_exporter);
        let rows = [
            (
                "RSS median",
                format!("{:.1} MB", a.rss_median_mb),
                format!("{:.1} MB", e.rss_median_mb),
            ),
            (
                "RSS max",
                format!("{:.1} MB", a.rss_max_mb),
                format!("{:.1} MB", e.rss_max_mb),
            ),
            (
                "CPU (% of one core)",
                format!("{:.2} %", a.cpu_percent),
                format!("{:.2} %", e.cpu_percent),
            ),
            (
                "peak RSS (VmHWM)",
                format!("{:.1} MB", a.peak_rss_mb),
                format!("{:.1} MB", e.peak_rss_mb),
            ),
            (
                "RssAnon / RssFile at end",
                format!("{:.1} / {:.1} MB", a.rss_anon_mb, a.rss_file_mb),
                format!("{:.1} / {:.1} MB", e.rss_anon_mb, e.rss_file_mb),
            ),
            (
                "PSS at end",
                format!("{:.1} MB", a.pss_mb),
                format!("{:.1} MB", e.pss_mb),
            ),
            ("threads", a.threads.to_string(), e.threads.to_string()),
        ];
        println!();
        println!(
            "novacron-footprint: {:.1} s window, agent interval {} ms, exporter scraped {:.2}/s ({} failures, {} bytes per scrape)",
            self.window_secs,
            self.interval_ms,
            self.scrapes_per_sec,
            self.scrape_failures,
            self.scrape_bytes
        );
        println!(
            "  {:<26}  {:>16}  {:>16}",
            "", "novacron-agent", "node-exporter"
        );
        for (key, agent, exporter) in &rows {
            println!("  {key:<26}  {agent:>16}  {exporter:>16}");
        }
        println!(
            "  agent samples ingested by the controller: {:.2}/s (connected at end: {})",
            self.agent_samples_ingested_per_sec, self.agent_connected_at_end
        );
        let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
        println!(
            "  target RSS <= 15 MB (max over the window): {}; CPU <= 1 % of one core: {}",
            verdict(self.agent_meets_rss_target),
            verdict(self.agent_meets_cpu_target)
        );
        match serde_json::to_string(self) {
            Ok(json) => println!("{json}"),
            Err(e) => eprintln!("cannot encode the report as JSON: {e}"),
        }
    }
}

/// Memory details of a process at one moment.
#[derive(Debug)]
struct Detail {
    hwm_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    pss_kib: u64,
    threads: u64,
}

impl Detail {
    fn read(pid: u32) -> anyhow::Result<Detail> {
        let rollup = read(Path::new(&format!("/proc/{pid}/smaps_rollup"))).unwrap_or_default();
        Ok(Detail {
            hwm_kib: status_field(&format!("/proc/{pid}/status"), "VmHWM")?,
            anon_kib: status_field(&format!("/proc/{pid}/status"), "RssAnon")?,
            file_kib: status_field(&format!("/proc/{pid}/status"), "RssFile")?,
            pss_kib: kib_field(&rollup, "Pss").unwrap_or(0),
            threads: status_field(&format!("/proc/{pid}/status"), "Threads")?,
        })
    }
}

/// Scrape outcomes.
#[derive(Debug, Default)]
struct ScrapeCounters {
    ok: AtomicU64,
    failed: AtomicU64,
    last_bytes: AtomicU64,
}

/// GETs `/metrics` once a second until aborted.
async fn scrape_loop(client: reqwest::Client, url: String, counters: Arc<ScrapeCounters>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let body = match client.get(&url).send().await {
            Ok(resp) if resp.status().is_success() => resp.bytes().await.ok(),
            _ => None,
        };
        match body {
            Some(body) => {
                counters.ok.fetch_add(1, Ordering::Relaxed);
                counters
                    .last_bytes
                    .store(body.len() as u64, Ordering::Relaxed);
            }
            None => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Waits until the exporter answers `/metrics`.
async fn wait_for_scrape(
    client: &reqwest::Client,
    url: &str,
    exporter: &mut Guard,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(resp) = client.get(url).send().await
            && resp.status().is_success()
        {
            return Ok(());
        }
        if exporter.exited() {
            bail!("the node exporter exited; see {}", exporter.log.display());
        }
        if Instant::now() >= deadline {
            bail!("the node exporter did not answer {url} within {START_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Installs the exporter from Debian's archive when `bin` does not exist.
fn ensure_node_exporter(bin: &Path) -> anyhow::Result<()> {
    if bin.exists() {
        return Ok(());
    }
    println!(
        "{} missing: apt-get install -y {NODE_EXPORTER_PACKAGE}",
        bin.display()
    );
    let install = || {
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "--no-install-recommends",
                NODE_EXPORTER_PACKAGE,
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
    };
    if !install().is_ok_and(|s| s.success()) {
        run_checked(Command::new("apt-get").arg("update"))?;
        let status = install().context("running apt-get")?;
        if !status.success() {
            bail!("apt-get install {NODE_EXPORTER_PACKAGE} failed ({status})");
        }
    }
    if !bin.exists() {
        bail!(
            "{} still missing after installing {NODE_EXPORTER_PACKAGE}",
            bin.display()
        );
    }
    Ok(())
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
struct Guard {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Guard {
    fn spawn(name: &'static str, command: &mut Command, log: &Path) -> anyhow::Result<Guard> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting the {name}"))?;
        Ok(Guard {
            name,
            child,
            log: log.to_path_buf(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            eprintln!(
                "note: the {} had already exited; see {}",
                self.name,
                self.log.display()
            );
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for the controller's ready line; returns the API URL and the QUIC address.
fn wait_ready(controller: &mut Guard, log: &Path) -> anyhow::Result<(String, SocketAddr)> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let ready = text
            .lines()
            .find_map(|l| l.strip_prefix("controller ready: api "))
            .and_then(|l| l.split_once(", agent link udp "))
            .and_then(|(api, quic)| Some((api.trim().to_string(), quic.trim().parse().ok()?)));
        if let Some(ready) = ready {
            return Ok(ready);
        }
        if controller.exited() {
            bail!("the controller exited before it was ready:\n{text}");
        }
        if Instant::now() >= deadline {
            bail!("the controller printed no ready line within {START_TIMEOUT:?}:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_checked(command: &mut Command) -> anyhow::Result<()> {
    let out = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn https_client(ca_pem: &str, cert_pem: &str, key_pem: &str) -> anyhow::Result<reqwest::Client> {
    let config = tls::client_config(ca_pem, Some((cert_pem, key_pem)), &[b"h2", b"http/1.1"])?;
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// A loopback TCP port that was free a moment ago.
fn free_tcp_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding a probe socket")?;
    Ok(listener.local_addr()?.port())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

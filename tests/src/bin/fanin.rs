//! `novacron-fanin`: a fan-in load generator for the controller's agent link.
//!
//! It runs the **release** `novacron-controller` as a child process on loopback
//! (ports picked by the kernel), enrolls `--agents` fake agents through the real
//! `POST /v1/enroll` path (one join token per 10,000 agents, bounded concurrency),
//! and opens one mutually authenticated QUIC connection per agent, spread over
//! several client endpoints. Every fake agent speaks the real agent protocol
//! (`Hello`/`Welcome` on a bi-stream, then `StreamOpen` and one `MetricsBatch` with one
//! realistic `NodeSample` per second on a uni-stream), staggered evenly across each
//! second, with the controller's default keep-alive and idle timeout.
//!
//! Once every agent is connected it waits `--warmup`, clears the controller's latency
//! window (`POST /v1/stats/reset-latency`), and measures for `--duration`: the
//! controller's CPU (utime + stime from `/proc/<pid>/stat`, as a share of one core)
//! and RSS (`VmRSS`, sampled every second), the load generator's own CPU and RSS
//! (it runs on the same cores), host CPU use and what all other processes used,
//! datagrams dropped at the controller's socket and at the load generator's sockets
//! (`/proc/net/udp`; the load generator asks for 4 MiB socket buffers so that it is
//! not the one dropping), and at the end `GET /v1/stats`. It prints a table and one
//! JSON line.
//!
//! Every loop is bounded in time; the controller child is stopped on every exit path
//! (a guard stops it on error and on panic).
//!
//! ```text
//! cargo build --release --bins
//! target/release/novacron-fanin --agents 1000 --duration 60s --data-dir /tmp/fanin-1k
//! ```

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use clap::Parser;
use novacron_api::{ControllerStats, EnrollRequest, EnrollResponse};
use novacron_common::clock::unix_ms;
use novacron_common::fleet::Liveness;
use novacron_common::pki;
use novacron_common::tls;
use novacron_common::wire::{
    self, AgentMessage, Capabilities, Capacity, ControllerMessage, CpuSample, DiskSample, Hello,
    MemorySample, MetricsBatch, NetworkSample, NodeSample, PROTOCOL_VERSION, StreamKind,
    StreamOpen,
};
use novacron_controller::api::{TokenRequest, TokenResponse};
use novacron_controller::{link, tokens};
use novacron_tests::procfs::{
    clock_ticks_per_sec, cpu_ticks, mb, median, read, sibling_binary, status_field,
};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The most uses one join token may have.
const TOKEN_MAX_USES: usize = tokens::MAX_USES as usize;
/// The controller serves at most this many connections.
const MAX_AGENTS: usize = link::MAX_CONNECTIONS;
/// How long the controller may take to print its ready line.
const CONTROLLER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one QUIC handshake may take before it is retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the controller may take to answer `Hello`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Connection attempts per fake agent before it gives up.
const CONNECT_ATTEMPTS: u32 = 5;
/// The sampling period of a fake agent.
const SAMPLE_PERIOD: Duration = Duration::from_secs(1);

/// Command line of `novacron-fanin`.
#[derive(Debug, Parser)]
#[command(name = "novacron-fanin", about = "Controller fan-in load generator")]
struct Args {
    /// Number of fake agents (1 to 20000, the controller's connection limit).
    #[arg(long)]
    agents: usize,
    /// How long to measure after the warm-up (e.g. 60s).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// The controller's data directory; initialized when it holds no CA yet.
    #[arg(long)]
    data_dir: PathBuf,
    /// The controller binary (default: `novacron-controller` next to this binary).
    #[arg(long)]
    controller_bin: Option<PathBuf>,
    /// QUIC connections per client endpoint (UDP socket) of the load generator.
    #[arg(long, default_value_t = 500)]
    connections_per_endpoint: usize,
    /// Time between the last connection and the start of the measurement.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Enrollment requests in flight at once.
    #[arg(long, default_value_t = 32)]
    enroll_concurrency: usize,
    /// QUIC handshakes (up to `Welcome`) in flight at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Receive and send buffer asked for on each load-generator UDP socket, bytes
    /// (the kernel caps it at net.core.rmem_max / wmem_max), so that the load
    /// generator's own sockets are not where datagrams get dropped.
    #[arg(long, default_value_t = 4 << 20)]
    socket_buffer: usize,
    /// Longest time allowed for enrolling and connecting all agents.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    setup_timeout: Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !(1..=MAX_AGENTS).contains(&args.agents) {
        bail!("--agents {}: expected 1 to {MAX_AGENTS}", args.agents);
    }
    if args.connections_per_endpoint == 0
        || args.enroll_concurrency == 0
        || args.connect_concurrency == 0
    {
        bail!(
            "--connections-per-endpoint, --enroll-concurrency and --connect-concurrency must be at least 1"
        );
    }
    if args.duration < Duration::from_secs(1) {
        bail!("--duration {:?}: expected at least 1s", args.duration);
    }
    tls::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread()
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

/// The whole benchmark; the controller guard inside stops the child on every exit.
async fn run(args: Args) -> anyhow::Result<()> {
    let controller_bin = match &args.controller_bin {
        Some(p) => p.clone(),
        None => sibling_binary("novacron-controller")?,
    };
    let clk_tck = clock_ticks_per_sec();
    ensure_initialized(&controller_bin, &args.data_dir)?;
    let controller = ControllerProcess::start(&controller_bin, &args.data_dir)?;
    println!(
        "controller pid {} api {} quic {} (log {})",
        controller.pid(),
        controller.api_url,
        controller.quic_addr,
        controller.log.display()
    );
    let pki_dir = args.data_dir.join("pki");
    let ca_pem = read(&pki_dir.join("ca.pem"))?;
    let admin = admin_client(&ca_pem, &pki_dir)?;
    let anonymous = https_client(&ca_pem, None)?;

    // Enrollment through the real API.
    let enroll_started = Instant::now();
    let nodes = enroll_all(&admin, &anonymous, &controller.api_url, &args).await?;
    let enroll_secs = enroll_started.elapsed().as_secs_f64();
    println!(
        "enrolled {} agents in {enroll_secs:.1} s ({:.0}/s)",
        nodes.len(),
        nodes.len() as f64 / enroll_secs
    );

    // Connections.
    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let _stop_on_exit = stop.clone().drop_guard();
    let endpoints = (0..args.agents.div_ceil(args.connections_per_endpoint))
        .map(|_| client_endpoint(args.socket_buffer))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let epoch = tokio::time::Instant::now();
    let connect_limit = Arc::new(Semaphore::new(args.connect_concurrency));
    let connect_started = Instant::now();
    let mut agents = JoinSet::new();
    for (index, node) in nodes.into_iter().enumerate() {
        let endpoint = endpoints[index / args.connections_per_endpoint].clone();
        let agent = FakeAgent {
            index,
            total: args.agents,
            node,
            ca_pem: ca_pem.clone(),
            controller: controller.quic_addr,
        };
        agents.spawn(agent.run(
            endpoint,
            connect_limit.clone(),
            counters.clone(),
            epoch,
            stop.clone(),
        ));
    }
    let deadline = Instant::now() + args.setup_timeout;
    let mut last_report = Instant::now();
    loop {
        let connected = counters.connected.load(Ordering::Relaxed);
        let failed = counters.failed.load(Ordering::Relaxed);
        if connected + failed >= args.agents {
            break;
        }
        if Instant::now() >= deadline {
            bail!(
                "only {connected} of {} agents connected within --setup-timeout {:?} ({failed} gave up)",
                args.agents,
                args.setup_timeout
            );
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            println!("connecting: {connected} connected, {failed} gave up");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    let connected = counters.connected.load(Ordering::Relaxed);
    let gave_up = counters.failed.load(Ordering::Relaxed);
    let retries = counters.retries.load(Ordering::Relaxed);
    println!(
        "connected {connected} agents in {connect_secs:.1} s ({gave_up} gave up, {retries} retries); warming up for {:?}",
        args.warmup
    );
    if retries > 0 {
        let first = counters.first_retry.lock().ok().and_then(|f| f.clone());
        println!(
            "first retried attempt failed with: {}",
            first.unwrap_or_default()
        );
    }
    if connected == 0 {
        bail!("no agent connected; see {}", controller.log.display());
    }
    tokio::time::sleep(args.warmup).await;
    let live_at_start = counters.live();
    if live_at_start == 0 {
        bail!(
            "every agent lost its connection during the warm-up; first: {}; see {}",
            counters.first_disconnect(),
            controller.log.display()
        );
    }
    if live_at_start < connected as u64 {
        eprintln!(
            "warning: {} agents lost their connection before the measurement; first: {}",
            connected as u64 - live_at_start,
            counters.first_disconnect()
        );
    }

    // Measurement window.
    let stats_url = format!("{}/v1/stats", controller.api_url);
    post_empty(
        &admin,
        &format!("{}/v1/stats/reset-latency", controller.api_url),
    )
    .await?;
    let before = get_json::<ControllerStats>(&admin, &stats_url).await?;
    let pid = controller.pid();
    let controller_port = [controller.quic_addr.port()];
    let loadgen_ports = endpoints
        .iter()
        .map(|e| e.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()?;
    let drops_before = (
        socket_drops(&controller_port)?,
        socket_drops(&loadgen_ports)?,
    );
    let start = Probe::take(pid)?;
    let sent_before = counters.sent.load(Ordering::Relaxed);
    let disconnects_before = counters.disconnected.load(Ordering::Relaxed);
    let mut controller_rss = Vec::new();
    let mut own_rss = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let window_end = Instant::now() + args.duration;
    println!("measuring for {:?}", args.duration);
    loop {
        tick.tick().await;
        controller_rss.push(status_field(&format!("/proc/{pid}/status"), "VmRSS")?);
        own_rss.push(status_field("/proc/self/status", "VmRSS")?);
        if controller_rss.len() % 60 == 0 {
            println!(
                "minute {}: controller RSS {:.1} MB",
                controller_rss.len() / 60,
                mb(controller_rss[controller_rss.len() - 1])
            );
        }
        if Instant::now() >= window_end {
            break;
        }
    }
    let end = Probe::take(pid)?;
    let drops_after = (
        socket_drops(&controller_port)?,
        socket_drops(&loadgen_ports)?,
    );
    let after = get_json::<ControllerStats>(&admin, &stats_url).await?;
    let sent = counters.sent.load(Ordering::Relaxed) - sent_before;
    let disconnects = counters.disconnected.load(Ordering::Relaxed) - disconnects_before;

    // Stop the agents before the report, then the controller (guard).
    stop.cancel();
    let drain = async { while agents.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .is_err()
    {
        agents.abort_all();
    }
    for endpoint in &endpoints {
        endpoint.close(wire::CloseCode::Normal.code().into(), b"benchmark over");
    }
    for endpoint in &endpoints {
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    }
    drop(controller);

    let wall = end.at.duration_since(start.at).as_secs_f64();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let report = Report {
        bench: "fanin",
        agents: args.agents,
        agents_connected: connected,
        agents_gave_up: gave_up,
        endpoints: endpoints.len(),
        enroll_secs,
        connect_secs,
        warmup_secs: args.warmup.as_secs_f64(),
        window_secs: wall,
        connected_agents_at_start: before.connected_agents,
        connected_agents_at_end: after.connected_agents,
        live_at_start,
        disconnects_in_window: disconnects,
        first_disconnect: counters.first_disconnect(),
        samples_sent_per_sec: sent as f64 / wall,
        samples_ingested_per_sec: after
            .samples_ingested
            .saturating_sub(before.samples_ingested) as f64
            / wall,
        samples_ingested_total: after.samples_ingested,
        ingest_latency_p50_ms: after.ingest_latency_p50_ms,
        ingest_latency_p99_ms: after.ingest_latency_p99_ms,
        ingest_latency_count: after.ingest_latency_count,
        controller_cpu_percent: cpu_percent(
            end.controller_ticks - start.controller_ticks,
            clk_tck,
            wall,
        ),
        controller_rss_median_mb: mb(median(&controller_rss)),
        controller_rss_max_mb: mb(controller_rss.iter().copied().max().unwrap_or(0)),
        controller_rss_growth_mb_per_min: match (controller_rss.first(), controller_rss.last()) {
            (Some(&first), Some(&last)) => (mb(last) - mb(first)) * 60.0 / wall,
            _ => 0.0,
        },
        controller_rss_end_mb: mb(controller_rss.last().copied().unwrap_or(0)),
        // The change over the last 10 minutes (or the last third of a shorter
        // window): flat memory once the history's head is full.
        controller_rss_growth_last_part_mb: {
            let part = (controller_rss.len() / 3).clamp(1, 600);
            let tail = &controller_rss[controller_rss.len().saturating_sub(part)..];
            match (tail.first(), tail.last()) {
                (Some(&a), Some(&b)) => mb(b) - mb(a),
                _ => 0.0,
            }
        },
        controller_rss_last_part_secs: (controller_rss.len() / 3).clamp(1, 600) as u64,
        loadgen_cpu_percent: cpu_percent(end.own_ticks - start.own_ticks, clk_tck, wall),
        loadgen_rss_median_mb: mb(median(&own_rss)),
        host_cpu_busy_percent: end.host.busy_percent_since(&start.host),
        other_cpu_percent: (end.host.busy_percent_since(&start.host) * cores as f64
            - cpu_percent(end.controller_ticks - start.controller_ticks, clk_tck, wall)
            - cpu_percent(end.own_ticks - start.own_ticks, clk_tck, wall))
        .max(0.0),
        controller_socket_drops: drops_after.0.saturating_sub(drops_before.0),
        loadgen_socket_drops: drops_after.1.saturating_sub(drops_before.1),
        udp_rcvbuf_errors: end
            .udp
            .rcvbuf_errors
            .saturating_sub(start.udp.rcvbuf_errors),
        udp_in_errors: end.udp.in_errors.saturating_sub(start.udp.in_errors),
        cores,
    };
    report.print();
    Ok(())
}

/// What one run measured; printed as a table and as one JSON line.
#[derive(Debug, Serialize)]
struct Report {
    bench: &'static str,
    agents: usize,
    agents_connected: usize,
    agents_gave_up: usize,
    endpoints: usize,
    enroll_secs: f64,
    connect_secs: f64,
    warmup_secs: f64,
    window_secs: f64,
    connected_agents_at_start: u64,
    connected_agents_at_end: u64,
    live_at_start: u64,
    disconnects_in_window: u64,
    first_disconnect: String,
    samples_sent_per_sec: f64,
    samples_ingested_per_sec: f64,
    samples_ingested_total: u64,
    ingest_latency_p50_ms: f64,
    ingest_latency_p99_ms: f64,
    ingest_latency_count: u64,
    controller_cpu_percent: f64,
    controller_rss_median_mb: f64,
    controller_rss_max_mb: f64,
    controller_rss_growth_mb_per_min: f64,
    controller_rss_end_mb: f64,
    controller_rss_growth_last_part_mb: f64,
    controller_rss_last_part_secs: u64,
    loadgen_cpu_percent: f64,
    loadgen_rss_median_mb: f64,
    host_cpu_busy_percent: f64,
    other_cpu_percent: f64,
    controller_socket_drops: u64,
    loadgen_socket_drops: u64,
    udp_rcvbuf_errors: u64,
    udp_in_errors: u64,
    cores: usize,
}

impl Report {
    fn print(&self) {
        let rows: Vec<(&str, String)> = vec![
            (
                "agents (connected / asked)",
                format!(
                    "{} / {} ({} gave up)",
                    self.agents_connected, self.agents, self.agents_gave_up
                ),
            ),
            ("client endpoints (UDP sockets)", self.endpoints.to_string()),
            (
                "enrollment (POST /v1/enroll)",
                format!(
                    "{:.1} s ({:.0}/s)",
                    self.enroll_secs,
                    self.agents as f64 / self.enroll_secs
                ),
            ),
            (
                "connection setup (to Welcome)",
                format!("{:.1} s", self.connect_secs),
            ),
            (
                "measurement window",
                format!(
                    "{:.1} s after {:.0} s warm-up",
                    self.window_secs, self.warmup_secs
                ),
            ),
            (
                "connected_agents start / end",
                format!(
                    "{} / {}",
                    self.connected_agents_at_start, self.connected_agents_at_end
                ),
            ),
            (
                "live at start / disconnects in window",
                format!(
                    "{} / {} (first: {})",
                    self.live_at_start, self.disconnects_in_window, self.first_disconnect
                ),
            ),
            (
                "samples sent / s",
                format!(
                    "{:.0} (target {})",
                    self.samples_sent_per_sec, self.agents_connected
                ),
            ),
            (
                "samples ingested / s",
                format!("{:.0}", self.samples_ingested_per_sec),
            ),
            (
                "ingest latency p50 / p99",
                format!(
                    "{:.1} ms / {:.1} ms (last {} samples)",
                    self.ingest_latency_p50_ms,
                    self.ingest_latency_p99_ms,
                    self.ingest_latency_count
                ),
            ),
            (
                "controller CPU",
                format!("{:.1} % of one core", self.controller_cpu_percent),
            ),
            (
                "controller RSS median / max",
                format!(
                    "{:.1} MB / {:.1} MB (growing {:.1} MB/min)",
                    self.controller_rss_median_mb,
                    self.controller_rss_max_mb,
                    self.controller_rss_growth_mb_per_min
                ),
            ),
            (
                "load generator CPU (same host)",
                format!("{:.1} % of one core", self.loadgen_cpu_percent),
            ),
            (
                "load generator RSS median",
                format!("{:.1} MB", self.loadgen_rss_median_mb),
            ),
            (
                "host CPU busy",
                format!(
                    "{:.1} % of {} cores",
                    self.host_cpu_busy_percent, self.cores
                ),
            ),
            (
                "other processes' CPU (not ours)",
                format!("{:.1} % of one core", self.other_cpu_percent),
            ),
            (
                "UDP RcvbufErrors / InErrors",
                format!("{} / {}", self.udp_rcvbuf_errors, self.udp_in_errors),
            ),
            (
                "datagrams dropped: controller / loadgen",
                format!(
                    "{} / {} (socket receive buffers full)",
                    self.controller_socket_drops, self.loadgen_socket_drops
                ),
            ),
        ];
        println!();
        println!(
            "novacron-fanin: {} agents, one sample per agent per second",
            self.agents
        );
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (key, value) in &rows {
            println!("  {key:<width$}  {value}");
        }
        match serde_json::to_string(self) {
            Ok(json) => println!("{json}"),
            Err(e) => eprintln!("cannot encode the report as JSON: {e}"),
        }
    }
}

/// Counters shared by the fake agents.
#[derive(Debug, Default)]
struct Counters {
    /// Agents that reached `Welcome` and opened their metrics stream.
    connected: AtomicUsize,
    /// Agents that gave up connecting.
    failed: AtomicUsize,
    /// Connection attempts that were retried.
    retries: AtomicU64,
    /// Metrics batches written.
    sent: AtomicU64,
    /// Connections that ended before the benchmark stopped them.
    disconnected: AtomicU64,
    /// Why the first of those connections ended.
    first_disconnect: std::sync::Mutex<Option<String>>,
    /// Why the first retried connection attempt failed.
    first_retry: std::sync::Mutex<Option<String>>,
}

impl Counters {
    /// Counts a connection that ended on its own and keeps the first reason.
    fn lost(&self, agent: &str, reason: String) {
        self.disconnected.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = self.first_disconnect.lock()
            && first.is_none()
        {
            *first = Some(format!("{agent}: {reason}"));
        }
    }

    /// Keeps the reason of the first failed connection attempt.
    fn note_retry(&self, agent: &str, error: &anyhow::Error) {
        if let Ok(mut first) = self.first_retry.lock()
            && first.is_none()
        {
            *first = Some(format!("{agent}: {error:#}"));
        }
    }

    /// Agents connected now.
    fn live(&self) -> u64 {
        (self.connected.load(Ordering::Relaxed) as u64)
            .saturating_sub(self.disconnected.load(Ordering::Relaxed))
    }

    fn first_disconnect(&self) -> String {
        self.first_disconnect
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .unwrap_or_else(|| "none".into())
    }
}

/// An enrolled fake agent's identity.
#[derive(Debug, Clone)]
struct NodeIdentity {
    name: String,
    cert_pem: String,
    key_pem: String,
    server_name: String,
}

/// One simulated agent.
#[derive(Debug)]
struct FakeAgent {
    index: usize,
    total: usize,
    node: NodeIdentity,
    ca_pem: String,
    controller: SocketAddr,
}

/// An established agent session: the streams must stay open while it lives.
struct Session {
    conn: quinn::Connection,
    _control: (quinn::SendStream, quinn::RecvStream),
    metrics: quinn::SendStream,
    next_seq: u64,
}

impl FakeAgent {
    /// Connects (with a few retries), then sends one sample per second, at this
    /// agent's offset within the second, until `stop` fires or the connection ends.
    async fn run(
        self,
        endpoint: quinn::Endpoint,
        connect_limit: Arc<Semaphore>,
        counters: Arc<Counters>,
        epoch: tokio::time::Instant,
        stop: CancellationToken,
    ) {
        let session = {
            let Ok(_permit) = connect_limit.acquire().await else {
                return;
            };
            let mut attempt = 0;
            loop {
                attempt += 1;
                let result = tokio::select! {
                    r = self.connect(&endpoint) => r,
                    _ = stop.cancelled() => return,
                };
                match result {
                    Ok(session) => break session,
                    Err(e) if attempt >= CONNECT_ATTEMPTS => {
                        eprintln!(
                            "agent {}: giving up after {attempt} attempts: {e:#}",
                            self.node.name
                        );
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(e) => {
                        counters.retries.fetch_add(1, Ordering::Relaxed);
                        counters.note_retry(&self.node.name, &e);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        };
        counters.connected.fetch_add(1, Ordering::Relaxed);
        let Session {
            conn,
            _control,
            mut metrics,
            next_seq,
        } = session;

        // Even stagger: agent i sends at i/N of every second after the epoch.
        let offset = SAMPLE_PERIOD.mul_f64(self.index as f64 / self.total as f64);
        let now = tokio::time::Instant::now();
        let periods = now.saturating_duration_since(epoch).as_secs() + 1;
        let first = epoch + SAMPLE_PERIOD * u32::try_from(periods).unwrap_or(u32::MAX) + offset;
        let mut tick = tokio::time::interval_at(first, SAMPLE_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut sample = realistic_sample(self.index);
        let mut seq = next_seq;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                reason = conn.closed() => {
                    counters.lost(&self.node.name, reason.to_string());
                    return;
                }
                _ = stop.cancelled() => break,
            }
            sample.seq = seq;
            sample.at_unix_ms = unix_ms(SystemTime::now());
            sample.uptime_secs += 1;
            sample.cpu.total_percent = 20.0 + (seq % 30) as f32;
            let batch = MetricsBatch {
                samples: vec![sample.clone()],
                dropped_total: 0,
            };
            if let Err(e) = wire::write_frame(&mut metrics, &batch).await {
                counters.lost(&self.node.name, e.to_string());
                return;
            }
            counters.sent.fetch_add(1, Ordering::Relaxed);
            seq += 1;
        }
        conn.close(wire::CloseCode::Normal.code().into(), b"benchmark over");
    }

    /// One connection attempt: handshake, `Hello`/`Welcome`, metrics stream header.
    async fn connect(&self, endpoint: &quinn::Endpoint) -> anyhow::Result<Session> {
        let config = quic_client_config(&self.ca_pem, &self.node)?;
        let connecting = endpoint.connect_with(config, self.controller, &self.node.server_name)?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .context("handshake timed out")??;
        let (mut send, mut recv) = conn.open_bi().await?;
        match wire::offer_newest(&mut send, &mut recv).await? {
            wire::Negotiated::Accept { .. } => {}
            refused => bail!("the controller refused the version offer: {refused:?}"),
        }
        wire::write_frame(&mut send, &AgentMessage::Hello(self.hello().into())).await?;
        let mut scratch = Vec::new();
        let answer = tokio::time::timeout(
            WELCOME_TIMEOUT,
            wire::read_frame::<ControllerMessage, _>(&mut recv, &mut scratch),
        )
        .await
        .context("no Welcome in time")??;
        let welcome = match answer {
            Some(ControllerMessage::Welcome(w)) => w,
            Some(other) => bail!("expected Welcome, got {other:?}"),
            None => bail!("the controller closed the control stream"),
        };
        let mut metrics = conn.open_uni().await?;
        wire::write_frame(
            &mut metrics,
            &StreamOpen {
                protocol_version: PROTOCOL_VERSION,
                kind: StreamKind::Metrics,
            },
        )
        .await?;
        Ok(Session {
            conn,
            _control: (send, recv),
            metrics,
            next_seq: welcome.next_metrics_seq,
        })
    }

    /// A Hello like a small Debian VM's agent sends.
    fn hello(&self) -> Hello {
        let labels = [
            ("zone".to_string(), format!("zone-{}", self.index % 3)),
            ("pool".to_string(), "fanin".to_string()),
            ("instance_type".to_string(), "e2-small".to_string()),
        ]
        .into_iter()
        .collect();
        Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            node_name: self.node.name.clone(),
            instance: rand::random(),
            labels,
            capacity: Capacity {
                cpu_millis: 2000,
                memory_bytes: 4 << 30,
                disk_bytes: 40_000_000_000,
                dynamic_ports: Default::default(),
                gpus: vec![],
            },
            capabilities: Capabilities {
                docker_version: Some("20.10.24+dfsg1".into()),
                live_checkpoint: false,
                gpu_driver: None,
                os: "Debian GNU/Linux 12 (bookworm) 6.1.0".into(),
                arch: "x86_64".into(),
                live_checkpoint_reason: None,
                vm: None,
                oci: None,
            },
        }
    }
}

/// A sample with 2 cores, 2 filesystems and 2 interfaces, varied per agent.
fn realistic_sample(index: usize) -> NodeSample {
    let jitter = (index % 97) as u64;
    NodeSample {
        seq: 0,
        at_unix_ms: 0,
        cpu: CpuSample {
            total_percent: 23.5,
            per_core_percent: vec![21.0, 26.0],
            load: [0.42, 0.37, 0.30],
            seconds_total: None,
        },
        memory: MemorySample {
            total_bytes: 4 << 30,
            used_bytes: (1 << 30) + jitter * 1_048_576,
            available_bytes: (3 << 30) - jitter * 1_048_576,
            swap_total_bytes: 0,
            swap_used_bytes: 0,
        },
        disks: vec![
            DiskSample {
                mount: "/".into(),
                device: "/dev/vda1".into(),
                total_bytes: 40_000_000_000,
                available_bytes: 31_000_000_000 - jitter * 10_000_000,
                read_bytes_per_sec: 4096 * jitter,
                written_bytes_per_sec: 65_536,
                used_bytes: 7_000_000_000 + jitter * 10_000_000,
                ..DiskSample::default()
            },
            DiskSample {
                mount: "/var/lib/docker".into(),
                device: "/dev/vdb".into(),
                total_bytes: 100_000_000_000,
                available_bytes: 80_000_000_000,
                read_bytes_per_sec: 0,
                written_bytes_per_sec: 12_288,
                used_bytes: 15_000_000_000,
                ..DiskSample::default()
            },
        ],
        networks: vec![
            NetworkSample {
                interface: "eth0".into(),
                rx_bytes_per_sec: 15_000 + jitter,
                tx_bytes_per_sec: 9_000 + jitter,
                ..NetworkSample::default()
            },
            NetworkSample {
                interface: "docker0".into(),
                rx_bytes_per_sec: 1_200,
                tx_bytes_per_sec: 800,
                ..NetworkSample::default()
            },
        ],
        gpus: vec![],
        uptime_secs: 86_400 + jitter,
        allocations: Vec::new(),
    }
}

/// A client endpoint on a loopback UDP socket with `buffer` bytes of socket buffers.
fn client_endpoint(buffer: usize) -> anyhow::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .context("cannot open a UDP socket for the load generator")?;
    socket.set_recv_buffer_size(buffer)?;
    socket.set_send_buffer_size(buffer)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )?)
}

/// The QUIC client configuration of one fake agent, with the controller's default
/// keep-alive and idle timeout (as the real agent sets them).
fn quic_client_config(ca_pem: &str, node: &NodeIdentity) -> anyhow::Result<quinn::ClientConfig> {
    let rustls = tls::client_config(ca_pem, Some((&node.cert_pem, &node.key_pem)), &[wire::ALPN])?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(rustls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let liveness = Liveness::default();
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(liveness.keep_alive));
    transport.max_idle_timeout(Some(quinn::IdleTimeout::try_from(liveness.idle_timeout)?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Creates join tokens (10,000 uses each) and enrolls every fake agent with a fresh
/// key, `--enroll-concurrency` requests at a time.
async fn enroll_all(
    admin: &reqwest::Client,
    anonymous: &reqwest::Client,
    api_url: &str,
    args: &Args,
) -> anyhow::Result<Vec<NodeIdentity>> {
    let mut tokens = Vec::new();
    for chunk_start in (0..args.agents).step_by(TOKEN_MAX_USES) {
        let uses = (args.agents - chunk_start).min(TOKEN_MAX_USES);
        let req = TokenRequest {
            ttl_secs: 3600,
            uses: u32::try_from(uses)?,
            description: "novacron-fanin".into(),
        };
        let resp: TokenResponse = post_json(admin, &format!("{api_url}/v1/tokens"), &req).await?;
        tokens.push(resp.token);
    }
    let tokens = Arc::new(tokens);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..args.enroll_concurrency.min(args.agents) {
        let (client, tokens, next, done) = (
            anonymous.clone(),
            tokens.clone(),
            next.clone(),
            done.clone(),
        );
        let url = format!("{api_url}/v1/enroll");
        let total = args.agents;
        workers.spawn(async move {
            let mut mine = Vec::new();
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= total {
                    return anyhow::Ok(mine);
                }
                let name = format!("fanin-{index:05}");
                let (csr_pem, key_pem) = pki::generate_csr(&name)?;
                let req = EnrollRequest {
                    token: tokens[index / TOKEN_MAX_USES].clone(),
                    node_name: name.clone(),
                    csr_pem,
                };
                let resp: EnrollResponse = post_json(&client, &url, &req)
                    .await
                    .with_context(|| format!("enrolling {name}"))?;
                mine.push((
                    index,
                    NodeIdentity {
                        name: resp.node_name,
                        cert_pem: resp.cert_pem,
                        key_pem,
                        server_name: resp.server_name,
                    },
                ));
                let finished = done.fetch_add(1, Ordering::Relaxed) + 1;
                if finished % 1000 == 0 {
                    println!("enrolled {finished} / {total}");
                }
            }
        });
    }
    let mut all = Vec::with_capacity(args.agents);
    while let Some(joined) = workers.join_next().await {
        all.extend(joined.context("an enrollment worker panicked")??);
    }
    all.sort_by_key(|(index, _)| *index);
    Ok(all.into_iter().map(|(_, node)| node).collect())
}

/// An HTTPS client that trusts the fleet CA and presents `client` when given.
fn https_client(ca_pem: &str, client: Option<(&str, &str)>) -> anyhow::Result<reqwest::Client> {
    let config = tls::client_config(ca_pem, client, &[b"h2", b"http/1.1"])?;
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// An HTTPS client with the data directory's admin certificate.
fn admin_client(ca_pem: &str, pki_dir: &Path) -> anyhow::Result<reqwest::Client> {
    let cert = read(&pki_dir.join("admin.pem"))?;
    let key = read(&pki_dir.join("admin-key.pem"))?;
    https_client(ca_pem, Some((&cert, &key)))
}

async fn post_json<B: Serialize, T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
    body: &B,
) -> anyhow::Result<T> {
    let resp = client.post(url).json(body).send().await?;
    let status = resp.status();
    if !status.is_success() {
        bail!(
            "POST {url}: {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    Ok(resp.json().await?)
}

async fn post_empty(client: &reqwest::Client, url: &str) -> anyhow::Result<()> {
    let resp = client.post(url).send().await?;
    let status = resp.status();
    if !status.is_success() {
        bail!(
            "POST {url}: {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

async fn get_json<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: &str,
) -> anyhow::Result<T> {
    let resp = client.get(url).send().await?;
    let status = resp.status();
    if !status.is_success() {
        bail!(
            "GET {url}: {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    Ok(resp.json().await?)
}

/// A running release controller; stopped (SIGTERM, then SIGKILL) when dropped.
#[derive(Debug)]
struct ControllerProcess {
    child: Child,
    api_url: String,
    quic_addr: SocketAddr,
    log: PathBuf,
}

impl ControllerProcess {
    /// Starts `serve` on loopback with kernel-chosen ports and waits for its ready line.
    fn start(bin: &Path, data_dir: &Path) -> anyhow::Result<ControllerProcess> {
        let log = data_dir.join("fanin-controller.log");
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(bin)
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "serve",
                "--api-listen",
                "127.0.0.1:0",
                "--quic-listen",
                "127.0.0.1:0",
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut process = ControllerProcess {
            child,
            api_url: String::new(),
            quic_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        let deadline = Instant::now() + CONTROLLER_START_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&process.log).unwrap_or_default();
            if let Some((api, quic)) = parse_ready_line(&text) {
                process.api_url = api;
                process.quic_addr = quic;
                return Ok(process);
            }
            if let Some(status) = process.child.try_wait()? {
                bail!("the controller exited with {status} before it was ready:\n{text}");
            }
            if Instant::now() >= deadline {
                bail!(
                    "the controller printed no ready line within {CONTROLLER_START_TIMEOUT:?}:\n{text}"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        stop_child(&mut self.child);
    }
}

/// Asks a child to stop with SIGTERM, waits up to 5 s, then kills it.
fn stop_child(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Finds `controller ready: api https://H:P, agent link udp H:P` in the log.
fn parse_ready_line(text: &str) -> Option<(String, SocketAddr)> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("controller ready: api "))?;
    let (api, quic) = line.split_once(", agent link udp ")?;
    Some((api.trim().to_string(), quic.trim().parse().ok()?))
}

/// Runs `init` when the data directory holds no CA yet.
fn ensure_initialized(bin: &Path, data_dir: &Path) -> anyhow::Result<()> {
    if data_dir.join("pki").join("ca.pem").exists() {
        return Ok(());
    }
    let out = Command::new(bin)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("init")
        .output()
        .with_context(|| format!("running {} init", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} init failed ({}): {}",
            bin.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// CPU counters taken at one instant.
#[derive(Debug)]
struct Probe {
    at: Instant,
    controller_ticks: u64,
    own_ticks: u64,
    host: HostCpu,
    udp: UdpErrors,
}

impl Probe {
    fn take(pid: u32) -> anyhow::Result<Probe> {
        Ok(Probe {
            at: Instant::now(),
            controller_ticks: cpu_ticks(&format!("/proc/{pid}/stat"))?,
            own_ticks: cpu_ticks("/proc/self/stat")?,
            host: HostCpu::read()?,
            udp: UdpErrors::read()?,
        })
    }
}

/// Whole-host CPU time from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy)]
struct HostCpu {
    busy: u64,
    total: u64,
}

impl HostCpu {
    fn read() -> anyhow::Result<HostCpu> {
        let text = read(Path::new("/proc/stat"))?;
        let line = text.lines().next().context("empty /proc/stat")?;
        let values: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        let total: u64 = values.iter().take(8).sum();
        // idle and iowait are fields 4 and 5.
        let idle = values.get(3).copied().unwrap_or(0) + values.get(4).copied().unwrap_or(0);
        Ok(HostCpu {
            busy: total - idle,
            total,
        })
    }

    /// Busy share of all cores since `earlier`, as a percentage of one core times cores.
    fn busy_percent_since(&self, earlier: &HostCpu) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        100.0 * self.busy.saturating_sub(earlier.busy) as f64 / total as f64
    }
}

/// UDP error counters from `/proc/net/snmp`.
#[derive(Debug, Clone, Copy)]
struct UdpErrors {
    in_errors: u64,
    rcvbuf_errors: u64,
}

impl UdpErrors {
    fn read() -> anyhow::Result<UdpErrors> {
        let text = read(Path::new("/proc/net/snmp"))?;
        let mut udp = text.lines().filter(|l| l.starts_with("Udp:"));
        let (Some(header), Some(values)) = (udp.next(), udp.next()) else {
            bail!("no Udp lines in /proc/net/snmp");
        };
        let find = |name: &str| -> u64 {
            header
                .split_whitespace()
                .position(|h| h == name)
                .and_then(|i| values.split_whitespace().nth(i))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Ok(UdpErrors {
            in_errors: find("InErrors"),
            rcvbuf_errors: find("RcvbufErrors"),
        })
    }
}

/// Datagrams dropped by the loopback UDP sockets bound to `ports` (the `drops`
/// column of `/proc/net/udp`, cumulative since each socket was opened).
fn socket_drops(ports: &[u16]) -> anyhow::Result<u64> {
    let text = read(Path::new("/proc/net/udp"))?;
    let mut total = 0;
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port = fields
            .get(1)
            .and_then(|local| local.split_once(':'))
            .and_then(|(_, port)| u16::from_str_radix(port, 16).ok());
        if port.is_some_and(|p| ports.contains(&p)) {
            total += fields
                .last()
                .and_then(|d| d.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

fn cpu_percent(ticks: u64, clk_tck: u64, wall_secs: f64) -> f64 {
    100.0 * ticks as f64 / clk_tck as f64 / wall_secs
}

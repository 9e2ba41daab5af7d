//! The agent's end of the link: one QUIC connection with mutual TLS to the
//! controller, re-established with exponential backoff and jitter, carrying the
//! control stream, the metrics stream and the exec streams the controller opens
//! (served by [`crate::exec`]); and the sampling loop that fills the bounded buffer
//! whether or not the link is up.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use novacron_common::backoff::Backoff;
use novacron_common::clock::unix_ms;
use novacron_common::fleet::Liveness;
use novacron_common::pki;
use novacron_common::retry::{Retry, sleep_unless};
use novacron_common::sync::lock;
use novacron_common::ticker::Ticker;
use novacron_common::tls;
use novacron_common::wire::{
    self, AgentMessage, Capabilities, Capacity, CloseCode, ControllerMessage,
    FIRST_NEGOTIATED_VERSION, FrameError, Hello, LogRequest, Negotiated, Opening, PROTOCOL_VERSION,
    StreamKind, StreamOpen, VersionRange,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::buffer::SampleBuffer;
use crate::collect::Sampler;
use crate::enroll::{Credentials, EnrollError, Enrollment, StateDir, error_chain};
use crate::exec::{self, ExecService, HostExecPolicy};
use crate::migrate::CheckpointService;
use crate::runtime::{HostRuntime, Supervisor};
use crate::spot::{SpotNotice, SpotWatcher};

/// How long connecting (QUIC and TLS handshakes) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// An established link lost after this long starts the backoff afresh.
pub const SESSION_LASTED: Duration = Duration::from_secs(1);
/// With several controller addresses, how often each is dialed again while none
/// has answered (a new leader starts listening during the failover).
pub const REDIAL: Duration = Duration::from_millis(500);
/// How long the controller has to answer `Hello`.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// The most samples sent in one batch.
pub const BATCH_SAMPLES: usize = 60;
/// A full allocation report is sent at least this often.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);

/// Settings of a running agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The state directory (identity, enrollment).
    pub state: StateDir,
    /// Node labels sent in `Hello`.
    pub labels: BTreeMap<String, String>,
    /// Sampling interval.
    pub interval: Duration,
    /// Samples kept while disconnected.
    pub buffer_capacity: usize,
    /// Reconnect backoff.
    pub backoff: Backoff,
    /// Keep-alive and idle timeout (must match the controller's).
    pub liveness: Liveness,
    /// Docker endpoint (`unix:///var/run/docker.sock` style); `None` for the default.
    pub docker_host: Option<String>,
    /// Overrides the QUIC endpoint recorded at enrollment.
    pub controller: Option<String>,
    /// Which host commands remote exec may run (none by default).
    pub host_exec: HostExecPolicy,
    /// Checkpoints, restores and bundle transfers (absent: the node answers no
    /// checkpoint stream).
    pub checkpoints: Option<Arc<CheckpointService>>,
    /// Spot interruption notices to forward to the controller.
    pub spot: Option<SpotWatcher>,
    /// The wire protocol versions offered ([`wire::SUPPORTED`]; tests narrow it to
    /// act as an older agent).
    pub wire_versions: VersionRange,
    /// The ingress, which serves the table the controller sends; `None`: off.
    pub ingress: Option<Arc<crate::ingress::Ingress>>,
    /// The DNS server, which answers from the same table; `None`: off.
    pub dns: Option<Arc<crate::dns::AgentDns>>,
    /// The loopback registry, which relays reads of the controller's image store
    /// over the link; `None`: off.
    pub registry: Option<Arc<crate::registry::LocalRegistry>>,
}

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The state directory is unusable.
    #[error(transparent)]
    Enroll(#[from] EnrollError),
    /// The QUIC endpoint could not be created.
    #[error("cannot open a UDP socket for the agent link: {0}")]
    Socket(std::io::Error),
}

/// Why one connection attempt or session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Credentials(#[from] EnrollError),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, String),
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("the controller refused this node ({code:?}): {message}")]
    Refused { code: CloseCode, message: String },
    #[error("no wire protocol version in common with the controller: {0}")]
    Incompatible(String),
    #[error(
        "the controller does not negotiate versions (it closed the connection on the version offer: {0}); speaking version 2 to it"
    )]
    NoNegotiation(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("connection lost: {0}")]
    Lost(String),
}

impl From<FrameError> for SessionError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(e) => SessionError::Lost(e.to_string()),
            other => SessionError::Protocol(other.to_string()),
        }
    }
}

/// Shared between the sampling loop and the link.
#[derive(Debug)]
struct Shared {
    buffer: Mutex<SampleBuffer>,
    fresh: Notify,
    exec: Arc<ExecService<HostRuntime>>,
    checkpoints: Option<Arc<CheckpointService>>,
    spot: watch::Receiver<Option<SpotNotice>>,
    ingress: Option<Arc<crate::ingress::Ingress>>,
    dns: Option<Arc<crate::dns::AgentDns>>,
    /// The node's images, read every [`IMAGE_INVENTORY_EVERY`].
    images: watch::Receiver<Option<wire::ImageInventory>>,
}

/// How often the agent reads the node's images for the controller.
pub const IMAGE_INVENTORY_EVERY: Duration = Duration::from_secs(10);

/// Runs the agent until `cancel` fires: sampling plus the link.
pub async fn run(
    config: AgentConfig,
    sampler: Sampler,
    capacity: Capacity,
    mut capabilities: watch::Receiver<Capabilities>,
    supervisor: Supervisor<HostRuntime>,
    cancel: CancellationToken,
) -> Result<(), AgentError> {
    tls::install_crypto_provider();
    let enrollment = config.state.load_enrollment()?;
    // Fail early, before any socket, if the identity files are missing.
    config.state.load_credentials()?;
    let mut exec = ExecService::new(
        enrollment.node_name.clone(),
        config.host_exec.clone(),
        supervisor.clone(),
    );
    if let Some(c) = &config.checkpoints {
        exec = exec.with_checkpoints(c.clone());
    }
    let (spot_tx, spot) = watch::channel(None);
    if let Some(watcher) = config.spot.clone() {
        watcher.spawn(spot_tx, cancel.clone());
    }
    let (images_tx, images) = watch::channel(None);
    {
        let supervisor = supervisor.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            crate::runtime::watch_images(
                supervisor.runtime(),
                IMAGE_INVENTORY_EVERY,
                images_tx,
                cancel,
            )
            .await
        });
    }
    let shared = Arc::new(Shared {
        buffer: Mutex::new(SampleBuffer::new(config.buffer_capacity)),
        fresh: Notify::new(),
        exec: Arc::new(exec),
        checkpoints: config.checkpoints.clone(),
        spot,
        ingress: config.ingress.clone(),
        dns: config.dns.clone(),
        images,
    });
    let containers = supervisor.spawn(cancel.clone());
    let sampling = tokio::spawn(sample_loop(
        sampler,
        supervisor.clone(),
        config.interval,
        shared.clone(),
        cancel.clone(),
    ));
    let endpoint =
        quinn::Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0))).map_err(AgentError::Socket)?;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        node_name: enrollment.node_name.clone(),
        instance: rand::random(),
        labels: config.labels.clone(),
        capacity,
        capabilities: capabilities.borrow_and_update().clone(),
    };
    // Sampling runs and the link is being established: ready for systemd (Type=notify).
    if let Err(error) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        warn!(%error, "cannot notify systemd of readiness");
    }
    let mut retry = Retry::new(config.backoff);
    // Set when the controller closed the connection on the version offer (a
    // release that predates negotiation): the next connection sends a version-2
    // Hello at once. Cleared when a session ends, since the controller may come
    // back upgraded.
    let mut legacy = false;
    let mut hello = hello;
    while !cancel.is_cancelled() {
        let started = Instant::now();
        hello.capabilities = capabilities.borrow_and_update().clone();
        // Capabilities are part of the Hello: when they change (the first
        // VM's probe chose the accelerator), the session ends and the next
        // one reports them, once no live migration's stream is open here (an
        // incoming VM's boot is often what probes).
        let changed = async {
            capabilities.changed().await.ok()?;
            while crate::migrate::moves_in_flight() {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Some(())
        };
        let outcome = tokio::select! {
            r = session(
                &config,
                &enrollment,
                &endpoint,
                &hello,
                &shared,
                &supervisor,
                &cancel,
                legacy,
            ) => Some(r),
            Some(()) = changed => None,
        };
        let Some(outcome) = outcome else {
            info!(node = %enrollment.node_name, "the node's capabilities changed; reconnecting to report them");
            continue;
        };
        match outcome {
            Ok(()) => break,
            Err(SessionError::NoNegotiation(reason)) if !legacy => {
                warn!(node = %enrollment.node_name, %reason, "the controller predates version negotiation; reconnecting with protocol version 2");
                legacy = true;
                continue;
            }
            Err(e) => {
                if matches!(e, SessionError::Lost(_)) {
                    legacy = false;
                }
                match &e {
                    SessionError::Incompatible(_)
                    | SessionError::Refused {
                        code: CloseCode::VersionMismatch,
                        ..
                    } => {
                        error!(node = %enrollment.node_name, error = %e, "version mismatch: this agent cannot talk to the controller until one of them is upgraded; retrying with backoff");
                    }
                    SessionError::Refused {
                        code: CloseCode::Revoked,
                        ..
                    } => {
                        error!(node = %enrollment.node_name, error = %e, "this node is revoked; an admin must enroll it again");
                    }
                    SessionError::Lost(_) => {
                        info!(node = %enrollment.node_name, error = %e, "link down");
                    }
                    _ => {
                        let attempt = retry.attempts();
                        warn!(node = %enrollment.node_name, attempt, error = %e, "cannot connect");
                    }
                }
                // A session that lasted is a fresh start for the backoff: one
                // that lasted its backoff ceiling, or an established link lost
                // after a second (a controller that failed over; a controller
                // that closes at once still backs off).
                let established = matches!(e, SessionError::Lost(_));
                if started.elapsed() > config.backoff.max
                    || (established && started.elapsed() > SESSION_LASTED)
                {
                    retry.reset();
                }
            }
        }
        let delay = retry.next_delay();
        debug!(
            delay_ms = delay.as_millis() as u64,
            attempt = retry.attempts(),
            "reconnecting after backoff"
        );
        if !sleep_unless(delay, cancel.cancelled()).await {
            break;
        }
    }
    endpoint.close(CloseCode::Normal.code().into(), b"agent stopping");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    sampling.abort();
    // The supervisor stops on `cancel`; containers keep running for the next start
    // to adopt.
    let _ = tokio::time::timeout(Duration::from_secs(5), containers).await;
    Ok(())
}

async fn sample_loop(
    mut sampler: Sampler,
    supervisor: Supervisor<HostRuntime>,
    interval: Duration,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let mut ticker = Ticker::new(interval, MissedTickBehavior::Delay, cancel.cancelled());
    while ticker.tick().await {
        let mut sample = sampler.sample(Instant::now());
        sample.at_unix_ms = unix_ms(SystemTime::now());
        sample.allocations = supervisor.usage().await;
        let dropped_before;
        let dropped_after;
        {
            let mut buf = lock(&shared.buffer);
            dropped_before = buf.dropped();
            buf.push(sample);
            dropped_after = buf.dropped();
        }
        if dropped_after > dropped_before && dropped_after.is_power_of_two() {
            warn!(
                dropped = dropped_after,
                "offline buffer full: dropping the oldest samples"
            );
        }
        shared.fresh.notify_one();
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    config: &AgentConfig,
    enrollment: &Enrollment,
    endpoint: &quinn::Endpoint,
    hello: &Hello,
    shared: &Shared,
    supervisor: &Supervisor<HostRuntime>,
    cancel: &CancellationToken,
    legacy: bool,
) -> Result<(), SessionError> {
    let creds = config.state.load_credentials()?;
    let client_config = quic_client_config(&creds, &config.liveness)?;
    let target = config
        .controller
        .clone()
        .unwrap_or_else(|| enrollment.quic_endpoint.clone());
    let conn = connect_any(endpoint, &client_config, &target, &enrollment.server_name).await?;
    let result = serve(
        &conn, config, hello, &creds, shared, supervisor, cancel, legacy,
    )
    .await;
    match &result {
        Ok(()) => conn.close(CloseCode::Normal.code().into(), b"agent stopping"),
        Err(SessionError::Protocol(reason)) => {
            conn.close(CloseCode::Unexpected.code().into(), reason.as_bytes());
        }
        Err(_) => {}
    }
    result
}

/// Connects to the first controller that completes a handshake. `targets` is one
/// `host:port` or several, comma-separated (the controllers of a highly
/// available group; a name may also resolve to several addresses): every
/// address is tried at once, since only the leading controller listens, and the
/// first connection wins. When none answers, the error of the first address.
async fn connect_any(
    endpoint: &quinn::Endpoint,
    client_config: &quinn::ClientConfig,
    targets: &str,
    server_name: &str,
) -> Result<quinn::Connection, SessionError> {
    let mut addrs: Vec<SocketAddr> = Vec::new();
    let mut resolve_error = None;
    for target in targets.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        match tokio::net::lookup_host(target).await {
            // The endpoint's socket is IPv4: only IPv4 addresses can be reached.
            Ok(found) => addrs.extend(found.filter(SocketAddr::is_ipv4)),
            Err(e) => {
                resolve_error = Some(SessionError::Resolve(target.to_string(), e.to_string()))
            }
        }
    }
    addrs.dedup();
    if addrs.is_empty() {
        return Err(resolve_error.unwrap_or_else(|| {
            SessionError::Resolve(targets.to_string(), "no IPv4 address".into())
        }));
    }
    // A controller that starts listening after an attempt began only answers
    // that attempt's retransmission (seconds later): with several controllers,
    // dial them all again every REDIAL until one answers or the time is up.
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let several = addrs.len() > 1;
    let dial = |i: usize, addr: SocketAddr| {
        let connecting = endpoint.connect_with(client_config.clone(), addr, server_name);
        async move {
            let result = match connecting {
                Err(e) => Err(SessionError::Connect {
                    addr,
                    reason: e.to_string(),
                }),
                Ok(connecting) => match tokio::time::timeout_at(deadline, connecting).await {
                    Ok(Ok(conn)) => Ok(conn),
                    Ok(Err(e)) => Err(match close_reason(&e) {
                        refused @ SessionError::Refused { .. } => refused,
                        _ => SessionError::Connect {
                            addr,
                            reason: error_chain(&e),
                        },
                    }),
                    Err(_) => Err(SessionError::Connect {
                        addr,
                        reason: "timed out".into(),
                    }),
                },
            };
            (i, result)
        }
    };
    let mut attempts = futures_util::stream::FuturesUnordered::new();
    for (i, addr) in addrs.iter().copied().enumerate() {
        attempts.push(dial(i, addr));
    }
    let mut redial = tokio::time::interval_at(tokio::time::Instant::now() + REDIAL, REDIAL);
    let mut first_error: Option<(usize, SessionError)> = None;
    loop {
        let redialing = several && tokio::time::Instant::now() < deadline;
        if attempts.is_empty() && !redialing {
            break;
        }
        tokio::select! {
            Some((i, result)) = futures_util::StreamExt::next(&mut attempts) => match result {
                Ok(conn) => return Ok(conn),
                // A refusal (revoked, version) is the controller's answer: report it.
                Err(e @ SessionError::Refused { .. }) => return Err(e),
                Err(e) => {
                    if first_error.as_ref().is_none_or(|(j, _)| i < *j) {
                        first_error = Some((i, e));
                    }
                }
            },
            _ = redial.tick(), if redialing => {
                for (i, addr) in addrs.iter().copied().enumerate() {
                    attempts.push(dial(i, addr));
                }
            }
        }
    }
    Err(first_error
        .map(|(_, e)| e)
        .unwrap_or_else(|| SessionError::Resolve(targets.to_string(), "no address".into())))
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    conn: &quinn::Connection,
    config: &AgentConfig,
    hello: &Hello,
    creds: &Credentials,
    shared: &Shared,
    supervisor: &Supervisor<HostRuntime>,
    cancel: &CancellationToken,
    legacy: bool,
) -> Result<(), SessionError> {
    let lost = |e: quinn::ConnectionError| close_reason(&e);
    // Writes fail when the connection closes: report the connection's reason.
    let result = serve_inner(
        conn, config, hello, creds, shared, supervisor, cancel, legacy, lost,
    )
    .await;
    match result {
        Err(SessionError::Lost(_)) => match conn.close_reason() {
            Some(reason) => Err(close_reason(&reason)),
            None => result,
        },
        other => other,
    }
}

#[allow(clippy::too_many_arguments)]
async fn serve_inner(
    conn: &quinn::Connection,
    config: &AgentConfig,
    hello: &Hello,
    creds: &Credentials,
    shared: &Shared,
    supervisor: &Supervisor<HostRuntime>,
    cancel: &CancellationToken,
    legacy: bool,
    lost: impl Fn(quinn::ConnectionError) -> SessionError,
) -> Result<(), SessionError> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(&lost)?;
    let version = negotiate(conn, &mut send, &mut recv, config.wire_versions, legacy).await?;
    let hello = Hello {
        protocol_version: version,
        ..hello.clone()
    };
    wire::write_frame_as(
        version,
        &mut send,
        &AgentMessage::Hello(Box::new(hello.clone())),
    )
    .await?;
    // Control messages are read by their own task: frame reads are not cancel-safe.
    let (tx, mut control) = mpsc::channel::<Result<ControllerMessage, FrameError>>(8);
    let reader = tokio::spawn(read_control(recv, tx, version));
    let _reader_guard = AbortOnDrop(reader);

    let welcome = match tokio::time::timeout(WELCOME_TIMEOUT, control.recv()).await {
        Ok(Some(Ok(ControllerMessage::Welcome(w)))) => w,
        Ok(Some(Ok(ControllerMessage::Refused(r)))) => {
            return Err(SessionError::Refused {
                code: r.code,
                message: r.message,
            });
        }
        Ok(Some(Ok(other))) => {
            return Err(SessionError::Protocol(format!(
                "expected Welcome, got {other:?}"
            )));
        }
        Ok(Some(Err(FrameError::Io(_)))) | Ok(None) => {
            return Err(close_reason(&conn.closed().await));
        }
        Ok(Some(Err(e))) => return Err(e.into()),
        Err(_) => return Err(SessionError::Protocol("no Welcome within 10 s".into())),
    };
    if welcome.node_name != hello.node_name {
        return Err(SessionError::Protocol(format!(
            "the controller calls this node {:?}, but it enrolled as {:?}",
            welcome.node_name, hello.node_name
        )));
    }
    info!(node = %welcome.node_name, resume_from = welcome.next_metrics_seq, protocol_version = version, "connected to the controller");
    // Remote exec: the controller opens one bi-stream per command.
    let _execs = AbortOnDrop(tokio::spawn(shared.exec.clone().accept(conn.clone())));
    let _published = shared.checkpoints.as_ref().map(|c| {
        c.set_connection(Some((conn.clone(), version)));
        Unpublish(c.clone())
    });
    let _registry = config.registry.as_ref().map(|r| {
        r.set_connection(Some((conn.clone(), version)));
        Unrelay(r.clone())
    });
    let mut spot = shared.spot.clone();
    if let Some(notice) = spot.borrow_and_update().clone() {
        wire::write_frame_as(version, &mut send, &spot_message(&notice)).await?;
    }
    // The image inventory, since protocol 3: the current one now, then changes.
    let mut images = shared.images.clone();
    let inventory = images.borrow_and_update().clone();
    if version >= 3
        && let Some(inventory) = inventory
    {
        wire::write_frame_as(version, &mut send, &AgentMessage::Images(inventory)).await?;
    }
    lock(&shared.buffer).resume_from(welcome.next_metrics_seq);

    let mut metrics = conn.open_uni().await.map_err(&lost)?;
    wire::write_frame_as(
        version,
        &mut metrics,
        &StreamOpen {
            protocol_version: version,
            kind: StreamKind::Metrics,
        },
    )
    .await?;

    let mut renewal = Renewal::new(&creds.cert_pem);
    let mut reports = supervisor.subscribe();
    let initial = reports.borrow_and_update().clone();
    wire::write_frame_as(version, &mut send, &AgentMessage::Allocations(initial)).await?;
    let mut heartbeat = tokio::time::interval(REPORT_EVERY);
    heartbeat.tick().await;
    loop {
        // Send everything pending before waiting.
        loop {
            let batch = lock(&shared.buffer).next_batch(BATCH_SAMPLES);
            let Some(batch) = batch else { break };
            wire::write_frame_as(version, &mut metrics, &batch).await?;
        }
        tokio::select! {
            _ = shared.fresh.notified() => {}
            msg = control.recv() => match msg {
                Some(Ok(ControllerMessage::Certificate { request_id, result })) => {
                    renewal.answered(&config.state, request_id, result);
                }
                Some(Ok(ControllerMessage::Desired(desired))) => {
                    debug!(generation = desired.generation, allocations = desired.allocations.len(), "desired allocations");
                    supervisor.apply(desired);
                }
                Some(Ok(ControllerMessage::Logs(request))) => {
                    tokio::spawn(send_logs(conn.clone(), supervisor.clone(), request, version));
                }
                Some(Ok(ControllerMessage::Ingress(table))) => {
                    debug!(revision = table.revision, services = table.services.len(), others = table.others.len(), "ingress table");
                    if let Some(dns) = &shared.dns {
                        dns.apply(&table);
                    }
                    match &shared.ingress {
                        Some(ingress) => ingress.apply(table),
                        None if !table.services.is_empty() => {
                            debug!("the ingress is off on this node (ingress_address = \"off\")");
                        }
                        None => {}
                    }
                }
                Some(Ok(other)) => {
                    return Err(SessionError::Protocol(format!("unexpected control message {other:?}")));
                }
                // A stream error usually means the connection closed: report why.
                Some(Err(FrameError::Io(_))) | None => return Err(close_reason(&conn.closed().await)),
                Some(Err(e)) => return Err(e.into()),
            },
            _ = tokio::time::sleep_until(renewal.due.into()), if renewal.pending.is_none() => {
                if let Some(request) = renewal.request(&hello.node_name) {
                    wire::write_frame_as(version, &mut send, &request).await?;
                }
            }
            changed = reports.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let report = reports.borrow_and_update().clone();
                wire::write_frame_as(version, &mut send, &AgentMessage::Allocations(report)).await?;
            }
            _ = heartbeat.tick() => {
                let report = reports.borrow().clone();
                wire::write_frame_as(version, &mut send, &AgentMessage::Allocations(report)).await?;
            }
            Ok(()) = images.changed(), if version >= 3 => {
                let inventory = images.borrow_and_update().clone();
                if let Some(inventory) = inventory {
                    wire::write_frame_as(version, &mut send, &AgentMessage::Images(inventory)).await?;
                }
            }
            Ok(()) = spot.changed() => {
                let notice = spot.borrow_and_update().clone();
                if let Some(notice) = notice {
                    warn!(action = %notice.action, deadline_unix_ms = notice.deadline_unix_ms, "spot interruption notice; telling the controller");
                    wire::write_frame_as(version, &mut send, &spot_message(&notice)).await?;
                }
            }
            e = conn.closed() => return Err(close_reason(&e)),
            _ = cancel.cancelled() => return Ok(()),
        }
    }
}

/// Agrees on the protocol version of the connection: offers `offered` and reads the
/// controller's choice, or (`legacy`, or an agent that offers only version 2)
/// speaks version 2 at once, as agents before negotiation did.
async fn negotiate(
    conn: &quinn::Connection,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    offered: VersionRange,
    legacy: bool,
) -> Result<u16, SessionError> {
    if offered.max < FIRST_NEGOTIATED_VERSION || (legacy && offered.contains(2)) {
        return Ok(2);
    }
    let offer = Opening::Offer {
        max: offered.max,
        min: offered.min,
    };
    wire::write_frame(send, &offer).await?;
    let mut scratch = Vec::new();
    let answer = tokio::time::timeout(
        WELCOME_TIMEOUT,
        wire::read_frame::<Negotiated, _>(recv, &mut scratch),
    )
    .await;
    match answer {
        Ok(Ok(Some(Negotiated::Accept { version }))) if offered.contains(version) => Ok(version),
        Ok(Ok(Some(Negotiated::Accept { version }))) => Err(SessionError::Protocol(format!(
            "the controller chose protocol version {version}, which this agent did not offer ({offered})"
        ))),
        Ok(Ok(Some(Negotiated::Reject { min, max, message }))) => {
            let theirs = VersionRange { min, max };
            Err(SessionError::Incompatible(
                match offered.negotiate(theirs, "agent", "controller") {
                    Err(mismatch) => mismatch.to_string(),
                    Ok(_) => message,
                },
            ))
        }
        Ok(Err(FrameError::Io(_))) | Ok(Ok(None)) => {
            // A controller from before negotiation cannot decode the offer and
            // closes with `Malformed`.
            match close_reason(&conn.closed().await) {
                SessionError::Refused {
                    code: CloseCode::Malformed,
                    message,
                } if offered.contains(2) => Err(SessionError::NoNegotiation(message)),
                SessionError::Refused {
                    code: CloseCode::Malformed,
                    ..
                } => {
                    let theirs = VersionRange { min: 2, max: 2 };
                    Err(SessionError::Incompatible(
                        match offered.negotiate(theirs, "agent", "controller") {
                            Err(mismatch) => format!(
                                "{mismatch} (the controller closed the connection on the version offer, as releases before negotiation do)"
                            ),
                            Ok(_) => {
                                "the controller closed the connection on the version offer".into()
                            }
                        },
                    ))
                }
                other => Err(other),
            }
        }
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(SessionError::Protocol(
            "no answer to the version offer within 10 s".into(),
        )),
    }
}

fn spot_message(notice: &SpotNotice) -> AgentMessage {
    AgentMessage::SpotNotice {
        action: notice.action.clone(),
        deadline_unix_ms: notice.deadline_unix_ms,
    }
}

/// Forgets the session's connection when the session ends.
struct Unrelay(Arc<crate::registry::LocalRegistry>);

impl Drop for Unrelay {
    fn drop(&mut self) {
        self.0.set_connection(None);
    }
}

struct Unpublish(Arc<CheckpointService>);

impl Drop for Unpublish {
    fn drop(&mut self) {
        self.0.set_connection(None);
    }
}

/// Streams an allocation's logs on a new uni-stream.
async fn send_logs(
    conn: quinn::Connection,
    supervisor: Supervisor<HostRuntime>,
    request: LogRequest,
    version: u16,
) {
    use futures_util::StreamExt;
    let Ok(mut stream) = conn.open_uni().await else {
        return;
    };
    let header = StreamOpen {
        protocol_version: version,
        kind: StreamKind::Logs {
            request_id: request.request_id,
        },
    };
    if wire::write_frame_as(version, &mut stream, &header)
        .await
        .is_err()
    {
        return;
    }
    let alloc = request.allocation.clone();
    let mut chunks = std::pin::pin!(supervisor.logs(request));
    while let Some(chunk) = chunks.next().await {
        let end = chunk.end.is_some();
        if let Err(error) = wire::write_frame_as(version, &mut stream, &chunk).await {
            debug!(%alloc, %error, "log stream closed");
            return;
        }
        if end {
            break;
        }
    }
    let _ = stream.finish();
}

/// Certificate renewal state: when it is due, and the key of a request in flight.
#[derive(Debug)]
struct Renewal {
    due: Instant,
    next_id: u64,
    pending: Option<(u64, String)>,
}

impl Renewal {
    fn new(cert_pem: &str) -> Renewal {
        Renewal {
            due: renewal_due(cert_pem),
            next_id: 1,
            pending: None,
        }
    }

    fn request(&mut self, name: &str) -> Option<AgentMessage> {
        match pki::generate_csr(name) {
            Ok((csr_pem, key_pem)) => {
                let id = self.next_id;
                self.next_id += 1;
                self.pending = Some((id, key_pem));
                info!(node = name, "requesting a renewed certificate");
                Some(AgentMessage::RenewCertificate {
                    request_id: id,
                    csr_pem,
                })
            }
            Err(e) => {
                warn!(error = %e, "cannot make a renewal request; retrying in a minute");
                self.due = Instant::now() + Duration::from_secs(60);
                None
            }
        }
    }

    fn answered(&mut self, state: &StateDir, request_id: u64, result: Result<String, String>) {
        let Some((id, key_pem)) = self.pending.take() else {
            warn!(request_id, "certificate answer for no request");
            return;
        };
        if id != request_id {
            warn!(
                request_id,
                expected = id,
                "certificate answer for another request"
            );
            self.pending = Some((id, key_pem));
            return;
        }
        match result.map(|cert| (state.store_identity(&cert, &key_pem), cert)) {
            Ok((Ok(()), cert)) => {
                self.due = renewal_due(&cert);
                info!("node certificate renewed");
            }
            Ok((Err(e), _)) => {
                error!(error = %e, "cannot store the renewed certificate; retrying in a minute");
                self.due = Instant::now() + Duration::from_secs(60);
            }
            Err(reason) => {
                warn!(%reason, "the controller refused to renew the certificate; retrying in a minute");
                self.due = Instant::now() + Duration::from_secs(60);
            }
        }
    }
}

/// When the certificate in `cert_pem` is due for renewal (now, if unreadable).
fn renewal_due(cert_pem: &str) -> Instant {
    let info = pki::first_cert_der(cert_pem).and_then(|der| pki::cert_info(&der));
    match info {
        Ok(info) => {
            Instant::now() + pki::renew_in(info.not_before, info.not_after, SystemTime::now())
        }
        Err(e) => {
            warn!(error = %e, "cannot read the node certificate's validity; renewing now");
            Instant::now()
        }
    }
}

async fn read_control(
    mut recv: quinn::RecvStream,
    tx: mpsc::Sender<Result<ControllerMessage, FrameError>>,
    version: u16,
) {
    let mut scratch = Vec::new();
    loop {
        let msg =
            wire::read_frame_as::<ControllerMessage, _>(version, &mut recv, &mut scratch).await;
        let stop = !matches!(msg, Ok(Some(_)));
        let item = match msg {
            Ok(Some(m)) => Ok(m),
            Ok(None) => return,
            Err(e) => Err(e),
        };
        if tx.send(item).await.is_err() || stop {
            return;
        }
    }
}

fn quic_client_config(
    creds: &Credentials,
    liveness: &Liveness,
) -> Result<quinn::ClientConfig, SessionError> {
    let rustls = tls::client_config(
        &creds.ca_pem,
        Some((&creds.cert_pem, &creds.key_pem)),
        &[wire::ALPN],
    )
    .map_err(|e| SessionError::Tls(e.to_string()))?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(rustls)
        .map_err(|e| SessionError::Tls(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(liveness.keep_alive));
    if let Ok(idle) = quinn::IdleTimeout::try_from(liveness.idle_timeout) {
        transport.max_idle_timeout(Some(idle));
    }
    // The controller opens one bi-stream per remote command and no uni-stream.
    transport.max_concurrent_bidi_streams(exec::MAX_CONCURRENT_EXECS.into());
    transport.max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// The TLS `certificate_revoked` alert (44) as a QUIC crypto error code.
const TLS_CERTIFICATE_REVOKED: u64 = 0x100 + 44;

fn close_reason(e: &quinn::ConnectionError) -> SessionError {
    if let quinn::ConnectionError::ConnectionClosed(close) = e
        && u64::from(close.error_code) == TLS_CERTIFICATE_REVOKED
    {
        return SessionError::Refused {
            code: CloseCode::Revoked,
            message: "the controller refused this node's certificate as revoked".into(),
        };
    }
    if let quinn::ConnectionError::ApplicationClosed(close) = e
        && let Some(code) = CloseCode::from_code(close.error_code.into_inner())
        && code != CloseCode::Normal
    {
        return SessionError::Refused {
            code,
            message: String::from_utf8_lossy(&close.reason).into_owned(),
        };
    }
    SessionError::Lost(e.to_string())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

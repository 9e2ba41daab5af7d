//! The controller's end of the agent link: a quinn endpoint that requires a client
//! certificate from the fleet CA, refuses revoked nodes and revoked certificate
//! serials during the handshake, and serves each connection's control and metrics
//! streams. [`Agents::close_revoked`] closes the live connections of a
//! certificate revoked while they run.
//!
//! Everything read from a connection is untrusted: a malformed, oversized or
//! unexpected frame closes that connection (with a [`CloseCode`] and a log line)
//! and nothing else.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use novacron_common::fleet::Liveness;
use novacron_common::pki::{self, CertAndKey, Identity, Role, Validity};
use novacron_common::sync::lock;
use novacron_common::tls::{self, CertRevocation, RevokedSerials};
use novacron_common::wire::{
    self, AgentMessage, CloseCode, ControllerMessage, DesiredAllocations, FirstFrame, FrameError,
    Hello, LogChunk, MetricsBatch, Negotiated, Refusal, StreamKind, StreamOpen, VersionRange,
    Welcome,
};
use quinn::{RecvStream, SendStream};
use rustls_pki_types::CertificateDer;
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

use crate::services::agents::{Agents, close, peer_serial};
pub use crate::services::agents::{ExecChannel, ExecOpenError, ExecStreamError};
use crate::services::events::{self, EventLog, NewEvent};
use crate::services::workloads::Workloads;
use crate::state::registry::{Registry, RegistryError, RevokedNames};

/// Commands queued for one agent before the link applies backpressure.
pub const COMMAND_QUEUE: usize = 32;

/// How long an agent has to send its `Hello` after the handshake.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// The most connections served at once (handshakes included).
pub const MAX_CONNECTIONS: usize = 20_000;

/// Settings of the agent link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Keep-alive and idle timeout.
    pub liveness: Liveness,
    /// Lifetime of renewed node certificates.
    pub node_cert_ttl: Duration,
}

/// Errors starting the endpoint.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// TLS configuration failed.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The QUIC crypto configuration was refused.
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
    /// Binding the UDP socket failed.
    #[error("cannot listen on udp {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Builds the QUIC transport settings shared by both ends of the link.
///
/// Agents ping every `keep_alive`; the controller pings an agent only after
/// hearing nothing from it for halfway between `keep_alive` and the idle timeout
/// ([`controller_keep_alive`]). With the same interval on both ends, each end's
/// ping timer fired just before the other's ping arrived, and both pinged: at
/// 10,000 agents that doubled the datagrams the controller handled.
pub fn transport_config(liveness: &Liveness) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(controller_keep_alive(liveness)));
    // The conversion fails only for timeouts above 2^62 ms.
    if let Ok(idle) = quinn::IdleTimeout::try_from(liveness.idle_timeout) {
        t.max_idle_timeout(Some(idle));
    }
    t.max_concurrent_bidi_streams(4u32.into());
    t.max_concurrent_uni_streams(4u32.into());
    t
}

/// The controller's keep-alive interval: halfway between the agents'
/// `keep_alive` and the idle timeout. A healthy agent, heard from at least every
/// `keep_alive`, is never pinged; an agent configured with a longer keep-alive
/// than the controller's is still pinged before the link idles out.
pub fn controller_keep_alive(liveness: &Liveness) -> Duration {
    let keep_alive = liveness.keep_alive.min(liveness.idle_timeout);
    keep_alive + (liveness.idle_timeout - keep_alive) / 2
}

/// Binds the agent endpoint.
pub fn bind(
    config: &LinkConfig,
    server: &CertAndKey,
    ca_pem: &str,
    revoked: Arc<RevokedNames>,
    revoked_certs: Arc<RevokedSerials>,
) -> Result<quinn::Endpoint, LinkError> {
    let verifier = tls::revocation_checking_verifier(
        tls::fleet_client_verifier(ca_pem, false)?,
        Arc::new(NodeRevocations {
            serials: revoked_certs,
            names: revoked,
        }),
    );
    let rustls_config =
        tls::server_config(&server.cert_pem, &server.key_pem, verifier, &[wire::ALPN])?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(rustls_config)
        .map_err(|e| LinkError::Quic(e.to_string()))?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server_config.transport_config(Arc::new(transport_config(&config.liveness)));
    let bind_err = |source| LinkError::Bind {
        addr: config.listen,
        source,
    };
    let socket = udp_socket(config.listen).map_err(bind_err)?;
    let runtime = quinn::default_runtime().ok_or_else(|| {
        bind_err(std::io::Error::other(
            "no async runtime for the QUIC endpoint",
        ))
    })?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket,
        runtime,
    )
    .map_err(bind_err)
}

/// Receive buffer asked for the agent link's socket: bursts from thousands of
/// agents must not overflow the kernel's default (about 208 KiB). The kernel caps
/// it at `net.core.rmem_max`.
pub const SOCKET_BUFFER_BYTES: usize = 4 << 20;

fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(error) = socket.set_recv_buffer_size(SOCKET_BUFFER_BYTES) {
        warn!(%error, "cannot enlarge the agent link's receive buffer");
    }
    if let Err(error) = socket.set_send_buffer_size(SOCKET_BUFFER_BYTES) {
        warn!(%error, "cannot enlarge the agent link's send buffer");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Shared state of the connection handlers.
#[derive(Debug)]
pub struct LinkContext {
    /// The fleet registry.
    pub registry: Arc<Registry>,
    /// Jobs and allocations.
    pub workloads: Arc<Workloads>,
    /// The connected agents (their connections, command channels and waiting log
    /// streams), shared with the handlers and services.
    pub agents: Arc<Agents>,
    /// The fleet CA, to sign renewals.
    pub ca: CertAndKey,
    /// Lifetime of renewed certificates.
    pub node_cert_ttl: Duration,
    /// Checkpoint bundles, served to agents that restore them.
    pub bundles: Option<Arc<crate::state::bundles::BundleStore>>,
    /// The image store, read by agents' loopback registries.
    pub images: Option<Arc<crate::services::images::Images>>,
    /// Spot interruption notices, for the migration service (bounded; a full queue
    /// drops the notice with a warning, and the agent repeats it on reconnect).
    pub spot: Option<mpsc::Sender<crate::services::migrate::SpotEvent>>,
    /// Revoked certificate serials (the list the endpoint's verifier reads).
    pub revoked_certs: Arc<RevokedSerials>,
    /// The event log (agents refused for their protocol version).
    pub events: Arc<EventLog>,
    /// The wire protocol versions this controller accepts.
    pub wire_versions: VersionRange,
    /// The version range each node was last refused for: one event per node and
    /// range, not one per reconnect attempt.
    pub version_refusals: std::sync::Mutex<std::collections::HashMap<String, VersionRange>>,
    /// The ingress table ([`crate::services::ingress`]), sent to every agent of
    /// protocol [`wire::INGRESS_SINCE`] or later when it changes.
    pub ingress: watch::Receiver<Arc<wire::IngressTable>>,
}

/// Accepts agent connections until the endpoint closes.
pub async fn serve(endpoint: quinn::Endpoint, ctx: Arc<LinkContext>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            warn!(remote = %incoming.remote_address(), "connection limit reached; refusing");
            incoming.refuse();
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_connection(conn, ctx).await,
                Err(error) => debug!(%remote, %error, "agent handshake failed"),
            }
            drop(permit);
        });
    }
}

async fn serve_connection(conn: quinn::Connection, ctx: Arc<LinkContext>) {
    let remote = conn.remote_address();
    let identity = match peer_identity(&conn) {
        Ok(id) if id.role == Role::Node => id,
        Ok(id) => {
            warn!(%remote, identity = %id, "refused: not a node certificate");
            close(
                &conn,
                CloseCode::IdentityMismatch,
                "a node certificate is required",
            );
            return;
        }
        Err(reason) => {
            warn!(%remote, %reason, "refused: unusable client certificate");
            close(&conn, CloseCode::IdentityMismatch, &reason);
            return;
        }
    };
    // A resumed TLS session restores the certificate without the verifier.
    if let Some(serial) = peer_serial(&conn)
        && ctx.revoked_certs.contains(&serial)
    {
        warn!(%remote, identity = %identity, %serial, "refused: revoked certificate");
        close(&conn, CloseCode::Revoked, "this certificate was revoked");
        return;
    }
    let name = identity.name;
    let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(error)) => {
            debug!(node = %name, %remote, %error, "connection ended before the control stream");
            return;
        }
        Err(_) => {
            warn!(node = %name, %remote, "no control stream in time");
            close(&conn, CloseCode::Timeout, "no control stream within 5 s");
            return;
        }
    };
    let Some((version, hello)) = handshake(&conn, &ctx, &name, remote, &mut send, &mut recv).await
    else {
        return;
    };
    if hello.node_name != name {
        let msg = format!(
            "this connection's certificate belongs to node {name:?}, not {:?}",
            hello.node_name
        );
        warn!(node = %name, %remote, claimed = %hello.node_name, "refused: claimed another node's name");
        refuse(&conn, &mut send, version, CloseCode::IdentityMismatch, &msg).await;
        return;
    }
    let (conn_id, next_seq) = match ctx.registry.connect(
        &name,
        &hello,
        Arc::new(conn.clone()),
        remote,
        Instant::now(),
        SystemTime::now(),
    ) {
        Ok(v) => v,
        Err(error) => {
            let code = match error {
                RegistryError::Revoked(_) => CloseCode::Revoked,
                RegistryError::UnknownNode(_) => CloseCode::IdentityMismatch,
                RegistryError::Store(_) => CloseCode::Internal,
            };
            warn!(node = %name, %remote, %error, "refused");
            refuse(&conn, &mut send, version, code, &error.to_string()).await;
            return;
        }
    };
    lock(&ctx.version_refusals).remove(&name);
    let welcome = ControllerMessage::Welcome(Welcome {
        protocol_version: version,
        node_name: name.clone(),
        next_metrics_seq: next_seq,
    });
    if let Err(error) = wire::write_frame_as(version, &mut send, &welcome).await {
        debug!(node = %name, %error, "cannot send Welcome");
        ctx.registry
            .disconnect(&name, conn_id, Instant::now(), false);
        return;
    }

    let metrics = tokio::spawn(serve_uni_streams(
        conn.clone(),
        ctx.clone(),
        name.clone(),
        conn_id,
        version,
    ));
    let agent_streams = ctx.bundles.clone().map(|b| {
        AbortOnDrop(tokio::spawn(crate::services::migrate::serve_agent_streams(
            conn.clone(),
            b,
            ctx.images.clone(),
            name.clone(),
        )))
    });
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    lock(&ctx.agents.commands).insert(name.clone(), (conn_id, cmd_tx));
    lock(&ctx.agents.versions).insert(name.clone(), (conn_id, version));
    lock(&ctx.agents.connections).insert(name.clone(), (conn_id, conn.clone()));
    // A revocation that scanned the connections before the insert above has put its
    // serial in the list first: one of the two sees the other.
    if peer_serial(&conn).is_some_and(|s| ctx.revoked_certs.contains(&s)) {
        warn!(node = %name, %remote, "closing: its certificate was revoked while it connected");
        close(&conn, CloseCode::Revoked, "this certificate was revoked");
    }
    let desired = ctx.workloads.subscribe(&name);
    let result = control_loop(&ctx, &name, version, &mut send, recv, desired, cmd_rx).await;
    {
        let mut commands = lock(&ctx.agents.commands);
        if commands.get(&name).is_some_and(|(id, _)| *id == conn_id) {
            commands.remove(&name);
        }
    }
    {
        let mut connections = lock(&ctx.agents.connections);
        if connections.get(&name).is_some_and(|(id, _)| *id == conn_id) {
            connections.remove(&name);
        }
    }
    {
        let mut versions = lock(&ctx.agents.versions);
        if versions.get(&name).is_some_and(|(id, _)| *id == conn_id) {
            versions.remove(&name);
        }
    }
    match result {
        Ok(()) => {}
        Err(LoopEnd::Protocol(code, reason)) => {
            warn!(node = %name, %remote, ?code, %reason, "closing connection: protocol violation");
            close(&conn, code, &reason);
        }
        Err(LoopEnd::Gone) => {}
    }
    let reason = conn.closed().await;
    metrics.abort();
    drop(agent_streams);
    debug!(node = %name, %reason, "connection closed");
    // The agent said goodbye (it is restarting; its containers keep running).
    let clean = matches!(
        &reason,
        quinn::ConnectionError::ApplicationClosed(close)
            if CloseCode::from_code(close.error_code.into_inner()) == Some(CloseCode::Normal)
    );
    ctx.registry
        .disconnect(&name, conn_id, Instant::now(), clean);
}

enum LoopEnd {
    Protocol(CloseCode, String),
    Gone,
}

impl From<FrameError> for LoopEnd {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(_) => LoopEnd::Gone,
            other => LoopEnd::Protocol(other.close_code(), other.to_string()),
        }
    }
}

async fn control_loop(
    ctx: &LinkContext,
    name: &str,
    version: u16,
    send: &mut SendStream,
    recv: RecvStream,
    mut desired: watch::Receiver<Arc<DesiredAllocations>>,
    mut commands: mpsc::Receiver<Box<ControllerMessage>>,
) -> Result<(), LoopEnd> {
    // Frame reads are not cancel-safe: a task reads, this loop selects. Items
    // are boxed, as are commands: a tokio channel allocates its slots 32 at a
    // time, and 10,000 connections' unboxed slots took 49 MB (heaptrack).
    let (tx, mut incoming) = mpsc::channel::<Box<Result<AgentMessage, FrameError>>>(8);
    let reader = tokio::spawn(read_agent_messages(recv, tx, version));
    let _guard = AbortOnDrop(reader);
    let first = desired.borrow_and_update().clone();
    warn_undelivered(name, version, &first);
    wire::write_frame_as(version, send, &ControllerMessage::Desired((*first).clone())).await?;
    let ingress_enabled = version >= wire::INGRESS_SINCE;
    let mut ingress = ctx.ingress.clone();
    if ingress_enabled {
        let table = ingress.borrow_and_update().clone();
        wire::write_frame_as(version, send, &ControllerMessage::Ingress((*table).clone())).await?;
    }
    loop {
        tokio::select! {
            msg = incoming.recv() => match msg.map(|m| *m) {
                None => return Ok(()),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(AgentMessage::Hello(_))) => {
                    return Err(LoopEnd::Protocol(
                        CloseCode::Unexpected,
                        "a second Hello on the control stream".into(),
                    ));
                }
                Some(Ok(AgentMessage::Allocations(report))) => {
                    ctx.workloads.report(name, &report, SystemTime::now());
                }
                Some(Ok(AgentMessage::Images(inventory))) => {
                    debug!(node = name, images = inventory.images.len(), "image inventory");
                    ctx.registry.set_images(name, inventory);
                }
                Some(Ok(AgentMessage::SpotNotice { action, deadline_unix_ms })) => {
                    warn!(node = name, %action, deadline_unix_ms, "spot interruption notice");
                    ctx.registry.set_spot_notice(name, deadline_unix_ms);
                    let event = crate::services::migrate::SpotEvent {
                        node: name.to_string(),
                        action,
                        deadline_unix_ms,
                    };
                    if let Some(tx) = &ctx.spot
                        && tx.try_send(event).is_err()
                    {
                        warn!(node = name, "spot notice queue full; dropping the notice");
                    }
                }
                Some(Ok(AgentMessage::RenewCertificate { request_id, csr_pem })) => {
                    let result = renew(ctx, name, &csr_pem);
                    match &result {
                        Ok(_) => info!(node = name, "renewed node certificate"),
                        Err(error) => warn!(node = name, %error, "certificate renewal refused"),
                    }
                    let answer = ControllerMessage::Certificate { request_id, result };
                    wire::write_frame_as(version, send, &answer).await?;
                }
            },
            changed = desired.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let next = desired.borrow_and_update().clone();
                debug!(node = name, generation = next.generation, allocations = next.allocations.len(), "sending desired allocations");
                warn_undelivered(name, version, &next);
                wire::write_frame_as(version, send, &ControllerMessage::Desired((*next).clone())).await?;
            }
            changed = ingress.changed(), if ingress_enabled => {
                if changed.is_err() {
                    return Ok(());
                }
                let table = ingress.borrow_and_update().clone();
                debug!(node = name, revision = table.revision, services = table.services.len(), "sending the ingress table");
                wire::write_frame_as(version, send, &ControllerMessage::Ingress((*table).clone())).await?;
            }
            Some(cmd) = commands.recv() => {
                wire::write_frame_as(version, send, &*cmd).await?;
            }
        }
    }
}

async fn read_agent_messages(
    mut recv: RecvStream,
    tx: mpsc::Sender<Box<Result<AgentMessage, FrameError>>>,
    version: u16,
) {
    let mut scratch = Vec::new();
    loop {
        let item =
            match wire::read_frame_as::<AgentMessage, _>(version, &mut recv, &mut scratch).await {
                Ok(Some(m)) => Ok(m),
                Ok(None) => return,
                Err(e) => Err(e),
            };
        let stop = item.is_err();
        if tx.send(Box::new(item)).await.is_err() || stop {
            return;
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn renew(ctx: &LinkContext, name: &str, csr_pem: &str) -> Result<String, String> {
    let identity = Identity::node(name).map_err(|e| e.to_string())?;
    let now = SystemTime::now();
    let cert_pem = pki::sign_csr(
        &ctx.ca,
        csr_pem,
        &identity,
        Validity::starting(now, ctx.node_cert_ttl),
    )
    .map_err(|e| format!("cannot sign the renewal request: {e}"))?;
    let info = pki::first_cert_der(&cert_pem)
        .and_then(|der| pki::cert_info(&der))
        .map_err(|e| e.to_string())?;
    ctx.registry
        .enrolled(name, &info, now)
        .map_err(|e| e.to_string())?;
    Ok(cert_pem)
}

async fn serve_uni_streams(
    conn: quinn::Connection,
    ctx: Arc<LinkContext>,
    name: String,
    conn_id: u64,
    version: u16,
) {
    loop {
        let mut recv = match conn.accept_uni().await {
            Ok(recv) => recv,
            Err(_) => return,
        };
        let ctx = ctx.clone();
        let name = name.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            if let Err(LoopEnd::Protocol(code, reason)) =
                serve_metrics_stream(&ctx, &name, conn_id, version, &mut recv).await
            {
                warn!(node = %name, ?code, %reason, "closing connection: bad metrics stream");
                close(&conn, code, &reason);
            }
        });
    }
}

async fn serve_metrics_stream(
    ctx: &LinkContext,
    name: &str,
    conn_id: u64,
    version: u16,
    recv: &mut RecvStream,
) -> Result<(), LoopEnd> {
    let mut scratch = Vec::new();
    match wire::read_frame_as::<StreamOpen, _>(version, recv, &mut scratch).await? {
        Some(StreamOpen {
            protocol_version,
            kind: StreamKind::Metrics,
        }) if protocol_version == version => {}
        Some(StreamOpen {
            protocol_version,
            kind: StreamKind::Logs { request_id },
        }) if protocol_version == version => {
            return forward_logs(ctx, name, request_id, version, recv, &mut scratch).await;
        }
        Some(other) => {
            return Err(LoopEnd::Protocol(
                CloseCode::Unexpected,
                format!("unsupported stream header {other:?}"),
            ));
        }
        None => return Ok(()),
    }
    while let Some(batch) =
        wire::read_frame_as::<MetricsBatch, _>(version, recv, &mut scratch).await?
    {
        if batch.samples.len() > wire::MAX_SAMPLES_PER_BATCH {
            return Err(LoopEnd::Protocol(
                CloseCode::Unexpected,
                format!(
                    "a metrics batch of {} samples exceeds the maximum of {}",
                    batch.samples.len(),
                    wire::MAX_SAMPLES_PER_BATCH
                ),
            ));
        }
        ctx.registry.ingest(name, conn_id, batch, SystemTime::now());
    }
    Ok(())
}

async fn forward_logs(
    ctx: &LinkContext,
    name: &str,
    request_id: u64,
    version: u16,
    recv: &mut RecvStream,
    scratch: &mut Vec<u8>,
) -> Result<(), LoopEnd> {
    let Some(tx) = lock(&ctx.agents.pending_logs).remove(&request_id) else {
        debug!(node = name, request_id, "log stream for no pending request");
        return Ok(());
    };
    while let Some(chunk) = wire::read_frame_as::<LogChunk, _>(version, recv, scratch).await? {
        let end = chunk.end.is_some();
        if tx.send(chunk).await.is_err() || end {
            break;
        }
    }
    Ok(())
}

async fn refuse(
    conn: &quinn::Connection,
    send: &mut SendStream,
    version: u16,
    code: CloseCode,
    message: &str,
) {
    let refusal = ControllerMessage::Refused(Refusal {
        code,
        message: message.to_string(),
    });
    if wire::write_frame_as(version, send, &refusal).await.is_ok() {
        let _ = send.finish();
        // Give the frame a moment to reach the agent before the close overtakes it.
        let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    }
    close(conn, code, message);
}

/// Reads the agent's first frames and agrees on the connection's protocol version:
/// an [`wire::Opening::Offer`] is answered with [`Negotiated`] and followed by the
/// agent's `Hello` in the chosen version; a version-2 agent's `Hello` comes first.
/// `None` when the connection was refused or ended (and is closed).
async fn handshake(
    conn: &quinn::Connection,
    ctx: &LinkContext,
    name: &str,
    remote: SocketAddr,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Option<(u16, Box<Hello>)> {
    let mut scratch = Vec::new();
    let first = match tokio::time::timeout(HELLO_TIMEOUT, wire::read_body(recv, &mut scratch)).await
    {
        Ok(Ok(true)) => wire::classify_first_frame(&scratch),
        Ok(Ok(false)) => return None,
        Ok(Err(error)) => Err(error),
        Err(_) => {
            close(conn, CloseCode::Timeout, "no Hello within 5 s");
            return None;
        }
    };
    let first = match first {
        Ok(first) => first,
        Err(FrameError::Malformed(_))
            if wire::decode_body::<AgentMessage>(&scratch)
                .is_ok_and(|m| !matches!(m, AgentMessage::Hello(_))) =>
        {
            warn!(node = %name, %remote, "refused: first frame is not Hello");
            close(
                conn,
                CloseCode::Unexpected,
                "the first frame must be a version offer or Hello",
            );
            return None;
        }
        Err(error) => {
            warn!(node = %name, %remote, %error, "refused: bad first frame");
            close(conn, error.close_code(), &error.to_string());
            return None;
        }
    };
    let (theirs, offered) = match first {
        FirstFrame::Offer(range) => (range, true),
        FirstFrame::LegacyHello(v) => (VersionRange { min: v, max: v }, false),
    };
    let version = match ctx.wire_versions.negotiate(theirs, "controller", "agent") {
        Ok(version) => version,
        Err(mismatch) => {
            let message = mismatch.to_string();
            warn!(node = %name, %remote, agent_versions = %theirs, controller_versions = %ctx.wire_versions, "refused: {message}");
            let first_time =
                lock(&ctx.version_refusals).insert(name.to_string(), theirs) != Some(theirs);
            if first_time {
                let event = NewEvent::new(
                    events::kind::NODE_VERSION_REFUSED,
                    events::CONTROLLER,
                    &message,
                )
                .node(name)
                .detail("agent_versions", theirs)
                .detail("controller_versions", ctx.wire_versions);
                if let Err(error) = ctx.events.record(event) {
                    warn!(%error, "cannot record the version refusal event");
                }
            }
            if offered {
                let reject = Negotiated::Reject {
                    min: ctx.wire_versions.min,
                    max: ctx.wire_versions.max,
                    message: message.clone(),
                };
                if wire::write_frame(send, &reject).await.is_ok() {
                    let _ = send.finish();
                    let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
                }
                close(conn, CloseCode::VersionMismatch, &message);
            } else {
                // The agent's Hello version decides how it reads the refusal.
                refuse(conn, send, theirs.max, CloseCode::VersionMismatch, &message).await;
            }
            return None;
        }
    };
    let hello = if offered {
        if let Err(error) = wire::write_frame(send, &Negotiated::Accept { version }).await {
            debug!(node = %name, %error, "cannot answer the version offer");
            return None;
        }
        match tokio::time::timeout(
            HELLO_TIMEOUT,
            wire::read_frame_as::<AgentMessage, _>(version, recv, &mut scratch),
        )
        .await
        {
            Ok(Ok(Some(message))) => Ok(message),
            Ok(Ok(None)) => return None,
            Ok(Err(error)) => Err(error),
            Err(_) => {
                close(conn, CloseCode::Timeout, "no Hello within 5 s");
                return None;
            }
        }
    } else {
        wire::decode_body_as::<AgentMessage>(version, &scratch)
    };
    match hello {
        Ok(AgentMessage::Hello(hello)) => {
            debug!(node = %name, version, "protocol version agreed");
            Some((version, hello))
        }
        Ok(other) => {
            warn!(node = %name, %remote, message = ?std::mem::discriminant(&other), "refused: first frame is not Hello");
            close(conn, CloseCode::Unexpected, "the first frame must be Hello");
            None
        }
        Err(error) => {
            warn!(node = %name, %remote, %error, "refused: bad Hello frame");
            close(conn, error.close_code(), &error.to_string());
            None
        }
    }
}

fn peer_identity(conn: &quinn::Connection) -> Result<Identity, String> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| "no client certificate".to_string())?;
    let leaf = certs
        .first()
        .ok_or_else(|| "empty certificate chain".to_string())?;
    Identity::from_cert_der(leaf).map_err(|e| e.to_string())
}

/// What refuses a node at the handshake: a revoked certificate serial, or a
/// revoked node name (`node revoke`).
#[derive(Debug)]
struct NodeRevocations {
    serials: Arc<RevokedSerials>,
    names: Arc<RevokedNames>,
}

impl CertRevocation for NodeRevocations {
    fn check(&self, end_entity: &[u8]) -> Result<(), rustls::Error> {
        self.serials.check(end_entity)?;
        if let Ok(id) = Identity::from_cert_der(end_entity)
            && self.names.contains(&id.name)
        {
            info!(node = %id.name, "refused revoked node at the handshake");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(())
    }
}

/// Says, in the log, which allocations a version-2 agent runs without what
/// protocol 3 carries (secrets, registry credentials): its conversion drops them.
fn warn_undelivered(node: &str, version: u16, set: &novacron_common::wire::DesiredAllocations) {
    if version >= 3 {
        return;
    }
    for a in set
        .allocations
        .iter()
        .filter(|a| !a.task.secrets.is_empty() || a.task.registry_auth.is_some())
    {
        warn!(node, alloc = %a.id, job = %a.job, "this node's agent speaks protocol 2, which carries no secrets or registry credentials: the allocation runs without them; upgrade the agent");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_controller_pings_only_agents_it_has_not_heard_from_for_longer_than_their_keep_alive() {
        let default = Liveness::default();
        let ping = controller_keep_alive(&default);
        assert!(ping > default.keep_alive, "{ping:?}");
        assert!(ping < default.idle_timeout, "{ping:?}");
        let l = Liveness {
            keep_alive: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(2),
            ..Liveness::default()
        };
        assert_eq!(controller_keep_alive(&l), Duration::from_millis(1250));
        // A keep-alive at or past the idle timeout (refused by the configuration
        // checks) still gives an interval inside it.
        let l = Liveness {
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(2),
            ..Liveness::default()
        };
        assert_eq!(controller_keep_alive(&l), Duration::from_secs(2));
    }
}

//! The controller's end of the agent link: a quinn endpoint that requires a client
//! certificate from the fleet CA, refuses revoked nodes and revoked certificate
//! serials during the handshake, and serves each connection's control and metrics
//! streams. [`LinkContext::close_revoked`] closes the live connections of a
//! certificate revoked while they run.
//!
//! Everything read from a connection is untrusted: a malformed, oversized or
//! unexpected frame closes that connection (with a [`CloseCode`] and a log line)
//! and nothing else.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use novacron_common::fleet::Liveness;
use novacron_common::pki::{self, CertAndKey, Identity, Role, Serial, Validity};
use novacron_common::sync::lock;
use novacron_common::tls::{self, CertRevocation, RevokedSerials};
use novacron_common::wire::{
    self, AgentMessage, CloseCode, ControllerMessage, DesiredAllocations, ExecEvent, ExecRequest,
    FrameError, LogChunk, MetricsBatch, PROTOCOL_VERSION, Refusal, StreamKind, StreamOpen, Welcome,
};
use quinn::{RecvStream, SendStream};
use rustls_pki_types::CertificateDer;
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

use crate::registry::{Registry, RegistryError, RevokedNames};
use crate::workloads::Workloads;

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
pub fn transport_config(liveness: &Liveness) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(liveness.keep_alive));
    // The conversion fails only for timeouts above 2^62 ms.
    if let Ok(idle) = quinn::IdleTimeout::try_from(liveness.idle_timeout) {
        t.max_idle_timeout(Some(idle));
    }
    t.max_concurrent_bidi_streams(4u32.into());
    t.max_concurrent_uni_streams(4u32.into());
    t
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
    /// Per-node channels for commands to the agent (log requests), by node name.
    pub commands: Mutex<HashMap<String, (u64, mpsc::Sender<ControllerMessage>)>>,
    /// Log streams waiting for their agent, by request id.
    pub pending_logs: Mutex<HashMap<u64, mpsc::Sender<LogChunk>>>,
    /// Each connected node's live connection (with its connection id), on which
    /// remote exec opens its streams.
    pub connections: Mutex<HashMap<String, (u64, quinn::Connection)>>,
    /// The fleet CA, to sign renewals.
    pub ca: CertAndKey,
    /// Lifetime of renewed certificates.
    pub node_cert_ttl: Duration,
    /// Checkpoint bundles, served to agents that restore them.
    pub bundles: Option<Arc<crate::bundles::BundleStore>>,
    /// Spot interruption notices, for the migration service (bounded; a full queue
    /// drops the notice with a warning, and the agent repeats it on reconnect).
    pub spot: Option<mpsc::Sender<crate::migrate::SpotEvent>>,
    /// Revoked certificate serials (the list the endpoint's verifier reads).
    pub revoked_certs: Arc<RevokedSerials>,
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
    let mut scratch = Vec::new();
    let hello = match tokio::time::timeout(
        HELLO_TIMEOUT,
        wire::read_frame::<AgentMessage, _>(&mut recv, &mut scratch),
    )
    .await
    {
        Ok(Ok(Some(AgentMessage::Hello(hello)))) => hello,
        Ok(Ok(Some(other))) => {
            warn!(node = %name, %remote, message = ?std::mem::discriminant(&other), "refused: first frame is not Hello");
            close(
                &conn,
                CloseCode::Unexpected,
                "the first frame must be Hello",
            );
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(error)) => {
            warn!(node = %name, %remote, %error, "refused: bad Hello frame");
            close(&conn, error.close_code(), &error.to_string());
            return;
        }
        Err(_) => {
            close(&conn, CloseCode::Timeout, "no Hello within 5 s");
            return;
        }
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        let msg = format!(
            "protocol version {} is not supported; this controller speaks {PROTOCOL_VERSION}",
            hello.protocol_version
        );
        refuse(&conn, &mut send, CloseCode::VersionMismatch, &msg).await;
        warn!(node = %name, %remote, version = hello.protocol_version, "refused: protocol version");
        return;
    }
    if hello.node_name != name {
        let msg = format!(
            "this connection's certificate belongs to node {name:?}, not {:?}",
            hello.node_name
        );
        warn!(node = %name, %remote, claimed = %hello.node_name, "refused: claimed another node's name");
        refuse(&conn, &mut send, CloseCode::IdentityMismatch, &msg).await;
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
            refuse(&conn, &mut send, code, &error.to_string()).await;
            return;
        }
    };
    let welcome = ControllerMessage::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        node_name: name.clone(),
        next_metrics_seq: next_seq,
    });
    if let Err(error) = wire::write_frame(&mut send, &welcome).await {
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
    ));
    let agent_streams = ctx.bundles.clone().map(|b| {
        AbortOnDrop(tokio::spawn(crate::migrate::serve_agent_streams(
            conn.clone(),
            b,
            name.clone(),
        )))
    });
    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    lock(&ctx.commands).insert(name.clone(), (conn_id, cmd_tx));
    lock(&ctx.connections).insert(name.clone(), (conn_id, conn.clone()));
    // A revocation that scanned the connections before the insert above has put its
    // serial in the list first: one of the two sees the other.
    if peer_serial(&conn).is_some_and(|s| ctx.revoked_certs.contains(&s)) {
        warn!(node = %name, %remote, "closing: its certificate was revoked while it connected");
        close(&conn, CloseCode::Revoked, "this certificate was revoked");
    }
    let desired = ctx.workloads.subscribe(&name);
    let result = control_loop(&ctx, &name, &mut send, recv, desired, cmd_rx).await;
    {
        let mut commands = lock(&ctx.commands);
        if commands.get(&name).is_some_and(|(id, _)| *id == conn_id) {
            commands.remove(&name);
        }
    }
    {
        let mut connections = lock(&ctx.connections);
        if connections.get(&name).is_some_and(|(id, _)| *id == conn_id) {
            connections.remove(&name);
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
    send: &mut SendStream,
    recv: RecvStream,
    mut desired: watch::Receiver<Arc<DesiredAllocations>>,
    mut commands: mpsc::Receiver<ControllerMessage>,
) -> Result<(), LoopEnd> {
    // Frame reads are not cancel-safe: a task reads, this loop selects.
    let (tx, mut incoming) = mpsc::channel::<Result<AgentMessage, FrameError>>(8);
    let reader = tokio::spawn(read_agent_messages(recv, tx));
    let _guard = AbortOnDrop(reader);
    let first = desired.borrow_and_update().clone();
    wire::write_frame(send, &ControllerMessage::Desired((*first).clone())).await?;
    loop {
        tokio::select! {
            msg = incoming.recv() => match msg {
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
                Some(Ok(AgentMessage::SpotNotice { action, deadline_unix_ms })) => {
                    warn!(node = name, %action, deadline_unix_ms, "spot interruption notice");
                    let event = crate::migrate::SpotEvent {
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
                    wire::write_frame(send, &answer).await?;
                }
            },
            changed = desired.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let next = desired.borrow_and_update().clone();
                debug!(node = name, generation = next.generation, allocations = next.allocations.len(), "sending desired allocations");
                wire::write_frame(send, &ControllerMessage::Desired((*next).clone())).await?;
            }
            Some(cmd) = commands.recv() => {
                wire::write_frame(send, &cmd).await?;
            }
        }
    }
}

async fn read_agent_messages(
    mut recv: RecvStream,
    tx: mpsc::Sender<Result<AgentMessage, FrameError>>,
) {
    let mut scratch = Vec::new();
    loop {
        let item = match wire::read_frame::<AgentMessage, _>(&mut recv, &mut scratch).await {
            Ok(Some(m)) => Ok(m),
            Ok(None) => return,
            Err(e) => Err(e),
        };
        let stop = item.is_err();
        if tx.send(item).await.is_err() || stop {
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
                serve_metrics_stream(&ctx, &name, conn_id, &mut recv).await
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
    recv: &mut RecvStream,
) -> Result<(), LoopEnd> {
    let mut scratch = Vec::new();
    match wire::read_frame::<StreamOpen, _>(recv, &mut scratch).await? {
        Some(StreamOpen {
            protocol_version: PROTOCOL_VERSION,
            kind: StreamKind::Metrics,
        }) => {}
        Some(StreamOpen {
            protocol_version: PROTOCOL_VERSION,
            kind: StreamKind::Logs { request_id },
        }) => return forward_logs(ctx, name, request_id, recv, &mut scratch).await,
        Some(other) => {
            return Err(LoopEnd::Protocol(
                CloseCode::Unexpected,
                format!("unsupported stream header {other:?}"),
            ));
        }
        None => return Ok(()),
    }
    while let Some(batch) = wire::read_frame::<MetricsBatch, _>(recv, &mut scratch).await? {
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
    recv: &mut RecvStream,
    scratch: &mut Vec<u8>,
) -> Result<(), LoopEnd> {
    let Some(tx) = lock(&ctx.pending_logs).remove(&request_id) else {
        debug!(node = name, request_id, "log stream for no pending request");
        return Ok(());
    };
    while let Some(chunk) = wire::read_frame::<LogChunk, _>(recv, scratch).await? {
        let end = chunk.end.is_some();
        if tx.send(chunk).await.is_err() || end {
            break;
        }
    }
    Ok(())
}

/// Why a remote command could not be sent to a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecOpenError {
    /// The node has no live connection.
    #[error("node {0} is not connected; `novacron node list` shows which nodes are ready")]
    NotConnected(String),
    /// The connection failed while opening the stream or sending the request.
    #[error("cannot send the command to node {node}: {reason}")]
    Lost {
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
}

impl LinkContext {
    /// Closes the live connections whose node certificate has `serial` (which the
    /// caller has already put in [`LinkContext::revoked_certs`]); returns their
    /// nodes.
    pub fn close_revoked(&self, serial: &Serial) -> Vec<String> {
        let connections: Vec<(String, quinn::Connection)> = lock(&self.connections)
            .iter()
            .map(|(name, (_, conn))| (name.clone(), conn.clone()))
            .collect();
        let mut closed = Vec::new();
        for (name, conn) in connections {
            if peer_serial(&conn).as_ref() == Some(serial) {
                warn!(node = %name, %serial, "closing the connection of a revoked certificate");
                close(&conn, CloseCode::Revoked, "this certificate was revoked");
                closed.push(name);
            }
        }
        closed
    }

    /// The live connection of `node`, if it is connected.
    pub fn connection(&self, node: &str) -> Option<quinn::Connection> {
        lock(&self.connections).get(node).map(|(_, c)| c.clone())
    }

    /// Opens an exec stream to `node` and sends `request`. The command runs until
    /// it exits, its time limit passes, or the returned channel is dropped (which
    /// cancels it: the agent kills it).
    pub async fn open_exec(
        &self,
        node: &str,
        request: &ExecRequest,
    ) -> Result<ExecChannel, ExecOpenError> {
        let conn = lock(&self.connections)
            .get(node)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| ExecOpenError::NotConnected(node.to_owned()))?;
        let lost = |reason: String| ExecOpenError::Lost {
            node: node.to_owned(),
            reason,
        };
        // Waits while the node runs its maximum of concurrent commands.
        let (mut send, recv) = conn.open_bi().await.map_err(|e| lost(e.to_string()))?;
        wire::write_frame(&mut send, &wire::BiRequest::Exec(request.clone()))
            .await
            .map_err(|e| lost(e.to_string()))?;
        Ok(ExecChannel {
            send,
            recv,
            scratch: Vec::new(),
            done: false,
        })
    }
}

/// The controller's end of one exec stream. Dropping it before the command ended
/// cancels the command.
#[derive(Debug)]
pub struct ExecChannel {
    send: SendStream,
    recv: RecvStream,
    scratch: Vec<u8>,
    done: bool,
}

/// Why an exec stream ended without a last event.
#[derive(Debug, thiserror::Error)]
pub enum ExecStreamError {
    /// The agent sent something the protocol does not allow; the stream is reset.
    #[error("node sent a bad exec frame: {0}")]
    Protocol(String),
    /// The stream or connection ended.
    #[error("the node's link closed during the command: {0}")]
    Lost(String),
}

impl ExecChannel {
    /// The next event; `Ok(None)` after the last one (`Exited`, `Refused`,
    /// `Failed`). Frames are checked: an oversized output chunk, a second `Started`
    /// or anything after the last event is a protocol error, which resets the
    /// stream (and so cancels the command). Not cancel-safe: a caller that stops
    /// waiting must drop the channel.
    pub async fn next(&mut self) -> Result<Option<ExecEvent>, ExecStreamError> {
        if self.done {
            return Ok(None);
        }
        let event = match wire::read_frame::<ExecEvent, _>(&mut self.recv, &mut self.scratch).await
        {
            Ok(Some(event)) => event,
            Ok(None) => {
                return Err(ExecStreamError::Lost(
                    "the stream ended before the command's exit".into(),
                ));
            }
            Err(FrameError::Io(e)) => return Err(ExecStreamError::Lost(e.to_string())),
            Err(e) => return Err(self.violation(e.close_code(), e.to_string())),
        };
        match &event {
            ExecEvent::Output { data, .. } if data.len() > wire::MAX_EXEC_CHUNK => {
                let reason = format!(
                    "an output chunk of {} bytes exceeds the maximum of {}",
                    data.len(),
                    wire::MAX_EXEC_CHUNK
                );
                return Err(self.violation(CloseCode::Unexpected, reason));
            }
            ExecEvent::Exited { .. } | ExecEvent::Refused { .. } | ExecEvent::Failed { .. } => {
                self.done = true;
            }
            ExecEvent::Started { .. } | ExecEvent::Output { .. } => {}
        }
        Ok(Some(event))
    }

    fn violation(&mut self, code: CloseCode, reason: String) -> ExecStreamError {
        let _ = self.send.reset(code.code().into());
        let _ = self.recv.stop(code.code().into());
        self.done = true;
        ExecStreamError::Protocol(reason)
    }
}

impl Drop for ExecChannel {
    fn drop(&mut self) {
        // Ending our side is the cancel signal (harmless after the command ended).
        let _ = self.send.reset(CloseCode::Normal.code().into());
        let _ = self.recv.stop(CloseCode::Normal.code().into());
    }
}

async fn refuse(conn: &quinn::Connection, send: &mut SendStream, code: CloseCode, message: &str) {
    let refusal = ControllerMessage::Refused(Refusal {
        code,
        message: message.to_string(),
    });
    if wire::write_frame(send, &refusal).await.is_ok() {
        let _ = send.finish();
        // Give the frame a moment to reach the agent before the close overtakes it.
        let _ = tokio::time::timeout(Duration::from_millis(500), send.stopped()).await;
    }
    close(conn, code, message);
}

fn close(conn: &quinn::Connection, code: CloseCode, reason: &str) {
    // Close reasons must fit in a packet; keep them short.
    let reason: String = reason.chars().take(200).collect();
    conn.close(code.code().into(), reason.as_bytes());
}

fn peer_serial(conn: &quinn::Connection) -> Option<Serial> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    Serial::of_cert_der(certs.first()?).ok()
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

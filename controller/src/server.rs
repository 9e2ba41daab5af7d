//! Wires the controller together: store, registry, QUIC endpoint and HTTPS API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use novacron_common::fleet::Liveness;
use novacron_common::tls;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{self, ApiState};
use crate::https::{self, TlsListener};
use crate::link::{self, LinkConfig, LinkContext};
use crate::pki_files;
use crate::registry::{DEFAULT_METRICS_WINDOW, Registry, RegistryConfig};
use crate::store::{RedbStore, Store};
use crate::workloads::Workloads;

/// Default address of the HTTPS API (TCP) and of the agent link (UDP).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7443";
/// How often the metrics high-water marks are persisted.
pub const MARK_FLUSH_INTERVAL: Duration = Duration::from_secs(2);

/// A validated controller configuration.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// State directory (PKI, store).
    pub data_dir: PathBuf,
    /// TCP address of the HTTPS API.
    pub api_listen: SocketAddr,
    /// UDP address of the agent link.
    pub quic_listen: SocketAddr,
    /// Host name agents use to reach this controller; must be in the server certificate.
    pub server_name: String,
    /// `host:port` agents are told to connect to; defaults to `server_name` and the
    /// bound QUIC port.
    pub advertise: Option<String>,
    /// Liveness thresholds.
    pub liveness: Liveness,
    /// Lifetime of node certificates.
    pub node_cert_ttl: Duration,
    /// Samples kept per node.
    pub metrics_window: usize,
}

impl ControllerConfig {
    /// Defaults for `data_dir`.
    pub fn new(data_dir: PathBuf) -> ControllerConfig {
        ControllerConfig {
            data_dir,
            api_listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            quic_listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            server_name: "localhost".into(),
            advertise: None,
            liveness: Liveness::default(),
            node_cert_ttl: novacron_common::pki::DEFAULT_NODE_CERT_TTL,
            metrics_window: DEFAULT_METRICS_WINDOW,
        }
    }
}

/// A running controller.
#[derive(Debug)]
pub struct Controller {
    /// The bound API address.
    pub api_addr: SocketAddr,
    /// The bound QUIC address.
    pub quic_addr: SocketAddr,
    /// The registry, for in-process callers.
    pub registry: Arc<Registry>,
    /// Jobs and allocations, for in-process callers.
    pub workloads: Arc<Workloads>,
    cancel: CancellationToken,
    endpoint: quinn::Endpoint,
    tasks: Vec<JoinHandle<()>>,
}

/// Starts a controller on an initialized data directory.
pub async fn start(config: ControllerConfig) -> anyhow::Result<Controller> {
    tls::install_crypto_provider();
    let pki = pki_files::load(&config.data_dir)?;
    let store: Arc<dyn Store> =
        Arc::new(RedbStore::open(&config.data_dir.join("controller.redb"))?);
    let registry = Arc::new(Registry::load(
        store.clone(),
        RegistryConfig {
            metrics_window: config.metrics_window,
            down_after: config.liveness.down_after,
        },
        Instant::now(),
    )?);

    let endpoint = link::bind(
        &LinkConfig {
            listen: config.quic_listen,
            liveness: config.liveness,
            node_cert_ttl: config.node_cert_ttl,
        },
        &pki.server,
        &pki.ca.cert_pem,
        registry.revoked_names(),
    )?;
    let quic_addr = endpoint.local_addr()?;

    let api_tcp = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on tcp {}: {e}", config.api_listen))?;
    let api_addr = api_tcp.local_addr()?;
    let api_tls = tls::server_config(
        &pki.server.cert_pem,
        &pki.server.key_pem,
        tls::fleet_client_verifier(&pki.ca.cert_pem, true)?,
        &[b"h2", b"http/1.1"],
    )?;
    let listener = TlsListener::new(api_tcp, Arc::new(api_tls))?;

    let workloads = Arc::new(Workloads::load(store.clone(), registry.clone())?);
    let link_ctx = Arc::new(LinkContext {
        registry: registry.clone(),
        workloads: workloads.clone(),
        commands: Default::default(),
        pending_logs: Default::default(),
        ca: pki.ca.clone(),
        node_cert_ttl: config.node_cert_ttl,
    });
    let quic_endpoint = config
        .advertise
        .clone()
        .unwrap_or_else(|| format!("{}:{}", config.server_name, quic_addr.port()));
    let api_state = Arc::new(ApiState {
        registry: registry.clone(),
        store: store.clone(),
        ca: pki.ca.clone(),
        fingerprint: pki.fingerprint.clone(),
        node_cert_ttl: config.node_cert_ttl,
        quic_endpoint,
        server_name: config.server_name.clone(),
        api_url: format!("https://{}:{}", config.server_name, api_addr.port()),
        workloads: workloads.clone(),
        link: link_ctx.clone(),
    });

    let cancel = CancellationToken::new();
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(workloads.clone().run(cancel.clone())));
    tasks.push(tokio::spawn(link::serve(endpoint.clone(), link_ctx)));
    let api_cancel = cancel.clone();
    tasks.push(tokio::spawn(async move {
        let shutdown = async move { api_cancel.cancelled().await };
        if let Err(error) = https::serve(listener, api::router(api_state), shutdown).await {
            warn!(%error, "HTTPS API stopped");
        }
    }));
    let flush_registry = registry.clone();
    let flush_cancel = cancel.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(MARK_FLUSH_INTERVAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = flush_cancel.cancelled() => return,
            }
            let r = flush_registry.clone();
            match tokio::task::spawn_blocking(move || r.flush_marks()).await {
                Ok(Err(error)) => warn!(%error, "cannot persist metrics marks"),
                Err(error) => warn!(%error, "mark flush task failed"),
                Ok(Ok(())) => {}
            }
        }
    }));
    info!(%api_addr, %quic_addr, fingerprint = %pki.fingerprint, "controller serving");
    Ok(Controller {
        api_addr,
        quic_addr,
        registry,
        workloads,
        cancel,
        endpoint,
        tasks,
    })
}

impl Controller {
    /// Stops serving: closes agent connections, stops the API and persists marks.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.endpoint.close(
            novacron_common::wire::CloseCode::Normal.code().into(),
            b"controller shutting down",
        );
        for task in &self.tasks {
            task.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        if let Err(error) = self.registry.flush_marks() {
            warn!(%error, "cannot persist metrics marks at shutdown");
        }
        info!("controller stopped");
    }
}

//! Wires the controller together: store, registry, QUIC endpoint and HTTPS API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use novacron_common::cost::PriceCatalog;
use novacron_common::fleet::Liveness;
use novacron_common::ticker::Ticker;
use novacron_common::tls;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::http::api::{self, ApiState};
use crate::http::https::{self, TlsListener};
use crate::link::{self, LinkConfig, LinkContext};
use crate::pki_files;
use crate::services::agents::Agents;
use crate::services::autoscaler::Autoscaler;
use crate::services::events::{self, EventLog};
use crate::services::leadership::{Leadership, UnitTask, run_while_leader};
use crate::services::migrate::{Migrations, SPOT_QUEUE, SpotEvent};
use crate::services::workloads::Workloads;
use crate::services::{budgets, pools};
use crate::state::registry::{
    DEFAULT_METRICS_WINDOW, DEFAULT_RESTART_GRACE, DEFAULT_STARTUP_GRACE, Registry, RegistryConfig,
};
use crate::state::store::{RedbStore, Store};

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
    /// Extra time before nodes not yet reconnected after a start are `down`.
    pub startup_grace: Duration,
    /// Extra time before a node whose agent stopped cleanly is `down`.
    pub restart_grace: Duration,
    /// The wire protocol versions agents may use ([`novacron_common::wire::SUPPORTED`]; the
    /// version-skew tests narrow it).
    pub wire_versions: novacron_common::wire::VersionRange,
    /// Where the service catalog answers DNS (UDP and TCP); `None`: it does not.
    pub dns_listen: Option<SocketAddr>,
    /// The fleet's DNS domain, fully qualified (`novacron.`).
    pub dns_domain: String,
    /// The key that seals secrets; `None`: `<data_dir>/secrets.key`, created when
    /// missing.
    pub secrets_key_file: Option<PathBuf>,
    /// The metrics history (`[history]`).
    pub history: crate::services::history::HistorySettings,
    /// Alert evaluation (`[alerts]`).
    pub alerts: crate::services::alerts::AlertSettings,
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
            startup_grace: DEFAULT_STARTUP_GRACE,
            restart_grace: DEFAULT_RESTART_GRACE,
            wire_versions: novacron_common::wire::SUPPORTED,
            dns_listen: None,
            dns_domain: novacron_dns::DEFAULT_DOMAIN.to_string(),
            secrets_key_file: None,
            history: crate::services::history::HistorySettings::default(),
            alerts: crate::services::alerts::AlertSettings::default(),
        }
    }
}

/// The store file in the data directory.
pub const STORE_FILE: &str = "controller.redb";

/// The pricing catalog file in the data directory.
pub const PRICING_FILE: &str = "pricing.toml";

/// Loads `<data_dir>/pricing.toml` (the defaults when it does not exist); checked
/// before any port is bound.
pub fn load_pricing(data_dir: &std::path::Path) -> anyhow::Result<PriceCatalog> {
    let path = data_dir.join(PRICING_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => PriceCatalog::parse(&path.display().to_string(), &text)
            .map_err(|e| anyhow::anyhow!("pricing catalog: {e}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PriceCatalog::default()),
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

/// The secrets key: the configured file, else `<data_dir>/secrets.key`, made
/// there when missing (a data directory from before secrets existed).
fn secrets_key(config: &ControllerConfig) -> anyhow::Result<crate::services::secrets::SecretsKey> {
    use crate::services::secrets::{KEY_FILE, SecretsKey};
    let path = match &config.secrets_key_file {
        Some(path) => path.clone(),
        None => {
            let path = config.data_dir.join(KEY_FILE);
            if SecretsKey::create(&path)? {
                info!(path = %path.display(), "made a secrets key");
            }
            path
        }
    };
    Ok(SecretsKey::load(&path)?)
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
    /// Whether this controller leads (always, for a single controller); the
    /// singleton services run while it does.
    pub leadership: Leadership,
    events: Arc<EventLog>,
    cancel: CancellationToken,
    endpoint: quinn::Endpoint,
    tasks: Vec<JoinHandle<()>>,
    history: Option<Arc<crate::services::history::MetricsHistory>>,
}

/// Starts a controller on an initialized data directory, on its embedded store.
pub async fn start(config: ControllerConfig) -> anyhow::Result<Controller> {
    tls::install_crypto_provider();
    load_pricing(&config.data_dir)?;
    pki_files::load(&config.data_dir)?;
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&config.data_dir.join(STORE_FILE))?);
    start_with(config, store, None).await
}

/// Starts a controller on `store` (the leader of an etcd group, whose `group`
/// answers `controller list`; `None` for a single controller).
pub async fn start_with(
    config: ControllerConfig,
    store: Arc<dyn Store>,
    group: Option<Arc<crate::services::group::GroupView>>,
) -> anyhow::Result<Controller> {
    tls::install_crypto_provider();
    let pricing = load_pricing(&config.data_dir)?;
    let pki = pki_files::load(&config.data_dir)?;
    let registry = Arc::new(Registry::load(
        store.clone(),
        RegistryConfig {
            startup_grace: config.startup_grace,
            restart_grace: config.restart_grace,
            ..RegistryConfig::new(config.metrics_window, config.liveness.down_after)
        },
        Instant::now(),
    )?);
    let revoked_certs = crate::services::certs::load(store.as_ref())?;
    let cancel = CancellationToken::new();
    let history = if config.history.enabled {
        let h = Arc::new(crate::services::history::MetricsHistory::open(
            &config.data_dir,
            &config.history,
            cancel.clone(),
        )?);
        crate::services::history::log_opened(&h);
        registry.set_sink(h.clone());
        Some(h)
    } else {
        None
    };

    let endpoint = link::bind(
        &LinkConfig {
            listen: config.quic_listen,
            liveness: config.liveness,
            node_cert_ttl: config.node_cert_ttl,
        },
        &pki.server,
        &pki.ca.cert_pem,
        registry.revoked_names(),
        revoked_certs.clone(),
    )?;
    let quic_addr = endpoint.local_addr()?;

    let api_tcp = tokio::net::TcpListener::bind(config.api_listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on tcp {}: {e}", config.api_listen))?;
    let api_addr = api_tcp.local_addr()?;
    let api_tls = tls::server_config(
        &pki.server.cert_pem,
        &pki.server.key_pem,
        tls::revocation_checking_verifier(
            tls::fleet_client_verifier(&pki.ca.cert_pem, true)?,
            revoked_certs.clone(),
        ),
        &[b"h2", b"http/1.1"],
    )?;
    let listener = TlsListener::new(api_tcp, Arc::new(api_tls))?.refusing(revoked_certs.clone());
    let api_connections = listener.live_connections();

    let events = Arc::new(EventLog::open(store.clone(), events::DEFAULT_RETAIN)?);
    let workloads = Arc::new(Workloads::load(
        store.clone(),
        registry.clone(),
        events.clone(),
    )?);
    if let Some(h) = &history {
        let w = workloads.clone();
        h.set_jobs(Arc::new(move |id: &str| w.job_of(id)));
    }
    let autoscaler = Arc::new(
        Autoscaler::load(
            store.clone(),
            registry.clone(),
            workloads.clone(),
            events.clone(),
        )?
        .with_pricing(pricing.clone())
        .with_history(history.clone()),
    );
    let bundles = Arc::new(
        crate::state::bundles::BundleStore::open(&config.data_dir.join("bundles"))
            .map_err(|e| anyhow::anyhow!("checkpoint bundle store: {e}"))?,
    );
    workloads.set_checkpoints(bundles.clone());
    let secrets = Arc::new(crate::services::secrets::Secrets::load(
        store.clone(),
        secrets_key(&config)?,
    )?);
    workloads.set_secrets(secrets.clone());
    let images = Arc::new(
        crate::services::images::Images::open(&config.data_dir.join("images"), store.clone())
            .map_err(|e| anyhow::anyhow!("image store: {e}"))?,
    );
    let (spot_tx, spot_rx) = tokio::sync::mpsc::channel(crate::services::migrate::SPOT_QUEUE);
    let agents = Arc::new(Agents::default());
    let (ingress_tx, ingress_rx) =
        tokio::sync::watch::channel(Arc::new(novacron_common::wire::IngressTable::default()));
    let link_ctx = Arc::new(LinkContext {
        registry: registry.clone(),
        workloads: workloads.clone(),
        agents: agents.clone(),
        ca: pki.ca.clone(),
        node_cert_ttl: config.node_cert_ttl,
        bundles: Some(bundles.clone()),
        images: Some(images.clone()),
        spot: Some(spot_tx),
        revoked_certs: revoked_certs.clone(),
        events: events.clone(),
        wire_versions: config.wire_versions,
        version_refusals: Default::default(),
        ingress: ingress_rx,
    });
    let certs = Arc::new(crate::services::certs::CertRevocations::new(
        store.clone(),
        revoked_certs,
        api_connections,
        agents.clone(),
    ));
    let migrations = Arc::new(crate::services::migrate::Migrations::new(
        agents.clone(),
        workloads.clone(),
        registry.clone(),
        bundles,
        events.clone(),
    ));
    let quic_endpoint = config
        .advertise
        .clone()
        .unwrap_or_else(|| format!("{}:{}", config.server_name, quic_addr.port()));
    // One controller: always the leader. The singleton services run as one unit
    // while it leads.
    let leadership = Leadership::always();
    let index = Arc::new(crate::services::index::IndexWatch::new(store.clone()));
    let api_url = format!("https://{}:{}", config.server_name, api_addr.port());
    let alerts = crate::services::alerts::Alerts::open(
        store.clone(),
        events.clone(),
        config.alerts.clone(),
        api_url.clone(),
    )?;
    let api_state = Arc::new(ApiState {
        registry: registry.clone(),
        store: store.clone(),
        ca: pki.ca.clone(),
        fingerprint: pki.fingerprint.clone(),
        node_cert_ttl: config.node_cert_ttl,
        quic_endpoint,
        server_name: config.server_name.clone(),
        api_url,
        workloads: workloads.clone(),
        link: agents,
        events: events.clone(),
        pricing,
        autoscaler: autoscaler.clone(),
        migrations: migrations.clone(),
        certs,
        heavy: crate::services::heavy::HeavyWork::for_this_host(),
        leadership: leadership.clone(),
        index: index.clone(),
        secrets,
        images,
        group,
        history: history.clone(),
        alerts,
    });

    let mut dns_domain = novacron_dns::Name::from_ascii(&config.dns_domain)
        .map_err(|e| anyhow::anyhow!("dns_domain {:?}: {e}", config.dns_domain))?;
    dns_domain.set_fqdn(true);
    if let Some(addr) = config.dns_listen {
        let st = api_state.clone();
        let domain = dns_domain.clone();
        let zone = Arc::new(move || {
            Arc::new(novacron_dns::Zone {
                domain: domain.clone(),
                services: crate::http::services::current(&st),
            })
        });
        novacron_dns::serve(addr, novacron_dns::FleetDns::new(zone))
            .await
            .map_err(|e| anyhow::anyhow!("cannot serve DNS on udp and tcp {addr}: {e}"))?;
    }

    let mut tasks = vec![tokio::spawn(run_while_leader(
        leadership.clone(),
        cancel.clone(),
        singletons(
            workloads.clone(),
            migrations,
            spot_rx,
            autoscaler,
            api_state.clone(),
        ),
    ))];
    tasks.push(tokio::spawn(link::serve(endpoint.clone(), link_ctx)));
    let ingress_state = api_state.clone();
    let table_domain = dns_domain.to_string();
    tasks.push(tokio::spawn(crate::services::ingress::publish(
        move || {
            crate::services::ingress::table(
                &ingress_state.workloads.job_services(),
                &crate::http::services::current(&ingress_state),
                &table_domain,
            )
        },
        ingress_tx,
        cancel.clone(),
    )));
    tasks.push(tokio::spawn(index.run(cancel.clone())));
    if let Some(h) = &history {
        tasks.push(tokio::spawn(h.clone().run(events.clone(), cancel.clone())));
    }
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
        let mut ticker = Ticker::new(
            MARK_FLUSH_INTERVAL,
            MissedTickBehavior::Burst,
            flush_cancel.cancelled(),
        );
        while ticker.tick().await {
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
        leadership,
        events,
        cancel,
        endpoint,
        tasks,
        history,
    })
}

/// The services that run on the leading controller only, as one unit for
/// [`run_while_leader`]: the reconcile loop, migrations, the autoscaler, the pool
/// manager, the budget watch, the alert evaluation (with its sender) and the
/// idle stopper. Each start gets a fresh token; spot notices from
/// the link reach the migrations of the current term through a forwarder.
fn singletons(
    workloads: Arc<Workloads>,
    migrations: Arc<Migrations>,
    spot_rx: mpsc::Receiver<SpotEvent>,
    autoscaler: Arc<Autoscaler>,
    api_state: Arc<ApiState>,
) -> impl FnMut(CancellationToken) -> Vec<UnitTask> + Send {
    let spot_rx = Arc::new(tokio::sync::Mutex::new(spot_rx));
    move |term: CancellationToken| {
        let (spot_tx, term_spot_rx) = mpsc::channel(SPOT_QUEUE);
        let (spot_rx, forward_term) = (spot_rx.clone(), term.clone());
        let forward_spot: UnitTask = Box::pin(async move {
            let mut spot_rx = spot_rx.lock().await;
            loop {
                let event = tokio::select! {
                    event = spot_rx.recv() => event,
                    _ = forward_term.cancelled() => return,
                };
                let Some(event) = event else { return };
                if spot_tx.send(event).await.is_err() {
                    return;
                }
            }
        });
        vec![
            Box::pin(workloads.clone().run(term.clone())),
            Box::pin(migrations.clone().run(term_spot_rx, term.clone())),
            forward_spot,
            Box::pin(autoscaler.clone().run(term.clone())),
            Box::pin(pools::run(
                api_state.clone(),
                pools::DEFAULT_INTERVAL,
                term.clone(),
            )),
            Box::pin(budgets::run(
                api_state.clone(),
                budgets::DEFAULT_INTERVAL,
                term.clone(),
            )),
            Box::pin(crate::services::alert_eval::run(
                api_state.alerts.clone(),
                api_state.clone(),
                term.clone(),
            )),
            Box::pin(crate::services::idle::run(api_state.clone(), term)),
        ]
    }
}

impl Controller {
    /// Records that `member` was elected leader of its group with `epoch` (the
    /// election key's revision).
    pub fn record_election(&self, member: &str, epoch: i64) {
        let event = events::NewEvent::new(
            "controller.elected",
            member,
            format!("controller {member} was elected leader (epoch {epoch})"),
        )
        .detail("epoch", epoch.to_string());
        if let Err(error) = self.events.record(event) {
            warn!(%error, "cannot record the election");
        }
    }

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
        if let Some(h) = self.history {
            // Writes the open chunks (file I/O: off the async workers).
            let _ = tokio::task::spawn_blocking(move || h.close()).await;
        }
        info!("controller stopped");
    }
}

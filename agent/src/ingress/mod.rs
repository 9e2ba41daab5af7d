//! The agent's ingress: for each service a job publishes through it
//! (`spec.services[].ingress`), a listener on that port of this node that
//! balances over the service's healthy endpoints fleet-wide, wherever they run.
//! The controller sends the table ([`IngressTable`], level-triggered) on the link;
//! [`Ingress::apply`] hands it to the manager, which opens, updates and closes
//! listeners to match.
//!
//! The data plane runs on its own multi-threaded tokio runtime (thread names
//! `ingress`), started with the first table that names a service, so the agent's
//! control work (one thread) and client traffic never wait on each other.
//! Decisions are in [`balance`]; the proxying in [`proxy`]; counters in [`stats`].
//!
//! A port that cannot be bound (another process has it) or a TLS certificate
//! that cannot be read leaves that service unserved on this node, with a warning,
//! and is tried again every [`RETRY_EVERY`] and on every new table. A serving
//! listener's certificate and key files are checked as often: when they change
//! (a renewal) and make a valid identity, new handshakes use it; when they do
//! not, the listener keeps the identity it has and says why once.

pub mod balance;
pub mod proxy;
pub mod stats;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use novacron_common::wire::{
    IngressProtocol, IngressService, IngressTable, IngressTls, MAX_INGRESS_ENDPOINTS,
    MAX_INGRESS_SERVICES,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use balance::Balancer;
use proxy::{Served, Upstream};
use stats::ServiceStats;

/// How often listeners that could not open are tried again.
pub const RETRY_EVERY: Duration = Duration::from_secs(5);

/// The ingress of this agent.
#[derive(Debug)]
pub struct Ingress {
    address: IpAddr,
    workers: usize,
    table: watch::Sender<Arc<IngressTable>>,
    started: OnceLock<()>,
    shared: Arc<Shared>,
}

/// What the manager and the scrapes share.
#[derive(Debug, Default)]
struct Shared {
    /// Counters by service name (kept across listener restarts).
    stats: Mutex<BTreeMap<String, Arc<ServiceStats>>>,
    /// The services served now.
    served: Mutex<BTreeMap<String, Arc<Served>>>,
}

impl Ingress {
    /// An ingress that listens on `address` with `workers` threads once it has
    /// a service to serve.
    pub fn new(address: IpAddr, workers: usize) -> Arc<Ingress> {
        Arc::new(Ingress {
            address,
            workers: workers.max(1),
            table: watch::channel(Arc::new(IngressTable::default())).0,
            started: OnceLock::new(),
            shared: Arc::default(),
        })
    }

    /// Serves `table` from now on (bounded: services and endpoints beyond the
    /// protocol's limits are left out).
    pub fn apply(&self, mut table: IngressTable) {
        table.services.truncate(MAX_INGRESS_SERVICES);
        for s in &mut table.services {
            s.endpoints.truncate(MAX_INGRESS_ENDPOINTS);
        }
        if !table.services.is_empty() {
            self.start();
        }
        self.table.send_replace(Arc::new(table));
    }

    fn start(&self) {
        self.started.get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(self.workers)
                .thread_name("ingress")
                .enable_all()
                .build();
            let runtime = match runtime {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "ingress: cannot start its runtime; services are not served on this node");
                    return;
                }
            };
            let rx = self.table.subscribe();
            let shared = self.shared.clone();
            let address = self.address;
            let spawned = std::thread::Builder::new()
                .name("ingress-manager".into())
                .spawn(move || runtime.block_on(manage(rx, address, shared)));
            if let Err(e) = spawned {
                warn!(error = %e, "ingress: cannot start its thread; services are not served on this node");
            }
        });
    }

    /// Adds every service's samples of [`stats::FAMILIES`] to `out`, for the
    /// agent's `/metrics`; false (and nothing added) before the first service.
    pub fn collect(&self, node: &str, out: &mut novacron_common::exposition::Samples) -> bool {
        let served = lock(&self.shared.served).clone();
        let stats = lock(&self.shared.stats).clone();
        let rows: Vec<(String, &ServiceStats, stats::Gauges)> = stats
            .iter()
            .map(|(name, s)| {
                let gauges = served
                    .get(name)
                    .map(|svc| {
                        let b = lock(&svc.balancer);
                        stats::Gauges {
                            endpoints: b.listed(),
                            ejected: b.ejected(),
                        }
                    })
                    .unwrap_or_default();
                (name.clone(), s.as_ref(), gauges)
            })
            .collect();
        stats::collect(&rows, node, out);
        !rows.is_empty()
    }

    /// Requests answered for `service` so far (tests and diagnostics).
    pub fn requests(&self, service: &str) -> u64 {
        lock(&self.shared.stats)
            .get(service)
            .map_or(0, |s| s.requests())
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What a listener was opened for: a change closes it and opens another.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ListenerSpec {
    name: String,
    protocol: IngressProtocol,
    tls: Option<IngressTls>,
}

struct Listener {
    spec: ListenerSpec,
    served: Arc<Served>,
    cancel: CancellationToken,
    /// The TLS identity its handshakes use, and the files' stamp it was read at.
    identity: Option<(Arc<Identity>, Option<FileStamp>)>,
}

/// The size and modification time of a TLS listener's certificate and key files.
type FileStamp = [(u64, Option<std::time::SystemTime>); 2];

fn stamp(tls: &IngressTls) -> Option<FileStamp> {
    let one = |path: &str| {
        let m = std::fs::metadata(path).ok()?;
        Some((m.len(), m.modified().ok()))
    };
    Some([one(&tls.cert_file)?, one(&tls.key_file)?])
}

/// A TLS listener's identity, swapped when its files change.
#[derive(Debug)]
struct Identity {
    current: Mutex<Arc<rustls::sign::CertifiedKey>>,
}

impl rustls::server::ResolvesServerCert for Identity {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(lock(&self.current).clone())
    }
}

/// Swaps in `tls`'s files when they changed since `seen` and make a valid
/// identity; `seen` becomes their stamp either way, so a bad file is reported
/// once.
fn reload(tls: &IngressTls, identity: &Identity, seen: &mut Option<FileStamp>, service: &str) {
    let now = stamp(tls);
    if now.is_none() || now == *seen {
        return;
    }
    *seen = now;
    match certified_key(tls) {
        Ok(key) => {
            *lock(&identity.current) = Arc::new(key);
            info!(service, cert = %tls.cert_file, "ingress: the TLS certificate changed; new connections use it");
        }
        Err(error) => {
            warn!(service, %error, "ingress: the TLS files changed but do not make an identity; keeping the one in use");
        }
    }
}

async fn manage(mut rx: watch::Receiver<Arc<IngressTable>>, address: IpAddr, shared: Arc<Shared>) {
    let client = proxy::upstream_client();
    let mut listeners: BTreeMap<u16, Listener> = BTreeMap::new();
    let mut failures: BTreeMap<u16, String> = BTreeMap::new();
    let mut retry = tokio::time::interval(RETRY_EVERY);
    loop {
        let table = rx.borrow_and_update().clone();
        reconcile(
            &table,
            address,
            &client,
            &shared,
            &mut listeners,
            &mut failures,
        )
        .await;
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { break },
            _ = retry.tick() => {}
        }
    }
    for (_, l) in listeners {
        l.cancel.cancel();
    }
}

async fn reconcile(
    table: &IngressTable,
    address: IpAddr,
    client: &Upstream,
    shared: &Shared,
    listeners: &mut BTreeMap<u16, Listener>,
    failures: &mut BTreeMap<u16, String>,
) {
    let wanted: BTreeMap<u16, &IngressService> =
        table.services.iter().map(|s| (s.port, s)).collect();
    listeners.retain(|port, l| {
        let keep = wanted.get(port).is_some_and(|s| spec_of(s) == l.spec);
        if !keep {
            info!(service = %l.spec.name, port, "ingress: closing the listener (draining its connections)");
            l.cancel.cancel();
        }
        keep
    });
    failures.retain(|port, _| wanted.contains_key(port));
    for (port, service) in &wanted {
        if let Some(l) = listeners.get_mut(port) {
            lock(&l.served.balancer).set_endpoints(&service.endpoints);
            if let (Some(tls), Some((identity, seen))) = (&service.tls, &mut l.identity) {
                reload(tls, identity, seen, &service.name);
            }
            continue;
        }
        match open(service, address, client, shared).await {
            Ok(l) => {
                if failures.remove(port).is_some() {
                    info!(service = %service.name, port, "ingress: listener open after earlier failures");
                }
                listeners.insert(*port, l);
            }
            Err(error) => {
                if failures.get(port) != Some(&error) {
                    warn!(service = %service.name, port, %error, "ingress: cannot serve this service on this node; trying again");
                }
                failures.insert(*port, error);
            }
        }
    }
    let served: BTreeMap<String, Arc<Served>> = listeners
        .values()
        .map(|l| (l.spec.name.clone(), l.served.clone()))
        .collect();
    *lock(&shared.served) = served;
}

fn spec_of(s: &IngressService) -> ListenerSpec {
    ListenerSpec {
        name: s.name.clone(),
        protocol: s.protocol,
        tls: s.tls.clone(),
    }
}

async fn open(
    service: &IngressService,
    address: IpAddr,
    client: &Upstream,
    shared: &Shared,
) -> Result<Listener, String> {
    let (acceptor, identity) = match &service.tls {
        Some(tls) => {
            let seen = stamp(tls);
            let identity = Arc::new(Identity {
                current: Mutex::new(Arc::new(certified_key(tls)?)),
            });
            (
                Some(acceptor(identity.clone(), service.protocol)?),
                Some((identity, seen)),
            )
        }
        None => (None, None),
    };
    let addr = SocketAddr::new(address, service.port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let stats = lock(&shared.stats)
        .entry(service.name.clone())
        .or_default()
        .clone();
    let served = Arc::new(Served {
        name: service.name.clone(),
        balancer: Mutex::new(Balancer::new(&service.endpoints)),
        stats,
    });
    let cancel = CancellationToken::new();
    let http = (service.protocol == IngressProtocol::Http).then(|| client.clone());
    tokio::spawn(proxy::serve(
        listener,
        served.clone(),
        http,
        acceptor,
        cancel.clone(),
    ));
    Ok(Listener {
        spec: spec_of(service),
        served,
        cancel,
        identity,
    })
}

/// The largest certificate chain or key file read.
const MAX_PEM_FILE: u64 = 1 << 20;

fn read_pem(path: &str, what: &str) -> Result<String, String> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot read the {what} {path}: {e}"))?;
    let mut text = String::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the {what} {path}: {e}"))?;
    if text.len() as u64 > MAX_PEM_FILE {
        return Err(format!(
            "the {what} {path} is larger than {MAX_PEM_FILE} bytes"
        ));
    }
    Ok(text)
}

/// The identity `tls`'s files make: the chain, and a signing key that matches
/// its first certificate.
fn certified_key(tls: &IngressTls) -> Result<rustls::sign::CertifiedKey, String> {
    let chain = read_pem(&tls.cert_file, "certificate chain")?;
    let key = read_pem(&tls.key_file, "private key")?;
    let certs = novacron_common::tls::certs_from_pem(&chain, "the ingress certificate chain")
        .map_err(|e| format!("{}: {e}", tls.cert_file))?;
    let key = novacron_common::tls::key_from_pem(&key, "the ingress key")
        .map_err(|e| format!("{}: {e}", tls.key_file))?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(certs, key, &provider).map_err(|e| {
        format!(
            "the certificate {} and key {} do not make a TLS identity: {e}",
            tls.cert_file, tls.key_file
        )
    })
}

/// A TLS acceptor over `identity` (ALPN h2 and http/1.1 for HTTP).
fn acceptor(
    identity: Arc<Identity>,
    protocol: IngressProtocol,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map(|b| b.with_no_client_auth().with_cert_resolver(identity))
        .map_err(|e| format!("the TLS protocol versions: {e}"))?;
    if protocol == IngressProtocol::Http {
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

//! The fleet registry: every known node, its live connection, its liveness and its
//! recent metrics window. Node records persist through the [`Store`]; the metrics
//! window lives in memory only.
//!
//! **Architecture Invariant:** a node enters the registry only through enrollment
//! (a signed certificate) and is named only by its certificate.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime};

use novacron_api::{ControllerStats, MetricsWindow, NodeView};
use novacron_common::clock::unix_ms;
use novacron_common::cost::percentile;
use novacron_common::fleet::{NodeStatus, node_status};
use novacron_common::pki::CertInfo;
use novacron_common::sync::lock;
use novacron_common::wire::{CloseCode, Hello, ImageInventory, MetricsBatch, NodeSample};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tracing::{info, warn};

use crate::state::store::{MetricMark, NodeRecord, Revocation, Store, StoreError};

/// Default number of whole samples kept in memory per node (`GET
/// /v1/nodes/{name}/metrics`, the newest reading of `GET /v1/nodes`). History
/// lives in the metrics history ([`SampleSink`]), compressed and on disk.
pub const DEFAULT_METRICS_WINDOW: usize = 10;
/// How many ingest latencies the percentiles are computed over.
pub const LATENCY_WINDOW: usize = 65_536;

/// The buckets of the ingest latency histogram: 1 ms doubling to about 65 s
/// (a sample replayed after a longer outage lands in `+Inf`).
pub fn ingest_latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// How long, after the controller starts, a node that has not reconnected yet
/// gets on top of `down_after` before it is `down` (agents reconnect within their
/// reconnect backoff, at most 5 s by default).
pub const DEFAULT_STARTUP_GRACE: Duration = Duration::from_secs(10);
/// How long a node whose agent stopped cleanly (a restart or an upgrade; its
/// containers keep running) gets on top of `down_after` before it is `down`.
pub const DEFAULT_RESTART_GRACE: Duration = Duration::from_secs(30);

/// Registry settings.
#[derive(Debug, Clone, Copy)]
pub struct RegistryConfig {
    /// Samples kept per node.
    pub metrics_window: usize,
    /// Time from a lost connection to `down`.
    pub down_after: Duration,
    /// Extra time for nodes not yet reconnected after the controller started.
    pub startup_grace: Duration,
    /// Extra time for a node whose agent closed its connection cleanly.
    pub restart_grace: Duration,
}

impl RegistryConfig {
    /// Default graces with the given window and `down_after`.
    pub fn new(metrics_window: usize, down_after: Duration) -> RegistryConfig {
        RegistryConfig {
            metrics_window,
            down_after,
            startup_grace: DEFAULT_STARTUP_GRACE,
            restart_grace: DEFAULT_RESTART_GRACE,
        }
    }
}

/// A live agent connection as the registry sees it.
pub trait LiveLink: Send + Sync + std::fmt::Debug {
    /// Closes the connection with `code`.
    fn close(&self, code: CloseCode, reason: &str);
}

impl LiveLink for quinn::Connection {
    fn close(&self, code: CloseCode, reason: &str) {
        quinn::Connection::close(self, code.code().into(), reason.as_bytes());
    }
}

/// What ingesting a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IngestOutcome {
    /// New samples kept.
    pub accepted: u64,
    /// Samples already seen, skipped.
    pub duplicates: u64,
    /// Sequence numbers skipped over (the agent dropped them).
    pub missed: u64,
}

/// A node as placement sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacementNode {
    /// Name.
    pub name: String,
    /// Liveness.
    pub status: NodeStatus,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Allocatable resources.
    pub capacity: novacron_common::wire::Capacity,
    /// Cordoned (draining): the scheduler places nothing new on it.
    pub cordoned: bool,
    /// The images it reported holding (sorted references).
    pub images: Arc<ImageInventory>,
}

impl PlacementNode {
    /// Whether the node reported holding `image` (a `repo:tag` or a digest
    /// reference, as the job names it).
    pub fn holds_image(&self, image: &str) -> bool {
        let wanted = if image.contains(':') || image.contains('@') {
            std::borrow::Cow::Borrowed(image)
        } else {
            std::borrow::Cow::Owned(format!("{image}:latest"))
        };
        self.images
            .images
            .binary_search_by(|i| i.as_str().cmp(&wanted))
            .is_ok()
    }
}

/// Registry errors.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The node is not enrolled.
    #[error("unknown node {0:?}: it has not enrolled with this controller")]
    UnknownNode(String),
    /// The node is revoked.
    #[error("node {0:?} is revoked")]
    Revoked(String),
    /// Persisting failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Names of revoked nodes, shared with the TLS layer so that revoked certificates
/// are refused during the handshake.
#[derive(Debug, Default)]
pub struct RevokedNames(RwLock<HashSet<String>>);

impl RevokedNames {
    /// Whether `name` is revoked.
    pub fn contains(&self, name: &str) -> bool {
        self.0.read().map(|s| s.contains(name)).unwrap_or(true)
    }

    fn insert(&self, name: &str) {
        if let Ok(mut set) = self.0.write() {
            set.insert(name.to_string());
        }
    }
}

/// Where accepted samples go besides the window: the metrics history. Called
/// once per new sample (never for a duplicate), in order, after the registry's
/// lock is released, on the connection's task: it must be quick.
pub trait SampleSink: Send + Sync + std::fmt::Debug {
    /// Records `sample` of `node`.
    fn record(&self, node: &str, sample: &NodeSample);
}

/// The fleet registry.
#[derive(Debug)]
pub struct Registry {
    /// The metrics history, once the controller set it.
    sink: std::sync::OnceLock<Arc<dyn SampleSink>>,
    inner: Mutex<Inner>,
    store: Arc<dyn Store>,
    config: RegistryConfig,
    revoked: Arc<RevokedNames>,
    samples_ingested: AtomicU64,
    duplicates_skipped: AtomicU64,
    latencies: Mutex<VecDeque<f32>>,
    /// Every ingest latency since the controller started, in seconds (the
    /// Prometheus histogram; `latencies` is the window of `/v1/stats`).
    latency_histogram: Histogram,
    /// Nodes the scheduler must not place on (drained, or cordoned by an
    /// operator); mirrors [`NodeRecord::cordoned`], which is what persists.
    cordoned: Mutex<HashSet<String>>,
    /// Nodes their pool keeps stopped in its warm pool (the pool manager says,
    /// each pass; in memory).
    warm: Mutex<HashSet<String>>,
    /// Spot interruption notices: node → deadline (Unix ms), as the agents said.
    spot: Mutex<HashMap<String, u64>>,
}

#[derive(Debug)]
struct Inner {
    nodes: HashMap<String, NodeState>,
    next_conn_id: u64,
}

#[derive(Debug)]
struct NodeState {
    record: NodeRecord,
    link: Option<(u64, Arc<dyn LiveLink>)>,
    since: Instant,
    /// Added to `down_after` while disconnected: the startup or restart grace.
    grace: Duration,
    address: Option<SocketAddr>,
    window: VecDeque<NodeSample>,
    mark: MetricMark,
    mark_dirty: bool,
    /// The images the node last reported (in memory: nodes report again on
    /// connect).
    images: Arc<ImageInventory>,
}

/// Where a node is reached, for the service catalog ([`Registry::reach`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeReach {
    /// The node's name.
    pub name: String,
    /// The address its agent connects from, while it has one.
    pub address: Option<SocketAddr>,
    /// Its `zone` label.
    pub zone: Option<String>,
    /// Its status now.
    pub status: NodeStatus,
}

impl Registry {
    /// Loads the registry from `store`. Every node starts disconnected at `now`.
    pub fn load(
        store: Arc<dyn Store>,
        config: RegistryConfig,
        now: Instant,
    ) -> Result<Registry, StoreError> {
        let revoked = Arc::new(RevokedNames::default());
        for r in store.revocations()? {
            revoked.insert(&r.name);
        }
        let marks = store.metric_marks()?;
        let records = store.nodes()?;
        let cordoned: HashSet<String> = records
            .iter()
            .filter(|r| r.cordoned)
            .map(|r| r.name.clone())
            .collect();
        let nodes = records
            .into_iter()
            .map(|record| {
                let mark = marks.get(&record.name).copied().unwrap_or_default();
                let state = NodeState {
                    record,
                    link: None,
                    since: now,
                    grace: config.startup_grace,
                    address: None,
                    window: VecDeque::new(),
                    mark,
                    mark_dirty: false,
                    images: Arc::default(),
                };
                (state.record.name.clone(), state)
            })
            .collect();
        Ok(Registry {
            sink: std::sync::OnceLock::new(),
            inner: Mutex::new(Inner {
                nodes,
                next_conn_id: 1,
            }),
            store,
            config,
            revoked,
            samples_ingested: AtomicU64::new(0),
            duplicates_skipped: AtomicU64::new(0),
            latencies: Mutex::new(VecDeque::with_capacity(LATENCY_WINDOW)),
            latency_histogram: ingest_latency_histogram(),
            cordoned: Mutex::new(cordoned),
            warm: Mutex::new(HashSet::new()),
            spot: Mutex::new(HashMap::new()),
        })
    }

    /// Cordons `name` (nothing new is placed on it) or lifts that. The cordon is
    /// persisted before it takes effect, so it outlives a restart.
    pub fn set_cordoned(&self, name: &str, cordoned: bool) -> Result<(), RegistryError> {
        let mut inner = self.lock();
        let state = inner
            .nodes
            .get_mut(name)
            .ok_or_else(|| RegistryError::UnknownNode(name.to_string()))?;
        if state.record.cordoned != cordoned {
            let mut record = state.record.clone();
            record.cordoned = cordoned;
            self.store.upsert_node(&record)?;
            state.record = record;
        }
        let mut set = lock(&self.cordoned);
        if cordoned {
            set.insert(name.to_string());
        } else {
            set.remove(name);
        }
        Ok(())
    }

    /// Marks `name` as stopped into its pool's warm pool by a scale-in, or not
    /// (persisted first).
    pub fn set_parked(&self, name: &str, parked: bool) -> Result<(), RegistryError> {
        let mut inner = self.lock();
        let state = inner
            .nodes
            .get_mut(name)
            .ok_or_else(|| RegistryError::UnknownNode(name.to_string()))?;
        if state.record.parked != parked {
            let mut record = state.record.clone();
            record.parked = parked;
            self.store.upsert_node(&record)?;
            state.record = record;
        }
        Ok(())
    }

    /// Whether `name` was stopped into its pool's warm pool by a scale-in.
    pub fn is_parked(&self, name: &str) -> bool {
        self.lock().nodes.get(name).is_some_and(|s| s.record.parked)
    }

    /// Marks `name` as kept stopped in its pool's warm pool, or not.
    pub fn set_warm(&self, name: &str, warm: bool) {
        let mut set = lock(&self.warm);
        if warm {
            set.insert(name.to_string());
        } else {
            set.remove(name);
        }
    }

    /// Records a spot interruption notice from `name`: it goes at `deadline_unix_ms`.
    pub fn set_spot_notice(&self, name: &str, deadline_unix_ms: u64) {
        let mut spot = lock(&self.spot);
        spot.insert(name.to_string(), deadline_unix_ms);
        // Bounded by the fleet: forget the notices of nodes no longer known.
        let known: HashSet<String> = self.lock().nodes.keys().cloned().collect();
        spot.retain(|n, _| known.contains(n));
    }

    /// The deadline of `name`'s spot interruption notice, if it sent one.
    pub fn spot_deadline(&self, name: &str) -> Option<u64> {
        lock(&self.spot).get(name).copied()
    }

    /// Whether `name` is cordoned.
    pub fn is_cordoned(&self, name: &str) -> bool {
        lock(&self.cordoned).contains(name)
    }

    /// The revoked-name set, for the TLS verifier.
    pub fn revoked_names(&self) -> Arc<RevokedNames> {
        self.revoked.clone()
    }

    /// Records a (re-)enrollment: a node certificate was just signed for `name`.
    pub fn enrolled(
        &self,
        name: &str,
        cert: &CertInfo,
        now: SystemTime,
    ) -> Result<(), RegistryError> {
        if self.revoked.contains(name) {
            return Err(RegistryError::Revoked(name.to_string()));
        }
        // A new enrollment is a new machine: an old notice no longer applies.
        lock(&self.spot).remove(name);
        let mut inner = self.lock();
        let state = inner
            .nodes
            .entry(name.to_string())
            .or_insert_with(|| NodeState {
                record: NodeRecord {
                    name: name.to_string(),
                    labels: Default::default(),
                    capacity: Default::default(),
                    capabilities: Default::default(),
                    agent_version: String::new(),
                    enrolled_at_unix_ms: unix_ms(now),
                    last_seen_unix_ms: None,
                    cert_serial: None,
                    cert_expires_unix_ms: None,
                    samples_dropped: 0,
                    cordoned: false,
                    parked: false,
                },
                link: None,
                since: Instant::now(),
                grace: Duration::ZERO,
                address: None,
                window: VecDeque::new(),
                mark: MetricMark::default(),
                mark_dirty: false,
                images: Arc::default(),
            });
        state.record.cert_serial = Some(cert.serial.clone());
        state.record.cert_expires_unix_ms = Some(unix_ms(cert.not_after));
        self.store.upsert_node(&state.record)?;
        Ok(())
    }

    /// Registers a new live connection of `name` after its `Hello`. Any previous
    /// connection of the node is closed. Returns the connection id and the first
    /// metrics sequence number the controller still needs from this agent instance.
    pub fn connect(
        &self,
        name: &str,
        hello: &Hello,
        link: Arc<dyn LiveLink>,
        address: SocketAddr,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(u64, u64), RegistryError> {
        if self.revoked.contains(name) {
            return Err(RegistryError::Revoked(name.to_string()));
        }
        let mut inner = self.lock();
        let conn_id = inner.next_conn_id;
        inner.next_conn_id += 1;
        let state = inner
            .nodes
            .get_mut(name)
            .ok_or_else(|| RegistryError::UnknownNode(name.to_string()))?;
        if let Some((_, old)) = state.link.take() {
            old.close(
                CloseCode::Replaced,
                "a newer connection of this node replaced this one",
            );
        }
        state.link = Some((conn_id, link));
        state.since = now;
        state.address = Some(address);
        let instance = hello.instance;
        if state.mark.instance != instance {
            // A new agent process: its sequence numbers start over.
            state.mark = MetricMark {
                instance,
                next_seq: 0,
            };
            state.mark_dirty = true;
        }
        let r = &mut state.record;
        r.labels = hello.labels.clone();
        r.capacity = hello.capacity.clone();
        r.capabilities = hello.capabilities.clone();
        r.capabilities.bound();
        r.agent_version = hello.agent_version.clone();
        r.last_seen_unix_ms = Some(unix_ms(wall));
        let record = r.clone();
        let next_seq = state.mark.next_seq;
        // Persist without holding the registry lock: ingest must not wait on disk.
        drop(inner);
        self.store.upsert_node(&record)?;
        info!(node = name, %address, conn = conn_id, "node connected");
        Ok((conn_id, next_seq))
    }

    /// Records that connection `conn_id` of `name` ended.
    /// `clean` is true when the agent closed the connection itself in an orderly
    /// way (it is restarting); the node then gets the restart grace.
    pub fn disconnect(&self, name: &str, conn_id: u64, now: Instant, clean: bool) {
        let mut inner = self.lock();
        let Some(state) = inner.nodes.get_mut(name) else {
            return;
        };
        if state.link.as_ref().is_some_and(|(id, _)| *id == conn_id) {
            state.link = None;
            state.since = now;
            state.grace = if clean {
                self.config.restart_grace
            } else {
                Duration::ZERO
            };
            if let Err(error) = self.store.upsert_node(&state.record) {
                warn!(node = name, %error, "cannot persist node at disconnect");
            }
            info!(node = name, conn = conn_id, "node disconnected");
        }
    }

    /// Sends every accepted sample to `sink` from now on (once; later calls are
    /// ignored).
    pub fn set_sink(&self, sink: Arc<dyn SampleSink>) {
        let _ = self.sink.set(sink);
    }

    /// Adds a metrics batch from connection `conn_id`, skipping samples already seen.
    pub fn ingest(
        &self,
        name: &str,
        conn_id: u64,
        batch: MetricsBatch,
        wall: SystemTime,
    ) -> IngestOutcome {
        let now_ms = unix_ms(wall);
        let mut out = IngestOutcome::default();
        let mut latencies = Vec::with_capacity(batch.samples.len());
        let mut accepted = Vec::new();
        {
            let mut inner = self.lock();
            let Some(state) = inner.nodes.get_mut(name) else {
                return out;
            };
            if state.link.as_ref().is_none_or(|(id, _)| *id != conn_id) {
                return out; // a stale connection's last batch
            }
            state.record.samples_dropped = batch.dropped_total;
            state.record.last_seen_unix_ms = Some(now_ms);
            for sample in batch.samples {
                if sample.seq < state.mark.next_seq {
                    out.duplicates += 1;
                    continue;
                }
                out.missed += sample.seq - state.mark.next_seq;
                state.mark.next_seq = sample.seq + 1;
                state.mark_dirty = true;
                latencies.push(now_ms.saturating_sub(sample.at_unix_ms) as f32);
                if self.sink.get().is_some() {
                    accepted.push(sample.clone());
                }
                if state.window.len() >= self.config.metrics_window {
                    state.window.pop_front();
                }
                state.window.push_back(sample);
                out.accepted += 1;
            }
        }
        if let Some(sink) = self.sink.get() {
            for sample in &accepted {
                sink.record(name, sample);
            }
        }
        if out.missed > 0 {
            warn!(
                node = name,
                missed = out.missed,
                "gap in metrics: the agent dropped samples while disconnected"
            );
        }
        self.samples_ingested
            .fetch_add(out.accepted, Ordering::Relaxed);
        self.duplicates_skipped
            .fetch_add(out.duplicates, Ordering::Relaxed);
        for l in &latencies {
            self.latency_histogram.observe(f64::from(*l) / 1000.0);
        }
        if let Ok(mut ring) = self.latencies.lock() {
            for l in latencies {
                if ring.len() >= LATENCY_WINDOW {
                    ring.pop_front();
                }
                ring.push_back(l);
            }
        }
        out
    }

    /// The histogram of every ingest latency since the controller started, in
    /// seconds (shared: observations made later show in the returned handle).
    pub fn ingest_latency(&self) -> Histogram {
        self.latency_histogram.clone()
    }

    /// Revokes `name`: persists it, refuses its certificates from now on and closes
    /// its live connection.
    pub fn revoke(&self, revocation: &Revocation) -> Result<(), RegistryError> {
        let mut inner = self.lock();
        let state = inner
            .nodes
            .get_mut(&revocation.name)
            .ok_or_else(|| RegistryError::UnknownNode(revocation.name.clone()))?;
        self.store.revoke(revocation)?;
        self.revoked.insert(&revocation.name);
        if let Some((_, link)) = state.link.take() {
            link.close(CloseCode::Revoked, "this node's certificate was revoked");
        }
        // Released before the side sets, which are taken before it elsewhere.
        drop(inner);
        lock(&self.warm).remove(&revocation.name);
        lock(&self.spot).remove(&revocation.name);
        warn!(node = %revocation.name, by = %revocation.by, reason = %revocation.reason, "node revoked");
        Ok(())
    }

    /// Persists the metrics high-water marks that changed since the last call.
    pub fn flush_marks(&self) -> Result<(), StoreError> {
        let marks: Vec<(String, MetricMark)> = {
            let mut inner = self.lock();
            inner
                .nodes
                .values_mut()
                .filter(|s| s.mark_dirty)
                .map(|s| {
                    s.mark_dirty = false;
                    (s.record.name.clone(), s.mark)
                })
                .collect()
        };
        if marks.is_empty() {
            return Ok(());
        }
        self.store.save_metric_marks(&marks)
    }

    /// The status of `name` at `now`, if known.
    pub fn status(&self, name: &str, now: Instant) -> Option<NodeStatus> {
        let inner = self.lock();
        inner.nodes.get(name).map(|s| self.status_of(s, now))
    }

    /// Names of connected nodes.
    pub fn connected(&self) -> Vec<String> {
        let inner = self.lock();
        inner
            .nodes
            .values()
            .filter(|s| s.link.is_some())
            .map(|s| s.record.name.clone())
            .collect()
    }

    /// Where every node is reached and whether it is up, for the service
    /// catalog (DNS, ingress, `/v1/services`; the ingress rebuilds it five
    /// times a second). Cheap: it copies no sample, label map or capability,
    /// so the lock it takes is short and agents keep ingesting.
    pub fn reach(&self, now: Instant) -> Vec<NodeReach> {
        let inner = self.lock();
        inner
            .nodes
            .values()
            .map(|s| NodeReach {
                name: s.record.name.clone(),
                address: s.address,
                zone: s.record.labels.get("zone").cloned(),
                status: self.status_of(s, now),
            })
            .collect()
    }

    /// All nodes as the API shows them, sorted by name.
    pub fn views(&self, now: Instant) -> Vec<NodeView> {
        let inner = self.lock();
        let mut views: Vec<_> = inner.nodes.values().map(|s| self.view_of(s, now)).collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }

    /// What placement needs of every node (no samples), sorted by name. Cheap:
    /// the reconcile loop calls it every tick while agents keep ingesting.
    pub fn placement_nodes(&self, now: Instant) -> Vec<PlacementNode> {
        let cordoned = lock(&self.cordoned).clone();
        let mut nodes: Vec<PlacementNode> = {
            let inner = self.lock();
            inner
                .nodes
                .values()
                .map(|s| PlacementNode {
                    name: s.record.name.clone(),
                    status: self.status_of(s, now),
                    labels: {
                        let mut labels = s.record.labels.clone();
                        // Nodes that run virtual machines carry the VM label, its
                        // value the accelerator: VM jobs are constrained to it.
                        if let Some(vm) = &s.record.capabilities.vm {
                            labels.insert(
                                novacron_common::manifest::VM_NODE_LABEL.to_owned(),
                                vm.accelerator.clone(),
                            );
                            if let Some(range) = &vm.bridge {
                                labels.insert(
                                    novacron_common::manifest::VM_BRIDGE_LABEL.to_owned(),
                                    range.replace('/', "_"),
                                );
                            }
                        }
                        labels
                    },
                    capacity: s.record.capacity.clone(),
                    cordoned: cordoned.contains(&s.record.name),
                    images: s.images.clone(),
                })
                .collect()
        };
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        nodes
    }

    /// Takes a node's image inventory (sorted and bounded here too).
    pub fn set_images(&self, name: &str, mut inventory: ImageInventory) {
        inventory
            .images
            .truncate(novacron_common::wire::MAX_INVENTORY_IMAGES);
        inventory.images.sort();
        inventory.images.dedup();
        if let Some(s) = self.lock().nodes.get_mut(name) {
            s.images = Arc::new(inventory);
        }
    }

    /// The images `name` last reported.
    pub fn images(&self, name: &str) -> Option<Arc<ImageInventory>> {
        self.lock().nodes.get(name).map(|s| s.images.clone())
    }

    /// One node as the API shows it.
    pub fn view(&self, name: &str, now: Instant) -> Option<NodeView> {
        let inner = self.lock();
        inner.nodes.get(name).map(|s| self.view_of(s, now))
    }

    /// The metrics window of `name`.
    pub fn window(&self, name: &str) -> Option<MetricsWindow> {
        let inner = self.lock();
        inner.nodes.get(name).map(|s| MetricsWindow {
            node: name.to_string(),
            samples: s.window.iter().cloned().collect(),
        })
    }

    /// Ingest statistics.
    pub fn stats(&self) -> ControllerStats {
        let connected = self
            .lock()
            .nodes
            .values()
            .filter(|s| s.link.is_some())
            .count() as u64;
        // `percentile` sorts its own copy.
        let lat: Vec<f32> = self
            .latencies
            .lock()
            .map(|r| r.iter().copied().collect())
            .unwrap_or_default();
        ControllerStats {
            connected_agents: connected,
            samples_ingested: self.samples_ingested.load(Ordering::Relaxed),
            duplicates_skipped: self.duplicates_skipped.load(Ordering::Relaxed),
            ingest_latency_p50_ms: percentile(&lat, 50.0).map_or(0.0, f64::from),
            ingest_latency_p99_ms: percentile(&lat, 99.0).map_or(0.0, f64::from),
            ingest_latency_count: lat.len() as u64,
        }
    }

    /// Forgets the recorded latencies of [`Registry::stats`] (benchmarks call this
    /// after warm-up); the Prometheus histogram, a counter, keeps them.
    pub fn reset_latencies(&self) {
        if let Ok(mut r) = self.latencies.lock() {
            r.clear();
        }
    }

    fn status_of(&self, s: &NodeState, now: Instant) -> NodeStatus {
        node_status(
            s.link.is_some(),
            s.since,
            now,
            self.config.down_after.saturating_add(s.grace),
        )
    }

    fn view_of(&self, s: &NodeState, now: Instant) -> NodeView {
        let r = &s.record;
        NodeView {
            name: r.name.clone(),
            status: self.status_of(s, now),
            labels: r.labels.clone(),
            capacity: r.capacity.clone(),
            capabilities: r.capabilities.clone(),
            agent_version: r.agent_version.clone(),
            address: s.address.map(|a| a.to_string()),
            enrolled_at_unix_ms: r.enrolled_at_unix_ms,
            last_seen_unix_ms: r.last_seen_unix_ms,
            cert_expires_unix_ms: r.cert_expires_unix_ms,
            samples_dropped: r.samples_dropped,
            cordoned: r.cordoned,
            warm: lock(&self.warm).contains(&r.name),
            latest: s.window.back().cloned(),
            images: s.images.images.len(),
            image_bytes: s.images.bytes,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock is a bug; the data is still consistent
        // (every mutation is a single assignment), so keep serving.
        novacron_common::sync::lock(&self.inner)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use novacron_common::wire::{Capabilities, Capacity, PROTOCOL_VERSION};

    use super::*;
    use crate::state::store::MemoryStore;

    #[derive(Debug, Default)]
    struct FakeLink(AtomicBool);
    impl LiveLink for FakeLink {
        fn close(&self, _: CloseCode, _: &str) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn hello(name: &str, instance: u64) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "test".into(),
            node_name: name.into(),
            instance,
            labels: Default::default(),
            capacity: Capacity::default(),
            capabilities: Capabilities::default(),
        }
    }

    fn batch(seqs: std::ops::Range<u64>) -> MetricsBatch {
        MetricsBatch {
            samples: seqs
                .map(|seq| NodeSample {
                    seq,
                    ..NodeSample::default()
                })
                .collect(),
            dropped_total: 0,
        }
    }

    fn registry(store: Arc<dyn Store>) -> Registry {
        Registry::load(
            store,
            RegistryConfig {
                startup_grace: Duration::ZERO,
                ..RegistryConfig::new(10, Duration::from_secs(1))
            },
            Instant::now(),
        )
        .expect("load")
    }

    fn cert() -> CertInfo {
        CertInfo {
            serial: "01".into(),
            not_before: SystemTime::now(),
            not_after: SystemTime::now() + Duration::from_secs(60),
        }
    }

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 1))
    }

    #[test]
    fn unknown_nodes_cannot_connect() {
        let r = registry(Arc::new(MemoryStore::default()));
        let err = r
            .connect(
                "ghost",
                &hello("ghost", 1),
                Arc::new(FakeLink::default()),
                addr(),
                Instant::now(),
                SystemTime::now(),
            )
            .expect_err("not enrolled");
        assert!(matches!(err, RegistryError::UnknownNode(_)));
    }

    #[test]
    fn duplicates_are_skipped_and_gaps_counted() {
        let r = registry(Arc::new(MemoryStore::default()));
        r.enrolled("n1", &cert(), SystemTime::now())
            .expect("enroll");
        let (conn, next) = r
            .connect(
                "n1",
                &hello("n1", 7),
                Arc::new(FakeLink::default()),
                addr(),
                Instant::now(),
                SystemTime::now(),
            )
            .expect("connect");
        assert_eq!(next, 0);
        let a = r.ingest("n1", conn, batch(0..5), SystemTime::now());
        assert_eq!(
            a,
            IngestOutcome {
                accepted: 5,
                duplicates: 0,
                missed: 0
            }
        );
        let b = r.ingest("n1", conn, batch(3..8), SystemTime::now());
        assert_eq!(
            b,
            IngestOutcome {
                accepted: 3,
                duplicates: 2,
                missed: 0
            }
        );
        let c = r.ingest("n1", conn, batch(10..12), SystemTime::now());
        assert_eq!(
            c,
            IngestOutcome {
                accepted: 2,
                duplicates: 0,
                missed: 2
            }
        );
        let seqs: Vec<u64> = r
            .window("n1")
            .expect("known")
            .samples
            .iter()
            .map(|s| s.seq)
            .collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 4, 5, 6, 7, 10, 11]);
        // The window is bounded.
        r.ingest("n1", conn, batch(12..20), SystemTime::now());
        assert_eq!(r.window("n1").expect("known").samples.len(), 10);
    }

    #[test]
    fn marks_survive_a_restart_and_a_new_instance_starts_over() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
        let r = registry(store.clone());
        r.enrolled("n1", &cert(), SystemTime::now())
            .expect("enroll");
        let (conn, _) = r
            .connect(
                "n1",
                &hello("n1", 7),
                Arc::new(FakeLink::default()),
                addr(),
                Instant::now(),
                SystemTime::now(),
            )
            .expect("connect");
        r.ingest("n1", conn, batch(0..42), SystemTime::now());
        r.flush_marks().expect("flush");
        drop(r);
        let r = registry(store);
        let (_, next) = r
            .connect(
                "n1",
                &hello("n1", 7),
                Arc::new(FakeLink::default()),
                addr(),
                Instant::now(),
                SystemTime::now(),
            )
            .expect("reconnect");
        assert_eq!(
            next, 42,
            "same agent instance resumes after the last seen sample"
        );
        let (_, next) = r
            .connect(
                "n1",
                &hello("n1", 8),
                Arc::new(FakeLink::default()),
                addr(),
                Instant::now(),
                SystemTime::now(),
            )
            .expect("new instance");
        assert_eq!(next, 0, "a restarted agent numbers from zero");
    }

    #[test]
    fn a_new_connection_replaces_and_closes_the_old_one() {
        let r = registry(Arc::new(MemoryStore::default()));
        r.enrolled("n1", &cert(), SystemTime::now())
            .expect("enroll");
        let old = Arc::new(FakeLink::default());
        let (c1, _) = r
            .connect(
                "n1",
                &hello("n1", 1),
                old.clone(),
                addr(),
                Instant::now(),
                SystemTime::now(),
            )
            .expect("first");
        let (c2, _) = r
            .connect(
                "n1",
                &hello("n1", 1),
                Arc::new(FakeLink::default()),
                addr(),
                Instant::now(),
                SystemTime::now(),
            )
            .expect("second");
        assert!(old.0.load(Ordering::SeqCst));
        // The old connection's late disconnect does not mark the node disconnected.
        r.disconnect("n1", c1, Instant::now(), false);
        assert_eq!(r.status("n1", Instant::now()), Some(NodeStatus::Ready));
        // Nor is its late batch ingested.
        assert_eq!(
            r.ingest("n1", c1, batch(0..3), SystemTime::now()).accepted,
            0
        );
        r.disconnect("n1", c2, Instant::now(), false);
        assert_eq!(
            r.status("n1", Instant::now()),
            Some(NodeStatus::Disconnected)
        );
        assert_eq!(
            r.status("n1", Instant::now() + Duration::from_secs(2)),
            Some(NodeStatus::Down)
        );
    }

    #[test]
    fn revoking_closes_the_link_and_refuses_reconnects() {
        let r = registry(Arc::new(MemoryStore::default()));
        r.enrolled("n1", &cert(), SystemTime::now())
            .expect("enroll");
        let link = Arc::new(FakeLink::default());
        r.connect(
            "n1",
            &hello("n1", 1),
            link.clone(),
            addr(),
            Instant::now(),
            SystemTime::now(),
        )
        .expect("connect");
        r.set_warm("n1", true);
        r.set_spot_notice("n1", 5);
        r.set_parked("n1", true).expect("parked");
        assert!(r.view("n1", Instant::now()).is_some_and(|v| v.warm));
        r.revoke(&Revocation {
            name: "n1".into(),
            at_unix_ms: 1,
            by: "admin".into(),
            reason: "test".into(),
        })
        .expect("revoke");
        assert!(link.0.load(Ordering::SeqCst));
        // A revoked node is neither warm nor under a notice any more.
        assert!(r.view("n1", Instant::now()).is_some_and(|v| !v.warm));
        assert_eq!(r.spot_deadline("n1"), None);
        assert!(r.revoked_names().contains("n1"));
        let err = r
            .connect(
                "n1",
                &hello("n1", 1),
                Arc::new(FakeLink::default()),
                addr(),
                Instant::now(),
                SystemTime::now(),
            )
            .expect_err("revoked");
        assert!(matches!(err, RegistryError::Revoked(_)));
        assert!(r.enrolled("n1", &cert(), SystemTime::now()).is_err());
    }
}

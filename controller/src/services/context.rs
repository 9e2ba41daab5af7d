//! [`ApiState`]: the handles of the running controller's state and services, shared
//! by the HTTP handlers and by the background loops (pools, budgets) that act on
//! the same fleet.

use std::sync::Arc;
use std::time::Duration;

use novacron_common::pki;

use crate::services::agents::Agents;
use crate::services::events::EventLog;
use crate::services::workloads::Workloads;
use crate::state::registry::Registry;
use crate::state::store::Store;

/// State shared by the handlers and the background loops.
#[derive(Debug)]
pub struct ApiState {
    /// The fleet registry.
    pub registry: Arc<Registry>,
    /// The store.
    pub store: Arc<dyn Store>,
    /// The fleet CA with its key.
    pub ca: pki::CertAndKey,
    /// The CA fingerprint agents pin.
    pub fingerprint: pki::Fingerprint,
    /// Lifetime of node certificates.
    pub node_cert_ttl: Duration,
    /// What enrolling agents are told to connect to (`host:port`).
    pub quic_endpoint: String,
    /// The controller's server name.
    pub server_name: String,
    /// The API URL, for printed join commands.
    pub api_url: String,
    /// Jobs and allocations.
    pub workloads: Arc<Workloads>,
    /// The agent link, for commands such as log requests.
    pub link: Arc<Agents>,
    /// The event log (audit trail and decisions).
    pub events: Arc<EventLog>,
    /// The pricing catalog (`<data dir>/pricing.toml`, or the defaults).
    pub pricing: novacron_common::cost::PriceCatalog,
    /// Autoscaling policies and the loop that carries them out.
    pub autoscaler: Arc<crate::services::autoscaler::Autoscaler>,
    /// Checkpoints and migrations.
    pub migrations: Arc<crate::services::migrate::Migrations>,
    /// Certificate revocation (the list the TLS verifiers read).
    pub certs: Arc<crate::services::certs::CertRevocations>,
    /// Where manifests are parsed and checked: bounded, off the async workers.
    pub heavy: crate::services::heavy::HeavyWork,
    /// Whether this controller leads (`/readyz` answers 503 while it does not).
    pub leadership: crate::services::leadership::Leadership,
    /// The store's revision, which blocking queries (`?index=`) wait on.
    pub index: Arc<crate::services::index::IndexWatch>,
    /// Secrets, sealed at rest.
    pub secrets: Arc<crate::services::secrets::Secrets>,
    /// Images pushed to the controller.
    pub images: Arc<crate::services::images::Images>,
    /// The controller group on etcd (`controller list`); `None` for a single
    /// controller on its embedded store.
    pub group: Option<Arc<crate::services::group::GroupView>>,
    /// The metrics history (`None` when `[history] enabled = false`).
    pub history: Option<Arc<crate::services::history::MetricsHistory>>,
    /// Alert rules, channels, active alerts and the notification outbox.
    pub alerts: Arc<crate::services::alerts::Alerts>,
}

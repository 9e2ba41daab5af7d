//! Node pools: the shell around [`novacron_common::pools::plan`].
//!
//! `NodeTemplate` and `NodePool` manifests are applied through `POST /v1/pools`
//! (`http::pools`) and kept in the store, one document per record. Every
//! [`DEFAULT_INTERVAL`] the manager ([`run`]) observes each pool (the nodes its
//! provider made, the enrolled nodes labelled `pool=<name>`, their readiness and
//! allocations), takes the replicas the scheduler could not place from
//! [`crate::services::workloads::Workloads::unplaced`], asks `plan` what to do and does it
//! through the pool's provider ([`crate::services::providers`]): a new node gets a fresh
//! single-use join token; a drain cordons the node in the registry (the scheduler
//! places nothing new there); a drained node is removed once it holds no allocation,
//! then revoked. Every action is an event whose message is the plan's explanation.
//!
//! Pool-level settings are the pool's `metadata.labels`: the provider's `docker.*`
//! keys ([`crate::services::providers::DockerSettings`]) and the scale-down tuning
//! ([`KEY_SCALE_DOWN_AFTER`], [`KEY_DISRUPTION_BUDGET`], [`KEY_UNDERUSED_PERCENT`],
//! [`KEY_PROVISION_TIMEOUT`]) and [`KEY_CONSOLIDATE`].
//!
//! Unless `consolidate: "false"`, the manager also repacks an elastic pool each pass
//! ([`novacron_common::consolidate::plan`], best-fit-decreasing over the pool's
//! ready members, within the disruption budget and above `minSize`): once the same
//! plan has held for `scaleDownAfter` and no replica waits for room, each member it
//! frees is cordoned, its allocations are evicted
//! ([`crate::services::workloads::Workloads::evict`]; the reconciler places replacements on
//! the other members) and it is removed through the drain path once empty. A
//! member holding an allocation of a job labelled `consolidate: "false"` is never
//! retired.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use novacron_common::autoscale::pool::{
    CapacityType, NodePool, NodeTemplate, NodeTemplateSpec, POOL_KIND, TEMPLATE_KIND, WarmState,
    parse_node_pools, parse_node_templates, warm_price_per_hour,
};
use novacron_common::consolidate::{self, PackAlloc, PackNode};
use novacron_common::fleet::NodeStatus;
use novacron_common::pools::{self as core, Demand, Member, Phase, PoolAction, Settings};
use novacron_common::ticker::Ticker;
use serde::{Deserialize, Serialize};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::services::context::ApiState;
use crate::services::events::{NewEvent, kind};
use crate::services::providers::{
    CreateNode, DockerProvider, DockerSettings, Join, NodeProvider, PROVIDERS, ProviderError,
    ProviderNode, QemuProvider, QemuSettings, StaticProvider,
};
use crate::state::store::{PoolManifestRecord, Revocation, StoreError};
use crate::state::tokens::{JoinToken, TokenRecord};
pub use novacron_api::{PoolNodeStatus, PoolStatus};
use novacron_common::clock::unix_ms;

/// How often the manager plans.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// How long a new node's join token is valid.
pub const JOIN_TOKEN_TTL: Duration = Duration::from_secs(15 * 60);
/// How long a pool waits after a failed provider call.
pub const FAILURE_BACKOFF: Duration = Duration::from_secs(10);
/// Pool label: how long a member stays under-used before it is drained (`90s`).
pub const KEY_SCALE_DOWN_AFTER: &str = "scaleDownAfter";
/// Pool label: most members draining at once.
pub const KEY_DISRUPTION_BUDGET: &str = "disruptionBudget";
/// Pool label: reserved share (percent) at or below which a member is under-used.
pub const KEY_UNDERUSED_PERCENT: &str = "underusedPercent";
/// Pool label: how long a member may stay not ready (`3m`).
pub const KEY_PROVISION_TIMEOUT: &str = "provisionTimeout";
/// Pool label: `"true"` to retire the members a repack frees (default `"false"`).
pub const KEY_CONSOLIDATE: &str = "consolidate";
/// Who the pool manager acts as, in events and revocations.
pub const ACTOR: &str = "novacron (pools)";

/// Why a pools manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The manifest (or a pool's settings) is invalid; the message is located.
    #[error("{0}")]
    Invalid(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What `POST /v1/pools` did to one document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppliedDocument {
    /// `NodeTemplate` or `NodePool`.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// `created`, `updated` or `unchanged`.
    pub outcome: String,
}

/// Applies a file of `NodeTemplate` and `NodePool` documents: every document is
/// checked (schema, rules, template references, provider and its settings) before
/// any is stored.
pub fn apply(
    st: &ApiState,
    file: &str,
    text: &str,
    by: &str,
    now: SystemTime,
) -> Result<Vec<AppliedDocument>, PoolError> {
    let docs = parse_documents(file, text)?;
    let stored = Catalog::load(st);
    let mut templates: Vec<NodeTemplate> = stored
        .templates
        .into_iter()
        .filter(|t| !docs.templates.iter().any(|(n, _)| n.name == t.name))
        .collect();
    templates.extend(docs.templates.iter().map(|(t, _)| t.clone()));
    let mut problems = Vec::new();
    for (t, _) in &docs.templates {
        if !PROVIDERS.contains(&t.spec.provider.as_str()) {
            problems.push(format!(
                "{file}: node template {}: provider {:?} is not available; expected one of {}",
                t.name,
                t.spec.provider,
                PROVIDERS.join(", ")
            ));
        }
    }
    for (p, _) in &docs.pools {
        if let Err(e) = check_pool(p, &templates) {
            problems.push(format!("{file}: {e}"));
        }
    }
    if !problems.is_empty() {
        return Err(PoolError::Invalid(problems.join("\n")));
    }
    let at = unix_ms(now);
    let record = |name: &str, source: &str| PoolManifestRecord {
        name: name.to_string(),
        file: file.to_string(),
        source: source.to_string(),
        applied_unix_ms: at,
        by: by.to_string(),
    };
    let old_templates = st.store.node_templates()?;
    let old_pools = st.store.node_pools()?;
    let outcome = |old: &[PoolManifestRecord], name: &str, source: &str| {
        match old.iter().find(|r| r.name == name) {
            None => "created",
            Some(r) if r.source == source => "unchanged",
            Some(_) => "updated",
        }
        .to_string()
    };
    let mut applied = Vec::new();
    for (t, source) in &docs.templates {
        let o = outcome(&old_templates, &t.name, source);
        if o != "unchanged" {
            st.store.put_node_template(&record(&t.name, source))?;
        }
        applied.push(AppliedDocument {
            kind: TEMPLATE_KIND.into(),
            name: t.name.clone(),
            outcome: o,
        });
    }
    for (p, source) in &docs.pools {
        let o = outcome(&old_pools, &p.name, source);
        if o != "unchanged" {
            st.store.put_node_pool(&record(&p.name, source))?;
        }
        applied.push(AppliedDocument {
            kind: POOL_KIND.into(),
            name: p.name.clone(),
            outcome: o,
        });
    }
    Ok(applied)
}

/// The settings of a pool from its labels (scale-down tuning), over the
/// defaults of its template's `provider` (a `qemu` node takes minutes to
/// boot: [`crate::services::providers::QEMU_PROVISION_TIMEOUT`]).
pub fn settings_of(pool: &NodePool, provider: &str) -> Result<Settings, String> {
    let mut s = Settings::default();
    if provider == "qemu" {
        s.provision_timeout = crate::services::providers::QEMU_PROVISION_TIMEOUT;
    }
    let get = |k: &str| pool.labels.get(k).map(|v| v.trim());
    let duration = |k: &str, v: &str| {
        humantime::parse_duration(v).map_err(|e| {
            format!(
                "node pool {}: metadata.labels.{k} {v:?} is not a duration ({e}); expected \
                 one like 90s or 5m",
                pool.name
            )
        })
    };
    let number = |k: &str, v: &str, max: u32| {
        v.parse::<u32>().ok().filter(|n| *n <= max).ok_or_else(|| {
            format!(
                "node pool {}: metadata.labels.{k} {v:?} is out of range; expected a whole \
                     number from 0 to {max}",
                pool.name
            )
        })
    };
    if let Some(v) = get(KEY_SCALE_DOWN_AFTER) {
        s.scale_down_after = duration(KEY_SCALE_DOWN_AFTER, v)?;
    }
    if let Some(v) = get(KEY_PROVISION_TIMEOUT) {
        s.provision_timeout = duration(KEY_PROVISION_TIMEOUT, v)?;
    }
    if let Some(v) = get(KEY_DISRUPTION_BUDGET) {
        s.disruption_budget = number(KEY_DISRUPTION_BUDGET, v, 1000)?.max(1);
    }
    if let Some(v) = get(KEY_UNDERUSED_PERCENT) {
        s.underused_percent = number(KEY_UNDERUSED_PERCENT, v, 100)?;
    }
    Ok(s)
}

/// Whether a pool consolidates: its [`KEY_CONSOLIDATE`] label (default on; a job
/// opts its allocations out with the same label, `consolidate: "false"`).
pub fn consolidate_of(pool: &NodePool) -> Result<bool, String> {
    match pool.labels.get(KEY_CONSOLIDATE).map(|v| v.trim()) {
        None => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("true") => Ok(true),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(false),
        Some(v) => Err(format!(
            "node pool {}: metadata.labels.{KEY_CONSOLIDATE} {v:?} is not a boolean; \
             expected \"true\" or \"false\"",
            pool.name
        )),
    }
}

/// Runs the pool manager until `cancel`.
pub async fn run(st: Arc<ApiState>, interval: Duration, cancel: CancellationToken) {
    let mut manager = Manager::default();
    let mut ticker = Ticker::new(interval, MissedTickBehavior::Delay, cancel.cancelled());
    while ticker.tick().await {
        manager.pass(&st, SystemTime::now()).await;
    }
}

/// Observes every pool without acting: what `GET /v1/pools` shows.
pub async fn statuses(st: &ApiState) -> Vec<PoolStatus> {
    let catalog = Catalog::load(st);
    let providers = Providers::new(st, &catalog);
    let mut out = Vec::new();
    for pool in &catalog.pools {
        let observed = observe(st, &providers, pool, &catalog.templates).await;
        out.push(PoolStatus {
            currency: st.pricing.currency.clone(),
            ..observed.status()
        });
    }
    out
}

/// The stored templates and pools, parsed again (a record that no longer parses
/// is logged and left out).
#[derive(Debug, Default)]
struct Catalog {
    templates: Vec<NodeTemplate>,
    pools: Vec<NodePool>,
}

impl Catalog {
    fn load(st: &ApiState) -> Catalog {
        let mut c = Catalog::default();
        match st.store.node_templates() {
            Ok(records) => {
                for r in records {
                    match parse_node_templates(&r.file, &r.source) {
                        Ok(t) => c.templates.extend(t),
                        Err(error) => {
                            warn!(template = %r.name, %error, "stored node template no longer parses")
                        }
                    }
                }
            }
            Err(error) => warn!(%error, "cannot read node templates"),
        }
        match st.store.node_pools() {
            Ok(records) => {
                for r in records {
                    match parse_node_pools(&r.file, &r.source) {
                        Ok(p) => c.pools.extend(p),
                        Err(error) => {
                            warn!(pool = %r.name, %error, "stored node pool no longer parses")
                        }
                    }
                }
            }
            Err(error) => warn!(%error, "cannot read node pools"),
        }
        c
    }
}

/// The providers of one pass.
struct Providers {
    fixed: StaticProvider,
    docker: DockerProvider,
    qemu: QemuProvider,
}

impl Providers {
    fn new(st: &ApiState, catalog: &Catalog) -> Providers {
        let of = |provider: &'static str| {
            catalog.pools.iter().filter(move |p| {
                p.resolve(&catalog.templates)
                    .is_ok_and(|t| t.provider == provider)
            })
        };
        let docker = of("docker")
            .filter_map(|p| {
                let s = DockerSettings::from_labels(&p.name, &p.labels).ok()?;
                Some((p.name.clone(), s))
            })
            .collect();
        let qemu = of("qemu")
            .filter_map(|p| {
                let s = QemuSettings::from_labels(&p.name, &p.labels).ok()?;
                Some((p.name.clone(), s))
            })
            .collect();
        Providers {
            fixed: StaticProvider::new(st.registry.clone()),
            docker: DockerProvider::new(docker),
            qemu: QemuProvider::new(st.workloads.clone(), st.heavy.clone(), qemu),
        }
    }

    fn elastic(&self, provider: &str) -> bool {
        match provider {
            "docker" => self.docker.elastic(),
            "qemu" => self.qemu.elastic(),
            _ => self.fixed.elastic(),
        }
    }

    async fn list(&self, provider: &str, pool: &str) -> Result<Vec<ProviderNode>, ProviderError> {
        match provider {
            "docker" => self.docker.list(pool).await,
            "qemu" => self.qemu.list(pool).await,
            _ => self.fixed.list(pool).await,
        }
    }

    async fn create(&self, provider: &str, req: &CreateNode<'_>) -> Result<(), ProviderError> {
        match provider {
            "docker" => self.docker.create(req).await,
            "qemu" => self.qemu.create(req).await,
            _ => self.fixed.create(req).await,
        }
    }

    async fn start(&self, provider: &str, pool: &str, node: &str) -> Result<(), ProviderError> {
        match provider {
            "docker" => self.docker.start(pool, node).await,
            "qemu" => self.qemu.start(pool, node).await,
            _ => self.fixed.start(pool, node).await,
        }
    }

    async fn stop(&self, provider: &str, pool: &str, node: &str) -> Result<(), ProviderError> {
        match provider {
            "docker" => self.docker.stop(pool, node).await,
            "qemu" => self.qemu.stop(pool, node).await,
            _ => self.fixed.stop(pool, node).await,
        }
    }

    async fn delete(&self, provider: &str, pool: &str, node: &str) -> Result<(), ProviderError> {
        match provider {
            "docker" => self.docker.delete(pool, node).await,
            "qemu" => self.qemu.delete(pool, node).await,
            _ => self.fixed.delete(pool, node).await,
        }
    }
}

/// A member as observed in one pass.
#[derive(Debug, Clone)]
struct Observed {
    name: String,
    status: Option<NodeStatus>,
    cordoned: bool,
    created_unix_ms: Option<u64>,
    allocations: u32,
    reserved_cpu_millis: u64,
    reserved_memory_bytes: u64,
    capacity_cpu_millis: u64,
    capacity_memory_bytes: u64,
    /// The allocations that hold resources there (wanted, not terminal).
    held: Vec<PackAlloc>,
    /// Holds an allocation of a job labelled `consolidate: "false"`: not retired
    /// by consolidation.
    pinned: bool,
    /// Made for the warm pool, as its provider says.
    warm: bool,
    /// A warm-pool node that is stopped, ready to start.
    parked: bool,
}

/// A pool as observed in one pass.
#[derive(Debug, Clone)]
struct ObservedPool {
    pool: NodePool,
    template: Option<NodeTemplateSpec>,
    settings: Settings,
    consolidate: bool,
    problem: Option<String>,
    members: Vec<Observed>,
}

impl ObservedPool {
    fn status(&self) -> PoolStatus {
        let nodes: Vec<PoolNodeStatus> = self
            .members
            .iter()
            .map(|m| PoolNodeStatus {
                name: m.name.clone(),
                status: if m.parked {
                    "warm".into()
                } else if m.warm && m.status != Some(NodeStatus::Ready) {
                    "warming".into()
                } else if m.cordoned {
                    "draining".into()
                } else {
                    match m.status {
                        Some(s) => s.to_string(),
                        None => "provisioning".into(),
                    }
                },
                allocations: m.allocations,
            })
            .collect();
        let size = u32::try_from(
            nodes
                .iter()
                .filter(|n| !["draining", "warm", "warming"].contains(&n.status.as_str()))
                .count(),
        )
        .unwrap_or(u32::MAX);
        let t = self.template.as_ref();
        let price = t.map_or(0.0, |t| t.price_per_hour);
        PoolStatus {
            name: self.pool.name.clone(),
            provider: t.map_or_else(String::new, |t| t.provider.clone()),
            instance_type: t.map_or_else(String::new, |t| t.instance_type.clone()),
            capacity_type: t.map_or_else(String::new, |t| t.capacity_type.to_string()),
            price_per_hour: price,
            min_size: self.pool.min_size,
            max_size: self.pool.max_size,
            size,
            // A stopped warm node pays its disk only.
            hourly_cost: self
                .members
                .iter()
                .map(|m| match (m.parked, t) {
                    (true, Some(t)) => warm_price_per_hour(t, WarmState::Stopped),
                    _ => price,
                })
                .sum(),
            currency: String::new(),
            nodes,
            problem: self.problem.clone(),
        }
    }
}

async fn observe(
    st: &ApiState,
    providers: &Providers,
    pool: &NodePool,
    templates: &[NodeTemplate],
) -> ObservedPool {
    let mut out = ObservedPool {
        pool: pool.clone(),
        template: None,
        settings: Settings::default(),
        consolidate: false,
        problem: None,
        members: Vec::new(),
    };
    let template = match pool.resolve(templates) {
        Ok(t) => t.clone(),
        Err(e) => {
            out.problem = Some(e.to_string());
            return out;
        }
    };
    out.template = Some(template.clone());
    match settings_of(pool, &template.provider).and_then(|s| Ok((s, consolidate_of(pool)?))) {
        Ok((s, c)) => {
            out.settings = s;
            out.consolidate = c;
        }
        Err(e) => out.problem = Some(e),
    }
    let now = Instant::now();
    let revoked = st.registry.revoked_names();
    let mut names: BTreeMap<String, Option<u64>> = BTreeMap::new();
    let mut warm: BTreeMap<String, bool> = BTreeMap::new();
    match providers.list(&template.provider, &pool.name).await {
        Ok(listed) => {
            for mut n in listed {
                // A provider that makes nodes lists a revoked one too, so that
                // it is removed.
                if !revoked.contains(&n.name) || template.provider != "static" {
                    // A member stopped into the warm pool by a scale-in.
                    n.warm |= st.registry.is_parked(&n.name);
                    if n.warm {
                        warm.insert(n.name.clone(), n.parked());
                    }
                    names.insert(n.name, n.created_unix_ms);
                }
            }
        }
        Err(e) => out.problem = Some(e.to_string()),
    }
    let nodes = st.registry.placement_nodes(now);
    for n in &nodes {
        if n.labels.get("pool") == Some(&pool.name) && !revoked.contains(&n.name) {
            names.entry(n.name.clone()).or_insert(None);
        }
    }
    let mut opted_out: BTreeMap<String, bool> = BTreeMap::new();
    for (name, created) in names {
        let node = nodes.iter().find(|n| n.name == name);
        let live: Vec<_> = st
            .workloads
            .allocations(None, Some(&name))
            .into_iter()
            .filter(|a| !a.state.is_terminal())
            .collect();
        out.members.push(Observed {
            status: node.map(|n| n.status).filter(|_| !revoked.contains(&name)),
            cordoned: st.registry.is_cordoned(&name),
            created_unix_ms: created,
            allocations: u32::try_from(live.len()).unwrap_or(u32::MAX),
            reserved_cpu_millis: live.iter().map(|a| a.cpu_millis).sum(),
            reserved_memory_bytes: live.iter().map(|a| a.memory_bytes).sum(),
            capacity_cpu_millis: node.map_or(0, |n| n.capacity.cpu_millis),
            capacity_memory_bytes: node.map_or(0, |n| n.capacity.memory_bytes),
            held: live
                .iter()
                .filter(|a| a.desired_run)
                .map(|a| PackAlloc {
                    id: a.id.clone(),
                    cpu_millis: a.cpu_millis,
                    memory_bytes: a.memory_bytes,
                })
                .collect(),
            pinned: live.iter().any(|a| {
                a.desired_run
                    && *opted_out.entry(a.job.clone()).or_insert_with(|| {
                        crate::services::costs::job_label(&st.workloads, &a.job, KEY_CONSOLIDATE)
                            .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"))
                    })
            }),
            warm: warm.contains_key(&name),
            parked: warm.get(&name).copied().unwrap_or(false),
            name,
        });
    }
    out
}

/// What the manager remembers between passes (in memory: after a restart, nodes
/// start their timers again).
#[derive(Debug, Default)]
struct Manager {
    /// Node → since when it has not been ready (Unix ms).
    not_ready_since: HashMap<String, u64>,
    /// Node → since when it has been under-used (Unix ms).
    underused_since: HashMap<String, u64>,
    /// Node → since when it drains (Unix ms).
    draining: HashMap<String, u64>,
    /// Pool → no provider calls before (Unix ms).
    backoff: HashMap<String, u64>,
    /// Pool → the last problem reported, so that it is reported once.
    problems: HashMap<String, String>,
    /// Pool → the consolidation plan's retirements and since when it has held.
    consolidation: HashMap<String, (Vec<String>, u64)>,
    /// Members retired by consolidation, still draining.
    consolidating: HashSet<String>,
    /// Warm members started, until they are ready (Unix ms of the start).
    starting: HashMap<String, u64>,
    /// Members under a spot interruption notice, already replaced.
    interrupted: HashSet<String>,
    /// Pool → the size it keeps while members under notice are replaced, until
    /// (Unix ms).
    spot_floor: HashMap<String, (u32, u64)>,
}

impl Manager {
    async fn pass(&mut self, st: &ApiState, wall: SystemTime) {
        let now_ms = unix_ms(wall);
        let catalog = Catalog::load(st);
        let providers = Providers::new(st, &catalog);
        let mut observed = Vec::new();
        for pool in &catalog.pools {
            observed.push(observe(st, &providers, pool, &catalog.templates).await);
        }
        let room = self.headroom(st, &mut observed);
        self.spot_notices(st, &observed, now_ms);
        let mut views = Vec::new();
        for o in &observed {
            let problem = o.problem.clone().unwrap_or_default();
            let previous = self.problems.get(&o.pool.name).cloned().unwrap_or_default();
            if problem != previous {
                if !problem.is_empty() {
                    warn!(pool = %o.pool.name, %problem, "node pool problem");
                    st.events.note(
                        NewEvent::new(kind::POOL_FAILED, ACTOR, problem.clone())
                            .detail("pool", &o.pool.name),
                    );
                }
                self.problems.insert(o.pool.name.clone(), problem.clone());
            }
            let Some(template) = &o.template else {
                continue;
            };
            if !problem.is_empty() {
                continue;
            }
            st.autoscaler
                .note_pool_price(&o.pool.name, template.price_per_hour);
            let policy_floor = st.autoscaler.pool_floor(&o.pool.name);
            views.push(self.view(
                st,
                o,
                template,
                providers.elastic(&template.provider),
                policy_floor,
                now_ms,
            ));
        }
        let live: std::collections::HashSet<&str> = observed
            .iter()
            .flat_map(|o| o.members.iter().map(|m| m.name.as_str()))
            .collect();
        self.not_ready_since
            .retain(|n, _| live.contains(n.as_str()));
        self.underused_since
            .retain(|n, _| live.contains(n.as_str()));
        self.draining.retain(|n, _| live.contains(n.as_str()));
        self.starting.retain(|n, _| live.contains(n.as_str()));
        self.interrupted.retain(|n| live.contains(n.as_str()));
        self.spot_floor.retain(|_, (_, until)| now_ms < *until);
        self.consolidating
            .retain(|n| self.draining.contains_key(n.as_str()));

        let mut demands = steer(st, st.workloads.unplaced());
        demands.extend(fallback(st, &views));
        demands.extend(room);
        let actions = core::plan(&views, &demands, now_ms);
        for action in actions {
            let Some(o) = observed.iter().find(|o| o.pool.name == action.pool()) else {
                continue;
            };
            let Some(template) = &o.template else {
                continue;
            };
            if self
                .backoff
                .get(action.pool())
                .is_some_and(|until| now_ms < *until)
                && !matches!(action, PoolAction::Drain { .. })
            {
                continue;
            }
            if let Err(e) = self.act(st, &providers, o, template, &action, wall).await {
                warn!(pool = %o.pool.name, error = %e, "node pool action failed");
                st.events.note(
                    NewEvent::new(
                        kind::POOL_FAILED,
                        ACTOR,
                        format!("pool {}: {e} (while: {})", o.pool.name, action.reason()),
                    )
                    .detail("pool", &o.pool.name),
                );
                self.backoff.insert(
                    o.pool.name.clone(),
                    now_ms.saturating_add(u64::try_from(FAILURE_BACKOFF.as_millis()).unwrap_or(0)),
                );
            }
        }
        self.consolidate(st, &providers, &observed, demands.is_empty(), now_ms);
    }

    /// Consolidation, after the plan's actions (so that members drained this pass
    /// count against the disruption budget): re-plans every consolidating pool and
    /// retires what a plan that held for `scaleDownAfter` frees.
    fn consolidate(
        &mut self,
        st: &ApiState,
        providers: &Providers,
        observed: &[ObservedPool],
        no_demand: bool,
        now_ms: u64,
    ) {
        // Allocations placed on a retiring member before its cordon leave too.
        for node in &self.consolidating {
            for a in st.workloads.allocations(None, Some(node)) {
                if a.desired_run && !a.state.is_terminal() {
                    let reason = format!("consolidation retires node {node}");
                    if let Err(e) = st.workloads.evict(&a.id, &reason, ACTOR) {
                        warn!(alloc = %a.id, %node, error = %e, "eviction failed");
                    }
                }
            }
        }
        for o in observed {
            let pool = &o.pool.name;
            let Some(template) = &o.template else {
                continue;
            };
            let eligible = o.consolidate
                && o.problem.is_none()
                && providers.elastic(&template.provider)
                && self.backoff.get(pool).is_none_or(|until| now_ms >= *until);
            let plan = if eligible {
                consolidation(o, &self.draining, template.price_per_hour)
            } else {
                consolidate::Plan::default()
            };
            if plan.retire.is_empty() {
                self.consolidation.remove(pool);
                continue;
            }
            let since = match self.consolidation.get(pool) {
                Some((retire, since)) if *retire == plan.retire => *since,
                _ => {
                    self.consolidation
                        .insert(pool.clone(), (plan.retire.clone(), now_ms));
                    now_ms
                }
            };
            let wait = u64::try_from(o.settings.scale_down_after.as_millis()).unwrap_or(u64::MAX);
            // Replicas waiting for room would want the capacity it frees.
            if !no_demand || now_ms.saturating_sub(since) < wait {
                continue;
            }
            self.consolidation.remove(pool);
            let reason = explain(pool, &plan, &st.pricing.currency);
            info!(%pool, %reason, "consolidating");
            st.events.note(
                NewEvent::new(kind::POOL_CONSOLIDATED, ACTOR, reason.clone())
                    .detail("pool", pool)
                    .detail("nodes", plan.retire.join(","))
                    .detail("moves", plan.moves.len())
                    .detail("hourly_saving", format!("{:.4}", plan.hourly_saving)),
            );
            for node in &plan.retire {
                if let Err(e) = st.registry.set_cordoned(node, true) {
                    warn!(%pool, %node, error = %e, "cannot cordon node");
                    st.events.note(
                        NewEvent::new(
                            kind::POOL_FAILED,
                            ACTOR,
                            format!("pool {pool}: cannot cordon {node}: {e} (while: {reason})"),
                        )
                        .detail("pool", pool),
                    );
                    continue;
                }
                self.draining.insert(node.clone(), now_ms);
                self.consolidating.insert(node.clone());
                st.events.note(
                    NewEvent::new(kind::POOL_DRAINING, ACTOR, reason.clone())
                        .node(node)
                        .detail("pool", pool),
                );
                for m in plan.moves.iter().filter(|m| m.from == *node) {
                    let why = format!("consolidation retires node {node} (room on {})", m.to);
                    if let Err(e) = st.workloads.evict(&m.alloc, &why, ACTOR) {
                        warn!(alloc = %m.alloc, %node, error = %e, "eviction failed");
                    }
                }
            }
        }
    }

    /// The jobs' headroom (label `headroom`: replicas' worth of room kept free,
    /// `2` or `"20%"` of the job's replicas): placeholders held on the pools'
    /// ready members, which then count as holding work (never drained as empty,
    /// never retired by consolidation), and demands for what fits nowhere, so
    /// that the pools grow for it. Real replicas are placed as if the
    /// placeholders were not there: they take the room at once, and the next
    /// pass holds room again elsewhere or grows a pool.
    fn headroom(&mut self, st: &ApiState, observed: &mut [ObservedPool]) -> Vec<Demand> {
        let mut asks = Vec::new();
        for j in st.workloads.jobs() {
            let key = format!("headroom:{}", j.name);
            let Some(value) =
                crate::services::costs::job_label(&st.workloads, &j.name, HEADROOM_LABEL)
            else {
                self.problems.remove(&key);
                continue;
            };
            if st.workloads.is_stopped(&j.name) {
                continue;
            }
            match parse_job_headroom(&value) {
                Ok(h) => {
                    self.problems.remove(&key);
                    if let Some(d) = st.workloads.demand_of(&j.name, h.nodes(j.replicas)) {
                        asks.push(d);
                    }
                }
                Err(e) => {
                    let problem = format!("job {}: label {HEADROOM_LABEL}: {e}", j.name);
                    if self.problems.get(&key) != Some(&problem) {
                        warn!(job = %j.name, %problem, "headroom ignored");
                        st.events.note(
                            NewEvent::new(kind::POOL_FAILED, ACTOR, problem.clone()).job(&j.name),
                        );
                        self.problems.insert(key, problem);
                    }
                }
            }
        }
        if asks.is_empty() {
            return Vec::new();
        }
        let labels: HashMap<String, BTreeMap<String, String>> = st
            .registry
            .placement_nodes(Instant::now())
            .into_iter()
            .map(|n| (n.name, n.labels))
            .collect();
        let rooms: Vec<core::Room> = observed
            .iter()
            .flat_map(|o| o.members.iter())
            .filter(|m| {
                m.status == Some(NodeStatus::Ready)
                    && !m.cordoned
                    && !m.parked
                    && !self.draining.contains_key(&m.name)
            })
            .map(|m| core::Room {
                node: m.name.clone(),
                labels: labels.get(&m.name).cloned().unwrap_or_default(),
                cpu_millis: m.capacity_cpu_millis.saturating_sub(m.reserved_cpu_millis),
                memory_bytes: m
                    .capacity_memory_bytes
                    .saturating_sub(m.reserved_memory_bytes),
            })
            .collect();
        let (held, unfit) = core::fit_headroom(&rooms, &asks);
        for m in observed.iter_mut().flat_map(|o| o.members.iter_mut()) {
            let Some(h) = held.get(&m.name) else { continue };
            m.allocations = m.allocations.saturating_add(h.replicas);
            m.reserved_cpu_millis += h.cpu_millis;
            m.reserved_memory_bytes += h.memory_bytes;
            m.held.push(PackAlloc {
                id: format!("headroom on {}", m.name),
                cpu_millis: h.cpu_millis,
                memory_bytes: h.memory_bytes,
            });
            m.pinned = true;
        }
        unfit
    }

    /// Members that sent a spot interruption notice leave the pool's size at once
    /// (they drain; the migration service moves their work) and the pool keeps
    /// the size it had, so that the plan replaces them now, warm nodes first,
    /// rather than after they are gone.
    fn spot_notices(&mut self, st: &ApiState, observed: &[ObservedPool], now_ms: u64) {
        for o in observed {
            let Some(template) = &o.template else {
                continue;
            };
            for m in &o.members {
                let Some(deadline) = st.registry.spot_deadline(&m.name) else {
                    continue;
                };
                if m.parked || !self.interrupted.insert(m.name.clone()) {
                    continue;
                }
                // The size with it: members neither warm, warming nor draining.
                let size = u32::try_from(
                    o.members
                        .iter()
                        .filter(|x| {
                            let warming = x.warm && x.status != Some(NodeStatus::Ready);
                            let draining = self.draining.contains_key(&x.name);
                            !x.parked && !warming && (!draining || x.name == m.name)
                        })
                        .count(),
                )
                .unwrap_or(u32::MAX)
                .min(o.pool.max_size);
                let until = deadline.max(now_ms).saturating_add(
                    u64::try_from(o.settings.provision_timeout.as_millis()).unwrap_or(0),
                );
                let floor = self
                    .spot_floor
                    .get(&o.pool.name)
                    .map_or(size, |(f, _)| (*f).max(size));
                self.spot_floor.insert(o.pool.name.clone(), (floor, until));
                self.draining.entry(m.name.clone()).or_insert(now_ms);
                if let Err(e) = st.registry.set_cordoned(&m.name, true) {
                    warn!(node = %m.name, error = %e, "cannot cordon a node under spot notice");
                }
                let left = deadline.saturating_sub(now_ms) / 1000;
                let reason = format!(
                    "pool {}: node {} is under a spot interruption notice ({left} s left); \
                     keeping {floor} nodes, replacing it now{}",
                    o.pool.name,
                    m.name,
                    if o.pool.warm > 0 {
                        " (warm nodes first)"
                    } else {
                        ""
                    }
                );
                info!(pool = %o.pool.name, node = %m.name, provider = %template.provider, "{reason}");
                st.events.note(
                    NewEvent::new(kind::POOL_DRAINING, ACTOR, reason)
                        .node(&m.name)
                        .detail("pool", &o.pool.name)
                        .detail("deadline_unix_ms", deadline),
                );
            }
        }
    }

    /// The plan's view of a pool, updating the timers.
    fn view(
        &mut self,
        st: &ApiState,
        o: &ObservedPool,
        template: &NodeTemplateSpec,
        elastic: bool,
        policy_floor: Option<u32>,
        now_ms: u64,
    ) -> core::PoolView {
        let mut members = Vec::new();
        for m in &o.members {
            let ready = m.status == Some(NodeStatus::Ready);
            if ready {
                self.starting.remove(&m.name);
            }
            st.registry
                .set_warm(&m.name, m.parked && !self.starting.contains_key(&m.name));
            let phase = if let Some(since) = self.draining.get(&m.name) {
                Phase::Draining { since_ms: *since }
            } else if m.parked && !self.starting.contains_key(&m.name) {
                self.not_ready_since.remove(&m.name);
                Phase::Warm
            } else if m.warm && !ready && !self.starting.contains_key(&m.name) {
                // Made for the warm pool and not yet stopped: enrolling.
                Phase::Warming {
                    since_ms: m.created_unix_ms.unwrap_or(now_ms).min(now_ms),
                }
            } else if ready && !m.cordoned {
                self.not_ready_since.remove(&m.name);
                Phase::Ready
            } else {
                let since = *self
                    .not_ready_since
                    .entry(m.name.clone())
                    .or_insert_with(|| m.created_unix_ms.unwrap_or(now_ms).min(now_ms));
                Phase::Provisioning { since_ms: since }
            };
            let mut member = Member {
                name: m.name.clone(),
                phase,
                allocations: m.allocations,
                reserved_cpu_millis: m.reserved_cpu_millis,
                reserved_memory_bytes: m.reserved_memory_bytes,
                capacity_cpu_millis: m.capacity_cpu_millis,
                capacity_memory_bytes: m.capacity_memory_bytes,
                underused_since_ms: None,
                reclaimed: st.registry.spot_deadline(&m.name).is_some(),
            };
            if phase == Phase::Ready && member.underused(o.settings.underused_percent) {
                member.underused_since_ms =
                    Some(*self.underused_since.entry(m.name.clone()).or_insert(now_ms));
            } else {
                self.underused_since.remove(&m.name);
            }
            members.push(member);
        }
        let spot = self.spot_floor.get(&o.pool.name).map(|(f, _)| *f);
        core::PoolView {
            name: o.pool.name.clone(),
            min_size: floor_with_policy(o.pool.min_size, o.pool.max_size, policy_floor)
                .max(spot.unwrap_or(0).min(o.pool.max_size)),
            max_size: o.pool.max_size,
            template: template.clone(),
            elastic,
            settings: o.settings,
            members,
            warm: o.pool.warm,
            headroom: o.pool.headroom,
            can_grow: self
                .backoff
                .get(&o.pool.name)
                .is_none_or(|until| now_ms >= *until),
        }
    }

    async fn act(
        &mut self,
        st: &ApiState,
        providers: &Providers,
        o: &ObservedPool,
        template: &NodeTemplateSpec,
        action: &PoolAction,
        wall: SystemTime,
    ) -> Result<(), String> {
        let now_ms = unix_ms(wall);
        let pool = &o.pool.name;
        match action {
            PoolAction::Create { count, reason, .. }
            | PoolAction::CreateWarm { count, reason, .. } => {
                let warm = matches!(action, PoolAction::CreateWarm { .. });
                let controller = join_url(&template.provider, pool, &o.pool.labels)
                    .unwrap_or_else(|| st.api_url.clone());
                let mut made = Vec::new();
                for i in 0..*count {
                    let name = node_name(pool);
                    let mut labels = core::node_labels(pool, template);
                    if !o.pool.zones.is_empty() {
                        let zone =
                            &o.pool.zones[(o.members.len() + i as usize) % o.pool.zones.len()];
                        labels.insert("zone".into(), zone.clone());
                    }
                    let token = JoinToken::generate();
                    let record = TokenRecord::new(
                        &token,
                        JOIN_TOKEN_TTL,
                        1,
                        format!("node pool {pool}: node {name}"),
                        wall,
                    )
                    .map_err(|e| e.to_string())?;
                    st.store.put_token(&record).map_err(|e| e.to_string())?;
                    let join = Join {
                        controller: controller.clone(),
                        token: token.to_string(),
                        ca_fingerprint: st.fingerprint.to_string(),
                        server_name: st.server_name.clone(),
                    };
                    let req = CreateNode {
                        pool,
                        template,
                        name: &name,
                        labels: &labels,
                        join: &join,
                        warm,
                    };
                    providers
                        .create(&template.provider, &req)
                        .await
                        .map_err(|e| e.to_string())?;
                    info!(%pool, node = %name, %reason, warm, "node created");
                    if !warm {
                        self.not_ready_since.insert(name.clone(), now_ms);
                    }
                    made.push(name);
                }
                st.events.note(
                    NewEvent::new(
                        kind::POOL_SCALED,
                        ACTOR,
                        format!("{reason}; created {}", made.join(", ")),
                    )
                    .detail("pool", pool)
                    .detail("nodes", made.join(",")),
                );
            }
            PoolAction::Start { node, reason, .. } => {
                providers
                    .start(&template.provider, pool, node)
                    .await
                    .map_err(|e| e.to_string())?;
                // A member stopped by a scale-in was cordoned while it drained.
                if st.registry.is_parked(node) {
                    st.registry
                        .set_parked(node, false)
                        .map_err(|e| e.to_string())?;
                    st.registry
                        .set_cordoned(node, false)
                        .map_err(|e| e.to_string())?;
                }
                st.registry.set_warm(node, false);
                self.starting.insert(node.clone(), now_ms);
                self.not_ready_since.insert(node.clone(), now_ms);
                info!(%pool, %node, %reason, "warm node started");
                st.events.note(
                    NewEvent::new(kind::POOL_SCALED, ACTOR, reason.clone())
                        .node(node)
                        .detail("pool", pool)
                        .detail("nodes", node)
                        .detail("warm", true),
                );
            }
            PoolAction::Drain { node, reason, .. } => {
                st.registry
                    .set_cordoned(node, true)
                    .map_err(|e| e.to_string())?;
                self.draining.insert(node.clone(), now_ms);
                info!(%pool, %node, %reason, "draining node");
                st.events.note(
                    NewEvent::new(kind::POOL_DRAINING, ACTOR, reason.clone())
                        .node(node)
                        .detail("pool", pool),
                );
            }
            PoolAction::Park { node, reason, .. } => {
                // Marked before it stops: a controller restarted in between still
                // knows the stopped member as warm, not as a broken one.
                st.registry
                    .set_parked(node, true)
                    .map_err(|e| e.to_string())?;
                providers
                    .stop(&template.provider, pool, node)
                    .await
                    .map_err(|e| e.to_string())?;
                self.draining.remove(node);
                self.consolidating.remove(node);
                self.not_ready_since.remove(node);
                self.underused_since.remove(node);
                info!(%pool, %node, %reason, "node stopped into the warm pool");
                st.events.note(
                    NewEvent::new(kind::POOL_PARKED, ACTOR, reason.clone())
                        .node(node)
                        .detail("pool", pool),
                );
            }
            PoolAction::Delete { node, reason, .. } => {
                providers
                    .delete(&template.provider, pool, node)
                    .await
                    .map_err(|e| e.to_string())?;
                if st.registry.status(node, Instant::now()).is_some()
                    && !st.registry.revoked_names().contains(node)
                {
                    st.registry
                        .revoke(&Revocation {
                            name: node.clone(),
                            at_unix_ms: now_ms,
                            by: ACTOR.into(),
                            reason: reason.clone(),
                        })
                        .map_err(|e| e.to_string())?;
                }
                // Revoked: the cordon has done its work.
                let _ = st.registry.set_cordoned(node, false);
                self.draining.remove(node);
                self.not_ready_since.remove(node);
                self.underused_since.remove(node);
                info!(%pool, %node, %reason, "node removed");
                st.events.note(
                    NewEvent::new(kind::POOL_REMOVED, ACTOR, reason.clone())
                        .node(node)
                        .detail("pool", pool),
                );
            }
        }
        Ok(())
    }
}

/// The job label asking for headroom.
pub const HEADROOM_LABEL: &str = "headroom";

/// A job's `headroom` label: a number of replicas (`2`) or a share of its
/// replicas (`"20%"`, rounded up).
fn parse_job_headroom(value: &str) -> Result<core::Headroom, String> {
    let v = value.trim();
    if let Ok(n) = v.parse::<u32>() {
        return Ok(core::Headroom::Nodes(n));
    }
    match v.strip_suffix('%').map(|p| p.trim().parse::<f64>()) {
        Some(Ok(p)) if p.is_finite() && p > 0.0 && p <= 1000.0 => Ok(core::Headroom::Percent(p)),
        _ => Err(format!(
            "{value:?} is not a headroom; expected a number of replicas like 2, or a share \
             of the job's replicas like 20% (above 0% and up to 1000%)"
        )),
    }
}

/// The spot fallback: the replicas on members under a spot notice whose own pool
/// cannot replace them now (its provider is failing, as when spot capacity is
/// short, or it is at `maxSize`) are demands for the other pools, spot pools
/// first, then on-demand ones, so that replacements come up before the deadline
/// rather than after it, as unplaced replicas.
fn fallback(st: &ApiState, views: &[core::PoolView]) -> Vec<Demand> {
    let mut doomed = BTreeSet::new();
    let mut stuck = Vec::new();
    for v in views {
        if v.can_grow && v.size() < v.max_size {
            continue;
        }
        let before = doomed.len();
        doomed.extend(
            v.members
                .iter()
                .filter(|m| m.reclaimed && matches!(m.phase, Phase::Draining { .. }))
                .map(|m| m.name.clone()),
        );
        if doomed.len() > before {
            stuck.push(v.name.as_str());
        }
    }
    let why = format!(
        "replicas leave nodes under a spot notice and pool {} cannot replace them",
        stuck.join(", ")
    );
    st.workloads
        .leaving(&doomed)
        .into_iter()
        .map(|mut d| {
            d.prefer = Some((CapacityType::Spot, why.clone()));
            d
        })
        .collect()
}

/// Sets each demand's capacity preference from the pricing catalog's spot-share
/// targets (`[mix]`): a job whose class runs below its spot target grows spot
/// pools first, above it on-demand ones. Without targets, nothing is read.
fn steer(st: &ApiState, mut demands: Vec<Demand>) -> Vec<Demand> {
    if demands.is_empty() || st.pricing.mix.is_empty() {
        return demands;
    }
    let classes = crate::services::costs::job_classes(&st.workloads);
    let report = crate::services::costs::live_report(st);
    for d in &mut demands {
        let Some(class) = classes.get(&d.job) else {
            continue;
        };
        d.prefer = report
            .mix
            .iter()
            .find(|m| &m.class == class)
            .and_then(novacron_common::cost::mix_preference);
    }
    demands
}

/// The consolidation plan of one pool (pure): its ready members not draining are
/// both candidates and targets; at most the disruption budget left (members
/// draining count against it) and never below `minSize`.
fn consolidation(
    o: &ObservedPool,
    draining: &HashMap<String, u64>,
    hourly: f64,
) -> consolidate::Plan {
    let ready: Vec<&Observed> = o
        .members
        .iter()
        .filter(|m| {
            m.status == Some(NodeStatus::Ready) && !m.cordoned && !draining.contains_key(&m.name)
        })
        .collect();
    let drains = o
        .members
        .iter()
        .filter(|m| draining.contains_key(&m.name))
        .count();
    let budget = usize::try_from(o.settings.disruption_budget.max(1)).unwrap_or(usize::MAX);
    let min = usize::try_from(o.pool.min_size).unwrap_or(usize::MAX);
    let room = budget
        .saturating_sub(drains)
        .min(ready.len().saturating_sub(min));
    if room == 0 {
        return consolidate::Plan::default();
    }
    let nodes: Vec<PackNode> = ready
        .iter()
        .map(|m| PackNode {
            name: m.name.clone(),
            cpu_millis: m.capacity_cpu_millis,
            memory_bytes: m.capacity_memory_bytes,
            hourly,
            retirable: !m.pinned,
            schedulable: true,
            allocations: m.held.clone(),
        })
        .collect();
    consolidate::plan(&nodes, room)
}

/// The explanation of a consolidation plan: what is retired, what moves where and
/// what it saves.
fn explain(pool: &str, plan: &consolidate::Plan, currency: &str) -> String {
    let moves = if plan.moves.is_empty() {
        "no allocation to move".to_string()
    } else {
        plan.moves
            .iter()
            .map(|m| format!("{} {} → {}", m.alloc, m.from, m.to))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "pool {pool}: consolidating: retiring {} ({moves}); saves {:.4} {currency}/h",
        plan.retire.join(", "),
        plan.hourly_saving
    )
}

/// A fresh node name for `pool`: `<pool>-<6 hex digits>`, within 63 characters.
fn node_name(pool: &str) -> String {
    let suffix = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let mut base: String = pool.chars().take(63 - 7).collect();
    while base.ends_with(['-', '.']) {
        base.pop();
    }
    format!("{base}-{suffix}")
}

/// Checks what the parser cannot: the template reference, the provider and the
/// pool's settings.
fn check_pool(p: &NodePool, templates: &[NodeTemplate]) -> Result<(), String> {
    let t = p.resolve(templates).map_err(|e| e.to_string())?;
    if !PROVIDERS.contains(&t.provider.as_str()) {
        return Err(format!(
            "node pool {}: provider {:?} is not available; expected one of {}",
            p.name,
            t.provider,
            PROVIDERS.join(", ")
        ));
    }
    if p.warm > 0 && t.provider == "static" {
        return Err(format!(
            "node pool {}: warm nodes need a provider that creates and starts nodes, and \
             provider static only lists the hosts that enrolled; expected provider docker, \
             or no warm",
            p.name
        ));
    }
    if p.warm > 0 && t.provider == "qemu" {
        return Err(format!(
            "node pool {}: provider qemu keeps no warm nodes (a node's VM is removed with \
             it); expected provider docker, or no warm",
            p.name
        ));
    }
    settings_of(p, &t.provider)?;
    consolidate_of(p)?;
    if t.provider == "docker" {
        DockerSettings::from_labels(&p.name, &p.labels).map_err(|e| e.to_string())?;
    }
    if t.provider == "qemu" {
        QemuSettings::from_labels(&p.name, &p.labels).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The API URL a pool's new nodes join through, when its provider's settings
/// name one (`docker.controller`, `qemu.controller`).
fn join_url(provider: &str, pool: &str, labels: &BTreeMap<String, String>) -> Option<String> {
    match provider {
        "docker" => DockerSettings::from_labels(pool, labels).ok()?.controller,
        "qemu" => QemuSettings::from_labels(pool, labels).ok()?.controller,
        _ => None,
    }
}

/// The templates and pools of one file, each with its own document's text.
#[derive(Debug, Default)]
struct Documents {
    templates: Vec<(NodeTemplate, String)>,
    pools: Vec<(NodePool, String)>,
}

/// Splits a file into its `NodeTemplate` and `NodePool` documents and parses each
/// kind with its parser. Documents of the other kind are blanked (lines kept), so
/// that every error keeps the line and column of the original file.
fn parse_documents(file: &str, text: &str) -> Result<Documents, PoolError> {
    novacron_common::manifest::guard::check(file, text)
        .map_err(|e| PoolError::Invalid(e.to_string()))?;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let segments = segments(&lines);
    let mut kinds = Vec::new();
    let mut problems = Vec::new();
    for seg in &segments {
        let body: String = lines[seg.clone()].concat();
        let kind = match yaml_serde::from_str::<yaml_serde::Value>(&body) {
            Ok(yaml_serde::Value::Null) => None,
            Ok(v) => match v.get("kind").and_then(|k| k.as_str()) {
                Some(k) if k == TEMPLATE_KIND => Some(TEMPLATE_KIND),
                Some(k) if k == POOL_KIND => Some(POOL_KIND),
                Some(other) => {
                    problems.push(format!(
                        "{file}:{}: kind: {other:?} is not taken here; expected {TEMPLATE_KIND} \
                         or {POOL_KIND} (apply jobs with `novacron apply`)",
                        seg.start + 1
                    ));
                    None
                }
                // The pool parser reports the missing field with its location.
                None => Some(POOL_KIND),
            },
            Err(_) => Some(POOL_KIND),
        };
        kinds.push(kind);
    }
    if !problems.is_empty() {
        return Err(PoolError::Invalid(problems.join("\n")));
    }
    let only = |want: &str| -> String {
        let mut out = String::with_capacity(text.len());
        for (i, line) in lines.iter().enumerate() {
            let seg = segments.iter().position(|s| s.contains(&i));
            let keep = seg.is_some_and(|s| kinds[s] == Some(want));
            if keep {
                out.push_str(line);
            } else if is_separator(line) {
                out.push_str("---\n");
            } else if line.ends_with('\n') {
                out.push('\n');
            }
        }
        out
    };
    let sources = |want: &str| -> Vec<String> {
        segments
            .iter()
            .zip(&kinds)
            .filter(|(_, k)| **k == Some(want))
            .map(|(s, _)| lines[s.clone()].concat())
            .collect()
    };
    let mut docs = Documents::default();
    let mut errors = Vec::new();
    if kinds.contains(&Some(TEMPLATE_KIND)) {
        match parse_node_templates(file, &only(TEMPLATE_KIND)) {
            Ok(t) => docs.templates = t.into_iter().zip(sources(TEMPLATE_KIND)).collect(),
            Err(e) => errors.extend(e.into_iter().map(|e| e.to_string())),
        }
    }
    if kinds.contains(&Some(POOL_KIND)) {
        match parse_node_pools(file, &only(POOL_KIND)) {
            Ok(p) => docs.pools = p.into_iter().zip(sources(POOL_KIND)).collect(),
            Err(e) => errors.extend(e.into_iter().map(|e| e.to_string())),
        }
    }
    if !errors.is_empty() {
        return Err(PoolError::Invalid(errors.join("\n")));
    }
    if docs.templates.is_empty() && docs.pools.is_empty() {
        return Err(PoolError::Invalid(format!(
            "{file}: no {TEMPLATE_KIND} or {POOL_KIND} found; expected YAML documents with \
             apiVersion: novacron.io/v1, kind, metadata and spec"
        )));
    }
    Ok(docs)
}

/// Whether a line starts a YAML document (`---`, alone or before content).
fn is_separator(line: &str) -> bool {
    let rest = line.trim_end_matches(['\n', '\r']);
    rest.strip_prefix("---")
        .is_some_and(|r| r.is_empty() || r.starts_with([' ', '\t']))
}

/// The line ranges of the documents (a separator line opens its document).
fn segments(lines: &[&str]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, line) in lines.iter().enumerate() {
        if is_separator(line) && i > start {
            out.push(start..i);
            start = i;
        } else if is_separator(line) {
            start = i;
        }
    }
    if start < lines.len() {
        out.push(start..lines.len());
    }
    out
}

/// The size the pool keeps at least: its `minSize`, raised to what an
/// `AutoScalingPolicy` targeting it decided, never above `maxSize`.
pub fn floor_with_policy(min_size: u32, max_size: u32, policy: Option<u32>) -> u32 {
    policy.map_or(min_size, |p| p.clamp(min_size, max_size.max(min_size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_raises_the_floor_within_the_pools_bounds() {
        assert_eq!(floor_with_policy(1, 5, None), 1);
        assert_eq!(floor_with_policy(1, 5, Some(3)), 3);
        assert_eq!(floor_with_policy(2, 5, Some(0)), 2, "never below minSize");
        assert_eq!(floor_with_policy(1, 5, Some(9)), 5, "never above maxSize");
    }

    const TEMPLATE: &str = "apiVersion: novacron.io/v1\nkind: NodeTemplate\nmetadata: {name: d2}\nspec:\n  instanceType: d2\n  provider: docker\n  capacityType: spot\n  pricePerHour: 0.05\n  resources: {cpu: 2, memory: 4Gi}\n";
    const POOL: &str = "apiVersion: novacron.io/v1\nkind: NodePool\nmetadata:\n  name: p\n  labels: {docker.image: \"novacron-fleet:1\", scaleDownAfter: 5s}\nspec:\n  templateRef: d2\n  minSize: 0\n  maxSize: 2\n";

    #[test]
    fn a_file_with_both_kinds_parses_each_with_its_own_source() {
        let text = format!("{TEMPLATE}---\n{POOL}");
        let docs = parse_documents("pools.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(docs.templates.len(), 1);
        assert_eq!(docs.templates[0].1, TEMPLATE);
        assert_eq!(docs.pools.len(), 1);
        assert_eq!(docs.pools[0].1, format!("---\n{POOL}"));
        // Each stored source parses on its own.
        let again =
            parse_node_pools("pools.yaml", &docs.pools[0].1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again[0].name, "p");
        let s = settings_of(&again[0], "docker").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.scale_down_after, Duration::from_secs(5));
        assert_eq!(s.provision_timeout, core::DEFAULT_PROVISION_TIMEOUT);
        // A VM node boots a guest: its pool waits longer unless told.
        let q = settings_of(&again[0], "qemu").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            q.provision_timeout,
            crate::services::providers::QEMU_PROVISION_TIMEOUT
        );
        let mut told = again[0].clone();
        told.labels
            .insert(KEY_PROVISION_TIMEOUT.to_owned(), "4m".to_owned());
        let q = settings_of(&told, "qemu").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(q.provision_timeout, Duration::from_secs(240));
        assert!(check_pool(&again[0], &[docs.templates[0].0.clone()]).is_ok());
    }

    #[test]
    fn a_jobs_headroom_label_is_replicas_or_a_share_of_them() {
        assert_eq!(parse_job_headroom(" 2 "), Ok(core::Headroom::Nodes(2)));
        assert_eq!(parse_job_headroom("20%"), Ok(core::Headroom::Percent(20.0)));
        assert_eq!(parse_job_headroom("20%").map(|h| h.nodes(11)), Ok(3));
        for bad in ["-1", "0%", "two", "2000%", ""] {
            let e = parse_job_headroom(bad).expect_err(bad);
            assert!(e.contains("expected a number of replicas like 2"), "{e}");
        }
    }

    #[test]
    fn warm_nodes_need_a_provider_that_starts_nodes() {
        let text = format!("{TEMPLATE}---\n{POOL}  warm: {{size: 2}}\n");
        let docs = parse_documents("pools.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(docs.pools[0].0.warm, 2);
        let docker = docs.templates[0].0.clone();
        assert!(check_pool(&docs.pools[0].0, std::slice::from_ref(&docker)).is_ok());
        let mut fixed = docker;
        fixed.spec.provider = "static".into();
        let e = check_pool(&docs.pools[0].0, &[fixed]).expect_err("refused");
        assert!(e.contains("provider static only lists the hosts"), "{e}");
        let bad = format!("{TEMPLATE}---\n{POOL}  warm: {{size: 2, state: hibernated}}\n");
        let e = parse_documents("pools.yaml", &bad)
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("spec.warm.state: hibernated is not offered"),
            "{e}"
        );
    }

    #[test]
    fn qemu_pools_need_their_image_and_template_and_keep_no_warm_nodes() {
        let qemu_template = TEMPLATE.replace("provider: docker", "provider: qemu");
        let labels = "labels: {qemu.image: \"novacron/node-guest:1\", qemu.template: node-guest}";
        let pool = POOL.replace(
            "labels: {docker.image: \"novacron-fleet:1\", scaleDownAfter: 5s}",
            labels,
        );
        let docs = parse_documents("pools.yaml", &format!("{qemu_template}---\n{pool}"))
            .unwrap_or_else(|e| panic!("{e}"));
        let t = docs.templates[0].0.clone();
        assert!(check_pool(&docs.pools[0].0, std::slice::from_ref(&t)).is_ok());
        assert_eq!(
            join_url("qemu", "p", &docs.pools[0].0.labels),
            None,
            "the controller's own URL unless qemu.controller says"
        );
        // Without its image.
        let docs = parse_documents("pools.yaml", &format!("{qemu_template}---\n{POOL}"))
            .unwrap_or_else(|e| panic!("{e}"));
        let e = check_pool(&docs.pools[0].0, std::slice::from_ref(&t)).expect_err("refused");
        assert!(e.contains("no qemu.image"), "{e}");
        // Warm nodes.
        let warm = format!("{qemu_template}---\n{pool}  warm: {{size: 1}}\n");
        let docs = parse_documents("pools.yaml", &warm).unwrap_or_else(|e| panic!("{e}"));
        let e = check_pool(&docs.pools[0].0, &[t]).expect_err("refused");
        assert!(e.contains("provider qemu keeps no warm nodes"), "{e}");
    }

    #[test]
    fn errors_keep_the_line_of_the_original_file() {
        let bad = POOL.replace("maxSize: 2", "maxSize: 0");
        let text = format!("{TEMPLATE}---\n{bad}");
        let e = parse_documents("pools.yaml", &text)
            .expect_err("refused")
            .to_string();
        // The template has 9 lines, the separator 1; maxSize is line 9 of the pool.
        assert!(e.starts_with("pools.yaml:19:"), "{e}");
        assert!(e.contains("spec.maxSize"), "{e}");
    }

    #[test]
    fn other_kinds_and_bad_settings_are_refused_with_what_is_accepted() {
        let e = parse_documents("j.yaml", "apiVersion: novacron.io/v1\nkind: Job\n")
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("kind: \"Job\" is not taken here; expected NodeTemplate or NodePool"),
            "{e}"
        );
        let docs = parse_documents("p.yaml", &POOL.replace("5s", "soon"))
            .unwrap_or_else(|e| panic!("{e}"));
        let e = settings_of(&docs.pools[0].0, "docker").expect_err("refused");
        assert!(
            e.contains("metadata.labels.scaleDownAfter \"soon\" is not a duration"),
            "{e}"
        );
        let e = check_pool(&docs.pools[0].0, &[]).expect_err("refused");
        assert!(
            e.contains("templateRef \"d2\" names no NodeTemplate"),
            "{e}"
        );
    }

    fn member(name: &str, allocs: &[(&str, u64)]) -> Observed {
        Observed {
            name: name.into(),
            status: Some(NodeStatus::Ready),
            cordoned: false,
            created_unix_ms: None,
            allocations: u32::try_from(allocs.len()).unwrap_or(u32::MAX),
            reserved_cpu_millis: allocs.iter().map(|(_, c)| c).sum(),
            reserved_memory_bytes: 0,
            capacity_cpu_millis: 2000,
            capacity_memory_bytes: 4 << 30,
            held: allocs
                .iter()
                .map(|(id, c)| PackAlloc {
                    id: (*id).into(),
                    cpu_millis: *c,
                    memory_bytes: 1 << 20,
                })
                .collect(),
            pinned: false,
            warm: false,
            parked: false,
        }
    }

    fn observed(labels: &str, members: Vec<Observed>) -> ObservedPool {
        let text = POOL.replace("scaleDownAfter: 5s", labels);
        let pool = parse_node_pools("p.yaml", &text)
            .unwrap_or_else(|e| panic!("{e:?}"))
            .remove(0);
        ObservedPool {
            settings: settings_of(&pool, "docker").unwrap_or_else(|e| panic!("{e}")),
            consolidate: consolidate_of(&pool).unwrap_or_else(|e| panic!("{e}")),
            pool,
            template: None,
            problem: None,
            members,
        }
    }

    #[test]
    fn consolidation_is_on_unless_a_label_turns_it_off() {
        assert!(observed("scaleDownAfter: 5s", vec![]).consolidate);
        assert!(!observed("consolidate: \"false\"", vec![]).consolidate);
        let text = POOL.replace("scaleDownAfter: 5s", "consolidate: \"maybe\"");
        let pool = parse_node_pools("p.yaml", &text)
            .unwrap_or_else(|e| panic!("{e:?}"))
            .remove(0);
        let e = consolidate_of(&pool).expect_err("refused");
        assert!(
            e.contains("metadata.labels.consolidate \"maybe\" is not a boolean"),
            "{e}"
        );
    }

    #[test]
    fn consolidation_retires_what_fits_elsewhere_within_budget_and_min_size() {
        let o = observed(
            "consolidate: \"true\"",
            vec![member("p-a", &[("a1", 500)]), member("p-b", &[("b1", 300)])],
        );
        let plan = consolidation(&o, &HashMap::new(), 0.05);
        assert_eq!(plan.retire, ["p-b"]);
        assert_eq!(plan.moves.len(), 1);
        assert_eq!(
            (plan.moves[0].alloc.as_str(), plan.moves[0].to.as_str()),
            ("b1", "p-a")
        );
        assert_eq!(plan.hourly_saving, 0.05);
        let why = explain("p", &plan, "USD");
        assert!(
            why.contains("retiring p-b (b1 p-b → p-a); saves 0.0500 USD/h"),
            "{why}"
        );

        // A member already draining takes the whole budget (1).
        let draining = HashMap::from([("p-c".to_string(), 0)]);
        let mut busy = o.clone();
        busy.members.push(member("p-c", &[]));
        busy.members[2].cordoned = true;
        assert!(consolidation(&busy, &draining, 0.05).retire.is_empty());

        // A member holding a job that opted out (consolidate: "false") stays; the
        // other one is retired instead, its allocation moving onto it.
        let mut pinned = o.clone();
        pinned.members[1].pinned = true;
        let plan = consolidation(&pinned, &HashMap::new(), 0.05);
        assert_eq!(plan.retire, ["p-a"], "{plan:?}");

        // Never below minSize.
        let mut floor = o.clone();
        floor.pool.min_size = 2;
        assert!(
            consolidation(&floor, &HashMap::new(), 0.05)
                .retire
                .is_empty()
        );

        // Nothing retires when its allocations do not all fit elsewhere.
        let full = observed(
            "consolidate: \"true\"",
            vec![
                member("p-a", &[("a1", 1500)]),
                member("p-b", &[("b1", 600)]),
            ],
        );
        assert!(
            consolidation(&full, &HashMap::new(), 0.05)
                .retire
                .is_empty()
        );
    }

    #[test]
    fn node_names_fit_the_name_rules() {
        let long = "a".repeat(63);
        let n = node_name(&long);
        assert_eq!(n.len(), 63);
        assert!(novacron_common::pki::validate_name(&n).is_ok(), "{n}");
        assert!(node_name("p").starts_with("p-"));
    }
}

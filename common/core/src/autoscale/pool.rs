//! `NodeTemplate` (how to provision one node) and `NodePool` (a managed group of
//! nodes made from a template, between a min and a max size) manifests.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use yaml_serde::Value;

use crate::manifest::document::{self, Kind, Rule};
use crate::manifest::{ByteSize, ManifestErrors, Metadata, Millicores};

/// The `kind` of a node template.
pub const TEMPLATE_KIND: &str = "NodeTemplate";
/// The `kind` of a node pool.
pub const POOL_KIND: &str = "NodePool";
/// Largest `maxSize` of a pool.
pub const MAX_POOL_SIZE: u32 = 100_000;
/// Most GPUs one node may have (the scheduler's limit).
pub const MAX_NODE_GPUS: u32 = crate::scheduler::MAX_GPUS_PER_NODE as u32;

/// Spot or on-demand capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CapacityType {
    /// Cheap, and may be taken back with a short notice.
    Spot,
    /// Full price, kept.
    OnDemand,
}

impl fmt::Display for CapacityType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CapacityType::Spot => "spot",
            CapacityType::OnDemand => "on-demand",
        })
    }
}

/// What a warm node is kept as, waiting to be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WarmState {
    /// Provisioned and shut down: only its disk is paid; it boots to serve.
    #[default]
    Stopped,
    /// Suspended with its memory on disk: disk and the memory image are paid; it
    /// resumes to serve (a provider that can suspend).
    Hibernated,
    /// Provisioned and running, outside the pool's size: paid in full, serves at
    /// once.
    Running,
}

impl fmt::Display for WarmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WarmState::Stopped => "stopped",
            WarmState::Hibernated => "hibernated",
            WarmState::Running => "running",
        })
    }
}

/// `warm: {size: 2, state: stopped, startDelay: 20s}`: nodes provisioned ahead and
/// kept aside; a scale-out takes them first and the pool refills behind it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WarmSpec {
    /// How many nodes to keep warm.
    pub size: u32,
    /// What they are kept as.
    #[serde(default)]
    pub state: WarmState,
    /// Simulator only: from taking a warm node to its being ready; required
    /// unless the state is `running` or the provider is `docker` (measured).
    #[serde(
        default,
        with = "crate::manifest::opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub start_delay: Option<std::time::Duration>,
    /// Simulator only: the hourly price of one warm node; default its root disk
    /// (8 GiB at $0.08 per GiB-month) when stopped, plus its memory's size when
    /// hibernated, and the full price when running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_per_hour: Option<f64>,
}

/// Price of block storage, per GiB and hour: $0.08 per GiB-month (AWS's gp3 list
/// price in us-east-1) over 730 hours.
pub const DISK_PRICE_PER_GIB_HOUR: f64 = 0.08 / 730.0;
/// The root disk a stopped node keeps, GiB (the usual cloud image's 8 GiB).
pub const STOPPED_DISK_GIB: f64 = 8.0;

/// What one warm node of `template` costs an hour in `state` unless the pool
/// says: running, the template's price; stopped, its root disk
/// ([`STOPPED_DISK_GIB`] at [`DISK_PRICE_PER_GIB_HOUR`]); hibernated, the root
/// disk plus a disk the size of its memory.
pub fn warm_price_per_hour(template: &NodeTemplateSpec, state: WarmState) -> f64 {
    let memory_gib = template.resources.memory.0 as f64 / f64::from(1u32 << 30);
    match state {
        WarmState::Running => template.price_per_hour,
        WarmState::Stopped => stopped_price_per_hour(),
        WarmState::Hibernated => (STOPPED_DISK_GIB + memory_gib) * DISK_PRICE_PER_GIB_HOUR,
    }
}

/// What a stopped node costs an hour: its root disk ([`STOPPED_DISK_GIB`] at
/// [`DISK_PRICE_PER_GIB_HOUR`]).
pub fn stopped_price_per_hour() -> f64 {
    STOPPED_DISK_GIB * DISK_PRICE_PER_GIB_HOUR
}

/// How long a warm node in `state` takes to be ready where NovaCron knows it: a
/// running node serves at once; a stopped `docker` node was measured at
/// [`DOCKER_WARM_START`]. Every other start time is the pool's to declare
/// (`warm.startDelay`).
pub fn warm_start_delay(provider: &str, state: WarmState) -> Option<std::time::Duration> {
    match (provider, state) {
        (_, WarmState::Running) => Some(std::time::Duration::ZERO),
        ("docker", WarmState::Stopped) => Some(DOCKER_WARM_START),
        _ => None,
    }
}

/// A stopped `docker` node's start, from the scale-out's cause (a job applied that
/// fits no node) to the node ready: 2.28–2.29 s in three runs of the test
/// `pools::a_warm_node_is_kept_stopped_started_first_on_a_scale_out_and_refilled`
/// (BENCHMARKS.md, "Warm pools").
pub const DOCKER_WARM_START: std::time::Duration = std::time::Duration::from_millis(2300);

/// Checks a pool's `warm` block, with paths under `path` (`spec.pools[0].warm`).
/// `simulated`: the simulator's pool of `template`, which must know the start time
/// (a real pool measures it).
pub(crate) fn check_warm(
    w: &WarmSpec,
    max_size: u32,
    path: &str,
    simulated: Option<&NodeTemplateSpec>,
) -> Vec<Rule> {
    let mut r = Vec::new();
    if w.size > max_size {
        r.push(Rule::at(
            format!("{path}.size"),
            format!(
                "{} is above maxSize ({max_size}); expected a warm pool no larger than the pool",
                w.size
            ),
        ));
    }
    if let Some(template) = simulated
        && w.start_delay.is_none()
        && warm_start_delay(&template.provider, w.state).is_none()
    {
        r.push(Rule::at(
            format!("{path}.startDelay"),
            format!(
                "is missing, and provider {:?} declares no start time for {} nodes; expected \
                 the time a {} node takes to be ready, like 30s",
                template.provider, w.state, w.state
            ),
        ));
    }
    if let Some(d) = w.start_delay
        && d > std::time::Duration::from_secs(3600)
    {
        r.push(Rule::at(
            format!("{path}.startDelay"),
            format!(
                "{} is too long; expected a delay up to 1h",
                crate::units::duration(d)
            ),
        ));
    }
    if let Some(p) = w.price_per_hour
        && !(p.is_finite() && p >= 0.0)
    {
        r.push(Rule::at(
            format!("{path}.pricePerHour"),
            format!("{p} is not a price; expected an hourly price of 0 or more, like 0.002"),
        ));
    }
    r
}

/// What one node offers.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeResources {
    /// Allocatable CPU.
    pub cpu: Millicores,
    /// Allocatable memory.
    pub memory: ByteSize,
    /// GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<NodeGpus>,
}

/// The GPUs of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeGpus {
    /// How many.
    pub count: u32,
    /// Model name (`A100`).
    pub model: String,
    /// Memory of each.
    pub memory: ByteSize,
}

/// How to provision one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeTemplateSpec {
    /// The provider's instance type (`m5.xlarge`).
    pub instance_type: String,
    /// The provider that makes it (`static`, `docker`, `qemu`; a simulator
    /// scenario may name others, like `aws`).
    pub provider: String,
    /// `spot` or `on-demand`.
    pub capacity_type: CapacityType,
    /// Price of one node for one hour.
    pub price_per_hour: f64,
    /// Labels every node gets (besides `pool`, `zone`, `instance_type`, `capacity`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// What one node offers.
    pub resources: NodeResources,
}

/// A `NodeTemplate` manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeTemplateManifest {
    /// `novacron.io/v1`.
    pub api_version: String,
    /// `NodeTemplate`.
    pub kind: String,
    /// Name and labels.
    pub metadata: Metadata,
    /// The template.
    pub spec: NodeTemplateSpec,
}

/// A `NodePool` spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodePoolSpec {
    /// An inline template (exactly one of template and templateRef).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<NodeTemplateSpec>,
    /// The name of a `NodeTemplate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_ref: Option<String>,
    /// Fewest nodes.
    pub min_size: u32,
    /// Most nodes.
    pub max_size: u32,
    /// Zones nodes are spread over, evenly.
    #[serde(default)]
    pub zones: Vec<String>,
    /// Nodes kept provisioned and stopped beside the pool, started first on a
    /// scale-out (`warm: {size: 2}`; only `state: stopped` with a real provider).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<WarmSpec>,
    /// Empty nodes kept ready for new replicas: a count (`headroom: 1`) or a
    /// share of the pool's size (`headroom: "20%"`, rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headroom: Option<HeadroomSpec>,
}

/// Spare capacity a pool keeps: empty nodes, ready for new replicas at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Headroom {
    /// This many empty nodes.
    Nodes(u32),
    /// This share of the pool's size, in percent, rounded up.
    Percent(f64),
}

impl Headroom {
    /// Empty nodes wanted for a pool of `size`.
    pub fn nodes(&self, size: u32) -> u32 {
        match *self {
            Headroom::Nodes(n) => n,
            Headroom::Percent(p) => {
                let n = (f64::from(size) * p / 100.0 - 1e-9).ceil();
                n.clamp(0.0, f64::from(u32::MAX)) as u32
            }
        }
    }
}

impl fmt::Display for Headroom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Headroom::Nodes(n) => write!(f, "{n} empty node{}", if *n == 1 { "" } else { "s" }),
            Headroom::Percent(p) => write!(f, "{p}% of the pool empty"),
        }
    }
}

/// `headroom: 2` or `headroom: "25%"`, as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeadroomSpec {
    /// A number of empty nodes.
    Nodes(u32),
    /// A share of the pool's size, like `25%`.
    Percent(String),
}

impl HeadroomSpec {
    /// The headroom, or why it is not one.
    pub fn parse(&self) -> Result<Headroom, String> {
        match self {
            HeadroomSpec::Nodes(n) => Ok(Headroom::Nodes(*n)),
            HeadroomSpec::Percent(s) => {
                match s.trim().strip_suffix('%').map(|p| p.trim().parse::<f64>()) {
                    Some(Ok(p)) if p.is_finite() && p > 0.0 && p <= 100.0 => {
                        Ok(Headroom::Percent(p))
                    }
                    _ => Err(format!(
                        "{s:?} is not a headroom; expected a number of empty nodes like 2, or a \
                     share of the pool like \"20%\" (above 0% and up to 100%)"
                    )),
                }
            }
        }
    }
}

/// A `NodePool` manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodePoolManifest {
    /// `novacron.io/v1`.
    pub api_version: String,
    /// `NodePool`.
    pub kind: String,
    /// Name and labels.
    pub metadata: Metadata,
    /// The pool.
    pub spec: NodePoolSpec,
}

/// A node template that passed every check.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct NodeTemplate {
    /// `metadata.name`.
    pub name: String,
    /// The template.
    pub spec: NodeTemplateSpec,
}

/// Where a pool's template comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum TemplateSource {
    /// Written in the pool.
    Inline(NodeTemplateSpec),
    /// A `NodeTemplate` by name.
    Ref(String),
}

/// A node pool that passed every check.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct NodePool {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// Its template.
    pub template: TemplateSource,
    /// Fewest nodes.
    pub min_size: u32,
    /// Most nodes.
    pub max_size: u32,
    /// Zones.
    pub zones: Vec<String>,
    /// Nodes kept warm (0: none).
    pub warm: u32,
    /// Empty nodes kept ready.
    pub headroom: Option<Headroom>,
}

/// Why a pool's template reference does not resolve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// No template of that name.
    #[error(
        "node pool {pool}: templateRef {name:?} names no NodeTemplate; expected one of: {known}"
    )]
    UnknownTemplate {
        /// The pool.
        pool: String,
        /// The missing template.
        name: String,
        /// The known templates, comma-separated (or `none`).
        known: String,
    },
}

impl NodePool {
    /// The pool's template, looking references up in `templates`.
    pub fn resolve<'a>(
        &'a self,
        templates: &'a [NodeTemplate],
    ) -> Result<&'a NodeTemplateSpec, ResolveError> {
        match &self.template {
            TemplateSource::Inline(t) => Ok(t),
            TemplateSource::Ref(name) => templates
                .iter()
                .find(|t| &t.name == name)
                .map(|t| &t.spec)
                .ok_or_else(|| {
                    let known: Vec<&str> = templates.iter().map(|t| t.name.as_str()).collect();
                    ResolveError::UnknownTemplate {
                        pool: self.name.clone(),
                        name: name.clone(),
                        known: if known.is_empty() {
                            "none".into()
                        } else {
                            known.join(", ")
                        },
                    }
                }),
        }
    }
}

/// Parses a file of node templates separated by `---`.
pub fn parse_node_templates(file: &str, text: &str) -> Result<Vec<NodeTemplate>, ManifestErrors> {
    document::load_all(
        file,
        text,
        &Kind {
            kind: TEMPLATE_KIND,
            noun: "node template",
        },
        |m: NodeTemplateManifest, _: &Value| {
            let mut rules = document::envelope(
                &m.api_version,
                &m.kind,
                TEMPLATE_KIND,
                &m.metadata,
                "node template",
            );
            rules.extend(check_template(&m.spec, "spec"));
            if rules.is_empty() {
                Ok(NodeTemplate {
                    name: m.metadata.name,
                    spec: m.spec,
                })
            } else {
                Err(rules)
            }
        },
        |t: &NodeTemplate| &t.name,
    )
}

/// Parses a file of node pools separated by `---`.
pub fn parse_node_pools(file: &str, text: &str) -> Result<Vec<NodePool>, ManifestErrors> {
    document::load_all(
        file,
        text,
        &Kind {
            kind: POOL_KIND,
            noun: "node pool",
        },
        |m: NodePoolManifest, _: &Value| {
            let mut rules =
                document::envelope(&m.api_version, &m.kind, POOL_KIND, &m.metadata, "node pool");
            rules.extend(check_pool(&m.spec, "spec"));
            if !rules.is_empty() {
                return Err(rules);
            }
            let template = match (m.spec.template, m.spec.template_ref) {
                (Some(t), _) => TemplateSource::Inline(t),
                (None, Some(r)) => TemplateSource::Ref(r),
                (None, None) => return Err(vec![Rule::at("spec", "no template")]),
            };
            Ok(NodePool {
                name: m.metadata.name,
                labels: m.metadata.labels,
                template,
                min_size: m.spec.min_size,
                max_size: m.spec.max_size,
                zones: m.spec.zones,
                warm: m.spec.warm.map_or(0, |w| w.size),
                headroom: m.spec.headroom.as_ref().and_then(|h| h.parse().ok()),
            })
        },
        |p: &NodePool| &p.name,
    )
}

/// The rules of a template, with paths under `prefix`.
pub(crate) fn check_template(t: &NodeTemplateSpec, prefix: &str) -> Vec<Rule> {
    let mut r = Vec::new();
    if t.instance_type.trim().is_empty() {
        r.push(Rule::at(
            format!("{prefix}.instanceType"),
            "is empty; expected the provider's instance type, like m5.xlarge",
        ));
    }
    if let Some(m) = crate::names::problem(&t.provider, "provider") {
        r.push(Rule::at(format!("{prefix}.provider"), m));
    }
    if !(t.price_per_hour.is_finite() && t.price_per_hour >= 0.0) {
        r.push(Rule::at(
            format!("{prefix}.pricePerHour"),
            format!(
                "{} is not a price; expected a cost per node-hour of 0 or more, like 0.192",
                t.price_per_hour
            ),
        ));
    }
    for key in t.labels.keys() {
        if key.trim().is_empty() {
            r.push(Rule::at_key(
                format!("{prefix}.labels.{key}"),
                format!("{key:?} is an empty label key; expected a key like tier"),
            ));
        } else if RESERVED_LABELS.contains(&key.as_str()) {
            r.push(Rule::at_key(
                format!("{prefix}.labels.{key}"),
                format!(
                    "{key:?} is set by the pool itself; expected a label other than {}",
                    RESERVED_LABELS.join(", ")
                ),
            ));
        }
    }
    if t.resources.cpu.0 == 0 {
        r.push(Rule::at(
            format!("{prefix}.resources.cpu"),
            "0 offers nothing; expected the node's allocatable CPU, like 4 or 3500m",
        ));
    }
    if t.resources.memory.0 == 0 {
        r.push(Rule::at(
            format!("{prefix}.resources.memory"),
            "0 offers nothing; expected the node's allocatable memory, like 16Gi",
        ));
    }
    if let Some(g) = &t.resources.gpus {
        if g.count == 0 || g.count > MAX_NODE_GPUS {
            r.push(Rule::at(
                format!("{prefix}.resources.gpus.count"),
                format!(
                    "{} is out of range; expected a whole number from 1 to {MAX_NODE_GPUS} \
                     (leave out gpus for none)",
                    g.count
                ),
            ));
        }
        if g.model.trim().is_empty() {
            r.push(Rule::at(
                format!("{prefix}.resources.gpus.model"),
                "is empty; expected a GPU model name like A100",
            ));
        }
    }
    r
}

/// Labels a pool sets on its nodes.
pub const RESERVED_LABELS: [&str; 4] = ["pool", "zone", "instance_type", "capacity"];

/// The rules of a pool, with paths under `prefix`.
pub(crate) fn check_pool(p: &NodePoolSpec, prefix: &str) -> Vec<Rule> {
    let mut r = Vec::new();
    match (&p.template, &p.template_ref) {
        (Some(_), Some(_)) => r.push(Rule::at(
            format!("{prefix}.templateRef"),
            "is given beside an inline template; expected exactly one of template and \
             templateRef",
        )),
        (None, None) => r.push(Rule::at(
            prefix.to_string(),
            "has no template; expected exactly one of template (inline) and templateRef (a \
             NodeTemplate's name)",
        )),
        (Some(t), None) => r.extend(check_template(t, &format!("{prefix}.template"))),
        (None, Some(name)) => {
            if let Some(m) = crate::names::problem(name, "node template") {
                r.push(Rule::at(format!("{prefix}.templateRef"), m));
            }
        }
    }
    r.extend(check_sizes(p.min_size, p.max_size, prefix));
    r.extend(check_zones(&p.zones, prefix));
    if let Some(h) = &p.headroom {
        match h.parse() {
            Err(e) => r.push(Rule::at(format!("{prefix}.headroom"), e)),
            Ok(Headroom::Nodes(n)) if n > p.max_size => r.push(Rule::at(
                format!("{prefix}.headroom"),
                format!(
                    "{n} is above maxSize ({}); expected at most maxSize",
                    p.max_size
                ),
            )),
            Ok(_) => {}
        }
    }
    if let Some(w) = &p.warm {
        let path = format!("{prefix}.warm");
        r.extend(check_warm(w, p.max_size, &path, None));
        if w.state != WarmState::Stopped {
            r.push(Rule::at(
                format!("{path}.state"),
                format!(
                    "{} is not offered by NovaCron's providers yet; expected stopped",
                    w.state
                ),
            ));
        }
        if w.start_delay.is_some() || w.price_per_hour.is_some() {
            r.push(Rule::at(
                path,
                "startDelay and pricePerHour are the simulator's; a real pool measures its \
                 start and prices a stopped node by its disk; expected only size and state"
                    .to_string(),
            ));
        }
    }
    r
}

pub(crate) fn check_sizes(min: u32, max: u32, prefix: &str) -> Vec<Rule> {
    let mut r = Vec::new();
    if max == 0 || max > MAX_POOL_SIZE {
        r.push(Rule::at(
            format!("{prefix}.maxSize"),
            format!("{max} is out of range; expected a whole number from 1 to {MAX_POOL_SIZE}"),
        ));
    }
    if min > max {
        r.push(Rule::at(
            format!("{prefix}.minSize"),
            format!("{min} is above maxSize ({max}); expected a minSize at most maxSize"),
        ));
    }
    r
}

pub(crate) fn check_zones(zones: &[String], prefix: &str) -> Vec<Rule> {
    let mut r = Vec::new();
    for (i, z) in zones.iter().enumerate() {
        if let Some(m) = crate::names::problem(z, "zone") {
            r.push(Rule::at(format!("{prefix}.zones[{i}]"), m));
        } else if zones[..i].contains(z) {
            r.push(Rule::at(
                format!("{prefix}.zones[{i}]"),
                format!("{z:?} is listed twice; expected each zone once"),
            ));
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> NodeTemplateSpec {
        NodeTemplateSpec {
            instance_type: "m5.xlarge".into(),
            provider: "aws".into(),
            capacity_type: CapacityType::OnDemand,
            price_per_hour: 0.192,
            labels: BTreeMap::new(),
            resources: NodeResources {
                cpu: Millicores(4000),
                memory: ByteSize(16 << 30),
                gpus: None,
            },
        }
    }

    #[test]
    fn a_warm_node_pays_its_disk_its_memory_image_or_everything() {
        let t = template();
        let disk = 8.0 * 0.08 / 730.0;
        assert!((warm_price_per_hour(&t, WarmState::Stopped) - disk).abs() < 1e-12);
        let hibernated = (8.0 + 16.0) * 0.08 / 730.0;
        assert!((warm_price_per_hour(&t, WarmState::Hibernated) - hibernated).abs() < 1e-12);
        assert_eq!(warm_price_per_hour(&t, WarmState::Running), 0.192);
        assert_eq!(
            warm_start_delay("aws", WarmState::Running),
            Some(std::time::Duration::ZERO)
        );
        assert_eq!(
            warm_start_delay("docker", WarmState::Stopped),
            Some(DOCKER_WARM_START)
        );
        assert_eq!(warm_start_delay("aws", WarmState::Stopped), None);
    }

    #[test]
    fn headroom_is_a_count_or_a_share() {
        let text = |h: &str| {
            format!(
                "apiVersion: novacron.io/v1\nkind: NodePool\nmetadata: {{name: p}}\nspec:\n  templateRef: t\n  minSize: 0\n  maxSize: 4\n  headroom: {h}\n"
            )
        };
        let ok = parse_node_pools("p.yaml", &text("\"25%\"")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok[0].headroom, Some(Headroom::Percent(25.0)));
        let ok = parse_node_pools("p.yaml", &text("1")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok[0].headroom, Some(Headroom::Nodes(1)));
        for (h, want) in [
            (
                "\"lots\"",
                "p.yaml:8:13: spec.headroom: \"lots\" is not a headroom",
            ),
            ("\"0%\"", "is not a headroom"),
            ("9", "spec.headroom: 9 is above maxSize (4)"),
        ] {
            let e = parse_node_pools("p.yaml", &text(h))
                .expect_err(h)
                .to_string();
            assert!(e.contains(want), "{h}: {e}");
        }
    }

    #[test]
    fn warm_settings_are_checked() {
        let t = template();
        let w = WarmSpec {
            size: 3,
            state: WarmState::Hibernated,
            start_delay: None,
            price_per_hour: Some(-1.0),
        };
        let rules = check_warm(&w, 2, "spec.warm", Some(&t));
        let text: Vec<String> = rules
            .iter()
            .map(|r| format!("{}: {}", r.path, r.message))
            .collect();
        assert_eq!(text.len(), 3, "{text:#?}");
        assert!(text[0].starts_with("spec.warm.size: 3 is above maxSize (2)"));
        assert!(text[1].contains("no start time for hibernated nodes"));
        assert!(text[2].starts_with("spec.warm.pricePerHour: -1 is not a price"));
    }
}

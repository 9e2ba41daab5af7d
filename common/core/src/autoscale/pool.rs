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
    /// The provider that makes it (`docker`, `aws`).
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

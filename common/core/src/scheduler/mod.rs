//! The scheduler: where the replicas of a job go. Pure and deterministic: it takes a
//! [`Snapshot`] of the fleet and a [`Request`], and returns an [`Outcome`] (nodes,
//! GPUs, allocations to preempt, and an [`Explanation`]). No I/O, no clock, no
//! randomness; the same snapshot and request always give the same outcome.
//!
//! # Pipeline
//!
//! A node takes a replica when every [`Filter`] passes, in this order:
//! `ready`, `pinned` (system jobs name their node), `constraints` (all six label
//! operators), `job_anti_affinity` (hard: one replica of the job per node), `gpu`
//! (enough free GPUs whose model contains the requested substring, ASCII
//! case-insensitive, and with the requested memory), `cpu`, `memory`, `disk`,
//! `ports` (every static host port free on the node, and enough free ports in the
//! node's dynamic range for the ports without one). Custom filters run after the
//! built-ins. Among the nodes that pass, the highest total score wins,
//! ties going to the lowest node name. The score is the sum of each [`Scorer`]'s
//! weight times its score in `0..=1`:
//!
//! | scorer        | weight                                   | score                                                      |
//! |---------------|------------------------------------------|------------------------------------------------------------|
//! | `resources`   | 1                                        | binpack: mean utilization of cpu, memory (and GPUs for GPU jobs) after placement; spread strategy: 1 minus that |
//! | `affinity`    | Σ weights of affinity + anti-affinity / 50 | share of that weight satisfied (affinity matched, anti-affinity not matched) |
//! | `spread`      | Σ spread weights / 25                   | per label: 1 for the values with fewest replicas of the job, 0 for the most, linear between; nodes without the label score 0 |
//! | `gpu_reserve` | 0.5 for jobs without GPUs               | 0 on nodes with GPUs, 1 elsewhere: keeps GPU nodes free for GPU work |
//! | `avoid`       | 1000 when the request avoids nodes       | 0 on the nodes in [`Request::avoid`] (where the job failed), 1 elsewhere: any other node that fits wins |
//!
//! A spread of the default weight (50) therefore outweighs any difference in
//! packing, so replicas even out across label values first, and pack within them.
//!
//! Replicas are placed one at a time; each sees the resources the previous ones
//! took, so a request never over-commits a node.
//!
//! Host ports are a resource of the node. A static port (`hostPort: 8080`) is free
//! when no allocation on the node holds the same port and protocol (TCP and UDP
//! are separate); a port without one gets the lowest free port of the node's
//! dynamic range ([`Capacity::dynamic_ports`]), chosen here so that the controller
//! knows it before the container starts ([`Assignment::ports`]). When a replica fits nowhere, the
//! scheduler looks for **preemption**: a node where evicting allocations of other
//! jobs with *strictly lower* priority makes it fit. Victims are taken lowest
//! priority first (largest first within a priority, then by id), then any victim
//! not needed after all is given back; the node whose eviction set has the lowest
//! highest priority, then the fewest evictions, then the lowest name, wins.
//! Allocations of equal or higher priority, and of the job itself, are never
//! evicted.
//!
//! # Performance: an ordered walk instead of a scan
//!
//! Scanning every node for every replica costs about 10 k checks per placement at
//! 10 k nodes. Random sampling (Nomad evaluates `log2 n` random feasible nodes)
//! is fast but ruins bin packing: in a mostly empty fleet the sample rarely holds
//! the partly filled nodes. Instead the snapshot keeps the ready nodes in two
//! ordered indexes, by free CPU and by free memory, and an inverted index of labels:
//!
//! 1. Label filters (`ready`, `pinned`, `constraints`, the static part of `gpu`)
//!    become a bitset of eligible nodes through the label index, in a few
//!    microseconds (a [`Prefilter`]); they are not checked node by node.
//! 2. If at most [`Tuning::exhaustive_below`] nodes are eligible, every one is
//!    evaluated: the choice is exact.
//! 3. Otherwise the scheduler walks the index of the request's dominant resource
//!    (its largest share of the mean node), starting at the request's size:
//!    ascending for binpack (the tightest fit first: best fit), descending for the
//!    spread strategy (the emptiest first). Nodes with the same free amount come in
//!    a fixed shuffled order, not name order, since names often group by zone. The
//!    walk stops after [`Tuning::candidates`] feasible nodes (default
//!    `max(2, ceil(log2 n))`). When the score depends on labels (affinity, spread),
//!    it also sees at least [`Tuning::soft_sample`] eligible nodes, and goes on
//!    until a feasible node gets the best label score that any eligible node can
//!    get ([`Scorer::best_possible`]: for spread, a node in a least-used value; for
//!    affinity, computed exactly from the label index), but not past
//!    [`Tuning::soft_limit`] eligible nodes.
//!
//! The trade-off: the chosen node is the best among the tightest fits on the
//! dominant resource, not necessarily the best in the whole fleet. A soft
//! preference whose nodes lie beyond `soft_limit` in the walk (all of them full
//! or nearly so) may be missed; hard rules never are. The walk never stops before
//! a feasible node was found, so "fits nowhere" is always exact; the
//! [`Explanation`] of a replica that fits nowhere comes from a full scan of every
//! node through every filter, so its counts are exact and add up to the number of
//! nodes. Costs: a placement is O(log n + nodes walked); a request that fits
//! nowhere costs a full scan and a preemption search, O(n + allocations).
//!
//! Measured (see `BENCHMARKS.md` and `common/core/examples/sched_bench.rs`): the walk
//! packs as tightly as the exhaustive search on the benchmark workloads, at more
//! than 100 000 placements/s on one core at 10 000 nodes.
//!
//! # Determinism
//!
//! Nodes are indexed in name order; every tie (scores, walk order, victims) is
//! broken by a fixed key ending in the node name or allocation id; hash maps are
//! only looked up, never iterated into a decision. The order of the nodes and
//! allocations given to [`Snapshot::new`] does not matter.
//!
//! # Using it
//!
//! Build one [`Snapshot`] per scheduling pass (O(n log n): about 18 ms at 10 000
//! nodes) and [`Snapshot::commit`] each outcome into it, so the next request sees
//! it; a placement costs microseconds. [`Scheduler::schedule`] itself never changes
//! the snapshot, so a what-if (a simulation, a dry run) is a call without a commit.
//!
//! ```
//! use std::collections::BTreeMap;
//! use novacron_core::manifest::{ByteSize, Millicores};
//! use novacron_core::scheduler::{NodeInfo, Request, Scheduler, Snapshot};
//! use novacron_wire::Capacity;
//!
//! let node = |name: &str| NodeInfo {
//!     name: name.into(),
//!     labels: BTreeMap::new(),
//!     capacity: Capacity { cpu_millis: 4000, memory_bytes: 8 << 30, ..Capacity::default() },
//!     ready: true,
//! };
//! let mut snap = Snapshot::new(vec![node("a"), node("b")], vec![]).expect("valid snapshot");
//! let mut req = Request::new("web", 5);
//! req.resources.cpu = Millicores(1500);
//! req.resources.memory = ByteSize(1 << 30);
//! let out = Scheduler::default().schedule(&snap, &req);
//! let nodes: Vec<&str> = out.assignments.iter().map(|a| a.node.as_str()).collect();
//! assert_eq!(nodes, ["a", "a", "b", "b"]); // binpack: fill a, then b
//! assert_eq!(out.unplaced, 1);
//! assert_eq!(
//!     out.explanation.to_string(),
//!     "0/2 nodes fit: 2 insufficient cpu (needs 1500m, best node has 1000m free)"
//! );
//! let ids: Vec<String> = (1..=4).map(|i| format!("web-{i}")).collect();
//! snap.commit(&req, &out, &ids).expect("fresh ids");
//! assert_eq!(snap.replicas("web").len(), 2);
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use serde::Serialize;

mod explain;
mod filter;
mod place;
mod score;
mod snapshot;
#[cfg(test)]
mod tests;

use explain::*;
use filter::*;
use place::*;
use snapshot::*;

pub use explain::{Explanation, FilterStats, Reason};
pub use filter::{
    ConstraintFilter, CpuFilter, DiskFilter, GpuFilter, JobAntiAffinityFilter, MemoryFilter,
    PinFilter, PortFilter, ReadyFilter,
};
pub use score::{
    AffinityScorer, AvoidScorer, GpuReserveScorer, ImageScorer, ResourceScorer, SpreadScorer,
};
pub use snapshot::{NodeSet, NodeView, Snapshot, SnapshotError, SpreadPosition, Usage};

use crate::manifest::{
    Constraint, GpuRequest, JobSpec, Operator, Placement, Protocol, Resources, Strategy,
    WeightedConstraint,
};
use novacron_wire::{Capacity, PortRange};

/// The most GPUs one node may have (they are tracked in a 64-bit mask).
pub const MAX_GPUS_PER_NODE: usize = 64;
/// Default [`Tuning::exhaustive_below`].
pub const DEFAULT_EXHAUSTIVE_BELOW: usize = 512;
/// Default [`Tuning::soft_sample`].
pub const DEFAULT_SOFT_SAMPLE: usize = 256;
/// Affinity rules up to which the best achievable affinity score is computed
/// exactly (2^n combinations); beyond, 1 is assumed.
pub const MAX_EXACT_AFFINITY_RULES: usize = 6;
/// Default [`Tuning::soft_limit`].
pub const DEFAULT_SOFT_LIMIT: usize = 2048;
/// Weight of the `resources` scorer.
pub const RESOURCES_WEIGHT: f64 = 1.0;
/// Weight of the `gpu_reserve` scorer for jobs without GPUs.
pub const GPU_RESERVE_WEIGHT: f64 = 0.5;
/// Weight of the `avoid` scorer: more than every other scorer together, so a node
/// in [`Request::avoid`] is chosen only when no other node fits.
pub const AVOID_WEIGHT: f64 = 1000.0;
/// An affinity weight worth the whole `resources` score.
pub const AFFINITY_WEIGHT_UNIT: f64 = 50.0;
/// A spread weight worth the whole `resources` score (the default 50 is worth two).
pub const SPREAD_WEIGHT_UNIT: f64 = 25.0;
/// Weight of the `image` scorer: a node that already holds the task's image
/// beats a better-packed one (no pull, a start in seconds), while affinity and
/// spread still decide over it.
pub const IMAGE_WEIGHT: f64 = 2.0;

/// No allocation evicted (for views outside a request's pass).
static NO_EVICTIONS: BTreeSet<usize> = BTreeSet::new();

/// A node as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInfo {
    /// Name (from its certificate).
    pub name: String,
    /// Labels (`zone`, `pool`, ...).
    pub labels: BTreeMap<String, String>,
    /// Allocatable resources.
    pub capacity: Capacity,
    /// Whether it takes new work (connected, not draining).
    pub ready: bool,
}

/// An allocation that holds resources on a node (pending or running).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    /// Allocation id.
    pub alloc_id: String,
    /// Its job.
    pub job: String,
    /// Its node.
    pub node: String,
    /// CPU it holds.
    pub cpu_millis: u64,
    /// Memory it holds.
    pub memory_bytes: u64,
    /// GPUs it holds (uuids of the node's GPUs).
    pub gpu_uuids: Vec<String>,
    /// Its job's priority.
    pub priority: u32,
    /// Disk it holds.
    pub disk_bytes: u64,
    /// Host ports it holds, static and dynamic.
    pub host_ports: Vec<HostPort>,
}

/// A host port: its number and protocol (a TCP and a UDP port of the same number
/// are different ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct HostPort {
    /// The port number.
    pub port: u16,
    /// `true` for UDP.
    pub udp: bool,
}

impl HostPort {
    /// A TCP port.
    pub fn tcp(port: u16) -> Self {
        HostPort { port, udp: false }
    }

    /// A UDP port.
    pub fn udp(port: u16) -> Self {
        HostPort { port, udp: true }
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, if self.udp { "udp" } else { "tcp" })
    }
}

/// A port each replica publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortRequest {
    /// Its name in the manifest.
    pub name: String,
    /// A static host port; `None` takes one from the node's dynamic range.
    pub host_port: Option<u16>,
    /// `true` for UDP.
    pub udp: bool,
}

/// A published port of a placed replica, with its host port decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AssignedPort {
    /// Its name in the manifest.
    pub name: String,
    /// The host port: the static one, or the one taken from the dynamic range.
    pub host_port: u16,
    /// `true` for UDP.
    pub udp: bool,
}

impl AssignedPort {
    /// The host port it holds.
    pub fn host(&self) -> HostPort {
        HostPort {
            port: self.host_port,
            udp: self.udp,
        }
    }
}

/// Place `count` new replicas of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// The job.
    pub job: String,
    /// Its priority: it may preempt allocations of strictly lower priority.
    pub priority: u32,
    /// What each replica needs.
    pub resources: Resources,
    /// Where replicas may and should go.
    pub placement: Placement,
    /// How many replicas.
    pub count: u32,
    /// The only node allowed (system jobs).
    pub node: Option<String>,
    /// Nodes to stay off unless no other fits (where the job failed).
    pub avoid: Vec<String>,
    /// The ports each replica publishes on its node.
    pub ports: Vec<PortRequest>,
    /// Nodes that already hold the task's image (from their inventories): the
    /// `image` scorer prefers them.
    pub image_nodes: BTreeSet<String>,
    /// Whether its GPUs are passed through to a virtual machine (GPUs bound to
    /// `vfio-pci`) rather than given to a container (GPUs of NVIDIA's driver).
    pub gpu_passthrough: bool,
}

impl Request {
    /// `count` replicas of `job` needing nothing, priority 50, default placement.
    pub fn new(job: impl Into<String>, count: u32) -> Self {
        Request {
            job: job.into(),
            priority: 50,
            resources: Resources::default(),
            placement: Placement::default(),
            count,
            node: None,
            avoid: Vec::new(),
            ports: Vec::new(),
            image_nodes: BTreeSet::new(),
            gpu_passthrough: false,
        }
    }

    /// `count` replicas of the job `name` with `spec`.
    pub fn from_spec(name: &str, spec: &JobSpec, count: u32) -> Self {
        Request {
            job: name.to_string(),
            priority: spec.priority,
            resources: spec.resources.clone(),
            placement: {
                let mut placement = spec.placement.clone();
                // A virtual machine goes only where QEMU runs.
                if spec.task.vm.is_some() {
                    placement.constraints.push(crate::manifest::Constraint {
                        key: crate::manifest::VM_NODE_LABEL.to_owned(),
                        operator: crate::manifest::Operator::Exists,
                        values: Vec::new(),
                    });
                }
                // A guest on the bridge network, only where a VM bridge is.
                if spec.task.vm.as_ref().and_then(|v| v.network)
                    == Some(novacron_wire::VmNetwork::Bridge)
                {
                    placement.constraints.push(crate::manifest::Constraint {
                        key: crate::manifest::VM_BRIDGE_LABEL.to_owned(),
                        operator: crate::manifest::Operator::Exists,
                        values: Vec::new(),
                    });
                }
                placement
            },
            count,
            node: None,
            avoid: Vec::new(),
            ports: spec
                .task
                .ports
                .iter()
                .map(|p| PortRequest {
                    name: p.name.clone(),
                    host_port: p.host_port,
                    udp: p.protocol == Protocol::Udp,
                })
                .collect(),
            image_nodes: BTreeSet::new(),
            // A virtual machine's GPUs are whole devices passed through.
            gpu_passthrough: spec.task.vm.is_some(),
        }
    }

    /// The static host ports each replica holds.
    pub fn static_ports(&self) -> impl Iterator<Item = HostPort> + '_ {
        self.ports
            .iter()
            .filter_map(|p| p.host_port.map(|port| HostPort { port, udp: p.udp }))
    }

    /// How many ports each replica takes from the node's dynamic range.
    pub fn dynamic_port_count(&self) -> u32 {
        self.ports.iter().filter(|p| p.host_port.is_none()).count() as u32
    }

    /// GPUs each replica needs (0 without a GPU request).
    pub fn gpu_count(&self) -> u32 {
        self.resources.gpus.as_ref().map_or(0, |g| g.count)
    }
}

/// What a filter can say about all nodes at once, from the snapshot's indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prefilter {
    /// Nothing: check every candidate node.
    PerNode,
    /// Every node passes for this request: skip the filter.
    Skip,
    /// Exactly these nodes pass: no node-by-node check needed.
    Exact(NodeSet),
    /// Only these nodes can pass; check them node by node.
    Within(NodeSet),
}

/// A hard rule: a node that fails it does not take the replica.
pub trait Filter: fmt::Debug + Send + Sync {
    /// Short stable name, the key in [`Explanation::filtered`].
    fn name(&self) -> &'static str;
    /// Whether `node` can take one more replica of `req`.
    fn check(&self, node: &NodeView<'_>, req: &Request) -> Result<(), Reason>;
    /// What can be said for all nodes at once. It must agree with
    /// [`Filter::check`]; the scheduler uses it to skip node-by-node checks.
    fn prefilter(&self, _snap: &Snapshot, _req: &Request) -> Prefilter {
        Prefilter::PerNode
    }
}

/// A soft rule: ranks the nodes that pass every filter.
pub trait Scorer: fmt::Debug + Send + Sync {
    /// Short stable name.
    fn name(&self) -> &'static str;
    /// This scorer's weight for `req`; 0 leaves it out.
    fn weight(&self, req: &Request) -> f64;
    /// How good `node` is for one more replica of `req`, in `0..=1` (clamped).
    fn score(&self, node: &NodeView<'_>, req: &Request) -> f64;
    /// Whether the score depends on node labels for `req`; the scheduler then looks
    /// at a wider sample of nodes ([`Tuning::soft_sample`]).
    fn label_sensitive(&self, _req: &Request) -> bool {
        false
    }
    /// For a label-sensitive scorer, the best score any node of `eligible` can get
    /// (an upper bound will do; 1 is always one). The walk goes on until a
    /// feasible node reaches it, up to [`Tuning::soft_limit`].
    fn best_possible(&self, _snap: &Snapshot, _eligible: &NodeSet, _req: &Request) -> f64 {
        1.0
    }
}

/// How hard the scheduler looks (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Feasible nodes to compare before choosing; `None` is `max(2, ceil(log2 n))`.
    pub candidates: Option<usize>,
    /// Eligible nodes to see at least when the score depends on labels.
    pub soft_sample: usize,
    /// When the score depends on labels, the walk goes on past `soft_sample`
    /// until a feasible node reaches the best label score any eligible node can
    /// get, but not past this many eligible nodes.
    pub soft_limit: usize,
    /// Evaluate every eligible node when there are at most this many.
    pub exhaustive_below: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            candidates: None,
            soft_sample: DEFAULT_SOFT_SAMPLE,
            soft_limit: DEFAULT_SOFT_LIMIT,
            exhaustive_below: DEFAULT_EXHAUSTIVE_BELOW,
        }
    }
}

impl Tuning {
    /// Evaluates every eligible node for every replica: slow, exact.
    pub fn exhaustive() -> Self {
        Tuning {
            candidates: Some(usize::MAX),
            soft_sample: usize::MAX,
            soft_limit: usize::MAX,
            exhaustive_below: usize::MAX,
        }
    }
}

/// The filters and scorers, and how hard to look.
#[derive(Debug)]
pub struct Scheduler {
    filters: Vec<Box<dyn Filter>>,
    scorers: Vec<Box<dyn Scorer>>,
    tuning: Tuning,
}

impl Default for Scheduler {
    fn default() -> Self {
        Scheduler::new(Tuning::default())
    }
}

/// Where the replicas of one request go.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// One per placed replica, in placement order.
    pub assignments: Vec<Assignment>,
    /// Allocations to evict, all of strictly lower priority than the request.
    pub preemptions: Vec<String>,
    /// Replicas that fit nowhere, even with preemption.
    pub unplaced: u32,
    /// Why: for the first replica that did not fit without preemption, an exact
    /// account over every node; otherwise the first replica's (sampled) pass.
    pub explanation: Explanation,
}

/// One placed replica.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Assignment {
    /// The node.
    pub node: String,
    /// The GPUs it gets.
    pub gpu_uuids: Vec<String>,
    /// Allocations evicted to make room for it.
    pub preempted: Vec<String>,
    /// Its published ports, in the order of [`Request::ports`], with their host
    /// ports.
    pub ports: Vec<AssignedPort>,
    /// Its score on that node.
    pub score: f64,
}

impl Scheduler {
    /// The built-in filters and scorers.
    pub fn new(tuning: Tuning) -> Self {
        Scheduler {
            filters: vec![
                Box::new(ReadyFilter),
                Box::new(PinFilter),
                Box::new(ConstraintFilter),
                Box::new(JobAntiAffinityFilter),
                Box::new(GpuFilter),
                Box::new(CpuFilter),
                Box::new(MemoryFilter),
                Box::new(DiskFilter),
                Box::new(PortFilter),
            ],
            scorers: vec![
                Box::new(ResourceScorer),
                Box::new(AffinityScorer),
                Box::new(SpreadScorer),
                Box::new(GpuReserveScorer),
                Box::new(AvoidScorer),
                Box::new(ImageScorer),
            ],
            tuning,
        }
    }

    /// Adds a filter after the others.
    pub fn with_filter(mut self, filter: impl Filter + 'static) -> Self {
        self.filters.push(Box::new(filter));
        self
    }

    /// Adds a scorer.
    pub fn with_scorer(mut self, scorer: impl Scorer + 'static) -> Self {
        self.scorers.push(Box::new(scorer));
        self
    }

    /// The tuning.
    pub fn tuning(&self) -> Tuning {
        self.tuning
    }

    /// Places the replicas of `req` on `snap`. The snapshot is not changed; see
    /// [`Snapshot::commit`].
    pub fn schedule(&self, snap: &Snapshot, req: &Request) -> Outcome {
        let plan = Plan::new(self, snap, req);
        let mut spreads = spread_states(snap, req, &plan);
        let mut overlay = Overlay::new(snap.len());
        let mut out = Outcome {
            assignments: Vec::new(),
            preemptions: Vec::new(),
            unplaced: 0,
            explanation: Explanation {
                nodes_total: snap.len(),
                ..Explanation::default()
            },
        };
        let mut explained = false;
        for replica in 0..req.count {
            let ctx = Ctx {
                sched: self,
                snap,
                req,
                plan: &plan,
                spreads: &spreads,
                overlay: &overlay,
            };
            let mut pass = Pass::new(replica == 0, self.filters.len());
            ctx.pick(&mut pass);
            if replica == 0 {
                out.explanation = pass.explanation(self, snap, req);
            }
            let mut preempted = Vec::new();
            let chosen = match pass.best {
                Some((score, idx)) => Some((score, idx)),
                None => {
                    let (mut expl, found) = ctx.full_scan();
                    debug_assert!(found.is_none(), "the walk missed a feasible node");
                    let chosen = match found {
                        Some(c) => Some(c),
                        None => match ctx.preempt() {
                            (Some(p), _) => {
                                expl.preemption = Some(format!(
                                    "placed on {} by preempting {} allocation(s) of priority {} or lower",
                                    snap.nodes[p.idx as usize].info.name,
                                    p.victims.len(),
                                    p.max_priority
                                ));
                                preempted = p.victims;
                                Some((f64::NAN, p.idx))
                            }
                            (None, 0) => None,
                            (None, nodes) => {
                                expl.preemption = Some(format!(
                                    "preempting allocations of priority below {} on {nodes} node(s) \
                                     would not make room",
                                    req.priority
                                ));
                                None
                            }
                        },
                    };
                    // Keep the first failure's account; a later one replaces an
                    // account that ended in a placement.
                    if !explained || chosen.is_none() {
                        out.explanation = expl;
                        explained = true;
                    }
                    chosen
                }
            };
            let Some((score, idx)) = chosen else {
                out.unplaced = req.count - replica;
                break;
            };
            for &slot in &preempted {
                overlay.evict(snap, &plan, slot);
            }
            let view = ctx_view(snap, &plan, &spreads, &overlay, idx);
            let score = if score.is_nan() {
                plan.score(&view, req)
            } else {
                score
            };
            let gpus = choose_gpus(&view, req);
            // The port filter passed on this view, so the ports are there.
            let ports = view.assign_ports(req).unwrap_or_default();
            let info = &snap.nodes[idx as usize].info;
            out.assignments.push(Assignment {
                node: info.name.clone(),
                ports: ports.clone(),
                gpu_uuids: (0..info.capacity.gpus.len())
                    .filter(|i| gpus & (1 << i) != 0)
                    .map(|i| info.capacity.gpus[i].uuid.clone())
                    .collect(),
                preempted: preempted
                    .iter()
                    .filter_map(|&s| snap.allocs[s].as_ref())
                    .map(|a| a.placed.alloc_id.clone())
                    .collect(),
                score,
            });
            out.preemptions.extend(
                out.assignments
                    .last()
                    .into_iter()
                    .flat_map(|a| a.preempted.clone()),
            );
            overlay.place(snap, &plan, req, idx, gpus, &ports);
            for s in &mut spreads {
                s.add(idx);
            }
        }
        out
    }
}

/// Places with the default scheduler. Prefer keeping a [`Scheduler`] around.
pub fn schedule(snap: &Snapshot, req: &Request) -> Outcome {
    Scheduler::default().schedule(snap, req)
}

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
        }
    }

    /// `count` replicas of the job `name` with `spec`.
    pub fn from_spec(name: &str, spec: &JobSpec, count: u32) -> Self {
        Request {
            job: name.to_string(),
            priority: spec.priority,
            resources: spec.resources.clone(),
            placement: spec.placement.clone(),
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

/// Why a snapshot or a commit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// Two nodes have the same name.
    #[error("node {0} appears twice in the snapshot")]
    DuplicateNode(String),
    /// A node reports more GPUs than the scheduler tracks.
    #[error("node {node} has {count} GPUs; at most {MAX_GPUS_PER_NODE} are supported")]
    TooManyGpus {
        /// The node.
        node: String,
        /// Its GPU count.
        count: usize,
    },
    /// Two allocations have the same id.
    #[error("allocation {0} appears twice")]
    DuplicateAllocation(String),
    /// An allocation names a node that is not in the snapshot.
    #[error(
        "allocation {alloc} is on node {node}, which is not in the snapshot (mark it lost first)"
    )]
    UnknownNode {
        /// The allocation.
        alloc: String,
        /// The node it names.
        node: String,
    },
    /// An allocation holds a GPU its node does not have.
    #[error("allocation {alloc} holds GPU {uuid}, which node {node} does not have")]
    UnknownGpu {
        /// The allocation.
        alloc: String,
        /// Its node.
        node: String,
        /// The GPU uuid.
        uuid: String,
    },
    /// Two allocations hold the same GPU.
    #[error("allocation {alloc} holds GPU {uuid} on node {node}, which another allocation holds")]
    GpuInUse {
        /// The allocation.
        alloc: String,
        /// Its node.
        node: String,
        /// The GPU uuid.
        uuid: String,
    },
    /// A commit got a different number of ids than the outcome placed replicas.
    #[error("commit got {ids} allocation ids for {assignments} assignments")]
    IdCount {
        /// Ids given.
        ids: usize,
        /// Replicas placed.
        assignments: usize,
    },
    /// A commit names an allocation to preempt that is not in the snapshot.
    #[error("allocation {0} to preempt is not in the snapshot")]
    UnknownAllocation(String),
}

/// A set of nodes of one snapshot, by index (nodes are indexed in name order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSet {
    words: Vec<u64>,
    len: usize,
}

impl NodeSet {
    /// No node of a snapshot of `len` nodes.
    pub fn empty(len: usize) -> Self {
        NodeSet {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    /// Every node of a snapshot of `len` nodes.
    pub fn full(len: usize) -> Self {
        let mut s = NodeSet {
            words: vec![u64::MAX; len.div_ceil(64)],
            len,
        };
        s.trim();
        s
    }

    /// Whether node `idx` is in the set.
    pub fn contains(&self, idx: u32) -> bool {
        let i = idx as usize;
        self.words
            .get(i / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Adds node `idx` (ignored when out of range).
    pub fn insert(&mut self, idx: u32) {
        let i = idx as usize;
        if i < self.len {
            self.words[i / 64] |= 1 << (i % 64);
        }
    }

    /// Removes node `idx`.
    pub fn remove(&mut self, idx: u32) {
        let i = idx as usize;
        if let Some(w) = self.words.get_mut(i / 64) {
            *w &= !(1 << (i % 64));
        }
    }

    /// Keeps only the nodes also in `other`.
    pub fn intersect_with(&mut self, other: &NodeSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a &= b;
        }
    }

    /// Adds the nodes of `other`.
    pub fn union_with(&mut self, other: &NodeSet) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Replaces the set by the nodes not in it.
    pub fn complement(&mut self) {
        for w in &mut self.words {
            *w = !*w;
        }
        self.trim();
    }

    /// Number of nodes in the set.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The nodes in the set, in index (name) order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let bit = w.trailing_zeros();
                w &= w - 1;
                Some((i * 64) as u32 + bit)
            })
        })
    }

    fn trim(&mut self) {
        let rem = self.len % 64;
        if rem != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << rem) - 1;
        }
    }
}

/// The fleet as the scheduler sees it: nodes, the allocations holding resources,
/// and the indexes built from them (free resources, labels, replicas per job).
#[derive(Clone)]
pub struct Snapshot {
    nodes: Vec<NodeEntry>,
    by_name: HashMap<String, u32>,
    labels: HashMap<String, KeyIndex>,
    ready: NodeSet,
    gpu_nodes: Vec<u32>,
    by_cpu: BTreeSet<WalkKey>,
    by_mem: BTreeSet<WalkKey>,
    allocs: Vec<Option<AllocEntry>>,
    free_slots: Vec<usize>,
    alloc_slot: HashMap<String, usize>,
    jobs: HashMap<String, IdxMap<u32>>,
    mean_cpu: f64,
    mean_mem: f64,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("nodes", &self.nodes.len())
            .field("ready", &self.ready.count())
            .field("allocations", &self.alloc_slot.len())
            .field("jobs", &self.jobs.len())
            .finish()
    }
}

/// Resources held on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// CPU held.
    pub cpu_millis: u64,
    /// Memory held.
    pub memory_bytes: u64,
    /// Disk held.
    pub disk_bytes: u64,
    /// GPUs held, in the node's GPU order.
    pub gpu_uuids: Vec<String>,
    /// Host ports held, sorted.
    pub host_ports: Vec<HostPort>,
    /// Allocations on the node, sorted.
    pub allocations: Vec<String>,
}

impl Snapshot {
    /// Indexes `nodes` and the `allocations` that hold resources on them.
    pub fn new(mut nodes: Vec<NodeInfo>, allocations: Vec<Placed>) -> Result<Self, SnapshotError> {
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(w) = nodes.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(SnapshotError::DuplicateNode(w[0].name.clone()));
        }
        if let Some(n) = nodes
            .iter()
            .find(|n| n.capacity.gpus.len() > MAX_GPUS_PER_NODE)
        {
            return Err(SnapshotError::TooManyGpus {
                node: n.name.clone(),
                count: n.capacity.gpus.len(),
            });
        }
        let n = nodes.len();
        let mut snap = Snapshot {
            nodes: Vec::with_capacity(n),
            by_name: HashMap::with_capacity(n),
            labels: HashMap::new(),
            ready: NodeSet::empty(n),
            gpu_nodes: Vec::new(),
            by_cpu: BTreeSet::new(),
            by_mem: BTreeSet::new(),
            allocs: Vec::with_capacity(allocations.len()),
            free_slots: Vec::new(),
            alloc_slot: HashMap::with_capacity(allocations.len()),
            jobs: HashMap::new(),
            mean_cpu: 0.0,
            mean_mem: 0.0,
        };
        let (mut sum_cpu, mut sum_mem) = (0f64, 0f64);
        for (i, info) in nodes.into_iter().enumerate() {
            let idx = i as u32;
            snap.by_name.insert(info.name.clone(), idx);
            for (k, v) in &info.labels {
                let key = snap
                    .labels
                    .entry(k.clone())
                    .or_insert_with(|| KeyIndex::new(n));
                key.present.insert(idx);
                let next = key.value_ids.len() as u32;
                let id = *key.value_ids.entry(v.clone()).or_insert(next);
                if id == next {
                    key.nodes_by_value.push(Vec::new());
                }
                key.nodes_by_value[id as usize].push(idx);
                key.value_of[i] = id;
            }
            if !info.capacity.gpus.is_empty() {
                snap.gpu_nodes.push(idx);
            }
            if info.ready {
                snap.ready.insert(idx);
                snap.by_cpu.insert(walk_key(info.capacity.cpu_millis, idx));
                snap.by_mem
                    .insert(walk_key(info.capacity.memory_bytes, idx));
                sum_cpu += info.capacity.cpu_millis as f64;
                sum_mem += info.capacity.memory_bytes as f64;
            }
            snap.nodes.push(NodeEntry {
                info,
                used_cpu: 0,
                used_mem: 0,
                used_disk: 0,
                gpu_used: 0,
                allocs: Vec::new(),
                ports: BTreeMap::new(),
            });
        }
        let ready = snap.ready.count().max(1) as f64;
        snap.mean_cpu = sum_cpu / ready;
        snap.mean_mem = sum_mem / ready;
        for a in allocations {
            snap.insert(a)?;
        }
        Ok(snap)
    }

    /// Adds an allocation. Two allocations claiming the same host port on one
    /// node (only possible in state from before ports were scheduled) are both
    /// kept; the port counts as held until the first of them leaves.
    pub fn insert(&mut self, alloc: Placed) -> Result<(), SnapshotError> {
        if self.alloc_slot.contains_key(&alloc.alloc_id) {
            return Err(SnapshotError::DuplicateAllocation(alloc.alloc_id));
        }
        let Some(&idx) = self.by_name.get(&alloc.node) else {
            return Err(SnapshotError::UnknownNode {
                alloc: alloc.alloc_id,
                node: alloc.node,
            });
        };
        let entry = &self.nodes[idx as usize];
        let mut gpu_mask = 0u64;
        for uuid in &alloc.gpu_uuids {
            let Some(pos) = entry
                .info
                .capacity
                .gpus
                .iter()
                .position(|g| &g.uuid == uuid)
            else {
                return Err(SnapshotError::UnknownGpu {
                    alloc: alloc.alloc_id.clone(),
                    node: alloc.node.clone(),
                    uuid: uuid.clone(),
                });
            };
            let bit = 1u64 << pos;
            if (entry.gpu_used | gpu_mask) & bit != 0 {
                return Err(SnapshotError::GpuInUse {
                    alloc: alloc.alloc_id.clone(),
                    node: alloc.node.clone(),
                    uuid: uuid.clone(),
                });
            }
            gpu_mask |= bit;
        }
        self.reindex(idx, |e| {
            e.used_cpu = e.used_cpu.saturating_add(alloc.cpu_millis);
            e.used_mem = e.used_mem.saturating_add(alloc.memory_bytes);
            e.used_disk = e.used_disk.saturating_add(alloc.disk_bytes);
            e.gpu_used |= gpu_mask;
        });
        *self
            .jobs
            .entry(alloc.job.clone())
            .or_default()
            .entry(idx)
            .or_insert(0) += 1;
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.allocs.push(None);
                self.allocs.len() - 1
            }
        };
        let node = &mut self.nodes[idx as usize];
        node.allocs.push(slot);
        for &port in &alloc.host_ports {
            node.ports.entry(port).or_insert(slot);
        }
        self.alloc_slot.insert(alloc.alloc_id.clone(), slot);
        self.allocs[slot] = Some(AllocEntry {
            placed: alloc,
            node: idx,
            gpu_mask,
        });
        Ok(())
    }

    /// Removes an allocation (stopped, evicted, lost), returning it.
    pub fn remove(&mut self, alloc_id: &str) -> Option<Placed> {
        let slot = self.alloc_slot.remove(alloc_id)?;
        let entry = self.allocs[slot].take()?;
        self.free_slots.push(slot);
        let idx = entry.node;
        let p = &entry.placed;
        self.reindex(idx, |e| {
            e.used_cpu = e.used_cpu.saturating_sub(p.cpu_millis);
            e.used_mem = e.used_mem.saturating_sub(p.memory_bytes);
            e.used_disk = e.used_disk.saturating_sub(p.disk_bytes);
            e.gpu_used &= !entry.gpu_mask;
            for port in &p.host_ports {
                if e.ports.get(port) == Some(&slot) {
                    e.ports.remove(port);
                }
            }
            if let Some(pos) = e.allocs.iter().position(|&s| s == slot) {
                e.allocs.swap_remove(pos);
            }
        });
        if let Some(per_node) = self.jobs.get_mut(&p.job) {
            if let Some(c) = per_node.get_mut(&idx) {
                *c -= 1;
                if *c == 0 {
                    per_node.remove(&idx);
                }
            }
            if per_node.is_empty() {
                self.jobs.remove(&p.job);
            }
        }
        Some(entry.placed)
    }

    /// Records an outcome of [`Scheduler::schedule`] for `req`: its preemptions
    /// leave the snapshot and its assignments enter it under `alloc_ids` (one per
    /// assignment, in order). Checks everything before changing anything.
    pub fn commit(
        &mut self,
        req: &Request,
        outcome: &Outcome,
        alloc_ids: &[String],
    ) -> Result<(), SnapshotError> {
        if alloc_ids.len() != outcome.assignments.len() {
            return Err(SnapshotError::IdCount {
                ids: alloc_ids.len(),
                assignments: outcome.assignments.len(),
            });
        }
        if let Some(p) = outcome
            .preemptions
            .iter()
            .find(|p| !self.alloc_slot.contains_key(p.as_str()))
        {
            return Err(SnapshotError::UnknownAllocation(p.clone()));
        }
        let mut seen = BTreeSet::new();
        for id in alloc_ids {
            if !seen.insert(id) || self.alloc_slot.contains_key(id) {
                return Err(SnapshotError::DuplicateAllocation(id.clone()));
            }
        }
        for p in &outcome.preemptions {
            self.remove(p);
        }
        for (a, id) in outcome.assignments.iter().zip(alloc_ids) {
            self.insert(Placed {
                alloc_id: id.clone(),
                job: req.job.clone(),
                node: a.node.clone(),
                cpu_millis: req.resources.cpu.0,
                memory_bytes: req.resources.memory.0,
                gpu_uuids: a.gpu_uuids.clone(),
                priority: req.priority,
                disk_bytes: req.resources.disk.0,
                host_ports: a.ports.iter().map(AssignedPort::host).collect(),
            })?;
        }
        Ok(())
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the snapshot has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The index of node `name` (indexes follow name order).
    pub fn index_of(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).copied()
    }

    /// The nodes, in name (index) order.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.iter().map(|e| &e.info)
    }

    /// The allocations, in no particular order.
    pub fn allocations(&self) -> impl Iterator<Item = &Placed> {
        self.allocs.iter().flatten().map(|a| &a.placed)
    }

    /// One allocation.
    pub fn allocation(&self, alloc_id: &str) -> Option<&Placed> {
        let slot = *self.alloc_slot.get(alloc_id)?;
        self.allocs[slot].as_ref().map(|a| &a.placed)
    }

    /// What is held on node `name`.
    pub fn usage(&self, name: &str) -> Option<Usage> {
        let e = &self.nodes[*self.by_name.get(name)? as usize];
        let mut allocations: Vec<String> = e
            .allocs
            .iter()
            .filter_map(|&s| self.allocs[s].as_ref())
            .map(|a| a.placed.alloc_id.clone())
            .collect();
        allocations.sort();
        Some(Usage {
            cpu_millis: e.used_cpu,
            memory_bytes: e.used_mem,
            disk_bytes: e.used_disk,
            host_ports: e.ports.keys().copied().collect(),
            gpu_uuids: e
                .info
                .capacity
                .gpus
                .iter()
                .enumerate()
                .filter(|(i, _)| e.gpu_used & (1 << i) != 0)
                .map(|(_, g)| g.uuid.clone())
                .collect(),
            allocations,
        })
    }

    /// The host ports one replica of `req` would get on node `name` as it is now
    /// (see [`NodeView::assign_ports`]), whatever its readiness and free
    /// resources: for an allocation that moves to a node chosen before.
    pub fn assign_ports(&self, name: &str, req: &Request) -> Option<Vec<AssignedPort>> {
        let idx = self.index_of(name)?;
        let e = &self.nodes[idx as usize];
        let used = Used {
            cpu: e.used_cpu,
            mem: e.used_mem,
            disk: e.used_disk,
            gpus: e.gpu_used,
        };
        let ports = ports_view(self, idx, &NO_EVICTIONS, &[], &[]);
        view_with(self, &[], idx, used, 0, ports).assign_ports(req)
    }

    /// Replicas of `job` on each node, by node name.
    pub fn replicas(&self, job: &str) -> BTreeMap<String, u32> {
        self.jobs
            .get(job)
            .map(|m| {
                m.iter()
                    .map(|(&i, &c)| (self.nodes[i as usize].info.name.clone(), c))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The nodes whose labels satisfy `key <op> values` (as [`Operator::matches`]),
    /// from the label index.
    pub fn matching(&self, key: &str, op: Operator, values: &[String]) -> NodeSet {
        let n = self.nodes.len();
        let Some(k) = self.labels.get(key) else {
            return match op {
                Operator::NotIn | Operator::DoesNotExist | Operator::NotEqual => NodeSet::full(n),
                Operator::In | Operator::Exists | Operator::Equal => NodeSet::empty(n),
            };
        };
        let with_values = |vals: &[String]| {
            let mut s = NodeSet::empty(n);
            for v in vals {
                if let Some(&id) = k.value_ids.get(v) {
                    for &i in &k.nodes_by_value[id as usize] {
                        s.insert(i);
                    }
                }
            }
            s
        };
        let first = || values.first().map(std::slice::from_ref).unwrap_or(&[]);
        let (mut set, negate) = match op {
            Operator::In => (with_values(values), false),
            Operator::NotIn => (with_values(values), true),
            Operator::Exists => (k.present.clone(), false),
            Operator::DoesNotExist => (k.present.clone(), true),
            Operator::Equal => (with_values(first()), false),
            Operator::NotEqual => (with_values(first()), true),
        };
        if negate {
            set.complement();
        }
        set
    }

    fn reindex(&mut self, idx: u32, change: impl FnOnce(&mut NodeEntry)) {
        let e = &mut self.nodes[idx as usize];
        let ready = e.info.ready;
        let (old_cpu, old_mem) = (e.free_cpu(), e.free_mem());
        change(e);
        let (new_cpu, new_mem) = (e.free_cpu(), e.free_mem());
        if ready {
            self.by_cpu.remove(&walk_key(old_cpu, idx));
            self.by_cpu.insert(walk_key(new_cpu, idx));
            self.by_mem.remove(&walk_key(old_mem, idx));
            self.by_mem.insert(walk_key(new_mem, idx));
        }
    }
}

/// One node at the moment a filter or scorer looks at it: the node, and what is
/// free on it counting the replicas this request placed and the allocations it
/// preempted so far.
#[derive(Debug, Clone, Copy)]
pub struct NodeView<'a> {
    /// The node.
    pub info: &'a NodeInfo,
    /// Free CPU.
    pub free_cpu_millis: u64,
    /// Free memory.
    pub free_memory_bytes: u64,
    /// Free disk.
    pub free_disk_bytes: u64,
    /// Free GPUs: bit `i` set when `info.capacity.gpus[i]` is free.
    pub free_gpus: u64,
    /// Replicas of the request's job on the node.
    pub job_replicas: u32,
    idx: u32,
    spread: &'a [SpreadState<'a>],
    ports: PortsView<'a>,
}

/// The host ports of one node as a filter sees them: those held by allocations
/// (less the ones the request evicts) and those the request took so far.
#[derive(Clone, Copy)]
struct PortsView<'a> {
    held: &'a BTreeMap<HostPort, usize>,
    allocs: &'a [Option<AllocEntry>],
    evicted: &'a BTreeSet<usize>,
    victims: &'a [usize],
    taken: &'a [HostPort],
}

impl fmt::Debug for PortsView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PortsView")
            .field("held", &self.held.keys().collect::<Vec<_>>())
            .field("taken", &self.taken)
            .finish()
    }
}

/// Where a node's label value stands in one spread rule of the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpreadPosition {
    /// Replicas of the job on nodes with this node's value.
    pub count: u32,
    /// Fewest replicas on any value that eligible nodes have.
    pub min: u32,
    /// Most replicas on any value that eligible nodes have.
    pub max: u32,
}

impl<'a> NodeView<'a> {
    /// The job of the allocation holding `port` on this node, unless the request
    /// evicts it.
    pub fn port_holder(&self, port: HostPort) -> Option<&'a str> {
        let slot = *self.ports.held.get(&port)?;
        if self.ports.evicted.contains(&slot) || self.ports.victims.contains(&slot) {
            return None;
        }
        self.ports
            .allocs
            .get(slot)?
            .as_ref()
            .map(|a| a.placed.job.as_str())
    }

    /// Whether a replica of this request already took `port` on this node.
    pub fn port_taken_by_request(&self, port: HostPort) -> bool {
        self.ports.taken.contains(&port)
    }

    /// The host ports one more replica of `req` gets here, in the order of
    /// `req.ports`: each static port, and for the others the lowest ports of the
    /// node's dynamic range that nothing holds. `None` when a static port is taken
    /// or the range has too few free ports.
    pub fn assign_ports(&self, req: &Request) -> Option<Vec<AssignedPort>> {
        let range = self.info.capacity.dynamic_ports;
        let busy = |p: HostPort| self.port_holder(p).is_some() || self.port_taken_by_request(p);
        let mut out: Vec<AssignedPort> = Vec::with_capacity(req.ports.len());
        // The next candidate of the dynamic range, per protocol (TCP, UDP).
        let mut next = [u32::from(range.first); 2];
        for p in &req.ports {
            let port = match p.host_port {
                Some(port) => {
                    if busy(HostPort { port, udp: p.udp }) {
                        return None;
                    }
                    port
                }
                None => {
                    let cursor = &mut next[usize::from(p.udp)];
                    loop {
                        if *cursor > u32::from(range.last) {
                            return None;
                        }
                        // The cursor is at most range.last, a u16.
                        let candidate = HostPort {
                            port: *cursor as u16,
                            udp: p.udp,
                        };
                        *cursor += 1;
                        let static_here = req.static_ports().any(|s| s == candidate);
                        if !busy(candidate) && !static_here {
                            break candidate.port;
                        }
                    }
                }
            };
            out.push(AssignedPort {
                name: p.name.clone(),
                host_port: port,
                udp: p.udp,
            });
        }
        Some(out)
    }

    /// The node's position in the request's spread rule `rule`
    /// (`req.placement.spread[rule]`); `None` when the node lacks the label.
    pub fn spread_position(&self, rule: usize) -> Option<SpreadPosition> {
        let s = self.spread.get(rule)?;
        let v = *s.value_of?.get(self.idx as usize)?;
        if v == ABSENT {
            return None;
        }
        Some(SpreadPosition {
            count: s.counts[v as usize],
            min: s.min,
            max: s.max,
        })
    }
}

/// Why a node cannot take a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The node is not ready.
    NotReady,
    /// The request is pinned to another node.
    NotPinned,
    /// `req.placement.constraints[index]` does not hold.
    Constraint {
        /// Which constraint.
        index: usize,
    },
    /// The node already runs a replica of the job and the job asks for one per node.
    JobAntiAffinity,
    /// Not enough free CPU.
    Cpu {
        /// Needed.
        needed: u64,
        /// Free.
        free: u64,
    },
    /// Not enough free memory.
    Memory {
        /// Needed.
        needed: u64,
        /// Free.
        free: u64,
    },
    /// Not enough free GPUs of the requested model and memory.
    Gpu {
        /// Needed.
        needed: u32,
        /// Free and matching.
        free: u32,
    },
    /// Not enough free disk.
    Disk {
        /// Needed.
        needed: u64,
        /// Free.
        free: u64,
    },
    /// A static host port of the request is held on the node.
    PortInUse {
        /// The port.
        port: HostPort,
        /// The node.
        node: String,
        /// The job holding it (the request's own job when one of its replicas
        /// took it).
        job: String,
    },
    /// The node's dynamic port range has fewer free ports than one replica needs.
    DynamicPorts {
        /// Ports one replica takes from the range.
        needed: u32,
        /// The node's range.
        range: PortRange,
    },
    /// A custom filter's reason.
    Other(String),
}

impl Reason {
    /// How close the node came to fitting, to pick the example to show: larger is
    /// closer. `None` when reasons of this kind do not compare.
    fn closeness(&self) -> Option<u64> {
        match *self {
            Reason::Cpu { free, .. } | Reason::Memory { free, .. } | Reason::Disk { free, .. } => {
                Some(free)
            }
            Reason::Gpu { free, .. } => Some(u64::from(free)),
            _ => None,
        }
    }

    /// For people, with the request for context.
    pub fn describe(&self, req: &Request) -> String {
        match self {
            Reason::NotReady => "not ready".into(),
            Reason::NotPinned => format!(
                "not the requested node {}",
                req.node.as_deref().unwrap_or("-")
            ),
            Reason::Constraint { index } => match req.placement.constraints.get(*index) {
                Some(c) => format!("not matching constraint `{}`", ConstraintText(c)),
                None => "not matching a constraint".into(),
            },
            Reason::JobAntiAffinity => format!(
                "already running a replica of {} (job anti-affinity)",
                req.job
            ),
            Reason::Cpu { needed, free } => {
                format!("insufficient cpu (needs {needed}m, best node has {free}m free)")
            }
            Reason::Memory { needed, free } => format!(
                "insufficient memory (needs {}, best node has {} free)",
                HumanBytes(*needed),
                HumanBytes(*free)
            ),
            Reason::Gpu { needed, free } => {
                let what = match &req.resources.gpus {
                    Some(g) => GpuText(g).to_string(),
                    None => format!("{needed} GPUs"),
                };
                format!("insufficient GPUs (needs {what}, best node has {free} free)")
            }
            Reason::Disk { needed, free } => format!(
                "insufficient disk (needs {}, best node has {} free)",
                HumanBytes(*needed),
                HumanBytes(*free)
            ),
            Reason::PortInUse { port, node, job } => {
                format!("port {port} in use on {node} by job {job}")
            }
            Reason::DynamicPorts { needed, range } => {
                format!("no {needed} free host port(s) left in the dynamic range {range}")
            }
            Reason::Other(s) => s.clone(),
        }
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

/// Why nodes were or were not chosen for one replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// Nodes in the snapshot.
    pub nodes_total: usize,
    /// Nodes that went through the filters.
    pub nodes_evaluated: usize,
    /// Nodes that passed every filter.
    pub feasible: usize,
    /// Whether every node went through every filter: then `feasible` plus the
    /// `filtered` counts add up to `nodes_total`.
    pub exhaustive: bool,
    /// Nodes rejected, by the first filter that rejected them.
    pub filtered: BTreeMap<&'static str, FilterStats>,
    /// What preemption found, when it was tried.
    pub preemption: Option<String>,
}

/// Nodes one filter rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FilterStats {
    /// How many.
    pub count: usize,
    /// The reason of the node that came closest, for people.
    pub example: String,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} nodes fit", self.feasible, self.nodes_evaluated)?;
        if !self.exhaustive {
            write!(f, " (sampled from {})", self.nodes_total)?;
        }
        let mut rows: Vec<(&&str, &FilterStats)> = self.filtered.iter().collect();
        rows.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
        for (i, (_, s)) in rows.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            write!(f, "{} {}", s.count, s.example)?;
        }
        if let Some(p) = &self.preemption {
            write!(f, "; {p}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let placed = self.assignments.len();
        write!(
            f,
            "placed {placed}/{} replicas",
            placed as u64 + u64::from(self.unplaced)
        )?;
        if !self.preemptions.is_empty() {
            write!(f, ", preempting {}", self.preemptions.join(", "))?;
        }
        write!(f, "; {}", self.explanation)
    }
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

/// Built-in filter: the node is ready.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadyFilter;

impl Filter for ReadyFilter {
    fn name(&self) -> &'static str {
        "ready"
    }
    fn check(&self, node: &NodeView<'_>, _req: &Request) -> Result<(), Reason> {
        if node.info.ready {
            Ok(())
        } else {
            Err(Reason::NotReady)
        }
    }
    fn prefilter(&self, snap: &Snapshot, _req: &Request) -> Prefilter {
        Prefilter::Exact(snap.ready.clone())
    }
}

/// Built-in filter: a request pinned to a node (system jobs) goes only there.
#[derive(Debug, Clone, Copy, Default)]
pub struct PinFilter;

impl Filter for PinFilter {
    fn name(&self) -> &'static str {
        "pinned"
    }
    fn check(&self, node: &NodeView<'_>, req: &Request) -> Result<(), Reason> {
        match &req.node {
            Some(pin) if *pin != node.info.name => Err(Reason::NotPinned),
            _ => Ok(()),
        }
    }
    fn prefilter(&self, snap: &Snapshot, req: &Request) -> Prefilter {
        match &req.node {
            None => Prefilter::Skip,
            Some(pin) => {
                let mut s = NodeSet::empty(snap.len());
                if let Some(i) = snap.index_of(pin) {
                    s.insert(i);
                }
                Prefilter::Exact(s)
            }
        }
    }
}

/// Built-in filter: every constraint of the request holds on the node's labels.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConstraintFilter;

impl Filter for ConstraintFilter {
    fn name(&self) -> &'static str {
        "constraints"
    }
    fn check(&self, node: &NodeView<'_>, req: &Request) -> Result<(), Reason> {
        match req
            .placement
            .constraints
            .iter()
            .position(|c| !c.operator.matches(&node.info.labels, &c.key, &c.values))
        {
            Some(index) => Err(Reason::Constraint { index }),
            None => Ok(()),
        }
    }
    fn prefilter(&self, snap: &Snapshot, req: &Request) -> Prefilter {
        if req.placement.constraints.is_empty() {
            return Prefilter::Skip;
        }
        let mut s = NodeSet::full(snap.len());
        for c in &req.placement.constraints {
            s.intersect_with(&snap.matching(&c.key, c.operator, &c.values));
        }
        Prefilter::Exact(s)
    }
}

/// Built-in filter: with `job_anti_affinity`, at most one replica of the job per node.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobAntiAffinityFilter;

impl Filter for JobAntiAffinityFilter {
    fn name(&self) -> &'static str {
        "job_anti_affinity"
    }
    fn check(&self, node: &NodeView<'_>, req: &Request) -> Result<(), Reason> {
        if req.placement.job_anti_affinity && node.job_replicas > 0 {
            Err(Reason::JobAntiAffinity)
        } else {
            Ok(())
        }
    }
    fn prefilter(&self, _snap: &Snapshot, req: &Request) -> Prefilter {
        if req.placement.job_anti_affinity {
            Prefilter::PerNode
        } else {
            Prefilter::Skip
        }
    }
}

/// Built-in filter: enough free GPUs whose model contains the requested substring
/// (ASCII case-insensitive) and with at least the requested memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuFilter;

impl Filter for GpuFilter {
    fn name(&self) -> &'static str {
        "gpu"
    }
    fn check(&self, node: &NodeView<'_>, req: &Request) -> Result<(), Reason> {
        let Some(g) = req.resources.gpus.as_ref().filter(|g| g.count > 0) else {
            return Ok(());
        };
        let free = (gpu_matching(node.info, g) & node.free_gpus).count_ones();
        if free >= g.count {
            Ok(())
        } else {
            Err(Reason::Gpu {
                needed: g.count,
                free,
            })
        }
    }
    fn prefilter(&self, snap: &Snapshot, req: &Request) -> Prefilter {
        let Some(g) = req.resources.gpus.as_ref().filter(|g| g.count > 0) else {
            return Prefilter::Skip;
        };
        let mut s = NodeSet::empty(snap.len());
        for &i in &snap.gpu_nodes {
            if gpu_matching(&snap.nodes[i as usize].info, g).count_ones() >= g.count {
                s.insert(i);
            }
        }
        Prefilter::Within(s)
    }
}

/// Built-in filter: enough free CPU.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuFilter;

impl Filter for CpuFilter {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn check(&self, node: &NodeView<'_>, req: &Request) -> Result<(), Reason> {
        let needed = req.resources.cpu.0;
        if node.free_cpu_millis >= needed {
            Ok(())
        } else {
            Err(Reason::Cpu {
                needed,
                free: node.free_cpu_millis,
            })
        }
    }
}

/// Built-in filter: enough free memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryFilter;

impl Filter for MemoryFilter {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn check(&self, node: &NodeView<'_>, req: &Request) -> Result<(), Reason> {
        let needed = req.resources.memory.0;
        if node.free_memory_bytes >= needed {
            Ok(())
        } else {
            Err(Reason::Memory {
                needed,
                free: node.free_memory_bytes,
            })
        }
    }
}

/// Built-in filter: enough free disk for `resources.disk`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskFilter;

impl Filter for DiskFilter {
    fn name(&self) -> &'static str {
        "disk"
    }
    fn check(&self, node: &NodeView<'_>, req: &Request) -> Result<(), Reason> {
        let needed = req.resources.disk.0;
        if node.free_disk_bytes >= needed {
            Ok(())
        } else {
            Err(Reason::Disk {
                needed,
                free: node.free_disk_bytes,
            })
        }
    }
    fn prefilter(&self, _snap: &Snapshot, req: &Request) -> Prefilter {
        if req.resources.disk.0 == 0 {
            Prefilter::Skip
        } else {
            Prefilter::PerNode
        }
    }
}

/// Built-in filter: every static host port of the request is free on the node,
/// and its dynamic range has a free port for each port without one.
#[derive(Debug, Clone, Copy, Default)]
pub struct PortFilter;

impl Filter for PortFilter {
    fn name(&self) -> &'static str {
        "ports"
    }
    fn check(&self, node: &NodeView<'_>, req: &Request) -> Result<(), Reason> {
        for port in req.static_ports() {
            let job = match node.port_holder(port) {
                Some(job) => job,
                None if node.port_taken_by_request(port) => req.job.as_str(),
                None => continue,
            };
            return Err(Reason::PortInUse {
                port,
                node: node.info.name.clone(),
                job: job.to_string(),
            });
        }
        if req.dynamic_port_count() > 0 && node.assign_ports(req).is_none() {
            return Err(Reason::DynamicPorts {
                needed: req.dynamic_port_count(),
                range: node.info.capacity.dynamic_ports,
            });
        }
        Ok(())
    }
    fn prefilter(&self, _snap: &Snapshot, req: &Request) -> Prefilter {
        if req.ports.is_empty() {
            Prefilter::Skip
        } else {
            Prefilter::PerNode
        }
    }
}

/// Built-in scorer: the job's strategy. Binpack scores the node's mean utilization
/// after placement (CPU, memory, disk for jobs that ask for it, and GPUs for GPU
/// jobs on GPU nodes); the spread
/// strategy scores one minus that.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResourceScorer;

impl Scorer for ResourceScorer {
    fn name(&self) -> &'static str {
        "resources"
    }
    fn weight(&self, _req: &Request) -> f64 {
        RESOURCES_WEIGHT
    }
    fn score(&self, node: &NodeView<'_>, req: &Request) -> f64 {
        let cap = &node.info.capacity;
        let mut sum = 0.0;
        let mut dims = 0u32;
        let mut util = |cap: u64, free: u64, need: u64| {
            if cap > 0 {
                let used_after = cap.saturating_sub(free).saturating_add(need).min(cap);
                sum += used_after as f64 / cap as f64;
                dims += 1;
            }
        };
        util(cap.cpu_millis, node.free_cpu_millis, req.resources.cpu.0);
        util(
            cap.memory_bytes,
            node.free_memory_bytes,
            req.resources.memory.0,
        );
        if req.resources.disk.0 > 0 {
            util(cap.disk_bytes, node.free_disk_bytes, req.resources.disk.0);
        }
        let gpus = req.gpu_count();
        if gpus > 0 {
            let total = cap.gpus.len() as u64;
            util(
                total,
                u64::from(node.free_gpus.count_ones()),
                u64::from(gpus),
            );
        }
        let packed = if dims == 0 {
            0.0
        } else {
            sum / f64::from(dims)
        };
        match req.placement.strategy {
            Strategy::Binpack => packed,
            Strategy::Spread => 1.0 - packed,
        }
    }
}

/// Built-in scorer: weighted node affinity and anti-affinity. The score is the
/// share of the total weight satisfied (affinities matched, anti-affinities not).
#[derive(Debug, Clone, Copy, Default)]
pub struct AffinityScorer;

impl Scorer for AffinityScorer {
    fn name(&self) -> &'static str {
        "affinity"
    }
    fn weight(&self, req: &Request) -> f64 {
        let p = &req.placement;
        let total: u64 = p
            .affinity
            .iter()
            .chain(&p.anti_affinity)
            .map(|w| u64::from(w.weight))
            .sum();
        total as f64 / AFFINITY_WEIGHT_UNIT
    }
    fn score(&self, node: &NodeView<'_>, req: &Request) -> f64 {
        let p = &req.placement;
        let labels = &node.info.labels;
        let (mut got, mut total) = (0u64, 0u64);
        for a in &p.affinity {
            total += u64::from(a.weight);
            if a.operator.matches(labels, &a.key, &a.values) {
                got += u64::from(a.weight);
            }
        }
        for a in &p.anti_affinity {
            total += u64::from(a.weight);
            if !a.operator.matches(labels, &a.key, &a.values) {
                got += u64::from(a.weight);
            }
        }
        if total == 0 {
            0.0
        } else {
            got as f64 / total as f64
        }
    }
    fn label_sensitive(&self, req: &Request) -> bool {
        !req.placement.affinity.is_empty() || !req.placement.anti_affinity.is_empty()
    }
    /// Exact for up to [`MAX_EXACT_AFFINITY_RULES`] rules: tries every combination
    /// of matched and unmatched rules against the label index.
    fn best_possible(&self, snap: &Snapshot, eligible: &NodeSet, req: &Request) -> f64 {
        let p = &req.placement;
        let rules: Vec<(&WeightedConstraint, bool)> = p
            .affinity
            .iter()
            .map(|a| (a, true))
            .chain(p.anti_affinity.iter().map(|a| (a, false)))
            .collect();
        let total: u64 = rules.iter().map(|(r, _)| u64::from(r.weight)).sum();
        if total == 0 || rules.len() > MAX_EXACT_AFFINITY_RULES || eligible.count() == 0 {
            return 1.0;
        }
        let masks: Vec<NodeSet> = rules
            .iter()
            .map(|(r, _)| snap.matching(&r.key, r.operator, &r.values))
            .collect();
        let mut best = 0u64;
        for combo in 0u32..(1 << rules.len()) {
            let mut got = 0u64;
            let mut cell = eligible.clone();
            for (i, ((rule, positive), mask)) in rules.iter().zip(&masks).enumerate() {
                let matched = combo & (1 << i) != 0;
                if matched {
                    cell.intersect_with(mask);
                } else {
                    let mut not = mask.clone();
                    not.complement();
                    cell.intersect_with(&not);
                }
                if matched == *positive {
                    got += u64::from(rule.weight);
                }
            }
            if got > best && cell.count() > 0 {
                best = got;
            }
        }
        best as f64 / total as f64
    }
}

/// Built-in scorer: spread replicas evenly across the values of labels. For each
/// rule, a node whose value holds the fewest replicas of the job (among values
/// that eligible nodes have) scores 1, the most 0, linearly between; a node without
/// the label scores 0. Rules combine by their weights.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpreadScorer;

impl Scorer for SpreadScorer {
    fn name(&self) -> &'static str {
        "spread"
    }
    fn weight(&self, req: &Request) -> f64 {
        let total: u64 = req
            .placement
            .spread
            .iter()
            .map(|s| u64::from(s.weight))
            .sum();
        total as f64 / SPREAD_WEIGHT_UNIT
    }
    fn score(&self, node: &NodeView<'_>, req: &Request) -> f64 {
        let (mut sum, mut total) = (0.0, 0.0);
        for (i, rule) in req.placement.spread.iter().enumerate() {
            let w = f64::from(rule.weight);
            total += w;
            if let Some(p) = node.spread_position(i) {
                sum += w * if p.max <= p.min {
                    1.0
                } else {
                    f64::from(p.max.saturating_sub(p.count)) / f64::from(p.max - p.min)
                };
            }
        }
        if total == 0.0 { 0.0 } else { sum / total }
    }
    fn label_sensitive(&self, req: &Request) -> bool {
        !req.placement.spread.is_empty()
    }
}

/// Built-in scorer: keeps GPU nodes for GPU work. For a job without GPUs, nodes
/// with GPUs score 0 and the others 1.
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuReserveScorer;

impl Scorer for GpuReserveScorer {
    fn name(&self) -> &'static str {
        "gpu_reserve"
    }
    fn weight(&self, req: &Request) -> f64 {
        if req.gpu_count() == 0 {
            GPU_RESERVE_WEIGHT
        } else {
            0.0
        }
    }
    fn score(&self, node: &NodeView<'_>, _req: &Request) -> f64 {
        if node.info.capacity.gpus.is_empty() {
            1.0
        } else {
            0.0
        }
    }
}

/// Built-in scorer: stays off the nodes in [`Request::avoid`]. They score 0 and
/// the others 1, at [`AVOID_WEIGHT`]: an avoided node is chosen only when no other
/// node fits.
#[derive(Debug, Clone, Copy, Default)]
pub struct AvoidScorer;

impl Scorer for AvoidScorer {
    fn name(&self) -> &'static str {
        "avoid"
    }
    fn weight(&self, req: &Request) -> f64 {
        if req.avoid.is_empty() {
            0.0
        } else {
            AVOID_WEIGHT
        }
    }
    fn score(&self, node: &NodeView<'_>, req: &Request) -> f64 {
        if req.avoid.contains(&node.info.name) {
            0.0
        } else {
            1.0
        }
    }
    // Not a label, but the walk must look past a sampled avoided node for one
    // that is not.
    fn label_sensitive(&self, req: &Request) -> bool {
        !req.avoid.is_empty()
    }
    fn best_possible(&self, snap: &Snapshot, eligible: &NodeSet, req: &Request) -> f64 {
        let any_other = eligible
            .iter()
            .any(|i| !req.avoid.contains(&snap.nodes[i as usize].info.name));
        if any_other { 1.0 } else { 0.0 }
    }
}

// ---------------------------------------------------------------------------
// Internals.

const ABSENT: u32 = u32::MAX;

/// A node in an ordered index: free amount, then a fixed shuffle of the index so
/// that nodes with the same free amount do not come in name order (names often
/// group by zone or rack, which would starve label-sensitive scorers), then the
/// index itself.
type WalkKey = (u64, u32, u32);

fn walk_key(free: u64, idx: u32) -> WalkKey {
    (free, idx.wrapping_mul(0x9E37_79B1), idx)
}

/// A map keyed by node index, with a cheap fixed hash (node indexes are dense and
/// not attacker-chosen; SipHash showed in profiles).
type IdxMap<V> = HashMap<u32, V, BuildHasherDefault<IdxHasher>>;

#[derive(Debug, Default, Clone, Copy)]
struct IdxHasher(u64);

impl Hasher for IdxHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[derive(Debug, Clone)]
struct NodeEntry {
    info: NodeInfo,
    used_cpu: u64,
    used_mem: u64,
    used_disk: u64,
    gpu_used: u64,
    allocs: Vec<usize>,
    /// Host ports held, with the slot of the allocation holding each.
    ports: BTreeMap<HostPort, usize>,
}

impl NodeEntry {
    fn free_cpu(&self) -> u64 {
        self.info.capacity.cpu_millis.saturating_sub(self.used_cpu)
    }
    fn free_mem(&self) -> u64 {
        self.info
            .capacity
            .memory_bytes
            .saturating_sub(self.used_mem)
    }
}

#[derive(Debug, Clone)]
struct AllocEntry {
    placed: Placed,
    node: u32,
    gpu_mask: u64,
}

#[derive(Debug, Clone)]
struct KeyIndex {
    present: NodeSet,
    value_ids: HashMap<String, u32>,
    nodes_by_value: Vec<Vec<u32>>,
    value_of: Vec<u32>,
}

impl KeyIndex {
    fn new(n: usize) -> Self {
        KeyIndex {
            present: NodeSet::empty(n),
            value_ids: HashMap::new(),
            nodes_by_value: Vec::new(),
            value_of: vec![ABSENT; n],
        }
    }
}

/// The job's replicas per value of one spread label, for one request.
#[derive(Debug, Clone)]
struct SpreadState<'s> {
    value_of: Option<&'s [u32]>,
    counts: Vec<u32>,
    eligible: Vec<bool>,
    min: u32,
    max: u32,
}

impl SpreadState<'_> {
    fn add(&mut self, idx: u32) {
        let Some(v) = self.value_of.and_then(|m| m.get(idx as usize).copied()) else {
            return;
        };
        if v != ABSENT {
            self.counts[v as usize] += 1;
            self.bounds();
        }
    }

    fn bounds(&mut self) {
        let mut it = self
            .counts
            .iter()
            .zip(&self.eligible)
            .filter(|(_, e)| **e)
            .map(|(c, _)| *c);
        let first = it.next().unwrap_or(0);
        let (min, max) = it.fold((first, first), |(lo, hi), c| (lo.min(c), hi.max(c)));
        self.min = min;
        self.max = max;
    }
}

fn spread_states<'s>(
    snap: &'s Snapshot,
    req: &Request,
    plan: &Plan<'_, 's>,
) -> Vec<SpreadState<'s>> {
    req.placement
        .spread
        .iter()
        .map(|rule| {
            let Some(k) = snap.labels.get(&rule.key) else {
                return SpreadState {
                    value_of: None,
                    counts: Vec::new(),
                    eligible: Vec::new(),
                    min: 0,
                    max: 0,
                };
            };
            let mut counts = vec![0u32; k.nodes_by_value.len()];
            if let Some(per_node) = plan.job_nodes {
                for (&i, &c) in per_node {
                    let v = k.value_of[i as usize];
                    if v != ABSENT {
                        counts[v as usize] += c;
                    }
                }
            }
            let eligible = k
                .nodes_by_value
                .iter()
                .map(|nodes| nodes.iter().any(|&i| plan.eligible.contains(i)))
                .collect();
            let mut s = SpreadState {
                value_of: Some(&k.value_of),
                counts,
                eligible,
                min: 0,
                max: 0,
            };
            s.bounds();
            s
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dim {
    Cpu,
    Mem,
}

/// What the scheduler works out once per request.
struct Plan<'a, 's> {
    /// Nodes that pass every prefilter.
    eligible: NodeSet,
    eligible_count: usize,
    /// Filters to run node by node, in pipeline order.
    checks: Vec<(usize, &'a dyn Filter)>,
    /// Scorers that apply, with their weights and whether they read labels.
    scorers: Vec<(&'a dyn Scorer, f64, bool)>,
    soft: bool,
    /// The best label-sensitive part of the score an eligible node can get.
    soft_bound: f64,
    dim: Dim,
    descending: bool,
    need: u64,
    k: usize,
    job_nodes: Option<&'s IdxMap<u32>>,
    can_preempt: bool,
}

impl<'a, 's> Plan<'a, 's> {
    fn new(sched: &'a Scheduler, snap: &'s Snapshot, req: &Request) -> Self {
        let n = snap.len();
        let mut eligible = NodeSet::full(n);
        let mut checks = Vec::new();
        for (pos, f) in sched.filters.iter().enumerate() {
            match f.prefilter(snap, req) {
                Prefilter::Skip => {}
                Prefilter::PerNode => checks.push((pos, f.as_ref())),
                Prefilter::Exact(s) => eligible.intersect_with(&s),
                Prefilter::Within(s) => {
                    eligible.intersect_with(&s);
                    checks.push((pos, f.as_ref()));
                }
            }
        }
        let scorers: Vec<(&dyn Scorer, f64, bool)> = sched
            .scorers
            .iter()
            .map(|s| (s.as_ref(), s.weight(req), s.label_sensitive(req)))
            .filter(|(_, w, _)| *w > 0.0 && w.is_finite())
            .collect();
        let soft = scorers.iter().any(|(_, _, soft)| *soft);
        let cpu_share = req.resources.cpu.0 as f64 / snap.mean_cpu.max(1.0);
        let mem_share = req.resources.memory.0 as f64 / snap.mean_mem.max(1.0);
        let dim = if mem_share > cpu_share {
            Dim::Mem
        } else {
            Dim::Cpu
        };
        let need = match dim {
            Dim::Cpu => req.resources.cpu.0,
            Dim::Mem => req.resources.memory.0,
        };
        let ready = snap.ready.count();
        let k = sched.tuning.candidates.unwrap_or_else(|| {
            let log2 = usize::BITS - ready.max(1).saturating_sub(1).leading_zeros();
            (log2 as usize).max(2)
        });
        let eligible_count = eligible.count();
        let soft_bound = scorers
            .iter()
            .filter(|(_, _, soft)| *soft)
            .map(|(s, w, _)| w * s.best_possible(snap, &eligible, req).clamp(0.0, 1.0))
            .sum();
        Plan {
            eligible,
            eligible_count,
            checks,
            scorers,
            soft,
            soft_bound,
            dim,
            descending: req.placement.strategy == Strategy::Spread,
            need,
            k: k.max(1),
            job_nodes: snap.jobs.get(&req.job),
            can_preempt: req.priority > 0,
        }
    }

    fn score(&self, view: &NodeView<'_>, req: &Request) -> f64 {
        let (hard, soft) = self.score_parts(view, req);
        hard + soft
    }

    /// The score, split into the parts that do not and do depend on labels.
    fn score_parts(&self, view: &NodeView<'_>, req: &Request) -> (f64, f64) {
        let (mut plain, mut labelled) = (0.0, 0.0);
        for (s, w, soft) in &self.scorers {
            let x = s.score(view, req);
            let x = w * if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) };
            if *soft {
                labelled += x;
            } else {
                plain += x;
            }
        }
        (plain, labelled)
    }

    fn job_count(&self, idx: u32) -> u32 {
        self.job_nodes
            .and_then(|m| m.get(&idx))
            .copied()
            .unwrap_or(0)
    }
}

/// Changes this request made to one node so far.
#[derive(Debug, Clone, Copy, Default)]
struct Delta {
    added_cpu: u64,
    added_mem: u64,
    added_disk: u64,
    freed_cpu: u64,
    freed_mem: u64,
    freed_disk: u64,
    gpu_taken: u64,
    gpu_freed: u64,
    job_added: u32,
}

/// What is held on one node, counting the request's changes.
#[derive(Debug, Clone, Copy)]
struct Used {
    cpu: u64,
    mem: u64,
    disk: u64,
    gpus: u64,
}

/// The request's changes to the snapshot while it is being placed.
struct Overlay {
    touched: NodeSet,
    deltas: IdxMap<Delta>,
    /// Host ports the request's replicas took, by node.
    taken: IdxMap<Vec<HostPort>>,
    /// Touched nodes by their current free amount in the walk's dimension.
    local: BTreeSet<WalkKey>,
    evicted: BTreeSet<usize>,
}

impl Overlay {
    fn new(n: usize) -> Self {
        Overlay {
            touched: NodeSet::empty(n),
            deltas: IdxMap::default(),
            taken: IdxMap::default(),
            local: BTreeSet::new(),
            evicted: BTreeSet::new(),
        }
    }

    /// What is held on node `idx`, and how many replicas the request put there.
    fn used(&self, snap: &Snapshot, idx: u32) -> (Used, u32) {
        let e = &snap.nodes[idx as usize];
        let delta = if self.touched.contains(idx) {
            self.deltas.get(&idx)
        } else {
            None
        };
        match delta {
            None => (
                Used {
                    cpu: e.used_cpu,
                    mem: e.used_mem,
                    disk: e.used_disk,
                    gpus: e.gpu_used,
                },
                0,
            ),
            Some(d) => (
                Used {
                    cpu: e
                        .used_cpu
                        .saturating_sub(d.freed_cpu)
                        .saturating_add(d.added_cpu),
                    mem: e
                        .used_mem
                        .saturating_sub(d.freed_mem)
                        .saturating_add(d.added_mem),
                    disk: e
                        .used_disk
                        .saturating_sub(d.freed_disk)
                        .saturating_add(d.added_disk),
                    gpus: (e.gpu_used & !d.gpu_freed) | d.gpu_taken,
                },
                d.job_added,
            ),
        }
    }

    /// The host ports the request took on node `idx`.
    fn taken(&self, idx: u32) -> &[HostPort] {
        self.taken.get(&idx).map_or(&[], Vec::as_slice)
    }

    fn change(
        &mut self,
        snap: &Snapshot,
        plan: &Plan<'_, '_>,
        idx: u32,
        f: impl FnOnce(&mut Delta),
    ) {
        let old = self
            .deltas
            .contains_key(&idx)
            .then(|| self.free_in_dim(snap, plan, idx));
        if let Some(old) = old {
            self.local.remove(&walk_key(old, idx));
        }
        f(self.deltas.entry(idx).or_default());
        self.touched.insert(idx);
        let new = self.free_in_dim(snap, plan, idx);
        self.local.insert(walk_key(new, idx));
    }

    fn free_in_dim(&self, snap: &Snapshot, plan: &Plan<'_, '_>, idx: u32) -> u64 {
        let (used, _) = self.used(snap, idx);
        let cap = &snap.nodes[idx as usize].info.capacity;
        match plan.dim {
            Dim::Cpu => cap.cpu_millis.saturating_sub(used.cpu),
            Dim::Mem => cap.memory_bytes.saturating_sub(used.mem),
        }
    }

    fn place(
        &mut self,
        snap: &Snapshot,
        plan: &Plan<'_, '_>,
        req: &Request,
        idx: u32,
        gpus: u64,
        ports: &[AssignedPort],
    ) {
        self.change(snap, plan, idx, |d| {
            d.added_cpu = d.added_cpu.saturating_add(req.resources.cpu.0);
            d.added_mem = d.added_mem.saturating_add(req.resources.memory.0);
            d.added_disk = d.added_disk.saturating_add(req.resources.disk.0);
            d.gpu_taken |= gpus;
            d.job_added += 1;
        });
        if !ports.is_empty() {
            self.taken
                .entry(idx)
                .or_default()
                .extend(ports.iter().map(AssignedPort::host));
        }
    }

    fn evict(&mut self, snap: &Snapshot, plan: &Plan<'_, '_>, slot: usize) {
        let Some(a) = snap.allocs[slot].as_ref() else {
            return;
        };
        self.evicted.insert(slot);
        self.change(snap, plan, a.node, |d| {
            d.freed_cpu = d.freed_cpu.saturating_add(a.placed.cpu_millis);
            d.freed_mem = d.freed_mem.saturating_add(a.placed.memory_bytes);
            d.freed_disk = d.freed_disk.saturating_add(a.placed.disk_bytes);
            d.gpu_freed |= a.gpu_mask;
        });
    }
}

fn ctx_view<'v>(
    snap: &'v Snapshot,
    plan: &Plan<'_, '_>,
    spreads: &'v [SpreadState<'v>],
    overlay: &'v Overlay,
    idx: u32,
) -> NodeView<'v> {
    let (used, added) = overlay.used(snap, idx);
    view_with(
        snap,
        spreads,
        idx,
        used,
        plan.job_count(idx) + added,
        ports_view(snap, idx, &overlay.evicted, &[], overlay.taken(idx)),
    )
}

fn ports_view<'v>(
    snap: &'v Snapshot,
    idx: u32,
    evicted: &'v BTreeSet<usize>,
    victims: &'v [usize],
    taken: &'v [HostPort],
) -> PortsView<'v> {
    PortsView {
        held: &snap.nodes[idx as usize].ports,
        allocs: &snap.allocs,
        evicted,
        victims,
        taken,
    }
}

fn view_with<'v>(
    snap: &'v Snapshot,
    spreads: &'v [SpreadState<'v>],
    idx: u32,
    used: Used,
    job_replicas: u32,
    ports: PortsView<'v>,
) -> NodeView<'v> {
    let info = &snap.nodes[idx as usize].info;
    let cap = &info.capacity;
    let all_gpus = if cap.gpus.len() >= 64 {
        u64::MAX
    } else {
        (1u64 << cap.gpus.len()) - 1
    };
    NodeView {
        info,
        free_cpu_millis: cap.cpu_millis.saturating_sub(used.cpu),
        free_memory_bytes: cap.memory_bytes.saturating_sub(used.mem),
        free_disk_bytes: cap.disk_bytes.saturating_sub(used.disk),
        free_gpus: all_gpus & !used.gpus,
        job_replicas,
        idx,
        spread: spreads,
        ports,
    }
}

/// Everything one replica's pass reads.
struct Ctx<'c, 'a, 's> {
    sched: &'a Scheduler,
    snap: &'s Snapshot,
    req: &'c Request,
    plan: &'c Plan<'a, 's>,
    spreads: &'c [SpreadState<'s>],
    overlay: &'c Overlay,
}

/// The running state of one replica's pass.
struct Pass {
    best: Option<(f64, u32)>,
    best_soft: f64,
    visited: usize,
    feasible: usize,
    /// Rejections by filter position: count and the closest miss.
    stats: Option<Vec<(usize, Option<Reason>)>>,
}

impl Pass {
    fn new(collect: bool, filters: usize) -> Self {
        Pass {
            best: None,
            best_soft: f64::NEG_INFINITY,
            visited: 0,
            feasible: 0,
            stats: collect.then(|| vec![(0, None); filters]),
        }
    }

    fn reject(&mut self, filter: usize, reason: Reason) {
        let Some((count, best)) = self.stats.as_mut().and_then(|s| s.get_mut(filter)) else {
            return;
        };
        *count += 1;
        let closer = match best {
            None => true,
            Some(old) => matches!(
                (reason.closeness(), old.closeness()),
                (Some(new), Some(old)) if new > old
            ),
        };
        if closer {
            *best = Some(reason);
        }
    }

    fn offer(&mut self, score: f64, idx: u32) {
        self.feasible += 1;
        let better = match self.best {
            None => true,
            Some((s, i)) => score > s || (score == s && idx < i),
        };
        if better {
            self.best = Some((score, idx));
        }
    }

    fn explanation(&self, sched: &Scheduler, snap: &Snapshot, req: &Request) -> Explanation {
        let mut filtered: BTreeMap<&'static str, FilterStats> = BTreeMap::new();
        for (pos, (count, reason)) in self.stats.iter().flatten().enumerate() {
            let (Some(reason), Some(filter)) = (reason, sched.filters.get(pos)) else {
                continue;
            };
            filtered
                .entry(filter.name())
                .and_modify(|s| s.count += count)
                .or_insert_with(|| FilterStats {
                    count: *count,
                    example: reason.describe(req),
                });
        }
        Explanation {
            nodes_total: snap.len(),
            nodes_evaluated: self.visited,
            feasible: self.feasible,
            exhaustive: false,
            filtered,
            preemption: None,
        }
    }
}

/// A way to make room on one node.
struct Eviction {
    idx: u32,
    victims: Vec<usize>,
    max_priority: u32,
}

impl Ctx<'_, '_, '_> {
    fn view(&self, idx: u32) -> NodeView<'_> {
        ctx_view(self.snap, self.plan, self.spreads, self.overlay, idx)
    }

    /// Evaluates one eligible node; returns whether the pass may stop.
    fn evaluate(&self, pass: &mut Pass, idx: u32) -> bool {
        pass.visited += 1;
        let view = self.view(idx);
        for &(pos, f) in &self.plan.checks {
            if let Err(r) = f.check(&view, self.req) {
                pass.reject(pos, r);
                return false;
            }
        }
        let (plain, labelled) = self.plan.score_parts(&view, self.req);
        pass.offer(plain + labelled, idx);
        pass.best_soft = pass.best_soft.max(labelled);
        let tuning = &self.sched.tuning;
        pass.feasible >= self.plan.k
            && (!self.plan.soft
                || (pass.visited >= tuning.soft_sample
                    && (pass.best_soft >= self.plan.soft_bound - 1e-9
                        || pass.visited >= tuning.soft_limit)))
    }

    /// Finds the best node for one replica without preemption.
    fn pick(&self, pass: &mut Pass) {
        let plan = self.plan;
        if plan.eligible_count <= self.sched.tuning.exhaustive_below {
            for idx in plan.eligible.iter() {
                self.evaluate(pass, idx);
            }
            return;
        }
        let index = match plan.dim {
            Dim::Cpu => &self.snap.by_cpu,
            Dim::Mem => &self.snap.by_mem,
        };
        let from = (plan.need, 0u32, 0u32);
        let mut visit = |idx: u32, from_snapshot: bool| -> bool {
            if from_snapshot && self.overlay.touched.contains(idx) {
                return false;
            }
            if !plan.eligible.contains(idx) {
                return false;
            }
            self.evaluate(pass, idx)
        };
        if plan.descending {
            merge_walk(
                index.range(from..).rev(),
                self.overlay.local.range(from..).rev(),
                |a, b| a > b,
                &mut visit,
            );
        } else {
            merge_walk(
                index.range(from..),
                self.overlay.local.range(from..),
                |a, b| a < b,
                &mut visit,
            );
        }
    }

    /// Runs every node through every filter: the exact account, and the best
    /// feasible node if any.
    fn full_scan(&self) -> (Explanation, Option<(f64, u32)>) {
        let mut pass = Pass::new(true, self.sched.filters.len());
        'nodes: for idx in 0..self.snap.len() as u32 {
            pass.visited += 1;
            let view = self.view(idx);
            for (pos, f) in self.sched.filters.iter().enumerate() {
                if let Err(r) = f.check(&view, self.req) {
                    pass.reject(pos, r);
                    continue 'nodes;
                }
            }
            pass.offer(self.plan.score(&view, self.req), idx);
        }
        let mut expl = pass.explanation(self.sched, self.snap, self.req);
        expl.exhaustive = true;
        (expl, pass.best)
    }

    /// The cheapest eviction that makes room for one replica, and the number of
    /// eligible nodes that had allocations of lower priority to evict.
    fn preempt(&self) -> (Option<Eviction>, usize) {
        let mut considered = 0;
        if !self.plan.can_preempt {
            return (None, considered);
        }
        let snap = self.snap;
        let req = self.req;
        let mut best: Option<Eviction> = None;
        for idx in self.plan.eligible.iter() {
            let e = &snap.nodes[idx as usize];
            let mut victims: Vec<(usize, &AllocEntry)> = e
                .allocs
                .iter()
                .filter(|s| !self.overlay.evicted.contains(s))
                .filter_map(|&s| snap.allocs[s].as_ref().map(|a| (s, a)))
                .filter(|(_, a)| a.placed.priority < req.priority && a.placed.job != req.job)
                .collect();
            if victims.is_empty() {
                continue;
            }
            considered += 1;
            let (used, added) = self.overlay.used(snap, idx);
            let job = self.plan.job_count(idx) + added;
            let taken = self.overlay.taken(idx);
            // Whether the replica fits once `chosen` of the victims are evicted.
            let fits_with = |chosen: &[(usize, &AllocEntry)]| {
                let mut after = used;
                for (_, a) in chosen {
                    after.cpu = after.cpu.saturating_sub(a.placed.cpu_millis);
                    after.mem = after.mem.saturating_sub(a.placed.memory_bytes);
                    after.disk = after.disk.saturating_sub(a.placed.disk_bytes);
                    after.gpus &= !a.gpu_mask;
                }
                let slots: Vec<usize> = chosen.iter().map(|(s, _)| *s).collect();
                let ports = ports_view(snap, idx, &self.overlay.evicted, &slots, taken);
                let view = view_with(snap, self.spreads, idx, after, job, ports);
                self.plan
                    .checks
                    .iter()
                    .all(|(_, f)| f.check(&view, req).is_ok())
            };
            // Skip nodes where even evicting every candidate would not do, and
            // nodes that cannot beat the best eviction found so far.
            let lowest = victims
                .iter()
                .map(|(_, a)| a.placed.priority)
                .min()
                .unwrap_or(u32::MAX);
            if best.as_ref().is_some_and(|b| lowest > b.max_priority) || !fits_with(&victims) {
                continue;
            }
            let cap = &e.info.capacity;
            let size = |a: &AllocEntry| {
                a.placed.cpu_millis as f64 / cap.cpu_millis.max(1) as f64
                    + a.placed.memory_bytes as f64 / cap.memory_bytes.max(1) as f64
                    + a.placed.disk_bytes as f64 / cap.disk_bytes.max(1) as f64
                    + f64::from(a.gpu_mask.count_ones())
            };
            victims.sort_by(|(_, a), (_, b)| {
                a.placed
                    .priority
                    .cmp(&b.placed.priority)
                    .then(size(b).total_cmp(&size(a)))
                    .then(a.placed.alloc_id.cmp(&b.placed.alloc_id))
            });
            let fits = |chosen: &[bool]| {
                let on: Vec<(usize, &AllocEntry)> = victims
                    .iter()
                    .zip(chosen)
                    .filter(|(_, on)| **on)
                    .map(|(v, _)| *v)
                    .collect();
                fits_with(&on)
            };
            let mut chosen = vec![false; victims.len()];
            let mut ok = false;
            for i in 0..victims.len() {
                chosen[i] = true;
                if fits(&chosen) {
                    ok = true;
                    break;
                }
            }
            if !ok {
                continue;
            }
            // Give back the victims that turned out not to be needed.
            for i in (0..victims.len()).rev() {
                if chosen[i] {
                    chosen[i] = false;
                    if !fits(&chosen) {
                        chosen[i] = true;
                    }
                }
            }
            let picked: Vec<usize> = victims
                .iter()
                .zip(&chosen)
                .filter(|(_, on)| **on)
                .map(|((s, _), _)| *s)
                .collect();
            let max_priority = victims
                .iter()
                .zip(&chosen)
                .filter(|(_, on)| **on)
                .map(|((_, a), _)| a.placed.priority)
                .max()
                .unwrap_or(0);
            let better = match &best {
                None => true,
                Some(b) => {
                    (max_priority, picked.len(), idx) < (b.max_priority, b.victims.len(), b.idx)
                }
            };
            if better {
                best = Some(Eviction {
                    idx,
                    victims: picked,
                    max_priority,
                });
            }
        }
        (best, considered)
    }
}

/// Walks two sorted sequences as one, in `first_before` order, until `visit`
/// says stop.
fn merge_walk<'x>(
    a: impl Iterator<Item = &'x WalkKey>,
    b: impl Iterator<Item = &'x WalkKey>,
    first_before: impl Fn(&WalkKey, &WalkKey) -> bool,
    visit: &mut impl FnMut(u32, bool) -> bool,
) {
    let mut a = a.peekable();
    let mut b = b.peekable();
    loop {
        let (idx, from_a) = match (a.peek(), b.peek()) {
            (None, None) => return,
            (Some(&&x), None) => {
                a.next();
                (x.2, true)
            }
            (None, Some(&&y)) => {
                b.next();
                (y.2, false)
            }
            (Some(&&x), Some(&&y)) => {
                if first_before(&x, &y) {
                    a.next();
                    (x.2, true)
                } else {
                    b.next();
                    (y.2, false)
                }
            }
        };
        if visit(idx, from_a) {
            return;
        }
    }
}

/// The GPUs of `info` that match `g` (model substring, memory), as a mask.
fn gpu_matching(info: &NodeInfo, g: &GpuRequest) -> u64 {
    let mut mask = 0u64;
    for (i, gpu) in info
        .capacity
        .gpus
        .iter()
        .enumerate()
        .take(MAX_GPUS_PER_NODE)
    {
        let model_ok = g
            .model
            .as_deref()
            .is_none_or(|m| contains_ignore_ascii_case(&gpu.model, m));
        let mem_ok = g.memory.is_none_or(|m| gpu.memory_bytes >= m.0);
        if model_ok && mem_ok {
            mask |= 1 << i;
        }
    }
    mask
}

/// The GPUs a replica gets on `view`: the matching free ones with the least memory
/// first (keeping big GPUs for jobs that need them), then by position.
fn choose_gpus(view: &NodeView<'_>, req: &Request) -> u64 {
    let Some(g) = req.resources.gpus.as_ref().filter(|g| g.count > 0) else {
        return 0;
    };
    let free = gpu_matching(view.info, g) & view.free_gpus;
    let gpus = &view.info.capacity.gpus;
    let mut order: Vec<usize> = (0..gpus.len()).filter(|i| free & (1 << i) != 0).collect();
    order.sort_by_key(|&i| (gpus[i].memory_bytes, i));
    order
        .into_iter()
        .take(g.count as usize)
        .fold(0, |m, i| m | (1 << i))
}

fn contains_ignore_ascii_case(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    n.is_empty() || h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

struct ConstraintText<'a>(&'a Constraint);

impl fmt::Display for ConstraintText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        let first = c.values.first().map_or("", String::as_str);
        match c.operator {
            Operator::In => write!(f, "{} in [{}]", c.key, c.values.join(", ")),
            Operator::NotIn => write!(f, "{} not in [{}]", c.key, c.values.join(", ")),
            Operator::Exists => write!(f, "{} exists", c.key),
            Operator::DoesNotExist => write!(f, "{} does not exist", c.key),
            Operator::Equal => write!(f, "{} == {first}", c.key),
            Operator::NotEqual => write!(f, "{} != {first}", c.key),
        }
    }
}

struct GpuText<'a>(&'a GpuRequest);

impl fmt::Display for GpuText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.0;
        write!(f, "{} GPU{}", g.count, if g.count == 1 { "" } else { "s" })?;
        if let Some(m) = &g.model {
            write!(f, " matching {m:?}")?;
        }
        if let Some(m) = g.memory {
            write!(f, " with at least {}", HumanBytes(m.0))?;
        }
        Ok(())
    }
}

/// Bytes for people: `8Gi`, `3.5Gi`, `512Mi`.
struct HumanBytes(u64);

impl fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("Ti", 1 << 40),
            ("Gi", 1 << 30),
            ("Mi", 1 << 20),
            ("Ki", 1 << 10),
        ];
        for (unit, size) in UNITS {
            if self.0 >= size {
                let tenths = (self.0 as u128 * 10 / size as u128) as u64;
                return if tenths.is_multiple_of(10) {
                    write!(f, "{}{unit}", tenths / 10)
                } else {
                    write!(f, "{}.{}{unit}", tenths / 10, tenths % 10)
                };
            }
        }
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::{
        ProptestConfig, TestCaseError, any, prop, prop_assert, prop_assert_eq, prop_assert_ne,
        proptest,
    };
    use proptest::strategy::Strategy as _;

    use super::*;
    use crate::manifest::{ByteSize, Millicores, Spread, WeightedConstraint};
    use novacron_wire::GpuInfo;

    const GI: u64 = 1 << 30;

    fn node(name: &str, cpu: u64, mem_gi: u64, labels: &[(&str, &str)]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            capacity: Capacity {
                cpu_millis: cpu,
                memory_bytes: mem_gi * GI,
                disk_bytes: 0,
                dynamic_ports: Default::default(),
                gpus: vec![],
            },
            ready: true,
        }
    }

    fn gpu(uuid: &str, model: &str, mem_gi: u64) -> GpuInfo {
        GpuInfo {
            index: 0,
            uuid: uuid.into(),
            model: model.into(),
            memory_bytes: mem_gi * GI,
        }
    }

    fn req(job: &str, count: u32, cpu: u64, mem: u64) -> Request {
        let mut r = Request::new(job, count);
        r.resources.cpu = Millicores(cpu);
        r.resources.memory = ByteSize(mem);
        r
    }

    fn placed(id: &str, job: &str, node: &str, cpu: u64, mem: u64, priority: u32) -> Placed {
        Placed {
            alloc_id: id.into(),
            job: job.into(),
            node: node.into(),
            cpu_millis: cpu,
            memory_bytes: mem,
            gpu_uuids: vec![],
            priority,
            disk_bytes: 0,
            host_ports: vec![],
        }
    }

    fn constraint(key: &str, operator: Operator, values: &[&str]) -> Constraint {
        Constraint {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    fn nodes_of(out: &Outcome) -> Vec<&str> {
        out.assignments.iter().map(|a| a.node.as_str()).collect()
    }

    /// Forces the ordered walk (not the exhaustive path) even on tiny fleets.
    fn walking() -> Scheduler {
        Scheduler::new(Tuning {
            candidates: Some(2),
            soft_sample: 3,
            soft_limit: 6,
            exhaustive_below: 0,
        })
    }

    fn commit_all(snap: &mut Snapshot, r: &Request, out: &Outcome, next: &mut usize) {
        let ids: Vec<String> = out
            .assignments
            .iter()
            .map(|_| {
                *next += 1;
                format!("{}-{next}", r.job)
            })
            .collect();
        snap.commit(r, out, &ids).expect("commit");
    }

    /// A view of node `name` in `snap` with nothing placed by a request yet.
    fn view_of<'s>(snap: &'s Snapshot, name: &str) -> NodeView<'s> {
        let idx = snap.index_of(name).expect("node exists");
        let e = &snap.nodes[idx as usize];
        let used = Used {
            cpu: e.used_cpu,
            mem: e.used_mem,
            disk: e.used_disk,
            gpus: e.gpu_used,
        };
        view_with(
            snap,
            &[],
            idx,
            used,
            0,
            ports_view(snap, idx, &NO_EVICTIONS, &[], &[]),
        )
    }

    // --- filters -------------------------------------------------------------

    #[test]
    fn ready_filter_rejects_nodes_that_are_not_ready() {
        let mut down = node("b", 4000, 8, &[]);
        down.ready = false;
        let snap = Snapshot::new(vec![node("a", 4000, 8, &[]), down], vec![]).expect("snapshot");
        let r = req("web", 1, 100, 0);
        assert_eq!(ReadyFilter.check(&view_of(&snap, "a"), &r), Ok(()));
        assert_eq!(
            ReadyFilter.check(&view_of(&snap, "b"), &r),
            Err(Reason::NotReady)
        );
        let out = schedule(&snap, &req("web", 2, 3000, 0));
        assert_eq!(nodes_of(&out), ["a"]);
        assert_eq!(out.unplaced, 1);
    }

    #[test]
    fn avoided_nodes_are_chosen_only_when_no_other_fits() {
        // "a" packs best (it is fuller), but the job failed there.
        let snap = Snapshot::new(
            vec![node("a", 4000, 8, &[]), node("b", 4000, 8, &[])],
            vec![placed("x", "other", "a", 2000, 0, 50)],
        )
        .expect("snapshot");
        let mut r = req("web", 1, 500, 0);
        assert_eq!(
            nodes_of(&schedule(&snap, &r)),
            ["a"],
            "binpack without avoid"
        );
        r.avoid = vec!["a".into()];
        assert_eq!(nodes_of(&schedule(&snap, &r)), ["b"]);
        assert_eq!(
            nodes_of(&walking().schedule(&snap, &r)),
            ["b"],
            "the sampled walk too"
        );
        // Only "a" fits: it is used all the same (soft, not a filter).
        let big = {
            let mut big = req("web", 1, 2000, 0);
            big.avoid = vec!["b".into()];
            big
        };
        let full = Snapshot::new(
            vec![node("a", 4000, 8, &[]), node("b", 4000, 8, &[])],
            vec![placed("y", "other", "a", 3000, 0, 90)],
        )
        .expect("snapshot");
        assert_eq!(nodes_of(&schedule(&full, &big)), ["b"]);
        let mut only_a = big.clone();
        only_a.avoid = vec!["a".into()];
        let snap_b_full = Snapshot::new(
            vec![node("a", 4000, 8, &[]), node("b", 4000, 8, &[])],
            vec![placed("y", "other", "b", 3000, 0, 90)],
        )
        .expect("snapshot");
        assert_eq!(nodes_of(&schedule(&snap_b_full, &only_a)), ["a"]);
    }

    #[test]
    fn pin_filter_allows_only_the_named_node() {
        let snap = Snapshot::new(
            vec![node("a", 4000, 8, &[]), node("b", 4000, 8, &[])],
            vec![],
        )
        .expect("snapshot");
        let mut r = req("agent-sidecar", 1, 100, 0);
        r.node = Some("b".into());
        assert_eq!(
            PinFilter.check(&view_of(&snap, "a"), &r),
            Err(Reason::NotPinned)
        );
        assert_eq!(PinFilter.check(&view_of(&snap, "b"), &r), Ok(()));
        assert_eq!(nodes_of(&schedule(&snap, &r)), ["b"]);
        r.node = Some("gone".into());
        let out = schedule(&snap, &r);
        assert_eq!(out.unplaced, 1);
        assert_eq!(
            out.explanation.to_string(),
            "0/2 nodes fit: 2 not the requested node gone"
        );
    }

    #[test]
    fn constraint_filter_handles_all_six_operators() {
        let snap = Snapshot::new(
            vec![
                node("a", 1000, 1, &[("zone", "z1"), ("gpu", "yes")]),
                node("b", 1000, 1, &[("zone", "z2")]),
                node("c", 1000, 1, &[]),
            ],
            vec![],
        )
        .expect("snapshot");
        let cases: [(Constraint, &[&str]); 8] = [
            (constraint("zone", Operator::In, &["z1", "z3"]), &["a"]),
            (constraint("zone", Operator::NotIn, &["z1"]), &["b", "c"]),
            (constraint("gpu", Operator::Exists, &[]), &["a"]),
            (constraint("gpu", Operator::DoesNotExist, &[]), &["b", "c"]),
            (constraint("zone", Operator::Equal, &["z2"]), &["b"]),
            (constraint("zone", Operator::NotEqual, &["z2"]), &["a", "c"]),
            (
                constraint("nope", Operator::NotIn, &["x"]),
                &["a", "b", "c"],
            ),
            (constraint("nope", Operator::In, &["x"]), &[]),
        ];
        for (c, want) in cases {
            let mut r = req("j", 3, 0, 0);
            r.placement.constraints = vec![c.clone()];
            r.placement.job_anti_affinity = true;
            let by_check: Vec<&str> = ["a", "b", "c"]
                .into_iter()
                .filter(|n| ConstraintFilter.check(&view_of(&snap, n), &r).is_ok())
                .collect();
            assert_eq!(by_check, want, "{c:?}");
            let by_index: Vec<&str> = snap
                .matching(&c.key, c.operator, &c.values)
                .iter()
                .map(|i| snap.nodes[i as usize].info.name.as_str())
                .collect();
            assert_eq!(by_index, want, "{c:?}");
            let out = schedule(&snap, &r);
            let mut placed: Vec<&str> = nodes_of(&out);
            placed.sort();
            placed.dedup();
            assert_eq!(placed, want, "{c:?}");
        }
    }

    #[test]
    fn job_anti_affinity_keeps_one_replica_per_node() {
        let snap = Snapshot::new(
            vec![node("a", 8000, 8, &[]), node("b", 8000, 8, &[])],
            vec![placed("x1", "db", "a", 100, 0, 50)],
        )
        .expect("snapshot");
        let mut r = req("db", 3, 100, 0);
        r.placement.job_anti_affinity = true;
        assert_eq!(
            JobAntiAffinityFilter.check(&view_of(&snap, "a"), &r),
            Ok(()),
            "the view of a bare snapshot counts no replicas"
        );
        let out = schedule(&snap, &r);
        assert_eq!(nodes_of(&out), ["b"]);
        assert_eq!(out.unplaced, 2);
        assert_eq!(
            out.explanation.to_string(),
            "0/2 nodes fit: 2 already running a replica of db (job anti-affinity)"
        );
        // Without the rule, binpack stacks them.
        r.placement.job_anti_affinity = false;
        assert_eq!(nodes_of(&schedule(&snap, &r)), ["a", "a", "a"]);
    }

    #[test]
    fn cpu_and_memory_filters_name_the_shortfall() {
        let snap = Snapshot::new(
            vec![node("a", 4000, 8, &[])],
            vec![placed("x", "other", "a", 3500, 4 * GI + GI / 2, 50)],
        )
        .expect("snapshot");
        let v = view_of(&snap, "a");
        assert_eq!(
            CpuFilter.check(&v, &req("j", 1, 2000, 0)),
            Err(Reason::Cpu {
                needed: 2000,
                free: 500
            })
        );
        assert_eq!(
            MemoryFilter.check(&v, &req("j", 1, 0, 8 * GI)),
            Err(Reason::Memory {
                needed: 8 * GI,
                free: 3 * GI + GI / 2
            })
        );
        assert_eq!(CpuFilter.check(&v, &req("j", 1, 500, 0)), Ok(()));
    }

    #[test]
    fn explanation_counts_every_node_and_shows_the_closest_miss() {
        let mut n1 = node("n1", 4000, 16, &[]);
        n1.ready = false;
        let mut n2 = node("n2", 4000, 16, &[]);
        n2.ready = false;
        let snap = Snapshot::new(
            vec![n1, n2, node("n3", 4000, 8, &[])],
            vec![placed("x", "other", "n3", 0, 4 * GI + GI / 2, 80)],
        )
        .expect("snapshot");
        let out = schedule(&snap, &req("big", 1, 1000, 8 * GI));
        assert_eq!(out.unplaced, 1);
        assert!(out.explanation.exhaustive);
        assert_eq!(
            out.explanation.to_string(),
            "0/3 nodes fit: 2 not ready; 1 insufficient memory (needs 8Gi, best node has 3.5Gi free)"
        );
        assert_eq!(
            out.to_string(),
            "placed 0/1 replicas; 0/3 nodes fit: 2 not ready; 1 insufficient memory \
             (needs 8Gi, best node has 3.5Gi free)"
        );
    }

    #[test]
    fn best_example_is_the_node_closest_to_fitting() {
        let snap = Snapshot::new(
            vec![
                node("a", 1000, 1, &[]),
                node("b", 3000, 1, &[]),
                node("c", 2000, 1, &[]),
            ],
            vec![],
        )
        .expect("snapshot");
        let out = schedule(&snap, &req("j", 1, 4000, 0));
        assert_eq!(
            out.explanation.to_string(),
            "0/3 nodes fit: 3 insufficient cpu (needs 4000m, best node has 3000m free)"
        );
    }

    fn gpu_node(name: &str, gpus: Vec<GpuInfo>) -> NodeInfo {
        let mut n = node(name, 32000, 128, &[]);
        n.capacity.gpus = gpus;
        n
    }

    fn gpu_req(job: &str, count: u32, model: Option<&str>, mem_gi: Option<u64>) -> Request {
        let mut r = req(job, 1, 1000, GI);
        r.resources.gpus = Some(GpuRequest {
            count,
            model: model.map(str::to_string),
            memory: mem_gi.map(|m| ByteSize(m * GI)),
        });
        r
    }

    #[test]
    fn gpu_filter_matches_model_substring_and_memory() {
        let snap = Snapshot::new(
            vec![
                gpu_node(
                    "g1",
                    vec![
                        gpu("GPU-a", "NVIDIA A100-SXM4-80GB", 80),
                        gpu("GPU-b", "NVIDIA A100-SXM4-40GB", 40),
                    ],
                ),
                gpu_node("g2", vec![gpu("GPU-c", "NVIDIA L4", 24)]),
                node("cpu", 32000, 128, &[]),
            ],
            vec![],
        )
        .expect("snapshot");
        let g1 = view_of(&snap, "g1");
        let g2 = view_of(&snap, "g2");
        let cpu = view_of(&snap, "cpu");
        let r = gpu_req("t", 1, Some("a100"), Some(60));
        assert_eq!(GpuFilter.check(&g1, &r), Ok(()));
        assert_eq!(
            GpuFilter.check(&g2, &r),
            Err(Reason::Gpu { needed: 1, free: 0 })
        );
        assert_eq!(
            GpuFilter.check(&cpu, &r),
            Err(Reason::Gpu { needed: 1, free: 0 })
        );
        let r2 = gpu_req("t", 2, Some("A100"), None);
        assert_eq!(GpuFilter.check(&g1, &r2), Ok(()));
        let r3 = gpu_req("t", 2, None, Some(40));
        assert_eq!(GpuFilter.check(&g1, &r3), Ok(()));
        assert_eq!(
            GpuFilter.check(&g2, &r3),
            Err(Reason::Gpu { needed: 2, free: 0 })
        );
        // The scheduler gives the 80 GB GPU to the job that needs it...
        let out = schedule(&snap, &r);
        assert_eq!(out.assignments[0].gpu_uuids, ["GPU-a"]);
        // ...and the smallest matching GPU to one that does not.
        let out = schedule(&snap, &gpu_req("t", 1, Some("A100"), None));
        assert_eq!(out.assignments[0].gpu_uuids, ["GPU-b"]);
        let out = schedule(&snap, &gpu_req("t", 1, Some("L4"), None));
        assert_eq!(nodes_of(&out), ["g2"]);
        assert_eq!(out.assignments[0].gpu_uuids, ["GPU-c"]);
        let out = schedule(&snap, &gpu_req("t", 1, Some("H100"), None));
        assert_eq!(out.unplaced, 1);
        assert_eq!(
            out.explanation.to_string(),
            "0/3 nodes fit: 3 insufficient GPUs (needs 1 GPU matching \"H100\", best node has 0 free)"
        );
    }

    #[test]
    fn gpus_are_never_given_twice() {
        let mut snap = Snapshot::new(
            vec![gpu_node(
                "g1",
                vec![
                    gpu("GPU-0", "L4", 24),
                    gpu("GPU-1", "L4", 24),
                    gpu("GPU-2", "L4", 24),
                ],
            )],
            vec![],
        )
        .expect("snapshot");
        let mut r = gpu_req("t", 2, None, None);
        r.count = 2;
        let out = schedule(&snap, &r);
        assert_eq!(out.assignments.len(), 1);
        assert_eq!(out.assignments[0].gpu_uuids, ["GPU-0", "GPU-1"]);
        assert_eq!(out.unplaced, 1);
        let mut next = 0;
        commit_all(&mut snap, &r, &out, &mut next);
        r.count = 1;
        r.resources.gpus = Some(GpuRequest {
            count: 1,
            model: None,
            memory: None,
        });
        let out = schedule(&snap, &r);
        assert_eq!(out.assignments[0].gpu_uuids, ["GPU-2"]);
        commit_all(&mut snap, &r, &out, &mut next);
        assert_eq!(schedule(&snap, &r).unplaced, 1);
        assert_eq!(
            snap.usage("g1").expect("node").gpu_uuids,
            ["GPU-0", "GPU-1", "GPU-2"]
        );
    }

    // --- scorers -------------------------------------------------------------

    #[test]
    fn binpack_prefers_the_fuller_node_and_spread_the_emptier() {
        let snap = Snapshot::new(
            vec![node("a", 4000, 8, &[]), node("b", 4000, 8, &[])],
            vec![placed("x", "other", "b", 2000, 4 * GI, 50)],
        )
        .expect("snapshot");
        let r = req("j", 1, 1000, GI);
        let a = ResourceScorer.score(&view_of(&snap, "a"), &r);
        let b = ResourceScorer.score(&view_of(&snap, "b"), &r);
        assert!((a - 0.1875).abs() < 1e-9, "{a}");
        assert!((b - 0.6875).abs() < 1e-9, "{b}");
        assert_eq!(nodes_of(&schedule(&snap, &r)), ["b"]);
        let mut s = r.clone();
        s.placement.strategy = Strategy::Spread;
        assert!((ResourceScorer.score(&view_of(&snap, "a"), &s) - 0.8125).abs() < 1e-9);
        assert_eq!(nodes_of(&schedule(&snap, &s)), ["a"]);
        // Spread strategy: a stays the emptier until it took three replicas.
        s.count = 4;
        assert_eq!(nodes_of(&schedule(&snap, &s)), ["a", "a", "a", "b"]);
    }

    #[test]
    fn ties_go_to_the_lowest_node_name() {
        let snap = Snapshot::new(
            vec![
                node("c", 4000, 8, &[]),
                node("a", 4000, 8, &[]),
                node("b", 4000, 8, &[]),
            ],
            vec![],
        )
        .expect("snapshot");
        assert_eq!(nodes_of(&schedule(&snap, &req("j", 1, 1000, 0))), ["a"]);
        assert_eq!(
            nodes_of(&walking().schedule(&snap, &req("j", 1, 1000, 0))),
            ["a"]
        );
    }

    fn weighted(key: &str, op: Operator, values: &[&str], weight: u32) -> WeightedConstraint {
        WeightedConstraint {
            key: key.into(),
            operator: op,
            values: values.iter().map(|v| v.to_string()).collect(),
            weight,
        }
    }

    #[test]
    fn affinity_scorer_weighs_matches() {
        let snap = Snapshot::new(
            vec![
                node("a", 4000, 8, &[("disk", "hdd"), ("capacity", "spot")]),
                node("b", 4000, 8, &[("disk", "ssd"), ("capacity", "spot")]),
                node("c", 4000, 8, &[("disk", "ssd"), ("capacity", "on-demand")]),
            ],
            vec![],
        )
        .expect("snapshot");
        let mut r = req("j", 1, 1000, 0);
        r.placement.affinity = vec![weighted("disk", Operator::Equal, &["ssd"], 75)];
        r.placement.anti_affinity = vec![weighted("capacity", Operator::Equal, &["spot"], 25)];
        assert_eq!(AffinityScorer.weight(&r), 2.0);
        let score = |n| AffinityScorer.score(&view_of(&snap, n), &r);
        assert_eq!(score("a"), 0.0);
        assert_eq!(score("b"), 0.75);
        assert_eq!(score("c"), 1.0);
        assert_eq!(nodes_of(&schedule(&snap, &r)), ["c"]);
        assert_eq!(nodes_of(&walking().schedule(&snap, &r)), ["c"]);
        // A hard rule still wins over a soft one.
        r.placement.constraints = vec![constraint("disk", Operator::Equal, &["hdd"])];
        assert_eq!(nodes_of(&schedule(&snap, &r)), ["a"]);
    }

    fn zones(per_zone: usize) -> Vec<NodeInfo> {
        let mut nodes = Vec::new();
        for z in ["a", "b", "c"] {
            for i in 0..per_zone {
                nodes.push(node(&format!("{z}{i}"), 16000, 64, &[("zone", z)]));
            }
        }
        nodes
    }

    fn per_zone(out: &Outcome) -> BTreeMap<char, usize> {
        let mut m = BTreeMap::new();
        for a in &out.assignments {
            *m.entry(a.node.chars().next().expect("name")).or_insert(0) += 1;
        }
        m
    }

    #[test]
    fn spread_evens_replicas_across_three_zones() {
        let snap = Snapshot::new(zones(4), vec![]).expect("snapshot");
        let mut r = req("web", 9, 500, GI);
        r.placement.spread = vec![Spread {
            key: "zone".into(),
            weight: 50,
        }];
        for sched in [Scheduler::default(), walking()] {
            let out = sched.schedule(&snap, &r);
            assert_eq!(out.unplaced, 0);
            assert_eq!(
                per_zone(&out),
                BTreeMap::from([('a', 3), ('b', 3), ('c', 3)])
            );
            // Binpack still packs within each zone.
            let distinct: BTreeSet<&str> = nodes_of(&out).into_iter().collect();
            assert_eq!(distinct.len(), 3, "{:?}", nodes_of(&out));
        }
    }

    #[test]
    fn the_walk_spreads_across_zones_even_when_names_group_by_zone() {
        // 900 nodes named zone by zone; zone a's nodes are the tightest fits, so a
        // walk in binpack order sees hundreds of them before any other zone.
        let mut nodes = Vec::new();
        let mut allocs = Vec::new();
        for z in ["a", "b", "c"] {
            for i in 0..300 {
                let name = format!("{z}{i:03}");
                if z == "a" {
                    allocs.push(placed(&format!("x-{name}"), "filler", &name, 8000, GI, 50));
                }
                nodes.push(node(&name, 16000, 64, &[("zone", z)]));
            }
        }
        let snap = Snapshot::new(nodes, allocs).expect("snapshot");
        let sched = Scheduler::new(Tuning {
            exhaustive_below: 0,
            ..Tuning::default()
        });
        let mut r = req("web", 9, 500, GI);
        r.placement.spread = vec![Spread {
            key: "zone".into(),
            weight: 50,
        }];
        let out = sched.schedule(&snap, &r);
        assert_eq!(
            per_zone(&out),
            BTreeMap::from([('a', 3), ('b', 3), ('c', 3)])
        );
        assert!(!out.explanation.exhaustive);
        assert!(out.explanation.nodes_evaluated < 900, "{}", out.explanation);
    }

    #[test]
    fn the_walk_finds_affine_nodes_that_come_late() {
        // 300 half-full hdd nodes come first in binpack order; the ssd nodes are empty.
        let mut nodes = Vec::new();
        let mut allocs = Vec::new();
        for i in 0..300 {
            let name = format!("hdd{i:03}");
            allocs.push(placed(&format!("x{i}"), "filler", &name, 8000, GI, 50));
            nodes.push(node(&name, 16000, 64, &[("disk", "hdd")]));
            nodes.push(node(&format!("ssd{i:03}"), 16000, 64, &[("disk", "ssd")]));
        }
        let snap = Snapshot::new(nodes, allocs).expect("snapshot");
        let sched = Scheduler::new(Tuning {
            exhaustive_below: 0,
            ..Tuning::default()
        });
        let mut r = req("db", 2, 1000, GI);
        assert!(
            nodes_of(&sched.schedule(&snap, &r))
                .iter()
                .all(|n| n.starts_with("hdd"))
        );
        r.placement.affinity = vec![weighted("disk", Operator::Equal, &["ssd"], 100)];
        let out = sched.schedule(&snap, &r);
        assert!(
            nodes_of(&out).iter().all(|n| n.starts_with("ssd")),
            "{:?}",
            nodes_of(&out)
        );
    }

    #[test]
    fn spread_counts_existing_replicas() {
        let snap = Snapshot::new(
            zones(2),
            vec![
                placed("w1", "web", "a0", 500, GI, 50),
                placed("w2", "web", "a1", 500, GI, 50),
                placed("w3", "web", "b0", 500, GI, 50),
            ],
        )
        .expect("snapshot");
        let mut r = req("web", 3, 500, GI);
        r.placement.spread = vec![Spread {
            key: "zone".into(),
            weight: 50,
        }];
        let out = schedule(&snap, &r);
        assert_eq!(per_zone(&out), BTreeMap::from([('b', 1), ('c', 2)]));
    }

    #[test]
    fn spread_ignores_values_no_eligible_node_has() {
        let snap = Snapshot::new(zones(2), vec![]).expect("snapshot");
        let mut r = req("web", 4, 500, GI);
        r.placement.spread = vec![Spread {
            key: "zone".into(),
            weight: 50,
        }];
        r.placement.constraints = vec![constraint("zone", Operator::NotEqual, &["c"])];
        let out = schedule(&snap, &r);
        assert_eq!(per_zone(&out), BTreeMap::from([('a', 2), ('b', 2)]));
    }

    #[test]
    fn gpu_reserve_keeps_cpu_work_off_gpu_nodes() {
        let snap = Snapshot::new(
            vec![
                gpu_node("a-gpu", vec![gpu("GPU-0", "L4", 24)]),
                node("b-cpu", 32000, 128, &[]),
            ],
            vec![],
        )
        .expect("snapshot");
        assert_eq!(
            nodes_of(&schedule(&snap, &req("j", 1, 1000, GI))),
            ["b-cpu"]
        );
        assert_eq!(
            GpuReserveScorer.score(&view_of(&snap, "a-gpu"), &req("j", 1, 0, 0)),
            0.0
        );
        assert_eq!(GpuReserveScorer.weight(&gpu_req("t", 1, None, None)), 0.0);
    }

    // --- placement, preemption, commit ----------------------------------------

    // --- ports and disk ----------------------------------------------------------

    fn with_ports(mut p: Placed, ports: &[HostPort]) -> Placed {
        p.host_ports = ports.to_vec();
        p
    }

    fn port(name: &str, host_port: Option<u16>, udp: bool) -> PortRequest {
        PortRequest {
            name: name.into(),
            host_port,
            udp,
        }
    }

    fn host_ports(out: &Outcome) -> Vec<Vec<u16>> {
        out.assignments
            .iter()
            .map(|a| a.ports.iter().map(|p| p.host_port).collect())
            .collect()
    }

    #[test]
    fn a_static_host_port_in_use_refuses_the_node_with_the_holder_named() {
        let x = with_ports(placed("x-1", "x", "a", 100, 0, 50), &[HostPort::tcp(8080)]);
        let snap = Snapshot::new(
            vec![node("a", 4000, 8, &[]), node("b", 4000, 8, &[])],
            vec![x],
        )
        .expect("snapshot");
        let mut r = req("web", 1, 100, 0);
        r.ports = vec![port("http", Some(8080), false)];
        assert_eq!(
            PortFilter.check(&view_of(&snap, "a"), &r),
            Err(Reason::PortInUse {
                port: HostPort::tcp(8080),
                node: "a".into(),
                job: "x".into(),
            })
        );
        assert_eq!(PortFilter.check(&view_of(&snap, "b"), &r), Ok(()));
        // Binpack prefers the fuller node a; the port sends the replica to b.
        let out = schedule(&snap, &r);
        assert_eq!(nodes_of(&out), ["b"]);
        assert_eq!(host_ports(&out), [[8080]]);
        // UDP 8080 is another port: a takes it.
        r.ports = vec![port("dns", Some(8080), true)];
        assert_eq!(nodes_of(&schedule(&snap, &r)), ["a"]);
    }

    #[test]
    fn a_static_host_port_fits_once_per_node_and_the_rest_is_unplaceable_with_the_reason() {
        let x = with_ports(placed("x-1", "x", "a", 100, 0, 50), &[HostPort::tcp(8080)]);
        let mut snap = Snapshot::new(
            vec![node("a", 4000, 8, &[]), node("b", 4000, 8, &[])],
            vec![x],
        )
        .expect("snapshot");
        let mut r = req("web", 3, 100, 0);
        r.ports = vec![port("http", Some(8080), false)];
        for sched in [Scheduler::default(), walking()] {
            let out = sched.schedule(&snap, &r);
            assert_eq!(nodes_of(&out), ["b"]);
            assert_eq!(out.unplaced, 2);
            assert_eq!(
                out.explanation.to_string(),
                "0/2 nodes fit: 2 port 8080/tcp in use on a by job x"
            );
            let ports = &out.explanation.filtered["ports"];
            assert_eq!(ports.count, 2);
        }
        // Committed, b holds the port too: the next request is told who holds b's.
        let out = schedule(&snap, &r);
        let mut next = 0;
        commit_all(&mut snap, &r, &out, &mut next);
        assert_eq!(
            snap.usage("b").expect("b").host_ports,
            [HostPort::tcp(8080)]
        );
        let mut other = req("api", 1, 100, 0);
        other.ports = vec![port("http", Some(8080), false)];
        other.node = Some("b".into());
        let out = schedule(&snap, &other);
        assert_eq!(out.unplaced, 1);
        assert_eq!(
            out.explanation.to_string(),
            "0/2 nodes fit: 1 not the requested node b; 1 port 8080/tcp in use on b by job web"
        );
        // Once web's replica leaves b, the port is free again.
        snap.remove("web-1").expect("placed");
        assert_eq!(nodes_of(&schedule(&snap, &other)), ["b"]);
    }

    #[test]
    fn dynamic_ports_come_from_the_node_range_lowest_first_never_twice() {
        let mut a = node("a", 64_000, 64, &[]);
        a.capacity.dynamic_ports = PortRange {
            first: 20000,
            last: 20004,
        };
        let held = with_ports(placed("x-1", "x", "a", 100, 0, 50), &[HostPort::tcp(20001)]);
        let mut snap = Snapshot::new(vec![a], vec![held]).expect("snapshot");
        let mut r = req("web", 5, 100, 0);
        r.ports = vec![port("http", None, false), port("dns", None, true)];
        let out = schedule(&snap, &r);
        // TCP skips the held 20001; UDP is its own space.
        assert_eq!(
            host_ports(&out),
            [
                [20000, 20000],
                [20002, 20001],
                [20003, 20002],
                [20004, 20003]
            ]
        );
        assert_eq!(out.unplaced, 1);
        assert_eq!(
            out.explanation.to_string(),
            "0/1 nodes fit: 1 no 2 free host port(s) left in the dynamic range 20000-20004"
        );
        let mut next = 0;
        commit_all(&mut snap, &r, &out, &mut next);
        let usage = snap.usage("a").expect("a");
        let tcp: Vec<u16> = usage
            .host_ports
            .iter()
            .filter(|p| !p.udp)
            .map(|p| p.port)
            .collect();
        assert_eq!(tcp, [20000, 20001, 20002, 20003, 20004]);
        // A static port inside the range is not handed out as a dynamic one.
        let mut b = node("b", 4000, 8, &[]);
        b.capacity.dynamic_ports = PortRange {
            first: 20000,
            last: 20010,
        };
        let snap = Snapshot::new(vec![b], vec![]).expect("snapshot");
        let mut r = req("web", 1, 100, 0);
        r.ports = vec![
            port("metrics", None, false),
            port("http", Some(20000), false),
        ];
        assert_eq!(host_ports(&schedule(&snap, &r)), [[20001, 20000]]);
    }

    #[test]
    fn disk_requests_fit_against_each_node_disk() {
        let mut a = node("a", 4000, 8, &[]);
        a.capacity.disk_bytes = 10 * GI;
        let mut b = node("b", 4000, 8, &[]);
        b.capacity.disk_bytes = 100 * GI;
        let mut x = placed("x-1", "x", "a", 100, 0, 50);
        x.disk_bytes = 8 * GI;
        let mut snap = Snapshot::new(vec![a, b], vec![x]).expect("snapshot");
        let mut r = req("web", 1, 100, 0);
        r.resources.disk = ByteSize(4 * GI);
        assert_eq!(
            DiskFilter.check(&view_of(&snap, "a"), &r),
            Err(Reason::Disk {
                needed: 4 * GI,
                free: 2 * GI
            })
        );
        let out = schedule(&snap, &r);
        assert_eq!(nodes_of(&out), ["b"]);
        let mut next = 0;
        commit_all(&mut snap, &r, &out, &mut next);
        assert_eq!(snap.usage("b").expect("b").disk_bytes, 4 * GI);
        r.resources.disk = ByteSize(97 * GI);
        let out = schedule(&snap, &r);
        assert_eq!(out.unplaced, 1);
        assert_eq!(
            out.explanation.to_string(),
            "0/2 nodes fit: 2 insufficient disk (needs 97Gi, best node has 96Gi free)"
        );
        // Disk that fits exactly is taken.
        r.resources.disk = ByteSize(96 * GI);
        assert_eq!(nodes_of(&schedule(&snap, &r)), ["b"]);
    }

    #[test]
    fn preemption_frees_a_static_host_port() {
        let low = with_ports(placed("x-1", "x", "a", 100, 0, 10), &[HostPort::tcp(8080)]);
        let snap = Snapshot::new(vec![node("a", 4000, 8, &[])], vec![low]).expect("snapshot");
        let mut r = req("web", 1, 100, 0);
        r.ports = vec![port("http", Some(8080), false)];
        r.priority = 5;
        assert_eq!(
            schedule(&snap, &r).unplaced,
            1,
            "equal or higher priority stays"
        );
        r.priority = 50;
        let out = schedule(&snap, &r);
        assert_eq!(nodes_of(&out), ["a"]);
        assert_eq!(out.preemptions, ["x-1"]);
    }

    #[test]
    fn replicas_do_not_overcommit_within_one_request() {
        let snap = Snapshot::new(
            vec![node("a", 4000, 8, &[]), node("b", 2000, 8, &[])],
            vec![],
        )
        .expect("snapshot");
        // Binpack fills the smaller node first: it is the fuller after placement.
        let out = schedule(&snap, &req("j", 5, 1000, GI));
        assert_eq!(nodes_of(&out), ["b", "b", "a", "a", "a"]);
        let out = schedule(&snap, &req("j", 8, 1000, GI));
        assert_eq!(out.assignments.len(), 6);
        assert_eq!(out.unplaced, 2);
        assert_eq!(
            out.explanation.to_string(),
            "0/2 nodes fit: 2 insufficient cpu (needs 1000m, best node has 0m free)"
        );
    }

    #[test]
    fn preemption_evicts_lowest_priority_first_then_fewest() {
        let snap = Snapshot::new(
            vec![node("a", 4000, 16, &[]), node("b", 4000, 16, &[])],
            vec![
                // a: one priority-10 allocation would do.
                placed("a-low", "batch", "a", 3000, GI, 10),
                placed("a-mid", "svc", "a", 1000, GI, 40),
                // b: two priority-5 allocations are needed.
                placed("b-1", "scratch", "b", 2000, GI, 5),
                placed("b-2", "scratch", "b", 2000, GI, 5),
            ],
        )
        .expect("snapshot");
        let mut r = req("important", 1, 3000, GI);
        r.priority = 50;
        let out = schedule(&snap, &r);
        assert_eq!(nodes_of(&out), ["b"]);
        assert_eq!(out.preemptions, ["b-1", "b-2"]);
        assert_eq!(out.assignments[0].preempted, ["b-1", "b-2"]);
        assert!(
            out.explanation
                .to_string()
                .ends_with("placed on b by preempting 2 allocation(s) of priority 5 or lower"),
            "{}",
            out.explanation
        );
        // Needing less room, one priority-5 eviction is enough.
        let out = schedule(&snap, &req("important", 1, 2000, GI));
        assert_eq!(out.preemptions, ["b-1"]);
    }

    #[test]
    fn preemption_never_touches_equal_or_higher_priority_or_the_job_itself() {
        let snap = Snapshot::new(
            vec![node("a", 4000, 16, &[])],
            vec![
                placed("peer", "other", "a", 2000, GI, 50),
                placed("self", "me", "a", 1000, GI, 10),
                placed("low", "batch", "a", 1000, GI, 10),
            ],
        )
        .expect("snapshot");
        let mut r = req("me", 1, 2500, GI);
        r.priority = 50;
        let out = schedule(&snap, &r);
        assert_eq!(out.unplaced, 1);
        assert!(out.preemptions.is_empty());
        assert_eq!(
            out.explanation.to_string(),
            "0/1 nodes fit: 1 insufficient cpu (needs 2500m, best node has 0m free); \
             preempting allocations of priority below 50 on 1 node(s) would not make room"
        );
        r.resources.cpu = Millicores(1000);
        let out = schedule(&snap, &r);
        assert_eq!(out.preemptions, ["low"]);
        r.priority = 10;
        assert_eq!(schedule(&snap, &r).unplaced, 1);
    }

    #[test]
    fn preemption_frees_gpus() {
        let mut snap = Snapshot::new(
            vec![gpu_node("g", vec![gpu("GPU-0", "A100", 80)])],
            vec![Placed {
                gpu_uuids: vec!["GPU-0".into()],
                ..placed("notebook", "jupyter", "g", 1000, GI, 5)
            }],
        )
        .expect("snapshot");
        let mut r = gpu_req("train", 1, Some("A100"), None);
        r.priority = 90;
        let out = schedule(&snap, &r);
        assert_eq!(out.preemptions, ["notebook"]);
        assert_eq!(out.assignments[0].gpu_uuids, ["GPU-0"]);
        snap.commit(&r, &out, &["train-1".into()]).expect("commit");
        assert!(snap.allocation("notebook").is_none());
        assert_eq!(snap.usage("g").expect("node").allocations, ["train-1"]);
    }

    #[test]
    fn commit_checks_before_changing_anything() {
        let mut snap = Snapshot::new(vec![node("a", 4000, 8, &[])], vec![]).expect("snapshot");
        let r = req("j", 2, 1000, GI);
        let out = schedule(&snap, &r);
        assert_eq!(
            snap.commit(&r, &out, &["x".into()]),
            Err(SnapshotError::IdCount {
                ids: 1,
                assignments: 2
            })
        );
        assert_eq!(
            snap.commit(&r, &out, &["x".into(), "x".into()]),
            Err(SnapshotError::DuplicateAllocation("x".into()))
        );
        assert!(snap.allocations().next().is_none());
        snap.commit(&r, &out, &["x".into(), "y".into()])
            .expect("commit");
        let u = snap.usage("a").expect("node");
        assert_eq!((u.cpu_millis, u.memory_bytes), (2000, 2 * GI));
        assert_eq!(snap.replicas("j"), BTreeMap::from([("a".to_string(), 2)]));
        assert!(snap.remove("x").is_some());
        assert_eq!(snap.usage("a").expect("node").cpu_millis, 1000);
    }

    #[test]
    fn snapshot_refuses_inconsistent_input() {
        let dup = Snapshot::new(vec![node("a", 1, 1, &[]), node("a", 1, 1, &[])], vec![]);
        assert_eq!(dup.err(), Some(SnapshotError::DuplicateNode("a".into())));
        let unknown = Snapshot::new(
            vec![node("a", 1, 1, &[])],
            vec![placed("x", "j", "b", 0, 0, 1)],
        );
        assert!(matches!(unknown, Err(SnapshotError::UnknownNode { .. })));
        let g = vec![gpu_node("g", vec![gpu("GPU-0", "L4", 24)])];
        let two = Snapshot::new(
            g.clone(),
            vec![
                Placed {
                    gpu_uuids: vec!["GPU-0".into()],
                    ..placed("x", "j", "g", 0, 0, 1)
                },
                Placed {
                    gpu_uuids: vec!["GPU-0".into()],
                    ..placed("y", "j", "g", 0, 0, 1)
                },
            ],
        );
        assert!(matches!(two, Err(SnapshotError::GpuInUse { .. })));
        let bad = Snapshot::new(
            g,
            vec![Placed {
                gpu_uuids: vec!["GPU-9".into()],
                ..placed("x", "j", "g", 0, 0, 1)
            }],
        );
        assert!(matches!(bad, Err(SnapshotError::UnknownGpu { .. })));
    }

    #[test]
    fn the_walk_packs_like_the_exhaustive_search_on_a_simple_fleet() {
        // 40 equal nodes, 3 replicas of 1 core per node fill them in name order.
        let nodes: Vec<NodeInfo> = (0..40)
            .map(|i| node(&format!("n{i:02}"), 3000, 64, &[]))
            .collect();
        let mut snap = Snapshot::new(nodes, vec![]).expect("snapshot");
        let sched = Scheduler::new(Tuning {
            exhaustive_below: 0,
            ..Tuning::default()
        });
        let mut next = 0;
        for _ in 0..30 {
            let r = req("j", 2, 1000, GI);
            let out = sched.schedule(&snap, &r);
            commit_all(&mut snap, &r, &out, &mut next);
        }
        let used = snap
            .nodes()
            .filter(|n| snap.usage(&n.name).is_some_and(|u| u.cpu_millis > 0))
            .count();
        assert_eq!(used, 20);
    }

    /// A custom rule: nodes under maintenance take nothing.
    #[derive(Debug)]
    struct Maintenance;

    impl Filter for Maintenance {
        fn name(&self) -> &'static str {
            "maintenance"
        }
        fn check(&self, node: &NodeView<'_>, _req: &Request) -> Result<(), Reason> {
            match node.info.labels.get("maintenance") {
                Some(until) => Err(Reason::Other(format!("under maintenance until {until}"))),
                None => Ok(()),
            }
        }
    }

    /// A custom preference: the node named `preferred`.
    #[derive(Debug)]
    struct Prefer(&'static str);

    impl Scorer for Prefer {
        fn name(&self) -> &'static str {
            "prefer"
        }
        fn weight(&self, _req: &Request) -> f64 {
            10.0
        }
        fn score(&self, node: &NodeView<'_>, _req: &Request) -> f64 {
            if node.info.name == self.0 { 1.0 } else { 0.0 }
        }
    }

    #[test]
    fn custom_filters_and_scorers_plug_in() {
        let snap = Snapshot::new(
            vec![
                node("a", 4000, 8, &[("maintenance", "friday")]),
                node("b", 4000, 8, &[]),
                node("c", 4000, 8, &[]),
            ],
            vec![],
        )
        .expect("snapshot");
        let sched = Scheduler::default()
            .with_filter(Maintenance)
            .with_scorer(Prefer("c"));
        assert_eq!(
            nodes_of(&sched.schedule(&snap, &req("j", 1, 1000, 0))),
            ["c"]
        );
        let out = sched.schedule(&snap, &req("j", 9, 1000, 0));
        assert_eq!(out.assignments.len(), 8);
        assert_eq!(
            out.explanation.to_string(),
            "0/3 nodes fit: 2 insufficient cpu (needs 1000m, best node has 0m free); \
             1 under maintenance until friday"
        );
    }

    #[test]
    fn human_bytes() {
        assert_eq!(HumanBytes(8 * GI).to_string(), "8Gi");
        assert_eq!(HumanBytes(3 * GI + GI / 2).to_string(), "3.5Gi");
        assert_eq!(HumanBytes(512 << 20).to_string(), "512Mi");
        assert_eq!(HumanBytes(100).to_string(), "100");
    }

    #[test]
    fn node_set_operations() {
        let mut s = NodeSet::empty(70);
        s.insert(0);
        s.insert(69);
        s.insert(70); // out of range: ignored
        assert_eq!(s.iter().collect::<Vec<_>>(), [0, 69]);
        s.complement();
        assert_eq!(s.count(), 68);
        assert!(!s.contains(69) && s.contains(68));
        let full = NodeSet::full(70);
        assert_eq!(full.count(), 70);
        s.union_with(&full);
        assert_eq!(s, full);
    }

    // --- properties ----------------------------------------------------------

    const MODELS: [&str; 3] = ["NVIDIA A100-SXM4", "NVIDIA H100", "NVIDIA L4"];

    fn fleet_strategy() -> impl proptest::strategy::Strategy<Value = Vec<NodeInfo>> {
        prop::collection::vec(
            (
                1u64..=16,
                1u64..=64,
                prop::option::of(0usize..3),
                prop::option::of(0usize..2),
                prop::collection::vec((0usize..3, prop::sample::select(vec![16u64, 40, 80])), 0..4),
                prop::bool::weighted(0.85),
                (0u64..=8, 0u16..4),
            ),
            1..24,
        )
        .prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(
                    |(i, (cores, mem, zone, pool, gpus, ready, (disk, ports)))| {
                        let mut labels = BTreeMap::new();
                        if let Some(z) = zone {
                            labels.insert("zone".to_string(), ["a", "b", "c"][z].to_string());
                        }
                        if let Some(p) = pool {
                            labels.insert("pool".to_string(), ["x", "y"][p].to_string());
                        }
                        NodeInfo {
                            name: format!("n{i:02}"),
                            labels,
                            capacity: Capacity {
                                cpu_millis: cores * 1000,
                                memory_bytes: mem * GI,
                                disk_bytes: disk * GI,
                                // A small range (0 to 4 ports, overlapping the static
                                // ports some requests ask for), so that it runs out.
                                dynamic_ports: PortRange {
                                    first: 30000,
                                    last: 30000 + ports - 1,
                                },
                                gpus: gpus
                                    .into_iter()
                                    .enumerate()
                                    .map(|(g, (m, mem))| GpuInfo {
                                        index: g as u32,
                                        uuid: format!("GPU-{i}-{g}"),
                                        model: MODELS[m].to_string(),
                                        memory_bytes: mem * GI,
                                    })
                                    .collect(),
                            },
                            ready,
                        }
                    },
                )
                .collect()
        })
    }

    fn operator_strategy() -> impl proptest::strategy::Strategy<Value = Operator> {
        prop::sample::select(vec![
            Operator::In,
            Operator::NotIn,
            Operator::Exists,
            Operator::DoesNotExist,
            Operator::Equal,
            Operator::NotEqual,
        ])
    }

    fn constraint_strategy() -> impl proptest::strategy::Strategy<Value = Constraint> {
        (
            prop::sample::select(vec!["zone", "pool", "rack"]),
            operator_strategy(),
            prop::collection::vec(prop::sample::select(vec!["a", "b", "c", "x", "y"]), 0..3),
        )
            .prop_map(|(key, operator, values)| Constraint {
                key: key.to_string(),
                operator,
                values: values.into_iter().map(str::to_string).collect(),
            })
    }

    fn request_strategy() -> impl proptest::strategy::Strategy<Value = Request> {
        (
            (
                prop::sample::select(vec!["web", "db", "batch", "train"]),
                0u32..100,
                0u64..6000,
                0u64..24,
                prop::option::of((
                    0u32..3,
                    prop::option::of(0usize..4),
                    prop::option::of(prop::sample::select(vec![16u64, 40, 80])),
                )),
            ),
            (
                prop::collection::vec(constraint_strategy(), 0..3),
                prop::collection::vec((constraint_strategy(), 1u32..=100), 0..2),
                any::<bool>(),
                prop::option::of(prop::sample::select(vec!["zone", "pool"])),
                any::<bool>(),
                1u32..6,
            ),
            (
                prop::option::of(0u64..4),
                prop::collection::vec(
                    (
                        prop::option::of(prop::sample::select(vec![8080u16, 30001])),
                        prop::bool::weighted(0.2),
                    ),
                    0..3,
                ),
            ),
        )
            .prop_map(
                |(
                    (job, priority, cpu, mem, gpus),
                    (constraints, affinity, anti, spread, spread_strategy, count),
                    (disk, ports),
                )| {
                    let mut r = req(job, count, cpu, mem * GI / 2);
                    r.priority = priority;
                    r.resources.disk = ByteSize(disk.map_or(0, |d| d * GI));
                    let mut statics = BTreeSet::new();
                    r.ports = ports
                        .into_iter()
                        .enumerate()
                        // The manifest allows each static port once per protocol.
                        .filter(|(_, (port, udp))| port.is_none_or(|p| statics.insert((p, *udp))))
                        .map(|(i, (host_port, udp))| PortRequest {
                            name: format!("p{i}"),
                            host_port,
                            udp,
                        })
                        .collect();
                    r.resources.gpus = gpus.map(|(count, model, mem)| GpuRequest {
                        count,
                        model: model.map(|m| ["a100", "H100", "L4", "NVIDIA"][m].to_string()),
                        memory: mem.map(|m| ByteSize(m * GI)),
                    });
                    r.placement.constraints = constraints;
                    r.placement.affinity = affinity
                        .into_iter()
                        .map(|(c, weight)| WeightedConstraint {
                            key: c.key,
                            operator: c.operator,
                            values: c.values,
                            weight,
                        })
                        .collect();
                    r.placement.job_anti_affinity = anti;
                    r.placement.spread = spread
                        .into_iter()
                        .map(|key| Spread {
                            key: key.into(),
                            weight: 50,
                        })
                        .collect();
                    if spread_strategy {
                        r.placement.strategy = Strategy::Spread;
                    }
                    r
                },
            )
    }

    /// Checks that nothing on any node exceeds its capacity and every GPU is held once.
    fn assert_within_capacity(snap: &Snapshot) -> Result<(), TestCaseError> {
        for n in snap.nodes() {
            let u = snap.usage(&n.name).expect("node");
            prop_assert!(
                u.cpu_millis <= n.capacity.cpu_millis,
                "{}: cpu {} > {}",
                n.name,
                u.cpu_millis,
                n.capacity.cpu_millis
            );
            prop_assert!(
                u.memory_bytes <= n.capacity.memory_bytes,
                "{}: memory over",
                n.name
            );
            prop_assert!(
                u.disk_bytes <= n.capacity.disk_bytes,
                "{}: disk over",
                n.name
            );
            let mut ports = BTreeSet::new();
            for a in snap.allocations().filter(|a| a.node == n.name) {
                for p in &a.host_ports {
                    prop_assert!(ports.insert(*p), "{}: port {} held twice", n.name, p);
                }
            }
        }
        let mut gpus = BTreeSet::new();
        for a in snap.allocations() {
            for g in &a.gpu_uuids {
                prop_assert!(gpus.insert(g.clone()), "GPU {} held twice", g);
            }
        }
        Ok(())
    }

    /// Checks every hard rule of `r` for the assignments of `out`, against the
    /// snapshot before the outcome was committed.
    fn assert_hard_rules(snap: &Snapshot, r: &Request, out: &Outcome) -> Result<(), TestCaseError> {
        let mut mine: BTreeMap<&str, u32> = BTreeMap::new();
        for a in &out.assignments {
            let n = snap
                .nodes()
                .find(|n| n.name == a.node)
                .expect("assigned node exists");
            prop_assert!(n.ready, "{} not ready", n.name);
            for c in &r.placement.constraints {
                prop_assert!(
                    c.operator.matches(&n.labels, &c.key, &c.values),
                    "{} breaks {:?}",
                    n.name,
                    c
                );
            }
            if let Some(pin) = &r.node {
                prop_assert_eq!(pin, &n.name);
            }
            let seen = mine.entry(a.node.as_str()).or_insert(0);
            *seen += 1;
            if r.placement.job_anti_affinity {
                prop_assert_eq!(*seen, 1, "two replicas on {}", a.node);
                prop_assert!(
                    !snap.replicas(&r.job).contains_key(&a.node),
                    "replica already on {}",
                    a.node
                );
            }
            let g = r.gpu_count();
            prop_assert_eq!(a.gpu_uuids.len(), g as usize);
            prop_assert_eq!(a.ports.len(), r.ports.len());
            for (asked, got) in r.ports.iter().zip(&a.ports) {
                prop_assert_eq!(&asked.name, &got.name);
                prop_assert_eq!(asked.udp, got.udp);
                match asked.host_port {
                    Some(p) => prop_assert_eq!(p, got.host_port),
                    None => prop_assert!(
                        n.capacity.dynamic_ports.contains(got.host_port),
                        "{} outside {}",
                        got.host_port,
                        n.capacity.dynamic_ports
                    ),
                }
            }
            if let Some(spec) = r.resources.gpus.as_ref().filter(|g| g.count > 0) {
                for uuid in &a.gpu_uuids {
                    let info = n
                        .capacity
                        .gpus
                        .iter()
                        .find(|x| &x.uuid == uuid)
                        .expect("GPU of the node");
                    if let Some(m) = &spec.model {
                        prop_assert!(info.model.to_lowercase().contains(&m.to_lowercase()));
                    }
                    if let Some(m) = spec.memory {
                        prop_assert!(info.memory_bytes >= m.0);
                    }
                }
            }
        }
        for p in &out.preemptions {
            let victim = snap.allocation(p).expect("preempted allocation exists");
            prop_assert!(
                victim.priority < r.priority,
                "preempted {} of priority {} for {}",
                p,
                victim.priority,
                r.priority
            );
            prop_assert_ne!(&victim.job, &r.job);
        }
        Ok(())
    }

    fn assert_explained(snap: &Snapshot, out: &Outcome) -> Result<(), TestCaseError> {
        if out.unplaced > 0 {
            let e = &out.explanation;
            prop_assert!(e.exhaustive);
            prop_assert_eq!(e.feasible, 0);
            prop_assert_eq!(e.nodes_evaluated, snap.len());
            let sum: usize = e.filtered.values().map(|s| s.count).sum();
            prop_assert_eq!(sum, snap.len(), "{}", e);
            for (name, s) in &e.filtered {
                prop_assert!(s.count > 0 && !s.example.is_empty(), "{}: {:?}", name, s);
            }
            let text = e.to_string();
            prop_assert!(
                text.starts_with(&format!("0/{} nodes fit", snap.len())),
                "{}",
                text
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn never_overcommits_and_honours_hard_rules(
            fleet in fleet_strategy(),
            reqs in prop::collection::vec(request_strategy(), 1..14),
            walk in any::<bool>(),
        ) {
            let sched = if walk { walking() } else { Scheduler::default() };
            let mut snap = Snapshot::new(fleet, vec![]).expect("snapshot");
            let mut next = 0;
            for r in &reqs {
                let out = sched.schedule(&snap, r);
                prop_assert_eq!(out.assignments.len() as u32 + out.unplaced, r.count);
                assert_hard_rules(&snap, r, &out)?;
                assert_explained(&snap, &out)?;
                commit_all(&mut snap, r, &out, &mut next);
                assert_within_capacity(&snap)?;
            }
        }

        #[test]
        fn deterministic(
            fleet in fleet_strategy(),
            reqs in prop::collection::vec(request_strategy(), 1..8),
        ) {
            let sched = walking();
            let mut shuffled = fleet.clone();
            shuffled.reverse();
            let mut a = Snapshot::new(fleet, vec![]).expect("snapshot");
            let mut b = Snapshot::new(shuffled, vec![]).expect("snapshot");
            let (mut na, mut nb) = (0, 0);
            for r in &reqs {
                let oa = sched.schedule(&a, r);
                let ob = sched.schedule(&b, r);
                prop_assert_eq!(&oa, &sched.schedule(&a, r));
                prop_assert_eq!(&oa, &ob);
                commit_all(&mut a, r, &oa, &mut na);
                commit_all(&mut b, r, &ob, &mut nb);
            }
        }

        #[test]
        fn the_walk_finds_a_node_whenever_one_fits(
            fleet in fleet_strategy(),
            setup in prop::collection::vec(request_strategy(), 0..6),
            mut r in request_strategy(),
        ) {
            let mut snap = Snapshot::new(fleet, vec![]).expect("snapshot");
            let mut next = 0;
            for s in &setup {
                let out = schedule(&snap, s);
                commit_all(&mut snap, s, &out, &mut next);
            }
            r.count = 1;
            r.priority = 0; // no preemption: compare plain feasibility
            let exact = Scheduler::new(Tuning::exhaustive()).schedule(&snap, &r);
            let walked = walking().schedule(&snap, &r);
            prop_assert_eq!(exact.assignments.len(), walked.assignments.len());
            prop_assert_eq!(exact.explanation.exhaustive, walked.explanation.exhaustive);
        }

        #[test]
        fn preemption_only_evicts_strictly_lower_priority(
            fleet in fleet_strategy(),
            setup in prop::collection::vec(request_strategy(), 1..10),
            r in request_strategy(),
        ) {
            let mut snap = Snapshot::new(fleet, vec![]).expect("snapshot");
            let mut next = 0;
            for s in &setup {
                let out = schedule(&snap, s);
                commit_all(&mut snap, s, &out, &mut next);
            }
            let out = schedule(&snap, &r);
            assert_hard_rules(&snap, &r, &out)?;
            let all: BTreeSet<&String> = out.assignments.iter().flat_map(|a| &a.preempted).collect();
            prop_assert_eq!(all.len(), out.preemptions.len(), "each victim once");
            commit_all(&mut snap, &r, &out, &mut next);
            assert_within_capacity(&snap)?;
        }

        #[test]
        fn label_index_agrees_with_operator_matches(
            fleet in fleet_strategy(),
            c in constraint_strategy(),
        ) {
            let snap = Snapshot::new(fleet, vec![]).expect("snapshot");
            let set = snap.matching(&c.key, c.operator, &c.values);
            for (i, n) in snap.nodes().enumerate() {
                prop_assert_eq!(set.contains(i as u32), c.operator.matches(&n.labels, &c.key, &c.values), "{:?} on {:?}", c, n.labels);
            }
        }
    }
}

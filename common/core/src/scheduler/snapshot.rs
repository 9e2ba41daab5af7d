//! The fleet as the scheduler sees it: the [`Snapshot`] of nodes and allocations
//! with its label and free-resource indexes, node sets and per-node views.

use super::*;

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
    pub(super) words: Vec<u64>,
    pub(super) len: usize,
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

    pub(super) fn trim(&mut self) {
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
    pub(super) nodes: Vec<NodeEntry>,
    pub(super) by_name: HashMap<String, u32>,
    pub(super) labels: HashMap<String, KeyIndex>,
    pub(super) ready: NodeSet,
    pub(super) gpu_nodes: Vec<u32>,
    pub(super) by_cpu: BTreeSet<WalkKey>,
    pub(super) by_mem: BTreeSet<WalkKey>,
    pub(super) allocs: Vec<Option<AllocEntry>>,
    pub(super) free_slots: Vec<usize>,
    pub(super) alloc_slot: HashMap<String, usize>,
    pub(super) jobs: HashMap<String, IdxMap<u32>>,
    pub(super) mean_cpu: f64,
    pub(super) mean_mem: f64,
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

    pub(super) fn reindex(&mut self, idx: u32, change: impl FnOnce(&mut NodeEntry)) {
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
    pub(super) idx: u32,
    pub(super) spread: &'a [SpreadState<'a>],
    pub(super) ports: PortsView<'a>,
}

/// The host ports of one node as a filter sees them: those held by allocations
/// (less the ones the request evicts) and those the request took so far.
#[derive(Clone, Copy)]
pub(super) struct PortsView<'a> {
    pub(super) held: &'a BTreeMap<HostPort, usize>,
    pub(super) allocs: &'a [Option<AllocEntry>],
    pub(super) evicted: &'a BTreeSet<usize>,
    pub(super) victims: &'a [usize],
    pub(super) taken: &'a [HostPort],
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

pub(super) const ABSENT: u32 = u32::MAX;

/// A node in an ordered index: free amount, then a fixed shuffle of the index so
/// that nodes with the same free amount do not come in name order (names often
/// group by zone or rack, which would starve label-sensitive scorers), then the
/// index itself.
pub(super) type WalkKey = (u64, u32, u32);

pub(super) fn walk_key(free: u64, idx: u32) -> WalkKey {
    (free, idx.wrapping_mul(0x9E37_79B1), idx)
}

/// A map keyed by node index, with a cheap fixed hash (node indexes are dense and
/// not attacker-chosen; SipHash showed in profiles).
pub(super) type IdxMap<V> = HashMap<u32, V, BuildHasherDefault<IdxHasher>>;

#[derive(Debug, Default, Clone, Copy)]
pub(super) struct IdxHasher(pub(super) u64);

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
pub(super) struct NodeEntry {
    pub(super) info: NodeInfo,
    pub(super) used_cpu: u64,
    pub(super) used_mem: u64,
    pub(super) used_disk: u64,
    pub(super) gpu_used: u64,
    pub(super) allocs: Vec<usize>,
    /// Host ports held, with the slot of the allocation holding each.
    pub(super) ports: BTreeMap<HostPort, usize>,
}

impl NodeEntry {
    pub(super) fn free_cpu(&self) -> u64 {
        self.info.capacity.cpu_millis.saturating_sub(self.used_cpu)
    }
    pub(super) fn free_mem(&self) -> u64 {
        self.info
            .capacity
            .memory_bytes
            .saturating_sub(self.used_mem)
    }
}

#[derive(Debug, Clone)]
pub(super) struct AllocEntry {
    pub(super) placed: Placed,
    pub(super) node: u32,
    pub(super) gpu_mask: u64,
}

#[derive(Debug, Clone)]
pub(super) struct KeyIndex {
    pub(super) present: NodeSet,
    pub(super) value_ids: HashMap<String, u32>,
    pub(super) nodes_by_value: Vec<Vec<u32>>,
    pub(super) value_of: Vec<u32>,
}

impl KeyIndex {
    pub(super) fn new(n: usize) -> Self {
        KeyIndex {
            present: NodeSet::empty(n),
            value_ids: HashMap::new(),
            nodes_by_value: Vec::new(),
            value_of: vec![ABSENT; n],
        }
    }
}

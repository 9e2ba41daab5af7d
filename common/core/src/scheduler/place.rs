//! Placing replicas: the walk over candidate nodes in index order, the overlay of
//! what earlier replicas of the same request used, spread state, and preemption
//! (which lower-priority allocations to evict when nothing fits).

use super::*;

/// The job's replicas per value of one spread label, for one request.
#[derive(Debug, Clone)]
pub(super) struct SpreadState<'s> {
    pub(super) value_of: Option<&'s [u32]>,
    pub(super) counts: Vec<u32>,
    pub(super) eligible: Vec<bool>,
    pub(super) min: u32,
    pub(super) max: u32,
}

impl SpreadState<'_> {
    pub(super) fn add(&mut self, idx: u32) {
        let Some(v) = self.value_of.and_then(|m| m.get(idx as usize).copied()) else {
            return;
        };
        if v != ABSENT {
            self.counts[v as usize] += 1;
            self.bounds();
        }
    }

    pub(super) fn bounds(&mut self) {
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

pub(super) fn spread_states<'s>(
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
pub(super) enum Dim {
    Cpu,
    Mem,
}

/// What the scheduler works out once per request.
pub(super) struct Plan<'a, 's> {
    /// Nodes that pass every prefilter.
    pub(super) eligible: NodeSet,
    pub(super) eligible_count: usize,
    /// Filters to run node by node, in pipeline order.
    pub(super) checks: Vec<(usize, &'a dyn Filter)>,
    /// Scorers that apply, with their weights and whether they read labels.
    pub(super) scorers: Vec<(&'a dyn Scorer, f64, bool)>,
    pub(super) soft: bool,
    /// The best label-sensitive part of the score an eligible node can get.
    pub(super) soft_bound: f64,
    pub(super) dim: Dim,
    pub(super) descending: bool,
    pub(super) need: u64,
    pub(super) k: usize,
    pub(super) job_nodes: Option<&'s IdxMap<u32>>,
    pub(super) can_preempt: bool,
}

impl<'a, 's> Plan<'a, 's> {
    pub(super) fn new(sched: &'a Scheduler, snap: &'s Snapshot, req: &Request) -> Self {
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

    pub(super) fn score(&self, view: &NodeView<'_>, req: &Request) -> f64 {
        let (hard, soft) = self.score_parts(view, req);
        hard + soft
    }

    /// The score, split into the parts that do not and do depend on labels.
    pub(super) fn score_parts(&self, view: &NodeView<'_>, req: &Request) -> (f64, f64) {
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

    pub(super) fn job_count(&self, idx: u32) -> u32 {
        self.job_nodes
            .and_then(|m| m.get(&idx))
            .copied()
            .unwrap_or(0)
    }
}

/// Changes this request made to one node so far.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Delta {
    pub(super) added_cpu: u64,
    pub(super) added_mem: u64,
    pub(super) added_disk: u64,
    pub(super) freed_cpu: u64,
    pub(super) freed_mem: u64,
    pub(super) freed_disk: u64,
    pub(super) gpu_taken: u64,
    pub(super) gpu_freed: u64,
    pub(super) job_added: u32,
}

/// What is held on one node, counting the request's changes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Used {
    pub(super) cpu: u64,
    pub(super) mem: u64,
    pub(super) disk: u64,
    pub(super) gpus: u64,
}

/// The request's changes to the snapshot while it is being placed.
pub(super) struct Overlay {
    pub(super) touched: NodeSet,
    pub(super) deltas: IdxMap<Delta>,
    /// Host ports the request's replicas took, by node.
    pub(super) taken: IdxMap<Vec<HostPort>>,
    /// Touched nodes by their current free amount in the walk's dimension.
    pub(super) local: BTreeSet<WalkKey>,
    pub(super) evicted: BTreeSet<usize>,
}

impl Overlay {
    pub(super) fn new(n: usize) -> Self {
        Overlay {
            touched: NodeSet::empty(n),
            deltas: IdxMap::default(),
            taken: IdxMap::default(),
            local: BTreeSet::new(),
            evicted: BTreeSet::new(),
        }
    }

    /// What is held on node `idx`, and how many replicas the request put there.
    pub(super) fn used(&self, snap: &Snapshot, idx: u32) -> (Used, u32) {
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
    pub(super) fn taken(&self, idx: u32) -> &[HostPort] {
        self.taken.get(&idx).map_or(&[], Vec::as_slice)
    }

    pub(super) fn change(
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

    pub(super) fn free_in_dim(&self, snap: &Snapshot, plan: &Plan<'_, '_>, idx: u32) -> u64 {
        let (used, _) = self.used(snap, idx);
        let cap = &snap.nodes[idx as usize].info.capacity;
        match plan.dim {
            Dim::Cpu => cap.cpu_millis.saturating_sub(used.cpu),
            Dim::Mem => cap.memory_bytes.saturating_sub(used.mem),
        }
    }

    pub(super) fn place(
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

    pub(super) fn evict(&mut self, snap: &Snapshot, plan: &Plan<'_, '_>, slot: usize) {
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

pub(super) fn ctx_view<'v>(
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

pub(super) fn ports_view<'v>(
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

pub(super) fn view_with<'v>(
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
pub(super) struct Ctx<'c, 'a, 's> {
    pub(super) sched: &'a Scheduler,
    pub(super) snap: &'s Snapshot,
    pub(super) req: &'c Request,
    pub(super) plan: &'c Plan<'a, 's>,
    pub(super) spreads: &'c [SpreadState<'s>],
    pub(super) overlay: &'c Overlay,
}

/// The running state of one replica's pass.
pub(super) struct Pass {
    pub(super) best: Option<(f64, u32)>,
    pub(super) best_soft: f64,
    pub(super) visited: usize,
    pub(super) feasible: usize,
    /// Rejections by filter position: count and the closest miss.
    pub(super) stats: Option<Vec<(usize, Option<Reason>)>>,
}

impl Pass {
    pub(super) fn new(collect: bool, filters: usize) -> Self {
        Pass {
            best: None,
            best_soft: f64::NEG_INFINITY,
            visited: 0,
            feasible: 0,
            stats: collect.then(|| vec![(0, None); filters]),
        }
    }

    pub(super) fn reject(&mut self, filter: usize, reason: Reason) {
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

    pub(super) fn offer(&mut self, score: f64, idx: u32) {
        self.feasible += 1;
        let better = match self.best {
            None => true,
            Some((s, i)) => score > s || (score == s && idx < i),
        };
        if better {
            self.best = Some((score, idx));
        }
    }

    pub(super) fn explanation(
        &self,
        sched: &Scheduler,
        snap: &Snapshot,
        req: &Request,
    ) -> Explanation {
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
pub(super) struct Eviction {
    pub(super) idx: u32,
    pub(super) victims: Vec<usize>,
    pub(super) max_priority: u32,
}

impl Ctx<'_, '_, '_> {
    pub(super) fn view(&self, idx: u32) -> NodeView<'_> {
        ctx_view(self.snap, self.plan, self.spreads, self.overlay, idx)
    }

    /// Evaluates one eligible node; returns whether the pass may stop.
    pub(super) fn evaluate(&self, pass: &mut Pass, idx: u32) -> bool {
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
    pub(super) fn pick(&self, pass: &mut Pass) {
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
    pub(super) fn full_scan(&self) -> (Explanation, Option<(f64, u32)>) {
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
    pub(super) fn preempt(&self) -> (Option<Eviction>, usize) {
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
pub(super) fn merge_walk<'x>(
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

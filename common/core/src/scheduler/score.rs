//! The built-in scorers: how well a node that passes every filter suits a replica.

use super::*;

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

/// Built-in scorer: image locality. Nodes in [`Request::image_nodes`] (they
/// hold the task's image) score 1, the others 0, at [`IMAGE_WEIGHT`]; without
/// such nodes it is left out.
#[derive(Debug, Clone, Copy, Default)]
pub struct ImageScorer;

impl Scorer for ImageScorer {
    fn name(&self) -> &'static str {
        "image"
    }
    fn weight(&self, req: &Request) -> f64 {
        if req.image_nodes.is_empty() {
            0.0
        } else {
            IMAGE_WEIGHT
        }
    }
    fn score(&self, node: &NodeView<'_>, req: &Request) -> f64 {
        if req.image_nodes.contains(&node.info.name) {
            1.0
        } else {
            0.0
        }
    }
    // Not a label, but the walk must look past sampled nodes for one that holds
    // the image.
    fn label_sensitive(&self, req: &Request) -> bool {
        !req.image_nodes.is_empty()
    }
    fn best_possible(&self, snap: &Snapshot, eligible: &NodeSet, req: &Request) -> f64 {
        let any = eligible
            .iter()
            .any(|i| req.image_nodes.contains(&snap.nodes[i as usize].info.name));
        if any { 1.0 } else { 0.0 }
    }
}

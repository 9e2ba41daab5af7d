//! Cluster autoscaling of node pools: which nodes to add, drain and remove now.
//! Pure and deterministic: [`plan`] takes the pools (with their members as the
//! provider and the registry see them, and each pool's [`Settings`]), the replicas
//! the scheduler could not place and `now`, and returns [`PoolAction`]s, each with a sentence that
//! says why. No clock, no I/O.
//!
//! # The rules
//!
//! 1. **Bounds.** A pool below `minSize` grows to it; a pool above `maxSize` drains
//!    its emptiest members down to it.
//! 2. **Scale-up.** Each unplaced demand (a job's replicas that fit no node) goes to
//!    the cheapest elastic pool whose template could hold one replica (CPU, memory,
//!    GPUs and the job's label constraints against the labels a new node gets) and
//!    that is below `maxSize`. Members still provisioning count as capacity already
//!    on its way, so one demand never asks twice. When no pool fits, nothing grows.
//! 3. **Scale-down.** A ready member whose reserved CPU and memory stayed at or below
//!    [`Settings::underused_percent`] for [`Settings::scale_down_after`] is drained
//!    (made unschedulable), if the pool stays at or above `minSize`, no unplaced
//!    demand could use the pool, and at most [`Settings::disruption_budget`]
//!    members of the pool drain at once. A drained member is removed once it holds
//!    no allocation, or, when the pool keeps a warm pool with room in it
//!    (`warm.size`), stopped and kept warm instead ([`PoolAction::Park`]): the
//!    next scale-out starts it in seconds. A member under a spot interruption
//!    notice ([`Member::reclaimed`]) is always removed.
//! 4. **Broken members.** A member not ready for [`Settings::provision_timeout`]
//!    (it never enrolled, or its host died) is removed and, if needed, replaced by
//!    the bounds on a later pass.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

pub use crate::autoscale::pool::Headroom;
use crate::autoscale::pool::{CapacityType, NodeTemplateSpec};
use crate::manifest::Constraint;

/// Default time a member must stay under-used before it is drained.
pub const DEFAULT_SCALE_DOWN_AFTER: Duration = Duration::from_secs(60);
/// Default number of members of one pool that may drain at once.
pub const DEFAULT_DISRUPTION_BUDGET: u32 = 1;
/// Default reserved share (percent of CPU and of memory) at or below which a member
/// counts as under-used: 0, only empty members.
pub const DEFAULT_UNDERUSED_PERCENT: u32 = 0;
/// Default time a member may take to become ready.
pub const DEFAULT_PROVISION_TIMEOUT: Duration = Duration::from_secs(180);

/// Tuning of [`plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// How long a member must stay under-used before it is drained.
    pub scale_down_after: Duration,
    /// Most members of one pool draining at once (at least 1 is used).
    pub disruption_budget: u32,
    /// Reserved CPU and memory (percent of capacity) at or below which a member is
    /// under-used.
    pub underused_percent: u32,
    /// How long a member may stay not ready before it is removed.
    pub provision_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            scale_down_after: DEFAULT_SCALE_DOWN_AFTER,
            disruption_budget: DEFAULT_DISRUPTION_BUDGET,
            underused_percent: DEFAULT_UNDERUSED_PERCENT,
            provision_timeout: DEFAULT_PROVISION_TIMEOUT,
        }
    }
}

/// Where a member of a pool stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Created by the provider, not (yet) ready, since this time (Unix ms).
    Provisioning {
        /// When it was created or last seen ready (Unix ms).
        since_ms: u64,
    },
    /// Connected and schedulable.
    Ready,
    /// Made unschedulable to be removed, since this time (Unix ms).
    Draining {
        /// When the drain began (Unix ms).
        since_ms: u64,
    },
    /// Being provisioned for the warm pool (it enrolls, then stops), since this
    /// time (Unix ms). Not part of the pool's size.
    Warming {
        /// When it was created (Unix ms).
        since_ms: u64,
    },
    /// Provisioned and stopped in the warm pool, ready to be started. Not part of
    /// the pool's size.
    Warm,
}

/// One member of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The node name.
    pub name: String,
    /// Where it stands.
    pub phase: Phase,
    /// Allocations the controller wants running on it.
    pub allocations: u32,
    /// CPU reserved by those allocations (millicores).
    pub reserved_cpu_millis: u64,
    /// Memory reserved by those allocations (bytes).
    pub reserved_memory_bytes: u64,
    /// Allocatable CPU (millicores); 0 when unknown.
    pub capacity_cpu_millis: u64,
    /// Allocatable memory (bytes); 0 when unknown.
    pub capacity_memory_bytes: u64,
    /// Since when (Unix ms) it has been under-used without a break; `None` while it
    /// is busier than that.
    pub underused_since_ms: Option<u64>,
    /// Taken back by its provider (a spot interruption notice): once drained it is
    /// removed, never kept warm.
    pub reclaimed: bool,
}

impl Member {
    /// Whether its reservations are at or below `percent` of its capacity.
    pub fn underused(&self, percent: u32) -> bool {
        if self.allocations == 0 {
            return true;
        }
        let share = |used: u64, cap: u64| {
            cap > 0 && u128::from(used) * 100 <= u128::from(cap) * u128::from(percent)
        };
        share(self.reserved_cpu_millis, self.capacity_cpu_millis)
            && share(self.reserved_memory_bytes, self.capacity_memory_bytes)
    }
}

/// A pool as [`plan`] sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolView {
    /// The pool name.
    pub name: String,
    /// Fewest members.
    pub min_size: u32,
    /// Most members.
    pub max_size: u32,
    /// Its (resolved) template.
    pub template: NodeTemplateSpec,
    /// Whether its provider can create and delete nodes (`static` cannot).
    pub elastic: bool,
    /// Its scale-down tuning.
    pub settings: Settings,
    /// Its members.
    pub members: Vec<Member>,
    /// Nodes to keep warm beside the pool (`warm.size`; 0: none).
    pub warm: u32,
    /// Empty nodes to keep ready in the pool for new replicas.
    pub headroom: Option<Headroom>,
    /// Whether it may grow now: `false` while its provider is failing (spot
    /// capacity short, a backoff after a failed create). Demands then go to the
    /// next fitting pool.
    pub can_grow: bool,
}

impl PoolView {
    /// Members that are not draining or warm: the pool's size.
    pub fn size(&self) -> u32 {
        count(self.members.iter().filter(|m| {
            !matches!(
                m.phase,
                Phase::Draining { .. } | Phase::Warming { .. } | Phase::Warm
            )
        }))
    }

    /// The labels a new node of this pool gets.
    pub fn node_labels(&self) -> BTreeMap<String, String> {
        node_labels(&self.name, &self.template)
    }
}

/// The labels every node of `pool` made from `template` carries: the template's own,
/// plus `pool`, `instance_type` and `capacity`.
pub fn node_labels(pool: &str, template: &NodeTemplateSpec) -> BTreeMap<String, String> {
    let mut labels = template.labels.clone();
    labels.insert("pool".into(), pool.to_string());
    labels.insert("instance_type".into(), template.instance_type.clone());
    labels.insert("capacity".into(), capacity_label(template.capacity_type));
    labels
}

/// The `capacity` label value of a capacity type.
pub fn capacity_label(c: CapacityType) -> String {
    c.to_string()
}

/// Replicas of a job that the scheduler could not place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Demand {
    /// The job.
    pub job: String,
    /// How many replicas wait.
    pub count: u32,
    /// CPU of one replica (millicores).
    pub cpu_millis: u64,
    /// Memory of one replica (bytes).
    pub memory_bytes: u64,
    /// GPUs of one replica.
    pub gpus: u32,
    /// The job's hard label constraints.
    pub constraints: Vec<Constraint>,
    /// The capacity its spot-share target steers new nodes to, and why (`class
    /// web runs 2 of 10 replicas on spot (20%), target 70%`); `None`: the
    /// cheapest pool.
    pub prefer: Option<(CapacityType, String)>,
    /// Room the job keeps free for more replicas (its `headroom` label), not
    /// replicas waiting.
    pub headroom: bool,
}

/// Free room on a ready, schedulable node, for [`fit_headroom`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    /// The node.
    pub node: String,
    /// Its labels (for the jobs' constraints).
    pub labels: BTreeMap<String, String>,
    /// Allocatable CPU not reserved (millicores).
    pub cpu_millis: u64,
    /// Allocatable memory not reserved (bytes).
    pub memory_bytes: u64,
}

/// Room held for a job's headroom on one node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// Replicas' worth.
    pub replicas: u32,
    /// CPU (millicores).
    pub cpu_millis: u64,
    /// Memory (bytes).
    pub memory_bytes: u64,
}

/// Places the jobs' headroom (`asks`: replicas' worth of room each job keeps
/// free) as placeholders on the free room of `rooms`, each replica's worth on
/// the node with the most free CPU that fits it and the job's constraints.
/// Returns what each node holds and what fits nowhere (demands for the node
/// pools, [`Demand::headroom`] set). Placeholders are recomputed on every pass:
/// real replicas are placed as if they were not there (they preempt them at
/// once), and a node that holds one is not empty. GPUs are not held.
pub fn fit_headroom(rooms: &[Room], asks: &[Demand]) -> (BTreeMap<String, Held>, Vec<Demand>) {
    let mut free: Vec<Room> = rooms.to_vec();
    let mut held: BTreeMap<String, Held> = BTreeMap::new();
    let mut unfit = Vec::new();
    let mut asks: Vec<&Demand> = asks.iter().filter(|d| d.count > 0).collect();
    asks.sort_by(|a, b| a.job.cmp(&b.job));
    for d in asks {
        let mut left = d.count;
        while left > 0 {
            let best = free
                .iter_mut()
                .filter(|r| {
                    r.cpu_millis >= d.cpu_millis
                        && r.memory_bytes >= d.memory_bytes
                        && d.constraints
                            .iter()
                            .all(|c| c.operator.matches(&r.labels, &c.key, &c.values))
                })
                .max_by(|a, b| {
                    a.cpu_millis
                        .cmp(&b.cpu_millis)
                        .then_with(|| b.node.cmp(&a.node))
                });
            let Some(r) = best else { break };
            r.cpu_millis -= d.cpu_millis;
            r.memory_bytes -= d.memory_bytes;
            let h = held.entry(r.node.clone()).or_default();
            h.replicas += 1;
            h.cpu_millis += d.cpu_millis;
            h.memory_bytes += d.memory_bytes;
            left -= 1;
        }
        if left > 0 {
            unfit.push(Demand {
                count: left,
                headroom: true,
                ..d.clone()
            });
        }
    }
    (held, unfit)
}

/// What to do to a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolAction {
    /// Add `count` nodes.
    Create {
        /// The pool.
        pool: String,
        /// How many.
        count: u32,
        /// Why, in one line.
        reason: String,
    },
    /// Make a member unschedulable, to remove it once empty.
    Drain {
        /// The pool.
        pool: String,
        /// The member.
        node: String,
        /// Why, in one line.
        reason: String,
    },
    /// Stop a drained, empty member and keep it in the warm pool instead of
    /// removing it.
    Park {
        /// The pool.
        pool: String,
        /// The member.
        node: String,
        /// Why, in one line.
        reason: String,
    },
    /// Start a warm member: it joins the pool's size within seconds.
    Start {
        /// The pool.
        pool: String,
        /// The warm member.
        node: String,
        /// Why, in one line.
        reason: String,
    },
    /// Provision `count` nodes for the warm pool (they enroll, then stop).
    CreateWarm {
        /// The pool.
        pool: String,
        /// How many.
        count: u32,
        /// Why, in one line.
        reason: String,
    },
    /// Remove a member (drained and empty, or broken).
    Delete {
        /// The pool.
        pool: String,
        /// The member.
        node: String,
        /// Why, in one line.
        reason: String,
    },
}

impl PoolAction {
    /// The pool it acts on.
    pub fn pool(&self) -> &str {
        match self {
            PoolAction::Create { pool, .. }
            | PoolAction::Drain { pool, .. }
            | PoolAction::Park { pool, .. }
            | PoolAction::Start { pool, .. }
            | PoolAction::CreateWarm { pool, .. }
            | PoolAction::Delete { pool, .. } => pool,
        }
    }

    /// Why, in one line.
    pub fn reason(&self) -> &str {
        match self {
            PoolAction::Create { reason, .. }
            | PoolAction::Drain { reason, .. }
            | PoolAction::Park { reason, .. }
            | PoolAction::Start { reason, .. }
            | PoolAction::CreateWarm { reason, .. }
            | PoolAction::Delete { reason, .. } => reason,
        }
    }
}

impl fmt::Display for PoolAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

/// How many replicas of `d` one node made from `t` holds (0: none fits), ignoring
/// label constraints. A resource the replica does not ask for sets no limit.
pub fn replicas_per_node(t: &NodeTemplateSpec, d: &Demand) -> u32 {
    // Asking for none of a resource: that resource sets no limit.
    let fit = |offer: u64, ask: u64| offer.checked_div(ask).unwrap_or(u64::from(u32::MAX));
    let gpus = t.resources.gpus.as_ref().map_or(0, |g| g.count);
    let by_gpu = fit(u64::from(gpus), u64::from(d.gpus));
    let n = fit(t.resources.cpu.0, d.cpu_millis)
        .min(fit(t.resources.memory.0, d.memory_bytes))
        .min(by_gpu);
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Why a node of `pool` could not hold one replica of `d`, or `None` when it could.
pub fn misfit(pool: &PoolView, d: &Demand) -> Option<String> {
    let t = &pool.template;
    if t.resources.cpu.0 < d.cpu_millis {
        return Some(format!(
            "offers {}m CPU, a replica needs {}m",
            t.resources.cpu.0, d.cpu_millis
        ));
    }
    if t.resources.memory.0 < d.memory_bytes {
        return Some(format!(
            "offers {} bytes of memory, a replica needs {}",
            t.resources.memory.0, d.memory_bytes
        ));
    }
    let gpus = t.resources.gpus.as_ref().map_or(0, |g| g.count);
    if gpus < d.gpus {
        return Some(format!("offers {gpus} GPUs, a replica needs {}", d.gpus));
    }
    let labels = pool.node_labels();
    for c in &d.constraints {
        if !c.operator.matches(&labels, &c.key, &c.values) {
            return Some(format!(
                "its nodes' labels fail the constraint {} {} {:?}",
                c.key, c.operator, c.values
            ));
        }
    }
    None
}

/// The actions for `pools` at `now_ms` (Unix ms), given the unplaced `demands`.
pub fn plan(pools: &[PoolView], demands: &[Demand], now_ms: u64) -> Vec<PoolAction> {
    let mut actions = Vec::new();
    let mut order: Vec<&PoolView> = pools.iter().filter(|p| p.elastic).collect();
    order.sort_by(|a, b| {
        a.template
            .price_per_hour
            .total_cmp(&b.template.price_per_hour)
            .then_with(|| a.name.cmp(&b.name))
    });

    // Per pool: the size after this plan, and provisioning members not yet
    // promised to a demand.
    let mut size: BTreeMap<&str, u32> = BTreeMap::new();
    let mut spare: BTreeMap<&str, u32> = BTreeMap::new();
    let mut wanted: BTreeMap<&str, bool> = BTreeMap::new();

    // 4. Broken members, first: they free room under maxSize.
    for p in &order {
        let settings = &p.settings;
        let timeout = millis(settings.provision_timeout);
        let mut live = p.size();
        for m in &p.members {
            if let Phase::Provisioning { since_ms } | Phase::Warming { since_ms } = m.phase
                && now_ms.saturating_sub(since_ms) >= timeout
            {
                actions.push(PoolAction::Delete {
                    pool: p.name.clone(),
                    node: m.name.clone(),
                    reason: format!(
                        "pool {}: removing {} (not ready for {}, the limit is {})",
                        p.name,
                        m.name,
                        human(Duration::from_millis(now_ms.saturating_sub(since_ms))),
                        human(settings.provision_timeout)
                    ),
                });
                if matches!(m.phase, Phase::Provisioning { .. }) {
                    live = live.saturating_sub(1);
                }
            }
        }
        let provisioning = count(p.members.iter().filter(|m| {
            matches!(m.phase, Phase::Provisioning { since_ms } if now_ms.saturating_sub(since_ms) < timeout)
        }));
        size.insert(&p.name, live);
        spare.insert(&p.name, provisioning);
    }

    // 1. Bounds: up to minSize.
    for p in &order {
        let cur = size[p.name.as_str()];
        if cur < p.min_size && p.can_grow {
            let add = p.min_size - cur;
            actions.push(PoolAction::Create {
                pool: p.name.clone(),
                count: add,
                reason: format!(
                    "pool {} {cur} → {}: minSize is {}",
                    p.name, p.min_size, p.min_size
                ),
            });
            size.insert(&p.name, p.min_size);
            // New nodes are capacity on its way, like provisioning ones.
            *spare.entry(&p.name).or_default() += add;
        }
    }

    // 2. Scale-up for unplaced demands.
    let mut demands: Vec<&Demand> = demands.iter().filter(|d| d.count > 0).collect();
    demands.sort_by(|a, b| a.job.cmp(&b.job));
    for d in demands {
        let mut fitting: Vec<&PoolView> = order
            .iter()
            .copied()
            .filter(|p| p.can_grow && misfit(p, d).is_none())
            .collect();
        // A spot-share target puts the pools of the capacity it lacks first
        // (cheapest first among them); the others stay as a fallback.
        if let Some((want, _)) = &d.prefer {
            fitting.sort_by_key(|p| p.template.capacity_type != *want);
        }
        for p in &fitting {
            wanted.insert(&p.name, true);
        }
        let mut left = d.count;
        for p in fitting {
            if left == 0 {
                break;
            }
            let per_node = replicas_per_node(&p.template, d).max(1);
            let mut nodes = left.div_ceil(per_node);
            let pending = spare.entry(&p.name).or_default();
            let absorbed = nodes.min(*pending);
            *pending -= absorbed;
            nodes -= absorbed;
            left = left.saturating_sub(absorbed.saturating_mul(per_node));
            let cur = size[p.name.as_str()];
            let add = nodes.min(p.max_size.saturating_sub(cur));
            if add == 0 {
                continue;
            }
            let steer = match &d.prefer {
                Some((want, why)) if p.template.capacity_type == *want => {
                    format!("; {want} first: {why}")
                }
                Some((want, why)) => format!("; no {want} pool could grow ({why})"),
                None => String::new(),
            };
            let plural = if d.count == 1 { "" } else { "s" };
            let why = if d.headroom {
                format!(
                    "job {} keeps room for {} more replica{plural} (label headroom) and no \
                     node has it",
                    d.job, d.count
                )
            } else {
                format!(
                    "job {} has {} replica{plural} that fit no node",
                    d.job, d.count
                )
            };
            actions.push(PoolAction::Create {
                pool: p.name.clone(),
                count: add,
                reason: format!(
                    "pool {} {cur} → {}: {why}; a {} node \
                     ({}m CPU, {} bytes, {} per hour) holds {}{steer}",
                    p.name,
                    cur + add,
                    p.template.instance_type,
                    p.template.resources.cpu.0,
                    p.template.resources.memory.0,
                    num(p.template.price_per_hour),
                    if per_node == u32::MAX {
                        "any number".to_string()
                    } else {
                        per_node.to_string()
                    }
                ),
            });
            size.insert(&p.name, cur + add);
            left = left.saturating_sub(add.saturating_mul(per_node));
        }
    }

    // 2b. Headroom: empty nodes kept ready (provisioning ones no demand took count).
    for p in order.iter().filter(|p| p.can_grow) {
        let Some(headroom) = p.headroom else { continue };
        let cur = size[p.name.as_str()];
        let want = headroom.nodes(cur).min(p.max_size);
        let empty = count(
            p.members
                .iter()
                .filter(|m| m.phase == Phase::Ready && m.allocations == 0),
        );
        let have = empty + spare.get(p.name.as_str()).copied().unwrap_or(0);
        let add = want
            .saturating_sub(have)
            .min(p.max_size.saturating_sub(cur));
        if add > 0 {
            actions.push(PoolAction::Create {
                pool: p.name.clone(),
                count: add,
                reason: format!(
                    "pool {} {cur} → {}: headroom is {headroom} ({want}); {have} empty or \
                     on the way",
                    p.name,
                    cur + add
                ),
            });
            size.insert(&p.name, cur + add);
            *spare.entry(&p.name).or_default() += add;
        }
    }

    // 1. Bounds (down to maxSize) and 3. scale-down, within the disruption budget.
    for p in &order {
        let settings = &p.settings;
        let budget = settings.disruption_budget.max(1);
        let draining = count(
            p.members
                .iter()
                .filter(|m| matches!(m.phase, Phase::Draining { .. })),
        );
        let mut room = budget.saturating_sub(draining);
        let mut cur = size[p.name.as_str()];
        let mut ready: Vec<&Member> = p
            .members
            .iter()
            .filter(|m| m.phase == Phase::Ready)
            .collect();
        // Emptiest first, then by name.
        ready.sort_by(|a, b| {
            a.allocations
                .cmp(&b.allocations)
                .then_with(|| a.name.cmp(&b.name))
        });
        // Empty members the headroom keeps from being drained.
        let keep_empty = p.headroom.map_or(0, |h| h.nodes(cur));
        let mut empty_left = count(ready.iter().copied().filter(|m| m.allocations == 0))
            .saturating_add(spare.get(p.name.as_str()).copied().unwrap_or(0));
        for m in ready {
            if room == 0 {
                break;
            }
            if cur <= p.max_size && m.allocations == 0 && empty_left <= keep_empty {
                continue;
            }
            let reason = if cur > p.max_size {
                format!(
                    "pool {} {cur} → {}: maxSize is {}; draining {}",
                    p.name,
                    cur - 1,
                    p.max_size,
                    m.name
                )
            } else if cur > p.min_size
                && !wanted.contains_key(p.name.as_str())
                && m.underused(settings.underused_percent)
                && m.underused_since_ms.is_some_and(|since| {
                    now_ms.saturating_sub(since) >= millis(settings.scale_down_after)
                })
            {
                let what = if m.allocations == 0 {
                    "empty".to_string()
                } else {
                    format!("at most {}% reserved", settings.underused_percent)
                };
                format!(
                    "pool {} {cur} → {}: {} has been {what} for {} or more; draining it",
                    p.name,
                    cur - 1,
                    m.name,
                    human(settings.scale_down_after)
                )
            } else {
                continue;
            };
            actions.push(PoolAction::Drain {
                pool: p.name.clone(),
                node: m.name.clone(),
                reason,
            });
            if m.allocations == 0 {
                empty_left = empty_left.saturating_sub(1);
            }
            cur -= 1;
            room -= 1;
        }
        // Room in the warm pool: drained members are kept there, stopped.
        let mut warm_room = p.warm.saturating_sub(warm_held(p, now_ms));
        for m in &p.members {
            if let Phase::Draining { since_ms } = m.phase
                && m.allocations == 0
            {
                let after = human(Duration::from_millis(now_ms.saturating_sub(since_ms)));
                if warm_room > 0 && !m.reclaimed {
                    warm_room -= 1;
                    actions.push(PoolAction::Park {
                        pool: p.name.clone(),
                        node: m.name.clone(),
                        reason: format!(
                            "pool {}: stopping {}: drained and empty after {after}; kept in \
                             the warm pool (warm.size {})",
                            p.name, m.name, p.warm
                        ),
                    });
                    continue;
                }
                actions.push(PoolAction::Delete {
                    pool: p.name.clone(),
                    node: m.name.clone(),
                    reason: format!(
                        "pool {}: removing {}: drained and empty after {after}",
                        p.name, m.name,
                    ),
                });
            }
        }
    }
    take_warm(&order, actions, &size, now_ms)
}

/// Turns each pool's new nodes into starts of its warm members first (seconds
/// instead of a provisioning), then refills the warm pool behind them, never past
/// `maxSize` counting the pool's size.
fn take_warm(
    order: &[&PoolView],
    actions: Vec<PoolAction>,
    size: &BTreeMap<&str, u32>,
    now_ms: u64,
) -> Vec<PoolAction> {
    let mut out = Vec::with_capacity(actions.len());
    let mut taken: BTreeMap<&str, u32> = BTreeMap::new();
    // Members draining (from this pass or before, not taken back by their
    // provider) will fill the warm pool when they are empty: no new node for it.
    let mut coming: BTreeMap<String, u32> = BTreeMap::new();
    for p in order {
        let draining = count(p.members.iter().filter(|m| {
            matches!(m.phase, Phase::Draining { .. }) && !m.reclaimed && m.allocations > 0
        }));
        coming.insert(p.name.clone(), draining);
    }
    for action in &actions {
        if let PoolAction::Park { pool, .. } | PoolAction::Drain { pool, .. } = action {
            *coming.entry(pool.clone()).or_default() += 1;
        }
    }
    for action in actions {
        let PoolAction::Create {
            pool,
            count,
            reason,
        } = &action
        else {
            out.push(action);
            continue;
        };
        let Some(p) = order.iter().find(|p| &p.name == pool) else {
            out.push(action);
            continue;
        };
        let used = taken.entry(p.name.as_str()).or_default();
        let mut warm = p
            .members
            .iter()
            .filter(|m| m.phase == Phase::Warm)
            .skip(*used as usize);
        let mut left = *count;
        while left > 0 {
            let Some(m) = warm.next() else { break };
            out.push(PoolAction::Start {
                pool: pool.clone(),
                node: m.name.clone(),
                reason: format!("{reason}; starting warm node {}", m.name),
            });
            *used += 1;
            left -= 1;
        }
        if left > 0 {
            out.push(PoolAction::Create {
                pool: pool.clone(),
                count: left,
                reason: if left == *count {
                    reason.clone()
                } else {
                    format!("{reason}; {left} more than the warm pool held")
                },
            });
        }
    }
    for p in order {
        let used = taken.get(p.name.as_str()).copied().unwrap_or(0);
        // Warm members beyond warm.size (it was lowered) are removed, the
        // youngest first.
        let idle: Vec<&Member> = p
            .members
            .iter()
            .filter(|m| m.phase == Phase::Warm)
            .skip(used as usize)
            .collect();
        let excess = idle.len().saturating_sub(p.warm as usize);
        for m in idle.iter().rev().take(excess) {
            out.push(PoolAction::Delete {
                pool: p.name.clone(),
                node: m.name.clone(),
                reason: format!(
                    "pool {}: removing warm node {}: the warm pool holds {}, warm.size is {}",
                    p.name,
                    m.name,
                    idle.len(),
                    p.warm
                ),
            });
        }
        if p.warm == 0 || !p.can_grow {
            continue;
        }
        let have =
            (warm_held(p, now_ms) + coming.get(&p.name).copied().unwrap_or(0)).saturating_sub(used);
        let sized = size.get(p.name.as_str()).copied().unwrap_or(0);
        let want = p.warm.min(p.max_size.saturating_sub(sized));
        if have < want {
            out.push(PoolAction::CreateWarm {
                pool: p.name.clone(),
                count: want - have,
                reason: format!(
                    "pool {}: warm pool {have} → {want} (warm.size {})",
                    p.name, p.warm
                ),
            });
        }
    }
    out
}

/// The members of `p` in its warm pool or on their way into it (warming, not
/// past the provisioning timeout).
fn warm_held(p: &PoolView, now_ms: u64) -> u32 {
    let timeout = millis(p.settings.provision_timeout);
    count(p.members.iter().filter(|m| match m.phase {
        Phase::Warm => true,
        Phase::Warming { since_ms } => now_ms.saturating_sub(since_ms) < timeout,
        _ => false,
    }))
}

fn count<'a>(it: impl Iterator<Item = &'a Member>) -> u32 {
    u32::try_from(it.count()).unwrap_or(u32::MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A duration as people write it: `90s` → `1m30s`, `250ms`.
fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

/// A number without a trailing `.0`.
fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::autoscale::pool::{NodeResources, parse_node_templates};
    use crate::manifest::{ByteSize, Millicores, Operator};

    const MIB: u64 = 1 << 20;

    fn template(cpu: u64, mem_mib: u64, price: f64) -> NodeTemplateSpec {
        NodeTemplateSpec {
            instance_type: "d2".into(),
            provider: "docker".into(),
            capacity_type: CapacityType::Spot,
            price_per_hour: price,
            labels: BTreeMap::from([("tier".to_string(), "batch".to_string())]),
            resources: NodeResources {
                cpu: Millicores(cpu),
                memory: ByteSize(mem_mib * MIB),
                gpus: None,
            },
        }
    }

    fn plan_with(
        pools: &[PoolView],
        demands: &[Demand],
        s: &Settings,
        now: u64,
    ) -> Vec<PoolAction> {
        let pools: Vec<PoolView> = pools
            .iter()
            .cloned()
            .map(|mut p| {
                p.settings = *s;
                p
            })
            .collect();
        plan(&pools, demands, now)
    }

    fn pool(name: &str, min: u32, max: u32, members: Vec<Member>) -> PoolView {
        PoolView {
            name: name.into(),
            min_size: min,
            max_size: max,
            template: template(2000, 4096, 0.05),
            elastic: true,
            settings: Settings::default(),
            members,
            warm: 0,
            headroom: None,
            can_grow: true,
        }
    }

    fn member(name: &str, phase: Phase, allocations: u32, underused_since: Option<u64>) -> Member {
        Member {
            name: name.into(),
            phase,
            allocations,
            reserved_cpu_millis: u64::from(allocations) * 100,
            reserved_memory_bytes: u64::from(allocations) * 64 * MIB,
            capacity_cpu_millis: 2000,
            capacity_memory_bytes: 4096 * MIB,
            underused_since_ms: underused_since,
            reclaimed: false,
        }
    }

    fn demand(job: &str, count: u32, cpu: u64) -> Demand {
        Demand {
            job: job.into(),
            count,
            cpu_millis: cpu,
            memory_bytes: 64 * MIB,
            gpus: 0,
            constraints: Vec::new(),
            prefer: None,
            headroom: false,
        }
    }

    #[test]
    fn headroom_keeps_empty_nodes_ready_and_undrained() {
        let busy = |n: &str| member(n, Phase::Ready, 5, None);
        let idle = |n: &str| member(n, Phase::Ready, 0, Some(0));
        let mut p = pool("p", 1, 10, vec![busy("p-1"), busy("p-2")]);
        p.headroom = Some(Headroom::Nodes(2));
        let a = plan_with(&[p.clone()], &[], &Settings::default(), 100_000);
        assert_eq!(
            a,
            vec![PoolAction::Create {
                pool: "p".into(),
                count: 2,
                reason: "pool p 2 → 4: headroom is 2 empty nodes (2); 0 empty or on the way".into(),
            }]
        );
        // Two empty members: kept, though they have been idle long past
        // scaleDownAfter; a third is drained.
        p.members = vec![busy("p-1"), idle("p-2"), idle("p-3"), idle("p-4")];
        let a = plan_with(&[p.clone()], &[], &Settings::default(), 100_000);
        assert_eq!(a.len(), 1, "{a:?}");
        assert!(
            matches!(&a[0], PoolAction::Drain { node, .. } if node == "p-2"),
            "{a:?}"
        );
        // A share of the pool: 25% of 4 is one node.
        p.headroom = Some(Headroom::Percent(25.0));
        assert_eq!(Headroom::Percent(25.0).nodes(4), 1);
        assert_eq!(Headroom::Percent(25.0).nodes(5), 2, "rounded up");
        let a = plan_with(&[p], &[], &Settings::default(), 100_000);
        assert!(
            a.iter()
                .filter(|a| matches!(a, PoolAction::Drain { .. }))
                .count()
                == 1,
            "the budget drains one at a time: {a:?}"
        );
    }

    #[test]
    fn a_spot_share_target_grows_the_capacity_the_job_lacks_first() {
        let spot = pool("spot", 0, 4, vec![]);
        let mut on_demand = pool("od", 0, 4, vec![]);
        on_demand.template.capacity_type = CapacityType::OnDemand;
        on_demand.template.price_per_hour = 0.2;
        let pools = [spot, on_demand];
        let cheapest = plan_with(&pools, &[demand("web", 1, 100)], &Settings::default(), 1);
        assert_eq!(cheapest[0].pool(), "spot", "{cheapest:?}");
        let mut d = demand("web", 1, 100);
        let why = "class web runs 9 of 10 replicas on spot (90%), target 50%, off target";
        d.prefer = Some((CapacityType::OnDemand, why.into()));
        let steered = plan_with(&pools, &[d.clone()], &Settings::default(), 1);
        assert_eq!(steered[0].pool(), "od", "{steered:?}");
        assert!(
            steered[0]
                .reason()
                .ends_with(&format!("; on-demand first: {why}")),
            "{}",
            steered[0]
        );
        // A full on-demand pool leaves the spot pool as the fallback, and says so.
        let mut full = pools.clone();
        full[1].max_size = 0;
        let fallback = plan_with(&full, &[d], &Settings::default(), 1);
        assert_eq!(fallback[0].pool(), "spot", "{fallback:?}");
        assert!(
            fallback[0]
                .reason()
                .contains("no on-demand pool could grow"),
            "{}",
            fallback[0]
        );
    }

    #[test]
    fn a_scale_out_starts_warm_members_first_and_the_warm_pool_refills() {
        // Template 2000m: 20 replicas of 100m a node; 50 replicas need 3 nodes.
        let mut p = pool(
            "p",
            1,
            10,
            vec![
                member("p-1", Phase::Ready, 20, None),
                member("w-1", Phase::Warm, 0, None),
                member("w-2", Phase::Warm, 0, None),
                member("w-3", Phase::Warming { since_ms: 900 }, 0, None),
            ],
        );
        p.warm = 3;
        assert_eq!(p.size(), 1, "warm members are not part of the size");
        let a = plan_with(
            &[p.clone()],
            &[demand("web", 50, 100)],
            &Settings::default(),
            1_000,
        );
        let kinds: Vec<String> = a
            .iter()
            .map(|a| match a {
                PoolAction::Start { node, .. } => format!("start {node}"),
                PoolAction::Create { count, .. } => format!("create {count}"),
                PoolAction::CreateWarm { count, .. } => format!("warm {count}"),
                other => format!("{other:?}"),
            })
            .collect();
        // Two warm starts, one new node, and two warm nodes to make up for the
        // ones taken (w-3 is still warming).
        assert_eq!(kinds, ["start w-1", "start w-2", "create 1", "warm 2"]);
        assert!(
            a[0].reason().ends_with("starting warm node w-1"),
            "{}",
            a[0]
        );
        assert!(
            a[2].reason().contains("1 more than the warm pool held"),
            "{}",
            a[2]
        );
        assert_eq!(
            a[3].reason(),
            "pool p: warm pool 1 → 3 (warm.size 3)",
            "{}",
            a[3]
        );

        // Nothing to do: the warm pool holds, and no warm member times out.
        let idle = plan_with(&[p.clone()], &[], &Settings::default(), 10_000_000);
        assert!(
            idle.iter().all(|a| !matches!(a, PoolAction::Start { .. })),
            "{idle:?}"
        );
        // A warming member past the provisioning timeout is removed and replaced.
        assert!(
            idle.iter()
                .any(|a| matches!(a, PoolAction::Delete { node, .. } if node == "w-3"))
        );
        assert!(
            idle.iter()
                .any(|a| matches!(a, PoolAction::CreateWarm { count: 1, .. })),
            "{idle:?}"
        );

        // A full pool keeps no warm nodes beyond maxSize.
        p.max_size = 3;
        let full = plan_with(&[p], &[demand("web", 50, 100)], &Settings::default(), 1_000);
        assert!(
            full.iter()
                .all(|a| !matches!(a, PoolAction::CreateWarm { .. })),
            "{full:?}"
        );
    }

    #[test]
    fn a_drained_member_is_kept_warm_while_the_warm_pool_has_room() {
        let drained = |n: &str| member(n, Phase::Draining { since_ms: 500 }, 0, None);
        let mut p = pool(
            "p",
            1,
            10,
            vec![
                member("p-1", Phase::Ready, 5, None),
                drained("p-2"),
                drained("p-3"),
                drained("p-4"),
                member("w-1", Phase::Warm, 0, None),
            ],
        );
        p.warm = 3;
        let mut reclaimed = drained("p-5");
        reclaimed.reclaimed = true;
        p.members.push(reclaimed);
        let a = plan_with(&[p.clone()], &[], &Settings::default(), 1_000);
        let kinds: Vec<String> = a
            .iter()
            .map(|a| match a {
                PoolAction::Park { node, .. } => format!("park {node}"),
                PoolAction::Delete { node, .. } => format!("delete {node}"),
                PoolAction::CreateWarm { count, .. } => format!("warm {count}"),
                other => format!("{other:?}"),
            })
            .collect();
        // Two places left in the warm pool: p-2 and p-3 stop there; p-4 goes, and
        // so does p-5, which its provider takes back; nothing new is made warm.
        assert_eq!(kinds, ["park p-2", "park p-3", "delete p-4", "delete p-5"]);
        assert_eq!(
            a[0].reason(),
            "pool p: stopping p-2: drained and empty after 500ms; kept in the warm pool \
             (warm.size 3)"
        );

        // A member still draining will fill the warm pool: no new node is made
        // for it meanwhile, unless its provider takes it back.
        let mut moving = member("p-2", Phase::Draining { since_ms: 500 }, 1, None);
        let mut q = pool("q", 1, 10, vec![member("q-1", Phase::Ready, 5, None)]);
        q.warm = 1;
        q.members.push(moving.clone());
        let a = plan_with(&[q.clone()], &[], &Settings::default(), 1_000);
        assert!(a.is_empty(), "{a:?}");
        moving.reclaimed = true;
        q.members[1] = moving;
        let a = plan_with(&[q], &[], &Settings::default(), 1_000);
        assert!(
            matches!(a.as_slice(), [PoolAction::CreateWarm { count: 1, .. }]),
            "{a:?}"
        );

        // Without a warm pool, drained members are removed, and warm members the
        // pool no longer wants go too.
        p.warm = 0;
        let a = plan_with(&[p], &[], &Settings::default(), 1_000);
        let removed: Vec<&str> = a
            .iter()
            .filter_map(|a| match a {
                PoolAction::Delete { node, .. } => Some(node.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(removed, ["p-2", "p-3", "p-4", "p-5", "w-1"], "{a:?}");
        assert!(
            a.iter().all(|a| !matches!(a, PoolAction::Park { .. })),
            "{a:?}"
        );
        assert!(
            a[4].reason().contains("warm pool holds 1, warm.size is 0"),
            "{}",
            a[4]
        );
    }

    #[test]
    fn a_pool_that_cannot_grow_passes_its_demand_to_the_next_fitting_pool() {
        let mut spot = pool("spot", 3, 10, vec![member("s-1", Phase::Ready, 20, None)]);
        spot.can_grow = false;
        spot.warm = 1;
        let mut od = pool("od", 0, 10, vec![]);
        od.template.capacity_type = CapacityType::OnDemand;
        od.template.price_per_hour = 0.5;
        let mut d = demand("web", 5, 100);
        d.prefer = Some((CapacityType::Spot, "a spot notice".into()));
        let a = plan_with(
            &[spot.clone(), od.clone()],
            &[d.clone()],
            &Settings::default(),
            1_000,
        );
        // Neither minSize nor the warm pool grows the failing pool; the replicas
        // go to the on-demand pool, saying why.
        assert_eq!(a.len(), 1, "{a:?}");
        let PoolAction::Create {
            pool,
            count,
            reason,
        } = &a[0]
        else {
            panic!("{a:?}");
        };
        assert_eq!((pool.as_str(), *count), ("od", 1));
        assert!(
            reason.ends_with("; no spot pool could grow (a spot notice)"),
            "{reason}"
        );
        // Once it may grow again, the cheaper spot pool takes the demand.
        spot.can_grow = true;
        let a = plan_with(&[spot, od], &[d], &Settings::default(), 1_000);
        assert!(a.iter().all(|a| a.pool() == "spot"), "{a:?}");
    }

    #[test]
    fn headroom_holds_room_on_the_freest_fitting_nodes_and_asks_pools_for_the_rest() {
        let room = |node: &str, cpu: u64, tier: &str| Room {
            node: node.into(),
            labels: BTreeMap::from([("tier".to_string(), tier.to_string())]),
            cpu_millis: cpu,
            memory_bytes: 4096 * MIB,
        };
        let rooms = [
            room("a", 1500, "web"),
            room("b", 1800, "web"),
            room("c", 4000, "batch"),
        ];
        let mut web = demand("web", 3, 1000);
        web.constraints = vec![Constraint {
            key: "tier".into(),
            operator: Operator::In,
            values: vec!["web".into()],
        }];
        let (held, unfit) = fit_headroom(&rooms, &[web.clone(), demand("none", 0, 100)]);
        // b (1800m free) takes the first, a (1500m) the second; the third fits
        // neither (800m and 500m left), and c is not a web node.
        assert_eq!(
            held,
            BTreeMap::from([
                (
                    "a".to_string(),
                    Held {
                        replicas: 1,
                        cpu_millis: 1000,
                        memory_bytes: 64 * MIB
                    }
                ),
                (
                    "b".to_string(),
                    Held {
                        replicas: 1,
                        cpu_millis: 1000,
                        memory_bytes: 64 * MIB
                    }
                ),
            ])
        );
        assert_eq!(unfit.len(), 1);
        assert_eq!((unfit[0].count, unfit[0].headroom), (1, true));

        // The pools grow for it, saying it is headroom.
        let mut p = pool("p", 0, 10, vec![]);
        p.template.labels = BTreeMap::from([("tier".to_string(), "web".to_string())]);
        let a = plan_with(&[p], &unfit, &Settings::default(), 1_000);
        assert!(
            matches!(a.as_slice(), [PoolAction::Create { count: 1, reason, .. }]
                if reason.contains("job web keeps room for 1 more replica (label headroom) and no node has it")),
            "{a:?}"
        );
    }

    #[test]
    fn an_unplaced_replica_adds_one_node_with_the_reason() {
        let a = plan_with(
            &[pool("p", 0, 2, vec![])],
            &[demand("web", 1, 100)],
            &Settings::default(),
            1_000,
        );
        assert_eq!(
            a,
            vec![PoolAction::Create {
                pool: "p".into(),
                count: 1,
                reason: "pool p 0 → 1: job web has 1 replica that fit no node; a d2 node \
                         (2000m CPU, 4294967296 bytes, 0.05 per hour) holds 20"
                    .into(),
            }]
        );
    }

    #[test]
    fn scale_up_stops_at_max_size_and_counts_nodes_already_coming() {
        // 5 replicas of 1 CPU: 3 nodes of 2 CPU; one is provisioning, max 3 → +2.
        let p = pool(
            "p",
            0,
            3,
            vec![member(
                "p-1",
                Phase::Provisioning { since_ms: 500 },
                0,
                None,
            )],
        );
        let a = plan_with(
            std::slice::from_ref(&p),
            &[demand("web", 5, 1000)],
            &Settings::default(),
            1_000,
        );
        assert!(
            matches!(&a[..], [PoolAction::Create { count: 2, .. }]),
            "{a:?}"
        );
        // At max: nothing.
        let full = pool("p", 0, 1, vec![member("p-1", Phase::Ready, 1, None)]);
        assert!(
            plan_with(
                &[full],
                &[demand("web", 5, 1000)],
                &Settings::default(),
                1_000
            )
            .is_empty()
        );
        // A node on its way absorbs the demand it was made for: no second node.
        let coming = pool(
            "p",
            0,
            2,
            vec![member(
                "p-1",
                Phase::Provisioning { since_ms: 900 },
                0,
                None,
            )],
        );
        assert!(
            plan_with(
                &[coming],
                &[demand("web", 1, 100)],
                &Settings::default(),
                1_000
            )
            .is_empty()
        );
    }

    #[test]
    fn a_pool_whose_nodes_cannot_hold_the_replica_does_not_grow() {
        let big = demand("huge", 1, 8000);
        assert_eq!(
            misfit(&pool("p", 0, 2, vec![]), &big).as_deref(),
            Some("offers 2000m CPU, a replica needs 8000m")
        );
        assert!(plan_with(&[pool("p", 0, 2, vec![])], &[big], &Settings::default(), 0).is_empty());
        let mut picky = demand("gpu", 1, 100);
        picky.constraints.push(Constraint {
            key: "tier".into(),
            operator: Operator::Equal,
            values: vec!["web".into()],
        });
        assert!(
            plan_with(
                &[pool("p", 0, 2, vec![])],
                &[picky.clone()],
                &Settings::default(),
                0
            )
            .is_empty()
        );
        picky.constraints[0].values = vec!["batch".into()];
        picky.constraints.push(Constraint {
            key: "pool".into(),
            operator: Operator::In,
            values: vec!["p".into()],
        });
        assert_eq!(
            plan_with(
                &[pool("p", 0, 2, vec![])],
                &[picky],
                &Settings::default(),
                0
            )
            .len(),
            1
        );
    }

    #[test]
    fn the_cheapest_fitting_pool_grows_first() {
        let mut dear = pool("a-dear", 0, 2, vec![]);
        dear.template.price_per_hour = 1.0;
        let cheap = pool("b-cheap", 0, 2, vec![]);
        let a = plan_with(
            &[dear, cheap],
            &[demand("web", 1, 100)],
            &Settings::default(),
            0,
        );
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].pool(), "b-cheap");
    }

    #[test]
    fn min_size_is_kept_and_a_static_pool_is_left_alone() {
        let a = plan_with(&[pool("p", 2, 3, vec![])], &[], &Settings::default(), 0);
        assert_eq!(
            a,
            vec![PoolAction::Create {
                pool: "p".into(),
                count: 2,
                reason: "pool p 0 → 2: minSize is 2".into(),
            }]
        );
        let mut fixed = pool("s", 2, 3, vec![]);
        fixed.elastic = false;
        assert!(plan_with(&[fixed], &[demand("web", 1, 100)], &Settings::default(), 0).is_empty());
    }

    #[test]
    fn an_idle_node_is_drained_after_the_delay_then_removed_when_empty() {
        let s = Settings {
            scale_down_after: Duration::from_secs(30),
            ..Settings::default()
        };
        let p = pool("p", 0, 2, vec![member("p-1", Phase::Ready, 0, Some(0))]);
        assert!(plan_with(std::slice::from_ref(&p), &[], &s, 29_000).is_empty());
        assert_eq!(
            plan_with(&[p], &[], &s, 30_000),
            vec![PoolAction::Drain {
                pool: "p".into(),
                node: "p-1".into(),
                reason: "pool p 1 → 0: p-1 has been empty for 30s or more; draining it".into(),
            }]
        );
        let draining = pool(
            "p",
            0,
            2,
            vec![member(
                "p-1",
                Phase::Draining { since_ms: 30_000 },
                0,
                Some(0),
            )],
        );
        assert_eq!(
            plan_with(&[draining], &[], &s, 32_000),
            vec![PoolAction::Delete {
                pool: "p".into(),
                node: "p-1".into(),
                reason: "pool p: removing p-1: drained and empty after 2s".into(),
            }]
        );
        // Still holding an allocation: wait.
        let busy = pool(
            "p",
            0,
            2,
            vec![member("p-1", Phase::Draining { since_ms: 30_000 }, 1, None)],
        );
        assert!(plan_with(&[busy], &[], &s, 32_000).is_empty());
    }

    #[test]
    fn scale_down_respects_min_size_the_budget_and_waiting_demand() {
        let s = Settings {
            scale_down_after: Duration::from_secs(1),
            ..Settings::default()
        };
        let idle = |n: &str| member(n, Phase::Ready, 0, Some(0));
        let three = pool("p", 1, 5, vec![idle("p-1"), idle("p-2"), idle("p-3")]);
        // Budget 1: one at a time.
        let a = plan_with(std::slice::from_ref(&three), &[], &s, 10_000);
        assert_eq!(a.len(), 1, "{a:?}");
        // Budget 5, min 1: two of three.
        let wide = Settings {
            disruption_budget: 5,
            ..s
        };
        assert_eq!(
            plan_with(std::slice::from_ref(&three), &[], &wide, 10_000).len(),
            2
        );
        // One draining already uses the budget of 1.
        let mut busy = three.clone();
        busy.members[0].phase = Phase::Draining { since_ms: 0 };
        busy.members[0].allocations = 1;
        assert!(plan_with(&[busy], &[], &s, 10_000).is_empty());
        // Demand this pool could serve keeps its members (the scheduler will use them).
        assert!(
            plan_with(&[three], &[demand("web", 1, 100)], &s, 10_000)
                .iter()
                .all(|a| !matches!(a, PoolAction::Drain { .. }))
        );
    }

    #[test]
    fn an_underused_node_drains_only_under_the_threshold() {
        let s = Settings {
            scale_down_after: Duration::from_secs(1),
            underused_percent: 10,
            ..Settings::default()
        };
        // 1 allocation = 100m of 2000m (5%) and 64Mi of 4Gi: under 10%.
        let p = pool("p", 0, 2, vec![member("p-1", Phase::Ready, 1, Some(0))]);
        let a = plan_with(&[p], &[], &s, 5_000);
        assert!(a[0].reason().contains("at most 10% reserved"), "{a:?}");
        // 4 allocations = 20%: kept.
        let p = pool("p", 0, 2, vec![member("p-1", Phase::Ready, 4, Some(0))]);
        assert!(plan_with(&[p], &[], &s, 5_000).is_empty());
    }

    #[test]
    fn a_node_that_never_became_ready_is_removed() {
        let p = pool(
            "p",
            1,
            2,
            vec![member("p-1", Phase::Provisioning { since_ms: 0 }, 0, None)],
        );
        let a = plan_with(&[p], &[], &Settings::default(), 180_000);
        assert_eq!(a.len(), 2, "{a:?}");
        assert_eq!(
            a[0].reason(),
            "pool p: removing p-1 (not ready for 3m, the limit is 3m)"
        );
        assert!(matches!(&a[1], PoolAction::Create { count: 1, .. }));
    }

    #[test]
    fn over_max_size_drains_the_emptiest_first() {
        let p = pool(
            "p",
            0,
            1,
            vec![
                member("p-1", Phase::Ready, 3, None),
                member("p-2", Phase::Ready, 1, None),
            ],
        );
        let a = plan_with(&[p], &[], &Settings::default(), 0);
        assert_eq!(
            a,
            vec![PoolAction::Drain {
                pool: "p".into(),
                node: "p-2".into(),
                reason: "pool p 2 → 1: maxSize is 1; draining p-2".into(),
            }]
        );
    }

    #[test]
    fn node_labels_come_from_the_template_and_the_pool() {
        let t = parse_node_templates(
            "t.yaml",
            "apiVersion: novacron.io/v1\nkind: NodeTemplate\nmetadata: {name: d2}\nspec:\n  \
             instanceType: d2\n  provider: docker\n  capacityType: on-demand\n  pricePerHour: 0.1\n  \
             labels: {tier: web}\n  resources: {cpu: 2, memory: 4Gi}\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let labels = node_labels("p", &t[0].spec);
        assert_eq!(
            labels.into_iter().collect::<Vec<_>>(),
            [
                ("capacity", "on-demand"),
                ("instance_type", "d2"),
                ("pool", "p"),
                ("tier", "web")
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }
}

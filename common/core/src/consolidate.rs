//! Consolidation: repack allocations onto fewer nodes with best-fit-decreasing and
//! name the nodes it frees. Pure: nodes, their free capacity and their allocations
//! come in; a plan comes out. A node is retired only when every one of its
//! allocations has a place elsewhere, so a plan never drops a running allocation.

use serde::{Deserialize, Serialize};

/// A node as consolidation sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PackNode {
    /// Name.
    pub name: String,
    /// Allocatable CPU, millicores.
    pub cpu_millis: u64,
    /// Allocatable memory, bytes.
    pub memory_bytes: u64,
    /// Hourly price (the most expensive emptiable nodes are retired first).
    pub hourly: f64,
    /// Whether consolidation may retire it (for example: in a managed pool, not
    /// already draining).
    pub retirable: bool,
    /// Whether new work may go there (ready, not cordoned).
    pub schedulable: bool,
    /// What runs there.
    pub allocations: Vec<PackAlloc>,
}

/// An allocation as consolidation sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PackAlloc {
    /// Id.
    pub id: String,
    /// Requested CPU, millicores.
    pub cpu_millis: u64,
    /// Requested memory, bytes.
    pub memory_bytes: u64,
}

/// One allocation to move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Move {
    /// The allocation.
    pub alloc: String,
    /// From this node (to be retired).
    pub from: String,
    /// To this node.
    pub to: String,
}

/// What consolidation would do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Plan {
    /// Nodes that can be retired once their allocations moved.
    pub retire: Vec<String>,
    /// The moves that empty them.
    pub moves: Vec<Move>,
    /// What the retired nodes cost per hour.
    pub hourly_saving: f64,
    /// The currency of `hourly_saving` (the pricing catalog's; empty until the
    /// controller sets it).
    #[serde(default)]
    pub currency: String,
}

/// Plans a repack with best-fit-decreasing: candidate nodes are tried from the
/// least utilized (then the most expensive); each candidate's allocations, largest
/// first, go to the schedulable node that fits them most tightly. A candidate is
/// retired only if all of its allocations fit; otherwise nothing of it moves. At most
/// `max_retire` nodes (the disruption budget).
pub fn plan(nodes: &[PackNode], max_retire: usize) -> Plan {
    let mut free: Vec<(u64, u64)> = nodes
        .iter()
        .map(|n| {
            let (c, m) = used(n);
            (
                n.cpu_millis.saturating_sub(c),
                n.memory_bytes.saturating_sub(m),
            )
        })
        .collect();
    let mut retired = vec![false; nodes.len()];
    // A node that takes moved allocations stays: retiring it would strand them.
    let mut receives = vec![false; nodes.len()];
    let mut candidates: Vec<usize> = (0..nodes.len()).filter(|&i| nodes[i].retirable).collect();
    candidates.sort_by(|&a, &b| {
        utilization(&nodes[a])
            .total_cmp(&utilization(&nodes[b]))
            .then(nodes[b].hourly.total_cmp(&nodes[a].hourly))
            .then(nodes[a].name.cmp(&nodes[b].name))
    });
    let mut out = Plan::default();
    for c in candidates {
        if out.retire.len() >= max_retire {
            break;
        }
        if receives[c] {
            continue;
        }
        let mut allocs: Vec<&PackAlloc> = nodes[c].allocations.iter().collect();
        allocs.sort_by(|a, b| {
            (b.cpu_millis, b.memory_bytes, &a.id).cmp(&(a.cpu_millis, a.memory_bytes, &b.id))
        });
        let mut trial = free.clone();
        let mut moves = Vec::new();
        let mut fits = true;
        for a in allocs {
            let best = (0..nodes.len())
                .filter(|&t| t != c && !retired[t] && nodes[t].schedulable)
                .filter(|&t| trial[t].0 >= a.cpu_millis && trial[t].1 >= a.memory_bytes)
                .min_by_key(|&t| {
                    (
                        trial[t].0 - a.cpu_millis,
                        trial[t].1 - a.memory_bytes,
                        nodes[t].name.clone(),
                    )
                });
            match best {
                Some(t) => {
                    trial[t].0 -= a.cpu_millis;
                    trial[t].1 -= a.memory_bytes;
                    moves.push(Move {
                        alloc: a.id.clone(),
                        from: nodes[c].name.clone(),
                        to: nodes[t].name.clone(),
                    });
                }
                None => {
                    fits = false;
                    break;
                }
            }
        }
        if fits {
            free = trial;
            retired[c] = true;
            for m in &moves {
                if let Some(t) = nodes.iter().position(|n| n.name == m.to) {
                    receives[t] = true;
                }
            }
            out.retire.push(nodes[c].name.clone());
            out.hourly_saving += nodes[c].hourly;
            out.moves.extend(moves);
        }
    }
    out
}

fn used(n: &PackNode) -> (u64, u64) {
    n.allocations.iter().fold((0, 0), |(c, m), a| {
        (
            c.saturating_add(a.cpu_millis),
            m.saturating_add(a.memory_bytes),
        )
    })
}

fn utilization(n: &PackNode) -> f64 {
    let (c, m) = used(n);
    let share = |part: u64, whole: u64| {
        if whole == 0 {
            1.0
        } else {
            part as f64 / whole as f64
        }
    };
    share(c, n.cpu_millis).max(share(m, n.memory_bytes))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn node(name: &str, cpu: u64, allocs: &[(&str, u64)]) -> PackNode {
        PackNode {
            name: name.into(),
            cpu_millis: cpu,
            memory_bytes: 1 << 40,
            hourly: 1.0,
            retirable: true,
            schedulable: true,
            allocations: allocs
                .iter()
                .map(|(id, c)| PackAlloc {
                    id: id.to_string(),
                    cpu_millis: *c,
                    memory_bytes: 1,
                })
                .collect(),
        }
    }

    #[test]
    fn empties_the_least_used_node_into_the_tightest_fit() {
        let nodes = [
            node("a", 1000, &[("a1", 700)]),
            node("b", 1000, &[("b1", 200)]),
            node("c", 1000, &[("c1", 500)]),
        ];
        let p = plan(&nodes, 10);
        // b (20%) goes first, into a (300 free: tightest); then c's 500 fits nowhere.
        assert_eq!(p.retire, ["b"]);
        assert_eq!(
            p.moves,
            [Move {
                alloc: "b1".into(),
                from: "b".into(),
                to: "a".into()
            }]
        );
        assert_eq!(p.hourly_saving, 1.0);
    }

    #[test]
    fn keeps_a_node_whose_allocations_do_not_all_fit() {
        let nodes = [
            node("a", 1000, &[("a1", 900)]),
            node("b", 1000, &[("b1", 200)]),
        ];
        assert_eq!(plan(&nodes, 10), Plan::default());
    }

    #[test]
    fn respects_the_disruption_budget_and_unschedulable_targets() {
        let mut nodes = vec![
            node("a", 1000, &[]),
            node("b", 1000, &[("b1", 100)]),
            node("c", 1000, &[("c1", 100)]),
        ];
        assert_eq!(plan(&nodes, 1).retire.len(), 1);
        for n in &mut nodes {
            n.schedulable = false;
        }
        // Nowhere to move to: only the empty node can go.
        assert_eq!(plan(&nodes, 10).retire, ["a"]);
    }

    proptest! {
        /// A plan never drops an allocation and never overfills a node: every
        /// allocation of a retired node moves exactly once, to a kept node, within
        /// that node's free capacity.
        #[test]
        fn never_drops_or_overfills(
            spec in proptest::collection::vec(
                (1u64..4000, proptest::collection::vec(1u64..1500, 0..5), any::<bool>()),
                1..8,
            ),
            budget in 0usize..8,
        ) {
            let nodes: Vec<PackNode> = spec
                .iter()
                .enumerate()
                .map(|(i, (cap, allocs, retirable))| {
                    let mut n = node(&format!("n{i}"), *cap, &[]);
                    n.retirable = *retirable;
                    let mut used = 0;
                    for (j, a) in allocs.iter().enumerate() {
                        if used + a <= *cap {
                            used += a;
                            n.allocations.push(PackAlloc {
                                id: format!("n{i}-{j}"),
                                cpu_millis: *a,
                                memory_bytes: 1,
                            });
                        }
                    }
                    n
                })
                .collect();
            let p = plan(&nodes, budget);
            prop_assert!(p.retire.len() <= budget);
            let retired: std::collections::BTreeSet<&str> =
                p.retire.iter().map(String::as_str).collect();
            let mut load: BTreeMap<&str, u64> = nodes
                .iter()
                .map(|n| (n.name.as_str(), n.allocations.iter().map(|a| a.cpu_millis).sum()))
                .collect();
            for n in nodes.iter().filter(|n| retired.contains(n.name.as_str())) {
                prop_assert!(n.retirable);
                for a in &n.allocations {
                    let moved: Vec<&Move> = p.moves.iter().filter(|m| m.alloc == a.id).collect();
                    prop_assert_eq!(moved.len(), 1, "{} moves once", a.id);
                    prop_assert!(!retired.contains(moved[0].to.as_str()));
                    *load.get_mut(moved[0].to.as_str()).expect("known") += a.cpu_millis;
                }
            }
            for n in nodes.iter().filter(|n| !retired.contains(n.name.as_str())) {
                prop_assert!(load[n.name.as_str()] <= n.cpu_millis, "{} overfilled", n.name);
            }
            prop_assert!(p.moves.iter().all(|m| retired.contains(m.from.as_str())));
        }
    }
}

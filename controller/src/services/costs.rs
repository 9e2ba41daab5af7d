//! `GET /v1/costs` (hourly cost per node, job and pool) and
//! `GET /v1/recommendations` (right-sizing and idle jobs from p95 usage). The
//! arithmetic is pure in `novacron_common::cost`; this module gathers the live
//! inputs: nodes and their metrics windows from the registry, allocations from
//! the workloads, prices from the catalog.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use novacron_api::NodeView;
use novacron_common::consolidate;
use novacron_common::cost::{self, RightsizeConfig};
use novacron_common::wire::{AllocState, NodeSample};

use crate::services::context::ApiState;
use crate::state::store::AllocRecord;
pub use novacron_api::{CostReport, GroupCost, JobRecommendation, NodeCost};

/// Nodes consolidation may touch at once (the disruption budget of the plan).
pub const CONSOLIDATION_BUDGET: usize = 3;

/// The consolidation plan of the live fleet (pure): nodes of a managed pool (the
/// `pool` label) that are ready may be retired; ready nodes receive moves.
pub fn consolidation_plan(
    pricing: &cost::PriceCatalog,
    nodes: &[NodeView],
    allocs: &[AllocRecord],
) -> consolidate::Plan {
    let pack: Vec<consolidate::PackNode> = nodes
        .iter()
        .map(|n| {
            let ready = n.status == novacron_common::fleet::NodeStatus::Ready;
            consolidate::PackNode {
                name: n.name.clone(),
                cpu_millis: n.capacity.cpu_millis,
                memory_bytes: n.capacity.memory_bytes,
                hourly: pricing.node_hourly(&n.labels, &n.capacity).hourly,
                retirable: ready && n.labels.contains_key("pool"),
                schedulable: ready,
                allocations: allocs
                    .iter()
                    .filter(|a| a.node == n.name && holds_resources(a))
                    .map(|a| consolidate::PackAlloc {
                        id: a.id.clone(),
                        cpu_millis: a.cpu_millis,
                        memory_bytes: a.memory_bytes,
                    })
                    .collect(),
            }
        })
        .collect();
    consolidate::Plan {
        currency: pricing.currency.clone(),
        ..consolidate::plan(&pack, CONSOLIDATION_BUDGET)
    }
}

/// The cost report of the live fleet.
pub fn live_report(st: &ApiState) -> CostReport {
    let nodes = st.registry.views(Instant::now());
    let allocs = st.workloads.allocations(None, None);
    let classes = job_classes(&st.workloads);
    cost_report(&st.pricing, &nodes, &allocs, &classes)
}

/// Each job's workload class: the `class` label of its current manifest.
pub fn job_classes(workloads: &crate::services::workloads::Workloads) -> BTreeMap<String, String> {
    workloads
        .jobs()
        .into_iter()
        .filter_map(|j| {
            let class = job_label(workloads, &j.name, cost::CLASS_LABEL)?;
            Some((j.name, class))
        })
        .collect()
}

/// The label `key` of job `job`'s current manifest, if any.
pub fn job_label(
    workloads: &crate::services::workloads::Workloads,
    job: &str,
    key: &str,
) -> Option<String> {
    workloads.labels(job)?.remove(key)
}

pub fn holds_resources(a: &AllocRecord) -> bool {
    a.desired_run && matches!(a.state, AllocState::Running | AllocState::Starting)
}

/// The cost report of `nodes` with `allocs` (pure); `classes` is each job's
/// workload class.
pub fn cost_report(
    pricing: &cost::PriceCatalog,
    nodes: &[NodeView],
    allocs: &[AllocRecord],
    classes: &BTreeMap<String, String>,
) -> CostReport {
    let mut report = CostReport {
        currency: pricing.currency.clone(),
        total_hourly: 0.0,
        nodes: Vec::new(),
        jobs: Vec::new(),
        pools: Vec::new(),
        capacity: Vec::new(),
        budgets: Vec::new(),
        mix: Vec::new(),
    };
    let mut replicas: Vec<(String, bool)> = Vec::new();
    let mut jobs: BTreeMap<String, (f64, u32)> = BTreeMap::new();
    let mut pools: BTreeMap<String, (f64, u32)> = BTreeMap::new();
    let mut kinds: BTreeMap<String, (f64, u32)> = BTreeMap::new();
    for n in nodes {
        let price = if n.warm {
            // Stopped in its pool's warm pool: it pays its disk, as the pool
            // view prices it.
            cost::NodePrice {
                hourly: novacron_common::autoscale::pool::stopped_price_per_hour(),
                source: format!(
                    "warm (stopped): its {} GiB disk",
                    novacron_common::autoscale::pool::STOPPED_DISK_GIB
                ),
            }
        } else {
            pricing.node_hourly(&n.labels, &n.capacity)
        };
        let mut allocated = 0.0;
        for a in allocs
            .iter()
            .filter(|a| a.node == n.name && holds_resources(a))
        {
            let share = cost::allocation_share(a.cpu_millis, a.memory_bytes, &n.capacity);
            allocated += share;
            let e = jobs.entry(a.job.clone()).or_default();
            e.0 += share * price.hourly;
            e.1 += 1;
            if let Some(class) = classes.get(&a.job) {
                let spot = n
                    .labels
                    .get(cost::CAPACITY_LABEL)
                    .is_some_and(|c| c == "spot");
                replicas.push((class.clone(), spot));
            }
        }
        let label = |k: &str| n.labels.get(k).cloned().unwrap_or_else(|| "-".into());
        let pool = label("pool");
        let capacity = label(cost::CAPACITY_LABEL);
        for (map, key) in [(&mut pools, &pool), (&mut kinds, &capacity)] {
            let e = map.entry(key.clone()).or_default();
            e.0 += price.hourly;
            e.1 += 1;
        }
        report.total_hourly += price.hourly;
        report.nodes.push(NodeCost {
            node: n.name.clone(),
            pool,
            capacity,
            hourly: price.hourly,
            source: price.source,
            allocated: allocated.min(1.0),
        });
    }
    let groups = |m: BTreeMap<String, (f64, u32)>| {
        m.into_iter()
            .map(|(name, (hourly, count))| GroupCost {
                name,
                hourly,
                count,
            })
            .collect()
    };
    let hourly = |m: &BTreeMap<String, (f64, u32)>| -> BTreeMap<String, f64> {
        m.iter().map(|(k, (h, _))| (k.clone(), *h)).collect()
    };
    report.budgets = cost::budget_status(
        &pricing.budgets,
        report.total_hourly,
        &hourly(&pools),
        &hourly(&jobs),
        &pricing.currency,
    );
    report.mix = cost::mix_status(&pricing.mix, &replicas);
    report.jobs = groups(jobs);
    report.pools = groups(pools);
    report.capacity = groups(kinds);
    report
}

/// Right-sizing per job from the nodes' metrics windows (pure).
pub fn recommend(
    pricing: &cost::PriceCatalog,
    nodes: &[NodeView],
    allocs: &[AllocRecord],
    windows: &BTreeMap<String, Vec<NodeSample>>,
    config: &RightsizeConfig,
) -> Vec<JobRecommendation> {
    let running: Vec<&AllocRecord> = allocs.iter().filter(|a| holds_resources(a)).collect();
    let job_names: BTreeSet<&str> = running.iter().map(|a| a.job.as_str()).collect();
    // Every running allocation's usage, in one pass over the samples (cpu_percent
    // is percent of one core: 100% = 1000 millicores).
    let mut usage: BTreeMap<&str, (Vec<f64>, Vec<u64>)> = running
        .iter()
        .map(|a| (a.id.as_str(), Default::default()))
        .collect();
    for samples in windows.values() {
        for s in samples {
            for u in &s.allocations {
                if let Some((cpu, mem)) = usage.get_mut(u.id.as_str()) {
                    cpu.push(f64::from(u.cpu_percent) * 10.0);
                    mem.push(u.memory_bytes);
                }
            }
        }
    }
    let mut out = Vec::new();
    for job in job_names {
        let mine: Vec<&&AllocRecord> = running.iter().filter(|a| a.job == job).collect();
        // The newest replica's requests stand for the job's current version.
        let Some(newest) = mine.iter().max_by_key(|a| (a.version, a.created_unix_ms)) else {
            continue;
        };
        let mut cpu = Vec::new();
        let mut mem = Vec::new();
        for a in &mine {
            if let Some((c, m)) = usage.get(a.id.as_str()) {
                cpu.extend_from_slice(c);
                mem.extend_from_slice(m);
            }
        }
        let Some(r) = cost::rightsize(newest.cpu_millis, newest.memory_bytes, &cpu, &mem, config)
        else {
            continue;
        };
        let mut now_cost = 0.0;
        let mut rec_cost = 0.0;
        for a in &mine {
            if let Some(n) = nodes.iter().find(|n| n.name == a.node) {
                let price = pricing.node_hourly(&n.labels, &n.capacity).hourly;
                now_cost +=
                    price * cost::allocation_share(a.cpu_millis, a.memory_bytes, &n.capacity);
                rec_cost += price
                    * cost::allocation_share(
                        r.recommended_cpu_millis,
                        r.recommended_memory_bytes,
                        &n.capacity,
                    );
            }
        }
        out.push(JobRecommendation {
            job: job.to_owned(),
            replicas: mine.len() as u32,
            rightsize: r,
            hourly_now: now_cost,
            hourly_recommended: rec_cost,
            currency: pricing.currency.clone(),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use novacron_common::fleet::NodeStatus;
    use novacron_common::wire::{AllocationUsage, Capacity};

    use super::*;

    fn node(name: &str, labels: &[(&str, &str)]) -> NodeView {
        NodeView {
            name: name.into(),
            status: NodeStatus::Ready,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            capacity: Capacity {
                cpu_millis: 4000,
                memory_bytes: 16 << 30,
                ..Capacity::default()
            },
            capabilities: Default::default(),
            agent_version: String::new(),
            address: None,
            enrolled_at_unix_ms: 0,
            last_seen_unix_ms: None,
            cert_expires_unix_ms: None,
            samples_dropped: 0,
            cordoned: false,
            warm: false,
            latest: None,
            images: 0,
            image_bytes: 0,
        }
    }

    fn alloc(id: &str, job: &str, node: &str, cpu: u64) -> AllocRecord {
        AllocRecord {
            restore: None,
            id: id.into(),
            job: job.into(),
            version: 1,
            node: node.into(),
            desired_run: true,
            state: AllocState::Running,
            healthy: None,
            healthy_since_unix_ms: None,
            created_unix_ms: 0,
            updated_unix_ms: 0,
            restarts: 0,
            exit_code: None,
            message: String::new(),
            failure: None,
            cpu_millis: cpu,
            memory_bytes: 1 << 30,
            gpu_uuids: Vec::new(),
            priority: 0,
            disk_bytes: 0,
            ports: vec![],
            published: vec![],
            suspended: false,
            address: None,
        }
    }

    #[test]
    fn costs_attribute_node_prices_to_jobs_pools_and_capacity() {
        let pricing = cost::PriceCatalog::default();
        let nodes = [
            node("a", &[("pool", "web"), ("price_per_hour", "1.0")]),
            node(
                "b",
                &[
                    ("pool", "web"),
                    ("price_per_hour", "1.0"),
                    ("capacity", "spot"),
                ],
            ),
        ];
        let allocs = [
            alloc("w-1", "web", "a", 1000),
            alloc("w-2", "web", "b", 2000),
        ];
        let r = cost_report(&pricing, &nodes, &allocs, &BTreeMap::new());
        assert!((r.total_hourly - 2.0).abs() < 1e-9);
        assert_eq!(r.jobs.len(), 1);
        assert!((r.jobs[0].hourly - 0.75).abs() < 1e-9, "{:?}", r.jobs);
        assert_eq!(r.pools[0].name, "web");
        assert_eq!(r.pools[0].count, 2);
        let spot = r.capacity.iter().find(|c| c.name == "spot").expect("spot");
        assert_eq!(spot.count, 1);
        assert!((r.nodes[1].allocated - 0.5).abs() < 1e-9);
    }

    #[test]
    fn a_warm_node_pays_its_disk_whatever_it_cost_running() {
        let pricing = cost::PriceCatalog::default();
        let mut warm = node("w", &[("pool", "web"), ("price_per_hour", "1.0")]);
        warm.warm = true;
        // Never connected: no labels and no capacity, still its disk.
        let mut fresh = node("f", &[]);
        fresh.capacity = Capacity::default();
        fresh.warm = true;
        let nodes = [
            node("a", &[("pool", "web"), ("price_per_hour", "1.0")]),
            warm,
            fresh,
        ];
        let r = cost_report(&pricing, &nodes, &[], &BTreeMap::new());
        let disk = novacron_common::autoscale::pool::stopped_price_per_hour();
        assert!(disk > 0.0);
        assert!((r.total_hourly - (1.0 + 2.0 * disk)).abs() < 1e-12, "{r:?}");
        assert!((r.nodes[1].hourly - disk).abs() < 1e-12);
        assert_eq!(r.nodes[1].source, "warm (stopped): its 8 GiB disk");
        let web = r.pools.iter().find(|p| p.name == "web").expect("web");
        assert!((web.hourly - (1.0 + disk)).abs() < 1e-12, "{web:?}");
    }

    #[test]
    fn cost_report_checks_budgets_and_the_spot_mix_of_classes() {
        let pricing = cost::PriceCatalog::parse(
            "pricing.toml",
            "[budgets]\nfleet_per_hour = 10.0\npools = { web = 1.5 }\njobs = { api = 1.0 }\n[mix]\nweb = { spot = 1.0 }\n",
        )
        .expect("catalog");
        let nodes = [
            node("a", &[("pool", "web"), ("price_per_hour", "1.0")]),
            node(
                "b",
                &[
                    ("pool", "web"),
                    ("price_per_hour", "1.0"),
                    ("capacity", "spot"),
                ],
            ),
        ];
        let allocs = [
            alloc("a-1", "api", "a", 1000),
            alloc("a-2", "api", "b", 2000),
        ];
        let classes = BTreeMap::from([("api".to_string(), "web".to_string())]);
        let r = cost_report(&pricing, &nodes, &allocs, &classes);
        let over: Vec<&str> = r
            .budgets
            .iter()
            .filter(|b| b.exceeded)
            .map(|b| b.message.as_str())
            .collect();
        assert_eq!(
            over,
            ["pool web costs 2.00 USD/h, over its budget of 1.50 USD/h by 0.50 USD/h"],
            "{:?}",
            r.budgets
        );
        assert_eq!(r.budgets.len(), 3);
        assert_eq!(r.mix.len(), 1);
        assert_eq!((r.mix[0].replicas, r.mix[0].spot_replicas), (2, 1));
        assert!(r.mix[0].off_target, "{}", r.mix[0].message);
    }

    #[test]
    fn the_class_comes_from_the_manifest_labels() {
        use std::sync::Arc;
        use std::time::{Duration, SystemTime};

        use crate::services::events::EventLog;
        use crate::services::workloads::Workloads;
        use crate::state::registry::{Registry, RegistryConfig};
        use crate::state::store::{MemoryStore, Store};

        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let config = RegistryConfig::new(60, Duration::from_secs(3));
        let registry =
            Arc::new(Registry::load(store.clone(), config, Instant::now()).expect("registry"));
        let events = Arc::new(EventLog::open(store.clone(), 100).expect("events"));
        let workloads = Workloads::load(store, registry, events).expect("workloads");
        let job = |name: &str, labels: &str| {
            format!(
                "apiVersion: novacron.io/v1\nkind: Job\nmetadata:\n  name: {name}\n{labels}spec:\n  type: service\n  task: {{image: busybox}}\n  resources: {{cpu: 100m, memory: 32Mi}}\n"
            )
        };
        for (name, labels) in [("api", "  labels:\n    class: web\n"), ("x", "")] {
            workloads
                .apply("j.yaml", &job(name, labels), "me", SystemTime::now())
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(
            job_label(&workloads, "api", cost::CLASS_LABEL).as_deref(),
            Some("web")
        );
        assert_eq!(job_label(&workloads, "x", cost::CLASS_LABEL), None);
        assert_eq!(job_label(&workloads, "missing", cost::CLASS_LABEL), None);
        assert_eq!(
            job_classes(&workloads),
            BTreeMap::from([("api".to_string(), "web".to_string())])
        );
    }

    #[test]
    fn consolidation_retires_only_pool_nodes_and_moves_everything_they_run() {
        let pricing = cost::PriceCatalog::default();
        let nodes = [
            node("kept", &[("price_per_hour", "1.0")]),
            node("p1", &[("pool", "web"), ("price_per_hour", "2.0")]),
        ];
        let allocs = [
            alloc("k-1", "web", "kept", 1000),
            alloc("p-1", "web", "p1", 500),
        ];
        let plan = consolidation_plan(&pricing, &nodes, &allocs);
        assert_eq!(plan.retire, ["p1"]);
        assert_eq!(plan.moves.len(), 1);
        assert_eq!(plan.moves[0].to, "kept");
        assert_eq!(plan.hourly_saving, 2.0);
    }

    #[test]
    fn recommendations_come_from_the_jobs_own_samples() {
        let pricing = cost::PriceCatalog::default();
        let nodes = [node("a", &[("price_per_hour", "1.0")])];
        let allocs = [
            alloc("w-1", "web", "a", 2000),
            alloc("o-1", "other", "a", 1000),
        ];
        let samples: Vec<NodeSample> = (0..40)
            .map(|i| NodeSample {
                seq: i,
                allocations: vec![
                    AllocationUsage {
                        id: "w-1".into(),
                        cpu_percent: 5.0,
                        memory_bytes: 100 << 20,
                        memory_limit_bytes: 0,
                        rx_bytes_per_sec: 0,
                        tx_bytes_per_sec: 0,
                    },
                    AllocationUsage {
                        id: "o-1".into(),
                        cpu_percent: 90.0,
                        memory_bytes: 900 << 20,
                        memory_limit_bytes: 0,
                        rx_bytes_per_sec: 0,
                        tx_bytes_per_sec: 0,
                    },
                ],
                ..NodeSample::default()
            })
            .collect();
        let windows = BTreeMap::from([("a".to_string(), samples)]);
        let recs = recommend(
            &pricing,
            &nodes,
            &allocs,
            &windows,
            &RightsizeConfig::default(),
        );
        let web = recs.iter().find(|r| r.job == "web").expect("web");
        assert_eq!(web.rightsize.p95_cpu_millis, 50);
        assert_eq!(web.rightsize.recommended_cpu_millis, 60);
        assert!(web.rightsize.idle, "{}", web.rightsize.explanation);
        assert!(web.hourly_recommended < web.hourly_now);
        let other = recs.iter().find(|r| r.job == "other").expect("other");
        assert_eq!(other.rightsize.p95_cpu_millis, 900);
        assert!(!other.rightsize.idle);
    }
}

//! The scheduler's tests: filters, scorers, placement, preemption and the
//! explanation, through the public API and against a naive reference.

use proptest::prelude::{
    ProptestConfig, TestCaseError, any, prop, prop_assert, prop_assert_eq, prop_assert_ne, proptest,
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
        vfio_address: None,
    }
}

/// A GPU bound to vfio-pci at `address`, for virtual machines only.
fn vfio_gpu(address: &str, model: &str) -> GpuInfo {
    GpuInfo {
        index: 0,
        uuid: GpuInfo::vfio_uuid(address),
        model: model.into(),
        memory_bytes: 0,
        vfio_address: Some(address.into()),
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
fn nodes_that_hold_the_image_are_preferred_but_spread_still_decides() {
    // "a" packs best (it is fuller), but only "b" holds the image.
    let snap = Snapshot::new(
        vec![node("a", 4000, 8, &[]), node("b", 4000, 8, &[])],
        vec![placed("x", "other", "a", 2000, 0, 50)],
    )
    .expect("snapshot");
    let mut r = req("web", 1, 500, 0);
    assert_eq!(nodes_of(&schedule(&snap, &r)), ["a"], "binpack alone");
    r.image_nodes = ["b".to_string()].into();
    assert_eq!(nodes_of(&schedule(&snap, &r)), ["b"]);
    assert_eq!(
        nodes_of(&walking().schedule(&snap, &r)),
        ["b"],
        "the sampled walk too"
    );
    // Only "a" fits: the image is a preference, never a filter.
    let mut big = req("web", 1, 3500, 0);
    big.image_nodes = ["b".to_string()].into();
    let b_busy = Snapshot::new(
        vec![node("a", 4000, 8, &[]), node("b", 4000, 8, &[])],
        vec![placed("y", "other", "b", 3000, 0, 50)],
    )
    .expect("snapshot");
    assert_eq!(nodes_of(&schedule(&b_busy, &big)), ["a"]);
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
fn a_vm_gets_only_passthrough_gpus_and_a_container_only_the_driver_s() {
    let snap = Snapshot::new(
        vec![
            gpu_node("nvml", vec![gpu("GPU-a", "NVIDIA H100", 80)]),
            gpu_node(
                "vfio",
                vec![vfio_gpu(
                    "0000:65:00.0",
                    "NVIDIA Corporation GH100 [H100 PCIe]",
                )],
            ),
        ],
        vec![],
    )
    .expect("snapshot");
    let container = gpu_req("t", 1, Some("H100"), None);
    let out = schedule(&snap, &container);
    assert_eq!(nodes_of(&out), ["nvml"]);
    assert_eq!(out.assignments[0].gpu_uuids, ["GPU-a"]);
    let mut vm = gpu_req("vm", 1, Some("H100"), None);
    vm.gpu_passthrough = true;
    let out = schedule(&snap, &vm);
    assert_eq!(nodes_of(&out), ["vfio"]);
    assert_eq!(out.assignments[0].gpu_uuids, ["VFIO-0000:65:00.0"]);
    assert_eq!(
        GpuFilter.check(&view_of(&snap, "nvml"), &vm),
        Err(Reason::Gpu { needed: 1, free: 0 })
    );
    // Two passthrough GPUs where the fleet has one: said as such.
    vm.resources.gpus = Some(GpuRequest {
        count: 2,
        model: None,
        memory: None,
    });
    let out = schedule(&snap, &vm);
    assert_eq!(out.unplaced, 1);
    assert_eq!(
        out.explanation.to_string(),
        "0/2 nodes fit: 2 insufficient GPUs for passthrough (bound to vfio-pci) (needs 2 GPUs, best node has 1 free)"
    );
    // A VM's job asks for passthrough through its task.
    let spec: crate::manifest::Job = crate::manifest::parse_job(
        "vm.yaml",
        "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {name: vm}\nspec:\n  task:\n    \
         image: g:1\n    vm: {memory: 256Mi}\n  resources: {cpu: 1, memory: 512Mi, gpus: {count: 1}}\n",
    )
    .expect("job");
    assert!(Request::from_spec("vm", &spec.spec, 1).gpu_passthrough);
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
                                    vfio_address: None,
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

#[test]
fn a_vm_job_is_placed_only_on_nodes_with_the_vm_label() {
    let text = "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {name: vm}\nspec:\n  task:\n    image: novacron/guest-tiny:1\n    vm: {memory: 128Mi}\n  resources: {cpu: 1, memory: 256Mi}\n";
    let job = crate::manifest::parse_job("vm.yaml", text).expect("valid");
    let request = Request::from_spec("vm", &job.spec, 1);
    assert!(
        request
            .placement
            .constraints
            .iter()
            .any(|c| c.key == crate::manifest::VM_NODE_LABEL
                && c.operator == crate::manifest::Operator::Exists),
        "{:?}",
        request.placement
    );
    let container =
        crate::manifest::parse_job("c.yaml", &text.replace("    vm: {memory: 128Mi}\n", ""))
            .expect("valid");
    assert!(
        Request::from_spec("c", &container.spec, 1)
            .placement
            .constraints
            .is_empty()
    );
}

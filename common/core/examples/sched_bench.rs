//! Scheduler benchmark: placements per second on a synthetic fleet, and packing
//! quality of binpack against the lower bound.
//!
//! ```text
//! cargo run --release -p novacron-core --example sched_bench -- --nodes 10000 --placements 20000
//! ```
//!
//! Options: `--nodes N` (default 10000), `--placements P` (default 2 × nodes),
//! `--runs R` (default 5), `--seed S` (default 42), `--exhaustive` (also pack with
//! an exhaustive search, to compare with the walk; slow at 10 000 nodes).
//! Everything is generated from the seed with splitmix64, so a run is reproducible.
//!
//! 1. **Throughput.** A mixed fleet (3 zones; general, high-memory and GPU pools;
//!    spot and on-demand; 1% not ready; node names grouped by zone) and a mixed
//!    workload (plain services, memory-heavy, constrained, spread across zones,
//!    affinity, job anti-affinity, spread strategy, GPU jobs; priorities 10–100) of
//!    about `P` replicas. Each run clones the snapshot, then schedules and commits
//!    every request; placements/s counts placed replicas over the time of the loop.
//!    The median of the runs is reported.
//! 2. **Unplaceable requests.** The time to answer a request that fits nowhere
//!    (full scan, exact explanation, preemption search), median of 101.
//! 3. **Packing.** Uniform nodes (16 cores, 64 GiB) and a workload asking for half
//!    the fleet's CPU, arriving in random order, 1–4 replicas a request. Nodes used
//!    against the lower bound `max(ceil(Σ cpu / 16 cores), ceil(Σ memory / 64 GiB))`.
//!    `Mixed`: small web services, medium services, caches (memory-heavy) and
//!    CPU-bound batch. `Balanced`: CPU-heavy, memory-heavy and balanced thirds
//!    whose total matches the node shape (a stress case: the bound needs both
//!    resources filled to the brim). The spread strategy is shown for contrast.

use std::collections::BTreeMap;
use std::time::Instant;

use novacron_core::manifest::{
    ByteSize, Constraint, GpuRequest, Millicores, Operator, Spread, Strategy, WeightedConstraint,
};
use novacron_core::scheduler::{NodeInfo, Request, Scheduler, Snapshot, Tuning};
use novacron_wire::{Capacity, GpuInfo};

const GI: u64 = 1 << 30;
const MI: u64 = 1 << 20;

fn main() {
    let args = Args::parse();
    println!(
        "sched_bench: nodes={} placements={} runs={} seed={}",
        args.nodes, args.placements, args.runs, args.seed
    );
    throughput(&args);
    unplaceable(&args);
    let walk = Tuning::default();
    packing(&args, Strategy::Binpack, PackWorkload::Mixed, walk);
    if args.exhaustive {
        packing(
            &args,
            Strategy::Binpack,
            PackWorkload::Mixed,
            Tuning::exhaustive(),
        );
    }
    packing(&args, Strategy::Binpack, PackWorkload::Balanced, walk);
    packing(&args, Strategy::Spread, PackWorkload::Mixed, walk);
}

#[derive(Debug, Clone, Copy)]
enum PackWorkload {
    Mixed,
    Balanced,
}

struct Args {
    nodes: usize,
    placements: usize,
    runs: usize,
    seed: u64,
    exhaustive: bool,
}

impl Args {
    fn parse() -> Self {
        let mut a = Args {
            nodes: 10_000,
            placements: 0,
            runs: 5,
            seed: 42,
            exhaustive: false,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            if flag == "--exhaustive" {
                a.exhaustive = true;
                continue;
            }
            let value = it
                .next()
                .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
            let n: u64 = value
                .parse()
                .unwrap_or_else(|_| usage(&format!("{flag}: {value:?} is not a number")));
            match flag.as_str() {
                "--nodes" => a.nodes = n as usize,
                "--placements" => a.placements = n as usize,
                "--runs" => a.runs = (n as usize).max(1),
                "--seed" => a.seed = n,
                _ => usage(&format!("unknown option {flag}")),
            }
        }
        if a.placements == 0 {
            a.placements = a.nodes * 2;
        }
        a
    }
}

fn usage(msg: &str) -> ! {
    eprintln!("sched_bench: {msg}");
    eprintln!(
        "usage: sched_bench [--nodes N] [--placements P] [--runs R] [--seed S] [--exhaustive]"
    );
    std::process::exit(64)
}

/// splitmix64: small, fast, and the same everywhere.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }
}

const ZONES: [&str; 3] = ["a", "b", "c"];

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The mixed fleet. Names group by zone (`zone-a-00042`), as real fleets often do.
fn fleet(n: usize, rng: &mut Rng) -> Vec<NodeInfo> {
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let zone = ZONES[i % 3];
        let roll = rng.range(0, 99);
        let (pool, cores, mem_gi, gpus) = if roll < 80 {
            let (c, m) = *rng.pick(&[(4, 16), (8, 32), (16, 64), (32, 128)]);
            ("general", c, m, 0)
        } else if roll < 95 {
            let (c, m) = *rng.pick(&[(16, 128), (32, 256)]);
            ("highmem", c, m, 0)
        } else {
            ("gpu", 32, 256, *rng.pick(&[4, 8]))
        };
        let model = *rng.pick(&[
            ("NVIDIA A100-SXM4-80GB", 80),
            ("NVIDIA H100 80GB HBM3", 80),
            ("NVIDIA L4", 24),
        ]);
        let name = format!("zone-{zone}-{i:05}");
        let capacity = if rng.chance(0.3) { "spot" } else { "on-demand" };
        let disk = if rng.chance(0.5) { "ssd" } else { "hdd" };
        let instance = format!("{pool}-{cores}");
        nodes.push(NodeInfo {
            labels: labels(&[
                ("zone", zone),
                ("region", "eu-1"),
                ("pool", pool),
                ("capacity", capacity),
                ("disk", disk),
                ("instance_type", &instance),
            ]),
            capacity: Capacity {
                cpu_millis: cores * 1000,
                memory_bytes: mem_gi * GI,
                disk_bytes: 500 * GI,
                dynamic_ports: Default::default(),
                gpus: (0..gpus)
                    .map(|g| GpuInfo {
                        index: g,
                        uuid: format!("GPU-{i:05}-{g}"),
                        model: model.0.to_string(),
                        memory_bytes: model.1 * GI,
                        vfio_address: None,
                    })
                    .collect(),
            },
            ready: !rng.chance(0.01),
            name,
        });
    }
    nodes
}

fn constraint(key: &str, operator: Operator, values: &[&str]) -> Constraint {
    Constraint {
        key: key.into(),
        operator,
        values: values.iter().map(|v| v.to_string()).collect(),
    }
}

fn weighted(key: &str, operator: Operator, value: &str, weight: u32) -> WeightedConstraint {
    WeightedConstraint {
        key: key.into(),
        operator,
        values: vec![value.into()],
        weight,
    }
}

/// The mixed workload: requests until about `placements` replicas.
fn workload(placements: usize, rng: &mut Rng) -> Vec<Request> {
    let mut reqs = Vec::new();
    let mut total = 0usize;
    let mut j = 0;
    while total < placements {
        j += 1;
        let mut r = Request::new(format!("job-{j:06}"), rng.range(1, 8) as u32);
        r.priority = rng.range(10, 100) as u32;
        r.resources.cpu = Millicores(rng.range(1, 20) * 100);
        r.resources.memory = ByteSize(rng.range(1, 32) * 128 * MI);
        let kind = rng.range(0, 99);
        let p = &mut r.placement;
        match kind {
            0..45 => {}
            45..55 => {
                r.resources.cpu = Millicores(rng.range(1, 4) * 250);
                r.resources.memory = ByteSize(rng.range(4, 16) * GI);
            }
            55..65 => {
                if rng.chance(0.5) {
                    let zone = *rng.pick(&ZONES);
                    p.constraints = vec![constraint("zone", Operator::In, &[zone])];
                } else {
                    p.constraints = vec![
                        constraint("pool", Operator::Equal, &["highmem"]),
                        constraint("capacity", Operator::NotEqual, &["spot"]),
                    ];
                }
            }
            65..75 => {
                r.count = rng.range(3, 9) as u32;
                p.spread = vec![Spread {
                    key: "zone".into(),
                    weight: 50,
                }];
            }
            75..83 => {
                p.affinity = vec![weighted("disk", Operator::Equal, "ssd", 50)];
                p.anti_affinity = vec![weighted("capacity", Operator::Equal, "spot", 30)];
            }
            83..90 => {
                r.count = rng.range(2, 6) as u32;
                p.job_anti_affinity = true;
            }
            90..95 => p.strategy = Strategy::Spread,
            _ => {
                r.count = rng.range(1, 4) as u32;
                r.resources.cpu = Millicores(rng.range(4, 8) * 1000);
                r.resources.memory = ByteSize(rng.range(16, 64) * GI);
                let model = *rng.pick(&[Some("A100"), Some("H100"), Some("L4"), None]);
                r.resources.gpus = Some(GpuRequest {
                    count: rng.range(1, 2) as u32,
                    model: model.map(str::to_string),
                    memory: rng.chance(0.3).then_some(ByteSize(40 * GI)),
                });
            }
        }
        total += r.count as usize;
        reqs.push(r);
    }
    reqs
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Schedules and commits every request; returns (placed, unplaced, preempted).
fn run_all(sched: &Scheduler, snap: &mut Snapshot, reqs: &[Request]) -> (usize, usize, usize) {
    let (mut placed, mut unplaced, mut preempted) = (0, 0, 0);
    let mut next = 0u64;
    for r in reqs {
        let out = sched.schedule(snap, r);
        let ids: Vec<String> = out
            .assignments
            .iter()
            .map(|_| {
                next += 1;
                format!("alloc-{next}")
            })
            .collect();
        placed += out.assignments.len();
        unplaced += out.unplaced as usize;
        preempted += out.preemptions.len();
        snap.commit(r, &out, &ids)
            .expect("fresh ids and known preemptions always commit");
    }
    (placed, unplaced, preempted)
}

fn throughput(args: &Args) {
    let mut rng = Rng(args.seed);
    let nodes = fleet(args.nodes, &mut rng);
    let reqs = workload(args.placements, &mut rng);
    let replicas: usize = reqs.iter().map(|r| r.count as usize).sum();
    let t = Instant::now();
    let base = Snapshot::new(nodes, vec![]).expect("generated fleet is consistent");
    let build = t.elapsed();
    println!(
        "throughput: {} nodes, snapshot built in {:.1} ms; {} requests, {} replicas",
        base.len(),
        build.as_secs_f64() * 1e3,
        reqs.len(),
        replicas
    );
    let sched = Scheduler::default();
    let mut rates = Vec::new();
    for run in 1..=args.runs {
        let mut snap = base.clone();
        let t = Instant::now();
        let (placed, unplaced, preempted) = run_all(&sched, &mut snap, &reqs);
        let secs = t.elapsed().as_secs_f64();
        let rate = placed as f64 / secs;
        println!(
            "  run {run}: placed {placed}, unplaced {unplaced}, preempted {preempted}, \
             {:.1} ms, {rate:.0} placements/s ({:.1} us/placement)",
            secs * 1e3,
            secs * 1e6 / placed.max(1) as f64
        );
        rates.push(rate);
    }
    println!("  median: {:.0} placements/s", median(rates));
}

fn unplaceable(args: &Args) {
    let mut rng = Rng(args.seed);
    let nodes = fleet(args.nodes, &mut rng);
    let reqs = workload(args.placements, &mut rng);
    let mut snap = Snapshot::new(nodes, vec![]).expect("generated fleet is consistent");
    let sched = Scheduler::default();
    run_all(&sched, &mut snap, &reqs);
    let mut r = Request::new("too-big", 1);
    r.priority = 1000;
    r.resources.cpu = Millicores(48_000);
    r.resources.memory = ByteSize(64 * GI);
    let mut times = Vec::new();
    let mut text = String::new();
    for _ in 0..101 {
        let t = Instant::now();
        let out = sched.schedule(&snap, &r);
        times.push(t.elapsed().as_secs_f64() * 1e6);
        text = out.explanation.to_string();
    }
    println!(
        "unplaceable request (full scan, explanation, preemption search): median {:.0} us\n  {text}",
        median(times)
    );
}

fn packing(args: &Args, strategy: Strategy, workload: PackWorkload, tuning: Tuning) {
    const CORES: u64 = 16;
    const MEM_GI: u64 = 64;
    let mut rng = Rng(args.seed ^ 0x5EED);
    let nodes: Vec<NodeInfo> = (0..args.nodes)
        .map(|i| NodeInfo {
            name: format!("node-{i:05}"),
            labels: labels(&[("zone", ZONES[i % 3])]),
            capacity: Capacity {
                cpu_millis: CORES * 1000,
                memory_bytes: MEM_GI * GI,
                disk_bytes: 0,
                dynamic_ports: Default::default(),
                gpus: vec![],
            },
            ready: true,
        })
        .collect();
    // Replicas until half the fleet's CPU is asked for.
    let budget = args.nodes as u64 * CORES * 1000 / 2;
    let mut reqs = Vec::new();
    let (mut cpu, mut mem) = (0u64, 0u64);
    let mut j = 0;
    while cpu < budget {
        j += 1;
        let mut r = Request::new(format!("job-{j:06}"), rng.range(1, 4) as u32);
        let roll = rng.range(0, 99);
        let (c, m) = match workload {
            // Typical services: small web, medium services, caches, CPU-bound batch.
            PackWorkload::Mixed => match roll {
                0..35 => (rng.range(1, 5) * 100, rng.range(1, 4) * 128 * MI),
                35..70 => (rng.range(2, 8) * 250, rng.range(2, 8) * 512 * MI),
                70..85 => (rng.range(2, 4) * 250, rng.range(4, 16) * GI),
                _ => (rng.range(8, 16) * 250, rng.range(2, 8) * 512 * MI),
            },
            // CPU-heavy, memory-heavy and balanced thirds whose total matches the
            // node shape: both resources must be filled to the brim to reach the
            // bound, which no online packer does.
            PackWorkload::Balanced => match roll % 3 {
                0 => (rng.range(8, 16) * 250, rng.range(1, 8) * 512 * MI),
                1 => (rng.range(2, 4) * 250, rng.range(8, 16) * GI),
                _ => (rng.range(1, 8) * 250, rng.range(1, 16) * 512 * MI),
            },
        };
        r.resources.cpu = Millicores(c);
        r.resources.memory = ByteSize(m);
        r.placement.strategy = strategy;
        cpu += c * u64::from(r.count);
        mem += m * u64::from(r.count);
        reqs.push(r);
    }
    let lower = (cpu.div_ceil(CORES * 1000)).max(mem.div_ceil(MEM_GI * GI));
    let mut snap = Snapshot::new(nodes, vec![]).expect("uniform fleet is consistent");
    let sched = Scheduler::new(tuning);
    let search = if tuning == Tuning::exhaustive() {
        "exhaustive"
    } else {
        "walk"
    };
    let t = Instant::now();
    let (placed, unplaced, _) = run_all(&sched, &mut snap, &reqs);
    let secs = t.elapsed().as_secs_f64();
    let used = snap
        .nodes()
        .filter(|n| {
            snap.usage(&n.name)
                .is_some_and(|u| !u.allocations.is_empty())
        })
        .count();
    println!(
        "packing ({strategy:?}, {workload:?} workload, {search} search, {} uniform {CORES}-core/{MEM_GI}Gi nodes): {placed} replicas placed, {unplaced} unplaced, \
         demand {:.0} cores / {:.0} GiB; nodes used {used}, lower bound {lower}, ratio {:.4} ({:.0} placements/s)",
        args.nodes,
        cpu as f64 / 1000.0,
        mem as f64 / GI as f64,
        used as f64 / lower as f64,
        placed as f64 / secs
    );
}

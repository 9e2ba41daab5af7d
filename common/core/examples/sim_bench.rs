//! Simulator benchmark: the wall time of a 24 h trace over a fleet of about 1,000
//! nodes, and the cost and availability of the shipped scenarios against their
//! static peak baselines.
//!
//! ```text
//! cargo run --release -p novacron-core --example sim_bench
//! cargo run --release -p novacron-core --example sim_bench -- --scenario packaging/scenarios/sale-day.yaml --events
//! ```
//!
//! Options: `--nodes N` (default 1000), `--step S` (default 15s), `--seed S`
//! (default 42), `--scenario FILE` (only report that scenario, skipping the speed
//! run), `--events` (print the run's scale events and faults).
//!
//! 1. **Speed.** A generated scenario: one on-demand pool of `N` nodes
//!    (up to 1.2 × `N` nodes of 16 cores, 64 GiB, in three zones), eight services
//!    of 1–2 cores a replica whose daily curves (2.5× from 06:00–08:00 to 20:00)
//!    bring the autoscaled fleet to about `N` nodes at the peak, a random node
//!    failure rate of 0.002 per node-hour, 30% of the nodes failing at 11:00, and
//!    every service and the pool autoscaled.
//!    Both runs (autoscaled, then static at the peak) are timed separately.
//! 2. **Shipped scenarios.** Each file of `packaging/scenarios/`, autoscaled
//!    against static: cost, availability, node-hours, reaction time.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use novacron_core::sim::{Mode, Report, parse_scenario, simulate, simulate_run};

fn main() {
    let args = Args::parse();
    if let Some(file) = &args.scenario {
        run_file(file, args.events);
        return;
    }
    speed(&args);
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|x| x == "yaml"));
    files.sort();
    for f in files {
        run_file(&f, args.events);
    }
}

fn speed(args: &Args) {
    let text = fleet_scenario(args.nodes, &args.step, args.seed);
    let sc = match parse_scenario("generated.yaml", &text) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}\n{text}");
            std::process::exit(1);
        }
    };
    let steps = sc.spec.duration.as_millis() / sc.spec.step.as_millis().max(1);
    println!(
        "sim_bench: 24h trace, {} nodes, step {}, {steps} steps, seed {}",
        args.nodes, args.step, args.seed
    );
    let t = Instant::now();
    let auto = simulate_run(&sc, Mode::Autoscaled);
    let auto_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let stat = simulate_run(&sc, Mode::StaticPeak);
    let stat_s = t.elapsed().as_secs_f64();
    let peak =
        |r: &novacron_core::sim::RunReport| r.pools.iter().map(|p| p.peak_nodes).sum::<u32>();
    println!(
        "  autoscaled: {auto_s:.2} s wall, {} placements, peak {} nodes, {:.0} node-hours, \
         cost {:.2}, availability {:.3}%, {} scale events, {} violations",
        auto.placements,
        peak(&auto),
        auto.node_hours,
        auto.cost,
        auto.availability * 100.0,
        auto.scale_events,
        auto.violations.len()
    );
    println!(
        "  static:     {stat_s:.2} s wall, {} placements, peak {} nodes, {:.0} node-hours, \
         cost {:.2}, availability {:.3}%, {} violations",
        stat.placements,
        peak(&stat),
        stat.node_hours,
        stat.cost,
        stat.availability * 100.0,
        stat.violations.len()
    );
    println!(
        "  steps/s: {:.0} (autoscaled), {:.0} (static)",
        steps as f64 / auto_s,
        steps as f64 / stat_s
    );
}

fn run_file(path: &Path, events: bool) {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("scenario")
        .to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            std::process::exit(66);
        }
    };
    let sc = match parse_scenario(&name, &text) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(65);
        }
    };
    let t = Instant::now();
    let report: Report = simulate(&sc);
    println!(
        "\n{name} ({:.2} s for both runs)\n{report}",
        t.elapsed().as_secs_f64()
    );
    if events {
        for e in &report.autoscaled.events {
            println!("  {e}");
        }
        for v in report
            .autoscaled
            .violations
            .iter()
            .chain(&report.static_peak.violations)
        {
            println!("  VIOLATION {v}");
        }
    }
}

/// A 24 h scenario over about `nodes` nodes.
fn fleet_scenario(nodes: u32, step: &str, seed: u64) -> String {
    // 16-core nodes; eight services. At the peak (2.5×) the autoscaled services
    // (75% target) ask for about 90% of `nodes` × 16 cores, so the autoscaled
    // fleet peaks near `nodes`.
    let peak_cores = f64::from(nodes) * 16.0 * 0.9;
    let mut s = String::new();
    let _ = write!(
        s,
        "apiVersion: novacron.io/v1\nkind: Scenario\nmetadata: {{name: fleet-{nodes}}}\nspec:\n  \
         seed: {seed}\n  start: \"2026-11-23T00:00:00Z\"\n  duration: 24h\n  step: {step}\n  \
         pools:\n    - name: general\n      template:\n        instanceType: m5.4xlarge\n        \
         provider: aws\n        capacityType: on-demand\n        pricePerHour: 0.768\n        \
         resources: {{cpu: 16, memory: 64Gi}}\n      minSize: {min}\n      maxSize: {max}\n      \
         size: {size}\n      zones: [a, b, c]\n      provisionDelay: 90s\n  jobs:\n",
        min = nodes / 10,
        max = nodes + nodes / 5,
        size = nodes * 4 / 10,
    );
    let mut policies = String::new();
    for i in 0..8u32 {
        let cpu = 1 + i % 2; // cores a replica
        let capacity = 100.0 * f64::from(cpu);
        // Each service gets an eighth of the peak cores, at 75% of its capacity.
        let peak_replicas = peak_cores / 8.0 / f64::from(cpu);
        let base = peak_replicas * capacity * 0.75 / 2.5 / 1.05;
        let _ = write!(
            s,
            "    - name: svc-{i}\n      replicas: {r}\n      resources: {{cpu: {cpu}, memory: \
             {mem}Gi}}\n      capacityPerReplica: {capacity}\n      spreadZones: {spread}\n      \
             load:\n        base: {base:.0}\n        noise: 5\n        repeat: 24h\n        \
             points:\n          - {{at: 0h, multiplier: 1}}\n          - {{at: {up}h, multiplier: \
             1}}\n          - {{at: {peak}h, multiplier: 2.5}}\n          - {{at: 20h, multiplier: \
             2.5}}\n          - {{at: 21h, multiplier: 1}}\n",
            r = (peak_replicas / 2.5).ceil() as u32,
            mem = cpu * 3,
            spread = i % 3 == 0,
            up = 6 + i % 3,
            peak = 8 + i % 3,
        );
        let _ = write!(
            policies,
            "    - name: svc-{i}\n      spec:\n        target: {{job: svc-{i}}}\n        minSize: \
             2\n        maxSize: 20000\n        metrics:\n          - {{type: queue, metric: \
             requests, target: {t:.0}, window: 1m}}\n        scaleOut: {{cooldown: 15s, step: \
             100%, stabilizationWindow: 0s}}\n        scaleIn: {{cooldown: 1m, step: 10%, \
             stabilizationWindow: 5m}}\n",
            t = capacity * 0.75
        );
    }
    let _ = write!(
        s,
        "  policies:\n{policies}    - name: general-nodes\n      spec:\n        target: {{pool: \
         general}}\n        minSize: {min}\n        maxSize: {max}\n        metrics:\n          - \
         {{type: queue, target: 12, window: 30s}}\n          - {{type: cpu, target: 90, weight: \
         30, window: 2m}}\n        scaleOut: {{cooldown: 15s, step: 100%, stabilizationWindow: \
         0s}}\n        scaleIn: {{cooldown: 2m, step: 10%, stabilizationWindow: 10m}}\n  faults:\n    \
         nodeFailureRate: 0.002\n    nodeFailures:\n      - {{at: 11h, pool: general, count: \
         {lost}}}\n",
        min = nodes / 10,
        max = nodes + nodes / 5,
        lost = nodes * 3 / 10,
    );
    s
}

#[derive(Debug)]
struct Args {
    nodes: u32,
    step: String,
    seed: u64,
    scenario: Option<PathBuf>,
    events: bool,
}

impl Args {
    fn parse() -> Args {
        let mut a = Args {
            nodes: 1000,
            step: "15s".into(),
            seed: 42,
            scenario: None,
            events: false,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = |what: &str| {
                it.next().unwrap_or_else(|| {
                    eprintln!("{flag} needs {what}");
                    std::process::exit(64)
                })
            };
            match flag.as_str() {
                "--nodes" => a.nodes = number(&flag, &value("a number")),
                "--step" => a.step = value("a duration"),
                "--seed" => a.seed = number(&flag, &value("a number")),
                "--scenario" => a.scenario = Some(PathBuf::from(value("a file"))),
                "--events" => a.events = true,
                other => {
                    eprintln!(
                        "unknown option {other}; expected --nodes N, --step 15s, --seed S, \
                         --scenario FILE or --events"
                    );
                    std::process::exit(64);
                }
            }
        }
        a
    }
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> T {
    v.parse().unwrap_or_else(|_| {
        eprintln!("{flag}: {v:?} is not a number");
        std::process::exit(64)
    })
}

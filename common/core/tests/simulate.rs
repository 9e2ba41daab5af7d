//! The fleet simulator end to end: every shipped scenario in
//! `packaging/scenarios/` parses, runs through the real reconciler, scheduler and
//! autoscaler, keeps its invariants, and gives the same report for the same seed;
//! bad scenarios are refused with located messages.

use std::fs;
use std::path::{Path, PathBuf};

use novacron_core::sim::{Mode, Report, Scenario, parse_scenario, simulate, simulate_run};
use proptest::prelude::*;

fn shipped() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/scenarios");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

fn load(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../packaging/scenarios")
        .join(name);
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse_scenario(name, &text).unwrap_or_else(|e| panic!("{name} should be valid:\n{e}"))
}

fn check(report: &Report) {
    for (mode, run) in [
        ("autoscaled", &report.autoscaled),
        ("static", &report.static_peak),
    ] {
        assert!(
            run.violations.is_empty(),
            "{} {mode}: {:#?}",
            report.scenario,
            run.violations
        );
        assert!(
            (0.0..=1.0).contains(&run.availability),
            "{} {mode}: availability {}",
            report.scenario,
            run.availability
        );
        assert!(
            run.placements > 0,
            "{} {mode}: nothing placed",
            report.scenario
        );
        assert!(run.cost > 0.0 && run.node_hours > 0.0);
    }
}

#[test]
fn every_shipped_scenario_is_listed_and_valid() {
    let names: Vec<String> = shipped()
        .iter()
        .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
        .collect();
    assert_eq!(
        names,
        [
            "daily-peak.yaml",
            "daily-week.yaml",
            "overnight-training.yaml",
            "sale-day.yaml",
            "spot-storm.yaml",
            "surge-spot.yaml",
            "surge.yaml",
            "zone-outage.yaml"
        ]
    );
    for n in &names {
        load(n);
    }
}

#[test]
fn sale_day_autoscaled_is_cheaper_and_available() {
    let report = simulate(&load("sale-day.yaml"));
    println!("{report}");
    check(&report);
    let (a, s) = (&report.autoscaled, &report.static_peak);
    assert!(a.cost < s.cost, "{report}");
    assert!(report.cost_saving() >= 0.4, "{report}");
    assert!(a.availability >= 0.999, "{report}");
    assert!(
        s.availability >= 0.999,
        "the static fleet is sized for the peak: {report}"
    );
}

/// The surges no schedule knows of: met from warm nodes and the request rate's
/// slope, each decision saying what drove it.
#[test]
fn unannounced_surges_are_met_from_warm_nodes_and_the_trend() {
    for name in ["sale-day.yaml", "surge.yaml", "surge-spot.yaml"] {
        let sc = load(name);
        assert!(
            sc.policies.iter().all(|p| p.schedules.is_empty()),
            "{name} has no schedule"
        );
        let report = simulate(&sc);
        println!("{report}");
        check(&report);
        let a = &report.autoscaled;
        assert!(a.availability >= 0.999, "{name}: {report}");
        assert!(a.warm_starts > 0, "{name} takes warm nodes: {report}");
        assert!(a.cost_by.warm > 0.0, "{name} pays for its warm nodes");
        assert_eq!(
            report.static_peak.warm_starts, 0,
            "the static fleet has none"
        );
        assert!(
            a.events.iter().any(|e| e.contains("(trend drives)")),
            "{name}: the slope drives a scale-out"
        );
        assert!(report.cost_saving() > 0.3, "{name}: {report}");
    }
}

/// Headroom keeps empty nodes beside the busy ones in the autoscaled run.
#[test]
fn headroom_keeps_empty_nodes_beside_the_busy_ones() {
    let head = "apiVersion: novacron.io/v1\nkind: Scenario\nmetadata:\n  name: headroom\nspec:\n";
    let pools = POOLS.replace(
        "      zones: [a]\n",
        "      zones: [a]\n      headroom: 2\n",
    );
    let jobs = "  jobs:\n    - name: api\n      replicas: 4\n      resources: {cpu: 4, memory: 2Gi}\n      capacityPerReplica: 100\n      load: {base: 10, points: [{at: 0s, multiplier: 1}]}\n";
    let sc =
        parse_scenario("h.yaml", &format!("{head}{pools}{jobs}")).unwrap_or_else(|e| panic!("{e}"));
    let run = simulate_run(&sc, Mode::Autoscaled);
    assert!(run.violations.is_empty(), "{:#?}", run.violations);
    // Four replicas of a whole node each, plus two empty nodes.
    assert_eq!(run.pools[0].peak_nodes, 6, "{run:#?}");
    let bad = POOLS.replace(
        "      zones: [a]\n",
        "      zones: [a]\n      headroom: \"x%\"\n",
    );
    let e = parse_scenario("h.yaml", &format!("{head}{bad}")).expect_err("refused");
    assert!(
        e.to_string()
            .contains("spec.pools[0].headroom: \"x%\" is not a headroom"),
        "{e}"
    );
}

/// Warm nodes cost their warm price, and a fleet that never scales out takes
/// none of them.
#[test]
fn idle_warm_nodes_cost_their_warm_price() {
    let head = "apiVersion: novacron.io/v1\nkind: Scenario\nmetadata:\n  name: warm\nspec:\n";
    let pools = POOLS.replace(
        "      zones: [a]\n",
        "      zones: [a]\n      warm: {size: 3, state: stopped, startDelay: 20s, pricePerHour: 0.01}\n",
    );
    let jobs = "  jobs:\n    - name: api\n      replicas: 2\n      resources: {cpu: 1, memory: 2Gi}\n      capacityPerReplica: 100\n      load: {base: 10, points: [{at: 0s, multiplier: 1}]}\n";
    let sc = parse_scenario("warm.yaml", &format!("{head}{pools}{jobs}"))
        .unwrap_or_else(|e| panic!("{e}"));
    let run = simulate_run(&sc, Mode::Autoscaled);
    assert!(run.violations.is_empty(), "{:#?}", run.violations);
    assert_eq!(run.warm_starts, 0);
    // Three nodes at 0.01 an hour for one hour.
    assert!((run.cost_by.warm - 0.03).abs() < 1e-9, "{:?}", run.cost_by);
    assert!((run.pools[0].warm_node_hours - 3.0).abs() < 1e-9);
    let fixed = simulate_run(&sc, Mode::StaticPeak);
    assert_eq!(fixed.cost_by.warm, 0.0, "the static fleet keeps none warm");
}

#[test]
fn daily_peak_scales_with_the_day() {
    let report = simulate(&load("daily-peak.yaml"));
    println!("{report}");
    check(&report);
    let a = &report.autoscaled;
    assert!(a.cost < report.static_peak.cost, "{report}");
    assert!(a.availability >= 0.99, "{report}");
    assert!(a.scale_events > 4, "{report}");
}

#[test]
fn overnight_training_completes_every_batch_and_empties_the_gpu_pool() {
    let report = simulate(&load("overnight-training.yaml"));
    println!("{report}");
    check(&report);
    for run in [&report.autoscaled, &report.static_peak] {
        assert_eq!(run.batches.arrived, 4, "{report}");
        assert_eq!(run.batches.completed, 4, "{report}");
    }
    let a = &report.autoscaled;
    assert!(a.cost < report.static_peak.cost * 0.5, "{report}");
    assert!(
        a.events
            .iter()
            .any(|e| e.contains("gpu ") && e.contains("→ 0")),
        "the GPU pool returns to zero: {:#?}",
        a.events
    );
}

#[test]
fn spot_storm_recovers() {
    let report = simulate(&load("spot-storm.yaml"));
    println!("{report}");
    check(&report);
    let a = &report.autoscaled;
    // Each notice places the node's replicas elsewhere at once; they serve on
    // until the node goes, so the storm loses none of them unannounced.
    assert!(
        a.replaced_at_notice > 0,
        "replicas move before the deadline: {report}"
    );
    assert!(a.availability >= 0.99, "{report}");
    assert!(
        a.events
            .iter()
            .filter(|e| e.contains("spot interruption"))
            .count()
            == 3
    );
}

#[test]
fn zone_outage_moves_work_to_the_other_zones() {
    let report = simulate(&load("zone-outage.yaml"));
    println!("{report}");
    check(&report);
    let a = &report.autoscaled;
    assert!(a.lost > 0, "{report}");
    assert!(a.availability >= 0.99, "{report}");
    assert!(a.events.iter().any(|e| e.contains("zone b is out for 2h")));
}

#[test]
fn a_week_of_daily_peaks_is_forecast_with_its_season() {
    // The shipped file forecasts with Holt over 30 minutes (it did better); the
    // same week with a daily season.
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/scenarios/daily-week.yaml");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let seasonal = text.replace(
        "trend: {lookahead: 2m, history: 30m}",
        "trend: {lookahead: 2m, history: 48h, season: 24h}",
    );
    assert_ne!(
        seasonal, text,
        "the trend line is where the test expects it"
    );
    let sc = parse_scenario("daily-week.yaml", &seasonal).unwrap_or_else(|e| panic!("{e}"));
    let report = simulate(&sc);
    check(&report);
    let a = &report.autoscaled;
    assert!(a.availability >= 0.999, "{report}");
    assert!(
        a.events
            .iter()
            .any(|e| e.contains("Holt-Winters, season 1day") && e.contains("(forecast drives)")),
        "the daily forecast drives some decisions"
    );
}

#[test]
fn no_shipped_policy_needs_a_schedule() {
    for path in shipped() {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let sc = load(name);
        for p in &sc.policies {
            assert!(
                p.schedules.is_empty(),
                "{name}: policy {} has a schedule",
                p.name
            );
        }
    }
}

#[test]
fn the_same_seed_gives_the_same_report() {
    let sc = load("spot-storm.yaml");
    let one = simulate_run(&sc, Mode::Autoscaled);
    let two = simulate_run(&sc, Mode::Autoscaled);
    assert_eq!(one, two);
    assert_eq!(format!("{one:?}"), format!("{two:?}"));
    // Another seed picks other victims and other noise.
    let other = simulate_run(&sc.with_seed(sc.spec.seed + 1), Mode::Autoscaled);
    assert_ne!(one.events, other.events);
    assert_ne!(one.served, other.served);
}

/// (scenario text after the envelope, expected located message fragment).
const BAD: &[(&str, &str)] = &[
    (
        "  seed: 1\n  start: yesterday\n  duration: 1h\n  step: 30s\n  pools: []\n",
        "bad.yaml:7:10: spec.start: \"yesterday\" is not a time; expected an RFC 3339 time",
    ),
    (
        "  seed: 1\n  start: 2026-01-01T00:00:00Z\n  duration: 1h\n  step: 30s\n  pools: []\n",
        "bad.yaml:10:3: spec.pools: is empty; expected at least one node pool",
    ),
    (
        POOL_AND_JOB,
        "bad.yaml:24:7: spec.jobs[0].resources: needs cpu 8, memory 2Gi, 0 GPUs, but a node of pool web offers cpu 4",
    ),
    (
        POLICY_ON_MISSING_JOB,
        "bad.yaml:30:23: spec.policies[0].spec.target.job: \"shop\" is not a service of this scenario; expected one of: api",
    ),
    (
        SPOT_ON_ON_DEMAND,
        "bad.yaml:22:41: spec.faults.spotInterruptions[0].pool: \"web\" is an on-demand pool; expected a pool with capacityType: spot",
    ),
    (
        UNSORTED_POINTS,
        "bad.yaml:30:18: spec.jobs[0].load.points[1].at: 1h is not after the previous point (2h); expected points in time order",
    ),
    (
        WARM_WITHOUT_DELAY,
        "spec.pools[0].warm.startDelay: is missing, and provider \"aws\" declares no start time for stopped nodes",
    ),
    (
        WARM_TOO_BIG,
        "spec.pools[0].warm.size: 40 is above maxSize (10)",
    ),
];

const WARM_WITHOUT_DELAY: &str = "  seed: 1\n  start: 2026-01-01T00:00:00Z\n  duration: 1h\n  step: 30s\n  pools:\n    - name: web\n      template:\n        instanceType: m5.xlarge\n        provider: aws\n        capacityType: on-demand\n        pricePerHour: 0.2\n        resources: {cpu: 4, memory: 16Gi}\n      minSize: 1\n      maxSize: 10\n      zones: [a]\n      warm: {size: 2}\n";
const WARM_TOO_BIG: &str = "  seed: 1\n  start: 2026-01-01T00:00:00Z\n  duration: 1h\n  step: 30s\n  pools:\n    - name: web\n      template:\n        instanceType: m5.xlarge\n        provider: aws\n        capacityType: on-demand\n        pricePerHour: 0.2\n        resources: {cpu: 4, memory: 16Gi}\n      minSize: 1\n      maxSize: 10\n      zones: [a]\n      warm: {size: 40, state: running}\n";

const POOLS: &str = "  seed: 1\n  start: 2026-01-01T00:00:00Z\n  duration: 1h\n  step: 30s\n  pools:\n    - name: web\n      template:\n        instanceType: m5.xlarge\n        provider: aws\n        capacityType: on-demand\n        pricePerHour: 0.2\n        resources: {cpu: 4, memory: 16Gi}\n      minSize: 1\n      maxSize: 10\n      zones: [a]\n";
const POOL_AND_JOB: &str = concat!(
    "  seed: 1\n  start: 2026-01-01T00:00:00Z\n  duration: 1h\n  step: 30s\n  pools:\n    - name: web\n      template:\n        instanceType: m5.xlarge\n        provider: aws\n        capacityType: on-demand\n        pricePerHour: 0.2\n        resources: {cpu: 4, memory: 16Gi}\n      minSize: 1\n      maxSize: 10\n      zones: [a]\n",
    "  jobs:\n    - name: api\n      replicas: 2\n      resources: {cpu: 8, memory: 2Gi}\n      capacityPerReplica: 100\n      load: {base: 10, points: [{at: 0s, multiplier: 1}]}\n"
);
const POLICY_ON_MISSING_JOB: &str = concat!(
    "  seed: 1\n  start: 2026-01-01T00:00:00Z\n  duration: 1h\n  step: 30s\n  pools:\n    - name: web\n      template:\n        instanceType: m5.xlarge\n        provider: aws\n        capacityType: on-demand\n        pricePerHour: 0.2\n        resources: {cpu: 4, memory: 16Gi}\n      minSize: 1\n      maxSize: 10\n      zones: [a]\n",
    "  jobs:\n    - name: api\n      replicas: 2\n      resources: {cpu: 1, memory: 2Gi}\n      capacityPerReplica: 100\n      load: {base: 10, points: [{at: 0s, multiplier: 1}]}\n",
    "  policies:\n    - name: shop\n      spec:\n        target: {job: shop}\n        minSize: 1\n        maxSize: 4\n        metrics: [{type: cpu, target: 70}]\n"
);
const SPOT_ON_ON_DEMAND: &str = concat!(
    "  seed: 1\n  start: 2026-01-01T00:00:00Z\n  duration: 1h\n  step: 30s\n  pools:\n    - name: web\n      template:\n        instanceType: m5.xlarge\n        provider: aws\n        capacityType: on-demand\n        pricePerHour: 0.2\n        resources: {cpu: 4, memory: 16Gi}\n      minSize: 1\n      maxSize: 10\n      zones: [a]\n",
    "  faults:\n    spotInterruptions: [{at: 10m, pool: web, percent: 50}]\n"
);
const UNSORTED_POINTS: &str = concat!(
    "  seed: 1\n  start: 2026-01-01T00:00:00Z\n  duration: 1h\n  step: 30s\n  pools:\n    - name: web\n      template:\n        instanceType: m5.xlarge\n        provider: aws\n        capacityType: on-demand\n        pricePerHour: 0.2\n        resources: {cpu: 4, memory: 16Gi}\n      minSize: 1\n      maxSize: 10\n      zones: [a]\n",
    "  jobs:\n    - name: api\n      replicas: 2\n      resources: {cpu: 1, memory: 2Gi}\n      capacityPerReplica: 100\n      load:\n        base: 10\n        points:\n          - {at: 2h, multiplier: 1}\n          - {at: 1h, multiplier: 2}\n"
);

#[test]
fn bad_scenarios_are_rejected_with_located_messages() {
    let head = "apiVersion: novacron.io/v1\nkind: Scenario\nmetadata:\n  name: bad\nspec:\n";
    let mut wrong = Vec::new();
    for (spec, want) in BAD {
        match parse_scenario("bad.yaml", &format!("{head}{spec}")) {
            Ok(_) => wrong.push(format!("accepted:\n{spec}")),
            Err(e) if !e.to_string().contains(want) => {
                wrong.push(format!("got:  {e}\nwant: {want}"))
            }
            Err(_) => {}
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
    // A valid minimal scenario, for contrast.
    let ok = parse_scenario("ok.yaml", &format!("{head}{POOLS}"));
    assert!(ok.is_ok(), "{:?}", ok.err().map(|e| e.to_string()));
}

fn shipped_texts() -> Vec<String> {
    shipped()
        .iter()
        .map(|p| fs::read_to_string(p).unwrap_or_default())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A scenario is user input: a mutated shipped file either is refused or runs,
    /// and neither panics.
    #[test]
    fn mutated_scenarios_are_refused_or_run(
        which in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0..3u8, "[0-9a-z:%. \\-]"), 1..4),
    ) {
        let texts = shipped_texts();
        let mut text = which.get(&texts).clone();
        for (at, op, s) in edits {
            let mut b: Vec<char> = text.chars().collect();
            if b.is_empty() {
                break;
            }
            let i = at.index(b.len());
            match op {
                0 => {
                    b.remove(i);
                }
                1 => b.splice(i..i, s.chars()).for_each(drop),
                _ => b.splice(i..=i, s.chars()).for_each(drop),
            }
            text = b.into_iter().collect();
        }
        if let Ok(mut sc) = parse_scenario("fuzz.yaml", &text) {
            // Shortened, to keep the property test quick.
            sc.spec.duration = sc.spec.duration.min(std::time::Duration::from_secs(1200));
            let run = simulate_run(&sc, Mode::Autoscaled);
            prop_assert!(run.violations.is_empty(), "{:?}", run.violations);
        }
    }

    #[test]
    fn arbitrary_text_is_refused_without_panic(text in "(?s).{0,300}") {
        let _ = parse_scenario("fuzz.yaml", &text);
        let _ = novacron_core::autoscale::parse_policies("fuzz.yaml", &text);
        let _ = novacron_core::autoscale::pool::parse_node_pools("fuzz.yaml", &text);
    }
}

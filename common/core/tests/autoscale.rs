//! The autoscaler's pure core on fixtures: scaling math, tolerance, windows,
//! stabilization, cooldowns, steps, bounds, cost caps, cron schedules, and the
//! located errors of bad policies and pools.

use std::time::Duration;

use novacron_core::autoscale::pool::{
    CapacityType, TemplateSource, parse_node_pools, parse_node_templates,
};
use novacron_core::autoscale::{
    Decision, Observations, Sample, ScaleState, Step, Target, active_schedule, decide,
    parse_policies, parse_policy,
};

const HEAD: &str =
    "apiVersion: novacron.io/v1\nkind: AutoScalingPolicy\nmetadata:\n  name: web\nspec:\n";

/// 2026-11-23 (a Monday) 00:00 UTC, in Unix ms.
const MONDAY: u64 = 1_795_392_000_000;
const MIN: u64 = 60_000;

fn policy(spec: &str) -> novacron_core::autoscale::AutoScalingPolicy {
    parse_policy("web.yaml", &format!("{HEAD}{spec}")).unwrap_or_else(|e| panic!("{e}"))
}

fn cpu(at_ms: &[u64], value: f64) -> Observations {
    Observations {
        cpu: at_ms.iter().map(|&at_ms| Sample { at_ms, value }).collect(),
        ..Observations::default()
    }
}

const CPU75: &str = "  target: {job: api}\n  minSize: 1\n  maxSize: 100\n  metrics:\n    - {type: cpu, target: 75, window: 5m}\n";

#[test]
fn scale_out_follows_the_ratio_and_says_why() {
    let p = policy(CPU75);
    let d = decide(&p, &ScaleState::new(4), &cpu(&[MONDAY], 150.0), MONDAY);
    assert_eq!((d.from, d.to), (4, 8));
    assert_eq!(d.explanation, "api 4 → 8: cpu 150% over 5m, target 75%");
    assert_eq!(d.recommendation, Some(8));
}

#[test]
fn tolerance_band_holds() {
    let p = policy(CPU75);
    // 80 / 75 = 1.067: inside the default 10% band.
    let d = decide(&p, &ScaleState::new(10), &cpu(&[MONDAY], 80.0), MONDAY);
    assert!(!d.changed());
    assert_eq!(
        d.explanation,
        "api holds at 10: cpu 80% over 5m, target 75%, within the 10% tolerance"
    );
    // A tighter band moves.
    let p = policy(&format!("{CPU75}  tolerance: 5\n"));
    let d = decide(&p, &ScaleState::new(10), &cpu(&[MONDAY], 80.0), MONDAY);
    assert_eq!(d.to, 11);
}

#[test]
fn windows_average_only_recent_samples() {
    let p = policy(CPU75);
    let mut obs = cpu(&[MONDAY - 10 * MIN], 300.0); // outside the 5m window
    obs.cpu.push(Sample {
        at_ms: MONDAY - MIN,
        value: 100.0,
    });
    obs.cpu.push(Sample {
        at_ms: MONDAY,
        value: 50.0,
    });
    obs.cpu.push(Sample {
        at_ms: MONDAY + MIN,
        value: 1000.0,
    }); // the future is ignored
    let d = decide(&p, &ScaleState::new(3), &obs, MONDAY);
    // mean 75% over the window: holds.
    assert!(!d.changed(), "{}", d.explanation);
    let d = decide(
        &p,
        &ScaleState::new(3),
        &cpu(&[MONDAY - 6 * MIN], 100.0),
        MONDAY,
    );
    assert!(!d.changed());
    assert_eq!(d.recommendation, None);
    assert_eq!(
        d.explanation,
        "api holds at 3: no cpu samples in their windows"
    );
}

#[test]
fn weights_combine_metrics() {
    let p = policy(
        "  target: {job: api}\n  minSize: 1\n  maxSize: 100\n  metrics:\n    - {type: cpu, target: 50, weight: 75}\n    - {type: memory, target: 50, weight: 25}\n",
    );
    let mut obs = cpu(&[MONDAY], 100.0); // asks 20
    obs.memory.push(Sample {
        at_ms: MONDAY,
        value: 50.0,
    }); // asks 10
    let d = decide(&p, &ScaleState::new(10), &obs, MONDAY);
    // 0.75 × 20 + 0.25 × 10 = 17.5 → 18.
    assert_eq!(d.to, 18);
    assert_eq!(
        d.explanation,
        "api 10 → 18: cpu 100% over 1m, target 50%, memory 50% over 1m, target 50%"
    );
}

#[test]
fn queue_metrics_size_from_the_queue() {
    let p = policy(
        "  target: {job: worker}\n  minSize: 0\n  maxSize: 50\n  metrics:\n    - {type: queue, metric: requests, target: 100}\n",
    );
    let mut obs = Observations::default();
    obs.reported.insert(
        "requests".into(),
        vec![Sample {
            at_ms: MONDAY,
            value: 1250.0,
        }],
    );
    let d = decide(&p, &ScaleState::new(0), &obs, MONDAY);
    assert_eq!(d.to, 13);
    assert_eq!(
        d.explanation,
        "worker 0 → 13: requests 1250 over 1m, target 100 per replica"
    );
    // Pending allocations ask for capacity on top of what runs.
    let p = policy(
        "  target: {pool: gpu}\n  minSize: 0\n  maxSize: 50\n  metrics:\n    - {type: queue, target: 4}\n",
    );
    let obs = Observations {
        pending: vec![Sample {
            at_ms: MONDAY,
            value: 10.0,
        }],
        ..Observations::default()
    };
    let d = decide(&p, &ScaleState::new(4), &obs, MONDAY);
    assert_eq!(d.to, 7, "4 + 10/4 = 6.5 → 7");
    assert_eq!(
        d.explanation,
        "gpu 4 → 7: pending 10 over 1m, target 4 per node"
    );
}

#[test]
fn steps_limit_one_change() {
    let p = policy(&format!(
        "{CPU75}  scaleOut: {{cooldown: 0s, step: 50%, maxPerEvent: 3, stabilizationWindow: 0s}}\n"
    ));
    let d = decide(&p, &ScaleState::new(4), &cpu(&[MONDAY], 150.0), MONDAY);
    assert_eq!(d.to, 6, "50% of 4");
    assert_eq!(
        d.explanation,
        "api 4 → 6: cpu 150% over 5m, target 75% (wants 8; scaleOut moves at most 2 per change)"
    );
    let d = decide(&p, &ScaleState::new(10), &cpu(&[MONDAY], 150.0), MONDAY);
    assert_eq!(d.to, 13, "maxPerEvent caps 50% of 10");
    let p = policy(&format!(
        "{CPU75}  scaleIn: {{cooldown: 0s, step: 2, stabilizationWindow: 0s}}\n"
    ));
    let d = decide(&p, &ScaleState::new(10), &cpu(&[MONDAY], 15.0), MONDAY);
    assert_eq!(d.to, 8, "a count step");
}

#[test]
fn cooldowns_hold_then_release() {
    let p = policy(&format!(
        "{CPU75}  scaleOut: {{cooldown: 3m, step: 100%, stabilizationWindow: 0s}}\n  scaleIn: {{cooldown: 10m, step: 100%, stabilizationWindow: 0s}}\n"
    ));
    let mut s = ScaleState::new(4);
    s.last_scale_out_ms = Some(MONDAY - MIN);
    let d = decide(&p, &s, &cpu(&[MONDAY], 150.0), MONDAY);
    assert!(!d.changed());
    assert_eq!(
        d.explanation,
        "api holds at 4: cpu 150% over 5m, target 75%; scale-out to 8 waits for the 3m cooldown (2m left)"
    );
    let d = decide(&p, &s, &cpu(&[MONDAY + 2 * MIN], 150.0), MONDAY + 2 * MIN);
    assert_eq!(d.to, 8);
    // Scale-in waits its own cooldown after a scale-out too.
    let d = decide(&p, &s, &cpu(&[MONDAY + 5 * MIN], 10.0), MONDAY + 5 * MIN);
    assert!(!d.changed(), "{}", d.explanation);
    assert!(
        d.explanation
            .contains("scale-in to 1 waits for the 10m cooldown (4m left)")
    );
    let d = decide(&p, &s, &cpu(&[MONDAY + 9 * MIN], 10.0), MONDAY + 9 * MIN);
    assert_eq!(d.to, 1);
}

#[test]
fn stabilization_keeps_the_highest_recent_recommendation_for_scale_in() {
    let p = policy(&format!(
        "{CPU75}  scaleIn: {{cooldown: 0s, step: 100%, stabilizationWindow: 5m}}\n"
    ));
    let mut s = ScaleState::new(10);
    // A load spike two minutes ago recommended 10; a dip now recommends 5.
    let d = decide(&p, &s, &cpu(&[MONDAY], 75.0), MONDAY);
    s.record(&p, &d, MONDAY);
    let t = MONDAY + 2 * MIN;
    let d = decide(&p, &s, &cpu(&[t], 37.5), t);
    assert!(!d.changed());
    assert_eq!(
        d.explanation,
        "api holds at 10: cpu 38% over 5m, target 75%; scale-in to 5 held back by the 5m \
         stabilization window (highest recommendation 10)"
    );
    s.record(&p, &d, t);
    // Once the spike leaves the window, the highest is 5.
    let t = MONDAY + 6 * MIN;
    let d = decide(&p, &s, &cpu(&[t], 37.5), t);
    assert_eq!(d.to, 5, "{}", d.explanation);
}

#[test]
fn stabilization_takes_the_lowest_recent_recommendation_for_scale_out() {
    let p = policy(&format!(
        "{CPU75}  scaleOut: {{cooldown: 0s, step: 100%, stabilizationWindow: 3m}}\n"
    ));
    let mut s = ScaleState::new(4);
    // Normal, then a spike (asks 8), then a smaller rise (asks 6).
    for (minute, load, want) in [(0, 75.0, 4), (1, 150.0, 4), (2, 112.5, 4), (4, 112.5, 6)] {
        let t = MONDAY + minute * MIN;
        let d = decide(&p, &s, &cpu(&[t], load), t);
        assert_eq!(d.to, want, "minute {minute}: {}", d.explanation);
        s.record(&p, &d, t);
    }
}

#[test]
fn flapping_load_does_not_flap_the_size() {
    let p = policy(CPU75);
    let mut s = ScaleState::new(10);
    let mut changes = 0;
    let mut obs = Observations::default();
    for i in 0..60 {
        let t = MONDAY + i * 15_000;
        let value = if i % 2 == 0 { 84.0 } else { 66.0 }; // ±12% around 75%
        obs.cpu.push(Sample { at_ms: t, value });
        obs.prune(t, Duration::from_secs(300));
        let d = decide(&p, &s, &obs, t);
        changes += u32::from(d.changed());
        s.record(&p, &d, t);
    }
    assert!(changes <= 1, "{changes} changes");
}

#[test]
fn min_and_max_bound_the_size() {
    let p = policy(
        "  target: {job: api}\n  minSize: 3\n  maxSize: 6\n  metrics:\n    - {type: cpu, target: 50}\n",
    );
    let d = decide(&p, &ScaleState::new(1), &Observations::default(), MONDAY);
    assert_eq!(
        (d.to, d.explanation.as_str()),
        (3, "api 1 → 3: minSize is 3")
    );
    let d = decide(&p, &ScaleState::new(9), &Observations::default(), MONDAY);
    assert_eq!(
        (d.to, d.explanation.as_str()),
        (6, "api 9 → 6: maxSize is 6")
    );
    let d = decide(&p, &ScaleState::new(5), &cpu(&[MONDAY], 100.0), MONDAY);
    assert_eq!(d.to, 6);
    assert!(
        d.explanation.ends_with("(asks for 10; maxSize is 6)"),
        "{}",
        d.explanation
    );
    let d = decide(&p, &ScaleState::new(6), &cpu(&[MONDAY], 100.0), MONDAY);
    assert_eq!(
        d.explanation,
        "api holds at 6: cpu 100% over 1m, target 50%; asks for 12, but maxSize is 6"
    );
    let d = decide(&p, &ScaleState::new(4), &cpu(&[MONDAY], 5.0), MONDAY);
    assert_eq!(d.to, 3);
}

#[test]
fn cost_cap_limits_scale_out_but_not_min_size() {
    let p = policy(
        "  target: {pool: web}\n  minSize: 2\n  maxSize: 100\n  maxCostPerHour: 5\n  metrics:\n    - {type: cpu, target: 50}\n",
    );
    let mut s = ScaleState::new(8);
    s.unit_price_per_hour = Some(0.5);
    let d = decide(&p, &s, &cpu(&[MONDAY], 100.0), MONDAY);
    assert_eq!(d.to, 10);
    assert_eq!(
        d.explanation,
        "web 8 → 10: cpu 100% over 1m, target 50% (asks for 16; maxCostPerHour 5 at 0.5 per hour \
         allows at most 10)"
    );
    s.current = 12;
    let d = decide(&p, &s, &Observations::default(), MONDAY);
    assert_eq!(
        (d.to, d.explanation.as_str()),
        (
            10,
            "web 12 → 10: maxCostPerHour 5 at 0.5 per hour allows at most 10"
        )
    );
    // A price so high the cap affords nothing: minSize still holds.
    s.unit_price_per_hour = Some(100.0);
    s.current = 1;
    let d = decide(&p, &s, &Observations::default(), MONDAY);
    assert_eq!(d.to, 2);
}

#[test]
fn cron_schedules_raise_the_floor_while_active() {
    let p = policy(
        "  target: {job: api}\n  minSize: 2\n  maxSize: 40\n  metrics:\n    - {type: cpu, target: 75}\n  schedules:\n    - {name: business-hours, cron: '0 8 * * 1-5', duration: 12h, minSize: 20}\n    - {name: lunch, cron: '30 11 * * *', duration: 1h, minSize: 30}\n",
    );
    assert_eq!(active_schedule(&p, MONDAY + 7 * 60 * MIN), None);
    assert_eq!(
        active_schedule(&p, MONDAY + 8 * 60 * MIN),
        Some(("business-hours", 20))
    );
    assert_eq!(
        active_schedule(&p, MONDAY + 12 * 60 * MIN),
        Some(("lunch", 30)),
        "the higher floor wins"
    );
    assert_eq!(
        active_schedule(&p, MONDAY + 20 * 60 * MIN),
        None,
        "12h later"
    );
    // Saturday: only lunch.
    let saturday = MONDAY + 5 * 24 * 60 * MIN;
    assert_eq!(active_schedule(&p, saturday + 9 * 60 * MIN), None);
    let d = decide(
        &p,
        &ScaleState::new(4),
        &Observations::default(),
        MONDAY + 9 * 60 * MIN,
    );
    assert_eq!(d.to, 20);
    assert_eq!(
        d.explanation,
        "api 4 → 20: schedule business-hours (0 8 * * 1-5, for 12h) sets at least 20"
    );
    // Metrics can still go above the floor.
    let t = MONDAY + 9 * 60 * MIN;
    let d = decide(&p, &ScaleState::new(20), &cpu(&[t], 150.0), t);
    assert_eq!(d.to, 40);
}

#[test]
fn record_keeps_only_the_stabilization_history() {
    let p = policy(CPU75);
    let mut s = ScaleState::new(4);
    for i in 0..100u64 {
        let t = MONDAY + i * MIN;
        let d = Decision {
            from: 4,
            to: 4,
            recommendation: Some(4),
            explanation: String::new(),
        };
        s.record(&p, &d, t);
    }
    assert!(s.recommendations.len() <= 6, "{}", s.recommendations.len());
}

#[test]
fn defaults_are_filled_in() {
    let p = policy(CPU75);
    assert_eq!(p.target, Target::Job("api".into()));
    assert_eq!(p.spec.tolerance, 10.0);
    assert_eq!(p.spec.scale_in.step, Step::Percent(50.0));
    assert_eq!(
        p.spec.scale_in.stabilization_window,
        Duration::from_secs(300)
    );
}

/// (spec text, expected `LINE:COLUMN: PATH: message` fragment).
const BAD: &[(&str, &str)] = &[
    (
        "  target: {job: api, pool: web}\n  minSize: 1\n  maxSize: 2\n  metrics: [{type: cpu, target: 50}]\n",
        "web.yaml:6:3: spec.target: names both a job and a pool; expected exactly one of job or pool",
    ),
    (
        "  target: {job: api}\n  minSize: 5\n  maxSize: 2\n  metrics: [{type: cpu, target: 50}]\n",
        "web.yaml:7:12: spec.minSize: 5 is above maxSize (2); expected a minSize at most maxSize",
    ),
    (
        "  target: {job: api}\n  minSize: 1\n  maxSize: 2\n  metrics:\n    - {type: cpu, target: 150}\n",
        "web.yaml:10:27: spec.metrics[0].target: 150 is out of range; expected a utilization in percent above 0 and up to 100, like 75",
    ),
    (
        "  target: {job: api}\n  minSize: 1\n  maxSize: 2\n  metrics:\n    - {type: disk, target: 50}\n",
        "web.yaml:10:14: spec.metrics[0].type: unknown value `disk`, expected one of `cpu`, `gpu`, `memory`, `queue`",
    ),
    (
        "  target: {job: api}\n  minSize: 1\n  maxSize: 2\n  metrics: [{type: cpu, target: 50}]\n  scaleOut: {cooldown: 1m, step: 0%, stabilizationWindow: 0s}\n",
        "web.yaml:10:34: spec.scaleOut.step: \"0%\" is out of range; expected a percentage above 0% and up to 1000%",
    ),
    (
        "  target: {job: api}\n  minSize: 1\n  maxSize: 2\n  metrics: [{type: cpu, target: 50}]\n  schedules:\n    - {name: morning, cron: '0 8 * *', duration: 1h, minSize: 2}\n",
        "web.yaml:11:29: spec.schedules[0].cron: \"0 8 * *\" has 4 fields; expected a 5-field cron expression",
    ),
    (
        "  target: {job: api}\n  minSize: 0\n  maxSize: 2\n  metrics: [{type: cpu, target: 50}]\n",
        "web.yaml:7:12: spec.minSize: 0 needs a queue metric or a schedule to scale up from zero",
    ),
    (
        "  target: {job: api}\n  minSize: 1\n  maxSize: 2\n  metrics: []\n",
        "web.yaml:9:3: spec.metrics: nothing to scale on; expected at least one metric",
    ),
    (
        "  target: {job: api}\n  minSize: 1\n  maxSize: 2\n  maxCostPerHour: -3\n  metrics: [{type: cpu, target: 50}]\n",
        "web.yaml:9:19: spec.maxCostPerHour: -3 is not a cost cap; expected a positive hourly cost",
    ),
    (
        "  target: {job: api}\n  minSize: 1\n  maxSize: 2\n  metrics: [{type: cpu, target: 50, window: 5}]\n",
        "web.yaml:9:45: spec.metrics[0].window: 5 has no unit; expected a duration like 500ms",
    ),
    (
        "  target: {job: api}\n  minSize: 1\n  maxSize: 2\n  metrics: [{type: cpu, target: 50}]\n  tolerence: 5\n",
        "web.yaml:10:3: spec.tolerence: unknown field `tolerence`; expected one of",
    ),
];

#[test]
fn bad_policies_are_rejected_with_located_messages() {
    let mut wrong = Vec::new();
    for (spec, want) in BAD {
        let e = parse_policy("web.yaml", &format!("{HEAD}{spec}"))
            .expect_err(spec)
            .to_string();
        if !e.contains(want) {
            wrong.push(format!("for:\n{spec}\ngot:  {e}\nwant: {want}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

#[test]
fn several_policies_in_one_file_have_distinct_names() {
    let one = format!("{HEAD}{CPU75}");
    let text = format!("{one}---\n{one}");
    let e = parse_policies("two.yaml", &text).expect_err("same name");
    assert!(
        e.to_string().contains(
            "two.yaml:15:9: metadata.name: \"web\" is already the name of the policy at line 4"
        ),
        "{e}"
    );
    let e = parse_policy("two.yaml", "kind: Job\n").expect_err("not a policy");
    assert!(e.to_string().contains("missing required field"), "{e}");
}

#[test]
fn node_templates_and_pools_parse_and_resolve() {
    let templates = parse_node_templates(
        "t.yaml",
        "apiVersion: novacron.io/v1\nkind: NodeTemplate\nmetadata: {name: m5-spot}\nspec:\n  instanceType: m5.xlarge\n  provider: aws\n  capacityType: spot\n  pricePerHour: 0.07\n  resources: {cpu: 4, memory: 16Gi}\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(templates[0].spec.capacity_type, CapacityType::Spot);
    let pools = parse_node_pools(
        "p.yaml",
        "apiVersion: novacron.io/v1\nkind: NodePool\nmetadata: {name: web}\nspec:\n  templateRef: m5-spot\n  minSize: 1\n  maxSize: 20\n  zones: [a, b]\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(pools[0].template, TemplateSource::Ref("m5-spot".into()));
    let t = pools[0].resolve(&templates).expect("known template");
    assert_eq!(t.instance_type, "m5.xlarge");
    let e = pools[0].resolve(&[]).expect_err("no templates");
    assert_eq!(
        e.to_string(),
        "node pool web: templateRef \"m5-spot\" names no NodeTemplate; expected one of: none"
    );
}

#[test]
fn bad_pools_are_rejected_with_located_messages() {
    let e = parse_node_pools(
        "p.yaml",
        "apiVersion: novacron.io/v1\nkind: NodePool\nmetadata: {name: web}\nspec:\n  template:\n    instanceType: m5.xlarge\n    provider: aws\n    capacityType: preemptible\n    pricePerHour: 0.07\n    resources: {cpu: 4, memory: 16Gi}\n  minSize: 1\n  maxSize: 20\n",
    )
    .expect_err("bad capacity type");
    assert!(
        e.to_string().contains(
            "p.yaml:8:19: spec.template.capacityType: unknown value `preemptible`, expected `spot` or `on-demand`"
        ),
        "{e}"
    );
    let e = parse_node_pools(
        "p.yaml",
        "apiVersion: novacron.io/v1\nkind: NodePool\nmetadata: {name: web}\nspec:\n  template:\n    instanceType: m5.xlarge\n    provider: aws\n    capacityType: spot\n    pricePerHour: -1\n    labels: {zone: a}\n    resources: {cpu: 0, memory: 16Gi}\n  minSize: 30\n  maxSize: 20\n  zones: [a, a]\n",
    )
    .expect_err("several problems");
    let text = e.to_string();
    for want in [
        "p.yaml:9:19: spec.template.pricePerHour: -1 is not a price",
        "p.yaml:10:14: spec.template.labels.zone: \"zone\" is set by the pool itself",
        "p.yaml:11:22: spec.template.resources.cpu: 0 offers nothing",
        "p.yaml:12:12: spec.minSize: 30 is above maxSize (20)",
        "p.yaml:14:14: spec.zones[1]: \"a\" is listed twice",
    ] {
        assert!(text.contains(want), "missing {want} in:\n{text}");
    }
}

//! `novacron simulate` as an operator runs it: the shipped scenarios, the same
//! seed giving the same report, and a bad scenario refused with a located message.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use novacron_tests::bin;

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/scenarios")
        .join(name)
}

fn simulate(args: &[&str]) -> Output {
    Command::new(bin("novacron"))
        .arg("simulate")
        .args(args)
        .output()
        .expect("novacron runs")
}

#[test]
fn sale_day_is_cheaper_than_the_static_peak_and_repeatable() {
    let file = scenario("sale-day.yaml");
    let file = file.to_str().expect("utf-8 path");
    let first = simulate(&["--scenario", file, "-o", "json"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let again = simulate(&["--scenario", file, "-o", "json"]);
    assert_eq!(
        first.stdout, again.stdout,
        "the same seed gives the same report"
    );

    let report: serde_json::Value = serde_json::from_slice(&first.stdout).expect("json");
    let auto = report["autoscaled"]["cost"].as_f64().expect("cost");
    let fixed = report["static_peak"]["cost"].as_f64().expect("cost");
    assert!(auto < fixed, "autoscaled {auto} vs static {fixed}");
    assert!(
        report["autoscaled"]["violations"]
            .as_array()
            .expect("list")
            .is_empty()
    );

    let other = simulate(&["--scenario", file, "--seed", "7", "-o", "json"]);
    assert!(other.status.success());
    let other: serde_json::Value = serde_json::from_slice(&other.stdout).expect("json");
    assert_eq!(other["seed"], 7);
}

#[test]
fn every_shipped_scenario_runs_and_reports_in_a_table() {
    for name in [
        "daily-peak.yaml",
        "overnight-training.yaml",
        "sale-day.yaml",
        "spot-storm.yaml",
        "zone-outage.yaml",
    ] {
        let path = scenario(name);
        let out = simulate(&["--scenario", path.to_str().expect("utf-8")]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("availability") && text.contains("static peak"),
            "{text}"
        );
        // Regression (issue 12): the report lacked its final newline.
        assert!(
            text.ends_with("availability\n") && !text.ends_with("\n\n"),
            "{name}: {text:?}"
        );
    }
}

#[test]
fn a_bad_scenario_is_refused_with_its_location() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "apiVersion: novacron.io/v1\nkind: Scenario\nmetadata:\n  name: bad\nspec:\n  duration: soon\n",
    )
    .expect("write");
    let out = simulate(&["--scenario", path.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml"), "{err}");
    assert!(err.contains("duration"), "{err}");
}

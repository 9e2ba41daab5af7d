//! The manifests in `examples/` (issue 15, point 4): there is one for every kind
//! `novacron apply` accepts, and each is applied to a real controller through the
//! `novacron` binary, as the README tells a user to, and then listed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use novacron_tests::Controller;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Every `*.yaml` of `examples/`, sorted, with its text.
fn examples() -> Vec<(PathBuf, String)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .expect("examples/ exists")
        .map(|e| e.expect("an entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("readable");
            (p, text)
        })
        .collect()
}

/// The `kind:` lines of a (possibly multi-document) manifest.
fn kinds(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("kind:"))
        .map(|k| k.trim().to_string())
        .collect()
}

#[test]
fn there_is_an_example_of_every_kind_apply_accepts() {
    let have: BTreeSet<String> = examples().iter().flat_map(|(_, t)| kinds(t)).collect();
    let accepted: BTreeSet<String> = novacron_cli::jobs::APPLY_KINDS
        .iter()
        .map(|(kind, _)| kind.to_string())
        .collect();
    let missing: Vec<&String> = accepted.difference(&have).collect();
    assert!(missing.is_empty(), "examples/ has no {missing:?}");
    let unknown: Vec<&String> = have.difference(&accepted).collect();
    assert!(
        unknown.is_empty(),
        "examples/ has kinds apply refuses: {unknown:?}"
    );
}

#[tokio::test]
async fn every_example_applies_to_a_real_controller() {
    let dir = tempfile::Builder::new()
        .prefix("novacron-examples-")
        .tempdir()
        .expect("tempdir");
    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let run = |args: &[&str]| {
        let out = c.cli(args);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "novacron {args:?} failed ({}): {}{stdout}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    // The whole folder at once, as a user would (files in name order).
    let folder = examples_dir();
    let applied = run(&["apply", "-f", folder.to_str().expect("a path")]);
    for (path, text) in examples() {
        let name = text
            .lines()
            .skip_while(|l| !l.starts_with("metadata:"))
            .find_map(|l| l.trim().strip_prefix("name:"))
            .map(|n| n.trim().to_string())
            .unwrap_or_else(|| panic!("{} has a metadata.name", path.display()));
        assert!(
            applied.contains(&name),
            "{} ({name}) is not in apply's answer:\n{applied}",
            path.display()
        );
    }
    let jobs = run(&["job", "list", "-o", "name"]);
    assert!(
        jobs.contains("job/api") && jobs.contains("job/train"),
        "{jobs}"
    );
    let policies = run(&["policy", "list", "-o", "name"]);
    assert!(policies.contains("policy/api-cpu"), "{policies}");
    let pools = run(&["pool", "list"]);
    // The pool, made from the template's instance type.
    assert!(
        pools.contains("general") && pools.contains("m5.xlarge"),
        "{pools}"
    );
    // Applying them again changes nothing and is accepted.
    run(&["apply", "-f", folder.to_str().expect("a path")]);
}

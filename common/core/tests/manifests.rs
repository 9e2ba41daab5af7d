//! Job manifests end to end: text in, a validated `Job` or located errors out.
//!
//! - `invalid/*.yaml`: each file is rejected; its header says how. A line
//!   `# expect LINE[:COLUMN]: FRAGMENT` asks for an error at that line (and column)
//!   whose message contains the fragment; a file gets exactly the errors it expects.
//! - `valid/*.yaml`: each file parses, and converts to the wire `TaskSpec` as the
//!   tests below spell out.
//! - property tests: no text makes the parser panic or hang.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use novacron_core::manifest::{
    ByteSize, JobType, Millicores, Operator, Strategy, parse_job, parse_jobs,
};
use novacron_wire::{HealthCheckKind, PortMapping, RestartSpec, VolumeMount};
use proptest::prelude::*;

fn fixtures(kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/manifests")
        .join(kind);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    files
}

fn read(path: &Path) -> (String, String) {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("?")
        .to_string();
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (name, text)
}

fn valid(name: &str) -> novacron_core::manifest::Job {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/manifests/valid")
        .join(name);
    let (name, text) = read(&path);
    parse_job(&name, &text).unwrap_or_else(|e| panic!("{name} should be valid:\n{e}"))
}

/// One `# expect LINE[:COLUMN]: FRAGMENT` header line.
#[derive(Debug)]
struct Expect {
    line: usize,
    column: Option<usize>,
    fragment: String,
}

fn expectations(name: &str, text: &str) -> Vec<Expect> {
    text.lines()
        .take_while(|l| l.starts_with('#'))
        .filter_map(|l| l.strip_prefix("# expect "))
        .map(|l| {
            let (at, fragment) = l
                .split_once(": ")
                .unwrap_or_else(|| panic!("{name}: bad expect line {l:?}"));
            let (line, column) = at.split_once(':').map_or((at, None), |(l, c)| (l, Some(c)));
            let number = |s: &str| {
                s.parse::<usize>()
                    .unwrap_or_else(|_| panic!("{name}: bad expect line {l:?}"))
            };
            Expect {
                line: number(line),
                column: column.map(number),
                fragment: fragment.to_string(),
            }
        })
        .collect()
}

#[test]
fn invalid_manifests_are_rejected_with_located_messages() {
    let files = fixtures("invalid");
    assert!(files.len() >= 20, "only {} invalid fixtures", files.len());
    let mut failures = Vec::new();
    for path in &files {
        let (name, text) = read(path);
        let expected = expectations(&name, &text);
        assert!(!expected.is_empty(), "{name}: no `# expect` line");
        let errors = match parse_jobs(&name, &text) {
            Ok(jobs) => {
                failures.push(format!("{name}: accepted ({} jobs)", jobs.len()));
                continue;
            }
            Err(e) => e,
        };
        let shown = errors.to_string();
        if errors.len() != expected.len() {
            failures.push(format!(
                "{name}: {} errors, expected {}:\n{shown}",
                errors.len(),
                expected.len()
            ));
            continue;
        }
        for (got, want) in errors.iter().zip(&expected) {
            let line_ok = got.line == Some(want.line);
            let column_ok = want.column.is_none() || got.column == want.column;
            let text_ok = got.to_string().contains(&want.fragment);
            let prefix_ok = got
                .to_string()
                .starts_with(&format!("{name}:{}:", want.line));
            if !(line_ok && column_ok && text_ok && prefix_ok) {
                failures.push(format!("{name}: expected {want:?}\n  got {got}"));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn every_valid_fixture_parses() {
    for path in fixtures("valid") {
        let (name, text) = read(&path);
        let jobs = parse_jobs(&name, &text).unwrap_or_else(|e| panic!("{name}:\n{e}"));
        assert!(!jobs.is_empty(), "{name}");
    }
}

#[test]
fn web_service() {
    let job = valid("web-service.yaml");
    assert_eq!(job.name, "web");
    assert_eq!(job.labels.get("tier").map(String::as_str), Some("frontend"));
    let s = &job.spec;
    assert_eq!(
        (s.job_type, s.replicas, s.priority),
        (JobType::Service, 3, 100)
    );
    let p = &s.placement;
    assert_eq!(p.constraints.len(), 3);
    assert_eq!(p.constraints[1].operator, Operator::DoesNotExist);
    assert_eq!(p.constraints[2].operator, Operator::Equal);
    assert_eq!(p.affinity[0].weight, 20);
    assert_eq!(p.anti_affinity[0].operator, Operator::Exists);
    assert!(p.job_anti_affinity);
    assert_eq!(p.spread.len(), 2);
    assert_eq!(
        (p.spread[0].weight, p.spread[1].weight),
        (80, 50),
        "default weight"
    );
    assert_eq!(p.strategy, Strategy::Spread);
    assert_eq!(s.update.canary, 1);

    let t = job.task_spec();
    assert!(!t.batch);
    assert_eq!(t.image, "registry.example.com/storefront/web:2.4.1");
    assert_eq!(t.command, ["/usr/local/bin/web"]);
    assert_eq!(t.args, ["--listen", "0.0.0.0:8080"]);
    assert_eq!(t.env.get("LOG_LEVEL").map(String::as_str), Some("info"));
    assert_eq!(t.env.len(), 2);
    assert_eq!(
        t.ports,
        [
            PortMapping {
                name: "http".into(),
                container_port: 8080,
                host_port: Some(80),
                udp: false,
            },
            PortMapping {
                name: "metrics".into(),
                container_port: 9100,
                host_port: None,
                udp: false,
            },
            PortMapping {
                name: "dns".into(),
                container_port: 53,
                host_port: Some(80),
                udp: true,
            },
        ]
    );
    assert_eq!(
        t.volumes,
        [
            VolumeMount {
                source: "/etc/storefront".into(),
                target: "/config".into(),
                read_only: true,
            },
            VolumeMount {
                source: "web-cache".into(),
                target: "/var/cache/web".into(),
                read_only: false,
            },
        ]
    );
    assert_eq!(t.working_dir.as_deref(), Some("/srv"));
    assert_eq!(t.cpu_millis, 1500);
    assert_eq!(t.memory_bytes, 512 << 20);
    assert!(t.gpu_uuids.is_empty(), "the scheduler fills GPUs in");
    assert_eq!(
        t.restart,
        RestartSpec {
            attempts: 5,
            interval_ms: 600_000,
            delay_ms: 2_000,
            delay_mode: true,
        }
    );
    let h = t.health.expect("health check");
    // The older one-check form is the liveness check; no readiness, no startup.
    let live = h.liveness.expect("liveness");
    assert_eq!(
        live.check,
        HealthCheckKind::Http {
            port: 8080,
            path: "/healthz".into()
        }
    );
    assert_eq!(
        (live.period_ms, live.timeout_ms, live.failure_threshold),
        (10_000, 2_000, 3)
    );
    assert_eq!(
        live.initial_delay_ms, 10_000,
        "the first check after one interval"
    );
    assert_eq!((h.readiness, h.startup), (None, None));
    assert_eq!(
        (h.max_restarts, h.backoff_initial_ms, h.backoff_max_ms),
        (3, 1_000, 300_000),
        "defaults"
    );
}

#[test]
fn batch_gpu_training() {
    let job = valid("batch-gpu-training.yaml");
    let s = &job.spec;
    assert_eq!(
        (s.job_type, s.replicas, s.priority),
        (JobType::Batch, 2, 700)
    );
    let gpus = s.resources.gpus.as_ref().expect("gpus");
    assert_eq!(gpus.count, 4);
    assert_eq!(gpus.model.as_deref(), Some("A100"));
    assert_eq!(gpus.memory, Some(ByteSize(40 << 30)));
    assert_eq!(s.placement.constraints[0].operator, Operator::NotEqual);

    let t = job.task_spec();
    assert!(t.batch, "batch jobs run to completion");
    assert_eq!(t.command, ["python", "train.py"]);
    assert_eq!(t.cpu_millis, 16_000);
    assert_eq!(t.memory_bytes, 64 << 30);
    assert!(t.gpu_uuids.is_empty());
    assert!(t.ports.is_empty());
    assert_eq!(t.volumes.len(), 2);
    assert!(t.volumes[0].read_only);
    assert_eq!(
        t.restart,
        RestartSpec {
            attempts: 2,
            interval_ms: 3_600_000,
            delay_ms: 30_000,
            delay_mode: false,
        }
    );
    assert_eq!(t.health, None);
}

#[test]
fn system_node_exporter() {
    let job = valid("system-node-exporter.yaml");
    let s = &job.spec;
    assert_eq!(s.job_type, JobType::System);
    assert_eq!(s.replicas, 0, "system jobs ignore replicas");
    assert_eq!(s.placement.constraints[0].operator, Operator::NotIn);

    let t = job.task_spec();
    assert!(!t.batch);
    assert_eq!(t.args, ["--path.rootfs=/host"]);
    assert_eq!(t.ports[0].host_port, Some(9100));
    assert_eq!(t.volumes[0].source, "/");
    assert_eq!((t.cpu_millis, t.memory_bytes), (100, 64 << 20));
    assert_eq!(
        t.restart,
        RestartSpec {
            attempts: 3,
            interval_ms: 300_000,
            delay_ms: 1_000,
            delay_mode: false,
        },
        "defaults"
    );
    let h = t.health.expect("health check").liveness.expect("liveness");
    assert_eq!(h.check, HealthCheckKind::Tcp { port: 9100 });
    assert_eq!(
        (h.period_ms, h.timeout_ms, h.failure_threshold),
        (5_000, 2_000, 3),
        "defaults"
    );
}

#[test]
fn liveness_readiness_and_startup() {
    let job = valid("probes.yaml");
    let h = job.task_spec().health.expect("health");
    let live = h.liveness.expect("liveness");
    assert_eq!(
        live.check,
        HealthCheckKind::Http {
            port: 8080,
            path: "/live".into()
        }
    );
    assert_eq!(
        (
            live.period_ms,
            live.timeout_ms,
            live.failure_threshold,
            live.initial_delay_ms
        ),
        (3_000, 1_000, 2, 5_000)
    );
    let ready = h.readiness.expect("readiness");
    assert_eq!(ready.check, HealthCheckKind::Tcp { port: 8080 });
    assert_eq!(
        (ready.period_ms, ready.timeout_ms, ready.failure_threshold),
        (5_000, 2_000, 3),
        "defaults"
    );
    let startup = h.startup.expect("startup");
    assert_eq!(
        startup.check,
        HealthCheckKind::Exec {
            command: vec!["test".into(), "-f".into(), "/started".into()]
        }
    );
    assert_eq!(
        (startup.period_ms, startup.failure_threshold),
        (1_000, 30),
        "a startup check defaults to 30 failures"
    );
    assert_eq!(
        (h.max_restarts, h.backoff_initial_ms, h.backoff_max_ms),
        (5, 2_000, 300_000)
    );
}

#[test]
fn multi_document() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests/valid/multi-document.yaml");
    let (name, text) = read(&path);
    let jobs = parse_jobs(&name, &text).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
    assert_eq!(names, ["cache", "nightly-report"]);
    let cache = jobs[0].task_spec();
    assert_eq!(cache.args, ["--save", ""]);
    assert_eq!(
        cache.health.and_then(|h| h.liveness).map(|l| l.check),
        Some(HealthCheckKind::Exec {
            command: vec!["redis-cli".into(), "ping".into()]
        })
    );
    let report = &jobs[1];
    assert_eq!(report.spec.resources.cpu, Millicores(100));
    assert_eq!(report.spec.resources.memory, ByteSize(16 << 20));
    assert!(report.task_spec().batch);

    let one = parse_job(&name, &text).expect_err("two jobs");
    assert_eq!(one.len(), 1);
    assert!(
        one.to_string()
            .starts_with("multi-document.yaml:15:1: this file holds 2 jobs; expected exactly one"),
        "{one}"
    );
}

#[test]
fn a_file_without_a_job_is_an_error() {
    for text in ["", "# nothing here\n", "---\n...\n", "~\n"] {
        let e = parse_job("empty.yaml", text).expect_err(text);
        assert_eq!(e.len(), 1, "{e}");
        assert!(
            e.to_string()
                .starts_with("empty.yaml: no job found; expected a YAML document"),
            "{e}"
        );
    }
}

#[test]
fn a_scalar_document_says_what_a_manifest_is() {
    let e = parse_job("x.yaml", "hello\n").expect_err("not a mapping");
    assert_eq!(
        e.to_string(),
        "x.yaml:1:1: invalid type: string \"hello\", expected a mapping"
    );
}

#[test]
fn version_hash_ignores_formatting_and_follows_the_spec() {
    let block = valid("web-service.yaml");
    // The same job written differently: flow style, other key order, equal
    // quantities spelled otherwise, no comments.
    let text = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests/valid/web-service.yaml"),
    )
    .expect("fixture")
    .replace("cpu: 1.5", "cpu: 1500m")
    .replace("memory: 512Mi", "memory: 536870912")
    .replace("interval: 10m", "interval: 600s")
    .lines()
    .filter(|l| !l.trim_start().starts_with('#'))
    .collect::<Vec<_>>()
    .join("\n");
    let respelled = parse_job("respelled.yaml", &text).expect("still valid");
    assert_eq!(block.version_hash(), respelled.version_hash());
    assert_eq!(block.version_hash().len(), 64);

    let relabelled = parse_job(
        "relabelled.yaml",
        &text.replace("tier: frontend", "tier: edge"),
    )
    .expect("valid");
    assert_eq!(
        block.version_hash(),
        relabelled.version_hash(),
        "labels are not the spec"
    );

    for (from, to) in [
        ("web:2.4.1", "web:2.4.2"),
        ("replicas: 3", "replicas: 4"),
        ("LOG_LEVEL: info", "LOG_LEVEL: debug"),
        ("weight: 20", "weight: 21"),
    ] {
        let changed = parse_job("changed.yaml", &text.replace(from, to)).expect("valid");
        assert_ne!(
            block.version_hash(),
            changed.version_hash(),
            "{from} -> {to}"
        );
    }
}

#[test]
fn version_hash_is_pinned() {
    // Changing this value changes every stored job's version: only on purpose.
    let job = parse_job(
        "pinned.yaml",
        "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {name: pinned}\nspec:\n  task: {image: busybox}\n  resources: {cpu: 1, memory: 64Mi}\n",
    )
    .expect("valid");
    assert_eq!(
        job.version_hash(),
        "b6f929bb0483ecfc1bab418a3714478e77931d62ae926a79d11d12766b227c0c",
    );
}

#[test]
fn a_job_round_trips_through_its_manifest() {
    for name in [
        "web-service.yaml",
        "batch-gpu-training.yaml",
        "system-node-exporter.yaml",
    ] {
        let job = valid(name);
        let yaml = yaml_serde::to_string(&job.to_manifest()).expect("manifests serialize");
        let again = parse_job(name, &yaml).unwrap_or_else(|e| panic!("{name}:\n{e}\n{yaml}"));
        assert_eq!(job, again, "{name}");
        assert_eq!(job.version_hash(), again.version_hash(), "{name}");
    }
}

#[test]
fn from_manifest_validates_without_text() {
    let job = valid("web-service.yaml");
    let mut manifest = job.to_manifest();
    manifest.spec.replicas = 0;
    manifest.spec.resources.cpu = Millicores(0);
    manifest.spec.update.canary = 0;
    manifest.metadata.labels = BTreeMap::new();
    let e = novacron_core::manifest::Job::from_manifest("api", manifest).expect_err("invalid");
    assert_eq!(
        e.to_string(),
        "api: spec.replicas: 0 is out of range; expected a whole number from 1 to 10000 (system \
         jobs ignore replicas)\napi: spec.resources.cpu: 0 is not enough; expected more than 0, \
         like 500m or 2 (every replica must ask for some CPU)"
    );
    let ok = novacron_core::manifest::Job::from_manifest("api", job.to_manifest()).expect("valid");
    assert_eq!(ok, job);
}

fn fixture_texts() -> Vec<String> {
    fixtures("valid")
        .into_iter()
        .chain(fixtures("invalid"))
        .map(|p| read(&p).1)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parsing_arbitrary_text_never_panics(text in "(?s).{0,400}") {
        let _ = parse_jobs("fuzz.yaml", &text);
        let _ = parse_job("fuzz.yaml", &text);
    }

    #[test]
    fn parsing_yaml_like_text_never_panics(
        text in "[a-zA-Z0-9:,\\-\\[\\]{}#&*!|>'\" .\\n\\t~?%@`/=]{0,300}"
    ) {
        let _ = parse_jobs("fuzz.yaml", &text);
    }

    #[test]
    fn parsing_mutated_fixtures_never_panics(
        which in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0..4u8, any::<char>()), 1..6),
    ) {
        let texts = fixture_texts();
        let mut chars: Vec<char> = which.get(&texts).chars().collect();
        for (at, op, c) in edits {
            if chars.is_empty() {
                break;
            }
            let i = at.index(chars.len());
            match op {
                0 => {
                    chars.remove(i);
                }
                1 => chars.insert(i, c),
                2 => chars.insert(i, [':', '-', '\n', ' ', '[', '{', '"', '0'][usize::from(c as u8 % 8)]),
                _ => {
                    // Duplicate the line holding i.
                    let start = chars[..i].iter().rposition(|&c| c == '\n').map_or(0, |p| p + 1);
                    let end = chars[i..].iter().position(|&c| c == '\n').map_or(chars.len(), |p| i + p + 1);
                    let line: Vec<char> = chars[start..end].to_vec();
                    chars.splice(start..start, line);
                }
            }
        }
        let text: String = chars.into_iter().collect();
        match parse_jobs("fuzz.yaml", &text) {
            Ok(jobs) => {
                for job in jobs {
                    let _ = job.task_spec();
                    prop_assert_eq!(job.version_hash().len(), 64);
                }
            }
            Err(errors) => {
                prop_assert!(!errors.is_empty());
                for e in &errors {
                    prop_assert!(e.to_string().starts_with("fuzz.yaml"));
                    prop_assert!(!e.message.contains('\u{0}'), "probe marker leaked: {}", e);
                }
            }
        }
    }
}

/// A batch job with `lines` appended under `spec:` (indented by two spaces).
fn with_lifecycle(lines: &str) -> String {
    format!(
        "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {{name: nightly}}\nspec:\n  type: batch\n  task: {{image: busybox}}\n  resources: {{cpu: 1, memory: 64Mi}}\n{lines}"
    )
}

#[test]
fn lifecycle_parses_and_changes_the_version_hash() {
    let text = with_lifecycle(
        "  lifecycle:\n    schedule: {start: \"0 8 * * 1-5\", stop: \"0 20 * * 1-5\"}\n    maxRuntime: 8h\n",
    );
    let job = parse_job("nightly.yaml", &text).unwrap_or_else(|e| panic!("{e}"));
    let l = job.spec.lifecycle.as_ref().expect("lifecycle");
    assert_eq!(
        l.max_runtime,
        Some(std::time::Duration::from_secs(8 * 3600))
    );
    let s = l.schedule.as_ref().expect("schedule");
    assert_eq!(
        (s.start.as_str(), s.stop.as_str()),
        ("0 8 * * 1-5", "0 20 * * 1-5")
    );

    let plain = parse_job("plain.yaml", &with_lifecycle("")).expect("valid");
    assert_eq!(plain.spec.lifecycle, None);
    assert_ne!(job.version_hash(), plain.version_hash());
    let longer = parse_job("longer.yaml", &text.replace("8h", "9h")).expect("valid");
    assert_ne!(job.version_hash(), longer.version_hash());
    let only_max = parse_job(
        "max.yaml",
        &with_lifecycle("  lifecycle: {maxRuntime: 90m}\n"),
    )
    .expect("valid");
    assert_ne!(only_max.version_hash(), plain.version_hash());
    // Round trip through the manifest form.
    let again = novacron_core::manifest::Job::from_manifest("again", job.to_manifest())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(again.version_hash(), job.version_hash());
}

#[test]
fn lifecycle_errors_name_the_line_field_value_and_what_is_accepted() {
    let cases = [
        (
            "  lifecycle:\n    schedule: {start: \"0 8 * *\", stop: \"0 20 * * 1-5\"}\n",
            "nightly.yaml:9:",
            "spec.lifecycle.schedule.start: \"0 8 * *\" has 4 fields; expected a 5-field cron expression",
        ),
        (
            "  lifecycle:\n    schedule:\n      start: \"0 8 * * 1-5\"\n      stop: \"0 25 * * *\"\n",
            "nightly.yaml:11:",
            "spec.lifecycle.schedule.stop: \"0 25 * * *\" is not a cron expression",
        ),
        (
            "  lifecycle:\n    schedule: {start: \"0 8 * * *\", stop: \"0  8 * * *\"}\n",
            "nightly.yaml:9:",
            "spec.lifecycle.schedule.stop: \"0  8 * * *\" is the same as start",
        ),
        (
            "  lifecycle:\n    maxRuntime: 0s\n",
            "nightly.yaml:9:",
            "spec.lifecycle.maxRuntime: 0s is too short; expected a duration of at least 1s",
        ),
        (
            "  lifecycle:\n    maxRuntime: 8 hours please\n",
            "nightly.yaml:9:",
            "is not a duration",
        ),
        (
            "  lifecycle:\n    schedule: {start: \"0 8 * * *\"}\n",
            "nightly.yaml:9:",
            "missing required field `stop`",
        ),
        (
            "  lifecycle:\n    maxRuntme: 8h\n",
            "nightly.yaml:9:",
            "maxRuntme",
        ),
    ];
    for (lines, at, fragment) in cases {
        let e = parse_job("nightly.yaml", &with_lifecycle(lines))
            .expect_err(lines)
            .to_string();
        assert!(e.starts_with(at), "{lines}: {e}");
        assert!(e.contains(fragment), "{lines}: {e}");
    }
    // A cron error also says what is accepted.
    let e = parse_job(
        "nightly.yaml",
        &with_lifecycle("  lifecycle:\n    schedule: {start: nope, stop: \"0 20 * * *\"}\n"),
    )
    .expect_err("bad cron")
    .to_string();
    assert!(e.contains("like 0 8 * * 1-5"), "{e}");
}

#[test]
fn disk_is_a_resource_and_only_a_disk_request_changes_the_version_hash() {
    let text = |resources: &str| {
        format!(
            "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {{name: pinned}}\nspec:\n  task: {{image: busybox}}\n  resources: {{{resources}}}\n"
        )
    };
    let plain = parse_job("a.yaml", &text("cpu: 1, memory: 64Mi")).expect("valid");
    let zero = parse_job("a.yaml", &text("cpu: 1, memory: 64Mi, disk: 0")).expect("valid");
    let disk = parse_job("a.yaml", &text("cpu: 1, memory: 64Mi, disk: 1Gi")).expect("valid");
    assert_eq!(plain.spec.resources.disk, ByteSize(0));
    assert_eq!(disk.spec.resources.disk, ByteSize(1 << 30));
    assert_eq!(plain.version_hash(), zero.version_hash());
    assert_ne!(plain.version_hash(), disk.version_hash());
    let bad = parse_job("a.yaml", &text("cpu: 1, memory: 64Mi, disk: 1XB")).expect_err("bad size");
    assert!(bad.to_string().contains("spec.resources.disk"), "{bad}");
}

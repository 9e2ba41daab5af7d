//! CLI habits from kubectl and nomad (issue 15, point 3) against a real controller
//! and the `novacron` binary as an operator types it: output formats (`-o wide`,
//! `-o name`, `-o jsonpath=`), `apply -f -`, `apply -f DIR`, multi-document files,
//! and `job scale`.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use novacron_tests::{Controller, bin, service_job};

async fn controller() -> (tempfile::TempDir, Controller) {
    let dir = tempfile::Builder::new()
        .prefix("novacron-cli-habits-")
        .tempdir()
        .expect("tempdir");
    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    (dir, c)
}

/// Runs `novacron ARGS` and returns its standard output; fails the test with
/// its standard error unless it succeeded.
fn ok(c: &Controller, args: &[&str]) -> String {
    let out = c.cli(args);
    text(args, out)
}

fn text(args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "novacron {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

/// `novacron ARGS` with `stdin` on its standard input.
fn with_stdin(c: &Controller, args: &[&str], stdin: &str) -> String {
    c.cli(&["version"]); // writes the context file
    let config = c.data_dir.with_file_name("cli-config.toml");
    let mut child = Command::new(bin("novacron"))
        .arg("--config")
        .arg(&config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("novacron runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    text(args, child.wait_with_output().expect("novacron ends"))
}

fn job(name: &str, replicas: u32) -> String {
    service_job(name, replicas, "sleep 3600", "", "")
}

#[tokio::test]
async fn output_formats_wide_name_and_jsonpath() {
    let (dir, c) = controller().await;
    let file = dir.path().join("two.yaml");
    // Two Job documents in one file, with a comment-only document between them.
    std::fs::write(
        &file,
        format!(
            "{}---\n# nothing here\n---\n{}",
            job("alpha", 1),
            job("beta", 2)
        ),
    )
    .expect("write");
    let applied = ok(&c, &["apply", "-f", file.to_str().expect("path")]);
    assert_eq!(
        applied,
        "job alpha created (version 1)\njob beta created (version 1)\n"
    );

    // The default table is unchanged; wide adds columns.
    let table = ok(&c, &["job", "list"]);
    let header = table.lines().next().expect("header");
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        [
            "NAME", "TYPE", "STATUS", "VERSION", "REPLICAS", "RUNNING", "HEALTHY", "MESSAGE"
        ]
    );
    let wide = ok(&c, &["job", "list", "-o", "wide"]);
    let header = wide.lines().next().expect("header");
    for column in ["STABLE", "MANIFEST", "SCALED BY", "SUBMITTED", "BY"] {
        assert!(header.contains(column), "{header}");
    }
    assert!(wide.contains("admin:admin"), "the submitter: {wide}");

    let names = ok(&c, &["job", "list", "-o", "name"]);
    assert_eq!(names, "job/alpha\njob/beta\n");
    for query in ["{[*].name}", "{$[*].name}", "$[*].name"] {
        let got = ok(&c, &["job", "list", "-o", &format!("jsonpath={query}")]);
        assert_eq!(got, "alpha\nbeta\n", "{query}");
    }
    let got = ok(
        &c,
        &["-o", "jsonpath=$[?@.replicas > 1].name", "job", "list"],
    );
    assert_eq!(got, "beta\n");
    let got = ok(
        &c,
        &[
            "job",
            "status",
            "beta",
            "-o",
            "jsonpath={.summary.replicas}",
        ],
    );
    assert_eq!(got, "2\n");
    let got = ok(
        &c,
        &[
            "job",
            "list",
            "-o",
            "template={% for j in items %}{{ j.name }}:{{ j.replicas }}\n{% endfor %}",
        ],
    );
    assert_eq!(got, "alpha:1\nbeta:2\n");
    let got = ok(
        &c,
        &["job", "status", "beta", "-o", "template={{ summary.name }}"],
    );
    assert_eq!(got, "beta");

    // No agents: no nodes and no allocations, and empty lists print nothing.
    assert_eq!(ok(&c, &["node", "list", "-o", "name"]), "");
    assert_eq!(ok(&c, &["alloc", "list", "-o", "name"]), "");
    let wide = ok(&c, &["node", "list", "-o", "wide"]);
    assert!(
        wide.contains("ADDRESS") && wide.contains("LABELS"),
        "{wide}"
    );

    // A bad format or query is a usage error naming what is accepted.
    let out = c.cli(&["job", "list", "-o", "xml"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("jsonpath=EXPR"), "{err}");
    let out = c.cli(&["job", "list", "-o", "jsonpath=$["]);
    assert_eq!(out.status.code(), Some(2));
    // -o name has no meaning for one object's detail.
    let out = c.cli(&["job", "status", "beta", "-o", "name"]);
    assert!(!out.status.success());
}

#[tokio::test]
async fn apply_from_stdin_and_from_a_directory() {
    let (dir, c) = controller().await;
    let got = with_stdin(&c, &["apply", "-f", "-"], &job("fromstdin", 1));
    assert_eq!(got, "job fromstdin created (version 1)\n");

    let jobs = dir.path().join("jobs");
    std::fs::create_dir(&jobs).expect("mkdir");
    std::fs::write(jobs.join("b.yml"), job("bravo", 1)).expect("write");
    std::fs::write(jobs.join("a.yaml"), job("alfa", 1)).expect("write");
    std::fs::write(jobs.join("notes.txt"), "not a manifest").expect("write");
    std::fs::create_dir(jobs.join("nested")).expect("mkdir");
    std::fs::write(jobs.join("nested/c.yaml"), job("charlie", 1)).expect("write");
    let got = ok(
        &c,
        &["apply", "-f", jobs.to_str().expect("path"), "-o", "name"],
    );
    assert_eq!(got, "job/alfa\njob/bravo\n");
    assert_eq!(
        ok(&c, &["job", "list", "-o", "name"]),
        "job/alfa\njob/bravo\njob/fromstdin\n"
    );

    // Applying the same directory again changes nothing.
    let got = ok(&c, &["apply", "-f", jobs.to_str().expect("path")]);
    assert_eq!(
        got,
        "job alfa unchanged (version 1)\njob bravo unchanged (version 1)\n"
    );

    // An error in the second document of a file names its line in the file.
    let file = dir.path().join("bad.yaml");
    let bad = job("delta", 1).replace("replicas: 1", "replicas: lots");
    std::fs::write(&file, format!("{}---\n{}", job("echo", 1), bad)).expect("write");
    let out = c.cli(&["apply", "-f", file.to_str().expect("path")]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "job echo created (version 1)\n"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let line = format!("{}---\n", job("echo", 1)).lines().count() + 1 + 6;
    assert!(
        err.contains(&format!("bad.yaml:{line}:13: spec.replicas")),
        "line {line}: {err}"
    );

    // An empty directory is refused.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let out = c.cli(&["apply", "-f", empty.to_str().expect("path")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no *.yaml or *.yml files"));
}

#[tokio::test]
async fn job_scale_reapplies_the_manifest_with_new_replicas() {
    let (dir, c) = controller().await;
    let file = dir.path().join("web.yaml");
    let manifest = format!("# the web tier\n{}", job("web", 2));
    std::fs::write(&file, &manifest).expect("write");
    ok(&c, &["apply", "-f", file.to_str().expect("path")]);

    let got = ok(&c, &["job", "scale", "web", "5"]);
    assert_eq!(got, "job web scaled to 5: updated (version 2)\n");
    let detail = c.job("web").await.expect("job");
    assert_eq!(detail.summary.replicas, 5);
    assert_eq!(detail.summary.version, 2);
    // Only the replicas changed; the comment stays.
    assert_eq!(
        detail.manifest,
        manifest.replace("replicas: 2", "replicas: 5")
    );

    let out = c.cli(&["job", "scale", "nope", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}

/// `novacron --config CONFIG ARGS` run in `cwd`.
fn novacron_in(cwd: &std::path::Path, config: &std::path::Path, args: &[&str]) -> Output {
    Command::new(bin("novacron"))
        .current_dir(cwd)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("novacron runs")
}

#[tokio::test]
async fn context_add_set_and_delete() {
    let (dir, c) = controller().await;
    let config = dir.path().join("ops/config.toml");
    let pki = c.data_dir.join("pki");
    let api = c.api();
    let run = |args: &[&str]| novacron_in(&pki, &config, args);
    let ok_run = |args: &[&str]| text(args, run(args));

    // Relative paths are taken from the current directory and stored absolute.
    let got = ok_run(&[
        "context",
        "add",
        "prod",
        "--api",
        &api,
        "--ca",
        "ca.pem",
        "--cert",
        "admin.pem",
        "--key",
        "admin-key.pem",
    ]);
    assert_eq!(got, "added context \"prod\" (current)\n");
    assert_eq!(
        ok_run(&["context", "show", "-o", "jsonpath={.ca}"]),
        format!("{}\n", pki.join("ca.pem").display())
    );
    // The new context reaches the real controller.
    assert_eq!(ok_run(&["job", "list", "-o", "name"]), "");

    let token = dir.path().join("token");
    std::fs::write(&token, "nca_not_a_real_token\n").expect("token");
    let got = ok_run(&[
        "context",
        "add",
        "staging",
        "--api",
        "https://127.0.0.1:1",
        "--ca",
        "ca.pem",
        "--token-file",
        token.to_str().expect("path"),
    ]);
    assert_eq!(got, "added context \"staging\"\n");
    assert_eq!(
        ok_run(&["context", "list", "-o", "name"]),
        "context/prod\ncontext/staging\n"
    );

    // The same name again, a missing file, or both a token and a certificate, are refused.
    let out = run(&[
        "context",
        "add",
        "prod",
        "--api",
        &api,
        "--ca",
        "ca.pem",
        "--token-file",
        "ca.pem",
    ]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    let out = run(&[
        "context",
        "add",
        "x",
        "--api",
        &api,
        "--ca",
        "nope.pem",
        "--token-file",
        "ca.pem",
    ]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.pem"));
    let out = run(&["context", "add", "x", "--api", &api, "--ca", "ca.pem"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "neither a certificate nor a token"
    );
    let out = run(&[
        "context",
        "add",
        "x",
        "--api",
        "http://insecure",
        "--ca",
        "ca.pem",
        "--token-file",
        "ca.pem",
    ]);
    assert_eq!(out.status.code(), Some(2), "not https");

    // set (or use) selects; delete keeps the current one unless --force.
    assert_eq!(
        ok_run(&["context", "set", "staging"]),
        "switched to context \"staging\"\n"
    );
    let out = run(&["context", "delete", "staging"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("current context"));
    ok_run(&["context", "use", "prod"]);
    assert_eq!(
        ok_run(&["context", "delete", "staging"]),
        "deleted context \"staging\"\n"
    );
    assert_eq!(
        ok_run(&["context", "delete", "prod", "--force"]),
        "deleted context \"prod\"; no context is current now\n"
    );
    assert_eq!(ok_run(&["context", "list", "-o", "name"]), "");
    let out = run(&["context", "delete", "prod"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no context named"));
}

#[tokio::test]
async fn apply_o_name_names_pools_and_templates() {
    // No jobs here: an empty pool with nothing to place stays empty.
    let (dir, c) = controller().await;
    let file = dir.path().join("pool.yaml");
    std::fs::write(
        &file,
        "apiVersion: novacron.io/v1
kind: NodeTemplate
metadata: {name: habits-t}
spec:
  instanceType: container-small
  provider: docker
  capacityType: spot
  pricePerHour: 0.25
  resources: {cpu: 2, memory: 2Gi}
---
apiVersion: novacron.io/v1
kind: NodePool
metadata:
  name: habits
  labels: {docker.image: \"novacron-fleet:never-started\"}
spec:
  templateRef: habits-t
  minSize: 0
  maxSize: 1
",
    )
    .expect("write");
    let got = ok(
        &c,
        &["apply", "-f", file.to_str().expect("path"), "-o", "name"],
    );
    assert_eq!(got, "nodetemplate/habits-t\nnodepool/habits\n");
    assert_eq!(ok(&c, &["pool", "list", "-o", "name"]), "pool/habits\n");
}

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

/// `novacron ARGS` spawned with piped standard output (not a terminal).
fn spawn_cli(c: &Controller, args: &[&str]) -> tokio::process::Child {
    spawn_cli_logging(c, args, "")
}

/// [`spawn_cli`] with `RUST_LOG=log`.
fn spawn_cli_logging(c: &Controller, args: &[&str], log: &str) -> tokio::process::Child {
    c.cli(&["version", "--client"]); // writes the context file
    let config = c.data_dir.with_file_name("cli-config.toml");
    tokio::process::Command::new(bin("novacron"))
        .env("RUST_LOG", log)
        .arg("--config")
        .arg(&config)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("novacron runs")
}

/// The next line of `lines`, within a minute.
async fn next_line(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
) -> String {
    tokio::time::timeout(std::time::Duration::from_secs(60), lines.next_line())
        .await
        .expect("a line within a minute")
        .expect("read")
        .expect("not the end of the output")
}

/// Reads lines until one lists the jobs `want`; each line must differ from the
/// one before it (a line per change: a job's status may change on its own).
async fn until_names(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    last: &mut String,
    want: &[&str],
) {
    loop {
        let line = next_line(lines).await;
        assert_ne!(&line, last, "a document repeats the one before it");
        *last = line;
        if job_names(last) == want {
            return;
        }
    }
}

fn job_names(line: &str) -> Vec<String> {
    let jobs: serde_json::Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("each line is one JSON document ({e}): {line}"));
    jobs.as_array()
        .unwrap_or_else(|| panic!("a list: {line}"))
        .iter()
        .map(|j| j["name"].as_str().expect("name").to_string())
        .collect()
}

/// `--watch -o json` off a terminal: one JSON document per line and per change,
/// no screen header; a change shows although the bound between reads is 5
/// minutes (the blocking query answers it, not a timer); a closed pipe and
/// Ctrl-C end the watch with 0.
#[tokio::test]
async fn watch_emits_one_json_document_per_change_from_blocking_queries() {
    use tokio::io::AsyncBufReadExt;
    let (_dir, c) = controller().await;
    // Its requests are logged (RUST_LOG=debug), to count them.
    let mut child = spawn_cli_logging(
        &c,
        &["-o", "json", "job", "list", "--watch", "5m"],
        "novacron_cli=debug",
    );
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut last = next_line(&mut lines).await;
    assert_eq!(job_names(&last), Vec::<String>::new());

    c.apply("a.yaml", &job("watch-a", 1)).await.expect("apply");
    until_names(&mut lines, &mut last, &["watch-a"]).await;
    // The same manifest again changes nothing the list shows (the store moves:
    // the event log records the apply), so no line repeats the last one.
    let again = c.apply("a.yaml", &job("watch-a", 1)).await.expect("apply");
    assert_eq!(again["outcome"], "unchanged");
    // A change after a longer wait: the frame is read again at once for
    // current ages, and that read must not wait for yet another change.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    c.apply("b.yaml", &job("watch-b", 2)).await.expect("apply");
    until_names(&mut lines, &mut last, &["watch-a", "watch-b"]).await;

    // The reader goes away while the watch waits for a change: it ends, quietly.
    drop(lines);
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("ends once its reader is gone, without a change")
        .expect("output");
    assert_eq!(out.status.code(), Some(0), "{:?}", out.status);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("error"), "{log}");
    // Each read after the first waited in a blocking query: a handful of
    // requests for three changes (a polling loop would have made hundreds).
    let gets: Vec<&str> = log.lines().filter(|l| l.contains("GET")).collect();
    assert!(gets.len() >= 3 && gets.len() <= 20, "{log}");
    assert!(
        gets.iter().filter(|l| l.contains("index=")).count() >= 2,
        "{log}"
    );

    // Ctrl-C ends a watch with 0 too; a table off a terminal has no header.
    let mut child = spawn_cli(&c, &["alloc", "list", "--watch"]);
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let header = next_line(&mut lines).await;
    assert!(header.starts_with("ID "), "no screen header: {header}");
    let pid = child.id().expect("pid").to_string();
    let sent = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    let status = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait())
        .await
        .expect("ends after Ctrl-C")
        .expect("status");
    assert_eq!(status.code(), Some(0));

    // On a terminal (script(1) gives it one) the table is redrawn under a
    // header naming the command.
    let config = c.data_dir.with_file_name("cli-config.toml");
    let line = format!(
        "timeout -s INT 3 {} --config {} job list --watch",
        bin("novacron").display(),
        config.display()
    );
    let screen = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script runs");
    let screen = String::from_utf8_lossy(&screen.stdout);
    assert!(screen.contains("\x1b[H\x1b[2J"), "redrawn: {screen:?}");
    assert!(screen.contains("job list --watch"), "{screen:?}");
    assert!(
        screen.contains("NAME") && screen.contains("watch-b"),
        "{screen:?}"
    );

    // The events list watches too; a command that cannot be redrawn is refused.
    let mut child = spawn_cli(&c, &["-o", "json", "events", "--type", "job", "--watch"]);
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let first: serde_json::Value =
        serde_json::from_str(&next_line(&mut lines).await).expect("json");
    let before = first.to_string().matches("job.applied").count();
    c.apply("c.yaml", &job("watch-c", 1)).await.expect("apply");
    let second: serde_json::Value =
        serde_json::from_str(&next_line(&mut lines).await).expect("json");
    assert!(
        second.to_string().matches("job.applied").count() > before,
        "{second}"
    );
    drop(child);
    let refused = c.cli(&["job", "stop", "watch-a", "--watch"]);
    assert_eq!(refused.status.code(), Some(2));
}

/// `job history` lists the stored versions with who, when and what changed;
/// `job revert` submits one again as a new version.
#[tokio::test]
async fn job_history_and_revert() {
    let (dir, c) = controller().await;
    let v1 = job("hist", 1);
    let file = dir.path().join("hist.yaml");
    std::fs::write(&file, &v1).expect("write");
    ok(&c, &["apply", "-f", file.to_str().expect("path")]);
    ok(&c, &["job", "scale", "hist", "3"]);
    let v3 = job("hist", 3).replace("sleep 3600", "sleep 7200");
    std::fs::write(&file, &v3).expect("write");
    ok(&c, &["apply", "-f", file.to_str().expect("path")]);

    let table = ok(&c, &["job", "history", "hist"]);
    let rows: Vec<&str> = table.lines().collect();
    assert_eq!(rows.len(), 4, "{table}");
    assert!(
        rows[1].starts_with("3 ") && rows[1].contains("current"),
        "{table}"
    );
    assert!(rows[1].contains("admin:admin"), "{table}");
    assert!(rows[2].contains("spec.replicas"), "{table}");

    let versions: serde_json::Value =
        serde_json::from_str(&ok(&c, &["job", "history", "hist", "-o", "json"])).expect("json");
    let versions = versions.as_array().expect("list");
    assert_eq!(
        versions
            .iter()
            .map(|v| v["version"].as_u64().expect("version"))
            .collect::<Vec<_>>(),
        [3, 2, 1]
    );
    assert_eq!(
        versions[1]["changes"],
        serde_json::json!([{"path": "spec.replicas", "old": "1", "new": "3"}])
    );
    assert_eq!(versions[0]["changes"][0]["path"], "spec.task.command[2]");
    assert_eq!(versions[2]["manifest"], v1.as_str());

    let full = ok(&c, &["job", "history", "hist", "--changes"]);
    assert!(full.contains("~ spec.replicas: 1 -> 3"), "{full}");

    let got = ok(&c, &["job", "revert", "hist", "1"]);
    assert_eq!(got, "job hist reverted to version 1: updated (version 4)\n");
    let detail = c.job("hist").await.expect("job");
    assert_eq!(detail.manifest, v1);
    assert_eq!(detail.summary.version, 4);
    let history = ok(&c, &["job", "history", "hist", "--changes"]);
    assert!(
        history.contains("revert of job hist to version 1"),
        "{history}"
    );
    assert!(history.contains("~ spec.replicas: 3 -> 1"), "{history}");
    // Reverting to what runs changes nothing.
    let got = ok(&c, &["job", "revert", "hist", "4"]);
    assert_eq!(
        got,
        "job hist reverted to version 4: unchanged (version 4)\n"
    );

    let out = c.cli(&["job", "revert", "hist", "99"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no stored version 99; the kept versions are 1, 2, 3, 4"),
        "{err}"
    );
    let events = ok(
        &c,
        &[
            "events",
            "--job",
            "hist",
            "--type",
            "job.applied",
            "-o",
            "json",
        ],
    );
    assert!(events.contains("reverted to version 1"), "{events}");
}

/// `job plan` and `apply --dry-run` show the changed fields and where the real
/// scheduler would start replicas, and keep nothing; `alloc restart` replaces
/// an allocation through the reconciler, with an event.
#[tokio::test]
async fn plan_dry_run_and_alloc_restart_on_a_real_node() {
    novacron_tests::ensure_test_image().expect("test image");
    let (dir, c) = controller().await;
    let _agent = novacron_tests::Agent::join_and_run(dir.path(), &c, "habits-plan-1", &[])
        .await
        .expect("agent");
    c.wait_ready("habits-plan-1", std::time::Duration::from_secs(20))
        .await
        .expect("ready");
    let _cleanup = novacron_tests::JobCleanup("planned".into());
    assert_eq!(
        bash_complete(&c, &["node", "show", "habits-"]),
        ["habits-plan-1"]
    );
    let file = dir.path().join("planned.yaml");
    std::fs::write(&file, job("planned", 2)).expect("write");
    let path = file.to_str().expect("path");

    let plan = ok(&c, &["job", "plan", path]);
    assert!(
        plan.starts_with("job planned: would be created (version 1); nothing was applied\n"),
        "{plan}"
    );
    assert!(plan.contains("+ spec.task.image: "), "{plan}");
    assert_eq!(
        plan.matches("+ start version 1 on habits-plan-1").count(),
        2,
        "{plan}"
    );
    assert_eq!(
        ok(&c, &["job", "list", "-o", "name"]),
        "",
        "nothing applied"
    );

    ok(&c, &["apply", "-f", path]);
    std::fs::write(&file, job("planned", 3)).expect("write");
    let plan: serde_json::Value =
        serde_json::from_str(&ok(&c, &["apply", "--dry-run", "-f", path, "-o", "json"]))
            .expect("json");
    assert_eq!(plan["outcome"], "updated");
    assert_eq!(plan["current_version"], 1);
    assert_eq!(plan["version"], 2);
    assert_eq!(
        plan["changes"],
        serde_json::json!([{"path": "spec.replicas", "old": "2", "new": "3"}])
    );
    assert!(
        plan["placements"]
            .as_array()
            .expect("placements")
            .iter()
            .all(|p| p["node"] == "habits-plan-1" && p["version"] == 2),
        "{plan}"
    );
    assert_eq!(c.job("planned").await.expect("job").summary.version, 1);

    // What cannot be placed is said, with the scheduler's reason.
    std::fs::write(&file, job("planned", 2).replace("cpu: 100m", "cpu: 4000")).expect("write");
    let plan = ok(&c, &["job", "plan", path]);
    assert!(
        plan.contains("~ spec.resources.cpu: 100m -> 4000"),
        "{plan}"
    );
    assert!(plan.contains("cannot be placed: "), "{plan}");
    assert!(plan.contains("cpu"), "{plan}");
    // Only Job manifests are planned.
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: novacron.io/v1\nkind: AutoScalingPolicy\nmetadata: {name: p}\n",
    )
    .expect("write");
    let out = c.cli(&["apply", "--dry-run", "-f", policy.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(2));

    // alloc restart: the allocation stops and the job gets a fresh one.
    let running = || {
        let list: serde_json::Value = serde_json::from_str(&ok(
            &c,
            &["alloc", "list", "--job", "planned", "-o", "json"],
        ))
        .expect("json");
        list.as_array()
            .expect("list")
            .iter()
            .filter(|a| a["state"] == "running" && a["desired_run"] == true)
            .map(|a| a["id"].as_str().expect("id").to_string())
            .collect::<Vec<_>>()
    };
    novacron_tests::wait_for(std::time::Duration::from_secs(60), "2 running", || async {
        running().len() == 2
    })
    .await
    .expect("running");
    let before = running();
    let id = before[0].clone();
    let mut offered = bash_complete(&c, &["alloc", "restart", "planned-"]);
    offered.sort();
    let mut want = before.clone();
    want.sort();
    assert_eq!(offered, want, "the allocations are offered");
    let got = ok(&c, &["alloc", "restart", &id]);
    assert_eq!(
        got,
        format!(
            "alloc {id} restarting: it stops on habits-plan-1 and job planned gets a fresh allocation\n"
        )
    );
    novacron_tests::wait_for(
        std::time::Duration::from_secs(60),
        "a replacement running",
        || async {
            let now = running();
            now.len() == 2 && !now.contains(&id) && now.contains(&before[1])
        },
    )
    .await
    .expect("replaced");
    let events = ok(
        &c,
        &[
            "events",
            "--alloc",
            &id,
            "--type",
            "alloc.restarted",
            "-o",
            "json",
        ],
    );
    assert!(events.contains("restarting"), "{events}");
    assert!(events.contains("admin:admin"), "{events}");
    // An allocation no longer wanted has nothing to restart.
    let out = c.cli(&["alloc", "restart", &id]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing to restart"), "{err}");
    ok(&c, &["job", "stop", "planned"]);
}

/// What bash completes for the last of `words` (a command line after
/// `novacron`), through the script `COMPLETE=bash novacron` prints, against
/// the controller of the context file `c.cli` writes.
fn bash_complete(c: &Controller, words: &[&str]) -> Vec<String> {
    c.cli(&["version", "--client"]); // writes the context file
    let config = c.data_dir.with_file_name("cli-config.toml");
    let novacron = bin("novacron");
    let mut all = vec!["novacron"];
    all.extend_from_slice(words);
    let quoted: Vec<String> = all.iter().map(|w| format!("'{w}'")).collect();
    let script = format!(
        "source <(COMPLETE=bash '{bin}')\n\
         COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_TYPE=9\n\
         _clap_complete_novacron novacron '{cur}' '{prev}'\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        bin = novacron.display(),
        words = quoted.join(" "),
        cword = all.len() - 1,
        cur = all[all.len() - 1],
        prev = all[all.len() - 2],
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("NOVACRON_CONFIG", &config)
        .env_remove("NOVACRON_TOKEN")
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// Dynamic completion in bash offers the controller's job names where a job
/// is expected; the static scripts `completion SHELL` prints stay available.
#[tokio::test]
async fn bash_completes_job_names_from_the_controller() {
    let (_dir, c) = controller().await;
    for name in ["comp-alpha", "comp-beta", "other"] {
        c.apply("j.yaml", &job(name, 1)).await.expect("apply");
    }
    assert_eq!(
        bash_complete(&c, &["job", "status", "comp-"]),
        ["comp-alpha", "comp-beta"]
    );
    assert_eq!(bash_complete(&c, &["job", "history", "ot"]), ["other"]);
    assert_eq!(
        bash_complete(&c, &["events", "--job", "comp-b"]),
        ["comp-beta"]
    );
    // Subcommands still complete.
    assert!(bash_complete(&c, &["job", "rev"]).contains(&"revert".to_string()));
    for shell in ["bash", "zsh", "fish"] {
        let script = ok(&c, &["completion", shell]);
        assert!(script.contains("novacron"), "{shell}");
    }
}

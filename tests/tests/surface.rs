//! The operator-grade surface (issue 15) against the real binaries:
//! - JSON logs,
//! - the `/livez` and `/readyz` probes and `WWW-Authenticate` on 401,
//! - a CLI whose standard output closes early and `novacron version`,
//! - a join refused on trust,
//! - `admin issue --out` into a missing directory,
//! - SIGHUP ends neither the controller nor the agent.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use novacron_tests::{Agent, Controller, bin, wait_for};
use reqwest::StatusCode;

async fn controller(prefix: &str, serve_args: &[&str]) -> (tempfile::TempDir, Controller) {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir");
    let c = Controller::start(dir.path(), serve_args)
        .await
        .expect("controller");
    (dir, c)
}

/// Every non-empty line of `log` is one JSON object with a level and a message.
fn assert_json_lines(what: &str, log: &str) {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "{what} logged nothing");
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{what}: not one JSON object per line ({e}): {line}"));
        assert!(v["level"].is_string(), "{what}: no level: {line}");
        assert!(
            v["fields"]["message"].is_string(),
            "{what}: no message: {line}"
        );
        assert!(v["timestamp"].is_string(), "{what}: no timestamp: {line}");
    }
}

#[tokio::test]
async fn log_format_json_writes_one_object_per_line_and_text_has_no_colour_off_a_terminal() {
    let (dir, c) = controller("novacron-surface-log-", &["--log-format", "json"]).await;
    // The agent takes its format from its configuration file.
    let agent_file = dir.path().join("agent.toml");
    std::fs::write(&agent_file, "log_format = \"json\"\n").expect("agent file");
    let file_arg = agent_file.to_string_lossy().into_owned();
    let agent = Agent::join_and_run(dir.path(), &c, "logs-1", &["--config", &file_arg])
        .await
        .expect("agent");
    wait_for(Duration::from_secs(15), "the agent to connect", || async {
        c.node("logs-1")
            .await
            .ok()
            .flatten()
            .is_some_and(|n| n.status == novacron_common::fleet::NodeStatus::Ready)
    })
    .await
    .expect("agent ready");
    let controller_log =
        std::fs::read_to_string(dir.path().join("controller-1.log")).expect("controller log");
    assert_json_lines("the controller", &controller_log);
    assert!(
        controller_log.contains("\"controller serving\""),
        "{controller_log}"
    );
    assert_json_lines("the agent", &agent.log());

    // Text (the default) to a file: no ANSI escapes.
    let (plain_dir, _plain) = controller("novacron-surface-text-", &[]).await;
    let text = std::fs::read_to_string(plain_dir.path().join("controller-1.log")).expect("log");
    assert!(text.contains("controller serving"), "{text}");
    assert!(!text.contains('\u{1b}'), "colour off a terminal: {text:?}");

    // A bad format is bad configuration, named with what is accepted.
    let out = c.ctl(&["serve", "--log-format", "xml"]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--log-format") && err.contains("text or json"),
        "{err}"
    );
}

#[tokio::test]
async fn probes_answer_without_credentials_and_every_401_carries_a_challenge() {
    let (_dir, c) = controller("novacron-surface-probes-", &[]).await;
    let anon = c.anonymous_client();
    for (path, body) in [("/livez", "ok"), ("/readyz", "ready"), ("/healthz", "ok")] {
        let resp = anon
            .get(format!("{}{path}", c.api()))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert_eq!(resp.text().await.expect("body"), body, "{path}");
    }
    for (path, token) in [
        ("/v1/nodes", None),
        ("/v1/nodes", Some("not-a-token")),
        ("/v1/version", None),
    ] {
        let mut req = anon.get(format!("{}{path}", c.api()));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("send");
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(
            resp.headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer realm=\"novacron\""),
            "{path}"
        );
    }
    let doc: serde_json::Value = c
        .admin_client()
        .expect("admin")
        .get(format!("{}/v1/openapi.json", c.api()))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    for path in ["/livez", "/readyz", "/healthz", "/v1/version"] {
        assert!(doc["paths"].get(path).is_some(), "{path} not documented");
    }
}

/// Runs the CLI against `c` with its standard output closed before it writes.
fn cli_into_closed_pipe(c: &Controller, args: &[&str]) -> std::process::Output {
    // `Controller::cli` writes the context file on first use.
    assert!(c.cli(&["context", "show"]).status.success());
    let config = c.data_dir.with_file_name("cli-config.toml");
    let mut child = Command::new(bin("novacron"))
        .arg("--config")
        .arg(&config)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("novacron runs");
    // The reader goes away before the CLI has connected, so its first write fails.
    drop(child.stdout.take());
    child.wait_with_output().expect("waits")
}

#[tokio::test]
async fn a_closed_pipe_ends_the_cli_quietly_and_version_names_both_builds() {
    let (dir, c) = controller("novacron-surface-cli-", &[]).await;
    let _agent = Agent::join_and_run(dir.path(), &c, "pipe-1", &[])
        .await
        .expect("agent");
    for args in [
        &["node", "list"][..],
        &["-o", "json", "node", "list"],
        &["-o", "yaml", "node", "list"],
        &["completion", "bash"],
    ] {
        let out = cli_into_closed_pipe(&c, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(err.is_empty(), "{args:?} wrote to stderr: {err}");
    }

    let out = c.cli(&["version"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let version = env!("CARGO_PKG_VERSION");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with(&format!("client: {version} (commit ")),
        "{text}"
    );
    assert!(
        lines[1].starts_with(&format!("server: {version} (commit ")),
        "{text}"
    );
    let out = c.cli(&["-o", "json", "version"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["server"]["version"], version);
    assert!(v["server"]["commit"].is_string(), "{v}");

    // --client needs no controller and no context.
    let out = Command::new(bin("novacron"))
        .args([
            "--config",
            "/nonexistent/novacron.toml",
            "version",
            "--client",
        ])
        .output()
        .expect("runs");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&format!("client: {version} ")),
        "{out:?}"
    );
}

#[tokio::test]
async fn join_with_a_wrong_fingerprint_fails_on_trust_with_its_own_exit_code() {
    let (dir, c) = controller("novacron-surface-trust-", &[]).await;
    let token = c.token(1).expect("token");
    let state = dir.path().join("agent-untrusted");
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let out = Command::new(bin("novacron-agent"))
        .args(["join", "--controller", &c.api(), "--token", &token])
        .args(["--ca-fingerprint", &wrong, "--name", "untrusted"])
        .arg("--state-dir")
        .arg(&state)
        .output()
        .expect("novacron-agent runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(76), "{err}");
    assert!(
        err.contains("is not trusted") && err.contains(&wrong) && !err.contains("cannot reach"),
        "{err}"
    );
    assert!(!state.exists(), "nothing is written on a failed join");
    // With the right pin, the certificate is still checked for a name:
    // `--server-name` replaces the URL's host, and a name the certificate
    // does not hold is refused before the token is sent.
    let out = Command::new(bin("novacron-agent"))
        .args(["join", "--controller", &c.api(), "--token", &token])
        .args(["--ca-fingerprint", &c.fingerprint, "--name", "misnamed"])
        .args(["--server-name", "elsewhere.example"])
        .arg("--state-dir")
        .arg(dir.path().join("agent-misnamed"))
        .output()
        .expect("novacron-agent runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(76), "{err}");
    assert!(err.contains("elsewhere.example"), "{err}");
    // The token was never sent, so it still enrolls a node with the right pin.
    let ok = novacron_tests::join(&c, &token, "trusted", &dir.path().join("agent-trusted"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let help = Command::new(bin("novacron-agent"))
        .args(["join", "--help"])
        .output()
        .expect("runs");
    assert!(String::from_utf8_lossy(&help.stdout).contains("76  join"));
}

#[tokio::test]
async fn admin_issue_creates_a_missing_out_directory_privately() {
    let (dir, c) = controller("novacron-surface-issue-", &[]).await;
    let out_dir = dir.path().join("creds/alice");
    let out = c.ctl(&[
        "admin",
        "issue",
        "--name",
        "alice",
        "--out",
        &out_dir.to_string_lossy(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = std::fs::metadata(&out_dir)
        .expect("created")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
    assert!(out_dir.join("alice.pem").exists());
    let key_mode = std::fs::metadata(out_dir.join("alice-key.pem"))
        .expect("key")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600);

    // An existing directory keeps its mode.
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("dir");
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = c.ctl(&[
        "admin",
        "issue",
        "--name",
        "bob",
        "--out",
        &shared.to_string_lossy(),
    ]);
    assert!(out.status.success());
    let mode = std::fs::metadata(&shared)
        .expect("dir")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o755);
}

/// Issue 15: SIGHUP (an operator's habit, or a closing terminal) does not end
/// either daemon: each logs that it does not reload and keeps serving.
#[tokio::test]
async fn sighup_ends_neither_the_controller_nor_the_agent() {
    let (dir, mut c) = controller("novacron-surface-hup-", &[]).await;
    let mut agent = Agent::join_and_run(dir.path(), &c, "hup-1", &[])
        .await
        .expect("agent");
    c.wait_ready("hup-1", Duration::from_secs(15))
        .await
        .expect("agent ready");
    let hup = |pid: u32| {
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -HUP {pid}");
    };
    hup(c.pid().expect("controller pid"));
    hup(agent
        .child
        .as_ref()
        .and_then(|ch| ch.id())
        .expect("agent pid"));
    let controller_log = dir.path().join("controller-1.log");
    wait_for(
        Duration::from_secs(10),
        "both to log the SIGHUP",
        || async {
            let ctl = std::fs::read_to_string(&controller_log).unwrap_or_default();
            ctl.contains("SIGHUP received") && agent.log().contains("SIGHUP received")
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}\ncontroller:\n{}\nagent:\n{}",
            std::fs::read_to_string(&controller_log).unwrap_or_default(),
            agent.log()
        )
    });
    assert!(c.is_running(), "the controller ended on SIGHUP");
    assert!(
        agent
            .child
            .as_mut()
            .is_some_and(|ch| matches!(ch.try_wait(), Ok(None))),
        "the agent ended on SIGHUP"
    );
    // Both keep working: the API answers and the node stays ready.
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.wait_ready("hup-1", Duration::from_secs(10))
        .await
        .expect("the node is still ready after SIGHUP");
}

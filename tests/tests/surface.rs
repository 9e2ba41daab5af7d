//! The operator-grade surface (issue 15) against the real binaries:
//! - JSON logs,

use std::time::Duration;

use novacron_tests::{Agent, Controller, wait_for};

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
        assert!(v["fields"]["message"].is_string(), "{what}: no message: {line}");
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


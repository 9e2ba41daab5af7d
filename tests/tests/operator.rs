//! The operator surface end to end: roles, API tokens, the event log and
//! `novacron events --follow`, against a real controller process over HTTPS.

use std::process::Stdio;
use std::time::Duration;

use novacron_api::{Event, EventPage};
use novacron_tests::{Controller, bin, sleeper_manifest};
use reqwest::StatusCode;
use tokio::io::{AsyncBufReadExt, BufReader};

async fn controller(prefix: &str) -> (tempfile::TempDir, Controller) {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir");
    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    (dir, c)
}

/// `novacron-controller admin token`, returning the printed token.
fn api_token(c: &Controller, name: &str, role: &str) -> String {
    let out = c.ctl(&["admin", "token", "--name", name, "--role", role]);
    assert!(
        out.status.success(),
        "admin token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn apply_with(
    client: &reqwest::Client,
    c: &Controller,
    token: Option<&str>,
    job: &str,
) -> (StatusCode, serde_json::Value) {
    let mut req = client
        .post(format!("{}/v1/jobs", c.api()))
        .json(&serde_json::json!({ "file": "job.yaml", "manifest": sleeper_manifest(job) }));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status();
    let body = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

async fn events(c: &Controller, query: &str) -> EventPage {
    c.admin_client()
        .expect("admin")
        .get(format!("{}/v1/events?{query}", c.api()))
        .send()
        .await
        .expect("send")
        .error_for_status()
        .expect("status")
        .json()
        .await
        .expect("json")
}

#[tokio::test]
async fn unauthenticated_callers_are_refused_with_what_to_do() {
    let (_dir, c) = controller("novacron-op-anon-").await;
    let resp = c
        .anonymous_client()
        .get(format!("{}/v1/nodes", c.api()))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body: serde_json::Value = resp.json().await.expect("json");
    let msg = body["error"].as_str().expect("error text");
    assert!(
        msg.contains("admin issue") && msg.contains("admin token"),
        "{msg}"
    );

    // A garbage bearer token is refused with the expected shape.
    let resp = c
        .anonymous_client()
        .get(format!("{}/v1/nodes", c.api()))
        .bearer_auth("not-a-token")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert!(
        body["error"].as_str().unwrap_or("").contains("nca_"),
        "{body}"
    );
}

#[tokio::test]
async fn viewer_certificate_can_read_but_not_apply() {
    let (dir, c) = controller("novacron-op-viewer-").await;
    let out = c.ctl(&[
        "admin",
        "issue",
        "--name",
        "vera",
        "--role",
        "viewer",
        "--out",
        dir.path().to_str().expect("utf-8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let viewer = c
        .client_with(
            &dir.path().join("vera.pem"),
            &dir.path().join("vera-key.pem"),
        )
        .expect("client");
    let resp = viewer
        .get(format!("{}/v1/jobs", c.api()))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::OK);
    let (status, body) = apply_with(&viewer, &c, None, "web").await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("needs operator"),
        "{body}"
    );
    // Nothing was applied, so nothing was recorded.
    assert!(
        events(&c, "type=job")
            .await
            .events
            .iter()
            .all(|e| e.job.as_deref() != Some("web"))
    );
}

/// A purge needs the operator role, as a stop does, also for a job that is
/// stopped already (where the purge does no stop of its own).
#[tokio::test]
async fn a_viewer_cannot_purge_a_job() {
    let (_dir, c) = controller("novacron-op-purge-").await;
    let operator = api_token(&c, "ops", "operator");
    let viewer = api_token(&c, "dash", "viewer");
    let client = c.anonymous_client();
    let (status, body) = apply_with(&client, &c, Some(&operator), "kept").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let delete = |token: &str, purge: bool| {
        client
            .delete(format!(
                "{}/v1/jobs/kept{}",
                c.api(),
                if purge { "?purge=true" } else { "" }
            ))
            .bearer_auth(token.to_owned())
            .send()
    };
    let stop = delete(&operator, false).await.expect("send");
    assert_eq!(stop.status(), StatusCode::NO_CONTENT);
    let refused = delete(&viewer, true).await.expect("send");
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert!(c.job("kept").await.is_ok(), "a viewer purged the job");
    // The operator may (no node ran it: nothing is left to stop).
    let purged = delete(&operator, true).await.expect("send");
    assert_eq!(purged.status(), StatusCode::NO_CONTENT);
    assert!(c.job("kept").await.is_err(), "the job is still there");
}

#[tokio::test]
async fn api_tokens_authenticate_with_their_role_and_can_be_revoked() {
    let (_dir, c) = controller("novacron-op-token-").await;
    let operator = api_token(&c, "ci", "operator");
    let viewer = api_token(&c, "dash", "viewer");
    assert!(operator.starts_with("nca_"), "{operator}");
    let client = c.anonymous_client();

    let (status, body) = apply_with(&client, &c, Some(&operator), "api").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = apply_with(&client, &c, Some(&viewer), "api2").await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The applied job is an event whose actor is the token's identity.
    let page = events(&c, "type=job.applied&job=api").await;
    let applied: Vec<&Event> = page.events.iter().collect();
    assert_eq!(applied.len(), 1, "{applied:?}");
    assert_eq!(applied[0].actor, "operator:ci");

    // Revoking the token refuses it from then on.
    let list: serde_json::Value = c
        .admin_client()
        .expect("admin")
        .get(format!("{}/v1/api-tokens", c.api()))
        .send()
        .await
        .expect("send")
        .json()
        .await
        .expect("json");
    let id = list
        .as_array()
        .expect("array")
        .iter()
        .find(|t| t["name"] == "ci")
        .and_then(|t| t["id"].as_str())
        .expect("ci token listed")
        .to_string();
    assert!(
        !list.to_string().contains(&operator),
        "the list leaks secrets"
    );
    let resp = c
        .admin_client()
        .expect("admin")
        .post(format!("{}/v1/api-tokens/{id}/revoke", c.api()))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let (status, body) = apply_with(&client, &c, Some(&operator), "api").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        body["error"].as_str().unwrap_or("").contains("revoked"),
        "{body}"
    );
}

#[tokio::test]
async fn events_persist_across_restarts_and_filter() {
    let (_dir, mut c) = controller("novacron-op-events-").await;
    c.apply("a.yaml", &sleeper_manifest("alpha"))
        .await
        .expect("apply");
    c.apply("b.yaml", &sleeper_manifest("beta"))
        .await
        .expect("apply");
    let before = events(&c, "limit=1000").await;
    let last = before.events.last().expect("some events").seq;
    let alpha = events(&c, "job=alpha&type=job").await;
    assert_eq!(alpha.events.len(), 1);
    assert_eq!(alpha.events[0].kind, "job.applied");
    assert_eq!(alpha.events[0].actor, "admin:admin");

    c.stop().await;
    c.restart().await.expect("restart");
    let after = events(&c, "limit=1000").await;
    assert!(
        after
            .events
            .iter()
            .any(|e| e.job.as_deref() == Some("alpha")),
        "events survive the restart"
    );
    c.apply("c.yaml", &sleeper_manifest("gamma"))
        .await
        .expect("apply");
    let newer = events(&c, &format!("after={last}&type=job")).await;
    assert_eq!(newer.events.len(), 1, "{:?}", newer.events);
    assert!(
        newer.events[0].seq > last,
        "positions continue after a restart"
    );

    // A bad limit names the accepted range.
    let resp = c
        .admin_client()
        .expect("admin")
        .get(format!("{}/v1/events?limit=0", c.api()))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert!(
        body["error"].as_str().unwrap_or("").contains("1 to 1000"),
        "{body}"
    );
}

#[tokio::test]
async fn events_follow_streams_new_events_live_through_the_cli() {
    let (_dir, c) = controller("novacron-op-follow-").await;
    c.apply("old.yaml", &sleeper_manifest("old"))
        .await
        .expect("apply");
    // Make the CLI context, then follow with an API token from the environment
    // (overriding the context's certificate).
    let _ = c.cli(&["node", "list"]);
    let token = api_token(&c, "watcher", "viewer");
    let config = c.data_dir.with_file_name("cli-config.toml");
    let mut child = tokio::process::Command::new(bin("novacron"))
        .arg("--config")
        .arg(&config)
        .args(["events", "--follow", "--type", "job", "-o", "json"])
        .env("NOVACRON_TOKEN", &token)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let next = async |lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>| {
        let line = tokio::time::timeout(Duration::from_secs(15), lines.next_line())
            .await
            .expect("an event within 15 s")
            .expect("read")
            .expect("a line");
        serde_json::from_str::<Event>(&line).expect("one JSON event per line")
    };
    // The backlog first...
    let first = next(&mut lines).await;
    assert_eq!(first.job.as_deref(), Some("old"));
    // ...then what happens after the follower started.
    c.apply("new.yaml", &sleeper_manifest("fresh"))
        .await
        .expect("apply");
    let live = next(&mut lines).await;
    assert_eq!(live.job.as_deref(), Some("fresh"));
    assert_eq!(live.kind, "job.applied");
    let stop = c.cli(&["job", "stop", "fresh"]);
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    let stopped = next(&mut lines).await;
    assert_eq!(stopped.kind, "job.stopped");
    assert!(stopped.seq > live.seq);
    child.kill().await.expect("kill");
}

#[tokio::test]
async fn watch_redraws_until_interrupted_and_refuses_commands_it_cannot_redraw() {
    let (_dir, c) = controller("novacron-op-watch-").await;
    let _ = c.cli(&["node", "list"]);
    let config = c.data_dir.with_file_name("cli-config.toml");
    let child = tokio::process::Command::new(bin("novacron"))
        .arg("--config")
        .arg(&config)
        .args(["job", "list", "--watch", "300ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let pid = child.id().expect("pid").to_string();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A job applied while watching shows up in a later frame.
    c.apply("w.yaml", &sleeper_manifest("watched"))
        .await
        .expect("apply");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let sent = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("exits after Ctrl-C")
        .expect("output");
    assert!(out.status.success(), "{:?}", out.status);
    // Off a terminal each change is printed once, without a screen header.
    let text = String::from_utf8_lossy(&out.stdout);
    let frames: Vec<&str> = text
        .split("\n\n")
        .filter(|f| !f.trim().is_empty())
        .collect();
    assert!(frames.len() >= 2, "expected a frame per change:\n{text}");
    assert!(
        !text.contains("Every "),
        "no header off a terminal:\n{text}"
    );
    assert!(
        frames.last().is_some_and(|f| f.contains("watched")),
        "the last frame shows the new job:\n{text}"
    );

    let refused = c.cli(&["job", "stop", "watched", "--watch"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--watch works with"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[tokio::test]
async fn man_page_is_generated_from_the_command_line() {
    let out = std::process::Command::new(bin("novacron"))
        .arg("man")
        .output()
        .expect("runs");
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(
        page.starts_with(".ie") || page.contains(".TH novacron"),
        "{page}"
    );
    for sub in ["events", "exec", "apply", "completion"] {
        assert!(page.contains(sub), "the page lists {sub}");
    }
}

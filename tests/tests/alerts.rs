//! Alerting end to end: a real agent's container driven to high CPU and memory
//! fires a rule applied with the CLI, a local webhook receives Alertmanager's
//! JSON, the outbox keeps an undelivered notification across a controller
//! kill, acknowledgements and silences work as typed, the built-in node-down
//! rule emails a local SMTP sink through a channel that matches on severity,
//! and the Prometheus export passes `promtool check rules`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::http::StatusCode;
use novacron_api::{AlertView, ChannelView};
use novacron_tests::{
    Agent, Controller, JobCleanup, TEST_IMAGE, ensure_test_image, succeeded, wait_for,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// A webhook receiver: every body it accepted, and a switch that makes it
/// answer 500 instead.
#[derive(Clone, Default)]
struct Receiver {
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    failing: Arc<AtomicBool>,
    /// What `/slack` received (never failing).
    slack: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Receiver {
    async fn start(&self) -> String {
        let me = self.clone();
        let slack = self.slack.clone();
        let app = axum::Router::new()
            .route(
                "/slack",
                axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
                    let slack = slack.clone();
                    async move {
                        slack.lock().expect("slack").push(body);
                        StatusCode::OK
                    }
                }),
            )
            .route(
                "/hook",
                axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
                    let me = me.clone();
                    async move {
                        if me.failing.load(Ordering::SeqCst) {
                            return StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        me.bodies.lock().expect("bodies").push(body);
                        StatusCode::OK
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        format!("http://{addr}/hook")
    }

    fn with_status(&self, status: &str) -> Vec<serde_json::Value> {
        self.bodies
            .lock()
            .expect("bodies")
            .iter()
            .filter(|b| b["status"] == status)
            .cloned()
            .collect()
    }
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a manifest");
    path.to_str().expect("UTF-8 path").to_string()
}

async fn alerts(c: &Controller) -> Vec<AlertView> {
    c.admin_client()
        .expect("client")
        .get(format!("{}/v1/alerts", c.api()))
        .send()
        .await
        .expect("request")
        .error_for_status()
        .expect("200")
        .json()
        .await
        .expect("JSON")
}

async fn channels(c: &Controller) -> Vec<ChannelView> {
    c.admin_client()
        .expect("client")
        .get(format!("{}/v1/alerts/channels", c.api()))
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("JSON")
}

fn firing<'a>(all: &'a [AlertView], rule: &str) -> Option<&'a AlertView> {
    all.iter().find(|a| a.rule == rule && a.state == "firing")
}

#[tokio::test]
async fn a_busy_container_fires_a_webhook_that_survives_a_controller_kill() {
    ensure_test_image().expect("test image");
    let dir = tempfile::Builder::new()
        .prefix("novacron-alerts-")
        .tempdir()
        .expect("tempdir");
    let config = write(
        dir.path(),
        "controller.toml",
        "[alerts]\ninterval = \"1s\"\n",
    );
    let mut c = Controller::start(dir.path(), &["--config", &config])
        .await
        .expect("controller");
    let node = format!("al{}", std::process::id());
    let _agent = Agent::join_and_run(dir.path(), &c, &node, &["--interval", "200ms"])
        .await
        .expect("agent");
    c.wait_ready(&node, Duration::from_secs(20))
        .await
        .expect("node ready");
    let receiver = Receiver::default();
    // The first deliveries fail: the notification waits in the outbox.
    receiver.failing.store(true, Ordering::SeqCst);
    let url = receiver.start().await;
    let channel = write(
        dir.path(),
        "channel.yaml",
        &format!(
            "apiVersion: novacron.io/v1\nkind: NotificationChannel\nmetadata:\n  name: ops\nspec:\n  webhook:\n    url: {url}\n  repeatInterval: 1h\n---\napiVersion: novacron.io/v1\nkind: NotificationChannel\nmetadata:\n  name: chat\nspec:\n  slack:\n    url: {}\n",
            url.replace("/hook", "/slack")
        ),
    );
    let rule = write(
        dir.path(),
        "rule.yaml",
        "apiVersion: novacron.io/v1
kind: AlertRule
metadata:
  name: busy-alloc
spec:
  condition: alloc.cpu_percent > 30 AND alloc.memory_bytes > 20000000
  for: 2s
  severity: critical
  labels:
    team: web
  annotations:
    summary: '{{ subject }} of {{ labels.job }} burns CPU ({{ value }}%)'
  notify: [ops, chat]
",
    );
    let out = c.cli(&["apply", "-f", &channel]);
    assert!(succeeded(&out).contains("NotificationChannel applied"));
    let out = c.cli(&["apply", "-f", &rule]);
    assert!(succeeded(&out).contains("AlertRule applied"));
    let bad = write(
        dir.path(),
        "bad.yaml",
        "apiVersion: novacron.io/v1\nkind: AlertRule\nmetadata:\n  name: bad\nspec:\n  condition: node.cpu > 1\n",
    );
    let out = c.cli(&["apply", "-f", &bad]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node.cpu is not a metric") && err.contains("cpu_percent"),
        "{err}"
    );

    // Half a CPU and 48 MB held: a tail buffering its input, and a busy loop.
    let job = "alert-busy";
    let _cleanup = JobCleanup(job.into());
    let manifest = format!(
        "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: {job}
spec:
  type: service
  replicas: 1
  task:
    image: {TEST_IMAGE}
    command: [sh, -c, '(head -c 48000000 /dev/zero; sleep 3600) | tail -c 48000000 >/dev/null & while :; do :; done']
  resources:
    cpu: 1000m
    memory: 256Mi
"
    );
    c.apply("busy.yaml", &manifest).await.expect("apply");
    wait_for(Duration::from_secs(90), "busy-alloc firing", || async {
        firing(&alerts(&c).await, "busy-alloc").is_some()
    })
    .await
    .expect("the rule fires");
    let all = alerts(&c).await;
    let a = firing(&all, "busy-alloc").expect("firing");
    assert_eq!(a.labels["job"], job);
    assert_eq!(a.labels["team"], "web");
    assert_eq!(a.severity, "critical");
    assert!(
        a.annotations["summary"].contains(&format!("of {job} burns CPU")),
        "{:?}",
        a.annotations
    );
    let since = a.active_since_unix_ms;
    // The receiver refuses: the channel shows the queue and the error.
    wait_for(Duration::from_secs(20), "a failed delivery", || async {
        channels(&c)
            .await
            .iter()
            .any(|ch| ch.queued >= 1 && ch.last_error.as_deref().is_some_and(|e| e.contains("500")))
    })
    .await
    .expect("the failure is shown");
    // The Slack-compatible channel got its text meanwhile.
    wait_for(Duration::from_secs(20), "the Slack text", || async {
        !receiver.slack.lock().expect("slack").is_empty()
    })
    .await
    .expect("Slack notified");
    let slack = receiver.slack.lock().expect("slack")[0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        slack.starts_with("[FIRING] busy-alloc (critical): 1 firing")
            && slack.contains("burns CPU"),
        "{slack}"
    );
    let out = c.cli(&["alert", "list"]);
    let text = succeeded(&out);
    assert!(
        text.contains("busy-alloc") && text.contains("firing"),
        "{text}"
    );

    // Killed with the notification undelivered; the receiver recovers.
    c.kill().await;
    receiver.failing.store(false, Ordering::SeqCst);
    c.restart().await.expect("restart");
    wait_for(
        Duration::from_secs(30),
        "the queued notification",
        || async { !receiver.with_status("firing").is_empty() },
    )
    .await
    .expect("the outbox is delivered after the restart");
    let body = receiver.with_status("firing").remove(0);
    assert_eq!(body["version"], "4");
    assert_eq!(body["receiver"], "ops");
    assert_eq!(body["groupLabels"]["alertname"], "busy-alloc");
    assert_eq!(body["alerts"][0]["labels"]["job"], job);
    assert_eq!(body["alerts"][0]["status"], "firing");
    assert_eq!(body["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
    let all = alerts(&c).await;
    let a = firing(&all, "busy-alloc").expect("still firing after the restart");
    assert_eq!(a.active_since_unix_ms, since, "the alert's state was kept");

    // Acknowledged and silenced as typed.
    let subject = a.subject.clone();
    succeeded(&c.cli(&["alert", "ack", "busy-alloc", &subject]));
    let out = c.cli(&[
        "alert",
        "silence",
        &format!("job={job}"),
        "--for",
        "1h",
        "--comment",
        "load test",
    ]);
    assert!(succeeded(&out).contains("covers 1 alert(s) now"));
    let all = alerts(&c).await;
    let a = firing(&all, "busy-alloc").expect("firing");
    assert!(a.acked_by.is_some() && a.silenced_by.is_some(), "{a:?}");
    let silences = succeeded(&c.cli(&["alert", "silences"]));
    assert!(silences.contains("load test"), "{silences}");
    let id = a.silenced_by.clone().expect("silence id");
    succeeded(&c.cli(&["alert", "unsilence", &id]));

    // Stopping the job resolves the alert, and the receiver is told.
    let admin = c.admin_client().expect("client");
    admin
        .post(format!("{}/v1/jobs/{job}/stop", c.api()))
        .json(&serde_json::json!({}))
        .send()
        .await
        .expect("stop")
        .error_for_status()
        .expect("stopped");
    wait_for(
        Duration::from_secs(60),
        "a resolved notification",
        || async { !receiver.with_status("resolved").is_empty() },
    )
    .await
    .expect("resolution sent");
    let resolved = receiver.with_status("resolved").remove(0);
    assert_eq!(resolved["alerts"][0]["status"], "resolved");
    assert_ne!(resolved["alerts"][0]["endsAt"], "0001-01-01T00:00:00Z");
    let events = succeeded(&c.cli(&["events", "--limit", "500"]));
    for kind in [
        "alert.pending",
        "alert.firing",
        "alert.resolved",
        "alert.notified",
    ] {
        assert!(events.contains(kind), "{kind} in the events:\n{events}");
    }
}

/// A minimal SMTP sink: accepts every message and hands back its text.
async fn smtp_sink() -> (String, tokio::sync::mpsc::Receiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the SMTP sink");
    let addr = listener.local_addr().expect("address");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write.write_all(b"220 sink ESMTP\r\n").await;
                let mut message = String::new();
                while let Ok(Some(line)) = lines.next_line().await {
                    let upper = line.to_ascii_uppercase();
                    let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
                        b"250 sink\r\n"
                    } else if upper.starts_with("DATA") {
                        let _ = write.write_all(b"354 go on\r\n").await;
                        while let Ok(Some(l)) = lines.next_line().await {
                            if l == "." {
                                break;
                            }
                            message.push_str(&l);
                            message.push('\n');
                        }
                        let _ = tx.send(std::mem::take(&mut message)).await;
                        b"250 queued\r\n"
                    } else if upper.starts_with("QUIT") {
                        let _ = write.write_all(b"221 bye\r\n").await;
                        return;
                    } else {
                        b"250 ok\r\n"
                    };
                    if write.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr.to_string(), rx)
}

#[tokio::test]
async fn a_node_down_emails_a_channel_matching_critical_and_rules_export_to_promtool() {
    let dir = tempfile::Builder::new()
        .prefix("novacron-alerts-mail-")
        .tempdir()
        .expect("tempdir");
    let config = write(
        dir.path(),
        "controller.toml",
        "[alerts]\ninterval = \"1s\"\n",
    );
    let c = Controller::start(dir.path(), &["--config", &config])
        .await
        .expect("controller");
    let node = format!("am{}", std::process::id());
    let mut agent = Agent::join_and_run(dir.path(), &c, &node, &["--interval", "200ms"])
        .await
        .expect("agent");
    c.wait_ready(&node, Duration::from_secs(20))
        .await
        .expect("node ready");
    let (smtp, mut mail) = smtp_sink().await;
    let channel = write(
        dir.path(),
        "mail.yaml",
        &format!(
            "apiVersion: novacron.io/v1
kind: NotificationChannel
metadata:
  name: oncall
spec:
  email:
    smtp: {smtp}
    tls: none
    from: novacron@example.com
    to: [oncall@example.com]
  match:
    severity: critical
"
        ),
    );
    succeeded(&c.cli(&["apply", "-f", &channel]));
    let started = SystemTime::now();
    agent.kill().await;
    let message = tokio::time::timeout(Duration::from_secs(120), mail.recv())
        .await
        .expect("an email within 2 minutes of the agent's death")
        .expect("a message");
    assert!(
        message.contains("Subject: [FIRING] builtin-node-down"),
        "{message}"
    );
    assert!(
        message.contains(&format!("node {node} is down")),
        "{message}"
    );
    assert!(
        started.elapsed().expect("clock") >= Duration::from_secs(30),
        "not before the rule's 30s"
    );

    // The rules, built-in ones included, as a Prometheus rule file.
    let rule = write(
        dir.path(),
        "rule.yaml",
        "apiVersion: novacron.io/v1
kind: AlertRule
metadata:
  name: node-hot
spec:
  condition: avg(node.cpu_percent, 5m) > 90 and node.memory_percent > 90 or node.up == 0
  for: 5m
  annotations:
    summary: '{{ subject }} is hot at {{ value }}'
",
    );
    succeeded(&c.cli(&["apply", "-f", &rule]));
    let text = succeeded(&c.cli(&["alert", "export"]));
    assert!(text.contains("alert: \"node_hot\""), "{text}");
    assert!(
        text.contains("# left out: builtin-budget-exceeded"),
        "{text}"
    );
    let file = write(dir.path(), "novacron-alerts.yml", &text);
    let check = std::process::Command::new("promtool")
        .args(["check", "rules", &file])
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool is needed ({e}); install it with `bash .ci/setup system` (Debian's prometheus package)")
        });
    assert!(
        check.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let rules = succeeded(&c.cli(&["alert", "rules"]));
    assert!(
        rules.contains("builtin-node-down") && rules.contains("node-hot"),
        "{rules}"
    );
    // A built-in rule cannot be deleted.
    let out = c.cli(&["alert", "delete-rule", "builtin-node-down"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("silence it instead"));
}

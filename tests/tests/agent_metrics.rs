//! The agent's optional `/metrics` endpoint, against the real binaries: off unless
//! asked for; when on, it serves this host's latest sample under the same family
//! names and labels as the controller's `/metrics`, plus the agent's build and
//! `process_*` figures, in a text format `promtool check metrics` accepts.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use novacron_tests::{Agent, Controller, free_port, host_mem_total, wait_for};

/// The value of the first series of `text` named `name` whose labels contain
/// every `label="value"` of `labels`.
fn value(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

#[tokio::test]
async fn the_agent_serves_its_host_on_metrics_only_when_asked() {
    let dir = tempfile::Builder::new()
        .prefix("novacron-agent-metrics-")
        .tempdir()
        .expect("tempdir");
    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut on = Agent::join_and_run(
        dir.path(),
        &c,
        "metrics-on",
        &["--label", "zone=z1", "--metrics-listen", &listen],
    )
    .await
    .expect("agent with metrics");
    let mut off = Agent::join_and_run(dir.path(), &c, "metrics-off", &[])
        .await
        .expect("agent without metrics");

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let url = format!("http://{listen}/metrics");
    let scrape = || async {
        let r = client.get(&url).send().await.ok()?;
        r.text().await.ok()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        if let Some(text) = scrape().await
            && text.contains("novacron_node_memory_total_bytes{")
        {
            break text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no host sample on {url} within 30 s; agent log:\n{}",
            on.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // The host's memory, labelled as the controller labels it.
    let total = value(
        &text,
        "novacron_node_memory_total_bytes",
        &["node=\"metrics-on\"", "zone=\"z1\""],
    )
    .unwrap_or_else(|| panic!("no memory total in:\n{text}"));
    assert_eq!(total as u64, host_mem_total());
    assert!(
        value(&text, "novacron_node_cpu_cores", &["node=\"metrics-on\""]).is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        text.contains("mountpoint=\"/\"") || text.contains("mountpoint="),
        "filesystems carry node_exporter's mountpoint label:\n{text}"
    );
    // The cumulative counters, as node_exporter has them.
    assert!(
        value(
            &text,
            "novacron_node_cpu_seconds_total",
            &["node=\"metrics-on\"", "mode=\"user\""]
        )
        .is_some_and(|s| s > 0.0),
        "{text}"
    );
    assert!(
        text.contains("novacron_node_network_receive_bytes_total{"),
        "{text}"
    );
    assert_eq!(
        value(&text, "novacron_agent_build_info", &["node=\"metrics-on\""]),
        Some(1.0)
    );
    // Its own process: resident memory is well above zero, the start time recent.
    assert!(
        value(&text, "process_resident_memory_bytes", &[]).is_some_and(|b| b > 1e6),
        "{text}"
    );
    assert!(
        text.contains("# TYPE process_cpu_seconds_total counter"),
        "{text}"
    );

    // The same series names as the controller's /metrics shows for the node,
    // once the node's first sample has reached it (the agent's own endpoint
    // can answer before the link has delivered one).
    let admin = c.admin_client().expect("client");
    let has_node = |fleet: &str| {
        value(
            fleet,
            "novacron_node_memory_total_bytes",
            &["node=\"metrics-on\""],
        )
        .is_some()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let fleet = loop {
        let fleet = match admin.get(format!("{}/metrics", c.api())).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if has_node(&fleet) || std::time::Instant::now() >= deadline {
            break fleet;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        has_node(&fleet),
        "the controller exports the same series:\n{fleet}"
    );

    // promtool lints the text format.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; `bash .ci/setup system` installs it)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n--- input ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Only GET /metrics.
    let other = client
        .get(format!("http://{listen}/"))
        .send()
        .await
        .expect("GET /");
    assert_eq!(other.status().as_u16(), 404);
    let post = client.post(&url).send().await.expect("POST /metrics");
    assert_eq!(post.status().as_u16(), 405);
    assert_eq!(
        post.headers().get("allow").and_then(|v| v.to_str().ok()),
        Some("GET, HEAD")
    );

    // Off by default: the other agent runs and reports, but listens nowhere.
    wait_for(
        Duration::from_secs(30),
        "the second agent's node ready",
        || async {
            c.node("metrics-off")
                .await
                .ok()
                .flatten()
                .is_some_and(|n| n.latest.is_some())
        },
    )
    .await
    .expect("second agent reports");
    assert!(
        !off.log().contains("metrics endpoint listening"),
        "{}",
        off.log()
    );
    assert!(
        on.log().contains("metrics endpoint listening"),
        "{}",
        on.log()
    );
    on.kill().await;
    off.kill().await;
}

#[tokio::test]
async fn a_taken_metrics_port_is_a_configuration_error() {
    let dir = tempfile::Builder::new()
        .prefix("novacron-agent-metrics-")
        .tempdir()
        .expect("tempdir");
    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let listen = taken.local_addr().expect("addr").to_string();
    let mut agent = Agent::join_and_run(
        dir.path(),
        &c,
        "metrics-taken",
        &["--metrics-listen", &listen],
    )
    .await
    .expect("agent");
    let status = tokio::time::timeout(
        Duration::from_secs(30),
        agent.child.as_mut().expect("child").wait(),
    )
    .await
    .expect("the agent exits")
    .expect("status");
    assert_eq!(status.code(), Some(64), "{}", agent.log());
    let log = agent.log();
    assert!(
        log.contains("metrics_listen") && log.contains(&listen),
        "the error names the setting and the address:\n{log}"
    );
}

//! The README's first command: `novacron dev` brings up a controller and local
//! agents, writes a context, and `novacron node list` in another process shows the
//! nodes with live metrics.

use std::process::Stdio;
use std::time::Duration;

use novacron_tests::{bin, free_port, wait_for};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::test]
async fn novacron_dev_serves_a_fleet_that_the_cli_can_list() {
    let dir = tempfile::Builder::new()
        .prefix("novacron-dev-")
        .tempdir()
        .expect("tempdir");
    let config = dir.path().join("config.toml");
    let port = free_port().to_string();
    let mut dev = tokio::process::Command::new(bin("novacron"))
        .arg("--config")
        .arg(&config)
        .args([
            "dev",
            "--agents",
            "2",
            "--port",
            &port,
            "--every",
            "1s",
            "--duration",
            "60s",
        ])
        .arg("--dir")
        .arg(dir.path().join("state"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("novacron dev starts");
    let mut lines = BufReader::new(dev.stdout.take().expect("stdout")).lines();
    let mut seen = String::new();
    let up = tokio::time::timeout(Duration::from_secs(90), async {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push_str(&line);
            seen.push('\n');
            // The demo job: two replicas on the local agents, healthy.
            if line.starts_with("dev-1 ready") && line.contains("job hello: 2/2 running, 2 healthy")
            {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(up, Ok(true)),
        "no live summary; output so far:\n{seen}"
    );
    assert!(
        seen.contains("novacron node list"),
        "prints what to try next:\n{seen}"
    );

    let list = |format: &'static str| {
        let config = config.clone();
        async move {
            tokio::process::Command::new(bin("novacron"))
                .arg("--config")
                .arg(&config)
                .args(["node", "list", "-o", format])
                .output()
                .await
                .expect("novacron node list runs")
        }
    };
    let table = list("table").await;
    assert!(
        table.status.success(),
        "{}",
        String::from_utf8_lossy(&table.stderr)
    );
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("dev-1") && text.contains("dev-2") && text.contains("ready"),
        "{text}"
    );

    wait_for(
        Duration::from_secs(10),
        "json with live metrics for both nodes",
        || async {
            let out = list("json").await;
            let nodes: Vec<serde_json::Value> =
                serde_json::from_slice(&out.stdout).unwrap_or_default();
            nodes.len() == 2
                && nodes.iter().all(|n| {
                    n["status"] == "ready"
                        && n["latest"]["memory"]["total_bytes"].as_u64()
                            == Some(novacron_tests::host_mem_total())
                })
        },
    )
    .await
    .expect("live metrics");

    // Ctrl-C (SIGINT) stops the whole fleet cleanly.
    let pid = dev.id().expect("pid").to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    let status = tokio::time::timeout(Duration::from_secs(20), dev.wait())
        .await
        .expect("stops")
        .expect("status");
    assert!(status.success(), "{status}");
    let after = list("table").await;
    assert_eq!(
        after.status.code(),
        Some(69),
        "controller gone: {}",
        String::from_utf8_lossy(&after.stderr)
    );
    let left = novacron_tests::docker(&["ps", "-aq", "--filter", "label=novacron.job=hello"])
        .expect("docker ps");
    assert!(
        left.is_empty(),
        "the dev fleet's containers are removed on exit: {left}"
    );
}

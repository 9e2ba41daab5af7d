//! `novacron-alert-bench latency [--runs 10] [--interval 10s]`: notification
//! latency on a real controller and agent (the binaries of `target/<profile>`
//! next to this one). Each run applies a rule whose condition already holds
//! (`node.up == 1`, `for: 0s`) with a webhook channel, and times the webhook's
//! arrival at a local receiver from the apply and from the `alert.firing`
//! event's time (the evaluation that saw the condition true). The first waits
//! for the next evaluation, so it is spread over one interval; the target is
//! at most the interval plus 1 s. Prints one JSON line.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::http::StatusCode;
use novacron_tests::{Agent, Controller, wait_for};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() - 1])
}

async fn latency(args: &[String]) -> anyhow::Result<()> {
    let runs: usize = arg(args, "--runs", 10);
    let interval: String = arg(args, "--interval", "10s".to_string());
    let dir = tempfile::Builder::new()
        .prefix("novacron-alert-bench-")
        .tempdir()?;
    let config = dir.path().join("controller.toml");
    std::fs::write(&config, format!("[alerts]\ninterval = \"{interval}\"\n"))?;
    let config = config.to_str().unwrap_or_default().to_string();
    let c = Controller::start(dir.path(), &["--config", &config]).await?;
    let _agent = Agent::join_and_run(dir.path(), &c, "bench-1", &[]).await?;
    c.wait_ready("bench-1", Duration::from_secs(20)).await?;
    // Arrival times (Unix ms) of firing notifications, by rule.
    let arrivals: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let seen = arrivals.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let seen = seen.clone();
            async move {
                let at = unix_ms(SystemTime::now());
                if body["status"] == "firing" {
                    let rule = body["groupLabels"]["alertname"]
                        .as_str()
                        .unwrap_or("")
                        .to_string();
                    seen.lock().map(|mut s| s.push((rule, at))).ok();
                }
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hook", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let admin = c.admin_client()?;
    let post = |path: &str, manifest: String| {
        admin
            .post(format!("{}{path}", c.api()))
            .json(&serde_json::json!({ "file": "bench.yaml", "manifest": manifest }))
            .send()
    };
    post(
        "/v1/alerts/channels",
        format!("apiVersion: novacron.io/v1\nkind: NotificationChannel\nmetadata:\n  name: bench\nspec:\n  webhook:\n    url: {url}\n"),
    )
    .await?
    .error_for_status()?;
    let (mut from_apply, mut from_firing) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let rule = format!("bench-{i}");
        let applied = Instant::now();
        post(
            "/v1/alerts/rules",
            format!("apiVersion: novacron.io/v1\nkind: AlertRule\nmetadata:\n  name: {rule}\nspec:\n  condition: node.up == 1\n  notify: [bench]\n"),
        )
        .await?
        .error_for_status()?;
        wait_for(Duration::from_secs(120), "the notification", || async {
            arrivals
                .lock()
                .map(|a| a.iter().any(|(r, _)| *r == rule))
                .unwrap_or(false)
        })
        .await?;
        from_apply.push(applied.elapsed().as_secs_f64() * 1000.0);
        let arrived = arrivals
            .lock()
            .map(|a| a.iter().find(|(r, _)| *r == rule).map(|(_, t)| *t))
            .ok()
            .flatten()
            .unwrap_or(0);
        let page: serde_json::Value = admin
            .get(format!(
                "{}/v1/events?type=alert.firing&limit=1000&newest=true",
                c.api()
            ))
            .send()
            .await?
            .json()
            .await?;
        let fired = page["events"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| {
                e["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(&format!("alert {rule} firing")))
            })
            .and_then(|e| e["time_unix_ms"].as_u64())
            .ok_or_else(|| anyhow::anyhow!("no alert.firing event for {rule}: {page}"))?;
        from_firing.push(arrived.saturating_sub(fired) as f64);
        admin
            .delete(format!("{}/v1/alerts/rules/{rule}", c.api()))
            .send()
            .await?
            .error_for_status()?;
    }
    let (apply_p50, apply_max) = median(from_apply);
    let (firing_p50, firing_max) = median(from_firing);
    println!(
        "{}",
        serde_json::json!({
            "bench": "alert_notification_latency", "interval": interval, "runs": runs,
            "apply_to_webhook_p50_ms": apply_p50, "apply_to_webhook_max_ms": apply_max,
            "firing_to_webhook_p50_ms": firing_p50, "firing_to_webhook_max_ms": firing_max,
        })
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("latency") => latency(&args).await,
        _ => {
            eprintln!("usage: novacron-alert-bench latency [--runs 10] [--interval 10s]");
            std::process::exit(64);
        }
    }
}

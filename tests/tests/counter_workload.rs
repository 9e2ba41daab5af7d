//! Smoke check of the live checkpoint tests' workload: the `novacron-counter` image
//! (tests/src/counter_image.rs) built on the default Docker daemon and run with a
//! published port, a volume and ballast. It counts, logs each count to the volume,
//! and its ballast checksum is stable.
//!
//! Needs `cargo build -p novacron-tests --bin novacron-counter` (the README's
//! `cargo build --workspace --bins` does it), Docker and Debian's busybox-static.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use novacron_tests::counter_image::counter_image;
use novacron_tests::docker;

/// Removes the container and the volume when dropped, also when the test fails.
#[derive(Debug)]
struct Cleanup {
    container: Option<String>,
    volume: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(c) = &self.container {
            let _ = docker(&["rm", "-f", "-v", c]);
        }
        let _ = docker(&["volume", "rm", "-f", &self.volume]);
    }
}

/// `GET path` on 127.0.0.1:`port`; the status code and the body.
fn get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no response head in {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    Ok((status, body.to_string()))
}

fn get_ok(port: u16, path: &str) -> Result<String> {
    let (status, body) = get(port, path)?;
    if status != 200 {
        bail!("GET {path}: status {status}, body {body:?}");
    }
    Ok(body)
}

#[test]
fn counter_image_counts_logs_to_its_volume_and_keeps_its_ballast() -> Result<()> {
    let image = counter_image(None)?;
    let volume = format!(
        "novacron-counter-smoke-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let mut guard = Cleanup {
        container: None,
        volume: volume.clone(),
    };
    docker(&["volume", "create", &volume])?;
    let id = docker(&[
        "run",
        "-d",
        "-p",
        "127.0.0.1:0:8080",
        "-v",
        &format!("{volume}:/data"),
        "-e",
        "BALLAST_MB=8",
        "--label",
        "novacron.test=counter-workload",
        &image,
    ])?;
    guard.container = Some(id.clone());

    // "127.0.0.1:49153"
    let mapping = docker(&["port", &id, "8080/tcp"])?;
    let port: u16 = mapping
        .lines()
        .next()
        .and_then(|l| l.rsplit(':').next())
        .and_then(|p| p.trim().parse().ok())
        .with_context(|| format!("no published port in {mapping:?}"))?;

    let start = Instant::now();
    loop {
        match get(port, "/health") {
            Ok((200, body)) if body == "ok" => break,
            other => {
                if start.elapsed() > Duration::from_secs(20) {
                    let logs = docker(&["logs", &id]).unwrap_or_default();
                    bail!("the counter did not answer /health in 20 s: {other:?}; logs: {logs}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    assert_eq!(get_ok(port, "/")?, "1");
    assert_eq!(get_ok(port, "/")?, "2");
    assert_eq!(get_ok(port, "/count")?, "2");
    let (status, _) = get(port, "/no-such-path")?;
    assert_eq!(status, 404);

    let log = docker(&["exec", &id, "cat", "/data/count.log"])?;
    assert_eq!(log.lines().collect::<Vec<_>>(), ["1", "2"]);

    let first = get_ok(port, "/ballast")?;
    let second = get_ok(port, "/ballast")?;
    assert_eq!(first, second, "the ballast checksum changed");
    let sum: u64 = first.parse().context("the ballast checksum is a number")?;
    assert_ne!(sum, 0, "8 MiB of pseudo-random ballast sums to 0");

    let logs = docker(&["logs", &id])?;
    assert!(
        logs.contains("novacron-counter listening on 0.0.0.0:8080"),
        "start line missing: {logs}"
    );
    drop(guard);
    Ok(())
}

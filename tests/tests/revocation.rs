//! Certificate revocation by serial end to end, with the real controller, agent and
//! CLIs: a revoked operator certificate is refused at the TLS handshake and its
//! already-open keep-alive connection is closed; a revoked node certificate's QUIC
//! link is closed and the agent cannot reconnect; revocations survive restarts and
//! can be made offline. Also: `NOVACRON_TOKEN` replaces the context's certificate,
//! and refused (403) calls are audited.

use std::path::{Path, PathBuf};
use std::time::Duration;

use novacron_api::EventPage;
use novacron_common::pki::Serial;
use novacron_tests::{Agent, Controller, RawClient, bin, wait_for};
use reqwest::StatusCode;

fn tempdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `novacron-controller admin issue`; returns the certificate, the key and the
/// serial it printed.
fn issue(c: &Controller, dir: &Path, name: &str, role: &str) -> (PathBuf, PathBuf, String) {
    let out = c.ctl(&[
        "admin",
        "issue",
        "--name",
        name,
        "--role",
        role,
        "--out",
        dir.to_str().expect("utf-8"),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let serial = text
        .lines()
        .find_map(|l| l.strip_prefix("serial: "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("admin issue printed no serial: {text}"))
        .to_owned();
    let cert = dir.join(format!("{name}.pem"));
    let printed: Serial = serial.parse().expect("the printed serial parses");
    let actual = Serial::of_cert_pem(&std::fs::read_to_string(&cert).expect("cert"))
        .expect("serial of the file");
    assert_eq!(printed, actual, "the printed serial is the certificate's");
    (cert, dir.join(format!("{name}-key.pem")), serial)
}

async fn ready(c: &Controller) -> bool {
    matches!(c.node("n1").await, Ok(Some(v)) if v.status.to_string() == "ready")
}

async fn get_nodes(client: &reqwest::Client, c: &Controller) -> reqwest::Result<StatusCode> {
    client
        .get(format!("{}/v1/nodes", c.api()))
        .send()
        .await
        .map(|r| r.status())
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

/// Completes a TLS handshake with `cert` on the API port (TLS 1.3: the client is
/// done before the server has checked its certificate), sends a request, and
/// returns the error the connection ends with (empty when the server answered).
async fn tls_alert(c: &Controller, cert: &Path, key: &Path) -> String {
    use std::io::{Read, Write};
    let ca = std::fs::read_to_string(c.data_dir.join("pki/ca.pem")).expect("ca");
    let (cert, key) = (
        std::fs::read_to_string(cert).expect("cert"),
        std::fs::read_to_string(key).expect("key"),
    );
    let port = c.port;
    tokio::task::spawn_blocking(move || {
        novacron_common::tls::install_crypto_provider();
        let config = novacron_common::tls::client_config(&ca, Some((&cert, &key)), &[b"http/1.1"])
            .expect("tls config");
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("conn");
        let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("tcp");
        tcp.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let request = "GET /v1/nodes HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n";
        if let Err(e) = tls.write_all(request.as_bytes()) {
            return e.to_string();
        }
        let mut answer = Vec::new();
        match tls.read_to_end(&mut answer) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    })
    .await
    .expect("tls task")
}

/// A `novacron` context file for `cert`/`key` next to the data directory.
fn context(c: &Controller, name: &str, cert: &Path, key: &Path) -> PathBuf {
    let path = c.data_dir.with_file_name(format!("{name}-context.toml"));
    let pki = c.data_dir.join("pki");
    let text = format!(
        "current = \"t\"\n\n[contexts.t]\napi = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        c.api(),
        pki.join("ca.pem").display(),
        cert.display(),
        key.display()
    );
    std::fs::write(&path, text).expect("write the context");
    path
}

fn novacron(config: &Path, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("novacron"))
        .env_remove("NOVACRON_TOKEN")
        .envs(env.iter().copied())
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("novacron runs")
}

#[tokio::test]
async fn revoked_operator_certificate_is_refused_and_its_open_connection_closed() {
    let dir = tempdir("novacron-revoke-op-");
    let mut c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let (alice_cert, alice_key, alice_serial) = issue(&c, dir.path(), "alice", "admin");
    let (bob_cert, bob_key, bob_serial) = issue(&c, dir.path(), "bob", "admin");

    // Alice's keep-alive connection is open before the revocation.
    let open = c.client_with(&alice_cert, &alice_key).expect("client");
    assert_eq!(get_nodes(&open, &c).await.expect("call"), StatusCode::OK);

    let out = c.cli(&[
        "cert",
        "revoke",
        "--serial",
        &alice_serial,
        "--reason",
        "laptop stolen",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("closed 1 API connection"),
        "{}",
        stdout(&out)
    );

    // The connection opened before the revocation can make no more calls.
    let after = get_nodes(&open, &c).await;
    assert!(
        !matches!(after, Ok(s) if s.is_success()),
        "the open connection still works: {after:?}"
    );
    // A new connection is refused at the TLS handshake.
    let fresh = c.client_with(&alice_cert, &alice_key).expect("client");
    let refused = get_nodes(&fresh, &c).await;
    assert!(refused.is_err(), "a revoked certificate completed a call");
    let alert = tls_alert(&c, &alice_cert, &alice_key).await;
    assert!(
        alert.contains("CertificateRevoked"),
        "not refused with a certificate_revoked alert: {alert}"
    );
    // The CLI is refused too. (Whether it can name the reason depends on whether
    // its HTTP client reads the server's alert before it sees the connection close.)
    let config = context(&c, "alice", &alice_cert, &alice_key);
    let out = novacron(&config, &[], &["node", "list"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    // Bob is unaffected.
    let bob = c.client_with(&bob_cert, &bob_key).expect("client");
    assert_eq!(get_nodes(&bob, &c).await.expect("call"), StatusCode::OK);

    // Audited, and listed.
    let audit = events(&c, "type=cert").await;
    let event = audit
        .events
        .iter()
        .find(|e| e.details.get("serial") == Some(&alice_serial))
        .unwrap_or_else(|| panic!("no cert.revoked event: {:?}", audit.events));
    assert_eq!(event.kind, "cert.revoked");
    assert_eq!(event.actor, "admin:admin");
    assert!(event.message.contains("laptop stolen"), "{}", event.message);
    let out = c.cli(&["cert", "revoked"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains(&alice_serial), "{}", stdout(&out));

    // Survives a restart.
    c.restart().await.expect("restart");
    let fresh = c.client_with(&alice_cert, &alice_key).expect("client");
    assert!(
        get_nodes(&fresh, &c).await.is_err(),
        "revocation forgotten at restart"
    );

    // Offline revocation on a stopped controller's data directory.
    c.stop().await;
    let out = c.ctl(&[
        "cert",
        "revoke",
        "--serial",
        &bob_serial,
        "--reason",
        "left",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("next start"), "{}", stdout(&out));
    let out = c.ctl(&["cert", "list"]);
    assert!(
        stdout(&out).contains(&alice_serial) && stdout(&out).contains(&bob_serial),
        "{}",
        stdout(&out)
    );
    c.restart().await.expect("restart");
    let bob = c.client_with(&bob_cert, &bob_key).expect("client");
    assert!(
        get_nodes(&bob, &c).await.is_err(),
        "offline revocation not applied"
    );
    let audit = events(&c, "type=cert").await;
    assert!(
        audit
            .events
            .iter()
            .any(|e| e.details.get("serial") == Some(&bob_serial) && e.actor.contains("offline")),
        "offline revocation not audited: {:?}",
        audit.events
    );
}

#[tokio::test]
async fn revoked_node_certificate_closes_its_link_and_the_agent_cannot_reconnect() {
    let dir = tempdir("novacron-revoke-node-");
    let mut c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let agent = Agent::join_and_run(dir.path(), &c, "n1", &["--max-backoff", "1s"])
        .await
        .expect("agent");
    wait_for(Duration::from_secs(20), "n1 ready", || ready(&c))
        .await
        .expect("ready");
    let (cert, key, ca) = agent.credentials().expect("credentials");
    let serial = Serial::of_cert_pem(&cert).expect("serial").to_string();

    // Online through the running controller (its store is locked).
    let out = c.ctl(&["cert", "revoke", "--serial", &serial, "--reason", "test"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("agent link of 1 node"),
        "{}",
        stdout(&out)
    );
    wait_for(Duration::from_secs(10), "n1 to leave ready", || async {
        !ready(&c).await
    })
    .await
    .expect("the link was closed");
    // The agent keeps trying (backoff at most 1 s) and never gets back in.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !ready(&c).await,
        "the agent reconnected with a revoked certificate"
    );
    let raw = RawClient::new().expect("raw client");
    let attempt = raw.connect(c.port, &ca, Some((&cert, &key))).await;
    if let Ok(conn) = attempt {
        // TLS 1.3 may finish the client side before the server's alert arrives.
        let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .expect("the controller closes the connection");
        eprintln!("closed by the controller: {reason}");
    }

    // Still refused after a controller restart.
    c.restart().await.expect("restart");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!ready(&c).await, "the agent got back in after the restart");
    assert!(
        agent.log().to_lowercase().contains("revoked"),
        "the agent was not told: {}",
        agent.log()
    );
}

#[tokio::test]
async fn a_viewer_token_overrides_an_admin_certificate_and_the_refusal_is_audited() {
    let dir = tempdir("novacron-revoke-token-");
    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let out = c.ctl(&["admin", "token", "--name", "vic", "--role", "viewer"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = stdout(&out).trim().to_owned();
    let pki = c.data_dir.join("pki");
    let config = context(
        &c,
        "admin",
        &pki.join("admin.pem"),
        &pki.join("admin-key.pem"),
    );

    let out = novacron(
        &config,
        &[("NOVACRON_TOKEN", token.as_str())],
        &["job", "stop", "web"],
    );
    assert!(!out.status.success(), "a viewer token stopped a job");
    let msg = stderr(&out);
    assert!(
        msg.contains("permission denied") && msg.contains("viewer"),
        "{msg}"
    );
    // Without the token the admin certificate applies (the job is just unknown).
    let out = novacron(&config, &[], &["job", "stop", "web"]);
    assert!(
        !stderr(&out).contains("permission denied"),
        "{}",
        stderr(&out)
    );

    let audit = events(&c, "type=access").await;
    let denied = audit
        .events
        .iter()
        .find(|e| e.kind == "access.denied")
        .unwrap_or_else(|| panic!("the refusal was not audited: {:?}", audit.events));
    assert_eq!(denied.actor, "viewer:vic");
    assert!(
        denied.message.contains("POST /v1/jobs/web/stop")
            && denied.message.contains("needs operator"),
        "{}",
        denied.message
    );
    assert_eq!(
        denied.details.get("status").map(String::as_str),
        Some("403")
    );
    // Only the one refusal: reads and the admin's call are not refusals.
    assert_eq!(
        audit
            .events
            .iter()
            .filter(|e| e.kind == "access.denied")
            .count(),
        1,
        "{:?}",
        audit.events
    );
}

//! The fleet foundation end to end: enrollment, mutual TLS over QUIC, metrics
//! streaming, refusals, restarts and liveness, with the real binaries on loopback.

use std::time::{Duration, Instant, SystemTime};

use novacron_common::pki::{self, Identity, Validity};
use novacron_common::wire::{
    self, AgentMessage, Capabilities, Capacity, CloseCode, ControllerMessage, Hello,
    PROTOCOL_VERSION,
};
use novacron_tests::{Agent, Controller, RawClient, host_mem_total, join, wait_for};

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("novacron-e2e-")
        .tempdir()
        .expect("tempdir")
}

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).expect("readable")
}

/// Offers this build's protocol version, then sends a Hello for `claimed` on a
/// fresh control stream and returns the answer.
async fn hello(
    conn: &quinn::Connection,
    claimed: &str,
) -> anyhow::Result<Option<ControllerMessage>> {
    let (mut send, mut recv) = conn.open_bi().await?;
    match wire::offer_newest(&mut send, &mut recv).await? {
        wire::Negotiated::Accept { .. } => {}
        refused => anyhow::bail!("version offer refused: {refused:?}"),
    }
    let msg = AgentMessage::Hello(Box::new(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: "test".into(),
        node_name: claimed.into(),
        instance: 1,
        labels: Default::default(),
        capacity: Capacity::default(),
        capabilities: Capabilities::default(),
    }));
    wire::write_frame(&mut send, &msg).await?;
    let mut scratch = Vec::new();
    Ok(wire::read_frame(&mut recv, &mut scratch).await?)
}

/// Asserts that a connection attempt with these credentials is refused: either the
/// handshake fails, or (TLS 1.3 lets the client finish first) the server closes the
/// connection before any Welcome.
async fn assert_refused(port: u16, ca_pem: &str, client: Option<(&str, &str)>, what: &str) {
    let raw = RawClient::new().expect("client");
    match raw.connect(port, ca_pem, client).await {
        Err(e) => eprintln!("{what}: refused at the handshake: {e:#}"),
        Ok(conn) => {
            let answer = tokio::time::timeout(Duration::from_secs(5), hello(&conn, "n1")).await;
            assert!(
                !matches!(answer, Ok(Ok(Some(ControllerMessage::Welcome(_))))),
                "{what}: the controller welcomed the connection"
            );
            let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
                .await
                .unwrap_or_else(|_| panic!("{what}: connection not closed by the controller"));
            eprintln!("{what}: closed by the controller: {reason}");
        }
    }
}

#[tokio::test]
async fn enrolled_agent_streams_real_host_metrics() {
    let dir = tempdir();
    let controller = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let _agent = Agent::join_and_run(dir.path(), &controller, "n1", &["--label", "zone=a"])
        .await
        .expect("agent");
    wait_for(
        Duration::from_secs(20),
        "a metrics sample from n1",
        || async { matches!(controller.node("n1").await, Ok(Some(v)) if v.latest.is_some()) },
    )
    .await
    .expect("metrics arrive");
    let view = controller.node("n1").await.expect("api").expect("known");
    let latest = view.latest.expect("a sample");
    assert_eq!(view.status.to_string(), "ready");
    assert_eq!(view.labels.get("zone").map(String::as_str), Some("a"));
    assert_eq!(
        latest.memory.total_bytes,
        host_mem_total(),
        "the host's real memory"
    );
    let cores = std::thread::available_parallelism().expect("cpus").get();
    assert_eq!(latest.cpu.per_core_percent.len(), cores);
    assert_eq!(view.capacity.cpu_millis, cores as u64 * 1000);
    assert!(
        latest.disks.iter().any(|d| d.total_bytes > 0),
        "a real disk"
    );
    assert!(view.cert_expires_unix_ms.is_some());
}

#[tokio::test]
async fn bad_credentials_are_refused() {
    let dir = tempdir();
    let controller = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let ca_pem = read(&controller.data_dir.join("pki/ca.pem"));
    let ca = pki::CertAndKey {
        cert_pem: ca_pem.clone(),
        key_pem: read(&controller.data_dir.join("pki/ca-key.pem")),
    };
    let now = SystemTime::now();
    let n1 = Identity::node("n1").expect("name");

    // A node certificate from another CA.
    let other_ca = pki::generate_ca(
        "rogue CA",
        Validity::starting(now, Duration::from_secs(3600)),
    )
    .expect("ca");
    let rogue = pki::issue_client_cert(
        &other_ca,
        &n1,
        Validity::starting(now, Duration::from_secs(3600)),
    )
    .expect("cert");
    assert_refused(
        controller.port,
        &ca_pem,
        Some((&rogue.cert_pem, &rogue.key_pem)),
        "other CA",
    )
    .await;

    // An expired certificate from the right CA.
    let expired = pki::issue_client_cert(
        &ca,
        &n1,
        Validity {
            not_before: now - Duration::from_secs(7200),
            not_after: now - Duration::from_secs(3600),
        },
    )
    .expect("cert");
    assert_refused(
        controller.port,
        &ca_pem,
        Some((&expired.cert_pem, &expired.key_pem)),
        "expired",
    )
    .await;

    // No client certificate at all.
    assert_refused(controller.port, &ca_pem, None, "no client certificate").await;

    // A valid certificate of a node that never enrolled.
    let stranger =
        pki::issue_client_cert(&ca, &n1, Validity::starting(now, Duration::from_secs(3600)))
            .expect("cert");
    assert_refused(
        controller.port,
        &ca_pem,
        Some((&stranger.cert_pem, &stranger.key_pem)),
        "not enrolled",
    )
    .await;
}

#[tokio::test]
async fn a_node_cannot_register_under_another_nodes_name() {
    let dir = tempdir();
    let controller = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let token = controller.token(2).expect("token");
    for name in ["node-a", "node-b"] {
        let out = join(&controller, &token, name, &dir.path().join(name));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let a = dir.path().join("node-a");
    let (cert, key, ca) = (
        read(&a.join("node.pem")),
        read(&a.join("node-key.pem")),
        read(&a.join("ca.pem")),
    );
    let raw = RawClient::new().expect("client");
    let conn = raw
        .connect(controller.port, &ca, Some((&cert, &key)))
        .await
        .expect("handshake");
    match hello(&conn, "node-b").await.expect("an answer") {
        Some(ControllerMessage::Refused(r)) => {
            assert_eq!(r.code, CloseCode::IdentityMismatch);
            assert!(r.message.contains("node-a"), "{}", r.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let reason = conn.closed().await;
    assert!(reason.to_string().contains("node-a"), "{reason}");
    assert_eq!(
        controller
            .node("node-b")
            .await
            .expect("api")
            .expect("enrolled")
            .status
            .to_string(),
        "disconnected",
        "node-b never connected"
    );
}

#[tokio::test]
async fn join_tokens_are_single_use_and_expire() {
    let dir = tempdir();
    let mut controller = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let token = controller.token(1).expect("token");
    let first = join(&controller, &token, "n1", &dir.path().join("n1"));
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let reused = join(&controller, &token, "n2", &dir.path().join("n2"));
    assert_eq!(reused.status.code(), Some(69));
    let msg = String::from_utf8_lossy(&reused.stderr);
    assert!(msg.contains("no uses left"), "{msg}");
    assert!(
        !dir.path().join("n2/node.pem").exists(),
        "nothing written for a refused join"
    );

    // An expired token, written into the store while the controller is stopped.
    controller.stop().await;
    let expired = novacron_controller::tokens::JoinToken::generate();
    {
        use novacron_controller::store::Store;
        let store = novacron_controller::store::RedbStore::open(
            &controller.data_dir.join("controller.redb"),
        )
        .expect("store");
        let created = SystemTime::now() - Duration::from_secs(7200);
        let record = novacron_controller::tokens::TokenRecord::new(
            &expired,
            Duration::from_secs(3600),
            5,
            "expired",
            created,
        )
        .expect("record");
        store.put_token(&record).expect("put");
    }
    controller.restart().await.expect("restart");
    let out = join(
        &controller,
        &expired.to_string(),
        "n3",
        &dir.path().join("n3"),
    );
    assert_eq!(out.status.code(), Some(69));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("expired"), "{msg}");
}

#[tokio::test]
async fn revoked_node_is_dropped_and_refused_at_the_handshake() {
    let dir = tempdir();
    let controller = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let agent = Agent::join_and_run(dir.path(), &controller, "n1", &[])
        .await
        .expect("agent");
    controller
        .wait_ready("n1", Duration::from_secs(20))
        .await
        .expect("ready");
    let out = controller.ctl(&["node", "revoke", "n1", "--reason", "test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        Duration::from_secs(5),
        "the agent to see the revocation",
        || async { agent.log().contains("revoked") },
    )
    .await
    .expect("agent told");
    let view = controller.node("n1").await.expect("api").expect("known");
    assert_ne!(view.status.to_string(), "ready");
    let (cert, key, ca) = agent.credentials().expect("creds");
    assert_refused(controller.port, &ca, Some((&cert, &key)), "revoked").await;
    // And the name cannot enroll again.
    let token = controller.token(1).expect("token");
    let again = join(&controller, &token, "n1", &dir.path().join("again"));
    assert!(String::from_utf8_lossy(&again.stderr).contains("revoked"));
}

#[tokio::test]
async fn controller_restart_delivers_every_buffered_sample_exactly_once() {
    let dir = tempdir();
    // A window long enough to hold the samples of the whole outage.
    let mut controller = Controller::start(dir.path(), &["--metrics-window", "300"])
        .await
        .expect("controller");
    let _agent = Agent::join_and_run(
        dir.path(),
        &controller,
        "n1",
        &["--interval", "200ms", "--max-backoff", "1s"],
    )
    .await
    .expect("agent");
    wait_for(
        Duration::from_secs(20),
        "samples before the restart",
        || async {
            controller
                .window("n1")
                .await
                .is_ok_and(|w| w.samples.len() >= 5)
        },
    )
    .await
    .expect("samples");
    controller.kill().await;
    let down_at = SystemTime::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let up_at = SystemTime::now();
    controller.restart().await.expect("restart");
    wait_for(
        Duration::from_secs(20),
        "samples from after the restart",
        || async {
            controller.window("n1").await.is_ok_and(|w| {
                w.samples
                    .last()
                    .is_some_and(|s| s.at_unix_ms > ms(up_at) + 1000)
            })
        },
    )
    .await
    .expect("reconnected");
    let window = controller.window("n1").await.expect("window");
    let seqs: Vec<u64> = window.samples.iter().map(|s| s.seq).collect();
    for pair in seqs.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "gap or duplicate in {seqs:?}");
    }
    let during = window
        .samples
        .iter()
        .filter(|s| s.at_unix_ms > ms(down_at) && s.at_unix_ms < ms(up_at))
        .count();
    assert!(
        during >= 10,
        "samples taken while the controller was down arrived: {during}"
    );
    // They are in the metrics history too, one point each.
    let q: novacron_api::MetricsQueryResult = controller
        .admin_client()
        .expect("client")
        .get(format!(
            "{}/v1/metrics/query?metric=cpu_percent&node=n1&from={}&to={}&step=1ms&fn=last",
            controller.api(),
            ms(down_at) + 1,
            ms(up_at) - 1
        ))
        .send()
        .await
        .expect("query")
        .error_for_status()
        .expect("200")
        .json()
        .await
        .expect("json");
    let points = q.series[0].values.iter().flatten().count();
    assert_eq!(points, during, "history and window disagree on the outage");
}

#[tokio::test]
async fn garbage_and_oversized_frames_close_only_that_connection() {
    let dir = tempdir();
    let controller = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let _good = Agent::join_and_run(dir.path(), &controller, "good", &["--interval", "200ms"])
        .await
        .expect("agent");
    let token = controller.token(1).expect("token");
    let bad_dir = dir.path().join("bad");
    assert!(join(&controller, &token, "bad", &bad_dir).status.success());
    let (cert, key, ca) = (
        read(&bad_dir.join("node.pem")),
        read(&bad_dir.join("node-key.pem")),
        read(&bad_dir.join("ca.pem")),
    );
    let raw = RawClient::new().expect("client");

    let cases: [(&str, Vec<u8>, CloseCode); 3] = [
        (
            "garbage",
            [0, 0, 0, 6, 0xde, 0xad, 0xbe, 0xef, 0xff, 0xff].to_vec(),
            CloseCode::Malformed,
        ),
        (
            "oversized",
            u32::MAX.to_be_bytes().to_vec(),
            CloseCode::FrameTooLarge,
        ),
        (
            "unexpected",
            wire::encode_frame(&AgentMessage::RenewCertificate {
                request_id: 1,
                csr_pem: String::new(),
            })
            .expect("encodes"),
            CloseCode::Unexpected,
        ),
    ];
    for (what, bytes, code) in cases {
        let conn = raw
            .connect(controller.port, &ca, Some((&cert, &key)))
            .await
            .expect("handshake");
        let (mut send, _recv) = conn.open_bi().await.expect("stream");
        send.write_all(&bytes).await.expect("write");
        let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
            .await
            .unwrap_or_else(|_| panic!("{what}: not closed"));
        match reason {
            quinn::ConnectionError::ApplicationClosed(c) => {
                assert_eq!(
                    c.error_code.into_inner(),
                    u64::from(code.code()),
                    "{what}: {c:?}"
                );
            }
            other => panic!("{what}: unexpected close {other}"),
        }
    }
    // The good agent kept being served throughout.
    let before = controller.node("good").await.expect("api").expect("known");
    let seq_before = before.latest.map(|s| s.seq).unwrap_or(0);
    wait_for(Duration::from_secs(10), "the good agent's newer samples", || async {
        matches!(controller.node("good").await, Ok(Some(v)) if v.latest.as_ref().is_some_and(|s| s.seq > seq_before + 2) && v.status.to_string() == "ready")
    })
    .await
    .expect("still served");
}

#[tokio::test]
async fn a_killed_agent_is_down_within_the_threshold() {
    let dir = tempdir();
    let controller = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let mut agent = Agent::join_and_run(dir.path(), &controller, "n1", &[])
        .await
        .expect("agent");
    controller
        .wait_ready("n1", Duration::from_secs(20))
        .await
        .expect("ready");
    agent.kill().await;
    let killed = Instant::now();
    // Defaults: keep-alive 0.5 s + idle timeout 2 s + down after 0.8 s = 3.3 s at
    // worst, plus slack for polling and a loaded test machine. The measured time is
    // printed; a node that stayed `disconnected` or `ready` fails here.
    wait_for(Duration::from_millis(5000), "n1 down", || async {
        matches!(controller.node("n1").await, Ok(Some(v)) if v.status.to_string() == "down")
    })
    .await
    .expect("down in time");
    eprintln!("n1 down {:?} after the kill", killed.elapsed());
}

#[tokio::test]
async fn node_certificates_renew_over_the_link_before_expiry() {
    let dir = tempdir();
    let mut controller = Controller::start(dir.path(), &["--node-cert-ttl", "8s"])
        .await
        .expect("controller");
    let agent = Agent::join_and_run(dir.path(), &controller, "n1", &["--max-backoff", "1s"])
        .await
        .expect("agent");
    let serial = |pem: &str| pki::cert_info(&pki::first_cert_der(pem).expect("der")).expect("info");
    let first = serial(&agent.credentials().expect("creds").0);
    wait_for(Duration::from_secs(15), "a renewed certificate", || async {
        agent
            .credentials()
            .is_ok_and(|(c, _, _)| serial(&c).serial != first.serial)
    })
    .await
    .expect("renewed");
    let renewed = serial(&agent.credentials().expect("creds").0);
    assert!(renewed.not_after > first.not_after);
    // Past the first certificate's expiry, a fresh connection must still work.
    let wait = first
        .not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        + Duration::from_secs(1);
    tokio::time::sleep(wait).await;
    controller.stop().await;
    controller.restart().await.expect("restart");
    controller
        .wait_ready("n1", Duration::from_secs(15))
        .await
        .expect("reconnected with the renewed certificate");
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .expect("after epoch")
        .as_millis() as u64
}

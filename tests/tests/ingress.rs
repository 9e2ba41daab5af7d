//! The agents' ingress end to end, with real agents, Docker containers and the
//! controller: a two-replica HTTP service published through the ingress keeps
//! answering a client that never retries while a replica is killed and while the
//! job is rolled to a new version; it balances across nodes, counts on the
//! agent's `/metrics`, answers 503 once no replica runs; TLS termination (HTTP/2
//! over ALPN) and a TCP service work, and a certificate that cannot be read
//! leaves only its own service unserved.
//!
//! Both agents share this machine's Docker daemon, so each publishes (and serves
//! its ingress) on its own loopback address, as two hosts would on theirs.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use novacron_api::services::ServiceView;
use novacron_common::pki::{self, Validity};
use novacron_tests::{
    Agent, Controller, JobCleanup, docker, ensure_test_image, free_port, service_job, wait_for,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves /www on 8080: `/` answers the container's hostname, `/health` is the
/// readiness file.
const WEB: &str = "mkdir -p /www; echo ok > /www/health; hostname > /www/index.html; \
                   exec httpd -f -p 8080 -h /www";

async fn service(c: &Controller, name: &str) -> Option<ServiceView> {
    c.admin_client()
        .ok()?
        .get(format!("{}/v1/services/{name}", c.api()))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}

/// A dynamic port range of 10 per test process (see the workloads test).
fn port_range(offset: u16) -> String {
    let first = 24000 + (std::process::id() % 800) as u16 * 10 + offset;
    format!("{first}-{}", first + 4)
}

/// A client that never retries: one GET every 20 ms, each on its own, counting
/// answers that are not 200 (and errors) as failures, until told to stop (or
/// after 20,000 requests, so it always ends).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<(Vec<String>, BTreeSet<String>)>,
}

impl Load {
    fn start(url: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let (s, o) = (stop.clone(), ok.clone());
        let task = tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("client");
            let mut failures = Vec::new();
            let mut hosts = BTreeSet::new();
            for _ in 0..20_000 {
                if s.load(Ordering::Relaxed) {
                    break;
                }
                match client.get(&url).send().await {
                    Ok(r) if r.status() == reqwest::StatusCode::OK => match r.text().await {
                        Ok(body) => {
                            hosts.insert(body.trim().to_owned());
                            o.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => failures.push(format!("body: {e}")),
                    },
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(format!("error: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (failures, hosts)
        });
        Load { stop, ok, task }
    }

    async fn finish(self) -> (u64, Vec<String>, BTreeSet<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let (failures, hosts) = self.task.await.expect("load task");
        (self.ok.load(Ordering::Relaxed), failures, hosts)
    }
}

async fn healthy_endpoints(c: &Controller, svc: &str) -> Vec<String> {
    service(c, svc).await.map_or_else(Vec::new, |s| {
        s.endpoints
            .into_iter()
            .filter(|e| e.healthy)
            .map(|e| e.alloc)
            .collect()
    })
}

#[tokio::test]
async fn a_service_behind_the_ingress_answers_every_request_while_a_replica_dies_and_while_it_rolls()
 {
    ensure_test_image().expect("test image");
    let pid = std::process::id();
    let dir = tempfile::Builder::new()
        .prefix("novacron-ingress-")
        .tempdir()
        .expect("tempdir");
    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let metrics_port = free_port();
    let mut agents = Vec::new();
    for i in 0..2u16 {
        let name = format!("i{pid}-{i}");
        let ip = format!("127.0.0.{}", 22 + i);
        let metrics = format!(
            "127.0.0.1:{}",
            if i == 0 { metrics_port } else { free_port() }
        );
        agents.push(
            Agent::join_and_run(
                dir.path(),
                &c,
                &name,
                &[
                    "--publish-address",
                    &ip,
                    "--dynamic-ports",
                    &port_range(i * 5),
                    "--metrics-listen",
                    &metrics,
                    "--label",
                    &format!("zone=z{i}"),
                ],
            )
            .await
            .expect("agent"),
        );
    }
    for a in &agents {
        c.wait_ready(&a.name, Duration::from_secs(20))
            .await
            .expect("ready");
    }
    let job = format!("ing-{pid}");
    let svc = format!("front{pid}");
    let _cleanup = JobCleanup(job.clone());
    let ingress_port = free_port();
    let manifest = |version: &str| {
        service_job(
            &job,
            2,
            WEB,
            &format!(
                "    ports: [{{name: http, containerPort: 8080}}]\n    env: {{VERSION: \"{version}\"}}\n    shutdownDelay: 5s\n"
            ),
            &format!(
                "  placement: {{spread: [{{key: zone}}]}}
  update: {{maxParallel: 1, minHealthyTime: 1s}}
  health:
    readiness:
      http: {{port: 8080, path: /health}}
      period: 1s
      timeout: 500ms
      failureThreshold: 1
  services:
    - name: {svc}
      port: http
      ingress: {{port: {ingress_port}}}
"
            ),
        )
    };
    c.apply("ing.yaml", &manifest("1")).await.expect("apply");
    wait_for(Duration::from_secs(60), "two healthy endpoints", || async {
        healthy_endpoints(&c, &svc).await.len() == 2
    })
    .await
    .expect("listed");

    // Node 0's ingress serves the service, from replicas on both nodes.
    let url = format!("http://127.0.0.22:{ingress_port}/");
    wait_for(Duration::from_secs(10), "the ingress to serve", || async {
        reqwest::get(&url)
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await
    .expect("served");
    let load = Load::start(url.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (ok, failures, hosts) = load.finish().await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(
        hosts.len(),
        2,
        "both replicas answer through one node's ingress: {hosts:?}"
    );
    assert!(ok > 20, "{ok}");
    let allocs = c.job(&job).await.expect("job").allocations;
    let nodes: BTreeSet<&str> = allocs.iter().map(|a| a.node.as_str()).collect();
    assert_eq!(nodes.len(), 2, "spread over both nodes: {allocs:?}");

    // A replica is killed under load: no request fails.
    let load = Load::start(url.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let victim = healthy_endpoints(&c, &svc).await.remove(0);
    let container = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=novacron.alloc={victim}"),
    ])
    .expect("docker ps");
    docker(&["kill", container.trim()]).expect("docker kill");
    let killed = Instant::now();
    // How long until the dead replica leaves the catalog and node 0's ingress
    // table (printed for BENCHMARKS.md, not asserted).
    let gauge = format!(
        "novacron_ingress_endpoints{{node=\"{}\",service=\"{svc}\"}} 1",
        agents[0].name
    );
    let (mut left_catalog, mut left_ingress) = (None, None);
    while killed.elapsed() < Duration::from_secs(30)
        && (left_catalog.is_none() || left_ingress.is_none())
    {
        if left_catalog.is_none() && !healthy_endpoints(&c, &svc).await.contains(&victim) {
            left_catalog = Some(killed.elapsed());
        }
        if left_ingress.is_none()
            && let Ok(r) = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics")).await
            && r.text().await.is_ok_and(|t| t.contains(&gauge))
        {
            left_ingress = Some(killed.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "replica killed: out of the catalog after {left_catalog:?}, out of the ingress after {left_ingress:?}"
    );
    wait_for(Duration::from_secs(60), "the replica back", || async {
        healthy_endpoints(&c, &svc).await.len() == 2
    })
    .await
    .expect("recovered");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, failures, _) = load.finish().await;
    eprintln!(
        "replica killed: {ok} requests answered, {} failed, recovered in {:?}",
        failures.len(),
        killed.elapsed()
    );
    assert!(
        failures.is_empty(),
        "requests failed while a replica died: {failures:?}"
    );

    // The job rolls to a new version under load: no request fails.
    let load = Load::start(url.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.apply("ing.yaml", &manifest("2")).await.expect("apply v2");
    let rolled = Instant::now();
    let rolled_out = wait_for(Duration::from_secs(120), "the rollout", || async {
        let Ok(detail) = c.job(&job).await else {
            return false;
        };
        let version = detail.summary.version;
        let current: Vec<_> = detail
            .allocations
            .iter()
            .filter(|a| a.desired_run)
            .collect();
        current.len() == 2
            && current
                .iter()
                .all(|a| a.version == version && a.healthy == Some(true))
            && healthy_endpoints(&c, &svc).await.len() == 2
    })
    .await;
    if let Err(e) = rolled_out {
        let detail = c.job(&job).await.expect("job");
        let allocs: Vec<_> = detail
            .allocations
            .iter()
            .map(|a| {
                (
                    a.id.clone(),
                    a.version,
                    a.desired_run,
                    a.state,
                    a.healthy,
                    a.message.clone(),
                )
            })
            .collect();
        let ps = docker(&["ps", "-a", "--format", "{{.Names}} {{.Status}} {{.Ports}}"]);
        let ss = std::process::Command::new("ss")
            .args(["-ltnp"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        let logs: Vec<String> = agents
            .iter()
            .map(|a| {
                a.log()
                    .lines()
                    .filter(|l| !l.contains("ingress"))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect();
        panic!(
            "{e}: {:?}\n{allocs:#?}\n{ps:?}\n{ss:?}\n{}",
            detail.summary,
            logs.join("\n=====\n")
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ok, failures, _) = load.finish().await;
    eprintln!(
        "rollout: {ok} requests answered, {} failed, rolled in {:?}",
        failures.len(),
        rolled.elapsed()
    );
    assert!(
        failures.is_empty(),
        "requests failed during the rollout: {failures:?}"
    );

    // The agent counts what its ingress served.
    let metrics = reqwest::get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let node0 = &agents[0].name;
    let served: u64 = metrics
        .lines()
        .find(|l| {
            l.starts_with(&format!(
                "novacron_ingress_requests_total{{node=\"{node0}\",service=\"{svc}\",code=\"2xx\"}}"
            ))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no 2xx counter for {svc}:\n{metrics}"));
    assert!(served >= ok, "{served} < {ok}");
    assert!(
        metrics.contains(&format!(
            "novacron_ingress_endpoints{{node=\"{node0}\",service=\"{svc}\"}} 2"
        )),
        "{metrics}"
    );

    // Stopped: the endpoints leave the catalog at once, the containers stop
    // only after the shutdown delay; the listener stays and says why it cannot
    // serve.
    let stop = c.cli(&["job", "stop", &job]);
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    wait_for(Duration::from_secs(10), "no endpoint listed", || async {
        service(&c, &svc)
            .await
            .is_some_and(|s| s.endpoints.is_empty())
    })
    .await
    .expect("deregistered");
    let running =
        docker(&["ps", "-q", "--filter", &format!("label=novacron.job={job}")]).expect("docker ps");
    // (An old version's replica of the rollout may still be in its delay too.)
    assert!(
        running.lines().count() >= 2,
        "both containers still run during their 5 s shutdown delay: {running}"
    );
    wait_for(Duration::from_secs(30), "503 from the ingress", || async {
        reqwest::get(&url)
            .await
            .is_ok_and(|r| r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE)
    })
    .await
    .expect("503");
    wait_for(
        Duration::from_secs(30),
        "the containers stopped",
        || async {
            docker(&["ps", "-q", "--filter", &format!("label=novacron.job={job}")])
                .is_ok_and(|ids| ids.trim().is_empty())
        },
    )
    .await
    .expect("stopped after the delay");
}

#[tokio::test]
async fn the_ingress_terminates_tls_with_http2_serves_tcp_and_skips_a_service_whose_certificate_is_missing()
 {
    ensure_test_image().expect("test image");
    let pid = std::process::id();
    let dir = tempfile::Builder::new()
        .prefix("novacron-ingress-tls-")
        .tempdir()
        .expect("tempdir");
    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let ip = "127.0.0.24";
    let agent = Agent::join_and_run(
        dir.path(),
        &c,
        &format!("t{pid}"),
        &["--publish-address", ip, "--dynamic-ports", &port_range(0)],
    )
    .await
    .expect("agent");
    c.wait_ready(&agent.name, Duration::from_secs(20))
        .await
        .expect("ready");
    let ca = pki::generate_ca(
        "ingress test CA",
        Validity::starting(std::time::SystemTime::now(), Duration::from_secs(3600)),
    )
    .expect("ca");
    let server = pki::issue_server_cert(
        &ca,
        &[ip.to_string()],
        Validity::starting(std::time::SystemTime::now(), Duration::from_secs(3600)),
    )
    .expect("server cert");
    let cert = dir.path().join("web.pem");
    let key = dir.path().join("web.key");
    std::fs::write(&cert, format!("{}{}", server.cert_pem, ca.cert_pem)).expect("cert");
    std::fs::write(&key, &server.key_pem).expect("key");
    let (tls_port, tcp_port, broken_port) = (free_port(), free_port(), free_port());
    let job = format!("ingtls-{pid}");
    let _cleanup = JobCleanup(job.clone());
    let manifest = service_job(
        &job,
        1,
        WEB,
        "    ports: [{name: http, containerPort: 8080}]\n",
        &format!(
            "  services:
    - name: tls{pid}
      port: http
      ingress: {{port: {tls_port}, tls: {{certFile: {}, keyFile: {}}}}}
    - name: tcp{pid}
      port: http
      ingress: {{port: {tcp_port}, protocol: tcp}}
    - name: broken{pid}
      port: http
      ingress: {{port: {broken_port}, tls: {{certFile: /nonexistent/web.pem, keyFile: /nonexistent/web.key}}}}
",
            cert.display(),
            key.display()
        ),
    );
    c.apply("tls.yaml", &manifest).await.expect("apply");

    // TLS: the certificate from the files, HTTP/2 when the client offers it.
    let config = novacron_common::tls::client_config(&ca.cert_pem, None, &[b"h2", b"http/1.1"])
        .expect("client config");
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let url = format!("https://{ip}:{tls_port}/");
    wait_for(
        Duration::from_secs(60),
        "the TLS ingress to serve",
        || async {
            client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        },
    )
    .await
    .expect("served over TLS");
    let resp = client.get(&url).send().await.expect("GET");
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let host = resp.text().await.expect("body");
    assert!(!host.trim().is_empty());

    // A renewed certificate (here from another CA) is taken up without a
    // restart: a client that trusts only the new CA gets through.
    let ca2 = pki::generate_ca(
        "ingress test CA 2",
        Validity::starting(std::time::SystemTime::now(), Duration::from_secs(3600)),
    )
    .expect("ca2");
    let renewed = pki::issue_server_cert(
        &ca2,
        &[ip.to_string()],
        Validity::starting(std::time::SystemTime::now(), Duration::from_secs(3600)),
    )
    .expect("renewed cert");
    std::fs::write(&key, &renewed.key_pem).expect("key");
    std::fs::write(&cert, format!("{}{}", renewed.cert_pem, ca2.cert_pem)).expect("cert");
    let client2 = reqwest::Client::builder()
        .tls_backend_preconfigured(
            novacron_common::tls::client_config(&ca2.cert_pem, None, &[b"h2", b"http/1.1"])
                .expect("client config"),
        )
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let renewed_at = Instant::now();
    wait_for(
        Duration::from_secs(20),
        "the renewed certificate",
        || async {
            client2
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        },
    )
    .await
    .expect("served with the renewed certificate");
    eprintln!("certificate renewal taken up in {:?}", renewed_at.elapsed());
    let stale = reqwest::Client::builder()
        .tls_backend_preconfigured(
            novacron_common::tls::client_config(&ca.cert_pem, None, &[b"http/1.1"])
                .expect("client config"),
        )
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    assert!(
        stale.get(&url).send().await.is_err(),
        "a client that trusts only the old CA no longer gets through"
    );

    // TCP: bytes through to the replica, whatever they say.
    let mut conn = tokio::net::TcpStream::connect((ip, tcp_port))
        .await
        .expect("tcp ingress");
    conn.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_string(&mut answer))
        .await
        .expect("an answer within 5 s")
        .expect("read");
    assert!(
        answer.starts_with("HTTP/1.") && answer.contains(" 200 "),
        "{answer}"
    );
    assert!(answer.contains(host.trim()), "{answer}");

    // Another job cannot take a port one of these services publishes.
    let clash = service_job(
        &format!("clash-{pid}"),
        1,
        WEB,
        "    ports: [{name: http, containerPort: 8080}]\n",
        &format!(
            "  services:\n    - {{name: other{pid}, port: http, ingress: {{port: {tcp_port}}}}}\n"
        ),
    );
    let refused = c
        .apply("clash.yaml", &clash)
        .await
        .expect_err("a taken ingress port");
    assert!(
        refused.to_string().contains(&format!(
            "{tcp_port} is already the ingress port of service \\\"tcp{pid}\\\""
        )),
        "{refused}"
    );
    // Nor ask for it as a static host port: every node's ingress holds it.
    let clash = service_job(
        &format!("clash-{pid}"),
        1,
        WEB,
        &format!("    ports: [{{name: http, containerPort: 8080, hostPort: {tcp_port}}}]\n"),
        "",
    );
    let refused = c
        .apply("clash.yaml", &clash)
        .await
        .expect_err("a host port the ingress holds");
    assert!(
        refused.to_string().contains(&format!(
            "host port {tcp_port} is the ingress port of service"
        )),
        "{refused}"
    );

    // The service whose certificate cannot be read is not served; the others are.
    assert!(
        tokio::net::TcpStream::connect((ip, broken_port))
            .await
            .is_err(),
        "nothing listens for a service whose certificate is missing"
    );
}

/// A WebSocket goes through the HTTP ingress: the upgrade reaches the endpoint
/// with its headers, the 101 comes back, and messages flow both ways until the
/// client closes. The agent's ingress code runs in this process, in front of a
/// tokio-tungstenite echo server (no container needed).
#[tokio::test]
async fn a_websocket_passes_through_the_http_ingress() {
    use futures_util::{SinkExt, StreamExt};
    use novacron_common::wire::{IngressEndpoint, IngressProtocol, IngressService, IngressTable};
    use tokio_tungstenite::tungstenite::Message;

    let backend = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let backend_addr = backend.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = backend.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        let reply = match msg {
                            Message::Text(t) => Message::text(format!("echo {}", t.as_str())),
                            other => other,
                        };
                        if ws.send(reply).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    let port = free_port();
    let ingress = novacron_agent::ingress::Ingress::new("127.0.0.1".parse().expect("ip"), 1);
    ingress.apply(IngressTable {
        revision: 1,
        services: vec![IngressService {
            name: "ws".into(),
            port,
            protocol: IngressProtocol::Http,
            tls: None,
            endpoints: vec![IngressEndpoint {
                alloc: "ws-1".into(),
                address: backend_addr,
                weight: 100,
            }],
        }],
        ..IngressTable::default()
    });
    wait_for(Duration::from_secs(10), "the ingress to listen", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await
    .expect("listening");
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut ws, response) =
        tokio_tungstenite::client_async(format!("ws://127.0.0.1:{port}/chat"), stream)
            .await
            .expect("the upgrade goes through the ingress");
    assert_eq!(response.status().as_u16(), 101);
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}")))
            .await
            .expect("send");
        let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a reply within 5 s")
            .expect("open")
            .expect("a message");
        assert_eq!(
            reply.into_text().expect("text").as_str(),
            format!("echo hello {i}")
        );
    }
    ws.close(None).await.expect("close");
}

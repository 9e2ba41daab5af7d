//! The agent's DNS end to end: an agent started with `--dns-listen` answers
//! `<service>.service.novacron.` from the table the controller sends (and follows
//! a replica's readiness flip), forwards every other name to its upstream (here a
//! second DNS server the test runs, since these machines reach no outside
//! resolver), and, listening on port 53 of its Docker daemon's bridge, is the
//! resolver of the containers it starts: a container finds a service by name.
//!
//! The container test uses the experimental Docker daemon "a" that
//! `bash .ci/setup checkpoint` starts with its own bridge (`ncbr-a`), so port 53
//! is taken only on that test bridge's address, never on the machine's resolver.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use novacron_api::services::{EndpointView, ServiceView};
use novacron_tests::counter_image::counter_image;
use novacron_tests::dns::{query as dns, srv_ports};
use novacron_tests::{
    Agent, Controller, DaemonsCleanup, JobCleanup, docker, docker_on, ensure_test_image, free_port,
    service_job, wait_for,
};

/// Serves /www on 8080 with a readiness file, /www/health.
const WEB: &str = "mkdir -p /www; echo ok > /www/health; exec httpd -f -p 8080 -h /www";

/// The address the test's upstream resolver gives `up.service.example.`.
const UPSTREAM_ANSWER: &str = "192.0.2.77";

/// Starts a DNS server for `example.` (a real hickory server, as the outside
/// world's resolver would be) that knows `up.service.example.`, on a thread of
/// its own: the test blocks its runtime while `docker exec` runs.
fn upstream() -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            tx.send(serve_upstream().await).expect("send");
            std::future::pending::<()>().await
        })
    });
    rx.recv().expect("the upstream DNS started")
}

async fn serve_upstream() -> SocketAddr {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let zone = Arc::new(novacron_dns::Zone {
        domain: novacron_dns::Name::from_ascii("example.").expect("name"),
        services: vec![ServiceView {
            name: "up".into(),
            jobs: vec![],
            endpoints: vec![EndpointView {
                alloc: "u1".into(),
                job: "up".into(),
                node: "elsewhere".into(),
                address: UPSTREAM_ANSWER.parse().expect("ip"),
                port: 80,
                protocol: "tcp".into(),
                healthy: true,
                tags: vec![],
                zone: None,
                weight: 100,
            }],
        }],
    });
    novacron_dns::serve(
        addr,
        novacron_dns::FleetDns::new(Arc::new(move || zone.clone())),
    )
    .await
    .expect("upstream DNS");
    addr
}

async fn srv(server: SocketAddr, fqdn: &str) -> Vec<u16> {
    match dns(server, fqdn, RecordType::SRV).await {
        Some((ResponseCode::NoError, data)) => srv_ports(&data),
        _ => Vec::new(),
    }
}

/// The service `name` as the controller lists it, once it has an endpoint.
async fn listed(c: &Controller, name: &str) -> Option<ServiceView> {
    let resp = c
        .admin_client()
        .ok()?
        .get(format!("{}/v1/services/{name}", c.api()))
        .send()
        .await
        .ok()?;
    let view: ServiceView = resp.json().await.ok()?;
    (!view.endpoints.is_empty()).then_some(view)
}

#[tokio::test]
async fn the_agent_answers_the_fleet_domain_follows_readiness_and_forwards_the_rest() {
    ensure_test_image().expect("test image");
    let up = upstream();
    let dir = tempfile::Builder::new()
        .prefix("novacron-agent-dns-")
        .tempdir()
        .expect("tempdir");
    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let dns_at: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let pid = std::process::id();
    let agent = Agent::join_and_run(
        dir.path(),
        &c,
        &format!("d{pid}"),
        &[
            "--dns-listen",
            &dns_at.to_string(),
            "--dns-upstream",
            &up.to_string(),
        ],
    )
    .await
    .expect("agent");
    c.wait_ready(&agent.name, Duration::from_secs(20))
        .await
        .expect("ready");
    let job = format!("adns-{pid}");
    let svc = format!("dweb{pid}");
    let _cleanup = JobCleanup(job.clone());
    let manifest = service_job(
        &job,
        2,
        WEB,
        "    ports: [{name: http, containerPort: 8080}]\n",
        &format!(
            "  health:
    readiness:
      http: {{port: 8080, path: /health}}
      period: 1s
      timeout: 500ms
      failureThreshold: 1
  services:
    - {{name: {svc}, port: http, weight: 20}}
"
        ),
    );
    c.apply("svc.yaml", &manifest).await.expect("apply");
    let fqdn = format!("{svc}.service.novacron.");
    wait_for(
        Duration::from_secs(60),
        "two replicas in the agent's DNS",
        || async { srv(dns_at, &fqdn).await.len() == 2 },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log()));
    let (_, records) = dns(dns_at, &fqdn, RecordType::SRV).await.expect("SRV");
    assert!(
        records
            .iter()
            .all(|d| matches!(d, RData::SRV(srv) if srv.weight == 20)),
        "the service's weight is each SRV record's: {records:?}"
    );
    let (code, a) = dns(dns_at, &fqdn, RecordType::A).await.expect("an answer");
    assert_eq!(code, ResponseCode::NoError);
    assert!(matches!(a.as_slice(), [RData::A(_)]), "{a:?}");
    assert_eq!(
        dns(dns_at, "nope.service.novacron.", RecordType::A)
            .await
            .expect("an answer")
            .0,
        ResponseCode::NXDomain
    );

    // Another name goes to the upstream resolver and its answer comes back.
    let (code, forwarded) = dns(dns_at, "up.service.example.", RecordType::A)
        .await
        .expect("a forwarded answer");
    assert_eq!(code, ResponseCode::NoError);
    assert_eq!(
        forwarded.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
        [UPSTREAM_ANSWER]
    );

    // One replica fails its readiness check: the agent's DNS drops it.
    let before = srv(dns_at, &fqdn).await;
    let container =
        docker(&["ps", "-q", "--filter", &format!("label=novacron.job={job}")]).expect("ps");
    let one = container.lines().next().expect("a container").to_owned();
    docker(&["exec", &one, "rm", "/www/health"]).expect("break its readiness");
    let broke_at = Instant::now();
    wait_for(
        Duration::from_secs(15),
        "the unready replica leaves the agent's DNS",
        || async { srv(dns_at, &fqdn).await.len() == 1 },
    )
    .await
    .expect("dropped");
    eprintln!(
        "readiness flip to the agent's DNS: {:?}",
        broke_at.elapsed()
    );
    let after = srv(dns_at, &fqdn).await;
    assert!(
        after.iter().all(|p| before.contains(p)),
        "{before:?} -> {after:?}"
    );
    docker(&["exec", &one, "sh", "-c", "echo ok > /www/health"]).expect("heal");
    wait_for(Duration::from_secs(15), "it comes back", || async {
        srv(dns_at, &fqdn).await.len() == 2
    })
    .await
    .expect("back");
}

#[tokio::test]
async fn a_container_resolves_services_and_other_names_through_its_agent() {
    let Ok(host) = std::env::var("NOVACRON_CKPT_DOCKER_A") else {
        panic!(
            "needs the test Docker daemon \"a\" and its bridge: run `bash .ci/setup checkpoint` \
             and export the variables in /var/tmp/novacron-ckpt/env (bash .ci/test does both)"
        );
    };
    let gateway = docker_on(
        &host,
        &[
            "network",
            "inspect",
            "bridge",
            "-f",
            "{{(index .IPAM.Config 0).Gateway}}",
        ],
    )
    .expect("the bridge's gateway");
    let image = counter_image(Some(&host)).expect("an image with busybox on daemon a");
    let up = upstream();
    let dir = tempfile::Builder::new()
        .prefix("novacron-agent-dns-c-")
        .tempdir()
        .expect("tempdir");
    let c = Controller::start(dir.path(), &[])
        .await
        .expect("controller");
    let pid = std::process::id();
    let job = format!("cdns-{pid}");
    let _cleanup = DaemonsCleanup {
        hosts: vec![host.clone()],
        job: job.clone(),
        volume: format!("{job}-none"),
    };
    let listen = format!("{gateway}:53");
    let agent = Agent::join_and_run(
        dir.path(),
        &c,
        &format!("c{pid}"),
        &[
            "--docker-host",
            &host,
            "--dns-listen",
            &listen,
            "--dns-upstream",
            &up.to_string(),
        ],
    )
    .await
    .expect("agent");
    c.wait_ready(&agent.name, Duration::from_secs(30))
        .await
        .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log()));
    let svc = format!("cweb{pid}");
    let manifest = format!(
        "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: {job}
spec:
  type: service
  replicas: 1
  task:
    image: {image}
    command: [sh, -c, 'exec sleep 3600']
    ports: [{{name: http, containerPort: 8080}}]
  resources:
    cpu: 100m
    memory: 32Mi
  services:
    - {{name: {svc}, port: http}}
"
    );
    c.apply("c.yaml", &manifest).await.expect("apply");
    let filter = format!("label=novacron.job={job}");
    let mut container = String::new();
    wait_for(Duration::from_secs(60), "the container runs", || {
        container = docker_on(&host, &["ps", "-q", "--filter", &filter]).unwrap_or_default();
        let running = !container.is_empty();
        async move { running }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log()));
    let resolv = docker_on(&host, &["exec", &container, "cat", "/etc/resolv.conf"]).expect("cat");
    assert!(
        resolv
            .lines()
            .any(|l| l.trim() == format!("nameserver {gateway}")),
        "the container resolves through its agent:\n{resolv}"
    );
    // The endpoint the catalog lists, as the container must find it.
    wait_for(
        Duration::from_secs(30),
        "the catalog lists the replica",
        || async { listed(&c, &svc).await.is_some() },
    )
    .await
    .expect("listed");
    let address = listed(&c, &svc).await.expect("listed").endpoints[0]
        .address
        .to_string();
    let fqdn = format!("{svc}.service.novacron.");
    let mut out = String::new();
    wait_for(
        Duration::from_secs(30),
        "the container resolves the service",
        || {
            out = docker_on(&host, &["exec", &container, "nslookup", "-type=a", &fqdn])
                .unwrap_or_else(|e| e.to_string());
            let found = out.contains(&format!("Address: {address}"));
            async move { found }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {out}; agent log:\n{}", agent.log()));
    assert!(
        out.contains(&format!("Server:\t\t{gateway}")) || out.contains(&gateway),
        "{out}"
    );
    let forwarded = docker_on(
        &host,
        &[
            "exec",
            &container,
            "nslookup",
            "-type=a",
            "up.service.example.",
        ],
    )
    .expect("a name outside the fleet");
    assert!(forwarded.contains(UPSTREAM_ANSWER), "{forwarded}");
}

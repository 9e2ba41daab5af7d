//! The service catalog end to end: a job's declared service lists the endpoints
//! of its running replicas at addresses that answer, follows their readiness,
//! blocks a watcher until it changes, answers DNS (SRV and A) for its healthy
//! replicas, and becomes HAProxy and nginx configurations that Debian's
//! `haproxy` and `nginx` accept and serve through.

use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, RecordType};
use novacron_api::services::ServiceView;
use novacron_tests::dns::srv_ports;
use novacron_tests::{
    Agent, Controller, JobCleanup, bin, docker, ensure_test_image, free_port, service_job, wait_for,
};

/// Serves /www on 8080 with a readiness file, /www/health.
const WEB: &str = "mkdir -p /www; echo ok > /www/health; hostname > /www/index.html; \
                   exec httpd -f -p 8080 -h /www";

async fn service(c: &Controller, name: &str) -> Option<(ServiceView, u64)> {
    let resp = c
        .admin_client()
        .ok()?
        .get(format!("{}/v1/services/{name}", c.api()))
        .send()
        .await
        .ok()?;
    let index = resp
        .headers()
        .get("x-novacron-index")?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some((resp.json().await.ok()?, index))
}

async fn get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    let resp = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    resp.status().is_success().then_some(())?;
    resp.text().await.ok()
}

/// Asks the controller's DNS at `server` for `name`/`kind`.
async fn dns(
    server: std::net::SocketAddr,
    name: &str,
    kind: RecordType,
) -> (ResponseCode, Vec<RData>) {
    novacron_tests::dns::query(server, name, kind)
        .await
        .expect("a DNS answer within 2 s")
}

fn nginx() -> std::path::PathBuf {
    let path = std::path::PathBuf::from("/usr/sbin/nginx");
    assert!(
        path.exists()
            && std::path::Path::new("/usr/lib/nginx/modules/ngx_stream_module.so").exists(),
        "nginx with its stream module is not installed: run `bash .ci/setup` (it installs Debian's \
         nginx and libnginx-mod-stream)"
    );
    path
}

fn haproxy() -> std::path::PathBuf {
    let path = std::path::PathBuf::from("/usr/sbin/haproxy");
    assert!(
        path.exists(),
        "haproxy is not installed: run `bash .ci/setup` (it installs Debian's haproxy)"
    );
    path
}

#[tokio::test]
async fn the_catalog_follows_replicas_and_readiness_and_haproxy_and_nginx_serve_its_config() {
    ensure_test_image().expect("test image");
    let haproxy = haproxy();
    let dir = tempfile::Builder::new()
        .prefix("novacron-svc-")
        .tempdir()
        .expect("tempdir");
    let dns_at: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let c = Controller::start(dir.path(), &["--dns-listen", &dns_at.to_string()])
        .await
        .expect("controller");
    let name = format!("s{}", std::process::id());
    let mut agent = Agent::join_and_run(dir.path(), &c, &name, &["--label", "zone=a"])
        .await
        .expect("agent");
    c.wait_ready(&agent.name, Duration::from_secs(20))
        .await
        .expect("ready");
    let job = format!("svc-{}", std::process::id());
    let svc = format!("web{}", std::process::id());
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
      period: 2s
      timeout: 1500ms
      failureThreshold: 2
  services:
    - {{name: {svc}, port: http, tags: [v1]}}
"
        ),
    );
    c.apply("svc.yaml", &manifest).await.expect("apply");

    // Both replicas listed, healthy, at addresses that serve them.
    wait_for(Duration::from_secs(60), "two healthy endpoints", || async {
        service(&c, &svc)
            .await
            .is_some_and(|(s, _)| s.endpoints.len() == 2 && s.endpoints.iter().all(|e| e.healthy))
    })
    .await
    .expect("listed");
    let (listed, index) = service(&c, &svc).await.expect("service");
    assert_eq!(listed.jobs, vec![job.clone()]);
    for e in &listed.endpoints {
        assert_eq!(
            (e.zone.as_deref(), e.tags.clone()),
            (Some("a"), vec!["v1".to_owned()])
        );
        // (Once, in CI under load, the first request right after both were
        // listed healthy got no answer: a few tries, 10 s at most.)
        let mut host = None;
        for _ in 0..20 {
            host = get(e.socket_addr(), "/").await;
            if host.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let host = host.expect("the endpoint answers");
        let container = docker(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=novacron.alloc={}", e.alloc),
        ])
        .expect("docker ps");
        assert_eq!(
            host.trim(),
            container.trim(),
            "{e:?} reaches its own replica"
        );
    }
    // DNS: SRV names each healthy replica's port, A its node's address.
    // The DNS answers from the catalog at each query; a probe that times out on
    // a loaded host may take a replica out for a moment, so the answer is
    // awaited rather than read once.
    let fqdn = format!("{svc}.service.novacron.");
    let mut ports: Vec<u16> = listed.endpoints.iter().map(|e| e.port).collect();
    ports.sort();
    wait_for(
        Duration::from_secs(15),
        "DNS with both replicas",
        || async {
            let (code, srv) = dns(dns_at, &fqdn, RecordType::SRV).await;
            code == ResponseCode::NoError && srv_ports(&srv) == ports
        },
    )
    .await
    .expect("both replicas in DNS");
    let (_, a) = dns(dns_at, &fqdn, RecordType::A).await;
    assert_eq!(a, vec![RData::A(A("127.0.0.1".parse().expect("ip")))]);
    let target = format!("{}.alloc.novacron.", listed.endpoints[0].alloc);
    assert_eq!(dns(dns_at, &target, RecordType::A).await.1.len(), 1);
    assert_eq!(
        dns(dns_at, "nope.service.novacron.", RecordType::A).await.0,
        ResponseCode::NXDomain
    );
    assert_eq!(
        dns(dns_at, "example.com.", RecordType::A).await.0,
        ResponseCode::Refused
    );
    let text = String::from_utf8_lossy(&c.cli(&["service", "list"]).stdout).into_owned();
    assert!(text.contains(&svc) && text.contains(" 2 "), "{text}");

    // `lb-config --watch` keeps an HAProxy configuration up to date and reloads.
    let port = free_port();
    let file = dir.path().join("haproxy.cfg");
    let reloads = dir.path().join("reloads");
    let mut lb = tokio::process::Command::new(bin("novacron"))
        .arg("--config")
        .arg(c.data_dir.with_file_name("cli-config.toml"))
        .args(["service", "lb-config", "--watch", "5s", "--listen"])
        .arg(format!("{svc}=127.0.0.1:{port}"))
        .arg("--out")
        .arg(&file)
        .arg("--reload")
        .arg(format!("echo reloaded >> {}", reloads.display()))
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("lb-config --watch runs");
    let count =
        |path: &std::path::Path| std::fs::read_to_string(path).map_or(0, |t| t.lines().count());
    let holds = |alloc: &str| std::fs::read_to_string(&file).is_ok_and(|t| t.contains(alloc));
    wait_for(
        Duration::from_secs(20),
        "the first configuration",
        || async { listed.endpoints.iter().all(|e| holds(&e.alloc)) && count(&reloads) == 1 },
    )
    .await
    .expect("written");

    // A watcher follows the catalog with blocking queries while one replica stops
    // being ready. Each answer comes either with a new index (something in the
    // store changed: any write moves it) or once its wait has passed, never early
    // with the same index.
    let broken = listed.endpoints[0].clone();
    let client = c.admin_client().expect("client");
    let (api, watched, gone) = (c.api(), svc.clone(), broken.alloc.clone());
    let watch = tokio::spawn(async move {
        let t0 = Instant::now();
        let mut index = index;
        loop {
            let asked = Instant::now();
            let url = format!("{api}/v1/services/{watched}?index={index}&wait=2s");
            let resp = client.get(url).send().await.expect("blocking query");
            let next: u64 = resp
                .headers()
                .get("x-novacron-index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .expect("an index");
            assert!(
                next != index || asked.elapsed() >= Duration::from_millis(1900),
                "answered after {:?} with the same index {index}",
                asked.elapsed()
            );
            index = next;
            let view: ServiceView = resp.json().await.expect("json");
            if view.endpoints.iter().any(|e| e.alloc == gone && !e.healthy) {
                return (t0.elapsed(), view);
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "no change seen");
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let container = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=novacron.alloc={}", broken.alloc),
    ])
    .expect("docker ps");
    let broke_at = Instant::now();
    docker(&["exec", container.trim(), "rm", "/www/health"]).expect("break readiness");
    let (waited, changed) = watch.await.expect("watcher");
    wait_for(
        Duration::from_secs(15),
        "the endpoint marked unhealthy",
        || async {
            service(&c, &svc).await.is_some_and(|(s, _)| {
                s.endpoints
                    .iter()
                    .any(|e| e.alloc == broken.alloc && !e.healthy)
            })
        },
    )
    .await
    .expect("unhealthy");
    wait_for(
        Duration::from_secs(15),
        "DNS without the broken replica",
        || async { srv_ports(&dns(dns_at, &fqdn, RecordType::SRV).await.1) != ports },
    )
    .await
    .expect("left DNS");
    let dns_after = broke_at.elapsed();
    let (_, srv) = dns(dns_at, &fqdn, RecordType::SRV).await;
    assert_eq!(srv.len(), 1, "{srv:?}");
    eprintln!("readiness flip to DNS: {dns_after:?}");
    eprintln!(
        "readiness flip to catalog: {:?} (the watcher saw it {waited:?} after it started, with {} endpoints)",
        broke_at.elapsed(),
        changed.endpoints.len()
    );

    wait_for(
        Duration::from_secs(20),
        "the configuration rewritten",
        || async { !holds(&broken.alloc) && count(&reloads) >= 2 },
    )
    .await
    .expect("rewritten");
    eprintln!(
        "readiness flip to a reloaded configuration: {:?}",
        broke_at.elapsed()
    );
    let _ = lb.kill().await;

    // HAProxy: the generated configuration (the same on standard output) passes
    // `haproxy -c` and serves only the healthy replica.
    let out = c.cli(&[
        "service",
        "lb-config",
        "--listen",
        &format!("{svc}=127.0.0.1:{port}"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(std::fs::read_to_string(&file).expect("read"), config);
    let check = std::process::Command::new(&haproxy)
        .args(["-c", "-f"])
        .arg(&file)
        .output()
        .expect("haproxy runs");
    assert!(
        check.status.success(),
        "haproxy -c refused:\n{config}\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let mut proxy = tokio::process::Command::new(&haproxy)
        .args(["-db", "-f"])
        .arg(&file)
        .kill_on_drop(true)
        .spawn()
        .expect("haproxy starts");
    let healthy = listed
        .endpoints
        .iter()
        .find(|e| e.alloc != broken.alloc)
        .expect("the other replica");
    let healthy_host = get(healthy.socket_addr(), "/").await.expect("answers");
    let front: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    wait_for(Duration::from_secs(10), "haproxy to serve", || async {
        get(front, "/").await.is_some()
    })
    .await
    .expect("served");
    for _ in 0..4 {
        assert_eq!(
            get(front, "/").await.as_deref(),
            Some(healthy_host.as_str())
        );
    }
    let _ = proxy.kill().await;

    // The nginx form of the same catalog: `nginx -t` accepts it, and nginx serves
    // the healthy replica through it.
    let nginx = nginx();
    let nginx_port = free_port();
    let out = c.cli(&[
        "service",
        "lb-config",
        "--format",
        "nginx",
        "--listen",
        &format!("{svc}=127.0.0.1:{nginx_port}"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stream = dir.path().join("novacron-stream.conf");
    std::fs::write(&stream, &out.stdout).expect("write");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&broken.alloc));
    let main = dir.path().join("nginx.conf");
    std::fs::write(
        &main,
        format!(
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
             pid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log;\ndaemon off;\n\
             master_process off;\n\
             events {{}}\ninclude {stream};\n",
            dir = dir.path().display(),
            stream = stream.display()
        ),
    )
    .expect("write");
    let nginx_args = |test: bool| {
        let mut args = vec![
            "-p".to_owned(),
            dir.path().display().to_string(),
            "-e".to_owned(),
            dir.path().join("nginx-error.log").display().to_string(),
            "-c".to_owned(),
            main.display().to_string(),
        ];
        if test {
            args.push("-t".to_owned());
        }
        args
    };
    let check = std::process::Command::new(&nginx)
        .args(nginx_args(true))
        .output()
        .expect("nginx runs");
    assert!(
        check.status.success(),
        "nginx -t refused:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    // One process (master_process off), so killing it leaves no worker behind.
    let mut proxy = tokio::process::Command::new(&nginx)
        .args(nginx_args(false))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("nginx starts");
    let front: std::net::SocketAddr = format!("127.0.0.1:{nginx_port}").parse().expect("addr");
    wait_for(Duration::from_secs(10), "nginx to serve", || async {
        get(front, "/").await.is_some()
    })
    .await
    .expect("served by nginx");
    for _ in 0..4 {
        assert_eq!(
            get(front, "/").await.as_deref(),
            Some(healthy_host.as_str())
        );
    }
    let _ = proxy.kill().await;

    // The node's agent dies (its containers run on): once the controller sees the
    // link gone, its endpoints are unhealthy and leave DNS.
    agent.kill().await;
    let killed_at = Instant::now();
    wait_for(
        Duration::from_secs(30),
        "the lost node's endpoints unhealthy",
        || async {
            service(&c, &svc).await.is_some_and(|(s, _)| {
                !s.endpoints.is_empty() && s.endpoints.iter().all(|e| !e.healthy)
            })
        },
    )
    .await
    .expect("unhealthy");
    assert!(dns(dns_at, &fqdn, RecordType::SRV).await.1.is_empty());
    eprintln!(
        "agent killed to its endpoints unhealthy: {:?}",
        killed_at.elapsed()
    );

    // Stopped: the service stays declared, with no endpoint.
    let stop = c.cli(&["job", "stop", &job]);
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    wait_for(Duration::from_secs(30), "no endpoints", || async {
        service(&c, &svc)
            .await
            .is_some_and(|(s, _)| s.endpoints.is_empty())
    })
    .await
    .expect("emptied");
    let missing = c.cli(&["service", "show", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no job declares service"));
}

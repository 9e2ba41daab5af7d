//! Fleet tests: a controller and agents as containers on a private Docker network.
//!
//! The image holds the binaries already built in `target/<profile>/` (plus the
//! shared libraries `ldd` lists, the loader, a static busybox and the packaged
//! `/etc/novacron/*.toml`), built locally with the classic builder from
//! `packaging/images/fleet/Dockerfile`: no second compile and no registry. Agents
//! mount the host's Docker socket and run workloads on the host's daemon; each
//! touches only containers labelled with its own node name, so several agents (and
//! several tests) share one daemon. Each test uses its own names and network and
//! removes what it created, also when it fails ([`Fleet`]'s `Drop`). Every wait is
//! bounded.
//!
//! `bench_failover` and `bench_reconnect_storm` are ignored by default and print the
//! numbers recorded in BENCHMARKS.md:
//! `cargo nextest run -p novacron-tests --test fleet --run-ignored ignored-only --no-capture`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use novacron_api::AllocView;
use novacron_cli::dev::DEMO_IMAGE;
use novacron_common::tls;
use novacron_common::wire::AllocState;
use novacron_controller::workloads::JobDetail;
use novacron_tests::fleet_image::{ensure_demo_image, fleet_image};
use novacron_tests::{docker, wait_for};

/// The controller's API (TCP) and agent link (UDP) port inside its container.
const PORT: u16 = 7443;
/// Label on every container and network a test creates, valued with its fleet id.
const FLEET_LABEL: &str = "novacron.fleet-test";
/// Bound on waits for enrollment, placement and convergence (generous: CI machines
/// run these tests beside the rest of the suite on 2 cores).
const CONVERGE: Duration = Duration::from_secs(90);
/// Controller data directory and agent state directory inside the containers (the
/// defaults of the packaged files).
const CTL_DATA: &str = "/var/lib/novacron/controller";

/// A controller and agents as containers; removes them, their workloads and the
/// network when dropped.
struct Fleet {
    id: String,
    net: String,
    image: String,
    ctl: String,
    agents: Vec<String>,
    fingerprint: String,
    token: String,
    client: reqwest::Client,
    pems: (String, String, String),
}

impl Fleet {
    /// A network, a controller (with `ctl_env` as extra environment) and `agents`
    /// enrolled agents, all ready.
    async fn start(tag: &str, agents: usize, ctl_env: &[(&str, &str)]) -> Result<Fleet> {
        tls::install_crypto_provider();
        let image = fleet_image()?;
        ensure_demo_image()?;
        let id = format!(
            "ncf-{tag}-{}-{:04x}",
            std::process::id(),
            rand::random::<u16>()
        );
        let mut fleet = Fleet {
            net: format!("{id}-net"),
            ctl: format!("{id}-ctl"),
            id,
            image,
            agents: Vec::new(),
            fingerprint: String::new(),
            token: String::new(),
            client: reqwest::Client::new(),
            pems: Default::default(),
        };
        let label = format!("{FLEET_LABEL}={}", fleet.id);
        docker(&["network", "create", "--label", &label, &fleet.net])?;
        fleet.start_controller(ctl_env).await?;
        fleet.token = docker(&[
            "exec",
            &fleet.ctl,
            "novacron-controller",
            "token",
            "create",
            "--quiet",
            "--uses",
            "100",
        ])?;
        for i in 0..agents {
            fleet.add_agent(i)?;
        }
        for name in fleet.agents.clone() {
            fleet.wait_ready(&name).await?;
        }
        Ok(fleet)
    }

    async fn start_controller(&mut self, env: &[(&str, &str)]) -> Result<()> {
        // `serve` waits for `init`, which the test runs with `docker exec` to read the
        // fingerprint; a restarted container finds the data directory initialized.
        let script = format!(
            "until [ -f {CTL_DATA}/initialized ]; do sleep 0.1; done; \
             exec novacron-controller serve --server-name {name} --advertise {name}:{PORT}",
            name = self.ctl
        );
        let label = format!("{FLEET_LABEL}={}", self.id);
        let mut args = vec![
            "run".to_string(),
            "-d".into(),
            "--name".into(),
            self.ctl.clone(),
            "--hostname".into(),
            self.ctl.clone(),
            "--network".into(),
            self.net.clone(),
            "--label".into(),
            label,
        ];
        for (k, v) in env {
            args.push("-e".into());
            args.push(format!("{k}={v}"));
        }
        args.extend([self.image.clone(), "sh".into(), "-c".into(), script]);
        docker(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        let init = docker(&[
            "exec",
            &self.ctl,
            "sh",
            "-c",
            &format!(
                "novacron-controller init --server-name {} --server-name 127.0.0.1 --server-name localhost \
                 && touch {CTL_DATA}/initialized",
                self.ctl
            ),
        ])?;
        self.fingerprint = init
            .split_whitespace()
            .find(|w| w.starts_with("sha256:"))
            .context("init printed no fingerprint")?
            .to_string();
        let read = |f: &str| docker(&["exec", &self.ctl, "cat", &format!("{CTL_DATA}/pki/{f}")]);
        self.pems = (read("ca.pem")?, read("admin.pem")?, read("admin-key.pem")?);
        self.reconnect_client().await
    }

    /// Points the API client at the controller container's current address and waits
    /// until the API answers.
    async fn reconnect_client(&mut self) -> Result<()> {
        tls::install_crypto_provider();
        let limit = Instant::now() + Duration::from_secs(30);
        let ip: IpAddr = loop {
            let out = docker(&[
                "inspect",
                "-f",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                &self.ctl,
            ])?;
            if let Ok(ip) = out.parse() {
                break ip;
            }
            if Instant::now() > limit {
                bail!("the controller container has no address: {out:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (ca, cert, key) = &self.pems;
        let config = tls::client_config(ca, Some((cert, key)), &[b"h2", b"http/1.1"])?;
        self.client = reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .resolve(&self.ctl, SocketAddr::new(ip, PORT))
            .timeout(Duration::from_secs(5))
            .build()?;
        let url = format!("{}/healthz", self.api());
        let client = self.client.clone();
        wait_for(Duration::from_secs(60), "the controller's API", || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                client
                    .get(url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            }
        })
        .await
        .with_context(|| self.logs(&self.ctl))
    }

    /// Starts agent number `i` (zone `z<i>`); it enrolls through the environment and
    /// runs with the packaged /etc/novacron/agent.toml.
    fn add_agent(&mut self, i: usize) -> Result<()> {
        let name = format!("{}-a{i}", self.id);
        let label = format!("{FLEET_LABEL}={}", self.id);
        let env = [
            format!("NOVACRON_CONTROLLER=https://{}:{PORT}", self.ctl),
            format!("NOVACRON_CA_FINGERPRINT={}", self.fingerprint),
            format!("NOVACRON_JOIN_TOKEN={}", self.token),
            format!("NOVACRON_NODE_NAME={name}"),
            format!("NOVACRON_LABELS=zone=z{i},fleet=test"),
        ];
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--hostname",
            &name,
            "--network",
            &self.net,
            "--label",
            &label,
            "-v",
            "/var/run/docker.sock:/var/run/docker.sock",
        ];
        for e in &env {
            args.extend(["-e", e.as_str()]);
        }
        args.extend([
            self.image.as_str(),
            "sh",
            "-c",
            "[ -f /var/lib/novacron/agent/node.pem ] || novacron-agent join || exit $?; \
             exec novacron-agent run",
        ]);
        self.agents.push(name.clone());
        docker(&args)?;
        Ok(())
    }

    fn api(&self) -> String {
        format!("https://{}:{PORT}", self.ctl)
    }

    async fn node_status(&self, name: &str) -> Option<String> {
        let resp = self
            .client
            .get(format!("{}/v1/nodes/{name}", self.api()))
            .send()
            .await
            .ok()?;
        let view: novacron_api::NodeView = resp.error_for_status().ok()?.json().await.ok()?;
        Some(view.status.to_string())
    }

    async fn wait_ready(&self, name: &str) -> Result<()> {
        wait_for(CONVERGE, &format!("node {name} ready"), || async {
            self.node_status(name).await.as_deref() == Some("ready")
        })
        .await
        .with_context(|| format!("{}\n{}", self.logs(name), self.logs(&self.ctl)))
    }

    async fn labels(&self, name: &str) -> Result<BTreeMap<String, String>> {
        let view: novacron_api::NodeView = self
            .client
            .get(format!("{}/v1/nodes/{name}", self.api()))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(view.labels)
    }

    async fn apply(&self, job: &str, replicas: u32) -> Result<()> {
        let manifest = format!(
            "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: {job}
spec:
  type: service
  replicas: {replicas}
  task:
    image: {DEMO_IMAGE}
    command: [sh, -c, 'while true; do sleep 1; done']
  resources:
    cpu: 50m
    memory: 16Mi
  placement:
    spread:
      - key: zone
"
        );
        let resp = self
            .client
            .post(format!("{}/v1/jobs", self.api()))
            .json(&serde_json::json!({ "file": format!("{job}.yaml"), "manifest": manifest }))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("apply refused: {}", resp.text().await.unwrap_or_default());
        }
        Ok(())
    }

    async fn job(&self, job: &str) -> Result<JobDetail> {
        Ok(self
            .client
            .get(format!("{}/v1/jobs/{job}", self.api()))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// The job's allocations that should run and report running.
    async fn running(&self, job: &str) -> Vec<AllocView> {
        self.job(job)
            .await
            .map(|d| {
                d.allocations
                    .into_iter()
                    .filter(|a| a.desired_run && a.state == AllocState::Running)
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn wait_running(&self, job: &str, n: usize) -> Result<Vec<AllocView>> {
        wait_for(
            CONVERGE,
            &format!("{n} running replicas of {job}"),
            || async { self.running(job).await.len() == n },
        )
        .await
        .with_context(|| self.logs(&self.ctl))?;
        Ok(self.running(job).await)
    }

    /// Running workload containers of `job` on the daemon: allocation id → container id.
    fn containers(&self, job: &str) -> Result<BTreeMap<String, String>> {
        let out = docker(&[
            "ps",
            "--filter",
            &format!("label=novacron.job={job}"),
            "--format",
            "{{.Label \"novacron.alloc\"}} {{.ID}}",
        ])?;
        let mut map = BTreeMap::new();
        for line in out.lines() {
            let (alloc, id) = line.split_once(' ').context("docker ps format")?;
            if map.insert(alloc.to_string(), id.to_string()).is_some() {
                bail!("allocation {alloc} runs in two containers: {out}");
            }
        }
        Ok(map)
    }

    fn logs(&self, container: &str) -> String {
        let out = Command::new("docker")
            .args(["logs", "--tail", "40", container])
            .output();
        match out {
            Ok(o) => format!(
                "--- last log lines of {container}:\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("--- no logs of {container}: {e}"),
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs(&self.ctl));
            for a in &self.agents {
                eprintln!("{}", self.logs(a));
            }
        }
        let rm_by_label = |label: String| {
            if let Ok(ids) = docker(&["ps", "-aq", "--filter", &format!("label={label}")]) {
                let ids: Vec<&str> = ids.lines().collect();
                if !ids.is_empty() {
                    let mut args = vec!["rm", "-f"];
                    args.extend(ids);
                    let _ = docker(&args);
                }
            }
        };
        // Agents and the controller first, so nothing recreates workloads.
        rm_by_label(format!("{FLEET_LABEL}={}", self.id));
        for a in &self.agents {
            rm_by_label(format!("novacron.node={a}"));
        }
        let _ = docker(&["network", "rm", &self.net]);
    }
}

fn job_name(fleet: &Fleet) -> String {
    format!("{}-job", fleet.id)
}

fn ids(allocs: &[AllocView]) -> BTreeSet<String> {
    allocs.iter().map(|a| a.id.clone()).collect()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test]
async fn agents_enroll_run_a_job_and_a_killed_agents_work_moves_elsewhere() {
    let f = Fleet::start("kill", 3, &[]).await.expect("fleet");
    for (i, a) in f.agents.iter().enumerate() {
        let labels = f.labels(a).await.expect("labels");
        assert_eq!(
            labels.get("zone").map(String::as_str),
            Some(format!("z{i}").as_str()),
            "labels from NOVACRON_LABELS: {labels:?}"
        );
    }
    let job = job_name(&f);
    f.apply(&job, 3).await.expect("apply");
    let allocs = f.wait_running(&job, 3).await.expect("running");
    let nodes: BTreeSet<&str> = allocs.iter().map(|a| a.node.as_str()).collect();
    assert_eq!(nodes.len(), 3, "spread over the three zones: {allocs:?}");
    let containers = f.containers(&job).expect("docker ps");
    assert_eq!(
        containers.keys().cloned().collect::<BTreeSet<_>>(),
        ids(&allocs),
        "each allocation runs in one container"
    );
    for a in &allocs {
        let node = docker(&[
            "inspect",
            "-f",
            "{{index .Config.Labels \"novacron.node\"}}",
            &containers[&a.id],
        ])
        .expect("inspect");
        assert_eq!(
            node, a.node,
            "the container of {} belongs to its node",
            a.id
        );
    }

    let victim = allocs[0].node.clone();
    docker(&["kill", &victim]).expect("kill the agent");
    let killed = Instant::now();
    wait_for(
        CONVERGE,
        "the lost replica replaced on a surviving node",
        || async {
            let r = f.running(&job).await;
            r.len() == 3 && r.iter().all(|a| a.node != victim)
        },
    )
    .await
    .expect("failover");
    eprintln!(
        "failover: replacement running {:?} after the agent kill",
        killed.elapsed()
    );
    let after = f.running(&job).await;
    assert!(
        !ids(&after).contains(&allocs[0].id),
        "the victim's allocation was replaced, not kept: {after:?}"
    );
}

#[tokio::test]
async fn a_cut_off_agent_is_replaced_and_after_healing_no_duplicate_survives() {
    let f = Fleet::start("part", 3, &[]).await.expect("fleet");
    let job = job_name(&f);
    f.apply(&job, 3).await.expect("apply");
    let allocs = f.wait_running(&job, 3).await.expect("running");
    let victim = allocs[0].node.clone();
    docker(&["network", "disconnect", &f.net, &victim]).expect("cut the agent off");
    wait_for(
        CONVERGE,
        "the cut-off node's replica replaced elsewhere",
        || async {
            let r = f.running(&job).await;
            r.len() == 3 && r.iter().all(|a| a.node != victim)
        },
    )
    .await
    .expect("replaced");
    // During the partition the old container may still run: the agent cannot hear
    // that its allocation was declared lost.
    let during = f.containers(&job).expect("docker ps").len();
    eprintln!("containers of the job during the partition: {during}");

    docker(&["network", "connect", &f.net, &victim]).expect("heal");
    f.wait_ready(&victim)
        .await
        .expect("the healed node reconnects");
    wait_for(
        CONVERGE,
        "exactly the controller's allocations running",
        || async {
            let want = ids(&f.running(&job).await);
            let have: BTreeSet<String> = f
                .containers(&job)
                .map(|m| m.into_keys().collect())
                .unwrap_or_default();
            want.len() == 3 && have == want
        },
    )
    .await
    .expect("no duplicates after healing");
    // And it stays that way.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let want = ids(&f.running(&job).await);
    let have: BTreeSet<String> = f.containers(&job).expect("docker ps").into_keys().collect();
    assert_eq!(have, want, "no duplicate allocation survives the heal");
    assert_eq!(want.len(), 3);
}

#[tokio::test]
async fn a_restarted_controller_loses_no_job_or_allocation() {
    // With the default liveness settings: nodes get the startup grace (10 s) to
    // reconnect after the controller starts, so none is declared down.
    let mut f = Fleet::start("ctl", 3, &[]).await.expect("fleet");
    let job = job_name(&f);
    f.apply(&job, 3).await.expect("apply");
    let before = f.wait_running(&job, 3).await.expect("running");
    let containers = f.containers(&job).expect("docker ps");

    let restarted = Instant::now();
    docker(&["restart", "-t", "10", &f.ctl]).expect("restart the controller");
    f.reconnect_client().await.expect("the API is back");
    for a in f.agents.clone() {
        f.wait_ready(&a).await.expect("agents reconnect");
    }
    eprintln!(
        "all agents back {:?} after the controller restart began",
        restarted.elapsed()
    );
    // A few reconcile ticks with every agent reporting.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let detail = f.job(&job).await.expect("the job survived the restart");
    let live: Vec<&AllocView> = detail
        .allocations
        .iter()
        .filter(|a| a.desired_run)
        .collect();
    assert_eq!(
        live.iter().map(|a| a.id.clone()).collect::<BTreeSet<_>>(),
        ids(&before),
        "the same allocations, none lost or replaced: {:#?}",
        detail.allocations
    );
    let after = f.wait_running(&job, 3).await.expect("running");
    assert_eq!(ids(&after), ids(&before));
    assert_eq!(
        f.containers(&job).expect("docker ps"),
        containers,
        "the same containers kept running"
    );
}

#[tokio::test]
async fn a_rolling_restart_of_every_agent_keeps_the_workloads_running() {
    // With the default liveness settings: an agent that stops cleanly closes its
    // connection with `Normal`, and its node gets the restart grace (30 s).
    let f = Fleet::start("roll", 3, &[]).await.expect("fleet");
    let job = job_name(&f);
    f.apply(&job, 3).await.expect("apply");
    let before = f.wait_running(&job, 3).await.expect("running");
    let containers = f.containers(&job).expect("docker ps");
    let started = |c: &str| docker(&["inspect", "-f", "{{.State.StartedAt}}", c]).expect("inspect");
    let starts: Vec<String> = containers.values().map(|c| started(c)).collect();

    for a in &f.agents {
        docker(&["restart", "-t", "10", a]).expect("restart the agent");
        f.wait_ready(a).await.expect("the agent is back");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = f.wait_running(&job, 3).await.expect("running");
    assert_eq!(
        ids(&after),
        ids(&before),
        "the same allocations after the rollout"
    );
    assert_eq!(
        f.containers(&job).expect("docker ps"),
        containers,
        "the same containers: adopted, not recreated"
    );
    let starts_after: Vec<String> = containers.values().map(|c| started(c)).collect();
    assert_eq!(starts, starts_after, "no workload container was restarted");
}

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Failover: kill the agent holding a replica, time until its replacement runs
/// elsewhere; NOVACRON_BENCH_ROUNDS rounds (default 5).
#[tokio::test]
#[ignore = "benchmark: prints numbers for BENCHMARKS.md"]
async fn bench_failover() {
    let rounds = env_usize("NOVACRON_BENCH_ROUNDS", 5);
    let f = Fleet::start("bfo", 4, &[]).await.expect("fleet");
    let job = job_name(&f);
    f.apply(&job, 2).await.expect("apply");
    let mut times = Vec::new();
    for round in 0..rounds {
        let allocs = f.wait_running(&job, 2).await.expect("running");
        let victim = allocs[0].node.clone();
        docker(&["kill", &victim]).expect("kill");
        let killed = Instant::now();
        wait_for(CONVERGE, "replacement", || async {
            let r = f.running(&job).await;
            r.len() == 2 && r.iter().all(|a| a.node != victim)
        })
        .await
        .expect("failover");
        let took = killed.elapsed();
        eprintln!("round {round}: failover {took:?}");
        times.push(took);
        docker(&["start", &victim]).expect("start the agent again");
        f.wait_ready(&victim).await.expect("back");
        // The returning agent stops its lost allocation's container.
        wait_for(CONVERGE, "the lost container stopped", || async {
            f.containers(&job).is_ok_and(|c| c.len() == 2)
        })
        .await
        .expect("cleaned");
    }
    eprintln!(
        "failover over {rounds} rounds: median {:?}, min {:?}, max {:?}",
        median(times.clone()),
        times.iter().min().copied().unwrap_or_default(),
        times.iter().max().copied().unwrap_or_default()
    );
}

/// Reconnect storm: restart the controller with NOVACRON_BENCH_AGENTS agents
/// (default 3) connected; time from the restart command until every node is ready
/// again, NOVACRON_BENCH_ROUNDS rounds (default 5).
#[tokio::test]
#[ignore = "benchmark: prints numbers for BENCHMARKS.md"]
async fn bench_reconnect_storm() {
    let agents = env_usize("NOVACRON_BENCH_AGENTS", 3);
    let rounds = env_usize("NOVACRON_BENCH_ROUNDS", 5);
    let mut f = Fleet::start("bstorm", agents, &[]).await.expect("fleet");
    let mut times = Vec::new();
    for round in 0..rounds {
        let start = Instant::now();
        docker(&["restart", "-t", "10", &f.ctl]).expect("restart");
        f.reconnect_client().await.expect("API back");
        let api_back = start.elapsed();
        for a in f.agents.clone() {
            f.wait_ready(&a).await.expect("reconnected");
        }
        let took = start.elapsed();
        eprintln!(
            "round {round}: API back after {api_back:?}, all {agents} agents ready after {took:?}"
        );
        times.push(took);
    }
    eprintln!(
        "reconnect storm, {agents} agents, {rounds} rounds: median {:?}",
        median(times)
    );
}

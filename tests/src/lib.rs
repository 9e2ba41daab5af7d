//! Harness for NovaCron's end-to-end tests: runs the real binaries as child
//! processes (controller, agents, CLI) in a temporary directory, on loopback, with
//! real certificates.
//!
//! The binaries must be built first: `cargo build --workspace --bins` (the README's
//! test command does this).

pub mod counter_image;
pub mod dns;
pub mod fleet_image;
pub mod ha;
pub mod procfs;
pub mod registry;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use novacron_api::{MetricsWindow, NodeView};
use novacron_common::tls;
use tokio::process::{Child, Command};

/// The directory holding the built binaries of this profile.
pub fn bin_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    target.join(profile)
}

/// The path of a built binary; panics with the command to build it when missing.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the end-to-end tests",
        path.display()
    );
    path
}

/// A free loopback port, free on both TCP and UDP when it was picked.
pub fn free_port() -> u16 {
    for _ in 0..50 {
        let Ok(tcp) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(addr) = tcp.local_addr() else { continue };
        if UdpSocket::bind(addr).is_ok() {
            return addr.port();
        }
    }
    panic!("no free loopback port found in 50 tries");
}

/// A controller process with its data directory.
#[derive(Debug)]
pub struct Controller {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The port of the API (TCP) and of the agent link (UDP).
    pub port: u16,
    /// Extra `serve` flags.
    pub serve_args: Vec<String>,
    /// The running process.
    pub child: Option<Child>,
    /// The CA fingerprint.
    pub fingerprint: String,
    /// Extra environment of `serve` (the etcd store's settings).
    pub env: Vec<(String, String)>,
    log_dir: PathBuf,
    /// Log files are `<log_name>-<start>.log` in `log_dir`.
    log_name: String,
    starts: u32,
    listen_ip: String,
    server_name: String,
}

impl Controller {
    /// Initializes a data directory under `root` and starts serving.
    pub async fn start(root: &Path, serve_args: &[&str]) -> Result<Controller> {
        Controller::start_on(root, "127.0.0.1", "127.0.0.1", serve_args).await
    }

    /// As [`Controller::start`], listening on `listen_ip` and naming itself
    /// `server_name` (also in its certificate), so that others than loopback
    /// clients (containers, through the Docker bridge's gateway) can reach it.
    pub async fn start_on(
        root: &Path,
        listen_ip: &str,
        server_name: &str,
        serve_args: &[&str],
    ) -> Result<Controller> {
        let data_dir = root.join("controller");
        let out = std::process::Command::new(bin("novacron-controller"))
            .arg("--data-dir")
            .arg(&data_dir)
            .args([
                "init",
                "--server-name",
                "localhost",
                "--server-name",
                "127.0.0.1",
            ])
            .args(
                (server_name != "127.0.0.1" && server_name != "localhost")
                    .then_some(["--server-name", server_name])
                    .into_iter()
                    .flatten(),
            )
            .output()
            .context("running novacron-controller init")?;
        if !out.status.success() {
            bail!("init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let fingerprint = stdout
            .split_whitespace()
            .find(|w| w.starts_with("sha256:"))
            .context("init printed no fingerprint")?
            .to_string();
        let mut c = Controller {
            data_dir,
            port: free_port(),
            serve_args: serve_args.iter().map(|s| s.to_string()).collect(),
            child: None,
            fingerprint,
            env: Vec::new(),
            log_dir: root.to_path_buf(),
            log_name: "controller".into(),
            starts: 0,
            listen_ip: listen_ip.to_string(),
            server_name: server_name.to_string(),
        };
        c.restart().await?;
        Ok(c)
    }

    /// The running process's id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// A client that trusts the fleet CA but presents no certificate.
    pub fn anonymous_client(&self) -> reqwest::Client {
        tls::install_crypto_provider();
        let ca = std::fs::read_to_string(self.data_dir.join("pki/ca.pem")).expect("ca");
        let config = tls::client_config(&ca, None, &[b"h2", b"http/1.1"]).expect("tls config");
        reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client")
    }

    /// The API URL.
    pub fn api(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the process on the same ports and waits until the API answers. A
    /// process still running is killed first and waited for (as a crash would end
    /// it), so the new one never races it for the store's lock or the ports.
    pub async fn restart(&mut self) -> Result<()> {
        if let Some(mut old) = self.child.take() {
            let _ = old.kill().await;
        }
        let log_path = self.spawn()?;
        let admin = self.admin_client()?;
        let start = Instant::now();
        let limit = Duration::from_secs(20);
        let url = format!("{}/healthz", self.api());
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("the controller exited ({status}) before its API answered; its log:\n{log}");
            }
            let up = admin
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if up {
                return Ok(());
            }
            if start.elapsed() >= limit {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!(
                    "timed out after {limit:?} waiting for the controller's API; its log:\n{log}"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A controller of a group on etcd (`env` names the store), on `port`, with
    /// the data directory `data_dir` (its PKI copied from the first member);
    /// not started.
    pub fn member(
        data_dir: PathBuf,
        port: u16,
        fingerprint: String,
        log_dir: PathBuf,
        env: Vec<(String, String)>,
    ) -> Controller {
        Controller {
            data_dir,
            port,
            serve_args: Vec::new(),
            child: None,
            fingerprint,
            env,
            log_dir,
            log_name: format!("controller-{port}"),
            starts: 0,
            listen_ip: "127.0.0.1".into(),
            server_name: "127.0.0.1".into(),
        }
    }

    /// Starts `serve` without waiting for the API (a standby of a group never
    /// answers); the log file's path.
    pub fn spawn(&mut self) -> Result<PathBuf> {
        self.starts += 1;
        let log_path = self
            .log_dir
            .join(format!("{}-{}.log", self.log_name, self.starts));
        let log = std::fs::File::create(&log_path)?;
        let listen = format!("{}:{}", self.listen_ip, self.port);
        let child = Command::new(bin("novacron-controller"))
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(["serve", "--api-listen", &listen, "--quic-listen", &listen])
            .args(["--server-name", &self.server_name])
            .args(&self.serve_args)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("spawning novacron-controller serve")?;
        self.child = Some(child);
        Ok(log_path)
    }

    /// Every log this controller wrote, concatenated.
    pub fn logs(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                std::fs::read_to_string(self.log_dir.join(format!("{}-{n}.log", self.log_name)))
                    .unwrap_or_default()
            })
            .collect()
    }

    /// Sends `signal` (`STOP`, `CONT`, `TERM`, `KILL`) to the process.
    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = std::process::Command::new("kill")
                .args([&format!("-{signal}"), &pid.to_string()])
                .status();
        }
    }

    /// Kills the process with SIGKILL (no clean shutdown).
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Stops the process with SIGTERM and waits for it.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }

    /// A client with the data directory's admin certificate.
    pub fn admin_client(&self) -> Result<reqwest::Client> {
        let pki = self.data_dir.join("pki");
        self.client_with(&pki.join("admin.pem"), &pki.join("admin-key.pem"))
    }

    /// A client with the given operator certificate.
    pub fn client_with(&self, cert: &Path, key: &Path) -> Result<reqwest::Client> {
        tls::install_crypto_provider();
        let ca = std::fs::read_to_string(self.data_dir.join("pki/ca.pem"))?;
        let config = tls::client_config(
            &ca,
            Some((
                &std::fs::read_to_string(cert)?,
                &std::fs::read_to_string(key)?,
            )),
            &[b"h2", b"http/1.1"],
        )?;
        Ok(reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .timeout(Duration::from_secs(10))
            .build()?)
    }

    /// Runs `novacron-controller <args>` against this data directory.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(bin("novacron-controller"))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .output()
            .expect("novacron-controller runs")
    }

    /// Creates a join token with `uses` uses.
    pub fn token(&self, uses: u32) -> Result<String> {
        let out = self.ctl(&["token", "create", "--quiet", "--uses", &uses.to_string()]);
        if !out.status.success() {
            bail!(
                "token create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `GET /v1/nodes/{name}`, `None` on 404.
    pub async fn node(&self, name: &str) -> Result<Option<NodeView>> {
        let resp = self
            .admin_client()?
            .get(format!("{}/v1/nodes/{name}", self.api()))
            .send()
            .await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Some(resp.error_for_status()?.json().await?))
    }

    /// `GET /v1/nodes/{name}/metrics`.
    pub async fn window(&self, name: &str) -> Result<MetricsWindow> {
        Ok(self
            .admin_client()?
            .get(format!("{}/v1/nodes/{name}/metrics", self.api()))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// `GET /v1/metrics/query?{params}` (the metrics history).
    pub async fn metrics_query(&self, params: &str) -> Result<novacron_api::MetricsQueryResult> {
        Ok(self
            .admin_client()?
            .get(format!("{}/v1/metrics/query?{params}", self.api()))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// `GET /v1/stats`.
    pub async fn stats(&self) -> Result<novacron_api::ControllerStats> {
        Ok(self
            .admin_client()?
            .get(format!("{}/v1/stats", self.api()))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }
}

/// An agent process.
#[derive(Debug)]
pub struct Agent {
    /// The node name.
    pub name: String,
    /// Its state directory.
    pub state_dir: PathBuf,
    /// Extra `run` flags.
    pub run_args: Vec<String>,
    /// The running process.
    pub child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    /// Enrolls `name` with a fresh token and starts it.
    pub async fn join_and_run(
        root: &Path,
        controller: &Controller,
        name: &str,
        run_args: &[&str],
    ) -> Result<Agent> {
        let state_dir = root.join(format!("agent-{name}"));
        let token = controller.token(1)?;
        let out = join(controller, &token, name, &state_dir);
        if !out.status.success() {
            bail!("join failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let mut agent = Agent {
            name: name.to_string(),
            state_dir,
            run_args: run_args.iter().map(|s| s.to_string()).collect(),
            child: None,
            log: root.join(format!("agent-{name}.log")),
        };
        agent.start()?;
        Ok(agent)
    }

    /// Starts (or restarts) the process.
    pub fn start(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(bin("novacron-agent"))
            .env("RUST_LOG", "info")
            // No VM bridge unless a test gives its agent one (`--vm-bridge`,
            // which wins): agents of tests that run side by side cannot share
            // a range.
            .env("NOVACRON_VM_BRIDGE", "off")
            .args(["run", "--state-dir"])
            .arg(&self.state_dir)
            .args(&self.run_args)
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("spawning novacron-agent run")?;
        self.child = Some(child);
        Ok(())
    }

    /// Kills the process with SIGKILL.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The node's certificate, key and CA (PEM).
    pub fn credentials(&self) -> Result<(String, String, String)> {
        Ok((
            std::fs::read_to_string(self.state_dir.join("node.pem"))?,
            std::fs::read_to_string(self.state_dir.join("node-key.pem"))?,
            std::fs::read_to_string(self.state_dir.join("ca.pem"))?,
        ))
    }
}

/// Runs `novacron-agent join`.
pub fn join(
    controller: &Controller,
    token: &str,
    name: &str,
    state_dir: &Path,
) -> std::process::Output {
    std::process::Command::new(bin("novacron-agent"))
        .args(["join", "--controller", &controller.api(), "--token", token])
        .args(["--ca-fingerprint", &controller.fingerprint, "--name", name])
        .arg("--state-dir")
        .arg(state_dir)
        .output()
        .expect("novacron-agent runs")
}

/// A one-replica service job `name` that sleeps in the test image (100m CPU,
/// 32Mi), for tests that need any job at all.
pub fn sleeper_manifest(name: &str) -> String {
    format!(
        "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: {name}
spec:
  type: service
  replicas: 1
  task:
    image: novacron-dev/busybox:1
    command: [sleep, '3600']
  resources:
    cpu: 100m
    memory: 32Mi
"
    )
}

/// Polls `check` every 100 ms until it holds or `limit` passes.
pub async fn wait_for<F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("timed out after {limit:?} waiting for {what}")
}

/// A raw QUIC client speaking the agent protocol, for tests that misbehave.
#[derive(Debug)]
pub struct RawClient {
    /// The quinn endpoint.
    pub endpoint: quinn::Endpoint,
}

impl RawClient {
    /// A client endpoint on loopback.
    pub fn new() -> Result<RawClient> {
        tls::install_crypto_provider();
        Ok(RawClient {
            endpoint: quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))?,
        })
    }

    /// Connects to `port` on loopback presenting `client` (cert PEM, key PEM), or no
    /// certificate, trusting `ca_pem`.
    pub async fn connect(
        &self,
        port: u16,
        ca_pem: &str,
        client: Option<(&str, &str)>,
    ) -> Result<quinn::Connection, anyhow::Error> {
        let rustls = tls::client_config(ca_pem, client, &[novacron_common::wire::ALPN])?;
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(rustls)?;
        let config = quinn::ClientConfig::new(Arc::new(crypto));
        let conn = self
            .endpoint
            .connect_with(
                config,
                SocketAddr::from(([127, 0, 0, 1], port)),
                "127.0.0.1",
            )?
            .await?;
        Ok(conn)
    }
}

/// MemTotal of this host in bytes, from /proc/meminfo.
pub fn host_mem_total() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo is readable");
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("MemTotal is present")
}

/// The locally built test image (busybox, no registry needed).
pub const TEST_IMAGE: &str = "novacron-test/busybox:1";

/// Builds [`TEST_IMAGE`] from `packaging/images/busybox` with the host's static
/// busybox, once per machine (skipped when the image exists).
pub fn ensure_test_image() -> Result<()> {
    static BUILT: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    let mut built = BUILT.lock().unwrap_or_else(|p| p.into_inner());
    if *built {
        return Ok(());
    }
    let exists = std::process::Command::new("docker")
        .args(["image", "inspect", TEST_IMAGE])
        .output()
        .context("running docker")?
        .status
        .success();
    if !exists {
        let context = tempfile::tempdir()?;
        let dockerfile =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/images/busybox/Dockerfile");
        std::fs::copy(&dockerfile, context.path().join("Dockerfile"))
            .with_context(|| format!("copying {}", dockerfile.display()))?;
        std::fs::copy("/bin/busybox", context.path().join("busybox"))
            .context("copying /bin/busybox (install Debian's busybox-static)")?;
        docker_build(context.path(), TEST_IMAGE)?;
    }
    *built = true;
    Ok(())
}

/// `docker build -t TAG CONTEXT` with the classic builder (no BuildKit here).
pub fn docker_build(context: &Path, tag: &str) -> Result<()> {
    let out = std::process::Command::new("docker")
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "-q", "-t", tag])
        .arg(context)
        .output()
        .context("running docker build")?;
    if !out.status.success() {
        bail!(
            "docker build of {tag} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Runs `docker <args>` and returns its trimmed standard output.
pub fn docker(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("docker").args(args).output()?;
    if !out.status.success() {
        bail!(
            "docker {:?} failed: {}",
            args,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Controller {
    /// `POST /v1/jobs` with a YAML manifest.
    pub async fn apply(&self, file: &str, manifest: &str) -> Result<serde_json::Value> {
        let resp = self
            .admin_client()?
            .post(format!("{}/v1/jobs", self.api()))
            .json(&serde_json::json!({ "file": file, "manifest": manifest }))
            .send()
            .await?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await?;
        if !status.is_success() {
            bail!("apply refused ({status}): {body}");
        }
        Ok(body)
    }

    /// Waits up to `limit` for node `name` to be `ready`.
    pub async fn wait_ready(&self, name: &str, limit: Duration) -> Result<()> {
        wait_for(limit, &format!("node {name} ready"), || async {
            matches!(self.node(name).await, Ok(Some(v)) if v.status.to_string() == "ready")
        })
        .await
    }

    /// `GET /v1/jobs/{name}`.
    pub async fn job(&self, name: &str) -> Result<novacron_controller::workloads::JobDetail> {
        Ok(self
            .admin_client()?
            .get(format!("{}/v1/jobs/{name}", self.api()))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }
}

impl Controller {
    /// Runs the `novacron` CLI against this controller with the admin certificate
    /// (a context file is written next to the data directory).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_command()
            .args(args)
            .output()
            .expect("novacron runs")
    }

    /// The `novacron` command as [`Controller::cli`] runs it, for a caller that
    /// sets its arguments and standard input itself.
    pub fn cli_command(&self) -> std::process::Command {
        let config = self.data_dir.with_file_name("cli-config.toml");
        if !config.exists() {
            let pki = self.data_dir.join("pki");
            let text = format!(
                "current = \"test\"\n\n[contexts.test]\napi = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                self.api(),
                pki.join("ca.pem").display(),
                pki.join("admin.pem").display(),
                pki.join("admin-key.pem").display()
            );
            std::fs::write(&config, text).expect("write the CLI context");
        }
        let mut cmd = std::process::Command::new(bin("novacron"));
        cmd.arg("--config").arg(&config);
        cmd
    }
}

/// A service job on [`TEST_IMAGE`]: `replicas` replicas of the shell `script`,
/// 100m CPU and 32Mi each; `task_extra` goes under `task` (indented 4 spaces,
/// e.g. `ports` or `env`) and `spec_extra` under `spec` (indented 2 spaces).
pub fn service_job(
    name: &str,
    replicas: u32,
    script: &str,
    task_extra: &str,
    spec_extra: &str,
) -> String {
    format!(
        "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: {name}
spec:
  type: service
  replicas: {replicas}
  task:
    image: {TEST_IMAGE}
    command: [sh, -c, '{script}']
{task_extra}  resources:
    cpu: 100m
    memory: 32Mi
{spec_extra}"
    )
}

/// Removes every container of a job (label `novacron.job`) when dropped, also when
/// the test fails: agents killed by a test leave their containers behind.
#[derive(Debug)]
pub struct JobCleanup(pub String);

impl Drop for JobCleanup {
    fn drop(&mut self) {
        if let Ok(ids) = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=novacron.job={}", self.0),
        ]) {
            for id in ids.lines() {
                let _ = docker(&["rm", "-f", id]);
            }
        }
    }
}

/// `docker` against the daemon at `host` (`unix:///...`, as `DOCKER_HOST`).
pub fn docker_on(host: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("docker")
        .env("DOCKER_HOST", host)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "docker {args:?} on {host} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Removes a job's containers (with their anonymous volumes) and a named volume
/// on each of several daemons when dropped, also when a test or bench fails.
#[derive(Debug)]
pub struct DaemonsCleanup {
    /// The daemons (`unix:///...`).
    pub hosts: Vec<String>,
    /// The job whose containers go (label `novacron.job`).
    pub job: String,
    /// The named volume that goes.
    pub volume: String,
}

impl Drop for DaemonsCleanup {
    fn drop(&mut self) {
        let filter = format!("label=novacron.job={}", self.job);
        for host in &self.hosts {
            if let Ok(ids) = docker_on(host, &["ps", "-aq", "--filter", &filter]) {
                for id in ids.lines() {
                    let _ = docker_on(host, &["rm", "-f", "-v", id]);
                }
            }
            let _ = docker_on(host, &["volume", "rm", "-f", &self.volume]);
        }
    }
}

/// Removes the published-port rules and chains of runc agents whose `oci`
/// directory `gone` says (see `novacron_agent::runtime::oci::publish`).
pub fn remove_published_ports(gone: impl Fn(&Path) -> bool) {
    use novacron_agent::runtime::oci::publish::stale;
    for table in ["nat", "filter"] {
        let Ok(out) = std::process::Command::new("iptables")
            .args(["-w", "10", "-t", table, "-S"])
            .output()
        else {
            return;
        };
        let (rules, chains) = stale(&String::from_utf8_lossy(&out.stdout), |d| !gone(d));
        for rule in rules {
            let _ = std::process::Command::new("iptables")
                .args(["-w", "10", "-t", table, "-D"])
                .args(&rule)
                .output();
        }
        for chain in chains {
            for op in ["-F", "-X"] {
                let _ = std::process::Command::new("iptables")
                    .args(["-w", "10", "-t", table, op, &chain])
                    .output();
            }
        }
    }
}

/// Removes what agents running with `--container-runtime runc` leave behind
/// (their containers outlive them by design): runc's containers under each
/// state directory, their overlay mounts, and their published ports' rules
/// and chains (left in the kernel by design too: a rule left behind sends
/// later connections to its port, from any test, to a sandbox that is gone;
/// a CI run saw "No route to host" on loopback from one). Their Docker
/// sandboxes carry the job's label, so [`DaemonsCleanup`] removes them. Drop
/// it after the agents: a running agent restarts what it finds stopped.
#[derive(Debug)]
pub struct RuncCleanup {
    /// The agents' state directories.
    pub state_dirs: Vec<std::path::PathBuf>,
}

impl Drop for RuncCleanup {
    fn drop(&mut self) {
        let ours: Vec<PathBuf> = self.state_dirs.iter().map(|d| d.join("oci")).collect();
        remove_published_ports(|dir| ours.iter().any(|o| o == dir));
        for dir in &self.state_dirs {
            let root = dir.join("oci/runc");
            if !root.exists() {
                continue;
            }
            let runc = |args: &[&str]| {
                std::process::Command::new("runc")
                    .arg("--root")
                    .arg(&root)
                    .args(args)
                    .output()
            };
            if let Ok(out) = runc(&["list", "-q"]) {
                for id in String::from_utf8_lossy(&out.stdout).lines() {
                    let _ = runc(&["kill", "--all", id, "KILL"]);
                    std::thread::sleep(std::time::Duration::from_millis(200));
                    let _ = runc(&["delete", "--force", id]);
                }
            }
            if let Ok(entries) = std::fs::read_dir(dir.join("oci")) {
                for e in entries.flatten() {
                    let rootfs = e.path().join("rootfs");
                    let _ = std::process::Command::new("umount")
                        .arg("-l")
                        .arg(&rootfs)
                        .output();
                }
            }
        }
    }
}

/// Tags, as `image`, [`TEST_IMAGE`] with `/version` holding `version`: a small
/// image of its own (one layer on the test image's), for pull tests.
pub fn commit_test_image(image: &str, version: &str) -> Result<()> {
    let name = format!("novacron-commit-{}-{version}", std::process::id());
    let _ = docker(&["rm", "-f", &name]);
    docker(&[
        "run",
        "--name",
        &name,
        TEST_IMAGE,
        "sh",
        "-c",
        &format!("echo {version} > /version"),
    ])?;
    docker(&["commit", &name, image])?;
    docker(&["rm", "-f", &name])?;
    Ok(())
}

/// The ids of the running containers of `job`.
pub fn job_containers(job: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=novacron.job={job}"),
        "--filter",
        "status=running",
    ])
    .unwrap_or_default()
    .lines()
    .map(str::to_string)
    .collect()
}

/// The standard output of a command that must succeed (panics with both
/// outputs otherwise).
pub fn succeeded(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A controller and one agent (`node`, with `run_args`) in a new temporary
/// directory named with `prefix`, the agent ready.
pub async fn one_node_fleet(
    prefix: &str,
    node: &str,
    run_args: &[&str],
) -> Result<(tempfile::TempDir, Controller, Agent)> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    let c = Controller::start(dir.path(), &[]).await?;
    let agent = Agent::join_and_run(dir.path(), &c, node, run_args).await?;
    c.wait_ready(&agent.name, Duration::from_secs(20)).await?;
    Ok((dir, c, agent))
}

/// Whether `job` has a wanted allocation that runs.
pub async fn job_running(c: &Controller, job: &str) -> bool {
    c.job(job).await.is_ok_and(|d| {
        d.allocations
            .iter()
            .any(|a| a.desired_run && a.state == novacron_common::wire::AllocState::Running)
    })
}

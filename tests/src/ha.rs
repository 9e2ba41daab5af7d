//! A highly available control plane for the tests: three etcd members started
//! by `packaging/ha/local-group.sh etcd` (the script operators use) and
//! controllers on the etcd store, one data directory each with the first one's
//! PKI and secrets key.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::{Controller, bin};

/// Three etcd members and `n` controllers on loopback.
#[derive(Debug)]
pub struct Group {
    /// Where the etcd members and the controllers keep their data and logs.
    pub dir: PathBuf,
    /// The etcd client URLs, comma-separated.
    pub etcd: String,
    /// The first etcd port (member i: `base + 2i`).
    pub base: u16,
    /// The controllers (members of the group).
    pub controllers: Vec<Controller>,
}

/// Six consecutive free loopback ports (three members × client and peer).
fn free_base() -> u16 {
    for _ in 0..200 {
        let base = 20_000 + (rand::random::<u16>() % 30_000);
        let free = (0..6).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no six consecutive free loopback ports");
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/ha/local-group.sh")
}

/// The environment that puts a controller on the etcd store at `etcd` with a
/// `lease` leader lease.
pub fn store_env(etcd: &str, lease: &str) -> Vec<(String, String)> {
    vec![
        ("NOVACRON_STORE".to_string(), "etcd".to_string()),
        ("NOVACRON_ETCD_ENDPOINTS".to_string(), etcd.to_string()),
        ("NOVACRON_LEASE".to_string(), lease.to_string()),
    ]
}

impl Group {
    /// Starts the etcd members (only them when `n` is 0), initializes the first controller's data
    /// directory (the CA), copies its PKI to the others and starts `n`
    /// controllers with a `lease` leader lease (`2s`).
    pub async fn start(dir: &Path, n: usize, lease: &str) -> Result<Group> {
        Group::start_with(dir, n, lease, &[]).await
    }

    /// [`Group::start`], with `extra` in every controller's environment (a
    /// `NOVACRON_CONTROLLER_CONFIG` file, for one).
    pub async fn start_with(
        dir: &Path,
        n: usize,
        lease: &str,
        extra: &[(String, String)],
    ) -> Result<Group> {
        let base = free_base();
        let out = std::process::Command::new("bash")
            .arg(script())
            .args(["etcd", &dir.display().to_string(), &base.to_string()])
            .output()
            .context("running packaging/ha/local-group.sh")?;
        if !out.status.success() {
            bail!(
                "starting etcd failed (is etcd installed? `bash .ci/setup system`): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let etcd = format!(
            "http://127.0.0.1:{base},http://127.0.0.1:{},http://127.0.0.1:{}",
            base + 2,
            base + 4
        );
        let mut env = store_env(&etcd, lease);
        env.extend(extra.iter().cloned());
        if n == 0 {
            return Ok(Group {
                dir: dir.to_owned(),
                etcd,
                base,
                controllers: Vec::new(),
            });
        }
        let first = dir.join("c0");
        let out = std::process::Command::new(bin("novacron-controller"))
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .arg("--data-dir")
            .arg(&first)
            .args([
                "init",
                "--server-name",
                "localhost",
                "--server-name",
                "127.0.0.1",
            ])
            .output()?;
        if !out.status.success() {
            bail!("init failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let fingerprint = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .find(|w| w.starts_with("sha256:"))
            .context("init printed no fingerprint")?
            .to_string();
        let mut group = Group {
            dir: dir.to_owned(),
            etcd,
            base,
            controllers: Vec::new(),
        };
        for i in 0..n {
            let data_dir = dir.join(format!("c{i}"));
            if i > 0 {
                std::fs::create_dir_all(&data_dir)?;
                let status = std::process::Command::new("cp")
                    .arg("-a")
                    .arg(first.join("pki"))
                    .arg(first.join("secrets.key"))
                    .arg(&data_dir)
                    .status()?;
                if !status.success() {
                    bail!("cannot copy the PKI to {}", data_dir.display());
                }
            }
            let mut c = Controller::member(
                data_dir,
                crate::free_port(),
                fingerprint.clone(),
                dir.to_owned(),
                env.clone(),
            );
            c.spawn()?;
            group.controllers.push(c);
        }
        group.leader(Duration::from_secs(30)).await?;
        Ok(group)
    }

    /// The agents' `--controller` list.
    pub fn link_addresses(&self) -> String {
        self.controllers
            .iter()
            .map(|c| format!("127.0.0.1:{}", c.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Enrolls `names` through the leader and runs them with every controller's
    /// address; returns them ready.
    pub async fn agents(&self, dir: &Path, names: &[String]) -> Result<Vec<crate::Agent>> {
        let l = self.leader(Duration::from_secs(30)).await?;
        let links = self.link_addresses();
        let mut agents = Vec::new();
        for name in names {
            let a = crate::Agent::join_and_run(
                dir,
                &self.controllers[l],
                name,
                &["--controller", &links],
            )
            .await?;
            self.controllers[l]
                .wait_ready(&a.name, Duration::from_secs(30))
                .await?;
            agents.push(a);
        }
        Ok(agents)
    }

    /// The index of the controller that serves as leader (it answers
    /// `/v1/controllers` naming itself), waiting up to `limit`.
    pub async fn leader(&self, limit: Duration) -> Result<usize> {
        let start = Instant::now();
        loop {
            if let Some(i) = self.serving_leader().await {
                return Ok(i);
            }
            if start.elapsed() > limit {
                let logs: String = self.controllers.iter().map(|c| c.logs()).collect();
                bail!("no controller leads after {limit:?}; their logs:\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The controller that answers as leader now, if any.
    pub async fn serving_leader(&self) -> Option<usize> {
        for (i, c) in self.controllers.iter().enumerate() {
            if c.child.is_none() {
                continue;
            }
            let Ok(client) = c.admin_client() else {
                continue;
            };
            let request = client
                .get(format!("{}/v1/controllers", c.api()))
                .timeout(Duration::from_millis(500))
                .send();
            let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_millis(600), request).await
            else {
                continue;
            };
            let Ok(view) = resp.json::<novacron_api::ControllersView>().await else {
                continue;
            };
            let me = view
                .members
                .iter()
                .find(|m| m.api_url.ends_with(&format!(":{}", c.port)));
            if me.is_some_and(|m| m.leader) {
                return Some(i);
            }
        }
        None
    }

    /// The pid of etcd member `i` (from the script's pid file).
    pub fn etcd_pid(&self, i: usize) -> Option<u32> {
        std::fs::read_to_string(self.dir.join(format!("etcd-{i}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for c in &self.controllers {
            c.signal("CONT");
            c.signal("KILL");
        }
        for i in 0..3 {
            if let Some(pid) = self.etcd_pid(i) {
                let _ = std::process::Command::new("kill")
                    .args(["-CONT", &pid.to_string()])
                    .status();
            }
        }
        let _ = std::process::Command::new("bash")
            .arg(script())
            .args(["down", &self.dir.display().to_string()])
            .status();
    }
}

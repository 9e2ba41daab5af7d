//! A real image registry for tests: Debian's `docker-registry` (the CNCF
//! distribution registry) on a loopback port, which Docker reaches over plain
//! HTTP, optionally with basic authentication (an htpasswd file of bcrypt hashes).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// A running registry; stopped when dropped.
#[derive(Debug)]
pub struct Registry {
    /// Its loopback port.
    pub port: u16,
    /// Its request log (one line per request, with the status).
    pub log: PathBuf,
    _child: tokio::process::Child,
}

/// The registry binary, or why it is missing.
pub fn registry_bin() -> PathBuf {
    let path = PathBuf::from("/usr/bin/docker-registry");
    assert!(
        path.exists(),
        "docker-registry is not installed: run `bash .ci/setup` (it installs Debian's docker-registry)"
    );
    path
}

/// A bcrypt hash of `password`, as htpasswd files hold.
fn bcrypt(password: &str) -> Result<String> {
    let hash = ::bcrypt::hash(password, 10).context("bcrypt")?;
    if !hash.starts_with("$2") {
        bail!("not a bcrypt hash: {hash:?}");
    }
    Ok(hash)
}

impl Registry {
    /// Starts a registry storing under `dir`, with basic authentication for
    /// `user` when given, and waits until it answers.
    pub async fn start(dir: &Path, user: Option<(&str, &str)>) -> Result<Registry> {
        let port = crate::free_port();
        let config = dir.join("registry.yml");
        let mut text = format!(
            "version: 0.1\nlog: {{level: error, accesslog: {{disabled: false}}}}\nstorage:\n  filesystem: {{rootdirectory: {}}}\nhttp: {{addr: 127.0.0.1:{port}}}\n",
            dir.join("registry").display()
        );
        if let Some((name, password)) = user {
            let htpasswd = dir.join("htpasswd");
            std::fs::write(&htpasswd, format!("{name}:{}\n", bcrypt(password)?))?;
            text.push_str(&format!(
                "auth:\n  htpasswd: {{realm: novacron-test, path: {}}}\n",
                htpasswd.display()
            ));
        }
        std::fs::write(&config, text)?;
        let log = dir.join("registry.log");
        let child = tokio::process::Command::new(registry_bin())
            .arg("serve")
            .arg(&config)
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.join("registry.err"))?)
            .kill_on_drop(true)
            .spawn()
            .context("docker-registry starts")?;
        novacron_common::tls::install_crypto_provider();
        let http = reqwest::Client::new();
        crate::wait_for(
            Duration::from_secs(20),
            "the registry to answer",
            || async {
                http.get(format!("http://127.0.0.1:{port}/v2/"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success() || r.status().as_u16() == 401)
            },
        )
        .await?;
        Ok(Registry {
            port,
            log,
            _child: child,
        })
    }

    /// `127.0.0.1:<port>`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The registry's request log so far.
    pub fn requests(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

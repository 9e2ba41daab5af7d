//! The Docker daemon, asked for its version (a node capability, read by
//! `novacron_agent::collect::capabilities`).

use std::time::Duration;

use bollard::{API_DEFAULT_VERSION, Docker};
use tracing::debug;

/// The local Docker socket, used when no `DOCKER_HOST` is given.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";
/// How long [`docker_version`] waits for the daemon, connection included.
pub const DOCKER_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the daemon's version could not be read.
#[derive(Debug, thiserror::Error)]
enum ProbeError {
    /// The address is neither `unix://`, a socket path, `tcp://` nor `http://`.
    #[error("unsupported Docker host {0:?}: expected unix://PATH, tcp://HOST:PORT or http://")]
    Scheme(String),
    /// The client could not be set up (for a socket: the path does not exist).
    #[error("cannot connect: {0}")]
    Connect(#[source] bollard::errors::Error),
    /// The daemon did not answer the request.
    #[error("request failed: {0}")]
    Request(#[source] bollard::errors::Error),
    /// The daemon answered without a version.
    #[error("the daemon reported no version")]
    NoVersion,
    /// The daemon did not answer within [`DOCKER_TIMEOUT`].
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// The Docker engine version at `docker_host` (a `DOCKER_HOST`-style address, e.g.
/// `unix:///var/run/docker.sock` or `tcp://10.0.0.5:2375`; [`DEFAULT_DOCKER_HOST`]
/// when `None`), or `None`, with a debug log, when the daemon does not answer within
/// [`DOCKER_TIMEOUT`].
pub async fn docker_version(docker_host: Option<&str>) -> Option<String> {
    let host = docker_host.unwrap_or(DEFAULT_DOCKER_HOST);
    let result = match tokio::time::timeout(DOCKER_TIMEOUT, probe(host)).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout(DOCKER_TIMEOUT)),
    };
    result
        .inspect_err(|e| debug!(docker_host = host, error = %e, "docker unavailable"))
        .ok()
}

async fn probe(host: &str) -> Result<String, ProbeError> {
    let docker = connect(host)?
        .negotiate_version()
        .await
        .map_err(ProbeError::Request)?;
    let version = docker.version().await.map_err(ProbeError::Request)?;
    version.version.ok_or(ProbeError::NoVersion)
}

fn connect(host: &str) -> Result<Docker, ProbeError> {
    let timeout_secs = DOCKER_TIMEOUT.as_secs();
    if host.starts_with("unix://") || host.starts_with('/') {
        Docker::connect_with_unix(host, timeout_secs, API_DEFAULT_VERSION)
            .map_err(ProbeError::Connect)
    } else if host.starts_with("tcp://") || host.starts_with("http://") {
        Docker::connect_with_http(host, timeout_secs, API_DEFAULT_VERSION)
            .map_err(ProbeError::Connect)
    } else {
        Err(ProbeError::Scheme(host.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[tokio::test]
    async fn local_daemon_answers_with_its_version() {
        let version = docker_version(Some(DEFAULT_DOCKER_HOST))
            .await
            .expect("the Docker daemon on this host answers");
        assert!(!version.is_empty());
        assert_eq!(
            docker_version(None).await.as_deref(),
            Some(version.as_str()),
            "None means the local socket"
        );
    }

    #[tokio::test]
    async fn missing_socket_gives_none_quickly() {
        let started = Instant::now();
        assert_eq!(
            docker_version(Some("unix:///nonexistent/docker.sock")).await,
            None
        );
        assert!(started.elapsed() < DOCKER_TIMEOUT);
    }

    #[tokio::test]
    async fn unsupported_scheme_gives_none() {
        assert_eq!(docker_version(Some("ftp://example")).await, None);
        assert!(matches!(
            connect("ftp://example"),
            Err(ProbeError::Scheme(_))
        ));
    }

    /// A socket that accepts connections and never answers: the probe gives up after
    /// [`DOCKER_TIMEOUT`] instead of hanging.
    #[tokio::test]
    async fn silent_daemon_times_out() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("silent.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind a unix socket");
        let hold = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                open.push(stream);
            }
        });
        let host = format!("unix://{}", path.display());

        let started = Instant::now();
        assert_eq!(docker_version(Some(&host)).await, None);
        let took = started.elapsed();
        hold.abort();
        assert!(
            took >= DOCKER_TIMEOUT - Duration::from_millis(100),
            "gave up early: {took:?}"
        );
        assert!(
            took < DOCKER_TIMEOUT + Duration::from_millis(500),
            "took {took:?}"
        );
    }
}

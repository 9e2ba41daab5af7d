//! The Docker Engine calls that checkpoints and restores need
//! (the agent's `checkpoint` module): CRIU checkpoints, the archive API, a container's
//! filesystem changes, and the one call bollard lacks (start from a checkpoint),
//! sent raw over the socket.
//!
//! Each call answers the daemon's or the connection's message as text on failure;
//! the caller names the operation and puts the time limit on it.

use std::io;
use std::path::{Path, PathBuf};

use bollard::container::{CreateCheckpointOptions, DeleteCheckpointOptions};
use bollard::models::{
    ChangeType, ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum, HostConfig,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, DownloadFromContainerOptions,
    InspectContainerOptions, RemoveContainerOptions, RemoveImageOptions, StartContainerOptions,
    StopContainerOptions, UploadToContainerOptions,
};
use bollard::{API_DEFAULT_VERSION, Docker};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

/// Client-side limit on waiting for response headers; above every limit the
/// checkpoint code puts on one call (a transfer may take 15 minutes).
const CLIENT_TIMEOUT_SECS: u64 = 1200;

/// Where the daemon listens.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// A Unix socket on this host.
    Unix(PathBuf),
    /// `HOST:PORT` over plain HTTP.
    Tcp(String),
}

impl Endpoint {
    /// Parses `unix:///path`, a socket path, `tcp://HOST:PORT` or
    /// `http://HOST:PORT`; `None` for anything else.
    pub fn parse(host: &str) -> Option<Endpoint> {
        if let Some(path) = host
            .strip_prefix("unix://")
            .or_else(|| host.starts_with('/').then_some(host))
        {
            Some(Endpoint::Unix(PathBuf::from(path)))
        } else if let Some(addr) = host
            .strip_prefix("tcp://")
            .or_else(|| host.strip_prefix("http://"))
        {
            let addr = addr.trim_end_matches('/');
            (!addr.is_empty() && !addr.contains('/')).then(|| Endpoint::Tcp(addr.to_owned()))
        } else {
            None
        }
    }

    /// The socket path of a local daemon.
    pub fn socket(&self) -> Option<&Path> {
        match self {
            Endpoint::Unix(path) => Some(path),
            Endpoint::Tcp(_) => None,
        }
    }

    /// A client for this endpoint; makes no call (see [`CheckpointDocker::negotiate`]).
    pub fn client(&self) -> Result<CheckpointDocker, String> {
        let docker = match self {
            Endpoint::Unix(path) => Docker::connect_with_unix(
                &path.to_string_lossy(),
                CLIENT_TIMEOUT_SECS,
                API_DEFAULT_VERSION,
            ),
            Endpoint::Tcp(addr) => Docker::connect_with_http(
                &format!("http://{addr}"),
                CLIENT_TIMEOUT_SECS,
                API_DEFAULT_VERSION,
            ),
        }
        .map_err(|e| e.to_string())?;
        Ok(CheckpointDocker {
            docker,
            endpoint: self.clone(),
        })
    }

    /// `POST uri` with a JSON body; returns the status and (at most 1 MiB of) body.
    async fn post(&self, uri: &str, body: Bytes) -> Result<(u16, Bytes), String> {
        match self {
            Endpoint::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| format!("connecting to {}: {e}", path.display()))?;
                send(TokioIo::new(stream), uri, body).await
            }
            Endpoint::Tcp(addr) => {
                let stream = tokio::net::TcpStream::connect(addr.as_str())
                    .await
                    .map_err(|e| format!("connecting to {addr}: {e}"))?;
                send(TokioIo::new(stream), uri, body).await
            }
        }
    }
}

/// What the daemon says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonInfo {
    /// It runs with experimental features (needed for checkpoints).
    pub experimental: bool,
    /// Its data root (`DockerRootDir`), when reported.
    pub root_dir: Option<String>,
}

/// What checkpoint and restore need of `GET /containers/{id}/json`.
#[derive(Debug, Clone)]
pub struct Inspected {
    /// The full container id, when reported.
    pub id: Option<String>,
    /// The image the container was created from (config, then image id).
    pub image: Option<String>,
    /// Its process runs.
    pub running: bool,
    /// It is paused.
    pub paused: bool,
    /// It was created and never started.
    pub created: bool,
    /// Its state in words, for messages (`exited`, or `in an unknown state`).
    pub state: String,
    /// The size of its writable layer (asked for with `size`; 0 otherwise).
    pub size_rw: u64,
    /// `{"Config": .., "HostConfig": ..}` as the daemon reported them.
    pub config: serde_json::Value,
    /// The storage driver's name.
    pub driver: Option<String>,
    /// The storage driver's `UpperDir`.
    pub upper_dir: Option<String>,
}

impl From<ContainerInspectResponse> for Inspected {
    fn from(inspect: ContainerInspectResponse) -> Self {
        let state = inspect.state.as_ref();
        Inspected {
            id: inspect.id.clone(),
            image: inspect
                .config
                .as_ref()
                .and_then(|c| c.image.clone())
                .or_else(|| inspect.image.clone()),
            running: state.and_then(|s| s.running).unwrap_or(false),
            paused: state.and_then(|s| s.paused).unwrap_or(false),
            created: state.and_then(|s| s.status) == Some(ContainerStateStatusEnum::CREATED),
            state: state
                .and_then(|s| s.status)
                .map(|s| s.to_string())
                .unwrap_or_else(|| "in an unknown state".to_owned()),
            size_rw: u64::try_from(inspect.size_rw.unwrap_or(0)).unwrap_or(0),
            config: serde_json::json!({
                "Config": inspect.config,
                "HostConfig": inspect.host_config,
            }),
            driver: inspect.graph_driver.as_ref().map(|d| d.name.clone()),
            upper_dir: inspect
                .graph_driver
                .as_ref()
                .and_then(|d| d.data.get("UpperDir").cloned()),
        }
    }
}

/// A rootfs change as `GET /containers/{id}/changes` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The path exists in the image and was changed.
    Modified,
    /// The path is new.
    Added,
    /// The path was deleted from the image.
    Deleted,
}

/// A Docker client for checkpoint and restore.
#[derive(Debug, Clone)]
pub struct CheckpointDocker {
    docker: Docker,
    endpoint: Endpoint,
}

impl CheckpointDocker {
    /// Agrees on the API version with the daemon.
    pub async fn negotiate(self) -> Result<Self, String> {
        let docker = self
            .docker
            .negotiate_version()
            .await
            .map_err(|e| e.to_string())?;
        Ok(CheckpointDocker {
            docker,
            endpoint: self.endpoint,
        })
    }

    /// `GET /info`.
    pub async fn info(&self) -> Result<DaemonInfo, String> {
        let info = self.docker.info().await.map_err(|e| e.to_string())?;
        Ok(DaemonInfo {
            experimental: info.experimental_build == Some(true),
            root_dir: info.docker_root_dir,
        })
    }

    /// Inspects container `id`; `size` also asks for the writable layer's size.
    pub async fn inspect(&self, id: &str, size: bool) -> Result<Inspected, String> {
        let options = size.then_some(InspectContainerOptions { size: true });
        let inspect = self.docker.inspect_container(id, options).await;
        inspect.map(Inspected::from).map_err(|e| e.to_string())
    }

    /// Stops container `id`, killing it after `grace_secs`.
    pub async fn stop(&self, id: &str, grace_secs: i32) -> Result<(), String> {
        let options = StopContainerOptions {
            signal: None,
            t: Some(grace_secs),
        };
        let stopped = self.docker.stop_container(id, Some(options)).await;
        stopped.map_err(|e| e.to_string())
    }

    /// Pauses container `id` (cgroup freezer).
    pub async fn pause(&self, id: &str) -> Result<(), String> {
        self.docker
            .pause_container(id)
            .await
            .map_err(|e| e.to_string())
    }

    /// Unpauses container `id`.
    pub async fn unpause(&self, id: &str) -> Result<(), String> {
        let unpaused = self.docker.unpause_container(id).await;
        unpaused.map_err(|e| e.to_string())
    }

    /// Starts container `id`.
    pub async fn start(&self, id: &str) -> Result<(), String> {
        let started = self
            .docker
            .start_container(id, None::<StartContainerOptions>)
            .await;
        started.map_err(|e| e.to_string())
    }

    /// Dumps container `id` with CRIU into the checkpoint `name`; `exit` stops it.
    pub async fn create_checkpoint(&self, id: &str, name: &str, exit: bool) -> Result<(), String> {
        let options = CreateCheckpointOptions {
            checkpoint_id: name.to_owned(),
            checkpoint_dir: None,
            exit,
        };
        let dumped = self.docker.create_checkpoint(id, options).await;
        dumped.map_err(|e| e.to_string())
    }

    /// Deletes the daemon's checkpoint `name` of container `id`.
    pub async fn delete_checkpoint(&self, id: &str, name: &str) -> Result<(), String> {
        let deleted = self
            .docker
            .delete_checkpoint(id, name, None::<DeleteCheckpointOptions>)
            .await;
        deleted.map_err(|e| e.to_string())
    }

    /// Starts the created container `id` from its checkpoint `name` (copied into
    /// the daemon's checkpoint directory of the container first).
    pub async fn start_from_checkpoint(&self, id: &str, name: &str) -> Result<(), String> {
        let uri = format!("/containers/{id}/start?checkpoint={name}");
        let (status, body) = self.endpoint.post(&uri, Bytes::new()).await?;
        if !(200..300).contains(&status) && status != 304 {
            return Err(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body).trim()
            ));
        }
        Ok(())
    }

    /// The changes of container `id`'s writable layer against its image.
    pub async fn changes(&self, id: &str) -> Result<Vec<(String, ChangeKind)>, String> {
        let changes = self
            .docker
            .container_changes(id)
            .await
            .map_err(|e| e.to_string())?;
        Ok(changes
            .unwrap_or_default()
            .into_iter()
            .map(|c| {
                let kind = match c.kind {
                    ChangeType::_0 => ChangeKind::Modified,
                    ChangeType::_1 => ChangeKind::Added,
                    ChangeType::_2 => ChangeKind::Deleted,
                };
                (c.path, kind)
            })
            .collect())
    }

    /// The archive (tar) of `path` in container `id`, as it streams in.
    pub fn download(&self, id: &str, path: &str) -> impl Stream<Item = Result<Bytes, String>> {
        let options = DownloadFromContainerOptions {
            path: path.to_owned(),
        };
        self.docker
            .download_from_container(id, Some(options))
            .map(|chunk| chunk.map_err(|e| e.to_string()))
    }

    /// Extracts the tar stream `body` into container `id` at `path`.
    pub async fn upload(
        &self,
        id: &str,
        path: &str,
        body: impl Stream<Item = io::Result<Bytes>> + Send + 'static,
    ) -> Result<(), String> {
        let options = UploadToContainerOptions {
            path: path.to_owned(),
            ..Default::default()
        };
        let uploaded = self
            .docker
            .upload_to_container(id, Some(options), bollard::body_try_stream(body))
            .await;
        uploaded.map_err(|e| e.to_string())
    }
}

impl CheckpointDocker {
    /// Imports the tar `rootfs` as the image `repo:tag` (`POST /images/create` with
    /// `fromSrc=-`, as `docker import`), applying the Dockerfile instructions
    /// `changes` (e.g. `ENTRYPOINT ["/probe"]`). Needs no registry.
    pub async fn import_image(
        &self,
        repo: &str,
        tag: &str,
        rootfs: Bytes,
        changes: &[&str],
    ) -> Result<(), String> {
        let options = CreateImageOptions {
            from_src: Some("-".to_owned()),
            repo: Some(repo.to_owned()),
            tag: Some(tag.to_owned()),
            changes: changes.iter().map(|c| (*c).to_owned()).collect(),
            ..Default::default()
        };
        let stream =
            (self.docker).create_image(Some(options), Some(bollard::body_full(rootfs)), None);
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| e.to_string())?;
            if let Some(message) = info.error_detail.and_then(|d| d.message) {
                return Err(message);
            }
        }
        Ok(())
    }

    /// Creates the container `name` from `image` with no network; its id.
    pub async fn create_isolated(&self, name: &str, image: &str) -> Result<String, String> {
        let options = CreateContainerOptions {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            network_disabled: Some(true),
            host_config: Some(HostConfig {
                network_mode: Some("none".to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = self.docker.create_container(Some(options), body).await;
        created.map(|c| c.id).map_err(|e| e.to_string())
    }

    /// Removes container `id`, running or not, with its anonymous volumes.
    pub async fn remove_container(&self, id: &str) -> Result<(), String> {
        let options = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        let removed = self.docker.remove_container(id, Some(options)).await;
        removed.map_err(|e| e.to_string())
    }

    /// Removes the image `reference` (not when a container still uses it).
    pub async fn remove_image(&self, reference: &str) -> Result<(), String> {
        let removed = (self.docker)
            .remove_image(reference, None::<RemoveImageOptions>, None)
            .await;
        removed.map(|_| ()).map_err(|e| e.to_string())
    }
}

async fn send<I>(io: I, uri: &str, body: Bytes) -> Result<(u16, Bytes), String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    let driver = tokio::spawn(conn);
    let request = hyper::Request::post(uri)
        .header(hyper::header::HOST, "docker")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| format!("request {uri}: {e}"))?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request {uri}: {e}"))?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), 1024 * 1024)
            .collect()
            .await
            .map_err(|e| format!("reading the answer to {uri}: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    driver.abort();
    result
}

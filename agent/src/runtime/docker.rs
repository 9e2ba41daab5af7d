//! [`DockerRuntime`]: the [`ContainerRuntime`] on the Docker Engine API (bollard).
//!
//! Every call carries a timeout ([`CALL_TIMEOUT`], or the grace period plus
//! [`CALL_TIMEOUT`] for a stop). Stats are read one-shot (no second sample inside
//! the daemon, so a reading takes milliseconds, not a second).

pub mod checkpoint;
pub mod sandbox;
pub mod version;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, ResizeExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerStateStatusEnum,
    ContainerStatsResponse, DeviceRequest, HostConfig, Mount, MountType, PortBinding, PortMap,
    RestartPolicy, RestartPolicyNameEnum, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StatsOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::{API_DEFAULT_VERSION, Docker};
use futures_util::stream::{self, BoxStream, StreamExt};
use novacron_common::wire::{MAX_PUBLISHED, PublishedPort, TerminalSize};
use tokio::sync::OnceCell;

use super::spec::{LABEL_ALLOC, LABEL_MANAGED, LABEL_NODE, port_key};
use super::{
    ContainerConfig, ContainerDetails, ContainerEvent, ContainerListing, ContainerRuntime,
    ContainerStatus, ExecSession, ExecState, InteractiveExec, LogFrame, MountConfig, PULL_TIMEOUT,
    PullError, RuntimeError, StatsReading,
};
use version::DEFAULT_DOCKER_HOST;

/// The limit on one call to the daemon.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// The client's own limit on waiting for response headers; above every per-call
/// limit, which are what actually apply.
const CLIENT_TIMEOUT_SECS: u64 = 300;

/// The Docker daemon as a [`ContainerRuntime`].
///
/// The API version is agreed with the daemon on the first call that reaches it (and
/// again on later calls until that succeeds), so an agent can start before its
/// daemon: calls fail with [`RuntimeError::Daemon`] until the daemon answers.
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    inner: Arc<Client>,
    /// The host address published ports bind to.
    publish_address: IpAddr,
    /// The DNS server containers resolve through (the agent's own, answering the
    /// fleet domain); `None`: Docker's default (the host's resolvers).
    resolver: Option<IpAddr>,
}

#[derive(Debug)]
struct Client {
    host: String,
    /// The daemon runs on this host (a Unix socket): its process ids are ours.
    local: bool,
    negotiated: OnceCell<Docker>,
}

impl DockerRuntime {
    /// A runtime for `host` (`unix:///var/run/docker.sock`, a socket path,
    /// `tcp://HOST:PORT` or `http://...`; [`DEFAULT_DOCKER_HOST`] when `None`).
    /// Does no I/O; fails only on an address it cannot use. A socket that is
    /// missing or a daemon that is down is not an error here: every call fails
    /// until the daemon answers, and the first call that reaches it connects
    /// (Docker may start after the agent).
    pub fn new(host: Option<&str>) -> Result<Self, RuntimeError> {
        let host = host.unwrap_or(DEFAULT_DOCKER_HOST);
        let local = host.starts_with("unix://") || host.starts_with('/');
        if !local && !host.starts_with("tcp://") && !host.starts_with("http://") {
            return Err(RuntimeError::Daemon {
                op: "connect",
                message: format!(
                    "unsupported Docker host {host:?}: expected unix://PATH, tcp://HOST:PORT or http://"
                ),
            });
        }
        // Fail now on an address the client cannot use at all; a missing socket
        // is left for later.
        if !local {
            connect(host, false)?;
        }
        Ok(DockerRuntime {
            inner: Arc::new(Client {
                local,
                host: host.to_owned(),
                negotiated: OnceCell::new(),
            }),
            publish_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            resolver: None,
        })
    }

    /// Containers started from now on resolve names through the DNS server at
    /// `resolver` (port 53: Docker's `--dns` takes no port).
    pub fn with_resolver(mut self, resolver: Option<IpAddr>) -> Self {
        self.resolver = resolver;
        self
    }

    /// Publishes container ports on `address` of the host instead of every
    /// address (`0.0.0.0`): to keep workloads on one interface, or to run several
    /// agents on one host whose jobs use the same host ports.
    pub fn with_publish_address(mut self, address: IpAddr) -> Self {
        self.publish_address = address;
        self
    }

    /// The host address published ports bind to.
    pub fn publish_address(&self) -> IpAddr {
        self.publish_address
    }

    /// The id (`sha256:...`) of image `image`.
    pub async fn image_id(&self, image: &str) -> Result<String, RuntimeError> {
        let docker = self.client().await?;
        let inspected = timed("inspect image", CALL_TIMEOUT, docker.inspect_image(image)).await?;
        Ok(inspected.id.unwrap_or_default())
    }

    /// Copies the files at `paths` out of image `image` into `dest` (each under
    /// its path in the image), through a container created from the image and
    /// never started, then removed. Returns the image's id. For the disk images
    /// of virtual machines, which travel as container images.
    pub async fn copy_from_image(
        &self,
        image: &str,
        paths: &[String],
        dest: &std::path::Path,
    ) -> Result<String, RuntimeError> {
        let docker = self.client().await?;
        let inspected = timed("inspect image", CALL_TIMEOUT, docker.inspect_image(image)).await?;
        let image_id = inspected.id.unwrap_or_default();
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            // An image of files only has no command; this one never runs.
            cmd: Some(vec!["/novacron-never-started".to_owned()]),
            network_disabled: Some(true),
            labels: Some(HashMap::from([(
                LABEL_MANAGED.to_owned(),
                "true".to_owned(),
            )])),
            ..Default::default()
        };
        let created = timed(
            "create",
            CALL_TIMEOUT,
            docker.create_container(
                None::<bollard::query_parameters::CreateContainerOptions>,
                body,
            ),
        )
        .await?;
        let result = async {
            for path in paths {
                let options =
                    bollard::query_parameters::DownloadFromContainerOptionsBuilder::default()
                        .path(path)
                        .build();
                let mut tar_bytes = Vec::new();
                let mut body = docker.download_from_container(&created.id, Some(options));
                let download = async {
                    while let Some(chunk) = body.next().await {
                        tar_bytes.extend_from_slice(&chunk.map_err(|e| classify("copy", e))?);
                    }
                    Ok::<(), RuntimeError>(())
                };
                tokio::time::timeout(PULL_TIMEOUT, download)
                    .await
                    .map_err(|_| RuntimeError::Timeout {
                        op: "copy",
                        after: PULL_TIMEOUT,
                    })??;
                let parent = dest.join(
                    std::path::Path::new(path.trim_start_matches('/'))
                        .parent()
                        .unwrap_or(std::path::Path::new("")),
                );
                tokio::task::spawn_blocking(move || {
                    std::fs::create_dir_all(&parent)?;
                    tar::Archive::new(std::io::Cursor::new(tar_bytes)).unpack(&parent)
                })
                .await
                .map_err(|e| RuntimeError::Daemon {
                    op: "copy",
                    message: e.to_string(),
                })?
                .map_err(|e| RuntimeError::Daemon {
                    op: "copy",
                    message: format!("{path} of {image}: {e}"),
                })?;
            }
            Ok(())
        }
        .await;
        let _ = self.remove(&created.id).await;
        result.map(|()| image_id)
    }

    /// [`DockerRuntime::new`], then agrees on the API version with the daemon at once.
    pub async fn connect(host: Option<&str>) -> Result<Self, RuntimeError> {
        let runtime = DockerRuntime::new(host)?;
        runtime.client().await?;
        Ok(runtime)
    }

    /// The client, with the API version agreed (for tests and tools that need more
    /// than the trait).
    pub async fn client(&self) -> Result<Docker, RuntimeError> {
        let client = &self.inner;
        client
            .negotiated
            .get_or_try_init(|| async {
                let base = connect(&client.host, client.local)?;
                let docker = timed("connect", CALL_TIMEOUT, base.negotiate_version()).await;
                docker.map_err(|e| RuntimeError::Daemon {
                    op: "connect",
                    message: format!("Docker at {}: {e}", client.host),
                })
            })
            .await
            .cloned()
    }
}

impl ContainerRuntime for DockerRuntime {
    async fn list(&self, node: &str) -> Result<Vec<ContainerListing>, RuntimeError> {
        let docker = self.client().await?;
        let filters = HashMap::from([(
            "label",
            vec![LABEL_ALLOC.to_owned(), format!("{LABEL_NODE}={node}")],
        )]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = timed("list", CALL_TIMEOUT, docker.list_containers(Some(options))).await?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                Some(ContainerListing {
                    id: c.id?,
                    labels: c.labels.unwrap_or_default(),
                    state: c.state.map(|s| s.to_string()).unwrap_or_default(),
                })
            })
            .collect())
    }

    async fn inspect(&self, id: &str) -> Result<ContainerDetails, RuntimeError> {
        let docker = self.client().await?;
        let details = timed("inspect", CALL_TIMEOUT, docker.inspect_container(id, None)).await?;
        Ok(details_of(details, id))
    }

    async fn image_present(&self, image: &str) -> Result<bool, RuntimeError> {
        let docker = self.client().await?;
        match timed("inspect image", CALL_TIMEOUT, docker.inspect_image(image)).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn local_images(&self) -> Result<Vec<super::images::LocalImage>, RuntimeError> {
        let docker = self.client().await?;
        let images = timed(
            "list images",
            CALL_TIMEOUT,
            docker.list_images(None::<bollard::query_parameters::ListImagesOptions>),
        )
        .await?;
        Ok(images
            .into_iter()
            .map(|i| super::images::LocalImage {
                id: i.id,
                tags: i
                    .repo_tags
                    .into_iter()
                    .filter(|r| !r.starts_with("<none>"))
                    .collect(),
                digests: i
                    .repo_digests
                    .into_iter()
                    .filter(|r| !r.starts_with("<none>"))
                    .collect(),
                size: i.size.max(0) as u64,
            })
            .collect())
    }

    async fn images_in_use(&self) -> Result<std::collections::HashSet<String>, RuntimeError> {
        let docker = self.client().await?;
        let options = ListContainersOptionsBuilder::default().all(true).build();
        let list = timed("list", CALL_TIMEOUT, docker.list_containers(Some(options))).await?;
        Ok(list.into_iter().filter_map(|c| c.image_id).collect())
    }

    async fn remove_image(&self, reference: &str) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        timed(
            "remove image",
            CALL_TIMEOUT,
            docker.remove_image(
                reference,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            ),
        )
        .await
        .map(|_| ())
    }

    async fn tag(&self, source: &str, target: &str) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        let (repo, tag) = novacron_common::names::split_image_tag(target);
        let tag = tag.unwrap_or("latest");
        let options = bollard::query_parameters::TagImageOptionsBuilder::default()
            .repo(repo)
            .tag(tag)
            .build();
        timed(
            "tag image",
            CALL_TIMEOUT,
            docker.tag_image(source, Some(options)),
        )
        .await
    }

    async fn image_inventory(&self) -> Result<novacron_common::wire::ImageInventory, RuntimeError> {
        let images = self.local_images().await?;
        let bytes = images.iter().map(|i| i.size).sum();
        let refs = images
            .into_iter()
            .flat_map(|i| i.tags.into_iter().chain(i.digests));
        Ok(super::inventory(refs, bytes))
    }

    async fn repo_digests(&self, image: &str) -> Result<Vec<String>, RuntimeError> {
        let docker = self.client().await?;
        match timed("inspect image", CALL_TIMEOUT, docker.inspect_image(image)).await {
            Ok(info) => Ok(info.repo_digests.unwrap_or_default()),
            Err(e) if e.is_not_found() => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    async fn pull(
        &self,
        image: &str,
        auth: Option<&novacron_common::wire::RegistryAuth>,
        progress: &(dyn Fn(novacron_common::wire::PullProgress) + Send + Sync),
    ) -> Result<(), PullError> {
        let docker = self
            .client()
            .await
            .map_err(|e| PullError::classify(None, &e.to_string()))?;
        let options = CreateImageOptionsBuilder::default()
            .from_image(image)
            .build();
        let credentials = auth.map(|a| bollard::auth::DockerCredentials {
            username: Some(a.username.text()),
            password: Some(a.password.text()),
            serveraddress: a.server.clone(),
            ..Default::default()
        });
        let mut steps = docker.create_image(Some(options), None, credentials);
        let pulled = tokio::time::timeout(PULL_TIMEOUT, async {
            // Per layer: (done, total) bytes.
            let mut layers: HashMap<String, (u64, u64)> = HashMap::new();
            let mut told: Option<std::time::Instant> = None;
            while let Some(step) = steps.next().await {
                let step = step?;
                if let Some(id) = step.id {
                    let entry = layers.entry(id).or_default();
                    match (step.status.as_deref(), step.progress_detail) {
                        (Some("Downloading"), Some(d)) => {
                            entry.0 = d.current.unwrap_or(0).max(0) as u64;
                            entry.1 = d.total.unwrap_or(0).max(0) as u64;
                        }
                        (Some("Download complete" | "Pull complete" | "Already exists"), _) => {
                            entry.0 = entry.1;
                        }
                        _ => {}
                    }
                }
                if told.is_none_or(|t| t.elapsed() >= std::time::Duration::from_millis(500)) {
                    told = Some(std::time::Instant::now());
                    progress(novacron_common::wire::PullProgress {
                        image: image.to_owned(),
                        done_bytes: layers.values().map(|l| l.0).sum(),
                        total_bytes: layers.values().map(|l| l.1).sum(),
                    });
                }
            }
            Ok::<(), bollard::errors::Error>(())
        })
        .await;
        match pulled {
            Ok(Ok(())) => Ok(()),
            Ok(Err(bollard::errors::Error::DockerResponseServerError {
                status_code,
                message,
            })) => Err(PullError::classify(Some(status_code), &message)),
            Ok(Err(e)) => Err(PullError::classify(None, &e.to_string())),
            Err(_) => Err(PullError {
                kind: super::PullFailure::Unreachable,
                message: format!("the pull did not finish within {PULL_TIMEOUT:?}"),
            }),
        }
    }

    async fn create(&self, name: &str, config: &ContainerConfig) -> Result<String, RuntimeError> {
        let docker = self.client().await?;
        for mount in &config.mounts {
            if let MountConfig::Volume { name: volume, .. } = mount {
                let request = VolumeCreateRequest {
                    name: Some(volume.clone()),
                    labels: Some(HashMap::from([(
                        LABEL_MANAGED.to_owned(),
                        "true".to_owned(),
                    )])),
                    ..VolumeCreateRequest::default()
                };
                // Creating a volume that exists returns it unchanged.
                timed("create volume", CALL_TIMEOUT, docker.create_volume(request)).await?;
            }
        }
        let options = CreateContainerOptionsBuilder::default().name(name).build();
        let created = timed(
            "create",
            CALL_TIMEOUT,
            docker.create_container(Some(options), {
                let mut body = create_body(config, self.publish_address);
                if let (Some(ip), Some(host)) = (self.resolver, body.host_config.as_mut()) {
                    host.dns = Some(vec![ip.to_string()]);
                }
                body
            }),
        )
        .await?;
        Ok(created.id)
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        timed("start", CALL_TIMEOUT, docker.start_container(id, None)).await
    }

    async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        let secs = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
        let options = StopContainerOptionsBuilder::default().t(secs).build();
        timed(
            "stop",
            grace + CALL_TIMEOUT,
            docker.stop_container(id, Some(options)),
        )
        .await
    }

    async fn set_paused(&self, id: &str, _paused: bool) -> Result<(), RuntimeError> {
        Err(RuntimeError::Daemon {
            op: "pause",
            message: format!(
                "container {id}: suspension is offered for virtual machines only (a checkpoint pauses containers)"
            ),
        })
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        timed(
            "remove",
            CALL_TIMEOUT,
            docker.remove_container(id, Some(options)),
        )
        .await
    }

    async fn stats(&self, id: &str) -> Result<StatsReading, RuntimeError> {
        let docker = self.client().await?;
        let options = StatsOptionsBuilder::default()
            .stream(false)
            .one_shot(true)
            .build();
        let mut stream = docker.stats(id, Some(options));
        match tokio::time::timeout(CALL_TIMEOUT, stream.next()).await {
            Ok(Some(Ok(stats))) => Ok(reading_of(&stats)),
            Ok(Some(Err(e))) => Err(classify("stats", e)),
            Ok(None) => Err(RuntimeError::Daemon {
                op: "stats",
                message: "the daemon sent no reading".into(),
            }),
            Err(_) => Err(RuntimeError::Timeout {
                op: "stats",
                after: CALL_TIMEOUT,
            }),
        }
    }

    async fn exec(&self, id: &str, command: &[String]) -> Result<i64, RuntimeError> {
        let docker = self.client().await?;
        let options = CreateExecOptions {
            cmd: Some(command.to_vec()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..CreateExecOptions::default()
        };
        let exec = timed("exec", CALL_TIMEOUT, docker.create_exec(id, options)).await?;
        let started = timed("exec", CALL_TIMEOUT, docker.start_exec(&exec.id, None)).await?;
        if let StartExecResults::Attached { mut output, .. } = started {
            // The output is not kept; reading it to the end waits for the command.
            while let Some(item) = output.next().await {
                item.map_err(|e| classify("exec", e))?;
            }
        }
        let inspected = timed("exec", CALL_TIMEOUT, docker.inspect_exec(&exec.id)).await?;
        inspected.exit_code.ok_or(RuntimeError::Daemon {
            op: "exec",
            message: "the command has no exit code".into(),
        })
    }

    async fn exec_attached(
        &self,
        id: &str,
        command: &[String],
    ) -> Result<ExecSession, RuntimeError> {
        let docker = self.client().await?;
        let options = CreateExecOptions {
            cmd: Some(command.to_vec()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            ..CreateExecOptions::default()
        };
        let exec = timed("exec", CALL_TIMEOUT, docker.create_exec(id, options)).await?;
        let started = timed("exec", CALL_TIMEOUT, docker.start_exec(&exec.id, None)).await?;
        let output = match started {
            StartExecResults::Attached { output, .. } => exec_frames(output),
            StartExecResults::Detached => stream::empty().boxed(),
        };
        Ok(ExecSession {
            id: exec.id,
            output,
        })
    }

    async fn exec_interactive(
        &self,
        id: &str,
        command: &[String],
        tty: Option<TerminalSize>,
    ) -> Result<InteractiveExec, RuntimeError> {
        let docker = self.client().await?;
        let options = CreateExecOptions {
            cmd: Some(command.to_vec()),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(tty.is_some()),
            // As `docker exec -t` does: programs that draw need to know the terminal.
            env: tty.map(|_| vec!["TERM=xterm".to_string()]),
            ..CreateExecOptions::default()
        };
        let exec = timed("exec", CALL_TIMEOUT, docker.create_exec(id, options)).await?;
        let start = StartExecOptions {
            detach: false,
            tty: tty.is_some(),
            output_capacity: None,
        };
        let started = timed(
            "exec",
            CALL_TIMEOUT,
            docker.start_exec(&exec.id, Some(start)),
        )
        .await?;
        let StartExecResults::Attached { output, input } = started else {
            return Err(RuntimeError::Daemon {
                op: "exec",
                message: "the runtime started the command detached".into(),
            });
        };
        let output = exec_frames(output);
        if let Some(size) = tty {
            // Docker sizes an exec's terminal only once it runs.
            self.exec_resize(&exec.id, size).await?;
        }
        Ok(InteractiveExec {
            id: exec.id,
            output,
            input,
        })
    }

    async fn exec_resize(&self, exec_id: &str, size: TerminalSize) -> Result<(), RuntimeError> {
        let docker = self.client().await?;
        let size = size.bounded();
        let options = ResizeExecOptions {
            height: size.rows,
            width: size.cols,
        };
        timed(
            "exec resize",
            CALL_TIMEOUT,
            docker.resize_exec(exec_id, options),
        )
        .await
    }

    async fn exec_state(&self, exec_id: &str) -> Result<ExecState, RuntimeError> {
        let docker = self.client().await?;
        let inspected = timed("exec inspect", CALL_TIMEOUT, docker.inspect_exec(exec_id)).await?;
        Ok(ExecState {
            running: inspected.running.unwrap_or(false),
            exit_code: inspected.exit_code,
            pid: inspected
                .pid
                .and_then(|p| u32::try_from(p).ok())
                .filter(|p| *p > 1),
        })
    }

    async fn exec_kill(&self, exec_id: &str) -> Result<(), RuntimeError> {
        let state = self.exec_state(exec_id).await?;
        let Some(pid) = state.pid.filter(|_| state.running) else {
            return Ok(());
        };
        if !self.inner.local {
            return Err(RuntimeError::Daemon {
                op: "exec kill",
                message: format!(
                    "the Docker daemon at {} is not local: its process {pid} cannot be signalled from this host",
                    self.inner.host
                ),
            });
        }
        kill_tree(pid).map_err(|e| RuntimeError::Daemon {
            op: "exec kill",
            message: format!("cannot kill process {pid} of exec {exec_id}: {e}"),
        })
    }

    fn logs(
        &self,
        id: &str,
        follow: bool,
        tail: u32,
    ) -> BoxStream<'static, Result<LogFrame, RuntimeError>> {
        let tail = if tail == 0 {
            "all".to_owned()
        } else {
            tail.to_string()
        };
        let options = LogsOptionsBuilder::default()
            .follow(follow)
            .stdout(true)
            .stderr(true)
            .tail(&tail)
            .build();
        let runtime = self.clone();
        let id = id.to_owned();
        stream::once(async move { runtime.client().await })
            .map(move |client| match client {
                Ok(docker) => docker
                    .logs(&id, Some(options.clone()))
                    .filter_map(|item| async move { frame_of(item) })
                    .boxed(),
                Err(e) => stream::iter([Err(e)]).boxed(),
            })
            .flatten()
            .boxed()
    }

    fn events(&self, node: &str) -> BoxStream<'static, Result<ContainerEvent, RuntimeError>> {
        let filters = HashMap::from([
            ("type", vec!["container".to_owned()]),
            ("label", vec![format!("{LABEL_NODE}={node}")]),
        ]);
        let options = EventsOptionsBuilder::default().filters(&filters).build();
        let runtime = self.clone();
        stream::once(async move { runtime.client().await })
            .map(move |client| match client {
                Ok(docker) => docker
                    .events(Some(options.clone()))
                    .filter_map(|item| async move {
                        match item {
                            Ok(event) => {
                                let container_id = event.actor.and_then(|a| a.id)?;
                                Some(Ok(ContainerEvent {
                                    container_id,
                                    action: event.action.unwrap_or_default(),
                                }))
                            }
                            Err(e) => Some(Err(classify("events", e))),
                        }
                    })
                    .boxed(),
                Err(e) => stream::iter([Err(e)]).boxed(),
            })
            .flatten()
            .boxed()
    }
}

/// Kills `pid` and its process group. The runtime makes every exec process the
/// leader of a new session (so of its own group): the group holds whatever the
/// command started. A process that is not a group leader is killed alone.
fn kill_tree(pid: u32) -> std::io::Result<()> {
    use rustix::process::{Pid, Signal, kill_process, kill_process_group};
    let pid = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .filter(|p| !p.is_init())
        .ok_or_else(|| std::io::Error::other(format!("refusing to signal process id {pid}")))?;
    match kill_process_group(pid, Signal::KILL) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::SRCH) => match kill_process(pid, Signal::KILL) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        },
        Err(e) => Err(e.into()),
    }
}

/// An exec instance's output as frames (its echoed input left out), errors
/// named as exec's.
fn exec_frames(
    output: std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>,
    >,
) -> BoxStream<'static, Result<LogFrame, RuntimeError>> {
    output
        .filter_map(|item| async move {
            match item {
                Ok(other) => frame_of(Ok(other)),
                Err(e) => Some(Err(classify("exec", e))),
            }
        })
        .boxed()
}

fn frame_of(
    item: Result<LogOutput, bollard::errors::Error>,
) -> Option<Result<LogFrame, RuntimeError>> {
    match item {
        Ok(LogOutput::StdErr { message }) => Some(Ok(LogFrame {
            stderr: true,
            data: message.to_vec(),
        })),
        Ok(LogOutput::StdOut { message } | LogOutput::Console { message }) => Some(Ok(LogFrame {
            stderr: false,
            data: message.to_vec(),
        })),
        Ok(LogOutput::StdIn { .. }) => None,
        Err(e) => Some(Err(classify("logs", e))),
    }
}

/// The Docker create body of `config`, its ports published on `publish_address`.
/// Restart policy `no`: the supervisor restarts containers itself and counts the
/// restarts.
pub fn create_body(config: &ContainerConfig, publish_address: IpAddr) -> ContainerCreateBody {
    let non_empty = |v: &Vec<String>| (!v.is_empty()).then(|| v.clone());
    let mut port_bindings = HashMap::new();
    for port in &config.ports {
        port_bindings
            .entry(port_key(port))
            .or_insert_with(|| Some(Vec::new()))
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: Some(publish_address.to_string()),
                // Empty: Docker picks a free port.
                host_port: Some(port.host_port.map(|p| p.to_string()).unwrap_or_default()),
            });
    }
    let mounts: Vec<Mount> = config
        .mounts
        .iter()
        .map(|m| match m {
            MountConfig::Volume {
                name,
                target,
                read_only,
            } => Mount {
                typ: Some(MountType::VOLUME),
                source: Some(name.clone()),
                target: Some(target.clone()),
                read_only: Some(*read_only),
                ..Mount::default()
            },
            MountConfig::Bind {
                source,
                target,
                read_only,
            } => Mount {
                typ: Some(MountType::BIND),
                source: Some(source.clone()),
                target: Some(target.clone()),
                read_only: Some(*read_only),
                ..Mount::default()
            },
        })
        .collect();
    let device_requests = (!config.gpu_uuids.is_empty()).then(|| {
        vec![DeviceRequest {
            driver: Some("nvidia".to_owned()),
            device_ids: Some(config.gpu_uuids.clone()),
            capabilities: Some(vec![vec!["gpu".to_owned()]]),
            ..DeviceRequest::default()
        }]
    });
    let host_config = HostConfig {
        nano_cpus: config.nano_cpus,
        memory: config.memory_bytes,
        memory_swap: config.memory_bytes,
        device_requests,
        port_bindings: (!port_bindings.is_empty()).then_some(port_bindings),
        mounts: (!mounts.is_empty()).then_some(mounts),
        restart_policy: Some(RestartPolicy {
            name: Some(RestartPolicyNameEnum::NO),
            maximum_retry_count: None,
        }),
        ..HostConfig::default()
    };
    let exposed: Vec<String> = config.ports.iter().map(port_key).collect();
    ContainerCreateBody {
        image: Some(config.image.clone()),
        entrypoint: non_empty(&config.entrypoint),
        cmd: non_empty(&config.cmd),
        env: (!config.env.is_empty() || !config.secret_env.is_empty()).then(|| {
            config
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .chain(
                    config
                        .secret_env
                        .iter()
                        .map(|(k, v)| format!("{k}={}", v.text())),
                )
                .collect()
        }),
        working_dir: config.working_dir.clone(),
        labels: Some(config.labels.clone().into_iter().collect()),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        host_config: Some(host_config),
        ..ContainerCreateBody::default()
    }
}

/// Runs one call to the daemon with a limit.
async fn timed<T>(
    op: &'static str,
    limit: Duration,
    call: impl Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<T, RuntimeError> {
    match tokio::time::timeout(limit, call).await {
        Ok(result) => result.map_err(|e| classify(op, e)),
        Err(_) => Err(RuntimeError::Timeout { op, after: limit }),
    }
}

/// A client for `host` (no I/O beyond checking that a socket file exists).
fn connect(host: &str, local: bool) -> Result<Docker, RuntimeError> {
    let client = if local {
        Docker::connect_with_unix(host, CLIENT_TIMEOUT_SECS, API_DEFAULT_VERSION)
    } else {
        Docker::connect_with_http(host, CLIENT_TIMEOUT_SECS, API_DEFAULT_VERSION)
    };
    client.map_err(|e| match e {
        bollard::errors::Error::SocketNotFoundError(path) => RuntimeError::Daemon {
            op: "connect",
            message: format!(
                "Docker's socket {path} does not exist (is Docker installed and running?)"
            ),
        },
        other => classify("connect", other),
    })
}

fn classify(op: &'static str, e: bollard::errors::Error) -> RuntimeError {
    use bollard::errors::Error;
    match e {
        Error::DockerResponseServerError {
            status_code: 404,
            message,
        } => RuntimeError::NotFound { op, message },
        Error::DockerResponseServerError {
            status_code: 409,
            message,
        } => RuntimeError::Conflict { op, message },
        Error::RequestTimeoutError => RuntimeError::Timeout {
            op,
            after: Duration::from_secs(CLIENT_TIMEOUT_SECS),
        },
        other => RuntimeError::Daemon {
            op,
            message: other.to_string(),
        },
    }
}

fn details_of(details: ContainerInspectResponse, id: &str) -> ContainerDetails {
    let state = details.state.unwrap_or_default();
    let status = if state.running == Some(true) {
        ContainerStatus::Running
    } else if state.status == Some(ContainerStateStatusEnum::CREATED) {
        ContainerStatus::Created
    } else {
        ContainerStatus::Exited {
            code: state.exit_code.unwrap_or(-1),
            oom_killed: state.oom_killed.unwrap_or(false),
            error: state.error.unwrap_or_default(),
        }
    };
    let network = details.network_settings.unwrap_or_default();
    let published = network.ports.as_ref().map(published_of).unwrap_or_default();
    let ip = network.networks.and_then(|networks| {
        networks
            .values()
            .filter_map(|e| e.ip_address.as_deref())
            .find_map(|ip| ip.parse::<IpAddr>().ok())
    });
    ContainerDetails {
        id: details.id.unwrap_or_else(|| id.to_owned()),
        labels: details.config.and_then(|c| c.labels).unwrap_or_default(),
        status,
        started_at_unix_ms: state.started_at.as_deref().and_then(rfc3339_to_unix_ms),
        ip,
        published,
        // Docker pauses a container for its own reasons (a filesystem
        // checkpoint freezes it): suspension is for VMs only, so a paused
        // container is never the supervisor's to resume.
        paused: false,
    }
}

/// The host bindings of Docker's port map (`{"8080/tcp": [{"HostIp": "0.0.0.0",
/// "HostPort": "20001"}]}`), sorted, at most [`MAX_PUBLISHED`]; entries that do not
/// parse (an unpublished exposed port, an unknown protocol) are left out.
fn published_of(ports: &PortMap) -> Vec<PublishedPort> {
    let mut out: Vec<PublishedPort> = ports
        .iter()
        .filter_map(|(key, bindings)| {
            let (port, protocol) = key.split_once('/').unwrap_or((key, "tcp"));
            let container_port = port.parse::<u16>().ok()?;
            let udp = match protocol {
                "tcp" => false,
                "udp" => true,
                _ => return None,
            };
            Some((container_port, udp, bindings.as_deref().unwrap_or_default()))
        })
        .flat_map(|(container_port, udp, bindings)| {
            bindings.iter().filter_map(move |b| {
                Some(PublishedPort {
                    host_ip: match b.host_ip.as_deref() {
                        None | Some("") => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                        Some(ip) => ip.parse().ok()?,
                    },
                    host_port: b.host_port.as_deref()?.parse().ok()?,
                    container_port,
                    udp,
                })
            })
        })
        .collect();
    out.sort_by_key(|p| {
        (
            p.container_port,
            p.udp,
            p.host_ip.is_ipv6(),
            p.host_ip,
            p.host_port,
        )
    });
    out.dedup();
    out.truncate(MAX_PUBLISHED);
    out
}

/// Docker's RFC 3339 times (`2024-05-07T10:11:12.123456789Z`) as Unix ms; `None`
/// for its zero time (`0001-01-01T00:00:00Z`, never started) and bad input.
fn rfc3339_to_unix_ms(rfc3339: &str) -> Option<u64> {
    let at = humantime::parse_rfc3339(rfc3339).ok()?;
    let ms = at.duration_since(UNIX_EPOCH).ok()?.as_millis();
    (ms > 0).then(|| u64::try_from(ms).unwrap_or(u64::MAX))
}

fn reading_of(stats: &ContainerStatsResponse) -> StatsReading {
    let cpu = stats.cpu_stats.clone().unwrap_or_default();
    let usage = cpu.cpu_usage.unwrap_or_default();
    let online_cpus = cpu.online_cpus.filter(|n| *n > 0).unwrap_or_else(|| {
        usage
            .percpu_usage
            .as_ref()
            .map_or(1, |v| u32::try_from(v.len()).unwrap_or(1).max(1))
    });
    let memory = stats.memory_stats.clone().unwrap_or_default();
    let used = memory.usage.unwrap_or(0);
    // As `docker stats`: page cache the kernel can drop is not "in use".
    let inactive = memory
        .stats
        .as_ref()
        .and_then(|s| {
            s.get("total_inactive_file")
                .or_else(|| s.get("inactive_file"))
        })
        .copied()
        .unwrap_or(0);
    let (rx, tx) = stats
        .networks
        .as_ref()
        .map(|n| {
            n.values().fold((0u64, 0u64), |(rx, tx), i| {
                (
                    rx.saturating_add(i.rx_bytes.unwrap_or(0)),
                    tx.saturating_add(i.tx_bytes.unwrap_or(0)),
                )
            })
        })
        .unwrap_or((0, 0));
    StatsReading {
        cpu_total_ns: usage.total_usage.unwrap_or(0),
        system_cpu_ns: cpu.system_cpu_usage,
        online_cpus,
        memory_bytes: if inactive < used {
            used - inactive
        } else {
            used
        },
        rx_bytes: rx,
        tx_bytes: tx,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use novacron_common::wire::PortMapping;

    use super::*;

    const ANY: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

    fn config() -> ContainerConfig {
        ContainerConfig {
            image: "img:1".into(),
            entrypoint: vec![],
            cmd: vec!["sleep".into(), "5".into()],
            env: BTreeMap::from([("A".into(), "1".into()), ("B".into(), "x=y".into())]),
            working_dir: Some("/w".into()),
            labels: BTreeMap::from([(LABEL_ALLOC.into(), "a1".into())]),
            nano_cpus: Some(500_000_000),
            memory_bytes: Some(64 << 20),
            gpu_uuids: vec![],
            ports: vec![
                PortMapping {
                    name: "http".into(),
                    container_port: 80,
                    host_port: None,
                    udp: false,
                },
                PortMapping {
                    name: "dns".into(),
                    container_port: 53,
                    host_port: Some(5353),
                    udp: true,
                },
            ],
            mounts: vec![
                MountConfig::Volume {
                    name: "data".into(),
                    target: "/data".into(),
                    read_only: false,
                },
                MountConfig::Bind {
                    source: "/srv".into(),
                    target: "/srv".into(),
                    read_only: true,
                },
            ],
            secret_env: vec![],
            vm: None,
        }
    }

    #[test]
    fn secret_variables_join_the_environment_and_never_print() {
        let mut c = config();
        c.secret_env = vec![(
            "DB_PASSWORD".into(),
            novacron_common::wire::SecretBytes(b"hunter2".to_vec()),
        )];
        assert!(!format!("{c:?}").contains("hunter2"));
        let body = create_body(&c, ANY);
        assert_eq!(
            body.env,
            Some(vec![
                "A=1".into(),
                "B=x=y".into(),
                "DB_PASSWORD=hunter2".into()
            ])
        );
    }

    #[test]
    fn body_has_limits_ports_mounts_and_no_restart_policy() {
        let body = create_body(&config(), ANY);
        assert_eq!(body.entrypoint, None, "empty keeps the image's");
        assert_eq!(body.cmd, Some(vec!["sleep".to_string(), "5".to_string()]));
        assert_eq!(body.env, Some(vec!["A=1".to_string(), "B=x=y".to_string()]));
        assert_eq!(
            body.labels.as_ref().map(|l| l["novacron.alloc"].as_str()),
            Some("a1")
        );
        let mut exposed = body.exposed_ports.clone().unwrap_or_default();
        exposed.sort();
        assert_eq!(exposed, vec!["53/udp", "80/tcp"]);
        let host = body.host_config.expect("host config");
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.memory_swap, Some(64 << 20));
        assert_eq!(host.device_requests, None);
        assert_eq!(
            host.restart_policy.and_then(|p| p.name),
            Some(RestartPolicyNameEnum::NO)
        );
        let bindings = host.port_bindings.expect("bindings");
        let http = bindings["80/tcp"].clone().expect("binding");
        assert_eq!(http[0].host_ip.as_deref(), Some("0.0.0.0"));
        let local = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let on_local = create_body(&config(), local)
            .host_config
            .expect("host config");
        let bindings = on_local.port_bindings.expect("bindings");
        let http_local = bindings["80/tcp"].clone().expect("binding");
        assert_eq!(http_local[0].host_ip.as_deref(), Some("127.0.0.2"));
        assert_eq!(http[0].host_port.as_deref(), Some(""));
        let dns = bindings["53/udp"].clone().expect("binding");
        assert_eq!(dns[0].host_port.as_deref(), Some("5353"));
        let mounts = host.mounts.expect("mounts");
        assert_eq!(mounts[0].typ, Some(MountType::VOLUME));
        assert_eq!(mounts[1].typ, Some(MountType::BIND));
        assert_eq!(mounts[1].read_only, Some(true));
    }

    #[test]
    fn gpus_become_an_nvidia_device_request() {
        let mut cfg = config();
        cfg.gpu_uuids = vec!["GPU-1".into(), "GPU-2".into()];
        let host = create_body(&cfg, ANY).host_config.expect("host config");
        let requests = host.device_requests.expect("device requests");
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].driver.as_deref(), Some("nvidia"));
        assert_eq!(
            requests[0].device_ids,
            Some(vec!["GPU-1".to_string(), "GPU-2".to_string()])
        );
    }

    #[test]
    fn unlimited_means_no_limit_fields() {
        let mut cfg = config();
        cfg.nano_cpus = None;
        cfg.memory_bytes = None;
        cfg.ports.clear();
        cfg.mounts.clear();
        let body = create_body(&cfg, ANY);
        assert_eq!(body.exposed_ports, None);
        let host = body.host_config.expect("host config");
        assert_eq!(
            (host.nano_cpus, host.memory, host.memory_swap),
            (None, None, None)
        );
        assert_eq!(host.port_bindings, None);
        assert_eq!(host.mounts, None);
    }

    #[test]
    fn docker_times_parse() {
        assert_eq!(rfc3339_to_unix_ms("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(
            rfc3339_to_unix_ms("2024-05-07T10:11:12.123456789Z"),
            Some(1_715_076_672_123)
        );
        assert_eq!(rfc3339_to_unix_ms("0001-01-01T00:00:00Z"), None);
        assert_eq!(rfc3339_to_unix_ms("garbage"), None);
    }

    #[test]
    fn errors_are_classified() {
        let e = |status_code| bollard::errors::Error::DockerResponseServerError {
            status_code,
            message: "m".into(),
        };
        assert!(classify("x", e(404)).is_not_found());
        assert!(matches!(
            classify("x", e(409)),
            RuntimeError::Conflict { .. }
        ));
        assert!(matches!(classify("x", e(500)), RuntimeError::Daemon { .. }));
    }
}

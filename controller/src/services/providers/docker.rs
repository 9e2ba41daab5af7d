//! The `docker` provider: each node is a container of `novacron-agent` on a Docker
//! daemon (the local one unless `DOCKER_HOST` says otherwise), with the daemon's
//! socket mounted so that the agent runs its workloads there. The container joins
//! with a single-use token, then runs with the pool's labels. Its settings are the
//! pool's `docker.*` labels (see [`DockerSettings`]).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};

use super::{
    CreateNode, LABEL_NODE, LABEL_POOL, LABEL_WARM, NodeProvider, ProviderError, ProviderNode,
};

/// Pool label: the image holding `novacron-agent` (required).
pub const KEY_IMAGE: &str = "docker.image";
/// Pool label: the Docker network of the node containers.
pub const KEY_NETWORK: &str = "docker.network";
/// Pool label: the controller's API URL as the containers reach it.
pub const KEY_CONTROLLER: &str = "docker.controller";
/// Pool label: the daemon's socket on the host, mounted into each node.
pub const KEY_SOCKET: &str = "docker.socket";
/// Pool label: where each node's agent reads spot interruption notices, a path
/// inside its container (for clouds' hooks that write one, and for tests).
pub const KEY_SPOT_NOTICE: &str = "docker.spotNotice";
/// Default network: Docker's default bridge.
pub const DEFAULT_NETWORK: &str = "bridge";
/// Default socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// Label on workload containers (set by the agent); only these and the node
/// containers themselves are ever removed.
const LABEL_ALLOC: &str = "novacron.alloc";
/// Limit on one call to the daemon.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped node's agent has to exit before Docker kills it (within
/// [`CALL_TIMEOUT`]).
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Where the agent keeps its identity in the image (the packaged default).
const STATE_DIR: &str = "/var/lib/novacron/agent";

/// The docker provider's settings of one pool, from its `docker.*` labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerSettings {
    /// The image holding `novacron-agent` (and a shell).
    pub image: String,
    /// The network the containers join.
    pub network: String,
    /// The controller's API URL as the containers reach it; `None`: the
    /// controller's own API URL.
    pub controller: Option<String>,
    /// The daemon's socket on the host.
    pub socket: String,
    /// Where the agents read spot notices, inside their containers.
    pub spot_notice: Option<String>,
}

impl DockerSettings {
    /// Reads the settings of `pool` from its labels.
    pub fn from_labels(
        pool: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<DockerSettings, ProviderError> {
        let get = |k: &str| labels.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let image = get(KEY_IMAGE).ok_or_else(|| {
            ProviderError::Settings(format!(
                "node pool {pool} uses provider docker but metadata.labels has no {KEY_IMAGE}; \
                 expected the image that holds novacron-agent, like {KEY_IMAGE}: novacron-fleet:1"
            ))
        })?;
        if image.chars().any(char::is_whitespace) {
            return Err(ProviderError::Settings(format!(
                "node pool {pool}: {KEY_IMAGE} {image:?} is not an image reference; expected \
                 a name like novacron-fleet:1"
            )));
        }
        let controller = get(KEY_CONTROLLER).map(str::to_string);
        if let Some(c) = &controller
            && !c.starts_with("https://")
        {
            return Err(ProviderError::Settings(format!(
                "node pool {pool}: {KEY_CONTROLLER} {c:?} is not an https URL; expected the \
                 controller's API as the containers reach it, like https://172.17.0.1:7443"
            )));
        }
        let socket = get(KEY_SOCKET).unwrap_or(DEFAULT_SOCKET).to_string();
        if !socket.starts_with('/') {
            return Err(ProviderError::Settings(format!(
                "node pool {pool}: {KEY_SOCKET} {socket:?} is not an absolute path; expected \
                 the daemon's socket on the host, like {DEFAULT_SOCKET}"
            )));
        }
        let spot_notice = get(KEY_SPOT_NOTICE).map(str::to_string);
        if let Some(p) = &spot_notice
            && !p.starts_with('/')
        {
            return Err(ProviderError::Settings(format!(
                "node pool {pool}: {KEY_SPOT_NOTICE} {p:?} is not an absolute path; expected \
                 the file inside each node's container where notices appear, like /run/spot"
            )));
        }
        Ok(DockerSettings {
            spot_notice,
            image: image.to_string(),
            network: get(KEY_NETWORK).unwrap_or(DEFAULT_NETWORK).to_string(),
            controller,
            socket,
        })
    }
}

/// Nodes as containers on a Docker daemon.
#[derive(Debug, Clone)]
pub struct DockerProvider {
    docker: Result<Docker, String>,
    settings: BTreeMap<String, DockerSettings>,
}

impl DockerProvider {
    /// A provider on the local daemon (`DOCKER_HOST` when set). Does no I/O; a
    /// daemon it cannot address fails each call. `settings` are the pools' settings
    /// by pool name.
    pub fn new(settings: BTreeMap<String, DockerSettings>) -> DockerProvider {
        DockerProvider {
            docker: Docker::connect_with_local_defaults().map_err(|e| e.to_string()),
            settings,
        }
    }

    fn client(&self, op: &'static str, name: &str) -> Result<&Docker, ProviderError> {
        self.docker.as_ref().map_err(|e| ProviderError::Docker {
            op,
            name: name.to_string(),
            message: format!("cannot address the daemon: {e}"),
        })
    }

    /// The container of node `name` of `pool` (none or one).
    async fn node_containers(
        &self,
        op: &'static str,
        pool: &str,
        name: &str,
    ) -> Result<Vec<bollard::models::ContainerSummary>, ProviderError> {
        self.containers(
            op,
            name,
            vec![
                format!("{LABEL_POOL}={pool}"),
                format!("{LABEL_NODE}={name}"),
            ],
        )
        .await
    }

    /// Containers with all of `labels` (`key` or `key=value`).
    async fn containers(
        &self,
        op: &'static str,
        name: &str,
        labels: Vec<String>,
    ) -> Result<Vec<bollard::models::ContainerSummary>, ProviderError> {
        let docker = self.client(op, name)?;
        let filters = HashMap::from([("label", labels)]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        timed(op, name, docker.list_containers(Some(options))).await
    }
}

impl NodeProvider for DockerProvider {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn elastic(&self) -> bool {
        true
    }

    async fn create(&self, req: &CreateNode<'_>) -> Result<(), ProviderError> {
        let settings = self.settings.get(req.pool).ok_or_else(|| {
            ProviderError::Settings(format!(
                "node pool {} has no docker settings; expected metadata.labels with {KEY_IMAGE}",
                req.pool
            ))
        })?;
        let docker = self.client("create", req.name)?;
        // The labels go to the agent as arguments of the script, never through the
        // shell's parser. A warm node enrolls and exits (the container stops); its
        // next start finds its identity and runs the agent.
        let script = format!(
            "if [ ! -f {STATE_DIR}/node.pem ]; then novacron-agent join || exit $?; \
             [ -n \"$NOVACRON_WARM\" ] && exit 0; fi; exec novacron-agent run \"$@\""
        );
        let mut cmd = vec!["sh".to_string(), "-c".into(), script, "sh".into()];
        for (k, v) in req.labels {
            cmd.push("--label".into());
            cmd.push(format!("{k}={v}"));
        }
        let mut env = vec![
            format!("NOVACRON_CONTROLLER={}", req.join.controller),
            format!("NOVACRON_JOIN_TOKEN={}", req.join.token),
            format!("NOVACRON_CA_FINGERPRINT={}", req.join.ca_fingerprint),
            format!("NOVACRON_NODE_NAME={}", req.name),
        ];
        if req.warm {
            env.push("NOVACRON_WARM=1".into());
        }
        if let Some(path) = &settings.spot_notice {
            env.push(format!("NOVACRON_SPOT_NOTICE={path}"));
        }
        let mut labels = HashMap::from([
            (LABEL_POOL.to_string(), req.pool.to_string()),
            (LABEL_NODE.to_string(), req.name.to_string()),
            (
                "novacron.instance-type".to_string(),
                req.template.instance_type.clone(),
            ),
        ]);
        if req.warm {
            labels.insert(LABEL_WARM.to_string(), "1".to_string());
        }
        let body = ContainerCreateBody {
            image: Some(settings.image.clone()),
            hostname: Some(req.name.to_string()),
            cmd: Some(cmd),
            env: Some(env),
            labels: Some(labels),
            host_config: Some(HostConfig {
                binds: Some(vec![format!("{0}:/var/run/docker.sock", settings.socket)]),
                network_mode: Some(settings.network.clone()),
                ..HostConfig::default()
            }),
            ..ContainerCreateBody::default()
        };
        let options = CreateContainerOptionsBuilder::default()
            .name(req.name)
            .build();
        let created = timed(
            "create",
            req.name,
            docker.create_container(Some(options), body),
        )
        .await?;
        if let Err(e) = timed("start", req.name, docker.start_container(&created.id, None)).await {
            // Leave nothing half-made behind.
            let _ = self.delete(req.pool, req.name).await;
            return Err(e);
        }
        Ok(())
    }

    async fn start(&self, pool: &str, name: &str) -> Result<(), ProviderError> {
        let docker = self.client("start", name)?;
        let node = self.node_containers("start", pool, name).await?;
        let id = node
            .into_iter()
            .find_map(|c| c.id)
            .ok_or_else(|| ProviderError::Docker {
                op: "start",
                name: name.to_string(),
                message: format!("no container of node {name} in pool {pool}"),
            })?;
        timed("start", name, docker.start_container(&id, None)).await
    }

    async fn stop(&self, pool: &str, name: &str) -> Result<(), ProviderError> {
        let docker = self.client("stop", name)?;
        let node = self.node_containers("stop", pool, name).await?;
        let id = node
            .into_iter()
            .find_map(|c| c.id)
            .ok_or_else(|| ProviderError::Docker {
                op: "stop",
                name: name.to_string(),
                message: format!("no container of node {name} in pool {pool}"),
            })?;
        // The agent stops on SIGTERM; Docker kills it after STOP_GRACE.
        let options = StopContainerOptionsBuilder::default()
            .t(i32::try_from(STOP_GRACE.as_secs()).unwrap_or(10))
            .build();
        timed("stop", name, docker.stop_container(&id, Some(options))).await
    }

    async fn delete(&self, pool: &str, name: &str) -> Result<(), ProviderError> {
        let docker = self.client("delete", name)?;
        let node = self.node_containers("delete", pool, name).await?;
        // The agent first, so that nothing restarts its workloads; then what it ran.
        let workloads = self
            .containers(
                "delete",
                name,
                vec![LABEL_ALLOC.to_string(), format!("{LABEL_NODE}={name}")],
            )
            .await?;
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        for c in node.into_iter().chain(workloads) {
            let Some(id) = c.id else { continue };
            match timed(
                "remove",
                name,
                docker.remove_container(&id, Some(options.clone())),
            )
            .await
            {
                Ok(()) => {}
                Err(ProviderError::Docker { message, .. }) if message.contains("No such") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn list(&self, pool: &str) -> Result<Vec<ProviderNode>, ProviderError> {
        let list = self
            .containers("list", pool, vec![format!("{LABEL_POOL}={pool}")])
            .await?;
        let mut nodes: Vec<ProviderNode> = list
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.as_ref()?;
                let name = labels.get(LABEL_NODE)?.clone();
                let warm = labels.contains_key(LABEL_WARM);
                Some(ProviderNode {
                    warm,
                    name,
                    created_unix_ms: c
                        .created
                        .and_then(|s| u64::try_from(s).ok())
                        .map(|s| s.saturating_mul(1000)),
                    state: c.state.map(|s| s.to_string()).unwrap_or_default(),
                })
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(nodes)
    }
}

async fn timed<T>(
    op: &'static str,
    name: &str,
    call: impl Future<Output = Result<T, bollard::errors::Error>>,
) -> Result<T, ProviderError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(r) => r.map_err(|e| ProviderError::Docker {
            op,
            name: name.to_string(),
            message: e.to_string(),
        }),
        Err(_) => Err(ProviderError::Docker {
            op,
            name: name.to_string(),
            message: format!("no answer within {}s", CALL_TIMEOUT.as_secs()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn settings_come_from_the_pool_labels_with_defaults() {
        let s = DockerSettings::from_labels("p", &labels(&[(KEY_IMAGE, "novacron-fleet:1")]))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.network, DEFAULT_NETWORK);
        assert_eq!(s.socket, DEFAULT_SOCKET);
        assert_eq!(s.controller, None);
    }

    #[test]
    fn bad_settings_name_the_label_the_value_and_what_is_accepted() {
        let e = DockerSettings::from_labels("p", &labels(&[])).expect_err("refused");
        assert!(e.to_string().contains("has no docker.image"), "{e}");
        let e = DockerSettings::from_labels(
            "p",
            &labels(&[(KEY_IMAGE, "x:1"), (KEY_CONTROLLER, "http://h:1")]),
        )
        .expect_err("refused");
        assert!(
            e.to_string()
                .contains("docker.controller \"http://h:1\" is not an https URL"),
            "{e}"
        );
    }
}

//! What a container of an allocation looks like: its name, its labels, the hash that
//! says whether a running container still matches its spec, and its
//! [`ContainerConfig`]. Pure.

use std::collections::{BTreeMap, HashMap};

use novacron_common::wire::{AllocationSpec, PortMapping, TaskSpec, VolumeMount};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{ContainerConfig, MountConfig};

/// Label: the allocation id. Its presence marks a container as NovaCron's.
pub const LABEL_ALLOC: &str = "novacron.alloc";
/// Label: the job name.
pub const LABEL_JOB: &str = "novacron.job";
/// Label: the job version.
pub const LABEL_VERSION: &str = "novacron.version";
/// Label: [`spec_hash`] of the task the container was made from.
pub const LABEL_SPEC: &str = "novacron.spec";
/// Label: the node (agent) that owns the container.
pub const LABEL_NODE: &str = "novacron.node";
/// Label on the named volumes the runtime creates (`true`).
pub const LABEL_MANAGED: &str = "novacron.managed";

/// The hash of the parts of `task` that define the container (image, command,
/// arguments, environment, ports, volumes, working directory, CPU, memory, GPUs):
/// 16 hex digits of a SHA-256. A running container whose [`LABEL_SPEC`] differs is
/// replaced.
///
/// The restart policy, the health check and `batch` are left out on purpose: the
/// agent applies them, so changing them never restarts a container. The hash is stable across agent
/// builds (JSON of a fixed struct, maps in key order), so an upgraded agent adopts
/// the containers of the previous one.
pub fn spec_hash(task: &TaskSpec) -> String {
    #[derive(Serialize)]
    struct Defining<'a> {
        image: &'a str,
        command: &'a [String],
        args: &'a [String],
        env: &'a BTreeMap<String, String>,
        ports: Vec<(&'a str, u16, Option<u16>, bool)>,
        volumes: Vec<(&'a str, &'a str, bool)>,
        working_dir: Option<&'a str>,
        cpu_millis: u64,
        memory_bytes: u64,
        gpu_uuids: &'a [String],
        // Left out when empty, so that tasks without secrets keep their hash.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        secrets: Vec<(
            &'a str,
            u64,
            &'a str,
            &'a novacron_common::wire::SecretTarget,
        )>,
        // Left out when absent, so that containers keep their hash.
        #[serde(skip_serializing_if = "Option::is_none")]
        vm: Option<&'a novacron_common::wire::VmSpec>,
    }
    let defining = Defining {
        image: &task.image,
        command: &task.command,
        args: &task.args,
        env: &task.env,
        ports: task
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.container_port, p.host_port, p.udp))
            .collect(),
        volumes: task
            .volumes
            .iter()
            .map(|v| (v.source.as_str(), v.target.as_str(), v.read_only))
            .collect(),
        working_dir: task.working_dir.as_deref(),
        cpu_millis: task.cpu_millis,
        memory_bytes: task.memory_bytes,
        gpu_uuids: &task.gpu_uuids,
        secrets: task
            .secrets
            .iter()
            .map(|s| (s.secret.as_str(), s.version, s.key.as_str(), &s.target))
            .collect(),
        vm: task.vm.as_ref(),
    };
    // Serializing plain strings, numbers and sequences to a Vec cannot fail.
    let json = serde_json::to_vec(&defining).unwrap_or_default();
    let digest = Sha256::digest(&json);
    hex::encode(&digest[..8])
}

/// `novacron-<job>-<allocation id>-<node>`, unique per allocation and node (two
/// agents sharing one Docker daemon can both run the same allocation, as in a
/// migration between them), with characters Docker does not accept in names
/// replaced by `_`. The job is left out when the allocation id already begins with
/// it (the controller's ids do: `web-0123456789ab`). Containers are found by their
/// labels, never by name, so containers named otherwise are adopted all the same.
pub fn container_name(node: &str, job: &str, alloc_id: &str) -> String {
    let alloc = if alloc_id
        .strip_prefix(job)
        .is_some_and(|rest| rest.starts_with('-'))
    {
        sanitize(alloc_id)
    } else {
        format!("{}-{}", sanitize(job), sanitize(alloc_id))
    };
    format!("novacron-{alloc}-{}", sanitize(node))
}

/// The name used when [`container_name`] is taken (a container of the same
/// allocation on the same node that is still being removed): with the spec hash
/// appended.
pub fn fallback_container_name(node: &str, job: &str, alloc_id: &str, spec_hash: &str) -> String {
    format!(
        "{}-{}",
        container_name(node, job, alloc_id),
        sanitize(spec_hash)
    )
}

/// The labels of the container of `alloc` on `node`.
pub fn labels(node: &str, alloc: &AllocationSpec, hash: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_ALLOC.to_owned(), alloc.id.clone()),
        (LABEL_JOB.to_owned(), alloc.job.clone()),
        (LABEL_VERSION.to_owned(), alloc.job_version.to_string()),
        (LABEL_SPEC.to_owned(), hash.to_owned()),
        (LABEL_NODE.to_owned(), node.to_owned()),
    ])
}

/// Reads the allocation id and spec hash back from a container's labels.
pub fn alloc_labels(labels: &HashMap<String, String>) -> Option<(&str, &str)> {
    let alloc = labels.get(LABEL_ALLOC)?;
    let hash = labels.get(LABEL_SPEC).map(String::as_str).unwrap_or("");
    Some((alloc.as_str(), hash))
}

/// The container that runs `alloc` on `node`; `hash` is [`spec_hash`] of its task.
///
/// - `cpu_millis` becomes a CPU limit of `millis × 10⁶` nano-CPUs; 0 is unlimited.
/// - `memory_bytes` becomes the memory limit, swap included (no swap); 0 is
///   unlimited.
/// - `command` overrides the entrypoint and `args` the command; empty ones keep the
///   image's.
/// - A volume whose source is an absolute path is a bind mount, any other source a
///   named volume.
pub fn container_config(node: &str, alloc: &AllocationSpec, hash: &str) -> ContainerConfig {
    let task = &alloc.task;
    ContainerConfig {
        image: task.image.clone(),
        entrypoint: task.command.clone(),
        cmd: task.args.clone(),
        env: task.env.clone(),
        working_dir: task.working_dir.clone(),
        labels: labels(node, alloc, hash),
        nano_cpus: (task.cpu_millis > 0)
            .then(|| i64::try_from(task.cpu_millis.saturating_mul(1_000_000)).unwrap_or(i64::MAX)),
        memory_bytes: (task.memory_bytes > 0)
            .then(|| i64::try_from(task.memory_bytes).unwrap_or(i64::MAX)),
        gpu_uuids: task.gpu_uuids.clone(),
        ports: task.ports.clone(),
        mounts: task.volumes.iter().map(mount).collect(),
        secret_env: super::secrets::env(alloc),
        vm: task.vm.clone(),
    }
}

/// The Docker port key of a mapping: `8080/tcp`.
pub fn port_key(port: &PortMapping) -> String {
    let proto = if port.udp { "udp" } else { "tcp" };
    format!("{}/{proto}", port.container_port)
}

fn mount(volume: &VolumeMount) -> MountConfig {
    if volume.source.starts_with('/') {
        MountConfig::Bind {
            source: volume.source.clone(),
            target: volume.target.clone(),
            read_only: volume.read_only,
        }
    } else {
        MountConfig::Volume {
            name: volume.source.clone(),
            target: volume.target.clone(),
            read_only: volume.read_only,
        }
    }
}

/// Docker names: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`. Our names start with `novacron-`, so
/// only the allowed characters matter here.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use novacron_common::wire::{HealthCheckKind, HealthSpec, ProbeSpec, RestartSpec};

    use super::*;

    fn alloc() -> AllocationSpec {
        AllocationSpec {
            restore: None,
            suspended: false,
            id: "0123456789abcdef".into(),
            job: "web".into(),
            job_version: 3,
            task: TaskSpec {
                image: "novacron-test/busybox:1".into(),
                command: vec!["sh".into(), "-c".into()],
                args: vec!["sleep 100".into()],
                env: BTreeMap::from([("A".into(), "1".into())]),
                ports: vec![PortMapping {
                    name: "http".into(),
                    container_port: 8080,
                    host_port: None,
                    udp: false,
                }],
                volumes: vec![
                    VolumeMount {
                        source: "data".into(),
                        target: "/data".into(),
                        read_only: false,
                    },
                    VolumeMount {
                        source: "/etc/hosts".into(),
                        target: "/h".into(),
                        read_only: true,
                    },
                ],
                working_dir: Some("/tmp".into()),
                cpu_millis: 250,
                memory_bytes: 64 << 20,
                ..TaskSpec::default()
            },
        }
    }

    #[test]
    fn hash_is_stable_and_ignores_agent_side_policies() {
        let a = alloc();
        let h = spec_hash(&a.task);
        assert_eq!(h.len(), 16);
        // Pinned: a change here replaces every container on every upgraded node.
        assert_eq!(h, "17c113d6a69b9e03");
        let mut policies = a.task.clone();
        policies.restart = RestartSpec {
            attempts: 9,
            interval_ms: 1,
            delay_ms: 2,
            delay_mode: true,
        };
        policies.health = Some(HealthSpec {
            liveness: Some(ProbeSpec {
                check: HealthCheckKind::Tcp { port: 1 },
                period_ms: 1,
                timeout_ms: 1,
                failure_threshold: 1,
                initial_delay_ms: 1,
            }),
            readiness: None,
            startup: None,
            max_restarts: 1,
            backoff_initial_ms: 1,
            backoff_max_ms: 1,
        });
        policies.batch = !policies.batch;
        assert_eq!(spec_hash(&policies), h);
        let mut image = a.task.clone();
        image.image = "other:1".into();
        assert_ne!(spec_hash(&image), h);
        let mut env = a.task.clone();
        env.env.insert("B".into(), "2".into());
        assert_ne!(spec_hash(&env), h);
        let mut cpu = a.task;
        cpu.cpu_millis = 251;
        assert_ne!(spec_hash(&cpu), h);
    }

    #[test]
    fn names_are_prefixed_and_sanitized() {
        assert_eq!(
            container_name("node-1", "web", "web-0123456789ab"),
            "novacron-web-0123456789ab-node-1"
        );
        assert_eq!(
            container_name("n", "web", "0123456789abcdef"),
            "novacron-web-0123456789abcdef-n"
        );
        assert_eq!(
            container_name("n/1", "a b/c", "x:y"),
            "novacron-a_b_c-x_y-n_1"
        );
        assert_eq!(
            fallback_container_name("n", "web", "web-1", "17c113d6a69b9e03"),
            "novacron-web-1-n-17c113d6a69b9e03"
        );
    }

    #[test]
    fn names_are_unique_per_allocation_and_node() {
        // Two allocation ids alike in their first 8 characters, and one allocation
        // on two nodes that share a daemon (a migration between them).
        let a = container_name("node-a", "web", "web-00000000aaaa");
        let b = container_name("node-a", "web", "web-00000000bbbb");
        let moved = container_name("node-b", "web", "web-00000000aaaa");
        assert_ne!(a, b);
        assert_ne!(a, moved);
        assert_ne!(b, moved);
    }

    #[test]
    fn config_carries_limits_labels_and_mounts() {
        let a = alloc();
        let cfg = container_config("node-1", &a, "h");
        assert_eq!(cfg.nano_cpus, Some(250_000_000));
        assert_eq!(cfg.memory_bytes, Some(64 << 20));
        assert_eq!(cfg.entrypoint, vec!["sh", "-c"]);
        assert_eq!(cfg.cmd, vec!["sleep 100"]);
        assert_eq!(cfg.labels[LABEL_ALLOC], "0123456789abcdef");
        assert_eq!(cfg.labels[LABEL_JOB], "web");
        assert_eq!(cfg.labels[LABEL_VERSION], "3");
        assert_eq!(cfg.labels[LABEL_SPEC], "h");
        assert_eq!(cfg.labels[LABEL_NODE], "node-1");
        assert!(matches!(&cfg.mounts[0], MountConfig::Volume { name, .. } if name == "data"));
        assert!(
            matches!(&cfg.mounts[1], MountConfig::Bind { source, read_only: true, .. } if source == "/etc/hosts")
        );
        assert_eq!(port_key(&cfg.ports[0]), "8080/tcp");

        let mut unlimited = a;
        unlimited.task.cpu_millis = 0;
        unlimited.task.memory_bytes = 0;
        let cfg = container_config("n", &unlimited, "h");
        assert_eq!((cfg.nano_cpus, cfg.memory_bytes), (None, None));
    }

    #[test]
    fn labels_read_back() {
        let a = alloc();
        let labels: HashMap<String, String> = labels("n", &a, "h").into_iter().collect();
        assert_eq!(alloc_labels(&labels), Some(("0123456789abcdef", "h")));
        assert_eq!(alloc_labels(&HashMap::new()), None);
    }
}

//! A validated job, what it becomes on the wire, and its version hash.

use std::collections::BTreeMap;
use std::time::Duration;

use sha2::{Digest, Sha256};
use yaml_serde::Value;

use super::validate::{self, Issue};
use super::{
    API_VERSION, JobManifest, JobSpec, JobType, KIND, ManifestError, ManifestErrors, Metadata,
    Protocol, RestartMode,
};
use novacron_wire::{PortMapping, RestartSpec, TaskSpec, VolumeMount};

/// A manifest that passed every check.
///
/// The only ways to get one are [`parse_job`](super::parse_job),
/// [`parse_jobs`](super::parse_jobs) and [`Job::from_manifest`]; the fields are
/// public to read (the struct is `non_exhaustive`, so no other crate can build one).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Job {
    /// `metadata.name`: a valid node-style name.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// The desired work.
    pub spec: JobSpec,
}

impl Job {
    /// Validates a manifest that did not come from text (an API body, say).
    ///
    /// The errors name `source` and the field path, but no line.
    pub fn from_manifest(source: &str, manifest: JobManifest) -> Result<Job, ManifestErrors> {
        checked(manifest, None).map_err(|issues| {
            ManifestErrors(
                issues
                    .into_iter()
                    .map(|i| ManifestError {
                        file: source.to_string(),
                        line: None,
                        column: None,
                        path: i.path.to_string(),
                        message: i.message,
                    })
                    .collect(),
            )
        })
    }

    /// The manifest again, for printing (`yaml_serde::to_string`) or storing.
    pub fn to_manifest(&self) -> JobManifest {
        JobManifest {
            api_version: API_VERSION.to_string(),
            kind: KIND.to_string(),
            metadata: Metadata {
                name: self.name.clone(),
                labels: self.labels.clone(),
            },
            spec: self.spec.clone(),
        }
    }

    /// The container each replica runs, as the agent receives it. `gpu_uuids` is
    /// empty: the scheduler fills it in when it picks the GPUs.
    pub fn task_spec(&self) -> TaskSpec {
        let s = &self.spec;
        let t = &s.task;
        TaskSpec {
            batch: s.job_type == JobType::Batch,
            image: t.image.clone(),
            command: t.command.clone(),
            args: t.args.clone(),
            env: t.env.clone(),
            ports: t
                .ports
                .iter()
                .map(|p| PortMapping {
                    name: p.name.clone(),
                    container_port: p.container_port,
                    host_port: p.host_port,
                    udp: p.protocol == Protocol::Udp,
                })
                .collect(),
            volumes: t
                .volumes
                .iter()
                .map(|v| VolumeMount {
                    source: v.source.clone(),
                    target: v.target.clone(),
                    read_only: v.read_only,
                })
                .collect(),
            working_dir: t.working_dir.clone(),
            cpu_millis: s.resources.cpu.0,
            memory_bytes: s.resources.memory.0,
            gpu_uuids: Vec::new(),
            restart: RestartSpec {
                attempts: s.restart.attempts,
                interval_ms: millis(s.restart.interval),
                delay_ms: millis(s.restart.delay),
                delay_mode: s.restart.mode == RestartMode::Delay,
            },
            health: s.health.as_ref().and_then(super::health::health_spec),
            shutdown_delay_ms: t.shutdown_delay.map_or(0, millis),
            pull_policy: t.pull_policy.unwrap_or_default(),
            secrets: Vec::new(),
            registry_auth: None,
            image_digest: None,
            // A template is resolved by the controller, which pins the result
            // in the job version; this is the VM without it.
            vm: t.vm.as_ref().map(|v| super::vm::resolve(v, None)),
        }
    }

    /// The secrets the job references (its `imagePullSecret` and
    /// `spec.task.secrets`), each once, sorted.
    pub fn secret_names(&self) -> std::collections::BTreeSet<&str> {
        let t = &self.spec.task;
        t.secrets
            .iter()
            .map(|r| r.secret.as_str())
            .chain(t.image_pull_secret.as_deref())
            .collect()
    }

    /// A stable hash of the name and the whole spec (labels are left out): SHA-256,
    /// in lowercase hex, of a canonical encoding of the normalised spec. Two
    /// manifests that differ only in formatting, key order, comments or spelling of
    /// equal quantities (`1024Mi` and `1Gi`) hash the same; any change to the spec,
    /// replicas included, changes it.
    ///
    /// Defaults are filled in before hashing, so a new spec field changes every
    /// hash once; the prefix names the schema version for that reason.
    pub fn version_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"novacron job spec v1\0");
        canonical(&Value::String(self.name.clone()), &mut h);
        match yaml_serde::to_value(&self.spec) {
            Ok(spec) => canonical(&spec, &mut h),
            // Unreachable: every spec type serializes to YAML (string keys, no
            // bytes). Hash the debug form rather than panic.
            Err(_) => h.update(format!("{:?}", self.spec).as_bytes()),
        }
        hex::encode(h.finalize())
    }
}

/// Validates `manifest`; `source` is the document as written, when there is one.
pub(super) fn checked(manifest: JobManifest, source: Option<&Value>) -> Result<Job, Vec<Issue>> {
    let issues = validate::check(&manifest, source);
    if !issues.is_empty() {
        return Err(issues);
    }
    Ok(Job {
        name: manifest.metadata.name,
        labels: manifest.metadata.labels,
        spec: manifest.spec,
    })
}

/// A node's type tag and its length or count.
fn head(h: &mut Sha256, tag: u8, n: usize) {
    h.update([tag]);
    h.update((n as u64).to_be_bytes());
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Feeds an unambiguous encoding of `v` to `h`: a type tag per node, lengths before
/// strings and counts before collections, mapping entries in document order (which
/// for a serialized spec is field order, and sorted order for maps).
fn canonical(v: &Value, h: &mut Sha256) {
    match v {
        Value::Null => head(h, b'~', 0),
        Value::Bool(b) => head(h, b'b', usize::from(*b)),
        Value::Number(n) => {
            let s = n.to_string();
            head(h, b'#', s.len());
            h.update(s.as_bytes());
        }
        Value::String(s) => {
            head(h, b's', s.len());
            h.update(s.as_bytes());
        }
        Value::Sequence(items) => {
            head(h, b'[', items.len());
            for item in items {
                canonical(item, h);
            }
        }
        Value::Mapping(map) => {
            head(h, b'{', map.len());
            for (k, v) in map {
                canonical(k, h);
                canonical(v, h);
            }
        }
        Value::Tagged(t) => {
            let tag = t.tag.to_string();
            head(h, b'!', tag.len());
            h.update(tag.as_bytes());
            canonical(&t.value, h);
        }
    }
}

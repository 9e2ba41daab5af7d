//! The `qemu` node provider: each node of a pool is a virtual machine that the
//! fleet itself runs. Creating a node applies a VM job (`spec.task.vm`, named
//! after the node) whose guest image runs Docker and `novacron-agent`; its NoCloud
//! user data writes the agent's settings and joins the fleet with the node's
//! single-use token, so the guest becomes a schedulable node like any host.
//! Deleting a node stops its job, which powers the guest off and removes it;
//! the next [`NodeProvider::list`] purges the job once the guest is gone.
//!
//! The scheduler places the VM jobs on nodes that can run VMs (`novacron.io/vm`),
//! reserving the VM's CPUs and memory there, so a pool's cost and the VM hosts'
//! capacity are both real. The guest image is described in `docs/vm-images.md`
//! ("The node guest") and built by `packaging/vm/build-node-image.sh`.
//!
//! Settings are the pool's `metadata.labels`:
//! - `qemu.image` (required): the containerDisk image of the node guest;
//! - `qemu.template` (required): the `VMTemplate` that says where its kernel,
//!   initrd and disk are and how to boot it (vCPUs and memory come from the
//!   node template's `resources`, not from it);
//! - `qemu.controller`: the controller's API URL as the guests reach it (default:
//!   the controller's own; on QEMU's user network the VM host's loopback is
//!   `10.0.2.2`);
//! - `qemu.quic`: the controller's QUIC address (`host:port`) as the guests reach
//!   it, when it differs from the one the controller advertises.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use novacron_common::pools::capacity_label;

use super::{CreateNode, LABEL_NODE, LABEL_POOL, NodeProvider, ProviderError, ProviderNode};
use crate::services::heavy::HeavyWork;
use crate::services::workloads::{WorkloadError, Workloads};

/// Pool label: the node guest's image.
pub const KEY_IMAGE: &str = "qemu.image";
/// Pool label: the `VMTemplate` with the guest's boot files.
pub const KEY_TEMPLATE: &str = "qemu.template";
/// Pool label: the controller's API URL as the guests reach it.
pub const KEY_CONTROLLER: &str = "qemu.controller";
/// Pool label: the controller's QUIC address as the guests reach it.
pub const KEY_QUIC: &str = "qemu.quic";
/// Memory a guest gets beyond the node template's, for its kernel, Docker and the
/// agent (what the node offers to jobs is then about the template's figure).
pub const GUEST_OVERHEAD_MIB: u64 = 256;
/// Memory reserved on the VM host beyond the guest's, for QEMU itself: the most
/// the agent adds under TCG (the translation cache and the rest of QEMU); under
/// KVM it needs less.
pub const QEMU_OVERHEAD_MIB: u64 = 256;
/// Who applies and stops the node jobs.
/// How long a new node may take to be ready before the pool replaces it,
/// unless the pool's `provisionTimeout` says otherwise: the VM boots a guest
/// that starts its own Docker and agent and joins (90–100 s under TCG on an
/// idle 2-core host, measured; minutes more on a busy one), where a
/// container node of the `docker` provider is ready in seconds and keeps
/// the pools' default of 3 minutes.
pub const PROVISION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10 * 60);

const ACTOR: &str = "novacron (pools, provider qemu)";

/// A `qemu` pool's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuSettings {
    /// The node guest's image.
    pub image: String,
    /// The `VMTemplate` name.
    pub template: String,
    /// The API URL the guests join through, when not the controller's own.
    pub controller: Option<String>,
    /// The QUIC address the guests connect to, when not the advertised one.
    pub quic: Option<String>,
}

impl QemuSettings {
    /// Reads a pool's labels; the error names the label and what is expected.
    pub fn from_labels(
        pool: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<QemuSettings, ProviderError> {
        let get = |k: &str| labels.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
        let image = get(KEY_IMAGE).ok_or_else(|| {
            ProviderError::Settings(format!(
                "node pool {pool} uses provider qemu but metadata.labels has no {KEY_IMAGE}; \
                 expected the node guest's image, like {KEY_IMAGE}: novacron/node-guest:1 \
                 (packaging/vm/build-node-image.sh builds one)"
            ))
        })?;
        if image.chars().any(char::is_whitespace) {
            return Err(ProviderError::Settings(format!(
                "node pool {pool}: {KEY_IMAGE} {image:?} is not an image reference; expected a \
                 name like novacron/node-guest:1"
            )));
        }
        let template = get(KEY_TEMPLATE).ok_or_else(|| {
            ProviderError::Settings(format!(
                "node pool {pool} uses provider qemu but metadata.labels has no {KEY_TEMPLATE}; \
                 expected the VMTemplate that boots the node guest, like {KEY_TEMPLATE}: node-guest"
            ))
        })?;
        if let Some(why) = novacron_common::names::problem(template, "VM template") {
            return Err(ProviderError::Settings(format!(
                "node pool {pool}: {KEY_TEMPLATE}: {why}"
            )));
        }
        let controller = get(KEY_CONTROLLER).map(str::to_string);
        if let Some(c) = &controller
            && (!c.starts_with("https://") || c.chars().any(char::is_whitespace))
        {
            return Err(ProviderError::Settings(format!(
                "node pool {pool}: {KEY_CONTROLLER} {c:?} is not an https URL; expected the \
                 controller's API as the guests reach it, like https://10.0.2.2:7443"
            )));
        }
        let quic = get(KEY_QUIC).map(str::to_string);
        if let Some(q) = &quic
            && !is_host_port(q)
        {
            return Err(ProviderError::Settings(format!(
                "node pool {pool}: {KEY_QUIC} {q:?} is not host:port; expected the controller's \
                 QUIC address as the guests reach it, like 10.0.2.2:7444"
            )));
        }
        Ok(QemuSettings {
            image: image.to_string(),
            template: template.to_string(),
            controller,
            quic,
        })
    }
}

fn is_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.[]:".contains(c))
        && port.parse::<u16>().is_ok_and(|p| p > 0)
}

/// Quotes `s` for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A TOML (and JSON) basic string.
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The guest's user data: a script that writes the agent's settings (its labels,
/// the QUIC address) and joins the fleet once; the guest's
/// `novacron-node-seed.service` runs it before the agent starts.
pub fn user_data(req: &CreateNode<'_>, settings: &QemuSettings) -> String {
    let mut toml = format!(
        "# Written by the seed of node {} (node pool {}).\nstate_dir = \"/var/lib/novacron/agent\"\n",
        req.name, req.pool
    );
    if let Some(q) = &settings.quic {
        toml.push_str(&format!("controller_quic = {}\n", toml_string(q)));
    }
    toml.push_str("\n[labels]\n");
    for (k, v) in req.labels {
        toml.push_str(&format!("{} = {}\n", toml_string(k), toml_string(v)));
    }
    format!(
        "#!/bin/sh\n\
         # NovaCron node pool {pool}: node {name}. Writes the agent's settings and joins\n\
         # the fleet once (the token is single-use and expires).\n\
         set -e\n\
         mkdir -p /etc/novacron\n\
         cat >/etc/novacron/agent.toml <<'NOVACRON_EOF'\n\
         {toml}NOVACRON_EOF\n\
         if [ ! -f /var/lib/novacron/agent/node.pem ]; then\n\
         \x20 NOVACRON_JOIN_TOKEN={token} novacron-agent --config /etc/novacron/agent.toml join \
         --controller {controller} --server-name {server_name} --ca-fingerprint {fp} \
         --name {name_q}\n\
         fi\n",
        pool = req.pool,
        name = req.name,
        token = sh_quote(&req.join.token),
        controller = sh_quote(&req.join.controller),
        fp = sh_quote(&req.join.ca_fingerprint),
        server_name = sh_quote(&req.join.server_name),
        name_q = sh_quote(req.name),
    )
}

/// The guest's vCPUs and memory (MiB): the node template's resources, CPUs
/// rounded up, plus [`GUEST_OVERHEAD_MIB`].
pub fn shape(req: &CreateNode<'_>) -> (u32, u64) {
    let r = &req.template.resources;
    let vcpus = u32::try_from(r.cpu.0.div_ceil(1000))
        .unwrap_or(64)
        .clamp(1, 64);
    let mib = (r.memory.0 >> 20) + GUEST_OVERHEAD_MIB;
    (vcpus, mib)
}

/// The job that runs node `req.name` as a VM: named after the node, labelled with
/// the pool and node, reserving the template's CPU and the guest's memory plus
/// QEMU's on its host.
pub fn node_job(req: &CreateNode<'_>, settings: &QemuSettings) -> String {
    let q = toml_string;
    let (vcpus, mib) = shape(req);
    format!(
        "apiVersion: novacron.io/v1\n\
         kind: Job\n\
         metadata:\n\
         \x20 name: {name}\n\
         \x20 labels:\n\
         \x20   {LABEL_POOL}: {pool}\n\
         \x20   {LABEL_NODE}: {name}\n\
         \x20   instance_type: {itype}\n\
         \x20   capacity: {capacity}\n\
         spec:\n\
         \x20 type: service\n\
         \x20 replicas: 1\n\
         \x20 task:\n\
         \x20   image: {image}\n\
         \x20   vm:\n\
         \x20     template: {template}\n\
         \x20     vcpus: {vcpus}\n\
         \x20     memory: {mib}Mi\n\
         \x20     userData: {user_data}\n\
         \x20 resources:\n\
         \x20   cpu: {cpu}\n\
         \x20   memory: {reserve}Mi\n",
        name = q(req.name),
        pool = q(req.pool),
        itype = q(&req.template.instance_type),
        capacity = q(&capacity_label(req.template.capacity_type)),
        image = q(&settings.image),
        template = q(&settings.template),
        user_data = q(&user_data(req, settings)),
        cpu = q(&format!("{}m", req.template.resources.cpu.0.max(1))),
        reserve = mib + QEMU_OVERHEAD_MIB,
    )
}

/// Runs each node of its pools as a VM job of the fleet.
#[derive(Clone)]
pub struct QemuProvider {
    workloads: Arc<Workloads>,
    heavy: HeavyWork,
    settings: BTreeMap<String, QemuSettings>,
}

impl std::fmt::Debug for QemuProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuProvider")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl QemuProvider {
    /// A provider for the pools in `settings`.
    pub fn new(
        workloads: Arc<Workloads>,
        heavy: HeavyWork,
        settings: BTreeMap<String, QemuSettings>,
    ) -> QemuProvider {
        QemuProvider {
            workloads,
            heavy,
            settings,
        }
    }

    /// Whether job `name` is node `name` of `pool`.
    fn is_node_job(&self, pool: &str, name: &str) -> bool {
        self.workloads.labels(name).is_some_and(|l| {
            l.get(LABEL_POOL).is_some_and(|p| p == pool)
                && l.get(LABEL_NODE).is_some_and(|n| n == name)
        })
    }
}

fn failed(op: &'static str, name: &str, e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Vm {
        op,
        name: name.to_string(),
        message: e.to_string(),
    }
}

fn no_warm(op: &'static str) -> ProviderError {
    ProviderError::Settings(format!(
        "provider qemu cannot {op} nodes: it keeps no warm nodes (a node's VM is removed with it); \
         expected a pool without warm"
    ))
}

impl NodeProvider for QemuProvider {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn elastic(&self) -> bool {
        true
    }

    async fn create(&self, req: &CreateNode<'_>) -> Result<(), ProviderError> {
        if req.warm {
            return Err(no_warm("create warm"));
        }
        let settings = self.settings.get(req.pool).ok_or_else(|| {
            ProviderError::Settings(format!(
                "node pool {} has no qemu settings; expected metadata.labels with {KEY_IMAGE} \
                 and {KEY_TEMPLATE}",
                req.pool
            ))
        })?;
        let manifest = node_job(req, settings);
        let file = format!("node-pool/{}/{}.yaml", req.pool, req.name);
        let workloads = self.workloads.clone();
        self.heavy
            .run(move || workloads.apply(&file, &manifest, ACTOR, SystemTime::now()))
            .await
            .map_err(|e| failed("create", req.name, e))?
            .map_err(|e| failed("create", req.name, e))?;
        Ok(())
    }

    async fn start(&self, _pool: &str, _name: &str) -> Result<(), ProviderError> {
        Err(no_warm("start"))
    }

    async fn stop(&self, _pool: &str, _name: &str) -> Result<(), ProviderError> {
        Err(no_warm("stop"))
    }

    async fn delete(&self, pool: &str, name: &str) -> Result<(), ProviderError> {
        if !self.is_node_job(pool, name) || self.workloads.is_stopped(name) {
            return Ok(());
        }
        match self.workloads.stop(name, ACTOR) {
            Ok(()) | Err(WorkloadError::UnknownJob(_)) => Ok(()),
            Err(e) => Err(failed("delete", name, e)),
        }
    }

    async fn list(&self, pool: &str) -> Result<Vec<ProviderNode>, ProviderError> {
        let jobs = self.workloads.jobs();
        // A deleted node's job, once its guest has powered off, goes with it
        // (until then the purge is refused and tried again at the next list).
        for j in jobs
            .iter()
            .filter(|j| j.status == "stopped" && self.is_node_job(pool, &j.name))
        {
            match self.workloads.purge(&j.name, ACTOR) {
                Ok(()) | Err(WorkloadError::Conflict(_) | WorkloadError::UnknownJob(_)) => {}
                Err(e) => {
                    tracing::warn!(node = %j.name, error = %e, "cannot purge a deleted node's job")
                }
            }
        }
        let mut nodes: Vec<ProviderNode> = jobs
            .into_iter()
            .filter(|j| j.status != "stopped" && self.is_node_job(pool, &j.name))
            .map(|j| ProviderNode {
                state: if j.running > 0 {
                    "running".into()
                } else {
                    j.status.clone()
                },
                created_unix_ms: Some(j.submitted_at_unix_ms),
                warm: false,
                name: j.name,
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(nodes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::providers::Join;
    use novacron_common::autoscale::pool::{CapacityType, NodeResources, NodeTemplateSpec};
    use novacron_common::manifest::{ByteSize, Millicores};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn template() -> NodeTemplateSpec {
        NodeTemplateSpec {
            instance_type: "vm-small".into(),
            provider: "qemu".into(),
            capacity_type: CapacityType::OnDemand,
            price_per_hour: 0.05,
            labels: BTreeMap::new(),
            resources: NodeResources {
                cpu: Millicores(1500),
                memory: ByteSize(768 << 20),
                gpus: None,
            },
        }
    }

    fn settings() -> QemuSettings {
        QemuSettings::from_labels(
            "vms",
            &labels(&[
                (KEY_IMAGE, "novacron/node-guest:1"),
                (KEY_TEMPLATE, "node-guest"),
                (KEY_QUIC, "10.0.2.2:7444"),
            ]),
        )
        .expect("settings")
    }

    #[test]
    fn settings_name_what_is_missing_or_malformed() {
        let err = |l: &[(&str, &str)]| {
            QemuSettings::from_labels("vms", &labels(l))
                .expect_err("invalid")
                .to_string()
        };
        assert!(err(&[]).contains("no qemu.image"), "{}", err(&[]));
        let e = err(&[(KEY_IMAGE, "a b")]);
        assert!(e.contains("is not an image reference"), "{e}");
        let e = err(&[(KEY_IMAGE, "img:1")]);
        assert!(e.contains("no qemu.template"), "{e}");
        let e = err(&[(KEY_IMAGE, "img:1"), (KEY_TEMPLATE, "Bad_Name")]);
        assert!(e.contains("not a valid VM template name"), "{e}");
        let e = err(&[
            (KEY_IMAGE, "img:1"),
            (KEY_TEMPLATE, "t"),
            (KEY_CONTROLLER, "http://10.0.2.2:7443"),
        ]);
        assert!(e.contains("is not an https URL"), "{e}");
        for bad in ["10.0.2.2", "10.0.2.2:0", "h:port", ":7444", "a b:1"] {
            let e = err(&[(KEY_IMAGE, "img:1"), (KEY_TEMPLATE, "t"), (KEY_QUIC, bad)]);
            assert!(e.contains("is not host:port"), "{bad}: {e}");
        }
        let s = settings();
        assert_eq!(s.quic.as_deref(), Some("10.0.2.2:7444"));
        assert_eq!(s.controller, None);
    }

    #[test]
    fn a_node_job_boots_the_template_with_the_node_s_shape_and_joins_with_its_token() {
        let t = template();
        let mut node_labels = novacron_common::pools::node_labels("vms", &t);
        node_labels.insert("zone".into(), "z-1".into());
        let join = Join {
            controller: "https://10.0.2.2:7443".into(),
            token: "abc.it's-secret".into(),
            ca_fingerprint: "sha256:00ff".into(),
            server_name: "ctl.example.com".into(),
        };
        let req = CreateNode {
            pool: "vms",
            template: &t,
            name: "vms-0a1b2c",
            labels: &node_labels,
            join: &join,
            warm: false,
        };
        assert_eq!(shape(&req), (2, 768 + GUEST_OVERHEAD_MIB));
        let text = node_job(&req, &settings());
        let job = novacron_common::manifest::parse_job("node.yaml", &text).expect("valid job");
        assert_eq!(job.name, "vms-0a1b2c");
        assert_eq!(job.labels.get(LABEL_POOL).map(String::as_str), Some("vms"));
        assert_eq!(
            job.labels.get(LABEL_NODE).map(String::as_str),
            Some("vms-0a1b2c")
        );
        let vm = job.spec.task.vm.as_ref().expect("a VM task");
        assert_eq!(vm.template.as_deref(), Some("node-guest"));
        assert_eq!(vm.vcpus, Some(2));
        assert_eq!(vm.memory, Some(ByteSize((768 + GUEST_OVERHEAD_MIB) << 20)));
        assert_eq!(job.spec.task.image, "novacron/node-guest:1");
        assert_eq!(job.spec.resources.cpu, Millicores(1500));
        assert_eq!(
            job.spec.resources.memory,
            ByteSize((768 + GUEST_OVERHEAD_MIB + QEMU_OVERHEAD_MIB) << 20)
        );
        let ud = vm.user_data.as_deref().expect("user data");
        assert!(ud.starts_with("#!/bin/sh\n"), "{ud}");
        // The token's quote survives the shell; the settings are TOML.
        assert!(
            ud.contains(r"NOVACRON_JOIN_TOKEN='abc.it'\''s-secret' novacron-agent"),
            "{ud}"
        );
        assert!(ud.contains("--controller 'https://10.0.2.2:7443'"), "{ud}");
        assert!(ud.contains("--server-name 'ctl.example.com'"), "{ud}");
        assert!(ud.contains("--name 'vms-0a1b2c'"), "{ud}");
        let toml_text = ud
            .split("<<'NOVACRON_EOF'\n")
            .nth(1)
            .and_then(|s| s.split("NOVACRON_EOF\n").next())
            .expect("the settings heredoc");
        let parsed: toml::Table = toml_text.parse().expect("TOML");
        assert_eq!(parsed["controller_quic"].as_str(), Some("10.0.2.2:7444"));
        assert_eq!(parsed["labels"]["pool"].as_str(), Some("vms"));
        assert_eq!(parsed["labels"]["zone"].as_str(), Some("z-1"));
        assert_eq!(parsed["labels"]["instance_type"].as_str(), Some("vm-small"));
    }
}

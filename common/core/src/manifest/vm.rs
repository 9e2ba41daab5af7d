//! Virtual machines in manifests: `spec.task.vm` of a job and `kind: VMTemplate`,
//! the machine shapes (like OpenStack's flavors) that jobs name. The image stays
//! the job's (`spec.task.image`, a disk image packaged as a container image), so
//! one template serves many images.
//!
//! A job's VM is resolved when it is applied: each field the job sets wins, then
//! the template's, then the defaults ([`resolve`]). The controller pins the result
//! in the job version, so a later change of the template reaches a job only when
//! it is applied again (as a new version, rolled out like any change).

use super::{ByteSize, Metadata, Resources};
use serde::{Deserialize, Serialize};

/// The label the controller gives every node that can run virtual machines; its
/// value is the accelerator (`kvm` or `tcg`). A job with `spec.task.vm` is
/// placed only on nodes that have it.
pub const VM_NODE_LABEL: &str = "novacron.io/vm";

/// The label the controller gives every node with a VM bridge; its value the
/// bridge's range with `_` for `/` (`10.215.7.0_24`, a label value). A job
/// whose VM is on the `bridge` network is placed only on nodes that have it.
pub const VM_BRIDGE_LABEL: &str = "novacron.io/vm-bridge";

/// `kind:` of a VM template.
pub const TEMPLATE_KIND: &str = "VMTemplate";

/// Default guest memory.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// Default kernel path in the image.
pub const DEFAULT_KERNEL: &str = "/boot/vmlinuz";
/// Default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";
/// Default QEMU machine.
pub const DEFAULT_MACHINE: &str = "q35";
/// The QEMU machines NovaCron runs.
pub const MACHINES: [&str; 3] = ["q35", "pc", "microvm"];

/// `spec.task.vm`: the virtual machine a task runs. Every field is optional:
/// what the job leaves out comes from its `template`, then from the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VmTask {
    /// A `VMTemplate` to start from (resolved when the job is applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Virtual CPUs (1–64; default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Guest memory (16Mi–1Ti; default 256Mi). The job's `resources.memory`,
    /// when set, must cover it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// The kernel's path in the image (default `/boot/vmlinuz`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// The initrd's path in the image, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// The kernel command line (default `console=ttyS0`, so that the console
    /// reaches the VM's logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// The path of a base disk (qcow2, or raw) in the image: the VM boots a
    /// copy-on-write overlay of it, its own until the allocation is removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// The overlay disk's size (default: the base disk's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size: Option<ByteSize>,
    /// The most bytes per second the guest reads and writes on its disk
    /// together (QEMU's throttling; at least 64Ki; default: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bandwidth: Option<ByteSize>,
    /// The most reads and writes per second on its disk together (1 to
    /// 1000000; default: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_iops: Option<u64>,
    /// The most bytes per second on the guest's network, each way (at least
    /// 64Ki; default: unlimited). Only a guest on the bridge network has a
    /// tap device to limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_bandwidth: Option<ByteSize>,
    /// The QEMU machine: `q35` (default), `pc` or `microvm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// Cloud-init user data (at most 64 KiB), given to the guest as a NoCloud
    /// seed: a read-only disk labelled `cidata` holding `user-data` and
    /// `meta-data`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// How the guest is networked: `user` (default; QEMU's user-mode network,
    /// reached through its forwarded ports) or `bridge` (an address of its
    /// node's VM bridge, reached on every port). The instance's choice, not
    /// its template's, as a network is not a machine shape.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<novacron_wire::VmNetwork>,
}

/// A `VMTemplate` manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VmTemplateManifest {
    /// `novacron.io/v1`.
    pub api_version: String,
    /// `VMTemplate`.
    pub kind: String,
    /// Name and labels.
    pub metadata: Metadata,
    /// The machine.
    pub spec: VmTemplateSpec,
}

/// `VMTemplate` spec: a machine shape that jobs name in `spec.task.vm.template`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VmTemplateSpec {
    /// Virtual CPUs (1–64; default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u32>,
    /// Guest memory (16Mi–1Ti; default 256Mi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// The kernel's path in the image (default `/boot/vmlinuz`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// The initrd's path in the image, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// The kernel command line (default `console=ttyS0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// The path of a base disk (qcow2, or raw) in the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// The overlay disk's size (default: the base disk's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size: Option<ByteSize>,
    /// The most bytes per second the guest reads and writes on its disk
    /// together (at least 64Ki; default: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bandwidth: Option<ByteSize>,
    /// The most reads and writes per second on its disk together (1 to
    /// 1000000; default: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_iops: Option<u64>,
    /// The most bytes per second on the guest's network, each way (at least
    /// 64Ki; default: unlimited). Only a guest on the bridge network has a
    /// tap device to limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_bandwidth: Option<ByteSize>,
    /// The QEMU machine: `q35` (default), `pc` or `microvm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// Cloud-init user data (at most 64 KiB), as a NoCloud seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// GPUs the machine passes through (bound to vfio-pci on the host,
    /// chosen by `model`; `memory` is refused): a job from this template must
    /// reserve at least as many of the same model in `spec.resources.gpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<crate::manifest::GpuRequest>,
}

/// A validated VM template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmTemplate {
    /// Its name.
    pub name: String,
    /// Its machine.
    pub spec: VmTemplateSpec,
}

impl VmTask {
    /// The fields the job sets, as a shape (without the template's name).
    pub fn shape(&self) -> VmTemplateSpec {
        VmTemplateSpec {
            vcpus: self.vcpus,
            memory: self.memory,
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            cmdline: self.cmdline.clone(),
            disk: self.disk.clone(),
            disk_size: self.disk_size,
            disk_bandwidth: self.disk_bandwidth,
            disk_iops: self.disk_iops,
            network_bandwidth: self.network_bandwidth,
            machine: self.machine.clone(),
            user_data: self.user_data.clone(),
            // A job's GPUs are its resources' (`spec.resources.gpus`).
            gpus: None,
        }
    }
}

/// What is wrong with the fields of a shape, each as (field, message).
pub fn problems(s: &VmTemplateSpec) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(g) = &s.gpus {
        if !(1..=16).contains(&g.count) {
            out.push((
                "gpus",
                format!("count {} is out of range; expected 1 to 16", g.count),
            ));
        }
        if g.memory.is_some() {
            out.push((
                "gpus",
                "a passthrough GPU's memory is not known to its host (vfio-pci holds it); choose by model instead".to_owned(),
            ));
        }
    }
    if let Some(v) = s.vcpus
        && !(1..=64).contains(&v)
    {
        out.push(("vcpus", format!("{v} is out of range; expected 1 to 64")));
    }
    if let Some(m) = s.memory
        && !((16 << 20)..=(1 << 40)).contains(&m.0)
    {
        out.push((
            "memory",
            format!("{} bytes is out of range; expected 16Mi to 1Ti", m.0),
        ));
    }
    for (key, path) in [
        ("kernel", s.kernel.as_ref()),
        ("initrd", s.initrd.as_ref()),
        ("disk", s.disk.as_ref()),
    ] {
        if let Some(path) = path
            && (!path.starts_with('/')
                || path.split('/').any(|c| c == "..")
                || path.len() > 1024
                || path.contains('\0'))
        {
            out.push((
                key,
                format!(
                    "{path:?} is not an absolute path in the image; expected a path like /boot/vmlinuz"
                ),
            ));
        }
    }
    if let Some(c) = &s.cmdline
        && (c.len() > 4096 || c.contains(['\n', '\0']))
    {
        out.push((
            "cmdline",
            "expected one line of at most 4096 bytes".to_owned(),
        ));
    }
    if let Some(u) = &s.user_data
        && (u.len() > novacron_wire::MAX_VM_USER_DATA || u.contains('\0'))
    {
        out.push((
            "userData",
            format!(
                "{} bytes; expected text of at most {} bytes",
                u.len(),
                novacron_wire::MAX_VM_USER_DATA
            ),
        ));
    }
    for (key, bandwidth) in [
        ("diskBandwidth", s.disk_bandwidth),
        ("networkBandwidth", s.network_bandwidth),
    ] {
        if let Some(b) = bandwidth
            && b.0 < 64 << 10
        {
            out.push((
                key,
                format!(
                    "{} bytes per second is too little; expected at least 64Ki",
                    b.0
                ),
            ));
        }
    }
    if let Some(n) = s.disk_iops
        && !(1..=1_000_000).contains(&n)
    {
        out.push((
            "diskIops",
            format!("{n} is out of range; expected 1 to 1000000"),
        ));
    }
    if let Some(m) = &s.machine
        && !MACHINES.contains(&m.as_str())
    {
        out.push((
            "machine",
            format!("{m:?} is not a machine NovaCron runs; expected q35, pc or microvm"),
        ));
    }
    out
}

/// The VM a job runs: each field the job sets, else its template's, else the
/// default. A size without a base disk (from either) is dropped by validation
/// before this; here it would be ignored.
pub fn resolve(task: &VmTask, template: Option<&VmTemplateSpec>) -> novacron_wire::VmSpec {
    let empty = VmTemplateSpec::default();
    let t = template.unwrap_or(&empty);
    let disk = task.disk.clone().or_else(|| t.disk.clone());
    novacron_wire::VmSpec {
        vcpus: task.vcpus.or(t.vcpus).unwrap_or(1),
        memory_mib: task.memory.or(t.memory).map_or(DEFAULT_MEMORY, |m| m.0) >> 20,
        kernel: task
            .kernel
            .clone()
            .or_else(|| t.kernel.clone())
            .unwrap_or_else(|| DEFAULT_KERNEL.to_owned()),
        initrd: task.initrd.clone().or_else(|| t.initrd.clone()),
        cmdline: task
            .cmdline
            .clone()
            .or_else(|| t.cmdline.clone())
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_owned()),
        disk_bytes: if disk.is_some() {
            task.disk_size.or(t.disk_size).map_or(0, |b| b.0)
        } else {
            0
        },
        disk_bytes_per_sec: if disk.is_some() {
            task.disk_bandwidth.or(t.disk_bandwidth).map_or(0, |b| b.0)
        } else {
            0
        },
        disk_iops: if disk.is_some() {
            task.disk_iops.or(t.disk_iops).unwrap_or(0)
        } else {
            0
        },
        disk,
        machine: task
            .machine
            .clone()
            .or_else(|| t.machine.clone())
            .unwrap_or_else(|| DEFAULT_MACHINE.to_owned()),
        template: task.template.clone(),
        user_data: task.user_data.clone().or_else(|| t.user_data.clone()),
        network: task.network.unwrap_or_default(),
        net_bytes_per_sec: task
            .network_bandwidth
            .or(t.network_bandwidth)
            .map_or(0, |b| b.0),
    }
}

/// Why the resolved VM `vm` cannot have its network limited, when it cannot:
/// a limit applies to the guest's tap device, which only the bridge network
/// has (QEMU's user network carries the guest's traffic in its own process).
pub fn network_problem(vm: &novacron_wire::VmSpec) -> Option<String> {
    (vm.net_bytes_per_sec > 0 && vm.network != novacron_wire::VmNetwork::Bridge).then(|| {
        "a network limit applies to a guest on the bridge network (its tap device); \
         expected network: bridge with networkBandwidth"
            .to_owned()
    })
}

/// Why `resources` do not reserve the GPUs a template passes through
/// (`declared`), if they do not: as many at least, of a model that contains
/// the template's. Pure.
pub fn gpus_problem(
    declared: Option<&crate::manifest::GpuRequest>,
    resources: &Resources,
) -> Option<String> {
    let declared = declared.filter(|g| g.count > 0)?;
    let wanted = match &declared.model {
        Some(m) => format!("{} GPU(s) of model {m:?}", declared.count),
        None => format!("{} GPU(s)", declared.count),
    };
    let ok = resources.gpus.as_ref().is_some_and(|g| {
        g.count >= declared.count
            && declared.model.as_ref().is_none_or(|m| {
                g.model
                    .as_ref()
                    .is_some_and(|jm| jm.to_ascii_lowercase().contains(&m.to_ascii_lowercase()))
            })
    });
    (!ok).then(|| {
        format!(
            "the machine passes through {wanted}; expected spec.resources.gpus to reserve them (for example gpus: {{count: {}{}}})",
            declared.count,
            declared
                .model
                .as_ref()
                .map(|m| format!(", model: {m}"))
                .unwrap_or_default()
        )
    })
}

/// Why `resources` cannot hold the resolved VM `vm`, when they cannot.
pub fn resources_problem(vm: &novacron_wire::VmSpec, resources: &Resources) -> Option<String> {
    let guest = vm.memory_mib << 20;
    (resources.memory.0 > 0 && resources.memory.0 < guest).then(|| {
        format!(
            "{} bytes is less than the guest's memory ({guest} bytes); expected at least the \
             guest's memory plus QEMU's own (about 64Mi)",
            resources.memory.0
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_s_gpus_must_be_reserved_by_the_job() {
        let gpus = |count: u32, model: Option<&str>| crate::manifest::GpuRequest {
            count,
            model: model.map(str::to_owned),
            memory: None,
        };
        let with = |g: Option<crate::manifest::GpuRequest>| Resources {
            gpus: g,
            ..Resources::default()
        };
        let h100 = gpus(2, Some("H100"));
        assert_eq!(gpus_problem(None, &with(None)), None);
        assert_eq!(
            gpus_problem(Some(&h100), &with(Some(gpus(2, Some("NVIDIA h100"))))),
            None
        );
        assert_eq!(
            gpus_problem(Some(&h100), &with(Some(gpus(3, Some("H100"))))),
            None
        );
        for short in [
            None,
            Some(gpus(1, Some("H100"))),
            Some(gpus(2, Some("A100"))),
            Some(gpus(2, None)),
        ] {
            let why = gpus_problem(Some(&h100), &with(short.clone())).expect("refused");
            assert!(
                why.contains("2 GPU(s) of model \"H100\"") && why.contains("count: 2, model: H100"),
                "{short:?}: {why}"
            );
        }
        // Checked with the rest of the shape.
        let bad = VmTemplateSpec {
            gpus: Some(crate::manifest::GpuRequest {
                count: 0,
                model: None,
                memory: Some(ByteSize(1 << 30)),
            }),
            ..VmTemplateSpec::default()
        };
        let found: Vec<&str> = problems(&bad).iter().map(|(k, _)| *k).collect();
        assert_eq!(found, ["gpus", "gpus"]);
    }

    #[test]
    fn the_job_wins_then_the_template_then_the_defaults() {
        let template = VmTemplateSpec {
            vcpus: Some(4),
            memory: Some(ByteSize(1 << 30)),
            initrd: Some("/boot/initrd.img".into()),
            cmdline: Some("console=ttyS0 quiet".into()),
            disk: Some("/disk/root.qcow2".into()),
            disk_size: Some(ByteSize(8 << 30)),
            disk_bandwidth: Some(ByteSize(50 << 20)),
            ..VmTemplateSpec::default()
        };
        let task = VmTask {
            template: Some("medium".into()),
            memory: Some(ByteSize(512 << 20)),
            ..VmTask::default()
        };
        let vm = resolve(&task, Some(&template));
        assert_eq!((vm.vcpus, vm.memory_mib), (4, 512));
        assert_eq!(vm.kernel, DEFAULT_KERNEL);
        assert_eq!(vm.initrd.as_deref(), Some("/boot/initrd.img"));
        assert_eq!(vm.cmdline, "console=ttyS0 quiet");
        assert_eq!(vm.disk_bytes, 8 << 30);
        assert_eq!((vm.disk_bytes_per_sec, vm.disk_iops), (50 << 20, 0));
        assert_eq!(vm.machine, DEFAULT_MACHINE);
        assert_eq!(vm.template.as_deref(), Some("medium"));
        let bare = resolve(&VmTask::default(), None);
        assert_eq!(
            (bare.vcpus, bare.memory_mib, bare.disk.as_deref()),
            (1, 256, None)
        );
        let small = Resources {
            memory: ByteSize(256 << 20),
            ..Resources::default()
        };
        assert!(resources_problem(&vm, &small).is_some());
        assert!(resources_problem(&bare, &small).is_none());
    }
}

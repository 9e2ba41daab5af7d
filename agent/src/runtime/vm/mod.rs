//! Virtual machines: QEMU guests that the agent starts, supervises and adopts
//! beside Docker's containers, behind the same [`ContainerRuntime`] operations
//! (through [`super::host::HostRuntime`]), so that the supervisor's restarts,
//! health checks, reports and adoption work for them unchanged.
//!
//! - A VM's disk image is a container image (a "containerDisk", as KubeVirt calls
//!   it): its kernel, initrd and optional base disk are files in it. The node
//!   pulls it like any image (registries, the controller's image store, pull
//!   ahead, image locality), and the driver copies the files out once per image
//!   id into `images/`.
//! - Each VM has a directory `vms/<id>/` (`meta.json`, the QMP socket, the serial
//!   console's log, the pid file, its copy-on-write disk). QEMU daemonizes, so a
//!   VM outlives an agent restart; the next agent lists the directories and the
//!   supervisor adopts them as it adopts containers.
//! - Networking is QEMU's user mode: each port of the task is forwarded from the
//!   VM's own loopback address (`127.100.x.y`, reported as its address, where
//!   health checks reach it) and each published port from the node's publish
//!   address.
//! - State words: `created`, `running`, `paused`, `shutdown` (the guest powered
//!   off; with `-no-shutdown` QEMU stays until stopped, so a clean power-off is
//!   told from a crash) and `exited`.

pub mod bridge;
pub mod cgroup;
mod migrate;
pub mod qemu;
mod qmp;
pub mod vfio;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::stream::{self, BoxStream, StreamExt};
use novacron_common::wire::{PortMapping, PublishedPort, VmCapability, VmNetwork, VmSpec};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::{
    ContainerConfig, ContainerDetails, ContainerListing, ContainerStatus, InteractiveExec,
    LABEL_NODE, LogFrame, RuntimeError, StatsReading,
};
pub use qemu::{Accel, Launcher};

/// Ids of VMs begin with this; Docker's ids are hexadecimal, so they never do.
pub const ID_PREFIX: &str = "vm-";

/// The QEMU binary looked for on `PATH`.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// How long QEMU may take to set up a machine and daemonize.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the KVM probe boot may take before KVM counts as unusable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether `id` names a VM.
pub fn is_vm(id: &str) -> bool {
    id.starts_with(ID_PREFIX)
}

/// Console sessions ([`VmDriver::console`]) are named with this, as exec
/// instances are: a session is over when its output ends.
pub const CONSOLE_PREFIX: &str = "vmconsole-";

/// Console sessions opened, for their names.
static CONSOLES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The command that attaches an interactive exec to a VM's serial console
/// (a VM runs no commands from its node).
pub const CONSOLE_COMMAND: &str = "console";

/// What the driver keeps of one VM, in `meta.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    id: String,
    name: String,
    labels: HashMap<String, String>,
    image: String,
    /// The image's id, kept in use (not collected) while the VM exists.
    image_id: String,
    vm: VmSpec,
    ports: Vec<PortMapping>,
    /// Its own loopback address.
    address: Ipv4Addr,
    /// The node's publish address for published ports.
    publish: Ipv4Addr,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    disk: Option<PathBuf>,
    accel: Option<String>,
    started_unix_ms: Option<u64>,
    /// How its last run ended, when the driver saw it end.
    exit: Option<Exit>,
    /// The job's CPU, thousandths of a core (0: unlimited; VMs made before
    /// limits existed have none).
    #[serde(default)]
    cpu_millis: u64,
    /// The job's memory, bytes (0: unlimited).
    #[serde(default)]
    memory_bytes: u64,
    /// Suspended on the controller's word ([`VmDriver::set_paused`]): only
    /// such a pause is reported as one, and a migration's or snapshot's end
    /// leaves the guest paused. A guest a snapshot pauses is not suspended.
    #[serde(default)]
    suspended: bool,
    /// The PCI addresses of the GPUs passed through to it (the scheduler's
    /// choice among the node's `vfio-pci` GPUs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    gpus: Vec<String>,
}

impl Meta {
    /// The limits its QEMU runs under `accel`.
    fn limits(&self, accel: Accel) -> cgroup::Limits {
        cgroup::Limits::for_vm(
            self.cpu_millis,
            self.memory_bytes,
            self.vm.memory_mib,
            accel,
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Exit {
    code: i64,
    error: String,
}

/// The VM driver of one node.
#[derive(Debug)]
pub struct VmDriver {
    dir: PathBuf,
    qemu: PathBuf,
    version: String,
    /// The accelerator, once probed or chosen (`NOVACRON_VM_ACCEL=tcg|kvm`
    /// skips the probe); `None` until the first VM boots.
    accel: Mutex<Option<(Accel, Option<String>)>>,
    /// How QEMU is started.
    launcher: Launcher,
    /// One lock per VM, so that start, stop and remove of one VM do not interleave.
    locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Bumped when the probe decides the accelerator: the node's capabilities
    /// changed ([`VmDriver::probed`]).
    probed: tokio::sync::watch::Sender<u64>,
    /// The node's VM bridge, or why guests cannot be bridged here.
    bridge: Result<bridge::Bridge, String>,
    /// The bridge's lock, held while the driver lives.
    _bridge_lock: Option<std::fs::File>,
}

impl VmDriver {
    /// At the agent's clean stop: removes the node's VM bridge, its rules and
    /// its published ports' chain when no guest is attached to it (a running
    /// VM keeps its network across the agent's restart; the next start makes
    /// the bridge again). Without it, every stop of an agent with VM support
    /// (each `novacron dev`) left a bridge and its rules behind.
    pub async fn release_bridge(&self) {
        let Ok(bridge) = &self.bridge else {
            return;
        };
        if bridge.in_use() {
            return;
        }
        match bridge.teardown().await {
            Ok(()) => {
                info!(bridge = %bridge.name, "no guest uses the VM bridge; removed it and its rules")
            }
            Err(e) => {
                warn!(bridge = %bridge.name, error = %e, "cannot remove the unused VM bridge")
            }
        }
    }
}

impl VmDriver {
    /// Removes every VM of this node ([`VmDriver::remove`]: QEMU killed, its
    /// directory and tap removed): the clean stop of an agent run with
    /// `--remove-vms-on-stop` (a throwaway fleet, whose VMs must not outlive
    /// it). Failures are logged; the others are still removed.
    pub async fn remove_all(&self) {
        for id in self.ids() {
            match self.remove(&id).await {
                Ok(()) => info!(vm = %id, "virtual machine removed at the agent's stop"),
                Err(e) => {
                    warn!(vm = %id, error = %e, "cannot remove the virtual machine at the agent's stop")
                }
            }
        }
    }
}

/// Where agents lock the VM bridges they hold.
const BRIDGE_LOCKS: &str = "/run/novacron/vm-bridge";

impl VmDriver {
    /// The driver when QEMU is installed: its version is read and `state_dir/vms`
    /// made, and `bridge` (`None`: none) set up for guests on the bridge
    /// network. `Err` says why VMs cannot run here.
    pub async fn detect(
        state_dir: &Path,
        bridge: Option<bridge::Bridge>,
    ) -> Result<VmDriver, String> {
        let qemu = find_on_path(QEMU_BINARY).ok_or_else(|| {
            format!("{QEMU_BINARY} is not installed (Debian: apt-get install qemu-system-x86 qemu-utils)")
        })?;
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::process::Command::new(&qemu)
                .arg("--version")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| format!("{} --version did not answer", qemu.display()))?
        .map_err(|e| format!("{}: {e}", qemu.display()))?;
        let version = qemu::parse_version(&String::from_utf8_lossy(&out.stdout))
            .ok_or_else(|| format!("{} --version: unexpected output", qemu.display()))?;
        let dir = state_dir.join("vms");
        std::fs::create_dir_all(dir.join("images"))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let forced = match std::env::var("NOVACRON_VM_ACCEL").ok().as_deref() {
            Some("tcg") => Some(Accel::Tcg),
            Some("kvm") => Some(Accel::Kvm),
            _ => None,
        };
        let accel = if !Path::new("/dev/kvm").exists() {
            Some((Accel::Tcg, Some("no /dev/kvm on this host".to_owned())))
        } else if let Some(a) = forced {
            Some((a, Some("chosen by NOVACRON_VM_ACCEL".to_owned())))
        } else {
            // What the node reports before its first boot: a KVM whose vCPUs
            // QEMU cannot even set up is TCG at once; the boot probe decides
            // the rest when the first VM starts.
            start_kvm(&qemu)
                .await
                .err()
                .map(|why| (Accel::Tcg, Some(why)))
        };
        // Under systemd, each VM is a transient service of its own
        // (NOVACRON_VM_LAUNCH=direct keeps them the agent's children).
        let launcher = if std::env::var("NOVACRON_VM_LAUNCH").as_deref() != Ok("direct")
            && Path::new("/run/systemd/system").is_dir()
            && find_on_path("systemd-run").is_some()
        {
            Launcher::Systemd
        } else {
            Launcher::Direct
        };
        info!(?launcher, "virtual machines are started this way");
        let (bridge, lock) = match bridge {
            None => (
                Err("this agent has no VM bridge (--vm-bridge off)".to_owned()),
                None,
            ),
            Some(b) => match b.setup(Path::new(BRIDGE_LOCKS)).await {
                Ok(lock) => (Ok(b), Some(lock)),
                Err(why) => {
                    let why = bridge::with_unit_hint(why);
                    warn!(%why, "no VM bridge: virtual machines here use QEMU's user-mode network only");
                    (Err(why), None)
                }
            },
        };
        let driver = VmDriver {
            dir,
            qemu,
            version,
            launcher,
            accel: Mutex::new(accel),
            locks: Default::default(),
            probed: tokio::sync::watch::channel(0).0,
            bridge,
            _bridge_lock: lock,
        };
        // The published ports of the guests an earlier run left, in case the
        // node's packet filter was reset meanwhile, and no tap device of a
        // guest that is gone (an agent that died while removing it).
        driver.sync_forwards().await;
        driver.sweep_taps().await;
        Ok(driver)
    }

    /// Removes the tap devices on the bridge that belong to no VM.
    async fn sweep_taps(&self) {
        let Ok(bridge) = &self.bridge else {
            return;
        };
        let Ok(ports) =
            std::fs::read_dir(Path::new("/sys/class/net").join(&bridge.name).join("brif"))
        else {
            return;
        };
        let ours: Vec<String> = self.ids().iter().map(|id| bridge::tap_name(id)).collect();
        for port in ports.flatten() {
            let tap = port.file_name().to_string_lossy().into_owned();
            if tap.starts_with(bridge::TAP_PREFIX) && !ours.contains(&tap) {
                match bridge::remove_tap(&tap).await {
                    Ok(()) => {
                        info!(%tap, "removed the tap device of a virtual machine that is gone")
                    }
                    Err(e) => {
                        warn!(%tap, error = %e, "cannot remove a tap device of a virtual machine that is gone")
                    }
                }
            }
        }
    }

    /// Makes the bridge's published ports those of the bridged VMs that exist.
    async fn sync_forwards(&self) {
        let Ok(bridge) = &self.bridge else {
            return;
        };
        let mut forwards = Vec::new();
        for id in self.ids() {
            let Ok(meta) = self.read_meta(&id) else {
                continue;
            };
            if meta.vm.network != VmNetwork::Bridge {
                continue;
            }
            forwards.extend(meta.ports.iter().filter_map(|p| {
                Some(crate::runtime::netfilter::Dnat {
                    owner: id.clone(),
                    publish: meta.publish,
                    host_port: p.host_port?,
                    to: meta.address,
                    to_port: p.container_port,
                    udp: p.udp,
                })
            }));
        }
        if let Err(e) = bridge.set_forwards(&forwards).await {
            warn!(error = %e, "cannot write the bridged guests' published ports");
        }
    }

    /// What the node reports: QEMU's version and the accelerator (`kvm` until a
    /// probe boot fails; then `tcg` with the reason).
    pub async fn capability(&self) -> VmCapability {
        let accel = self.accel.lock().await.clone();
        let probed = accel.is_some();
        let (accelerator, why) = match accel {
            Some((a, why)) => (a.as_str().to_owned(), why.filter(|_| a == Accel::Tcg)),
            None => ("kvm".to_owned(), None),
        };
        VmCapability {
            qemu_version: self.version.clone(),
            accelerator,
            kvm_unusable: why,
            probed,
            bridge: self.bridge.as_ref().ok().map(bridge::Bridge::range),
        }
    }

    fn vm_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }

    fn images_dir(&self) -> PathBuf {
        self.dir.join("images")
    }

    fn lock_of(&self, id: &str) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.to_owned()).or_default().clone()
    }

    fn read_meta(&self, id: &str) -> Result<Meta, RuntimeError> {
        let path = self.vm_dir(id).join("meta.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                RuntimeError::NotFound {
                    op: "vm",
                    message: format!("no virtual machine {id}"),
                }
            } else {
                daemon("vm", format!("{}: {e}", path.display()))
            }
        })?;
        serde_json::from_str(&text).map_err(|e| daemon("vm", format!("{}: {e}", path.display())))
    }

    fn write_meta(&self, meta: &Meta) -> Result<(), RuntimeError> {
        let path = self.vm_dir(&meta.id).join("meta.json");
        let text = serde_json::to_string_pretty(meta).map_err(|e| daemon("vm", e.to_string()))?;
        novacron_common::files::write_atomic(&path, &text, 0o600)
            .map_err(|e| daemon("vm", format!("{}: {e}", path.display())))
    }

    fn ids(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| is_vm(n))
            .collect();
        ids.sort();
        ids
    }

    /// The process id of the VM's QEMU while it lives (checked against its
    /// command line, so that a reused pid is not taken for it).
    fn pid(&self, id: &str) -> Option<i32> {
        let dir = self.vm_dir(id);
        let pid: i32 = std::fs::read_to_string(dir.join("qemu.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let needle = dir.join("qmp.sock");
        let needle = needle.to_string_lossy();
        String::from_utf8_lossy(&cmdline)
            .contains(needle.as_ref())
            .then_some(pid)
    }

    /// The state word of a VM: `created`, `running`, `paused`, `shutdown` or
    /// `exited`.
    async fn state_word(&self, id: &str, meta: &Meta) -> String {
        match self.pid(id) {
            Some(_) => match qmp::status(&self.vm_dir(id).join("qmp.sock")).await {
                Ok(s) => s,
                // Alive but not answering (still starting, or wedged): running.
                Err(_) => "running".to_owned(),
            },
            None if meta.started_unix_ms.is_none() => "created".to_owned(),
            None => "exited".to_owned(),
        }
    }

    /// Every VM of `node`.
    pub async fn list(&self, node: &str) -> Result<Vec<ContainerListing>, RuntimeError> {
        let mut out = Vec::new();
        for id in self.ids() {
            let Ok(meta) = self.read_meta(&id) else {
                continue;
            };
            if meta.labels.get(LABEL_NODE).map(String::as_str) != Some(node) {
                continue;
            }
            let state = self.state_word(&id, &meta).await;
            out.push(ContainerListing {
                id,
                labels: meta.labels,
                state,
            });
        }
        Ok(out)
    }

    /// One VM in detail.
    pub async fn inspect(&self, id: &str) -> Result<ContainerDetails, RuntimeError> {
        let meta = self.read_meta(id)?;
        let word = self.state_word(id, &meta).await;
        let status = match word.as_str() {
            "created" => ContainerStatus::Created,
            "shutdown" => ContainerStatus::Exited {
                code: 0,
                oom_killed: false,
                error: String::new(),
            },
            "exited" => match &meta.exit {
                Some(e) => ContainerStatus::Exited {
                    code: e.code,
                    oom_killed: false,
                    error: e.error.clone(),
                },
                None => ContainerStatus::Exited {
                    code: 1,
                    oom_killed: false,
                    error: "qemu exited without the agent stopping it".to_owned(),
                },
            },
            _ => ContainerStatus::Running,
        };
        let running = status == ContainerStatus::Running;
        let published = if running {
            meta.ports
                .iter()
                .filter_map(|p| {
                    Some(PublishedPort {
                        host_ip: IpAddr::V4(meta.publish),
                        container_port: p.container_port,
                        host_port: p.host_port?,
                        udp: p.udp,
                    })
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(ContainerDetails {
            id: id.to_owned(),
            labels: meta.labels,
            status,
            started_at_unix_ms: meta.started_unix_ms,
            ip: running.then_some(IpAddr::V4(meta.address)),
            published,
            // Only the operator's pause: the agent's own (a snapshot or a
            // migration that did not converge) is not a suspension to undo.
            paused: meta.suspended && matches!(word.as_str(), "paused" | "postmigrate"),
        })
    }

    /// Creates (does not start) VM `name` from `config`; its id. `image_dir` holds
    /// the files copied out of the image.
    pub async fn create(
        &self,
        name: &str,
        config: &ContainerConfig,
        vm: &VmSpec,
        image_id: &str,
        image_dir: &Path,
        publish: IpAddr,
    ) -> Result<String, RuntimeError> {
        // Short and fixed in length: the QMP socket's path must fit a Unix
        // socket address (108 bytes).
        let id = {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(name.as_bytes());
            format!("{ID_PREFIX}{}", hex::encode(&digest[..8]))
        };
        let lock = self.lock_of(&id);
        let _held = lock.lock().await;
        let dir = self.vm_dir(&id);
        if dir.join("meta.json").exists() {
            return Err(RuntimeError::Conflict {
                op: "create",
                message: format!("virtual machine {id} exists"),
            });
        }
        let gpus = passthrough_gpus(&config.gpu_uuids).map_err(|e| daemon("create", e))?;
        let inside = |p: &str| image_dir.join(p.trim_start_matches('/'));
        let kernel = inside(&vm.kernel);
        if !kernel.is_file() {
            return Err(daemon(
                "create",
                format!("the image {} has no kernel at {}", config.image, vm.kernel),
            ));
        }
        let initrd = vm.initrd.as_deref().map(inside);
        if let Some(i) = initrd.as_ref().filter(|i| !i.is_file()) {
            return Err(daemon(
                "create",
                format!(
                    "the image {} has no initrd at {}",
                    config.image,
                    i.display()
                ),
            ));
        }
        std::fs::create_dir_all(&dir)
            .map_err(|e| daemon("create", format!("{}: {e}", dir.display())))?;
        // The NoCloud seed: user-data and meta-data in a directory QEMU shows
        // the guest as a read-only FAT disk labelled cidata.
        if let Some(user_data) = &vm.user_data {
            let seed = dir.join("seed");
            let meta_data = format!("instance-id: {name}\nlocal-hostname: {}\n", hostname(name));
            std::fs::create_dir_all(&seed)
                .and_then(|()| std::fs::write(seed.join("user-data"), user_data))
                .and_then(|()| std::fs::write(seed.join("meta-data"), meta_data))
                .map_err(|e| daemon("create", format!("{}: {e}", seed.display())))?;
        }
        let disk = match &vm.disk {
            None => None,
            Some(base) => {
                let base = inside(base);
                let overlay = dir.join("disk.qcow2");
                overlay_disk(&base, &overlay, vm.disk_bytes).await?;
                Some(overlay)
            }
        };
        let taken: Vec<Ipv4Addr> = self
            .ids()
            .iter()
            .filter_map(|i| self.read_meta(i).ok())
            .map(|m| m.address)
            .collect();
        let address = match vm.network {
            VmNetwork::User => qemu::loopback_address(&id, &taken),
            VmNetwork::Bridge => {
                let bridge = self.bridge.as_ref().map_err(|why| {
                    daemon(
                        "create",
                        format!("this node cannot put a guest on the bridge network: {why}"),
                    )
                })?;
                // By the name's hash, so that the guest keeps its address on
                // another node with the same range.
                bridge.allocate(name, &taken).ok_or_else(|| {
                    daemon(
                        "create",
                        format!("the VM bridge's range {} is full", bridge.range()),
                    )
                })?
            }
        };
        if let (VmNetwork::Bridge, Some(_), Ok(bridge)) = (vm.network, &vm.user_data, &self.bridge)
        {
            // Cloud-init configures the network from the seed, as the kernel's
            // `ip=` does for simpler guests.
            let path = dir.join("seed").join("network-config");
            std::fs::write(&path, bridge.network_config(&bridge::mac(&id), address))
                .map_err(|e| daemon("create", format!("{}: {e}", path.display())))?;
        }
        let publish = match publish {
            IpAddr::V4(a) => a,
            IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
        };
        let labels = config
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let meta = Meta {
            id: id.clone(),
            name: name.to_owned(),
            labels,
            image: config.image.clone(),
            image_id: image_id.to_owned(),
            vm: vm.clone(),
            ports: config.ports.clone(),
            address,
            publish,
            kernel,
            initrd,
            disk,
            accel: None,
            started_unix_ms: None,
            exit: None,
            suspended: false,
            gpus,
            cpu_millis: config
                .nano_cpus
                .map_or(0, |n| u64::try_from(n / 1_000_000).unwrap_or(0)),
            memory_bytes: config
                .memory_bytes
                .map_or(0, |m| u64::try_from(m).unwrap_or(0)),
        };
        self.write_meta(&meta)?;
        Ok(id)
    }

    /// The accelerator to boot with: the probed one, probing KVM with this VM's
    /// kernel the first time (a boot under `-cpu host` that must reach the
    /// kernel's panic for want of an init within [`PROBE_TIMEOUT`]).
    async fn accel_for(&self, meta: &Meta) -> Accel {
        let mut accel = self.accel.lock().await;
        if let Some((a, _)) = *accel {
            return a;
        }
        let outcome = probe_kvm(self.launcher, &self.qemu, &meta.kernel, &self.dir).await;
        let chosen = match outcome {
            Ok(()) => {
                info!("KVM boots guests here: virtual machines run under KVM");
                (Accel::Kvm, None)
            }
            Err(why) => {
                warn!(%why, "KVM cannot boot a guest here: virtual machines run under TCG (slow)");
                (Accel::Tcg, Some(why))
            }
        };
        *accel = Some(chosen.clone());
        self.probed.send_modify(|n| *n += 1);
        chosen.0
    }

    /// Changes whenever a probe boot decided the accelerator, so that the node
    /// reports it ([`VmDriver::capability`] then says what was chosen).
    pub fn probed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.probed.subscribe()
    }

    /// Starts a created or stopped VM (a guest that powered off is quit first).
    pub async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        self.launch(id, None).await
    }

    /// Starts QEMU for VM `id`; with `incoming`, waiting for its state from a
    /// live migration on that socket.
    async fn launch(&self, id: &str, incoming: Option<&Path>) -> Result<(), RuntimeError> {
        let lock = self.lock_of(id);
        let _held = lock.lock().await;
        let mut meta = self.read_meta(id)?;
        let dir = self.vm_dir(id);
        if let Some(pid) = self.pid(id) {
            match qmp::status(&dir.join("qmp.sock")).await.as_deref() {
                Ok("shutdown") => {
                    let _ = qmp::quit(&dir.join("qmp.sock")).await;
                    wait_gone(pid, Duration::from_secs(5)).await;
                    kill(pid);
                }
                _ => return Ok(()),
            }
        }
        let accel = self.accel_for(&meta).await;
        let serial = dir.join("serial.log");
        let seed = dir.join("seed");
        let qmp_sock = dir.join("qmp.sock");
        let console = dir.join("console.sock");
        let pidfile = dir.join("qemu.pid");
        let _ = std::fs::remove_file(&qmp_sock);
        let _ = std::fs::remove_file(&console);
        let _ = std::fs::remove_file(&pidfile);
        // Keep the console of earlier runs: a new run appends after a marker.
        rotate_console(&serial);
        let paths = qemu::Paths {
            kernel: &meta.kernel,
            initrd: meta.initrd.as_deref(),
            disk: meta.disk.as_deref(),
            seed: meta.vm.user_data.is_some().then_some(seed.as_path()),
            qmp: &qmp_sock,
            serial: &dir.join("serial.run.log"),
            console: &console,
            pidfile: &pidfile,
        };
        let forwards = qemu::forwards(meta.address, meta.publish, &meta.ports);
        let (tap, mac) = (bridge::tap_name(id), bridge::mac(id));
        let kernel_arg = match (meta.vm.network, &self.bridge) {
            (VmNetwork::User, _) => None,
            (VmNetwork::Bridge, Ok(b)) => {
                b.ensure_tap(&tap)
                    .await
                    .map_err(|e| daemon("start", format!("the guest's tap device: {e}")))?;
                bridge::limit_tap(&tap, meta.vm.net_bytes_per_sec)
                    .await
                    .map_err(|e| daemon("start", format!("the guest's network limit: {e}")))?;
                Some(b.kernel_arg(meta.address))
            }
            (VmNetwork::Bridge, Err(why)) => {
                return Err(daemon(
                    "start",
                    format!("this node cannot put a guest on the bridge network: {why}"),
                ));
            }
        };
        let net = match &kernel_arg {
            None => qemu::Net::User(&forwards),
            Some(arg) => qemu::Net::Tap {
                ifname: &tap,
                mac: &mac,
                kernel_arg: arg,
            },
        };
        let mut args = qemu::args(&meta.vm, accel, &paths, net);
        for gpu in &meta.gpus {
            let functions = vfio::group(Path::new("/sys"), gpu)
                .map_err(|e| daemon("start", format!("GPU passthrough: {e}")))?;
            args.extend(vfio::args(&functions));
        }
        if let Some(sock) = incoming {
            args.extend(["-incoming".to_owned(), format!("unix:{}", sock.display())]);
        }
        let limits = meta.limits(accel);
        let mut properties = limits.systemd_properties();
        if !meta.gpus.is_empty() {
            // A device's DMA needs the guest's whole memory locked.
            properties.push("--property=LimitMEMLOCK=infinity".to_owned());
        }
        let (mut program, mut argv) =
            qemu::launch(self.launcher, &self.qemu, id, &pidfile, &args, &properties);
        if self.launcher == Launcher::Direct && limits.any() {
            // Its own cgroup, joined before QEMU runs (the systemd launcher's
            // unit carries the same limits as properties).
            match cgroup::prepare(id, limits) {
                Ok(procs) => (program, argv) = cgroup::wrap(&procs, &program, &argv),
                Err(e) => {
                    warn!(vm = %id, error = %e, "cannot limit the virtual machine's CPU and memory with a cgroup; it runs unlimited")
                }
            }
        }
        let out = tokio::time::timeout(
            START_TIMEOUT,
            tokio::process::Command::new(&program)
                .args(&argv)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(false)
                .output(),
        )
        .await
        .map_err(|_| RuntimeError::Timeout {
            op: "start",
            after: START_TIMEOUT,
        })?
        .map_err(|e| daemon("start", format!("{program}: {e}")))?;
        if !out.status.success() {
            let mut err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            if self.launcher == Launcher::Systemd {
                err.push_str(&journal_tail(&qemu::unit_name(id)).await);
            }
            return Err(daemon("start", format!("qemu: {err}")));
        }
        meta.accel = Some(accel.as_str().to_owned());
        meta.started_unix_ms = Some(now_ms());
        meta.exit = None;
        self.write_meta(&meta)?;
        info!(vm = %id, accel = accel.as_str(), "virtual machine started");
        if meta.vm.network == VmNetwork::Bridge {
            self.sync_forwards().await;
        }
        Ok(())
    }

    /// Stops a VM: an ACPI power-button press, then QEMU is quit after `grace`
    /// if the guest has not powered off by then. Stopping a stopped VM succeeds.
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        let lock = self.lock_of(id);
        let _held = lock.lock().await;
        let mut meta = self.read_meta(id)?;
        let Some(pid) = self.pid(id) else {
            return Ok(());
        };
        let sock = self.vm_dir(id).join("qmp.sock");
        let deadline = tokio::time::Instant::now() + grace;
        let mut clean = false;
        let mut word = qmp::status(&sock).await;
        if word.as_deref().is_ok_and(|s| s == "paused") {
            // A suspended guest cannot hear the power button: it runs again
            // to power off cleanly.
            if qmp::cont(&sock).await.is_ok() {
                word = qmp::status(&sock).await;
            }
        }
        if word.as_deref().is_ok_and(|s| s == "shutdown") {
            clean = true;
        } else if word.as_deref().is_ok_and(|s| s == "postmigrate") {
            // The guest moved to another node: nothing here to power off.
            clean = true;
        } else if qmp::powerdown(&sock).await.is_ok() {
            while tokio::time::Instant::now() < deadline {
                match qmp::status(&sock).await.as_deref() {
                    Ok("shutdown") => {
                        clean = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(_) if !alive(pid) => break,
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let _ = qmp::quit(&sock).await;
        if !wait_gone(pid, Duration::from_secs(5)).await {
            kill(pid);
            wait_gone(pid, Duration::from_secs(5)).await;
        }
        meta.exit = Some(if clean {
            Exit {
                code: 0,
                error: String::new(),
            }
        } else {
            Exit {
                code: 137,
                error: format!("the guest did not power off within {grace:?}; qemu was quit"),
            }
        });
        self.write_meta(&meta)?;
        info!(vm = %id, clean, "virtual machine stopped");
        Ok(())
    }

    /// Pauses (`true`, QMP `stop`) or resumes (`false`, `cont`) VM `id`'s
    /// guest: its vCPUs stop and its memory, devices and QEMU stay. Only a
    /// guest that runs or was paused this way is touched; one in a migration's
    /// or a power-off's state is refused.
    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<(), RuntimeError> {
        let op = if paused { "suspend" } else { "resume" };
        let lock = self.lock_of(id);
        let _held = lock.lock().await;
        let mut meta = self.read_meta(id)?;
        if self.pid(id).is_none() {
            return Err(RuntimeError::NotFound {
                op,
                message: format!("virtual machine {id} is not running"),
            });
        }
        let sock = self.vm_dir(id).join("qmp.sock");
        let word = qmp::status(&sock)
            .await
            .map_err(|e| daemon(op, format!("qmp: {e}")))?;
        // The intent first: a snapshot that ends meanwhile then leaves the
        // guest paused.
        meta.suspended = paused;
        self.write_meta(&meta)?;
        match (word.as_str(), paused) {
            // Paused already (by a snapshot's end, too): now it is the
            // operator's pause.
            ("paused" | "postmigrate", true) | ("running", false) => {}
            ("running", true) => qmp::stop(&sock)
                .await
                .map_err(|e| daemon(op, format!("qmp: {e}")))?,
            ("paused" | "postmigrate", false) => qmp::cont(&sock)
                .await
                .map_err(|e| daemon(op, format!("qmp: {e}")))?,
            (other, _) => {
                return Err(daemon(
                    op,
                    format!("virtual machine {id} is {other}, neither running nor paused"),
                ));
            }
        }
        info!(vm = %id, paused, "virtual machine {}", if paused { "suspended" } else { "resumed" });
        Ok(())
    }

    /// Attaches to VM `id`'s serial console: what the guest prints from now
    /// on, and what is written goes to the guest as typed. QEMU serves one
    /// client at a time (a second one waits until the first leaves).
    pub async fn console(&self, id: &str) -> Result<InteractiveExec, RuntimeError> {
        self.read_meta(id)?;
        if self.pid(id).is_none() {
            return Err(RuntimeError::NotFound {
                op: "console",
                message: format!("virtual machine {id} is not running"),
            });
        }
        let sock = self.vm_dir(id).join("console.sock");
        if !sock.exists() {
            return Err(daemon(
                "console",
                format!(
                    "virtual machine {id} was started without an interactive console (by an older agent); its output is in `novacron vm console`, and a restart gives it one"
                ),
            ));
        }
        let stream = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::UnixStream::connect(&sock),
        )
        .await
        .map_err(|_| RuntimeError::Timeout {
            op: "console",
            after: Duration::from_secs(5),
        })?
        .map_err(|e| daemon("console", format!("{}: {e}", sock.display())))?;
        let (read, write) = stream.into_split();
        let output = futures_util::stream::unfold(read, |mut read| async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 16 * 1024];
            match read.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((
                        Ok(LogFrame {
                            stderr: false,
                            data: buf,
                        }),
                        read,
                    ))
                }
                Err(e) => Some((Err(daemon("console", e.to_string())), read)),
            }
        })
        .boxed();
        let n = CONSOLES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(InteractiveExec {
            id: format!("{CONSOLE_PREFIX}{id}-{n}"),
            output,
            input: Box::pin(write),
        })
    }

    /// Removes a VM: its QEMU is killed and its directory (disk included) deleted.
    pub async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let lock = self.lock_of(id);
        let _held = lock.lock().await;
        if let Some(pid) = self.pid(id) {
            kill(pid);
            wait_gone(pid, Duration::from_secs(5)).await;
        }
        cgroup::remove(id);
        let bridged = self
            .read_meta(id)
            .is_ok_and(|m| m.vm.network == VmNetwork::Bridge);
        let dir = self.vm_dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RuntimeError::NotFound {
                    op: "remove",
                    message: format!("no virtual machine {id}"),
                });
            }
            Err(e) => return Err(daemon("remove", format!("{}: {e}", dir.display()))),
        }
        if bridged {
            // Its published ports first, then its device.
            self.sync_forwards().await;
            if let Err(e) = bridge::remove_tap(&bridge::tap_name(id)).await {
                warn!(vm = %id, error = %e, "cannot remove the guest's tap device");
            }
        }
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(())
    }

    /// CPU time and resident memory of the VM's QEMU process.
    pub async fn stats(&self, id: &str) -> Result<StatsReading, RuntimeError> {
        let Some(pid) = self.pid(id) else {
            return Err(RuntimeError::NotFound {
                op: "stats",
                message: format!("virtual machine {id} is not running"),
            });
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map_err(|e| daemon("stats", e.to_string()))?;
        let statm = std::fs::read_to_string(format!("/proc/{pid}/statm"))
            .map_err(|e| daemon("stats", e.to_string()))?;
        let ticks = rustix::param::clock_ticks_per_second().max(1);
        let cpu_ticks = proc_cpu_ticks(&stat).unwrap_or(0);
        let rss_pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Ok(StatsReading {
            cpu_total_ns: cpu_ticks.saturating_mul(1_000_000_000 / ticks),
            system_cpu_ns: None,
            online_cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_bytes: rss_pages.saturating_mul(rustix::param::page_size() as u64),
            rx_bytes: 0,
            tx_bytes: 0,
        })
    }

    /// The serial console's output: the last `tail` lines (0: all), then, with
    /// `follow`, what it prints until QEMU exits.
    pub fn logs(
        self: &Arc<Self>,
        id: &str,
        follow: bool,
        tail: u32,
    ) -> BoxStream<'static, Result<LogFrame, RuntimeError>> {
        let path = self.vm_dir(id).join("serial.run.log");
        let history = self.vm_dir(id).join("serial.log");
        let driver = self.clone();
        let id = id.to_owned();
        let first = {
            let mut text = std::fs::read(&history).unwrap_or_default();
            let current = std::fs::read(&path).unwrap_or_default();
            text.extend_from_slice(&current);
            let offset = current.len() as u64;
            (last_lines(&text, tail), offset)
        };
        let (head, offset) = first;
        let head = stream::iter([Ok(LogFrame {
            stderr: false,
            data: head,
        })]);
        if !follow {
            return head.boxed();
        }
        let rest = stream::unfold(offset, move |mut offset| {
            let path = path.clone();
            let driver = driver.clone();
            let id = id.clone();
            async move {
                loop {
                    let data = read_from(&path, offset);
                    if !data.is_empty() {
                        offset += data.len() as u64;
                        return Some((
                            Ok(LogFrame {
                                stderr: false,
                                data,
                            }),
                            offset,
                        ));
                    }
                    driver.pid(&id)?;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        });
        head.chain(rest).boxed()
    }

    /// The ids of the images of every VM on this host.
    pub fn images_in_use(&self) -> Vec<String> {
        self.ids()
            .iter()
            .filter_map(|id| self.read_meta(id).ok())
            .map(|m| m.image_id)
            .collect()
    }

    /// Where the files of the image with id `image_id` are kept.
    pub fn image_dir(&self, image_id: &str) -> PathBuf {
        let key: String = image_id
            .trim_start_matches("sha256:")
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(24)
            .collect();
        self.images_dir().join(key)
    }
}

/// The console of a finished run is moved to `serial.log` (bounded to its last
/// MiB) before the next run starts.
pub(super) fn rotate_console(history: &Path) {
    const KEEP: usize = 1 << 20;
    let run = history.with_file_name("serial.run.log");
    let mut text = std::fs::read(history).unwrap_or_default();
    if let Ok(previous) = std::fs::read(&run) {
        text.extend_from_slice(&previous);
        text.extend_from_slice(b"\n--- novacron: the virtual machine starts again ---\n");
    }
    if text.len() > KEEP {
        text.drain(..text.len() - KEEP);
    }
    let _ = std::fs::write(history, &text);
    let _ = std::fs::remove_file(&run);
}

/// A host name for the guest from the VM's name: letters, digits and `-`, at
/// most 63 bytes.
fn hostname(name: &str) -> String {
    let h: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    h.trim_matches('-').to_owned()
}

pub(super) fn read_from(path: &Path, offset: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    if f.seek(SeekFrom::Start(offset)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(64 * 1024).read_to_end(&mut buf);
    buf
}

pub(super) fn last_lines(text: &[u8], tail: u32) -> Vec<u8> {
    if tail == 0 {
        return text.to_vec();
    }
    let mut seen = 0;
    for (i, b) in text.iter().enumerate().rev() {
        if *b == b'\n' && i + 1 < text.len() {
            seen += 1;
            if seen == tail {
                return text[i + 1..].to_vec();
            }
        }
    }
    text.to_vec()
}

/// utime + stime of `/proc/PID/stat` (fields 14 and 15, after the command in
/// parentheses).
fn proc_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

async fn overlay_disk(base: &Path, overlay: &Path, bytes: u64) -> Result<(), RuntimeError> {
    if !base.is_file() {
        return Err(daemon(
            "create",
            format!("the image has no disk at {}", base.display()),
        ));
    }
    let format = if base.extension().is_some_and(|e| e == "qcow2") {
        "qcow2"
    } else {
        "raw"
    };
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
        .arg(base)
        .arg(overlay);
    if bytes > 0 {
        cmd.arg(bytes.to_string());
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.kill_on_drop(true).output())
        .await
        .map_err(|_| RuntimeError::Timeout {
            op: "create",
            after: Duration::from_secs(60),
        })?
        .map_err(|e| daemon("create", format!("qemu-img: {e}")))?;
    if !out.status.success() {
        return Err(daemon(
            "create",
            format!(
                "qemu-img create: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// Whether QEMU can set up a KVM machine with the host's CPU model (stopped
/// before its first instruction, `-S`): on nested KVM that lacks what the host
/// model needs it exits at once ("failed to set MSR"). Passing says nothing yet
/// about booting a guest; [`probe_kvm`] does that at the first boot.
/// The PCI addresses of the passthrough GPUs among an allocation's GPUs.
/// A GPU of NVIDIA's driver cannot go to a guest.
fn passthrough_gpus(uuids: &[String]) -> Result<Vec<String>, String> {
    uuids
        .iter()
        .map(|u| {
            u.strip_prefix(novacron_common::wire::VFIO_UUID_PREFIX)
                .map(str::to_owned)
                .ok_or_else(|| {
                    format!(
                        "GPU {u} is held by the host's NVIDIA driver: a virtual machine takes only GPUs bound to vfio-pci"
                    )
                })
        })
        .collect()
}

async fn start_kvm(qemu: &Path) -> Result<(), String> {
    let mut child = tokio::process::Command::new(qemu)
        .args([
            "-machine",
            "q35",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "64M",
            "-S",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{}: {e}", qemu.display()))?;
    match tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
        // Still set up and waiting after 2 s: the machine exists.
        Err(_) => {
            let _ = child.kill().await;
            Ok(())
        }
        Ok(_) => {
            let out = child.wait_with_output().await.map_err(|e| e.to_string())?;
            let err = String::from_utf8_lossy(&out.stderr);
            let err: String = err.trim().chars().take(300).collect();
            Err(format!(
                "qemu cannot set up a KVM machine with the host's CPU model: {}",
                if err.is_empty() {
                    "no output"
                } else {
                    err.as_str()
                }
            ))
        }
    }
}

/// Boots `kernel` under KVM with the host's CPU model and no init, so that a
/// working KVM ends in the kernel's panic (`panic=-1` and `-no-reboot` then
/// end QEMU) within [`PROBE_TIMEOUT`]. Where KVM is nested and cannot run a
/// guest, QEMU fails or hangs: `Err` says which.
async fn probe_kvm(
    launcher: Launcher,
    qemu: &Path,
    kernel: &Path,
    dir: &Path,
) -> Result<(), String> {
    let log = dir.join("kvm-probe.log");
    let _ = std::fs::remove_file(&log);
    // Under systemd the probe runs as the VMs do, as a transient service
    // (stopped by systemd itself if it outlives the timeout).
    let mut command = match launcher {
        Launcher::Direct => tokio::process::Command::new(qemu),
        Launcher::Systemd => {
            let mut c = tokio::process::Command::new("systemd-run");
            c.args([
                "--wait",
                "--pipe",
                "--collect",
                "--quiet",
                "--unit=novacron-kvm-probe.service",
                &format!("--property=RuntimeMaxSec={}", PROBE_TIMEOUT.as_secs() + 5),
                "--",
            ])
            .arg(qemu);
            c
        }
    };
    let child = command
        .args([
            "-machine",
            "q35",
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-m",
            "128M",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
        ])
        .arg(kernel)
        .args([
            "-append",
            "console=ttyS0 panic=-1 init=/novacron-kvm-probe rdinit=/novacron-kvm-probe",
            "-serial",
        ])
        .arg(format!("file:{}", log.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{}: {e}", qemu.display()))?;
    let out = tokio::time::timeout(PROBE_TIMEOUT, child.wait_with_output()).await;
    let console = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    match out {
        Err(_) => Err(format!(
            "a guest kernel under KVM did not reach its init within {PROBE_TIMEOUT:?} (nested KVM?)"
        )),
        Ok(Err(e)) => Err(format!("{}: {e}", qemu.display())),
        Ok(Ok(_)) if console.contains("Kernel panic") || console.contains("No working init") => {
            Ok(())
        }
        Ok(Ok(o)) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let err = err.trim();
            Err(format!(
                "qemu under KVM ended before the guest kernel ran: {}",
                if err.is_empty() {
                    "no output"
                } else {
                    &err[..err.len().min(300)]
                }
            ))
        }
    }
}

/// The last lines systemd's journal holds of `unit`, for an error message.
async fn journal_tail(unit: &str) -> String {
    let out = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::process::Command::new("journalctl")
            .args(["--no-pager", "-o", "cat", "-n", "10", "-u", unit])
            .kill_on_drop(true)
            .output(),
    )
    .await;
    match out {
        Ok(Ok(o)) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let text = text.trim();
            if text.is_empty() {
                String::new()
            } else {
                let text: String = text.chars().take(1000).collect();
                format!(" (journal of {unit}: {text})")
            }
        }
        _ => format!(" (see journalctl -u {unit})"),
    }
}

pub(super) fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                let rest = &s[s.rfind(')')? + 1..];
                rest.split_whitespace().next().map(|st| st != "Z")
            })
            .unwrap_or(false)
}

pub(super) async fn wait_gone(pid: i32, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    !alive(pid)
}

pub(super) fn kill(pid: i32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

pub(super) fn find_on_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn daemon(op: &'static str, message: String) -> RuntimeError {
    RuntimeError::Daemon { op, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_takes_passthrough_gpus_and_refuses_the_driver_s() {
        assert_eq!(
            passthrough_gpus(&["VFIO-0000:65:00.0".into(), "VFIO-0000:66:00.0".into()]),
            Ok(vec!["0000:65:00.0".to_owned(), "0000:66:00.0".to_owned()])
        );
        assert_eq!(passthrough_gpus(&[]), Ok(vec![]));
        let why = passthrough_gpus(&["GPU-1234".into()]).expect_err("NVIDIA's");
        assert!(
            why.contains("GPU-1234") && why.contains("vfio-pci"),
            "{why}"
        );
    }

    #[test]
    fn cpu_ticks_and_tails() {
        let stat =
            "1234 (qemu-system-x86) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(proc_cpu_ticks(stat), Some(300));
        assert_eq!(last_lines(b"a\nb\nc\n", 2), b"b\nc\n".to_vec());
        assert_eq!(last_lines(b"a\nb\nc\n", 0), b"a\nb\nc\n".to_vec());
        assert_eq!(last_lines(b"a", 5), b"a".to_vec());
        assert!(is_vm("vm-x") && !is_vm("0123abcd"));
    }
}

//! The QEMU command line of a virtual machine, and the parsing of what QEMU
//! says about itself. Pure: no I/O.

use std::net::Ipv4Addr;
use std::path::Path;

use novacron_common::wire::{PortMapping, VmSpec};

/// The accelerator a guest runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualisation (`/dev/kvm`).
    Kvm,
    /// QEMU's translator: slow, but boots anywhere.
    Tcg,
}

impl Accel {
    /// `kvm` or `tcg`, as QEMU and the node's capabilities name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The TCG translation cache's size, MiB (`-accel tcg,tb-size=`).
pub const TCG_TB_MIB: u64 = 128;

/// Where the files of one VM are, for its command line.
#[derive(Debug, Clone)]
pub struct Paths<'a> {
    /// The kernel.
    pub kernel: &'a Path,
    /// The initrd, if any.
    pub initrd: Option<&'a Path>,
    /// The VM's own disk (a copy-on-write overlay), if any.
    pub disk: Option<&'a Path>,
    /// The NoCloud seed directory (`user-data`, `meta-data`), if any: given
    /// to the guest as a read-only FAT disk labelled `cidata` (QEMU's vvfat).
    pub seed: Option<&'a Path>,
    /// The QMP socket.
    pub qmp: &'a Path,
    /// The serial console's log (everything the guest prints).
    pub serial: &'a Path,
    /// The serial console's socket: a client (`novacron vm console -i`)
    /// reads what the guest prints and types into it.
    pub console: &'a Path,
    /// Where QEMU writes its process id.
    pub pidfile: &'a Path,
}

/// One forwarded TCP or UDP port: host `address:host_port` to guest `guest_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    /// The host address to listen on.
    pub address: Ipv4Addr,
    /// The host port.
    pub host_port: u16,
    /// The guest port.
    pub guest_port: u16,
    /// UDP instead of TCP.
    pub udp: bool,
}

/// The forwards of a VM: each port of the task on the VM's own loopback address
/// (`address:port`, where health checks and the node reach it, as they reach a
/// container at its bridge address), and each published port on
/// `publish:host_port` as well.
pub fn forwards(address: Ipv4Addr, publish: Ipv4Addr, ports: &[PortMapping]) -> Vec<Forward> {
    let mut out = Vec::new();
    for p in ports {
        out.push(Forward {
            address,
            host_port: p.container_port,
            guest_port: p.container_port,
            udp: p.udp,
        });
        if let Some(host_port) = p.host_port {
            out.push(Forward {
                address: publish,
                host_port,
                guest_port: p.container_port,
                udp: p.udp,
            });
        }
    }
    out
}

/// How a guest is networked on its command line.
#[derive(Debug, Clone, Copy)]
pub enum Net<'a> {
    /// QEMU's user-mode network with these forwards.
    User(&'a [Forward]),
    /// A tap device on the node's VM bridge ([`super::bridge`]).
    Tap {
        /// The tap device.
        ifname: &'a str,
        /// The guest's MAC address.
        mac: &'a str,
        /// What the kernel command line gains (the guest's `ip=`).
        kernel_arg: &'a str,
    },
}

/// The arguments of `qemu-system-x86_64` for `vm`: direct kernel boot, no
/// default devices, the serial console to a file, QMP on a Unix socket, the
/// network `net`, and `-no-shutdown` (a guest that powers off stays as a
/// stopped process, so its clean exit can be told from a crash). The process
/// daemonizes once the machine is set up.
pub fn args(vm: &VmSpec, accel: Accel, paths: &Paths<'_>, net: Net<'_>) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));
    let machine = if vm.machine.is_empty() {
        "q35"
    } else {
        vm.machine.as_str()
    };
    match accel {
        // TCG's translation cache grows to 1 GiB by default (QEMU 7.2), on top
        // of the guest's memory: a busy guest (a node guest's systemd, Docker
        // and agent) then pushes QEMU past its cgroup's limit. Bounded, QEMU's
        // overhead is what `cgroup::overhead` reserves.
        Accel::Tcg => push(&[
            "-machine",
            machine,
            "-accel",
            &format!("tcg,tb-size={TCG_TB_MIB}"),
        ]),
        Accel::Kvm => push(&["-machine", machine, "-accel", accel.as_str()]),
    }
    if accel == Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&[
        "-smp",
        &vm.vcpus.max(1).to_string(),
        "-m",
        &format!("{}M", vm.memory_mib.max(16)),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-shutdown",
    ]);
    push(&["-kernel", &paths.kernel.to_string_lossy()]);
    if let Some(initrd) = paths.initrd {
        push(&["-initrd", &initrd.to_string_lossy()]);
    }
    let cmdline = match net {
        Net::Tap { kernel_arg, .. } if !vm.cmdline.is_empty() => {
            format!("{} {kernel_arg}", vm.cmdline)
        }
        Net::Tap { kernel_arg, .. } => kernel_arg.to_owned(),
        Net::User(_) => vm.cmdline.clone(),
    };
    if !cmdline.is_empty() {
        push(&["-append", &cmdline]);
    }
    if let Some(disk) = paths.disk {
        push(&[
            "-drive",
            &format!(
                "file={},if=virtio,format=qcow2,cache=writeback{}",
                escape(&disk.to_string_lossy()),
                throttling(vm)
            ),
        ]);
    }
    if let Some(seed) = paths.seed {
        push(&[
            "-drive",
            &format!(
                "if=virtio,format=raw,file=fat:{},file.label=cidata,readonly=on",
                escape(&seed.to_string_lossy())
            ),
        ]);
    }
    let (netdev, mac) = match net {
        Net::User(forwards) => {
            let mut netdev = String::from("user,id=n0");
            for f in forwards {
                netdev.push_str(&format!(
                    ",hostfwd={}:{}:{}-:{}",
                    if f.udp { "udp" } else { "tcp" },
                    f.address,
                    f.host_port,
                    f.guest_port
                ));
            }
            (netdev, String::new())
        }
        Net::Tap { ifname, mac, .. } => (
            format!("tap,id=n0,ifname={ifname},script=no,downscript=no"),
            format!(",mac={mac}"),
        ),
    };
    let nic = if machine == "microvm" {
        format!("virtio-net-device,netdev=n0{mac}")
    } else {
        format!("virtio-net-pci,netdev=n0{mac}")
    };
    push(&["-netdev", &netdev, "-device", &nic]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            escape(&paths.console.to_string_lossy()),
            escape(&paths.serial.to_string_lossy())
        ),
        "-serial",
        "chardev:serial0",
        "-qmp",
        &format!(
            "unix:{},server=on,wait=off",
            escape(&paths.qmp.to_string_lossy())
        ),
        "-pidfile",
        &paths.pidfile.to_string_lossy(),
        "-daemonize",
    ]);
    a
}

/// The disk's I/O limits as `-drive` options (QEMU's throttling: reads and
/// writes together), empty when it has none.
fn throttling(vm: &VmSpec) -> String {
    let mut out = String::new();
    if vm.disk_bytes_per_sec > 0 {
        out.push_str(&format!(",throttling.bps-total={}", vm.disk_bytes_per_sec));
    }
    if vm.disk_iops > 0 {
        out.push_str(&format!(",throttling.iops-total={}", vm.disk_iops));
    }
    out
}

/// How QEMU processes are started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// As the agent's own children (daemonized, so they outlive it).
    Direct,
    /// As transient systemd services (`systemd-run`), where systemd is PID 1: a
    /// VM then lives in its own unit and cgroup, outside the agent's sandbox
    /// (TCG needs writable and executable memory, which the agent's unit denies)
    /// and its restarts.
    Systemd,
}

/// The systemd unit of a VM.
pub fn unit_name(id: &str) -> String {
    format!("novacron-{id}.service")
}

/// The program and arguments that start QEMU with `args` for VM `id`.
pub fn launch(
    launcher: Launcher,
    qemu: &Path,
    id: &str,
    pidfile: &Path,
    args: &[String],
    properties: &[String],
) -> (String, Vec<String>) {
    let qemu = qemu.to_string_lossy().into_owned();
    match launcher {
        Launcher::Direct => (qemu, args.to_vec()),
        Launcher::Systemd => {
            let mut a = vec![
                format!("--unit={}", unit_name(id)),
                format!("--description=NovaCron virtual machine {id}"),
                "--collect".to_owned(),
                "--quiet".to_owned(),
                "--property=Type=forking".to_owned(),
                format!("--property=PIDFile={}", pidfile.display()),
                "--property=KillMode=mixed".to_owned(),
                "--property=TimeoutStopSec=30".to_owned(),
            ];
            // The VM's limits (`cgroup::Limits::systemd_properties`).
            a.extend(properties.iter().cloned());
            a.extend(["--".to_owned(), qemu]);
            a.extend(args.iter().cloned());
            ("systemd-run".to_owned(), a)
        }
    }
}

/// QEMU's option values separate by `,`; a literal comma is written twice.
fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// The version in `qemu-system-x86_64 --version`'s first line
/// (`QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)` → `7.2.19`).
pub fn parse_version(output: &str) -> Option<String> {
    let line = output.lines().next()?;
    let rest = line.split("version ").nth(1)?;
    let version = rest.split_whitespace().next()?;
    (!version.is_empty()).then(|| version.to_owned())
}

/// A loopback address of the VM's own in `127.100.0.0/16`, from its name: the
/// guest's ports are forwarded there, so that each VM can use any port. `taken`
/// are the addresses of the other VMs; the next free one is chosen on a collision.
pub fn loopback_address(name: &str, taken: &[Ipv4Addr]) -> Ipv4Addr {
    // FNV-1a: stable across releases and platforms (the address is persisted anyway).
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    for i in 0..65_534u32 {
        let n = (h.wrapping_add(i) % 65_534) + 1;
        let addr = Ipv4Addr::new(127, 100, (n >> 8) as u8, (n & 0xff) as u8);
        if !taken.contains(&addr) {
            return addr;
        }
    }
    Ipv4Addr::new(127, 100, 0, 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn vm() -> VmSpec {
        VmSpec {
            vcpus: 2,
            memory_mib: 256,
            kernel: "/boot/vmlinuz".into(),
            initrd: Some("/boot/initrd.img".into()),
            cmdline: "console=ttyS0 quiet".into(),
            machine: "q35".into(),
            ..VmSpec::default()
        }
    }

    #[test]
    fn the_command_line_boots_the_kernel_with_forwards_and_qmp() {
        let k = PathBuf::from("/c/vmlinuz");
        let i = PathBuf::from("/c/initrd.img");
        let q = PathBuf::from("/v/a,b/qmp.sock");
        let s = PathBuf::from("/v/serial.log");
        let p = PathBuf::from("/v/qemu.pid");
        let seed = PathBuf::from("/v/seed");
        let paths = Paths {
            kernel: &k,
            initrd: Some(&i),
            disk: None,
            seed: Some(&seed),
            qmp: &q,
            serial: &s,
            console: &PathBuf::from("/v/console.sock"),
            pidfile: &p,
        };
        let ports = [PortMapping {
            name: "http".into(),
            container_port: 8080,
            host_port: Some(18080),
            udp: false,
        }];
        let fw = forwards(Ipv4Addr::new(127, 100, 1, 2), Ipv4Addr::UNSPECIFIED, &ports);
        let a = args(&vm(), Accel::Tcg, &paths, Net::User(&fw)).join(" ");
        assert!(
            a.starts_with("-machine q35 -accel tcg,tb-size=128 -smp 2 -m 256M"),
            "{a}"
        );
        assert!(!a.contains("-cpu host"), "{a}");
        assert!(
            a.contains("-kernel /c/vmlinuz -initrd /c/initrd.img"),
            "{a}"
        );
        assert!(a.contains("-append console=ttyS0 quiet"), "{a}");
        // The serial console: a socket to type into, and everything the guest
        // prints kept in the log.
        assert!(
            a.contains(
                "-chardev socket,id=serial0,path=/v/console.sock,server=on,wait=off,logfile=/v/serial.log,logappend=on -serial chardev:serial0"
            ),
            "{a}"
        );
        assert!(
            a.contains(
                "user,id=n0,hostfwd=tcp:127.100.1.2:8080-:8080,hostfwd=tcp:0.0.0.0:18080-:8080"
            ),
            "{a}"
        );
        assert!(
            a.contains("unix:/v/a,,b/qmp.sock,server=on,wait=off"),
            "{a}"
        );
        assert!(a.ends_with("-daemonize"), "{a}");
        let kvm = args(&vm(), Accel::Kvm, &paths, Net::User(&fw)).join(" ");
        assert!(kvm.contains("-accel kvm -cpu host"), "{kvm}");
        // On the VM bridge: the tap device, the guest's MAC, and its address
        // on the kernel's command line.
        let tap = Net::Tap {
            ifname: "nct0123",
            mac: "52:54:00:01:02:03",
            kernel_arg: "ip=10.215.0.9::10.215.0.1:255.255.0.0::eth0:off",
        };
        let bridged = args(&vm(), Accel::Tcg, &paths, tap).join(" ");
        assert!(
            bridged.contains(
                "-netdev tap,id=n0,ifname=nct0123,script=no,downscript=no -device virtio-net-pci,netdev=n0,mac=52:54:00:01:02:03"
            ),
            "{bridged}"
        );
        assert!(
            bridged.contains(
                "-append console=ttyS0 quiet ip=10.215.0.9::10.215.0.1:255.255.0.0::eth0:off"
            ),
            "{bridged}"
        );
        assert!(!bridged.contains("hostfwd"), "{bridged}");
    }

    #[test]
    fn a_disk_with_limits_is_throttled_by_qemu() {
        let (k, q, s, p, d) = (
            PathBuf::from("/c/vmlinuz"),
            PathBuf::from("/v/qmp.sock"),
            PathBuf::from("/v/serial.log"),
            PathBuf::from("/v/qemu.pid"),
            PathBuf::from("/v/disk.qcow2"),
        );
        let console = PathBuf::from("/v/console.sock");
        let paths = Paths {
            kernel: &k,
            initrd: None,
            disk: Some(&d),
            seed: None,
            qmp: &q,
            serial: &s,
            console: &console,
            pidfile: &p,
        };
        let limited = VmSpec {
            disk_bytes_per_sec: 4 << 20,
            disk_iops: 200,
            ..vm()
        };
        let a = args(&limited, Accel::Tcg, &paths, Net::User(&[])).join(" ");
        assert!(
            a.contains(
                "file=/v/disk.qcow2,if=virtio,format=qcow2,cache=writeback,throttling.bps-total=4194304,throttling.iops-total=200"
            ),
            "{a}"
        );
        let a = args(&vm(), Accel::Tcg, &paths, Net::User(&[])).join(" ");
        assert!(!a.contains("throttling"), "no limits, no throttling: {a}");
    }

    #[test]
    fn under_systemd_qemu_is_a_transient_service_of_its_own() {
        let args = vec!["-machine".to_owned(), "q35".to_owned()];
        let q = PathBuf::from("/usr/bin/qemu-system-x86_64");
        let p = PathBuf::from("/v/qemu.pid");
        let limits = vec![
            "--property=MemoryMax=268435456".to_owned(),
            "--property=CPUQuota=50%".to_owned(),
        ];
        assert_eq!(
            launch(Launcher::Direct, &q, "vm-1", &p, &args, &limits),
            ("/usr/bin/qemu-system-x86_64".to_owned(), args.clone())
        );
        let (program, a) = launch(Launcher::Systemd, &q, "vm-1", &p, &args, &limits);
        assert_eq!(program, "systemd-run");
        let a = a.join(" ");
        assert!(a.starts_with("--unit=novacron-vm-1.service "), "{a}");
        assert!(
            a.contains("--property=Type=forking --property=PIDFile=/v/qemu.pid"),
            "{a}"
        );
        assert!(
            a.contains("--property=MemoryMax=268435456 --property=CPUQuota=50% --"),
            "the unit carries the job's limits: {a}"
        );
        assert!(
            a.ends_with("-- /usr/bin/qemu-system-x86_64 -machine q35"),
            "{a}"
        );
    }

    #[test]
    fn versions_and_addresses() {
        assert_eq!(
            parse_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright")
                .as_deref(),
            Some("7.2.19")
        );
        assert_eq!(parse_version("nonsense"), None);
        let a = loopback_address("vm-a", &[]);
        assert_eq!(a.octets()[..2], [127, 100]);
        assert_eq!(loopback_address("vm-a", &[]), a, "stable");
        let b = loopback_address("vm-a", &[a]);
        assert_ne!(a, b, "a taken address is skipped");
        assert_ne!(b.octets()[2..], [0, 0]);
    }
}

//! GPU passthrough: GPUs that the host hands to `vfio-pci`, found in sysfs and
//! given whole to a guest (`-device vfio-pci,host=…`).
//!
//! A GPU is either the host's NVIDIA driver's (NVML sees it; containers use
//! it) or `vfio-pci`'s (NVML cannot see it; only a guest can use it). The
//! operator chooses by binding the device (`driverctl set-override <address>
//! vfio-pci`, or `vfio-pci.ids=` on the kernel's command line); the agent
//! reports the `vfio-pci` ones as passthrough GPUs ([`gpus`]), and the
//! scheduler gives them only to virtual machines.
//!
//! A device passes through with its whole IOMMU group: every endpoint of the
//! group must be bound to `vfio-pci` too (a GPU's audio function, typically),
//! and all of them go to the guest ([`group`]). Bridges in the group stay
//! with the host.

use std::path::Path;

use novacron_common::wire::GpuInfo;

/// The driver a passthrough device is bound to.
pub const VFIO_DRIVER: &str = "vfio-pci";

/// Where Debian (`pci.ids`) and other distributions (`hwdata`) keep the PCI
/// ID database, for model names.
const PCI_IDS: [&str; 2] = ["/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids"];

/// A PCI function as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDevice {
    /// Its address (`0000:65:00.0`).
    pub address: String,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code (`0x030200`: a 3D controller).
    pub class: u32,
    /// The driver bound to it, if any.
    pub driver: Option<String>,
    /// Its IOMMU group, where the kernel has an IOMMU.
    pub iommu_group: Option<String>,
}

impl PciDevice {
    /// A display controller (VGA, 3D, other): PCI base class 0x03.
    pub fn is_gpu(&self) -> bool {
        self.class >> 16 == 0x03
    }

    /// A PCI bridge (class 0x0604), which stays with the host.
    fn is_bridge(&self) -> bool {
        self.class >> 8 == 0x0604
    }

    fn bound_to_vfio(&self) -> bool {
        self.driver.as_deref() == Some(VFIO_DRIVER)
    }
}

fn hex<T: TryFrom<u64>>(text: &str) -> Option<T> {
    let t = text.trim();
    let t = t.strip_prefix("0x").unwrap_or(t);
    u64::from_str_radix(t, 16)
        .ok()
        .and_then(|v| T::try_from(v).ok())
}

/// The last component of the symbolic link `path` points to.
fn link_name(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// The PCI function at `address` under the sysfs root `sys` (`/sys`).
pub fn device(sys: &Path, address: &str) -> Result<PciDevice, String> {
    let dir = sys.join("bus/pci/devices").join(address);
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .map_err(|e| format!("PCI device {address}: {name}: {e}"))
    };
    let bad = |name: &str, text: &str| format!("PCI device {address}: {name}: {text:?} is not hex");
    let (vendor, device, class) = (read("vendor")?, read("device")?, read("class")?);
    Ok(PciDevice {
        address: address.to_owned(),
        vendor: hex(&vendor).ok_or_else(|| bad("vendor", &vendor))?,
        device: hex(&device).ok_or_else(|| bad("device", &device))?,
        class: hex(&class).ok_or_else(|| bad("class", &class))?,
        driver: link_name(&dir.join("driver")),
        iommu_group: link_name(&dir.join("iommu_group")),
    })
}

/// The PCI functions under `sys`, by address (unreadable ones left out).
pub fn devices(sys: &Path) -> Vec<PciDevice> {
    let Ok(entries) = std::fs::read_dir(sys.join("bus/pci/devices")) else {
        return Vec::new();
    };
    let mut out: Vec<PciDevice> = entries
        .flatten()
        .filter_map(|e| device(sys, &e.file_name().to_string_lossy()).ok())
        .collect();
    out.sort_by(|a, b| a.address.cmp(&b.address));
    out
}

/// The functions that go to a guest with the device at `address`: the
/// endpoints of its IOMMU group (itself first), each of which must be bound
/// to `vfio-pci`. `Err` says why it cannot pass through.
pub fn group(sys: &Path, address: &str) -> Result<Vec<String>, String> {
    let dev = device(sys, address)?;
    if !dev.bound_to_vfio() {
        return Err(format!(
            "PCI device {address} is bound to {}, not {VFIO_DRIVER} (bind it with `driverctl set-override {address} {VFIO_DRIVER}`)",
            dev.driver.as_deref().unwrap_or("no driver")
        ));
    }
    let Some(g) = &dev.iommu_group else {
        return Err(format!(
            "PCI device {address} is in no IOMMU group: the host runs without an IOMMU (enable VT-d or AMD-Vi, and intel_iommu=on on Intel)"
        ));
    };
    let members = std::fs::read_dir(sys.join("kernel/iommu_groups").join(g).join("devices"))
        .map_err(|e| format!("IOMMU group {g}: {e}"))?;
    let mut names: Vec<String> = members
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut out = vec![address.to_owned()];
    for name in names.into_iter().filter(|n| n != address) {
        let other = device(sys, &name)?;
        if other.is_bridge() {
            continue;
        }
        if !other.bound_to_vfio() {
            return Err(format!(
                "PCI device {address} shares IOMMU group {g} with {name}, which is bound to {}: the whole group passes through, so bind {name} to {VFIO_DRIVER} too",
                other.driver.as_deref().unwrap_or("no driver")
            ));
        }
        out.push(name);
    }
    Ok(out)
}

/// The name of `vendor:device` in a `pci.ids` database: `"<vendor> <device>"`.
pub fn pci_name(ids: &str, vendor: u16, device: u16) -> Option<String> {
    let (v, d) = (format!("{vendor:04x}"), format!("{device:04x}"));
    let mut vendor_name = None;
    for line in ids.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match (&vendor_name, line.strip_prefix('\t')) {
            (None, None) => {
                if let Some(name) = line
                    .strip_prefix(v.as_str())
                    .and_then(|r| r.strip_prefix("  "))
                {
                    vendor_name = Some(name.trim().to_owned());
                }
            }
            // The next vendor: the device is not listed.
            (Some(_), None) => break,
            (Some(vn), Some(rest)) if !rest.starts_with('\t') => {
                if let Some(name) = rest
                    .strip_prefix(d.as_str())
                    .and_then(|r| r.strip_prefix("  "))
                {
                    return Some(format!("{vn} {}", name.trim()));
                }
            }
            _ => {}
        }
    }
    vendor_name.map(|vn| format!("{vn} {d}"))
}

/// The GPUs under `sys` that can pass through to a guest, as the node offers
/// them: bound to `vfio-pci` with their whole group, indexed from
/// `first_index`, named from `ids` (a `pci.ids` text) where it lists them.
pub fn gpus(sys: &Path, ids: Option<&str>, first_index: u32) -> Vec<GpuInfo> {
    let mut out = Vec::new();
    for dev in devices(sys)
        .into_iter()
        .filter(|d| d.is_gpu() && d.bound_to_vfio())
    {
        if let Err(why) = group(sys, &dev.address) {
            tracing::warn!(%why, "a GPU bound to vfio-pci cannot pass through; it is not offered");
            continue;
        }
        let model = ids
            .and_then(|ids| pci_name(ids, dev.vendor, dev.device))
            .unwrap_or_else(|| format!("PCI {:04x}:{:04x}", dev.vendor, dev.device));
        out.push(GpuInfo {
            index: first_index + out.len() as u32,
            uuid: GpuInfo::vfio_uuid(&dev.address),
            model,
            memory_bytes: 0,
            vfio_address: Some(dev.address),
        });
    }
    out
}

/// The host's passthrough GPUs (`/sys`, names from the host's `pci.ids`).
pub fn host_gpus(first_index: u32) -> Vec<GpuInfo> {
    let ids = PCI_IDS.iter().find_map(|p| std::fs::read_to_string(p).ok());
    gpus(Path::new("/sys"), ids.as_deref(), first_index)
}

/// QEMU's arguments passing `functions` (PCI addresses) to the guest.
pub fn args(functions: &[String]) -> Vec<String> {
    functions
        .iter()
        .flat_map(|f| ["-device".to_owned(), format!("vfio-pci,host={f}")])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A PCI function: address, vendor, device, class, driver, IOMMU group.
    type Function<'a> = (&'a str, u16, u16, u32, Option<&'a str>, Option<&'a str>);

    /// A sysfs tree with PCI functions, as the kernel lays it out.
    fn sysfs(devs: &[Function<'_>]) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        let sys = root.path();
        for &(addr, vendor, device, class, driver, group) in devs {
            let real = sys.join("devices/pci0000:00").join(addr);
            std::fs::create_dir_all(&real).expect("dir");
            std::fs::write(real.join("vendor"), format!("0x{vendor:04x}\n")).expect("vendor");
            std::fs::write(real.join("device"), format!("0x{device:04x}\n")).expect("device");
            std::fs::write(real.join("class"), format!("0x{class:06x}\n")).expect("class");
            if let Some(d) = driver {
                let drv = sys.join("bus/pci/drivers").join(d);
                std::fs::create_dir_all(&drv).expect("driver dir");
                symlink(&drv, real.join("driver")).expect("driver link");
            }
            if let Some(g) = group {
                let gdir = sys.join("kernel/iommu_groups").join(g);
                std::fs::create_dir_all(gdir.join("devices")).expect("group dir");
                symlink(&gdir, real.join("iommu_group")).expect("group link");
                symlink(&real, gdir.join("devices").join(addr)).expect("member");
            }
            let bus = sys.join("bus/pci/devices");
            std::fs::create_dir_all(&bus).expect("bus");
            symlink(&real, bus.join(addr)).expect("bus link");
        }
        root
    }

    const IDS: &str = "# pci.ids\n\
        1234  Other Vendor\n\
        \t1111  Thing\n\
        10de  NVIDIA Corporation\n\
        \t2330  GH100 [H100 SXM5 80GB]\n\
        \t\t10de 16c1  H100 SXM5 80GB\n\
        \t2331  GH100 [H100 PCIe]\n\
        10df  Emulex Corporation\n";

    #[test]
    fn names_come_from_the_pci_id_database() {
        assert_eq!(
            pci_name(IDS, 0x10de, 0x2331).as_deref(),
            Some("NVIDIA Corporation GH100 [H100 PCIe]")
        );
        // A subsystem line is not a device.
        assert_eq!(
            pci_name(IDS, 0x10de, 0x16c1).as_deref(),
            Some("NVIDIA Corporation 16c1")
        );
        assert_eq!(pci_name(IDS, 0xabcd, 0x0001), None);
    }

    #[test]
    fn a_gpu_bound_to_vfio_with_its_group_passes_through_whole() {
        let root = sysfs(&[
            // A bridge in the group stays with the host.
            (
                "0000:64:00.0",
                0x8086,
                0x1234,
                0x060400,
                Some("pcieport"),
                Some("7"),
            ),
            (
                "0000:65:00.0",
                0x10de,
                0x2331,
                0x030200,
                Some("vfio-pci"),
                Some("7"),
            ),
            // The GPU's audio function.
            (
                "0000:65:00.1",
                0x10de,
                0x22a3,
                0x040300,
                Some("vfio-pci"),
                Some("7"),
            ),
            // A GPU of NVIDIA's driver: containers', not offered here.
            (
                "0000:66:00.0",
                0x10de,
                0x2331,
                0x030200,
                Some("nvidia"),
                Some("8"),
            ),
            // A network card bound to vfio-pci: not a GPU.
            (
                "0000:67:00.0",
                0x8086,
                0x1572,
                0x020000,
                Some("vfio-pci"),
                Some("9"),
            ),
        ]);
        let gpus = gpus(root.path(), Some(IDS), 2);
        assert_eq!(gpus.len(), 1, "{gpus:?}");
        let g = &gpus[0];
        assert_eq!(g.index, 2);
        assert_eq!(g.uuid, "VFIO-0000:65:00.0");
        assert_eq!(g.model, "NVIDIA Corporation GH100 [H100 PCIe]");
        assert_eq!(g.vfio_address.as_deref(), Some("0000:65:00.0"));
        assert!(g.is_passthrough());
        assert_eq!(
            group(root.path(), "0000:65:00.0").expect("passes through"),
            ["0000:65:00.0", "0000:65:00.1"]
        );
        assert_eq!(
            args(&group(root.path(), "0000:65:00.0").expect("group")),
            [
                "-device",
                "vfio-pci,host=0000:65:00.0",
                "-device",
                "vfio-pci,host=0000:65:00.1"
            ]
        );
    }

    #[test]
    fn a_group_half_bound_or_no_iommu_is_refused_with_the_fix() {
        let root = sysfs(&[
            (
                "0000:65:00.0",
                0x10de,
                0x2331,
                0x030200,
                Some("vfio-pci"),
                Some("7"),
            ),
            (
                "0000:65:00.1",
                0x10de,
                0x22a3,
                0x040300,
                Some("snd_hda_intel"),
                Some("7"),
            ),
            (
                "0000:70:00.0",
                0x10de,
                0x2331,
                0x030200,
                Some("vfio-pci"),
                None,
            ),
            (
                "0000:71:00.0",
                0x10de,
                0x2331,
                0x030200,
                Some("nvidia"),
                Some("9"),
            ),
        ]);
        let sys = root.path();
        let half = group(sys, "0000:65:00.0").expect_err("half bound");
        assert!(
            half.contains("0000:65:00.1") && half.contains("snd_hda_intel"),
            "{half}"
        );
        let no_iommu = group(sys, "0000:70:00.0").expect_err("no IOMMU");
        assert!(no_iommu.contains("no IOMMU group"), "{no_iommu}");
        let host = group(sys, "0000:71:00.0").expect_err("NVIDIA's");
        assert!(
            host.contains("bound to nvidia") && host.contains("driverctl"),
            "{host}"
        );
        let missing = group(sys, "0000:99:00.0").expect_err("no such device");
        assert!(missing.contains("0000:99:00.0"), "{missing}");
        // None of them is offered, and no name database is needed for that.
        assert!(gpus(sys, None, 0).is_empty());
    }

    #[test]
    fn a_gpu_the_database_does_not_name_is_named_by_its_ids() {
        let root = sysfs(&[(
            "0000:65:00.0",
            0x1002,
            0x740f,
            0x038000,
            Some("vfio-pci"),
            Some("3"),
        )]);
        let gpus = gpus(root.path(), Some(IDS), 0);
        assert_eq!(gpus[0].model, "PCI 1002:740f");
    }

    /// The host's own PCI devices, read as the agent reads them: whatever is
    /// offered is a display controller bound to vfio-pci (on this project's
    /// machines, which have no GPU, nothing is).
    #[test]
    fn the_hosts_devices_are_read_and_only_vfio_gpus_are_offered() {
        let all = devices(Path::new("/sys"));
        for g in host_gpus(0) {
            let addr = g.vfio_address.clone().expect("an address");
            let d = all.iter().find(|d| d.address == addr).expect("listed");
            assert!(d.is_gpu() && d.bound_to_vfio(), "{d:?}");
        }
        if Path::new("/sys/bus/pci/devices").is_dir() {
            assert!(!all.is_empty(), "sysfs lists PCI devices but none was read");
        }
    }
}

//! Host readings from the operating system, through `sysinfo`.
//!
//! [`SysinfoCollector`] creates its `sysinfo` objects once and refreshes in place only
//! what a [`NodeSample`] carries: CPU usage (`/proc/stat`), memory (`/proc/meminfo`),
//! the mounted filesystems with their sizes and I/O counters (`/proc/mounts`,
//! `statvfs`, `/proc/diskstats`) and the network interfaces' byte counters
//! (`/sys/class/net`). Processes are never listed.
//!
//! The choices that do not touch the OS are pure functions below
//! (`rate_per_sec`, filesystem and interface selection, the rate bookkeeping) and are
//! unit-tested on their own.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use novacron_common::wire::{
    CpuSample, CpuSeconds, DiskSample, MemorySample, NetworkSample, NodeSample,
};
use sysinfo::{DiskRefreshKind, Disks, MemoryRefreshKind, Networks, System};

use super::HostCollector;

/// The most filesystems one sample reports.
pub const MAX_DISKS: usize = 32;
/// The most network interfaces one sample reports.
pub const MAX_INTERFACES: usize = 64;

/// Why host metrics cannot be collected.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// `sysinfo` cannot read this operating system's metrics.
    #[error("host metrics are not supported on this platform: {0}")]
    Unsupported(#[source] sysinfo::Error),
}

/// Reads the real host through `sysinfo`.
#[derive(Debug)]
pub struct SysinfoCollector {
    system: System,
    disks: Disks,
    networks: Networks,
    /// When the previous reading was taken; `None` before the first.
    last: Option<Instant>,
    /// Cumulative `[read, written]` bytes per block device.
    disk_io: RateTracker,
    /// Cumulative `[received, transmitted]` bytes per interface.
    net_io: RateTracker,
    /// The CPU seconds last reported, so that no mode goes backwards.
    cpu_seconds: Option<CpuSeconds>,
}

impl SysinfoCollector {
    /// Creates the `sysinfo` handles and takes a first CPU reading, so that a first
    /// [`HostCollector::collect`] at least 200 ms later reports CPU usage since now (an
    /// earlier one reports 0, like the rates).
    pub fn new() -> Result<Self, HostError> {
        let mut system = System::new().map_err(HostError::Unsupported)?;
        system.refresh_cpu_usage();
        Ok(SysinfoCollector {
            system,
            disks: Disks::new().map_err(HostError::Unsupported)?,
            networks: Networks::new().map_err(HostError::Unsupported)?,
            last: None,
            disk_io: RateTracker::default(),
            net_io: RateTracker::default(),
            cpu_seconds: None,
        })
    }

    fn cpu(&self) -> CpuSample {
        let load = System::load_average().map_or([0.0; 3], |l| {
            [l.one as f32, l.five as f32, l.fifteen as f32]
        });
        let per_core_percent: Vec<f32> = self
            .system
            .cpus()
            .iter()
            .map(|c| clamp_percent(c.usage()))
            .collect();
        CpuSample {
            total_percent: mean_percent(&per_core_percent),
            per_core_percent,
            load,
            seconds_total: std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|stat| parse_cpu_seconds(&stat, rustix::param::clock_ticks_per_second())),
        }
    }

    fn memory(&self) -> MemorySample {
        let total = self.system.total_memory();
        let available = self.system.available_memory();
        let swap_total = self.system.total_swap();
        MemorySample {
            total_bytes: total,
            used_bytes: total.saturating_sub(available),
            available_bytes: available,
            swap_total_bytes: swap_total,
            swap_used_bytes: swap_total.saturating_sub(self.system.free_swap()),
        }
    }

    fn disks(&mut self, elapsed: Option<Duration>) -> Vec<DiskSample> {
        let readings = self.disks.iter().map(|d| {
            let usage = d.usage();
            DiskReading {
                device: d.name().to_string_lossy(),
                fs_type: d.file_system().to_string_lossy(),
                mount: d.mount_point().to_string_lossy(),
                total_bytes: d.total_space(),
                available_bytes: d.available_space(),
                read_total: usage.total_read_bytes,
                written_total: usage.total_written_bytes,
            }
        });
        let selected = select_disks(readings.collect());
        let out = selected
            .into_iter()
            .map(|d| {
                let [read, written] =
                    self.disk_io
                        .rates(&d.device, [d.read_total, d.written_total], elapsed);
                // One statvfs for size, used and available, so that they agree
                // with each other and with `df`; sysinfo has no free-block count.
                let usage = statvfs_usage(&d.mount).unwrap_or(DfUsage {
                    total_bytes: d.total_bytes,
                    used_bytes: d.total_bytes.saturating_sub(d.available_bytes),
                    available_bytes: d.available_bytes,
                });
                DiskSample {
                    mount: d.mount.into_owned(),
                    device: d.device.into_owned(),
                    total_bytes: usage.total_bytes,
                    available_bytes: usage.available_bytes,
                    used_bytes: usage.used_bytes,
                    read_bytes_per_sec: read,
                    written_bytes_per_sec: written,
                    read_bytes_total: Some(d.read_total),
                    written_bytes_total: Some(d.written_total),
                }
            })
            .collect();
        self.disk_io.finish();
        out
    }

    fn networks(&mut self, elapsed: Option<Duration>) -> Vec<NetworkSample> {
        let readings = self.networks.iter().map(|(name, data)| NetReading {
            interface: name.to_string_lossy(),
            rx_total: data.total_received(),
            tx_total: data.total_transmitted(),
        });
        let selected = select_interfaces(readings.collect());
        let out = selected
            .into_iter()
            .map(|n| {
                let [rx, tx] = self
                    .net_io
                    .rates(&n.interface, [n.rx_total, n.tx_total], elapsed);
                NetworkSample {
                    interface: n.interface.into_owned(),
                    rx_bytes_per_sec: rx,
                    tx_bytes_per_sec: tx,
                    rx_bytes_total: Some(n.rx_total),
                    tx_bytes_total: Some(n.tx_total),
                }
            })
            .collect();
        self.net_io.finish();
        out
    }
}

impl HostCollector for SysinfoCollector {
    fn collect(&mut self, now: Instant) -> NodeSample {
        self.system.refresh_cpu_usage();
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram().with_swap());
        self.disks.refresh_specifics(
            true,
            DiskRefreshKind::nothing().with_storage().with_io_usage(),
        );
        self.networks.refresh(true);

        let elapsed = self.last.map(|prev| now.saturating_duration_since(prev));
        self.last = Some(now);

        let mut cpu = self.cpu();
        cpu.seconds_total = cpu
            .seconds_total
            .map(|cur| never_backwards(self.cpu_seconds.as_ref(), cur));
        self.cpu_seconds = cpu.seconds_total.clone();
        NodeSample {
            cpu,
            memory: self.memory(),
            disks: self.disks(elapsed),
            networks: self.networks(elapsed),
            uptime_secs: System::uptime().unwrap_or_default(),
            ..NodeSample::default()
        }
    }
}

/// A filesystem's space as `df` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DfUsage {
    /// Size: all blocks.
    total_bytes: u64,
    /// Used: all blocks less the free ones.
    used_bytes: u64,
    /// Available to unprivileged users: the free blocks less those reserved for
    /// root.
    available_bytes: u64,
}

/// `df`'s Size, Used and Avail from `statvfs` counts (`f_blocks`, `f_bfree`,
/// `f_bavail`, in units of `f_frsize`). Pure.
fn df_usage(blocks: u64, free: u64, available: u64, fragment_size: u64) -> DfUsage {
    let bytes = |n: u64| n.saturating_mul(fragment_size);
    DfUsage {
        total_bytes: bytes(blocks),
        used_bytes: bytes(blocks.saturating_sub(free)),
        available_bytes: bytes(available.min(free)),
    }
}

/// The space of the filesystem mounted at `mount`, by `statvfs`; `None` when it
/// cannot be read (gone, or no permission).
fn statvfs_usage(mount: &str) -> Option<DfUsage> {
    let st = rustix::fs::statvfs(mount).ok()?;
    Some(df_usage(st.f_blocks, st.f_bfree, st.f_bavail, st.f_frsize))
}

/// The operating system and kernel, for display: `Linux (Debian GNU/Linux 12), kernel
/// 6.1.0-18-amd64`.
pub(crate) fn os_description() -> String {
    let os = System::long_os_version().unwrap_or_else(|_| std::env::consts::OS.to_owned());
    match System::kernel_version() {
        Ok(kernel) => format!("{os}, kernel {kernel}"),
        Err(_) => os,
    }
}

/// The host's CPU time by mode from the aggregate `cpu` line of `/proc/stat`
/// (`cpu user nice system idle iowait irq softirq steal ...`, in clock ticks);
/// `None` when the line is missing or malformed. Kernels before 2.6.11 lack the
/// last fields, which count as 0.
pub(crate) fn parse_cpu_seconds(stat: &str, ticks_per_second: u64) -> Option<CpuSeconds> {
    if ticks_per_second == 0 {
        return None;
    }
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let mut ticks = [0u64; 8];
    let mut fields = line.split_ascii_whitespace().skip(1);
    for (i, slot) in ticks.iter_mut().enumerate() {
        match fields.next() {
            Some(f) => *slot = f.parse().ok()?,
            // user, nice, system and idle are always there.
            None if i >= 4 => break,
            None => return None,
        }
    }
    let s = |t: u64| t as f64 / ticks_per_second as f64;
    Some(CpuSeconds {
        user: s(ticks[0]),
        nice: s(ticks[1]),
        system: s(ticks[2]),
        idle: s(ticks[3]),
        iowait: s(ticks[4]),
        irq: s(ticks[5]),
        softirq: s(ticks[6]),
        steal: s(ticks[7]),
    })
}

/// `cur` with every mode at least what `prev` reported. The kernel's idle and
/// iowait times can go down between two reads of `/proc/stat` (proc(5): "the
/// value in this field may decrease"); a counter that decreases reads as a
/// reset to Prometheus' `rate()` and to the controller, so a mode that went
/// back keeps its previous value until the kernel's catches up (node_exporter
/// does the same).
pub(crate) fn never_backwards(prev: Option<&CpuSeconds>, cur: CpuSeconds) -> CpuSeconds {
    let Some(p) = prev else {
        return cur;
    };
    CpuSeconds {
        user: cur.user.max(p.user),
        nice: cur.nice.max(p.nice),
        system: cur.system.max(p.system),
        idle: cur.idle.max(p.idle),
        iowait: cur.iowait.max(p.iowait),
        irq: cur.irq.max(p.irq),
        softirq: cur.softirq.max(p.softirq),
        steal: cur.steal.max(p.steal),
    }
}

/// The per-second rate of a cumulative counter that went from `prev` to `cur` in
/// `elapsed`. A counter that went backwards (wrapped, or reset when a device came
/// back) and a zero interval both give 0.
pub(crate) fn rate_per_sec(prev: u64, cur: u64, elapsed: Duration) -> u64 {
    let nanos = elapsed.as_nanos();
    if cur < prev || nanos == 0 {
        return 0;
    }
    let per_sec = u128::from(cur - prev) * 1_000_000_000 / nanos;
    u64::try_from(per_sec).unwrap_or(u64::MAX)
}

/// Whole-host usage as the mean of the per-core figures. (sysinfo's own global figure
/// is the same over an interval, but on the very first refresh it is the average since
/// boot while the per-core figures are 0; the mean keeps the two consistent.)
fn mean_percent(per_core: &[f32]) -> f32 {
    if per_core.is_empty() {
        return 0.0;
    }
    clamp_percent(per_core.iter().sum::<f32>() / per_core.len() as f32)
}

/// Usage as reported, but always a finite number in 0–100.
fn clamp_percent(p: f32) -> f32 {
    if p.is_finite() {
        p.clamp(0.0, 100.0)
    } else {
        0.0
    }
}

/// Whether a mount is a real filesystem on a block device (or a ZFS dataset), as
/// opposed to a pseudo, memory or container-layer filesystem.
fn is_real_filesystem(device: &str, fs_type: &str) -> bool {
    const PSEUDO: &[&str] = &[
        "overlay",
        "aufs",
        "tmpfs",
        "ramfs",
        "devtmpfs",
        "squashfs",
        "proc",
        "sysfs",
        "cgroup",
        "cgroup2",
        "devpts",
        "mqueue",
        "hugetlbfs",
        "debugfs",
        "tracefs",
        "securityfs",
        "configfs",
        "pstore",
        "bpf",
        "binfmt_misc",
        "fusectl",
        "autofs",
        "nsfs",
        "efivarfs",
        "rpc_pipefs",
        "iso9660",
    ];
    // FUSE filesystems are userspace views, except `fuseblk` (NTFS and the like on a
    // real block device).
    if PSEUDO.contains(&fs_type) || (fs_type.starts_with("fuse") && fs_type != "fuseblk") {
        return false;
    }
    // Loop devices back snaps and images, not data disks.
    (device.starts_with("/dev/") && !device.starts_with("/dev/loop")) || fs_type == "zfs"
}

/// Whether an interface carries the node's own traffic: not loopback, not the host
/// end of a container's veth pair.
fn is_reported_interface(name: &str) -> bool {
    name != "lo" && !name.starts_with("veth")
}

/// One filesystem as `sysinfo` lists it.
#[derive(Debug, Clone, PartialEq)]
struct DiskReading<'a> {
    device: Cow<'a, str>,
    fs_type: Cow<'a, str>,
    mount: Cow<'a, str>,
    total_bytes: u64,
    available_bytes: u64,
    read_total: u64,
    written_total: u64,
}

/// Keeps real, non-empty filesystems, one per device (the one with the shortest mount
/// path, so `/` wins over bind mounts of the same filesystem), sorted by mount point,
/// at most [`MAX_DISKS`].
fn select_disks(mut disks: Vec<DiskReading<'_>>) -> Vec<DiskReading<'_>> {
    disks.retain(|d| d.total_bytes > 0 && is_real_filesystem(&d.device, &d.fs_type));
    disks.sort_by(|a, b| {
        (&a.device, a.mount.len(), &a.mount).cmp(&(&b.device, b.mount.len(), &b.mount))
    });
    disks.dedup_by(|later, first| later.device == first.device);
    disks.sort_by(|a, b| a.mount.cmp(&b.mount));
    disks.truncate(MAX_DISKS);
    disks
}

/// One interface's cumulative byte counters.
#[derive(Debug, Clone, PartialEq)]
struct NetReading<'a> {
    interface: Cow<'a, str>,
    rx_total: u64,
    tx_total: u64,
}

/// Keeps reported interfaces, sorted by name, at most [`MAX_INTERFACES`].
fn select_interfaces(mut nets: Vec<NetReading<'_>>) -> Vec<NetReading<'_>> {
    nets.retain(|n| is_reported_interface(&n.interface));
    nets.sort_by(|a, b| a.interface.cmp(&b.interface));
    nets.truncate(MAX_INTERFACES);
    nets
}

/// Turns pairs of cumulative counters, keyed by device or interface, into rates.
///
/// Each reading calls [`RateTracker::rates`] once per key, then
/// [`RateTracker::finish`]; keys not seen in a reading are forgotten, so the tracker
/// holds at most one reading's worth of keys. Steady state allocates nothing.
#[derive(Debug, Default)]
struct RateTracker {
    prev: HashMap<String, [u64; 2]>,
    next: HashMap<String, [u64; 2]>,
}

impl RateTracker {
    /// The rates of `key`'s counters since the previous reading, `elapsed` ago (`None`
    /// on the first reading). A key new in this reading gives 0.
    fn rates(&mut self, key: &str, cur: [u64; 2], elapsed: Option<Duration>) -> [u64; 2] {
        let (key, prev) = match self.prev.remove_entry(key) {
            Some((key, prev)) => (key, Some(prev)),
            None => (key.to_owned(), None),
        };
        let out = match (prev, elapsed) {
            (Some(prev), Some(elapsed)) => [
                rate_per_sec(prev[0], cur[0], elapsed),
                rate_per_sec(prev[1], cur[1], elapsed),
            ],
            _ => [0, 0],
        };
        self.next.insert(key, cur);
        out
    }

    /// Ends a reading: its counters become the baseline of the next one.
    fn finish(&mut self) {
        std::mem::swap(&mut self.prev, &mut self.next);
        self.next.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meminfo_total_bytes() -> u64 {
        let meminfo = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo is readable");
        let line = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .expect("/proc/meminfo has MemTotal");
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .expect("MemTotal is a number of kB");
        kib * 1024
    }

    fn logical_cpus() -> usize {
        std::fs::read_to_string("/proc/cpuinfo")
            .expect("/proc/cpuinfo is readable")
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count()
    }

    /// Regression (issue 15): the node reported 70% of `/` used where `df`
    /// showed 16%, because it counted the blocks reserved for root (here
    /// 169 GB of a 264 GB disk) as used. Every reported filesystem's size, used
    /// and available space and `Use%` match `df`'s, read on this machine.
    #[test]
    fn disk_usage_matches_df() {
        let mut host = SysinfoCollector::new().expect("sysinfo supports Linux");
        let s = host.collect(Instant::now());
        let out = std::process::Command::new("df")
            .args(["-B1", "--output=target,size,used,avail,pcent"])
            .output()
            .expect("df runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let df = String::from_utf8_lossy(&out.stdout);
        assert!(!s.disks.is_empty(), "no real disk in {:?}", s.disks);
        for d in &s.disks {
            let line = df
                .lines()
                .skip(1)
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|f| f.len() == 5 && f[0] == d.mount)
                .unwrap_or_else(|| panic!("{} not in df's output:\n{df}", d.mount));
            let n = |i: usize| line[i].parse::<u64>().expect("df prints bytes");
            let (size, used, avail) = (n(1), n(2), n(3));
            let pcent: u64 = line[4].trim_end_matches('%').parse().expect("a percent");
            assert_eq!(d.total_bytes, size, "{}: size", d.mount);
            // Files change between the two readings: allow 64 MiB or 0.1%.
            let slack = (64 << 20).max(size / 1000);
            assert!(
                d.used().abs_diff(used) <= slack,
                "{}: used {} vs df {used}",
                d.mount,
                d.used()
            );
            assert!(
                d.available_bytes.abs_diff(avail) <= slack,
                "{}: available {} vs df {avail}",
                d.mount,
                d.available_bytes
            );
            let ours = d.use_percent().expect("a filesystem with space");
            assert!(
                ours.abs_diff(pcent) <= 1,
                "{}: {ours}% vs df {pcent}%",
                d.mount
            );
        }
    }

    #[test]
    fn df_usage_leaves_reserved_blocks_out_of_used() {
        // 1000 blocks of 4 KiB: 100 in use, 900 free of which 50 reserved.
        let u = df_usage(1000, 900, 850, 4096);
        assert_eq!(
            u,
            DfUsage {
                total_bytes: 1000 * 4096,
                used_bytes: 100 * 4096,
                available_bytes: 850 * 4096,
            }
        );
        let sample = DiskSample {
            total_bytes: u.total_bytes,
            used_bytes: u.used_bytes,
            available_bytes: u.available_bytes,
            ..DiskSample::default()
        };
        // df: 100 / (100 + 850) = 10.5%, rounded up.
        assert_eq!(sample.use_percent(), Some(11));
        // The figure the node used to show: (size - avail) / size.
        assert_eq!(
            (u.total_bytes - u.available_bytes) * 100 / u.total_bytes,
            15
        );
        // Nonsense counts from a peer or a broken filesystem do not panic.
        let odd = df_usage(10, 20, 30, u64::MAX);
        assert_eq!(odd.used_bytes, 0);
        assert_eq!(odd.available_bytes, u64::MAX);
    }

    #[test]
    fn real_host_memory_cores_and_disks() {
        let mut host = SysinfoCollector::new().expect("sysinfo supports Linux");
        let s = host.collect(Instant::now());

        assert_eq!(s.memory.total_bytes, meminfo_total_bytes());
        assert!(s.memory.available_bytes <= s.memory.total_bytes);
        assert_eq!(
            s.memory.used_bytes + s.memory.available_bytes,
            s.memory.total_bytes
        );
        assert!(s.memory.swap_used_bytes <= s.memory.swap_total_bytes);
        assert_eq!(s.cpu.per_core_percent.len(), logical_cpus());
        assert!(s.uptime_secs > 0);
        assert!(s.cpu.load.iter().all(|l| l.is_finite() && *l >= 0.0));

        assert!(
            s.disks.iter().any(|d| d.total_bytes > 0),
            "no real disk in {:?}",
            s.disks
        );
        assert!(s.disks.len() <= MAX_DISKS);
        for d in &s.disks {
            assert!(d.available_bytes <= d.total_bytes, "{d:?}");
            assert!(d.device.starts_with("/dev/"), "{d:?}");
            assert_eq!(
                (d.read_bytes_per_sec, d.written_bytes_per_sec),
                (0, 0),
                "first call has no rates: {d:?}"
            );
        }
        let mut devices: Vec<&str> = s.disks.iter().map(|d| d.device.as_str()).collect();
        devices.sort_unstable();
        devices.dedup();
        assert_eq!(devices.len(), s.disks.len(), "one entry per device");

        assert!(s.networks.len() <= MAX_INTERFACES);
        assert!(s.networks.iter().all(|n| n.interface != "lo"));
        assert!(
            s.networks
                .iter()
                .all(|n| n.rx_bytes_per_sec == 0 && n.tx_bytes_per_sec == 0)
        );
    }

    #[test]
    fn real_host_cpu_usage_is_measured_between_calls() {
        let mut host = SysinfoCollector::new().expect("sysinfo supports Linux");
        let t0 = Instant::now();
        host.collect(t0);

        // Keep one core busy so the interval certainly has some usage in it.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinner = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        let s = host.collect(Instant::now());
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spinner.join().expect("spinner thread does not panic");

        assert_eq!(s.cpu.per_core_percent.len(), logical_cpus());
        for p in std::iter::once(&s.cpu.total_percent).chain(&s.cpu.per_core_percent) {
            assert!(p.is_finite() && (0.0..=100.0).contains(p), "{:?}", s.cpu);
        }
        assert!(s.cpu.total_percent > 0.0, "a busy core shows: {:?}", s.cpu);
        assert!(
            s.cpu.per_core_percent.iter().any(|p| *p > 0.0),
            "{:?}",
            s.cpu
        );
    }

    #[test]
    fn real_host_counters_are_cumulative() {
        let mut host = SysinfoCollector::new().expect("sysinfo supports Linux");
        let first = host.collect(Instant::now());
        // Some CPU time and disk traffic between the two readings.
        let path = std::env::temp_dir().join(format!("novacron-counters-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 1 << 20]).expect("writes a file");
        let _ = std::fs::remove_file(&path);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(200) {
            std::hint::black_box(t0.elapsed());
        }
        let second = host.collect(Instant::now());
        let (a, b) = (
            first.cpu.seconds_total.expect("/proc/stat is readable"),
            second.cpu.seconds_total.expect("/proc/stat is readable"),
        );
        for ((mode, before), (_, after)) in a.modes().into_iter().zip(b.modes()) {
            assert!(after >= before, "{mode} went backwards: {a:?} {b:?}");
        }
        assert!(
            b.user + b.system > a.user + a.system,
            "busy time grew: {a:?} {b:?}"
        );
        assert!(b.idle > 0.0);
        for d in &second.disks {
            let read = d.read_bytes_total.expect("a disk counter");
            let before = first.disks.iter().find(|f| f.device == d.device);
            if let Some(f) = before {
                assert!(read >= f.read_bytes_total.expect("a disk counter"), "{d:?}");
            }
        }
        assert!(
            second
                .networks
                .iter()
                .all(|n| n.rx_bytes_total.is_some() && n.tx_bytes_total.is_some())
        );
    }

    #[test]
    fn cpu_seconds_never_go_backwards() {
        let first = parse_cpu_seconds("cpu 100 0 50 1000 40 0 0 0\n", 100).expect("parses");
        // iowait and idle dropped (a NO_HZ kernel), user went on.
        let second = parse_cpu_seconds("cpu 110 0 55 998 38 0 0 0\n", 100).expect("parses");
        let kept = never_backwards(Some(&first), second);
        assert_eq!((kept.user, kept.system), (1.1, 0.55));
        assert_eq!((kept.idle, kept.iowait), (10.0, 0.4));
        let third = parse_cpu_seconds("cpu 120 0 60 1010 41 0 0 0\n", 100).expect("parses");
        let on = never_backwards(Some(&kept), third);
        assert_eq!((on.idle, on.iowait), (10.1, 0.41));
        assert_eq!(never_backwards(None, first.clone()), first);
    }

    #[test]
    fn cpu_seconds_come_from_the_aggregate_line() {
        let stat = "cpu  100 20 30 4000 50 6 7 8 0 0\ncpu0 50 10 15 2000 25 3 3 4 0 0\nintr 1\n";
        let s = parse_cpu_seconds(stat, 100).expect("parses");
        assert_eq!((s.user, s.nice, s.system, s.idle), (1.0, 0.2, 0.3, 40.0));
        assert_eq!(
            (s.iowait, s.irq, s.softirq, s.steal),
            (0.5, 0.06, 0.07, 0.08)
        );
        let old = parse_cpu_seconds("cpu 1 2 3 4\n", 100).expect("old kernels");
        assert_eq!(old.steal, 0.0);
        assert_eq!(parse_cpu_seconds("cpu 1 2\n", 100), None);
        assert_eq!(parse_cpu_seconds("cpu 1 x 3 4\n", 100), None);
        assert_eq!(parse_cpu_seconds("intr 5\n", 100), None);
        assert_eq!(parse_cpu_seconds(stat, 0), None);
    }

    #[test]
    fn rate_is_delta_over_elapsed() {
        assert_eq!(rate_per_sec(100, 300, Duration::from_secs(2)), 100);
        assert_eq!(rate_per_sec(0, 1000, Duration::from_millis(500)), 2000);
        assert_eq!(rate_per_sec(5, 5, Duration::from_secs(1)), 0);
        assert_eq!(
            rate_per_sec(0, 10, Duration::from_secs(3)),
            3,
            "rounds down"
        );
    }

    #[test]
    fn rate_of_wrapped_or_reset_counter_is_zero() {
        assert_eq!(rate_per_sec(300, 100, Duration::from_secs(1)), 0);
        assert_eq!(rate_per_sec(u64::MAX, 0, Duration::from_secs(1)), 0);
    }

    #[test]
    fn rate_over_zero_elapsed_is_zero() {
        assert_eq!(rate_per_sec(0, 1 << 40, Duration::ZERO), 0);
    }

    #[test]
    fn rate_saturates_instead_of_overflowing() {
        assert_eq!(rate_per_sec(0, u64::MAX, Duration::from_nanos(1)), u64::MAX);
    }

    #[test]
    fn tracker_gives_zero_first_then_rates_and_forgets_absent_keys() {
        let mut t = RateTracker::default();
        let sec = Some(Duration::from_secs(1));

        assert_eq!(t.rates("vda", [100, 200], None), [0, 0], "first reading");
        t.finish();

        assert_eq!(t.rates("vda", [1100, 2200], sec), [1000, 2000]);
        assert_eq!(t.rates("vdb", [50, 50], sec), [0, 0], "new device");
        t.finish();

        // vda is absent from this reading, vdb's counters were reset.
        assert_eq!(t.rates("vdb", [10, 60], sec), [0, 10]);
        t.finish();
        assert_eq!(t.prev.len(), 1, "vda was forgotten");

        assert_eq!(t.rates("vda", [5000, 5000], sec), [0, 0], "vda came back");
        t.finish();
    }

    fn reading<'a>(device: &'a str, fs_type: &'a str, mount: &'a str) -> DiskReading<'a> {
        DiskReading {
            device: device.into(),
            fs_type: fs_type.into(),
            mount: mount.into(),
            total_bytes: 10,
            available_bytes: 5,
            read_total: 0,
            written_total: 0,
        }
    }

    #[test]
    fn pseudo_filesystems_are_not_disks() {
        assert!(is_real_filesystem("/dev/vda", "ext4"));
        assert!(is_real_filesystem("/dev/nvme0n1p2", "xfs"));
        assert!(is_real_filesystem("/dev/mapper/vg-data", "btrfs"));
        assert!(is_real_filesystem("rpool/ROOT/ubuntu", "zfs"));
        assert!(!is_real_filesystem("overlay", "overlay"));
        assert!(!is_real_filesystem("tmpfs", "tmpfs"));
        assert!(!is_real_filesystem("/dev/loop3", "squashfs"));
        assert!(!is_real_filesystem("/dev/loop0", "ext4"));
        assert!(!is_real_filesystem("proc", "proc"));
        assert!(!is_real_filesystem("/dev/fuse", "fuse.sshfs"));
        assert!(is_real_filesystem("/dev/sdb1", "fuseblk"));
        assert!(!is_real_filesystem("server:/export", "nfs4"));
    }

    #[test]
    fn disks_are_deduplicated_sorted_and_bounded() {
        let selected = select_disks(vec![
            reading("/dev/vda", "ext4", "/var/lib/docker"),
            reading("overlay", "overlay", "/var/lib/docker/overlay2/abc/merged"),
            reading("/dev/vdb", "xfs", "/data"),
            reading("/dev/vda", "ext4", "/"),
            reading("tmpfs", "tmpfs", "/dev/shm"),
            DiskReading {
                total_bytes: 0,
                ..reading("/dev/vdc", "ext4", "/empty")
            },
        ]);
        let mounts: Vec<&str> = selected.iter().map(|d| d.mount.as_ref()).collect();
        assert_eq!(mounts, ["/", "/data"]);

        let names: Vec<String> = (0..MAX_DISKS + 8)
            .map(|i| format!("/dev/sd{i:03}"))
            .collect();
        let many = names.iter().map(|n| reading(n, "ext4", &n[4..])).collect();
        assert_eq!(select_disks(many).len(), MAX_DISKS);
    }

    #[test]
    fn loopback_and_veth_interfaces_are_skipped_and_the_list_is_bounded() {
        let net = |name: &'static str| NetReading {
            interface: name.into(),
            rx_total: 1,
            tx_total: 2,
        };
        let selected = select_interfaces(vec![
            net("veth12ab"),
            net("lo"),
            net("eth0"),
            net("docker0"),
        ]);
        let names: Vec<&str> = selected.iter().map(|n| n.interface.as_ref()).collect();
        assert_eq!(names, ["docker0", "eth0"]);

        let names: Vec<String> = (0..MAX_INTERFACES + 5).map(|i| format!("eth{i}")).collect();
        let many = names
            .iter()
            .map(|n| NetReading {
                interface: n.as_str().into(),
                rx_total: 0,
                tx_total: 0,
            })
            .collect();
        assert_eq!(select_interfaces(many).len(), MAX_INTERFACES);
    }

    #[test]
    fn total_cpu_is_the_mean_of_the_cores() {
        assert_eq!(mean_percent(&[]), 0.0);
        assert_eq!(mean_percent(&[0.0, 0.0]), 0.0);
        assert_eq!(mean_percent(&[100.0, 50.0, 0.0, 50.0]), 50.0);
    }

    #[test]
    fn percentages_are_clamped_and_finite() {
        assert_eq!(clamp_percent(f32::NAN), 0.0);
        assert_eq!(clamp_percent(f32::INFINITY), 0.0);
        assert_eq!(clamp_percent(-1.0), 0.0);
        assert_eq!(clamp_percent(100.5), 100.0);
        assert_eq!(clamp_percent(42.0), 42.0);
    }
}

//! Metric collectors: what the agent knows about its host.
//!
//! Every source of readings sits behind a narrow trait so that the rest of the agent
//! (and its tests) can run against fakes:
//! - [`HostCollector`]: CPU, memory, filesystems, network interfaces, uptime. The real
//!   one is [`SysinfoCollector`] ([`host`]).
//! - [`GpuCollector`]: NVIDIA GPUs. The real one is [`NvmlCollector`], the empty one
//!   [`NoGpus`]; [`detect_gpus`] picks between them ([`gpu`]).
//! - the Docker daemon is only asked for its version, once, by [`capabilities`]
//!   (through the runtime's Docker adapter, [`crate::runtime::docker::version`]).
//!
//! [`Sampler`] combines a host and a GPU collector into one [`NodeSample`] per tick and
//! derives the node's [`Capacity`] from the latest reading.
//!
//! **Footprint:** the agent must stay under 15 MB RSS and 1% of one core at a 1 s
//! interval, so collectors create their OS handles once and refresh only what they
//! report (no process lists, no `refresh_all`).

pub mod gpu;
pub mod host;

use std::future::Future;
use std::time::Instant;

use novacron_common::wire::{
    Capabilities, Capacity, DiskSample, GpuInfo, GpuSample, NodeSample, PortRange,
};

pub use gpu::{GpuError, NoGpus, NvmlCollector, detect_gpus};
pub use host::{HostError, MAX_DISKS, MAX_INTERFACES, SysinfoCollector};

pub use crate::runtime::docker::version::{DEFAULT_DOCKER_HOST, DOCKER_TIMEOUT, docker_version};

/// Host readings (everything except GPUs).
pub trait HostCollector: Send {
    /// Takes one reading. `now` is the caller's monotonic clock: rates (disk read and
    /// write bytes/s, network rx and tx bytes/s) are counter deltas divided by the time
    /// elapsed since the previous call, and 0 on the first call.
    ///
    /// The returned sample has `seq`, `at_unix_ms` and `gpus` left empty.
    fn collect(&mut self, now: Instant) -> NodeSample;
}

/// GPU inventory and readings.
pub trait GpuCollector: Send {
    /// The GPUs this node offers, as found when the collector was created.
    fn inventory(&self) -> Vec<GpuInfo>;
    /// The NVIDIA driver version, when a driver answered.
    fn driver_version(&self) -> Option<String>;
    /// One reading per GPU of the inventory, in inventory order.
    fn collect(&mut self) -> Vec<GpuSample>;
}

/// Combines a host and a GPU collector into whole [`NodeSample`]s.
pub struct Sampler {
    host: Box<dyn HostCollector>,
    gpus: Box<dyn GpuCollector>,
    totals: Option<HostTotals>,
    latest: Option<tokio::sync::watch::Sender<Option<std::sync::Arc<NodeSample>>>>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler")
            .field("totals", &self.totals)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// A sampler over `host` and `gpus`.
    pub fn new(host: Box<dyn HostCollector>, gpus: Box<dyn GpuCollector>) -> Self {
        Sampler {
            host,
            gpus,
            totals: None,
            latest: None,
        }
    }

    /// Also publishes every sample to `latest` (for the agent's `/metrics`).
    pub fn publishing_to(
        mut self,
        latest: tokio::sync::watch::Sender<Option<std::sync::Arc<NodeSample>>>,
    ) -> Self {
        self.latest = Some(latest);
        self
    }

    /// Takes one reading of the host and its GPUs. `seq` and `at_unix_ms` are left 0
    /// for the caller to fill in.
    pub fn sample(&mut self, now: Instant) -> NodeSample {
        let mut sample = self.host.collect(now);
        sample.gpus = self.gpus.collect();
        self.totals = Some(HostTotals::of(&sample));
        if let Some(latest) = &self.latest {
            latest.send_replace(Some(std::sync::Arc::new(sample.clone())));
        }
        sample
    }

    /// What the node can give to workloads, from the latest [`Sampler::sample`]. If no
    /// sample has been taken yet, it takes a host reading first (which becomes the
    /// baseline of the next sample's rates).
    ///
    /// CPU is logical cores × 1000 millicores, memory the total memory, disk the size
    /// of the filesystem holding `/` (or of the largest one when `/` is not a real
    /// disk), and GPUs the GPU collector's inventory.
    pub fn capacity(&mut self) -> Capacity {
        let totals = match self.totals {
            Some(totals) => totals,
            None => {
                let totals = HostTotals::of(&self.host.collect(Instant::now()));
                self.totals = Some(totals);
                totals
            }
        };
        Capacity {
            cpu_millis: totals.logical_cpus.saturating_mul(1000),
            memory_bytes: totals.memory_bytes,
            disk_bytes: totals.disk_bytes,
            gpus: self.gpus.inventory(),
            // The agent's configured range replaces the default (see `cli`).
            dynamic_ports: PortRange::default(),
        }
    }

    /// The GPU collector, for [`capabilities`].
    pub fn gpus(&self) -> &dyn GpuCollector {
        self.gpus.as_ref()
    }
}

/// What the node can do.
///
/// `os` and `arch` come from the kernel (`uname`) and `/etc/os-release`, `gpu_driver`
/// from `gpus`, and `docker_version` from the Docker daemon at `docker_host` (a
/// `DOCKER_HOST`-style address such as `unix:///var/run/docker.sock`; the local socket
/// when `None`), asked with a [`DOCKER_TIMEOUT`] limit. An unreachable daemon gives
/// `None` and a debug log. `live_checkpoint` is `false` and its reason `None`: the
/// caller sets them from the live checkpoint probe
/// ([`crate::checkpoint::probe_live`]).
///
/// The returned future borrows nothing, so it can be spawned.
pub fn capabilities(
    docker_host: Option<&str>,
    gpus: &dyn GpuCollector,
) -> impl Future<Output = Capabilities> + Send + use<> {
    let gpu_driver = gpus.driver_version();
    let docker_host = docker_host.map(str::to_owned);
    async move {
        Capabilities {
            docker_version: docker_version(docker_host.as_deref()).await,
            live_checkpoint: false,
            gpu_driver,
            os: host::os_description(),
            arch: sysinfo::System::cpu_arch(),
            live_checkpoint_reason: None,
            vm: None,
            oci: None,
        }
    }
}

/// The parts of a sample that [`Capacity`] is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HostTotals {
    logical_cpus: u64,
    memory_bytes: u64,
    disk_bytes: u64,
}

impl HostTotals {
    fn of(sample: &NodeSample) -> Self {
        let logical_cpus = match sample.cpu.per_core_percent.len() {
            // No per-core reading (an unreadable /proc/stat): fall back to what std sees.
            0 => std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get),
            n => n,
        };
        HostTotals {
            logical_cpus: u64::try_from(logical_cpus).unwrap_or(u64::MAX),
            memory_bytes: sample.memory.total_bytes,
            disk_bytes: data_disk_bytes(&sample.disks),
        }
    }
}

/// The size of the filesystem mounted at `/`, or of the largest one when `/` is not
/// among `disks`.
fn data_disk_bytes(disks: &[DiskSample]) -> u64 {
    disks
        .iter()
        .find(|d| d.mount == "/")
        .or_else(|| disks.iter().max_by_key(|d| d.total_bytes))
        .map_or(0, |d| d.total_bytes)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use novacron_common::wire::{CpuSample, MemorySample};

    use super::*;

    const GIB: u64 = 1 << 30;

    /// A host with fixed readings that counts how often it was asked.
    struct FakeHost {
        calls: u32,
    }

    impl HostCollector for FakeHost {
        fn collect(&mut self, _now: Instant) -> NodeSample {
            self.calls += 1;
            NodeSample {
                cpu: CpuSample {
                    total_percent: 25.0,
                    per_core_percent: vec![10.0, 20.0, 30.0, 40.0],
                    load: [0.5, 0.4, 0.3],
                    seconds_total: None,
                },
                memory: MemorySample {
                    total_bytes: 8 * GIB,
                    used_bytes: 2 * GIB,
                    available_bytes: 6 * GIB,
                    ..MemorySample::default()
                },
                disks: vec![
                    disk("/data", 500 * GIB),
                    disk("/", 100 * GIB),
                    disk("/boot", GIB),
                ],
                uptime_secs: u64::from(self.calls),
                ..NodeSample::default()
            }
        }
    }

    fn disk(mount: &str, total_bytes: u64) -> DiskSample {
        DiskSample {
            mount: mount.into(),
            device: format!("/dev/{}", mount.len()),
            total_bytes,
            ..DiskSample::default()
        }
    }

    /// Two GPUs whose utilization moves on every reading.
    struct FakeGpus {
        readings: u32,
    }

    impl FakeGpus {
        fn info() -> Vec<GpuInfo> {
            (0..2)
                .map(|index| GpuInfo {
                    index,
                    uuid: format!("GPU-fake-{index}"),
                    model: "Fake H100".into(),
                    memory_bytes: 80 * GIB,
                    vfio_address: None,
                })
                .collect()
        }
    }

    impl GpuCollector for FakeGpus {
        fn inventory(&self) -> Vec<GpuInfo> {
            Self::info()
        }

        fn driver_version(&self) -> Option<String> {
            Some("550.54.15".into())
        }

        fn collect(&mut self) -> Vec<GpuSample> {
            self.readings += 1;
            Self::info()
                .into_iter()
                .map(|g| GpuSample {
                    index: g.index,
                    uuid: g.uuid,
                    name: g.model,
                    utilization_percent: self.readings * 10 + g.index,
                    memory_used_bytes: GIB,
                    memory_total_bytes: g.memory_bytes,
                    temperature_celsius: 60,
                    power_milliwatts: 300_000,
                })
                .collect()
        }
    }

    #[test]
    fn sampler_merges_gpu_readings_into_the_host_sample() {
        let mut sampler = Sampler::new(
            Box::new(FakeHost { calls: 0 }),
            Box::new(FakeGpus { readings: 0 }),
        );
        let t0 = Instant::now();
        let first = sampler.sample(t0);
        let second = sampler.sample(t0 + Duration::from_secs(1));

        assert_eq!(first.seq, 0, "seq is the caller's");
        assert_eq!(first.at_unix_ms, 0, "at_unix_ms is the caller's");
        assert_eq!(first.uptime_secs, 1);
        assert_eq!(second.uptime_secs, 2, "each sample is a fresh host reading");
        let uuids: Vec<&str> = second.gpus.iter().map(|g| g.uuid.as_str()).collect();
        assert_eq!(uuids, ["GPU-fake-0", "GPU-fake-1"]);
        assert_eq!(first.gpus[1].utilization_percent, 11);
        assert_eq!(second.gpus[0].utilization_percent, 20);
        assert_eq!(second.gpus[1].memory_total_bytes, 80 * GIB);
        assert_eq!(first.cpu.per_core_percent.len(), 4);
    }

    #[test]
    fn capacity_comes_from_the_latest_sample_and_the_gpu_inventory() {
        let mut sampler = Sampler::new(
            Box::new(FakeHost { calls: 0 }),
            Box::new(FakeGpus { readings: 0 }),
        );
        sampler.sample(Instant::now());
        let capacity = sampler.capacity();
        assert_eq!(capacity.cpu_millis, 4000);
        assert_eq!(capacity.memory_bytes, 8 * GIB);
        assert_eq!(
            capacity.disk_bytes,
            100 * GIB,
            "the / filesystem, not the largest"
        );
        assert_eq!(capacity.gpus, FakeGpus::info());
        assert_eq!(
            sampler.gpus().driver_version().as_deref(),
            Some("550.54.15")
        );
    }

    #[test]
    fn capacity_before_any_sample_reads_the_host_once() {
        let mut sampler = Sampler::new(Box::new(FakeHost { calls: 0 }), Box::new(NoGpus));
        let capacity = sampler.capacity();
        assert_eq!(capacity.cpu_millis, 4000);
        assert!(capacity.gpus.is_empty());
        sampler.capacity();
        // The second capacity() reused the reading: the next sample is the host's 2nd.
        assert_eq!(sampler.sample(Instant::now()).uptime_secs, 2);
    }

    #[test]
    fn data_disk_is_root_or_else_the_largest() {
        assert_eq!(data_disk_bytes(&[disk("/srv", 5), disk("/", 3)]), 3);
        assert_eq!(data_disk_bytes(&[disk("/srv", 5), disk("/data", 9)]), 9);
        assert_eq!(data_disk_bytes(&[]), 0);
    }

    #[test]
    fn no_gpus_gives_empty_sample_and_capacity() {
        let mut sampler = Sampler::new(Box::new(FakeHost { calls: 0 }), Box::new(NoGpus));
        assert!(sampler.sample(Instant::now()).gpus.is_empty());
        assert!(sampler.capacity().gpus.is_empty());
        assert_eq!(sampler.gpus().driver_version(), None);
    }

    #[test]
    fn real_host_capacity_counts_logical_cores() {
        let host = SysinfoCollector::new().expect("sysinfo supports Linux");
        let mut sampler = Sampler::new(Box::new(host), Box::new(NoGpus));
        sampler.sample(Instant::now());
        let capacity = sampler.capacity();
        let cores = std::fs::read_to_string("/proc/cpuinfo")
            .expect("/proc/cpuinfo is readable")
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count() as u64;
        assert_eq!(capacity.cpu_millis, cores * 1000);
        assert!(capacity.memory_bytes > 0);
        assert!(capacity.disk_bytes > 0, "this host has a real root disk");
        assert!(capacity.gpus.is_empty());
    }

    #[tokio::test]
    async fn capabilities_report_docker_os_arch_and_gpu_driver() {
        let gpus = FakeGpus { readings: 0 };
        // Spawned to prove the future is Send and borrows nothing.
        let caps = tokio::spawn(capabilities(Some("unix:///var/run/docker.sock"), &gpus))
            .await
            .expect("capabilities task does not panic");
        let version = caps
            .docker_version
            .expect("the Docker daemon on this host answers");
        assert!(
            version.starts_with(|c: char| c.is_ascii_digit()),
            "odd version {version:?}"
        );
        assert_eq!(caps.gpu_driver.as_deref(), Some("550.54.15"));
        assert!(!caps.live_checkpoint);
        assert!(caps.os.starts_with("Linux"), "os = {:?}", caps.os);
        assert!(caps.os.contains("kernel "), "os = {:?}", caps.os);
        if cfg!(target_arch = "x86_64") {
            assert_eq!(caps.arch, "x86_64");
        }
        assert!(!caps.arch.is_empty());
    }

    #[tokio::test]
    async fn capabilities_without_docker_have_no_docker_version() {
        let started = Instant::now();
        let caps = capabilities(Some("unix:///nonexistent/docker.sock"), &NoGpus).await;
        assert_eq!(caps.docker_version, None);
        assert_eq!(caps.gpu_driver, None);
        assert!(started.elapsed() < DOCKER_TIMEOUT + Duration::from_millis(500));
    }
}

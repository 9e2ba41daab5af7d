//! NVIDIA GPUs through NVML.
//!
//! `libnvidia-ml.so.1` is loaded at run time, so the agent builds and runs on hosts
//! without a GPU: [`detect_gpus`] then falls back to [`NoGpus`].

use novacron_common::wire::{GpuInfo, GpuSample};
use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;
use tracing::{debug, info, warn};

use super::GpuCollector;

/// Why NVML gives no GPUs.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// NVML did not load or initialize: no NVIDIA driver, or no permission to use it.
    #[error("NVML unavailable: {0}")]
    Init(#[source] NvmlError),
    /// NVML loaded but could not count the devices.
    #[error("NVML cannot count devices: {0}")]
    DeviceCount(#[source] NvmlError),
}

/// A host without GPUs: empty inventory, no driver, empty readings.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoGpus;

impl GpuCollector for NoGpus {
    fn inventory(&self) -> Vec<GpuInfo> {
        Vec::new()
    }

    fn driver_version(&self) -> Option<String> {
        None
    }

    fn collect(&mut self) -> Vec<GpuSample> {
        Vec::new()
    }
}

/// Reads NVIDIA GPUs through NVML.
///
/// The inventory (index, UUID, model, memory) is read once, when the collector is
/// created; each [`GpuCollector::collect`] reads utilization, memory used,
/// temperature and power of those devices. A field a device cannot report reads 0
/// (memory total: the inventory's figure), and is logged at debug level once per
/// device and field; a failing device never panics the collector.
pub struct NvmlCollector {
    nvml: Nvml,
    driver: Option<String>,
    devices: Vec<GpuInfo>,
    /// Per device (in `devices` order), the fields whose failure was already logged.
    logged: Vec<u8>,
}

impl std::fmt::Debug for NvmlCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlCollector")
            .field("driver", &self.driver)
            .field("devices", &self.devices)
            .finish_non_exhaustive()
    }
}

impl NvmlCollector {
    /// Loads NVML and reads the GPU inventory. A device whose handle or UUID cannot be
    /// read is left out of the inventory, with a warning: without a stable id it cannot
    /// be given to a workload.
    pub fn new() -> Result<Self, GpuError> {
        let nvml = Nvml::init().map_err(GpuError::Init)?;
        let count = nvml.device_count().map_err(GpuError::DeviceCount)?;
        let driver = nvml
            .sys_driver_version()
            .inspect_err(|e| debug!(error = %e, "nvml driver version unavailable"))
            .ok();
        let mut devices = Vec::new();
        for index in 0..count {
            let device = match nvml.device_by_index(index) {
                Ok(device) => device,
                Err(e) => {
                    warn!(device = index, error = %e, "gpu skipped: no nvml handle");
                    continue;
                }
            };
            let uuid = match device.uuid() {
                Ok(uuid) => uuid,
                Err(e) => {
                    warn!(device = index, error = %e, "gpu skipped: no uuid");
                    continue;
                }
            };
            let mut logged = 0;
            devices.push(GpuInfo {
                index,
                uuid,
                model: or_default(device.name(), index, Field::Name, &mut logged),
                memory_bytes: or_default(
                    device.memory_info().map(|m| m.total),
                    index,
                    Field::MemoryTotal,
                    &mut logged,
                ),
                vfio_address: None,
            });
        }
        let logged = vec![0; devices.len()];
        Ok(NvmlCollector {
            nvml,
            driver,
            devices,
            logged,
        })
    }
}

impl GpuCollector for NvmlCollector {
    fn inventory(&self) -> Vec<GpuInfo> {
        self.devices.clone()
    }

    fn driver_version(&self) -> Option<String> {
        self.driver.clone()
    }

    fn collect(&mut self) -> Vec<GpuSample> {
        self.devices
            .iter()
            .zip(&mut self.logged)
            .map(|(info, logged)| {
                let mut sample = GpuSample {
                    index: info.index,
                    uuid: info.uuid.clone(),
                    name: info.model.clone(),
                    memory_total_bytes: info.memory_bytes,
                    ..GpuSample::default()
                };
                let device = match self.nvml.device_by_index(info.index) {
                    Ok(device) => device,
                    Err(e) => {
                        log_once(info.index, Field::Handle, &e, logged);
                        return sample;
                    }
                };
                let i = info.index;
                sample.utilization_percent = or_default(
                    device.utilization_rates().map(|u| u.gpu),
                    i,
                    Field::Utilization,
                    logged,
                );
                if let Some(memory) =
                    or_default(device.memory_info().map(Some), i, Field::Memory, logged)
                {
                    sample.memory_used_bytes = memory.used;
                    sample.memory_total_bytes = memory.total;
                }
                sample.temperature_celsius = or_default(
                    device.temperature(TemperatureSensor::Gpu),
                    i,
                    Field::Temperature,
                    logged,
                );
                sample.power_milliwatts = or_default(device.power_usage(), i, Field::Power, logged);
                sample
            })
            .collect()
    }
}

/// Loads NVML; if it reports at least one GPU, returns it, otherwise [`NoGpus`] and
/// logs (once, at info level) why there are no GPUs.
pub fn detect_gpus() -> Box<dyn GpuCollector> {
    match NvmlCollector::new() {
        Ok(nvml) if !nvml.devices.is_empty() => {
            info!(
                gpus = nvml.devices.len(),
                driver = nvml.driver.as_deref().unwrap_or("unknown"),
                "nvml loaded"
            );
            Box::new(nvml)
        }
        Ok(_) => {
            info!(reason = "NVML reports no usable device", "no GPUs");
            Box::new(NoGpus)
        }
        Err(e) => {
            info!(reason = %e, "no GPUs");
            Box::new(NoGpus)
        }
    }
}

/// A per-device NVML reading that can fail on its own.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
enum Field {
    Handle = 1 << 0,
    Name = 1 << 1,
    MemoryTotal = 1 << 2,
    Utilization = 1 << 3,
    Memory = 1 << 4,
    Temperature = 1 << 5,
    Power = 1 << 6,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Handle => "handle",
            Field::Name => "name",
            Field::MemoryTotal => "memory_total",
            Field::Utilization => "utilization",
            Field::Memory => "memory",
            Field::Temperature => "temperature",
            Field::Power => "power",
        }
    }
}

/// The value of a field reading, or the type's default (0) when the device cannot
/// report it. The first failure of each field is logged at debug level; `logged` holds
/// the device's already-logged fields.
fn or_default<T: Default>(
    reading: Result<T, NvmlError>,
    device: u32,
    field: Field,
    logged: &mut u8,
) -> T {
    reading.unwrap_or_else(|e| {
        log_once(device, field, &e, logged);
        T::default()
    })
}

fn log_once(device: u32, field: Field, error: &NvmlError, logged: &mut u8) {
    let bit = field as u8;
    if *logged & bit == 0 {
        *logged |= bit;
        debug!(device, field = field.name(), %error, "nvml field unavailable");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_gpus_is_empty() {
        let mut gpus = NoGpus;
        assert!(gpus.inventory().is_empty());
        assert!(gpus.collect().is_empty());
        assert_eq!(gpus.driver_version(), None);
    }

    #[test]
    fn failed_field_reads_zero_and_is_logged_once() {
        let mut logged = 0u8;
        let v: u32 = or_default(Err(NvmlError::NotSupported), 0, Field::Power, &mut logged);
        assert_eq!(v, 0);
        assert_eq!(logged, Field::Power as u8);
        let v: u32 = or_default(Err(NvmlError::GpuLost), 0, Field::Power, &mut logged);
        assert_eq!(v, 0);
        assert_eq!(logged, Field::Power as u8, "same field, same bit");
        let v: u64 = or_default(Ok(42), 0, Field::Memory, &mut logged);
        assert_eq!(v, 42);
        assert_eq!(logged, Field::Power as u8, "success logs nothing");
        let _: u32 = or_default(Err(NvmlError::Unknown), 0, Field::Temperature, &mut logged);
        assert_eq!(logged, Field::Power as u8 | Field::Temperature as u8);
    }

    /// Agrees with NVML itself: where NVML does not load (this development host has
    /// no NVIDIA driver), no GPUs; where it does, one sample per inventory entry.
    #[test]
    fn detect_gpus_matches_what_nvml_sees() {
        let mut gpus = detect_gpus();
        let inventory = gpus.inventory();
        let samples = gpus.collect();
        match Nvml::init().and_then(|n| n.device_count()) {
            Err(_) | Ok(0) => {
                assert!(inventory.is_empty());
                assert!(samples.is_empty());
                assert_eq!(gpus.driver_version(), None);
            }
            Ok(count) => {
                assert!(!inventory.is_empty() && inventory.len() <= count as usize);
                assert!(gpus.driver_version().is_some());
                assert_eq!(samples.len(), inventory.len());
                for (s, g) in samples.iter().zip(&inventory) {
                    assert_eq!((s.index, &s.uuid, &s.name), (g.index, &g.uuid, &g.model));
                    assert!(g.uuid.starts_with("GPU-"), "{g:?}");
                    assert!(s.utilization_percent <= 100, "{s:?}");
                    assert!(s.memory_used_bytes <= s.memory_total_bytes, "{s:?}");
                }
            }
        }
    }

    #[test]
    fn nvml_collector_fails_cleanly_without_a_driver() {
        if Nvml::init().is_ok() {
            return; // A GPU host: covered by detect_gpus_matches_what_nvml_sees.
        }
        let err = NvmlCollector::new().expect_err("no NVML on this host");
        assert!(matches!(err, GpuError::Init(_)), "{err}");
        assert!(err.to_string().starts_with("NVML unavailable"), "{err}");
    }
}

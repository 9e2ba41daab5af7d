//! Test data: a fleet of two nodes as `GET /v1/nodes` returns it, on a fixed clock.
//! Compiled for the crate's own tests and, with the `fixtures` feature, for the
//! end-to-end tests in `tests/` that serve it over HTTPS.

use std::collections::BTreeMap;
use std::time::SystemTime;

use novacron_api::NodeView;
use novacron_common::fleet::NodeStatus;
use novacron_common::wire::{
    Capabilities, Capacity, CpuSample, DiskSample, GpuInfo, GpuSample, MemorySample, NetworkSample,
    NodeSample,
};

use crate::output;

/// A gibibyte.
pub const GI: u64 = 1 << 30;
/// The fixtures' clock: 2026-01-01T00:00:00Z.
pub const NOW_UNIX_MS: u64 = 1_767_225_600_000;

/// The fixtures' clock as a time.
pub fn now() -> SystemTime {
    output::from_unix_ms(NOW_UNIX_MS)
}

/// A ready GPU node seen a second ago, and a down node with no samples.
pub fn fixture() -> Vec<NodeView> {
    let sample = NodeSample {
        seq: 42,
        at_unix_ms: NOW_UNIX_MS - 1000,
        cpu: CpuSample {
            total_percent: 12.5,
            per_core_percent: vec![5.0, 10.0, 20.0, 15.0],
            load: [0.5, 1.0, 1.5],
            seconds_total: None,
        },
        memory: MemorySample {
            total_bytes: 16_750_372_454,
            used_bytes: 3_328_599_654,
            available_bytes: 13_000_000_000,
            swap_total_bytes: 2 * GI,
            swap_used_bytes: 0,
        },
        disks: vec![
            DiskSample {
                mount: "/boot".into(),
                device: "sda1".into(),
                total_bytes: GI,
                available_bytes: GI / 2,
                read_bytes_per_sec: 0,
                written_bytes_per_sec: 0,
                used_bytes: GI / 2,
                ..DiskSample::default()
            },
            DiskSample {
                mount: "/var/lib/docker".into(),
                device: "nvme0n1p1".into(),
                total_bytes: 100 * GI,
                available_bytes: 60 * GI,
                read_bytes_per_sec: 1_258_291,
                written_bytes_per_sec: 2048,
                used_bytes: 35 * GI,
                ..DiskSample::default()
            },
        ],
        networks: vec![NetworkSample {
            interface: "eth0".into(),
            rx_bytes_per_sec: 10_240,
            tx_bytes_per_sec: 512,
            ..NetworkSample::default()
        }],
        gpus: vec![GpuSample {
            index: 0,
            uuid: "GPU-1234".into(),
            name: "NVIDIA H100".into(),
            utilization_percent: 87,
            memory_used_bytes: 40 * GI,
            memory_total_bytes: 80 * GI,
            temperature_celsius: 61,
            power_milliwatts: 350_000,
        }],
        uptime_secs: 3 * 86_400 + 4 * 3600,
        allocations: vec![],
    };
    vec![
        NodeView {
            name: "gpu-1".into(),
            status: NodeStatus::Ready,
            labels: BTreeMap::from([
                ("zone".to_string(), "eu-west-1a".to_string()),
                ("pool".to_string(), "gpu".to_string()),
            ]),
            capacity: Capacity {
                cpu_millis: 4000,
                memory_bytes: 16_750_372_454,
                disk_bytes: 100 * GI,
                dynamic_ports: Default::default(),
                gpus: vec![GpuInfo {
                    index: 0,
                    uuid: "GPU-1234".into(),
                    model: "NVIDIA H100".into(),
                    memory_bytes: 80 * GI,
                    vfio_address: None,
                }],
            },
            capabilities: Capabilities {
                docker_version: Some("27.3.1".into()),
                live_checkpoint: true,
                gpu_driver: Some("550.54".into()),
                os: "Ubuntu 24.04 (6.8.0)".into(),
                arch: "x86_64".into(),
                live_checkpoint_reason: None,
                vm: None,
                oci: None,
            },
            agent_version: "0.1.0".into(),
            address: Some("10.0.0.7:51000".into()),
            enrolled_at_unix_ms: NOW_UNIX_MS - 3 * 86_400_000,
            last_seen_unix_ms: Some(NOW_UNIX_MS - 1000),
            cert_expires_unix_ms: Some(NOW_UNIX_MS + 29 * 86_400_000),
            samples_dropped: 0,
            cordoned: false,
            warm: false,
            latest: Some(sample),
            images: 0,
            image_bytes: 0,
        },
        NodeView {
            name: "cpu-2".into(),
            status: NodeStatus::Down,
            labels: BTreeMap::new(),
            capacity: Capacity::default(),
            capabilities: Capabilities::default(),
            agent_version: "0.1.0".into(),
            address: None,
            enrolled_at_unix_ms: NOW_UNIX_MS - 86_400_000,
            last_seen_unix_ms: None,
            cert_expires_unix_ms: None,
            samples_dropped: 7,
            cordoned: false,
            warm: false,
            latest: None,
            images: 0,
            image_bytes: 0,
        },
    ]
}

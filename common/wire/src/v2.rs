//! Version 2 of the wire protocol, frozen: the control-stream and uni-stream
//! messages exactly as release 0.1 (protocol version 2) encodes them, and their
//! conversions to and from the current types ([`Convert`]).
//!
//! A controller or agent that negotiated version 2 with its peer encodes and
//! decodes these types ([`crate::Versioned`]); the rest of the program only sees
//! the current ones. Conversions from version 2 fill fields added later with their
//! defaults (absent counters, no live-checkpoint reason, ...); conversions to
//! version 2 drop them.
//!
//! **Never change a type here**: its bincode layout is what deployed version-2
//! peers send. The bi-stream frames ([`crate::BiRequest`], [`crate::ExecEvent`],
//! [`crate::CheckpointReply`], [`crate::FetchReply`], [`crate::ReleaseReply`]) are
//! still shared with version 2; the first change to one of them must copy its
//! version-2 form here first (a variant appended to an enum, such as
//! [`crate::BiRequest::Terminal`], leaves the others' encoding as it was). The golden frames in the tests below fail when a
//! shared type's layout changes.

// The fields are documented on the current types.
#![allow(missing_docs)]

use std::collections::BTreeMap;

use bincode::{Decode, Encode};

use crate::CloseCode;
use crate::checkpoint::CheckpointMode;

/// [`crate::AgentMessage`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum AgentMessage {
    Hello(Box<Hello>),
    RenewCertificate {
        request_id: u64,
        csr_pem: String,
    },
    Allocations(AllocationReport),
    SpotNotice {
        action: String,
        deadline_unix_ms: u64,
    },
}

/// [`crate::ControllerMessage`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum ControllerMessage {
    Welcome(Welcome),
    Refused(Refusal),
    Certificate {
        request_id: u64,
        result: Result<String, String>,
    },
    Desired(DesiredAllocations),
    Logs(LogRequest),
}

/// [`crate::Hello`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct Hello {
    pub protocol_version: u16,
    pub agent_version: String,
    pub node_name: String,
    pub instance: u64,
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
    pub capabilities: Capabilities,
}

/// [`crate::Welcome`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct Welcome {
    pub protocol_version: u16,
    pub node_name: String,
    pub next_metrics_seq: u64,
}

/// [`crate::Refusal`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct Refusal {
    pub code: CloseCode,
    pub message: String,
}

/// [`crate::Capacity`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct Capacity {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub gpus: Vec<GpuInfo>,
    pub dynamic_ports: PortRange,
}

/// [`crate::PortRange`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

/// [`crate::GpuInfo`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub memory_bytes: u64,
}

/// [`crate::Capabilities`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct Capabilities {
    pub docker_version: Option<String>,
    pub live_checkpoint: bool,
    pub gpu_driver: Option<String>,
    pub os: String,
    pub arch: String,
}

/// [`crate::StreamOpen`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct StreamOpen {
    pub protocol_version: u16,
    pub kind: StreamKind,
}

/// [`crate::StreamKind`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum StreamKind {
    Metrics,
    Logs { request_id: u64 },
}

/// [`crate::MetricsBatch`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct MetricsBatch {
    pub samples: Vec<NodeSample>,
    pub dropped_total: u64,
}

/// [`crate::DesiredAllocations`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct DesiredAllocations {
    pub epoch: u64,
    pub generation: u64,
    pub allocations: Vec<AllocationSpec>,
}

/// [`crate::AllocationSpec`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct AllocationSpec {
    pub id: String,
    pub job: String,
    pub job_version: u64,
    pub task: TaskSpec,
    pub restore: Option<RestoreFrom>,
}

/// [`crate::RestoreFrom`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct RestoreFrom {
    pub digest: String,
    pub size: u64,
    pub mode: CheckpointMode,
}

/// [`crate::TaskSpec`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct TaskSpec {
    pub batch: bool,
    pub image: String,
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub ports: Vec<PortMapping>,
    pub volumes: Vec<VolumeMount>,
    pub working_dir: Option<String>,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpu_uuids: Vec<String>,
    pub restart: RestartSpec,
    pub health: Option<HealthSpec>,
}

/// [`crate::PortMapping`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct PortMapping {
    pub name: String,
    pub container_port: u16,
    pub host_port: Option<u16>,
    pub udp: bool,
}

/// [`crate::VolumeMount`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct VolumeMount {
    pub source: String,
    pub target: String,
    pub read_only: bool,
}

/// [`crate::RestartSpec`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct RestartSpec {
    pub attempts: u32,
    pub interval_ms: u64,
    pub delay_ms: u64,
    pub delay_mode: bool,
}

/// [`crate::HealthSpec`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct HealthSpec {
    pub liveness: Option<ProbeSpec>,
    pub readiness: Option<ProbeSpec>,
    pub startup: Option<ProbeSpec>,
    pub max_restarts: u32,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

/// [`crate::ProbeSpec`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct ProbeSpec {
    pub check: HealthCheckKind,
    pub period_ms: u64,
    pub timeout_ms: u64,
    pub failure_threshold: u32,
    pub initial_delay_ms: u64,
}

/// [`crate::FailureReason`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum FailureReason {
    RestartsExhausted,
    Unhealthy,
    ImageMissing,
    MaxRuntime,
}

/// [`crate::HealthCheckKind`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum HealthCheckKind {
    Http { port: u16, path: String },
    Tcp { port: u16 },
    Exec { command: Vec<String> },
}

/// [`crate::AllocationReport`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct AllocationReport {
    pub generation: u64,
    pub allocations: Vec<AllocationStatus>,
}

/// [`crate::AllocState`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum AllocState {
    Pending,
    Starting,
    Running,
    Checkpointing,
    Migrating,
    Stopped,
    Complete,
    Failed,
    Lost,
}

/// [`crate::AllocationStatus`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct AllocationStatus {
    pub id: String,
    pub state: AllocState,
    pub healthy: Option<bool>,
    pub restarts: u32,
    pub exit_code: Option<i64>,
    pub message: String,
    pub failure: Option<FailureReason>,
    pub restore_failed: bool,
    pub container_id: Option<String>,
    pub started_at_unix_ms: Option<u64>,
}

/// [`crate::AllocationUsage`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct AllocationUsage {
    pub id: String,
    pub cpu_percent: f32,
    pub memory_bytes: u64,
    pub memory_limit_bytes: u64,
    pub rx_bytes_per_sec: u64,
    pub tx_bytes_per_sec: u64,
}

/// [`crate::LogRequest`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct LogRequest {
    pub request_id: u64,
    pub allocation: String,
    pub follow: bool,
    pub tail: u32,
}

/// [`crate::LogChunk`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct LogChunk {
    pub stderr: bool,
    pub data: Vec<u8>,
    pub end: Option<Result<(), String>>,
}

/// [`crate::NodeSample`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct NodeSample {
    pub seq: u64,
    pub at_unix_ms: u64,
    pub cpu: CpuSample,
    pub memory: MemorySample,
    pub disks: Vec<DiskSample>,
    pub networks: Vec<NetworkSample>,
    pub gpus: Vec<GpuSample>,
    pub uptime_secs: u64,
    pub allocations: Vec<AllocationUsage>,
}

/// [`crate::CpuSample`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct CpuSample {
    pub total_percent: f32,
    pub per_core_percent: Vec<f32>,
    pub load: [f32; 3],
}

/// [`crate::MemorySample`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct MemorySample {
    pub total_bytes: u64,
    pub used_bytes: u64,
    pub available_bytes: u64,
    pub swap_total_bytes: u64,
    pub swap_used_bytes: u64,
}

/// [`crate::DiskSample`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct DiskSample {
    pub mount: String,
    pub device: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub read_bytes_per_sec: u64,
    pub written_bytes_per_sec: u64,
}

/// [`crate::NetworkSample`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct NetworkSample {
    pub interface: String,
    pub rx_bytes_per_sec: u64,
    pub tx_bytes_per_sec: u64,
}

/// [`crate::GpuSample`] as of version 2.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct GpuSample {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub utilization_percent: u32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub temperature_celsius: u32,
    pub power_milliwatts: u32,
}
/// A conversion between a version-2 type and the current one (both ways); the
/// orphan rule rules out `From` for the containers (`Vec`, `Option`, ...).
pub trait Convert<T> {
    /// Converts.
    fn convert(self) -> T;
}

macro_rules! same {
    ($($t:ty),* $(,)?) => {$(
        impl Convert<$t> for $t {
            fn convert(self) -> $t {
                self
            }
        }
    )*};
}

same!(
    (),
    bool,
    u8,
    u16,
    u32,
    u64,
    i64,
    f32,
    [f32; 3],
    String,
    CloseCode,
    CheckpointMode
);

impl<A: Convert<B>, B> Convert<Vec<B>> for Vec<A> {
    fn convert(self) -> Vec<B> {
        self.into_iter().map(Convert::convert).collect()
    }
}

impl<A: Convert<B>, B> Convert<Option<B>> for Option<A> {
    fn convert(self) -> Option<B> {
        self.map(Convert::convert)
    }
}

impl<A: Convert<B>, B> Convert<Box<B>> for Box<A> {
    fn convert(self) -> Box<B> {
        Box::new((*self).convert())
    }
}

impl<K: Ord, A: Convert<B>, B> Convert<BTreeMap<K, B>> for BTreeMap<K, A> {
    fn convert(self) -> BTreeMap<K, B> {
        self.into_iter().map(|(k, v)| (k, v.convert())).collect()
    }
}

impl<A: Convert<B>, B, E: Convert<F>, F> Convert<Result<B, F>> for Result<A, E> {
    fn convert(self) -> Result<B, F> {
        self.map(Convert::convert).map_err(Convert::convert)
    }
}

/// Both directions for structs: `Name { fields } + { new_field: default, ... };`
/// names the version-2 fields, then what the fields added since get from a
/// version-2 peer.
macro_rules! structs {
    ($($name:ident { $($f:ident),* $(,)? } $(+ { $($new:ident : $default:expr),* $(,)? })? ;)*) => {$(
        impl Convert<crate::$name> for $name {
            fn convert(self) -> crate::$name {
                crate::$name {
                    $($f: self.$f.convert(),)*
                    $($($new: $default,)*)?
                }
            }
        }
        impl Convert<$name> for crate::$name {
            fn convert(self) -> $name {
                let crate::$name { $($f,)* .. } = self;
                $name { $($f: $f.convert(),)* }
            }
        }
    )*};
}

/// Both directions for enums without data.
macro_rules! unit_enums {
    ($($name:ident { $($v:ident),* $(,)? };)*) => {$(
        impl Convert<crate::$name> for $name {
            fn convert(self) -> crate::$name {
                match self {
                    $($name::$v => crate::$name::$v,)*
                }
            }
        }
        impl Convert<$name> for crate::$name {
            fn convert(self) -> $name {
                match self {
                    $(crate::$name::$v => $name::$v,)*
                }
            }
        }
    )*};
}

structs! {
    Hello { protocol_version, agent_version, node_name, instance, labels, capacity, capabilities };
    Welcome { protocol_version, node_name, next_metrics_seq };
    Refusal { code, message };
    Capacity { cpu_millis, memory_bytes, disk_bytes, gpus, dynamic_ports };
    PortRange { first, last };
    GpuInfo { index, uuid, model, memory_bytes } + { vfio_address: None };
    Capabilities { docker_version, live_checkpoint, gpu_driver, os, arch } + { live_checkpoint_reason: None, vm: None, oci: None };
    StreamOpen { protocol_version, kind };
    MetricsBatch { samples, dropped_total };
    DesiredAllocations { epoch, generation, allocations } + { prepull: Vec::new() };
    AllocationSpec { id, job, job_version, task, restore } + { suspended: false };
    RestoreFrom { digest, size, mode } + { incoming_vm: None };
    TaskSpec { batch, image, command, args, env, ports, volumes, working_dir, cpu_millis, memory_bytes, gpu_uuids, restart, health }
        + { shutdown_delay_ms: 0, pull_policy: crate::PullPolicy::Never, secrets: Vec::new(), registry_auth: None, image_digest: None, vm: None };
    PortMapping { name, container_port, host_port, udp };
    VolumeMount { source, target, read_only };
    RestartSpec { attempts, interval_ms, delay_ms, delay_mode };
    HealthSpec { liveness, readiness, startup, max_restarts, backoff_initial_ms, backoff_max_ms };
    ProbeSpec { check, period_ms, timeout_ms, failure_threshold, initial_delay_ms };
    AllocationReport { generation, allocations };
    AllocationStatus { id, state, healthy, restarts, exit_code, message, failure, restore_failed, container_id, started_at_unix_ms }
        + { published: Vec::new(), image_digest: None, pull: None, suspended: false, address: None };
    AllocationUsage { id, cpu_percent, memory_bytes, memory_limit_bytes, rx_bytes_per_sec, tx_bytes_per_sec };
    LogRequest { request_id, allocation, follow, tail };
    LogChunk { stderr, data, end };
    NodeSample { seq, at_unix_ms, cpu, memory, disks, networks, gpus, uptime_secs, allocations };
    CpuSample { total_percent, per_core_percent, load } + { seconds_total: None };
    MemorySample { total_bytes, used_bytes, available_bytes, swap_total_bytes, swap_used_bytes };
    DiskSample { mount, device, total_bytes, available_bytes, read_bytes_per_sec, written_bytes_per_sec }
        + { read_bytes_total: None, written_bytes_total: None, used_bytes: 0 };
    NetworkSample { interface, rx_bytes_per_sec, tx_bytes_per_sec }
        + { rx_bytes_total: None, tx_bytes_total: None };
    GpuSample { index, uuid, name, utilization_percent, memory_used_bytes, memory_total_bytes, temperature_celsius, power_milliwatts };
}

unit_enums! {
    FailureReason { RestartsExhausted, Unhealthy, ImageMissing, MaxRuntime };
    AllocState { Pending, Starting, Running, Checkpointing, Migrating, Stopped, Complete, Failed, Lost };
}

impl Convert<crate::AgentMessage> for AgentMessage {
    fn convert(self) -> crate::AgentMessage {
        use crate::AgentMessage as A;
        match self {
            AgentMessage::Hello(h) => A::Hello(h.convert()),
            AgentMessage::RenewCertificate {
                request_id,
                csr_pem,
            } => A::RenewCertificate {
                request_id,
                csr_pem,
            },
            AgentMessage::Allocations(r) => A::Allocations(r.convert()),
            AgentMessage::SpotNotice {
                action,
                deadline_unix_ms,
            } => A::SpotNotice {
                action,
                deadline_unix_ms,
            },
        }
    }
}

/// An agent message in its version-2 form; `None` for the messages added since
/// (they are never sent on a version-2 connection).
pub(crate) fn agent_message_to_v2(msg: crate::AgentMessage) -> Option<AgentMessage> {
    use crate::AgentMessage as A;
    Some(match msg {
        A::Hello(h) => AgentMessage::Hello(h.convert()),
        A::RenewCertificate {
            request_id,
            csr_pem,
        } => AgentMessage::RenewCertificate {
            request_id,
            csr_pem,
        },
        A::Allocations(r) => AgentMessage::Allocations(r.convert()),
        A::SpotNotice {
            action,
            deadline_unix_ms,
        } => AgentMessage::SpotNotice {
            action,
            deadline_unix_ms,
        },
        A::Images(_) => return None,
    })
}

impl Convert<crate::ControllerMessage> for ControllerMessage {
    fn convert(self) -> crate::ControllerMessage {
        use crate::ControllerMessage as C;
        match self {
            ControllerMessage::Welcome(w) => C::Welcome(w.convert()),
            ControllerMessage::Refused(r) => C::Refused(r.convert()),
            ControllerMessage::Certificate { request_id, result } => {
                C::Certificate { request_id, result }
            }
            ControllerMessage::Desired(d) => C::Desired(d.convert()),
            ControllerMessage::Logs(l) => C::Logs(l.convert()),
        }
    }
}

/// A controller message in its version-2 form; `None` for the messages added
/// since (they are never sent to a version-2 agent).
pub(crate) fn controller_message_to_v2(msg: crate::ControllerMessage) -> Option<ControllerMessage> {
    use crate::ControllerMessage as C;
    Some(match msg {
        C::Welcome(w) => ControllerMessage::Welcome(w.convert()),
        C::Refused(r) => ControllerMessage::Refused(r.convert()),
        C::Certificate { request_id, result } => {
            ControllerMessage::Certificate { request_id, result }
        }
        C::Desired(d) => ControllerMessage::Desired(d.convert()),
        C::Logs(l) => ControllerMessage::Logs(l.convert()),
        C::Ingress(_) => return None,
    })
}

impl Convert<crate::StreamKind> for StreamKind {
    fn convert(self) -> crate::StreamKind {
        match self {
            StreamKind::Metrics => crate::StreamKind::Metrics,
            StreamKind::Logs { request_id } => crate::StreamKind::Logs { request_id },
        }
    }
}

impl Convert<StreamKind> for crate::StreamKind {
    fn convert(self) -> StreamKind {
        match self {
            crate::StreamKind::Metrics => StreamKind::Metrics,
            crate::StreamKind::Logs { request_id } => StreamKind::Logs { request_id },
        }
    }
}

impl Convert<crate::HealthCheckKind> for HealthCheckKind {
    fn convert(self) -> crate::HealthCheckKind {
        use crate::HealthCheckKind as H;
        match self {
            HealthCheckKind::Http { port, path } => H::Http { port, path },
            HealthCheckKind::Tcp { port } => H::Tcp { port },
            HealthCheckKind::Exec { command } => H::Exec { command },
        }
    }
}

impl Convert<HealthCheckKind> for crate::HealthCheckKind {
    fn convert(self) -> HealthCheckKind {
        use crate::HealthCheckKind as H;
        match self {
            H::Http { port, path } => HealthCheckKind::Http { port, path },
            H::Tcp { port } => HealthCheckKind::Tcp { port },
            H::Exec { command } => HealthCheckKind::Exec { command },
        }
    }
}

#[cfg(test)]
mod tests {
    //! Frames as release 0.1 (protocol version 2, `main` before version 3) encodes
    //! them, produced by that release's own code.

    use super::*;
    use crate::{decode_body, decode_body_as, encode_frame, encode_frame_as};

    fn bytes(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect()
    }

    /// Decodes a version-2 body into the current type and encodes it back as
    /// version 2: the same bytes (the conversions lose nothing a version-2 peer
    /// sent).
    fn round_trip<T: crate::Versioned + std::fmt::Debug>(name: &str, hex: &str) -> T {
        let body = bytes(hex);
        let current: T = decode_body_as(2, &body).unwrap_or_else(|e| panic!("{name}: {e}"));
        let again = encode_frame_as(2, &current).expect("encodes");
        assert_eq!(
            &again[4..],
            &body[..],
            "{name} re-encodes as the same bytes"
        );
        current
    }

    const CONTROLLER: &[(&str, &str)] = &[
        ("welcome", "0002026e3129"),
        ("refused", "0104026e6f"),
        (
            "desired",
            "0303090103612d310377656202000762757379626f780102736802022d6307736c656570203101014b01560104687474705001fb214e0001052f64617461022f640101012ffbf401fc000000040003fb60eafbe8030101010050012ffbe803fbf401030001015001020105010201047472756501010101020a64010261620a00",
        ),
        ("logs", "040503612d31010a"),
        ("cert", "020101026e6f"),
    ];
    const AGENT: &[(&str, &str)] = &[
        (
            "hello",
            "000205302e312e30026e310701047a6f6e650161fbd007fc00000040fd00000040010000000100054750552d3102543410fb204efb007d010432372e300100054c696e7578067838365f3634",
        ),
        (
            "report",
            "02090103612d310701000401fb1201036f6f6d010101010263310163",
        ),
        ("spot", "03097465726d696e61746505"),
        ("renew", "010203637372"),
    ];
    const STREAM_OPEN: &[(&str, &str)] = &[("open_metrics", "0200"), ("open_logs", "020105")];
    const BATCH: &str = "01010200004842020000c841000096420000003f0000803f0000c03f643c280a0101012f0476646131fbe803fbf40107080104657468300b0c0100054750552d3102543405061028fb581b4d0103612d31000048410304050603";
    const CHUNK: &str = "0103010203010104676f6e65";
    /// Bi-stream frames, shared by versions 2 and 3.
    const BI: &[(&str, &str)] = &[
        ("exec", "0002090103612d3101026c7301fbe803"),
        ("exec_host", "00020a000106757074696d6500"),
        ("checkpoint", "010203612d310201fb8813"),
        ("fetch", "020202616203"),
        ("release", "030203612d3100"),
    ];
    const EXEC_EVENTS: &[(&str, &str)] = &[
        ("ev_started", "000104"),
        ("ev_output", "0101026869"),
        ("ev_exited", "0202011200"),
        ("ev_refused", "030172"),
        ("ev_failed", "040166fbfe00"),
    ];
    const FETCH_REPLY: &str = "000a";
    const RELEASE_REPLY: &str = "00";
    const CHECKPOINT_REPLY: &str = "000261620a0103612d3103776562026e310506";

    #[test]
    fn version_2_control_frames_decode_and_re_encode() {
        for (name, hex) in CONTROLLER {
            round_trip::<crate::ControllerMessage>(name, hex);
        }
        for (name, hex) in AGENT {
            round_trip::<crate::AgentMessage>(name, hex);
        }
        for (name, hex) in STREAM_OPEN {
            round_trip::<crate::StreamOpen>(name, hex);
        }
        round_trip::<crate::LogChunk>("chunk", CHUNK);
    }

    #[test]
    fn a_version_2_hello_is_read_whole() {
        let body = bytes(AGENT[0].1);
        assert_eq!(
            crate::classify_first_frame(&body).expect("classifies"),
            crate::FirstFrame::LegacyHello(2)
        );
        let crate::AgentMessage::Hello(hello) =
            round_trip::<crate::AgentMessage>("hello", AGENT[0].1)
        else {
            panic!("not a Hello");
        };
        assert_eq!(hello.protocol_version, 2);
        assert_eq!(hello.node_name, "n1");
        assert_eq!(hello.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(hello.capacity.cpu_millis, 2000);
        assert_eq!(hello.capacity.gpus[0].model, "T4");
        assert_eq!(hello.capacity.dynamic_ports.to_string(), "20000-32000");
        assert!(hello.capabilities.live_checkpoint);
        assert_eq!(hello.capabilities.docker_version.as_deref(), Some("27.0"));
    }

    #[test]
    fn a_version_2_metrics_batch_has_no_counters() {
        let batch: crate::MetricsBatch = round_trip("batch", BATCH);
        assert_eq!(batch.dropped_total, 3);
        let s = &batch.samples[0];
        assert_eq!(s.cpu.per_core_percent, vec![25.0, 75.0]);
        assert_eq!(s.cpu.seconds_total, None);
        assert_eq!(s.disks[0].read_bytes_per_sec, 7);
        assert_eq!(s.disks[0].read_bytes_total, None);
        assert_eq!(s.networks[0].interface, "eth0");
        assert_eq!(s.networks[0].rx_bytes_total, None);
        assert_eq!(s.allocations[0].cpu_percent, 12.5);
        assert_eq!(s.gpus[0].power_milliwatts, 7000);
        // Counters a version-2 peer cannot carry are dropped, not an error.
        let mut with_counters = batch.clone();
        with_counters.samples[0].disks[0].read_bytes_total = Some(1 << 40);
        let again = encode_frame_as(2, &with_counters).expect("encodes");
        assert_eq!(&again[4..], &bytes(BATCH)[..]);
    }

    #[test]
    fn version_2_desired_sets_keep_every_field() {
        let crate::ControllerMessage::Desired(d) =
            round_trip::<crate::ControllerMessage>("desired", CONTROLLER[2].1)
        else {
            panic!("not a desired set");
        };
        let task = &d.allocations[0].task;
        assert_eq!(task.ports[0].host_port, Some(20001));
        assert!(task.volumes[0].read_only);
        let health = task.health.as_ref().expect("health");
        assert_eq!(
            health.startup.as_ref().map(|p| &p.check),
            Some(&crate::HealthCheckKind::Exec {
                command: vec!["true".into()]
            })
        );
        assert_eq!(
            d.allocations[0].restore.as_ref().map(|r| r.mode),
            Some(CheckpointMode::Live)
        );
    }

    /// The bi-stream frames are shared with version 2: a change to their layout
    /// must freeze the version-2 form in this module first.
    #[test]
    fn bi_stream_frames_keep_the_version_2_layout() {
        fn same<T: Encode + Decode<()>>(name: &str, hex: &str) {
            let body = bytes(hex);
            let decoded: T = decode_body(&body).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                &encode_frame(&decoded).expect("encodes")[4..],
                &body[..],
                "{name}: the version-2 layout changed; freeze its version-2 form in wire::v2"
            );
        }
        for (name, hex) in BI {
            same::<crate::BiRequest>(name, hex);
        }
        for (name, hex) in EXEC_EVENTS {
            same::<crate::ExecEvent>(name, hex);
        }
        same::<crate::FetchReply>("fetch_reply", FETCH_REPLY);
        same::<crate::ReleaseReply>("release_reply", RELEASE_REPLY);
        same::<crate::CheckpointReply>("checkpoint_reply", CHECKPOINT_REPLY);
    }

    #[test]
    fn offers_share_the_hello_prefix() {
        let offer = encode_frame(&crate::Opening::Offer { max: 3, min: 2 }).expect("encodes");
        assert_eq!(&offer[4..], &[0, 3, 2]);
        assert_eq!(
            crate::classify_first_frame(&offer[4..]).expect("classifies"),
            crate::FirstFrame::Offer(crate::VersionRange { min: 2, max: 3 })
        );
        // A version-2 controller reading an offer fails to decode it as a Hello
        // (and closes with `Malformed`, which the agent takes as "too old").
        assert!(decode_body::<AgentMessage>(&offer[4..]).is_err());
        assert!(crate::classify_first_frame(&[1, 3, 2]).is_err());
        assert!(
            crate::classify_first_frame(&[0, 4, 5]).is_err(),
            "min above max"
        );
        assert!(crate::classify_first_frame(&[]).is_err());
    }
}

//! The agent ↔ controller wire protocol (`novacron-wire`).
//!
//! **Architecture Invariant:** this is the only crate that depends on bincode and
//! derives the wire serialization (`bincode::Encode` / `bincode::Decode`): this file
//! for the frames, [`checkpoint`] for the checkpoint bundle records. Everything that
//! crosses a QUIC stream is declared here, so a change to the protocol is a change to
//! this crate. It does no I/O: the async `read_frame`/`write_frame` over tokio streams
//! live in `novacron-common` (`novacron_common::wire`, which re-exports this crate).
//!
//! **Dependency direction:** `novacron-core` (the pure decisions) depends on this crate,
//! not the other way round. The types both sides share (`Capacity`, `TaskSpec`,
//! `AllocState`, ...) cross the wire, so they must derive bincode's traits where they
//! are declared (Rust's orphan rule forbids deriving them anywhere else); declaring them
//! here keeps bincode in one crate, and this crate needs nothing from the core. The
//! core uses them as plain data.
//!
//! Every frame is a big-endian `u32` body length followed by a bincode 2 body. A body
//! longer than [`MAX_FRAME_LEN`] is refused *before* anything is allocated for it, and
//! the decoder is configured with the same limit, so a forged inner length (a `Vec`
//! claiming a billion entries) fails with an error instead of an allocation.
//!
//! **Versions.** A build speaks a range of protocol versions ([`SUPPORTED`]: this
//! one and the one before). The agent opens the control stream with an
//! [`Opening::Offer`] of its range; the controller answers [`Negotiated`] with the
//! highest version both speak (or refuses, saying which side to upgrade), and both
//! then encode every frame of the connection, on every stream, in that version
//! ([`Versioned`]; version 2's types are frozen in [`v2`]). These two frames are
//! frozen for all versions: an `Opening` body is the `Hello` variant's tag (0)
//! followed by a `u16` version, the same prefix as a version-2 `Hello`, so that a
//! controller reads the first frame of any agent ([`classify_first_frame`]). A
//! version-2 agent sends its `Hello` at once (no offer): its range is 2 to 2.
//!
//! Streams:
//! - **control** (bi-stream opened by the agent): [`Opening::Offer`] and the
//!   [`Negotiated`] answer (from version 3 on), then `AgentMessage::Hello`; the
//!   controller answers `ControllerMessage::Welcome` (or `Refused` and closes).
//!   Later: certificate renewal requests and their answers.
//! - **metrics** (uni-stream opened by the agent): a [`StreamOpen`] frame, then
//!   [`MetricsBatch`] frames.
//! - **exec** (one bi-stream per remote command, opened by the controller): an
//!   [`ExecRequest`] frame; the agent answers with [`ExecEvent`] frames (`Started`,
//!   `Output`..., then `Exited`; or one `Refused` / `Failed`). The controller keeps
//!   its side open while the command runs: ending or resetting it cancels the
//!   command (the agent kills it).

pub mod checkpoint;
pub mod v2;

use std::collections::BTreeMap;
use std::fmt;

/// The codec traits, re-exported so that callers can name the bounds of
/// [`encode_frame`] and [`decode_body`] without depending on bincode themselves.
pub use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};

/// The ALPN protocol id of the agent link.
pub const ALPN: &[u8] = b"novacron/1";
/// The newest protocol version this build speaks (carried in the first frame of
/// every stream). Version 3 added the version negotiation and the cumulative host
/// counters of [`NodeSample`].
pub const PROTOCOL_VERSION: u16 = 3;
/// The oldest protocol version this build still speaks: peers one version older
/// keep working.
pub const MIN_PROTOCOL_VERSION: u16 = 2;
/// The versions this build speaks.
pub const SUPPORTED: VersionRange = VersionRange {
    min: MIN_PROTOCOL_VERSION,
    max: PROTOCOL_VERSION,
};
/// The first version that negotiates with an [`Opening::Offer`]; older agents send
/// their `Hello` first.
pub const FIRST_NEGOTIATED_VERSION: u16 = 3;
/// The hard maximum body length of one frame (1 MiB).
pub const MAX_FRAME_LEN: usize = 1 << 20;
/// The most samples one [`MetricsBatch`] may carry.
pub const MAX_SAMPLES_PER_BATCH: usize = 120;

type WireConfig = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_FRAME_LEN>,
>;

fn config() -> WireConfig {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame body longer than the protocol allows.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The announced length.
        len: usize,
        /// [`MAX_FRAME_LEN`].
        max: usize,
    },
    /// The body did not decode as the expected message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The body decoded but left bytes unread.
    #[error("malformed frame: {trailing} trailing bytes after the message")]
    Trailing {
        /// How many bytes were left over.
        trailing: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// A message could not be encoded (it is larger than a frame may be).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The message does not exist in the protocol version of the connection (a
    /// sender checks the version first; this is the encoder's refusal).
    #[error("this message does not exist in wire protocol version {version}")]
    NotInVersion {
        /// The connection's version.
        version: u16,
    },
    /// The underlying stream failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// The connection close code this error should produce.
    pub fn close_code(&self) -> CloseCode {
        match self {
            FrameError::TooLarge { .. } => CloseCode::FrameTooLarge,
            FrameError::Malformed(_) | FrameError::Trailing { .. } | FrameError::Truncated => {
                CloseCode::Malformed
            }
            FrameError::Encode(_) | FrameError::NotInVersion { .. } | FrameError::Io(_) => {
                CloseCode::Internal
            }
        }
    }
}

/// Application close codes on the agent link (QUIC `CONNECTION_CLOSE` error codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[repr(u32)]
pub enum CloseCode {
    /// Orderly shutdown.
    Normal = 0,
    /// A frame body was longer than [`MAX_FRAME_LEN`].
    FrameTooLarge = 1,
    /// A frame did not decode.
    Malformed = 2,
    /// A well-formed message arrived where the protocol does not allow it.
    Unexpected = 3,
    /// The peer speaks another protocol version.
    VersionMismatch = 4,
    /// The node's certificate is revoked.
    Revoked = 5,
    /// The peer claimed an identity its certificate does not carry.
    IdentityMismatch = 6,
    /// Another connection of the same node replaced this one.
    Replaced = 7,
    /// An internal error on the closing side.
    Internal = 8,
    /// The peer did not complete a step in time.
    Timeout = 9,
}

impl CloseCode {
    /// The numeric code as sent on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Maps a numeric code back; unknown codes are `None`.
    pub fn from_code(code: u64) -> Option<CloseCode> {
        use CloseCode::*;
        [
            Normal,
            FrameTooLarge,
            Malformed,
            Unexpected,
            VersionMismatch,
            Revoked,
            IdentityMismatch,
            Replaced,
            Internal,
            Timeout,
        ]
        .into_iter()
        .find(|c| u64::from(c.code()) == code)
    }
}

/// An inclusive range of protocol versions (`2-3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionRange {
    /// The oldest version.
    pub min: u16,
    /// The newest version.
    pub max: u16,
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

/// Why two version ranges have no version in common.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VersionMismatch {
    /// The peer is too old: the peer must be upgraded.
    #[error(
        "the {peer} speaks wire protocol versions {theirs}, this {me} speaks {ours}: upgrade the {peer} to a release that speaks version {} or later",
        ours.min
    )]
    PeerTooOld {
        /// What the peer is (`agent`, `controller`).
        peer: &'static str,
        /// What this end is.
        me: &'static str,
        /// The peer's range.
        theirs: VersionRange,
        /// This end's range.
        ours: VersionRange,
    },
    /// The peer is too new: this end must be upgraded.
    #[error(
        "the {peer} speaks wire protocol versions {theirs}, this {me} speaks {ours}: upgrade this {me} to a release that speaks version {} or later",
        theirs.min
    )]
    PeerTooNew {
        /// What the peer is.
        peer: &'static str,
        /// What this end is.
        me: &'static str,
        /// The peer's range.
        theirs: VersionRange,
        /// This end's range.
        ours: VersionRange,
    },
}

impl VersionRange {
    /// Whether `version` lies in the range.
    pub fn contains(&self, version: u16) -> bool {
        (self.min..=self.max).contains(&version)
    }

    /// The highest version both ranges hold. `me` and `peer` name the two ends
    /// (`controller`, `agent`) in the error, which says which one to upgrade.
    pub fn negotiate(
        self,
        theirs: VersionRange,
        me: &'static str,
        peer: &'static str,
    ) -> Result<u16, VersionMismatch> {
        let best = self.max.min(theirs.max);
        if best >= self.min.max(theirs.min) {
            Ok(best)
        } else if theirs.max < self.min {
            Err(VersionMismatch::PeerTooOld {
                peer,
                me,
                theirs,
                ours: self,
            })
        } else {
            Err(VersionMismatch::PeerTooNew {
                peer,
                me,
                theirs,
                ours: self,
            })
        }
    }

    /// Parses `3` or `2-3`, which must lie within [`SUPPORTED`] (a build cannot
    /// speak a version it does not implement; it can be told to speak fewer).
    pub fn parse_within_supported(text: &str) -> Result<VersionRange, String> {
        let text = text.trim();
        let (min, max) = text.split_once('-').unwrap_or((text, text));
        let number = |s: &str| {
            s.trim()
                .parse::<u16>()
                .map_err(|_| format!("{text:?} is not a version range such as 2-3 or 3"))
        };
        let range = VersionRange {
            min: number(min)?,
            max: number(max)?,
        };
        if range.min > range.max {
            return Err(format!("{text:?}: the first version is above the last"));
        }
        if !(SUPPORTED.contains(range.min) && SUPPORTED.contains(range.max)) {
            return Err(format!(
                "{text:?}: this build speaks wire protocol versions {SUPPORTED} only"
            ));
        }
        Ok(range)
    }
}

/// The first frame of the control stream from version 3 on. Frozen for every
/// version: its body is the tag 0 and the agent's newest version, like the start
/// of a version-2 `Hello`, then its oldest.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Opening {
    /// The versions the agent speaks.
    Offer {
        /// Its newest version (3 or more).
        max: u16,
        /// Its oldest version.
        min: u16,
    },
}

/// The controller's answer to an [`Opening::Offer`]. Frozen for every version.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum Negotiated {
    /// Both speak `version`: the agent's `Hello` and everything after it on this
    /// connection use it.
    Accept {
        /// The version chosen (the highest both speak).
        version: u16,
    },
    /// No version in common; the controller closes the connection with
    /// [`CloseCode::VersionMismatch`].
    Reject {
        /// The controller's oldest version.
        min: u16,
        /// The controller's newest version.
        max: u16,
        /// What to upgrade, for the agent's log.
        message: String,
    },
}

/// What the first frame of a control stream is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstFrame {
    /// A version-3-or-later agent's [`Opening::Offer`].
    Offer(VersionRange),
    /// A `Hello` of this version (below [`FIRST_NEGOTIATED_VERSION`]), which
    /// decodes as [`v2::AgentMessage`] when the version is 2.
    LegacyHello(u16),
}

/// Reads the frozen prefix of a control stream's first frame body.
pub fn classify_first_frame(body: &[u8]) -> Result<FirstFrame, FrameError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let ((tag, version), _): ((u32, u16), usize) = bincode::decode_from_slice(body, config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if tag != 0 {
        return Err(FrameError::Malformed(
            "the first frame must be a version offer or Hello".into(),
        ));
    }
    if version < FIRST_NEGOTIATED_VERSION {
        return Ok(FirstFrame::LegacyHello(version));
    }
    let Opening::Offer { max, min } = decode_body::<Opening>(body)?;
    if min > max {
        return Err(FrameError::Malformed(format!(
            "version offer {min}-{max}: the oldest version is above the newest"
        )));
    }
    Ok(FirstFrame::Offer(VersionRange { min, max }))
}

/// A message whose encoding depends on the negotiated protocol version: the
/// current type for the newest version, its frozen [`v2`] form for version 2.
pub trait Versioned: Sized + Clone + Encode + Decode<()> {
    /// The version-2 form.
    type V2: Encode + Decode<()>;
    /// To the version-2 form (fields added since are dropped); `None` for a
    /// message that version 2 does not have.
    fn to_v2(self) -> Option<Self::V2>;
    /// From the version-2 form (fields added since get their defaults).
    fn from_v2(old: Self::V2) -> Self;
}

macro_rules! versioned {
    ($($t:ident),*) => {$(
        impl Versioned for $t {
            type V2 = v2::$t;
            fn to_v2(self) -> Option<v2::$t> {
                Some(v2::Convert::convert(self))
            }
            fn from_v2(old: v2::$t) -> $t {
                v2::Convert::convert(old)
            }
        }
    )*};
}

versioned!(StreamOpen, MetricsBatch, LogChunk);

impl Versioned for AgentMessage {
    type V2 = v2::AgentMessage;
    fn to_v2(self) -> Option<v2::AgentMessage> {
        v2::agent_message_to_v2(self)
    }
    fn from_v2(old: v2::AgentMessage) -> AgentMessage {
        v2::Convert::convert(old)
    }
}

impl Versioned for ControllerMessage {
    type V2 = v2::ControllerMessage;
    fn to_v2(self) -> Option<v2::ControllerMessage> {
        v2::controller_message_to_v2(self)
    }
    fn from_v2(old: v2::ControllerMessage) -> ControllerMessage {
        v2::Convert::convert(old)
    }
}

/// Encodes `msg` as one frame of protocol `version`.
pub fn encode_frame_as<T: Versioned>(version: u16, msg: &T) -> Result<Vec<u8>, FrameError> {
    if version >= FIRST_NEGOTIATED_VERSION {
        encode_frame(msg)
    } else {
        match msg.clone().to_v2() {
            Some(old) => encode_frame(&old),
            None => Err(FrameError::NotInVersion { version }),
        }
    }
}

/// Decodes one frame body of protocol `version`.
pub fn decode_body_as<T: Versioned>(version: u16, body: &[u8]) -> Result<T, FrameError> {
    if version >= FIRST_NEGOTIATED_VERSION {
        decode_body(body)
    } else {
        decode_body::<T::V2>(body).map(T::from_v2)
    }
}

/// Messages the agent sends on the control stream.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum AgentMessage {
    /// The first frame of a connection.
    Hello(Box<Hello>),
    /// Asks for a new certificate for the same identity (renewal before expiry).
    RenewCertificate {
        /// Echoed in the answer.
        request_id: u64,
        /// A PKCS#10 request in PEM, made with the agent's new key.
        csr_pem: String,
    },
    /// The state of every allocation the agent runs (a full report, sent on every
    /// change and at least every few seconds).
    Allocations(AllocationReport),
    /// The node's provider announced that it will take the node away (a spot
    /// interruption notice); the controller moves its allocations before `deadline`.
    SpotNotice {
        /// `terminate`, `stop` or `hibernate`.
        action: String,
        /// When the node goes (Unix ms).
        deadline_unix_ms: u64,
    },
    /// The images on the node, sent when they change (at most
    /// [`MAX_INVENTORY_IMAGES`]). Since protocol 3.
    Images(ImageInventory),
}

/// The most image references one [`ImageInventory`] carries.
pub const MAX_INVENTORY_IMAGES: usize = 4096;

/// The images a node holds, by reference: every `repo:tag` and `repo@sha256:`
/// of every image, sorted, for the scheduler's image locality.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ImageInventory {
    /// The references, sorted, at most [`MAX_INVENTORY_IMAGES`].
    pub images: Vec<String>,
    /// Whether the node holds more than were sent.
    pub truncated: bool,
    /// Bytes of all images on the node.
    pub bytes: u64,
}

/// Messages the controller sends on the control stream.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub enum ControllerMessage {
    /// The answer to [`Hello`].
    Welcome(Welcome),
    /// The controller refuses the connection; it closes it right after.
    Refused(Refusal),
    /// The answer to [`AgentMessage::RenewCertificate`].
    Certificate {
        /// The request this answers.
        request_id: u64,
        /// The signed certificate (PEM), or why it was not signed.
        result: Result<String, String>,
    },
    /// The complete set of allocations this node should run. Level-triggered: each
    /// message replaces the previous one; a lost one is repaired by the next.
    Desired(DesiredAllocations),
    /// Send an allocation's logs on a new uni-stream ([`StreamKind::Logs`]).
    Logs(LogRequest),
    /// The services this node's ingress serves, with their endpoints, and the
    /// rest of the catalog for the agent's DNS. Level-triggered like `Desired`:
    /// each replaces the previous one. Since protocol
    /// version [`INGRESS_SINCE`]; appended, so the variants above keep their
    /// encoding, and never sent to an older agent.
    Ingress(IngressTable),
}

/// The first protocol version whose agents take [`ControllerMessage::Ingress`].
pub const INGRESS_SINCE: u16 = 3;
/// The most services one [`IngressTable`] carries (more are left out, by name).
pub const MAX_INGRESS_SERVICES: usize = 64;
/// The most endpoints one [`IngressService`] carries (with
/// [`MAX_TABLE_ENDPOINTS`]) and of one [`CatalogService`].
pub const MAX_INGRESS_ENDPOINTS: usize = 256;
/// The most services [`IngressTable::others`] carries.
pub const MAX_CATALOG_SERVICES: usize = 256;
/// The most endpoints one [`IngressTable`] carries in all (about 60 bytes each:
/// a full table stays under half of [`MAX_FRAME_LEN`]).
pub const MAX_TABLE_ENDPOINTS: usize = 8192;

/// Every service published through the agents' ingress (`spec.services[].ingress`),
/// each with its healthy endpoints fleet-wide, and every other service with its
/// healthy endpoints, which the agent answers DNS queries from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct IngressTable {
    /// Raised by the controller each time the table changes (informational).
    pub revision: u64,
    /// By name; at most [`MAX_INGRESS_SERVICES`].
    pub services: Vec<IngressService>,
    /// The services that are not published through the ingress, by name; at most
    /// [`MAX_CATALOG_SERVICES`].
    pub others: Vec<CatalogService>,
    /// The fleet's DNS domain, fully qualified (`novacron.`).
    pub dns_domain: String,
}

/// A service of the catalog that the ingress does not publish: what the agent's
/// DNS needs of it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct CatalogService {
    /// The service's name.
    pub name: String,
    /// Its healthy endpoints (TCP and UDP), ordered by allocation; at most
    /// [`MAX_INGRESS_ENDPOINTS`].
    pub endpoints: Vec<IngressEndpoint>,
}

/// One service of an [`IngressTable`].
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct IngressService {
    /// The service's name.
    pub name: String,
    /// The port the ingress listens on, on every node.
    pub port: u16,
    /// How it balances.
    pub protocol: IngressProtocol,
    /// TLS termination, when asked for.
    pub tls: Option<IngressTls>,
    /// The endpoints that may take new requests (healthy ones), ordered by
    /// allocation; at most [`MAX_INGRESS_ENDPOINTS`].
    pub endpoints: Vec<IngressEndpoint>,
}

/// How an ingress balances a service.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Encode, Decode, Serialize, Deserialize,
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum IngressProtocol {
    /// HTTP/1.1 and HTTP/2 (cleartext or over TLS), balanced per request.
    #[default]
    Http,
    /// Any TCP protocol, balanced per connection.
    Tcp,
}

impl fmt::Display for IngressProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IngressProtocol::Http => "http",
            IngressProtocol::Tcp => "tcp",
        })
    }
}

/// The certificate an ingress terminates TLS with: PEM files on the node.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct IngressTls {
    /// The certificate chain.
    pub cert_file: String,
    /// Its private key.
    pub key_file: String,
}

/// Where one replica of a service is reached.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct IngressEndpoint {
    /// The allocation.
    pub alloc: String,
    /// Its address and published port.
    pub address: std::net::SocketAddr,
    /// Its share of traffic against the service's other endpoints (1-256).
    pub weight: u16,
}

/// The agent's introduction. The node name it claims must match its certificate.
#[derive(Debug, Clone, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the agent.
    pub protocol_version: u16,
    /// The agent's build version (informational).
    pub agent_version: String,
    /// The name the agent believes it has; checked against the certificate.
    pub node_name: String,
    /// A random number chosen when the agent process starts. Metrics sequence
    /// numbers are per instance: a new instance starts again from 0.
    pub instance: u64,
    /// Node labels (`zone`, `region`, `pool`, `instance_type`, `capacity`, ...).
    pub labels: BTreeMap<String, String>,
    /// What the node can give to workloads.
    pub capacity: Capacity,
    /// What the node can do.
    pub capabilities: Capabilities,
}

/// The controller's acceptance of a connection.
#[derive(Debug, Clone, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct Welcome {
    /// [`PROTOCOL_VERSION`] of the controller.
    pub protocol_version: u16,
    /// The node name, taken from the certificate.
    pub node_name: String,
    /// The first metrics sequence number the controller has not seen from this node.
    /// The agent resends its buffered samples from here.
    pub next_metrics_seq: u64,
}

/// Why a connection is refused.
#[derive(Debug, Clone, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct Refusal {
    /// The close code that follows.
    pub code: CloseCode,
    /// A human-readable reason.
    pub message: String,
}

/// Allocatable resources of a node.
#[derive(Debug, Clone, Default, PartialEq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Capacity {
    /// CPU in millicores (1000 = one core).
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// Disk in bytes (the data filesystem); `resources.disk` is scheduled
    /// against it.
    pub disk_bytes: u64,
    /// GPUs.
    pub gpus: Vec<GpuInfo>,
    /// The host ports the scheduler hands out for ports without a `hostPort`
    /// (added in protocol version 2).
    #[serde(default)]
    pub dynamic_ports: PortRange,
}

/// First port of the default dynamic host port range.
pub const DEFAULT_DYNAMIC_PORT_FIRST: u16 = 20000;
/// Last port of the default dynamic host port range.
pub const DEFAULT_DYNAMIC_PORT_LAST: u16 = 32000;

/// An inclusive range of host ports (`20000-32000`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PortRange {
    /// The first port.
    pub first: u16,
    /// The last port (inclusive); a range with `last < first` is empty.
    pub last: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange {
            first: DEFAULT_DYNAMIC_PORT_FIRST,
            last: DEFAULT_DYNAMIC_PORT_LAST,
        }
    }
}

impl PortRange {
    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// How many ports the range holds.
    pub fn len(&self) -> u32 {
        (u32::from(self.last) + 1).saturating_sub(u32::from(self.first))
    }

    /// Whether the range holds no port.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// One GPU as the node offers it.
#[derive(Debug, Clone, PartialEq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GpuInfo {
    /// NVML index; a passthrough GPU's index follows NVML's.
    pub index: u32,
    /// Stable identifier: `GPU-...` (NVML's), or `VFIO-<PCI address>` for a
    /// passthrough GPU.
    pub uuid: String,
    /// Model name.
    pub model: String,
    /// Memory in bytes (0 for a passthrough GPU: no driver of the host knows).
    pub memory_bytes: u64,
    /// The PCI address of a GPU bound to `vfio-pci`, which only a virtual
    /// machine can use (passed through whole); `None` for a GPU that the
    /// host's NVIDIA driver holds, which only containers can use. Appended
    /// within protocol 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vfio_address: Option<String>,
}

impl GpuInfo {
    /// The `uuid` of the passthrough GPU at PCI address `address`.
    pub fn vfio_uuid(address: &str) -> String {
        format!("{VFIO_UUID_PREFIX}{address}")
    }

    /// Whether only a virtual machine can use it.
    pub fn is_passthrough(&self) -> bool {
        self.vfio_address.is_some()
    }
}

/// How a passthrough GPU's `uuid` starts.
pub const VFIO_UUID_PREFIX: &str = "VFIO-";

/// What a node can do.
#[derive(Debug, Clone, Default, PartialEq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Capabilities {
    /// Docker engine version, when the daemon answered.
    pub docker_version: Option<String>,
    /// Whether live (CRIU) checkpoints work on this node: the outcome of the
    /// agent's probe, a throwaway checkpoint and restore under its own privileges.
    pub live_checkpoint: bool,
    /// NVIDIA driver version, when NVML loaded.
    pub gpu_driver: Option<String>,
    /// Operating system and kernel, for display.
    pub os: String,
    /// CPU architecture.
    pub arch: String,
    /// Why live checkpoints do not work here (what failed and how to fix it), when
    /// `live_checkpoint` is false; at most [`MAX_LIVE_CHECKPOINT_REASON_LEN`] bytes.
    #[serde(default)]
    pub live_checkpoint_reason: Option<String>,
    /// Virtual machines: QEMU and the accelerator, when the agent can run VMs.
    /// Since protocol 3.
    #[serde(default)]
    pub vm: Option<VmCapability>,
    /// Agent-owned containers: present when the node runs its containers
    /// under runc itself (its `container_runtime` is `runc`), with CRIU
    /// driven directly. Since protocol 3.
    #[serde(default)]
    pub oci: Option<OciCapability>,
}

/// What a node that runs its containers under runc offers.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OciCapability {
    /// runc's version (`1.1.5+ds1`).
    pub runc_version: String,
    /// CRIU's version (`4.2.1`).
    pub criu_version: String,
    /// Whether post-copy migration runs here: the kernel supports CRIU's lazy
    /// pages (`criu check --feature uffd-noncoop`) and pipes may hold CRIU's
    /// 4 MiB of pages (`fs.pipe-max-size`, which the agent raises at start).
    pub lazy_pages: bool,
    /// Whether the kernel tracks dirty memory (`criu check --feature
    /// mem_dirty_track`): pre-copy rounds.
    pub dirty_tracking: bool,
}

/// The most bytes of [`Capabilities::live_checkpoint_reason`].
pub const MAX_LIVE_CHECKPOINT_REASON_LEN: usize = 1024;

impl Capabilities {
    /// Records the outcome of the live checkpoint probe: `Ok` sets
    /// `live_checkpoint`, `Err(why)` clears it and keeps `why` as the reason.
    pub fn set_live_checkpoint(&mut self, outcome: Result<(), String>) {
        self.live_checkpoint = outcome.is_ok();
        self.live_checkpoint_reason = outcome.err();
        self.bound();
    }

    /// Cuts [`Capabilities::live_checkpoint_reason`] to
    /// [`MAX_LIVE_CHECKPOINT_REASON_LEN`] bytes (at a character boundary, with
    /// `...`), so a peer's text cannot grow what the controller stores and shows.
    pub fn bound(&mut self) {
        if let Some(reason) = &mut self.live_checkpoint_reason
            && reason.len() > MAX_LIVE_CHECKPOINT_REASON_LEN
        {
            let mut end = MAX_LIVE_CHECKPOINT_REASON_LEN - 3;
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            reason.truncate(end);
            reason.push_str("...");
        }
    }
}

/// The first frame of every uni-stream: says what the stream carries.
#[derive(Debug, Clone, PartialEq, Encode, Decode)]
pub struct StreamOpen {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub protocol_version: u16,
    /// What follows.
    pub kind: StreamKind,
}

/// The kinds of uni-stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum StreamKind {
    /// [`MetricsBatch`] frames.
    Metrics,
    /// [`LogChunk`] frames answering the [`LogRequest`] with this id.
    Logs {
        /// The request answered.
        request_id: u64,
    },
}

/// A batch of host samples, in sequence order.
#[derive(Debug, Clone, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct MetricsBatch {
    /// The samples, strictly increasing by `seq`; at most [`MAX_SAMPLES_PER_BATCH`].
    pub samples: Vec<NodeSample>,
    /// How many samples the agent has dropped since it started because its
    /// disconnected buffer was full.
    pub dropped_total: u64,
}

/// The allocations a node should run, ordered by `(epoch, generation)`.
#[derive(Debug, Clone, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct DesiredAllocations {
    /// The controller's link epoch: persisted, and raised every time a controller
    /// starts serving (later, every time a leader is elected). A set from a newer
    /// epoch supersedes any set of an older one, whatever their generations; a set
    /// from an older epoch is refused (a deposed or restarted-away controller).
    pub epoch: u64,
    /// Increases with every change of this node's desired set within an epoch.
    pub generation: u64,
    /// Every allocation the node should run; anything else it runs is stopped.
    pub allocations: Vec<AllocationSpec>,
    /// Images to pull ahead (jobs with `prePull` that may run here), at most
    /// [`MAX_PREPULL`]. Since protocol 3.
    pub prepull: Vec<PrePull>,
}

/// The most images one desired set asks a node to pull ahead.
pub const MAX_PREPULL: usize = 256;

/// An image a node pulls before any allocation needs it.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct PrePull {
    /// The reference (the version's recorded digest when it has one).
    pub image: String,
    /// Credentials for its registry.
    pub registry_auth: Option<RegistryAuth>,
}

/// One allocation as the agent runs it.
#[derive(Debug, Clone, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct AllocationSpec {
    /// Allocation id (unique in the fleet).
    pub id: String,
    /// The job it belongs to.
    pub job: String,
    /// The job version it runs.
    pub job_version: u64,
    /// The container.
    pub task: TaskSpec,
    /// Start the container from this checkpoint bundle instead of from scratch
    /// (migration, recovery, rollback). Not part of the spec hash: clearing it once
    /// the allocation runs does not restart the container.
    #[serde(default)]
    pub restore: Option<RestoreFrom>,
    /// A virtual machine the operator suspended (`novacron vm suspend`): the
    /// node keeps its guest paused (QMP `stop`, memory kept, no health checks)
    /// until a set clears this. Not part of the spec hash: suspending or
    /// resuming never restarts anything. Appended in protocol 3.
    #[serde(default)]
    pub suspended: bool,
}

/// The checkpoint an allocation starts from. The agent takes the bundle from its
/// own cache, or fetches it from the controller ([`BiRequest::Fetch`]).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RestoreFrom {
    /// SHA-256 (lowercase hex) of the bundle.
    pub digest: String,
    /// Its size, bytes.
    pub size: u64,
    /// `live` or `fs`.
    pub mode: crate::checkpoint::CheckpointMode,
    /// A virtual machine's live migration from this node instead of a
    /// bundle: the node starts the VM waiting for its state (QEMU's
    /// `-incoming`), which arrives on a [`VmMigrateRequest::Receive`] stream;
    /// `digest` names the migration and `size` is 0. The source is kept so
    /// that a controller that restarted mid-migration can finish or undo it.
    /// Appended in protocol 3.
    #[serde(default)]
    pub incoming_vm: Option<String>,
}

impl RestoreFrom {
    /// The start of a VM that migration `id` moves here live from `source`.
    pub fn incoming_vm(id: &str, source: &str) -> RestoreFrom {
        RestoreFrom {
            digest: id.to_owned(),
            size: 0,
            mode: crate::checkpoint::CheckpointMode::Live,
            incoming_vm: Some(source.to_owned()),
        }
    }
}

/// The container of an allocation.
#[derive(Debug, Clone, Default, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Run to completion (batch): exit 0 completes the allocation. Otherwise
    /// (service, system) any exit counts as a failure and is restarted.
    pub batch: bool,
    /// Image reference, present on the node.
    pub image: String,
    /// Entrypoint override (empty: the image's).
    pub command: Vec<String>,
    /// Arguments.
    pub args: Vec<String>,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Published ports.
    pub ports: Vec<PortMapping>,
    /// Volumes.
    pub volumes: Vec<VolumeMount>,
    /// Working directory.
    pub working_dir: Option<String>,
    /// CPU (millicores; 0 = unlimited).
    pub cpu_millis: u64,
    /// Memory limit in bytes (0 = unlimited).
    pub memory_bytes: u64,
    /// GPU UUIDs assigned to this allocation.
    pub gpu_uuids: Vec<String>,
    /// Restart policy.
    pub restart: RestartSpec,
    /// Health check.
    pub health: Option<HealthSpec>,
    /// Once the allocation leaves the node's desired set (its endpoints have left
    /// the catalog), wait this long before stopping it, so that balancers and
    /// clients move off it first (ms; 0: stop at once). Since protocol 3.
    pub shutdown_delay_ms: u64,
    /// When the agent pulls the image before starting it. Since protocol 3
    /// (agents of version 2 never pull).
    pub pull_policy: PullPolicy,
    /// Values of secrets the task references, each as an environment variable or
    /// a file (the agent writes files to a tmpfs and mounts them read-only). Only
    /// the references (secret, version, key, target) define the container; the
    /// values are never logged ([`SecretBytes`]). Since protocol 3: a version-2
    /// agent does not receive them (upgrade agents before jobs use secrets).
    pub secrets: Vec<SecretUse>,
    /// Registry credentials for the pull, from the job's `imagePullSecret`.
    /// Since protocol 3 (version-2 agents never pull).
    pub registry_auth: Option<RegistryAuth>,
    /// The registry digest `image` resolved to when the job version first ran
    /// (`repo@sha256:...`): the agent checks, pulls and runs this instead of the
    /// tag, so that every replica and migration of the version runs the same
    /// content. Not part of the spec hash: pinning never restarts a container.
    /// `None` for `pullPolicy: always` (which follows the tag) and before the
    /// first report. Since protocol 3.
    pub image_digest: Option<String>,
    /// Run the task as a virtual machine (QEMU) instead of a container: `image`
    /// is then a disk image packaged as a container image (the kernel, initrd
    /// and optional base disk are files in it), which the node pulls and caches
    /// like any image. Since protocol 3; only nodes that report
    /// [`Capabilities::vm`] receive one.
    #[serde(default)]
    pub vm: Option<VmSpec>,
}

/// A virtual machine as the agent runs it (`spec.task.vm` of a job, with its
/// template resolved by the controller).
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VmSpec {
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u64,
    /// Path of the kernel inside the image (direct kernel boot).
    pub kernel: String,
    /// Path of the initrd inside the image, if any.
    pub initrd: Option<String>,
    /// Kernel command line.
    pub cmdline: String,
    /// Path of a base disk (qcow2 or raw) inside the image: the VM boots a
    /// copy-on-write overlay of it. `None`: no disk.
    pub disk: Option<String>,
    /// Size of the overlay disk, bytes (0: the base disk's size).
    pub disk_bytes: u64,
    /// QEMU machine type (`q35`, `pc`, `microvm`).
    pub machine: String,
    /// The template it came from, for display.
    pub template: Option<String>,
    /// Cloud-init user data, given to the guest as a NoCloud seed (a read-only
    /// FAT disk labelled `cidata`); at most [`MAX_VM_USER_DATA`] bytes.
    pub user_data: Option<String>,
    /// How the guest is networked. Appended within protocol 3.
    #[serde(default)]
    pub network: VmNetwork,
    /// The most bytes per second the guest reads and writes on its disk
    /// together (0: unlimited). Appended within protocol 3.
    #[serde(default)]
    pub disk_bytes_per_sec: u64,
    /// The most reads and writes per second on its disk together (0:
    /// unlimited). Appended within protocol 3.
    #[serde(default)]
    pub disk_iops: u64,
    /// The most bytes per second on the guest's network, each way (0:
    /// unlimited; only a guest on the bridge network has a tap to limit).
    /// Appended within protocol 3.
    #[serde(default)]
    pub net_bytes_per_sec: u64,
}

/// How a virtual machine is networked.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Encode, Decode, Serialize, Deserialize,
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum VmNetwork {
    /// QEMU's user-mode network: the guest is reached only through the ports
    /// forwarded to it (from its own loopback address and the node's publish
    /// address), and its traffic out leaves through QEMU.
    #[default]
    User,
    /// A tap device on the node's VM bridge: the guest has an address of the
    /// node's VM range, reached on every port from the node and its other
    /// guests, its published ports forwarded by the node's packet filter, and
    /// its traffic out masqueraded.
    Bridge,
}

impl VmNetwork {
    /// `user` or `bridge`, as manifests name it.
    pub fn as_str(self) -> &'static str {
        match self {
            VmNetwork::User => "user",
            VmNetwork::Bridge => "bridge",
        }
    }
}

/// The most bytes of [`VmSpec::user_data`].
pub const MAX_VM_USER_DATA: usize = 64 * 1024;

/// What a node offers for virtual machines.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VmCapability {
    /// QEMU's version (`7.2.19`).
    pub qemu_version: String,
    /// The accelerator guests run under: `kvm`, or `tcg` where KVM is missing or
    /// cannot boot a guest (the agent's probe).
    pub accelerator: String,
    /// Why KVM is not used, when the accelerator is `tcg`.
    pub kvm_unusable: Option<String>,
    /// Whether the accelerator is settled: chosen at start, or by the first
    /// VM's probe boot. `false`: `kvm` is assumed until that probe, which may
    /// still choose `tcg` (appended within protocol 3).
    #[serde(default)]
    pub probed: bool,
    /// The node's VM bridge (its range, `10.215.7.0/24`) when it has one:
    /// only such nodes run guests on [`VmNetwork::Bridge`]. Appended within
    /// protocol 3.
    #[serde(default)]
    pub bridge: Option<String>,
}

/// Bytes of a secret: [`fmt::Debug`] shows only their length, so that a spec
/// logged with `{:?}` never shows a value.
#[derive(Clone, Default, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct SecretBytes(pub Vec<u8>);

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<secret: {} bytes>", self.0.len())
    }
}

impl SecretBytes {
    /// The value as text (secrets are set as UTF-8 strings), lossily.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

/// One key of one secret version, delivered to a task.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct SecretUse {
    /// The secret's name.
    pub secret: String,
    /// The version delivered (pinned by the job version).
    pub version: u64,
    /// The key within the secret.
    pub key: String,
    /// Where the task sees it.
    pub target: SecretTarget,
    /// The value.
    pub value: SecretBytes,
}

/// Where a task sees a secret value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Encode, Decode, Serialize, Deserialize)]
pub enum SecretTarget {
    /// An environment variable of this name.
    Env(String),
    /// A read-only file at this absolute path in the container (mode 0444).
    File(String),
}

/// Credentials for pulling a task's image (a `registry` secret).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct RegistryAuth {
    /// The secret they come from.
    pub secret: String,
    /// Its version.
    pub version: u64,
    /// The registry they are for (`registry.example:5000`); `None`: the image's.
    pub server: Option<String>,
    /// User name.
    pub username: SecretBytes,
    /// Password or token.
    pub password: SecretBytes,
}

/// When an agent pulls a task's image (`spec.task.pullPolicy`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Encode, Decode, Serialize, Deserialize,
)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum PullPolicy {
    /// Pull only when the node does not have the image (the default).
    #[default]
    IfNotPresent,
    /// Pull before every start, so a moved tag is followed.
    Always,
    /// Never pull: the image must be on the node already.
    Never,
}

impl fmt::Display for PullPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PullPolicy::IfNotPresent => "if-not-present",
            PullPolicy::Always => "always",
            PullPolicy::Never => "never",
        })
    }
}

/// A published port.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct PortMapping {
    /// Name.
    pub name: String,
    /// Port in the container.
    pub container_port: u16,
    /// Host port: the static or dynamic port the scheduler assigned; `None` (from
    /// a controller that did not assign one) lets Docker pick.
    pub host_port: Option<u16>,
    /// `true` for UDP.
    pub udp: bool,
}

/// A mounted volume.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct VolumeMount {
    /// A named volume or an absolute host path.
    pub source: String,
    /// Path in the container.
    pub target: String,
    /// Read-only.
    pub read_only: bool,
}

/// Restart policy on the node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct RestartSpec {
    /// Restarts allowed within `interval_ms`.
    pub attempts: u32,
    /// The window, milliseconds.
    pub interval_ms: u64,
    /// Delay before a restart, milliseconds.
    pub delay_ms: u64,
    /// When attempts run out: `false` fails the allocation, `true` waits for the
    /// window to pass and tries again.
    pub delay_mode: bool,
}

/// The health checks of a task (see the manifest's `health`).
///
/// - **startup**: until it passes, no other check runs; `failure_threshold`
///   consecutive failures restart the container.
/// - **liveness**: `failure_threshold` consecutive failures restart the container,
///   at most `max_restarts` times (waiting `backoff_initial_ms`, doubling up to
///   `backoff_max_ms`), then the allocation fails ([`FailureReason::Unhealthy`]).
/// - **readiness**: failures only mark the allocation not healthy (not ready).
///
/// The reported `healthy` is readiness when there is a readiness check, otherwise
/// liveness, otherwise whether the startup check passed.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct HealthSpec {
    /// Restarts the container when it fails.
    pub liveness: Option<ProbeSpec>,
    /// Marks the allocation not ready when it fails; never restarts.
    pub readiness: Option<ProbeSpec>,
    /// Gates liveness and readiness until it first passes.
    pub startup: Option<ProbeSpec>,
    /// Restarts for failed liveness or startup checks before the allocation fails.
    pub max_restarts: u32,
    /// Wait before the first such restart, milliseconds; it doubles with each.
    pub backoff_initial_ms: u64,
    /// Longest wait before such a restart, milliseconds.
    pub backoff_max_ms: u64,
}

/// One health check and its schedule.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct ProbeSpec {
    /// What to check.
    pub check: HealthCheckKind,
    /// Between checks, milliseconds.
    pub period_ms: u64,
    /// Per check, milliseconds.
    pub timeout_ms: u64,
    /// Consecutive failures before the check counts as failed.
    pub failure_threshold: u32,
    /// Wait after the container started before the first check, milliseconds.
    pub initial_delay_ms: u64,
}

/// Why an allocation failed, for decisions (the message is for people).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum FailureReason {
    /// It exited, or could not start, more often than its restart policy allows.
    RestartsExhausted,
    /// Its liveness or startup check kept failing after its health restarts.
    Unhealthy,
    /// Its image is not on the node.
    ImageMissing,
    /// A batch replica ran longer than its job's `maxRuntime` (decided by the
    /// controller, not reported by an agent).
    MaxRuntime,
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailureReason::RestartsExhausted => "restarts_exhausted",
            FailureReason::Unhealthy => "unhealthy",
            FailureReason::ImageMissing => "image_missing",
            FailureReason::MaxRuntime => "max_runtime",
        })
    }
}

/// Kinds of health check.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub enum HealthCheckKind {
    /// HTTP GET on a container port; 2xx/3xx is healthy.
    Http {
        /// Container port.
        port: u16,
        /// Path.
        path: String,
    },
    /// TCP connect to a container port.
    Tcp {
        /// Container port.
        port: u16,
    },
    /// A command in the container; exit 0 is healthy.
    Exec {
        /// The command.
        command: Vec<String>,
    },
}

/// The agent's report of every allocation it knows.
#[derive(Debug, Clone, Default, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct AllocationReport {
    /// The last desired generation the agent has applied.
    pub generation: u64,
    /// One entry per allocation, desired or still running.
    pub allocations: Vec<AllocationStatus>,
}

/// Allocation states, shared by agent and controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum AllocState {
    /// Placed, not yet started.
    Pending,
    /// Being created or started, or waiting to restart.
    Starting,
    /// Running.
    Running,
    /// Being checkpointed.
    Checkpointing,
    /// Moving to another node.
    Migrating,
    /// Stopped on purpose.
    Stopped,
    /// Exited 0 (batch work done).
    Complete,
    /// Exited non-zero after its restarts, or could not start.
    Failed,
    /// Its node is down.
    Lost,
}

impl AllocState {
    /// Whether the allocation will not run again by itself.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            AllocState::Stopped | AllocState::Complete | AllocState::Failed | AllocState::Lost
        )
    }
}

impl std::fmt::Display for AllocState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            AllocState::Pending => "pending",
            AllocState::Starting => "starting",
            AllocState::Running => "running",
            AllocState::Checkpointing => "checkpointing",
            AllocState::Migrating => "migrating",
            AllocState::Stopped => "stopped",
            AllocState::Complete => "complete",
            AllocState::Failed => "failed",
            AllocState::Lost => "lost",
        };
        f.write_str(s)
    }
}

/// One allocation as the agent sees it.
#[derive(Debug, Clone, PartialEq, Encode, Decode, Serialize, Deserialize)]
pub struct AllocationStatus {
    /// Allocation id.
    pub id: String,
    /// State.
    pub state: AllocState,
    /// Health: `None` without a check or before the first result.
    pub healthy: Option<bool>,
    /// Restarts so far.
    pub restarts: u32,
    /// Last exit code.
    pub exit_code: Option<i64>,
    /// What happened last, for people (`image busybox:nope not found on this node`).
    pub message: String,
    /// Why it failed, when its state is `Failed` (decisions read this, never the
    /// message).
    pub failure: Option<FailureReason>,
    /// The last start tried to restore the allocation's checkpoint and that
    /// failed (corrupt, missing or unusable bundle); cleared once it runs. The
    /// controller then drops the checkpoint and starts from scratch.
    #[serde(default)]
    pub restore_failed: bool,
    /// Container id.
    pub container_id: Option<String>,
    /// When the current run started, Unix ms.
    pub started_at_unix_ms: Option<u64>,
    /// Where its ports are published on the node, as the container runtime bound
    /// them (empty unless it runs). At most [`MAX_PUBLISHED`] entries are read.
    #[serde(default)]
    pub published: Vec<PublishedPort>,
    /// The registry digest of the image its container was made from
    /// (`repo@sha256:...`), when the image came from a registry. Since protocol 3.
    #[serde(default)]
    pub image_digest: Option<String>,
    /// The pull in progress for its start, if any. Since protocol 3.
    #[serde(default)]
    pub pull: Option<PullProgress>,
    /// Its guest is paused on the controller's word
    /// ([`AllocationSpec::suspended`]); its state stays `Running`. Appended in
    /// protocol 3.
    #[serde(default)]
    pub suspended: bool,
    /// The address its node reaches it at while it runs: a container's on
    /// its network, a VM's own (on the node's VM bridge, or its loopback
    /// address under QEMU's user network). Appended in protocol 3.
    #[serde(default)]
    pub address: Option<std::net::IpAddr>,
}

/// How far a pull is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PullProgress {
    /// The image being pulled.
    pub image: String,
    /// Bytes of its layers downloaded so far.
    pub done_bytes: u64,
    /// Bytes of the layers Docker has sized so far (grows while the manifest's
    /// layers are being reached).
    pub total_bytes: u64,
}

impl fmt::Display for PullProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pulling image {}: {:.1} of {:.1} MB",
            self.image,
            self.done_bytes as f64 / 1e6,
            self.total_bytes as f64 / 1e6
        )
    }
}

/// The most published addresses one allocation's status carries (a port bound on
/// IPv4 and IPv6 counts twice); the controller keeps no more than these.
pub const MAX_PUBLISHED: usize = 128;

/// A port of a running container as the runtime published it on the node: the
/// host address and port, and the container port with its protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Encode, Decode, Serialize, Deserialize)]
pub struct PublishedPort {
    /// The address it is bound to on the node (`0.0.0.0` or `::`: every address).
    pub host_ip: std::net::IpAddr,
    /// The port on the node.
    pub host_port: u16,
    /// The port in the container.
    pub container_port: u16,
    /// `true` for UDP.
    pub udp: bool,
}

/// Usage of one allocation.
#[derive(Debug, Clone, Default, PartialEq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AllocationUsage {
    /// Allocation id.
    pub id: String,
    /// CPU, percent of one core.
    pub cpu_percent: f32,
    /// Memory in use, bytes.
    pub memory_bytes: u64,
    /// Memory limit, bytes (0 = none).
    pub memory_limit_bytes: u64,
    /// Receive rate, bytes per second.
    pub rx_bytes_per_sec: u64,
    /// Transmit rate, bytes per second.
    pub tx_bytes_per_sec: u64,
}

/// Asks for an allocation's logs.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct LogRequest {
    /// Echoed in the stream header.
    pub request_id: u64,
    /// The allocation.
    pub allocation: String,
    /// Keep streaming new output.
    pub follow: bool,
    /// Last lines to send first (0: all).
    pub tail: u32,
}

/// A piece of log output.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct LogChunk {
    /// `true` for standard error.
    pub stderr: bool,
    /// The bytes (at most 64 KiB a chunk).
    pub data: Vec<u8>,
    /// Set on the last chunk, with an error message when the logs could not be read.
    pub end: Option<Result<(), String>>,
}

/// The most bytes of output one [`ExecEvent::Output`] carries.
pub const MAX_EXEC_CHUNK: usize = 32 * 1024;
/// The most arguments (program included) of one remote command.
pub const MAX_EXEC_ARGS: usize = 4096;
/// The most bytes all arguments of one remote command may have together.
pub const MAX_EXEC_ARGV_BYTES: usize = 256 * 1024;

/// The first frame of an exec bi-stream: what to run, where, for how long.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ExecRequest {
    /// [`PROTOCOL_VERSION`] of the controller.
    pub protocol_version: u16,
    /// Chosen by the controller, for logs on both ends.
    pub request_id: u64,
    /// Where the command runs.
    pub target: ExecTarget,
    /// The agent kills the command after this many milliseconds (`None`: no limit).
    pub timeout_ms: Option<u64>,
}

/// The first frame of every bi-stream other than the control stream: what the
/// opener asks for. The controller opens `Exec`, `Checkpoint`, `Release` and
/// `Fetch` streams to agents; agents open `Fetch` streams to the controller.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum BiRequest {
    /// Run a command ([`ExecEvent`]s answer).
    Exec(ExecRequest),
    /// Checkpoint an allocation ([`CheckpointReply`] answers).
    Checkpoint(CheckpointRequest),
    /// Send a bundle from an offset ([`FetchReply`], then the raw bytes, answer).
    Fetch(FetchRequest),
    /// Release an allocation held for a migration ([`ReleaseReply`] answers).
    Release(ReleaseRequest),
    /// Run a command with its standard input attached, on a pseudo-terminal or on
    /// pipes (`novacron exec -it`): [`TerminalInput`] frames follow the request,
    /// [`ExecEvent`]s answer. Since protocol version [`TERMINAL_SINCE`]; appended,
    /// so the version-2 variants above keep their encoding.
    Terminal(TerminalRequest),
    /// A read of the controller's image store as an OCI distribution registry
    /// (the agent's loopback registry relays the node's Docker pulls): a
    /// [`RegistryReply`] answers, then, for a `GET` that found something, its
    /// bytes, raw, until the stream ends. Opened by agents; since protocol 3.
    Registry(RegistryRequest),
    /// One side of a virtual machine's live migration (QEMU's own pre-copy),
    /// relayed by the controller from the source's stream to the target's.
    /// Opened by the controller; since protocol [`VM_MIGRATE_SINCE`].
    VmMigrate(VmMigrateRequest),
}

/// The first protocol version whose agents serve [`BiRequest::VmMigrate`].
pub const VM_MIGRATE_SINCE: u16 = 3;

/// The longest piece of migration stream one [`VmSendEvent::Data`] carries.
pub const VM_MIGRATE_CHUNK: usize = 256 * 1024;

/// One side of a VM's live migration.
///
/// - **Send** (source): the agent holds the allocation (no restart, no
///   removal), finds its VM and answers [`VmSendEvent::Ready`]; after the
///   controller's [`VmControl::Go`] it asks QEMU to migrate into a socket of
///   its own and sends what QEMU writes as [`VmSendEvent::Data`], with
///   [`VmSendEvent::Progress`] now and then, until [`VmSendEvent::Done`] (the
///   source is paused) or [`VmSendEvent::Failed`] (it runs on). Then it waits for
///   [`VmControl::Commit`] (the source stays paused until the release removes
///   it) or [`VmControl::Abort`] (or the stream's end): it cancels and resumes
///   the source.
/// - **Receive** (target): the allocation arrived with
///   [`RestoreFrom::incoming_vm`]; the agent waits for its QEMU to listen,
///   answers [`VmReceiveEvent::Ready`], then writes the raw bytes that follow
///   into QEMU until the stream ends, and answers [`VmReceiveEvent::Done`].
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum VmMigrateRequest {
    /// The source's side.
    Send(VmSendRequest),
    /// The target's side.
    Receive(VmReceiveRequest),
    /// The source's side of a runc container's post-copy migration: as
    /// `Send`, but the dump leaves the memory pages behind in a CRIU page
    /// server; the frames end with [`VmSendEvent::Images`] (everything but the
    /// pages was sent: the target can restore), then `Progress` while the
    /// target fetches the pages, then `Done` once all arrived (the source is
    /// gone) or `Failed` (CRIU resumed the source). Appended within protocol
    /// 3; sent only to nodes whose [`OciCapability::lazy_pages`] is set.
    PostCopy(VmSendRequest),
    /// One end of a post-copy migration's page channel, opened by the
    /// controller to both agents and relayed between them: after this frame
    /// the stream carries CRIU's page-server protocol, raw, both ways (the
    /// source's end connects to its page server on loopback; the target's
    /// end is the connection of its `criu lazy-pages` daemon).
    Pages(PagesRequest),
}

/// [`VmMigrateRequest::Pages`].
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct PagesRequest {
    /// [`PROTOCOL_VERSION`] of the controller.
    pub protocol_version: u16,
    /// The allocation.
    pub alloc_id: String,
    /// The source's end (its page server) rather than the target's.
    pub source: bool,
    /// How long to wait for this end to be ready, milliseconds.
    pub wait_ms: u64,
}

/// [`VmMigrateRequest::Send`].
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct VmSendRequest {
    /// [`PROTOCOL_VERSION`] of the controller.
    pub protocol_version: u16,
    /// The allocation.
    pub alloc_id: String,
    /// Carry the VM's own disk in the stream (block migration), when it has
    /// one; a snapshot copies the disk itself instead.
    pub with_disk: bool,
    /// How long the hold lasts without a release, milliseconds.
    pub hold_ms: u64,
    /// The longest pause QEMU may plan for the final copy (`downtime-limit`).
    pub downtime_limit_ms: u64,
    /// How long the guest may run while its memory is copied: past it the
    /// guest is paused so that the copy ends (a busy guest may never
    /// converge otherwise).
    pub converge_ms: u64,
    /// How long the whole transfer may take before it is cancelled.
    pub limit_ms: u64,
}

/// [`VmMigrateRequest::Receive`].
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct VmReceiveRequest {
    /// [`PROTOCOL_VERSION`] of the controller.
    pub protocol_version: u16,
    /// The allocation.
    pub alloc_id: String,
    /// How long to wait for the VM to be ready to receive, milliseconds.
    pub wait_ms: u64,
}

/// What the controller says on a send stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum VmControl {
    /// The target is ready: start.
    Go,
    /// The target runs: leave the source paused.
    Commit,
    /// Give up: resume the source.
    Abort,
}

/// How a VM's migration goes, from QEMU's `query-migrate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VmMigrationProgress {
    /// QEMU's word: `setup`, `active`, `device`, `completed`, `failed`, ...
    pub status: String,
    /// Bytes of memory sent so far.
    pub transferred: u64,
    /// Bytes of memory still to send.
    pub remaining: u64,
    /// The guest's memory, bytes.
    pub total: u64,
    /// Passes over the guest's memory (QEMU's dirty sync count).
    pub rounds: u64,
    /// Pages the guest dirties per second.
    pub dirty_pages_rate: u64,
    /// Milliseconds since the migration began.
    pub elapsed_ms: u64,
    /// The guest's pause, once completed (QEMU's `downtime`), milliseconds.
    pub downtime_ms: Option<u64>,
    /// The guest was paused by the agent because it did not converge in time.
    pub forced_pause: bool,
    /// The longest pause QEMU was told to plan for (`downtime-limit`), ms.
    #[serde(default)]
    pub downtime_limit_ms: u64,
}

/// A frame from the source of a VM's migration.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum VmSendEvent {
    /// The allocation is held and its VM found.
    Ready,
    /// The next piece of QEMU's migration stream (at most [`VM_MIGRATE_CHUNK`]).
    Data(Vec<u8>),
    /// How it goes.
    Progress(VmMigrationProgress),
    /// Everything was sent; the source is paused.
    Done(VmMigrationProgress),
    /// It failed; the source runs on.
    Failed(String),
    /// Post-copy only: everything but the memory pages was sent (the
    /// container is frozen on the source, its pages wait in the page
    /// server); the controller ends the target's stream and opens the page
    /// channel ([`VmMigrateRequest::Pages`]). Appended within protocol 3.
    Images(VmMigrationProgress),
}

/// A frame from the target of a VM's migration.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum VmReceiveEvent {
    /// Its QEMU waits for the stream.
    Ready,
    /// The stream was written into QEMU (or why not).
    Done(Result<(), String>),
}

/// A `GET` or `HEAD` of the distribution API, relayed over the link.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct RegistryRequest {
    /// [`PROTOCOL_VERSION`] of the asker.
    pub protocol_version: u16,
    /// `HEAD` (headers only) rather than `GET`.
    pub head: bool,
    /// The path after `/v2/`: `team/api/manifests/1.4`,
    /// `team/api/blobs/sha256:...` (at most [`MAX_REGISTRY_PATH`] bytes).
    pub path: String,
}

/// The longest [`RegistryRequest::path`].
pub const MAX_REGISTRY_PATH: usize = 1024;

/// The answer to a [`RegistryRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct RegistryReply {
    /// The HTTP status: 200, or 404 (not stored), 400 (a bad path).
    pub status: u16,
    /// The content's media type (manifests) or `application/octet-stream`.
    pub media_type: String,
    /// Its digest (`sha256:...`), when found.
    pub digest: Option<String>,
    /// Its length in bytes (the bytes that follow a `GET`).
    pub length: u64,
    /// Why not found or refused, for the registry's error body.
    pub message: String,
}

/// The first protocol version whose agents serve [`BiRequest::Terminal`].
pub const TERMINAL_SINCE: u16 = 3;

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
pub struct TerminalSize {
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

impl TerminalSize {
    /// The size with each side kept within 1..=[`MAX_TERMINAL_SIDE`].
    pub fn bounded(self) -> TerminalSize {
        TerminalSize {
            cols: self.cols.clamp(1, MAX_TERMINAL_SIDE),
            rows: self.rows.clamp(1, MAX_TERMINAL_SIDE),
        }
    }
}

/// The most columns or rows a remote terminal may have.
pub const MAX_TERMINAL_SIDE: u16 = 4096;

/// The first frame of an interactive exec stream.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct TerminalRequest {
    /// [`PROTOCOL_VERSION`] of the controller.
    pub protocol_version: u16,
    /// Chosen by the controller, for logs on both ends.
    pub request_id: u64,
    /// Where the command runs.
    pub target: ExecTarget,
    /// `Some`: on a pseudo-terminal of this size (its output comes back as
    /// [`ExecStream::Stdout`] only, as a terminal merges it); `None`: on pipes.
    pub tty: Option<TerminalSize>,
    /// The agent kills the command after this many milliseconds (`None`: no limit).
    pub timeout_ms: Option<u64>,
}

/// What the controller sends on an interactive exec stream after the request.
/// Ending (or resetting) its side of the stream cancels the command, as for
/// [`ExecRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum TerminalInput {
    /// Bytes for the command's standard input, at most [`MAX_EXEC_CHUNK`].
    Stdin(Vec<u8>),
    /// The terminal was resized (ignored on pipes).
    Resize(TerminalSize),
    /// Standard input ends: the pipe closes, or a terminal reads end-of-file.
    EndOfInput,
}

/// Checkpoint one allocation the agent runs.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct CheckpointRequest {
    /// [`PROTOCOL_VERSION`] of the controller.
    pub protocol_version: u16,
    /// The allocation.
    pub alloc_id: String,
    /// `live`, `fs` or `auto` (the agent resolves `auto` by its capability).
    pub mode: crate::checkpoint::CheckpointMode,
    /// `true` (migration): the container stays stopped after the dump and the agent
    /// holds the allocation (no restart, no removal) until a [`ReleaseRequest`] or
    /// the hold's expiry. `false` (periodic, manual): the workload keeps running.
    pub stop: bool,
    /// How long the hold lasts without a release, milliseconds.
    pub hold_ms: u64,
}

/// The answer to a [`CheckpointRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct CheckpointReply {
    /// The bundle, in the agent's cache; or why none was made.
    pub result: Result<crate::checkpoint::BundleInfo, String>,
}

/// Ask for a bundle's bytes from `offset` on (resumable transfer).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct FetchRequest {
    /// [`PROTOCOL_VERSION`] of the asker.
    pub protocol_version: u16,
    /// SHA-256 (lowercase hex) of the bundle.
    pub digest: String,
    /// The first byte wanted.
    pub offset: u64,
}

/// The answer to a [`FetchRequest`]; on `Ok(size)` the bytes from the offset to
/// `size` follow, raw, until the stream ends.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct FetchReply {
    /// The bundle's whole size, or why it cannot be sent.
    pub result: Result<u64, String>,
}

/// End the hold on an allocation.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ReleaseRequest {
    /// [`PROTOCOL_VERSION`] of the controller.
    pub protocol_version: u16,
    /// The allocation.
    pub alloc_id: String,
    /// Restore it from this bundle (a rolled-back migration) rather than restart
    /// the stopped container; applies at once, whether or not the desired set that
    /// says the same has arrived yet.
    pub restore: Option<RestoreFrom>,
}

/// The answer to a [`ReleaseRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ReleaseReply {
    /// `Ok` once released (also when it was not held).
    pub result: Result<(), String>,
}

/// Where a remote command runs.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum ExecTarget {
    /// On the node itself, if the agent's configuration allows host exec.
    Host {
        /// Program and arguments (no shell).
        argv: Vec<String>,
    },
    /// Inside the container of one allocation the agent runs.
    Allocation {
        /// The allocation id.
        alloc_id: String,
        /// Program and arguments (no shell).
        argv: Vec<String>,
    },
}

impl ExecTarget {
    /// The command.
    pub fn argv(&self) -> &[String] {
        match self {
            ExecTarget::Host { argv } | ExecTarget::Allocation { argv, .. } => argv,
        }
    }
}

/// Why a command line cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgvError {
    /// No program.
    #[error("the command is empty; give a program and its arguments")]
    Empty,
    /// The program is an empty string.
    #[error("the program (first argument) is an empty string")]
    EmptyProgram,
    /// Too many arguments.
    #[error("{count} arguments exceed the maximum of {MAX_EXEC_ARGS}")]
    TooMany {
        /// How many were given.
        count: usize,
    },
    /// The arguments are too long together.
    #[error("the arguments take {bytes} bytes, more than the maximum of {MAX_EXEC_ARGV_BYTES}")]
    TooLong {
        /// Their total length.
        bytes: usize,
    },
    /// An argument holds a NUL byte, which no program can receive.
    #[error("argument {index} contains a NUL byte")]
    Nul {
        /// Its position (0: the program).
        index: usize,
    },
}

/// Checks a command line against the protocol's limits.
pub fn check_argv(argv: &[String]) -> Result<(), ArgvError> {
    let program = argv.first().ok_or(ArgvError::Empty)?;
    if program.is_empty() {
        return Err(ArgvError::EmptyProgram);
    }
    if argv.len() > MAX_EXEC_ARGS {
        return Err(ArgvError::TooMany { count: argv.len() });
    }
    let bytes: usize = argv.iter().map(String::len).sum();
    if bytes > MAX_EXEC_ARGV_BYTES {
        return Err(ArgvError::TooLong { bytes });
    }
    if let Some(index) = argv.iter().position(|a| a.contains('\0')) {
        return Err(ArgvError::Nul { index });
    }
    Ok(())
}

/// The output stream a chunk came from.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// What the agent reports on an exec stream.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum ExecEvent {
    /// The command runs.
    Started {
        /// Its process id on the node (for containers: in the host's namespace),
        /// when known.
        pid: Option<u32>,
    },
    /// A piece of output, at most [`MAX_EXEC_CHUNK`] bytes.
    Output {
        /// Which stream.
        stream: ExecStream,
        /// The bytes.
        data: Vec<u8>,
    },
    /// The command ended; the last frame.
    Exited {
        /// The exit code (128 + the signal number when a signal ended it).
        code: i32,
        /// The signal that ended it, when one did.
        signal: Option<i32>,
        /// The agent killed it because its time limit passed.
        timed_out: bool,
    },
    /// The agent will not run the command (configuration, unknown allocation); the
    /// only frame.
    Refused {
        /// Why, and what would be accepted.
        reason: String,
    },
    /// The command could not be started (program not found, runtime error); the
    /// only frame after `Started`, if any.
    Failed {
        /// Why.
        reason: String,
        /// The exit code to report: 127 not found, 126 not executable, 125 other.
        code: i32,
    },
}

/// One reading of a host's metrics.
#[derive(Debug, Clone, Default, PartialEq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeSample {
    /// Per-node sequence number, from 0, without gaps on the agent side.
    pub seq: u64,
    /// When the sample was taken, Unix milliseconds (agent clock).
    pub at_unix_ms: u64,
    /// CPU.
    pub cpu: CpuSample,
    /// Memory and swap.
    pub memory: MemorySample,
    /// Mounted filesystems.
    pub disks: Vec<DiskSample>,
    /// Network interfaces.
    pub networks: Vec<NetworkSample>,
    /// GPUs (empty when the host has none or NVML does not load).
    pub gpus: Vec<GpuSample>,
    /// Seconds since boot.
    pub uptime_secs: u64,
    /// Usage of each allocation on the node.
    pub allocations: Vec<AllocationUsage>,
}

/// CPU usage.
#[derive(Debug, Clone, Default, PartialEq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CpuSample {
    /// Whole-host usage, 0–100.
    pub total_percent: f32,
    /// Usage per logical core, 0–100.
    pub per_core_percent: Vec<f32>,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f32; 3],
    /// CPU time since boot, all cores together (added in protocol version 3;
    /// absent from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds_total: Option<CpuSeconds>,
}

/// Cumulative CPU time since boot by mode, seconds, summed over all cores (the
/// host's `/proc/stat`; node_exporter's `node_cpu_seconds_total` modes).
#[derive(Debug, Clone, Default, PartialEq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CpuSeconds {
    /// Normal processes in user mode.
    pub user: f64,
    /// Niced processes in user mode.
    pub nice: f64,
    /// Kernel mode.
    pub system: f64,
    /// Idle.
    pub idle: f64,
    /// Waiting for I/O.
    pub iowait: f64,
    /// Servicing interrupts.
    pub irq: f64,
    /// Servicing soft interrupts.
    pub softirq: f64,
    /// Taken by the hypervisor for other guests.
    pub steal: f64,
}

impl CpuSeconds {
    /// The modes and their seconds, in node_exporter's names.
    pub fn modes(&self) -> [(&'static str, f64); 8] {
        [
            ("user", self.user),
            ("nice", self.nice),
            ("system", self.system),
            ("idle", self.idle),
            ("iowait", self.iowait),
            ("irq", self.irq),
            ("softirq", self.softirq),
            ("steal", self.steal),
        ]
    }
}

/// Memory usage.
#[derive(Debug, Clone, Default, PartialEq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MemorySample {
    /// Total memory in bytes.
    pub total_bytes: u64,
    /// Used memory in bytes.
    pub used_bytes: u64,
    /// Available memory in bytes.
    pub available_bytes: u64,
    /// Total swap in bytes.
    pub swap_total_bytes: u64,
    /// Used swap in bytes.
    pub swap_used_bytes: u64,
}

/// One mounted filesystem.
#[derive(Debug, Clone, Default, PartialEq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DiskSample {
    /// Mount point.
    pub mount: String,
    /// Device name.
    pub device: String,
    /// Size in bytes.
    pub total_bytes: u64,
    /// Free space available to unprivileged users, in bytes.
    pub available_bytes: u64,
    /// Read rate since the previous sample, bytes per second.
    pub read_bytes_per_sec: u64,
    /// Write rate since the previous sample, bytes per second.
    pub written_bytes_per_sec: u64,
    /// Bytes read from the device since boot (added in protocol version 3;
    /// absent from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bytes_total: Option<u64>,
    /// Bytes written to the device since boot (protocol version 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written_bytes_total: Option<u64>,
    /// Space in use, in bytes, as `df` counts it: the size less the free blocks.
    /// Blocks reserved for root are neither used nor available, so `total_bytes -
    /// available_bytes` overstates it (by 5% of an ext4 disk, or far more). 0 from
    /// an agent that did not report it (see [`DiskSample::used`]).
    #[serde(default)]
    pub used_bytes: u64,
}

impl DiskSample {
    /// Space in use: [`used_bytes`](DiskSample::used_bytes), or, from an agent
    /// that did not report it, the size less the available space (which counts
    /// reserved blocks as used).
    pub fn used(&self) -> u64 {
        if self.used_bytes > 0 {
            self.used_bytes
        } else {
            self.total_bytes.saturating_sub(self.available_bytes)
        }
    }

    /// `df`'s `Use%`: used over used plus available (what unprivileged users can
    /// fill), rounded up to a whole percent; `None` for an empty filesystem.
    pub fn use_percent(&self) -> Option<u64> {
        let used = u128::from(self.used());
        let whole = used + u128::from(self.available_bytes);
        (whole > 0).then(|| u64::try_from((used * 100).div_ceil(whole)).unwrap_or(100))
    }
}

/// One network interface.
#[derive(Debug, Clone, Default, PartialEq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NetworkSample {
    /// Interface name.
    pub interface: String,
    /// Receive rate, bytes per second.
    pub rx_bytes_per_sec: u64,
    /// Transmit rate, bytes per second.
    pub tx_bytes_per_sec: u64,
    /// Bytes received since boot (added in protocol version 3; absent from older
    /// agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_bytes_total: Option<u64>,
    /// Bytes transmitted since boot (protocol version 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_bytes_total: Option<u64>,
}

/// One GPU reading.
#[derive(Debug, Clone, Default, PartialEq, Encode, Decode, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GpuSample {
    /// NVML index.
    pub index: u32,
    /// Stable identifier.
    pub uuid: String,
    /// Model name.
    pub name: String,
    /// GPU utilization, 0–100.
    pub utilization_percent: u32,
    /// Memory used, bytes.
    pub memory_used_bytes: u64,
    /// Memory total, bytes.
    pub memory_total_bytes: u64,
    /// Temperature, degrees Celsius.
    pub temperature_celsius: u32,
    /// Power draw, milliwatts.
    pub power_milliwatts: u32,
}

/// Encodes `msg` as one frame (length prefix plus body).
pub fn encode_frame<T: Encode>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; 4];
    bincode::encode_into_std_write(msg, &mut out, config())
        .map_err(|e| FrameError::Encode(e.to_string()))?;
    let body_len = out.len() - 4;
    if body_len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: body_len,
            max: MAX_FRAME_LEN,
        });
    }
    // The check above bounds body_len by MAX_FRAME_LEN, which fits in a u32.
    out[..4].copy_from_slice(&(body_len as u32).to_be_bytes());
    Ok(out)
}

/// Decodes one frame body (without the length prefix).
pub fn decode_body<T: Decode<()>>(body: &[u8]) -> Result<T, FrameError> {
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let (msg, used) = bincode::decode_from_slice(body, config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(FrameError::Trailing {
            trailing: body.len() - used,
        });
    }
    Ok(msg)
}

/// Decodes the first frame in `buf` (length prefix plus body). Returns the message and
/// the number of bytes it took, or `Ok(None)` if `buf` does not yet hold a whole frame.
pub fn decode_frame<T: Decode<()>>(buf: &[u8]) -> Result<Option<(T, usize)>, FrameError> {
    let Some(prefix) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let Some(body) = buf.get(4..4 + len) else {
        return Ok(None);
    };
    Ok(Some((decode_body(body)?, 4 + len)))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_live_checkpoint_reason_is_kept_and_bounded() {
        let mut caps = Capabilities::default();
        caps.set_live_checkpoint(Err("no experimental daemon".into()));
        assert!(!caps.live_checkpoint);
        assert_eq!(
            caps.live_checkpoint_reason.as_deref(),
            Some("no experimental daemon")
        );
        caps.set_live_checkpoint(Err("é".repeat(MAX_LIVE_CHECKPOINT_REASON_LEN)));
        let reason = caps.live_checkpoint_reason.clone().expect("reason");
        assert!(
            reason.len() <= MAX_LIVE_CHECKPOINT_REASON_LEN,
            "{}",
            reason.len()
        );
        assert!(reason.ends_with("..."));
        caps.set_live_checkpoint(Ok(()));
        assert!(caps.live_checkpoint);
        assert_eq!(caps.live_checkpoint_reason, None);
        let decoded: Capabilities = serde_json::from_str(
            r#"{"docker_version":null,"live_checkpoint":true,"gpu_driver":null,"os":"l","arch":"x"}"#,
        )
        .expect("a record stored before the reason existed");
        assert_eq!(decoded.live_checkpoint_reason, None);
    }

    fn sample_strategy() -> impl Strategy<Value = NodeSample> {
        (
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(0f32..100.0, 0..64),
            any::<[u64; 5]>(),
            prop::collection::vec(("[a-z/]{0,20}", any::<u64>(), any::<u64>()), 0..8),
            prop::collection::vec(("[a-z0-9]{0,15}", any::<u64>(), any::<u64>()), 0..8),
        )
            .prop_map(|(seq, at, cores, mem, disks, nets)| NodeSample {
                seq,
                at_unix_ms: at,
                cpu: CpuSample {
                    total_percent: cores.first().copied().unwrap_or_default(),
                    per_core_percent: cores,
                    load: [0.5, 1.0, 1.5],
                    seconds_total: Some(CpuSeconds {
                        user: 1.5,
                        idle: 20.25,
                        ..CpuSeconds::default()
                    }),
                },
                memory: MemorySample {
                    total_bytes: mem[0],
                    used_bytes: mem[1],
                    available_bytes: mem[2],
                    swap_total_bytes: mem[3],
                    swap_used_bytes: mem[4],
                },
                disks: disks
                    .into_iter()
                    .map(|(mount, total, avail)| DiskSample {
                        mount,
                        device: "vda".into(),
                        total_bytes: total,
                        available_bytes: avail,
                        read_bytes_per_sec: 1,
                        written_bytes_per_sec: 2,
                        read_bytes_total: Some(total),
                        written_bytes_total: None,
                        used_bytes: total.saturating_sub(avail) / 2,
                    })
                    .collect(),
                networks: nets
                    .into_iter()
                    .map(|(interface, rx, tx)| NetworkSample {
                        interface,
                        rx_bytes_per_sec: rx,
                        tx_bytes_per_sec: tx,
                        rx_bytes_total: Some(rx),
                        tx_bytes_total: Some(tx),
                    })
                    .collect(),
                gpus: vec![],
                uptime_secs: 7,
                allocations: vec![],
            })
    }

    proptest! {
        #[test]
        fn metrics_batch_round_trips(samples in prop::collection::vec(sample_strategy(), 0..8), dropped in any::<u64>()) {
            let batch = MetricsBatch { samples, dropped_total: dropped };
            let frame = encode_frame(&batch).expect("a small batch encodes");
            let (back, used) = decode_frame::<MetricsBatch>(&frame).expect("decodes").expect("whole frame");
            prop_assert_eq!(used, frame.len());
            prop_assert_eq!(back, batch);
        }

        #[test]
        fn hello_round_trips(name in "[a-z0-9-]{1,40}", labels in prop::collection::btree_map("[a-z]{1,8}", "[a-z0-9]{0,8}", 0..6), cpu in any::<u64>()) {
            let msg = AgentMessage::Hello(Box::new(Hello {
                protocol_version: PROTOCOL_VERSION,
                agent_version: "0.1.0".into(),
                node_name: name,
                instance: 42,
                labels,
                capacity: Capacity { cpu_millis: cpu, ..Capacity::default() },
                capabilities: Capabilities::default(),
            }));
            let frame = encode_frame(&msg).expect("encodes");
            let (back, _) = decode_frame::<AgentMessage>(&frame).expect("decodes").expect("whole");
            prop_assert_eq!(back, msg);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<AgentMessage>(&bytes);
            let _ = decode_frame::<MetricsBatch>(&bytes);
            let _ = decode_body::<ControllerMessage>(&bytes);
            let _ = classify_first_frame(&bytes);
            let _ = decode_body::<Negotiated>(&bytes);
            let _ = decode_body_as::<AgentMessage>(2, &bytes);
            let _ = decode_body_as::<MetricsBatch>(2, &bytes);
        }

        #[test]
        fn partial_frames_wait_for_more(cut in 0usize..40) {
            let frame = encode_frame(&ControllerMessage::Refused(Refusal { code: CloseCode::Revoked, message: "node revoked".into() })).expect("encodes");
            let cut = cut.min(frame.len() - 1);
            prop_assert!(decode_frame::<ControllerMessage>(&frame[..cut]).expect("no error on a prefix").is_none());
        }
    }

    #[test]
    fn oversized_length_prefix_is_refused_without_allocating() {
        let buf = u32::MAX.to_be_bytes();
        let err = decode_frame::<MetricsBatch>(&buf).expect_err("must refuse");
        assert!(matches!(err, FrameError::TooLarge { len, .. } if len == u32::MAX as usize));
        assert_eq!(err.close_code(), CloseCode::FrameTooLarge);
    }

    #[test]
    fn forged_inner_vec_length_is_refused() {
        // A MetricsBatch whose sample vector claims u64::MAX entries (varint 0xFF + 8 bytes).
        let mut body = vec![0xFFu8];
        body.extend_from_slice(&u64::MAX.to_le_bytes());
        let err = decode_body::<MetricsBatch>(&body).expect_err("must refuse");
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut frame = encode_frame(&StreamOpen {
            protocol_version: 1,
            kind: StreamKind::Metrics,
        })
        .expect("encodes");
        frame.push(0);
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_be_bytes());
        let err = decode_frame::<StreamOpen>(&frame).expect_err("must refuse");
        assert!(matches!(err, FrameError::Trailing { trailing: 1 }));
    }

    proptest! {
        #[test]
        fn exec_frames_round_trip(argv in prop::collection::vec("[ -~]{0,20}", 1..8), timeout in proptest::option::of(any::<u64>()), data in prop::collection::vec(any::<u8>(), 0..2048), code in any::<i32>()) {
            let request = ExecRequest {
                protocol_version: PROTOCOL_VERSION,
                request_id: 9,
                target: ExecTarget::Allocation { alloc_id: "a-1".into(), argv: argv.clone() },
                timeout_ms: timeout,
            };
            let frame = encode_frame(&request).expect("encodes");
            let (back, used) = decode_frame::<ExecRequest>(&frame).expect("decodes").expect("whole");
            prop_assert_eq!(used, frame.len());
            prop_assert_eq!(back.target.argv(), &argv[..]);
            prop_assert_eq!(back, request);
            for event in [
                ExecEvent::Started { pid: Some(42) },
                ExecEvent::Output { stream: ExecStream::Stderr, data: data.clone() },
                ExecEvent::Exited { code, signal: None, timed_out: true },
                ExecEvent::Refused { reason: "host exec is disabled".into() },
                ExecEvent::Failed { reason: "not found".into(), code: 127 },
            ] {
                let frame = encode_frame(&event).expect("encodes");
                let (back, _) = decode_frame::<ExecEvent>(&frame).expect("decodes").expect("whole");
                prop_assert_eq!(back, event);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_exec(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame::<ExecRequest>(&bytes);
            let _ = decode_body::<ExecEvent>(&bytes);
        }
    }

    #[test]
    fn a_full_output_chunk_fits_in_a_frame() {
        let event = ExecEvent::Output {
            stream: ExecStream::Stdout,
            data: vec![0xFF; MAX_EXEC_CHUNK],
        };
        let frame = encode_frame(&event).expect("a maximal chunk encodes");
        assert!(frame.len() < MAX_FRAME_LEN);
        let request = ExecRequest {
            protocol_version: PROTOCOL_VERSION,
            request_id: 1,
            target: ExecTarget::Host {
                argv: vec!["x".repeat(MAX_EXEC_ARGV_BYTES)],
            },
            timeout_ms: None,
        };
        assert!(
            encode_frame(&request).is_ok(),
            "maximal argv fits in a frame"
        );
    }

    #[test]
    fn argv_limits() {
        let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(check_argv(&s(&["uptime"])), Ok(()));
        assert_eq!(check_argv(&[]), Err(ArgvError::Empty));
        assert_eq!(check_argv(&s(&["", "x"])), Err(ArgvError::EmptyProgram));
        assert_eq!(
            check_argv(&s(&["echo", "a\0b"])),
            Err(ArgvError::Nul { index: 1 })
        );
        let many = vec!["x".to_string(); MAX_EXEC_ARGS + 1];
        assert_eq!(
            check_argv(&many),
            Err(ArgvError::TooMany {
                count: MAX_EXEC_ARGS + 1
            })
        );
        let long = vec!["x".repeat(MAX_EXEC_ARGV_BYTES), "y".into()];
        assert!(matches!(check_argv(&long), Err(ArgvError::TooLong { .. })));
        assert!(
            ArgvError::TooMany { count: 5000 }
                .to_string()
                .contains("4096")
        );
    }

    #[test]
    fn vm_migration_frames_round_trip_and_a_chunk_fits_a_frame() {
        let request = BiRequest::VmMigrate(VmMigrateRequest::Send(VmSendRequest {
            protocol_version: PROTOCOL_VERSION,
            alloc_id: "vm-1".into(),
            with_disk: true,
            hold_ms: 600_000,
            downtime_limit_ms: 300,
            converge_ms: 90_000,
            limit_ms: 300_000,
        }));
        let frame = encode_frame(&request).expect("encodes");
        let (back, _) = decode_frame::<BiRequest>(&frame)
            .expect("decodes")
            .expect("whole");
        assert_eq!(back, request);
        // The largest piece of migration stream, with its framing, stays
        // under the frame limit.
        let data = VmSendEvent::Data(vec![0xa5; VM_MIGRATE_CHUNK]);
        let frame = encode_frame(&data).expect("encodes");
        assert!(frame.len() < MAX_FRAME_LEN);
        let (back, _) = decode_frame::<VmSendEvent>(&frame)
            .expect("decodes")
            .expect("whole");
        assert_eq!(back, data);
        for control in [VmControl::Go, VmControl::Commit, VmControl::Abort] {
            let frame = encode_frame(&control).expect("encodes");
            let (back, _) = decode_frame::<VmControl>(&frame)
                .expect("decodes")
                .expect("whole");
            assert_eq!(back, control);
        }
        // The mark of a live VM arrival survives the store's JSON, and an old
        // record without it reads as a bundle restore.
        let incoming = RestoreFrom::incoming_vm("m-7", "node-a");
        let json = serde_json::to_string(&incoming).expect("json");
        assert_eq!(
            serde_json::from_str::<RestoreFrom>(&json).expect("back"),
            incoming
        );
        let old: RestoreFrom =
            serde_json::from_str(r#"{"digest":"ab","size":1,"mode":"live"}"#).expect("old");
        assert_eq!(old.incoming_vm, None);
    }

    #[test]
    fn terminal_frames_round_trip() {
        let size = TerminalSize {
            cols: 120,
            rows: 40,
        };
        let request = BiRequest::Terminal(TerminalRequest {
            protocol_version: PROTOCOL_VERSION,
            request_id: 9,
            target: ExecTarget::Host {
                argv: vec!["sh".into()],
            },
            tty: Some(size),
            timeout_ms: Some(1_000),
        });
        let frame = encode_frame(&request).expect("encodes");
        let (back, used) = decode_frame::<BiRequest>(&frame)
            .expect("decodes")
            .expect("whole");
        assert_eq!((back, used), (request, frame.len()));
        for input in [
            TerminalInput::Stdin(b"ls\r".to_vec()),
            TerminalInput::Resize(size),
            TerminalInput::EndOfInput,
        ] {
            let frame = encode_frame(&input).expect("encodes");
            let (back, _) = decode_frame::<TerminalInput>(&frame)
                .expect("decodes")
                .expect("whole");
            assert_eq!(back, input);
        }
        let huge = TerminalSize {
            cols: u16::MAX,
            rows: 0,
        }
        .bounded();
        assert_eq!((huge.cols, huge.rows), (MAX_TERMINAL_SIDE, 1));
    }

    #[test]
    fn the_highest_common_version_wins() {
        let r = |min, max| VersionRange { min, max };
        assert_eq!(r(2, 3).negotiate(r(2, 3), "controller", "agent"), Ok(3));
        assert_eq!(r(2, 3).negotiate(r(2, 2), "controller", "agent"), Ok(2));
        assert_eq!(r(2, 2).negotiate(r(2, 3), "controller", "agent"), Ok(2));
        assert_eq!(r(2, 3).negotiate(r(3, 4), "controller", "agent"), Ok(3));
        let old = r(3, 3)
            .negotiate(r(2, 2), "controller", "agent")
            .expect_err("no overlap");
        assert!(matches!(old, VersionMismatch::PeerTooOld { .. }));
        assert_eq!(
            old.to_string(),
            "the agent speaks wire protocol versions 2, this controller speaks 3: upgrade the agent to a release that speaks version 3 or later"
        );
        let new = r(2, 2)
            .negotiate(r(3, 3), "controller", "agent")
            .expect_err("no overlap");
        assert!(
            new.to_string()
                .ends_with("upgrade this controller to a release that speaks version 3 or later"),
            "{new}"
        );
    }

    #[test]
    fn version_ranges_parse_within_what_the_build_speaks() {
        assert_eq!(VersionRange::parse_within_supported("2-3"), Ok(SUPPORTED));
        assert_eq!(
            VersionRange::parse_within_supported("2"),
            Ok(VersionRange { min: 2, max: 2 })
        );
        assert!(VersionRange::parse_within_supported("3-2").is_err());
        assert!(VersionRange::parse_within_supported("1-3").is_err());
        assert!(VersionRange::parse_within_supported("4").is_err());
        assert!(VersionRange::parse_within_supported("x").is_err());
        assert_eq!(SUPPORTED.to_string(), "2-3");
    }

    #[test]
    fn close_codes_map_back() {
        for code in 0..10u64 {
            let c = CloseCode::from_code(code).expect("known code");
            assert_eq!(u64::from(c.code()), code);
        }
        assert_eq!(CloseCode::from_code(99), None);
    }
}

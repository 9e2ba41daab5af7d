//! JSON bodies of the controller's HTTPS API, shared by the server, the agent's
//! enrollment client, the CLI and the tests.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::fleet::NodeStatus;
use crate::wire::{Capabilities, Capacity, NodeSample};

/// `POST /v1/enroll`: a joining agent's request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The join token, `<id>.<secret>`.
    pub token: String,
    /// The name the node asks for.
    pub node_name: String,
    /// A PKCS#10 request (PEM) for the agent's own key.
    pub csr_pem: String,
}

/// The answer to [`EnrollRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollResponse {
    /// The node name the certificate carries.
    pub node_name: String,
    /// The signed node certificate (PEM).
    pub cert_pem: String,
    /// The fleet CA (PEM); its fingerprint matches the pinned one.
    pub ca_pem: String,
    /// Where the agent connects over QUIC (`host:port`).
    pub quic_endpoint: String,
    /// The server name to expect on the QUIC endpoint's certificate.
    pub server_name: String,
}

/// An API error body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong and what to do.
    pub error: String,
}

/// A node as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    /// The name from the node's certificate.
    pub name: String,
    /// Liveness.
    pub status: NodeStatus,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Allocatable resources.
    pub capacity: Capacity,
    /// Capabilities.
    pub capabilities: Capabilities,
    /// The agent's build version.
    pub agent_version: String,
    /// The remote address of the current connection.
    pub address: Option<String>,
    /// When the node enrolled (Unix ms).
    pub enrolled_at_unix_ms: u64,
    /// When the controller last heard from the node (Unix ms).
    pub last_seen_unix_ms: Option<u64>,
    /// When the node's current certificate expires (Unix ms).
    pub cert_expires_unix_ms: Option<u64>,
    /// Samples the agent reported dropping (its offline buffer overflowed).
    pub samples_dropped: u64,
    /// The newest metrics sample, if any.
    pub latest: Option<NodeSample>,
}

/// `GET /v1/nodes/{name}/metrics`: the in-memory window of a node's samples.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricsWindow {
    /// The node.
    pub node: String,
    /// Samples, oldest first, strictly increasing by `seq`.
    pub samples: Vec<NodeSample>,
}

/// `GET /v1/stats`: the controller's own view of its ingest path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControllerStats {
    /// Agents connected now.
    pub connected_agents: u64,
    /// Samples ingested since start.
    pub samples_ingested: u64,
    /// Samples skipped as duplicates since start.
    pub duplicates_skipped: u64,
    /// Ingest latency (agent timestamp to controller ingest), p50, milliseconds,
    /// over the recent window.
    pub ingest_latency_p50_ms: f64,
    /// The same, p99.
    pub ingest_latency_p99_ms: f64,
    /// How many latencies the percentiles cover.
    pub ingest_latency_count: u64,
}

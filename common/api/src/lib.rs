//! JSON bodies of the controller's HTTPS API, shared by the server, the agent's
//! enrollment client, the CLI and the tests: requests, answers and the error body
//! ([`ApiError`]). The controller keeps its own store records and converts them to
//! the views here (`From`), so the API's JSON and the data directory's format can
//! change apart. `ToSchema` derives are behind the `openapi` feature.

pub mod alerts;
pub mod certs;
pub mod controllers;
pub mod costs;
pub mod images;
pub mod jobs;
pub mod metrics;
pub mod migrations;
pub mod policies;
pub mod pools;
pub mod secrets;
pub mod selector;
pub mod services;
pub mod terminal;
pub mod vms;

pub use alerts::{
    AckRequest, AlertApplyResult, AlertExport, AlertRuleView, AlertView, ChannelView,
    SilenceRequest, SilenceView,
};
pub use certs::{CertRevocationView, CertRevokeRequest, CertRevokeResponse};
pub use controllers::{BackupRecord, ControllerMember, ControllersView, EtcdMemberHealth};
pub use costs::{CostReport, GroupCost, JobRecommendation, NodeCost};
pub use images::ImageRecord;
pub use jobs::{
    AllocPortView, AllocView, ApplyRequest, ApplyResult, FieldChange, JobDetail, JobPlan,
    JobSummary, JobVersionView, PlannedPlacement, PlannedStop, PublishedAddressView,
};
pub use metrics::{
    HistoryFile, HistoryFileRange, HistoryStats, MetricsQuery, MetricsQueryResult, SeriesAgg,
    SeriesPoints, StepFn,
};
pub use migrations::{CopyMode, DrainPlan, MigrationStatus, Phase};
pub use policies::{DecisionView, PolicyApplyResult, PolicyView};
pub use pools::{PoolNodeStatus, PoolStatus};
pub use secrets::{JobRoll, SecretSetRequest, SecretSetResult, SecretUser, SecretView};
pub use selector::{parse_selector, selector_text};
pub use vms::{AppliedTemplate, VmTemplateView};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use novacron_common::fleet::NodeStatus;
use novacron_common::wire::{Capabilities, Capacity, NodeSample};

/// `POST /v1/enroll`: a joining agent's request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollRequest {
    /// The join token, `<id>.<secret>`.
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[0-9a-f]{12}\.[0-9a-f]{32}$"))]
    pub token: String,
    /// The name the node asks for.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
    )]
    pub node_name: String,
    /// A PKCS#10 request (PEM) for the agent's own key.
    #[cfg_attr(feature = "openapi", schema(max_length = 16384))]
    pub csr_pem: String,
}

/// The answer to [`EnrollRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

/// The media type of every error answer (RFC 9457).
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An API error body: an RFC 9457 problem document (`application/problem+json`)
/// that also keeps the `error` member older clients read. A client decodes any of
/// these members from any controller: the RFC 9457 ones default when an older
/// controller leaves them out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiError {
    /// The kind of error, a stable URN per [`ErrorCode`]
    /// (`urn:novacron:error:not-found`); decide on this, never on the text.
    #[serde(rename = "type", default)]
    #[cfg_attr(feature = "openapi", schema(example = "urn:novacron:error:not-found"))]
    pub kind: String,
    /// A short summary of the kind, the same for every error of that kind.
    #[serde(default)]
    pub title: String,
    /// The HTTP status code of the answer.
    #[serde(default)]
    pub status: u16,
    /// What went wrong and what to do (the same text as `error`).
    #[serde(default)]
    pub detail: String,
    /// What went wrong and what to do (kept for older clients; equal to `detail`).
    pub error: String,
}

impl ApiError {
    /// The problem document for an answer with `status` and the message `detail`.
    pub fn new(status: u16, detail: impl Into<String>) -> ApiError {
        let code = ErrorCode::from_status(status);
        let detail = detail.into();
        ApiError {
            kind: code.uri(),
            title: code.title().to_owned(),
            status,
            error: detail.clone(),
            detail,
        }
    }

    /// The kind of error, read from `type`; `None` for an unknown or missing one
    /// (an older controller).
    pub fn code(&self) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.uri() == self.kind)
    }
}

/// The kinds of error the API answers, each with its stable `type` URN
/// (`urn:novacron:error:<slug>`) and title. The kind follows from the answer's
/// status; new kinds may be added, existing ones never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 400: the request is malformed (a bad parameter, JSON that does not parse).
    BadRequest,
    /// 401: no or unknown credentials.
    Unauthenticated,
    /// 403: the caller's role is too low, or the name is revoked.
    Forbidden,
    /// 404: no such object or route.
    NotFound,
    /// 405: the route does not take this method.
    MethodNotAllowed,
    /// 409: the object's state does not allow the request now.
    Conflict,
    /// 413: the request body is too large.
    PayloadTooLarge,
    /// 415: the body is not of the accepted media type.
    UnsupportedMediaType,
    /// 422: the body parses but is invalid (a manifest rule, a missing field).
    Invalid,
    /// 429: too many requests.
    TooManyRequests,
    /// 500: a controller bug.
    Internal,
    /// 502: a node failed to do what was asked.
    BadGateway,
    /// 503: busy, not ready, or the store cannot write now; retry later.
    Unavailable,
    /// 507: the data directory's disk is full.
    InsufficientStorage,
    /// Any other 4xx.
    OtherClientError,
    /// Any other status.
    OtherServerError,
}

impl ErrorCode {
    /// Every kind.
    pub const ALL: [ErrorCode; 16] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Conflict,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::Invalid,
        ErrorCode::TooManyRequests,
        ErrorCode::Internal,
        ErrorCode::BadGateway,
        ErrorCode::Unavailable,
        ErrorCode::InsufficientStorage,
        ErrorCode::OtherClientError,
        ErrorCode::OtherServerError,
    ];

    /// The kind of an error answer with `status`.
    pub fn from_status(status: u16) -> ErrorCode {
        match status {
            400 => ErrorCode::BadRequest,
            401 => ErrorCode::Unauthenticated,
            403 => ErrorCode::Forbidden,
            404 => ErrorCode::NotFound,
            405 => ErrorCode::MethodNotAllowed,
            409 => ErrorCode::Conflict,
            413 => ErrorCode::PayloadTooLarge,
            415 => ErrorCode::UnsupportedMediaType,
            422 => ErrorCode::Invalid,
            429 => ErrorCode::TooManyRequests,
            500 => ErrorCode::Internal,
            502 => ErrorCode::BadGateway,
            503 => ErrorCode::Unavailable,
            507 => ErrorCode::InsufficientStorage,
            _ if (400..500).contains(&status) => ErrorCode::OtherClientError,
            _ => ErrorCode::OtherServerError,
        }
    }

    /// The stable slug of the kind (`not-found`).
    pub fn slug(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::Unauthenticated => "unauthenticated",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not-found",
            ErrorCode::MethodNotAllowed => "method-not-allowed",
            ErrorCode::Conflict => "conflict",
            ErrorCode::PayloadTooLarge => "payload-too-large",
            ErrorCode::UnsupportedMediaType => "unsupported-media-type",
            ErrorCode::Invalid => "invalid",
            ErrorCode::TooManyRequests => "too-many-requests",
            ErrorCode::Internal => "internal",
            ErrorCode::BadGateway => "bad-gateway",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::InsufficientStorage => "insufficient-storage",
            ErrorCode::OtherClientError => "client-error",
            ErrorCode::OtherServerError => "server-error",
        }
    }

    /// The RFC 9457 `type` of the kind: `urn:novacron:error:<slug>`.
    pub fn uri(self) -> String {
        format!("urn:novacron:error:{}", self.slug())
    }

    /// The RFC 9457 `title` of the kind.
    pub fn title(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "Bad request",
            ErrorCode::Unauthenticated => "Not authenticated",
            ErrorCode::Forbidden => "Forbidden",
            ErrorCode::NotFound => "Not found",
            ErrorCode::MethodNotAllowed => "Method not allowed",
            ErrorCode::Conflict => "Conflict",
            ErrorCode::PayloadTooLarge => "Request body too large",
            ErrorCode::UnsupportedMediaType => "Unsupported media type",
            ErrorCode::Invalid => "Invalid request",
            ErrorCode::TooManyRequests => "Too many requests",
            ErrorCode::Internal => "Internal error",
            ErrorCode::BadGateway => "A node failed",
            ErrorCode::Unavailable => "Unavailable, retry later",
            ErrorCode::InsufficientStorage => "Disk full",
            ErrorCode::OtherClientError => "Request refused",
            ErrorCode::OtherServerError => "Server error",
        }
    }
}

/// A node as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// Cordoned: nothing new is placed on it (`novacron node uncordon` lifts it).
    #[serde(default)]
    pub cordoned: bool,
    /// Kept stopped in its pool's warm pool (enrolled, not connected, and not
    /// down: started on a scale-out).
    #[serde(default)]
    pub warm: bool,
    /// The newest metrics sample, if any.
    pub latest: Option<NodeSample>,
    /// Image references the node reported holding (0 before its first report;
    /// `GET /v1/nodes/{name}/images` lists them).
    #[serde(default)]
    pub images: usize,
    /// Bytes of the images on the node.
    #[serde(default)]
    pub image_bytes: u64,
}

/// `GET /v1/nodes/{name}/metrics`: the in-memory window of a node's samples.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MetricsWindow {
    /// The node.
    pub node: String,
    /// Samples, oldest first, strictly increasing by `seq`.
    pub samples: Vec<NodeSample>,
}

/// `GET /v1/version`: which build a program is. The CLI prints its own and the
/// controller's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VersionInfo {
    /// The release, e.g. `0.1.0`.
    pub version: String,
    /// The git commit it was built from, or `unknown` when the build did not say
    /// (set `NOVACRON_GIT_COMMIT` when building, as the packaging does).
    pub commit: String,
    /// The HTTP API versions served (`v1`); see the README's deprecation policy.
    /// Absent from releases before 0.2.
    #[serde(default)]
    pub api_versions: Vec<String>,
    /// The agent wire protocol versions this build speaks, oldest first (`[2, 3]`):
    /// agents speaking one of them can connect. Absent from releases before 0.2.
    #[serde(default)]
    pub wire_protocol_versions: Vec<u16>,
}

impl VersionInfo {
    /// The build of the running program (every NovaCron crate shares the
    /// workspace's version).
    pub fn this_build() -> VersionInfo {
        VersionInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            commit: option_env!("NOVACRON_GIT_COMMIT")
                .filter(|c| !c.is_empty())
                .unwrap_or("unknown")
                .to_owned(),
            api_versions: vec![API_VERSION.to_owned()],
            wire_protocol_versions: (novacron_common::wire::SUPPORTED.min
                ..=novacron_common::wire::SUPPORTED.max)
                .collect(),
        }
    }
}

/// The HTTP API version: the path prefix of every route (`/v1/...`).
pub const API_VERSION: &str = "v1";

/// `GET /v1/stats`: the controller's own view of its ingest path.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

/// An entry of the controller's append-only event log: a decision, a state change
/// or an operator's call, with who asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    /// Position in the log, starting at 1 and strictly increasing.
    pub seq: u64,
    /// When it happened (Unix ms).
    pub time_unix_ms: u64,
    /// What happened, dotted (`job.applied`, `alloc.placed`, `node.down`, `exec.finished`).
    pub kind: String,
    /// Who asked for it: an operator identity (`alice (operator)`), `controller` for
    /// its own decisions, or `node/<name>` for what an agent reported.
    pub actor: String,
    /// The node concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The job concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The allocation concerned, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alloc: Option<String>,
    /// A sentence for people: what happened and why.
    pub message: String,
    /// Structured details (exit codes, durations, versions).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
}

/// `GET /v1/events`: one page of the event log, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventPage {
    /// The events after the requested position that match the filter.
    pub events: Vec<Event>,
    /// Pass as `after` to read the next page (the last scanned position).
    pub next_after: u64,
    /// Whether more events after `next_after` may exist.
    pub more: bool,
}

/// `POST /v1/exec`: run a command on one node, on every ready node matching a
/// label selector, or inside one allocation's container. Exactly one of `node`,
/// `selector` and `allocation` is given. The answer is a stream of [`ExecLine`]s,
/// one JSON object per line (NDJSON); closing it cancels the command.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    /// One node, on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Every ready node whose labels hold all these pairs, on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,
    /// One allocation, inside its container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<String>,
    /// Program and arguments (no shell).
    #[cfg_attr(feature = "openapi", schema(min_items = 1, max_items = 4096))]
    pub argv: Vec<String>,
    /// Kill the command after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// One line of the `POST /v1/exec` answer.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecLine {
    /// The command runs on `node`.
    Started {
        /// The node.
        node: String,
        /// The process id on the node, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
    },
    /// Output of the command on `node` (UTF-8; invalid bytes are replaced).
    Output {
        /// The node.
        node: String,
        /// `stdout` or `stderr`.
        stream: novacron_common::wire::ExecStream,
        /// The text.
        data: String,
    },
    /// The command on `node` is over (or never ran).
    Exit(ExecExit),
    /// Every node is done; the last line.
    Summary(ExecSummary),
}

/// How the command ended on one node.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecExit {
    /// The node.
    pub node: String,
    /// The exit code: the command's own; 128 + N when signal N ended it; 124 when
    /// it was killed at its time limit; 125 when it did not run (refused, node
    /// unreachable); 126 not executable; 127 not found.
    pub exit_code: i32,
    /// The signal that ended it, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// It was killed because its time limit passed.
    #[serde(default)]
    pub timed_out: bool,
    /// Why it did not run or did not finish normally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// From the request to the exit, milliseconds.
    pub duration_ms: u64,
}

/// The last line of an exec answer.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSummary {
    /// How many nodes the command was sent to.
    pub nodes: usize,
    /// 0 when every node returned 0, else the first non-zero code (nodes in name
    /// order).
    pub exit_code: i32,
    /// The nodes that did not return 0, in name order.
    pub failed: Vec<ExecExit>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_body_is_a_problem_document_that_keeps_the_error_member() {
        let e = ApiError::new(404, "unknown job \"web\"");
        let v = serde_json::to_value(&e).expect("serializes");
        assert_eq!(v["type"], "urn:novacron:error:not-found");
        assert_eq!(v["title"], "Not found");
        assert_eq!(v["status"], 404);
        assert_eq!(v["detail"], "unknown job \"web\"");
        assert_eq!(v["error"], "unknown job \"web\"");
        assert_eq!(e.code(), Some(ErrorCode::NotFound));
        let back: ApiError = serde_json::from_value(v).expect("decodes");
        assert_eq!(back, e);
    }

    #[test]
    fn an_older_controllers_error_body_still_decodes() {
        let e: ApiError = serde_json::from_str(r#"{"error":"no"}"#).expect("decodes");
        assert_eq!(e.error, "no");
        assert_eq!(e.code(), None);
    }

    #[test]
    fn every_error_kind_has_its_own_type() {
        let mut uris: Vec<String> = ErrorCode::ALL.iter().map(|c| c.uri()).collect();
        uris.sort();
        uris.dedup();
        assert_eq!(uris.len(), ErrorCode::ALL.len());
        for status in 400..600 {
            let code = ErrorCode::from_status(status);
            assert!(ErrorCode::ALL.contains(&code));
        }
    }
}

//! Certificate revocation bodies: `POST /v1/certs/revoke`, `GET /v1/certs/revoked`.

use serde::{Deserialize, Serialize};

/// `POST /v1/certs/revoke` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CertRevokeRequest {
    /// The certificate's serial, hex (`:` separators and a `0x` prefix allowed).
    #[cfg_attr(feature = "openapi", schema(max_length = 64))]
    pub serial: String,
    /// Why, for the audit trail.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(max_length = 1024))]
    pub reason: String,
}

/// A revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CertRevocationView {
    /// The serial, lowercase hex without leading zeros.
    pub serial: String,
    /// When it was revoked, Unix milliseconds.
    pub revoked_unix_ms: u64,
    /// Who revoked it.
    pub by: String,
    /// Why.
    pub reason: String,
}

/// `POST /v1/certs/revoke` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CertRevokeResponse {
    /// The revocation that holds (the earlier one when it was already revoked).
    pub revocation: CertRevocationView,
    /// Whether the serial was revoked before this call.
    pub already_revoked: bool,
    /// HTTPS connections that used the certificate and were closed.
    pub closed_api_connections: usize,
    /// Nodes whose agent link used the certificate and was closed.
    pub closed_nodes: Vec<String>,
}

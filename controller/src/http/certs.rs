//! The certificate revocation routes (admin only): `POST /v1/certs/revoke` revokes
//! an operator or node certificate by serial and closes the connections that use
//! it; `GET /v1/certs/revoked` lists the revocations.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use novacron_api::ApiError;
use novacron_common::pki::{Role, Serial};

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::api::{ApiState, Caller, Problem, check_note, internal};
use crate::services::events::{NewEvent, kind};
use crate::state::store::CertRevocation;
pub use novacron_api::{CertRevocationView, CertRevokeRequest, CertRevokeResponse};

/// The certificate routes.
pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(revoke_cert))
        .routes(routes!(list_revoked))
}

impl From<CertRevocation> for CertRevocationView {
    fn from(r: CertRevocation) -> Self {
        CertRevocationView {
            serial: r.serial,
            revoked_unix_ms: r.at_unix_ms,
            by: r.by,
            reason: r.reason,
        }
    }
}

#[utoipa::path(post, path = "/v1/certs/revoke", tag = "access", request_body = CertRevokeRequest, responses((status = 200, body = CertRevokeResponse), (status = 400, description = "the serial is not hex", content_type = "application/problem+json", body = ApiError), (status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 422, description = "the JSON lacks a field, has one of the wrong type, or the reason is too long", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn revoke_cert(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Json(req): Json<CertRevokeRequest>,
) -> Result<Json<CertRevokeResponse>, Problem> {
    caller.require(Role::Admin)?;
    check_note("reason", &req.reason)?;
    let serial: Serial = req
        .serial
        .parse()
        .map_err(|e| Problem::bad_request(format!("serial: {e}")))?;
    let by = caller.0.to_string();
    let done = st
        .certs
        .revoke(&serial, &by, &req.reason, SystemTime::now())
        .map_err(internal)?;
    let reason = if req.reason.is_empty() {
        "no reason given"
    } else {
        req.reason.as_str()
    };
    let mut event = NewEvent::new(
        kind::CERT_REVOKED,
        by,
        if done.new {
            format!("certificate {serial} revoked: {reason}")
        } else {
            format!("certificate {serial} revoked again (already revoked): {reason}")
        },
    )
    .detail("serial", &serial)
    .detail("closed_api_connections", done.closed_api_connections);
    if let Some(node) = done.closed_nodes.first() {
        event = event.node(node);
    }
    st.events.note(event);
    Ok(Json(CertRevokeResponse {
        revocation: done.record.into(),
        already_revoked: !done.new,
        closed_api_connections: done.closed_api_connections,
        closed_nodes: done.closed_nodes,
    }))
}

#[utoipa::path(get, path = "/v1/certs/revoked", tag = "access", responses((status = 200, body = Vec<CertRevocationView>), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn list_revoked(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Vec<CertRevocationView>>, Problem> {
    caller.require(Role::Admin)?;
    let list = st.certs.list().map_err(internal)?;
    Ok(Json(list.into_iter().map(Into::into).collect()))
}

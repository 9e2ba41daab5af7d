//! The node pool routes: `POST /v1/pools` (operator) applies `NodeTemplate` and
//! `NodePool` manifests; `GET /v1/pools` (viewer) shows each pool with its members,
//! size, bounds and hourly cost.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use novacron_api::ApiError;
use novacron_common::pki::Role;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::api::{ApiState, ApplyRequest, Caller, Problem};
use crate::services::events::{NewEvent, kind};
use crate::services::pools::{self, AppliedDocument, PoolError, PoolStatus};

/// The pool routes.
pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new().routes(routes!(apply_pools, list_pools))
}

#[utoipa::path(post, path = "/v1/pools", tag = "fleet", request_body = ApplyRequest, responses((status = 200, body = Vec<AppliedDocument>), (status = 400, description = "the body is not valid JSON", content_type = "application/problem+json", body = ApiError), (status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 422, description = "the manifest is invalid; the message names file, line, field and what is accepted", content_type = "application/problem+json", body = ApiError), (status = 503, description = "busy checking other manifests, or the store cannot write now; nothing was saved", content_type = "application/problem+json", body = ApiError), (status = 507, description = "the data directory's disk is full; nothing was saved", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn apply_pools(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Json(req): Json<ApplyRequest>,
) -> Result<Json<Vec<AppliedDocument>>, Problem> {
    caller.require(Role::Operator)?;
    crate::api::check_apply(&req)?;
    let by = caller.0.to_string();
    let (state, file, manifest, who) = (
        st.clone(),
        req.file.clone(),
        req.manifest.clone(),
        by.clone(),
    );
    let applied = st
        .heavy
        .run(move || pools::apply(&state, &file, &manifest, &who, SystemTime::now()))
        .await?
        .map_err(|e| match e {
            PoolError::Invalid(m) => Problem::new(StatusCode::UNPROCESSABLE_ENTITY, m),
            PoolError::Store(e) => crate::http::api::store_problem(e),
        })?;
    for a in &applied {
        st.events.note(
            NewEvent::new(
                kind::POOL_APPLIED,
                by.clone(),
                format!("{} {} {} from {}", a.kind, a.name, a.outcome, req.file),
            )
            .detail("kind", &a.kind)
            .detail("name", &a.name)
            .detail("outcome", &a.outcome),
        );
    }
    Ok(Json(applied))
}

#[utoipa::path(get, path = "/v1/pools", tag = "fleet", responses((status = 200, body = Vec<PoolStatus>), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn list_pools(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Vec<PoolStatus>>, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(pools::statuses(&st).await))
}

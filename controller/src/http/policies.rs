//! `/v1/policies`: apply, list and delete autoscaling policies (the
//! [`Autoscaler`](crate::services::autoscaler::Autoscaler) carries them out). Every change
//! records an event naming the caller.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use novacron_api::ApiError;
use novacron_common::pki::Role;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::api::{ApiState, ApplyRequest, Caller, Problem, internal};
use crate::services::autoscaler::{PolicyApplyResult, PolicyError, PolicyView};
use crate::services::events::{NewEvent, kind};

/// The policy routes, merged into the API.
pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(apply, list))
        .routes(routes!(delete))
        .routes(routes!(delete_policy))
}

#[utoipa::path(post, path = "/v1/policies", tag = "workloads", request_body = ApplyRequest, responses((status = 200, body = PolicyApplyResult), (status = 400, description = "the body is not valid JSON", content_type = "application/problem+json", body = ApiError), (status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 422, description = "the policy is invalid; the message names file, line, field and what is accepted", content_type = "application/problem+json", body = ApiError), (status = 409, description = "another policy scales the same job or pool", content_type = "application/problem+json", body = ApiError), (status = 503, description = "busy checking other manifests, or the store cannot write now; nothing was saved", content_type = "application/problem+json", body = ApiError), (status = 507, description = "the data directory's disk is full; nothing was saved", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn apply(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Json(req): Json<ApplyRequest>,
) -> Result<Json<PolicyApplyResult>, Problem> {
    caller.require(Role::Operator)?;
    crate::api::check_apply(&req)?;
    let by = caller.0.to_string();
    let (autoscaler, file, who) = (st.autoscaler.clone(), req.file.clone(), by.clone());
    let manifest = req.manifest.clone();
    let result = st
        .heavy
        .run(move || autoscaler.apply(&file, &manifest, &who, SystemTime::now()))
        .await?
        .map_err(problem)?;
    let mut event = NewEvent::new(
        kind::POLICY_APPLIED,
        by,
        format!(
            "policy {} for {} {} from {}",
            result.policy, result.target, result.outcome, req.file
        ),
    )
    .detail("policy", &result.policy)
    .detail("outcome", &result.outcome);
    if let Some(job) = result.target.strip_prefix("job ") {
        event = event.job(job);
    }
    st.events.note(event);
    Ok(Json(result))
}

#[utoipa::path(get, path = "/v1/policies", operation_id = "list_policies", tag = "workloads", responses((status = 200, description = "every policy with its target's size and latest decision", body = Vec<PolicyView>), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn list(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Vec<PolicyView>>, Problem> {
    caller.require(Role::Viewer)?;
    let autoscaler = st.autoscaler.clone();
    // Reads the workloads for each policy's size: off the async threads.
    let views = tokio::task::spawn_blocking(move || autoscaler.list())
        .await
        .map_err(internal)?;
    Ok(Json(views))
}

#[utoipa::path(delete, path = "/v1/policies/{name}", tag = "workloads", params(("name" = String, Path, description = "policy name")), responses((status = 204, description = "the same as `POST /v1/policies/{name}/delete`; deleted; a job it scaled runs its manifest's replicas again"), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn delete_policy(
    state: State<Arc<ApiState>>,
    caller: Caller,
    name: Path<String>,
) -> Result<StatusCode, Problem> {
    delete(state, caller, name).await
}

#[utoipa::path(post, path = "/v1/policies/{name}/delete", tag = "workloads", params(("name" = String, Path, description = "policy name")), responses((status = 204, description = "deleted; a job it scaled runs its manifest's replicas again"), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn delete(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    let by = caller.0.to_string();
    let target = st.autoscaler.delete(&name, &by).map_err(problem)?;
    let mut event = NewEvent::new(
        kind::POLICY_DELETED,
        by,
        format!("policy {name} for {target} deleted"),
    )
    .detail("policy", &name);
    if let Some(job) = target.strip_prefix("job ") {
        event = event.job(job);
    }
    st.events.note(event);
    Ok(StatusCode::NO_CONTENT)
}

fn problem(e: PolicyError) -> Problem {
    match e {
        PolicyError::Invalid(m) => Problem::new(StatusCode::UNPROCESSABLE_ENTITY, m),
        e @ PolicyError::Conflict { .. } => Problem::new(StatusCode::CONFLICT, e.to_string()),
        e @ PolicyError::Unknown(_) => Problem::new(StatusCode::NOT_FOUND, e.to_string()),
        PolicyError::Workload(e) => internal(e),
        PolicyError::Store(e) => crate::http::api::store_problem(e),
    }
}

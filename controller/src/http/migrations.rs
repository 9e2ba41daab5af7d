//! The HTTPS routes of checkpoints and migration.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use novacron_api::ApiError;
use novacron_common::checkpoint::{BundleInfo, CheckpointMode};
use novacron_common::pki::Role;
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::api::{ApiState, Caller, Problem};
use crate::services::migrate::{BUSY_WAIT, MigrateError, MigrationStatus};
pub use novacron_api::DrainPlan;

/// The longest job, allocation or node name accepted in a query.
const MAX_NAME: usize = 253;

/// The routes.
pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(checkpoint_alloc))
        .routes(routes!(list_checkpoints))
        .routes(routes!(migrate_alloc))
        .routes(routes!(list_migrations))
        .routes(routes!(show_migration))
        .routes(routes!(drain_node))
}

fn problem(e: MigrateError) -> Problem {
    match e {
        MigrateError::Invalid(m) => Problem::new(StatusCode::CONFLICT, m),
        MigrateError::NotFound(m) => Problem::new(StatusCode::NOT_FOUND, m),
        MigrateError::Failed(m) => Problem::new(StatusCode::BAD_GATEWAY, m),
        MigrateError::Busy(m) => Problem::new(StatusCode::CONFLICT, m),
    }
}

/// Body of `POST /v1/allocations/{id}/checkpoint`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointBody {
    /// `live`, `fs` or `auto` (default: the job's policy, else `auto`).
    pub mode: Option<CheckpointMode>,
}

#[utoipa::path(post, path = "/v1/allocations/{id}/checkpoint", tag = "workloads", params(("id" = String, Path, description = "allocation id")), request_body = CheckpointBody, responses((status = 200, body = BundleInfo), (status = 400, description = "the body is not valid JSON", content_type = "application/problem+json", body = ApiError), (status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 422, description = "the JSON has a field of the wrong type", content_type = "application/problem+json", body = ApiError), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 409, description = "not running, or still busy after waiting 120 s for a checkpoint or migration already in progress", content_type = "application/problem+json", body = ApiError), (status = 502, description = "the node failed to checkpoint or send it", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn checkpoint_alloc(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<CheckpointBody>,
) -> Result<Json<BundleInfo>, Problem> {
    caller.require(Role::Operator)?;
    // One already in progress on the allocation (a periodic checkpoint, the
    // one after a move) is waited for.
    let by = caller.0.to_string();
    st.migrations
        .taking_turns(BUSY_WAIT, || st.migrations.checkpoint(&id, body.mode, &by))
        .await
        .map(Json)
        .map_err(problem)
}

/// Filters of `GET /v1/checkpoints`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct CheckpointFilter {
    /// Only this job's.
    #[param(max_length = 253)]
    pub job: Option<String>,
    /// Only this allocation's.
    #[param(max_length = 253)]
    pub alloc: Option<String>,
}

#[utoipa::path(get, path = "/v1/checkpoints", tag = "workloads", params(CheckpointFilter), responses((status = 200, body = Vec<BundleInfo>), (status = 400, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn list_checkpoints(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Query(f): Query<CheckpointFilter>,
) -> Result<Json<Vec<BundleInfo>>, Problem> {
    caller.require(Role::Viewer)?;
    for (what, v) in [("job", &f.job), ("alloc", &f.alloc)] {
        if let Some(v) = v
            && v.len() > MAX_NAME
        {
            return Err(Problem::bad_request(format!(
                "query parameter {what} has {} characters; at most {MAX_NAME} are accepted",
                v.len()
            )));
        }
    }
    Ok(Json(
        st.migrations
            .bundles()
            .list(f.job.as_deref(), f.alloc.as_deref()),
    ))
}

/// Body of `POST /v1/allocations/{id}/migrate`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MigrateBody {
    /// The target node (default: the scheduler's choice).
    #[schema(max_length = 253)]
    pub to: Option<String>,
    /// `live`, `fs` or `auto` (default: the job's policy, else `auto`).
    pub mode: Option<CheckpointMode>,
    /// A virtual machine's longest planned pause (QEMU's `downtime-limit`),
    /// ms, from 10 to 60000 (default 300). Only for VMs.
    #[schema(minimum = 10, maximum = 60000)]
    pub max_downtime_ms: Option<u64>,
    /// How a live migration between two runc nodes moves memory:
    /// `post-copy` (default where both nodes support lazy pages: the
    /// container resumes on the target at once and fetches its pages from
    /// the source) or `stop-copy` (everything is copied during the pause).
    /// Only for containers on runc nodes.
    pub copy: Option<novacron_api::CopyMode>,
}

#[utoipa::path(post, path = "/v1/allocations/{id}/migrate", tag = "workloads", params(("id" = String, Path, description = "allocation id")), request_body = MigrateBody, responses((status = 202, description = "started; follow it at /v1/migrations/{id}", body = MigrationStatus), (status = 400, description = "the body is not valid JSON, or a name is too long", content_type = "application/problem+json", body = ApiError), (status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 422, description = "the JSON has a field of the wrong type", content_type = "application/problem+json", body = ApiError), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 409, description = "not running, no node can take it, or still busy after waiting 120 s for a checkpoint or migration already in progress", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn migrate_alloc(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
    Json(body): Json<MigrateBody>,
) -> Result<(StatusCode, Json<MigrationStatus>), Problem> {
    caller.require(Role::Operator)?;
    if let Some(to) = &body.to
        && to.len() > MAX_NAME
    {
        return Err(Problem::bad_request(format!(
            "target node name has {} characters; at most {MAX_NAME} are accepted",
            to.len()
        )));
    }
    let by = caller.0.to_string();
    st.migrations
        .taking_turns(BUSY_WAIT, || async {
            st.migrations.start_migration_with(
                &id,
                body.to.as_deref(),
                body.mode,
                body.max_downtime_ms.map(std::time::Duration::from_millis),
                body.copy,
                &by,
            )
        })
        .await
        .map(|s| (StatusCode::ACCEPTED, Json(s)))
        .map_err(problem)
}

#[utoipa::path(get, path = "/v1/migrations", tag = "workloads", responses((status = 200, body = Vec<MigrationStatus>), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn list_migrations(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Vec<MigrationStatus>>, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(st.migrations.list()))
}

#[utoipa::path(get, path = "/v1/migrations/{id}", tag = "workloads", params(("id" = String, Path, description = "migration id (m-N)")), responses((status = 200, body = MigrationStatus), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn show_migration(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<MigrationStatus>, Problem> {
    caller.require(Role::Viewer)?;
    st.migrations.status(&id).map(Json).ok_or_else(|| {
        Problem::new(
            StatusCode::NOT_FOUND,
            format!("unknown migration {id:?}; `GET /v1/migrations` lists the recent ones"),
        )
    })
}

#[utoipa::path(post, path = "/v1/nodes/{name}/drain", tag = "fleet", params(("name" = String, Path, description = "node name")), responses((status = 200, description = "cordoned (nothing new is placed there); the running allocations to migrate", body = DrainPlan), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn drain_node(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<DrainPlan>, Problem> {
    caller.require(Role::Operator)?;
    let allocations = st
        .migrations
        .cordon(&name, &caller.0.to_string())
        .map_err(problem)?;
    Ok(Json(DrainPlan {
        node: name,
        allocations,
    }))
}

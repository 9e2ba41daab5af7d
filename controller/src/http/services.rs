//! The service catalog: `GET /v1/services` (every service with its endpoints)
//! and `GET /v1/services/{name}` (one). Both are indexed reads,
//! so `?index=N&wait=D` blocks until the catalog's inputs change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use novacron_api::ApiError;
use novacron_api::migrations::Phase;
use novacron_api::services::ServiceView;
use novacron_common::pki::Role;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::api::{ApiState, Caller, Problem};
use crate::services::catalog::{self, NodeAddress};

/// The catalog routes.
pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(list_services))
        .routes(routes!(get_service))
}

/// The whole catalog now.
pub fn current(st: &ApiState) -> Vec<ServiceView> {
    let nodes: BTreeMap<String, NodeAddress> = st
        .registry
        .reach(Instant::now())
        .into_iter()
        .map(|v| {
            (
                v.name,
                NodeAddress {
                    ip: v.address.map(|a| a.ip()),
                    zone: v.zone,
                    connected: v.status == novacron_common::fleet::NodeStatus::Ready,
                },
            )
        })
        .collect();
    let allocs = st.workloads.allocations(None, None);
    let moving = st
        .migrations
        .list()
        .into_iter()
        .filter(|m| !matches!(m.phase, Phase::Completed | Phase::RolledBack))
        .map(|m| m.alloc)
        .collect();
    catalog::catalog(&st.workloads.job_services(), &allocs, &nodes, &moving)
}

#[utoipa::path(get, path = "/v1/services", tag = "services", responses((status = 200, description = "every service a job declares, by name, with its endpoints", body = Vec<ServiceView>), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn list_services(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Vec<ServiceView>>, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(current(&st)))
}

#[utoipa::path(get, path = "/v1/services/{name}", tag = "services", params(("name" = String, Path, description = "the service")), responses((status = 200, description = "the service with its endpoints", body = ServiceView), (status = 404, description = "no job declares this service", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn get_service(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<ServiceView>, Problem> {
    caller.require(Role::Viewer)?;
    current(&st)
        .into_iter()
        .find(|s| s.name == name)
        .map(Json)
        .ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no job declares service {name:?}; `novacron service list` shows the services"
                ),
            )
        })
}

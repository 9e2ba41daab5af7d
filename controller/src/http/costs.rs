//! `GET /v1/costs`, `GET /v1/recommendations` and `GET /v1/consolidation`: the
//! live fleet's hourly cost, rightsizing advice and a repack plan.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use novacron_api::ApiError;
use novacron_common::consolidate;
use novacron_common::cost::RightsizeConfig;
use novacron_common::pki::Role;
use novacron_common::wire::NodeSample;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::api::{ApiState, Caller, Problem};
use crate::services::costs::{
    CostReport, JobRecommendation, consolidation_plan, live_report, recommend,
};

/// The routes.
pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(costs))
        .routes(routes!(recommendations))
        .routes(routes!(consolidation))
}

#[utoipa::path(get, path = "/v1/consolidation", tag = "cost", responses((status = 200, description = "a best-fit-decreasing repack: nodes of managed pools that could be retired, the moves that empty them, and the hourly saving (a plan; nothing is changed)", body = consolidate::Plan), (status = 401, content_type = "application/problem+json", body = ApiError), (status = 403, content_type = "application/problem+json", body = ApiError)))]
async fn consolidation(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<consolidate::Plan>, Problem> {
    caller.require(Role::Viewer)?;
    let nodes = st.registry.views(Instant::now());
    let allocs = st.workloads.allocations(None, None);
    Ok(Json(consolidation_plan(&st.pricing, &nodes, &allocs)))
}

#[utoipa::path(get, path = "/v1/costs", tag = "cost", responses((status = 200, description = "hourly cost per node, job, pool and capacity type; the budgets with those exceeded; the spot share of each workload class against its target", body = CostReport), (status = 401, content_type = "application/problem+json", body = ApiError), (status = 403, content_type = "application/problem+json", body = ApiError)))]
async fn costs(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<CostReport>, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(live_report(&st)))
}

/// How far back right-sizing reads samples.
const RIGHTSIZE_SPAN_MS: u64 = 3_600_000;

#[utoipa::path(get, path = "/v1/recommendations", tag = "cost", responses((status = 200, body = Vec<JobRecommendation>), (status = 401, content_type = "application/problem+json", body = ApiError), (status = 403, content_type = "application/problem+json", body = ApiError), (status = 503, description = "every slot for CPU-heavy requests stayed busy for the wait", content_type = "application/problem+json", body = ApiError)))]
async fn recommendations(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Vec<JobRecommendation>>, Problem> {
    caller.require(Role::Viewer)?;
    let nodes = st.registry.views(Instant::now());
    let allocs = st.workloads.allocations(None, None);
    // The last hour from the metrics history (else the registry's short
    // window), off the async workers: it decodes chunks.
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
        .saturating_sub(RIGHTSIZE_SPAN_MS);
    // Only nodes that hold running allocations: right-sizing reads their
    // allocations' usage and nothing else.
    let names: std::collections::BTreeSet<String> = allocs
        .iter()
        .filter(|a| crate::services::costs::holds_resources(a))
        .map(|a| a.node.clone())
        .collect();
    let st2 = st.clone();
    // Bounded like every CPU-heavy request (HeavyWork): at 10,000 busy nodes
    // this reads an hour of each.
    let windows: BTreeMap<String, Vec<NodeSample>> = st
        .heavy
        .run(move || {
            names
                .into_iter()
                .filter_map(|name| {
                    let w = match &st2.history {
                        Some(h) => Some(h.window(&name, since, std::time::SystemTime::now())),
                        None => st2.registry.window(&name),
                    }?;
                    Some((name, w.samples))
                })
                .collect()
        })
        .await?;
    Ok(Json(recommend(
        &st.pricing,
        &nodes,
        &allocs,
        &windows,
        &RightsizeConfig::default(),
    )))
}

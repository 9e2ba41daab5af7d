//! `GET /v1/metrics/query` and `GET /v1/metrics/storage`: the metrics history.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::Json;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use novacron_api::{ApiError, HistoryStats, MetricsQuery, MetricsQueryResult, parse_selector};
use novacron_common::pki::Role;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::api::{ApiState, Caller, Problem};
use crate::services::history::{MetricsHistory, QueryProblem};

/// The routes.
pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(query))
        .routes(routes!(storage))
}

fn history(st: &ApiState) -> Result<Arc<MetricsHistory>, Problem> {
    st.history
        .clone()
        .ok_or_else(|| Problem::new(StatusCode::NOT_FOUND, QueryProblem::Disabled.to_string()))
}

#[utoipa::path(get, path = "/v1/metrics/query", tag = "fleet", params(MetricsQuery), responses((status = 200, description = "one metric of the selected nodes or allocations over a range, one value per step per series (or combined with `agg`); `resolution` says whether raw points or 1-minute or 1-hour rollups answered", body = MetricsQueryResult), (status = 400, description = "an unknown metric, a bad time, step or selector, or too many steps", content_type = "application/problem+json", body = ApiError), (status = 401, content_type = "application/problem+json", body = ApiError), (status = 403, content_type = "application/problem+json", body = ApiError), (status = 404, description = "metrics history is turned off", content_type = "application/problem+json", body = ApiError), (status = 503, content_type = "application/problem+json", body = ApiError)))]
async fn query(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Query(q): Query<MetricsQuery>,
) -> Result<Json<MetricsQueryResult>, Problem> {
    caller.require(Role::Viewer)?;
    let h = history(&st)?;
    // Nodes whose labels match the selector (every node when there is none).
    let allowed: Option<BTreeSet<String>> = match q.selector.as_deref() {
        Some(text) if !text.trim().is_empty() => {
            let want = parse_selector(text).map_err(Problem::bad_request)?;
            Some(
                st.registry
                    .views(Instant::now())
                    .into_iter()
                    .filter(|v| want.iter().all(|(k, val)| v.labels.get(k) == Some(val)))
                    .map(|v| v.name)
                    .collect(),
            )
        }
        _ => None,
    };
    let answer = st
        .heavy
        .run(move || {
            let ok = |node: &str| allowed.as_ref().is_none_or(|a| a.contains(node));
            h.query(&q, &ok, SystemTime::now())
        })
        .await?;
    answer
        .map(Json)
        .map_err(|e| Problem::bad_request(e.to_string()))
}

#[utoipa::path(get, path = "/v1/metrics/storage", tag = "fleet", responses((status = 200, description = "what the metrics history holds: series, bytes per value in memory and on disk, the head's budget, retention and the metric names", body = HistoryStats), (status = 401, content_type = "application/problem+json", body = ApiError), (status = 403, content_type = "application/problem+json", body = ApiError), (status = 404, description = "metrics history is turned off", content_type = "application/problem+json", body = ApiError)))]
async fn storage(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<HistoryStats>, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(history(&st)?.stats()))
}

//! `GET /metrics`: the controller's and the fleet's series, in the OpenMetrics or
//! the Prometheus text format as the scraper asks.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use novacron_api::ApiError;
use novacron_common::pki::Role;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::api::{ApiState, Caller, Problem, internal};
use crate::services::metrics::{
    OPENMETRICS_CONTENT_TYPE, Snapshot, TEXT_CONTENT_TYPE, accepts_openmetrics, render,
    to_text_format,
};

/// The `/metrics` route (viewer role, like every read of the API).
pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new().routes(routes!(scrape))
}

/// Prometheus scrape: the OpenMetrics text format when the `Accept` header asks
/// for it (Prometheus does), else the text format 0.0.4.
#[utoipa::path(get, path = "/metrics", tag = "controller", responses((status = 200, description = "fleet, allocation and controller metrics: OpenMetrics (`application/openmetrics-text; version=1.0.0`) when `Accept` asks for it, else `text/plain; version=0.0.4`", content_type = "text/plain", body = String), (status = 401, content_type = "application/problem+json", body = ApiError), (status = 403, content_type = "application/problem+json", body = ApiError)))]
async fn scrape(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    let snapshot = Snapshot::capture(&st, Instant::now());
    let text = render(snapshot).map_err(internal)?;
    let accept = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok());
    let (content_type, body) = if accepts_openmetrics(accept) {
        (OPENMETRICS_CONTENT_TYPE, text)
    } else {
        (TEXT_CONTENT_TYPE, to_text_format(&text))
    };
    Ok((
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response())
}

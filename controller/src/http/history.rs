//! `GET /v1/metrics/query` and `GET /v1/metrics/storage`: the metrics history.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use novacron_api::{
    ApiError, HistoryFile, HistoryFileRange, HistoryStats, MetricsQuery, MetricsQueryResult,
    parse_selector,
};
use novacron_common::pki::Role;
use novacron_tsdb::{FileError, Tier};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::api::{ApiState, Caller, Problem};
use crate::services::history::{MetricsHistory, QueryProblem};

/// The routes.
pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(query))
        .routes(routes!(storage))
        .routes(routes!(files))
        .routes(routes!(file_records))
}

/// The most bytes one answer of `GET /v1/metrics/files/{tier}/{start}` carries
/// (more when a single record is larger).
pub const FILE_PIECE: u64 = 4 << 20;

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

#[utoipa::path(get, path = "/v1/metrics/files", tag = "fleet", responses((status = 200, description = "the metrics history's segment files with their lengths, for a follower of a controller group to copy", body = Vec<HistoryFile>), (status = 401, content_type = "application/problem+json", body = ApiError), (status = 403, content_type = "application/problem+json", body = ApiError), (status = 404, description = "metrics history is turned off", content_type = "application/problem+json", body = ApiError)))]
async fn files(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Vec<HistoryFile>>, Problem> {
    caller.require(Role::Viewer)?;
    let h = history(&st)?;
    Ok(Json(
        h.db()
            .files()
            .into_iter()
            .map(|f| HistoryFile {
                tier: f.tier.name().to_owned(),
                start_ms: f.start,
                bytes: f.len,
                first: f.first,
            })
            .collect(),
    ))
}

#[utoipa::path(get, path = "/v1/metrics/files/{tier}/{start}", tag = "fleet", params(("tier" = String, Path, description = "`raw`, `1m` or `1h`"), ("start" = i64, Path, description = "the file's start, Unix milliseconds"), HistoryFileRange), responses((status = 200, description = "whole records of the file after `offset` (empty at its end), at most 4 MiB unless one record is larger", content_type = "application/octet-stream", body = Vec<u8>), (status = 400, description = "an unknown tier or a bad range", content_type = "application/problem+json", body = ApiError), (status = 404, description = "no such file (expired), or history is turned off", content_type = "application/problem+json", body = ApiError), (status = 409, description = "the caller's copy is not a prefix of the file (it was replaced): fetch it from offset 0", content_type = "application/problem+json", body = ApiError), (status = 401, content_type = "application/problem+json", body = ApiError), (status = 403, content_type = "application/problem+json", body = ApiError), (status = 503, content_type = "application/problem+json", body = ApiError)))]
async fn file_records(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path((tier, start)): Path<(String, i64)>,
    Query(range): Query<HistoryFileRange>,
) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    let h = history(&st)?;
    let tier = Tier::from_name(&tier)
        .ok_or_else(|| Problem::bad_request(format!("unknown tier {tier:?}: use raw, 1m or 1h")))?;
    let last = match (range.last_at, range.last_crc) {
        (Some(at), Some(crc)) => Some((at, crc)),
        (None, None) => None,
        _ => {
            return Err(Problem::bad_request("give last_at and last_crc together"));
        }
    };
    let read = st
        .heavy
        .run(move || {
            h.db()
                .read_file(tier, start, range.offset, last, FILE_PIECE)
        })
        .await?;
    match read {
        Ok(bytes) => {
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
        }
        Err(e @ FileError::Missing(..)) => Err(Problem::new(StatusCode::NOT_FOUND, e.to_string())),
        Err(FileError::Range(novacron_tsdb::segment::RangeError::Diverged(why))) => Err(
            Problem::new(StatusCode::CONFLICT, format!("the copy diverged: {why}")),
        ),
        Err(FileError::Range(novacron_tsdb::segment::RangeError::Io(e))) => Err(Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the history file: {e}"),
        )),
    }
}

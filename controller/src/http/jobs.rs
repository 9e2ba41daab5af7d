//! Jobs and allocations: `POST /v1/jobs` (apply), `GET /v1/jobs[/{name}]`,
//! `POST /v1/jobs/{name}/stop`, `GET /v1/allocations[/{id}]` and
//! `GET /v1/allocations/{id}/logs` (streamed from the allocation's agent).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use novacron_api::ApiError;
use novacron_api::jobs::AllocView;
use novacron_common::pki::Role;
use novacron_common::sync::lock;
use novacron_common::wire::{ControllerMessage, LogChunk, LogRequest};
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::api::{ApiState, ApplyRequest, Caller, Problem, check_apply, internal};
use crate::services::events::{NewEvent, kind};
use crate::services::workloads::{
    ApplyResult, JobDetail, JobPlan, JobSummary, JobVersionView, WorkloadError,
};

/// The job and allocation routes.
pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(apply_job, list_jobs))
        .routes(routes!(show_job, delete_job))
        .routes(routes!(stop_job))
        .routes(routes!(plan_job))
        .routes(routes!(job_versions))
        .routes(routes!(revert_job))
        .routes(routes!(list_allocations))
        .routes(routes!(show_allocation))
        .routes(routes!(restart_allocation))
        .routes(routes!(allocation_logs))
}

/// Log streams in flight at once.
pub const MAX_LOG_STREAMS: usize = 256;

#[utoipa::path(post, path = "/v1/jobs", tag = "workloads", request_body = ApplyRequest, responses((status = 400, description = "the body is not valid JSON", content_type = "application/problem+json", body = ApiError), (status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 200, body = ApplyResult), (status = 422, description = "the manifest is invalid (also: nested too deep, or aliases that expand too far); the message names file, line, field and what is accepted", content_type = "application/problem+json", body = ApiError), (status = 503, description = "busy checking other manifests, or the store cannot write now; nothing was saved", content_type = "application/problem+json", body = ApiError), (status = 507, description = "the data directory's disk is full; nothing was saved", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn apply_job(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Json(req): Json<ApplyRequest>,
) -> Result<Response, Problem> {
    caller.require(Role::Operator)?;
    Ok(Json(apply(&st, req, caller.0.to_string()).await?).into_response())
}

/// Applies a job manifest on behalf of `by` (already authorized as an
/// operator) and records the `job.applied` event: `POST /v1/jobs`, and the
/// dashboard's scale form.
pub(crate) async fn apply(
    st: &ApiState,
    req: ApplyRequest,
    by: String,
) -> Result<ApplyResult, Problem> {
    check_apply(&req)?;
    let file_name = req.file.clone();
    let (workloads, file, who) = (st.workloads.clone(), req.file.clone(), by.clone());
    let result = st
        .heavy
        .run(move || workloads.apply(&file, &req.manifest, &who, SystemTime::now()))
        .await?
        .map_err(workload_problem)?;
    st.events.note(
        NewEvent::new(
            kind::JOB_APPLIED,
            by,
            format!(
                "job {} {} from {} (version {})",
                result.job, result.outcome, file_name, result.version
            ),
        )
        .job(&result.job)
        .detail("version", result.version)
        .detail("outcome", &result.outcome),
    );
    Ok(result)
}

#[utoipa::path(get, path = "/v1/jobs", tag = "workloads", responses((status = 200, body = Vec<JobSummary>), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn list_jobs(State(st): State<Arc<ApiState>>, caller: Caller) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(st.workloads.jobs()).into_response())
}

#[utoipa::path(get, path = "/v1/jobs/{name}", tag = "workloads", params(("name" = String, Path, description = "job name")), responses((status = 200, body = JobDetail), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn show_job(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(st.workloads.job(&name).map_err(workload_problem)?).into_response())
}

/// Options of `DELETE /v1/jobs/{name}`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeleteOptions {
    /// Also purge the job: once all its allocations have ended, forget it with
    /// its versions and allocations (its events stay). While an allocation is
    /// still stopping, the answer is 409 and the job stays stopped; ask again.
    #[serde(default)]
    pub purge: bool,
}

#[utoipa::path(delete, path = "/v1/jobs/{name}", tag = "workloads", params(("name" = String, Path, description = "job name"), DeleteOptions), responses((status = 204, description = "stopping: its allocations stop (`POST /v1/jobs/{name}/stop` does the same); with `purge`, stopped and purged"), (status = 400, description = "a malformed query (`purge` takes true or false)", content_type = "application/problem+json", body = ApiError), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 409, description = "`purge`: the job is stopped, but an allocation of it is still stopping; the message names them", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn delete_job(
    state: State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
    Query(opts): Query<DeleteOptions>,
) -> Result<StatusCode, Problem> {
    // Checked here too: a purge of a stopped job does not go through the stop.
    caller.require(Role::Operator)?;
    if !opts.purge || !state.workloads.is_stopped(&name) {
        stop_job(state.clone(), caller.clone(), Path(name.clone())).await?;
    }
    if !opts.purge {
        return Ok(StatusCode::NO_CONTENT);
    }
    let by = caller.0.to_string();
    state
        .workloads
        .purge(&name, &by)
        .map_err(workload_problem)?;
    state
        .events
        .note(NewEvent::new(kind::JOB_PURGED, by, format!("job {name} purged")).job(&name));
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/jobs/{name}/stop", tag = "workloads", params(("name" = String, Path, description = "job name")), responses((status = 204, description = "stopping (the same as `DELETE /v1/jobs/{name}`)"), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn stop_job(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    st.workloads
        .stop(&name, &caller.0.to_string())
        .map_err(workload_problem)?;
    st.events.note(
        NewEvent::new(
            kind::JOB_STOPPED,
            caller.0.to_string(),
            format!("job {name} stopped"),
        )
        .job(&name),
    );
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/jobs/{name}/plan", tag = "workloads", params(("name" = String, Path, description = "job name: the manifest's `metadata.name`")), request_body = ApplyRequest, responses((status = 200, description = "what applying the manifest would do: the changed fields, and the allocations the controller's next reconcile pass would start and stop, decided by its real reconcile and scheduler on a copy of its state; nothing is kept", body = JobPlan), (status = 400, description = "the body is not valid JSON", content_type = "application/problem+json", body = ApiError), (status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 422, description = "the manifest is invalid, or names another job than the path; the message names file, line, field and what is accepted", content_type = "application/problem+json", body = ApiError), (status = 503, description = "busy checking other manifests", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn plan_job(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
    Json(req): Json<ApplyRequest>,
) -> Result<Response, Problem> {
    caller.require(Role::Operator)?;
    check_apply(&req)?;
    let (workloads, who) = (st.workloads.clone(), caller.0.to_string());
    let plan = st
        .heavy
        .run(move || {
            workloads.plan_apply(
                &req.file,
                &req.manifest,
                &who,
                SystemTime::now(),
                std::time::Instant::now(),
            )
        })
        .await?
        .map_err(workload_problem)?;
    if plan.job != name {
        return Err(Problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the manifest names job {:?}, not {name:?}; plan it at /v1/jobs/{}/plan",
                plan.job, plan.job
            ),
        ));
    }
    Ok(Json(plan).into_response())
}

#[utoipa::path(get, path = "/v1/jobs/{name}/versions", tag = "workloads", params(("name" = String, Path, description = "job name")), responses((status = 200, description = "the stored versions, newest first (the last 10 are kept), each with who submitted it, when, and the fields changed from the version before it", body = Vec<JobVersionView>), (status = 404, description = "no such job", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn job_versions(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(st.workloads.versions(&name).map_err(workload_problem)?).into_response())
}

/// `POST /v1/jobs/{name}/revert` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevertRequest {
    /// The stored version to submit again.
    pub version: u64,
}

#[utoipa::path(post, path = "/v1/jobs/{name}/revert", tag = "workloads", params(("name" = String, Path, description = "job name")), request_body = RevertRequest, responses((status = 200, description = "the stored version was submitted again as a new version (`unchanged` when it is the current one), rolled out like any apply", body = ApplyResult), (status = 400, description = "the body is not valid JSON", content_type = "application/problem+json", body = ApiError), (status = 422, description = "the body is not `{\"version\": N}`", content_type = "application/problem+json", body = ApiError), (status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 404, description = "no such job, or no such stored version (the message names the kept ones)", content_type = "application/problem+json", body = ApiError), (status = 503, description = "the store cannot write now; nothing was saved", content_type = "application/problem+json", body = ApiError), (status = 507, description = "the data directory's disk is full; nothing was saved", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn revert_job(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
    Json(req): Json<RevertRequest>,
) -> Result<Response, Problem> {
    caller.require(Role::Operator)?;
    let by = caller.0.to_string();
    let (workloads, who, job) = (st.workloads.clone(), by.clone(), name.clone());
    let result = st
        .heavy
        .run(move || workloads.revert(&job, req.version, &who, SystemTime::now()))
        .await?
        .map_err(workload_problem)?;
    st.events.note(
        NewEvent::new(
            kind::JOB_APPLIED,
            by,
            format!(
                "job {name} reverted to version {}: {} (version {})",
                req.version, result.outcome, result.version
            ),
        )
        .job(&name)
        .detail("version", result.version)
        .detail("outcome", &result.outcome)
        .detail("reverted_to", req.version),
    );
    Ok(Json(result).into_response())
}

/// Filters of `GET /v1/allocations`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AllocFilter {
    /// Only this job.
    pub job: Option<String>,
    /// Only this node.
    pub node: Option<String>,
}

#[utoipa::path(get, path = "/v1/allocations", tag = "workloads", params(AllocFilter), responses((status = 200, body = Vec<AllocView>), (status = 400, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn list_allocations(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Query(filter): Query<AllocFilter>,
) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    let allocations: Vec<AllocView> = st
        .workloads
        .allocations(filter.job.as_deref(), filter.node.as_deref())
        .into_iter()
        .map(AllocView::from)
        .collect();
    Ok(Json(allocations).into_response())
}

#[utoipa::path(get, path = "/v1/allocations/{id}", tag = "workloads", params(("id" = String, Path, description = "allocation id")), responses((status = 200, body = AllocView), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn show_allocation(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    let allocation = st.workloads.allocation(&id).map_err(workload_problem)?;
    Ok(Json(AllocView::from(allocation)).into_response())
}

#[utoipa::path(post, path = "/v1/allocations/{id}/restart", tag = "workloads", params(("id" = String, Path, description = "allocation id")), responses((status = 202, description = "restarting: the allocation is no longer wanted (its agent stops it) and the reconciler's next pass places a fresh one for its job; an `alloc.restarted` event records it. The body is the allocation as it is now", body = AllocView), (status = 404, description = "no such allocation", content_type = "application/problem+json", body = ApiError), (status = 409, description = "the allocation is already stopping or ended; nothing to restart", content_type = "application/problem+json", body = ApiError), (status = 503, description = "the store cannot write now; nothing was changed", content_type = "application/problem+json", body = ApiError), (status = 507, description = "the data directory's disk is full; nothing was changed", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn restart_allocation(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    caller.require(Role::Operator)?;
    if !st
        .workloads
        .restart(&id, &caller.0.to_string())
        .map_err(workload_problem)?
    {
        let a = st.workloads.allocation(&id).map_err(workload_problem)?;
        return Err(Problem(
            StatusCode::CONFLICT,
            format!(
                "allocation {id} is already {} and not wanted any more; nothing to restart (`novacron job status {}` shows its replacement)",
                a.state, a.job
            ),
        ));
    }
    let allocation = st.workloads.allocation(&id).map_err(workload_problem)?;
    Ok((StatusCode::ACCEPTED, Json(AllocView::from(allocation))).into_response())
}

/// Options of `GET /v1/allocations/{id}/logs`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogOptions {
    /// Keep streaming.
    #[serde(default)]
    pub follow: bool,
    /// Last lines first (0: all).
    #[serde(default)]
    pub tail: u32,
}

#[utoipa::path(get, path = "/v1/allocations/{id}/logs", tag = "workloads", params(("id" = String, Path, description = "allocation id"), LogOptions), responses((status = 200, description = "the container's output as it arrives", content_type = "text/plain", body = String), (status = 400, content_type = "application/problem+json", body = ApiError), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 409, description = "the allocation's node is not connected", content_type = "application/problem+json", body = ApiError), (status = 503, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn allocation_logs(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(opts): Query<LogOptions>,
) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    let alloc = st.workloads.allocation(&id).map_err(workload_problem)?;
    let sender = lock(&st.link.commands)
        .get(&alloc.node)
        .map(|(_, tx)| tx.clone())
        .ok_or_else(|| {
            Problem(
                StatusCode::CONFLICT,
                format!(
                    "node {} of allocation {id} is not connected; its logs cannot be read now",
                    alloc.node
                ),
            )
        })?;
    let request_id: u64 = rand::random();
    let (tx, rx) = tokio::sync::mpsc::channel::<LogChunk>(64);
    {
        let mut pending = lock(&st.link.pending_logs);
        if pending.len() >= MAX_LOG_STREAMS {
            return Err(Problem(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{MAX_LOG_STREAMS} log streams are open already; try again later"),
            ));
        }
        pending.insert(request_id, tx);
    }
    let request = ControllerMessage::Logs(LogRequest {
        request_id,
        allocation: id.clone(),
        follow: opts.follow,
        tail: opts.tail,
    });
    if sender.send(Box::new(request)).await.is_err() {
        lock(&st.link.pending_logs).remove(&request_id);
        return Err(Problem(
            StatusCode::CONFLICT,
            format!("node {} disconnected", alloc.node),
        ));
    }
    let link = st.link.clone();
    let stream = futures_util::stream::unfold(
        (rx, false, link, request_id),
        |(mut rx, done, link, rid)| async move {
            if done {
                return None;
            }
            match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
                Ok(Some(chunk)) => {
                    let mut data = chunk.data;
                    let end = match chunk.end {
                        Some(Err(e)) => {
                            data.extend_from_slice(format!("\nerror: {e}\n").as_bytes());
                            true
                        }
                        Some(Ok(())) => true,
                        None => false,
                    };
                    Some((
                        Ok::<_, std::io::Error>(bytes::Bytes::from(data)),
                        (rx, end, link, rid),
                    ))
                }
                // Nothing for 30 s on a stream that may follow: keep waiting with an empty chunk.
                Err(_) => Some((Ok(bytes::Bytes::new()), (rx, false, link, rid))),
                Ok(None) => {
                    lock(&link.pending_logs).remove(&rid);
                    None
                }
            }
        },
    );
    Response::builder()
        .header("content-type", "text/plain; charset=utf-8")
        .body(axum::body::Body::from_stream(stream))
        .map_err(internal)
}

pub(crate) fn workload_problem(e: WorkloadError) -> Problem {
    match e {
        WorkloadError::Invalid(m) => Problem(StatusCode::UNPROCESSABLE_ENTITY, m),
        e @ (WorkloadError::UnknownJob(_)
        | WorkloadError::UnknownAlloc(_)
        | WorkloadError::UnknownVersion(_)) => Problem(StatusCode::NOT_FOUND, e.to_string()),
        WorkloadError::Conflict(m) => Problem(StatusCode::CONFLICT, m),
        WorkloadError::Store(e) => crate::http::api::store_problem(e),
    }
}

//! `/v1/vms/templates`: apply, list and delete `VMTemplate`s (machine shapes that
//! jobs name in `spec.task.vm.template`); `/v1/vms/{name}/suspend` and
//! `/resume`. Every change records an event naming the caller. The VMs
//! themselves are jobs (`/v1/jobs`).

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
use crate::services::events::{NewEvent, kind};
use crate::services::vms::{self, AppliedTemplate, VmError, VmTemplateView};

/// The VM template routes, merged into the API.
pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(apply, list))
        .routes(routes!(delete))
        .routes(routes!(delete_template))
        .routes(routes!(suspend))
        .routes(routes!(resume))
}

#[utoipa::path(post, path = "/v1/vms/{name}/suspend", operation_id = "suspend_vm", tag = "workloads", params(("name" = String, Path, description = "the VM's job name")), responses((status = 204, description = "kept (persisted) as suspended: its node pauses the guest (QMP `stop`), keeping its memory, and runs no health checks on it until it is resumed; the allocation's `suspended` says when the node has done it"), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 409, description = "the job runs no VM, or is stopped", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn suspend(
    state: State<Arc<ApiState>>,
    caller: Caller,
    name: Path<String>,
) -> Result<StatusCode, Problem> {
    set_suspended(state, caller, name, true).await
}

#[utoipa::path(post, path = "/v1/vms/{name}/resume", operation_id = "resume_vm", tag = "workloads", params(("name" = String, Path, description = "the VM's job name")), responses((status = 204, description = "no longer suspended: its node resumes the guest (QMP `cont`) where it was"), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 409, description = "the job runs no VM, or is stopped", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn resume(
    state: State<Arc<ApiState>>,
    caller: Caller,
    name: Path<String>,
) -> Result<StatusCode, Problem> {
    set_suspended(state, caller, name, false).await
}

async fn set_suspended(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
    suspended: bool,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    let by = caller.0.to_string();
    let (workloads, n, who) = (st.workloads.clone(), name.clone(), by.clone());
    let changed = tokio::task::spawn_blocking(move || workloads.set_suspended(&n, suspended, &who))
        .await
        .map_err(internal)?
        .map_err(crate::http::jobs::workload_problem)?;
    if changed {
        let asked = if suspended { "suspend" } else { "resume" };
        st.events.note(
            NewEvent::new(
                kind::VM_SUSPEND_ASKED,
                by,
                format!("vm {name}: {asked} asked"),
            )
            .job(&name)
            .detail("suspend", if suspended { "true" } else { "false" }),
        );
    }
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/vms/templates", operation_id = "apply_vm_templates", tag = "workloads", request_body = ApplyRequest, responses((status = 200, body = Vec<AppliedTemplate>), (status = 400, description = "the body is not valid JSON", content_type = "application/problem+json", body = ApiError), (status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 422, description = "the manifest is invalid; the message names file, line, field and what is accepted", content_type = "application/problem+json", body = ApiError), (status = 503, description = "busy checking other manifests, or the store cannot write now; nothing was saved", content_type = "application/problem+json", body = ApiError), (status = 507, description = "the data directory's disk is full; nothing was saved", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn apply(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Json(req): Json<ApplyRequest>,
) -> Result<Json<Vec<AppliedTemplate>>, Problem> {
    caller.require(Role::Operator)?;
    crate::api::check_apply(&req)?;
    let by = caller.0.to_string();
    let (store, file, manifest, who) = (
        st.store.clone(),
        req.file.clone(),
        req.manifest.clone(),
        by.clone(),
    );
    let applied = st
        .heavy
        .run(move || vms::apply(store.as_ref(), &file, &manifest, &who, SystemTime::now()))
        .await?
        .map_err(problem)?;
    for a in &applied {
        st.events.note(
            NewEvent::new(
                kind::VM_TEMPLATE,
                by.clone(),
                format!("VM template {} {} from {}", a.name, a.outcome, req.file),
            )
            .detail("template", &a.name)
            .detail("outcome", &a.outcome),
        );
    }
    Ok(Json(applied))
}

#[utoipa::path(get, path = "/v1/vms/templates", operation_id = "list_vm_templates", tag = "workloads", responses((status = 200, description = "every VM template, sorted by name, with the defaults filled in", body = Vec<VmTemplateView>), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn list(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Vec<VmTemplateView>>, Problem> {
    caller.require(Role::Viewer)?;
    let store = st.store.clone();
    let views = tokio::task::spawn_blocking(move || vms::views(store.as_ref()))
        .await
        .map_err(internal)?
        .map_err(crate::http::api::store_problem)?;
    Ok(Json(views))
}

#[utoipa::path(delete, path = "/v1/vms/templates/{name}", operation_id = "delete_vm_template", tag = "workloads", params(("name" = String, Path, description = "template name")), responses((status = 204, description = "the same as `POST /v1/vms/templates/{name}/delete`; deleted; jobs applied with it keep the machine they resolved"), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn delete_template(
    state: State<Arc<ApiState>>,
    caller: Caller,
    name: Path<String>,
) -> Result<StatusCode, Problem> {
    delete(state, caller, name).await
}

#[utoipa::path(post, path = "/v1/vms/templates/{name}/delete", operation_id = "post_delete_vm_template", tag = "workloads", params(("name" = String, Path, description = "template name")), responses((status = 204, description = "deleted; jobs applied with it keep the machine they resolved"), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn delete(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    let by = caller.0.to_string();
    let store = st.store.clone();
    let n = name.clone();
    let deleted = tokio::task::spawn_blocking(move || store.delete_vm_template(&n))
        .await
        .map_err(internal)?
        .map_err(crate::http::api::store_problem)?;
    if !deleted {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            format!("no VM template named {name}"),
        ));
    }
    st.events.note(
        NewEvent::new(kind::VM_TEMPLATE, by, format!("VM template {name} deleted"))
            .detail("template", &name)
            .detail("outcome", "deleted"),
    );
    Ok(StatusCode::NO_CONTENT)
}

fn problem(e: VmError) -> Problem {
    match e {
        VmError::Invalid(m) => Problem::new(StatusCode::UNPROCESSABLE_ENTITY, m),
        VmError::Store(e) => crate::http::api::store_problem(e),
    }
}

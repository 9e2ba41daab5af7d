//! The secret routes: `GET /v1/secrets` and `GET /v1/secrets/{name}` (viewer:
//! names, versions, keys and sizes, never values), `PUT /v1/secrets/{name}` and
//! `POST /v1/secrets` (operator: a new version, from a body or a `kind: Secret`
//! manifest), `DELETE /v1/secrets/{name}` (operator; refused while a job uses it).
//! A new version rolls out the jobs that use the secret.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use novacron_api::{ApiError, JobRoll, SecretSetRequest, SecretSetResult, SecretUser, SecretView};
use novacron_common::clock::unix_ms;
use novacron_common::manifest::secret::{self, SecretData, SecretType};
use novacron_common::pki::Role;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::api::{ApiState, ApplyRequest, Caller, Problem, internal};
use crate::services::events::{NewEvent, kind};
use crate::services::secrets::{SecretError, SetOutcome};

/// The secret routes.
pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(list_secrets, apply_secret))
        .routes(routes!(show_secret, set_secret, delete_secret))
}

#[utoipa::path(get, path = "/v1/secrets", tag = "workloads", responses((status = 200, description = "every secret: versions, keys, sizes and the jobs that use it; never a value", body = Vec<SecretView>), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn list_secrets(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Vec<SecretView>>, Problem> {
    caller.require(Role::Viewer)?;
    let st2 = st.clone();
    tokio::task::spawn_blocking(move || views(&st2, None))
        .await
        .map(Json)
        .map_err(internal)
}

#[utoipa::path(get, path = "/v1/secrets/{name}", tag = "workloads", params(("name" = String, Path, description = "secret name")), responses((status = 200, body = SecretView), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn show_secret(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<SecretView>, Problem> {
    caller.require(Role::Viewer)?;
    let st2 = st.clone();
    let one = name.clone();
    tokio::task::spawn_blocking(move || views(&st2, Some(&one)))
        .await
        .map_err(internal)?
        .pop()
        .map(Json)
        .ok_or_else(|| not_found(&name))
}

#[utoipa::path(put, path = "/v1/secrets/{name}", tag = "workloads", params(("name" = String, Path, description = "secret name")), request_body = SecretSetRequest, responses((status = 400, description = "the body is not valid JSON", content_type = "application/problem+json", body = ApiError), (status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 200, description = "the new version (or unchanged) and the jobs rolling out to it", body = SecretSetResult), (status = 409, description = "the type would change while jobs use it", content_type = "application/problem+json", body = ApiError), (status = 422, description = "a bad name, key or size; the message never quotes a value", content_type = "application/problem+json", body = ApiError), (status = 507, description = "the data directory's disk is full; nothing was saved", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn set_secret(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
    Json(req): Json<SecretSetRequest>,
) -> Result<Json<SecretSetResult>, Problem> {
    caller.require(Role::Operator)?;
    let data = SecretData(req.data);
    secret::check_secret("request", &name, req.secret_type, &data)
        .map_err(|e| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    set(st, caller, name, req.secret_type, data).await
}

#[utoipa::path(post, path = "/v1/secrets", tag = "workloads", request_body = ApplyRequest, responses((status = 400, description = "the body is not valid JSON", content_type = "application/problem+json", body = ApiError), (status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 200, description = "the new version (or unchanged) and the jobs rolling out to it", body = SecretSetResult), (status = 409, description = "the type would change while jobs use it", content_type = "application/problem+json", body = ApiError), (status = 422, description = "the manifest is invalid; the message names file, line and field, never a value", content_type = "application/problem+json", body = ApiError), (status = 507, description = "the data directory's disk is full; nothing was saved", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn apply_secret(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Json(req): Json<ApplyRequest>,
) -> Result<Json<SecretSetResult>, Problem> {
    caller.require(Role::Operator)?;
    crate::api::check_apply(&req)?;
    let (file, manifest) = (req.file.clone(), req.manifest.clone());
    let parsed = st
        .heavy
        .run(move || secret::parse_secret(&file, &manifest))
        .await?
        .map_err(|e| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    set(st, caller, parsed.name, parsed.secret_type, parsed.data).await
}

#[utoipa::path(delete, path = "/v1/secrets/{name}", tag = "workloads", params(("name" = String, Path, description = "secret name")), responses((status = 204, description = "deleted with every version"), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 409, description = "a job's current or stable version uses it", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn delete_secret(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    let by = caller.0.to_string();
    let st2 = st.clone();
    let n = name.clone();
    tokio::task::spawn_blocking(move || {
        let users = st2
            .workloads
            .secret_users(&n)
            .into_iter()
            .map(|(j, _)| j)
            .collect();
        st2.secrets.delete(&n, users)
    })
    .await
    .map_err(internal)?
    .map_err(problem)?;
    st.events.note(
        NewEvent::new(kind::SECRET_CHANGED, by, format!("secret {name} deleted"))
            .detail("secret", &name)
            .detail("outcome", "deleted"),
    );
    Ok(StatusCode::NO_CONTENT)
}

/// Sets a checked secret, records the event (keys only) and rolls out the jobs
/// that use it.
async fn set(
    st: Arc<ApiState>,
    caller: Caller,
    name: String,
    secret_type: SecretType,
    data: SecretData,
) -> Result<Json<SecretSetResult>, Problem> {
    let by = caller.0.to_string();
    let keys = data.0.keys().cloned().collect::<Vec<_>>().join(",");
    let st2 = st.clone();
    let (n, who) = (name.clone(), by.clone());
    let (version, outcome, rolled) = tokio::task::spawn_blocking(move || {
        let now = SystemTime::now();
        let in_use = st2.workloads.secret_versions_in_use(&n);
        let registry = st2.workloads.secret_used_for_pulls(&n);
        let usage = crate::services::secrets::Usage {
            versions: &in_use,
            for_pulls: registry,
        };
        let (version, outcome) =
            st2.secrets
                .set(&n, secret_type, data, &who, unix_ms(now), usage)?;
        let rolled = if outcome == SetOutcome::Updated {
            st2.workloads
                .secret_changed(&n, version, &who, now)
                .map_err(|e| match e {
                    crate::services::workloads::WorkloadError::Store(e) => SecretError::Store(e),
                    other => SecretError::Rollout(other.to_string()),
                })?
        } else {
            Vec::new()
        };
        Ok::<_, SecretError>((version, outcome, rolled))
    })
    .await
    .map_err(internal)?
    .map_err(problem)?;
    let outcome = match outcome {
        SetOutcome::Created => "created",
        SetOutcome::Updated => "updated",
        SetOutcome::Unchanged => "unchanged",
    };
    if outcome != "unchanged" {
        let jobs: Vec<&str> = rolled.iter().map(|(j, _)| j.as_str()).collect();
        st.events.note(
            NewEvent::new(
                kind::SECRET_CHANGED,
                by,
                format!(
                    "secret {name} {outcome}: version {version} (keys {keys}){}",
                    if jobs.is_empty() {
                        String::new()
                    } else {
                        format!("; rolling out {}", jobs.join(", "))
                    }
                ),
            )
            .detail("secret", &name)
            .detail("version", version)
            .detail("outcome", outcome),
        );
    }
    Ok(Json(SecretSetResult {
        secret: name,
        version,
        outcome: outcome.into(),
        rolled: rolled
            .into_iter()
            .map(|(job, version)| JobRoll { job, version })
            .collect(),
    }))
}

/// Every secret's view (or `only` that one).
fn views(st: &ApiState, only: Option<&str>) -> Vec<SecretView> {
    st.secrets
        .records()
        .into_iter()
        .filter(|r| only.is_none_or(|n| n == r.name))
        .filter_map(|r| {
            let latest = r.versions.last()?;
            Some(SecretView {
                used_by: st
                    .workloads
                    .secret_users(&r.name)
                    .into_iter()
                    .map(|(job, secret_version)| SecretUser {
                        job,
                        secret_version,
                    })
                    .collect(),
                name: r.name.clone(),
                secret_type: r.secret_type,
                version: latest.version,
                versions: r.versions.iter().map(|v| v.version).collect(),
                keys: latest.keys.clone(),
                bytes: latest.bytes,
                updated_unix_ms: latest.created_unix_ms,
                updated_by: latest.by.clone(),
            })
        })
        .collect()
}

fn not_found(name: &str) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        format!("secret {name:?} does not exist; `novacron secret list` shows the secrets"),
    )
}

fn problem(e: SecretError) -> Problem {
    match e {
        SecretError::NotFound(name) => not_found(&name),
        e @ (SecretError::InUse { .. } | SecretError::TypeChange { .. }) => {
            Problem::new(StatusCode::CONFLICT, e.to_string())
        }
        SecretError::Store(e) => crate::http::api::store_problem(e),
        e @ SecretError::Rollout(_) => internal(e),
    }
}

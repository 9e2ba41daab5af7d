//! `/v1/alerts`: the active alerts, alert rules and notification channels
//! (applied as manifests), silences, acknowledgements and the Prometheus export
//! ([`Alerts`](crate::services::alerts::Alerts) evaluates and notifies). Every
//! change records an event naming the caller.

use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use novacron_api::{
    AckRequest, AlertApplyResult, AlertExport, AlertRuleView, AlertView, ApiError, ChannelView,
    SilenceRequest, SilenceView,
};
use novacron_common::pki::Role;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::api::{ApiState, ApplyRequest, Caller, Problem};
use crate::services::alerts::AlertError;
use crate::services::events::{NewEvent, kind};

/// The alerting routes, merged into the API.
pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(active))
        .routes(routes!(apply_rules, list_rules))
        .routes(routes!(delete_rule))
        .routes(routes!(delete_rule_post))
        .routes(routes!(apply_channels, list_channels))
        .routes(routes!(delete_channel))
        .routes(routes!(delete_channel_post))
        .routes(routes!(create_silence, list_silences))
        .routes(routes!(delete_silence))
        .routes(routes!(delete_silence_post))
        .routes(routes!(ack))
        .routes(routes!(export))
}

#[utoipa::path(get, path = "/v1/alerts", operation_id = "list_alerts", tag = "alerts", responses((status = 200, description = "the pending and firing alerts, firing first", body = Vec<AlertView>), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn active(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Vec<AlertView>>, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(st.alerts.active(SystemTime::now())))
}

#[utoipa::path(post, path = "/v1/alerts/rules", tag = "alerts", request_body = ApplyRequest, responses((status = 200, description = "one result per rule of the file", body = Vec<AlertApplyResult>), (status = 400, description = "the body is not valid JSON", content_type = "application/problem+json", body = ApiError), (status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 422, description = "a rule is invalid; the message names file, line, field and what is accepted; nothing was applied", content_type = "application/problem+json", body = ApiError), (status = 503, description = "busy checking other manifests, or the store cannot write now", content_type = "application/problem+json", body = ApiError), (status = 507, description = "the data directory's disk is full", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn apply_rules(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Json(req): Json<ApplyRequest>,
) -> Result<Json<Vec<AlertApplyResult>>, Problem> {
    apply(st, caller, req, true).await
}

#[utoipa::path(post, path = "/v1/alerts/channels", tag = "alerts", request_body = ApplyRequest, responses((status = 200, description = "one result per channel of the file", body = Vec<AlertApplyResult>), (status = 400, description = "the body is not valid JSON", content_type = "application/problem+json", body = ApiError), (status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 422, description = "a channel is invalid; the message names file, line, field and what is accepted; nothing was applied", content_type = "application/problem+json", body = ApiError), (status = 503, description = "busy checking other manifests, or the store cannot write now", content_type = "application/problem+json", body = ApiError), (status = 507, description = "the data directory's disk is full", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn apply_channels(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Json(req): Json<ApplyRequest>,
) -> Result<Json<Vec<AlertApplyResult>>, Problem> {
    apply(st, caller, req, false).await
}

async fn apply(
    st: Arc<ApiState>,
    caller: Caller,
    req: ApplyRequest,
    rules: bool,
) -> Result<Json<Vec<AlertApplyResult>>, Problem> {
    caller.require(Role::Operator)?;
    crate::api::check_apply(&req)?;
    let by = caller.0.to_string();
    let (alerts, file, who, text) = (
        st.alerts.clone(),
        req.file.clone(),
        by.clone(),
        req.manifest.clone(),
    );
    let results = st
        .heavy
        .run(move || {
            let now = SystemTime::now();
            if rules {
                alerts.apply_rules(&file, &text, &who, now)
            } else {
                alerts.apply_channels(&file, &text, &who, now)
            }
        })
        .await?
        .map_err(problem)?;
    for r in results.iter().filter(|r| r.outcome != "unchanged") {
        st.events.note(
            NewEvent::new(
                kind::ALERT_CONFIG,
                by.clone(),
                format!("{} {} {} from {}", r.kind, r.name, r.outcome, req.file),
            )
            .detail("name", &r.name)
            .detail("outcome", &r.outcome),
        );
    }
    Ok(Json(results))
}

#[utoipa::path(get, path = "/v1/alerts/rules", operation_id = "list_alert_rules", tag = "alerts", responses((status = 200, description = "the built-in rules, then the applied ones, with their alerts pending and firing", body = Vec<AlertRuleView>), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn list_rules(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Vec<AlertRuleView>>, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(st.alerts.rule_views()))
}

#[utoipa::path(get, path = "/v1/alerts/channels", operation_id = "list_alert_channels", tag = "alerts", responses((status = 200, description = "the channels with what waits in the outbox for each", body = Vec<ChannelView>), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn list_channels(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Vec<ChannelView>>, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(st.alerts.channel_views()))
}

#[utoipa::path(delete, path = "/v1/alerts/rules/{name}", tag = "alerts", params(("name" = String, Path, description = "rule name")), responses((status = 204, description = "deleted with its alerts; the same as `POST /v1/alerts/rules/{name}/delete`"), (status = 404, description = "no such rule", content_type = "application/problem+json", body = ApiError), (status = 409, description = "a built-in rule cannot be deleted (silence it)", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn delete_rule(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, Problem> {
    remove(&st, &caller, "alert rule", &name, |a| a.delete_rule(&name))
}

#[utoipa::path(post, path = "/v1/alerts/rules/{name}/delete", tag = "alerts", params(("name" = String, Path, description = "rule name")), responses((status = 204, description = "deleted with its alerts"), (status = 404, description = "no such rule", content_type = "application/problem+json", body = ApiError), (status = 409, description = "a built-in rule cannot be deleted (silence it)", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn delete_rule_post(
    state: State<Arc<ApiState>>,
    caller: Caller,
    name: Path<String>,
) -> Result<StatusCode, Problem> {
    delete_rule(state, caller, name).await
}

#[utoipa::path(delete, path = "/v1/alerts/channels/{name}", tag = "alerts", params(("name" = String, Path, description = "channel name")), responses((status = 204, description = "deleted; what waited for it is given up; the same as `POST /v1/alerts/channels/{name}/delete`"), (status = 404, description = "no such channel", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn delete_channel(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, Problem> {
    remove(&st, &caller, "notification channel", &name, |a| {
        a.delete_channel(&name)
    })
}

#[utoipa::path(post, path = "/v1/alerts/channels/{name}/delete", tag = "alerts", params(("name" = String, Path, description = "channel name")), responses((status = 204, description = "deleted; what waited for it is given up"), (status = 404, description = "no such channel", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn delete_channel_post(
    state: State<Arc<ApiState>>,
    caller: Caller,
    name: Path<String>,
) -> Result<StatusCode, Problem> {
    delete_channel(state, caller, name).await
}

#[utoipa::path(post, path = "/v1/alerts/silences", tag = "alerts", request_body = SilenceRequest, responses((status = 200, description = "the silence, with the alerts it covers now", body = SilenceView), (status = 422, description = "no matchers, or a bad duration", content_type = "application/problem+json", body = ApiError), (status = 400, description = "the body is not valid JSON", content_type = "application/problem+json", body = ApiError), (status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn create_silence(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Json(req): Json<SilenceRequest>,
) -> Result<Json<SilenceView>, Problem> {
    caller.require(Role::Operator)?;
    let by = caller.0.to_string();
    let s = st
        .alerts
        .silence(&req, &by, SystemTime::now())
        .map_err(problem)?;
    let matchers: Vec<String> = s.matchers.iter().map(|(k, v)| format!("{k}={v}")).collect();
    st.events.note(
        NewEvent::new(
            kind::ALERT_CONFIG,
            by,
            format!(
                "silence {} of {} until {} ({} alert(s) now){}",
                s.id,
                matchers.join(","),
                novacron_common::alert::message::rfc3339(s.ends_unix_ms),
                s.covers,
                if s.comment.is_empty() {
                    String::new()
                } else {
                    format!(": {}", s.comment)
                }
            ),
        )
        .detail("silence", &s.id),
    );
    Ok(Json(s))
}

#[utoipa::path(get, path = "/v1/alerts/silences", operation_id = "list_silences", tag = "alerts", responses((status = 200, description = "the silences in force", body = Vec<SilenceView>), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn list_silences(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Vec<SilenceView>>, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(st.alerts.silences(SystemTime::now())))
}

#[utoipa::path(delete, path = "/v1/alerts/silences/{id}", tag = "alerts", params(("id" = String, Path, description = "silence id")), responses((status = 204, description = "removed; the same as `POST /v1/alerts/silences/{id}/delete`"), (status = 404, description = "no such silence", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn delete_silence(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    remove(&st, &caller, "silence", &id, |a| a.unsilence(&id))
}

#[utoipa::path(post, path = "/v1/alerts/silences/{id}/delete", tag = "alerts", params(("id" = String, Path, description = "silence id")), responses((status = 204, description = "removed"), (status = 404, description = "no such silence", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn delete_silence_post(
    state: State<Arc<ApiState>>,
    caller: Caller,
    id: Path<String>,
) -> Result<StatusCode, Problem> {
    delete_silence(state, caller, id).await
}

#[utoipa::path(post, path = "/v1/alerts/ack", tag = "alerts", request_body = AckRequest, responses((status = 204, description = "acknowledged: no repeated notifications until it resolves"), (status = 404, description = "no such active alert", content_type = "application/problem+json", body = ApiError), (status = 400, description = "the body is not valid JSON", content_type = "application/problem+json", body = ApiError), (status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 422, description = "the JSON lacks a field", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn ack(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Json(req): Json<AckRequest>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    let by = caller.0.to_string();
    st.alerts
        .ack(&req.rule, &req.subject, &by)
        .map_err(problem)?;
    st.events.note(
        NewEvent::new(
            kind::ALERT_CONFIG,
            by,
            format!("alert {} for {} acknowledged", req.rule, req.subject),
        )
        .detail("rule", &req.rule)
        .detail("subject", &req.subject),
    );
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/alerts/export", operation_id = "export_alert_rules", tag = "alerts", responses((status = 200, description = "every rule as a Prometheus rule file, and the rules it cannot express", body = AlertExport), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn export(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<AlertExport>, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(st.alerts.export()))
}

fn remove(
    st: &ApiState,
    caller: &Caller,
    what: &str,
    name: &str,
    f: impl FnOnce(&crate::services::alerts::Alerts) -> Result<(), AlertError>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    f(&st.alerts).map_err(problem)?;
    let by = caller.0.to_string();
    st.events.note(
        NewEvent::new(kind::ALERT_CONFIG, by, format!("{what} {name} deleted"))
            .detail("name", name),
    );
    Ok(StatusCode::NO_CONTENT)
}

fn problem(e: AlertError) -> Problem {
    match e {
        AlertError::Invalid(m) => Problem::new(StatusCode::UNPROCESSABLE_ENTITY, m),
        AlertError::Unknown(m) => Problem::new(StatusCode::NOT_FOUND, m),
        AlertError::Builtin(m) => Problem::new(StatusCode::CONFLICT, m),
        AlertError::Store(e) => crate::http::api::store_problem(e),
    }
}

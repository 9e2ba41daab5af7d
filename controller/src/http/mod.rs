//! The HTTPS API: the router, authentication, the TLS listener and one module per
//! resource with its handlers. It calls [`crate::services`] and [`crate::state`];
//! nothing below it imports it.

pub mod alerts;
pub mod api;
pub mod certs;
pub mod costs;
pub mod events;
pub mod exec;
pub mod history;
pub mod https;
pub mod images;
pub mod index;
pub mod jobs;
pub mod metrics;
pub mod migrations;
pub mod page;
pub mod policies;
pub mod pools;
pub mod secrets;
pub mod services;
pub mod ui;
pub mod vms;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use novacron_api::{ApiError, PROBLEM_JSON};
use novacron_common::pki::Identity;
use novacron_common::sync::lock;
use tracing::warn;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

pub use crate::http::api::{ApiState, Caller, MAX_MANIFEST_BYTES, Problem};
use crate::http::https::Peer;
use crate::services::events::{NewEvent, kind};

/// Builds the router: every route documented in the OpenAPI document, which is
/// itself served at `/v1/openapi.json`.
pub fn router(state: Arc<ApiState>) -> Router {
    let (router, mut doc) = api_routes().split_for_parts();
    complete_document(&mut doc);
    let doc = Arc::new(doc);
    let api = router
        .route(
            "/v1/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { Json(doc.as_ref().clone()) }
            }),
        )
        .layer(axum::middleware::from_fn(page::paginate))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            index::blocking,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit_refusals,
        ))
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::map_response(challenge))
        .layer(axum::middleware::from_fn_with_state(
            REQUEST_DEADLINE,
            deadline,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state.clone());
    // The dashboard's HTML routes, with their own layers. Merged into them (not
    // the other way round) so that the API's fallback, a problem document, stays.
    ui::router(state).merge(api)
}

/// The largest request body: a manifest at its limit ([`MAX_MANIFEST_BYTES`]
/// characters) still fits when every character is JSON-escaped (up to 12 bytes
/// each), so an oversized manifest is answered by the handler with a 422 that
/// names its size, not by a bare 413.
pub const MAX_BODY_BYTES: usize = 12 * MAX_MANIFEST_BYTES + 64 * 1024;

/// How long a handler may take to start its answer; past it the caller gets a 503
/// (a streamed body, such as logs or events, may then flow for as long as it lasts).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// Requests that wait on an agent for longer than [`REQUEST_DEADLINE`] by design:
/// `(method, path suffix)`.
const LONG_REQUESTS: &[(&str, &str)] = &[("POST", "/checkpoint")];

/// Answers 503 when a handler has not answered within `limit`
/// ([`REQUEST_DEADLINE`]), so that no request hangs on a stuck handler; the work
/// it started is bounded elsewhere (see [`crate::services::heavy`]).
async fn deadline(
    State(limit): State<Duration>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // Image blob uploads last as long as their bytes flow (each bounded by
    // [`images::UPLOAD_IDLE`] between chunks).
    let long = LONG_REQUESTS
        .iter()
        .any(|(m, suffix)| req.method().as_str() == *m && req.uri().path().ends_with(suffix))
        || (req.method() == axum::http::Method::PUT
            && req.uri().path().starts_with("/v1/images/blobs/"));
    if long {
        return next.run(req).await;
    }
    // A blocking query may wait up to its `wait` before its handler runs.
    let blocking = req.method() == axum::http::Method::GET
        && index::indexed(req.uri().path())
        && req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p.starts_with("index=")));
    let limit = if blocking {
        limit + crate::services::index::MAX_WAIT
    } else {
        limit
    };
    let what = format!("{} {}", req.method(), req.uri().path());
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            warn!(request = %what, deadline = ?limit, "request past its deadline");
            Problem(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{what}: no answer within {limit:?}; the controller is overloaded, retry later"
                ),
            )
            .into_response()
        }
    }
}

/// The challenge sent with every 401 (RFC 9110, section 11.6.1): the API takes an
/// API token as a bearer credential (or a client certificate, which has no HTTP
/// scheme).
pub const WWW_AUTHENTICATE: &str = "Bearer realm=\"novacron\"";

/// Adds [`WWW_AUTHENTICATE`] to every 401 answer that lacks a challenge.
async fn challenge(mut response: Response) -> Response {
    if response.status() == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .entry(axum::http::header::WWW_AUTHENTICATE)
            .or_insert(axum::http::HeaderValue::from_static(WWW_AUTHENTICATE));
    }
    response
}

/// The longest non-JSON error body turned into a JSON error.
const MAX_ERROR_BODY: usize = 16 * 1024;

/// Gives every error answer the documented problem document ([`ApiError`],
/// `application/problem+json`), including axum's own rejections (a body that is
/// not JSON, a bad query string, an unknown route), which are plain text or empty.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with(PROBLEM_JSON));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let body = axum::body::to_bytes(response.into_body(), MAX_ERROR_BODY)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_owned();
    let error = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_owned()
    } else {
        text
    };
    Problem::new(status, error).into_response()
}

/// Who made a request, as [`Caller`] authenticated it; [`audit_refusals`] puts an
/// empty one in the request and reads it after the handler answered.
#[derive(Debug, Clone, Default)]
pub(crate) struct AuditSlot(Arc<std::sync::Mutex<Option<String>>>);

impl AuditSlot {
    fn set(&self, who: &Identity) {
        *lock(&self.0) = Some(who.to_string());
    }

    fn who(&self) -> Option<String> {
        lock(&self.0).clone()
    }
}

/// Records every refused (403) call that would have changed something, with who
/// made it, what it was and why it was refused: an `access.denied` event.
async fn audit_refusals(
    State(st): State<Arc<ApiState>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = request.method().clone();
    let mutating = !matches!(
        method,
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    if !mutating {
        return next.run(request).await;
    }
    let path = request.uri().path().to_owned();
    let peer = request
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|c| c.0.addr);
    let slot = AuditSlot::default();
    request.extensions_mut().insert(slot.clone());
    let response = next.run(request).await;
    if response.status() != StatusCode::FORBIDDEN {
        return response;
    }
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_ERROR_BODY)
        .await
        .unwrap_or_default();
    let why = serde_json::from_slice::<ApiError>(&bytes)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
    let who = slot.who().unwrap_or_else(|| match peer {
        Some(addr) => format!("anonymous ({addr})"),
        None => "anonymous".to_owned(),
    });
    warn!(%who, %method, %path, %why, "call refused");
    let mut event = NewEvent::new(
        kind::ACCESS_DENIED,
        who,
        format!("refused {method} {path}: {why}"),
    )
    .detail("method", &method)
    .detail("path", &path)
    .detail("status", StatusCode::FORBIDDEN.as_u16());
    if let Some(addr) = peer {
        event = event.detail("remote", addr);
    }
    st.events.note(event);
    Response::from_parts(parts, axum::body::Body::from(bytes))
}

/// The OpenAPI document of the HTTPS API, as `/v1/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = api_routes().split_for_parts().1;
    complete_document(&mut doc);
    doc
}

/// What the annotations leave out of the document: the blocking-query and paging
/// parameters and headers, and the descriptions of undescribed responses.
fn complete_document(doc: &mut utoipa::openapi::OpenApi) {
    index::document(doc);
    page::document(doc);
    describe_responses(doc);
}

/// Gives every response the annotations left undescribed a description (OpenAPI
/// requires one, and generated clients and docs show it): what the status means
/// on this API, with the HTTP reason phrase as the last resort, as Kubernetes'
/// document does. Errors carry their specifics in the problem's `detail`.
fn describe_responses(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::RefOr;
    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.options,
            &mut item.head,
            &mut item.patch,
            &mut item.trace,
        ];
        for op in operations.into_iter().flatten() {
            for (code, response) in op.responses.responses.iter_mut() {
                if let RefOr::T(response) = response
                    && response.description.trim().is_empty()
                {
                    response.description = status_description(code);
                }
            }
        }
    }
}

/// What a status code means on this API, for [`describe_responses`].
fn status_description(code: &str) -> String {
    let text = match code {
        "200" => "success",
        "201" => "created",
        "204" => "done; no body",
        "400" => "the request is malformed; the problem's `detail` says what",
        "401" => "no or unknown credentials",
        "403" => "the caller's role is too low",
        "404" => "nothing matches the path (unknown name or id)",
        "409" => "the request conflicts with the current state; the problem's `detail` says how",
        "413" => "the body is larger than this endpoint accepts",
        "415" => "the body is not `application/json`",
        "422" => "the body is well-formed but invalid; the problem's `detail` names the field",
        "429" => "too many requests; retry after the `Retry-After` header",
        "500" => "an internal error; the controller's log has the details",
        "503" => {
            "the controller cannot answer now (busy, store unavailable or past its deadline); retry"
        }
        "507" => "the data directory's disk is full; nothing was saved",
        other => {
            return other
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .and_then(|c| c.canonical_reason())
                .unwrap_or("response")
                .to_string();
        }
    };
    text.to_string()
}

/// The documented routes. A route exists only through its `#[utoipa::path]`
/// annotation, so the document cannot drift from the API.
fn api_routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(api::routes())
        .merge(jobs::routes())
        .merge(events::routes())
        .merge(costs::routes())
        .merge(pools::routes())
        .merge(services::routes())
        .merge(exec::routes())
        .merge(metrics::routes())
        .merge(history::routes())
        .merge(policies::routes())
        .merge(alerts::routes())
        .merge(migrations::routes())
        .merge(certs::routes())
        .merge(secrets::routes())
        .merge(images::routes())
        .merge(vms::routes())
}

/// The document's frame: title, security schemes and the default requirement
/// (a client certificate or an API token); paths come from the routes.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "NovaCron controller API",
        description = "Operate a NovaCron fleet: nodes, jobs, allocations, events, remote commands. Authenticate with an operator client certificate from the fleet CA (mutual TLS) or an API token (`Authorization: Bearer nca_...`). Roles: viewer (read), operator (change workloads, run commands), admin (fleet management)."
    ),
    modifiers(&Security),
    security(("bearer" = []), ("client_certificate" = [])),
    tags(
        (name = "fleet", description = "Nodes, enrollment and join tokens"),
        (name = "workloads", description = "Jobs, allocations and logs"),
        (name = "events", description = "The event log"),
        (name = "access", description = "API tokens"),
        (name = "cost", description = "Hourly cost and right-sizing"),
        (name = "alerts", description = "Alert rules, notification channels, silences and active alerts"),
        (name = "controller", description = "The controller itself")
    )
)]
struct ApiDoc;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("nca_<id>.<secret>")
                    .description(Some("An API token from `novacron-controller admin token`"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "client_certificate",
            SecurityScheme::MutualTls {
                description: Some(
                    "An operator certificate from the fleet CA (`novacron-controller admin issue`)"
                        .into(),
                ),
                deprecated: None,
                extensions: None,
            },
        );
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    fn refs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    match (k.as_str(), x) {
                        ("$ref", serde_json::Value::String(r)) => out.push(r.clone()),
                        _ => refs(x, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }

    /// Every schema the document refers to is in it (for example an
    /// allocation's `ports`, whose `AllocPort` type is only reached through
    /// the `AllocRecord` schema, the name `AllocView` keeps).
    #[test]
    fn every_schema_reference_resolves() {
        let doc = serde_json::to_value(openapi()).expect("the document serializes");
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(!found.is_empty());
        let schemas = &doc["components"]["schemas"];
        for r in &found {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected reference {r}"));
            assert!(schemas.get(name).is_some(), "{r} does not resolve");
        }
        assert!(schemas.get("AllocPort").is_some());
    }

    /// Serves `router` behind the deadline layer (`limit`) on a loopback port.
    async fn serve(limit: Duration) -> String {
        let slow = || async {
            tokio::time::sleep(Duration::from_secs(2)).await;
            "late"
        };
        let router = Router::new()
            .route("/slow", axum::routing::get(slow))
            .route("/fast", axum::routing::get(|| async { "fast" }))
            .route("/v1/allocations/a/checkpoint", axum::routing::post(slow))
            .layer(axum::middleware::from_fn_with_state(limit, deadline));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_handler_past_its_deadline_answers_503_and_a_checkpoint_may_take_longer() {
        let base = serve(Duration::from_millis(200)).await;
        novacron_common::tls::install_crypto_provider();
        let client = reqwest::Client::new();
        let fast = client
            .get(format!("{base}/fast"))
            .send()
            .await
            .expect("fast");
        assert_eq!(fast.status(), StatusCode::OK);
        let slow = client
            .get(format!("{base}/slow"))
            .send()
            .await
            .expect("slow");
        assert_eq!(slow.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body: ApiError = slow.json().await.expect("an ApiError");
        assert!(
            body.error.starts_with("GET /slow: no answer within 200ms"),
            "{}",
            body.error
        );
        let long = client
            .post(format!("{base}/v1/allocations/a/checkpoint"))
            .send()
            .await
            .expect("checkpoint");
        assert_eq!(long.status(), StatusCode::OK);
        assert_eq!(long.text().await.expect("body"), "late");
    }
}

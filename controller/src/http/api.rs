//! The operator HTTPS API (axum). Every route except the probes (`/healthz`,
//! `/livez`, `/readyz`) and `/v1/enroll` requires an operator client certificate
//! from the fleet CA or an API token; every 401 carries a `WWW-Authenticate`
//! challenge.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};

use axum::Json;
use novacron_api::{
    ApiError, ControllerStats, EnrollRequest, EnrollResponse, MetricsWindow, NodeView, VersionInfo,
};
use novacron_common::pki::{self, Identity, Role, Validity};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::AuditSlot;
use crate::http::https::Peer;
pub use crate::http::{MAX_BODY_BYTES, REQUEST_DEADLINE, openapi, router};
pub use crate::services::context::ApiState;
use crate::services::events::{NewEvent, kind};
use crate::state::api_tokens::{self, ApiToken, ApiTokenError, ApiTokenRecord};
use crate::state::registry::RegistryError;
use crate::state::store::{ConsumeError, Revocation, StoreError};
use crate::state::tokens::{JoinToken, TokenRecord};
pub use novacron_api::ApplyRequest;
use novacron_common::clock::unix_ms;

/// The routes of nodes, tokens, jobs and allocations.
pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(livez))
        .routes(routes!(readyz))
        .routes(routes!(enroll))
        .routes(routes!(list_nodes))
        .routes(routes!(show_node, delete_node))
        .routes(routes!(node_metrics))
        .routes(routes!(node_images))
        .routes(routes!(cordon_node))
        .routes(routes!(uncordon_node))
        .routes(routes!(revoke_node))
        .routes(routes!(create_token))
        .routes(routes!(create_api_token, list_api_tokens))
        .routes(routes!(revoke_api_token))
        .routes(routes!(delete_api_token))
        .routes(routes!(version))
        .routes(routes!(controllers))
        .routes(routes!(backup))
        .routes(routes!(stats))
        .routes(routes!(reset_latency))
}

#[utoipa::path(get, path = "/healthz", tag = "controller", security(()), responses((status = 200, description = "the API serves", content_type = "text/plain", body = String)))]
async fn healthz() -> &'static str {
    "ok"
}

/// Liveness: the process runs and its HTTPS API answers; it checks nothing else,
/// so a restart is the only cure for a failure (a store problem is `/readyz`'s).
#[utoipa::path(get, path = "/livez", tag = "controller", security(()), responses((status = 200, description = "alive: the process answers", content_type = "text/plain", body = String)))]
async fn livez() -> &'static str {
    "ok"
}

/// Readiness. The API is served only once the store is open and every service is
/// loaded (before that, connections wait or are refused), so an answer here means
/// the controller has started; it is ready while it leads (a single controller
/// always does) and its store can write.
#[utoipa::path(get, path = "/readyz", tag = "controller", security(()), responses((status = 200, description = "ready: started, the leader, and the store can write", content_type = "text/plain", body = String), (status = 503, description = "not ready; the message says why (not the leader, or the store cannot write: a full disk)", content_type = "application/problem+json", body = ApiError)))]
async fn readyz(State(st): State<Arc<ApiState>>) -> Result<&'static str, Problem> {
    if !st.leadership.is_leader() {
        return Err(Problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: this controller is not the leader".into(),
        ));
    }
    let store = st.store.clone();
    match tokio::task::spawn_blocking(move || store.writable()).await {
        Ok(Ok(())) => Ok("ready"),
        Ok(Err(e)) => Err(Problem(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the store cannot write: {e}"),
        )),
        Err(e) => Err(Problem(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the store check failed: {e}"),
        )),
    }
}

/// An error answer: a status and a message that says what to do, sent as an
/// RFC 9457 problem document ([`ApiError`], `application/problem+json`) whose
/// `type` follows from the status ([`novacron_api::ErrorCode`]).
#[derive(Debug)]
pub struct Problem(pub(crate) StatusCode, pub(crate) String);

impl Problem {
    /// A 400 with `message`.
    pub fn bad_request(message: impl Into<String>) -> Problem {
        Problem(StatusCode::BAD_REQUEST, message.into())
    }

    /// Any status with `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Problem {
        Problem(status, message.into())
    }
}

impl From<crate::services::heavy::HeavyError> for Problem {
    fn from(e: crate::services::heavy::HeavyError) -> Problem {
        let status = match e {
            crate::services::heavy::HeavyError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            crate::services::heavy::HeavyError::Panicked(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Problem::new(status, e.to_string())
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = ApiError::new(self.0.as_u16(), self.1);
        let mut response = (self.0, Json(body)).into_response();
        response.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static(novacron_api::PROBLEM_JSON),
        );
        response
    }
}

/// An authenticated operator.
#[derive(Debug, Clone)]
pub struct Caller(pub Identity);

impl Caller {
    /// Refuses the call unless the caller has at least `role`.
    pub fn require(&self, role: Role) -> Result<(), Problem> {
        if self.0.role >= role {
            Ok(())
        } else {
            Err(Problem(
                StatusCode::FORBIDDEN,
                format!(
                    "{} has role {} but this call needs {role}; ask an admin for a certificate with that role",
                    self.0.name, self.0.role
                ),
            ))
        }
    }
}

/// Authenticates a request: an operator client certificate from the fleet CA, or
/// else an `Authorization: Bearer nca_…` API token.
impl FromRequestParts<Arc<ApiState>> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(
        parts: &mut Parts,
        st: &Arc<ApiState>,
    ) -> Result<Self, Self::Rejection> {
        let slot = parts.extensions.get::<AuditSlot>().cloned();
        let peer = parts.extensions.get::<ConnectInfo<Peer>>().map(|c| &c.0);
        if let Some(serial) = peer.and_then(|p| p.serial.as_ref())
            && st.certs.is_revoked(serial)
        {
            // The connection is being closed; refuse what still arrives on it.
            return Err(Problem(
                StatusCode::UNAUTHORIZED,
                format!(
                    "the client certificate with serial {serial} has been revoked; ask an admin for a new certificate"
                ),
            ));
        }
        if let (Some(slot), Some(id)) = (&slot, peer.and_then(|p| p.identity.as_ref())) {
            slot.set(id);
        }
        match peer.and_then(|p| p.identity.clone()) {
            Some(id) if id.role != Role::Node => return Ok(Caller(id)),
            Some(id) => {
                return Err(Problem(
                    StatusCode::FORBIDDEN,
                    format!(
                        "{id} is a node certificate; the API needs an operator certificate or API token"
                    ),
                ));
            }
            None => {}
        }
        let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
            return Err(Problem(
                StatusCode::UNAUTHORIZED,
                "no credentials: the API needs an operator certificate from the fleet CA (`novacron-controller admin issue`) or an API token (`Authorization: Bearer nca_…`, from `novacron-controller admin token`)".into(),
            ));
        };
        let unauthorized = |m: String| Problem(StatusCode::UNAUTHORIZED, m);
        let text = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| {
                unauthorized(
                    "the Authorization header is not `Bearer <API token>`; send `Authorization: Bearer nca_…`".into(),
                )
            })?;
        let token: ApiToken = text
            .parse()
            .map_err(|e: ApiTokenError| unauthorized(e.to_string()))?;
        let record = st.store.api_token(token.id()).map_err(internal)?;
        match api_tokens::authenticate(record.as_ref(), &token, SystemTime::now()) {
            Ok(id) => {
                if let Some(slot) = &slot {
                    slot.set(&id);
                }
                Ok(Caller(id))
            }
            Err(e) => {
                warn!(token = token.id(), error = %e, "API token refused");
                Err(unauthorized(e.to_string()))
            }
        }
    }
}

#[utoipa::path(post, path = "/v1/enroll", tag = "fleet", security(()), request_body = EnrollRequest, responses((status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 422, description = "the JSON lacks a field or has one of the wrong type", content_type = "application/problem+json", body = ApiError), (status = 200, body = EnrollResponse), (status = 400, description = "bad name or CSR", content_type = "application/problem+json", body = ApiError), (status = 401, description = "the join token was refused", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the name is revoked", content_type = "application/problem+json", body = ApiError)))]
async fn enroll(
    State(st): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(req): Json<EnrollRequest>,
) -> Result<Json<EnrollResponse>, Problem> {
    let bad = |s: StatusCode, m: String| Problem(s, m);
    if req.csr_pem.len() > MAX_CSR_BYTES {
        return Err(bad(
            StatusCode::BAD_REQUEST,
            format!(
                "csr_pem: {} bytes exceed the limit of {MAX_CSR_BYTES} bytes for a certificate request",
                req.csr_pem.len()
            ),
        ));
    }
    let identity = Identity::node(&req.node_name)
        .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("node_name: {e}")))?;
    if st.registry.revoked_names().contains(&identity.name) {
        return Err(bad(
            StatusCode::FORBIDDEN,
            format!(
                "node {:?} is revoked and cannot enroll again under that name",
                identity.name
            ),
        ));
    }
    let token: JoinToken = req
        .token
        .parse()
        .map_err(|e| bad(StatusCode::UNAUTHORIZED, format!("token: {e}")))?;
    let now = SystemTime::now();
    // Check the token (without using it), then the CSR, then spend one use: a bad
    // CSR does not cost a use, and a caller without a token learns nothing more.
    let known = st.store.token(token.id()).map_err(internal)?;
    let checked = match known {
        Some(record) => crate::state::tokens::check(&record, token.secret(), now),
        None => Err(crate::state::tokens::TokenError::Unknown {
            id: token.id().to_owned(),
        }),
    };
    if let Err(e) = checked {
        warn!(remote = %peer.addr, node = %identity.name, error = %e, "enrollment refused");
        return Err(bad(StatusCode::UNAUTHORIZED, e.to_string()));
    }
    let validity = Validity::starting(now, st.node_cert_ttl);
    let cert_pem = pki::sign_csr(&st.ca, &req.csr_pem, &identity, validity)
        .map_err(|e| bad(StatusCode::BAD_REQUEST, format!("csr_pem: {e}")))?;
    match st.store.consume_token(&token, now) {
        Ok(_) => {}
        Err(ConsumeError::Token(e)) => {
            warn!(remote = %peer.addr, node = %identity.name, error = %e, "enrollment refused");
            return Err(bad(StatusCode::UNAUTHORIZED, e.to_string()));
        }
        Err(ConsumeError::Store(e)) => return Err(internal(e)),
    }
    let info = pki::first_cert_der(&cert_pem)
        .and_then(|der| pki::cert_info(&der))
        .map_err(internal)?;
    st.registry
        .enrolled(&identity.name, &info, now)
        .map_err(|e| match e {
            RegistryError::Revoked(_) => bad(StatusCode::FORBIDDEN, e.to_string()),
            other => internal(other),
        })?;
    info!(node = %identity.name, remote = %peer.addr, "node enrolled");
    st.events.note(
        NewEvent::new(
            kind::NODE_ENROLLED,
            format!("token {}", token.id()),
            format!("node {} enrolled from {}", identity.name, peer.addr),
        )
        .node(&identity.name)
        .detail("remote", peer.addr),
    );
    Ok(Json(EnrollResponse {
        node_name: identity.name,
        cert_pem,
        ca_pem: st.ca.cert_pem.clone(),
        quic_endpoint: st.quic_endpoint.clone(),
        server_name: st.server_name.clone(),
    }))
}

#[utoipa::path(get, path = "/v1/nodes", tag = "fleet", responses((status = 200, body = Vec<NodeView>), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn list_nodes(State(st): State<Arc<ApiState>>, caller: Caller) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(st.registry.views(Instant::now())).into_response())
}

#[utoipa::path(get, path = "/v1/nodes/{name}", tag = "fleet", params(("name" = String, Path, description = "node name")), responses((status = 200, body = NodeView), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn show_node(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    st.registry
        .view(&name, Instant::now())
        .map(|v| Json(v).into_response())
        .ok_or_else(|| unknown_node(&name))
}

#[utoipa::path(get, path = "/v1/nodes/{name}/metrics", tag = "fleet", params(("name" = String, Path, description = "node name")), responses((status = 200, body = MetricsWindow), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn node_metrics(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    st.registry
        .window(&name)
        .map(|w| Json(w).into_response())
        .ok_or_else(|| unknown_node(&name))
}

#[utoipa::path(get, path = "/v1/nodes/{name}/images", tag = "fleet", params(("name" = String, Path, description = "node name")), responses((status = 200, description = "the images the node last reported holding (empty before its first report)", body = novacron_common::wire::ImageInventory), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn node_images(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    st.registry
        .images(&name)
        .map(|i| Json((*i).clone()).into_response())
        .ok_or_else(|| unknown_node(&name))
}

#[utoipa::path(post, path = "/v1/nodes/{name}/cordon", tag = "fleet", params(("name" = String, Path, description = "node name")), responses((status = 200, description = "cordoned (persisted): nothing new is placed on the node; what runs there stays", body = NodeView), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn cordon_node(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, Problem> {
    set_cordon(&st, &caller, &name, true)
}

#[utoipa::path(post, path = "/v1/nodes/{name}/uncordon", tag = "fleet", params(("name" = String, Path, description = "node name")), responses((status = 200, description = "the cordon is lifted (persisted): the node takes new work again", body = NodeView), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn uncordon_node(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<NodeView>, Problem> {
    set_cordon(&st, &caller, &name, false)
}

fn set_cordon(
    st: &ApiState,
    caller: &Caller,
    name: &str,
    cordoned: bool,
) -> Result<Json<NodeView>, Problem> {
    caller.require(Role::Operator)?;
    match st.registry.set_cordoned(name, cordoned) {
        Ok(()) => {}
        Err(RegistryError::UnknownNode(_)) => return Err(unknown_node(name)),
        Err(e) => return Err(internal(e)),
    }
    let (event, what) = if cordoned {
        (kind::NODE_CORDONED, "cordoned")
    } else {
        (kind::NODE_UNCORDONED, "uncordoned")
    };
    st.events
        .note(NewEvent::new(event, caller.0.to_string(), format!("node {name} {what}")).node(name));
    st.workloads.wake();
    st.registry
        .view(name, Instant::now())
        .map(Json)
        .ok_or_else(|| unknown_node(name))
}

/// `POST /v1/nodes/{name}/revoke` body.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// Why, for the audit trail.
    #[serde(default)]
    #[schema(max_length = 1024)]
    pub reason: String,
}

/// The query of `DELETE /v1/nodes/{name}` (a revocation).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct RevokeQuery {
    /// Why, for the audit trail.
    #[serde(default)]
    #[param(max_length = 1024)]
    pub reason: String,
}

#[utoipa::path(delete, path = "/v1/nodes/{name}", tag = "fleet", params(("name" = String, Path, description = "node name"), RevokeQuery), responses((status = 400, description = "a bad query string", content_type = "application/problem+json", body = ApiError), (status = 204, description = "the same as `POST /v1/nodes/{name}/revoke`; revoked; its connection was closed"), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn delete_node(
    state: State<Arc<ApiState>>,
    caller: Caller,
    name: Path<String>,
    Query(query): Query<RevokeQuery>,
) -> Result<StatusCode, Problem> {
    let req = RevokeRequest {
        reason: query.reason,
    };
    revoke_node(state, caller, name, Json(req)).await
}

#[utoipa::path(post, path = "/v1/nodes/{name}/revoke", tag = "fleet", params(("name" = String, Path, description = "node name")), request_body = RevokeRequest, responses((status = 400, description = "the body is not valid JSON", content_type = "application/problem+json", body = ApiError), (status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 422, description = "the JSON lacks a field or has one of the wrong type", content_type = "application/problem+json", body = ApiError), (status = 204, description = "revoked; its connection was closed"), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn revoke_node(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
    Json(req): Json<RevokeRequest>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Admin)?;
    check_note("reason", &req.reason)?;
    let revocation = Revocation {
        name: name.clone(),
        at_unix_ms: unix_ms(SystemTime::now()),
        by: caller.0.to_string(),
        reason: req.reason,
    };
    match st.registry.revoke(&revocation) {
        Ok(()) => {
            let reason = if revocation.reason.is_empty() {
                "no reason given".to_owned()
            } else {
                revocation.reason.clone()
            };
            st.events.note(
                NewEvent::new(
                    kind::NODE_REVOKED,
                    caller.0.to_string(),
                    format!("node {name} revoked: {reason}"),
                )
                .node(&name),
            );
            Ok(StatusCode::NO_CONTENT)
        }
        Err(RegistryError::UnknownNode(_)) => Err(unknown_node(&name)),
        Err(e) => Err(internal(e)),
    }
}

/// `POST /v1/tokens` body.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Lifetime in seconds (60 s to 30 days).
    #[schema(minimum = 60, maximum = 2592000)]
    pub ttl_secs: u64,
    /// How many enrollments it allows.
    #[schema(minimum = 1, maximum = 10000)]
    pub uses: u32,
    /// Free text.
    #[serde(default)]
    #[schema(max_length = 1024)]
    pub description: String,
}

/// The answer to [`TokenRequest`].
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    /// The token; shown once, stored only as a hash.
    pub token: String,
    /// Expiry, Unix ms.
    pub expires_at_unix_ms: u64,
    /// The CA fingerprint to pin.
    pub ca_fingerprint: String,
    /// A ready-to-run join command.
    pub join_command: String,
}

#[utoipa::path(post, path = "/v1/tokens", tag = "fleet", request_body = TokenRequest, responses((status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 422, description = "the JSON lacks a field or has one of the wrong type", content_type = "application/problem+json", body = ApiError), (status = 200, body = TokenResponse), (status = 400, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn create_token(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Json(req): Json<TokenRequest>,
) -> Result<Json<TokenResponse>, Problem> {
    caller.require(Role::Admin)?;
    check_note("description", &req.description)?;
    let token = JoinToken::generate();
    let record = TokenRecord::new(
        &token,
        Duration::from_secs(req.ttl_secs),
        req.uses,
        req.description,
        SystemTime::now(),
    )
    .map_err(|e| Problem(StatusCode::BAD_REQUEST, e.to_string()))?;
    st.store.put_token(&record).map_err(internal)?;
    info!(by = %caller.0, token = %record.id, uses = record.uses_left, "join token created");
    st.events.note(
        NewEvent::new(
            kind::TOKEN_CREATED,
            caller.0.to_string(),
            format!(
                "join token {} created for {} enrollment(s)",
                record.id, record.uses_left
            ),
        )
        .detail("token", &record.id)
        .detail("expires_at_unix_ms", record.expires_at_unix_ms),
    );
    Ok(Json(TokenResponse {
        join_command: format!(
            "novacron-agent join --controller {} --token {token} --ca-fingerprint {}",
            st.api_url, st.fingerprint
        ),
        token: token.to_string(),
        expires_at_unix_ms: record.expires_at_unix_ms,
        ca_fingerprint: st.fingerprint.to_string(),
    }))
}

/// `POST /v1/api-tokens` body.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ApiTokenRequest {
    /// Who or what will hold it (`ci`, `prometheus`).
    #[schema(pattern = r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")]
    pub name: String,
    /// `viewer`, `operator` or `admin`.
    #[schema(pattern = "^(viewer|operator|admin)$")]
    pub role: String,
    /// Lifetime in seconds (60 s to 365 days; default 30 days).
    #[serde(default)]
    #[schema(minimum = 60, maximum = 31536000)]
    pub ttl_secs: Option<u64>,
}

/// The answer to [`ApiTokenRequest`].
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiTokenResponse {
    /// The token; shown once, stored only as a hash.
    pub token: String,
    /// Its public id (for listing and revoking).
    pub id: String,
    /// Expiry, Unix ms.
    pub expires_at_unix_ms: u64,
}

/// An API token as listed (no secret, no hash).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiTokenView {
    /// Public id.
    pub id: String,
    /// Holder.
    pub name: String,
    /// Role.
    pub role: String,
    /// Created (Unix ms).
    pub created_at_unix_ms: u64,
    /// Expires (Unix ms).
    pub expires_at_unix_ms: u64,
    /// Creator.
    pub created_by: String,
    /// Revoked.
    pub revoked: bool,
}

#[utoipa::path(post, path = "/v1/api-tokens", tag = "access", request_body = ApiTokenRequest, responses((status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 422, description = "the JSON lacks a field or has one of the wrong type", content_type = "application/problem+json", body = ApiError), (status = 200, body = ApiTokenResponse), (status = 400, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn create_api_token(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Json(req): Json<ApiTokenRequest>,
) -> Result<Json<ApiTokenResponse>, Problem> {
    caller.require(Role::Admin)?;
    let role: Role = req.role.parse().map_err(|_| {
        Problem::bad_request(format!(
            "role: {:?} is not a role; use viewer, operator or admin",
            req.role
        ))
    })?;
    let ttl = req
        .ttl_secs
        .map_or(api_tokens::DEFAULT_TTL, Duration::from_secs);
    let token = ApiToken::generate();
    let record = ApiTokenRecord::new(
        &token,
        &req.name,
        role,
        ttl,
        &caller.0.to_string(),
        SystemTime::now(),
    )
    .map_err(|e| Problem::bad_request(e.to_string()))?;
    st.store.put_api_token(&record).map_err(internal)?;
    st.events.note(
        NewEvent::new(
            kind::API_TOKEN,
            caller.0.to_string(),
            format!(
                "API token {} created for {} ({role})",
                record.id, record.name
            ),
        )
        .detail("token", &record.id)
        .detail("action", "created"),
    );
    Ok(Json(ApiTokenResponse {
        token: token.to_string(),
        id: record.id,
        expires_at_unix_ms: record.expires_at_unix_ms,
    }))
}

#[utoipa::path(get, path = "/v1/api-tokens", tag = "access", responses((status = 200, body = Vec<ApiTokenView>), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn list_api_tokens(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Vec<ApiTokenView>>, Problem> {
    caller.require(Role::Admin)?;
    let tokens = st.store.api_tokens().map_err(internal)?;
    Ok(Json(
        tokens
            .into_iter()
            .map(|t| ApiTokenView {
                id: t.id,
                name: t.name,
                role: t.role,
                created_at_unix_ms: t.created_at_unix_ms,
                expires_at_unix_ms: t.expires_at_unix_ms,
                created_by: t.created_by,
                revoked: t.revoked,
            })
            .collect(),
    ))
}

#[utoipa::path(delete, path = "/v1/api-tokens/{id}", tag = "access", params(("id" = String, Path, description = "token id")), responses((status = 204, description = "the same as `POST /v1/api-tokens/{id}/revoke`; revoked"), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn delete_api_token(
    state: State<Arc<ApiState>>,
    caller: Caller,
    id: Path<String>,
) -> Result<StatusCode, Problem> {
    revoke_api_token(state, caller, id).await
}

#[utoipa::path(post, path = "/v1/api-tokens/{id}/revoke", tag = "access", params(("id" = String, Path, description = "token id")), responses((status = 204, description = "revoked"), (status = 404, content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn revoke_api_token(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Admin)?;
    let mut record = st.store.api_token(&id).map_err(internal)?.ok_or_else(|| {
        Problem(
            StatusCode::NOT_FOUND,
            format!("unknown API token {id:?}; GET /v1/api-tokens lists them"),
        )
    })?;
    record.revoked = true;
    st.store.put_api_token(&record).map_err(internal)?;
    st.events.note(
        NewEvent::new(
            kind::API_TOKEN,
            caller.0.to_string(),
            format!("API token {id} of {} revoked", record.name),
        )
        .detail("token", &id)
        .detail("action", "revoked"),
    );
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/v1/version", tag = "controller", responses((status = 200, description = "the controller's release and git commit", body = VersionInfo), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn version(caller: Caller) -> Result<Json<VersionInfo>, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(VersionInfo::this_build()))
}

#[utoipa::path(get, path = "/v1/controllers", tag = "controller", responses((status = 200, description = "the controller group: members, leader, lease, etcd's health", body = novacron_api::ControllersView), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError), (status = 503, description = "etcd cannot be read", content_type = "application/problem+json", body = ApiError)))]
async fn controllers(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<novacron_api::ControllersView>, Problem> {
    caller.require(Role::Viewer)?;
    match &st.group {
        Some(group) => group
            .view()
            .await
            .map(Json)
            .map_err(|e| Problem(StatusCode::SERVICE_UNAVAILABLE, e)),
        None => Ok(Json(novacron_api::ControllersView {
            store: "redb".into(),
            leader: Some(st.server_name.clone()),
            epoch: 0,
            lease_secs: 0,
            leader_for_secs: 0,
            members: vec![novacron_api::ControllerMember {
                name: st.server_name.clone(),
                api_url: st.api_url.clone(),
                quic: st.quic_endpoint.clone(),
                leader: true,
                up_secs: 0,
            }],
            etcd: vec![],
        })),
    }
}

#[utoipa::path(get, path = "/v1/backup", tag = "controller", responses((status = 200, description = "every record of the store, read in one consistent snapshot (what `novacron-controller backup` saves)", body = Vec<novacron_api::BackupRecord>), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError), (status = 503, description = "the store cannot be read", content_type = "application/problem+json", body = ApiError)))]
async fn backup(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<Json<Vec<novacron_api::BackupRecord>>, Problem> {
    caller.require(Role::Admin)?;
    let store = st.store.clone();
    let records = tokio::task::spawn_blocking(move || store.export())
        .await
        .map_err(internal)?
        .map_err(store_problem)?;
    let mut out = Vec::with_capacity(records.len());
    for (key, bytes) in records {
        let value = serde_json::from_slice(&bytes).map_err(internal)?;
        out.push(novacron_api::BackupRecord { key, value });
    }
    Ok(Json(out))
}

#[utoipa::path(get, path = "/v1/stats", tag = "controller", responses((status = 200, body = ControllerStats), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn stats(State(st): State<Arc<ApiState>>, caller: Caller) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(st.registry.stats()).into_response())
}

#[utoipa::path(post, path = "/v1/stats/reset-latency", tag = "controller", responses((status = 204, description = "reset"), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low", content_type = "application/problem+json", body = ApiError)))]
async fn reset_latency(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Admin)?;
    st.registry.reset_latencies();
    st.events.note(NewEvent::new(
        kind::STATS_RESET,
        caller.0.to_string(),
        "ingest latency window reset",
    ));
    Ok(StatusCode::NO_CONTENT)
}

/// The longest CSR accepted at enrollment (a PEM request is about 1 KiB).
pub const MAX_CSR_BYTES: usize = 16 * 1024;
pub use crate::state::store::MAX_MANIFEST_BYTES;
/// The longest file name an apply may carry.
pub const MAX_FILE_NAME_BYTES: usize = 4096;
/// The longest free text (a revocation reason, a token description).
pub const MAX_NOTE_BYTES: usize = 1024;

/// Refuses a manifest or file name over its limit (422, naming the size).
pub fn check_apply(req: &ApplyRequest) -> Result<(), Problem> {
    if req.file.len() > MAX_FILE_NAME_BYTES {
        return Err(Problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "file: {} bytes exceed the limit of {MAX_FILE_NAME_BYTES} bytes for a file name",
                req.file.len()
            ),
        ));
    }
    if req.manifest.len() > MAX_MANIFEST_BYTES {
        return Err(Problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{}: the manifest's {} bytes exceed the limit of {MAX_MANIFEST_BYTES} bytes",
                req.file,
                req.manifest.len()
            ),
        ));
    }
    Ok(())
}

/// Refuses free text over [`MAX_NOTE_BYTES`] (422).
pub(crate) fn check_note(field: &str, text: &str) -> Result<(), Problem> {
    if text.len() > MAX_NOTE_BYTES {
        return Err(Problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{field}: {} bytes exceed the limit of {MAX_NOTE_BYTES} bytes",
                text.len()
            ),
        ));
    }
    Ok(())
}

/// A failed write: 507 when the data directory's disk is full, 503 for another
/// I/O failure (the store recovers without a restart once the disk does), else a
/// 500. Nothing of the request was kept.
pub fn store_problem(e: StoreError) -> Problem {
    if e.is_disk_full() {
        warn!(error = %e, "the store's disk is full");
        return Problem(
            StatusCode::INSUFFICIENT_STORAGE,
            format!(
                "nothing was saved: the disk of the controller's data directory is full ({e}); free space there, then retry (GET /readyz answers 200 again once the store can write)"
            ),
        );
    }
    if e.is_io() {
        warn!(error = %e, "the store cannot write");
        return Problem(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "nothing was saved: the controller's store cannot write now ({e}); retry once GET /readyz answers 200"
            ),
        );
    }
    internal(e)
}

fn unknown_node(name: &str) -> Problem {
    Problem(
        StatusCode::NOT_FOUND,
        format!("unknown node {name:?}; `novacron node list` shows the enrolled nodes"),
    )
}

/// A 500 that names the failure (and logs it).
pub fn internal(e: impl std::fmt::Display) -> Problem {
    warn!(error = %e, "internal error serving the API");
    Problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("internal error: {e}"),
    )
}

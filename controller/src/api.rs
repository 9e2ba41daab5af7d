//! The operator HTTPS API (axum). Every route except `/healthz` and `/v1/enroll`
//! requires a client certificate from the fleet CA with an operator role.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use novacron_common::api::{ApiError, EnrollRequest, EnrollResponse};
use novacron_common::pki::{self, Identity, Role, Validity};
use novacron_common::wire::{ControllerMessage, LogChunk, LogRequest};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::https::Peer;
use crate::link::LinkContext;
use crate::registry::{Registry, RegistryError, unix_ms};
use crate::store::{ConsumeError, Revocation, Store};
use crate::tokens::{JoinToken, TokenRecord};
use crate::workloads::{WorkloadError, Workloads};

/// State shared by the handlers.
#[derive(Debug)]
pub struct ApiState {
    /// The fleet registry.
    pub registry: Arc<Registry>,
    /// The store.
    pub store: Arc<dyn Store>,
    /// The fleet CA with its key.
    pub ca: pki::CertAndKey,
    /// The CA fingerprint agents pin.
    pub fingerprint: pki::Fingerprint,
    /// Lifetime of node certificates.
    pub node_cert_ttl: Duration,
    /// What enrolling agents are told to connect to (`host:port`).
    pub quic_endpoint: String,
    /// The controller's server name.
    pub server_name: String,
    /// The API URL, for printed join commands.
    pub api_url: String,
    /// Jobs and allocations.
    pub workloads: Arc<Workloads>,
    /// The agent link, for commands such as log requests.
    pub link: Arc<LinkContext>,
}

/// Builds the router.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/enroll", post(enroll))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{name}", get(show_node))
        .route("/v1/nodes/{name}/metrics", get(node_metrics))
        .route("/v1/nodes/{name}/revoke", post(revoke_node))
        .route("/v1/tokens", post(create_token))
        .route("/v1/jobs", post(apply_job).get(list_jobs))
        .route("/v1/jobs/{name}", get(show_job))
        .route("/v1/jobs/{name}/stop", post(stop_job))
        .route("/v1/allocations", get(list_allocations))
        .route("/v1/allocations/{id}", get(show_allocation))
        .route("/v1/allocations/{id}/logs", get(allocation_logs))
        .route("/v1/stats", get(stats))
        .route("/v1/stats/reset-latency", post(reset_latency))
        .with_state(state)
}

/// An error answer: a status and a message that says what to do.
#[derive(Debug)]
pub struct Problem(StatusCode, String);

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

/// An authenticated operator.
#[derive(Debug, Clone)]
pub struct Caller(pub Identity);

impl Caller {
    fn require(&self, role: Role) -> Result<(), Problem> {
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

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let peer = parts.extensions.get::<ConnectInfo<Peer>>().map(|c| &c.0);
        match peer.and_then(|p| p.identity.clone()) {
            Some(id) if id.role != Role::Node => Ok(Caller(id)),
            Some(id) => Err(Problem(
                StatusCode::FORBIDDEN,
                format!("{id} is a node certificate; the API needs an operator certificate"),
            )),
            None => Err(Problem(
                StatusCode::UNAUTHORIZED,
                "no client certificate: the API needs an operator certificate from the fleet CA (`novacron-controller admin issue`)".into(),
            )),
        }
    }
}

async fn enroll(
    State(st): State<Arc<ApiState>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    Json(req): Json<EnrollRequest>,
) -> Result<Json<EnrollResponse>, Problem> {
    let bad = |s: StatusCode, m: String| Problem(s, m);
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
    // Check the CSR before spending a token use on it.
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
    Ok(Json(EnrollResponse {
        node_name: identity.name,
        cert_pem,
        ca_pem: st.ca.cert_pem.clone(),
        quic_endpoint: st.quic_endpoint.clone(),
        server_name: st.server_name.clone(),
    }))
}

async fn list_nodes(State(st): State<Arc<ApiState>>, caller: Caller) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(st.registry.views(Instant::now())).into_response())
}

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

/// `POST /v1/nodes/{name}/revoke` body.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// Why, for the audit trail.
    #[serde(default)]
    pub reason: String,
}

async fn revoke_node(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
    Json(req): Json<RevokeRequest>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Admin)?;
    let revocation = Revocation {
        name: name.clone(),
        at_unix_ms: unix_ms(SystemTime::now()),
        by: caller.0.to_string(),
        reason: req.reason,
    };
    match st.registry.revoke(&revocation) {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(RegistryError::UnknownNode(_)) => Err(unknown_node(&name)),
        Err(e) => Err(internal(e)),
    }
}

/// `POST /v1/tokens` body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// Lifetime in seconds.
    pub ttl_secs: u64,
    /// How many enrollments it allows.
    pub uses: u32,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// The answer to [`TokenRequest`].
#[derive(Debug, Serialize, Deserialize)]
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

async fn create_token(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Json(req): Json<TokenRequest>,
) -> Result<Json<TokenResponse>, Problem> {
    caller.require(Role::Admin)?;
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

async fn stats(State(st): State<Arc<ApiState>>, caller: Caller) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(st.registry.stats()).into_response())
}

async fn reset_latency(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Admin)?;
    st.registry.reset_latencies();
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/jobs` body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyRequest {
    /// The file name, for error messages.
    pub file: String,
    /// The YAML manifest.
    pub manifest: String,
}

/// The most bytes a manifest may have.
pub const MAX_MANIFEST_BYTES: usize = 256 * 1024;
/// Log streams in flight at once.
pub const MAX_LOG_STREAMS: usize = 256;

async fn apply_job(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Json(req): Json<ApplyRequest>,
) -> Result<Response, Problem> {
    caller.require(Role::Operator)?;
    if req.manifest.len() > MAX_MANIFEST_BYTES {
        return Err(Problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{}: {} bytes exceeds the limit of {MAX_MANIFEST_BYTES} bytes",
                req.file,
                req.manifest.len()
            ),
        ));
    }
    let by = caller.0.to_string();
    let result = st
        .workloads
        .apply(&req.file, &req.manifest, &by, SystemTime::now())
        .map_err(workload_problem)?;
    Ok(Json(result).into_response())
}

async fn list_jobs(State(st): State<Arc<ApiState>>, caller: Caller) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(st.workloads.jobs()).into_response())
}

async fn show_job(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(st.workloads.job(&name).map_err(workload_problem)?).into_response())
}

async fn stop_job(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, Problem> {
    caller.require(Role::Operator)?;
    st.workloads
        .stop(&name, &caller.0.to_string())
        .map_err(workload_problem)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Filters of `GET /v1/allocations`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocFilter {
    /// Only this job.
    pub job: Option<String>,
    /// Only this node.
    pub node: Option<String>,
}

async fn list_allocations(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Query(filter): Query<AllocFilter>,
) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(
        st.workloads
            .allocations(filter.job.as_deref(), filter.node.as_deref()),
    )
    .into_response())
}

async fn show_allocation(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    Ok(Json(st.workloads.allocation(&id).map_err(workload_problem)?).into_response())
}

/// Options of `GET /v1/allocations/{id}/logs`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogOptions {
    /// Keep streaming.
    #[serde(default)]
    pub follow: bool,
    /// Last lines first (0: all).
    #[serde(default)]
    pub tail: u32,
}

async fn allocation_logs(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(opts): Query<LogOptions>,
) -> Result<Response, Problem> {
    caller.require(Role::Viewer)?;
    let alloc = st.workloads.allocation(&id).map_err(workload_problem)?;
    let sender = st
        .link
        .commands
        .lock()
        .unwrap_or_else(|p| p.into_inner())
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
        let mut pending = st
            .link
            .pending_logs
            .lock()
            .unwrap_or_else(|p| p.into_inner());
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
    if sender.send(request).await.is_err() {
        st.link
            .pending_logs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&request_id);
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
                    link.pending_logs
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&rid);
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

fn workload_problem(e: WorkloadError) -> Problem {
    match e {
        WorkloadError::Invalid(m) => Problem(StatusCode::UNPROCESSABLE_ENTITY, m),
        e @ (WorkloadError::UnknownJob(_) | WorkloadError::UnknownAlloc(_)) => {
            Problem(StatusCode::NOT_FOUND, e.to_string())
        }
        WorkloadError::Store(e) => internal(e),
    }
}

fn unknown_node(name: &str) -> Problem {
    Problem(
        StatusCode::NOT_FOUND,
        format!("unknown node {name:?}; `novacron node list` shows the enrolled nodes"),
    )
}

fn internal(e: impl std::fmt::Display) -> Problem {
    warn!(error = %e, "internal error serving the API");
    Problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("internal error: {e}"),
    )
}

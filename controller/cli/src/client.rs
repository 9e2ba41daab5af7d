//! The CLI's HTTPS client: mutual TLS with the context's CA and certificate, and
//! errors that say what went wrong and what to do about it.

use std::error::Error as StdError;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use novacron_api::ApiError;
use novacron_common::pki;
use novacron_common::tls::{self, TlsError};
use reqwest::{StatusCode, Url};
use rustls::AlertDescription;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::debug;

use super::config::{ApiUrl, Context};
use super::output;

/// How long one request may take, connection and TLS handshake included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The HTTP versions offered in ALPN.
pub const ALPN: &[&[u8]] = &[b"h2", b"http/1.1"];
/// The longest non-JSON error body quoted in a message.
const MAX_QUOTED_BODY: usize = 300;

/// Errors talking to the controller.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A file the context names cannot be read.
    #[error("cannot read the {what} {} (`{key}` of context {context:?}): {source}", path.display())]
    ReadFile {
        /// What the file should hold.
        what: &'static str,
        /// The context key that names it.
        key: &'static str,
        /// The context.
        context: String,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The PEM files do not make a usable TLS configuration.
    #[error(
        "the TLS files of context {context:?} are unusable: {source}; check its `ca`, `cert` and `key`"
    )]
    TlsConfig {
        /// The context.
        context: String,
        /// What is wrong.
        source: TlsError,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Build(reqwest::Error),
    /// No connection to the controller (refused, no route, DNS, timeout).
    #[error("cannot reach the controller at {url}: {reason}. Is it running?")]
    Unreachable {
        /// The controller's API URL.
        url: String,
        /// The lowest-level reason.
        reason: String,
    },
    /// The controller refused the client certificate because it is out of date.
    #[error(
        "the controller at {url} refused the client certificate {}: it has expired{expired}. Get a new certificate from the fleet (for a local fleet, run `novacron dev` again) and point `cert` and `key` of context {context:?} at it",
        cert.display()
    )]
    ClientCertExpired {
        /// The controller's API URL.
        url: String,
        /// The certificate file.
        cert: PathBuf,
        /// The context.
        context: String,
        /// ` on <time>` when the local certificate could be read, else empty.
        expired: String,
    },
    /// The controller refused the client certificate because it is revoked.
    #[error(
        "the controller at {url} refused the client certificate {}: it has been revoked. Ask a fleet admin for a new certificate and point `cert` and `key` of context {context:?} at it",
        cert.display()
    )]
    ClientCertRevoked {
        /// The controller's API URL.
        url: String,
        /// The certificate file.
        cert: PathBuf,
        /// The context.
        context: String,
    },
    /// The controller does not trust the client certificate.
    #[error(
        "the controller at {url} does not trust the client certificate {} ({alert}): it must be issued by this controller's fleet CA. Check that `cert` and `key` of context {context:?} are the ones this fleet issued to you",
        cert.display()
    )]
    ClientCertUntrusted {
        /// The controller's API URL.
        url: String,
        /// The certificate file.
        cert: PathBuf,
        /// The context.
        context: String,
        /// The TLS alert the controller sent.
        alert: String,
    },
    /// The controller's certificate does not verify against the context's CA.
    #[error(
        "the controller at {url} presented a certificate that the CA in {} does not accept ({reason}). Check that `ca` of context {context:?} is this controller's fleet CA and `api` its address",
        ca.display()
    )]
    ServerCertUntrusted {
        /// The controller's API URL.
        url: String,
        /// The CA file.
        ca: PathBuf,
        /// The context.
        context: String,
        /// Why the certificate was refused.
        reason: String,
    },
    /// Another TLS failure.
    #[error("TLS handshake with {url} failed: {reason}")]
    Handshake {
        /// The controller's API URL.
        url: String,
        /// rustls' reason.
        reason: String,
    },
    /// The context has neither a certificate nor an API token.
    #[error(
        "context {context:?} has no credentials: set `cert` and `key` (an operator certificate) or `token_file` (an API token), or set NOVACRON_TOKEN"
    )]
    NoCredentials {
        /// The context.
        context: String,
    },
    /// The API token cannot be sent in a header.
    #[error(
        "the API token of context {context:?} contains characters that cannot be sent; it should read nca_<id>.<secret>"
    )]
    BadToken {
        /// The context.
        context: String,
    },
    /// The controller answered 401 or 403.
    #[error("permission denied: {message}")]
    PermissionDenied {
        /// The controller's message.
        message: String,
    },
    /// The controller answered 404.
    #[error("{message}")]
    NotFound {
        /// The controller's message.
        message: String,
    },
    /// The controller answered with another error status.
    #[error("the controller answered {status}: {message}")]
    Status {
        /// The HTTP status.
        status: StatusCode,
        /// The controller's message.
        message: String,
    },
    /// The request failed after the connection was made.
    #[error("request to {url} failed: {reason}")]
    Request {
        /// The request URL.
        url: String,
        /// The chain of causes.
        reason: String,
    },
    /// The answer is not what this CLI expects.
    #[error(
        "unexpected answer from {url}: {reason}; are the CLI and the controller the same version?"
    )]
    Decode {
        /// The request URL.
        url: String,
        /// The decoder's error.
        reason: String,
    },
}

impl ClientError {
    /// Whether the error is about the local configuration (files, certificates).
    pub fn is_configuration(&self) -> bool {
        matches!(
            self,
            ClientError::ReadFile { .. }
                | ClientError::TlsConfig { .. }
                | ClientError::ClientCertExpired { .. }
                | ClientError::ClientCertRevoked { .. }
                | ClientError::ClientCertUntrusted { .. }
                | ClientError::ServerCertUntrusted { .. }
                | ClientError::NoCredentials { .. }
                | ClientError::BadToken { .. }
        )
    }

    /// Whether the controller could not be reached at all.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. })
    }
}

/// A client for one controller, made from a context.
#[derive(Debug)]
pub struct ApiClient {
    http: reqwest::Client,
    api: ApiUrl,
    context: String,
    ca: PathBuf,
    cert: PathBuf,
    cert_not_after: Option<SystemTime>,
    now: SystemTime,
    watch: Option<std::sync::Arc<WatchIndex>>,
    /// The TLS configuration, for connections reqwest does not make (WebSockets).
    tls: std::sync::Arc<rustls::ClientConfig>,
    /// `Authorization` when a token authenticates.
    bearer: Option<reqwest::header::HeaderValue>,
}

/// An upgraded WebSocket connection to the controller.
pub type WebSocket =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// The response header that carries the store's revision (the controller's
/// `X-Novacron-Index`).
pub const INDEX_HEADER: &str = "x-novacron-index";

/// The blocking-query state of a `--watch`, shared by the clients of its frames:
/// the first `GET` of a frame asks `?index=N&wait=BOUND` with the index of the
/// last frame, so that the controller answers only once something changed (or
/// the bound passed); later `GET`s of the frame do not wait. The smallest index
/// a frame's answers carried is the next frame's `N`, so no change is missed.
#[derive(Debug)]
pub struct WatchIndex {
    wait: Duration,
    state: std::sync::Mutex<WatchState>,
}

#[derive(Debug, Default)]
struct WatchState {
    /// The index the next `GET` waits past; taken by it.
    wait_past: Option<u64>,
    /// The smallest index the answers of this frame carried.
    seen: Option<u64>,
}

impl WatchIndex {
    /// A watch whose queries wait at most `wait` each.
    pub fn new(wait: Duration) -> WatchIndex {
        WatchIndex {
            wait,
            state: std::sync::Mutex::default(),
        }
    }

    /// Starts a frame: its first `GET` waits past the index the last frame saw
    /// (none on the first frame, or when the last frame's answers carried none:
    /// reads that are not indexed). Returns whether it will wait.
    pub fn begin_frame(&self) -> bool {
        let mut st = novacron_common::sync::lock(&self.state);
        st.wait_past = st.seen.take();
        st.wait_past.is_some()
    }

    /// Forgets the indexes seen: the next frame reads without waiting (a frame
    /// read again at once, or after an error).
    pub fn reread(&self) {
        let mut st = novacron_common::sync::lock(&self.state);
        st.wait_past = None;
        st.seen = None;
    }

    /// The smallest index this frame's answers carried.
    pub fn seen(&self) -> Option<u64> {
        novacron_common::sync::lock(&self.state).seen
    }

    fn take_wait(&self) -> Option<(u64, Duration)> {
        novacron_common::sync::lock(&self.state)
            .wait_past
            .take()
            .map(|i| (i, self.wait))
    }

    fn saw(&self, index: Option<u64>) {
        if let Some(index) = index {
            let mut st = novacron_common::sync::lock(&self.state);
            st.seen = Some(st.seen.map_or(index, |s| s.min(index)));
        }
    }
}

impl ApiClient {
    /// This client, answering `--watch`'s frames: see [`WatchIndex`].
    pub fn watching(mut self, watch: std::sync::Arc<WatchIndex>) -> ApiClient {
        self.watch = Some(watch);
        self
    }

    /// Reads the CA, certificate and key of the context `name` (paths already
    /// resolved) and builds a client. `now` is used to explain expired certificates.
    pub fn new(name: &str, ctx: &Context, now: SystemTime) -> Result<ApiClient, ClientError> {
        ApiClient::with_token(name, ctx, None, now)
    }

    /// As [`ApiClient::new`], authenticating with `token` (an API token, `nca_…`)
    /// when given, else with the context's `token_file`, else its certificate. With
    /// a token the certificate is not presented at all, so the token's role is the
    /// one that applies.
    pub fn with_token(
        name: &str,
        ctx: &Context,
        token: Option<String>,
        now: SystemTime,
    ) -> Result<ApiClient, ClientError> {
        let read = |what, key, path: &Path| {
            fs::read_to_string(path).map_err(|source| ClientError::ReadFile {
                what,
                key,
                context: name.to_string(),
                path: path.to_path_buf(),
                source,
            })
        };
        let ca_pem = read("fleet CA", "ca", &ctx.ca)?;
        let token = match (token, &ctx.token_file) {
            (Some(t), _) => Some(t),
            (None, Some(path)) => Some(read("API token", "token_file", path)?),
            (None, None) => None,
        };
        let tls_error = |source| ClientError::TlsConfig {
            context: name.to_string(),
            source,
        };
        tls::install_crypto_provider();
        // A token replaces the certificate: presenting both would let the
        // certificate's role apply, not the token's.
        let (config, cert_not_after) = if token.is_some() || ctx.cert.as_os_str().is_empty() {
            if token.is_none() {
                return Err(ClientError::NoCredentials {
                    context: name.to_string(),
                });
            }
            (
                tls::client_config(&ca_pem, None, ALPN).map_err(tls_error)?,
                None,
            )
        } else {
            let cert_pem = read("client certificate", "cert", &ctx.cert)?;
            let key_pem = read("client key", "key", &ctx.key)?;
            let config = tls::client_config(&ca_pem, Some((&cert_pem, &key_pem)), ALPN)
                .map_err(tls_error)?;
            let not_after = pki::first_cert_der(&cert_pem)
                .and_then(|der| pki::cert_info(&der))
                .map(|info| info.not_after)
                .ok();
            (config, not_after)
        };
        let mut ws_tls = config.clone();
        // A WebSocket upgrade is an HTTP/1.1 request.
        ws_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut bearer = None;
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = token {
            let mut value =
                reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                    .map_err(|_| ClientError::BadToken {
                        context: name.to_string(),
                    })?;
            value.set_sensitive(true);
            bearer = Some(value.clone());
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .tls_backend_preconfigured(config)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("novacron/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ClientError::Build)?;
        Ok(ApiClient {
            http,
            api: ctx.api.clone(),
            context: name.to_string(),
            ca: ctx.ca.clone(),
            cert: ctx.cert.clone(),
            cert_not_after,
            now,
            watch: None,
            tls: std::sync::Arc::new(ws_tls),
            bearer,
        })
    }

    /// Opens a WebSocket to the API path made of `segments` with `query`, asking
    /// for `protocol`. A refusal before the upgrade is the usual API error.
    pub async fn websocket(
        &self,
        segments: &[&str],
        query: &str,
        protocol: &str,
        max_message: usize,
    ) -> Result<WebSocket, ClientError> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
        let mut url = self.url(segments);
        url.set_query(Some(query));
        let api = self.api.to_string();
        let unreachable = |reason: String| ClientError::Unreachable {
            url: api.clone(),
            reason,
        };
        let host = url.host_str().unwrap_or_default().to_owned();
        let port = url.port_or_known_default().unwrap_or(443);
        let connect = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port));
        let tcp = tokio::time::timeout(REQUEST_TIMEOUT, connect)
            .await
            .map_err(|_| unreachable("no answer within the request time limit".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        let name =
            rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_owned())
                .map_err(|e| unreachable(format!("{host:?} is not a server name: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| match find_tls_error(&e) {
                Some(tls) => self.tls_error(api.clone(), &tls),
                None => unreachable(e.to_string()),
            })?;
        let mut ws_url = url.clone();
        let _ = ws_url.set_scheme("wss");
        let mut request = ws_url
            .as_str()
            .into_client_request()
            .map_err(|e| unreachable(e.to_string()))?;
        let headers = request.headers_mut();
        if let Ok(value) = reqwest::header::HeaderValue::from_str(protocol) {
            headers.insert("sec-websocket-protocol", value);
        }
        if let Some(bearer) = &self.bearer {
            headers.insert(reqwest::header::AUTHORIZATION, bearer.clone());
        }
        if let Ok(agent) =
            reqwest::header::HeaderValue::from_str(concat!("novacron/", env!("CARGO_PKG_VERSION")))
        {
            headers.insert(reqwest::header::USER_AGENT, agent);
        }
        let config = WebSocketConfig::default()
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        match tokio_tungstenite::client_async_with_config(request, tls, Some(config)).await {
            Ok((socket, _)) => Ok(socket),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                let status = StatusCode::from_u16(response.status().as_u16())
                    .unwrap_or(StatusCode::BAD_GATEWAY);
                Err(status_error(
                    status,
                    response.body().as_deref().unwrap_or(&[]),
                ))
            }
            Err(e) => Err(ClientError::Request {
                url: url.to_string(),
                reason: e.to_string(),
            }),
        }
    }

    /// Whether the controller answers `GET /healthz` with a success.
    pub async fn healthy(&self) -> bool {
        self.http
            .get(self.url(&["healthz"]))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// The controller's API URL.
    pub fn api(&self) -> &ApiUrl {
        &self.api
    }

    /// `GET`s the API path made of `segments` (each percent-encoded) and decodes the
    /// JSON answer.
    pub async fn get<T: DeserializeOwned>(&self, segments: &[&str]) -> Result<T, ClientError> {
        self.get_with_query(segments, &[]).await
    }

    /// `GET` with query parameters.
    pub async fn get_with_query<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
    ) -> Result<T, ClientError> {
        let mut url = self.url(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let blocking = self.watch.as_ref().and_then(|w| w.take_wait());
        let mut request = self.http.get(url.clone());
        if let Some((index, wait)) = blocking {
            url.query_pairs_mut()
                .append_pair("index", &index.to_string())
                .append_pair("wait", &format!("{}ms", wait.as_millis()));
            request = self.http.get(url.clone()).timeout(wait + REQUEST_TIMEOUT);
        }
        debug!(%url, "GET");
        let response = request.send().await.map_err(|e| self.classify(&e))?;
        if let Some(watch) = &self.watch {
            watch.saw(
                response
                    .headers()
                    .get(INDEX_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()),
            );
        }
        let status = response.status();
        let body = response.bytes().await.map_err(|e| self.classify(&e))?;
        if !status.is_success() {
            return Err(status_error(status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Decode {
            url: url.to_string(),
            reason: e.to_string(),
        })
    }

    /// `POST`s `body` as JSON to the API path made of `segments` and decodes the
    /// JSON answer (`null` for an empty 204 answer, which decodes into `()`).
    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &B,
    ) -> Result<T, ClientError> {
        self.send(reqwest::Method::POST, segments, Some(body)).await
    }

    /// `POST`s `body` as JSON for work the controller does before it answers
    /// (a checkpoint): `limit` replaces the request time limit.
    pub async fn post_within<B: Serialize, T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &B,
        limit: Duration,
    ) -> Result<T, ClientError> {
        self.send_within(reqwest::Method::POST, segments, Some(body), Some(limit))
            .await
    }

    /// `PUT`s `body` as JSON, as [`ApiClient::post`].
    pub async fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &B,
    ) -> Result<T, ClientError> {
        self.send(reqwest::Method::PUT, segments, Some(body)).await
    }

    /// Whether the controller's image store has blob `digest` (`HEAD`).
    pub async fn blob_stored(&self, digest: &str) -> Result<bool, ClientError> {
        let url = self.url(&["v1", "images", "blobs", digest]);
        let response = self
            .http
            .head(url)
            .send()
            .await
            .map_err(|e| self.classify(&e))?;
        match response.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(status_error(s, b"")),
        }
    }

    /// Uploads `file` as blob `digest` of the image store (`PUT`, streamed, with
    /// no overall timeout: the controller drops an upload that stalls).
    pub async fn put_blob(&self, digest: &str, file: &Path) -> Result<(), ClientError> {
        let url = self.url(&["v1", "images", "blobs", digest]);
        let f = tokio::fs::File::open(file)
            .await
            .map_err(|e| ClientError::Decode {
                url: url.to_string(),
                reason: format!("cannot read {}: {e}", file.display()),
            })?;
        let response = self
            .http
            .put(url)
            .timeout(Duration::from_secs(24 * 3600))
            .header("content-type", "application/octet-stream")
            .body(reqwest::Body::from(f))
            .send()
            .await
            .map_err(|e| self.classify(&e))?;
        self.succeeded(response).await
    }

    /// `DELETE`s the API path made of `segments` with `query`.
    pub async fn delete_query(
        &self,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<(), ClientError> {
        let mut url = self.url(segments);
        url.query_pairs_mut().extend_pairs(query);
        let response = self
            .http
            .delete(url)
            .send()
            .await
            .map_err(|e| self.classify(&e))?;
        self.succeeded(response).await
    }

    /// `Ok` for a success, else the answer's error.
    async fn succeeded(&self, response: reqwest::Response) -> Result<(), ClientError> {
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response.bytes().await.map_err(|e| self.classify(&e))?;
        Err(status_error(status, &body))
    }

    /// `DELETE`s the API path made of `segments`, as [`ApiClient::post`].
    pub async fn delete<T: DeserializeOwned>(&self, segments: &[&str]) -> Result<T, ClientError> {
        self.send::<(), T>(reqwest::Method::DELETE, segments, None)
            .await
    }

    async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        segments: &[&str],
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        self.send_within(method, segments, body, None).await
    }

    async fn send_within<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        segments: &[&str],
        body: Option<&B>,
        limit: Option<Duration>,
    ) -> Result<T, ClientError> {
        let url = self.url(segments);
        debug!(%url, %method, "request");
        let mut request = self.http.request(method, url.clone());
        if let Some(limit) = limit {
            request = request.timeout(limit);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| self.classify(&e))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| self.classify(&e))?;
        if !status.is_success() {
            return Err(status_error(status, &body));
        }
        let body: &[u8] = if body.is_empty() { b"null" } else { &body };
        serde_json::from_slice(body).map_err(|e| ClientError::Decode {
            url: url.to_string(),
            reason: e.to_string(),
        })
    }

    /// `GET`s a streaming answer (logs): the response once its status is a success.
    /// The overall request timeout does not apply; `idle` bounds the wait for headers.
    pub async fn stream(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
        idle: std::time::Duration,
    ) -> Result<reqwest::Response, ClientError> {
        let mut url = self.url(segments);
        url.query_pairs_mut().extend_pairs(query);
        debug!(%url, "GET (stream)");
        let response = tokio::time::timeout(
            idle,
            self.http
                .get(url.clone())
                .timeout(std::time::Duration::from_secs(7 * 24 * 3600))
                .send(),
        )
        .await
        .map_err(|_| ClientError::Unreachable {
            url: self.api.to_string(),
            reason: format!("no answer within {}", output::short_duration(idle)),
        })?
        .map_err(|e| self.classify(&e))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.bytes().await.map_err(|e| self.classify(&e))?;
            return Err(status_error(status, &body));
        }
        Ok(response)
    }

    /// `POST`s `body` as JSON and returns the streaming answer (exec) once its
    /// status is a success. As [`ApiClient::stream`]: `idle` bounds the wait for
    /// headers and the overall request timeout does not apply.
    pub async fn post_stream<B: Serialize>(
        &self,
        segments: &[&str],
        body: &B,
        idle: std::time::Duration,
    ) -> Result<reqwest::Response, ClientError> {
        let url = self.url(segments);
        debug!(%url, "POST (stream)");
        let response = tokio::time::timeout(
            idle,
            self.http
                .post(url.clone())
                .json(body)
                .timeout(std::time::Duration::from_secs(7 * 24 * 3600))
                .send(),
        )
        .await
        .map_err(|_| ClientError::Unreachable {
            url: self.api.to_string(),
            reason: format!("no answer within {}", output::short_duration(idle)),
        })?
        .map_err(|e| self.classify(&e))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.bytes().await.map_err(|e| self.classify(&e))?;
            return Err(status_error(status, &body));
        }
        Ok(response)
    }

    /// Turns an error while reading a streamed body into a client error.
    pub fn stream_error(&self, e: &reqwest::Error) -> ClientError {
        self.classify(e)
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.api.url().clone();
        // An https URL always has a path to push to (it cannot be a base-less URL).
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    /// Turns a transport error into what the operator should do.
    fn classify(&self, e: &reqwest::Error) -> ClientError {
        let url = self.api.to_string();
        if let Some(tls) = find_tls_error(e) {
            return self.tls_error(url, &tls);
        }
        if e.is_timeout() {
            return ClientError::Unreachable {
                url,
                reason: format!(
                    "no answer within {}",
                    output::short_duration(REQUEST_TIMEOUT)
                ),
            };
        }
        if e.is_connect() {
            return ClientError::Unreachable {
                url,
                reason: root_cause(e),
            };
        }
        ClientError::Request {
            url: e.url().map_or(url, Url::to_string),
            reason: causes(e),
        }
    }

    fn tls_error(&self, url: String, e: &rustls::Error) -> ClientError {
        let expired_locally = self.cert_not_after.filter(|t| *t <= self.now);
        let expired = || ClientError::ClientCertExpired {
            url: url.clone(),
            cert: self.cert.clone(),
            context: self.context.clone(),
            expired: self
                .cert_not_after
                .map(|t| format!(" on {}", output::timestamp(self.now, t)))
                .unwrap_or_default(),
        };
        match e {
            rustls::Error::AlertReceived(AlertDescription::CertificateExpired) => expired(),
            rustls::Error::AlertReceived(AlertDescription::CertificateRevoked) => {
                ClientError::ClientCertRevoked {
                    url,
                    cert: self.cert.clone(),
                    context: self.context.clone(),
                }
            }
            rustls::Error::AlertReceived(alert) if CLIENT_CERT_ALERTS.contains(alert) => {
                if expired_locally.is_some() {
                    expired()
                } else {
                    ClientError::ClientCertUntrusted {
                        url,
                        cert: self.cert.clone(),
                        context: self.context.clone(),
                        alert: format!("{alert:?}"),
                    }
                }
            }
            rustls::Error::InvalidCertificate(reason) => ClientError::ServerCertUntrusted {
                url,
                ca: self.ca.clone(),
                context: self.context.clone(),
                reason: reason.to_string(),
            },
            other => ClientError::Handshake {
                url,
                reason: other.to_string(),
            },
        }
    }
}

/// Alerts a server sends when it does not trust the client's certificate.
const CLIENT_CERT_ALERTS: [AlertDescription; 8] = [
    AlertDescription::BadCertificate,
    AlertDescription::UnsupportedCertificate,
    AlertDescription::CertificateUnknown,
    AlertDescription::UnknownCA,
    AlertDescription::AccessDenied,
    AlertDescription::DecryptError,
    AlertDescription::CertificateRequired,
    AlertDescription::NoCertificate,
];

/// The error for a non-success status, with the server's message.
fn status_error(status: StatusCode, body: &[u8]) -> ClientError {
    let message = match serde_json::from_slice::<ApiError>(body) {
        Ok(api) => api.error,
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            if text.is_empty() {
                status
                    .canonical_reason()
                    .unwrap_or("no message")
                    .to_string()
            } else {
                text.chars().take(MAX_QUOTED_BODY).collect()
            }
        }
    };
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
            ClientError::PermissionDenied { message }
        }
        StatusCode::NOT_FOUND => ClientError::NotFound { message },
        status => ClientError::Status { status, message },
    }
}

/// Every error in the chain of `e`, looking inside `io::Error`s too (whose `source`
/// skips the error they wrap).
fn chain<'a>(e: &'a (dyn StdError + 'static)) -> Vec<&'a (dyn StdError + 'static)> {
    let mut out = Vec::new();
    let mut next = Some(e);
    while let Some(e) = next {
        out.push(e);
        next = match e.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => e.source(),
        };
    }
    out
}

/// The TLS error behind `e`, if any.
fn find_tls_error(e: &(dyn StdError + 'static)) -> Option<rustls::Error> {
    let chain = chain(e);
    if let Some(tls) = chain.iter().find_map(|e| e.downcast_ref::<rustls::Error>()) {
        return Some(tls.clone());
    }
    // With TLS 1.3 the server checks the client certificate after the client has
    // finished its handshake, so the refusal arrives as an alert on the first read.
    // Over HTTP/2 that I/O error keeps only its message (h2 stores I/O errors as
    // kind and text), so recognise the alerts by rustls' own wording.
    let messages: Vec<String> = chain.iter().map(|e| e.to_string()).collect();
    CLIENT_CERT_ALERTS
        .iter()
        .chain(&[
            AlertDescription::CertificateExpired,
            AlertDescription::CertificateRevoked,
        ])
        .map(|alert| rustls::Error::AlertReceived(*alert))
        .find(|tls| {
            let text = tls.to_string();
            messages.iter().any(|m| m.ends_with(&text))
        })
}

/// The message of the innermost error: `Connection refused (os error 111)`.
fn root_cause(e: &reqwest::Error) -> String {
    chain(e)
        .last()
        .map_or_else(|| e.to_string(), |e| e.to_string())
}

/// All messages in the chain, joined with `: `, skipping repeats.
fn causes(e: &reqwest::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in chain(e) {
        let msg = e.to_string();
        if parts.last() != Some(&msg) {
            parts.push(msg);
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_watch_waits_past_the_smallest_index_of_the_last_frame_once_per_frame() {
        let w = WatchIndex::new(Duration::from_secs(30));
        assert!(!w.begin_frame(), "the first frame does not wait");
        assert_eq!(w.take_wait(), None);
        w.saw(Some(7));
        w.saw(None);
        w.saw(Some(5));
        assert_eq!(w.seen(), Some(5));
        assert!(w.begin_frame());
        assert_eq!(w.take_wait(), Some((5, Duration::from_secs(30))));
        assert_eq!(w.take_wait(), None, "later reads of a frame do not wait");
        w.saw(Some(9));
        w.reread();
        assert_eq!(w.seen(), None);
        assert!(!w.begin_frame(), "after a reread nothing is waited on");
    }

    #[test]
    fn status_errors_carry_the_servers_message() {
        let body = br#"{"error":"no node named \"ghost\""}"#;
        let e = status_error(StatusCode::NOT_FOUND, body);
        assert_eq!(e.to_string(), "no node named \"ghost\"");
        let e = status_error(
            StatusCode::FORBIDDEN,
            br#"{"error":"viewers may not drain"}"#,
        );
        assert_eq!(e.to_string(), "permission denied: viewers may not drain");
        let e = status_error(StatusCode::UNAUTHORIZED, b"");
        assert_eq!(e.to_string(), "permission denied: Unauthorized");
        let e = status_error(StatusCode::BAD_GATEWAY, b"upstream down\n");
        assert_eq!(
            e.to_string(),
            "the controller answered 502 Bad Gateway: upstream down"
        );
    }

    #[test]
    fn tls_errors_are_found_inside_io_errors() {
        let inner = rustls::Error::AlertReceived(AlertDescription::UnknownCA);
        let io = io::Error::new(io::ErrorKind::InvalidData, inner);
        assert!(matches!(
            find_tls_error(&io),
            Some(rustls::Error::AlertReceived(AlertDescription::UnknownCA))
        ));
    }

    #[test]
    fn tls_alerts_are_recognised_by_their_text_after_http2_flattens_them() {
        let text = rustls::Error::AlertReceived(AlertDescription::CertificateExpired).to_string();
        let io = io::Error::new(io::ErrorKind::InvalidData, text);
        assert!(matches!(
            find_tls_error(&io),
            Some(rustls::Error::AlertReceived(
                AlertDescription::CertificateExpired
            ))
        ));
        let unrelated = io::Error::other("received fatal alert: SomethingElse");
        assert!(find_tls_error(&unrelated).is_none());
    }
}

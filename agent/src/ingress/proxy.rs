//! The ingress data plane: one listener per service, TCP (a connection to one
//! endpoint per client connection) or HTTP (HTTP/1.1 and HTTP/2 from clients,
//! HTTP/1.1 with pooled keep-alive connections to the endpoints, one balancing
//! decision per request), optionally behind TLS. See [`super::balance`] for the
//! decisions.
//!
//! Retries: a request whose method is idempotent (`GET`, `HEAD`, `OPTIONS`,
//! `PUT`, `DELETE`, `TRACE`) and that has no body is sent again to another
//! endpoint, at most [`MAX_ATTEMPTS`] times in all, when an endpoint cannot be
//! reached, closes the connection before answering, or answers 502, 503 or 504.
//! Other requests are sent once (their body streams through and cannot be
//! replayed).
//!
//! Upgrades: an HTTP/1.1 request that asks to switch protocols (`Connection:
//! upgrade` with `Upgrade: websocket`, say) goes to one endpoint with those
//! headers kept; when it answers 101 the two connections are joined byte for
//! byte until either side closes (the endpoint counts one request in flight for
//! as long), and for at most [`DRAIN_TIMEOUT`] after the listener closes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::balance::{Balancer, EndpointKey, Outcome, Pick};
use super::stats::ServiceStats;

/// Attempts of a retryable request, the first included (and of a TCP connect).
pub const MAX_ATTEMPTS: usize = 3;
/// Time to connect to an endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Time a client has to send a request head (HTTP/1.1) or its TLS handshake.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connections may finish their work after their listener closes.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Client connections served at once by one listener (more wait in the backlog).
pub const MAX_CONNECTIONS: usize = 10_000;
/// Idle keep-alive connections kept to each endpoint.
pub const POOL_IDLE_PER_ENDPOINT: usize = 256;

/// A body either way through the proxy.
pub type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;
/// The client to the endpoints.
pub type Upstream = Client<HttpConnector, ProxyBody>;

/// The pooled HTTP/1.1 client every HTTP listener shares.
pub fn upstream_client() -> Upstream {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(POOL_IDLE_PER_ENDPOINT)
        .build(connector)
}

/// One service as its listener serves it.
#[derive(Debug)]
pub struct Served {
    /// The service's name.
    pub name: String,
    /// Its balancer, shared by every connection of the listener.
    pub balancer: Mutex<Balancer>,
    /// Its counters.
    pub stats: Arc<ServiceStats>,
}

impl Served {
    fn pick(&self, tried: &[EndpointKey]) -> Option<Pick> {
        let draws = (rand::random::<u64>(), rand::random::<u64>());
        lock(&self.balancer).pick(Instant::now(), draws, tried)
    }

    /// The endpoint answered with `status` (5xx counts against it).
    fn answered(&self, key: &EndpointKey, status: StatusCode) {
        let outcome = if status.is_server_error() {
            Outcome::ServerError
        } else {
            Outcome::Success
        };
        self.finish(key, outcome);
    }

    /// The endpoint could not be reached or closed before answering.
    fn unanswered(&self, pick: &Pick, error: &dyn std::fmt::Display) {
        self.stats.upstream_failure();
        self.finish(&pick.key, Outcome::GatewayFailure);
        debug!(service = %self.name, endpoint = %pick.address, %error, "ingress: endpoint failed");
    }

    /// The answer when no endpoint can take a request: 503.
    fn no_endpoint(&self) -> Response<ProxyBody> {
        self.stats.no_endpoint();
        plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy endpoint for this service\n",
        )
    }

    fn finish(&self, key: &EndpointKey, outcome: Outcome) {
        let effects = lock(&self.balancer).finish(key, Instant::now(), outcome);
        if effects.ejected {
            self.stats.ejection();
            warn!(service = %self.name, endpoint = %key.1, alloc = %key.0, "ingress: endpoint ejected after failures");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Accepts connections on `listener` until `cancel`, then lets the open ones
/// finish for up to [`DRAIN_TIMEOUT`]. `tls` terminates TLS first.
pub async fn serve(
    listener: TcpListener,
    served: Arc<Served>,
    http: Option<Upstream>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    cancel: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let addr = listener.local_addr().ok();
    info!(service = %served.name, addr = ?addr, http = http.is_some(), tls = tls.is_some(), "ingress listening");
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(service = %served.name, error = %e, "ingress: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let served = served.clone();
        let http = http.clone();
        let tls = tls.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _permit = permit;
            served.stats.connection_opened();
            match tls {
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            connection(stream, peer, true, &served, http, cancel).await
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "ingress: TLS handshake failed"),
                        Err(_) => debug!(%peer, "ingress: TLS handshake timed out"),
                    }
                }
                None => connection(stream, peer, false, &served, http, cancel).await,
            }
            served.stats.connection_closed();
        });
    }
    drop(listener);
    // Wait for the connections to finish (each drains on `cancel`).
    let _ = tokio::time::timeout(
        DRAIN_TIMEOUT + Duration::from_secs(1),
        slots.acquire_many(MAX_CONNECTIONS as u32),
    )
    .await;
    info!(service = %served.name, addr = ?addr, "ingress listener closed");
}

async fn connection<S>(
    stream: S,
    peer: SocketAddr,
    tls: bool,
    served: &Arc<Served>,
    http: Option<Upstream>,
    cancel: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match http {
        Some(client) => http_connection(stream, peer, tls, served, client, cancel).await,
        None => tcp_connection(stream, peer, served, cancel).await,
    }
}

async fn tcp_connection<S>(
    mut client: S,
    peer: SocketAddr,
    served: &Served,
    cancel: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut tried: Vec<EndpointKey> = Vec::new();
    let (pick, mut upstream) = loop {
        let Some(pick) = served.pick(&tried) else {
            served.stats.no_endpoint();
            debug!(%peer, service = %served.name, "ingress: no endpoint for a connection");
            return;
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(pick.address)).await {
            Ok(Ok(s)) => break (pick, s),
            Ok(Err(_)) | Err(_) => {
                served.stats.upstream_failure();
                served.finish(&pick.key, Outcome::GatewayFailure);
                tried.push(pick.key);
                if tried.len() >= MAX_ATTEMPTS {
                    return;
                }
                served.stats.retry();
            }
        }
    };
    let _ = upstream.set_nodelay(true);
    let copied = tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => r.map(|_| ()),
        _ = async {
            cancel.cancelled().await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        } => Ok(()),
    };
    if let Err(e) = copied {
        debug!(%peer, endpoint = %pick.address, error = %e, "ingress: TCP connection ended with an error");
    }
    served.finish(&pick.key, Outcome::Success);
}

async fn http_connection<S>(
    stream: S,
    peer: SocketAddr,
    tls: bool,
    served: &Arc<Served>,
    client: Upstream,
    cancel: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let served = served.clone();
    let tunnels = cancel.clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let served = served.clone();
        let client = client.clone();
        let tunnels = tunnels.clone();
        async move {
            Ok::<_, Infallible>(if is_upgrade(&req) {
                forward_upgrade(served, &client, req, peer, tls, tunnels).await
            } else {
                forward(&served, &client, req, peer, tls).await
            })
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = cancel.cancelled() => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(DRAIN_TIMEOUT, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "ingress: HTTP connection ended with an error");
    }
}

/// Whether `req` asks to switch protocols (HTTP/1.1 `Connection: upgrade` with
/// an `Upgrade` header).
fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Sends an upgrade request to one endpoint and, when it switches protocols,
/// joins the client's connection to the endpoint's until either closes (or
/// [`DRAIN_TIMEOUT`] after `cancel`). Not retried: the endpoint may have acted.
async fn forward_upgrade(
    served: Arc<Served>,
    client: &Upstream,
    req: Request<Incoming>,
    peer: SocketAddr,
    tls: bool,
    cancel: CancellationToken,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let response = switch(&served, client, req, peer, tls, cancel).await;
    served
        .stats
        .request(response.status().as_u16(), started.elapsed());
    response
}

/// [`forward_upgrade`] but for the counting.
async fn switch(
    served: &Arc<Served>,
    client: &Upstream,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    tls: bool,
    cancel: CancellationToken,
) -> Response<ProxyBody> {
    let mut head = Head::of(&req, peer, tls);
    if let Some(protocol) = req.headers().get(header::UPGRADE).cloned() {
        head.headers.insert(header::UPGRADE, protocol);
        head.headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let from_client = hyper::upgrade::on(&mut req);
    let Some(pick) = served.pick(&[]) else {
        return served.no_endpoint();
    };
    let Some(upstream_req) = head.request(pick.address, req.into_body().boxed_unsync()) else {
        served.finish(&pick.key, Outcome::Success);
        return bad_path();
    };
    match client.request(upstream_req).await {
        Ok(mut resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let from_endpoint = hyper::upgrade::on(&mut resp);
            let tunnel = served.clone();
            let key = pick.key.clone();
            tokio::spawn(async move {
                match tokio::try_join!(from_client, from_endpoint) {
                    Ok((c, e)) => {
                        let (mut c, mut e) = (TokioIo::new(c), TokioIo::new(e));
                        tokio::select! {
                            r = tokio::io::copy_bidirectional(&mut c, &mut e) => {
                                if let Err(error) = r {
                                    debug!(%peer, %error, "ingress: upgraded connection ended with an error");
                                }
                            }
                            _ = async {
                                cancel.cancelled().await;
                                tokio::time::sleep(DRAIN_TIMEOUT).await;
                            } => {}
                        }
                    }
                    Err(error) => debug!(%peer, %error, "ingress: an upgrade did not complete"),
                }
                tunnel.finish(&key, Outcome::Success);
            });
            let (parts, _) = resp.into_parts();
            Response::from_parts(parts, empty())
        }
        Ok(resp) => {
            served.answered(&pick.key, resp.status());
            passed_on(resp)
        }
        Err(e) => {
            served.unanswered(&pick, &e);
            bad_gateway()
        }
    }
}

/// Whether `req` may be sent again to another endpoint.
fn retryable(req: &Request<Incoming>) -> bool {
    let idempotent = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    );
    idempotent && req.body().is_end_stream()
}

/// Headers that belong to one connection, not to the request (RFC 9110 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

/// The request's head as sent to an endpoint (`uri` is filled per attempt).
struct Head {
    method: Method,
    path: String,
    headers: HeaderMap,
}

impl Head {
    fn of(req: &Request<Incoming>, peer: SocketAddr, tls: bool) -> Head {
        let mut headers = req.headers().clone();
        strip_hop_by_hop(&mut headers);
        if !headers.contains_key(header::HOST)
            && let Some(authority) = req.uri().authority()
            && let Ok(v) = HeaderValue::from_str(authority.as_str())
        {
            headers.insert(header::HOST, v);
        }
        let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(earlier) => format!("{earlier}, {}", peer.ip()),
            None => peer.ip().to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
            headers.insert("x-forwarded-for", v);
        }
        headers.insert(
            "x-forwarded-proto",
            HeaderValue::from_static(if tls { "https" } else { "http" }),
        );
        Head {
            method: req.method().clone(),
            path: req
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_owned())
                .unwrap_or_else(|| "/".into()),
            headers,
        }
    }

    fn request(&self, to: SocketAddr, body: ProxyBody) -> Option<Request<ProxyBody>> {
        let uri: Uri = format!("http://{to}{}", self.path).parse().ok()?;
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = self.headers.clone();
        Some(req)
    }
}

fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

fn bad_path() -> Response<ProxyBody> {
    plain(StatusCode::BAD_REQUEST, "the request's path is not valid\n")
}

fn bad_gateway() -> Response<ProxyBody> {
    plain(
        StatusCode::BAD_GATEWAY,
        "the service's endpoint did not answer\n",
    )
}

/// An endpoint's answer as the client gets it (hop-by-hop headers gone).
fn passed_on(resp: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.boxed_unsync())
}

fn plain(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Sends one client request to an endpoint (or several, for a retryable one).
async fn forward(
    served: &Served,
    client: &Upstream,
    req: Request<Incoming>,
    peer: SocketAddr,
    tls: bool,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let head = Head::of(&req, peer, tls);
    let attempts = if retryable(&req) { MAX_ATTEMPTS } else { 1 };
    let mut body = Some(req.into_body().boxed_unsync());
    let mut tried: Vec<EndpointKey> = Vec::new();
    let response = loop {
        let Some(pick) = served.pick(&tried) else {
            break served.no_endpoint();
        };
        let last = tried.len() + 1 >= attempts;
        // A retryable request has no body: later attempts send an empty one.
        let this_body = body.take().unwrap_or_else(empty);
        let Some(upstream_req) = head.request(pick.address, this_body) else {
            served.finish(&pick.key, Outcome::Success);
            break bad_path();
        };
        match client.request(upstream_req).await {
            Ok(resp) => {
                served.answered(&pick.key, resp.status());
                let again = matches!(resp.status().as_u16(), 502..=504);
                if again && !last {
                    served.stats.retry();
                    tried.push(pick.key);
                    continue;
                }
                break passed_on(resp);
            }
            Err(e) => {
                served.unanswered(&pick, &e);
                if !last {
                    served.stats.retry();
                    tried.push(pick.key);
                    continue;
                }
                break bad_gateway();
            }
        }
    };
    served
        .stats
        .request(response.status().as_u16(), started.elapsed());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }
}

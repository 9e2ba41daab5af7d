//! The agent's optional Prometheus endpoint: `GET /metrics` over plain HTTP, for
//! sites that scrape hosts directly rather than (or besides) the controller.
//!
//! Off by default; `metrics_listen` turns it on, on loopback unless an address is
//! given (see [`crate::config`]). It shows what the agent itself knows: the host's
//! latest sample (the same `novacron_node_*` families, names and labels the
//! controller exports for every node, so one dashboard serves both), the agent's
//! build and its own `process_*` figures. It keeps no history: each scrape renders
//! the latest sample the sampler published.
//!
//! The listener is bounded: at most [`MAX_CONNECTIONS`] connections at once (more
//! wait in the kernel's backlog), [`HEADER_TIMEOUT`] to send the request head, and
//! [`CONNECTION_TIMEOUT`] per connection. Rendering is a few microseconds of string
//! work per scrape.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use novacron_common::exposition::{self, Family, Samples};
use novacron_common::wire::NodeSample;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send the request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection stays open.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// The agent's build, labelled with its version.
const AGENT_BUILD_INFO: Family = Family::gauge(
    "novacron_agent_build_info",
    "Always 1; the version label is the agent's build.",
);

/// What a scrape shows: the node's name and zone, and the latest host sample.
#[derive(Debug, Clone)]
pub struct Source {
    /// The node's enrolled name (the `node` label).
    pub node: String,
    /// The node's `zone` label, empty without one.
    pub zone: String,
    /// The sampler's latest reading (`None` before the first).
    pub latest: watch::Receiver<Option<Arc<NodeSample>>>,
    /// The ingress, whose counters follow the host's (`novacron_ingress_*`).
    pub ingress: Option<Arc<crate::ingress::Ingress>>,
}

impl Source {
    /// Renders the Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = Samples::default();
        out.int(
            &AGENT_BUILD_INFO,
            vec![
                ("node", self.node.clone()),
                ("version", env!("CARGO_PKG_VERSION").to_string()),
            ],
            1,
        );
        let latest = self.latest.borrow().clone();
        if let Some(sample) = latest {
            exposition::collect_sample(&self.node, &self.zone, &sample, &mut out);
        }
        exposition::collect_process(exposition::ProcessStats::read(), &mut out);
        let mut families: Vec<&Family> = std::iter::once(&AGENT_BUILD_INFO)
            .chain(exposition::SAMPLE_FAMILIES.iter())
            .chain(exposition::PROCESS_FAMILIES.iter())
            .collect();
        if let Some(ingress) = &self.ingress
            && ingress.collect(&self.node, &mut out)
        {
            families.extend(crate::ingress::stats::FAMILIES.iter());
        }
        exposition::render_text(&families, out)
    }
}

/// Serves `GET /metrics` on `listener` until `cancel`.
pub async fn serve(listener: TcpListener, source: Source, cancel: CancellationToken) {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    info!(%addr, "metrics endpoint listening (GET /metrics)");
    let source = Arc::new(source);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    while let Some((stream, peer, permit)) =
        crate::listen::next_connection(&listener, &slots, &cancel, "metrics endpoint").await
    {
        let source = source.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req: Request<Incoming>| {
                let answer = answer(&source, &req);
                async move { Ok::<_, Infallible>(answer) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(%peer, error = %e, "metrics endpoint: connection failed"),
                Err(_) => debug!(%peer, "metrics endpoint: connection timed out"),
            }
        });
    }
}

/// The answer to one request: the metrics for `GET`/`HEAD /metrics`, 405 for other
/// methods there, 404 elsewhere.
fn answer(source: &Source, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, text: &'static str| {
        let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: the agent serves GET /metrics\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET /metrics\n");
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    let mut r = Response::new(Full::new(Bytes::from(source.render())));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(exposition::TEXT_CONTENT_TYPE),
    );
    r
}

//! The node's loopback registry: a read-only OCI distribution API on
//! `127.0.0.1:<port>` that relays each read to the controller's image store over
//! the agent's link ([`BiRequest::Registry`]). Docker trusts plain HTTP to a
//! loopback registry, so the node's own puller fetches, verifies, deduplicates
//! and caches the layers of images pushed with `novacron image push`, in a fleet
//! that has no registry at all.
//!
//! The port is chosen when the agent starts ([`bind`]); the supervisor pulls
//! `127.0.0.1:<port>/<name>:<tag>` and tags the result as the job names it.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use novacron_common::sync::lock;
use novacron_common::wire::{
    self, BiRequest, MAX_REGISTRY_PATH, PROTOCOL_VERSION, RegistryReply, RegistryRequest,
};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Connections served at once.
const MAX_CONNECTIONS: usize = 64;
/// Time to read a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for the controller's answer to a read to begin.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// The relay: the link it uses, set while connected.
#[derive(Debug, Default)]
pub struct LocalRegistry {
    link: Mutex<Option<(quinn::Connection, u16)>>,
}

/// Binds the loopback registry's listener on a free port.
pub fn bind() -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

impl LocalRegistry {
    /// Uses `link` (protocol `version`) for reads; `None` while disconnected.
    pub fn set_connection(&self, link: Option<(quinn::Connection, u16)>) {
        *lock(&self.link) = link;
    }

    /// Serves `listener` until `cancel` fires.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, cancel: CancellationToken) {
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        info!(%addr, "loopback registry listening (the controller's image store)");
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        while let Some((stream, _, permit)) =
            crate::listen::next_connection(&listener, &slots, &cancel, "loopback registry").await
        {
            let me = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = service_fn(move |req: Request<Incoming>| {
                    let me = me.clone();
                    async move { Ok::<_, Infallible>(me.answer(req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!(error = %e, "loopback registry connection ended");
                }
            });
        }
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Body> {
        let head = match *req.method() {
            Method::HEAD => true,
            Method::GET => false,
            _ => return error(StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED", "read-only"),
        };
        let path = req.uri().path();
        let Some(rest) = path.strip_prefix("/v2/").or(path.strip_prefix("/v2")) else {
            return error(StatusCode::NOT_FOUND, "NAME_UNKNOWN", "not a registry path");
        };
        if rest.is_empty() {
            return Response::builder()
                .status(StatusCode::OK)
                .header("docker-distribution-api-version", "registry/2.0")
                .header("content-type", "application/json")
                .body(full(Bytes::from_static(b"{}")))
                .unwrap_or_else(|_| Response::new(full(Bytes::new())));
        }
        if rest.len() > MAX_REGISTRY_PATH {
            return error(StatusCode::BAD_REQUEST, "NAME_INVALID", "path too long");
        }
        let link = lock(&self.link).clone();
        let Some((conn, version)) = link.filter(|(_, v)| *v >= 3) else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "the agent is not connected to a controller that serves images",
            );
        };
        match relay(&conn, version, rest, head).await {
            Ok(response) => response,
            Err(why) => {
                warn!(path = %rest, error = %why, "loopback registry: relay failed");
                error(StatusCode::BAD_GATEWAY, "UNAVAILABLE", &why)
            }
        }
    }
}

/// One read relayed over a new stream.
async fn relay(
    conn: &quinn::Connection,
    version: u16,
    path: &str,
    head: bool,
) -> Result<Response<Body>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let request = BiRequest::Registry(RegistryRequest {
        protocol_version: version.min(PROTOCOL_VERSION),
        head,
        path: path.to_string(),
    });
    wire::write_frame(&mut send, &request)
        .await
        .map_err(|e| e.to_string())?;
    let _ = send.finish();
    let mut scratch = Vec::new();
    let reply = tokio::time::timeout(
        ANSWER_TIMEOUT,
        wire::read_frame::<RegistryReply, _>(&mut recv, &mut scratch),
    )
    .await
    .map_err(|_| "the controller did not answer within 30 s".to_string())?
    .map_err(|e| e.to_string())?
    .ok_or("the stream ended before the answer")?;
    if reply.status != 200 {
        let code = if reply.status == 404 {
            if path.contains("/blobs/") {
                "BLOB_UNKNOWN"
            } else {
                "MANIFEST_UNKNOWN"
            }
        } else {
            "NAME_INVALID"
        };
        let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_GATEWAY);
        return Ok(error(status, code, &reply.message));
    }
    let mut builder = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", &reply.media_type)
        .header("content-length", reply.length)
        .header("docker-distribution-api-version", "registry/2.0");
    if let Some(d) = &reply.digest {
        builder = builder.header("docker-content-digest", d);
    }
    let body: Body = if head {
        full(Bytes::new())
    } else {
        let length = reply.length;
        let stream =
            futures_util::stream::unfold((recv, 0u64), move |(mut recv, have)| async move {
                if have >= length {
                    return None;
                }
                let want = ((length - have) as usize).min(256 * 1024);
                match recv.read_chunk(want, true).await {
                    Ok(Some(chunk)) => {
                        let n = chunk.bytes.len() as u64;
                        Some((Ok(Frame::data(chunk.bytes)), (recv, have + n)))
                    }
                    Ok(None) => Some((
                        Err(std::io::Error::other(format!(
                            "the controller sent {have} of {length} bytes"
                        ))),
                        (recv, length),
                    )),
                    Err(e) => Some((Err(std::io::Error::other(e.to_string())), (recv, length))),
                }
            });
        BodyExt::boxed_unsync(StreamBody::new(StreamExt::boxed(stream)))
    };
    builder.body(body).map_err(|e| e.to_string())
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A distribution API error body.
fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string();
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("docker-distribution-api-version", "registry/2.0")
        .body(full(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// Whether `image` can come from the controller's store: a repository name of
/// the distribution grammar (no registry port) with a tag or a digest.
pub fn store_reference(image: &str) -> Option<(String, String)> {
    let (name, tag) = novacron_common::names::split_image_tag(image);
    let reference = match image.split_once('@') {
        Some((_, digest)) => format!("@{digest}"),
        None => format!(":{}", tag.unwrap_or("latest")),
    };
    let ok = novacron_common::names::is_repository_name(name);
    ok.then(|| (name.to_string(), reference))
}

#[cfg(test)]
mod tests {
    use super::store_reference;

    #[test]
    fn store_references_are_distribution_names() {
        assert_eq!(
            store_reference("team/api:1.4"),
            Some(("team/api".into(), ":1.4".into()))
        );
        assert_eq!(
            store_reference("busybox"),
            Some(("busybox".into(), ":latest".into()))
        );
        assert_eq!(
            store_reference("team/api@sha256:ab"),
            Some(("team/api".into(), "@sha256:ab".into()))
        );
        assert_eq!(
            store_reference("127.0.0.1:5000/x:1"),
            None,
            "a registry port"
        );
        assert_eq!(store_reference("Team/api:1"), None);
    }
}

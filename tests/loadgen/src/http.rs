//! The real I/O: the target URL, an HTTP/1.1 keep-alive [`Connector`] over
//! hyper's client connection, and the trivial backend server.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::engine::{Connection, Connector};
use crate::stats::Failure;

/// A parsed, resolved `http://host:port/path` target.
#[derive(Debug, Clone)]
pub struct Target {
    /// The address connected to (the first the host resolves to).
    pub addr: SocketAddr,
    /// The `Host` header: the URL's authority.
    pub host: String,
    /// The request target: path and query, `/` when the URL has none.
    pub path: String,
}

impl Target {
    /// Parses `url` (only `http://` is supported) and resolves its host.
    pub async fn resolve(url: &str) -> anyhow::Result<Target> {
        let uri: Uri = url.parse().with_context(|| {
            format!("--url {url:?} is not a URL (expected http://HOST:PORT/PATH)")
        })?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => bail!("--url {url:?}: scheme {other:?} is not supported, only http://"),
            None => bail!("--url {url:?} has no scheme (expected http://HOST:PORT/PATH)"),
        }
        let Some(authority) = uri.authority() else {
            bail!("--url {url:?} has no host (expected http://HOST:PORT/PATH)");
        };
        let port = authority.port_u16().unwrap_or(80);
        let addr = tokio::net::lookup_host((authority.host(), port))
            .await
            .with_context(|| format!("--url {url:?}: cannot resolve {:?}", authority.host()))?
            .next()
            .with_context(|| {
                format!(
                    "--url {url:?}: {:?} resolves to no address",
                    authority.host()
                )
            })?;
        let path = uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
        Ok(Target {
            addr,
            host: authority.as_str().to_owned(),
            path,
        })
    }
}

/// Opens HTTP/1.1 keep-alive connections to a [`Target`] and sends `GET`s on
/// them.
#[derive(Debug, Clone)]
pub struct HttpConnector {
    target: std::sync::Arc<Target>,
}

impl HttpConnector {
    /// A connector for `target`.
    pub fn new(target: Target) -> Self {
        HttpConnector {
            target: std::sync::Arc::new(target),
        }
    }
}

/// One HTTP/1.1 client connection (hyper drives it in a task of its own).
#[derive(Debug)]
pub struct HttpConnection {
    sender: SendRequest<Empty<Bytes>>,
    target: std::sync::Arc<Target>,
}

impl Connector for HttpConnector {
    type Conn = HttpConnection;

    async fn connect(&self) -> Result<HttpConnection, Failure> {
        let stream = TcpStream::connect(self.target.addr)
            .await
            .map_err(|_| Failure::Connect)?;
        // Requests are small and latency is what is measured.
        stream.set_nodelay(true).map_err(|_| Failure::Connect)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| Failure::Connect)?;
        // The connection task ends when the peer closes or the sender is dropped;
        // its error, if any, shows on the sender.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(HttpConnection {
            sender,
            target: self.target.clone(),
        })
    }
}

impl Connection for HttpConnection {
    async fn request(&mut self) -> Result<u16, Failure> {
        self.sender.ready().await.map_err(|_| Failure::Io)?;
        let request = Request::get(self.target.path.as_str())
            .header(hyper::header::HOST, self.target.host.as_str())
            .body(Empty::<Bytes>::new())
            // The path came out of a parsed URI and the host out of its
            // authority: both are valid in a request.
            .expect("a request built from a parsed URL is valid");
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|_| Failure::Io)?;
        let status = response.status().as_u16();
        // Read the whole body so that the connection can carry the next request.
        response
            .into_body()
            .collect()
            .await
            .map_err(|_| Failure::Io)?;
        Ok(status)
    }

    fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }
}

/// Serves every request on `listener` with `200` and the body `backend {id}\n`,
/// over HTTP/1.1 with keep-alive, until the task is dropped.
pub async fn serve(listener: TcpListener, id: &str) {
    let body = Bytes::from(format!("backend {id}\n"));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: back off, then go on.
                eprintln!("novacron-loadgen serve: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let body = body.clone();
                async move {
                    // The request body is not read: hyper discards it before the
                    // next request on the connection.
                    drop(request);
                    Ok::<_, Infallible>(Response::new(Full::new(body)))
                }
            });
            // A client that goes away mid-request ends its connection: nothing
            // to report.
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;
    use crate::engine::{ClosedLoop, OpenLoop, Pacer, closed_loop, open_loop};
    use crate::schedule::Plan;

    async fn backend(id: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        tokio::spawn(async move { serve(listener, id).await });
        format!("http://{addr}/ping?x=1")
    }

    #[tokio::test]
    async fn urls_parse_into_address_host_and_path() {
        let t = Target::resolve("http://127.0.0.1:8080/a/b?c=d")
            .await
            .expect("parses");
        assert_eq!(t.addr, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(t.host, "127.0.0.1:8080");
        assert_eq!(t.path, "/a/b?c=d");
        let t = Target::resolve("http://127.0.0.1").await.expect("parses");
        assert_eq!((t.addr.port(), t.path.as_str()), (80, "/"));
        for bad in ["https://127.0.0.1/", "127.0.0.1:80", "not a url"] {
            assert!(Target::resolve(bad).await.is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn serve_answers_with_its_id_on_a_kept_alive_connection() {
        let url = backend("a").await;
        let target = Target::resolve(&url).await.expect("target");
        let mut conn = HttpConnector::new(target)
            .connect()
            .await
            .expect("connects");
        for _ in 0..3 {
            assert_eq!(conn.request().await, Ok(200));
            assert!(!conn.is_closed());
        }
        let response = conn
            .sender
            .send_request(Request::get("/").body(Empty::new()).expect("request"))
            .await
            .expect("response");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&body[..], b"backend a\n");
    }

    /// End to end over real sockets: 100 requests at 200/s on 4 connections to
    /// `serve`. Only counts are asserted, never speed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn open_loop_against_serve_gets_every_request_answered() {
        let url = backend("e2e").await;
        let connector = HttpConnector::new(Target::resolve(&url).await.expect("target"));
        let config = OpenLoop {
            plan: Plan {
                rate: NonZeroU32::new(200).expect("non-zero"),
                warmup: Duration::from_millis(100),
                measured: Duration::from_millis(500),
            },
            pacer: Pacer::Thread,
            connections: 4,
            queue: 40,
            timeout: Duration::from_secs(5),
        };
        let report = open_loop(connector, &config, &url).await;
        assert_eq!(report.scheduled, 100);
        assert_eq!(report.dropped, 0);
        assert_eq!(report.sent(), 100);
        assert_eq!(report.tally.ok, 100, "{report}");
        assert_eq!(report.tally.non_2xx + report.tally.errors(), 0);
        assert_eq!(report.tally.latency_us.len(), 100);
        let json = report.to_json();
        assert_eq!(json["ok"], 100);
        assert_eq!(json["sent"], json["scheduled"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn closed_loop_against_serve_counts_only_successes() {
        let url = backend("max").await;
        let connector = HttpConnector::new(Target::resolve(&url).await.expect("target"));
        let config = ClosedLoop {
            warmup: Duration::from_millis(50),
            measured: Duration::from_millis(300),
            connections: 2,
            timeout: Duration::from_secs(5),
        };
        let report = closed_loop(connector, &config, &url).await;
        assert!(report.tally.ok > 0);
        assert_eq!(report.tally.errors() + report.tally.non_2xx, 0);
        assert_eq!(report.scheduled, report.tally.ok);
    }

    /// A port nobody listens on: every request is a connect error, and the
    /// counts still add up.
    #[tokio::test]
    async fn a_refused_target_counts_connect_errors() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let url = format!("http://{addr}/");
        let connector = HttpConnector::new(Target::resolve(&url).await.expect("target"));
        let config = OpenLoop {
            plan: Plan {
                rate: NonZeroU32::new(100).expect("non-zero"),
                warmup: Duration::ZERO,
                measured: Duration::from_millis(200),
            },
            pacer: Pacer::Timer,
            connections: 2,
            queue: 20,
            timeout: Duration::from_secs(5),
        };
        let report = open_loop(connector, &config, &url).await;
        assert_eq!(report.scheduled, 20);
        assert_eq!(report.tally.ok, 0);
        assert_eq!(report.tally.errors_connect, report.sent());
        assert_eq!(report.sent() + report.dropped, report.scheduled);
    }
}

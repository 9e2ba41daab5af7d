//! Spot interruption notices: the cloud says this instance goes away soon.
//!
//! Two sources say the same JSON, `{"action": "terminate", "time":
//! "2026-11-22T19:00:00Z"}`:
//! - an HTTP URL shaped like EC2's instance metadata ([`EC2_URL`]): 404 means no
//!   notice, 200 carries one;
//! - a file (for other clouds' hooks, and tests): missing or empty means no notice.
//!
//! [`parse_notice`] is pure. [`SpotWatcher::poll_once`] reads the source once, and
//! [`SpotWatcher::spawn`] polls it on an interval and publishes the current notice
//! (or `None`) on a `watch` channel until cancelled.

use std::path::PathBuf;
use std::time::Duration;

use chrono::DateTime;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use novacron_common::retry::sleep_unless;
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// EC2's spot instance-action endpoint (IMDSv1).
pub const EC2_URL: &str = "http://169.254.169.254/latest/meta-data/spot/instance-action";
/// How often to poll when not told (EC2 asks for every 5 s; the notice comes 2
/// minutes ahead).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// The shortest poll interval accepted; shorter ones are raised to it.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// The longest poll interval accepted; longer ones are lowered to it.
pub const MAX_INTERVAL: Duration = Duration::from_secs(60);
/// A whole HTTP poll (connect, request, body) must finish within this.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest notice body read, from HTTP or a file.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Failed polls between two warnings.
pub const WARN_EVERY: u32 = 60;
/// The actions a notice may announce.
pub const ACTIONS: [&str; 3] = ["terminate", "stop", "hibernate"];

/// An interruption notice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpotNotice {
    /// `terminate`, `stop` or `hibernate`.
    pub action: String,
    /// When the action happens (Unix ms).
    pub deadline_unix_ms: u64,
}

impl SpotNotice {
    /// Time left before the deadline at `now_unix_ms` (zero once it has passed).
    pub fn remaining(&self, now_unix_ms: u64) -> Duration {
        Duration::from_millis(self.deadline_unix_ms.saturating_sub(now_unix_ms))
    }
}

/// Where notices come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpotSource {
    /// An `http://` URL: 404 no notice, 200 a notice.
    Http(String),
    /// A file: missing or empty no notice, else a notice.
    File(PathBuf),
}

/// Parses a notice body: `{"action": "terminate"|"stop"|"hibernate", "time":
/// "<RFC 3339>"}`. Other keys are ignored (the cloud may add some). Errors name the
/// bad value and what is accepted.
pub fn parse_notice(body: &str) -> Result<SpotNotice, String> {
    #[derive(Deserialize)]
    struct Raw {
        action: String,
        time: String,
    }
    let raw: Raw = serde_json::from_str(body).map_err(|e| {
        format!(
            "spot notice {:?} is not valid ({e}); expected JSON like \
             {{\"action\": \"terminate\", \"time\": \"2026-11-22T19:00:00Z\"}}",
            clip(body)
        )
    })?;
    if !ACTIONS.contains(&raw.action.as_str()) {
        return Err(format!(
            "spot notice action {:?} is not known; expected one of {}",
            clip(&raw.action),
            ACTIONS.join(", ")
        ));
    }
    let time = DateTime::parse_from_rfc3339(raw.time.trim()).map_err(|e| {
        format!(
            "spot notice time {:?} is not a time ({e}); expected RFC 3339 like \
             2026-11-22T19:00:00Z",
            clip(&raw.time)
        )
    })?;
    let deadline_unix_ms = u64::try_from(time.timestamp_millis()).map_err(|_| {
        format!(
            "spot notice time {:?} is before 1970; expected a time near now",
            raw.time
        )
    })?;
    Ok(SpotNotice {
        action: raw.action,
        deadline_unix_ms,
    })
}

/// Polls a [`SpotSource`].
#[derive(Debug, Clone)]
pub struct SpotWatcher {
    source: SpotSource,
    interval: Duration,
}

impl SpotWatcher {
    /// A watcher of `source` every `interval`, bounded to
    /// [`MIN_INTERVAL`]..=[`MAX_INTERVAL`].
    pub fn new(source: SpotSource, interval: Duration) -> Self {
        SpotWatcher {
            source,
            interval: interval.clamp(MIN_INTERVAL, MAX_INTERVAL),
        }
    }

    /// The source.
    pub fn source(&self) -> &SpotSource {
        &self.source
    }

    /// The poll interval, after bounding.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Reads the source once: `Ok(None)` without a notice. Errors name the source.
    pub async fn poll_once(&self) -> Result<Option<SpotNotice>, String> {
        let body = match &self.source {
            SpotSource::Http(url) => tokio::time::timeout(HTTP_TIMEOUT, http_get(url))
                .await
                .map_err(|_| {
                    format!(
                        "spot source {url}: no answer within {}s",
                        HTTP_TIMEOUT.as_secs()
                    )
                })?
                .map_err(|e| format!("spot source {url}: {e}"))?,
            SpotSource::File(path) => read_file(path)
                .await
                .map_err(|e| format!("spot source {}: {e}", path.display()))?,
        };
        match body {
            Some(b) if !b.trim().is_empty() => parse_notice(&b).map(Some),
            _ => Ok(None),
        }
    }

    /// Polls every interval until `cancel`, publishing the current notice on `tx`
    /// whenever it changes (a notice that disappears becomes `None`). A failed poll
    /// keeps the last value and is logged (the first of a run of failures as a
    /// warning, then every [`WARN_EVERY`]th). Stops too when every receiver is gone.
    pub fn spawn(
        self,
        tx: watch::Sender<Option<SpotNotice>>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut failures: u32 = 0;
            debug!(source = ?self.source, interval = ?self.interval, "spot watcher started");
            loop {
                let polled = tokio::select! {
                    _ = cancel.cancelled() => break,
                    polled = self.poll_once() => polled,
                };
                match polled {
                    Ok(notice) => {
                        if failures > 0 {
                            info!(failures, "spot source answers again");
                            failures = 0;
                        }
                        publish(&tx, notice);
                    }
                    Err(error) => {
                        failures = failures.saturating_add(1);
                        if failures % WARN_EVERY == 1 {
                            warn!(failures, %error, "spot poll failed");
                        } else {
                            debug!(failures, %error, "spot poll failed");
                        }
                    }
                }
                if tx.is_closed() {
                    debug!("spot watcher has no receivers; stopping");
                    break;
                }
                if !sleep_unless(self.interval, cancel.cancelled()).await {
                    break;
                }
            }
            debug!("spot watcher stopped");
        })
    }
}

/// Sends `notice` if it differs from the current value, logging the change.
fn publish(tx: &watch::Sender<Option<SpotNotice>>, notice: Option<SpotNotice>) {
    tx.send_if_modified(|current| {
        if *current == notice {
            return false;
        }
        match &notice {
            Some(n) => warn!(
                action = %n.action,
                deadline_unix_ms = n.deadline_unix_ms,
                "spot interruption notice"
            ),
            None => info!("spot interruption notice withdrawn"),
        }
        *current = notice;
        true
    });
}

/// GETs `url` over plain HTTP/1.1: `None` on 404, the body on 200, an error
/// naming the status otherwise. The body is bounded by [`MAX_BODY_BYTES`].
async fn http_get(url: &str) -> Result<Option<String>, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("not a URL ({e}); expected one like {EC2_URL}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "only http:// URLs are supported; expected one like {EC2_URL}"
        ));
    }
    let host = uri
        .host()
        .ok_or_else(|| format!("the URL has no host; expected one like {EC2_URL}"))?;
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("could not connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    let driver = tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "spot HTTP connection ended");
        }
    });
    let authority = uri.authority().map_or(host, |a| a.as_str());
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let result = async {
        let request = Request::get(path)
            .header(hyper::header::HOST, authority)
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("could not build the request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        match response.status() {
            StatusCode::NOT_FOUND => return Ok(None),
            StatusCode::OK => {}
            other => return Err(format!("answered {other}; expected 200 or 404")),
        }
        let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| format!("could not read the body (at most {MAX_BODY_BYTES} bytes): {e}"))?
            .to_bytes();
        String::from_utf8(body.to_vec())
            .map(Some)
            .map_err(|_| "the body is not UTF-8; expected JSON".to_string())
    }
    .await;
    driver.abort();
    result
}

/// A notice file: `None` when missing. Bounded by [`MAX_BODY_BYTES`].
async fn read_file(path: &std::path::Path) -> Result<Option<String>, String> {
    let file = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("could not open: {e}")),
    };
    let mut buf = Vec::new();
    file.take(MAX_BODY_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| format!("could not read: {e}"))?;
    if buf.len() > MAX_BODY_BYTES {
        return Err(format!(
            "larger than {MAX_BODY_BYTES} bytes; expected a small JSON notice"
        ));
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| "not UTF-8; expected JSON".to_string())
}

/// At most 200 characters of `s`, for error messages.
fn clip(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::Full;
    use hyper::Response;
    use hyper::service::service_fn;

    use super::*;

    const GOOD: &str = r#"{"action": "terminate", "time": "2026-11-22T19:00:00Z"}"#;
    /// 2026-11-22T19:00:00Z in Unix ms.
    const DEADLINE: u64 = 1_795_374_000_000;

    #[test]
    fn good_notices_parse() {
        let n = parse_notice(GOOD).expect("good");
        assert_eq!(
            n,
            SpotNotice {
                action: "terminate".into(),
                deadline_unix_ms: DEADLINE,
            }
        );
        assert_eq!(n.remaining(DEADLINE - 120_000), Duration::from_secs(120));
        assert_eq!(n.remaining(DEADLINE + 1), Duration::ZERO);
        for action in ACTIONS {
            let body = format!(
                r#"{{"action": "{action}", "time": "2026-11-22T20:00:00+01:00", "extra": 1}}"#
            );
            let n = parse_notice(&body).expect(action);
            assert_eq!((n.action.as_str(), n.deadline_unix_ms), (action, DEADLINE));
        }
    }

    #[test]
    fn bad_notices_name_the_value() {
        let cases = [
            ("not json", "\"not json\" is not valid"),
            (r#"{"action": "terminate"}"#, "missing field `time`"),
            (
                r#"{"action": "explode", "time": "2026-11-22T19:00:00Z"}"#,
                "action \"explode\" is not known; expected one of terminate, stop, hibernate",
            ),
            (
                r#"{"action": "stop", "time": "tomorrow"}"#,
                "time \"tomorrow\" is not a time",
            ),
            (
                r#"{"action": "stop", "time": "1969-12-31T23:59:59Z"}"#,
                "is before 1970",
            ),
        ];
        for (body, fragment) in cases {
            let e = parse_notice(body).expect_err(body);
            assert!(e.contains(fragment), "{body}: {e}");
        }
        let e = parse_notice(&"x".repeat(10_000)).expect_err("long");
        assert!(e.len() < 600, "clipped: {}", e.len());
    }

    #[tokio::test]
    async fn the_file_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notice.json");
        let w = SpotWatcher::new(SpotSource::File(path.clone()), Duration::ZERO);
        assert_eq!(w.interval(), MIN_INTERVAL);
        assert_eq!(w.poll_once().await, Ok(None), "missing");
        std::fs::write(&path, "").expect("write");
        assert_eq!(w.poll_once().await, Ok(None), "empty");
        std::fs::write(&path, " \n").expect("write");
        assert_eq!(w.poll_once().await, Ok(None), "blank");
        std::fs::write(&path, GOOD).expect("write");
        assert_eq!(
            w.poll_once()
                .await
                .expect("notice")
                .map(|n| n.deadline_unix_ms),
            Some(DEADLINE)
        );
        std::fs::write(&path, "{").expect("write");
        let e = w.poll_once().await.expect_err("bad");
        assert!(
            e.contains("notice.json") || e.contains("is not valid"),
            "{e}"
        );
        std::fs::write(&path, " ".repeat(MAX_BODY_BYTES + 1)).expect("write");
        let e = w.poll_once().await.expect_err("big");
        assert!(
            e.contains("notice.json") && e.contains("larger than 65536 bytes"),
            "{e}"
        );
    }

    /// Serves, in turn, each (status, body) of `answers`, then 404s; returns the URL.
    async fn serve(answers: Vec<(u16, String)>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let answers = Arc::new(answers);
        let next = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let answers = answers.clone();
                let next = next.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        assert_eq!(req.uri().path(), "/latest/meta-data/spot/instance-action");
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let (status, body) =
                            answers.get(i).cloned().unwrap_or((404, "Not Found".into()));
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = StatusCode::from_u16(status).expect("status");
                        async move { Ok::<_, Infallible>(r) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        format!("http://{addr}/latest/meta-data/spot/instance-action")
    }

    #[tokio::test]
    async fn the_http_source_404_then_200() {
        let url = serve(vec![
            (404, "Not Found".into()),
            (200, GOOD.into()),
            (500, "oops".into()),
            (200, "x".repeat(MAX_BODY_BYTES + 1)),
            (
                200,
                "{\"action\": \"nap\", \"time\": \"2026-11-22T19:00:00Z\"}".into(),
            ),
        ])
        .await;
        let w = SpotWatcher::new(SpotSource::Http(url.clone()), DEFAULT_INTERVAL);
        assert_eq!(w.poll_once().await, Ok(None));
        assert_eq!(
            w.poll_once().await,
            Ok(Some(SpotNotice {
                action: "terminate".into(),
                deadline_unix_ms: DEADLINE
            }))
        );
        let e = w.poll_once().await.expect_err("500");
        assert!(e.contains(&url) && e.contains("500"), "{e}");
        let e = w.poll_once().await.expect_err("too big");
        assert!(e.contains("at most 65536 bytes"), "{e}");
        let e = w.poll_once().await.expect_err("unknown action");
        assert!(e.contains("\"nap\" is not known"), "{e}");
    }

    #[tokio::test]
    async fn http_errors_name_the_url() {
        // A listener that accepts and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let url = format!("http://{addr}/x");
        let w = SpotWatcher::new(SpotSource::Http(url.clone()), DEFAULT_INTERVAL);
        let e = w.poll_once().await.expect_err("timeout");
        assert!(e.contains(&url) && e.contains("no answer within 2s"), "{e}");
        silent.abort();

        for (bad, fragment) in [
            ("https://example.com/x", "only http://"),
            ("not a url at all", "not a URL"),
        ] {
            let w = SpotWatcher::new(SpotSource::Http(bad.into()), DEFAULT_INTERVAL);
            let e = w.poll_once().await.expect_err(bad);
            assert!(e.contains(fragment), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn spawned_watcher_publishes_changes_and_stops_on_cancel() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notice.json");
        let w = SpotWatcher::new(SpotSource::File(path.clone()), MIN_INTERVAL);
        let (tx, mut rx) = watch::channel(None);
        let cancel = CancellationToken::new();
        let task = w.spawn(tx, cancel.clone());
        std::fs::write(&path, GOOD).expect("write");
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("in time")
            .expect("sender alive");
        assert_eq!(
            rx.borrow_and_update().as_ref().map(|n| n.deadline_unix_ms),
            Some(DEADLINE)
        );
        std::fs::remove_file(&path).expect("remove");
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("in time")
            .expect("sender alive");
        assert_eq!(*rx.borrow(), None);
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops on cancel")
            .expect("no panic");
    }
}

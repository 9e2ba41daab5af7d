//! Remote exec: `POST /v1/exec` runs a command on one node's host, on every ready
//! node matching a label selector, or inside one allocation's container, and
//! streams the results back as NDJSON ([`ExecLine`]s): output as it arrives, one
//! exit record per node, then a summary.
//!
//! Each node gets its own exec bi-stream on its link ([`Agents::open_exec`]).
//! Everything between the agent and the HTTP client is bounded: a slow client
//! stops the reading of the streams, QUIC flow control then stops the agent, and
//! the command blocks on its full pipe. When the client goes away (Ctrl-C), the
//! response body is dropped with the per-node tasks and their streams, which
//! cancels the commands on the agents. Every command on every node is recorded as
//! an [`kind::EXEC`] event: who, where, what, exit code and duration.
//!
//! [`Agents::open_exec`]: crate::services::agents::Agents::open_exec

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use novacron_api::{ApiError, ExecBody, ExecExit, ExecLine, ExecSummary};
use novacron_common::fleet::NodeStatus;
use novacron_common::pki::Role;
use novacron_common::wire::{
    self, ExecEvent, ExecRequest, ExecStream, ExecTarget, PROTOCOL_VERSION,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::api::{ApiState, Caller, Problem};
use crate::services::events::{NewEvent, kind};
pub use novacron_api::{parse_selector, selector_text};

/// Lines queued between the per-node tasks and the HTTP response.
pub const LINE_QUEUE: usize = 256;
/// How long after its time limit a node may take to report the kill before the
/// controller gives up on it (and closes its stream, which kills it too).
pub const TIMEOUT_GRACE: Duration = Duration::from_secs(5);
/// Exit code of a command killed at its time limit (as `timeout(1)`).
pub const EXIT_TIMED_OUT: i32 = 124;
/// Exit code of a command that did not run (refused, node unreachable).
pub const EXIT_NOT_RUN: i32 = 125;

mod terminal;

/// The exec routes: `POST /v1/exec` and `GET /v1/exec/terminal`.
pub fn routes() -> OpenApiRouter<Arc<ApiState>> {
    OpenApiRouter::new()
        .routes(routes!(exec))
        .routes(routes!(terminal::terminal))
}

/// Whether `labels` hold every pair of `selector`.
pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The summary of per-node results: 0 when every node returned 0, else the first
/// non-zero code in node name order, with the failed nodes.
pub fn summarize(nodes: usize, results: &BTreeMap<String, ExecExit>) -> ExecSummary {
    let failed: Vec<ExecExit> = results
        .values()
        .filter(|r| r.exit_code != 0)
        .cloned()
        .collect();
    ExecSummary {
        nodes,
        exit_code: failed.first().map_or(0, |f| f.exit_code),
        failed,
    }
}

/// Turns chunks of a byte stream into text without breaking characters cut between
/// two chunks; invalid bytes become U+FFFD.
#[derive(Debug, Default)]
pub struct Utf8Carry {
    pending: Vec<u8>,
}

impl Utf8Carry {
    /// The text of `data` after what was held back, holding back an incomplete
    /// character at the end (at most 3 bytes).
    pub fn push(&mut self, data: &[u8]) -> String {
        self.pending.extend_from_slice(data);
        let cut = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // An incomplete sequence at the very end waits for more bytes.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => {
                let tail = incomplete_tail(&self.pending);
                self.pending.len() - tail
            }
        };
        let rest = self.pending.split_off(cut);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        text
    }

    /// Whatever is held back, as text.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

/// How many bytes at the end of `bytes` start a UTF-8 character that is not complete.
fn incomplete_tail(bytes: &[u8]) -> usize {
    for back in 1..=3.min(bytes.len()) {
        let b = bytes[bytes.len() - back];
        if b & 0xC0 != 0x80 {
            let need = match b {
                0xC0..=0xDF => 2,
                0xE0..=0xEF => 3,
                0xF0..=0xF7 => 4,
                _ => 1,
            };
            return if need > back { back } else { 0 };
        }
    }
    0
}

#[utoipa::path(post, path = "/v1/exec", tag = "exec", request_body = ExecBody, responses((status = 200, description = "NDJSON, one ExecLine per line: started, output chunks as they come, one exit per node, then the summary; closing the response cancels the commands", content_type = "application/x-ndjson", body = ExecLine), (status = 400, description = "bad argv, target or time limit", content_type = "application/problem+json", body = ApiError), (status = 404, description = "unknown node or allocation, or no ready node matches the selector", content_type = "application/problem+json", body = ApiError), (status = 409, description = "the node is not connected", content_type = "application/problem+json", body = ApiError), (status = 415, description = "the body is not `application/json`", content_type = "application/problem+json", body = ApiError), (status = 422, description = "the JSON lacks a field or has one of the wrong type", content_type = "application/problem+json", body = ApiError), (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError), (status = 403, description = "the caller's role is too low (exec needs operator)", content_type = "application/problem+json", body = ApiError)))]
async fn exec(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    Json(body): Json<ExecBody>,
) -> Result<Response, Problem> {
    caller.require(Role::Operator)?;
    wire::check_argv(&body.argv).map_err(|e| Problem::bad_request(format!("argv: {e}")))?;
    if body.timeout_ms == Some(0) {
        return Err(Problem::bad_request(
            "timeout_ms: 0 is not a time limit; give at least 1 ms, or none for no limit",
        ));
    }
    let targets = targets(&st, &body)?;
    let actor = caller.0.to_string();
    info!(by = %actor, nodes = targets.len(), argv = ?body.argv, "exec");
    let (tx, rx) = mpsc::channel(LINE_QUEUE);
    let mut tasks = JoinSet::new();
    let nodes = targets.len();
    for (node, target) in targets {
        let audit = Audit {
            st: st.clone(),
            actor: actor.clone(),
            node: node.clone(),
            alloc: body.allocation.clone(),
            argv: body.argv.clone(),
            started: Instant::now(),
            exit: None,
        };
        tasks.spawn(run_on_node(audit, target, body.timeout_ms, tx.clone()));
    }
    drop(tx);
    let lines = Lines {
        rx,
        _tasks: tasks,
        nodes,
        results: BTreeMap::new(),
        finished: false,
    };
    let stream = futures_util::stream::unfold(lines, |mut lines| async move {
        let line = lines.next().await?;
        let mut bytes = serde_json::to_vec(&line).unwrap_or_default();
        bytes.push(b'\n');
        Some((Ok::<_, std::io::Error>(Bytes::from(bytes)), lines))
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(axum::body::Body::from_stream(stream))
        .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// The nodes to run on and what to send each.
fn targets(st: &ApiState, body: &ExecBody) -> Result<Vec<(String, ExecTarget)>, Problem> {
    let given = [
        body.node.is_some(),
        body.selector.is_some(),
        body.allocation.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(Problem::bad_request(
            "give exactly one of node, selector and allocation",
        ));
    }
    let now = Instant::now();
    let argv = body.argv.clone();
    if let Some(node) = &body.node {
        let view = st.registry.view(node, now).ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                format!("unknown node {node:?}; `novacron node list` shows the enrolled nodes"),
            )
        })?;
        if view.status != NodeStatus::Ready {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                format!(
                    "node {node} is {}; commands run only on ready (connected) nodes",
                    view.status
                ),
            ));
        }
        return Ok(vec![(node.clone(), ExecTarget::Host { argv })]);
    }
    if let Some(selector) = &body.selector {
        if selector.is_empty() {
            return Err(Problem::bad_request(
                "selector is empty; give at least one label, e.g. zone=a",
            ));
        }
        let mut nodes: Vec<String> = st
            .registry
            .views(now)
            .into_iter()
            .filter(|v| v.status == NodeStatus::Ready && selector_matches(selector, &v.labels))
            .map(|v| v.name)
            .collect();
        if nodes.is_empty() {
            return Err(Problem::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no ready node matches selector {}; `novacron node list` shows nodes and their labels",
                    selector_text(selector)
                ),
            ));
        }
        nodes.sort();
        return Ok(nodes
            .into_iter()
            .map(|n| (n, ExecTarget::Host { argv: argv.clone() }))
            .collect());
    }
    let id = body.allocation.clone().unwrap_or_default();
    let alloc = st.workloads.allocation(&id).map_err(|e| {
        Problem::new(
            StatusCode::NOT_FOUND,
            format!("{e}; `novacron alloc list` shows the allocations"),
        )
    })?;
    if st.registry.status(&alloc.node, now) != Some(NodeStatus::Ready) {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            format!(
                "node {} of allocation {id} is not connected; commands run only on ready nodes",
                alloc.node
            ),
        ));
    }
    Ok(vec![(
        alloc.node,
        ExecTarget::Allocation { alloc_id: id, argv },
    )])
}

/// The response's lines: what the node tasks send, then the summary.
struct Lines {
    rx: mpsc::Receiver<ExecLine>,
    /// Dropped with the response (client gone): aborts the node tasks, whose
    /// dropped streams cancel the commands.
    _tasks: JoinSet<()>,
    nodes: usize,
    results: BTreeMap<String, ExecExit>,
    finished: bool,
}

impl Lines {
    async fn next(&mut self) -> Option<ExecLine> {
        if self.finished {
            return None;
        }
        match self.rx.recv().await {
            Some(line) => {
                if let ExecLine::Exit(exit) = &line {
                    self.results.insert(exit.node.clone(), exit.clone());
                }
                Some(line)
            }
            None => {
                self.finished = true;
                Some(ExecLine::Summary(summarize(self.nodes, &self.results)))
            }
        }
    }
}

/// Runs the command on one node and forwards its events as lines.
async fn run_on_node(
    mut audit: Audit,
    target: ExecTarget,
    timeout_ms: Option<u64>,
    tx: mpsc::Sender<ExecLine>,
) {
    let node = audit.node.clone();
    let Some(exit) = drive(&audit.st, &node, target, timeout_ms, &tx, audit.started).await else {
        return; // the client went away; the audit records the cancellation
    };
    audit.exit = Some(exit.clone());
    let _ = tx.send(ExecLine::Exit(exit)).await;
    // Recorded before this task's sender goes: the summary (sent once every sender
    // is gone) comes after every node's event is in the log.
    drop(audit);
    drop(tx);
}

/// The command on `node` from request to exit; `None` when the client went away.
async fn drive(
    st: &ApiState,
    node: &str,
    target: ExecTarget,
    timeout_ms: Option<u64>,
    tx: &mpsc::Sender<ExecLine>,
    started: Instant,
) -> Option<ExecExit> {
    let exit = |exit_code: i32, error: Option<String>| ExecExit {
        node: node.to_owned(),
        exit_code,
        signal: None,
        timed_out: false,
        error,
        duration_ms: ms(started.elapsed()),
    };
    let request = ExecRequest {
        protocol_version: PROTOCOL_VERSION,
        request_id: rand::random(),
        target,
        timeout_ms,
    };
    let give_up_at = timeout_ms.map(|ms| {
        tokio::time::Instant::from_std(started) + Duration::from_millis(ms) + TIMEOUT_GRACE
    });
    let stalled = || {
        let mut e = exit(
            EXIT_TIMED_OUT,
            Some(format!(
                "node {node} did not end the command within its time limit; its stream was closed, which kills it"
            )),
        );
        e.timed_out = true;
        e
    };
    let opened = st.link.open_exec(node, &request);
    let opened = match give_up_at {
        Some(at) => match tokio::time::timeout_at(at, opened).await {
            Ok(r) => r,
            Err(_) => return Some(stalled()),
        },
        None => opened.await,
    };
    let mut channel = match opened {
        Ok(c) => c,
        Err(e) => return Some(exit(EXIT_NOT_RUN, Some(e.to_string()))),
    };
    debug!(node, request = request.request_id, "exec stream open");
    let mut stdout = Utf8Carry::default();
    let mut stderr = Utf8Carry::default();
    loop {
        let next = match give_up_at {
            Some(at) => match tokio::time::timeout_at(at, channel.next()).await {
                Ok(r) => r,
                Err(_) => return Some(stalled()),
            },
            None => channel.next().await,
        };
        let line = match next {
            Ok(Some(ExecEvent::Started { pid })) => ExecLine::Started {
                node: node.to_owned(),
                pid,
            },
            Ok(Some(ExecEvent::Output { stream, data })) => {
                let carry = match stream {
                    ExecStream::Stdout => &mut stdout,
                    ExecStream::Stderr => &mut stderr,
                };
                let data = carry.push(&data);
                if data.is_empty() {
                    continue;
                }
                ExecLine::Output {
                    node: node.to_owned(),
                    stream,
                    data,
                }
            }
            Ok(Some(ExecEvent::Exited {
                code,
                signal,
                timed_out,
            })) => {
                for (stream, carry) in [
                    (ExecStream::Stdout, &mut stdout),
                    (ExecStream::Stderr, &mut stderr),
                ] {
                    let data = carry.finish();
                    if !data.is_empty() {
                        let line = ExecLine::Output {
                            node: node.to_owned(),
                            stream,
                            data,
                        };
                        tx.send(line).await.ok()?;
                    }
                }
                let mut e = exit(code, None);
                e.signal = signal;
                if timed_out {
                    e.exit_code = EXIT_TIMED_OUT;
                    e.timed_out = true;
                    e.error = Some(format!(
                        "timed out after {} on node {node}; the command was killed",
                        humantime::format_duration(Duration::from_millis(
                            timeout_ms.unwrap_or_default()
                        ))
                    ));
                }
                return Some(e);
            }
            Ok(Some(ExecEvent::Refused { reason })) => {
                return Some(exit(EXIT_NOT_RUN, Some(reason)));
            }
            Ok(Some(ExecEvent::Failed { reason, code })) => return Some(exit(code, Some(reason))),
            Ok(None) => {
                return Some(exit(
                    EXIT_NOT_RUN,
                    Some(format!(
                        "node {node} ended the command without an exit code"
                    )),
                ));
            }
            Err(e) => return Some(exit(EXIT_NOT_RUN, Some(format!("node {node}: {e}")))),
        };
        tx.send(line).await.ok()?;
    }
}

/// Records the command on one node as an event when it is dropped: with its exit
/// when it finished, as cancelled when the client went away first.
struct Audit {
    st: Arc<ApiState>,
    actor: String,
    node: String,
    alloc: Option<String>,
    argv: Vec<String>,
    started: Instant,
    exit: Option<ExecExit>,
}

impl Drop for Audit {
    fn drop(&mut self) {
        let duration_ms = self
            .exit
            .as_ref()
            .map_or_else(|| ms(self.started.elapsed()), |e| e.duration_ms);
        let command = shell_words(&self.argv);
        let place = match &self.alloc {
            Some(id) => format!("allocation {id} on node {}", self.node),
            None => format!("node {}", self.node),
        };
        let (message, exit_code, outcome) = match &self.exit {
            None => (
                format!("{command} on {place} was cancelled by the client"),
                None,
                "cancelled",
            ),
            Some(e) if e.timed_out => (
                format!("{command} on {place} timed out and was killed"),
                Some(e.exit_code),
                "timed_out",
            ),
            Some(ExecExit {
                error: Some(error),
                exit_code,
                ..
            }) => (
                format!("{command} on {place} did not run: {error}"),
                Some(*exit_code),
                "not_run",
            ),
            Some(e) => (
                format!("{command} on {place} exited with {}", e.exit_code),
                Some(e.exit_code),
                "exited",
            ),
        };
        let mut event = NewEvent::new(kind::EXEC, self.actor.clone(), message)
            .node(self.node.clone())
            .detail(
                "argv",
                serde_json::to_string(&self.argv).unwrap_or_default(),
            )
            .detail("duration_ms", duration_ms)
            .detail("outcome", outcome);
        if let Some(code) = exit_code {
            event = event.detail("exit_code", code);
        }
        if let Some(id) = &self.alloc {
            event = event.alloc(id.clone());
        }
        self.st.events.note(event);
    }
}

/// `argv` as a shell would show it, quoting what needs it (for messages only).
fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn every_selector_pair_must_match() {
        let labels = map(&[("zone", "a"), ("pool", "gpu")]);
        assert!(selector_matches(&map(&[("zone", "a")]), &labels));
        assert!(selector_matches(
            &map(&[("zone", "a"), ("pool", "gpu")]),
            &labels
        ));
        assert!(!selector_matches(&map(&[("zone", "b")]), &labels));
        assert!(!selector_matches(
            &map(&[("zone", "a"), ("region", "eu")]),
            &labels
        ));
        assert!(selector_matches(&map(&[]), &labels), "empty matches all");
        assert_eq!(
            selector_text(&map(&[("zone", "a"), ("pool", "x")])),
            "pool=x,zone=a"
        );
    }

    fn exit(node: &str, code: i32) -> ExecExit {
        ExecExit {
            node: node.into(),
            exit_code: code,
            signal: None,
            timed_out: false,
            error: None,
            duration_ms: 1,
        }
    }

    #[test]
    fn the_summary_takes_the_first_failure_in_name_order() {
        let mut results = BTreeMap::new();
        for (n, c) in [("n3", 2), ("n1", 0), ("n2", 7)] {
            results.insert(n.to_string(), exit(n, c));
        }
        let s = summarize(3, &results);
        assert_eq!(s.exit_code, 7);
        assert_eq!(
            s.failed.iter().map(|f| f.node.as_str()).collect::<Vec<_>>(),
            ["n2", "n3"]
        );
        results.retain(|n, _| n == "n1");
        let s = summarize(1, &results);
        assert_eq!((s.exit_code, s.failed.len()), (0, 0));
    }

    #[test]
    fn utf8_cut_between_chunks_is_kept_whole() {
        let text = "héllo ✓ 🚀 end";
        let bytes = text.as_bytes();
        for cut in 0..=bytes.len() {
            let mut carry = Utf8Carry::default();
            let mut out = carry.push(&bytes[..cut]);
            out.push_str(&carry.push(&bytes[cut..]));
            out.push_str(&carry.finish());
            assert_eq!(out, text, "cut at {cut}");
        }
    }

    #[test]
    fn invalid_bytes_are_replaced_not_held() {
        let mut carry = Utf8Carry::default();
        assert_eq!(carry.push(b"a\xFFb"), "a\u{FFFD}b");
        assert_eq!(carry.push(b"x\xE2\x9C"), "x");
        assert_eq!(carry.finish(), "\u{FFFD}");
        assert_eq!(carry.push(b"\xFF\xE2"), "\u{FFFD}");
        assert_eq!(carry.push(b"\x9C\x93"), "✓");
    }

    #[test]
    fn commands_are_quoted_for_messages() {
        let argv: Vec<String> = ["sh", "-c", "echo it's; exit 7"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(shell_words(&argv), r"sh -c 'echo it'\''s; exit 7'");
    }
}

//! Interactive exec: `GET /v1/exec/terminal` upgrades to a WebSocket that carries
//! one command's input, output, terminal size and exit status
//! ([`novacron_api::terminal`] names the channels), between the CLI
//! (`novacron exec -it`) and the agent's interactive exec stream
//! ([`Agents::open_terminal`]).
//!
//! The command is checked, its node resolved and the agent's stream opened before
//! the upgrade, so a bad request, an unknown target or an agent too old for it
//! gets an HTTP problem. After the upgrade, each direction is bounded: the client's
//! messages are read only as fast as the agent's stream takes them, and the
//! agent's output only as fast as the client reads it. The client going away
//! (closing the socket or the connection) cancels the command; the command's end
//! sends the [`STATUS`] message and closes the socket, also when the agent
//! stopped taking input first (a command that exits without reading it all).
//! Every command is recorded as an exec event, as plain exec's are.
//!
//! [`Agents::open_terminal`]: crate::services::agents::Agents::open_terminal
//! [`STATUS`]: novacron_api::terminal::STATUS

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{
    Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
};
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use novacron_api::terminal::{self as channel, TerminalQuery};
use novacron_api::{ApiError, ExecBody, ExecExit};
use novacron_common::pki::Role;
use novacron_common::wire::{
    self, ExecEvent, ExecStream, MAX_EXEC_CHUNK, PROTOCOL_VERSION, TerminalInput, TerminalRequest,
    TerminalSize,
};
use tracing::{debug, info};

use super::{Audit, EXIT_NOT_RUN, EXIT_TIMED_OUT, ms, targets};
use crate::http::api::{ApiState, Caller, Problem};
use crate::services::agents::{ExecChannel, ExecOpenError, TerminalWriter};

/// How long a client has to answer the socket's Close after the status.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

#[utoipa::path(get, path = "/v1/exec/terminal", tag = "exec",
    params(
        ("node" = Option<String>, Query, description = "run on this node's host (its agent must allow host exec)"),
        ("allocation" = Option<String>, Query, description = "run in this allocation's container"),
        ("command" = Vec<String>, Query, description = "the program, then one parameter per argument (no shell)"),
        ("tty" = Option<bool>, Query, description = "run on a pseudo-terminal (all output then comes on the stdout channel)"),
        ("cols" = Option<u16>, Query, description = "the terminal's columns (default 80)"),
        ("rows" = Option<u16>, Query, description = "the terminal's rows (default 24)"),
        ("timeout_ms" = Option<u64>, Query, description = "kill the command after this many milliseconds"),
    ),
    responses(
        (status = 101, description = "switched to a WebSocket (subprotocol `v1.terminal.novacron`): binary messages whose first byte is the channel, 0 stdin and 4 resize (JSON `{cols, rows}`) from the client, 255 then 0 when the client's input ends, 1 stdout and 2 stderr from the server, and last 3, the exit status (JSON ExecExit)"),
        (status = 400, description = "bad parameters or command, or not a WebSocket upgrade", content_type = "application/problem+json", body = ApiError),
        (status = 401, description = "no or unknown credentials", content_type = "application/problem+json", body = ApiError),
        (status = 403, description = "the caller's role is too low (exec needs operator)", content_type = "application/problem+json", body = ApiError),
        (status = 404, description = "unknown node or allocation", content_type = "application/problem+json", body = ApiError),
        (status = 409, description = "the node is not connected, or its agent is too old for interactive exec", content_type = "application/problem+json", body = ApiError),
        (status = 502, description = "the node's link failed while the command was sent", content_type = "application/problem+json", body = ApiError),
    ))]
pub(super) async fn terminal(
    State(st): State<Arc<ApiState>>,
    caller: Caller,
    RawQuery(query): RawQuery,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, Problem> {
    caller.require(Role::Operator)?;
    let query = TerminalQuery::parse(query.as_deref().unwrap_or(""))
        .map_err(|e| Problem::bad_request(format!("query: {e}")))?;
    wire::check_argv(&query.command).map_err(|e| Problem::bad_request(format!("command: {e}")))?;
    let upgrade = upgrade.map_err(|e| {
        Problem::bad_request(format!(
            "this route speaks WebSocket only ({e}); `novacron exec -it` uses it"
        ))
    })?;
    let timeout_ms = query.timeout.map(ms);
    let body = ExecBody {
        node: query.node.clone(),
        allocation: query.allocation.clone(),
        argv: query.command.clone(),
        timeout_ms,
        ..ExecBody::default()
    };
    let Some((node, target)) = targets(&st, &body)?.into_iter().next() else {
        return Err(Problem::bad_request("no target"));
    };
    let request = TerminalRequest {
        protocol_version: PROTOCOL_VERSION,
        request_id: rand::random(),
        target,
        tty: query.tty,
        timeout_ms,
    };
    let mut channel = st
        .link
        .open_terminal(&node, &request)
        .await
        .map_err(|e| match e {
            ExecOpenError::Lost { .. } => Problem::new(StatusCode::BAD_GATEWAY, e.to_string()),
            ExecOpenError::NotConnected(_) | ExecOpenError::TooOld { .. } => {
                Problem::new(StatusCode::CONFLICT, e.to_string())
            }
        })?;
    let input = channel.take_input().ok_or_else(|| {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the stream has no input side",
        )
    })?;
    let actor = caller.0.to_string();
    info!(by = %actor, %node, argv = ?query.command, tty = query.tty.is_some(), "interactive exec");
    let audit = Audit {
        st: st.clone(),
        actor,
        node: node.clone(),
        alloc: query.allocation.clone(),
        argv: query.command.clone(),
        started: Instant::now(),
        exit: None,
    };
    Ok(upgrade
        .protocols([channel::SUBPROTOCOL])
        .max_message_size(channel::MAX_MESSAGE)
        .max_frame_size(channel::MAX_MESSAGE)
        .on_upgrade(move |socket| bridge(socket, channel, input, audit)))
}

/// Carries one command between the client's socket and the agent's stream until
/// the command ends (the status goes out, the socket closes) or the client goes
/// (the command is cancelled).
async fn bridge(
    socket: WebSocket,
    mut channel: ExecChannel,
    input: TerminalWriter,
    mut audit: Audit,
) {
    let (mut to_client, mut from_client) = socket.split();
    let node = audit.node.clone();
    let started = audit.started;
    let outputs = async {
        let exit = relay_events(&mut channel, &mut to_client, &node, started).await;
        if let Some(exit) = &exit {
            let mut status = vec![channel::STATUS];
            status.extend(serde_json::to_vec(exit).unwrap_or_default());
            let _ = to_client.send(Message::Binary(status.into())).await;
            let _ = to_client.close().await;
        }
        exit
    };
    let ended = tokio::select! {
        exit = outputs => Some(exit),
        () = relay_input(&mut from_client, input) => None,
    };
    match ended {
        Some(exit) => {
            debug!(%node, ?exit, "interactive exec ended");
            audit.exit = exit;
            // The socket's closing handshake: what the client sent meanwhile is
            // read (and dropped) up to its Close. Dropping the connection with
            // input unread would reset it, and a reset can discard the status
            // before the client has read it.
            if tokio::time::timeout(CLOSE_WAIT, until_closed(&mut from_client))
                .await
                .is_err()
            {
                debug!(%node, "the client did not close the socket in time");
            }
        }
        None => debug!(%node, "the client left; the interactive exec is cancelled"),
    }
}

/// Reads the client's messages until its Close (or the connection's end).
async fn until_closed<S>(from_client: &mut S)
where
    S: futures_util::Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    while let Some(Ok(message)) = from_client.next().await {
        if matches!(message, Message::Close(_)) {
            return;
        }
    }
}

/// Sends the agent's events to the client until the last one; `None` when the
/// client stopped taking them.
async fn relay_events<S>(
    channel: &mut ExecChannel,
    to_client: &mut S,
    node: &str,
    started: Instant,
) -> Option<ExecExit>
where
    S: futures_util::Sink<Message> + Unpin,
{
    let exit = |exit_code: i32, error: Option<String>| ExecExit {
        node: node.to_owned(),
        exit_code,
        signal: None,
        timed_out: false,
        error,
        duration_ms: ms(started.elapsed()),
    };
    loop {
        match channel.next().await {
            Ok(Some(ExecEvent::Started { .. })) => {}
            Ok(Some(ExecEvent::Output { stream, data })) => {
                let mut message = Vec::with_capacity(data.len() + 1);
                message.push(match stream {
                    ExecStream::Stdout => channel::STDOUT,
                    ExecStream::Stderr => channel::STDERR,
                });
                message.extend_from_slice(&data);
                to_client.send(Message::Binary(message.into())).await.ok()?;
            }
            Ok(Some(ExecEvent::Exited {
                code,
                signal,
                timed_out,
            })) => {
                let mut e = exit(code, None);
                e.signal = signal;
                if timed_out {
                    e.exit_code = EXIT_TIMED_OUT;
                    e.timed_out = true;
                    e.error = Some(format!("timed out on node {node}; the command was killed"));
                }
                return Some(e);
            }
            Ok(Some(ExecEvent::Refused { reason })) => {
                return Some(exit(EXIT_NOT_RUN, Some(reason)));
            }
            Ok(Some(ExecEvent::Failed { reason, code })) => return Some(exit(code, Some(reason))),
            Ok(None) => {
                let why = format!("node {node} ended the command without an exit code");
                return Some(exit(EXIT_NOT_RUN, Some(why)));
            }
            Err(e) => return Some(exit(EXIT_NOT_RUN, Some(format!("node {node}: {e}")))),
        }
    }
}

/// Sends the client's input to the agent; resolves only when the client goes
/// away (closes or breaks the socket). When the agent stops taking input (the
/// command ended, or its stream failed), later input is dropped and the client
/// still waits for the status, which [`relay_events`] brings: a command that
/// exits without reading all its input is no reason to cut the client off.
async fn relay_input<S>(mut from_client: S, input: TerminalWriter)
where
    S: futures_util::Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    let mut input = Some(input);
    while let Some(Ok(message)) = from_client.next().await {
        let data = match message {
            Message::Binary(data) => data,
            Message::Close(_) => return,
            _ => continue,
        };
        let frames: Vec<TerminalInput> = match data.split_first() {
            Some((&channel::STDIN, rest)) => rest
                .chunks(MAX_EXEC_CHUNK)
                .map(|c| TerminalInput::Stdin(c.to_vec()))
                .collect(),
            Some((&channel::RESIZE, rest)) => match serde_json::from_slice::<TerminalSize>(rest) {
                Ok(size) => vec![TerminalInput::Resize(size.bounded())],
                Err(e) => {
                    debug!(error = %e, "ignoring a bad resize message");
                    continue;
                }
            },
            Some((&channel::CLOSE, [channel::STDIN])) => vec![TerminalInput::EndOfInput],
            _ => continue,
        };
        for frame in &frames {
            let Some(writer) = input.as_mut() else {
                break;
            };
            if let Err(e) = writer.send(frame).await {
                debug!(error = %e, "the agent takes no more input; waiting for the command's status");
                input = None;
            }
        }
    }
}

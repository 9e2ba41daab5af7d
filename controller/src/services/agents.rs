//! The connected agents as the rest of the controller sees them: each node's live
//! QUIC connection and command channel, and the log streams waiting for an agent.
//! The agent link (the `link` module, an adapter above this layer) fills it in as
//! agents connect and leave; handlers and services use it to reach a node (logs,
//! remote exec, checkpoints) and to close the connections of a revoked certificate.

use std::collections::HashMap;
use std::sync::Mutex;

use novacron_common::pki::Serial;
use novacron_common::sync::lock;
use novacron_common::wire::{
    self, CloseCode, ControllerMessage, ExecEvent, ExecRequest, FrameError, LogChunk,
    TerminalInput, TerminalRequest,
};
use quinn::{RecvStream, SendStream};
use rustls_pki_types::CertificateDer;
use tokio::sync::mpsc;
use tracing::warn;

/// Sends a command to one connected agent (boxed: see `link::control_loop`).
pub type CommandSender = mpsc::Sender<Box<ControllerMessage>>;

/// The connected agents.
#[derive(Debug, Default)]
pub struct Agents {
    /// Per-node channels for commands to the agent (log requests), by node name.
    pub commands: Mutex<HashMap<String, (u64, CommandSender)>>,
    /// Log streams waiting for their agent, by request id.
    pub pending_logs: Mutex<HashMap<u64, mpsc::Sender<LogChunk>>>,
    /// Each connected node's live connection (with its connection id), on which
    /// remote exec and migrations open their streams.
    pub connections: Mutex<HashMap<String, (u64, quinn::Connection)>>,
    /// The wire protocol version negotiated on each node's live connection (with
    /// its connection id); the streams opened to the node use it.
    pub versions: Mutex<HashMap<String, (u64, u16)>>,
}

/// Why a remote command could not be sent to a node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExecOpenError {
    /// The node has no live connection.
    #[error("node {0} is not connected; `novacron node list` shows which nodes are ready")]
    NotConnected(String),
    /// The connection failed while opening the stream or sending the request.
    #[error("cannot send the command to node {node}: {reason}")]
    Lost {
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
    /// The node's agent speaks a protocol without interactive exec.
    #[error(
        "node {node}'s agent speaks protocol version {version}, which has no interactive exec (-i/-t; since version {since}); upgrade the agent, or run the command without -i and -t",
        since = wire::TERMINAL_SINCE
    )]
    TooOld {
        /// The node.
        node: String,
        /// The protocol version of its connection.
        version: u16,
    },
}

impl Agents {
    /// Closes the live connections whose node certificate has `serial` (which the
    /// caller has already put in the link's list of revoked serials); returns their
    /// nodes.
    pub fn close_revoked(&self, serial: &Serial) -> Vec<String> {
        let connections: Vec<(String, quinn::Connection)> = lock(&self.connections)
            .iter()
            .map(|(name, (_, conn))| (name.clone(), conn.clone()))
            .collect();
        let mut closed = Vec::new();
        for (name, conn) in connections {
            if peer_serial(&conn).as_ref() == Some(serial) {
                warn!(node = %name, %serial, "closing the connection of a revoked certificate");
                close(&conn, CloseCode::Revoked, "this certificate was revoked");
                closed.push(name);
            }
        }
        closed
    }

    /// The wire protocol version of `node`'s live connection (the newest this
    /// build speaks when it is not connected: opening a stream fails then anyway).
    pub fn protocol_version(&self, node: &str) -> u16 {
        lock(&self.versions)
            .get(node)
            .map_or(wire::PROTOCOL_VERSION, |(_, v)| *v)
    }

    /// The live connection of `node`, if it is connected.
    pub fn connection(&self, node: &str) -> Option<quinn::Connection> {
        lock(&self.connections).get(node).map(|(_, c)| c.clone())
    }

    /// Opens an exec stream to `node` and sends `request`. The command runs until
    /// it exits, its time limit passes, or the returned channel is dropped (which
    /// cancels it: the agent kills it).
    pub async fn open_exec(
        &self,
        node: &str,
        request: &ExecRequest,
    ) -> Result<ExecChannel, ExecOpenError> {
        // The request speaks the connection's negotiated protocol version.
        let request = ExecRequest {
            protocol_version: self.protocol_version(node),
            ..request.clone()
        };
        self.open_stream(node, &wire::BiRequest::Exec(request))
            .await
    }

    /// Opens an interactive exec stream to `node` and sends `request`; the
    /// channel's [`ExecChannel::take_input`] sends the command's input. Refused
    /// when the node's agent is older than [`wire::TERMINAL_SINCE`].
    pub async fn open_terminal(
        &self,
        node: &str,
        request: &TerminalRequest,
    ) -> Result<ExecChannel, ExecOpenError> {
        let version = self.protocol_version(node);
        if version < wire::TERMINAL_SINCE {
            return Err(ExecOpenError::TooOld {
                node: node.to_owned(),
                version,
            });
        }
        let request = TerminalRequest {
            protocol_version: version,
            ..request.clone()
        };
        self.open_stream(node, &wire::BiRequest::Terminal(request))
            .await
    }

    async fn open_stream(
        &self,
        node: &str,
        request: &wire::BiRequest,
    ) -> Result<ExecChannel, ExecOpenError> {
        let conn = lock(&self.connections)
            .get(node)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| ExecOpenError::NotConnected(node.to_owned()))?;
        let lost = |reason: String| ExecOpenError::Lost {
            node: node.to_owned(),
            reason,
        };
        // Waits while the node runs its maximum of concurrent commands.
        let (mut send, recv) = conn.open_bi().await.map_err(|e| lost(e.to_string()))?;
        wire::write_frame(&mut send, request)
            .await
            .map_err(|e| lost(e.to_string()))?;
        Ok(ExecChannel {
            send: Some(send),
            recv,
            scratch: Vec::new(),
            done: false,
        })
    }
}

/// The input side of an interactive exec stream. Dropping it cancels the command
/// (as dropping its [`ExecChannel`] does).
#[derive(Debug)]
pub struct TerminalWriter {
    send: SendStream,
}

impl TerminalWriter {
    /// Sends one input frame (stdin chunks of at most [`wire::MAX_EXEC_CHUNK`]).
    pub async fn send(&mut self, input: &TerminalInput) -> Result<(), ExecStreamError> {
        wire::write_frame(&mut self.send, input)
            .await
            .map_err(|e| ExecStreamError::Lost(e.to_string()))
    }
}

impl Drop for TerminalWriter {
    fn drop(&mut self) {
        let _ = self.send.reset(CloseCode::Normal.code().into());
    }
}

/// The controller's end of one exec stream. Dropping it before the command ended
/// cancels the command.
#[derive(Debug)]
pub struct ExecChannel {
    /// `None` once [`ExecChannel::take_input`] took it.
    send: Option<SendStream>,
    recv: RecvStream,
    scratch: Vec<u8>,
    done: bool,
}

/// Why an exec stream ended without a last event.
#[derive(Debug, thiserror::Error)]
pub enum ExecStreamError {
    /// The agent sent something the protocol does not allow; the stream is reset.
    #[error("node sent a bad exec frame: {0}")]
    Protocol(String),
    /// The stream or connection ended.
    #[error("the node's link closed during the command: {0}")]
    Lost(String),
}

impl ExecChannel {
    /// The next event; `Ok(None)` after the last one (`Exited`, `Refused`,
    /// `Failed`). Frames are checked: an oversized output chunk, a second `Started`
    /// or anything after the last event is a protocol error, which resets the
    /// stream (and so cancels the command). Not cancel-safe: a caller that stops
    /// waiting must drop the channel.
    pub async fn next(&mut self) -> Result<Option<ExecEvent>, ExecStreamError> {
        if self.done {
            return Ok(None);
        }
        let event = match wire::read_frame::<ExecEvent, _>(&mut self.recv, &mut self.scratch).await
        {
            Ok(Some(event)) => event,
            Ok(None) => {
                return Err(ExecStreamError::Lost(
                    "the stream ended before the command's exit".into(),
                ));
            }
            Err(FrameError::Io(e)) => return Err(ExecStreamError::Lost(e.to_string())),
            Err(e) => return Err(self.violation(e.close_code(), e.to_string())),
        };
        match &event {
            ExecEvent::Output { data, .. } if data.len() > wire::MAX_EXEC_CHUNK => {
                let reason = format!(
                    "an output chunk of {} bytes exceeds the maximum of {}",
                    data.len(),
                    wire::MAX_EXEC_CHUNK
                );
                return Err(self.violation(CloseCode::Unexpected, reason));
            }
            ExecEvent::Exited { .. } | ExecEvent::Refused { .. } | ExecEvent::Failed { .. } => {
                self.done = true;
            }
            ExecEvent::Started { .. } | ExecEvent::Output { .. } => {}
        }
        Ok(Some(event))
    }

    /// The stream's input side, to send [`TerminalInput`] on while this channel
    /// reads the events (once; `None` after).
    pub fn take_input(&mut self) -> Option<TerminalWriter> {
        self.send.take().map(|send| TerminalWriter { send })
    }

    fn violation(&mut self, code: CloseCode, reason: String) -> ExecStreamError {
        if let Some(send) = &mut self.send {
            let _ = send.reset(code.code().into());
        }
        let _ = self.recv.stop(code.code().into());
        self.done = true;
        ExecStreamError::Protocol(reason)
    }
}

impl Drop for ExecChannel {
    fn drop(&mut self) {
        // Ending our side is the cancel signal (harmless after the command ended).
        if let Some(send) = &mut self.send {
            let _ = send.reset(CloseCode::Normal.code().into());
        }
        let _ = self.recv.stop(CloseCode::Normal.code().into());
    }
}

/// Closes `conn` with `code` and a short `reason`.
pub fn close(conn: &quinn::Connection, code: CloseCode, reason: &str) {
    // Close reasons must fit in a packet; keep them short.
    let reason: String = reason.chars().take(200).collect();
    conn.close(code.code().into(), reason.as_bytes());
}

/// The serial of the certificate `conn`'s peer presented.
pub fn peer_serial(conn: &quinn::Connection) -> Option<Serial> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    Serial::of_cert_der(certs.first()?).ok()
}

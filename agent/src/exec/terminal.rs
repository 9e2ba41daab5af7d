//! Interactive remote exec (`novacron exec -it`, `novacron alloc exec -it`): the
//! command's standard input is attached, on a pseudo-terminal or on pipes.
//!
//! The controller opens a bi-stream with a [`TerminalRequest`], then sends
//! [`TerminalInput`] frames (input bytes, resizes, end of input); the agent answers
//! with the [`ExecEvent`]s of a plain exec. On a terminal the command leads a new
//! session on a fresh pseudo-terminal (host) or runs on Docker's exec TTY
//! (container), and all its output comes back as standard output, as a terminal
//! merges it. As for plain exec, the controller ending its side cancels the
//! command, and output is read only as fast as the stream takes it. Input frames
//! wait in a queue of [`INPUT_QUEUE`] while the command does not read them; when
//! it is full, the stream is not read until the command takes some.

use std::pin::{Pin, pin};

use novacron_common::wire::{
    self, ExecEvent, ExecTarget, MAX_EXEC_CHUNK, TerminalInput, TerminalRequest, TerminalSize,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::{Duration, Instant};
use tracing::{debug, info};

use super::{BoxedReader, Events, ExecService, StreamEnd, reader};
use crate::runtime::ContainerRuntime;

/// Input frames held while the command does not read its input.
pub const INPUT_QUEUE: usize = 64;
/// The byte a terminal reads as end-of-file at the start of a line (`VEOF`, ^D).
const EOF_CHAR: u8 = 0x04;

impl<R: ContainerRuntime + Clone> ExecService<R> {
    /// Serves one interactive exec stream whose request has been read.
    pub async fn serve_terminal<W, Rd>(
        &self,
        send: &mut W,
        recv: Rd,
        request: TerminalRequest,
    ) -> Result<(), StreamEnd>
    where
        W: AsyncWrite + Unpin + Send,
        Rd: AsyncRead + Unpin + Send,
    {
        let mut out = Events { send };
        if let Some(reason) = self.refusal(request.protocol_version, request.target.argv()) {
            return out.send(&ExecEvent::Refused { reason }).await;
        }
        let tty = request.tty.map(TerminalSize::bounded);
        let deadline = request
            .timeout_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        let id = request.request_id;
        match &request.target {
            ExecTarget::Host { argv } => {
                if let Err(reason) = self.policy.check(&self.node, argv) {
                    info!(request = id, ?argv, %reason, "interactive host exec refused");
                    return out.send(&ExecEvent::Refused { reason }).await;
                }
                info!(
                    request = id,
                    ?argv,
                    tty = tty.is_some(),
                    "interactive host exec"
                );
                let spawned: std::io::Result<Spawned<R>> = match tty {
                    Some(size) => spawn_on_terminal(argv, size),
                    None => spawn_on_pipes(argv),
                };
                let (child, input, outputs) = match spawned {
                    Ok(s) => s,
                    Err(e) => return out.send(&self.spawn_failure(argv, &e)).await,
                };
                let fed = pin!(feed(recv, input));
                self.drive_host(&mut out, child, outputs, deadline, fed)
                    .await
            }
            ExecTarget::Allocation { alloc_id, argv } => {
                let container = match self.supervisor.exec_container(alloc_id).await {
                    Ok(c) => c,
                    Err(reason) => {
                        info!(request = id, alloc = %alloc_id, %reason, "interactive container exec refused");
                        return out.send(&ExecEvent::Refused { reason }).await;
                    }
                };
                info!(request = id, alloc = %alloc_id, ?argv, tty = tty.is_some(), "interactive container exec");
                let runtime = self.supervisor.runtime();
                let session = match runtime.exec_interactive(&container, argv, tty).await {
                    Ok(s) => s,
                    Err(e) => {
                        let reason =
                            format!("cannot run {:?} in container {container}: {e}", argv[0]);
                        return out.send(&ExecEvent::Failed { reason, code: 125 }).await;
                    }
                };
                let input = Input::Container {
                    input: Some(session.input),
                    runtime: runtime.clone(),
                    exec_id: session.id.clone(),
                    tty: tty.is_some(),
                };
                let fed = pin!(feed(recv, input));
                self.drive_container(
                    &mut out,
                    &container,
                    &session.id,
                    session.output,
                    deadline,
                    fed,
                )
                .await
            }
        }
    }
}

/// A started host command, where its input goes and its outputs.
type Spawned<R> = (tokio::process::Child, Input<R>, [Option<BoxedReader>; 2]);

/// Starts `argv` as the session leader of a new pseudo-terminal of `size`.
fn spawn_on_terminal<R>(argv: &[String], size: TerminalSize) -> std::io::Result<Spawned<R>> {
    let io = |e: pty_process::Error| match e {
        pty_process::Error::Io(e) => e,
        other => std::io::Error::other(other.to_string()),
    };
    let (pty, pts) = pty_process::open().map_err(io)?;
    pty.resize(pty_process::Size::new(size.rows, size.cols))
        .map_err(io)?;
    let child = pty_process::Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir("/")
        .env("TERM", "xterm")
        .kill_on_drop(true)
        .spawn(pts)
        .map_err(io)?;
    let (read, write) = pty.into_split();
    Ok((child, Input::Terminal(write), [reader(Some(read)), None]))
}

/// Starts `argv` in its own process group with piped input and outputs.
fn spawn_on_pipes<R>(argv: &[String]) -> std::io::Result<Spawned<R>> {
    use std::process::Stdio;
    let mut child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let input = Input::Pipe(child.stdin.take());
    let outputs = [reader(child.stdout.take()), reader(child.stderr.take())];
    Ok((child, input, outputs))
}

/// Where a command's input goes.
enum Input<R> {
    /// The master side of a host command's pseudo-terminal.
    Terminal(pty_process::OwnedWritePty),
    /// A host command's input pipe (`None` once closed).
    Pipe(Option<tokio::process::ChildStdin>),
    /// A container command's attached input.
    Container {
        input: Option<Pin<Box<dyn AsyncWrite + Send>>>,
        runtime: R,
        exec_id: String,
        tty: bool,
    },
}

impl<R: ContainerRuntime> Input<R> {
    /// Applies one input frame. A command that closed its input (or ended) makes
    /// later input go nowhere, which is not an error of the stream.
    async fn apply(&mut self, frame: TerminalInput) {
        match (self, frame) {
            (Input::Terminal(pty), TerminalInput::Stdin(data)) => {
                let _ = pty.write_all(&data).await;
            }
            (Input::Terminal(pty), TerminalInput::Resize(size)) => {
                let size = size.bounded();
                if let Err(error) = pty.resize(pty_process::Size::new(size.rows, size.cols)) {
                    debug!(%error, "cannot resize an exec terminal");
                }
            }
            (Input::Terminal(pty), TerminalInput::EndOfInput) => {
                let _ = pty.write_all(&[EOF_CHAR]).await;
            }
            (Input::Pipe(pipe), TerminalInput::Stdin(data)) => {
                if let Some(p) = pipe
                    && p.write_all(&data).await.is_err()
                {
                    *pipe = None;
                }
            }
            (Input::Pipe(pipe), TerminalInput::EndOfInput) => *pipe = None,
            (Input::Pipe(_), TerminalInput::Resize(_)) => {}
            (Input::Container { input, .. }, TerminalInput::Stdin(data)) => {
                if let Some(w) = input {
                    let written = async {
                        w.write_all(&data).await?;
                        w.flush().await
                    };
                    if written.await.is_err() {
                        *input = None;
                    }
                }
            }
            (Input::Container { input, tty, .. }, TerminalInput::EndOfInput) => {
                if *tty {
                    if let Some(w) = input {
                        let _ = w.write_all(&[EOF_CHAR]).await;
                        let _ = w.flush().await;
                    }
                } else if let Some(mut w) = input.take() {
                    let _ = w.shutdown().await;
                }
            }
            (
                Input::Container {
                    runtime,
                    exec_id,
                    tty,
                    ..
                },
                TerminalInput::Resize(size),
            ) => {
                if *tty && let Err(error) = runtime.exec_resize(exec_id, size).await {
                    debug!(%error, "cannot resize a container exec terminal");
                }
            }
        }
    }
}

/// Reads the controller's input frames from `recv` and applies them to `input`
/// in order; resolves only when the stream ends or breaks the protocol (which
/// cancels the command).
async fn feed<R, Rd>(mut recv: Rd, mut input: Input<R>) -> StreamEnd
where
    R: ContainerRuntime,
    Rd: AsyncRead + Unpin + Send,
{
    let (tx, mut rx) = mpsc::channel::<TerminalInput>(INPUT_QUEUE);
    let read = async {
        let mut scratch = Vec::new();
        loop {
            let frame = match wire::read_frame::<TerminalInput, _>(&mut recv, &mut scratch).await {
                Ok(Some(frame)) => frame,
                Ok(None) => return StreamEnd::Gone,
                Err(e) => return e.into(),
            };
            if let TerminalInput::Stdin(data) = &frame
                && data.len() > MAX_EXEC_CHUNK
            {
                return StreamEnd::Protocol(
                    wire::CloseCode::Unexpected,
                    format!(
                        "an input chunk of {} bytes exceeds the maximum of {MAX_EXEC_CHUNK}",
                        data.len()
                    ),
                );
            }
            if tx.send(frame).await.is_err() {
                return StreamEnd::Gone;
            }
        }
    };
    let write = async {
        while let Some(frame) = rx.recv().await {
            input.apply(frame).await;
        }
        std::future::pending::<()>().await;
    };
    tokio::select! {
        end = read => end,
        () = write => StreamEnd::Gone,
    }
}

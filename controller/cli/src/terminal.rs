//! `novacron exec -it` and `novacron alloc exec -it`: one command with the CLI's
//! standard input attached, on a pseudo-terminal with `-t`, over the controller's
//! WebSocket (`GET /v1/exec/terminal`, channels in [`novacron_api::terminal`]).
//!
//! With `-t` on a terminal, the local terminal is put in raw mode (restored on
//! every way out), so keys such as Ctrl-C and Ctrl-D reach the remote command as
//! they would a local one; its size is sent at the start and after each resize
//! (SIGWINCH). Without a terminal on standard input, `-t` is dropped with a
//! warning, as kubectl does, and the command runs on pipes. The end of standard
//! input is passed on (the remote command reads end-of-file). The CLI exits with
//! the command's exit code.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use novacron_api::ExecExit;
use novacron_api::terminal::{self as channel, TerminalQuery};
use novacron_common::wire::TerminalSize;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::CliError;
use super::client::ApiClient;

/// Standard input chunks queued between its reader thread and the socket.
const STDIN_QUEUE: usize = 16;
/// The most bytes read from standard input at once.
const STDIN_CHUNK: usize = 16 * 1024;

/// Where the command runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A node's host.
    Node(String),
    /// An allocation's container.
    Allocation(String),
}

/// Runs `argv` at `target` with standard input attached (`tty`: on a terminal).
pub async fn run(
    client: &ApiClient,
    target: Target,
    argv: &[String],
    tty: bool,
    timeout: Option<Duration>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    run_with(client, target, argv, tty, timeout, None, out).await
}

/// The byte that detaches `novacron vm console -i` (Ctrl-], as telnet's and
/// virsh's consoles).
pub const DETACH: u8 = 0x1d;

/// What precedes `detach` in `chunk`, if it holds it: the bytes to send
/// before leaving. Pure.
pub fn before_detach(chunk: &[u8], detach: u8) -> Option<&[u8]> {
    chunk.iter().position(|b| *b == detach).map(|i| &chunk[..i])
}

/// [`run`], ending the session (successfully) when standard input holds
/// `detach`: a session with no end of its own, like a serial console.
pub async fn run_with(
    client: &ApiClient,
    target: Target,
    argv: &[String],
    tty: bool,
    timeout: Option<Duration>,
    detach: Option<u8>,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let stdin = io::stdin();
    let local_tty = rustix::termios::isatty(stdin.as_fd());
    if tty && !local_tty {
        eprintln!(
            "novacron: unable to use a TTY: standard input is not a terminal; running without one"
        );
    }
    let size = (tty && local_tty).then(terminal_size);
    let (node, allocation) = match target {
        Target::Node(n) => (Some(n), None),
        Target::Allocation(a) => (None, Some(a)),
    };
    let query = TerminalQuery {
        node,
        allocation,
        command: argv.to_vec(),
        tty: size,
        timeout,
    };
    let socket = client
        .websocket(
            &["v1", "exec", "terminal"],
            &query.to_query(),
            channel::SUBPROTOCOL,
            channel::MAX_MESSAGE,
        )
        .await?;
    // Restores the terminal when this function ends, however it ends.
    let _raw = match size {
        Some(_) => Some(RawMode::enable().map_err(|e| CliError::Remote {
            code: super::EXIT_FAILURE,
            message: format!("cannot put the terminal in raw mode: {e}"),
        })?),
        None => None,
    };
    let (mut to_server, mut from_server) = socket.split();
    let mut input = read_stdin();
    let mut resized = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        .map_err(|e| CliError::Remote {
            code: super::EXIT_FAILURE,
            message: format!("cannot watch the terminal's size: {e}"),
        })?;
    let mut input_open = true;
    let lost = |reason: String| CliError::Remote {
        code: super::EXIT_FAILURE,
        message: format!(
            "the connection to the controller ended before the command's exit ({reason}); its outcome is unknown (see `novacron events --type exec`)"
        ),
    };
    let status: ExecExit = loop {
        tokio::select! {
            message = from_server.next() => {
                let data = match message {
                    Some(Ok(Message::Binary(data))) => data,
                    Some(Ok(Message::Close(_))) | None => return Err(lost("closed".into())),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(lost(e.to_string())),
                };
                match data.split_first() {
                    Some((&channel::STDOUT, rest)) => {
                        out.write_all(rest)
                            .and_then(|()| out.flush())
                            .map_err(|e| CliError::Output(e.into()))?;
                    }
                    Some((&channel::STDERR, rest)) => {
                        let mut err = io::stderr();
                        let _ = err.write_all(rest).and_then(|()| err.flush());
                    }
                    Some((&channel::STATUS, rest)) => {
                        break serde_json::from_slice(rest)
                            .map_err(|e| lost(format!("unreadable status: {e}")))?;
                    }
                    _ => {}
                }
            }
            chunk = input.recv(), if input_open => {
                let left = chunk
                    .as_deref()
                    .zip(detach)
                    .and_then(|(data, key)| before_detach(data, key));
                if let Some(rest) = left {
                    if !rest.is_empty() {
                        let mut message = vec![channel::STDIN];
                        message.extend_from_slice(rest);
                        let _ = to_server.send(Message::Binary(message.into())).await;
                    }
                    let _ = to_server.close().await;
                    drop(_raw);
                    eprintln!("\r\nnovacron: detached");
                    return Ok(());
                }
                let message = match chunk {
                    Some(data) => {
                        let mut message = Vec::with_capacity(data.len() + 1);
                        message.push(channel::STDIN);
                        message.extend_from_slice(&data);
                        message
                    }
                    None => {
                        input_open = false;
                        vec![channel::CLOSE, channel::STDIN]
                    }
                };
                to_server
                    .send(Message::Binary(message.into()))
                    .await
                    .map_err(|e| lost(e.to_string()))?;
            }
            _ = resized.recv(), if size.is_some() => {
                let mut message = vec![channel::RESIZE];
                message.extend(serde_json::to_vec(&terminal_size()).unwrap_or_default());
                to_server
                    .send(Message::Binary(message.into()))
                    .await
                    .map_err(|e| lost(e.to_string()))?;
            }
        }
    };
    let _ = to_server.close().await;
    drop(_raw);
    match u8::try_from(status.exit_code).unwrap_or(1) {
        0 => Ok(()),
        code => Err(CliError::Remote {
            code,
            message: status.error.unwrap_or_default(),
        }),
    }
}

/// The size of the terminal on standard input (80x24 when it cannot be read).
fn terminal_size() -> TerminalSize {
    match rustix::termios::tcgetwinsize(io::stdin().as_fd()) {
        Ok(w) if w.ws_col > 0 && w.ws_row > 0 => TerminalSize {
            cols: w.ws_col,
            rows: w.ws_row,
        },
        _ => TerminalSize { cols: 80, rows: 24 },
    }
}

/// Standard input, read on its own thread (a blocked read must not keep the
/// process from exiting) and sent in chunks; the channel closes at its end.
fn read_stdin() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(STDIN_QUEUE);
    std::thread::spawn(move || {
        let mut stdin = io::stdin().lock();
        let mut buf = vec![0u8; STDIN_CHUNK];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// The local terminal in raw mode until dropped.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enable() -> io::Result<RawMode> {
        use rustix::termios::{OptionalActions, tcgetattr, tcsetattr};
        let stdin = io::stdin();
        let saved = tcgetattr(stdin.as_fd())?;
        let mut raw = saved.clone();
        raw.make_raw();
        // Drain, not Flush: what was typed ahead still reaches the command.
        tcsetattr(stdin.as_fd(), OptionalActions::Drain, &raw)?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use rustix::termios::{OptionalActions, tcsetattr};
        let _ = tcsetattr(io::stdin().as_fd(), OptionalActions::Now, &self.saved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_detach_key_ends_the_session_after_what_precedes_it() {
        assert_eq!(before_detach(b"ls\n", DETACH), None);
        assert_eq!(before_detach(b"ls\n\x1dmore", DETACH), Some(&b"ls\n"[..]));
        assert_eq!(before_detach(b"\x1d", DETACH), Some(&b""[..]));
    }
}

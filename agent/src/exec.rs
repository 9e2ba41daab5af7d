//! Remote exec on the agent: commands the controller asks to run on this host or
//! inside one of this node's allocation containers, streamed back live.
//!
//! The controller opens one bi-stream per command and sends an [`ExecRequest`];
//! this module answers with [`ExecEvent`] frames: `Started`, `Output` chunks of at
//! most [`MAX_EXEC_CHUNK`] bytes as they are read, then `Exited` (or a single
//! `Refused` / `Failed`). The controller keeps its side of the stream open while
//! the command runs; when that side ends, is reset, or the connection goes, the
//! command is killed. Output is read only as fast as the stream takes it (QUIC flow
//! control), so a slow reader slows the command instead of filling memory.
//!
//! Host commands run only when [`HostExecPolicy::enabled`] (off by default), and
//! only programs of its allowlist when that is not empty. Each one runs in its own
//! process group with no standard input; when it ends, is cancelled or times out,
//! the whole group is killed, so it leaves nothing running behind it. Container
//! commands run through [`ContainerRuntime::exec_attached`] in the allocation's
//! container, found by [`Supervisor::exec_container`] (only containers labelled
//! with the allocation and this node).

use std::future::Future;
use std::pin::pin;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use novacron_common::wire::{
    self, BiRequest, CloseCode, ExecEvent, ExecRequest, ExecStream, ExecTarget, FrameError,
    MAX_EXEC_CHUNK, SUPPORTED,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::runtime::{ContainerRuntime, Supervisor};

mod terminal;

/// The most commands that may run at once for one controller connection (the
/// agent's QUIC limit on bi-streams the controller opens; more wait their turn).
pub const MAX_CONCURRENT_EXECS: u32 = 16;
/// How long the controller has to send the request after opening a stream.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// After a host command exits and its group is killed, how long its output pipes
/// may take to close (a process that left the group may hold them open).
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
/// How long a finished container command may take to report its exit code.
pub const EXIT_CODE_WAIT: Duration = Duration::from_secs(5);

/// Which host commands this agent runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostExecPolicy {
    /// Host exec is allowed at all (`--allow-host-exec`; off by default).
    pub enabled: bool,
    /// The programs allowed (`--host-exec-allow`); empty allows any. An entry
    /// matches the program (first argument) exactly: a bare name only as that bare
    /// name (looked up in `PATH`), a path only as that path.
    pub allow: Vec<String>,
}

impl HostExecPolicy {
    /// Whether `argv` may run on node `node`; the error says why not and how to
    /// allow it.
    pub fn check(&self, node: &str, argv: &[String]) -> Result<(), String> {
        if !self.enabled {
            return Err(format!(
                "host exec is disabled on node {node}; set allow_host_exec (agent --allow-host-exec) to enable it"
            ));
        }
        let Some(program) = argv.first() else {
            return Err("the command is empty; give a program and its arguments".into());
        };
        if self.allow.is_empty() || self.allow.iter().any(|p| p == program) {
            return Ok(());
        }
        Err(format!(
            "program {program:?} is not in node {node}'s host exec allowlist [{}] (agent --host-exec-allow); entries match the program exactly, as a bare name or as a path",
            self.allow.join(", ")
        ))
    }
}

/// Serves the exec streams of one controller connection.
#[derive(Debug)]
pub struct ExecService<R> {
    node: String,
    policy: HostExecPolicy,
    supervisor: Supervisor<R>,
    checkpoints: Option<Arc<crate::migrate::CheckpointService>>,
}

/// Why an exec stream ended early.
#[derive(Debug, thiserror::Error)]
pub enum StreamEnd {
    /// The controller cancelled (ended or reset its side) or the link went away.
    #[error("the controller cancelled the command or the link closed")]
    Gone,
    /// The controller broke the protocol on this stream.
    #[error("{1}")]
    Protocol(CloseCode, String),
}

impl From<FrameError> for StreamEnd {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Io(_) => StreamEnd::Gone,
            other => StreamEnd::Protocol(other.close_code(), other.to_string()),
        }
    }
}

/// Reads the first frame of a bi-stream (within [`REQUEST_TIMEOUT`]).
async fn read_request<Rd: AsyncRead + Unpin + Send>(
    recv: &mut Rd,
) -> Result<Option<BiRequest>, StreamEnd> {
    let mut scratch = Vec::new();
    match tokio::time::timeout(
        REQUEST_TIMEOUT,
        wire::read_frame::<BiRequest, _>(recv, &mut scratch),
    )
    .await
    {
        Ok(Ok(request)) => Ok(request),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(StreamEnd::Protocol(
            CloseCode::Timeout,
            "no request within 5 s".into(),
        )),
    }
}

impl<R: ContainerRuntime + Clone> ExecService<R> {
    /// The service of node `node`.
    pub fn new(node: String, policy: HostExecPolicy, supervisor: Supervisor<R>) -> Self {
        ExecService {
            node,
            policy,
            supervisor,
            checkpoints: None,
        }
    }

    /// Also answers checkpoint, fetch and release streams with `service`.
    pub fn with_checkpoints(mut self, service: Arc<crate::migrate::CheckpointService>) -> Self {
        self.checkpoints = Some(service);
        self
    }

    /// Accepts the bi-streams the controller opens on `conn`, one task each, until
    /// the connection closes.
    pub async fn accept(self: Arc<Self>, conn: quinn::Connection) {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let service = self.clone();
            tokio::spawn(async move {
                let request = match read_request(&mut recv).await {
                    Ok(Some(r)) => r,
                    Ok(None) | Err(StreamEnd::Gone) => return,
                    Err(StreamEnd::Protocol(code, reason)) => {
                        warn!(?code, %reason, "closing a stream: protocol violation");
                        let _ = send.reset(code.code().into());
                        return;
                    }
                };
                let request = match (request, &service.checkpoints) {
                    (BiRequest::Exec(r), _) => r,
                    (BiRequest::Terminal(r), _) => {
                        let served = service.serve_terminal(&mut send, recv, r).await;
                        finish(send, served);
                        return;
                    }
                    (other, Some(checkpoints)) => {
                        checkpoints.serve(other, send, recv).await;
                        return;
                    }
                    (_, None) => {
                        let _ = send.reset(CloseCode::Unexpected.code().into());
                        return;
                    }
                };
                let served = service.serve_request(&mut send, recv, request).await;
                finish(send, served);
            });
        }
    }

    /// Serves one exec stream: reads the request from `recv`, answers on `send`.
    /// `recv` ending (or failing, or carrying anything more) cancels the command.
    pub async fn serve<W, Rd>(&self, send: &mut W, mut recv: Rd) -> Result<(), StreamEnd>
    where
        W: AsyncWrite + Unpin + Send,
        Rd: AsyncRead + Unpin + Send,
    {
        let request = match read_request(&mut recv).await? {
            Some(BiRequest::Exec(request)) => request,
            Some(_) => {
                return Err(StreamEnd::Protocol(
                    CloseCode::Unexpected,
                    "this stream serves exec requests only".into(),
                ));
            }
            None => return Ok(()),
        };
        self.serve_request(send, recv, request).await
    }

    /// Serves one exec stream whose request has been read.
    pub async fn serve_request<W, Rd>(
        &self,
        send: &mut W,
        recv: Rd,
        request: ExecRequest,
    ) -> Result<(), StreamEnd>
    where
        W: AsyncWrite + Unpin + Send,
        Rd: AsyncRead + Unpin + Send,
    {
        let mut out = Events { send };
        if let Some(reason) = self.refusal(request.protocol_version, request.target.argv()) {
            return out.send(&ExecEvent::Refused { reason }).await;
        }
        let deadline = request
            .timeout_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        let cancelled = pin!(cancelled(recv));
        let id = request.request_id;
        match &request.target {
            ExecTarget::Host { argv } => {
                if let Err(reason) = self.policy.check(&self.node, argv) {
                    info!(request = id, ?argv, %reason, "host exec refused");
                    return out.send(&ExecEvent::Refused { reason }).await;
                }
                info!(request = id, ?argv, "host exec");
                self.run_host(&mut out, argv, deadline, cancelled).await
            }
            ExecTarget::Allocation { alloc_id, argv } => {
                let container = match self.supervisor.exec_container(alloc_id).await {
                    Ok(c) => c,
                    Err(reason) => {
                        info!(request = id, alloc = %alloc_id, %reason, "container exec refused");
                        return out.send(&ExecEvent::Refused { reason }).await;
                    }
                };
                info!(request = id, alloc = %alloc_id, ?argv, "container exec");
                self.run_container(&mut out, &container, argv, deadline, cancelled)
                    .await
            }
        }
    }

    /// Why the command of a request in `version` is refused, if it is.
    fn refusal(&self, version: u16, argv: &[String]) -> Option<String> {
        if !SUPPORTED.contains(version) {
            return Some(format!(
                "exec protocol version {version} is not supported; node {} speaks {SUPPORTED}",
                self.node
            ));
        }
        wire::check_argv(argv)
            .err()
            .map(|e| format!("node {} refuses the command: {e}", self.node))
    }

    async fn run_host<W: AsyncWrite + Unpin + Send>(
        &self,
        out: &mut Events<'_, W>,
        argv: &[String],
        deadline: Option<Instant>,
        cancelled: std::pin::Pin<&mut impl Future<Output = StreamEnd>>,
    ) -> Result<(), StreamEnd> {
        let mut command = tokio::process::Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => return out.send(&self.spawn_failure(argv, &e)).await,
        };
        let outputs = [reader(child.stdout.take()), reader(child.stderr.take())];
        self.drive_host(out, child, outputs, deadline, cancelled)
            .await
    }

    /// The event for a host command that could not be started.
    fn spawn_failure(&self, argv: &[String], e: &std::io::Error) -> ExecEvent {
        ExecEvent::Failed {
            reason: format!("cannot run {:?} on node {}: {e}", argv[0], self.node),
            code: spawn_failure_code(e),
        }
    }

    /// Reports a started host command (the leader of its own process group): its
    /// `outputs` (standard output, then standard error) as they come, then its exit.
    /// The group is killed when the command exits, times out at `deadline`, or
    /// `cancelled` resolves (which ends this with its error).
    async fn drive_host<W: AsyncWrite + Unpin + Send>(
        &self,
        out: &mut Events<'_, W>,
        mut child: tokio::process::Child,
        outputs: [Option<BoxedReader>; 2],
        deadline: Option<Instant>,
        mut cancelled: std::pin::Pin<&mut impl Future<Output = StreamEnd>>,
    ) -> Result<(), StreamEnd> {
        let pid = child.id();
        // Kills the group on every way out of here, task abort included.
        let mut group = ProcessGroup(pid);
        out.send(&ExecEvent::Started { pid }).await?;
        let [mut stdout, mut stderr] = outputs;
        let mut out_buf = vec![0u8; MAX_EXEC_CHUNK];
        let mut err_buf = vec![0u8; MAX_EXEC_CHUNK];
        let mut status: Option<ExitStatus> = None;
        let mut timed_out = false;
        let mut drain_until: Option<Instant> = None;
        while status.is_none() || stdout.is_some() || stderr.is_some() {
            let (stream, n) = tokio::select! {
                n = read_some(&mut stdout, &mut out_buf) => (ExecStream::Stdout, n),
                n = read_some(&mut stderr, &mut err_buf) => (ExecStream::Stderr, n),
                waited = child.wait(), if status.is_none() => {
                    match waited {
                        Ok(s) => status = Some(s),
                        Err(e) => {
                            warn!(error = %e, "cannot wait for a host exec process");
                            group.kill();
                            let reason = format!("lost track of the command on node {}: {e}", self.node);
                            return out.send(&ExecEvent::Failed { reason, code: 125 }).await;
                        }
                    }
                    // Whatever the command left running in its group goes with it.
                    group.kill();
                    group.disarm();
                    drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
                    continue;
                }
                _ = sleep_until(deadline), if status.is_none() && !timed_out => {
                    debug!(?pid, "host exec timed out; killing its group");
                    timed_out = true;
                    group.kill();
                    continue;
                }
                _ = sleep_until(drain_until) => {
                    stdout = None;
                    stderr = None;
                    continue;
                }
                end = &mut cancelled => {
                    debug!(?pid, "host exec cancelled; killing its group");
                    group.kill();
                    return Err(end);
                }
            };
            match n {
                Some(n) if n > 0 => {
                    let data = match stream {
                        ExecStream::Stdout => &out_buf[..n],
                        ExecStream::Stderr => &err_buf[..n],
                    };
                    out.output(stream, data).await?;
                }
                // End of that stream, or an error reading it: stop reading it.
                _ => match stream {
                    ExecStream::Stdout => stdout = None,
                    ExecStream::Stderr => stderr = None,
                },
            }
        }
        let (code, signal) = status.map(exit_parts).unwrap_or((125, None));
        debug!(?pid, code, ?signal, timed_out, "host exec finished");
        out.send(&ExecEvent::Exited {
            code,
            signal,
            timed_out,
        })
        .await
    }

    async fn run_container<W: AsyncWrite + Unpin + Send>(
        &self,
        out: &mut Events<'_, W>,
        container: &str,
        argv: &[String],
        deadline: Option<Instant>,
        cancelled: std::pin::Pin<&mut impl Future<Output = StreamEnd>>,
    ) -> Result<(), StreamEnd> {
        let runtime = self.supervisor.runtime();
        let session = match runtime.exec_attached(container, argv).await {
            Ok(s) => s,
            Err(e) => {
                let reason = format!("cannot run {:?} in container {container}: {e}", argv[0]);
                return out.send(&ExecEvent::Failed { reason, code: 125 }).await;
            }
        };
        self.drive_container(
            out,
            container,
            &session.id,
            session.output,
            deadline,
            cancelled,
        )
        .await
    }

    /// Reports a started container command `exec_id`: its `output` as it comes,
    /// then its exit code. It is killed when it times out at `deadline`, or when
    /// `cancelled` resolves (which ends this with its error).
    async fn drive_container<W: AsyncWrite + Unpin + Send>(
        &self,
        out: &mut Events<'_, W>,
        container: &str,
        exec_id: &str,
        mut output: futures_util::stream::BoxStream<
            'static,
            Result<crate::runtime::LogFrame, crate::runtime::RuntimeError>,
        >,
        deadline: Option<Instant>,
        mut cancelled: std::pin::Pin<&mut impl Future<Output = StreamEnd>>,
    ) -> Result<(), StreamEnd> {
        let runtime = self.supervisor.runtime();
        // Kills the command on every way out of here, task abort included.
        let mut guard = ContainerExec {
            runtime: Some(runtime.clone()),
            id: exec_id.to_owned(),
        };
        let pid = runtime.exec_state(exec_id).await.ok().and_then(|s| s.pid);
        out.send(&ExecEvent::Started { pid }).await?;
        let mut timed_out = false;
        loop {
            tokio::select! {
                frame = output.next() => match frame {
                    Some(Ok(frame)) => {
                        let stream = if frame.stderr { ExecStream::Stderr } else { ExecStream::Stdout };
                        out.output(stream, &frame.data).await?;
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "container exec output failed");
                        break;
                    }
                    None => break,
                },
                _ = sleep_until(deadline) => {
                    timed_out = true;
                    if let Err(error) = runtime.exec_kill(exec_id).await {
                        warn!(%error, "cannot kill a timed-out container exec");
                    }
                    break;
                }
                end = &mut cancelled => {
                    if let Err(error) = runtime.exec_kill(exec_id).await {
                        warn!(%error, "cannot kill a cancelled container exec");
                    }
                    guard.disarm();
                    return Err(end);
                }
            }
        }
        drop(output);
        let waited_until = Instant::now() + EXIT_CODE_WAIT;
        let code = loop {
            match runtime.exec_state(exec_id).await {
                Ok(state) if !state.running => break state.exit_code,
                Ok(_) if Instant::now() < waited_until => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(_) => {
                    // Output closed but the process runs on: it goes now.
                    let _ = runtime.exec_kill(exec_id).await;
                    break None;
                }
                Err(e) => {
                    warn!(error = %e, "cannot read a container exec's exit code");
                    break None;
                }
            }
        };
        guard.disarm();
        let Some(code) = code else {
            let reason = format!(
                "the command in container {container} ended without an exit code from the runtime"
            );
            return out.send(&ExecEvent::Failed { reason, code: 125 }).await;
        };
        let code = i32::try_from(code).unwrap_or(125);
        let signal = (timed_out || code > 128)
            .then_some(code - 128)
            .filter(|s| (1..64).contains(s));
        out.send(&ExecEvent::Exited {
            code,
            signal,
            timed_out,
        })
        .await
    }
}

/// Ends an exec stream as `served` says: finished after the last event, reset on a
/// protocol violation, left alone when the controller went away.
fn finish(mut send: quinn::SendStream, served: Result<(), StreamEnd>) {
    match served {
        Ok(()) => {
            let _ = send.finish();
        }
        Err(StreamEnd::Gone) => {}
        Err(StreamEnd::Protocol(code, reason)) => {
            warn!(?code, %reason, "closing an exec stream: protocol violation");
            let _ = send.reset(code.code().into());
        }
    }
}

/// Writes events on an exec stream.
struct Events<'a, W> {
    send: &'a mut W,
}

impl<W: AsyncWrite + Unpin + Send> Events<'_, W> {
    async fn send(&mut self, event: &ExecEvent) -> Result<(), StreamEnd> {
        wire::write_frame(self.send, event).await?;
        if !matches!(event, ExecEvent::Output { .. }) {
            self.send.flush().await.map_err(|_| StreamEnd::Gone)?;
        }
        Ok(())
    }

    async fn output(&mut self, stream: ExecStream, data: &[u8]) -> Result<(), StreamEnd> {
        for chunk in data.chunks(MAX_EXEC_CHUNK) {
            let event = ExecEvent::Output {
                stream,
                data: chunk.to_vec(),
            };
            self.send(&event).await?;
        }
        Ok(())
    }
}

/// Resolves when the controller's side of the stream ends, fails or carries
/// anything after the request (a protocol violation).
async fn cancelled<Rd: AsyncRead + Unpin>(mut recv: Rd) -> StreamEnd {
    let mut byte = [0u8; 1];
    match recv.read(&mut byte).await {
        Ok(n) if n > 0 => StreamEnd::Protocol(
            CloseCode::Unexpected,
            "bytes after the exec request on an exec stream".into(),
        ),
        _ => StreamEnd::Gone,
    }
}

/// A command's output pipe or terminal.
type BoxedReader = Box<dyn AsyncRead + Unpin + Send>;

fn reader(pipe: Option<impl AsyncRead + Unpin + Send + 'static>) -> Option<BoxedReader> {
    pipe.map(|p| Box::new(p) as BoxedReader)
}

/// Reads from `pipe` when it is open; never resolves when it is closed.
async fn read_some<Rd: AsyncRead + Unpin>(pipe: &mut Option<Rd>, buf: &mut [u8]) -> Option<usize> {
    match pipe {
        Some(p) => p.read(buf).await.ok(),
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The exit code and signal of a finished process (128 + N for signal N).
fn exit_parts(status: ExitStatus) -> (i32, Option<i32>) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => (code, None),
        (None, Some(signal)) => (128 + signal, Some(signal)),
        (None, None) => (125, None),
    }
}

/// The shell's exit code for a program that could not be started.
fn spawn_failure_code(e: &std::io::Error) -> i32 {
    match e.kind() {
        std::io::ErrorKind::NotFound => 127,
        std::io::ErrorKind::PermissionDenied => 126,
        _ => 125,
    }
}

/// The process group of a host command (its id is the leader's pid); killed on drop
/// unless disarmed.
struct ProcessGroup(Option<u32>);

impl ProcessGroup {
    fn kill(&self) {
        use rustix::process::{Pid, Signal, kill_process_group};
        let Some(pid) = self
            .0
            .and_then(|p| i32::try_from(p).ok())
            .and_then(Pid::from_raw)
            .filter(|p| !p.is_init())
        else {
            return;
        };
        match kill_process_group(pid, Signal::KILL) {
            Ok(()) | Err(rustix::io::Errno::SRCH) => {}
            Err(error) => {
                warn!(%error, pgid = pid.as_raw_nonzero().get(), "cannot kill a host exec's process group")
            }
        }
    }

    /// After the leader was reaped its id may be reused: never signal it again.
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A container command that is killed on drop unless disarmed.
struct ContainerExec<R: ContainerRuntime + Clone> {
    runtime: Option<R>,
    id: String,
}

impl<R: ContainerRuntime + Clone> ContainerExec<R> {
    fn disarm(&mut self) {
        self.runtime = None;
    }
}

impl<R: ContainerRuntime + Clone> Drop for ContainerExec<R> {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            let id = std::mem::take(&mut self.id);
            handle.spawn(async move {
                if let Err(error) = runtime.exec_kill(&id).await {
                    warn!(%error, "cannot kill an abandoned container exec");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{DuplexStream, ReadHalf, WriteHalf};

    use super::*;
    use crate::runtime::{DockerRuntime, SupervisorConfig};

    fn argv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn policy(enabled: bool, allow: &[&str]) -> HostExecPolicy {
        HostExecPolicy {
            enabled,
            allow: argv(allow),
        }
    }

    #[test]
    fn host_exec_is_off_by_default() {
        let err = HostExecPolicy::default()
            .check("n1", &argv(&["uptime"]))
            .expect_err("off by default");
        assert_eq!(
            err,
            "host exec is disabled on node n1; set allow_host_exec (agent --allow-host-exec) to enable it"
        );
    }

    #[test]
    fn an_empty_allowlist_allows_any_program() {
        assert_eq!(
            policy(true, &[]).check("n1", &argv(&["rm", "-rf", "/x"])),
            Ok(())
        );
    }

    #[test]
    fn the_allowlist_matches_the_program_exactly() {
        let p = policy(true, &["uptime", "true", "/usr/bin/id"]);
        assert_eq!(p.check("n1", &argv(&["uptime"])), Ok(()));
        assert_eq!(p.check("n1", &argv(&["/usr/bin/id", "-u"])), Ok(()));
        let err = p.check("n1", &argv(&["rm"])).expect_err("not listed");
        assert!(
            err.starts_with(
                "program \"rm\" is not in node n1's host exec allowlist [uptime, true, /usr/bin/id]"
            ),
            "{err}"
        );
        // A path does not match a bare name, nor a bare name a path.
        assert!(p.check("n1", &argv(&["/tmp/uptime"])).is_err());
        assert!(p.check("n1", &argv(&["id"])).is_err());
        assert!(p.check("n1", &argv(&[])).is_err());
    }

    struct Controller {
        write: WriteHalf<DuplexStream>,
        read: ReadHalf<DuplexStream>,
        scratch: Vec<u8>,
    }

    impl Controller {
        async fn next(&mut self) -> Option<ExecEvent> {
            wire::read_frame(&mut self.read, &mut self.scratch)
                .await
                .expect("well-formed events")
        }
    }

    /// Starts serving one exec stream for `request`, as node n1 with `policy`.
    async fn start(
        policy: HostExecPolicy,
        target: ExecTarget,
        timeout_ms: Option<u64>,
    ) -> (Controller, tokio::task::JoinHandle<Result<(), StreamEnd>>) {
        let runtime = DockerRuntime::new(None).expect("a runtime value (no I/O)");
        let service = Arc::new(ExecService::new(
            "n1".into(),
            policy,
            Supervisor::new(runtime, SupervisorConfig::new("n1")),
        ));
        let (ours, theirs) = tokio::io::duplex(256 * 1024);
        let (agent_read, mut agent_write) = tokio::io::split(theirs);
        let task = tokio::spawn(async move { service.serve(&mut agent_write, agent_read).await });
        let (read, mut write) = tokio::io::split(ours);
        let request = ExecRequest {
            protocol_version: wire::PROTOCOL_VERSION,
            request_id: 1,
            target,
            timeout_ms,
        };
        wire::write_frame(&mut write, &BiRequest::Exec(request))
            .await
            .expect("request sent");
        (
            Controller {
                write,
                read,
                scratch: Vec::new(),
            },
            task,
        )
    }

    fn host(v: &[&str]) -> ExecTarget {
        ExecTarget::Host { argv: argv(v) }
    }

    /// Waits (at most 5 s) until every pid is gone: a killed group's grandchildren
    /// die asynchronously after the direct child is reaped.
    async fn wait_gone(pids: &[u32]) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !pids.iter().all(|p| pid_gone(*p)) {
            assert!(
                std::time::Instant::now() < deadline,
                "still running: {pids:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pid_gone(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            // A zombie waiting for its new parent to reap it no longer runs.
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        }
    }

    #[tokio::test]
    async fn a_host_command_streams_output_and_its_exit_code() {
        let (mut c, task) = start(
            policy(true, &[]),
            host(&[
                "sh",
                "-c",
                "echo first; echo oops >&2; sleep 1; echo second; exit 7",
            ]),
            None,
        )
        .await;
        assert!(matches!(
            c.next().await,
            Some(ExecEvent::Started { pid: Some(_) })
        ));
        let t0 = std::time::Instant::now();
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut first_at = None;
        let exit = loop {
            match c.next().await.expect("an event") {
                ExecEvent::Output {
                    stream: ExecStream::Stdout,
                    data,
                } => {
                    first_at.get_or_insert(t0.elapsed());
                    stdout.extend(data);
                }
                ExecEvent::Output {
                    stream: ExecStream::Stderr,
                    data,
                } => stderr.extend(data),
                other => break other,
            }
        };
        assert_eq!(
            exit,
            ExecEvent::Exited {
                code: 7,
                signal: None,
                timed_out: false
            }
        );
        assert_eq!(String::from_utf8_lossy(&stdout), "first\nsecond\n");
        assert_eq!(String::from_utf8_lossy(&stderr), "oops\n");
        // The first line came while the command was still sleeping.
        assert!(
            first_at.expect("output") < Duration::from_millis(900),
            "{first_at:?}"
        );
        assert!(task.await.expect("task").is_ok());
    }

    #[tokio::test]
    async fn refused_when_disabled_or_not_allowed() {
        let (mut c, task) = start(policy(false, &[]), host(&["true"]), None).await;
        match c.next().await {
            Some(ExecEvent::Refused { reason }) => {
                assert!(
                    reason.contains("host exec is disabled on node n1"),
                    "{reason}"
                )
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(task.await.expect("task").is_ok());
        let (mut c, _) = start(
            policy(true, &["uptime"]),
            host(&["rm", "-rf", "/nope"]),
            None,
        )
        .await;
        match c.next().await {
            Some(ExecEvent::Refused { reason }) => assert!(
                reason.contains("program \"rm\" is not in node n1's host exec allowlist [uptime]"),
                "{reason}"
            ),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_missing_program_fails_with_127() {
        let (mut c, _) = start(policy(true, &[]), host(&["/nonexistent/prog"]), None).await;
        match c.next().await {
            Some(ExecEvent::Failed { code, reason }) => {
                assert_eq!(code, 127, "{reason}");
                assert!(reason.contains("/nonexistent/prog"), "{reason}");
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    async fn pids(c: &mut Controller) -> Vec<u32> {
        match c.next().await {
            Some(ExecEvent::Output { data, .. }) => String::from_utf8_lossy(&data)
                .split_whitespace()
                .filter_map(|w| w.parse().ok())
                .collect(),
            other => panic!("expected the pids, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn ending_the_stream_kills_the_command_and_its_children() {
        let (mut c, task) = start(
            policy(true, &[]),
            host(&["sh", "-c", "sleep 60 & echo $$ $!; wait"]),
            None,
        )
        .await;
        assert!(matches!(c.next().await, Some(ExecEvent::Started { .. })));
        let pids = pids(&mut c).await;
        assert_eq!(pids.len(), 2, "{pids:?}");
        assert!(pids.iter().all(|p| !pid_gone(*p)));
        c.write.shutdown().await.expect("end our side");
        let end = task.await.expect("task");
        assert!(matches!(end, Err(StreamEnd::Gone)), "{end:?}");
        wait_gone(&pids).await;
    }

    #[tokio::test]
    async fn a_time_limit_kills_the_command() {
        let (mut c, _) = start(
            policy(true, &[]),
            host(&["sh", "-c", "sleep 60 & echo $$ $!; wait"]),
            Some(300),
        )
        .await;
        assert!(matches!(c.next().await, Some(ExecEvent::Started { .. })));
        let pids = pids(&mut c).await;
        assert_eq!(
            c.next().await,
            Some(ExecEvent::Exited {
                code: 137,
                signal: Some(9),
                timed_out: true
            })
        );
        wait_gone(&pids).await;
    }

    #[tokio::test]
    async fn bytes_after_the_request_are_a_protocol_error() {
        let (mut c, task) = start(policy(true, &[]), host(&["sleep", "30"]), None).await;
        assert!(matches!(c.next().await, Some(ExecEvent::Started { .. })));
        c.write.write_all(b"junk").await.expect("write");
        let end = task.await.expect("task");
        assert!(
            matches!(end, Err(StreamEnd::Protocol(CloseCode::Unexpected, _))),
            "{end:?}"
        );
    }

    #[tokio::test]
    async fn a_malformed_request_is_a_protocol_error() {
        let runtime = DockerRuntime::new(None).expect("runtime");
        let service = ExecService::new(
            "n1".into(),
            policy(true, &[]),
            Supervisor::new(runtime, SupervisorConfig::new("n1")),
        );
        let mut frame = 3u32.to_be_bytes().to_vec();
        frame.extend_from_slice(&[0xFF, 0xFF, 0xFF]);
        let mut sink = Vec::new();
        let end = service.serve(&mut sink, &frame[..]).await;
        assert!(
            matches!(end, Err(StreamEnd::Protocol(CloseCode::Malformed, _))),
            "{end:?}"
        );
        assert!(sink.is_empty());
    }
}

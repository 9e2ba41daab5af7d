//! `novacron exec` and `novacron alloc exec`: run a command on nodes' hosts or in an
//! allocation's container, printing its output live.
//!
//! One target (`--node`, `alloc exec`): standard output and error go to the CLI's
//! own, unchanged, and the CLI exits with the command's exit code. A selector:
//! every line is prefixed with its node's name, a table of exit codes follows, and
//! the CLI exits 0 when every node returned 0, else with the first non-zero code
//! (nodes in name order), naming the nodes that failed. Exit 124: the time limit
//! passed and the command was killed; 125: it did not run (refused, node not
//! connected); 130: interrupted (Ctrl-C cancels the command on the nodes).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::time::Duration;

use clap::Args;
use novacron_api::{ExecBody, ExecExit, ExecLine, ExecSummary};
use novacron_common::wire::ExecStream;

use super::CliError;
use super::client::ApiClient;
use super::output::{self, OutputError, OutputFormat};

/// How long the controller has to start answering.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest line of the controller's answer the CLI accepts.
pub const MAX_LINE: usize = 1 << 20;
/// A partial output line longer than this is printed without waiting for its end.
pub const MAX_PARTIAL_LINE: usize = 64 * 1024;
/// Exit code after Ctrl-C.
pub const EXIT_INTERRUPTED: u8 = 130;

/// `novacron exec`: run a command on nodes' hosts (the agents must allow host exec).
#[derive(Debug, Clone, PartialEq, Eq, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["node", "selector"])))]
pub struct ExecArgs {
    /// Run on this node.
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Run on every ready node whose labels hold all these pairs, e.g. zone=a,pool=gpu.
    #[arg(long, value_name = "KEY=VALUE[,KEY=VALUE...]")]
    pub selector: Option<String>,
    /// Attach standard input (the remote command reads what you type or pipe).
    #[arg(short = 'i', long)]
    pub stdin: bool,
    /// Run on a pseudo-terminal (with -i: an interactive shell, e.g. `-it -- sh`).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Kill the command after this long (e.g. 30s, 5m); the CLI then exits 124.
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// The program and its arguments, after `--` (no shell: use `sh -c '...'` for one).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// `novacron alloc exec ID -- CMD...`: run a command in an allocation's container.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct AllocExecArgs {
    /// The allocation id.
    #[arg(add = crate::complete::allocs())]
    pub id: String,
    /// Attach standard input (the remote command reads what you type or pipe).
    #[arg(short = 'i', long)]
    pub stdin: bool,
    /// Run on a pseudo-terminal (with -i: an interactive shell, e.g. `-it -- sh`).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Kill the command after this long (e.g. 30s, 5m); the CLI then exits 124.
    #[arg(long, value_name = "DURATION", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// The program and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Runs `novacron exec`.
pub async fn exec(
    args: &ExecArgs,
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let selector = match &args.selector {
        Some(text) => Some(
            novacron_api::parse_selector(text).map_err(|e| CliError::Remote {
                code: super::EXIT_USAGE,
                message: format!("--selector: {e}"),
            })?,
        ),
        None => None,
    };
    let fan_out = selector.is_some();
    if args.stdin || args.tty {
        let Some(node) = &args.node else {
            return Err(CliError::Usage(
                "-i and -t run one command on one node: give --node, not --selector".into(),
            ));
        };
        let target = crate::terminal::Target::Node(node.clone());
        return crate::terminal::run(client, target, &args.command, args.tty, args.timeout, out)
            .await;
    }
    let body = ExecBody {
        node: args.node.clone(),
        selector,
        allocation: None,
        argv: args.command.clone(),
        timeout_ms: args.timeout.map(millis),
    };
    run(client, &body, fan_out, format, out).await
}

/// Runs `novacron alloc exec`.
pub async fn alloc_exec(
    args: &AllocExecArgs,
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    if args.stdin || args.tty {
        let target = crate::terminal::Target::Allocation(args.id.clone());
        return crate::terminal::run(client, target, &args.command, args.tty, args.timeout, out)
            .await;
    }
    let body = ExecBody {
        allocation: Some(args.id.clone()),
        argv: args.command.clone(),
        timeout_ms: args.timeout.map(millis),
        ..ExecBody::default()
    };
    run(client, &body, false, format, out).await
}

/// Sends `body` and prints the answer as it streams in; Ctrl-C drops the answer,
/// which cancels the command on the nodes.
pub async fn run(
    client: &ApiClient,
    body: &ExecBody,
    fan_out: bool,
    format: OutputFormat,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut response = tokio::select! {
        r = client.post_stream(&["v1", "exec"], body, START_TIMEOUT) => r?,
        _ = &mut interrupted => return Err(interrupted_error()),
    };
    let mut printer = Printer::new(fan_out, format);
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let chunk = tokio::select! {
            c = response.chunk() => c.map_err(|e| client.stream_error(&e))?,
            _ = &mut interrupted => {
                drop(response);
                return Err(interrupted_error());
            }
        };
        let Some(chunk) = chunk else { break };
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            if let Some(summary) = printer.line(&line, out)? {
                return printer.finish(&summary, out);
            }
        }
        if pending.len() > MAX_LINE {
            return Err(CliError::Remote {
                code: super::EXIT_FAILURE,
                message: format!(
                    "the controller sent an exec line longer than {MAX_LINE} bytes; are the CLI and the controller the same version?"
                ),
            });
        }
    }
    Err(CliError::Remote {
        code: super::EXIT_FAILURE,
        message: "the controller ended the exec answer before its summary; the command's outcome is unknown (see `novacron events --type exec`)".into(),
    })
}

fn interrupted_error() -> CliError {
    CliError::Remote {
        code: EXIT_INTERRUPTED,
        message: "interrupted; the command was cancelled on the nodes".into(),
    }
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("{e}; expected a duration such as 500ms, 30s or 5m"))?;
    if d.is_zero() {
        return Err("a time limit must be longer than 0; leave --timeout out for none".into());
    }
    Ok(d)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Prints the lines of an exec answer.
struct Printer {
    fan_out: bool,
    format: OutputFormat,
    /// Fan-out: the unfinished last line of each node's stream.
    partial: BTreeMap<(String, ExecStreamKey), String>,
    exits: Vec<ExecExit>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum ExecStreamKey {
    Out,
    Err,
}

impl Printer {
    fn new(fan_out: bool, format: OutputFormat) -> Printer {
        Printer {
            fan_out,
            format,
            partial: BTreeMap::new(),
            exits: Vec::new(),
        }
    }

    /// Prints one line of the answer; returns the summary when it is the last.
    fn line(&mut self, raw: &[u8], out: &mut dyn Write) -> Result<Option<ExecSummary>, CliError> {
        let line: ExecLine = serde_json::from_slice(raw).map_err(|e| CliError::Remote {
            code: super::EXIT_FAILURE,
            message: format!(
                "unexpected exec line from the controller: {e}; are the CLI and the controller the same version?"
            ),
        })?;
        if !self.format.is_human() {
            out.write_all(raw).map_err(OutputError::Io)?;
            out.flush().map_err(OutputError::Io)?;
            return Ok(match line {
                ExecLine::Summary(s) => Some(s),
                _ => None,
            });
        }
        match line {
            ExecLine::Started { .. } => {}
            ExecLine::Output { node, stream, data } if self.fan_out => {
                self.prefixed(&node, stream, &data, out)?;
            }
            ExecLine::Output { stream, data, .. } => match stream {
                ExecStream::Stdout => {
                    out.write_all(data.as_bytes()).map_err(OutputError::Io)?;
                    out.flush().map_err(OutputError::Io)?;
                }
                ExecStream::Stderr => {
                    let mut err = io::stderr().lock();
                    let _ = err.write_all(data.as_bytes());
                    let _ = err.flush();
                }
            },
            ExecLine::Exit(exit) => {
                if self.fan_out {
                    self.flush_node(&exit.node, out)?;
                }
                self.exits.push(exit);
            }
            ExecLine::Summary(summary) => return Ok(Some(summary)),
        }
        Ok(None)
    }

    /// Prints `data` of `node` line by line, each line prefixed with the node.
    fn prefixed(
        &mut self,
        node: &str,
        stream: ExecStream,
        data: &str,
        out: &mut dyn Write,
    ) -> Result<(), CliError> {
        let key = match stream {
            ExecStream::Stdout => ExecStreamKey::Out,
            ExecStream::Stderr => ExecStreamKey::Err,
        };
        let partial = self.partial.entry((node.to_owned(), key)).or_default();
        partial.push_str(data);
        let mut text = String::new();
        while let Some(end) = partial.find('\n') {
            let rest = partial.split_off(end + 1);
            text.push_str(&format!("{node}: {partial}"));
            *partial = rest;
        }
        if partial.len() > MAX_PARTIAL_LINE {
            text.push_str(&format!("{node}: {partial}\n"));
            partial.clear();
        }
        write_stream(key, &text, out)
    }

    /// Prints what is left of `node`'s unfinished lines.
    fn flush_node(&mut self, node: &str, out: &mut dyn Write) -> Result<(), CliError> {
        for key in [ExecStreamKey::Out, ExecStreamKey::Err] {
            if let Some(rest) = self.partial.remove(&(node.to_owned(), key))
                && !rest.is_empty()
            {
                write_stream(key, &format!("{node}: {rest}\n"), out)?;
            }
        }
        Ok(())
    }

    /// Prints the end (a table for a fan-out, errors) and turns the summary into
    /// the CLI's result.
    fn finish(&mut self, summary: &ExecSummary, out: &mut dyn Write) -> Result<(), CliError> {
        let code = exit_code(summary.exit_code);
        if !self.format.is_human() {
            return match code {
                0 => Ok(()),
                code => Err(CliError::Remote {
                    code,
                    message: String::new(),
                }),
            };
        }
        if !self.fan_out {
            let message = summary
                .failed
                .first()
                .and_then(|f| f.error.clone())
                .unwrap_or_default();
            return match code {
                0 => Ok(()),
                code => Err(CliError::Remote { code, message }),
            };
        }
        let nodes: Vec<String> = self.partial.keys().map(|(n, _)| n.clone()).collect();
        for node in nodes {
            self.flush_node(&node, out)?;
        }
        self.exits.sort_by(|a, b| a.node.cmp(&b.node));
        let mut table = String::from("\n");
        let width = self
            .exits
            .iter()
            .map(|e| e.node.len())
            .max()
            .unwrap_or(4)
            .max(4);
        table.push_str(&format!("{:width$}  EXIT  DURATION  ERROR\n", "NODE"));
        for e in &self.exits {
            table.push_str(&format!(
                "{:width$}  {:<4}  {:<8}  {}\n",
                e.node,
                e.exit_code,
                output::short_duration(Duration::from_millis(e.duration_ms)),
                e.error.as_deref().unwrap_or("")
            ));
        }
        out.write_all(table.as_bytes()).map_err(OutputError::Io)?;
        out.flush().map_err(OutputError::Io)?;
        if code == 0 {
            return Ok(());
        }
        let failed: Vec<String> = summary
            .failed
            .iter()
            .map(|f| format!("{} (exit {})", f.node, f.exit_code))
            .collect();
        Err(CliError::Remote {
            code,
            message: format!(
                "the command failed on {} of {} nodes: {}",
                summary.failed.len(),
                summary.nodes,
                failed.join(", ")
            ),
        })
    }
}

fn write_stream(key: ExecStreamKey, text: &str, out: &mut dyn Write) -> Result<(), CliError> {
    if text.is_empty() {
        return Ok(());
    }
    match key {
        ExecStreamKey::Out => {
            out.write_all(text.as_bytes()).map_err(OutputError::Io)?;
            out.flush().map_err(OutputError::Io)?;
        }
        ExecStreamKey::Err => {
            let mut err = io::stderr().lock();
            let _ = err.write_all(text.as_bytes());
            let _ = err.flush();
        }
    }
    Ok(())
}

/// A remote exit code as the CLI's own (0 to 255; anything else is 1).
fn exit_code(code: i32) -> u8 {
    u8::try_from(code).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(l: &ExecLine) -> Vec<u8> {
        let mut v = serde_json::to_vec(l).expect("encodes");
        v.push(b'\n');
        v
    }

    fn output(node: &str, data: &str) -> ExecLine {
        ExecLine::Output {
            node: node.into(),
            stream: ExecStream::Stdout,
            data: data.into(),
        }
    }

    fn exit(node: &str, code: i32) -> ExecExit {
        ExecExit {
            node: node.into(),
            exit_code: code,
            signal: None,
            timed_out: false,
            error: None,
            duration_ms: 5,
        }
    }

    #[test]
    fn fan_out_prefixes_whole_lines_and_reports_failures() {
        let mut p = Printer::new(true, OutputFormat::Table);
        let mut out = Vec::new();
        for l in [
            output("n1", "up 1 d"),
            output("n2", "a\nb\n"),
            output("n1", "ay\n"),
            output("n2", "tail"),
            ExecLine::Exit(exit("n2", 3)),
            ExecLine::Exit(exit("n1", 0)),
        ] {
            assert!(p.line(&line(&l), &mut out).expect("prints").is_none());
        }
        let summary = ExecSummary {
            nodes: 2,
            exit_code: 3,
            failed: vec![exit("n2", 3)],
        };
        let end = p
            .line(&line(&ExecLine::Summary(summary)), &mut out)
            .expect("prints");
        let err = p
            .finish(&end.expect("summary"), &mut out)
            .expect_err("a node failed");
        let text = String::from_utf8(out).expect("utf-8");
        assert!(
            text.starts_with("n2: a\nn2: b\nn1: up 1 day\nn2: tail\n"),
            "{text}"
        );
        assert!(text.contains("NODE  EXIT"), "{text}");
        assert!(text.contains("n2    3 "), "{text}");
        match err {
            CliError::Remote { code, message } => {
                assert_eq!(code, 3);
                assert_eq!(message, "the command failed on 1 of 2 nodes: n2 (exit 3)");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn one_target_prints_output_unchanged_and_exits_with_its_code() {
        let mut p = Printer::new(false, OutputFormat::Table);
        let mut out = Vec::new();
        p.line(&line(&output("n1", "no newline")), &mut out)
            .expect("prints");
        let mut e = exit("n1", 124);
        e.timed_out = true;
        e.error = Some("timed out after 1s on node n1; the command was killed".into());
        let summary = ExecSummary {
            nodes: 1,
            exit_code: 124,
            failed: vec![e],
        };
        match p.finish(&summary, &mut out) {
            Err(CliError::Remote { code: 124, message }) => {
                assert!(message.starts_with("timed out after 1s"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(out, b"no newline");
    }

    #[test]
    fn timeouts_parse() {
        assert_eq!(parse_timeout("1500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_timeout("0s").is_err());
        assert!(parse_timeout("soon").expect_err("bad").contains("30s"));
        assert_eq!(exit_code(7), 7);
        assert_eq!(exit_code(-1), 1);
        assert_eq!(exit_code(300), 1);
    }
}

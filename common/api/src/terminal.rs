//! Interactive exec over a WebSocket (`GET /v1/exec/terminal`, `novacron exec
//! -it`): the query that names the command, and the channels of its messages.
//!
//! Every WebSocket message is binary; its first byte names its channel, as in
//! Kubernetes' `channel.k8s.io` exec protocol: [`STDIN`] (client to server),
//! [`STDOUT`] and [`STDERR`] (server to client), [`RESIZE`] (client to server, a
//! JSON [`TerminalSize`]), [`CLOSE`] followed by [`STDIN`] (the client's input
//! ended), and [`STATUS`] (server to client, a JSON [`crate::ExecExit`], the last
//! message before the server closes).

use std::time::Duration;

use novacron_common::wire::{MAX_TERMINAL_SIDE, TerminalSize};

/// The WebSocket subprotocol a client asks for.
pub const SUBPROTOCOL: &str = "v1.terminal.novacron";
/// Channel: the command's standard input.
pub const STDIN: u8 = 0;
/// Channel: its standard output (on a terminal, all its output).
pub const STDOUT: u8 = 1;
/// Channel: its standard error.
pub const STDERR: u8 = 2;
/// Channel: how it ended, the last message.
pub const STATUS: u8 = 3;
/// Channel: the terminal was resized.
pub const RESIZE: u8 = 4;
/// Channel: the next byte names a channel that ends ([`STDIN`]).
pub const CLOSE: u8 = 255;
/// The largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// What `GET /v1/exec/terminal` runs, from its query string: `node=NAME` or
/// `allocation=ID`, one `command=` per argument, `tty=true` with `cols=` and
/// `rows=` for a pseudo-terminal, and `timeout_ms=`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TerminalQuery {
    /// Run on this node's host.
    pub node: Option<String>,
    /// Run in this allocation's container.
    pub allocation: Option<String>,
    /// The program and its arguments.
    pub command: Vec<String>,
    /// On a pseudo-terminal of this size; `None`: on pipes.
    pub tty: Option<TerminalSize>,
    /// Kill the command after this long.
    pub timeout: Option<Duration>,
}

impl TerminalQuery {
    /// The query string (without `?`).
    pub fn to_query(&self) -> String {
        let mut q = form_urlencoded::Serializer::new(String::new());
        if let Some(node) = &self.node {
            q.append_pair("node", node);
        }
        if let Some(alloc) = &self.allocation {
            q.append_pair("allocation", alloc);
        }
        for arg in &self.command {
            q.append_pair("command", arg);
        }
        if let Some(size) = self.tty {
            q.append_pair("tty", "true");
            q.append_pair("cols", &size.cols.to_string());
            q.append_pair("rows", &size.rows.to_string());
        }
        if let Some(t) = self.timeout {
            q.append_pair("timeout_ms", &t.as_millis().to_string());
        }
        q.finish()
    }

    /// Reads a query string; the error names the parameter at fault.
    pub fn parse(query: &str) -> Result<TerminalQuery, String> {
        let mut out = TerminalQuery::default();
        let (mut tty, mut cols, mut rows) = (false, None, None);
        let side = |name: &str, v: &str| -> Result<u16, String> {
            v.parse::<u16>()
                .ok()
                .filter(|n| (1..=MAX_TERMINAL_SIDE).contains(n))
                .ok_or_else(|| {
                    format!("{name}: {v:?} is not a number from 1 to {MAX_TERMINAL_SIDE}")
                })
        };
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match key.as_ref() {
                "node" => out.node = Some(value.into_owned()),
                "allocation" => out.allocation = Some(value.into_owned()),
                "command" => out.command.push(value.into_owned()),
                "tty" => {
                    tty = match value.as_ref() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        v => return Err(format!("tty: {v:?} is not true or false")),
                    }
                }
                "cols" => cols = Some(side("cols", &value)?),
                "rows" => rows = Some(side("rows", &value)?),
                "timeout_ms" => {
                    let ms = value
                        .parse::<u64>()
                        .ok()
                        .filter(|ms| *ms > 0)
                        .ok_or_else(|| {
                            format!("timeout_ms: {value:?} is not a number of milliseconds above 0")
                        })?;
                    out.timeout = Some(Duration::from_millis(ms));
                }
                other => return Err(format!("unknown parameter {other:?}")),
            }
        }
        if tty {
            out.tty = Some(TerminalSize {
                cols: cols.unwrap_or(80),
                rows: rows.unwrap_or(24),
            });
        }
        if out.node.is_some() == out.allocation.is_some() {
            return Err("give exactly one of node and allocation".into());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_reads_back_as_written() {
        let q = TerminalQuery {
            node: None,
            allocation: Some("a-1".into()),
            command: vec!["sh".into(), "-c".into(), "echo a&b=c; exit 3".into()],
            tty: Some(TerminalSize {
                cols: 120,
                rows: 40,
            }),
            timeout: Some(Duration::from_secs(5)),
        };
        assert_eq!(TerminalQuery::parse(&q.to_query()), Ok(q));
    }

    #[test]
    fn bad_queries_name_what_is_wrong() {
        for (query, error) in [
            ("command=sh", "give exactly one of node and allocation"),
            (
                "node=a&allocation=b&command=sh",
                "give exactly one of node and allocation",
            ),
            ("node=a&tty=yes", "tty: \"yes\""),
            ("node=a&tty=true&cols=0", "cols: \"0\""),
            ("node=a&rows=99999", "rows: \"99999\""),
            ("node=a&timeout_ms=0", "timeout_ms: \"0\""),
            ("node=a&shell=bash", "unknown parameter \"shell\""),
        ] {
            let e = TerminalQuery::parse(query).expect_err(query);
            assert!(e.starts_with(error), "{query}: {e}");
        }
        let plain = TerminalQuery::parse("node=n1&command=cat").expect("parses");
        assert_eq!(plain.tty, None);
    }
}

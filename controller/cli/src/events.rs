//! `novacron events`: read the controller's event log, or follow it live over
//! server-sent events (resuming after a dropped connection with `Last-Event-ID`).

use std::io::Write;
use std::time::{Duration, SystemTime};

use clap::Args;
use novacron_api::{Event, EventPage};

use super::output::{self, OutputError, OutputFormat, TableRow};
use super::{ApiClient, CliError, ClientError};

/// The largest server-sent event block accepted (the controller's events are far
/// smaller); a larger one means the stream is not what it should be.
pub const MAX_SSE_BLOCK: usize = 1024 * 1024;
/// How often a broken follow stream is reopened before giving up.
pub const FOLLOW_RETRIES: u32 = 5;

/// `novacron events` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct EventsArgs {
    /// Only events about this node.
    #[arg(long, add = crate::complete::nodes())]
    pub node: Option<String>,
    /// Only events about this job.
    #[arg(long, add = crate::complete::jobs())]
    pub job: Option<String>,
    /// Only events about this allocation.
    #[arg(long, add = crate::complete::allocs())]
    pub alloc: Option<String>,
    /// Only this type: exact (`job.applied`) or a resource (`job`, `alloc`, `node`, `exec`).
    #[arg(long = "type", value_name = "TYPE")]
    pub kind: Option<String>,
    /// How many of the newest matching events to show first (1 to 1000).
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
    /// Keep printing new events as they happen (Ctrl-C stops).
    #[arg(short, long)]
    pub follow: bool,
}

impl EventsArgs {
    fn query(&self, newest: bool, after: u64) -> Vec<(&'static str, String)> {
        let mut q = vec![
            ("limit", self.limit.to_string()),
            ("after", after.to_string()),
        ];
        if newest {
            q.push(("newest", "true".into()));
        }
        for (key, value) in [
            ("node", &self.node),
            ("job", &self.job),
            ("alloc", &self.alloc),
            ("type", &self.kind),
        ] {
            if let Some(v) = value {
                q.push((key, v.clone()));
            }
        }
        q
    }
}

impl TableRow for Event {
    fn headers() -> &'static [&'static str] {
        &["SEQ", "TIME", "TYPE", "ACTOR", "OBJECT", "MESSAGE"]
    }

    fn cells(&self, now: SystemTime) -> Vec<String> {
        let when = output::from_unix_ms(self.time_unix_ms);
        vec![
            self.seq.to_string(),
            output::ago(now, when),
            self.kind.clone(),
            self.actor.clone(),
            object(self),
            self.message.clone(),
        ]
    }
}

/// The most specific thing an event is about: `alloc/ID`, `job/NAME` or `node/NAME`.
pub fn object(e: &Event) -> String {
    if let Some(a) = &e.alloc {
        format!("alloc/{a}")
    } else if let Some(j) = &e.job {
        format!("job/{j}")
    } else if let Some(n) = &e.node {
        format!("node/{n}")
    } else {
        "-".into()
    }
}

/// One line for a followed event: an absolute time, so a long-running follow
/// stays readable.
pub fn line(e: &Event) -> String {
    let when = output::from_unix_ms(e.time_unix_ms);
    format!(
        "{}  {}  {}  {}  {}",
        humantime::format_rfc3339_seconds(when),
        e.kind,
        e.actor,
        object(e),
        e.message
    )
}

/// Runs `novacron events`.
pub async fn run(
    args: &EventsArgs,
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
    now: SystemTime,
) -> Result<(), CliError> {
    let page: EventPage = client
        .get_with_query(&["v1", "events"], &args.query(true, 0))
        .await?;
    if !args.follow {
        output::write_list(out, format, &page.events, now)?;
        return Ok(());
    }
    for e in &page.events {
        print_followed(out, format, e)?;
    }
    follow(args, client, format, out, page.next_after).await
}

fn print_followed(out: &mut dyn Write, format: OutputFormat, e: &Event) -> Result<(), CliError> {
    match format {
        OutputFormat::Table | OutputFormat::Wide => {
            writeln!(out, "{}", line(e)).map_err(OutputError::Io)?
        }
        // One compact JSON object per line, so `| jq` works on a live stream.
        OutputFormat::Json => {
            serde_json::to_writer(&mut *out, e).map_err(OutputError::Json)?;
            writeln!(out).map_err(OutputError::Io)?;
        }
        OutputFormat::Yaml => {
            writeln!(out, "---").map_err(OutputError::Io)?;
            output::write_value(out, format, e)?;
        }
        OutputFormat::Name | OutputFormat::JsonPath(_) | OutputFormat::Template(_) => {
            output::write_value(out, format, e)?
        }
    }
    out.flush().map_err(OutputError::Io)?;
    Ok(())
}

async fn follow(
    args: &EventsArgs,
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
    mut after: u64,
) -> Result<(), CliError> {
    let mut failures = 0;
    loop {
        let result = follow_once(args, client, format, out, &mut after).await;
        match result {
            // The controller closed the stream (shutting down): reconnect.
            Ok(()) => {}
            Err(CliError::Client(e))
                if e.is_unreachable() || matches!(e, ClientError::Request { .. }) =>
            {
                failures += 1;
                if failures > FOLLOW_RETRIES {
                    return Err(CliError::Client(e));
                }
                tracing::warn!(error = %e, attempt = failures, "event stream interrupted; reconnecting");
            }
            Err(e) => return Err(e),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn follow_once(
    args: &EventsArgs,
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
    after: &mut u64,
) -> Result<(), CliError> {
    let mut response = client
        .stream(
            &["v1", "events", "stream"],
            &args.query(false, *after),
            Duration::from_secs(15),
        )
        .await?;
    let mut parser = SseParser::default();
    loop {
        match response.chunk().await {
            Ok(Some(bytes)) => {
                for block in parser.push(&bytes).map_err(|reason| ClientError::Decode {
                    url: client.api().to_string(),
                    reason,
                })? {
                    match block.event.as_deref() {
                        Some("event") => {
                            let e: Event = serde_json::from_str(&block.data).map_err(|err| {
                                ClientError::Decode {
                                    url: client.api().to_string(),
                                    reason: format!("event {:?}: {err}", block.id),
                                }
                            })?;
                            *after = e.seq;
                            print_followed(out, format, &e)?;
                        }
                        Some("error") => {
                            return Err(ClientError::Request {
                                url: client.api().to_string(),
                                reason: block.data,
                            }
                            .into());
                        }
                        // Keep-alive comments and unknown event types.
                        _ => {}
                    }
                }
            }
            Ok(None) => return Ok(()),
            Err(e) => return Err(client.stream_error(&e).into()),
        }
    }
}

/// One server-sent event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseBlock {
    /// `id:`.
    pub id: Option<String>,
    /// `event:`.
    pub event: Option<String>,
    /// The `data:` lines joined by newlines.
    pub data: String,
}

/// An incremental parser of a `text/event-stream` body, bounded by [`MAX_SSE_BLOCK`].
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: String,
}

impl SseParser {
    /// Feeds bytes; returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<SseBlock>, String> {
        self.buffer.push_str(&String::from_utf8_lossy(bytes));
        if self.buffer.contains('\r') {
            self.buffer = self.buffer.replace("\r\n", "\n").replace('\r', "\n");
        }
        let mut blocks = Vec::new();
        while let Some(end) = self.buffer.find("\n\n") {
            let raw: String = self.buffer.drain(..end + 2).collect();
            let mut block = SseBlock::default();
            let mut data = Vec::new();
            for l in raw.lines() {
                let (field, value) = match l.split_once(':') {
                    Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                    None => (l, ""),
                };
                match field {
                    "id" => block.id = Some(value.to_owned()),
                    "event" => block.event = Some(value.to_owned()),
                    "data" => data.push(value),
                    // Comments (keep-alives) and other fields.
                    _ => {}
                }
            }
            if block.id.is_some() || block.event.is_some() || !data.is_empty() {
                block.data = data.join("\n");
                blocks.push(block);
            }
        }
        if self.buffer.len() > MAX_SSE_BLOCK {
            return Err(format!(
                "an event stream block exceeds {MAX_SSE_BLOCK} bytes without ending; the answer is not a NovaCron event stream"
            ));
        }
        Ok(blocks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_split_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.push(b"id: 7\nevent: event\nda").expect("ok").is_empty());
        let blocks = p.push(b"ta: {\"a\":1}\n\n: keep-alive\n\n").expect("ok");
        assert_eq!(
            blocks,
            [SseBlock {
                id: Some("7".into()),
                event: Some("event".into()),
                data: "{\"a\":1}".into()
            }]
        );
    }

    #[test]
    fn joins_data_lines_and_accepts_crlf() {
        let mut p = SseParser::default();
        let blocks = p.push(b"data: a\r\ndata: b\r\n\r\n").expect("ok");
        assert_eq!(blocks[0].data, "a\nb");
    }

    #[test]
    fn refuses_an_unbounded_block() {
        let mut p = SseParser::default();
        let big = vec![b'x'; MAX_SSE_BLOCK + 1];
        let err = p.push(&big).expect_err("too big");
        assert!(err.contains("exceeds"), "{err}");
    }

    /// Regression (issue 12): the TIME column read `28s ago ago`.
    #[test]
    fn the_time_column_says_ago_once() {
        let e = Event {
            seq: 1,
            time_unix_ms: 1_700_000_000_000,
            kind: "job.applied".into(),
            actor: "admin".into(),
            node: None,
            job: Some("web".into()),
            alloc: None,
            message: "m".into(),
            details: Default::default(),
        };
        let now = output::from_unix_ms(1_700_000_028_000);
        assert_eq!(e.cells(now)[1], "28s ago");
    }

    #[test]
    fn object_prefers_the_most_specific() {
        let mut e = Event {
            seq: 1,
            time_unix_ms: 0,
            kind: "alloc.placed".into(),
            actor: "controller".into(),
            node: Some("n1".into()),
            job: Some("web".into()),
            alloc: Some("web-1".into()),
            message: "m".into(),
            details: Default::default(),
        };
        assert_eq!(object(&e), "alloc/web-1");
        e.alloc = None;
        assert_eq!(object(&e), "job/web");
        e.job = None;
        assert_eq!(object(&e), "node/n1");
    }
}

//! `novacron metrics` and `novacron top`: the controller's metrics history.
//!
//! - `novacron metrics METRIC`: one metric's series over a range (`GET
//!   /v1/metrics/query`) as sparklines (the default), a table of points
//!   (`-o table`) or the API's answer (`-o json`).
//! - `novacron metrics` alone: the metric names, units and meanings (from
//!   [`NODE_METRICS`] and [`ALLOC_METRICS`]; the controller is not asked);
//!   `--storage`: what the history holds and costs (`GET /v1/metrics/storage`).
//! - `novacron top`: a live view of the fleet, at most three requests a frame:
//!   `GET /v1/nodes` (status and latest samples), one `cpu_percent` query for
//!   every node's 5-minute sparkline, and with `--allocs` `GET /v1/allocations`
//!   (each allocation's job; its usage comes from its node's latest sample).
//!
//! Rendering is pure: sparklines, units and tables take their width and time as
//! parameters. Times are written in UTC, as everywhere else in the CLI.

use std::collections::BTreeMap;
use std::io::{self, IsTerminal, Write};
use std::time::{Duration, SystemTime};

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::parser::ValueSource;
use clap::{Args, ValueEnum};
use novacron_api::metrics::{ALLOC_METRICS, MetricInfo, NODE_METRICS, Unit, metric_info};
use novacron_api::{
    AllocView, HistoryStats, MetricsQuery, MetricsQueryResult, NodeView, SeriesAgg, SeriesPoints,
    StepFn,
};
use novacron_common::wire::{AllocationUsage, NetworkSample};
use serde::Serialize;

use super::client::ApiClient;
use super::output::{self, OutputError, OutputFormat, TableRow};
use super::{CliError, ClientError};

/// The `-o` value that asks for sparklines (`metrics`' default).
pub const SPARK: &str = "spark";
/// The bars of a sparkline, lowest first.
pub const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
/// The most series `-o table` shows side by side.
pub const MAX_TABLE_SERIES: usize = 8;
/// The width assumed when standard output is not a terminal.
pub const DEFAULT_COLUMNS: usize = 80;
/// The narrowest sparkline drawn, however narrow the terminal.
pub const MIN_SPARK_WIDTH: usize = 10;
/// How much CPU history `top` draws per node.
pub const TOP_HISTORY: Duration = Duration::from_secs(5 * 60);
/// The step of `top`'s CPU history.
pub const TOP_STEP: Duration = Duration::from_secs(10);
/// The shortest `top --interval`: a frame costs up to three requests.
pub const MIN_TOP_INTERVAL: Duration = Duration::from_secs(1);
/// The spaces between columns, as in the other lists.
const GAP: usize = 3;

/// `novacron metrics` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct MetricsArgs {
    /// The metric (`cpu_percent`, `alloc_memory_bytes`, ...); without one, the
    /// metrics are listed with their units.
    #[arg(value_name = "METRIC", add = crate::complete::metrics())]
    pub metric: Option<String>,
    /// Only this node's series (for allocation metrics, its allocations').
    #[arg(long, add = crate::complete::nodes())]
    pub node: Option<String>,
    /// Only this job's allocations.
    #[arg(long, add = crate::complete::jobs())]
    pub job: Option<String>,
    /// Only this allocation.
    #[arg(long, value_name = "ID", add = crate::complete::allocs())]
    pub alloc: Option<String>,
    /// Only nodes whose labels match (`pool=gpu,zone=a`; for allocation
    /// metrics, the allocations' nodes).
    #[arg(long, value_name = "KEY=VALUE,...")]
    pub selector: Option<String>,
    /// The range's length, ending at --until [default: 1h].
    #[arg(long, value_name = "DURATION", value_parser = parse_since, conflicts_with = "from")]
    pub since: Option<Duration>,
    /// The range's start: Unix milliseconds or RFC 3339
    /// (`2026-01-01T10:00:00Z`, `2026-01-01 12:00:00+02:00`).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub from: Option<u64>,
    /// The range's end: `now` (the default), Unix milliseconds or RFC 3339.
    #[arg(long, value_name = "TIME", value_parser = parse_until)]
    pub until: Option<Until>,
    /// The step between points (`15s`, `1m`) [default: the range over 300].
    #[arg(long, value_name = "DURATION", value_parser = parse_step)]
    pub step: Option<Duration>,
    /// How the points within a step become one [default: mean].
    #[arg(long = "fn", value_name = "FN", value_parser = step_fn_parser())]
    pub function: Option<StepFn>,
    /// How the series combine at each step [default: none: each on its own].
    #[arg(long, value_parser = agg_parser())]
    pub agg: Option<SeriesAgg>,
    /// Read this tier first: `raw`, `1m` or `1h` (rollups) [default: by the
    /// step: raw below a minute, 1m below an hour, else 1h].
    #[arg(long, value_name = "TIER", value_parser = ["raw", "1m", "1h"])]
    pub resolution: Option<String>,
    /// Show what the history holds instead: bytes per value in memory and on
    /// disk, the memory budget, retention.
    #[arg(
        long,
        conflicts_with_all = [
            "metric", "node", "job", "alloc", "selector", "since", "from", "until", "step",
            "function", "agg", "resolution",
        ]
    )]
    pub storage: bool,
}

/// The end of a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// The time the controller answers.
    Now,
    /// Unix milliseconds.
    UnixMs(u64),
}

/// What a `novacron metrics` command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// The metric names (known locally).
    List,
    /// `GET /v1/metrics/storage`.
    Storage,
    /// `GET /v1/metrics/query`.
    Query(Box<MetricsQuery>),
}

impl MetricsArgs {
    /// What these arguments ask for, checked before any request: an unknown
    /// metric or an empty range is refused here, with the accepted values.
    pub fn request(&self) -> Result<Request, CliError> {
        if self.storage {
            return Ok(Request::Storage);
        }
        let Some(metric) = &self.metric else {
            if *self != MetricsArgs::listing() {
                return Err(CliError::Usage(
                    "name a metric, e.g. `novacron metrics cpu_percent --node n1`; `novacron metrics` alone lists them".into(),
                ));
            }
            return Ok(Request::List);
        };
        if metric_info(metric).is_none() {
            return Err(CliError::Usage(unknown_metric(metric)));
        }
        if let (Some(from), Some(Until::UnixMs(until))) = (self.from, self.until)
            && from >= until
        {
            return Err(CliError::Usage(format!(
                "--from {} is not before --until {}: the range is empty",
                utc(from, true),
                utc(until, true)
            )));
        }
        let from = match (self.since, self.from) {
            (Some(d), _) => Some(seconds(d)),
            (None, Some(ms)) => Some(ms.to_string()),
            (None, None) => None,
        };
        Ok(Request::Query(Box::new(MetricsQuery {
            metric: metric.clone(),
            from,
            to: self.until.map(|u| match u {
                Until::Now => "now".to_string(),
                Until::UnixMs(ms) => ms.to_string(),
            }),
            step: self.step.map(seconds),
            function: self.function,
            agg: self.agg,
            node: self.node.clone(),
            job: self.job.clone(),
            allocation: self.alloc.clone(),
            selector: self.selector.clone(),
            resolution: self.resolution.clone(),
        })))
    }

    /// `novacron metrics` with nothing after it.
    fn listing() -> MetricsArgs {
        MetricsArgs {
            metric: None,
            node: None,
            job: None,
            alloc: None,
            selector: None,
            since: None,
            from: None,
            until: None,
            step: None,
            function: None,
            agg: None,
            resolution: None,
            storage: false,
        }
    }
}

/// `novacron top` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct TopArgs {
    /// Also show each allocation: its job, node, CPU (percent of one core),
    /// memory and memory limit.
    #[arg(long)]
    pub allocs: bool,
    /// How often the view is refreshed (at least 1s).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_top_interval)]
    pub interval: Duration,
    /// Print one frame and exit.
    #[arg(long)]
    pub once: bool,
    /// The order of the rows: busiest CPU first, most memory first, or by name.
    #[arg(long, value_enum, default_value_t = TopSort::Cpu)]
    pub sort: TopSort,
}

/// `top --sort`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum TopSort {
    /// Busiest CPU first.
    #[default]
    Cpu,
    /// Most memory first.
    Mem,
    /// By name (allocations: by job, then id).
    Name,
}

/// How `novacron metrics` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// One sparkline per series, with min, mean, max and last.
    Spark,
    /// A time column and one column per series.
    Table,
    /// The API's answer in a machine format (`-o json`, `yaml`, `jsonpath=`, ...).
    Raw(OutputFormat),
}

impl View {
    /// The view `-o` asks for: `given` is what `-o` said on the command line
    /// (none: sparklines).
    pub fn choose(format: OutputFormat, given: Option<&str>) -> View {
        match (given, format) {
            (None, _) | (Some(SPARK), _) => View::Spark,
            (_, OutputFormat::Table | OutputFormat::Wide) => View::Table,
            (_, other) => View::Raw(other),
        }
    }

    /// The format of a plain list or detail view (the metric names, the storage
    /// statistics): a table for sparklines.
    pub fn format(self) -> OutputFormat {
        match self {
            View::Spark | View::Table => OutputFormat::Table,
            View::Raw(format) => format,
        }
    }
}

/// What `-o` said on the command line, if anything (flattened into
/// [`crate::Cli`]): `metrics` draws sparklines unless `-o` names another format,
/// which the parsed format alone (`table` by default) cannot tell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputGiven(Option<String>);

impl OutputGiven {
    /// `-o`'s text, when the command line gave one.
    pub fn text(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl clap::FromArgMatches for OutputGiven {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let given = matches.value_source(OUTPUT_ID) == Some(ValueSource::CommandLine);
        Ok(OutputGiven(
            given
                .then(|| matches.get_raw(OUTPUT_ID)?.next_back()?.to_str())
                .flatten()
                .map(str::to_owned),
        ))
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl clap::Args for OutputGiven {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        cmd
    }
}

/// The id of the global `-o` argument ([`crate::Cli::output`]).
const OUTPUT_ID: &str = "output";

/// The `-o` value parser: [`output::OutputFormatParser`], plus `spark`, which
/// parses as `table` ([`OutputGiven`] tells them apart).
#[derive(Debug, Clone, Copy)]
pub struct OutputParser;

impl TypedValueParser for OutputParser {
    type Value = OutputFormat;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<OutputFormat, clap::Error> {
        if value == SPARK {
            return Ok(OutputFormat::Table);
        }
        output::OutputFormatParser.parse_ref(cmd, arg, value)
    }

    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        let spark = clap::builder::PossibleValue::new(SPARK);
        Some(Box::new(
            output::OutputFormatParser
                .possible_values()
                .into_iter()
                .flatten()
                .chain([spark]),
        ))
    }
}

/// Runs `novacron metrics` for `request` (anything but [`Request::List`],
/// which [`list`] prints without a controller).
pub async fn run(
    request: &Request,
    client: &ApiClient,
    view: View,
    out: &mut dyn Write,
    now: SystemTime,
) -> Result<(), CliError> {
    match request {
        Request::List => list(view, out),
        Request::Storage => {
            let stats: HistoryStats = client
                .get(&["v1", "metrics", "storage"])
                .await
                .map_err(no_history)?;
            output::write_one(out, view.format(), &stats, || storage_detail(&stats, now))?;
            Ok(())
        }
        Request::Query(query) => {
            let result: MetricsQueryResult = client
                .get_with_query(&["v1", "metrics", "query"], &query_pairs(query))
                .await
                .map_err(no_history)?;
            let text = match view {
                View::Raw(format) => return Ok(output::write_value(out, format, &result)?),
                View::Spark => spark_view(&result, terminal_columns()),
                View::Table => table_view(&result)?,
            };
            out.write_all(text.as_bytes()).map_err(OutputError::Io)?;
            Ok(())
        }
    }
}

/// `novacron metrics` alone: every metric with its source, label, unit and help.
pub fn list(view: View, out: &mut dyn Write) -> Result<(), CliError> {
    let rows: Vec<MetricRow> = NODE_METRICS
        .iter()
        .map(|m| MetricRow::new(m, "node"))
        .chain(
            ALLOC_METRICS
                .iter()
                .map(|m| MetricRow::new(m, "allocation")),
        )
        .collect();
    output::write_list(out, view.format(), &rows, SystemTime::UNIX_EPOCH)?;
    Ok(())
}

/// One metric as `novacron metrics` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetricRow {
    /// Its name in queries.
    pub name: &'static str,
    /// `node` or `allocation`.
    pub source: &'static str,
    /// The label that tells a source's series apart (`mount`, `interface`, `gpu`).
    pub label: Option<&'static str>,
    /// Its unit.
    pub unit: Unit,
    /// What it is.
    pub help: &'static str,
}

impl MetricRow {
    fn new(m: &MetricInfo, source: &'static str) -> MetricRow {
        MetricRow {
            name: m.name,
            source,
            label: m.label,
            unit: m.unit,
            help: m.help,
        }
    }
}

impl TableRow for MetricRow {
    fn headers() -> &'static [&'static str] {
        &["METRIC", "SOURCE", "LABEL", "UNIT", "HELP"]
    }

    fn cells(&self, _now: SystemTime) -> Vec<String> {
        vec![
            self.name.to_string(),
            self.source.to_string(),
            self.label.unwrap_or("-").to_string(),
            unit_name(self.unit).to_string(),
            self.help.to_string(),
        ]
    }

    fn resource_name(&self) -> Option<String> {
        Some(format!("metric/{}", self.name))
    }
}

/// `novacron top`: a frame every `args.interval` until Ctrl-C (or one with
/// `--once`). On a terminal each frame replaces the last; otherwise frames are
/// printed one after another, an empty line between them. A controller that
/// cannot be reached is reported in the frame and asked again next time.
pub async fn top(
    args: &TopArgs,
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
    now: SystemTime,
) -> Result<(), CliError> {
    if !format.is_human() {
        return Err(CliError::Usage(
            "`top` is a view for people; for data use `novacron metrics METRIC -o json` or `novacron node list -o json`".into(),
        ));
    }
    let screen = !args.once && io::stdout().is_terminal();
    let live = (!args.once).then_some(args.interval);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let closed = super::stdout_closed(!args.once && !screen);
    tokio::pin!(closed);
    let mut at = now;
    loop {
        let frame = tokio::select! {
            frame = top_frame(args, client, at, live) => frame,
            _ = &mut ctrl_c => return Ok(()),
            _ = &mut closed => return Ok(()),
        };
        let text = match frame {
            Ok(text) => text,
            Err(CliError::Client(e)) if e.is_unreachable() && !args.once => {
                format!("error: {e}\n")
            }
            Err(e) => return Err(e),
        };
        if screen {
            // Cursor home, clear screen.
            write!(out, "\x1b[H\x1b[2J").map_err(OutputError::Io)?;
        }
        out.write_all(text.as_bytes()).map_err(OutputError::Io)?;
        if args.once {
            return Ok(out.flush().map_err(OutputError::Io)?);
        }
        if !screen {
            writeln!(out).map_err(OutputError::Io)?;
        }
        out.flush().map_err(OutputError::Io)?;
        tokio::select! {
            _ = tokio::time::sleep(args.interval) => {}
            _ = &mut ctrl_c => return Ok(()),
            _ = &mut closed => return Ok(()),
        }
        at = SystemTime::now();
    }
}

/// What one `top` frame shows.
#[derive(Debug, Clone, Copy)]
pub struct Fleet<'a> {
    /// `GET /v1/nodes`.
    pub nodes: &'a [NodeView],
    /// The `cpu_percent` query of the last [`TOP_HISTORY`], or why there is none.
    pub cpu: Result<&'a MetricsQueryResult, &'a str>,
    /// `GET /v1/allocations`, with `--allocs`.
    pub allocs: Option<&'a [AllocView]>,
}

/// One `top` frame: a summary line, the nodes, and the allocations when asked
/// for. `live` is the refresh interval of a live view (none for `--once`).
pub fn render_top(
    fleet: &Fleet<'_>,
    sort: TopSort,
    now: SystemTime,
    live: Option<Duration>,
) -> String {
    let ready = fleet
        .nodes
        .iter()
        .filter(|n| n.status == novacron_common::fleet::NodeStatus::Ready)
        .count();
    let mut s = format!(
        "{} UTC   nodes: {} ({ready} ready)",
        utc(novacron_common::clock::unix_ms(now), true),
        fleet.nodes.len()
    );
    if let Some(every) = live {
        s.push_str(&format!(
            "   every {} (Ctrl-C quits)",
            humantime::format_duration(every)
        ));
    }
    s.push('\n');
    if let Err(why) = fleet.cpu {
        s.push_str(&format!("CPU history unavailable: {why}\n"));
    }
    s.push('\n');
    let history: BTreeMap<&str, &[Option<f64>]> = match fleet.cpu {
        Ok(result) => result
            .series
            .iter()
            .filter_map(|p| Some((p.labels.get("node")?.as_str(), p.values.as_slice())))
            .collect(),
        Err(_) => BTreeMap::new(),
    };
    let spark_width = (TOP_HISTORY.as_secs() / TOP_STEP.as_secs()) as usize;
    let mut nodes: Vec<&NodeView> = fleet.nodes.iter().collect();
    let cpu = |n: &NodeView| n.latest.as_ref().map(|l| f64::from(l.cpu.total_percent));
    let mem = |n: &NodeView| {
        n.latest
            .as_ref()
            .filter(|l| l.memory.total_bytes > 0)
            .map(|l| l.memory.used_bytes as f64 * 100.0 / l.memory.total_bytes as f64)
    };
    match sort {
        TopSort::Cpu => nodes.sort_by(|a, b| descending(cpu(a), cpu(b)).then(a.name.cmp(&b.name))),
        TopSort::Mem => nodes.sort_by(|a, b| descending(mem(a), mem(b)).then(a.name.cmp(&b.name))),
        TopSort::Name => nodes.sort_by(|a, b| a.name.cmp(&b.name)),
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let latest = n.latest.as_ref();
            let (rx, tx) = latest.map_or((None, None), |l| {
                let sum = |f: fn(&NetworkSample) -> u64| {
                    Some(l.networks.iter().map(f).sum::<u64>() as f64)
                };
                (sum(|i| i.rx_bytes_per_sec), sum(|i| i.tx_bytes_per_sec))
            });
            vec![
                n.name.clone(),
                if n.cordoned {
                    format!("{},cordoned", n.status)
                } else {
                    n.status.to_string()
                },
                shown(cpu(n), |v| format!("{v:.1}")),
                history
                    .get(n.name.as_str())
                    .map_or_else(String::new, |values| sparkline(values, spark_width)),
                shown(mem(n), |v| format!("{v:.1}")),
                shown(latest.map(|l| f64::from(l.cpu.load[0])), |v| {
                    format!("{v:.2}")
                }),
                shown(rx, |v| value_text(v, Unit::BytesPerSecond)),
                shown(tx, |v| value_text(v, Unit::BytesPerSecond)),
            ]
        })
        .collect();
    s.push_str(&columns(
        &[
            "NODE", "STATUS", "CPU%", "CPU 5M", "MEM%", "LOAD1", "RX", "TX",
        ],
        &rows,
    ));
    if let Some(allocs) = fleet.allocs {
        s.push('\n');
        s.push_str(&alloc_rows(fleet.nodes, allocs, sort));
    }
    s
}

/// `novacron metrics METRIC`'s default view: a line of what was asked, then
/// one line per series: its labels, a sparkline at most `columns` wide
/// overall, then min, mean, max and last in the metric's unit.
pub fn spark_view(result: &MetricsQueryResult, columns_wide: usize) -> String {
    let mut s = describe(result);
    if result.series.is_empty() {
        s.push_str("no series matched\n");
        return s;
    }
    let display = Style::of(result);
    let keys = label_keys(&result.series);
    let mut headers: Vec<String> = if keys.is_empty() {
        vec!["SERIES".to_string()]
    } else {
        keys.iter().map(|k| k.to_uppercase()).collect()
    };
    let mut rows: Vec<Vec<String>> = result
        .series
        .iter()
        .map(|p| {
            let mut row = series_labels(p, &keys, result.agg);
            let stats = Stats::of(&p.values);
            for v in [
                stats.map(|s| s.min),
                stats.map(|s| s.mean),
                stats.map(|s| s.max),
                stats.map(|s| s.last),
            ] {
                row.push(v.map_or_else(|| "-".to_string(), |v| display.text(v)));
            }
            row
        })
        .collect();
    // The sparkline takes what the other columns leave of the terminal.
    let label_count = headers.len();
    let stat_headers = ["MIN", "MEAN", "MAX", "LAST"];
    let fixed: usize = (0..label_count + stat_headers.len())
        .map(|i| {
            let header = if i < label_count {
                headers[i].len()
            } else {
                stat_headers[i - label_count].len()
            };
            rows.iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
                .max(header)
        })
        .sum::<usize>()
        + GAP * (label_count + stat_headers.len());
    let points = result.timestamps.len();
    let width = columns_wide
        .saturating_sub(fixed)
        .max(MIN_SPARK_WIDTH)
        .min(points.max(1));
    for (row, p) in rows.iter_mut().zip(&result.series) {
        row.insert(label_count, sparkline(&p.values, width));
    }
    headers.push("HISTORY".to_string());
    headers.extend(stat_headers.iter().map(|h| h.to_string()));
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    s.push_str(&columns(&headers, &rows));
    s
}

/// `-o table`: a time column (UTC, as the first line says; with the date when
/// the range is longer than a day) and one column per series, headed by the
/// labels that tell the series apart (`n1:/data`). More than
/// [`MAX_TABLE_SERIES`] series are refused, naming what to do instead.
pub fn table_view(result: &MetricsQueryResult) -> Result<String, CliError> {
    let n = result.series.len();
    if n > MAX_TABLE_SERIES {
        return Err(CliError::Usage(format!(
            "{} has {n} series; -o table shows at most {MAX_TABLE_SERIES} side by side: narrow them (--node, --job, --alloc, --selector), combine them (--agg sum|mean|min|max|count), or use -o spark or -o json",
            result.metric
        )));
    }
    let mut s = describe(result);
    if n == 0 {
        s.push_str("no series matched\n");
        return Ok(s);
    }
    let display = Style::of(result);
    let keys = label_keys(&result.series);
    let with_date = result.to_unix_ms.saturating_sub(result.from_unix_ms) > 86_400_000;
    let mut headers = vec!["TIME".to_string()];
    headers.extend(
        result
            .series
            .iter()
            .map(|p| series_labels(p, &keys, result.agg).join(":")),
    );
    let rows: Vec<Vec<String>> = result
        .timestamps
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let mut row = vec![utc(t, with_date)];
            row.extend(result.series.iter().map(|p| {
                p.values
                    .get(i)
                    .copied()
                    .flatten()
                    .map_or_else(|| "-".to_string(), |v| display.text(v))
            }));
            row
        })
        .collect();
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    s.push_str(&columns(&headers, &rows));
    Ok(s)
}

/// `values` as a sparkline of at most `width` characters: one bar per point
/// (adjacent points averaged when there are more than `width`), scaled to the
/// series' own min..max, a space where a point is missing. A flat series is
/// drawn at the lowest bar when it is zero, else at the middle one.
pub fn sparkline(values: &[Option<f64>], width: usize) -> String {
    let points = downsample(values, width);
    let present = points.iter().flatten().copied();
    let (min, max) = present.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    points
        .iter()
        .map(|p| match p {
            None => ' ',
            Some(v) if max - min <= f64::EPSILON * max.abs().max(1.0) => {
                if *v == 0.0 {
                    BARS[0]
                } else {
                    BARS[3]
                }
            }
            Some(v) => {
                let top = (BARS.len() - 1) as f64;
                let i = ((v - min) / (max - min) * top).round();
                BARS[(i as usize).min(BARS.len() - 1)]
            }
        })
        .collect()
}

/// `values` in at most `width` points: when there are more, each output point
/// is the mean of the present values of its run of adjacent inputs (missing
/// when all of them are).
pub fn downsample(values: &[Option<f64>], width: usize) -> Vec<Option<f64>> {
    let (n, width) = (values.len(), width.max(1));
    if n <= width {
        return values.to_vec();
    }
    (0..width)
        .map(|i| {
            let run = &values[i * n / width..(i + 1) * n / width];
            let present: Vec<f64> = run.iter().flatten().copied().collect();
            (!present.is_empty()).then(|| present.iter().sum::<f64>() / present.len() as f64)
        })
        .collect()
}

/// `v` in `unit`: `12.5%`, `3.1GiB`, `1.2MiB/s`, `61.0°C`, `350.0W`, `1.50`.
pub fn value_text(v: f64, unit: Unit) -> String {
    match unit {
        Unit::Percent => format!("{v:.1}%"),
        Unit::Bytes => bytes_text(v),
        Unit::BytesPerSecond => format!("{}/s", bytes_text(v)),
        Unit::Celsius => format!("{v:.1}°C"),
        Unit::Watts => format!("{v:.1}W"),
        Unit::Number => format!("{v:.2}"),
    }
}

/// The detail view of `novacron metrics --storage`.
pub fn storage_detail(s: &HistoryStats, now: SystemTime) -> String {
    let per_value = |b: f64| format!("{b:.2} bytes per value");
    output::key_values(
        "",
        &[
            (
                "Series",
                format!("{} in memory, from {} sources", s.series, s.sources),
            ),
            (
                "Memory (head)",
                format!(
                    "{} values, {} of a {} budget, {}",
                    s.head_values,
                    bytes_text(s.head_bytes as f64),
                    bytes_text(s.head_budget_bytes as f64),
                    per_value(s.head_bytes_per_value)
                ),
            ),
            (
                "Disk (full resolution)",
                format!(
                    "{} values, {}, {}",
                    s.disk_values,
                    bytes_text(s.disk_bytes as f64),
                    per_value(s.disk_bytes_per_value)
                ),
            ),
            ("Disk (1m, 1h rollups)", bytes_text(s.rollup_bytes as f64)),
            (
                "Oldest full-resolution point",
                s.oldest_raw_unix_ms.map_or_else(
                    || "none".to_string(),
                    |ms| output::timestamp(now, output::from_unix_ms(ms)),
                ),
            ),
            (
                "Retention",
                format!(
                    "full resolution {}, 1m rollups {}, 1h rollups {}",
                    span(s.retention_secs[0]),
                    span(s.retention_secs[1]),
                    span(s.retention_secs[2])
                ),
            ),
            (
                "Chunks closed early (memory over budget)",
                s.budget_evictions.to_string(),
            ),
            (
                "Corrupt chunks (skipped, logged)",
                s.corrupt_chunks.to_string(),
            ),
            (
                "Metrics",
                format!("{} (`novacron metrics` lists them)", s.metrics.len()),
            ),
        ],
    )
}

/// The query's parameters as `GET /v1/metrics/query` takes them: the names
/// and values [`MetricsQuery`] serializes to, so the API type stays the one
/// contract.
pub fn query_pairs(query: &MetricsQuery) -> Vec<(&'static str, String)> {
    // Every field serializes to a string (or is skipped), so this cannot fail;
    // were it to, the query would lack a parameter and the controller say so.
    let json = serde_json::to_value(query).unwrap_or_default();
    const NAMES: [&str; 11] = [
        "metric",
        "from",
        "to",
        "step",
        "fn",
        "agg",
        "node",
        "job",
        "allocation",
        "selector",
        "resolution",
    ];
    NAMES
        .into_iter()
        .filter_map(|name| Some((name, json.get(name)?.as_str()?.to_string())))
        .collect()
}

/// Fetches and renders one `top` frame: `GET /v1/nodes`, the `cpu_percent`
/// query and, with `--allocs`, `GET /v1/allocations`, at once.
async fn top_frame(
    args: &TopArgs,
    client: &ApiClient,
    now: SystemTime,
    live: Option<Duration>,
) -> Result<String, CliError> {
    let query = MetricsQuery {
        metric: "cpu_percent".into(),
        from: Some(seconds(TOP_HISTORY)),
        step: Some(seconds(TOP_STEP)),
        agg: Some(SeriesAgg::None),
        ..MetricsQuery::default()
    };
    let pairs = query_pairs(&query);
    let (nodes, cpu, allocs) = tokio::join!(
        client.get::<Vec<NodeView>>(&["v1", "nodes"]),
        client.get_with_query::<MetricsQueryResult>(&["v1", "metrics", "query"], &pairs),
        async {
            if args.allocs {
                client
                    .get::<Vec<AllocView>>(&["v1", "allocations"])
                    .await
                    .map(Some)
            } else {
                Ok(None)
            }
        }
    );
    let nodes = nodes?;
    let allocs = allocs?;
    // Without a history (an older controller, or one still starting) the
    // frame goes on without sparklines.
    let cpu = match cpu {
        Ok(result) => Ok(result),
        Err(e) if e.is_unreachable() || e.is_configuration() => return Err(e.into()),
        Err(e) => Err(no_history(e).to_string()),
    };
    let fleet = Fleet {
        nodes: &nodes,
        cpu: cpu.as_ref().map_err(String::as_str),
        allocs: allocs.as_deref(),
    };
    Ok(render_top(&fleet, args.sort, now, live))
}

/// `e`, or for the bare 404 of a controller that has no `/v1/metrics` paths
/// (no error body), what that means.
fn no_history(e: ClientError) -> ClientError {
    match e {
        ClientError::NotFound { message }
            if Some(message.as_str()) == reqwest::StatusCode::NOT_FOUND.canonical_reason() =>
        {
            ClientError::NotFound {
                message: "this controller keeps no metrics history (it has no /v1/metrics paths): it is older than this CLI".into(),
            }
        }
        other => other,
    }
}

/// The allocation table of a `top` frame: each allocation in a node's latest
/// sample, with its job from `allocs`.
fn alloc_rows(nodes: &[NodeView], allocs: &[AllocView], sort: TopSort) -> String {
    let jobs: BTreeMap<&str, &str> = allocs
        .iter()
        .map(|a| (a.id.as_str(), a.job.as_str()))
        .collect();
    // (job, node, usage) of each allocation a node reported.
    let mut usage: Vec<(&str, &str, &AllocationUsage)> = Vec::new();
    for node in nodes {
        for u in node.latest.iter().flat_map(|l| &l.allocations) {
            let job = jobs.get(u.id.as_str()).copied().unwrap_or("-");
            usage.push((job, node.name.as_str(), u));
        }
    }
    type Row<'a> = (&'a str, &'a str, &'a AllocationUsage);
    let by_name = |a: &Row<'_>, b: &Row<'_>| (a.0, &a.2.id).cmp(&(b.0, &b.2.id));
    match sort {
        TopSort::Cpu => usage.sort_by(|a, b| {
            descending(
                Some(f64::from(a.2.cpu_percent)),
                Some(f64::from(b.2.cpu_percent)),
            )
            .then(by_name(a, b))
        }),
        TopSort::Mem => {
            usage.sort_by(|a, b| b.2.memory_bytes.cmp(&a.2.memory_bytes).then(by_name(a, b)))
        }
        TopSort::Name => usage.sort_by(by_name),
    }
    if usage.is_empty() {
        return "no allocations running\n".to_string();
    }
    let rows: Vec<Vec<String>> = usage
        .iter()
        .map(|(job, node, u)| {
            vec![
                u.id.clone(),
                job.to_string(),
                node.to_string(),
                format!("{:.1}", u.cpu_percent),
                bytes_text(u.memory_bytes as f64),
                match u.memory_limit_bytes {
                    0 => "none".to_string(),
                    limit => bytes_text(limit as f64),
                },
            ]
        })
        .collect();
    columns(&["ALLOC", "JOB", "NODE", "CPU%", "MEMORY", "LIMIT"], &rows)
}

/// The first line of a query's view: the metric, what it is, the range and how
/// the points were made.
fn describe(r: &MetricsQueryResult) -> String {
    let help = metric_info(&r.metric).map_or("", |m| m.help);
    let other_day = r.from_unix_ms / 86_400_000 != r.to_unix_ms / 86_400_000;
    let mut s = format!(
        "{} ({help}), {} to {} UTC, every {}, {} of each step",
        r.metric,
        utc(r.from_unix_ms, true),
        utc(r.to_unix_ms, other_day),
        humantime::format_duration(Duration::from_millis(r.step_ms)),
        r.function.as_str()
    );
    if r.agg != SeriesAgg::None {
        s.push_str(&format!(", {} of the series", r.agg.as_str()));
    }
    s.push_str(&format!(" ({} data)\n", r.resolution));
    s
}

/// How a result's values are written: in the metric's unit, or as a count
/// (`--agg count`).
#[derive(Debug, Clone, Copy)]
enum Style {
    In(Unit),
    Count,
}

impl Style {
    fn of(r: &MetricsQueryResult) -> Style {
        match r.agg {
            SeriesAgg::Count => Style::Count,
            _ => Style::In(metric_info(&r.metric).map_or(Unit::Number, |m| m.unit)),
        }
    }

    fn text(self, v: f64) -> String {
        match self {
            Style::In(unit) => value_text(v, unit),
            Style::Count => format!("{v:.0}"),
        }
    }
}

/// Min, mean, max and last of a series' present values.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Stats {
    min: f64,
    mean: f64,
    max: f64,
    last: f64,
}

impl Stats {
    /// None when no value is present.
    fn of(values: &[Option<f64>]) -> Option<Stats> {
        let present: Vec<f64> = values.iter().flatten().copied().collect();
        let last = *present.last()?;
        Some(Stats {
            min: present.iter().copied().fold(f64::INFINITY, f64::min),
            mean: present.iter().sum::<f64>() / present.len() as f64,
            max: present.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            last,
        })
    }
}

/// The label keys that tell `series` apart (all of them when none differ),
/// `node`, `job` and `allocation` first; none for aggregated series.
fn label_keys(series: &[SeriesPoints]) -> Vec<String> {
    let mut keys: Vec<&String> = series.iter().flat_map(|p| p.labels.keys()).collect();
    keys.sort_by_key(|k| {
        let rank = ["node", "job", "allocation"]
            .iter()
            .position(|first| first == k)
            .unwrap_or(3);
        (rank, k.as_str())
    });
    keys.dedup();
    let differ: Vec<&String> = keys
        .iter()
        .copied()
        .filter(|k| {
            let first = series[0].labels.get(*k);
            series.iter().any(|p| p.labels.get(*k) != first)
        })
        .collect();
    let chosen = if differ.is_empty() { keys } else { differ };
    chosen.into_iter().cloned().collect()
}

/// The values of `keys` in `p`'s labels (`-` where missing), or the
/// aggregation's name for an aggregated series.
fn series_labels(p: &SeriesPoints, keys: &[String], agg: SeriesAgg) -> Vec<String> {
    if keys.is_empty() {
        return vec![agg.as_str().to_string()];
    }
    keys.iter()
        .map(|k| p.labels.get(k).cloned().unwrap_or_else(|| "-".to_string()))
        .collect()
}

/// Bytes in binary units with one decimal: `512B`, `1.0KiB`, `3.1GiB`.
fn bytes_text(v: f64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if v.abs() < 1024.0 {
        return format!("{v:.0}B");
    }
    let mut value = v / 1024.0;
    let mut unit = 0;
    while value.abs() >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

fn unit_name(unit: Unit) -> &'static str {
    match unit {
        Unit::Percent => "percent",
        Unit::Bytes => "bytes",
        Unit::BytesPerSecond => "bytes/s",
        Unit::Celsius => "°C",
        Unit::Watts => "W",
        Unit::Number => "number",
    }
}

/// Seconds in their largest whole unit: `7d`, `36h`, `90m`, `45s`.
fn span(secs: u64) -> String {
    match secs {
        s if s > 0 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s > 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        s if s > 0 && s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// `v` formatted by `f`, or `-`.
fn shown(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".to_string(), f)
}

/// Larger first, missing last.
fn descending(a: Option<f64>, b: Option<f64>) -> std::cmp::Ordering {
    match (a, b) {
        (Some(a), Some(b)) => b.total_cmp(&a),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    }
}

/// Unix milliseconds in UTC: `10:00:00`, or `2026-01-01 10:00:00` with `date`.
fn utc(ms: u64, date: bool) -> String {
    // `YYYY-MM-DDTHH:MM:SSZ`.
    let text = humantime::format_rfc3339_seconds(output::from_unix_ms(ms)).to_string();
    let text = text.trim_end_matches('Z');
    match text.split_once('T') {
        Some((day, time)) if date => format!("{day} {time}"),
        Some((_, time)) => time.to_string(),
        None => text.to_string(),
    }
}

/// Aligned columns without borders ([`GAP`] spaces apart), as the other lists print.
fn columns(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut s = aligned(headers.iter().copied(), &widths);
    for row in rows {
        s.push_str(&aligned(row.iter().map(String::as_str), &widths));
    }
    s
}

/// One line of [`columns`]: each cell padded to its width, the end trimmed.
fn aligned<'a>(cells: impl Iterator<Item = &'a str>, widths: &[usize]) -> String {
    let mut line = String::new();
    for (cell, width) in cells.zip(widths) {
        line.push_str(cell);
        let pad = width.saturating_sub(cell.chars().count()) + GAP;
        line.extend(std::iter::repeat_n(' ', pad));
    }
    line.truncate(line.trim_end().len());
    line.push('\n');
    line
}

/// The width of the terminal on standard output, or [`DEFAULT_COLUMNS`].
fn terminal_columns() -> usize {
    use std::os::fd::AsFd;
    match rustix::termios::tcgetwinsize(io::stdout().as_fd()) {
        Ok(w) if w.ws_col > 0 => usize::from(w.ws_col),
        _ => DEFAULT_COLUMNS,
    }
}

/// The message for a metric that is not in [`NODE_METRICS`] or [`ALLOC_METRICS`].
fn unknown_metric(name: &str) -> String {
    let names = |list: &[MetricInfo]| list.iter().map(|m| m.name).collect::<Vec<_>>().join(", ");
    let close: Vec<&str> = NODE_METRICS
        .iter()
        .chain(ALLOC_METRICS)
        .map(|m| m.name)
        .filter(|n| !name.is_empty() && (n.contains(name) || name.contains(n)))
        .collect();
    let hint = if close.is_empty() {
        String::new()
    } else {
        format!(" (did you mean {}?)", close.join(" or "))
    };
    format!(
        "unknown metric {name:?}{hint}; node metrics: {}; allocation metrics: {}. `novacron metrics` lists them with their units",
        names(NODE_METRICS),
        names(ALLOC_METRICS)
    )
}

/// A duration as the API takes it: whole seconds, `90s`.
fn seconds(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

fn parse_duration(s: &str, what: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. 90s, 15m or 2h"))?;
    if d < Duration::from_secs(1) || d.subsec_nanos() != 0 {
        return Err(format!(
            "{s:?}: {what} is a whole number of seconds, at least 1s"
        ));
    }
    Ok(d)
}

fn parse_since(s: &str) -> Result<Duration, String> {
    parse_duration(s, "--since")
}

fn parse_step(s: &str) -> Result<Duration, String> {
    parse_duration(s, "--step")
}

fn parse_top_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. 2s or 5s"))?;
    if d < MIN_TOP_INTERVAL {
        return Err(format!(
            "{s:?} is too short; use at least {}",
            humantime::format_duration(MIN_TOP_INTERVAL)
        ));
    }
    Ok(d)
}

fn parse_until(s: &str) -> Result<Until, String> {
    if s == "now" {
        return Ok(Until::Now);
    }
    parse_time(s).map(Until::UnixMs)
}

/// Unix milliseconds or RFC 3339 (`T` or a space, `Z` or an offset such as
/// `+02:00`, or no zone: UTC).
fn parse_time(s: &str) -> Result<u64, String> {
    /// Before 1973 in milliseconds: a number this small is Unix seconds.
    const SMALLEST_MS: u64 = 100_000_000_000;
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let ms: u64 = s.parse().map_err(|e| format!("{s:?} is not a time: {e}"))?;
        if ms < SMALLEST_MS {
            return Err(format!(
                "{s} looks like Unix seconds; this takes Unix milliseconds ({s}000) or RFC 3339"
            ));
        }
        return Ok(ms);
    }
    let bad = |why: String| {
        format!(
            "{s:?} is not a time ({why}); use Unix milliseconds or RFC 3339, e.g. 2026-01-01T10:00:00Z"
        )
    };
    // humantime reads UTC only: an offset after the time is applied here.
    let (local, offset_secs) = match s.get(11..).and_then(|t| t.rfind(['+', '-'])) {
        Some(i) => {
            let at = 11 + i;
            let (hours, minutes) = s[at + 1..].split_once(':').unwrap_or((
                s.get(at + 1..at + 3).unwrap_or(""),
                s.get(at + 3..).unwrap_or(""),
            ));
            let hours: i64 = hours.parse().map_err(|_| bad("bad offset".into()))?;
            let minutes: i64 = minutes.parse().map_err(|_| bad("bad offset".into()))?;
            let sign = if s.as_bytes()[at] == b'-' { -1 } else { 1 };
            (&s[..at], sign * (hours * 3600 + minutes * 60))
        }
        None => (s, 0),
    };
    let t = humantime::parse_rfc3339_weak(local).map_err(|e| bad(e.to_string()))?;
    let ms = i64::try_from(novacron_common::clock::unix_ms(t)).map_err(|e| bad(e.to_string()))?;
    u64::try_from(ms - offset_secs * 1000).map_err(|_| bad("before 1970".into()))
}

const STEP_FNS: [StepFn; 4] = [StepFn::Mean, StepFn::Min, StepFn::Max, StepFn::Last];
const SERIES_AGGS: [SeriesAgg; 6] = [
    SeriesAgg::None,
    SeriesAgg::Sum,
    SeriesAgg::Mean,
    SeriesAgg::Min,
    SeriesAgg::Max,
    SeriesAgg::Count,
];

fn step_fn_parser() -> impl TypedValueParser<Value = StepFn> {
    PossibleValuesParser::new(STEP_FNS.map(StepFn::as_str)).map(|s| {
        // The possible values are exactly STEP_FNS' names.
        STEP_FNS
            .into_iter()
            .find(|f| f.as_str() == s)
            .unwrap_or_default()
    })
}

fn agg_parser() -> impl TypedValueParser<Value = SeriesAgg> {
    PossibleValuesParser::new(SERIES_AGGS.map(SeriesAgg::as_str)).map(|s| {
        // The possible values are exactly SERIES_AGGS' names.
        SERIES_AGGS
            .into_iter()
            .find(|a| a.as_str() == s)
            .unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::fixtures::{NOW_UNIX_MS, fixture, now};
    use crate::{Cli, Command};

    /// A series' labels and values.
    type Series<'a> = (Vec<(&'a str, &'a str)>, Vec<Option<f64>>);

    fn result(metric: &str, series: Vec<Series<'_>>) -> MetricsQueryResult {
        let points = series.first().map_or(0, |s| s.1.len());
        let step_ms = 10_000;
        let from = NOW_UNIX_MS - points as u64 * step_ms;
        MetricsQueryResult {
            metric: metric.into(),
            from_unix_ms: from,
            to_unix_ms: NOW_UNIX_MS,
            step_ms,
            function: StepFn::Mean,
            agg: SeriesAgg::None,
            resolution: "raw".into(),
            timestamps: (0..points as u64).map(|i| from + i * step_ms).collect(),
            series: series
                .into_iter()
                .map(|(labels, values)| SeriesPoints {
                    labels: labels
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    values,
                })
                .collect(),
        }
    }

    fn ramp(n: usize) -> Vec<Option<f64>> {
        (0..n).map(|i| Some(i as f64)).collect()
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("novacron").chain(args.iter().copied()))
            .expect("valid arguments")
    }

    fn metrics_args(args: &[&str]) -> MetricsArgs {
        match parse(&[&["metrics"], args].concat()).command {
            Command::Metrics(m) => m,
            other => panic!("not metrics: {other:?}"),
        }
    }

    #[test]
    fn sparkline_spans_min_to_max_with_blanks_for_missing_points() {
        assert_eq!(sparkline(&ramp(8), 80), "▁▂▃▄▅▆▇█");
        let gappy = [Some(10.0), None, Some(30.0), None, Some(20.0)];
        assert_eq!(sparkline(&gappy, 80), "▁ █ ▅");
        assert_eq!(sparkline(&[None, None], 80), "  ");
        assert_eq!(sparkline(&[], 80), "");
    }

    #[test]
    fn a_flat_series_is_low_at_zero_and_in_the_middle_otherwise() {
        assert_eq!(sparkline(&[Some(0.0); 4], 80), "▁▁▁▁");
        assert_eq!(sparkline(&[Some(42.0), None, Some(42.0)], 80), "▄ ▄");
        assert_eq!(sparkline(&[Some(7.0)], 80), "▄");
    }

    #[test]
    fn more_points_than_width_are_averaged_in_adjacent_runs() {
        assert_eq!(
            downsample(&ramp(8), 4),
            [Some(0.5), Some(2.5), Some(4.5), Some(6.5)]
        );
        // A run with some points missing averages the present ones; a run
        // with none is missing.
        let gappy = [Some(1.0), None, None, None, Some(4.0), Some(6.0)];
        assert_eq!(downsample(&gappy, 3), [Some(1.0), None, Some(5.0)]);
        assert_eq!(sparkline(&ramp(300), 30).chars().count(), 30);
        assert_eq!(sparkline(&ramp(300), 30), sparkline(&ramp(30), 30));
        assert_eq!(downsample(&ramp(3), 10), ramp(3), "never stretched");
    }

    #[test]
    fn values_are_written_in_their_units() {
        assert_eq!(value_text(12.345, Unit::Percent), "12.3%");
        assert_eq!(value_text(512.0, Unit::Bytes), "512B");
        assert_eq!(value_text(1024.0, Unit::Bytes), "1.0KiB");
        assert_eq!(value_text(1_048_575.0, Unit::Bytes), "1.0MiB");
        assert_eq!(value_text(3_328_599_654.0, Unit::Bytes), "3.1GiB");
        assert_eq!(value_text(1_258_291.0, Unit::BytesPerSecond), "1.2MiB/s");
        assert_eq!(value_text(0.0, Unit::BytesPerSecond), "0B/s");
        assert_eq!(value_text(61.0, Unit::Celsius), "61.0°C");
        assert_eq!(value_text(350.0, Unit::Watts), "350.0W");
        assert_eq!(value_text(1.5, Unit::Number), "1.50");
    }

    #[test]
    fn spark_view_has_one_line_per_series_with_stats_in_the_unit() {
        let r = result(
            "memory_used_bytes",
            vec![
                (
                    vec![("node", "gpu-1")],
                    vec![Some(1024.0), None, Some(3072.0)],
                ),
                (vec![("node", "cpu-2")], vec![None, None, None]),
            ],
        );
        let v = spark_view(&r, 80);
        let lines: Vec<&str> = v.lines().collect();
        assert_eq!(lines.len(), 4, "{v}");
        assert!(
            lines[0].starts_with("memory_used_bytes (memory in use), "),
            "{v}"
        );
        assert!(
            lines[0].ends_with("every 10s, mean of each step (raw data)"),
            "{v}"
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["NODE", "HISTORY", "MIN", "MEAN", "MAX", "LAST"]
        );
        assert!(lines[2].starts_with("gpu-1   ▁ █ "), "{v}");
        assert!(
            lines[2].ends_with("1.0KiB   2.0KiB   3.0KiB   3.0KiB"),
            "{v}"
        );
        assert_eq!(
            lines[3].split_whitespace().collect::<Vec<_>>(),
            ["cpu-2", "-", "-", "-", "-"]
        );
    }

    #[test]
    fn spark_view_fits_the_terminal_and_names_aggregates() {
        let mut r = result("cpu_percent", vec![(vec![], ramp(300))]);
        r.agg = SeriesAgg::Mean;
        let v = spark_view(&r, 100);
        let lines: Vec<&str> = v.lines().collect();
        assert!(lines[0].contains(", mean of the series"), "{v}");
        assert!(lines[1].starts_with("SERIES"), "{v}");
        assert!(lines[2].starts_with("mean "), "{v}");
        assert_eq!(lines[2].chars().count(), 100, "{v}");
        // A narrow terminal still gets a sparkline, of the minimum width.
        let narrow = spark_view(&r, 20);
        let bars = narrow
            .lines()
            .nth(2)
            .expect("a series")
            .chars()
            .filter(|c| BARS.contains(c));
        assert_eq!(bars.count(), MIN_SPARK_WIDTH);
        r.agg = SeriesAgg::Count;
        assert!(
            spark_view(&r, 100)
                .lines()
                .nth(2)
                .expect("line")
                .ends_with("299")
        );
    }

    #[test]
    fn label_columns_are_those_that_differ() {
        let r = result(
            "disk_percent",
            vec![
                (vec![("node", "n1"), ("mount", "/")], vec![Some(1.0)]),
                (vec![("node", "n1"), ("mount", "/data")], vec![Some(2.0)]),
            ],
        );
        let t = table_view(&r).expect("two series");
        let header: Vec<&str> = t
            .lines()
            .nth(1)
            .expect("header")
            .split_whitespace()
            .collect();
        assert_eq!(header, ["TIME", "/", "/data"]);
        assert_eq!(
            t.lines()
                .nth(2)
                .expect("row")
                .split_whitespace()
                .collect::<Vec<_>>(),
            ["23:59:50", "1.0%", "2.0%"]
        );
        let one = result("load1", vec![(vec![("node", "n1")], vec![Some(1.0)])]);
        let s = spark_view(&one, 80);
        assert!(s.lines().nth(1).expect("header").starts_with("NODE"), "{s}");
    }

    #[test]
    fn table_view_refuses_more_than_eight_series_and_dates_long_ranges() {
        let names: Vec<String> = (0..=MAX_TABLE_SERIES).map(|i| format!("n{i}")).collect();
        let many = result(
            "cpu_percent",
            names
                .iter()
                .map(|n| (vec![("node", n.as_str())], vec![Some(1.0)]))
                .collect(),
        );
        let e = table_view(&many).expect_err("nine series");
        assert!(e.to_string().contains("--agg"), "{e}");
        assert!(e.to_string().contains("-o json"), "{e}");
        assert_eq!(e.exit_code(), crate::EXIT_USAGE);
        let eight = result(
            "cpu_percent",
            names[..MAX_TABLE_SERIES]
                .iter()
                .map(|n| (vec![("node", n.as_str())], vec![Some(1.0), None]))
                .collect(),
        );
        let t = table_view(&eight).expect("eight series");
        assert_eq!(t.lines().count(), 4, "{t}");
        assert!(t.lines().nth(3).expect("row").contains("-"), "{t}");
        let mut long = result("load1", vec![(vec![("node", "n1")], vec![Some(1.0)])]);
        long.from_unix_ms = NOW_UNIX_MS - 2 * 86_400_000;
        long.timestamps = vec![long.from_unix_ms];
        let t = table_view(&long).expect("one series");
        assert!(
            t.lines()
                .nth(2)
                .expect("row")
                .starts_with("2025-12-30 00:00:00"),
            "{t}"
        );
    }

    #[test]
    fn an_unknown_metric_is_refused_before_any_request_with_the_known_names() {
        let e = metrics_args(&["cpu"]).request().expect_err("unknown");
        let msg = e.to_string();
        assert_eq!(e.exit_code(), crate::EXIT_USAGE);
        assert!(
            msg.contains("did you mean cpu_percent or alloc_cpu_percent?"),
            "{msg}"
        );
        for m in NODE_METRICS.iter().chain(ALLOC_METRICS) {
            assert!(msg.contains(m.name), "{} missing: {msg}", m.name);
        }
        let e = metrics_args(&["--node", "n1"])
            .request()
            .expect_err("no metric");
        assert!(e.to_string().contains("name a metric"), "{e}");
        assert_eq!(metrics_args(&[]).request().expect("list"), Request::List);
        assert_eq!(
            metrics_args(&["--storage"]).request().expect("storage"),
            Request::Storage
        );
        assert!(
            Cli::try_parse_from(["novacron", "metrics", "--storage", "cpu_percent"]).is_err(),
            "--storage takes no metric"
        );
    }

    #[test]
    fn the_query_carries_every_flag_under_the_apis_names() {
        let req = metrics_args(&[
            "alloc_memory_bytes",
            "--node",
            "n1",
            "--job",
            "web",
            "--alloc",
            "a1",
            "--selector",
            "pool=gpu",
            "--since",
            "2h",
            "--until",
            "1767225600000",
            "--step",
            "1m",
            "--fn",
            "max",
            "--agg",
            "sum",
        ])
        .request()
        .expect("valid");
        let Request::Query(q) = req else {
            panic!("a query: {req:?}")
        };
        assert_eq!(
            query_pairs(&q),
            [
                ("metric", "alloc_memory_bytes".to_string()),
                ("from", "7200s".into()),
                ("to", "1767225600000".into()),
                ("step", "60s".into()),
                ("fn", "max".into()),
                ("agg", "sum".into()),
                ("node", "n1".into()),
                ("job", "web".into()),
                ("allocation", "a1".into()),
                ("selector", "pool=gpu".into()),
            ]
        );
        let Request::Query(q) = metrics_args(&["load1"]).request().expect("bare") else {
            panic!("a query")
        };
        assert_eq!(query_pairs(&q), [("metric", "load1".to_string())]);
        assert!(Cli::try_parse_from(["novacron", "metrics", "load1", "--fn", "p99"]).is_err());
        assert!(
            Cli::try_parse_from([
                "novacron",
                "metrics",
                "load1",
                "--since",
                "1h",
                "--from",
                "1767225600000"
            ])
            .is_err(),
            "--since and --from conflict"
        );
    }

    #[test]
    fn times_are_unix_milliseconds_or_rfc_3339_with_an_offset() {
        assert_eq!(parse_time("1767225600000"), Ok(NOW_UNIX_MS));
        assert_eq!(parse_time("2026-01-01T00:00:00Z"), Ok(NOW_UNIX_MS));
        assert_eq!(parse_time("2026-01-01 00:00:00"), Ok(NOW_UNIX_MS));
        assert_eq!(parse_time("2026-01-01T02:00:00+02:00"), Ok(NOW_UNIX_MS));
        assert_eq!(parse_time("2025-12-31T19:00:00-0500"), Ok(NOW_UNIX_MS));
        let e = parse_time("1767225600").expect_err("seconds");
        assert!(e.contains("1767225600000"), "{e}");
        assert!(parse_time("yesterday").is_err());
        assert_eq!(parse_until("now"), Ok(Until::Now));
        let e = metrics_args(&[
            "load1",
            "--from",
            "1767225600000",
            "--until",
            "2025-12-31T00:00:00Z",
        ])
        .request()
        .expect_err("empty range");
        assert!(e.to_string().contains("not before"), "{e}");
        assert!(parse_step("500ms").is_err());
        assert_eq!(parse_step("1m"), Ok(Duration::from_secs(60)));
    }

    #[test]
    fn spark_is_the_default_view_and_o_picks_another() {
        let view = |args: &[&str]| {
            let cli = parse(args);
            View::choose(cli.output, cli.output_given.text())
        };
        assert_eq!(view(&["metrics", "load1"]), View::Spark);
        assert_eq!(view(&["metrics", "load1", "-o", "spark"]), View::Spark);
        assert_eq!(view(&["metrics", "load1", "-o", "table"]), View::Table);
        assert_eq!(view(&["-o", "table", "metrics", "load1"]), View::Table);
        assert_eq!(
            view(&["metrics", "-o", "json", "load1"]),
            View::Raw(OutputFormat::Json)
        );
        assert_eq!(parse(&["node", "list"]).output_given.text(), None);
    }

    #[test]
    fn the_metric_list_is_a_table_or_json() {
        let mut out = Vec::new();
        list(View::Spark, &mut out).expect("table");
        let t = String::from_utf8(out).expect("UTF-8");
        assert_eq!(
            t.lines().count(),
            1 + NODE_METRICS.len() + ALLOC_METRICS.len()
        );
        assert!(
            t.lines()
                .any(|l| l.starts_with("disk_percent") && l.contains("mount")),
            "{t}"
        );
        let mut out = Vec::new();
        list(View::Raw(OutputFormat::Json), &mut out).expect("json");
        let json: serde_json::Value = serde_json::from_slice(&out).expect("JSON");
        assert_eq!(json[0]["name"], "cpu_percent");
        assert_eq!(json[0]["unit"], "percent");
    }

    #[test]
    fn top_shows_nodes_with_their_cpu_history_and_allocations() {
        let mut nodes = fixture();
        if let Some(latest) = nodes[0].latest.as_mut() {
            latest.allocations = vec![AllocationUsage {
                id: "web-1a".into(),
                cpu_percent: 35.3,
                memory_bytes: 120 << 20,
                memory_limit_bytes: 512 << 20,
                ..Default::default()
            }];
        }
        let cpu = result("cpu_percent", vec![(vec![("node", "gpu-1")], ramp(31))]);
        let alloc: AllocView = serde_json::from_value(serde_json::json!({
            "id": "web-1a", "job": "web", "version": 1, "node": "gpu-1", "desired_run": true,
            "state": "running", "healthy": null, "healthy_since_unix_ms": null,
            "created_unix_ms": 0, "updated_unix_ms": 0, "restarts": 0, "exit_code": null,
            "message": "", "cpu_millis": 500, "memory_bytes": 0, "gpu_uuids": [], "priority": 0
        }))
        .expect("an AllocView");
        let allocs = [alloc];
        let fleet = Fleet {
            nodes: &nodes,
            cpu: Ok(&cpu),
            allocs: Some(&allocs),
        };
        let f = render_top(&fleet, TopSort::Cpu, now(), None);
        let lines: Vec<&str> = f.lines().collect();
        assert_eq!(
            lines[0], "2026-01-01 00:00:00 UTC   nodes: 2 (1 ready)",
            "{f}"
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            [
                "NODE", "STATUS", "CPU%", "CPU", "5M", "MEM%", "LOAD1", "RX", "TX"
            ]
        );
        let gpu: Vec<&str> = lines[3].split_whitespace().collect();
        assert_eq!(gpu[..3], ["gpu-1", "ready", "12.5"], "{f}");
        assert_eq!(gpu[3].chars().count(), 30, "{f}");
        assert_eq!(gpu[4..], ["19.9", "0.50", "10.0KiB/s", "512B/s"], "{f}");
        assert_eq!(
            lines[4].split_whitespace().collect::<Vec<_>>(),
            ["cpu-2", "down", "-", "-", "-", "-", "-"],
            "{f}"
        );
        assert_eq!(
            lines[7].split_whitespace().collect::<Vec<_>>(),
            ["web-1a", "web", "gpu-1", "35.3", "120.0MiB", "512.0MiB"],
            "{f}"
        );
        let by_name = render_top(&fleet, TopSort::Name, now(), Some(Duration::from_secs(2)));
        assert!(
            by_name
                .lines()
                .next()
                .expect("summary")
                .ends_with("every 2s (Ctrl-C quits)")
        );
        assert!(
            by_name.lines().nth(3).expect("row").starts_with("cpu-2"),
            "{by_name}"
        );
        let without = Fleet {
            cpu: Err("no metrics history"),
            allocs: None,
            ..fleet
        };
        let f = render_top(&without, TopSort::Mem, now(), None);
        assert!(
            f.contains("CPU history unavailable: no metrics history"),
            "{f}"
        );
        assert!(!f.contains("ALLOC"), "{f}");
    }

    #[test]
    fn storage_detail_names_bytes_per_value_budget_and_retention() {
        let stats = HistoryStats {
            series: 120,
            sources: 6,
            head_values: 10_000,
            head_bytes: 15_000,
            head_budget_bytes: 64 << 20,
            head_bytes_per_value: 1.5,
            disk_values: 1_000_000,
            disk_bytes: 900_000,
            disk_bytes_per_value: 0.9,
            rollup_bytes: 2048,
            budget_evictions: 0,
            corrupt_chunks: 1,
            oldest_raw_unix_ms: Some(NOW_UNIX_MS - 3 * 86_400_000),
            retention_secs: [7 * 86_400, 30 * 86_400, 365 * 86_400],
            metrics: vec!["cpu_percent".into()],
        };
        let d = storage_detail(&stats, now());
        for needle in [
            "14.6KiB of a 64.0MiB budget, 1.50 bytes per value",
            "878.9KiB, 0.90 bytes per value",
            "(3d ago)",
            "full resolution 7d, 1m rollups 30d, 1h rollups 365d",
            "Corrupt chunks (skipped, logged):",
        ] {
            assert!(d.contains(needle), "{needle:?} missing in:\n{d}");
        }
    }
}

//! The command line: parses, validates, then wires the engine to the HTTP
//! transport. Exit codes: 0 done, 64 bad arguments (reported before any socket
//! is opened), 1 a failure at run time (the listen address is taken, say).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::engine::{ClosedLoop, OpenLoop, Pacer, closed_loop, open_loop};
use crate::http::{HttpConnector, Target, serve};
use crate::schedule::Plan;
use crate::stats::Report;

/// Bad arguments (BSD `EX_USAGE`).
const EXIT_USAGE: u8 = 64;

/// Open-loop HTTP/1.1 load generator and trivial backend, for proxy benchmarks.
#[derive(Debug, Parser)]
#[command(
    name = "novacron-loadgen",
    version,
    after_help = "Exit codes: 0 done, 64 bad arguments, 1 failure at run time."
)]
pub struct Cli {
    /// Tokio worker threads (default: one per CPU).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Answer every request with 200 and `backend <id>` (HTTP/1.1, keep-alive).
    Serve(ServeArgs),
    /// Open loop: requests at a fixed rate, latency from each scheduled time.
    Run(RunArgs),
    /// Closed loop: every connection as fast as it goes, for the maximum throughput.
    Max(MaxArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on, e.g. 127.0.0.1:18081.
    #[arg(long)]
    listen: SocketAddr,
    /// Name put in every response body.
    #[arg(long, default_value = "a")]
    id: String,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Target, http://HOST:PORT/PATH.
    #[arg(long)]
    url: String,
    /// Requests per second, scheduled at fixed intervals of 1/RATE.
    #[arg(long)]
    rate: NonZeroU32,
    /// Measured window, after the warmup (e.g. 10s, 500ms).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Leading time whose requests are sent but not reported.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Keep-alive connections in the pool.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Requests that may wait for a free connection; beyond it they are dropped
    /// [default: 10 x connections].
    #[arg(long)]
    queue: Option<usize>,
    /// A request not answered this long after its scheduled time is an error.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct MaxArgs {
    /// Target, http://HOST:PORT/PATH.
    #[arg(long)]
    url: String,
    /// Measured window, after the warmup.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Leading time whose requests are not reported.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Keep-alive connections, each with one request in flight.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// A request not answered in this long is an error.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// Parses the command line and runs it; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // Help and version go to stdout and exit 0; everything else is a
            // usage error.
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Err(error) = validate(&cli.command) {
        eprintln!("novacron-loadgen: {error:#}");
        return ExitCode::from(EXIT_USAGE);
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = cli.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = match runtime.build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("novacron-loadgen: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failed::Usage(error)) => {
            eprintln!("novacron-loadgen: {error:#}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failed::Runtime(error)) => {
            eprintln!("novacron-loadgen: {error:#}");
            ExitCode::FAILURE
        }
    }
}

enum Failed {
    Usage(anyhow::Error),
    Runtime(anyhow::Error),
}

/// The checks clap cannot express.
fn validate(command: &Command) -> anyhow::Result<()> {
    let (duration, connections, timeout) = match command {
        Command::Serve(_) => return Ok(()),
        Command::Run(args) => {
            if args.queue == Some(0) {
                bail!("--queue 0: the queue must hold at least one request");
            }
            (args.duration, args.connections, args.timeout)
        }
        Command::Max(args) => (args.duration, args.connections, args.timeout),
    };
    if duration.is_zero() {
        bail!("--duration must be above zero (e.g. 10s)");
    }
    if connections == 0 {
        bail!("--connections must be at least 1");
    }
    if timeout.is_zero() {
        bail!("--timeout must be above zero (e.g. 5s)");
    }
    Ok(())
}

async fn execute(command: Command) -> Result<(), Failed> {
    match command {
        Command::Serve(args) => {
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("cannot listen on {}", args.listen))
                .map_err(Failed::Runtime)?;
            let addr = listener
                .local_addr()
                .map_err(|e| Failed::Runtime(e.into()))?;
            eprintln!(
                "novacron-loadgen serve: backend {} listening on {addr}",
                args.id
            );
            tokio::select! {
                () = serve(listener, &args.id) => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            Ok(())
        }
        Command::Run(args) => {
            let target = Target::resolve(&args.url).await.map_err(Failed::Usage)?;
            let config = OpenLoop {
                plan: Plan {
                    rate: args.rate,
                    warmup: args.warmup,
                    measured: args.duration,
                },
                pacer: Pacer::Thread,
                connections: args.connections,
                queue: args.queue.unwrap_or(args.connections.saturating_mul(10)),
                timeout: args.timeout,
            };
            let report = open_loop(HttpConnector::new(target), &config, &args.url).await;
            print(&report, args.json);
            Ok(())
        }
        Command::Max(args) => {
            let target = Target::resolve(&args.url).await.map_err(Failed::Usage)?;
            let config = ClosedLoop {
                warmup: args.warmup,
                measured: args.duration,
                connections: args.connections,
                timeout: args.timeout,
            };
            let report = closed_loop(HttpConnector::new(target), &config, &args.url).await;
            print(&report, args.json);
            Ok(())
        }
    }
}

fn print(report: &Report, json: bool) {
    if json {
        println!("{}", report.to_json());
    } else {
        print!("{report}");
    }
}

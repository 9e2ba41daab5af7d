//! The operator CLI `novacron`: argument parsing, the context file, the HTTPS client
//! and the rendering of results. The binary only parses arguments, sets up logging
//! and calls [`execute`].
//!
//! Modules:
//! - [`config`]: the context file (`current` plus `[contexts.NAME]`), [`write_context`].
//! - [`client`]: the mutual-TLS API client and its operator-facing errors.
//! - [`output`]: table, JSON and YAML output, human units and ages (pure).
//! - [`nodes`]: `novacron node list|show`.
//! - [`metrics`]: `novacron metrics` (the metrics history: sparklines, tables)
//!   and `novacron top` (a live view of the fleet).
//! - [`context`]: `novacron context list|use|show`.
//! - [`exec`]: `novacron exec` and `novacron alloc exec` (remote commands, live).
//! - [`version`]: `novacron version` (this client's build and the controller's).

pub mod alerts;
pub mod certs;
pub mod checkpoints;
pub mod client;
pub mod complete;
pub mod config;
pub mod context;
pub mod controllers;
pub mod costs;
pub mod dev;
pub mod events;
pub mod exec;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod images;
pub mod jobs;
pub mod metrics;
pub mod nodes;
pub mod output;
pub mod policies;
pub mod pools;
pub mod secrets;
pub mod services;
pub mod simulate;
pub mod terminal;
pub mod version;
pub mod vms;

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use clap::{CommandFactory, Parser, Subcommand};

pub use self::client::{ApiClient, ClientError};
pub use self::config::{ConfigError, Context, ContextFile, Env, ProcessEnv, write_context};
use self::context::ContextCommand;
use self::nodes::NodeCommand;
pub use self::output::{OutputError, OutputFormat};

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: the operation failed (the controller refused it, permission denied,
/// not found, ...).
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: the command line is invalid (clap's usage errors).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the local configuration is bad (context file, CA, certificate, key).
pub const EXIT_CONFIG: u8 = 64;
/// Exit code: the controller cannot be reached.
pub const EXIT_UNAVAILABLE: u8 = 69;

const LONG_ABOUT: &str = "\
Operate a NovaCron fleet through its controller's HTTPS API.

The controller to talk to, the fleet CA and your client certificate come from a
context in the context file (see `novacron context --help`). `novacron dev` writes
one for a local fleet.

Exit codes:
   0  success
   1  the operation failed (permission denied, not found, controller error)
   2  usage error (invalid arguments)
  64  bad configuration: missing or malformed context file, unreadable CA,
      certificate or key, or a certificate the controller refuses
  69  the controller cannot be reached

A closed standard output (`novacron node list | head -1`) ends a command
quietly, with 0.

Logging goes to standard error; set RUST_LOG (for example RUST_LOG=debug) for more.";

const CONTEXT_LONG_ABOUT: &str = "\
Manage controller contexts.

The context file is $NOVACRON_CONFIG or --config, else
$XDG_CONFIG_HOME/novacron/config.toml, else ~/.config/novacron/config.toml:

    current = \"dev\"

    [contexts.dev]
    api = \"https://127.0.0.1:7443\"   # the controller's HTTPS API
    ca = \"/path/to/fleet-ca.pem\"     # the fleet CA
    cert = \"/path/to/operator.pem\"   # your client certificate
    key = \"/path/to/operator-key.pem\" # its private key
    # or, instead of cert and key, an API token (`novacron-controller admin token`):
    # token_file = \"/path/to/token\"

Relative paths are relative to the file's folder. NOVACRON_TOKEN, when set, is
an API token used instead of the context's credentials. `novacron dev` creates a context
for a local fleet; --context NAME picks another context for one command.";

/// `novacron`: the operator CLI.
#[derive(Debug, Clone, Parser)]
#[command(name = "novacron", version, about = "Operate a NovaCron fleet", long_about = LONG_ABOUT)]
pub struct Cli {
    /// Use this context instead of the current one.
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The context file [default: $XDG_CONFIG_HOME/novacron/config.toml, else
    /// ~/.config/novacron/config.toml].
    #[arg(long, global = true, value_name = "PATH", env = config::CONFIG_ENV)]
    pub config: Option<PathBuf>,
    /// What `-o` said on the command line, if anything (not an argument):
    /// `metrics` draws sparklines unless told otherwise.
    #[command(flatten)]
    pub output_given: metrics::OutputGiven,
    /// Output format: table, wide (more columns), json, yaml, name (`job/web`,
    /// one per line) or jsonpath=EXPR (an RFC 9535 query on what `-o json`
    /// prints, one value per line; kubectl's `{.a[*].b}` braces are accepted) or
    /// template=TEXT (minijinja: a list is `items`, an object's fields by name).
    /// `metrics` also takes spark, its default (sparklines).
    #[arg(
        short,
        long,
        global = true,
        value_name = "FORMAT",
        default_value = "table",
        value_parser = metrics::OutputParser
    )]
    pub output: OutputFormat,
    /// Watch the result, built on the controller's blocking queries: each read
    /// waits until the store changes (at most BOUND, default 30s; 5s for `node` and
    /// `pool`, whose liveness and metrics are not in the store's index), until Ctrl-C. On
    /// a terminal a table is redrawn; otherwise (and with -o json|yaml|name|...)
    /// each change is printed once, without a screen header: -o json writes one
    /// JSON document per line (NDJSON). For `node list|show`, `job list|status`,
    /// `alloc list`, `events` (without --follow), `policy list`, `pool list` and `service list|show|lb-config`.
    #[arg(
        short,
        long,
        global = true,
        value_name = "BOUND",
        num_args = 0..=1,
        value_parser = parse_interval
    )]
    pub watch: Option<Option<Duration>>,
    /// The blocking-query state of a running `--watch` (not an argument).
    #[arg(skip)]
    pub watch_index: Option<std::sync::Arc<client::WatchIndex>>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run a local fleet: a controller and agents on this machine, with a throwaway CA.
    Dev(dev::DevArgs),
    /// Submit a manifest (create or update): a Job, an AutoScalingPolicy, a
    /// NodePool / NodeTemplate, a Secret, an AlertRule or a
    /// NotificationChannel, by its `kind`.
    ///
    /// `-f` may repeat; each is a file, `-` (standard input) or a directory (its
    /// *.yaml and *.yml files, sorted, not recursive). A file may hold several Job
    /// documents (`---`), applied in order; the first refusal stops the command.
    Apply {
        /// The YAML manifest: a file, `-` for standard input, or a directory.
        #[arg(short = 'f', long = "file", value_name = "FILE", required = true)]
        file: Vec<PathBuf>,
        /// Apply nothing: show what each Job manifest would change and where
        /// the controller would place it (as `novacron job plan`).
        #[arg(long)]
        dry_run: bool,
    },
    /// Jobs.
    #[command(subcommand)]
    Job(jobs::JobCommand),
    /// Allocations (one replica of a job on one node).
    #[command(subcommand)]
    Alloc(jobs::AllocCommand),
    /// Inspect the fleet's nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// The metrics history: one metric's series over a range as sparklines
    /// (the default), a table (-o table) or the API's answer (-o json). Without a
    /// metric, lists the metrics with their units; --storage shows what the
    /// history holds and costs.
    ///
    /// Examples: `novacron metrics cpu_percent --since 6h`, `novacron metrics
    /// alloc_memory_bytes --job web --agg sum -o table`.
    Metrics(metrics::MetricsArgs),
    /// A live view of the fleet, refreshed every --interval until Ctrl-C: per
    /// node its status, CPU with a 5-minute sparkline, memory, load and network;
    /// with --allocs each allocation's CPU and memory.
    Top(metrics::TopArgs),
    /// Stored checkpoints.
    #[command(subcommand)]
    Checkpoint(checkpoints::CheckpointCommand),
    /// Show the event log (decisions, state changes, operator calls); --follow streams it.
    Events(events::EventsArgs),
    /// Run a command on nodes' hosts, live; exits with its exit code (124: timed
    /// out, 125: did not run, 130: interrupted). See also `alloc exec`.
    Exec(exec::ExecArgs),
    /// Autoscaling policies (apply them with `apply -f`).
    #[command(subcommand)]
    Policy(policies::PolicyCommand),
    /// Alerts: what fires now, rules, channels, silences, acknowledgements and
    /// the Prometheus export (apply AlertRule and NotificationChannel
    /// manifests with `apply -f`).
    #[command(subcommand)]
    Alert(alerts::AlertCommand),
    /// The controller's image store, for fleets without a registry: push images
    /// from this machine's Docker; nodes pull them when a job names them.
    #[command(subcommand)]
    Image(images::ImageCommand),
    /// Secrets that jobs use as variables, files or registry credentials (or
    /// apply a kind: Secret manifest with `apply -f`). Values are never shown.
    #[command(subcommand)]
    Secret(secrets::SecretCommand),
    /// Node pools (apply NodeTemplate and NodePool manifests with `apply -f`).
    #[command(subcommand)]
    Pool(pools::PoolCommand),
    /// Virtual machines: QEMU guests run as one-replica jobs (apply VMTemplate
    /// manifests with `apply -f`).
    #[command(subcommand)]
    Vm(vms::VmCommand),
    /// The service catalog: services, their endpoints, load-balancer configurations.
    #[command(subcommand)]
    Service(services::ServiceCommand),
    /// Certificates: revoke one by serial (admin), list the revoked ones.
    #[command(subcommand)]
    Cert(certs::CertCommand),
    /// The controllers of a highly available group: members, leader, etcd health.
    #[command(subcommand)]
    Controller(controllers::ControllerCommand),
    /// Manage controller contexts.
    #[command(subcommand, long_about = CONTEXT_LONG_ABOUT)]
    Context(ContextCommand),
    /// Print a shell completion script.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// What-if: replay a scenario (load curves, failures, spot interruptions, zone
    /// outages) through the real scheduler, reconciler and autoscaler on a virtual
    /// clock, against a static fleet sized for the peak. Runs locally.
    Simulate(simulate::SimulateArgs),
    /// Hourly cost of the fleet per node, job, pool and capacity type (prices from
    /// node labels, the controller's pricing catalog, or its default rates).
    Cost,
    /// Right-sizing: per job, requests recommended from p95 usage (20% headroom),
    /// what they would save, and idle jobs.
    Recommend,
    /// Consolidation plan: which nodes of managed pools a best-fit-decreasing
    /// repack would free, the moves, and the hourly saving (changes nothing).
    Consolidate,
    /// Print the manual page (roff), generated from this command line:
    /// `novacron man | man -l -`.
    Man,
    /// Print this client's version and git commit, then the controller's.
    Version {
        /// Only this client's; do not ask the controller.
        #[arg(long)]
        client: bool,
    },
}

/// The shortest `--watch` bound.
pub const MIN_WATCH_INTERVAL: Duration = Duration::from_millis(200);
/// How long one read of `--watch` waits for a change at most, by default.
pub const WATCH_WAIT: Duration = Duration::from_secs(30);
/// [`WATCH_WAIT`] for `node` and `pool` commands: liveness and metrics are not in the
/// store's index, so a node is read again at least this often.
pub const NODE_WATCH_WAIT: Duration = Duration::from_secs(5);
/// How long `--watch` waits before reading again after the controller could
/// not be reached.
pub const WATCH_RETRY: Duration = Duration::from_secs(2);

fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); use e.g. 2s or 500ms"))?;
    if d < MIN_WATCH_INTERVAL {
        return Err(format!(
            "{s:?} is too short; use at least {}",
            humantime::format_duration(MIN_WATCH_INTERVAL)
        ));
    }
    Ok(d)
}

/// Whether `--watch` applies to `command` (reads that can be redrawn).
pub fn watchable(command: &Command) -> bool {
    matches!(
        command,
        Command::Node(_)
            | Command::Job(jobs::JobCommand::List | jobs::JobCommand::Status { .. })
            | Command::Policy(policies::PolicyCommand::List)
            | Command::Alert(
                alerts::AlertCommand::List
                    | alerts::AlertCommand::Rules
                    | alerts::AlertCommand::Channels
                    | alerts::AlertCommand::Silences
            )
            | Command::Secret(secrets::SecretCommand::List)
            | Command::Pool(pools::PoolCommand::List)
            | Command::Service(
                services::ServiceCommand::List
                    | services::ServiceCommand::Show { .. }
                    | services::ServiceCommand::LbConfig { .. }
            )
            | Command::Alloc(jobs::AllocCommand::List { .. })
    ) || matches!(&command, Command::Events(args) if !args.follow)
}

/// Errors of a CLI command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The context file or the chosen context is missing or malformed.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A manifest file could not be read.
    #[error("cannot read {path}: {source}")]
    ReadManifest {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The local dev fleet failed.
    #[error(transparent)]
    Dev(dev::DevError),
    /// Talking to the controller failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The result could not be printed.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(io::Error),
    /// The options do not go together.
    #[error("{0}")]
    Usage(String),
    /// An input file is invalid (the message names file, line, field and what is
    /// accepted).
    #[error("{0}")]
    Invalid(String),
    /// A remote command (`exec`) ended with a non-zero code, which becomes the
    /// CLI's own; `message` (when not empty) says why.
    #[error("{message}")]
    Remote {
        /// The exit code.
        code: u8,
        /// Why, or empty when the command's own output says it.
        message: String,
    },
}

impl CliError {
    /// The documented exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(ConfigError::Write { .. } | ConfigError::Encode(_)) => EXIT_FAILURE,
            CliError::Config(_) => EXIT_CONFIG,
            CliError::Client(e) if e.is_configuration() => EXIT_CONFIG,
            CliError::Client(e) if e.is_unreachable() => EXIT_UNAVAILABLE,
            CliError::Remote { code, .. } => *code,
            CliError::Client(_)
            | CliError::Output(_)
            | CliError::Runtime(_)
            | CliError::Dev(_)
            | CliError::ReadManifest { .. } => EXIT_FAILURE,
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Invalid(_) => EXIT_CONFIG,
        }
    }

    /// Whether this is standard output closing early (`novacron node list | head`),
    /// which is not worth reporting.
    fn is_broken_pipe(&self) -> bool {
        let kind = match self {
            CliError::Output(OutputError::Io(e)) => Some(e.kind()),
            // serde_json writes straight into the pipe; its error wraps the I/O one.
            CliError::Output(OutputError::Json(e)) => e.io_error_kind(),
            _ => None,
        };
        kind == Some(io::ErrorKind::BrokenPipe)
    }
}

/// Runs `cli` on a fresh runtime, printing results to stdout and errors to stderr.
/// Returns the exit code.
pub fn execute(cli: Cli) -> u8 {
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::Runtime)
        .and_then(|rt| {
            let mut stdout = io::stdout().lock();
            rt.block_on(run(&cli, &ProcessEnv, &mut stdout, SystemTime::now()))
        });
    match result {
        Ok(()) => EXIT_OK,
        Err(e) if e.is_broken_pipe() => EXIT_OK,
        Err(CliError::Remote { code, message }) if message.is_empty() => code,
        Err(e) => {
            // Nothing better to do if stderr is gone too.
            let _ = writeln!(io::stderr(), "error: {e}");
            e.exit_code()
        }
    }
}

/// Runs `cli`, writing results to `out`. `env` supplies the default context file
/// location and `now` the time ages are computed against.
pub async fn run(
    cli: &Cli,
    env: &dyn Env,
    out: &mut dyn Write,
    now: SystemTime,
) -> Result<(), CliError> {
    if cli.output_given.text() == Some(metrics::SPARK)
        && !matches!(cli.command, Command::Metrics(_))
    {
        return Err(CliError::Usage(
            "-o spark is for `novacron metrics`; use -o table, wide, json, yaml, name, jsonpath=EXPR or template=TEXT here".into(),
        ));
    }
    if let Some(bound) = cli.watch {
        return watch(cli, env, out, bound).await;
    }
    match &cli.command {
        Command::Completion { shell } => {
            // clap_complete panics when its writer fails (a closed pipe), so the
            // script is made in memory and written here.
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "novacron", &mut script);
            out.write_all(&script).map_err(OutputError::Io)?;
            Ok(())
        }
        Command::Simulate(args) => simulate::run(args, cli.output, out),
        Command::Cost => {
            let client = connect(cli, env, now).await?;
            costs::cost(&client, cli.output, out, now).await
        }
        Command::Recommend => {
            let client = connect(cli, env, now).await?;
            costs::recommend(&client, cli.output, out, now).await
        }
        Command::Consolidate => {
            let client = connect(cli, env, now).await?;
            costs::consolidate(&client, cli.output, out).await
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command())
                .render(out)
                .map_err(OutputError::Io)?;
            Ok(())
        }
        Command::Version { client } => {
            let api = if *client {
                None
            } else {
                Some(connect(cli, env, now).await)
            };
            version::run(api, cli.output, out).await
        }
        Command::Context(cmd) => {
            let path = config_path(cli, env)?;
            context::run(cmd, &path, cli.context.as_deref(), cli.output, out, now)
        }
        Command::Dev(args) => {
            let path = config_path(cli, env)?;
            dev::run(args, &path, out).await.map_err(CliError::Dev)
        }
        Command::Apply { file, dry_run } => {
            let client = connect(cli, env, now).await?;
            jobs::apply(&client, file, *dry_run, cli.output, out).await
        }
        Command::Job(cmd) => {
            let client = connect(cli, env, now).await?;
            jobs::run_job(cmd, &client, cli.output, out, now).await
        }
        Command::Alloc(cmd) => {
            let client = connect(cli, env, now).await?;
            jobs::run_alloc(cmd, &client, cli.output, out, now).await
        }
        Command::Node(cmd) => {
            let client = connect(cli, env, now).await?;
            nodes::run(cmd, &client, cli.output, out, now).await
        }
        Command::Metrics(args) => {
            let view = metrics::View::choose(cli.output, cli.output_given.text());
            // Checked before connecting: an unknown metric costs no request.
            let request = args.request()?;
            if request == metrics::Request::List {
                return metrics::list(view, out);
            }
            let client = connect(cli, env, now).await?;
            metrics::run(&request, &client, view, out, now).await
        }
        Command::Top(args) => {
            let client = connect(cli, env, now).await?;
            metrics::top(args, &client, cli.output, out, now).await
        }
        Command::Checkpoint(cmd) => {
            let client = connect(cli, env, now).await?;
            checkpoints::run(cmd, &client, cli.output, out, now).await
        }
        Command::Events(args) => {
            let client = connect(cli, env, now).await?;
            events::run(args, &client, cli.output, out, now).await
        }
        Command::Policy(cmd) => {
            let client = connect(cli, env, now).await?;
            policies::run(cmd, &client, cli.output, out, now).await
        }
        Command::Alert(cmd) => {
            let client = connect(cli, env, now).await?;
            alerts::run(cmd, &client, cli.output, out, now).await
        }
        Command::Vm(cmd) => {
            let client = connect(cli, env, now).await?;
            vms::run(cmd, &client, cli.output, out, now).await
        }
        Command::Pool(cmd) => {
            let client = connect(cli, env, now).await?;
            pools::run(cmd, &client, cli.output, out, now).await
        }
        Command::Image(cmd) => {
            let client = connect(cli, env, now).await?;
            images::run(cmd, &client, cli.output, out, now).await
        }
        Command::Controller(cmd) => {
            let client = connect(cli, env, now).await?;
            controllers::run(cmd, &client, cli.output, out, now).await
        }
        Command::Secret(cmd) => {
            let client = connect(cli, env, now).await?;
            secrets::run(cmd, &client, cli.output, out, now).await
        }
        Command::Service(cmd) => {
            let client = connect(cli, env, now).await?;
            services::run(cmd, &client, cli.output, out, now).await
        }
        Command::Cert(cmd) => {
            let client = connect(cli, env, now).await?;
            certs::run(cmd, &client, cli.output, out, now).await
        }
        Command::Exec(args) => {
            let client = connect(cli, env, now).await?;
            exec::exec(args, &client, cli.output, out).await
        }
    }
}

/// Runs `cli` (without `--watch`) again each time what it shows changes, until
/// Ctrl-C or until standard output is closed. Each frame's first read is a
/// blocking query ([`client::WatchIndex`]) that waits at most `bound` for the
/// store to change. On a terminal a table is redrawn under a header; otherwise
/// (or with a machine format) a frame is printed only when it differs from the
/// last one, `-o json` as one line (NDJSON). A controller that cannot be reached
/// is reported and retried, as watch(1) does; other errors end the watch.
async fn watch(
    cli: &Cli,
    env: &dyn Env,
    out: &mut dyn Write,
    bound: Option<Duration>,
) -> Result<(), CliError> {
    if !watchable(&cli.command) {
        return Err(CliError::Usage(
            "--watch works with `node list|show`, `job list|status`, `alloc list`, `events` (without --follow), `policy list`, `pool list` and `service list|show|lb-config`".into(),
        ));
    }
    // Node, pool and service views change with liveness (and node addresses),
    // which do not move the index.
    let wait = bound.unwrap_or(
        if matches!(
            cli.command,
            Command::Node(_) | Command::Pool(_) | Command::Service(_)
        ) {
            NODE_WATCH_WAIT
        } else {
            WATCH_WAIT
        },
    );
    let index = std::sync::Arc::new(client::WatchIndex::new(wait));
    let once = Cli {
        watch: None,
        watch_index: Some(index.clone()),
        ..cli.clone()
    };
    let screen = io::stdout().is_terminal() && cli.output.is_human();
    let title = std::env::args().collect::<Vec<_>>().join(" ");
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let closed = stdout_closed(!screen);
    tokio::pin!(closed);
    let mut last: Option<Vec<u8>> = None;
    loop {
        let blocking = index.begin_frame();
        let started = std::time::Instant::now();
        let frame = async {
            let mut result = watch_frame(&once, env).await;
            // Ages are computed against the time a frame starts: after a long
            // wait the frame is read again, at once, for current ages.
            if blocking && result.is_ok() && started.elapsed() > Duration::from_secs(1) {
                index.reread();
                result = watch_frame(&once, env).await;
            }
            result
        };
        let frame = tokio::select! {
            r = frame => r,
            _ = &mut ctrl_c => return Ok(()),
            _ = &mut closed => return Ok(()),
        };
        let (frame, retry) = match frame {
            Ok(frame) => (frame, false),
            Err(CliError::Client(e)) if e.is_unreachable() => {
                index.reread(); // the next read starts afresh
                if !screen {
                    let _ = writeln!(io::stderr(), "error: {e}");
                }
                (format!("error: {e}\n").into_bytes(), true)
            }
            Err(e) => return Err(e),
        };
        if screen {
            // Cursor home, clear screen.
            write!(
                out,
                "\x1b[H\x1b[2J{title}    {}\n\n",
                humantime::format_rfc3339_seconds(SystemTime::now())
            )
            .map_err(OutputError::Io)?;
            out.write_all(&frame).map_err(OutputError::Io)?;
        } else if !retry && last.as_ref() != Some(&frame) {
            out.write_all(&stream_frame(cli.output, &frame))
                .map_err(OutputError::Io)?;
            last = Some(frame);
        }
        out.flush().map_err(OutputError::Io)?;
        // A read that carried no index (not in the store, or an error) cannot
        // block: the next one waits here instead.
        if retry || index.seen().is_none() {
            let pause = if retry { WATCH_RETRY.min(wait) } else { wait };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = &mut ctrl_c => return Ok(()),
                _ = &mut closed => return Ok(()),
            }
        }
    }
}

/// One frame of `--watch`: what `cli` prints once.
async fn watch_frame(cli: &Cli, env: &dyn Env) -> Result<Vec<u8>, CliError> {
    let mut frame = Vec::new();
    Box::pin(run(cli, env, &mut frame, SystemTime::now())).await?;
    Ok(frame)
}

/// A frame as `--watch` prints it when it is not redrawing a screen: JSON on one
/// line (NDJSON), YAML as its own document, a table followed by an empty line,
/// anything else as it is.
fn stream_frame(format: OutputFormat, frame: &[u8]) -> Vec<u8> {
    match format {
        OutputFormat::Json => match serde_json::from_slice::<serde_json::Value>(frame) {
            Ok(value) => {
                let mut line = value.to_string().into_bytes();
                line.push(b'\n');
                line
            }
            Err(_) => frame.to_vec(),
        },
        OutputFormat::Yaml => [b"---\n", frame].concat(),
        OutputFormat::Table | OutputFormat::Wide => [frame, b"\n"].concat(),
        _ => frame.to_vec(),
    }
}

/// Resolves when standard output is a pipe or socket whose reader has gone
/// (`novacron job list --watch -o json | head -1`), so that a watch waiting for
/// a change ends then rather than at its next write. Never resolves when `check`
/// is false or standard output cannot be polled (a file).
async fn stdout_closed(check: bool) {
    if check {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        // poll(2) on a thread of its own: it reports POLLERR on a pipe whose
        // reader has gone, and nothing on a file. The thread ends with the watch.
        let spawned = std::thread::Builder::new()
            .name("stdout-watch".into())
            .spawn(move || {
                use rustix::event::{PollFd, PollFlags, Timespec, poll};
                use std::os::fd::AsFd;
                let stdout = io::stdout();
                let fd = stdout.as_fd();
                let second = Timespec {
                    tv_sec: 1,
                    tv_nsec: 0,
                };
                while !tx.is_closed() {
                    let mut fds = [PollFd::new(&fd, PollFlags::empty())];
                    match poll(&mut fds, Some(&second)) {
                        Ok(_) if fds[0].revents().intersects(PollFlags::ERR | PollFlags::HUP) => {
                            let _ = tx.send(());
                            return;
                        }
                        Ok(_) | Err(rustix::io::Errno::INTR) => {}
                        Err(_) => return,
                    }
                }
            });
        if spawned.is_ok() && rx.await.is_ok() {
            return;
        }
    }
    std::future::pending::<()>().await;
}

/// The context file: `--config` (or `NOVACRON_CONFIG`), else the default location.
pub fn config_path(cli: &Cli, env: &dyn Env) -> Result<PathBuf, ConfigError> {
    match &cli.config {
        Some(path) => Ok(path.clone()),
        None => config::default_config_path(env).ok_or(ConfigError::NoConfigPath),
    }
}

/// A client for the context chosen by `cli`.
async fn connect(cli: &Cli, env: &dyn Env, now: SystemTime) -> Result<ApiClient, CliError> {
    let path = config_path(cli, env)?;
    let file = ContextFile::load(&path)?;
    let (name, ctx) = file.select(cli.context.as_deref(), &path)?;
    let token = env.var(config::TOKEN_ENV).filter(|t| !t.trim().is_empty());
    let ctx = ctx.resolved(&path);
    let client = if ctx.also.is_empty() {
        ApiClient::with_token(&name, &ctx, token, now)?
    } else {
        leading(&name, &ctx, token, now).await?
    };
    Ok(match &cli.watch_index {
        Some(index) => client.watching(index.clone()),
        None => client,
    })
}

/// How long `connect` waits for each controller of a group to answer `/healthz`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// A client of the first controller of the context's group (`api`, then
/// `also`) that answers `/healthz` within [`PROBE_TIMEOUT`]: only the leader
/// serves, and a paused or hung one accepts TCP but never answers. When none
/// answers, a client of `api` (the command then says it is unreachable).
async fn leading(
    name: &str,
    ctx: &config::Context,
    token: Option<String>,
    now: SystemTime,
) -> Result<ApiClient, CliError> {
    let mut probes = Vec::new();
    for url in std::iter::once(&ctx.api).chain(&ctx.also) {
        let one = config::Context {
            api: url.clone(),
            ..ctx.clone()
        };
        let client = ApiClient::with_token(name, &one, token.clone(), now)?;
        probes.push(async move {
            let up = tokio::time::timeout(PROBE_TIMEOUT, client.healthy())
                .await
                .unwrap_or(false);
            (up, client)
        });
    }
    let mut first = None;
    for (up, client) in futures_util::future::join_all(probes).await {
        if up {
            return Ok(client);
        }
        first.get_or_insert(client);
    }
    Ok(first.expect("the context names at least one controller"))
}

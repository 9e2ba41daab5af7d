//! The operator CLI `novacron`: argument parsing, the context file, the HTTPS client
//! and the rendering of results. The binary only parses arguments, sets up logging
//! and calls [`execute`].
//!
//! Modules:
//! - [`config`]: the context file (`current` plus `[contexts.NAME]`), [`write_context`].
//! - [`client`]: the mutual-TLS API client and its operator-facing errors.
//! - [`output`]: table, JSON and YAML output, human units and ages (pure).
//! - [`nodes`]: `novacron node list|show`.
//! - [`context`]: `novacron context list|use|show`.

pub mod client;
pub mod config;
pub mod context;
pub mod dev;
pub mod jobs;
pub mod nodes;
pub mod output;

use std::io::{self, Write};
use std::path::PathBuf;
use std::time::SystemTime;

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

Relative paths are relative to the file's folder. `novacron dev` creates a context
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
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Run a local fleet: a controller and agents on this machine, with a throwaway CA.
    Dev(dev::DevArgs),
    /// Submit a job manifest (create or update).
    Apply {
        /// The YAML manifest.
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
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
    /// Manage controller contexts.
    #[command(subcommand, long_about = CONTEXT_LONG_ABOUT)]
    Context(ContextCommand),
    /// Print a shell completion script.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
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
}

impl CliError {
    /// The documented exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(ConfigError::Write { .. } | ConfigError::Encode(_)) => EXIT_FAILURE,
            CliError::Config(_) => EXIT_CONFIG,
            CliError::Client(e) if e.is_configuration() => EXIT_CONFIG,
            CliError::Client(e) if e.is_unreachable() => EXIT_UNAVAILABLE,
            CliError::Client(_)
            | CliError::Output(_)
            | CliError::Runtime(_)
            | CliError::Dev(_)
            | CliError::ReadManifest { .. } => EXIT_FAILURE,
        }
    }

    /// Whether this is standard output closing early (`novacron node list | head`),
    /// which is not worth reporting.
    fn is_broken_pipe(&self) -> bool {
        matches!(self, CliError::Output(OutputError::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe)
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
    match &cli.command {
        Command::Completion { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "novacron", out);
            Ok(())
        }
        Command::Context(cmd) => {
            let path = config_path(cli, env)?;
            context::run(cmd, &path, cli.context.as_deref(), cli.output, out, now)
        }
        Command::Dev(args) => {
            let path = config_path(cli, env)?;
            dev::run(args, &path, out).await.map_err(CliError::Dev)
        }
        Command::Apply { file } => {
            let client = connect(cli, env, now)?;
            jobs::apply(&client, file, cli.output, out).await
        }
        Command::Job(cmd) => {
            let client = connect(cli, env, now)?;
            jobs::run_job(cmd, &client, cli.output, out, now).await
        }
        Command::Alloc(cmd) => {
            let client = connect(cli, env, now)?;
            jobs::run_alloc(cmd, &client, cli.output, out, now).await
        }
        Command::Node(cmd) => {
            let client = connect(cli, env, now)?;
            nodes::run(cmd, &client, cli.output, out, now).await
        }
    }
}

/// The context file: `--config` (or `NOVACRON_CONFIG`), else the default location.
pub fn config_path(cli: &Cli, env: &dyn Env) -> Result<PathBuf, ConfigError> {
    match &cli.config {
        Some(path) => Ok(path.clone()),
        None => config::default_config_path(env).ok_or(ConfigError::NoConfigPath),
    }
}

/// A client for the context chosen by `cli`.
fn connect(cli: &Cli, env: &dyn Env, now: SystemTime) -> Result<ApiClient, CliError> {
    let path = config_path(cli, env)?;
    let file = ContextFile::load(&path)?;
    let (name, ctx) = file.select(cli.context.as_deref(), &path)?;
    Ok(ApiClient::new(&name, &ctx.resolved(&path), now)?)
}

#[cfg(test)]
mod tests;

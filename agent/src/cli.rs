//! `novacron-agent` command line: `join` and `run`.
//!
//! Exit codes: 0 success; 1 runtime failure; 2 usage error; 64 bad configuration
//! (reported before any socket is opened); 69 the controller refused or could not
//! be reached during `join`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use novacron_common::backoff::Backoff;
use novacron_common::fleet::Liveness;
use novacron_common::pki::Fingerprint;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::buffer::DEFAULT_CAPACITY;
use crate::collect::{self, Sampler, SysinfoCollector};
use crate::enroll::{self, EnrollError, JoinOptions, StateDir};
use crate::link::{self, AgentConfig};
use crate::runtime::{DockerRuntime, Supervisor, SupervisorConfig};

/// Exit code for bad configuration.
pub const EXIT_CONFIG: i32 = 64;
/// Exit code when the controller refused or was unreachable.
pub const EXIT_UNAVAILABLE: i32 = 69;
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/novacron/agent";

/// The NovaCron host agent.
#[derive(Debug, Parser)]
#[command(name = "novacron-agent", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enroll this host with a controller (makes a key, sends a CSR, stores the certificate).
    Join(JoinArgs),
    /// Run the agent: sample metrics and stream them to the controller.
    Run(RunArgs),
}

/// `join` arguments.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The controller's API URL, e.g. https://controller.example:7443.
    #[arg(long, env = "NOVACRON_CONTROLLER")]
    pub controller: String,
    /// The join token from `novacron-controller token create`.
    #[arg(long, env = "NOVACRON_JOIN_TOKEN", hide_env_values = true)]
    pub token: String,
    /// The fleet CA fingerprint to pin, `sha256:<64 hex digits>`.
    #[arg(long, env = "NOVACRON_CA_FINGERPRINT")]
    pub ca_fingerprint: String,
    /// The node name to ask for (default: this host's name, lowercased).
    #[arg(long, env = "NOVACRON_NODE_NAME")]
    pub name: Option<String>,
    /// Where the identity is kept.
    #[arg(long, env = "NOVACRON_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Replace an existing enrollment.
    #[arg(long)]
    pub force: bool,
}

/// `run` arguments.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Where the identity is kept.
    #[arg(long, env = "NOVACRON_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// A node label `key=value` (repeatable), e.g. --label zone=eu-1a.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Sampling interval (e.g. 1s, 500ms).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Samples kept while disconnected (default: 15 minutes at 1 s).
    #[arg(long, default_value_t = DEFAULT_CAPACITY)]
    pub buffer: usize,
    /// Docker endpoint, e.g. unix:///var/run/docker.sock.
    #[arg(long, env = "DOCKER_HOST")]
    pub docker_host: Option<String>,
    /// Overrides the controller's QUIC address (`host:port`) recorded at enrollment.
    #[arg(long, env = "NOVACRON_CONTROLLER_QUIC")]
    pub controller: Option<String>,
    /// QUIC keep-alive interval.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub keep_alive: Duration,
    /// QUIC idle timeout (a silent controller is considered gone after this).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Longest reconnect delay.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub max_backoff: Duration,
}

/// Runs the command line; returns the process exit code.
pub async fn main(cli: Cli) -> i32 {
    match cli.command {
        Command::Join(args) => join(args).await,
        Command::Run(args) => run(args).await,
    }
}

async fn join(args: JoinArgs) -> i32 {
    let fingerprint: Fingerprint = match args.ca_fingerprint.parse() {
        Ok(f) => f,
        Err(e) => return config_error(&format!("--ca-fingerprint: {e}")),
    };
    let name = args.name.unwrap_or_else(default_node_name);
    let opts = JoinOptions {
        controller: args.controller,
        token: args.token,
        ca_fingerprint: fingerprint,
        node_name: name,
        state: StateDir::new(args.state_dir),
        force: args.force,
    };
    match enroll::join(&opts).await {
        Ok(e) => {
            println!(
                "enrolled as node {:?}; identity stored in {}\nnext: novacron-agent run --state-dir {}",
                e.node_name,
                opts.state.dir.display(),
                opts.state.dir.display()
            );
            0
        }
        Err(e @ (EnrollError::Invalid(_) | EnrollError::AlreadyEnrolled { .. })) => {
            config_error(&e.to_string())
        }
        Err(e @ (EnrollError::Unreachable { .. } | EnrollError::Refused { .. })) => {
            eprintln!("error: {e}");
            EXIT_UNAVAILABLE
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

async fn run(args: RunArgs) -> i32 {
    let labels = match parse_labels(&args.labels) {
        Ok(l) => l,
        Err(e) => return config_error(&e),
    };
    if args.interval < Duration::from_millis(100) || args.interval > Duration::from_secs(3600) {
        return config_error(&format!(
            "--interval {:?}: expected between 100ms and 1h",
            args.interval
        ));
    }
    if !(1..=1_000_000).contains(&args.buffer) {
        return config_error(&format!(
            "--buffer {}: expected 1 to 1000000 samples",
            args.buffer
        ));
    }
    if args.keep_alive >= args.idle_timeout {
        return config_error(&format!(
            "--keep-alive {:?} must be shorter than --idle-timeout {:?}",
            args.keep_alive, args.idle_timeout
        ));
    }
    let state = StateDir::new(&args.state_dir);
    let enrollment = match state.load_enrollment() {
        Ok(e) => e,
        Err(e) => return config_error(&e.to_string()),
    };
    if let Err(e) = state.load_credentials() {
        return config_error(&e.to_string());
    }
    let docker = match DockerRuntime::new(args.docker_host.as_deref()) {
        Ok(d) => d,
        Err(e) => {
            return config_error(&format!(
                "--docker-host {:?}: {e}",
                args.docker_host.as_deref().unwrap_or("(default)")
            ));
        }
    };
    let supervisor = Supervisor::new(docker, SupervisorConfig::new(enrollment.node_name.clone()));
    let gpus = collect::detect_gpus();
    let capabilities = collect::capabilities(args.docker_host.as_deref(), gpus.as_ref()).await;
    let host = match SysinfoCollector::new() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: cannot read host metrics: {e}");
            return 1;
        }
    };
    let mut sampler = Sampler::new(Box::new(host), gpus);
    let capacity = sampler.capacity();
    let config = AgentConfig {
        state,
        labels,
        interval: args.interval,
        buffer_capacity: args.buffer,
        backoff: Backoff {
            max: args.max_backoff,
            ..Backoff::default()
        },
        liveness: Liveness {
            keep_alive: args.keep_alive,
            idle_timeout: args.idle_timeout,
            ..Liveness::default()
        },
        docker_host: args.docker_host,
        controller: args.controller,
    };
    let cancel = CancellationToken::new();
    let stopper = cancel.clone();
    tokio::spawn(async move {
        novacron_common::signal::shutdown_signal().await;
        info!("stopping on signal");
        stopper.cancel();
    });
    match link::run(config, sampler, capacity, capabilities, supervisor, cancel).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// Parses `key=value` labels with the same rules as node names for keys
/// (plus '/' for prefixes such as `novacron.io/pool`).
pub fn parse_labels(raw: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for item in raw {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("--label {item:?}: expected KEY=VALUE, e.g. zone=eu-1a"))?;
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        let value_ok = v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !key_ok {
            return Err(format!(
                "--label {item:?}: key {k:?} must be 1-63 characters of letters, digits, '-', '_', '.', '/'"
            ));
        }
        if !value_ok {
            return Err(format!(
                "--label {item:?}: value {v:?} must be at most 63 characters of letters, digits, '-', '_', '.'"
            ));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(format!("--label {item:?}: key {k:?} given twice"));
        }
    }
    Ok(out)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}; expected e.g. 500ms, 2s, 1m"))
}

fn default_node_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name: String = raw
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    if name.is_empty() { "node".into() } else { name }
}

fn config_error(msg: &str) -> i32 {
    eprintln!("configuration error: {msg}");
    EXIT_CONFIG
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_and_bad_ones_name_the_problem() {
        let ok = parse_labels(&["zone=a".into(), "novacron.io/pool=gpu".into()]).expect("valid");
        assert_eq!(ok.get("zone").map(String::as_str), Some("a"));
        for (bad, needle) in [
            ("zone", "expected KEY=VALUE"),
            ("=a", "key \"\""),
            ("zone=a b", "value \"a b\""),
        ] {
            let err = parse_labels(&[bad.to_string()]).expect_err(bad);
            assert!(err.contains(needle), "{err}");
        }
        let err = parse_labels(&["a=1".into(), "a=2".into()]).expect_err("dup");
        assert!(err.contains("given twice"));
    }
}

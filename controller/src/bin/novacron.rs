//! `novacron`, the operator CLI. All logic lives in `novacron_controller::cli`.

use std::process::ExitCode;

use clap::Parser;
use novacron_controller::cli::{self, Cli};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let args = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    ExitCode::from(cli::execute(args))
}

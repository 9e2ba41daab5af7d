//! `novacron`, the operator CLI. All logic lives in the `novacron_cli` library.

use std::process::ExitCode;

use clap::Parser;
use novacron_cli::{self as cli, Cli};

fn main() -> ExitCode {
    let args = Cli::parse();
    novacron_common::logging::init("warn");
    ExitCode::from(cli::execute(args))
}

//! `novacron`, the operator CLI. All logic lives in `novacron_controller::cli`.

use std::process::ExitCode;

use clap::Parser;
use novacron_controller::cli::{self, Cli};

fn main() -> ExitCode {
    let args = Cli::parse();
    novacron_common::logging::init("warn");
    ExitCode::from(cli::execute(args))
}

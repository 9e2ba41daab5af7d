//! `novacron`, the operator CLI. All logic lives in the `novacron_cli` library.

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use novacron_cli::{self as cli, Cli};

fn main() -> ExitCode {
    // `COMPLETE=bash novacron` prints the dynamic completion script; the shell
    // then runs `novacron` with COMPLETE set to ask for candidates.
    clap_complete::CompleteEnv::with_factory(Cli::command).complete();
    let args = Cli::parse();
    novacron_common::logging::init("warn");
    ExitCode::from(cli::execute(args))
}

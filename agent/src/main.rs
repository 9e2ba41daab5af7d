//! `novacron-agent`: parses the command line and runs it. See `cli` for exit codes.

use clap::Parser;
use novacron_agent::cli::{self, Cli};

fn main() {
    let cli = Cli::parse();
    // One worker thread: the agent's work is small and its footprint matters.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(cli::main(cli));
    std::process::exit(code);
}

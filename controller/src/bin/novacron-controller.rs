//! `novacron-controller`: parses the command line and runs it. See `ctl` for exit codes.

use clap::Parser;
use novacron_controller::ctl::{self, Cli};

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = runtime.block_on(ctl::main(cli));
    std::process::exit(code);
}

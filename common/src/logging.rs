//! Logging setup shared by the binaries: `tracing` to standard error, filtered by
//! `RUST_LOG` (for example `RUST_LOG=debug` or `RUST_LOG=novacron_agent=trace`).

/// Installs the global subscriber; `default` is the filter when `RUST_LOG` is
/// unset or invalid (`info`, `warn`, ...).
pub fn init(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

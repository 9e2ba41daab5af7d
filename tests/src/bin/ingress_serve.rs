//! `novacron-ingress-serve`: the agent's ingress (`novacron_agent::ingress`, the
//! code an agent runs for `spec.services[].ingress`) serving one service with a
//! fixed table, without a controller: the proxy under test in the ingress
//! benchmark (`tests/loadgen/bench.sh`, BENCHMARKS.md), side by side with HAProxy
//! over the same endpoints. Runs until killed.
//!
//! Run: `target/release/novacron-ingress-serve --listen 127.0.0.1:18090
//! --endpoint 127.0.0.1:18081 --endpoint 127.0.0.1:18082`

use std::net::SocketAddr;

use anyhow::{Result, bail};
use clap::Parser;
use novacron_common::wire::{IngressEndpoint, IngressProtocol, IngressService, IngressTable};

/// The agent's ingress with a fixed table.
#[derive(Debug, Parser)]
struct Args {
    /// Where to listen (IP:PORT).
    #[arg(long)]
    listen: SocketAddr,
    /// An endpoint (IP:PORT); repeat for more.
    #[arg(long = "endpoint", required = true)]
    endpoints: Vec<SocketAddr>,
    /// `http` or `tcp`.
    #[arg(long, default_value = "http")]
    protocol: String,
    /// Worker threads of the ingress runtime (the agent uses one per CPU, at most 4).
    #[arg(long)]
    workers: Option<usize>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let protocol = match args.protocol.as_str() {
        "http" => IngressProtocol::Http,
        "tcp" => IngressProtocol::Tcp,
        other => bail!("--protocol {other:?}: expected http or tcp"),
    };
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(4)));
    let ingress = novacron_agent::ingress::Ingress::new(args.listen.ip(), workers);
    ingress.apply(IngressTable {
        revision: 1,
        services: vec![IngressService {
            name: "bench".into(),
            port: args.listen.port(),
            protocol,
            tls: None,
            endpoints: args
                .endpoints
                .iter()
                .enumerate()
                .map(|(i, address)| IngressEndpoint {
                    alloc: format!("endpoint-{i}"),
                    address: *address,
                    weight: 100,
                })
                .collect(),
        }],
        ..IngressTable::default()
    });
    eprintln!(
        "ingress serving {} over {} endpoints with {workers} workers",
        args.listen,
        args.endpoints.len()
    );
    loop {
        std::thread::park();
    }
}

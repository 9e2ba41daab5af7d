//! `novacron-agent` command line: `join` and `run`.
//!
//! Settings come from the TOML file, the environment and the flags, in that order
//! (flags win); [`crate::config`] merges and checks them.
//!
//! Exit codes ([`EXIT_CODES`]): 0 success; 1 runtime failure; 2 usage error; 64
//! bad configuration (reported before any socket is opened); 69 the controller
//! refused or could not be reached during `join`; 76 the controller was not
//! trusted during `join` (its certificate does not match the pinned CA
//! fingerprint, or its answer does not). A Docker address the agent cannot use (`ftp://...`) is
//! bad configuration; a Docker socket that does not exist yet, or a daemon that is
//! down, is not: `run` goes on (metrics, the link) and reaches Docker once it is up.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use novacron_common::backoff::Backoff;
use novacron_common::fleet::Liveness;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::checkpoint::{self, Checkpointer};
use crate::collect::{self, Sampler, SysinfoCollector};
use crate::config::{self, JoinFlags, ProcessEnv, RunFlags};
use crate::enroll::{self, EnrollError, JoinOptions, StateDir};
use crate::exec::HostExecPolicy;
use crate::link::{self, AgentConfig};
use crate::migrate::CheckpointService;
use crate::runtime::{DockerRuntime, HostRuntime, Supervisor, SupervisorConfig};
use crate::spot::{SpotSource, SpotWatcher};

/// Exit code for bad configuration.
pub const EXIT_CONFIG: i32 = 64;
/// Exit code when the controller refused or was unreachable.
pub const EXIT_UNAVAILABLE: i32 = 69;
/// Exit code when the controller is not trusted (sysexits' EX_PROTOCOL): its TLS
/// certificate does not chain to the pinned CA, or its answer names another CA.
/// Retrying does not help; the fingerprint or the URL is wrong.
pub const EXIT_UNTRUSTED: i32 = 76;

/// The exit codes, as `--help` shows them.
pub const EXIT_CODES: &str = "\
Exit codes:
   0  success
   1  runtime failure
   2  usage error
  64  bad configuration (reported before any socket is opened)
  69  join: the controller refused the enrollment or cannot be reached
  76  join: the controller is not trusted: its certificate does not match the
      pinned --ca-fingerprint (wrong fingerprint, or not the controller meant)";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = config::DEFAULT_STATE_DIR;

/// The NovaCron host agent.
#[derive(Debug, Parser)]
#[command(name = "novacron-agent", version, about, long_about = None, after_help = EXIT_CODES)]
pub struct Cli {
    /// The configuration file (TOML) [env: NOVACRON_AGENT_CONFIG]
    /// [default: /etc/novacron/agent.toml, when it exists].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
// One value per process, parsed once: its size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Enroll this host with a controller (makes a key, sends a CSR, stores the certificate).
    #[command(after_help = EXIT_CODES)]
    Join(JoinArgs),
    /// Run the agent: sample metrics and stream them to the controller.
    Run(RunArgs),
}

/// `join` arguments. Each one may also come from the environment or the file
/// (see `/etc/novacron/agent.toml`); a flag wins.
#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The controller's API URL, e.g. https://controller.example:7443
    /// [env: NOVACRON_CONTROLLER] [file: join.controller].
    #[arg(long)]
    pub controller: Option<String>,
    /// The join token from `novacron-controller token create` [env: NOVACRON_JOIN_TOKEN].
    #[arg(long)]
    pub token: Option<String>,
    /// The fleet CA fingerprint to pin, `sha256:<64 hex digits>`
    /// [env: NOVACRON_CA_FINGERPRINT] [file: join.ca_fingerprint].
    #[arg(long)]
    pub ca_fingerprint: Option<String>,
    /// The node name to ask for (default: this host's name, lowercased)
    /// [env: NOVACRON_NODE_NAME] [file: join.name].
    #[arg(long)]
    pub name: Option<String>,
    /// Check the controller's certificate for this name instead of the URL's
    /// host, for a URL the certificate does not name (a VM reaching its host's
    /// loopback at 10.0.2.2) [env: NOVACRON_SERVER_NAME] [file: join.server_name].
    #[arg(long)]
    pub server_name: Option<String>,
    /// Where the identity is kept [env: NOVACRON_STATE_DIR] [file: state_dir]
    /// [default: /var/lib/novacron/agent].
    #[arg(long)]
    pub state_dir: Option<String>,
    /// Replace an existing enrollment.
    #[arg(long)]
    pub force: bool,
}

/// `run` arguments. Each one may also come from the environment or the file (see
/// `/etc/novacron/agent.toml`, which documents them all); a flag wins.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Where the identity is kept [env: NOVACRON_STATE_DIR] [file: state_dir]
    /// [default: /var/lib/novacron/agent].
    #[arg(long)]
    pub state_dir: Option<String>,
    /// A node label `key=value` (repeatable), e.g. --label zone=eu-1a
    /// [env: NOVACRON_LABELS=k=v,k=v] [file: labels table].
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Sampling interval, e.g. 1s, 500ms [env: NOVACRON_INTERVAL] [file: interval]
    /// [default: 1s].
    #[arg(long)]
    pub interval: Option<String>,
    /// Samples kept while disconnected [env: NOVACRON_BUFFER] [file: buffer]
    /// [default: 900, 15 minutes at 1 s].
    #[arg(long)]
    pub buffer: Option<String>,
    /// Docker endpoint, e.g. unix:///var/run/docker.sock [env: DOCKER_HOST]
    /// [file: docker_host].
    #[arg(long)]
    pub docker_host: Option<String>,
    /// Overrides the controller's QUIC address (`host:port`) recorded at enrollment
    /// [env: NOVACRON_CONTROLLER_QUIC] [file: controller_quic].
    #[arg(long)]
    pub controller: Option<String>,
    /// QUIC keep-alive interval [env: NOVACRON_KEEP_ALIVE] [file: keep_alive]
    /// [default: 500ms].
    #[arg(long)]
    pub keep_alive: Option<String>,
    /// QUIC idle timeout (a silent controller is considered gone after this)
    /// [env: NOVACRON_IDLE_TIMEOUT] [file: idle_timeout] [default: 2s].
    #[arg(long)]
    pub idle_timeout: Option<String>,
    /// Longest reconnect delay [env: NOVACRON_MAX_BACKOFF] [file: max_backoff]
    /// [default: 5s].
    #[arg(long)]
    pub max_backoff: Option<String>,
    /// Allow remote exec of commands on this host (`novacron exec`); off by default.
    /// Commands inside allocation containers do not need it
    /// [env: NOVACRON_ALLOW_HOST_EXEC=true|false] [file: allow_host_exec].
    #[arg(long)]
    pub allow_host_exec: bool,
    /// With --allow-host-exec, only this program may run (repeatable); a bare name
    /// matches only as given (looked up in PATH), a path only exactly. None: any
    /// [env: NOVACRON_HOST_EXEC_ALLOW=a,b] [file: host_exec_allow].
    #[arg(long = "host-exec-allow", value_name = "PROGRAM")]
    pub host_exec_allow: Vec<String>,
    /// Spot interruption notices: an EC2-style metadata URL or a file path
    /// [env: NOVACRON_SPOT_NOTICE] [file: spot_notice].
    #[arg(long, value_name = "URL|FILE")]
    pub spot_notice: Option<String>,
    /// Host ports the scheduler hands out for job ports without a hostPort
    /// [env: NOVACRON_DYNAMIC_PORTS] [file: dynamic_ports] [default: 20000-32000].
    #[arg(long, value_name = "FIRST-LAST")]
    pub dynamic_ports: Option<String>,
    /// Host address containers' published ports bind to
    /// [env: NOVACRON_PUBLISH_ADDRESS] [file: publish_address] [default: 0.0.0.0].
    #[arg(long, value_name = "IP")]
    pub publish_address: Option<String>,
    /// Log format: `text` (coloured only on a terminal without NO_COLOR) or `json`
    /// (one object per line, for journald and log collectors)
    /// [env: NOVACRON_LOG_FORMAT] [file: log_format] [default: text].
    #[arg(long, value_name = "text|json")]
    pub log_format: Option<String>,
    /// A Prometheus endpoint (`GET /metrics`, plain HTTP) for scraping this host
    /// directly: off, on (127.0.0.1:9393), a port (on 127.0.0.1) or IP:PORT
    /// [env: NOVACRON_METRICS_LISTEN] [file: metrics_listen] [default: off].
    #[arg(long, value_name = "off|on|PORT|IP:PORT")]
    pub metrics_listen: Option<String>,
    /// Where the ingress serves the services published through it
    /// (`spec.services[].ingress`): off or an IP address of this host
    /// [env: NOVACRON_INGRESS_ADDRESS] [file: ingress_address] [default: the publish address].
    #[arg(long, value_name = "off|IP")]
    pub ingress_address: Option<String>,
    /// Answer DNS for the fleet domain (`<service>.service.novacron.`) here and
    /// forward other names upstream: off or IP:PORT; on port 53 of an address
    /// containers reach (Docker's bridge, 172.17.0.1:53) the containers this agent
    /// starts resolve through it
    /// [env: NOVACRON_DNS_LISTEN] [file: dns_listen] [default: off].
    #[arg(long, value_name = "off|IP:PORT")]
    pub dns_listen: Option<String>,
    /// Where that DNS sends names outside the fleet domain: system (the host's
    /// /etc/resolv.conf), off (refused), or IP:PORT,IP:PORT
    /// [env: NOVACRON_DNS_UPSTREAM] [file: dns_upstream] [default: system].
    #[arg(long, value_name = "system|off|IP:PORT,...")]
    pub dns_upstream: Option<String>,
    /// The disk the images this agent pulled may take: past it, the ones no
    /// container uses are removed, least recently used first (images built or
    /// loaded by hand are never touched)
    /// [env: NOVACRON_IMAGE_GC_BUDGET] [file: image_gc_budget] [default: off].
    #[arg(long, value_name = "off|SIZE")]
    pub image_gc_budget: Option<String>,
    /// What runs this node's containers: docker, or runc (the agent runs them
    /// itself beside a Docker sandbox that holds their network, and drives
    /// CRIU directly: live migration without Docker's checkpoint API)
    /// [env: NOVACRON_CONTAINER_RUNTIME] [file: container_runtime] [default: docker].
    #[arg(long, value_name = "docker|runc")]
    pub container_runtime: Option<String>,
    /// The CRIU binary runc uses [env: NOVACRON_CRIU] [file: criu]
    /// [default: criu on PATH].
    #[arg(long, value_name = "PATH")]
    pub criu: Option<String>,
    /// The VM bridge for guests on the bridge network: off, or this node's
    /// address on it with the range's prefix length (guests get the rest of
    /// the range; a second agent on one host needs a range of its own)
    /// [env: NOVACRON_VM_BRIDGE] [file: vm_bridge] [default: 10.215.0.1/16].
    #[arg(long, value_name = "off|IP/PREFIX")]
    pub vm_bridge: Option<String>,
    /// At a clean stop, remove this node's virtual machines (QEMU killed, disk
    /// and tap removed) instead of leaving them running for the next start to
    /// adopt: for throwaway fleets (`novacron dev` passes it, and removes its
    /// containers too). Not for production nodes.
    #[arg(long)]
    pub remove_vms_on_stop: bool,
    /// For tests only (hidden): offer only these wire protocol versions (`2`,
    /// `2-3`), within those this build speaks, to act as an older agent in the
    /// version-skew tests. Not for production use.
    #[arg(long, hide = true, value_name = "MIN-MAX", value_parser = novacron_common::wire::VersionRange::parse_within_supported)]
    pub wire_versions: Option<novacron_common::wire::VersionRange>,
}

/// Runs the command line (logging is set up here, once the file is read, since the
/// file may choose its format); returns the process exit code.
pub async fn main(cli: Cli) -> i32 {
    let loaded = match config::load(cli.config.as_deref(), &ProcessEnv) {
        Ok(l) => l,
        Err(e) => return config_error(&e.to_string()),
    };
    let flag = match &cli.command {
        Command::Run(args) => args.log_format.as_deref(),
        Command::Join(_) => None,
    };
    match config::log_format(&loaded, &ProcessEnv, flag) {
        Ok(format) => novacron_common::logging::init_with("info", format),
        Err(e) => return config_error(&e.to_string()),
    }
    match cli.command {
        Command::Join(args) => join(&loaded, args).await,
        Command::Run(args) => run(&loaded, args).await,
    }
}

async fn join(loaded: &config::Loaded, args: JoinArgs) -> i32 {
    let flags = JoinFlags {
        controller: args.controller,
        token: args.token,
        ca_fingerprint: args.ca_fingerprint,
        name: args.name,
        server_name: args.server_name,
        state_dir: args.state_dir,
    };
    let settings = match config::resolve_join(loaded, &ProcessEnv, &flags) {
        Ok(s) => s,
        Err(e) => return config_error(&e.to_string()),
    };
    let opts = JoinOptions {
        controller: settings.controller,
        token: settings.token,
        ca_fingerprint: settings.ca_fingerprint,
        node_name: settings.name.unwrap_or_else(default_node_name),
        server_name: settings.server_name,
        state: StateDir::new(settings.state_dir),
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
        Err(e @ (EnrollError::Untrusted { .. } | EnrollError::BadAnswer(_))) => {
            eprintln!("error: {e}");
            EXIT_UNTRUSTED
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

async fn run(loaded: &config::Loaded, args: RunArgs) -> i32 {
    let remove_vms_on_stop = args.remove_vms_on_stop;
    let wire_versions = args
        .wire_versions
        .unwrap_or(novacron_common::wire::SUPPORTED);
    let flags = RunFlags {
        state_dir: args.state_dir,
        labels: args.labels,
        interval: args.interval,
        buffer: args.buffer,
        docker_host: args.docker_host,
        controller: args.controller,
        keep_alive: args.keep_alive,
        idle_timeout: args.idle_timeout,
        max_backoff: args.max_backoff,
        allow_host_exec: args.allow_host_exec,
        host_exec_allow: args.host_exec_allow,
        spot_notice: args.spot_notice,
        dynamic_ports: args.dynamic_ports,
        publish_address: args.publish_address,
        metrics_listen: args.metrics_listen,
        ingress_address: args.ingress_address,
        dns_listen: args.dns_listen,
        dns_upstream: args.dns_upstream,
        image_gc_budget: args.image_gc_budget,
        container_runtime: args.container_runtime,
        criu: args.criu,
        vm_bridge: args.vm_bridge,
    };
    let args = match config::resolve_run(loaded, &ProcessEnv, &flags) {
        Ok(s) => s,
        Err(e) => return config_error(&e.to_string()),
    };
    let host_exec = HostExecPolicy {
        enabled: args.allow_host_exec,
        allow: args.host_exec_allow.clone(),
    };
    let labels = args.labels.clone();
    let zone = labels.get("zone").cloned().unwrap_or_default();
    let state = StateDir::new(&args.state_dir);
    let enrollment = match state.load_enrollment() {
        Ok(e) => e,
        Err(e) => return config_error(&e.to_string()),
    };
    if let Err(e) = state.load_credentials() {
        return config_error(&e.to_string());
    }
    let docker = match DockerRuntime::new(args.docker_host.as_deref()) {
        Ok(d) => d
            .with_publish_address(args.publish_address)
            .with_resolver(args.dns_listen.and_then(crate::dns::container_resolver)),
        Err(e) => {
            let endpoint = match &args.docker_host {
                Some(host) => format!("{} {host:?}", args.docker_host_origin),
                None => "Docker's default endpoint unix:///var/run/docker.sock (set docker_host \
                         in the agent file, DOCKER_HOST or --docker-host)"
                    .to_string(),
            };
            return config_error(&format!("{endpoint}: {e}"));
        }
    };
    // The loopback registry (the controller's image store), on a free port.
    let registry = match crate::registry::bind() {
        Ok(listener) => Some((
            Arc::new(crate::registry::LocalRegistry::default()),
            listener,
        )),
        Err(e) => {
            warn!(error = %e, "cannot listen on a loopback port; images come from registries only");
            None
        }
    };
    let mut supervisor_config = SupervisorConfig::new(enrollment.node_name.clone());
    supervisor_config.pulled_images = Some(args.state_dir.join("pulled-images.json"));
    supervisor_config.image_gc_budget = args.image_gc_budget;
    supervisor_config.image_store_port = registry
        .as_ref()
        .and_then(|(_, l)| l.local_addr().ok())
        .map(|a| a.port());
    let vms =
        match crate::runtime::vm::VmDriver::detect(&args.state_dir, args.vm_bridge.clone()).await {
            Ok(driver) => {
                info!(
                    "virtual machines: {} found",
                    crate::runtime::vm::QEMU_BINARY
                );
                Some(Arc::new(driver))
            }
            Err(why) => {
                info!(%why, "this node runs no virtual machines");
                None
            }
        };
    let oci = if args.runc {
        match crate::runtime::oci::OciDriver::detect(
            &args.state_dir,
            args.criu.as_deref(),
            docker.clone(),
        )
        .await
        {
            Ok(driver) => {
                let driver = Arc::new(driver);
                info!(capability = ?driver.capability(), "containers run under runc, owned by this agent");
                match docker.sandboxes(&enrollment.node_name).await {
                    Ok(sandboxes) => driver.sweep_sandboxes(sandboxes).await,
                    Err(e) => warn!(error = %e, "cannot list the sandboxes of runc containers"),
                }
                Some(driver)
            }
            Err(why) => {
                return config_error(&format!(
                    "container_runtime is runc, but runc containers cannot run here: {why}"
                ));
            }
        }
    } else {
        None
    };
    let runtime = HostRuntime::new(docker)
        .with_vms(vms.clone())
        .with_oci(oci.clone());
    let supervisor = Supervisor::new(runtime, supervisor_config);
    let gpus = collect::detect_gpus();
    let mut capabilities = collect::capabilities(args.docker_host.as_deref(), gpus.as_ref()).await;
    if let Some(vms) = &vms {
        capabilities.vm = Some(vms.capability().await);
    }
    capabilities.oci = oci.as_ref().map(|d| d.capability());
    let checkpoints = match Checkpointer::new(
        args.docker_host.as_deref(),
        args.state_dir.join("bundles"),
    ) {
        Ok(c) => {
            let c = Arc::new(c);
            // Under runc, CRIU is driven directly: `criu check` passed when
            // the driver was made; Docker's checkpoint API is not used.
            let live = match &oci {
                Some(_) => Ok(()),
                None => checkpoint::probe_live(c.clone()).await,
            };
            match &live {
                Ok(()) => info!(
                    "live checkpoints (CRIU) work here: the probe checkpointed and restored a container"
                ),
                Err(why) => {
                    warn!(%why, "live checkpoints do not work here; fs checkpoints do")
                }
            }
            capabilities.set_live_checkpoint(live.clone());
            let service = Arc::new(CheckpointService::new(
                enrollment.node_name.clone(),
                supervisor.clone(),
                c,
                live,
            ));
            supervisor.set_restorer(service.clone());
            Some(service)
        }
        Err(e) => {
            warn!(error = %e, "checkpoints are disabled on this node");
            capabilities.set_live_checkpoint(Err(format!("checkpoints are disabled: {e}")));
            None
        }
    };
    let spot = args.spot_notice.as_ref().map(|v| {
        let source = match v.strip_prefix("http://") {
            Some(_) => SpotSource::Http(v.clone()),
            None => SpotSource::File(v.into()),
        };
        SpotWatcher::new(source, Duration::from_secs(2))
    });
    let host = match SysinfoCollector::new() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("error: cannot read host metrics: {e}");
            return 1;
        }
    };
    let (latest_tx, latest) = tokio::sync::watch::channel(None);
    let mut sampler = Sampler::new(Box::new(host), gpus).publishing_to(latest_tx);
    let mut capacity = sampler.capacity();
    capacity.dynamic_ports = args.dynamic_ports;
    if vms.is_some() {
        // GPUs bound to vfio-pci, which only a virtual machine can use.
        let first = u32::try_from(capacity.gpus.len()).unwrap_or(u32::MAX);
        let passthrough =
            tokio::task::spawn_blocking(move || crate::runtime::vm::vfio::host_gpus(first))
                .await
                .unwrap_or_default();
        if !passthrough.is_empty() {
            info!(
                gpus = passthrough.len(),
                "GPUs bound to vfio-pci pass through to virtual machines"
            );
        }
        capacity.gpus.extend(passthrough);
    }
    let ingress = args.ingress_address.map(|address| {
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        crate::ingress::Ingress::new(address, workers)
    });
    let dns = match args.dns_listen {
        None => None,
        Some(addr) => match crate::dns::AgentDns::start(addr, &args.dns_upstream).await {
            Ok(dns) => {
                match crate::dns::container_resolver(addr) {
                    Some(ip) => {
                        info!(%addr, "answering DNS; containers started from now on resolve through {ip}")
                    }
                    None => {
                        info!(%addr, "answering DNS; containers keep Docker's resolver (it only takes port 53 of a specific address)")
                    }
                }
                Some(dns)
            }
            Err(e) => return config_error(&e),
        },
    };
    let config = AgentConfig {
        dns,
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
        controller: args.controller_quic,
        host_exec,
        checkpoints,
        spot,
        wire_versions,
        ingress: ingress.clone(),
        registry: registry.as_ref().map(|(r, _)| r.clone()),
    };
    let cancel = CancellationToken::new();
    if let Some((relay, listener)) = registry {
        match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => {
                tokio::spawn(relay.serve(listener, cancel.clone()));
            }
            Err(e) => warn!(error = %e, "cannot serve the loopback registry"),
        }
    }
    if let Some(addr) = args.metrics_listen {
        let listener = match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => l,
            Err(e) => {
                return config_error(&format!(
                    "metrics_listen {addr}: cannot listen there: {e} (choose another port, or \"off\")"
                ));
            }
        };
        let source = crate::metrics::Source {
            node: enrollment.node_name.clone(),
            zone,
            latest,
            ingress: ingress.clone(),
        };
        tokio::spawn(crate::metrics::serve(listener, source, cancel.clone()));
    }
    let stopper = cancel.clone();
    novacron_common::signal::ignore_hangup("novacron-agent");
    tokio::spawn(async move {
        novacron_common::signal::shutdown_signal().await;
        info!("stopping on signal");
        stopper.cancel();
    });
    // The first VM's probe boot decides the accelerator: the link reconnects
    // to report it (a node must not go on saying kvm while its VMs run under
    // TCG).
    let (capabilities_tx, capabilities) = tokio::sync::watch::channel(capabilities);
    if let Some(vms) = &vms {
        let (vms, mut probed) = (vms.clone(), vms.probed());
        tokio::spawn(async move {
            while probed.changed().await.is_ok() {
                let vm = vms.capability().await;
                capabilities_tx.send_if_modified(|c| {
                    let changed = c.vm.as_ref() != Some(&vm);
                    c.vm = Some(vm);
                    changed
                });
            }
        });
    }
    let ran = link::run(config, sampler, capacity, capabilities, supervisor, cancel).await;
    if let Some(vms) = &vms {
        if remove_vms_on_stop {
            vms.remove_all().await;
        }
        vms.release_bridge().await;
    }
    match ran {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
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

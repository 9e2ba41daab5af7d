//! The agent's settings, in layers: the TOML file, then environment variables, then
//! flags (flags win).
//!
//! The file is `--config FILE`, else `$NOVACRON_AGENT_CONFIG`, else
//! [`DEFAULT_CONFIG_FILE`] when it exists (a missing default file is not an error).
//! [`resolve_run`] and [`resolve_join`] parse and check every setting before the agent
//! opens any socket. A [`ConfigError`] names where the value came from (the flag, the
//! variable, or the key and the file), the value and what is accepted; the binary
//! exits 64 with it. The environment is read through [`Env`] so tests pass a map.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use novacron_common::config::{self as layered, Layers, Profile, ensure_shorter, invalid};
use novacron_common::fleet;
use novacron_common::pki::{self, Fingerprint};
use novacron_common::wire::PortRange;
use serde::Deserialize;

use crate::buffer::DEFAULT_CAPACITY;

pub use novacron_common::config::{ConfigError, Env, Key, Origin, ProcessEnv};

/// The file read when neither `--config` nor `$NOVACRON_AGENT_CONFIG` names one.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/novacron/agent.toml";
/// Where the identity is kept.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/novacron/agent";
/// Sampling interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest accepted sampling interval.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Longest accepted sampling interval.
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
/// Samples kept while disconnected (15 minutes at 1 s).
pub const DEFAULT_BUFFER: usize = DEFAULT_CAPACITY;
/// Largest accepted sample buffer.
pub const MAX_BUFFER: usize = 1_000_000;
/// QUIC keep-alive interval.
pub const DEFAULT_KEEP_ALIVE: Duration = fleet::DEFAULT_KEEP_ALIVE;
/// QUIC idle timeout.
pub const DEFAULT_IDLE_TIMEOUT: Duration = fleet::DEFAULT_IDLE_TIMEOUT;
/// Longest reconnect delay.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The metrics endpoint's port when `metrics_listen = "on"`.
pub const DEFAULT_METRICS_PORT: u16 = 9393;

/// Environment variable names.
pub mod env {
    /// The configuration file.
    pub const CONFIG: &str = "NOVACRON_AGENT_CONFIG";
    /// `state_dir`.
    pub const STATE_DIR: &str = "NOVACRON_STATE_DIR";
    /// `labels`, as `key=value,key=value`.
    pub const LABELS: &str = "NOVACRON_LABELS";
    /// `interval`.
    pub const INTERVAL: &str = "NOVACRON_INTERVAL";
    /// `buffer`.
    pub const BUFFER: &str = "NOVACRON_BUFFER";
    /// `docker_host` (Docker's own variable).
    pub const DOCKER_HOST: &str = "DOCKER_HOST";
    /// `controller_quic`.
    pub const CONTROLLER_QUIC: &str = "NOVACRON_CONTROLLER_QUIC";
    /// `keep_alive`.
    pub const KEEP_ALIVE: &str = "NOVACRON_KEEP_ALIVE";
    /// `idle_timeout`.
    pub const IDLE_TIMEOUT: &str = "NOVACRON_IDLE_TIMEOUT";
    /// `max_backoff`.
    pub const MAX_BACKOFF: &str = "NOVACRON_MAX_BACKOFF";
    /// `join.controller`.
    pub const CONTROLLER: &str = "NOVACRON_CONTROLLER";
    /// The join token (never read from the file).
    pub const JOIN_TOKEN: &str = "NOVACRON_JOIN_TOKEN";
    /// `join.ca_fingerprint`.
    pub const CA_FINGERPRINT: &str = "NOVACRON_CA_FINGERPRINT";
    /// `join.name`.
    pub const NODE_NAME: &str = "NOVACRON_NODE_NAME";
    /// `join.server_name`.
    pub const SERVER_NAME: &str = "NOVACRON_SERVER_NAME";
    /// `allow_host_exec`: true or false.
    pub const ALLOW_HOST_EXEC: &str = "NOVACRON_ALLOW_HOST_EXEC";
    /// `host_exec_allow`, comma-separated.
    pub const HOST_EXEC_ALLOW: &str = "NOVACRON_HOST_EXEC_ALLOW";
    /// `spot_notice`: an http:// URL or a file path.
    pub const SPOT_NOTICE: &str = "NOVACRON_SPOT_NOTICE";
    /// `dynamic_ports`.
    pub const DYNAMIC_PORTS: &str = "NOVACRON_DYNAMIC_PORTS";
    /// `publish_address`.
    pub const PUBLISH_ADDRESS: &str = "NOVACRON_PUBLISH_ADDRESS";
    /// Log format, `text` or `json`.
    pub const LOG_FORMAT: &str = "NOVACRON_LOG_FORMAT";
    /// `metrics_listen`: off, on, PORT or IP:PORT.
    pub const METRICS_LISTEN: &str = "NOVACRON_METRICS_LISTEN";
    /// `ingress_address`: off or an IP address.
    pub const INGRESS_ADDRESS: &str = "NOVACRON_INGRESS_ADDRESS";
    /// `dns_listen`: off or IP:PORT.
    pub const DNS_LISTEN: &str = "NOVACRON_DNS_LISTEN";
    /// `dns_upstream`: system, off, or IP:PORT,...
    pub const DNS_UPSTREAM: &str = "NOVACRON_DNS_UPSTREAM";
    /// `image_gc_budget`: off, or a size such as 20Gi.
    pub const IMAGE_GC_BUDGET: &str = "NOVACRON_IMAGE_GC_BUDGET";
    /// `container_runtime`: docker or runc.
    pub const CONTAINER_RUNTIME: &str = "NOVACRON_CONTAINER_RUNTIME";
    /// `criu`: the CRIU binary runc uses.
    pub const CRIU: &str = "NOVACRON_CRIU";
    /// `vm_bridge`: off, or the node's address on its VM bridge with the
    /// range's prefix length.
    pub const VM_BRIDGE: &str = "NOVACRON_VM_BRIDGE";
}

/// The settings' names.
pub mod keys {
    use super::{Key, env};

    /// Where the identity is kept.
    pub const STATE_DIR: Key = Key {
        file: "state_dir",
        env: env::STATE_DIR,
        flag: "--state-dir",
    };
    /// Node labels.
    pub const LABELS: Key = Key {
        file: "labels",
        env: env::LABELS,
        flag: "--label",
    };
    /// Sampling interval.
    pub const INTERVAL: Key = Key {
        file: "interval",
        env: env::INTERVAL,
        flag: "--interval",
    };
    /// Samples kept while disconnected.
    pub const BUFFER: Key = Key {
        file: "buffer",
        env: env::BUFFER,
        flag: "--buffer",
    };
    /// Docker endpoint.
    pub const DOCKER_HOST: Key = Key {
        file: "docker_host",
        env: env::DOCKER_HOST,
        flag: "--docker-host",
    };
    /// Override of the controller's QUIC address.
    pub const CONTROLLER_QUIC: Key = Key {
        file: "controller_quic",
        env: env::CONTROLLER_QUIC,
        flag: "--controller",
    };
    /// QUIC keep-alive.
    pub const KEEP_ALIVE: Key = Key {
        file: "keep_alive",
        env: env::KEEP_ALIVE,
        flag: "--keep-alive",
    };
    /// QUIC idle timeout.
    pub const IDLE_TIMEOUT: Key = Key {
        file: "idle_timeout",
        env: env::IDLE_TIMEOUT,
        flag: "--idle-timeout",
    };
    /// Longest reconnect delay.
    pub const MAX_BACKOFF: Key = Key {
        file: "max_backoff",
        env: env::MAX_BACKOFF,
        flag: "--max-backoff",
    };
    /// The controller's API URL for `join`.
    pub const CONTROLLER: Key = Key {
        file: "join.controller",
        env: env::CONTROLLER,
        flag: "--controller",
    };
    /// The join token (flag or environment only: it is a secret).
    pub const JOIN_TOKEN: Key = Key {
        file: "",
        env: env::JOIN_TOKEN,
        flag: "--token",
    };
    /// The pinned CA fingerprint.
    pub const CA_FINGERPRINT: Key = Key {
        file: "join.ca_fingerprint",
        env: env::CA_FINGERPRINT,
        flag: "--ca-fingerprint",
    };
    /// The node name to ask for.
    pub const NODE_NAME: Key = Key {
        file: "join.name",
        env: env::NODE_NAME,
        flag: "--name",
    };
    /// The name the controller's certificate is checked for.
    pub const SERVER_NAME: Key = Key {
        file: "join.server_name",
        env: env::SERVER_NAME,
        flag: "--server-name",
    };
    /// Whether remote exec of host commands is allowed.
    pub const ALLOW_HOST_EXEC: Key = Key {
        file: "allow_host_exec",
        env: env::ALLOW_HOST_EXEC,
        flag: "--allow-host-exec",
    };
    /// The programs host exec may run.
    pub const HOST_EXEC_ALLOW: Key = Key {
        file: "host_exec_allow",
        env: env::HOST_EXEC_ALLOW,
        flag: "--host-exec-allow",
    };
    /// Where spot interruption notices appear.
    pub const SPOT_NOTICE: Key = Key {
        file: "spot_notice",
        env: env::SPOT_NOTICE,
        flag: "--spot-notice",
    };
    /// The host ports the scheduler hands out for ports without a `hostPort`.
    pub const DYNAMIC_PORTS: Key = Key {
        file: "dynamic_ports",
        env: env::DYNAMIC_PORTS,
        flag: "--dynamic-ports",
    };
    /// The host address containers' published ports bind to.
    pub const PUBLISH_ADDRESS: Key = Key {
        file: "publish_address",
        env: env::PUBLISH_ADDRESS,
        flag: "--publish-address",
    };
    /// Log format.
    pub const LOG_FORMAT: Key = Key {
        file: "log_format",
        env: env::LOG_FORMAT,
        flag: "--log-format",
    };
    /// The optional metrics endpoint.
    pub const METRICS_LISTEN: Key = Key {
        file: "metrics_listen",
        env: env::METRICS_LISTEN,
        flag: "--metrics-listen",
    };
    /// Where the ingress listens.
    pub const INGRESS_ADDRESS: Key = Key {
        file: "ingress_address",
        env: env::INGRESS_ADDRESS,
        flag: "--ingress-address",
    };
    /// Where the agent answers DNS.
    pub const DNS_LISTEN: Key = Key {
        file: "dns_listen",
        env: env::DNS_LISTEN,
        flag: "--dns-listen",
    };
    /// Where the agent's DNS forwards other names.
    pub const DNS_UPSTREAM: Key = Key {
        file: "dns_upstream",
        env: env::DNS_UPSTREAM,
        flag: "--dns-upstream",
    };
    /// The disk the images this agent pulled may take.
    pub const IMAGE_GC_BUDGET: Key = Key {
        file: "image_gc_budget",
        env: env::IMAGE_GC_BUDGET,
        flag: "--image-gc-budget",
    };
    /// What runs the node's containers.
    pub const CONTAINER_RUNTIME: Key = Key {
        file: "container_runtime",
        env: env::CONTAINER_RUNTIME,
        flag: "--container-runtime",
    };
    /// The CRIU binary runc uses.
    pub const CRIU: Key = Key {
        file: "criu",
        env: env::CRIU,
        flag: "--criu",
    };
    /// The node's VM bridge.
    pub const VM_BRIDGE: Key = Key {
        file: "vm_bridge",
        env: env::VM_BRIDGE,
        flag: "--vm-bridge",
    };
}

/// The configuration file's contents. Every key is optional; the shipped
/// `/etc/novacron/agent.toml` documents each one.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    /// Where the identity is kept.
    pub state_dir: Option<String>,
    /// Sampling interval, e.g. "1s".
    pub interval: Option<String>,
    /// Samples kept while disconnected.
    pub buffer: Option<u64>,
    /// Docker endpoint, e.g. "unix:///var/run/docker.sock".
    pub docker_host: Option<String>,
    /// Overrides the controller's QUIC `host:port` recorded at enrollment.
    pub controller_quic: Option<String>,
    /// QUIC keep-alive interval.
    pub keep_alive: Option<String>,
    /// QUIC idle timeout.
    pub idle_timeout: Option<String>,
    /// Longest reconnect delay.
    pub max_backoff: Option<String>,
    /// Allow remote exec of commands on the host (`novacron exec`).
    pub allow_host_exec: Option<bool>,
    /// With `allow_host_exec`, only these programs may run; empty: any.
    pub host_exec_allow: Option<Vec<String>>,
    /// Spot interruption notices: an EC2-style `http://.../spot/instance-action`
    /// URL, or a file holding the same JSON.
    pub spot_notice: Option<String>,
    /// Host ports for ports without a `hostPort`, e.g. "20000-32000".
    pub dynamic_ports: Option<String>,
    /// Host address published ports bind to, e.g. "0.0.0.0".
    pub publish_address: Option<String>,
    /// Log format, "text" or "json".
    pub log_format: Option<String>,
    /// The Prometheus endpoint: "off" (default), "on" (127.0.0.1:9393), a port
    /// (on 127.0.0.1) or "IP:PORT".
    pub metrics_listen: Option<String>,
    /// The address the ingress listens on for services published through it:
    /// "off", or an IP address (default: `publish_address`).
    pub ingress_address: Option<String>,
    /// Where the agent answers DNS for the fleet domain and forwards the rest:
    /// "off" (default) or "IP:PORT"; on port 53, containers resolve through it.
    pub dns_listen: Option<String>,
    /// Where the agent's DNS sends names outside the fleet domain: "system"
    /// (default: the host's /etc/resolv.conf), "off", or "IP:PORT,IP:PORT".
    pub dns_upstream: Option<String>,
    /// The disk the images this agent pulled may take before the unused ones
    /// are removed, least recently used first: "off" (default) or a size.
    pub image_gc_budget: Option<String>,
    /// What runs the node's containers: "docker" (default) or "runc" (the
    /// agent runs them itself, and CRIU is driven directly).
    pub container_runtime: Option<String>,
    /// The CRIU binary runc uses (default: criu on PATH).
    pub criu: Option<String>,
    /// The node's VM bridge for guests on the bridge network: "off", or this
    /// node's address on it with the range's prefix length (default
    /// "10.215.0.1/16").
    pub vm_bridge: Option<String>,
    /// Node labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Settings of `novacron-agent join`.
    #[serde(default)]
    pub join: JoinFile,
}

/// The `[join]` table.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinFile {
    /// The controller's API URL.
    pub controller: Option<String>,
    /// The fleet CA fingerprint to pin.
    pub ca_fingerprint: Option<String>,
    /// The node name to ask for.
    pub name: Option<String>,
    /// The name the controller's certificate is checked for, when not the URL's host.
    pub server_name: Option<String>,
}

/// The agent's configuration file and where it came from (`path` is `None` when no
/// file was read).
pub type Loaded = layered::Loaded<AgentFile>;

/// Finds and parses the configuration file: `flag`, else `$NOVACRON_AGENT_CONFIG`,
/// else [`DEFAULT_CONFIG_FILE`] if it exists.
pub fn load(flag: Option<&Path>, env: &dyn Env) -> Result<Loaded, ConfigError> {
    layered::load(&PROFILE, flag, env)
}

/// Parses the text of a configuration file.
pub fn parse(path: &Path, text: &str) -> Result<AgentFile, ConfigError> {
    layered::parse(path, text)
}

/// The flags of `run`, as given (parsed and checked by [`resolve_run`]).
#[derive(Debug, Default, Clone)]
pub struct RunFlags {
    /// `--state-dir`.
    pub state_dir: Option<String>,
    /// `--label`, repeatable.
    pub labels: Vec<String>,
    /// `--interval`.
    pub interval: Option<String>,
    /// `--buffer`.
    pub buffer: Option<String>,
    /// `--docker-host`.
    pub docker_host: Option<String>,
    /// `--controller`.
    pub controller: Option<String>,
    /// `--keep-alive`.
    pub keep_alive: Option<String>,
    /// `--idle-timeout`.
    pub idle_timeout: Option<String>,
    /// `--max-backoff`.
    pub max_backoff: Option<String>,
    /// `--allow-host-exec` (a switch: only turns it on).
    pub allow_host_exec: bool,
    /// `--host-exec-allow`, repeatable.
    pub host_exec_allow: Vec<String>,
    /// `--spot-notice`.
    pub spot_notice: Option<String>,
    /// `--dynamic-ports`.
    pub dynamic_ports: Option<String>,
    /// `--publish-address`.
    pub publish_address: Option<String>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<String>,
    /// `--ingress-address`.
    pub ingress_address: Option<String>,
    /// `--dns-listen`.
    pub dns_listen: Option<String>,
    /// `--dns-upstream`.
    pub dns_upstream: Option<String>,
    /// `--image-gc-budget`.
    pub image_gc_budget: Option<String>,
    /// `--container-runtime`.
    pub container_runtime: Option<String>,
    /// `--criu`.
    pub criu: Option<String>,
    /// `--vm-bridge`.
    pub vm_bridge: Option<String>,
}

/// The validated settings of `run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSettings {
    /// Where the identity is kept.
    pub state_dir: PathBuf,
    /// Node labels.
    pub labels: BTreeMap<String, String>,
    /// Sampling interval.
    pub interval: Duration,
    /// Samples kept while disconnected.
    pub buffer: usize,
    /// Docker endpoint; `None` for Docker's default.
    pub docker_host: Option<String>,
    /// Where `docker_host` came from, for later error messages.
    pub docker_host_origin: Origin,
    /// Overrides the controller's QUIC address recorded at enrollment.
    pub controller_quic: Option<String>,
    /// QUIC keep-alive interval.
    pub keep_alive: Duration,
    /// QUIC idle timeout.
    pub idle_timeout: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
    /// Where spot interruption notices appear (URL or file), if anywhere.
    pub spot_notice: Option<String>,
    /// Remote exec of host commands is allowed.
    pub allow_host_exec: bool,
    /// The programs host exec may run; empty: any.
    pub host_exec_allow: Vec<String>,
    /// The host ports the scheduler hands out for ports without a `hostPort`.
    pub dynamic_ports: PortRange,
    /// The host address containers' published ports bind to.
    pub publish_address: IpAddr,
    /// Where the Prometheus endpoint listens; `None`: it is off.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the ingress listens; `None`: it is off.
    pub ingress_address: Option<IpAddr>,
    /// Where the agent answers DNS; `None`: it does not.
    pub dns_listen: Option<SocketAddr>,
    /// Where its DNS forwards names outside the fleet domain.
    pub dns_upstream: novacron_dns::Upstream,
    /// The disk the images this agent pulled may take; `None`: no collection.
    pub image_gc_budget: Option<u64>,
    /// The node's containers run under runc, owned by the agent, instead of
    /// Docker.
    pub runc: bool,
    /// The CRIU binary runc uses; `None`: criu on `PATH`.
    pub criu: Option<PathBuf>,
    /// The node's VM bridge; `None`: none.
    pub vm_bridge: Option<crate::runtime::vm::bridge::Bridge>,
}

/// Parses `dns_upstream`: `system`, `off`, or a comma-separated list of
/// `IP:PORT` (at most 8).
fn parse_dns_upstream(v: &str) -> Option<novacron_dns::Upstream> {
    let v = v.trim();
    if v.eq_ignore_ascii_case("system") {
        return Some(novacron_dns::Upstream::System);
    }
    if v.eq_ignore_ascii_case("off") {
        return Some(novacron_dns::Upstream::Refuse);
    }
    let servers = v
        .split(',')
        .map(|s| s.trim().parse().ok())
        .collect::<Option<Vec<SocketAddr>>>()?;
    (!servers.is_empty() && servers.len() <= 8).then_some(novacron_dns::Upstream::Servers(servers))
}

/// Parses `metrics_listen`: `off` is `Some(None)`; `on`, a bare port or `IP:PORT`
/// an address (loopback unless an address is given); anything else `None`.
fn parse_metrics_listen(text: &str) -> Option<Option<SocketAddr>> {
    let text = text.trim();
    let loopback = |port| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    match text.to_ascii_lowercase().as_str() {
        "off" | "false" => Some(None),
        "on" | "true" => Some(Some(loopback(DEFAULT_METRICS_PORT))),
        _ => match text.parse::<u16>() {
            Ok(port) => Some(Some(loopback(port))),
            Err(_) => text.parse::<SocketAddr>().ok().map(Some),
        },
    }
}

/// The log format: `--log-format` (of `run`; `None` for other commands),
/// `NOVACRON_LOG_FORMAT`, `log_format`, else text.
pub fn log_format(
    loaded: &Loaded,
    env: &dyn Env,
    flag: Option<&str>,
) -> Result<novacron_common::logging::Format, ConfigError> {
    let l = Layers::new(&PROFILE, loaded, env);
    novacron_common::logging::format(
        &l,
        keys::LOG_FORMAT,
        flag,
        loaded.file.log_format.as_deref(),
    )
}

/// Merges file, environment and flags for `run` and checks every value.
pub fn resolve_run(
    loaded: &Loaded,
    env: &dyn Env,
    flags: &RunFlags,
) -> Result<RunSettings, ConfigError> {
    let l = Layers::new(&PROFILE, loaded, env);
    let f = &loaded.file;
    let state_dir = l.dir(
        keys::STATE_DIR,
        flags.state_dir.as_deref(),
        f.state_dir.as_deref(),
        DEFAULT_STATE_DIR,
    )?;
    let interval = l.duration(
        keys::INTERVAL,
        flags.interval.as_deref(),
        f.interval.as_deref(),
        DEFAULT_INTERVAL,
        (MIN_INTERVAL, MAX_INTERVAL),
    )?;
    let buffer = l.count(
        keys::BUFFER,
        flags.buffer.as_deref(),
        f.buffer,
        DEFAULT_BUFFER,
        MAX_BUFFER,
        "samples",
    )?;
    let (docker_host, docker_host_origin) = match l.pick(
        keys::DOCKER_HOST,
        flags.docker_host.as_deref(),
        f.docker_host.as_deref(),
    ) {
        Some((v, origin)) => {
            docker_endpoint(&v).map_err(|expected| invalid(origin.clone(), &v, expected))?;
            (Some(v), origin)
        }
        None => (None, Origin::Default(keys::DOCKER_HOST.file)),
    };
    let controller_quic = l.host_ports(
        keys::CONTROLLER_QUIC,
        flags.controller.as_deref(),
        f.controller_quic.as_deref(),
        "host:port, or several comma-separated (the controllers of a group), e.g. ctl.example.com:7443 or 10.0.0.5:7443,10.0.0.6:7443",
    )?;
    let any = (Duration::from_millis(10), Duration::from_secs(3600));
    let keep_alive = l.duration(
        keys::KEEP_ALIVE,
        flags.keep_alive.as_deref(),
        f.keep_alive.as_deref(),
        DEFAULT_KEEP_ALIVE,
        any,
    )?;
    let idle_timeout = l.duration(
        keys::IDLE_TIMEOUT,
        flags.idle_timeout.as_deref(),
        f.idle_timeout.as_deref(),
        DEFAULT_IDLE_TIMEOUT,
        any,
    )?;
    ensure_shorter(&keep_alive, &idle_timeout)?;
    let max_backoff = l.duration(
        keys::MAX_BACKOFF,
        flags.max_backoff.as_deref(),
        f.max_backoff.as_deref(),
        DEFAULT_MAX_BACKOFF,
        (Duration::from_millis(100), Duration::from_secs(3600)),
    )?;
    let allow_host_exec = if flags.allow_host_exec {
        true
    } else {
        l.pick(
            keys::ALLOW_HOST_EXEC,
            None,
            f.allow_host_exec.map(|b| b.to_string()).as_deref(),
        )
        .map_or(Ok(false), |(v, origin)| {
            match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(invalid(origin, &v, "true or false")),
            }
        })?
    };
    let (programs, origin) = if !flags.host_exec_allow.is_empty() {
        (
            flags.host_exec_allow.clone(),
            Origin::Flag(keys::HOST_EXEC_ALLOW.flag),
        )
    } else if let Some(raw) = env.var(env::HOST_EXEC_ALLOW) {
        (
            raw.split(',').map(|p| p.trim().to_string()).collect(),
            Origin::Env(env::HOST_EXEC_ALLOW),
        )
    } else {
        (
            f.host_exec_allow.clone().unwrap_or_default(),
            l.file_origin(keys::HOST_EXEC_ALLOW.file),
        )
    };
    if let Some(bad) = programs
        .iter()
        .find(|p| p.trim().is_empty() || p.contains('\0'))
    {
        return Err(invalid(
            origin,
            bad,
            "program names or absolute paths, e.g. systemctl or /usr/bin/journalctl",
        ));
    }
    let spot_notice = match l.pick(
        keys::SPOT_NOTICE,
        flags.spot_notice.as_deref(),
        f.spot_notice.as_deref(),
    ) {
        None => None,
        Some((v, _)) if v.starts_with("http://") || v.starts_with('/') => Some(v),
        Some((v, origin)) => {
            return Err(invalid(
                origin,
                &v,
                "an http:// URL (e.g. http://169.254.169.254/latest/meta-data/spot/instance-action) or an absolute file path",
            ));
        }
    };
    let dynamic_ports = match l.pick(
        keys::DYNAMIC_PORTS,
        flags.dynamic_ports.as_deref(),
        f.dynamic_ports.as_deref(),
    ) {
        None => PortRange::default(),
        Some((v, origin)) => parse_port_range(&v).ok_or_else(|| {
            invalid(
                origin,
                &v,
                "a range FIRST-LAST of ports from 1 to 65535 with FIRST <= LAST, e.g. 20000-32000",
            )
        })?,
    };
    let publish_address = match l.pick(
        keys::PUBLISH_ADDRESS,
        flags.publish_address.as_deref(),
        f.publish_address.as_deref(),
    ) {
        None => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Some((v, origin)) => v.trim().parse().map_err(|_| {
            invalid(
                origin,
                &v,
                "an IP address of this host, e.g. 0.0.0.0 (every address) or 10.0.0.5",
            )
        })?,
    };
    let metrics_listen = match l.pick(
        keys::METRICS_LISTEN,
        flags.metrics_listen.as_deref(),
        f.metrics_listen.as_deref(),
    ) {
        None => None,
        Some((v, origin)) => parse_metrics_listen(&v).ok_or_else(|| {
            invalid(
                origin,
                &v,
                "off, on (127.0.0.1:9393), a port (on 127.0.0.1, e.g. 9393) or IP:PORT (e.g. 0.0.0.0:9393 for every address)",
            )
        })?,
    };
    let ingress_address = match l.pick(
        keys::INGRESS_ADDRESS,
        flags.ingress_address.as_deref(),
        f.ingress_address.as_deref(),
    ) {
        None => Some(publish_address),
        Some((v, _)) if v.trim().eq_ignore_ascii_case("off") => None,
        Some((v, origin)) => Some(v.trim().parse().map_err(|_| {
            invalid(
                origin,
                &v,
                "off, or an IP address of this host, e.g. 0.0.0.0 (every address) or 10.0.0.5",
            )
        })?),
    };
    let dns_listen = match l.pick(
        keys::DNS_LISTEN,
        flags.dns_listen.as_deref(),
        f.dns_listen.as_deref(),
    ) {
        None => None,
        Some((v, _)) if v.trim().eq_ignore_ascii_case("off") => None,
        Some((v, origin)) => Some(v.trim().parse().map_err(|_| {
            invalid(
                origin,
                &v,
                "off, or IP:PORT of this host, e.g. 172.17.0.1:53 (Docker's bridge: containers then resolve through it) or 127.0.0.1:8600",
            )
        })?),
    };
    let dns_upstream = match l.pick(
        keys::DNS_UPSTREAM,
        flags.dns_upstream.as_deref(),
        f.dns_upstream.as_deref(),
    ) {
        None => novacron_dns::Upstream::System,
        Some((v, origin)) => parse_dns_upstream(&v).ok_or_else(|| {
            invalid(
                origin,
                &v,
                "system (the host's /etc/resolv.conf), off (refuse other names), or IP:PORT,IP:PORT (e.g. 10.0.0.2:53)",
            )
        })?,
    };
    let image_gc_budget = match l.pick(
        keys::IMAGE_GC_BUDGET,
        flags.image_gc_budget.as_deref(),
        f.image_gc_budget.as_deref(),
    ) {
        None => None,
        Some((v, _)) if v.trim().eq_ignore_ascii_case("off") => None,
        Some((v, origin)) => Some(
            novacron_common::manifest::parse_bytes(v.trim())
                .map_err(|_| invalid(origin, &v, "off, or a size such as 20Gi or 500M"))?
                .0,
        ),
    };
    let runc = match l.pick(
        keys::CONTAINER_RUNTIME,
        flags.container_runtime.as_deref(),
        f.container_runtime.as_deref(),
    ) {
        None => false,
        Some((v, origin)) => match v.trim() {
            "docker" => false,
            "runc" => true,
            _ => return Err(invalid(origin, &v, "docker or runc")),
        },
    };
    let criu = l
        .pick(keys::CRIU, flags.criu.as_deref(), f.criu.as_deref())
        .map(|(v, _)| PathBuf::from(v.trim()));
    let vm_bridge = match l.pick(
        keys::VM_BRIDGE,
        flags.vm_bridge.as_deref(),
        f.vm_bridge.as_deref(),
    ) {
        None => crate::runtime::vm::bridge::Bridge::parse(crate::runtime::vm::bridge::DEFAULT).ok(),
        Some((v, _)) if v.trim().eq_ignore_ascii_case("off") => None,
        Some((v, origin)) => Some(
            crate::runtime::vm::bridge::Bridge::parse(&v).map_err(|_| {
                invalid(
                    origin,
                    &v,
                    "off, or this node's address on the bridge with the range's prefix length (16 to 28), such as 10.215.0.1/16",
                )
            })?,
        ),
    };
    Ok(RunSettings {
        runc,
        criu,
        vm_bridge,
        image_gc_budget,
        dynamic_ports,
        publish_address,
        metrics_listen,
        ingress_address,
        dns_listen,
        dns_upstream,
        spot_notice,
        state_dir,
        labels: labels(&l, &f.labels, &flags.labels)?,
        allow_host_exec,
        host_exec_allow: programs,
        interval: interval.value,
        buffer,
        docker_host,
        docker_host_origin,
        controller_quic,
        keep_alive: keep_alive.value,
        idle_timeout: idle_timeout.value,
        max_backoff: max_backoff.value,
    })
}

/// The flags of `join`, as given.
#[derive(Debug, Default, Clone)]
pub struct JoinFlags {
    /// `--controller`.
    pub controller: Option<String>,
    /// `--token`.
    pub token: Option<String>,
    /// `--ca-fingerprint`.
    pub ca_fingerprint: Option<String>,
    /// `--name`.
    pub name: Option<String>,
    /// `--server-name`.
    pub server_name: Option<String>,
    /// `--state-dir`.
    pub state_dir: Option<String>,
}

/// The validated settings of `join`.
#[derive(Debug, Clone)]
pub struct JoinSettings {
    /// The controller's API URL.
    pub controller: String,
    /// The join token.
    pub token: String,
    /// The pinned CA fingerprint.
    pub ca_fingerprint: Fingerprint,
    /// The node name to ask for; `None` for this host's name.
    pub name: Option<String>,
    /// The name the controller's certificate is checked for; `None`: the URL's host.
    pub server_name: Option<rustls_pki_types::ServerName<'static>>,
    /// Where the identity is kept.
    pub state_dir: PathBuf,
}

/// Merges file, environment and flags for `join` and checks every value.
pub fn resolve_join(
    loaded: &Loaded,
    env: &dyn Env,
    flags: &JoinFlags,
) -> Result<JoinSettings, ConfigError> {
    let l = Layers::new(&PROFILE, loaded, env);
    let f = &loaded.file;
    let (controller, origin) = l
        .pick(
            keys::CONTROLLER,
            flags.controller.as_deref(),
            f.join.controller.as_deref(),
        )
        .ok_or_else(|| l.missing("the controller's API URL", keys::CONTROLLER))?;
    let rest = controller.strip_prefix("https://").unwrap_or_default();
    if rest.is_empty() || rest.contains(char::is_whitespace) {
        return Err(invalid(
            origin,
            &controller,
            "an https:// URL such as https://ctl.example.com:7443",
        ));
    }
    let (token, _) = l
        .pick(keys::JOIN_TOKEN, flags.token.as_deref(), None)
        .ok_or_else(|| l.missing("the join token", keys::JOIN_TOKEN))?;
    let (fp, origin) = l
        .pick(
            keys::CA_FINGERPRINT,
            flags.ca_fingerprint.as_deref(),
            f.join.ca_fingerprint.as_deref(),
        )
        .ok_or_else(|| l.missing("the CA fingerprint", keys::CA_FINGERPRINT))?;
    let ca_fingerprint = fp.trim().parse::<Fingerprint>().map_err(|_| {
        invalid(
            origin,
            &fp,
            "sha256: followed by 64 hex digits (printed by `novacron-controller init` and `token create`)",
        )
    })?;
    let name = l
        .pick(
            keys::NODE_NAME,
            flags.name.as_deref(),
            f.join.name.as_deref(),
        )
        .map(|(v, origin)| {
            pki::validate_name(&v)
                .map(|()| v.clone())
                .map_err(|e| invalid(origin, &v, e.to_string()))
        })
        .transpose()?;
    let server_name = l
        .pick(
            keys::SERVER_NAME,
            flags.server_name.as_deref(),
            f.join.server_name.as_deref(),
        )
        .map(|(v, origin)| {
            rustls_pki_types::ServerName::try_from(v.trim().to_owned()).map_err(|_| {
                invalid(
                    origin,
                    &v,
                    "a DNS name or IP address on the controller's certificate, such as ctl.example.com",
                )
            })
        })
        .transpose()?;
    let state_dir = l.dir(
        keys::STATE_DIR,
        flags.state_dir.as_deref(),
        f.state_dir.as_deref(),
        DEFAULT_STATE_DIR,
    )?;
    Ok(JoinSettings {
        controller,
        token,
        ca_fingerprint,
        name,
        server_name,
        state_dir,
    })
}

/// The agent's file, its variable, and the durations its messages give as examples.
const PROFILE: Profile = Profile {
    default_file: DEFAULT_CONFIG_FILE,
    config_env: env::CONFIG,
    duration_examples: "500ms, 2s or 1m",
};

/// Labels from the file, then `NOVACRON_LABELS`, then `--label` (a later layer
/// replaces a key of an earlier one; a key twice in one layer is an error).
fn labels(
    l: &Layers<'_>,
    file: &BTreeMap<String, String>,
    flags: &[String],
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for (k, v) in file {
        check_label(k, v)
            .map_err(|expected| invalid(l.file_origin(&format!("labels.{k}")), v, expected))?;
        out.insert(k.clone(), v.clone());
    }
    if let Some(raw) = l.env().var(env::LABELS) {
        let items: Vec<String> = raw
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        merge_labels(&mut out, &items, Origin::Env(env::LABELS))?;
    }
    merge_labels(&mut out, flags, Origin::Flag(keys::LABELS.flag))?;
    Ok(out)
}

fn merge_labels(
    out: &mut BTreeMap<String, String>,
    items: &[String],
    origin: Origin,
) -> Result<(), ConfigError> {
    let mut seen = BTreeMap::new();
    for item in items {
        let Some((k, v)) = item.split_once('=') else {
            return Err(invalid(origin, item, "KEY=VALUE, e.g. zone=eu-1a"));
        };
        check_label(k, v).map_err(|expected| invalid(origin.clone(), item, expected))?;
        if seen.insert(k.to_string(), ()).is_some() {
            return Err(invalid(
                origin,
                item,
                format!("each label key once; {k:?} is given twice"),
            ));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(())
}

/// Label keys: 1-63 of letters, digits, '-', '_', '.', '/'; values: at most 63 of
/// letters, digits, '-', '_', '.'.
fn check_label(k: &str, v: &str) -> Result<(), &'static str> {
    let key_ok = !k.is_empty()
        && k.len() <= 63
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
    if !key_ok {
        return Err("a label key of 1-63 letters, digits, '-', '_', '.', '/'");
    }
    let value_ok = v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !value_ok {
        return Err("a label value of at most 63 letters, digits, '-', '_', '.'");
    }
    Ok(())
}

/// `FIRST-LAST` (`20000-32000`), both ports from 1 to 65535, `FIRST <= LAST`.
fn parse_port_range(v: &str) -> Option<PortRange> {
    let (first, last) = v.trim().split_once('-')?;
    let first: u16 = first.trim().parse().ok()?;
    let last: u16 = last.trim().parse().ok()?;
    (first >= 1 && first <= last).then_some(PortRange { first, last })
}

fn docker_endpoint(v: &str) -> Result<(), String> {
    let ok = ["unix://", "tcp://", "http://", "https://"]
        .iter()
        .any(|scheme| v.strip_prefix(scheme).is_some_and(|rest| !rest.is_empty()));
    if ok {
        Ok(())
    } else {
        Err("a Docker endpoint such as unix:///var/run/docker.sock or tcp://127.0.0.1:2375".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Loaded {
        let path = PathBuf::from("/etc/novacron/agent.toml");
        Loaded {
            file: parse(&path, text).expect("parses"),
            path: Some(path),
        }
    }

    #[test]
    fn defaults_need_no_file_no_env_and_no_flags() {
        let s = resolve_run(&Loaded::default(), &[], &RunFlags::default()).expect("defaults");
        assert_eq!(s.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(s.interval, DEFAULT_INTERVAL);
        assert_eq!(s.buffer, DEFAULT_BUFFER);
        assert_eq!(s.keep_alive, DEFAULT_KEEP_ALIVE);
        assert_eq!(s.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!(s.max_backoff, DEFAULT_MAX_BACKOFF);
        assert_eq!(s.docker_host, None);
        assert!(s.labels.is_empty());
    }

    #[test]
    fn flags_win_over_env_which_wins_over_the_file() {
        let loaded = file(
            "interval = \"2s\"\nbuffer = 10\nstate_dir = \"/srv/a\"\n[labels]\nzone = \"a\"\nrack = \"r1\"\n",
        );
        let env = [
            ("NOVACRON_INTERVAL", "3s"),
            ("NOVACRON_STATE_DIR", "/srv/b"),
            ("NOVACRON_LABELS", "zone=b, pool=gpu"),
        ];
        let flags = RunFlags {
            interval: Some("4s".into()),
            labels: vec!["pool=cpu".into()],
            ..RunFlags::default()
        };
        let s = resolve_run(&loaded, &env, &flags).expect("valid");
        assert_eq!(s.interval, Duration::from_secs(4), "flag wins");
        assert_eq!(s.state_dir, PathBuf::from("/srv/b"), "env beats the file");
        assert_eq!(s.buffer, 10, "the file beats the default");
        let labels: Vec<(&str, &str)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            labels,
            [("pool", "cpu"), ("rack", "r1"), ("zone", "b")],
            "labels merge per key"
        );
    }

    #[test]
    fn a_bad_value_names_the_key_the_file_the_value_and_what_is_accepted() {
        let err = resolve_run(&file("interval = \"50ms\"\n"), &[], &RunFlags::default())
            .expect_err("too short")
            .to_string();
        assert!(
            err.contains("key `interval` in /etc/novacron/agent.toml")
                && err.contains("\"50ms\"")
                && err.contains("100ms"),
            "{err}"
        );
        let err = resolve_run(
            &Loaded::default(),
            &[("NOVACRON_BUFFER", "lots")],
            &RunFlags::default(),
        )
        .expect_err("not a number")
        .to_string();
        assert!(
            err.contains("NOVACRON_BUFFER") && err.contains("\"lots\"") && err.contains("1 to"),
            "{err}"
        );
        let flags = RunFlags {
            keep_alive: Some("3s".into()),
            ..RunFlags::default()
        };
        let err = resolve_run(&Loaded::default(), &[], &flags)
            .expect_err("keep-alive too long")
            .to_string();
        assert!(
            err.contains("--keep-alive") && err.contains("idle_timeout"),
            "{err}"
        );
        for (flags, needle) in [
            (
                RunFlags {
                    docker_host: Some("/var/run/docker.sock".into()),
                    ..RunFlags::default()
                },
                "unix:///var/run/docker.sock",
            ),
            (
                RunFlags {
                    controller: Some("ctl".into()),
                    ..RunFlags::default()
                },
                "host:port",
            ),
            (
                RunFlags {
                    labels: vec!["zone".into()],
                    ..RunFlags::default()
                },
                "KEY=VALUE",
            ),
            (
                RunFlags {
                    labels: vec!["a=1".into(), "a=2".into()],
                    ..RunFlags::default()
                },
                "given twice",
            ),
        ] {
            let err = resolve_run(&Loaded::default(), &[], &flags)
                .expect_err(needle)
                .to_string();
            assert!(err.contains(needle), "{err}");
        }
        let err = resolve_run(
            &file("[labels]\nzone = \"a b\"\n"),
            &[],
            &RunFlags::default(),
        )
        .expect_err("bad label")
        .to_string();
        assert!(
            err.contains("`labels.zone`") && err.contains("\"a b\""),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_with_the_file_and_the_key() {
        let path = Path::new("/etc/novacron/agent.toml");
        let err = parse(path, "intervall = \"1s\"\n")
            .expect_err("unknown")
            .to_string();
        assert!(
            err.contains("/etc/novacron/agent.toml")
                && err.contains("intervall")
                && err.contains("interval"),
            "{err}"
        );
        let err = parse(path, "buffer = \"many\"\n")
            .expect_err("type")
            .to_string();
        assert!(err.contains("buffer") && err.contains("line 1"), "{err}");
        let err = parse(path, "[join]\ntoken = \"x\"\n")
            .expect_err("no token in files")
            .to_string();
        assert!(err.contains("token"), "{err}");
    }

    #[test]
    fn host_exec_settings_come_from_every_layer() {
        let loaded = file("allow_host_exec = true\nhost_exec_allow = [\"systemctl\"]\n");
        let s = resolve_run(&loaded, &[], &RunFlags::default()).expect("valid");
        assert!(s.allow_host_exec);
        assert_eq!(s.host_exec_allow, ["systemctl"]);
        let env = [
            ("NOVACRON_ALLOW_HOST_EXEC", "false"),
            ("NOVACRON_HOST_EXEC_ALLOW", "journalctl, /usr/bin/uptime"),
        ];
        let s = resolve_run(&loaded, &env, &RunFlags::default()).expect("valid");
        assert!(!s.allow_host_exec, "env beats the file");
        assert_eq!(s.host_exec_allow, ["journalctl", "/usr/bin/uptime"]);
        let flags = RunFlags {
            allow_host_exec: true,
            host_exec_allow: vec!["ls".into()],
            ..RunFlags::default()
        };
        let s = resolve_run(&loaded, &env, &flags).expect("valid");
        assert!(s.allow_host_exec, "the flag wins");
        assert_eq!(s.host_exec_allow, ["ls"]);
        let err = resolve_run(
            &Loaded::default(),
            &[("NOVACRON_ALLOW_HOST_EXEC", "maybe")],
            &RunFlags::default(),
        )
        .expect_err("not a bool")
        .to_string();
        assert!(
            err.contains("NOVACRON_ALLOW_HOST_EXEC") && err.contains("true or false"),
            "{err}"
        );
        let err = resolve_run(
            &file("host_exec_allow = [\"\"]\n"),
            &[],
            &RunFlags::default(),
        )
        .expect_err("empty program")
        .to_string();
        assert!(err.contains("`host_exec_allow`"), "{err}");
    }

    #[test]
    fn an_explicit_config_file_must_exist() {
        let err = load(Some(Path::new("/nonexistent/agent.toml")), &[])
            .expect_err("missing")
            .to_string();
        assert!(err.contains("/nonexistent/agent.toml"), "{err}");
        let err = load(None, &[("NOVACRON_AGENT_CONFIG", "/nonexistent/b.toml")])
            .expect_err("missing")
            .to_string();
        assert!(err.contains("/nonexistent/b.toml"), "{err}");
    }

    #[test]
    fn join_takes_its_settings_from_every_layer_and_names_what_is_missing() {
        let fp = format!("sha256:{}", "ab".repeat(32));
        let loaded = file(&format!(
            "state_dir = \"/srv/agent\"\n[join]\ncontroller = \"https://ctl:7443\"\nca_fingerprint = \"{fp}\"\n"
        ));
        let flags = JoinFlags {
            token: Some("t".into()),
            ..JoinFlags::default()
        };
        let s = resolve_join(&loaded, &[("NOVACRON_NODE_NAME", "gpu-1")], &flags).expect("valid");
        assert_eq!(s.server_name, None);
        assert_eq!(s.controller, "https://ctl:7443");
        assert_eq!(s.name.as_deref(), Some("gpu-1"));
        assert_eq!(s.state_dir, PathBuf::from("/srv/agent"));
        assert_eq!(s.ca_fingerprint.to_string(), fp);

        let err = resolve_join(&loaded, &[], &JoinFlags::default())
            .expect_err("no token")
            .to_string();
        assert!(
            err.contains("--token") && err.contains("NOVACRON_JOIN_TOKEN"),
            "{err}"
        );
        let err = resolve_join(&Loaded::default(), &[], &flags)
            .expect_err("no controller")
            .to_string();
        assert!(
            err.contains("--controller") && err.contains("join.controller"),
            "{err}"
        );
        let named = resolve_join(
            &loaded,
            &[("NOVACRON_SERVER_NAME", "ctl.example.com")],
            &flags,
        )
        .expect("valid");
        assert_eq!(
            named
                .server_name
                .map(|n| n.to_str().into_owned())
                .as_deref(),
            Some("ctl.example.com")
        );
        let misnamed = JoinFlags {
            server_name: Some("not a name".into()),
            ..flags.clone()
        };
        let err = resolve_join(&loaded, &[], &misnamed)
            .expect_err("bad server name")
            .to_string();
        assert!(
            err.contains("--server-name") && err.contains("a DNS name or IP address"),
            "{err}"
        );
        let bad = JoinFlags {
            ca_fingerprint: Some("sha1:00".into()),
            ..flags.clone()
        };
        let err = resolve_join(&loaded, &[], &bad)
            .expect_err("bad fp")
            .to_string();
        assert!(
            err.contains("--ca-fingerprint")
                && err.contains("\"sha1:00\"")
                && err.contains("64 hex"),
            "{err}"
        );
        let bad = JoinFlags {
            controller: Some("http://ctl".into()),
            ..flags
        };
        let err = resolve_join(&loaded, &[], &bad)
            .expect_err("not https")
            .to_string();
        assert!(err.contains("https://"), "{err}");
    }

    /// The file shipped in the package must parse with the real loader and hold the
    /// defaults the binary uses.
    #[test]
    fn the_packaged_agent_toml_loads_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/etc/agent.toml");
        let loaded = load(Some(&path), &[]).expect("packaged file loads");
        let s = resolve_run(&loaded, &[], &RunFlags::default()).expect("packaged file is valid");
        let defaults =
            resolve_run(&Loaded::default(), &[], &RunFlags::default()).expect("defaults");
        assert_eq!(
            s,
            RunSettings {
                docker_host_origin: s.docker_host_origin.clone(),
                ..defaults
            }
        );
    }

    #[test]
    fn the_metrics_endpoint_is_off_by_default_and_on_loopback_unless_an_address_is_given() {
        let none = Loaded::default();
        let s = resolve_run(&none, &[], &RunFlags::default()).expect("defaults");
        assert_eq!(s.metrics_listen, None);
        let at = |v: &str| {
            let flags = RunFlags {
                metrics_listen: Some(v.into()),
                ..RunFlags::default()
            };
            resolve_run(&none, &[], &flags).map(|s| s.metrics_listen.map(|a| a.to_string()))
        };
        assert_eq!(at("off").expect("off"), None);
        assert_eq!(at("on").expect("on").as_deref(), Some("127.0.0.1:9393"));
        assert_eq!(
            at(" 9100 ").expect("port").as_deref(),
            Some("127.0.0.1:9100")
        );
        assert_eq!(
            at("0.0.0.0:9100").expect("address").as_deref(),
            Some("0.0.0.0:9100")
        );
        assert_eq!(at("[::1]:9100").expect("v6").as_deref(), Some("[::1]:9100"));
        let e = at("localhost:9100").expect_err("a name");
        assert!(e.to_string().contains("--metrics-listen"), "{e}");
        assert!(e.to_string().contains("IP:PORT"), "{e}");
        let loaded = file("metrics_listen = \"70000\"\n");
        let e = resolve_run(&loaded, &[], &RunFlags::default()).expect_err("port too big");
        assert!(e.to_string().contains("metrics_listen"), "{e}");
        let s = resolve_run(
            &none,
            &[("NOVACRON_METRICS_LISTEN", "on")],
            &RunFlags::default(),
        )
        .expect("env");
        assert_eq!(
            s.metrics_listen.map(|a| a.port()),
            Some(DEFAULT_METRICS_PORT)
        );
    }

    #[test]
    fn dns_is_off_by_default_and_forwards_to_the_system_s_resolvers() {
        use novacron_dns::Upstream;
        let none = Loaded::default();
        let s = resolve_run(&none, &[], &RunFlags::default()).expect("defaults");
        assert_eq!((s.dns_listen, s.dns_upstream), (None, Upstream::System));
        let s = resolve_run(
            &file("dns_listen = \"172.17.0.1:53\"\ndns_upstream = \"off\"\n"),
            &[],
            &RunFlags::default(),
        )
        .expect("file");
        assert_eq!(s.dns_listen, Some("172.17.0.1:53".parse().expect("addr")));
        assert_eq!(s.dns_upstream, Upstream::Refuse);
        let flags = RunFlags {
            dns_upstream: Some("10.0.0.2:53, 10.0.0.3:5353".into()),
            ..RunFlags::default()
        };
        let s = resolve_run(&none, &[("NOVACRON_DNS_LISTEN", "off")], &flags).expect("flags");
        assert_eq!(s.dns_listen, None);
        assert_eq!(
            s.dns_upstream,
            Upstream::Servers(vec![
                "10.0.0.2:53".parse().expect("a"),
                "10.0.0.3:5353".parse().expect("b")
            ])
        );
        let e = resolve_run(
            &file("dns_listen = \"172.17.0.1\"\n"),
            &[],
            &RunFlags::default(),
        )
        .expect_err("no port");
        assert!(
            e.to_string().contains("dns_listen") && e.to_string().contains("IP:PORT"),
            "{e}"
        );
        let e = resolve_run(
            &none,
            &[("NOVACRON_DNS_UPSTREAM", "8.8.8.8")],
            &RunFlags::default(),
        )
        .expect_err("no port");
        assert!(e.to_string().contains("NOVACRON_DNS_UPSTREAM"), "{e}");
    }

    #[test]
    fn the_ingress_follows_the_publish_address_unless_set_or_off() {
        let none = Loaded::default();
        let s = resolve_run(&none, &[], &RunFlags::default()).expect("defaults");
        assert_eq!(s.ingress_address, Some(s.publish_address));
        let flags = RunFlags {
            publish_address: Some("127.0.0.2".into()),
            ..RunFlags::default()
        };
        let s = resolve_run(&none, &[], &flags).expect("publish address");
        assert_eq!(
            s.ingress_address.map(|a| a.to_string()).as_deref(),
            Some("127.0.0.2")
        );
        let s = resolve_run(&none, &[("NOVACRON_INGRESS_ADDRESS", "OFF")], &flags).expect("off");
        assert_eq!(s.ingress_address, None);
        let s = resolve_run(&file("ingress_address = \"10.0.0.5\"\n"), &[], &flags).expect("file");
        assert_eq!(
            s.ingress_address.map(|a| a.to_string()).as_deref(),
            Some("10.0.0.5")
        );
        let e = resolve_run(&file("ingress_address = \"all\"\n"), &[], &flags).expect_err("a word");
        assert!(
            e.to_string().contains("ingress_address") && e.to_string().contains("off, or an IP"),
            "{e}"
        );
    }

    #[test]
    fn dynamic_ports_default_and_parse_from_file_env_and_flag() {
        let none = Loaded::default();
        let s = resolve_run(&none, &[], &RunFlags::default()).expect("defaults");
        assert_eq!(s.dynamic_ports, PortRange::default());
        assert_eq!(s.dynamic_ports.to_string(), "20000-32000");
        assert_eq!(s.publish_address.to_string(), "0.0.0.0");
        let flags = RunFlags {
            publish_address: Some("127.0.0.2".into()),
            ..RunFlags::default()
        };
        let s = resolve_run(&none, &[], &flags).expect("flag");
        assert_eq!(s.publish_address.to_string(), "127.0.0.2");
        let flags = RunFlags {
            publish_address: Some("localhost".into()),
            ..RunFlags::default()
        };
        let e = resolve_run(&none, &[], &flags).expect_err("not an address");
        assert!(e.to_string().contains("--publish-address"), "{e}");
        let flags = RunFlags {
            dynamic_ports: Some("30000-30009".into()),
            ..RunFlags::default()
        };
        let s = resolve_run(&none, &[], &flags).expect("flag");
        assert_eq!(
            s.dynamic_ports,
            PortRange {
                first: 30000,
                last: 30009
            }
        );
        for bad in ["30000", "0-10", "20-10", "1-70000", "a-b"] {
            let flags = RunFlags {
                dynamic_ports: Some(bad.into()),
                ..RunFlags::default()
            };
            let e = resolve_run(&none, &[], &flags).expect_err(bad);
            let text = e.to_string();
            assert!(
                text.contains("--dynamic-ports") && text.contains(bad),
                "{text}"
            );
            assert!(text.contains("e.g. 20000-32000"), "{text}");
        }
    }
}

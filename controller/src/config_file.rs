//! The controller's settings, in layers: the TOML file, then environment variables,
//! then flags (flags win).
//!
//! The file is `--config FILE`, else `$NOVACRON_CONTROLLER_CONFIG`, else
//! [`DEFAULT_CONFIG_FILE`] when it exists (a missing default file is not an error).
//! Every subcommand reads it (`data_dir` is shared; `[init]` and `[serve]` hold the
//! rest). [`resolve_serve`] checks every value before any port is bound; a
//! [`ConfigError`] names where the value came from (the flag, the variable, or the key
//! and the file), the value and what is accepted, and `novacron-controller` exits 64
//! with it. The environment is read through [`Env`] so tests pass a map.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use novacron_common::config::{self as layered, Layers, Profile, ensure_shorter, invalid};
use novacron_common::fleet::{self, Liveness};
use serde::Deserialize;

use crate::server::{ControllerConfig, DEFAULT_LISTEN};
use crate::state::registry::{
    DEFAULT_METRICS_WINDOW, DEFAULT_RESTART_GRACE, DEFAULT_STARTUP_GRACE,
};

pub use novacron_common::config::{ConfigError, Env, Key, Origin, ProcessEnv};

/// The file read when neither `--config` nor `$NOVACRON_CONTROLLER_CONFIG` names one.
pub const DEFAULT_CONFIG_FILE: &str = "/etc/novacron/controller.toml";
/// The data directory (PKI, store).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/novacron/controller";
/// The name agents and operators use for the controller.
pub const DEFAULT_SERVER_NAME: &str = "localhost";
/// QUIC keep-alive interval.
pub const DEFAULT_KEEP_ALIVE: Duration = fleet::DEFAULT_KEEP_ALIVE;
/// QUIC idle timeout.
pub const DEFAULT_IDLE_TIMEOUT: Duration = fleet::DEFAULT_IDLE_TIMEOUT;
/// Time from disconnected to down.
pub const DEFAULT_DOWN_AFTER: Duration = fleet::DEFAULT_DOWN_AFTER;
/// Lifetime of node certificates.
pub const DEFAULT_NODE_CERT_TTL: Duration = novacron_common::pki::DEFAULT_NODE_CERT_TTL;
/// Shortest accepted node certificate lifetime.
pub const MIN_NODE_CERT_TTL: Duration = Duration::from_secs(5);
/// Largest accepted metrics window.
pub const MAX_METRICS_WINDOW: usize = 100_000;

/// Environment variable names.
pub mod env {
    /// The configuration file.
    pub const CONFIG: &str = "NOVACRON_CONTROLLER_CONFIG";
    /// `data_dir`.
    pub const DATA_DIR: &str = "NOVACRON_DATA_DIR";
    /// `init.server_names`, comma-separated.
    pub const SERVER_NAMES: &str = "NOVACRON_SERVER_NAMES";
    /// `serve.api_listen`.
    pub const API_LISTEN: &str = "NOVACRON_API_LISTEN";
    /// `serve.quic_listen`.
    pub const QUIC_LISTEN: &str = "NOVACRON_QUIC_LISTEN";
    /// `serve.server_name`.
    pub const SERVER_NAME: &str = "NOVACRON_SERVER_NAME";
    /// `serve.advertise`.
    pub const ADVERTISE: &str = "NOVACRON_ADVERTISE";
    /// `serve.keep_alive`.
    pub const KEEP_ALIVE: &str = "NOVACRON_KEEP_ALIVE";
    /// `serve.idle_timeout`.
    pub const IDLE_TIMEOUT: &str = "NOVACRON_IDLE_TIMEOUT";
    /// `serve.down_after`.
    pub const DOWN_AFTER: &str = "NOVACRON_DOWN_AFTER";
    /// `serve.startup_grace`.
    pub const STARTUP_GRACE: &str = "NOVACRON_STARTUP_GRACE";
    /// `serve.restart_grace`.
    pub const RESTART_GRACE: &str = "NOVACRON_RESTART_GRACE";
    /// `serve.node_cert_ttl`.
    pub const NODE_CERT_TTL: &str = "NOVACRON_NODE_CERT_TTL";
    /// `serve.metrics_window`.
    pub const METRICS_WINDOW: &str = "NOVACRON_METRICS_WINDOW";
    /// `serve.dns_listen`.
    pub const DNS_LISTEN: &str = "NOVACRON_DNS_LISTEN";
    /// `serve.dns_domain`.
    pub const DNS_DOMAIN: &str = "NOVACRON_DNS_DOMAIN";
    /// `serve.secrets_key_file`.
    pub const SECRETS_KEY_FILE: &str = "NOVACRON_SECRETS_KEY_FILE";
    /// Log format, `text` or `json`.
    pub const LOG_FORMAT: &str = "NOVACRON_LOG_FORMAT";
    /// `store.backend`.
    pub const STORE: &str = "NOVACRON_STORE";
    /// `store.endpoints`, comma-separated.
    pub const ETCD_ENDPOINTS: &str = "NOVACRON_ETCD_ENDPOINTS";
    /// `store.prefix`.
    pub const ETCD_PREFIX: &str = "NOVACRON_ETCD_PREFIX";
    /// `store.lease`.
    pub const LEASE: &str = "NOVACRON_LEASE";
}

/// The settings' names.
pub mod keys {
    use super::{Key, env};

    /// The data directory.
    pub const DATA_DIR: Key = Key::new("data_dir", env::DATA_DIR, "--data-dir");
    /// Names in the server certificate made by `init`.
    pub const SERVER_NAMES: Key = Key::new("init.server_names", env::SERVER_NAMES, "--server-name");
    /// HTTPS API address.
    pub const API_LISTEN: Key = Key::new("serve.api_listen", env::API_LISTEN, "--api-listen");
    /// Agent link address.
    pub const QUIC_LISTEN: Key = Key::new("serve.quic_listen", env::QUIC_LISTEN, "--quic-listen");
    /// The controller's name.
    pub const SERVER_NAME: Key = Key::new("serve.server_name", env::SERVER_NAME, "--server-name");
    /// The QUIC address told to enrolling agents.
    pub const ADVERTISE: Key = Key::new("serve.advertise", env::ADVERTISE, "--advertise");
    /// QUIC keep-alive.
    pub const KEEP_ALIVE: Key = Key::new("serve.keep_alive", env::KEEP_ALIVE, "--keep-alive");
    /// QUIC idle timeout.
    pub const IDLE_TIMEOUT: Key =
        Key::new("serve.idle_timeout", env::IDLE_TIMEOUT, "--idle-timeout");
    /// Disconnected to down.
    pub const DOWN_AFTER: Key = Key::new("serve.down_after", env::DOWN_AFTER, "--down-after");
    /// Grace after a controller start.
    pub const STARTUP_GRACE: Key =
        Key::new("serve.startup_grace", env::STARTUP_GRACE, "--startup-grace");
    /// Grace after an agent's clean stop.
    pub const RESTART_GRACE: Key =
        Key::new("serve.restart_grace", env::RESTART_GRACE, "--restart-grace");
    /// Node certificate lifetime.
    pub const NODE_CERT_TTL: Key =
        Key::new("serve.node_cert_ttl", env::NODE_CERT_TTL, "--node-cert-ttl");
    /// Samples kept per node.
    pub const METRICS_WINDOW: Key = Key::new(
        "serve.metrics_window",
        env::METRICS_WINDOW,
        "--metrics-window",
    );
    /// The service catalog's DNS address.
    pub const DNS_LISTEN: Key = Key::new("serve.dns_listen", env::DNS_LISTEN, "--dns-listen");
    /// The fleet's DNS domain.
    pub const DNS_DOMAIN: Key = Key::new("serve.dns_domain", env::DNS_DOMAIN, "--dns-domain");
    /// The key that seals secrets at rest.
    pub const SECRETS_KEY_FILE: Key = Key::new(
        "serve.secrets_key_file",
        env::SECRETS_KEY_FILE,
        "--secrets-key-file",
    );
    /// Log format.
    pub const LOG_FORMAT: Key = Key::new("serve.log_format", env::LOG_FORMAT, "--log-format");
    /// The store backend.
    pub const STORE: Key = Key::new("store.backend", env::STORE, "--store");
    /// etcd's client URLs.
    pub const ETCD_ENDPOINTS: Key =
        Key::new("store.endpoints", env::ETCD_ENDPOINTS, "--etcd-endpoints");
    /// The fleet's etcd key prefix.
    pub const ETCD_PREFIX: Key = Key::new("store.prefix", env::ETCD_PREFIX, "--etcd-prefix");
    /// The leader lease.
    pub const LEASE: Key = Key::new("store.lease", env::LEASE, "--lease");
}

/// The configuration file's contents. Every key is optional; the shipped
/// `/etc/novacron/controller.toml` documents each one.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerFile {
    /// The data directory.
    pub data_dir: Option<String>,
    /// Settings of `init`.
    #[serde(default)]
    pub init: InitFile,
    /// Settings of `serve`.
    #[serde(default)]
    pub serve: ServeFile,
    /// Where the state is kept (every subcommand).
    #[serde(default)]
    pub store: StoreFile,
    /// The metrics history (`serve`).
    #[serde(default)]
    pub history: crate::services::history::HistorySettings,
    /// Alert evaluation (`serve`).
    #[serde(default)]
    pub alerts: crate::services::alerts::AlertSettings,
}

/// The `[store]` table: the embedded redb file (the default) or etcd, for a
/// highly available group of controllers.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    /// `redb` or `etcd`.
    pub backend: Option<String>,
    /// etcd's client URLs.
    pub endpoints: Option<Vec<String>>,
    /// The key prefix of this fleet (two fleets can share one etcd).
    pub prefix: Option<String>,
    /// The leader lease (2 s to 60 s).
    pub lease: Option<String>,
    /// PEM file of the CA that signed etcd's certificates (TLS to etcd).
    pub ca_file: Option<String>,
    /// PEM file of this controller's etcd client certificate.
    pub cert_file: Option<String>,
    /// PEM file of its key.
    pub key_file: Option<String>,
}

/// Where a controller keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChoice {
    /// The embedded redb file in the data directory.
    Redb,
    /// etcd, with a leader elected on a lease of this length.
    Etcd {
        /// Connection and prefix.
        etcd: crate::state::store::EtcdConfig,
        /// The leader lease.
        lease: Duration,
    },
}

/// The store: `NOVACRON_STORE`, else `store.backend`, else redb; for etcd the
/// endpoints (`NOVACRON_ETCD_ENDPOINTS`, comma-separated, else
/// `store.endpoints`), the prefix and the lease the same way.
pub fn store(loaded: &Loaded, env: &dyn Env) -> Result<StoreChoice, ConfigError> {
    let l = Layers::new(&PROFILE, loaded, env);
    let f = &loaded.file.store;
    let backend = l.pick(keys::STORE, None, f.backend.as_deref());
    match backend {
        None => return Ok(StoreChoice::Redb),
        Some((v, _)) if v == "redb" => return Ok(StoreChoice::Redb),
        Some((v, _)) if v == "etcd" => {}
        Some((v, origin)) => return Err(invalid(origin, &v, "redb or etcd")),
    }
    let (endpoints, origin) = if let Some(raw) = env.var(keys::ETCD_ENDPOINTS.env) {
        let list = raw
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect::<Vec<_>>();
        (list, Origin::Env(keys::ETCD_ENDPOINTS.env))
    } else if let Some(list) = &f.endpoints {
        (list.clone(), l.file_origin(keys::ETCD_ENDPOINTS.file))
    } else {
        return Err(l.missing("etcd's client URLs", keys::ETCD_ENDPOINTS));
    };
    if endpoints.is_empty() {
        return Err(invalid(
            origin,
            "",
            "one or more URLs such as http://10.0.0.5:2379",
        ));
    }
    for e in &endpoints {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(invalid(
                origin.clone(),
                e,
                "URLs such as http://10.0.0.5:2379 or https://etcd-1:2379",
            ));
        }
    }
    let prefix = match l.pick(keys::ETCD_PREFIX, None, f.prefix.as_deref()) {
        Some((p, origin)) => {
            if !p.starts_with('/') || p.len() > 200 || p.contains("//") {
                return Err(invalid(origin, &p, "a key prefix such as /novacron/prod"));
            }
            if p.ends_with('/') { p } else { format!("{p}/") }
        }
        None => crate::state::store::etcd::DEFAULT_PREFIX.to_string(),
    };
    let lease = l
        .duration(
            keys::LEASE,
            None,
            f.lease.as_deref(),
            crate::state::election::DEFAULT_LEASE,
            (crate::state::election::MIN_LEASE, Duration::from_secs(60)),
        )?
        .value;
    let read = |name: &str, path: &Option<String>| -> Result<Option<String>, ConfigError> {
        match path {
            None => Ok(None),
            Some(path) => std::fs::read_to_string(path).map(Some).map_err(|e| {
                invalid(
                    l.file_origin(name),
                    path,
                    format!("a readable PEM file ({e})"),
                )
            }),
        }
    };
    let ca = read("store.ca_file", &f.ca_file)?;
    let cert = read("store.cert_file", &f.cert_file)?;
    let key = read("store.key_file", &f.key_file)?;
    let tls = ca.map(|ca_pem| crate::state::store::etcd::EtcdTls {
        ca_pem,
        identity: cert.zip(key),
    });
    Ok(StoreChoice::Etcd {
        etcd: crate::state::store::EtcdConfig {
            endpoints,
            prefix,
            tls,
        },
        lease,
    })
}

/// The `[init]` table.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitFile {
    /// DNS names and IP addresses put in the server certificate.
    pub server_names: Option<Vec<String>>,
}

/// The `[serve]` table.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeFile {
    /// TCP address of the HTTPS API.
    pub api_listen: Option<String>,
    /// UDP address of the agent link.
    pub quic_listen: Option<String>,
    /// The name agents and operators use for this controller.
    pub server_name: Option<String>,
    /// `host:port` enrolling agents are told to connect to.
    pub advertise: Option<String>,
    /// QUIC keep-alive interval.
    pub keep_alive: Option<String>,
    /// QUIC idle timeout.
    pub idle_timeout: Option<String>,
    /// Time from disconnected to down.
    pub down_after: Option<String>,
    /// Extra time for nodes to reconnect after the controller starts.
    pub startup_grace: Option<String>,
    /// Extra time for a node whose agent stopped cleanly (a restart).
    pub restart_grace: Option<String>,
    /// Lifetime of node certificates.
    pub node_cert_ttl: Option<String>,
    /// Samples kept in memory per node.
    pub metrics_window: Option<u64>,
    /// UDP and TCP address of the service catalog's DNS (off when absent).
    pub dns_listen: Option<String>,
    /// The fleet's DNS domain.
    pub dns_domain: Option<String>,
    /// The file of the key that seals secrets at rest.
    pub secrets_key_file: Option<String>,
    /// Log format, "text" or "json".
    pub log_format: Option<String>,
}

/// The controller's configuration file and where it came from (`path` is `None` when
/// no file was read).
pub type Loaded = layered::Loaded<ControllerFile>;

/// Finds and parses the configuration file: `flag`, else
/// `$NOVACRON_CONTROLLER_CONFIG`, else [`DEFAULT_CONFIG_FILE`] if it exists.
pub fn load(flag: Option<&Path>, env: &dyn Env) -> Result<Loaded, ConfigError> {
    layered::load(&PROFILE, flag, env)
}

/// Parses the text of a configuration file.
pub fn parse(path: &Path, text: &str) -> Result<ControllerFile, ConfigError> {
    layered::parse(path, text)
}

/// The data directory: `--data-dir`, `NOVACRON_DATA_DIR`, `data_dir`, default.
pub fn data_dir(
    loaded: &Loaded,
    env: &dyn Env,
    flag: Option<&str>,
) -> Result<PathBuf, ConfigError> {
    Layers::new(&PROFILE, loaded, env).dir(
        keys::DATA_DIR,
        flag,
        loaded.file.data_dir.as_deref(),
        DEFAULT_DATA_DIR,
    )
}

/// The log format: `--log-format` (of `serve`; `None` for other commands),
/// `NOVACRON_LOG_FORMAT`, `serve.log_format`, else text.
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
        loaded.file.serve.log_format.as_deref(),
    )
}

/// The names `init` puts in the server certificate: `--server-name` (repeatable),
/// `NOVACRON_SERVER_NAMES` (comma-separated), `init.server_names`; empty when none
/// is given (then `init` uses its defaults).
pub fn server_names(
    loaded: &Loaded,
    env: &dyn Env,
    flags: &[String],
) -> Result<Vec<String>, ConfigError> {
    let l = Layers::new(&PROFILE, loaded, env);
    let (names, origin) = if !flags.is_empty() {
        (flags.to_vec(), Origin::Flag(keys::SERVER_NAMES.flag))
    } else if let Some(raw) = env.var(keys::SERVER_NAMES.env) {
        let names = raw
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        (names, Origin::Env(keys::SERVER_NAMES.env))
    } else if let Some(names) = &loaded.file.init.server_names {
        (names.clone(), l.file_origin(keys::SERVER_NAMES.file))
    } else {
        return Ok(Vec::new());
    };
    for name in &names {
        if name.is_empty()
            || name.len() > 253
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b))
        {
            return Err(invalid(
                origin,
                name,
                "DNS names or IP addresses such as ctl.example.com or 10.0.0.5",
            ));
        }
    }
    Ok(names)
}

/// The flags of `serve`, as given (parsed and checked by [`resolve_serve`]).
#[derive(Debug, Default, Clone)]
pub struct ServeFlags {
    /// `--api-listen`.
    pub api_listen: Option<String>,
    /// `--quic-listen`.
    pub quic_listen: Option<String>,
    /// `--server-name`.
    pub server_name: Option<String>,
    /// `--advertise`.
    pub advertise: Option<String>,
    /// `--keep-alive`.
    pub keep_alive: Option<String>,
    /// `--idle-timeout`.
    pub idle_timeout: Option<String>,
    /// `--down-after`.
    pub down_after: Option<String>,
    /// `--startup-grace`.
    pub startup_grace: Option<String>,
    /// `--restart-grace`.
    pub restart_grace: Option<String>,
    /// `--node-cert-ttl`.
    pub node_cert_ttl: Option<String>,
    /// `--metrics-window`.
    pub metrics_window: Option<String>,
    /// `--dns-listen`.
    pub dns_listen: Option<String>,
    /// `--dns-domain`.
    pub dns_domain: Option<String>,
    /// `--secrets-key-file`.
    pub secrets_key_file: Option<String>,
}

/// Merges file, environment and flags for `serve` and checks every value.
pub fn resolve_serve(
    loaded: &Loaded,
    env: &dyn Env,
    data_dir: &Path,
    flags: &ServeFlags,
) -> Result<ControllerConfig, ConfigError> {
    let l = Layers::new(&PROFILE, loaded, env);
    let s = &loaded.file.serve;
    let api_listen = addr(
        &l,
        keys::API_LISTEN,
        flags.api_listen.as_deref(),
        s.api_listen.as_deref(),
    )?;
    let quic_listen = addr(
        &l,
        keys::QUIC_LISTEN,
        flags.quic_listen.as_deref(),
        s.quic_listen.as_deref(),
    )?;
    let server_name = match l.pick(
        keys::SERVER_NAME,
        flags.server_name.as_deref(),
        s.server_name.as_deref(),
    ) {
        Some((v, origin)) => {
            if v.is_empty()
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b))
            {
                return Err(invalid(
                    origin,
                    &v,
                    "a DNS name or IP address in the server certificate, such as ctl.example.com",
                ));
            }
            v
        }
        None => DEFAULT_SERVER_NAME.to_string(),
    };
    let advertise = l.host_port(
        keys::ADVERTISE,
        flags.advertise.as_deref(),
        s.advertise.as_deref(),
        "host:port agents can reach, e.g. ctl.example.com:7443",
    )?;
    let any = (Duration::from_millis(10), Duration::from_secs(3600));
    let keep_alive = l.duration(
        keys::KEEP_ALIVE,
        flags.keep_alive.as_deref(),
        s.keep_alive.as_deref(),
        DEFAULT_KEEP_ALIVE,
        any,
    )?;
    let idle_timeout = l.duration(
        keys::IDLE_TIMEOUT,
        flags.idle_timeout.as_deref(),
        s.idle_timeout.as_deref(),
        DEFAULT_IDLE_TIMEOUT,
        any,
    )?;
    ensure_shorter(&keep_alive, &idle_timeout)?;
    let up_to_an_hour = (Duration::ZERO, Duration::from_secs(3600));
    let down_after = l.duration(
        keys::DOWN_AFTER,
        flags.down_after.as_deref(),
        s.down_after.as_deref(),
        DEFAULT_DOWN_AFTER,
        up_to_an_hour,
    )?;
    let startup_grace = l.duration(
        keys::STARTUP_GRACE,
        flags.startup_grace.as_deref(),
        s.startup_grace.as_deref(),
        DEFAULT_STARTUP_GRACE,
        up_to_an_hour,
    )?;
    let restart_grace = l.duration(
        keys::RESTART_GRACE,
        flags.restart_grace.as_deref(),
        s.restart_grace.as_deref(),
        DEFAULT_RESTART_GRACE,
        up_to_an_hour,
    )?;
    let node_cert_ttl = l.duration(
        keys::NODE_CERT_TTL,
        flags.node_cert_ttl.as_deref(),
        s.node_cert_ttl.as_deref(),
        DEFAULT_NODE_CERT_TTL,
        (MIN_NODE_CERT_TTL, Duration::from_secs(10 * 365 * 24 * 3600)),
    )?;
    let metrics_window = l.count(
        keys::METRICS_WINDOW,
        flags.metrics_window.as_deref(),
        s.metrics_window,
        DEFAULT_METRICS_WINDOW,
        MAX_METRICS_WINDOW,
        "samples",
    )?;
    let dns_listen = match l.pick(
        keys::DNS_LISTEN,
        flags.dns_listen.as_deref(),
        s.dns_listen.as_deref(),
    ) {
        Some((v, origin)) => Some(v.trim().parse::<SocketAddr>().map_err(|_| {
            invalid(
                origin,
                &v,
                "an address and port for DNS, such as 127.0.0.1:8600 (off when absent)",
            )
        })?),
        None => None,
    };
    let dns_domain = match l.pick(
        keys::DNS_DOMAIN,
        flags.dns_domain.as_deref(),
        s.dns_domain.as_deref(),
    ) {
        Some((v, origin)) => {
            let fqdn = if v.ends_with('.') {
                v.clone()
            } else {
                format!("{v}.")
            };
            if novacron_dns::Name::from_ascii(&fqdn).is_err()
                || fqdn.len() < 2
                || !fqdn
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
            {
                return Err(invalid(
                    origin,
                    &v,
                    "a DNS domain such as novacron or fleet.example",
                ));
            }
            fqdn
        }
        None => novacron_dns::DEFAULT_DOMAIN.to_string(),
    };
    let secrets_key_file = match l.pick(
        keys::SECRETS_KEY_FILE,
        flags.secrets_key_file.as_deref(),
        s.secrets_key_file.as_deref(),
    ) {
        Some((v, origin)) => {
            if !v.starts_with('/') {
                return Err(invalid(
                    origin,
                    &v,
                    "an absolute path to a file of 64 hex digits, such as /etc/novacron/secrets.key",
                ));
            }
            Some(PathBuf::from(v))
        }
        None => None,
    };
    let history = loaded.file.history.clone();
    if let Err(expected) = history.validate() {
        return Err(invalid(l.file_origin("history"), "[history]", expected));
    }
    let alerts = loaded.file.alerts.clone();
    if let Err(expected) = alerts.validate() {
        return Err(invalid(l.file_origin("alerts"), "[alerts]", expected));
    }
    Ok(ControllerConfig {
        history,
        alerts,
        data_dir: data_dir.to_path_buf(),
        api_listen,
        quic_listen,
        server_name,
        advertise,
        liveness: Liveness {
            keep_alive: keep_alive.value,
            idle_timeout: idle_timeout.value,
            down_after: down_after.value,
        },
        node_cert_ttl: node_cert_ttl.value,
        metrics_window,
        startup_grace: startup_grace.value,
        restart_grace: restart_grace.value,
        wire_versions: novacron_common::wire::SUPPORTED,
        dns_listen,
        dns_domain,
        secrets_key_file,
    })
}

/// The controller's file, its variable, and the durations its messages give as
/// examples.
const PROFILE: Profile = Profile {
    default_file: DEFAULT_CONFIG_FILE,
    config_env: env::CONFIG,
    duration_examples: "500ms, 2s, 1h or 30days",
};

/// A listen address (`ip:port`), else [`DEFAULT_LISTEN`].
fn addr(
    l: &Layers<'_>,
    key: Key,
    flag: Option<&str>,
    file: Option<&str>,
) -> Result<SocketAddr, ConfigError> {
    let (v, origin) = l
        .pick(key, flag, file)
        .unwrap_or_else(|| (DEFAULT_LISTEN.to_string(), Origin::Default(key.file)));
    v.trim().parse().map_err(|_| {
        invalid(
            origin,
            &v,
            "an IP address and port such as 0.0.0.0:7443 or [::]:7443",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> Loaded {
        let path = PathBuf::from("/etc/novacron/controller.toml");
        Loaded {
            file: parse(&path, text).expect("parses"),
            path: Some(path),
        }
    }

    fn serve(
        loaded: &Loaded,
        env: &dyn Env,
        flags: &ServeFlags,
    ) -> Result<ControllerConfig, String> {
        resolve_serve(loaded, env, Path::new("/d"), flags).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_match_the_server_defaults() {
        let c = serve(&Loaded::default(), &[], &ServeFlags::default()).expect("defaults");
        let d = ControllerConfig::new(PathBuf::from("/d"));
        assert_eq!(c.api_listen, d.api_listen);
        assert_eq!(c.quic_listen, d.quic_listen);
        assert_eq!(c.server_name, d.server_name);
        assert_eq!(c.liveness, d.liveness);
        assert_eq!(c.node_cert_ttl, d.node_cert_ttl);
        assert_eq!(c.metrics_window, d.metrics_window);
        assert!(c.liveness.idle_timeout + c.liveness.down_after <= Duration::from_secs(3));
    }

    #[test]
    fn flags_win_over_env_which_wins_over_the_file() {
        let loaded = file(
            "data_dir = \"/srv/file\"\n[serve]\napi_listen = \"127.0.0.1:1\"\nquic_listen = \"127.0.0.1:2\"\nserver_name = \"file.example\"\nmetrics_window = 5\n",
        );
        let env = [
            ("NOVACRON_QUIC_LISTEN", "127.0.0.1:3"),
            ("NOVACRON_SERVER_NAME", "env.example"),
            ("NOVACRON_DATA_DIR", "/srv/env"),
        ];
        let flags = ServeFlags {
            server_name: Some("flag.example".into()),
            ..ServeFlags::default()
        };
        let c = serve(&loaded, &env, &flags).expect("valid");
        assert_eq!(c.api_listen.port(), 1, "the file beats the default");
        assert_eq!(c.quic_listen.port(), 3, "env beats the file");
        assert_eq!(c.server_name, "flag.example", "the flag wins");
        assert_eq!(c.metrics_window, 5);
        assert_eq!(
            data_dir(&loaded, &env, None).expect("dir"),
            PathBuf::from("/srv/env")
        );
        assert_eq!(
            data_dir(&loaded, &[], Some("/srv/flag")).expect("dir"),
            PathBuf::from("/srv/flag")
        );
        assert_eq!(
            data_dir(&loaded, &[], None).expect("dir"),
            PathBuf::from("/srv/file")
        );
    }

    #[test]
    fn a_bad_value_names_the_key_the_file_the_value_and_what_is_accepted() {
        let err = serve(
            &file("[serve]\napi_listen = \"nope\"\n"),
            &[],
            &ServeFlags::default(),
        )
        .expect_err("bad addr");
        assert!(
            err.contains("key `serve.api_listen` in /etc/novacron/controller.toml")
                && err.contains("\"nope\"")
                && err.contains("0.0.0.0:7443"),
            "{err}"
        );
        let err = serve(
            &Loaded::default(),
            &[("NOVACRON_METRICS_WINDOW", "0")],
            &ServeFlags::default(),
        )
        .expect_err("window");
        assert!(
            err.contains("NOVACRON_METRICS_WINDOW") && err.contains("1 to 100000"),
            "{err}"
        );
        let flags = ServeFlags {
            keep_alive: Some("3s".into()),
            ..ServeFlags::default()
        };
        let err = serve(&Loaded::default(), &[], &flags).expect_err("keep-alive");
        assert!(
            err.contains("--keep-alive") && err.contains("serve.idle_timeout"),
            "{err}"
        );
        let flags = ServeFlags {
            node_cert_ttl: Some("1s".into()),
            ..ServeFlags::default()
        };
        let err = serve(&Loaded::default(), &[], &flags).expect_err("ttl");
        assert!(
            err.contains("--node-cert-ttl") && err.contains("5s"),
            "{err}"
        );
        let flags = ServeFlags {
            advertise: Some("ctl".into()),
            ..ServeFlags::default()
        };
        let err = serve(&Loaded::default(), &[], &flags).expect_err("advertise");
        assert!(
            err.contains("--advertise") && err.contains("host:port"),
            "{err}"
        );
        let err = server_names(
            &file("[init]\nserver_names = [\"ok.example\", \"bad name\"]\n"),
            &[],
            &[],
        )
        .expect_err("bad name")
        .to_string();
        assert!(
            err.contains("`init.server_names`") && err.contains("\"bad name\""),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_with_the_file_and_the_key() {
        let path = Path::new("/etc/novacron/controller.toml");
        let err = parse(path, "[serve]\napi_lisen = \"0.0.0.0:7443\"\n")
            .expect_err("unknown")
            .to_string();
        assert!(
            err.contains("/etc/novacron/controller.toml")
                && err.contains("api_lisen")
                && err.contains("api_listen"),
            "{err}"
        );
        let err = parse(path, "[serve]\nmetrics_window = \"x\"\n")
            .expect_err("type")
            .to_string();
        assert!(
            err.contains("metrics_window") && err.contains("line 2"),
            "{err}"
        );
        let err = load(Some(Path::new("/nonexistent/c.toml")), &[])
            .expect_err("missing file")
            .to_string();
        assert!(err.contains("/nonexistent/c.toml"), "{err}");
    }

    /// The file shipped in the package must parse with the real loader and hold the
    /// defaults the binary uses.
    #[test]
    fn the_packaged_controller_toml_loads_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/etc/controller.toml");
        let loaded = load(Some(&path), &[]).expect("packaged file loads");
        assert_eq!(
            data_dir(&loaded, &[], None).expect("data_dir"),
            PathBuf::from(DEFAULT_DATA_DIR)
        );
        assert!(
            server_names(&loaded, &[], &[]).expect("names").is_empty(),
            "init keeps its defaults unless the operator sets names"
        );
        let packaged = serve(&loaded, &[], &ServeFlags::default()).expect("valid");
        let defaults = serve(&Loaded::default(), &[], &ServeFlags::default()).expect("defaults");
        assert_eq!(format!("{packaged:?}"), format!("{defaults:?}"));
    }
}

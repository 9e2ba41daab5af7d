//! `novacron-controller` command line: `init`, `serve`, `token create`,
//! `node revoke`, `admin issue`, `cert revoke`, `cert list`.
//!
//! Settings come from the TOML file, the environment and the flags, in that order
//! (flags win); [`crate::config_file`] merges and checks them.
//!
//! Exit codes: 0 success; 1 runtime failure; 2 usage error; 64 bad configuration
//! (reported before any port is bound); 69 the running controller could not be
//! reached.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::{Args, Parser, Subcommand};
use novacron_common::pki::{self, Identity, Role, Serial, Validity};
use novacron_common::tls;
use serde::de::DeserializeOwned;
use tracing::info;

use crate::config_file::{self, ProcessEnv, ServeFlags};
use crate::http::api::{
    ApiTokenRequest, ApiTokenResponse, RevokeRequest, TokenRequest, TokenResponse,
};
use crate::http::certs::{CertRevocationView, CertRevokeRequest, CertRevokeResponse};
use crate::pki_files::{self, PkiPaths};
use crate::server::{self, ControllerConfig};
use crate::services::events::{EventLog, NewEvent, kind};
use crate::state::store::{EtcdStore, RedbStore, Store, StoreError};

/// Exit code for bad configuration.
pub const EXIT_CONFIG: i32 = 64;
/// Exit code when the controller is unreachable.
pub const EXIT_UNAVAILABLE: i32 = 69;
/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = config_file::DEFAULT_DATA_DIR;
/// The file `serve` writes with the URL local admin commands use.
pub const API_URL_FILE: &str = "api-url";

/// The NovaCron controller.
#[derive(Debug, Parser)]
#[command(name = "novacron-controller", version, about)]
pub struct Cli {
    /// The configuration file (TOML) [env: NOVACRON_CONTROLLER_CONFIG]
    /// [default: /etc/novacron/controller.toml, when it exists].
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The controller's data directory (PKI, store) [env: NOVACRON_DATA_DIR]
    /// [file: data_dir] [default: /var/lib/novacron/controller].
    #[arg(long, global = true)]
    pub data_dir: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the fleet CA, the server certificate and a local admin certificate.
    Init(InitArgs),
    /// Run the controller.
    Serve(Box<ServeArgs>),
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Operator certificates.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Revoke certificates (operator or node) by serial.
    #[command(subcommand)]
    Cert(CertCommand),
    /// The store: copy a single controller's redb store into etcd.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Save an online, consistent snapshot of the store with the CA, the
    /// secrets key and the pricing catalog, into a new directory.
    Backup {
        /// The directory to create.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Bring a new controller (or a new group on an empty etcd prefix) up from a
    /// backup: its PKI, secrets key and pricing into the data directory, its
    /// records into the configured store, which must be empty.
    Restore {
        /// The backup directory (`backup --out`).
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
    },
}

/// `store` subcommands.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Copy the data directory's redb store into etcd (the `[store]` settings,
    /// `store.backend = "etcd"`), whose prefix must be empty; the controller must
    /// be stopped. Checks the copy record by record.
    Migrate,
}

/// `cert` subcommands. Each works on the data directory's store when the controller
/// is stopped, and through the running controller (with the local admin
/// certificate) when it runs.
#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Revoke a certificate: it is refused at every later handshake, its live
    /// connections are closed, and the revocation survives restarts.
    Revoke {
        /// The certificate's serial, hex (as `admin issue` and `novacron context
        /// show` print it).
        #[arg(long)]
        serial: String,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List the revoked certificates.
    #[command(visible_alias = "ls")]
    List,
}

/// `init` arguments.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// DNS names and IP addresses agents and operators use to reach this controller
    /// (repeatable) [env: NOVACRON_SERVER_NAMES=a,b] [file: init.server_names].
    /// Default: localhost, 127.0.0.1, ::1 and this host's name.
    #[arg(long = "server-name")]
    pub server_names: Vec<String>,
    /// Replace an existing CA (every node must join again).
    #[arg(long)]
    pub force: bool,
}

/// `serve` arguments. Each one may also come from the environment or the `[serve]`
/// table of the file (see `/etc/novacron/controller.toml`); a flag wins.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TCP address of the HTTPS API [env: NOVACRON_API_LISTEN] [default: 0.0.0.0:7443].
    #[arg(long)]
    pub api_listen: Option<String>,
    /// UDP address of the agent link (QUIC) [env: NOVACRON_QUIC_LISTEN]
    /// [default: 0.0.0.0:7443].
    #[arg(long)]
    pub quic_listen: Option<String>,
    /// The name agents and operators use for this controller (must be in its
    /// certificate) [env: NOVACRON_SERVER_NAME] [default: localhost].
    #[arg(long)]
    pub server_name: Option<String>,
    /// `host:port` enrolling agents are told to connect to over QUIC
    /// [env: NOVACRON_ADVERTISE].
    #[arg(long)]
    pub advertise: Option<String>,
    /// QUIC keep-alive interval [env: NOVACRON_KEEP_ALIVE] [default: 500ms].
    #[arg(long)]
    pub keep_alive: Option<String>,
    /// QUIC idle timeout: a silent agent is disconnected after this
    /// [env: NOVACRON_IDLE_TIMEOUT] [default: 2s].
    #[arg(long)]
    pub idle_timeout: Option<String>,
    /// Time from disconnected to down [env: NOVACRON_DOWN_AFTER] [default: 800ms].
    #[arg(long)]
    pub down_after: Option<String>,
    /// Extra time, after this controller starts, for nodes to reconnect before they
    /// are down [env: NOVACRON_STARTUP_GRACE] [default: 10s].
    #[arg(long)]
    pub startup_grace: Option<String>,
    /// Extra time for a node whose agent stopped cleanly (a restart; its containers
    /// keep running) before it is down [env: NOVACRON_RESTART_GRACE] [default: 30s].
    #[arg(long)]
    pub restart_grace: Option<String>,
    /// Lifetime of node certificates (renewed at 70%) [env: NOVACRON_NODE_CERT_TTL]
    /// [default: 30days].
    #[arg(long)]
    pub node_cert_ttl: Option<String>,
    /// Samples kept in memory per node [env: NOVACRON_METRICS_WINDOW] [default: 300].
    #[arg(long)]
    pub metrics_window: Option<String>,
    /// Answer DNS for the service catalog on this UDP and TCP address, e.g.
    /// 127.0.0.1:8600 [env: NOVACRON_DNS_LISTEN] [default: off].
    #[arg(long)]
    pub dns_listen: Option<String>,
    /// The fleet's DNS domain: services answer as <service>.service.<domain>
    /// [env: NOVACRON_DNS_DOMAIN] [default: novacron].
    #[arg(long)]
    pub dns_domain: Option<String>,
    /// The key that seals secrets at rest: a file of 64 hex digits, mode 0600
    /// [env: NOVACRON_SECRETS_KEY_FILE] [default: <data-dir>/secrets.key, made by
    /// init or at the first start].
    #[arg(long)]
    pub secrets_key_file: Option<String>,
    /// Log format: `text` (coloured only on a terminal without NO_COLOR) or `json`
    /// (one object per line, for journald and log collectors)
    /// [env: NOVACRON_LOG_FORMAT] [default: text].
    #[arg(long, value_name = "text|json")]
    pub log_format: Option<String>,
    /// For tests only (hidden): accept only these agent wire protocol versions
    /// (`2`, `2-3`), within those this build speaks, to act as an older
    /// controller in the version-skew tests. Not for production use.
    #[arg(long, hide = true, value_name = "MIN-MAX", value_parser = novacron_common::wire::VersionRange::parse_within_supported)]
    pub wire_versions: Option<novacron_common::wire::VersionRange>,
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a join token and print the join command.
    Create {
        /// How long the token is valid.
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        ttl: Duration,
        /// How many nodes may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Free text for the audit trail.
        #[arg(long, default_value = "")]
        description: String,
        /// Print only the token.
        #[arg(long)]
        quiet: bool,
    },
}

/// `node` subcommands.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Refuse a node's certificates from now on and drop its connection.
    Revoke {
        /// The node name.
        name: String,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// `admin` subcommands.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Issue an operator client certificate (offline, with the CA key).
    Issue {
        /// The operator's name.
        #[arg(long)]
        name: String,
        /// viewer, operator or admin.
        #[arg(long, default_value = "viewer")]
        role: String,
        /// Lifetime.
        #[arg(long, default_value = "90days", value_parser = parse_duration)]
        ttl: Duration,
        /// Directory to write `<name>.pem` and `<name>-key.pem` into; created
        /// (0700, with missing parents) when it does not exist.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Create an API token (a bearer credential for tools such as CI or
    /// Prometheus) through the running controller; prints it once.
    Token {
        /// Who or what will hold it.
        #[arg(long)]
        name: String,
        /// viewer, operator or admin.
        #[arg(long, default_value = "viewer")]
        role: String,
        /// Lifetime (at most 365 days).
        #[arg(long, default_value = "30days", value_parser = parse_duration)]
        ttl: Duration,
    },
}

/// Runs the command line (logging is set up here, once the file is read, since the
/// file may choose its format); returns the exit code.
pub async fn main(cli: Cli) -> i32 {
    let loaded = match config_file::load(cli.config.as_deref(), &ProcessEnv) {
        Ok(l) => l,
        Err(e) => return config_error(&e.to_string()),
    };
    let flag = match &cli.command {
        Command::Serve(args) => args.log_format.as_deref(),
        _ => None,
    };
    match config_file::log_format(&loaded, &ProcessEnv, flag) {
        Ok(format) => novacron_common::logging::init_with("info", format),
        Err(e) => return config_error(&e.to_string()),
    }
    let data_dir = match config_file::data_dir(&loaded, &ProcessEnv, cli.data_dir.as_deref()) {
        Ok(d) => d,
        Err(e) => return config_error(&e.to_string()),
    };
    match cli.command {
        Command::Init(args) => init(&loaded, &data_dir, args),
        Command::Serve(args) => serve(&loaded, &data_dir, *args).await,
        Command::Token(TokenCommand::Create {
            ttl,
            uses,
            description,
            quiet,
        }) => {
            let req = TokenRequest {
                ttl_secs: ttl.as_secs(),
                uses,
                description,
            };
            match admin_call::<TokenResponse>(&data_dir, "/v1/tokens", &req).await {
                Ok(t) if quiet => {
                    println!("{}", t.token);
                    0
                }
                Ok(t) => {
                    println!(
                        "token: {}\nca fingerprint: {}\n\njoin a host with:\n  {}",
                        t.token, t.ca_fingerprint, t.join_command
                    );
                    0
                }
                Err(code) => code,
            }
        }
        Command::Node(NodeCommand::Revoke { name, reason }) => {
            let path = format!("/v1/nodes/{name}/revoke");
            match admin_call::<()>(&data_dir, &path, &RevokeRequest { reason }).await {
                Ok(()) => {
                    println!("node {name:?} revoked; its connection was closed");
                    0
                }
                Err(code) => code,
            }
        }
        Command::Admin(AdminCommand::Issue {
            name,
            role,
            ttl,
            out,
        }) => admin_issue(&data_dir, &name, &role, ttl, &out),
        Command::Cert(CertCommand::Revoke { serial, reason }) => {
            cert_revoke(&data_dir, &serial, &reason).await
        }
        Command::Cert(CertCommand::List) => cert_list(&data_dir).await,
        Command::Store(StoreCommand::Migrate) => store_migrate(&loaded, &data_dir).await,
        Command::Backup { out } => backup(&loaded, &data_dir, &out).await,
        Command::Restore { from } => restore(&loaded, &data_dir, &from).await,
        Command::Admin(AdminCommand::Token { name, role, ttl }) => {
            let req = ApiTokenRequest {
                name,
                role,
                ttl_secs: Some(ttl.as_secs()),
            };
            match admin_call::<ApiTokenResponse>(&data_dir, "/v1/api-tokens", &req).await {
                Ok(t) => {
                    println!("{}", t.token);
                    0
                }
                Err(code) => code,
            }
        }
    }
}

fn init(loaded: &config_file::Loaded, data_dir: &Path, args: InitArgs) -> i32 {
    let names = match config_file::server_names(loaded, &ProcessEnv, &args.server_names) {
        Ok(n) => n,
        Err(e) => return config_error(&e.to_string()),
    };
    let names = if names.is_empty() {
        let mut names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
        if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            let host = host.trim().to_ascii_lowercase();
            if !host.is_empty() && !names.contains(&host) {
                names.push(host);
            }
        }
        names
    } else {
        names
    };
    let choice = match config_file::store(loaded, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => return config_error(&e.to_string()),
    };
    // A group's store must be reachable before the CA is made for it.
    let etcd_note = match choice {
        config_file::StoreChoice::Redb => String::new(),
        config_file::StoreChoice::Etcd { etcd, .. } => {
            let (endpoints, prefix) = (etcd.endpoints.join(","), etcd.prefix.clone());
            match EtcdStore::open(etcd, false) {
                Ok(_) => format!(
                    "\nstore: etcd {endpoints}, prefix {prefix}\nthe other controllers of the group need copies of pki/ and secrets.key"
                ),
                Err(e) => {
                    eprintln!("error: {e}");
                    return EXIT_UNAVAILABLE;
                }
            }
        }
    };
    match pki_files::init(data_dir, &names, args.force, SystemTime::now()) {
        Ok(fp) => {
            let key = data_dir.join(crate::services::secrets::KEY_FILE);
            if let Err(e) = crate::services::secrets::SecretsKey::create(&key) {
                eprintln!("error: {e}");
                return 1;
            }
            let admin_serial = pki_files::read(&PkiPaths::new(data_dir).admin_cert())
                .ok()
                .and_then(|pem| Serial::of_cert_pem(&pem).ok())
                .map_or_else(|| "unknown".to_owned(), |s| s.to_string());
            println!(
                "initialized {}\nserver names: {}\nca fingerprint: {fp}\nadmin certificate serial: {admin_serial}{etcd_note}\n\nnext: novacron-controller --data-dir {} serve",
                data_dir.display(),
                names.join(", "),
                data_dir.display()
            );
            0
        }
        Err(e @ pki_files::PkiFilesError::AlreadyInitialized { .. }) => {
            config_error(&e.to_string())
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// Turns `serve` arguments, the environment and the file into a validated
/// configuration.
pub fn config_from_args(
    loaded: &config_file::Loaded,
    env: &dyn config_file::Env,
    data_dir: &Path,
    args: &ServeArgs,
) -> Result<ControllerConfig, config_file::ConfigError> {
    let flags = ServeFlags {
        api_listen: args.api_listen.clone(),
        quic_listen: args.quic_listen.clone(),
        server_name: args.server_name.clone(),
        advertise: args.advertise.clone(),
        keep_alive: args.keep_alive.clone(),
        idle_timeout: args.idle_timeout.clone(),
        down_after: args.down_after.clone(),
        startup_grace: args.startup_grace.clone(),
        restart_grace: args.restart_grace.clone(),
        node_cert_ttl: args.node_cert_ttl.clone(),
        metrics_window: args.metrics_window.clone(),
        dns_listen: args.dns_listen.clone(),
        dns_domain: args.dns_domain.clone(),
        secrets_key_file: args.secrets_key_file.clone(),
    };
    config_file::resolve_serve(loaded, env, data_dir, &flags)
}

async fn serve(loaded: &config_file::Loaded, data_dir: &Path, args: ServeArgs) -> i32 {
    let mut config = match config_from_args(loaded, &ProcessEnv, data_dir, &args) {
        Ok(c) => c,
        Err(e) => return config_error(&e.to_string()),
    };
    if let Some(versions) = args.wire_versions {
        config.wire_versions = versions;
    }
    if let Err(e) = pki_files::load(data_dir) {
        return config_error(&e.to_string());
    }
    let choice = match config_file::store(loaded, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => return config_error(&e.to_string()),
    };
    if let config_file::StoreChoice::Etcd { etcd, lease } = choice {
        return serve_group(config, data_dir, etcd, lease).await;
    }
    let controller = match server::start(config.clone()).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return 1;
        }
    };
    announce(data_dir, &controller);
    // Tell systemd (Type=notify) that the API and the agent link are serving.
    if let Err(error) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(%error, "cannot notify systemd of readiness");
    }
    novacron_common::signal::ignore_hangup("novacron-controller");
    novacron_common::signal::shutdown_signal().await;
    info!("stopping on signal");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    controller.shutdown().await;
    0
}

/// Writes the API URL file and says that the controller serves.
fn announce(data_dir: &Path, controller: &server::Controller) {
    let host = if controller.api_addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        controller.api_addr.ip().to_string()
    };
    let url = format!(
        "https://{}",
        SocketAddr::new(
            host.parse().unwrap_or([127, 0, 0, 1].into()),
            controller.api_addr.port()
        )
    );
    if let Err(e) = pki_files::write_file(&data_dir.join(API_URL_FILE), &url, 0o644) {
        eprintln!("warning: {e}");
    }
    println!(
        "controller ready: api {url}, agent link udp {}",
        controller.quic_addr
    );
}

/// `serve` in a group on etcd: a standby until elected, the whole controller
/// while it leads, a standby again after its term ends; resigns on a signal.
async fn serve_group(
    config: ControllerConfig,
    data_dir: &Path,
    etcd: crate::state::store::EtcdConfig,
    lease: Duration,
) -> i32 {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let on_signal = shutdown.clone();
    novacron_common::signal::ignore_hangup("novacron-controller");
    tokio::spawn(async move {
        novacron_common::signal::shutdown_signal().await;
        info!("stopping on signal");
        on_signal.cancel();
    });
    // Ready for systemd once the group is joined: a standby is a healthy member.
    println!("controller standing by: campaigning for leadership");
    if let Err(error) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(%error, "cannot notify systemd of readiness");
    }
    let dir = data_dir.to_owned();
    let result = crate::ha::serve(config, etcd, lease, shutdown, |c| announce(&dir, c)).await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

/// Opens the configured etcd store unfenced (for offline tools), or explains.
async fn etcd_store(etcd: crate::state::store::EtcdConfig) -> Result<EtcdStore, i32> {
    match tokio::task::spawn_blocking(move || EtcdStore::open(etcd, false)).await {
        Ok(Ok(store)) => Ok(store),
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            Err(EXIT_UNAVAILABLE)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(1)
        }
    }
}

async fn store_migrate(loaded: &config_file::Loaded, data_dir: &Path) -> i32 {
    let etcd = match config_file::store(loaded, &ProcessEnv) {
        Ok(config_file::StoreChoice::Etcd { etcd, .. }) => etcd,
        Ok(config_file::StoreChoice::Redb) => {
            return config_error(
                "store migrate copies into etcd: set store.backend = \"etcd\" and store.endpoints in the configuration file (or NOVACRON_STORE=etcd and NOVACRON_ETCD_ENDPOINTS)",
            );
        }
        Err(e) => return config_error(&e.to_string()),
    };
    let redb = match RedbStore::open(&data_dir.join(server::STORE_FILE)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let records = match redb.export() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let prefix = etcd.prefix.clone();
    let store = match etcd_store(etcd).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let result = tokio::task::spawn_blocking(move || {
        if !store.is_empty()? {
            return Ok(Err(format!(
                "the etcd prefix {prefix} already holds a fleet's records; choose another store.prefix or clear it"
            )));
        }
        store.import(&records, 100)?;
        let mut want = records;
        let mut got = store.export()?;
        want.sort();
        got.sort();
        if want != got {
            return Ok(Err(format!(
                "the copy differs from the source ({} records read back, {} written); nothing else was changed, clear the prefix and try again",
                got.len(),
                want.len()
            )));
        }
        Ok::<_, StoreError>(Ok((want.len(), store.revision()?, prefix)))
    })
    .await;
    match result {
        Ok(Ok(Ok((n, revision, prefix)))) => {
            println!(
                "copied {n} records (store revision {revision}) into etcd under {prefix}; start the controllers with store.backend = \"etcd\""
            );
            0
        }
        Ok(Ok(Err(msg))) => {
            eprintln!("error: {msg}");
            1
        }
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            1
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// The files of a data directory a backup carries besides the store.
const BACKUP_FILES: [&str; 8] = [
    "pki/ca.pem",
    "pki/ca-key.pem",
    "pki/server.pem",
    "pki/server-key.pem",
    "pki/admin.pem",
    "pki/admin-key.pem",
    crate::services::secrets::KEY_FILE,
    server::PRICING_FILE,
];

/// The store's records in a backup directory: one JSON array of
/// [`novacron_api::BackupRecord`].
const BACKUP_STORE: &str = "store.json";

async fn backup(loaded: &config_file::Loaded, data_dir: &Path, out: &Path) -> i32 {
    let records: Vec<novacron_api::BackupRecord> = match config_file::store(loaded, &ProcessEnv) {
        Err(e) => return config_error(&e.to_string()),
        Ok(config_file::StoreChoice::Etcd { etcd, .. }) => {
            let store = match etcd_store(etcd).await {
                Ok(s) => s,
                Err(code) => return code,
            };
            match tokio::task::spawn_blocking(move || store.export()).await {
                Ok(Ok(r)) => match as_records(r) {
                    Ok(r) => r,
                    Err(code) => return code,
                },
                Ok(Err(e)) => {
                    eprintln!("error: {e}");
                    return 1;
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    return 1;
                }
            }
        }
        // The running controller holds the file: it takes the snapshot.
        Ok(config_file::StoreChoice::Redb) => match offline_store(data_dir) {
            Err(code) => return code,
            Ok(Some(store)) => match store.export().map(as_records) {
                Ok(Ok(r)) => r,
                Ok(Err(code)) => return code,
                Err(e) => {
                    eprintln!("error: {e}");
                    return 1;
                }
            },
            Ok(None) => {
                match admin_request(data_dir, reqwest::Method::GET, "/v1/backup", None::<&()>).await
                {
                    Ok(r) => r,
                    Err(code) => return code,
                }
            }
        },
    };
    if let Err(e) = write_backup(data_dir, out, &records) {
        eprintln!("error: {e}");
        return 1;
    }
    println!(
        "backed up {} records and the CA to {}",
        records.len(),
        out.display()
    );
    0
}

fn as_records(raw: Vec<(String, Vec<u8>)>) -> Result<Vec<novacron_api::BackupRecord>, i32> {
    raw.into_iter()
        .map(|(key, bytes)| match serde_json::from_slice(&bytes) {
            Ok(value) => Ok(novacron_api::BackupRecord { key, value }),
            Err(e) => {
                eprintln!("error: the record {key:?} is corrupt: {e}");
                Err(1)
            }
        })
        .collect()
}

fn write_backup(
    data_dir: &Path,
    out: &Path,
    records: &[novacron_api::BackupRecord],
) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(out)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e} (it must not exist)", out.display()))?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(out.join("pki"))?;
    for file in BACKUP_FILES {
        let from = data_dir.join(file);
        match std::fs::read(&from) {
            Ok(bytes) => write_private(&out.join(file), &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && file == server::PRICING_FILE => {}
            Err(e) => anyhow::bail!("cannot read {}: {e}", from.display()),
        }
    }
    write_private(&out.join(BACKUP_STORE), &serde_json::to_vec(records)?)?;
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

async fn restore(loaded: &config_file::Loaded, data_dir: &Path, from: &Path) -> i32 {
    let choice = match config_file::store(loaded, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => return config_error(&e.to_string()),
    };
    let records: Vec<novacron_api::BackupRecord> = match std::fs::read(from.join(BACKUP_STORE))
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => {
            return config_error(&format!(
                "{} is not a backup: {e}",
                from.join(BACKUP_STORE).display()
            ));
        }
    };
    if PkiPaths::new(data_dir).ca_cert().exists() {
        return config_error(&format!(
            "{} already holds a controller; restore into a new data directory",
            data_dir.display()
        ));
    }
    let raw: Vec<(String, Vec<u8>)> = records
        .iter()
        .map(|r| {
            (
                r.key.clone(),
                serde_json::to_vec(&r.value).unwrap_or_default(),
            )
        })
        .collect();
    let copy = || -> anyhow::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(data_dir.join("pki"))?;
        for file in BACKUP_FILES {
            match std::fs::read(from.join(file)) {
                Ok(bytes) => write_private(&data_dir.join(file), &bytes)?,
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound && file == server::PRICING_FILE => {
                }
                Err(e) => anyhow::bail!("cannot read {}: {e}", from.join(file).display()),
            }
        }
        Ok(())
    };
    if let Err(e) = copy() {
        eprintln!("error: {e}");
        return 1;
    }
    let n = raw.len();
    let result = match choice {
        config_file::StoreChoice::Redb => RedbStore::open(&data_dir.join(server::STORE_FILE))
            .and_then(|store| store.import(&raw))
            .map_err(|e| e.to_string()),
        config_file::StoreChoice::Etcd { etcd, .. } => {
            let store = match etcd_store(etcd).await {
                Ok(s) => s,
                Err(code) => return code,
            };
            tokio::task::spawn_blocking(move || {
                if !store.is_empty()? {
                    return Ok(Err(
                        "the etcd prefix already holds a fleet's records; restore into an empty prefix".to_string(),
                    ));
                }
                store.import(&raw, 100).map(Ok)
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
            .and_then(|r| r)
        }
    };
    match result {
        Ok(()) => {
            println!(
                "restored {n} records and the CA into {}; start it with `novacron-controller --data-dir {} serve` (agents reconnect on their own)",
                data_dir.display(),
                data_dir.display()
            );
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

fn admin_issue(data_dir: &Path, name: &str, role: &str, ttl: Duration, out: &Path) -> i32 {
    let role: Role = match role.parse() {
        Ok(Role::Node) | Err(_) => {
            return config_error(&format!(
                "--role {role:?}: expected viewer, operator or admin"
            ));
        }
        Ok(r) => r,
    };
    if let Err(e) = pki::validate_name(name) {
        return config_error(&format!("--name: {e}"));
    }
    let paths = PkiPaths::new(data_dir);
    let ca = match (
        pki_files::read(&paths.ca_cert()),
        pki_files::read(&paths.ca_key()),
    ) {
        (Ok(cert_pem), Ok(key_pem)) => pki::CertAndKey { cert_pem, key_pem },
        (Err(e), _) | (_, Err(e)) => return config_error(&e.to_string()),
    };
    let identity = Identity {
        name: name.to_string(),
        role,
    };
    let issued =
        match pki::issue_client_cert(&ca, &identity, Validity::starting(SystemTime::now(), ttl)) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("error: {e}");
                return 1;
            }
        };
    if let Err(e) = create_out_dir(out) {
        eprintln!("error: cannot create {}: {e}", out.display());
        return 1;
    }
    let cert = out.join(format!("{name}.pem"));
    let key = out.join(format!("{name}-key.pem"));
    let result = pki_files::write_file(&key, &issued.key_pem, 0o600)
        .and_then(|()| pki_files::write_file(&cert, &issued.cert_pem, 0o644));
    let serial = match Serial::of_cert_pem(&issued.cert_pem) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    match result {
        Ok(()) => {
            println!(
                "issued {identity}: {} and {}\nserial: {serial} (revoke with `novacron-controller cert revoke --serial {serial}`)",
                cert.display(),
                key.display()
            );
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// Creates `admin issue --out DIR` when it is missing, private (0700: it will hold
/// a private key), with any missing parents; an existing directory is left as it is.
fn create_out_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // The mode passed above is narrowed by the umask; say it exactly.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The store of a stopped controller, or `None` when the controller runs (it holds
/// the store open); Err is the exit code.
fn offline_store(data_dir: &Path) -> Result<Option<RedbStore>, i32> {
    if let Err(e) = pki_files::load(data_dir) {
        return Err(config_error(&e.to_string()));
    }
    match RedbStore::open(&data_dir.join(server::STORE_FILE)) {
        Ok(store) => Ok(Some(store)),
        Err(StoreError::Locked { .. }) => Ok(None),
        Err(e) => {
            eprintln!("error: {e}");
            Err(1)
        }
    }
}

async fn cert_revoke(data_dir: &Path, serial: &str, reason: &str) -> i32 {
    let serial: Serial = match serial.parse() {
        Ok(s) => s,
        Err(e) => return config_error(&format!("--serial: {e}")),
    };
    let store = match offline_store(data_dir) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let Some(store) = store else {
        let req = CertRevokeRequest {
            serial: serial.to_string(),
            reason: reason.to_owned(),
        };
        return match admin_call::<CertRevokeResponse>(data_dir, "/v1/certs/revoke", &req).await {
            Ok(r) => {
                println!(
                    "certificate {} revoked{}; closed {} API connection(s) and the agent link of {} node(s)",
                    r.revocation.serial,
                    if r.already_revoked {
                        " (it already was)"
                    } else {
                        ""
                    },
                    r.closed_api_connections,
                    r.closed_nodes.len()
                );
                0
            }
            Err(code) => code,
        };
    };
    let store: Arc<dyn crate::state::store::Store> = Arc::new(store);
    let by = format!("{} (offline)", local_operator());
    let result =
        crate::services::certs::persist(store.as_ref(), &serial, &by, reason, SystemTime::now())
            .map_err(|e| e.to_string())
            .and_then(|(record, new)| {
                let log = EventLog::open(store.clone(), crate::services::events::DEFAULT_RETAIN)
                    .map_err(|e| e.to_string())?;
                let why = if reason.is_empty() {
                    "no reason given"
                } else {
                    reason
                };
                log.record(
                    NewEvent::new(
                        kind::CERT_REVOKED,
                        by.clone(),
                        format!("certificate {serial} revoked offline: {why}"),
                    )
                    .detail("serial", &serial),
                )
                .map_err(|e| e.to_string())?;
                Ok((record, new))
            });
    match result {
        Ok((record, new)) => {
            println!(
                "certificate {} revoked{} in {}; the controller refuses it from its next start",
                record.serial,
                if new { "" } else { " (it already was)" },
                data_dir.display()
            );
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

async fn cert_list(data_dir: &Path) -> i32 {
    let list = match offline_store(data_dir) {
        Err(code) => return code,
        Ok(Some(store)) => match crate::state::store::Store::cert_revocations(&store) {
            Ok(l) => l.into_iter().map(CertRevocationView::from).collect(),
            Err(e) => {
                eprintln!("error: {e}");
                return 1;
            }
        },
        Ok(None) => {
            match admin_request::<Vec<CertRevocationView>>(
                data_dir,
                reqwest::Method::GET,
                "/v1/certs/revoked",
                None::<&()>,
            )
            .await
            {
                Ok(l) => l,
                Err(code) => return code,
            }
        }
    };
    if list.is_empty() {
        println!("no revoked certificates");
    }
    for r in list {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(r.revoked_unix_ms);
        println!(
            "{}  revoked {} by {}: {}",
            r.serial,
            humantime::format_rfc3339_seconds(at),
            r.by,
            if r.reason.is_empty() {
                "no reason given"
            } else {
                &r.reason
            }
        );
    }
    0
}

/// Who runs an offline command, for the audit trail.
fn local_operator() -> String {
    match std::env::var("USER") {
        Ok(user) if !user.is_empty() => format!("local user {user}"),
        _ => "local admin".to_owned(),
    }
}

/// POSTs `body` to the local controller with the data directory's admin certificate.
async fn admin_call<T: DeserializeOwned + 'static>(
    data_dir: &Path,
    path: &str,
    body: &impl serde::Serialize,
) -> Result<T, i32> {
    admin_request(data_dir, reqwest::Method::POST, path, Some(body)).await
}

/// Calls the local controller with the data directory's admin certificate.
async fn admin_request<T: DeserializeOwned + 'static>(
    data_dir: &Path,
    method: reqwest::Method,
    path: &str,
    body: Option<&impl serde::Serialize>,
) -> Result<T, i32> {
    tls::install_crypto_provider();
    let paths = PkiPaths::new(data_dir);
    let read = |p: PathBuf| pki_files::read(&p).map_err(|e| config_error(&e.to_string()));
    let ca = read(paths.ca_cert())?;
    let cert = read(paths.admin_cert())?;
    let key = read(paths.admin_key())?;
    let base = read(data_dir.join(API_URL_FILE)).map_err(|_| {
        eprintln!("hint: the controller writes {} when it starts; is `novacron-controller serve` running on this data directory?", data_dir.join(API_URL_FILE).display());
        EXIT_UNAVAILABLE
    })?;
    let config = tls::client_config(&ca, Some((&cert, &key)), &[b"h2", b"http/1.1"])
        .map_err(|e| config_error(&e.to_string()))?;
    let client = reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| {
            eprintln!("error: {e}");
            1
        })?;
    let url = format!("{}{path}", base.trim());
    let request = client.request(method, &url);
    let request = match body {
        Some(body) => request.json(body),
        None => request,
    };
    let resp = request.send().await.map_err(|e| {
        eprintln!(
            "error: cannot reach the controller at {}: {e}. Is it running?",
            base.trim()
        );
        EXIT_UNAVAILABLE
    })?;
    let status = resp.status();
    if !status.is_success() {
        let msg = resp
            .json::<novacron_api::ApiError>()
            .await
            .map(|e| e.error)
            .unwrap_or_else(|_| status.to_string());
        eprintln!("error: {msg}");
        return Err(1);
    }
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<()>() {
        // No body expected; `null` deserializes into ().
        return serde_json::from_str("null").map_err(|_| 1);
    }
    resp.json::<T>().await.map_err(|e| {
        eprintln!("error: unreadable answer from the controller: {e}");
        1
    })
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?}: {e}; expected e.g. 500ms, 2s, 1h, 30days"))
}

fn config_error(msg: &str) -> i32 {
    eprintln!("configuration error: {msg}");
    EXIT_CONFIG
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn serve_args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["novacron-controller", "serve"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Serve(a) => *a,
            other => panic!("not serve: {other:?}"),
        }
    }

    fn config_from_args(dir: &Path, args: &ServeArgs) -> Result<ControllerConfig, String> {
        super::config_from_args(&config_file::Loaded::default(), &[], dir, args)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn bad_serve_settings_name_the_flag_and_what_is_accepted() {
        let dir = Path::new("/tmp/x");
        let err =
            config_from_args(dir, &serve_args(&["--api-listen", "nope"])).expect_err("bad addr");
        assert!(
            err.contains("--api-listen")
                && err.contains("\"nope\"")
                && err.contains("0.0.0.0:7443"),
            "{err}"
        );
        let err =
            config_from_args(dir, &serve_args(&["--keep-alive", "3s"])).expect_err("keepalive");
        assert!(err.contains("--keep-alive"), "{err}");
        let err =
            config_from_args(dir, &serve_args(&["--metrics-window", "0"])).expect_err("window");
        assert!(err.contains("1 to 100000"), "{err}");
        let ok = config_from_args(dir, &serve_args(&[])).expect("defaults are valid");
        assert!(ok.liveness.idle_timeout + ok.liveness.down_after <= Duration::from_secs(3));
    }
}

//! End-to-end tests of the CLI (`novacron_cli`): argument parsing, the context file,
//! and the client against a real HTTPS server (the controller's [`TlsListener`] with
//! real certificates) that serves a fixture of nodes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{ConnectInfo, Path as UrlPath};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::{CommandFactory, Parser};
use novacron_api::{ApiError, NodeView};
use novacron_common::pki::{self, CertAndKey, Identity, Role, Validity};
use novacron_common::tls;
use tempfile::TempDir;

use novacron_cli::fixtures::{fixture, now as fixture_now};
use novacron_cli::nodes::NodeCommand;
use novacron_cli::*;
use novacron_controller::https::{Peer, TlsListener, serve};

/// A fleet CA, its controller certificate, and files for client contexts.
struct Fleet {
    ca: CertAndKey,
    server: CertAndKey,
    dir: TempDir,
}

fn validity(ttl: Duration) -> Validity {
    Validity::starting(SystemTime::now(), ttl)
}

impl Fleet {
    fn new() -> Fleet {
        let ca = pki::generate_ca("test fleet CA", validity(Duration::from_secs(3600)))
            .expect("CA generation");
        let server = pki::issue_server_cert(
            &ca,
            &["localhost".to_string(), "127.0.0.1".to_string()],
            validity(Duration::from_secs(3600)),
        )
        .expect("server cert");
        Fleet {
            ca,
            server,
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("novacron/config.toml")
    }

    fn client_cert(&self, name: &str, role: Role, validity: Validity) -> CertAndKey {
        let identity = Identity {
            name: name.to_string(),
            role,
        };
        pki::issue_client_cert(&self.ca, &identity, validity).expect("client cert")
    }

    /// Writes `cert` and a CA into the temp dir and a context `name` using them.
    fn add_context(&self, name: &str, api: &str, ca_pem: &str, cert: &CertAndKey) {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).expect("context dir");
        let write = |file: &str, text: &str| {
            let path = dir.join(file);
            std::fs::write(&path, text).expect("write PEM");
            path
        };
        let ctx = Context {
            api: api.parse().expect("API URL"),
            ca: write("ca.pem", ca_pem),
            cert: write("cert.pem", &cert.cert_pem),
            key: write("key.pem", &cert.key_pem),
            token_file: None,
            also: vec![],
        };
        write_context(&self.config_path(), name, &ctx, true).expect("write context");
    }

    fn admin(&self) -> CertAndKey {
        self.client_cert("alice", Role::Admin, validity(Duration::from_secs(600)))
    }
}

/// Serves the fixture nodes like the controller's API would; denies `mallory`.
async fn start_api(fleet: &Fleet) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    tls::install_crypto_provider();
    let chain = format!("{}{}", fleet.server.cert_pem, fleet.ca.cert_pem);
    let verifier = tls::fleet_client_verifier(&fleet.ca.cert_pem, true).expect("verifier");
    let config = tls::server_config(&chain, &fleet.server.key_pem, verifier, client::ALPN)
        .expect("server config");
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let listener = TlsListener::new(tcp, Arc::new(config)).expect("listener");
    let addr = listener.local_addr();
    let router = Router::new()
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{name}", get(show_node));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, router, async move {
        let _ = stopped.await;
    }));
    (addr, stop)
}

fn api_error(status: StatusCode, error: String) -> Response {
    (status, Json(ApiError::new(status.as_u16(), error))).into_response()
}

async fn list_nodes(ConnectInfo(peer): ConnectInfo<Peer>) -> Response {
    match peer.identity {
        Some(id) if id.name != "mallory" => Json(fixture()).into_response(),
        Some(id) => api_error(StatusCode::FORBIDDEN, format!("{id} may not list nodes")),
        None => api_error(
            StatusCode::UNAUTHORIZED,
            "a client certificate is required".into(),
        ),
    }
}

async fn show_node(UrlPath(name): UrlPath<String>) -> Response {
    match fixture().into_iter().find(|n| n.name == name) {
        Some(node) => Json(node).into_response(),
        None => api_error(StatusCode::NOT_FOUND, format!("no node named {name:?}")),
    }
}

fn parse(config: &Path, args: &[&str]) -> Cli {
    let mut argv = vec!["novacron", "--config", config.to_str().expect("UTF-8 path")];
    argv.extend_from_slice(args);
    Cli::try_parse_from(argv).expect("valid arguments")
}

/// Runs the CLI; returns stdout, or the error message and exit code.
async fn novacron(config: &Path, args: &[&str], now: SystemTime) -> Result<String, (String, u8)> {
    let cli = parse(config, args);
    let mut out = Vec::new();
    let env = BTreeMap::new();
    match run(&cli, &env, &mut out, now).await {
        Ok(()) => Ok(String::from_utf8(out).expect("UTF-8 output")),
        Err(e) => Err((e.to_string(), e.exit_code())),
    }
}

#[tokio::test]
async fn node_list_shows_names_and_status_from_a_real_controller() {
    let fleet = Fleet::new();
    let (addr, _stop) = start_api(&fleet).await;
    let api = format!("https://localhost:{}", addr.port());
    fleet.add_context("test", &api, &fleet.ca.cert_pem, &fleet.admin());

    let out = novacron(&fleet.config_path(), &["node", "list"], fixture_now())
        .await
        .expect("node list");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{out}");
    assert!(
        lines[1].starts_with("gpu-1") && lines[1].contains("ready"),
        "{out}"
    );
    assert!(lines[1].contains("1s ago"), "{out}");
    assert!(
        lines[2].starts_with("cpu-2") && lines[2].contains("down"),
        "{out}"
    );

    let json = novacron(
        &fleet.config_path(),
        &["-o", "json", "node", "list"],
        fixture_now(),
    )
    .await
    .expect("node list -o json");
    let nodes: Vec<NodeView> = serde_json::from_str(&json).expect("JSON NodeViews");
    assert_eq!(nodes.len(), 2);
}

#[tokio::test]
async fn node_show_prints_the_detail_view() {
    let fleet = Fleet::new();
    let (addr, _stop) = start_api(&fleet).await;
    let api = format!("https://127.0.0.1:{}", addr.port());
    fleet.add_context("test", &api, &fleet.ca.cert_pem, &fleet.admin());

    let out = novacron(
        &fleet.config_path(),
        &["node", "show", "gpu-1"],
        fixture_now(),
    )
    .await
    .expect("node show");
    assert!(out.contains("zone=eu-west-1a"), "{out}");
    assert!(out.contains("Latest sample (#42, 1s ago)"), "{out}");
    let yaml = novacron(
        &fleet.config_path(),
        &["node", "show", "gpu-1", "-o", "yaml"],
        fixture_now(),
    )
    .await
    .expect("node show -o yaml");
    let node: NodeView = yaml_serde::from_str(&yaml).expect("YAML NodeView");
    assert_eq!(node.name, "gpu-1");
}

#[tokio::test]
async fn unknown_node_gives_the_servers_404_message() {
    let fleet = Fleet::new();
    let (addr, _stop) = start_api(&fleet).await;
    let api = format!("https://localhost:{}", addr.port());
    fleet.add_context("test", &api, &fleet.ca.cert_pem, &fleet.admin());

    let (msg, code) = novacron(
        &fleet.config_path(),
        &["node", "show", "ghost"],
        fixture_now(),
    )
    .await
    .expect_err("unknown node");
    assert_eq!(msg, "no node named \"ghost\"");
    assert_eq!(code, EXIT_FAILURE);
}

#[tokio::test]
async fn forbidden_gives_permission_denied_with_the_servers_message() {
    let fleet = Fleet::new();
    let (addr, _stop) = start_api(&fleet).await;
    let api = format!("https://localhost:{}", addr.port());
    let mallory = fleet.client_cert("mallory", Role::Viewer, validity(Duration::from_secs(600)));
    fleet.add_context("test", &api, &fleet.ca.cert_pem, &mallory);

    let (msg, code) = novacron(&fleet.config_path(), &["node", "list"], fixture_now())
        .await
        .expect_err("forbidden");
    assert_eq!(msg, "permission denied: viewer:mallory may not list nodes");
    assert_eq!(code, EXIT_FAILURE);
}

#[tokio::test]
async fn unreachable_controller_exits_69_with_a_friendly_message() {
    let fleet = Fleet::new();
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let api = format!("https://127.0.0.1:{port}");
    fleet.add_context("test", &api, &fleet.ca.cert_pem, &fleet.admin());

    let (msg, code) = novacron(&fleet.config_path(), &["node", "list"], SystemTime::now())
        .await
        .expect_err("nothing listens");
    assert_eq!(code, EXIT_UNAVAILABLE, "{msg}");
    assert!(
        msg.starts_with(&format!("cannot reach the controller at {api}: ")),
        "{msg}"
    );
    assert!(msg.contains("refused"), "{msg}");
    assert!(msg.ends_with(". Is it running?"), "{msg}");
}

#[tokio::test]
async fn expired_client_certificate_is_explained() {
    let fleet = Fleet::new();
    let (addr, _stop) = start_api(&fleet).await;
    let api = format!("https://localhost:{}", addr.port());
    let now = SystemTime::now();
    let old = fleet.client_cert(
        "alice",
        Role::Admin,
        Validity {
            not_before: now - Duration::from_secs(7200),
            not_after: now - Duration::from_secs(3600),
        },
    );
    fleet.add_context("test", &api, &fleet.ca.cert_pem, &old);

    let (msg, code) = novacron(&fleet.config_path(), &["node", "list"], now)
        .await
        .expect_err("expired certificate");
    assert_eq!(code, EXIT_CONFIG, "{msg}");
    assert!(msg.contains("refused the client certificate"), "{msg}");
    assert!(msg.contains("it has expired on "), "{msg}");
    assert!(msg.contains("(1h ago)"), "{msg}");
    assert!(msg.contains("novacron dev"), "{msg}");
}

#[tokio::test]
async fn client_certificate_from_another_fleet_is_explained() {
    let fleet = Fleet::new();
    let (addr, _stop) = start_api(&fleet).await;
    let api = format!("https://localhost:{}", addr.port());
    let other = Fleet::new();
    fleet.add_context("test", &api, &fleet.ca.cert_pem, &other.admin());

    let (msg, code) = novacron(&fleet.config_path(), &["node", "list"], SystemTime::now())
        .await
        .expect_err("foreign certificate");
    assert_eq!(code, EXIT_CONFIG, "{msg}");
    assert!(
        msg.contains("does not trust the client certificate"),
        "{msg}"
    );
    assert!(
        msg.contains("issued by this controller's fleet CA"),
        "{msg}"
    );
}

#[tokio::test]
async fn wrong_ca_in_the_context_is_explained() {
    let fleet = Fleet::new();
    let (addr, _stop) = start_api(&fleet).await;
    let api = format!("https://localhost:{}", addr.port());
    let other = Fleet::new();
    fleet.add_context("test", &api, &other.ca.cert_pem, &fleet.admin());

    let (msg, code) = novacron(&fleet.config_path(), &["node", "list"], SystemTime::now())
        .await
        .expect_err("server not trusted");
    assert_eq!(code, EXIT_CONFIG, "{msg}");
    assert!(
        msg.contains("presented a certificate that the CA in"),
        "{msg}"
    );
    assert!(msg.contains("`ca` of context \"test\""), "{msg}");
}

#[tokio::test]
async fn missing_context_file_points_to_novacron_dev() {
    let fleet = Fleet::new();
    let path = fleet.config_path();
    let (msg, code) = novacron(&path, &["node", "list"], SystemTime::now())
        .await
        .expect_err("no context file");
    assert_eq!(
        msg,
        format!(
            "no controller context: run `novacron dev` for a local fleet, or create {} (see `novacron context --help`)",
            path.display()
        )
    );
    assert_eq!(code, EXIT_CONFIG);
}

#[tokio::test]
async fn malformed_context_file_exits_64_naming_the_key() {
    let fleet = Fleet::new();
    let path = fleet.config_path();
    std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
    std::fs::write(
        &path,
        "current = \"dev\"\n[contexts.dev]\napi = \"https://127.0.0.1:7443\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\nkye = \"typo\"\n",
    )
    .expect("write");
    let (msg, code) = novacron(&path, &["node", "list"], SystemTime::now())
        .await
        .expect_err("malformed");
    assert_eq!(code, EXIT_CONFIG);
    assert!(msg.starts_with("malformed context file"), "{msg}");
    assert!(msg.contains("kye"), "{msg}");
}

#[tokio::test]
async fn missing_key_file_is_a_configuration_error() {
    let fleet = Fleet::new();
    fleet.add_context(
        "test",
        "https://127.0.0.1:1",
        &fleet.ca.cert_pem,
        &fleet.admin(),
    );
    std::fs::remove_file(fleet.dir.path().join("test/key.pem")).expect("remove key");
    let (msg, code) = novacron(&fleet.config_path(), &["node", "list"], SystemTime::now())
        .await
        .expect_err("no key");
    assert_eq!(code, EXIT_CONFIG);
    assert!(msg.contains("cannot read the client key"), "{msg}");
    assert!(msg.contains("`key` of context \"test\""), "{msg}");
}

#[tokio::test]
async fn context_list_use_and_show() {
    let fleet = Fleet::new();
    let admin = fleet.admin();
    fleet.add_context("dev", "https://127.0.0.1:7443", &fleet.ca.cert_pem, &admin);
    fleet.add_context(
        "prod",
        "https://prod.example:7443",
        &fleet.ca.cert_pem,
        &admin,
    );
    let path = fleet.config_path();
    let now = SystemTime::now();

    let list = novacron(&path, &["context", "list"], now)
        .await
        .expect("list");
    let prod_line = list.lines().find(|l| l.contains("prod")).expect("prod row");
    assert!(prod_line.starts_with('*'), "prod is current:\n{list}");

    let switched = novacron(&path, &["context", "use", "dev"], now)
        .await
        .expect("use");
    assert_eq!(switched, "switched to context \"dev\"\n");
    assert_eq!(
        ContextFile::load(&path).expect("load").current.as_deref(),
        Some("dev")
    );

    let show = novacron(&path, &["context", "show"], now)
        .await
        .expect("show");
    assert!(show.contains("Name:"), "{show}");
    assert!(show.contains("dev"), "{show}");
    assert!(show.contains("admin:alice"), "{show}");
    assert!(
        show.contains("(in 9m)") || show.contains("(in 10m)"),
        "{show}"
    );

    let other = novacron(
        &path,
        &["--context", "prod", "-o", "json", "context", "show"],
        now,
    )
    .await
    .expect("show --context");
    let value: serde_json::Value = serde_json::from_str(&other).expect("JSON");
    assert_eq!(value["api"], "https://prod.example:7443");

    let (msg, code) = novacron(&path, &["context", "use", "nope"], now)
        .await
        .expect_err("unknown context");
    assert_eq!(code, EXIT_CONFIG);
    assert!(msg.contains("known: dev, prod"), "{msg}");
}

#[test]
fn usage_errors_exit_with_2_and_help_documents_the_exit_codes() {
    Cli::command().debug_assert();
    let err = Cli::try_parse_from(["novacron", "node", "frobnicate"]).expect_err("bad subcommand");
    assert_eq!(err.exit_code(), i32::from(EXIT_USAGE));
    let help = Cli::command().render_long_help().to_string();
    for code in ["64", "69"] {
        assert!(
            help.contains(code),
            "exit code {code} missing from --help:\n{help}"
        );
    }
    let cli = Cli::try_parse_from(["novacron", "-o", "yaml", "node", "show", "n1"]).expect("parse");
    assert_eq!(cli.output, OutputFormat::Yaml);
    assert_eq!(
        cli.command,
        Command::Node(NodeCommand::Show { name: "n1".into() })
    );
}

#[tokio::test]
async fn completion_script_is_generated() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = novacron(
        &dir.path().join("c.toml"),
        &["completion", "bash"],
        SystemTime::now(),
    )
    .await
    .expect("completion");
    assert!(out.contains("novacron"), "{out}");
}

#[tokio::test]
async fn novacron_token_replaces_the_contexts_certificate() {
    let fleet = Fleet::new();
    let (addr, _stop) = start_api(&fleet).await;
    let api = format!("https://127.0.0.1:{}", addr.port());
    fleet.add_context("test", &api, &fleet.ca.cert_pem, &fleet.admin());
    let cli = parse(&fleet.config_path(), &["node", "list"]);
    let env = BTreeMap::from([(config::TOKEN_ENV.to_string(), "nca_x.y".to_string())]);
    let mut out = Vec::new();
    // The test API authenticates only certificates: with the token set, the CLI
    // presents none, so it is refused as anonymous.
    let err = run(&cli, &env, &mut out, fixture_now())
        .await
        .expect_err("no certificate was presented");
    assert!(
        err.to_string().contains("a client certificate is required"),
        "{err}"
    );
    // Without the token the admin certificate is presented.
    novacron(&fleet.config_path(), &["node", "list"], fixture_now())
        .await
        .expect("node list with the certificate");
}

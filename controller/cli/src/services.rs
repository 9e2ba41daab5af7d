//! `novacron service list|show|lb-config`: the service catalog (the services jobs
//! declare in `spec.services` and the endpoints of their running replicas), and
//! a load-balancer configuration generated from it for operators who keep their
//! own balancer.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::time::SystemTime;

use clap::{Subcommand, ValueEnum};
use novacron_api::services::{EndpointView, ServiceView};

use super::CliError;
use super::client::ApiClient;
use super::output::{self, OutputFormat, TableRow};

/// `novacron service` subcommands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum ServiceCommand {
    /// List services: the jobs that offer each, its endpoints and how many pass
    /// their health check.
    #[command(visible_alias = "ls")]
    List,
    /// Show a service's endpoints: allocation, node, address, health and zone.
    Show {
        /// The service's name.
        name: String,
    },
    /// Print a load-balancer configuration for the catalog: one backend per TCP
    /// service with its healthy endpoints (least connections), and a frontend for
    /// each `--listen`. With `--out FILE` it is written there (replaced whole, and
    /// only when it changed, then `--reload` runs); with `--watch` it is written
    /// again each time the catalog changes.
    LbConfig {
        /// The balancer.
        #[arg(long, value_enum, default_value_t = LbFormat::Haproxy)]
        format: LbFormat,
        /// Give SERVICE a frontend that listens on ADDRESS:PORT (repeatable), e.g.
        /// web=0.0.0.0:8080.
        #[arg(long, value_name = "SERVICE=ADDRESS:PORT", value_parser = parse_listen)]
        listen: Vec<(String, String)>,
        /// Write the configuration to this file instead of standard output, and
        /// print what it holds.
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
        /// After each write of --out, run this shell command (e.g. `systemctl
        /// reload haproxy`); a failure is reported, and the next change tries again.
        #[arg(long, value_name = "COMMAND", requires = "out")]
        reload: Option<String>,
    },
}

/// A load balancer whose configuration `lb-config` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LbFormat {
    /// HAProxy (`haproxy -c -f FILE` checks it).
    Haproxy,
    /// An nginx `stream` block, to include from nginx.conf's main context with
    /// the stream module loaded (`nginx -t` checks it).
    Nginx,
}

fn parse_listen(text: &str) -> Result<(String, String), String> {
    let (service, address) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected SERVICE=ADDRESS:PORT, e.g. web=0.0.0.0:8080"))?;
    address
        .parse::<std::net::SocketAddr>()
        .map_err(|e| format!("{address:?} is not ADDRESS:PORT ({e}), e.g. 0.0.0.0:8080"))?;
    Ok((service.to_owned(), address.to_owned()))
}

/// Runs a `service` subcommand.
pub async fn run(
    cmd: &ServiceCommand,
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
    now: SystemTime,
) -> Result<(), CliError> {
    match cmd {
        ServiceCommand::List => {
            let services: Vec<ServiceView> = client.get(&["v1", "services"]).await?;
            output::write_list(out, format, &services, now)?;
        }
        ServiceCommand::Show { name } => {
            let service: ServiceView = client.get(&["v1", "services", name]).await?;
            if format.is_human() {
                output::write_list(out, format, &service.endpoints, now)?;
            } else {
                output::write_value(out, format, &service)?;
            }
        }
        ServiceCommand::LbConfig {
            format: lb,
            listen,
            out: file,
            reload,
        } => {
            // One read: every service with its endpoints, one consistent view.
            let services: Vec<ServiceView> = client.get(&["v1", "services"]).await?;
            let listen: BTreeMap<String, String> = listen.iter().cloned().collect();
            if let Some(unknown) = listen
                .keys()
                .find(|k| !services.iter().any(|s| &s.name == *k))
            {
                return Err(CliError::Usage(format!(
                    "--listen {unknown}=...: no job declares service {unknown:?}; `novacron service list` shows them"
                )));
            }
            let text = match lb {
                LbFormat::Haproxy => haproxy(&services, &listen, &client.api().to_string()),
                LbFormat::Nginx => nginx(&services, &listen, &client.api().to_string()),
            };
            let Some(file) = file else {
                return out
                    .write_all(text.as_bytes())
                    .map_err(|e| CliError::Output(e.into()));
            };
            let healthy: usize = services.iter().map(ServiceView::healthy).sum();
            if write_if_changed(file, &text)?
                && let Some(command) = reload
            {
                reload_with(command).await;
            }
            writeln!(
                out,
                "{}: {} services, {healthy} healthy endpoints",
                file.display(),
                services.len()
            )
            .map_err(|e| CliError::Output(e.into()))?;
        }
    }
    Ok(())
}

/// Replaces `file` with `text` (a temporary file renamed over it) unless it holds
/// it already; whether it wrote.
fn write_if_changed(file: &std::path::Path, text: &str) -> Result<bool, CliError> {
    if std::fs::read(file).is_ok_and(|old| old == text.as_bytes()) {
        return Ok(false);
    }
    let failed =
        |e: std::io::Error| CliError::Invalid(format!("cannot write {}: {e}", file.display()));
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(failed)?;
    tmp.write_all(text.as_bytes()).map_err(failed)?;
    tmp.persist(file).map_err(|e| failed(e.error))?;
    Ok(true)
}

/// Runs `command` with `sh -c`, reporting a failure on standard error.
async fn reload_with(command: &str) {
    let status = tokio::process::Command::new("sh")
        .args(["-c", command])
        .status()
        .await;
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!("novacron: the reload command {command:?} failed ({s})"),
        Err(e) => eprintln!("novacron: cannot run the reload command {command:?}: {e}"),
    }
}

/// An nginx `stream` block for `services`: an upstream per service with its
/// healthy TCP endpoints (least connections, their weights), and a server for
/// each service in `listen`. A service with no healthy endpoint keeps an
/// upstream whose one server is marked down (nginx needs one), so its listener
/// stays valid and refuses connections until an endpoint is back.
pub fn nginx(services: &[ServiceView], listen: &BTreeMap<String, String>, source: &str) -> String {
    let mut text = format!(
        "# Generated by `novacron service lb-config --format nginx` from the service\n\
         # catalog of {source}. Include it from nginx.conf's main context (beside\n\
         # `http`), with the stream module loaded. Unhealthy endpoints are left out;\n\
         # regenerate it when the catalog changes.\n\
         stream {{\n"
    );
    for service in services {
        let upstream = format!("svc_{}", service.name.replace('-', "_"));
        let _ = write!(text, "    upstream {upstream} {{\n        least_conn;\n");
        let mut any = false;
        for e in service
            .endpoints
            .iter()
            .filter(|e| e.healthy && e.protocol == "tcp")
        {
            any = true;
            // SocketAddr puts an IPv6 address in brackets, as nginx wants.
            let _ = writeln!(
                text,
                "        server {} weight={}; # {}",
                e.socket_addr(),
                e.weight,
                e.alloc
            );
        }
        if !any {
            let _ = writeln!(
                text,
                "        server 127.0.0.1:1 down; # no healthy endpoint"
            );
        }
        let _ = writeln!(text, "    }}");
        if let Some(address) = listen.get(&service.name) {
            let _ = write!(
                text,
                "    server {{\n        listen {address};\n        proxy_pass {upstream};\n        proxy_connect_timeout 5s;\n    }}\n"
            );
        }
    }
    text.push_str("}\n");
    text
}

/// An HAProxy configuration for `services`: a TCP backend per service with its
/// healthy TCP endpoints, and a frontend for each service in `listen`.
pub fn haproxy(
    services: &[ServiceView],
    listen: &BTreeMap<String, String>,
    source: &str,
) -> String {
    let mut text = format!(
        "# Generated by `novacron service lb-config --format haproxy` from the service\n\
         # catalog of {source}. Unhealthy endpoints are left out; regenerate it when the\n\
         # catalog changes.\n\
         global\n    maxconn 4096\n\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1m\n    timeout server 1m\n"
    );
    for service in services {
        let backend = format!("svc_{}", service.name);
        let _ = write!(text, "\nbackend {backend}\n    balance leastconn\n");
        for e in service
            .endpoints
            .iter()
            .filter(|e| e.healthy && e.protocol == "tcp")
        {
            // HAProxy reads the port after an IPv6 address's last colon.
            let _ = writeln!(
                text,
                "    server {} {}:{} weight {} check",
                e.alloc, e.address, e.port, e.weight
            );
        }
        if let Some(address) = listen.get(&service.name) {
            let _ = write!(
                text,
                "\nfrontend {backend}_in\n    bind {address}\n    default_backend {backend}\n"
            );
        }
    }
    text
}

impl TableRow for ServiceView {
    fn headers() -> &'static [&'static str] {
        &["NAME", "JOBS", "ENDPOINTS", "HEALTHY"]
    }

    fn cells(&self, _now: SystemTime) -> Vec<String> {
        vec![
            self.name.clone(),
            self.jobs.join(","),
            self.endpoints.len().to_string(),
            self.healthy().to_string(),
        ]
    }

    fn resource_name(&self) -> Option<String> {
        Some(format!("service/{}", self.name))
    }
}

impl TableRow for EndpointView {
    fn headers() -> &'static [&'static str] {
        &[
            "ALLOC", "JOB", "NODE", "ADDRESS", "HEALTHY", "WEIGHT", "ZONE", "TAGS",
        ]
    }

    fn cells(&self, _now: SystemTime) -> Vec<String> {
        vec![
            self.alloc.clone(),
            self.job.clone(),
            self.node.clone(),
            format!("{}/{}", self.socket_addr(), self.protocol),
            if self.healthy { "yes" } else { "no" }.into(),
            self.weight.to_string(),
            self.zone.clone().unwrap_or_else(|| "-".into()),
            if self.tags.is_empty() {
                "-".into()
            } else {
                self.tags.join(",")
            },
        ]
    }

    fn resource_name(&self) -> Option<String> {
        Some(format!("alloc/{}", self.alloc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(alloc: &str, address: &str, healthy: bool) -> EndpointView {
        EndpointView {
            alloc: alloc.into(),
            job: "web".into(),
            node: "n1".into(),
            address: address.parse().expect("ip"),
            port: 20001,
            protocol: "tcp".into(),
            healthy,
            tags: Vec::new(),
            zone: None,
            weight: 100,
        }
    }

    #[test]
    fn haproxy_gets_the_healthy_endpoints_and_the_asked_frontends() {
        let services = vec![
            ServiceView {
                name: "front".into(),
                jobs: vec!["web".into()],
                endpoints: vec![
                    endpoint("a1", "10.0.0.1", true),
                    endpoint("a2", "10.0.0.2", false),
                    endpoint("a3", "fd00::3", true),
                ],
            },
            ServiceView {
                name: "idle".into(),
                jobs: vec!["batch".into()],
                endpoints: Vec::new(),
            },
        ];
        let listen = BTreeMap::from([("front".to_owned(), "127.0.0.1:8080".to_owned())]);
        let text = haproxy(&services, &listen, "https://c:7443/");
        assert!(text.contains(
            "backend svc_front\n    balance leastconn\n    server a1 10.0.0.1:20001 weight 100 check\n    server a3 fd00::3:20001 weight 100 check\n"
        ), "{text}");
        assert!(!text.contains("a2"), "{text}");
        assert!(
            text.contains(
                "frontend svc_front_in\n    bind 127.0.0.1:8080\n    default_backend svc_front\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("backend svc_idle\n") && !text.contains("svc_idle_in"),
            "{text}"
        );
    }

    #[test]
    fn nginx_gets_an_upstream_per_service_and_the_asked_servers() {
        let services = vec![
            ServiceView {
                name: "front-end".into(),
                jobs: vec!["web".into()],
                endpoints: vec![
                    endpoint("a1", "10.0.0.1", true),
                    endpoint("a2", "10.0.0.2", false),
                    EndpointView {
                        weight: 10,
                        ..endpoint("a3", "fd00::3", true)
                    },
                ],
            },
            ServiceView {
                name: "idle".into(),
                jobs: vec!["batch".into()],
                endpoints: Vec::new(),
            },
        ];
        let listen = BTreeMap::from([("front-end".to_owned(), "127.0.0.1:8080".to_owned())]);
        let text = nginx(&services, &listen, "https://c:7443/");
        assert!(
            text.starts_with("# Generated by") && text.ends_with("}\n"),
            "{text}"
        );
        assert!(text.contains(
            "    upstream svc_front_end {\n        least_conn;\n        server 10.0.0.1:20001 weight=100; # a1\n        server [fd00::3]:20001 weight=10; # a3\n    }\n"
        ), "{text}");
        assert!(!text.contains("a2"), "{text}");
        assert!(
            text.contains(
                "    server {\n        listen 127.0.0.1:8080;\n        proxy_pass svc_front_end;\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "    upstream svc_idle {\n        least_conn;\n        server 127.0.0.1:1 down;"
            ),
            "{text}"
        );
    }

    #[test]
    fn listen_takes_a_service_and_a_socket_address() {
        assert_eq!(
            parse_listen("web=0.0.0.0:8080"),
            Ok(("web".into(), "0.0.0.0:8080".into()))
        );
        assert!(parse_listen("web").is_err());
        assert!(parse_listen("web=localhost").is_err());
    }
}

//! DNS for the service catalog, served by the controller (`dns_listen`) and by
//! each agent (its own `dns_listen`, the resolver of the containers it starts).
//! Both answer, on UDP and TCP, `<service>.service.<domain>` with an A or AAAA record
//! per healthy endpoint's address and an SRV record per healthy endpoint (target
//! `<alloc>.alloc.<domain>`, whose A/AAAA answer is that endpoint's address, and
//! the endpoint's weight), with
//! a short TTL ([`TTL`]). An unknown service is NXDOMAIN; a known service with no
//! healthy endpoint answers no records. Names outside the fleet domain are
//! refused, or, where the server was given upstream resolvers
//! ([`FleetDns::forwarding`]: an agent, whose containers resolve every name
//! through it), forwarded to them. The answers come from [`answer`], pure over
//! the catalog; hickory-server does the protocol and hickory-resolver the
//! forwarding.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::net::runtime::{Time, TokioRuntimeProvider};
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, SRV};
use hickory_server::proto::rr::{LowerName, RData};
/// Hickory's names and record types, for callers of [`answer`].
pub use hickory_server::proto::rr::{Name, Record, RecordType};
use hickory_server::resolver::config::NameServerConfig;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::forwarder::{ForwardConfig, ForwardZoneHandler};
use hickory_server::zone_handler::{Catalog, MessageResponseBuilder, ZoneHandler};
use novacron_api::services::{EndpointView, ServiceView};
use tracing::{info, warn};

/// The fleet domain when the configuration names none.
pub const DEFAULT_DOMAIN: &str = "novacron.";
/// Seconds a resolver may keep an answer: endpoints come and go within seconds.
pub const TTL: u32 = 5;
/// How long a TCP client may take to send its query.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest TCP response.
const TCP_RESPONSE_BUFFER: usize = 64 * 1024;
/// The most records one answer carries (the rest are left out).
pub const MAX_RECORDS: usize = 64;

/// What a query gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Records (possibly none: the name exists without records of that type).
    Records(Vec<Record>),
    /// No such name in the fleet domain.
    NoName,
    /// Not in the fleet domain: this server does not recurse.
    NotOurs,
}

/// The answer to `name`/`kind` from `services`, for the fleet `domain`.
pub fn answer(domain: &Name, name: &Name, kind: RecordType, services: &[ServiceView]) -> Answer {
    if !domain.zone_of(name) {
        return Answer::NotOurs;
    }
    let labels: Vec<String> = name
        .iter()
        .take(name.num_labels() as usize - domain.num_labels() as usize)
        .map(|l| String::from_utf8_lossy(l).to_ascii_lowercase())
        .collect();
    let address = |e: &EndpointView, owner: &Name| -> Option<Record> {
        match (e.address, kind) {
            (IpAddr::V4(ip), RecordType::A) => {
                Some(Record::from_rdata(owner.clone(), TTL, RData::A(A(ip))))
            }
            (IpAddr::V6(ip), RecordType::AAAA) => Some(Record::from_rdata(
                owner.clone(),
                TTL,
                RData::AAAA(AAAA(ip)),
            )),
            _ => None,
        }
    };
    match labels.as_slice() {
        [service, kind_label] if kind_label == "service" => {
            let Some(s) = services.iter().find(|s| &s.name == service) else {
                return Answer::NoName;
            };
            let healthy = s.endpoints.iter().filter(|e| e.healthy);
            let records = match kind {
                RecordType::SRV => healthy
                    .filter_map(|e| {
                        let target = alloc_name(&e.alloc, domain)?;
                        Some(Record::from_rdata(
                            name.clone(),
                            TTL,
                            RData::SRV(SRV::new(1, e.weight, e.port, target)),
                        ))
                    })
                    .take(MAX_RECORDS)
                    .collect(),
                _ => {
                    // One record per address (an RRset has no duplicates): replicas
                    // on one node differ only by port, which SRV gives.
                    let mut seen = std::collections::BTreeSet::new();
                    healthy
                        .filter(|e| seen.insert(e.address))
                        .filter_map(|e| address(e, name))
                        .take(MAX_RECORDS)
                        .collect()
                }
            };
            Answer::Records(records)
        }
        [alloc, kind_label] if kind_label == "alloc" => {
            let endpoint = services
                .iter()
                .flat_map(|s| &s.endpoints)
                .find(|e| e.alloc.eq_ignore_ascii_case(alloc));
            match endpoint {
                Some(e) => Answer::Records(address(e, name).into_iter().collect()),
                None => Answer::NoName,
            }
        }
        [] => Answer::Records(Vec::new()),
        _ => Answer::NoName,
    }
}

fn alloc_name(alloc: &str, domain: &Name) -> Option<Name> {
    Name::from_ascii(format!("{alloc}.alloc"))
        .ok()?
        .append_domain(domain)
        .ok()
}

/// What a server answers for: the fleet domain and the catalog's services.
#[derive(Debug, Clone)]
pub struct Zone {
    /// The fleet domain (`novacron.`).
    pub domain: Name,
    /// The catalog.
    pub services: Vec<ServiceView>,
}

/// Where names outside the fleet domain go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// Nowhere: they are refused.
    Refuse,
    /// The resolvers of this host's `/etc/resolv.conf`.
    System,
    /// These resolvers (UDP, then TCP for a truncated answer).
    Servers(Vec<std::net::SocketAddr>),
}

/// Answers queries from the zone that `zone` returns at each query.
pub struct FleetDns {
    zone: Arc<dyn Fn() -> Arc<Zone> + Send + Sync>,
    upstream: Option<Catalog>,
}

impl std::fmt::Debug for FleetDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetDns")
            .field("domain", &(self.zone)().domain)
            .field("forwards", &self.upstream.is_some())
            .finish()
    }
}

impl FleetDns {
    /// A server over what `zone` returns at each query, refusing other names.
    pub fn new(zone: Arc<dyn Fn() -> Arc<Zone> + Send + Sync>) -> Self {
        FleetDns {
            zone,
            upstream: None,
        }
    }

    /// The same, forwarding names outside the fleet domain to `upstream` (through
    /// hickory-resolver, which caches them). Fails on a system configuration it
    /// cannot read.
    pub fn forwarding(mut self, upstream: &Upstream) -> Result<Self, String> {
        let builder = match upstream {
            Upstream::Refuse => return Ok(self),
            Upstream::System => ForwardZoneHandler::builder(TokioRuntimeProvider::default())?,
            Upstream::Servers(addrs) => {
                let name_servers = addrs
                    .iter()
                    .map(|addr| {
                        let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                        for c in &mut server.connections {
                            c.port = addr.port();
                        }
                        server
                    })
                    .collect();
                ForwardZoneHandler::builder_tokio(ForwardConfig {
                    name_servers,
                    options: None,
                })
            }
        };
        let handler: Arc<dyn ZoneHandler> = Arc::new(builder.build()?);
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::from(Name::root()), vec![handler]);
        self.upstream = Some(catalog);
        Ok(self)
    }
}

#[async_trait::async_trait]
impl RequestHandler for FleetDns {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let zone = (self.zone)();
        if let (Some(upstream), Ok(info)) = (&self.upstream, request.request_info())
            && !zone.domain.zone_of(&Name::from(info.query.name()))
        {
            return upstream
                .handle_request::<R, T>(request, response_handle)
                .await;
        }
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let (code, records) = match request.request_info() {
            Err(_) => (ResponseCode::FormErr, Vec::new()),
            Ok(info) => {
                let name = Name::from(info.query.name());
                match answer(&zone.domain, &name, info.query.query_type(), &zone.services) {
                    Answer::Records(records) => (ResponseCode::NoError, records),
                    Answer::NoName => (ResponseCode::NXDomain, Vec::new()),
                    Answer::NotOurs => {
                        metadata.authoritative = false;
                        (ResponseCode::Refused, Vec::new())
                    }
                }
            }
        };
        metadata.response_code = code;
        let response = builder.build(metadata, records.iter(), [], [], []);
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => {
                warn!(%error, "cannot send a DNS answer");
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

/// Serves `dns` on UDP and TCP at `addr` until the process ends.
pub async fn serve(addr: std::net::SocketAddr, dns: FleetDns) -> std::io::Result<()> {
    let udp = tokio::net::UdpSocket::bind(addr).await?;
    let tcp = tokio::net::TcpListener::bind(addr).await?;
    info!(
        %addr,
        domain = %(dns.zone)().domain,
        forwards = dns.upstream.is_some(),
        "serving the service catalog over DNS"
    );
    let mut server = hickory_server::Server::new(dns);
    server.register_socket(udp);
    server.register_listener(tcp, TCP_TIMEOUT, TCP_RESPONSE_BUFFER);
    tokio::spawn(async move {
        if let Err(error) = server.block_until_done().await {
            warn!(%error, "the DNS server stopped");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(alloc: &str, ip: &str, healthy: bool) -> EndpointView {
        EndpointView {
            alloc: alloc.into(),
            job: "web".into(),
            node: "n1".into(),
            address: ip.parse().expect("ip"),
            port: 20001,
            protocol: "tcp".into(),
            healthy,
            tags: Vec::new(),
            zone: None,
            weight: 100,
        }
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).expect("name")
    }

    #[test]
    fn a_service_answers_its_healthy_endpoints() {
        let domain = name(DEFAULT_DOMAIN);
        let services = vec![ServiceView {
            name: "web".into(),
            jobs: vec!["web".into()],
            endpoints: vec![
                endpoint("a1", "10.0.0.1", true),
                endpoint("a2", "10.0.0.2", false),
                endpoint("a3", "fd00::3", true),
                EndpointView {
                    weight: 10,
                    ..endpoint("a4", "10.0.0.1", true)
                },
            ],
        }];
        let q = |n: &str, k| answer(&domain, &name(n), k, &services);
        let Answer::Records(a) = q("web.service.novacron.", RecordType::A) else {
            panic!("records")
        };
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].data, RData::A(A("10.0.0.1".parse().expect("ip"))));
        assert_eq!(a[0].ttl, TTL);
        let Answer::Records(aaaa) = q("WEB.Service.novacron.", RecordType::AAAA) else {
            panic!("records")
        };
        assert_eq!(aaaa.len(), 1);
        let Answer::Records(srv) = q("web.service.novacron.", RecordType::SRV) else {
            panic!("records")
        };
        assert_eq!(
            srv.iter().map(|r| r.data.clone()).collect::<Vec<_>>(),
            vec![
                RData::SRV(SRV::new(1, 100, 20001, name("a1.alloc.novacron."))),
                RData::SRV(SRV::new(1, 100, 20001, name("a3.alloc.novacron."))),
                RData::SRV(SRV::new(1, 10, 20001, name("a4.alloc.novacron."))),
            ]
        );
        let Answer::Records(target) = q("a3.alloc.novacron.", RecordType::AAAA) else {
            panic!("records")
        };
        assert_eq!(target.len(), 1);
        assert_eq!(q("db.service.novacron.", RecordType::A), Answer::NoName);
        assert_eq!(q("x.web.service.novacron.", RecordType::A), Answer::NoName);
        assert_eq!(q("example.com.", RecordType::A), Answer::NotOurs);
    }
}

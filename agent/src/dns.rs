//! The agent's DNS (`dns_listen`, off by default): it answers
//! `<service>.service.<domain>` (A, AAAA, SRV) from the table the controller
//! sends (the same message as the ingress's: every service's healthy endpoints
//! and the fleet domain) and forwards other names to `dns_upstream`. On port 53
//! of an address containers reach (Docker's bridge, `172.17.0.1:53`), the
//! containers this agent starts resolve through it (`--dns`), so a workload
//! finds its peers by name wherever they run, and still resolves every other
//! name. It answers from what it last heard, so a node cut off from the
//! controller keeps answering (the controller's own DNS has the same source).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use novacron_api::services::{EndpointView, ServiceView};
use novacron_common::wire::{IngressEndpoint, IngressTable};
use novacron_dns::{FleetDns, Name, Upstream, Zone};
use tokio::sync::watch;
use tracing::warn;

/// The agent's DNS server: the zone it answers from.
#[derive(Debug)]
pub struct AgentDns {
    zone: watch::Sender<Arc<Zone>>,
}

impl AgentDns {
    /// Answers on UDP and TCP at `addr`, forwarding names outside the fleet
    /// domain to `upstream`. Before the first table it knows the default domain
    /// and no service.
    pub async fn start(addr: SocketAddr, upstream: &Upstream) -> Result<Arc<AgentDns>, String> {
        let empty = Zone {
            domain: Name::from_ascii(novacron_dns::DEFAULT_DOMAIN).map_err(|e| e.to_string())?,
            services: Vec::new(),
        };
        let (tx, rx) = watch::channel(Arc::new(empty));
        let server = FleetDns::new(Arc::new(move || rx.borrow().clone()))
            .forwarding(upstream)
            .map_err(|e| format!("dns_upstream: {e}"))?;
        novacron_dns::serve(addr, server)
            .await
            .map_err(|e| format!("dns_listen {addr}: cannot listen there on udp and tcp: {e}"))?;
        Ok(Arc::new(AgentDns { zone: tx }))
    }

    /// Answers from `table` from now on.
    pub fn apply(&self, table: &IngressTable) {
        match zone_of(table) {
            Some(zone) => {
                self.zone.send_replace(Arc::new(zone));
            }
            None => warn!(
                domain = table.dns_domain,
                "the controller's DNS domain is not a domain name; keeping the last one"
            ),
        }
    }
}

/// The IP containers are given as their resolver when the DNS listens at
/// `addr`: Docker's `--dns` takes an address and no port, so only on port 53 of
/// a specific address.
pub fn container_resolver(addr: SocketAddr) -> Option<IpAddr> {
    (addr.port() == 53 && !addr.ip().is_unspecified()).then_some(addr.ip())
}

/// The zone `table` describes: its domain (the default where the controller
/// named none) and its services, ingress and others, each endpoint healthy (the
/// table lists only those). `None` when the domain is not a name.
pub fn zone_of(table: &IngressTable) -> Option<Zone> {
    let domain = match table.dns_domain.as_str() {
        "" => novacron_dns::DEFAULT_DOMAIN,
        d => d,
    };
    let mut domain = Name::from_ascii(domain).ok()?;
    domain.set_fqdn(true);
    let view = |name: &str, endpoints: &[IngressEndpoint]| ServiceView {
        name: name.to_owned(),
        jobs: Vec::new(),
        endpoints: endpoints
            .iter()
            .map(|e| EndpointView {
                alloc: e.alloc.clone(),
                job: String::new(),
                node: String::new(),
                address: e.address.ip(),
                port: e.address.port(),
                protocol: String::new(),
                healthy: true,
                tags: Vec::new(),
                zone: None,
                weight: e.weight,
            })
            .collect(),
    };
    let services = table
        .services
        .iter()
        .map(|s| view(&s.name, &s.endpoints))
        .chain(table.others.iter().map(|s| view(&s.name, &s.endpoints)))
        .collect();
    Some(Zone { domain, services })
}

#[cfg(test)]
mod tests {
    use super::*;
    use novacron_common::wire::{CatalogService, IngressProtocol, IngressService};
    use novacron_dns::{Answer, answer};

    fn ep(alloc: &str, addr: &str) -> IngressEndpoint {
        IngressEndpoint {
            alloc: alloc.into(),
            address: addr.parse().expect("addr"),
            weight: 100,
        }
    }

    #[test]
    fn the_zone_names_ingress_and_other_services_in_the_controller_s_domain() {
        let table = IngressTable {
            revision: 3,
            services: vec![IngressService {
                name: "web".into(),
                port: 8080,
                protocol: IngressProtocol::Http,
                tls: None,
                endpoints: vec![ep("a1", "10.0.0.1:20001")],
            }],
            others: vec![CatalogService {
                name: "db".into(),
                endpoints: vec![ep("b2", "10.0.0.2:20002"), ep("c3", "10.0.0.3:20003")],
            }],
            dns_domain: "fleet.example".into(),
        };
        let zone = zone_of(&table).expect("zone");
        assert_eq!(zone.domain.to_string(), "fleet.example.");
        let q = |n: &str, t| {
            answer(
                &zone.domain,
                &Name::from_ascii(n).expect("name"),
                t,
                &zone.services,
            )
        };
        use novacron_dns::RecordType;
        let Answer::Records(web) = q("web.service.fleet.example.", RecordType::A) else {
            panic!("web")
        };
        assert_eq!(web.len(), 1);
        let Answer::Records(db) = q("db.service.fleet.example.", RecordType::SRV) else {
            panic!("db")
        };
        assert_eq!(db.len(), 2);
        assert_eq!(q("db.service.novacron.", RecordType::A), Answer::NotOurs);
        assert_eq!(
            zone_of(&IngressTable::default())
                .expect("default")
                .domain
                .to_string(),
            "novacron."
        );
    }

    #[test]
    fn containers_get_the_resolver_only_on_port_53_of_an_address() {
        assert_eq!(
            container_resolver("172.17.0.1:53".parse().expect("a")),
            Some("172.17.0.1".parse().expect("ip"))
        );
        assert_eq!(
            container_resolver("127.0.0.1:8600".parse().expect("a")),
            None
        );
        assert_eq!(container_resolver("0.0.0.0:53".parse().expect("a")), None);
    }
}

//! The ingress table: which services the agents' ingress listeners publish
//! (`spec.services[].ingress`) and their healthy endpoints fleet-wide. [`table`]
//! is pure: it takes the jobs' services and the catalog and returns the table.
//! [`publish`] rebuilds it from the catalog every [`PUBLISH_INTERVAL`] and hands a
//! changed table to the link, which sends it to every agent that speaks
//! [`novacron_common::wire::INGRESS_SINCE`] (level-triggered, like desired sets:
//! a reconnecting agent gets the current table first).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use novacron_api::services::ServiceView;
use novacron_common::manifest::ServiceSpec;
use novacron_common::wire::{
    CatalogService, IngressEndpoint, IngressService, IngressTable, IngressTls,
    MAX_CATALOG_SERVICES, MAX_INGRESS_ENDPOINTS, MAX_INGRESS_SERVICES, MAX_TABLE_ENDPOINTS,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How often the table is rebuilt from the catalog. A change reaches the agents
/// within this plus one link round trip.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(200);

/// The table for the agents (revision 0): the services the `jobs` publish
/// through the ingress, with the healthy TCP endpoints the catalog (`services`)
/// lists for them, and every other service of the catalog with its healthy
/// endpoints (for the agents' DNS in `dns_domain`), each by name. Where jobs that
/// share a service declare different ingresses, the first job by name decides
/// (apply refuses a second service on a port another service publishes). Bounded
/// by [`MAX_INGRESS_SERVICES`], [`MAX_CATALOG_SERVICES`], [`MAX_INGRESS_ENDPOINTS`]
/// and [`MAX_TABLE_ENDPOINTS`]; what is left out is logged.
pub fn table(
    jobs: &[(String, Vec<ServiceSpec>)],
    services: &[ServiceView],
    dns_domain: &str,
) -> IngressTable {
    let mut specs: BTreeMap<&str, (&str, &ServiceSpec)> = BTreeMap::new();
    for (job, list) in jobs {
        for spec in list.iter().filter(|s| s.ingress.is_some()) {
            let entry = specs.entry(&spec.name).or_insert((job, spec));
            if job.as_str() < entry.0 {
                *entry = (job, spec);
            }
        }
    }
    let mut budget = MAX_TABLE_ENDPOINTS;
    let mut healthy = |name: &str, tcp_only: bool| -> Vec<IngressEndpoint> {
        let mut endpoints: Vec<IngressEndpoint> = services
            .iter()
            .filter(|s| s.name == name)
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.healthy && (!tcp_only || e.protocol == "tcp"))
            .map(|e| IngressEndpoint {
                alloc: e.alloc.clone(),
                address: e.socket_addr(),
                weight: e.weight,
            })
            .collect();
        endpoints.sort_by(|a, b| a.alloc.cmp(&b.alloc));
        let keep = MAX_INGRESS_ENDPOINTS.min(budget);
        if endpoints.len() > keep {
            warn!(
                service = name,
                endpoints = endpoints.len(),
                "more endpoints than the table carries; the agents get the first {keep}"
            );
            endpoints.truncate(keep);
        }
        budget -= endpoints.len();
        endpoints
    };
    let mut out = IngressTable {
        dns_domain: dns_domain.to_owned(),
        ..IngressTable::default()
    };
    for (name, (_, spec)) in &specs {
        let Some(ingress) = &spec.ingress else {
            continue;
        };
        if out.services.len() == MAX_INGRESS_SERVICES {
            warn!(
                service = name,
                "more than {MAX_INGRESS_SERVICES} ingress services; leaving the rest out"
            );
            break;
        }
        out.services.push(IngressService {
            name: (*name).to_owned(),
            port: ingress.port,
            protocol: ingress.protocol,
            tls: ingress.tls.as_ref().map(|t| IngressTls {
                cert_file: t.cert_file.clone(),
                key_file: t.key_file.clone(),
            }),
            endpoints: healthy(name, true),
        });
    }
    let mut names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    for name in names.into_iter().filter(|n| !specs.contains_key(n)) {
        if out.others.len() == MAX_CATALOG_SERVICES {
            warn!(
                service = name,
                "more than {MAX_CATALOG_SERVICES} services; the agents' DNS leaves the rest out"
            );
            break;
        }
        out.others.push(CatalogService {
            name: name.to_owned(),
            endpoints: healthy(name, false),
        });
    }
    out
}

/// A job's name, services and static TCP host ports: what [`conflict`] and
/// [`host_port_conflict`] compare a new version against.
pub type JobPorts = (String, Vec<ServiceSpec>, Vec<u16>);

/// The static TCP host ports among `ports`.
pub fn static_tcp_ports(ports: &[novacron_common::manifest::Port]) -> Vec<u16> {
    ports
        .iter()
        .filter(|p| p.protocol == novacron_common::manifest::Protocol::Tcp)
        .filter_map(|p| p.host_port)
        .collect()
}

/// Why `job`'s static TCP host ports (`host_ports`) cannot live beside the
/// ingress ports, if they cannot: the ingress listens on its ports on every node,
/// so a container that asks for one of them as a host port could never bind it
/// (and an ingress port that a job already publishes could not be opened). `all`
/// is every job's services and static TCP host ports (this job's own current
/// version is replaced by `services` and `host_ports`); `None` when they fit.
pub fn host_port_conflict(
    job: &str,
    services: &[ServiceSpec],
    host_ports: &[u16],
    all: &[JobPorts],
) -> Option<String> {
    let current = all
        .iter()
        .filter(|(j, _, _)| j != job)
        .map(|(j, s, p)| (j.as_str(), s.as_slice(), p.as_slice()))
        .chain([(job, services, host_ports)]);
    for (other, theirs, _) in current.clone() {
        for their in theirs {
            let Some(ingress) = &their.ingress else {
                continue;
            };
            if host_ports.contains(&ingress.port) {
                return Some(format!(
                    "spec.task.ports: host port {} is the ingress port of service {:?} of job \
                     {other:?}, which every node's ingress listens on; choose another host port",
                    ingress.port, their.name
                ));
            }
        }
    }
    for (i, spec) in services.iter().enumerate() {
        let Some(ingress) = &spec.ingress else {
            continue;
        };
        for (other, _, ports) in current.clone() {
            if other != job && ports.contains(&ingress.port) {
                return Some(format!(
                    "spec.services[{i}].ingress.port: {} is a host port of job {other:?}, so \
                     the ingress could not listen on it on that job's nodes; choose another port",
                    ingress.port
                ));
            }
        }
    }
    None
}

/// Why `job`'s `services` cannot be published alongside the `others` (every
/// other job's current services), if they cannot: a service whose ingress port
/// another job's service of another name publishes, or a shared service whose
/// ingress differs from the other job's. `None` when they fit.
pub fn conflict(job: &str, services: &[ServiceSpec], others: &[JobPorts]) -> Option<String> {
    for (i, spec) in services.iter().enumerate() {
        for (other, theirs, _) in others.iter().filter(|(o, _, _)| o != job) {
            for their in theirs {
                if their.name == spec.name {
                    if their.ingress != spec.ingress {
                        return Some(format!(
                            "spec.services[{i}].ingress: service {:?} is also offered by job {other:?} \
                             with another ingress; jobs that share a service must publish it the same way",
                            spec.name
                        ));
                    }
                    continue;
                }
                if let (Some(mine), Some(th)) = (&spec.ingress, &their.ingress)
                    && mine.port == th.port
                {
                    return Some(format!(
                        "spec.services[{i}].ingress.port: {} is already the ingress port of service {:?} \
                         of job {other:?}; choose another port",
                        mine.port, their.name
                    ));
                }
            }
        }
    }
    None
}

/// Rebuilds the table with `read` every [`PUBLISH_INTERVAL`] until `cancel`, and
/// sends it on `tx` (with the next revision) when it differs from the last one.
pub async fn publish<F>(read: F, tx: watch::Sender<Arc<IngressTable>>, cancel: CancellationToken)
where
    F: Fn() -> IngressTable + Send + Sync + 'static,
{
    let read = Arc::new(read);
    let mut ticker = tokio::time::interval(PUBLISH_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        // Reading the catalog walks every allocation: off the async workers.
        let reader = read.clone();
        let Ok(mut next) = tokio::task::spawn_blocking(move || reader()).await else {
            warn!("building the ingress table panicked; keeping the last one");
            continue;
        };
        tx.send_if_modified(|current| {
            next.revision = current.revision;
            if **current == next {
                return false;
            }
            next.revision += 1;
            debug!(
                revision = next.revision,
                services = next.services.len(),
                others = next.others.len(),
                "ingress table changed"
            );
            *current = Arc::new(std::mem::take(&mut next));
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use novacron_api::services::EndpointView;
    use novacron_common::manifest::IngressSpec;
    use novacron_common::wire::IngressProtocol;

    fn spec(name: &str, ingress: Option<u16>) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            port: "http".into(),
            tags: vec![],
            weight: None,
            ingress: ingress.map(|port| IngressSpec {
                port,
                protocol: IngressProtocol::Http,
                tls: None,
            }),
        }
    }

    fn endpoint(alloc: &str, port: u16, healthy: bool, protocol: &str) -> EndpointView {
        EndpointView {
            alloc: alloc.into(),
            job: "web".into(),
            node: "n1".into(),
            address: "10.0.0.7".parse().expect("ip"),
            port,
            protocol: protocol.into(),
            healthy,
            tags: vec![],
            zone: None,
            weight: 100,
        }
    }

    #[test]
    fn ingress_services_with_their_healthy_tcp_endpoints_and_the_rest_for_dns() {
        let jobs = vec![(
            "web".to_string(),
            vec![spec("web", Some(8080)), spec("plain", None)],
        )];
        let services = vec![
            ServiceView {
                name: "plain".into(),
                jobs: vec!["web".into()],
                endpoints: vec![endpoint("a1", 20001, true, "tcp")],
            },
            ServiceView {
                name: "web".into(),
                jobs: vec!["web".into()],
                endpoints: vec![
                    endpoint("b2", 20002, true, "tcp"),
                    endpoint("a1", 20001, true, "tcp"),
                    endpoint("c3", 20003, false, "tcp"),
                    endpoint("d4", 20004, true, "udp"),
                ],
            },
        ];
        let t = table(&jobs, &services, "novacron.");
        assert_eq!(t.dns_domain, "novacron.");
        assert_eq!(t.services.len(), 1);
        assert_eq!(t.services[0].name, "web");
        assert_eq!(t.services[0].port, 8080);
        let addrs: Vec<String> = t.services[0]
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(addrs, ["10.0.0.7:20001", "10.0.0.7:20002"]);
        assert_eq!(
            t.others.len(),
            1,
            "plain is not published but is named in DNS"
        );
        assert_eq!(t.others[0].name, "plain");
        assert_eq!(t.others[0].endpoints.len(), 1);
    }

    #[test]
    fn a_service_without_endpoints_is_still_published_and_the_first_job_decides() {
        let jobs = vec![
            ("zeta".to_string(), vec![spec("web", Some(9090))]),
            ("alpha".to_string(), vec![spec("web", Some(8080))]),
        ];
        let t = table(&jobs, &[], "novacron.").services;
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].port, 8080, "job alpha sorts first");
        assert!(t[0].endpoints.is_empty());
    }

    #[test]
    fn the_table_carries_at_most_its_endpoint_budget() {
        let services: Vec<ServiceView> = (0..40)
            .map(|i| ServiceView {
                name: format!("s{i:02}"),
                jobs: vec!["web".into()],
                endpoints: (0..300)
                    .map(|j| endpoint(&format!("a{j:03}"), 20000 + j, true, "udp"))
                    .collect(),
            })
            .collect();
        let t = table(&[], &services, "novacron.");
        let total: usize = t.others.iter().map(|s| s.endpoints.len()).sum();
        assert_eq!(total, MAX_TABLE_ENDPOINTS);
        assert!(
            t.others
                .iter()
                .all(|s| s.endpoints.len() <= MAX_INGRESS_ENDPOINTS)
        );
        assert_eq!(
            t.others.len(),
            40,
            "every service is named, some with no endpoint"
        );
        let frame = novacron_common::wire::encode_frame(
            &novacron_common::wire::ControllerMessage::Ingress(t),
        )
        .expect("a full table fits in one frame");
        assert!(
            frame.len() < novacron_common::wire::MAX_FRAME_LEN,
            "{}",
            frame.len()
        );
    }

    #[test]
    fn another_job_s_ingress_port_or_a_different_ingress_for_a_shared_service_conflicts() {
        let others = vec![("api".to_string(), vec![spec("api", Some(8080))], vec![])];
        let e = conflict("web", &[spec("web", Some(8080))], &others).expect("port taken");
        assert!(
            e.contains("8080 is already the ingress port of service \"api\" of job \"api\""),
            "{e}"
        );
        let e = conflict("web", &[spec("api", Some(9090))], &others).expect("different ingress");
        assert!(e.contains("also offered by job \"api\""), "{e}");
        assert_eq!(
            conflict("web", &[spec("api", Some(8080))], &others),
            None,
            "shared the same way"
        );
        assert_eq!(conflict("web", &[spec("web", Some(8081))], &others), None);
        assert_eq!(
            conflict("api", &[spec("api", Some(9090))], &others),
            None,
            "its own older version"
        );
    }

    #[test]
    fn a_static_host_port_may_not_be_an_ingress_port() {
        let all = vec![
            ("api".to_string(), vec![spec("api", Some(8080))], vec![]),
            ("db".to_string(), vec![spec("db", None)], vec![5432]),
        ];
        let e = host_port_conflict("web", &[spec("web", None)], &[8080], &all).expect("taken");
        assert!(
            e.contains("host port 8080 is the ingress port of service \"api\""),
            "{e}"
        );
        let e = host_port_conflict("web", &[spec("web", Some(5432))], &[], &all).expect("db's");
        assert!(e.contains("5432 is a host port of job \"db\""), "{e}");
        let e =
            host_port_conflict("web", &[spec("web", Some(9000))], &[9000], &all).expect("its own");
        assert!(e.contains("ingress port of service \"web\""), "{e}");
        assert_eq!(
            host_port_conflict("web", &[spec("web", Some(9000))], &[9001], &all),
            None
        );
        assert_eq!(
            host_port_conflict("db", &[spec("db", Some(6000))], &[5432], &all),
            None,
            "its own older version's host port"
        );
    }

    #[tokio::test]
    async fn publish_sends_only_changes_with_a_new_revision() {
        let (tx, mut rx) = watch::channel(Arc::new(IngressTable::default()));
        let source = Arc::new(std::sync::Mutex::new(IngressTable::default()));
        let read = {
            let source = source.clone();
            move || source.lock().expect("lock").clone()
        };
        let cancel = CancellationToken::new();
        let task = tokio::spawn(publish(read, tx, cancel.clone()));
        tokio::time::sleep(PUBLISH_INTERVAL * 2).await;
        assert!(
            !rx.has_changed().expect("open"),
            "an unchanged table is not sent"
        );
        *source.lock().expect("lock") = table(
            &[("web".into(), vec![spec("web", Some(8080))])],
            &[],
            "novacron.",
        );
        rx.changed().await.expect("changed");
        let first = rx.borrow_and_update().clone();
        assert_eq!(first.revision, 1);
        assert_eq!(first.services.len(), 1);
        tokio::time::sleep(PUBLISH_INTERVAL * 2).await;
        assert!(!rx.has_changed().expect("open"), "sent once per change");
        cancel.cancel();
        task.await.expect("stops");
    }
}

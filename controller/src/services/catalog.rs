//! The service catalog: which running replicas offer each service a job declares
//! (`spec.services`), and where clients reach them. [`catalog`] is pure: it
//! takes the jobs' services, the allocations and the nodes' addresses and
//! returns every service with its endpoints; the API (`GET /v1/services`) builds
//! it from the workload service's and the registry's state on each read, so it
//! changes as soon as an allocation starts, stops, moves or flips its health.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use novacron_api::services::{EndpointView, ServiceView};
use novacron_common::manifest::ServiceSpec;
use novacron_common::wire::AllocState;

use crate::state::store::AllocRecord;

/// What the catalog knows of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAddress {
    /// The address its agent connects from (reaches ports published on every
    /// address of the node).
    pub ip: Option<IpAddr>,
    /// Its `zone` label.
    pub zone: Option<String>,
    /// Its agent is connected (`ready`): the endpoints of a node that is not
    /// count as unhealthy at once, before its allocations are declared lost.
    pub connected: bool,
}

/// Every service the `jobs` declare (job name, its current services), with the
/// endpoints of their running replicas, ordered by service name. An endpoint is
/// a replica that should run, runs, and has its service's port published; its
/// address is the published one, or its node's where the port is published on
/// every address (a node without a known address then lists no endpoint). It is
/// healthy when its readiness passes, its node is connected and it is not being
/// migrated (`moving`: frozen for its checkpoint, then restored elsewhere).
pub fn catalog(
    jobs: &[(String, Vec<ServiceSpec>)],
    allocs: &[AllocRecord],
    nodes: &BTreeMap<String, NodeAddress>,
    moving: &BTreeSet<String>,
) -> Vec<ServiceView> {
    let mut services: BTreeMap<&str, (BTreeSet<&str>, Vec<EndpointView>)> = BTreeMap::new();
    for (job, specs) in jobs {
        for spec in specs {
            let entry = services.entry(&spec.name).or_default();
            entry.0.insert(job);
            let running = allocs
                .iter()
                .filter(|a| &a.job == job && a.desired_run && a.state == AllocState::Running);
            for alloc in running {
                if let Some(mut endpoint) = endpoint(alloc, spec, nodes) {
                    endpoint.healthy &= !moving.contains(&alloc.id);
                    entry.1.push(endpoint);
                }
            }
        }
    }
    services
        .into_iter()
        .map(|(name, (jobs, mut endpoints))| {
            endpoints.sort_by(|a, b| a.alloc.cmp(&b.alloc));
            ServiceView {
                name: name.to_owned(),
                jobs: jobs.into_iter().map(str::to_owned).collect(),
                endpoints,
            }
        })
        .collect()
}

/// Where `alloc` offers `spec`, if it publishes the service's port.
fn endpoint(
    alloc: &AllocRecord,
    spec: &ServiceSpec,
    nodes: &BTreeMap<String, NodeAddress>,
) -> Option<EndpointView> {
    let port = alloc.ports.iter().find(|p| p.name == spec.port)?;
    let published = alloc
        .published
        .iter()
        .find(|p| p.container_port == port.container_port && p.protocol == port.protocol)?;
    let node = nodes.get(&alloc.node);
    let address = if published.host_ip.is_unspecified() {
        node.and_then(|n| n.ip)?
    } else {
        published.host_ip
    };
    Some(EndpointView {
        alloc: alloc.id.clone(),
        job: alloc.job.clone(),
        node: alloc.node.clone(),
        address,
        port: published.host_port,
        protocol: published.protocol.clone(),
        healthy: alloc.healthy != Some(false) && node.is_some_and(|n| n.connected),
        tags: spec.tags.clone(),
        zone: node.and_then(|n| n.zone.clone()),
        weight: spec.weight(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::store::{AllocPort, PublishedAddress};

    fn alloc(id: &str, job: &str, node: &str, host_ip: &str, healthy: Option<bool>) -> AllocRecord {
        AllocRecord {
            job: job.into(),
            healthy,
            ports: vec![AllocPort {
                name: "http".into(),
                container_port: 80,
                host_port: 20001,
                protocol: "tcp".into(),
            }],
            published: vec![PublishedAddress {
                host_ip: host_ip.parse().expect("ip"),
                host_port: 20001,
                container_port: 80,
                protocol: "tcp".into(),
            }],
            ..crate::services::workloads::test_alloc(id, node, AllocState::Running)
        }
    }

    fn web() -> Vec<(String, Vec<ServiceSpec>)> {
        vec![(
            "web".into(),
            vec![ServiceSpec {
                name: "front".into(),
                port: "http".into(),
                tags: vec!["v1".into()],
                ingress: None,
                weight: Some(10),
            }],
        )]
    }

    #[test]
    fn running_replicas_are_endpoints_at_their_published_or_node_address() {
        let nodes = BTreeMap::from([
            (
                "n1".to_owned(),
                NodeAddress {
                    ip: Some("10.0.0.1".parse().expect("ip")),
                    zone: Some("a".into()),
                    connected: true,
                },
            ),
            (
                "n2".to_owned(),
                NodeAddress {
                    connected: true,
                    ..NodeAddress::default()
                },
            ),
        ]);
        let mut stopped = alloc("a4", "web", "n1", "0.0.0.0", None);
        stopped.desired_run = false;
        let mut pending = alloc("a5", "web", "n1", "0.0.0.0", None);
        pending.state = AllocState::Pending;
        let allocs = vec![
            alloc("a2", "web", "n1", "0.0.0.0", Some(false)),
            alloc("a1", "web", "n2", "127.0.0.2", None),
            // Published on every address of a node whose address is unknown.
            alloc("a3", "web", "n2", "::", Some(true)),
            stopped,
            pending,
            alloc("b1", "other", "n1", "0.0.0.0", None),
        ];
        let services = catalog(&web(), &allocs, &nodes, &BTreeSet::new());
        assert_eq!(services.len(), 1);
        let front = &services[0];
        assert_eq!(
            (front.name.as_str(), front.jobs.clone()),
            ("front", vec!["web".to_owned()])
        );
        let got: Vec<(String, String, bool, Option<String>)> = front
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.alloc.clone(),
                    e.socket_addr().to_string(),
                    e.healthy,
                    e.zone.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("a1".into(), "127.0.0.2:20001".into(), true, None),
                (
                    "a2".into(),
                    "10.0.0.1:20001".into(),
                    false,
                    Some("a".into())
                ),
            ]
        );
        assert_eq!((front.endpoints.len(), front.healthy()), (2, 1));

        // n2's agent disconnects: its endpoint stays listed, unhealthy.
        let mut lost = nodes.clone();
        lost.get_mut("n2").expect("n2").connected = false;
        let services = catalog(&web(), &allocs, &lost, &BTreeSet::new());
        let a1 = &services[0].endpoints[0];
        assert_eq!((a1.alloc.as_str(), a1.healthy), ("a1", false));

        // a1 is being migrated: unhealthy while it moves.
        let moving = BTreeSet::from(["a1".to_owned()]);
        let services = catalog(&web(), &allocs, &nodes, &moving);
        let a1 = &services[0].endpoints[0];
        assert_eq!((a1.alloc.as_str(), a1.healthy), ("a1", false));
    }

    #[test]
    fn a_service_without_replicas_is_listed_empty() {
        let services = catalog(&web(), &[], &BTreeMap::new(), &BTreeSet::new());
        assert_eq!(services[0].endpoints, vec![]);
    }
}

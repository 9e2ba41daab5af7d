//! Service catalog bodies: `GET /v1/services` (every [`ServiceView`]) and
//! `GET /v1/services/{name}` (one).

use serde::{Deserialize, Serialize};

/// A service with its endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServiceView {
    /// The service.
    pub name: String,
    /// The jobs that offer it.
    pub jobs: Vec<String>,
    /// Its endpoints, ordered by allocation id.
    pub endpoints: Vec<EndpointView>,
}

/// One replica of a service, where clients reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EndpointView {
    /// The allocation.
    pub alloc: String,
    /// Its job.
    pub job: String,
    /// Its node.
    pub node: String,
    /// The address to connect to: the published address, or the node's own
    /// address where the port is published on every address.
    #[cfg_attr(feature = "openapi", schema(value_type = String, example = "10.0.0.7"))]
    pub address: std::net::IpAddr,
    /// The port on the node.
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// It passes its health check (or the job has none); unhealthy endpoints stay
    /// listed, and balancers and DNS leave them out.
    pub healthy: bool,
    /// The service's tags in the job that offers it.
    pub tags: Vec<String>,
    /// The node's `zone` label, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Its share of traffic against the service's other endpoints (the job's
    /// `spec.services[].weight`, 1-256, default 100).
    #[serde(default = "default_weight")]
    pub weight: u16,
}

fn default_weight() -> u16 {
    novacron_common::manifest::DEFAULT_SERVICE_WEIGHT
}

impl EndpointView {
    /// `10.0.0.7:20001`, `[fd00::7]:20001`.
    pub fn socket_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::new(self.address, self.port)
    }
}

impl ServiceView {
    /// How many of its endpoints pass their health check (or have none).
    pub fn healthy(&self) -> usize {
        self.endpoints.iter().filter(|e| e.healthy).count()
    }
}

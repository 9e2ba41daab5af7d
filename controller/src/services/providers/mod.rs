//! Node providers: what makes and removes the nodes of a pool.
//!
//! [`NodeProvider`] is the narrow trait the pool manager drives: `create` a node
//! (which then enrolls itself with a single-use join token), `delete` it, `list` the
//! nodes it made for a pool. [`StaticProvider`] makes nothing: its pool is the hosts
//! that enrolled themselves with the label `pool=<name>`. [`DockerProvider`] runs
//! each node as a container of `novacron-agent` on a Docker daemon, like a VM in a
//! cloud. [`QemuProvider`] runs each node as a VM job of the fleet whose guest runs
//! the agent and joins. **Architecture Invariant:** in the controller only
//! `providers::docker` knows bollard, and it only ever touches containers
//! labelled with a pool ([`LABEL_POOL`]) or with a node it made ([`LABEL_NODE`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use novacron_common::autoscale::pool::NodeTemplateSpec;

use crate::state::registry::Registry;

mod docker;
mod qemu;

pub use docker::{DockerProvider, DockerSettings};
pub use qemu::{PROVISION_TIMEOUT as QEMU_PROVISION_TIMEOUT, QemuProvider, QemuSettings};

/// Label on a provider's container: the pool it belongs to.
pub const LABEL_POOL: &str = "novacron.pool";
/// Label on a provider's container (and on the workloads its agent runs): the node.
pub const LABEL_NODE: &str = "novacron.node";
/// Label on a provider's container made for the warm pool.
pub const LABEL_WARM: &str = "novacron.warm";
/// The providers this controller offers, by name.
pub const PROVIDERS: [&str; 3] = ["static", "docker", "qemu"];

/// What a new node needs to enroll and run.
#[derive(Debug, Clone)]
pub struct CreateNode<'a> {
    /// The pool.
    pub pool: &'a str,
    /// Its template.
    pub template: &'a NodeTemplateSpec,
    /// The node name (the provider's and the certificate's).
    pub name: &'a str,
    /// The labels the agent reports.
    pub labels: &'a BTreeMap<String, String>,
    /// How to enroll.
    pub join: &'a Join,
    /// For the warm pool: enroll, then stop until [`NodeProvider::start`].
    pub warm: bool,
}

/// Enrollment details handed to a new node.
#[derive(Clone)]
pub struct Join {
    /// The controller's API URL as the node reaches it.
    pub controller: String,
    /// A fresh single-use join token (`<id>.<secret>`).
    pub token: String,
    /// The fleet CA fingerprint to pin.
    pub ca_fingerprint: String,
    /// A name on the controller's certificate, which the node checks when the
    /// URL's host is not on it (`novacron-agent join --server-name`).
    pub server_name: String,
}

impl std::fmt::Debug for Join {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Join")
            .field("controller", &self.controller)
            .field("token", &"<redacted>")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// A node as its provider sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderNode {
    /// The node name.
    pub name: String,
    /// When it was created (Unix ms), when the provider knows.
    pub created_unix_ms: Option<u64>,
    /// The provider's word for its state (`running`, `exited`).
    pub state: String,
    /// Made for the warm pool.
    pub warm: bool,
}

impl ProviderNode {
    /// A warm-pool node that is stopped, ready to be started.
    pub fn parked(&self) -> bool {
        self.warm && self.state == "exited"
    }
}

/// Why a provider call failed.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider does not create or delete nodes.
    #[error(
        "provider {provider} cannot {op} nodes; its pool is the hosts that enrolled with the label pool=<name>"
    )]
    Unsupported {
        /// The provider.
        provider: &'static str,
        /// `create` or `delete`.
        op: &'static str,
    },
    /// The pool's settings do not allow the call.
    #[error("{0}")]
    Settings(String),
    /// Applying or stopping a node's VM job failed.
    #[error("VM {op} of node {name}: {message}")]
    Vm {
        /// What was being done.
        op: &'static str,
        /// The node.
        name: String,
        /// Why.
        message: String,
    },
    /// The Docker daemon failed or refused.
    #[error("Docker {op} of {name}: {message}")]
    Docker {
        /// What was being done.
        op: &'static str,
        /// The container or pool.
        name: String,
        /// The daemon's answer.
        message: String,
    },
}

/// Makes, removes and lists the nodes of pools.
pub trait NodeProvider: Send + Sync {
    /// The provider's name (as templates write it).
    fn name(&self) -> &'static str;
    /// Whether it creates and deletes nodes.
    fn elastic(&self) -> bool;
    /// Makes node `req.name`; it enrolls itself with `req.join`.
    fn create(
        &self,
        req: &CreateNode<'_>,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;
    /// Starts node `name` of `pool`, made stopped for the warm pool.
    fn start(
        &self,
        pool: &str,
        name: &str,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;
    /// Stops node `name` of `pool` (drained and empty) so that it waits in the
    /// warm pool until [`NodeProvider::start`]; it keeps its identity and disk.
    fn stop(
        &self,
        pool: &str,
        name: &str,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;
    /// Removes node `name` of `pool` (and what it ran); removing a missing node is
    /// not an error.
    fn delete(
        &self,
        pool: &str,
        name: &str,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;
    /// The nodes it made for `pool`.
    fn list(
        &self,
        pool: &str,
    ) -> impl Future<Output = Result<Vec<ProviderNode>, ProviderError>> + Send;
}

/// The `static` provider: hosts that enrolled themselves with `pool=<name>`.
#[derive(Debug, Clone)]
pub struct StaticProvider {
    registry: Arc<Registry>,
}

impl StaticProvider {
    /// A provider reading `registry`.
    pub fn new(registry: Arc<Registry>) -> StaticProvider {
        StaticProvider { registry }
    }
}

impl NodeProvider for StaticProvider {
    fn name(&self) -> &'static str {
        "static"
    }

    fn elastic(&self) -> bool {
        false
    }

    async fn create(&self, _req: &CreateNode<'_>) -> Result<(), ProviderError> {
        Err(ProviderError::Unsupported {
            provider: "static",
            op: "create",
        })
    }

    async fn start(&self, _pool: &str, _name: &str) -> Result<(), ProviderError> {
        Err(ProviderError::Unsupported {
            provider: "static",
            op: "start",
        })
    }

    async fn stop(&self, _pool: &str, _name: &str) -> Result<(), ProviderError> {
        Err(ProviderError::Unsupported {
            provider: "static",
            op: "stop",
        })
    }

    async fn delete(&self, _pool: &str, _name: &str) -> Result<(), ProviderError> {
        Err(ProviderError::Unsupported {
            provider: "static",
            op: "delete",
        })
    }

    async fn list(&self, pool: &str) -> Result<Vec<ProviderNode>, ProviderError> {
        let now = std::time::Instant::now();
        let revoked = self.registry.revoked_names();
        Ok(self
            .registry
            .views(now)
            .into_iter()
            .filter(|v| v.labels.get("pool").map(String::as_str) == Some(pool))
            .filter(|v| !revoked.contains(&v.name))
            .map(|v| ProviderNode {
                name: v.name,
                created_unix_ms: None,
                state: v.status.to_string(),
                warm: false,
            })
            .collect())
    }
}

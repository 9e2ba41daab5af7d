//! `GET /v1/controllers`: the controller group, as `novacron controller list`
//! shows it.

use serde::{Deserialize, Serialize};

/// The controllers serving this fleet and the store they share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ControllersView {
    /// `redb` (one controller on its embedded store) or `etcd`.
    pub store: String,
    /// The leader's name.
    pub leader: Option<String>,
    /// The leader's epoch (the election key's revision in etcd; 0 for redb).
    pub epoch: i64,
    /// The leader lease, in seconds (0 for redb).
    pub lease_secs: u64,
    /// How long the current leader has led, in seconds.
    pub leader_for_secs: u64,
    /// The controllers (each with a live lease).
    pub members: Vec<ControllerMember>,
    /// The etcd members and their health (empty for redb).
    pub etcd: Vec<EtcdMemberHealth>,
}

/// One controller of the group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ControllerMember {
    /// Its name.
    pub name: String,
    /// Its API URL.
    pub api_url: String,
    /// Its agent link address.
    pub quic: String,
    /// Whether it leads.
    pub leader: bool,
    /// Seconds since it joined the group.
    pub up_secs: u64,
}

/// One etcd member as its client URL answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EtcdMemberHealth {
    /// The client URL.
    pub endpoint: String,
    /// Whether it answered a status request.
    pub healthy: bool,
    /// Whether it is etcd's Raft leader.
    pub raft_leader: bool,
    /// The error, when it did not answer.
    pub error: Option<String>,
}

/// One record of a backup (`GET /v1/backup`): its key in the etcd store's layout
/// (`t/<table>/<key>`, `events/<seq>`, `changes/<revision>`, `meta/<key>`) and
/// its JSON value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BackupRecord {
    /// The key.
    pub key: String,
    /// The record.
    #[cfg_attr(feature = "openapi", schema(value_type = Value))]
    pub value: serde_json::Value,
}

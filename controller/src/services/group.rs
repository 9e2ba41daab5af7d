//! The controller group on etcd, as `GET /v1/controllers` shows it: members,
//! leader, lease, etcd's health. The loop that campaigns and leads is
//! [`crate::ha::serve`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::Client;
use novacron_api::{ControllerMember, ControllersView, EtcdMemberHealth};

use crate::state::election::{self, Keys};
use crate::state::store::EtcdConfig;

/// The leader's view of its group, for `GET /v1/controllers`.
pub struct GroupView {
    client: Client,
    keys: Keys,
    etcd: EtcdConfig,
    lease: Duration,
    epoch: i64,
    elected_unix_ms: u64,
}

impl GroupView {
    /// The view through `client` of the group under `etcd.prefix`, from the
    /// leader elected with `epoch`.
    pub fn new(client: Client, etcd: EtcdConfig, lease: Duration, epoch: i64) -> GroupView {
        GroupView {
            client,
            keys: Keys::new(&etcd.prefix),
            etcd,
            lease,
            epoch,
            elected_unix_ms: unix_ms(),
        }
    }

    /// This leader's epoch (its election key's revision).
    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// When this leader was elected (Unix ms).
    pub fn elected_unix_ms(&self) -> u64 {
        self.elected_unix_ms
    }
}

impl std::fmt::Debug for GroupView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupView")
            .field("keys", &self.keys)
            .field("etcd", &self.etcd.endpoints)
            .finish_non_exhaustive()
    }
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl GroupView {
    /// Reads the group and asks each etcd endpoint for its status.
    pub async fn view(&self) -> Result<ControllersView, String> {
        let group = election::group(&self.client, &self.keys)
            .await
            .map_err(|e| format!("cannot read the group from etcd: {e}"))?;
        let now = unix_ms();
        let leader_name = group.leader.as_ref().map(|(l, _)| l.name.clone());
        let mut members: Vec<ControllerMember> = group
            .members
            .iter()
            .map(|m| ControllerMember {
                name: m.name.clone(),
                api_url: m.api_url.clone(),
                quic: m.quic.clone(),
                leader: leader_name.as_deref() == Some(m.name.as_str()),
                up_secs: now.saturating_sub(m.since_unix_ms) / 1000,
            })
            .collect();
        members.sort_by(|a, b| a.name.cmp(&b.name));
        let mut etcd = Vec::new();
        for endpoint in &self.etcd.endpoints {
            let one = EtcdConfig {
                endpoints: vec![endpoint.clone()],
                ..self.etcd.clone()
            };
            let status = tokio::time::timeout(Duration::from_secs(2), async {
                let mut client = one.connect().await?;
                client.status().await
            })
            .await;
            etcd.push(match status {
                Ok(Ok(s)) => EtcdMemberHealth {
                    endpoint: endpoint.clone(),
                    healthy: true,
                    raft_leader: s.header().map(|h| h.member_id()) == Some(s.leader()),
                    error: None,
                },
                Ok(Err(e)) => EtcdMemberHealth {
                    endpoint: endpoint.clone(),
                    healthy: false,
                    raft_leader: false,
                    error: Some(e.to_string()),
                },
                Err(_) => EtcdMemberHealth {
                    endpoint: endpoint.clone(),
                    healthy: false,
                    raft_leader: false,
                    error: Some("no answer within 2 s".into()),
                },
            });
        }
        Ok(ControllersView {
            store: "etcd".into(),
            leader: leader_name,
            epoch: group.leader.as_ref().map(|(_, e)| *e).unwrap_or(0),
            lease_secs: self.lease.as_secs(),
            leader_for_secs: group
                .leader
                .as_ref()
                .map(|(l, _)| now.saturating_sub(l.elected_unix_ms) / 1000)
                .unwrap_or(0),
            members,
            etcd,
        })
    }
}

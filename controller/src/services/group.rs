//! The controller group on etcd: what `GET /v1/controllers` shows (members,
//! leader, lease, etcd's health), and [`serve`], the loop of a controller in a
//! highly available group: campaign, lead (the whole controller runs), step
//! down when the term ends, campaign again.
//!
//! Followers are hot standbys: they hold a lease, appear in the group and
//! campaign, but bind no port. Agents and the CLI know every controller's
//! address and use the one that answers (see ARCHITECTURE.md, "High
//! availability", for why followers neither serve nor relay).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::Client;
use novacron_api::{ControllerMember, ControllersView, EtcdMemberHealth};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::server::{self, Controller, ControllerConfig};
use crate::state::election::{self, Keys, MemberInfo};
use crate::state::store::{EtcdConfig, EtcdStore, Store};

/// How long a controller waits before campaigning again after etcd failed.
const RETRY: Duration = Duration::from_secs(1);

/// The leader's view of its group, for `GET /v1/controllers`.
pub struct GroupView {
    client: Client,
    keys: Keys,
    etcd: EtcdConfig,
    lease: Duration,
}

impl std::fmt::Debug for GroupView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupView")
            .field("keys", &self.keys)
            .field("etcd", &self.etcd.endpoints)
            .finish_non_exhaustive()
    }
}

fn unix_ms() -> u64 {
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

/// The member name: the host name and the API port (unique on one host too).
pub fn member_name(config: &ControllerConfig) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "controller".into());
    format!("{host}-{}", config.api_listen.port())
}

/// Runs a controller of an etcd group until `shutdown`: campaigns, and while it
/// leads runs the whole controller on the fenced store; when its term ends
/// (lease lost, a fenced write refused) it stops serving and campaigns again.
/// `on_lead` is told each time this controller starts serving. On shutdown a
/// leader resigns (revokes its lease) so that another takes over at once.
pub async fn serve(
    config: ControllerConfig,
    etcd: EtcdConfig,
    lease: Duration,
    shutdown: CancellationToken,
    mut on_lead: impl FnMut(&Controller),
) -> anyhow::Result<()> {
    let open = etcd.clone();
    let store = tokio::task::spawn_blocking(move || EtcdStore::open(open, true)).await??;
    let store = Arc::new(store);
    let client = etcd.connect().await?;
    let keys = Keys::new(&etcd.prefix);
    let name = member_name(&config);
    let me = MemberInfo {
        name: name.clone(),
        api_url: format!(
            "https://{}:{}",
            config.server_name,
            config.api_listen.port()
        ),
        quic: config
            .advertise
            .clone()
            .unwrap_or_else(|| format!("{}:{}", config.server_name, config.quic_listen.port())),
        since_unix_ms: unix_ms(),
    };
    info!(member = %name, prefix = %etcd.prefix, lease_ms = lease.as_millis() as u64, "joining the controller group");
    loop {
        let term = tokio::select! {
            term = election::campaign(&client, &keys, &me, lease, &shutdown) => term,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let term = match term {
            Ok(Some(term)) => term,
            Ok(None) => return Ok(()),
            Err(error) => {
                warn!(%error, "cannot campaign (etcd unavailable?); trying again");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => continue,
                    _ = shutdown.cancelled() => return Ok(()),
                }
            }
        };
        store.set_fence(Some(term.fence.clone()));
        let view = Arc::new(GroupView {
            client: client.clone(),
            keys: keys.clone(),
            etcd: etcd.clone(),
            lease,
        });
        let dyn_store: Arc<dyn Store> = store.clone();
        let controller = match server::start_with(config.clone(), dyn_store, Some(view)).await {
            Ok(c) => c,
            Err(e) => {
                error!(error = %format!("{e:#}"), "cannot start serving as leader; resigning");
                store.set_fence(None);
                term.resign().await;
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => continue,
                    _ = shutdown.cancelled() => return Ok(()),
                }
            }
        };
        controller.record_election(&name, term.fence.revision);
        on_lead(&controller);
        tokio::select! {
            _ = term.fence.lost.cancelled() => {
                warn!(member = %name, "leadership lost: stepping down");
                controller.shutdown().await;
                store.set_fence(None);
                term.abandon();
            }
            _ = shutdown.cancelled() => {
                controller.shutdown().await;
                store.set_fence(None);
                term.resign().await;
                return Ok(());
            }
        }
    }
}

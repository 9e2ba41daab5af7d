//! A controller of a highly available group on etcd: [`serve`] campaigns, and
//! while this controller leads runs the whole controller ([`server::start_with`])
//! on the fenced store; when the term ends (lease lost, a fenced write refused)
//! it stops serving and campaigns again.
//!
//! Followers are hot standbys: they hold a lease, appear in the group and
//! campaign, but bind no port; meanwhile each copies the leader's metrics
//! history ([`crate::services::history_copy`]). Agents and the CLI know every controller's
//! address and use the one that answers (ARCHITECTURE.md, "High availability",
//! says why followers neither serve nor relay).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::server::{self, Controller, ControllerConfig};
use crate::services::group::{GroupView, unix_ms};
use crate::state::election::{self, Keys, MemberInfo};
use crate::state::store::{EtcdConfig, EtcdStore, Store};

/// How long a controller waits before campaigning again after etcd failed.
const RETRY: Duration = Duration::from_secs(1);

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
        // While it waits, a follower copies the leader's metrics history; the
        // copy stops (and nothing writes to the directory) before this
        // controller opens it as leader.
        let copying = config.history.enabled.then(|| {
            let stop = shutdown.child_token();
            let task = tokio::spawn(crate::services::history_copy::follow(
                config.data_dir.clone(),
                client.clone(),
                keys.clone(),
                name.clone(),
                stop.clone(),
            ));
            (stop, task)
        });
        let term = tokio::select! {
            term = election::campaign(&client, &keys, &me, lease, &shutdown) => Some(term),
            _ = shutdown.cancelled() => None,
        };
        if let Some((stop, task)) = copying {
            stop.cancel();
            let _ = task.await;
        }
        let Some(term) = term else {
            return Ok(());
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
        let view = Arc::new(GroupView::new(
            client.clone(),
            etcd.clone(),
            lease,
            term.fence.revision,
        ));
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
                // Resign first: another controller takes over while this one
                // closes its connections (its writes are refused from now on).
                store.set_fence(None);
                term.resign().await;
                controller.shutdown().await;
                return Ok(());
            }
        }
    }
}

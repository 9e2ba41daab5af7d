//! Leader election on an etcd lease, for a group of controllers sharing an
//! [`EtcdStore`](crate::state::store::EtcdStore).
//!
//! Each controller grants itself a lease (the configured TTL), keeps it alive
//! every third of the TTL, registers itself under `<prefix>members/<name>` and
//! campaigns for `<prefix>leader` by creating it, bound to its lease, in a
//! transaction that succeeds only when the key does not exist. The winner's
//! epoch is the key's `create_revision`: it fences every store write (a
//! transaction compares it) and is the leader's identity in `controller list`.
//! Losers watch the key and campaign again when it is deleted (the leader
//! resigned by revoking its lease) or expires with the lease.
//!
//! The leader counts itself deposed, and steps down, when a keep-alive has not
//! been answered for a whole TTL, when etcd says the lease is gone, or when a
//! fenced write finds the key gone or another controller's
//! ([`Fence::lost`](crate::state::store::etcd::Fence)).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::state::store::etcd::Fence;

/// The default lease TTL: long enough not to flap on shared cores, short enough
/// for a failover within seconds.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(5);
/// The shortest lease etcd 3.4 grants with its default election settings.
pub const MIN_LEASE: Duration = Duration::from_secs(2);

/// What a controller says about itself under `<prefix>members/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Its name (unique in the group).
    pub name: String,
    /// Its API URL.
    pub api_url: String,
    /// Its agent link address (`host:port`).
    pub quic: String,
    /// When it started campaigning (Unix milliseconds).
    pub since_unix_ms: u64,
}

/// The election key's value: who leads, since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// The leading member's name.
    pub name: String,
    /// Its API URL.
    pub api_url: String,
    /// When it was elected (Unix milliseconds).
    pub elected_unix_ms: u64,
}

/// The keys of one group.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// The keys under `prefix` (ending in `/`).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    /// The election key.
    pub fn leader(&self) -> Vec<u8> {
        format!("{}leader", self.prefix).into_bytes()
    }

    /// The members' prefix.
    pub fn members(&self) -> Vec<u8> {
        format!("{}members/", self.prefix).into_bytes()
    }

    fn member(&self, name: &str) -> Vec<u8> {
        format!("{}members/{name}", self.prefix).into_bytes()
    }
}

/// This controller's term as leader.
pub struct Term {
    /// The fence for the store; its token is cancelled when the term ends.
    pub fence: Fence,
    /// The lease the election key is bound to.
    pub lease: i64,
    /// When the term began.
    pub elected: Instant,
    keeper: JoinHandle<()>,
    client: Client,
}

impl std::fmt::Debug for Term {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Term")
            .field("fence", &self.fence)
            .field("lease", &self.lease)
            .finish_non_exhaustive()
    }
}

impl Term {
    /// Ends the term on purpose (shutdown): revokes the lease, which deletes the
    /// election key at once so that another controller takes over without
    /// waiting for the TTL.
    pub async fn resign(self) {
        self.fence.lost.cancel();
        self.keeper.abort();
        let mut client = self.client.clone();
        match tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(self.lease)).await {
            Ok(Ok(_)) => info!("resigned: lease revoked"),
            Ok(Err(error)) => warn!(%error, "cannot revoke the lease; it expires on its own"),
            Err(_) => warn!("etcd did not answer the lease revocation; it expires on its own"),
        }
    }

    /// Ends a term that was lost (the lease is gone or another controller leads).
    pub fn abandon(self) {
        self.fence.lost.cancel();
        self.keeper.abort();
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Keeps `lease` alive every third of `ttl` until `lost` is cancelled; cancels
/// `lost` when etcd says the lease expired or no keep-alive was answered for a
/// whole TTL.
fn keep_alive(
    client: Client,
    lease: i64,
    ttl: Duration,
    lost: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut client = client;
        let mut last_ok = Instant::now();
        let mut stream = None;
        loop {
            if lost.is_cancelled() {
                return;
            }
            if last_ok.elapsed() >= ttl {
                warn!(
                    lease,
                    "no keep-alive answered for a whole lease: leadership lost"
                );
                lost.cancel();
                return;
            }
            if stream.is_none() {
                match tokio::time::timeout(ttl / 3, client.lease_keep_alive(lease)).await {
                    Ok(Ok(pair)) => stream = Some(pair),
                    Ok(Err(error)) => warn!(%error, "cannot open the lease keep-alive"),
                    Err(_) => warn!("etcd did not answer the lease keep-alive"),
                }
            }
            if let Some((keeper, answers)) = stream.as_mut() {
                let sent = Instant::now();
                let answered = async {
                    keeper.keep_alive().await?;
                    answers.message().await
                };
                match tokio::time::timeout(ttl / 3, answered).await {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => last_ok = sent,
                    Ok(Ok(Some(_))) => {
                        warn!(lease, "etcd says the lease expired: leadership lost");
                        lost.cancel();
                        return;
                    }
                    Ok(Ok(None)) | Ok(Err(_)) | Err(_) => stream = None,
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(ttl / 3) => {}
                _ = lost.cancelled() => return,
            }
        }
    })
}

/// Campaigns until this controller leads (`Ok(Some)`), `shutdown` is cancelled
/// (`Ok(None)`), or etcd fails (`Err`: the caller waits and campaigns again).
pub async fn campaign(
    client: &Client,
    keys: &Keys,
    me: &MemberInfo,
    ttl: Duration,
    shutdown: &CancellationToken,
) -> Result<Option<Term>, etcd_client::Error> {
    let mut client = client.clone();
    let ttl = ttl.max(MIN_LEASE);
    let lease = client
        .lease_grant(ttl.as_secs().max(1) as i64, None)
        .await?
        .id();
    let lost = CancellationToken::new();
    let keeper = keep_alive(client.clone(), lease, ttl, lost.clone());
    let abandon = |keeper: JoinHandle<()>| keeper.abort();
    let member = serde_json::to_vec(me).unwrap_or_default();
    if let Err(e) = client
        .put(
            keys.member(&me.name),
            member,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
    {
        abandon(keeper);
        return Err(e);
    }
    loop {
        if lost.is_cancelled() {
            abandon(keeper);
            return Err(etcd_client::Error::LeaseKeepAliveError(
                "the campaign's lease expired".into(),
            ));
        }
        let value = serde_json::to_vec(&LeaderInfo {
            name: me.name.clone(),
            api_url: me.api_url.clone(),
            elected_unix_ms: unix_ms(),
        })
        .unwrap_or_default();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(
                keys.leader(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![TxnOp::put(
                keys.leader(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else(vec![TxnOp::get(keys.leader(), None)]);
        let resp = match client.txn(txn).await {
            Ok(r) => r,
            Err(e) => {
                abandon(keeper);
                return Err(e);
            }
        };
        let at = resp.header().map(|h| h.revision()).unwrap_or(0);
        if resp.succeeded() {
            info!(member = %me.name, epoch = at, "elected leader");
            return Ok(Some(Term {
                fence: Fence {
                    key: keys.leader(),
                    revision: at,
                    lost,
                },
                lease,
                elected: Instant::now(),
                keeper,
                client,
            }));
        }
        let holder = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        if let Some(holder) = holder.and_then(|v| serde_json::from_slice::<LeaderInfo>(&v).ok()) {
            info!(leader = %holder.name, "following");
        }
        // Wait for the key to go (deleted or expired), then campaign again.
        let watched = client
            .watch(
                keys.leader(),
                Some(WatchOptions::new().with_start_revision(at + 1)),
            )
            .await;
        let mut events = match watched {
            Ok(stream) => stream,
            Err(e) => {
                abandon(keeper);
                return Err(e);
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    abandon(keeper);
                    let _ = client.lease_revoke(lease).await;
                    return Ok(None);
                }
                _ = lost.cancelled() => break,
                message = events.message() => match message {
                    Ok(Some(resp)) => {
                        if resp.events().iter().any(|e| e.event_type() == EventType::Delete) {
                            break;
                        }
                    }
                    Ok(None) | Err(_) => break,
                },
            }
        }
    }
}

/// The group as etcd has it: the members and the leader (with its epoch).
#[derive(Debug, Clone, Default)]
pub struct Group {
    /// Every member with a live lease.
    pub members: Vec<MemberInfo>,
    /// The leader and its epoch (the election key's `create_revision`).
    pub leader: Option<(LeaderInfo, i64)>,
}

/// Reads the group.
pub async fn group(client: &Client, keys: &Keys) -> Result<Group, etcd_client::Error> {
    let mut client = client.clone();
    let members = client
        .get(keys.members(), Some(GetOptions::new().with_prefix()))
        .await?;
    let leader = client.get(keys.leader(), None).await?;
    Ok(Group {
        members: members
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect(),
        leader: leader.kvs().first().and_then(|kv| {
            serde_json::from_slice(kv.value())
                .ok()
                .map(|l| (l, kv.create_revision()))
        }),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::state::policies::PolicyRecord;
    use crate::state::store::etcd::testing::TestEtcd;
    use crate::state::store::{EtcdConfig, EtcdStore, Store, StoreError};

    fn config(etcd: &TestEtcd) -> EtcdConfig {
        EtcdConfig {
            endpoints: vec![etcd.endpoint.clone()],
            prefix: "/fleet/".into(),
            tls: None,
        }
    }

    fn member(name: &str) -> MemberInfo {
        MemberInfo {
            name: name.into(),
            api_url: format!("https://{name}:7443"),
            quic: format!("{name}:7443"),
            since_unix_ms: 0,
        }
    }

    fn policy(name: &str) -> PolicyRecord {
        serde_json::from_value(serde_json::json!({
            "name": name,
            "source": "",
            "file": "p.yaml",
            "applied_by": "test",
            "applied_at_unix_ms": 0,
        }))
        .unwrap_or_else(|_| panic!("a policy record; fields changed?"))
    }

    /// Writes through `store` on a blocking thread (the store waits on its own
    /// runtime).
    async fn write(store: &Arc<EtcdStore>, name: &str) -> Result<(), StoreError> {
        let (store, name) = (store.clone(), name.to_owned());
        tokio::task::spawn_blocking(move || store.put_policy(&policy(&name)))
            .await
            .expect("no panic")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_elected_controller_writes_and_a_deposed_one_is_fenced() {
        let etcd = TestEtcd::start();
        let cfg = config(&etcd);
        let keys = Keys::new(&cfg.prefix);
        let open = |cfg: EtcdConfig| async move {
            Arc::new(
                tokio::task::spawn_blocking(move || EtcdStore::open(cfg, true))
                    .await
                    .expect("no panic")
                    .expect("open"),
            )
        };
        let (a, b) = (open(cfg.clone()).await, open(cfg.clone()).await);
        let client = cfg.connect().await.expect("connect");
        let shutdown = CancellationToken::new();

        // Nobody leads yet: no write goes through.
        let refused = write(&a, "p").await.expect_err("not elected");
        assert!(refused.is_fenced(), "{refused}");

        let term_a = campaign(&client, &keys, &member("a"), MIN_LEASE, &shutdown)
            .await
            .expect("campaign")
            .expect("elected");
        a.set_fence(Some(term_a.fence.clone()));
        write(&a, "p").await.expect("the leader writes");

        // B campaigns while A leads: it waits.
        let (client_b, keys_b, shutdown_b) = (client.clone(), keys.clone(), shutdown.clone());
        let b_campaign = tokio::spawn(async move {
            campaign(&client_b, &keys_b, &member("b"), MIN_LEASE, &shutdown_b).await
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !b_campaign.is_finished(),
            "B must not be elected while A leads"
        );
        let g = group(&client, &keys).await.expect("group");
        assert_eq!(g.members.len(), 2, "{g:?}");
        assert_eq!(g.leader.as_ref().map(|(l, _)| l.name.as_str()), Some("a"));

        // A is "paused": its keep-alive stops, its lease runs out, B takes over.
        let stale = term_a.fence.clone();
        term_a.keeper.abort();
        let term_b = tokio::time::timeout(Duration::from_secs(15), b_campaign)
            .await
            .expect("B is elected once A's lease expired")
            .expect("no panic")
            .expect("campaign")
            .expect("elected");
        assert!(term_b.fence.revision > stale.revision, "epochs rise");
        b.set_fence(Some(term_b.fence.clone()));
        write(&b, "p").await.expect("the new leader writes");

        // A wakes up and writes with its old fence: refused, and told it lost.
        assert!(!stale.lost.is_cancelled());
        let refused = write(&a, "p").await.expect_err("fenced");
        assert!(refused.is_fenced(), "{refused}");
        assert!(stale.lost.is_cancelled(), "the fenced write ends A's term");

        // B resigns: the key goes at once, and A (campaigning again) leads.
        term_b.resign().await;
        let g = group(&client, &keys).await.expect("group");
        assert!(
            g.leader.is_none(),
            "a resignation deletes the election key at once, without waiting for the lease: {g:?}"
        );
        let term_a2 = campaign(&client, &keys, &member("a"), MIN_LEASE, &shutdown)
            .await
            .expect("campaign")
            .expect("elected");
        a.set_fence(Some(term_a2.fence.clone()));
        write(&a, "p").await.expect("A leads again");
        let refused = write(&b, "p").await.expect_err("B's term ended");
        assert!(refused.is_fenced(), "{refused}");
        term_a2.resign().await;
    }
}

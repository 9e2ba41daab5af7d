//! [`EtcdStore`]: the [`Store`] on etcd, for a highly available controller group.
//!
//! Every record lives under one key prefix (so that two fleets can share one etcd):
//! `<prefix>t/<table>/<key>` holds the record as JSON (the bytes the redb store
//! writes), `<prefix>events/<seq>` and `<prefix>changes/<revision>` hold the event
//! log and the change log under zero-padded numbers (so that etcd's key order is
//! their order), and `<prefix>meta/` the schema version, the store's revision and
//! the link epoch.
//!
//! **Every write is one etcd transaction that compares and raises the store's
//! revision** (`meta/revision`, compared on its `mod_revision`): a read-modify-write
//! (a join token's use, the link epoch, a first certificate revocation) reads its
//! record and the revision in one snapshot, and commits only if no other write came
//! between; otherwise it reads again. **And every write of a serving controller is
//! fenced** ([`EtcdStore::set_fence`]): the same transaction compares the
//! election key's `create_revision` with the one this controller won, so a deposed
//! leader (paused or cut off past its lease) cannot write once another controller
//! has been elected; the failed compare reports [`StoreError::Fenced`] and cancels
//! the fence's token, which makes the controller step down.
//!
//! The trait is synchronous (it is called from blocking threads and, for short
//! reads, from async tasks): the store runs its own small tokio runtime and each
//! call waits for its request there, with a deadline ([`REQUEST_TIMEOUT`]).
//!
//! etcd's limits apply: a transaction holds at most `--max-txn-ops` operations
//! (128 by default) and `--max-request-bytes` (1.5 MiB). The controller's largest
//! writes (a reconcile pass's allocations) need more on a large fleet; the
//! packaged etcd units and the test clusters raise both (see
//! `packaging/ha/`), and a refused write says which limit it met.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, SortOrder, SortTarget,
    Txn, TxnOp, TxnOpResponse,
};
use tokio_util::sync::CancellationToken;

use super::*;

/// How long one etcd request may take before the store call fails.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How many times a write is tried again after another write came between its
/// read and its commit.
const MAX_CONFLICT_RETRIES: usize = 64;
/// Keys fetched per range request when listing a table.
const PAGE: i64 = 500;

/// Where the etcd store is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs of the etcd members (`http://127.0.0.1:2379`, or `https://`
    /// with [`EtcdConfig::tls`]).
    pub endpoints: Vec<String>,
    /// The key prefix of this fleet, ending in `/` (`/novacron/default/`).
    pub prefix: String,
    /// TLS to etcd: the CA that signed etcd's certificates, and an optional
    /// client certificate and key (PEM).
    pub tls: Option<EtcdTls>,
}

/// TLS settings for the connection to etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM of etcd's CA.
    pub ca_pem: String,
    /// PEM certificate and key of this controller's etcd client identity.
    pub identity: Option<(String, String)>,
}

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/novacron/default/";

impl EtcdConfig {
    /// Options for [`Client::connect`].
    pub fn connect_options(&self) -> ConnectOptions {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true)
            // A member cut off from its quorum answers "no leader" rather than
            // serving stale reads.
            .with_require_leader(true);
        if let Some(tls) = &self.tls {
            let mut t = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(tls.ca_pem.as_bytes()));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(etcd_client::Identity::from_pem(cert, key));
            }
            options = options.with_tls(t);
        }
        options
    }

    /// Connects a client to the members.
    pub async fn connect(&self) -> Result<Client, etcd_client::Error> {
        Client::connect(&self.endpoints, Some(self.connect_options())).await
    }
}

/// The election key a serving controller won: writes succeed only while it is
/// still the key it created.
#[derive(Debug, Clone)]
pub struct Fence {
    /// The election key.
    pub key: Vec<u8>,
    /// Its `create_revision` when this controller created it (the leader's epoch).
    pub revision: i64,
    /// Cancelled when a write finds the key gone or another controller's.
    pub lost: CancellationToken,
}

/// The [`Store`] on etcd.
pub struct EtcdStore {
    /// `None` only while dropping (the runtime is shut down in the background).
    rt: Option<tokio::runtime::Runtime>,
    client: Client,
    config: EtcdConfig,
    /// Whether writes need a fence (a serving controller) or not (`init`, `store
    /// migrate`, tests).
    fenced: bool,
    fence: RwLock<Option<Fence>>,
    /// Conflicts retried, for the logs and tests.
    conflicts: AtomicU64,
    /// Revisions the change log keeps ([`CHANGE_LOG_REVISIONS`]; fewer in tests).
    change_log_revisions: u64,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.config.endpoints)
            .field("prefix", &self.config.prefix)
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Dropping a runtime may block; this may run inside another runtime.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A raw etcd key and its value.
type KeyValue = (Vec<u8>, Vec<u8>);

/// One snapshot of a read-modify-write: the store's revision (and its
/// `mod_revision`, 0 when absent) and the values read.
struct Snapshot {
    revision: u64,
    mod_revision: i64,
    values: Vec<Option<Vec<u8>>>,
}

/// What a write commits: the etcd operations and the records they touch.
struct Plan<R> {
    ops: Vec<TxnOp>,
    touched: Vec<Touched>,
    result: R,
}

impl EtcdStore {
    /// Connects to etcd and checks the schema version under the prefix (writing it
    /// when the prefix is new). `fenced`: writes need [`EtcdStore::set_fence`]
    /// first (a serving controller).
    pub fn open(config: EtcdConfig, fenced: bool) -> Result<EtcdStore, StoreError> {
        if config.endpoints.is_empty() {
            return Err(StoreError::Etcd {
                endpoints: String::new(),
                op: "connecting",
                reason: "no etcd endpoints are configured".into(),
            });
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("etcd-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Etcd {
                endpoints: config.endpoints.join(","),
                op: "starting the etcd client",
                reason: e.to_string(),
            })?;
        let connect_config = config.clone();
        let client = run_on(&rt, async move { connect_config.connect().await }).map_err(|e| {
            StoreError::Etcd {
                endpoints: config.endpoints.join(","),
                op: "connecting",
                reason: e,
            }
        })?;
        let client = client.map_err(|e| StoreError::Etcd {
            endpoints: config.endpoints.join(","),
            op: "connecting",
            reason: e.to_string(),
        })?;
        let store = EtcdStore {
            rt: Some(rt),
            client,
            config,
            fenced,
            fence: RwLock::new(None),
            conflicts: AtomicU64::new(0),
            change_log_revisions: CHANGE_LOG_REVISIONS,
        };
        store.init_schema()?;
        Ok(store)
    }

    /// The connection settings.
    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    /// A client on the store's connection (cheap to clone).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Sets (or clears) the election key writes are fenced on.
    pub fn set_fence(&self, fence: Option<Fence>) {
        *write(&self.fence) = fence;
    }

    /// Write conflicts retried so far.
    pub fn conflicts(&self) -> u64 {
        self.conflicts.load(Ordering::Relaxed)
    }

    fn key(&self, rest: &str) -> Vec<u8> {
        format!("{}{rest}", self.config.prefix).into_bytes()
    }

    fn table_key(&self, table: Table, key: &str) -> Vec<u8> {
        self.key(&format!("t/{}/{key}", table.name))
    }

    fn table_prefix(&self, table: &str) -> Vec<u8> {
        self.key(&format!("t/{table}/"))
    }

    fn event_key(&self, seq: u64) -> Vec<u8> {
        self.key(&format!("events/{seq:020}"))
    }

    fn change_key(&self, revision: u64) -> Vec<u8> {
        self.key(&format!("changes/{revision:020}"))
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!(
            "etcd {} {}",
            self.config.endpoints.join(","),
            self.config.prefix
        ))
    }

    fn failed(&self, op: &'static str, reason: impl fmt::Display) -> StoreError {
        StoreError::Etcd {
            endpoints: self.config.endpoints.join(","),
            op,
            reason: reason.to_string(),
        }
    }

    /// Runs `f` on the store's runtime and waits for it, within [`REQUEST_TIMEOUT`].
    fn block<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let rt = self.rt.as_ref().expect("the runtime lives until drop");
        let timed = async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, f).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(_) => Err(format!(
                    "no answer within {} s (is a quorum of etcd members up?)",
                    REQUEST_TIMEOUT.as_secs()
                )),
            }
        };
        match run_on(rt, timed) {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(reason)) | Err(reason) => Err(self.failed(op, reason)),
        }
    }

    fn decode<T: DeserializeOwned>(
        &self,
        table: &'static str,
        key: &str,
        bytes: &[u8],
    ) -> Result<T, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
            path: self.path(),
            table,
            key: key.to_owned(),
            reason: e.to_string(),
        })
    }

    fn encode<T: Serialize + ?Sized>(
        &self,
        table: &'static str,
        key: &str,
        value: &T,
    ) -> Result<Vec<u8>, StoreError> {
        serde_json::to_vec(value).map_err(|e| StoreError::Encode {
            path: self.path(),
            table,
            key: key.to_owned(),
            reason: e.to_string(),
        })
    }

    fn init_schema(&self) -> Result<(), StoreError> {
        const OP: &str = "initializing the schema";
        let key = self.key("meta/schema_version");
        let found: Option<u32> = match self.get_raw(&key, OP)? {
            Some(bytes) => Some(self.decode("meta", "schema_version", &bytes)?),
            None => None,
        };
        match found {
            Some(found) if found > SCHEMA_VERSION => Err(StoreError::NewerSchema {
                path: self.path(),
                found,
                supported: SCHEMA_VERSION,
            }),
            Some(_) => Ok(()),
            None => {
                // Written once, unfenced: every controller of the group writes
                // the same value.
                let value = self.encode("meta", "schema_version", &SCHEMA_VERSION)?;
                let txn = Txn::new()
                    .when(vec![Compare::create_revision(
                        key.clone(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then(vec![TxnOp::put(key, value, None)]);
                let mut client = self.client.clone();
                self.block(OP, async move { client.txn(txn).await })?;
                Ok(())
            }
        }
    }

    fn get_raw(&self, key: &[u8], op: &'static str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut client = self.client.clone();
        let key = key.to_vec();
        let mut resp = self.block(op, async move { client.get(key, None).await })?;
        Ok(resp
            .take_kvs()
            .into_iter()
            .next()
            .map(|kv| kv.value().to_vec()))
    }

    fn get<T: DeserializeOwned>(
        &self,
        table: Table,
        key: &str,
        op: &'static str,
    ) -> Result<Option<T>, StoreError> {
        match self.get_raw(&self.table_key(table, key), op)? {
            Some(bytes) => self.decode(table.name, key, &bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Every key and value in `[start, end)`, in key order, read in pages at one
    /// etcd revision (a consistent snapshot).
    fn range(
        &self,
        start: Vec<u8>,
        end: Vec<u8>,
        op: &'static str,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let mut out = Vec::new();
        let mut from = start;
        let mut at = 0i64;
        loop {
            let mut client = self.client.clone();
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if at > 0 {
                options = options.with_revision(at);
            }
            let key = from.clone();
            let mut resp = self.block(op, async move { client.get(key, Some(options)).await })?;
            if at == 0 {
                at = resp.header().map(|h| h.revision()).unwrap_or(0);
            }
            let more = resp.more();
            let kvs = resp.take_kvs();
            let Some(last) = kvs.last().map(|kv| kv.key().to_vec()) else {
                break;
            };
            for kv in kvs {
                out.push((kv.key().to_vec(), kv.value().to_vec()));
            }
            if !more {
                break;
            }
            from = last;
            from.push(0);
        }
        Ok(out)
    }

    /// Every record of a table, in key order.
    fn all<T: DeserializeOwned>(
        &self,
        table: Table,
        op: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        let prefix = self.table_prefix(table.name);
        let end = prefix_end(&prefix);
        self.range(prefix.clone(), end, op)?
            .into_iter()
            .map(|(k, v)| {
                let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                self.decode(table.name, &key, &v)
            })
            .collect()
    }

    /// Every record of a table with its key, in key order.
    fn keyed<T: DeserializeOwned>(
        &self,
        table: Table,
        op: &'static str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let prefix = self.table_prefix(table.name);
        let end = prefix_end(&prefix);
        self.range(prefix.clone(), end, op)?
            .into_iter()
            .map(|(k, v)| {
                let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                let value = self.decode(table.name, &key, &v)?;
                Ok((key, value))
            })
            .collect()
    }

    /// Reads the revision and `keys` in one snapshot.
    fn snapshot(&self, keys: &[Vec<u8>], op: &'static str) -> Result<Snapshot, StoreError> {
        let revision_key = self.key("meta/revision");
        let mut ops = vec![TxnOp::get(revision_key, None)];
        ops.extend(keys.iter().map(|k| TxnOp::get(k.clone(), None)));
        let mut client = self.client.clone();
        let resp = self.block(
            op,
            async move { client.txn(Txn::new().and_then(ops)).await },
        )?;
        let mut values = Vec::with_capacity(keys.len() + 1);
        let mut mod_revision = 0;
        for (i, r) in resp.op_responses().into_iter().enumerate() {
            let TxnOpResponse::Get(get) = r else {
                return Err(self.failed(op, "etcd answered a read with another operation"));
            };
            let kv = get.kvs().first();
            if i == 0 {
                mod_revision = kv.map(|kv| kv.mod_revision()).unwrap_or(0);
            }
            values.push(kv.map(|kv| kv.value().to_vec()));
        }
        let revision = match values.first().cloned().flatten() {
            Some(bytes) => self.decode("meta", "revision", &bytes)?,
            None => 0,
        };
        values.remove(0);
        Ok(Snapshot {
            revision,
            mod_revision,
            values,
        })
    }

    /// One write: reads `keys` (with the revision), lets `plan` decide what to
    /// write, and commits it with the next revision and its change-log entry,
    /// compared on the revision (and the fence); reads again when another write
    /// came between.
    fn commit<R, E: From<StoreError>>(
        &self,
        op: &'static str,
        keys: &[Vec<u8>],
        mut plan: impl FnMut(&[Option<Vec<u8>>]) -> Result<Plan<R>, E>,
    ) -> Result<R, E> {
        let fence = read(&self.fence).clone();
        if self.fenced && fence.is_none() {
            return Err(StoreError::Fenced {
                op,
                reason: "this controller is not the leader".into(),
            }
            .into());
        }
        for _ in 0..MAX_CONFLICT_RETRIES {
            let snap = self.snapshot(keys, op)?;
            let Plan {
                mut ops,
                touched,
                result,
            } = plan(&snap.values)?;
            if touched.is_empty() && ops.is_empty() {
                return Ok(result);
            }
            let revision_key = self.key("meta/revision");
            let mut when = vec![Compare::mod_revision(
                revision_key.clone(),
                CompareOp::Equal,
                snap.mod_revision,
            )];
            if let Some(fence) = &fence {
                when.push(Compare::create_revision(
                    fence.key.clone(),
                    CompareOp::Equal,
                    fence.revision,
                ));
            }
            if !touched.is_empty() {
                let next = snap.revision + 1;
                ops.push(TxnOp::put(
                    revision_key,
                    self.encode("meta", "revision", &next)?,
                    None,
                ));
                ops.push(TxnOp::put(
                    self.change_key(next),
                    self.encode(CHANGES_NAME, &next.to_string(), &touched)?,
                    None,
                ));
                if next > self.change_log_revisions {
                    ops.push(TxnOp::delete(
                        self.change_key(next - self.change_log_revisions),
                        None,
                    ));
                }
            }
            let otherwise = match &fence {
                Some(fence) => vec![TxnOp::get(fence.key.clone(), None)],
                None => vec![],
            };
            let txn = Txn::new().when(when).and_then(ops).or_else(otherwise);
            let mut client = self.client.clone();
            let resp = self.block(op, async move { client.txn(txn).await })?;
            if resp.succeeded() {
                return Ok(result);
            }
            if let Some(fence) = &fence {
                let holder = resp.op_responses().into_iter().find_map(|r| match r {
                    TxnOpResponse::Get(get) => {
                        Some(get.kvs().first().map(|kv| kv.create_revision()))
                    }
                    _ => None,
                });
                if holder != Some(Some(fence.revision)) {
                    fence.lost.cancel();
                    return Err(StoreError::Fenced {
                        op,
                        reason: "another controller was elected leader (this one's lease ran out)"
                            .into(),
                    }
                    .into());
                }
            }
            self.conflicts.fetch_add(1, Ordering::Relaxed);
        }
        Err(self
            .failed(
                op,
                format!("{MAX_CONFLICT_RETRIES} concurrent writes in a row came between this write's read and commit"),
            )
            .into())
    }

    fn put<T: Serialize>(
        &self,
        table: Table,
        key: &str,
        value: &T,
        op: &'static str,
    ) -> Result<(), StoreError> {
        let bytes = self.encode(table.name, key, value)?;
        let k = self.table_key(table, key);
        self.commit(op, &[], |_| {
            Ok::<_, StoreError>(Plan {
                ops: vec![TxnOp::put(k.clone(), bytes.clone(), None)],
                touched: vec![Touched::put(table.name, key)],
                result: (),
            })
        })
    }

    fn remove(&self, table: Table, key: &str, op: &'static str) -> Result<bool, StoreError> {
        let k = self.table_key(table, key);
        self.commit(op, std::slice::from_ref(&k), |values| {
            let existed = values[0].is_some();
            Ok::<_, StoreError>(Plan {
                ops: if existed {
                    vec![TxnOp::delete(k.clone(), None)]
                } else {
                    vec![]
                },
                touched: if existed {
                    vec![Touched::delete(table.name, key)]
                } else {
                    vec![]
                },
                result: existed,
            })
        })
    }

    /// Every key below the prefix with its bytes, read at one etcd revision.
    fn export_all(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let prefix = self.key("");
        let end = prefix_end(&prefix);
        Ok(self
            .range(prefix.clone(), end, "exporting the store")?
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k[prefix.len()..]).into_owned(), v))
            .collect())
    }

    /// Whether the prefix holds any record besides the schema version.
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        let prefix = self.key("t/");
        let mut client = self.client.clone();
        let options = GetOptions::new().with_prefix().with_count_only();
        let resp = self.block("counting records", async move {
            client.get(prefix, Some(options)).await
        })?;
        Ok(resp.count() == 0 && self.revision()? == 0)
    }

    /// Writes `entries` (keys below the prefix, as [`Store::export`] gives them)
    /// in transactions of at most `batch` operations, unfenced: for `store
    /// migrate` and `restore` into an empty prefix.
    pub fn import(&self, entries: &[(String, Vec<u8>)], batch: usize) -> Result<(), StoreError> {
        for chunk in entries.chunks(batch.max(1)) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(k, v)| TxnOp::put(self.key(k), v.clone(), None))
                .collect();
            let mut client = self.client.clone();
            self.block("importing records", async move {
                client.txn(Txn::new().and_then(ops)).await
            })?;
        }
        Ok(())
    }
}

/// Runs `f` on `rt` from any thread (a runtime's worker included) and waits.
fn run_on<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    f: impl Future<Output = T> + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(f.await);
    });
    rx.recv()
        .map_err(|_| "the etcd client's runtime stopped".to_string())
}

/// The first key after every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn get_options_descending() -> GetOptions {
    GetOptions::new().with_sort(SortTarget::Key, SortOrder::Descend)
}

impl Store for EtcdStore {
    fn export(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        // The election key and the members are the group's, not the fleet's.
        Ok(self
            .export_all()?
            .into_iter()
            .filter(|(k, _)| k != "leader" && !k.starts_with("members/"))
            .collect())
    }

    fn revision(&self) -> Result<u64, StoreError> {
        match self.get_raw(&self.key("meta/revision"), "reading the revision")? {
            Some(bytes) => self.decode("meta", "revision", &bytes),
            None => Ok(0),
        }
    }

    fn changes(&self, after: u64, limit: usize) -> Result<ChangePage, StoreError> {
        const OP: &str = "reading changes";
        let current = self.revision()?;
        let prefix = self.key("changes/");
        let end = prefix_end(&prefix);
        let mut client = self.client.clone();
        let first = prefix.clone();
        let oldest_resp = self.block(OP, async move {
            client
                .get(
                    first,
                    Some(
                        GetOptions::new()
                            .with_range(prefix_end(&prefix))
                            .with_limit(1),
                    ),
                )
                .await
        })?;
        let oldest = match oldest_resp.kvs().first() {
            Some(kv) => Some(self.change_revision(kv.key())?),
            None => None,
        };
        let start = self.change_key(after.saturating_add(1));
        let mut writes = Vec::new();
        let mut client = self.client.clone();
        let options = GetOptions::new()
            .with_range(end)
            .with_limit(limit.min(i64::MAX as usize) as i64);
        let resp = self.block(OP, async move { client.get(start, Some(options)).await })?;
        for kv in resp.kvs() {
            let revision = self.change_revision(kv.key())?;
            let touched: Vec<Touched> =
                self.decode(CHANGES_NAME, &revision.to_string(), kv.value())?;
            writes.push((revision, touched));
        }
        Ok(revision::page(current, oldest, after, writes.into_iter()))
    }

    fn writable(&self) -> Result<(), StoreError> {
        if self.fenced {
            let fence = read(&self.fence).clone();
            match fence {
                None => {
                    return Err(StoreError::Fenced {
                        op: "checking that the store can write",
                        reason: "this controller is not the leader".into(),
                    });
                }
                Some(f) if f.lost.is_cancelled() => {
                    return Err(StoreError::Fenced {
                        op: "checking that the store can write",
                        reason: "this controller lost its leadership".into(),
                    });
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn put_node_pool(&self, pool: &PoolManifestRecord) -> Result<(), StoreError> {
        self.put(NODE_POOLS, &pool.name, pool, "saving a node pool")
    }

    fn node_pools(&self) -> Result<Vec<PoolManifestRecord>, StoreError> {
        self.all(NODE_POOLS, "listing node pools")
    }

    fn delete_node_pool(&self, name: &str) -> Result<bool, StoreError> {
        self.remove(NODE_POOLS, name, "deleting a node pool")
    }

    fn put_secret(&self, secret: &SecretRecord) -> Result<(), StoreError> {
        self.put(SECRETS, &secret.name, secret, "saving a secret")
    }

    fn secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        self.all(SECRETS, "listing secrets")
    }

    fn delete_secret(&self, name: &str) -> Result<bool, StoreError> {
        self.remove(SECRETS, name, "deleting a secret")
    }

    fn put_image(&self, image: &ImageRecord) -> Result<(), StoreError> {
        self.put(IMAGES, &image.key(), image, "saving an image tag")
    }

    fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.all(IMAGES, "listing images")
    }

    fn delete_image(&self, key: &str) -> Result<bool, StoreError> {
        self.remove(IMAGES, key, "deleting an image tag")
    }

    fn put_node_template(&self, template: &PoolManifestRecord) -> Result<(), StoreError> {
        self.put(
            NODE_TEMPLATES,
            &template.name,
            template,
            "saving a node template",
        )
    }

    fn node_templates(&self) -> Result<Vec<PoolManifestRecord>, StoreError> {
        self.all(NODE_TEMPLATES, "listing node templates")
    }

    fn delete_node_template(&self, name: &str) -> Result<bool, StoreError> {
        self.remove(NODE_TEMPLATES, name, "deleting a node template")
    }

    fn put_vm_template(&self, template: &PoolManifestRecord) -> Result<(), StoreError> {
        self.put(
            VM_TEMPLATES,
            &template.name,
            template,
            "saving a VM template",
        )
    }

    fn vm_templates(&self) -> Result<Vec<PoolManifestRecord>, StoreError> {
        self.all(VM_TEMPLATES, "listing VM templates")
    }

    fn delete_vm_template(&self, name: &str) -> Result<bool, StoreError> {
        self.remove(VM_TEMPLATES, name, "deleting a VM template")
    }

    fn put_alerting(
        &self,
        kind: AlertingKind,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.put(kind.table(), key, value, "saving an alerting record")
    }

    fn alerting(&self, kind: AlertingKind) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        self.keyed(kind.table(), "listing alerting records")
    }

    fn delete_alerting(&self, kind: AlertingKind, key: &str) -> Result<bool, StoreError> {
        self.remove(kind.table(), key, "deleting an alerting record")
    }

    fn put_policy(&self, policy: &PolicyRecord) -> Result<(), StoreError> {
        self.put(POLICIES, &policy.name, policy, "saving a policy")
    }

    fn policies(&self) -> Result<Vec<PolicyRecord>, StoreError> {
        self.all(POLICIES, "listing policies")
    }

    fn delete_policy(&self, name: &str) -> Result<bool, StoreError> {
        self.remove(POLICIES, name, "deleting a policy")
    }

    fn put_api_token(&self, token: &ApiTokenRecord) -> Result<(), StoreError> {
        self.put(API_TOKENS, &token.id, token, "saving an API token")
    }

    fn api_token(&self, id: &str) -> Result<Option<ApiTokenRecord>, StoreError> {
        self.get(API_TOKENS, id, "reading an API token")
    }

    fn api_tokens(&self) -> Result<Vec<ApiTokenRecord>, StoreError> {
        self.all(API_TOKENS, "listing API tokens")
    }

    fn append_events(&self, events: &[Event], retain: usize) -> Result<(), StoreError> {
        const OP: &str = "appending events";
        if events.is_empty() {
            return Ok(());
        }
        let mut puts = Vec::with_capacity(events.len());
        for e in events {
            puts.push(TxnOp::put(
                self.event_key(e.seq),
                self.encode(EVENTS_NAME, &e.seq.to_string(), e)?,
                None,
            ));
        }
        // Positions are consecutive: keep the last `retain` of them.
        let newest = events.iter().map(|e| e.seq).max().unwrap_or(0);
        let cut = newest.saturating_add(1).saturating_sub(retain as u64);
        let touched: Vec<Touched> = events
            .iter()
            .map(|e| Touched::put(EVENTS_NAME, e.seq.to_string()))
            .collect();
        let start = self.key("events/");
        let cut_key = self.event_key(cut);
        self.commit(OP, &[], |_| {
            let mut ops = puts.clone();
            if cut > 0 {
                ops.push(TxnOp::delete(
                    start.clone(),
                    Some(DeleteOptions::new().with_range(cut_key.clone())),
                ));
            }
            Ok::<_, StoreError>(Plan {
                ops,
                touched: touched.clone(),
                result: (),
            })
        })
    }

    fn events(&self, query: &EventQuery) -> Result<EventScan, StoreError> {
        const OP: &str = "reading events";
        let last = self.last_event_seq()?;
        let start = self.event_key(query.after.saturating_add(1));
        let end = prefix_end(&self.key("events/"));
        // At most MAX_SCAN + 1 entries are looked at.
        let wanted = (EventQuery::MAX_SCAN + 1) as i64;
        let mut options = GetOptions::new().with_range(end).with_limit(wanted);
        if query.newest {
            options = options.with_sort(SortTarget::Key, SortOrder::Descend);
        }
        let mut client = self.client.clone();
        let resp = self.block(OP, async move { client.get(start, Some(options)).await })?;
        let entries = resp.kvs().iter().map(|kv| {
            let key = String::from_utf8_lossy(kv.key());
            let seq: u64 = key
                .rsplit('/')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let event: Event = self.decode(EVENTS_NAME, &seq.to_string(), kv.value())?;
            Ok((seq, event))
        });
        scan_events(entries, query, last)
    }

    fn last_event_seq(&self) -> Result<u64, StoreError> {
        let start = self.key("events/");
        let options = get_options_descending()
            .with_range(prefix_end(&start))
            .with_limit(1)
            .with_keys_only();
        let mut client = self.client.clone();
        let resp = self.block("reading the last event", async move {
            client.get(start, Some(options)).await
        })?;
        Ok(resp
            .kvs()
            .first()
            .and_then(|kv| {
                String::from_utf8_lossy(kv.key())
                    .rsplit('/')
                    .next()
                    .and_then(|s| s.parse().ok())
            })
            .unwrap_or(0))
    }

    fn put_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        self.put(JOBS, &job.name, job, "saving a job")
    }

    fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.all(JOBS, "listing jobs")
    }

    fn delete_job(&self, name: &str) -> Result<bool, StoreError> {
        self.remove(JOBS, name, "deleting a job")
    }

    fn save_allocations(&self, put: &[AllocRecord], delete: &[String]) -> Result<(), StoreError> {
        const OP: &str = "saving allocations";
        let mut ops = Vec::with_capacity(put.len() + delete.len());
        for a in put {
            ops.push(TxnOp::put(
                self.table_key(ALLOCATIONS, &a.id),
                self.encode(ALLOCATIONS.name, &a.id, a)?,
                None,
            ));
        }
        for id in delete {
            ops.push(TxnOp::delete(self.table_key(ALLOCATIONS, id), None));
        }
        let mut touched: Vec<Touched> = put
            .iter()
            .map(|a| Touched::put(ALLOCATIONS.name, &a.id))
            .collect();
        touched.extend(
            delete
                .iter()
                .map(|id| Touched::delete(ALLOCATIONS.name, id)),
        );
        self.commit(OP, &[], |_| {
            Ok::<_, StoreError>(Plan {
                ops: ops.clone(),
                touched: touched.clone(),
                result: (),
            })
        })
    }

    fn allocations(&self) -> Result<Vec<AllocRecord>, StoreError> {
        self.all(ALLOCATIONS, "listing allocations")
    }

    fn upsert_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        self.put(NODES, &node.name, node, "saving a node")
    }

    fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        self.get(NODES, name, "reading a node")
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.all(NODES, "listing nodes")
    }

    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.put(TOKENS, &token.id, token, "saving a join token")
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.all(TOKENS, "listing join tokens")
    }

    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.get(TOKENS, id, "reading a join token")
    }

    fn consume_token(
        &self,
        token: &JoinToken,
        now: SystemTime,
    ) -> Result<TokenRecord, ConsumeError> {
        const OP: &str = "consuming a join token";
        let k = self.table_key(TOKENS, token.id());
        self.commit(OP, std::slice::from_ref(&k), |values| {
            let record: Option<TokenRecord> = match &values[0] {
                Some(bytes) => Some(self.decode(TOKENS.name, token.id(), bytes)?),
                None => None,
            };
            let updated = use_token(record, token, now)?;
            Ok::<_, ConsumeError>(Plan {
                ops: vec![TxnOp::put(
                    k.clone(),
                    self.encode(TOKENS.name, &updated.id, &updated)?,
                    None,
                )],
                touched: vec![Touched::put(TOKENS.name, &updated.id)],
                result: updated,
            })
        })
    }

    fn next_link_epoch(&self) -> Result<u64, StoreError> {
        const OP: &str = "raising the link epoch";
        let k = self.key("meta/link_epoch");
        self.commit(OP, std::slice::from_ref(&k), |values| {
            let epoch: u64 = match &values[0] {
                Some(bytes) => self.decode("meta", LINK_EPOCH_KEY, bytes)?,
                None => 0,
            } + 1;
            Ok::<_, StoreError>(Plan {
                ops: vec![TxnOp::put(
                    k.clone(),
                    self.encode("meta", LINK_EPOCH_KEY, &epoch)?,
                    None,
                )],
                touched: vec![Touched::put(META.name, LINK_EPOCH_KEY)],
                result: epoch,
            })
        })
    }

    fn revoke(&self, revocation: &Revocation) -> Result<(), StoreError> {
        self.put(
            REVOCATIONS,
            &revocation.name,
            revocation,
            "saving a revocation",
        )
    }

    fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        self.all(REVOCATIONS, "listing revocations")
    }

    fn revoke_cert(&self, revocation: &CertRevocation) -> Result<CertRevocation, StoreError> {
        const OP: &str = "saving a certificate revocation";
        let k = self.table_key(CERT_REVOCATIONS, &revocation.serial);
        self.commit(OP, std::slice::from_ref(&k), |values| {
            if let Some(bytes) = &values[0] {
                let earlier: CertRevocation =
                    self.decode(CERT_REVOCATIONS.name, &revocation.serial, bytes)?;
                return Ok(Plan {
                    ops: vec![],
                    touched: vec![],
                    result: earlier,
                });
            }
            Ok::<_, StoreError>(Plan {
                ops: vec![TxnOp::put(
                    k.clone(),
                    self.encode(CERT_REVOCATIONS.name, &revocation.serial, revocation)?,
                    None,
                )],
                touched: vec![Touched::put(CERT_REVOCATIONS.name, &revocation.serial)],
                result: revocation.clone(),
            })
        })
    }

    fn cert_revocations(&self) -> Result<Vec<CertRevocation>, StoreError> {
        self.all(CERT_REVOCATIONS, "listing certificate revocations")
    }

    fn save_metric_marks(&self, marks: &[(String, MetricMark)]) -> Result<(), StoreError> {
        const OP: &str = "saving metrics marks";
        let mut ops = Vec::with_capacity(marks.len());
        for (node, mark) in marks {
            ops.push(TxnOp::put(
                self.table_key(METRIC_MARKS, node),
                self.encode(METRIC_MARKS.name, node, mark)?,
                None,
            ));
        }
        // Not logged: see the module documentation of `revision`.
        self.commit(OP, &[], |_| {
            Ok::<_, StoreError>(Plan {
                ops: ops.clone(),
                touched: Vec::new(),
                result: (),
            })
        })
    }

    fn metric_marks(&self) -> Result<HashMap<String, MetricMark>, StoreError> {
        Ok(self
            .keyed(METRIC_MARKS, "reading metrics marks")?
            .into_iter()
            .collect())
    }
}

impl EtcdStore {
    fn change_revision(&self, key: &[u8]) -> Result<u64, StoreError> {
        let text = String::from_utf8_lossy(key);
        text.rsplit('/')
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| StoreError::Corrupt {
                path: self.path(),
                table: CHANGES_NAME,
                key: text.into_owned(),
                reason: "not a revision number".into(),
            })
    }
}

/// A throwaway etcd member for tests: `etcd` from Debian's `etcd-server` on free
/// loopback ports, in a temporary directory, killed on drop.
#[cfg(test)]
pub mod testing {
    use std::net::TcpListener;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    /// A running single-member etcd.
    #[derive(Debug)]
    pub struct TestEtcd {
        child: Child,
        /// Its client URL.
        pub endpoint: String,
        _dir: tempfile::TempDir,
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port")
    }

    impl TestEtcd {
        /// Starts one and waits until it answers. Panics naming the setup step
        /// when `etcd` is not installed, and with etcd's own log when it does
        /// not start. A port taken between choosing it and etcd binding it
        /// (other tests start their own at the same time) is chosen again:
        /// a CI run saw an etcd that never listened, its log discarded.
        pub fn start() -> TestEtcd {
            let dir = tempfile::tempdir().expect("temp dir");
            let log_path = dir.path().join("etcd.log");
            let said = || std::fs::read_to_string(&log_path).unwrap_or_default();
            for attempt in 1..=3 {
                let (client, peer) = (free_port(), free_port());
                let endpoint = format!("http://127.0.0.1:{client}");
                let log = std::fs::File::create(&log_path).expect("etcd's log file");
                let mut child = Command::new("etcd")
                    .args([
                        "--name",
                        "test",
                        "--data-dir",
                        &dir.path().join("data").display().to_string(),
                        "--listen-client-urls",
                        &endpoint,
                        "--advertise-client-urls",
                        &endpoint,
                        "--listen-peer-urls",
                        &format!("http://127.0.0.1:{peer}"),
                        "--initial-advertise-peer-urls",
                        &format!("http://127.0.0.1:{peer}"),
                        "--initial-cluster",
                        &format!("test=http://127.0.0.1:{peer}"),
                        "--max-txn-ops",
                        "10000",
                        "--max-request-bytes",
                        "10485760",
                        "--log-level",
                        "error",
                    ])
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .unwrap_or_else(|e| {
                        panic!(
                            "cannot run etcd ({e}): install it with `bash .ci/setup system` (Debian's etcd-server)"
                        )
                    });
                // Slow under a full test run on two cores, never this slow.
                let deadline = Instant::now() + Duration::from_secs(60);
                let addr = format!("127.0.0.1:{client}");
                loop {
                    if std::net::TcpStream::connect(&addr).is_ok() {
                        return TestEtcd {
                            child,
                            endpoint,
                            _dir: dir,
                        };
                    }
                    if let Ok(Some(status)) = child.try_wait() {
                        let said = said();
                        if said.contains("address already in use") && attempt < 3 {
                            break;
                        }
                        panic!("etcd exited ({status}) before it listened: {said}");
                    }
                    if Instant::now() >= deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        panic!("etcd did not listen within 60 s: {}", said());
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            unreachable!("the last attempt returns or panics")
        }
    }

    impl Drop for TestEtcd {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

//! [`MemoryStore`]: the [`Store`] in memory, for tests and simulations.

use super::*;
use novacron_common::sync::lock;

/// A [`Store`] in memory, for tests and simulations. It behaves as [`RedbStore`]
/// does, without a file.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<MemoryState>,
    /// Simulates a full disk: every write fails with `ENOSPC` while set.
    full: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct MemoryState {
    link_epoch: u64,
    nodes: BTreeMap<String, NodeRecord>,
    tokens: BTreeMap<String, TokenRecord>,
    revocations: BTreeMap<String, Revocation>,
    cert_revocations: BTreeMap<String, CertRevocation>,
    metric_marks: HashMap<String, MetricMark>,
    jobs: BTreeMap<String, JobRecord>,
    allocations: BTreeMap<String, AllocRecord>,
    events: BTreeMap<u64, Event>,
    api_tokens: BTreeMap<String, ApiTokenRecord>,
    policies: BTreeMap<String, PolicyRecord>,
    node_pools: BTreeMap<String, PoolManifestRecord>,
    node_templates: BTreeMap<String, PoolManifestRecord>,
    vm_templates: BTreeMap<String, PoolManifestRecord>,
    secrets: BTreeMap<String, SecretRecord>,
    images: BTreeMap<String, ImageRecord>,
    alerting: BTreeMap<(&'static str, String), serde_json::Value>,
    /// The revision and the change log.
    log: ChangeLog,
}

impl MemoryState {
    /// Runs `remove` and logs the removal of `table/key` when it removed a record.
    fn removed(
        &mut self,
        table: &str,
        key: &str,
        remove: impl FnOnce(&mut MemoryState) -> bool,
    ) -> bool {
        let existed = remove(self);
        if existed {
            self.log.record(vec![Touched::delete(table, key)]);
        }
        existed
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Simulates a full disk (for simulations and tests): while `full`, every
    /// write fails with `ENOSPC` and changes nothing, as a full redb file does.
    pub fn set_full(&self, full: bool) {
        self.full.store(full, std::sync::atomic::Ordering::SeqCst);
    }

    fn check_space(&self, op: &'static str) -> Result<(), StoreError> {
        if !self.full.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        Err(StoreError::Database {
            path: PathBuf::from("(memory)"),
            op,
            source: Box::new(redb::Error::Io(std::io::Error::from_raw_os_error(ENOSPC))),
        })
    }

    fn state(&self) -> MutexGuard<'_, MemoryState> {
        // Every update below is a single assignment, so a panic elsewhere while the
        // lock was held cannot have left the state half-written.
        lock(&self.state)
    }
}

impl Store for MemoryStore {
    fn put_node_pool(&self, pool: &PoolManifestRecord) -> Result<(), StoreError> {
        self.check_space("put_node_pool")?;
        let mut state = self.state();
        state.node_pools.insert(pool.name.clone(), pool.clone());
        state
            .log
            .record(vec![Touched::put("node_pools", &pool.name)]);
        Ok(())
    }

    fn node_pools(&self) -> Result<Vec<PoolManifestRecord>, StoreError> {
        Ok(self.state().node_pools.values().cloned().collect())
    }

    fn delete_node_pool(&self, name: &str) -> Result<bool, StoreError> {
        self.check_space("delete_node_pool")?;
        let mut state = self.state();
        Ok(state.removed("node_pools", name, |s| s.node_pools.remove(name).is_some()))
    }

    fn put_image(&self, image: &ImageRecord) -> Result<(), StoreError> {
        self.check_space("put_image")?;
        let mut state = self.state();
        state.images.insert(image.key(), image.clone());
        state.log.record(vec![Touched::put("images", image.key())]);
        Ok(())
    }

    fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        Ok(self.state().images.values().cloned().collect())
    }

    fn delete_image(&self, key: &str) -> Result<bool, StoreError> {
        self.check_space("delete_image")?;
        let mut state = self.state();
        Ok(state.removed("images", key, |s| s.images.remove(key).is_some()))
    }

    fn put_secret(&self, secret: &SecretRecord) -> Result<(), StoreError> {
        self.check_space("put_secret")?;
        let mut state = self.state();
        state.secrets.insert(secret.name.clone(), secret.clone());
        state
            .log
            .record(vec![Touched::put("secrets", &secret.name)]);
        Ok(())
    }

    fn secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        Ok(self.state().secrets.values().cloned().collect())
    }

    fn delete_secret(&self, name: &str) -> Result<bool, StoreError> {
        self.check_space("delete_secret")?;
        let mut state = self.state();
        Ok(state.removed("secrets", name, |s| s.secrets.remove(name).is_some()))
    }

    fn put_node_template(&self, template: &PoolManifestRecord) -> Result<(), StoreError> {
        self.check_space("put_node_template")?;
        let mut state = self.state();
        state
            .node_templates
            .insert(template.name.clone(), template.clone());
        state
            .log
            .record(vec![Touched::put("node_templates", &template.name)]);
        Ok(())
    }

    fn node_templates(&self) -> Result<Vec<PoolManifestRecord>, StoreError> {
        Ok(self.state().node_templates.values().cloned().collect())
    }

    fn delete_node_template(&self, name: &str) -> Result<bool, StoreError> {
        self.check_space("delete_node_template")?;
        let mut state = self.state();
        Ok(state.removed("node_templates", name, |s| {
            s.node_templates.remove(name).is_some()
        }))
    }

    fn put_vm_template(&self, template: &PoolManifestRecord) -> Result<(), StoreError> {
        self.check_space("put_vm_template")?;
        let mut state = self.state();
        state
            .vm_templates
            .insert(template.name.clone(), template.clone());
        state
            .log
            .record(vec![Touched::put("vm_templates", &template.name)]);
        Ok(())
    }

    fn vm_templates(&self) -> Result<Vec<PoolManifestRecord>, StoreError> {
        Ok(self.state().vm_templates.values().cloned().collect())
    }

    fn delete_vm_template(&self, name: &str) -> Result<bool, StoreError> {
        self.check_space("delete_vm_template")?;
        let mut state = self.state();
        Ok(state.removed("vm_templates", name, |s| {
            s.vm_templates.remove(name).is_some()
        }))
    }

    fn put_alerting(
        &self,
        kind: AlertingKind,
        key: &str,
        value: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.check_space("put_alerting")?;
        let table = kind.table().name;
        let mut state = self.state();
        state
            .alerting
            .insert((table, key.to_string()), value.clone());
        state.log.record(vec![Touched::put(table, key)]);
        Ok(())
    }

    fn alerting(&self, kind: AlertingKind) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        let table = kind.table().name;
        Ok(self
            .state()
            .alerting
            .iter()
            .filter(|((t, _), _)| *t == table)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect())
    }

    fn delete_alerting(&self, kind: AlertingKind, key: &str) -> Result<bool, StoreError> {
        self.check_space("delete_alerting")?;
        let table = kind.table().name;
        let mut state = self.state();
        Ok(state.removed(table, key, |s| {
            s.alerting.remove(&(table, key.to_string())).is_some()
        }))
    }

    fn put_policy(&self, policy: &PolicyRecord) -> Result<(), StoreError> {
        self.check_space("put_policy")?;
        let mut state = self.state();
        state.policies.insert(policy.name.clone(), policy.clone());
        state
            .log
            .record(vec![Touched::put("policies", &policy.name)]);
        Ok(())
    }

    fn policies(&self) -> Result<Vec<PolicyRecord>, StoreError> {
        Ok(self.state().policies.values().cloned().collect())
    }

    fn delete_policy(&self, name: &str) -> Result<bool, StoreError> {
        self.check_space("delete_policy")?;
        let mut state = self.state();
        Ok(state.removed("policies", name, |s| s.policies.remove(name).is_some()))
    }

    fn put_api_token(&self, token: &ApiTokenRecord) -> Result<(), StoreError> {
        self.check_space("put_api_token")?;
        let mut state = self.state();
        state.api_tokens.insert(token.id.clone(), token.clone());
        state
            .log
            .record(vec![Touched::put("api_tokens", &token.id)]);
        Ok(())
    }

    fn api_token(&self, id: &str) -> Result<Option<ApiTokenRecord>, StoreError> {
        Ok(self.state().api_tokens.get(id).cloned())
    }

    fn api_tokens(&self) -> Result<Vec<ApiTokenRecord>, StoreError> {
        Ok(self.state().api_tokens.values().cloned().collect())
    }

    fn append_events(&self, events: &[Event], retain: usize) -> Result<(), StoreError> {
        self.check_space("append_events")?;
        let mut state = self.state();
        for e in events {
            state.events.insert(e.seq, e.clone());
        }
        while state.events.len() > retain {
            state.events.pop_first();
        }
        let touched = events
            .iter()
            .map(|e| Touched::put("events", e.seq.to_string()))
            .collect();
        state.log.record(touched);
        Ok(())
    }

    fn events(&self, query: &EventQuery) -> Result<EventScan, StoreError> {
        let state = self.state();
        let last = state.events.keys().next_back().copied().unwrap_or(0);
        let range = state.events.range(query.after.saturating_add(1)..);
        let owned = |(seq, e): (&u64, &Event)| Ok((*seq, e.clone()));
        if query.newest {
            scan_events(range.rev().map(owned), query, last)
        } else {
            scan_events(range.map(owned), query, last)
        }
    }

    fn last_event_seq(&self) -> Result<u64, StoreError> {
        Ok(self.state().events.keys().next_back().copied().unwrap_or(0))
    }

    fn put_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        self.check_space("put_job")?;
        let mut state = self.state();
        state.jobs.insert(job.name.clone(), job.clone());
        state.log.record(vec![Touched::put("jobs", &job.name)]);
        Ok(())
    }

    fn jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        Ok(self.state().jobs.values().cloned().collect())
    }

    fn delete_job(&self, name: &str) -> Result<bool, StoreError> {
        self.check_space("delete_job")?;
        let mut state = self.state();
        Ok(state.removed("jobs", name, |s| s.jobs.remove(name).is_some()))
    }

    fn save_allocations(&self, put: &[AllocRecord], delete: &[String]) -> Result<(), StoreError> {
        self.check_space("save_allocations")?;
        let mut state = self.state();
        for a in put {
            state.allocations.insert(a.id.clone(), a.clone());
        }
        for id in delete {
            state.allocations.remove(id);
        }
        let mut touched: Vec<Touched> = put
            .iter()
            .map(|a| Touched::put("allocations", &a.id))
            .collect();
        touched.extend(delete.iter().map(|id| Touched::delete("allocations", id)));
        state.log.record(touched);
        Ok(())
    }

    fn allocations(&self) -> Result<Vec<AllocRecord>, StoreError> {
        Ok(self.state().allocations.values().cloned().collect())
    }

    fn upsert_node(&self, node: &NodeRecord) -> Result<(), StoreError> {
        self.check_space("upsert_node")?;
        let mut state = self.state();
        state.nodes.insert(node.name.clone(), node.clone());
        state.log.record(vec![Touched::put("nodes", &node.name)]);
        Ok(())
    }

    fn node(&self, name: &str) -> Result<Option<NodeRecord>, StoreError> {
        Ok(self.state().nodes.get(name).cloned())
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        Ok(self.state().nodes.values().cloned().collect())
    }

    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.check_space("put_token")?;
        let mut state = self.state();
        state.tokens.insert(token.id.clone(), token.clone());
        state.log.record(vec![Touched::put("tokens", &token.id)]);
        Ok(())
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        Ok(self.state().tokens.values().cloned().collect())
    }

    fn token(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        Ok(self.state().tokens.get(id).cloned())
    }

    fn consume_token(
        &self,
        token: &JoinToken,
        now: SystemTime,
    ) -> Result<TokenRecord, ConsumeError> {
        self.check_space("consume_token")?;
        let mut state = self.state();
        let updated = use_token(state.tokens.get(token.id()).cloned(), token, now)?;
        state.tokens.insert(updated.id.clone(), updated.clone());
        state.log.record(vec![Touched::put("tokens", &updated.id)]);
        Ok(updated)
    }

    fn next_link_epoch(&self) -> Result<u64, StoreError> {
        self.check_space("next_link_epoch")?;
        let mut state = self.state();
        state.link_epoch += 1;
        state.log.record(vec![Touched::put("meta", "link_epoch")]);
        Ok(state.link_epoch)
    }

    fn revoke(&self, revocation: &Revocation) -> Result<(), StoreError> {
        self.check_space("revoke")?;
        let mut state = self.state();
        state
            .revocations
            .insert(revocation.name.clone(), revocation.clone());
        state
            .log
            .record(vec![Touched::put("revocations", &revocation.name)]);
        Ok(())
    }

    fn revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        Ok(self.state().revocations.values().cloned().collect())
    }

    fn revoke_cert(&self, revocation: &CertRevocation) -> Result<CertRevocation, StoreError> {
        self.check_space("revoke_cert")?;
        let mut state = self.state();
        if let Some(first) = state.cert_revocations.get(&revocation.serial) {
            return Ok(first.clone());
        }
        state
            .cert_revocations
            .insert(revocation.serial.clone(), revocation.clone());
        let touched = vec![Touched::put("cert_revocations", &revocation.serial)];
        state.log.record(touched);
        Ok(revocation.clone())
    }

    fn cert_revocations(&self) -> Result<Vec<CertRevocation>, StoreError> {
        Ok(self.state().cert_revocations.values().cloned().collect())
    }

    fn save_metric_marks(&self, marks: &[(String, MetricMark)]) -> Result<(), StoreError> {
        self.check_space("save_metric_marks")?;
        let mut state = self.state();
        for (node, mark) in marks {
            state.metric_marks.insert(node.clone(), *mark);
        }
        Ok(())
    }

    fn metric_marks(&self) -> Result<HashMap<String, MetricMark>, StoreError> {
        Ok(self.state().metric_marks.clone())
    }

    fn revision(&self) -> Result<u64, StoreError> {
        Ok(self.state().log.revision())
    }

    fn changes(&self, after: u64, limit: usize) -> Result<ChangePage, StoreError> {
        Ok(self.state().log.since(after, limit))
    }

    fn writable(&self) -> Result<(), StoreError> {
        self.check_space("checking that the store can write")
    }
}

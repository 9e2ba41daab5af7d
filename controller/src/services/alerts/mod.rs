//! Alerting on the leading controller: the rules and channels operators apply
//! (`AlertRule`, `NotificationChannel`) plus the built-in rules, evaluated every
//! [`AlertSettings::interval`] on the metrics history and the controller's state
//! ([`facts`]); the state machine and the notification plan are the core's
//! ([`novacron_common::alert`]). Active alerts, silences and the notification
//! outbox are in the store before anything is sent ([`deliver`]), so a restart
//! or a failover loses no alert and no notification.

pub mod deliver;
pub mod facts;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use novacron_api::{
    AlertApplyResult, AlertExport, AlertRuleView, AlertView, ChannelView, SilenceRequest,
    SilenceView,
};
use novacron_common::alert::engine::{self, Instance, Notification, Silence, Transition};
use novacron_common::alert::{AlertRule, Change, Channel, Target, export, rule};
use novacron_common::clock::unix_ms;
use novacron_common::sync::lock;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::services::events::{CONTROLLER, EventLog, NewEvent, kind};
use crate::state::store::{AlertingKind, Store, StoreError};

/// How often rules are evaluated by default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// The shortest evaluation interval.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Most notifications waiting; the oldest is given up past this.
pub const MAX_OUTBOX: usize = 10_000;
/// Most user rules and most channels.
pub const MAX_RULES: usize = 5_000;
/// Restart counts kept per allocation for `alloc.restarts_recent`.
const MAX_RESTART_COUNTS: usize = 1024;
/// The longest silence.
pub const MAX_SILENCE: Duration = Duration::from_secs(30 * 86_400);

/// `[alerts]` in controller.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertSettings {
    /// How often rules are evaluated (default 10s, at least 1s).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for AlertSettings {
    fn default() -> AlertSettings {
        AlertSettings {
            interval: DEFAULT_INTERVAL,
        }
    }
}

impl AlertSettings {
    /// What is wrong, as the expected value.
    pub fn validate(&self) -> Result<(), String> {
        if self.interval < MIN_INTERVAL || self.interval > Duration::from_secs(3600) {
            return Err("interval between 1s and 1h".into());
        }
        Ok(())
    }
}

/// A manifest as kept: the file it came from, whole, and who applied it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ManifestRecord {
    source: String,
    file: String,
    applied_by: String,
    applied_at_unix_ms: u64,
}

impl ManifestRecord {
    fn new(file: &str, text: &str, by: &str, now: SystemTime) -> ManifestRecord {
        ManifestRecord {
            source: text.to_string(),
            file: file.to_string(),
            applied_by: by.to_string(),
            applied_at_unix_ms: unix_ms(now),
        }
    }
}

/// A notification not yet delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    /// Its key in the store (ordered by creation).
    pub id: String,
    /// What to send.
    pub notification: Notification,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Not before (Unix ms).
    pub next_attempt_ms: u64,
    /// The newest failure.
    pub last_error: Option<String>,
}

/// What an alerting call could not do.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    /// The manifest or request is invalid; the message says where.
    #[error("{0}")]
    Invalid(String),
    /// No such rule, channel, silence or alert.
    #[error("{0}")]
    Unknown(String),
    /// A built-in rule cannot be changed.
    #[error("{0}")]
    Builtin(String),
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Default)]
struct Inner {
    rules: BTreeMap<String, (AlertRule, ManifestRecord)>,
    channels: BTreeMap<String, (Channel, ManifestRecord)>,
    states: BTreeMap<String, BTreeMap<String, Instance>>,
    silences: Vec<Silence>,
    outbox: BTreeMap<String, OutboxEntry>,
    /// Per allocation: (Unix ms, restarts) seen in the last hour.
    restarts: HashMap<String, VecDeque<(u64, u32)>>,
    /// Per channel: the newest delivery error.
    last_error: BTreeMap<String, String>,
}

/// The alert service.
pub struct Alerts {
    store: Arc<dyn Store>,
    events: Arc<EventLog>,
    settings: AlertSettings,
    external_url: String,
    builtins: Vec<AlertRule>,
    inner: Mutex<Inner>,
    wake: tokio::sync::Notify,
    seq: AtomicU64,
    /// When the state was last loaded (Unix ms): the warm-up starts there.
    loaded_ms: AtomicU64,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn to_json<T: Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}

impl Alerts {
    /// The service, with what the store holds.
    pub fn open(
        store: Arc<dyn Store>,
        events: Arc<EventLog>,
        settings: AlertSettings,
        external_url: String,
    ) -> Result<Arc<Alerts>, StoreError> {
        let a = Arc::new(Alerts {
            store,
            events,
            settings,
            external_url,
            builtins: rule::builtin_rules(),
            inner: Mutex::new(Inner::default()),
            wake: tokio::sync::Notify::new(),
            seq: AtomicU64::new(0),
            loaded_ms: AtomicU64::new(0),
        });
        // The leader's loop loads again at the start of each term, and waits
        // until it can: a store that cannot be read here must not stop the
        // controller from starting.
        if let Err(error) = a.load() {
            warn!(%error, "cannot load the alerting state yet");
        }
        Ok(a)
    }

    /// The evaluation interval.
    pub fn interval(&self) -> Duration {
        self.settings.interval
    }

    /// Reads everything from the store again (a new term may follow another
    /// controller's). A record that no longer parses is skipped with a warning.
    pub fn load(&self) -> Result<(), StoreError> {
        let mut inner = Inner::default();
        for (name, v) in self.store.alerting(AlertingKind::Rules)? {
            let Ok(rec) = serde_json::from_value::<ManifestRecord>(v) else {
                warn!(rule = %name, "unreadable alert rule record skipped");
                continue;
            };
            match rule::parse_rules(&rec.file, &rec.source)
                .map(|rs| rs.into_iter().find(|r| r.name == name))
            {
                Ok(Some(r)) => {
                    inner.rules.insert(name, (r, rec));
                }
                Ok(None) => warn!(rule = %name, "stored alert rule is missing from its source"),
                Err(e) => warn!(rule = %name, error = %e, "stored alert rule no longer parses"),
            }
        }
        for (name, v) in self.store.alerting(AlertingKind::Channels)? {
            let Ok(rec) = serde_json::from_value::<ManifestRecord>(v) else {
                warn!(channel = %name, "unreadable channel record skipped");
                continue;
            };
            match rule::parse_channels(&rec.file, &rec.source)
                .map(|cs| cs.into_iter().find(|c| c.name == name))
            {
                Ok(Some(c)) => {
                    inner.channels.insert(name, (c, rec));
                }
                _ => warn!(channel = %name, "stored channel no longer parses"),
            }
        }
        for (name, v) in self.store.alerting(AlertingKind::States)? {
            match serde_json::from_value(v) {
                Ok(s) => {
                    inner.states.insert(name, s);
                }
                Err(e) => warn!(rule = %name, error = %e, "unreadable alert state skipped"),
            }
        }
        for (_, v) in self.store.alerting(AlertingKind::Silences)? {
            if let Ok(s) = serde_json::from_value(v) {
                inner.silences.push(s);
            }
        }
        for (id, v) in self.store.alerting(AlertingKind::Outbox)? {
            match serde_json::from_value::<OutboxEntry>(v) {
                Ok(e) => {
                    inner.outbox.insert(id, e);
                }
                Err(e) => warn!(%id, error = %e, "unreadable outbox entry skipped"),
            }
        }
        *lock(&self.inner) = inner;
        self.loaded_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
        Ok(())
    }

    /// How long after a load missing data keeps every alert as it is: the
    /// history's newest points may have been lost with the previous process,
    /// and agents take a moment to report to a new leader.
    pub fn warm_up(&self) -> Duration {
        Duration::from_millis(facts::INSTANT_LOOKBACK_MS).max(3 * self.settings.interval)
    }

    /// Every rule: the built-in ones first, then the applied ones by name.
    pub fn rules(&self) -> Vec<AlertRule> {
        let inner = lock(&self.inner);
        self.builtins
            .iter()
            .cloned()
            .chain(inner.rules.values().map(|(r, _)| r.clone()))
            .collect()
    }

    /// Applies a file of `AlertRule`s (all or nothing).
    pub fn apply_rules(
        &self,
        file: &str,
        text: &str,
        by: &str,
        now: SystemTime,
    ) -> Result<Vec<AlertApplyResult>, AlertError> {
        let rules =
            rule::parse_rules(file, text).map_err(|e| AlertError::Invalid(e.to_string()))?;
        let named = rules.into_iter().map(|r| (r.name.clone(), r)).collect();
        let record = ManifestRecord::new(file, text, by, now);
        let mut inner = lock(&self.inner);
        self.keep(
            named,
            record,
            &mut inner.rules,
            AlertingKind::Rules,
            rule::RULE_KIND,
        )
    }

    /// Applies a file of `NotificationChannel`s (all or nothing).
    pub fn apply_channels(
        &self,
        file: &str,
        text: &str,
        by: &str,
        now: SystemTime,
    ) -> Result<Vec<AlertApplyResult>, AlertError> {
        let channels =
            rule::parse_channels(file, text).map_err(|e| AlertError::Invalid(e.to_string()))?;
        let named = channels.into_iter().map(|c| (c.name.clone(), c)).collect();
        let record = ManifestRecord::new(file, text, by, now);
        let mut inner = lock(&self.inner);
        self.keep(
            named,
            record,
            &mut inner.channels,
            AlertingKind::Channels,
            rule::CHANNEL_KIND,
        )
    }

    /// Saves the checked documents of one file that differ from what `kept`
    /// holds (first in the store, then in memory), within [`MAX_RULES`].
    fn keep<T: Clone + PartialEq>(
        &self,
        named: Vec<(String, T)>,
        record: ManifestRecord,
        kept: &mut BTreeMap<String, (T, ManifestRecord)>,
        kind: AlertingKind,
        kind_name: &str,
    ) -> Result<Vec<AlertApplyResult>, AlertError> {
        let new = named.iter().filter(|(n, _)| !kept.contains_key(n)).count();
        if kept.len() + new > MAX_RULES {
            return Err(AlertError::Invalid(format!(
                "{} {kind_name}s would exceed the limit of {MAX_RULES}",
                kept.len() + new
            )));
        }
        let mut out = Vec::new();
        for (name, item) in named {
            let outcome = match kept.get(&name) {
                Some((old, _)) if *old == item => "unchanged",
                Some(_) => "updated",
                None => "created",
            };
            if outcome != "unchanged" {
                self.store.put_alerting(kind, &name, &to_json(&record))?;
                kept.insert(name.clone(), (item, record.clone()));
            }
            out.push(AlertApplyResult {
                kind: kind_name.into(),
                name,
                outcome: outcome.into(),
            });
        }
        Ok(out)
    }

    /// Deletes a rule and forgets its alerts (they are not sent as resolved).
    pub fn delete_rule(&self, name: &str) -> Result<(), AlertError> {
        if name.starts_with(rule::BUILTIN_PREFIX) {
            return Err(AlertError::Builtin(format!(
                "{name} is a built-in rule and cannot be deleted; silence it instead (novacron alert silence alertname={name} --for 24h)"
            )));
        }
        let mut inner = lock(&self.inner);
        if !inner.rules.contains_key(name) {
            return Err(AlertError::Unknown(format!("no alert rule named {name}")));
        }
        self.store.delete_alerting(AlertingKind::Rules, name)?;
        self.store.delete_alerting(AlertingKind::States, name)?;
        inner.rules.remove(name);
        inner.states.remove(name);
        Ok(())
    }

    /// Deletes a channel; its queued notifications are given up at the next
    /// delivery attempt.
    pub fn delete_channel(&self, name: &str) -> Result<(), AlertError> {
        let mut inner = lock(&self.inner);
        if !inner.channels.contains_key(name) {
            return Err(AlertError::Unknown(format!(
                "no notification channel named {name}"
            )));
        }
        self.store.delete_alerting(AlertingKind::Channels, name)?;
        inner.channels.remove(name);
        Ok(())
    }

    /// The rules as shown.
    pub fn rule_views(&self) -> Vec<AlertRuleView> {
        let inner = lock(&self.inner);
        let view = |r: &AlertRule, rec: Option<&ManifestRecord>| {
            let states = inner.states.get(&r.name);
            let count = |s: engine::State| {
                states.map_or(0, |m| m.values().filter(|i| i.state == s).count())
            };
            AlertRuleView {
                name: r.name.clone(),
                condition: r.condition.clone(),
                subject: r.subject.name().into(),
                for_secs: r.for_.as_secs(),
                severity: r.severity.name().into(),
                notify: r.notify.clone(),
                builtin: r.builtin,
                pending: count(engine::State::Pending),
                firing: count(engine::State::Firing),
                file: rec.map_or_else(|| "-".into(), |r| r.file.clone()),
                applied_by: rec.map_or_else(|| "controller".into(), |r| r.applied_by.clone()),
                applied_at_unix_ms: rec.map_or(0, |r| r.applied_at_unix_ms),
            }
        };
        self.builtins
            .iter()
            .map(|r| view(r, None))
            .chain(inner.rules.values().map(|(r, rec)| view(r, Some(rec))))
            .collect()
    }

    /// The channels as shown.
    pub fn channel_views(&self) -> Vec<ChannelView> {
        let inner = lock(&self.inner);
        inner
            .channels
            .values()
            .map(|(c, rec)| ChannelView {
                name: c.name.clone(),
                kind: c.kind().into(),
                target: match &c.target {
                    Target::Webhook(u) | Target::Slack(u) => url_origin(u),
                    Target::Email(e) => format!("smtp://{} to {}", e.smtp, e.to.join(", ")),
                },
                match_labels: c.match_labels.clone(),
                repeat_secs: c.repeat.as_secs(),
                queued: inner
                    .outbox
                    .values()
                    .filter(|e| e.notification.channel == c.name)
                    .count(),
                last_error: inner.last_error.get(&c.name).cloned(),
                applied_by: rec.applied_by.clone(),
                applied_at_unix_ms: rec.applied_at_unix_ms,
            })
            .collect()
    }

    /// The active alerts, firing first, then by rule and subject.
    pub fn active(&self, now: SystemTime) -> Vec<AlertView> {
        let now_ms = unix_ms(now);
        let inner = lock(&self.inner);
        let mut out: Vec<AlertView> = inner
            .states
            .iter()
            .flat_map(|(rule, m)| m.values().map(move |i| (rule, i)))
            .map(|(rule, i)| AlertView {
                rule: rule.clone(),
                subject: i.subject.clone(),
                state: match i.state {
                    engine::State::Pending => "pending".into(),
                    engine::State::Firing => "firing".into(),
                },
                severity: i.labels.get("severity").cloned().unwrap_or_default(),
                value: i.value,
                active_since_unix_ms: i.active_since_ms,
                firing_since_unix_ms: i.firing_since_ms,
                labels: i.labels.clone(),
                annotations: i.annotations.clone(),
                silenced_by: engine::silenced(&inner.silences, &i.labels, now_ms)
                    .map(|s| s.id.clone()),
                acked_by: i.acked_by.clone(),
            })
            .collect();
        out.sort_by(|a, b| {
            (b.state == "firing", &a.rule, &a.subject).cmp(&(
                a.state == "firing",
                &b.rule,
                &b.subject,
            ))
        });
        out
    }

    /// Adds a silence.
    pub fn silence(
        &self,
        req: &SilenceRequest,
        by: &str,
        now: SystemTime,
    ) -> Result<SilenceView, AlertError> {
        if req.matchers.is_empty() {
            return Err(AlertError::Invalid(
                "matchers: at least one label equality, e.g. alertname=node-hot or node=n1".into(),
            ));
        }
        if req.matchers.len() > rule::MAX_LABELS
            || req
                .matchers
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > 63 || v.len() > rule::MAX_TEXT)
            || req.comment.len() > rule::MAX_TEXT
        {
            return Err(AlertError::Invalid(format!(
                "matchers: at most {} label equalities with names of 1 to 63 characters; values and the comment at most {} bytes",
                rule::MAX_LABELS,
                rule::MAX_TEXT
            )));
        }
        let d = humantime::parse_duration(req.duration.trim()).map_err(|e| {
            AlertError::Invalid(format!(
                "duration: {:?} is not a duration ({e}); expected e.g. 2h or 30m",
                req.duration
            ))
        })?;
        if d.is_zero() || d > MAX_SILENCE {
            return Err(AlertError::Invalid(
                "duration: more than 0 and at most 30 days".into(),
            ));
        }
        let now_ms = unix_ms(now);
        let mut inner = lock(&self.inner);
        inner.silences.retain(|s| s.ends_ms > now_ms);
        if inner.silences.len() >= engine::MAX_SILENCES {
            return Err(AlertError::Invalid(format!(
                "{} silences are active, the most kept; remove one first",
                engine::MAX_SILENCES
            )));
        }
        let s = Silence {
            id: format!("s{now_ms:x}{:x}", self.seq.fetch_add(1, Ordering::Relaxed)),
            matchers: req.matchers.clone(),
            starts_ms: now_ms,
            ends_ms: now_ms.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            created_by: by.to_string(),
            comment: req.comment.clone(),
        };
        self.store
            .put_alerting(AlertingKind::Silences, &s.id, &to_json(&s))?;
        inner.silences.push(s.clone());
        let covers = covered(&inner, &s, now_ms);
        Ok(silence_view(&s, covers))
    }

    /// Removes a silence.
    pub fn unsilence(&self, id: &str) -> Result<(), AlertError> {
        let mut inner = lock(&self.inner);
        if !inner.silences.iter().any(|s| s.id == id) {
            return Err(AlertError::Unknown(format!("no silence with id {id}")));
        }
        self.store.delete_alerting(AlertingKind::Silences, id)?;
        inner.silences.retain(|s| s.id != id);
        Ok(())
    }

    /// The silences in force.
    pub fn silences(&self, now: SystemTime) -> Vec<SilenceView> {
        let now_ms = unix_ms(now);
        let inner = lock(&self.inner);
        inner
            .silences
            .iter()
            .filter(|s| s.ends_ms > now_ms)
            .map(|s| silence_view(s, covered(&inner, s, now_ms)))
            .collect()
    }

    /// Acknowledges a firing alert: no repeats until it resolves.
    pub fn ack(&self, rule_name: &str, subject: &str, by: &str) -> Result<(), AlertError> {
        let mut inner = lock(&self.inner);
        let Some(states) = inner.states.get_mut(rule_name) else {
            return Err(AlertError::Unknown(format!(
                "rule {rule_name} has no active alert"
            )));
        };
        let Some(i) = states.get_mut(subject) else {
            return Err(AlertError::Unknown(format!(
                "rule {rule_name} has no active alert for {subject}"
            )));
        };
        i.acked_by = Some(by.to_string());
        let snapshot = states.clone();
        self.store
            .put_alerting(AlertingKind::States, rule_name, &to_json(&snapshot))?;
        Ok(())
    }

    /// The rules as a Prometheus rule file.
    pub fn export(&self) -> AlertExport {
        let e = export::prometheus(&self.rules());
        AlertExport {
            text: e.text,
            skipped: e
                .skipped
                .into_iter()
                .map(|(r, why)| format!("{r}: {why}"))
                .collect(),
        }
    }

    /// One evaluation of every rule on `facts` at `now`: the state machine,
    /// the notifications due (into the outbox), then the events. State and
    /// outbox are saved before the events are recorded and before anything is
    /// sent.
    pub fn evaluate(&self, facts: &facts::Facts, now: SystemTime) -> Result<usize, StoreError> {
        let now_ms = unix_ms(now);
        let rules = self.rules();
        let mut inner = lock(&self.inner);
        let expired: Vec<String> = inner
            .silences
            .iter()
            .filter(|s| s.ends_ms <= now_ms)
            .map(|s| s.id.clone())
            .collect();
        for id in &expired {
            self.store.delete_alerting(AlertingKind::Silences, id)?;
        }
        inner.silences.retain(|s| s.ends_ms > now_ms);
        let channels: Vec<Channel> = inner.channels.values().map(|(c, _)| c.clone()).collect();
        let warm_up = u64::try_from(self.warm_up().as_millis()).unwrap_or(u64::MAX);
        let warming_up = now_ms
            < self
                .loaded_ms
                .load(Ordering::Relaxed)
                .saturating_add(warm_up);
        let mut all_transitions: Vec<Transition> = Vec::new();
        let mut queued = 0;
        let cache = facts.cache(&rules);
        for r in &rules {
            let prev = inner.states.remove(&r.name).unwrap_or_default();
            let prev_len = prev.len();
            let observed = facts.observations(r, &cache);
            let mut step = engine::step(now_ms, r, prev, &observed, warming_up);
            let notes = engine::plan(now_ms, r, &channels, &mut step, &inner.silences);
            let changed =
                !step.transitions.is_empty() || !notes.is_empty() || step.active.len() != prev_len;
            let saved = changed.then(|| (!step.active.is_empty()).then(|| to_json(&step.active)));
            all_transitions.append(&mut step.transitions);
            if !step.active.is_empty() {
                inner.states.insert(r.name.clone(), step.active);
            }
            match saved {
                Some(Some(json)) => {
                    self.store
                        .put_alerting(AlertingKind::States, &r.name, &json)?
                }
                Some(None) => {
                    self.store.delete_alerting(AlertingKind::States, &r.name)?;
                }
                None => {}
            }
            for n in notes {
                while inner.outbox.len() >= MAX_OUTBOX {
                    let Some((oldest, entry)) = inner.outbox.pop_first() else {
                        break;
                    };
                    self.store.delete_alerting(AlertingKind::Outbox, &oldest)?;
                    self.events.note(
                        NewEvent::new(
                            kind::ALERT_NOTIFY_FAILED,
                            CONTROLLER,
                            format!(
                                "notification to {} about {} given up: the outbox holds {MAX_OUTBOX} undelivered notifications",
                                entry.notification.channel, entry.notification.rule
                            ),
                        )
                        .detail("channel", &entry.notification.channel),
                    );
                }
                let id = format!(
                    "{now_ms:016}-{:08}",
                    self.seq.fetch_add(1, Ordering::Relaxed)
                );
                let entry = OutboxEntry {
                    id: id.clone(),
                    notification: n,
                    attempts: 0,
                    next_attempt_ms: now_ms,
                    last_error: None,
                };
                self.store
                    .put_alerting(AlertingKind::Outbox, &id, &to_json(&entry))?;
                inner.outbox.insert(id, entry);
                queued += 1;
            }
        }
        drop(inner);
        for t in &all_transitions {
            self.events.note(transition_event(t));
        }
        if queued > 0 {
            self.wake.notify_one();
        }
        Ok(all_transitions.len())
    }

    /// Notes the restart counts of allocations seen now and answers each one's
    /// restarts within the last hour. The baseline is the newest count older
    /// than an hour, or the first count seen (so an allocation seen for the
    /// first time has 0 recent restarts). Allocations not in `seen` are
    /// forgotten.
    pub fn recent_restarts(&self, seen: &[(String, u32)], now_ms: u64) -> HashMap<String, u32> {
        const HOUR_MS: u64 = 3_600_000;
        let old = |t: u64| now_ms.saturating_sub(t) > HOUR_MS;
        let mut inner = lock(&self.inner);
        let mut out = HashMap::with_capacity(seen.len());
        let mut keep = HashMap::with_capacity(seen.len());
        for (id, restarts) in seen {
            let mut q = inner.restarts.remove(id).unwrap_or_default();
            while q.len() >= 2 && q.get(1).is_some_and(|(t, _)| old(*t)) {
                q.pop_front();
            }
            if q.back().is_none_or(|(_, r)| r != restarts) {
                q.push_back((now_ms, *restarts));
                // Bounded: an allocation restarting every second keeps its
                // newest counts (the baseline moves later: fewer counted).
                if q.len() > MAX_RESTART_COUNTS {
                    q.pop_front();
                }
            }
            let base = q.front().map_or(*restarts, |(_, r)| *r);
            out.insert(id.clone(), restarts.saturating_sub(base));
            keep.insert(id.clone(), q);
        }
        inner.restarts = keep;
        out
    }
}

fn covered(inner: &Inner, s: &Silence, now_ms: u64) -> usize {
    inner
        .states
        .values()
        .flat_map(|m| m.values())
        .filter(|i| s.covers(&i.labels, now_ms))
        .count()
}

fn silence_view(s: &Silence, covers: usize) -> SilenceView {
    SilenceView {
        id: s.id.clone(),
        matchers: s.matchers.clone(),
        starts_unix_ms: s.starts_ms,
        ends_unix_ms: s.ends_ms,
        created_by: s.created_by.clone(),
        comment: s.comment.clone(),
        covers,
    }
}

/// `scheme://host[:port]` of a URL: the path of a webhook URL is often its
/// secret, so it is never shown.
fn url_origin(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    format!("{scheme}://{host}/…")
}

fn transition_event(t: &Transition) -> NewEvent {
    let k = match t.change {
        Change::Pending => kind::ALERT_PENDING,
        Change::Firing => kind::ALERT_FIRING,
        Change::Resolved => kind::ALERT_RESOLVED,
        Change::Cleared => kind::ALERT_CLEARED,
    };
    let summary = t
        .annotations
        .get("summary")
        .cloned()
        .unwrap_or_else(|| match t.value {
            Some(v) => format!("value {}", rule::format_value(v)),
            None => "no data".into(),
        });
    let mut e = NewEvent::new(
        k,
        CONTROLLER,
        format!(
            "alert {} {} for {}: {summary}",
            t.rule,
            t.change.name(),
            t.subject
        ),
    )
    .detail("rule", &t.rule)
    .detail("subject", &t.subject);
    if let Some(sev) = t.labels.get("severity") {
        e = e.detail("severity", sev);
    }
    if let Some(v) = t.value {
        e = e.detail("value", rule::format_value(v));
    }
    if let Some(n) = t.labels.get("node") {
        e = e.node(n);
    }
    if let Some(j) = t.labels.get("job") {
        e = e.job(j);
    }
    e
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use novacron_common::alert::Subject;
    use novacron_common::alert::expr::ValueRef;

    use super::*;
    use crate::state::store::MemoryStore;

    fn open(store: &Arc<dyn Store>) -> Arc<Alerts> {
        let events = Arc::new(EventLog::open(store.clone(), 1000).expect("events"));
        Alerts::open(
            store.clone(),
            events,
            AlertSettings::default(),
            "https://c".into(),
        )
        .expect("alerts")
    }

    fn facts(cpu: f64) -> facts::Facts {
        let mut f = facts::Facts::default();
        f.subjects.entry(Subject::Node).or_default().insert(
            "n1".into(),
            BTreeMap::from([("node".to_string(), "n1".to_string())]),
        );
        let v = ValueRef {
            subject: Subject::Node,
            metric: "cpu_percent".into(),
            window: None,
        };
        f.put(&v, "n1", cpu);
        f
    }

    #[test]
    fn state_and_outbox_survive_a_reload() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let a = open(&store);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        a.apply_channels(
            "c.yaml",
            "apiVersion: novacron.io/v1\nkind: NotificationChannel\nmetadata:\n  name: ops\nspec:\n  webhook:\n    url: http://127.0.0.1:1/x\n",
            "op",
            now,
        )
        .expect("channel");
        let applied = a
            .apply_rules(
                "r.yaml",
                "apiVersion: novacron.io/v1\nkind: AlertRule\nmetadata:\n  name: hot\nspec:\n  condition: node.cpu_percent > 90\n  notify: [ops]\n",
                "op",
                now,
            )
            .expect("rule");
        assert_eq!(applied[0].outcome, "created");
        a.evaluate(&facts(95.0), now).expect("evaluate");
        assert_eq!(a.active(now)[0].state, "firing");
        let due = a.due(unix_ms(now));
        assert_eq!(due.len(), 1);
        assert!(due[0].1.is_some());
        // A second controller on the same store (a restart, a new leader).
        let b = open(&store);
        let active = b.active(now);
        assert_eq!(
            (active[0].rule.as_str(), active[0].subject.as_str()),
            ("hot", "n1")
        );
        assert_eq!(b.due(unix_ms(now)).len(), 1);
        // Delivered: gone from the store too.
        let (entry, _) = b.due(unix_ms(now)).remove(0);
        b.settle(entry, deliver::Attempt::Delivered, unix_ms(now));
        assert!(open(&store).due(u64::MAX).is_empty());
        // Failed: retried later, with the error kept.
        b.evaluate(&facts(10.0), now + Duration::from_secs(10))
            .expect("evaluate");
        let (entry, _) = b.due(u64::MAX).remove(0);
        assert_eq!(entry.notification.status, "resolved");
        b.settle(
            entry,
            deliver::Attempt::Failed("refused".into()),
            unix_ms(now) + 10_000,
        );
        let again = open(&store).due(u64::MAX).remove(0).0;
        assert_eq!(
            (again.attempts, again.last_error.as_deref()),
            (1, Some("refused"))
        );
        assert_eq!(again.next_attempt_ms, unix_ms(now) + 11_000);
    }

    #[test]
    fn recent_restarts_count_the_last_hour() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let a = open(&store);
        let hour = 3_600_000;
        let seen = |n: u32| vec![("a1".to_string(), n)];
        assert_eq!(
            a.recent_restarts(&seen(5), 0)["a1"],
            0,
            "first sight: a baseline"
        );
        assert_eq!(a.recent_restarts(&seen(7), 1000)["a1"], 2);
        assert_eq!(a.recent_restarts(&seen(7), hour)["a1"], 2);
        // The restarts at 1 s are more than an hour old now.
        assert_eq!(a.recent_restarts(&seen(7), hour + 2000)["a1"], 0);
        assert_eq!(a.recent_restarts(&seen(8), hour + 3000)["a1"], 1);
        assert!(a.recent_restarts(&[], hour + 4000).is_empty());
    }

    #[test]
    fn builtin_rules_cannot_be_deleted_and_silences_need_matchers() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let a = open(&store);
        assert!(matches!(
            a.delete_rule("builtin-node-down"),
            Err(AlertError::Builtin(_))
        ));
        assert!(matches!(a.delete_rule("nope"), Err(AlertError::Unknown(_))));
        let req = SilenceRequest {
            matchers: BTreeMap::new(),
            duration: "1h".into(),
            comment: String::new(),
        };
        assert!(matches!(
            a.silence(&req, "op", SystemTime::now()),
            Err(AlertError::Invalid(_))
        ));
        let req = SilenceRequest {
            matchers: BTreeMap::from([("node".into(), "n1".into())]),
            duration: "45d".into(),
            comment: String::new(),
        };
        assert!(matches!(
            a.silence(&req, "op", SystemTime::now()),
            Err(AlertError::Invalid(_))
        ));
    }
}

//! Alerting bodies: `/v1/alerts` (active alerts), `/v1/alerts/rules`,
//! `/v1/alerts/channels`, `/v1/alerts/silences`, `/v1/alerts/ack` and
//! `/v1/alerts/export`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// An alert that is pending or firing, as `GET /v1/alerts` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AlertView {
    /// The rule.
    pub rule: String,
    /// What it is about: a node, allocation, job, pool or migration, or `fleet`.
    pub subject: String,
    /// `pending` or `firing`.
    pub state: String,
    /// `info`, `warning` or `critical`.
    pub severity: String,
    /// The value of the condition's first comparison at the last evaluation.
    pub value: Option<f64>,
    /// Since when the condition holds (Unix ms).
    pub active_since_unix_ms: u64,
    /// Since when it fires (Unix ms).
    pub firing_since_unix_ms: Option<u64>,
    /// Labels (`alertname`, `severity`, `subject`, `node`, `job`, the rule's own).
    pub labels: BTreeMap<String, String>,
    /// Annotations, rendered (`summary`).
    pub annotations: BTreeMap<String, String>,
    /// The silence that holds its notifications, if any.
    pub silenced_by: Option<String>,
    /// Who acknowledged it (no repeats until it resolves).
    pub acked_by: Option<String>,
}

/// An alert rule as `GET /v1/alerts/rules` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AlertRuleView {
    /// Name.
    pub name: String,
    /// The condition.
    pub condition: String,
    /// `node`, `alloc`, `job`, `pool`, `migration` or `fleet`.
    pub subject: String,
    /// How long the condition must hold, seconds.
    pub for_secs: u64,
    /// Severity.
    pub severity: String,
    /// Channels it names.
    pub notify: Vec<String>,
    /// Shipped with the controller (cannot be deleted).
    pub builtin: bool,
    /// Its alerts pending now.
    pub pending: usize,
    /// Its alerts firing now.
    pub firing: usize,
    /// The file it came from (`-` for built-in rules).
    pub file: String,
    /// Who applied it.
    pub applied_by: String,
    /// When (Unix ms).
    pub applied_at_unix_ms: u64,
}

/// A notification channel as `GET /v1/alerts/channels` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChannelView {
    /// Name.
    pub name: String,
    /// `webhook`, `slack` or `email`.
    pub kind: String,
    /// Where: the URL's scheme and host, or the SMTP relay and recipients
    /// (never a URL's path, which often holds a secret).
    pub target: String,
    /// Label matches that route alerts here.
    pub match_labels: Option<BTreeMap<String, String>>,
    /// Repeat interval, seconds.
    pub repeat_secs: u64,
    /// Notifications waiting in the outbox for it.
    pub queued: usize,
    /// The last delivery error, if the newest attempt failed.
    pub last_error: Option<String>,
    /// Who applied it.
    pub applied_by: String,
    /// When (Unix ms).
    pub applied_at_unix_ms: u64,
}

/// What applying a rule or channel did, one per document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AlertApplyResult {
    /// `AlertRule` or `NotificationChannel`.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// `created`, `updated` or `unchanged`.
    pub outcome: String,
}

/// `POST /v1/alerts/silences`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SilenceRequest {
    /// Label equalities an alert must all have (`alertname`, `subject`,
    /// `node`, `severity`, ...); at least one.
    pub matchers: BTreeMap<String, String>,
    /// How long, as `2h` or `30m` (at most 30 days).
    pub duration: String,
    /// Why.
    #[serde(default)]
    pub comment: String,
}

/// A silence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SilenceView {
    /// Its id.
    pub id: String,
    /// Label equalities.
    pub matchers: BTreeMap<String, String>,
    /// From (Unix ms).
    pub starts_unix_ms: u64,
    /// Until (Unix ms).
    pub ends_unix_ms: u64,
    /// Who.
    pub created_by: String,
    /// Why.
    pub comment: String,
    /// Alerts it covers now.
    pub covers: usize,
}

/// `POST /v1/alerts/ack`: acknowledge one alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AckRequest {
    /// The rule.
    pub rule: String,
    /// The subject.
    pub subject: String,
}

/// `GET /v1/alerts/export`: the rules as a Prometheus rule file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AlertExport {
    /// The rule file (YAML), for `promtool check rules`.
    pub text: String,
    /// Rules left out, each with why (`rule: reason`).
    pub skipped: Vec<String>,
}

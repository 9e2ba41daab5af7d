//! Notifications as each kind of channel receives them: Alertmanager's webhook
//! JSON (version 4, so existing receivers work), a Slack-compatible
//! `{"text": ...}`, and an email's subject and body.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::engine::Notification;
use super::rule::format_value;

/// Alertmanager's webhook body, version 4.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookBody {
    /// `"4"`.
    pub version: String,
    /// The group: `{}:{alertname="RULE"}`.
    pub group_key: String,
    /// Alerts left out of `alerts`.
    pub truncated_alerts: usize,
    /// `firing` or `resolved`.
    pub status: String,
    /// The channel.
    pub receiver: String,
    /// `alertname`.
    pub group_labels: BTreeMap<String, String>,
    /// Labels every alert has.
    pub common_labels: BTreeMap<String, String>,
    /// Annotations every alert has with the same value.
    pub common_annotations: BTreeMap<String, String>,
    /// The controller's API URL.
    #[serde(rename = "externalURL")]
    pub external_url: String,
    /// The alerts.
    pub alerts: Vec<WebhookAlert>,
}

/// One alert of a [`WebhookBody`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookAlert {
    /// `firing` or `resolved`.
    pub status: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339.
    pub starts_at: String,
    /// RFC 3339; `0001-01-01T00:00:00Z` while firing.
    pub ends_at: String,
    /// Where to look.
    #[serde(rename = "generatorURL")]
    pub generator_url: String,
    /// A stable id of the label set.
    pub fingerprint: String,
}

/// The webhook body of `n`; `external_url` is the controller's API URL.
pub fn webhook(n: &Notification, external_url: &str) -> WebhookBody {
    let alerts: Vec<WebhookAlert> = n
        .alerts
        .iter()
        .map(|a| WebhookAlert {
            status: a.status.clone(),
            labels: a.labels.clone(),
            annotations: a.annotations.clone(),
            starts_at: rfc3339(a.starts_ms),
            ends_at: a
                .ends_ms
                .map_or_else(|| "0001-01-01T00:00:00Z".into(), rfc3339),
            generator_url: format!("{external_url}/ui/alerts"),
            fingerprint: fingerprint(&a.labels),
        })
        .collect();
    let common_annotations = common(n.alerts.iter().map(|a| &a.annotations));
    let mut common_labels = common(n.alerts.iter().map(|a| &a.labels));
    if n.alerts.is_empty() {
        common_labels = n.common_labels.clone();
    }
    WebhookBody {
        version: "4".into(),
        group_key: format!("{{}}:{{alertname=\"{}\"}}", n.rule),
        truncated_alerts: n.truncated,
        status: n.status.clone(),
        receiver: n.channel.clone(),
        group_labels: BTreeMap::from([("alertname".into(), n.rule.clone())]),
        common_labels,
        common_annotations,
        external_url: external_url.to_string(),
        alerts,
    }
}

/// The entries every map has with the same value.
fn common<'a>(
    mut maps: impl Iterator<Item = &'a BTreeMap<String, String>>,
) -> BTreeMap<String, String> {
    let Some(first) = maps.next() else {
        return BTreeMap::new();
    };
    let mut out = first.clone();
    for m in maps {
        out.retain(|k, v| m.get(k) == Some(v));
    }
    out
}

/// One line per alert, for Slack and the email body.
pub fn text(n: &Notification) -> String {
    let firing = n.alerts.iter().filter(|a| a.status == "firing").count();
    let resolved = n.alerts.len() - firing;
    let mut t = format!(
        "[{}] {} ({}): {firing} firing, {resolved} resolved",
        n.status.to_uppercase(),
        n.rule,
        n.common_labels
            .get("severity")
            .map_or("warning", String::as_str),
    );
    for a in &n.alerts {
        let subject = a.labels.get("subject").map_or("", String::as_str);
        let summary = a
            .annotations
            .get("summary")
            .cloned()
            .unwrap_or_else(|| a.value.map_or_else(|| "no data".into(), format_value));
        let _ = write!(t, "\n- {} {subject}: {summary}", a.status);
    }
    if n.truncated > 0 {
        let _ = write!(t, "\n- and {} more", n.truncated);
    }
    t
}

/// The email subject of `n`.
pub fn email_subject(n: &Notification) -> String {
    let count = n.alerts.len() + n.truncated;
    format!("[{}] {} ({count})", n.status.to_uppercase(), n.rule)
}

/// A stable 16-hex-digit id of a label set (FNV-1a, as stable across versions
/// as the labels are).
pub fn fingerprint(labels: &BTreeMap<String, String>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in labels {
        for b in k.bytes().chain([0xff]).chain(v.bytes()).chain([0xfe]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// Unix ms as RFC 3339 in UTC.
pub fn rfc3339(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(i64::try_from(ms).unwrap_or(i64::MAX))
        .map_or_else(String::new, |t| {
            t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::engine::Notified;

    #[test]
    fn the_webhook_has_alertmanagers_shape() {
        let labels = BTreeMap::from([
            ("alertname".to_string(), "hot".to_string()),
            ("subject".to_string(), "n1".to_string()),
        ]);
        let n = Notification {
            channel: "ops".into(),
            rule: "hot".into(),
            status: "firing".into(),
            alerts: vec![Notified {
                status: "firing".into(),
                labels: labels.clone(),
                annotations: BTreeMap::from([("summary".into(), "n1 is hot".into())]),
                starts_ms: 1_700_000_000_000,
                ends_ms: None,
                value: Some(95.0),
            }],
            truncated: 0,
            common_labels: labels.clone(),
            at_ms: 1_700_000_001_000,
        };
        let b = webhook(&n, "https://c:8443");
        assert_eq!(b.version, "4");
        assert_eq!(b.alerts[0].starts_at, "2023-11-14T22:13:20.000Z");
        assert_eq!(b.alerts[0].ends_at, "0001-01-01T00:00:00Z");
        assert_eq!(b.common_annotations["summary"], "n1 is hot");
        assert_eq!(b.group_key, "{}:{alertname=\"hot\"}");
        assert_eq!(b.alerts[0].fingerprint, fingerprint(&labels));
        assert_eq!(
            text(&n),
            "[FIRING] hot (warning): 1 firing, 0 resolved\n- firing n1: n1 is hot"
        );
        assert_eq!(email_subject(&n), "[FIRING] hot (1)");
    }
}

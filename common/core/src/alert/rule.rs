//! The `AlertRule` and `NotificationChannel` manifests, their checks, and the
//! built-in rules every controller evaluates.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use yaml_serde::Value;

use super::catalog;
use super::expr::{self, Expr, Subject};
use crate::manifest::document::{self, Kind, Rule};
use crate::manifest::{ManifestErrors, Metadata, duration};

/// The rule kind.
pub const RULE_KIND: &str = "AlertRule";
/// The channel kind.
pub const CHANNEL_KIND: &str = "NotificationChannel";
/// The longest `for`.
pub const MAX_FOR: Duration = Duration::from_secs(7 * 24 * 3600);
/// The default repeat interval of a channel (as Alertmanager's).
pub const DEFAULT_REPEAT: Duration = Duration::from_secs(4 * 3600);
/// The shortest repeat interval.
pub const MIN_REPEAT: Duration = Duration::from_secs(10);
/// Most labels or annotations on a rule.
pub const MAX_LABELS: usize = 32;
/// The longest label or annotation value (after templating too).
pub const MAX_TEXT: usize = 2048;
/// Most channels a rule notifies, and most recipients of an email channel.
pub const MAX_TARGETS: usize = 16;
/// The prefix of built-in rule names.
pub const BUILTIN_PREFIX: &str = "builtin-";

/// How bad it is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Severity {
    /// For the record.
    Info,
    /// Look soon.
    #[default]
    Warning,
    /// Look now.
    Critical,
}

impl Severity {
    /// As written.
    pub fn name(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// What a subject without data does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NoData {
    /// The condition is false (Prometheus's behaviour): a pending or firing
    /// alert resolves.
    #[default]
    Ok,
    /// The condition is true: silence is itself the alarm.
    Alerting,
    /// Nothing changes until data comes back.
    Keep,
}

/// An `AlertRule` as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleManifest {
    /// `novacron.io/v1`.
    pub api_version: String,
    /// [`RULE_KIND`].
    pub kind: String,
    /// Name and labels.
    pub metadata: Metadata,
    /// The rule.
    pub spec: RuleSpec,
}

/// What an alert rule watches and whom it tells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RuleSpec {
    /// The condition ([`expr`]).
    pub condition: String,
    /// How long the condition must hold before the alert fires (`0s`: at once).
    #[serde(default, rename = "for", with = "duration")]
    pub for_: Duration,
    /// info, warning or critical.
    #[serde(default)]
    pub severity: Severity,
    /// What a subject without data does.
    #[serde(default)]
    pub no_data: NoData,
    /// Labels added to every alert (routing, grouping).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Texts with templates: `{{ subject }}`, `{{ value }}`, `{{ labels.NAME }}`.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// Channels to notify by name.
    #[serde(default)]
    pub notify: Vec<String>,
}

/// A checked alert rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRule {
    /// Name.
    pub name: String,
    /// The condition as written.
    pub condition: String,
    /// Parsed.
    pub expr: Expr,
    /// Whom it speaks of.
    pub subject: Subject,
    /// `for`.
    pub for_: Duration,
    /// Severity.
    pub severity: Severity,
    /// No-data behaviour.
    pub no_data: NoData,
    /// Labels (with `alertname` and `severity`).
    pub labels: BTreeMap<String, String>,
    /// Annotation templates.
    pub annotations: BTreeMap<String, String>,
    /// Channels named.
    pub notify: Vec<String>,
    /// Shipped with the controller.
    pub builtin: bool,
}

const RULE: Kind<'static> = Kind {
    kind: RULE_KIND,
    noun: "alert rule",
};

/// Parses a file of one or more alert rules separated by `---`.
pub fn parse_rules(file: &str, text: &str) -> Result<Vec<AlertRule>, ManifestErrors> {
    document::load_all(
        file,
        text,
        &RULE,
        |m, _: &Value| checked_rule(m),
        |r: &AlertRule| &r.name,
    )
}

fn checked_rule(m: RuleManifest) -> Result<AlertRule, Vec<Rule>> {
    let mut rules = document::envelope(
        &m.api_version,
        &m.kind,
        RULE_KIND,
        &m.metadata,
        "alert rule",
    );
    if m.metadata.name.starts_with(BUILTIN_PREFIX) {
        rules.push(Rule::at(
            "metadata.name",
            format!(
                "{:?} starts with {BUILTIN_PREFIX:?}, which is kept for the built-in rules; choose another name",
                m.metadata.name
            ),
        ));
    }
    let s = m.spec;
    let parsed = expr::parse(&s.condition)
        .and_then(|e| e.subject().map(|k| (e, k)))
        .and_then(|(e, k)| check_metrics(&e).map(|()| (e, k)));
    if let Err(e) = &parsed {
        rules.push(Rule::at("spec.condition", e.clone()));
    }
    if s.for_ > MAX_FOR {
        rules.push(Rule::at("spec.for", "is longer than 7 days (168h)"));
    }
    check_texts(&s.labels, "spec.labels", &mut rules, true);
    check_texts(&s.annotations, "spec.annotations", &mut rules, false);
    for reserved in ["alertname", "severity", "subject"] {
        if s.labels.contains_key(reserved) {
            rules.push(Rule::at_key(
                format!("spec.labels.{reserved}"),
                format!("{reserved} is set by the controller; use another label"),
            ));
        }
    }
    if s.notify.len() > MAX_TARGETS {
        rules.push(Rule::at(
            "spec.notify",
            format!("names {} channels; at most {MAX_TARGETS}", s.notify.len()),
        ));
    }
    for (i, c) in s.notify.iter().enumerate() {
        if let Some(m) = crate::names::problem(c, "channel") {
            rules.push(Rule::at(format!("spec.notify[{i}]"), m));
        }
    }
    let (expr, subject) = match parsed {
        Ok(p) if rules.is_empty() => p,
        _ => return Err(rules),
    };
    Ok(finish(
        m.metadata.name,
        s.condition,
        expr,
        subject,
        s.for_,
        s.severity,
        s.no_data,
        s.labels,
        s.annotations,
        s.notify,
        false,
    ))
}

/// Every metric of `e` is in the catalog, and only history metrics have windows.
pub fn check_metrics(e: &Expr) -> Result<(), String> {
    let mut err = None;
    e.walk(&mut |v, _, _| {
        if err.is_some() {
            return;
        }
        match catalog::find(v.subject, &v.metric) {
            None => {
                err = Some(format!(
                    "{}.{} is not a metric; {} metrics are: {}",
                    v.subject,
                    v.metric,
                    v.subject,
                    catalog::names(v.subject)
                ))
            }
            Some(m) if v.window.is_some() && m.source == catalog::Source::State => {
                err = Some(format!(
                    "{}.{} is the controller's state now and has no history; compare it without avg/min/max",
                    v.subject, v.metric
                ))
            }
            Some(_) => {}
        }
    });
    err.map_or(Ok(()), Err)
}

#[allow(clippy::too_many_arguments)]
fn finish(
    name: String,
    condition: String,
    expr: Expr,
    subject: Subject,
    for_: Duration,
    severity: Severity,
    no_data: NoData,
    mut labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    notify: Vec<String>,
    builtin: bool,
) -> AlertRule {
    labels.insert("alertname".into(), name.clone());
    labels.insert("severity".into(), severity.name().into());
    AlertRule {
        name,
        condition,
        expr,
        subject,
        for_,
        severity,
        no_data,
        labels,
        annotations,
        notify,
        builtin,
    }
}

fn check_texts(map: &BTreeMap<String, String>, path: &str, rules: &mut Vec<Rule>, label: bool) {
    if map.len() > MAX_LABELS {
        rules.push(Rule::at(
            path,
            format!("has {} entries; at most {MAX_LABELS}", map.len()),
        ));
    }
    for (k, v) in map {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !key_ok {
            rules.push(Rule::at_key(
                format!("{path}.{k}"),
                format!(
                    "{k:?} is not a valid {} name; expected letters, digits and _ (as Prometheus label names), at most 63",
                    if label { "label" } else { "annotation" }
                ),
            ));
        }
        if v.len() > MAX_TEXT {
            rules.push(Rule::at(
                format!("{path}.{k}"),
                format!("is {} bytes; at most {MAX_TEXT}", v.len()),
            ));
        }
    }
}

/// Fills `{{ subject }}`, `{{ value }}`, `{{ rule }}`, `{{ severity }}` and
/// `{{ labels.NAME }}` in `template`; an unknown placeholder stays as written
/// (so a typo shows in the message instead of vanishing). The result is cut at
/// [`MAX_TEXT`] bytes.
pub fn render(
    template: &str,
    subject: &str,
    value: Option<f64>,
    labels: &BTreeMap<String, String>,
) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let key = after[..end].trim();
        let filled = match key {
            "subject" => Some(subject.to_string()),
            "value" => Some(value.map_or_else(|| "no data".to_string(), format_value)),
            "rule" => labels.get("alertname").cloned(),
            "severity" => labels.get("severity").cloned(),
            k => k
                .strip_prefix("labels.")
                .and_then(|l| labels.get(l).cloned()),
        };
        match filled {
            Some(f) => out.push_str(&f),
            None => out.push_str(&rest[start..start + 2 + end + 2]),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    if out.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

/// A value for people: at most two decimals, no trailing zeros.
pub fn format_value(v: f64) -> String {
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.to_string() }
}

/// The rules every controller evaluates. They notify the channels whose `match`
/// selects them (`match: {severity: critical}`), and can be silenced like any
/// rule; they cannot be deleted or replaced.
pub fn builtin_rules() -> Vec<AlertRule> {
    let b = |name: &str,
             condition: &str,
             for_s: u64,
             severity: Severity,
             no_data: NoData,
             summary: &str| {
        let expr = expr::parse(condition).expect("built-in conditions parse");
        let subject = expr
            .subject()
            .expect("built-in conditions speak of one subject");
        finish(
            format!("{BUILTIN_PREFIX}{name}"),
            condition.to_string(),
            expr,
            subject,
            Duration::from_secs(for_s),
            severity,
            no_data,
            BTreeMap::from([("builtin".to_string(), "true".to_string())]),
            BTreeMap::from([("summary".to_string(), summary.to_string())]),
            Vec::new(),
            true,
        )
    };
    vec![
        b(
            "node-down",
            "node.up == 0",
            30,
            Severity::Critical,
            NoData::Ok,
            "node {{ subject }} is down: its agent has not been connected for 30s",
        ),
        b(
            "allocation-restarting",
            "alloc.restarts_recent > 3",
            0,
            Severity::Warning,
            NoData::Ok,
            "allocation {{ subject }} restarted {{ value }} times in the last hour",
        ),
        b(
            "migration-failed",
            "migration.failed == 1",
            0,
            Severity::Warning,
            NoData::Ok,
            "migration {{ subject }} failed and was rolled back",
        ),
        b(
            "budget-exceeded",
            "fleet.budgets_exceeded > 0",
            0,
            Severity::Warning,
            NoData::Ok,
            "{{ value }} cost budget(s) exceeded; see novacron cost",
        ),
        b(
            "certificate-expiring",
            "node.cert_expiry_days < 7",
            0,
            Severity::Warning,
            NoData::Ok,
            "the certificate of node {{ subject }} expires in {{ value }} days",
        ),
        b(
            "disk-nearly-full",
            "node.disk_percent > 90",
            300,
            Severity::Warning,
            NoData::Ok,
            "a disk of node {{ subject }} is {{ value }}% full",
        ),
    ]
}

/// A `NotificationChannel` as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ChannelManifest {
    /// `novacron.io/v1`.
    pub api_version: String,
    /// [`CHANNEL_KIND`].
    pub kind: String,
    /// Name and labels.
    pub metadata: Metadata,
    /// The channel.
    pub spec: ChannelSpec,
}

/// Where notifications go (exactly one of webhook, slack, email) and which.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ChannelSpec {
    /// A generic webhook: Alertmanager's webhook JSON (version 4) is POSTed.
    #[serde(default)]
    pub webhook: Option<UrlSpec>,
    /// A Slack-compatible incoming webhook: `{"text": ...}` is POSTed.
    #[serde(default)]
    pub slack: Option<UrlSpec>,
    /// Email over SMTP.
    #[serde(default)]
    pub email: Option<EmailSpec>,
    /// Also receive every alert whose labels have these values (`{}`: all
    /// alerts, built-in ones included), besides the rules that name the channel.
    #[serde(default, rename = "match")]
    pub match_labels: Option<BTreeMap<String, String>>,
    /// How often a firing alert that nobody acknowledged is sent again.
    #[serde(default = "default_repeat", with = "duration")]
    pub repeat_interval: Duration,
}

fn default_repeat() -> Duration {
    DEFAULT_REPEAT
}

/// An HTTP endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UrlSpec {
    /// `http://` or `https://`.
    pub url: String,
}

/// An SMTP relay and the message's addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EmailSpec {
    /// `host:port` of the relay.
    pub smtp: String,
    /// `none` (plain, for a local relay), `starttls` or `tls`.
    #[serde(default)]
    pub tls: SmtpTls,
    /// The sender address.
    pub from: String,
    /// Recipients.
    pub to: Vec<String>,
}

/// How the SMTP connection is protected.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain SMTP (a relay on the same host or network).
    None,
    /// STARTTLS upgrade (port 587).
    #[default]
    Starttls,
    /// TLS from the start (port 465).
    Tls,
}

/// Where a channel delivers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// Alertmanager-shaped JSON.
    Webhook(String),
    /// Slack-shaped JSON.
    Slack(String),
    /// Email.
    Email(EmailSpec),
}

/// A checked channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Channel {
    /// Name.
    pub name: String,
    /// Where.
    pub target: Target,
    /// Label matches that route alerts here (`None`: only rules naming it).
    pub match_labels: Option<BTreeMap<String, String>>,
    /// Repeat interval.
    pub repeat: Duration,
}

impl Channel {
    /// Whether alerts of `rule` go here.
    pub fn routes(&self, rule: &AlertRule) -> bool {
        rule.notify.contains(&self.name)
            || self
                .match_labels
                .as_ref()
                .is_some_and(|m| m.iter().all(|(k, v)| rule.labels.get(k) == Some(v)))
    }

    /// `webhook`, `slack` or `email`.
    pub fn kind(&self) -> &'static str {
        match self.target {
            Target::Webhook(_) => "webhook",
            Target::Slack(_) => "slack",
            Target::Email(_) => "email",
        }
    }
}

const CHANNEL: Kind<'static> = Kind {
    kind: CHANNEL_KIND,
    noun: "notification channel",
};

/// Parses a file of one or more channels separated by `---`.
pub fn parse_channels(file: &str, text: &str) -> Result<Vec<Channel>, ManifestErrors> {
    document::load_all(
        file,
        text,
        &CHANNEL,
        |m, _: &Value| checked_channel(m),
        |c: &Channel| &c.name,
    )
}

fn checked_channel(m: ChannelManifest) -> Result<Channel, Vec<Rule>> {
    let mut rules = document::envelope(
        &m.api_version,
        &m.kind,
        CHANNEL_KIND,
        &m.metadata,
        "channel",
    );
    let s = m.spec;
    let count = usize::from(s.webhook.is_some())
        + usize::from(s.slack.is_some())
        + usize::from(s.email.is_some());
    if count != 1 {
        rules.push(Rule::at(
            "spec",
            format!("sets {count} of webhook, slack and email; expected exactly one"),
        ));
    }
    for (path, u) in [
        ("spec.webhook.url", &s.webhook),
        ("spec.slack.url", &s.slack),
    ] {
        if let Some(u) = u
            && let Err(m) = check_url(&u.url)
        {
            rules.push(Rule::at(path, m));
        }
    }
    if let Some(e) = &s.email {
        match e.smtp.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
            _ => rules.push(Rule::at(
                "spec.email.smtp",
                format!(
                    "{:?} is not host:port; expected e.g. smtp.example.com:587",
                    e.smtp
                ),
            )),
        }
        if e.to.is_empty() || e.to.len() > MAX_TARGETS {
            rules.push(Rule::at(
                "spec.email.to",
                format!("has {} recipients; expected 1 to {MAX_TARGETS}", e.to.len()),
            ));
        }
        for (i, a) in std::iter::once(&e.from).chain(&e.to).enumerate() {
            if !looks_like_address(a) {
                let path = if i == 0 {
                    "spec.email.from".to_string()
                } else {
                    format!("spec.email.to[{}]", i - 1)
                };
                rules.push(Rule::at(path, format!("{a:?} is not an email address")));
            }
        }
    }
    if s.repeat_interval < MIN_REPEAT {
        rules.push(Rule::at(
            "spec.repeatInterval",
            format!(
                "is shorter than {}; expected at least that",
                crate::units::duration(MIN_REPEAT)
            ),
        ));
    }
    if let Some(m) = &s.match_labels {
        check_texts(m, "spec.match", &mut rules, true);
    }
    if !rules.is_empty() {
        return Err(rules);
    }
    let target = match (s.webhook, s.slack, s.email) {
        (Some(w), _, _) => Target::Webhook(w.url),
        (_, Some(sl), _) => Target::Slack(sl.url),
        (_, _, Some(e)) => Target::Email(e),
        _ => return Err(vec![Rule::at("spec", "no target")]),
    };
    Ok(Channel {
        name: m.metadata.name,
        target,
        match_labels: s.match_labels,
        repeat: s.repeat_interval,
    })
}

fn check_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{url:?} is not an http:// or https:// URL"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty()
        || host.contains('@')
        || url.len() > MAX_TEXT
        || url.chars().any(char::is_whitespace)
    {
        return Err(format!(
            "{url:?} is not a usable URL; expected https://host[:port]/path without credentials or spaces"
        ));
    }
    Ok(())
}

fn looks_like_address(a: &str) -> bool {
    let a = a
        .rsplit_once('<')
        .map_or(a, |(_, inner)| inner.trim_end_matches('>'));
    match a.split_once('@') {
        Some((user, domain)) => {
            !user.is_empty()
                && !domain.is_empty()
                && !a
                    .chars()
                    .any(|c| c.is_whitespace() || c == ',' || c == '\r' || c == '\n')
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE_YAML: &str = "apiVersion: novacron.io/v1
kind: AlertRule
metadata:
  name: node-hot
spec:
  condition: node.cpu_percent > 90 AND node.memory_percent > 90
  for: 5m
  severity: critical
  labels:
    team: infra
  annotations:
    summary: '{{ subject }} is hot ({{ value }}%, {{ labels.team }}, {{ nope }})'
  notify: [ops]
";

    #[test]
    fn a_rule_parses_with_its_labels() {
        let r = parse_rules("r.yaml", RULE_YAML)
            .expect("accepted")
            .remove(0);
        assert_eq!(r.name, "node-hot");
        assert_eq!(r.subject, Subject::Node);
        assert_eq!(r.for_, Duration::from_secs(300));
        assert_eq!(r.labels["alertname"], "node-hot");
        assert_eq!(r.labels["severity"], "critical");
        assert_eq!(
            render(&r.annotations["summary"], "n1", Some(93.456), &r.labels),
            "n1 is hot (93.46%, infra, {{ nope }})"
        );
    }

    #[test]
    fn bad_rules_name_the_field() {
        let bad = RULE_YAML
            .replace("node.memory_percent > 90", "alloc.cpu_percent > 9")
            .replace("name: node-hot", "name: builtin-x")
            .replace("team: infra", "severity: x");
        let e = parse_rules("r.yaml", &bad)
            .expect_err("refused")
            .to_string();
        assert!(
            e.contains("spec.condition") || e.contains("one subject"),
            "{e}"
        );
        assert!(e.contains("kept for the built-in rules"), "{e}");
        assert!(e.contains("set by the controller"), "{e}");
        let e = parse_rules(
            "r.yaml",
            &RULE_YAML.replace("node.memory_percent", "node.mem"),
        )
        .expect_err("refused")
        .to_string();
        assert!(
            e.contains("node.mem is not a metric; node metrics are: cpu_percent"),
            "{e}"
        );
        let e = parse_rules(
            "r.yaml",
            &RULE_YAML.replace("node.memory_percent > 90", "avg(node.up, 1m) < 1"),
        )
        .expect_err("refused")
        .to_string();
        assert!(e.contains("no history"), "{e}");
        let e = parse_rules("r.yaml", &RULE_YAML.replace("for: 5m", "for: soon"))
            .expect_err("refused")
            .to_string();
        assert!(e.contains("not a duration"), "{e}");
    }

    #[test]
    fn channels_parse_and_route() {
        let y = "apiVersion: novacron.io/v1
kind: NotificationChannel
metadata:
  name: ops
spec:
  webhook:
    url: http://127.0.0.1:9/hook
  match:
    severity: critical
  repeatInterval: 1h
";
        let c = parse_channels("c.yaml", y).expect("accepted").remove(0);
        assert_eq!(c.kind(), "webhook");
        let builtin = builtin_rules();
        let down = builtin
            .iter()
            .find(|r| r.name == "builtin-node-down")
            .expect("accepted");
        assert!(c.routes(down));
        let disk = builtin
            .iter()
            .find(|r| r.name == "builtin-disk-nearly-full")
            .expect("accepted");
        assert!(!c.routes(disk));
        let both = y.replace(
            "  match:",
            "  slack:\n    url: https://hooks.example/x\n  match:",
        );
        assert!(
            parse_channels("c.yaml", &both)
                .expect_err("refused")
                .to_string()
                .contains("exactly one")
        );
        let creds = y.replace("http://127.0.0.1:9/hook", "http://u:p@h/x");
        assert!(
            parse_channels("c.yaml", &creds)
                .expect_err("refused")
                .to_string()
                .contains("credentials")
        );
        let mail = "apiVersion: novacron.io/v1
kind: NotificationChannel
metadata:
  name: mail
spec:
  email:
    smtp: 127.0.0.1:2525
    tls: none
    from: novacron@example.com
    to: ['ops@example.com', 'bad address']
";
        assert!(
            parse_channels("c.yaml", mail)
                .expect_err("refused")
                .to_string()
                .contains("to[1]")
        );
    }

    #[test]
    fn builtins_are_valid_and_reserved() {
        let all = builtin_rules();
        assert_eq!(all.len(), 6);
        assert!(
            all.iter()
                .all(|r| r.builtin && r.name.starts_with(BUILTIN_PREFIX))
        );
    }

    #[test]
    fn templates_are_bounded() {
        let t = "{{ subject }}".repeat(1000);
        assert_eq!(render(&t, "abc", None, &BTreeMap::new()).len(), MAX_TEXT);
        assert_eq!(
            render("{{ unclosed", "s", None, &BTreeMap::new()),
            "{{ unclosed"
        );
        assert_eq!(format_value(2.0), "2");
        assert_eq!(format_value(0.126), "0.13");
    }
}

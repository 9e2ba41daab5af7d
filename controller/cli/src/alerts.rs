//! `novacron alert ...`: active alerts, rules, channels, silences,
//! acknowledgements and the Prometheus export (apply `AlertRule` and
//! `NotificationChannel` manifests with `novacron apply -f`).

use std::collections::BTreeMap;
use std::io::Write;
use std::time::SystemTime;

use clap::Subcommand;

use super::CliError;
use super::client::ApiClient;
use super::output::{self, OutputFormat, TableRow, from_unix_ms};
use novacron_api::{
    AckRequest, AlertExport, AlertRuleView, AlertView, ChannelView, SilenceRequest, SilenceView,
};

/// `novacron alert` subcommands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum AlertCommand {
    /// The pending and firing alerts, firing first.
    List,
    /// The rules (built-in ones first) with their alerts pending and firing.
    Rules,
    /// The notification channels and what waits in the outbox for each.
    Channels,
    /// Hold the notifications of every alert with these labels for a while
    /// (`novacron alert silence alertname=node-hot node=n1 --for 2h`).
    Silence {
        /// Label equalities, `NAME=VALUE` (alertname, subject, node, job,
        /// severity, or the rule's own labels); at least one.
        #[arg(required = true, value_parser = parse_matcher)]
        matchers: Vec<(String, String)>,
        /// How long (`30m`, `2h`, at most 30 days).
        #[arg(long = "for", default_value = "1h")]
        duration: String,
        /// Why (shown with the silence and in the event log).
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// The silences in force.
    Silences,
    /// Remove a silence by id.
    Unsilence {
        /// The silence id (from `alert silences`).
        id: String,
    },
    /// Acknowledge a firing alert: no repeated notifications until it resolves.
    Ack {
        /// The rule.
        rule: String,
        /// The subject (node, allocation, job, pool, migration, or `fleet`).
        subject: String,
    },
    /// Write every rule as a Prometheus rule file (for `promtool check rules`
    /// and Prometheus's `rule_files`); rules it cannot express are listed as
    /// comments at the top.
    Export,
    /// Delete an alert rule (built-in rules cannot be deleted: silence them).
    DeleteRule {
        /// The rule.
        name: String,
    },
    /// Delete a notification channel.
    DeleteChannel {
        /// The channel.
        name: String,
    },
}

fn parse_matcher(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!(
            "{s:?} is not NAME=VALUE; e.g. alertname=node-hot or node=n1"
        )),
    }
}

/// Runs an `alert` subcommand.
pub async fn run(
    cmd: &AlertCommand,
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
    now: SystemTime,
) -> Result<(), CliError> {
    let io = output::OutputError::Io;
    match cmd {
        AlertCommand::List => {
            let alerts: Vec<AlertView> = client.get(&["v1", "alerts"]).await?;
            output::write_list(out, format, &alerts, now)?;
        }
        AlertCommand::Rules => {
            let rules: Vec<AlertRuleView> = client.get(&["v1", "alerts", "rules"]).await?;
            output::write_list(out, format, &rules, now)?;
        }
        AlertCommand::Channels => {
            let channels: Vec<ChannelView> = client.get(&["v1", "alerts", "channels"]).await?;
            output::write_list(out, format, &channels, now)?;
        }
        AlertCommand::Silence {
            matchers,
            duration,
            comment,
        } => {
            let req = SilenceRequest {
                matchers: matchers.iter().cloned().collect::<BTreeMap<_, _>>(),
                duration: duration.clone(),
                comment: comment.clone(),
            };
            let s: SilenceView = client.post(&["v1", "alerts", "silences"], &req).await?;
            match format {
                OutputFormat::Table | OutputFormat::Wide => writeln!(
                    out,
                    "silence {} until {} covers {} alert(s) now",
                    s.id,
                    output::timestamp(now, from_unix_ms(s.ends_unix_ms)),
                    s.covers
                )
                .map_err(io)?,
                OutputFormat::Name => writeln!(out, "silence/{}", s.id).map_err(io)?,
                _ => output::write_value(out, format, &s)?,
            }
        }
        AlertCommand::Silences => {
            let silences: Vec<SilenceView> = client.get(&["v1", "alerts", "silences"]).await?;
            output::write_list(out, format, &silences, now)?;
        }
        AlertCommand::Unsilence { id } => {
            let () = client
                .post(
                    &["v1", "alerts", "silences", id, "delete"],
                    &serde_json::json!({}),
                )
                .await?;
            writeln!(out, "silence {id} removed").map_err(io)?;
        }
        AlertCommand::Ack { rule, subject } => {
            let req = AckRequest {
                rule: rule.clone(),
                subject: subject.clone(),
            };
            let () = client.post(&["v1", "alerts", "ack"], &req).await?;
            writeln!(out, "alert {rule} for {subject} acknowledged").map_err(io)?;
        }
        AlertCommand::Export => {
            let e: AlertExport = client.get(&["v1", "alerts", "export"]).await?;
            if format.is_human() {
                for s in &e.skipped {
                    writeln!(out, "# left out: {s}").map_err(io)?;
                }
                out.write_all(e.text.as_bytes()).map_err(io)?;
            } else {
                output::write_value(out, format, &e)?;
            }
        }
        AlertCommand::DeleteRule { name } => {
            let () = client
                .post(
                    &["v1", "alerts", "rules", name, "delete"],
                    &serde_json::json!({}),
                )
                .await?;
            writeln!(out, "alert rule {name} deleted").map_err(io)?;
        }
        AlertCommand::DeleteChannel { name } => {
            let () = client
                .post(
                    &["v1", "alerts", "channels", name, "delete"],
                    &serde_json::json!({}),
                )
                .await?;
            writeln!(out, "notification channel {name} deleted").map_err(io)?;
        }
    }
    Ok(())
}

fn value(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), novacron_common::alert::rule::format_value)
}

impl TableRow for AlertView {
    fn headers() -> &'static [&'static str] {
        &[
            "RULE", "SUBJECT", "STATE", "SEVERITY", "VALUE", "SINCE", "SILENCED", "ACKED",
            "SUMMARY",
        ]
    }

    fn cells(&self, now: SystemTime) -> Vec<String> {
        vec![
            self.rule.clone(),
            self.subject.clone(),
            self.state.clone(),
            self.severity.clone(),
            value(self.value),
            output::ago(now, from_unix_ms(self.active_since_unix_ms)),
            self.silenced_by.clone().unwrap_or_else(|| "-".into()),
            self.acked_by.clone().unwrap_or_else(|| "-".into()),
            self.annotations.get("summary").cloned().unwrap_or_default(),
        ]
    }

    fn resource_name(&self) -> Option<String> {
        Some(format!("alert/{}/{}", self.rule, self.subject))
    }
}

impl TableRow for AlertRuleView {
    fn headers() -> &'static [&'static str] {
        &[
            "NAME",
            "CONDITION",
            "FOR",
            "SEVERITY",
            "PENDING",
            "FIRING",
            "NOTIFY",
        ]
    }

    fn cells(&self, _now: SystemTime) -> Vec<String> {
        vec![
            self.name.clone(),
            self.condition.clone(),
            output::short_duration(std::time::Duration::from_secs(self.for_secs)),
            self.severity.clone(),
            self.pending.to_string(),
            self.firing.to_string(),
            if self.notify.is_empty() {
                "-".into()
            } else {
                self.notify.join(",")
            },
        ]
    }

    fn resource_name(&self) -> Option<String> {
        Some(format!("alertrule/{}", self.name))
    }
}

impl TableRow for ChannelView {
    fn headers() -> &'static [&'static str] {
        &[
            "NAME",
            "KIND",
            "TARGET",
            "MATCH",
            "REPEAT",
            "QUEUED",
            "LAST ERROR",
        ]
    }

    fn cells(&self, _now: SystemTime) -> Vec<String> {
        vec![
            self.name.clone(),
            self.kind.clone(),
            self.target.clone(),
            self.match_labels.as_ref().map_or_else(
                || "-".into(),
                |m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                },
            ),
            output::short_duration(std::time::Duration::from_secs(self.repeat_secs)),
            self.queued.to_string(),
            self.last_error.clone().unwrap_or_else(|| "-".into()),
        ]
    }

    fn resource_name(&self) -> Option<String> {
        Some(format!("notificationchannel/{}", self.name))
    }
}

impl TableRow for SilenceView {
    fn headers() -> &'static [&'static str] {
        &["ID", "MATCHERS", "UNTIL", "COVERS", "BY", "COMMENT"]
    }

    fn cells(&self, now: SystemTime) -> Vec<String> {
        vec![
            self.id.clone(),
            self.matchers
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
            output::relative(now, from_unix_ms(self.ends_unix_ms)),
            self.covers.to_string(),
            self.created_by.clone(),
            self.comment.clone(),
        ]
    }

    fn resource_name(&self) -> Option<String> {
        Some(format!("silence/{}", self.id))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn matchers_parse_and_bad_ones_say_how() {
        assert_eq!(
            parse_matcher("node=n1"),
            Ok(("node".to_string(), "n1".to_string()))
        );
        assert!(
            parse_matcher("n1")
                .expect_err("no =")
                .contains("NAME=VALUE")
        );
        assert!(parse_matcher("=x").is_err());
    }

    #[test]
    fn the_alert_table_shows_state_and_summary() {
        let now = UNIX_EPOCH + Duration::from_secs(100);
        let view = AlertView {
            rule: "node-hot".into(),
            subject: "n1".into(),
            state: "firing".into(),
            severity: "critical".into(),
            value: Some(97.25),
            active_since_unix_ms: 40_000,
            firing_since_unix_ms: Some(70_000),
            labels: BTreeMap::new(),
            annotations: BTreeMap::from([("summary".into(), "n1 is hot".into())]),
            silenced_by: None,
            acked_by: Some("admin".into()),
        };
        let text = output::table(&[view], now);
        let row = text.lines().nth(1).expect("a row");
        for cell in [
            "node-hot",
            "n1",
            "firing",
            "critical",
            "97.25",
            "1m ago",
            "admin",
            "n1 is hot",
        ] {
            assert!(row.contains(cell), "{cell} in {row}");
        }
    }
}

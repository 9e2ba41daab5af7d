//! `novacron policy list|delete`: autoscaling policies (apply them with
//! `novacron apply -f`).

use std::io::Write;
use std::time::SystemTime;

use clap::Subcommand;

use super::CliError;
use super::client::ApiClient;
use super::output::{self, OutputFormat, TableRow};
use novacron_api::PolicyView;

/// `novacron policy` subcommands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum PolicyCommand {
    /// List policies with their target's size and the latest decision.
    List,
    /// Delete a policy; a job it scaled runs its manifest's replicas again.
    Delete {
        /// The policy.
        name: String,
    },
}

/// Runs a `policy` subcommand.
pub async fn run(
    cmd: &PolicyCommand,
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
    now: SystemTime,
) -> Result<(), CliError> {
    match cmd {
        PolicyCommand::List => {
            let policies: Vec<PolicyView> = client.get(&["v1", "policies"]).await?;
            output::write_list(out, format, &policies, now)?;
        }
        PolicyCommand::Delete { name } => {
            let () = client
                .post(&["v1", "policies", name, "delete"], &serde_json::json!({}))
                .await?;
            writeln!(out, "policy {name} deleted").map_err(output::OutputError::Io)?;
        }
    }
    Ok(())
}

impl TableRow for PolicyView {
    fn headers() -> &'static [&'static str] {
        &[
            "NAME",
            "TARGET",
            "SIZE",
            "MIN",
            "MAX",
            "METRICS",
            "DECIDED",
            "LAST DECISION",
        ]
    }

    fn cells(&self, now: SystemTime) -> Vec<String> {
        let decision = self.last_decision.as_ref();
        vec![
            self.name.clone(),
            format!("{} {}", self.target_kind, self.target),
            self.current.map_or("-".into(), |c| c.to_string()),
            self.min_size.to_string(),
            self.max_size.to_string(),
            self.metrics.join(", "),
            decision.map_or("-".into(), |d| {
                output::ago(now, output::from_unix_ms(d.at_unix_ms))
            }),
            decision.map_or("-".into(), |d| d.explanation.clone()),
        ]
    }

    fn resource_name(&self) -> Option<String> {
        Some(format!("policy/{}", self.name))
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use novacron_api::DecisionView;

    #[test]
    fn the_table_shows_size_bounds_and_the_explanation() {
        let now = UNIX_EPOCH + Duration::from_secs(100);
        let view = PolicyView {
            name: "api-cpu".into(),
            target_kind: "job".into(),
            target: "api".into(),
            min_size: 1,
            max_size: 10,
            metrics: vec!["cpu 75% over 5m".into()],
            current: Some(6),
            last_decision: Some(DecisionView {
                at_unix_ms: 95_000,
                from: 4,
                to: 6,
                explanation: "api 4 → 6: cpu 91% over 5m, target 75%".into(),
            }),
            file: "p.yaml".into(),
            applied_by: "admin:admin".into(),
            applied_at_unix_ms: 1,
        };
        let text = output::table(&[view], now);
        let row = text.lines().nth(1).expect("a row");
        for cell in [
            "api-cpu",
            "job api",
            "6",
            "cpu 75% over 5m",
            "api 4 → 6: cpu 91%",
        ] {
            assert!(row.contains(cell), "{cell} in {row}");
        }
    }
}

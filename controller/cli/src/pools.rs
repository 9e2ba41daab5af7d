//! `novacron pool list`: node pools with their members, size, bounds and hourly
//! cost (apply `NodeTemplate` and `NodePool` manifests with `novacron apply -f`).

use std::io::Write;
use std::time::SystemTime;

use clap::Subcommand;

use super::CliError;
use super::client::ApiClient;
use super::output::{self, OutputFormat, TableRow};
use novacron_api::PoolStatus;

/// `novacron pool` subcommands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum PoolCommand {
    /// List node pools: provider, instance type, size within min and max, hourly
    /// cost and members.
    #[command(visible_alias = "ls")]
    List,
}

/// Runs a `pool` subcommand.
pub async fn run(
    cmd: &PoolCommand,
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
    now: SystemTime,
) -> Result<(), CliError> {
    match cmd {
        PoolCommand::List => {
            let pools: Vec<PoolStatus> = client.get(&["v1", "pools"]).await?;
            output::write_list(out, format, &pools, now)?;
        }
    }
    Ok(())
}

impl TableRow for PoolStatus {
    fn headers() -> &'static [&'static str] {
        &[
            "NAME", "PROVIDER", "TYPE", "CAPACITY", "SIZE", "MIN", "MAX", "COST/H", "NODES",
        ]
    }

    fn cells(&self, _now: SystemTime) -> Vec<String> {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("{} ({})", n.name, n.status))
            .collect();
        vec![
            self.name.clone(),
            self.provider.clone(),
            self.instance_type.clone(),
            self.capacity_type.clone(),
            self.size.to_string(),
            self.min_size.to_string(),
            self.max_size.to_string(),
            if self.currency.is_empty() {
                format!("{:.2}", self.hourly_cost)
            } else {
                format!("{:.2} {}", self.hourly_cost, self.currency)
            },
            match (&self.problem, nodes.is_empty()) {
                (Some(p), _) => format!("problem: {p}"),
                (None, true) => "-".into(),
                (None, false) => nodes.join(", "),
            },
        ]
    }

    fn resource_name(&self) -> Option<String> {
        Some(format!("pool/{}", self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use novacron_api::PoolNodeStatus;

    #[test]
    fn a_row_shows_the_cost_and_the_members() {
        let p = PoolStatus {
            name: "p".into(),
            provider: "docker".into(),
            instance_type: "d2".into(),
            capacity_type: "spot".into(),
            price_per_hour: 0.05,
            min_size: 0,
            max_size: 2,
            size: 2,
            hourly_cost: 0.1,
            currency: "USD".into(),
            nodes: vec![
                PoolNodeStatus {
                    name: "p-1".into(),
                    status: "ready".into(),
                    allocations: 1,
                },
                PoolNodeStatus {
                    name: "p-2".into(),
                    status: "provisioning".into(),
                    allocations: 0,
                },
            ],
            problem: None,
        };
        assert_eq!(
            p.cells(SystemTime::UNIX_EPOCH),
            [
                "p",
                "docker",
                "d2",
                "spot",
                "2",
                "0",
                "2",
                "0.10 USD",
                "p-1 (ready), p-2 (provisioning)"
            ]
        );
    }
}

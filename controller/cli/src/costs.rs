//! `novacron cost` (hourly cost per node, job, pool and capacity type) and
//! `novacron recommend` (right-sizing from p95 usage, idle jobs).

use std::io::Write;
use std::time::SystemTime;

use super::CliError;
use super::client::ApiClient;
use super::output::{self, OutputFormat, TableRow};
use novacron_api::{CostReport, GroupCost, JobRecommendation, NodeCost};
use novacron_common::cost::{BudgetStatus, MixStatus};

impl TableRow for BudgetStatus {
    fn headers() -> &'static [&'static str] {
        &["BUDGET", "PER HOUR", "LIMIT", "STATUS"]
    }

    fn cells(&self, _: SystemTime) -> Vec<String> {
        vec![
            self.subject(),
            money(self.hourly, ""),
            money(self.budget, ""),
            if self.exceeded {
                format!("EXCEEDED by {}", money(self.over, ""))
            } else {
                "ok".into()
            },
        ]
    }
}

impl TableRow for MixStatus {
    fn headers() -> &'static [&'static str] {
        &[
            "CLASS",
            "REPLICAS",
            "ON SPOT",
            "SPOT SHARE",
            "TARGET",
            "STATUS",
        ]
    }

    fn cells(&self, _: SystemTime) -> Vec<String> {
        vec![
            self.class.clone(),
            self.replicas.to_string(),
            self.spot_replicas.to_string(),
            format!("{:.0}%", self.actual_spot * 100.0),
            format!("{:.0}%", self.target_spot * 100.0),
            if self.off_target {
                "OFF TARGET".into()
            } else {
                "ok".into()
            },
        ]
    }
}

impl TableRow for NodeCost {
    fn headers() -> &'static [&'static str] {
        &[
            "NODE",
            "POOL",
            "CAPACITY",
            "PER HOUR",
            "ALLOCATED",
            "PRICE FROM",
        ]
    }

    fn cells(&self, _: SystemTime) -> Vec<String> {
        vec![
            self.node.clone(),
            self.pool.clone(),
            self.capacity.clone(),
            money(self.hourly, ""),
            format!("{:.0}%", self.allocated * 100.0),
            self.source.clone(),
        ]
    }
}

impl TableRow for GroupCost {
    fn headers() -> &'static [&'static str] {
        &["NAME", "COUNT", "PER HOUR"]
    }

    fn cells(&self, _: SystemTime) -> Vec<String> {
        vec![
            self.name.clone(),
            self.count.to_string(),
            money(self.hourly, ""),
        ]
    }
}

impl TableRow for JobRecommendation {
    fn headers() -> &'static [&'static str] {
        &[
            "JOB",
            "REPLICAS",
            "CPU",
            "MEMORY",
            "PER HOUR",
            "RECOMMENDATION",
        ]
    }

    fn cells(&self, _: SystemTime) -> Vec<String> {
        let r = &self.rightsize;
        vec![
            self.job.clone(),
            self.replicas.to_string(),
            format!(
                "{}m → {}m",
                r.requested_cpu_millis, r.recommended_cpu_millis
            ),
            format!(
                "{} → {}",
                output::bytes(r.requested_memory_bytes),
                output::bytes(r.recommended_memory_bytes)
            ),
            format!(
                "{} → {}",
                money(self.hourly_now, &self.currency),
                money(self.hourly_recommended, &self.currency)
            ),
            r.explanation.clone(),
        ]
    }
}

/// An amount with its currency: `0.1900 USD`; bare in a table whose header or
/// title names the currency (`currency` empty).
fn money(v: f64, currency: &str) -> String {
    if currency.is_empty() {
        format!("{v:.4}")
    } else {
        format!("{v:.4} {currency}")
    }
}

/// The currency as a table title says it: ` (USD)`, nothing when unknown.
fn in_currency(currency: &str) -> String {
    if currency.is_empty() {
        String::new()
    } else {
        format!(" ({currency})")
    }
}

/// `novacron cost`.
pub async fn cost(
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
    now: SystemTime,
) -> Result<(), CliError> {
    let report: CostReport = client.get(&["v1", "costs"]).await?;
    if !format.is_human() {
        return Ok(output::write_value(out, format, &report)?);
    }
    let io = output::OutputError::Io;
    let cur = &report.currency;
    writeln!(
        out,
        "fleet: {} per hour (amounts in {})\n",
        money(report.total_hourly, cur),
        if cur.is_empty() {
            "the catalog's currency"
        } else {
            cur
        }
    )
    .map_err(io)?;
    writeln!(
        out,
        "nodes{}:\n{}\n",
        in_currency(cur),
        output::table(&report.nodes, now)
    )
    .map_err(io)?;
    for (title, rows) in [
        ("jobs", &report.jobs),
        ("pools", &report.pools),
        ("capacity types", &report.capacity),
    ] {
        writeln!(
            out,
            "{title}{}:\n{}\n",
            in_currency(cur),
            output::table(rows, now)
        )
        .map_err(io)?;
    }
    if !report.budgets.is_empty() {
        writeln!(
            out,
            "budgets{}:\n{}\n",
            in_currency(cur),
            output::table(&report.budgets, now)
        )
        .map_err(io)?;
        for b in report.budgets.iter().filter(|b| b.exceeded) {
            writeln!(out, "ALERT: {}", b.message).map_err(io)?;
        }
    }
    if !report.mix.is_empty() {
        writeln!(
            out,
            "spot mix by class:\n{}\n",
            output::table(&report.mix, now)
        )
        .map_err(io)?;
    }
    Ok(())
}

/// `novacron recommend`.
pub async fn recommend(
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
    now: SystemTime,
) -> Result<(), CliError> {
    let recs: Vec<JobRecommendation> = client.get(&["v1", "recommendations"]).await?;
    if recs.is_empty() && format.is_human() {
        writeln!(
            out,
            "no recommendations yet: each job needs at least 30 usage samples (about 30 s of running replicas)"
        )
        .map_err(output::OutputError::Io)?;
        return Ok(());
    }
    Ok(output::write_list(out, format, &recs, now)?)
}

/// `novacron consolidate`: the repack plan (nothing is changed).
pub async fn consolidate(
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let plan: novacron_common::consolidate::Plan = client.get(&["v1", "consolidation"]).await?;
    if !format.is_human() {
        return Ok(output::write_value(out, format, &plan)?);
    }
    let io = output::OutputError::Io;
    if plan.retire.is_empty() {
        writeln!(
            out,
            "nothing to consolidate: no node of a managed pool can be emptied into the others"
        )
        .map_err(io)?;
        return Ok(());
    }
    writeln!(
        out,
        "retire {} node(s), saving {} per hour: {}",
        plan.retire.len(),
        money(plan.hourly_saving, &plan.currency),
        plan.retire.join(", ")
    )
    .map_err(io)?;
    for m in &plan.moves {
        writeln!(out, "  move {}: {} → {}", m.alloc, m.from, m.to).map_err(io)?;
    }
    Ok(())
}

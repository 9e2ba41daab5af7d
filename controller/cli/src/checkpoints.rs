//! `novacron alloc checkpoint`, `novacron alloc migrate`, `novacron checkpoint
//! list` and `novacron node drain --migrate`.

use std::io::{IsTerminal, Write};
use std::time::{Duration, SystemTime};

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use novacron_common::checkpoint::{BundleInfo, CheckpointMode};
use serde::Serialize;

use super::CliError;
use super::client::ApiClient;
use super::output::{self, OutputError, OutputFormat, TableRow};
use novacron_api::{CopyMode, DrainPlan, MigrationStatus, Phase};

/// `novacron checkpoint ...`.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum CheckpointCommand {
    /// List stored checkpoints, newest first.
    #[command(visible_alias = "ls")]
    List {
        /// Only this job's.
        #[arg(long)]
        job: Option<String>,
        /// Only this allocation's.
        #[arg(long)]
        alloc: Option<String>,
    },
}

#[derive(Serialize)]
struct ModeBody<'a> {
    mode: Option<CheckpointMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    to: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_downtime_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    copy: Option<CopyMode>,
}

/// `novacron alloc checkpoint ID [--mode M]`.
pub async fn checkpoint(
    client: &ApiClient,
    id: &str,
    mode: Option<CheckpointMode>,
    format: OutputFormat,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    // The controller answers once the bundle is in its store: a large
    // workload's dump and transfer take minutes, not the usual seconds.
    let info: BundleInfo = client
        .post_within(
            &["v1", "allocations", id, "checkpoint"],
            &ModeBody {
                mode,
                to: None,
                max_downtime_ms: None,
                copy: None,
            },
            CHECKPOINT_WAIT,
        )
        .await?;
    output::write_one(out, format, &info, || {
        format!(
            "checkpoint of {} taken on {} ({}, {}, dump {} ms)\n  {}\n",
            info.alloc,
            info.node,
            info.mode,
            output::bytes(info.size),
            info.dump_ms,
            info.digest
        )
    })?;
    Ok(())
}

/// `novacron checkpoint list`.
pub async fn run(
    cmd: &CheckpointCommand,
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
    now: SystemTime,
) -> Result<(), CliError> {
    let CheckpointCommand::List { job, alloc } = cmd;
    let mut query = Vec::new();
    if let Some(j) = job {
        query.push(("job", j.clone()));
    }
    if let Some(a) = alloc {
        query.push(("alloc", a.clone()));
    }
    let list: Vec<BundleInfo> = client
        .get_with_query(&["v1", "checkpoints"], &query)
        .await?;
    output::write_list(out, format, &list, now)?;
    Ok(())
}

impl TableRow for BundleInfo {
    fn headers() -> &'static [&'static str] {
        &[
            "DIGEST", "ALLOC", "JOB", "NODE", "MODE", "SIZE", "DUMP", "AGE",
        ]
    }

    fn cells(&self, now: SystemTime) -> Vec<String> {
        let age = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
            .saturating_sub(self.created_unix_ms);
        vec![
            self.digest[..12.min(self.digest.len())].to_string(),
            self.alloc.clone(),
            self.job.clone(),
            self.node.clone(),
            self.mode.to_string(),
            output::bytes(self.size),
            format!("{} ms", self.dump_ms),
            format!("{}s", age / 1000),
        ]
    }
}

/// How long `alloc checkpoint` waits for the controller's answer.
const CHECKPOINT_WAIT: Duration = Duration::from_secs(15 * 60);

/// How `alloc migrate` moves an allocation.
#[derive(Debug, Clone, Copy, Default)]
pub struct MigrateOptions<'a> {
    /// The target node (default: the scheduler's choice).
    pub to: Option<&'a str>,
    /// live, fs or auto.
    pub mode: Option<CheckpointMode>,
    /// post-copy or stop-copy (runc nodes).
    pub copy: Option<CopyMode>,
    /// A VM's longest planned pause.
    pub max_downtime: Option<Duration>,
}

/// `novacron alloc migrate ID [--to NODE] [--mode M]`: starts the migration and
/// follows it with a progress bar (on a terminal) until it completes or rolls back.
pub async fn migrate(
    client: &ApiClient,
    id: &str,
    how: MigrateOptions<'_>,
    format: OutputFormat,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let MigrateOptions {
        to,
        mode,
        copy,
        max_downtime,
    } = how;
    let started: MigrationStatus = client
        .post(
            &["v1", "allocations", id, "migrate"],
            &ModeBody {
                mode,
                to,
                max_downtime_ms: max_downtime.map(|d| d.as_millis() as u64),
                copy,
            },
        )
        .await?;
    let done = follow(client, &started, format.is_human()).await?;
    finish(&done, format, out)
}

async fn follow(
    client: &ApiClient,
    started: &MigrationStatus,
    show: bool,
) -> Result<MigrationStatus, CliError> {
    let bar = if show && std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} {msg:14} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(format!(
            "{} {} → {}",
            started.alloc, started.from, started.to
        ));
        Some(bar)
    } else {
        None
    };
    let mut last_phase = None;
    loop {
        let s: MigrationStatus = client.get(&["v1", "migrations", &started.id]).await?;
        if let Some(bar) = &bar {
            bar.set_length(s.bytes_total);
            bar.set_position(s.bytes_done);
            bar.set_message(match &s.vm {
                Some(_) if s.copy == Some(CopyMode::PostCopy) && s.phase == Phase::Restoring => {
                    "post-copy: pages".to_owned()
                }
                Some(_) if s.copy.is_some() => {
                    format!(
                        "{}: {}",
                        s.copy.map_or("", |c| c.as_str()),
                        phase_name(s.phase)
                    )
                }
                Some(vm) if s.phase == Phase::Transferring => vm_progress(vm),
                _ => phase_name(s.phase).to_owned(),
            });
        } else if show && last_phase != Some(s.phase) {
            eprintln!("{}: {}", started.id, phase_name(s.phase));
        }
        last_phase = Some(s.phase);
        if s.finished_unix_ms.is_some() {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A VM's copy as it goes: rounds over its memory and the rate it dirties
/// pages (QEMU's figures).
fn vm_progress(vm: &novacron_common::wire::VmMigrationProgress) -> String {
    format!(
        "round {}, {} pages/s dirtied{}",
        vm.rounds.max(1),
        vm.dirty_pages_rate,
        if vm.forced_pause { ", paused" } else { "" }
    )
}

fn finish(s: &MigrationStatus, format: OutputFormat, out: &mut dyn Write) -> Result<(), CliError> {
    output::write_one(out, format, s, || match (s.phase, &s.vm) {
        (Phase::Completed, Some(vm)) if s.copy.is_some() => format!(
            "{} migrated {} from {} to {} live under runc ({}: {} sent over {} ms; dump {} ms)\n",
            s.id,
            s.alloc,
            s.from,
            s.to,
            s.copy.map_or("", |c| c.as_str()),
            output::bytes(vm.transferred),
            vm.elapsed_ms,
            s.downtime_ms.unwrap_or(0),
        ),
        (Phase::Completed, Some(vm)) => format!(
            "{} migrated virtual machine {} from {} to {} live ({} of memory in {} rounds over {} ms; guest paused {} ms{})\n",
            s.id,
            s.alloc,
            s.from,
            s.to,
            output::bytes(vm.transferred),
            vm.rounds,
            vm.elapsed_ms,
            s.downtime_ms.unwrap_or(0),
            if vm.forced_pause {
                ", paused early: it did not converge"
            } else {
                ""
            }
        ),
        (Phase::Completed, None) => format!(
            "{} migrated {} from {} to {} ({} moved, {} ms from checkpoint to running)\n",
            s.id,
            s.alloc,
            s.from,
            s.to,
            output::bytes(s.bytes_total),
            s.downtime_ms.unwrap_or(0)
        ),
        _ => String::new(),
    })?;
    if s.phase != Phase::Completed {
        return Err(CliError::Remote {
            code: 1,
            message: format!(
                "{}: migration of {} to {} failed: {}",
                s.id,
                s.alloc,
                s.to,
                s.error.as_deref().unwrap_or("unknown")
            ),
        });
    }
    Ok(())
}

/// What `node drain --migrate` did, for `-o json|yaml`.
#[derive(Debug, Serialize)]
struct DrainReport {
    node: String,
    migrations: Vec<MigrationStatus>,
    refused: Vec<(String, String)>,
}

/// `novacron node drain NAME --migrate`: cordons the node, then migrates its
/// running allocations one after another, each with its progress bar.
pub async fn drain(
    client: &ApiClient,
    name: &str,
    format: OutputFormat,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let plan: DrainPlan = client
        .post(&["v1", "nodes", name, "drain"], &serde_json::json!({}))
        .await?;
    let table = format.is_human();
    if table {
        eprintln!(
            "{name} is cordoned; migrating {} allocation(s) one after another",
            plan.allocations.len()
        );
    }
    let mut report = DrainReport {
        node: plan.node.clone(),
        migrations: Vec::new(),
        refused: Vec::new(),
    };
    for id in &plan.allocations {
        let started: Result<MigrationStatus, _> = client
            .post(
                &["v1", "allocations", id, "migrate"],
                &ModeBody {
                    mode: None,
                    to: None,
                    max_downtime_ms: None,
                    copy: None,
                },
            )
            .await;
        match started {
            Ok(s) => report.migrations.push(follow(client, &s, table).await?),
            Err(e) => report.refused.push((id.clone(), e.to_string())),
        }
    }
    output::write_one(out, format, &report, || {
        let mut text = String::new();
        for m in &report.migrations {
            let how = match m.phase {
                Phase::Completed => format!(
                    "moved to {} ({} ms from checkpoint to running)",
                    m.to,
                    m.downtime_ms.unwrap_or(0)
                ),
                _ => format!(
                    "stayed on {name}: {}",
                    m.error.as_deref().unwrap_or("unknown")
                ),
            };
            text.push_str(&format!("{} {}: {how}\n", m.id, m.alloc));
        }
        for (alloc, why) in &report.refused {
            text.push_str(&format!("{alloc}: not migrated: {why}\n"));
        }
        if text.is_empty() {
            text = format!("{name} is cordoned; it ran no allocation to migrate\n");
        }
        text
    })
    .map_err(|e: OutputError| CliError::Output(e))?;
    let failed = report
        .migrations
        .iter()
        .filter(|m| m.phase != Phase::Completed)
        .count()
        + report.refused.len();
    if failed > 0 {
        return Err(CliError::Remote {
            code: 1,
            message: format!("{failed} allocation(s) could not be migrated off {name}"),
        });
    }
    Ok(())
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Checkpointing => "checkpointing",
        Phase::Transferring => "transferring",
        Phase::Restoring => "restoring",
        Phase::Completed => "completed",
        Phase::RolledBack => "rolled back",
    }
}

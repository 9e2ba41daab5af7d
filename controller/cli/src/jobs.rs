//! `novacron apply`, `novacron job ...` and `novacron alloc ...`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::Subcommand;
use novacron_common::wire::AllocState;

use super::CliError;
use super::client::ApiClient;
use super::output::{self, OutputFormat, TableRow};
use novacron_api::{
    AllocView, ApplyRequest, ApplyResult, FieldChange, JobDetail, JobPlan, JobSummary,
    JobVersionView, PolicyApplyResult,
};

/// `novacron job` subcommands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum JobCommand {
    /// List jobs.
    List,
    /// Show a job: versions, allocations, and why replicas are not placed.
    Status {
        /// The job.
        #[arg(add = crate::complete::jobs())]
        name: String,
    },
    /// Stop a job and all its allocations.
    Stop {
        /// The job.
        #[arg(add = crate::complete::jobs())]
        name: String,
        /// Then purge it: once its allocations have stopped, the controller
        /// forgets it with its versions and allocations (its events stay), and
        /// the name is free.
        #[arg(long)]
        purge: bool,
        /// With --purge, how long to wait for the allocations to stop.
        #[arg(long, default_value = "60s", value_parser = parse_wait, requires = "purge")]
        wait: Duration,
    },
    /// Show what applying a Job manifest would do, changing nothing: the fields
    /// that differ from the stored job and the allocations the controller's next
    /// reconcile pass would start and stop (its real scheduler on a copy of its
    /// state). The same as `apply --dry-run`.
    Plan {
        /// The manifest: a file, `-` for standard input, or a directory.
        #[arg(value_name = "FILE", required = true)]
        file: Vec<PathBuf>,
    },
    /// The stored versions of a job (the last 10), newest first: when, by
    /// whom, and what changed from the version before.
    History {
        /// The job.
        #[arg(add = crate::complete::jobs())]
        name: String,
        /// Print each version's changes in full (default: a count per version;
        /// `-o json|yaml` always carries them).
        #[arg(long)]
        changes: bool,
    },
    /// Submit a stored version of a job again, as a new version (rolled out like
    /// any apply); `job history` lists the versions.
    Revert {
        /// The job.
        #[arg(add = crate::complete::jobs())]
        name: String,
        /// The stored version to go back to.
        version: u64,
    },
    /// Set a job's replicas: re-applies its current manifest with
    /// `spec.replicas: N` (a new version, rolled out like any apply). An
    /// autoscaling policy on the job still decides the running count.
    Scale {
        /// The job.
        #[arg(add = crate::complete::jobs())]
        name: String,
        /// The replicas the manifest asks for.
        replicas: u32,
    },
}

/// `novacron alloc` subcommands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum AllocCommand {
    /// List allocations.
    List {
        /// Only this job.
        #[arg(long, add = crate::complete::jobs())]
        job: Option<String>,
        /// Only this node.
        #[arg(long, add = crate::complete::nodes())]
        node: Option<String>,
    },
    /// Show one allocation: state, resources and where its ports are published.
    Show {
        /// The allocation id.
        id: String,
    },
    /// Print an allocation's container output.
    Logs {
        /// The allocation id.
        #[arg(add = crate::complete::allocs())]
        id: String,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines first.
        #[arg(long, default_value_t = 0)]
        tail: u32,
    },
    /// Restart an allocation: its agent stops it and the controller places a
    /// fresh one for its job (a new id, where the scheduler decides), recorded
    /// as an `alloc.restarted` event.
    Restart {
        /// The allocation id.
        #[arg(add = crate::complete::allocs())]
        id: String,
    },
    /// Run a command in an allocation's container, live; exits with its exit code.
    Exec(super::exec::AllocExecArgs),
    /// Checkpoint an allocation now (it keeps running) and store the bundle.
    Checkpoint {
        /// The allocation id.
        #[arg(add = crate::complete::allocs())]
        id: String,
        /// live, fs or auto (default: the job's policy, else auto).
        #[arg(long)]
        mode: Option<novacron_common::checkpoint::CheckpointMode>,
    },
    /// Move a running allocation to another node with its state (checkpoint,
    /// transfer, restore); a failure rolls back to the source.
    Migrate {
        /// The allocation id.
        #[arg(add = crate::complete::allocs())]
        id: String,
        /// The target node (default: the scheduler's choice).
        #[arg(long)]
        to: Option<String>,
        /// live, fs or auto (default: the job's policy, else auto); between
        /// two runc nodes also post-copy (live; the default where both
        /// support lazy pages: the container resumes on the target at once
        /// and fetches its memory from the source) or stop-copy (live; all
        /// memory is copied during the pause).
        #[arg(long, value_parser = parse_migrate_mode)]
        mode: Option<MigrateMode>,
        /// A virtual machine's longest planned pause (QEMU's downtime-limit,
        /// e.g. 100ms, 2s; default 300ms).
        #[arg(long, value_name = "DURATION", value_parser = parse_downtime)]
        max_downtime: Option<Duration>,
    },
}

/// `alloc migrate --mode`: a checkpoint mode, or a live copy mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrateMode {
    /// live, fs or auto.
    Checkpoint(novacron_common::checkpoint::CheckpointMode),
    /// post-copy or stop-copy (live, between runc nodes).
    Copy(novacron_api::CopyMode),
}

fn parse_migrate_mode(s: &str) -> Result<MigrateMode, String> {
    if let Ok(c) = s.parse::<novacron_api::CopyMode>() {
        return Ok(MigrateMode::Copy(c));
    }
    s.parse::<novacron_common::checkpoint::CheckpointMode>()
        .map(MigrateMode::Checkpoint)
        .map_err(|_| format!("{s:?}: expected live, fs, auto, post-copy or stop-copy"))
}

fn parse_downtime(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}; expected e.g. 100ms, 2s"))
}

/// The kinds `novacron apply` sends, and where.
pub const APPLY_KINDS: &[(&str, &[&str])] = &[
    ("Job", &["v1", "jobs"]),
    ("AutoScalingPolicy", &["v1", "policies"]),
    ("NodePool", &["v1", "pools"]),
    ("NodeTemplate", &["v1", "pools"]),
    ("Secret", &["v1", "secrets"]),
    ("AlertRule", &["v1", "alerts", "rules"]),
    ("NotificationChannel", &["v1", "alerts", "channels"]),
    ("VMTemplate", &["v1", "vms", "templates"]),
];

/// `novacron apply -f SOURCE...`: each source is a file, `-` (standard input) or
/// a directory (its `*.yaml` and `*.yml` files, sorted by name, not recursive).
/// A file goes to the endpoint of its `kind` (the controller validates it); a file
/// of several Job documents is sent one job at a time, in order, each with its
/// line numbers kept. The first refusal ends the command; what was applied before
/// it stays applied.
///
/// With `dry_run`, each Job document is planned instead (see [`plan`]) and
/// nothing is applied; other kinds are refused before anything is sent.
pub async fn apply(
    client: &ApiClient,
    sources: &[std::path::PathBuf],
    dry_run: bool,
    format: OutputFormat,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let sources = read_sources(sources)?;
    if dry_run {
        for (name, text) in &sources {
            let kind = manifest_kind(name, text).map_err(CliError::Invalid)?;
            if kind != "Job" {
                return Err(CliError::Usage(format!(
                    "{name}: --dry-run plans Job manifests only; this file is a {kind}"
                )));
            }
        }
        for (name, text) in sources {
            for manifest in job_documents(&name, &text) {
                plan(client, &name, manifest, format, out).await?;
            }
        }
        return Ok(());
    }
    for (name, text) in sources {
        let kind = manifest_kind(&name, &text).map_err(CliError::Invalid)?;
        let docs = if kind == "Job" {
            job_documents(&name, &text)
        } else {
            vec![text]
        };
        for manifest in docs {
            apply_one(client, &name, kind, manifest, format, out).await?;
        }
    }
    Ok(())
}

/// The manifests `sources` name, as (file name, text), in order.
fn read_sources(sources: &[std::path::PathBuf]) -> Result<Vec<(String, String)>, CliError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| CliError::ReadManifest {
            path: path.to_path_buf(),
            source,
        })
    };
    let mut all = Vec::new();
    for source in sources {
        if source.as_os_str() == "-" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|source| {
                CliError::ReadManifest {
                    path: "standard input".into(),
                    source,
                }
            })?;
            all.push(("<stdin>".to_string(), text));
        } else if source.is_dir() {
            let entries = std::fs::read_dir(source).map_err(|e| CliError::ReadManifest {
                path: source.clone(),
                source: e,
            })?;
            let mut files = Vec::new();
            for entry in entries {
                let path = entry
                    .map_err(|e| CliError::ReadManifest {
                        path: source.clone(),
                        source: e,
                    })?
                    .path();
                let yaml = matches!(
                    path.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml")
                );
                if yaml && path.is_file() {
                    files.push(path);
                }
            }
            if files.is_empty() {
                return Err(CliError::Invalid(format!(
                    "{}: no *.yaml or *.yml files in this directory (subdirectories are not read)",
                    source.display()
                )));
            }
            files.sort();
            for path in files {
                let text = read(&path)?;
                all.push((path.display().to_string(), text));
            }
        } else {
            all.push((source.display().to_string(), read(source)?));
        }
    }
    Ok(all)
}

/// The documents of a Job file, each as its own manifest whose lines keep their
/// numbers in the file (the lines of the other documents become empty), so that
/// the controller's errors point at the right line. A file of one document, or one
/// whose documents the split below does not account for (the YAML parser counts
/// otherwise), is returned whole: the controller then judges it as it is.
///
/// A line that starts with `---` or `...` followed by a space or its end is a
/// document marker in YAML wherever it appears (no scalar may contain one), so
/// splitting there is exact.
pub fn job_documents(file: &str, text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let marker = |line: &str, m: &str| {
        line.strip_prefix(m)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
    };
    // Each document: the range of its lines; a `---` line opens a document, a
    // `...` line closes one.
    let mut docs: Vec<std::ops::Range<usize>> = Vec::new();
    let mut start = 0;
    for (i, line) in lines.iter().enumerate() {
        if marker(line, "---") {
            docs.push(start..i);
            start = i;
        } else if marker(line, "...") {
            docs.push(start..i + 1);
            start = i + 1;
        }
    }
    docs.push(start..lines.len());
    let content = |line: &str| {
        let t = line.trim();
        let t = t
            .strip_prefix("---")
            .or_else(|| t.strip_prefix("..."))
            .filter(|_| marker(line, "---") || marker(line, "..."))
            .map_or(t, str::trim);
        !t.is_empty() && !t.starts_with('#')
    };
    docs.retain(|r| lines[r.clone()].iter().any(|l| content(l)));
    // The parser's count of non-empty documents; a syntax error ends the count
    // (the parser cannot go on past one) and leaves the file whole.
    let mut parsed = Some(0);
    if let Ok(found) = novacron_common::manifest::yaml_documents(file, text) {
        for doc in found {
            match <Option<serde::de::IgnoredAny> as serde::Deserialize>::deserialize(doc) {
                Ok(None) => {}
                Ok(Some(_)) => parsed = parsed.map(|n| n + 1),
                Err(_) => {
                    parsed = None;
                    break;
                }
            }
        }
    } else {
        parsed = None;
    }
    if docs.len() < 2 || Some(docs.len()) != parsed {
        return vec![text.to_string()];
    }
    docs.into_iter()
        .map(|r| {
            let mut manifest = "\n".repeat(r.start);
            for line in &lines[r] {
                manifest.push_str(line);
            }
            manifest
        })
        .collect()
}

/// Plans one Job manifest (`POST /v1/jobs/{name}/plan`) and prints the plan.
async fn plan(
    client: &ApiClient,
    file: &str,
    manifest: String,
    format: OutputFormat,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    // The name goes in the path; a manifest without one is judged by the
    // controller, whose answer locates the problem.
    let job = manifest_job_name(file, &manifest).unwrap_or_else(|| "-".into());
    let req = ApplyRequest {
        file: file.to_string(),
        manifest,
    };
    let plan: JobPlan = client.post(&["v1", "jobs", &job, "plan"], &req).await?;
    match format {
        OutputFormat::Table | OutputFormat::Wide => {
            write!(out, "{}", plan_text(&plan)).map_err(output::OutputError::Io)?
        }
        OutputFormat::Name => writeln!(out, "job/{}", plan.job).map_err(output::OutputError::Io)?,
        _ => output::write_value(out, format, &plan)?,
    }
    Ok(())
}

/// `metadata.name` of a manifest, if it has a string there.
fn manifest_job_name(file: &str, text: &str) -> Option<String> {
    let doc = novacron_common::manifest::yaml_documents(file, text)
        .ok()?
        .find_map(|doc| {
            <serde_json::Value as serde::Deserialize>::deserialize(doc)
                .ok()
                .filter(|v| !v.is_null())
        })?;
    doc["metadata"]["name"].as_str().map(str::to_string)
}

/// A plan for people: what `apply` would answer, the changed fields, and the
/// allocations the next reconcile pass would start and stop.
pub fn plan_text(plan: &JobPlan) -> String {
    let mut t = String::new();
    let version = match (plan.outcome.as_str(), plan.current_version) {
        ("unchanged", _) => format!("version {}", plan.version),
        (_, Some(current)) => format!("version {current} -> {}", plan.version),
        (_, None) => format!("version {}", plan.version),
    };
    t.push_str(&format!(
        "job {}: would be {} ({version}); nothing was applied\n",
        plan.job, plan.outcome
    ));
    if !plan.changes.is_empty() {
        t.push_str("Changes:\n");
        t.push_str(&changes_text(&plan.changes, "  "));
    }
    if plan.placements.is_empty() && plan.stops.is_empty() && plan.unplaced == 0 {
        t.push_str("Placement: nothing to start or stop\n");
    } else {
        t.push_str("Placement (the next reconcile pass):\n");
        for p in &plan.placements {
            let ports = if p.ports.is_empty() {
                String::new()
            } else {
                format!(" ({})", p.ports.join(", "))
            };
            t.push_str(&format!(
                "  + start version {} on {}{ports}\n",
                p.version, p.node
            ));
        }
        for s in &plan.stops {
            let of = if s.job == plan.job {
                String::new()
            } else {
                format!(" of job {}", s.job)
            };
            t.push_str(&format!(
                "  - stop {}{of} on {}: {}\n",
                s.alloc, s.node, s.reason
            ));
        }
        if plan.unplaced > 0 {
            t.push_str(&format!(
                "  ! {} replica{} cannot be placed: {}\n",
                plan.unplaced,
                if plan.unplaced == 1 { "" } else { "s" },
                plan.message
            ));
        }
    }
    t
}

/// Changed fields, one per line: `~ path: old -> new`, `+ path: new`,
/// `- path: old`.
pub fn changes_text(changes: &[FieldChange], indent: &str) -> String {
    let mut t = String::new();
    for c in changes {
        let line = match (&c.old, &c.new) {
            (Some(old), Some(new)) => format!("~ {}: {old} -> {new}", c.path),
            (None, Some(new)) => format!("+ {}: {new}", c.path),
            (Some(old), None) => format!("- {}: {old}", c.path),
            (None, None) => format!("~ {}", c.path),
        };
        t.push_str(indent);
        t.push_str(&line);
        t.push('\n');
    }
    t
}

async fn apply_one(
    client: &ApiClient,
    name: &str,
    kind: &str,
    manifest: String,
    format: OutputFormat,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let req = ApplyRequest {
        file: name.to_string(),
        manifest,
    };
    match kind {
        "AutoScalingPolicy" => {
            let result: PolicyApplyResult = client.post(&["v1", "policies"], &req).await?;
            match format {
                OutputFormat::Table | OutputFormat::Wide => writeln!(
                    out,
                    "policy {} for {} {}",
                    result.policy, result.target, result.outcome
                )
                .map_err(output::OutputError::Io)?,
                OutputFormat::Name => {
                    writeln!(out, "policy/{}", result.policy).map_err(output::OutputError::Io)?
                }
                _ => output::write_value(out, format, &result)?,
            }
        }
        "Secret" => {
            let result: novacron_api::SecretSetResult =
                client.post(&["v1", "secrets"], &req).await?;
            match format {
                OutputFormat::Table | OutputFormat::Wide => {
                    crate::secrets::write_set(out, &result).map_err(output::OutputError::Io)?
                }
                OutputFormat::Name => {
                    writeln!(out, "secret/{}", result.secret).map_err(output::OutputError::Io)?
                }
                _ => output::write_value(out, format, &result)?,
            }
        }
        "Job" => {
            let result: ApplyResult = client.post(&["v1", "jobs"], &req).await?;
            match format {
                OutputFormat::Table | OutputFormat::Wide => writeln!(
                    out,
                    "job {} {} (version {})",
                    result.job, result.outcome, result.version
                )
                .map_err(output::OutputError::Io)?,
                OutputFormat::Name => {
                    writeln!(out, "job/{}", result.job).map_err(output::OutputError::Io)?
                }
                _ => output::write_value(out, format, &result)?,
            }
        }
        other => {
            let path = APPLY_KINDS
                .iter()
                .find(|(k, _)| *k == other)
                .map_or(&["v1", "jobs"][..], |(_, p)| *p);
            let result: serde_json::Value = client.post(path, &req).await?;
            match format {
                OutputFormat::Table | OutputFormat::Wide => {
                    writeln!(out, "{other} applied").map_err(output::OutputError::Io)?;
                    output::write_value(out, OutputFormat::Yaml, &result)?;
                }
                // The pool endpoint answers each document's kind and name.
                OutputFormat::Name => {
                    for doc in result.as_array().into_iter().flatten() {
                        if let (Some(kind), Some(name)) =
                            (doc["kind"].as_str(), doc["name"].as_str())
                        {
                            writeln!(out, "{}/{name}", kind.to_lowercase())
                                .map_err(output::OutputError::Io)?;
                        }
                    }
                }
                _ => output::write_value(out, format, &result)?,
            }
        }
    }
    Ok(())
}

pub use novacron_common::manifest::scaled_manifest;

/// The `kind` of the documents in `text` (a pool and its templates may share a
/// file); the controller checks everything else. A file whose YAML does not parse,
/// or that names no kind, goes to the job endpoint, whose answer locates the
/// problem. A file nested too deep to parse quickly is refused here (see
/// [`novacron_common::manifest::guard`]).
pub fn manifest_kind(file: &str, text: &str) -> Result<&'static str, String> {
    #[derive(serde::Deserialize)]
    struct Peek {
        #[serde(default)]
        kind: Option<String>,
    }
    let accepted = APPLY_KINDS
        .iter()
        .map(|(k, _)| *k)
        .collect::<Vec<_>>()
        .join(", ");
    let mut found: Vec<(&'static str, &'static [&'static str])> = Vec::new();
    let docs = novacron_common::manifest::yaml_documents(file, text).map_err(|e| e.to_string())?;
    for doc in docs {
        let kind = match <Option<Peek> as serde::Deserialize>::deserialize(doc) {
            Ok(Some(Peek { kind: Some(k) })) => k,
            Ok(_) => continue,
            Err(_) => return Ok("Job"),
        };
        let Some(&(k, path)) = APPLY_KINDS.iter().find(|(k, _)| *k == kind) else {
            return Err(format!(
                "{file}: kind {kind:?} is not something `novacron apply` accepts; expected one of {accepted}"
            ));
        };
        if !found.iter().any(|(f, _)| *f == k) {
            found.push((k, path));
        }
    }
    match found.as_slice() {
        [] => Ok("Job"),
        [(first, path), rest @ ..] if rest.iter().all(|(_, p)| p == path) => Ok(first),
        many => Err(format!(
            "{file}: the documents mix kinds ({}) that go to different endpoints; expected one kind per file (NodePool and NodeTemplate may share one), one of {accepted}",
            many.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// Runs a `job` subcommand.
pub async fn run_job(
    cmd: &JobCommand,
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
    now: SystemTime,
) -> Result<(), CliError> {
    match cmd {
        JobCommand::List => {
            let jobs: Vec<JobSummary> = client.get(&["v1", "jobs"]).await?;
            output::write_list(out, format, &jobs, now)?;
        }
        JobCommand::Status { name } => {
            let job: JobDetail = client.get(&["v1", "jobs", name]).await?;
            output::write_one(out, format, &job, || job_detail(&job, now))?;
        }
        JobCommand::Plan { file } => {
            return apply(client, file, true, format, out).await;
        }
        JobCommand::History { name, changes } => {
            let versions: Vec<JobVersionView> =
                client.get(&["v1", "jobs", name, "versions"]).await?;
            if format.is_human() {
                write!(out, "{}", history_text(&versions, *changes, now))
                    .map_err(output::OutputError::Io)?;
            } else {
                output::write_list(out, format, &versions, now)?;
            }
        }
        JobCommand::Revert { name, version } => {
            let result: ApplyResult = client
                .post(
                    &["v1", "jobs", name, "revert"],
                    &serde_json::json!({ "version": version }),
                )
                .await?;
            match format {
                OutputFormat::Table | OutputFormat::Wide => writeln!(
                    out,
                    "job {} reverted to version {version}: {} (version {})",
                    result.job, result.outcome, result.version
                )
                .map_err(output::OutputError::Io)?,
                OutputFormat::Name => {
                    writeln!(out, "job/{}", result.job).map_err(output::OutputError::Io)?
                }
                _ => output::write_value(out, format, &result)?,
            }
        }
        JobCommand::Scale { name, replicas } => {
            let job: JobDetail = client.get(&["v1", "jobs", name]).await?;
            if job.summary.job_type == novacron_common::manifest::JobType::System {
                return Err(CliError::Invalid(format!(
                    "job {name} is a system job: it runs one replica per matching node and has no replicas to scale"
                )));
            }
            let file = format!("job {name} (scaled to {replicas})");
            let manifest =
                scaled_manifest(&file, &job.manifest, *replicas).map_err(CliError::Invalid)?;
            let result: ApplyResult = client
                .post(&["v1", "jobs"], &ApplyRequest { file, manifest })
                .await?;
            match format {
                OutputFormat::Table | OutputFormat::Wide => {
                    writeln!(
                        out,
                        "job {} scaled to {replicas}: {} (version {})",
                        result.job, result.outcome, result.version
                    )
                    .map_err(output::OutputError::Io)?;
                    if let Some(by) = &job.summary.scaled_by {
                        writeln!(
                            out,
                            "note: the running count is set by {by}, which still decides it"
                        )
                        .map_err(output::OutputError::Io)?;
                    }
                }
                OutputFormat::Name => {
                    writeln!(out, "job/{}", result.job).map_err(output::OutputError::Io)?
                }
                _ => output::write_value(out, format, &result)?,
            }
        }
        JobCommand::Stop {
            name, purge: false, ..
        } => {
            let () = client
                .post(&["v1", "jobs", name, "stop"], &serde_json::json!({}))
                .await?;
            writeln!(out, "job {name} stopped; its allocations are stopping")
                .map_err(output::OutputError::Io)?;
        }
        JobCommand::Stop {
            name,
            purge: true,
            wait,
        } => {
            stop_and_purge(client, name, *wait).await?;
            writeln!(out, "job {name} stopped and purged").map_err(output::OutputError::Io)?;
        }
    }
    Ok(())
}

/// Runs an `alloc` subcommand.
pub async fn run_alloc(
    cmd: &AllocCommand,
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
    now: SystemTime,
) -> Result<(), CliError> {
    match cmd {
        AllocCommand::List { job, node } => {
            let allocs: Vec<AllocView> = client
                .get_with_query(&["v1", "allocations"], &query_pairs(job, node))
                .await?;
            output::write_list(out, format, &allocs, now)?;
        }
        AllocCommand::Show { id } => {
            let alloc: AllocView = client.get(&["v1", "allocations", id]).await?;
            output::write_one(out, format, &alloc, || alloc_detail(&alloc, now))?;
        }
        AllocCommand::Exec(args) => {
            return super::exec::alloc_exec(args, client, format, out).await;
        }
        AllocCommand::Restart { id } => {
            let alloc: AllocView = client
                .post(
                    &["v1", "allocations", id, "restart"],
                    &serde_json::json!({}),
                )
                .await?;
            match format {
                OutputFormat::Table | OutputFormat::Wide => writeln!(
                    out,
                    "alloc {id} restarting: it stops on {} and job {} gets a fresh allocation",
                    alloc.node, alloc.job
                )
                .map_err(output::OutputError::Io)?,
                OutputFormat::Name => {
                    writeln!(out, "alloc/{id}").map_err(output::OutputError::Io)?
                }
                _ => output::write_value(out, format, &alloc)?,
            }
        }
        AllocCommand::Checkpoint { id, mode } => {
            return super::checkpoints::checkpoint(client, id, *mode, format, out).await;
        }
        AllocCommand::Migrate {
            id,
            to,
            mode,
            max_downtime,
        } => {
            let (mode, copy) = match *mode {
                None => (None, None),
                Some(MigrateMode::Checkpoint(m)) => (Some(m), None),
                Some(MigrateMode::Copy(c)) => (None, Some(c)),
            };
            return super::checkpoints::migrate(
                client,
                id,
                super::checkpoints::MigrateOptions {
                    to: to.as_deref(),
                    mode,
                    copy,
                    max_downtime: *max_downtime,
                },
                format,
                out,
            )
            .await;
        }
        AllocCommand::Logs { id, follow, tail } => {
            let mut response = client
                .stream(
                    &["v1", "allocations", id, "logs"],
                    &[("follow", follow.to_string()), ("tail", tail.to_string())],
                    Duration::from_secs(15),
                )
                .await?;
            loop {
                match response.chunk().await {
                    Ok(Some(bytes)) => {
                        out.write_all(&bytes).map_err(output::OutputError::Io)?;
                        out.flush().map_err(output::OutputError::Io)?;
                    }
                    Ok(None) => break,
                    Err(e) => return Err(client.stream_error(&e).into()),
                }
            }
        }
    }
    Ok(())
}

/// The `alloc show` table view.
fn alloc_detail(a: &AllocView, now: SystemTime) -> String {
    let state = alloc_state(a);
    let mut text = output::key_values(
        "",
        &[
            ("ID", a.id.clone()),
            ("Job", format!("{} (version {})", a.job, a.version)),
            ("Node", a.node.clone()),
            ("State", state),
            (
                "Healthy",
                match a.healthy {
                    Some(true) => "yes".into(),
                    Some(false) => "no".into(),
                    None => "-".into(),
                },
            ),
            ("Restarts", a.restarts.to_string()),
            (
                "Exit code",
                a.exit_code.map_or("-".into(), |c| c.to_string()),
            ),
            (
                "Resources",
                format!(
                    "{}m CPU, {} memory{}{}",
                    a.cpu_millis,
                    output::bytes(a.memory_bytes),
                    if a.disk_bytes > 0 {
                        format!(", {} disk", output::bytes(a.disk_bytes))
                    } else {
                        String::new()
                    },
                    if a.gpu_uuids.is_empty() {
                        String::new()
                    } else {
                        format!(", GPUs {}", a.gpu_uuids.join(","))
                    }
                ),
            ),
            ("Priority", a.priority.to_string()),
            (
                "Created",
                output::timestamp(now, output::from_unix_ms(a.created_unix_ms)),
            ),
            (
                "Updated",
                output::timestamp(now, output::from_unix_ms(a.updated_unix_ms)),
            ),
            ("Message", a.message.clone()),
        ],
    );
    text.push_str("\nPorts:\n");
    let lines = port_lines(a);
    if lines.is_empty() {
        text.push_str("  none\n");
    }
    for line in lines {
        text.push_str(&format!("  {line}\n"));
    }
    text
}

/// One line per port for `alloc show`: where it is published on the node and
/// what it reaches (`http  127.0.0.1:20001 -> 8080/tcp`), every binding the
/// node reported (IPv4 and IPv6 alike); a port not (yet) published shows the
/// host port it holds and why there is no address.
fn port_lines(a: &AllocView) -> Vec<String> {
    let mut lines = Vec::new();
    let width = a.ports.iter().map(|p| p.name.len()).max().unwrap_or(0);
    for p in &a.ports {
        let bound: Vec<String> = a
            .published
            .iter()
            .filter(|b| b.container_port == p.container_port && b.protocol == p.protocol)
            .map(|b| b.address().to_string())
            .collect();
        let name = &p.name;
        if bound.is_empty() {
            lines.push(format!(
                "{name:<width$}  host port {} -> {}/{} (not published: {})",
                p.host_port,
                p.container_port,
                p.protocol,
                if a.state == AllocState::Running {
                    "the node has not reported it yet"
                } else {
                    "not running"
                }
            ));
        } else {
            lines.push(format!(
                "{name:<width$}  {} -> {}/{}",
                bound.join(", "),
                p.container_port,
                p.protocol
            ));
        }
    }
    // Bindings without a port of the manifest (none today; shown if a node has
    // them, so nothing published is hidden).
    for b in &a.published {
        if !a
            .ports
            .iter()
            .any(|p| p.container_port == b.container_port && p.protocol == b.protocol)
        {
            lines.push(format!(
                "{:<width$}  {} -> {}/{}",
                "-",
                b.address(),
                b.container_port,
                b.protocol
            ));
        }
    }
    lines
}

/// The `job status` table view.
fn job_detail(job: &JobDetail, now: SystemTime) -> String {
    let s = &job.summary;
    let text = output::key_values(
        "",
        &[
            ("Name", s.name.clone()),
            ("Type", format!("{:?}", s.job_type).to_lowercase()),
            ("Status", s.status.clone()),
            ("Version", s.version.to_string()),
            (
                "Stable version",
                s.stable_version
                    .map_or("none yet".into(), |v| v.to_string()),
            ),
            (
                "Replicas",
                format!(
                    "{} wanted, {} running, {} healthy",
                    s.replicas, s.running, s.healthy
                ),
            ),
            (
                "Submitted",
                format!(
                    "{} by {}",
                    output::timestamp(now, output::from_unix_ms(s.submitted_at_unix_ms)),
                    s.submitted_by
                ),
            ),
        ],
    );
    let mut body = text;
    if !s.message.is_empty() {
        body.push_str(&format!("\n{}\n", s.message));
    }
    body.push_str("\nAllocations:\n");
    body.push_str(&output::indented(
        &output::table(&job.allocations, now),
        "  ",
    ));
    body
}

fn query_pairs(job: &Option<String>, node: &Option<String>) -> Vec<(&'static str, String)> {
    let mut q = Vec::new();
    if let Some(j) = job {
        q.push(("job", j.clone()));
    }
    if let Some(n) = node {
        q.push(("node", n.clone()));
    }
    q
}

impl TableRow for JobSummary {
    fn headers() -> &'static [&'static str] {
        &[
            "NAME", "TYPE", "STATUS", "VERSION", "REPLICAS", "RUNNING", "HEALTHY", "MESSAGE",
        ]
    }

    fn cells(&self, _now: SystemTime) -> Vec<String> {
        vec![
            self.name.clone(),
            format!("{:?}", self.job_type).to_lowercase(),
            self.status.clone(),
            self.version.to_string(),
            self.replicas.to_string(),
            self.running.to_string(),
            self.healthy.to_string(),
            truncate(&self.message, 60),
        ]
    }

    fn wide_headers() -> &'static [&'static str] {
        &[
            "NAME",
            "TYPE",
            "STATUS",
            "VERSION",
            "STABLE",
            "REPLICAS",
            "MANIFEST",
            "SCALED BY",
            "RUNNING",
            "HEALTHY",
            "SUBMITTED",
            "BY",
            "MESSAGE",
        ]
    }

    fn wide_cells(&self, now: SystemTime) -> Vec<String> {
        vec![
            self.name.clone(),
            format!("{:?}", self.job_type).to_lowercase(),
            self.status.clone(),
            self.version.to_string(),
            self.stable_version.map_or("-".into(), |v| v.to_string()),
            self.replicas.to_string(),
            self.manifest_replicas.to_string(),
            self.scaled_by.clone().unwrap_or_else(|| "-".into()),
            self.running.to_string(),
            self.healthy.to_string(),
            output::ago(now, output::from_unix_ms(self.submitted_at_unix_ms)),
            self.submitted_by.clone(),
            self.message.clone(),
        ]
    }

    fn resource_name(&self) -> Option<String> {
        Some(format!("job/{}", self.name))
    }
}

impl TableRow for AllocView {
    fn headers() -> &'static [&'static str] {
        &[
            "ID", "JOB", "VERSION", "NODE", "STATE", "HEALTHY", "RESTARTS", "PORTS", "AGE",
            "MESSAGE",
        ]
    }

    fn cells(&self, now: SystemTime) -> Vec<String> {
        vec![
            self.id.clone(),
            self.job.clone(),
            self.version.to_string(),
            self.node.clone(),
            alloc_state(self),
            match self.healthy {
                Some(true) => "yes".into(),
                Some(false) => "no".into(),
                None => "-".into(),
            },
            self.restarts.to_string(),
            ports_cell(self),
            output::ago(now, output::from_unix_ms(self.created_unix_ms)),
            truncate(&self.message, 50),
        ]
    }

    fn wide_headers() -> &'static [&'static str] {
        &[
            "ID", "JOB", "VERSION", "NODE", "STATE", "HEALTHY", "RESTARTS", "PORTS", "ADDRESS",
            "CPU", "MEMORY", "GPUS", "PRIORITY", "EXIT", "AGE", "MESSAGE",
        ]
    }

    fn wide_cells(&self, now: SystemTime) -> Vec<String> {
        let mut cells = self.cells(now);
        cells.pop(); // the truncated message: wide shows it whole
        let age = cells.pop().unwrap_or_default();
        cells.extend([
            self.address.map_or("-".into(), |a| a.to_string()),
            format!("{}m", self.cpu_millis),
            output::bytes(self.memory_bytes),
            if self.gpu_uuids.is_empty() {
                "-".into()
            } else {
                self.gpu_uuids.join(",")
            },
            self.priority.to_string(),
            self.exit_code.map_or("-".into(), |c| c.to_string()),
            age,
            self.message.clone(),
        ]);
        cells
    }

    fn resource_name(&self) -> Option<String> {
        Some(format!("alloc/{}", self.id))
    }
}

/// `job history` for people: a table of the versions, then (with `changes`)
/// each version's changed fields.
fn history_text(versions: &[JobVersionView], changes: bool, now: SystemTime) -> String {
    let mut t = output::table(versions, now);
    t.push('\n');
    if changes {
        for v in versions {
            t.push_str(&format!("\nVersion {} ({}):\n", v.version, v.file));
            if v.changes.is_empty() {
                t.push_str("  no field changed\n");
            } else {
                t.push_str(&changes_text(&v.changes, "  "));
            }
            if let Some(digest) = &v.image_digest {
                t.push_str(&format!("  runs image {digest}\n"));
            }
            for (secret, version) in &v.secrets {
                t.push_str(&format!("  secret {secret} version {version}\n"));
            }
        }
    }
    t
}

impl TableRow for JobVersionView {
    fn headers() -> &'static [&'static str] {
        &["VERSION", "", "SUBMITTED", "BY", "CHANGES", "FROM"]
    }

    fn cells(&self, now: SystemTime) -> Vec<String> {
        let mark = match (self.current, self.stable) {
            (true, true) => "current, stable",
            (true, false) => "current",
            (false, true) => "stable",
            (false, false) => "",
        };
        let changed = match self.changes.as_slice() {
            [] => "none".to_string(),
            [one] => one.path.clone(),
            many => format!("{} fields", many.len()),
        };
        vec![
            self.version.to_string(),
            mark.to_string(),
            output::ago(now, output::from_unix_ms(self.submitted_at_unix_ms)),
            self.by.clone(),
            changed,
            truncate(&self.file, 60),
        ]
    }
}

/// The STATE cell: `running`, `failed (unhealthy)`, `running (stopping)`.
fn alloc_state(a: &AllocView) -> String {
    if let (AllocState::Failed, Some(why)) = (a.state, a.failure) {
        format!("failed ({why})")
    } else if a.desired_run || a.state.is_terminal() {
        a.state.to_string()
    } else {
        format!("{} (stopping)", a.state)
    }
}

/// The PORTS cell, as `docker ps` writes it: where each port is published on the
/// node and the container port it reaches (`127.0.0.1:20001->8080/tcp`). One
/// address per port: a port bound on both IPv4 and IPv6 shows its IPv4 binding
/// (`-o json` has them all). A port the node has not reported published (not
/// running yet, or an older agent) shows only the host port it holds
/// (`20001->8080/tcp`).
fn ports_cell(a: &AllocView) -> String {
    let mut cells: Vec<String> = Vec::new();
    let mut shown: Vec<(u16, &str)> = Vec::new();
    for b in &a.published {
        let key = (b.container_port, b.protocol.as_str());
        if shown.contains(&key) {
            continue;
        }
        shown.push(key);
        cells.push(format!(
            "{}->{}/{}",
            b.address(),
            b.container_port,
            b.protocol
        ));
    }
    for p in &a.ports {
        if !shown.contains(&(p.container_port, p.protocol.as_str())) {
            cells.push(format!(
                "{}->{}/{}",
                p.host_port, p.container_port, p.protocol
            ));
        }
    }
    if cells.is_empty() {
        "-".into()
    } else {
        cells.join(",")
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// Stops job `name` and purges it once its allocations have ended (the
/// controller answers 409 until then), trying for at most `wait`.
pub(crate) async fn stop_and_purge(
    client: &ApiClient,
    name: &str,
    wait: Duration,
) -> Result<(), CliError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        match client
            .delete_query(&["v1", "jobs", name], &[("purge", "true")])
            .await
        {
            Ok(()) => return Ok(()),
            Err(super::client::ClientError::Status { status, .. })
                if status == reqwest::StatusCode::CONFLICT
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// A duration such as `30s` or `2m`.
pub(crate) fn parse_wait(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}; expected e.g. 30s, 2m"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use novacron_api::{AllocPortView, PublishedAddressView};

    #[test]
    fn apply_dispatches_on_the_kind() {
        let doc = |kind: &str| {
            format!("apiVersion: novacron.io/v1\nkind: {kind}\nmetadata: {{name: x}}\n")
        };
        assert_eq!(manifest_kind("f", &doc("Job")), Ok("Job"));
        assert_eq!(
            manifest_kind("f", &doc("AutoScalingPolicy")),
            Ok("AutoScalingPolicy")
        );
        let both = format!("{}---\n{}", doc("NodeTemplate"), doc("NodePool"));
        assert_eq!(manifest_kind("f", &both), Ok("NodeTemplate"));
        // Broken YAML and a missing kind go to the job endpoint, which locates them.
        assert_eq!(manifest_kind("f", "spec: [unclosed"), Ok("Job"));
        assert_eq!(manifest_kind("f", "metadata: {name: x}\n"), Ok("Job"));
        let e = manifest_kind("f.yaml", &doc("Deployment")).expect_err("unknown kind");
        assert!(e.contains("f.yaml: kind \"Deployment\""), "{e}");
        assert!(
            e.contains("Job, AutoScalingPolicy, NodePool, NodeTemplate"),
            "{e}"
        );
        let mixed = format!("{}---\n{}", doc("Job"), doc("AutoScalingPolicy"));
        let e = manifest_kind("f", &mixed).expect_err("mixed");
        assert!(e.contains("mix kinds (Job, AutoScalingPolicy)"), "{e}");
    }

    #[test]
    fn job_files_split_into_documents_that_keep_their_line_numbers() {
        let job = |name: &str| {
            format!("apiVersion: novacron.io/v1\nkind: Job\nmetadata: {{name: {name}}}\n")
        };
        let one = job("a");
        assert_eq!(job_documents("f", &one), vec![one.clone()]);
        let two = format!(
            "# jobs\n---\n{}--- # the second\n{}...\n",
            job("a"),
            job("b")
        );
        let docs = job_documents("f", &two);
        assert_eq!(docs.len(), 2, "{docs:?}");
        assert_eq!(docs[0], format!("\n---\n{}", job("a")));
        assert_eq!(
            docs[1],
            format!("\n\n\n\n\n--- # the second\n{}...\n", job("b"))
        );
        // Every document parses alone, and a document of only comments is dropped.
        let three = format!("{}---\n# nothing\n---\n{}", job("a"), job("b"));
        let docs = job_documents("f", &three);
        assert_eq!(docs.len(), 2, "{docs:?}");
        for (d, name) in docs.iter().zip(["a", "b"]) {
            let v: serde_json::Value = yaml_serde::from_str(d).expect("one document");
            assert_eq!(v["metadata"]["name"], name, "{d}");
        }
        // A `---` inside a block scalar's text, indented, is no marker.
        let scalar = format!("{}notes: |\n  ---\n  x\n---\n{}", job("a"), job("b"));
        assert_eq!(job_documents("f", &scalar).len(), 2);
        // Broken YAML stays whole, for the controller to locate.
        let broken = format!("{}---\nspec: [unclosed\n", job("a"));
        assert_eq!(job_documents("f", &broken), vec![broken.clone()]);
    }

    fn alloc(ports: Vec<AllocPortView>, published: Vec<PublishedAddressView>) -> AllocView {
        AllocView {
            id: "web-1a2b".into(),
            job: "web".into(),
            version: 2,
            node: "n1".into(),
            desired_run: true,
            state: AllocState::Running,
            healthy: Some(true),
            healthy_since_unix_ms: None,
            created_unix_ms: 0,
            updated_unix_ms: 0,
            restarts: 0,
            exit_code: None,
            message: String::new(),
            failure: None,
            cpu_millis: 100,
            memory_bytes: 16 << 20,
            gpu_uuids: vec![],
            priority: 50,
            disk_bytes: 0,
            ports,
            restore: None,
            published,
            suspended: false,
            address: None,
        }
    }

    fn port(name: &str, host_port: u16, container_port: u16, protocol: &str) -> AllocPortView {
        AllocPortView {
            name: name.into(),
            container_port,
            host_port,
            protocol: protocol.into(),
        }
    }

    fn bound(
        ip: &str,
        host_port: u16,
        container_port: u16,
        protocol: &str,
    ) -> PublishedAddressView {
        PublishedAddressView {
            host_ip: ip.parse().expect("an address"),
            host_port,
            container_port,
            protocol: protocol.into(),
        }
    }

    #[test]
    fn the_ports_cell_shows_host_to_container_ports() {
        assert_eq!(ports_cell(&alloc(vec![], vec![])), "-");
        // Not reported published (yet): the host ports the allocation holds.
        assert_eq!(
            ports_cell(&alloc(
                vec![port("a", 8080, 80, "tcp"), port("b", 20000, 53, "udp")],
                vec![]
            )),
            "8080->80/tcp,20000->53/udp"
        );
    }

    #[test]
    fn the_ports_cell_shows_where_each_port_is_published() {
        let a = alloc(
            vec![
                port("http", 20001, 8080, "tcp"),
                port("dns", 20002, 53, "udp"),
            ],
            vec![
                bound("0.0.0.0", 20001, 8080, "tcp"),
                bound("::", 20001, 8080, "tcp"),
                bound("127.0.0.1", 20002, 53, "udp"),
            ],
        );
        // One address per port (IPv4 first), as docker ps writes it.
        assert_eq!(
            ports_cell(&a),
            "0.0.0.0:20001->8080/tcp,127.0.0.1:20002->53/udp"
        );
        // `alloc show` lists every binding, by port name.
        assert_eq!(
            port_lines(&a),
            [
                "http  0.0.0.0:20001, [::]:20001 -> 8080/tcp",
                "dns   127.0.0.1:20002 -> 53/udp",
            ]
        );
        let text = alloc_detail(&a, std::time::UNIX_EPOCH);
        assert!(text.contains("Ports:\n  http  0.0.0.0:20001"), "{text}");
        let pending = AllocView {
            state: AllocState::Pending,
            ..alloc(vec![port("http", 20001, 8080, "tcp")], vec![])
        };
        assert_eq!(
            port_lines(&pending),
            ["http  host port 20001 -> 8080/tcp (not published: not running)"]
        );
    }
}

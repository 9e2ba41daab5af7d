//! `novacron apply`, `novacron job ...` and `novacron alloc ...`.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use clap::Subcommand;
use novacron_common::wire::AllocState;

use super::CliError;
use super::client::ApiClient;
use super::output::{self, OutputFormat, TableRow};
use novacron_api::{
    AllocPortView, AllocView, ApplyRequest, ApplyResult, JobDetail, JobSummary, PolicyApplyResult,
};

/// `novacron job` subcommands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum JobCommand {
    /// List jobs.
    List,
    /// Show a job: versions, allocations, and why replicas are not placed.
    Status {
        /// The job.
        name: String,
    },
    /// Stop a job and all its allocations.
    Stop {
        /// The job.
        name: String,
    },
}

/// `novacron alloc` subcommands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum AllocCommand {
    /// List allocations.
    List {
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Print an allocation's container output.
    Logs {
        /// The allocation id.
        id: String,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines first.
        #[arg(long, default_value_t = 0)]
        tail: u32,
    },
    /// Run a command in an allocation's container, live; exits with its exit code.
    Exec(super::exec::AllocExecArgs),
    /// Checkpoint an allocation now (it keeps running) and store the bundle.
    Checkpoint {
        /// The allocation id.
        id: String,
        /// live, fs or auto (default: the job's policy, else auto).
        #[arg(long)]
        mode: Option<novacron_common::checkpoint::CheckpointMode>,
    },
    /// Move a running allocation to another node with its state (checkpoint,
    /// transfer, restore); a failure rolls back to the source.
    Migrate {
        /// The allocation id.
        id: String,
        /// The target node (default: the scheduler's choice).
        #[arg(long)]
        to: Option<String>,
        /// live, fs or auto (default: the job's policy, else auto).
        #[arg(long)]
        mode: Option<novacron_common::checkpoint::CheckpointMode>,
    },
}

/// The kinds `novacron apply` sends, and where.
pub const APPLY_KINDS: &[(&str, &[&str])] = &[
    ("Job", &["v1", "jobs"]),
    ("AutoScalingPolicy", &["v1", "policies"]),
    ("NodePool", &["v1", "pools"]),
    ("NodeTemplate", &["v1", "pools"]),
];

/// `novacron apply -f FILE`: sends the manifest to the endpoint of its `kind`
/// (the controller validates it).
pub async fn apply(
    client: &ApiClient,
    file: &Path,
    format: OutputFormat,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let manifest = std::fs::read_to_string(file).map_err(|source| CliError::ReadManifest {
        path: file.to_path_buf(),
        source,
    })?;
    let name = file.display().to_string();
    let kind = manifest_kind(&name, &manifest).map_err(CliError::Invalid)?;
    let req = ApplyRequest {
        file: name,
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
                _ => output::write_value(out, format, &result)?,
            }
        }
    }
    Ok(())
}

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
        JobCommand::Stop { name } => {
            let () = client
                .post(&["v1", "jobs", name, "stop"], &serde_json::json!({}))
                .await?;
            writeln!(out, "job {name} stopped; its allocations are stopping")
                .map_err(output::OutputError::Io)?;
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
        AllocCommand::Exec(args) => {
            return super::exec::alloc_exec(args, client, format, out).await;
        }
        AllocCommand::Checkpoint { id, mode } => {
            return super::checkpoints::checkpoint(client, id, *mode, format, out).await;
        }
        AllocCommand::Migrate { id, to, mode } => {
            return super::checkpoints::migrate(client, id, to.as_deref(), *mode, format, out)
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
            if let (AllocState::Failed, Some(why)) = (self.state, self.failure) {
                format!("failed ({why})")
            } else if self.desired_run || self.state.is_terminal() {
                self.state.to_string()
            } else {
                format!("{} (stopping)", self.state)
            },
            match self.healthy {
                Some(true) => "yes".into(),
                Some(false) => "no".into(),
                None => "-".into(),
            },
            self.restarts.to_string(),
            ports_cell(&self.ports),
            output::ago(now, output::from_unix_ms(self.created_unix_ms)),
            truncate(&self.message, 50),
        ]
    }

    fn wide_headers() -> &'static [&'static str] {
        &[
            "ID", "JOB", "VERSION", "NODE", "STATE", "HEALTHY", "RESTARTS", "PORTS", "CPU",
            "MEMORY", "GPUS", "PRIORITY", "EXIT", "AGE", "MESSAGE",
        ]
    }

    fn wide_cells(&self, now: SystemTime) -> Vec<String> {
        let mut cells = self.cells(now);
        cells.pop(); // the truncated message: wide shows it whole
        let age = cells.pop().unwrap_or_default();
        cells.extend([
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

/// `8080->80/tcp,20000->9100/tcp`: host port, container port, protocol.
fn ports_cell(ports: &[AllocPortView]) -> String {
    if ports.is_empty() {
        return "-".into();
    }
    ports
        .iter()
        .map(|p| format!("{}->{}/{}", p.host_port, p.container_port, p.protocol))
        .collect::<Vec<_>>()
        .join(",")
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_ports_cell_shows_host_to_container_ports() {
        let port = |host_port, container_port, protocol: &str| AllocPortView {
            name: "p".into(),
            container_port,
            host_port,
            protocol: protocol.into(),
        };
        assert_eq!(ports_cell(&[]), "-");
        assert_eq!(
            ports_cell(&[port(8080, 80, "tcp"), port(20000, 53, "udp")]),
            "8080->80/tcp,20000->53/udp"
        );
    }
}

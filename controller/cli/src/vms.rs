//! `novacron vm ...`: virtual machines. A VM is a one-replica service job whose
//! task runs a QEMU guest (`spec.task.vm`), so everything jobs have (placement,
//! health checks, restarts, events, costs, `job history`) applies; these commands
//! are the VM-shaped way in. Templates (`kind: VMTemplate`) are applied with
//! `novacron apply -f`.

use std::io::Write;
use std::time::SystemTime;

use clap::Subcommand;
use novacron_api::{AllocView, ApplyRequest, ApplyResult, JobDetail, JobSummary, VmTemplateView};
use novacron_common::wire::AllocState;

use super::CliError;
use super::client::ApiClient;
use super::output::{self, OutputFormat, TableRow, from_unix_ms};

/// `novacron vm` subcommands.
// (Parsed once per run: `Create`'s size costs nothing worth a box.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum VmCommand {
    /// Create and start a VM: a one-replica service job running the guest.
    Create {
        /// The VM's name (a job name).
        name: String,
        /// The disk image: a container image holding the kernel, initrd and
        /// base disk (see docs/vm-images.md).
        #[arg(long)]
        image: String,
        /// A VMTemplate to start from (`vm templates` lists them).
        #[arg(long)]
        template: Option<String>,
        /// Virtual CPUs (default: the template's, else 1).
        #[arg(long)]
        vcpus: Option<u32>,
        /// Guest memory, like 512Mi (default: the template's, else 256Mi).
        #[arg(long)]
        memory: Option<String>,
        /// The kernel command line (default: the template's, else console=ttyS0).
        #[arg(long)]
        cmdline: Option<String>,
        /// A port of the guest, NAME:GUEST_PORT or NAME:GUEST_PORT:HOST_PORT to
        /// publish it on the node; repeat for more.
        #[arg(long = "port", value_parser = parse_port)]
        ports: Vec<(String, u16, Option<u16>)>,
        /// An HTTP path answered on the first port once the guest is up
        /// (`/health`): the VM's readiness check.
        #[arg(long)]
        health_path: Option<String>,
        /// CPU reserved on the node, like 1 or 500m (default: one core per vCPU).
        #[arg(long)]
        cpu: Option<String>,
        /// The image is only on the nodes already (never pull it).
        #[arg(long)]
        no_pull: bool,
        /// A file of cloud-init user data for the guest (a NoCloud seed; at
        /// most 64 KiB); overrides the template's.
        #[arg(long, value_name = "FILE")]
        user_data: Option<std::path::PathBuf>,
        /// The guest's network: user (QEMU's, reached through its ports) or
        /// bridge (an address of its node's VM bridge) [default: user].
        #[arg(long, value_name = "user|bridge")]
        network: Option<String>,
    },
    /// The VMs: their state, node, machine and address.
    List,
    /// Start a stopped VM (its last manifest, applied again).
    Start {
        /// The VM.
        name: String,
    },
    /// Stop a VM: an ACPI power-off, then QEMU is ended after its grace period.
    Stop {
        /// The VM.
        name: String,
    },
    /// Suspend a VM: its guest is paused where it is (its vCPUs stop, its
    /// memory is kept) until it is resumed; it stays suspended across agent
    /// and controller restarts.
    Suspend {
        /// The VM.
        name: String,
        /// Return once the controller has it, without waiting for the node.
        #[arg(long)]
        no_wait: bool,
    },
    /// Resume a suspended VM where it was paused.
    Resume {
        /// The VM.
        name: String,
        /// Return once the controller has it, without waiting for the node.
        #[arg(long)]
        no_wait: bool,
    },
    /// Restart a VM: it is powered off and booted again (a fresh allocation).
    Restart {
        /// The VM.
        name: String,
    },
    /// Stop a VM and forget it: it powers off, its disk is removed, and its
    /// job is purged once it is off.
    Destroy {
        /// The VM.
        name: String,
        /// How long to wait for the guest to power off.
        #[arg(long, default_value = "120s", value_parser = super::jobs::parse_wait)]
        wait: std::time::Duration,
    },
    /// The VM's serial console (what the guest printed), live with --follow;
    /// with -i, attached: what you type goes to the guest (Ctrl-] detaches).
    Console {
        /// The VM.
        name: String,
        /// Keep printing new output.
        #[arg(short, long, conflicts_with = "interactive")]
        follow: bool,
        /// Attach to the console: standard input goes to the guest's serial
        /// port (on a terminal, in raw mode) until Ctrl-] detaches.
        #[arg(short, long)]
        interactive: bool,
    },
    /// The VM templates.
    Templates,
    /// Delete a VM template (VMs made from it keep their machine).
    DeleteTemplate {
        /// The template.
        name: String,
    },
}

/// How long `vm suspend` and `vm resume` wait for the node to have done it.
const SUSPEND_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Memory the node reserves for QEMU itself beyond the guest's, MiB.
pub const QEMU_OVERHEAD_MIB: u64 = 64;

impl TableRow for VmTemplateView {
    fn headers() -> &'static [&'static str] {
        &[
            "NAME", "VCPUS", "MEMORY", "MACHINE", "KERNEL", "DISK", "APPLIED",
        ]
    }
    fn cells(&self, now: SystemTime) -> Vec<String> {
        vec![
            self.name.clone(),
            self.vcpus.to_string(),
            format!("{}Mi", self.memory_bytes >> 20),
            self.machine.clone(),
            self.kernel.clone(),
            self.disk.clone().unwrap_or_else(|| "-".into()),
            output::ago(now, from_unix_ms(self.applied_unix_ms)),
        ]
    }
    fn resource_name(&self) -> Option<String> {
        Some(format!("vmtemplate/{}", self.name))
    }
}

/// One VM as `vm list` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmRow {
    /// The VM (its job).
    pub name: String,
    /// `running`, `starting`, `stopped`, ...
    pub state: String,
    /// Its node, while it has one.
    pub node: Option<String>,
    /// Its network: `user` or `bridge`.
    #[serde(default)]
    pub network: String,
    /// Its address, where its node reaches it, while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Guest memory, bytes.
    pub memory_bytes: u64,
    /// The template it was made from.
    pub template: Option<String>,
    /// Published ports, `HOST->GUEST`.
    pub ports: Vec<String>,
}

impl TableRow for VmRow {
    fn headers() -> &'static [&'static str] {
        &[
            "NAME", "STATE", "NODE", "NETWORK", "ADDRESS", "VCPUS", "MEMORY", "TEMPLATE", "PORTS",
        ]
    }
    fn cells(&self, _now: SystemTime) -> Vec<String> {
        vec![
            self.name.clone(),
            self.state.clone(),
            self.node.clone().unwrap_or_else(|| "-".into()),
            self.network.clone(),
            self.address.clone().unwrap_or_else(|| "-".into()),
            self.vcpus.to_string(),
            format!("{}Mi", self.memory_bytes >> 20),
            self.template.clone().unwrap_or_else(|| "-".into()),
            if self.ports.is_empty() {
                "-".into()
            } else {
                self.ports.join(",")
            },
        ]
    }
    fn resource_name(&self) -> Option<String> {
        Some(format!("vm/{}", self.name))
    }
}

fn parse_port(s: &str) -> Result<(String, u16, Option<u16>), String> {
    let parts: Vec<&str> = s.split(':').collect();
    let number = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{p:?} is not a port; expected 1 to 65535"))
    };
    match parts.as_slice() {
        [name, guest] => Ok(((*name).to_owned(), number(guest)?, None)),
        [name, guest, host] => Ok(((*name).to_owned(), number(guest)?, Some(number(host)?))),
        _ => Err(format!(
            "{s:?}: expected NAME:GUEST_PORT or NAME:GUEST_PORT:HOST_PORT, like http:8080:18080"
        )),
    }
}

/// The Job manifest `vm create` applies. Values are YAML-quoted, so a command
/// line with `:` or `#` stays one string.
#[allow(clippy::too_many_arguments)]
pub fn manifest(
    name: &str,
    image: &str,
    template: Option<&str>,
    vcpus: Option<u32>,
    memory: Option<&str>,
    cmdline: Option<&str>,
    ports: &[(String, u16, Option<u16>)],
    health_path: Option<&str>,
    cpu: Option<&str>,
    reserve_mib: u64,
    no_pull: bool,
    user_data: Option<&str>,
    network: Option<&str>,
) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut m = format!(
        "apiVersion: novacron.io/v1\nkind: Job\nmetadata:\n  name: {}\nspec:\n  type: service\n  replicas: 1\n  task:\n    image: {}\n",
        q(name),
        q(image)
    );
    if no_pull {
        m.push_str("    pullPolicy: never\n");
    }
    if !ports.is_empty() {
        m.push_str("    ports:\n");
        for (n, guest, host) in ports {
            m.push_str(&format!(
                "      - name: {}\n        containerPort: {guest}\n",
                q(n)
            ));
            if let Some(h) = host {
                m.push_str(&format!("        hostPort: {h}\n"));
            }
        }
    }
    m.push_str("    vm:\n");
    if let Some(t) = template {
        m.push_str(&format!("      template: {}\n", q(t)));
    }
    if let Some(v) = vcpus {
        m.push_str(&format!("      vcpus: {v}\n"));
    }
    if let Some(mem) = memory {
        m.push_str(&format!("      memory: {}\n", q(mem)));
    }
    if let Some(c) = cmdline {
        m.push_str(&format!("      cmdline: {}\n", q(c)));
    }
    if let Some(u) = user_data {
        m.push_str(&format!("      userData: {}\n", q(u)));
    }
    if let Some(n) = network {
        m.push_str(&format!("      network: {}\n", q(n)));
    }
    if template.is_none()
        && vcpus.is_none()
        && memory.is_none()
        && cmdline.is_none()
        && user_data.is_none()
        && network.is_none()
    {
        // `vm: {}` — every default.
        m.truncate(m.len() - "    vm:\n".len());
        m.push_str("    vm: {}\n");
    }
    let cpu = cpu
        .map(str::to_owned)
        .unwrap_or_else(|| vcpus.unwrap_or(1).to_string());
    m.push_str(&format!(
        "  resources:\n    cpu: {}\n    memory: {reserve_mib}Mi\n",
        q(&cpu)
    ));
    if let (Some(path), Some((_, guest, _))) = (health_path, ports.first()) {
        m.push_str(&format!(
            "  health:\n    readiness:\n      http: {{port: {guest}, path: {}}}\n      period: 2s\n      timeout: 1s\n",
            q(path)
        ));
    }
    m
}

/// What `vm list` shows of a VM's job: its state word, node, address and
/// published ports.
type VmState = (String, Option<String>, Option<String>, Vec<String>);

fn vm_state(job: &JobDetail) -> VmState {
    let wanted: Vec<&AllocView> = job.allocations.iter().filter(|a| a.desired_run).collect();
    let Some(a) = wanted.first() else {
        return (
            if job.summary.status == "stopped" {
                "stopped".into()
            } else {
                job.summary.status.clone()
            },
            None,
            None,
            Vec::new(),
        );
    };
    let state = match a.state {
        AllocState::Running if a.suspended && job.summary.suspended => "suspended".to_owned(),
        AllocState::Running if a.suspended => "resuming".to_owned(),
        AllocState::Running if job.summary.suspended => "suspending".to_owned(),
        AllocState::Running if a.healthy == Some(false) => "running (not ready)".to_owned(),
        AllocState::Running => "running".to_owned(),
        other => other.to_string(),
    };
    let ports = a
        .published
        .iter()
        .map(|p| format!("{}->{}", p.host_port, p.container_port))
        .collect();
    (
        state,
        Some(a.node.clone()),
        a.address.map(|ip| ip.to_string()),
        ports,
    )
}

/// Runs a `novacron vm` command.
pub async fn run(
    cmd: &VmCommand,
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
    now: SystemTime,
) -> Result<(), CliError> {
    let io = |e| CliError::Output(output::OutputError::Io(e));
    match cmd {
        VmCommand::Create {
            name,
            image,
            template,
            vcpus,
            memory,
            cmdline,
            ports,
            health_path,
            cpu,
            no_pull,
            user_data,
            network,
        } => {
            let user_data = match user_data {
                Some(path) => Some(std::fs::read_to_string(path).map_err(|e| {
                    CliError::Usage(format!("--user-data {}: {e}", path.display()))
                })?),
                None => None,
            };
            // The node reserves the guest's memory plus QEMU's own.
            let guest_bytes = match (memory, template) {
                (Some(m), _) => {
                    novacron_common::manifest::parse_bytes(m)
                        .map_err(|e| CliError::Usage(format!("--memory {m:?}: {e}")))?
                        .0
                }
                (None, Some(t)) => {
                    let rows: Vec<VmTemplateView> = client.get(&["v1", "vms", "templates"]).await?;
                    rows.iter()
                        .find(|r| &r.name == t)
                        .map(|r| r.memory_bytes)
                        .ok_or_else(|| {
                            CliError::Invalid(format!(
                                "no VM template named {t}; novacron vm templates lists them"
                            ))
                        })?
                }
                (None, None) => novacron_common::manifest::vm::DEFAULT_MEMORY,
            };
            let manifest = manifest(
                name,
                image,
                template.as_deref(),
                *vcpus,
                memory.as_deref(),
                cmdline.as_deref(),
                ports,
                health_path.as_deref(),
                cpu.as_deref(),
                (guest_bytes >> 20) + QEMU_OVERHEAD_MIB,
                *no_pull,
                user_data.as_deref(),
                network.as_deref(),
            );
            let result: ApplyResult = client
                .post(
                    &["v1", "jobs"],
                    &ApplyRequest {
                        file: format!("vm create {name}"),
                        manifest,
                    },
                )
                .await?;
            match format {
                OutputFormat::Table | OutputFormat::Wide => writeln!(
                    out,
                    "vm {} {}: booting (novacron vm list shows it; novacron vm console {} --follow shows its console)",
                    result.job, result.outcome, result.job
                )
                .map_err(io)?,
                OutputFormat::Name => writeln!(out, "vm/{}", result.job).map_err(io)?,
                _ => output::write_value(out, format, &result)?,
            }
        }
        VmCommand::List => {
            let jobs: Vec<JobSummary> = client.get(&["v1", "jobs"]).await?;
            let mut rows = Vec::new();
            for j in jobs.into_iter().filter(|j| j.vm.is_some()) {
                let detail: JobDetail = client.get(&["v1", "jobs", &j.name]).await?;
                let (state, node, address, ports) = vm_state(&detail);
                let vm = j.vm.clone().unwrap_or_default();
                rows.push(VmRow {
                    name: j.name,
                    state,
                    node,
                    network: vm.network.as_str().to_owned(),
                    address,
                    vcpus: vm.vcpus,
                    memory_bytes: vm.memory_mib << 20,
                    template: vm.template,
                    ports,
                });
            }
            output::write_list(out, format, &rows, now)?;
        }
        VmCommand::Start { name } => {
            let job: JobDetail = vm_job(client, name).await?;
            let result: ApplyResult = client
                .post(
                    &["v1", "jobs"],
                    &ApplyRequest {
                        file: format!("vm start {name}"),
                        manifest: job.manifest,
                    },
                )
                .await?;
            writeln!(out, "vm {name} starting (version {})", result.version).map_err(io)?;
        }
        VmCommand::Stop { name } => {
            vm_job(client, name).await?;
            let () = client
                .post(&["v1", "jobs", name, "stop"], &serde_json::json!({}))
                .await?;
            writeln!(out, "vm {name} stopping: the guest is asked to power off").map_err(io)?;
        }
        VmCommand::Suspend { name, no_wait } | VmCommand::Resume { name, no_wait } => {
            let suspend = matches!(cmd, VmCommand::Suspend { .. });
            let verb = if suspend { "suspend" } else { "resume" };
            vm_job(client, name).await?;
            let () = client
                .post(&["v1", "vms", name, verb], &serde_json::json!({}))
                .await?;
            if *no_wait {
                writeln!(out, "vm {name}: {verb} asked").map_err(io)?;
                return Ok(());
            }
            // The node pauses or resumes the guest on its next desired set;
            // its report says when.
            let deadline = std::time::Instant::now() + SUSPEND_WAIT;
            loop {
                let job = vm_job(client, name).await?;
                let alloc = job.allocations.iter().find(|a| a.desired_run);
                match alloc {
                    Some(a) if a.state == AllocState::Running && a.suspended == suspend => {
                        let done = if suspend {
                            "suspended: its guest is paused, its memory kept"
                        } else {
                            "resumed: its guest runs again"
                        };
                        writeln!(out, "vm {name} {done} (on {})", a.node).map_err(io)?;
                        return Ok(());
                    }
                    None if suspend => {
                        writeln!(
                            out,
                            "vm {name} is not running: it is suspended as soon as it runs"
                        )
                        .map_err(io)?;
                        return Ok(());
                    }
                    _ => {}
                }
                if std::time::Instant::now() >= deadline {
                    let why = alloc.map_or_else(
                        || "it has no allocation".to_owned(),
                        |a| format!("{} on {}: {}", a.state, a.node, a.message),
                    );
                    return Err(CliError::Invalid(format!(
                        "vm {name}: {verb} asked, but its node has not done it within {} s ({why}); novacron vm list shows when it has",
                        SUSPEND_WAIT.as_secs()
                    )));
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
        }
        VmCommand::Restart { name } => {
            let job = vm_job(client, name).await?;
            let Some(alloc) = job.allocations.iter().find(|a| a.desired_run) else {
                return Err(CliError::Invalid(format!(
                    "vm {name} is not running; start it with novacron vm start {name}"
                )));
            };
            let _: AllocView = client
                .post(
                    &["v1", "allocations", &alloc.id, "restart"],
                    &serde_json::json!({}),
                )
                .await?;
            writeln!(out, "vm {name} restarting: it powers off and boots again").map_err(io)?;
        }
        VmCommand::Destroy { name, wait } => {
            vm_job(client, name).await?;
            super::jobs::stop_and_purge(client, name, *wait).await?;
            writeln!(
                out,
                "vm {name} destroyed: powered off, its disk removed and its job purged"
            )
            .map_err(io)?;
        }
        VmCommand::Console {
            name,
            follow,
            interactive,
        } => {
            let job = vm_job(client, name).await?;
            if *interactive {
                let Some(alloc) = job
                    .allocations
                    .iter()
                    .find(|a| a.desired_run && a.state == AllocState::Running)
                else {
                    return Err(CliError::Invalid(format!(
                        "vm {name} is not running; start it with novacron vm start {name}"
                    )));
                };
                use std::os::fd::AsFd;
                let tty = rustix::termios::isatty(std::io::stdin().as_fd());
                eprintln!(
                    "novacron: attached to the serial console of vm {name} on {}; Ctrl-] detaches",
                    alloc.node
                );
                return super::terminal::run_with(
                    client,
                    super::terminal::Target::Allocation(alloc.id.clone()),
                    &["console".to_owned()],
                    tty,
                    None,
                    Some(super::terminal::DETACH),
                    out,
                )
                .await;
            }
            let Some(alloc) = job
                .allocations
                .iter()
                .find(|a| a.desired_run)
                .or_else(|| job.allocations.first())
            else {
                return Err(CliError::Invalid(format!("vm {name} has never run")));
            };
            let cmd = super::jobs::AllocCommand::Logs {
                id: alloc.id.clone(),
                follow: *follow,
                tail: 0,
            };
            return super::jobs::run_alloc(&cmd, client, format, out, now).await;
        }
        VmCommand::Templates => {
            let rows: Vec<VmTemplateView> = client.get(&["v1", "vms", "templates"]).await?;
            output::write_list(out, format, &rows, now)?;
        }
        VmCommand::DeleteTemplate { name } => {
            let () = client.delete(&["v1", "vms", "templates", name]).await?;
            writeln!(out, "VM template {name} deleted").map_err(io)?;
        }
    }
    Ok(())
}

/// The job of VM `name`; refused when that job runs no VM.
async fn vm_job(client: &ApiClient, name: &str) -> Result<JobDetail, CliError> {
    let job: JobDetail = client.get(&["v1", "jobs", name]).await?;
    if job.summary.vm.is_none() {
        return Err(CliError::Invalid(format!(
            "job {name} runs a container, not a virtual machine; use novacron job"
        )));
    }
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_writes_a_job_manifest_that_parses() {
        let m = manifest(
            "web-vm",
            "novacron/guest-tiny:1",
            Some("small"),
            Some(2),
            Some("512Mi"),
            Some("console=ttyS0 quiet # not a comment"),
            &[("http".into(), 8080, Some(18080))],
            Some("/health"),
            None,
            576,
            true,
            Some("#!/bin/sh\necho hi: there\n"),
            Some("bridge"),
        );
        let job = novacron_common::manifest::parse_job("vm.yaml", &m).expect("a valid job");
        let vm = job.spec.task.vm.clone().expect("a VM");
        assert_eq!(vm.template.as_deref(), Some("small"));
        assert_eq!(
            vm.cmdline.as_deref(),
            Some("console=ttyS0 quiet # not a comment")
        );
        assert_eq!(job.spec.resources.cpu.0, 2000);
        assert_eq!(job.spec.resources.memory.0, 576 << 20);
        assert_eq!(vm.user_data.as_deref(), Some("#!/bin/sh\necho hi: there\n"));
        assert_eq!(vm.network, Some(novacron_common::wire::VmNetwork::Bridge));
        assert_eq!(job.spec.task.ports[0].host_port, Some(18080));
        assert!(job.spec.health.is_some());
        let bare = manifest(
            "b",
            "img:1",
            None,
            None,
            None,
            None,
            &[],
            None,
            None,
            320,
            false,
            None,
            None,
        );
        let job = novacron_common::manifest::parse_job("b.yaml", &bare).expect("valid");
        assert!(job.spec.task.vm.is_some());
        assert!(parse_port("http:8080:18080").is_ok());
        assert!(parse_port("http").is_err());
        assert!(parse_port("http:0").is_err());
    }
}

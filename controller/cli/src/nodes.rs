//! `novacron node ...`: the fleet's nodes, as a table or a detail view.

use std::io::Write;
use std::time::SystemTime;

use clap::Subcommand;
use novacron_api::NodeView;
use novacron_common::wire::{DiskSample, GpuInfo, GpuSample, NetworkSample, NodeSample};

use super::CliError;
use super::client::ApiClient;
use super::output::{self, OutputFormat, TableRow};

/// The label shown in the ZONE column.
pub const ZONE_LABEL: &str = "zone";

/// Commands about nodes.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum NodeCommand {
    /// List the nodes with their status and latest usage.
    #[command(visible_alias = "ls")]
    List,
    /// Show one node in detail: labels, capacity, capabilities, certificate and
    /// the latest metrics sample.
    Show {
        /// The node's name.
        #[arg(add = crate::complete::nodes())]
        name: String,
    },
    /// The images a node reported holding (tags and digests), which the
    /// scheduler prefers it for.
    Images {
        /// The node's name.
        #[arg(add = crate::complete::nodes())]
        name: String,
    },
    /// Cordon a node: nothing new is placed on it; what runs there stays.
    Cordon {
        /// The node's name.
        #[arg(add = crate::complete::nodes())]
        name: String,
    },
    /// Lift a node's cordon (set by `cordon`, a drain or a spot notice).
    Uncordon {
        /// The node's name.
        #[arg(add = crate::complete::nodes())]
        name: String,
    },
    /// Cordon a node and move its running allocations elsewhere with their state.
    Drain {
        /// The node's name.
        #[arg(add = crate::complete::nodes())]
        name: String,
        /// Migrate each allocation (checkpoint, transfer, restore; one after
        /// another). Required: draining by restarting elsewhere is what losing the
        /// node does already.
        #[arg(long)]
        migrate: bool,
    },
}

/// Runs a node command against `client`.
pub async fn run(
    cmd: &NodeCommand,
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
    now: SystemTime,
) -> Result<(), CliError> {
    match cmd {
        NodeCommand::List => {
            let nodes: Vec<NodeView> = client.get(&["v1", "nodes"]).await?;
            output::write_list(out, format, &nodes, now)?;
        }
        NodeCommand::Show { name } => {
            let node: NodeView = client.get(&["v1", "nodes", name]).await?;
            output::write_one(out, format, &node, || detail(&node, now))?;
        }
        NodeCommand::Images { name } => {
            let inventory: novacron_common::wire::ImageInventory =
                client.get(&["v1", "nodes", name, "images"]).await?;
            output::write_one(out, format, &inventory, || {
                let mut t = String::new();
                for image in &inventory.images {
                    t.push_str(image);
                    t.push('\n');
                }
                t.push_str(&format!(
                    "{} references, {:.1} MB of images{}\n",
                    inventory.images.len(),
                    inventory.bytes as f64 / 1e6,
                    if inventory.truncated {
                        " (more not listed)"
                    } else {
                        ""
                    }
                ));
                t
            })?;
        }
        NodeCommand::Cordon { name } | NodeCommand::Uncordon { name } => {
            let verb = if matches!(cmd, NodeCommand::Cordon { .. }) {
                "cordon"
            } else {
                "uncordon"
            };
            let node: NodeView = client
                .post(&["v1", "nodes", name, verb], &serde_json::json!({}))
                .await?;
            output::write_one(out, format, &node, || {
                let what = if node.cordoned {
                    "cordoned: nothing new is placed on it"
                } else {
                    "uncordoned: it takes new work again"
                };
                format!("node {} {what}\n", node.name)
            })?;
        }
        NodeCommand::Drain { name, migrate } => {
            if !migrate {
                return Err(CliError::Usage(format!(
                    "`node drain {name}` needs --migrate: it moves each allocation with its state"
                )));
            }
            return super::checkpoints::drain(client, name, format, out).await;
        }
    }
    Ok(())
}

impl TableRow for NodeView {
    fn headers() -> &'static [&'static str] {
        &[
            "NAME",
            "STATUS",
            "ZONE",
            "CPU%",
            "MEMORY",
            "DISK",
            "GPUS",
            "LAST SEEN",
            "VERSION",
        ]
    }

    fn cells(&self, now: SystemTime) -> Vec<String> {
        let latest = self.latest.as_ref();
        vec![
            self.name.clone(),
            if self.warm {
                "warm".to_string()
            } else if self.cordoned {
                format!("{},cordoned", self.status)
            } else {
                self.status.to_string()
            },
            self.labels.get(ZONE_LABEL).cloned().unwrap_or_else(dash),
            latest.map_or_else(dash, |s| format!("{:.1}", s.cpu.total_percent)),
            latest.map_or_else(dash, |s| {
                output::used_of(s.memory.used_bytes, s.memory.total_bytes)
            }),
            latest
                .and_then(|s| data_disk(s, self.capacity.disk_bytes))
                .map_or_else(dash, |d| output::used_of(d.used(), d.total_bytes)),
            self.capacity.gpus.len().to_string(),
            self.last_seen_unix_ms
                .map_or_else(dash, |ms| output::ago(now, output::from_unix_ms(ms))),
            self.agent_version.clone(),
        ]
    }

    fn wide_headers() -> &'static [&'static str] {
        &[
            "NAME",
            "STATUS",
            "ZONE",
            "CPU%",
            "MEMORY",
            "DISK",
            "GPUS",
            "LAST SEEN",
            "VERSION",
            "ADDRESS",
            "CAPACITY",
            "LABELS",
        ]
    }

    fn wide_cells(&self, now: SystemTime) -> Vec<String> {
        let mut cells = self.cells(now);
        cells.push(self.address.clone().unwrap_or_else(dash));
        cells.push(format!(
            "{}m,{}",
            self.capacity.cpu_millis,
            output::bytes(self.capacity.memory_bytes)
        ));
        cells.push(if self.labels.is_empty() {
            dash()
        } else {
            self.labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        });
        cells
    }

    fn resource_name(&self) -> Option<String> {
        Some(format!("node/{}", self.name))
    }
}

impl TableRow for DiskSample {
    fn headers() -> &'static [&'static str] {
        &["MOUNT", "DEVICE", "USED", "SIZE", "USE%", "READ", "WRITE"]
    }

    fn cells(&self, _now: SystemTime) -> Vec<String> {
        vec![
            self.mount.clone(),
            self.device.clone(),
            output::bytes(self.used()),
            output::bytes(self.total_bytes),
            self.use_percent().map_or_else(dash, |p| format!("{p}%")),
            output::rate(self.read_bytes_per_sec),
            output::rate(self.written_bytes_per_sec),
        ]
    }
}

impl TableRow for NetworkSample {
    fn headers() -> &'static [&'static str] {
        &["INTERFACE", "RX", "TX"]
    }

    fn cells(&self, _now: SystemTime) -> Vec<String> {
        vec![
            self.interface.clone(),
            output::rate(self.rx_bytes_per_sec),
            output::rate(self.tx_bytes_per_sec),
        ]
    }
}

impl TableRow for GpuSample {
    fn headers() -> &'static [&'static str] {
        &["GPU", "NAME", "UTIL", "MEMORY", "TEMP", "POWER"]
    }

    fn cells(&self, _now: SystemTime) -> Vec<String> {
        vec![
            self.index.to_string(),
            self.name.clone(),
            format!("{}%", self.utilization_percent),
            output::used_of(self.memory_used_bytes, self.memory_total_bytes),
            format!("{}°C", self.temperature_celsius),
            format!("{:.0}W", f64::from(self.power_milliwatts) / 1000.0),
        ]
    }
}

impl TableRow for GpuInfo {
    fn headers() -> &'static [&'static str] {
        &["GPU", "MODEL", "MEMORY", "FOR", "UUID"]
    }

    fn cells(&self, _now: SystemTime) -> Vec<String> {
        vec![
            self.index.to_string(),
            self.model.clone(),
            // A passthrough GPU's memory is unknown to the host.
            if self.is_passthrough() {
                "-".to_owned()
            } else {
                output::bytes(self.memory_bytes)
            },
            if self.is_passthrough() {
                "vms (vfio-pci)".to_owned()
            } else {
                "containers".to_owned()
            },
            self.uuid.clone(),
        ]
    }
}

/// The detail view of `node` printed by `node show`.
pub fn detail(node: &NodeView, now: SystemTime) -> String {
    let mut out = String::new();
    let at = |ms: Option<u64>| {
        ms.map_or_else(
            || "never".to_string(),
            |ms| output::timestamp(now, output::from_unix_ms(ms)),
        )
    };
    out.push_str(&output::key_values(
        "",
        &[
            ("Name", node.name.clone()),
            (
                "Status",
                if node.cordoned {
                    format!("{} (cordoned: nothing new is placed here)", node.status)
                } else {
                    node.status.to_string()
                },
            ),
            ("Address", node.address.clone().unwrap_or_else(dash)),
            ("Agent version", node.agent_version.clone()),
            ("Enrolled", at(Some(node.enrolled_at_unix_ms))),
            ("Last seen", at(node.last_seen_unix_ms)),
            (
                "Certificate expires",
                node.cert_expires_unix_ms
                    .map_or_else(|| "unknown".to_string(), |ms| at(Some(ms))),
            ),
            ("Samples dropped", node.samples_dropped.to_string()),
        ],
    ));

    out.push_str("\nLabels:\n");
    if node.labels.is_empty() {
        out.push_str("  none\n");
    }
    for (k, v) in &node.labels {
        out.push_str(&format!("  {k}={v}\n"));
    }

    let cap = &node.capacity;
    out.push_str("\nCapacity:\n");
    out.push_str(&output::key_values(
        "  ",
        &[
            ("CPU", cores(cap.cpu_millis)),
            ("Memory", output::bytes(cap.memory_bytes)),
            ("Disk", output::bytes(cap.disk_bytes)),
            ("GPUs", cap.gpus.len().to_string()),
        ],
    ));
    if !cap.gpus.is_empty() {
        out.push_str(&output::indented(&output::table(&cap.gpus, now), "    "));
    }

    let caps = &node.capabilities;
    let or_none = |v: &Option<String>| v.clone().unwrap_or_else(|| "none".to_string());
    out.push_str("\nCapabilities:\n");
    out.push_str(&output::key_values(
        "  ",
        &[
            ("OS", caps.os.clone()),
            ("Arch", caps.arch.clone()),
            ("Docker", or_none(&caps.docker_version)),
            (
                "Containers",
                match &caps.oci {
                    Some(o) => format!(
                        "runc {} (agent-owned), CRIU {}{}{}",
                        o.runc_version,
                        o.criu_version,
                        if o.lazy_pages { ", lazy pages" } else { "" },
                        if o.dirty_tracking {
                            ", dirty tracking"
                        } else {
                            ""
                        }
                    ),
                    None => "docker".to_string(),
                },
            ),
            (
                "Live checkpoint",
                match (caps.live_checkpoint, &caps.live_checkpoint_reason) {
                    (true, _) => "yes".to_string(),
                    (false, Some(why)) => format!("no: {why}"),
                    (false, None) => "no".to_string(),
                },
            ),
            ("GPU driver", or_none(&caps.gpu_driver)),
        ],
    ));

    match &node.latest {
        None => out.push_str("\nLatest sample: none yet\n"),
        Some(sample) => out.push_str(&sample_detail(sample, now)),
    }
    out
}

/// The latest-sample section of the detail view.
fn sample_detail(s: &NodeSample, now: SystemTime) -> String {
    let mut out = format!(
        "\nLatest sample (#{}, {}):\n",
        s.seq,
        output::ago(now, output::from_unix_ms(s.at_unix_ms))
    );
    let m = &s.memory;
    out.push_str(&output::key_values(
        "  ",
        &[
            ("CPU", format!("{:.1}%", s.cpu.total_percent)),
            ("Per core", per_core(&s.cpu.per_core_percent)),
            (
                "Load",
                format!(
                    "{:.2} {:.2} {:.2}",
                    s.cpu.load[0], s.cpu.load[1], s.cpu.load[2]
                ),
            ),
            (
                "Memory",
                format!(
                    "{} used ({}), {} available",
                    output::used_of(m.used_bytes, m.total_bytes),
                    output::percent(m.used_bytes, m.total_bytes),
                    output::bytes(m.available_bytes)
                ),
            ),
            (
                "Swap",
                if m.swap_total_bytes == 0 {
                    "none".to_string()
                } else {
                    format!(
                        "{} used",
                        output::used_of(m.swap_used_bytes, m.swap_total_bytes)
                    )
                },
            ),
            (
                "Uptime",
                output::long_duration(std::time::Duration::from_secs(s.uptime_secs)),
            ),
        ],
    ));
    section(&mut out, "Disks", &s.disks, now);
    section(&mut out, "Network", &s.networks, now);
    section(&mut out, "GPUs", &s.gpus, now);
    out
}

fn section<T: TableRow>(out: &mut String, title: &str, items: &[T], now: SystemTime) {
    out.push_str(&format!("  {title}:"));
    if items.is_empty() {
        out.push_str(" none\n");
    } else {
        out.push('\n');
        out.push_str(&output::indented(&output::table(items, now), "    "));
    }
}

/// `n cores: min a%, avg b%, max c% (core i)`.
fn per_core(cores: &[f32]) -> String {
    let Some((busiest, max)) = cores
        .iter()
        .copied()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
    else {
        return "-".to_string();
    };
    let min = cores.iter().copied().fold(f32::INFINITY, f32::min);
    let avg = cores.iter().sum::<f32>() / cores.len() as f32;
    format!(
        "{} cores: min {min:.1}%, avg {avg:.1}%, max {max:.1}% (core {busiest})",
        cores.len()
    )
}

/// Millicores as cores: `8 cores`, `1.5 cores`.
fn cores(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        format!("{} cores", millis / 1000)
    } else {
        format!("{:.1} cores", millis as f64 / 1000.0)
    }
}

/// The disk the DISK column shows: the one whose size is the node's disk capacity
/// (the data filesystem), else `/`, else the largest.
fn data_disk(sample: &NodeSample, capacity_bytes: u64) -> Option<&DiskSample> {
    let disks = &sample.disks;
    disks
        .iter()
        .find(|d| capacity_bytes != 0 && d.total_bytes == capacity_bytes)
        .or_else(|| disks.iter().find(|d| d.mount == "/"))
        .or_else(|| disks.iter().max_by_key(|d| d.total_bytes))
}

fn dash() -> String {
    "-".to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{NOW_UNIX_MS, fixture, now};

    #[test]
    fn node_table_shows_usage_in_human_units() {
        let t = output::table(&fixture(), now());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        for header in NodeView::headers() {
            assert!(lines[0].contains(header), "{header} missing in {t}");
        }
        let gpu: Vec<&str> = lines[1]
            .split("   ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        assert_eq!(
            gpu,
            [
                "gpu-1",
                "ready",
                "eu-west-1a",
                "12.5",
                "3.1Gi/15.6Gi",
                // As df: used (35Gi), not size less available (40Gi: 5Gi of
                // the fixture's disk is reserved for root).
                "35.0Gi/100.0Gi",
                "1",
                "1s ago",
                "0.1.0"
            ],
            "{t}"
        );
        let cpu: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            cpu,
            ["cpu-2", "down", "-", "-", "-", "-", "0", "-", "0.1.0"],
            "{t}"
        );
    }

    #[test]
    fn node_list_json_is_the_raw_api_objects() {
        let nodes = fixture();
        let mut out = Vec::new();
        output::write_list(&mut out, OutputFormat::Json, &nodes, now()).expect("json");
        let back: Vec<NodeView> = serde_json::from_slice(&out).expect("parses as NodeView");
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].name, "gpu-1");
        assert_eq!(back[0].latest, nodes[0].latest);
        let value: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(value[1]["status"], "down");
    }

    #[test]
    fn node_show_yaml_parses_back() {
        let node = &fixture()[0];
        let mut out = Vec::new();
        output::write_one(&mut out, OutputFormat::Yaml, node, || unreachable!()).expect("yaml");
        let back: NodeView = yaml_serde::from_slice(&out).expect("parses as NodeView");
        assert_eq!(back.capacity, node.capacity);
    }

    #[test]
    fn detail_view_covers_every_section() {
        let d = detail(&fixture()[0], now());
        for needle in [
            "Name:",
            "gpu-1",
            "zone=eu-west-1a",
            "CPU:",
            "4 cores",
            "Live checkpoint:",
            "yes",
            "Certificate expires:",
            "(in 29d)",
            "Latest sample (#42, 1s ago)",
            "12.5%",
            "4 cores: min 5.0%, avg 12.5%, max 20.0% (core 2)",
            "0.50 1.00 1.50",
            "3.1Gi/15.6Gi used (20%)",
            "0B/2.0Gi used",
            "3d 4h",
            "/var/lib/docker",
            "1.2Mi/s",
            "eth0",
            "10.0Ki/s",
            "NVIDIA H100",
            "87%",
            "40.0Gi/80.0Gi",
            "61°C",
            "350W",
        ] {
            assert!(d.contains(needle), "{needle:?} missing in:\n{d}");
        }
        let bare = detail(&fixture()[1], now());
        assert!(bare.contains("Latest sample: none yet"), "{bare}");
        assert!(bare.contains("Labels:\n  none"), "{bare}");
        assert!(bare.contains("never"), "{bare}");
    }

    #[test]
    fn last_seen_in_the_future_is_not_negative() {
        let mut node = fixture().remove(0);
        node.last_seen_unix_ms = Some(NOW_UNIX_MS + 5000);
        let cells = node.cells(now());
        assert_eq!(cells[7], "0s ago");
    }
}

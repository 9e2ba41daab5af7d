//! Why a node was or was not chosen: [`Reason`], the [`Explanation`] of one
//! replica, and the wording they use.

use super::*;
use crate::units::bytes;

/// Why a node cannot take a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The node is not ready.
    NotReady,
    /// The request is pinned to another node.
    NotPinned,
    /// `req.placement.constraints[index]` does not hold.
    Constraint {
        /// Which constraint.
        index: usize,
    },
    /// The node already runs a replica of the job and the job asks for one per node.
    JobAntiAffinity,
    /// Not enough free CPU.
    Cpu {
        /// Needed.
        needed: u64,
        /// Free.
        free: u64,
    },
    /// Not enough free memory.
    Memory {
        /// Needed.
        needed: u64,
        /// Free.
        free: u64,
    },
    /// Not enough free GPUs of the requested model and memory.
    Gpu {
        /// Needed.
        needed: u32,
        /// Free and matching.
        free: u32,
    },
    /// Not enough free disk.
    Disk {
        /// Needed.
        needed: u64,
        /// Free.
        free: u64,
    },
    /// A static host port of the request is held on the node.
    PortInUse {
        /// The port.
        port: HostPort,
        /// The node.
        node: String,
        /// The job holding it (the request's own job when one of its replicas
        /// took it).
        job: String,
    },
    /// The node's dynamic port range has fewer free ports than one replica needs.
    DynamicPorts {
        /// Ports one replica takes from the range.
        needed: u32,
        /// The node's range.
        range: PortRange,
    },
    /// A custom filter's reason.
    Other(String),
}

impl Reason {
    /// How close the node came to fitting, to pick the example to show: larger is
    /// closer. `None` when reasons of this kind do not compare.
    pub(super) fn closeness(&self) -> Option<u64> {
        match *self {
            Reason::Cpu { free, .. } | Reason::Memory { free, .. } | Reason::Disk { free, .. } => {
                Some(free)
            }
            Reason::Gpu { free, .. } => Some(u64::from(free)),
            _ => None,
        }
    }

    /// For people, with the request for context.
    pub fn describe(&self, req: &Request) -> String {
        match self {
            Reason::NotReady => "not ready".into(),
            Reason::NotPinned => format!(
                "not the requested node {}",
                req.node.as_deref().unwrap_or("-")
            ),
            Reason::Constraint { index } => match req.placement.constraints.get(*index) {
                Some(c) => format!("not matching constraint `{}`", ConstraintText(c)),
                None => "not matching a constraint".into(),
            },
            Reason::JobAntiAffinity => format!(
                "already running a replica of {} (job anti-affinity)",
                req.job
            ),
            Reason::Cpu { needed, free } => {
                format!("insufficient cpu (needs {needed}m, best node has {free}m free)")
            }
            Reason::Memory { needed, free } => format!(
                "insufficient memory (needs {}, best node has {} free)",
                bytes(*needed).trimmed(),
                bytes(*free).trimmed()
            ),
            Reason::Gpu { needed, free } => {
                let what = match &req.resources.gpus {
                    Some(g) => GpuText(g).to_string(),
                    None => format!("{needed} GPUs"),
                };
                let kind = if req.gpu_passthrough {
                    " for passthrough (bound to vfio-pci)"
                } else {
                    ""
                };
                format!("insufficient GPUs{kind} (needs {what}, best node has {free} free)")
            }
            Reason::Disk { needed, free } => format!(
                "insufficient disk (needs {}, best node has {} free)",
                bytes(*needed).trimmed(),
                bytes(*free).trimmed()
            ),
            Reason::PortInUse { port, node, job } => {
                format!("port {port} in use on {node} by job {job}")
            }
            Reason::DynamicPorts { needed, range } => {
                format!("no {needed} free host port(s) left in the dynamic range {range}")
            }
            Reason::Other(s) => s.clone(),
        }
    }
}

/// Why nodes were or were not chosen for one replica.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Explanation {
    /// Nodes in the snapshot.
    pub nodes_total: usize,
    /// Nodes that went through the filters.
    pub nodes_evaluated: usize,
    /// Nodes that passed every filter.
    pub feasible: usize,
    /// Whether every node went through every filter: then `feasible` plus the
    /// `filtered` counts add up to `nodes_total`.
    pub exhaustive: bool,
    /// Nodes rejected, by the first filter that rejected them.
    pub filtered: BTreeMap<&'static str, FilterStats>,
    /// What preemption found, when it was tried.
    pub preemption: Option<String>,
}

/// Nodes one filter rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FilterStats {
    /// How many.
    pub count: usize,
    /// The reason of the node that came closest, for people.
    pub example: String,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} nodes fit", self.feasible, self.nodes_evaluated)?;
        if !self.exhaustive {
            write!(f, " (sampled from {})", self.nodes_total)?;
        }
        let mut rows: Vec<(&&str, &FilterStats)> = self.filtered.iter().collect();
        rows.sort_by(|a, b| b.1.count.cmp(&a.1.count).then(a.0.cmp(b.0)));
        for (i, (_, s)) in rows.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            write!(f, "{} {}", s.count, s.example)?;
        }
        if let Some(p) = &self.preemption {
            write!(f, "; {p}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let placed = self.assignments.len();
        write!(
            f,
            "placed {placed}/{} replicas",
            placed as u64 + u64::from(self.unplaced)
        )?;
        if !self.preemptions.is_empty() {
            write!(f, ", preempting {}", self.preemptions.join(", "))?;
        }
        write!(f, "; {}", self.explanation)
    }
}

pub(super) fn contains_ignore_ascii_case(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    n.is_empty() || h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

pub(super) struct ConstraintText<'a>(pub(super) &'a Constraint);

impl fmt::Display for ConstraintText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        let first = c.values.first().map_or("", String::as_str);
        match c.operator {
            Operator::In => write!(f, "{} in [{}]", c.key, c.values.join(", ")),
            Operator::NotIn => write!(f, "{} not in [{}]", c.key, c.values.join(", ")),
            Operator::Exists => write!(f, "{} exists", c.key),
            Operator::DoesNotExist => write!(f, "{} does not exist", c.key),
            Operator::Equal => write!(f, "{} == {first}", c.key),
            Operator::NotEqual => write!(f, "{} != {first}", c.key),
        }
    }
}

pub(super) struct GpuText<'a>(pub(super) &'a GpuRequest);

impl fmt::Display for GpuText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = self.0;
        write!(f, "{} GPU{}", g.count, if g.count == 1 { "" } else { "s" })?;
        if let Some(m) = &g.model {
            write!(f, " matching {m:?}")?;
        }
        if let Some(m) = g.memory {
            write!(f, " with at least {}", bytes(m.0).trimmed())?;
        }
        Ok(())
    }
}

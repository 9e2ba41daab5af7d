//! The built-in filters: whether a node can take a replica at all, with the
//! index-backed prefilters that answer for every node at once.

use super::*;

/// Built-in filter: the node is ready.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadyFilter;

impl Filter for ReadyFilter {
    fn name(&self) -> &'static str {
        "ready"
    }
    fn check(&self, node: &NodeView<'_>, _req: &Request) -> Result<(), Reason> {
        if node.info.ready {
            Ok(())
        } else {
            Err(Reason::NotReady)
        }
    }
    fn prefilter(&self, snap: &Snapshot, _req: &Request) -> Prefilter {
        Prefilter::Exact(snap.ready.clone())
    }
}

/// Built-in filter: a request pinned to a node (system jobs) goes only there.
#[derive(Debug, Clone, Copy, Default)]
pub struct PinFilter;

impl Filter for PinFilter {
    fn name(&self) -> &'static str {
        "pinned"
    }
    fn check(&self, node: &NodeView<'_>, req: &Request) -> Result<(), Reason> {
        match &req.node {
            Some(pin) if *pin != node.info.name => Err(Reason::NotPinned),
            _ => Ok(()),
        }
    }
    fn prefilter(&self, snap: &Snapshot, req: &Request) -> Prefilter {
        match &req.node {
            None => Prefilter::Skip,
            Some(pin) => {
                let mut s = NodeSet::empty(snap.len());
                if let Some(i) = snap.index_of(pin) {
                    s.insert(i);
                }
                Prefilter::Exact(s)
            }
        }
    }
}

/// Built-in filter: every constraint of the request holds on the node's labels.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConstraintFilter;

impl Filter for ConstraintFilter {
    fn name(&self) -> &'static str {
        "constraints"
    }
    fn check(&self, node: &NodeView<'_>, req: &Request) -> Result<(), Reason> {
        match req
            .placement
            .constraints
            .iter()
            .position(|c| !c.operator.matches(&node.info.labels, &c.key, &c.values))
        {
            Some(index) => Err(Reason::Constraint { index }),
            None => Ok(()),
        }
    }
    fn prefilter(&self, snap: &Snapshot, req: &Request) -> Prefilter {
        if req.placement.constraints.is_empty() {
            return Prefilter::Skip;
        }
        let mut s = NodeSet::full(snap.len());
        for c in &req.placement.constraints {
            s.intersect_with(&snap.matching(&c.key, c.operator, &c.values));
        }
        Prefilter::Exact(s)
    }
}

/// Built-in filter: with `job_anti_affinity`, at most one replica of the job per node.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobAntiAffinityFilter;

impl Filter for JobAntiAffinityFilter {
    fn name(&self) -> &'static str {
        "job_anti_affinity"
    }
    fn check(&self, node: &NodeView<'_>, req: &Request) -> Result<(), Reason> {
        if req.placement.job_anti_affinity && node.job_replicas > 0 {
            Err(Reason::JobAntiAffinity)
        } else {
            Ok(())
        }
    }
    fn prefilter(&self, _snap: &Snapshot, req: &Request) -> Prefilter {
        if req.placement.job_anti_affinity {
            Prefilter::PerNode
        } else {
            Prefilter::Skip
        }
    }
}

/// Built-in filter: enough free GPUs whose model contains the requested substring
/// (ASCII case-insensitive) and with at least the requested memory, of the kind
/// the task uses (passthrough for a virtual machine, NVIDIA's driver for a
/// container).
#[derive(Debug, Clone, Copy, Default)]
pub struct GpuFilter;

impl Filter for GpuFilter {
    fn name(&self) -> &'static str {
        "gpu"
    }
    fn check(&self, node: &NodeView<'_>, req: &Request) -> Result<(), Reason> {
        let Some(g) = req.resources.gpus.as_ref().filter(|g| g.count > 0) else {
            return Ok(());
        };
        let free = (gpu_matching(node.info, g, req.gpu_passthrough) & node.free_gpus).count_ones();
        if free >= g.count {
            Ok(())
        } else {
            Err(Reason::Gpu {
                needed: g.count,
                free,
            })
        }
    }
    fn prefilter(&self, snap: &Snapshot, req: &Request) -> Prefilter {
        let Some(g) = req.resources.gpus.as_ref().filter(|g| g.count > 0) else {
            return Prefilter::Skip;
        };
        let mut s = NodeSet::empty(snap.len());
        for &i in &snap.gpu_nodes {
            if gpu_matching(&snap.nodes[i as usize].info, g, req.gpu_passthrough).count_ones()
                >= g.count
            {
                s.insert(i);
            }
        }
        Prefilter::Within(s)
    }
}

/// Built-in filter: enough free CPU.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuFilter;

impl Filter for CpuFilter {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn check(&self, node: &NodeView<'_>, req: &Request) -> Result<(), Reason> {
        let needed = req.resources.cpu.0;
        if node.free_cpu_millis >= needed {
            Ok(())
        } else {
            Err(Reason::Cpu {
                needed,
                free: node.free_cpu_millis,
            })
        }
    }
}

/// Built-in filter: enough free memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryFilter;

impl Filter for MemoryFilter {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn check(&self, node: &NodeView<'_>, req: &Request) -> Result<(), Reason> {
        let needed = req.resources.memory.0;
        if node.free_memory_bytes >= needed {
            Ok(())
        } else {
            Err(Reason::Memory {
                needed,
                free: node.free_memory_bytes,
            })
        }
    }
}

/// Built-in filter: enough free disk for `resources.disk`.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskFilter;

impl Filter for DiskFilter {
    fn name(&self) -> &'static str {
        "disk"
    }
    fn check(&self, node: &NodeView<'_>, req: &Request) -> Result<(), Reason> {
        let needed = req.resources.disk.0;
        if node.free_disk_bytes >= needed {
            Ok(())
        } else {
            Err(Reason::Disk {
                needed,
                free: node.free_disk_bytes,
            })
        }
    }
    fn prefilter(&self, _snap: &Snapshot, req: &Request) -> Prefilter {
        if req.resources.disk.0 == 0 {
            Prefilter::Skip
        } else {
            Prefilter::PerNode
        }
    }
}

/// Built-in filter: every static host port of the request is free on the node,
/// and its dynamic range has a free port for each port without one.
#[derive(Debug, Clone, Copy, Default)]
pub struct PortFilter;

impl Filter for PortFilter {
    fn name(&self) -> &'static str {
        "ports"
    }
    fn check(&self, node: &NodeView<'_>, req: &Request) -> Result<(), Reason> {
        for port in req.static_ports() {
            let job = match node.port_holder(port) {
                Some(job) => job,
                None if node.port_taken_by_request(port) => req.job.as_str(),
                None => continue,
            };
            return Err(Reason::PortInUse {
                port,
                node: node.info.name.clone(),
                job: job.to_string(),
            });
        }
        if req.dynamic_port_count() > 0 && node.assign_ports(req).is_none() {
            return Err(Reason::DynamicPorts {
                needed: req.dynamic_port_count(),
                range: node.info.capacity.dynamic_ports,
            });
        }
        Ok(())
    }
    fn prefilter(&self, _snap: &Snapshot, req: &Request) -> Prefilter {
        if req.ports.is_empty() {
            Prefilter::Skip
        } else {
            Prefilter::PerNode
        }
    }
}

/// The GPUs of `info` that match `g` (model substring, memory), as a mask:
/// those bound to `vfio-pci` for a virtual machine (`passthrough`), those of
/// NVIDIA's driver for a container, as neither can use the other kind.
pub(super) fn gpu_matching(info: &NodeInfo, g: &GpuRequest, passthrough: bool) -> u64 {
    let mut mask = 0u64;
    for (i, gpu) in info
        .capacity
        .gpus
        .iter()
        .enumerate()
        .take(MAX_GPUS_PER_NODE)
    {
        let model_ok = g
            .model
            .as_deref()
            .is_none_or(|m| contains_ignore_ascii_case(&gpu.model, m));
        let mem_ok = g.memory.is_none_or(|m| gpu.memory_bytes >= m.0);
        if model_ok && mem_ok && gpu.is_passthrough() == passthrough {
            mask |= 1 << i;
        }
    }
    mask
}

/// The GPUs a replica gets on `view`: the matching free ones with the least memory
/// first (keeping big GPUs for jobs that need them), then by position.
pub(super) fn choose_gpus(view: &NodeView<'_>, req: &Request) -> u64 {
    let Some(g) = req.resources.gpus.as_ref().filter(|g| g.count > 0) else {
        return 0;
    };
    let free = gpu_matching(view.info, g, req.gpu_passthrough) & view.free_gpus;
    let gpus = &view.info.capacity.gpus;
    let mut order: Vec<usize> = (0..gpus.len()).filter(|i| free & (1 << i) != 0).collect();
    order.sort_by_key(|&i| (gpus[i].memory_bytes, i));
    order
        .into_iter()
        .take(g.count as usize)
        .fold(0, |m, i| m | (1 << i))
}

//! A `qemu` node pool (issue 21, item 6), end to end: a real controller, one real
//! agent that runs VMs (QEMU, under TCG on these machines), and the node guest
//! image of `packaging/vm/build-node-image.sh` (Debian, Docker and the
//! `novacron-agent` built by this workspace, under its shipped systemd unit).
//!
//! A job that fits no node makes the pool add one: the provider applies a VM job
//! on the VM host, the guest boots, its seed joins the fleet with the node's
//! single-use token, and the job's container runs in the guest's own Docker, from
//! an image the guest pulls through its agent from the controller's image store.
//! Once the job stops, the idle node is drained, revoked, and its VM stopped;
//! its VM job is purged once the guest is gone.
//! Everything goes through the CLI as typed.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use novacron_common::wire::AllocState;
use novacron_tests::{
    Agent, Controller, TEST_IMAGE, docker, ensure_test_image, succeeded, wait_for,
};

/// The node guest image this test builds (cached by its inputs' hash).
const NODE_IMAGE: &str = "novacron/node-guest:test";
/// Bound on the scale-out: the VM's boot under TCG, Docker's start in the guest,
/// the join, the image pull through the guest's agent and the container's start
/// (about 100 s on an idle 2-core machine; CI runs other tests beside it). The
/// qemu provider's default `provisionTimeout` (10 minutes; the pool sets none)
/// is longer, so a slow boot is not replaced midway.
const SCALE_OUT: Duration = Duration::from_secs(420);
/// Bound on the drain, the revocation and the VM's power-off.
const SCALE_IN: Duration = Duration::from_secs(120);

fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

/// Fails (never skips) when QEMU is missing, naming the setup step; builds the
/// node guest image with the agent binary the tests run.
fn node_image() -> Result<()> {
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output();
    if !qemu.is_ok_and(|o| o.status.success()) {
        bail!("qemu-system-x86_64 is missing: run `bash .ci/setup vm`");
    }
    let script = repo_root().join("packaging/vm/build-node-image.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg("--agent")
        .arg(novacron_tests::bin("novacron-agent"))
        .args(["--tag", NODE_IMAGE])
        .output()
        .context("running build-node-image.sh")?;
    if !out.status.success() {
        bail!(
            "build-node-image.sh failed (its root comes from `bash .ci/setup vm`):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The VM template that boots the node guest (its `/novacron-vm.json`).
fn vm_template(pool: &str) -> String {
    format!(
        "apiVersion: novacron.io/v1
kind: VMTemplate
metadata:
  name: {pool}-guest
spec:
  kernel: /boot/vmlinuz
  initrd: /boot/initrd.img
  disk: /disk/root.qcow2
  cmdline: console=ttyS0 panic=-1
"
    )
}

fn pool_manifests(pool: &str, port: u16) -> String {
    format!(
        "apiVersion: novacron.io/v1
kind: NodeTemplate
metadata: {{name: {pool}-t}}
spec:
  instanceType: vm-small
  provider: qemu
  capacityType: on-demand
  pricePerHour: 0.04
  labels: {{tier: vm}}
  resources: {{cpu: 1, memory: 1Gi}}
---
apiVersion: novacron.io/v1
kind: NodePool
metadata:
  name: {pool}
  labels:
    qemu.image: \"{NODE_IMAGE}\"
    qemu.template: {pool}-guest
    qemu.controller: https://10.0.2.2:{port}
    qemu.quic: 10.0.2.2:{port}
    scaleDownAfter: 3s
spec:
  templateRef: {pool}-t
  minSize: 0
  maxSize: 1
"
    )
}

fn work_job(job: &str, pool: &str) -> String {
    format!(
        "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: {job}
spec:
  type: service
  replicas: 1
  task:
    image: {TEST_IMAGE}
    command: [sh, -c, 'echo running in $(hostname) on a pool node; while true; do sleep 1; done']
  resources:
    cpu: 200m
    memory: 32Mi
  placement:
    constraints:
      - {{key: pool, operator: '==', values: [{pool}]}}
"
    )
}

async fn running_on(c: &Controller, job: &str) -> Option<(String, String)> {
    c.job(job)
        .await
        .ok()?
        .allocations
        .into_iter()
        .find(|a| a.desired_run && a.state == AllocState::Running)
        .map(|a| (a.node, a.id))
}

/// The pids of the QEMUs running the host agent's VMs (`vms/*/qemu.pid`).
fn live_qemus(host: &Agent) -> Vec<u32> {
    let Ok(dirs) = std::fs::read_dir(host.state_dir.join("vms")) else {
        return Vec::new();
    };
    dirs.filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid = std::fs::read_to_string(e.path().join("qemu.pid")).ok()?;
            let pid: u32 = pid.trim().parse().ok()?;
            std::path::Path::new(&format!("/proc/{pid}"))
                .exists()
                .then_some(pid)
        })
        .collect()
}

/// Kills the host agent's QEMUs when dropped: QEMU daemonizes and outlives the
/// agent, and a failed test's node VM must not run on through the suite.
struct KillVms(std::path::PathBuf);

impl Drop for KillVms {
    fn drop(&mut self) {
        let Ok(dirs) = std::fs::read_dir(self.0.join("vms")) else {
            return;
        };
        for e in dirs.flatten() {
            let Ok(pid) = std::fs::read_to_string(e.path().join("qemu.pid")) else {
                continue;
            };
            // Only a QEMU still: the pid may have been reused since.
            let comm = std::fs::read_to_string(format!("/proc/{}/comm", pid.trim()));
            if comm.is_ok_and(|c| c.starts_with("qemu")) {
                let _ = std::process::Command::new("kill")
                    .args(["-9", pid.trim()])
                    .status();
            }
        }
    }
}

fn diagnose(c: &Controller, host: &Agent, dir: &std::path::Path) -> String {
    let consoles: Vec<String> = std::fs::read_dir(host.state_dir.join("vms"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("serial.run.log"))
        .filter(|p| p.is_file())
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            format!(
                "--- {}:\n{}",
                p.display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            )
        })
        .collect();
    let log = std::fs::read_to_string(dir.join("controller-1.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    format!(
        "pools:\n{}\nnodes:\n{}\njobs:\n{}\n{}\n--- controller log (last lines):\n{}\n--- host agent log (last lines):\n{}",
        String::from_utf8_lossy(&c.cli(&["pool", "list"]).stdout),
        String::from_utf8_lossy(&c.cli(&["node", "list"]).stdout),
        String::from_utf8_lossy(&c.cli(&["alloc", "list", "-o", "wide"]).stdout),
        consoles.join("\n"),
        lines[lines.len().saturating_sub(40)..].join("\n"),
        host.log()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_pool_adds_a_vm_node_that_joins_and_runs_a_container_then_removes_it() -> Result<()>
{
    node_image()?;
    ensure_test_image()?;
    let pid = std::process::id() % 100_000;
    let dir = tempfile::Builder::new().prefix("nc-vmpool").tempdir()?;
    let c = Controller::start(dir.path(), &[]).await?;
    let host = Agent::join_and_run(dir.path(), &c, &format!("vmhost{pid}"), &[]).await?;
    let _kill = KillVms(host.state_dir.clone());
    c.wait_ready(&host.name, Duration::from_secs(20)).await?;
    // The guest has no registry to pull from: it pulls through its own agent
    // from the controller's image store.
    succeeded(&c.cli(&["image", "push", TEST_IMAGE]));

    let pool = format!("vp{pid}-{:04x}", rand::random::<u16>());
    let files = tempfile::tempdir()?;
    for (file, text) in [
        ("guest.yaml", vm_template(&pool)),
        ("pool.yaml", pool_manifests(&pool, c.port)),
    ] {
        let path = files.path().join(file);
        std::fs::write(&path, text)?;
        succeeded(&c.cli(&["apply", "-f", path.to_str().context("path")?]));
    }

    // A replica that fits no node (it asks for the pool) makes the pool grow.
    let job = format!("{pool}-work");
    let path = files.path().join("job.yaml");
    std::fs::write(&path, work_job(&job, &pool))?;
    let applied = Instant::now();
    succeeded(&c.cli(&["apply", "-f", path.to_str().context("path")?]));
    if let Err(e) = wait_for(
        SCALE_OUT,
        "the job running on a VM node of the pool",
        || async { running_on(&c, &job).await.is_some() },
    )
    .await
    {
        bail!("{e}\n{}", diagnose(&c, &host, dir.path()));
    }
    let (node, alloc) = running_on(&c, &job).await.context("running")?;
    println!(
        "cold start: VM node {node} booted, joined and running the replica {:.1} s after the job was applied",
        applied.elapsed().as_secs_f64()
    );
    assert!(node.starts_with(&format!("{pool}-")), "{node}");

    // The node is a VM job on the host, named after it and labelled with the pool.
    let vm = c.job(&node).await.context("the node's VM job")?;
    let vm_alloc = vm
        .allocations
        .iter()
        .find(|a| a.desired_run && a.state == AllocState::Running)
        .context("the VM runs")?;
    assert_eq!(vm_alloc.node, host.name);
    let qemus = live_qemus(&host);
    assert_eq!(
        qemus.len(),
        1,
        "the host runs one VM, the node's: {qemus:?}"
    );
    let view = c.node(&node).await?.context("the VM node is enrolled")?;
    assert_eq!(view.labels.get("pool"), Some(&pool));
    assert_eq!(view.labels.get("tier").map(String::as_str), Some("vm"));
    assert_eq!(
        view.labels.get("instance_type").map(String::as_str),
        Some("vm-small")
    );
    // The guest's own memory: the template's 1 GiB plus the guest's overhead.
    let mem = view.capacity.memory_bytes;
    assert!(
        mem > (1 << 30) && mem < (3 << 29),
        "the VM node reports {mem} bytes of memory"
    );
    // The container runs in the guest's Docker, not the host's.
    assert!(
        docker(&["ps", "-q", "--filter", &format!("label=novacron.job={job}")])?.is_empty(),
        "the job's container runs on the host's Docker"
    );
    let logs = succeeded(&c.cli(&["alloc", "logs", &alloc, "--tail", "5"]));
    assert!(
        logs.contains("on a pool node"),
        "the replica's output through the guest's agent: {logs:?}"
    );
    let pools = succeeded(&c.cli(&["pool", "list"]));
    assert!(pools.contains(&pool) && pools.contains("qemu"), "{pools}");

    // The job stops: the idle node is drained, revoked and its VM powered off,
    // and the node's VM job, once its guest is gone, is purged (not left
    // behind as a stopped job for every node the pool ever had).
    succeeded(&c.cli(&["job", "stop", &job]));
    if let Err(e) = wait_for(SCALE_IN, "the idle VM node removed", || async {
        let vm_job_purged = c
            .job(&node)
            .await
            .is_err_and(|e| e.to_string().contains("404"));
        vm_job_purged && live_qemus(&host).is_empty()
    })
    .await
    {
        bail!("{e}\n{}", diagnose(&c, &host, dir.path()));
    }
    let status = c.node(&node).await?.map(|v| v.status.to_string());
    assert_ne!(status.as_deref(), Some("ready"), "{node} is still ready");
    let events = succeeded(&c.cli(&["events", "--type", "pool"]));
    for kind in ["pool.scaled", "pool.draining", "pool.removed"] {
        assert!(events.contains(kind), "no {kind} event in {events}");
    }
    Ok(())
}

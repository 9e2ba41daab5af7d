//! Virtual machines (issue 21): a job whose task is a QEMU guest, end to end on a
//! real controller, a real agent and a real QEMU (under TCG on these machines,
//! where nested KVM cannot boot a guest; the agent's probe finds that out).
//!
//! The guest is `novacron/guest-tiny:1`, built by `packaging/vm/build-guest-image.sh`
//! (`bash .ci/setup vm`): a Debian cloud kernel and a busybox initramfs that serves
//! HTTP on 8080 (`/health`, and a counter kept in guest memory at
//! `/cgi-bin/count`) and powers off on the ACPI power button.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use novacron_common::wire::AllocState;
use novacron_tests::{Agent, free_port, one_node_fleet, wait_for};

const GUEST_IMAGE: &str = "novacron/guest-tiny:1";

/// Fails (never skips) when QEMU or the guest image is missing, naming the setup step.
fn require_vm_setup() -> Result<()> {
    let qemu = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output();
    if !qemu.is_ok_and(|o| o.status.success()) {
        bail!("qemu-system-x86_64 is missing: run `bash .ci/setup vm`");
    }
    let image = std::process::Command::new("docker")
        .args(["image", "inspect", GUEST_IMAGE])
        .output()
        .context("docker")?;
    if !image.status.success() {
        bail!("the guest image {GUEST_IMAGE} is missing: run `bash .ci/setup vm`");
    }
    Ok(())
}

fn vm_job(name: &str, host_port: u16) -> String {
    format!(
        "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: {name}
spec:
  type: service
  replicas: 1
  task:
    image: {GUEST_IMAGE}
    pullPolicy: never
    ports:
      - {{name: http, containerPort: 8080, hostPort: {host_port}}}
    vm:
      vcpus: 1
      memory: 192Mi
      kernel: /boot/vmlinuz
      initrd: /boot/initrd.img
      cmdline: console=ttyS0 panic=-1 novacron.hostname={name}
  resources: {{cpu: 500m, memory: 256Mi}}
  health:
    readiness:
      http: {{port: 8080, path: /health}}
      period: 2s
      timeout: 1s
      failureThreshold: 3
"
    )
}

async fn get(url: &str) -> Result<String> {
    let resp = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .error_for_status()?;
    Ok(resp.text().await?)
}

/// The pid of the only VM's QEMU in the agent's state directory.
fn qemu_pid(agent: &Agent) -> Option<(std::path::PathBuf, u32)> {
    let vms = agent.state_dir.join("vms");
    std::fs::read_dir(&vms)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("vm-"))
        .find_map(|e| {
            let pid = std::fs::read_to_string(e.path().join("qemu.pid")).ok()?;
            let pid: u32 = pid.trim().parse().ok()?;
            std::path::Path::new(&format!("/proc/{pid}"))
                .exists()
                .then(|| (e.path(), pid))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_job_boots_serves_survives_an_agent_restart_and_powers_off_gracefully() -> Result<()> {
    require_vm_setup()?;
    let (_dir, c, mut agent) = one_node_fleet("nc-vm", "vm-node", &[]).await?;

    // The node says it runs VMs, and under which accelerator.
    let node = c.node("vm-node").await?.context("the node")?;
    let vm = node
        .capabilities
        .vm
        .clone()
        .context("the node reports no VM capability")?;
    assert!(
        vm.qemu_version.starts_with(|ch: char| ch.is_ascii_digit()),
        "{vm:?}"
    );
    assert!(["kvm", "tcg"].contains(&vm.accelerator.as_str()), "{vm:?}");

    let port = free_port();
    c.apply("vm.yaml", &vm_job("tinyvm", port)).await?;
    // Under TCG the guest boots in seconds; allow for a busy machine.
    wait_for(
        Duration::from_secs(120),
        "the VM running and ready",
        || async {
            c.job("tinyvm").await.is_ok_and(|d| {
                d.allocations.iter().any(|a| {
                    a.desired_run && a.state == AllocState::Running && a.healthy == Some(true)
                })
            })
        },
    )
    .await
    .with_context(|| agent.log())?;

    // The published port reaches the guest's own HTTP server.
    let page = get(&format!("http://127.0.0.1:{port}/")).await?;
    assert!(page.contains("novacron guest"), "{page}");
    let count = |port: u16| async move {
        get(&format!("http://127.0.0.1:{port}/cgi-bin/count"))
            .await
            .map(|t| t.trim().to_owned())
    };
    assert_eq!(count(port).await?, "1");
    assert_eq!(count(port).await?, "2");

    // The node reports the accelerator the probe chose (TCG here: nested KVM
    // cannot boot a guest) once a VM has booted.
    let (vm_dir, pid) = qemu_pid(&agent).context("a running qemu")?;
    let meta = std::fs::read_to_string(vm_dir.join("meta.json"))?;
    assert!(meta.contains("\"accel\""), "{meta}");

    // The agent restarts; the VM keeps running (same QEMU, same memory: the
    // counter goes on) and the new agent adopts it.
    agent.kill().await;
    agent.start()?;
    c.wait_ready("vm-node", Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, pid_after) = qemu_pid(&agent).context("qemu after the agent restart")?;
    assert_eq!(pid, pid_after, "the VM was restarted with the agent");
    assert_eq!(count(port).await?, "3");
    let d = c.job("tinyvm").await?;
    assert_eq!(
        d.allocations
            .iter()
            .filter(|a| a.desired_run && a.state == AllocState::Running)
            .count(),
        1,
        "{:?}",
        d.allocations
    );

    // Stopping the job presses the power button: the guest powers off cleanly
    // and the VM is removed with its directory.
    let stopped = c.cli(&["job", "stop", "tinyvm"]);
    assert!(
        stopped.status.success(),
        "{}",
        String::from_utf8_lossy(&stopped.stderr)
    );
    wait_for(Duration::from_secs(60), "qemu gone", || async {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    })
    .await?;
    wait_for(
        Duration::from_secs(30),
        "the VM's directory removed",
        || async { !vm_dir.exists() },
    )
    .await
    .with_context(|| agent.log())?;
    let log = agent.log();
    assert!(
        log.contains("virtual machine stopped") && log.contains("clean=true"),
        "the guest did not power off on the ACPI button:\n{log}"
    );
    Ok(())
}

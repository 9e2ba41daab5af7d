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

const TEMPLATE: &str = "apiVersion: novacron.io/v1
kind: VMTemplate
metadata:
  name: tiny
spec:
  vcpus: 1
  memory: 192Mi
  kernel: /boot/vmlinuz
  initrd: /boot/initrd.img
  cmdline: console=ttyS0 quiet panic=-1 novacron.hostname=tiny-host
  userData: |
    #!/bin/sh
    echo from-user-data > /www/hello.txt
";

/// A VM job that the idle policy stops once its CPU stays under 5% of its
/// request (2 cores) for 20 s.
fn idle_job(name: &str) -> String {
    format!(
        "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: {name}
  labels: {{idleStop: 20s}}
spec:
  type: service
  replicas: 1
  task:
    image: {GUEST_IMAGE}
    pullPolicy: never
    vm:
      memory: 128Mi
      initrd: /boot/initrd.img
      cmdline: console=ttyS0 quiet panic=-1
  resources: {{cpu: 2, memory: 256Mi}}
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

    // A template, applied as a user would, then a VM made from it with the CLI.
    let dir = tempfile::tempdir()?;
    let template = dir.path().join("tiny.yaml");
    std::fs::write(&template, TEMPLATE)?;
    let applied = c.cli(&["apply", "-f", template.to_str().context("path")?]);
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let templates = c.cli(&["vm", "templates"]);
    let templates = String::from_utf8_lossy(&templates.stdout).to_string();
    assert!(
        templates.contains("tiny") && templates.contains("192Mi"),
        "{templates}"
    );

    let port = free_port();
    let created = c.cli(&[
        "vm",
        "create",
        "tinyvm",
        "--image",
        GUEST_IMAGE,
        "--template",
        "tiny",
        "--port",
        &format!("http:8080:{port}"),
        "--health-path",
        "/health",
        "--cpu",
        "500m",
        "--no-pull",
    ]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
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
    let list = c.cli(&["vm", "list"]);
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(
        list.contains("tinyvm") && list.contains("running") && list.contains("tiny"),
        "{list}"
    );
    // The template was resolved when the VM was created: its command line
    // (with novacron.hostname) reached the guest, whose console the CLI shows.
    let console = c.cli(&["vm", "console", "tinyvm"]);
    let console = String::from_utf8_lossy(&console.stdout).to_string();
    assert!(console.contains("novacron-guest: ready"), "{console}");

    // The published port reaches the guest's own HTTP server.
    let page = get(&format!("http://127.0.0.1:{port}/")).await?;
    assert!(
        page.contains("novacron guest") && page.contains("tiny-host"),
        "{page}"
    );
    // The template's user data reached the guest as a NoCloud seed and ran.
    // The guest runs it after it says it is ready (a CI run asked for its
    // file first and got 404), so the test waits for the guest's word.
    wait_for(Duration::from_secs(30), "the user data to run", || async {
        String::from_utf8_lossy(&c.cli(&["vm", "console", "tinyvm"]).stdout)
            .contains("user-data ran (exit 0)")
    })
    .await
    .with_context(|| {
        String::from_utf8_lossy(&c.cli(&["vm", "console", "tinyvm"]).stdout).to_string()
    })?;
    let hello = get(&format!("http://127.0.0.1:{port}/hello.txt")).await?;
    assert_eq!(hello.trim(), "from-user-data");
    let count = |port: u16| async move {
        get(&format!("http://127.0.0.1:{port}/cgi-bin/count"))
            .await
            .map(|t| t.trim().to_owned())
    };
    assert_eq!(count(port).await?, "1");
    assert_eq!(count(port).await?, "2");

    // The serial console, attached as an operator types into it: a line goes
    // to the guest's shell, its answer comes back, and Ctrl-] detaches.
    let (said, told) = console_session(&c, "tinyvm", "echo hello-$((6*7))", "hello-42")
        .await
        .with_context(|| agent.log())?;
    assert!(
        said.contains("hello-42"),
        "the guest's shell did not answer on the console: {said:?}\n{told}"
    );
    assert!(told.contains("detached"), "{told}");
    // What was typed and answered is in the console's log too.
    let log = c.cli(&["vm", "console", "tinyvm"]);
    assert!(String::from_utf8_lossy(&log.stdout).contains("hello-42"));
    // A VM runs no other command from its node.
    let refused = c.cli(&[
        "alloc",
        "exec",
        "-i",
        &wanted(&c, "tinyvm").await?.id,
        "--",
        "sh",
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("vm console"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // The node reports the accelerator the probe chose (TCG here: nested KVM
    // cannot boot a guest) once a VM has booted.
    let (vm_dir, pid) = qemu_pid(&agent).context("a running qemu")?;
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(vm_dir.join("meta.json"))?)?;
    // Before its first VM a node reports `kvm` (nothing has failed yet); the
    // probe boot of that VM decides, and the node's next report says what it
    // chose (found in CI on a fresh machine: the capability read before the
    // boot said kvm, the VM ran under tcg).
    let booted_under = meta["accel"].as_str().unwrap_or_default().to_owned();
    let reported = std::sync::Mutex::new(vm.accelerator.clone());
    let agreed = wait_for(
        Duration::from_secs(30),
        "the node reporting the accelerator its VM booted under",
        || async {
            let now = c
                .node("vm-node")
                .await
                .ok()
                .flatten()
                .and_then(|n| n.capabilities.vm)
                .map(|v| v.accelerator)
                .unwrap_or_default();
            *reported.lock().expect("lock") = now.clone();
            now == booted_under
        },
    )
    .await;
    assert!(
        agreed.is_ok(),
        "the VM booted under another accelerator than the node reports ({}): {meta}",
        reported.lock().expect("lock")
    );

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
    let stopped = c.cli(&["vm", "stop", "tinyvm"]);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_vm_is_shut_down_by_the_idle_policy() -> Result<()> {
    require_vm_setup()?;
    let (_dir, c, agent) = one_node_fleet("nc-vm-idle", "vm-idle", &[]).await?;
    c.apply("idle.yaml", &idle_job("idlevm")).await?;
    wait_for(Duration::from_secs(120), "the VM running", || async {
        novacron_tests::job_running(&c, "idlevm").await
    })
    .await
    .with_context(|| agent.log())?;
    let (_, pid) = qemu_pid(&agent).context("a running qemu")?;
    // The guest idles (a shell waiting in httpd): the policy stops the job,
    // and the VM powers off.
    wait_for(Duration::from_secs(120), "the idle VM stopped", || async {
        c.job("idlevm")
            .await
            .is_ok_and(|d| d.summary.status == "stopped")
    })
    .await
    .with_context(|| agent.log())?;
    wait_for(Duration::from_secs(60), "qemu gone", || async {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    })
    .await?;
    let events = c.cli(&["events", "-o", "json"]);
    let events = String::from_utf8_lossy(&events.stdout).to_string();
    assert!(events.contains("cost.idle_stopped"), "{events}");
    Ok(())
}

/// The memory limit (bytes) and CPU quota (µs per 100 ms) of the cgroups
/// process `pid` runs in, read from the kernel (cgroup v1 or v2).
fn cgroup_limits(pid: u32) -> Result<(u64, u64)> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let path_of = |controller: &str| {
        cgroups.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, names, path) = (parts.next()?, parts.next()?, parts.next()?);
            names
                .split(',')
                .any(|n| n == controller)
                .then(|| path.to_owned())
        })
    };
    let read = |p: String| -> Result<String> {
        Ok(std::fs::read_to_string(&p)
            .with_context(|| p.clone())?
            .trim()
            .to_owned())
    };
    if let (Some(memory), Some(cpu)) = (path_of("memory"), path_of("cpu")) {
        let limit = read(format!(
            "/sys/fs/cgroup/memory{memory}/memory.limit_in_bytes"
        ))?;
        let quota = read(format!("/sys/fs/cgroup/cpu{cpu}/cpu.cfs_quota_us"))?;
        Ok((limit.parse()?, quota.parse()?))
    } else {
        let unified = cgroups
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup of QEMU's")?;
        let limit = read(format!("/sys/fs/cgroup{unified}/memory.max"))?;
        let cpu = read(format!("/sys/fs/cgroup{unified}/cpu.max"))?;
        let quota = cpu.split_whitespace().next().unwrap_or_default();
        Ok((limit.parse()?, quota.parse()?))
    }
}

/// Attaches `novacron vm console VM -i` as an operator would, types `line`
/// into the guest's shell once attached, waits (at most 60 s) until `until`
/// comes back, then detaches with Ctrl-]; the CLI's output and its messages.
async fn console_session(
    c: &novacron_tests::Controller,
    vm: &str,
    line: &str,
    until: &str,
) -> Result<(String, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut console = tokio::process::Command::from(c.cli_command());
    let mut console = console
        .args(["vm", "console", vm, "-i"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut typing = console.stdin.take().context("the console's input")?;
    let mut reading = console.stdout.take().context("the console's output")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    typing.write_all(format!("{line}\n").as_bytes()).await?;
    let mut said = Vec::new();
    let heard = tokio::time::timeout(Duration::from_secs(60), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = reading.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            said.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&said).contains(until) {
                break;
            }
        }
        anyhow::Ok(())
    })
    .await;
    // (A session that already ended, with its guest, has no input to take.)
    let _ = typing.write_all(&[0x1d]).await;
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        reading.read_to_end(&mut rest).await?;
        anyhow::Ok(console.wait().await?)
    })
    .await
    .context("the console session did not end on Ctrl-]")??;
    said.extend_from_slice(&rest);
    let mut told = String::new();
    if let Some(mut e) = console.stderr.take() {
        e.read_to_string(&mut told).await?;
    }
    let said = String::from_utf8_lossy(&said).to_string();
    anyhow::ensure!(
        ended.success(),
        "the console ended with {ended}: {said}\n{told}"
    );
    heard.map_err(|_| {
        anyhow::anyhow!("{until:?} did not come back within 60 s: {said:?}\n{told}")
    })??;
    Ok((said, told))
}

/// The wanted allocation of `job` as the controller shows it.
async fn wanted(c: &novacron_tests::Controller, job: &str) -> Result<novacron_api::AllocView> {
    c.job(job)
        .await?
        .allocations
        .into_iter()
        .find(|a| a.desired_run)
        .context("no wanted allocation")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_vm_stays_paused_through_agent_and_controller_restarts_and_resumes_where_it_was()
-> Result<()> {
    require_vm_setup()?;
    let (_dir, mut c, mut agent) = one_node_fleet("nc-vm-sus", "vm-sus", &[]).await?;
    let port = free_port();
    c.apply("susvm.yaml", &counter_vm_job("susvm", port))
        .await?;
    wait_for(
        Duration::from_secs(120),
        "the VM running and ready",
        || async {
            wanted(&c, "susvm")
                .await
                .is_ok_and(|a| a.state == AllocState::Running && a.healthy == Some(true))
        },
    )
    .await
    .with_context(|| agent.log())?;
    let count = || count_at("127.0.0.1", port);
    // Requests to the sleeping guest time out; QEMU's network holds them,
    // and the guest answers them once it runs again (each adds one).
    let mut held = 0;
    let asleep = |r: Result<String>, held: &mut u32| {
        *held += 1;
        r.is_err()
    };
    assert_eq!(count().await?, "1");
    assert_eq!(count().await?, "2");
    let (_, pid) = qemu_pid(&agent).context("a running qemu")?;
    let before = wanted(&c, "susvm").await?;
    // QEMU runs in a cgroup of its own with the job's limits: 384Mi of memory
    // (the guest's 128Mi and QEMU's own, at most 256Mi under TCG) and half a
    // core.
    assert_eq!(cgroup_limits(pid)?, (384 << 20, 50_000));

    // Suspended as an operator types it: the CLI returns once the node has
    // paused the guest.
    let out = c.cli(&["vm", "suspend", "susvm"]);
    let said = novacron_tests::succeeded(&out);
    assert!(said.contains("suspended"), "{said}");
    let a = wanted(&c, "susvm").await?;
    assert!(a.suspended && a.state == AllocState::Running, "{a:?}");
    let list = c.cli(&["vm", "list"]);
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(list.contains("suspended"), "{list}");
    // A paused guest answers nothing (QEMU still holds the port).
    assert!(
        asleep(count().await, &mut held),
        "a suspended guest answered its counter"
    );

    // Its readiness check (every 2 s) is not run against the paused guest:
    // nothing restarts or replaces it while it sleeps.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let a = wanted(&c, "susvm").await?;
    assert_eq!(
        (a.id.as_str(), a.restarts, a.state),
        (before.id.as_str(), before.restarts, AllocState::Running),
        "{a:?}"
    );
    assert!(a.suspended, "{a:?}");

    // The agent restarts: it adopts the paused guest and keeps it paused.
    agent.kill().await;
    agent.start()?;
    c.wait_ready("vm-sus", Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, pid_now) = qemu_pid(&agent).context("qemu after the agent restart")?;
    assert_eq!(pid, pid_now, "the VM was restarted with the agent");
    assert!(
        asleep(count().await, &mut held),
        "the agent's restart resumed the guest"
    );
    let a = wanted(&c, "susvm").await?;
    assert!(a.suspended && a.id == before.id, "{a:?}");

    // The controller restarts: the suspension is in its store, and its first
    // desired set keeps the guest paused.
    c.restart().await?;
    c.wait_ready("vm-sus", Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        asleep(count().await, &mut held),
        "the controller's restart resumed the guest"
    );
    let d = c.job("susvm").await?;
    assert!(d.summary.suspended, "{:?}", d.summary);

    // A snapshot of the sleeping guest (QEMU's migration into a file, which
    // ends by resuming a guest it paused) leaves it asleep.
    novacron_tests::succeeded(&c.cli(&["alloc", "checkpoint", &before.id]));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        asleep(count().await, &mut held),
        "the snapshot's end resumed the suspended guest"
    );
    assert!(wanted(&c, "susvm").await?.suspended);

    // Resumed: the same guest goes on where it was, its memory intact.
    let out = c.cli(&["vm", "resume", "susvm"]);
    let said = novacron_tests::succeeded(&out);
    assert!(said.contains("resumed"), "{said}");
    // The count goes on from 2, by one plus at most the requests held while
    // it slept; a rebooted guest would say 1.
    let now: u32 = count().await?.parse()?;
    assert!(
        (3..=3 + held).contains(&now),
        "the guest did not keep its memory: count {now} after 2 ({held} requests held)"
    );
    let (_, pid_now) = qemu_pid(&agent).context("qemu after the resume")?;
    assert_eq!(pid, pid_now);
    wait_for(Duration::from_secs(30), "ready again", || async {
        wanted(&c, "susvm")
            .await
            .is_ok_and(|a| !a.suspended && a.healthy == Some(true))
    })
    .await
    .with_context(|| agent.log())?;
    let events = c.cli(&["events", "-o", "json"]);
    let events = String::from_utf8_lossy(&events.stdout).to_string();
    for kind in ["vm.suspend_asked", "vm.suspended", "vm.resumed"] {
        assert!(events.contains(kind), "no {kind} event: {events}");
    }

    // Suspended again, then stopped: the guest is woken to hear the power
    // button and powers off cleanly.
    novacron_tests::succeeded(&c.cli(&["vm", "suspend", "susvm"]));
    novacron_tests::succeeded(&c.cli(&["vm", "stop", "susvm"]));
    wait_for(Duration::from_secs(60), "qemu gone", || async {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    })
    .await
    .with_context(|| agent.log())?;
    let log = agent.log();
    assert!(
        log.contains("virtual machine stopped") && log.contains("clean=true"),
        "the suspended guest did not power off cleanly:\n{log}"
    );
    // A stopped VM is no longer suspended, and a container job cannot be.
    assert!(!c.job("susvm").await?.summary.suspended);
    c.apply("plain.yaml", &novacron_tests::sleeper_manifest("plain"))
        .await?;
    let out = c.cli(&["vm", "suspend", "plain"]);
    assert!(!out.status.success());
    let refused = c
        .admin_client()?
        .post(format!("{}/v1/vms/plain/suspend", c.api()))
        .send()
        .await?;
    assert_eq!(refused.status(), reqwest::StatusCode::CONFLICT);
    let why = refused.text().await?;
    assert!(why.contains("not a virtual machine"), "{why}");
    Ok(())
}

/// A VM whose guest fills its memory under TCG is not killed by its own
/// memory limit: the job reserves only the guest's memory, and the limit
/// holds QEMU's own (its translation cache included) on top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_whose_guest_fills_its_memory_stays_within_its_limit_and_alive() -> Result<()> {
    require_vm_setup()?;
    let (_dir, c, agent) = one_node_fleet("nc-vm-fill", "vm-fill", &[]).await?;
    let port = free_port();
    let job = format!(
        "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: fillvm
spec:
  type: service
  replicas: 1
  task:
    image: {GUEST_IMAGE}
    pullPolicy: never
    ports:
      - {{name: http, containerPort: 8080, hostPort: {port}}}
    vm:
      memory: 256Mi
      initrd: /boot/initrd.img
      cmdline: console=ttyS0 quiet panic=-1
  resources: {{cpu: 1, memory: 256Mi}}
"
    );
    c.apply("fillvm.yaml", &job).await?;
    wait_for(Duration::from_secs(120), "the VM running", || async {
        count_at("127.0.0.1", port).await.is_ok()
    })
    .await
    .with_context(|| agent.log())?;
    let (_, pid) = qemu_pid(&agent).context("a running qemu")?;
    let accel = c
        .node("vm-fill")
        .await?
        .and_then(|n| n.capabilities.vm)
        .map(|v| v.accelerator)
        .unwrap_or_default();
    let overhead: u64 = if accel == "tcg" { 256 } else { 64 };
    let (limit, _) = cgroup_limits(pid)?;
    assert_eq!(limit, (256 + overhead) << 20, "under {accel}");
    // The guest's memory filled (all it has free but 24 MiB, in a tmpfs):
    // with QEMU's own (about 104 MiB under TCG) more than the guest's memory
    // plus 64 MiB.
    let (said, _) = console_session(
        &c,
        "fillvm",
        // (Quoted apart, so that the echo of the typed line is not the answer.)
        // The answer ends with `-end`, so that all of it has arrived (a
        // local CI run read only `filled-`, the status still on its way).
        "n=$(( $(sed -n 's/^MemAvailable: *\\([0-9]*\\).*/\\1/p' /proc/meminfo) / 1024 - 24 )); mkdir -p /run/fill && mount -t tmpfs -o size=${n}m fill /run/fill && dd if=/dev/zero of=/run/fill/f bs=1M count=$n; echo fill\"ed-$?\" $n -e\"nd\"",
        "-end",
    )
    .await
    .with_context(|| {
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
        format!(
            "QEMU is {} (a memory cgroup kill shows in dmesg)\n{}",
            if alive { "alive" } else { "gone" },
            agent.log()
        )
    })?;
    assert!(
        said.contains("filled-0"),
        "the guest could not fill: {said}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU was killed by its memory limit:\n{}",
        agent.log()
    );
    let rss_kb: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("QEMU's VmRSS")?;
    eprintln!(
        "QEMU's resident memory after the fill: {} MiB (limit {} MiB, {accel})",
        rss_kb >> 10,
        limit >> 20
    );
    assert!(rss_kb << 10 <= limit, "{rss_kb} KiB over the limit");
    assert!(
        count_at("127.0.0.1", port).await.is_ok(),
        "the guest stopped serving"
    );
    let destroyed = novacron_tests::succeeded(&c.cli(&["vm", "destroy", "fillvm"]));
    assert!(destroyed.contains("job purged"), "{destroyed}");
    // Forgotten, as the command says: not listed as a stopped VM.
    assert!(
        c.job("fillvm")
            .await
            .is_err_and(|e| e.to_string().contains("404")),
        "the destroyed VM's job is still there"
    );
    let listed = novacron_tests::succeeded(&c.cli(&["vm", "list"]));
    assert!(!listed.contains("fillvm"), "{listed}");
    // The destroy ends QEMU before the test's fleet goes (the test left a
    // running QEMU behind each run when it did not wait for that).
    let gone = wait_for(
        Duration::from_secs(60),
        "QEMU gone after the destroy",
        || async { !std::path::Path::new(&format!("/proc/{pid}")).exists() },
    )
    .await;
    if gone.is_err() {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    gone.with_context(|| agent.log())?;
    Ok(())
}

/// A VM job with a counter in guest memory, published on `port`, with a
/// health check.
fn counter_vm_job(name: &str, port: u16) -> String {
    counter_vm_job_with(name, port, "")
}

/// [`counter_vm_job`] with `extra` appended to its spec (indented two spaces).
fn counter_vm_job_with(name: &str, port: u16, extra: &str) -> String {
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
      - {{name: http, containerPort: 8080, hostPort: {port}}}
    vm:
      memory: 128Mi
      initrd: /boot/initrd.img
      cmdline: console=ttyS0 quiet panic=-1
  health:
    readiness: {{http: {{port: 8080, path: /health}}, period: 2s, timeout: 1s}}
  resources: {{cpu: 500m, memory: 384Mi}}
{extra}"
    )
}

/// Two agents on this host, each publishing on its own loopback address (as
/// two hosts would on theirs), and a counter VM on one of them. Returns the
/// fleet, the VM's node index, its allocation id and port.
struct TwoNodes {
    _dir: tempfile::TempDir,
    c: novacron_tests::Controller,
    agents: Vec<Agent>,
    publish: [&'static str; 2],
}

impl Drop for TwoNodes {
    /// QEMU daemonizes and outlives the agents: a test's VMs are killed with
    /// it, so that they do not run on through the rest of the suite.
    fn drop(&mut self) {
        for agent in &self.agents {
            for pid in live_qemus_in(&agent.state_dir) {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
            }
        }
    }
}

async fn two_vm_nodes(prefix: &str) -> Result<TwoNodes> {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    let c = novacron_tests::Controller::start(dir.path(), &[]).await?;
    let publish = ["127.0.0.2", "127.0.0.3"];
    let mut agents = Vec::new();
    for (i, address) in publish.iter().enumerate() {
        let name = format!("{prefix}-{i}");
        let agent = Agent::join_and_run(
            dir.path(),
            &c,
            &name,
            &["--publish-address", address, "--ingress-address", "off"],
        )
        .await?;
        c.wait_ready(&name, Duration::from_secs(20)).await?;
        agents.push(agent);
    }
    Ok(TwoNodes {
        _dir: dir,
        c,
        agents,
        publish,
    })
}

/// The job's one wanted allocation, once it runs and is healthy: its id, the
/// index of its node in `f.agents` and that of the other node.
async fn placed(f: &TwoNodes, job: &str) -> Result<(String, usize, usize)> {
    let ready = |d: &novacron_controller::workloads::JobDetail| {
        d.allocations
            .iter()
            .find(|a| a.desired_run && a.state == AllocState::Running && a.healthy == Some(true))
            .map(|a| (a.id.clone(), a.node.clone()))
    };
    wait_for(
        Duration::from_secs(120),
        "the VM running and ready",
        || async { f.c.job(job).await.is_ok_and(|d| ready(&d).is_some()) },
    )
    .await
    .with_context(|| format!("{}\n{}", f.agents[0].log(), f.agents[1].log()))?;
    let (alloc, node) = ready(&f.c.job(job).await?).context("the allocation")?;
    let at = f
        .agents
        .iter()
        .position(|a| a.name == node)
        .context("the allocation's node")?;
    Ok((alloc, at, 1 - at))
}

async fn count_at(address: &str, port: u16) -> Result<String> {
    get(&format!("http://{address}:{port}/cgi-bin/count"))
        .await
        .map(|t| t.trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_migrates_live_to_another_node_with_its_memory() -> Result<()> {
    require_vm_setup()?;
    let f = two_vm_nodes("vm-mig").await?;
    let port = free_port();
    f.c.apply("counter.yaml", &counter_vm_job("countvm", port))
        .await?;
    let (alloc, from, to) = placed(&f, "countvm").await?;
    for n in 1..=3 {
        assert_eq!(count_at(f.publish[from], port).await?, n.to_string());
    }
    let (_, source_pid) = qemu_pid(&f.agents[from]).context("the source's qemu")?;

    // The guest moves while it runs: QEMU's pre-copy over the agents' links,
    // planning a pause of at most 500 ms.
    let out = f.c.cli(&[
        "alloc",
        "migrate",
        &alloc,
        "--to",
        &f.agents[to].name,
        "--max-downtime",
        "500ms",
    ]);
    assert!(
        out.status.success(),
        "migrate failed: {}{}\nsource: {}\ntarget: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        f.agents[from].log(),
        f.agents[to].log()
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{text}");
    assert!(
        text.contains("migrated virtual machine") && text.contains(&f.agents[to].name),
        "{text}"
    );

    // Its memory came along: the counter goes on at the new node's address.
    assert_eq!(count_at(f.publish[to], port).await?, "4");
    let d = f.c.job("countvm").await?;
    let moved = d
        .allocations
        .iter()
        .find(|a| a.id == alloc)
        .context("the allocation")?;
    assert_eq!(moved.node, f.agents[to].name);
    // The source's paused QEMU goes with the release.
    wait_for(
        Duration::from_secs(60),
        "the source's qemu gone",
        || async { !std::path::Path::new(&format!("/proc/{source_pid}")).exists() },
    )
    .await
    .with_context(|| f.agents[from].log())?;
    assert!(count_at(f.publish[from], port).await.is_err());
    assert_eq!(count_at(f.publish[to], port).await?, "5");

    // The migration's record has QEMU's figures.
    let migrations: serde_json::Value =
        f.c.admin_client()?
            .get(format!("{}/v1/migrations", f.c.api()))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
    let m = migrations
        .as_array()
        .and_then(|a| a.first())
        .context("a migration")?;
    assert_eq!(m["phase"], "completed", "{m}");
    assert!(m["vm"]["rounds"].as_u64().is_some_and(|r| r >= 1), "{m}");
    assert!(
        m["vm"]["transferred"].as_u64().is_some_and(|b| b > 0),
        "{m}"
    );
    assert!(m["downtime_ms"].as_u64().is_some(), "{m}");
    assert_eq!(m["vm"]["downtime_limit_ms"], 500, "{m}");
    let events = f.c.cli(&["events", "--alloc", &alloc, "-o", "json"]);
    let events = String::from_utf8_lossy(&events.stdout).to_string();
    assert!(events.contains("migration.completed"), "{events}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_migration_whose_target_dies_rolls_back_and_the_source_runs_on() -> Result<()> {
    require_vm_setup()?;
    let mut f = two_vm_nodes("vm-back").await?;
    let port = free_port();
    f.c.apply("counter.yaml", &counter_vm_job("backvm", port))
        .await?;
    let (alloc, from, to) = placed(&f, "backvm").await?;
    assert_eq!(count_at(f.publish[from], port).await?, "1");
    let (_, source_pid) = qemu_pid(&f.agents[from]).context("the source's qemu")?;

    // The target dies (its agent and the QEMU it started) as soon as that
    // QEMU exists, while it waits for the guest's state.
    let target_agent = f.agents[to]
        .child
        .as_ref()
        .and_then(|c| c.id())
        .context("the target agent's pid")?;
    let target_dir = f.agents[to].state_dir.clone();
    let killer = tokio::spawn(async move {
        let found = tokio::time::timeout(Duration::from_secs(120), async {
            loop {
                if let Some(pid) = live_qemu_in(&target_dir) {
                    return pid;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .ok();
        let _ = std::process::Command::new("kill")
            .args(["-9", &target_agent.to_string()])
            .status();
        if let Some(pid) = found {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
        found
    });
    let out = tokio::task::block_in_place(|| {
        f.c.cli(&["alloc", "migrate", &alloc, "--to", &f.agents[to].name])
    });
    let killed = killer.await?;
    assert!(killed.is_some(), "the target never started a qemu");
    f.agents[to].kill().await;
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    eprintln!("{err}");
    assert!(!out.status.success(), "the migration should fail: {err}");
    assert!(err.contains("rolled back"), "{err}");

    // The source resumed the same guest: same QEMU, same memory.
    wait_for(
        Duration::from_secs(60),
        "the VM running on the source",
        || async {
            f.c.job("backvm").await.is_ok_and(|d| {
                d.allocations.iter().any(|a| {
                    a.id == alloc && a.node == f.agents[from].name && a.state == AllocState::Running
                })
            })
        },
    )
    .await
    .with_context(|| f.agents[from].log())?;
    assert_eq!(count_at(f.publish[from], port).await?, "2");
    let (_, pid_after) = qemu_pid(&f.agents[from]).context("the source's qemu")?;
    assert_eq!(source_pid, pid_after, "the source's guest was restarted");
    let events = f.c.cli(&["events", "--alloc", &alloc, "-o", "json"]);
    let events = String::from_utf8_lossy(&events.stdout).to_string();
    assert!(events.contains("migration.rolled_back"), "{events}");
    Ok(())
}

/// A live QEMU of a VM in an agent's state directory, if any.
fn live_qemu_in(state_dir: &std::path::Path) -> Option<u32> {
    live_qemus_in(state_dir).into_iter().next()
}

/// The live QEMUs of the VMs in an agent's state directory.
fn live_qemus_in(state_dir: &std::path::Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(state_dir.join("vms")) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("vm-"))
        .filter_map(|e| {
            let pid: u32 = std::fs::read_to_string(e.path().join("qemu.pid"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            std::path::Path::new(&format!("/proc/{pid}"))
                .exists()
                .then_some(pid)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_s_vm_comes_back_elsewhere_from_its_snapshot() -> Result<()> {
    require_vm_setup()?;
    let mut f = two_vm_nodes("vm-snap").await?;
    let port = free_port();
    f.c.apply(
        "counter.yaml",
        &counter_vm_job_with("snapvm", port, "  checkpoint: {mode: live, keep: 2}\n"),
    )
    .await?;
    let (alloc, from, to) = placed(&f, "snapvm").await?;
    for n in 1..=3 {
        assert_eq!(count_at(f.publish[from], port).await?, n.to_string());
    }
    let (_, pid) = qemu_pid(&f.agents[from]).context("the VM's qemu")?;

    // A snapshot of the running guest: its memory, into the controller's store.
    let out = f.c.cli(&["alloc", "checkpoint", &alloc]);
    assert!(
        out.status.success(),
        "checkpoint failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        f.agents[from].log()
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    // The guest ran on after it (same QEMU); this count is lost with the node.
    assert_eq!(count_at(f.publish[from], port).await?, "4");
    let (_, pid_after) = qemu_pid(&f.agents[from]).context("the VM's qemu")?;
    assert_eq!(pid, pid_after);
    let list = f.c.cli(&["checkpoint", "list", "--alloc", &alloc]);
    let list = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(list.contains("live"), "{list}");

    // The node dies: its agent and its VM.
    f.agents[from].kill().await;
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    let started = std::time::Instant::now();
    wait_for(
        Duration::from_secs(180),
        "the replacement VM serving on the other node",
        || async {
            get(&format!("http://{}:{port}/health", f.publish[to]))
                .await
                .is_ok()
        },
    )
    .await
    .with_context(|| f.agents[to].log())?;
    eprintln!("recovered in {:?}", started.elapsed());
    // Its memory is the snapshot's: the count goes on from 3.
    assert_eq!(count_at(f.publish[to], port).await?, "4");
    let events = f.c.cli(&["events", "--job", "snapvm", "-o", "json"]);
    let events = String::from_utf8_lossy(&events.stdout).to_string();
    assert!(
        events.contains("restores its latest checkpoint"),
        "{events}"
    );
    Ok(())
}

const DISK_IMAGE: &str = "novacron/guest-disk:test";

/// The test guest plus a base disk (`/disk.raw`, 8 MiB of zeros), built from
/// `novacron/guest-tiny:1` by Docker on this host.
fn ensure_disk_image() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!("FROM {GUEST_IMAGE}\nCOPY disk.raw /disk.raw\n"),
    )?;
    std::fs::write(dir.path().join("disk.raw"), vec![0u8; 8 << 20])?;
    novacron_tests::docker_build(dir.path(), DISK_IMAGE)
}

/// A VM job whose guest has a disk of its own (`/dev/vda`, an overlay of the
/// image's `/disk.raw`), with CGI scripts to write a word at its start and to
/// read it back from the disk (the page cache dropped first), and periodic
/// snapshots kept.
fn disk_vm_job(name: &str, port: u16) -> String {
    format!(
        "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: {name}
spec:
  type: service
  replicas: 1
  task:
    image: {DISK_IMAGE}
    pullPolicy: never
    ports:
      - {{name: http, containerPort: 8080, hostPort: {port}}}
    vm:
      memory: 128Mi
      initrd: /boot/initrd.img
      cmdline: console=ttyS0 quiet panic=-1
      disk: /disk.raw
      diskBandwidth: 4Mi
      diskIops: 200
      userData: |
        #!/bin/sh
        cat > /www/cgi-bin/write <<'X'
        #!/bin/sh
        printf 'Content-Type: text/plain\\r\\n\\r\\n'
        printf '%s' \"$QUERY_STRING\" | dd of=/dev/vda bs=64 count=1 conv=sync,notrunc 2>/dev/null
        sync
        echo written
        X
        cat > /www/cgi-bin/disk <<'X'
        #!/bin/sh
        printf 'Content-Type: text/plain\\r\\n\\r\\n'
        sync
        echo 3 > /proc/sys/vm/drop_caches
        dd if=/dev/vda bs=64 count=1 2>/dev/null | tr -d '\\000'
        X
        chmod 755 /www/cgi-bin/write /www/cgi-bin/disk
  health:
    readiness: {{http: {{port: 8080, path: /health}}, period: 2s, timeout: 1s}}
  checkpoint: {{mode: live, keep: 2}}
  resources: {{cpu: 500m, memory: 256Mi}}
"
    )
}

/// The I/O limits QEMU applies to the disk of the VM whose QEMU runs in
/// `vm_dir` (`bps` and `iops` of `query-block`), asked on its QMP socket.
async fn disk_limits(vm_dir: &std::path::Path) -> Result<(u64, u64)> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let sock = vm_dir.join("qmp.sock");
    // QEMU's monitor serves one client at a time; the agent's come and go.
    let stream = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::net::UnixStream::connect(&sock),
    )
    .await
    .context("QMP connect timed out")??;
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let mut next = async || -> Result<serde_json::Value> {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
                .await
                .context("QMP answer timed out")??
                .context("QMP closed")?;
            let v: serde_json::Value = serde_json::from_str(&line)?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    };
    next().await?; // the greeting
    write
        .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .await?;
    next().await?;
    write.write_all(b"{\"execute\":\"query-block\"}\n").await?;
    let answer = next().await?;
    let devices = answer["return"].as_array().context("query-block")?;
    let disk = devices
        .iter()
        .find(|d| {
            d["inserted"]["file"]
                .as_str()
                .is_some_and(|f| f.ends_with("disk.qcow2"))
        })
        .with_context(|| format!("no disk.qcow2 in {answer}"))?;
    Ok((
        disk["inserted"]["bps"].as_u64().unwrap_or(0),
        disk["inserted"]["iops"].as_u64().unwrap_or(0),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_s_own_disk_moves_with_it_live_and_comes_back_from_its_snapshot() -> Result<()> {
    require_vm_setup()?;
    ensure_disk_image()?;
    let mut f = two_vm_nodes("vm-disk").await?;
    let port = free_port();
    f.c.apply("disk.yaml", &disk_vm_job("diskvm", port)).await?;
    let (alloc, first, second) = placed(&f, "diskvm").await?;
    let at = |i: usize, path: &str| format!("http://{}:{port}/cgi-bin/{path}", f.publish[i]);
    // The user data installs the scripts after the guest is ready.
    wait_for(Duration::from_secs(60), "the disk scripts", || async {
        get(&at(first, "disk")).await.is_ok()
    })
    .await?;
    assert_eq!(get(&at(first, "write?alpha")).await?.trim(), "written");
    assert_eq!(get(&at(first, "disk")).await?.trim(), "alpha");
    assert_eq!(count_at(f.publish[first], port).await?, "1");
    // The job's I/O limits, as the running QEMU applies them to the disk.
    let (dir, _) = qemu_pid(&f.agents[first]).context("the VM's qemu")?;
    assert_eq!(disk_limits(&dir).await?, (4 << 20, 200));

    // Live migration carries the overlay (block migration of its top layer).
    let out =
        f.c.cli(&["alloc", "migrate", &alloc, "--to", &f.agents[second].name]);
    assert!(
        out.status.success(),
        "migrate failed: {}{}\nsource: {}\ntarget: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        f.agents[first].log(),
        f.agents[second].log()
    );
    assert_eq!(count_at(f.publish[second], port).await?, "2");
    assert_eq!(get(&at(second, "disk")).await?.trim(), "alpha");
    let (dir, _) = qemu_pid(&f.agents[second]).context("the moved VM's qemu")?;
    assert_eq!(
        disk_limits(&dir).await?,
        (4 << 20, 200),
        "the limits move with the VM"
    );

    // The job has a checkpoint policy, and a live migration stores nothing on
    // the way: the controller snapshots the guest where it runs now.
    let target = f.agents[second].name.clone();
    wait_for(
        Duration::from_secs(120),
        "a snapshot taken on the target after the move",
        || async {
            let out = f.c.cli(&["events", "--alloc", &alloc, "-o", "json"]);
            serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).is_ok_and(|events| {
                events
                    .iter()
                    .any(|e| e["kind"] == "checkpoint.created" && e["node"] == target.as_str())
            })
        },
    )
    .await
    .with_context(|| f.agents[second].log())?;
    // A snapshot carries memory and disk; the node then dies.
    assert_eq!(get(&at(second, "write?bravo")).await?.trim(), "written");
    let out = f.c.cli(&["alloc", "checkpoint", &alloc]);
    assert!(
        out.status.success(),
        "checkpoint failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        f.agents[second].log()
    );
    let (_, pid) = qemu_pid(&f.agents[second]).context("the VM's qemu")?;
    f.agents[second].kill().await;
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    wait_for(
        Duration::from_secs(180),
        "the replacement VM serving on the first node",
        || async { get(&at(first, "disk")).await.is_ok() },
    )
    .await
    .with_context(|| f.agents[first].log())?;
    assert_eq!(get(&at(first, "disk")).await?.trim(), "bravo");
    assert_eq!(count_at(f.publish[first], port).await?, "3");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_copy_settles_the_migration_on_restart_with_one_guest() -> Result<()>
{
    controller_killed_mid_migration("vm-ctl", "transferring").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_after_the_copy_keeps_the_guest_on_its_target() -> Result<()> {
    controller_killed_mid_migration("vm-ctr", "restoring").await
}

/// Kills the controller once a VM's migration reaches `phase`
/// (`transferring`: the memory is on its way; `restoring`: the target runs
/// the guest and waits for its check), restarts it, and checks that it
/// settles the move: one guest, with its memory, where the record says; after
/// the copy, on the target.
async fn controller_killed_mid_migration(prefix: &str, phase_wanted: &str) -> Result<()> {
    require_vm_setup()?;
    let mut f = two_vm_nodes(prefix).await?;
    let port = free_port();
    f.c.apply("counter.yaml", &counter_vm_job("ctlvm", port))
        .await?;
    let (alloc, from, to) = placed(&f, "ctlvm").await?;
    for n in 1..=3 {
        assert_eq!(count_at(f.publish[from], port).await?, n.to_string());
    }
    let admin = f.c.admin_client()?;
    let started: serde_json::Value = admin
        .post(format!("{}/v1/allocations/{alloc}/migrate", f.c.api()))
        .json(&serde_json::json!({"to": f.agents[to].name}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = started["id"]
        .as_str()
        .context("the migration's id")?
        .to_owned();
    // The controller dies while the memory is on its way.
    let mut phase = String::new();
    for _ in 0..3000 {
        let s: serde_json::Value = admin
            .get(format!("{}/v1/migrations/{id}", f.c.api()))
            .send()
            .await?
            .json()
            .await?;
        phase = s["phase"].as_str().unwrap_or_default().to_owned();
        if phase == phase_wanted || phase == "completed" || phase == "rolled_back" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("killing the controller in phase {phase}");
    assert_eq!(
        phase, phase_wanted,
        "the migration went past {phase_wanted}"
    );
    f.c.restart().await?;

    // After the restart the controller settles it: one guest, on one node,
    // with its memory, and the other node's QEMU gone.
    let one_guest = || {
        let alive: Vec<usize> = (0..2)
            .filter(|&i| !live_qemus_in(&f.agents[i].state_dir).is_empty())
            .collect();
        (alive.len() == 1).then(|| alive[0])
    };
    wait_for(
        Duration::from_secs(90),
        "one guest left, settled",
        || async {
            one_guest().is_some()
                && f.c.job("ctlvm").await.is_ok_and(|d| {
                    d.allocations.iter().any(|a| {
                        a.id == alloc
                            && a.state == AllocState::Running
                            && a.healthy == Some(true)
                            && a.restore.is_none()
                    })
                })
        },
    )
    .await
    .with_context(|| {
        format!(
            "{}\n{}\n{}",
            f.c.logs(),
            f.agents[0].log(),
            f.agents[1].log()
        )
    })?;
    let at = one_guest().context("one guest")?;
    let d = f.c.job("ctlvm").await?;
    let a = d
        .allocations
        .iter()
        .find(|a| a.id == alloc)
        .context("the allocation")?;
    assert_eq!(a.node, f.agents[at].name, "the record and the guest agree");
    if phase_wanted == "restoring" {
        assert_eq!(at, to, "the guest ran on its target: it stays there");
    }
    let count = count_at(f.publish[at], port).await?;
    assert_eq!(
        count,
        "4",
        "the guest on {} lost its memory\n{}\n{}\n{}",
        f.agents[at].name,
        f.c.logs(),
        f.agents[0].log(),
        f.agents[1].log()
    );
    let events = f.c.cli(&["events", "--alloc", &alloc, "-o", "json"]);
    let events = String::from_utf8_lossy(&events.stdout).to_string();
    assert!(
        events.contains("interrupted by a controller restart"),
        "{events}"
    );
    Ok(())
}

/// [`counter_vm_job`] on the node's VM bridge instead of QEMU's user network.
fn bridged_counter_vm_job(name: &str, port: u16) -> String {
    counter_vm_job(name, port).replace("    vm:\n", "    vm:\n      network: bridge\n")
}

/// Removes a test's VM bridge (the one holding `gateway`) and its rules: the
/// agent leaves both to the guests that outlive it.
struct BridgeCleanup {
    gateway: String,
}

impl BridgeCleanup {
    /// The bridge's interface name, while it exists.
    fn name(&self) -> Option<String> {
        let out = std::process::Command::new("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            (words.get(3)?.split('/').next()? == self.gateway).then(|| words[1].to_owned())
        })
    }

    /// The tagged rules that name `bridge` or its chain, as `iptables -S` lists them.
    fn rules(bridge: &str) -> Vec<(String, String)> {
        let chain = format!("NOVACRON-{}", bridge.to_uppercase());
        let mut out = Vec::new();
        for table in ["nat", "filter"] {
            let listing = std::process::Command::new("iptables")
                .args(["-t", table, "-S"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap_or_default();
            for line in listing.lines() {
                if line.starts_with("-A ") && (line.contains(bridge) || line.contains(&chain)) {
                    out.push((table.to_owned(), line.to_owned()));
                }
            }
        }
        out
    }
}

impl Drop for BridgeCleanup {
    fn drop(&mut self) {
        let Some(bridge) = self.name() else {
            return;
        };
        let chain = format!("NOVACRON-{}", bridge.to_uppercase());
        for (table, line) in Self::rules(&bridge) {
            if line.starts_with(&format!("-A {chain} ")) {
                continue;
            }
            let delete = line.replacen("-A ", "-D ", 1).replace('"', "");
            let _ = std::process::Command::new("iptables")
                .args(["-t", &table])
                .args(delete.split(' '))
                .status();
        }
        for op in ["-F", "-X"] {
            let _ = std::process::Command::new("iptables")
                .args(["-t", "nat", op, &chain])
                .status();
        }
        // Tap devices outlive their bridge; a guest's agent removes its own,
        // but a test that failed may leave one.
        if let Ok(ports) = std::fs::read_dir(format!("/sys/class/net/{bridge}/brif")) {
            for port in ports.flatten() {
                let _ = std::process::Command::new("ip")
                    .args(["link", "del"])
                    .arg(port.file_name())
                    .status();
            }
        }
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &bridge])
            .status();
    }
}

/// Issue 21's networking: a guest on its node's VM bridge has an address of
/// the node's range, reached from the node on every port and from the other
/// guests; its published port is the node's packet filter's (a DNAT rule, on
/// a loopback publish address too), which holds while the agent restarts; a
/// node without a bridge gets no bridged guest, by placement and by
/// migration; and the guest's tap device and rule go with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridged_vm_is_reached_at_its_own_address_and_through_the_node_s_filter() -> Result<()> {
    require_vm_setup()?;
    // A range of this test's own (tests run side by side; the agent refuses
    // one that overlaps another interface's).
    let third = 100 + std::process::id() % 150;
    let gateway = format!("10.217.{third}.1");
    let range = format!("10.217.{third}.0/24");
    let cleanup = BridgeCleanup {
        gateway: gateway.clone(),
    };
    let dir = tempfile::Builder::new().prefix("vm-br").tempdir()?;
    let c = novacron_tests::Controller::start(dir.path(), &[]).await?;
    let bridge_flag = format!("{gateway}/24");
    let with_bridge = Agent::join_and_run(
        dir.path(),
        &c,
        "vm-br-0",
        &[
            "--publish-address",
            "127.0.0.2",
            "--ingress-address",
            "off",
            "--vm-bridge",
            &bridge_flag,
        ],
    )
    .await?;
    c.wait_ready("vm-br-0", Duration::from_secs(20)).await?;
    let without = Agent::join_and_run(
        dir.path(),
        &c,
        "vm-br-1",
        &["--publish-address", "127.0.0.3", "--ingress-address", "off"],
    )
    .await?;
    c.wait_ready("vm-br-1", Duration::from_secs(20)).await?;
    // (Its drop kills the guests, before the bridge goes.)
    let mut f = TwoNodes {
        _dir: dir,
        c,
        agents: vec![with_bridge, without],
        publish: ["127.0.0.2", "127.0.0.3"],
    };
    let c = &f.c;
    let bridge_of = |node: &'static str| async move {
        c.node(node)
            .await
            .ok()
            .flatten()
            .and_then(|n| n.capabilities.vm)
            .and_then(|v| v.bridge)
    };
    assert_eq!(
        bridge_of("vm-br-0").await.as_deref(),
        Some(range.as_str()),
        "{}",
        f.agents[0].log()
    );
    assert_eq!(bridge_of("vm-br-1").await, None);

    // Two bridged guests: both on the node with the bridge.
    let (port, port2) = (free_port(), free_port());
    // The first with a network limit (each way).
    let limited = bridged_counter_vm_job("brvm", port).replace(
        "      network: bridge\n",
        "      network: bridge\n      networkBandwidth: 1Mi\n",
    );
    assert!(limited.contains("networkBandwidth"), "{limited}");
    c.apply("brvm.yaml", &limited).await?;
    c.apply("brvm2.yaml", &bridged_counter_vm_job("brvm2", port2))
        .await?;
    for job in ["brvm", "brvm2"] {
        wait_for(Duration::from_secs(120), "the bridged VM ready", || async {
            wanted(c, job)
                .await
                .is_ok_and(|a| a.state == AllocState::Running && a.healthy == Some(true))
        })
        .await
        .with_context(|| format!("{}\n{}", f.agents[0].log(), f.agents[1].log()))?;
        assert_eq!(wanted(c, job).await?.node, "vm-br-0");
    }
    let alloc = wanted(c, "brvm").await?;
    let vm_dir = |job: &str| -> Result<serde_json::Value> {
        let vms = f.agents[0].state_dir.join("vms");
        for e in std::fs::read_dir(&vms)? {
            let meta = e?.path().join("meta.json");
            if let Ok(text) = std::fs::read_to_string(&meta) {
                let v: serde_json::Value = serde_json::from_str(&text)?;
                if v["labels"]["novacron.job"] == job {
                    return Ok(v);
                }
            }
        }
        bail!("no VM of job {job} in {}", vms.display())
    };
    // `vm list` shows each guest's network and address, as its node reports it.
    let listed: Vec<serde_json::Value> = serde_json::from_str(&novacron_tests::succeeded(
        &c.cli(&["vm", "list", "-o", "json"]),
    ))?;
    let address_of = |job: &str| -> Result<String> {
        let row = listed
            .iter()
            .find(|r| r["name"] == job)
            .with_context(|| format!("{job} in {listed:?}"))?;
        assert_eq!(row["network"], "bridge", "{row}");
        Ok(row["address"].as_str().context("its address")?.to_owned())
    };
    let (address, address2) = (address_of("brvm")?, address_of("brvm2")?);
    let meta = vm_dir("brvm")?;
    assert_eq!(meta["address"], address.as_str(), "the agent's record");
    assert!(
        address.starts_with(&format!("10.217.{third}.")) && address != gateway,
        "{address}"
    );
    assert_ne!(address, address2);
    // `alloc list -o wide` shows it too, in its ADDRESS column.
    let wide = novacron_tests::succeeded(&c.cli(&["alloc", "list", "--job", "brvm", "-o", "wide"]));
    let header: Vec<&str> = wide
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let column = header
        .iter()
        .position(|h| *h == "ADDRESS")
        .context("an ADDRESS column")?;
    assert!(
        wide.lines()
            .skip(1)
            .any(|l| l.split_whitespace().nth(column) == Some(address.as_str())),
        "{wide}"
    );

    // The node reaches the guest at its address, on its port, without any
    // forward; then through the published port, a DNAT rule to it.
    assert_eq!(count_at(&address, 8080).await?, "1");
    assert_eq!(count_at("127.0.0.2", port).await?, "2");
    let vm_id = meta["id"].as_str().context("its id")?.to_owned();
    let bridge = cleanup.name().context("the bridge")?;
    let rules = BridgeCleanup::rules(&bridge);
    assert!(
        rules.iter().any(|(t, r)| t == "nat"
            && r.contains(&vm_id)
            && r.contains(&format!("--to-destination {address}:8080"))),
        "{rules:#?}"
    );
    // Its limit, as the kernel applies it: a token bucket of 1 MiB/s as the
    // tap's root queue (to the guest), and the tap's ingress redirected to an
    // IFB device with the same bucket (from the guest). The other guest has
    // no limit.
    let tap = format!("nct{}", &vm_id[vm_id.len().saturating_sub(12)..]);
    let ifb = format!("nci{}", &tap[3..]);
    let tc = |args: &[&str]| -> Result<serde_json::Value> {
        let out = std::process::Command::new("tc")
            .arg("-j")
            .args(args)
            .output()?;
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let tbf_rate = |dev: &str| -> Result<Option<u64>> {
        let qdiscs = tc(&["qdisc", "show", "dev", dev])?;
        Ok(qdiscs.as_array().and_then(|q| {
            q.iter()
                .find(|d| d["kind"] == "tbf" && d["root"] == true)
                .and_then(|d| d["options"]["rate"].as_u64())
        }))
    };
    assert_eq!(tbf_rate(&tap)?, Some(1 << 20), "to the guest");
    assert_eq!(tbf_rate(&ifb)?, Some(1 << 20), "from the guest");
    let filters = tc(&["filter", "show", "dev", &tap, "parent", "ffff:"])?.to_string();
    assert!(
        filters.contains("\"mirred\"") && filters.contains(&format!("\"to_dev\":\"{ifb}\"")),
        "{filters}"
    );
    let meta2 = vm_dir("brvm2")?;
    let id2 = meta2["id"].as_str().context("its id")?;
    let tap2 = format!("nct{}", &id2[id2.len().saturating_sub(12)..]);
    assert_eq!(tbf_rate(&tap2)?, None, "the other guest has no limit");
    // The other guest reaches it on the bridge.
    let (said, _) = console_session(
        c,
        "brvm2",
        &format!("wget -qO- http://{address}:8080/cgi-bin/count; echo rea\"ched-$?-e\"nd"),
        "-end",
    )
    .await?;
    assert!(said.contains("reached-0"), "{said}");
    assert_eq!(count_at(&address, 8080).await?, "4", "{said}");

    // The published port is the kernel's: it forwards while the agent is down.
    f.agents[0].kill().await;
    assert_eq!(count_at("127.0.0.2", port).await?, "5");
    f.agents[0].start()?;
    c.wait_ready("vm-br-0", Duration::from_secs(30)).await?;
    assert_eq!(count_at("127.0.0.2", port).await?, "6");

    // No node without the bridge (or with another range) takes the guest.
    let out = c.cli(&["alloc", "migrate", &alloc.id, "--to", "vm-br-1"]);
    let told = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{told}");
    assert!(told.contains("has no VM bridge"), "{told}");

    // Destroyed: its tap device, its limit's IFB and its rule go with it, the
    // other's stay.
    novacron_tests::succeeded(&c.cli(&["vm", "destroy", "brvm"]));
    wait_for(Duration::from_secs(60), "the tap device gone", || async {
        let net = std::path::Path::new("/sys/class/net");
        !net.join(&tap).exists() && !net.join(&ifb).exists()
    })
    .await
    .with_context(|| f.agents[0].log())?;
    let rules = BridgeCleanup::rules(&bridge);
    assert!(!rules.iter().any(|(_, r)| r.contains(&vm_id)), "{rules:#?}");
    assert!(
        rules.iter().any(|(_, r)| r.contains(&address2)),
        "{rules:#?}"
    );
    assert!(count_at("127.0.0.2", port).await.is_err());
    assert_eq!(count_at("127.0.0.2", port2).await?, "1");
    novacron_tests::succeeded(&c.cli(&["vm", "destroy", "brvm2"]));
    wait_for(Duration::from_secs(60), "no tap device left", || async {
        std::fs::read_dir(format!("/sys/class/net/{bridge}/brif"))
            .is_ok_and(|mut d| d.next().is_none())
    })
    .await
    .with_context(|| f.agents[0].log())?;
    Ok(())
}

/// A VM that asks for a GPU gets a whole one passed through (bound to
/// vfio-pci), never one of NVIDIA's driver, and never runs without it: on a
/// node that offers none (no GPU here), it waits and its job says why. Such
/// a VM cannot be snapshotted, so a checkpoint policy is refused at apply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_asking_for_a_gpu_waits_for_a_passthrough_one_and_says_why() -> Result<()> {
    require_vm_setup()?;
    let (dir, c, _agent) = one_node_fleet("vm-gpu", "vm-gpu-0", &[]).await?;
    let job = |extra: &str| {
        format!(
            "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: gpuvm
spec:
  type: service
  replicas: 1
  task:
    image: {GUEST_IMAGE}
    pullPolicy: never
    vm:
      memory: 128Mi
      initrd: /boot/initrd.img
  resources: {{cpu: 1, memory: 256Mi, gpus: {{count: 1, model: H100}}}}
{extra}"
        )
    };
    let refused = c
        .apply("gpuvm.yaml", &job("  checkpoint: {interval: 10m}\n"))
        .await
        .expect_err("a snapshot policy on a passthrough VM");
    assert!(
        refused
            .to_string()
            .contains("a virtual machine with passthrough GPUs cannot be snapshotted"),
        "{refused}"
    );
    // A template that passes a GPU through: its jobs must reserve it.
    let template = "apiVersion: novacron.io/v1
kind: VMTemplate
metadata:
  name: gpu-tiny
spec:
  memory: 128Mi
  initrd: /boot/initrd.img
  gpus: {count: 1, model: H100}
";
    let file = dir.path().join("gpu-template.yaml");
    std::fs::write(&file, template)?;
    let applied = c.cli(&["apply", "-f", &file.to_string_lossy()]);
    anyhow::ensure!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let from_template = |resources: &str| {
        format!(
            "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: gputmpl
spec:
  task:
    image: {GUEST_IMAGE}
    pullPolicy: never
    vm: {{template: gpu-tiny}}
  resources: {{cpu: 1, memory: 256Mi{resources}}}
"
        )
    };
    let unreserved = c
        .apply("gputmpl.yaml", &from_template(""))
        .await
        .expect_err("a job that does not reserve its template's GPU");
    assert!(
        unreserved
            .to_string()
            .contains("spec.resources.gpus: the machine passes through 1 GPU(s) of model"),
        "{unreserved}"
    );
    c.apply(
        "gputmpl.yaml",
        &from_template(", gpus: {count: 1, model: H100}"),
    )
    .await?;
    c.apply("gpuvm.yaml", &job("")).await?;
    let wanted = "insufficient GPUs for passthrough (bound to vfio-pci)";
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while !last.contains(wanted) {
        if std::time::Instant::now() > deadline {
            bail!("the job never said it waits for a passthrough GPU; its message: {last:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(d) = c.job("gpuvm").await {
            last = d.summary.message;
        }
    }
    let d = c.job("gpuvm").await?;
    assert!(
        d.allocations.iter().all(|a| a.state != AllocState::Running),
        "a VM ran without its GPU: {:?}",
        d.allocations
    );
    Ok(())
}

/// A bridged guest keeps the address it booted with: restored from its
/// snapshot on a node whose bridge has another range, it would run on with the
/// old address, unreachable at the one that node gives it. The agent refuses
/// that restore and the controller starts the VM afresh there: its memory is
/// lost (the count starts again), it answers at its new address, and an event
/// says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridged_vm_lost_with_its_node_boots_afresh_on_a_node_of_another_range() -> Result<()> {
    require_vm_setup()?;
    let third = 100 + std::process::id() % 150;
    let gateways = [format!("10.220.{third}.1"), format!("10.221.{third}.1")];
    let _cleanups: Vec<BridgeCleanup> = gateways
        .iter()
        .map(|g| BridgeCleanup { gateway: g.clone() })
        .collect();
    let dir = tempfile::Builder::new().prefix("vm-rng").tempdir()?;
    let c = novacron_tests::Controller::start(dir.path(), &[]).await?;
    let publish = ["127.0.0.2", "127.0.0.3"];
    let mut agents = Vec::new();
    for (i, (address, gateway)) in publish.iter().zip(&gateways).enumerate() {
        let name = format!("vm-rng-{i}");
        let bridge = format!("{gateway}/24");
        let agent = Agent::join_and_run(
            dir.path(),
            &c,
            &name,
            &[
                "--publish-address",
                address,
                "--ingress-address",
                "off",
                "--vm-bridge",
                &bridge,
            ],
        )
        .await?;
        c.wait_ready(&name, Duration::from_secs(20)).await?;
        agents.push(agent);
    }
    let mut f = TwoNodes {
        _dir: dir,
        c,
        agents,
        publish,
    };
    let port = free_port();
    f.c.apply(
        "counter.yaml",
        &bridged_counter_vm_job("rngvm", port).replace(
            "  resources:",
            "  checkpoint: {mode: live, keep: 2}\n  resources:",
        ),
    )
    .await?;
    let (alloc, from, to) = placed(&f, "rngvm").await?;
    for n in 1..=3 {
        assert_eq!(count_at(f.publish[from], port).await?, n.to_string());
    }
    let out = f.c.cli(&["alloc", "checkpoint", &alloc]);
    assert!(
        out.status.success(),
        "checkpoint failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        f.agents[from].log()
    );
    let (_, pid) = qemu_pid(&f.agents[from]).context("the VM's qemu")?;
    f.agents[from].kill().await;
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
    wait_for(
        Duration::from_secs(180),
        "the VM serving on the node of the other range",
        || async {
            get(&format!("http://{}:{port}/health", f.publish[to]))
                .await
                .is_ok()
        },
    )
    .await
    .with_context(|| f.agents[to].log())?;
    // Booted afresh: the count starts again.
    assert_eq!(count_at(f.publish[to], port).await?, "1");
    let (prefix, _) = gateways[to].rsplit_once('.').context("a gateway")?;
    let new_range = format!("{prefix}.");
    let vms = f.c.cli(&["vm", "list", "-o", "json"]);
    let vms = String::from_utf8_lossy(&vms.stdout).to_string();
    assert!(
        vms.contains(&new_range),
        "not at an address of its new node's range {new_range}: {vms}"
    );
    let events = f.c.cli(&["events", "--job", "rngvm", "-o", "json"]);
    let events = String::from_utf8_lossy(&events.stdout).to_string();
    assert!(
        events.contains("starts from scratch") && events.contains("boot afresh"),
        "{events}"
    );
    Ok(())
}

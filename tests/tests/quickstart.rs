//! The README's first command: `novacron dev` brings up a controller and local
//! agents, writes a context, and `novacron node list` in another process shows the
//! nodes with live metrics; the demo job's ports are published on loopback and
//! `alloc list`, `alloc show` and `job status` say where; `--host-exec` lets the
//! README's `exec` example run; a second fleet on the same directory or node names
//! refuses to start and leaves the first alone.
//!
//! The fleet's nodes are named with a prefix of this test's own (`qs<pid>-1`, ...),
//! never `dev-N`, so a developer's `novacron dev` on the same Docker daemon and this
//! test never share node names or remove each other's containers.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use novacron_tests::{bin, free_port, wait_for};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

fn novacron(config: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("novacron"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("novacron runs")
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `GET /` from `address`, the whole answer.
async fn http_get(address: &str) -> Option<String> {
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: dev\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await.ok()?;
    Some(body)
}

/// The pids of the VMs' QEMU processes under `dir` (a dev fleet's VMs live in
/// its agents' `vms/vm-*` directories; a probe boot's QEMU is not one).
fn qemus_of(dir: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c);
                c.contains("qemu-system") && c.contains(dir) && c.contains("/vms/vm-")
            })
        })
        .collect()
}

/// Stops a `novacron dev` with SIGINT when dropped (also when the test fails), so
/// that it stops its agents and removes its containers: SIGKILL would leave them
/// running.
struct Interrupt(Option<u32>);

impl Drop for Interrupt {
    fn drop(&mut self) {
        let Some(pid) = self.0 else { return };
        let _ = std::process::Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .status();
        // Wait (at most 30 s) for it to go (a zombie, not yet reaped, is gone).
        for _ in 0..300 {
            let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| !stat.rsplit(") ").next().unwrap_or("").starts_with('Z'));
            if !alive {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[tokio::test]
async fn novacron_dev_serves_a_fleet_that_the_cli_can_list() {
    let dir = tempfile::Builder::new()
        .prefix("novacron-dev-")
        .tempdir()
        .expect("tempdir");
    let config = dir.path().join("config.toml");
    let state = dir.path().join("state");
    let prefix = format!("qs{}", std::process::id());
    let nodes = [format!("{prefix}-1"), format!("{prefix}-2")];
    let port = free_port().to_string();
    let dev_args = |port: &str, state: &Path, prefix: &str| {
        let mut cmd = tokio::process::Command::new(bin("novacron"));
        cmd.arg("--config")
            .arg(&config)
            .args(["dev", "--agents", "2", "--port", port, "--every", "1s"])
            .args(["--duration", "180s", "--host-exec", "--name-prefix", prefix])
            .arg("--dir")
            .arg(state)
            .kill_on_drop(true);
        cmd
    };
    let mut dev = dev_args(&port, &state, &prefix)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("novacron dev starts");
    let mut interrupt = Interrupt(dev.id());
    let mut lines = BufReader::new(dev.stdout.take().expect("stdout")).lines();
    let mut seen = String::new();
    let up = tokio::time::timeout(Duration::from_secs(90), async {
        while let Ok(Some(line)) = lines.next_line().await {
            seen.push_str(&line);
            seen.push('\n');
            // The demo job: two replicas on the local agents, healthy.
            if line.starts_with(&format!("{} ready", nodes[0]))
                && line.contains("job hello: 2/2 running, 2 healthy")
            {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(up, Ok(true)),
        "no live summary; output so far:\n{seen}"
    );
    assert!(
        seen.contains("novacron node list"),
        "prints what to try next:\n{seen}"
    );
    assert!(
        seen.contains("novacron exec --selector zone=a -- uptime"),
        "with --host-exec it offers the README's exec example:\n{seen}"
    );
    // Keep reading its output, so that it never blocks on a full pipe.
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let table = novacron(&config, &["node", "list"]);
    assert!(table.status.success(), "{}", text(&table));
    let listed = String::from_utf8_lossy(&table.stdout);
    assert!(
        listed.contains(&nodes[0]) && listed.contains(&nodes[1]) && listed.contains("ready"),
        "{listed}"
    );
    assert!(
        !listed.contains("dev-1"),
        "the test's fleet has none of the developer's node names: {listed}"
    );

    wait_for(
        Duration::from_secs(10),
        "json with live metrics for both nodes",
        || async {
            let out = novacron(&config, &["node", "list", "-o", "json"]);
            let nodes: Vec<serde_json::Value> =
                serde_json::from_slice(&out.stdout).unwrap_or_default();
            nodes.len() == 2
                && nodes.iter().all(|n| {
                    n["status"] == "ready"
                        && n["latest"]["memory"]["total_bytes"].as_u64()
                            == Some(novacron_tests::host_mem_total())
                })
        },
    )
    .await
    .expect("live metrics");

    // Published addresses: on loopback, as the agents' Docker bound them, shown
    // by alloc list, alloc show and job status, and they answer.
    let published = || {
        let out = novacron(&config, &["alloc", "list", "--job", "hello", "-o", "json"]);
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap_or_default()
    };
    wait_for(
        Duration::from_secs(15),
        "both replicas reported with their published addresses",
        || async {
            let allocs = published();
            allocs.len() == 2
                && allocs
                    .iter()
                    .all(|a| a["published"].as_array().is_some_and(|p| !p.is_empty()))
        },
    )
    .await
    .expect("published addresses");
    let allocs = published();
    let list = text(&novacron(&config, &["alloc", "list", "--job", "hello"]));
    let status = text(&novacron(&config, &["job", "status", "hello"]));
    for a in &allocs {
        let id = a["id"].as_str().expect("an id");
        let host_port = a["ports"][0]["host_port"].as_u64().expect("a host port");
        for p in a["published"].as_array().expect("published") {
            assert_eq!(p["host_ip"], "127.0.0.1", "loopback only: {a}");
            assert_eq!(p["host_port"].as_u64(), Some(host_port), "{a}");
            assert_eq!(p["container_port"], 8080, "{a}");
            assert_eq!(p["protocol"], "tcp", "{a}");
        }
        let address = format!("127.0.0.1:{host_port}");
        let cell = format!("{address}->8080/tcp");
        assert!(list.contains(&cell), "alloc list shows {cell}:\n{list}");
        assert!(status.contains(&cell), "job status shows {cell}:\n{status}");
        let show = text(&novacron(&config, &["alloc", "show", id]));
        assert!(
            show.contains(&format!("http  {address} -> 8080/tcp")),
            "alloc show names the port and its address:\n{show}"
        );
        let container = novacron_tests::docker(&[
            "ps",
            "-q",
            "--filter",
            &format!("label=novacron.alloc={id}"),
        ])
        .expect("docker ps");
        let docker_port =
            novacron_tests::docker(&["port", container.trim(), "8080/tcp"]).expect("docker port");
        assert_eq!(docker_port.trim(), address, "what docker ps shows");
        let page = http_get(&address).await.unwrap_or_default();
        assert!(page.contains("hello from"), "{address} answers: {page}");
    }

    // The README's exec example, on the host (the agents allow it).
    let exec = novacron(
        &config,
        &[
            "exec",
            "--selector",
            "zone=a",
            "--",
            "echo",
            "from-the-host",
        ],
    );
    assert!(exec.status.success(), "{}", text(&exec));
    assert!(text(&exec).contains("from-the-host"), "{}", text(&exec));

    // A virtual machine of the fleet (the tiny guest of `.ci/setup vm`, on the
    // agent's bridge): it must go with the fleet, as the containers do.
    let guest =
        novacron_tests::docker(&["image", "inspect", "-f", "{{.Id}}", "novacron/guest-tiny:1"]);
    assert!(
        guest.is_ok(),
        "the guest image novacron/guest-tiny:1 is missing: run `bash .ci/setup vm`"
    );
    let vm_job = dir.path().join("vm.yaml");
    std::fs::write(
        &vm_job,
        "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: devvm
spec:
  type: service
  replicas: 1
  task:
    image: novacron/guest-tiny:1
    pullPolicy: never
    vm:
      memory: 128Mi
      initrd: /boot/initrd.img
      cmdline: console=ttyS0 quiet panic=-1
      network: bridge
  resources: {cpu: 250m, memory: 256Mi}
",
    )
    .expect("write the VM job");
    let vm_job = vm_job.to_string_lossy().into_owned();
    let applied = novacron(&config, &["apply", "-f", &vm_job]);
    assert!(applied.status.success(), "{}", text(&applied));
    let state_text = state.to_string_lossy().into_owned();
    wait_for(
        Duration::from_secs(90),
        "the dev fleet's VM running",
        || {
            let qemus = qemus_of(&state_text);
            let status = text(&novacron(&config, &["job", "status", "devvm"]));
            async move { !qemus.is_empty() && status.contains("1 running") }
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}",
            text(&novacron(&config, &["job", "status", "devvm"]))
        )
    });

    // A second fleet on the same state directory refuses before touching it: the
    // first one's log keeps its content and its agents keep running.
    let log = state.join("controller.log");
    let log_before = std::fs::metadata(&log).expect("controller log").len();
    let second = dev_args(&free_port().to_string(), &state, &format!("{prefix}b"))
        .output()
        .await
        .expect("a second novacron dev runs");
    let said = text(&second);
    assert_eq!(second.status.code(), Some(1), "{said}");
    assert!(
        said.contains("another novacron dev fleet is running")
            && said.contains(&format!("pid {}", dev.id().expect("pid")))
            && said.contains("--dir"),
        "names the holder and the way out: {said}"
    );
    assert!(!said.contains("is up"), "{said}");
    assert!(
        std::fs::metadata(&log).expect("controller log").len() >= log_before,
        "the first fleet's log is not truncated"
    );
    // Another directory but the same node names: refused too.
    let other = dir.path().join("other");
    let third = dev_args(&free_port().to_string(), &other, &prefix)
        .output()
        .await
        .expect("a third novacron dev runs");
    let said = text(&third);
    assert_eq!(third.status.code(), Some(1), "{said}");
    assert!(
        said.contains(&format!("nodes named {prefix}-N")) && said.contains("--name-prefix"),
        "{said}"
    );
    let still = novacron(&config, &["job", "status", "hello"]);
    assert!(
        text(&still).contains("2 wanted, 2 running, 2 healthy"),
        "the first fleet is undisturbed: {}",
        text(&still)
    );

    // Ctrl-C (SIGINT) stops the whole fleet cleanly.
    interrupt.0 = None;
    let pid = dev.id().expect("pid").to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    let status = tokio::time::timeout(Duration::from_secs(20), dev.wait())
        .await
        .expect("stops")
        .expect("status");
    assert!(status.success(), "{status}");
    drain.abort();
    let after = novacron(&config, &["node", "list"]);
    assert_eq!(
        after.status.code(),
        Some(69),
        "controller gone: {}",
        text(&after)
    );
    for node in &nodes {
        let left = novacron_tests::docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=novacron.node={node}"),
        ])
        .expect("docker ps");
        assert!(
            left.is_empty(),
            "the dev fleet's containers are removed on exit: {left}"
        );
    }
    // Its VM too: no QEMU of the fleet's directory is left.
    let left = qemus_of(&state_text);
    assert!(left.is_empty(), "the dev fleet's VM outlived it: {left:?}");
    // Each agent's VM bridge (`--vm-bridge 10.216.N.1/24`; one had the VM's
    // tap) goes with its agent, with its rules.
    let addrs = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
        .expect("ip addr");
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    for i in 0..nodes.len() {
        assert!(
            !addrs.contains(&format!(" 10.216.{i}.1/24 ")),
            "agent {i}'s VM bridge outlived the dev fleet: {addrs}"
        );
    }
    let nat = std::process::Command::new("iptables")
        .args(["-w", "10", "-t", "nat", "-S"])
        .output()
        .expect("iptables");
    let nat = String::from_utf8_lossy(&nat.stdout);
    assert!(
        !nat.lines().any(|l| l.contains("10.216.")),
        "the dev fleet's bridge rules outlived it: {nat}"
    );
}

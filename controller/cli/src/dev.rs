//! `novacron dev`: a local fleet in one command. It runs the real binaries, a
//! controller and N agents, with a throwaway CA in a state directory, over real QUIC
//! and mutual TLS; writes a `dev` context so that `novacron node list` works from
//! another terminal; prints a live one-line summary per node; and stops everything
//! on Ctrl-C.
//!
//! One fleet at a time: before it touches anything, a dev fleet takes an exclusive
//! lock on `<dir>/dev.lock` (its state directory) and on
//! `$TMPDIR/novacron-dev-<prefix>.lock` (its node names, which are Docker labels
//! shared by every fleet on the daemon), and a second one refuses to start, naming
//! the process that holds them. Its agents publish ports on loopback unless told
//! otherwise (`--publish-address`), and it removes only the containers of its own
//! nodes when it stops; its agents remove their virtual machines at their stop
//! (`novacron-agent run --remove-vms-on-stop`).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use clap::Args;
use novacron_api::NodeView;
use novacron_common::ticker::Ticker;
use tokio::process::{Child, Command};
use tokio::time::MissedTickBehavior;

use super::client::ApiClient;
use super::config::{Context, write_context};
use super::output::bytes;

/// How long the fleet may take to come up.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// `novacron dev` arguments.
#[derive(Debug, Clone, PartialEq, Eq, Args)]
pub struct DevArgs {
    /// State directory for the throwaway CA, the controller's store and the agents.
    #[arg(long, default_value = ".novacron-dev")]
    pub dir: PathBuf,
    /// Number of local agents.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=32))]
    pub agents: u16,
    /// Port of the controller's API (TCP) and agent link (UDP) on 127.0.0.1.
    #[arg(long, default_value_t = 7443)]
    pub port: u16,
    /// Delete the state directory first (a new CA, new nodes).
    #[arg(long)]
    pub fresh: bool,
    /// Print the node summary this often (0 to stay quiet).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub every: Duration,
    /// Stop by itself after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Do not build the demo image and start the demo job.
    #[arg(long)]
    pub no_demo: bool,
    /// Let the agents run commands on this host (`novacron exec --selector
    /// zone=a -- uptime`): each agent starts with `--allow-host-exec`, so an
    /// operator of the dev fleet can run anything as this user.
    #[arg(long)]
    pub host_exec: bool,
    /// Where the agents publish the jobs' ports on this host. Loopback by
    /// default, so the demo is not reachable from the network; `0.0.0.0` opens
    /// them to every address.
    #[arg(long, value_name = "IP", default_value = "127.0.0.1")]
    pub publish_address: IpAddr,
    /// The nodes are named PREFIX-1, PREFIX-2, ...: names are labels on the
    /// shared Docker daemon, so two fleets running at once need two prefixes.
    #[arg(long, value_name = "PREFIX", default_value = DEFAULT_PREFIX, value_parser = parse_prefix)]
    pub name_prefix: String,
}

/// The default node name prefix: nodes `dev-1`, `dev-2`, ...
pub const DEFAULT_PREFIX: &str = "dev";

/// The lock file in the state directory.
pub const LOCK_FILE: &str = "dev.lock";

fn parse_prefix(s: &str) -> Result<String, String> {
    novacron_common::names::validate_name(&format!("{s}-32"))
        .map(|()| s.to_owned())
        .map_err(|e| format!("{s:?} cannot prefix a node name: {}", e.why))
}

/// The node names of a fleet of `agents` agents.
pub fn node_names(prefix: &str, agents: u16) -> Vec<String> {
    (1..=agents).map(|i| format!("{prefix}-{i}")).collect()
}

/// The demo job's name.
pub const DEMO_JOB: &str = "hello";
/// The demo image, built locally (no registry).
pub const DEMO_IMAGE: &str = "novacron-dev/busybox:1";

const DEMO_DOCKERFILE: &str = "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nCMD [\"/bin/sh\"]\n";

fn demo_manifest() -> String {
    format!(
        "apiVersion: novacron.io/v1
kind: Job
metadata:
  name: {DEMO_JOB}
spec:
  type: service
  replicas: 2
  task:
    image: {DEMO_IMAGE}
    command: [sh, -c, 'mkdir -p /www && echo \"hello from $HOSTNAME\" > /www/index.html && echo serving on 8080 && exec httpd -f -p 8080 -h /www']
    ports:
      - name: http
        containerPort: 8080
  resources:
    cpu: 100m
    memory: 16Mi
  placement:
    spread:
      - key: zone
  health:
    http:
      port: 8080
      path: /
    interval: 2s
    timeout: 1s
    retries: 2
"
    )
}

/// Builds the demo image from the host's static busybox (Debian's busybox-static)
/// when it is missing, then applies the demo job.
async fn start_demo(client: &ApiClient, dir: &Path) -> Result<(), String> {
    let present = std::process::Command::new("docker")
        .args(["image", "inspect", DEMO_IMAGE])
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?
        .status
        .success();
    if !present {
        let context = dir.join("demo-image");
        std::fs::create_dir_all(&context).map_err(|e| format!("{}: {e}", context.display()))?;
        std::fs::copy("/bin/busybox", context.join("busybox"))
            .map_err(|e| format!("/bin/busybox: {e} (install Debian's busybox-static)"))?;
        std::fs::write(context.join("Dockerfile"), DEMO_DOCKERFILE)
            .map_err(|e| format!("{}: {e}", context.display()))?;
        let out = std::process::Command::new("docker")
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", DEMO_IMAGE])
            .arg(&context)
            .output()
            .map_err(|e| format!("cannot run docker build: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "docker build of {DEMO_IMAGE} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    let req = novacron_api::ApplyRequest {
        file: "demo/hello.yaml".into(),
        manifest: demo_manifest(),
    };
    client
        .post::<_, novacron_api::ApplyResult>(&["v1", "jobs"], &req)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Errors of `novacron dev`.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// A sibling binary is missing.
    #[error(
        "{0} not found next to this binary; build all binaries with `cargo build --release --bins`"
    )]
    MissingBinary(PathBuf),
    /// A step failed.
    #[error("{step} failed: {detail}")]
    Step {
        /// What was being done.
        step: String,
        /// Its output or error.
        detail: String,
    },
    /// Another dev fleet holds the state directory or the node names.
    #[error(
        "another novacron dev fleet is running with {what} ({holder}); stop it first \
         (Ctrl-C in its terminal{kill}), or start this one with {instead}"
    )]
    Busy {
        /// What is taken: the state directory or the node names.
        what: String,
        /// Who holds it, as its lock file says (`pid 4242, API https://...`).
        holder: String,
        /// `, or kill 4242` when the holder's pid is known.
        kill: String,
        /// The option that avoids the clash.
        instead: String,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Runs the local fleet until Ctrl-C (or `--duration`).
pub async fn run(args: &DevArgs, config_path: &Path, out: &mut dyn Write) -> Result<(), DevError> {
    let bins = sibling_dir()?;
    let controller_bin = existing(bins.join("novacron-controller"))?;
    let agent_bin = existing(bins.join("novacron-agent"))?;
    let dir = absolute(&args.dir)?;
    let listen = format!("127.0.0.1:{}", args.port);
    let api = format!("https://{listen}");
    let names = node_names(&args.name_prefix, args.agents);
    // Both locks before anything in the directory (or on Docker) is touched.
    let holder = format!(
        "pid {}, API {api}, nodes {}, state {}",
        std::process::id(),
        names.join(","),
        dir.display()
    );
    let _dir_lock = FleetLock::take(
        &dir.join(LOCK_FILE),
        &holder,
        &format!("its state in {}", dir.display()),
        "another --dir",
    )?;
    let _names_lock = FleetLock::take(
        &std::env::temp_dir().join(format!("novacron-dev-{}.lock", args.name_prefix)),
        &holder,
        &format!("nodes named {}-N", args.name_prefix),
        "another --name-prefix",
    )?;
    if args.fresh {
        clear_dir(&dir)?;
    }
    let data = dir.join("controller");
    if !data.join("pki/ca.pem").exists() {
        step(
            "novacron-controller init",
            std::process::Command::new(&controller_bin)
                .arg("--data-dir")
                .arg(&data)
                .args([
                    "init",
                    "--server-name",
                    "127.0.0.1",
                    "--server-name",
                    "localhost",
                ]),
        )?;
    }
    let mut children = Vec::new();
    children.push(spawn(
        Command::new(&controller_bin)
            .arg("--data-dir")
            .arg(&data)
            .args(["serve", "--api-listen", &listen, "--quic-listen", &listen])
            .args(["--server-name", "127.0.0.1"]),
        &dir.join("controller.log"),
    )?);

    let ctx = Context {
        api: api.parse().map_err(|e| DevError::Step {
            step: "building the context".into(),
            detail: format!("{e}"),
        })?,
        ca: data.join("pki/ca.pem"),
        cert: data.join("pki/admin.pem"),
        key: data.join("pki/admin-key.pem"),
        token_file: None,
        also: vec![],
    };
    let client = ApiClient::new("dev", &ctx, SystemTime::now()).map_err(|e| DevError::Step {
        step: "reading the dev credentials".into(),
        detail: e.to_string(),
    })?;
    wait_until(&mut children, &dir, "the controller's API", || async {
        client.get::<Vec<NodeView>>(&["v1", "nodes"]).await.is_ok()
    })
    .await?;

    for (i, name) in names.iter().enumerate() {
        let state = dir.join(format!("agent-{name}"));
        if !state.join("enrollment.json").exists() {
            let token = step(
                "novacron-controller token create",
                std::process::Command::new(&controller_bin)
                    .arg("--data-dir")
                    .arg(&data)
                    .args(["token", "create", "--quiet", "--ttl", "10m"]),
            )?;
            let fingerprint = fingerprint(&data)?;
            step(
                &format!("novacron-agent join ({name})"),
                std::process::Command::new(&agent_bin)
                    .args(["join", "--controller", &api, "--token", token.trim()])
                    .args(["--ca-fingerprint", &fingerprint, "--name", name])
                    .arg("--state-dir")
                    .arg(&state),
            )?;
        }
        let zone = format!("zone={}", ZONES[i % ZONES.len()]);
        let mut agent = Command::new(&agent_bin);
        agent
            .args(["run", "--state-dir"])
            .arg(&state)
            .args([
                "--label",
                &zone,
                "--label",
                "pool=dev",
                "--label",
                "capacity=on-demand",
            ])
            .args(["--publish-address", &args.publish_address.to_string()])
            .args(["--dynamic-ports", &dynamic_ports(i)])
            // A VM bridge of each agent's own (a range cannot be shared).
            .args(["--vm-bridge", &format!("10.216.{i}.1/24")])
            // The fleet's VMs go with it, as its containers do.
            .arg("--remove-vms-on-stop");
        if args.host_exec {
            agent.arg("--allow-host-exec");
        }
        children.push(spawn(&mut agent, &dir.join(format!("{name}.log")))?);
    }
    wait_until(
        &mut children,
        &dir,
        "every agent to stream metrics",
        || async {
            client
                .get::<Vec<NodeView>>(&["v1", "nodes"])
                .await
                .is_ok_and(|nodes| {
                    names.iter().all(|n| {
                        nodes.iter().any(|v| {
                            &v.name == n && v.latest.is_some() && v.status.to_string() == "ready"
                        })
                    })
                })
        },
    )
    .await?;

    let demo = if args.no_demo {
        None
    } else {
        match start_demo(&client, &dir).await {
            Ok(()) => Some(DEMO_JOB),
            Err(reason) => {
                let _ = writeln!(out, "note: the demo job was not started: {reason}");
                None
            }
        }
    };

    write_context(config_path, "dev", &ctx, true).map_err(|e| DevError::Step {
        step: "writing the dev context".into(),
        detail: e.to_string(),
    })?;
    let _ = writeln!(
        out,
        "NovaCron dev fleet is up: controller {api}, {} agent(s): {}\n\
         state and logs: {}\n\
         context \"dev\" written to {}\n\n\
         try, in another terminal:\n  \
         novacron node list\n  \
         novacron node show {}\n{}{}\n\
         Ctrl-C stops the fleet.",
        names.len(),
        names.join(", "),
        dir.display(),
        config_path.display(),
        names[0],
        match demo {
            Some(job) => format!(
                "  novacron job status {job}      (a 2-replica web service, spread across zones)\n  \
                 novacron alloc list              (PORTS: where each replica answers, e.g. curl {}:PORT)\n  \
                 novacron alloc logs <ID>\n",
                args.publish_address
            ),
            None => String::new(),
        },
        if args.host_exec {
            "  novacron exec --selector zone=a -- uptime   (on this host, as this user)\n"
                .to_string()
        } else {
            "  (start with --host-exec to try `novacron exec --selector zone=a -- uptime`)\n"
                .to_string()
        },
    );
    let _ = out.flush();

    // Runs until Ctrl-C (or SIGTERM), or until `--duration` has passed.
    let stop = async {
        match args.duration {
            Some(d) => tokio::select! {
                () = novacron_common::signal::shutdown_signal() => {}
                () = tokio::time::sleep(d) => {}
            },
            None => novacron_common::signal::shutdown_signal().await,
        }
    };
    let mut ticker = Ticker::new(
        if args.every.is_zero() {
            Duration::from_secs(3600)
        } else {
            args.every
        },
        MissedTickBehavior::Burst,
        stop,
    );
    // The first tick is at once: the first summary comes one period later.
    ticker.tick().await;
    while ticker.tick().await {
        if args.every.is_zero() {
            continue;
        }
        if let Some(died) = exited(&mut children) {
            stop_all(&mut children).await;
            return Err(DevError::Step {
                step: "the fleet".into(),
                detail: format!("{died}; see the logs in {}", dir.display()),
            });
        }
        if let Ok(nodes) = client.get::<Vec<NodeView>>(&["v1", "nodes"]).await {
            let mut line = summary(&nodes);
            if let Some(job) = demo
                && let Ok(j) = client
                    .get::<novacron_api::JobDetail>(&["v1", "jobs", job])
                    .await
            {
                let s = &j.summary;
                line.push_str(&format!(
                    " | job {job}: {}/{} running, {} healthy",
                    s.running, s.replicas, s.healthy
                ));
            }
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
    let _ = writeln!(out, "stopping the dev fleet");
    stop_all(&mut children).await;
    // The agents leave their containers for the next start to adopt; a dev fleet
    // that stops takes its containers with it (the jobs stay in the store).
    for name in &names {
        remove_containers_of(name);
    }
    Ok(())
}

/// The first host port of the dev agents' dynamic ranges.
pub const DEV_PORTS_FIRST: u16 = 20_000;
/// Host ports per dev agent.
pub const DEV_PORTS_PER_AGENT: u16 = 50;

/// The dynamic host port range of the `i`th agent (from 0): the agents share one
/// host, so each takes its own slice (`20000-20049`, `20050-20099`, ...; 32 agents
/// end at 21599), below the slices the end-to-end tests use (22000 and up).
fn dynamic_ports(i: usize) -> String {
    let i = u16::try_from(i).unwrap_or(u16::MAX / DEV_PORTS_PER_AGENT);
    let first = DEV_PORTS_FIRST.saturating_add(i.saturating_mul(DEV_PORTS_PER_AGENT));
    format!("{first}-{}", first.saturating_add(DEV_PORTS_PER_AGENT - 1))
}

/// The zone labels of the dev nodes, in turn.
const ZONES: [&str; 3] = ["a", "b", "c"];

/// An exclusive lock on a file, held while the value lives (the OS drops it with
/// the process, so a crashed fleet leaves no stale lock). The file says who holds
/// it, for the message of the next one that tries.
#[derive(Debug)]
struct FleetLock {
    _file: File,
}

impl FleetLock {
    /// Takes the lock on `path` (creating it) and writes `holder` into it; when
    /// another process holds it, fails with what its file says.
    fn take(path: &Path, holder: &str, what: &str, instead: &str) -> Result<FleetLock, DevError> {
        let io = |source| DevError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
        {
            Ok(file) => file,
            // Another user's lock file in the shared temporary directory: a
            // read-only descriptor locks as well.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                File::open(path).map_err(io)?
            }
            Err(e) => return Err(io(e)),
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut said = String::new();
                let _ = file.read_to_string(&mut said);
                let said = said.trim();
                let pid = said
                    .strip_prefix("pid ")
                    .and_then(|rest| rest.split(',').next())
                    .filter(|p| p.parse::<u32>().is_ok());
                return Err(DevError::Busy {
                    what: what.to_owned(),
                    holder: if said.is_empty() {
                        format!("the process holding {}", path.display())
                    } else {
                        said.chars().take(512).collect()
                    },
                    kill: pid.map_or_else(String::new, |p| format!(", or kill {p}")),
                    instead: instead.to_owned(),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        // Ours now: say who holds it (best effort on a read-only descriptor).
        if file.set_len(0).is_ok() && file.rewind().is_ok() {
            let _ = writeln!(file, "{holder}");
        }
        Ok(FleetLock { _file: file })
    }
}

/// `--fresh`: empties the state directory, keeping the lock file this process
/// holds (removing it would let a third fleet lock a new one beside ours).
fn clear_dir(dir: &Path) -> Result<(), DevError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DevError::Io { path, source }
    };
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        if entry.file_name() == LOCK_FILE {
            continue;
        }
        let path = entry.path();
        let removed = if entry.file_type().map_err(io(&path))?.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(io(&path))?;
    }
    Ok(())
}

/// Removes the containers of one of this fleet's nodes (label `novacron.node`):
/// only its own, since its node names are locked to it.
fn remove_containers_of(node: &str) {
    let filter = format!("label=novacron.node={node}");
    let Ok(out) = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter", &filter])
        .output()
    else {
        return;
    };
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    if !ids.is_empty() {
        let _ = std::process::Command::new("docker")
            .args(["rm", "-f"])
            .args(&ids)
            .output();
    }
}

/// One line per fleet: each node's status, CPU and memory.
pub fn summary(nodes: &[NodeView]) -> String {
    nodes
        .iter()
        .map(|n| match &n.latest {
            Some(s) => format!(
                "{} {} cpu {:.0}% mem {}/{}",
                n.name,
                n.status,
                s.cpu.total_percent,
                bytes(s.memory.used_bytes),
                bytes(s.memory.total_bytes)
            ),
            None => format!("{} {}", n.name, n.status),
        })
        .collect::<Vec<_>>()
        .join(" | ")
}

fn sibling_dir() -> Result<PathBuf, DevError> {
    let exe = std::env::current_exe().map_err(|source| DevError::Io {
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    Ok(exe.parent().map(Path::to_path_buf).unwrap_or_default())
}

fn existing(path: PathBuf) -> Result<PathBuf, DevError> {
    if path.exists() {
        Ok(path)
    } else {
        Err(DevError::MissingBinary(path))
    }
}

fn absolute(path: &Path) -> Result<PathBuf, DevError> {
    std::fs::create_dir_all(path).map_err(|source| DevError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::canonicalize(path).map_err(|source| DevError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn fingerprint(data: &Path) -> Result<String, DevError> {
    let pem = std::fs::read_to_string(data.join("pki/ca.pem")).map_err(|source| DevError::Io {
        path: data.join("pki/ca.pem"),
        source,
    })?;
    novacron_common::pki::first_cert_der(&pem)
        .map(|der| novacron_common::pki::Fingerprint::of(&der).to_string())
        .map_err(|e| DevError::Step {
            step: "reading the dev CA".into(),
            detail: e.to_string(),
        })
}

fn step(what: &str, cmd: &mut std::process::Command) -> Result<String, DevError> {
    let out = cmd.output().map_err(|e| DevError::Step {
        step: what.into(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(DevError::Step {
            step: what.into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn spawn(cmd: &mut Command, log: &Path) -> Result<(String, Child), DevError> {
    let file = std::fs::File::create(log).map_err(|source| DevError::Io {
        path: log.to_path_buf(),
        source,
    })?;
    let name = format!("{:?}", cmd.as_std().get_program());
    let child = cmd
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::null())
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| DevError::Step {
            step: format!("starting {name}"),
            detail: e.to_string(),
        })?;
    Ok((name, child))
}

async fn wait_until<F, Fut>(
    children: &mut [(String, Child)],
    dir: &Path,
    what: &str,
    mut check: F,
) -> Result<(), DevError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < STARTUP_TIMEOUT {
        if check().await {
            return Ok(());
        }
        if let Some(died) = exited(children) {
            return Err(DevError::Step {
                step: format!("waiting for {what}"),
                detail: format!(
                    "{died}; see the logs in {} (is port already in use? try --port)",
                    dir.display()
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(DevError::Step {
        step: format!("waiting for {what}"),
        detail: format!(
            "not ready after {STARTUP_TIMEOUT:?}; see the logs in {}",
            dir.display()
        ),
    })
}

fn exited(children: &mut [(String, Child)]) -> Option<String> {
    children
        .iter_mut()
        .find_map(|(name, child)| match child.try_wait() {
            Ok(Some(status)) => Some(format!("{name} exited with {status}")),
            _ => None,
        })
}

async fn stop_all(children: &mut [(String, Child)]) {
    // Agents first, then the controller, each with SIGTERM and a grace period.
    for (_, child) in children.iter_mut().rev() {
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}; expected e.g. 5s, 1m"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_agent_has_its_own_port_slice() {
        assert_eq!(dynamic_ports(0), "20000-20049");
        assert_eq!(dynamic_ports(1), "20050-20099");
        assert_eq!(dynamic_ports(31), "21550-21599");
    }

    #[test]
    fn node_names_take_the_prefix() {
        assert_eq!(node_names("dev", 2), ["dev-1", "dev-2"]);
        assert_eq!(parse_prefix("qs42"), Ok("qs42".into()));
        let e = parse_prefix("Dev_1").expect_err("not a name");
        assert!(e.contains("cannot prefix a node name"), "{e}");
        assert!(parse_prefix(&"a".repeat(61)).is_err(), "too long with -32");
    }

    #[test]
    fn a_second_lock_names_the_holder_and_a_cleared_dir_keeps_the_lock() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(LOCK_FILE);
        let held = FleetLock::take(&path, "pid 4242, API https://127.0.0.1:7443", "x", "--dir")
            .expect("the first takes it");
        let e =
            FleetLock::take(&path, "pid 1", "its state in D", "another --dir").expect_err("held");
        let msg = e.to_string();
        assert!(
            msg.contains("running with its state in D (pid 4242, API https://127.0.0.1:7443)")
                && msg.contains("or kill 4242")
                && msg.contains("another --dir"),
            "{msg}"
        );
        std::fs::create_dir(dir.path().join("controller")).expect("mkdir");
        std::fs::write(dir.path().join("dev-1.log"), "x").expect("write");
        clear_dir(dir.path()).expect("clear");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, [LOCK_FILE]);
        assert!(
            FleetLock::take(&path, "pid 2", "x", "--dir").is_err(),
            "still held"
        );
        drop(held);
        FleetLock::take(&path, "pid 3", "x", "--dir").expect("free once dropped");
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "pid 3\n",
            "the file says who holds it"
        );
    }
}

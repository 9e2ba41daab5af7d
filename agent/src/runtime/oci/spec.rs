//! The OCI runtime spec (`config.json`) of an agent-owned container: pure
//! functions of the task, the image's configuration and the paths the driver
//! prepared, so that they are tested without runc.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub use crate::runtime::docker::sandbox::ImageRun;
use oci_spec::runtime::{
    Capability, LinuxCpu, LinuxMemory, LinuxNamespace, LinuxNamespaceType, LinuxResources, Mount,
    PosixRlimit, PosixRlimitType, Spec, User,
};

/// The annotation runc reads its CRIU configuration file from (instead of
/// `/etc/criu/runc.conf`).
pub const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";

/// One bind mount into the container.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bind {
    /// The host path.
    pub source: PathBuf,
    /// The path in the container.
    pub target: String,
    /// Read-only.
    pub read_only: bool,
}

/// Everything [`build`] needs.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// The container's hostname.
    pub hostname: &'a str,
    /// The mounted root file system.
    pub rootfs: &'a Path,
    /// The process: [`args`] of the task and image.
    pub args: Vec<String>,
    /// `KEY=value`, see [`env`].
    pub env: Vec<String>,
    /// The working directory.
    pub cwd: String,
    /// User and group ids.
    pub uid: u32,
    /// See `uid`.
    pub gid: u32,
    /// The network namespace to join (the sandbox's).
    pub netns: &'a Path,
    /// Volumes, host paths and the sandbox's `/etc` files.
    pub binds: &'a [Bind],
    /// Memory limit, bytes.
    pub memory_bytes: Option<i64>,
    /// CPU limit, billionths of a core.
    pub nano_cpus: Option<i64>,
    /// The cgroup path.
    pub cgroup: String,
    /// The CRIU configuration file runc passes to CRIU.
    pub criu_config: &'a Path,
    /// The open-files limit (soft, hard).
    pub nofile: (u64, u64),
}

/// Docker's semantics: an entry point of the task replaces the image's and
/// drops the image's command; a command of the task replaces the image's.
pub fn args(task_entrypoint: &[String], task_cmd: &[String], image: &ImageRun) -> Vec<String> {
    let entrypoint = if task_entrypoint.is_empty() {
        &image.entrypoint
    } else {
        task_entrypoint
    };
    let cmd: &[String] = if !task_cmd.is_empty() {
        task_cmd
    } else if task_entrypoint.is_empty() {
        &image.cmd
    } else {
        &[]
    };
    entrypoint.iter().chain(cmd).cloned().collect()
}

/// The image's environment overridden by the task's, with a default `PATH` and
/// the `HOSTNAME` Docker sets.
pub fn env(image: &[String], task: &BTreeMap<String, String>, hostname: &str) -> Vec<String> {
    let mut all: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| match all.iter_mut().find(|(key, _)| key == k) {
        Some(slot) => slot.1 = v.to_owned(),
        None => all.push((k.to_owned(), v.to_owned())),
    };
    set(
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    );
    set("HOSTNAME", hostname);
    for kv in image {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        set(k, v);
    }
    for (k, v) in task {
        set(k, v);
    }
    all.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The ids of an image's `User` (`name`, `uid`, `name:group`, `uid:gid`),
/// names looked up in the root file system's `/etc/passwd` and `/etc/group`.
pub fn user(user: &str, rootfs: &Path) -> Result<(u32, u32), String> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap_or_default();
    let (uid, primary) = match u.parse::<u32>() {
        Ok(uid) => (uid, lookup(&passwd, |f| f[2] == u).map_or(0, |f| num(f[3]))),
        Err(_) => {
            let f = lookup(&passwd, |f| f[0] == u)
                .ok_or_else(|| format!("user {u:?} is not in the image's /etc/passwd"))?;
            (num(f[2]), num(f[3]))
        }
    };
    let gid = match g {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                let group = std::fs::read_to_string(rootfs.join("etc/group")).unwrap_or_default();
                num(lookup(&group, |f| f[0] == g)
                    .ok_or_else(|| format!("group {g:?} is not in the image's /etc/group"))?[2])
            }
        },
    };
    Ok((uid, gid))
}

fn lookup(file: &str, hit: impl Fn(&[&str]) -> bool) -> Option<Vec<&str>> {
    file.lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 4 && hit(f))
}

fn num(s: &str) -> u32 {
    s.parse().unwrap_or(0)
}

/// Docker's default capabilities.
const CAPABILITIES: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// The container's `config.json`.
pub fn build(input: &Input<'_>) -> Result<Spec, String> {
    let err = |e: oci_spec::OciSpecError| e.to_string();
    let mut spec = Spec::default();
    spec.set_hostname(Some(input.hostname.to_owned()));
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(input.rootfs.to_path_buf());
    root.set_readonly(Some(false));
    spec.set_root(Some(root));

    let mut process = spec.process().clone().unwrap_or_default();
    process.set_terminal(Some(false));
    process.set_args(Some(input.args.clone()));
    process.set_env(Some(input.env.clone()));
    process.set_cwd(PathBuf::from(if input.cwd.is_empty() {
        "/"
    } else {
        &input.cwd
    }));
    let mut user = User::default();
    user.set_uid(input.uid);
    user.set_gid(input.gid);
    process.set_user(user);
    process.set_no_new_privileges(Some(false));
    let caps: oci_spec::runtime::Capabilities = CAPABILITIES.into_iter().collect();
    let mut set = process.capabilities().clone().unwrap_or_default();
    set.set_bounding(Some(caps.clone()));
    set.set_effective(Some(caps.clone()));
    set.set_permitted(Some(caps));
    set.set_inheritable(None);
    set.set_ambient(None);
    process.set_capabilities(Some(set));
    // The agent's own limit: a container may not raise it (and a sandboxed
    // host refuses to).
    let (soft, hard) = input.nofile;
    let nofile = oci_spec::runtime::PosixRlimitBuilder::default()
        .typ(PosixRlimitType::RlimitNofile)
        .hard(hard)
        .soft(soft)
        .build()
        .map_err(err)?;
    process.set_rlimits(Some(vec![nofile as PosixRlimit]));
    spec.set_process(Some(process));

    let mut mounts = spec.mounts().clone().unwrap_or_default();
    for b in input.binds {
        let mut options = vec!["rbind".to_owned(), "rprivate".to_owned()];
        if b.read_only {
            options.push("ro".to_owned());
        }
        let mut m = Mount::default();
        m.set_destination(PathBuf::from(&b.target));
        m.set_typ(Some("bind".to_owned()));
        m.set_source(Some(b.source.clone()));
        m.set_options(Some(options));
        mounts.push(m);
    }
    spec.set_mounts(Some(mounts));

    let mut linux = spec.linux().clone().unwrap_or_default();
    let namespaces: Vec<LinuxNamespace> = linux
        .namespaces()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|mut ns| {
            if ns.typ() == LinuxNamespaceType::Network {
                ns.set_path(Some(input.netns.to_path_buf()));
            }
            ns
        })
        .collect();
    linux.set_namespaces(Some(namespaces));
    linux.set_cgroups_path(Some(PathBuf::from(&input.cgroup)));
    let mut resources = linux
        .resources()
        .clone()
        .unwrap_or_else(LinuxResources::default);
    if let Some(bytes) = input.memory_bytes {
        let mut memory = LinuxMemory::default();
        memory.set_limit(Some(bytes));
        memory.set_swap(Some(bytes));
        resources.set_memory(Some(memory));
    }
    if let Some(nano) = input.nano_cpus {
        const PERIOD: u64 = 100_000;
        let mut cpu = LinuxCpu::default();
        cpu.set_period(Some(PERIOD));
        cpu.set_quota(Some((nano.max(1_000_000) * PERIOD as i64) / 1_000_000_000));
        resources.set_cpu(Some(cpu));
    }
    linux.set_resources(Some(resources));
    spec.set_linux(Some(linux));

    let mut annotations: HashMap<String, String> = spec.annotations().clone().unwrap_or_default();
    annotations.insert(
        CRIU_CONFIG_ANNOTATION.to_owned(),
        input.criu_config.display().to_string(),
    );
    spec.set_annotations(Some(annotations));
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn the_task_s_entrypoint_drops_the_image_s_command_as_docker_does() {
        let image = ImageRun {
            entrypoint: s(&["/entry"]),
            cmd: s(&["--serve"]),
            ..ImageRun::default()
        };
        assert_eq!(args(&[], &[], &image), s(&["/entry", "--serve"]));
        assert_eq!(args(&[], &s(&["--x"]), &image), s(&["/entry", "--x"]));
        assert_eq!(args(&s(&["/other"]), &[], &image), s(&["/other"]));
        assert_eq!(
            args(&s(&["/other"]), &s(&["a"]), &image),
            s(&["/other", "a"])
        );
    }

    #[test]
    fn the_task_s_environment_overrides_the_image_s() {
        let task = BTreeMap::from([("A".to_owned(), "task".to_owned())]);
        let e = env(&s(&["A=image", "B=image", "PATH=/bin"]), &task, "h");
        assert_eq!(e, s(&["PATH=/bin", "HOSTNAME=h", "A=task", "B=image"]));
    }

    #[test]
    fn users_are_numbers_or_names_from_the_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("etc")).expect("etc");
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .expect("passwd");
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").expect("group");
        assert_eq!(user("", dir.path()), Ok((0, 0)));
        assert_eq!(user("app", dir.path()), Ok((1000, 1001)));
        assert_eq!(user("1000", dir.path()), Ok((1000, 1001)));
        assert_eq!(user("7:8", dir.path()), Ok((7, 8)));
        assert_eq!(user("app:staff", dir.path()), Ok((1000, 50)));
        assert!(user("nobody-here", dir.path()).is_err());
    }

    #[test]
    fn the_spec_joins_the_sandbox_s_network_and_carries_the_limits() {
        let binds = [Bind {
            source: PathBuf::from("/var/lib/docker/volumes/v/_data"),
            target: "/data".to_owned(),
            read_only: false,
        }];
        let spec = build(&Input {
            hostname: "web-1",
            rootfs: Path::new("/state/oci/x/rootfs"),
            args: s(&["/serve"]),
            env: s(&["A=1"]),
            cwd: String::new(),
            uid: 0,
            gid: 0,
            netns: Path::new("/proc/42/ns/net"),
            binds: &binds,
            memory_bytes: Some(64 << 20),
            nano_cpus: Some(500_000_000),
            cgroup: "/novacron/x".to_owned(),
            criu_config: Path::new("/state/oci/criu.conf"),
            nofile: (1024, 4096),
        })
        .expect("spec");
        let json = serde_json::to_value(&spec).expect("json");
        let ns = json["linux"]["namespaces"].as_array().expect("namespaces");
        let net = ns.iter().find(|n| n["type"] == "network").expect("net");
        assert_eq!(net["path"], "/proc/42/ns/net");
        assert_eq!(json["linux"]["resources"]["memory"]["limit"], 64 << 20);
        assert_eq!(json["linux"]["resources"]["cpu"]["quota"], 50_000);
        assert_eq!(json["process"]["args"][0], "/serve");
        assert_eq!(json["process"]["cwd"], "/");
        assert_eq!(json["root"]["readonly"], false);
        assert_eq!(json["process"]["rlimits"][0]["hard"], 4096);
        assert_eq!(
            json["annotations"][CRIU_CONFIG_ANNOTATION],
            "/state/oci/criu.conf"
        );
        let mounts = json["mounts"].as_array().expect("mounts");
        assert!(
            mounts
                .iter()
                .any(|m| m["destination"] == "/data" && m["type"] == "bind")
        );
        assert!(mounts.iter().any(|m| m["destination"] == "/proc"));
    }
}

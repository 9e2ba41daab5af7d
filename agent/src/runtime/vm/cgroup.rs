//! A VM's resource limits. Its QEMU runs in a cgroup of its own, like a
//! container: the job's CPU (a CFS quota, as Docker's `NanoCpus`) and memory
//! (a hard limit, never less than the guest's memory plus [`overhead`]).
//! Under the systemd launcher the VM's unit carries them (`CPUQuota`,
//! `MemoryMax`: [`Limits::systemd_properties`]); started directly, the agent
//! makes `novacron/<id>` in the cgroup hierarchies ([`plan`], cgroup v1 or v2)
//! and QEMU's shell joins it before it `exec`s QEMU, so no instant of the
//! guest runs outside it.

use std::path::{Path, PathBuf};

use super::qemu::Accel;

/// Where the cgroup filesystems are mounted.
pub const ROOT: &str = "/sys/fs/cgroup";
/// The CFS period, µs (Docker's and runc's).
pub const PERIOD_US: u64 = 100_000;
/// What QEMU itself needs beyond the guest's memory under `accel`: a job
/// whose `resources.memory` holds less than the guest's memory plus this gets
/// this much more, rather than a QEMU killed when its guest fills its memory.
/// Measured here (BENCHMARKS.md, `vm-boot.sh`): under TCG, the translation
/// cache (about 52 MiB resident for the tiny guest; a Debian guest with Docker
/// filled more than 128 MiB, so it is capped at [`super::qemu::TCG_TB_MIB`])
/// and the rest of QEMU (about 52 MiB); under KVM there is no translation
/// cache.
pub fn overhead(accel: Accel) -> u64 {
    match accel {
        Accel::Kvm => 64 << 20,
        Accel::Tcg => (super::qemu::TCG_TB_MIB + 128) << 20,
    }
}
/// The parent of every VM's cgroup (runc's containers share it).
const PARENT: &str = "novacron";

/// The limits of one VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// CPU, thousandths of a core (0: unlimited).
    pub cpu_millis: u64,
    /// Memory, bytes (0: unlimited).
    pub memory_bytes: u64,
}

impl Limits {
    /// The limits of a VM whose job reserves `cpu_millis` and `memory_bytes`
    /// (0: none) for a guest of `guest_mib` under `accel`.
    pub fn for_vm(cpu_millis: u64, memory_bytes: u64, guest_mib: u64, accel: Accel) -> Limits {
        Limits {
            cpu_millis,
            memory_bytes: match memory_bytes {
                0 => 0,
                m => m.max((guest_mib << 20).saturating_add(overhead(accel))),
            },
        }
    }

    /// Whether there is anything to limit.
    pub fn any(&self) -> bool {
        self.cpu_millis > 0 || self.memory_bytes > 0
    }

    /// The CFS quota per [`PERIOD_US`], µs (at least 1 ms, the kernel's
    /// floor); `None`: unlimited.
    pub fn quota_us(&self) -> Option<u64> {
        (self.cpu_millis > 0).then(|| (self.cpu_millis.saturating_mul(PERIOD_US) / 1000).max(1000))
    }

    /// The same limits as `systemd-run` properties.
    pub fn systemd_properties(&self) -> Vec<String> {
        let mut p = Vec::new();
        if self.memory_bytes > 0 {
            p.push(format!("--property=MemoryMax={}", self.memory_bytes));
        }
        if self.cpu_millis > 0 {
            // systemd's percent of one CPU, rounded up so that a small
            // request is never unlimited (0%).
            p.push(format!(
                "--property=CPUQuota={}%",
                self.cpu_millis.div_ceil(10)
            ));
        }
        p
    }
}

/// How the node's cgroups are mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One hierarchy per controller (`memory/`, `cpu/`).
    V1,
    /// The unified hierarchy.
    V2,
}

/// The node's layout under `root`, if it has cgroups at all.
pub fn detect(root: &Path) -> Option<Layout> {
    if root.join("cgroup.controllers").is_file() {
        Some(Layout::V2)
    } else if root.join("memory").is_dir() && root.join("cpu").is_dir() {
        Some(Layout::V1)
    } else {
        None
    }
}

/// What makes VM `id`'s cgroup: the directories to create, the files to
/// write (in order), and the `cgroup.procs` files its QEMU joins. Pure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Directories, parents first.
    pub dirs: Vec<PathBuf>,
    /// `(file, value)` writes, in order.
    pub writes: Vec<(PathBuf, String)>,
    /// The `cgroup.procs` files QEMU's process is written to.
    pub procs: Vec<PathBuf>,
}

/// The plan for VM `id` under `root`.
pub fn plan(layout: Layout, root: &Path, id: &str, limits: Limits) -> Plan {
    let mut p = Plan {
        dirs: Vec::new(),
        writes: Vec::new(),
        procs: Vec::new(),
    };
    match layout {
        Layout::V1 => {
            let memory = root.join("memory").join(PARENT).join(id);
            let cpu = root.join("cpu").join(PARENT).join(id);
            if limits.memory_bytes > 0 {
                p.dirs.push(memory.clone());
                p.writes.push((
                    memory.join("memory.limit_in_bytes"),
                    limits.memory_bytes.to_string(),
                ));
                p.procs.push(memory.join("cgroup.procs"));
            }
            if let Some(quota) = limits.quota_us() {
                p.dirs.push(cpu.clone());
                p.writes
                    .push((cpu.join("cpu.cfs_period_us"), PERIOD_US.to_string()));
                p.writes
                    .push((cpu.join("cpu.cfs_quota_us"), quota.to_string()));
                p.procs.push(cpu.join("cgroup.procs"));
            }
        }
        Layout::V2 => {
            let parent = root.join(PARENT);
            let own = parent.join(id);
            p.dirs.push(own.clone());
            // Both levels hand the controllers down (a write of a controller
            // already enabled is a no-op).
            for level in [root.to_path_buf(), parent] {
                p.writes
                    .push((level.join("cgroup.subtree_control"), "+cpu +memory".into()));
            }
            if limits.memory_bytes > 0 {
                p.writes
                    .push((own.join("memory.max"), limits.memory_bytes.to_string()));
                p.writes.push((own.join("memory.swap.max"), "0".into()));
            }
            if let Some(quota) = limits.quota_us() {
                p.writes
                    .push((own.join("cpu.max"), format!("{quota} {PERIOD_US}")));
            }
            p.procs.push(own.join("cgroup.procs"));
        }
    }
    p
}

/// Makes VM `id`'s cgroup with `limits` under [`ROOT`]; the `cgroup.procs`
/// files its QEMU must join. An error says what could not be written.
pub fn prepare(id: &str, limits: Limits) -> Result<Vec<PathBuf>, String> {
    let root = Path::new(ROOT);
    let layout = detect(root).ok_or_else(|| format!("no cgroup hierarchy under {ROOT}"))?;
    let plan = plan(layout, root, id, limits);
    for dir in &plan.dirs {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    for (file, value) in &plan.writes {
        match std::fs::write(file, value) {
            Ok(()) => {}
            // Swap accounting is optional.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    && file.ends_with("memory.swap.max") => {}
            Err(e) => return Err(format!("{} = {value}: {e}", file.display())),
        }
    }
    Ok(plan.procs)
}

/// Every directory VM `id`'s cgroup may have under `root`, whatever its
/// limits, children first. Pure.
pub fn dirs(layout: Layout, root: &Path, id: &str) -> Vec<PathBuf> {
    match layout {
        Layout::V1 => vec![
            root.join("memory").join(PARENT).join(id),
            root.join("cpu").join(PARENT).join(id),
        ],
        Layout::V2 => vec![root.join(PARENT).join(id)],
    }
}

/// Removes VM `id`'s cgroup directories (empty once its QEMU is gone).
pub fn remove(id: &str) {
    let root = Path::new(ROOT);
    let Some(layout) = detect(root) else { return };
    for dir in dirs(layout, root, id) {
        let _ = std::fs::remove_dir(dir);
    }
}

/// The program and arguments that start `program args` inside the cgroups
/// whose `cgroup.procs` files are `procs`: a shell writes its own pid to each
/// (failing with 125 if it cannot), then `exec`s the program.
pub fn wrap(procs: &[PathBuf], program: &str, args: &[String]) -> (String, Vec<String>) {
    let mut script = String::new();
    for p in procs {
        // The paths are the agent's own (`/sys/fs/cgroup/.../vm-<hex>`).
        script.push_str(&format!(
            "echo $$ > '{}' || exit 125; ",
            p.display().to_string().replace('\'', "")
        ));
    }
    script.push_str("exec \"$0\" \"$@\"");
    let mut argv = vec!["-c".to_owned(), script, program.to_owned()];
    argv.extend(args.iter().cloned());
    ("sh".to_owned(), argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_never_hold_less_than_the_guest_and_qemu() {
        let l = Limits::for_vm(500, 128 << 20, 128, Accel::Kvm);
        assert_eq!(l.memory_bytes, 192 << 20);
        // TCG's translation cache (capped at 128 MiB) needs more room.
        let tcg = Limits::for_vm(500, 192 << 20, 128, Accel::Tcg);
        assert_eq!(tcg.memory_bytes, 384 << 20);
        assert_eq!(
            Limits::for_vm(500, 1 << 30, 128, Accel::Tcg).memory_bytes,
            1 << 30
        );
        assert_eq!(Limits::for_vm(0, 0, 128, Accel::Tcg), Limits::default());
        assert!(!Limits::default().any());
        assert_eq!(l.quota_us(), Some(50_000));
        assert_eq!(Limits::for_vm(1, 0, 1, Accel::Kvm).quota_us(), Some(1000));
        assert_eq!(
            l.systemd_properties(),
            vec![
                format!("--property=MemoryMax={}", (192u64 << 20)),
                "--property=CPUQuota=50%".to_owned()
            ]
        );
        assert_eq!(
            Limits::for_vm(2500, 0, 64, Accel::Kvm).systemd_properties(),
            vec!["--property=CPUQuota=250%".to_owned()]
        );
    }

    #[test]
    fn v1_writes_each_controller_s_own_hierarchy() {
        let limits = Limits {
            cpu_millis: 1500,
            memory_bytes: 300 << 20,
        };
        let p = plan(Layout::V1, Path::new("/cg"), "vm-1", limits);
        let path = |s: &str| PathBuf::from(s);
        assert_eq!(
            p.writes,
            vec![
                (
                    path("/cg/memory/novacron/vm-1/memory.limit_in_bytes"),
                    (300u64 << 20).to_string()
                ),
                (
                    path("/cg/cpu/novacron/vm-1/cpu.cfs_period_us"),
                    "100000".into()
                ),
                (
                    path("/cg/cpu/novacron/vm-1/cpu.cfs_quota_us"),
                    "150000".into()
                ),
            ]
        );
        assert_eq!(
            p.procs,
            vec![
                path("/cg/memory/novacron/vm-1/cgroup.procs"),
                path("/cg/cpu/novacron/vm-1/cgroup.procs")
            ]
        );
        // Only what is limited is joined.
        let cpu_only = plan(
            Layout::V1,
            Path::new("/cg"),
            "vm-1",
            Limits {
                cpu_millis: 100,
                memory_bytes: 0,
            },
        );
        assert_eq!(
            cpu_only.procs,
            vec![path("/cg/cpu/novacron/vm-1/cgroup.procs")]
        );
        // A removal covers every directory a plan may make, whatever the
        // limits were.
        for layout in [Layout::V1, Layout::V2] {
            let all = dirs(layout, Path::new("/cg"), "vm-1");
            for limits in [limits, Limits::default(), cpu_only_limits()] {
                for d in plan(layout, Path::new("/cg"), "vm-1", limits).dirs {
                    assert!(all.contains(&d), "{d:?} is not in {all:?}");
                }
            }
        }
    }

    fn cpu_only_limits() -> Limits {
        Limits {
            cpu_millis: 100,
            memory_bytes: 0,
        }
    }

    #[test]
    fn v2_hands_the_controllers_down_and_writes_one_group() {
        let limits = Limits {
            cpu_millis: 250,
            memory_bytes: 256 << 20,
        };
        let p = plan(Layout::V2, Path::new("/cg"), "vm-2", limits);
        let path = |s: &str| PathBuf::from(s);
        assert_eq!(p.dirs, vec![path("/cg/novacron/vm-2")]);
        assert_eq!(
            p.writes,
            vec![
                (path("/cg/cgroup.subtree_control"), "+cpu +memory".into()),
                (
                    path("/cg/novacron/cgroup.subtree_control"),
                    "+cpu +memory".into()
                ),
                (
                    path("/cg/novacron/vm-2/memory.max"),
                    (256u64 << 20).to_string()
                ),
                (path("/cg/novacron/vm-2/memory.swap.max"), "0".into()),
                (path("/cg/novacron/vm-2/cpu.max"), "25000 100000".into()),
            ]
        );
        assert_eq!(p.procs, vec![path("/cg/novacron/vm-2/cgroup.procs")]);
    }

    #[test]
    fn the_wrapper_joins_every_group_then_execs_the_program() {
        let (program, argv) = wrap(
            &[
                PathBuf::from("/cg/a/cgroup.procs"),
                PathBuf::from("/cg/b/cgroup.procs"),
            ],
            "/usr/bin/qemu-system-x86_64",
            &["-m".to_owned(), "128".to_owned()],
        );
        assert_eq!(program, "sh");
        assert_eq!(
            argv,
            vec![
                "-c",
                "echo $$ > '/cg/a/cgroup.procs' || exit 125; echo $$ > '/cg/b/cgroup.procs' || exit 125; exec \"$0\" \"$@\"",
                "/usr/bin/qemu-system-x86_64",
                "-m",
                "128"
            ]
        );
    }

    #[test]
    fn the_wrapper_runs_the_program_with_its_arguments() {
        let dir = tempfile::tempdir().expect("tempdir");
        let procs = dir.path().join("cgroup.procs");
        let (program, argv) = wrap(
            std::slice::from_ref(&procs),
            "echo",
            &["a b".to_owned(), "c".to_owned()],
        );
        let out = std::process::Command::new(program)
            .args(&argv)
            .output()
            .expect("sh");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a b c\n");
        let pid: u32 = std::fs::read_to_string(&procs)
            .expect("written")
            .trim()
            .parse()
            .expect("a pid");
        assert!(pid > 0);
    }
}

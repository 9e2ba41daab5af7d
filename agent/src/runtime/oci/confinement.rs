//! Whether the agent may be the container runtime from where it runs.
//!
//! runc and CRIU run as the agent's children and the containers inherit what
//! confines the agent: its system-call filter, `no_new_privs` and its
//! capability bounding set bind every workload, and a private mount namespace
//! hides, after the agent restarts, the root file systems and network
//! namespaces the agent bound for its containers. The packaged unit confines
//! the agent that way on purpose (for Docker, which starts containers itself);
//! runc needs its drop-in, and the agent refuses to start under runc without
//! it rather than run containers that break in ways no one would trace back
//! here. Pure: [`problems`] reads a snapshot that [`current`] takes.

use std::path::Path;

/// Where the packaged drop-in that lifts the confinement is installed from.
pub const DROPIN: &str = "/usr/share/novacron-agent/systemd/runc.conf";

/// Capabilities runc and CRIU need, with their names: CAP_SYS_ADMIN (21) and
/// CAP_SYS_PTRACE (19). CRIU takes CAP_SYS_ADMIN for CAP_CHECKPOINT_RESTORE,
/// which older kernels and some container engines do not grant.
const NEEDED: [(u32, &str); 2] = [(21, "CAP_SYS_ADMIN"), (19, "CAP_SYS_PTRACE")];

/// What confines a process, as `/proc/self/status` and the mount namespace
/// links tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// `/proc/self/status`.
    pub status: String,
    /// `readlink /proc/self/ns/mnt`.
    pub own_mnt: Option<String>,
    /// `readlink /proc/1/ns/mnt`: unreadable without privileges, then `None`.
    pub init_mnt: Option<String>,
}

/// This process's snapshot.
pub fn current() -> Snapshot {
    let link = |p: &str| {
        std::fs::read_link(Path::new(p))
            .ok()
            .map(|l| l.display().to_string())
    };
    Snapshot {
        status: std::fs::read_to_string("/proc/self/status").unwrap_or_default(),
        own_mnt: link("/proc/self/ns/mnt"),
        init_mnt: link("/proc/1/ns/mnt"),
    }
}

fn field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// What in `s` keeps runc containers from running as they should; empty when
/// nothing does. What cannot be read is not held against the agent.
pub fn problems(s: &Snapshot) -> Vec<String> {
    let mut found = Vec::new();
    if let Some(bounding) = field(&s.status, "CapBnd").and_then(|v| u64::from_str_radix(v, 16).ok())
    {
        let missing: Vec<&str> = NEEDED
            .iter()
            .filter(|(bit, _)| bounding & (1u64 << bit) == 0)
            .map(|(_, name)| *name)
            .collect();
        if !missing.is_empty() {
            found.push(format!(
                "its capability bounding set lacks {}",
                missing.join(", ")
            ));
        }
    }
    if field(&s.status, "Seccomp").is_some_and(|v| v != "0") {
        found.push(
            "it runs under a system-call filter that every container would inherit".to_owned(),
        );
    }
    if field(&s.status, "NoNewPrivs") == Some("1") {
        found.push(
            "no_new_privs is set, so setuid programs in the containers would not work".to_owned(),
        );
    }
    if let (Some(own), Some(init)) = (&s.own_mnt, &s.init_mnt)
        && own != init
    {
        found.push(format!(
            "it runs in a mount namespace of its own ({own}, the host's is {init}), which would hide its containers' mounts after a restart"
        ));
    }
    found
}

/// The refusal for `problems`, or `None` when there are none.
pub fn refusal(problems: &[String]) -> Option<String> {
    if problems.is_empty() {
        return None;
    }
    Some(format!(
        "the agent is confined: {}. Under the packaged unit, run install-agent.sh --runc, or link {DROPIN} into /etc/systemd/system/novacron-agent.service.d/ and run systemctl daemon-reload and systemctl restart novacron-agent",
        problems.join("; ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(status: &str, own: &str, init: &str) -> Snapshot {
        Snapshot {
            status: status.to_owned(),
            own_mnt: Some(own.to_owned()),
            init_mnt: Some(init.to_owned()),
        }
    }

    // As the packaged unit runs the agent: CAP_DAC_OVERRIDE, CAP_FOWNER and
    // CAP_MKNOD, NoNewPrivs, its filter, a mount namespace of its own.
    const UNIT: &str = "Name:\tnovacron-agent\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t3\nCapBnd:\t000000000800000a\n";
    // As root in the host's namespaces with every capability.
    const ROOT: &str =
        "Name:\tnovacron-agent\nNoNewPrivs:\t0\nSeccomp:\t0\nCapBnd:\t000001ffffffffff\n";

    #[test]
    fn the_packaged_unit_s_confinement_is_named_in_full() {
        let found = problems(&snapshot(UNIT, "mnt:[2]", "mnt:[1]"));
        assert_eq!(found.len(), 4, "{found:?}");
        assert!(
            found[0].contains("lacks CAP_SYS_ADMIN, CAP_SYS_PTRACE"),
            "{}",
            found[0]
        );
        assert!(found[1].contains("system-call filter"));
        assert!(found[2].contains("no_new_privs"));
        assert!(found[3].contains("mount namespace of its own (mnt:[2]"));
        let text = refusal(&found).expect("a refusal");
        assert!(text.contains("install-agent.sh --runc"), "{text}");
        assert!(text.contains(DROPIN), "{text}");
    }

    #[test]
    fn root_in_the_host_s_namespaces_may_run_runc() {
        let found = problems(&snapshot(ROOT, "mnt:[1]", "mnt:[1]"));
        assert!(found.is_empty(), "{found:?}");
        assert_eq!(refusal(&found), None);
    }

    #[test]
    fn each_confinement_alone_is_refused() {
        let one_cap = ROOT.replace("000001ffffffffff", "000001ffffdfffff");
        assert_eq!(
            problems(&snapshot(&one_cap, "m", "m")),
            ["its capability bounding set lacks CAP_SYS_ADMIN"]
        );
        let filtered = ROOT.replace("Seccomp:\t0", "Seccomp:\t2");
        assert_eq!(problems(&snapshot(&filtered, "m", "m")).len(), 1);
        let nnp = ROOT.replace("NoNewPrivs:\t0", "NoNewPrivs:\t1");
        assert_eq!(problems(&snapshot(&nnp, "m", "m")).len(), 1);
        assert_eq!(problems(&snapshot(ROOT, "a", "b")).len(), 1);
    }

    #[test]
    fn what_cannot_be_read_is_not_held_against_the_agent() {
        // No CAP_CHECKPOINT_RESTORE (an engine that grants only the first 38
        // capabilities), PID 1's namespace unreadable, no status at all.
        let s = Snapshot {
            status: "NoNewPrivs:\t0\nSeccomp:\t0\nCapBnd:\t0000003ffeffffff\n".to_owned(),
            own_mnt: Some("mnt:[1]".to_owned()),
            init_mnt: None,
        };
        assert!(problems(&s).is_empty(), "{:?}", problems(&s));
        assert!(problems(&snapshot("", "m", "m")).is_empty());
    }

    #[test]
    fn this_process_can_be_read() {
        let s = current();
        assert!(s.status.contains("CapBnd:"), "{}", s.status);
        assert!(s.own_mnt.as_deref().is_some_and(|l| l.starts_with("mnt:[")));
    }
}

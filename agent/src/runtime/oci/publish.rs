//! The published ports of agent-owned containers, as DNAT rules of the
//! agent's own instead of Docker's: the sandbox ([`super`]) is created with
//! no port, so that a live migration's target starts its sandbox while the
//! source still serves (on the same host, too, where Docker would refuse a
//! second binding of the port), and the ports move with one rule change
//! once the container runs there.
//!
//! - **A chain per agent** in the `nat` table ([`Publisher::chain`], named by
//!   a hash of the driver's directory), replaced whole with `iptables-restore`
//!   whenever a container starts, is restored, stops or freezes for a
//!   migration; jumped to for traffic to the node's own addresses, from
//!   outside (`PREROUTING`) and from the node itself (`OUTPUT`, loopback
//!   included).
//! - **Loopback:** a port published on `127.0.0.1` needs `route_localnet` on
//!   the interface towards the sandbox (Docker's bridge) and masquerading of
//!   loopback-sourced traffic to the sandbox (a second chain,
//!   [`Publisher::masquerade_chain`], from `POSTROUTING`).
//! - **From other hosts:** forwarded connections that a DNAT rule sent are
//!   accepted in `FORWARD`, ahead of Docker's `DROP` policy.
//! - The rules live in the kernel: ports keep forwarding while the agent
//!   restarts. The fixed rules name the agent's directory in their comment;
//!   an agent's start removes the rules and chains of agents whose directory
//!   is gone ([`stale`]: a test's, an uninstalled one's). Nothing listens on the host's port (as with Docker's
//!   `--userland-proxy=false`); the scheduler's port assignment keeps two
//!   allocations apart.

use std::net::Ipv4Addr;
use std::path::Path;

use tracing::info;

use crate::runtime::netfilter::{self, Dnat};

/// The comment on the fixed rules.
pub const COMMENT: &str = "novacron-oci-ports";

/// One agent's published ports of its runc containers.
#[derive(Debug)]
pub struct Publisher {
    key: String,
    /// The comment on its fixed rules: [`COMMENT`], `:`, the directory.
    tag: String,
}

impl Publisher {
    /// The publisher of the driver that keeps its state in `dir` (two agents
    /// of one host have two directories, so two chains).
    pub fn new(dir: &Path) -> Publisher {
        let mut h: u32 = 0x811c_9dc5;
        for b in dir.display().to_string().bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        let tag = format!("{COMMENT}:{}", dir.display());
        Publisher {
            key: format!("{h:08X}"),
            // iptables keeps 256 bytes of a comment; a longer path is left
            // out (and its rules never swept).
            tag: if tag.len() < 256 && !tag.contains(['"', '\n']) {
                tag
            } else {
                COMMENT.to_owned()
            },
        }
    }

    /// The `nat` chain of the DNAT rules.
    pub fn chain(&self) -> String {
        format!("NOVACRON-OCI-{}", self.key)
    }

    /// The `nat` chain that masquerades loopback-sourced traffic to sandboxes.
    pub fn masquerade_chain(&self) -> String {
        format!("NOVACRON-OCIM-{}", self.key)
    }

    /// The fixed rules, each `(table, chain, rule)`. Pure.
    pub fn base_rules(&self) -> Vec<(&'static str, &'static str, Vec<String>)> {
        let (chain, masq) = (self.chain(), self.masquerade_chain());
        let tagged = |rule: String| netfilter::tagged(&rule, &self.tag);
        let mut rules = netfilter::local_jumps(&chain, &self.tag).to_vec();
        rules.extend([
            ("nat", "POSTROUTING", tagged(format!("-j {masq}"))),
            (
                "filter",
                "FORWARD",
                tagged("-m conntrack --ctstate DNAT -j ACCEPT".to_owned()),
            ),
        ]);
        rules
    }

    /// The `iptables-restore` input that makes the two chains hold exactly
    /// what `forwards` needs. Pure.
    pub fn table(&self, forwards: &[Dnat]) -> String {
        let masq = self.masquerade_chain();
        let mut out = format!(
            "*nat\n{}:{masq} - [0:0]\n",
            netfilter::dnat_chain(&self.chain(), forwards)
        );
        let mut targets: Vec<Ipv4Addr> = forwards.iter().map(|f| f.to).collect();
        targets.sort();
        targets.dedup();
        for to in targets {
            out.push_str(&format!(
                "-A {masq} -s 127.0.0.0/8 -d {to}/32 -j MASQUERADE\n"
            ));
        }
        out.push_str("COMMIT\n");
        out
    }

    /// Makes the chains and the fixed rules where missing; `Err` says why
    /// runc containers cannot publish ports here.
    pub async fn setup(&self) -> Result<(), String> {
        sweep().await;
        netfilter::ensure(
            &[("nat", self.chain()), ("nat", self.masquerade_chain())],
            self.base_rules(),
        )
        .await?;
        info!(chain = %self.chain(), "runc containers' ports are published by this chain");
        Ok(())
    }

    /// Replaces the published ports with `forwards`, at once; turns on
    /// `route_localnet` towards each target first where a port is published
    /// on loopback.
    pub async fn set(&self, forwards: &[Dnat]) -> Result<(), String> {
        let mut done: Vec<Ipv4Addr> = Vec::new();
        for f in forwards {
            if done.contains(&f.to) || !(f.publish.is_loopback() || f.publish.is_unspecified()) {
                continue;
            }
            done.push(f.to);
            let route = netfilter::output(
                "ip",
                &["-o".into(), "route".into(), "get".into(), f.to.to_string()],
            )
            .await?;
            let dev = route_device(&route)
                .ok_or_else(|| format!("no interface routes to {}: {}", f.to, route.trim()))?;
            let path = format!("/proc/sys/net/ipv4/conf/{dev}/route_localnet");
            if !std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
                std::fs::write(&path, "1").map_err(|e| {
                    format!("cannot turn on loopback-published ports ({path}): {e}")
                })?;
            }
        }
        netfilter::restore(&self.table(forwards)).await
    }
}

/// Removes the fixed rules and the chains of agents whose directory is gone
/// ([`stale`]).
pub async fn sweep() {
    for table in ["nat", "filter"] {
        let Ok(listing) = netfilter::run(
            "iptables",
            &["-t".to_owned(), table.to_owned(), "-S".to_owned()],
        )
        .await
        else {
            continue;
        };
        let (rules, chains) = stale(&listing, |dir| dir.exists());
        for rule in rules {
            let mut delete = vec!["-t".to_owned(), table.to_owned(), "-D".to_owned()];
            delete.extend(rule);
            if let Err(e) = netfilter::run("iptables", &delete).await {
                tracing::warn!(error = %e, "cannot remove a rule of an agent that is gone");
            }
        }
        for chain in chains {
            for op in ["-F", "-X"] {
                let _ = netfilter::run(
                    "iptables",
                    &[
                        "-t".to_owned(),
                        table.to_owned(),
                        op.to_owned(),
                        chain.clone(),
                    ],
                )
                .await;
            }
            info!(%chain, "removed the published ports of an agent that is gone");
        }
    }
}

/// What `iptables -t TABLE -S` (`listing`) holds of agents whose directory
/// no longer exists (`exists` says): the fixed rules, each as the words after
/// `-D`, and the chains they jump to (the other chain of such an agent is
/// named after the same key). Pure.
pub fn stale(listing: &str, exists: impl Fn(&Path) -> bool) -> (Vec<Vec<String>>, Vec<String>) {
    let prefix = format!("{COMMENT}:");
    let (mut rules, mut chains) = (Vec::new(), Vec::new());
    for line in listing.lines() {
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        let Some(words) = netfilter::shell_words(rest) else {
            continue;
        };
        let comment = words
            .iter()
            .position(|w| w == "--comment")
            .and_then(|i| words.get(i + 1));
        let Some(dir) = comment.and_then(|c| c.strip_prefix(&prefix)) else {
            continue;
        };
        if exists(Path::new(dir)) {
            continue;
        }
        if let Some(target) = words
            .iter()
            .position(|w| w == "-j")
            .and_then(|i| words.get(i + 1))
            && let Some(key) = target
                .strip_prefix("NOVACRON-OCI-")
                .or_else(|| target.strip_prefix("NOVACRON-OCIM-"))
        {
            for chain in [
                format!("NOVACRON-OCI-{key}"),
                format!("NOVACRON-OCIM-{key}"),
            ] {
                if !chains.contains(&chain) {
                    chains.push(chain);
                }
            }
        }
        rules.push(words);
    }
    (rules, chains)
}

/// The interface of `ip -o route get ADDR`'s answer (`… dev NAME …`). Pure.
pub fn route_device(answer: &str) -> Option<&str> {
    let mut words = answer.split_whitespace();
    while let Some(w) = words.next() {
        if w == "dev" {
            // A name the kernel takes, and never a path.
            return words
                .next()
                .filter(|d| d.len() <= 15 && !d.contains('/') && !matches!(*d, "." | ".."));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dnat(owner: &str, publish: Ipv4Addr, host_port: u16, to: Ipv4Addr) -> Dnat {
        Dnat {
            owner: owner.into(),
            publish,
            host_port,
            to,
            to_port: 8080,
            udp: false,
        }
    }

    #[test]
    fn two_agents_of_one_host_have_two_chains_that_fit_iptables_names() {
        let a = Publisher::new(Path::new("/var/lib/novacron/a/oci"));
        let b = Publisher::new(Path::new("/var/lib/novacron/b/oci"));
        assert_ne!(a.chain(), b.chain());
        assert_ne!(a.masquerade_chain(), b.masquerade_chain());
        for name in [a.chain(), a.masquerade_chain()] {
            assert!(name.len() <= 28, "{name}");
        }
        assert_eq!(
            a.chain(),
            Publisher::new(Path::new("/var/lib/novacron/a/oci")).chain()
        );
    }

    #[test]
    fn the_table_forwards_each_port_and_masquerades_loopback_once_per_sandbox() {
        let p = Publisher::new(Path::new("/x"));
        let (chain, masq) = (p.chain(), p.masquerade_chain());
        let sandbox = Ipv4Addr::new(172, 18, 0, 2);
        let table = p.table(&[
            dnat("oci-1", Ipv4Addr::LOCALHOST, 20000, sandbox),
            dnat("oci-1", Ipv4Addr::LOCALHOST, 20001, sandbox),
        ]);
        assert_eq!(
            table,
            format!(
                "*nat\n:{chain} - [0:0]\n\
                 -A {chain} -d 127.0.0.1/32 -p tcp -m tcp --dport 20000 -m comment --comment \"oci-1\" -j DNAT --to-destination 172.18.0.2:8080\n\
                 -A {chain} -d 127.0.0.1/32 -p tcp -m tcp --dport 20001 -m comment --comment \"oci-1\" -j DNAT --to-destination 172.18.0.2:8080\n\
                 :{masq} - [0:0]\n\
                 -A {masq} -s 127.0.0.0/8 -d 172.18.0.2/32 -j MASQUERADE\n\
                 COMMIT\n"
            )
        );
        assert_eq!(
            p.table(&[]),
            format!("*nat\n:{chain} - [0:0]\n:{masq} - [0:0]\nCOMMIT\n"),
            "nothing published: both chains empty"
        );
    }

    #[test]
    fn the_fixed_rules_are_tagged_and_jump_to_the_agent_s_chains() {
        let p = Publisher::new(Path::new("/x"));
        let rules = p.base_rules();
        assert_eq!(rules.len(), 4);
        for (_, _, rule) in &rules {
            assert!(
                rule.join(" ")
                    .contains(&format!("--comment {COMMENT}:/x -j"))
            );
        }
        assert!(rules[1].2.join(" ").ends_with(&format!("-j {}", p.chain())));
        assert!(
            rules[2]
                .2
                .join(" ")
                .ends_with(&format!("-j {}", p.masquerade_chain()))
        );
    }

    #[test]
    fn the_rules_of_an_agent_whose_directory_is_gone_are_found_with_its_chains() {
        let gone = Publisher::new(Path::new("/tmp/agent-gone/oci"));
        let here = Publisher::new(Path::new("/var/lib/novacron/oci"));
        let listing = format!(
            "-P OUTPUT ACCEPT\n\
             -N {gone_chain}\n\
             -A OUTPUT -m addrtype --dst-type LOCAL -m comment --comment \"novacron-oci-ports:/tmp/agent-gone/oci\" -j {gone_chain}\n\
             -A OUTPUT -m addrtype --dst-type LOCAL -m comment --comment \"novacron-oci-ports:/var/lib/novacron/oci\" -j {here_chain}\n\
             -A POSTROUTING -m comment --comment \"novacron-oci-ports:/tmp/agent-gone/oci\" -j {gone_masq}\n\
             -A {gone_chain} -p tcp -m tcp --dport 1 -m comment --comment \"oci-1\" -j DNAT --to-destination 10.0.0.2:80\n\
             -A OUTPUT -m comment --comment \"novacron-vm-bridge\" -j NOVACRON-NCVM1\n",
            gone_chain = gone.chain(),
            gone_masq = gone.masquerade_chain(),
            here_chain = here.chain(),
        );
        let (rules, chains) = stale(&listing, |dir| dir == Path::new("/var/lib/novacron/oci"));
        assert_eq!(rules.len(), 2, "{rules:?}");
        assert_eq!(
            rules[0].join(" "),
            format!(
                "OUTPUT -m addrtype --dst-type LOCAL -m comment --comment novacron-oci-ports:/tmp/agent-gone/oci -j {}",
                gone.chain()
            )
        );
        assert_eq!(chains, vec![gone.chain(), gone.masquerade_chain()]);
        let (none, no_chains) = stale(&listing, |_| true);
        assert!(none.is_empty() && no_chains.is_empty());
    }

    #[test]
    fn the_route_s_interface_is_read_from_ip_s_answer() {
        assert_eq!(
            route_device("172.18.0.2 dev ncbr-b src 172.18.0.1 uid 0 \\    cache "),
            Some("ncbr-b")
        );
        assert_eq!(
            route_device("local 127.0.0.1 dev lo src 127.0.0.1"),
            Some("lo")
        );
        assert_eq!(route_device("172.18.0.2 via 10.0.0.1"), None);
        assert_eq!(route_device("x dev ../../etc"), None, "never a path");
    }
}

//! CRIU's page server listens on every address: in lazy mode runc passes it
//! only a port, so a post-copy source serves the frozen container's memory to
//! whoever connects from any host. The agent itself connects over loopback, so
//! while a page server listens a [`PortGuard`] drops TCP packets to its port
//! that arrive on any interface but `lo` (an `iptables` rule, and an
//! `ip6tables` one where IPv6 is on, tagged [`COMMENT`] and the process that
//! wrote it). A node where the rules cannot be written does not offer
//! post-copy ([`usable`]); rules left by an agent that died mid-migration are
//! removed at the next start of an agent on the node ([`sweep`]), and only
//! those: another agent's live rules on the same host stay.

use tracing::{info, warn};

use crate::runtime::netfilter::{CALL_TIMEOUT, run, shell_words};

/// The comment that tags the agent's rules.
pub const COMMENT: &str = "novacron-page-server";

/// The tools that write the node's packet filters: `iptables`, and
/// `ip6tables` where IPv6 is on.
fn tools() -> Vec<&'static str> {
    let mut t = vec!["iptables"];
    if std::path::Path::new("/proc/net/if_inet6").exists() {
        t.push("ip6tables");
    }
    t
}

/// The rule's arguments after `-I INPUT`/`-D INPUT`: TCP to `port` on any
/// interface but loopback is dropped; the comment names the process `owner`
/// that wrote it (`novacron-page-server:PID`). Pure.
pub fn rule(port: u16, owner: u32) -> Vec<String> {
    let comment = format!("{COMMENT}:{owner}");
    [
        "-p",
        "tcp",
        "--dport",
        &port.to_string(),
        "!",
        "-i",
        "lo",
        "-m",
        "comment",
        "--comment",
        &comment,
        "-j",
        "DROP",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

/// The `-D INPUT` arguments that remove the tagged rules of `listing`
/// (`iptables -S INPUT`'s output) whose owner is not `alive` (or that name
/// none, as an earlier version wrote them). Pure.
pub fn leftovers(listing: &str, alive: impl Fn(u32) -> bool) -> Vec<Vec<String>> {
    listing
        .lines()
        .filter(|l| l.starts_with("-A INPUT ") && l.contains(COMMENT))
        .filter_map(|l| shell_words(l.trim_start_matches("-A INPUT ")))
        .filter(|words| {
            let owner = words
                .iter()
                .find_map(|w| w.strip_prefix(COMMENT)?.strip_prefix(':')?.parse().ok());
            !owner.is_some_and(&alive)
        })
        .collect()
}

/// Whether process `pid` runs on this host.
fn running(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether the agent can write the node's packet filters (it can list them);
/// why not, otherwise.
pub async fn usable() -> Result<(), String> {
    for tool in tools() {
        run(tool, &["-S".to_owned(), "INPUT".to_owned()]).await?;
    }
    Ok(())
}

/// Removes the rules an earlier run of an agent left (it died while a page
/// server listened); a running process's rules stay.
pub async fn sweep() {
    for tool in tools() {
        let Ok(listing) = run(tool, &["-S".to_owned(), "INPUT".to_owned()]).await else {
            continue;
        };
        for words in leftovers(&listing, running) {
            let mut args = vec!["-D".to_owned(), "INPUT".to_owned()];
            args.extend(words);
            match run(tool, &args).await {
                Ok(_) => info!(%tool, "removed a page-server rule an earlier run left"),
                Err(e) => {
                    warn!(%tool, error = %e, "cannot remove a page-server rule an earlier run left")
                }
            }
        }
    }
}

/// The rules that close one port to other hosts, until [`PortGuard::disarm`]
/// (or its drop, on a thread of its own).
#[derive(Debug)]
pub struct PortGuard {
    port: u16,
    armed: Vec<&'static str>,
}

impl PortGuard {
    /// Closes `port` to every interface but loopback. Fails, writing nothing,
    /// when a rule cannot be written.
    pub async fn arm(port: u16) -> Result<PortGuard, String> {
        let mut guard = PortGuard {
            port,
            armed: Vec::new(),
        };
        for tool in tools() {
            let mut args = vec!["-I".to_owned(), "INPUT".to_owned(), "1".to_owned()];
            args.extend(rule(port, std::process::id()));
            if let Err(e) = run(tool, &args).await {
                guard.disarm().await;
                return Err(format!(
                    "cannot close the page server's port {port} to other hosts: {e}"
                ));
            }
            guard.armed.push(tool);
        }
        Ok(guard)
    }

    /// The guarded port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Removes the rules.
    pub async fn disarm(mut self) {
        for tool in std::mem::take(&mut self.armed) {
            let mut args = vec!["-D".to_owned(), "INPUT".to_owned()];
            args.extend(rule(self.port, std::process::id()));
            if let Err(e) = run(tool, &args).await {
                warn!(%tool, port = self.port, error = %e, "cannot remove the page server's rule; the agent's next start does");
            }
        }
    }
}

impl Drop for PortGuard {
    fn drop(&mut self) {
        let armed = std::mem::take(&mut self.armed);
        if armed.is_empty() {
            return;
        }
        let port = self.port;
        // Not on the async workers: a thread of its own runs the removals.
        let _ = std::thread::Builder::new()
            .name("novacron-unguard".into())
            .spawn(move || {
                for tool in armed {
                    let mut args = vec![
                        "-w".to_owned(),
                        CALL_TIMEOUT.as_secs().to_string(),
                        "-D".to_owned(),
                        "INPUT".to_owned(),
                    ];
                    args.extend(rule(port, std::process::id()));
                    let _ = std::process::Command::new(tool).args(&args).output();
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_drops_the_port_on_every_interface_but_loopback() {
        assert_eq!(
            rule(41234, 77).join(" "),
            "-p tcp --dport 41234 ! -i lo -m comment --comment novacron-page-server:77 -j DROP"
        );
    }

    #[test]
    fn left_overs_are_the_tagged_rules_of_processes_gone() {
        let listing = "-P INPUT ACCEPT\n\
            -A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\n\
            -A INPUT ! -i lo -p tcp -m tcp --dport 41234 -m comment --comment \"novacron-page-server\" -j DROP\n\
            -A INPUT ! -i lo -p tcp -m tcp --dport 41235 -m comment --comment \"novacron-page-server:12\" -j DROP\n\
            -A INPUT ! -i lo -p tcp -m tcp --dport 41236 -m comment --comment \"novacron-page-server:34\" -j DROP\n\
            -A INPUT -s 10.0.0.0/8 -m comment --comment \"someone else's rule\" -j ACCEPT\n";
        let words = |l: &str| l.split(' ').map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            leftovers(listing, |pid| pid == 34),
            vec![
                words(
                    "! -i lo -p tcp -m tcp --dport 41234 -m comment --comment novacron-page-server -j DROP"
                ),
                words(
                    "! -i lo -p tcp -m tcp --dport 41235 -m comment --comment novacron-page-server:12 -j DROP"
                ),
            ]
        );
        assert_eq!(leftovers(listing, |_| false).len(), 3);
        assert!(leftovers("-P INPUT ACCEPT\n", |_| false).is_empty());
        assert!(running(std::process::id()));
    }
}

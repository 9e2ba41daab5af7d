//! The node's packet filter, written with `iptables` (and `iptables-restore`
//! for a chain replaced at once): the page server's guard
//! ([`super::oci::guard`]), and the published ports ([`Dnat`]) of the VM
//! bridge ([`super::vm::bridge`]) and of agent-owned containers
//! ([`super::oci::publish`]). Each call is bounded in time and waits for the
//! xtables lock for at most as long. The `ip` calls go through [`output`] too.

use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

/// The longest one call may take (`iptables` waits for the xtables lock).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `tool -w SECS args`; its standard output, or what it said when it
/// failed.
pub async fn run(tool: &str, args: &[String]) -> Result<String, String> {
    let mut all = vec!["-w".to_owned(), CALL_TIMEOUT.as_secs().to_string()];
    all.extend(args.iter().cloned());
    output(tool, &all).await
}

/// Runs `program args` for at most [`CALL_TIMEOUT`]; its standard output, or
/// what it said when it failed.
pub async fn output(program: &str, args: &[String]) -> Result<String, String> {
    let out = tokio::time::timeout(
        CALL_TIMEOUT,
        Command::new(program).args(args).kill_on_drop(true).output(),
    )
    .await
    .map_err(|_| {
        format!(
            "{program} did not answer within {} s",
            CALL_TIMEOUT.as_secs()
        )
    })?
    .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Feeds `input` to `iptables-restore --noflush`: the chains it declares are
/// replaced whole, in one transaction, and the rest of the tables is left as
/// it is.
pub async fn restore(input: &str) -> Result<(), String> {
    let tool = "iptables-restore";
    let work = async {
        let mut child = Command::new(tool)
            .arg("-w")
            .arg(CALL_TIMEOUT.as_secs().to_string())
            .arg("--noflush")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("{tool}: {e}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .await
                .map_err(|e| format!("{tool}: {e}"))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(|e| format!("{tool}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{tool}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, work)
        .await
        .map_err(|_| format!("{tool} did not answer within {} s", CALL_TIMEOUT.as_secs()))?
}

/// One published port as a DNAT rule: TCP (or UDP) to `publish:host_port`
/// (any of the node's addresses for `0.0.0.0`) goes to `to:to_port`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dnat {
    /// Whose it is (a VM's or a container's id), the rule's comment.
    pub owner: String,
    /// The node's address it is published on.
    pub publish: Ipv4Addr,
    /// The node's port.
    pub host_port: u16,
    /// Where it goes.
    pub to: Ipv4Addr,
    /// The port there.
    pub to_port: u16,
    /// UDP instead of TCP.
    pub udp: bool,
}

/// The `iptables-restore` lines (inside `*nat` … `COMMIT`) that make chain
/// `chain` hold exactly `forwards`. Pure.
pub fn dnat_chain(chain: &str, forwards: &[Dnat]) -> String {
    let mut out = format!(":{chain} - [0:0]\n");
    for f in forwards {
        let proto = if f.udp { "udp" } else { "tcp" };
        out.push_str(&format!("-A {chain}"));
        if !f.publish.is_unspecified() {
            out.push_str(&format!(" -d {}/32", f.publish));
        }
        out.push_str(&format!(
            " -p {proto} -m {proto} --dport {} -m comment --comment \"{}\" -j DNAT --to-destination {}:{}\n",
            f.host_port, f.owner, f.to, f.to_port
        ));
    }
    out
}

/// The words of `rule` with `-m comment --comment COMMENT` before its `-j`,
/// so that the agent knows its own rules. Pure.
pub fn tagged(rule: &str, comment: &str) -> Vec<String> {
    let mut w: Vec<String> = rule.split(' ').map(str::to_owned).collect();
    let at = w.iter().position(|x| x == "-j").unwrap_or(w.len());
    w.splice(
        at..at,
        ["-m", "comment", "--comment", comment].map(str::to_owned),
    );
    w
}

/// The jumps from `nat`'s `PREROUTING` (traffic from elsewhere) and `OUTPUT`
/// (this host's own) to `chain` for packets to this host's own addresses,
/// tagged with `comment`: where published ports' DNAT chains hang. Pure.
pub fn local_jumps(chain: &str, comment: &str) -> [(&'static str, &'static str, Vec<String>); 2] {
    let jump = format!("-m addrtype --dst-type LOCAL -j {chain}");
    [
        ("nat", "PREROUTING", tagged(&jump, comment)),
        ("nat", "OUTPUT", tagged(&jump, comment)),
    ]
}

/// Makes each chain of `chains` (`(table, name)`) where missing, then adds
/// each rule of `rules` (`(table, built-in chain, rule)`) at the top of its
/// chain where `iptables -C` does not find it.
pub async fn ensure(
    chains: &[(&str, String)],
    rules: Vec<(&'static str, &'static str, Vec<String>)>,
) -> Result<(), String> {
    let words = |items: &[&str]| -> Vec<String> { items.iter().map(|s| (*s).to_owned()).collect() };
    for (table, chain) in chains {
        if run("iptables", &words(&["-t", table, "-S", chain]))
            .await
            .is_err()
        {
            run("iptables", &words(&["-t", table, "-N", chain])).await?;
        }
    }
    for (table, builtin, rule) in rules {
        let mut check = words(&["-t", table, "-C", builtin]);
        check.extend(rule.iter().cloned());
        if run("iptables", &check).await.is_ok() {
            continue;
        }
        let mut insert = words(&["-t", table, "-I", builtin, "1"]);
        insert.extend(rule);
        run("iptables", &insert).await?;
    }
    Ok(())
}

/// Undoes [`ensure`]: deletes each rule of `rules` while `iptables -D` finds
/// it, then empties and deletes each chain of `chains`. What is already gone
/// is no error; the first other failure is returned after the rest was tried.
pub async fn remove(
    chains: &[(&str, String)],
    rules: Vec<(&'static str, &'static str, Vec<String>)>,
) -> Result<(), String> {
    let words = |items: &[&str]| -> Vec<String> { items.iter().map(|s| (*s).to_owned()).collect() };
    let mut first_error = None;
    for (table, builtin, rule) in rules {
        let mut check = words(&["-t", table, "-C", builtin]);
        check.extend(rule.iter().cloned());
        // A rule added twice (by hand, or by two runs) goes twice.
        for _ in 0..8 {
            if run("iptables", &check).await.is_err() {
                break;
            }
            let mut delete = words(&["-t", table, "-D", builtin]);
            delete.extend(rule.iter().cloned());
            if let Err(e) = run("iptables", &delete).await {
                first_error.get_or_insert(e);
                break;
            }
        }
    }
    for (table, chain) in chains {
        if run("iptables", &words(&["-t", table, "-S", chain]))
            .await
            .is_err()
        {
            continue;
        }
        for op in ["-F", "-X"] {
            if let Err(e) = run("iptables", &words(&["-t", table, op, chain])).await {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// `iptables -S` quotes only the comment (`"novacron-page-server"`); the
/// words of one listed rule. `None` for an unbalanced quote.
pub fn shell_words(line: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut any = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            ' ' if !quoted => {
                if any {
                    words.push(std::mem::take(&mut word));
                    any = false;
                }
            }
            c => {
                word.push(c);
                any = true;
            }
        }
    }
    if quoted {
        return None;
    }
    if any {
        words.push(word);
    }
    Some(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_rules_split_into_words_with_their_quoted_comments_whole() {
        assert_eq!(
            shell_words("a \"b c\" d"),
            Some(vec!["a".into(), "b c".into(), "d".into()])
        );
        assert_eq!(shell_words("a \"b"), None);
    }

    #[test]
    fn published_ports_make_a_chain_of_dnat_rules_and_fixed_rules_are_tagged() {
        let chain = dnat_chain(
            "NOVACRON-X",
            &[
                Dnat {
                    owner: "vm-1".into(),
                    publish: Ipv4Addr::LOCALHOST,
                    host_port: 20000,
                    to: Ipv4Addr::new(10, 216, 3, 9),
                    to_port: 8080,
                    udp: false,
                },
                Dnat {
                    owner: "vm-2".into(),
                    publish: Ipv4Addr::UNSPECIFIED,
                    host_port: 5353,
                    to: Ipv4Addr::new(10, 216, 3, 10),
                    to_port: 53,
                    udp: true,
                },
            ],
        );
        assert_eq!(
            chain,
            ":NOVACRON-X - [0:0]\n\
             -A NOVACRON-X -d 127.0.0.1/32 -p tcp -m tcp --dport 20000 -m comment --comment \"vm-1\" -j DNAT --to-destination 10.216.3.9:8080\n\
             -A NOVACRON-X -p udp -m udp --dport 5353 -m comment --comment \"vm-2\" -j DNAT --to-destination 10.216.3.10:53\n"
        );
        assert_eq!(
            dnat_chain("C", &[]),
            ":C - [0:0]\n",
            "nothing published: an empty chain"
        );
        assert_eq!(
            tagged("-s 10.0.0.0/8 -j MASQUERADE", "t").join(" "),
            "-s 10.0.0.0/8 -m comment --comment t -j MASQUERADE"
        );
    }
}

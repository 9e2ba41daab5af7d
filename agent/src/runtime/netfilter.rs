//! The node's packet filter, written with `iptables` (and `iptables-restore`
//! for a chain replaced at once): the page server's guard
//! ([`super::oci::guard`]) and the VM bridge's forwards
//! ([`super::vm::bridge`]). Each call is bounded in time and waits for the
//! xtables lock for at most as long. The VM bridge's `ip` calls go through
//! [`output`] too.

use std::time::Duration;

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
}

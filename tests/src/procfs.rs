//! Reading processes from `/proc` for the benchmark tools, and finding sibling
//! binaries.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Reads a text file, naming it in the error.
pub fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// utime + stime in clock ticks from a `/proc/<pid>/stat` file (or
/// `/proc/self/stat`).
pub fn cpu_ticks(stat_path: &str) -> Result<u64> {
    let text = read(Path::new(stat_path))?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("unexpected /proc stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        Ok(fields
            .get(n - 3)
            .context("short /proc stat line")?
            .parse()?)
    };
    Ok(field(14)? + field(15)?)
}

/// A numeric field of a `/proc/<pid>/status` file (kB values in KiB; counts as
/// they are), such as `VmRSS` or `Threads`.
pub fn status_field(status_path: &str, field: &str) -> Result<u64> {
    let text = read(Path::new(status_path))?;
    kib_field(&text, field).with_context(|| format!("no {field} in {status_path}"))
}

/// The value of `field:` in a `/proc` key-value text, without its `kB` unit.
pub fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (key, value) = l.split_once(':')?;
        (key == field).then(|| value.trim().trim_end_matches("kB").trim().parse().ok())?
    })
}

/// Clock ticks per second (`getconf CLK_TCK`), 100 when it cannot be asked.
pub fn clock_ticks_per_sec() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// The median (upper middle) of `values`, 0 when empty.
pub fn median(values: &[u64]) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied().unwrap_or(0)
}

/// KiB to decimal megabytes.
pub fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

/// A binary next to the running one (`target/release/<name>`).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate this binary")?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found; build it with `cargo build --release --bins` or pass its path",
            path.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        assert!(status_field("/proc/self/status", "VmRSS").expect("rss") > 0);
        cpu_ticks("/proc/self/stat").expect("ticks");
        assert_eq!(
            kib_field("VmRSS:\t  1234 kB\nThreads: 3\n", "Threads"),
            Some(3)
        );
        assert_eq!(median(&[5, 1, 3]), 3);
    }
}

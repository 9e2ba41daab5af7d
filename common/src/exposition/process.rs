//! This process's own figures for the standard `process_*` metrics
//! (CPU time, memory, file descriptors, start time), read from `/proc` on Linux.
//!
//! [`ProcessStats::read`] does the reading; the parsing is pure functions below,
//! each bounded (a file is read up to [`MAX_PROC_FILE`] bytes) and tested on its
//! own. Elsewhere than Linux, or when `/proc` cannot be read, there are no figures
//! and the families are announced without samples.

use std::io::Read as _;
use std::path::Path;

/// Kernel clock ticks per second in `/proc/<pid>/stat` (`USER_HZ`). It is 100 on
/// every architecture Linux exports to user space in practice; the Prometheus Go
/// client's `procfs` hard-codes the same value rather than calling `sysconf`.
pub const USER_HZ: f64 = 100.0;

/// The most bytes read from one `/proc` file (they are a few KiB).
pub const MAX_PROC_FILE: u64 = 64 * 1024;

/// The most entries of `/proc/self/fd` counted.
pub const MAX_FDS_COUNTED: usize = 1 << 20;

/// One reading of this process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessStats {
    /// User and system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub resident_memory_bytes: u64,
    /// Virtual memory size, bytes.
    pub virtual_memory_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The soft limit on open file descriptors; `None` when unlimited.
    pub max_fds: Option<u64>,
    /// When the process started, Unix seconds.
    pub start_time_seconds: f64,
}

impl ProcessStats {
    /// Reads `/proc/self`; `None` when any part cannot be read or parsed (not
    /// Linux, `/proc` not mounted).
    pub fn read() -> Option<ProcessStats> {
        let proc = Path::new("/proc");
        let stat = parse_stat(&read_bounded(&proc.join("self/stat"))?)?;
        let boot = parse_boot_time(&read_bounded(&proc.join("stat"))?)?;
        let resident = parse_status_kib(&read_bounded(&proc.join("self/status"))?, "VmRSS")?;
        let max_fds = parse_max_open_files(&read_bounded(&proc.join("self/limits"))?)?;
        let open_fds = std::fs::read_dir(proc.join("self/fd"))
            .ok()?
            .take(MAX_FDS_COUNTED)
            .count() as u64;
        Some(ProcessStats {
            cpu_seconds: stat.cpu_ticks as f64 / USER_HZ,
            resident_memory_bytes: resident.saturating_mul(1024),
            virtual_memory_bytes: stat.virtual_bytes,
            open_fds,
            max_fds,
            start_time_seconds: boot as f64 + stat.start_ticks as f64 / USER_HZ,
        })
    }
}

fn read_bounded(path: &Path) -> Option<String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_PROC_FILE)
        .read_to_string(&mut text)
        .ok()?;
    Some(text)
}

/// The fields of `/proc/<pid>/stat` the metrics use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatFields {
    /// `utime + stime`, clock ticks.
    pub cpu_ticks: u64,
    /// `starttime`: clock ticks after boot.
    pub start_ticks: u64,
    /// `vsize`, bytes.
    pub virtual_bytes: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and
/// may hold spaces and parentheses itself, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<StatFields> {
    let (_, rest) = text.rsplit_once(')')?;
    // `rest` starts at field 3 (state): field N is at index N - 3.
    let fields: Vec<&str> = rest.split_whitespace().take(21).collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(StatFields {
        cpu_ticks: field(14)?.checked_add(field(15)?)?,
        start_ticks: field(22)?,
        virtual_bytes: field(23)?,
    })
}

/// The boot time (`btime`, Unix seconds) from `/proc/stat`.
pub fn parse_boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS:    1234 kB`), in KiB.
pub fn parse_status_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let value = l.strip_prefix(key)?.strip_prefix(':')?;
        value.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

/// The soft limit of `Max open files` in `/proc/<pid>/limits`: `Some(None)` when
/// unlimited, `None` when the line is missing or unreadable.
pub fn parse_max_open_files(text: &str) -> Option<Option<u64>> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))?;
    match line.split_whitespace().next()? {
        "unlimited" => Some(None),
        soft => soft.parse().ok().map(Some),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let stat = "28053 (odd) name)) R 28040 28040 24327 0 -1 4194304 102 0 0 0 250 50 0 0 20 0 1 0 457031 3133440 399 18446744073709551615 0 0";
        assert_eq!(
            parse_stat(stat),
            Some(StatFields {
                cpu_ticks: 300,
                start_ticks: 457_031,
                virtual_bytes: 3_133_440,
            })
        );
        assert_eq!(parse_stat("1 (x) R 0 0"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn status_limits_and_boot_time_parse() {
        let status = "Name:\tnovacron\nVmSize:\t  123 kB\nVmRSS:\t   5120 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(5120));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units\nMax open files            20000                524288               files\n";
        assert_eq!(parse_max_open_files(limits), Some(Some(20_000)));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_max_open_files(unlimited), Some(None));
        assert_eq!(parse_max_open_files("Max processes 1 1\n"), None);
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"),
            Some(1_700_000_000)
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_can_be_read() {
        let p = ProcessStats::read().expect("/proc/self is readable on Linux");
        assert!(p.resident_memory_bytes > 0 && p.virtual_memory_bytes >= p.resident_memory_bytes);
        assert!(p.open_fds >= 3, "{p:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        assert!(
            p.start_time_seconds <= now + 1.0 && p.start_time_seconds > now - 86_400.0,
            "{p:?}"
        );
    }
}

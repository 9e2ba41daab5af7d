//! Rendering for the CLI: output formats, a generic table, and human-readable units
//! and times. Everything here is pure; `now` is always a parameter.

use std::io::Write;
use std::time::{Duration, SystemTime};

use clap::ValueEnum;
use comfy_table::{ContentArrangement, Table};
use serde::Serialize;

/// How a command prints its result.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns or a detail view, for people.
    #[default]
    Table,
    /// The API's JSON objects, pretty-printed.
    Json,
    /// The API's objects as YAML.
    Yaml,
}

/// Errors printing a result.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// Writing to standard output failed.
    #[error("cannot write the output: {0}")]
    Io(#[from] std::io::Error),
    /// The value could not be encoded as JSON.
    #[error("cannot encode the output as JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The value could not be encoded as YAML.
    #[error("cannot encode the output as YAML: {0}")]
    Yaml(#[from] yaml_serde::Error),
}

/// A type shown as one row of a table.
pub trait TableRow {
    /// The column headers, upper case.
    fn headers() -> &'static [&'static str];
    /// The cells of this item in header order; `now` is for ages.
    fn cells(&self, now: SystemTime) -> Vec<String>;
}

/// Renders `items` as aligned columns without borders, like `kubectl get`.
pub fn table<T: TableRow>(items: &[T], now: SystemTime) -> String {
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(T::headers().to_vec());
    for item in items {
        t.add_row(item.cells(now));
    }
    let columns = T::headers().len();
    for (i, column) in t.column_iter_mut().enumerate() {
        let right = if i + 1 == columns { 0 } else { 3 };
        column.set_padding((0, right));
    }
    t.lines()
        .map(|l| l.trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Prints a list: a table of `items`, or the items as a JSON or YAML sequence.
pub fn write_list<T: TableRow + Serialize>(
    out: &mut dyn Write,
    format: OutputFormat,
    items: &[T],
    now: SystemTime,
) -> Result<(), OutputError> {
    match format {
        OutputFormat::Table => writeln!(out, "{}", table(items, now))?,
        OutputFormat::Json | OutputFormat::Yaml => write_value(out, format, &items)?,
    }
    Ok(())
}

/// Prints one object: `detail` for tables, else the object as JSON or YAML.
pub fn write_one<T: Serialize>(
    out: &mut dyn Write,
    format: OutputFormat,
    value: &T,
    detail: impl FnOnce() -> String,
) -> Result<(), OutputError> {
    match format {
        OutputFormat::Table => write!(out, "{}", detail())?,
        OutputFormat::Json | OutputFormat::Yaml => write_value(out, format, value)?,
    }
    Ok(())
}

/// Prints `value` as pretty JSON or YAML (a table format prints JSON).
pub fn write_value<T: Serialize + ?Sized>(
    out: &mut dyn Write,
    format: OutputFormat,
    value: &T,
) -> Result<(), OutputError> {
    match format {
        OutputFormat::Yaml => out.write_all(yaml_serde::to_string(value)?.as_bytes())?,
        OutputFormat::Json | OutputFormat::Table => {
            serde_json::to_writer_pretty(&mut *out, value)?;
            writeln!(out)?;
        }
    }
    Ok(())
}

/// Bytes in binary units with one decimal: `512B`, `3.1Gi`, `15.6Gi`
/// ([`novacron_common::units::bytes`], the one size format).
pub fn bytes(n: u64) -> String {
    novacron_common::units::bytes(n).to_string()
}

/// A rate in bytes per second: `0B/s`, `1.2Mi/s`.
pub fn rate(bytes_per_sec: u64) -> String {
    format!("{}/s", bytes(bytes_per_sec))
}

/// `used/total` in binary units: `3.1Gi/15.6Gi`.
pub fn used_of(used: u64, total: u64) -> String {
    format!("{}/{}", bytes(used), bytes(total))
}

/// `part` as a percentage of `whole`, rounded; `-` when `whole` is zero.
pub fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "-".to_string()
    } else {
        format!("{:.0}%", part as f64 * 100.0 / whole as f64)
    }
}

/// A duration in its largest unit: `42s`, `5m`, `3h`, `2d`.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// A duration in its two largest units: `3d 4h`, `5m 2s`, `42s`.
pub fn long_duration(d: Duration) -> String {
    let s = d.as_secs();
    let (d_, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d_, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m {sec}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d_}d {h}h"),
    }
}

/// How long before `now` `then` was: `1s ago`; a time in the future (clock skew)
/// counts as `0s ago`.
pub fn ago(now: SystemTime, then: SystemTime) -> String {
    let elapsed = now.duration_since(then).unwrap_or(Duration::ZERO);
    format!("{} ago", short_duration(elapsed))
}

/// How far from `now` `when` is: `in 29d` or `3h ago`.
pub fn relative(now: SystemTime, when: SystemTime) -> String {
    match when.duration_since(now) {
        Ok(ahead) => format!("in {}", short_duration(ahead)),
        Err(_) => ago(now, when),
    }
}

pub use novacron_common::clock::from_unix_ms;

/// A time in RFC 3339 with its distance from `now`: `2026-05-01T12:00:00Z (in 29d)`.
pub fn timestamp(now: SystemTime, when: SystemTime) -> String {
    format!(
        "{} ({})",
        humantime::format_rfc3339_seconds(when),
        relative(now, when)
    )
}

/// Writes `label: value` lines with the values aligned, each line prefixed by
/// `indent`; an empty value shows as `-`.
pub fn key_values(indent: &str, pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let label = format!("{k}:");
        let v = if v.is_empty() { "-" } else { v.as_str() };
        out.push_str(format!("{indent}{label:<width$}  {v}").trim_end());
        out.push('\n');
    }
    out
}

/// Prefixes every line of `text` with `prefix`.
pub fn indented(text: &str, prefix: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        out.push_str(prefix);
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Fruit {
        name: &'static str,
        count: u32,
    }

    impl TableRow for Fruit {
        fn headers() -> &'static [&'static str] {
            &["NAME", "COUNT"]
        }
        fn cells(&self, _now: SystemTime) -> Vec<String> {
            vec![self.name.to_string(), self.count.to_string()]
        }
    }

    #[test]
    fn table_is_aligned_without_borders_or_trailing_space() {
        let items = [
            Fruit {
                name: "apple",
                count: 3,
            },
            Fruit {
                name: "fig",
                count: 12,
            },
        ];
        let t = table(&items, SystemTime::UNIX_EPOCH);
        assert_eq!(t, "NAME    COUNT\napple   3\nfig     12");
    }

    #[test]
    fn lists_print_as_json_and_yaml_sequences() {
        let items = [Fruit {
            name: "apple",
            count: 3,
        }];
        let mut json = Vec::new();
        write_list(
            &mut json,
            OutputFormat::Json,
            &items,
            SystemTime::UNIX_EPOCH,
        )
        .expect("json");
        let parsed: serde_json::Value = serde_json::from_slice(&json).expect("valid JSON");
        assert_eq!(parsed[0]["name"], "apple");
        let mut yaml = Vec::new();
        write_list(
            &mut yaml,
            OutputFormat::Yaml,
            &items,
            SystemTime::UNIX_EPOCH,
        )
        .expect("yaml");
        assert_eq!(
            String::from_utf8(yaml).expect("utf8"),
            "- name: apple\n  count: 3\n"
        );
    }

    #[test]
    fn bytes_use_binary_units() {
        assert_eq!(bytes(0), "0B");
        assert_eq!(bytes(1023), "1023B");
        assert_eq!(bytes(1024), "1.0Ki");
        assert_eq!(bytes(3_328_599_654), "3.1Gi");
        assert_eq!(bytes(16_750_372_454), "15.6Gi");
        assert_eq!(bytes(1024 * 1024 - 1), "1.0Mi");
        assert_eq!(rate(1_258_291), "1.2Mi/s");
        assert_eq!(used_of(1 << 30, 4 << 30), "1.0Gi/4.0Gi");
    }

    #[test]
    fn ages_and_durations() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(ago(t0 + Duration::from_millis(1500), t0), "1s ago");
        assert_eq!(ago(t0, t0 + Duration::from_secs(5)), "0s ago");
        assert_eq!(ago(t0 + Duration::from_secs(7200), t0), "2h ago");
        assert_eq!(
            relative(t0, t0 + Duration::from_secs(29 * 86_400)),
            "in 29d"
        );
        assert_eq!(
            long_duration(Duration::from_secs(3 * 86_400 + 4 * 3600 + 9)),
            "3d 4h"
        );
        assert_eq!(long_duration(Duration::from_secs(65)), "1m 5s");
    }
}

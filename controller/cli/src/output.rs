//! Rendering for the CLI: output formats, a generic table, and human-readable units
//! and times. Everything here is pure; `now` is always a parameter.

use std::io::Write;
use std::time::{Duration, SystemTime};

use comfy_table::{ContentArrangement, Table};
use serde::Serialize;
use serde_json_path::JsonPath;

/// How a command prints its result (`-o`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OutputFormat {
    /// Aligned columns or a detail view, for people.
    #[default]
    Table,
    /// A table with more columns where a list has them (`-o wide`); otherwise as
    /// `Table`.
    Wide,
    /// The API's JSON objects, pretty-printed.
    Json,
    /// The API's objects as YAML.
    Yaml,
    /// `kind/name`, one per line (`-o name`), for the lists whose items have names.
    Name,
    /// The values an RFC 9535 JSONPath query selects from what `-o json` prints,
    /// one per line (`-o jsonpath=EXPR`).
    JsonPath(&'static Query),
    /// A minijinja (Jinja2) template rendered with what `-o json` prints: a list
    /// as `items`, an object's fields by name (`-o template=TEXT`).
    Template(&'static Template),
}

/// A checked `-o template=` text.
#[derive(Debug, PartialEq, Eq)]
pub struct Template {
    /// The template as the user typed it.
    pub text: String,
}

/// A parsed `-o jsonpath=` query and its text.
#[derive(Debug)]
pub struct Query {
    /// The query as the user typed it.
    pub text: String,
    path: JsonPath,
}

impl PartialEq for Query {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for Query {}

/// The accepted `-o` values, for help and errors.
pub const OUTPUT_FORMATS: &str = "table, wide, json, yaml, name, jsonpath=EXPR, template=TEXT";

impl OutputFormat {
    /// Whether this format is for people (a table or a detail view).
    pub fn is_human(self) -> bool {
        matches!(self, OutputFormat::Table | OutputFormat::Wide)
    }

    /// Parses an `-o` value. A JSONPath query is parsed once and kept for the
    /// life of the process (one per invocation), so that the format stays `Copy`.
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "table" => OutputFormat::Table,
            "wide" => OutputFormat::Wide,
            "json" => OutputFormat::Json,
            "yaml" => OutputFormat::Yaml,
            "name" => OutputFormat::Name,
            _ => match s.strip_prefix("jsonpath=") {
                Some(expr) => OutputFormat::JsonPath(Box::leak(Box::new(parse_query(expr)?))),
                None if s.starts_with("template=") => {
                    let text = &s["template=".len()..];
                    minijinja::Environment::new()
                        .template_from_str(text)
                        .map_err(|e| format!("{text:?} is not a template: {e:#}"))?;
                    OutputFormat::Template(Box::leak(Box::new(Template {
                        text: text.to_string(),
                    })))
                }
                None => {
                    return Err(format!(
                        "{s:?} is not an output format; expected one of {OUTPUT_FORMATS}"
                    ));
                }
            },
        })
    }
}

/// The `-o` value parser: [`OutputFormat::parse`], with the formats listed for
/// `--help` and shell completion.
#[derive(Debug, Clone, Copy)]
pub struct OutputFormatParser;

impl clap::builder::TypedValueParser for OutputFormatParser {
    type Value = OutputFormat;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<OutputFormat, clap::Error> {
        let fail = |why: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for '--output <FORMAT>': {why}\n"),
            )
            .with_cmd(cmd)
        };
        let text = value
            .to_str()
            .ok_or_else(|| fail(format!("{value:?} is not UTF-8")))?;
        OutputFormat::parse(text).map_err(fail)
    }

    fn possible_values(
        &self,
    ) -> Option<Box<dyn Iterator<Item = clap::builder::PossibleValue> + '_>> {
        let names = [
            "table",
            "wide",
            "json",
            "yaml",
            "name",
            "jsonpath=",
            "template=",
        ];
        Some(Box::new(
            names.into_iter().map(clap::builder::PossibleValue::new),
        ))
    }
}

/// Parses a JSONPath query (RFC 9535). kubectl's forms are accepted too: braces
/// around the whole query are dropped (`{.items[*].name}`), and a query that starts
/// with `.` or `[` is taken as relative to the root (`.name` is `$.name`).
pub fn parse_query(expr: &str) -> Result<Query, String> {
    let trimmed = expr.trim();
    let inner = trimmed
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or(trimmed)
        .trim();
    let rooted = if inner.starts_with('.') || inner.starts_with('[') {
        format!("${inner}")
    } else {
        inner.to_string()
    };
    let path = JsonPath::parse(&rooted).map_err(|e| {
        format!(
            "{expr:?} is not a JSONPath query (RFC 9535): {e}; write e.g. jsonpath='$[*].name' or jsonpath='{{[*].name}}'"
        )
    })?;
    Ok(Query {
        text: expr.to_string(),
        path,
    })
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
    /// A `-o template=` failed to render.
    #[error("cannot render the template: {0:#}")]
    Template(#[from] minijinja::Error),
    /// `-o name` was asked of a result whose items have no names.
    #[error(
        "-o name applies to lists of named things (job, node, alloc, policy, pool, context list); use -o json or -o jsonpath=EXPR here"
    )]
    NoNames,
}

/// A type shown as one row of a table.
pub trait TableRow {
    /// The column headers, upper case.
    fn headers() -> &'static [&'static str];
    /// The cells of this item in header order; `now` is for ages.
    fn cells(&self, now: SystemTime) -> Vec<String>;
    /// The column headers of `-o wide`; the same as [`TableRow::headers`] unless
    /// the type has more to show.
    fn wide_headers() -> &'static [&'static str] {
        Self::headers()
    }
    /// The cells of `-o wide`, in [`TableRow::wide_headers`] order.
    fn wide_cells(&self, now: SystemTime) -> Vec<String> {
        self.cells(now)
    }
    /// `kind/name` for `-o name` (`job/web`); `None` for rows without a name.
    fn resource_name(&self) -> Option<String> {
        None
    }
}

/// Renders `items` as aligned columns without borders, like `kubectl get`.
pub fn table<T: TableRow>(items: &[T], now: SystemTime) -> String {
    columns(T::headers(), items.iter().map(|i| i.cells(now)))
}

/// [`table`] with the `-o wide` columns.
pub fn wide_table<T: TableRow>(items: &[T], now: SystemTime) -> String {
    columns(T::wide_headers(), items.iter().map(|i| i.wide_cells(now)))
}

fn columns(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let mut t = Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(headers.to_vec());
    for row in rows {
        t.add_row(row);
    }
    let columns = headers.len();
    for (i, column) in t.column_iter_mut().enumerate() {
        let right = if i + 1 == columns { 0 } else { 3 };
        column.set_padding((0, right));
    }
    t.lines()
        .map(|l| l.trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Prints a list: a table of `items` (wide or not), their `kind/name`s, or the
/// items as a JSON or YAML sequence (or what a JSONPath query selects from it).
pub fn write_list<T: TableRow + Serialize>(
    out: &mut dyn Write,
    format: OutputFormat,
    items: &[T],
    now: SystemTime,
) -> Result<(), OutputError> {
    match format {
        OutputFormat::Table => writeln!(out, "{}", table(items, now))?,
        OutputFormat::Wide => writeln!(out, "{}", wide_table(items, now))?,
        OutputFormat::Name => {
            for item in items {
                writeln!(out, "{}", item.resource_name().ok_or(OutputError::NoNames)?)?;
            }
        }
        OutputFormat::Json
        | OutputFormat::Yaml
        | OutputFormat::JsonPath(_)
        | OutputFormat::Template(_) => write_value(out, format, &items)?,
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
        OutputFormat::Table | OutputFormat::Wide => write!(out, "{}", detail())?,
        _ => write_value(out, format, value)?,
    }
    Ok(())
}

/// Prints `value` as pretty JSON or YAML, or what a JSONPath query selects from
/// its JSON (a table format prints JSON; `-o name` is refused: a single value has
/// no list of names).
pub fn write_value<T: Serialize + ?Sized>(
    out: &mut dyn Write,
    format: OutputFormat,
    value: &T,
) -> Result<(), OutputError> {
    match format {
        OutputFormat::Yaml => out.write_all(yaml_serde::to_string(value)?.as_bytes())?,
        OutputFormat::Json | OutputFormat::Table | OutputFormat::Wide => {
            serde_json::to_writer_pretty(&mut *out, value)?;
            writeln!(out)?;
        }
        OutputFormat::Name => return Err(OutputError::NoNames),
        OutputFormat::JsonPath(query) => {
            let json = serde_json::to_value(value)?;
            for line in select(query, &json) {
                writeln!(out, "{line}")?;
            }
        }
        OutputFormat::Template(template) => {
            out.write_all(render(template, serde_json::to_value(value)?)?.as_bytes())?
        }
    }
    Ok(())
}

/// Renders `template` with `json`: a list is `items`, an object's fields are
/// variables, anything else is `value`. The text comes out as rendered (end it
/// with a newline in the template if you want one).
pub fn render(template: &Template, json: serde_json::Value) -> Result<String, OutputError> {
    let context = match json {
        serde_json::Value::Array(_) => serde_json::json!({ "items": json }),
        serde_json::Value::Object(_) => json,
        other => serde_json::json!({ "value": other }),
    };
    let env = minijinja::Environment::new();
    Ok(env.render_str(&template.text, minijinja::value::Serde(&context))?)
}

/// The values `query` selects from `json`, one line each: strings as they are,
/// anything else as compact JSON.
pub fn select(query: &Query, json: &serde_json::Value) -> Vec<String> {
    query
        .path
        .query(json)
        .all()
        .into_iter()
        .map(|v| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
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
        fn wide_headers() -> &'static [&'static str] {
            &["NAME", "COUNT", "DOUBLE"]
        }
        fn wide_cells(&self, now: SystemTime) -> Vec<String> {
            let mut cells = self.cells(now);
            cells.push((self.count * 2).to_string());
            cells
        }
        fn resource_name(&self) -> Option<String> {
            Some(format!("fruit/{}", self.name))
        }
    }

    fn render(format: &str, items: &[Fruit]) -> Result<String, OutputError> {
        let format = OutputFormat::parse(format).expect("a format");
        let mut out = Vec::new();
        write_list(&mut out, format, items, SystemTime::UNIX_EPOCH)?;
        Ok(String::from_utf8(out).expect("utf8"))
    }

    const FRUITS: [Fruit; 2] = [
        Fruit {
            name: "apple",
            count: 3,
        },
        Fruit {
            name: "fig",
            count: 12,
        },
    ];

    #[test]
    fn wide_adds_columns_and_name_prints_kind_slash_name() {
        assert_eq!(
            render("wide", &FRUITS).expect("wide"),
            "NAME    COUNT   DOUBLE\napple   3       6\nfig     12      24\n"
        );
        assert_eq!(
            render("table", &FRUITS).expect("table"),
            "NAME    COUNT\napple   3\nfig     12\n"
        );
        assert_eq!(
            render("name", &FRUITS).expect("name"),
            "fruit/apple\nfruit/fig\n"
        );
    }

    #[test]
    fn jsonpath_accepts_rfc_9535_and_kubectl_braces() {
        for q in [
            "jsonpath=$[*].name",
            "jsonpath={[*].name}",
            "jsonpath={ $[*].name }",
        ] {
            assert_eq!(render(q, &FRUITS).expect(q), "apple\nfig\n", "{q}");
        }
        assert_eq!(
            render("jsonpath=$[?@.count > 5].count", &FRUITS).expect("filter"),
            "12\n"
        );
        assert_eq!(
            render("jsonpath=$[0]", &FRUITS).expect("object"),
            "{\"count\":3,\"name\":\"apple\"}\n"
        );
        assert_eq!(render("jsonpath=$.nothing", &FRUITS).expect("empty"), "");
    }

    #[test]
    fn bad_formats_and_queries_are_refused_with_the_accepted_forms() {
        let e = OutputFormat::parse("xml").expect_err("not a format");
        assert!(e.contains("jsonpath=EXPR"), "{e}");
        let e = OutputFormat::parse("jsonpath=$[").expect_err("bad query");
        assert!(e.contains("RFC 9535"), "{e}");
    }

    #[test]
    fn templates_see_a_list_as_items_and_an_object_by_field() {
        let t = "template={% for f in items %}{{ f.name }}={{ f.count }}\n{% endfor %}";
        assert_eq!(render(t, &FRUITS).expect("list"), "apple=3\nfig=12\n");
        let OutputFormat::Template(one) = OutputFormat::parse("template={{ name }}!").expect("ok")
        else {
            panic!("a template")
        };
        let mut out = Vec::new();
        write_value(&mut out, OutputFormat::Template(one), &FRUITS[1]).expect("one");
        assert_eq!(out, b"fig!");
        let e = OutputFormat::parse("template={% for %}").expect_err("bad syntax");
        assert!(e.contains("is not a template"), "{e}");
    }

    #[test]
    fn name_is_refused_for_a_single_value() {
        let mut out = Vec::new();
        let e = write_value(&mut out, OutputFormat::Name, &1).expect_err("no names");
        assert!(e.to_string().contains("-o name"), "{e}");
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

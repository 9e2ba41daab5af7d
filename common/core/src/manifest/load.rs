//! From YAML text to validated jobs, and yaml_serde's errors in our words.

use std::collections::HashMap;

use serde::Deserialize;
use serde::de::IgnoredAny;
use yaml_serde::Value;

use super::job::{self, Job};
use super::locate::{self, FieldPath, Position, Seg};
use super::validate::{self, Issue};
use super::{JobManifest, ManifestError, ManifestErrors};

/// Most rule errors located in one file. Locating one re-reads its document, so an
/// enormous file full of errors would otherwise take quadratic time; past this, the
/// rest are only counted.
const MAX_LOCATED_ERRORS: usize = 100;

/// Parses a file that holds exactly one job.
///
/// `file` is the name errors show. Returns every problem found, in file order.
pub fn parse_job(file: &str, text: &str) -> Result<Job, ManifestErrors> {
    let mut jobs = load(file, text)?;
    if jobs.len() == 1
        && let Some((_, job)) = jobs.pop()
    {
        return Ok(job);
    }
    let second = jobs.get(1).map_or(0, |(doc, _)| *doc);
    let at = locate::locate(text, second, &FieldPath::root(), false);
    Err(ManifestErrors(vec![error_at(
        file,
        at,
        String::new(),
        format!("this file holds {} jobs; expected exactly one", jobs.len()),
    )]))
}

/// Parses a file of one or more jobs, separated by `---` lines.
///
/// Empty documents are skipped; a file with no job at all is an error, and so are
/// two jobs of the same name. Returns every problem found in every document, in
/// file order. A YAML syntax error ends the file: what follows it is not read.
pub fn parse_jobs(file: &str, text: &str) -> Result<Vec<Job>, ManifestErrors> {
    load(file, text).map(|jobs| jobs.into_iter().map(|(_, job)| job).collect())
}

/// The YAML documents of `text`, for a deserializer: the only way into yaml_serde
/// for untrusted text. Refuses, before any parsing, text nested deeper or aliased
/// more than the [`guard`](super::guard) allows (the parser's time grows with the
/// square of the depth), naming `file`, the line and the limit.
pub fn yaml_documents<'a>(
    file: &str,
    text: &'a str,
) -> Result<yaml_serde::Deserializer<'a>, ManifestErrors> {
    super::guard::check(file, text).map_err(|e| ManifestErrors(vec![e]))?;
    Ok(yaml_serde::Deserializer::from_str(text))
}

/// The jobs of `text` with their document numbers.
fn load(file: &str, text: &str) -> Result<Vec<(usize, Job)>, ManifestErrors> {
    let mut errors = Vec::new();

    // 0. Shape: refuse what would make the parse slow or huge.
    yaml_documents(file, text)?;

    // 1. Syntax. libyaml cannot resynchronise after a syntax error (yaml_serde then
    //    yields the same error for ever), so the first one ends the file.
    let mut count = 0;
    for de in yaml_serde::Deserializer::from_str(text) {
        if let Err(e) = IgnoredAny::deserialize(de) {
            errors.push(from_yaml(file, text, count, &e, true));
            break;
        }
        count += 1;
    }

    // 2. The documents as written: needed to tell written values from defaults, and
    //    the only step that sees duplicate keys (serde keeps the last one).
    let mut written = Vec::new();
    for (doc, de) in yaml_serde::Deserializer::from_str(text)
        .take(count)
        .enumerate()
    {
        match Value::deserialize(de) {
            Ok(Value::Null) => {}
            Ok(value) => written.push((doc, value)),
            Err(e) => errors.push(from_yaml(file, text, doc, &e, false)),
        }
    }

    // 3. Schema, then rules.
    let mut jobs = Vec::new();
    let mut unlocated = 0;
    let mut docs = yaml_serde::Deserializer::from_str(text)
        .take(count)
        .enumerate();
    for (doc, value) in &written {
        let Some((_, de)) = docs.find(|(i, _)| i == doc) else {
            break;
        };
        let manifest = match JobManifest::deserialize(de) {
            Ok(m) => m,
            Err(e) => {
                errors.push(from_yaml(file, text, *doc, &e, false));
                continue;
            }
        };
        match job::checked(manifest, Some(value)) {
            Ok(job) => jobs.push((*doc, job)),
            Err(issues) => {
                for issue in issues {
                    if errors.len() < MAX_LOCATED_ERRORS {
                        errors.push(located(file, text, *doc, issue));
                    } else {
                        unlocated += 1;
                    }
                }
            }
        }
    }

    // 4. Names are unique within a file.
    let mut names: HashMap<&str, usize> = HashMap::new();
    let name_path = FieldPath::root().key("metadata").key("name");
    for (doc, job) in &jobs {
        if let Some(first) = names.insert(&job.name, *doc) {
            names.insert(&job.name, first);
            let first_line = locate::locate(text, first, &name_path, false)
                .map_or_else(|| "above".to_string(), |p| format!("at line {}", p.line));
            errors.push(error_at(
                file,
                locate::locate(text, *doc, &name_path, false),
                name_path.to_string(),
                format!(
                    "{:?} is already the name of the job {first_line}; expected a different \
                     name for each job in a file",
                    job.name
                ),
            ));
        }
    }

    if unlocated > 0 {
        errors.push(error_at(
            file,
            None,
            String::new(),
            format!("{unlocated} more errors not shown; fix the ones above first"),
        ));
    }
    if errors.is_empty() && jobs.is_empty() {
        errors.push(error_at(
            file,
            None,
            String::new(),
            format!(
                "no job found; expected a YAML document with apiVersion: {}, kind: {}, \
                 metadata and spec",
                super::API_VERSION,
                super::KIND
            ),
        ));
    }
    if errors.is_empty() {
        return Ok(jobs);
    }
    errors.sort_by_key(|e| (e.line.unwrap_or(usize::MAX), e.column.unwrap_or(0)));
    Err(ManifestErrors(errors))
}

/// A broken rule, located in the text.
fn located(file: &str, text: &str, document: usize, issue: Issue) -> ManifestError {
    let at = locate::locate(text, document, &issue.path, issue.at_key);
    error_at(file, at, issue.path.to_string(), issue.message)
}

pub(super) fn error_at(
    file: &str,
    at: Option<Position>,
    path: String,
    message: String,
) -> ManifestError {
    ManifestError {
        file: file.to_string(),
        line: at.map(|p| p.line),
        column: at.map(|p| p.column),
        path,
        message,
    }
}

/// A yaml_serde error in our form: its position, its path split out of the message,
/// and the message reworded where serde's wording says less than we can.
pub(super) fn from_yaml(
    file: &str,
    text: &str,
    document: usize,
    err: &yaml_serde::Error,
    syntax: bool,
) -> ManifestError {
    let loc = err.location();
    let mut full = err.to_string();
    if let Some(l) = &loc {
        let at = format!(" at line {} column {}", l.line(), l.column());
        if let Some(i) = full.find(&at) {
            full.replace_range(i..i + at.len(), "");
        }
    }
    let mut e = ManifestError {
        file: file.to_string(),
        line: loc.as_ref().map(|l| l.line()),
        column: loc.as_ref().map(|l| l.column()),
        path: String::new(),
        message: full.clone(),
    };
    if syntax {
        e.message = format!("invalid YAML: {full}{}", tab_hint(text, e.line, e.column));
        return e;
    }
    let (path_text, message) = split_path(&full);
    let path = FieldPath::parse(path_text).unwrap_or_default();
    e.path = path_text.to_string();
    e.message = message.to_string();
    let relocate = |e: &mut ManifestError, at: Option<Position>| {
        if let Some(p) = at {
            e.line = Some(p.line);
            e.column = Some(p.column);
        }
    };

    if let Some((field, tail)) = quoted(message, "unknown field `", '`') {
        // Located at the key already.
        e.path = path.key(field).to_string();
        e.message = format!("unknown field `{field}`; {}", tail.trim_start_matches(", "));
    } else if let Some((field, _)) = quoted(message, "missing field `", '`') {
        relocate(&mut e, locate::locate(text, document, &path, true));
        e.message = format!("missing required field `{field}`");
    } else if let Some((key, _)) = quoted(message, "duplicate field `", '`')
        .or_else(|| quoted(message, "duplicate entry with key \"", '"'))
    {
        relocate(&mut e, locate::locate_duplicate(text, document, &path, key));
        e.path = path.key(key).to_string();
        e.message = "appears more than once; expected each key at most once".into();
    } else if let Some((value, tail)) = quoted(message, "unknown variant `", '`') {
        e.message = format!("unknown value `{value}`{tail}");
    } else {
        e.message = reword_expected(&path, message);
    }
    e
}

/// libyaml reports a tab in the indentation as a character that "cannot start any
/// token"; say what it is.
fn tab_hint(text: &str, line: Option<usize>, column: Option<usize>) -> &'static str {
    let at = line.zip(column).and_then(|(l, c)| {
        text.lines()
            .nth(l.checked_sub(1)?)?
            .chars()
            .nth(c.checked_sub(1)?)
    });
    match at {
        Some('\t') => " (YAML indents with spaces, not tabs)",
        _ => "",
    }
}

/// Splits yaml_serde's `path: message` (the path is left out at the root).
fn split_path(full: &str) -> (&str, &str) {
    if let Some((candidate, message)) = full.split_once(": ")
        && !candidate.contains(char::is_whitespace)
        && !candidate.starts_with(['"', '\'', '`'])
        && FieldPath::parse(candidate).is_some()
    {
        return (candidate, message);
    }
    ("", full)
}

/// `prefix` + text up to `close` + the rest.
fn quoted<'a>(message: &'a str, prefix: &str, close: char) -> Option<(&'a str, &'a str)> {
    message.strip_prefix(prefix)?.split_once(close)
}

/// Replaces Rust type names after "expected" with what the field accepts.
fn reword_expected(path: &FieldPath, message: &str) -> String {
    let accepted = match path.segs().last() {
        Some(Seg::Key(k)) => validate::accepted_number(k),
        _ => None,
    };
    for rust in ["u16", "u32", "u64"] {
        let said = format!("expected {rust}");
        if let Some(stem) = message.strip_suffix(&said) {
            let what = match (accepted, rust) {
                (Some(a), _) => a,
                (None, "u16") => "a whole number from 0 to 65535",
                (None, _) => "a whole number",
            };
            return format!("{stem}expected {what}");
        }
    }
    if let Some((stem, _)) = message.split_once("expected struct ") {
        return format!("{stem}expected a mapping");
    }
    message.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_path_only_takes_paths() {
        assert_eq!(
            split_path("spec.task: missing field `image`"),
            ("spec.task", "missing field `image`")
        );
        assert_eq!(
            split_path("invalid type: string \"x\", expected a mapping"),
            ("", "invalid type: string \"x\", expected a mapping")
        );
        assert_eq!(
            split_path("\"12XB\" is not a size; x: y"),
            ("", "\"12XB\" is not a size; x: y")
        );
        assert_eq!(
            split_path("spec.task.ports[0].containerPort: invalid value"),
            ("spec.task.ports[0].containerPort", "invalid value")
        );
    }

    #[test]
    fn rust_types_are_reworded() {
        let p = FieldPath::root().key("spec").key("replicas");
        assert_eq!(
            reword_expected(&p, "invalid type: string \"three\", expected u32"),
            "invalid type: string \"three\", expected a whole number from 1 to 10000 (system \
             jobs ignore replicas)"
        );
        let p = FieldPath::root().key("spec").key("task");
        assert_eq!(
            reword_expected(
                &p,
                "invalid type: string \"x\", expected struct TaskTemplate"
            ),
            "invalid type: string \"x\", expected a mapping"
        );
    }

    #[test]
    fn a_syntax_error_ends_the_file_without_looping() {
        let text = "apiVersion: [\n---\nkind: Job\n---\nkind: Job\n";
        let errors = parse_jobs("f.yaml", text).expect_err("broken flow sequence");
        assert_eq!(errors.len(), 1);
        assert!(
            errors.to_string().starts_with("f.yaml:2:1: invalid YAML: "),
            "{errors}"
        );
    }

    #[test]
    fn errors_past_the_limit_are_counted_not_located() {
        let mut text = String::from(
            "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {name: big}\nspec:\n  \
             resources: {cpu: 1, memory: 1Gi}\n  task:\n    image: busybox\n    ports:\n",
        );
        for i in 0..150 {
            text.push_str(&format!("      - {{name: p{i}, containerPort: 0}}\n"));
        }
        let errors = parse_job("big.yaml", &text).expect_err("150 bad ports");
        assert_eq!(errors.len(), MAX_LOCATED_ERRORS + 1);
        assert_eq!(errors.first().and_then(|e| e.line), Some(9));
        let last = errors.iter().last().map(ToString::to_string);
        assert_eq!(
            last.as_deref(),
            Some("big.yaml: 50 more errors not shown; fix the ones above first")
        );
    }

    /// Issue 12: a 240 KB manifest of nested brackets took 81 s of CPU to parse.
    /// It is refused before parsing, naming the line, the depth and the limit, as
    /// are other kinds (autoscaling policies go through the same loader).
    #[test]
    fn a_deeply_nested_manifest_is_refused_before_parsing() {
        let depth = 120 * 1024;
        let text = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let errors = parse_jobs("deep.yaml", &text).expect_err("too deep");
        let first = errors.first().expect("one error").to_string();
        assert!(
            first.starts_with("deep.yaml:1:65: the document nests 65 levels deep"),
            "{first}"
        );
        assert!(first.contains("limit of 64"), "{first}");
    }
}

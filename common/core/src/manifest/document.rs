//! Manifests of other kinds (autoscaling policies, node templates and pools,
//! simulator scenarios) read through the same steps as jobs, with the same located
//! errors: YAML syntax, then the schema (`deny_unknown_fields`, typed quantities),
//! then the kind's own rules, each located by re-reading the document.
//!
//! A kind supplies its envelope type and a `check` that turns it into the validated
//! value or into [`Rule`]s, whose paths are written as yaml_serde writes them
//! (`spec.metrics[0].target`).

use std::collections::HashMap;

use serde::Deserialize;
use serde::de::{DeserializeOwned, IgnoredAny};
use yaml_serde::Value;

use super::load::{error_at, from_yaml};
use super::locate::{self, FieldPath};
use super::{API_VERSION, ManifestError, ManifestErrors, Metadata};
use crate::names;

/// Most rule errors located in one file (as for jobs); past this, only counted.
const MAX_LOCATED_ERRORS: usize = 100;

/// One broken rule of a manifest of another kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rule {
    /// The field, as yaml_serde writes paths: `spec.scaleOut.step`.
    pub path: String,
    /// Point at the field's key rather than its value.
    pub at_key: bool,
    /// The bad value and what is accepted.
    pub message: String,
}

impl Rule {
    /// A rule about the value at `path`.
    pub fn at(path: impl Into<String>, message: impl Into<String>) -> Rule {
        Rule {
            path: path.into(),
            at_key: false,
            message: message.into(),
        }
    }

    /// A rule about the key at `path`.
    pub fn at_key(path: impl Into<String>, message: impl Into<String>) -> Rule {
        Rule {
            path: path.into(),
            at_key: true,
            message: message.into(),
        }
    }
}

/// What a kind of manifest needs from the loader.
pub(crate) struct Kind<'a> {
    /// The `kind:` value, for the "no document found" error.
    pub kind: &'a str,
    /// How one value is called in messages ("policy", "node pool").
    pub noun: &'a str,
}

/// The envelope rules every kind shares: `apiVersion`, `kind` and a valid
/// `metadata.name`.
pub(crate) fn envelope(
    api_version: &str,
    kind: &str,
    expected_kind: &str,
    metadata: &Metadata,
    noun: &str,
) -> Vec<Rule> {
    let mut rules = Vec::new();
    if api_version != API_VERSION {
        rules.push(Rule::at(
            "apiVersion",
            format!("{api_version:?} is not supported; expected {API_VERSION}"),
        ));
    }
    if kind != expected_kind {
        rules.push(Rule::at(
            "kind",
            format!("{kind:?} is not supported here; expected {expected_kind}"),
        ));
    }
    if let Some(message) = names::problem(&metadata.name, noun) {
        rules.push(Rule::at("metadata.name", message));
    }
    for key in metadata.labels.keys().filter(|k| k.trim().is_empty()) {
        rules.push(Rule::at_key(
            format!("metadata.labels.{key}"),
            format!("{key:?} is an empty label key; expected a key like team or tier"),
        ));
    }
    rules
}

/// Parses the one document of `text` as `M` and checks it.
pub(crate) fn load_one<M, T>(
    file: &str,
    text: &str,
    kind: &Kind<'_>,
    check: impl FnMut(M, &Value) -> Result<T, Vec<Rule>>,
    name: impl Fn(&T) -> &str,
) -> Result<T, ManifestErrors>
where
    M: DeserializeOwned,
{
    let mut all = load_all(file, text, kind, check, name)?;
    if all.len() == 1
        && let Some(one) = all.pop()
    {
        return Ok(one);
    }
    Err(ManifestErrors(vec![error_at(
        file,
        None,
        String::new(),
        format!(
            "this file holds {} {}s; expected exactly one",
            all.len(),
            kind.noun
        ),
    )]))
}

/// Parses every document of `text` (separated by `---`) as `M` and checks each;
/// names must be unique within the file. Every problem of every document, in file
/// order.
pub(crate) fn load_all<M, T>(
    file: &str,
    text: &str,
    kind: &Kind<'_>,
    mut check: impl FnMut(M, &Value) -> Result<T, Vec<Rule>>,
    name: impl Fn(&T) -> &str,
) -> Result<Vec<T>, ManifestErrors>
where
    M: DeserializeOwned,
{
    let mut errors = Vec::new();
    let mut count = 0;
    for de in super::load::yaml_documents(file, text)? {
        if let Err(e) = IgnoredAny::deserialize(de) {
            errors.push(from_yaml(file, text, count, &e, true));
            break;
        }
        count += 1;
    }
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
    let mut values: Vec<(usize, T)> = Vec::new();
    let mut unlocated = 0;
    let mut docs = yaml_serde::Deserializer::from_str(text)
        .take(count)
        .enumerate();
    for (doc, value) in &written {
        let Some((_, de)) = docs.find(|(i, _)| i == doc) else {
            break;
        };
        let manifest = match M::deserialize(de) {
            Ok(m) => m,
            Err(e) => {
                errors.push(from_yaml(file, text, *doc, &e, false));
                continue;
            }
        };
        match check(manifest, value) {
            Ok(v) => values.push((*doc, v)),
            Err(rules) => {
                for rule in rules {
                    if errors.len() < MAX_LOCATED_ERRORS {
                        errors.push(located(file, text, *doc, rule));
                    } else {
                        unlocated += 1;
                    }
                }
            }
        }
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    let name_path = FieldPath::root().key("metadata").key("name");
    for (doc, v) in &values {
        let n = name(v);
        if let Some(&first) = names.get(n) {
            let first_line = locate::locate(text, first, &name_path, false)
                .map_or_else(|| "above".to_string(), |p| format!("at line {}", p.line));
            errors.push(error_at(
                file,
                locate::locate(text, *doc, &name_path, false),
                name_path.to_string(),
                format!(
                    "{n:?} is already the name of the {} {first_line}; expected a different \
                     name for each {} in a file",
                    kind.noun, kind.noun
                ),
            ));
        } else {
            names.insert(n.to_string(), *doc);
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
    if errors.is_empty() && values.is_empty() {
        errors.push(error_at(
            file,
            None,
            String::new(),
            format!(
                "no {} found; expected a YAML document with apiVersion: {API_VERSION}, kind: \
                 {}, metadata and spec",
                kind.noun, kind.kind
            ),
        ));
    }
    if errors.is_empty() {
        return Ok(values.into_iter().map(|(_, v)| v).collect());
    }
    errors.sort_by_key(|e| (e.line.unwrap_or(usize::MAX), e.column.unwrap_or(0)));
    Err(ManifestErrors(errors))
}

/// Rules about a value that came from no file (an API body): named by `source`
/// and the field path, without a line.
pub(crate) fn unlocated(source: &str, rules: Vec<Rule>) -> ManifestErrors {
    ManifestErrors(
        rules
            .into_iter()
            .map(|r| ManifestError {
                file: source.to_string(),
                line: None,
                column: None,
                path: r.path,
                message: r.message,
            })
            .collect(),
    )
}

fn located(file: &str, text: &str, document: usize, rule: Rule) -> ManifestError {
    let path = FieldPath::parse(&rule.path).unwrap_or_default();
    let at = locate::locate(text, document, &path, rule.at_key);
    error_at(file, at, rule.path, rule.message)
}

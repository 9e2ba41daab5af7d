//! What changed between two manifests of a job, field by field (`job plan`,
//! `job history`): pure, on the YAML values, so that comments and layout do not
//! count as changes.

use serde::Serialize;
use yaml_serde::Value;

/// The most changes listed for one pair of manifests; more are counted in one
/// last entry (path `…`), so that an answer stays small.
pub const MAX_CHANGES: usize = 200;

/// One changed field: its path (`spec.task.env.LEVEL`, `spec.ports[0].port`),
/// and its value before and after (`None`: absent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FieldChange {
    /// The field's path.
    pub path: String,
    /// The value before, as YAML on one line; absent when the field is new.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<String>,
    /// The value after; absent when the field was removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<String>,
}

/// The fields that differ from `old` to `new` (each a job manifest's text, `None`
/// for none), in path order. Text that does not parse as one YAML document
/// counts as an empty one (the stored versions always parse; a submitted one is
/// checked before it is compared).
pub fn manifest_changes(old: Option<&str>, new: &str) -> Vec<FieldChange> {
    let old = old.map_or(Value::Null, parse);
    let new = parse(new);
    let mut out = Vec::new();
    walk(&mut String::new(), Some(&old), Some(&new), &mut out);
    if out.len() > MAX_CHANGES {
        let more = out.len() - MAX_CHANGES;
        out.truncate(MAX_CHANGES);
        out.push(FieldChange {
            path: "…".into(),
            old: None,
            new: Some(format!("{more} more changes")),
        });
    }
    out
}

fn parse(text: &str) -> Value {
    super::yaml_documents("manifest", text)
        .ok()
        .and_then(|mut docs| docs.next())
        .and_then(|doc| <Value as serde::Deserialize>::deserialize(doc).ok())
        .unwrap_or(Value::Null)
}

/// A scalar (or an empty collection) as YAML on one line.
fn one_line(v: &Value) -> String {
    match v {
        Value::String(s) => {
            if s.contains('\n') || s.is_empty() || s.trim() != s {
                format!("{s:?}")
            } else {
                s.clone()
            }
        }
        other => yaml_serde::to_string(other)
            .map(|t| t.trim_end().replace('\n', " "))
            .unwrap_or_default(),
    }
}

fn walk(path: &mut String, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<FieldChange>) {
    if out.len() > MAX_CHANGES {
        // Counted, not described: one more is enough to say "more".
        return;
    }
    let old = old.map(strip_tags);
    let new = new.map(strip_tags);
    if old == new {
        return;
    }
    match (old, new) {
        (Some(Value::Mapping(a)), Some(Value::Mapping(b))) if !a.is_empty() || !b.is_empty() => {
            let mut keys: Vec<String> = a.keys().chain(b.keys()).map(one_line).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let find = |m: &yaml_serde::Mapping| {
                    m.iter()
                        .find(|(k, _)| one_line(k) == key)
                        .map(|(_, v)| v.clone())
                };
                let at = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&key);
                walk(path, find(a).as_ref(), find(b).as_ref(), out);
                path.truncate(at);
            }
        }
        (Some(Value::Sequence(a)), Some(Value::Sequence(b))) => {
            for i in 0..a.len().max(b.len()) {
                let at = path.len();
                path.push_str(&format!("[{i}]"));
                walk(path, a.get(i), b.get(i), out);
                path.truncate(at);
            }
        }
        (Some(Value::Null), Some(b)) if path.is_empty() => {
            // A new job: every field is new.
            walk(path, Some(&empty_like(b)), Some(b), out);
        }
        (old, new) => {
            // A whole subtree came or went: listed leaf by leaf.
            let nested = |v: Option<&Value>| {
                matches!(v, Some(Value::Mapping(m)) if !m.is_empty())
                    || matches!(v, Some(Value::Sequence(s)) if !s.is_empty())
            };
            if nested(old) && new.is_none() {
                walk(path, old, old.map(empty_like).as_ref(), out);
                return;
            }
            if nested(new) && old.is_none() {
                walk(path, new.map(empty_like).as_ref(), new, out);
                return;
            }
            out.push(FieldChange {
                path: if path.is_empty() {
                    ".".into()
                } else {
                    path.clone()
                },
                old: old.map(one_line),
                new: new.map(one_line),
            });
        }
    }
}

/// An empty collection of `v`'s kind, so that every leaf of `v` shows as added
/// (or removed).
fn empty_like(v: &Value) -> Value {
    match v {
        Value::Mapping(_) => Value::Mapping(yaml_serde::Mapping::new()),
        Value::Sequence(_) => Value::Sequence(Vec::new()),
        _ => Value::Null,
    }
}

fn strip_tags(v: &Value) -> &Value {
    match v {
        Value::Tagged(t) => strip_tags(&t.value),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {name: web}\nspec:\n  replicas: 2 # two\n  task:\n    image: nginx:1.26\n    env: {A: \"1\"}\n    ports: [{name: http, port: 80}]\n";

    #[test]
    fn changed_added_and_removed_fields_are_listed_by_path() {
        let new = OLD
            .replace("replicas: 2 # two", "replicas: 3")
            .replace("{A: \"1\"}", "{B: \"2\"}")
            .replace("port: 80", "port: 8080");
        let changes = manifest_changes(Some(OLD), &new);
        let line = |c: &FieldChange| format!("{} {:?} {:?}", c.path, c.old, c.new);
        let got: Vec<String> = changes.iter().map(line).collect();
        assert_eq!(
            got,
            [
                "spec.replicas Some(\"2\") Some(\"3\")",
                "spec.task.env.A Some(\"1\") None",
                "spec.task.env.B None Some(\"2\")",
                "spec.task.ports[0].port Some(\"80\") Some(\"8080\")",
            ]
        );
    }

    #[test]
    fn comments_and_layout_are_no_change_and_a_new_job_is_all_new() {
        let relaid = "apiVersion: novacron.io/v1\nkind: Job\nmetadata:\n  name: web\nspec: {replicas: 2, task: {image: \"nginx:1.26\", env: {A: \"1\"}, ports: [{port: 80, name: http}]}}\n";
        assert_eq!(manifest_changes(Some(OLD), relaid), vec![]);
        let all = manifest_changes(None, OLD);
        assert!(
            all.iter().all(|c| c.old.is_none() && c.new.is_some()),
            "{all:?}"
        );
        assert!(all.iter().any(|c| c.path == "spec.task.image"), "{all:?}");
        assert_eq!(all.len(), 8, "{all:?}");
    }
}

//! Scaling a stored job manifest: `spec.replicas` set to a new count, everything
//! else kept. `novacron job scale` and the controller's dashboard both submit the
//! result as a new version of the job.

use serde::Deserialize;

use super::yaml_documents;

/// `text` (a stored job manifest) with `spec.replicas` set to `replicas`. The
/// `replicas:` line is edited in place when that changes exactly `spec.replicas`
/// (comments and layout stay); otherwise the manifest is written out again from
/// its parsed value (comments are lost, the meaning is kept). Either way the
/// result differs from `text` in `spec.replicas` only. `file` names the manifest
/// in errors.
pub fn scaled_manifest(file: &str, text: &str, replicas: u32) -> Result<String, String> {
    let parse = |t: &str| -> Result<yaml_serde::Value, String> {
        let mut docs = yaml_documents(file, t).map_err(|e| e.to_string())?;
        let doc = docs
            .next()
            .ok_or_else(|| format!("{file}: the stored manifest is empty"))?;
        yaml_serde::Value::deserialize(doc).map_err(|e| format!("{file}: {e}"))
    };
    let original = parse(text)?;
    let mut wanted = original.clone();
    match wanted.get_mut("spec") {
        Some(yaml_serde::Value::Mapping(spec)) => {
            spec.insert(
                yaml_serde::Value::String("replicas".into()),
                yaml_serde::Value::Number(replicas.into()),
            );
        }
        _ => return Err(format!("{file}: the stored manifest has no spec mapping")),
    }
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let indent = line.len() - line.trim_start().len();
        let Some(rest) = line.trim_start().strip_prefix("replicas:") else {
            continue;
        };
        let digits = rest.trim_start();
        let value_at = line.len() - digits.len();
        let end = digits
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(digits.len());
        if end == 0 || indent == 0 {
            continue;
        }
        let edited: String = text
            .split_inclusive('\n')
            .enumerate()
            .map(|(j, l)| {
                if j == i {
                    format!("{}{replicas}{}", &l[..value_at], &l[value_at + end..])
                } else {
                    l.to_string()
                }
            })
            .collect();
        if parse(&edited).ok().as_ref() == Some(&wanted) {
            return Ok(edited);
        }
    }
    yaml_serde::to_string(&wanted).map_err(|e| format!("{file}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_edits_only_spec_replicas_and_keeps_comments() {
        let text = "# the api\napiVersion: novacron.io/v1\nkind: Job\nmetadata: {name: api}\nspec:\n  type: service\n  replicas: 3   # three\n  task:\n    env: {replicas: \"7\"}\n";
        let scaled = scaled_manifest("f", text, 12).expect("scaled");
        assert_eq!(scaled, text.replace("replicas: 3 ", "replicas: 12 "));
        // No replicas line: the value is written out again with the field added.
        let bare =
            "apiVersion: novacron.io/v1\nkind: Job\nmetadata: {name: api}\nspec: {type: service}\n";
        let scaled = scaled_manifest("f", bare, 2).expect("scaled");
        let v: yaml_serde::Value = yaml_serde::from_str(&scaled).expect("yaml");
        assert_eq!(v["spec"]["replicas"].as_u64(), Some(2));
        assert_eq!(v["metadata"]["name"].as_str(), Some("api"));
        assert!(scaled_manifest("f", "kind: Job\n", 2).is_err());
    }

    #[test]
    fn a_replicas_line_outside_spec_is_not_edited() {
        // The only `replicas:` line is a task's env value: editing it would change
        // more than spec.replicas, so the manifest is written out again.
        let text = "kind: Job\nmetadata: {name: api}\nspec:\n  type: service\n  task:\n    env:\n      replicas: 3\n";
        let scaled = scaled_manifest("f", text, 5).expect("scaled");
        let v: yaml_serde::Value = yaml_serde::from_str(&scaled).expect("yaml");
        assert_eq!(v["spec"]["replicas"].as_u64(), Some(5));
        assert_eq!(v["spec"]["task"]["env"]["replicas"].as_u64(), Some(3));
    }
}

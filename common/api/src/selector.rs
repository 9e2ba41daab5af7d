//! Label selectors as `POST /v1/exec` and the CLI take them: `key=value[,key=value...]`.

use std::collections::BTreeMap;

/// Parses a label selector `key=value[,key=value...]` (spaces around items are
/// ignored).
pub fn parse_selector(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut pairs = BTreeMap::new();
    for item in text.split(',').map(str::trim) {
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!(
                "selector item {item:?} is not key=value; use e.g. zone=a or zone=a,pool=gpu"
            ));
        };
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() {
            return Err(format!(
                "selector item {item:?} has an empty key; use e.g. zone=a"
            ));
        }
        if let Some(old) = pairs.insert(key.to_owned(), value.to_owned())
            && old != value
        {
            return Err(format!(
                "selector asks for {key}={old} and {key}={value}; a node has one value per label"
            ));
        }
    }
    Ok(pairs)
}

/// A selector as people write it: `zone=a,pool=gpu`.
pub fn selector_text(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_parse() {
        assert_eq!(parse_selector("zone=a"), Ok(map(&[("zone", "a")])));
        assert_eq!(
            parse_selector(" zone=a , pool=gpu"),
            Ok(map(&[("zone", "a"), ("pool", "gpu")]))
        );
        assert_eq!(parse_selector("zone="), Ok(map(&[("zone", "")])));
        assert!(
            parse_selector("zone")
                .expect_err("no =")
                .contains("\"zone\" is not key=value")
        );
        assert!(
            parse_selector("=a")
                .expect_err("no key")
                .contains("empty key")
        );
        assert!(
            parse_selector("zone=a,zone=b")
                .expect_err("conflict")
                .contains("zone=a and zone=b")
        );
        assert_eq!(parse_selector("zone=a,zone=a"), Ok(map(&[("zone", "a")])));
    }
}

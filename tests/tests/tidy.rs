//! Rules of ARCHITECTURE.md that the code itself can check.

use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Issue 12: YAML from outside reaches yaml_serde only after the manifest
/// pre-scan (`manifest::yaml_documents` or `guard::check`), which refuses what
/// would make the parse slow. Only the loaders (which run the pre-scan first) and
/// tests that read back our own output may call yaml_serde's parsers directly.
#[test]
fn yaml_is_parsed_only_through_the_guarded_loader() {
    const PARSERS: &[&str] = &[
        "yaml_serde::Deserializer::from",
        "yaml_serde::from_str",
        "yaml_serde::from_slice",
        "yaml_serde::from_reader",
        "yaml_serde::from_value",
    ];
    // The loaders (each runs `guard::check` before its first parse).
    const LOADERS: &[&str] = &[
        "common/src/manifest/load.rs",
        "common/src/manifest/document.rs",
        "common/src/manifest/locate.rs",
        "controller/src/pools.rs",
    ];
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in ["common/src", "controller/src", "agent/src"] {
        sources(&root.join(dir), &mut files);
    }
    let mut offenders = Vec::new();
    for file in files {
        let rel = file
            .strip_prefix(&root)
            .expect("under the root")
            .to_string_lossy()
            .replace('\\', "/");
        if LOADERS.contains(&rel.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable");
        // Unit tests at the bottom of a file may read back what the code wrote.
        let code = text.split("#[cfg(test)]").next().unwrap_or(&text);
        let in_test_file = rel.ends_with("/tests.rs");
        for (i, line) in code.lines().enumerate() {
            if !in_test_file && PARSERS.iter().any(|p| line.contains(p)) {
                offenders.push(format!("{rel}:{}: {}", i + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "parse YAML through novacron_common::manifest::yaml_documents instead:\n{}",
        offenders.join("\n")
    );
}

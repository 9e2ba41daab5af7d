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

/// Every source file of the product crates (common, the API types, controller, the
/// CLI, agent): its path from the workspace root, with `/`, and its text.
fn product_sources() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for dir in [
        "common/src",
        "common/api/src",
        "controller/src",
        "controller/cli/src",
        "agent/src",
    ] {
        sources(&root.join(dir), &mut files);
    }
    files
        .into_iter()
        .map(|file| {
            let rel = file
                .strip_prefix(&root)
                .expect("under the root")
                .to_string_lossy()
                .replace('\\', "/");
            let text = std::fs::read_to_string(&file).expect("readable");
            (rel, text)
        })
        .collect()
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
    let mut offenders = Vec::new();
    for (rel, text) in product_sources() {
        if LOADERS.contains(&rel.as_str()) {
            continue;
        }
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

/// The top-level modules of a crate's `src` and, for each, the top-level modules
/// it names through `crate::` (in `use` lines or paths), tests excluded.
fn module_edges(
    src: &Path,
) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut files = Vec::new();
    sources(src, &mut files);
    let mut edges: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        let first = rel
            .components()
            .next()
            .expect("a component")
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if ["lib", "main", "bin"].contains(&first.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("readable");
        let code = text.split("#[cfg(test)]").next().unwrap_or(&text);
        let targets = edges.entry(first.clone()).or_default();
        targets.extend(crate_paths(code).into_iter().filter(|t| *t != first));
    }
    edges
}

/// The first segment after every `crate::` in `code`, also inside `use crate::{a, b}`.
fn crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            for item in inner.split(',') {
                let name = ident(item.trim());
                if !name.is_empty() && name != "self" {
                    out.push(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                out.push(name);
            }
        }
    }
    out
}

/// The strongly connected groups of more than one module (Tarjan), each sorted.
fn cycles(
    edges: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        edges: &'a std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        index: std::collections::BTreeMap<&'a str, usize>,
        low: std::collections::BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: std::collections::BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.edges.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.edges.contains_key(w) {
                    continue;
                }
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut group = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    group.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if group.len() > 1 {
                    group.sort();
                    self.out.push(group);
                }
            }
        }
    }
    let mut t = Tarjan {
        edges,
        index: Default::default(),
        low: Default::default(),
        stack: Vec::new(),
        on_stack: Default::default(),
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out.sort();
    t.out
}

/// The module cycles that existed when this rule was written (issue 13 breaks
/// them up): a cycle may shrink or vanish, never grow or appear. When one
/// shrinks, shrink its entry here.
const KNOWN_CYCLES: &[(&str, &[&str])] = &[
    ("common", &["autoscale", "manifest", "scheduler"]),
    (
        "controller",
        &[
            "api",
            "autoscaler",
            "cert_api",
            "certs",
            "costs",
            "events",
            "exec",
            "heavy",
            "link",
            "metrics",
            "migrate",
            "migrate_api",
            "policies",
            "pool_api",
            "pools",
            "providers",
            "registry",
            "store",
            "workloads",
        ],
    ),
];

/// Issue 13: no new module cycle inside any crate (`use crate::` edges between
/// top-level modules); the known ones may only shrink.
#[test]
fn no_module_cycle_appears_or_grows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut problems = Vec::new();
    for krate in [
        "common",
        "common/api",
        "agent",
        "controller",
        "controller/cli",
        "tests",
    ] {
        for cycle in cycles(&module_edges(&root.join(krate).join("src"))) {
            let allowed = KNOWN_CYCLES
                .iter()
                .find(|(k, _)| *k == krate)
                .is_some_and(|(_, known)| cycle.iter().all(|m| known.contains(&m.as_str())));
            if !allowed {
                problems.push(format!("{krate}: {}", cycle.join(" <-> ")));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "module cycles (a module must not import, through others, a module that imports it):\n{}",
        problems.join("\n")
    );
}

/// The checker itself finds a cycle that is added, and none in a layered tree.
#[test]
fn the_cycle_checker_finds_an_added_cycle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path();
    std::fs::write(
        src.join("lib.rs"),
        "pub mod http; pub mod services; pub mod state;",
    )
    .expect("write");
    std::fs::write(src.join("http.rs"), "use crate::services::Workloads;\n").expect("write");
    std::fs::create_dir(src.join("services")).expect("mkdir");
    std::fs::write(src.join("services/mod.rs"), "use crate::{state, self};\n").expect("write");
    std::fs::write(
        src.join("state.rs"),
        "pub fn f() {}\n#[cfg(test)]\nmod t { use crate::http; }\n",
    )
    .expect("write");
    assert!(cycles(&module_edges(src)).is_empty(), "layered: no cycle");
    std::fs::write(
        src.join("state.rs"),
        "fn g() -> crate::http::Thing { todo!() }\n",
    )
    .expect("write");
    assert_eq!(
        cycles(&module_edges(src)),
        vec![vec!["http".to_string(), "services".into(), "state".into()]]
    );
}

/// Issue 13: bincode is derived or called only by the wire protocol (and the
/// checkpoint bundle records that still derive it, until they move), and bollard
/// is known only by the agent's Docker adapters and the controller's docker node
/// provider. A new file using either fails here.
#[test]
fn bincode_and_bollard_stay_where_they_are_allowed() {
    let rules: &[(&str, &[&str])] = &[
        (
            "bincode",
            &["common/src/wire.rs", "common/src/checkpoint.rs"],
        ),
        (
            "bollard",
            &[
                "agent/src/runtime/docker.rs",
                "agent/src/runtime/mod.rs",
                "agent/src/runtime/docker/version.rs",
                "agent/src/runtime/docker/checkpoint.rs",
                "controller/src/providers/docker.rs",
                "controller/src/providers/mod.rs",
            ],
        ),
    ];
    let mut offenders = Vec::new();
    for (rel, text) in product_sources() {
        for (word, allowed) in rules {
            if !allowed.contains(&rel.as_str()) && text.contains(&format!("{word}::")) {
                offenders.push(format!("{rel} uses {word}"));
            }
        }
    }
    assert!(offenders.is_empty(), "{}", offenders.join("\n"));
}

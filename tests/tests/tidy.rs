//! Rules of ARCHITECTURE.md that the code itself can check.

use std::collections::{BTreeMap, BTreeSet};
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

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every crate under `root`: a folder with a `Cargo.toml` and a `src/`, found by
/// walking (build output, VCS and hidden folders skipped), as its path from `root`
/// with `/`, sorted.
fn crate_dirs(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        if dir.join("Cargo.toml").is_file() && dir.join("src").is_dir() {
            let rel = dir.strip_prefix(root).expect("under the root");
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
        for entry in std::fs::read_dir(dir).expect("readable dir") {
            let path = entry.expect("entry").path();
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let skip = name
                .as_deref()
                .is_none_or(|n| n.starts_with('.') || n == "target" || n == "node_modules");
            if path.is_dir() && !skip {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

/// Every source file of every crate's `src/`: its path from the workspace root,
/// with `/`, and its text.
fn product_sources() -> Vec<(String, String)> {
    let root = root();
    let mut files = Vec::new();
    for dir in crate_dirs(&root) {
        sources(&root.join(dir).join("src"), &mut files);
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

/// `text` without `//` comments (doc comments included), as the code lines.
fn code_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.split("//").next().unwrap_or(line)))
}

/// The crates walk finds every crate, nested ones included, and nothing else.
#[test]
fn every_crate_is_found_by_walking() {
    let dirs = crate_dirs(&root());
    for expected in [
        "agent",
        "common",
        "common/api",
        "common/core",
        "common/wire",
        "controller",
        "controller/cli",
        "tests",
    ] {
        assert!(dirs.iter().any(|d| d == expected), "{expected} in {dirs:?}");
    }
    assert!(
        !dirs.iter().any(|d| d.is_empty()),
        "the root is a workspace"
    );
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
        "common/core/src/manifest/load.rs",
        "common/core/src/manifest/document.rs",
        "common/core/src/manifest/locate.rs",
        "controller/src/services/pools.rs",
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
        "parse YAML through novacron_core::manifest::yaml_documents instead:\n{}",
        offenders.join("\n")
    );
}

/// The module path of a source file under `src` (`a/b.rs` and `a/b/mod.rs` are
/// `a::b`, `lib.rs` is the root), or `None` for a binary under `src/bin`.
fn module_path(rel: &Path) -> Option<Vec<String>> {
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    let stem = last.trim_end_matches(".rs").to_string();
    if !["mod", "lib", "main"].contains(&stem.as_str()) {
        parts.push(stem);
    }
    if parts.first().is_some_and(|p| p == "bin") {
        return None;
    }
    Some(parts)
}

/// Every module path `code` (of the module `me`) names through `crate::` or
/// `super::`, also inside `crate::{a, b::c}` groups; leading `super`s are dropped
/// and the path resolved from `me`'s parent.
fn module_refs(code: &str, me: &[String]) -> Vec<Vec<String>> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let word_start = |i: usize| {
        code[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
    };
    let resolve = |kind: &str, parts: Vec<String>| -> Vec<String> {
        let mut base: Vec<String> = if kind == "crate" {
            Vec::new()
        } else {
            me[..me.len().saturating_sub(1)].to_vec()
        };
        base.extend(parts);
        base
    };
    let mut out = Vec::new();
    for kind in ["crate", "super"] {
        let prefix = format!("{kind}::");
        for (i, _) in code.match_indices(&prefix) {
            if !word_start(i) {
                continue;
            }
            let rest = &code[i + prefix.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let inner = &group[..group.find('}').unwrap_or(group.len())];
                for item in inner.split(',') {
                    let parts: Vec<String> = item
                        .trim()
                        .split("::")
                        .map(|p| ident(p.trim()))
                        .filter(|p| !p.is_empty() && p != "self")
                        .collect();
                    if !parts.is_empty() {
                        out.push(resolve(kind, parts));
                    }
                }
                continue;
            }
            let mut parts = Vec::new();
            let mut tail = rest;
            loop {
                let name = ident(tail);
                if name.is_empty() {
                    break;
                }
                tail = &tail[name.len()..];
                parts.push(name);
                match tail.strip_prefix("::") {
                    Some(t) => tail = t,
                    None => break,
                }
            }
            while parts.first().is_some_and(|p| p == "super") {
                parts.remove(0);
            }
            out.push(resolve(kind, parts));
        }
    }
    out
}

/// The module graph of a crate's `src`, the way `shared/tools/module_cycles.py`
/// builds it: every `crate::`/`super::` path is an edge from the file's module to the
/// longest module it names; an edge between a module and its own ancestor is dropped
/// (a child may use its parent); every other edge is lifted to the two sibling
/// modules under their common ancestor. Modules are written `a::b`.
fn module_edges(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    sources(src, &mut files);
    let mut mods: BTreeMap<Vec<String>, String> = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(src).expect("under src");
        if let Some(path) = module_path(rel) {
            mods.insert(path, std::fs::read_to_string(&file).expect("readable"));
        }
    }
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (me, text) in &mods {
        let code: String = code_lines(text)
            .map(|(_, line)| line)
            .collect::<Vec<_>>()
            .join("\n");
        for mut r in module_refs(&code, me) {
            while !r.is_empty() && !mods.contains_key(&r) {
                r.pop();
            }
            if r.is_empty() || r == *me {
                continue;
            }
            let k = me.iter().zip(&r).take_while(|(a, b)| a == b).count();
            if k == me.len() || k == r.len() {
                continue;
            }
            let a = me[..=k].join("::");
            let b = r[..=k].join("::");
            edges.entry(b.clone()).or_default();
            edges.entry(a).or_default().insert(b);
        }
    }
    edges
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

/// Issue 13: no module cycle inside any crate (every module, nested ones too, as
/// `shared/tools/module_cycles.py` sees them).
#[test]
fn no_module_cycle_appears() {
    let root = root();
    let mut problems = Vec::new();
    for krate in crate_dirs(&root) {
        for cycle in cycles(&module_edges(&root.join(&krate).join("src"))) {
            problems.push(format!("{krate}: {}", cycle.join(" <-> ")));
        }
    }
    assert!(
        problems.is_empty(),
        "module cycles (a module must not import, through others, a module that imports it):\n{}",
        problems.join("\n")
    );
}

/// The checker finds a cycle that is added (between top-level modules, and between
/// nested siblings), and none in a layered tree where children use their parents.
#[test]
fn the_cycle_checker_finds_an_added_cycle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path();
    let write = |path: &str, text: &str| {
        let path = src.join(path);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        std::fs::write(path, text).expect("write");
    };
    write("lib.rs", "pub mod http; pub mod services; pub mod state;");
    write("http.rs", "use crate::services::Workloads;\n");
    write(
        "services/mod.rs",
        "mod a; mod b;\nuse crate::{state, self};\nuse a::X;\n",
    );
    write(
        "services/a.rs",
        "use super::b::Y;\nuse crate::services::Z;\n",
    );
    write(
        "services/b.rs",
        "use super::*; // crate::services::a would be a cycle\n",
    );
    write("state.rs", "pub fn f() {}\n");
    assert!(cycles(&module_edges(src)).is_empty(), "layered: no cycle");

    write("state.rs", "fn g() -> crate::http::Thing { todo!() }\n");
    assert_eq!(
        cycles(&module_edges(src)),
        vec![vec!["http".to_string(), "services".into(), "state".into()]]
    );

    write("state.rs", "pub fn f() {}\n");
    write("services/b.rs", "use crate::services::a::X;\n");
    assert_eq!(
        cycles(&module_edges(src)),
        vec![vec!["services::a".to_string(), "services::b".into()]],
        "a cycle between nested siblings"
    );
}

/// The crate that may use bincode: the wire protocol and the checkpoint records.
const WIRE_CRATE: &str = "common/wire";
/// The pure core.
const CORE_CRATE: &str = "common/core";

/// Where a crate other than the wire crate uses bincode: a `bincode::` path in code
/// (comments aside) of a source file, or a `bincode` dependency in a `Cargo.toml`
/// (the workspace's own table of versions aside).
fn bincode_offenses(rel: &str, text: &str) -> Vec<String> {
    if rel.starts_with(&format!("{WIRE_CRATE}/")) || rel == "Cargo.toml" {
        return Vec::new();
    }
    let manifest = rel.ends_with("Cargo.toml");
    code_lines(text)
        .filter(|(_, line)| {
            if manifest {
                let key = line.trim_start();
                key.starts_with("bincode") || key.contains("dependencies.bincode")
            } else {
                line.contains("bincode::")
            }
        })
        .map(|(n, line)| format!("{rel}:{n}: {}", line.trim()))
        .collect()
}

/// Where a source file of the core does I/O, spawns, or reads the clock, outside
/// its `#[cfg(test)]` module (a `tests.rs` file is one).
fn core_purity_offenses(rel: &str, text: &str) -> Vec<String> {
    const FORBIDDEN: &[&str] = &[
        "tokio",
        "std::fs",
        "std::net",
        "std::process",
        "std::thread",
        "SystemTime::now",
        "Instant::now",
    ];
    const STD_GROUPED: &[&str] = &["fs", "net", "process", "thread"];
    if !rel.starts_with(&format!("{CORE_CRATE}/src/")) || rel.ends_with("/tests.rs") {
        return Vec::new();
    }
    let code = text.split("#[cfg(test)]").next().unwrap_or(text);
    let mut out = Vec::new();
    for (n, line) in code_lines(code) {
        let grouped = line.split_once("std::{").is_some_and(|(_, group)| {
            group
                .split([',', '}', ' ', ':'])
                .any(|item| STD_GROUPED.contains(&item.trim()))
        });
        if grouped || FORBIDDEN.iter().any(|f| line.contains(f)) {
            out.push(format!("{rel}:{n}: {}", line.trim()));
        }
    }
    out
}

/// Issue 13: bincode is a dependency of the wire crate alone, and only its code
/// names it.
#[test]
fn bincode_stays_in_the_wire_crate() {
    let root = root();
    let mut offenders = Vec::new();
    for (rel, text) in product_sources() {
        offenders.extend(bincode_offenses(&rel, &text));
    }
    for dir in crate_dirs(&root).into_iter().chain(["fuzz".to_string()]) {
        let rel = format!("{dir}/Cargo.toml");
        if let Ok(text) = std::fs::read_to_string(root.join(&rel)) {
            offenders.extend(bincode_offenses(&rel, &text));
        }
    }
    assert!(
        offenders.is_empty(),
        "bincode belongs to {WIRE_CRATE} (use its frame functions and its Encode/Decode re-exports):\n{}",
        offenders.join("\n")
    );
}

/// Issue 13: the core is pure: no tokio, no file system, network, processes or
/// threads, and no reading the clock (callers pass `now`); its manifest lists no
/// tokio.
#[test]
fn the_core_does_no_io_and_reads_no_clock() {
    let root = root();
    let mut offenders = Vec::new();
    for (rel, text) in product_sources() {
        offenders.extend(core_purity_offenses(&rel, &text));
    }
    let manifest = std::fs::read_to_string(root.join(CORE_CRATE).join("Cargo.toml"))
        .expect("the core's Cargo.toml");
    offenders.extend(
        code_lines(&manifest)
            .filter(|(_, line)| line.trim_start().starts_with("tokio"))
            .map(|(n, line)| format!("{CORE_CRATE}/Cargo.toml:{n}: {}", line.trim())),
    );
    assert!(
        offenders.is_empty(),
        "the core takes its inputs and returns decisions; do the I/O in the callers:\n{}",
        offenders.join("\n")
    );
}

/// The bincode and purity checkers fail on what they forbid and pass the rest.
#[test]
fn the_bincode_and_purity_checkers_can_fail() {
    let encode = "fn f() { bincode::encode_to_vec(x, c); }\n";
    assert_eq!(bincode_offenses("common/src/x.rs", encode).len(), 1);
    assert!(bincode_offenses("common/wire/src/lib.rs", encode).is_empty());
    assert!(bincode_offenses("common/src/x.rs", "// bincode::Encode\n").is_empty());
    let dep = "[dependencies]\nbincode.workspace = true\n";
    assert_eq!(bincode_offenses("agent/Cargo.toml", dep).len(), 1);
    assert!(bincode_offenses("common/wire/Cargo.toml", dep).is_empty());
    let core = "common/core/src/scheduler/place.rs";
    for bad in [
        "use std::fs;",
        "use std::{collections::BTreeMap, net::TcpStream};",
        "use std::{fs, io};",
        "let t = std::time::Instant::now();",
        "let t = SystemTime::now();",
        "tokio::spawn(f);",
        "std::thread::sleep(d);",
        "std::process::exit(1);",
    ] {
        assert_eq!(core_purity_offenses(core, bad).len(), 1, "{bad}");
        assert!(core_purity_offenses("common/src/files.rs", bad).is_empty());
    }
    let test_only = "fn f() {}\n#[cfg(test)]\nmod tests { use std::fs; }\n";
    assert!(core_purity_offenses(core, test_only).is_empty());
    assert!(core_purity_offenses("common/core/src/scheduler/tests.rs", "use std::fs;").is_empty());
    assert!(core_purity_offenses(core, "//! no tokio here\n").is_empty());
}

/// Issue 13: bollard is known only by the agent's Docker adapters and the
/// controller's docker node provider. A new file using it fails here.
#[test]
fn bollard_stays_where_it_is_allowed() {
    const ALLOWED: &[&str] = &[
        "agent/src/runtime/docker.rs",
        "agent/src/runtime/docker/version.rs",
        "agent/src/runtime/docker/checkpoint.rs",
        "agent/src/runtime/docker/sandbox.rs",
        "controller/src/services/providers/docker.rs",
    ];
    let mut offenders = Vec::new();
    for (rel, text) in product_sources() {
        if ALLOWED.contains(&rel.as_str()) {
            continue;
        }
        for (n, line) in code_lines(&text) {
            if line.contains("bollard::") {
                offenders.push(format!("{rel}:{n} uses bollard"));
            }
        }
    }
    assert!(offenders.is_empty(), "{}", offenders.join("\n"));
}

/// The packages `from` depends on, directly or through others (normal, build and
/// dev dependencies alike), in a graph of each package's name and the names of its
/// dependencies.
fn reachable<'a>(graph: &'a [(String, Vec<String>)], from: &str) -> Vec<&'a str> {
    let mut seen: Vec<&str> = Vec::new();
    let mut todo: Vec<&str> = graph
        .iter()
        .filter(|(name, _)| name == from)
        .flat_map(|(_, deps)| deps.iter().map(String::as_str))
        .collect();
    while let Some(name) = todo.pop() {
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        if let Some((_, deps)) = graph.iter().find(|(n, _)| n == name) {
            todo.extend(deps.iter().map(String::as_str));
        }
    }
    seen
}

/// Issue 13: the operator CLI is a client of the HTTPS API. It depends on the API
/// types and an HTTP client, never on the controller (server) crate, not even
/// through another crate of the workspace (no crate from outside can depend on it).
#[test]
fn the_cli_crate_does_not_depend_on_the_server_crate() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--manifest-path",
        ])
        .arg(root().join("Cargo.toml"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let graph: Vec<(String, Vec<String>)> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .filter_map(|d| d["name"].as_str().map(String::from))
                .collect();
            (p["name"].as_str().expect("name").to_string(), deps)
        })
        .collect();
    for name in ["novacron-cli", "novacron-controller", "novacron-tests"] {
        assert!(
            graph.iter().any(|(n, _)| n == name),
            "{name} is a workspace member"
        );
    }
    assert!(
        !reachable(&graph, "novacron-cli").contains(&"novacron-controller"),
        "novacron-cli depends on novacron-controller; use novacron-api's types and the HTTP API"
    );
    // The check can fail: the tests crate does depend on the server.
    assert!(reachable(&graph, "novacron-tests").contains(&"novacron-controller"));
}

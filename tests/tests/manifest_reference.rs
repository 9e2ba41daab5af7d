//! `docs/manifests.md`, the manifest reference, is generated from the schema: the
//! Rust types the manifests are parsed into (`common/core/src`, with
//! `deny_unknown_fields`), their serde attributes (names, defaults, renames) and
//! their doc comments. This test regenerates it and fails when the committed
//! file differs; `NOVACRON_UPDATE_DOCS=1 cargo nextest run -p novacron-tests
//! --test manifest_reference` writes it.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use quote::ToTokens;

/// The source files that declare the manifest types.
const SOURCES: &[&str] = &[
    "common/core/src/manifest.rs",
    "common/core/src/manifest/health.rs",
    "common/core/src/manifest/lifecycle.rs",
    "common/core/src/manifest/checkpoint.rs",
    "common/core/src/manifest/secret.rs",
    "common/core/src/manifest/vm.rs",
    "common/core/src/autoscale/policy.rs",
    "common/core/src/autoscale/pool.rs",
    "common/wire/src/checkpoint.rs",
];

/// Each kind `novacron apply` takes and the type its manifest parses into.
const KINDS: &[(&str, &str)] = &[
    ("Job", "JobManifest"),
    ("AutoScalingPolicy", "PolicyManifest"),
    ("NodeTemplate", "NodeTemplateManifest"),
    ("NodePool", "NodePoolManifest"),
    ("Secret", "SecretManifest"),
    ("VMTemplate", "VmTemplateManifest"),
];

/// Quantities written as text, and the constant that says what they accept.
const SCALARS: &[(&str, &str, &str)] = &[
    ("Millicores", "CPU", "CPU_ACCEPTED"),
    ("ByteSize", "size", "SIZE_ACCEPTED"),
    ("Duration", "duration", "ACCEPTED"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn reference_path() -> PathBuf {
    root().join("docs/manifests.md")
}

/// A type declared in the sources.
enum Decl {
    Struct {
        docs: String,
        fields: Vec<Field>,
    },
    Enum {
        docs: String,
        variants: Vec<(String, String)>,
    },
}

struct Field {
    name: String,
    docs: String,
    ty: syn::Type,
    optional: bool,
    duration: bool,
}

fn docs_of(attrs: &[syn::Attribute]) -> String {
    let lines: Vec<String> = attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .filter_map(|a| match &a.meta {
            syn::Meta::NameValue(nv) => match &nv.value {
                syn::Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Str(s),
                    ..
                }) => Some(s.value().trim().to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    // Rustdoc links become code: [`X`] and [`X`](path) are `X`.
    let mut text = lines.join(" ").trim().to_string();
    while let Some(start) = text.find("[`") {
        let Some(end) = text[start..].find("`]").map(|e| start + e) else {
            break;
        };
        let inner = text[start + 1..end + 1].to_string();
        let mut rest = end + 2;
        if text[rest..].starts_with('(')
            && let Some(close) = text[rest..].find(')')
        {
            rest += close + 1;
        }
        text.replace_range(start..rest, &inner);
    }
    text.replace('|', "\\|")
}

/// The `#[serde(...)]` items of `attrs`, as `key` or `key = "value"` pairs.
fn serde_items(attrs: &[syn::Attribute]) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for a in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        let _ = a.parse_nested_meta(|meta| {
            let key = meta.path.to_token_stream().to_string();
            let value = match meta.value() {
                Ok(v) => Some(v.parse::<syn::LitStr>()?.value()),
                Err(_) => None,
            };
            out.push((key, value));
            Ok(())
        });
    }
    out
}

fn serde_value(items: &[(String, Option<String>)], key: &str) -> Option<String> {
    items
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.clone())
}

fn rename(name: &str, rule: Option<&str>) -> String {
    let words: Vec<String> = {
        // snake_case fields and CamelCase variants alike.
        let mut words = Vec::new();
        let mut cur = String::new();
        for c in name.chars() {
            if c == '_' {
                words.push(std::mem::take(&mut cur));
            } else if c.is_uppercase() && !cur.is_empty() {
                words.push(std::mem::take(&mut cur));
                cur.extend(c.to_lowercase());
            } else {
                cur.extend(c.to_lowercase());
            }
        }
        words.push(cur);
        words.into_iter().filter(|w| !w.is_empty()).collect()
    };
    match rule {
        Some("camelCase") => words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                if i == 0 {
                    w.clone()
                } else {
                    let mut c = w.chars();
                    c.next()
                        .map(|f| f.to_uppercase().chain(c).collect())
                        .unwrap_or_default()
                }
            })
            .collect(),
        Some("lowercase") => words.concat(),
        Some("kebab-case") => words.join("-"),
        _ => name.to_string(),
    }
}

/// Every struct and enum of the sources, and the string constants.
fn parse_sources() -> (BTreeMap<String, Decl>, BTreeMap<String, String>) {
    let mut decls = BTreeMap::new();
    let mut consts = BTreeMap::new();
    fn walk(
        items: &[syn::Item],
        decls: &mut BTreeMap<String, Decl>,
        consts: &mut BTreeMap<String, String>,
    ) {
        for item in items {
            match item {
                syn::Item::Struct(s) => {
                    let serde = serde_items(&s.attrs);
                    let syn::Fields::Named(named) = &s.fields else {
                        continue;
                    };
                    let fields = named
                        .named
                        .iter()
                        .filter(|f| matches!(f.vis, syn::Visibility::Public(_)))
                        .map(|f| {
                            let fs = serde_items(&f.attrs);
                            let ident = f.ident.as_ref().expect("a named field").to_string();
                            let is_option =
                                f.ty.to_token_stream().to_string().starts_with("Option <");
                            Field {
                                name: serde_value(&fs, "rename").unwrap_or_else(|| {
                                    rename(&ident, serde_value(&serde, "rename_all").as_deref())
                                }),
                                docs: docs_of(&f.attrs),
                                optional: is_option || fs.iter().any(|(k, _)| k == "default"),
                                duration: serde_value(&fs, "with")
                                    .is_some_and(|w| w.ends_with("duration")),
                                ty: f.ty.clone(),
                            }
                        })
                        .collect();
                    decls.insert(
                        s.ident.to_string(),
                        Decl::Struct {
                            docs: docs_of(&s.attrs),
                            fields,
                        },
                    );
                }
                syn::Item::Enum(e) => {
                    let serde = serde_items(&e.attrs);
                    let rule = serde_value(&serde, "rename_all");
                    let variants = e
                        .variants
                        .iter()
                        .map(|v| {
                            let vs = serde_items(&v.attrs);
                            let name = if matches!(v.fields, syn::Fields::Unit) {
                                format!(
                                    "`{}`",
                                    serde_value(&vs, "rename").unwrap_or_else(|| {
                                        rename(&v.ident.to_string(), rule.as_deref())
                                    })
                                )
                            } else {
                                // A variant with data is written in its own form
                                // (a custom parser), which its doc comment gives.
                                format!("a {}", rename(&v.ident.to_string(), Some("lowercase")))
                            };
                            (name, docs_of(&v.attrs))
                        })
                        .collect();
                    decls.insert(
                        e.ident.to_string(),
                        Decl::Enum {
                            docs: docs_of(&e.attrs),
                            variants,
                        },
                    );
                }
                syn::Item::Const(c) => {
                    if let syn::Expr::Lit(syn::ExprLit {
                        lit: syn::Lit::Str(s),
                        ..
                    }) = &*c.expr
                    {
                        consts.insert(c.ident.to_string(), s.value());
                    }
                }
                syn::Item::Mod(m) => {
                    if let Some((_, items)) = &m.content {
                        walk(items, decls, consts);
                    }
                }
                _ => {}
            }
        }
    }
    for file in SOURCES {
        let text = std::fs::read_to_string(root().join(file)).expect("a source file");
        let parsed = syn::parse_file(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        walk(&parsed.items, &mut decls, &mut consts);
    }
    (decls, consts)
}

fn anchor(name: &str) -> String {
    name.to_lowercase()
}

/// How a field's type reads in the reference, and the declared types it names.
fn type_text(
    ty: &syn::Type,
    duration: bool,
    decls: &BTreeMap<String, Decl>,
) -> (String, Vec<String>) {
    if duration {
        return ("[duration](#duration)".into(), Vec::new());
    }
    let syn::Type::Path(p) = ty else {
        return (format!("`{}`", ty.to_token_stream()), Vec::new());
    };
    let Some(last) = p.path.segments.last() else {
        return (format!("`{}`", ty.to_token_stream()), Vec::new());
    };
    let name = last.ident.to_string();
    let args: Vec<&syn::Type> = match &last.arguments {
        syn::PathArguments::AngleBracketed(a) => a
            .args
            .iter()
            .filter_map(|g| match g {
                syn::GenericArgument::Type(t) => Some(t),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    match (name.as_str(), args.as_slice()) {
        ("Option" | "Box", [inner]) => type_text(inner, false, decls),
        ("Vec", [inner]) => {
            let (t, named) = type_text(inner, false, decls);
            (format!("list of {t}"), named)
        }
        ("BTreeMap" | "HashMap", [_, value]) => {
            let (t, named) = type_text(value, false, decls);
            (format!("map of string to {t}"), named)
        }
        ("String", _) => ("string".into(), Vec::new()),
        ("bool", _) => ("boolean".into(), Vec::new()),
        ("u8" | "u16" | "u32" | "u64" | "usize" | "i32" | "i64", _) => {
            ("integer".into(), Vec::new())
        }
        ("f32" | "f64", _) => ("number".into(), Vec::new()),
        _ => {
            if let Some((_, word, _)) = SCALARS.iter().find(|(t, _, _)| *t == name) {
                (format!("[{word}](#{})", anchor(word)), Vec::new())
            } else if decls.contains_key(&name) {
                (format!("[{name}](#{})", anchor(&name)), vec![name])
            } else {
                (format!("`{name}`"), Vec::new())
            }
        }
    }
}

fn generate() -> String {
    let (decls, consts) = parse_sources();
    let mut out = String::new();
    out.push_str(
        "# Manifest reference\n\n\
         <!-- Generated by tests/tests/manifest_reference.rs from the manifest types in \
         common/core/src; do not edit. Regenerate with: \
         NOVACRON_UPDATE_DOCS=1 cargo nextest run -p novacron-tests --test manifest_reference -->\n\n\
         Every manifest is YAML with `apiVersion: novacron.io/v1`, a `kind`, `metadata` \
         and a `spec`; `novacron apply -f FILE` sends it to the controller. A field not \
         listed here is refused, with its line and column. [examples/](../examples/) has \
         a manifest of every kind.\n\n\
         | kind | schema |\n|---|---|\n",
    );
    for (kind, ty) in KINDS {
        let _ = writeln!(out, "| `{kind}` | [{ty}](#{}) |", anchor(ty));
    }
    out.push_str("\n## Quantities\n\n| type | accepted |\n|---|---|\n");
    for (_, word, constant) in SCALARS {
        let accepted = consts
            .get(*constant)
            .unwrap_or_else(|| panic!("no constant {constant} in the sources"));
        let _ = writeln!(
            out,
            "| <a id=\"{}\"></a>{word} | {accepted} |",
            anchor(word)
        );
    }
    out.push_str("\n## Types\n");
    let mut queue: VecDeque<String> = KINDS.iter().map(|(_, t)| t.to_string()).collect();
    let mut done: Vec<String> = Vec::new();
    while let Some(name) = queue.pop_front() {
        if done.contains(&name) {
            continue;
        }
        done.push(name.clone());
        let decl = decls
            .get(&name)
            .unwrap_or_else(|| panic!("{name} is not declared in the sources"));
        let _ = writeln!(out, "\n### {name}\n");
        match decl {
            Decl::Struct { docs, fields, .. } => {
                if !docs.is_empty() {
                    let _ = writeln!(out, "{docs}\n");
                }
                out.push_str("| field | type | required | description |\n|---|---|---|---|\n");
                for f in fields {
                    let (ty, named) = type_text(&f.ty, f.duration, &decls);
                    queue.extend(named);
                    let _ = writeln!(
                        out,
                        "| `{}` | {ty} | {} | {} |",
                        f.name,
                        if f.optional { "no" } else { "yes" },
                        f.docs
                    );
                }
            }
            Decl::Enum { docs, variants, .. } => {
                if !docs.is_empty() {
                    let _ = writeln!(out, "{docs}\n");
                }
                out.push_str("One of:\n\n| value | meaning |\n|---|---|\n");
                for (value, meaning) in variants {
                    let _ = writeln!(out, "| {value} | {meaning} |");
                }
            }
        }
    }
    // Constants named in doc comments read as their values (`API_VERSION` is
    // `novacron.io/v1`).
    for (name, value) in &consts {
        out = out.replace(&format!("`{name}`"), &format!("`{value}`"));
    }
    out
}

#[test]
fn the_manifest_reference_is_generated_from_the_schema() {
    let generated = generate();
    let path = reference_path();
    if std::env::var_os("NOVACRON_UPDATE_DOCS").is_some() {
        std::fs::create_dir_all(path.parent().expect("docs/")).expect("mkdir docs");
        std::fs::write(&path, &generated).expect("write docs/manifests.md");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/manifests.md is stale (or missing): the manifest types changed. Regenerate it with \
         NOVACRON_UPDATE_DOCS=1 cargo nextest run -p novacron-tests --test manifest_reference"
    );
}

/// The generator sees what serde sees: renamed fields, defaults, enum values.
#[test]
fn the_reference_names_fields_as_manifests_write_them() {
    let text = generate();
    for (kind, _) in KINDS {
        assert!(text.contains(&format!("| `{kind}` |")), "{kind}");
    }
    // `job_type` with `rename = "type"`, optional; `task` required.
    assert!(
        text.contains("| `type` | [JobType](#jobtype) | no |"),
        "{text}"
    );
    assert!(
        text.contains("| `task` | [TaskTemplate](#tasktemplate) | yes |"),
        "{text}"
    );
    // camelCase, lowercase enum values, a duration and a CPU quantity.
    assert!(text.contains("| `apiVersion` | string | yes |"), "{text}");
    assert!(text.contains("| `batch` |"), "{text}");
    assert!(text.contains("(#duration)"), "{text}");
    assert!(text.contains("| `cpu` | [CPU](#cpu) |"), "{text}");
    assert!(text.contains("millicores like 500m"), "{text}");
    assert!(text.contains("### NodePoolSpec"), "{text}");
    assert!(!text.contains("[`"), "rustdoc links are rewritten: {text}");
    assert!(
        !text.contains("`API_VERSION`"),
        "constants read as their values: {text}"
    );
}

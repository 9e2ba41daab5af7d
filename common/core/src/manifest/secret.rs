//! `Secret` manifests: named sets of values (passwords, tokens, registry
//! credentials) that jobs reference by name and key.
//!
//! ```yaml
//! apiVersion: novacron.io/v1
//! kind: Secret
//! metadata: {name: registry}
//! spec:
//!   type: registry          # opaque (default) or registry
//!   data:
//!     username: ci
//!     password: s3cret
//!     server: 127.0.0.1:5000
//! ```
//!
//! **Invariant:** no error, message or [`fmt::Debug`] output of this module holds a
//! value: values are read by a deserializer whose errors never quote its input,
//! and [`SecretData`] prints only its keys.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Serialize};
use yaml_serde::Value;

use super::document::{self, Kind, Rule};
use super::{ManifestErrors, Metadata};

/// The `kind` of a secret.
pub const SECRET_KIND: &str = "Secret";
pub use crate::names::{MAX_SECRET_KEY_LEN as MAX_KEY_LEN, MAX_SECRET_KEYS, is_secret_key};
/// Most bytes of all the values of one secret together.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

/// What a secret is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum SecretType {
    /// Any keys and values, delivered to tasks as variables or files.
    #[default]
    Opaque,
    /// Registry credentials (`username`, `password`, optional `server`), used as a
    /// job's `imagePullSecret`.
    Registry,
}

impl fmt::Display for SecretType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SecretType::Opaque => "opaque",
            SecretType::Registry => "registry",
        })
    }
}

/// A value as written in a manifest: a string (quote numbers and booleans). Any
/// other YAML value is refused with a message that does not quote it.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretText(pub String);

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<secret: {} bytes>", self.0.len())
    }
}

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const NOT_TEXT: &str =
            "a secret value must be a string; quote numbers and booleans (\"8080\", \"true\")";
        impl<'de> Visitor<'de> for V {
            type Value = SecretText;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SecretText, E> {
                Ok(SecretText(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<SecretText, E> {
                Ok(SecretText(v))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<SecretText, E> {
                Err(E::custom(NOT_TEXT))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<SecretText, E> {
                Err(E::custom(NOT_TEXT))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<SecretText, E> {
                Err(E::custom(NOT_TEXT))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<SecretText, E> {
                Err(E::custom(NOT_TEXT))
            }
            fn visit_unit<E: de::Error>(self) -> Result<SecretText, E> {
                Err(E::custom(NOT_TEXT))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<SecretText, A::Error> {
                Err(de::Error::custom(NOT_TEXT))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, _: A) -> Result<SecretText, A::Error> {
                Err(de::Error::custom(NOT_TEXT))
            }
        }
        d.deserialize_any(V)
    }
}

/// A `kind: Secret` document as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecretManifest {
    /// Must be `novacron.io/v1`.
    pub api_version: String,
    /// Must be [`SECRET_KIND`].
    pub kind: String,
    /// Its name.
    pub metadata: Metadata,
    /// Type and values.
    pub spec: SecretSpec,
}

/// `spec` of a secret.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecretSpec {
    /// `opaque` (default) or `registry`.
    #[serde(default, rename = "type")]
    pub secret_type: SecretType,
    /// Key → value.
    pub data: BTreeMap<String, SecretText>,
}

/// A secret's keys and values, checked. Its [`fmt::Debug`] shows the keys only.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SecretData(pub BTreeMap<String, String>);

impl fmt::Debug for SecretData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// A checked secret: its name, type and values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Secret {
    /// `metadata.name`.
    pub name: String,
    /// `spec.type`.
    pub secret_type: SecretType,
    /// `spec.data`.
    pub data: SecretData,
}

/// Parses the one `Secret` document of `text`. Errors name keys and rules, never
/// values.
pub fn parse_secret(file: &str, text: &str) -> Result<Secret, ManifestErrors> {
    document::load_one(
        file,
        text,
        &Kind {
            kind: SECRET_KIND,
            noun: "secret",
        },
        |m: SecretManifest, _: &Value| {
            let mut rules =
                document::envelope(&m.api_version, &m.kind, SECRET_KIND, &m.metadata, "secret");
            let data = SecretData(m.spec.data.into_iter().map(|(k, v)| (k, v.0)).collect());
            rules.extend(check_data(m.spec.secret_type, &data, "spec.data"));
            if rules.is_empty() {
                Ok(Secret {
                    name: m.metadata.name,
                    secret_type: m.spec.secret_type,
                    data,
                })
            } else {
                Err(rules)
            }
        },
        |s: &Secret| &s.name,
    )
}

/// Checks a secret that came from no file (`novacron secret set`): its name, keys
/// and values, the errors named by `source`.
pub fn check_secret(
    source: &str,
    name: &str,
    secret_type: SecretType,
    data: &SecretData,
) -> Result<(), ManifestErrors> {
    let mut rules = Vec::new();
    if let Some(m) = crate::names::problem(name, "secret") {
        rules.push(Rule::at("metadata.name", m));
    }
    rules.extend(check_data(secret_type, data, "data"));
    if rules.is_empty() {
        Ok(())
    } else {
        Err(document::unlocated(source, rules))
    }
}

fn check_data(secret_type: SecretType, data: &SecretData, at: &str) -> Vec<Rule> {
    let mut rules = Vec::new();
    if data.0.is_empty() {
        rules.push(Rule::at(at, "no keys; expected at least one key and value"));
    }
    if data.0.len() > MAX_SECRET_KEYS {
        rules.push(Rule::at(
            at,
            format!(
                "{} keys is too many; expected at most {MAX_SECRET_KEYS}",
                data.0.len()
            ),
        ));
    }
    let bytes: usize = data.0.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_SECRET_BYTES {
        rules.push(Rule::at(
            at,
            format!("{bytes} bytes of keys and values is too many; expected at most 64 KiB"),
        ));
    }
    for key in data.0.keys().filter(|k| !is_secret_key(k)) {
        rules.push(Rule::at_key(
            format!("{at}.{key}"),
            format!(
                "{key:?} is not a valid key; expected 1 to {MAX_KEY_LEN} letters, digits, \
                 '.', '_' and '-' (like password or tls.crt)"
            ),
        ));
    }
    if secret_type == SecretType::Registry {
        for needed in ["username", "password"] {
            if !data.0.contains_key(needed) {
                rules.push(Rule::at(
                    at,
                    format!("a registry secret needs the key {needed:?}; expected username, password and optionally server"),
                ));
            }
        }
        for key in data
            .0
            .keys()
            .filter(|k| !["username", "password", "server"].contains(&k.as_str()))
        {
            rules.push(Rule::at_key(
                format!("{at}.{key}"),
                format!("{key:?} is not a key of a registry secret; expected username, password or server"),
            ));
        }
        if let Some(server) = data.0.get("server")
            && (server.is_empty() || server.contains(['/', ' ']))
        {
            rules.push(Rule::at(
                format!("{at}.server"),
                "is not a registry host; expected a host and optional port like registry.example:5000",
            ));
        }
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(spec: &str) -> String {
        format!("apiVersion: novacron.io/v1\nkind: Secret\nmetadata: {{name: db}}\nspec:\n{spec}")
    }

    #[test]
    fn a_secret_parses_and_debug_shows_no_value() {
        let s = parse_secret(
            "s.yaml",
            &doc("  data:\n    password: hunter2\n    user: app\n"),
        )
        .expect("valid");
        assert_eq!(s.name, "db");
        assert_eq!(s.secret_type, SecretType::Opaque);
        assert_eq!(s.data.0["password"], "hunter2");
        let debug = format!("{s:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("password"), "{debug}");
    }

    #[test]
    fn errors_never_quote_a_value() {
        for (spec, wanted) in [
            (
                "  data:\n    pin: 123456789\n",
                "a secret value must be a string",
            ),
            (
                "  data:\n    pin: [123456789]\n",
                "a secret value must be a string",
            ),
            ("  data: {}\n", "no keys"),
            (
                "  data:\n    bad/key: 123456789x\n",
                "\"bad/key\" is not a valid key",
            ),
            (
                "  type: registry\n  data:\n    username: x123456789\n",
                "needs the key \"password\"",
            ),
            (
                "  type: registry\n  data:\n    username: u\n    password: p\n    token: x123456789\n",
                "\"token\" is not a key of a registry secret",
            ),
        ] {
            let errors = parse_secret("s.yaml", &doc(spec))
                .expect_err(spec)
                .to_string();
            assert!(errors.contains(wanted), "{spec}: {errors}");
            assert!(!errors.contains("123456789"), "{spec} leaks: {errors}");
        }
    }

    #[test]
    fn registry_secrets_and_size_bounds() {
        let ok = parse_secret(
            "s.yaml",
            &doc("  type: registry\n  data:\n    username: u\n    password: p\n    server: 127.0.0.1:5000\n"),
        )
        .expect("valid");
        assert_eq!(ok.secret_type, SecretType::Registry);
        let big = SecretData(BTreeMap::from([("k".into(), "x".repeat(MAX_SECRET_BYTES))]));
        let errors = check_secret("cli", "db", SecretType::Opaque, &big)
            .expect_err("too big")
            .to_string();
        assert!(errors.contains("expected at most 64 KiB"), "{errors}");
        let many = SecretData(
            (0..=MAX_SECRET_KEYS)
                .map(|i| (format!("k{i}"), "v".into()))
                .collect(),
        );
        assert!(check_secret("cli", "db", SecretType::Opaque, &many).is_err());
        assert!(
            check_secret(
                "cli",
                "Bad Name",
                SecretType::Opaque,
                &SecretData(BTreeMap::from([("k".into(), "v".into())]))
            )
            .is_err()
        );
        assert!(is_secret_key("tls.crt") && !is_secret_key("..") && !is_secret_key("a/b"));
    }
}

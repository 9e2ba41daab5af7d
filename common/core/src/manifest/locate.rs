//! Where a field sits in the YAML text.
//!
//! `yaml_serde::Value` carries no positions, but yaml_serde stamps every error raised
//! inside a visitor with the position of the event being visited. [`locate`] uses
//! that: it reads the document again with a probe that walks down a [`FieldPath`]
//! and fails on purpose when it reaches the target, and the failure's `location()` is
//! the target's line and column. Because it is the same parser, flow style, quoting,
//! comments, block scalars, anchors and several documents in one file are all seen
//! exactly as the real parse saw them; there is no second, approximate reading of
//! the text. It costs one parse per located error, and only on the error path.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// A path to a field, displayed the way yaml_serde displays paths:
/// `spec.task.ports[1].hostPort`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct FieldPath(Vec<Seg>);

/// One step of a [`FieldPath`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Seg {
    /// A mapping key.
    Key(String),
    /// A sequence index.
    Index(usize),
}

/// A 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Position {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl FieldPath {
    /// The document itself.
    pub fn root() -> FieldPath {
        FieldPath::default()
    }

    /// This path followed by a mapping key.
    pub fn key(&self, key: &str) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Seg::Key(key.to_string()));
        p
    }

    /// This path followed by a sequence index.
    pub fn index(&self, index: usize) -> FieldPath {
        let mut p = self.clone();
        p.0.push(Seg::Index(index));
        p
    }

    /// The enclosing path; `None` for the root.
    pub fn parent(&self) -> Option<FieldPath> {
        let mut p = self.clone();
        p.0.pop().map(|_| p)
    }

    /// The steps.
    pub fn segs(&self) -> &[Seg] {
        &self.0
    }

    /// Reads a path as yaml_serde displays it (`a.b[2].c`, `.` for the root).
    /// `None` when it cannot be read back unambiguously.
    pub fn parse(s: &str) -> Option<FieldPath> {
        let mut p = FieldPath::root();
        if s == "." || s.is_empty() {
            return Some(p);
        }
        for part in s.split('.') {
            let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
            if key.is_empty() {
                return None;
            }
            p = p.key(key);
            while !rest.is_empty() {
                let (n, after) = rest.split_once(']')?;
                p = p.index(n.parse().ok()?);
                rest = match after.strip_prefix('[') {
                    Some(r) => r,
                    None if after.is_empty() => "",
                    None => return None,
                };
            }
        }
        Some(p)
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => f.write_str(k)?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// Where `path` is written in document number `document` (0-based, counting every
/// `---`) of `text`.
///
/// Scalars are located at their value (`memory: 12XB` points at `12XB`); mappings
/// and sequences at their key (`health:`), which is where a reader looks for them.
/// With `at_key`, a mapping entry is located at its key even when the value is a
/// scalar (for errors about the key itself, like a bad environment variable name).
/// A path that is not written (a defaulted field) is located at its nearest written
/// ancestor. `None` only when the document cannot be read at all.
pub(super) fn locate(
    text: &str,
    document: usize,
    path: &FieldPath,
    at_key: bool,
) -> Option<Position> {
    let mut path = path.clone();
    let mut at_key = at_key;
    loop {
        if let Some(pos) = locate_written(text, document, &path, at_key) {
            return Some(pos);
        }
        at_key = false;
        path = path.parent()?;
    }
}

/// Where the second occurrence of `key` is written in the mapping at `map`.
pub(super) fn locate_duplicate(
    text: &str,
    document: usize,
    map: &FieldPath,
    key: &str,
) -> Option<Position> {
    probe(text, document, &map.key(key), Aim::Key { occurrence: 2 }).map(|(_, pos)| pos)
}

/// [`locate`] without the fallback to ancestors.
fn locate_written(text: &str, document: usize, path: &FieldPath, at_key: bool) -> Option<Position> {
    let is_entry = matches!(path.segs().last(), Some(Seg::Key(_)));
    let key = || probe(text, document, path, Aim::Key { occurrence: 1 }).map(|(_, pos)| pos);
    if at_key && is_entry {
        return key();
    }
    match probe(text, document, path, Aim::Value)? {
        (Found::Scalar, pos) => Some(pos),
        (_, pos) if is_entry => key().or(Some(pos)),
        (_, pos) => Some(pos),
    }
}

/// What a probe aims at.
#[derive(Debug, Clone, Copy)]
enum Aim {
    /// The value at the path.
    Value,
    /// The key of the path's last step, at its n-th occurrence (1-based).
    Key { occurrence: usize },
}

/// What a probe hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// A scalar value.
    Scalar,
    /// A mapping, a sequence or a tagged value.
    Node,
    /// A key.
    Key,
}

/// Starts every deliberate probe error; cannot appear in a YAML-derived message
/// because the text holds a NUL, which YAML forbids.
const MARK: &str = "\u{0}novacron-locate:";

impl Found {
    fn error<E: de::Error>(self) -> E {
        E::custom(format!("{MARK}{self:?}"))
    }
}

/// Re-reads the document and reports where the probe hit, if it did.
fn probe(text: &str, document: usize, path: &FieldPath, aim: Aim) -> Option<(Found, Position)> {
    let de = yaml_serde::Deserializer::from_str(text).nth(document)?;
    let seed = Probe {
        path: path.segs(),
        aim,
    };
    let err = seed.deserialize(de).err()?;
    let message = err.to_string();
    let found = [Found::Scalar, Found::Node, Found::Key]
        .into_iter()
        .find(|f| message.contains(&format!("{MARK}{f:?}")))?;
    let loc = err.location()?;
    Some((
        found,
        Position {
            line: loc.line(),
            column: loc.column(),
        },
    ))
}

/// Walks down `path`; fails with a [`MARK`] error at the target, succeeds (with
/// nothing) when the target is not written.
struct Probe<'p> {
    path: &'p [Seg],
    aim: Aim,
}

impl<'de> DeserializeSeed<'de> for Probe<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Probe<'_> {
    fn scalar<E: de::Error>(&self) -> Result<(), E> {
        match self.path {
            [] => Err(Found::Scalar.error()),
            _ => Ok(()),
        }
    }
}

impl<'de> Visitor<'de> for Probe<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.scalar()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        self.scalar()
    }
    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        self.scalar()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.scalar()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        // A tagged value (`!tag x`): the target itself, or nothing to walk into.
        match self.path {
            [] => Err(Found::Node.error()),
            _ => Err(de::Error::custom("tagged value")),
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((Seg::Key(want), rest)) = self.path.split_first() else {
            return match self.path {
                [] => Err(Found::Node.error()),
                _ => Ok(()),
            };
        };
        let mut seen = 0;
        loop {
            let fail = match self.aim {
                Aim::Key { occurrence } => rest.is_empty() && seen + 1 == occurrence,
                Aim::Value => false,
            };
            let Some(hit) = map.next_key_seed(KeyProbe { want, fail })? else {
                return Ok(());
            };
            if !hit {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            seen += 1;
            match (self.aim, rest) {
                (Aim::Key { .. }, []) => {
                    map.next_value::<IgnoredAny>()?;
                }
                (aim, rest) => {
                    return map.next_value_seed(Probe { path: rest, aim });
                }
            }
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((Seg::Index(index), rest)) = self.path.split_first() else {
            return match self.path {
                [] => Err(Found::Node.error()),
                _ => Ok(()),
            };
        };
        for _ in 0..*index {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        seq.next_element_seed(Probe {
            path: rest,
            aim: self.aim,
        })
        .map(|_| ())
    }
}

/// Reads one mapping key: `true` when it is `want`; fails with a [`MARK`] error
/// instead when `fail` is set and it is `want`.
struct KeyProbe<'p> {
    want: &'p str,
    fail: bool,
}

impl KeyProbe<'_> {
    fn check<E: de::Error>(&self, key: &str) -> Result<bool, E> {
        match key == self.want {
            true if self.fail => Err(Found::Key.error()),
            hit => Ok(hit),
        }
    }
}

impl<'de> DeserializeSeed<'de> for KeyProbe<'_> {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyProbe<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        self.check(v)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<bool, E> {
        self.check(&v.to_string())
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str, path: &str) -> Option<(usize, usize)> {
        let path = FieldPath::parse(path).expect("test paths are well formed");
        locate(text, 0, &path, false).map(|p| (p.line, p.column))
    }

    #[test]
    fn path_displays_and_parses_back() {
        let p = FieldPath::root()
            .key("spec")
            .key("task")
            .key("ports")
            .index(1)
            .key("hostPort");
        assert_eq!(p.to_string(), "spec.task.ports[1].hostPort");
        assert_eq!(FieldPath::parse("spec.task.ports[1].hostPort"), Some(p));
        assert_eq!(FieldPath::parse("."), Some(FieldPath::root()));
        assert_eq!(
            FieldPath::parse("a[0][2]"),
            Some(FieldPath::root().key("a").index(0).index(2))
        );
        assert_eq!(FieldPath::parse("a[x]"), None);
        assert_eq!(FieldPath::parse("a..b"), None);
    }

    #[test]
    fn scalars_are_located_at_the_value() {
        let text = "spec:\n  resources:\n    memory: 12XB\n";
        assert_eq!(at(text, "spec.resources.memory"), Some((3, 13)));
    }

    #[test]
    fn mappings_are_located_at_their_key() {
        let text = "spec:\n  health:\n    tcp: {port: 80}\n";
        assert_eq!(at(text, "spec.health"), Some((2, 3)));
        assert_eq!(at(text, "spec.health.tcp.port"), Some((3, 17)));
    }

    #[test]
    fn sequence_items_block_and_flow() {
        let text = "ports:\n  - name: a\n  - name: b\n    hostPort: 80\nvols: [{t: x}, {t: y}]\n";
        assert_eq!(at(text, "ports[1].hostPort"), Some((4, 15)));
        assert_eq!(at(text, "ports[1].name"), Some((3, 11)));
        assert_eq!(at(text, "vols[1].t"), Some((5, 20)));
    }

    #[test]
    fn absent_fields_fall_back_to_the_nearest_written_ancestor() {
        let text = "spec:\n  restart:\n    attempts: 3\n";
        assert_eq!(at(text, "spec.restart.delay"), Some((2, 3)));
        assert_eq!(at(text, "spec.update.canary"), Some((1, 1)));
        assert_eq!(at(text, "nothing.here"), Some((1, 1)));
    }

    #[test]
    fn keys_can_be_targeted() {
        let text = "env:\n  GOOD: 1\n  1BAD: 2\n";
        let path = FieldPath::root().key("env").key("1BAD");
        let pos = locate(text, 0, &path, true).map(|p| (p.line, p.column));
        assert_eq!(pos, Some((3, 3)));
    }

    #[test]
    fn duplicates_are_located_at_the_second_occurrence() {
        let text = "a: 1\nenv:\n  X: 1\n  Y: 2\n  X: 3\n";
        let env = FieldPath::root().key("env");
        let pos = locate_duplicate(text, 0, &env, "X").map(|p| (p.line, p.column));
        assert_eq!(pos, Some((5, 3)));
    }

    #[test]
    fn later_documents_have_file_lines() {
        let text = "a: 1\n---\n# comment\nb:\n  c: 2\n";
        let path = FieldPath::root().key("b").key("c");
        let pos = locate(text, 1, &path, false).map(|p| (p.line, p.column));
        assert_eq!(pos, Some((5, 6)));
    }

    #[test]
    fn quoted_keys_and_block_scalars() {
        let text = "\"image\": |\n  busybox\n'next': 1\n";
        assert_eq!(at(text, "next"), Some((3, 9)));
        assert_eq!(at(text, "image"), Some((1, 10)));
    }
}

//! The naming rule for nodes, operators, jobs and the other named things: 1–63 of
//! `a-z 0-9 - .`, alphanumeric at both ends (a DNS label that may hold dots). The PKI
//! (`novacron_common::pki`) puts these names in certificates; manifests check them.

/// The longest name.
pub const MAX_NAME_LEN: usize = 63;

/// A name that breaks the rule, and which part of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameError {
    /// The rejected name.
    pub name: String,
    /// The broken rule.
    pub why: &'static str,
}

/// Most keys one secret may have (and most secret references one task may
/// have).
pub const MAX_SECRET_KEYS: usize = 64;
/// The longest secret key.
pub const MAX_SECRET_KEY_LEN: usize = 253;

/// Whether `key` can name a secret's value: 1 to [`MAX_SECRET_KEY_LEN`]
/// characters of letters, digits, `.`, `_` and `-` (so that it is also a file
/// name), and neither `.` nor `..`.
pub fn is_secret_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_SECRET_KEY_LEN
        && key != "."
        && key != ".."
        && key
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c))
}

/// The repository and tag of an image reference `repo[:tag][@digest]` (the
/// digest left out): a ':' after the last '/' starts the tag, one before it is a
/// registry port (`registry:5000/team/api:1.4` → `registry:5000/team/api`, `1.4`).
pub fn split_image_tag(image: &str) -> (&str, Option<&str>) {
    let image = image.split_once('@').map_or(image, |(name, _)| name);
    let slash = image.rfind('/').map_or(0, |i| i + 1);
    match image[slash..].rfind(':') {
        Some(i) => (&image[..slash + i], Some(&image[slash + i + 1..])),
        None => (image, None),
    }
}

/// Whether `name` is an image repository name of the OCI distribution
/// specification: lowercase components of letters and digits joined by `.`,
/// `_` or `-`, separated by `/`, at most 255 characters (no registry port).
pub fn is_repository_name(name: &str) -> bool {
    name.len() <= 255
        && !name.is_empty()
        && name.split('/').all(|c| {
            let b = c.as_bytes();
            !b.is_empty()
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter()
                    .all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || b"._-".contains(&x))
        })
}

/// Why `name` is not a valid name for a `noun`, in the words job names use;
/// `None` when it is valid.
pub fn problem(name: &str, noun: &str) -> Option<String> {
    match validate_name(name) {
        Ok(()) => None,
        Err(NameError { name, why }) => Some(format!(
            "{name:?} is not a valid {noun} name: {why}; expected 1 to 63 characters of a-z, \
             0-9, '-' and '.', starting and ending with a letter or digit"
        )),
    }
}

/// Checks a node or operator name: 1–63 of `a-z 0-9 - .`, alphanumeric at both ends.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let bad = |why| NameError {
        name: name.to_string(),
        why,
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad("it is longer than 63 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Err(bad("it contains a character outside a-z, 0-9, '-' and '.'"));
    }
    let ends_ok = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    if !ends_ok(name.bytes().next()) || !ends_ok(name.bytes().last()) {
        return Err(bad("it must start and end with a letter or digit"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_rule() {
        for ok in ["a", "node-1", "gpu.rack-2", &"x".repeat(63)] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            (&"x".repeat(64) as &str, "longer"),
            ("Node", "outside"),
            ("-a", "start and end"),
            ("a.", "start and end"),
        ] {
            let e = validate_name(bad).expect_err(bad);
            assert!(e.why.contains(why), "{bad}: {}", e.why);
            assert_eq!(e.name, bad);
        }
    }
}

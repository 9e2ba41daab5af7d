//! Layered settings: a TOML file, then environment variables, then flags.
//!
//! A later layer wins: a flag beats a variable, which beats a key in the file, which
//! beats the built-in default. Each binary describes its file with a [`Profile`],
//! names each setting with a [`Key`], reads its file with [`load`] and looks its
//! settings up through [`Layers`], which knows where every value came from
//! ([`Origin`]). A [`ConfigError`] names that origin, the value and what is
//! accepted. The environment is read through [`Env`], so tests pass a map.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

/// What differs between the binaries that read their settings in these layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Profile {
    /// The file read when neither the flag nor [`Profile::config_env`] names one (a
    /// missing default file is not an error).
    pub default_file: &'static str,
    /// The environment variable that names the file.
    pub config_env: &'static str,
    /// Durations shown as examples in error messages, e.g. `500ms, 2s or 1m`.
    pub duration_examples: &'static str,
}

/// Reads environment variables; tests pass a map instead of the process environment.
pub trait Env {
    /// The value of `key`, `None` when unset. An empty value counts as unset.
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        // A value that is not UTF-8 is passed on (lossily) so validation names it.
        std::env::var_os(key)
            .map(|v| v.to_string_lossy().into_owned())
            .filter(|v| !v.is_empty())
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).filter(|v| !v.is_empty()).cloned()
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn var(&self, key: &str) -> Option<String> {
        self.iter()
            .find(|(k, v)| *k == key && !v.is_empty())
            .map(|(_, v)| v.to_string())
    }
}

/// One setting's names in each layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    /// The key in the file (dotted for tables, e.g. `serve.api_listen`); empty for a
    /// setting that is never read from the file (a secret).
    pub file: &'static str,
    /// The environment variable.
    pub env: &'static str,
    /// The flag.
    pub flag: &'static str,
}

impl Key {
    /// The names of one setting: file key, environment variable, flag.
    pub const fn new(file: &'static str, env: &'static str, flag: &'static str) -> Key {
        Key { file, env, flag }
    }
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default of this file key.
    Default(&'static str),
    /// A key in the configuration file.
    File {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// An environment variable.
    Env(&'static str),
    /// A command-line flag.
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default(key) => write!(f, "the default of `{key}`"),
            Origin::File { path, key } => write!(f, "key `{key}` in {}", path.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Flag(flag) => write!(f, "{flag}"),
        }
    }
}

/// Bad configuration; the binary exits 64 with this message.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read the configuration file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key or a value of the wrong type.
    #[error("configuration file {}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (line, column, key and what is accepted).
        message: String,
    },
    /// A value is malformed or out of range.
    #[error("{origin}: value {value:?} is not accepted; expected {expected}")]
    Invalid {
        /// Where the value came from.
        origin: Origin,
        /// The value as given.
        value: String,
        /// What would be accepted.
        expected: String,
    },
    /// Two values do not fit together.
    #[error("{first} ({first_value:?}) must be shorter than {second} ({second_value:?})")]
    Order {
        /// The setting that must be smaller.
        first: Box<Origin>,
        /// Its value.
        first_value: Duration,
        /// The setting that must be larger.
        second: Box<Origin>,
        /// Its value.
        second_value: Duration,
    },
    /// A required setting is missing from every layer.
    #[error("missing {what}: pass {}, or set {}{}", key.flag, key.env, in_file(key, file))]
    Missing {
        /// What the setting is.
        what: &'static str,
        /// Its names.
        key: Key,
        /// The configuration file that was read, else the default one.
        file: PathBuf,
    },
}

/// A [`ConfigError::Invalid`]: the value from `origin` is not accepted.
pub fn invalid(origin: Origin, value: &str, expected: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        origin,
        value: value.to_string(),
        expected: expected.into(),
    }
}

/// Checks that `first` is shorter than `second` (e.g. a keep-alive and an idle
/// timeout), naming both origins when it is not.
pub fn ensure_shorter(
    first: &Setting<Duration>,
    second: &Setting<Duration>,
) -> Result<(), ConfigError> {
    if first.value < second.value {
        return Ok(());
    }
    Err(ConfigError::Order {
        first: Box::new(first.origin.clone()),
        first_value: first.value,
        second: Box::new(second.origin.clone()),
        second_value: second.value,
    })
}

/// A configuration file and where it came from (`path` is `None` when no file was read).
#[derive(Debug, Default, Clone)]
pub struct Loaded<T> {
    /// The file that was read.
    pub path: Option<PathBuf>,
    /// Its contents.
    pub file: T,
}

/// Finds and parses the configuration file: `flag`, else the variable
/// [`Profile::config_env`], else [`Profile::default_file`] if it exists.
pub fn load<T: DeserializeOwned + Default>(
    profile: &Profile,
    flag: Option<&Path>,
    env: &dyn Env,
) -> Result<Loaded<T>, ConfigError> {
    let explicit = flag
        .map(Path::to_path_buf)
        .or_else(|| env.var(profile.config_env).map(PathBuf::from));
    let path = match explicit {
        Some(p) => p,
        None => {
            let default = PathBuf::from(profile.default_file);
            if !default.exists() {
                return Ok(Loaded::default());
            }
            default
        }
    };
    let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
        path: path.clone(),
        source,
    })?;
    let file = parse(&path, &text)?;
    Ok(Loaded {
        path: Some(path),
        file,
    })
}

/// Parses the text of a configuration file read from `path`.
pub fn parse<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })
}

/// A value with its origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting<T> {
    /// The value.
    pub value: T,
    /// Where it came from.
    pub origin: Origin,
}

/// The file's path and the environment, to look settings up in order.
#[derive(Clone, Copy)]
pub struct Layers<'a> {
    profile: &'a Profile,
    env: &'a dyn Env,
    path: Option<&'a Path>,
}

impl fmt::Debug for Layers<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layers")
            .field("profile", self.profile)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl<'a> Layers<'a> {
    /// The layers of `loaded` (the file) and `env`, for the binary of `profile`.
    pub fn new<T>(profile: &'a Profile, loaded: &'a Loaded<T>, env: &'a dyn Env) -> Layers<'a> {
        Layers {
            profile,
            env,
            path: loaded.path.as_deref(),
        }
    }

    /// The environment.
    pub fn env(&self) -> &'a dyn Env {
        self.env
    }

    /// The raw value of `key` from the first layer that has it: flag, env, file.
    pub fn pick(
        &self,
        key: Key,
        flag: Option<&str>,
        file: Option<&str>,
    ) -> Option<(String, Origin)> {
        if let Some(v) = flag {
            return Some((v.to_string(), Origin::Flag(key.flag)));
        }
        if let Some(v) = self.env.var(key.env) {
            return Some((v, Origin::Env(key.env)));
        }
        file.map(|v| (v.to_string(), self.file_origin(key.file)))
    }

    /// The origin of `key` in the file that was read, else in the default file.
    pub fn file_origin(&self, key: &str) -> Origin {
        Origin::File {
            path: self.file(),
            key: key.to_string(),
        }
    }

    /// A [`ConfigError::Missing`] for `key`, which every layer lacks.
    pub fn missing(&self, what: &'static str, key: Key) -> ConfigError {
        ConfigError::Missing {
            what,
            key,
            file: self.file(),
        }
    }

    /// A duration such as `500ms` or `2s` within `min..=max`, else `default`.
    pub fn duration(
        &self,
        key: Key,
        flag: Option<&str>,
        file: Option<&str>,
        default: Duration,
        (min, max): (Duration, Duration),
    ) -> Result<Setting<Duration>, ConfigError> {
        let Some((v, origin)) = self.pick(key, flag, file) else {
            return Ok(Setting {
                value: default,
                origin: Origin::Default(key.file),
            });
        };
        match humantime::parse_duration(v.trim()) {
            Ok(d) if d >= min && d <= max => Ok(Setting { value: d, origin }),
            _ => Err(invalid(
                origin,
                &v,
                format!(
                    "a duration from {} to {} such as {}",
                    humantime::format_duration(min),
                    humantime::format_duration(max),
                    self.profile.duration_examples,
                ),
            )),
        }
    }

    /// A number of `unit`s from 1 to `max`, else `default`.
    pub fn count(
        &self,
        key: Key,
        flag: Option<&str>,
        file: Option<u64>,
        default: usize,
        max: usize,
        unit: &str,
    ) -> Result<usize, ConfigError> {
        let Some((v, origin)) = self.pick(key, flag, file.map(|n| n.to_string()).as_deref()) else {
            return Ok(default);
        };
        match v.trim().parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(invalid(
                origin,
                &v,
                format!("a number of {unit} from 1 to {max}"),
            )),
        }
    }

    /// A directory path (not blank, no NUL), else `default`, which also serves as the
    /// example in the error.
    pub fn dir(
        &self,
        key: Key,
        flag: Option<&str>,
        file: Option<&str>,
        default: &str,
    ) -> Result<PathBuf, ConfigError> {
        match self.pick(key, flag, file) {
            Some((v, origin)) if v.trim().is_empty() || v.contains('\0') => Err(invalid(
                origin,
                &v,
                format!("a directory path such as {default}"),
            )),
            Some((v, _)) => Ok(PathBuf::from(v)),
            None => Ok(PathBuf::from(default)),
        }
    }

    /// A `host:port` (any host without blanks, a `u16` port), or `None` when no layer
    /// sets it; `expected` is what the error says is accepted.
    pub fn host_port(
        &self,
        key: Key,
        flag: Option<&str>,
        file: Option<&str>,
        expected: &str,
    ) -> Result<Option<String>, ConfigError> {
        let Some((v, origin)) = self.pick(key, flag, file) else {
            return Ok(None);
        };
        if is_host_port(&v) {
            Ok(Some(v))
        } else {
            Err(invalid(origin, &v, expected))
        }
    }

    /// One `host:port` or several, comma-separated (the controllers of a highly
    /// available group), each checked as [`Layers::host_port`] does; `None`
    /// when no layer sets it.
    pub fn host_ports(
        &self,
        key: Key,
        flag: Option<&str>,
        file: Option<&str>,
        expected: &str,
    ) -> Result<Option<String>, ConfigError> {
        let Some((v, origin)) = self.pick(key, flag, file) else {
            return Ok(None);
        };
        if v.split(',').map(str::trim).all(is_host_port) {
            Ok(Some(v))
        } else {
            Err(invalid(origin, &v, expected))
        }
    }

    /// The file that was read, else the default one.
    fn file(&self) -> PathBuf {
        self.path.map_or_else(
            || PathBuf::from(self.profile.default_file),
            Path::to_path_buf,
        )
    }
}

/// Whether `v` is `host:port`: a host without blanks and a `u16` port.
fn is_host_port(v: &str) -> bool {
    v.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok()
    })
}

fn in_file(key: &Key, file: &Path) -> String {
    if key.file.is_empty() {
        return String::new();
    }
    format!(", or set `{}` in {}", key.file, file.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROFILE: Profile = Profile {
        default_file: "/nonexistent/novacron/test.toml",
        config_env: "NOVACRON_TEST_CONFIG",
        duration_examples: "500ms, 2s or 1m",
    };
    const KEY: Key = Key::new("t.wait", "NOVACRON_WAIT", "--wait");

    fn loaded() -> Loaded<()> {
        Loaded {
            path: Some(PathBuf::from("/etc/novacron/test.toml")),
            file: (),
        }
    }

    #[test]
    fn an_empty_variable_counts_as_unset() {
        let map: BTreeMap<String, String> = [("A".to_string(), String::new())].into();
        assert_eq!(map.var("A"), None);
        assert_eq!([("A", ""), ("A", "x")].var("A").as_deref(), Some("x"));
        assert_eq!([("A", "y")].var("B"), None);
    }

    #[test]
    fn the_flag_beats_the_variable_which_beats_the_file() {
        let loaded = loaded();
        let env = [("NOVACRON_WAIT", "2s")];
        let l = Layers::new(&PROFILE, &loaded, &env);
        assert_eq!(
            l.pick(KEY, Some("1s"), Some("3s")),
            Some(("1s".into(), Origin::Flag("--wait")))
        );
        assert_eq!(
            l.pick(KEY, None, Some("3s")),
            Some(("2s".into(), Origin::Env("NOVACRON_WAIT")))
        );
        let l = Layers::new(&PROFILE, &loaded, &[]);
        let (_, origin) = l.pick(KEY, None, Some("3s")).expect("file");
        assert_eq!(
            origin.to_string(),
            "key `t.wait` in /etc/novacron/test.toml"
        );
        assert_eq!(l.pick(KEY, None, None), None);
    }

    #[test]
    fn errors_name_the_origin_the_value_and_what_is_accepted() {
        let none = Loaded::<()>::default();
        let l = Layers::new(&PROFILE, &none, &[]);
        let range = (Duration::from_millis(100), Duration::from_secs(60));
        let err = l
            .duration(KEY, None, Some("5ms"), Duration::ZERO, range)
            .expect_err("too short")
            .to_string();
        assert_eq!(
            err,
            "key `t.wait` in /nonexistent/novacron/test.toml: value \"5ms\" is not accepted; \
             expected a duration from 100ms to 1m such as 500ms, 2s or 1m"
        );
        let d = l
            .duration(KEY, None, None, Duration::from_secs(1), range)
            .expect("default");
        assert_eq!(d.origin, Origin::Default("t.wait"));
        let err = l
            .count(KEY, Some("0"), None, 1, 9, "samples")
            .expect_err("zero")
            .to_string();
        assert!(
            err.ends_with("expected a number of samples from 1 to 9"),
            "{err}"
        );
        assert_eq!(l.count(KEY, None, Some(4), 1, 9, "samples").expect("4"), 4);
        assert!(
            l.host_port(KEY, Some("h:99999"), None, "host:port")
                .is_err()
        );
        assert_eq!(
            l.host_port(KEY, Some("h:1"), None, "host:port")
                .expect("ok"),
            Some("h:1".into())
        );
        assert!(l.dir(KEY, Some(" "), None, "/var/x").is_err());
        let err = l.missing("the wait", KEY).to_string();
        assert_eq!(
            err,
            "missing the wait: pass --wait, or set NOVACRON_WAIT, or set `t.wait` in \
             /nonexistent/novacron/test.toml"
        );
    }

    #[test]
    fn a_missing_default_file_is_not_an_error_but_a_named_one_is() {
        let loaded: Loaded<BTreeMap<String, String>> = load(&PROFILE, None, &[]).expect("none");
        assert_eq!(loaded.path, None);
        let err = load::<BTreeMap<String, String>>(
            &PROFILE,
            None,
            &[("NOVACRON_TEST_CONFIG", "/nonexistent/b.toml")],
        )
        .expect_err("missing")
        .to_string();
        assert!(err.contains("/nonexistent/b.toml"), "{err}");
    }
}

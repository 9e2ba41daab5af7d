//! The operator's context file: which controller to talk to, and with which CA and
//! client certificate.
//!
//! ```toml
//! current = "dev"
//!
//! [contexts.dev]
//! api = "https://127.0.0.1:7443"
//! ca = "/home/alice/.local/share/novacron/dev/ca.pem"
//! cert = "/home/alice/.local/share/novacron/dev/admin.pem"
//! key = "/home/alice/.local/share/novacron/dev/admin-key.pem"
//! ```
//!
//! Relative `ca`, `cert` and `key` paths are taken relative to the file's folder. The
//! file holds paths, not secrets, but it says where the key is, so it is written with
//! mode 0600.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use reqwest::Url;
use serde::{Deserialize, Serialize};

pub use novacron_common::config::{Env, ProcessEnv};

/// Environment variable naming the context file (also read by `--config`).
pub const CONFIG_ENV: &str = "NOVACRON_CONFIG";
/// An API token to authenticate with, overriding the context's credentials.
pub const TOKEN_ENV: &str = "NOVACRON_TOKEN";
/// Environment variable of the XDG configuration folder.
pub const XDG_CONFIG_HOME_ENV: &str = "XDG_CONFIG_HOME";
/// Environment variable of the home folder.
pub const HOME_ENV: &str = "HOME";
/// The context file's path below the configuration folder.
pub const CONFIG_FILE: &str = "novacron/config.toml";

/// Errors reading, choosing or writing contexts.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No path was given and none can be derived from the environment.
    #[error(
        "cannot locate the context file: neither {XDG_CONFIG_HOME_ENV} nor {HOME_ENV} is set; pass --config PATH or set {CONFIG_ENV}"
    )]
    NoConfigPath,
    /// The context file does not exist.
    #[error(
        "no controller context: run `novacron dev` for a local fleet, or create {} (see `novacron context --help`)",
        path.display()
    )]
    Missing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The context file exists but cannot be read.
    #[error("cannot read the context file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The context file is not valid TOML or has unknown or mistyped keys.
    #[error("malformed context file {}{location}: {}", path.display(), source.message().trim_end())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// `, line L, column C, at key `contexts.dev.api``, as far as known.
        location: String,
        /// The parser's error.
        source: Box<toml::de::Error>,
    },
    /// The file names no current context and none was asked for.
    #[error(
        "no current context in {}: pick one with `novacron context use NAME` or pass --context NAME (known: {known})",
        path.display()
    )]
    NoCurrent {
        /// The file.
        path: PathBuf,
        /// The contexts it holds, comma-separated.
        known: String,
    },
    /// The asked-for context is not in the file.
    #[error("no context named {name:?} in {} (known: {known})", path.display())]
    UnknownContext {
        /// The name asked for.
        name: String,
        /// The file.
        path: PathBuf,
        /// The contexts it holds, comma-separated.
        known: String,
    },
    /// The file could not be written.
    #[error("cannot write the context file {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The contexts could not be encoded as TOML.
    #[error("cannot encode the context file: {0}")]
    Encode(#[from] toml::ser::Error),
}

/// The default context file: `$XDG_CONFIG_HOME/novacron/config.toml`, else
/// `$HOME/.config/novacron/config.toml`. A relative `XDG_CONFIG_HOME` is ignored,
/// as the XDG specification asks.
pub fn default_config_path(env: &dyn Env) -> Option<PathBuf> {
    if let Some(xdg) = env.var(XDG_CONFIG_HOME_ENV).map(PathBuf::from)
        && xdg.is_absolute()
    {
        return Some(xdg.join(CONFIG_FILE));
    }
    env.var(HOME_ENV)
        .map(|home| Path::new(&home).join(".config").join(CONFIG_FILE))
}

/// The whole context file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextFile {
    /// The context used when `--context` is not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    /// The contexts by name.
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// How to reach one controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// The controller's HTTPS API.
    pub api: ApiUrl,
    /// The fleet CA (PEM) that signed the controller's certificate.
    pub ca: PathBuf,
    /// The operator's client certificate (PEM); empty when the context uses an API
    /// token instead.
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub cert: PathBuf,
    /// The operator's private key (PEM); empty with an API token.
    #[serde(default, skip_serializing_if = "is_empty_path")]
    pub key: PathBuf,
    /// A file holding an API token (`nca_…`), used when there is no certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The APIs of the other controllers of a highly available group: a command
    /// uses the first of `api` and these that answers `/healthz` (only the
    /// leader serves).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also: Vec<ApiUrl>,
}

fn is_empty_path(p: &Path) -> bool {
    p.as_os_str().is_empty()
}

impl Context {
    /// This context with relative paths made relative to `config_path`'s folder.
    pub fn resolved(&self, config_path: &Path) -> Context {
        let base = config_path.parent().unwrap_or(Path::new(""));
        let abs = |p: &Path| {
            if p.is_relative() {
                base.join(p)
            } else {
                p.to_path_buf()
            }
        };
        let keep_empty = |p: &Path| {
            if is_empty_path(p) {
                PathBuf::new()
            } else {
                abs(p)
            }
        };
        Context {
            api: self.api.clone(),
            ca: abs(&self.ca),
            cert: keep_empty(&self.cert),
            key: keep_empty(&self.key),
            token_file: self.token_file.as_deref().map(abs),
            also: self.also.clone(),
        }
    }
}

/// An `https://` URL of a controller API (parsed, so a context cannot hold another
/// kind).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ApiUrl(Url);

/// Why a string is not an [`ApiUrl`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid controller URL {value:?}: {why}; expected https://HOST:PORT")]
pub struct InvalidApiUrl {
    /// The rejected text.
    pub value: String,
    /// What is wrong with it.
    pub why: String,
}

impl ApiUrl {
    /// The parsed URL.
    pub fn url(&self) -> &Url {
        &self.0
    }
}

impl FromStr for ApiUrl {
    type Err = InvalidApiUrl;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| InvalidApiUrl {
            value: s.to_string(),
            why,
        };
        let url = Url::parse(s).map_err(|e| bad(e.to_string()))?;
        if url.scheme() != "https" {
            return Err(bad(format!(
                "the scheme is {:?}, the API speaks only https",
                url.scheme()
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad("it has no host".into()));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("it has a query or fragment".into()));
        }
        Ok(ApiUrl(url))
    }
}

impl TryFrom<String> for ApiUrl {
    type Error = InvalidApiUrl;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ApiUrl> for String {
    fn from(url: ApiUrl) -> String {
        url.to_string()
    }
}

impl fmt::Display for ApiUrl {
    /// The URL without a trailing slash, as people write it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str().trim_end_matches('/'))
    }
}

impl ContextFile {
    /// Reads the file at `path`; a missing file is [`ConfigError::Missing`].
    pub fn load(path: &Path) -> Result<ContextFile, ConfigError> {
        let text = fs::read_to_string(path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                ConfigError::Missing {
                    path: path.to_path_buf(),
                }
            } else {
                ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        ContextFile::parse(&text, path)
    }

    /// Parses the text of the file at `path` (the path is only for messages).
    pub fn parse(text: &str, path: &Path) -> Result<ContextFile, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Malformed {
            path: path.to_path_buf(),
            location: source
                .span()
                .map(|span| locate(text, span.start))
                .unwrap_or_default(),
            source: Box::new(source),
        })
    }

    /// Writes the file to `path` atomically with mode 0600, creating its folder.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = toml::to_string_pretty(self)?;
        write_private(path, text.as_bytes()).map_err(|source| ConfigError::Write {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The context called `name`, or the current one. Returns its name too.
    pub fn select(
        &self,
        name: Option<&str>,
        path: &Path,
    ) -> Result<(String, &Context), ConfigError> {
        let name = match name.or(self.current.as_deref()) {
            Some(name) => name,
            None => {
                return Err(ConfigError::NoCurrent {
                    path: path.to_path_buf(),
                    known: self.known(),
                });
            }
        };
        match self.contexts.get(name) {
            Some(ctx) => Ok((name.to_string(), ctx)),
            None => Err(ConfigError::UnknownContext {
                name: name.to_string(),
                path: path.to_path_buf(),
                known: self.known(),
            }),
        }
    }

    /// The names of the contexts, comma-separated, or `none`.
    fn known(&self) -> String {
        if self.contexts.is_empty() {
            "none".to_string()
        } else {
            self.contexts
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        }
    }
}

/// Adds or replaces the context `name` in the file at `config_path`, keeping the
/// other contexts. It becomes the current context when `make_current` is set or the
/// file had none. Creates the file (mode 0600) and its folder when missing; refuses
/// to overwrite a file it cannot parse.
pub fn write_context(
    config_path: &Path,
    name: &str,
    ctx: &Context,
    make_current: bool,
) -> Result<(), ConfigError> {
    let mut file = match ContextFile::load(config_path) {
        Ok(file) => file,
        Err(ConfigError::Missing { .. }) => ContextFile::default(),
        Err(e) => return Err(e),
    };
    file.contexts.insert(name.to_string(), ctx.clone());
    if make_current || file.current.is_none() {
        file.current = Some(name.to_string());
    }
    file.save(config_path)
}

/// Describes byte offset `at` of a TOML text: `, line 3, column 7, at key
/// `contexts.dev.api``. The key is the one defined on that line (or the table the
/// line opens), prefixed with the table it is in.
fn locate(text: &str, at: usize) -> String {
    let Some(before) = text.get(..at) else {
        return String::new();
    };
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_no = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    let header = |l: &str| {
        l.strip_prefix('[')
            .and_then(|l| l.split(']').next())
            .map(|t| t.trim_matches(|c| c == '[' || c == ' ').to_string())
    };
    let key = if let Some(table) = header(line) {
        Some(table)
    } else if let Some((key, _)) = line.split_once('=') {
        let table = before[..line_start]
            .lines()
            .rev()
            .find_map(|l| header(l.trim()));
        let key = key.trim();
        Some(match table {
            Some(table) => format!("{table}.{key}"),
            None => key.to_string(),
        })
    } else {
        None
    };
    match key {
        Some(key) => format!(", line {line_no}, column {column}, at key `{key}`"),
        None => format!(", line {line_no}, column {column}"),
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, mode 0600.
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.as_os_str().is_empty() {
        fs::create_dir_all(dir)?;
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    // A leftover from a crashed run may have other permissions; start afresh.
    let _ = fs::remove_file(&tmp);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let result = (|| {
        let mut file = options.open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(api: &str, dir: &str) -> Context {
        Context {
            api: api.parse().expect("valid URL"),
            ca: PathBuf::from(format!("{dir}/ca.pem")),
            cert: PathBuf::from(format!("{dir}/cert.pem")),
            key: PathBuf::from(format!("{dir}/key.pem")),
            token_file: None,
            also: vec![],
        }
    }

    #[test]
    fn write_context_round_trips_and_keeps_other_contexts() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("nested/novacron/config.toml");
        let dev = ctx("https://127.0.0.1:7443", "/dev");
        let prod = ctx("https://controller.example:7443", "/prod");

        write_context(&path, "dev", &dev, false).expect("first write");
        let file = ContextFile::load(&path).expect("load");
        assert_eq!(
            file.current.as_deref(),
            Some("dev"),
            "first context is current"
        );
        assert_eq!(file.contexts["dev"], dev);

        write_context(&path, "prod", &prod, false).expect("second write");
        let file = ContextFile::load(&path).expect("load");
        assert_eq!(file.current.as_deref(), Some("dev"), "current kept");
        assert_eq!(file.contexts.len(), 2);
        assert_eq!(file.contexts["prod"], prod);

        write_context(&path, "prod", &prod, true).expect("make current");
        let file = ContextFile::load(&path).expect("load");
        assert_eq!(file.current.as_deref(), Some("prod"));
        assert_eq!(file.contexts["dev"], dev, "other context kept");
    }

    #[cfg(unix)]
    #[test]
    fn context_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.toml");
        write_context(&path, "dev", &ctx("https://127.0.0.1:7443", "/d"), true).expect("write");
        let mode = fs::metadata(&path).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn write_context_refuses_to_clobber_a_malformed_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("config.toml");
        fs::write(&path, "current = [").expect("write");
        let err = write_context(&path, "dev", &ctx("https://127.0.0.1:7443", "/d"), true)
            .expect_err("malformed file");
        assert!(matches!(err, ConfigError::Malformed { .. }), "{err}");
        assert_eq!(fs::read_to_string(&path).expect("read"), "current = [");
    }

    #[test]
    fn unknown_key_error_names_the_file_and_the_key() {
        let text = "current = \"dev\"\n\n[contexts.dev]\napi = \"https://127.0.0.1:7443\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\ntoken = \"x\"\n";
        let err =
            ContextFile::parse(text, Path::new("/etc/x/config.toml")).expect_err("unknown key");
        assert_eq!(
            err.to_string(),
            "malformed context file /etc/x/config.toml, line 8, column 1, at key `contexts.dev.token`: unknown field `token`, expected one of `api`, `ca`, `cert`, `key`, `token_file`, `also`"
        );
    }

    #[test]
    fn wrong_type_error_names_the_key() {
        let text =
            "[contexts.dev]\napi = 7443\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let msg = ContextFile::parse(text, Path::new("c.toml"))
            .expect_err("wrong type")
            .to_string();
        assert_eq!(
            msg,
            "malformed context file c.toml, line 2, column 7, at key `contexts.dev.api`: invalid type: integer `7443`, expected a string"
        );
    }

    #[test]
    fn unknown_top_level_key_and_syntax_errors_are_located() {
        let msg = ContextFile::parse("curent = \"dev\"\n", Path::new("c.toml"))
            .expect_err("typo")
            .to_string();
        assert!(msg.contains("at key `curent`"), "{msg}");
        assert!(msg.contains("unknown field `curent`"), "{msg}");
        let msg = ContextFile::parse("[contexts.dev\n", Path::new("c.toml"))
            .expect_err("syntax")
            .to_string();
        assert!(
            msg.starts_with("malformed context file c.toml, line 1"),
            "{msg}"
        );
    }

    #[test]
    fn http_url_is_refused_with_the_reason() {
        let text = "[contexts.dev]\napi = \"http://127.0.0.1:7443\"\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n";
        let msg = ContextFile::parse(text, Path::new("c.toml"))
            .expect_err("http URL")
            .to_string();
        assert!(msg.contains("at key `contexts.dev.api`"), "{msg}");
        assert!(msg.contains("the API speaks only https"), "{msg}");
    }

    #[test]
    fn selection_explains_what_is_missing() {
        let mut file = ContextFile::default();
        file.contexts
            .insert("dev".into(), ctx("https://127.0.0.1:7443", "/d"));
        let path = Path::new("c.toml");
        let err = file.select(None, path).expect_err("no current");
        assert!(err.to_string().contains("novacron context use"), "{err}");
        let err = file.select(Some("prod"), path).expect_err("unknown");
        assert!(err.to_string().contains("known: dev"), "{err}");
        let (name, _) = file.select(Some("dev"), path).expect("explicit");
        assert_eq!(name, "dev");
    }

    #[test]
    fn relative_paths_are_relative_to_the_file() {
        let c = Context {
            api: "https://h:1".parse().expect("url"),
            ca: "ca.pem".into(),
            cert: "/abs/cert.pem".into(),
            key: "keys/k.pem".into(),
            token_file: None,
            also: vec![],
        };
        let r = c.resolved(Path::new("/home/a/.config/novacron/config.toml"));
        assert_eq!(r.ca, Path::new("/home/a/.config/novacron/ca.pem"));
        assert_eq!(r.cert, Path::new("/abs/cert.pem"));
        assert_eq!(r.key, Path::new("/home/a/.config/novacron/keys/k.pem"));
    }

    #[test]
    fn default_path_prefers_absolute_xdg_then_home() {
        let env = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            default_config_path(&env(&[("XDG_CONFIG_HOME", "/x"), ("HOME", "/h")])),
            Some(PathBuf::from("/x/novacron/config.toml"))
        );
        assert_eq!(
            default_config_path(&env(&[("XDG_CONFIG_HOME", "rel"), ("HOME", "/h")])),
            Some(PathBuf::from("/h/.config/novacron/config.toml"))
        );
        assert_eq!(default_config_path(&env(&[])), None);
    }
}

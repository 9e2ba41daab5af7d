//! Logging setup shared by the binaries: `tracing` to standard error, filtered by
//! `RUST_LOG` (for example `RUST_LOG=debug` or `RUST_LOG=novacron_agent=trace`).
//!
//! Two formats: `text` (human-readable; coloured only when standard error is a
//! terminal and `NO_COLOR` is unset or empty, <https://no-color.org>) and `json`
//! (one JSON object per line, never coloured, for journald and log collectors).

use std::fmt;
use std::io::IsTerminal;
use std::str::FromStr;

use crate::config::{Key, Layers, invalid};

/// The environment variable that turns colour off when set to a non-empty value.
pub const NO_COLOR: &str = "NO_COLOR";

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Format {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` (the
    /// message is `fields.message`) and the current spans.
    Json,
}

impl Format {
    /// The accepted values, for error messages and help.
    pub const ACCEPTED: &'static str = "text or json";
}

impl FromStr for Format {
    type Err = ();

    fn from_str(s: &str) -> Result<Format, ()> {
        match s.trim() {
            "text" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            _ => Err(()),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Text => "text",
            Format::Json => "json",
        })
    }
}

/// The log format from the first layer that sets `key` (flag, environment, file),
/// else [`Format::Text`].
pub fn format(
    layers: &Layers<'_>,
    key: Key,
    flag: Option<&str>,
    file: Option<&str>,
) -> Result<Format, crate::config::ConfigError> {
    match layers.pick(key, flag, file) {
        None => Ok(Format::Text),
        Some((v, origin)) => v
            .parse()
            .map_err(|()| invalid(origin, &v, Format::ACCEPTED)),
    }
}

/// Whether text logs are coloured: only on a terminal, and only while `NO_COLOR`
/// is unset or empty.
pub fn use_colour(stderr_is_terminal: bool, no_color: Option<&str>) -> bool {
    stderr_is_terminal && no_color.is_none_or(str::is_empty)
}

/// Installs the global subscriber in the [`Format::Text`] format; `default` is the
/// filter when `RUST_LOG` is unset or invalid (`info`, `warn`, ...).
pub fn init(default: &str) {
    init_with(default, Format::Text);
}

/// Installs the global subscriber in `format`; `default` is the filter when
/// `RUST_LOG` is unset or invalid.
pub fn init_with(default: &str, format: Format) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        Format::Text => {
            let no_color = std::env::var(NO_COLOR).ok();
            let ansi = use_colour(std::io::stderr().is_terminal(), no_color.as_deref());
            builder.with_ansi(ansi).init();
        }
        Format::Json => builder.json().with_ansi(false).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Loaded, Profile};

    const PROFILE: Profile = Profile {
        default_file: "/nonexistent/novacron/test.toml",
        config_env: "NOVACRON_TEST_CONFIG",
        duration_examples: "1s",
    };
    const KEY: Key = Key::new("log_format", "NOVACRON_LOG_FORMAT", "--log-format");

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some("")));
        assert!(!use_colour(true, Some("1")));
        assert!(!use_colour(false, None));
        assert!(!use_colour(false, Some("1")));
    }

    #[test]
    fn the_format_comes_from_the_layers_and_a_bad_one_names_its_origin() {
        let loaded = Loaded::<()>::default();
        let env = [("NOVACRON_LOG_FORMAT", "json")];
        let l = Layers::new(&PROFILE, &loaded, &env);
        assert_eq!(format(&l, KEY, None, None).expect("env"), Format::Json);
        assert_eq!(
            format(&l, KEY, Some("text"), None).expect("flag"),
            Format::Text
        );
        let l = Layers::new(&PROFILE, &loaded, &[]);
        assert_eq!(format(&l, KEY, None, None).expect("none"), Format::Text);
        assert_eq!(
            format(&l, KEY, None, Some("json")).expect("file"),
            Format::Json
        );
        let err = format(&l, KEY, Some("xml"), None)
            .expect_err("xml")
            .to_string();
        assert_eq!(
            err,
            "--log-format: value \"xml\" is not accepted; expected text or json"
        );
    }
}

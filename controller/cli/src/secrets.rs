//! `novacron secret set|list|show|delete`: secrets that jobs reference
//! (`spec.task.secrets`, `spec.task.imagePullSecret`). Values go to the controller
//! and are never shown again; a `kind: Secret` manifest also works with
//! `novacron apply -f`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::SystemTime;

use clap::Subcommand;
use novacron_api::{SecretSetRequest, SecretSetResult, SecretView};
use novacron_common::manifest::secret::SecretType;

use super::CliError;
use super::client::ApiClient;
use super::output::{self, OutputFormat, TableRow};

/// `novacron secret` subcommands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum SecretCommand {
    /// Set a secret's values: a new version, which the jobs that use the secret
    /// roll out to. Every key must be given (the new version replaces the old).
    Set {
        /// The secret.
        name: String,
        /// KEY=VALUE pairs (mind the shell history; prefer --from-file or
        /// --from-stdin for real values).
        #[arg(value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        /// KEY=PATH: the value is the file's contents.
        #[arg(long, value_name = "KEY=PATH")]
        from_file: Vec<String>,
        /// KEY: the value is standard input (up to its end, one trailing newline
        /// removed).
        #[arg(long, value_name = "KEY")]
        from_stdin: Option<String>,
        /// `opaque` (default) or `registry` (username, password and optionally
        /// server: credentials for a job's imagePullSecret).
        #[arg(long = "type", value_name = "TYPE", default_value = "opaque", value_parser = parse_type)]
        secret_type: SecretType,
    },
    /// List secrets: versions, keys, sizes and the jobs that use them (never
    /// values).
    List,
    /// One secret.
    Show {
        /// The secret.
        name: String,
    },
    /// Delete a secret with every version; refused while a job uses it.
    Delete {
        /// The secret.
        name: String,
    },
}

fn parse_type(s: &str) -> Result<SecretType, String> {
    match s {
        "opaque" => Ok(SecretType::Opaque),
        "registry" => Ok(SecretType::Registry),
        other => Err(format!(
            "{other:?} is not a secret type; use opaque or registry"
        )),
    }
}

/// Runs a `secret` subcommand.
pub async fn run(
    cmd: &SecretCommand,
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
    now: SystemTime,
) -> Result<(), CliError> {
    match cmd {
        SecretCommand::Set {
            name,
            pairs,
            from_file,
            from_stdin,
            secret_type,
        } => {
            let data = values(
                pairs,
                from_file,
                from_stdin.as_deref(),
                &mut std::io::stdin(),
            )?;
            let req = SecretSetRequest {
                secret_type: *secret_type,
                data,
            };
            let result: SecretSetResult = client.put(&["v1", "secrets", name], &req).await?;
            match format {
                OutputFormat::Table | OutputFormat::Wide => {
                    write_set(out, &result).map_err(output::OutputError::Io)?
                }
                OutputFormat::Name => {
                    writeln!(out, "secret/{}", result.secret).map_err(output::OutputError::Io)?
                }
                _ => output::write_value(out, format, &result)?,
            }
        }
        SecretCommand::List => {
            let secrets: Vec<SecretView> = client.get(&["v1", "secrets"]).await?;
            output::write_list(out, format, &secrets, now)?;
        }
        SecretCommand::Show { name } => {
            let secret: SecretView = client.get(&["v1", "secrets", name]).await?;
            output::write_list(out, format, std::slice::from_ref(&secret), now)?;
        }
        SecretCommand::Delete { name } => {
            let () = client.delete(&["v1", "secrets", name]).await?;
            writeln!(out, "secret {name} deleted").map_err(output::OutputError::Io)?;
        }
    }
    Ok(())
}

/// What `novacron apply` and `secret set` print for a set secret.
pub fn write_set(out: &mut dyn Write, result: &SecretSetResult) -> std::io::Result<()> {
    writeln!(
        out,
        "secret {} {} (version {})",
        result.secret, result.outcome, result.version
    )?;
    for roll in &result.rolled {
        writeln!(
            out,
            "  job {} rolls out as version {}",
            roll.job, roll.version
        )?;
    }
    Ok(())
}

/// The values of `secret set`, from its arguments, files and standard input.
fn values(
    pairs: &[String],
    files: &[String],
    stdin_key: Option<&str>,
    stdin: &mut dyn Read,
) -> Result<BTreeMap<String, String>, CliError> {
    let mut data = BTreeMap::new();
    let mut put = |key: &str, value: String| {
        if data.insert(key.to_string(), value).is_some() {
            return Err(CliError::Usage(format!("key {key:?} is given twice")));
        }
        Ok(())
    };
    for (i, pair) in pairs.iter().enumerate() {
        // The argument may be a value typed without its key: never echoed.
        let Some((k, v)) = pair.split_once('=') else {
            return Err(CliError::Usage(format!(
                "value argument {} has no '='; give each value as KEY=VALUE",
                i + 1
            )));
        };
        put(k, v.to_string())?;
    }
    for pair in files {
        let Some((k, path)) = pair.split_once('=') else {
            return Err(CliError::Usage(format!(
                "--from-file {pair:?} is not KEY=PATH"
            )));
        };
        let path = PathBuf::from(path);
        let value = std::fs::read_to_string(&path)
            .map_err(|e| CliError::Usage(format!("--from-file {k}: {}: {e}", path.display())))?;
        put(k, value)?;
    }
    if let Some(k) = stdin_key {
        let mut value = String::new();
        stdin
            .take(novacron_common::manifest::secret::MAX_SECRET_BYTES as u64 + 1)
            .read_to_string(&mut value)
            .map_err(|e| CliError::Usage(format!("--from-stdin {k}: {e}")))?;
        if value.ends_with('\n') {
            value.pop();
        }
        put(k, value)?;
    }
    if data.is_empty() {
        return Err(CliError::Usage(
            "no values; give KEY=VALUE, --from-file KEY=PATH or --from-stdin KEY".into(),
        ));
    }
    Ok(data)
}

impl TableRow for SecretView {
    fn headers() -> &'static [&'static str] {
        &[
            "NAME", "TYPE", "VERSION", "KEYS", "BYTES", "UPDATED", "BY", "USED BY",
        ]
    }

    fn cells(&self, now: SystemTime) -> Vec<String> {
        vec![
            self.name.clone(),
            self.secret_type.to_string(),
            self.version.to_string(),
            self.keys.join(","),
            self.bytes.to_string(),
            output::ago(now, output::from_unix_ms(self.updated_unix_ms)),
            self.updated_by.clone(),
            if self.used_by.is_empty() {
                "-".into()
            } else {
                self.used_by
                    .iter()
                    .map(|u| format!("{} (v{})", u.job, u.secret_version))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ]
    }

    fn resource_name(&self) -> Option<String> {
        Some(format!("secret/{}", self.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_come_from_pairs_files_and_stdin_and_never_twice() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("cert");
        std::fs::write(&file, "CERT\n").expect("write");
        let data = values(
            &["user=app".into(), "url=a=b".into()],
            &[format!("cert={}", file.display())],
            Some("password"),
            &mut "s3cret\n".as_bytes(),
        )
        .expect("values");
        assert_eq!(data["user"], "app");
        assert_eq!(data["url"], "a=b");
        assert_eq!(data["cert"], "CERT\n", "files keep their bytes");
        assert_eq!(data["password"], "s3cret", "one trailing newline removed");
        let twice = values(&["a=1".into(), "a=2".into()], &[], None, &mut "".as_bytes());
        assert!(matches!(twice, Err(CliError::Usage(m)) if m.contains("twice")));
        let bare = values(&["hunter2".into()], &[], None, &mut "".as_bytes());
        assert!(
            matches!(bare, Err(CliError::Usage(m)) if !m.contains("hunter2") && m.contains("argument 1"))
        );
    }
}

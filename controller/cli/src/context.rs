//! `novacron context ...`: list, choose and inspect controller contexts.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clap::Subcommand;
use novacron_common::pki::{self, Identity, Serial};
use serde::Serialize;

use super::CliError;
use super::config::{ApiUrl, ConfigError, Context, ContextFile};
use super::output::{self, OutputFormat, TableRow};

/// Commands about contexts.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum ContextCommand {
    /// List the contexts; the current one is marked with `*`.
    #[command(visible_alias = "ls")]
    List,
    /// Make NAME the current context.
    #[command(visible_alias = "set")]
    Use {
        /// The context's name.
        name: String,
    },
    /// Add a context: a controller's API, its fleet CA, and a client certificate
    /// and key or an API token file. Relative paths are taken from the current
    /// directory and stored absolute. It becomes the current context with --use,
    /// or when there is none.
    Add(Box<AddArgs>),
    /// Delete a context. The current one is kept unless --force, which deletes it
    /// and leaves no current context.
    #[command(visible_alias = "rm")]
    Delete {
        /// The context's name.
        name: String,
        /// Delete it even if it is the current context.
        #[arg(long)]
        force: bool,
    },
    /// Show a context (the current one, or --context, by default) with the identity
    /// and expiry of its certificate.
    Show {
        /// The context's name.
        name: Option<String>,
    },
}

/// `novacron context add`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct AddArgs {
    /// The context's name.
    pub name: String,
    /// The controller's API, https://HOST:PORT.
    #[arg(long, value_name = "URL")]
    pub api: ApiUrl,
    /// The fleet CA (PEM) that signed the controller's certificate.
    #[arg(long, value_name = "FILE")]
    pub ca: PathBuf,
    /// The operator's client certificate (PEM).
    #[arg(
        long,
        value_name = "FILE",
        requires = "key",
        conflicts_with = "token_file"
    )]
    pub cert: Option<PathBuf>,
    /// The operator's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// A file holding an API token (`novacron-controller admin token`), instead of
    /// a certificate.
    #[arg(long, value_name = "FILE", required_unless_present = "cert")]
    pub token_file: Option<PathBuf>,
    /// Another controller of the same highly available group (repeatable):
    /// commands use the first controller that answers.
    #[arg(long = "also", value_name = "URL")]
    pub also: Vec<ApiUrl>,
    /// Make it the current context.
    #[arg(long = "use")]
    pub make_current: bool,
    /// Replace a context of the same name.
    #[arg(long)]
    pub force: bool,
}

/// One context as `context list` and `context show` print it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContextSummary {
    /// The context's name.
    pub name: String,
    /// Whether it is the current context.
    pub current: bool,
    /// The controller's API URL.
    pub api: String,
    /// The fleet CA file.
    pub ca: String,
    /// The client certificate file.
    pub cert: String,
    /// The client key file.
    pub key: String,
    /// The identity in the certificate, `role:name`, when it can be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// When the certificate expires (RFC 3339), when it can be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_expires: Option<String>,
    /// The certificate's serial (what `novacron cert revoke --serial` takes), when
    /// it can be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_serial: Option<String>,
    /// Why the certificate could not be read, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_problem: Option<String>,
}

impl TableRow for ContextSummary {
    fn headers() -> &'static [&'static str] {
        &["CURRENT", "NAME", "API", "CERT"]
    }

    fn cells(&self, _now: SystemTime) -> Vec<String> {
        vec![
            if self.current { "*" } else { "" }.to_string(),
            self.name.clone(),
            self.api.clone(),
            self.cert.clone(),
        ]
    }

    fn resource_name(&self) -> Option<String> {
        Some(format!("context/{}", self.name))
    }
}

/// Runs a context command on the file at `path`; `selected` is `--context`.
pub fn run(
    cmd: &ContextCommand,
    path: &Path,
    selected: Option<&str>,
    format: OutputFormat,
    out: &mut dyn Write,
    now: SystemTime,
) -> Result<(), CliError> {
    if let ContextCommand::Add(args) = cmd {
        return add(args, path, out);
    }
    let mut file = ContextFile::load(path)?;
    match cmd {
        ContextCommand::Add(_) => unreachable!("handled above"),
        ContextCommand::Delete { name, force } => {
            file.select(Some(name), path)?;
            let current = file.current.as_deref() == Some(name.as_str());
            if current && !force {
                return Err(CliError::Invalid(format!(
                    "context {name:?} is the current context; switch first with `novacron context use OTHER`, or pass --force to delete it and leave no current context"
                )));
            }
            file.contexts.remove(name);
            if current {
                file.current = None;
            }
            file.save(path)?;
            let note = if current {
                "; no context is current now"
            } else {
                ""
            };
            writeln!(out, "deleted context {name:?}{note}").map_err(output::OutputError::from)?;
        }
        ContextCommand::List => {
            let rows: Vec<ContextSummary> = file
                .contexts
                .iter()
                .map(|(name, ctx)| summary(&file, name, ctx, path, None))
                .collect();
            output::write_list(out, format, &rows, now)?;
        }
        ContextCommand::Use { name } => {
            file.select(Some(name), path)?;
            file.current = Some(name.clone());
            file.save(path)?;
            writeln!(out, "switched to context {name:?}").map_err(output::OutputError::from)?;
        }
        ContextCommand::Show { name } => {
            let (name, ctx) = file.select(name.as_deref().or(selected), path)?;
            let row = summary(&file, &name, ctx, path, Some(now));
            output::write_one(out, format, &row, || show(&row))?;
        }
    }
    Ok(())
}

/// `context add`: checks that the files can be read, stores them absolute, and
/// writes the context (refusing to replace one without --force).
fn add(args: &AddArgs, path: &Path, out: &mut dyn Write) -> Result<(), CliError> {
    let file = match ContextFile::load(path) {
        Ok(file) => file,
        Err(ConfigError::Missing { .. }) => ContextFile::default(),
        Err(e) => return Err(e.into()),
    };
    if file.contexts.contains_key(&args.name) && !args.force {
        return Err(CliError::Invalid(format!(
            "a context named {:?} exists in {}; pass --force to replace it, or pick another name",
            args.name,
            path.display()
        )));
    }
    let readable = |what: &str, p: &Path| -> Result<PathBuf, CliError> {
        let abs = std::path::absolute(p)
            .map_err(|e| CliError::Invalid(format!("{what} {}: {e}", p.display())))?;
        fs::File::open(&abs).map_err(|e| {
            CliError::Invalid(format!("{what} {}: cannot read it: {e}", abs.display()))
        })?;
        Ok(abs)
    };
    let ctx = Context {
        api: args.api.clone(),
        ca: readable("--ca", &args.ca)?,
        cert: args
            .cert
            .as_deref()
            .map(|p| readable("--cert", p))
            .transpose()?
            .unwrap_or_default(),
        key: args
            .key
            .as_deref()
            .map(|p| readable("--key", p))
            .transpose()?
            .unwrap_or_default(),
        token_file: args
            .token_file
            .as_deref()
            .map(|p| readable("--token-file", p))
            .transpose()?,
        also: args.also.clone(),
    };
    super::config::write_context(path, &args.name, &ctx, args.make_current)?;
    let current = ContextFile::load(path)?.current.as_deref() == Some(args.name.as_str());
    writeln!(
        out,
        "added context {:?}{}",
        args.name,
        if current { " (current)" } else { "" }
    )
    .map_err(output::OutputError::from)?;
    Ok(())
}

/// A context's row; with `now`, its certificate is read for identity and expiry.
fn summary(
    file: &ContextFile,
    name: &str,
    ctx: &Context,
    path: &Path,
    now: Option<SystemTime>,
) -> ContextSummary {
    let resolved = ctx.resolved(path);
    let mut row = ContextSummary {
        name: name.to_string(),
        current: file.current.as_deref() == Some(name),
        api: ctx.api.to_string(),
        ca: resolved.ca.display().to_string(),
        cert: resolved.cert.display().to_string(),
        key: resolved.key.display().to_string(),
        identity: None,
        cert_expires: None,
        cert_serial: None,
        cert_problem: None,
    };
    if let Some(now) = now {
        match read_cert(&resolved.cert) {
            Ok((identity, not_after, serial)) => {
                row.identity = Some(identity.to_string());
                row.cert_expires = Some(output::timestamp(now, not_after));
                row.cert_serial = Some(serial.to_string());
            }
            Err(problem) => row.cert_problem = Some(problem),
        }
    }
    row
}

fn read_cert(path: &Path) -> Result<(Identity, SystemTime, Serial), String> {
    let pem = fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    let der = pki::first_cert_der(&pem).map_err(|e| e.to_string())?;
    let identity = Identity::from_cert_der(&der).map_err(|e| e.to_string())?;
    let info = pki::cert_info(&der).map_err(|e| e.to_string())?;
    let serial = Serial::of_cert_der(&der).map_err(|e| e.to_string())?;
    Ok((identity, info.not_after, serial))
}

fn show(row: &ContextSummary) -> String {
    let mut pairs = vec![
        ("Name", row.name.clone()),
        (
            "Current",
            if row.current { "yes" } else { "no" }.to_string(),
        ),
        ("API", row.api.clone()),
        ("CA", row.ca.clone()),
        ("Certificate", row.cert.clone()),
        ("Key", row.key.clone()),
    ];
    if let Some(identity) = &row.identity {
        pairs.push(("Identity", identity.clone()));
    }
    if let Some(expires) = &row.cert_expires {
        pairs.push(("Expires", expires.clone()));
    }
    if let Some(serial) = &row.cert_serial {
        pairs.push(("Serial", serial.clone()));
    }
    if let Some(problem) = &row.cert_problem {
        pairs.push(("Certificate problem", problem.clone()));
    }
    output::key_values("", &pairs)
}

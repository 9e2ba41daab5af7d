//! `novacron context ...`: list, choose and inspect controller contexts.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use clap::Subcommand;
use novacron_common::pki::{self, Identity, Serial};
use serde::Serialize;

use super::CliError;
use super::config::{Context, ContextFile};
use super::output::{self, OutputFormat, TableRow};

/// Commands about contexts.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum ContextCommand {
    /// List the contexts; the current one is marked with `*`.
    #[command(visible_alias = "ls")]
    List,
    /// Make NAME the current context.
    Use {
        /// The context's name.
        name: String,
    },
    /// Show a context (the current one, or --context, by default) with the identity
    /// and expiry of its certificate.
    Show {
        /// The context's name.
        name: Option<String>,
    },
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
    let mut file = ContextFile::load(path)?;
    match cmd {
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

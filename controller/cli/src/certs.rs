//! `novacron cert revoke|revoked`: revoke operator or node certificates by serial
//! (admin), and list the revocations.

use std::io::Write;
use std::time::SystemTime;

use clap::Subcommand;

use super::CliError;
use super::client::ApiClient;
use super::output::{self, OutputFormat, TableRow};
use novacron_api::{CertRevocationView, CertRevokeRequest, CertRevokeResponse};

/// `novacron cert` subcommands.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum CertCommand {
    /// Revoke a certificate (operator or node) by serial: it is refused at every
    /// later handshake and its open connections are closed. Find the serial with
    /// `novacron context show` (your own certificate), in the output of
    /// `novacron-controller admin issue`, or with `openssl x509 -noout -serial` on a
    /// node's certificate file.
    Revoke {
        /// The serial, hex (`:` separators and a `0x` prefix are allowed).
        #[arg(long)]
        serial: String,
        /// Why, for the audit trail.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List the revoked certificates.
    #[command(visible_alias = "list")]
    Revoked,
}

/// Runs a `cert` subcommand.
pub async fn run(
    cmd: &CertCommand,
    client: &ApiClient,
    format: OutputFormat,
    out: &mut dyn Write,
    now: SystemTime,
) -> Result<(), CliError> {
    match cmd {
        CertCommand::Revoke { serial, reason } => {
            let req = CertRevokeRequest {
                serial: serial.clone(),
                reason: reason.clone(),
            };
            let r: CertRevokeResponse = client.post(&["v1", "certs", "revoke"], &req).await?;
            output::write_one(out, format, &r, || {
                format!(
                    "certificate {} revoked{}; closed {} API connection(s){}",
                    r.revocation.serial,
                    if r.already_revoked {
                        " (it already was)"
                    } else {
                        ""
                    },
                    r.closed_api_connections,
                    if r.closed_nodes.is_empty() {
                        String::new()
                    } else {
                        format!(" and the agent link of {}", r.closed_nodes.join(", "))
                    }
                )
            })?;
        }
        CertCommand::Revoked => {
            let list: Vec<CertRevocationView> = client.get(&["v1", "certs", "revoked"]).await?;
            output::write_list(out, format, &list, now)?;
        }
    }
    Ok(())
}

impl TableRow for CertRevocationView {
    fn headers() -> &'static [&'static str] {
        &["SERIAL", "REVOKED", "BY", "REASON"]
    }

    fn cells(&self, now: SystemTime) -> Vec<String> {
        vec![
            self.serial.clone(),
            output::ago(now, output::from_unix_ms(self.revoked_unix_ms)),
            self.by.clone(),
            self.reason.clone(),
        ]
    }
}

//! `novacron version`: this client's release and git commit, then the
//! controller's (`GET /v1/version`).

use std::io::Write;

use novacron_api::VersionInfo;
use serde::Serialize;

use crate::output::{self, OutputFormat};
use crate::{ApiClient, CliError};

/// What `novacron version -o json|yaml` prints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Versions {
    /// This CLI.
    pub client: VersionInfo,
    /// The controller; absent with `--client`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<VersionInfo>,
}

/// One line: `client: 0.1.0 (commit abc1234)`.
pub fn line(who: &str, v: &VersionInfo) -> String {
    format!("{who}: {} (commit {})", v.version, v.commit)
}

/// Prints the client's version, then asks `client` (when given) for the
/// controller's. In a table the client's line comes first, so it is printed even
/// when the controller cannot be reached (the error follows, with its exit code).
pub async fn run(
    client: Option<Result<ApiClient, CliError>>,
    format: OutputFormat,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let mine = VersionInfo::this_build();
    let Some(client) = client else {
        return print(out, format, mine, None);
    };
    if format.is_human() {
        writeln!(out, "{}", line("client", &mine)).map_err(output::OutputError::Io)?;
        let server: VersionInfo = client?.get(&["v1", "version"]).await?;
        writeln!(out, "{}", line("server", &server)).map_err(output::OutputError::Io)?;
        return Ok(());
    }
    let server: VersionInfo = client?.get(&["v1", "version"]).await?;
    print(out, format, mine, Some(server))
}

fn print(
    out: &mut dyn Write,
    format: OutputFormat,
    client: VersionInfo,
    server: Option<VersionInfo>,
) -> Result<(), CliError> {
    match format {
        OutputFormat::Table | OutputFormat::Wide => {
            writeln!(out, "{}", line("client", &client)).map_err(output::OutputError::Io)?;
        }
        _ => {
            output::write_value(out, format, &Versions { client, server })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn client_only_prints_this_build() {
        let mut out = Vec::new();
        run(None, OutputFormat::Table, &mut out)
            .await
            .expect("runs");
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            text,
            format!(
                "client: {} (commit {})\n",
                env!("CARGO_PKG_VERSION"),
                VersionInfo::this_build().commit
            )
        );
        let mut out = Vec::new();
        run(None, OutputFormat::Json, &mut out).await.expect("runs");
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["client"]["version"], env!("CARGO_PKG_VERSION"));
        assert!(v.get("server").is_none(), "{v}");
    }
}

//! The few QMP commands the driver sends, each on a short connection of its own
//! (QEMU's monitor serves one client at a time) and within [`QMP_TIMEOUT`].

use std::io;
use std::path::Path;
use std::time::Duration;

use qapi::futures::QmpStreamTokio;

/// The longest one QMP exchange (connect, negotiate, command) may take.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(3);

async fn run<C>(sock: &Path, command: C) -> io::Result<C::Ok>
where
    C: qapi::qmp::QmpCommand + 'static,
{
    let exchange = async {
        let negotiation = QmpStreamTokio::open_uds(sock).await?;
        let mut stream = negotiation.negotiate().await?;
        stream.execute(command).await.map_err(io::Error::from)
    };
    match tokio::time::timeout(QMP_TIMEOUT, exchange).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "QMP at {} did not answer within {QMP_TIMEOUT:?}",
                sock.display()
            ),
        )),
    }
}

/// QEMU's run state, in its own word (`running`, `paused`, `shutdown`,
/// `prelaunch`, `internal-error`, ...).
pub async fn status(sock: &Path) -> io::Result<String> {
    let info = run(sock, qapi::qmp::query_status {}).await?;
    let word = serde_json::to_value(info.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "running".to_owned());
    Ok(word)
}

/// Presses the guest's ACPI power button.
pub async fn powerdown(sock: &Path) -> io::Result<()> {
    run(sock, qapi::qmp::system_powerdown {}).await.map(|_| ())
}

/// Ends QEMU at once.
pub async fn quit(sock: &Path) -> io::Result<()> {
    // QEMU may close the socket before it answers `quit`: that is success too.
    match run(sock, qapi::qmp::quit {}).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(()),
        Err(e) => Err(e),
    }
}

/// A command sent as JSON arguments and answered as JSON: for the migration
/// commands, whose arguments and answers differ between QEMU releases more than
/// the generated types allow (QEMU 7.2's `migrate` has no `channels`, its
/// `MigrationStats` fields that later releases dropped).
macro_rules! raw_command {
    ($t:ident, $name:literal) => {
        #[derive(serde::Serialize)]
        #[serde(transparent)]
        struct $t(serde_json::Map<String, serde_json::Value>);
        impl qapi::Command for $t {
            type Ok = serde_json::Value;
            const NAME: &'static str = $name;
            const ALLOW_OOB: bool = false;
        }
        impl qapi::qmp::QmpCommand for $t {}
    };
}

raw_command!(Migrate, "migrate");
raw_command!(QueryMigrate, "query-migrate");
raw_command!(MigrateCancel, "migrate_cancel");
raw_command!(SetCapabilities, "migrate-set-capabilities");
raw_command!(SetParameters, "migrate-set-parameters");
raw_command!(Stop, "stop");
raw_command!(Cont, "cont");

fn args(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    }
}

/// Prepares the source of a migration: auto-converge (QEMU slows a guest that
/// dirties memory faster than it is sent), the longest planned pause, and no
/// bandwidth cap of QEMU's own (the link is the cap).
pub async fn prepare_migration(sock: &Path, downtime_limit_ms: u64) -> io::Result<()> {
    run(
        sock,
        SetCapabilities(args(serde_json::json!({
            "capabilities": [{"capability": "auto-converge", "state": true}]
        }))),
    )
    .await?;
    run(
        sock,
        SetParameters(args(serde_json::json!({
            "downtime-limit": downtime_limit_ms,
            "max-bandwidth": 10u64 << 30,
        }))),
    )
    .await
    .map(|_| ())
}

/// Starts migrating to `uri` (QEMU connects to it and returns at once); with
/// `block`, the VM's disks too, only what their top layer holds (QEMU 7.2's
/// `blk` and `inc`).
pub async fn migrate(sock: &Path, uri: &str, block: bool) -> io::Result<()> {
    let mut arguments = serde_json::json!({ "uri": uri });
    if block {
        arguments["blk"] = true.into();
        arguments["inc"] = true.into();
    }
    run(sock, Migrate(args(arguments))).await.map(|_| ())
}

/// QEMU's `query-migrate` answer, as JSON.
pub async fn query_migrate(sock: &Path) -> io::Result<serde_json::Value> {
    run(sock, QueryMigrate(serde_json::Map::new())).await
}

/// Cancels a migration in progress (the source runs on).
pub async fn migrate_cancel(sock: &Path) -> io::Result<()> {
    run(sock, MigrateCancel(serde_json::Map::new()))
        .await
        .map(|_| ())
}

/// Pauses the guest's vCPUs.
pub async fn stop(sock: &Path) -> io::Result<()> {
    run(sock, Stop(serde_json::Map::new())).await.map(|_| ())
}

/// Resumes the guest's vCPUs.
pub async fn cont(sock: &Path) -> io::Result<()> {
    run(sock, Cont(serde_json::Map::new())).await.map(|_| ())
}

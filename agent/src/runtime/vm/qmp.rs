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

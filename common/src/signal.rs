//! Process signals, for the binaries' clean shutdown.

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Keeps SIGHUP from ending the process (its default action), as an operator or
/// a terminal closing may send it: each one is logged, saying that `what` does
/// not reload its configuration and that a restart applies changes. Spawns a task
/// on the current runtime; does nothing when the handler cannot be installed.
pub fn ignore_hangup(what: &'static str) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot handle SIGHUP; it would end {what}");
        return;
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::warn!(
                "SIGHUP received: {what} does not reload its configuration; restart it to apply changes (it keeps running)"
            );
        }
    });
}

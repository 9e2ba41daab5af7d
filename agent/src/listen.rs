//! Bounded accepting for the agent's small HTTP listeners (the metrics endpoint,
//! the loopback registry).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// The next connection on `listener` once one of `slots` is free, with the
/// permit that holds its slot until dropped; `None` once `cancel` fires. A
/// failed accept (out of descriptors and the like) is logged as `what`'s and
/// waited out for 100 ms rather than spun on.
pub async fn next_connection(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
    cancel: &CancellationToken,
    what: &str,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let permit = tokio::select! {
        _ = cancel.cancelled() => return None,
        p = slots.clone().acquire_owned() => p.ok()?,
    };
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => return Some((stream, peer, permit)),
                Err(e) => {
                    warn!(error = %e, "{what}: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

//! Checkpoints on this node: [`Checkpointer`] makes bundles from Docker containers
//! and restores them into new ones.
//!
//! A bundle (see `novacron_common::checkpoint`) is a zstd-compressed tar:
//! `bundle.json` first, then `criu/` (live mode: the CRIU image Docker wrote under
//! `<DockerRootDir>/containers/<id>/checkpoints/<name>`), `rootfs.tar` (the writable
//! layer's added and modified paths, members relative to `/`) and `volumes/<n>.tar`
//! (one per volume target, members relative to the target). It lives in the cache
//! directory as `<sha256>.ncb`; `index.json` there lists what this node made.
//!
//! [`Checkpointer::checkpoint`] stops the container (before a migration);
//! [`Checkpointer::checkpoint_running`] pauses it while the state is captured and
//! lets it go on (periodic checkpoints).
//!
//! The filesystem copies are taken **after** the container stopped (CRIU checks the
//! sizes of the files a process holds open when it restores, so the data must be
//! exactly as at dump time). Every Docker call carries a timeout. Bundles can come
//! from peers, so reading one never panics: members must be plain files or
//! directories under relative paths without `..`, and unpacking stops at the size
//! limit of decompressed bytes.
//!
//! **Needs the daemon's host:** live mode and deleted-path replay read and write
//! under the daemon's data root and the container's overlay upper directory, so the
//! agent must run as root next to a local daemon.
//!
//! The parts:
//! - `engine`: drives Docker (through [`crate::runtime::docker::checkpoint`], the
//!   only place that knows bollard) and CRIU: checkpoint, restore, live capability;
//! - `bundle`: packs and unpacks the bundle file (tar, zstd, SHA-256), checking
//!   everything read;
//! - `cache`: the cache directory, its index, pruning and free space;
//! - `rootfs`: which paths of the writable layer are carried (a pure plan), their
//!   tars, and deleted paths replayed as whiteouts.

mod bundle;
mod cache;
pub(crate) mod early;
mod engine;
pub(crate) mod oci;
mod rootfs;
mod vm;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tokio::sync::OnceCell;

pub use engine::{PROBE_REPO, RUNC_CRIU_CONF, RUNC_CRIU_OPTIONS, runc_criu_options_missing};

use crate::runtime::docker::checkpoint::{CheckpointDocker, Endpoint};

/// The limit on one short call to the daemon (inspect, info, start, changes).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The limit on the CRIU dump (`POST /containers/{id}/checkpoints`).
pub const DUMP_TIMEOUT: Duration = Duration::from_secs(300);
/// The limit on one archive download or upload.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(900);
/// The limit on the live probe's steps (create, start, dump, copies, restore of a
/// throwaway container; about a second when all is well).
/// [`PROBE_CALL_TIMEOUT`] bounds its image import and each clean-up call, so the
/// whole probe ends within 50 s, inside the unit's start timeout.
pub const LIVE_PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// See [`LIVE_PROBE_TIMEOUT`].
pub const PROBE_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Free space kept on the cache's file system beyond what a bundle needs.
pub const FREE_SPACE_MARGIN: u64 = 64 * 1024 * 1024;
/// The file name extension of a cached bundle.
pub const BUNDLE_EXT: &str = "ncb";
/// The cache's list of bundles made here.
pub const INDEX_FILE: &str = "index.json";

/// The most the agent's start waits for [`probe_live`]; below the unit's 60 s
/// start timeout.
pub const LIVE_PROBE_WAIT: Duration = Duration::from_secs(45);

/// Runs [`Checkpointer::probe_live`] on a task of its own and waits at most
/// [`LIVE_PROBE_WAIT`] for it: a daemon that does not answer fails the probe (the
/// task still removes what it made). The outcome is what the node advertises.
pub async fn probe_live(checkpointer: std::sync::Arc<Checkpointer>) -> Result<(), String> {
    let task = tokio::spawn(async move { checkpointer.probe_live().await });
    match tokio::time::timeout(LIVE_PROBE_WAIT, task).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(e)) => Err(format!("the live checkpoint probe failed: {e}")),
        Err(_) => Err(format!(
            "the live checkpoint probe did not finish within {LIVE_PROBE_WAIT:?}: the Docker daemon is slow or stuck"
        )),
    }
}

/// Errors of checkpoint and restore.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The Docker host address cannot be used.
    #[error(
        "unsupported Docker host {host:?}: expected unix://PATH, a socket path, tcp://HOST:PORT or http://HOST:PORT"
    )]
    Host {
        /// The address given.
        host: String,
    },
    /// A call to the Docker daemon failed.
    #[error("Docker {op} of {target} failed: {message}")]
    Daemon {
        /// The operation.
        op: &'static str,
        /// The container, path or daemon it was about.
        target: String,
        /// What the daemon or the connection said.
        message: String,
    },
    /// A call to the Docker daemon did not finish in time.
    #[error(
        "Docker {op} of {target} did not finish within {after:?}; check the daemon (docker info) and retry"
    )]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The container, path or daemon it was about.
        target: String,
        /// The limit.
        after: Duration,
    },
    /// An argument is not acceptable.
    #[error("{what} {value:?} is not valid; expected {expected}")]
    Invalid {
        /// What the argument is.
        what: &'static str,
        /// Its value.
        value: String,
        /// What would be accepted.
        expected: &'static str,
    },
    /// The container is in a state the operation cannot work from.
    #[error("container {container} is {state}; {expected}")]
    State {
        /// The container.
        container: String,
        /// Its state.
        state: String,
        /// What the operation needs.
        expected: &'static str,
    },
    /// No cached bundle has this digest.
    #[error(
        "no bundle {digest} in the checkpoint cache {dir}; fetch it from a node or the controller first"
    )]
    NotFound {
        /// The digest asked for.
        digest: String,
        /// The cache directory.
        dir: PathBuf,
    },
    /// A cached bundle's bytes do not hash to its name.
    #[error(
        "bundle {path} is corrupt: expected sha256 {expected}, its bytes hash to {actual}; delete it and fetch it again"
    )]
    DigestMismatch {
        /// The bundle file.
        path: PathBuf,
        /// Its name.
        expected: String,
        /// What its bytes hash to.
        actual: String,
    },
    /// A bundle, or what would go in one, is over the size limit.
    #[error("{what} is over the limit: {bytes} bytes or more, at most {limit} are accepted")]
    TooLarge {
        /// What is too large.
        what: String,
        /// Its size so far.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// The cache's file system has too little free space.
    #[error(
        "not enough free space in {dir}: {free} bytes free, {needed} needed; free space or move the checkpoint cache"
    )]
    NoSpace {
        /// The directory.
        dir: PathBuf,
        /// Bytes free for unprivileged use.
        free: u64,
        /// Bytes needed (with a margin of FREE_SPACE_MARGIN).
        needed: u64,
    },
    /// A virtual machine's snapshot or its restore failed.
    #[error("virtual machine {vm}: {message}")]
    Vm {
        /// The VM.
        vm: String,
        /// What failed.
        message: String,
    },
    /// A bundle is malformed or unsafe; nothing from it was applied.
    #[error("bundle {bundle} is not acceptable: {reason}")]
    BadBundle {
        /// The bundle (digest or path).
        bundle: String,
        /// What is wrong, and what is accepted.
        reason: String,
    },
    /// A local file operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Makes, verifies, restores and prunes checkpoint bundles for one Docker daemon.
#[derive(Debug)]
pub struct Checkpointer {
    host: String,
    endpoint: Endpoint,
    negotiated: OnceCell<CheckpointDocker>,
    cache_dir: PathBuf,
    max_bytes: u64,
    index_lock: std::sync::Mutex<()>,
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, CheckpointError> + Send + 'static,
) -> Result<T, CheckpointError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| CheckpointError::Io {
            what: "a worker thread failed while handling",
            path: PathBuf::from("the checkpoint"),
            source: io::Error::other(e.to_string()),
        })?
}

fn now_ms() -> u64 {
    novacron_common::clock::unix_ms(SystemTime::now())
}

fn create(path: &Path) -> Result<File, CheckpointError> {
    File::create(path).map_err(|source| CheckpointError::Io {
        what: "creating",
        path: path.to_path_buf(),
        source,
    })
}

fn mkdir(path: &Path) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(path).map_err(|source| CheckpointError::Io {
        what: "creating",
        path: path.to_path_buf(),
        source,
    })
}

fn remove_file(path: &Path) -> Result<(), CheckpointError> {
    std::fs::remove_file(path).map_err(|source| CheckpointError::Io {
        what: "deleting",
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::Checkpointer;

    /// A checkpointer whose daemon does not exist (for what needs no Docker).
    pub(super) fn checkpointer(cache: &Path) -> Checkpointer {
        Checkpointer::new(Some("unix:///nonexistent/docker.sock"), cache.to_path_buf())
            .expect("checkpointer")
    }
}
